/* tests/test_torchbin.c: PyTorch .bin checkpoints read without pickle (formats/torchbin.c) and
 * `mixbit convert-weights`. The fixtures in ../shared/models/stories260K-torchbin must give exactly the
 * stories260K tensors; its legacy file gets the legacy message; its two malicious pickles are refused by
 * the global they import and a marker file proves their command never ran. Synthetic archives built here
 * (zip and pickle writers below) cover deflate, zip64, strides, offsets, shared storages, protocol 4
 * opcodes, and a suite of malformed files that must each fail with a one-line message naming the file
 * (library and CLI, exit 1). */
#include <errno.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <jansson.h>

#include "../formats/formats.h"
#include "harness.h"
#include "torchbin_writer.h"

static char tmpdir[256];

static const char *mixbit(void) {
    const char *m = getenv("MIXBIT");
    return m ? m : "./mixbit";
}

static const char *fixdir(void) {
    static char d[512];
    snprintf(d, sizeof d, "%s/models/stories260K-torchbin", th_shared());
    return d;
}

/* run a command through sh; exit code (128+signal when killed), stderr into err, stdout into out */
static int run(const char *cmd, char *out, size_t outsz, char *err, size_t errsz) {
    char full[4096], ef[300], of[300];
    snprintf(ef, sizeof ef, "%s/stderr.txt", tmpdir);
    snprintf(of, sizeof of, "%s/stdout.txt", tmpdir);
    snprintf(full, sizeof full, "%s >%s 2>%s", cmd, of, ef);
    int st = system(full);
    const char *fn[2] = {ef, of};
    char *dst[2] = {err, out};
    size_t sz[2] = {errsz, outsz};
    for (int i = 0; i < 2; i++) {
        if (!dst[i]) continue;
        dst[i][0] = 0;
        FILE *f = fopen(fn[i], "r");
        if (f) { size_t n = fread(dst[i], 1, sz[i] - 1, f); dst[i][n] = 0; fclose(f); }
    }
    if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 255;
}

static int one_line(const char *s) {
    const char *nl = strchr(s, '\n');
    return nl && nl[1] == 0;
}

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); exit(1); }
    if (n) fwrite(p, 1, n, f);
    fclose(f);
}

static void wr32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void wr16(uint8_t *p, unsigned v) { p[0] = v & 0xff; p[1] = (v >> 8) & 0xff; }

/* ------------------------------------------------------------------------------------------------ */
/* the fixtures                                                                                     */

static struct mb_st_set *open_ref(void) {
    char p[512];
    snprintf(p, sizeof p, "%s/models/stories260K", th_shared());
    struct mb_st_set *s = NULL;
    if (mb_st_set_open(p, &s)) return NULL;
    return s;
}

/* every tensor of `got` equals the reference's tensor of the same name: dtype, shape and bytes */
static int same_tensors(const struct mb_st_set *ref, const struct mb_st_set *got) {
    int bad = 0;
    if (ref->n != got->n) { fprintf(stderr, "tensor count %d vs %d\n", ref->n, got->n); return 1; }
    for (int i = 0; i < ref->n; i++) {
        const struct mb_tensor_info *a = ref->sorted[i], *b = mb_st_find(got, a->name);
        if (!b || b->dtype != a->dtype || b->ndim != a->ndim || b->nbytes != a->nbytes || memcmp(a->shape, b->shape, sizeof a->shape) ||
            memcmp(a->data, b->data, a->nbytes)) {
            fprintf(stderr, "tensor %s differs\n", a->name);
            bad++;
        }
    }
    return bad;
}

static void test_fixture_plain(void) {
    char p[600];
    snprintf(p, sizeof p, "%s/pytorch_model.bin", fixdir());
    struct mb_st_set *ref = open_ref(), *s = NULL;
    CHECK_MSG(ref != NULL, "%s", mb_errmsg());
    CHECK_MSG(mb_st_set_open(p, &s) == 0, "%s", mb_errmsg());
    if (!ref || !s) { mb_st_set_close(ref); mb_st_set_close(s); return; }
    CHECK_EQ(same_tensors(ref, s), 0);
    /* zero copy: every view lies in the archive's mapping, nothing was copied */
    const struct mb_st_file *f = s->files[0];
    CHECK_EQ(f->n_owned, 0);
    for (int i = 0; i < f->n; i++) {
        const uint8_t *d = f->t[i].data;
        CHECK(d >= (const uint8_t *)f->map && d + f->t[i].nbytes <= (const uint8_t *)f->map + f->map_size);
        CHECK(d == (const uint8_t *)f->map + f->t[i].offset);
    }
    /* the directory (config.json + pytorch_model.bin, beside the legacy and malicious files) as a model */
    struct mb_model *m = NULL;
    CHECK_MSG(mb_model_open(fixdir(), &m) == 0, "%s", mb_errmsg());
    if (m) CHECK_EQ(same_tensors(ref, m->st), 0);
    mb_model_close(m);
    mb_st_set_close(s);
    mb_st_set_close(ref);
}

static void test_fixture_bf16_sharded(void) {
    char p[600];
    snprintf(p, sizeof p, "%s/sharded-bf16", fixdir());
    struct mb_st_set *ref = open_ref();
    struct mb_model *m = NULL;
    CHECK_MSG(mb_model_open(p, &m) == 0, "%s", mb_errmsg());
    if (!ref || !m) { mb_st_set_close(ref); mb_model_close(m); return; }
    CHECK_EQ(m->st->n_files, 2);
    CHECK_EQ(m->st->n, ref->n);
    /* each value is the f32 reference rounded to bf16 (nearest even), bit for bit */
    int64_t bad = 0, total = 0;
    for (int i = 0; i < ref->n; i++) {
        const struct mb_tensor_info *a = ref->sorted[i], *b = mb_st_find(m->st, a->name);
        CHECK_MSG(b && b->dtype == MB_BF16 && b->numel == a->numel && b->ndim == a->ndim, "%s", a->name);
        if (!b || b->numel != a->numel) continue;
        for (int64_t k = 0; k < a->numel; k++) {
            float x;
            uint16_t h;
            memcpy(&x, (const uint8_t *)a->data + 4 * k, 4);
            memcpy(&h, (const uint8_t *)b->data + 2 * k, 2);
            bad += h != mb_f32_to_bf16(x);
            total++;
        }
    }
    CHECK_EQ(bad, 0);
    CHECK_EQ(total, 260032);
    mb_model_close(m);
    mb_st_set_close(ref);
}

static void test_fixture_tied(void) {
    char p[600];
    snprintf(p, sizeof p, "%s/tied-shared-storage.bin", fixdir());
    struct mb_st_set *ref = open_ref(), *s = NULL;
    CHECK_MSG(mb_st_set_open(p, &s) == 0, "%s", mb_errmsg());
    if (!ref || !s) { mb_st_set_close(ref); mb_st_set_close(s); return; }
    CHECK_EQ(s->n, 2);
    const struct mb_tensor_info *e = mb_st_find(s, "model.embed_tokens.weight"), *h = mb_st_find(s, "lm_head.weight"),
                                *r = mb_st_find(ref, "model.embed_tokens.weight");
    CHECK(e && h && r);
    if (e && h && r) {
        CHECK(e->data == h->data); /* one storage, two tensors viewing it */
        CHECK(e->nbytes == r->nbytes && !memcmp(e->data, r->data, r->nbytes));
        CHECK(h->nbytes == r->nbytes && h->ndim == 2 && h->shape[0] == 512 && h->shape[1] == 64);
    }
    mb_st_set_close(s);
    mb_st_set_close(ref);
}

