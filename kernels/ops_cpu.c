/* kernels/ops_cpu.c: the CPU operations table (kernels.h): OpenBLAS sgemm / dsyrk for the products, OpenMP
 * loops for the rest. Weights are multiplied in their stored dtype: F32 directly, F16 / BF16 / EXL2 by
 * converting row tiles of at most TILE_FLOATS floats into a scratch buffer and running sgemm on each tile
 * (each output element still sums over all of K in one sgemm call, so the result is bit-identical to a
 * product with the whole matrix in f32, and independent of the thread count).
 *
 * The table is the reference every other backend is tested against. Its functions must be called from one
 * thread at a time (they parallelize internally); the tile scratch is shared. */
#include <cblas.h>
#ifdef __F16C__
#include <immintrin.h>
#endif
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kernels.h"

/* f32 elements of the weight-tile scratch: 4M floats = 16 MB; a tile holds as many whole rows as fit */
#define TILE_FLOATS (4 << 20)

static void *cpu_alloc(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64)) return NULL;
    return p;
}

static void cpu_free(void *p) { free(p); }
static int cpu_upload(void *dst, const void *src, size_t bytes) { if (bytes) memcpy(dst, src, bytes); return 0; }
static int cpu_download(void *dst, const void *src, size_t bytes) { if (bytes) memcpy(dst, src, bytes); return 0; }
static void cpu_copy(void *dst, const void *src, size_t bytes) { if (bytes && dst != src) memmove(dst, src, bytes); }
static void cpu_zero(void *p, size_t bytes) { if (bytes) memset(p, 0, bytes); }
static int cpu_sync(void) { return 0; }

/* ---------------------------------------------------------------------------------------------- */
/* weights: conversion of row ranges to f32                                                        */

/* EXL2 preparation shared by every tile of one product: the permutation (packed row -> original row) and
 * the chunk table */
struct exl2_prep {
    int32_t *perm;
    struct mb_exl2_chunk *ch;
    int64_t nch;
};

static void exl2_prep_free(struct exl2_prep *p) {
    free(p->perm);
    free(p->ch);
    memset(p, 0, sizeof *p);
}

static int exl2_prep(const struct mb_exl2_layer *L, struct exl2_prep *p) {
    memset(p, 0, sizeof *p);
    p->perm = malloc((size_t)L->Kp * sizeof *p->perm);
    p->ch = malloc((size_t)(L->Kp / MB_EXL2_CHUNK + 1) * sizeof *p->ch);
    if (!p->perm || !p->ch) { exl2_prep_free(p); return mb_fail(MB_ENOMEM, "out of memory for an EXL2 layer's tables"); }
    for (int64_t i = 0; i < L->Kp; i++) p->perm[mb_exl2_u32(L->q_invperm, i)] = (int32_t)i;
    p->nch = mb_exl2_chunks(L, p->ch);
    return 0;
}

/* rows [n0, n1) of W [N, K] (columns of the stored W^T) into out [(n1 - n0), K]; columns are handled in
 * blocks of CB per thread, chunks outer so that the packed words of neighbouring columns are read together */
#define CB 16
static void exl2_rows(const struct mb_exl2_layer *L, const struct exl2_prep *p, int64_t n0, int64_t n1, float *out) {
    int64_t K = L->K, Np = L->Np;
#pragma omp parallel for schedule(static)
    for (int64_t b0 = n0; b0 < n1; b0 += CB) {
        int64_t b1 = b0 + CB < n1 ? b0 + CB : n1;
        float sc[CB];
        int32_t gcur = -1;
        for (int64_t c = 0; c < p->nch; c++) {
            const struct mb_exl2_chunk ch = p->ch[c];
            if (ch.group != gcur) {
                gcur = ch.group;
                uint16_t smax = (uint16_t)mb_exl2_i16(L->q_scale_max, gcur);
                for (int64_t n = b0; n < b1; n++) sc[n - b0] = mb_exl2_scale(mb_exl2_code(L, gcur, n), smax);
            }
            int b = ch.bits, z = 1 << (b - 1);
            for (int64_t n = b0; n < b1; n++) {
                uint32_t w[8];
                int q[32];
                for (int i = 0; i < b; i++) w[i] = mb_exl2_u32(L->q_weight, ((int64_t)ch.word_row + i) * Np + n);
                mb_exl2_decode32(b, w, q);
                float s = sc[n - b0], *o = out + (n - n0) * K;
                for (int i = 0; i < 32; i++) {
                    int64_t orig = p->perm[ch.row + i];
                    if (orig < K) o[orig] = (float)(q[i] - z) * s;
                }
            }
        }
    }
}

