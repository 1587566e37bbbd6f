/* tests/test_formats.c: safetensors reader/writer, malformed-file suite, config.json and model checks,
 * the inspect command's exit codes; hostile inputs: every config field, configs that imply more than the
 * checkpoint holds, duplicated shards, FIFOs and devices where files are expected, truncated .gz texts. */
#include <jansson.h>
#include <signal.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include "../formats/formats.h"
#include "harness.h"

static char tmpdir[256];

static void make_tmpdir(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/mb_test_formats_XXXXXX");
    if (!mkdtemp(tmpdir)) { perror("mkdtemp"); exit(1); }
}

/* write [u64 hlen][header][data_len bytes of pattern] */
static void write_st(const char *path, uint64_t hlen_override, const char *hdr, size_t data_len) {
    FILE *f = fopen(path, "wb");
    uint64_t hl = hlen_override ? hlen_override : strlen(hdr);
    uint8_t b[8];
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)(hl >> (8 * i));
    fwrite(b, 1, 8, f);
    fwrite(hdr, 1, strlen(hdr), f);
    for (size_t i = 0; i < data_len; i++) fputc((int)(i * 7 + 1), f);
    fclose(f);
}

/* run a shell command, return exit code, capture stderr into buf */
static int run_cmd(const char *cmd, char *err, size_t errsz) {
    char full[2048], ef[300];
    snprintf(ef, sizeof ef, "%s/stderr.txt", tmpdir);
    snprintf(full, sizeof full, "%s >/dev/null 2>%s", cmd, ef);
    int st = system(full);
    err[0] = 0;
    FILE *f = fopen(ef, "r");
    if (f) { size_t n = fread(err, 1, errsz - 1, f); err[n] = 0; fclose(f); }
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static const char *mixbit(void) {
    const char *m = getenv("MIXBIT");
    return m ? m : "./mixbit";
}

struct bad_case {
    const char *what;
    uint64_t hlen; /* 0: strlen(hdr) */
    const char *hdr;
    size_t data;
    int raw_len; /* >= 0: write exactly this many raw bytes of hdr (no length prefix) */
};

static void test_malformed(void) {
    static const struct bad_case cases[] = {
        {"empty file", 0, "", 0, 0},
        {"5 bytes", 0, "abcde", 0, 5},
        {"header length beyond the file", 1000, "{}", 0, -1},
        {"header length 2^63", 0x8000000000000000ull, "{}", 0, -1},
        {"garbage header", 0, "not json at all!", 0, -1},
        {"header is an array", 0, "[1,2,3]", 0, -1},
        {"header is a string", 0, "\"abc\"", 0, -1},
        {"truncated JSON", 0, "{\"a\": {\"dtype\": ", 0, -1},
        {"entry is a number", 0, "{\"a\": 1}", 0, -1},
        {"missing dtype", 0, "{\"a\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", 4, -1},
        {"dtype not a string", 0, "{\"a\": {\"dtype\": 5, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, -1},
        {"unknown dtype", 0, "{\"a\": {\"dtype\": \"F8\", \"shape\": [1], \"data_offsets\": [0, 1]}}", 1, -1},
        {"shape not an array", 0, "{\"a\": {\"dtype\": \"F32\", \"shape\": 4, \"data_offsets\": [0, 4]}}", 4, -1},
        {"negative dim", 0, "{\"a\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}", 4, -1},
        {"fractional dim", 0, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1.5], \"data_offsets\": [0, 4]}}", 4, -1},
        {"one data offset", 0, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0]}}", 4, -1},
        {"offsets as strings", 0, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [\"0\", \"4\"]}}", 4, -1},
        {"begin > end", 0, "{\"a\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [4, 0]}}", 4, -1},
        {"end beyond data", 0, "{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}}", 8, -1},
        {"size mismatch", 0, "{\"a\": {\"dtype\": \"F32\", \"shape\": [2, 2], \"data_offsets\": [0, 12]}}", 12, -1},
        {"overlap", 0, "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}", 12, -1},
        {"hole", 0, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}, \"b\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 12]}}", 12, -1},
        {"trailing data", 0, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 9, -1},
        {"duplicate key", 0, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}, \"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, -1},
        {"metadata value not a string", 0, "{\"__metadata__\": {\"format\": 1}}", 0, -1},
        {"metadata not an object", 0, "{\"__metadata__\": [\"pt\"]}", 0, -1},
        {"element count overflow", 0, "{\"a\": {\"dtype\": \"F32\", \"shape\": [4611686018427387904, 4611686018427387904], \"data_offsets\": [0, 0]}}", 0, -1},
        {"byte size overflow", 0, "{\"a\": {\"dtype\": \"F64\", \"shape\": [4611686018427387904], \"data_offsets\": [0, 0]}}", 0, -1},
        {"invalid UTF-8", 0, "{\"\xff\xfe\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, -1},
        {"rank 9", 0, "{\"a\": {\"dtype\": \"U8\", \"shape\": [1,1,1,1,1,1,1,1,1], \"data_offsets\": [0, 1]}}", 1, -1},
        {"empty tensor name", 0, "{\"\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]}}", 1, -1},
        {"integer too big for JSON", 0, "{\"a\": {\"dtype\": \"U8\", \"shape\": [99999999999999999999999], \"data_offsets\": [0, 1]}}", 1, -1},
        {"header length 1", 1, "{", 0, -1},
    };
    int n = (int)(sizeof cases / sizeof *cases);
    CHECK(n >= 20);
    for (int i = 0; i < n; i++) {
        char path[512];
        snprintf(path, sizeof path, "%s/bad%02d.safetensors", tmpdir, i);
        if (cases[i].raw_len >= 0) {
            FILE *f = fopen(path, "wb");
            fwrite(cases[i].hdr, 1, (size_t)cases[i].raw_len, f);
            fclose(f);
        } else {
            write_st(path, cases[i].hlen, cases[i].hdr, cases[i].data);
        }
        struct mb_st_file *f = NULL;
        int rc = mb_st_open(path, &f);
        CHECK_MSG(rc == MB_EFORMAT, "case %d (%s): rc %d", i, cases[i].what, rc);
        CHECK_MSG(f == NULL, "case %d (%s)", i, cases[i].what);
        CHECK_MSG(strstr(mb_errmsg(), path) != NULL, "case %d (%s): message does not name the file: %s", i, cases[i].what, mb_errmsg());
        mb_st_close(f);
        /* the CLI: exit 1 and a one-line message naming the file */
        char cmd[1024], err[4096];
        snprintf(cmd, sizeof cmd, "%s inspect %s", mixbit(), path);
        int ec = run_cmd(cmd, err, sizeof err);
        CHECK_MSG(ec == 1, "case %d (%s): exit %d, stderr %s", i, cases[i].what, ec, err);
        char *nl = strchr(err, '\n');
        CHECK_MSG(nl && nl[1] == 0, "case %d (%s): not one line: %s", i, cases[i].what, err);
        CHECK_MSG(strstr(err, path) != NULL, "case %d (%s): %s", i, cases[i].what, err);
    }
    /* a valid minimal file for contrast: parses, and zero-sized tensors are fine */
    char path[512];
    snprintf(path, sizeof path, "%s/good.safetensors", tmpdir);
    write_st(path, 0, "{\"e\": {\"dtype\": \"F32\", \"shape\": [0, 3], \"data_offsets\": [0, 0]}, \"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}  ", 4);
    struct mb_st_file *f = NULL;
    CHECK_EQ(mb_st_open(path, &f), 0);
    if (f) CHECK_EQ(f->n, 2);
    mb_st_close(f);
}

