/* kernels/cuda_ctx.cuh: the per-device CUDA context shared by every kernel file (private to kernels/).
 * One per process (device 0): the cuBLAS handle, the compute stream, a copy stream for weight uploads, and
 * scratch buffers that grow on demand (slot 0: split-K partial sums, slot 1: dequantized weights, slots 2-3:
 * for the ops table). Created on first use; never per layer. */
#ifndef MB_CUDA_CTX_CUH
#define MB_CUDA_CTX_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

/* cuBLAS and cuSOLVER are loaded with dlopen on first use (cuBLAS with the context, cuSOLVER with the first
 * GPU factorization), so that commands that never touch the GPU do not map and relocate ~1 GB of libraries.
 * Calls go through the table mb_cu (mb_cu.sgemm(...)). */
/* the C entry of cublasGemmEx (C++ sees an overload as well) */
typedef cublasStatus_t (*mb_gemmex_fn)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void *, const void *, cudaDataType, int,
                                       const void *, cudaDataType, int, const void *, void *, cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
/* X(member, symbol) */
#define MB_CUBLAS_FUNCS(X) X(create, "cublasCreate_v2") X(destroy, "cublasDestroy_v2") X(set_stream, "cublasSetStream_v2") X(sgemm_batched, "cublasSgemmBatched") X(sgemm, "cublasSgemm_v2") X(dsyrk, "cublasDsyrk_v2") X(gemm_ex, "cublasGemmEx")
#define MB_CUSOLVER_FUNCS(X) X(dn_create, "cusolverDnCreate") X(dn_set_stream, "cusolverDnSetStream") X(dpotrf_bs, "cusolverDnDpotrf_bufferSize") X(dpotrf, "cusolverDnDpotrf") X(dpotri_bs, "cusolverDnDpotri_bufferSize") X(dpotri, "cusolverDnDpotri")
struct mb_cuda_libs {
    decltype(&cublasCreate) create;
    decltype(&cublasDestroy) destroy;
    decltype(&cublasSetStream) set_stream;
    decltype(&cublasSgemmBatched) sgemm_batched;
    decltype(&cublasSgemm) sgemm;
    decltype(&cublasDsyrk) dsyrk;
    mb_gemmex_fn gemm_ex;
    decltype(&cusolverDnCreate) dn_create;
    decltype(&cusolverDnSetStream) dn_set_stream;
    decltype(&cusolverDnDpotrf_bufferSize) dpotrf_bs;
    decltype(&cusolverDnDpotrf) dpotrf;
    decltype(&cusolverDnDpotri_bufferSize) dpotri_bs;
    decltype(&cusolverDnDpotri) dpotri;
};
extern struct mb_cuda_libs mb_cu;
/* Load cuSOLVER (once); 0 or MB_ENOCUDA with the reason */
int mb_cuda_load_solver(void);

#define MB_CUDA_SCRATCH_SLOTS 4

struct mb_cuda_ctx {
    int device, sms;
    cublasHandle_t blas;
    cudaStream_t stream, copy_stream;
    void *scratch[MB_CUDA_SCRATCH_SLOTS];
    size_t scratch_cap[MB_CUDA_SCRATCH_SLOTS];
};

/* The context, created on first use; NULL (with a message) when no GPU is usable */
struct mb_cuda_ctx *mb_cuda_ctx(void);
/* A device buffer of at least `bytes` in scratch slot `slot` (grown on demand; contents not kept); NULL
 * with a message on failure. Stream-ordered reuse: valid for work queued on the context's stream. */
void *mb_cuda_scratch(struct mb_cuda_ctx *cx, int slot, size_t bytes);

#define CUDA_TRY(call, what)                                                                        \
    do {                                                                                            \
        cudaError_t e_ = (call);                                                                    \
        if (e_ != cudaSuccess) return mb_fail(MB_ENOCUDA, "%s: %s", what, cudaGetErrorString(e_)); \
    } while (0)

#endif
