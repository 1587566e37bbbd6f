/* tests/test_card.c: the published repository. SHA-256 of the manifest against published vectors and
 * sha256sum; a real conversion of kjv-mixtral through the CLI, then its model card (front matter parsed as
 * YAML, no local path, results and the source card), its chart (XML-escaped, rasterized with rsvg-convert on
 * a light and a dark background), and `mixbit verify`: it passes, and fails with exit 1 and a message
 * after each of: a flipped byte, a deleted tensor, a truncated file, an edited config.json, an extra or
 * missing file, a broken EXL2 layer (permutation, group table, non-finite scale), a hostile manifest.
 *
 * Under AddressSanitizer (MB_ASAN set by `make asan`) the conversion is of stories260K-moe4 instead (the
 * same code paths, an MoE too, in a quarter of the time); `make test` converts kjv-mixtral. MB_CARD_REUSE=DIR copies
 * a finished conversion instead (for iterating on this test only). */
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <jansson.h>

#include "../convert/convert.h"
#include "../formats/formats.h"
#include "harness.h"

static char tmpdir[256];
static char outdir[512]; /* the converted model */
static int converted;    /* 1 when outdir holds a finished conversion */
static const char *model_name = "kjv-mixtral";
static const char *target_bpw = "3.5"; /* the conversion's --bpw, as the card writes it */

static const char *mixbit(void) {
    const char *m = getenv("MIXBIT");
    return m ? m : "./mixbit";
}

/* run a command through sh; stdout and stderr captured (either may be NULL); returns the exit code */
static int run(const char *cmd, char *out, size_t outsz, char *err, size_t errsz) {
    char full[8192], of[300], ef[300];
    snprintf(of, sizeof of, "%s/stdout.txt", tmpdir);
    snprintf(ef, sizeof ef, "%s/stderr.txt", tmpdir);
    snprintf(full, sizeof full, "%s >%s 2>%s", cmd, of, ef);
    int st = system(full);
    char *bufs[2] = {out, err};
    size_t sz[2] = {outsz, errsz};
    const char *fs[2] = {of, ef};
    for (int i = 0; i < 2; i++) {
        if (!bufs[i]) continue;
        bufs[i][0] = 0;
        FILE *f = fopen(fs[i], "r");
        if (f) { size_t n = fread(bufs[i], 1, sz[i] - 1, f); bufs[i][n] = 0; fclose(f); }
    }
    if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 255;
}

static int have_cmd(const char *cmd) {
    char c[512];
    snprintf(c, sizeof c, "command -v %s >/dev/null 2>&1", cmd);
    return system(c) == 0;
}

static int have_pyyaml(void) { return system("python3 -c 'import yaml' >/dev/null 2>&1") == 0; }

static char *slurp(const char *dir, const char *name) {
    char p[1024], *t = NULL;
    size_t n;
    snprintf(p, sizeof p, "%s/%s", dir, name);
    if (mb_read_file(p, &t, &n, 0)) return NULL;
    return t;
}

static void put(const char *dir, const char *name, const char *data, size_t n) {
    char p[1024];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "wb");
    if (!f) { CHECK_MSG(0, "cannot write %s", p); return; }
    if (n) fwrite(data, 1, n, f);
    fclose(f);
}

/* ---------------------------------------------------------------------------------------------- */
/* manifest: SHA-256 against published vectors (FIPS 180-2 examples) and against sha256sum              */

static const char *manifest_sha(json_t *m, const char *path, int64_t *bytes) {
    json_t *a = json_object_get(m, "files");
    for (size_t i = 0; i < json_array_size(a); i++) {
        json_t *o = json_array_get(a, i);
        if (!strcmp(json_string_value(json_object_get(o, "path")), path)) {
            if (bytes) *bytes = json_integer_value(json_object_get(o, "bytes"));
            return json_string_value(json_object_get(o, "sha256"));
        }
    }
    return NULL;
}

