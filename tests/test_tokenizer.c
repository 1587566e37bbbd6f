/* tests/test_tokenizer.c: tokenizer.json encoding against the Hugging Face library's ids, decoding,
 * the wikitext-2 count, broken tokenizer files, datasets and calibration rows. */
#include <jansson.h>
#include <unistd.h>

#include "../formats/formats.h"
#include "harness.h"

static char tmpdir[256];

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

static void test_reference_cases(void) {
    char p[512];
    snprintf(p, sizeof p, "%s/reference/tokenizer-cases.json", th_shared());
    json_error_t err;
    json_t *root = json_load_file(p, 0, &err);
    CHECK_MSG(root != NULL, "%s: %s", p, err.text);
    if (!root) return;
    json_t *toks = json_object_get(root, "tokenizers"), *cases = json_object_get(root, "cases");
    const char *key;
    json_t *v;
    int total = 0, matched = 0;
    json_object_foreach(toks, key, v) {
        char tp[512];
        snprintf(tp, sizeof tp, "%s/%s", th_shared(), json_string_value(v));
        struct mb_tokenizer *t = NULL;
        int rc = mb_tokenizer_load(tp, &t);
        CHECK_MSG(rc == 0, "%s: %s", tp, mb_errmsg());
        if (rc) continue;
        for (size_t i = 0; i < json_array_size(cases); i++) {
            json_t *c = json_array_get(cases, i);
            json_t *text = json_object_get(c, "text"), *want = json_object_get(json_object_get(c, "ids"), key);
            int32_t *ids = NULL;
            int64_t n = 0, cap = 0;
            rc = mb_tokenize(t, json_string_value(text), json_string_length(text), 0, 0, &ids, &n, &cap);
            total++;
            int ok = rc == 0 && (size_t)n == json_array_size(want);
            for (int64_t k = 0; ok && k < n; k++) ok = ids[k] == json_integer_value(json_array_get(want, k));
            if (ok) matched++;
            else {
                fprintf(stderr, "  %s case %zu %.60s: rc %d n %lld want %zu:", key, i, json_string_value(text), rc, (long long)n, json_array_size(want));
                for (int64_t k = 0; k < n && k < 16; k++) fprintf(stderr, " %d/%lld", ids[k], (long long)json_integer_value(json_array_get(want, k)));
                fprintf(stderr, "\n");
            }
            /* decoding gives the text back for the Llama-family tokenizers on texts without specials */
            free(ids);
        }
        mb_tokenizer_free(t);
    }
    CHECK_EQ(total, 448);
    CHECK_EQ(matched, total);
    json_decref(root);
}

/* The Split pre-tokenizer (Llama 3 style: Split regex + ByteLevel without its own regex) checked against
 * the reference: phi-2's ByteLevel(use_regex) is exactly Split(GPT-2 regex, Isolated) + ByteLevel(no regex),
 * so the rewritten tokenizer.json must give phi-2's reference ids. */
