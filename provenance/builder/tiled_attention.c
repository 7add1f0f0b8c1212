/* Causal attention for heads of dimension 16, 32, 48, ... (a multiple of 16), forward and backward, on the CPU.
 *
 * Part of provenance (provenance/builder/tiled_attention.py loads it; docs/benchmarks.md has the
 * measurements). PyTorch's math attention materialises the scaled score matrix, masks it, softmaxes it
 * with a pass that looks for fully masked rows, and multiplies, each a separate operation with its own
 * pass over memory and its own thread fork; here each (batch, head) is one task that one thread computes
 * in cache: its scores, softmax and weighted sum, and their gradients, as small tiled matrix products
 * that skip the keys a query cannot see.
 *
 * Deterministic by construction: every value is a fixed sequence of IEEE single-precision operations
 * written out below. Vectors are GCC vector types of a fixed 8 lanes (not the machine's width). Every
 * sum of products runs in one fixed order, one exactly rounded fused multiply-add (fmaf) at a time:
 * over the head dimension for scores, over keys for outputs, over queries (and the query heads of a
 * key/value group, in order) for the key and value gradients. Sums over lanes are taken in lane order,
 * the exponential is our own polynomial (kernel_exp.h), and the library is compiled with
 * -ffp-contract=off and without -ffast-math, so no compiler may fuse or reorder an operation. The bits
 * are therefore the same whatever instruction set the library is compiled for (x86-64, whose fmaf is
 * the C library's exactly rounded one, -v3 or -v4: the tests compare them) and whatever the thread
 * count: tasks are shared between OpenMP threads (PyTorch's own pool, libgomp), each computed alone.
 *
 * Layouts: q [B][H][S][D], k and v [B][Hkv][S][D], each given by its base pointer and the strides (in
 * floats) of its first three axes, the last axis contiguous: PyTorch's views after the projections
 * and rotary embedding need no copy. o, dq, dk, dv likewise (written). m, l: [B*H][S], each query's
 * largest scaled score and the sum of its exponentials. Query head h reads key/value head h / (H / Hkv).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define W 8  /* lanes of every vector */
#define R 4  /* queries (or keys) of a tile */
#define MAX_S 4096 /* tiled_attention.MAX_SEQ: per thread the scratch holds two S x S matrices */
typedef float vf __attribute__((vector_size(32), aligned(32)));
typedef int32_t vi __attribute__((vector_size(32), aligned(32)));

static inline vf splat(float x) { vf v; for (int l = 0; l < W; l++) v[l] = x; return v; }
#include "kernel_exp.h"  /* vexp(): our exponential, shared with small_head_attention.c */

static inline vf vfma(vf a, vf b, vf c) { vf r; for (int l = 0; l < W; l++) r[l] = __builtin_fmaf(a[l], b[l], c[l]); return r; }
static inline vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline float hsum(vf v) { float s = v[0]; for (int l = 1; l < W; l++) s = s + v[l]; return s; }
static inline float hmax(vf v) { float s = v[0]; for (int l = 1; l < W; l++) s = v[l] > s ? v[l] : s; return s; }
static inline vf vmax(vf a, vf b) { vi c = b > a; return (vf)(((vi)b & c) | ((vi)a & ~c)); }

/* out[i][c*W + l] = sum_d A(i, d) * Bt[d][c*W + l] for rows i in [i0, i1) and key vectors c in [0, nv), the
   sum over d in order: A(i, d) = a[i*sa + d], Bt [D][Sp] (keys along the last axis), out [.][Sp]. */
