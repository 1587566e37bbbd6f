/* tests/test_convert.c: `mixbit convert` end to end on the small models: output layout and an
 * independent check of every EXL2 layer, bpw within 0.02 of the target, kill -9 + resume giving
 * byte-identical output, measurement reuse, and clear failures (unreachable bpw, unsupported
 * architecture, missing tokenizer, full disk) that leave nothing under the final name. */
#include <jansson.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../calib/calib.h"
#include "../quant/quant.h"
#include "harness.h"

static char tmpdir[256];

static const char *mixbit(void) {
    const char *m = getenv("MIXBIT");
    return m ? m : "./mixbit";
}

/* run a command through bash; returns the exit code (128+signal when killed); stderr captured */
static int run(const char *cmd, char *err, size_t errsz) {
    char full[4096], ef[300];
    snprintf(ef, sizeof ef, "%s/stderr.txt", tmpdir);
    snprintf(full, sizeof full, "bash -c '%s' >/dev/null 2>%s", cmd, ef);
    int st = system(full);
    if (err) {
        err[0] = 0;
        FILE *f = fopen(ef, "r");
        if (f) { size_t n = fread(err, 1, errsz - 1, f); err[n] = 0; fclose(f); }
    }
    if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 255;
}

static int files_equal(const char *a, const char *b) {
    char *x, *y;
    size_t nx, ny;
    if (mb_read_file(a, &x, &nx, 0)) return 0;
    if (mb_read_file(b, &y, &ny, 0)) { free(x); return 0; }
    int eq = nx == ny && memcmp(x, y, nx) == 0;
    free(x);
    free(y);
    return eq;
}

static double report_num(const char *dir, const char *key) {
    char p[512], *t;
    size_t n;
    snprintf(p, sizeof p, "%s/mixbit-report.json", dir);
    if (mb_read_file(p, &t, &n, 0)) return NAN;
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\": ", key);
    char *h = strstr(t, pat);
    double v = h ? strtod(h + strlen(pat), NULL) : NAN;
    free(t);
    return v;
}

#define SMALL "--rows 12 --measure-rows 6 --length 128 --eval-ctx 128 -q"

/* every quantized layer: valid structure, and its weights close to the source model's */
static void check_layers(const char *src, const char *out) {
    struct mb_model *a = NULL, *q = NULL;
    CHECK_EQ(mb_model_open(src, &a), 0);
    CHECK_MSG(mb_model_open(out, &q) == 0, "%s", mb_errmsg());
    if (!a || !q) { mb_model_close(a); mb_model_close(q); return; }
    CHECK(q->cfg.is_exl2);
    int nq = 0;
    for (int i = 0; i < q->n_ex; i++) {
        const struct mb_expect *e = &q->ex[i];
        if (e->kind != MB_T_LINEAR) continue;
        char nm[200];
        if (e->cols % 32) { /* input size not a multiple of 32: kept F16, never padded EXL2 (ExLlamaV2 would refuse it) */
            snprintf(nm, sizeof nm, "%s.q_weight", e->name);
            CHECK_MSG(!mb_st_find(q->st, nm), "%s is EXL2 with K = %lld", e->name, (long long)e->cols);
            snprintf(nm, sizeof nm, "%s.weight", e->name);
            const struct mb_tensor_info *t = mb_st_find(q->st, nm);
            CHECK_MSG(t && t->dtype == MB_F16, "%s: no F16 weight", e->name);
            continue;
        }
        struct mb_exl2_layer L;
        int rc = mb_exl2_from_set(q->st, e->name, e->rows, e->cols, &L);
        CHECK_MSG(rc == 0, "%s: %s", e->name, mb_errmsg());
        if (rc) continue;
        CHECK_EQ(L.Kp, L.K); /* no padding rows */
        nq++;
        float *w0 = malloc(e->rows * e->cols * sizeof *w0), *w1 = malloc(e->rows * e->cols * sizeof *w1);
        struct mb_weight v0;
        CHECK_EQ(mb_model_weight(a, e->name, e->rows, e->cols, &v0), 0);
        CHECK_EQ(mb_weight_rows_f32(&v0, 0, e->rows, w0), 0);
        CHECK_EQ(mb_exl2_load_dense(q->st, e->name, e->rows, e->cols, w1), 0);
        double d = 0, n = 0;
        for (int64_t k = 0; k < e->rows * e->cols; k++) { d += (w1[k] - w0[k]) * (double)(w1[k] - w0[k]); n += (double)w0[k] * w0[k]; }
        CHECK_MSG(sqrt(d / n) < 0.5, "%s: relative weight error %.3f", e->name, sqrt(d / n));
        free(w0);
        free(w1);
    }
    CHECK(nq > 0);
    CHECK(mb_st_find(q->st, "lm_head.q_weight") != NULL);
    CHECK(mb_st_find(q->st, "model.embed_tokens.weight") && mb_st_find(q->st, "model.embed_tokens.weight")->dtype == MB_F16);
    mb_model_close(a);
    mb_model_close(q);
}