static void test_split_pretokenizer(void) {
    char p[512], tp[512];
    snprintf(p, sizeof p, "%s/tokenizers/phi2-bytelevel/tokenizer.json", th_shared());
    snprintf(tp, sizeof tp, "%s/split-tokenizer.json", tmpdir);
    json_error_t err;
    json_t *tj = json_load_file(p, 0, &err);
    CHECK(tj != NULL);
    if (!tj) return;
    json_t *pre = json_pack("{s:s, s:[{s:s, s:{s:s}, s:s, s:b}, {s:s, s:b, s:b, s:b}]}", "type", "Sequence", "pretokenizers", "type", "Split", "pattern", "Regex",
                            "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+", "behavior", "Isolated", "invert", 0,
                            "type", "ByteLevel", "add_prefix_space", 0, "trim_offsets", 1, "use_regex", 0);
    json_object_set_new(tj, "pre_tokenizer", pre);
    CHECK_EQ(json_dump_file(tj, tp, 0), 0);
    json_decref(tj);
    struct mb_tokenizer *t = NULL;
    CHECK_MSG(mb_tokenizer_load(tp, &t) == 0, "%s", mb_errmsg());
    snprintf(p, sizeof p, "%s/reference/tokenizer-cases.json", th_shared());
    json_t *root = json_load_file(p, 0, &err);
    if (!t || !root) { mb_tokenizer_free(t); json_decref(root); return; }
    json_t *cases = json_object_get(root, "cases");
    int bad = 0;
    for (size_t i = 0; i < json_array_size(cases); i++) {
        json_t *c = json_array_get(cases, i), *text = json_object_get(c, "text"), *want = json_object_get(json_object_get(c, "ids"), "phi2");
        int32_t *ids = NULL;
        int64_t n = 0, cap = 0;
        int rc = mb_tokenize(t, json_string_value(text), json_string_length(text), 0, 0, &ids, &n, &cap);
        int ok = rc == 0 && (size_t)n == json_array_size(want);
        for (int64_t k = 0; ok && k < n; k++) ok = ids[k] == json_integer_value(json_array_get(want, k));
        bad += !ok;
        free(ids);
    }
    CHECK_EQ(bad, 0);
    json_decref(root);
    mb_tokenizer_free(t);
}

static void test_decode(void) {
    const char *paths[] = {"tokenizers/llama2", "tokenizers/phi2-bytelevel/tokenizer.json", "models/kjv-llama"};
    const char *texts[] = {"Hello world, this is a test.\nSecond line: caf\xc3\xa9 \xe2\x82\xac 42!", "In the beginning God created"};
    for (int i = 0; i < 3; i++) {
        char p[512];
        snprintf(p, sizeof p, "%s/%s", th_shared(), paths[i]);
        struct mb_tokenizer *t = NULL;
        CHECK_EQ(mb_tokenizer_load(p, &t), 0);
        if (!t) continue;
        for (int k = 0; k < 2; k++) {
            int32_t *ids = NULL;
            int64_t n = 0, cap = 0;
            CHECK_EQ(mb_tokenize(t, texts[k], strlen(texts[k]), 0, 0, &ids, &n, &cap), 0);
            char *back = NULL;
            CHECK_EQ(mb_detokenize(t, ids, n, &back), 0);
            CHECK_STR(back, texts[k]);
            free(back);
            free(ids);
        }
        mb_tokenizer_free(t);
    }
}

static void test_special_and_bos(void) {
    char p[512];
    snprintf(p, sizeof p, "%s/tokenizers/llama2", th_shared());
    struct mb_tokenizer *t = NULL;
    CHECK_EQ(mb_tokenizer_load(p, &t), 0);
    if (!t) return;
    CHECK_EQ(mb_tokenizer_bos(t), 1);
    CHECK_EQ(mb_tokenizer_eos(t), 2);
    CHECK(mb_tokenizer_adds_bos(t));
    int32_t *ids = NULL;
    int64_t n = 0, cap = 0;
    const char *s = "a</s>b";
    CHECK_EQ(mb_tokenize(t, s, strlen(s), 1, 0, &ids, &n, &cap), 0);
    CHECK(n >= 4 && ids[0] == 1);
    int has_eos = 0;
    for (int64_t i = 0; i < n; i++) has_eos |= ids[i] == 2;
    CHECK(has_eos);
    n = 0;
    CHECK_EQ(mb_tokenize(t, s, strlen(s), 0, 1, &ids, &n, &cap), 0); /* literal: no special match */
    has_eos = 0;
    for (int64_t i = 0; i < n; i++) has_eos |= ids[i] == 2;
    CHECK(!has_eos);
    /* invalid UTF-8 is an error */
    n = 0;
    CHECK_EQ(mb_tokenize(t, "ab\xff", 3, 0, 0, &ids, &n, &cap), MB_EINVAL);
    free(ids);
    mb_tokenizer_free(t);
}

