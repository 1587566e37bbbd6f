/* kernels/kernels.h: CUDA entry points, callable from C (no CUDA include here; streams are void *).
 *
 * Every entry returns 0 or a negative MB_E* status with a message. A build without CUDA (make CUDA=0)
 * links kernels/cuda_stub.c, whose entries return MB_ENOCUDA "built without CUDA"; a CUDA build on a
 * machine without a GPU driver returns MB_ENOCUDA "no CUDA device" at run time. Every GPU function has
 * a CPU reference (quant/ for EXL2) with the same argument shape, and tests compare the two. */
#ifndef MB_KERNELS_H
#define MB_KERNELS_H

#include "../core/core.h"

/* 1 when this binary was compiled with CUDA. */
int mb_cuda_built(void);
/* Probe the GPU: 0 and the device name when one is usable, MB_ENOCUDA otherwise (never crashes). */
int mb_cuda_probe(char *name, size_t name_len);


/* ---- device memory and streams (thin wrappers so C code and tests need no CUDA headers) ---- */
int mb_cuda_malloc(void **p, size_t bytes);
void mb_cuda_free(void *p);
int mb_cuda_h2d(void *dst_d, const void *src, size_t bytes);
int mb_cuda_d2h(void *dst, const void *src_d, size_t bytes);
int mb_cuda_memset(void *p_d, int byte, size_t bytes);
int mb_cuda_sync(void);
/* Device-to-device copy bandwidth: bytes read + written per second, median of `iters` copies of `bytes`. */
int mb_cuda_copy_bandwidth(size_t bytes, int iters, double *gb_per_s);

/* ---- EXL2 layers on the GPU ----
 * Upload keeps q_weight in the file's plain layout and adds, built on the GPU at load: the fp16 scale of
 * every (group, column), a per-32-row chunk table (bits, first packed row, group) and the permutation.
 * Kernels (three layers each: __global__ kernel -> launcher with a stream -> the entries below):
 *   dequant      W^T [K, N] fp16 in original row order (the runtime's fp16 rounding of (q - z) * scale)
 *   gemm_small   y [M, N] = x [M, K] @ W^T for M <= 32, reading the packed weights directly; split over K
 *                with per-split partial sums reduced in a fixed order (bit-identical between runs)
 *   gemm_large   dequant to a scratch fp16 matrix + cuBLAS (fp16 in, f32 accumulate)
 *   gemm         picks one of the two by M
 * CPU references: mb_exl2_ref_dequant_f16 and mb_exl2_ref_gemm below. */
struct mb_exl2_layer;
struct mb_exl2_dev;
int mb_exl2_dev_upload(const struct mb_exl2_layer *L, struct mb_exl2_dev **out);
void mb_exl2_dev_free(struct mb_exl2_dev *d);
int mb_exl2_dev_dequant(const struct mb_exl2_dev *d, uint16_t *wt_d, void *stream);
int mb_exl2_dev_gemm_small(const struct mb_exl2_dev *d, const uint16_t *x_d, int64_t M, void *y_d, int y_f32, void *stream);
int mb_exl2_dev_gemm_large(const struct mb_exl2_dev *d, const uint16_t *x_d, int64_t M, void *y_d, int y_f32, void *stream);
int mb_exl2_dev_gemm(const struct mb_exl2_dev *d, const uint16_t *x_d, int64_t M, void *y_d, int y_f32, void *stream);
/* cuBLAS fp16 reference GEMM: y [M, N] = x [M, K] @ wt [K, N] (row-major, fp16 in, f32 accumulate) */
int mb_cuda_gemm_f16(const uint16_t *x_d, const uint16_t *wt_d, int64_t M, int64_t K, int64_t N, void *y_d, int y_f32, void *stream);

/* CPU references (no GPU needed): the same results computed on the host */
int mb_exl2_ref_dequant_f16(const struct mb_exl2_layer *L, uint16_t *wt);         /* wt [K, N] */
int mb_exl2_ref_gemm(const struct mb_exl2_layer *L, const uint16_t *x, int64_t M, float *y); /* f64 accumulate */

#endif
