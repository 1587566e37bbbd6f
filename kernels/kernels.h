/* kernels/kernels.h: the compute backends. One table of operations (struct mb_ops) that the forward pass,
 * calibration, measurement and perplexity are written against, with a CPU implementation (ops_cpu.c:
 * OpenMP loops, OpenBLAS) and a CUDA implementation; plus the EXL2 GPU kernels and their CPU twins.
 * No CUDA include here (streams are void *), so CPU-only builds compile.
 *
 * Every operation that touches activations goes through the table: buffers are allocated by it and live
 * where the backend computes (host memory for the CPU table, device memory for CUDA); callers move data in
 * and out only with upload / download. Weights are struct mb_weight views (core.h) in their stored dtype;
 * a backend makes them usable with weight_load (the CPU keeps the zero-copy host view, a device backend
 * copies) and multiplies by them directly.
 *
 * Layout conventions: activations are row-major [rows, features] f32; a batch of S sequences of T tokens is
 * [S*T, H] with sequence s at rows s*T .. s*T+T-1; y [M, N] = x [M, K] @ W^T for W [N, K].
 *
 * Determinism: every reduction has a fixed order that does not depend on the number of threads, so a
 * conversion gives the same bytes on 1, 2 or 64 cores.
 *
 * Entries that can fail return 0 or a negative MB_E* status with a message. A build without CUDA (make
 * CUDA=0) links kernels/cuda_stub.c, whose GPU entries return MB_ENOCUDA "built without CUDA"; a CUDA build
 * on a machine without a GPU driver returns MB_ENOCUDA "no CUDA device" at run time. */
#ifndef MB_KERNELS_H
#define MB_KERNELS_H

#include "../core/core.h"

/* ------------------------------------------------------------------------------------------------ */
/* the operations table                                                                             */

struct mb_ops {
    const char *name;
    int device; /* 1: buffers are device memory (not addressable by host code) */

    /* ---- buffers ---- */
    void *(*alloc)(size_t bytes); /* NULL on failure (the caller records the error) */
    void (*free)(void *p);
    int (*upload)(void *dst, const void *src_host, size_t bytes);
    int (*download)(void *dst_host, const void *src, size_t bytes);
    void (*copy)(void *dst, const void *src, size_t bytes); /* backend buffer to backend buffer */
    void (*zero)(void *p, size_t bytes);
    /* Wait for all queued work; returns a pending asynchronous error (CUDA launch failures), 0 on the CPU */
    int (*sync)(void);

    /* ---- weights ---- */
    /* Make a host view usable: *out is the CPU's own view (zero-copy) or a device copy. async != 0 may return
     * before the copy is complete (the next compute op on the weight waits for it); the CPU then only asks
     * the kernel to read the pages ahead. Release with weight_release. */
    int (*weight_load)(struct mb_weight *out, const struct mb_weight *host, int async);
    void (*weight_release)(struct mb_weight *w);
    /* Small f32 vectors (norms): n floats from any float view */
    int (*vector_load)(float **out, const struct mb_weight *host);

    /* ---- compute ---- */
    /* y [M, N] (+)= x [M, K] @ W^T */
    int (*matmul)(float *y, const float *x, const struct mb_weight *w, int64_t M, int accumulate);
    /* x [M, H] = rows ids [M] (host array, each in 0..vocab-1) of the embedding table */
    int (*embed)(float *x, const struct mb_weight *table, const int32_t *ids, int64_t M);
    /* out [M, H] = x * rsqrt(mean(x^2) + eps) * w */
    void (*rmsnorm)(float *out, const float *x, const float *w, int64_t M, int64_t H, float eps);
    /* rotation tables cos/sin [T, half] from inv_freq [half] (host): angle t * inv_freq[j], in f64 */
    int (*rope_tables)(float *cos_t, float *sin_t, const double *inv_freq, int64_t half, int64_t T);
    /* rotate heads of x [S*T, n_heads*hd] in place (pairs j, j + hd/2); position t of each sequence */
    void (*rope)(float *x, int64_t S, int64_t T, int64_t n_heads, int64_t hd, const float *cos_t, const float *sin_t);
    /* out [S*T, nh*hd] = causal softmax(q k^T / sqrt(hd)) v per sequence and head, kv heads shared by nh/nkv
     * query heads; window > 0 limits each query to the last `window` keys (Mistral) */
    void (*attention)(float *out, const float *q, const float *k, const float *v, int64_t S, int64_t T, int64_t nh, int64_t nkv,
                      int64_t hd, int64_t window);
    /* g [n] = silu(g) * u */
    void (*swiglu)(float *g, const float *u, int64_t n);
    /* x [n] += y */
    void (*add)(float *x, const float *y, int64_t n);

