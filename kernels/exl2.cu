/* kernels/exl2.cu: EXL2 dequantization and matrix products on the GPU. Entry points and the data layout
 * are described in kernels.h; the file layout in core/exl2_layout.h. Every op has three layers: a static
 * __global__ kernel, a static launcher taking a stream, and one exported C entry returning a status. */
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>

extern "C" {
#include "kernels.h"
}
#include "cuda_ctx.cuh"


struct mb_exl2_dev {
    int64_t K, Kp, N, Np, G, P, nchunks;
    uint32_t *q_weight; /* [P, Np] as in the file */
    __half *scales;     /* [G, N] fp16 scale of every (group, column) */
    int32_t *perm;      /* [Kp] packed row j -> original row (>= K: padding) */
    int4 *chunks;       /* [nchunks] struct mb_exl2_chunk: bits, first packed word row, group, first permuted row */
};

/* ---------------------------------------------------------------------------------------------- */
/* device helpers                                                                                  */

/* 32 values of B bits from B consecutive words of one column (the shared decode, unrolled for a constant B) */
template <int B>
__device__ __forceinline__ void load_decode(const uint32_t *qw, int64_t Np, int64_t row, int64_t n, int *q) {
    uint32_t w[B];
#pragma unroll
    for (int k = 0; k < B; k++) w[k] = __ldg(qw + (row + k) * Np + n);
    mb_exl2_decode32(B, w, q);
}

__device__ __forceinline__ void load_decode_any(int b, const uint32_t *qw, int64_t Np, int64_t row, int64_t n, int *q) {
    switch (b) {
    case 2: load_decode<2>(qw, Np, row, n, q); break;
    case 3: load_decode<3>(qw, Np, row, n, q); break;
    case 4: load_decode<4>(qw, Np, row, n, q); break;
    case 5: load_decode<5>(qw, Np, row, n, q); break;
    case 6: load_decode<6>(qw, Np, row, n, q); break;
    default: load_decode<8>(qw, Np, row, n, q); break;
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* load-time preparation                                                                           */

static __global__ void scales_kernel(const uint32_t *q_scale, const __half *smax, int64_t G, int64_t N, int64_t Np, __half *out) {
    int64_t n = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, g = blockIdx.y;
    if (n >= N || g >= G) return;
    int code = (int)((q_scale[g * (Np / 8) + n / 8] >> (4 * (n % 8))) & 15);
    out[g * N + n] = __float2half_rn(mb_exl2_scale(code, __half_as_ushort(smax[g])));
}

static __global__ void perm_kernel(const int32_t *invperm, int64_t Kp, int32_t *perm) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < Kp) perm[invperm[i]] = (int32_t)i;
}

