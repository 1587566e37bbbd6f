/* tests/test_cli.c: the command line's contract: bad usage exits 2 (every numeric option outside its
 * documented range, non-finite numbers, values outside a set), bad input exits 1 with one line naming
 * the file or tensor (missing model directories, invalid EXL2 layers in inspect), --version works on
 * every command. */
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../quant/quant.h"
#include "harness.h"

static char tmpdir[256];

static const char *mixbit(void) {
    const char *m = getenv("MIXBIT");
    return m ? m : "./mixbit";
}

/* run a command; stdout and stderr captured (either may be NULL); returns the exit code */
static int run(const char *args, char *out, size_t outsz, char *err, size_t errsz) {
    char full[4096], of[300], ef[300];
    snprintf(of, sizeof of, "%s/stdout.txt", tmpdir);
    snprintf(ef, sizeof ef, "%s/stderr.txt", tmpdir);
    snprintf(full, sizeof full, "%s %s >%s 2>%s", mixbit(), args, of, ef);
    int st = system(full);
    char *bufs[2] = {out, err};
    size_t szs[2] = {outsz, errsz};
    const char *fs[2] = {of, ef};
    for (int k = 0; k < 2; k++) {
        if (!bufs[k]) continue;
        bufs[k][0] = 0;
        FILE *f = fopen(fs[k], "r");
        if (f) { size_t n = fread(bufs[k], 1, szs[k] - 1, f); bufs[k][n] = 0; fclose(f); }
    }
    if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 255;
}

static void test_version_everywhere(void) {
    const char *cmds[] = {"--version", "inspect --version", "convert --version", "tokenize --version", "ppl --version", "gpu --version",
                          "convert a b --version"};
    for (size_t i = 0; i < sizeof cmds / sizeof *cmds; i++) {
        char out[512], err[512];
        int ec = run(cmds[i], out, sizeof out, err, sizeof err);
        CHECK_MSG(ec == 0, "mixbit %s: exit %d, %s", cmds[i], ec, err);
        CHECK_MSG(!strncmp(out, "mixbit " MB_VERSION, strlen("mixbit " MB_VERSION)), "mixbit %s: stdout %s", cmds[i], out);
    }
}

