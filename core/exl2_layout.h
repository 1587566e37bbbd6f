/* core/exl2_layout.h: the EXL2 tensor set of one quantized linear layer, defined once for C and CUDA (the
 * way ggml-common.h defines its quant blocks): the view struct, the 32-row chunk table that the CPU and GPU
 * kernels walk, the bit-stream decode and the fp16 scale rule. formats/ (packing, validation), quant/ and
 * kernels/ (CPU twins and CUDA kernels) all use this header; nothing here allocates or fails.
 *
 * Byte layout (../shared/docs/exl2-format.md). K = in_features (rows of W^T), N = out_features, Np = N rounded
 * up to 32, G groups, P packed rows, Kp = rows in act order (K, or K rounded up to 32 for padded layers):
 *   q_weight    I32 [P, Np]   per column, the permuted rows' values as one little-endian bit stream per
 *                             group: value i of a b-bit group is bits [i*b, i*b+b) of the group's words;
 *                             unsigned with zero point 2^(b-1); padded columns hold the zero point
 *   q_scale     I32 [G, Np/8] 4-bit sub-scale codes, column n in bits 4*(n%8).. of word n/8
 *   q_scale_max F16 [G]       per-group maximum scale
 *   q_groups    I16 [2G]      (bits, first packed row) per group; widths non-increasing (8, 6, 5, 4, 3, 2)
 *   q_invperm   I32 [Kp]      inverse act-order permutation: packed row j holds original row perm[j],
 *                             q_invperm[perm[j]] = j; original rows >= K are zero padding
 *   bias        F16 [Np]      optional
 *   w = (q - 2^(b-1)) * scale,  scale = half(half((code+1)^2) * half(q_scale_max / 256))
 *
 * Every group holds a whole number of 32-row chunks; a b-bit chunk occupies b consecutive q_weight rows
 * (32 values x b bits = b words per column).
 */
#ifndef MB_EXL2_LAYOUT_H
#define MB_EXL2_LAYOUT_H

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#ifdef __cplusplus
extern "C++" {
#include <cuda_fp16.h>
}
#else
#include <cuda_fp16.h>
#endif
#define MB_HD static __host__ __device__ __forceinline__
#define MB_STATIC_ASSERT(c, m) static_assert(c, m)
#else
#define MB_HD static inline
#define MB_STATIC_ASSERT(c, m) _Static_assert(c, m)
#endif

#define MB_EXL2_CHUNK 32       /* permuted rows per chunk */
#define MB_EXL2_MAX_ROWS 65535 /* the runtime reads the permutation as 16-bit */

/* Views of one layer's tensors (borrowed; possibly unaligned when they point into a file mapping) */
struct mb_exl2_layer {
    int64_t K, Kp, N, Np, G, P;
    const void *q_weight, *q_scale, *q_scale_max, *q_groups, *q_invperm, *bias;
};

/* One chunk of 32 permuted rows: bit width, first q_weight row holding it, its group, its first permuted row */
struct mb_exl2_chunk {
    int32_t bits, word_row, group, row;
};
MB_STATIC_ASSERT(sizeof(struct mb_exl2_chunk) == 16, "one int4 per chunk on the GPU");

MB_HD int mb_exl2_bits_ok(int b) { return b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8; }

/* element i of a little-endian array that may be unaligned */
MB_HD uint32_t mb_exl2_u32(const void *p, int64_t i) {
    uint32_t v;
    memcpy(&v, (const char *)p + 4 * i, 4);
    return v;
}
MB_HD int32_t mb_exl2_i16(const void *p, int64_t i) {
    int16_t v;
    memcpy(&v, (const char *)p + 2 * i, 2);
    return v;
}

/* group g: bit width, first and one-past-last packed row (offsets are unsigned 16-bit in the file) */
MB_HD void mb_exl2_group(const struct mb_exl2_layer *L, int64_t g, int *bits, int64_t *off, int64_t *next) {
    *bits = (int)mb_exl2_i16(L->q_groups, 2 * g);
    *off = (uint16_t)mb_exl2_i16(L->q_groups, 2 * g + 1);
    *next = g + 1 < L->G ? (int64_t)(uint16_t)mb_exl2_i16(L->q_groups, 2 * g + 3) : L->P;
}

/* 32 values of b bits (b in 2..8) from the b words w[0..b-1] of one column of a chunk */
MB_HD void mb_exl2_decode32(int b, const uint32_t *w, int *q) {
    for (int i = 0; i < 32; i++) {
        const int bit = i * b, wi = bit >> 5, sh = bit & 31;
        uint32_t v = w[wi] >> sh;
        if (sh + b > 32) v |= w[wi + 1] << (32 - sh);
        q[i] = (int)(v & ((1u << b) - 1));
    }
}

/* fp16 rounding of an f32 value, identical on host and device (round to nearest even) */
#if defined(__CUDACC__)
MB_HD float mb_exl2_f16r(float x) { return __half2float(__float2half_rn(x)); }
MB_HD float mb_exl2_h2f(uint16_t h) {
    __half_raw r;
    r.x = h;
    return __half2float(__half(r));
}
#else
float mb_f16_to_f32(uint16_t h);
uint16_t mb_f32_to_f16(float f);
MB_HD float mb_exl2_f16r(float x) { return mb_f16_to_f32(mb_f32_to_f16(x)); }
MB_HD float mb_exl2_h2f(uint16_t h) { return mb_f16_to_f32(h); }
#endif

/* The fp16 scale of sub-scale code (0..15) under group maximum scale_max (fp16 bits) */
MB_HD float mb_exl2_scale(int code, uint16_t scale_max) {
    float qs = (float)(code + 1);
    float a = mb_exl2_f16r(qs * qs);
    float b = mb_exl2_f16r(mb_exl2_h2f(scale_max) / 256.0f);
    return mb_exl2_f16r(a * b);
}

/* Sub-scale code of group g, column n */
MB_HD int mb_exl2_code(const struct mb_exl2_layer *L, int64_t g, int64_t n) {
    return (int)((mb_exl2_u32(L->q_scale, g * (L->Np / 8) + n / 8) >> (4 * (n % 8))) & 15);
}

/* The chunk table of a validated layer (Kp / 32 entries written to out). Host only. */
static inline int64_t mb_exl2_chunks(const struct mb_exl2_layer *L, struct mb_exl2_chunk *out) {
    int64_t c = 0, row0 = 0;
    for (int64_t g = 0; g < L->G; g++) {
        int b;
        int64_t off, next;
        mb_exl2_group(L, g, &b, &off, &next);
        int64_t rows = (next - off) * 32 / b;
        for (int64_t r = 0; r < rows; r += MB_EXL2_CHUNK, c++) {
            out[c].bits = b;
            out[c].word_row = (int32_t)(off + r * b / 32);
            out[c].group = (int32_t)g;
            out[c].row = (int32_t)(row0 + r);
        }
        row0 += rows;
    }
    return c;
}

#endif