static void test_fixture_legacy(void) {
    char p[600], cmd[1400], err[4096];
    snprintf(p, sizeof p, "%s/legacy-format.bin", fixdir());
    struct mb_st_file *f = NULL;
    CHECK_EQ(mb_torch_open(p, &f), MB_EUNSUPPORTED);
    CHECK(f == NULL);
    CHECK_MSG(strstr(mb_errmsg(), "legacy PyTorch format") && strstr(mb_errmsg(), p) && strstr(mb_errmsg(), "torch>=1.6"), "%s", mb_errmsg());
    snprintf(cmd, sizeof cmd, "%s inspect %s", mixbit(), p);
    CHECK_EQ(run(cmd, NULL, 0, err, sizeof err), 1);
    CHECK_MSG(one_line(err) && strstr(err, "legacy PyTorch format") && strstr(err, p), "%s", err);
    snprintf(cmd, sizeof cmd, "%s convert-weights %s %s/legacy-out", mixbit(), p, tmpdir);
    CHECK_EQ(run(cmd, NULL, 0, err, sizeof err), 1);
    CHECK_MSG(strstr(err, "legacy PyTorch format") != NULL, "%s", err);
}

/* The malicious fixtures: which command each would run is read from the pickle's bytes (the members are
 * stored, so the string is in the file as written; `python3 -m pickletools` on data.pkl shows the same:
 * GLOBAL 'posix system' / '__builtin__ eval', then REDUCE on "touch /tmp/mixbit_pwned[2]"). */