    /* ---- sparse MoE (Hugging Face Mixtral routing) ---- */
    /* per row of logits [M, E]: probs [M, E] = softmax (f32), sel [M, k] = the top k experts (ties: lower
     * index), wsel [M, k] = their probabilities renormalized over the chosen k */
    void (*moe_route)(int32_t *sel, float *wsel, float *probs, const float *logits, int64_t M, int E, int k);
    /* Rows of expert e: rowidx / roww [n] = the rows routed to e (ascending) with their weights, then, when
     * fewer than min_rows, the unrouted rows ranked by probs[:, e] (descending, ties by row) with weight 0,
     * up to min_rows. Counts are returned to the host. */
    int (*moe_rows)(int32_t *rowidx, float *roww, const int32_t *sel, const float *wsel, const float *probs, int64_t M, int E, int k, int e,
                    int64_t min_rows, int64_t *n_routed, int64_t *n_total);
    /* dst [n, H] = src[rowidx[j]] */
    void (*gather_rows)(float *dst, const float *src, const int32_t *rowidx, int64_t n, int64_t H);
    /* dst[rowidx[j]] += roww[j] * src[j] for j < n (rowidx distinct) */
    void (*scatter_add)(float *dst, const float *src, const int32_t *rowidx, const float *roww, int64_t n, int64_t H);

    /* ---- checks and reductions (results to the host) ---- */
    /* *index = the first non-finite element of x [n] or -1, *val its value; the status reports errors of
     * queued work (a device backend checks them here, once per module) */
    int (*find_nonfinite)(const float *x, int64_t n, int64_t *index, float *val);
    /* Per row of logits [M, V]: lse [M] = log sum exp (f64, max-shifted, summed in index order), tlogit [M] =
     * logits[i, tgt[i]] (tgt: a backend buffer; NULL skips it), argmax [M] (first maximum). All backend buffers. */
    void (*logit_stats)(const float *logits, int64_t M, int64_t V, const int32_t *tgt, double *lse, float *tlogit, int32_t *argmax);
    /* ids / vals [M, k]: the k largest logits of each row, descending (ties: lower id first) */
    void (*topk)(const float *logits, int64_t M, int64_t V, int k, int32_t *ids, float *vals);
    /* out [M, k] = logits[i, ids[i, j]] (ids within 0..V-1) */
    void (*gather_cols)(const float *logits, int64_t M, int64_t V, const int32_t *ids, int k, float *out);
    /* Module output error, per sequence s < S of n elements: d [S] = sum (a - b)^2, r [S] = sum b^2 (f64,
     * index order). Backend buffers. */
    void (*seq_error)(const float *a, const float *b, int64_t S, int64_t n, double *d, double *r);
    /* Hessian: upper triangle of H [K, K] (f64) += x^T x for x [M, K]. Rule: blocks of up to 1024 rows,
     * each converted to f64 and accumulated with dsyrk (the f64 accumulation keeps H exact enough for the
     * Cholesky of wide layers; the lower triangle is not touched). */
    int (*hessian_add)(double *H, const float *x, int64_t M, int64_t K);
};

extern const struct mb_ops mb_ops_cpu;

/* The CUDA table, or MB_ENOCUDA (with the reason) when CUDA is not built or no GPU is usable */
int mb_ops_cuda(const struct mb_ops **out);
/* The table for a --device value: "cpu", "cuda" (an error naming the reason when no GPU is usable) or "auto"
 * / NULL (CUDA when a usable GPU is present, else the CPU) */
int mb_ops_select(const char *device, const struct mb_ops **out);

/* C [M, N] = alpha op(A) op(B) + beta C (row-major, cblas conventions; ta / tb: transpose A / B), in fixed tiles
 * of at most 256 x 512 outputs, each computed by one single-threaded BLAS call, the tiles spread over the
 * OpenMP threads. The same bits for any number of threads: OpenBLAS's own threading changes its blocking with
 * the thread count (measured: sgemm and dpotrf give other bits on 1, 2 and 3 threads). */
void mb_cpu_sgemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                  float *C, int64_t ldc);

/* Rows [r0, r1) of a host weight as f32 into out [(r1 - r0), w->k] (EXL2: dequantized, exact f32 products of
 * the values and the fp16 scales; padded input rows dropped). */
int mb_weight_rows_f32(const struct mb_weight *w, int64_t r0, int64_t r1, float *out);

/* ------------------------------------------------------------------------------------------------ */
/* CUDA device basics                                                                               */

/* 1 when this binary was compiled with CUDA. */
int mb_cuda_built(void);
/* Probe the GPU: 0 and the device name when one is usable, MB_ENOCUDA otherwise (never crashes). */
int mb_cuda_probe(char *name, size_t name_len);
/* Load cuBLAS and cuSOLVER (dlopen'd on first GPU use, so CPU-only runs never map them): 0 when every
 * symbol mixbit calls resolves. Needs no GPU. */
int mb_cuda_libs_check(void);
/* Free and total device memory in bytes */
int mb_cuda_mem_info(size_t *free_bytes, size_t *total_bytes);

