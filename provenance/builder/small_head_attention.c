/* Causal attention for heads of small dimension (LaaM's are 2), forward and backward, on the CPU.
 *
 * Part of provenance (provenance/builder/small_head_attention.py loads it; docs/benchmarks.md has the
 * measurements). With heads of dimension 2 a general attention kernel spends its time on matrix
 * products whose inner dimension is 2; here each query's scores, softmax and weighted sum are a few
 * vector operations over the keys.
 *
 * Deterministic by construction: every value is a fixed sequence of IEEE single-precision operations
 * written out below. The numerics have a fixed 16 lanes (not the machine's width: one 16-lane vector or
 * two 8-lane halves, see VW), sums over lanes are taken in lane order, the exponential is our own polynomial (not libm's; kernel_exp.h), and the
 * library is compiled with -ffp-contract=off and without -ffast-math, so no compiler may fuse or
 * reorder an operation. The bits are therefore the same whatever instruction set the library is
 * compiled for (x86-64, -v3 or -v4: the tests compare them) and whatever the thread count (each task
 * below is computed by one thread, in one order).
 *
 * Layouts (float32, contiguous): q, o, do: [B*H][S][D]; kt, vt, dkt, dvt: [B*Hkv][D][Sp], keys along
 * the last axis, zero-padded to Sp = S rounded up to 16; m, l: [B*H][S], each query's largest score
 * and the sum of its exponentials. Query head h reads key/value head h / (H / Hkv).
 */
#include <stdint.h>
#include <string.h>

#define W 16     /* lanes of the numerics: keys are padded to, and every per-lane sum strides over, 16 */
#define MAX_D 8  /* largest head dimension (small_head_attention.MAX_HEAD_DIM) */
/* The hardware's vectors: one 16-lane vector where the target has AVX-512, else two 8-lane halves (lanes
   0-7, then 8-15). A 16-lane GCC vector type on an AVX2 target has no machine mode, so GCC keeps every such
   value in memory and each operation goes through the stack (8x slower at LaaM's shape). Every lane runs
   the same operations either way, and the sums over lanes run over lanes 0..15 in order, so the bits are
   the same for either choice. */
#ifndef VW  /* the tests set it both ways on any machine */
#ifdef __AVX512F__
#define VW 16
#else
#define VW 8
#endif
#endif
#define NV (W / VW)  /* hardware vectors per 16 lanes */
typedef float vf __attribute__((vector_size(VW * 4), aligned(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4), aligned(VW * 4)));

static inline vf splat(float x) { vf v; for (int l = 0; l < VW; l++) v[l] = x; return v; }
static inline vf ldv(const float *p) { return *(const vf *)p; }

#include "kernel_exp.h"  /* vexp(): our exponential, shared with tiled_attention.c */

/* Scores of keys after query i (lane l of a vector starting at key j0 is key j0 + l) set to -inf. */
static inline vf causal(vf x, int64_t j0, int64_t i) {
    vi key, ninf = (vi)splat(-__builtin_inff());
    for (int l = 0; l < VW; l++) key[l] = (int32_t)(j0 + l);
    vi keep = key <= (vi){0} + (int32_t)i;
    return (vf)(((vi)x & keep) | (ninf & ~keep));
}

static inline vf vmax(vf a, vf x) { vi c = x > a; return (vf)(((vi)x & c) | ((vi)a & ~c)); }

/* Sum and max over the 16 lanes held in v[0..NV), in lane order. */
static inline float hsum(const vf *v) {
    float s = v[0][0];
    for (int l = 1; l < W; l++) s = s + v[l / VW][l % VW];
    return s;
}
static inline float hmax(const vf *v) {
    float s = v[0][0];
    for (int l = 1; l < W; l++) s = v[l / VW][l % VW] > s ? v[l / VW][l % VW] : s;
    return s;
}

/* Forward over tasks [t0, t1), task = b*H + h: o, m and l for every query of the task. Keys go in blocks
   of W = 16; each block is NV hardware vectors, k = jb*W + h*VW + lane. */