static void test_fixture_malicious(void) {
    static const struct { const char *file, *global, *command, *marker; } cases[] = {
        {"malicious-os-system.bin", "posix.system", "touch /tmp/mixbit_pwned", "/tmp/mixbit_pwned"},
        {"malicious-eval.bin", "__builtin__.eval", "system('touch /tmp/mixbit_pwned2')", "/tmp/mixbit_pwned2"},
    };
    for (int i = 0; i < 2; i++) {
        char p[600], cmd[2400], err[4096], *bytes;
        size_t n;
        snprintf(p, sizeof p, "%s/%s", fixdir(), cases[i].file);
        CHECK_MSG(mb_read_file(p, &bytes, &n, 0) == 0, "%s", mb_errmsg());
        if (!bytes) continue;
        /* the payload is what we think it is, so the marker below is the file it would create */
        CHECK_MSG(memmem(bytes, n, cases[i].command, strlen(cases[i].command)) != NULL, "%s: payload not found", p);
        free(bytes);
        if (unlink(cases[i].marker) != 0 && errno != ENOENT) SKIP("cannot remove a stale %s, so its absence would prove nothing", cases[i].marker);
        struct mb_st_file *f = NULL;
        CHECK_EQ(mb_torch_open(p, &f), MB_EUNSUPPORTED);
        CHECK(f == NULL);
        CHECK_MSG(strstr(mb_errmsg(), cases[i].global) && strstr(mb_errmsg(), p), "%s", mb_errmsg());
        /* every command that reads weights refuses it, naming the global */
        char dir[600], cfg[700], link[700], src[700];
        snprintf(dir, sizeof dir, "%s/malicious%d", tmpdir, i);
        mb_mkdir_p(dir);
        snprintf(cfg, sizeof cfg, "%s/config.json", dir);
        snprintf(src, sizeof src, "%s/config.json", fixdir());
        CHECK_EQ(mb_copy_file(src, cfg), 0);
        snprintf(link, sizeof link, "%s/pytorch_model.bin", dir);
        char *abs = realpath(p, NULL);
        CHECK(abs && symlink(abs, link) == 0);
        free(abs);
        snprintf(src, sizeof src, "%s/text/tinystories-sample.txt", th_shared());
        const char *cmds[5] = {"inspect %s", "convert-weights %s %s/mal-out", "inspect %s", "ppl %s --text %s", "convert %s %s/mal-conv --no-eval --cal %s"};
        for (int c = 0; c < 5; c++) {
            const char *target = c < 2 ? p : dir;
            char sub[1600];
            snprintf(sub, sizeof sub, cmds[c], target, c == 3 ? src : tmpdir, src);
            snprintf(cmd, sizeof cmd, "%s %s", mixbit(), sub);
            int ec = run(cmd, NULL, 0, err, sizeof err);
            CHECK_MSG(ec == 1, "%s: exit %d", cmd, ec);
            CHECK_MSG(strstr(err, cases[i].global) != NULL, "%s: %s", cmd, err);
        }
        char out[700];
        snprintf(out, sizeof out, "%s/mal-out", tmpdir);
        CHECK(access(out, F_OK) != 0);
        snprintf(out, sizeof out, "%s/mal-conv", tmpdir);
        CHECK(access(out, F_OK) != 0);
        /* and nothing ran */
        CHECK_MSG(access(cases[i].marker, F_OK) != 0, "%s exists: the payload ran", cases[i].marker);
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* convert-weights and the model commands on .bin directories                                       */

static void test_convert_weights(void) {
    char cmd[2400], err[4096], out[4096], o[600], p[700];
    struct mb_st_set *ref = open_ref(), *s = NULL;
    if (!ref) { CHECK_MSG(0, "%s", mb_errmsg()); return; }
    /* plain directory -> directory with model.safetensors and the side files */
    snprintf(o, sizeof o, "%s/cw-plain", tmpdir);
    snprintf(cmd, sizeof cmd, "%s convert-weights %s %s", mixbit(), fixdir(), o);
    CHECK_MSG(run(cmd, out, sizeof out, err, sizeof err) == 0, "%s", err);
    CHECK(strstr(out, "47 tensors") != NULL);
    snprintf(p, sizeof p, "%s/model.safetensors", o);
    CHECK_MSG(mb_st_set_open(p, &s) == 0, "%s", mb_errmsg());
    if (s) CHECK_EQ(same_tensors(ref, s), 0);
    mb_st_set_close(s);
    s = NULL;
    const char *side[] = {"config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"};
    for (int i = 0; i < 6; i++) {
        snprintf(p, sizeof p, "%s/%s", o, side[i]);
        CHECK_MSG(mb_file_exists(p), "%s missing", p);
    }
    snprintf(p, sizeof p, "%s/legacy-format.bin", o);
    CHECK(!mb_file_exists(p));
    struct mb_model *m = NULL;
    CHECK_MSG(mb_model_open(o, &m) == 0, "%s", mb_errmsg());
    mb_model_close(m);

    /* sharded bf16: the same grouping into model-0000k-of-00002.safetensors, with an index */
    char in[600];
    snprintf(in, sizeof in, "%s/sharded-bf16", fixdir());
    snprintf(o, sizeof o, "%s/cw-bf16", tmpdir);
    snprintf(cmd, sizeof cmd, "%s convert-weights %s %s", mixbit(), in, o);
    CHECK_MSG(run(cmd, out, sizeof out, err, sizeof err) == 0, "%s", err);
    struct mb_st_set *bin = NULL;
    CHECK_MSG(mb_st_set_open(in, &bin) == 0, "%s", mb_errmsg());
    CHECK_MSG(mb_st_set_open(o, &s) == 0, "%s", mb_errmsg());
    if (bin && s) {
        CHECK_EQ(s->n_files, 2);
        CHECK_EQ(same_tensors(bin, s), 0);
        json_error_t je;
        char ip[700], op[700];
        snprintf(ip, sizeof ip, "%s/pytorch_model.bin.index.json", in);
        snprintf(op, sizeof op, "%s/model.safetensors.index.json", o);
        json_t *ji = json_load_file(ip, 0, &je), *jo = json_load_file(op, 0, &je);
        CHECK(ji && jo);
        if (ji && jo) {
            json_t *wi = json_object_get(ji, "weight_map"), *wo = json_object_get(jo, "weight_map");
            CHECK_EQ(json_object_size(wi), json_object_size(wo));
            const char *k;
            json_t *v;
            json_object_foreach(wi, k, v) {
                char want[256];
                const char *f = json_string_value(v); /* pytorch_model-0000k-of-00002.bin */
                snprintf(want, sizeof want, "model%.*s.safetensors", (int)(strlen(f) - 13 - 4), f + 13);
                CHECK_STR(json_string_value(json_object_get(wo, k)), want);
            }
            CHECK_EQ(json_integer_value(json_object_get(json_object_get(jo, "metadata"), "total_size")), 520064);
        }
        json_decref(ji);
        json_decref(jo);
    }
    mb_st_set_close(s);
    s = NULL;
    mb_st_set_close(bin);

    /* one .bin file (tied, shared storage) -> one .safetensors file, both tensors written */
    snprintf(in, sizeof in, "%s/tied-shared-storage.bin", fixdir());
    snprintf(o, sizeof o, "%s/cw-tied.safetensors", tmpdir);
    snprintf(cmd, sizeof cmd, "%s convert-weights %s %s", mixbit(), in, o);
    CHECK_MSG(run(cmd, out, sizeof out, err, sizeof err) == 0, "%s", err);
    CHECK_MSG(mb_st_set_open(o, &s) == 0, "%s", mb_errmsg());
    if (s) {
        const struct mb_tensor_info *e = mb_st_find(s, "model.embed_tokens.weight"), *h = mb_st_find(s, "lm_head.weight"),
                                    *r = mb_st_find(ref, "model.embed_tokens.weight");
        CHECK(e && h && r && e->nbytes == r->nbytes && h->nbytes == r->nbytes && !memcmp(e->data, r->data, r->nbytes) && !memcmp(h->data, r->data, r->nbytes));
    }
    mb_st_set_close(s);
    s = NULL;
    /* the index path as input, into an existing empty directory */
    snprintf(in, sizeof in, "%s/sharded-bf16/pytorch_model.bin.index.json", fixdir());
    snprintf(o, sizeof o, "%s/cw-empty", tmpdir);
    mb_mkdir_p(o);
    snprintf(cmd, sizeof cmd, "%s convert-weights %s %s", mixbit(), in, o);
    CHECK_MSG(run(cmd, out, sizeof out, err, sizeof err) == 0, "%s", err);
    snprintf(p, sizeof p, "%s/model-00002-of-00002.safetensors", o);
    CHECK(mb_file_exists(p));
    snprintf(p, sizeof p, "%s/config.json", o); /* side files come only with a directory input */
    CHECK(!mb_file_exists(p));

    /* refusals: taken output, not a checkpoint, usage */
    snprintf(cmd, sizeof cmd, "%s convert-weights %s %s/cw-plain", mixbit(), fixdir(), tmpdir);
    CHECK_EQ(run(cmd, NULL, 0, err, sizeof err), 1);
    CHECK_MSG(one_line(err) && strstr(err, "already exists"), "%s", err);
    snprintf(cmd, sizeof cmd, "%s convert-weights %s %s", mixbit(), o, o);
    CHECK_EQ(run(cmd, NULL, 0, err, sizeof err), 1);
    snprintf(cmd, sizeof cmd, "%s convert-weights %s/config.json %s/x", mixbit(), fixdir(), tmpdir);
    CHECK_EQ(run(cmd, NULL, 0, err, sizeof err), 1);
    CHECK_MSG(strstr(err, "not a PyTorch checkpoint") != NULL, "%s", err);
    snprintf(cmd, sizeof cmd, "%s convert-weights %s", mixbit(), fixdir());
    CHECK_EQ(run(cmd, NULL, 0, err, sizeof err), 2);
    snprintf(cmd, sizeof cmd, "%s convert-weights --bogus %s %s/y", mixbit(), fixdir(), tmpdir);
    CHECK_EQ(run(cmd, NULL, 0, err, sizeof err), 2);
    /* a failure in the second shard leaves nothing: no output, no temporary directory */
    char bad[600];
    snprintf(bad, sizeof bad, "%s/cw-badshard", tmpdir);
    mb_mkdir_p(bad);
    const char *names[] = {"config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin"};
    for (int i = 0; i < 3; i++) {
        char a[700], b[700];
        snprintf(a, sizeof a, "%s/sharded-bf16/%s", fixdir(), names[i]);
        snprintf(b, sizeof b, "%s/%s", bad, names[i]);
        CHECK_EQ(mb_copy_file(a, b), 0);
    }
    char a[700], *bytes;
    size_t n, at = 0;
    snprintf(a, sizeof a, "%s/sharded-bf16/pytorch_model-00002-of-00002.bin", fixdir());
    struct mb_st_file *sf = NULL;
    CHECK_MSG(mb_torch_open(a, &sf) == 0, "%s", mb_errmsg());
    if (sf) at = sf->t[sf->n - 1].offset + 1; /* inside the last tensor's storage bytes */
    mb_st_close(sf);
    if (at && mb_read_file(a, &bytes, &n, 0) == 0) {
        bytes[at] ^= 0x40; /* a flipped bit in a storage: CRC-32 mismatch */
        snprintf(a, sizeof a, "%s/pytorch_model-00002-of-00002.bin", bad);
        write_bytes(a, bytes, n);
        free(bytes);
    }
    snprintf(o, sizeof o, "%s/cw-badout", tmpdir);
    snprintf(cmd, sizeof cmd, "%s convert-weights %s %s", mixbit(), bad, o);
    CHECK_EQ(run(cmd, NULL, 0, err, sizeof err), 1);
    CHECK_MSG(one_line(err) && strstr(err, "pytorch_model-00002-of-00002.bin") && strstr(err, "CRC"), "%s", err);
    CHECK(access(o, F_OK) != 0);
    snprintf(cmd, sizeof cmd, "ls -d %s.tmp.* 2>/dev/null | grep -q .", o);
    CHECK(system(cmd) != 0);
    mb_st_set_close(ref);
}

/* pytorch_model.bin.index.json: the same consistency rules as the safetensors index */
static void test_bin_index(void) {
    char dir[600], a[700], b[700], cmd[1400], err[4096];
    snprintf(dir, sizeof dir, "%s/binindex", tmpdir);
    mb_mkdir_p(dir);
    const char *names[] = {"config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"};
    for (int i = 0; i < 3; i++) {
        snprintf(a, sizeof a, "%s/sharded-bf16/%s", fixdir(), names[i]);
        snprintf(b, sizeof b, "%s/%s", dir, names[i]);
        CHECK_EQ(mb_copy_file(a, b), 0);
    }
    snprintf(a, sizeof a, "%s/sharded-bf16/pytorch_model.bin.index.json", fixdir());
    json_error_t je;
    json_t *good = json_load_file(a, 0, &je);
    CHECK(good != NULL);
    if (!good) return;
    snprintf(b, sizeof b, "%s/pytorch_model.bin.index.json", dir);
    static const struct { const char *what, *expect; } cases[] = {
        {"an entry removed", "is not listed in the index"},
        {"an entry added", "listed but not found"},
        {"an entry moved to the other shard", "is listed in pytorch_model-00002-of-00002.bin but found in pytorch_model-00001-of-00002.bin"},
        {"a file outside the directory", "outside the directory"},
        {"a missing shard", "pytorch_model-00003-of-00003.bin: cannot open"},
    };
    for (int i = 0; i < 5; i++) {
        json_t *j = json_deep_copy(good), *wm = json_object_get(j, "weight_map");
        if (i == 0) json_object_del(wm, "model.norm.weight");
        if (i == 1) json_object_set_new(wm, "model.extra.weight", json_string("pytorch_model-00001-of-00002.bin"));
        if (i == 2) json_object_set_new(wm, "model.embed_tokens.weight", json_string("pytorch_model-00002-of-00002.bin"));
        if (i == 3) json_object_set_new(wm, "model.norm.weight", json_string("../pytorch_model-00002-of-00002.bin"));
        if (i == 4) json_object_set_new(wm, "model.norm.weight", json_string("pytorch_model-00003-of-00003.bin"));
        json_dump_file(j, b, 0);
        json_decref(j);
        struct mb_st_set *s = NULL;
        int rc = mb_st_set_open(dir, &s);
        CHECK_MSG(rc != 0 && s == NULL, "%s: rc %d", cases[i].what, rc);
        CHECK_MSG(strstr(mb_errmsg(), cases[i].expect) != NULL, "%s: %s", cases[i].what, mb_errmsg());
        snprintf(cmd, sizeof cmd, "%s inspect %s", mixbit(), dir);
        CHECK_EQ(run(cmd, NULL, 0, err, sizeof err), 1);
        CHECK_MSG(one_line(err) && strstr(err, cases[i].expect), "%s: %s", cases[i].what, err);
    }
    json_dump_file(good, b, 0);
    struct mb_model *m = NULL;
    CHECK_MSG(mb_model_open(dir, &m) == 0, "%s", mb_errmsg());
    mb_model_close(m);
    json_decref(good);
}

/* convert, ppl and inspect on a directory holding only .bin files give what they give on safetensors */
static void test_model_commands(void) {
    char cmd[2400], err[4096], a[4096], b[4096], text[600];
    snprintf(text, sizeof text, "%s/text/tinystories-sample.txt", th_shared());
    snprintf(cmd, sizeof cmd, "%s inspect %s --json", mixbit(), fixdir());
    CHECK_MSG(run(cmd, a, sizeof a, err, sizeof err) == 0, "%s", err);
    CHECK(strstr(a, "LlamaForCausalLM") != NULL);
    snprintf(cmd, sizeof cmd, "%s ppl %s --text %s --ctx 128 --max-tokens 600 --json", mixbit(), fixdir(), text);
    CHECK_MSG(run(cmd, a, sizeof a, err, sizeof err) == 0, "%s", err);
    snprintf(cmd, sizeof cmd, "%s ppl %s/models/stories260K --text %s --ctx 128 --max-tokens 600 --json", mixbit(), th_shared(), text);
    CHECK_MSG(run(cmd, b, sizeof b, err, sizeof err) == 0, "%s", err);
    char *pa = strstr(a, "\"mean_nll\""), *pb = strstr(b, "\"mean_nll\"");
    CHECK_MSG(pa && pb && strtod(strchr(pa, ':') + 1, NULL) == strtod(strchr(pb, ':') + 1, NULL), "%s vs %s", a, b);
    /* convert: the same EXL2 tensors, byte for byte */
    const char *small = "--bpw 7 --rows 4 --measure-rows 2 --length 64 -q --no-eval";
    char o1[600], o2[600];
    snprintf(o1, sizeof o1, "%s/conv-bin", tmpdir);
    snprintf(o2, sizeof o2, "%s/conv-st", tmpdir);
    snprintf(cmd, sizeof cmd, "%s convert %s %s --cal %s %s", mixbit(), fixdir(), o1, text, small);
    CHECK_MSG(run(cmd, NULL, 0, err, sizeof err) == 0, "%s", err);
    snprintf(cmd, sizeof cmd, "%s convert %s/models/stories260K %s --cal %s %s", mixbit(), th_shared(), o2, text, small);
    CHECK_MSG(run(cmd, NULL, 0, err, sizeof err) == 0, "%s", err);
    char f1[700], f2[700];
    snprintf(f1, sizeof f1, "%s/output.safetensors", o1);
    snprintf(f2, sizeof f2, "%s/output.safetensors", o2);
    char *x = NULL, *y = NULL;
    size_t nx = 0, ny = 0;
    CHECK(mb_read_file(f1, &x, &nx, 0) == 0 && mb_read_file(f2, &y, &ny, 0) == 0);
    CHECK(x && y && nx == ny && nx > 0 && !memcmp(x, y, nx));
    free(x);
    free(y);
}

/* ------------------------------------------------------------------------------------------------ */
/* synthetic archives                                                                               */

static float s0[12] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};

/* A state dict exercising every accepted construct; `variant` picks the container (0 plain, 1 deflated
 * storages and zip64, 2 misaligned data, 3 protocol 4 opcodes + OrderedDict with _metadata). */
static void build_good(int variant, struct buf *zip) {
    struct buf pk = {0};
    proto4 = variant == 3;
    pk_begin(&pk);
    if (variant == 3) { pk_global(&pk, "collections", "OrderedDict"); b_u8(&pk, ')'); b_u8(&pk, 'R'); }
    else b_u8(&pk, '}');
    b_u8(&pk, 'q'); b_u8(&pk, 0); /* BINPUT 0 */
    b_u8(&pk, '(');
    const int64_t sh34[] = {3, 4}, st34[] = {4, 1}, sh43[] = {4, 3}, st43[] = {1, 4}, sh24[] = {2, 4}, st0[] = {0, 1}, sh05[] = {0, 5}, st05[] = {5, 1}, sh23[] = {2, 3}, st23[] = {3, 1}, sh3[] = {3}, st1[] = {1};
    pk_str(&pk, "a"); pk_tensor(&pk, "FloatStorage", "0", 12, 0, 2, sh34, st34);
    pk_str(&pk, "at"); pk_tensor(&pk, "FloatStorage", "0", 12, 0, 2, sh43, st43);    /* transposed view */
    pk_str(&pk, "b"); pk_tensor(&pk, "FloatStorage", "0", 12, 4, 2, sh24, st34);     /* storage offset */
    pk_str(&pk, "e"); pk_tensor(&pk, "FloatStorage", "0", 12, 0, 2, sh34, st0);      /* expanded rows */
    pk_str(&pk, "z"); pk_tensor(&pk, "FloatStorage", "0", 12, 0, 2, sh05, st05);     /* no elements */
    pk_str(&pk, "s"); pk_tensor(&pk, "FloatStorage", "0", 12, 7, 0, NULL, NULL);     /* a scalar */
    pk_str(&pk, "w"); pk_tensor(&pk, "BFloat16Storage", "1", 6, 0, 2, sh23, st23);
    static const char *cls[] = {"DoubleStorage", "HalfStorage", "LongStorage", "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage"};
    static const char *key[] = {"2", "3", "4", "5", "6", "7", "8", "9"};
    for (int i = 0; i < 8; i++) { char nm[16]; snprintf(nm, sizeof nm, "d%d", i); pk_str(&pk, nm); pk_tensor(&pk, cls[i], key[i], 3, 0, 1, sh3, st1); }
    /* a parameter: _rebuild_parameter(tensor, True, OrderedDict()) */
    pk_str(&pk, "p");
    pk_global(&pk, "torch._utils", "_rebuild_parameter");
    b_u8(&pk, '(');
    pk_tensor(&pk, "FloatStorage", "0", 12, 8, 1, sh3, st1);
    b_u8(&pk, 0x88);
    pk_global(&pk, "collections", "OrderedDict"); b_u8(&pk, ')'); b_u8(&pk, 'R');
    b_u8(&pk, 't'); b_u8(&pk, 'R');
    b_u8(&pk, 'u');
    if (variant == 3) { /* BUILD with {'_metadata': OrderedDict({'': {'version': 1}})}, as state_dict() pickles */
        b_u8(&pk, '}'); pk_str(&pk, "_metadata");
        pk_global(&pk, "collections", "OrderedDict"); b_u8(&pk, ')'); b_u8(&pk, 'R');
        pk_str(&pk, ""); b_u8(&pk, '}'); pk_str(&pk, "version"); pk_int(&pk, 1); b_u8(&pk, 's'); b_u8(&pk, 's');
        b_u8(&pk, 's'); b_u8(&pk, 'b');
    }
    b_u8(&pk, '.');
    proto4 = 0;
    /* storages */
    uint16_t bf[6], f16[3] = {0x3c00, 0xc000, 0x3800};
    for (int i = 0; i < 6; i++) bf[i] = mb_f32_to_bf16((float)i - 2.5f);
    double f64[3] = {1.5, -2.25, 1e300};
    int64_t i64[3] = {INT64_MIN, -1, INT64_MAX};
    int32_t i32[3] = {INT32_MIN, 0, 7};
    int16_t i16[3] = {-32768, 1, 32767};
    int8_t i8[3] = {-128, 0, 127};
    uint8_t u8[3] = {0, 128, 255}, bl[3] = {1, 0, 1};
    struct zm m[] = {
        {"archive/data.pkl", pk.p, pk.n, variant == 1}, {"archive/byteorder", "little", 6, 0},
        {"archive/data/0", s0, sizeof s0, variant == 1}, {"archive/data/1", bf, sizeof bf, variant == 1},
        {"archive/data/2", f64, sizeof f64, 0}, {"archive/data/3", f16, sizeof f16, 0},
        {"archive/data/4", i64, sizeof i64, variant == 1}, {"archive/data/5", i32, sizeof i32, 0},
        {"archive/data/6", i16, sizeof i16, 0}, {"archive/data/7", i8, sizeof i8, 0},
        {"archive/data/8", u8, sizeof u8, 0}, {"archive/data/9", bl, sizeof bl, 0},
        {"archive/version", "3\n", 2, 0},
    };
    struct zopt o = {.zip64 = variant == 1, .align = variant != 2, .misalign = variant == 2};
    struct zinfo zi;
    zip_build(zip, m, 13, &o, &zi);
    b_free(&pk);
}

static float f32_at(const struct mb_tensor_info *t, int64_t i) {
    float v;
    memcpy(&v, (const uint8_t *)t->data + 4 * i, 4);
    return v;
}

static void test_synthetic_good(void) {
    for (int variant = 0; variant < 4; variant++) {
        struct buf z = {0};
        build_good(variant, &z);
        char path[600];
        snprintf(path, sizeof path, "%s/good%d.bin", tmpdir, variant);
        write_bytes(path, z.p, z.n);
        b_free(&z);
        struct mb_st_file *f = NULL;
        int rc = mb_torch_open(path, &f);
        CHECK_MSG(rc == 0, "variant %d: %s", variant, mb_errmsg());
        if (!f) continue;
        CHECK_EQ(f->n, 16);
        const struct mb_tensor_info *a = mb_st_file_find(f, "a"), *at = mb_st_file_find(f, "at"), *b = mb_st_file_find(f, "b"), *e = mb_st_file_find(f, "e"),
                                    *zt = mb_st_file_find(f, "z"), *s = mb_st_file_find(f, "s"), *w = mb_st_file_find(f, "w"), *p = mb_st_file_find(f, "p");
        CHECK(a && at && b && e && zt && s && w && p);
        if (!(a && at && b && e && zt && s && w && p)) { mb_st_close(f); continue; }
        CHECK(a->dtype == MB_F32 && a->ndim == 2 && a->numel == 12 && a->nbytes == 48 && !memcmp(a->data, s0, 48));
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 3; j++) CHECK_EQ(f32_at(at, i * 3 + j), s0[j * 4 + i]);
        for (int i = 0; i < 8; i++) CHECK_EQ(f32_at(b, i), 4 + i);
        for (int i = 0; i < 12; i++) CHECK_EQ(f32_at(e, i), i % 4);
        CHECK(zt->numel == 0 && zt->nbytes == 0 && zt->ndim == 2);
        CHECK(s->ndim == 0 && s->numel == 1 && f32_at(s, 0) == 7);
        CHECK(p->numel == 3 && f32_at(p, 0) == 8 && f32_at(p, 2) == 10);
        CHECK(w->dtype == MB_BF16 && w->numel == 6);
        float wf[6];
        CHECK_EQ(mb_tensor_to_f32(w, wf), 0);
        for (int i = 0; i < 6; i++) CHECK_EQ(wf[i], (float)i - 2.5f);
        static const enum mb_dtype dts[] = {MB_F64, MB_F16, MB_I64, MB_I32, MB_I16, MB_I8, MB_U8, MB_BOOL};
        static const float first[] = {1.5f, 1.0f, (float)INT64_MIN, (float)INT32_MIN, -32768, -128, 0, 1};
        for (int i = 0; i < 8; i++) {
            char nm[16];
            snprintf(nm, sizeof nm, "d%d", i);
            const struct mb_tensor_info *t = mb_st_file_find(f, nm);
            CHECK(t && t->dtype == dts[i] && t->numel == 3);
            float v[3];
            if (t && !mb_tensor_to_f32(t, v)) CHECK_MSG(v[0] == first[i], "%s: %g", nm, v[0]);
        }
        /* views where possible: "a" and "b" share storage 0; misaligned data (variant 2) is copied */
        int in_map_a = (const uint8_t *)a->data >= (const uint8_t *)f->map && (const uint8_t *)a->data < (const uint8_t *)f->map + f->map_size;
        if (variant == 0 || variant == 3) {
            CHECK(in_map_a);
            CHECK((const uint8_t *)b->data == (const uint8_t *)a->data + 16);
            CHECK_EQ(f->n_owned, 2); /* "at" and "e" */
        }
        if (variant == 1) CHECK(!in_map_a && (const uint8_t *)b->data == (const uint8_t *)a->data + 16); /* inflated, still shared */
        if (variant == 2) CHECK(!in_map_a);
        mb_st_close(f);
        /* and the CLI reads it */
        char cmd[1400], err[4096];
        snprintf(cmd, sizeof cmd, "%s inspect %s", mixbit(), path);
        CHECK_MSG(run(cmd, NULL, 0, err, sizeof err) == 0, "variant %d: %s", variant, err);
    }
}