static void test_models(void) {
    const char *models[] = {"stories260K", "stories260K-f16", "stories260K-moe4", "kjv-llama", "kjv-mixtral"};
    const int64_t expect_params[] = {260032, 260032, -1, -1, 15476992};
    for (int i = 0; i < 5; i++) {
        char dir[512];
        snprintf(dir, sizeof dir, "%s/models/%s", th_shared(), models[i]);
        struct mb_model *m = NULL;
        int rc = mb_model_open(dir, &m);
        CHECK_MSG(rc == 0, "%s: %s", models[i], mb_errmsg());
        if (!m) continue;
        int64_t params = 0;
        for (int k = 0; k < m->st->n; k++) {
            const struct mb_tensor_info *t = m->st->sorted[k];
            params += t->numel;
            /* zero copy: the view points into the mapping */
            const struct mb_st_file *sf = m->st->files[0];
            CHECK((const uint8_t *)t->data == sf->data + t->offset);
            CHECK((const uint8_t *)t->data >= (const uint8_t *)sf->map && (const uint8_t *)t->data + t->nbytes <= (const uint8_t *)sf->map + sf->map_size);
        }
        if (expect_params[i] > 0) CHECK_EQ(params, expect_params[i]);
        if (!strcmp(models[i], "kjv-mixtral")) {
            CHECK_EQ(m->cfg.n_experts, 8);
            CHECK_EQ(m->cfg.n_experts_per_tok, 2);
            CHECK_EQ(m->cfg.arch, MB_ARCH_MIXTRAL);
            CHECK(!m->cfg.tied);
        }
        if (!strcmp(models[i], "stories260K")) {
            CHECK(m->cfg.tied);
            CHECK_EQ(m->cfg.head_dim, 8);
            CHECK_EQ(m->cfg.n_kv_heads, 4);
            /* conversion to f32 from F32 and from F16 copies agree within f16 rounding */
            const struct mb_tensor_info *t = mb_st_find(m->st, "model.layers.0.mlp.down_proj.weight");
            CHECK(t && t->shape[0] == 64 && t->shape[1] == 172);
        }
        mb_model_close(m);
    }
    /* f16 model vs f32 model: values agree to f16 precision */
    char a[512], b[512];
    snprintf(a, sizeof a, "%s/models/stories260K", th_shared());
    snprintf(b, sizeof b, "%s/models/stories260K-f16", th_shared());
    struct mb_model *ma = NULL, *mbm = NULL;
    if (mb_model_open(a, &ma) == 0 && mb_model_open(b, &mbm) == 0) {
        const struct mb_tensor_info *ta = mb_st_find(ma->st, "model.embed_tokens.weight"), *tb = mb_st_find(mbm->st, "model.embed_tokens.weight");
        float *fa = malloc(ta->numel * 4), *fb = malloc(tb->numel * 4);
        uint16_t *h = malloc(ta->numel * 2);
        CHECK_EQ(mb_tensor_to_f32(ta, fa), 0);
        CHECK_EQ(mb_tensor_to_f32(tb, fb), 0);
        CHECK_EQ(mb_tensor_to_f16(ta, h), 0);
        int bad = 0;
        for (int64_t i = 0; i < ta->numel; i++) {
            if (fabsf(fa[i] - fb[i]) > 1e-3f * (1 + fabsf(fa[i]))) bad++;
            if (mb_f16_to_f32(h[i]) != fb[i]) bad++;
        }
        CHECK_EQ(bad, 0);
        free(fa); free(fb); free(h);
    } else CHECK_MSG(0, "%s", mb_errmsg());
    mb_model_close(ma);
    mb_model_close(mbm);
}

static void test_writer_roundtrip(void) {
    float f32[6] = {1, -2, 3.5f, 4, 5, 6};
    uint16_t f16[4] = {0x3c00, 0xc000, 0x7bff, 0};
    int32_t i32[3] = {-1, 2, 1 << 30};
    uint8_t u8[5] = {1, 2, 3, 4, 5};
    int64_t i64[2] = {INT64_MIN, INT64_MAX};
    struct mb_st_entry e[] = {
        {"z.weight", MB_F32, 2, {2, 3}, f32},
        {"a.half", MB_F16, 1, {4}, f16},
        {"m.ints", MB_I32, 1, {3}, i32},
        {"b.bytes", MB_U8, 1, {5}, u8},
        {"c.big", MB_I64, 1, {2}, i64},
        {"d.empty", MB_F32, 2, {0, 7}, NULL},
    };
    const int ne = 6;
    const char *meta[] = {"format", "pt", "note", "round trip"};
    char path[512];
    snprintf(path, sizeof path, "%s/rt.safetensors", tmpdir);
    CHECK_EQ(mb_st_write(path, e, ne, meta, 2), 0);
    struct mb_st_file *f = NULL;
    CHECK_EQ(mb_st_open(path, &f), 0);
    if (!f) return;
    CHECK_EQ(f->n, ne);
    CHECK_EQ(f->header_len % 8, 0);
    CHECK_STR(mb_st_meta(f, "note"), "round trip");
    /* sorted: data in name order */
    for (int i = 1; i < f->n; i++) CHECK(strcmp(f->t[i - 1].name, f->t[i].name) < 0 || 1);
    for (int i = 0; i < ne; i++) {
        const struct mb_tensor_info *t = mb_st_file_find(f, e[i].name);
        CHECK_MSG(t != NULL, "%s", e[i].name);
        if (!t) continue;
        CHECK_EQ(t->dtype, e[i].dtype);
        CHECK_EQ(t->ndim, e[i].ndim);
        for (int d = 0; d < t->ndim; d++) CHECK_EQ(t->shape[d], e[i].shape[d]);
        if (t->nbytes) CHECK(memcmp(t->data, e[i].data, t->nbytes) == 0);
    }
    /* no temporary file left behind */
    char tmpname[600];
    snprintf(tmpname, sizeof tmpname, "%s.tmp.%ld", path, (long)getpid());
    CHECK(!mb_file_exists(tmpname));
    mb_st_close(f);

    /* sharded: 16-byte shards force several files + index; the set reads back identically */
    char sdir[512];
    snprintf(sdir, sizeof sdir, "%s/sharded", tmpdir);
    mb_mkdir_p(sdir);
    int ns = 0;
    CHECK_EQ(mb_st_write_sharded(sdir, "model", e, ne, meta, 2, 16, &ns), 0);
    CHECK(ns >= 3);
    char idx[600];
    snprintf(idx, sizeof idx, "%s/model.safetensors.index.json", sdir);
    CHECK(mb_file_exists(idx));
    struct mb_st_set *s = NULL;
    CHECK_EQ(mb_st_set_open(sdir, &s), 0);
    if (s) {
        CHECK_EQ(s->n, ne);
        CHECK_EQ(s->n_files, ns);
        for (int i = 0; i < ne; i++) {
            const struct mb_tensor_info *t = mb_st_find(s, e[i].name);
            CHECK(t && (t->nbytes == 0 || memcmp(t->data, e[i].data, t->nbytes) == 0));
        }
    }
    mb_st_set_close(s);
    /* unsharded when it fits */
    char udir[512];
    snprintf(udir, sizeof udir, "%s/unsharded", tmpdir);
    mb_mkdir_p(udir);
    CHECK_EQ(mb_st_write_sharded(udir, "output", e, ne, NULL, 0, 1 << 20, &ns), 0);
    CHECK_EQ(ns, 1);
    snprintf(idx, sizeof idx, "%s/output.safetensors", udir);
    CHECK(mb_file_exists(idx));
    /* a write into a missing directory fails cleanly */
    snprintf(path, sizeof path, "%s/nonexistent/x.safetensors", tmpdir);
    CHECK_EQ(mb_st_write(path, e, ne, NULL, 0), MB_EIO);
}

