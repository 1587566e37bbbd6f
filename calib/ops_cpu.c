/* calib/ops_cpu.c: the CPU operations table: OpenBLAS sgemm for matmuls, OpenMP loops for the rest. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "calib.h"

static void *cpu_alloc(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64)) return NULL;
    return p;
}

static void cpu_free(void *p) { free(p); }

/* y [M, N] (+)= x [M, K] @ W^T, W [N, K] */
static void cpu_matmul(float *y, const float *x, const float *w, int64_t M, int64_t K, int64_t N, int accumulate) {
    if (M == 0 || N == 0) return;
    if (K == 0) { if (!accumulate) memset(y, 0, (size_t)(M * N) * sizeof *y); return; }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)M, (blasint)N, (blasint)K, 1.0f, x, (blasint)K, w, (blasint)K,
                accumulate ? 1.0f : 0.0f, y, (blasint)N);
}

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

const struct mb_ops mb_ops_cpu = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .matmul = cpu_matmul,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .attention = cpu_attention,
    .swiglu = cpu_swiglu,
    .add = cpu_add,
};
