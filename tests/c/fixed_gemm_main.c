/* A stand-alone driver for provenance/builder/fixed_gemm.c, for running the kernel where Python and torch
 * are not (tests/test_fixed_gemm.py cross-compiles it for aarch64 and runs it under qemu-user).
 * Reads from stdin: int64 m, n, k, threads, then A (m x k) and B (k x n) as row-major float32;
 * writes C (m x n) as row-major float32 to stdout. Exit 0, or 1 on a short read or a failed product. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int fixed_gemm(int64_t m, int64_t n, int64_t k, const float *a, int64_t ars, int64_t acs, const float *b,
               int64_t brs, int64_t bcs, float *c, int64_t ldc, int64_t threads);

int main(void) {
    int64_t dims[4];
    if (fread(dims, sizeof dims[0], 4, stdin) != 4) return 1;
    int64_t m = dims[0], n = dims[1], k = dims[2];
    float *a = malloc((size_t)(m * k + 1) * sizeof(float)), *b = malloc((size_t)(k * n + 1) * sizeof(float));
    float *c = malloc((size_t)(m * n + 1) * sizeof(float));
    if (!a || !b || !c) return 1;
    if (fread(a, sizeof(float), (size_t)(m * k), stdin) != (size_t)(m * k)) return 1;
    if (fread(b, sizeof(float), (size_t)(k * n), stdin) != (size_t)(k * n)) return 1;
    if (fixed_gemm(m, n, k, a, k, 1, b, n, 1, c, n, dims[3])) return 1;
    return fwrite(c, sizeof(float), (size_t)(m * n), stdout) == (size_t)(m * n) ? 0 : 1;
}