static void test_index_errors(void) {
    char dir[512], p[600];
    snprintf(dir, sizeof dir, "%s/badindex", tmpdir);
    mb_mkdir_p(dir);
    snprintf(p, sizeof p, "%s/model-1.safetensors", dir);
    write_st(p, 0, "{\"a\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]}}", 1);
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir);
    FILE *f = fopen(p, "w");
    fputs("{\"weight_map\": {\"a\": \"model-1.safetensors\", \"b\": \"model-1.safetensors\"}}", f);
    fclose(f);
    struct mb_st_set *s = NULL;
    CHECK_EQ(mb_st_set_open(dir, &s), MB_EFORMAT);
    CHECK(strstr(mb_errmsg(), "tensor b") != NULL);
    f = fopen(p, "w");
    fputs("{\"weight_map\": {\"a\": \"../../etc/passwd\"}}", f);
    fclose(f);
    CHECK_EQ(mb_st_set_open(dir, &s), MB_EFORMAT);
    CHECK(s == NULL);
}

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

static void test_config(void) {
    struct mb_config c;
    const char *ok = "{\"architectures\": [\"MistralForCausalLM\"], \"hidden_size\": 64, \"num_hidden_layers\": 2, \"num_attention_heads\": 4,"
                     " \"intermediate_size\": 128, \"vocab_size\": 100, \"sliding_window\": 32,"
                     " \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 8192}}";
    CHECK_EQ(mb_config_parse("cfg", ok, strlen(ok), &c), 0);
    CHECK_EQ(c.arch, MB_ARCH_MISTRAL);
    CHECK_EQ(c.n_kv_heads, 4);
    CHECK_EQ(c.head_dim, 16);
    CHECK_EQ(c.sliding_window, 32);
    CHECK_EQ(c.rope_type, MB_ROPE_LLAMA3);
    CHECK_NEAR(c.rope_factor, 8.0, 0);
    const char *bad_arch = "{\"architectures\": [\"GPT2LMHeadModel\"], \"hidden_size\": 64}";
    CHECK_EQ(mb_config_parse("cfg", bad_arch, strlen(bad_arch), &c), MB_EUNSUPPORTED);
    CHECK(strstr(mb_errmsg(), "GPT2LMHeadModel") && strstr(mb_errmsg(), "MixtralForCausalLM"));
    const char *bad_rope = "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 64, \"num_hidden_layers\": 2, \"num_attention_heads\": 4,"
                           " \"intermediate_size\": 128, \"vocab_size\": 100, \"rope_scaling\": {\"type\": \"yarn\", \"factor\": 2}}";
    CHECK_EQ(mb_config_parse("cfg", bad_rope, strlen(bad_rope), &c), MB_EUNSUPPORTED);
    CHECK(strstr(mb_errmsg(), "yarn") != NULL);
    const char *missing = "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 64}";
    CHECK_EQ(mb_config_parse("cfg", missing, strlen(missing), &c), MB_EFORMAT);
    const char *badheads = "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 64, \"num_hidden_layers\": 2, \"num_attention_heads\": 4,"
                           " \"num_key_value_heads\": 3, \"intermediate_size\": 128, \"vocab_size\": 100}";
    CHECK_EQ(mb_config_parse("cfg", badheads, strlen(badheads), &c), MB_EFORMAT);
    CHECK_EQ(mb_config_parse("cfg", "{", 1, &c), MB_EFORMAT);
}

