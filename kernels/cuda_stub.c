/* kernels/cuda_stub.c: the GPU entries of kernels.h for builds without CUDA (make CUDA=0). */
#include "kernels.h"

int mb_cuda_built(void) { return 0; }

int mb_cuda_probe(char *name, size_t name_len) {
    if (name && name_len) name[0] = 0;
    return mb_fail(MB_ENOCUDA, "built without CUDA (rebuild with nvcc available and CUDA=1)");
}

#define NOCUDA return mb_fail(MB_ENOCUDA, "built without CUDA (rebuild with nvcc available and CUDA=1)")
int mb_cuda_malloc(void **p, size_t bytes) { (void)bytes; *p = NULL; NOCUDA; }
void mb_cuda_free(void *p) { (void)p; }
int mb_cuda_h2d(void *dst_d, const void *src, size_t bytes) { (void)dst_d; (void)src; (void)bytes; NOCUDA; }
int mb_cuda_d2h(void *dst, const void *src_d, size_t bytes) { (void)dst; (void)src_d; (void)bytes; NOCUDA; }
int mb_cuda_memset(void *p_d, int byte, size_t bytes) { (void)p_d; (void)byte; (void)bytes; NOCUDA; }
int mb_cuda_sync(void) { NOCUDA; }
int mb_cuda_copy_bandwidth(size_t bytes, int iters, double *g) { (void)bytes; (void)iters; *g = 0; NOCUDA; }
int mb_exl2_dev_upload(const struct mb_exl2_layer *L, struct mb_exl2_dev **out) { (void)L; *out = NULL; NOCUDA; }
void mb_exl2_dev_free(struct mb_exl2_dev *d) { (void)d; }
int mb_exl2_dev_dequant(const struct mb_exl2_dev *d, uint16_t *wt_d, void *s) { (void)d; (void)wt_d; (void)s; NOCUDA; }
int mb_exl2_dev_gemm_small(const struct mb_exl2_dev *d, const uint16_t *x, int64_t M, void *y, int f, void *s) { (void)d; (void)x; (void)M; (void)y; (void)f; (void)s; NOCUDA; }
int mb_exl2_dev_gemm_large(const struct mb_exl2_dev *d, const uint16_t *x, int64_t M, void *y, int f, void *s) { (void)d; (void)x; (void)M; (void)y; (void)f; (void)s; NOCUDA; }
int mb_exl2_dev_gemm(const struct mb_exl2_dev *d, const uint16_t *x, int64_t M, void *y, int f, void *s) { (void)d; (void)x; (void)M; (void)y; (void)f; (void)s; NOCUDA; }
int mb_cuda_gemm_f16(const uint16_t *x, const uint16_t *w, int64_t M, int64_t K, int64_t N, void *y, int f, void *s) { (void)x; (void)w; (void)M; (void)K; (void)N; (void)y; (void)f; (void)s; NOCUDA; }
int mb_cuda_mem_info(size_t *f, size_t *t) { *f = *t = 0; NOCUDA; }
int mb_ops_cuda(const struct mb_ops **out) { *out = NULL; NOCUDA; }
int mb_gptq_cuda_prepare(const double *H, int64_t K, int64_t c, double d, int t, int r, const char *n, struct mb_gptq_dev **out, int32_t *p, double *du) {
    (void)H; (void)K; (void)c; (void)d; (void)t; (void)r; (void)n; (void)p; (void)du; *out = NULL; NOCUDA;
}
void mb_gptq_cuda_free(struct mb_gptq_dev *d) { (void)d; }
int mb_gptq_cuda_run(const struct mb_gptq_dev *d, const struct mb_weight *w, int G, const int *gb, const int64_t *gr, int r, uint8_t *q, uint8_t *qs, uint16_t *sm, const char *n) {
    (void)d; (void)w; (void)G; (void)gb; (void)gr; (void)r; (void)q; (void)qs; (void)sm; (void)n; NOCUDA;
}
int mb_cuda_libs_check(void) { NOCUDA; }