extern "C" int mb_exl2_dev_upload(const struct mb_exl2_layer *L, struct mb_exl2_dev **out) {
    *out = NULL;
    int rc = mb_cuda_probe(NULL, 0);
    if (rc) return rc;
    if (L->Kp % MB_EXL2_CHUNK || L->G <= 0 || L->P <= 0) return mb_fail(MB_EINVAL, "EXL2 upload: layer not validated (Kp %lld, G %lld)", (long long)L->Kp, (long long)L->G);
    struct mb_exl2_dev *d = (struct mb_exl2_dev *)calloc(1, sizeof *d);
    if (!d) return mb_fail(MB_ENOMEM, "out of memory");
    d->K = L->K; d->Kp = L->Kp; d->N = L->N; d->Np = L->Np; d->G = L->G; d->P = L->P; d->nchunks = L->Kp / MB_EXL2_CHUNK;
    /* chunk table on the host (core/exl2_layout.h) */
    std::vector<struct mb_exl2_chunk> ch((size_t)d->nchunks);
    mb_exl2_chunks(L, ch.data());
    uint32_t *qs_d = NULL;
    __half *smax_d = NULL;
    int32_t *inv_d = NULL;
    cudaError_t e = cudaSuccess;
#define ALLOC(p, n) if (e == cudaSuccess) e = cudaMalloc((void **)&(p), (size_t)(n))
    ALLOC(d->q_weight, d->P * d->Np * 4);
    ALLOC(d->scales, d->G * d->N * 2);
    ALLOC(d->perm, d->Kp * 4);
    ALLOC(d->chunks, d->nchunks * sizeof(int4));
    ALLOC(qs_d, d->G * d->Np / 8 * 4);
    ALLOC(smax_d, d->G * 2);
    ALLOC(inv_d, d->Kp * 4);
#undef ALLOC
    if (e == cudaSuccess) e = cudaMemcpy(d->q_weight, L->q_weight, (size_t)(d->P * d->Np * 4), cudaMemcpyHostToDevice);
    if (e == cudaSuccess) e = cudaMemcpy(qs_d, L->q_scale, (size_t)(d->G * d->Np / 8 * 4), cudaMemcpyHostToDevice);
    if (e == cudaSuccess) e = cudaMemcpy(smax_d, L->q_scale_max, (size_t)(d->G * 2), cudaMemcpyHostToDevice);
    if (e == cudaSuccess) e = cudaMemcpy(inv_d, L->q_invperm, (size_t)(d->Kp * 4), cudaMemcpyHostToDevice);
    if (e == cudaSuccess) e = cudaMemcpy(d->chunks, ch.data(), ch.size() * sizeof(struct mb_exl2_chunk), cudaMemcpyHostToDevice);
    if (e == cudaSuccess) {
        dim3 grid((unsigned)((d->N + 255) / 256), (unsigned)d->G);
        scales_kernel<<<grid, 256>>>(qs_d, smax_d, d->G, d->N, d->Np, d->scales);
        perm_kernel<<<(unsigned)((d->Kp + 255) / 256), 256>>>(inv_d, d->Kp, d->perm);
        e = cudaGetLastError();
    }
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    cudaFree(qs_d);
    cudaFree(smax_d);
    cudaFree(inv_d);
    if (e != cudaSuccess) {
        mb_exl2_dev_free(d);
        return mb_fail(MB_ENOCUDA, "uploading an EXL2 layer: %s", cudaGetErrorString(e));
    }
    *out = d;
    return 0;
}

extern "C" void mb_exl2_dev_free(struct mb_exl2_dev *d) {
    if (!d) return;
    cudaFree(d->q_weight);
    cudaFree(d->scales);
    cudaFree(d->perm);
    cudaFree(d->chunks);
    free(d);
}

/* ---------------------------------------------------------------------------------------------- */
/* dequantize                                                                                      */

static __global__ void dequant_kernel(const uint32_t *qw, const __half *scales, const int32_t *perm, const int4 *chunks, int64_t K, int64_t N,
                                      int64_t Np, __half *wt) {
    int64_t n = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, c = blockIdx.y;
    if (n >= N) return;
    int4 ch = chunks[c];
    int q[32];
    load_decode_any(ch.x, qw, Np, ch.y, n, q);
    float sc = __half2float(scales[(int64_t)ch.z * N + n]);
    int z = 1 << (ch.x - 1);
#pragma unroll
    for (int i = 0; i < 32; i++) {
        int64_t o = perm[ch.w + i];
        if (o < K) wt[o * N + n] = __float2half_rn((float)(q[i] - z) * sc);
    }
}

static int launch_dequant(const struct mb_exl2_dev *d, __half *wt, cudaStream_t s) {
    dim3 grid((unsigned)((d->N + 127) / 128), (unsigned)d->nchunks);
    dequant_kernel<<<grid, 128, 0, s>>>(d->q_weight, d->scales, d->perm, d->chunks, d->K, d->N, d->Np, wt);
    CUDA_TRY(cudaGetLastError(), "dequant kernel");
    return 0;
}

extern "C" int mb_exl2_dev_dequant(const struct mb_exl2_dev *d, uint16_t *wt_d, void *stream) {
    return launch_dequant(d, (__half *)wt_d, (cudaStream_t)stream);
}

/* ---------------------------------------------------------------------------------------------- */
/* small batch: read the packed weights directly                                                   */

