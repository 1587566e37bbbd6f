/* tests/test_forward.c: the forward pass against the float64 references (per-position NLLs within 2e-4)
 * and the reference perplexities (0.05% relative, both conventions), KL divergence, MoE invariance. */
#include <jansson.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../calib/calib.h"
#include "harness.h"

static void test_nll_reference(void) {
    const char *models[] = {"stories260K", "stories260K-moe4", "kjv-llama", "kjv-mixtral"};
    for (int mi = 0; mi < 4; mi++) {
        char p[512], md[512];
        snprintf(p, sizeof p, "%s/reference/nll-%s.json", th_shared(), models[mi]);
        snprintf(md, sizeof md, "%s/models/%s", th_shared(), models[mi]);
        json_error_t err;
        json_t *root = json_load_file(p, 0, &err);
        CHECK_MSG(root != NULL, "%s: %s", p, err.text);
        if (!root) continue;
        json_t *jids = json_object_get(root, "ids"), *jnll = json_object_get(root, "nll"), *jam = json_object_get(root, "argmax");
        int64_t T = (int64_t)json_array_size(jids);
        int32_t *ids = malloc(T * sizeof *ids), *am = malloc(T * sizeof *am);
        double *nll = malloc(T * sizeof *nll);
        for (int64_t i = 0; i < T; i++) ids[i] = (int32_t)json_integer_value(json_array_get(jids, i));
        struct mb_model *m = NULL;
        CHECK_EQ(mb_model_open(md, &m), 0);
        if (m) {
            int rc = mb_seq_nll(m, &mb_ops_cpu, ids, T, nll, am);
            CHECK_MSG(rc == 0, "%s: %s", models[mi], mb_errmsg());
            double maxd = 0;
            int am_bad = 0;
            for (int64_t i = 0; rc == 0 && i + 1 < T; i++) {
                double d = fabs(nll[i] - json_number_value(json_array_get(jnll, i)));
                if (d > maxd) maxd = d;
                if (jam && am[i] != json_integer_value(json_array_get(jam, i))) am_bad++;
            }
            fprintf(stderr, "  %s: max |nll - ref| = %.2e over %lld positions, argmax mismatches %d\n", models[mi], maxd, (long long)T - 1, am_bad);
            CHECK_MSG(maxd <= 2e-4, "%s: max nll diff %g", models[mi], maxd);
            CHECK_MSG(am_bad <= 1, "%s: %d argmax mismatches", models[mi], am_bad); /* near-ties may flip */
        }
        mb_model_close(m);
        free(ids); free(am); free(nll);
        json_decref(root);
    }
}