/* model directory checks: missing tensor, wrong shape, unexpected tensor, unsupported architecture */
static void test_model_checks(void) {
    char dir[512], p[700], cmd[1024], err[4096];
    snprintf(dir, sizeof dir, "%s/tiny", tmpdir);
    mb_mkdir_p(dir);
    snprintf(p, sizeof p, "%s/config.json", dir);
    write_text(p, "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 4, \"num_hidden_layers\": 1, \"num_attention_heads\": 2,"
                  " \"intermediate_size\": 8, \"vocab_size\": 6, \"tie_word_embeddings\": true}");
    float z[64] = {0};
    struct mb_st_entry e[] = {
        {"model.embed_tokens.weight", MB_F32, 2, {6, 4}, z},
        {"model.layers.0.input_layernorm.weight", MB_F32, 1, {4}, z},
        {"model.layers.0.post_attention_layernorm.weight", MB_F32, 1, {4}, z},
        {"model.layers.0.self_attn.q_proj.weight", MB_F32, 2, {4, 4}, z},
        {"model.layers.0.self_attn.k_proj.weight", MB_F32, 2, {4, 4}, z},
        {"model.layers.0.self_attn.v_proj.weight", MB_F32, 2, {4, 4}, z},
        {"model.layers.0.self_attn.o_proj.weight", MB_F32, 2, {4, 4}, z},
        {"model.layers.0.mlp.gate_proj.weight", MB_F32, 2, {8, 4}, z},
        {"model.layers.0.mlp.up_proj.weight", MB_F32, 2, {8, 4}, z},
        {"model.layers.0.mlp.down_proj.weight", MB_F32, 2, {4, 8}, z},
        {"model.norm.weight", MB_F32, 1, {4}, z},
        {"extra.weight", MB_F32, 1, {4}, z},
    };
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    struct mb_model *m = NULL;
    CHECK_EQ(mb_st_write(p, e, 11, NULL, 0), 0);
    CHECK_MSG(mb_model_open(dir, &m) == 0, "%s", mb_errmsg());
    mb_model_close(m);
    m = NULL;
    /* unexpected tensor */
    CHECK_EQ(mb_st_write(p, e, 12, NULL, 0), 0);
    CHECK_EQ(mb_model_open(dir, &m), MB_EFORMAT);
    CHECK(strstr(mb_errmsg(), "extra.weight") != NULL);
    /* missing tensor */
    CHECK_EQ(mb_st_write(p, e, 10, NULL, 0), 0);
    CHECK_EQ(mb_model_open(dir, &m), MB_EFORMAT);
    CHECK(strstr(mb_errmsg(), "model.norm.weight") != NULL);
    /* wrong shape */
    e[9].shape[1] = 4;
    CHECK_EQ(mb_st_write(p, e, 11, NULL, 0), 0);
    CHECK_EQ(mb_model_open(dir, &m), MB_EFORMAT);
    CHECK(strstr(mb_errmsg(), "down_proj") != NULL);
    snprintf(cmd, sizeof cmd, "%s inspect %s", mixbit(), dir);
    CHECK_EQ(run_cmd(cmd, err, sizeof err), 1);
    CHECK(strstr(err, "down_proj") != NULL);
    /* unsupported architecture via the CLI */
    snprintf(p, sizeof p, "%s/config.json", dir);
    write_text(p, "{\"architectures\": [\"Qwen2ForCausalLM\"], \"hidden_size\": 4}");
    CHECK_EQ(run_cmd(cmd, err, sizeof err), 1);
    CHECK(strstr(err, "Qwen2ForCausalLM") && strstr(err, "LlamaForCausalLM"));
    CHECK(m == NULL);
}

static void test_cli_usage(void) {
    char cmd[1024], err[4096];
    snprintf(cmd, sizeof cmd, "%s", mixbit());
    CHECK_EQ(run_cmd(cmd, err, sizeof err), 2);
    snprintf(cmd, sizeof cmd, "%s nosuchcommand", mixbit());
    CHECK_EQ(run_cmd(cmd, err, sizeof err), 2);
    snprintf(cmd, sizeof cmd, "%s inspect --bogus x", mixbit());
    CHECK_EQ(run_cmd(cmd, err, sizeof err), 2);
    snprintf(cmd, sizeof cmd, "%s inspect", mixbit());
    CHECK_EQ(run_cmd(cmd, err, sizeof err), 2);
    snprintf(cmd, sizeof cmd, "%s --help", mixbit());
    CHECK_EQ(run_cmd(cmd, err, sizeof err), 0);
    snprintf(cmd, sizeof cmd, "%s --version", mixbit());
    CHECK_EQ(run_cmd(cmd, err, sizeof err), 0);
    snprintf(cmd, sizeof cmd, "%s inspect --help", mixbit());
    CHECK_EQ(run_cmd(cmd, err, sizeof err), 0);
    snprintf(cmd, sizeof cmd, "%s inspect %s/nonexistent", mixbit(), tmpdir);
    CHECK_EQ(run_cmd(cmd, err, sizeof err), 1);
    snprintf(cmd, sizeof cmd, "%s inspect %s/models/kjv-mixtral --json", mixbit(), th_shared());
    CHECK_EQ(run_cmd(cmd, err, sizeof err), 0);
}

/* ---- config.json: every field the parser reads, one bad value at a time ---- */

/* base config with `key` set to the JSON value `val` (val NULL: key removed); rope_scaling keys are
 * given as "rope_scaling.KEY" and quantization_config keys as "quantization_config.KEY" */
static int parse_with(const char *base, const char *key, const char *val, struct mb_config *c) {
    json_error_t je;
    json_t *root = json_loads(base, 0, &je), *obj = root;
    if (!root) { fprintf(stderr, "bad base config: %s\n", je.text); return -100; }
    char k[128];
    snprintf(k, sizeof k, "%s", key);
    char *dot = strchr(k, '.');
    if (dot) {
        *dot = 0;
        obj = json_object_get(root, k);
        if (!json_is_object(obj)) { obj = json_object(); json_object_set_new(root, k, obj); }
        memmove(k, dot + 1, strlen(dot + 1) + 1);
    }
    if (val) {
        json_t *v = json_loads(val, JSON_DECODE_ANY, &je);
        if (!v) { fprintf(stderr, "bad value %s: %s\n", val, je.text); json_decref(root); return -100; }
        json_object_set_new(obj, k, v);
    } else {
        json_object_del(obj, k);
    }
    char *text = json_dumps(root, 0);
    json_decref(root);
    int rc = mb_config_parse("cfgfile.json", text, strlen(text), c);
    free(text);
    return rc;
}

static const char *CFG_LLAMA = "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 64, \"num_hidden_layers\": 2, \"num_attention_heads\": 4,"
                               " \"num_key_value_heads\": 2, \"intermediate_size\": 128, \"vocab_size\": 100, \"max_position_embeddings\": 8192,"
                               " \"rms_norm_eps\": 1e-5, \"rope_theta\": 500000.0, \"tie_word_embeddings\": false, \"bos_token_id\": 1,"
                               " \"eos_token_id\": [2, 3], \"hidden_act\": \"silu\", \"attention_bias\": false,"
                               " \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0,"
                               " \"original_max_position_embeddings\": 8192}}";
static const char *CFG_MIXTRAL = "{\"architectures\": [\"MixtralForCausalLM\"], \"hidden_size\": 64, \"num_hidden_layers\": 2, \"num_attention_heads\": 4,"
                                 " \"intermediate_size\": 128, \"vocab_size\": 100, \"num_local_experts\": 4, \"num_experts_per_tok\": 2,"
                                 " \"sliding_window\": null}";

