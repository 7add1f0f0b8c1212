/* exp(x) for x <= 0, shared by our attention kernels (small_head_attention.c, tiled_attention.c). Part of
 * provenance; builder/clib.py compiles it into both libraries and its digest into their names.
 *
 * The including file defines W (lanes), the vector types vf (float) and vi (int32_t) of W lanes, and
 * splat(float). x = n ln2 + r with n rounded to nearest (the 1.5 * 2^23 trick) and ln2 split in two
 * (Cody and Waite), then Cephes' expf polynomial for e^r, times 2^n built from its bits. Within about
 * one unit in the last place; 0 below -87 (and for -inf and NaN, which never reach it from a finite
 * score: masked keys are set to -inf before the subtraction). Plain multiplies and adds, in this
 * order, on every lane: the same bits for any lane count and instruction set. */
static inline vf vexp(vf x) {
    const vf log2e = splat(1.44269504088896341f), magic = splat(12582912.0f);
    const vf c1 = splat(0.693359375f), c2 = splat(-2.12194440e-4f);
    vf t = x * log2e;
    t = t + magic;
    vf n = t - magic;
    vf a = n * c1;
    vf r = x - a;
    vf b = n * c2;
    r = r - b;
    vf p = splat(1.9875691500E-4f);
    p = p * r; p = p + splat(1.3981999507E-3f);
    p = p * r; p = p + splat(8.3334519073E-3f);
    p = p * r; p = p + splat(4.1665795894E-2f);
    p = p * r; p = p + splat(1.6666665459E-1f);
    p = p * r; p = p + splat(5.0000001201E-1f);
    vf r2 = r * r;
    p = p * r2; p = p + r; p = p + splat(1.0f);
    vi keep = x >= splat(-87.0f);
    vi ni = __builtin_convertvector(n, vi);
    ni = (ni + 127) << 23;
    vf e = p * (vf)ni;
    return (vf)((vi)e & keep);
}
