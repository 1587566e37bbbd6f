/* quant/gptq.c: Hessian accumulation and GPTQ with mixed-bit groups and EXL2 scales (CPU reference).
 *
 * GPTQ on W^T (Kp x N, rows = inputs) as ../shared/docs/conversion.md describes it: act order by diag(H),
 * relative damping retried on a failed Cholesky, U = upper Cholesky factor of H^-1; groups are walked in
 * order, each group's scales are found on the error-compensated weights, rows are quantized one by one
 * with the error fed to the rest of the group, and after the group all later rows are updated at once
 * (lazy batch, one sgemm). */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"

/* LAPACK (in OpenBLAS), Fortran interface */
extern void dpotrf_(const char *uplo, const int *n, double *a, const int *lda, int *info);
extern void dpotri_(const char *uplo, const int *n, double *a, const int *lda, int *info);

/* ---- Hessians ---- */
int mb_hessian_init(struct mb_hessian *h, const struct mb_ops *ops, int64_t K) {
    memset(h, 0, sizeof *h);
    h->ops = ops ? ops : &mb_ops_cpu;
    h->K = K;
    size_t bytes;
    if (!mb_mul_ok((size_t)K, (size_t)K * sizeof(double), &bytes) || !(h->H = h->ops->alloc(bytes)))
        return mb_fail(MB_ENOMEM, "out of %s memory for a %lld x %lld Hessian", h->ops->name, (long long)K, (long long)K);
    h->ops->zero(h->H, bytes);
    return 0;
}

void mb_hessian_free(struct mb_hessian *h) {
    if (h->H) h->ops->free(h->H);
    memset(h, 0, sizeof *h);
}

int mb_hessian_add(struct mb_hessian *h, const float *x, int64_t M) {
    int rc = h->ops->hessian_add(h->H, x, M, h->K);
    if (!rc) h->count += M;
    return rc;
}

int mb_hessian_merge(struct mb_hessian *a, const struct mb_hessian *b) {
    if (a->ops->device || b->ops->device) return mb_fail(MB_EINVAL, "Hessian merge: host Hessians only");
    if (a->K != b->K) return mb_fail(MB_EINVAL, "Hessians of different sizes (%lld, %lld)", (long long)a->K, (long long)b->K);
    for (int64_t i = 0; i < a->K * a->K; i++) a->H[i] += b->H[i];
    a->count += b->count;
    return 0;
}

struct diag_ent { double d; int32_t i; };
static int cmp_diag_desc(const void *x, const void *y) {
    const struct diag_ent *a = x, *b = y;
    if (a->d != b->d) return a->d > b->d ? -1 : 1;
    return a->i < b->i ? -1 : a->i > b->i;
}

int mb_hessian_act_order(const struct mb_hessian *h, int32_t *perm) {
    if (h->ops && h->ops->device) return mb_fail(MB_EINVAL, "act order: host Hessians only");
    struct diag_ent *e = malloc((size_t)h->K * sizeof *e);
    if (!e) return mb_fail(MB_ENOMEM, "out of memory");
    for (int64_t i = 0; i < h->K; i++) e[i] = (struct diag_ent){h->H[i * h->K + i], (int32_t)i};
    qsort(e, (size_t)h->K, sizeof *e, cmp_diag_desc);
    for (int64_t i = 0; i < h->K; i++) perm[i] = e[i].i;
    free(e);
    return 0;
}

/* ---- GPTQ ---- */
void mb_gptq_default_params(struct mb_gptq_params *p) {
    memset(p, 0, sizeof *p);
    p->damp = 0.12;
    p->max_damp_tries = 10;
    p->name = "layer";
}

void mb_qresult_free(struct mb_qresult *r) {
    if (!r) return;
    free(r->gbits); free(r->grows); free(r->q); free(r->qs); free(r->scale_max); free(r->perm); free(r->wq);
    memset(r, 0, sizeof *r);
}