/* every numeric option outside its range, non-finite, malformed: exit 2 with a message naming the option */
static void test_usage_errors(void) {
    static const struct { const char *args, *want; } cases[] = {
        {"convert in out --rows -5", "--rows"},
        {"convert in out --rows 0", "--rows"},
        {"convert in out --rows 99999999999999999999", "--rows"},
        {"convert in out --rows 100000000 --length 2048", "calibration tokens"},
        {"convert in out --measure-rows 2000000 --length 2048", "calibration tokens"},
        {"convert in out --measure-rows -1", "--measure-rows"},
        {"convert in out --measure-rows 0", "--measure-rows"},
        {"convert in out --length 0", "--length"},
        {"convert in out --length 1", "--length"},
        {"convert in out --length -2048", "--length"},
        {"convert in out --eval-ctx 0", "--eval-ctx"},
        {"convert in out --eval-ctx -1", "--eval-ctx"},
        {"convert in out --shard-size 0", "--shard-size"},
        {"convert in out --shard-size -1", "--shard-size"},
        {"convert in out --shard-size 99999999999", "--shard-size"},
        {"convert in out --bpw 0", "--bpw"},
        {"convert in out --bpw -3.5", "--bpw"},
        {"convert in out --bpw 17", "--bpw"},
        {"convert in out --bpw nan", "--bpw"},
        {"convert in out --bpw inf", "--bpw"},
        {"convert in out --bpw 1e999", "--bpw"},
        {"convert in out --bpw 3.5x", "--bpw"},
        {"convert in out --head-bits 0", "--head-bits"},
        {"convert in out --head-bits 7", "--head-bits"},
        {"convert in out --head-bits 1", "--head-bits"},
        {"convert in out --head-bits 16", "--head-bits"},
        {"convert in out --head-bits 4294967302", "--head-bits"}, /* 2^32 + 6: must not wrap to 6 */
        {"convert in out --max-memory -1", "--max-memory"},
        {"convert in out --max-memory nan", "--max-memory"},
        {"convert in out --checkpoint-interval -1", "--checkpoint-interval"},
        {"convert in out --fail-ppl-ratio -1", "--fail-ppl-ratio"},
        {"convert in out --seed -1", "--seed"},
        {"convert in out --min-expert-tokens -1", "--min-expert-tokens"},
        {"convert in out --alloc-power 0", "--alloc-power"},
        {"convert in out --alloc-power -1", "--alloc-power"},
        {"convert in out --objective residual", "--objective"},
        {"convert in out --uniform 1:7b_128g", "--uniform"},
        {"convert in out --uniform garbage", "--uniform"},
        {"convert in out --field=", "--field"},
        {"ppl m --text t --ctx 0", "--ctx"},
        {"ppl m --text t --ctx -512", "--ctx"},
        {"ppl m --text t --ctx 99999999", "--ctx"},
        {"ppl m --text t --stride 0", "--stride"},
        {"ppl m --text t --stride -1", "--stride"},
        {"ppl m --text t --ctx 256 --stride 256", "--stride"},
        {"ppl m --text t --max-tokens 0", "--max-tokens"},
        {"ppl m --text t --max-tokens -5", "--max-tokens"},
        {"ppl m --text t --batch-tokens 0", "--batch-tokens"},
        {"ppl m --text t --batch-tokens -1", "--batch-tokens"},
        {"ppl m --text t --batch-tokens 9223372036854775807", "--batch-tokens"},
        {"ppl m --text t --batch-tokens 16777217", "--batch-tokens"},
        {"ppl m --text t --topk 0", "--topk"},
        {"ppl m --text t --topk -1", "--topk"},
        {"ppl m --text t --topk 5000", "--topk"},
        {"ppl m --text t --ctx abc", "--ctx"},
        {"ppl m", "--text"},
        {"ppl m --text t --convention nonsense", "--convention"},
        {"inspect", "missing argument"},
        {"inspect a b", "unexpected argument"},
        {"inspect a --bogus", "unknown option"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char err[2048];
        int ec = run(cases[i].args, NULL, 0, err, sizeof err);
        CHECK_MSG(ec == 2, "mixbit %s: exit %d (want 2), %s", cases[i].args, ec, err);
        CHECK_MSG(strstr(err, cases[i].want), "mixbit %s: message does not name %s: %s", cases[i].args, cases[i].want, err);
    }
    /* the ranges are documented in --help */
    char out[8192];
    CHECK_EQ(run("ppl --help", out, sizeof out, NULL, 0), 0);
    CHECK_MSG(strstr(out, "[1..4096]") && strstr(out, "[1..16777216]"), "%s", out);
    CHECK_EQ(run("convert --help", out, sizeof out, NULL, 0), 0);
    CHECK_MSG(strstr(out, "(0..16]") && strstr(out, "--version"), "%s", out);
}

/* bad input: exit 1 with one line naming the path */
static void test_input_errors(void) {
    char args[1024], err[2048];
    snprintf(args, sizeof args, "ppl %s/no-such-model --text %s/text/kjv-eval.txt", tmpdir, th_shared());
    CHECK_EQ(run(args, NULL, 0, err, sizeof err), 1);
    CHECK_MSG(strstr(err, "no-such-model: no such directory"), "%s", err);
    CHECK_MSG(!strstr(err, ": : "), "%s", err);
    snprintf(args, sizeof args, "convert /no-such-model-dir %s/out --cal %s/text/calib-kjv-jargon.txt --no-eval", tmpdir, th_shared());
    CHECK_EQ(run(args, NULL, 0, err, sizeof err), 1);
    CHECK_MSG(!strcmp(err, "mixbit: error: /no-such-model-dir: no such directory\n"), "%s", err);
    snprintf(args, sizeof args, "%s/out", tmpdir);
    CHECK(access(args, F_OK) != 0);
    snprintf(args, sizeof args, "inspect %s/nothing.safetensors", tmpdir);
    CHECK_EQ(run(args, NULL, 0, err, sizeof err), 1);
    CHECK_MSG(strstr(err, "nothing.safetensors: no such file or directory"), "%s", err);
}

/* ---- inspect on EXL2 models: valid, then broken in ways only the full validator sees ---- */

struct fixture { struct mb_st_entry e[64]; int n; struct mb_exl2_packed pk[7]; uint16_t emb[16 * 32], norm[32]; };

static void add(struct fixture *f, const char *name, enum mb_dtype dt, int nd, int64_t a, int64_t b, const void *data) {
    char *nm = strdup(name);
    f->e[f->n] = (struct mb_st_entry){nm, dt, nd, {a, b}, data};
    f->n++;
}

/* a one-layer Llama (hidden 32, ffn 64, vocab 16, tied) with every linear EXL2 at 1:4b_32g */
static int write_exl2_model(const char *dir, struct fixture *f) {
    static const char *names[7] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};
    static const int64_t NK[7][2] = {{32, 32}, {32, 32}, {32, 32}, {32, 32}, {64, 32}, {64, 32}, {32, 64}};
    memset(f, 0, sizeof *f);
    for (int i = 0; i < 16 * 32; i++) f->emb[i] = mb_f32_to_f16(0.01f * (float)(i % 7));
    for (int i = 0; i < 32; i++) f->norm[i] = mb_f32_to_f16(1.0f);
    add(f, "model.embed_tokens.weight", MB_F16, 2, 16, 32, f->emb);
    add(f, "model.layers.0.input_layernorm.weight", MB_F16, 1, 32, 0, f->norm);
    add(f, "model.layers.0.post_attention_layernorm.weight", MB_F16, 1, 32, 0, f->norm);
    add(f, "model.norm.weight", MB_F16, 1, 32, 0, f->norm);
    for (int p = 0; p < 7; p++) {
        int64_t N = NK[p][0], K = NK[p][1];
        if (mb_exl2_random(K, N, "1:4b_32g", 100 + (uint64_t)p, &f->pk[p])) return -1;
        struct mb_exl2_packed *k = &f->pk[p];
        char nm[160];
        snprintf(nm, sizeof nm, "model.layers.0.%s.q_weight", names[p]);
        add(f, nm, MB_I32, 2, k->P, k->Np, k->q_weight);
        snprintf(nm, sizeof nm, "model.layers.0.%s.q_scale", names[p]);
        add(f, nm, MB_I32, 2, k->G, k->Np / 8, k->q_scale);
        snprintf(nm, sizeof nm, "model.layers.0.%s.q_scale_max", names[p]);
        add(f, nm, MB_F16, 1, k->G, 0, k->q_scale_max);
        snprintf(nm, sizeof nm, "model.layers.0.%s.q_groups", names[p]);
        add(f, nm, MB_I16, 1, 2 * k->G, 0, k->q_groups);
        snprintf(nm, sizeof nm, "model.layers.0.%s.q_invperm", names[p]);
        add(f, nm, MB_I32, 1, k->K, 0, k->q_invperm);
    }
    char p[600];
    snprintf(p, sizeof p, "%s/config.json", dir);
    const char *cfg = "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 32, \"num_hidden_layers\": 1, \"num_attention_heads\": 2,"
                      " \"intermediate_size\": 64, \"vocab_size\": 16, \"tie_word_embeddings\": true, \"max_position_embeddings\": 64,"
                      " \"quantization_config\": {\"quant_method\": \"exl2\", \"bits\": 4.0, \"head_bits\": 6}}";
    if (mb_write_file_atomic(p, cfg, strlen(cfg))) return -1;
    return 0;
}

