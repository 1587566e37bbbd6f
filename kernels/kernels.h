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

#endif