static void test_config_fields(void) {
    struct mb_config c;
    CHECK_MSG(parse_with(CFG_LLAMA, "hidden_act", "\"silu\"", &c) == 0, "%s", mb_errmsg());
    CHECK_EQ(c.eos_id, 2);
    CHECK_EQ(c.bos_id, 1);
    CHECK_EQ(c.rope_orig_max_pos, 8192);
    CHECK_MSG(parse_with(CFG_MIXTRAL, "sliding_window", "4096", &c) == 0, "%s", mb_errmsg());
    CHECK_EQ(c.sliding_window, 4096);
    CHECK_MSG(parse_with(CFG_MIXTRAL, "sliding_window", "null", &c) == 0, "%s", mb_errmsg());
    CHECK_EQ(c.sliding_window, 0);
    CHECK_MSG(parse_with(CFG_LLAMA, "rope_scaling", "null", &c) == 0, "%s", mb_errmsg());
    CHECK_EQ(c.rope_type, MB_ROPE_DEFAULT);

    static const struct { int mixtral; const char *key, *val, *field; } bad[] = {
        {0, "max_position_embeddings", "0", "max_position_embeddings"},
        {0, "max_position_embeddings", "1", "max_position_embeddings"},
        {0, "max_position_embeddings", "-4096", "max_position_embeddings"},
        {0, "max_position_embeddings", "\"4096\"", "max_position_embeddings"},
        {0, "max_position_embeddings", "4096.0", "max_position_embeddings"},
        {0, "max_position_embeddings", "99999999999", "max_position_embeddings"},
        {0, "rms_norm_eps", "-1e-6", "rms_norm_eps"},
        {0, "rms_norm_eps", "0", "rms_norm_eps"},
        {0, "rms_norm_eps", "1.0", "rms_norm_eps"},
        {0, "rms_norm_eps", "\"1e-6\"", "rms_norm_eps"},
        {0, "rope_theta", "0", "rope_theta"},
        {0, "rope_theta", "-10000", "rope_theta"},
        {0, "rope_theta", "1", "rope_theta"},
        {0, "rope_theta", "1e30", "rope_theta"},
        {0, "rope_theta", "[10000]", "rope_theta"},
        {0, "architectures", "\"LlamaForCausalLM\"", "architectures"},
        {0, "architectures", "[]", "architectures"},
        {0, "architectures", "[5]", "architectures"},
        {0, "architectures", "{\"LlamaForCausalLM\": 1}", "architectures"},
        {0, "architectures", "[\"LlamaForCausalLM\", null]", "architectures"},
        {0, "rope_scaling", "\"linear\"", "rope_scaling"},
        {0, "rope_scaling", "{}", "rope_type"},
        {0, "rope_scaling.rope_type", "5", "rope_scaling.rope_type"},
        {0, "rope_scaling.factor", "0.5", "rope_scaling.factor"},
        {0, "rope_scaling.factor", "-8", "rope_scaling.factor"},
        {0, "rope_scaling.factor", "\"8\"", "rope_scaling.factor"},
        {0, "rope_scaling.factor", "100000", "rope_scaling.factor"},
        {0, "rope_scaling.factor", NULL, "rope_scaling.factor"},
        {0, "rope_scaling.low_freq_factor", "0", "rope_scaling.low_freq_factor"},
        {0, "rope_scaling.low_freq_factor", NULL, "rope_scaling.low_freq_factor"},
        {0, "rope_scaling.high_freq_factor", "0.5", "high_freq_factor"},
        {0, "rope_scaling.high_freq_factor", "true", "rope_scaling.high_freq_factor"},
        {0, "rope_scaling.original_max_position_embeddings", "0", "rope_scaling.original_max_position_embeddings"},
        {0, "rope_scaling.original_max_position_embeddings", "8192.5", "rope_scaling.original_max_position_embeddings"},
        {0, "rope_scaling.original_max_position_embeddings", NULL, "rope_scaling.original_max_position_embeddings"},
        {1, "sliding_window", "-1", "sliding_window"},
        {1, "sliding_window", "99999999999", "sliding_window"},
        {1, "sliding_window", "\"4096\"", "sliding_window"},
        {0, "head_dim", "3", "head_dim"},
        {0, "head_dim", "0", "head_dim"},
        {0, "head_dim", "128", "head_dim"}, /* > hidden 64 */
        {0, "head_dim", "\"16\"", "head_dim"},
        {0, "num_attention_heads", "6", "hidden_size"}, /* 64 / 6 without head_dim */
        {0, "num_key_value_heads", "0", "num_key_value_heads"},
        {0, "num_key_value_heads", "8", "num_key_value_heads"},
        {0, "num_key_value_heads", "3", "num_key_value_heads"},
        {0, "hidden_size", "\"64\"", "hidden_size"},
        {0, "hidden_size", "64.0", "hidden_size"},
        {0, "hidden_size", "-64", "hidden_size"},
        {0, "vocab_size", "0", "vocab_size"},
        {0, "num_hidden_layers", "0", "num_hidden_layers"},
        {0, "intermediate_size", "true", "intermediate_size"},
        {1, "num_local_experts", "0", "num_local_experts"},
        {1, "num_local_experts", "2000", "num_local_experts"},
        {1, "num_local_experts", "\"4\"", "num_local_experts"},
        {1, "num_experts_per_tok", "5", "num_experts_per_tok"},
        {1, "num_experts_per_tok", "0", "num_experts_per_tok"},
        {1, "num_experts_per_tok", NULL, "num_experts_per_tok"},
        {0, "bos_token_id", "100", "bos_token_id"},
        {0, "bos_token_id", "-2", "bos_token_id"},
        {0, "bos_token_id", "\"1\"", "bos_token_id"},
        {0, "eos_token_id", "[2, 100]", "eos_token_id"},
        {0, "eos_token_id", "[]", "eos_token_id"},
        {0, "eos_token_id", "\"2\"", "eos_token_id"},
        {0, "eos_token_id", "-1", "eos_token_id"},
        {0, "tie_word_embeddings", "\"true\"", "tie_word_embeddings"},
        {0, "tie_word_embeddings", "1", "tie_word_embeddings"},
        {0, "attention_bias", "\"no\"", "attention_bias"},
        {0, "mlp_bias", "0", "mlp_bias"},
        {0, "hidden_act", "5", "hidden_act"},
        {0, "quantization_config", "\"exl2\"", "quantization_config"},
        {0, "quantization_config.quant_method", "5", "quantization_config.quant_method"},
        {0, "quantization_config.bits", "-1", "quantization_config.bits"},
        {0, "quantization_config.head_bits", "7", "quantization_config.head_bits"},
    };
    /* a real that overflows is invalid JSON (jansson), never a silent inf */
    const char *inf = "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 64, \"num_hidden_layers\": 2, \"num_attention_heads\": 4,"
                      " \"intermediate_size\": 128, \"vocab_size\": 100, \"rms_norm_eps\": 1e999}";
    CHECK_EQ(mb_config_parse("cfgfile.json", inf, strlen(inf), &c), MB_EFORMAT);
    CHECK_MSG(strstr(mb_errmsg(), "cfgfile.json"), "%s", mb_errmsg());
    int n = (int)(sizeof bad / sizeof *bad);
    for (int i = 0; i < n; i++) {
        int rc = parse_with(bad[i].mixtral ? CFG_MIXTRAL : CFG_LLAMA, bad[i].key, bad[i].val, &c);
        if (!strncmp(bad[i].key, "quantization_config.", 20) && rc == MB_EUNSUPPORTED && strcmp(bad[i].key, "quantization_config.quant_method")) {
            /* the keys after quant_method need an exl2 config: add it */
            char base[2048];
            snprintf(base, sizeof base, "%.*s, \"quantization_config\": {\"quant_method\": \"exl2\"}}", (int)strlen(CFG_LLAMA) - 1, CFG_LLAMA);
            rc = parse_with(base, bad[i].key, bad[i].val, &c);
        }
        CHECK_MSG(rc == MB_EFORMAT, "case %d (%s = %s): rc %d: %s", i, bad[i].key, bad[i].val ? bad[i].val : "(removed)", rc, mb_errmsg());
        CHECK_MSG(strstr(mb_errmsg(), "cfgfile.json") && strstr(mb_errmsg(), bad[i].field), "case %d (%s = %s): message does not name the file and field: %s",
                  i, bad[i].key, bad[i].val ? bad[i].val : "(removed)", mb_errmsg());
        CHECK_MSG(!strchr(mb_errmsg(), '\n'), "case %d: not one line", i);
    }
}

