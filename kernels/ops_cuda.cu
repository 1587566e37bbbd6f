/* kernels/ops_cuda.cu: the CUDA operations table (kernels.h), the twin of ops_cpu.c, on the per-device
 * context (cuda_ctx.cuh): one compute stream, a copy stream for weight uploads, cuBLAS.
 *
 * Precision follows the CPU table: activations f32, products in f32 (cublasSgemm, CUBLAS_COMPUTE_32F, no
 * TF32), weights in their stored dtype on the device and converted to f32 (EXL2: dequantized exactly) into a
 * scratch tile just before each product; log-sum-exp, norms and errors accumulate in f64. Results match the
 * CPU table to rounding (the summation order differs), and are bit-identical between runs (no atomics on
 * floating-point values; every reduction has a fixed tree).
 *
 * Weights: weight_load copies a host view (the safetensors mapping, packed EXL2 tensors) to the device. With
 * async != 0 the copy is queued to a loader thread that stages the bytes through two pinned buffers and the
 * copy stream, so the next layer uploads while the current one computes; the first compute use waits for it.
 *
 * Errors: kernels are queued without waiting; a launch error is kept and returned by the next op that
 * returns a status (find_nonfinite runs after every module, so a failure names the module). */
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "kernels.h"
}
#include "cuda_ctx.cuh"

/* scratch slots of the context used here (0 and 1 belong to the EXL2 GEMM kernels) */
#define SLOT_WEIGHT 2 /* f32 weight tile */
#define SLOT_MISC 3   /* ids, f64 blocks, attention scores */

/* f32 elements of a weight tile: 64M floats = 256 MB */
#define TILE_FLOATS ((int64_t)64 << 20)

static cudaError_t g_pending = cudaSuccess; /* first asynchronous error not yet reported */

static void note(cudaError_t e) {
    if (e != cudaSuccess && g_pending == cudaSuccess) g_pending = e;
}

static int take_pending(const char *what) {
    note(cudaGetLastError());
    if (g_pending == cudaSuccess) return 0;
    cudaError_t e = g_pending;
    g_pending = cudaSuccess;
    return mb_fail(MB_ENOCUDA, "%s: CUDA error: %s", what, cudaGetErrorString(e));
}

static struct mb_cuda_ctx *ctx(void) { return mb_cuda_ctx(); }
static cudaStream_t stream(void) { return ctx()->stream; }

static unsigned blocks(int64_t n, int t) { return (unsigned)((n + t - 1) / t); }

/* ---------------------------------------------------------------------------------------------- */
/* buffers                                                                                         */

static void *cu_alloc(size_t bytes) {
    void *p = NULL;
    if (!ctx()) return NULL;
    cudaError_t e = cudaMallocAsync(&p, bytes ? bytes : 256, stream());
    if (e != cudaSuccess) {
        mb_fail(MB_ENOMEM, "out of device memory: %zu bytes requested: %s", bytes, cudaGetErrorString(e));
        cudaGetLastError();
        return NULL;
    }
    return p;
}

static void cu_free(void *p) {
    if (p) note(cudaFreeAsync(p, stream()));
}

static int cu_upload(void *dst, const void *src, size_t bytes) {
    if (!bytes) return 0;
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream());
    if (e == cudaSuccess) e = cudaStreamSynchronize(stream()); /* the host buffer may be reused at once */
    return e == cudaSuccess ? take_pending("upload") : mb_fail(MB_ENOCUDA, "copy of %zu bytes to the device: %s", bytes, cudaGetErrorString(e));
}

static int cu_download(void *dst, const void *src, size_t bytes) {
    if (!bytes) return 0;
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream());
    if (e == cudaSuccess) e = cudaStreamSynchronize(stream());
    return e == cudaSuccess ? take_pending("download") : mb_fail(MB_ENOCUDA, "copy of %zu bytes from the device: %s", bytes, cudaGetErrorString(e));
}

static void cu_copy(void *dst, const void *src, size_t bytes) {
    if (bytes && dst != src) note(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream()));
}

static void cu_zero(void *p, size_t bytes) {
    if (bytes) note(cudaMemsetAsync(p, 0, bytes, stream()));
}

static int cu_sync(void) {
    cudaError_t e = cudaStreamSynchronize(stream());
    note(e);
    return take_pending("device");
}

/* ---------------------------------------------------------------------------------------------- */
/* weights: the loader thread                                                                      */

#define STAGE_BYTES ((size_t)64 << 20)

/* one host -> device copy job */
struct copy_job {
    const void *src;
    void *dst;
    size_t bytes;
    struct copy_job *next;
};

/* the device form of one weight (mb_weight.priv) */
struct dev_weight {
    void *mem;            /* one device allocation holding every array of the weight */
    size_t bytes;
    struct copy_job *jobs;
    int queued;           /* handed to the loader thread */
    int submitted;        /* all copies queued on the copy stream and `ready` recorded */
    cudaEvent_t ready;
    struct dev_weight *qnext; /* loader queue */
    /* EXL2: chunk table and permutation, built at load */
    struct mb_exl2_chunk *chunks;
    int32_t *perm;
    int64_t nchunks;
};

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static struct {
    pthread_t thread;
    struct dev_weight *head, *tail;
    int started;
    void *stage[2];
    cudaEvent_t stage_free[2];
    int cur;
    cudaError_t err;
} L;

/* copy the jobs of w through the pinned staging buffers on the copy stream, record w->ready */
static void run_copies(struct dev_weight *w) {
    cudaStream_t cs = ctx()->copy_stream;
    for (struct copy_job *j = w->jobs; j; j = j->next)
        for (size_t o = 0; o < j->bytes; o += STAGE_BYTES) {
            size_t n = j->bytes - o < STAGE_BYTES ? j->bytes - o : STAGE_BYTES;
            int b = L.cur;
            L.cur ^= 1;
            cudaError_t e = cudaEventSynchronize(L.stage_free[b]); /* the previous copy out of this buffer is done */
            memcpy(L.stage[b], (const char *)j->src + o, n);     /* reads the mapping: page faults happen here */
            if (e == cudaSuccess) e = cudaMemcpyAsync((char *)j->dst + o, L.stage[b], n, cudaMemcpyHostToDevice, cs);
            if (e == cudaSuccess) e = cudaEventRecord(L.stage_free[b], cs);
            if (e != cudaSuccess && L.err == cudaSuccess) L.err = e;
        }
    cudaError_t e = cudaEventRecord(w->ready, cs);
    if (e != cudaSuccess && L.err == cudaSuccess) L.err = e;
}