static void test_convert_models(void) {
    const char *models[] = {"stories260K", "stories260K-moe4"};
    for (int i = 0; i < 2; i++) {
        char cmd[2048], out[512], err[8192], src[512];
        snprintf(src, sizeof src, "%s/models/%s", th_shared(), models[i]);
        snprintf(out, sizeof out, "%s/%s-3.5", tmpdir, models[i]);
        /* stories260K's down_proj has 172 inputs: kept F16 (16 bits in the budget), so the reachable range starts
         * near 5.9 bpw (6.7 for the MoE copy) */
        snprintf(cmd, sizeof cmd, "%s convert %s %s --bpw 7 --cal %s/text/tinystories-sample.txt --eval %s/text/tinystories-sample.txt " SMALL,
                 mixbit(), src, out, th_shared(), th_shared());
        int ec = run(cmd, err, sizeof err);
        CHECK_MSG(ec == 0, "%s: exit %d: %s", models[i], ec, err);
        if (ec) continue;
        double bpw = report_num(out, "decoder_bpw");
        CHECK_MSG(fabs(bpw - 7) <= 0.02, "%s: decoder bpw %.4f", models[i], bpw);
        char p[600];
        snprintf(p, sizeof p, "%s.partial", out);
        CHECK(!mb_is_dir(p));
        const char *files[] = {"output.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "measurement.json", "mixbit-report.json"};
        for (int k = 0; k < 6; k++) {
            snprintf(p, sizeof p, "%s/%s", out, files[k]);
            CHECK_MSG(mb_file_exists(p), "%s missing", p);
        }
        check_layers(src, out);
        double before = report_num(out, "ppl_before"), after = report_num(out, "ppl_after");
        CHECK(before > 1 && after > 1);
        fprintf(stderr, "  %s at 7 bpw: decoder %.4f bpw, ppl %.3f -> %.3f\n", models[i], bpw, before, after);
        /* the output evaluates with mixbit ppl and shows up in inspect */
        snprintf(cmd, sizeof cmd, "%s ppl %s --text %s/text/tinystories-sample.txt --ctx 128 -q", mixbit(), out, th_shared());
        CHECK_EQ(run(cmd, err, sizeof err), 0);
        snprintf(cmd, sizeof cmd, "%s inspect %s --summary | grep -q \"quantized layer\"", mixbit(), out);
        CHECK_EQ(run(cmd, err, sizeof err), 0);
        if (i == 1) { /* MoE: tokens per expert reported */
            snprintf(p, sizeof p, "%s/mixbit-report.json", out);
            char *t;
            size_t n;
            CHECK_EQ(mb_read_file(p, &t, &n, 0), 0);
            CHECK(strstr(t, "\"expert_tokens\"") != NULL);
            free(t);
        }
    }
}

/* kill -9 in the middle of measurement, the sensitivity pass and quantization, resume, compare with an uninterrupted run */
static void test_kill_resume(void) {
    char src[512], ref[512], out[512], cmd[2048], err[8192], a[700], b[700];
    snprintf(src, sizeof src, "%s/models/stories260K-moe4", th_shared());
    snprintf(ref, sizeof ref, "%s/ref", tmpdir);
    const char *common = "--bpw 7 --no-eval --checkpoint-interval 0 " SMALL;
    snprintf(cmd, sizeof cmd, "%s convert %s %s --cal %s/text/tinystories-sample.txt %s", mixbit(), src, ref, th_shared(), common);
    CHECK_EQ(run(cmd, err, sizeof err), 0);
    /* the last two keep the hidden states in memory-mapped files (--max-memory below their size) */
    const char *kills[] = {"measure:3", "quant:5", "measure:2", "measure:0", "quant:3", "sens:4"};
    const char *intervals[] = {"", "--checkpoint-interval 60", "--max-memory 0.1", "", "--max-memory 0.1", "--max-memory 0.1"};
    /* under ASan the first three (every path: in memory, the 60 s cadence, memory-mapped states) keep make
     * check within its time; the normal build runs all five */
    int nk = getenv("MB_ASAN") ? 3 : 6;
    for (int k = 0; k < nk; k++) {
        snprintf(out, sizeof out, "%s/killed%d", tmpdir, k);
        snprintf(cmd, sizeof cmd, "MB_TEST_KILL=%s %s convert %s %s --cal %s/text/tinystories-sample.txt %s %s", kills[k], mixbit(), src, out, th_shared(), common,
                 intervals[k]);
        int ec = run(cmd, err, sizeof err);
        CHECK_MSG(ec == 128 + 9, "kill at %s: exit %d", kills[k], ec);
        CHECK(!mb_is_dir(out));
        snprintf(cmd, sizeof cmd, "%s convert %s %s --cal %s/text/tinystories-sample.txt %s %s", mixbit(), src, out, th_shared(), common, intervals[k]);
        ec = run(cmd, err, sizeof err);
        CHECK_MSG(ec == 0, "resume after %s: exit %d: %s", kills[k], ec, err);
        const char *files[] = {"output.safetensors", "measurement.json"};
        for (int f = 0; f < 2; f++) {
            snprintf(a, sizeof a, "%s/%s", ref, files[f]);
            snprintf(b, sizeof b, "%s/%s", out, files[f]);
            CHECK_MSG(files_equal(a, b), "%s differs after kill at %s and resume", files[f], kills[k]);
        }
    }
    /* a rerun with other options does not touch a pending conversion */
    snprintf(out, sizeof out, "%s/pending", tmpdir);
    snprintf(cmd, sizeof cmd, "MB_TEST_KILL=quant:0 %s convert %s %s --cal %s/text/tinystories-sample.txt %s", mixbit(), src, out, th_shared(), common);
    CHECK_EQ(run(cmd, err, sizeof err), 137);
    snprintf(cmd, sizeof cmd, "%s convert %s %s --cal %s/text/tinystories-sample.txt --bpw 7.5 --no-eval " SMALL, mixbit(), src, out, th_shared());
    CHECK_EQ(run(cmd, err, sizeof err), 1);
    CHECK(strstr(err, "other options") != NULL);
    /* measurement reuse: another target from the same measurement.json, no measurement pass */
    snprintf(out, sizeof out, "%s/reuse", tmpdir);
    snprintf(cmd, sizeof cmd, "%s convert %s %s --cal %s/text/tinystories-sample.txt --bpw 8 --no-eval --measurement %s/measurement.json " SMALL " -v",
             mixbit(), src, out, th_shared(), ref);
    CHECK_EQ(run(cmd, err, sizeof err), 0);
    CHECK(strstr(err, "measuring") == NULL);
    double bpw = report_num(out, "decoder_bpw");
    CHECK_MSG(fabs(bpw - 8) <= 0.02, "reuse: %.4f", bpw);
    /* the file holds the sensitivity pass's results: not run again */
    CHECK_MSG(strstr(err, "sensitivity:") == NULL, "%s", err);
    CHECK(report_num(out, "sensitivity_tokens") > 0);
    /* a measurement.json without them (the reference converter's kind) runs the pass; a broken one is refused */
    char mp[700], mq[700];
    snprintf(mp, sizeof mp, "%s/measurement.json", ref);
    snprintf(mq, sizeof mq, "%s/meas-nosens.json", tmpdir);
    json_t *mj = json_load_file(mp, 0, NULL);
    CHECK(mj && json_object_get(mj, "mixbit_sensitivity"));
    if (!mj) return;
    json_t *sj = json_incref(json_object_get(mj, "mixbit_sensitivity"));
    json_object_del(mj, "mixbit_sensitivity");
    json_dump_file(mj, mq, 0);
    snprintf(out, sizeof out, "%s/reuse2", tmpdir);
    snprintf(cmd, sizeof cmd, "%s convert %s %s --cal %s/text/tinystories-sample.txt --bpw 8 --no-eval --measurement %s " SMALL " -v", mixbit(), src, out, th_shared(), mq);
    CHECK_EQ(run(cmd, err, sizeof err), 0);
    CHECK_MSG(strstr(err, "sensitivity:") != NULL && strstr(err, "measuring") == NULL, "%s", err);
    json_t *mods = json_object_get(sj, "modules");
    json_object_set_new(json_object_get(mods, "model.layers.1.block_sparse_moe"), "kld", json_real(-1));
    json_object_set_new(mj, "mixbit_sensitivity", sj);
    json_dump_file(mj, mq, 0);
    json_decref(mj);
    snprintf(out, sizeof out, "%s/reuse3", tmpdir);
    snprintf(cmd, sizeof cmd, "%s convert %s %s --cal %s/text/tinystories-sample.txt --bpw 8 --no-eval --measurement %s " SMALL, mixbit(), src, out, th_shared(), mq);
    CHECK_EQ(run(cmd, err, sizeof err), 1);
    CHECK_MSG(strstr(err, "meas-nosens.json") && strstr(err, "model.layers.1.block_sparse_moe"), "%s", err);
    /* off: the allocation of ExLlamaV2 (summed errors), and the report says so */
    snprintf(out, sizeof out, "%s/nosens", tmpdir);
    snprintf(cmd, sizeof cmd, "%s convert %s %s --cal %s/text/tinystories-sample.txt --bpw 8 --no-eval --measurement %s/measurement.json --sens-tokens 0 " SMALL " -v",
             mixbit(), src, out, th_shared(), ref);
    CHECK_EQ(run(cmd, err, sizeof err), 0);
    CHECK_EQ(report_num(out, "sensitivity_tokens"), 0);
    CHECK(strstr(err, "sensitivity:") == NULL);
}

static void test_failures(void) {
    char cmd[2048], err[8192], out[512], p[700], dir[512];
    /* unreachable target: immediate, with the range */
    snprintf(out, sizeof out, "%s/unreach", tmpdir);
    snprintf(cmd, sizeof cmd, "%s convert %s/models/kjv-llama %s --bpw 1.5 --cal %s/text/calib-kjv-jargon.txt --no-eval", mixbit(), th_shared(), out, th_shared());
    CHECK_EQ(run(cmd, err, sizeof err), 1);
    CHECK_MSG(strstr(err, "outside the reachable range 2.2") != NULL && !strstr(err, "warning"), "%s", err);
    snprintf(p, sizeof p, "%s.partial", out);
    CHECK(!mb_is_dir(out) && !mb_is_dir(p));
    /* unsupported architecture */
    snprintf(dir, sizeof dir, "%s/gpt2", tmpdir);
    mb_mkdir_p(dir);
    snprintf(p, sizeof p, "%s/config.json", dir);
    FILE *f = fopen(p, "w");
    fputs("{\"architectures\": [\"GPT2LMHeadModel\"], \"n_embd\": 64}", f);
    fclose(f);
    snprintf(cmd, sizeof cmd, "%s convert %s %s/o1 --cal %s/text/calib-kjv-jargon.txt --no-eval", mixbit(), dir, tmpdir, th_shared());
    CHECK_EQ(run(cmd, err, sizeof err), 1);
    CHECK(strstr(err, "GPT2LMHeadModel") && strstr(err, "LlamaForCausalLM"));
    /* missing tokenizer: a copy of stories260K without tokenizer.json */
    snprintf(dir, sizeof dir, "%s/notok", tmpdir);
    snprintf(cmd, sizeof cmd, "mkdir -p %s && cp %s/models/stories260K/config.json %s/models/stories260K/model.safetensors %s/", dir, th_shared(), th_shared(), dir);
    CHECK_EQ(run(cmd, err, sizeof err), 0);
    snprintf(out, sizeof out, "%s/o2", tmpdir);
    snprintf(cmd, sizeof cmd, "%s convert %s %s --cal %s/text/tinystories-sample.txt --no-eval", mixbit(), dir, out, th_shared());
    CHECK_EQ(run(cmd, err, sizeof err), 1);
    CHECK_MSG(strstr(err, "tokenizer") != NULL, "%s", err);
    snprintf(p, sizeof p, "%s.partial", out);
    CHECK(!mb_is_dir(out) && !mb_is_dir(p));
    /* full disk, simulated with a file size limit: a clear error and nothing under the final name */
    snprintf(out, sizeof out, "%s/o3", tmpdir);
    snprintf(cmd, sizeof cmd, "ulimit -f 200; %s convert %s/models/stories260K %s --bpw 7 --cal %s/text/tinystories-sample.txt --no-eval " SMALL, mixbit(), th_shared(),
             out, th_shared());
    int ec = run(cmd, err, sizeof err);
    CHECK_EQ(ec, 1);
    CHECK_MSG(strstr(err, "File too large") || strstr(err, "No space"), "%s", err);
    CHECK(!mb_is_dir(out));
    /* an existing output directory is not overwritten */
    snprintf(cmd, sizeof cmd, "%s convert %s/models/stories260K %s --cal %s/text/tinystories-sample.txt --no-eval", mixbit(), th_shared(), tmpdir, th_shared());
    CHECK_EQ(run(cmd, err, sizeof err), 1);
    CHECK(strstr(err, "already exists") != NULL);
    /* checkable inputs fail before any long stage, leaving nothing: an empty or invalid UTF-8 --eval, an eval
     * context beyond the model, a missing output directory */
    const char *evals[] = {"empty", "badutf8"};
    for (int k = 0; k < 2; k++) {
        snprintf(p, sizeof p, "%s/%s.txt", tmpdir, evals[k]);
        FILE *ef = fopen(p, "wb");
        if (k == 1) fputs("In the beginning \xff\xfe God\n", ef);
        fclose(ef);
        snprintf(out, sizeof out, "%s/o_%s", tmpdir, evals[k]);
        snprintf(cmd, sizeof cmd, "%s convert %s/models/stories260K %s --bpw 7 --cal %s/text/tinystories-sample.txt --eval %s " SMALL, mixbit(), th_shared(), out,
                 th_shared(), p);
        CHECK_EQ(run(cmd, err, sizeof err), 1);
        CHECK_MSG(strstr(err, p) != NULL, "%s: %s", evals[k], err);
        snprintf(p, sizeof p, "%s.partial", out);
        CHECK(!mb_is_dir(out) && !mb_is_dir(p));
    }
    snprintf(cmd, sizeof cmd, "%s convert %s/models/stories260K %s/o_ctx --bpw 7 --cal %s/text/tinystories-sample.txt --eval %s/text/tinystories-sample.txt --eval-ctx 4096", mixbit(),
             th_shared(), tmpdir, th_shared(), th_shared());
    CHECK_EQ(run(cmd, err, sizeof err), 2);
    CHECK_MSG(strstr(err, "max_position_embeddings") != NULL, "%s", err);
    /* a missing output directory is created (as mkdir -p); one that cannot be (a file on the path) fails at once */
    snprintf(out, sizeof out, "%s/new/sub/out", tmpdir);
    snprintf(cmd, sizeof cmd, "%s convert %s/models/stories260K %s --bpw 7 --cal %s/text/tinystories-sample.txt --no-eval " SMALL, mixbit(), th_shared(), out, th_shared());
    CHECK_EQ(run(cmd, err, sizeof err), 0);
    CHECK(mb_is_dir(out));
    snprintf(p, sizeof p, "%s/afile", tmpdir);
    FILE *af = fopen(p, "w");
    if (af) fclose(af);
    snprintf(cmd, sizeof cmd, "%s convert %s/models/stories260K %s/afile/out --bpw 7 --cal %s/text/tinystories-sample.txt --no-eval", mixbit(), th_shared(), tmpdir,
             th_shared());
    CHECK_EQ(run(cmd, err, sizeof err), 1);
    CHECK_MSG(strstr(err, "cannot create the output's directory") != NULL && strstr(err, "afile") != NULL, "%s", err);
    /* a trailing slash names the same output */
    snprintf(out, sizeof out, "%s/o_slash", tmpdir);
    snprintf(cmd, sizeof cmd, "%s convert %s/models/stories260K %s/ --bpw 7 --cal %s/text/tinystories-sample.txt --no-eval " SMALL, mixbit(), th_shared(), out, th_shared());
    CHECK_EQ(run(cmd, err, sizeof err), 0);
    CHECK(mb_is_dir(out));
    /* Ctrl-C: a message saying how to continue, exit 130, and the same command continues */
    snprintf(out, sizeof out, "%s/o_int", tmpdir);
    snprintf(cmd, sizeof cmd, "%s convert %s/models/kjv-llama %s --bpw 4 --cal %s/text/calib-kjv-jargon.txt --no-eval --rows 4 --measure-rows 2 --length 128 "
             "--checkpoint-interval 0 & pid=$!; sleep 3; kill -INT $pid; wait $pid", mixbit(), th_shared(), out, th_shared());
    ec = run(cmd, err, sizeof err);
    CHECK_MSG(ec == 130 && strstr(err, "run the same command again"), "exit %d: %s", ec, err);
    snprintf(cmd, sizeof cmd, "%s convert %s/models/kjv-llama %s --bpw 4 --cal %s/text/calib-kjv-jargon.txt --no-eval --rows 4 --measure-rows 2 --length 128 "
             "--checkpoint-interval 0", mixbit(), th_shared(), out, th_shared());
    CHECK_EQ(run(cmd, err, sizeof err), 0);
    /* two conversions into one output at once: the second is refused */
    snprintf(out, sizeof out, "%s/o_twice", tmpdir);
    snprintf(cmd, sizeof cmd, "%s convert %s/models/kjv-llama %s --bpw 4 --cal %s/text/calib-kjv-jargon.txt --no-eval --rows 4 --measure-rows 2 --length 128 & "
             "sleep 1; %s convert %s/models/kjv-llama %s --bpw 4 --cal %s/text/calib-kjv-jargon.txt --no-eval --rows 4 --measure-rows 2 --length 128; ec=$?; wait; exit $ec",
             mixbit(), th_shared(), out, th_shared(), mixbit(), th_shared(), out, th_shared());
    ec = run(cmd, err, sizeof err);
    CHECK_MSG(ec == 1 && strstr(err, "another mixbit"), "exit %d: %s", ec, err);
    CHECK(mb_is_dir(out)); /* the first one finished */
    /* a checkpoint with an unknown stage is refused, never reported as converted */
    snprintf(out, sizeof out, "%s/o_stage", tmpdir);
    snprintf(cmd, sizeof cmd, "MB_TEST_KILL=quant:0 %s convert %s/models/stories260K %s --bpw 7 --cal %s/text/tinystories-sample.txt --no-eval " SMALL, mixbit(), th_shared(),
             out, th_shared());
    CHECK_EQ(run(cmd, err, sizeof err), 137);
    {
        char sp[700], *t;
        size_t n;
        snprintf(sp, sizeof sp, "%s.partial/work/state.json", out);
        CHECK_EQ(mb_read_file(sp, &t, &n, 0), 0);
        char *st = t ? strstr(t, "\"stage\": ") : NULL;
        CHECK(st != NULL);
        if (st) st[9] = '9'; /* "stage": 9, beyond the last stage (6) */
        if (t) CHECK_EQ(mb_write_file_atomic(sp, t, n), 0);
        free(t);
    }
    snprintf(cmd, sizeof cmd, "%s convert %s/models/stories260K %s --bpw 7 --cal %s/text/tinystories-sample.txt --no-eval " SMALL, mixbit(), th_shared(), out, th_shared());
    ec = run(cmd, err, sizeof err);
    CHECK_MSG(ec == 1 && strstr(err, "corrupt checkpoint"), "exit %d: %s", ec, err);
    CHECK(!mb_is_dir(out));
}

/* the same conversion on 1, 2 and 3 threads: byte-identical tensors and measurement. kjv-llama (inputs of 256
 * and 768: OpenBLAS's threaded sgemm and dpotrf give other bits on 1, 2 and 3 threads at these sizes); under
 * the sanitizers the small MoE copy of stories260K */
static void test_thread_determinism(void) {
    char src[512], out[4][512], cmd[4096], err[8192], a[700], b[700];
    int asan = getenv("MB_ASAN") != NULL;
    snprintf(src, sizeof src, "%s/models/%s", th_shared(), asan ? "stories260K-moe4" : "kjv-llama");
    const int threads[4] = {1, 2, 3, 4}; /* 3: an odd split of every parallel loop; 4: more threads than cores */
    int nt = asan ? 2 : 4;                /* under ASan 1 and 2 threads (time); the normal build runs all four */
    for (int k = 0; k < nt; k++) {
        snprintf(out[k], sizeof out[k], "%s/threads%d", tmpdir, threads[k]);
        snprintf(cmd, sizeof cmd, "OMP_NUM_THREADS=%d %s convert %s %s --cal %s/text/%s --bpw %s --no-eval --rows 6 --measure-rows 3 --length 128 -q", threads[k],
                 mixbit(), src, out[k], th_shared(), asan ? "tinystories-sample.txt" : "calib-kjv-jargon.txt", asan ? "7" : "4");
        int ec = run(cmd, err, sizeof err);
        CHECK_MSG(ec == 0, "%d threads: exit %d: %s", threads[k], ec, err);
    }
    const char *files[] = {"output.safetensors", "measurement.json"};
    for (int k = 1; k < nt; k++)
        for (int f = 0; f < 2; f++) {
            snprintf(a, sizeof a, "%s/%s", out[0], files[f]);
            snprintf(b, sizeof b, "%s/%s", out[k], files[f]);
            CHECK_MSG(files_equal(a, b), "%s differs between 1 and %d threads", files[f], threads[k]);
        }
}

/* --objective delta: the measurement scores against what each module adds to the residual stream; the
 * same model and calibration as test_convert_models' stories260K run, so the two measurements compare */
static void test_objective_delta(void) {
    char cmd[2048], out[512], ref[512], err[8192], src[512], a[700], b[700];
    snprintf(src, sizeof src, "%s/models/stories260K", th_shared());
    snprintf(ref, sizeof ref, "%s/stories260K-3.5", tmpdir);
    snprintf(out, sizeof out, "%s/stories260K-delta", tmpdir);
    snprintf(cmd, sizeof cmd, "%s convert %s %s --bpw 7 --objective delta --cal %s/text/tinystories-sample.txt --eval %s/text/tinystories-sample.txt " SMALL,
             mixbit(), src, out, th_shared(), th_shared());
    int ec = run(cmd, err, sizeof err);
    CHECK_MSG(ec == 0, "exit %d: %s", ec, err);
    if (ec) return;
    CHECK(fabs(report_num(out, "decoder_bpw") - 7) <= 0.02);
    snprintf(a, sizeof a, "%s/mixbit-report.json", out);
    json_t *r = json_load_file(a, 0, NULL);
    CHECK(r && json_is_string(json_object_get(r, "objective")) && !strcmp(json_string_value(json_object_get(r, "objective")), "delta"));
    json_decref(r);
    /* the module delta is smaller than the module output (the residual stream carries the rest): every
     * measured error is larger, so the mean accuracy is lower than the default objective's */
    snprintf(a, sizeof a, "%s/measurement.json", ref);
    snprintf(b, sizeof b, "%s/measurement.json", out);
    json_t *ja = json_load_file(a, 0, NULL), *jb = json_load_file(b, 0, NULL);
    CHECK(ja && jb);
    double sa = 0, sb = 0;
    int n = 0;
    json_t *ma = json_object_get(ja, "measurement"), *mbm = json_object_get(jb, "measurement");
    const char *key;
    json_t *va;
    json_object_foreach(ma, key, va) {
        json_t *vb = json_object_get(mbm, key);
        CHECK(json_array_size(va) == json_array_size(vb));
        for (size_t i = 0; i < json_array_size(va) && i < json_array_size(vb); i++) {
            sa += json_number_value(json_object_get(json_array_get(va, i), "accuracy"));
            sb += json_number_value(json_object_get(json_array_get(vb, i), "accuracy"));
            n++;
        }
    }
    CHECK(n > 0);
    CHECK_MSG(sb < sa, "mean accuracy: delta %.6f, output %.6f", n ? sb / n : 0, n ? sa / n : 0);
    json_decref(ja);
    json_decref(jb);
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/mb_test_convert_XXXXXX");
    if (!mkdtemp(tmpdir)) return 1;
    RUN(test_convert_models);
    RUN(test_objective_delta);
    RUN(test_kill_resume);
    RUN(test_failures);
    RUN(test_thread_determinism);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd)) {}
    TEST_MAIN_END();
}