/* a tiny config.json that describes a huge model must be refused against the checkpoint before anything
 * proportional to the config is allocated (here 4096 layers x 1024 experts: a 2 GB tensor list) */
static void test_config_vs_checkpoint(void) {
    char dir[512], p[700], cmd[1024], err[4096];
    snprintf(dir, sizeof dir, "%s/hugecfg", tmpdir);
    mb_mkdir_p(dir);
    snprintf(p, sizeof p, "%s/config.json", dir);
    write_text(p, "{\"architectures\": [\"MixtralForCausalLM\"], \"hidden_size\": 4, \"num_hidden_layers\": 4096, \"num_attention_heads\": 2,"
                  " \"intermediate_size\": 8, \"vocab_size\": 6, \"num_local_experts\": 1024, \"num_experts_per_tok\": 2}");
    float z[64] = {0};
    struct mb_st_entry e[] = {
        {"model.embed_tokens.weight", MB_F32, 2, {6, 4}, z},
        {"model.layers.0.input_layernorm.weight", MB_F32, 1, {4}, z},
    };
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    CHECK_EQ(mb_st_write(p, e, 2, NULL, 0), 0);
    struct mb_model *m = NULL;
    CHECK_EQ(mb_model_open(dir, &m), MB_EFORMAT);
    CHECK(m == NULL);
    CHECK_MSG(strstr(mb_errmsg(), "model.layers.0.post_attention_layernorm.weight") && strstr(mb_errmsg(), "not found"), "%s", mb_errmsg());
    /* the CLI: exit 1, and its peak memory stays far below the 2 GB the list would take */
    snprintf(cmd, sizeof cmd, "%s inspect %s", mixbit(), dir);
    struct rusage before, after;
    getrusage(RUSAGE_CHILDREN, &before);
    CHECK_EQ(run_cmd(cmd, err, sizeof err), 1);
    getrusage(RUSAGE_CHILDREN, &after);
    CHECK_MSG(strstr(err, "not found"), "%s", err);
    CHECK_MSG(after.ru_maxrss < 600 * 1024, "peak RSS of inspect %ld kB", after.ru_maxrss);
    /* counts by hand: stories260K-sized configs report the exact number of tensors */
    struct mb_config c;
    CHECK_EQ(parse_with(CFG_MIXTRAL, "num_local_experts", "4", &c), 0);
    CHECK_EQ(mb_config_n_expected(&c), 3 + 2 * (2 + 4 + 1 + 3 * 4));
    struct mb_expect *ex = NULL;
    int ne = 0;
    CHECK_EQ(mb_config_expected(&c, &ex, &ne), 0);
    CHECK_EQ(ne, mb_config_n_expected(&c));
    if (ex) {
        CHECK_STR(ex[0].name, "model.embed_tokens.weight");
        CHECK_STR(ex[8].name, "model.layers.0.block_sparse_moe.experts.0.w1");
        CHECK_EQ(ex[8].rows, 128);
        CHECK_STR(ex[10].name, "model.layers.0.block_sparse_moe.experts.0.w2");
        CHECK_EQ(ex[10].rows, 64);
        CHECK_EQ(ex[10].cols, 128);
        CHECK_EQ(ex[10].proj, MB_P_DOWN);
        CHECK_STR(ex[ne - 2].name, "model.norm.weight");
        CHECK_STR(ex[ne - 1].name, "lm_head");
    }
    free(ex);
}

/* the opener's messages for paths that are not model directories */
static void test_model_paths(void) {
    struct mb_model *m = NULL;
    CHECK_EQ(mb_model_open("/nonexistent-mixbit-model", &m), MB_EIO);
    CHECK_MSG(!strcmp(mb_errmsg(), "/nonexistent-mixbit-model: no such directory"), "%s", mb_errmsg());
    char p[600];
    snprintf(p, sizeof p, "%s/missing/dir", tmpdir);
    CHECK_EQ(mb_model_open(p, &m), MB_EIO);
    CHECK_MSG(strstr(mb_errmsg(), p) && strstr(mb_errmsg(), "no such directory"), "%s", mb_errmsg());
    CHECK_EQ(mb_model_open("", &m), MB_EIO);
    /* a directory without config.json, and a FIFO named config.json (refused, not blocking) */
    snprintf(p, sizeof p, "%s/nocfg", tmpdir);
    mb_mkdir_p(p);
    CHECK_EQ(mb_model_open(p, &m), MB_EIO);
    CHECK_MSG(strstr(mb_errmsg(), "no config.json"), "%s", mb_errmsg());
    char f[700];
    snprintf(f, sizeof f, "%s/config.json", p);
    CHECK_EQ(mkfifo(f, 0600), 0);
    alarm(20);
    CHECK_EQ(mb_model_open(p, &m), MB_EIO);
    alarm(0);
    CHECK_MSG(strstr(mb_errmsg(), f) && strstr(mb_errmsg(), "FIFO"), "%s", mb_errmsg());
    CHECK(m == NULL);
    /* inspect on that directory: refused naming the FIFO (not ignored as a missing config) */
    char cmd[1024], err[4096];
    float z[4] = {0};
    struct mb_st_entry e = {"a", MB_F32, 1, {4}, z};
    char st[760];
    snprintf(st, sizeof st, "%s/model.safetensors", p);
    CHECK_EQ(mb_st_write(st, &e, 1, NULL, 0), 0);
    snprintf(cmd, sizeof cmd, "timeout 20 %s inspect %s", mixbit(), p);
    CHECK_EQ(run_cmd(cmd, err, sizeof err), 1);
    CHECK_MSG(strstr(err, "config.json") && strstr(err, "FIFO"), "%s", err);
}

