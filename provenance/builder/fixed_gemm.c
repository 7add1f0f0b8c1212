/* Fixed-order single-precision matrix product on the CPU: C = A B, the same bits on every x86-64 CPU.
 *
 * Part of provenance (provenance/builder/fixed_gemm.py loads it; docs/reproducibility.md, "Fixed-order
 * kernels", says why and docs/benchmarks.md has the measurements). A vendor's BLAS picks its own
 * summation order per CPU model and instruction set (MKL's code branches), so a product's bits depend on
 * who made the CPU; here the order is the algorithm's.
 *
 * The order: every output element is one chain of exactly rounded fused multiply-adds over the inner
 * index in order, c = fma(a[i][K-1], b[K-1][j], ... fma(a[i][1], b[1][j], fma(a[i][0], b[0][j], +0.0f))),
 * carried across cache blocks (a block after the first continues from the partial sum it stored). Vectors
 * run across output elements, never along the inner index, and every fma is the source's own
 * (__builtin_fmaf; compiled with -ffp-contract=off and without -ffast-math, no compiler may fuse or
 * reorder an operation), so the result does not depend on the vector width, the register blocking, the
 * cache blocking, the number of threads (they share output tiles, never an inner index) or the
 * instruction set the library is compiled for: x86-64, whose fmaf is the C library's exactly rounded
 * one, -v3 and -v4 give the same bits (the tests compare them, and known-answer digests in
 * tests/vectors/ hold them across machines).
 *
 * Speed is the usual GEMM structure (as in BLIS): the inner dimension in blocks of KC; B packed into
 * panels of NR columns, zero-padded to whole panels (packing copies, it does not compute); A read in
 * place where its rows are contiguous, one broadcast per row and inner index (its last rows, fewer than
 * MR, through a zero-padded copy), and, where they are not (A transposed, as in a weight gradient),
 * packed one panel of MR rows at a time into a thread's own buffer that stays in L1 while every column
 * panel passes it (packing all of A first doubled the memory traffic of a tall weight gradient such as
 * LaaM's output layer, 32768 rows: 0.84x MKL against 1.05x); an MR x NR register tile of accumulators per microkernel call (6 x 16:
 * twelve 8-lane vectors, which with two B vectors and one broadcast fit AVX2's sixteen registers). Not
 * packing a row-major A saves a copy of it per call, most of the cost beyond the products at the
 * recipes' small inner sizes.
 *
 * A(i, k) = a[i*ars + k*acs] and B(k, j) = b[k*brs + j*bcs] for any strides (so a transposed operand
 * needs no copy of its own), C(i, j) = c[i*ldc + j]. Returns 0, or -2 when scratch memory cannot be had.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define W 8    /* lanes of every vector */
#define MR 6   /* rows of a register tile */
#define NR 16  /* columns of a register tile: two vectors */
#define KC 512 /* inner-dimension block: a B panel (32 KB) stays in L1 or close while A streams past; 512 beat
                  256 by 0-19 % at the recipes' shapes on an AMD EPYC (bench/gemm.py), the bits being the same */
typedef float vf __attribute__((vector_size(32), aligned(32)));

static inline vf splat(float x) { vf v; for (int l = 0; l < W; l++) v[l] = x; return v; }
static inline vf vfma(vf a, vf b, vf c) { vf r; for (int l = 0; l < W; l++) r[l] = __builtin_fmaf(a[l], b[l], c[l]); return r; }
static inline vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* Pack rows [i0, i0 + MR) x inner [k0, k0 + kc) of A into ap[k][r] (rows past m are zeros). */
static void pack_a(const float *a, int64_t ars, int64_t acs, int64_t i0, int64_t m, int64_t k0, int64_t kc,
                   float *ap) {
    if (ars == 1 && i0 + MR <= m) {  /* A transposed: a panel's MR rows are contiguous at each inner index */
        for (int64_t k = 0; k < kc; k++) memcpy(ap + k * MR, a + i0 + (k0 + k) * acs, MR * sizeof(float));
        return;
    }
    for (int64_t k = 0; k < kc; k++)
        for (int64_t r = 0; r < MR; r++)
            ap[k * MR + r] = i0 + r < m ? a[(i0 + r) * ars + (k0 + k) * acs] : 0.0f;
}

