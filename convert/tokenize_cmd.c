/* convert/tokenize_cmd.c: `mixbit tokenize`: text -> ids, or ids -> text with --decode. */
#include <stdlib.h>
#include <string.h>

#include "../formats/formats.h"
#include "convert.h"

static int parse_ids(const char *s, int32_t **ids, int64_t *n) {
    int64_t cap = 0;
    *ids = NULL;
    *n = 0;
    while (*s) {
        while (*s && (*s == ' ' || *s == ',' || *s == '\n' || *s == '\t' || *s == '[' || *s == ']' || *s == '\r')) s++;
        if (!*s) break;
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 0 || v > INT32_MAX) { free(*ids); *ids = NULL; return mb_fail(MB_EINVAL, "--decode: \"%.20s\" is not a token id", s); }
        if (*n == cap) {
            cap = cap ? cap * 2 : 256;
            int32_t *ni = realloc(*ids, cap * sizeof *ni);
            if (!ni) { free(*ids); *ids = NULL; return mb_fail(MB_ENOMEM, "out of memory"); }
            *ids = ni;
        }
        (*ids)[(*n)++] = (int32_t)v;
        s = end;
    }
    return 0;
}

int mb_tokenize_cmd(const struct mb_tokenize_params *p) {
    if (!!p->text == !!p->file) return mb_fail(MB_EUSAGE, "give exactly one of --text and --file");
    struct mb_tokenizer *t;
    int rc = mb_tokenizer_load(p->tokenizer, &t);
    if (rc) return rc;
    int32_t *ids = NULL;
    int64_t n = 0, cap = 0;
    if (p->decode) {
        char *src = NULL;
        if (p->file) { size_t len; rc = mb_read_file(p->file, &src, &len, 1u << 30); }
        if (!rc) rc = parse_ids(p->file ? src : p->text, &ids, &n);
        free(src);
        for (int64_t i = 0; !rc && i < n; i++)
            if (ids[i] >= mb_tokenizer_vocab_size(t)) rc = mb_fail(MB_EINVAL, "--decode: id %d is outside the vocabulary (%lld)", ids[i], (long long)mb_tokenizer_vocab_size(t));
        char *text = NULL;
        if (!rc) rc = mb_detokenize(t, ids, n, &text);
        if (!rc) { fputs(text, stdout); fputc('\n', stdout); }
        free(text);
        free(ids);
        mb_tokenizer_free(t);
        return rc;
    }
    double t0 = mb_now();
    size_t bytes = 0;
    if (p->file) {
        if (p->literal) rc = mb_fail(MB_EUSAGE, "--literal applies to --text only");
        else rc = mb_tokenize_file(t, p->file, p->bos, &ids, &n);
    } else {
        bytes = strlen(p->text);
        if (p->bos && mb_tokenizer_bos(t) >= 0) {
            ids = malloc(sizeof *ids * 16);
            if (!ids) rc = mb_fail(MB_ENOMEM, "out of memory");
            else { ids[0] = mb_tokenizer_bos(t); n = 1; cap = 16; }
        }
        if (!rc) rc = mb_tokenize(t, p->text, bytes, 0, p->literal, &ids, &n, &cap);
    }
    if (!rc) {
        double el = mb_now() - t0;
        mb_debug("%lld ids in %.3f s", (long long)n, el);
        if (p->count && !p->json) printf("%lld\n", (long long)n);
        else if (p->json) {
            fputs("{\"ids\": [", stdout);
            if (!p->count) for (int64_t i = 0; i < n; i++) printf(i ? ", %d" : "%d", ids[i]);
            printf("], \"count\": %lld}\n", (long long)n);
        } else {
            for (int64_t i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
            printf("\n");
        }
    }
    free(ids);
    mb_tokenizer_free(t);
    return rc;
}