static void test_ppl_reference(void) {
    char p[512];
    snprintf(p, sizeof p, "%s/reference/ppl.json", th_shared());
    json_error_t err;
    json_t *root = json_load_file(p, 0, &err);
    CHECK_MSG(root != NULL, "%s", p);
    if (!root) return;
    int checked = 0, asan = getenv("MB_ASAN") != NULL;
    for (size_t i = 0; i < json_array_size(root); i++) {
        json_t *e = json_array_get(root, i);
        /* under the sanitizers (10x slower) only the small entries run; the full set runs in `make test` */
        if (asan && json_integer_value(json_object_get(e, "tokens")) > 5000) continue;
        char md[512], tp[512];
        snprintf(md, sizeof md, "%s/%s", th_shared(), json_string_value(json_object_get(e, "model")));
        snprintf(tp, sizeof tp, "%s/%s", th_shared(), json_string_value(json_object_get(e, "text")));
        const char *conv = json_string_value(json_object_get(e, "convention"));
        struct mb_model *m = NULL;
        struct mb_tokenizer *t = NULL;
        CHECK_EQ(mb_model_open(md, &m), 0);
        CHECK_EQ(mb_tokenizer_load(md, &t), 0);
        if (!m || !t) { mb_model_close(m); mb_tokenizer_free(t); continue; }
        int32_t *ids = NULL;
        int64_t n = 0;
        CHECK_EQ(mb_tokenize_file(t, tp, 1, &ids, &n), 0);
        struct mb_ppl_params pp;
        mb_ppl_default_params(&pp);
        pp.convention = !strcmp(conv, "llamacpp") ? MB_PPL_LLAMACPP : MB_PPL_PAPER;
        pp.ctx = json_integer_value(json_object_get(e, "ctx"));
        pp.max_tokens = json_integer_value(json_object_get(e, "max_tokens"));
        pp.progress = 0;
        struct mb_ppl_result r;
        int rc = mb_ppl_run(m, ids, n, mb_tokenizer_hash(t), &pp, &r);
        CHECK_MSG(rc == 0, "%s", mb_errmsg());
        double want = json_number_value(json_object_get(e, "ppl"));
        fprintf(stderr, "  %s %s %s ctx %lld: ppl %.4f (ref %.4f, rel %.1e) tokens %lld (ref %lld), %.0f tok/s\n", json_string_value(json_object_get(e, "model")),
                json_string_value(json_object_get(e, "text")), conv, (long long)pp.ctx, r.ppl, want, fabs(r.ppl / want - 1), (long long)r.tokens,
                (long long)json_integer_value(json_object_get(e, "tokens")), r.tok_per_s);
        CHECK_EQ(r.tokens, json_integer_value(json_object_get(e, "tokens")));
        CHECK_NEAR(r.ppl / want, 1.0, 5e-4);
        checked++;
        free(ids);
        mb_tokenizer_free(t);
        mb_model_close(m);
    }
    CHECK(checked >= (asan ? 4 : 14));
    json_decref(root);
}

/* stories260K-moe4's experts are permutations of the dense MLP: same outputs as stories260K */
static void test_moe_equals_dense(void) {
    char a[512], b[512];
    snprintf(a, sizeof a, "%s/models/stories260K", th_shared());
    snprintf(b, sizeof b, "%s/models/stories260K-moe4", th_shared());
    struct mb_model *ma = NULL, *mm = NULL;
    CHECK_EQ(mb_model_open(a, &ma), 0);
    CHECK_EQ(mb_model_open(b, &mm), 0);
    if (!ma || !mm) { mb_model_close(ma); mb_model_close(mm); return; }
    int32_t ids[64];
    struct mb_rng g = {7};
    ids[0] = 1;
    for (int i = 1; i < 64; i++) ids[i] = 3 + (int32_t)(mb_rng_next(&g) % 500);
    double na[64], nb[64];
    CHECK_EQ(mb_seq_nll(ma, &mb_ops_cpu, ids, 64, na, NULL), 0);
    CHECK_EQ(mb_seq_nll(mm, &mb_ops_cpu, ids, 64, nb, NULL), 0);
    double md = 0;
    for (int i = 0; i < 63; i++) if (fabs(na[i] - nb[i]) > md) md = fabs(na[i] - nb[i]);
    CHECK_MSG(md < 1e-4, "max diff %g", md);
    mb_model_close(ma);
    mb_model_close(mm);
}

