/* tests/test_quant.c: option tables and their bpw, EXL2 golden vectors (pack byte for byte, unpack
 * exactly), GPTQ round trip through safetensors, GPTQ vs round-to-nearest on kjv-llama with real
 * Hessians, damping failure. */
#include <cblas.h>
#include <omp.h>
#include <unistd.h>

#include "../calib/calib.h"
#include "../quant/quant.h"
#include "harness.h"

/* bpw of a table row for Llama-2-7B shapes, as conversion.md lists them */
static void test_table_bpw(void) {
    const double attn_want[MB_ATTN_OPTIONS] = {2.13, 2.22, 2.43, 2.67, 3.16, 3.17, 4.04, 4.05, 4.09, 4.13, 4.17, 4.19, 4.40, 4.46, 5.38, 5.46, 6.04, 6.63, 8.04};
    const double mlp_want[MB_MLP_OPTIONS] = {2.25, 2.33, 2.60, 2.91, 3.29, 3.37, 3.62, 4.14, 4.20, 4.27, 4.35, 5.25, 5.33, 6.07, 6.30, 6.87, 8.04};
    for (int i = 0; i < MB_ATTN_OPTIONS; i++) {
        int64_t bits = 0, numel = 0;
        for (int p = 0; p < 4; p++) {
            struct mb_qsetting q;
            CHECK_EQ(mb_qsetting_parse(mb_attn_table[i][p], &q), 0);
            bits += mb_qsetting_bits(&q, 4096, 4096, 0);
            numel += 4096 * 4096;
        }
        double bpw = (double)bits / numel;
        CHECK_MSG(fabs(bpw - attn_want[i]) < 0.0051, "attention row %d: %.4f vs %.2f", i, bpw, attn_want[i]);
    }
    for (int i = 0; i < MB_MLP_OPTIONS; i++) {
        int64_t bits = 0, numel = 3LL * 4096 * 11008;
        for (int p = 0; p < 3; p++) {
            struct mb_qsetting q;
            CHECK_EQ(mb_qsetting_parse(mb_mlp_table[i][p], &q), 0);
            bits += p < 2 ? mb_qsetting_bits(&q, 4096, 11008, 0) : mb_qsetting_bits(&q, 11008, 4096, 0);
        }
        double bpw = (double)bits / numel;
        /* row 4 (3.29 in conversion.md): our exact count is 3.2846. down_proj's last 3-bit group is cut
         * from 128 to 64 rows where the rows run out (11008 = 576 + 1152 + 9280); the listed figure
         * counts that group whole (+64 x 4096 x 3 bits = 3.2904). We count what is stored. */
        if (i == 4) { CHECK_NEAR(bpw + 64.0 * 4096 * 3 / numel, mlp_want[i], 0.0051); continue; }
        CHECK_MSG(fabs(bpw - mlp_want[i]) < 0.0051, "MLP row %d: %.4f vs %.2f", i, bpw, mlp_want[i]);
    }
    /* head 6 bits is about 6.35 bpw (format doc) */
    struct mb_qsetting h;
    CHECK_EQ(mb_qsetting_parse(mb_head_option(6), &h), 0);
    double hb = (double)mb_qsetting_bits(&h, 4096, 32000, 0) / (4096.0 * 32000);
    CHECK_NEAR(hb, 6.35, 0.02);
    /* parser rejects nonsense */
    struct mb_qsetting q;
    CHECK(mb_qsetting_parse("0.5:7b_64g", &q) != 0);
    CHECK(mb_qsetting_parse("0.5:3b_64g/0.5:4b_64g", &q) != 0);
    CHECK(mb_qsetting_parse("1:4b_48g", &q) != 0);
    char buf[128];
    CHECK_EQ(mb_qsetting_parse("0.05:8b_32g/0.1:4b_128g/0.85:3b_128g", &q), 0);
    mb_qsetting_str(&q, buf, sizeof buf);
    CHECK_STR(buf, "0.05:8b_32g/0.1:4b_128g/0.85:3b_128g");
}

