/* kernels/device.cu: GPU detection. A machine without a driver gets MB_ENOCUDA, never a crash. */
#include <cuda_runtime.h>
#include <stdio.h>

extern "C" {
#include "kernels.h"
}

extern "C" int mb_cuda_built(void) { return 1; }

extern "C" int mb_cuda_probe(char *name, size_t name_len) {
    if (name && name_len) name[0] = 0;
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return mb_fail(MB_ENOCUDA, "no CUDA device: %s", cudaGetErrorString(e));
    }
    if (n == 0) return mb_fail(MB_ENOCUDA, "no CUDA device");
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) return mb_fail(MB_ENOCUDA, "cannot query CUDA device 0");
    if (name && name_len) snprintf(name, name_len, "%s", prop.name);
    return 0;
}

extern "C" int mb_cuda_malloc(void **p, size_t bytes) {
    *p = NULL;
    int rc = mb_cuda_probe(NULL, 0);
    if (rc) return rc;
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 1);
    if (e != cudaSuccess) { *p = NULL; return mb_fail(MB_ENOCUDA, "cudaMalloc(%zu): %s", bytes, cudaGetErrorString(e)); }
    return 0;
}

extern "C" void mb_cuda_free(void *p) { if (p) cudaFree(p); }

extern "C" int mb_cuda_h2d(void *dst_d, const void *src, size_t bytes) {
    cudaError_t e = cudaMemcpy(dst_d, src, bytes, cudaMemcpyHostToDevice);
    return e == cudaSuccess ? 0 : mb_fail(MB_ENOCUDA, "copy to device: %s", cudaGetErrorString(e));
}

extern "C" int mb_cuda_d2h(void *dst, const void *src_d, size_t bytes) {
    cudaError_t e = cudaMemcpy(dst, src_d, bytes, cudaMemcpyDeviceToHost);
    return e == cudaSuccess ? 0 : mb_fail(MB_ENOCUDA, "copy from device: %s", cudaGetErrorString(e));
}

extern "C" int mb_cuda_memset(void *p_d, int byte, size_t bytes) {
    cudaError_t e = cudaMemset(p_d, byte, bytes);
    return e == cudaSuccess ? 0 : mb_fail(MB_ENOCUDA, "memset: %s", cudaGetErrorString(e));
}

extern "C" int mb_cuda_sync(void) {
    cudaError_t e = cudaDeviceSynchronize();
    return e == cudaSuccess ? 0 : mb_fail(MB_ENOCUDA, "device error: %s", cudaGetErrorString(e));
}

static int cmp_f(const void *a, const void *b) { float x = *(const float *)a, y = *(const float *)b; return x < y ? -1 : x > y; }

extern "C" int mb_cuda_copy_bandwidth(size_t bytes, int iters, double *gb_per_s) {
    void *a = NULL, *b = NULL;
    int rc = mb_cuda_malloc(&a, bytes);
    if (!rc) rc = mb_cuda_malloc(&b, bytes);
    if (rc) { mb_cuda_free(a); return rc; }
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    float *ms = (float *)malloc(sizeof(float) * (iters > 0 ? iters : 1));
    cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice); /* warm-up */
    for (int i = 0; i < iters; i++) {
        cudaEventRecord(e0);
        cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
        cudaEventRecord(e1);
        cudaEventSynchronize(e1);
        cudaEventElapsedTime(&ms[i], e0, e1);
    }
    qsort(ms, iters, sizeof *ms, cmp_f);
    *gb_per_s = 2.0 * (double)bytes / (ms[iters / 2] * 1e-3) / 1e9;
    free(ms);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    mb_cuda_free(a);
    mb_cuda_free(b);
    return mb_cuda_sync();
}