/* n half-precision values (possibly unaligned) to f32: bf16 is the high half of an f32; f16 through F16C when
 * the CPU has it (exact either way) */
static void bf16_to_f32_n(const uint8_t *src, int64_t n, float *out) {
    uint32_t *o = (uint32_t *)out;
    for (int64_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, 2);
        o[i] = (uint32_t)h << 16;
    }
}

static void f16_to_f32_n(const uint8_t *src, int64_t n, float *out) {
    int64_t i = 0;
#ifdef __F16C__
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * i))));
#endif
    for (; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, 2);
        out[i] = mb_f16_to_f32(h);
    }
}

/* rows [r0, r1) of a float view into out [(r1 - r0), k] */
static void float_rows(const struct mb_weight *w, int64_t r0, int64_t r1, float *out) {
    int64_t k = w->k, n = (r1 - r0) * k;
    if (w->type == MB_W_F32) { memcpy(out, (const float *)w->data + r0 * k, (size_t)n * sizeof *out); return; }
    const uint8_t *src = (const uint8_t *)w->data + (size_t)(r0 * k) * 2;
    const int64_t B = 16384; /* blocks of values per task */
    int bf = w->type == MB_W_BF16;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t b0 = 0; b0 < n; b0 += B) {
        int64_t m = n - b0 < B ? n - b0 : B;
        if (bf) bf16_to_f32_n(src + 2 * b0, m, out + b0);
        else f16_to_f32_n(src + 2 * b0, m, out + b0);
    }
}

int mb_weight_rows_f32(const struct mb_weight *w, int64_t r0, int64_t r1, float *out) {
    if (w->device) return mb_fail(MB_EINVAL, "%s: weight is in device memory", w->name ? w->name : "weight");
    if (r0 < 0 || r1 > w->n || r0 > r1) return mb_fail(MB_ERANGE, "%s: rows [%lld, %lld) outside [0, %lld)", w->name ? w->name : "weight", (long long)r0, (long long)r1, (long long)w->n);
    if (w->type != MB_W_EXL2) { float_rows(w, r0, r1, out); return 0; }
    struct exl2_prep p;
    int rc = exl2_prep(&w->q, &p);
    if (rc) return rc;
    exl2_rows(&w->q, &p, r0, r1, out);
    exl2_prep_free(&p);
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* weights: loading                                                                                */

static void advise(const void *p, size_t bytes) {
    if (!p || !bytes) return;
    long pg = sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)p & ~(uintptr_t)(pg - 1), e = (uintptr_t)p + bytes;
    (void)madvise((void *)a, e - a, MADV_WILLNEED); /* a hint: failures (e.g. heap memory) are harmless */
}

static int cpu_weight_load(struct mb_weight *out, const struct mb_weight *host, int async) {
    *out = *host;
    out->device = 0;
    out->priv = NULL;
    if (!async) return 0;
    if (host->type != MB_W_EXL2) { advise(host->data, mb_weight_bytes(host)); return 0; }
    const struct mb_exl2_layer *q = &host->q;
    advise(q->q_weight, (size_t)(q->P * q->Np) * 4);
    advise(q->q_scale, (size_t)(q->G * q->Np / 8) * 4);
    advise(q->q_invperm, (size_t)q->Kp * 4);
    return 0;
}

static void cpu_weight_release(struct mb_weight *w) { memset(w, 0, sizeof *w); }

static int cpu_vector_load(float **out, const struct mb_weight *host) {
    int64_t n = host->n * host->k;
    *out = cpu_alloc((size_t)n * sizeof(float));
    if (!*out) return mb_fail(MB_ENOMEM, "out of memory for %s", host->name ? host->name : "a vector");
    int rc = mb_weight_rows_f32(host, 0, host->n, *out);
    if (rc) { free(*out); *out = NULL; }
    return rc;
}

/* ---------------------------------------------------------------------------------------------- */
/* matmul                                                                                          */

#define TM 256
#define TN 512