static void *loader_main(void *arg) {
    (void)arg;
    cudaSetDevice(ctx()->device);
    pthread_mutex_lock(&g_mu);
    for (;;) {
        while (!L.head) pthread_cond_wait(&g_cv, &g_mu);
        struct dev_weight *w = L.head;
        L.head = w->qnext;
        if (!L.head) L.tail = NULL;
        pthread_mutex_unlock(&g_mu);
        run_copies(w);
        pthread_mutex_lock(&g_mu);
        w->submitted = 1;
        pthread_cond_broadcast(&g_cv);
    }
    return NULL;
}

static int loader_start(void) {
    if (L.started) return 0;
    for (int b = 0; b < 2; b++) {
        if (cudaMallocHost(&L.stage[b], STAGE_BYTES) != cudaSuccess) return mb_fail(MB_ENOMEM, "cannot pin %zu bytes of host memory for weight uploads", STAGE_BYTES);
        if (cudaEventCreateWithFlags(&L.stage_free[b], cudaEventDisableTiming) != cudaSuccess) return mb_fail(MB_ENOCUDA, "cudaEventCreate failed");
    }
    if (pthread_create(&L.thread, NULL, loader_main, NULL)) return mb_fail(MB_ENOCUDA, "cannot start the weight loader thread");
    pthread_detach(L.thread);
    L.started = 1;
    return 0;
}

/* the compute stream waits until w's copies are queued and complete on the device */
static int weight_wait(const struct mb_weight *w) {
    struct dev_weight *d = (struct dev_weight *)w->priv;
    if (!d) return 0;
    pthread_mutex_lock(&g_mu);
    while (!d->submitted) pthread_cond_wait(&g_cv, &g_mu);
    cudaError_t le = L.err;
    pthread_mutex_unlock(&g_mu);
    if (le != cudaSuccess) return mb_fail(MB_ENOCUDA, "uploading %s: %s", w->name ? w->name : "a weight", cudaGetErrorString(le));
    cudaError_t e = cudaStreamWaitEvent(stream(), d->ready, 0);
    return e == cudaSuccess ? 0 : mb_fail(MB_ENOCUDA, "waiting for %s: %s", w->name ? w->name : "a weight", cudaGetErrorString(e));
}

static int add_job(struct dev_weight *d, const void *src, void *dst, size_t bytes) {
    struct copy_job *j = (struct copy_job *)calloc(1, sizeof *j);
    if (!j) return mb_fail(MB_ENOMEM, "out of memory");
    j->src = src;
    j->dst = dst;
    j->bytes = bytes;
    j->next = d->jobs;
    d->jobs = j;
    return 0;
}

static void dev_weight_free(struct dev_weight *d) {
    if (!d) return;
    pthread_mutex_lock(&g_mu);
    while (d->queued && !d->submitted) pthread_cond_wait(&g_cv, &g_mu);
    pthread_mutex_unlock(&g_mu);
    if (d->ready) {
        cudaStreamWaitEvent(stream(), d->ready, 0); /* frees are stream-ordered after the copies */
        cudaEventDestroy(d->ready);
    }
    cu_free(d->mem);
    while (d->jobs) { struct copy_job *n = d->jobs->next; free(d->jobs); d->jobs = n; }
    free(d);
}

static size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

