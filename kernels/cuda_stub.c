/* kernels/cuda_stub.c: the GPU entries of kernels.h for builds without CUDA (make CUDA=0). */
#include "kernels.h"

int mb_cuda_built(void) { return 0; }

int mb_cuda_probe(char *name, size_t name_len) {
    if (name && name_len) name[0] = 0;
    return mb_fail(MB_ENOCUDA, "built without CUDA (rebuild with nvcc available and CUDA=1)");
}