/* Scales of one group (rows R x N of wt, row stride N): qs [N] in 1..16 and the fp16 group maximum,
 * by the multiplier search of the format doc: 97 multipliers in [0.70, 1.20] of the largest column scale,
 * minimising sum |dequant(w) - w|^3.5. */
static int find_scales(const float *wt, int64_t R, int64_t N, int b, uint8_t *qs, uint16_t *smax_out, float *scale) {
    float half_range = (float)((1 << b) - 1) / 2.0f;
    int zero = 1 << (b - 1), maxq = (1 << b) - 1;
    float *base = malloc((size_t)N * sizeof *base);
    if (!base) return MB_ENOMEM;
    int oom = 0;
    float qmax = 0;
    for (int64_t n = 0; n < N; n++) {
        float m = 0;
        for (int64_t r = 0; r < R; r++) { float a = fabsf(wt[r * N + n]); if (a > m) m = a; }
        base[n] = m / half_range;
        if (base[n] > qmax) qmax = base[n];
    }
    if (!(qmax > 0)) qmax = 1e-6f; /* all-zero group: any scale works */
    for (int64_t n = 0; n < N; n++) {
        float v = rintf(16.0f * sqrtf(base[n] / qmax));
        qs[n] = (uint8_t)(v < 1 ? 1 : v > 16 ? 16 : v);
    }
    /* 97 candidate maxima, each scored over the whole group by one thread (one parallel region per group,
     * not per candidate: cheap with a passive OpenMP wait policy). The sum of a row has a fixed order (8
     * lanes, n % 8, added pairwise at the end: the same on any vector width), rows are added in row order:
     * the result does not depend on the CPU or the number of threads. */
    double cerr[97];
    uint16_t ch[97];
#pragma omp parallel if (R * N > 65536)
    {
        float *sc = malloc((size_t)N * 2 * sizeof *sc), *inv = sc ? sc + N : NULL;
        if (!sc) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < 97; i++) {
            float p = 0.70f + 0.5f * (float)i / 96.0f;
            uint16_t h = mb_f32_to_f16(qmax * p);
            ch[i] = h;
            cerr[i] = INFINITY;
            if (mb_f16_to_f32(h) == 0 || !sc) continue;
            for (int64_t n = 0; n < N; n++) { sc[n] = mb_exl2_scale(qs[n] - 1, h); inv[n] = 1.0f / sc[n]; }
            double err = 0;
            for (int64_t r = 0; r < R; r++) {
                const float *row = wt + r * N;
                float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                int64_t n = 0;
                for (; n + 8 <= N; n += 8)
                    for (int k = 0; k < 8; k++) {
                        float w = row[n + k];
                        float q = rintf(w * inv[n + k]) + (float)zero;
                        q = q < 0 ? 0 : q > (float)maxq ? (float)maxq : q;
                        float d = fabsf((q - (float)zero) * sc[n + k] - w);
                        lane[k] += d * d * d * sqrtf(d);
                    }
                for (; n < N; n++) {
                    float w = row[n];
                    float q = rintf(w * inv[n]) + (float)zero;
                    q = q < 0 ? 0 : q > (float)maxq ? (float)maxq : q;
                    float d = fabsf((q - (float)zero) * sc[n] - w);
                    lane[n % 8] += d * d * d * sqrtf(d);
                }
                err += ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
            }
            cerr[i] = err;
        }
        free(sc);
    }
    double best = INFINITY;
    uint16_t best_h = mb_f32_to_f16(qmax);
    for (int i = 0; i < 97; i++)
        if (mb_f16_to_f32(ch[i]) != 0 && cerr[i] < best) { best = cerr[i]; best_h = ch[i]; }
    *smax_out = best_h;
    for (int64_t n = 0; n < N; n++) scale[n] = mb_exl2_scale(qs[n] - 1, best_h);
    free(base);
    return oom ? MB_ENOMEM : 0;
}