static int cu_weight_load(struct mb_weight *out, const struct mb_weight *host, int async) {
    int rc = 0;
    *out = *host;
    out->priv = NULL;
    if (!ctx()) return mb_fail(MB_ENOCUDA, "no CUDA device: %s", mb_errmsg());
    if (host->device) return mb_fail(MB_EINVAL, "%s: already a device weight", host->name ? host->name : "weight");
    if ((rc = loader_start())) return rc;
    struct dev_weight *d = (struct dev_weight *)calloc(1, sizeof *d);
    if (!d) return mb_fail(MB_ENOMEM, "out of memory");
    if (cudaEventCreateWithFlags(&d->ready, cudaEventDisableTiming) != cudaSuccess) { free(d); return mb_fail(MB_ENOCUDA, "cudaEventCreate failed"); }
    if (host->type != MB_W_EXL2) {
        d->bytes = mb_weight_bytes(host);
        if (!(d->mem = cu_alloc(d->bytes))) { rc = mb_fail_ctx(MB_ENOMEM, "loading %s", host->name ? host->name : "a weight"); goto fail; }
        if ((rc = add_job(d, host->data, d->mem, d->bytes))) goto fail;
        out->data = d->mem;
    } else {
        const struct mb_exl2_layer *q = &host->q;
        size_t b_w = (size_t)(q->P * q->Np) * 4, b_s = (size_t)(q->G * q->Np / 8) * 4, b_m = (size_t)q->G * 2, b_g = (size_t)q->G * 4, b_i = (size_t)q->Kp * 4;
        d->nchunks = q->Kp / MB_EXL2_CHUNK;
        size_t b_c = (size_t)d->nchunks * sizeof(struct mb_exl2_chunk), b_p = (size_t)q->Kp * 4;
        size_t o_w = 0, o_s = align256(o_w + b_w), o_m = align256(o_s + b_s), o_g = align256(o_m + b_m), o_i = align256(o_g + b_g),
               o_c = align256(o_i + b_i), o_p = align256(o_c + b_c);
        d->bytes = o_p + b_p;
        if (!(d->mem = cu_alloc(d->bytes))) { rc = mb_fail_ctx(MB_ENOMEM, "loading %s", host->name ? host->name : "an EXL2 layer"); goto fail; }
        char *m = (char *)d->mem;
        /* the chunk table and the permutation are small: built on the host, copied with the rest */
        struct mb_exl2_chunk *ch = (struct mb_exl2_chunk *)malloc(b_c + b_p + 1);
        if (!ch) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto fail; }
        int32_t *perm = (int32_t *)((char *)ch + b_c);
        mb_exl2_chunks(q, ch);
        for (int64_t i = 0; i < q->Kp; i++) perm[mb_exl2_u32(q->q_invperm, i)] = (int32_t)i;
        /* these two are synchronous (the host arrays are freed right away) */
        cudaError_t e = cudaMemcpyAsync(m + o_c, ch, b_c, cudaMemcpyHostToDevice, stream());
        if (e == cudaSuccess) e = cudaMemcpyAsync(m + o_p, perm, b_p, cudaMemcpyHostToDevice, stream());
        if (e == cudaSuccess) e = cudaStreamSynchronize(stream());
        free(ch);
        if (e != cudaSuccess) { rc = mb_fail(MB_ENOCUDA, "uploading an EXL2 table: %s", cudaGetErrorString(e)); goto fail; }
        if ((rc = add_job(d, q->q_weight, m + o_w, b_w)) || (rc = add_job(d, q->q_scale, m + o_s, b_s)) || (rc = add_job(d, q->q_scale_max, m + o_m, b_m)) ||
            (rc = add_job(d, q->q_groups, m + o_g, b_g)) || (rc = add_job(d, q->q_invperm, m + o_i, b_i)))
            goto fail;
        out->q.q_weight = m + o_w;
        out->q.q_scale = m + o_s;
        out->q.q_scale_max = m + o_m;
        out->q.q_groups = m + o_g;
        out->q.q_invperm = m + o_i;
        out->q.bias = NULL;
        d->chunks = (struct mb_exl2_chunk *)(m + o_c);
        d->perm = (int32_t *)(m + o_p);
    }
    /* the allocation is stream-ordered on the compute stream: the copy stream must see it */
    {
        cudaEvent_t ev;
        cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
        cudaEventRecord(ev, stream());
        cudaStreamWaitEvent(ctx()->copy_stream, ev, 0);
        cudaEventDestroy(ev);
    }
    out->device = 1;
    out->priv = d;
    pthread_mutex_lock(&g_mu);
    d->queued = 1;
    if (L.tail) L.tail->qnext = d; else L.head = d;
    L.tail = d;
    pthread_cond_broadcast(&g_cv);
    pthread_mutex_unlock(&g_mu);
    if (!async) return weight_wait(out);
    return 0;
fail:
    dev_weight_free(d);
    memset(out, 0, sizeof *out);
    return rc;
}

static void cu_weight_release(struct mb_weight *w) {
    dev_weight_free((struct dev_weight *)w->priv);
    memset(w, 0, sizeof *w);
}

/* ---------------------------------------------------------------------------------------------- */
/* weights as f32 tiles                                                                            */

/* rows [n0, n1) of a float weight [N, K] as f32 */
template <typename T>
static __global__ void to_f32_kernel(const T *w, int64_t n, float *out) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < n) out[i] = (float)w[i];
}

static void launch_to_f32(const struct mb_weight *w, int64_t n0, int64_t n1, float *out, cudaStream_t s) {
    int64_t n = (n1 - n0) * w->k, off = n0 * w->k;
    if (w->type == MB_W_F32) note(cudaMemcpyAsync(out, (const float *)w->data + off, (size_t)n * 4, cudaMemcpyDeviceToDevice, s));
    else if (w->type == MB_W_BF16) to_f32_kernel<__nv_bfloat16><<<blocks(n, 256), 256, 0, s>>>((const __nv_bfloat16 *)w->data + off, n, out);
    else to_f32_kernel<__half><<<blocks(n, 256), 256, 0, s>>>((const __half *)w->data + off, n, out);
}

/* EXL2 rows [n0, n1) of W [N, K] (columns of the stored W^T) as f32, exact: one thread per (column, chunk) */
static __global__ void exl2_rows_kernel(const uint32_t *qw, const uint32_t *qscale, const uint16_t *smax, const struct mb_exl2_chunk *chunks,
                                        const int32_t *perm, int64_t nchunks, int64_t K, int64_t Np, int64_t n0, int64_t n1, float *out) {
    int64_t n = n0 + blockIdx.x * (int64_t)blockDim.x + threadIdx.x, c = blockIdx.y;
    if (n >= n1 || c >= nchunks) return;
    struct mb_exl2_chunk ch = chunks[c];
    uint32_t w[8];
    int q[32];
    for (int i = 0; i < ch.bits; i++) w[i] = qw[((int64_t)ch.word_row + i) * Np + n];
    mb_exl2_decode32(ch.bits, w, q);
    int code = (int)((qscale[(int64_t)ch.group * (Np / 8) + n / 8] >> (4 * (n % 8))) & 15);
    float sc = mb_exl2_scale(code, smax[ch.group]);
    int z = 1 << (ch.bits - 1);
    float *o = out + (n - n0) * K;
    for (int i = 0; i < 32; i++) {
        int64_t orig = perm[ch.row + i];
        if (orig < K) o[orig] = (float)(q[i] - z) * sc;
    }
}

static void launch_exl2_rows(const struct mb_weight *w, int64_t n0, int64_t n1, float *out, cudaStream_t s) {
    const struct dev_weight *d = (const struct dev_weight *)w->priv;
    dim3 grid(blocks(n1 - n0, 128), (unsigned)d->nchunks);
    exl2_rows_kernel<<<grid, 128, 0, s>>>((const uint32_t *)w->q.q_weight, (const uint32_t *)w->q.q_scale, (const uint16_t *)w->q.q_scale_max, d->chunks, d->perm,
                                         d->nchunks, w->k, w->q.Np, n0, n1, out);
}

