/* kernels/device.cu: GPU detection. A machine without a driver gets MB_ENOCUDA, never a crash. */
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

extern "C" {
#include "kernels.h"
}
#include "cuda_ctx.cuh"

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

extern "C" int mb_cuda_mem_info(size_t *free_bytes, size_t *total_bytes) {
    *free_bytes = *total_bytes = 0;
    int rc = mb_cuda_probe(NULL, 0);
    if (rc) return rc;
    cudaError_t e = cudaMemGetInfo(free_bytes, total_bytes);
    return e == cudaSuccess ? 0 : mb_fail(MB_ENOCUDA, "cudaMemGetInfo: %s", cudaGetErrorString(e));
}

/* ---- cuBLAS and cuSOLVER, loaded on first use ---- */
struct mb_cuda_libs mb_cu;

#ifndef MB_CUDA_LIB_DIR
#define MB_CUDA_LIB_DIR "/usr/local/cuda/lib64"
#endif

/* dlopen the first of lib.so, lib.so.13, .12, .11 found (the build's CUDA lib directory first) */
static void *open_lib(const char *base, char *why, size_t why_n) {
    static const char *suffix[] = {"", ".13", ".12", ".11"};
    const char *dirs[] = {MB_CUDA_LIB_DIR "/", ""};
    for (int d = 0; d < 2; d++)
        for (int k = 0; k < 4; k++) {
            char path[512];
            snprintf(path, sizeof path, "%s%s.so%s", dirs[d], base, suffix[k]);
            void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
            if (h) return h;
            snprintf(why, why_n, "%s", dlerror());
        }
    return NULL;
}

static int load_blas(void) {
    static int state; /* 0 not tried, 1 loaded, -1 failed */
    static char why[512];
    if (state) return state > 0 ? 0 : mb_fail(MB_ENOCUDA, "cannot load cuBLAS: %s", why);
    state = -1;
    void *h = open_lib("libcublas", why, sizeof why);
    if (!h) return mb_fail(MB_ENOCUDA, "cannot load cuBLAS: %s", why);
#define MB_CU_LOAD(member, sym)                                                                         \
    if (!(*(void **)&mb_cu.member = dlsym(h, sym))) {                                                   \
        snprintf(why, sizeof why, "symbol %s missing", sym);                                            \
        return mb_fail(MB_ENOCUDA, "cannot load cuBLAS: %s", why);                                      \
    }
    MB_CUBLAS_FUNCS(MB_CU_LOAD)
    state = 1;
    return 0;
}

int mb_cuda_load_solver(void) {
    static int state;
    static char why[512];
    if (state) return state > 0 ? 0 : mb_fail(MB_ENOCUDA, "cannot load cuSOLVER: %s", why);
    state = -1;
    void *h = open_lib("libcusolver", why, sizeof why);
    if (!h) return mb_fail(MB_ENOCUDA, "cannot load cuSOLVER: %s", why);
#undef MB_CU_LOAD
#define MB_CU_LOAD(member, sym)                                                                         \
    if (!(*(void **)&mb_cu.member = dlsym(h, sym))) {                                                   \
        snprintf(why, sizeof why, "symbol %s missing", sym);                                            \
        return mb_fail(MB_ENOCUDA, "cannot load cuSOLVER: %s", why);                                    \
    }
    MB_CUSOLVER_FUNCS(MB_CU_LOAD)
#undef MB_CU_LOAD
    state = 1;
    return 0;
}

extern "C" int mb_cuda_libs_check(void) {
    int rc = load_blas();
    return rc ? rc : mb_cuda_load_solver();
}

/* ---- the per-device context ---- */
static struct mb_cuda_ctx g_ctx;
static int g_ctx_state; /* 0 not tried, 1 ready, -1 failed */

struct mb_cuda_ctx *mb_cuda_ctx(void) {
    if (g_ctx_state == 1) return &g_ctx;
    if (g_ctx_state == -1) { mb_fail(MB_ENOCUDA, "CUDA context unavailable"); return NULL; }
    g_ctx_state = -1;
    if (mb_cuda_probe(NULL, 0)) return NULL;
    struct mb_cuda_ctx *c = &g_ctx;
    c->device = 0;
    if (cudaSetDevice(0) != cudaSuccess || cudaDeviceGetAttribute(&c->sms, cudaDevAttrMultiProcessorCount, 0) != cudaSuccess) {
        mb_fail(MB_ENOCUDA, "cannot select CUDA device 0");
        return NULL;
    }
    if (cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking) != cudaSuccess ||
        cudaStreamCreateWithFlags(&c->copy_stream, cudaStreamNonBlocking) != cudaSuccess) {
        mb_fail(MB_ENOCUDA, "cannot create CUDA streams");
        return NULL;
    }
    if (load_blas()) return NULL;
    if (mb_cu.create(&c->blas) != CUBLAS_STATUS_SUCCESS) { mb_fail(MB_ENOCUDA, "cublasCreate failed"); return NULL; }
    mb_cu.set_stream(c->blas, c->stream);
    g_ctx_state = 1;
    return c;
}

void *mb_cuda_scratch(struct mb_cuda_ctx *cx, int slot, size_t bytes) {
    if (slot < 0 || slot >= MB_CUDA_SCRATCH_SLOTS) { mb_fail(MB_EINVAL, "scratch slot %d", slot); return NULL; }
    if (bytes <= cx->scratch_cap[slot]) return cx->scratch[slot];
    cudaFree(cx->scratch[slot]); /* synchronizes: queued work using the old buffer completes first */
    cx->scratch[slot] = NULL;
    cx->scratch_cap[slot] = 0;
    cudaError_t e = cudaMalloc(&cx->scratch[slot], bytes);
    if (e != cudaSuccess) {
        cx->scratch[slot] = NULL;
        mb_fail(MB_ENOCUDA, "out of device memory for %zu bytes of scratch: %s", bytes, cudaGetErrorString(e));
        return NULL;
    }
    cx->scratch_cap[slot] = bytes;
    return cx->scratch[slot];
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

