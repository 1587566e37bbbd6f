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