/* ---------------------------------------------------------------------------------------------- */
/* matmul                                                                                          */

/* row-major y [M, N] (+)= x [M, K] @ W^T with W [N, K]  <=>  column-major y^T [N, M] = W [N, K] (col-major
 * W^T, transposed) @ x^T [K, M] */
static int sgemm_nt(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K, int64_t ldy, float beta) {
    const float alpha = 1.0f;
    mb_cu.set_stream(ctx()->blas, stream()); /* the EXL2 entries may have left the handle on another stream */
    cublasStatus_t st = mb_cu.sgemm(ctx()->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)M, (int)K, &alpha, w, (int)K, x, (int)K, &beta, y, (int)ldy);
    return st == CUBLAS_STATUS_SUCCESS ? 0 : mb_fail(MB_ENOCUDA, "cublasSgemm failed (status %d, %lld x %lld x %lld)", (int)st, (long long)M, (long long)N, (long long)K);
}

static int cu_matmul(float *y, const float *x, const struct mb_weight *w, int64_t M, int accumulate) {
    int64_t N = w->n, K = w->k;
    int rc;
    if (!w->device) return mb_fail(MB_EINVAL, "%s: weight not loaded for the GPU", w->name ? w->name : "weight");
    if ((rc = take_pending(w->name ? w->name : "matmul")) || (rc = weight_wait(w))) return rc;
    if (M == 0 || N == 0) return 0;
    if (K == 0) { if (!accumulate) cu_zero(y, (size_t)(M * N) * 4); return 0; }
    cudaStream_t s = stream();
    if (w->type == MB_W_F32) return sgemm_nt(x, (const float *)w->data, y, M, N, K, N, accumulate ? 1.0f : 0.0f);
    int64_t nb = TILE_FLOATS / K;
    if (nb < 1) return mb_fail(MB_ERANGE, "%s: %lld inputs exceed the GPU weight tile", w->name ? w->name : "weight", (long long)K);
    if (nb > N) nb = N;
    float *tile = (float *)mb_cuda_scratch(ctx(), SLOT_WEIGHT, (size_t)(nb * K) * 4);
    if (!tile) return mb_fail_ctx(MB_ENOMEM, "%s", w->name ? w->name : "matmul");
    for (int64_t n0 = 0; n0 < N; n0 += nb) {
        int64_t n1 = n0 + nb < N ? n0 + nb : N;
        if (w->type == MB_W_EXL2) launch_exl2_rows(w, n0, n1, tile, s);
        else launch_to_f32(w, n0, n1, tile, s);
        if ((rc = sgemm_nt(x, tile, y + n0, M, n1 - n0, K, N, accumulate ? 1.0f : 0.0f))) return rc;
    }
    return take_pending(w->name ? w->name : "matmul");
}

/* ---------------------------------------------------------------------------------------------- */
/* embeddings, norms, rope, attention, elementwise                                                  */

template <typename T>
static __global__ void embed_kernel(const T *table, const int32_t *ids, int64_t M, int64_t H, float *x) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= M * H) return;
    int64_t r = i / H, c = i % H;
    x[i] = (float)table[(int64_t)ids[r] * H + c];
}

static int cu_embed(float *x, const struct mb_weight *table, const int32_t *ids, int64_t M) {
    int64_t H = table->k;
    int rc;
    for (int64_t i = 0; i < M; i++)
        if (ids[i] < 0 || ids[i] >= table->n) return mb_fail(MB_ERANGE, "token id %d outside the model's vocabulary (%lld)", ids[i], (long long)table->n);
    if ((rc = weight_wait(table))) return rc;
    int32_t *ids_d = (int32_t *)mb_cuda_scratch(ctx(), SLOT_MISC, (size_t)M * 4);
    if (!ids_d) return MB_ENOMEM;
    if ((rc = cu_upload(ids_d, ids, (size_t)M * 4))) return rc;
    cudaStream_t s = stream();
    unsigned g = blocks(M * H, 256);
    switch (table->type) {
    case MB_W_F32: embed_kernel<float><<<g, 256, 0, s>>>((const float *)table->data, ids_d, M, H, x); break;
    case MB_W_BF16: embed_kernel<__nv_bfloat16><<<g, 256, 0, s>>>((const __nv_bfloat16 *)table->data, ids_d, M, H, x); break;
    case MB_W_F16: embed_kernel<__half><<<g, 256, 0, s>>>((const __half *)table->data, ids_d, M, H, x); break;
    default: return mb_fail(MB_EUNSUPPORTED, "EXL2 embeddings");
    }
    return take_pending("embed");
}

static int cu_vector_load(float **out, const struct mb_weight *host) {
    int64_t n = host->n * host->k;
    float *h = (float *)malloc((size_t)n * 4);
    if (!h) return mb_fail(MB_ENOMEM, "out of memory");
    int rc = mb_weight_rows_f32(host, 0, host->n, h);
    *out = rc ? NULL : (float *)cu_alloc((size_t)n * 4);
    if (!rc && !*out) rc = MB_ENOMEM;
    if (!rc && (rc = cu_upload(*out, h, (size_t)n * 4))) { cu_free(*out); *out = NULL; }
    free(h);
    return rc;
}

/* one block per row: sum of squares in f64 (fixed tree), then scale */
static __global__ void rmsnorm_kernel(float *out, const float *x, const float *w, int64_t H, float eps) {
    __shared__ double part[256];
    const float *r = x + blockIdx.x * H;
    float *o = out + blockIdx.x * H;
    double ss = 0;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) ss += (double)r[j] * r[j];
    part[threadIdx.x] = ss;
    __syncthreads();
    for (int st = blockDim.x / 2; st > 0; st >>= 1) {
        if ((int)threadIdx.x < st) part[threadIdx.x] += part[threadIdx.x + st];
        __syncthreads();
    }
    float s = (float)(1.0 / sqrt(part[0] / H + eps));
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) o[j] = r[j] * s * w[j];
}