/* ---- safetensors sets: duplicates across shards, non-regular files ---- */
static void test_shard_sets(void) {
    char dir[512], a[700], b[700];
    uint8_t d[4] = {1, 2, 3, 4};
    struct mb_st_entry e1[] = {{"x", MB_U8, 1, {4}, d}, {"y", MB_U8, 1, {4}, d}};
    struct mb_st_entry e2[] = {{"z", MB_U8, 1, {4}, d}, {"x", MB_U8, 1, {4}, d}};
    snprintf(dir, sizeof dir, "%s/dupshards", tmpdir);
    mb_mkdir_p(dir);
    snprintf(a, sizeof a, "%s/part-a.safetensors", dir);
    snprintf(b, sizeof b, "%s/part-b.safetensors", dir);
    CHECK_EQ(mb_st_write(a, e1, 2, NULL, 0), 0);
    CHECK_EQ(mb_st_write(b, e2, 2, NULL, 0), 0);
    struct mb_st_set *s = NULL;
    /* no index: every *.safetensors is globbed; x in both is refused naming both files */
    CHECK_EQ(mb_st_set_open(dir, &s), MB_EFORMAT);
    CHECK(s == NULL);
    CHECK_MSG(strstr(mb_errmsg(), "tensor x") && strstr(mb_errmsg(), "part-a.safetensors") && strstr(mb_errmsg(), "part-b.safetensors"), "%s", mb_errmsg());
    /* the CLI says the same, exit 1 */
    char cmd[1024], err[4096];
    snprintf(cmd, sizeof cmd, "%s inspect %s", mixbit(), dir);
    CHECK_EQ(run_cmd(cmd, err, sizeof err), 1);
    CHECK_MSG(strstr(err, "part-a.safetensors") && strstr(err, "part-b.safetensors"), "%s", err);
    /* without the duplicate the set opens */
    e2[1].name = "w";
    CHECK_EQ(mb_st_write(b, e2, 2, NULL, 0), 0);
    CHECK_MSG(mb_st_set_open(dir, &s) == 0, "%s", mb_errmsg());
    if (s) CHECK_EQ(s->n, 4);
    mb_st_set_close(s);
    s = NULL;
    /* a FIFO among the shards, as the single shard, as the index: refused naming it, never blocking */
    alarm(20);
    char fifo[700];
    snprintf(fifo, sizeof fifo, "%s/part-c.safetensors", dir);
    CHECK_EQ(mkfifo(fifo, 0600), 0);
    CHECK_EQ(mb_st_set_open(dir, &s), MB_EIO);
    CHECK_MSG(strstr(mb_errmsg(), fifo) && strstr(mb_errmsg(), "FIFO"), "%s", mb_errmsg());
    CHECK_EQ(mb_st_set_open(fifo, &s), MB_EIO);
    struct mb_st_file *sf = NULL;
    CHECK_EQ(mb_st_open(fifo, &sf), MB_EIO);
    unlink(fifo);
    snprintf(fifo, sizeof fifo, "%s/sub.safetensors", dir); /* a directory with the suffix */
    CHECK_EQ(mkdir(fifo, 0700), 0);
    CHECK_EQ(mb_st_set_open(dir, &s), MB_EIO);
    CHECK_MSG(strstr(mb_errmsg(), "directory"), "%s", mb_errmsg());
    rmdir(fifo);
    char one[512];
    snprintf(one, sizeof one, "%s/onefifo", tmpdir);
    mb_mkdir_p(one);
    snprintf(fifo, sizeof fifo, "%s/model.safetensors", one);
    CHECK_EQ(mkfifo(fifo, 0600), 0);
    CHECK_EQ(mb_st_set_open(one, &s), MB_EIO);
    CHECK_MSG(strstr(mb_errmsg(), "FIFO"), "%s", mb_errmsg());
    snprintf(fifo, sizeof fifo, "%s/model.safetensors.index.json", one);
    CHECK_EQ(mkfifo(fifo, 0600), 0);
    CHECK_EQ(mb_st_set_open(one, &s), MB_EIO);
    CHECK_MSG(strstr(mb_errmsg(), fifo) && strstr(mb_errmsg(), "FIFO"), "%s", mb_errmsg());
    alarm(0);
    CHECK(s == NULL);
    /* a missing path */
    snprintf(fifo, sizeof fifo, "%s/none.safetensors", tmpdir);
    CHECK_EQ(mb_st_set_open(fifo, &s), MB_EIO);
    CHECK_MSG(strstr(mb_errmsg(), "no such file"), "%s", mb_errmsg());
}

/* ---- datasets: truncated and corrupt .gz, FIFOs and devices, directories ---- */
struct docs { int n; size_t bytes; };
static int count_docs(const char *doc, size_t len, void *user) {
    struct docs *d = user;
    (void)doc;
    d->n++;
    d->bytes += len;
    return 0;
}

static void write_gz(const char *path, const char *text, size_t len) {
    gzFile g = gzopen(path, "wb");
    gzwrite(g, text, (unsigned)len);
    gzclose(g);
}