static void test_goldens(void) {
    const char *names[] = {"all-widths", "mix-3-2", "mix-4-3-pad", "mix-8-6-5", "q4-g128"};
    int widths_seen[9] = {0};
    for (int f = 0; f < 5; f++) {
        char p[512];
        snprintf(p, sizeof p, "%s/reference/exl2/%s.safetensors", th_shared(), names[f]);
        struct mb_st_file *sf = NULL;
        CHECK_EQ(mb_st_open(p, &sf), 0);
        if (!sf) continue;
#define T(nm) mb_st_file_find(sf, nm)
        const struct mb_tensor_info *qv = T("input.qvals_permuted"), *qs = T("input.qs"), *sm = T("input.scale_max"), *pm = T("input.perm"),
                                    *gb = T("input.group_bits"), *gr = T("input.group_rows"), *nc = T("input.n_columns");
        CHECK(qv && qs && sm && pm && gb && gr && nc);
        if (!(qv && qs && sm && pm && gb && gr && nc)) { mb_st_close(sf); continue; }
        int64_t K = qv->shape[0], N = qv->shape[1], G = gb->shape[0];
        /* the golden file's data is not 4-byte aligned: copy out */
#define I32AT(t, i) ({ int32_t v_; memcpy(&v_, (const char *)(t)->data + 4 * (i), 4); v_; })
        CHECK_EQ(N, I32AT(nc, 0));
        uint8_t *q = malloc(K * N), *s = malloc(G * N);
        int *bits = malloc(G * sizeof *bits);
        int64_t *rows = malloc(G * sizeof *rows);
        int32_t *perm = malloc(K * sizeof *perm);
        uint16_t *smax = malloc(G * sizeof *smax);
        memcpy(perm, pm->data, K * 4);
        memcpy(smax, sm->data, G * 2);
        for (int64_t i = 0; i < K * N; i++) q[i] = (uint8_t)I32AT(qv, i);
        for (int64_t i = 0; i < G * N; i++) s[i] = (uint8_t)I32AT(qs, i);
        for (int64_t g = 0; g < G; g++) { bits[g] = I32AT(gb, g); rows[g] = I32AT(gr, g); widths_seen[bits[g]] = 1; }
        struct mb_exl2_packed pk;
        int rc = mb_exl2_pack(K, N, (int)G, bits, rows, q, s, smax, perm, &pk);
        free(perm);
        free(smax);
        CHECK_MSG(rc == 0, "%s: %s", names[f], mb_errmsg());
        if (rc == 0) {
            const struct mb_tensor_info *e;
            e = T("expect.q_weight");
            CHECK_MSG(e && e->nbytes == (size_t)(pk.P * pk.Np * 4) && !memcmp(e->data, pk.q_weight, e->nbytes), "%s q_weight", names[f]);
            e = T("expect.q_scale");
            CHECK_MSG(e && e->nbytes == (size_t)(pk.G * pk.Np / 8 * 4) && !memcmp(e->data, pk.q_scale, e->nbytes), "%s q_scale", names[f]);
            e = T("expect.q_scale_max");
            CHECK_MSG(e && e->nbytes == (size_t)(pk.G * 2) && !memcmp(e->data, pk.q_scale_max, e->nbytes), "%s q_scale_max", names[f]);
            e = T("expect.q_groups");
            CHECK_MSG(e && e->nbytes == (size_t)(pk.G * 4) && !memcmp(e->data, pk.q_groups, e->nbytes), "%s q_groups", names[f]);
            e = T("expect.q_invperm");
            CHECK_MSG(e && e->nbytes == (size_t)(K * 4) && !memcmp(e->data, pk.q_invperm, e->nbytes), "%s q_invperm", names[f]);
            mb_exl2_packed_free(&pk);
        }
        /* unpack the expected tensors: exactly the dense matrix */
        struct mb_exl2_layer L = {0};
        const struct mb_tensor_info *eqw = T("expect.q_weight"), *dw = T("expect.dense_wt");
        L.K = L.Kp = K; L.N = N; L.Np = eqw->shape[1]; L.G = G; L.P = eqw->shape[0];
        L.q_weight = eqw->data; L.q_scale = T("expect.q_scale")->data; L.q_scale_max = T("expect.q_scale_max")->data;
        L.q_groups = T("expect.q_groups")->data; L.q_invperm = T("expect.q_invperm")->data;
        CHECK_EQ(mb_exl2_validate(&L, names[f]), 0);
        float *wt = malloc(K * N * sizeof *wt);
        CHECK_EQ(mb_exl2_unpack_wt(&L, wt), 0);
        int bad = 0;
        for (int64_t i = 0; i < K * N; i++) { float v; memcpy(&v, (const char *)dw->data + 4 * i, 4); bad += wt[i] != v; }
        CHECK_MSG(bad == 0, "%s: %d of %lld dense values differ", names[f], bad, (long long)(K * N));
#undef T
        free(wt); free(q); free(s); free(bits); free(rows);
        mb_st_close(sf);
    }
    for (int b = 2; b <= 8; b++) if (b != 7) CHECK_MSG(widths_seen[b], "width %d not covered", b);
}