static void cu_rmsnorm(float *out, const float *x, const float *w, int64_t M, int64_t H, float eps) {
    if (M > 0) rmsnorm_kernel<<<(unsigned)M, 256, 0, stream()>>>(out, x, w, H, eps);
}

static __global__ void rope_tables_kernel(float *cos_t, float *sin_t, const double *inv, int64_t half, int64_t T) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= half * T) return;
    int64_t t = i / half, j = i % half;
    double a = (double)t * inv[j];
    cos_t[i] = (float)cos(a);
    sin_t[i] = (float)sin(a);
}

static int cu_rope_tables(float *cos_t, float *sin_t, const double *inv, int64_t half, int64_t T) {
    double *inv_d = (double *)mb_cuda_scratch(ctx(), SLOT_MISC, (size_t)half * 8);
    if (!inv_d) return MB_ENOMEM;
    int rc = cu_upload(inv_d, inv, (size_t)half * 8);
    if (rc) return rc;
    rope_tables_kernel<<<blocks(half * T, 256), 256, 0, stream()>>>(cos_t, sin_t, inv_d, half, T);
    return take_pending("rope tables");
}

static __global__ void rope_kernel(float *x, int64_t rows, int64_t T, int64_t nh, int64_t hd, const float *cos_t, const float *sin_t) {
    int64_t half = hd / 2, i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= rows * nh * half) return;
    int64_t j = i % half, h = (i / half) % nh, r = i / (half * nh), t = r % T;
    float *v = x + (r * nh + h) * hd;
    float c = cos_t[t * half + j], s = sin_t[t * half + j], a = v[j], b = v[j + half];
    v[j] = a * c - b * s;
    v[j + half] = b * c + a * s;
}

static void cu_rope(float *x, int64_t S, int64_t T, int64_t nh, int64_t hd, const float *cos_t, const float *sin_t) {
    int64_t n = S * T * nh * (hd / 2);
    if (n > 0) rope_kernel<<<blocks(n, 256), 256, 0, stream()>>>(x, S * T, T, nh, hd, cos_t, sin_t);
}

/* causal (sliding-window) softmax of score rows in place: row i of each [T, T] block keeps keys lo..i */
static __global__ void softmax_causal_kernel(float *sc, int64_t T, int64_t window) {
    __shared__ float red[256];
    int64_t i = blockIdx.x, b = blockIdx.y;
    float *row = sc + (b * T + i) * T;
    int64_t lo = window > 0 && i - window + 1 > 0 ? i - window + 1 : 0;
    float mx = -INFINITY;
    for (int64_t j = lo + threadIdx.x; j <= i; j += blockDim.x) mx = fmaxf(mx, row[j]);
    red[threadIdx.x] = mx;
    __syncthreads();
    for (int st = blockDim.x / 2; st > 0; st >>= 1) {
        if ((int)threadIdx.x < st) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + st]);
        __syncthreads();
    }
    mx = red[0];
    __syncthreads();
    float sum = 0;
    for (int64_t j = lo + threadIdx.x; j <= i; j += blockDim.x) sum += expf(row[j] - mx);
    red[threadIdx.x] = sum;
    __syncthreads();
    for (int st = blockDim.x / 2; st > 0; st >>= 1) {
        if ((int)threadIdx.x < st) red[threadIdx.x] += red[threadIdx.x + st];
        __syncthreads();
    }
    float inv = 1.0f / red[0];
    for (int64_t j = threadIdx.x; j < T; j += blockDim.x) row[j] = j >= lo && j <= i ? expf(row[j] - mx) * inv : 0.0f;
}

/* Per sequence and head: scores = q k^T / sqrt(hd) (cuBLAS, one batched call per sequence chunk), masked
 * softmax, out = P v. Scores of as many sequences as fit in the scratch slot (at most 1 GB) at a time. */
static void cu_attention(float *out, const float *q, const float *k, const float *v, int64_t S, int64_t T, int64_t nh, int64_t nkv, int64_t hd,
                         int64_t window) {
    int64_t group = nh / nkv, qs = nh * hd, ks = nkv * hd;
    float scale = 1.0f / sqrtf((float)hd), zero = 0.0f, one = 1.0f;
    int64_t per_seq = nh * T * T, seqs = ((int64_t)256 << 20) / (per_seq > 0 ? per_seq : 1);
    if (seqs < 1) seqs = 1;
    if (seqs > S) seqs = S;
    size_t nptr = (size_t)(seqs * nh);
    size_t sc_bytes = ((size_t)(seqs * per_seq) * 4 + 255) & ~(size_t)255;
    float *sc = (float *)mb_cuda_scratch(ctx(), SLOT_MISC, sc_bytes + nptr * 3 * sizeof(void *) * 2);
    if (!sc) { note(cudaErrorMemoryAllocation); return; }
    const float **pa = (const float **)malloc(nptr * 3 * sizeof(void *) * 2);
    if (!pa) { note(cudaErrorMemoryAllocation); return; }
    const float **pb = pa + nptr, **pc = pb + nptr;
    void **dev_ptrs = (void **)((char *)sc + sc_bytes);
    cublasHandle_t hb = ctx()->blas;
    mb_cu.set_stream(hb, stream());
    for (int64_t s0 = 0; s0 < S; s0 += seqs) {
        int64_t ns = S - s0 < seqs ? S - s0 : seqs, nb = ns * nh;
        /* scores^T (column-major [T keys, T queries]) = Kc^T Qc, Kc = k as column-major [hd, T] */
        for (int64_t s = 0; s < ns; s++)
            for (int64_t h = 0; h < nh; h++) {
                int64_t b = s * nh + h;
                pa[b] = k + ((s0 + s) * T) * ks + (h / group) * hd;
                pb[b] = q + ((s0 + s) * T) * qs + h * hd;
                pc[b] = sc + b * T * T;
            }
        note(cudaMemcpyAsync(dev_ptrs, pa, nptr * 3 * sizeof(void *), cudaMemcpyHostToDevice, stream()));
        const float **da = (const float **)dev_ptrs, **db = da + nptr;
        float **dc = (float **)(db + nptr);
        cublasStatus_t st = mb_cu.sgemm_batched(hb, CUBLAS_OP_T, CUBLAS_OP_N, (int)T, (int)T, (int)hd, &scale, da, (int)ks, db, (int)qs, &zero, dc, (int)T, (int)nb);
        if (st != CUBLAS_STATUS_SUCCESS) { note(cudaErrorLaunchFailure); break; }
        softmax_causal_kernel<<<dim3((unsigned)T, (unsigned)nb), 256, 0, stream()>>>(sc, T, window);
        /* out_c [hd, T] = Vc [hd, T] @ Pc [T, T] */
        for (int64_t s = 0; s < ns; s++)
            for (int64_t h = 0; h < nh; h++) {
                int64_t b = s * nh + h;
                pa[b] = v + ((s0 + s) * T) * ks + (h / group) * hd;
                pb[b] = sc + b * T * T;
                pc[b] = out + ((s0 + s) * T) * qs + h * hd;
            }
        note(cudaMemcpyAsync(dev_ptrs + 3 * nptr, pa, nptr * 3 * sizeof(void *), cudaMemcpyHostToDevice, stream()));
        da = (const float **)(dev_ptrs + 3 * nptr);
        db = da + nptr;
        dc = (float **)(db + nptr);
        st = mb_cu.sgemm_batched(hb, CUBLAS_OP_N, CUBLAS_OP_N, (int)hd, (int)T, (int)T, &one, da, (int)ks, db, (int)T, &zero, dc, (int)qs, (int)nb);
        if (st != CUBLAS_STATUS_SUCCESS) { note(cudaErrorLaunchFailure); break; }
        note(cudaStreamSynchronize(stream())); /* the host pointer arrays are rewritten next round */
    }
    free(pa);
}