static void test_kld(void) {
    char md[512], tp[512], lp[256], lp2[256];
    snprintf(md, sizeof md, "%s/models/stories260K", th_shared());
    snprintf(tp, sizeof tp, "%s/text/tinystories-sample.txt", th_shared());
    snprintf(lp, sizeof lp, "/tmp/mb_test_kld_%ld.bin", (long)getpid());
    snprintf(lp2, sizeof lp2, "/tmp/mb_test_kld2_%ld.bin", (long)getpid());
    struct mb_model *m = NULL, *m16 = NULL;
    struct mb_tokenizer *t = NULL;
    CHECK_EQ(mb_model_open(md, &m), 0);
    CHECK_EQ(mb_tokenizer_load(md, &t), 0);
    char md16[512];
    snprintf(md16, sizeof md16, "%s/models/stories260K-f16", th_shared());
    CHECK_EQ(mb_model_open(md16, &m16), 0);
    if (!m || !t || !m16) goto out;
    int32_t *ids = NULL;
    int64_t n = 0;
    CHECK_EQ(mb_tokenize_file(t, tp, 1, &ids, &n), 0);
    struct mb_ppl_params pp;
    mb_ppl_default_params(&pp);
    pp.ctx = 128;
    pp.progress = 0;
    pp.save_logprobs = lp;
    struct mb_ppl_result r0, r1, r2;
    CHECK_EQ(mb_ppl_run(m, ids, n, mb_tokenizer_hash(t), &pp, &r0), 0);
    pp.save_logprobs = NULL;
    pp.kld = lp;
    /* the same model against itself: KLD ~ 0, top-1 100% */
    CHECK_EQ(mb_ppl_run(m, ids, n, mb_tokenizer_hash(t), &pp, &r1), 0);
    CHECK(r1.has_kld);
    CHECK_NEAR(r1.kld_mean, 0, 1e-6);
    CHECK_NEAR(r1.same_top1, 100.0, 1e-9);
    CHECK_NEAR(r1.ppl, r0.ppl, 1e-9);
    /* the f16 copy: small but non-zero KLD */
    CHECK_EQ(mb_ppl_run(m16, ids, n, mb_tokenizer_hash(t), &pp, &r2), 0);
    CHECK(r2.kld_mean > 0 && r2.kld_mean < 1e-3);
    CHECK(r2.kld_p99 >= r2.kld_mean);
    fprintf(stderr, "  f16 vs f32: KLD mean %.2e, p99 %.2e, same top-1 %.2f%%\n", r2.kld_mean, r2.kld_p99, r2.same_top1);
    /* another text (cut): refused */
    pp.max_tokens = n - 10;
    CHECK_EQ(mb_ppl_run(m, ids, n, mb_tokenizer_hash(t), &pp, &r2), MB_EINVAL);
    pp.max_tokens = 0;
    pp.ctx = 64;
    CHECK_EQ(mb_ppl_run(m, ids, n, mb_tokenizer_hash(t), &pp, &r2), MB_EINVAL);
    free(ids);
out:
    unlink(lp);
    unlink(lp2);
    mb_tokenizer_free(t);
    mb_model_close(m);
    mb_model_close(m16);
}

/* streaming from the file gives exactly what the in-memory run gives; a stride scores every token once */
static void test_stream_and_stride(void) {
    char md[512], tp[512];
    snprintf(md, sizeof md, "%s/models/kjv-llama", th_shared());
    snprintf(tp, sizeof tp, "%s/text/jargon-eval.txt", th_shared());
    struct mb_model *m = NULL;
    struct mb_tokenizer *t = NULL;
    CHECK_EQ(mb_model_open(md, &m), 0);
    CHECK_EQ(mb_tokenizer_load(md, &t), 0);
    if (!m || !t) { mb_model_close(m); mb_tokenizer_free(t); return; }
    int32_t *ids = NULL;
    int64_t n = 0;
    CHECK_EQ(mb_tokenize_file(t, tp, 1, &ids, &n), 0);
    struct mb_ppl_params pp;
    mb_ppl_default_params(&pp);
    pp.progress = 0;
    pp.ctx = 128;
    pp.max_tokens = getenv("MB_ASAN") ? 3000 : 0;
    struct mb_ppl_result a, b, c, paper = {0};
    for (int conv = 0; conv < 2; conv++) {
        pp.convention = conv ? MB_PPL_LLAMACPP : MB_PPL_PAPER;
        CHECK_EQ(mb_ppl_run(m, ids, n, mb_tokenizer_hash(t), &pp, &a), 0);
        CHECK_EQ(mb_ppl_run_file(m, t, tp, &pp, &b), 0);
        CHECK_EQ(a.tokens, b.tokens);
        CHECK_NEAR(a.ppl, b.ppl, 1e-12 * a.ppl);
        if (!conv) paper = a;
    }
    pp.convention = MB_PPL_PAPER;
    pp.stride = 64;
    CHECK_EQ(mb_ppl_run(m, ids, n, mb_tokenizer_hash(t), &pp, &c), 0);
    int64_t used = pp.max_tokens > 0 && pp.max_tokens < n ? pp.max_tokens : n;
    CHECK_EQ(c.tokens, used - 1);   /* every token after the first, once */
    CHECK(c.ppl < paper.ppl);       /* more context per scored token */
    fprintf(stderr, "  jargon-eval ctx 128 (paper): ppl %.4f without stride, %.4f with stride 64\n", paper.ppl, c.ppl);
    free(ids);
    mb_tokenizer_free(t);
    mb_model_close(m);
}