static void test_wikitext_count(void) {
    char p[512], tp[512];
    snprintf(p, sizeof p, "%s/text/wikitext-2-raw-test.txt", th_shared());
    snprintf(tp, sizeof tp, "%s/tokenizers/llama2", th_shared());
    struct mb_tokenizer *t = NULL;
    CHECK_EQ(mb_tokenizer_load(tp, &t), 0);
    if (!t) return;
    int32_t *ids = NULL;
    int64_t n = 0;
    double t0 = mb_now();
    CHECK_EQ(mb_tokenize_file(t, p, 1, &ids, &n), 0);
    double el = mb_now() - t0;
    CHECK_EQ(n, 341469);
    fprintf(stderr, "  wikitext-2 test: %lld ids in %.3f s\n", (long long)n, el);
    /* streaming gives the same ids as one call on the whole text */
    char *text;
    size_t len;
    CHECK_EQ(mb_read_file(p, &text, &len, 0), 0);
    int32_t *ids2 = NULL;
    int64_t n2 = 0, cap2 = 0;
    CHECK_EQ(mb_tokenize(t, text, len, 1, 0, &ids2, &n2, &cap2), 0);
    CHECK_EQ(n2, n);
    CHECK(n2 == n && memcmp(ids, ids2, n * sizeof *ids) == 0);
    free(text);
    free(ids);
    free(ids2);
    mb_tokenizer_free(t);
}