void mb_gptq_prep_free(struct mb_gptq_prep *p) {
    if (!p) return;
    free(p->perm);
    free(p->U);
    mb_gptq_cuda_free(p->dev);
    memset(p, 0, sizeof *p);
}

int mb_gptq_prepare(const struct mb_hessian *h, const struct mb_gptq_params *p, struct mb_gptq_prep *out) {
    memset(out, 0, sizeof *out);
    const char *name = p->name ? p->name : "layer";
    int64_t K = h->K, Kp = (K + 31) / 32 * 32;
    if (Kp > 65535) return mb_fail(MB_EINVAL, "%s: %lld inputs exceed the EXL2 limit of 65535", name, (long long)K);
    out->K = K;
    out->Kp = Kp;
    out->rtn = p->rtn;
    out->perm = malloc((size_t)Kp * sizeof *out->perm);
    if (!out->perm) return mb_fail(MB_ENOMEM, "%s: out of memory", name);
    if (h->ops && h->ops->device) {
        int rc = mb_gptq_cuda_prepare(h->H, K, h->count, p->damp, p->max_damp_tries, p->rtn, name, &out->dev, out->perm, &out->damp_used);
        if (rc) mb_gptq_prep_free(out);
        return rc;
    }
    int rc = 0;
    double *H = calloc((size_t)(Kp * Kp), sizeof *H);
    if (!H) { rc = mb_fail(MB_ENOMEM, "%s: out of memory for a %lld x %lld Hessian", name, (long long)Kp, (long long)Kp); goto fail; }
    /* normalized, symmetric, padded Hessian; act order */
    double inv_n = h->count > 0 ? 1.0 / (double)h->count : 1.0;
    for (int64_t i = 0; i < K; i++)
        for (int64_t j = i; j < K; j++) H[i * Kp + j] = H[j * Kp + i] = h->H[i * K + j] * inv_n;
    {
        struct mb_hessian hp = {Kp, 1, H, &mb_ops_cpu};
        if ((rc = mb_hessian_act_order(&hp, out->perm))) goto fail;
    }
    if (p->rtn) { free(H); return 0; }
    /* permute H via a copy */
    {
        double *Hq = malloc((size_t)(Kp * Kp) * sizeof *Hq);
        if (!Hq) { rc = mb_fail(MB_ENOMEM, "%s: out of memory", name); goto fail; }
        for (int64_t i = 0; i < Kp; i++)
            for (int64_t j = 0; j < Kp; j++) Hq[i * Kp + j] = H[(int64_t)out->perm[i] * Kp + out->perm[j]];
        free(H);
        H = Hq;
    }
    double mean = 0;
    for (int64_t i = 0; i < Kp; i++) {
        if (H[i * Kp + i] <= 0) H[i * Kp + i] = 1.0; /* inputs never seen in calibration (and padding) */
        mean += H[i * Kp + i];
    }
    mean /= (double)Kp;
    /* damping, Cholesky, inverse, upper Cholesky of the inverse (all f64) */
    double *A = malloc((size_t)(Kp * Kp) * sizeof *A);
    if (!A) { rc = mb_fail(MB_ENOMEM, "%s: out of memory", name); goto fail; }
    int ok = 0, n = (int)Kp, info = 0;
    double damp = 0;
    /* the factorization runs on one thread: OpenBLAS's threaded dpotrf blocks differently on 1, 2 and 3
     * threads, and the conversion must give the same bits on any machine */
    int nthreads = openblas_get_num_threads();
    openblas_set_num_threads(1);
    for (int t = 0; t < (p->max_damp_tries > 0 ? p->max_damp_tries : 1) && !ok; t++) {
        damp += p->damp * mean;
        memcpy(A, H, (size_t)(Kp * Kp) * sizeof *A);
        for (int64_t i = 0; i < Kp; i++) A[i * Kp + i] += damp;
        dpotrf_("U", &n, A, &n, &info);
        if (info) continue;
        dpotri_("U", &n, A, &n, &info);
        if (info) continue;
        /* A holds H^-1 in one triangle: symmetrize (column-major 'U' = row-major lower) */
        for (int64_t i = 0; i < Kp; i++)
            for (int64_t j = 0; j < i; j++) A[j * Kp + i] = A[i * Kp + j];
        dpotrf_("L", &n, A, &n, &info); /* column-major lower L, H^-1 = L L^T; row-major view: U = L^T */
        if (info) continue;
        ok = 1;
    }
    openblas_set_num_threads(nthreads);
    if (!ok) { free(A); rc = mb_fail(MB_ENUMERIC, "%s: Hessian not positive definite after %d damping steps (damp %.3g)", name, p->max_damp_tries, damp); goto fail; }
    out->damp_used = damp / mean;
    free(H); /* peak memory: two Kp x Kp f64 matrices, then A and U */
    H = NULL;
    /* column-major L(i,j) (i >= j) sits at A[i + j*Kp] = row-major (j, i): that is U(j, i) */
    out->U = malloc((size_t)(Kp * Kp) * sizeof *out->U);
    if (!out->U) { free(A); rc = mb_fail(MB_ENOMEM, "%s: out of memory", name); goto fail; }
    for (int64_t r = 0; r < Kp; r++)
        for (int64_t c = 0; c < Kp; c++) out->U[r * Kp + c] = c >= r ? (float)A[r * Kp + c] : 0.0f;
    free(A);
    return 0;
fail:
    free(H);
    mb_gptq_prep_free(out);
    return rc;
}