/* rope scaling tables and the sliding window, against their definitions */
static void test_rope_and_window(void) {
    char md[512];
    snprintf(md, sizeof md, "%s/models/stories260K", th_shared());
    struct mb_model *m = NULL;
    CHECK_EQ(mb_model_open(md, &m), 0);
    if (!m) return;
    struct mb_fwd f0, f1, f2;
    CHECK_EQ(mb_fwd_init(&f0, m, &mb_ops_cpu, 64, 64), 0);
    m->cfg.rope_type = MB_ROPE_LINEAR;
    m->cfg.rope_factor = 2;
    CHECK_EQ(mb_fwd_init(&f1, m, &mb_ops_cpu, 64, 64), 0);
    m->cfg.rope_type = MB_ROPE_LLAMA3;
    m->cfg.rope_factor = 8;
    m->cfg.rope_low_freq = 1;
    m->cfg.rope_high_freq = 4;
    m->cfg.rope_orig_max_pos = 1024;
    CHECK_EQ(mb_fwd_init(&f2, m, &mb_ops_cpu, 64, 64), 0);
    int64_t half = m->cfg.head_dim / 2; /* 4 frequencies: 1, 0.1, 0.01, 0.001 */
    for (int64_t j = 0; j < half; j++) CHECK_NEAR(f1.cos_t[2 * half + j], f0.cos_t[1 * half + j], 1e-6); /* linear: position t/2 */
    for (int64_t j = 0; j < half; j++) {
        double inv = 1.0 / pow(10000.0, 2.0 * j / m->cfg.head_dim), wl = 2 * M_PI / inv, want;
        if (wl < 1024.0 / 4) want = inv;
        else if (wl > 1024.0 / 1) want = inv / 8;
        else { double sm = (1024.0 / wl - 1) / 3; want = (1 - sm) * inv / 8 + sm * inv; }
        CHECK_NEAR(f2.cos_t[1 * half + j], cos(want), 1e-6);
        CHECK_NEAR(f2.sin_t[5 * half + j], sin(5 * want), 1e-6);
    }
    mb_fwd_free(&f0); mb_fwd_free(&f1); mb_fwd_free(&f2);
    mb_model_close(m);
    /* attention: a window covering everything equals no window; a window of 1 returns v of the same position */
    int64_t S = 2, T = 9, nh = 4, nkv = 2, hd = 8;
    float *q = malloc(S * T * nh * hd * 4), *k = malloc(S * T * nkv * hd * 4), *v = malloc(S * T * nkv * hd * 4);
    float *o0 = malloc(S * T * nh * hd * 4), *o1 = malloc(S * T * nh * hd * 4), *o2 = malloc(S * T * nh * hd * 4);
    struct mb_rng g = {3};
    for (int64_t i = 0; i < S * T * nh * hd; i++) q[i] = mb_rng_normal(&g);
    for (int64_t i = 0; i < S * T * nkv * hd; i++) { k[i] = mb_rng_normal(&g); v[i] = mb_rng_normal(&g); }
    mb_ops_cpu.attention(o0, q, k, v, S, T, nh, nkv, hd, 0);
    mb_ops_cpu.attention(o1, q, k, v, S, T, nh, nkv, hd, T);
    mb_ops_cpu.attention(o2, q, k, v, S, T, nh, nkv, hd, 1);
    double dmax = 0, mv = 0;
    for (int64_t i = 0; i < S * T * nh * hd; i++) if (fabs(o0[i] - o1[i]) > dmax) dmax = fabs(o0[i] - o1[i]);
    for (int64_t r = 0; r < S * T; r++)
        for (int64_t h = 0; h < nh; h++)
            for (int64_t e = 0; e < hd; e++) {
                double d = fabs(o2[(r * nh + h) * hd + e] - v[(r * nkv + h / 2) * hd + e]);
                if (d > mv) mv = d;
            }
    CHECK(dmax < 1e-6);
    CHECK(mv < 1e-6);
    /* the first position attends only to itself in every case */
    for (int64_t e = 0; e < hd; e++) CHECK_NEAR(o0[e], v[e], 1e-6);
    free(q); free(k); free(v); free(o0); free(o1); free(o2);
}