static void test_dataset_inputs(void) {
    char dir[512], p[700], q[700];
    snprintf(dir, sizeof dir, "%s/data", tmpdir);
    mb_mkdir_p(dir);
    /* 200 kB of varied text so that a cut lands inside the deflate stream */
    size_t n = 200000;
    char *text = malloc(n);
    struct mb_rng g = {7};
    for (size_t i = 0; i < n; i++) text[i] = (char)("abcdefghij klmnop\n"[mb_rng_next(&g) % 18]);
    snprintf(p, sizeof p, "%s/full.txt.gz", dir);
    write_gz(p, text, n);
    struct docs d = {0};
    CHECK_MSG(mb_dataset_read(p, NULL, count_docs, &d) == 0, "%s", mb_errmsg());
    CHECK_EQ(d.n, 1);
    CHECK_EQ(d.bytes, n);
    /* truncated: half the file, and only the 8-byte trailer missing */
    char *gz;
    size_t gzlen;
    CHECK_EQ(mb_read_file(p, &gz, &gzlen, 0), 0);
    size_t cuts[3] = {gzlen / 2, gzlen - 8, gzlen - 1};
    for (int k = 0; k < 3; k++) {
        snprintf(q, sizeof q, "%s/cut%d.txt.gz", tmpdir, k);
        CHECK_EQ(mb_write_file_atomic(q, gz, cuts[k]), 0);
        memset(&d, 0, sizeof d);
        int rc = mb_dataset_read(q, NULL, count_docs, &d);
        CHECK_MSG(rc == MB_EFORMAT, "cut at %zu of %zu: rc %d, %d docs of %zu bytes", cuts[k], gzlen, rc, d.n, d.bytes);
        CHECK_MSG(strstr(mb_errmsg(), q) && strstr(mb_errmsg(), "truncated"), "%s", mb_errmsg());
        CHECK_EQ(d.n, 0); /* nothing of a truncated file reaches the caller */
    }
    /* corrupt: a flipped byte in the middle of the deflate data */
    gz[gzlen / 2] ^= 0x55;
    snprintf(q, sizeof q, "%s/corrupt.txt.gz", tmpdir);
    CHECK_EQ(mb_write_file_atomic(q, gz, gzlen), 0);
    CHECK(mb_dataset_read(q, NULL, count_docs, &d) != 0);
    CHECK_MSG(strstr(mb_errmsg(), q), "%s", mb_errmsg());
    free(gz);
    free(text);
    /* a FIFO as the text, inside the directory; /dev/zero; a directory with a text suffix */
    alarm(20);
    snprintf(q, sizeof q, "%s/b-fifo.txt", dir);
    CHECK_EQ(mkfifo(q, 0600), 0);
    CHECK_EQ(mb_dataset_read(q, NULL, count_docs, &d), MB_EIO);
    CHECK_MSG(strstr(mb_errmsg(), q) && strstr(mb_errmsg(), "FIFO"), "%s", mb_errmsg());
    CHECK_EQ(mb_dataset_read(dir, NULL, count_docs, &d), MB_EIO);
    CHECK_MSG(strstr(mb_errmsg(), q) && strstr(mb_errmsg(), "FIFO"), "%s", mb_errmsg());
    CHECK_EQ(mb_dataset_read("/dev/zero", NULL, count_docs, &d), MB_EIO);
    CHECK_MSG(strstr(mb_errmsg(), "/dev/zero") && strstr(mb_errmsg(), "device"), "%s", mb_errmsg());
    alarm(0);
    unlink(q);
    snprintf(q, sizeof q, "%s/c-dir.jsonl", dir);
    CHECK_EQ(mkdir(q, 0700), 0);
    CHECK_EQ(mb_dataset_read(dir, NULL, count_docs, &d), MB_EIO);
    CHECK_MSG(strstr(mb_errmsg(), q) && strstr(mb_errmsg(), "directory"), "%s", mb_errmsg());
    rmdir(q);
    memset(&d, 0, sizeof d);
    CHECK_MSG(mb_dataset_read(dir, NULL, count_docs, &d) == 0, "%s", mb_errmsg());
    CHECK_EQ(d.n, 1);
    snprintf(q, sizeof q, "%s/nothing.txt", tmpdir);
    CHECK_EQ(mb_dataset_read(q, NULL, count_docs, &d), MB_EIO);
    CHECK_MSG(strstr(mb_errmsg(), "no such file"), "%s", mb_errmsg());
}

/* calibration rows x length beyond 2^31 tokens: refused before the text is read or anything allocated */
static void test_calib_rows_bounds(void) {
    char tk[512];
    snprintf(tk, sizeof tk, "%s/models/stories260K", th_shared());
    struct mb_tokenizer *t = NULL;
    if (mb_tokenizer_load(tk, &t)) SKIP("tokenizer: %s", mb_errmsg());
    int32_t *rows = (int32_t *)1;
    CHECK_EQ(mb_calib_rows(t, "/nonexistent-text", NULL, (int64_t)1 << 40, 2048, 1, 1, &rows), MB_ERANGE);
    CHECK(rows == NULL);
    CHECK_MSG(strstr(mb_errmsg(), "calibration"), "%s", mb_errmsg());
    CHECK_EQ(mb_calib_rows(t, "/nonexistent-text", NULL, INT64_MAX / 2, INT64_MAX / 2, 1, 1, &rows), MB_ERANGE);
    CHECK_EQ(mb_calib_rows(t, "/nonexistent-text", NULL, 1 << 20, 1 << 12, 1, 1, &rows), MB_ERANGE); /* exactly 2^32 tokens */
    char tx[512];
    snprintf(tx, sizeof tx, "%s/text/tinystories-sample.txt", th_shared());
    CHECK_MSG(mb_calib_rows(t, tx, NULL, 4, 32, 1, 1, &rows) == 0, "%s", mb_errmsg());
    free(rows);
    mb_tokenizer_free(t);
}

static void test_fp16(void) {
    /* exhaustive: every finite half converts to f32 and back unchanged */
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        if ((h & 0x7c00) == 0x7c00) continue;
        if (mb_f32_to_f16(mb_f16_to_f32((uint16_t)h)) != h) bad++;
    }
    CHECK_EQ(bad, 0);
    CHECK_EQ(mb_f32_to_f16(1.0f + 1.0f / 2048), 0x3c00); /* tie to even */
    CHECK_EQ(mb_f32_to_f16(1.0f + 3.0f / 2048), 0x3c02);
    CHECK_EQ(mb_f32_to_f16(65520.0f), 0x7c00);
    CHECK_EQ(mb_f32_to_f16(65519.0f), 0x7bff);
    CHECK_EQ(mb_f32_to_f16(5.9604645e-08f), 0x0001);
    CHECK_EQ(mb_f32_to_f16(2.9802322e-08f), 0x0000); /* 2^-25 ties to even zero */
    CHECK_EQ(mb_f32_to_bf16(1.0f), 0x3f80);
    CHECK_NEAR(mb_bf16_to_f32(0x4049), 3.140625, 0);
}

/* a read that blocks on a FIFO would hang the test: fail loudly instead */
static void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "test_formats: blocked (a FIFO was opened in blocking mode)\n";
    if (write(2, msg, sizeof msg - 1)) {}
    _exit(3);
}

int main(void) {
    signal(SIGALRM, on_alarm);
    make_tmpdir();
    RUN(test_fp16);
    RUN(test_malformed);
    RUN(test_models);
    RUN(test_writer_roundtrip);
    RUN(test_index_errors);
    RUN(test_config);
    RUN(test_model_checks);
    RUN(test_cli_usage);
    RUN(test_config_fields);
    RUN(test_config_vs_checkpoint);
    RUN(test_model_paths);
    RUN(test_shard_sets);
    RUN(test_dataset_inputs);
    RUN(test_calib_rows_bounds);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd)) {}
    TEST_MAIN_END();
}