#define FMA2(r) { vf b_ = splat(a##r[d]); c##r##0 = vfma(b_, k0, c##r##0); c##r##1 = vfma(b_, k1, c##r##1); }
static inline __attribute__((always_inline)) void rows_by_keys(const int64_t D, int64_t i0, int64_t i1, int64_t nv,
        const float *a, int64_t sa, const float *bt, int64_t Sp, float *out) {
    int64_t ib = i0;
    for (; ib + R <= i1; ib += R) {
        const float *a0 = a + ib * sa, *a1 = a0 + sa, *a2 = a1 + sa, *a3 = a2 + sa;
        float *o0 = out + ib * Sp, *o1 = o0 + Sp, *o2 = o1 + Sp, *o3 = o2 + Sp;
        int64_t c = 0;
        for (; c + 2 <= nv; c += 2) {
            vf c00 = splat(0.0f), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
            const float *bp = bt + c * W;
            for (int64_t d = 0; d < D; d++) {
                vf k0 = ld(bp + d * Sp), k1 = ld(bp + d * Sp + W);
                FMA2(0) FMA2(1) FMA2(2) FMA2(3)
            }
            st(o0 + c * W, c00); st(o0 + c * W + W, c01); st(o1 + c * W, c10); st(o1 + c * W + W, c11);
            st(o2 + c * W, c20); st(o2 + c * W + W, c21); st(o3 + c * W, c30); st(o3 + c * W + W, c31);
        }
        for (; c < nv; c++) {
            vf c0 = splat(0.0f), c1 = c0, c2 = c0, c3 = c0;
            for (int64_t d = 0; d < D; d++) {
                vf k0 = ld(bt + d * Sp + c * W);
                c0 = vfma(splat(a0[d]), k0, c0); c1 = vfma(splat(a1[d]), k0, c1);
                c2 = vfma(splat(a2[d]), k0, c2); c3 = vfma(splat(a3[d]), k0, c3);
            }
            st(o0 + c * W, c0); st(o1 + c * W, c1); st(o2 + c * W, c2); st(o3 + c * W, c3);
        }
    }
    for (; ib < i1; ib++) {
        const float *a0 = a + ib * sa;
        for (int64_t c = 0; c < nv; c++) {
            vf c0 = splat(0.0f);
            for (int64_t d = 0; d < D; d++) c0 = vfma(splat(a0[d]), ld(bt + d * Sp + c * W), c0);
            st(out + ib * Sp + c * W, c0);
        }
    }
}

/* out[o][:] = (start + sum_s C(o, s) * M[s][:]) * f(o) for outputs o in [0, n), the sum over s in order, where
   C(o, s) = c[o*co + s*cs] and row s of M is at m + s*sm (D contiguous), out row o at out + o*so. The range of
   s for a tile of R outputs starting at ob: with `causal` [0, min(ob + R, n)) (C is zero after the diagonal,
   o < s), else [ob, n) (C is zero before it, s < o). start: out's values with `accumulate`, else 0. f(o):
   mul[o] with `mul`, else `smul` if it is not 0, else none. */
#define ACC2(r) { vf b_ = splat(c##r[s * cs]); x##r##0 = vfma(b_, m0, x##r##0); x##r##1 = vfma(b_, m1, x##r##1); }
static inline vf finish(vf x, const float *mul, float smul, int64_t o) {
    if (mul) return x * splat(mul[o]);
    if (smul != 0.0f) return x * splat(smul);
    return x;
}
static inline __attribute__((always_inline)) void sum_rows(const int64_t D, int64_t n, int causal,
        const float *c, int64_t co, int64_t cs, const float *m, int64_t sm, float *out, int64_t so, int accumulate,
        const float *mul, float smul) {
    for (int64_t ob = 0; ob < n; ob += R) {
        int64_t nr = n - ob < R ? n - ob : R;
        int64_t lo = causal ? 0 : ob, hi = causal ? ob + nr : n;
        for (int64_t dv = 0; dv < D; dv += 2 * W) {
            if (nr == R) {
                const float *c0 = c + ob * co, *c1 = c0 + co, *c2 = c1 + co, *c3 = c2 + co;
                float *p0 = out + ob * so + dv, *p1 = p0 + so, *p2 = p1 + so, *p3 = p2 + so;
                vf x00, x01, x10, x11, x20, x21, x30, x31;
                if (accumulate) {
                    x00 = ld(p0); x01 = ld(p0 + W); x10 = ld(p1); x11 = ld(p1 + W);
                    x20 = ld(p2); x21 = ld(p2 + W); x30 = ld(p3); x31 = ld(p3 + W);
                } else {
                    x00 = x01 = x10 = x11 = x20 = x21 = x30 = x31 = splat(0.0f);
                }
                const float *mp = m + dv;
                for (int64_t s = lo; s < hi; s++) {
                    vf m0 = ld(mp + s * sm), m1 = ld(mp + s * sm + W);
                    ACC2(0) ACC2(1) ACC2(2) ACC2(3)
                }
                st(p0, finish(x00, mul, smul, ob)); st(p0 + W, finish(x01, mul, smul, ob));
                st(p1, finish(x10, mul, smul, ob + 1)); st(p1 + W, finish(x11, mul, smul, ob + 1));
                st(p2, finish(x20, mul, smul, ob + 2)); st(p2 + W, finish(x21, mul, smul, ob + 2));
                st(p3, finish(x30, mul, smul, ob + 3)); st(p3 + W, finish(x31, mul, smul, ob + 3));
            } else {
                for (int64_t r = 0; r < nr; r++) {
                    float *p0 = out + (ob + r) * so + dv;
                    vf x0 = accumulate ? ld(p0) : splat(0.0f), x1 = accumulate ? ld(p0 + W) : splat(0.0f);
                    for (int64_t s = lo; s < hi; s++) {
                        vf b_ = splat(c[(ob + r) * co + s * cs]);
                        x0 = vfma(b_, ld(m + s * sm + dv), x0);
                        x1 = vfma(b_, ld(m + s * sm + dv + W), x1);
                    }
                    st(p0, finish(x0, mul, smul, ob + r)); st(p0 + W, finish(x1, mul, smul, ob + r));
                }
            }
        }
    }
}