/* a copy of stories260K with one value of `tensor` (element `at`) set to v */
static int poisoned_copy(const char *dir, const char *tensor, int64_t at, float v) {
    char src[512], cmd[2048], p[600];
    snprintf(src, sizeof src, "%s/models/stories260K", th_shared());
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s && cp %s/* %s/", dir, dir, src, dir);
    if (system(cmd)) return -1;
    struct mb_st_set *s = NULL;
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    if (mb_st_set_open(p, &s)) return -1;
    const struct mb_tensor_info *t = mb_st_find(s, tensor);
    long off = t ? (long)(8 + s->files[0]->header_len + t->offset + at * 4) : -1;
    mb_st_set_close(s);
    if (off < 0) return -1;
    FILE *f = fopen(p, "r+b");
    if (!f) return -1;
    fseek(f, off, SEEK_SET);
    fwrite(&v, 4, 1, f);
    fclose(f);
    return 0;
}

/* non-finite weights are named; invalid reference log-probabilities and NaN perplexities are errors */
static void test_nonfinite(void) {
    char dir[256], tp[512];
    snprintf(dir, sizeof dir, "/tmp/mb_test_nan_%ld", (long)getpid());
    snprintf(tp, sizeof tp, "%s/text/tinystories-sample.txt", th_shared());
    const char *tensors[] = {"model.layers.2.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight", "model.layers.1.input_layernorm.weight"};
    for (int k = 0; k < 3; k++) {
        CHECK_EQ(poisoned_copy(dir, tensors[k], 5, k == 1 ? INFINITY : NAN), 0);
        struct mb_model *m = NULL;
        struct mb_tokenizer *t = NULL;
        CHECK_EQ(mb_model_open(dir, &m), 0);
        CHECK_EQ(mb_tokenizer_load(dir, &t), 0);
        if (!m || !t) { mb_model_close(m); mb_tokenizer_free(t); continue; }
        struct mb_ppl_params pp;
        mb_ppl_default_params(&pp);
        pp.ctx = 64;
        pp.progress = 0;
        struct mb_ppl_result r;
        CHECK_EQ(mb_ppl_run_file(m, t, tp, &pp, &r), MB_ENUMERIC);
        CHECK_MSG(strstr(mb_errmsg(), tensors[k]) != NULL, "%s: %s", tensors[k], mb_errmsg());
        mb_model_close(m);
        mb_tokenizer_free(t);
    }
    /* the final norm: the logits are not finite; a clear error, never "perplexity nan" */
    CHECK_EQ(poisoned_copy(dir, "model.norm.weight", 3, NAN), 0);
    struct mb_model *m = NULL;
    struct mb_tokenizer *t = NULL;
    CHECK_EQ(mb_model_open(dir, &m), 0);
    CHECK_EQ(mb_tokenizer_load(dir, &t), 0);
    if (m && t) {
        struct mb_ppl_params pp;
        mb_ppl_default_params(&pp);
        pp.ctx = 64;
        pp.progress = 0;
        struct mb_ppl_result r;
        CHECK_EQ(mb_ppl_run_file(m, t, tp, &pp, &r), MB_ENUMERIC);
        CHECK_MSG(strstr(mb_errmsg(), "not finite") != NULL, "%s", mb_errmsg());
    }
    mb_model_close(m);
    mb_tokenizer_free(t);
    /* a reference file with a NaN or a positive log-probability is refused */
    char md[512], lp[600], cmd[700];
    snprintf(md, sizeof md, "%s/models/stories260K", th_shared());
    snprintf(lp, sizeof lp, "%s/ref.bin", dir);
    CHECK_EQ(mb_model_open(md, &m), 0);
    CHECK_EQ(mb_tokenizer_load(md, &t), 0);
    if (m && t) {
        struct mb_ppl_params pp;
        mb_ppl_default_params(&pp);
        pp.ctx = 64;
        pp.progress = 0;
        pp.topk = 4;
        pp.save_logprobs = lp;
        struct mb_ppl_result r;
        CHECK_EQ(mb_ppl_run_file(m, t, tp, &pp, &r), 0);
        pp.save_logprobs = NULL;
        pp.kld = lp;
        const float bad[2] = {NAN, 3.0f};
        for (int b = 0; b < 2; b++) {
            FILE *f = fopen(lp, "r+b");
            CHECK(f != NULL);
            if (!f) break;
            fseek(f, 56 + 36 * 7 + 8 * 2 + 4, SEEK_SET); /* record 7, entry 2: its log-probability */
            fwrite(&bad[b], 4, 1, f);
            fclose(f);
            CHECK_EQ(mb_ppl_run_file(m, t, tp, &pp, &r), MB_EFORMAT);
            CHECK_MSG(strstr(mb_errmsg(), "not a log-probability") != NULL, "%s", mb_errmsg());
        }
    }
    mb_model_close(m);
    mb_tokenizer_free(t);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd)) {}
}