/* Pack inner [k0, k0 + kc) x columns [j0, j0 + NR) of B into bp[k][c] (columns past n are zeros). */
static void pack_b(const float *b, int64_t brs, int64_t bcs, int64_t j0, int64_t n, int64_t k0, int64_t kc,
                   float *bp) {
    if (brs == 1 && bcs != 1) {  /* B transposed (a weight read as W^T): each column is contiguous */
        for (int64_t c = 0; c < NR; c++) {
            const float *col = b + (j0 + c) * bcs + k0;
            for (int64_t k = 0; k < kc; k++) bp[k * NR + c] = j0 + c < n ? col[k] : 0.0f;
        }
        return;
    }
    for (int64_t k = 0; k < kc; k++) {
        const float *row = b + (k0 + k) * brs;
        float *out = bp + k * NR;
        if (bcs == 1 && j0 + NR <= n) {
            memcpy(out, row + j0, NR * sizeof(float));
        } else {
            for (int64_t c = 0; c < NR; c++) out[c] = j0 + c < n ? row[(j0 + c) * bcs] : 0.0f;
        }
    }
}

#define ROW(r) { vf a_ = splat(a##r[k * acs]); c##r##0 = vfma(a_, b0, c##r##0); c##r##1 = vfma(a_, b1, c##r##1); }
#define LOAD(r) { c##r##0 = first ? z : ld(t + r * ldt); c##r##1 = first ? z : ld(t + r * ldt + W); }
#define STORE(r) { st(t + r * ldt, c##r##0); st(t + r * ldt + W, c##r##1); }

/* One MR x NR tile t (row stride ldt): continue each element's chain over kc inner indices. */
static inline __attribute__((always_inline)) void tile(int64_t kc, const float *ap, int64_t ars, int64_t acs,
                                                       const float *bp, float *t, int64_t ldt, int first) {
    const vf z = splat(0.0f);
    const float *a0 = ap, *a1 = ap + ars, *a2 = a1 + ars, *a3 = a2 + ars, *a4 = a3 + ars, *a5 = a4 + ars;
    vf c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
    LOAD(0) LOAD(1) LOAD(2) LOAD(3) LOAD(4) LOAD(5)
    for (int64_t k = 0; k < kc; k++) {
        vf b0 = ld(bp + k * NR), b1 = ld(bp + k * NR + W);
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
    }
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
}

/* A tile of C at (i0, j0) with m x n valid elements, from A's rows [i0, i0 + MR) read in place through
   their strides (copied, zero-padded, where fewer than MR rows are left) and a packed panel of B. */
static void tile_at(int64_t kc, const float *a, int64_t ars, int64_t acs, int a_padded, const float *bp, float *c,
                    int64_t ldc, int64_t i0, int64_t j0, int64_t m, int64_t n, int first, float *apad) {
    int64_t mv = m - i0 < MR ? m - i0 : MR, nv = n - j0 < NR ? n - j0 : NR;
    const float *ap = a + i0 * ars;
    int64_t sr = ars, sk = acs;
    if (mv < MR && !a_padded) {
        for (int64_t k = 0; k < kc; k++)
            for (int64_t r = 0; r < MR; r++) apad[k * MR + r] = r < mv ? ap[r * ars + k * acs] : 0.0f;
        ap = apad, sr = 1, sk = MR;
    }
    if (mv == MR && nv == NR) {
        tile(kc, ap, sr, sk, bp, c + i0 * ldc + j0, ldc, first);
        return;
    }
    float t[MR * NR] __attribute__((aligned(32)));
    memset(t, 0, sizeof t);
    if (!first)
        for (int64_t r = 0; r < mv; r++) memcpy(t + r * NR, c + (i0 + r) * ldc + j0, nv * sizeof(float));
    tile(kc, ap, sr, sk, bp, t, NR, first);
    for (int64_t r = 0; r < mv; r++) memcpy(c + (i0 + r) * ldc + j0, t + r * NR, nv * sizeof(float));
}