/* xt [D][Sp] = x^T, zero past S: row j of x at x + j*sx. */
static void transpose_in(int64_t S, int64_t Sp, int64_t D, const float *x, int64_t sx, float *xt) {
    for (int64_t d = 0; d < D; d++) {
        for (int64_t j = 0; j < S; j++) xt[d * Sp + j] = x[j * sx + d];
        for (int64_t j = S; j < Sp; j++) xt[d * Sp + j] = 0.0f;
    }
}

/* out [S][Sp] = A Bt for every row, computing for each tile of rows only the key vectors its last row sees. */
static inline __attribute__((always_inline)) void causal_products(const int64_t D, int64_t S, int64_t Sp,
        const float *a, int64_t sa, const float *bt, float *out) {
    for (int64_t ib = 0; ib < S; ib += R) {
        int64_t i1 = ib + R < S ? ib + R : S;
        rows_by_keys(D, ib, i1, (i1 - 1) / W + 1, a, sa, bt, Sp, out);
    }
}

/* Key vector c of query i's scaled scores: the product times the scale, keys after i set to -inf. */
static inline vf scaled(const float *row, int64_t c, int64_t i, vf vs) {
    vf x = ld(row + c * W) * vs;
    if ((c + 1) * W > i + 1) {
        vi key;
        for (int l = 0; l < W; l++) key[l] = (int32_t)(c * W + l);
        vi keep = key <= (vi){0} + (int32_t)i;
        x = (vf)(((vi)x & keep) | ((vi)splat(-__builtin_inff()) & ~keep));
    }
    return x;
}

/* Zero row i's entries past its own key vectors, as far as any tile reads them (R <= W: one vector). */
static inline void zero_after(float *row, int64_t nv, int64_t Sp) {
    int64_t end = (nv + 1) * W < Sp ? (nv + 1) * W : Sp;
    for (int64_t j = nv * W; j < end; j++) row[j] = 0.0f;
}

#define PTR(base, s, b, h) ((base) + (b) * (s)[0] + (h) * (s)[1])