/* texts that are not regular files, or gzip data cut short, are errors naming the file (never a hang, never a
 * shorter text read as if whole) */
static void test_bad_texts(void) {
    char md[512], fifo[256], gz[256], cut[256], cmd[1200];
    snprintf(md, sizeof md, "%s/models/stories260K", th_shared());
    snprintf(fifo, sizeof fifo, "/tmp/mb_test_fifo_%ld", (long)getpid());
    snprintf(gz, sizeof gz, "/tmp/mb_test_text_%ld.gz", (long)getpid());
    snprintf(cut, sizeof cut, "/tmp/mb_test_cut_%ld.gz", (long)getpid());
    unlink(fifo);
    CHECK_EQ(mkfifo(fifo, 0600), 0);
    snprintf(cmd, sizeof cmd, "gzip -c < %s/text/wikitext-2-raw-test.txt > %s && head -c 30000 %s > %s", th_shared(), gz, gz, cut);
    CHECK_EQ(system(cmd), 0);
    struct mb_model *m = NULL;
    struct mb_tokenizer *t = NULL;
    CHECK_EQ(mb_model_open(md, &m), 0);
    CHECK_EQ(mb_tokenizer_load(md, &t), 0);
    if (m && t) {
        struct mb_ppl_params pp;
        mb_ppl_default_params(&pp);
        pp.ctx = 64;
        pp.progress = 0;
        struct mb_ppl_result r;
        const char *bad[] = {fifo, "/dev/zero", cut};
        for (int k = 0; k < 3; k++) {
            alarm(20); /* a blocking read fails the test instead of hanging it */
            int rc = mb_ppl_run_file(m, t, bad[k], &pp, &r);
            alarm(0);
            CHECK_MSG(rc != 0 && strstr(mb_errmsg(), bad[k]), "%s: %d %s", bad[k], rc, mb_errmsg());
        }
        pp.max_tokens = 300; /* the whole file reads fine */
        CHECK_EQ(mb_ppl_run_file(m, t, gz, &pp, &r), 0);
    }
    mb_model_close(m);
    mb_tokenizer_free(t);
    unlink(fifo);
    unlink(gz);
    unlink(cut);
}

/* ---- the sensitivity pass ---- */

/* layer w with one projection of module m replaced by wp (MoE MLP: expert 0's down projection); xw holds the
 * copied expert array */
static struct mb_layer_w sens_probe_layer(const struct mb_layer_w *w, int m, const struct mb_weight *wp, struct mb_weight *xw) {
    struct mb_layer_w q = *w;
    if (m % 2 == 0) q.w[MB_P_O] = *wp;
    else if (!w->n_experts) q.w[MB_P_DOWN] = *wp;
    else {
        memcpy(xw, w->xw[2], (size_t)w->n_experts * sizeof *xw);
        xw[0] = *wp;
        q.xw[2] = xw;
    }
    return q;
}