int mb_gptq_run(const struct mb_weight *wv, const struct mb_gptq_prep *pr, const struct mb_qsetting *qset, const struct mb_gptq_params *p,
                struct mb_qresult *out) {
    memset(out, 0, sizeof *out);
    const char *name = p->name ? p->name : "layer";
    int64_t N = wv->n, K = wv->k, Kp = pr->Kp;
    if (pr->K != K) return mb_fail(MB_EINVAL, "%s: Hessian is %lld x %lld for %lld inputs", name, (long long)pr->K, (long long)pr->K, (long long)K);
    int rc = 0;
    const float *U = pr->U;
    float *wt = NULL, *err = NULL, *scale = NULL, *w = NULL;
    out->K = K;
    out->Kp = Kp;
    out->N = N;
    out->damp_used = pr->damp_used;
    out->gbits = malloc((size_t)(Kp / 32) * sizeof *out->gbits);
    out->grows = malloc((size_t)(Kp / 32) * sizeof *out->grows);
    if (!out->gbits || !out->grows) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto fail; }
    if ((rc = mb_qsetting_groups(qset, Kp, &out->G, out->gbits, out->grows))) { mb_fail_ctx(rc, "%s", name); goto fail; }
    int G = out->G;
    out->q = malloc((size_t)(Kp * N));
    out->qs = malloc((size_t)(G * N));
    out->scale_max = malloc((size_t)G * sizeof *out->scale_max);
    out->perm = malloc((size_t)Kp * sizeof *out->perm);
    if (p->keep_wq) out->wq = malloc((size_t)(N * K) * sizeof *out->wq);
    if (!out->q || !out->qs || !out->scale_max || !out->perm || (p->keep_wq && !out->wq)) { rc = mb_fail(MB_ENOMEM, "%s: out of memory", name); goto fail; }
    memcpy(out->perm, pr->perm, (size_t)Kp * sizeof *out->perm);
    if (pr->dev) {
        if (p->keep_wq) { rc = mb_fail(MB_EINVAL, "%s: fake-quantized weights are a CPU-only output", name); goto fail; }
        rc = mb_gptq_cuda_run(pr->dev, wv, G, out->gbits, out->grows, pr->rtn, out->q, out->qs, out->scale_max, name);
        if (rc) goto fail;
        return 0;
    }
    wt = malloc((size_t)(Kp * N) * sizeof *wt);
    scale = malloc((size_t)N * sizeof *scale);
    if (!wt || !scale) { rc = mb_fail(MB_ENOMEM, "%s: out of memory", name); goto fail; }
    /* W^T in act order, from the view converted in blocks of rows */
    {
        const int64_t RB = 256;
        if (!(w = malloc((size_t)((N < RB ? N : RB) * K) * sizeof *w))) { rc = mb_fail(MB_ENOMEM, "%s: out of memory", name); goto fail; }
        for (int64_t n0 = 0; n0 < N; n0 += RB) {
            int64_t n1 = n0 + RB < N ? n0 + RB : N;
            if ((rc = mb_weight_rows_f32(wv, n0, n1, w))) goto fail;
            for (int64_t j = 0; j < Kp; j++)
                for (int64_t n = n0; n < n1; n++) wt[j * N + n] = out->perm[j] < K ? w[(n - n0) * K + out->perm[j]] : 0.0f;
        }
        free(w);
        w = NULL;
    }
    int64_t maxg = 0;
    for (int g = 0; g < G; g++) if (out->grows[g] > maxg) maxg = out->grows[g];
    err = malloc((size_t)(maxg * N) * sizeof *err);
    if (!err) { rc = mb_fail(MB_ENOMEM, "%s: out of memory", name); goto fail; }
    int64_t r0 = 0;
    for (int g = 0; g < G; g++) {
        int b = out->gbits[g], zero = 1 << (b - 1), maxq = (1 << b) - 1;
        int64_t R = out->grows[g], r1 = r0 + R;
        if (find_scales(wt + r0 * N, R, N, b, out->qs + (int64_t)g * N, &out->scale_max[g], scale)) {
            rc = mb_fail(MB_ENOMEM, "%s: out of memory in the scale search", name);
            goto fail;
        }
        for (int64_t r = r0; r < r1; r++) {
            float *row = wt + r * N, *e = err + (r - r0) * N;
            float d = pr->rtn ? 1.0f : U[r * Kp + r];
            for (int64_t n = 0; n < N; n++) {
                float q = rintf(row[n] / scale[n]) + (float)zero;
                q = q < 0 ? 0 : q > (float)maxq ? (float)maxq : q;
                out->q[r * N + n] = (uint8_t)q;
                float dq = (q - (float)zero) * scale[n];
                e[n] = (row[n] - dq) / d;
                row[n] = dq;
            }
            if (pr->rtn) continue;
            /* feed the error to the rest of the group */
            for (int64_t j = r + 1; j < r1; j++) {
                float u = U[r * Kp + j];
                float *wj = wt + j * N;
                for (int64_t n = 0; n < N; n++) wj[n] -= u * e[n];
            }
        }
        /* lazy batch: rows after the group, W[r1:] -= U[r0:r1, r1:]^T @ E */
        if (!pr->rtn && r1 < Kp)
            mb_cpu_sgemm(1, 0, Kp - r1, N, R, -1.0f, U + r0 * Kp + r1, Kp, err, N, 1.0f, wt + r1 * N, N);
        r0 = r1;
    }
    /* fake-quantized weights, original order */
    for (int64_t j = 0; out->wq && j < Kp; j++) {
        int64_t o = out->perm[j];
        if (o >= K) continue;
        for (int64_t n = 0; n < N; n++) out->wq[n * K + o] = wt[j * N + n];
    }
    free(wt); free(err); free(scale);
    return 0;