static inline __attribute__((always_inline)) void fwd_task(const int64_t D, int64_t task, int64_t H, int64_t Hkv,
        int64_t S, float scale, const float *q, const int64_t *sq, const float *k, const int64_t *sk, const float *v,
        const int64_t *sv, float *o, const int64_t *so, float *m_out, float *l_out, float *kt, float *p) {
    int64_t Sp = (S + W - 1) / W * W;
    int64_t b = task / H, h = task % H, kh = h / (H / Hkv);
    const float *Q = PTR(q, sq, b, h), *K = PTR(k, sk, b, kh), *V = PTR(v, sv, b, kh);
    float *M = m_out + task * S, *L = l_out + task * S;
    transpose_in(S, Sp, D, K, sk[2], kt);
    causal_products(D, S, Sp, Q, sq[2], kt, p);
    const vf vs = splat(scale);
    for (int64_t i = 0; i < S; i++) {
        float *row = p + i * Sp;
        int64_t nv = i / W + 1;
        vf vm = scaled(row, 0, i, vs);
        st(row, vm);
        for (int64_t c = 1; c < nv; c++) {
            vf x = scaled(row, c, i, vs);
            st(row + c * W, x);
            vm = vmax(vm, x);
        }
        float mx = hmax(vm);
        vf ls = splat(0.0f), vmx = splat(mx);
        for (int64_t c = 0; c < nv; c++) {
            vf e = vexp(ld(row + c * W) - vmx);
            ls = ls + e;
            st(row + c * W, e);
        }
        zero_after(row, nv, Sp);
        M[i] = mx;
        L[i] = hsum(ls);
    }
    /* o = (exp(scores - m) V) / l, row by row; the reciprocal is taken once per query */
    float inv[MAX_S];
    for (int64_t i = 0; i < S; i++) inv[i] = 1.0f / L[i];
    sum_rows(D, S, 1, p, Sp, 1, V, sv[2], PTR(o, so, b, h), so[2], 0, inv, 0.0f);
}

static inline __attribute__((always_inline)) void bwd_group(const int64_t D, int64_t g, int64_t H, int64_t Hkv,
        int64_t S, float scale, const float *q, const int64_t *sq, const float *k, const int64_t *sk, const float *v,
        const int64_t *sv, const float *o, const int64_t *so, const float *m_in, const float *l_in,
        const float *dout, const int64_t *sdo, float *dq, const int64_t *sdq, float *dk, const int64_t *sdk,
        float *dv, const int64_t *sdv, float *kt, float *vt, float *p, float *ds) {
    int64_t Sp = (S + W - 1) / W * W, G = H / Hkv;
    int64_t b = g / Hkv, kh = g % Hkv;
    const float *K = PTR(k, sk, b, kh), *V = PTR(v, sv, b, kh);
    transpose_in(S, Sp, D, K, sk[2], kt);
    transpose_in(S, Sp, D, V, sv[2], vt);
    const vf vs = splat(scale);
    for (int64_t hh = 0; hh < G; hh++) {
        int64_t h = kh * G + hh, task = b * H + h;
        const float *Q = PTR(q, sq, b, h), *O = PTR(o, so, b, h), *dO = PTR(dout, sdo, b, h);
        causal_products(D, S, Sp, Q, sq[2], kt, p);   /* the scores again, exactly as the forward made them */
        causal_products(D, S, Sp, dO, sdo[2], vt, ds); /* dP = dO V^T */
        for (int64_t i = 0; i < S; i++) {
            const float *oi = O + i * so[2], *doi = dO + i * sdo[2];
            vf acc = ld(doi) * ld(oi);
            for (int64_t d = W; d < D; d += W) acc = vfma(ld(doi + d), ld(oi + d), acc);
            const vf vmx = splat(m_in[task * S + i]), vinv = splat(1.0f / l_in[task * S + i]), vD = splat(hsum(acc));
            float *pr = p + i * Sp, *dr = ds + i * Sp;
            int64_t nv = i / W + 1;
            for (int64_t c = 0; c < nv; c++) {
                vf pp = vexp(scaled(pr, c, i, vs) - vmx) * vinv;  /* P */
                st(pr + c * W, pp);
                st(dr + c * W, pp * (ld(dr + c * W) - vD));       /* dS = P (dP - rowsum(dO o)) */
            }
            zero_after(pr, nv, Sp);
            zero_after(dr, nv, Sp);
        }
        int last = hh == G - 1;
        sum_rows(D, S, 1, ds, Sp, 1, K, sk[2], PTR(dq, sdq, b, h), sdq[2], 0, NULL, scale);  /* dQ = dS K scale */
        /* dK = (sum over the group's heads of dS^T Q) scale; dV = sum of P^T dO */
        sum_rows(D, S, 0, ds, 1, Sp, Q, sq[2], PTR(dk, sdk, b, kh), sdk[2], hh > 0, NULL, last ? scale : 0.0f);
        sum_rows(D, S, 0, p, 1, Sp, dO, sdo[2], PTR(dv, sdv, b, kh), sdv[2], hh > 0, NULL, 0.0f);
    }
}

