/* tests/test_tokenizer.c: tokenizer.json encoding against the Hugging Face library's ids, decoding,
 * the wikitext-2 count, broken tokenizer files, datasets and calibration rows.
 * Goldens in tests/data/tokenizers (made by make_goldens.py with the library): every supported
 * normalizer / pre-tokenizer / decoder / post-processor construct on 32 varied texts, and every code point
 * through each Unicode-dependent step. */
#include <jansson.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../formats/formats.h"
#include "harness.h"

static char tmpdir[256];

/* test hooks of formats/tokenizer.c (not API) */
extern size_t mb__tokenize_chunk;
int mb__tokenizer_streamable(const struct mb_tokenizer *t);

#define TESTDATA "tests/data/tokenizers"

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

/* A model with vocab {"a": 0, "b": 1, "ab": 2} and merge a+b, plus `extra` top-level members. */
#define TINY_MODEL "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a b\"]}"

/* Broken and hostile tokenizer.json files: each must fail to load with a message naming the file and the
 * field, and must not crash (the ASan build runs this too). Issue 15 class 2: ids that are negative,
 * >= 2^31 or not integers used to crash (NULL dereference on the cleanup path) once an earlier entry had
 * set the vocabulary size. */
static void test_broken_tokenizers(void) {
    struct { const char *what, *json, *needle; } cases[] = {
        {"not json", "{", "invalid JSON"},
        {"not an object", "[1, 2]", "not a JSON object"},
        {"missing model", "{\"added_tokens\": []}", "model"},
        {"unknown model type", "{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}", "Unigram"},
        {"merge of unknown token", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [\"a c\"]}}", "merges[0]"},
        {"merged token missing", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [\"a b\"]}}", "merges[0]"},
        {"merge not a pair", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"ab\"]}}", "merges[0]"},
        {"merge of three", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [[\"a\", \"a\", \"a\"]]}}", "merges[0]"},
        {"merges not a list", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": 3}}", "merges"},
        {"negative vocab id", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 7, \"c\": -4}, \"merges\": []}}", "model.vocab \"c\""},
        {"vocab id 2^31", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 7, \"c\": 2147483648}, \"merges\": []}}", "model.vocab \"c\""},
        {"vocab id 2^63-1", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 9223372036854775807}, \"merges\": []}}", "model.vocab \"a\""},
        {"vocab id past the bound", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 4194304}, \"merges\": []}}", "model.vocab \"b\""},
        {"vocab id not an integer", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1.5}, \"merges\": []}}", "model.vocab \"b\""},
        {"vocab id a string", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": \"1\"}, \"merges\": []}}", "model.vocab \"b\""},
        {"vocab id null", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": null}, \"merges\": []}}", "model.vocab \"b\""},
        {"duplicate vocab id", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 0}, \"merges\": []}}", "id 0 is already"},
        {"duplicate vocab key", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"a\": 1}, \"merges\": []}}", "duplicate"},
        {"negative added id", "{\"added_tokens\": [{\"id\": -1, \"content\": \"<x>\"}], " TINY_MODEL "}", "added_tokens[0]"},
        {"added id 2^31", "{\"added_tokens\": [{\"id\": 3, \"content\": \"<y>\"}, {\"id\": 2147483648, \"content\": \"<x>\"}], " TINY_MODEL "}", "added_tokens[1]"},
        {"added id not an integer", "{\"added_tokens\": [{\"id\": 3.0, \"content\": \"<x>\"}], " TINY_MODEL "}", "added_tokens[0]"},
        {"added id missing", "{\"added_tokens\": [{\"content\": \"<x>\"}], " TINY_MODEL "}", "added_tokens[0]"},
        {"added content missing", "{\"added_tokens\": [{\"id\": 3}], " TINY_MODEL "}", "added_tokens[0]"},
        {"added token not an object", "{\"added_tokens\": [7], " TINY_MODEL "}", "added_tokens[0]"},
        {"added token with the id of another", "{\"added_tokens\": [{\"id\": 1, \"content\": \"<x>\"}], " TINY_MODEL "}", "added_tokens[0]"},
        {"added token with a second id", "{\"added_tokens\": [{\"id\": 5, \"content\": \"ab\"}], " TINY_MODEL "}", "added_tokens[0]"},
        {"two added tokens with one id", "{\"added_tokens\": [{\"id\": 5, \"content\": \"<x>\"}, {\"id\": 5, \"content\": \"<y>\"}], " TINY_MODEL "}", "added_tokens[1]"},
        {"added flag not a boolean", "{\"added_tokens\": [{\"id\": 5, \"content\": \"<x>\", \"lstrip\": 1}], " TINY_MODEL "}", "lstrip"},
        {"unk not in the vocab", "{\"model\": {\"type\": \"BPE\", \"unk_token\": \"<unk>\", \"vocab\": {\"a\": 0}, \"merges\": []}}", "unk_token"},
        {"template id out of range", "{\"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 0}}, {\"Sequence\": {\"id\": \"A\", \"type_id\": 0}}], "
                                     "\"special_tokens\": {\"<s>\": {\"id\": \"<s>\", \"ids\": [99], \"tokens\": [\"<s>\"]}}}, " TINY_MODEL "}", "post_processor.single[0]"},
        {"template id negative", "{\"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 0}}, {\"Sequence\": {\"id\": \"A\", \"type_id\": 0}}], "
                                 "\"special_tokens\": {\"<s>\": {\"id\": \"<s>\", \"ids\": [-1], \"tokens\": [\"<s>\"]}}}, " TINY_MODEL "}", "post_processor.single[0]"},
        {"template token mismatch", "{\"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 0}}, {\"Sequence\": {\"id\": \"A\", \"type_id\": 0}}], "
                                    "\"special_tokens\": {\"<s>\": {\"id\": \"<s>\", \"ids\": [1], \"tokens\": [\"<s>\"]}}}, " TINY_MODEL "}", "does not match id 1"},
        {"template special missing", "{\"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 0}}, {\"Sequence\": {\"id\": \"A\", \"type_id\": 0}}], "
                                     "\"special_tokens\": {}}, " TINY_MODEL "}", "not in special_tokens"},
        {"template two ids", "{\"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": {\"id\": \"x\", \"type_id\": 0}}, {\"Sequence\": {\"id\": \"A\", \"type_id\": 0}}], "
                             "\"special_tokens\": {\"x\": {\"id\": \"x\", \"ids\": [0, 1], \"tokens\": [\"a\", \"b\"]}}}, " TINY_MODEL "}", "exactly one id"},
        {"template without A", "{\"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [], \"special_tokens\": {}}, " TINY_MODEL "}", "Sequence \"A\""},
        {"roberta id mismatch", "{\"post_processor\": {\"type\": \"RobertaProcessing\", \"cls\": [\"a\", 1], \"sep\": [\"b\", 1]}, " TINY_MODEL "}", "post_processor.cls"},
        {"unknown post-processor", "{\"post_processor\": {\"type\": \"Fancy\"}, " TINY_MODEL "}", "Fancy"},
        {"unknown normalizer", "{\"normalizer\": {\"type\": \"Sequence\", \"normalizers\": [{\"type\": \"NFC\"}, {\"type\": \"Precompiled\", \"precompiled_charsmap\": \"\"}]}, " TINY_MODEL "}", "normalizer.normalizers[1]: normalizer \"Precompiled\""},
        {"unknown pre-tokenizer", "{\"pre_tokenizer\": {\"type\": \"UnicodeScripts\"}, " TINY_MODEL "}", "UnicodeScripts"},
        {"unknown decoder", "{\"decoder\": {\"type\": \"Sequence\", \"decoders\": [{\"type\": \"Mystery\"}]}, " TINY_MODEL "}", "decoder.decoders[0]: decoder \"Mystery\""},
        {"normalizer without type", "{\"normalizer\": {\"strip_left\": true}, " TINY_MODEL "}", "normalizer has no \"type\""},
        {"bad regex", "{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"(\"}, \"behavior\": \"Isolated\"}, " TINY_MODEL "}", "regex"},
        {"bad behavior", "{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"String\": \"x\"}, \"behavior\": \"Sideways\"}, " TINY_MODEL "}", "Sideways"},
        {"split without behavior", "{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"String\": \"x\"}}, " TINY_MODEL "}", "behavior"},
        {"pattern of both kinds", "{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"String\": \"x\", \"Regex\": \"y\"}, \"behavior\": \"Isolated\"}, " TINY_MODEL "}", "pattern"},
        {"metaspace two characters", "{\"pre_tokenizer\": {\"type\": \"Metaspace\", \"replacement\": \"ab\"}, " TINY_MODEL "}", "replacement"},
        {"metaspace scheme", "{\"pre_tokenizer\": {\"type\": \"Metaspace\", \"replacement\": \"_\", \"prepend_scheme\": \"sometimes\"}, " TINY_MODEL "}", "sometimes"},
        {"metaspace contradiction", "{\"pre_tokenizer\": {\"type\": \"Metaspace\", \"replacement\": \"_\", \"prepend_scheme\": \"always\", \"add_prefix_space\": false}, " TINY_MODEL "}", "add_prefix_space"},
        {"fixed length 0", "{\"pre_tokenizer\": {\"type\": \"FixedLength\", \"length\": 0}, " TINY_MODEL "}", "length"},
        {"strip decoder count", "{\"decoder\": {\"type\": \"Strip\", \"content\": \" \", \"start\": -1, \"stop\": 0}, " TINY_MODEL "}", "start"},
        {"nested too deep", "{\"normalizer\": {\"type\": \"Sequence\", \"normalizers\": [{\"type\": \"Sequence\", \"normalizers\": [{\"type\": \"Sequence\", \"normalizers\": [{\"type\": \"Sequence\", \"normalizers\": "
                            "[{\"type\": \"Sequence\", \"normalizers\": [{\"type\": \"Sequence\", \"normalizers\": [{\"type\": \"Sequence\", \"normalizers\": [{\"type\": \"Sequence\", \"normalizers\": "
                            "[{\"type\": \"Sequence\", \"normalizers\": []}]}]}]}]}]}]}]}]}, " TINY_MODEL "}", "nested deeper"},
        {"dropout", "{\"model\": {\"type\": \"BPE\", \"dropout\": 0.1, \"vocab\": {\"a\": 0}, \"merges\": []}}", "dropout"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char p[512];
        snprintf(p, sizeof p, "%s/tok%zu.json", tmpdir, i);
        write_text(p, cases[i].json);
        struct mb_tokenizer *t = NULL;
        int rc = mb_tokenizer_load(p, &t);
        CHECK_MSG(rc != 0, "%s", cases[i].what);
        CHECK_MSG(t == NULL, "%s", cases[i].what);
        CHECK_MSG(strstr(mb_errmsg(), cases[i].needle) && strstr(mb_errmsg(), p) && !strchr(mb_errmsg(), '\n'), "%s: %s", cases[i].what, mb_errmsg());
        mb_tokenizer_free(t);
    }
    /* many Sequence members are bounded too */
    char big[40000];
    size_t o = (size_t)snprintf(big, sizeof big, "{\"normalizer\": {\"type\": \"Sequence\", \"normalizers\": [");
    for (int i = 0; i < 100; i++) o += (size_t)snprintf(big + o, sizeof big - o, "%s{\"type\": \"Lowercase\"}", i ? ", " : "");
    snprintf(big + o, sizeof big - o, "]}, " TINY_MODEL "}");
    struct mb_tokenizer *t = NULL;
    CHECK(mb_tokenizer_parse("many.json", big, strlen(big), NULL, &t) != 0 && strstr(mb_errmsg(), "more than 64 normalizers"));
    mb_tokenizer_free(t);
}

/* the CLI: a hostile tokenizer exits 1 with one line naming the file and the entry */
static void test_cli_bad_tokenizer(void) {
    const char *m = getenv("MIXBIT");
    if (!m) m = "./mixbit";
    if (access(m, X_OK)) SKIP("no mixbit binary at %s", m);
    const char *bad[] = {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 9, \"c\": -5}, \"merges\": []}}",
                         "{\"added_tokens\": [{\"id\": 2147483648, \"content\": \"<x>\"}], " TINY_MODEL "}",
                         "{\"added_tokens\": [{\"id\": \"7\", \"content\": \"<x>\"}], " TINY_MODEL "}"};
    for (int i = 0; i < 3; i++) {
        char d[512], p[600], cmd[1600], err[1024] = "";
        snprintf(d, sizeof d, "%s/badtok%d", tmpdir, i);
        mb_mkdir_p(d);
        snprintf(p, sizeof p, "%s/tokenizer.json", d);
        write_text(p, bad[i]);
        snprintf(cmd, sizeof cmd, "%s tokenize %s --text hello >/dev/null 2>%s/err.txt", m, d, tmpdir);
        int st = system(cmd);
        snprintf(p, sizeof p, "%s/err.txt", tmpdir);
        FILE *f = fopen(p, "r");
        if (f) { size_t n = fread(err, 1, sizeof err - 1, f); err[n] = 0; fclose(f); }
        CHECK_MSG(WIFEXITED(st) && WEXITSTATUS(st) == 1, "case %d: status %d", i, st);
        char *nl = strchr(err, '\n');
        CHECK_MSG(strstr(err, "tokenizer.json") && strstr(err, i ? "added_tokens[0]" : "model.vocab \"c\"") && nl && nl[1] == 0, "case %d: %s", i, err);
    }
}

/* A regex that backtracks catastrophically stops at the match limit with an error, never a silent
 * non-match; decoding runs the chain on every token, added tokens included. */
static void test_regex_limit(void) {
    const char *j = "{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"(a+)+$\"}, \"behavior\": \"Isolated\"}, "
                    "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": []}}";
    struct mb_tokenizer *t = NULL;
    CHECK_EQ(mb_tokenizer_parse("limit.json", j, strlen(j), NULL, &t), 0);
    if (!t) return;
    char text[64];
    memset(text, 'a', 40);
    strcpy(text + 40, "b");
    int32_t *ids = NULL;
    int64_t n = 0, cap = 0;
    int rc = mb_tokenize(t, text, strlen(text), 0, 0, &ids, &n, &cap);
    CHECK_MSG(rc != 0 && strstr(mb_errmsg(), "regex"), "rc %d: %s", rc, mb_errmsg());
    free(ids);
    mb_tokenizer_free(t);
}

/* ---- goldens from the Hugging Face library (tests/data/tokenizers/make_goldens.py) ---- */

static json_t *load_base(const char *name) {
    char p[512];
    if (!strcmp(name, "tiny-bytelevel")) snprintf(p, sizeof p, TESTDATA "/tiny-bytelevel.json");
    else if (!strcmp(name, "phi2")) snprintf(p, sizeof p, "%s/tokenizers/phi2-bytelevel/tokenizer.json", th_shared());
    else if (!strcmp(name, "llama2")) snprintf(p, sizeof p, "%s/tokenizers/llama2/tokenizer.json", th_shared());
    else snprintf(p, sizeof p, "%s/models/kjv-llama/tokenizer.json", th_shared());
    json_error_t err;
    json_t *j = json_load_file(p, 0, &err);
    CHECK_MSG(j != NULL, "%s: %s", p, err.text);
    return j;
}

/* the variant's tokenizer: its base with the patch applied, parsed from memory */
static struct mb_tokenizer *variant_tokenizer(json_t *bases, json_t *v) {
    const char *base = json_string_value(json_object_get(v, "base")), *name = json_string_value(json_object_get(v, "name"));
    json_t *b = json_object_get(bases, base);
    if (!b) { b = load_base(base); if (!b) return NULL; json_object_set_new(bases, base, b); }
    json_t *j = json_deep_copy(b), *patch = json_object_get(v, "patch");
    const char *k;
    json_t *x;
    json_object_foreach(patch, k, x) {
        if (!strcmp(k, "model")) json_object_update(json_object_get(j, "model"), x);
        else if (!strcmp(k, "added_tokens_extra")) json_array_extend(json_object_get(j, "added_tokens"), x);
        else json_object_set(j, k, x);
    }
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    struct mb_tokenizer *t = NULL;
    int rc = mb_tokenizer_parse(name, s, strlen(s), NULL, &t);
    CHECK_MSG(rc == 0, "%s: %s", name, mb_errmsg());
    free(s);
    return t;
}

/* the golden variants, parsed once for test_goldens and test_stream_cuts */
static json_t *g_cases;
static struct mb_tokenizer *g_tok[128];
static size_t g_ntok;
static json_t *golden_variants(void) {
    if (g_cases) return g_cases;
    json_error_t err;
    g_cases = json_load_file(TESTDATA "/cases.json", 0, &err);
    CHECK_MSG(g_cases != NULL, TESTDATA "/cases.json: %s", err.text);
    if (!g_cases) return NULL;
    json_t *vars = json_object_get(g_cases, "variants"), *bases = json_object();
    for (g_ntok = 0; g_ntok < json_array_size(vars) && g_ntok < 128; g_ntok++) g_tok[g_ntok] = variant_tokenizer(bases, json_array_get(vars, g_ntok));
    json_decref(bases);
    return g_cases;
}
static void golden_free(void) {
    for (size_t i = 0; i < g_ntok; i++) mb_tokenizer_free(g_tok[i]);
    json_decref(g_cases);
}

static int same_ids(const int32_t *ids, int64_t n, json_t *want) {
    if ((size_t)n != json_array_size(want)) return 0;
    for (int64_t k = 0; k < n; k++)
        if (ids[k] != json_integer_value(json_array_get(want, k))) return 0;
    return 1;
}

static void test_goldens(void) {
    json_t *root = golden_variants();
    if (!root) return;
    json_t *texts = json_object_get(root, "texts"), *vars = json_object_get(root, "variants");
    int n_ids = 0, ok_ids = 0, n_dec = 0, ok_dec = 0, n_norm = 0, ok_norm = 0, n_pre = 0, ok_pre = 0, n_var = 0;
    for (size_t vi = 0; vi < json_array_size(vars); vi++) {
        json_t *v = json_array_get(vars, vi);
        const char *name = json_string_value(json_object_get(v, "name"));
        struct mb_tokenizer *t = vi < g_ntok ? g_tok[vi] : NULL;
        if (!t) continue;
        n_var++;
        int shown = 0;
        for (size_t i = 0; i < json_array_size(texts); i++) {
            json_t *text = json_array_get(texts, i);
            const char *s = json_string_value(text);
            size_t len = json_string_length(text);
            int32_t *ids = NULL;
            int64_t n = 0, cap = 0;
            int rc = mb_tokenize(t, s, len, 0, 0, &ids, &n, &cap);
            json_t *want = json_array_get(json_object_get(v, "ids"), i);
            n_ids++;
            if (rc == 0 && same_ids(ids, n, want)) ok_ids++;
            else if (shown++ < 2) {
                fprintf(stderr, "  %s text %zu: rc %d, %lld ids (want %zu):", name, i, rc, (long long)n, json_array_size(want));
                for (int64_t k = 0; k < n && k < 12; k++) fprintf(stderr, " %d/%lld", ids[k], (long long)json_integer_value(json_array_get(want, k)));
                fprintf(stderr, "\n");
            }
            /* decoding the library's ids */
            int64_t wn = (int64_t)json_array_size(want);
            int32_t *wids = malloc(sizeof *wids * (size_t)(wn + 1));
            for (int64_t k = 0; k < wn; k++) wids[k] = (int32_t)json_integer_value(json_array_get(want, k));
            char *dec = NULL;
            json_t *wd = json_array_get(json_object_get(v, "decoded"), i);
            const char *wdec = json_is_null(wd) ? s : json_string_value(wd); /* null: the text itself */
            n_dec++;
            rc = mb_detokenize(t, wids, wn, &dec);
            if (rc == 0 && !strcmp(dec, wdec)) ok_dec++;
            else if (shown++ < 2) fprintf(stderr, "  %s text %zu: decoded \"%.80s\" want \"%.80s\"\n", name, i, dec ? dec : mb_errmsg(), wdec);
            free(dec);
            free(wids);
            /* the normalizer, then the pre-tokenizer on its output */
            json_t *wn_ = json_array_get(json_object_get(v, "normalized"), i);
            if (json_is_null(wn_)) wn_ = text; /* null: unchanged */
            char *norm = NULL;
            size_t nl = 0;
            n_norm++;
            rc = mb_tokenizer_normalize(t, s, len, &norm, &nl);
            if (rc == 0 && nl == json_string_length(wn_) && !memcmp(norm, json_string_value(wn_), nl)) ok_norm++;
            else if (shown++ < 2) fprintf(stderr, "  %s text %zu: normalized \"%.80s\" want \"%.80s\"\n", name, i, norm ? norm : mb_errmsg(), json_string_value(wn_));
            char *pre = NULL;
            size_t *ends = NULL;
            int64_t np = 0;
            json_t *wp = json_array_get(json_object_get(v, "pretokens"), i);
            n_pre++;
            rc = mb_tokenizer_pretokenize(t, json_string_value(wn_), json_string_length(wn_), &pre, &ends, &np);
            if (json_is_null(wp)) wp = json_pack("[O]", wn_); /* no pre-tokenizer: the text is one piece */
            else json_incref(wp);
            int okp = rc == 0 && (size_t)np == json_array_size(wp);
            for (int64_t k = 0; okp && k < np; k++) {
                json_t *w = json_array_get(wp, (size_t)k);
                size_t a = k ? ends[k - 1] : 0;
                okp = ends[k] - a == json_string_length(w) && !memcmp(pre + a, json_string_value(w), ends[k] - a);
            }
            /* the pieces of a tokenizer without pre-tokenizer are the whole (non-empty) text */
            if (!okp && rc == 0 && json_array_size(wp) == 1 && json_string_length(json_array_get(wp, 0)) == 0 && np == 0) okp = 1;
            if (okp) ok_pre++;
            else if (shown++ < 2) fprintf(stderr, "  %s text %zu: %lld pre-tokens, want %zu (first \"%.40s\")\n", name, i, (long long)np, json_array_size(wp), pre ? pre : "");
            json_decref(wp);
            free(pre);
            free(ends);
            free(norm);
            free(ids);
        }
        /* add_special_tokens = True on text 0: the post-processor's BOS / EOS */
        json_t *t0 = json_array_get(texts, 0);
        int32_t *ids = NULL;
        int64_t n = 0, cap = 0;
        n_ids++;
        if (mb_tokenize(t, json_string_value(t0), json_string_length(t0), 1, 0, &ids, &n, &cap) == 0 && same_ids(ids, n, json_object_get(v, "ids_special"))) ok_ids++;
        else fprintf(stderr, "  %s: ids with special tokens differ (%lld ids)\n", name, (long long)n);
        free(ids);
    }
    fprintf(stderr, "  %d tokenizer variants: ids %d/%d, decode %d/%d, normalize %d/%d, pre-tokenize %d/%d equal to tokenizers %s\n", n_var, ok_ids, n_ids,
            ok_dec, n_dec, ok_norm, n_norm, ok_pre, n_pre, json_string_value(json_object_get(root, "tokenizers_version")));
    CHECK(n_var >= 60);
    CHECK_EQ(ok_ids, n_ids);
    CHECK_EQ(ok_dec, n_dec);
    CHECK_EQ(ok_norm, n_norm);
    CHECK_EQ(ok_pre, n_pre);
}

/* FNV-1a 64, as make_goldens.py */
static uint64_t fnv(const void *p, size_t n, uint64_t h) {
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) { h ^= b[i]; h *= 0x100000001b3ull; }
    return h;
}

