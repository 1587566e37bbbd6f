/* bench/bench_gptq.c: GPTQ on the CPU.
 *
 *   bench_gptq time [REPEATS]      time GPTQ of 4096x4096 and 4096x14336 (K x N; K = inputs) with a Hessian
 *                                  from 8192 random tokens, setting 1:4b_128g and a 3-part mixed one;
 *                                  median of REPEATS (default 3), Hessian build timed separately
 *   bench_gptq kjv [SHARED]        every linear of kjv-llama with Hessians from 32 x 256 calibration
 *                                  tokens: output error ||XW - XQ|| / ||XW|| of GPTQ and round-to-nearest
 *                                  for every distinct setting of the option tables (mean over layers)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../calib/calib.h"
#include "../quant/quant.h"

static int cmp_d(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }

static int bench_time(int reps) {
    const int64_t shapes[][2] = {{4096, 4096}, {4096, 14336}};
    const char *settings[] = {"1:4b_128g", "0.05:8b_32g/0.1:4b_128g/0.85:3b_128g"};
    const int64_t M = 8192;
    for (int s = 0; s < 2; s++) {
        int64_t K = shapes[s][0], N = shapes[s][1];
        struct mb_rng g = {42};
        float *w = malloc((size_t)(N * K) * sizeof *w), *x = malloc((size_t)(M * K) * sizeof *x);
        for (int64_t i = 0; i < N * K; i++) w[i] = 0.02f * mb_rng_normal(&g);
        for (int64_t i = 0; i < M * K; i++) x[i] = mb_rng_normal(&g);
        struct mb_hessian h;
        if (mb_hessian_init(&h, NULL, K)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
        double t0 = mb_now();
        mb_hessian_add(&h, x, M);
        double th = mb_now() - t0;
        free(x);
        for (int q = 0; q < 2; q++) {
            struct mb_qsetting qs;
            mb_qsetting_parse(settings[q], &qs);
            double t[16];
            for (int r = 0; r < reps; r++) {
                struct mb_gptq_params gp;
                mb_gptq_default_params(&gp);
                struct mb_qresult res;
                t0 = mb_now();
                struct mb_weight wv = mb_weight_view_f32(w, N, K, "bench");
                if (mb_gptq_quantize(&wv, &h, &qs, &gp, &res)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
                t[r] = mb_now() - t0;
                mb_qresult_free(&res);
            }
            qsort(t, reps, sizeof *t, cmp_d);
            printf("K %5lld x N %5lld  %-38s GPTQ median %.2f s (min %.2f, max %.2f, %d runs); Hessian of %lld tokens %.2f s\n", (long long)K,
                   (long long)N, settings[q], t[reps / 2], t[0], t[reps - 1], reps, (long long)M, th);
            fflush(stdout);
        }
        mb_hessian_free(&h);
        free(w);
    }
    return 0;
}

struct hcap { struct mb_hessian h[64][MB_CAP_COUNT]; };
static int cap_fn(void *user, int layer, enum mb_cap which, int expert, const float *x, int64_t M, int64_t K) {
    struct hcap *c = user;
    int rc;
    if (!c->h[layer][which].H && (rc = mb_hessian_init(&c->h[layer][which], NULL, K))) return rc;
    (void)expert;
    return mb_hessian_add(&c->h[layer][which], x, M);
}

static int bench_kjv(const char *shared) {
    char md[512], cal[512];
    snprintf(md, sizeof md, "%s/models/kjv-llama", shared);
    snprintf(cal, sizeof cal, "%s/text/calib-kjv-jargon.txt", shared);
    struct mb_model *m;
    struct mb_tokenizer *t;
    if (mb_model_open(md, &m) || mb_tokenizer_load(md, &t)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
    const int64_t R = 32, L = 256;
    int nl = (int)m->cfg.n_layers;
    int32_t *rows;
    if (mb_calib_rows(t, cal, NULL, R, L, 1, 1, &rows)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
    struct hcap *hc = calloc(1, sizeof *hc);
    struct mb_capture cap = {cap_fn, hc, 0, NULL};
    struct mb_fwd f;
    mb_fwd_init(&f, m, &mb_ops_cpu, R * L, L);
    float *x = malloc((size_t)(R * L * m->cfg.hidden) * sizeof *x);
    mb_fwd_embed(&f, rows, R * L, x);
    struct mb_layer_w *lw[64];
    for (int l = 0; l < nl; l++) {
        if (mb_layer_load(m, &mb_ops_cpu, l, 0, &lw[l]) || mb_fwd_module(&f, lw[l], 2 * l, x, R, L, &cap) ||
            mb_fwd_module(&f, lw[l], 2 * l + 1, x, R, L, &cap)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
    }
    /* distinct settings per projection kind */
    const int capof[MB_P_COUNT] = {MB_CAP_QKV, MB_CAP_QKV, MB_CAP_QKV, MB_CAP_O, MB_CAP_GATEUP, MB_CAP_GATEUP, MB_CAP_DOWN};
    const char *pname[MB_P_COUNT] = {"q", "k", "v", "o", "gate", "up", "down"};
    printf("| projection | setting | bpw (this shape) | GPTQ error | RTN error | RTN / GPTQ | layers where GPTQ < RTN |\n|---|---|---|---|---|---|---|\n");
    int worse_total = 0;
    for (int p = 0; p < MB_P_COUNT; p++) {
        const char *seen[64];
        int ns = 0;
        int rowsn = p < 4 ? MB_ATTN_OPTIONS : MB_MLP_OPTIONS;
        for (int r = 0; r < rowsn; r++) {
            const char *s = p < 4 ? mb_attn_table[r][p] : mb_mlp_table[r][p - 4];
            int dup = 0;
            for (int k = 0; k < ns; k++) dup |= !strcmp(seen[k], s);
            if (dup) continue;
            seen[ns++] = s;
            struct mb_qsetting qs;
            mb_qsetting_parse(s, &qs);
            double sg = 0, sr = 0, bpw = 0;
            int better = 0;
            for (int l = 0; l < nl; l++) {
                const struct mb_hessian *h = &hc->h[l][capof[p]];
                int64_t K = h->K, N = 0;
                for (int i = 0; i < m->n_ex; i++) if (m->ex[i].layer == l && m->ex[i].proj == p) N = m->ex[i].rows;
                struct mb_gptq_params gp;
                mb_gptq_default_params(&gp);
                gp.keep_wq = 1;
                struct mb_qresult rg, rr;
                if (mb_gptq_quantize(&lw[l]->w[p], h, &qs, &gp, &rg)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
                gp.rtn = 1;
                if (mb_gptq_quantize(&lw[l]->w[p], h, &qs, &gp, &rr)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
                float *w32 = malloc((size_t)(N * K) * sizeof *w32);
                if (!w32 || mb_weight_rows_f32(&lw[l]->w[p], 0, N, w32)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
                double eg = mb_output_error(w32, rg.wq, N, K, h), er = mb_output_error(w32, rr.wq, N, K, h);
                free(w32);
                sg += eg;
                sr += er;
                better += eg < er;
                bpw = (double)mb_qsetting_bits(&qs, K, N, 0) / (double)(K * N);
                mb_qresult_free(&rg);
                mb_qresult_free(&rr);
            }
            worse_total += nl - better;
            printf("| %s | %s | %.3f | %.5f | %.5f | %.2f | %d/%d |\n", pname[p], s, bpw, sg / nl, sr / nl, sr / sg, better, nl);
            fflush(stdout);
        }
    }
    printf("\nlayer-settings where GPTQ was not better than RTN: %d\n", worse_total);
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "time")) return bench_time(argc > 2 ? atoi(argv[2]) : 3);
    if (argc > 1 && !strcmp(argv[1], "kjv")) return bench_kjv(argc > 2 ? argv[2] : "../shared");
    fprintf(stderr, "usage: bench_gptq time [REPEATS] | kjv [SHARED]\n");
    return 2;
}