static __global__ void swiglu_kernel(float *g, const float *u, int64_t n) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < n) { float x = g[i]; g[i] = x / (1.0f + expf(-x)) * u[i]; }
}
static void cu_swiglu(float *g, const float *u, int64_t n) { if (n > 0) swiglu_kernel<<<blocks(n, 256), 256, 0, stream()>>>(g, u, n); }

static __global__ void add_kernel(float *x, const float *y, int64_t n) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}
static void cu_add(float *x, const float *y, int64_t n) { if (n > 0) add_kernel<<<blocks(n, 256), 256, 0, stream()>>>(x, y, n); }

/* ---------------------------------------------------------------------------------------------- */
/* sparse MoE                                                                                      */

static __global__ void moe_route_kernel(int32_t *sel, float *wsel, float *probs, const float *logits, int64_t M, int E, int K) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= M) return;
    const float *lg = logits + i * E;
    float *pr = probs + i * E;
    int32_t *s = sel + i * K;
    float *ws = wsel + i * K;
    float mx = lg[0];
    for (int e = 1; e < E; e++) mx = fmaxf(mx, lg[e]);
    double sum = 0;
    for (int e = 0; e < E; e++) { pr[e] = expf(lg[e] - mx); sum += pr[e]; }
    for (int e = 0; e < E; e++) pr[e] = (float)(pr[e] / sum);
    double wsum = 0;
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int used = 0;
            for (int j = 0; j < k; j++) used |= s[j] == e;
            if (!used && (best < 0 || pr[e] > pr[best])) best = e;
        }
        s[k] = best;
        ws[k] = pr[best];
        wsum += pr[best];
    }
    for (int k = 0; k < K; k++) ws[k] = (float)(ws[k] / wsum);
}

static void cu_moe_route(int32_t *sel, float *wsel, float *probs, const float *logits, int64_t M, int E, int K) {
    if (M > 0) moe_route_kernel<<<blocks(M, 128), 128, 0, stream()>>>(sel, wsel, probs, logits, M, E, K);
}

/* rows routed to expert e, ascending: one block; each thread counts a contiguous segment, a scan gives the
 * offsets, then each thread writes its segment in order. count[0] = rows found. */
static __global__ void moe_rows_kernel(int32_t *rowidx, float *roww, const int32_t *sel, const float *wsel, int64_t M, int K, int e, int64_t *count) {
    __shared__ int64_t pre[1024];
    int64_t seg = (M + blockDim.x - 1) / blockDim.x, a = threadIdx.x * seg, b = a + seg < M ? a + seg : M;
    int64_t c = 0;
    for (int64_t i = a; i < b; i++)
        for (int k = 0; k < K; k++) c += sel[i * K + k] == e;
    pre[threadIdx.x] = c;
    __syncthreads();
    if (threadIdx.x == 0) {
        int64_t acc = 0;
        for (unsigned t = 0; t < blockDim.x; t++) { int64_t x = pre[t]; pre[t] = acc; acc += x; }
        *count = acc;
    }
    __syncthreads();
    int64_t o = pre[threadIdx.x];
    for (int64_t i = a; i < b; i++)
        for (int k = 0; k < K; k++)
            if (sel[i * K + k] == e) { rowidx[o] = (int32_t)i; roww[o] = wsel[i * K + k]; o++; }
}

struct rank_ent { float p; int64_t row; };
static int cmp_rank(const void *a, const void *b) {
    const struct rank_ent *x = (const struct rank_ent *)a, *y = (const struct rank_ent *)b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return x->row < y->row ? -1 : x->row > y->row;
}