void mb_cpu_sgemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                  float *C, int64_t ldc) {
    if (M <= 0 || N <= 0) return;
    int64_t mt = (M + TM - 1) / TM, nt = (N + TN - 1) / TN;
    /* OpenBLAS runs single-threaded inside a parallel region, and with one OpenMP thread outside it */
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t i = 0; i < mt; i++)
        for (int64_t j = 0; j < nt; j++) {
            int64_t m0 = i * TM, n0 = j * TN, m = M - m0 < TM ? M - m0 : TM, n = N - n0 < TN ? N - n0 : TN;
            const float *a = ta ? A + m0 : A + m0 * lda, *b = tb ? B + n0 * ldb : B + n0;
            if (K == 0) {
                for (int64_t r = 0; r < m; r++)
                    for (int64_t c = 0; c < n; c++) C[(m0 + r) * ldc + n0 + c] *= beta;
                continue;
            }
            cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (blasint)m, (blasint)n, (blasint)K, alpha, a,
                        (blasint)lda, b, (blasint)ldb, beta, C + m0 * ldc + n0, (blasint)ldc);
        }
}

static float *g_tile;    /* TILE_FLOATS scratch, allocated on first use, kept for the process */

/* y [M, N] (+)= x [M, K] @ W^T */
static int cpu_matmul(float *y, const float *x, const struct mb_weight *w, int64_t M, int accumulate) {
    int64_t N = w->n, K = w->k;
    if (M == 0 || N == 0) return 0;
    if (K == 0) { if (!accumulate) memset(y, 0, (size_t)(M * N) * sizeof *y); return 0; }
    if (w->device) return mb_fail(MB_EINVAL, "%s: weight is in device memory", w->name ? w->name : "weight");
    if (w->type == MB_W_F32) {
        mb_cpu_sgemm(0, 1, M, N, K, 1.0f, x, K, (const float *)w->data, K, accumulate ? 1.0f : 0.0f, y, N);
        return 0;
    }
    if (K > TILE_FLOATS) return mb_fail(MB_ERANGE, "%s: %lld inputs exceed the CPU tile (%d)", w->name ? w->name : "weight", (long long)K, TILE_FLOATS);
    if (!g_tile && !(g_tile = cpu_alloc((size_t)TILE_FLOATS * sizeof(float)))) return mb_fail(MB_ENOMEM, "out of memory for the weight tile (%d MB)", TILE_FLOATS / (1 << 18));
    int64_t nb = TILE_FLOATS / K;
    if (nb > N) nb = N;
    struct exl2_prep p = {0};
    int rc;
    if (w->type == MB_W_EXL2 && (rc = exl2_prep(&w->q, &p))) return rc;
    for (int64_t n0 = 0; n0 < N; n0 += nb) {
        int64_t n1 = n0 + nb < N ? n0 + nb : N;
        if (w->type == MB_W_EXL2) exl2_rows(&w->q, &p, n0, n1, g_tile);
        else float_rows(w, n0, n1, g_tile);
        mb_cpu_sgemm(0, 1, M, n1 - n0, K, 1.0f, x, K, g_tile, K, accumulate ? 1.0f : 0.0f, y + n0, N);
    }
    exl2_prep_free(&p);
    return 0;
}

static int cpu_embed(float *x, const struct mb_weight *table, const int32_t *ids, int64_t M) {
    int64_t H = table->k;
    for (int64_t i = 0; i < M; i++)
        if (ids[i] < 0 || ids[i] >= table->n) return mb_fail(MB_ERANGE, "token id %d outside the model's vocabulary (%lld)", ids[i], (long long)table->n);
    if (table->type == MB_W_EXL2) {
        for (int64_t i = 0; i < M; i++) {
            int rc = mb_weight_rows_f32(table, ids[i], ids[i] + 1, x + i * H);
            if (rc) return rc;
        }
        return 0;
    }
#pragma omp parallel for schedule(static) if (M * H > 65536)
    for (int64_t i = 0; i < M; i++) float_rows(table, ids[i], ids[i] + 1, x + i * H);
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* elementwise and attention                                                                       */

static void cpu_rmsnorm(float *out, const float *x, const float *w, int64_t M, int64_t H, float eps) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M; i++) {
        const float *r = x + i * H;
        float *o = out + i * H;
        double ss = 0;
        for (int64_t j = 0; j < H; j++) ss += (double)r[j] * r[j];
        float s = (float)(1.0 / sqrt(ss / H + eps));
        for (int64_t j = 0; j < H; j++) o[j] = r[j] * s * w[j];
    }
}