/* many storages (the storage table grows past its first size), each tensor the transpose of its own */
static void test_many_storages(void) {
    enum { N = 300 };
    static char keys[N][16], names[N][40];
    static float data[N][6];
    struct buf pk = {0}, z = {0};
    struct zm *m = calloc(N + 1, sizeof *m);
    pk_begin(&pk);
    b_u8(&pk, '}');
    b_u8(&pk, '(');
    const int64_t sh[] = {3, 2}, st[] = {1, 3};
    for (int i = 0; i < N; i++) {
        snprintf(keys[i], sizeof keys[i], "%d", i);
        snprintf(names[i], sizeof names[i], "archive/data/%d", i);
        for (int k = 0; k < 6; k++) data[i][k] = (float)(i * 10 + k);
        char nm[32];
        snprintf(nm, sizeof nm, "layer.%d", i);
        pk_str(&pk, nm);
        pk_tensor(&pk, "FloatStorage", keys[i], 6, 0, 2, sh, st);
        m[i + 1] = (struct zm){names[i], data[i], sizeof data[i], 0};
    }
    b_u8(&pk, 'u');
    b_u8(&pk, '.');
    m[0] = (struct zm){"archive/data.pkl", pk.p, pk.n, 0};
    struct zopt o = {.align = 1};
    struct zinfo *zi = malloc(sizeof *zi);
    zip_build(&z, m, N + 1, &o, zi);
    char path[600];
    snprintf(path, sizeof path, "%s/many.bin", tmpdir);
    write_bytes(path, z.p, z.n);
    struct mb_st_file *f = NULL;
    CHECK_MSG(mb_torch_open(path, &f) == 0, "%s", mb_errmsg());
    if (f) {
        CHECK_EQ(f->n, N);
        int bad = 0;
        for (int i = 0; i < N && i < f->n; i++) /* t[r][c] = storage[c * 3 + r] */
            for (int r = 0; r < 3; r++)
                for (int c = 0; c < 2; c++) bad += f32_at(&f->t[i], r * 2 + c) != data[i][c * 3 + r];
        CHECK_EQ(bad, 0);
        CHECK_EQ(f->n_owned, N);
    }
    mb_st_close(f);
    free(zi);
    free(m);
    b_free(&pk);
    b_free(&z);
}