static int put_cp(uint32_t cp, char *o) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xc0 | (cp >> 6)); o[1] = (char)(0x80 | (cp & 0x3f)); return 2; }
    if (cp < 0x10000) { o[0] = (char)(0xe0 | (cp >> 12)); o[1] = (char)(0x80 | ((cp >> 6) & 0x3f)); o[2] = (char)(0x80 | (cp & 0x3f)); return 3; }
    o[0] = (char)(0xf0 | (cp >> 18)); o[1] = (char)(0x80 | ((cp >> 12) & 0x3f)); o[2] = (char)(0x80 | ((cp >> 6) & 0x3f)); o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Every code point of planes 0-3 and 14 through each Unicode-dependent normalizer and character class,
 * against the library (and Unicode 15.0 where the library's tables are older: the listed exceptions). */
static void test_unicode_classes(void) {
    json_error_t err;
    json_t *root = json_load_file(TESTDATA "/unicode.json", 0, &err);
    CHECK_MSG(root != NULL, TESTDATA "/unicode.json: %s", err.text);
    if (!root) return;
    json_t *checks = json_object_get(root, "checks"), *planes = json_object_get(root, "planes");
    int64_t block = json_integer_value(json_object_get(root, "block"));
    const char *name;
    json_t *c;
    int bad_blocks = 0, n_blocks = 0, n_exc = 0;
    json_object_foreach(checks, name, c) {
        int is_pre = !strcmp(name, "Digits") || !strcmp(name, "Punctuation") || !strcmp(name, "Whitespace") || !strcmp(name, "WhitespaceSplit");
        char j[512];
        const char *step = !strcmp(name, "Digits") ? "{\"type\": \"Digits\", \"individual_digits\": true}"
                           : !strcmp(name, "BertNormalizer") ? "{\"type\": \"BertNormalizer\", \"clean_text\": true, \"handle_chinese_chars\": true, \"strip_accents\": null, \"lowercase\": true}"
                           : NULL;
        char st[200];
        if (!step) { snprintf(st, sizeof st, "{\"type\": \"%s\"}", name); step = st; }
        snprintf(j, sizeof j, "{\"%s\": %s, " TINY_MODEL "}", is_pre ? "pre_tokenizer" : "normalizer", step);
        struct mb_tokenizer *t = NULL;
        CHECK_MSG(mb_tokenizer_parse(name, j, strlen(j), NULL, &t) == 0, "%s: %s", name, mb_errmsg());
        if (!t) continue;
        json_t *hashes = json_object_get(c, "hashes");
        n_exc += (int)json_array_size(json_object_get(c, "exceptions"));
        for (size_t pi = 0; pi < json_array_size(planes); pi++) {
            uint32_t lo = (uint32_t)json_integer_value(json_array_get(json_array_get(planes, pi), 0));
            uint32_t hi = (uint32_t)json_integer_value(json_array_get(json_array_get(planes, pi), 1));
            for (uint32_t b0 = lo; b0 < hi; b0 += (uint32_t)block) {
                uint64_t h = 0xcbf29ce484222325ull;
                for (uint32_t cp = b0; cp < b0 + block; cp++) {
                    if (cp >= 0xd800 && cp <= 0xdfff) continue;
                    char in[8], *out = NULL;
                    int l = 0;
                    if (is_pre) in[l++] = 'a';
                    l += put_cp(cp, in + l);
                    if (is_pre) in[l++] = 'a';
                    if (!is_pre) {
                        size_t on = 0;
                        if (mb_tokenizer_normalize(t, in, (size_t)l, &out, &on) == 0) h = fnv(out, on, h);
                    } else {
                        int64_t np = 0;
                        size_t *ends = NULL;
                        if (mb_tokenizer_pretokenize(t, in, (size_t)l, &out, &ends, &np) == 0) {
                            for (int64_t k = 0; k < np; k++) {
                                if (k) h = fnv("|", 1, h);
                                size_t a = k ? ends[k - 1] : 0;
                                h = fnv(out + a, ends[k] - a, h);
                            }
                        }
                        free(ends);
                    }
                    free(out);
                    h = fnv("\x01", 1, h);
                }
                char key[16], hex[20];
                snprintf(key, sizeof key, "%x", b0);
                snprintf(hex, sizeof hex, "%016llx", (unsigned long long)h);
                const char *want = json_string_value(json_object_get(hashes, key));
                n_blocks++;
                if (!want || strcmp(want, hex)) {
                    if (bad_blocks++ < 10) fprintf(stderr, "  %s: code points U+%04X..U+%04X differ\n", name, b0, b0 + (uint32_t)block - 1);
                }
            }
        }
        mb_tokenizer_free(t);
    }
    fprintf(stderr, "  %d blocks of code points checked, %d differ; %d code points follow Unicode 15.0 where the library's tables are older\n", n_blocks, bad_blocks, n_exc);
    CHECK(n_blocks > 700);
    CHECK_EQ(bad_blocks, 0);
    json_decref(root);
}

/* Streaming: a text read in small pieces (cut after "X\nY") gives the ids of the whole text, for every
 * golden variant (those that cannot be cut are read whole; the common families must be cut). */
static void test_stream_cuts(void) {
    json_t *root = golden_variants();
    if (!root) return;
    json_t *texts = json_object_get(root, "texts"), *vars = json_object_get(root, "variants");
    char p[512];
    snprintf(p, sizeof p, "%s/stream.txt", tmpdir);
    FILE *f = fopen(p, "w");
    for (int rep = 0; rep < 3; rep++)
        for (size_t i = 0; i < json_array_size(texts); i++) {
            const char *s = json_string_value(json_array_get(texts, i));
            fprintf(f, "%s%s\nX%zu.\n", rep ? "Next " : "", s, i);
        }
    fclose(f);
    char *text;
    size_t len;
    CHECK_EQ(mb_read_file(p, &text, &len, 0), 0);
    size_t saved = mb__tokenize_chunk;
    mb__tokenize_chunk = 200;
    int n_stream = 0, n_var = 0, bad = 0;
    const char *must[] = {"llama3-style", "qwen2-style", "smollm-digits", "smollm-split", "neox-style", "mistral-metaspace", "gemma-style",
                          "kjv-metaspace-never", "tiny-nfkc-lower", "tiny-whitespace"};
    for (size_t vi = 0; vi < json_array_size(vars); vi++) {
        json_t *v = json_array_get(vars, vi);
        const char *name = json_string_value(json_object_get(v, "name"));
        struct mb_tokenizer *t = vi < g_ntok ? g_tok[vi] : NULL;
        if (!t) continue;
        n_var++;
        int st = mb__tokenizer_streamable(t);
        n_stream += st;
        for (size_t k = 0; k < sizeof must / sizeof *must; k++) CHECK_MSG(st || strcmp(name, must[k]), "%s is not streamed", name);
        int32_t *a = NULL, *b = NULL;
        int64_t na = 0, nb = 0, cap = 0;
        int ra = mb_tokenize_file(t, p, 0, &a, &na), rb = mb_tokenize(t, text, len, 0, 0, &b, &nb, &cap);
        if (ra || rb || na != nb || memcmp(a, b, (size_t)na * sizeof *a)) {
            bad++;
            int64_t k = 0;
            while (k < na && k < nb && a[k] == b[k]) k++;
            fprintf(stderr, "  %s: streamed %lld ids, whole %lld (first difference at %lld)\n", name, (long long)na, (long long)nb, (long long)k);
        }
        free(a);
        free(b);
    }
    mb__tokenize_chunk = saved;
    fprintf(stderr, "  %d of %d variants read in pieces of 200 bytes, all equal to the whole text: %s\n", n_stream, n_var, bad ? "no" : "yes");
    CHECK_EQ(bad, 0);
    free(text);
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
    RUN(test_cli_bad_tokenizer);
    RUN(test_regex_limit);
    RUN(test_goldens);
    RUN(test_unicode_classes);
    RUN(test_stream_cuts);
    golden_free();
    RUN(test_datasets);
    RUN(test_calib_rows);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd)) {}
    TEST_MAIN_END();
}