fail:
    free(wt); free(err); free(scale); free(w);
    mb_qresult_free(out);
    return rc;
}

int mb_gptq_quantize(const struct mb_weight *w, const struct mb_hessian *h, const struct mb_qsetting *qs, const struct mb_gptq_params *p,
                     struct mb_qresult *out) {
    struct mb_gptq_prep pr;
    memset(out, 0, sizeof *out);
    if (h->K != w->k) return mb_fail(MB_EINVAL, "%s: Hessian is %lld x %lld for %lld inputs", p->name ? p->name : "layer", (long long)h->K, (long long)h->K, (long long)w->k);
    int rc = mb_gptq_prepare(h, p, &pr);
    if (!rc) rc = mb_gptq_run(w, &pr, qs, p, out);
    mb_gptq_prep_free(&pr);
    return rc;
}

int mb_qresult_pack(const struct mb_qresult *r, const char *name, struct mb_exl2_packed *out) {
    int rc = mb_exl2_pack(r->Kp, r->N, r->G, r->gbits, r->grows, r->q, r->qs, r->scale_max, r->perm, out);
    if (rc) return mb_fail_ctx(rc, "%s", name);
    /* self-check: rebuild from the packed tensors and compare with the quantizer's values (q - z) * scale,
     * walked in act order (packed row j is original row perm[j]) */
    struct mb_exl2_layer L;
    mb_exl2_packed_view(out, &L);
    L.K = r->K;
    rc = mb_exl2_validate(&L, name);
    float *wt = rc ? NULL : malloc((size_t)(r->K * r->N) * sizeof *wt), *sc = malloc((size_t)r->N * sizeof *sc);
    if (!rc && (!wt || !sc)) rc = mb_fail(MB_ENOMEM, "out of memory");
    if (!rc) rc = mb_exl2_unpack_wt(&L, wt);
    int64_t j = 0;
    for (int g = 0; !rc && g < r->G; g++) {
        int z = 1 << (r->gbits[g] - 1);
        for (int64_t n = 0; n < r->N; n++) sc[n] = mb_exl2_scale(r->qs[(int64_t)g * r->N + n] - 1, r->scale_max[g]);
        for (int64_t i = 0; !rc && i < r->grows[g]; i++, j++) {
            int64_t k = r->perm[j];
            if (k >= r->K) continue; /* padding row */
            for (int64_t n = 0; n < r->N; n++) {
                float a = wt[k * r->N + n], b = (float)((int)r->q[j * r->N + n] - z) * sc[n];
                if (!(fabsf(a - b) <= 0.05f)) {
                    rc = mb_fail(MB_ENUMERIC, "%s: self-check failed: packed weight [%lld, %lld] = %g, quantized %g", name, (long long)n, (long long)k, a, b);
                    break;
                }
            }
        }
    }
    free(wt);
    free(sc);
    if (rc) mb_exl2_packed_free(out);
    return rc;
}