static int cu_moe_rows(int32_t *rowidx, float *roww, const int32_t *sel, const float *wsel, const float *probs, int64_t M, int E, int K, int e,
                       int64_t min_rows, int64_t *n_routed, int64_t *n_total) {
    int64_t *cnt = (int64_t *)mb_cuda_scratch(ctx(), SLOT_MISC, 8);
    if (!cnt) return MB_ENOMEM;
    moe_rows_kernel<<<1, 1024, 0, stream()>>>(rowidx, roww, sel, wsel, M, K, e, cnt);
    int rc = cu_download(n_routed, cnt, 8);
    if (rc) return rc;
    *n_total = *n_routed;
    if (!(min_rows > *n_routed && *n_routed < M)) return 0;
    /* starved expert (calibration only): rank the unrouted rows on the host, append them with weight 0 */
    int32_t *hs = (int32_t *)malloc((size_t)(M * K) * 4);
    float *hp = (float *)malloc((size_t)(M * E) * 4), *w0 = NULL;
    struct rank_ent *rank = (struct rank_ent *)malloc((size_t)M * sizeof *rank);
    int32_t *extra = (int32_t *)malloc((size_t)M * 4);
    if (!hs || !hp || !rank || !extra) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto out; }
    if ((rc = cu_download(hs, sel, (size_t)(M * K) * 4)) || (rc = cu_download(hp, probs, (size_t)(M * E) * 4))) goto out;
    {
        int64_t nr = 0, n = 0;
        for (int64_t i = 0; i < M; i++) {
            int chosen = 0;
            for (int k = 0; k < K; k++) chosen |= hs[i * K + k] == e;
            if (!chosen) rank[nr++] = (struct rank_ent){hp[i * E + e], i};
        }
        qsort(rank, (size_t)nr, sizeof *rank, cmp_rank);
        for (int64_t j = 0; j < nr && *n_routed + n < min_rows; j++) extra[n++] = (int32_t)rank[j].row;
        if (n) {
            if (!(w0 = (float *)calloc((size_t)n, 4))) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto out; }
            if ((rc = cu_upload(rowidx + *n_routed, extra, (size_t)n * 4)) || (rc = cu_upload(roww + *n_routed, w0, (size_t)n * 4))) goto out;
        }
        *n_total = *n_routed + n;
    }
out:
    free(hs); free(hp); free(rank); free(extra); free(w0);
    return rc;
}

static __global__ void gather_rows_kernel(float *dst, const float *src, const int32_t *idx, int64_t n, int64_t H) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < n * H) dst[i] = src[(int64_t)idx[i / H] * H + i % H];
}
static void cu_gather_rows(float *dst, const float *src, const int32_t *rowidx, int64_t n, int64_t H) {
    if (n > 0) gather_rows_kernel<<<blocks(n * H, 256), 256, 0, stream()>>>(dst, src, rowidx, n, H);
}

static __global__ void scatter_add_kernel(float *dst, const float *src, const int32_t *idx, const float *w, int64_t n, int64_t H) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < n * H) { int64_t j = i / H; dst[(int64_t)idx[j] * H + i % H] += w[j] * src[i]; }
}
static void cu_scatter_add(float *dst, const float *src, const int32_t *rowidx, const float *roww, int64_t n, int64_t H) {
    if (n > 0) scatter_add_kernel<<<blocks(n * H, 256), 256, 0, stream()>>>(dst, src, rowidx, roww, n, H);
}

/* ---------------------------------------------------------------------------------------------- */
/* checks and reductions                                                                           */

static __global__ void nonfinite_kernel(const float *x, int64_t n, unsigned long long *first) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < n && !isfinite(x[i])) atomicMin(first, (unsigned long long)i); /* an integer minimum: order-free */
}

static int cu_find_nonfinite(const float *x, int64_t n, int64_t *index, float *val) {
    *index = -1;
    *val = 0;
    int rc = take_pending("forward pass");
    if (rc) return rc;
    unsigned long long *first = (unsigned long long *)mb_cuda_scratch(ctx(), SLOT_MISC, 8), h = ~0ull;
    if (!first) return MB_ENOMEM;
    if ((rc = cu_upload(first, &h, 8))) return rc;
    if (n > 0) nonfinite_kernel<<<blocks(n, 256), 256, 0, stream()>>>(x, n, first);
    if ((rc = cu_download(&h, first, 8))) return rc;
    if (h != ~0ull) {
        *index = (int64_t)h;
        rc = cu_download(val, x + h, 4);
    }
    return rc;
}

/* one block per row: max (first index on ties), then sum of exp in f64 over a fixed tree */
static __global__ void logit_stats_kernel(const float *logits, int64_t V, const int32_t *tgt, double *lse, float *tlogit, int32_t *argmax) {
    __shared__ float mv[256];
    __shared__ int32_t mi[256];
    __shared__ double sv[256];
    const float *lg = logits + blockIdx.x * V;
    float m = -INFINITY;
    int32_t a = 0x7fffffff;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x)
        if (lg[v] > m) { m = lg[v]; a = (int32_t)v; }
    mv[threadIdx.x] = m;
    mi[threadIdx.x] = a;
    __syncthreads();
    for (int st = blockDim.x / 2; st > 0; st >>= 1) {
        if ((int)threadIdx.x < st) {
            float o = mv[threadIdx.x + st];
            int32_t oi = mi[threadIdx.x + st];
            if (o > mv[threadIdx.x] || (o == mv[threadIdx.x] && oi < mi[threadIdx.x])) { mv[threadIdx.x] = o; mi[threadIdx.x] = oi; }
        }
        __syncthreads();
    }
    float mx = mv[0];
    double se = 0;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) se += exp((double)lg[v] - mx);
    sv[threadIdx.x] = se;
    __syncthreads();
    for (int st = blockDim.x / 2; st > 0; st >>= 1) {
        if ((int)threadIdx.x < st) sv[threadIdx.x] += sv[threadIdx.x + st];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        lse[blockIdx.x] = mx + log(sv[0]);
        if (argmax) argmax[blockIdx.x] = mi[0];
        if (tgt && tlogit) tlogit[blockIdx.x] = lg[tgt[blockIdx.x]];
    }
}

static void cu_logit_stats(const float *logits, int64_t M, int64_t V, const int32_t *tgt, double *lse, float *tlogit, int32_t *argmax) {
    if (M > 0) logit_stats_kernel<<<(unsigned)M, 256, 0, stream()>>>(logits, V, tgt, lse, tlogit, argmax);
}