static int cpu_rope_tables(float *cos_t, float *sin_t, const double *inv, int64_t half, int64_t T) {
    for (int64_t j = 0; j < half; j++)
        for (int64_t t = 0; t < T; t++) {
            double a = (double)t * inv[j];
            cos_t[t * half + j] = (float)cos(a);
            sin_t[t * half + j] = (float)sin(a);
        }
    return 0;
}

/* Hugging Face rotate_half convention: pairs (j, j + hd/2) */
static void cpu_rope(float *x, int64_t S, int64_t T, int64_t nh, int64_t hd, const float *cos_t, const float *sin_t) {
    int64_t half = hd / 2;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < S * T; r++) {
        int64_t t = r % T;
        const float *c = cos_t + t * half, *s = sin_t + t * half;
        for (int64_t h = 0; h < nh; h++) {
            float *v = x + (r * nh + h) * hd;
            for (int64_t j = 0; j < half; j++) {
                float a = v[j], b = v[j + half];
                v[j] = a * c[j] - b * s[j];
                v[j + half] = b * c[j] + a * s[j];
            }
        }
    }
}

/* Per (sequence, head), in blocks of QB query rows: scores [QB, keys] = q k^T * scale with sgemm,
 * causal (and sliding-window) softmax in place, out = P v with sgemm. Keys beyond the block's last query
 * are never computed. OpenBLAS (OpenMP build) runs single-threaded inside the parallel region. */
#define QB 128
static void cpu_attention(float *out, const float *q, const float *k, const float *v, int64_t S, int64_t T, int64_t nh, int64_t nkv,
                          int64_t hd, int64_t window) {
    int64_t group = nh / nkv, qs = nh * hd, ks = nkv * hd, nb = (T + QB - 1) / QB;
    float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel
    {
        float *sc = malloc((size_t)QB * (size_t)T * sizeof *sc);
#pragma omp for collapse(3) schedule(dynamic, 1)
        for (int64_t s = 0; s < S; s++)
            for (int64_t h = 0; h < nh; h++)
                for (int64_t b = 0; b < nb; b++) {
                    int64_t kh = h / group, i0 = b * QB, i1 = i0 + QB < T ? i0 + QB : T, nq = i1 - i0;
                    int64_t j0 = window > 0 && i0 - window + 1 > 0 ? i0 - window + 1 : 0, nk = i1 - j0;
                    const float *qb = q + (s * T + i0) * qs + h * hd, *kb = k + (s * T + j0) * ks + kh * hd, *vb = v + (s * T + j0) * ks + kh * hd;
                    float *ob = out + (s * T + i0) * qs + h * hd;
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)nq, (blasint)nk, (blasint)hd, scale, qb, (blasint)qs, kb,
                                (blasint)ks, 0.0f, sc, (blasint)nk); // sc [nq, nk]
                    for (int64_t r = 0; r < nq; r++) {
                        float *row = sc + r * nk;
                        int64_t i = i0 + r, lo = window > 0 && i - window + 1 > j0 ? i - window + 1 - j0 : 0, hi = i - j0; /* keys lo..hi */
                        float mx = -INFINITY;
                        for (int64_t j = lo; j <= hi; j++) if (row[j] > mx) mx = row[j];
                        float sum = 0;
                        for (int64_t j = lo; j <= hi; j++) { row[j] = expf(row[j] - mx); sum += row[j]; }
                        float inv = 1.0f / sum;
                        for (int64_t j = 0; j < lo; j++) row[j] = 0;
                        for (int64_t j = lo; j <= hi; j++) row[j] *= inv;
                        for (int64_t j = hi + 1; j < nk; j++) row[j] = 0;
                    }
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)nq, (blasint)hd, (blasint)nk, 1.0f, sc, (blasint)nk, vb,
                                (blasint)ks, 0.0f, ob, (blasint)qs); // out [nq, hd]
                }
        free(sc);
    }
}

static void cpu_swiglu(float *g, const float *u, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float x = g[i];
        g[i] = x / (1.0f + expf(-x)) * u[i];
    }
}