static void random_layer(int64_t N, int64_t K, int64_t M, uint64_t seed, float **w, struct mb_hessian *h) {
    struct mb_rng g = {seed};
    *w = malloc(N * K * sizeof **w);
    for (int64_t i = 0; i < N * K; i++) (*w)[i] = 0.02f * mb_rng_normal(&g);
    float *x = malloc(M * K * sizeof *x);
    for (int64_t i = 0; i < M * K; i++) x[i] = mb_rng_normal(&g) * (1.0f + (float)(i % K) / K * 3); /* uneven input scales */
    mb_hessian_init(h, NULL, K);
    mb_hessian_add(h, x, M);
    free(x);
}

static void test_roundtrip(void) {
    const char *settings[] = {"0.05:8b_32g/0.1:4b_128g/0.85:3b_128g", "1:4b_32g", "0.1:6b_32g/0.9:5b_32g", "0.3:4b_32g/0.7:2b_32g"};
    int64_t shapes[][2] = {{96, 256}, {40, 172}, {130, 64}, {64, 96}}; /* N, K: N not a multiple of 32, K = 172 padded */
    for (int t = 0; t < 4; t++) {
        int64_t N = shapes[t][0], K = shapes[t][1];
        float *w;
        struct mb_hessian h;
        random_layer(N, K, 512, 100 + t, &w, &h);
        struct mb_qsetting q;
        CHECK_EQ(mb_qsetting_parse(settings[t], &q), 0);
        struct mb_gptq_params gp;
        mb_gptq_default_params(&gp);
        gp.name = "test.layer";
        gp.keep_wq = 1;
        struct mb_qresult r;
        struct mb_weight wv = mb_weight_view_f32(w, N, K, "test.layer");
        int rc = mb_gptq_quantize(&wv, &h, &q, &gp, &r);
        CHECK_MSG(rc == 0, "%s", mb_errmsg());
        if (rc) { free(w); mb_hessian_free(&h); continue; }
        struct mb_exl2_packed pk;
        CHECK_EQ(mb_qresult_pack(&r, "test.layer", &pk), 0);
        char path[256];
        snprintf(path, sizeof path, "/tmp/mb_test_rt_%ld_%d.safetensors", (long)getpid(), t);
        struct mb_st_entry e[] = {
            {"l.q_weight", MB_I32, 2, {pk.P, pk.Np}, pk.q_weight},
            {"l.q_scale", MB_I32, 2, {pk.G, pk.Np / 8}, pk.q_scale},
            {"l.q_scale_max", MB_F16, 1, {pk.G}, pk.q_scale_max},
            {"l.q_groups", MB_I16, 1, {2 * pk.G}, pk.q_groups},
            {"l.q_invperm", MB_I32, 1, {pk.K}, pk.q_invperm},
        };
        CHECK_EQ(mb_st_write(path, e, 5, NULL, 0), 0);
        struct mb_st_set *s = NULL;
        CHECK_EQ(mb_st_set_open(path, &s), 0);
        float *back = malloc(N * K * sizeof *back);
        if (s) {
            CHECK_MSG(mb_exl2_load_dense(s, "l", N, K, back) == 0, "%s", mb_errmsg());
            int bad = 0;
            for (int64_t i = 0; i < N * K; i++) bad += back[i] != r.wq[i];
            CHECK_EQ(bad, 0);
        }
        /* the bit cost formula agrees with what is stored */
        int64_t stored = (pk.P * pk.Np + pk.G * pk.Np / 8 + pk.K) * 32 + pk.G * 16 + pk.G * 32;
        CHECK_EQ(stored, mb_qsetting_bits(&q, K, N, 0));
        mb_st_set_close(s);
        unlink(path);
        free(back);
        mb_exl2_packed_free(&pk);
        mb_qresult_free(&r);
        free(w);
        mb_hessian_free(&h);
    }
}

