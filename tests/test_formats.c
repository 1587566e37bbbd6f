/* tests/test_formats.c: safetensors reader/writer, malformed-file suite, config.json and model checks,
 * the inspect command's exit codes. */
#include <stdint.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

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

int main(void) {
    make_tmpdir();
    RUN(test_fp16);
    RUN(test_malformed);
    RUN(test_models);
    RUN(test_writer_roundtrip);
    RUN(test_index_errors);
    RUN(test_config);
    RUN(test_model_checks);
    RUN(test_cli_usage);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd)) {}
    TEST_MAIN_END();
}
