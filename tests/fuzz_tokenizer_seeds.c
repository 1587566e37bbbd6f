/* tests/fuzz_tokenizer_seeds.c: the seed corpus of make fuzz-tokenizer, written to DIR: the tokenizers of
 * ../shared and every golden variant (tests/data/tokenizers/cases.json), each with its vocabulary cut to
 * the first ids (and the merges among them) so that one execution stays fast.
 * usage: fuzz_tokenizer_seeds DIR [SHARED] */
#include <jansson.h>
#include <stdio.h>
#include <string.h>

static json_t *shrink(json_t *j, int64_t keep) {
    json_t *model = json_object_get(j, "model"), *vocab = json_object_get(model, "vocab"), *merges = json_object_get(model, "merges");
    json_t *nv = json_object(), *nm = json_array();
    const char *k;
    json_t *v;
    json_object_foreach(vocab, k, v) if (json_integer_value(v) < keep) json_object_set(nv, k, v);
    for (size_t i = 0; i < json_array_size(merges); i++) {
        json_t *m = json_array_get(merges, i);
        char a[512], b[512], ab[1024];
        if (json_is_string(m)) {
            const char *s = json_string_value(m), *sp = strchr(s, ' ');
            if (!sp || (size_t)(sp - s) >= sizeof a || strlen(sp + 1) >= sizeof b) continue;
            snprintf(a, sizeof a, "%.*s", (int)(sp - s), s);
            snprintf(b, sizeof b, "%s", sp + 1);
        } else {
            snprintf(a, sizeof a, "%s", json_string_value(json_array_get(m, 0)) ? json_string_value(json_array_get(m, 0)) : "");
            snprintf(b, sizeof b, "%s", json_string_value(json_array_get(m, 1)) ? json_string_value(json_array_get(m, 1)) : "");
        }
        snprintf(ab, sizeof ab, "%s%s", a, b);
        if (json_object_get(nv, a) && json_object_get(nv, b) && json_object_get(nv, ab)) json_array_append(nm, m);
    }
    json_object_set_new(model, "vocab", nv);
    json_object_set_new(model, "merges", nm);
    json_t *added = json_object_get(j, "added_tokens"), *na = json_array();
    for (size_t i = 0; i < json_array_size(added) && json_array_size(na) < 8; i++) json_array_append(na, json_array_get(added, i));
    json_object_set_new(j, "added_tokens", na);
    return j;
}

static int n_out;
static void put(const char *dir, json_t *j) {
    char p[1024];
    snprintf(p, sizeof p, "%s/seed-%03d.json", dir, n_out++);
    json_dump_file(j, p, JSON_COMPACT);
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: fuzz_tokenizer_seeds DIR [SHARED]\n"); return 2; }
    const char *shared = argc > 2 ? argv[2] : "../shared";
    const char *bases[][2] = {{"llama2", "tokenizers/llama2/tokenizer.json"}, {"phi2", "tokenizers/phi2-bytelevel/tokenizer.json"},
                              {"kjv-llama", "models/kjv-llama/tokenizer.json"}, {"stories", "models/stories260K/tokenizer.json"},
                              {"tiny-bytelevel", NULL}};
    json_t *small = json_object();
    for (size_t i = 0; i < sizeof bases / sizeof *bases; i++) {
        char p[1024];
        if (bases[i][1]) snprintf(p, sizeof p, "%s/%s", shared, bases[i][1]);
        else snprintf(p, sizeof p, "tests/data/tokenizers/tiny-bytelevel.json");
        json_error_t err;
        json_t *j = json_load_file(p, 0, &err);
        if (!j) { fprintf(stderr, "%s: %s\n", p, err.text); return 1; }
        shrink(j, 300);
        put(argv[1], j);
        json_object_set_new(small, bases[i][0], j);
    }
    json_error_t err;
    json_t *cases = json_load_file("tests/data/tokenizers/cases.json", 0, &err);
    if (!cases) { fprintf(stderr, "cases.json: %s\n", err.text); return 1; }
    json_t *vars = json_object_get(cases, "variants");
    for (size_t i = 0; i < json_array_size(vars); i++) {
        json_t *v = json_array_get(vars, i), *patch = json_object_get(v, "patch");
        json_t *j = json_deep_copy(json_object_get(small, json_string_value(json_object_get(v, "base"))));
        const char *k;
        json_t *x;
        json_object_foreach(patch, k, x) {
            if (!strcmp(k, "model")) json_object_update(json_object_get(j, "model"), x);
            else if (!strcmp(k, "added_tokens_extra")) continue; /* ids past the cut vocabulary */
            else json_object_set(j, k, x);
        }
        put(argv[1], j);
        json_decref(j);
    }
    json_decref(cases);
    json_decref(small);
    fprintf(stderr, "fuzz_tokenizer_seeds: %d seeds in %s\n", n_out, argv[1]);
    return 0;
}