static void cpu_add(float *x, const float *y, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* ---------------------------------------------------------------------------------------------- */
/* sparse MoE                                                                                      */

static void cpu_moe_route(int32_t *sel, float *wsel, float *probs, const float *logits, int64_t M, int E, int K) {
#pragma omp parallel for schedule(static) if (M > 256)
    for (int64_t i = 0; i < M; i++) {
        const float *lg = logits + i * E;
        float *pr = probs + i * E;
        int32_t *s = sel + i * K;
        float *ws = wsel + i * K;
        float mx = lg[0];
        for (int e = 1; e < E; e++) if (lg[e] > mx) mx = lg[e];
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
}

struct rank_ent { float p; int64_t row; };
static int cmp_rank(const void *a, const void *b) {
    const struct rank_ent *x = a, *y = b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return x->row < y->row ? -1 : x->row > y->row;
}

static int cpu_moe_rows(int32_t *rowidx, float *roww, const int32_t *sel, const float *wsel, const float *probs, int64_t M, int E, int K, int e,
                        int64_t min_rows, int64_t *n_routed, int64_t *n_total) {
    int64_t n = 0;
    for (int64_t i = 0; i < M; i++)
        for (int k = 0; k < K; k++)
            if (sel[i * K + k] == e) { rowidx[n] = (int32_t)i; roww[n] = wsel[i * K + k]; n++; }
    *n_routed = n;
    if (min_rows > n && n < M) { /* starved expert: add the rows that rank it highest (weight 0) */
        struct rank_ent *rank = malloc((size_t)M * sizeof *rank);
        if (!rank) return mb_fail(MB_ENOMEM, "out of memory");
        int64_t nr = 0;
        for (int64_t i = 0; i < M; i++) {
            int chosen = 0;
            for (int k = 0; k < K; k++) chosen |= sel[i * K + k] == e;
            if (!chosen) rank[nr++] = (struct rank_ent){probs[i * E + e], i};
        }
        qsort(rank, (size_t)nr, sizeof *rank, cmp_rank);
        for (int64_t j = 0; j < nr && n < min_rows; j++) { rowidx[n] = (int32_t)rank[j].row; roww[n] = 0; n++; }
        free(rank);
    }
    *n_total = n;
    return 0;
}

static void cpu_gather_rows(float *dst, const float *src, const int32_t *rowidx, int64_t n, int64_t H) {
#pragma omp parallel for schedule(static) if (n * H > 65536)
    for (int64_t j = 0; j < n; j++) memcpy(dst + j * H, src + (int64_t)rowidx[j] * H, (size_t)H * sizeof *dst);
}

static void cpu_scatter_add(float *dst, const float *src, const int32_t *rowidx, const float *roww, int64_t n, int64_t H) {
#pragma omp parallel for schedule(static) if (n * H > 65536)
    for (int64_t j = 0; j < n; j++) {
        float *d = dst + (int64_t)rowidx[j] * H;
        const float *s = src + j * H;
        float wt = roww[j];
        for (int64_t h = 0; h < H; h++) d[h] += wt * s[h];
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* checks and reductions                                                                           */

static int cpu_find_nonfinite(const float *x, int64_t n, int64_t *index, float *val) {
    int64_t first = n;
#pragma omp parallel for schedule(static) reduction(min : first) if (n > 65536)
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i]) && i < first) first = i;
    *index = first == n ? -1 : first;
    *val = first == n ? 0 : x[first];
    return 0;
}

static void cpu_logit_stats(const float *logits, int64_t M, int64_t V, const int32_t *tgt, double *lse, float *tlogit, int32_t *argmax) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M; i++) {
        const float *lg = logits + i * V;
        float mx = lg[0];
        int32_t am = 0;
        for (int64_t v = 1; v < V; v++) if (lg[v] > mx) { mx = lg[v]; am = (int32_t)v; }
        double se = 0;
        for (int64_t v = 0; v < V; v++) se += exp((double)lg[v] - mx);
        lse[i] = mx + log(se);
        if (argmax) argmax[i] = am;
        if (tgt && tlogit) tlogit[i] = lg[tgt[i]];
    }
}