#define SMALL_COLS 128     /* columns per block, one per thread */
#define SPLIT_ROWS_MAX 512 /* permuted rows per split (shared memory holds x for them) */

/* partial [split, M, N] = x[:, rows of this split] @ W^T[rows of this split, :] */
template <int MT>
static __global__ void gemm_small_kernel(const uint32_t *qw, const __half *scales, const int32_t *perm, const int4 *chunks, const __half *x,
                                         int64_t M, int64_t K, int64_t N, int64_t Np, int64_t chunks_per_split, int64_t nchunks, float *partial) {
    __shared__ __half xs[MT][SPLIT_ROWS_MAX];
    int64_t n = blockIdx.x * (int64_t)SMALL_COLS + threadIdx.x, split = blockIdx.y;
    int64_t c0 = split * chunks_per_split, c1 = c0 + chunks_per_split < nchunks ? c0 + chunks_per_split : nchunks;
    int64_t r0 = c0 * 32, nr = (c1 - c0) * 32;
    /* x in packed (act) order for this split's rows; padding rows read as 0 */
    for (int64_t i = threadIdx.x; i < (int64_t)MT * nr; i += blockDim.x) {
        int64_t m = i / nr, j = i % nr;
        int64_t o = perm[r0 + j];
        xs[m][j] = (m < M && o < K) ? x[m * K + o] : __float2half(0.0f);
    }
    __syncthreads();
    if (n >= N) return;
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; m++) acc[m] = 0.0f;
    for (int64_t c = c0; c < c1; c++) {
        int4 ch = chunks[c];
        int q[32];
        load_decode_any(ch.x, qw, Np, ch.y, n, q);
        float sc = __half2float(scales[(int64_t)ch.z * N + n]);
        int z = 1 << (ch.x - 1);
        int64_t jb = (c - c0) * 32;
#pragma unroll
        for (int i = 0; i < 32; i++) {
            float w = (float)(q[i] - z) * sc;
#pragma unroll
            for (int m = 0; m < MT; m++) acc[m] += w * __half2float(xs[m][jb + i]);
        }
    }
#pragma unroll
    for (int m = 0; m < MT; m++)
        if (m < M) partial[(split * M + m) * N + n] = acc[m];
}

/* y [M, N] = sum over splits in order (deterministic) */
static __global__ void reduce_kernel(const float *partial, int64_t splits, int64_t M, int64_t N, void *y, int y_f32) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= M * N) return;
    float s = 0.0f;
    for (int64_t k = 0; k < splits; k++) s += partial[k * M * N + i];
    if (y_f32) ((float *)y)[i] = s;
    else ((__half *)y)[i] = __float2half_rn(s);
}

static int launch_gemm_small(const struct mb_exl2_dev *d, const __half *x, int64_t M, void *y, int y_f32, cudaStream_t s) {
    if (M < 1 || M > 32) return mb_fail(MB_EINVAL, "gemm_small: batch %lld outside 1..32", (long long)M);
    int64_t colblocks = (d->N + SMALL_COLS - 1) / SMALL_COLS;
    struct mb_cuda_ctx *cx = mb_cuda_ctx();
    if (!cx) return mb_fail(MB_ENOCUDA, "no CUDA context: %s", mb_errmsg());
    int sms = cx->sms;
    int64_t want = (4 * (int64_t)sms + colblocks - 1) / colblocks; /* about 4 blocks per SM */
    int64_t cps = (d->nchunks + want - 1) / want;
    if (cps < 1) cps = 1;
    if (cps > SPLIT_ROWS_MAX / 32) cps = SPLIT_ROWS_MAX / 32;
    int64_t splits = (d->nchunks + cps - 1) / cps;
    float *partial = (float *)mb_cuda_scratch(cx, 0, (size_t)(splits * M * d->N) * sizeof(float));
    if (!partial) return mb_fail(MB_ENOCUDA, "gemm_small: %s", mb_errmsg());
    dim3 grid((unsigned)colblocks, (unsigned)splits);
#define L_(MT) gemm_small_kernel<MT><<<grid, SMALL_COLS, 0, s>>>(d->q_weight, d->scales, d->perm, d->chunks, x, M, d->K, d->N, d->Np, cps, d->nchunks, partial)
    if (M <= 1) L_(1);
    else if (M <= 2) L_(2);
    else if (M <= 4) L_(4);
    else if (M <= 8) L_(8);
    else if (M <= 16) L_(16);
    else L_(32);
#undef L_
    CUDA_TRY(cudaGetLastError(), "gemm_small kernel");
    reduce_kernel<<<(unsigned)((M * d->N + 255) / 256), 256, 0, s>>>(partial, splits, M, d->N, y, y_f32);
    CUDA_TRY(cudaGetLastError(), "reduce kernel");
    return 0;
}