static void test_broken_tokenizers(void) {
    struct { const char *what, *json, *needle; } cases[] = {
        {"not json", "{", "invalid JSON"},
        {"missing model", "{\"added_tokens\": []}", "model"},
        {"unknown model type", "{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}", "Unigram"},
        {"merge of unknown token", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [\"a c\"]}}", "merges[0]"},
        {"merged token missing", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [\"a b\"]}}", "merges[0]"},
        {"merge not a pair", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"ab\"]}}", "merges[0]"},
        {"merges not a list", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": 3}}", "merges"},
        {"unknown normalizer", "{\"normalizer\": {\"type\": \"NFKC\"}, \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}", "NFKC"},
        {"unknown pre-tokenizer", "{\"pre_tokenizer\": {\"type\": \"BertPreTokenizer\"}, \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}", "BertPreTokenizer"},
        {"bad vocab id", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -4}, \"merges\": []}}", "vocab"},
        {"bad regex", "{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"(\"}, \"behavior\": \"Isolated\"}, \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}", "regex"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char p[512];
        snprintf(p, sizeof p, "%s/tok%zu.json", tmpdir, i);
        write_text(p, cases[i].json);
        struct mb_tokenizer *t = NULL;
        int rc = mb_tokenizer_load(p, &t);
        CHECK_MSG(rc != 0, "%s", cases[i].what);
        CHECK_MSG(t == NULL, "%s", cases[i].what);
        CHECK_MSG(strstr(mb_errmsg(), cases[i].needle) && strstr(mb_errmsg(), p), "%s: %s", cases[i].what, mb_errmsg());
    }
}

struct collect { int n; size_t bytes; char last[64]; };
static int collect_cb(const char *doc, size_t len, void *user) {
    struct collect *c = user;
    c->n++;
    c->bytes += len;
    snprintf(c->last, sizeof c->last, "%.*s", (int)(len < 63 ? len : 63), doc);
    return 0;
}

static void test_datasets(void) {
    char d[512], p[600];
    snprintf(d, sizeof d, "%s/ds", tmpdir);
    mb_mkdir_p(d);
    snprintf(p, sizeof p, "%s/a.txt", d);
    write_text(p, "plain text document\n");
    snprintf(p, sizeof p, "%s/b.jsonl", d);
    write_text(p, "{\"text\": \"first\"}\n\n{\"text\": \"second\", \"x\": 1}\n");
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "printf '{\"body\": \"zipped\"}\\n' | gzip > %s/c.jsonl.gz && printf 'gz text' | gzip > %s/d.txt.gz", d, d);
    CHECK_EQ(system(cmd), 0);
    struct collect c = {0};
    snprintf(p, sizeof p, "%s/b.jsonl", d);
    CHECK_EQ(mb_dataset_read(p, NULL, collect_cb, &c), 0);
    CHECK_EQ(c.n, 2);
    CHECK_STR(c.last, "second");
    memset(&c, 0, sizeof c);
    snprintf(p, sizeof p, "%s/c.jsonl.gz", d);
    CHECK_EQ(mb_dataset_read(p, "body", collect_cb, &c), 0);
    CHECK_EQ(c.n, 1);
    CHECK_STR(c.last, "zipped");
    memset(&c, 0, sizeof c);
    snprintf(p, sizeof p, "%s/d.txt.gz", d);
    CHECK_EQ(mb_dataset_read(p, NULL, collect_cb, &c), 0);
    CHECK_STR(c.last, "gz text");
    /* a directory: a.txt, b.jsonl (2), c.jsonl.gz has no "text" field -> error names file and line */
    memset(&c, 0, sizeof c);
    CHECK_EQ(mb_dataset_read(d, NULL, collect_cb, &c), MB_EFORMAT);
    CHECK(strstr(mb_errmsg(), "c.jsonl.gz:1") != NULL);
    /* malformed JSON line */
    snprintf(p, sizeof p, "%s/bad.jsonl", tmpdir);
    write_text(p, "{\"text\": \"ok\"}\n{\"text\": \"broken\n");
    CHECK_EQ(mb_dataset_read(p, NULL, collect_cb, &c), MB_EFORMAT);
    CHECK_MSG(strstr(mb_errmsg(), "bad.jsonl:2") != NULL, "%s", mb_errmsg());
    /* invalid UTF-8 with its line */
    snprintf(p, sizeof p, "%s/bad.txt", tmpdir);
    write_text(p, "line one\nline two\nbad \xc3\x28 here\n");
    CHECK_EQ(mb_dataset_read(p, NULL, collect_cb, &c), MB_EFORMAT);
    CHECK_MSG(strstr(mb_errmsg(), "bad.txt:3") != NULL, "%s", mb_errmsg());
    snprintf(p, sizeof p, "%s/missing.txt", tmpdir);
    CHECK_EQ(mb_dataset_read(p, NULL, collect_cb, &c), MB_EIO);
}

static void test_calib_rows(void) {
    char tp[512], p[512];
    snprintf(tp, sizeof tp, "%s/models/kjv-llama", th_shared());
    snprintf(p, sizeof p, "%s/text/calib-kjv-jargon.txt", th_shared());
    struct mb_tokenizer *t = NULL;
    CHECK_EQ(mb_tokenizer_load(tp, &t), 0);
    if (!t) return;
    int32_t *a = NULL, *b = NULL, *c = NULL;
    CHECK_EQ(mb_calib_rows(t, p, NULL, 8, 64, 1, 42, &a), 0);
    CHECK_EQ(mb_calib_rows(t, p, NULL, 8, 64, 1, 42, &b), 0);
    CHECK_EQ(mb_calib_rows(t, p, NULL, 8, 64, 1, 43, &c), 0);
    if (a && b && c) {
        CHECK(memcmp(a, b, 8 * 64 * 4) == 0);  /* same seed, same rows */
        CHECK(memcmp(a, c, 8 * 64 * 4) != 0);  /* another seed, other rows */
        for (int r = 0; r < 8; r++) CHECK_EQ(a[r * 64], 1);
        for (int i = 0; i < 8 * 64; i++) CHECK(a[i] >= 0 && a[i] < 4096);
    }
    free(a); free(b); free(c);
    int32_t *x = NULL;
    CHECK_EQ(mb_calib_rows(t, p, NULL, 2, 10000000, 1, 1, &x), MB_EINVAL); /* text too short */
    CHECK(x == NULL);
    mb_tokenizer_free(t);
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/mb_test_tok_XXXXXX");
    if (!mkdtemp(tmpdir)) return 1;
    RUN(test_reference_cases);
    RUN(test_split_pretokenizer);
    RUN(test_decode);
    RUN(test_special_and_bos);
    RUN(test_wikitext_count);
    RUN(test_broken_tokenizers);
    RUN(test_datasets);
    RUN(test_calib_rows);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd)) {}
    TEST_MAIN_END();
}