static void test_damping_failure(void) {
    int64_t K = 32, N = 32;
    struct mb_hessian h;
    mb_hessian_init(&h, NULL, K);
    h.count = 1;
    for (int64_t i = 0; i < K; i++) h.H[i * K + i] = 1;
    h.H[0 * K + 1] = h.H[1 * K + 0] = 5; /* indefinite: eigenvalue -4, 10 x 0.12 damping is not enough */
    float *w = calloc(N * K, sizeof *w);
    struct mb_qsetting q;
    mb_qsetting_parse("1:4b_32g", &q);
    struct mb_gptq_params gp;
    mb_gptq_default_params(&gp);
    gp.name = "model.layers.3.mlp.down_proj";
    struct mb_qresult r;
    struct mb_weight wv = mb_weight_view_f32(w, N, K, gp.name);
    CHECK_EQ(mb_gptq_quantize(&wv, &h, &q, &gp, &r), MB_ENUMERIC);
    CHECK(strstr(mb_errmsg(), "model.layers.3.mlp.down_proj") != NULL);
    /* with enough damping the retry succeeds */
    h.H[0 * K + 1] = h.H[1 * K + 0] = 1.5;
    CHECK_EQ(mb_gptq_quantize(&wv, &h, &q, &gp, &r), 0);
    CHECK(r.damp_used > 0.12);
    mb_qresult_free(&r);
    free(w);
    mb_hessian_free(&h);
}

/* Hessians of every linear of kjv-llama from real calibration text */
struct hcap { struct mb_hessian h[6][MB_CAP_COUNT]; };
static int cap_fn(void *user, int layer, enum mb_cap which, int expert, const float *x, int64_t M, int64_t K) {
    struct hcap *c = user;
    int rc;
    if (!c->h[layer][which].H && (rc = mb_hessian_init(&c->h[layer][which], NULL, K))) return rc;
    (void)expert;
    return mb_hessian_add(&c->h[layer][which], x, M);
}