static int shapes_ok(int64_t H, int64_t Hkv, int64_t S, int64_t D) {
    return D >= 16 && D % 16 == 0 && D <= 1024 && Hkv >= 1 && H % Hkv == 0 && S >= 1 && S <= MAX_S;
}

/* The forward of tasks (b*H + h) [t0, t1). Returns 0, -1 for shapes it does not compute, -2 out of memory. */
int tiled_attn_fwd(int64_t t0, int64_t t1, int64_t H, int64_t Hkv, int64_t S, int64_t D, float scale,
        const float *q, const int64_t *sq, const float *k, const int64_t *sk, const float *v, const int64_t *sv,
        float *o, const int64_t *so, float *m_out, float *l_out) {
    if (!shapes_ok(H, Hkv, S, D)) return -1;
    int64_t Sp = (S + W - 1) / W * W;
    int bad = 0;
    #pragma omp parallel reduction(|:bad)
    {
        float *kt = aligned_alloc(64, (sizeof(float) * (D * Sp + S * Sp) + 63) / 64 * 64);
        float *p = kt ? kt + D * Sp : NULL;
        #pragma omp for schedule(static)
        for (int64_t t = t0; t < t1; t++) {
            if (!kt) { bad = 1; continue; }
            switch (D) {  /* the head dimension known at compile time for the common sizes */
            case 32: fwd_task(32, t, H, Hkv, S, scale, q, sq, k, sk, v, sv, o, so, m_out, l_out, kt, p); break;
            case 64: fwd_task(64, t, H, Hkv, S, scale, q, sq, k, sk, v, sv, o, so, m_out, l_out, kt, p); break;
            default: fwd_task(D, t, H, Hkv, S, scale, q, sq, k, sk, v, sv, o, so, m_out, l_out, kt, p);
            }
        }
        free(kt);
    }
    return bad ? -2 : 0;
}

/* The backward of key/value groups (b*Hkv + kvh) [g0, g1): dq of the group's query heads, dk and dv. */
int tiled_attn_bwd(int64_t g0, int64_t g1, int64_t H, int64_t Hkv, int64_t S, int64_t D, float scale,
        const float *q, const int64_t *sq, const float *k, const int64_t *sk, const float *v, const int64_t *sv,
        const float *o, const int64_t *so, const float *m_in, const float *l_in, const float *dout,
        const int64_t *sdo, float *dq, const int64_t *sdq, float *dk, const int64_t *sdk, float *dv,
        const int64_t *sdv) {
    if (!shapes_ok(H, Hkv, S, D)) return -1;
    int64_t Sp = (S + W - 1) / W * W;
    int bad = 0;
    #pragma omp parallel reduction(|:bad)
    {
        float *kt = aligned_alloc(64, (sizeof(float) * (2 * D * Sp + 2 * S * Sp) + 63) / 64 * 64);
        float *vt = kt ? kt + D * Sp : NULL, *p = kt ? vt + D * Sp : NULL, *ds = kt ? p + S * Sp : NULL;
        #pragma omp for schedule(static)
        for (int64_t g = g0; g < g1; g++) {
            if (!kt) { bad = 1; continue; }
            switch (D) {
            case 32: bwd_group(32, g, H, Hkv, S, scale, q, sq, k, sk, v, sv, o, so, m_in, l_in, dout, sdo, dq, sdq,
                               dk, sdk, dv, sdv, kt, vt, p, ds); break;
            case 64: bwd_group(64, g, H, Hkv, S, scale, q, sq, k, sk, v, sv, o, so, m_in, l_in, dout, sdo, dq, sdq,
                               dk, sdk, dv, sdv, kt, vt, p, ds); break;
            default: bwd_group(D, g, H, Hkv, S, scale, q, sq, k, sk, v, sv, o, so, m_in, l_in, dout, sdo, dq, sdq,
                               dk, sdk, dv, sdv, kt, vt, p, ds);
            }
        }
        free(kt);
    }
    return bad ? -2 : 0;
}