/* ------------------------------------------------------------------------------------------------ */
/* malformed archives and pickles                                                                   */

/* an archive with one pickle and storage "0" (12 floats) */
static void archive_with(const struct buf *pk, struct buf *zip, struct zinfo *zi) {
    struct zm m[] = {{"archive/data.pkl", pk->p, pk->n, 0}, {"archive/data/0", s0, sizeof s0, 0}, {"archive/version", "3\n", 2, 0}};
    struct zopt o = {.align = 1};
    zip_build(zip, m, 3, &o, zi);
}

/* a state dict {"x": tensor} with the given tensor geometry */
static void pickle_one(struct buf *pk, const char *cls, const char *key, int64_t numel, int64_t off, int nd, const int64_t *shape, const int64_t *stride) {
    pk->n = 0;
    pk_begin(pk);
    b_u8(pk, '}');
    pk_str(pk, "x");
    pk_tensor(pk, cls, key, numel, off, nd, shape, stride);
    b_u8(pk, 's');
    b_u8(pk, '.');
}

/* A pickle with one refused or broken construct; `raw` is appended after PROTO 2 */
static void pickle_raw(struct buf *pk, const void *raw, size_t n) {
    pk->n = 0;
    pk_begin(pk);
    b_put(pk, raw, n);
}