static void test_manifest_vectors(void) {
    char dir[512], p[700], out[4096], err[4096];
    snprintf(dir, sizeof dir, "%s/vectors", tmpdir);
    snprintf(p, sizeof p, "%s/sub", dir);
    CHECK_EQ(mb_mkdir_p(p), 0);
    put(dir, "empty", "", 0);
    put(dir, "abc", "abc", 3);
    const char *two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    put(dir, "two-blocks", two, strlen(two));
    char *mil = malloc(1000000);
    memset(mil, 'a', 1000000);
    put(dir, "million-a", mil, 1000000);
    free(mil);
    /* 9 MiB + 7 bytes of pseudo-random data: several 4 MiB reads and a partial one */
    size_t nr = (9u << 20) + 7;
    unsigned char *rnd = malloc(nr);
    struct mb_rng rng = {42};
    for (size_t i = 0; i < nr; i++) rnd[i] = (unsigned char)(mb_rng_next(&rng) >> 56);
    put(p, "random.bin", (const char *)rnd, nr);
    free(rnd);
    put(dir, ".gitattributes", "*.safetensors filter=lfs\n", 25); /* names starting with '.' are not listed */
    CHECK_MSG(mb_manifest_write(dir) == 0, "%s", mb_errmsg());
    char mp[700];
    snprintf(mp, sizeof mp, "%s/%s", dir, MB_MANIFEST_NAME);
    json_error_t je;
    json_t *m = json_load_file(mp, 0, &je);
    CHECK_MSG(m != NULL, "%s: %s", mp, je.text);
    if (!m) return;
    json_t *a = json_object_get(m, "files");
    CHECK_EQ(json_array_size(a), 5);
    const char *order[] = {"abc", "empty", "million-a", "sub/random.bin", "two-blocks"};
    for (size_t i = 0; i < 5 && i < json_array_size(a); i++) CHECK_STR(json_string_value(json_object_get(json_array_get(a, i), "path")), order[i]);
    int64_t bytes = -1;
    CHECK_STR(manifest_sha(m, "empty", &bytes), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    CHECK_EQ(bytes, 0);
    CHECK_STR(manifest_sha(m, "abc", &bytes), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    CHECK_EQ(bytes, 3);
    CHECK_STR(manifest_sha(m, "two-blocks", NULL), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    CHECK_STR(manifest_sha(m, "million-a", &bytes), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    CHECK_EQ(bytes, 1000000);
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "sha256sum %s/sub/random.bin", dir);
    if (have_cmd("sha256sum") && run(cmd, out, sizeof out, err, sizeof err) == 0) {
        out[64] = 0;
        CHECK_STR(manifest_sha(m, "sub/random.bin", &bytes), out);
        CHECK_EQ(bytes, (int64_t)nr);
    } else {
        fprintf(stderr, "  (sha256sum not found: the multi-chunk file is checked against the vectors only)\n");
    }
    json_decref(m);
    /* refresh: one entry re-hashed, the others kept */
    put(dir, "abc", "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", 56);
    const char *names[] = {"abc"};
    CHECK_MSG(mb_manifest_refresh(dir, names, 1) == 0, "%s", mb_errmsg());
    m = json_load_file(mp, 0, &je);
    CHECK(m != NULL);
    if (m) {
        CHECK_STR(manifest_sha(m, "abc", &bytes), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
        CHECK_EQ(bytes, 56);
        CHECK_STR(manifest_sha(m, "empty", NULL), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        CHECK_EQ(json_array_size(json_object_get(m, "files")), 5);
        json_decref(m);
    }
    /* a directory that is not a model: the files match, the model check says why it fails */
    CHECK(mb_verify(dir) != 0);
    CHECK_MSG(strstr(mb_errmsg(), "config.json") != NULL, "%s", mb_errmsg());
}

/* ---------------------------------------------------------------------------------------------- */
/* the conversion every later test uses                                                            */

static void test_convert(void) {
    char cmd[4096], err[16384], src[512];
    const char *cal = "calib-kjv-jargon.txt", *ev = "kjv-eval.txt";
    /* under ASan the small MoE model; its 172-input layers stay F16, so its reachable range starts at 6.7 bpw */
    if (getenv("MB_ASAN")) { model_name = "stories260K-moe4"; cal = ev = "tinystories-sample.txt"; target_bpw = "7.0"; }
    snprintf(src, sizeof src, "%s/models/%s", th_shared(), model_name);
    snprintf(outdir, sizeof outdir, "%s/%s-%sbpw", tmpdir, model_name, target_bpw);
    snprintf(cmd, sizeof cmd,
             "%s convert %s %s --bpw %s --cal %s/text/%s --eval %s/text/%s --rows 12 --measure-rows 6 --length 128 --eval-ctx 128 -q",
             mixbit(), src, outdir, target_bpw, th_shared(), cal, th_shared(), ev);
    const char *reuse = getenv("MB_CARD_REUSE"); /* for iterating on this test: a finished conversion to copy */
    if (reuse) snprintf(cmd, sizeof cmd, "cp -r %s %s && rm -f %s/README.md %s/mixbit-bits.svg %s/" MB_MANIFEST_NAME, reuse, outdir, outdir, outdir, outdir);
    double t0 = mb_now();
    int ec = run(cmd, NULL, 0, err, sizeof err);
    CHECK_MSG(ec == 0, "convert %s: exit %d: %s", model_name, ec, err);
    converted = ec == 0;
    fprintf(stderr, "  converted %s in %.0f s\n", model_name, mb_now() - t0);
}

#define NEED_CONVERSION() \
    do { if (!converted) SKIP("the conversion in test_convert failed"); } while (0)

/* ---------------------------------------------------------------------------------------------- */
/* the card                                                                                        */

/* front matter, structurally: "---" first, then `key: value` or `key:` + "- item" lines, then "---" */
static int front_matter_ok(const char *t, char *why, size_t n) {
    if (strncmp(t, "---\n", 4)) { snprintf(why, n, "does not start with ---"); return 0; }
    const char *line = t + 4;
    int in_list = 0, keys = 0;
    while (*line) {
        size_t ll = strcspn(line, "\n");
        if (ll == 3 && !strncmp(line, "---", 3)) return keys > 0 ? 1 : (snprintf(why, n, "empty front matter"), 0);
        if (in_list && ll > 2 && !strncmp(line, "- ", 2)) { line += ll + 1; continue; }
        size_t k = 0;
        while (k < ll && (line[k] == '_' || (line[k] >= 'a' && line[k] <= 'z'))) k++;
        if (k == 0 || k >= ll || line[k] != ':' || (k + 1 < ll && line[k + 1] != ' ') || (k + 2 >= ll && k + 1 != ll)) {
            snprintf(why, n, "line \"%.*s\" is not key: value", (int)ll, line);
            return 0;
        }
        in_list = k + 1 == ll;
        keys++;
        if (!line[ll]) break;
        line += ll + 1;
    }
    snprintf(why, n, "front matter not closed by ---");
    return 0;
}

/* the front matter parsed by PyYAML, printed back as JSON (NULL when python3 with yaml is absent) */
static json_t *yaml_front_matter(const char *dir) {
    if (!have_pyyaml()) return NULL;
    char cmd[1024], out[8192], err[4096];
    snprintf(cmd, sizeof cmd,
             "python3 -c 'import sys, yaml, json; t = open(sys.argv[1], encoding=\"utf-8\").read(); "
             "assert t.startswith(\"---\\n\"); fm = t[4:t.index(\"\\n---\\n\")]; d = yaml.safe_load(fm); "
             "assert isinstance(d, dict); print(json.dumps(d))' %s/README.md",
             dir);
    int ec = run(cmd, out, sizeof out, err, sizeof err);
    CHECK_MSG(ec == 0, "PyYAML could not parse the front matter: %s", err);
    if (ec) return json_object();
    json_error_t je;
    json_t *j = json_loads(out, 0, &je);
    CHECK_MSG(j != NULL, "%s", out);
    return j ? j : json_object();
}

static void no_local_path(const char *what, const char *t) {
    const char *bad[] = {"/work", "/tmp", "/home", "/root", "shared/", tmpdir};
    for (int i = 0; i < 6; i++) CHECK_MSG(!strstr(t, bad[i]), "%s names a local path (%s)", what, bad[i]);
}

static void test_card_from_cli(void) {
    NEED_CONVERSION();
    char cmd[2048], out[4096], err[4096], why[256];
    snprintf(cmd, sizeof cmd, "%s card %s", mixbit(), outdir);
    int ec = run(cmd, out, sizeof out, err, sizeof err);
    CHECK_MSG(ec == 0, "exit %d: %s", ec, err);
    char *t = slurp(outdir, "README.md"), *svg = slurp(outdir, "mixbit-bits.svg");
    CHECK(t && svg);
    if (!t || !svg) { free(t); free(svg); return; }
    CHECK_MSG(front_matter_ok(t, why, sizeof why), "%s", why);
    char h[256];
    snprintf(h, sizeof h, "\n# EXL2 %s bpw quantization of %s\n", target_bpw, model_name);
    CHECK_MSG(strstr(t, h) != NULL, "no heading \"%s\"", h + 1);
    CHECK(strstr(t, "](mixbit-bits.svg)") != NULL);
    CHECK(strstr(t, "| Perplexity |") && strstr(t, " before, ") && strstr(t, "paper convention"));
    CHECK(strstr(t, "| KL divergence from the source | mean ") != NULL);
    CHECK(strstr(t, "12 rows x 128 tokens (6 rows for the measurement)") != NULL);
    CHECK(strstr(t, getenv("MB_ASAN") ? "tinystories-sample.txt" : "calib-kjv-jargon.txt") != NULL);
    CHECK(strstr(t, "context 128") != NULL);
    CHECK(strstr(t, "ExLlamaV2Config(") && strstr(t, "TabbyAPI"));
    CHECK(strstr(t, "where the output is most sensitive") != NULL); /* the default allocation weighs errors by their output KLD */
    CHECK(strstr(t, "## Original model card") != NULL);
    CHECK(strstr(t, "max_seq_len=512") || getenv("MB_ASAN")); /* from config.json: kjv-mixtral has 512 positions */
    no_local_path("README.md", t);
    no_local_path("mixbit-bits.svg", svg);
    /* one bar per module, one dot per module; a log axis (the errors span more than a decade) */
    char rp[700];
    snprintf(rp, sizeof rp, "%s/mixbit-report.json", outdir);
    json_t *rep = json_load_file(rp, 0, NULL);
    size_t nmod = json_array_size(json_object_get(rep, "modules"));
    json_decref(rep);
    int bars = 0, dots = 0;
    for (const char *s = svg; (s = strstr(s, " bpw</title></rect>")); s++) bars++;
    for (const char *s = svg; (s = strstr(s, "<circle")); s++) dots++;
    CHECK_EQ(bars, nmod);
    CHECK_EQ(dots, nmod + 1); /* + the legend's */
    char tl[64];
    snprintf(tl, sizeof tl, "target %s bpw", target_bpw);
    CHECK(strstr(svg, tl) != NULL);
    json_t *y = yaml_front_matter(outdir);
    if (y) {
        json_t *tags = json_object_get(y, "tags");
        CHECK_EQ(json_array_size(tags), 3);
        CHECK_STR(json_string_value(json_array_get(tags, 0)), "exl2");
        CHECK_STR(json_string_value(json_array_get(tags, 1)), "quantized");
        CHECK_STR(json_string_value(json_array_get(tags, 2)), "mixbit");
        CHECK_STR(json_string_value(json_object_get(y, "library_name")), "exllamav2");
        CHECK_STR(json_string_value(json_object_get(y, "pipeline_tag")), "text-generation");
        CHECK(json_object_get(y, "base_model") == NULL); /* unknown in this report */
        json_decref(y);
    } else {
        fprintf(stderr, "  (python3 with PyYAML not found: the front matter was checked structurally only)\n");
    }
    free(t);
    free(svg);
}

/* the keys convert writes from now on, a source card with its own front matter, hostile text */
static void test_card_new_report(void) {
    NEED_CONVERSION();
    char dir[600], cmd[2048], why[256];
    snprintf(dir, sizeof dir, "%s/newreport", tmpdir);
    snprintf(cmd, sizeof cmd, "cp -r %s %s", outdir, dir);
    CHECK_EQ(system(cmd), 0);
    char rp[700];
    snprintf(rp, sizeof rp, "%s/mixbit-report.json", dir);
    json_t *r = json_load_file(rp, 0, NULL);
    CHECK(r != NULL);
    if (!r) return;
    const char *src_card = "---\nlicense: cc0-1.0 # public domain\nlanguage:\n- en\ntags:\n- kjv\n---\n\n# KJV Mixtral\n\nA tiny MoE | trained on <b>the King "
                           "James Bible</b> & the Jargon File.\n\n```\ncode: stays\n```\n";
    json_object_set_new(r, "name", json_string("Kjv & <Mixtral> \"x\"\x01"));
    json_object_set_new(r, "model", json_string("/home/someone/models/kjv-mixtral"));
    json_object_set_new(r, "base_model", json_string("mixbit-dev/kjv-mixtral"));
    json_object_set_new(r, "license", json_null());
    json_object_set_new(r, "head_bpw", json_real(6.125));
    json_object_set_new(r, "device", json_string("cuda: NVIDIA H100 80GB HBM3"));
    json_object_set_new(r, "mixbit_version", json_string("0.1.0"));
    json_object_set_new(r, "date", json_string("2025-01-02T03:04:05Z"));
    json_object_set_new(r, "calibration", json_pack("{s:s, s:i, s:i, s:i}", "name", "calib-kjv-jargon.txt", "rows", 12, "length", 128, "measurement_rows", 6));
    json_object_del(r, "rows");
    json_object_del(r, "length");
    json_object_del(r, "measurement_rows");
    json_t *e = json_object_get(r, "eval");
    json_object_set_new(e, "text", json_string("kjv-eval.txt"));
    json_object_set_new(e, "bos", json_true());
    json_t *mods = json_object_get(r, "modules");
    for (size_t i = 0; i < json_array_size(mods); i++) {
        json_t *o = json_array_get(mods, i);
        json_object_set_new(o, "error", json_real(1.0 - json_real_value(json_object_get(o, "accuracy"))));
    }
    json_object_set_new(r, "source_card", json_string(src_card));
    json_object_set_new(r, "sensitivity_tokens", json_integer(0)); /* --sens-tokens 0: ExLlamaV2's allocation */
    CHECK_EQ(json_dump_file(r, rp, JSON_INDENT(1)), 0);
    json_decref(r);
    const char *qb = "Jane \"Q\" Doe: #1 \\ back\x01";
    struct mb_card_params cp = {NULL, qb};
    CHECK_MSG(mb_card_write(dir, &cp) == 0, "%s", mb_errmsg());
    char *t = slurp(dir, "README.md"), *svg = slurp(dir, "mixbit-bits.svg");
    CHECK(t && svg);
    if (!t || !svg) { free(t); free(svg); return; }
    CHECK_MSG(front_matter_ok(t, why, sizeof why), "%s", why);
    CHECK(strstr(t, "minimises the summed error") && !strstr(t, "most sensitive"));
    char hd[128];
    snprintf(hd, sizeof hd, "\n# EXL2 %s bpw quantization of Kjv \\& \\<Mixtral\\> \"x\"\n", target_bpw);
    CHECK_MSG(strstr(t, hd) != NULL, "no heading \"%s\"", hd + 1);
    CHECK(strstr(t, "[mixbit-dev/kjv-mixtral](https://huggingface.co/mixbit-dev/kjv-mixtral)") != NULL);
    CHECK(strstr(t, "| Output head | 6 bits (6.125 bits per weight with scales) |") != NULL);
    CHECK(strstr(t, "| Device | cuda: NVIDIA H100 80GB HBM3 |") != NULL);
    CHECK(strstr(t, "| Date | 2025-01-02T03:04:05Z |") != NULL);
    CHECK(strstr(t, "| mixbit version | 0.1.0 |") != NULL);
    CHECK(strstr(t, "of kjv-eval.txt, context 128") && strstr(t, ", BOS first |"));
    CHECK(strstr(t, "| Calibration | calib-kjv-jargon.txt, 12 rows x 128 tokens (6 rows for the measurement) |") != NULL);
    /* the source card: whole, after our heading, without its front matter */
    const char *body = strstr(src_card, "# KJV Mixtral");
    const char *at = strstr(t, body), *heading = strstr(t, "## Original model card\n");
    CHECK_MSG(at && heading && at > heading, "source card body missing or misplaced");
    CHECK(!strstr(t, "language:") && !strstr(t, "- kjv") && !strstr(t, "public domain"));
    no_local_path("README.md", t);
    no_local_path("mixbit-bits.svg", svg);
    CHECK(strstr(svg, "Kjv &amp; &lt;Mixtral&gt; &quot;x&quot;") != NULL);
    CHECK(!strstr(svg, "<Mixtral>") && !strchr(svg, '\x01') && !strchr(t, '\x01'));
    json_t *y = yaml_front_matter(dir);
    if (y) {
        CHECK_STR(json_string_value(json_object_get(y, "base_model")), "mixbit-dev/kjv-mixtral");
        CHECK_STR(json_string_value(json_object_get(y, "base_model_relation")), "quantized");
        CHECK_STR(json_string_value(json_object_get(y, "license")), "cc0-1.0");
        CHECK_STR(json_string_value(json_object_get(y, "quantized_by")), qb);
        json_decref(y);
    }
    if (have_cmd("python3")) { /* the chart is well-formed XML */
        snprintf(cmd, sizeof cmd, "python3 -c 'import sys, xml.etree.ElementTree as E; E.parse(sys.argv[1])' %s/mixbit-bits.svg", dir);
        CHECK_EQ(run(cmd, NULL, 0, NULL, 0), 0);
    }
    free(t);
    free(svg);
    /* --base-model overrides; a malformed id is a usage error (exit 2), a malformed one in the report is left out */
    snprintf(cmd, sizeof cmd, "%s card %s --base-model org/other-model_1.5 --quantized-by me -q", mixbit(), dir);
    CHECK_EQ(run(cmd, NULL, 0, NULL, 0), 0);
    t = slurp(dir, "README.md");
    CHECK(t && strstr(t, "base_model: \"org/other-model_1.5\"\n") && strstr(t, "quantized_by: \"me\"\n"));
    free(t);
    const char *badids[] = {"a/b/c", "../etc", "-x", "a--b", "x y", "/abs", ""};
    for (int i = 0; i < 7; i++) {
        char err[4096];
        snprintf(cmd, sizeof cmd, "%s card %s --base-model \"%s\"", mixbit(), dir, badids[i]);
        CHECK_MSG(run(cmd, NULL, 0, err, sizeof err) == 2 && strstr(err, "repository id"), "--base-model \"%s\": %s", badids[i], err);
    }
    r = json_load_file(rp, 0, NULL);
    json_object_set_new(r, "base_model", json_string("../../etc/passwd"));
    json_dump_file(r, rp, 0);
    json_decref(r);
    CHECK_MSG(mb_card_write(dir, NULL) == 0, "%s", mb_errmsg());
    t = slurp(dir, "README.md");
    CHECK(t && !strstr(t, "base_model") && !strstr(t, "etc/passwd"));
    free(t);
    /* license forms in source cards: a block list, a flow list, something the Hub would refuse */
    const char *cards[][2] = {{"---\nlicense:\n- mit\n---\nx\n", "license: \"mit\"\n"},
                              {"---\nlicense: ['apache-2.0']\n---\nx\n", "license: \"apache-2.0\"\n"},
                              {"---\nlicense: other\nlicense_name: kjv-license\nlicense_link: LICENSE\n---\nx\n", "license_link: \"LICENSE\"\n"},
                              {"---\nlicense: Apache License 2.0\n---\nx\n", NULL}};
    for (int i = 0; i < 4; i++) {
        r = json_load_file(rp, 0, NULL);
        json_object_set_new(r, "source_card", json_string(cards[i][0]));
        json_object_set_new(r, "base_model", json_null());
        json_dump_file(r, rp, 0);
        json_decref(r);
        CHECK_MSG(mb_card_write(dir, NULL) == 0, "%s", mb_errmsg());
        t = slurp(dir, "README.md");
        CHECK(t != NULL);
        if (!t) continue;
        CHECK_MSG(cards[i][1] ? strstr(t, cards[i][1]) != NULL : !strstr(t, "license:"), "card %d", i);
        CHECK_MSG(front_matter_ok(t, why, sizeof why), "card %d: %s", i, why);
        free(t);
    }
}

/* a report from a much larger model (80 layers, dense) with no config.json beside it */
static void make_big_report(const char *dir) {
    json_t *r = json_pack("{s:s, s:f, s:f, s:i}", "name", "Llama-3.1-70B-Instruct", "target_bpw", 4.65, "decoder_bpw", 4.6497, "head_bits", 6);
    json_t *mods = json_array();
    struct mb_rng rng = {7};
    for (int l = 0; l < 80; l++)
        for (int k = 0; k < 2; k++) {
            char nm[96];
            snprintf(nm, sizeof nm, "model.layers.%d.%s", l, k ? "mlp" : "self_attn");
            double bpw = 2.2 + 6 * mb_rng_uniform(&rng), err = pow(10, -1 - 3.5 * mb_rng_uniform(&rng));
            json_array_append_new(mods, json_pack("{s:s, s:i, s:f, s:f, s:f}", "module", nm, "option", 3, "bpw", bpw, "accuracy", 1 - err, "error", err));
        }
    json_object_set_new(r, "modules", mods);
    char p[700];
    snprintf(p, sizeof p, "%s/mixbit-report.json", dir);
    json_dump_file(r, p, 0);
    json_decref(r);
}

static int png_ok(const char *path) {
    char *t = NULL;
    size_t n = 0;
    if (mb_read_file(path, &t, &n, 0)) return 0;
    int ok = n > 2000 && !memcmp(t, "\x89PNG\r\n\x1a\n", 8);
    free(t);
    return ok;
}

static void test_chart_renders(void) {
    if (!have_cmd("rsvg-convert")) SKIP("rsvg-convert not found (Debian librsvg2-bin; scripts/setup.sh installs it)");
    char big[600], cmd[2048], err[4096], png[700];
    snprintf(big, sizeof big, "%s/big", tmpdir);
    CHECK_EQ(mb_mkdir_p(big), 0);
    make_big_report(big);
    CHECK_MSG(mb_card_write(big, NULL) == 0, "%s", mb_errmsg());
    char *t = slurp(big, "README.md");
    CHECK(t && strstr(t, "# EXL2 4.65 bpw quantization of Llama-3.1-70B-Instruct\n") && strstr(t, "max_seq_len=4096") && strstr(t, "not evaluated"));
    free(t);
    char *svg = slurp(big, "mixbit-bits.svg");
    CHECK(svg && strstr(svg, "(log scale)") && strstr(svg, ">0</text>") && strstr(svg, ">75</text>") && !strstr(svg, ">76</text>"));
    free(svg);
    /* a baseline (--uniform) report has no measured error: bars only */
    char rp[700];
    snprintf(rp, sizeof rp, "%s/mixbit-report.json", big);
    json_t *r = json_load_file(rp, 0, NULL);
    json_object_set_new(r, "uniform", json_string("1:4b_128g"));
    json_dump_file(r, rp, 0);
    json_decref(r);
    CHECK_MSG(mb_card_write(big, NULL) == 0, "%s", mb_errmsg());
    t = slurp(big, "README.md");
    svg = slurp(big, "mixbit-bits.svg");
    CHECK(t && strstr(t, "one setting for every projection (1:4b\\_128g, a baseline without measurement)"));
    CHECK(svg && !strstr(svg, "<circle") && strstr(svg, "bpw</title></rect>"));
    free(t);
    free(svg);
    const char *dirs[] = {outdir, big, NULL};
    char nr[600];
    snprintf(nr, sizeof nr, "%s/newreport", tmpdir);
    dirs[2] = nr;
    const char *bgs[] = {"#ffffff", "#0b0f19"}; /* the Hub's light and dark page backgrounds */
    for (int d = 0; d < 3; d++) {
        if (d != 1 && !converted) continue;
        for (int b = 0; b < 2; b++) {
            snprintf(png, sizeof png, "%s/chart-%d-%s.png", tmpdir, d, b ? "dark" : "light");
            snprintf(cmd, sizeof cmd, "rsvg-convert -b '%s' -o %s %s/mixbit-bits.svg", bgs[b], png, dirs[d]);
            int ec = run(cmd, NULL, 0, err, sizeof err);
            CHECK_MSG(ec == 0, "%s: exit %d: %s", cmd, ec, err);
            CHECK_MSG(png_ok(png), "%s is not a PNG of a chart", png);
        }
    }
    if (getenv("MB_CARD_KEEP_PNG")) { /* for looking at them: copies beside the working directory */
        snprintf(cmd, sizeof cmd, "cp %s/chart-*.png %s", tmpdir, getenv("MB_CARD_KEEP_PNG"));
        CHECK_EQ(system(cmd), 0);
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* verify                                                                                          */

static int verify(const char *dir, char *out, size_t outsz, char *err, size_t errsz) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s verify %s", mixbit(), dir);
    return run(cmd, out, outsz, err, errsz);
}

/* a fresh copy of the converted model (manifest included) */
static void copy_out(const char *name, char *dir, size_t n) {
    snprintf(dir, n, "%s/%s", tmpdir, name);
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "rm -rf %s && cp -r %s %s", dir, outdir, dir);
    CHECK_EQ(system(cmd), 0);
}

/* rewrite dir/output.safetensors without tensor `drop` (NULL: none) and with tensor `patch` changed by fn */
static int rewrite_shard(const char *dir, const char *drop, const char *patch, void (*fn)(void *data, size_t nbytes)) {
    char p[700];
    snprintf(p, sizeof p, "%s/output.safetensors", dir);
    struct mb_st_file *f = NULL;
    int rc = mb_st_open(p, &f);
    if (rc) return rc;
    struct mb_st_entry *e = calloc((size_t)f->n, sizeof *e);
    void *copy = NULL;
    int n = 0, found = 0;
    for (int i = 0; i < f->n; i++) {
        const struct mb_tensor_info *t = &f->t[i];
        if (drop && !strcmp(t->name, drop)) { found = 1; continue; }
        e[n].name = t->name;
        e[n].dtype = t->dtype;
        e[n].ndim = t->ndim;
        memcpy(e[n].shape, t->shape, sizeof t->shape);
        e[n].data = t->data;
        if (patch && !strcmp(t->name, patch)) {
            copy = malloc(t->nbytes);
            memcpy(copy, t->data, t->nbytes);
            fn(copy, t->nbytes);
            e[n].data = copy;
            found = 1;
        }
        n++;
    }
    const char *meta[] = {"format", "pt"};
    rc = found ? mb_st_write(p, e, n, meta, 1) : mb_fail(MB_EINVAL, "tensor %s not in %s", drop ? drop : patch, p);
    free(copy);
    free(e);
    mb_st_close(f);
    return rc;
}

static void dup_first_invperm(void *d, size_t n) { memcpy((char *)d + 4, d, 4); }
static void nan_scale_max(void *d, size_t n) { uint16_t h = 0x7e00; memcpy(d, &h, 2); }
static void zero_scale_max(void *d, size_t n) { memset(d, 0, 2); }
static void bits7_group0(void *d, size_t n) { int16_t b = 7; memcpy(d, &b, 2); }
/* every group read as 8-bit (still non-increasing, every group still whole values): unless they were all
 * 8-bit, the packed rows now hold fewer rows than the layer has */
static void bits8_all(void *d, size_t n) {
    for (size_t g = 0; g + 4 <= n; g += 4) { int16_t b = 8; memcpy((char *)d + g, &b, 2); }
}

/* mutate a fresh copy, run verify, expect exit 1 and every `want` substring in the message */
#define EXPECT_FAIL(dir, want1, want2)                                                                              \
    do {                                                                                                            \
        char o_[4096], e_[8192];                                                                                    \
        int ec_ = verify(dir, o_, sizeof o_, e_, sizeof e_);                                                        \
        CHECK_MSG(ec_ == 1 && strstr(e_, want1) && strstr(e_, want2) && !strstr(o_, "OK"), "%s: exit %d, stderr: %s", dir, ec_, e_); \
        if (ec_ == 1) fprintf(stderr, "  %s", strstr(e_, "error: ") ? strstr(e_, "error: ") : e_);                   \
    } while (0)

static void test_verify(void) {
    NEED_CONVERSION();
    char out[4096], err[8192], dir[700], cmd[2048], p[800];
    /* convert wrote the manifest; without it verify refuses; rewritten, it verifies */
    int ec = verify(outdir, out, sizeof out, err, sizeof err);
    CHECK_MSG(ec == 0, "fresh conversion: exit %d: %s", ec, err);
    snprintf(p, sizeof p, "%s/%s", outdir, MB_MANIFEST_NAME);
    CHECK_EQ(unlink(p), 0);
    ec = verify(outdir, out, sizeof out, err, sizeof err);
    CHECK_MSG(ec == 1 && strstr(err, "no mixbit-manifest.json"), "exit %d: %s", ec, err);
    CHECK_MSG(mb_manifest_write(outdir) == 0, "%s", mb_errmsg());
    ec = verify(outdir, out, sizeof out, err, sizeof err);
    CHECK_MSG(ec == 0 && !strncmp(out, "OK ", 3) && strstr(out, "EXL2 layers valid") && !strchr(strchr(out, '\n') + 1, '\n'), "exit %d: %s%s", ec, out, err);
    fprintf(stderr, "  %s", out);
    /* `mixbit card` afterwards keeps the manifest true */
    snprintf(cmd, sizeof cmd, "%s card %s --quantized-by someone", mixbit(), outdir);
    CHECK_EQ(run(cmd, NULL, 0, NULL, 0), 0);
    CHECK_EQ(verify(outdir, out, sizeof out, err, sizeof err), 0);

    /* a flipped byte in the middle of the shard */
    copy_out("flip", dir, sizeof dir);
    snprintf(p, sizeof p, "%s/output.safetensors", dir);
    FILE *f = fopen(p, "r+b");
    CHECK(f != NULL);
    if (f) {
        fseek(f, 0, SEEK_END);
        long mid = ftell(f) / 2;
        fseek(f, mid, SEEK_SET);
        int c = fgetc(f);
        fseek(f, mid, SEEK_SET);
        fputc(c ^ 0x10, f);
        fclose(f);
    }
    EXPECT_FAIL(dir, "output.safetensors: sha256", "changed after the conversion");

    /* a deleted tensor: the manifest notices; with the manifest rewritten, the model check names it */
    copy_out("deleted", dir, sizeof dir);
    const char *victim = "model.layers.1.self_attn.q_proj.q_scale";
    CHECK_MSG(rewrite_shard(dir, victim, NULL, NULL) == 0, "%s", mb_errmsg());
    EXPECT_FAIL(dir, "output.safetensors has", "bytes");
    CHECK_EQ(mb_manifest_write(dir), 0);
    EXPECT_FAIL(dir, "model check", victim);

    /* a truncated file */
    copy_out("truncated", dir, sizeof dir);
    snprintf(p, sizeof p, "%s/output.safetensors", dir);
    struct stat st;
    CHECK_EQ(stat(p, &st), 0);
    CHECK_EQ(truncate(p, st.st_size - 4096), 0);
    EXPECT_FAIL(dir, "output.safetensors has", "truncated");
    CHECK_EQ(mb_manifest_write(dir), 0); /* and without the manifest's help: the header no longer fits the file */
    EXPECT_FAIL(dir, "model check", "output.safetensors");

    /* an edited config.json (same length: only the hash can tell); then one the checkpoint contradicts */
    copy_out("config", dir, sizeof dir);
    char *cfg = slurp(dir, "config.json");
    CHECK(cfg != NULL);
    if (cfg) {
        char *h = strstr(cfg, "\"rope_theta\": 1");
        CHECK(h != NULL);
        if (h) h[strlen("\"rope_theta\": ")] = '2';
        put(dir, "config.json", cfg, strlen(cfg));
        EXPECT_FAIL(dir, "config.json: sha256", "differs");
        h = strstr(cfg, "\"num_hidden_layers\": ");
        CHECK(h != NULL);
        if (h) h[strlen("\"num_hidden_layers\": ")] = '3';
        put(dir, "config.json", cfg, strlen(cfg));
        CHECK_EQ(mb_manifest_write(dir), 0);
        EXPECT_FAIL(dir, "model check", "unexpected tensor model.layers.3");
        free(cfg);
    }

    /* a file added, a file removed */
    copy_out("extra", dir, sizeof dir);
    put(dir, "notes.txt", "x", 1);
    EXPECT_FAIL(dir, "notes.txt is not in", "mixbit-manifest.json");
    copy_out("missing", dir, sizeof dir);
    snprintf(p, sizeof p, "%s/tokenizer.json", dir);
    CHECK_EQ(unlink(p), 0);
    EXPECT_FAIL(dir, "tokenizer.json is listed", "missing");

    /* broken EXL2 layers behind a manifest that matches them: only the structural checks can tell */
    struct { const char *tensor; void (*fn)(void *, size_t); const char *want; } broken[] = {
        {"model.layers.0.self_attn.o_proj.q_invperm", dup_first_invperm, "not a permutation"},
        {"model.layers.2.block_sparse_moe.experts.3.w3.q_scale_max", nan_scale_max, "q_scale_max[0] = nan"},
        {"model.layers.1.self_attn.v_proj.q_scale_max", zero_scale_max, "finite and > 0"},
        {"model.layers.0.self_attn.q_proj.q_groups", bits7_group0, "has 7 bits"},
        {"model.layers.1.block_sparse_moe.experts.0.w1.q_groups", bits8_all, "groups hold"},
    };
    for (int i = 0; i < 5; i++) {
        char nm[32];
        snprintf(nm, sizeof nm, "exl2-%d", i);
        copy_out(nm, dir, sizeof dir);
        CHECK_MSG(rewrite_shard(dir, NULL, broken[i].tensor, broken[i].fn) == 0, "%s", mb_errmsg());
        CHECK_EQ(mb_manifest_write(dir), 0);
        char mod[128];
        snprintf(mod, sizeof mod, "%s", broken[i].tensor);
        *strrchr(mod, '.') = 0;
        EXPECT_FAIL(dir, mod, broken[i].want);
    }

    /* sharded output (index + shards, as convert writes models over --shard-size): verifies; a shard gone does not */
    copy_out("sharded", dir, sizeof dir);
    snprintf(p, sizeof p, "%s/output.safetensors", dir);
    struct mb_st_file *sf = NULL;
    CHECK_MSG(mb_st_open(p, &sf) == 0, "%s", mb_errmsg());
    if (sf) {
        struct mb_st_entry *se = calloc((size_t)sf->n, sizeof *se);
        for (int i = 0; i < sf->n; i++) {
            se[i].name = sf->t[i].name;
            se[i].dtype = sf->t[i].dtype;
            se[i].ndim = sf->t[i].ndim;
            memcpy(se[i].shape, sf->t[i].shape, sizeof se[i].shape);
            se[i].data = sf->t[i].data;
        }
        const char *meta[] = {"format", "pt"};
        int nsh = 0;
        CHECK_MSG(mb_st_write_sharded(dir, "output", se, sf->n, meta, 1, sf->data_size / 3 + 1, &nsh) == 0, "%s", mb_errmsg());
        CHECK(nsh >= 3);
        free(se);
        mb_st_close(sf);
        CHECK_EQ(unlink(p), 0);
        CHECK_EQ(mb_manifest_write(dir), 0);
        int ec2 = verify(dir, out, sizeof out, err, sizeof err);
        CHECK_MSG(ec2 == 0 && strstr(out, "OK "), "sharded: exit %d: %s", ec2, err);
        snprintf(p, sizeof p, "%s/output-00002-of-%05d.safetensors", dir, nsh);
        CHECK_EQ(unlink(p), 0);
        EXPECT_FAIL(dir, "output-00002-of-", "missing");
    }

    /* a hostile or broken manifest */
    const char *bad[][2] = {
        {"{\"files\": [{\"path\": \"../../etc/passwd\", \"bytes\": 1, \"sha256\": \"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\"}]}", "not a plain name"},
        {"{\"files\": [{\"path\": \"/etc/passwd\", \"bytes\": 1, \"sha256\": \"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\"}]}", "not a plain name"},
        {"{\"files\": [{\"path\": \"config.json\", \"bytes\": 1, \"sha256\": \"E3B0\"}]}", "64 lowercase hex"},
        {"{\"files\": {}}", "expected {\"files\""},
        {"{\"files\": [", "invalid JSON"},
    };
    for (int i = 0; i < 5; i++) {
        copy_out("manifest", dir, sizeof dir);
        put(dir, MB_MANIFEST_NAME, bad[i][0], strlen(bad[i][0]));
        EXPECT_FAIL(dir, MB_MANIFEST_NAME, bad[i][1]);
    }
    /* usage */
    snprintf(cmd, sizeof cmd, "%s verify", mixbit());
    CHECK_EQ(run(cmd, NULL, 0, NULL, 0), 2);
    snprintf(cmd, sizeof cmd, "%s card", mixbit());
    CHECK_EQ(run(cmd, NULL, 0, NULL, 0), 2);
    snprintf(cmd, sizeof cmd, "%s verify %s/no-such-dir", mixbit(), tmpdir);
    CHECK_EQ(run(cmd, NULL, 0, err, sizeof err), 1);
    snprintf(cmd, sizeof cmd, "%s card %s/no-such-dir", mixbit(), tmpdir);
    CHECK_EQ(run(cmd, NULL, 0, err, sizeof err), 1);
    CHECK_MSG(strstr(err, "mixbit-report.json") != NULL, "%s", err);
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/mb_test_card_XXXXXX");
    if (!mkdtemp(tmpdir)) return 1;
    RUN(test_manifest_vectors);
    RUN(test_convert);
    RUN(test_card_from_cli);
    RUN(test_card_new_report);
    RUN(test_chart_renders);
    RUN(test_verify);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd)) {}
    TEST_MAIN_END();
}