extern "C" int mb_exl2_dev_gemm_small(const struct mb_exl2_dev *d, const uint16_t *x_d, int64_t M, void *y_d, int y_f32, void *stream) {
    return launch_gemm_small(d, (const __half *)x_d, M, y_d, y_f32, (cudaStream_t)stream);
}

/* ---------------------------------------------------------------------------------------------- */
/* large batch: dequantize + cuBLAS                                                                */

static int blas_gemm(cublasHandle_t h, const __half *x, const __half *wt, int64_t M, int64_t K, int64_t N, void *y, int y_f32, cudaStream_t s) {
    mb_cu.set_stream(h, s);
    float alpha = 1.0f, beta = 0.0f;
    /* row-major y [M,N] = x [M,K] @ wt [K,N]  <=>  column-major y^T [N,M] = wt^T [N,K] @ x^T [K,M] */
    cublasStatus_t st = mb_cu.gemm_ex(h, CUBLAS_OP_N, CUBLAS_OP_N, (int)N, (int)M, (int)K, &alpha, wt, CUDA_R_16F, (int)N, x, CUDA_R_16F, (int)K, &beta, y,
                                     y_f32 ? CUDA_R_32F : CUDA_R_16F, (int)N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) return mb_fail(MB_ENOCUDA, "cublasGemmEx failed (status %d)", (int)st);
    return 0;
}

static int launch_gemm_large(const struct mb_exl2_dev *d, const __half *x, int64_t M, void *y, int y_f32, cudaStream_t s) {
    struct mb_cuda_ctx *cx = mb_cuda_ctx();
    if (!cx) return mb_fail(MB_ENOCUDA, "no CUDA context: %s", mb_errmsg());
    __half *wt = (__half *)mb_cuda_scratch(cx, 1, (size_t)(d->K * d->N) * 2);
    if (!wt) return mb_fail(MB_ENOCUDA, "gemm_large: %s", mb_errmsg());
    int rc = launch_dequant(d, wt, s);
    if (rc) return rc;
    return blas_gemm(cx->blas, x, wt, M, d->K, d->N, y, y_f32, s);
}

extern "C" int mb_exl2_dev_gemm_large(const struct mb_exl2_dev *d, const uint16_t *x_d, int64_t M, void *y_d, int y_f32, void *stream) {
    return launch_gemm_large(d, (const __half *)x_d, M, y_d, y_f32, (cudaStream_t)stream);
}

extern "C" int mb_exl2_dev_gemm(const struct mb_exl2_dev *d, const uint16_t *x_d, int64_t M, void *y_d, int y_f32, void *stream) {
    if (M <= 32) return mb_exl2_dev_gemm_small(d, x_d, M, y_d, y_f32, stream);
    return mb_exl2_dev_gemm_large(d, x_d, M, y_d, y_f32, stream);
}

extern "C" int mb_cuda_gemm_f16(const uint16_t *x_d, const uint16_t *wt_d, int64_t M, int64_t K, int64_t N, void *y_d, int y_f32, void *stream) {
    struct mb_cuda_ctx *cx = mb_cuda_ctx();
    if (!cx) return mb_fail(MB_ENOCUDA, "no CUDA context: %s", mb_errmsg());
    return blas_gemm(cx->blas, (const __half *)x_d, (const __half *)wt_d, M, K, N, y_d, y_f32, (cudaStream_t)stream);
}