/* one block per row, k rounds of an arg-max that skips the ids already taken (ties: lower id) */
static __global__ void topk_kernel(const float *logits, int64_t V, int k, int32_t *ids, float *vals) {
    __shared__ float mv[256];
    __shared__ int32_t mi[256];
    const float *lg = logits + blockIdx.x * V;
    int32_t *oid = ids + blockIdx.x * (int64_t)k;
    float *ov = vals + blockIdx.x * (int64_t)k;
    float last = INFINITY;
    int32_t last_id = -1;
    for (int r = 0; r < k; r++) {
        float m = -INFINITY;
        int32_t a = 0x7fffffff;
        for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
            float x = lg[v];
            /* strictly after (last, last_id) in the order (value desc, id asc) */
            int after = x < last || (x == last && (int32_t)v > last_id);
            if (after && (x > m || (x == m && (int32_t)v < a))) { m = x; a = (int32_t)v; }
        }
        mv[threadIdx.x] = m;
        mi[threadIdx.x] = a;
        __syncthreads();
        for (int st = blockDim.x / 2; st > 0; st >>= 1) {
            if ((int)threadIdx.x < st) {
                float o = mv[threadIdx.x + st];
                int32_t oi = mi[threadIdx.x + st];
                if (o > mv[threadIdx.x] || (o == mv[threadIdx.x] && oi < mi[threadIdx.x])) { mv[threadIdx.x] = o; mi[threadIdx.x] = oi; }
            }
            __syncthreads();
        }
        last = mv[0];
        last_id = mi[0];
        if (threadIdx.x == 0) { oid[r] = last_id; ov[r] = last; }
        __syncthreads();
    }
}

static void cu_topk(const float *logits, int64_t M, int64_t V, int k, int32_t *ids, float *vals) {
    if (M > 0) topk_kernel<<<(unsigned)M, 256, 0, stream()>>>(logits, V, k, ids, vals);
}

static __global__ void gather_cols_kernel(const float *logits, int64_t M, int64_t V, const int32_t *ids, int k, float *out) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < M * k) out[i] = logits[(i / k) * V + ids[i]];
}
static void cu_gather_cols(const float *logits, int64_t M, int64_t V, const int32_t *ids, int k, float *out) {
    if (M > 0) gather_cols_kernel<<<blocks(M * k, 256), 256, 0, stream()>>>(logits, M, V, ids, k, out);
}

static __global__ void seq_error_kernel(const float *a, const float *b, int64_t n, double *d, double *r) {
    __shared__ double sd[256], sr[256];
    const float *x = a + blockIdx.x * n, *y = b + blockIdx.x * n;
    double dd = 0, rr = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) { double e = (double)x[i] - y[i]; dd += e * e; rr += (double)y[i] * y[i]; }
    sd[threadIdx.x] = dd;
    sr[threadIdx.x] = rr;
    __syncthreads();
    for (int st = blockDim.x / 2; st > 0; st >>= 1) {
        if ((int)threadIdx.x < st) { sd[threadIdx.x] += sd[threadIdx.x + st]; sr[threadIdx.x] += sr[threadIdx.x + st]; }
        __syncthreads();
    }
    if (threadIdx.x == 0) { d[blockIdx.x] = sd[0]; r[blockIdx.x] = sr[0]; }
}

static void cu_seq_error(const float *a, const float *b, int64_t S, int64_t n, double *d, double *r) {
    if (S > 0) seq_error_kernel<<<(unsigned)S, 256, 0, stream()>>>(a, b, n, d, r);
}

static __global__ void to_f64_kernel(const float *x, int64_t n, double *y) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i];
}

/* the CPU rule: blocks of up to 1024 rows in f64, dsyrk (row-major upper = column-major lower) */
static int cu_hessian_add(double *H, const float *x, int64_t M, int64_t K) {
    const int64_t CH = 1024;
    if (M <= 0) return 0;
    double *xd = (double *)mb_cuda_scratch(ctx(), SLOT_MISC, (size_t)((M < CH ? M : CH) * K) * 8);
    if (!xd) return mb_fail_ctx(MB_ENOMEM, "Hessian block");
    const double one = 1.0;
    for (int64_t r0 = 0; r0 < M; r0 += CH) {
        int64_t m = M - r0 < CH ? M - r0 : CH;
        to_f64_kernel<<<blocks(m * K, 256), 256, 0, stream()>>>(x + r0 * K, m * K, xd);
        mb_cu.set_stream(ctx()->blas, stream());
        cublasStatus_t st = mb_cu.dsyrk(ctx()->blas, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, (int)K, (int)m, &one, xd, (int)K, &one, H, (int)K);
        if (st != CUBLAS_STATUS_SUCCESS) return mb_fail(MB_ENOCUDA, "cublasDsyrk failed (status %d)", (int)st);
    }
    return take_pending("Hessian");
}

/* ---------------------------------------------------------------------------------------------- */

static const struct mb_ops g_ops_cuda = {
    "cuda",
    1,
    cu_alloc,
    cu_free,
    cu_upload,
    cu_download,
    cu_copy,
    cu_zero,
    cu_sync,
    cu_weight_load,
    cu_weight_release,
    cu_vector_load,
    cu_matmul,
    cu_embed,
    cu_rmsnorm,
    cu_rope_tables,
    cu_rope,
    cu_attention,
    cu_swiglu,
    cu_add,
    cu_moe_route,
    cu_moe_rows,
    cu_gather_rows,
    cu_scatter_add,
    cu_find_nonfinite,
    cu_logit_stats,
    cu_topk,
    cu_gather_cols,
    cu_seq_error,
    cu_hessian_add,
};

extern "C" int mb_ops_cuda(const struct mb_ops **out) {
    *out = NULL;
    if (!mb_cuda_ctx()) return MB_ENOCUDA;
    *out = &g_ops_cuda;
    return 0;
}