double mb_output_error(const float *w, const float *wq, int64_t N, int64_t K, const struct mb_hessian *h) {
    /* err^2 = sum_n d_n^T H d_n, ref^2 = sum_n w_n^T H w_n, with H symmetric from its upper triangle */
    double e = NAN, ref = 0, num = 0;
    double *Hs = malloc((size_t)(K * K) * sizeof *Hs);
    double *D = calloc((size_t)(N * K), sizeof *D);
    double *Wd = calloc((size_t)(N * K), sizeof *Wd);
    double *T = malloc((size_t)(N * K) * sizeof *T);
    if (!Hs || !D || !Wd || !T) goto out;
    for (int64_t i = 0; i < K; i++)
        for (int64_t j = i; j < K; j++) Hs[i * K + j] = Hs[j * K + i] = h->H[i * K + j];
    for (int64_t i = 0; i < N * K; i++) { D[i] = (double)w[i] - wq[i]; Wd[i] = w[i]; }
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)N, (blasint)K, (blasint)K, 1.0, D, (blasint)K, Hs, (blasint)K, 0.0, T, (blasint)K);
    for (int64_t i = 0; i < N * K; i++) num += D[i] * T[i];
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)N, (blasint)K, (blasint)K, 1.0, Wd, (blasint)K, Hs, (blasint)K, 0.0, T, (blasint)K);
    for (int64_t i = 0; i < N * K; i++) ref += Wd[i] * T[i];
    e = ref > 0 ? sqrt(num / ref) : 0;
out:
    free(Hs); free(D); free(Wd); free(T);
    return e;
}