static int nbad; /* malformed cases checked */

/* write case i's bytes and check the library and the CLI refuse them */
static void check_bad(const char *what, const char *expect, const void *bytes, size_t n) {
    char path[600], cmd[1400], err[4096];
    snprintf(path, sizeof path, "%s/bad%03d.bin", tmpdir, nbad++);
    write_bytes(path, bytes, n);
    struct mb_st_file *f = NULL;
    int rc = mb_torch_open(path, &f);
    CHECK_MSG(rc == MB_EFORMAT || rc == MB_EUNSUPPORTED, "%s: rc %d (%s)", what, rc, mb_errmsg());
    CHECK_MSG(f == NULL, "%s", what);
    CHECK_MSG(strstr(mb_errmsg(), path) != NULL, "%s: message does not name the file: %s", what, mb_errmsg());
    CHECK_MSG(strstr(mb_errmsg(), expect) != NULL, "%s: message lacks \"%s\": %s", what, expect, mb_errmsg());
    mb_st_close(f);
    snprintf(cmd, sizeof cmd, "%s inspect %s", mixbit(), path);
    int ec = run(cmd, NULL, 0, err, sizeof err);
    CHECK_MSG(ec == 1, "%s: exit %d: %s", what, ec, err);
    CHECK_MSG(one_line(err) && strstr(err, path), "%s: %s", what, err);
}

static void test_malformed_zip(void) {
    struct buf pk = {0}, z = {0};
    struct zinfo zi;
    const int64_t sh[] = {3, 4}, st[] = {4, 1};
    pickle_one(&pk, "FloatStorage", "0", 12, 0, 2, sh, st);
    archive_with(&pk, &z, &zi);
    { /* the base archive is good */
        char path[600];
        snprintf(path, sizeof path, "%s/base.bin", tmpdir);
        write_bytes(path, z.p, z.n);
        struct mb_st_file *f = NULL;
        CHECK_MSG(mb_torch_open(path, &f) == 0, "%s", mb_errmsg());
        mb_st_close(f);
    }
    uint8_t *c = malloc(z.n + 256);
#define MUTATE(what, expect, code)          \
    do {                                    \
        memcpy(c, z.p, z.n);                \
        size_t cn = z.n;                    \
        code;                               \
        check_bad(what, expect, c, cn);     \
    } while (0)
    MUTATE("truncated to half", "truncated", cn = z.n / 2);
    MUTATE("last byte cut", "truncated", cn = z.n - 1);
    MUTATE("end record cut", "truncated", cn = zi.eocd);
    MUTATE("4 bytes", "truncated", cn = 4);
    MUTATE("empty zip", "empty zip", memcpy(c, "PK\5\6", 4); cn = 22; memset(c + 4, 0, 18));
    MUTATE("not a zip", "not a PyTorch checkpoint", memcpy(c, "GIF89a", 6));
    MUTATE("bare pickle", "bare pickle", memcpy(c, pk.p, pk.n); cn = pk.n);
    static const uint8_t lm[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19}; /* torch < 1.6 */
    MUTATE("legacy magic", "legacy PyTorch format", memcpy(c, lm, sizeof lm));
    MUTATE("central directory offset beyond the file", "central directory", wr32(c + zi.eocd + 16, (uint32_t)z.n + 100));
    MUTATE("central directory size beyond the file", "central directory", wr32(c + zi.eocd + 12, (uint32_t)z.n));
    MUTATE("entry count too large", "cannot fit", wr16(c + zi.eocd + 8, 4000); wr16(c + zi.eocd + 10, 4000));
    MUTATE("central entry signature", "bad signature", c[zi.cde[1]] = 'X');
    MUTATE("local header offset beyond the file", "local header offset", wr32(c + zi.cde[1] + 42, 0x7fffffff));
    MUTATE("local header offset at the wrong place", "local header offset", wr32(c + zi.cde[1] + 42, (uint32_t)zi.lho[1] + 1));
    MUTATE("member size beyond the file", "runs past", wr32(c + zi.cde[1] + 20, 0x10000000); wr32(c + zi.cde[1] + 24, 0x10000000));
    MUTATE("stored sizes differ", "sizes differ", wr32(c + zi.cde[1] + 24, 40));
    MUTATE("local name differs", "different file", c[zi.lho[1] + 30 + 8] ^= 1);
    MUTATE("encrypted", "encrypted", c[zi.cde[1] + 8] |= 1);
    MUTATE("compression method 12", "compression method 12", wr16(c + zi.cde[1] + 10, 12));
    MUTATE("crc mismatch", "CRC-32", c[zi.data[1] + 5] ^= 0x10);
    MUTATE("pickle crc mismatch", "CRC-32", c[zi.data[0] + 3] ^= 0x01);
    MUTATE("name with ..", "unsafe", memcpy(c + zi.cde[2] + 46, "../", 3); memcpy(c + zi.lho[2] + 30, "../", 3));
    MUTATE("absolute name", "unsafe", c[zi.cde[2] + 46] = '/'; c[zi.lho[2] + 30] = '/');
    MUTATE("name with a control byte", "unsafe", c[zi.cde[2] + 47] = '\n'; c[zi.lho[2] + 31] = '\n');
    MUTATE("extra field runs past its entry", "extra field", wr16(c + zi.cde[0] + 30, 4));
    MUTATE("bytes after the central directory entries", "unexplained", wr16(c + zi.eocd + 8, 2); wr16(c + zi.eocd + 10, 2));
    MUTATE("zip64 locator out of range", "zip64",
           memmove(c + zi.eocd + 20, c + zi.eocd, 22); wr32(c + zi.eocd, 0x07064b50); wr32(c + zi.eocd + 4, 0);
           for (int i = 0; i < 8; i++) c[zi.eocd + 8 + i] = 0xee; wr32(c + zi.eocd + 16, 1); cn = z.n + 20);
    free(c);
    b_free(&z);

    /* members: missing data, a storage of the wrong size, duplicates, no pickle, big-endian, deflate faults */
    {
        struct zm m[] = {{"archive/data.pkl", pk.p, pk.n, 0}, {"archive/version", "3\n", 2, 0}};
        struct zopt o = {.align = 1};
        zip_build(&z, m, 2, &o, &zi);
        check_bad("missing storage member", "archive/data/0 is missing", z.p, z.n);
        struct zm m2[] = {{"archive/data.pkl", pk.p, pk.n, 0}, {"archive/data/0", s0, 44, 0}};
        zip_build(&z, m2, 2, &o, &zi);
        check_bad("storage member too short", "holds 44", z.p, z.n);
        struct zm m3[] = {{"archive/data.pkl", pk.p, pk.n, 0}, {"archive/data/0", s0, 48, 0}, {"archive/data/0", s0, 48, 0}};
        zip_build(&z, m3, 3, &o, &zi);
        check_bad("duplicate member", "appears twice", z.p, z.n);
        struct zm m4[] = {{"archive/data/0", s0, 48, 0}};
        zip_build(&z, m4, 1, &o, &zi);
        check_bad("no pickle", "data.pkl", z.p, z.n);
        struct zm m5[] = {{"archive/data.pkl", pk.p, pk.n, 0}, {"archive/data/0", s0, 48, 0}, {"archive/byteorder", "big", 3, 0}};
        zip_build(&z, m5, 3, &o, &zi);
        check_bad("big-endian", "little-endian", z.p, z.n);
        struct zm m6[] = {{"archive/data.pkl", pk.p, pk.n, 1}, {"archive/data/0", s0, 48, 0}};
        zip_build(&z, m6, 2, &o, &zi);
        uint8_t *d = malloc(z.n);
        memcpy(d, z.p, z.n);
        wr32(d + zi.cde[0] + 24, 0x7fffffff); /* inflate bomb: 2 GB claimed from a few bytes */
        check_bad("deflate size claim", "cannot inflate", d, z.n);
        memcpy(d, z.p, z.n);
        wr32(d + zi.cde[0] + 24, (uint32_t)pk.n + 10); /* more declared than the stream holds */
        check_bad("deflate shorter than declared", "fewer bytes", d, z.n);
        memcpy(d, z.p, z.n);
        wr32(d + zi.cde[0] + 24, (uint32_t)pk.n - 10); /* less declared than the stream holds */
        check_bad("deflate longer than declared", "more bytes", d, z.n);
        memcpy(d, z.p, z.n);
        memset(d + zi.data[0], 0xff, 4); /* not a deflate stream */
        check_bad("corrupt deflate", "deflate", d, z.n);
        free(d);
        struct zm m7[] = {{"archive/data.pkl", pk.p, pk.n, 0}, {"other/data.pkl", pk.p, pk.n, 0}, {"archive/data/0", s0, 48, 0}};
        zip_build(&z, m7, 3, &o, &zi);
        check_bad("two pickles", "two pickles", z.p, z.n);
        b_free(&z);
    }
    b_free(&pk);
}