static void test_gptq_beats_rtn(void) {
    char md[512], cal[512];
    snprintf(md, sizeof md, "%s/models/kjv-llama", th_shared());
    snprintf(cal, sizeof cal, "%s/text/calib-kjv-jargon.txt", th_shared());
    struct mb_model *m = NULL;
    struct mb_tokenizer *t = NULL;
    CHECK_EQ(mb_model_open(md, &m), 0);
    CHECK_EQ(mb_tokenizer_load(md, &t), 0);
    if (!m || !t) { mb_model_close(m); mb_tokenizer_free(t); return; }
    const int64_t R = 16, L = 256;
    int32_t *rows = NULL;
    CHECK_EQ(mb_calib_rows(t, cal, NULL, R, L, 1, 1, &rows), 0);
    struct hcap *hc = calloc(1, sizeof *hc);
    struct mb_capture cap = {cap_fn, hc, 0, NULL};
    struct mb_fwd f;
    CHECK_EQ(mb_fwd_init(&f, m, &mb_ops_cpu, R * L, L), 0);
    float *x = malloc(R * L * m->cfg.hidden * sizeof *x);
    CHECK_EQ(mb_fwd_embed(&f, rows, R * L, x), 0);
    struct mb_layer_w *lw[6];
    for (int l = 0; l < 6; l++) {
        CHECK_EQ(mb_layer_load(m, &mb_ops_cpu, l, 0, &lw[l]), 0);
        CHECK_EQ(mb_fwd_module(&f, lw[l], 2 * l, x, R, L, &cap), 0);
        CHECK_EQ(mb_fwd_module(&f, lw[l], 2 * l + 1, x, R, L, &cap), 0);
    }
    const char *settings[] = {"0.05:3b_64g/0.95:2b_64g", "0.1:4b_128g/0.9:3b_128g", "1:4b_128g", "0.1:6b_128g/0.9:5b_128g"};
    const int capof[MB_P_COUNT] = {MB_CAP_QKV, MB_CAP_QKV, MB_CAP_QKV, MB_CAP_O, MB_CAP_GATEUP, MB_CAP_GATEUP, MB_CAP_DOWN};
    int worse = 0, total = 0;
    for (int s = 0; s < 4; s++) {
        struct mb_qsetting q;
        mb_qsetting_parse(settings[s], &q);
        double sg = 0, sr = 0;
        for (int l = 0; l < 6; l++)
            for (int p = 0; p < MB_P_COUNT; p++) {
                const struct mb_hessian *h = &hc->h[l][capof[p]];
                int64_t K = h->K, N = p == MB_P_K || p == MB_P_V ? 128 : p == MB_P_GATE || p == MB_P_UP ? 768 : 256;
                struct mb_gptq_params gp;
                mb_gptq_default_params(&gp);
                gp.keep_wq = 1;
                struct mb_qresult rg, rr;
                CHECK_EQ(mb_gptq_quantize(&lw[l]->w[p], h, &q, &gp, &rg), 0);
                gp.rtn = 1;
                CHECK_EQ(mb_gptq_quantize(&lw[l]->w[p], h, &q, &gp, &rr), 0);
                float *w32 = malloc(N * K * sizeof *w32);
                CHECK_EQ(mb_weight_rows_f32(&lw[l]->w[p], 0, N, w32), 0);
                double eg = mb_output_error(w32, rg.wq, N, K, h), er = mb_output_error(w32, rr.wq, N, K, h);
                free(w32);
                total++;
                if (!(eg < er)) { worse++; fprintf(stderr, "  layer %d proj %d %s: gptq %.5f rtn %.5f\n", l, p, settings[s], eg, er); }
                sg += eg; sr += er;
                mb_qresult_free(&rg);
                mb_qresult_free(&rr);
            }
        fprintf(stderr, "  %-28s mean output error: GPTQ %.5f, RTN %.5f (%.2fx)\n", settings[s], sg / 42, sr / 42, sr / sg);
    }
    CHECK_EQ(worse, 0);
    CHECK_EQ(total, 4 * 42);
    for (int l = 0; l < 6; l++) {
        mb_layer_free(lw[l]);
        for (int c = 0; c < MB_CAP_COUNT; c++) mb_hessian_free(&hc->h[l][c]);
    }
    free(hc); free(x); free(rows);
    mb_fwd_free(&f);
    mb_tokenizer_free(t);
    mb_model_close(m);
}