static int write_shards(const char *dir, struct fixture *f) {
    char p[600];
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    return mb_st_write(p, f->e, f->n, NULL, 0);
}

static void free_fixture(struct fixture *f) {
    for (int i = 0; i < f->n; i++) free((char *)f->e[i].name);
    for (int p = 0; p < 7; p++) mb_exl2_packed_free(&f->pk[p]);
}

static void test_inspect_exl2(void) {
    char dir[512], args[700], out[16384], err[2048];
    snprintf(dir, sizeof dir, "%s/exl2", tmpdir);
    mb_mkdir_p(dir);
    struct fixture *f = calloc(1, sizeof *f);
    CHECK_EQ(write_exl2_model(dir, f), 0);
    CHECK_EQ(write_shards(dir, f), 0);
    snprintf(args, sizeof args, "inspect %s --summary", dir);
    int ec = run(args, out, sizeof out, err, sizeof err);
    CHECK_MSG(ec == 0, "valid EXL2 model: exit %d, %s", ec, err);
    CHECK_MSG(strstr(out, "model.layers.0.mlp.down_proj") && strstr(out, "4b 100%"), "%s", out);

    /* bit width 7 in o_proj's group table: the old summary printed "7b 100%" and exited 0 */
    int16_t *g = f->pk[3].q_groups;
    int16_t keep = g[0];
    g[0] = 7;
    CHECK_EQ(write_shards(dir, f), 0);
    ec = run(args, out, sizeof out, err, sizeof err);
    CHECK_MSG(ec == 1, "bits 7: exit %d, stdout %s", ec, out);
    CHECK_MSG(strstr(err, "o_proj") && strstr(err, "7 bits"), "%s", err);
    CHECK_MSG(!strstr(out, "7b"), "%s", out);
    g[0] = keep;
    /* q_invperm of down_proj not a permutation */
    int32_t *ip = f->pk[6].q_invperm, keep2 = ip[5];
    ip[5] = ip[6];
    CHECK_EQ(write_shards(dir, f), 0);
    ec = run(args, out, sizeof out, err, sizeof err);
    CHECK_MSG(ec == 1, "invperm: exit %d", ec);
    CHECK_MSG(strstr(err, "down_proj") && strstr(err, "permutation"), "%s", err);
    ip[5] = keep2;
    /* a group offset beyond q_weight in up_proj */
    int16_t *gu = f->pk[5].q_groups;
    if (f->pk[5].G > 1) {
        int16_t k3 = gu[3];
        gu[3] = 2000;
        CHECK_EQ(write_shards(dir, f), 0);
        ec = run(args, out, sizeof out, err, sizeof err);
        CHECK_MSG(ec == 1, "offsets: exit %d", ec);
        CHECK_MSG(strstr(err, "up_proj"), "%s", err);
        gu[3] = k3;
    }
    /* repaired: exit 0 again (the failures above came from the corruptions alone) */
    CHECK_EQ(write_shards(dir, f), 0);
    CHECK_EQ(run(args, out, sizeof out, err, sizeof err), 0);
    free_fixture(f);
    free(f);
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/mb_test_cli_XXXXXX");
    if (!mkdtemp(tmpdir)) { perror("mkdtemp"); return 1; }
    RUN(test_version_everywhere);
    RUN(test_usage_errors);
    RUN(test_input_errors);
    RUN(test_inspect_exl2);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd)) {}
    TEST_MAIN_END();
}