static inline __attribute__((always_inline)) void fwd(int64_t t0, int64_t t1, int64_t H, int64_t Hkv, int64_t S, int64_t Sp, const int64_t D, float scale,
                   const float *q, const float *kt, const float *vt, float *o, float *m_out, float *l_out) {
    vf s[Sp / VW];
    for (int64_t task = t0; task < t1; task++) {
        int64_t b = task / H, h = task % H, kv = b * Hkv + h / (H / Hkv);
        const float *K = kt + kv * D * Sp, *V = vt + kv * D * Sp;
        for (int64_t i = 0; i < S; i++) {
            const float *qi = q + (task * S + i) * D;
            const int64_t nb = i / W + 1;  /* blocks of 16 keys */
            vf vq[MAX_D];
            for (int64_t d = 0; d < D; d++) vq[d] = splat(qi[d]);
            const vf vscale = splat(scale);
            vf vm[NV], lsum[NV], acc[MAX_D][NV];
            for (int u = 0; u < NV; u++) vm[u] = splat(-__builtin_inff());
            for (int64_t jb = 0; jb < nb; jb++)
                for (int u = 0; u < NV; u++) {
                    const int64_t j0 = jb * W + u * VW;
                    vf x = vq[0] * ldv(K + j0);
                    for (int64_t d = 1; d < D; d++) x = x + vq[d] * ldv(K + d * Sp + j0);
                    x = x * vscale;
                    if (jb == nb - 1) x = causal(x, j0, i);
                    s[jb * NV + u] = x;
                    vm[u] = vmax(vm[u], x);
                }
            const vf vmx = splat(hmax(vm));
            for (int u = 0; u < NV; u++) {
                lsum[u] = splat(0.0f);
                for (int64_t d = 0; d < D; d++) acc[d][u] = splat(0.0f);
            }
            for (int64_t jb = 0; jb < nb; jb++)
                for (int u = 0; u < NV; u++) {
                    const int64_t j0 = jb * W + u * VW;
                    vf p = vexp(s[jb * NV + u] - vmx);
                    lsum[u] = lsum[u] + p;
                    for (int64_t d = 0; d < D; d++) acc[d][u] = acc[d][u] + p * ldv(V + d * Sp + j0);
                }
            float l = hsum(lsum), inv = 1.0f / l;
            for (int64_t d = 0; d < D; d++) o[(task * S + i) * D + d] = hsum(acc[d]) * inv;
            m_out[task * S + i] = vmx[0];
            l_out[task * S + i] = l;
        }
    }
}

/* Backward over key/value groups [g0, g1), g = b*Hkv + kvh: dq for the group's query heads and the
   group's dkt, dvt, accumulated over its query heads in order, then over queries in order. The
   probabilities are recomputed exactly as the forward computed them. */