/* top-k of row x [V] into ids/vals (sorted descending, ties by lower id) with a min-heap */
static void topk_row(const float *x, int64_t V, int k, int32_t *ids, float *vals) {
    int n = 0;
    for (int64_t i = 0; i < V; i++) {
        float v = x[i];
        if (n < k) {
            int j = n++;
            ids[j] = (int32_t)i; vals[j] = v;
            while (j > 0) { int pj = (j - 1) / 2; if (vals[pj] <= vals[j]) break; float tv = vals[pj]; vals[pj] = vals[j]; vals[j] = tv; int32_t ti = ids[pj]; ids[pj] = ids[j]; ids[j] = ti; j = pj; }
        } else if (v > vals[0]) {
            vals[0] = v; ids[0] = (int32_t)i;
            int j = 0;
            for (;;) {
                int l = 2 * j + 1, r = l + 1, m = j;
                if (l < n && vals[l] < vals[m]) m = l;
                if (r < n && vals[r] < vals[m]) m = r;
                if (m == j) break;
                float tv = vals[m]; vals[m] = vals[j]; vals[j] = tv; int32_t ti = ids[m]; ids[m] = ids[j]; ids[j] = ti; j = m;
            }
        }
    }
    for (int i = 1; i < n; i++) { /* heap -> descending (insertion sort, k small) */
        float v = vals[i]; int32_t id = ids[i]; int j = i - 1;
        while (j >= 0 && (vals[j] < v || (vals[j] == v && ids[j] > id))) { vals[j + 1] = vals[j]; ids[j + 1] = ids[j]; j--; }
        vals[j + 1] = v; ids[j + 1] = id;
    }
}

static void cpu_topk(const float *logits, int64_t M, int64_t V, int k, int32_t *ids, float *vals) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M; i++) topk_row(logits + i * V, V, k, ids + i * k, vals + i * k);
}

static void cpu_gather_cols(const float *logits, int64_t M, int64_t V, const int32_t *ids, int k, float *out) {
    for (int64_t i = 0; i < M; i++)
        for (int j = 0; j < k; j++) out[i * k + j] = logits[i * V + ids[i * k + j]];
}

static void cpu_seq_error(const float *a, const float *b, int64_t S, int64_t n, double *d, double *r) {
#pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < S; s++) {
        const float *x = a + s * n, *y = b + s * n;
        double dd = 0, rr = 0;
        for (int64_t i = 0; i < n; i++) { double e = (double)x[i] - y[i]; dd += e * e; rr += (double)y[i] * y[i]; }
        d[s] = dd;
        r[s] = rr;
    }
}

static int cpu_hessian_add(double *H, const float *x, int64_t M, int64_t K) {
    const int64_t CH = 1024; /* rows per dsyrk call: bounds the f64 copy */
    if (M <= 0) return 0;
    double *xd = malloc((size_t)((M < CH ? M : CH) * K) * sizeof *xd);
    if (!xd) return mb_fail(MB_ENOMEM, "out of memory for a Hessian block (%lld x %lld)", (long long)(M < CH ? M : CH), (long long)K);
    for (int64_t r0 = 0; r0 < M; r0 += CH) {
        int64_t m = M - r0 < CH ? M - r0 : CH;
        for (int64_t i = 0; i < m * K; i++) xd[i] = x[r0 * K + i];
        /* upper triangle of H += xd^T xd */
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (blasint)K, (blasint)m, 1.0, xd, (blasint)K, 1.0, H, (blasint)K);
    }
    free(xd);
    return 0;
}

const struct mb_ops mb_ops_cpu = {
    .name = "cpu",
    .device = 0,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_upload,
    .download = cpu_download,
    .copy = cpu_copy,
    .zero = cpu_zero,
    .sync = cpu_sync,
    .weight_load = cpu_weight_load,
    .weight_release = cpu_weight_release,
    .vector_load = cpu_vector_load,
    .matmul = cpu_matmul,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .rope_tables = cpu_rope_tables,
    .rope = cpu_rope,
    .attention = cpu_attention,
    .swiglu = cpu_swiglu,
    .add = cpu_add,
    .moe_route = cpu_moe_route,
    .moe_rows = cpu_moe_rows,
    .gather_rows = cpu_gather_rows,
    .scatter_add = cpu_scatter_add,
    .find_nonfinite = cpu_find_nonfinite,
    .logit_stats = cpu_logit_stats,
    .topk = cpu_topk,
    .gather_cols = cpu_gather_cols,
    .seq_error = cpu_seq_error,
    .hessian_add = cpu_hessian_add,
};

int mb_ops_select(const char *device, const struct mb_ops **out) {
    *out = &mb_ops_cpu;
    if (device && !strcmp(device, "cpu")) return 0;
    if (device && strcmp(device, "cuda") && strcmp(device, "auto")) return mb_fail(MB_EUSAGE, "--device must be auto, cuda or cpu, not \"%s\"", device);
    const struct mb_ops *c;
    int rc = mb_ops_cuda(&c);
    if (!rc) { *out = c; return 0; }
    if (device && !strcmp(device, "cuda")) return mb_fail_ctx(rc, "--device cuda");
    return 0;
}