static const struct mb_weight *sens_target(const struct mb_layer_w *w, int m) {
    return m % 2 == 0 ? &w->w[MB_P_O] : !w->n_experts ? &w->w[MB_P_DOWN] : &w->xw[2][0];
}

static void sens_check(const char *model) {
    char md[512];
    snprintf(md, sizeof md, "%s/models/%s", th_shared(), model);
    struct mb_model *mdl = NULL;
    CHECK_EQ(mb_model_open(md, &mdl), 0);
    if (!mdl) return;
    const struct mb_config *c = &mdl->cfg;
    const struct mb_ops *o = &mb_ops_cpu;
    const int64_t S = 2, L = 64, H = c->hidden, V = c->vocab, CR = 128;
    int nmod = (int)(2 * c->n_layers);
    int32_t ids[2 * 64];
    struct mb_rng g = {11};
    for (int i = 0; i < S * L; i++) ids[i] = i % L == 0 ? 1 : 3 + (int32_t)(mb_rng_next(&g) % (uint64_t)(V - 3));
    struct mb_fwd f;
    struct mb_states st;
    struct mb_sens z;
    float **pert = calloc((size_t)nmod, sizeof *pert);
    struct mb_weight *xw = calloc((size_t)(c->n_experts + 1), sizeof *xw);
    float *x = malloc((size_t)(S * L * H) * sizeof *x), *x0 = malloc((size_t)(S * L * H) * sizeof *x0), *y0 = malloc((size_t)(S * L * H) * sizeof *y0);
    float *lr = malloc((size_t)(S * L * V) * sizeof *lr), *lq = malloc((size_t)(S * L * V) * sizeof *lq);
    CHECK_EQ(mb_fwd_init(&f, mdl, o, CR, L), 0);
    CHECK_EQ(mb_states_open(&st, o, S, L, H, 0, NULL), 0);
    CHECK_EQ(mb_states_embed(&st, &f, ids, CR), 0);
    CHECK_EQ(mb_sens_open(&z, o, nmod, S, L, H), 0);
    /* the probes: the module's output projection with relative noise 0.05 (module 1: none, an exact probe) */
    for (int m = 0; m < nmod; m++) {
        const struct mb_layer_w *w;
        CHECK_EQ(mb_fwd_layer(&f, m / 2, &w), 0);
        const struct mb_weight *t = sens_target(w, m);
        CHECK_EQ(t->type, MB_W_F32);
        pert[m] = malloc((size_t)(t->n * t->k) * sizeof **pert);
        const float *src = t->data;
        double ss = 0;
        for (int64_t i = 0; i < t->n * t->k; i++) ss += (double)src[i] * src[i];
        float sd = m == 1 ? 0.0f : (float)(0.05 * sqrt(ss / (double)(t->n * t->k)));
        for (int64_t i = 0; i < t->n * t->k; i++) pert[m][i] = src[i] + sd * (float)(2 * mb_rng_uniform(&g) - 1) * 1.7320508f;
        struct mb_weight wp = mb_weight_view_f32(pert[m], t->n, t->k, "probe");
        struct mb_layer_w q = sens_probe_layer(w, m, &wp, xw);
        CHECK_EQ(mb_states_forward(&st, &f, w, m, CR, NULL), 0);
        CHECK_EQ(mb_sens_module(&z, &st, &f, w, &q, m, CR), 0);
        st.cur ^= 1;
    }
    CHECK_EQ(mb_sens_finish(&z, &st, &f, CR), 0);
    /* independently: the whole model with one module probed, full-vocabulary KLD in f64 */
    CHECK_EQ(mb_fwd_embed(&f, ids, S * L, x), 0);
    CHECK_EQ(mb_fwd_run(&f, 0, nmod, x, S, L, NULL), 0);
    CHECK_EQ(mb_fwd_logits(&f, x, S * L, lr), 0);
    int probe[3] = {0, nmod / 2 + 1, nmod - 1};
    for (int pi = 0; pi < 3; pi++) {
        int m0 = probe[pi];
        double err = 0, kl = 0;
        CHECK_EQ(mb_fwd_embed(&f, ids, S * L, x), 0);
        for (int m = 0; m < nmod; m++) {
            const struct mb_layer_w *w;
            CHECK_EQ(mb_fwd_layer(&f, m / 2, &w), 0);
            if (m != m0) { CHECK_EQ(mb_fwd_module(&f, w, m, x, S, L, NULL), 0); continue; }
            struct mb_weight wp = mb_weight_view_f32(pert[m], sens_target(w, m)->n, sens_target(w, m)->k, "probe");
            struct mb_layer_w q = sens_probe_layer(w, m, &wp, xw);
            memcpy(x0, x, (size_t)(S * L * H) * sizeof *x);
            CHECK_EQ(mb_fwd_module(&f, w, m, x0, S, L, NULL), 0);
            CHECK_EQ(mb_fwd_module(&f, &q, m, x, S, L, NULL), 0);
            memcpy(y0, x0, (size_t)(S * L * H) * sizeof *x);
            for (int64_t s = 0; s < S; s++) {
                double d = 0, r = 0;
                for (int64_t i = s * L * H; i < (s + 1) * L * H; i++) { d += ((double)x[i] - y0[i]) * ((double)x[i] - y0[i]); r += (double)y0[i] * y0[i]; }
                err += sqrt(d / r) / S;
            }
        }
        CHECK_EQ(mb_fwd_logits(&f, x, S * L, lq), 0);
        for (int64_t i = 0; i < S * L; i++) {
            const float *a = lr + i * V, *b = lq + i * V;
            double ma = -INFINITY, mq = -INFINITY, sa = 0, sq = 0, k = 0;
            for (int64_t v = 0; v < V; v++) { if (a[v] > ma) ma = a[v]; if (b[v] > mq) mq = b[v]; }
            for (int64_t v = 0; v < V; v++) { sa += exp(a[v] - ma); sq += exp(b[v] - mq); }
            for (int64_t v = 0; v < V; v++) {
                double la = a[v] - ma - log(sa), lb = b[v] - mq - log(sq);
                k += exp(la) * (la - lb);
            }
            kl += k / (double)(S * L);
        }
        fprintf(stderr, "  %s module %d: KLD %.4e (full vocabulary %.4e), error %.4e (%.4e)\n", model, m0, z.kld[m0], kl, z.err[m0], err);
        CHECK_MSG(kl > 0 && fabs(z.kld[m0] - kl) <= 0.03 * kl, "module %d: %g vs %g", m0, z.kld[m0], kl);
        CHECK_MSG(z.kld[m0] <= kl * (1 + 1e-6) + 1e-12, "module %d: top-k KLD %g above the full one %g", m0, z.kld[m0], kl);
        CHECK_MSG(fabs(z.err[m0] - err) <= 1e-5 * err, "module %d: error %g vs %g", m0, z.err[m0], err);
    }
    CHECK_MSG(z.kld[1] < 1e-9 && z.err[1] == 0, "an exact probe: KLD %g, error %g", z.kld[1], z.err[1]);
    for (int m = 0; m < nmod; m++) if (m != 1) CHECK_MSG(z.kld[m] > 0 && z.err[m] > 0, "module %d: KLD %g error %g", m, z.kld[m], z.err[m]);
    mb_sens_close(&z);
    mb_states_close(&st);
    mb_fwd_free(&f);
    for (int m = 0; m < nmod; m++) free(pert[m]);
    free(pert);
    free(xw);
    free(x); free(x0); free(y0); free(lr); free(lq);
    mb_model_close(mdl);
}

static void test_sensitivity(void) {
    sens_check("stories260K");
    sens_check("stories260K-moe4");
}

int main(void) {
    RUN(test_nll_reference);
    RUN(test_moe_equals_dense);
    RUN(test_ppl_reference);
    RUN(test_kld);
    RUN(test_stream_and_stride);
    RUN(test_rope_and_window);
    RUN(test_nonfinite);
    RUN(test_bad_texts);
    RUN(test_sensitivity);
    TEST_MAIN_END();
}