/* broken EXL2 tensors are refused with the layer named */
static void test_exl2_validation(void) {
    int32_t qw[4 * 32] = {0}, qs[1 * 4] = {0}, inv[32];
    uint16_t sm[1] = {0x3c00};
    int16_t g[2] = {4, 0};
    for (int i = 0; i < 32; i++) inv[i] = i;
    struct mb_exl2_layer L = {32, 32, 32, 32, 1, 4, qw, qs, sm, g, inv, NULL};
    CHECK_EQ(mb_exl2_validate(&L, "ok"), 0);
    g[0] = 7;
    CHECK_EQ(mb_exl2_validate(&L, "bad.bits"), MB_EFORMAT);
    CHECK(strstr(mb_errmsg(), "bad.bits") != NULL);
    g[0] = 4;
    inv[3] = 5;
    CHECK_EQ(mb_exl2_validate(&L, "bad.perm"), MB_EFORMAT);
    inv[3] = 3;
    L.P = 3;
    CHECK_EQ(mb_exl2_validate(&L, "bad.rows"), MB_EFORMAT);
}

/* GPTQ gives the same bits on 1, 2 and 3 threads (OpenBLAS's threaded dpotrf and sgemm do not: measured) */
static void test_gptq_threads(void) {
    const int64_t K = 768, N = 600, M = 2048;
    float *w;
    struct mb_hessian h;
    random_layer(N, K, M, 77, &w, &h);
    struct mb_weight wv = mb_weight_view_f32(w, N, K, "t");
    struct mb_qsetting q;
    mb_qsetting_parse("0.05:8b_32g/0.1:4b_128g/0.85:3b_128g", &q);
    struct mb_gptq_params gp;
    mb_gptq_default_params(&gp);
    int saved = omp_get_max_threads();
    struct mb_gptq_prep pr[3];
    struct mb_qresult r[3];
    for (int t = 0; t < 3; t++) {
        openblas_set_num_threads(t + 1); /* sets the OpenMP threads too */
        CHECK_EQ(mb_gptq_prepare(&h, &gp, &pr[t]), 0);
        CHECK_EQ(mb_gptq_run(&wv, &pr[t], &q, &gp, &r[t]), 0);
    }
    openblas_set_num_threads(saved);
    for (int t = 1; t < 3; t++) {
        CHECK_MSG(!memcmp(pr[0].U, pr[t].U, (size_t)(K * K) * 4), "U differs between 1 and %d threads", t + 1);
        CHECK_MSG(!memcmp(r[0].q, r[t].q, (size_t)(K * N)) && !memcmp(r[0].scale_max, r[t].scale_max, (size_t)r[0].G * 2), "values differ between 1 and %d threads", t + 1);
    }
    /* the tiled product itself, at a size where OpenBLAS's threaded sgemm gives other bits on 1, 2 and 3
     * threads (1000 x 1000 x 1000, measured with OpenBLAS 0.3.21) */
    const int64_t S = 1000;
    float *a = malloc(S * S * 4), *b = malloc(S * S * 4), *c[3];
    struct mb_rng g = {5};
    for (int64_t i = 0; i < S * S; i++) { a[i] = mb_rng_normal(&g); b[i] = mb_rng_normal(&g); }
    for (int t = 0; t < 3; t++) {
        c[t] = malloc(S * S * 4);
        openblas_set_num_threads(t + 1); /* sets the OpenMP threads too */
        mb_cpu_sgemm(0, 0, S, S, S, 1.0f, a, S, b, S, 0.0f, c[t], S);
    }
    openblas_set_num_threads(saved);
    CHECK_MSG(!memcmp(c[0], c[1], S * S * 4) && !memcmp(c[0], c[2], S * S * 4), "the tiled product depends on the thread count");
    for (int t = 0; t < 3; t++) { mb_gptq_prep_free(&pr[t]); mb_qresult_free(&r[t]); free(c[t]); }
    free(a); free(b); free(w);
    mb_hessian_free(&h);
}

int main(void) {
    RUN(test_gptq_threads);
    RUN(test_table_bpw);
    RUN(test_goldens);
    RUN(test_exl2_validation);
    RUN(test_roundtrip);
    RUN(test_damping_failure);
    RUN(test_gptq_beats_rtn);
    TEST_MAIN_END();
}