static void test_malformed_pickle(void) {
    struct buf pk = {0}, z = {0};
    struct zinfo zi;
    char what[96];
#define BADPK(what_, expect, ...)                                            \
    do {                                                                     \
        static const uint8_t raw_[] = {__VA_ARGS__};                         \
        pickle_raw(&pk, raw_, sizeof raw_);                                  \
        archive_with(&pk, &z, &zi);                                          \
        check_bad(what_, expect, z.p, z.n);                                  \
    } while (0)
    BADPK("unknown opcode 0xff", "opcode 0xff", 0xff);
    BADPK("INST opcode", "opcode 'i'", 'i', 'o', 's', '\n', 's', 'y', 's', 't', 'e', 'm', '\n');
    BADPK("OBJ opcode", "opcode 'o'", '(', 'o');
    BADPK("NEWOBJ opcode", "opcode 0x81", 0x81);
    BADPK("EXT1 opcode", "opcode 0x82", 0x82, 1);
    BADPK("text PERSID", "opcode 'P'", 'P', '0', '\n');
    BADPK("stack underflow", "stack underflow", 'R');
    BADPK("STOP with two values", "STOP with 2 values", 'N', 'N', '.');
    BADPK("STOP with an empty stack", "STOP with 0 values", '.');
    BADPK("STOP inside a MARK", "open MARK", '}', '(', '.');
    BADPK("no STOP", "truncated pickle", '}');
    BADPK("truncated string", "truncated", 'X', 100, 0, 0, 0, 'a');
    BADPK("memo get never stored", "never stored", 'h', 5);
    BADPK("huge memo index", "out of range", ']', 'r', 0xf0, 0xff, 0xff, 0x0f);
    BADPK("LONG1 of 9 bytes", "64 bits", 0x8a, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9);
    BADPK("protocol 6", "protocol 6", 0x80, 6);
    BADPK("top-level list", "not a state dict", ']', '.');
    BADPK("value not a tensor", "not a tensor", '}', 'X', 1, 0, 0, 0, 'k', 'K', 1, 's', '.');
    BADPK("key not a string", "not a name", '}', 'K', 1, 'K', 2, 's', '.');
    BADPK("SETITEM on a list", "not a dict", ']', 'K', 1, 'K', 2, 's', '.');
    BADPK("APPEND to a dict", "not a list", '}', 'K', 1, 'a', '.');
    BADPK("odd SETITEMS", "odd number", '}', '(', 'K', 1, 'u', '.');
    BADPK("closing a MARK that is not open", "no MARK", 't');
    BADPK("BUILD on a list", "BUILD", ']', '}', 'b', '.');
    BADPK("REDUCE on a non-callable", "REDUCE on a int", 'K', 1, ')', 'R', '.');
    BADPK("calling a storage class", "cannot be called", 'c', 't', 'o', 'r', 'c', 'h', '\n', 'F', 'l', 'o', 'a', 't', 'S', 't', 'o', 'r', 'a', 'g', 'e', '\n', ')', 'R', '.');
    BADPK("OrderedDict with arguments", "OrderedDict called with arguments", 'c', 'c', 'o', 'l', 'l', 'e', 'c', 't', 'i', 'o', 'n', 's', '\n', 'O', 'r', 'd', 'e', 'r', 'e', 'd', 'D', 'i', 'c', 't', '\n', 'K', 1, 0x85, 'R', '.');
    BADPK("GLOBAL without newlines", "GLOBAL without", 'c', 'o', 's');
    BADPK("persistent id not a storage tuple", "persistent id", 'K', 1, 'Q', '.');
    { /* deep nesting: MARKs, then containers */
        uint8_t raw[300];
        int n = 0;
        for (int i = 0; i < 80; i++) raw[n++] = '(';
        pickle_raw(&pk, raw, (size_t)n);
        archive_with(&pk, &z, &zi);
        check_bad("80 nested MARKs", "deeper than 64", z.p, z.n);
        n = 0;
        raw[n++] = ']';
        for (int i = 0; i < 80; i++) raw[n++] = 0x85; /* TUPLE1 around the previous value */
        raw[n++] = '.';
        pickle_raw(&pk, raw, (size_t)n);
        archive_with(&pk, &z, &zi);
        check_bad("80 nested tuples", "deeper than 64", z.p, z.n);
    }
    { /* a stack of a million and more references to one value (no new values: the stack bound stops it) */
        struct buf r = {0};
        b_u8(&r, ']');
        b_u8(&r, 'q');
        b_u8(&r, 0);
        for (int i = 0; i < (1 << 20) + 8; i++) { b_u8(&r, 'h'); b_u8(&r, 0); }
        pickle_raw(&pk, r.p, r.n);
        b_free(&r);
        archive_with(&pk, &z, &zi);
        check_bad("stack of 2^20 entries", "stack deeper than", z.p, z.n);
    }
    /* refused globals: named by module and name, whether called or not, GLOBAL or STACK_GLOBAL */
    static const char *const refused[][2] = {{"os", "system"}, {"builtins", "getattr"}, {"__builtin__", "exec"}, {"subprocess", "Popen"},
                                             {"torch", "load"}, {"torch._utils", "_rebuild_qtensor"}, {"numpy.core.multiarray", "_reconstruct"},
                                             {"collections", "defaultdict"}, {"torch.nn.modules.linear", "Linear"}};
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++) {
        for (int sg = 0; sg < 2; sg++) {
            char full[160];
            snprintf(full, sizeof full, "refusing to import %s.%s", refused[i][0], refused[i][1]);
            pk.n = 0;
            proto4 = sg;
            pk_begin(&pk);
            b_u8(&pk, '}');
            pk_str(&pk, "x");
            pk_global(&pk, refused[i][0], refused[i][1]);
            b_u8(&pk, 's');
            b_u8(&pk, '.');
            proto4 = 0;
            archive_with(&pk, &z, &zi);
            snprintf(what, sizeof what, "global %s.%s%s", refused[i][0], refused[i][1], sg ? " (STACK_GLOBAL)" : "");
            check_bad(what, full, z.p, z.n);
        }
    }
    pk.n = 0;
    pk_begin(&pk);
    b_u8(&pk, '}');
    pk_str(&pk, "x");
    pk_tensor(&pk, "ComplexFloatStorage", "0", 6, 0, 0, NULL, NULL);
    b_u8(&pk, 's');
    b_u8(&pk, '.');
    archive_with(&pk, &z, &zi);
    check_bad("complex storage", "torch.ComplexFloatStorage is not supported", z.p, z.n);

    /* tensor geometry against the storage (12 floats) */
    const int64_t sh34[] = {3, 4}, st34[] = {4, 1}, sh9[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1}, neg[] = {-1, 4}, big[] = {3, 5}, st_big[] = {5, 1}, st_far[] = {4, 100},
                  huge[] = {INT64_MAX / 2, 4}, hst[] = {INT64_MAX / 4, 1};
    pickle_one(&pk, "FloatStorage", "0", 12, 1, 2, sh34, st34);
    archive_with(&pk, &z, &zi);
    check_bad("offset pushes past the storage", "reach element 12", z.p, z.n);
    pickle_one(&pk, "FloatStorage", "0", 12, 0, 2, big, st_big);
    archive_with(&pk, &z, &zi);
    check_bad("shape larger than the storage", "reach element 14", z.p, z.n);
    pickle_one(&pk, "FloatStorage", "0", 12, 0, 2, sh34, st_far);
    archive_with(&pk, &z, &zi);
    check_bad("stride past the storage", "storage 0 holds 12", z.p, z.n);
    pickle_one(&pk, "FloatStorage", "0", 12, 0, 2, huge, hst);
    archive_with(&pk, &z, &zi);
    check_bad("element count overflow", "overflow", z.p, z.n);
    const int64_t sh4[] = {4}, st_max[] = {INT64_MAX};
    pickle_one(&pk, "FloatStorage", "0", 12, 0, 1, sh4, st_max);
    archive_with(&pk, &z, &zi);
    check_bad("stride overflow", "strides overflow", z.p, z.n);
    pickle_one(&pk, "FloatStorage", "0", 12, 0, 2, neg, st34);
    archive_with(&pk, &z, &zi);
    check_bad("negative size", "non-negative", z.p, z.n);
    pickle_one(&pk, "FloatStorage", "0", 12, -4, 2, sh34, st34);
    archive_with(&pk, &z, &zi);
    check_bad("negative offset", "storage offset", z.p, z.n);
    pickle_one(&pk, "FloatStorage", "0", 12, 0, 9, sh9, sh9);
    archive_with(&pk, &z, &zi);
    check_bad("rank 9", "rank 9", z.p, z.n);
    pickle_one(&pk, "FloatStorage", "0", 13, 0, 2, sh34, st34);
    archive_with(&pk, &z, &zi);
    check_bad("numel disagrees with the member", "13 elements", z.p, z.n);
    pickle_one(&pk, "DoubleStorage", "0", 12, 0, 2, sh34, st34);
    archive_with(&pk, &z, &zi);
    check_bad("dtype disagrees with the member", "need 96 bytes", z.p, z.n);
    pickle_one(&pk, "FloatStorage", "../0", 12, 0, 2, sh34, st34);
    archive_with(&pk, &z, &zi);
    check_bad("storage key with a path", "not a plain name", z.p, z.n);
    /* names: duplicates and invalid UTF-8 */
    pk.n = 0;
    pk_begin(&pk);
    b_u8(&pk, '}');
    b_u8(&pk, '(');
    pk_str(&pk, "x");
    pk_tensor(&pk, "FloatStorage", "0", 12, 0, 2, sh34, st34);
    pk_str(&pk, "x");
    pk_tensor(&pk, "FloatStorage", "0", 12, 0, 2, sh34, st34);
    b_u8(&pk, 'u');
    b_u8(&pk, '.');
    archive_with(&pk, &z, &zi);
    check_bad("duplicate tensor name", "appears twice", z.p, z.n);
    pk.n = 0;
    pk_begin(&pk);
    b_u8(&pk, '}');
    pk_str(&pk, "x\xc0\xaf");
    pk_tensor(&pk, "FloatStorage", "0", 12, 0, 2, sh34, st34);
    b_u8(&pk, 's');
    b_u8(&pk, '.');
    archive_with(&pk, &z, &zi);
    check_bad("overlong UTF-8 name", "not UTF-8", z.p, z.n);
    /* the same storage described twice differently; non-empty hooks; tensor metadata */
    pk.n = 0;
    pk_begin(&pk);
    b_u8(&pk, '}');
    b_u8(&pk, '(');
    pk_str(&pk, "x");
    pk_tensor(&pk, "FloatStorage", "0", 12, 0, 2, sh34, st34);
    pk_str(&pk, "y");
    pk_tensor(&pk, "IntStorage", "0", 12, 0, 2, sh34, st34);
    b_u8(&pk, 'u');
    b_u8(&pk, '.');
    archive_with(&pk, &z, &zi);
    check_bad("storage with two types", "described twice", z.p, z.n);
    pk.n = 0;
    pk_begin(&pk);
    b_u8(&pk, '}');
    pk_str(&pk, "x");
    pk_global(&pk, "torch._utils", "_rebuild_tensor_v2");
    b_u8(&pk, '(');
    pk_storage(&pk, "FloatStorage", "0", 12);
    pk_int(&pk, 0);
    pk_ints(&pk, 2, sh34);
    pk_ints(&pk, 2, st34);
    b_u8(&pk, 0x89);
    b_u8(&pk, '}'); pk_str(&pk, "hook"); b_u8(&pk, 'N'); b_u8(&pk, 's'); /* hooks: {'hook': None} */
    b_u8(&pk, 't');
    b_u8(&pk, 'R');
    b_u8(&pk, 's');
    b_u8(&pk, '.');
    archive_with(&pk, &z, &zi);
    check_bad("backward hooks", "backward hooks", z.p, z.n);
    b_free(&pk);
    b_free(&z);
    CHECK(nbad >= 60);
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/mb_test_torchbin_XXXXXX");
    if (!mkdtemp(tmpdir)) { perror("mkdtemp"); return 1; }
    RUN(test_fixture_plain);
    RUN(test_fixture_bf16_sharded);
    RUN(test_fixture_tied);
    RUN(test_fixture_legacy);
    RUN(test_fixture_malicious);
    RUN(test_synthetic_good);
    RUN(test_many_storages);
    RUN(test_malformed_zip);
    RUN(test_malformed_pickle);
    RUN(test_bin_index);
    RUN(test_convert_weights);
    RUN(test_model_commands);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd)) {}
    TEST_MAIN_END();
}