static inline __attribute__((always_inline)) void bwd(int64_t g0, int64_t g1, int64_t H, int64_t Hkv, int64_t S, int64_t Sp, const int64_t D, float scale,
                   const float *q, const float *kt, const float *vt, const float *o, const float *m_in,
                   const float *l_in, const float *do_, float *dq, float *dkt, float *dvt) {
    int64_t G = H / Hkv;
    for (int64_t g = g0; g < g1; g++) {
        int64_t b = g / Hkv, kvh = g % Hkv;
        const float *K = kt + g * D * Sp, *V = vt + g * D * Sp;
        float *dK = dkt + g * D * Sp, *dV = dvt + g * D * Sp;
        memset(dK, 0, sizeof(float) * D * Sp);
        memset(dV, 0, sizeof(float) * D * Sp);
        for (int64_t hh = 0; hh < G; hh++) {
            int64_t task = b * H + kvh * G + hh;
            for (int64_t i = 0; i < S; i++) {
                const float *qi = q + (task * S + i) * D, *doi = do_ + (task * S + i) * D, *oi = o + (task * S + i) * D;
                float mx = m_in[task * S + i], inv = 1.0f / l_in[task * S + i];
                float Di = doi[0] * oi[0];
                for (int64_t d = 1; d < D; d++) Di = Di + doi[d] * oi[d];
                /* every scalar the key loop needs, broadcast once: the stores into dK and dV below
                   could otherwise alias them, and the compiler would reload them for every block */
                vf vq[MAX_D], vdo[MAX_D], vcq[MAX_D], acc[MAX_D][NV];
                for (int64_t d = 0; d < D; d++) {
                    vq[d] = splat(qi[d]);
                    vdo[d] = splat(doi[d]);
                    vcq[d] = splat(scale * qi[d]);
                    for (int u = 0; u < NV; u++) acc[d][u] = splat(0.0f);
                }
                const vf vscale = splat(scale), vmx = splat(mx), vinv = splat(inv), vDi = splat(Di);
                const int64_t nb = i / W + 1;
                for (int64_t jb = 0; jb < nb; jb++)
                    for (int u = 0; u < NV; u++) {
                        const int64_t j0 = jb * W + u * VW;
                        vf x = vq[0] * ldv(K + j0);
                        for (int64_t d = 1; d < D; d++) x = x + vq[d] * ldv(K + d * Sp + j0);
                        x = x * vscale;
                        if (jb == nb - 1) x = causal(x, j0, i);
                        vf p = vexp(x - vmx) * vinv;
                        vf dp = vdo[0] * ldv(V + j0);
                        for (int64_t d = 1; d < D; d++) dp = dp + vdo[d] * ldv(V + d * Sp + j0);
                        vf ds = p * (dp - vDi);
                        for (int64_t d = 0; d < D; d++) {
                            acc[d][u] = acc[d][u] + ds * ldv(K + d * Sp + j0);
                            vf *dk = (vf *)(dK + d * Sp + j0), *dv = (vf *)(dV + d * Sp + j0);
                            *dk = *dk + vcq[d] * ds;
                            *dv = *dv + vdo[d] * p;
                        }
                    }
                for (int64_t d = 0; d < D; d++) dq[(task * S + i) * D + d] = hsum(acc[d]) * scale;
            }
        }
    }
}

/* The entry points: D known at compile time for the common head dimensions. */
int small_head_attn_fwd(int64_t t0, int64_t t1, int64_t H, int64_t Hkv, int64_t S, int64_t Sp, int64_t D, float scale,
                        const float *q, const float *kt, const float *vt, float *o, float *m_out, float *l_out) {
    if (D < 1 || D > MAX_D || Hkv < 1 || H % Hkv || Sp % W || Sp < S) return -1;
    switch (D) {
    case 1: fwd(t0, t1, H, Hkv, S, Sp, 1, scale, q, kt, vt, o, m_out, l_out); break;
    case 2: fwd(t0, t1, H, Hkv, S, Sp, 2, scale, q, kt, vt, o, m_out, l_out); break;
    case 4: fwd(t0, t1, H, Hkv, S, Sp, 4, scale, q, kt, vt, o, m_out, l_out); break;
    default: fwd(t0, t1, H, Hkv, S, Sp, D, scale, q, kt, vt, o, m_out, l_out);
    }
    return 0;
}
int small_head_attn_bwd(int64_t g0, int64_t g1, int64_t H, int64_t Hkv, int64_t S, int64_t Sp, int64_t D, float scale,
                        const float *q, const float *kt, const float *vt, const float *o, const float *m_in,
                        const float *l_in, const float *do_, float *dq, float *dkt, float *dvt) {
    if (D < 1 || D > MAX_D || Hkv < 1 || H % Hkv || Sp % W || Sp < S) return -1;
    switch (D) {
    case 1: bwd(g0, g1, H, Hkv, S, Sp, 1, scale, q, kt, vt, o, m_in, l_in, do_, dq, dkt, dvt); break;
    case 2: bwd(g0, g1, H, Hkv, S, Sp, 2, scale, q, kt, vt, o, m_in, l_in, do_, dq, dkt, dvt); break;
    case 4: bwd(g0, g1, H, Hkv, S, Sp, 4, scale, q, kt, vt, o, m_in, l_in, do_, dq, dkt, dvt); break;
    default: bwd(g0, g1, H, Hkv, S, Sp, D, scale, q, kt, vt, o, m_in, l_in, do_, dq, dkt, dvt);
    }
    return 0;
}