int fixed_gemm(int64_t m, int64_t n, int64_t k, const float *a, int64_t ars, int64_t acs, const float *b,
               int64_t brs, int64_t bcs, float *c, int64_t ldc, int64_t threads) {
    if (m <= 0 || n <= 0) return 0;
    if (k <= 0) {  /* an empty sum: +0.0f, as the chain's start */
        for (int64_t i = 0; i < m; i++) memset(c + i * ldc, 0, n * sizeof(float));
        return 0;
    }
    const int64_t mp = (m + MR - 1) / MR, np = (n + NR - 1) / NR;  /* row and column panels */
    const int64_t kb = k < KC ? k : KC;
    float *bpack = aligned_alloc(64, (size_t)(np * NR * kb) * sizeof(float) + 64);
    /* A's rows are read in place where each row's inner indices are contiguous; otherwise (A transposed, as
       in a weight gradient) each panel of MR rows is packed, ap[k][r], just before its tiles. */
    const int pack = acs != 1;
    if (!bpack) return -2;
    if (threads < 1) threads = 1;
    int bad = 0;
    for (int64_t k0 = 0; k0 < k; k0 += KC) {
        const int64_t kc = k - k0 < KC ? k - k0 : KC;
        const int first = k0 == 0;
        #pragma omp parallel num_threads(threads) reduction(|:bad)
        {
            float *apad = aligned_alloc(64, (size_t)(MR * KC) * sizeof(float));
            if (!apad) bad = 1;
            #pragma omp for schedule(static)
            for (int64_t q = 0; q < np; q++) pack_b(b, brs, bcs, q * NR, n, k0, kc, bpack + q * NR * kc);
            if (pack) {
                /* A transposed: each thread packs one panel of MR rows at a time into its own buffer, which
                   stays in L1 while every column panel passes it. */
                #pragma omp for schedule(static)
                for (int64_t p = 0; p < mp; p++) {
                    if (!apad) continue;
                    pack_a(a, ars, acs, p * MR, m, k0, kc, apad);
                    for (int64_t q = 0; q < np; q++)
                        tile_at(kc, apad - p * MR, 1, MR, 1, bpack + q * NR * kc, c, ldc, p * MR, q * NR, m, n, first,
                                NULL);
                }
            } else {
                /* Tiles in column-panel-major order: a thread's consecutive tiles share a B panel. */
                #pragma omp for schedule(static)
                for (int64_t t = 0; t < mp * np; t++) {
                    if (!apad) continue;
                    int64_t q = t / mp, p = t % mp;
                    tile_at(kc, a + k0 * acs, ars, acs, 0, bpack + q * NR * kc, c, ldc, p * MR, q * NR, m, n, first,
                            apad);
                }
            }
            free(apad);
        }
        if (bad) break;
    }
    free(bpack);
    return bad ? -2 : 0;
}

/* C[t] = A[t] B[t] for t in [0, batch): each product as fixed_gemm, one after another. */
int fixed_gemm_batched(int64_t batch, int64_t m, int64_t n, int64_t k, const float *a, int64_t abs_, int64_t ars,
                       int64_t acs, const float *b, int64_t bbs, int64_t brs, int64_t bcs, float *c, int64_t cbs,
                       int64_t ldc, int64_t threads) {
    for (int64_t t = 0; t < batch; t++) {
        int rc = fixed_gemm(m, n, k, a + t * abs_, ars, acs, b + t * bbs, brs, bcs, c + t * cbs, ldc, threads);
        if (rc) return rc;
    }
    return 0;
}