/* ---- device memory and streams (thin wrappers so C code and tests need no CUDA headers) ---- */
int mb_cuda_malloc(void **p, size_t bytes);
void mb_cuda_free(void *p);
int mb_cuda_h2d(void *dst_d, const void *src, size_t bytes);
int mb_cuda_d2h(void *dst, const void *src_d, size_t bytes);
int mb_cuda_memset(void *p_d, int byte, size_t bytes);
int mb_cuda_sync(void);
/* Device-to-device copy bandwidth: bytes read + written per second, median of `iters` copies of `bytes`. */
int mb_cuda_copy_bandwidth(size_t bytes, int iters, double *gb_per_s);

/* ------------------------------------------------------------------------------------------------ */
/* EXL2 layers on the GPU                                                                           */
/*
 * Upload keeps q_weight in the file's plain layout and adds, built on the GPU at load: the fp16 scale of
 * every (group, column), the 32-row chunk table (core/exl2_layout.h) and the permutation.
 * Kernels (three layers each: __global__ kernel -> launcher with a stream -> the entries below):
 *   dequant      W^T [K, N] fp16 in original row order (the runtime's fp16 rounding of (q - z) * scale)
 *   gemm_small   y [M, N] = x [M, K] @ W^T for M <= 32, reading the packed weights directly; split over K
 *                with per-split partial sums reduced in a fixed order (bit-identical between runs)
 *   gemm_large   dequant to a scratch fp16 matrix + cuBLAS (fp16 in, f32 accumulate)
 *   gemm         picks one of the two by M
 * CPU references: mb_exl2_ref_dequant_f16 and mb_exl2_ref_gemm below. The cuBLAS handle and the scratch
 * buffers belong to the per-device context (kernels/device.cu), not to a layer. */
struct mb_exl2_dev;
/* The layer must be valid (mb_exl2_validate). */
int mb_exl2_dev_upload(const struct mb_exl2_layer *L, struct mb_exl2_dev **out);
void mb_exl2_dev_free(struct mb_exl2_dev *d);
int mb_exl2_dev_dequant(const struct mb_exl2_dev *d, uint16_t *wt_d, void *stream);
int mb_exl2_dev_gemm_small(const struct mb_exl2_dev *d, const uint16_t *x_d, int64_t M, void *y_d, int y_f32, void *stream);
int mb_exl2_dev_gemm_large(const struct mb_exl2_dev *d, const uint16_t *x_d, int64_t M, void *y_d, int y_f32, void *stream);
int mb_exl2_dev_gemm(const struct mb_exl2_dev *d, const uint16_t *x_d, int64_t M, void *y_d, int y_f32, void *stream);
/* cuBLAS fp16 reference GEMM: y [M, N] = x [M, K] @ wt [K, N] (row-major, fp16 in, f32 accumulate) */
int mb_cuda_gemm_f16(const uint16_t *x_d, const uint16_t *wt_d, int64_t M, int64_t K, int64_t N, void *y_d, int y_f32, void *stream);

/* ---- GPTQ on the GPU: the twin of quant/gptq.c (mb_gptq_prepare / mb_gptq_run), same algorithm and outputs ----
 * prepare: H_d [K, K] f64 upper (row-major; a CUDA-table Hessian) / count, act order by the diagonal (sorted on
 *   the host, as the CPU does), damping retried up to max_tries times, cuSOLVER Cholesky / inverse / Cholesky
 *   in f64, U kept in f32 on the device; perm [Kp] and the damping used go to the host.
 * run: W (a device view: F32 / F16 / BF16) in act order, per group the scale search (97 multipliers, the
 *   same |err|^3.5 rule, fixed-order sums) and the column loop (one thread per output column, the CPU's
 *   float operations in the same order), the lazy block update with cuBLAS; q [Kp, N], qs [G, N] and
 *   scale_max [G] go to the host for packing. */
struct mb_gptq_dev;
int mb_gptq_cuda_prepare(const double *H_d, int64_t K, int64_t count, double damp, int max_tries, int rtn, const char *name, struct mb_gptq_dev **out,
                         int32_t *perm, double *damp_used);
void mb_gptq_cuda_free(struct mb_gptq_dev *d);
int mb_gptq_cuda_run(const struct mb_gptq_dev *d, const struct mb_weight *w, int G, const int *gbits, const int64_t *grows, int rtn, uint8_t *q, uint8_t *qs,
                     uint16_t *scale_max, const char *name);

/* CPU references (no GPU needed): the same results computed on the host */
int mb_exl2_ref_dequant_f16(const struct mb_exl2_layer *L, uint16_t *wt);                    /* wt [K, N] */
int mb_exl2_ref_gemm(const struct mb_exl2_layer *L, const uint16_t *x, int64_t M, float *y); /* f64 accumulate */

#endif
