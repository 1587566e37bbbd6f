/* tests/fuzz_tokenizer.c: libFuzzer target for the tokenizer.json reader (make fuzz-tokenizer). Any input
 * must either load (and then encoding varied texts gives ids inside the vocabulary, which decode) or fail
 * with a format / unsupported / out-of-memory status. Encoding may fail only with MB_EINVAL (a character
 * without a token and no unk, a regex over its match limit). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "formats/formats.h"

static const char *TEXTS[] = {
    "Hello world, it's 2024-01-15: 3.14159 and 1,000,000!",
    " leading  and trailing  \n\nnew\tline\r\n",
    "caf\xc3\xa9 cafe\xcc\x81 \xef\xbc\xa1\xef\xbc\xa2 \xef\xac\x81 \xe4\xb8\xad\xe6\x96\x87 \xf0\x9f\x98\x80 \xc4\xb0stanbul \xce\xa3\xce\x91\xce\xa3",
    "<s>a</s><|endoftext|> <tag>x</tag>",
    "",
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct mb_tokenizer *t = NULL;
    int rc = mb_tokenizer_parse("fuzz", (const char *)data, size, NULL, &t);
    if (rc != 0) {
        if (t || (rc != MB_EFORMAT && rc != MB_EUNSUPPORTED && rc != MB_ENOMEM)) abort();
        return 0;
    }
    int64_t nv = mb_tokenizer_vocab_size(t);
    for (size_t k = 0; k < sizeof TEXTS / sizeof *TEXTS; k++) {
        int32_t *ids = NULL;
        int64_t n = 0, cap = 0;
        rc = mb_tokenize(t, TEXTS[k], strlen(TEXTS[k]), 1, 0, &ids, &n, &cap);
        if (rc != 0 && rc != MB_EINVAL && rc != MB_ENOMEM) abort();
        if (rc == 0) {
            for (int64_t i = 0; i < n; i++)
                if (ids[i] < 0 || ids[i] >= nv) abort();
            char *text = NULL;
            rc = mb_detokenize(t, ids, n, &text);
            if (rc != 0 && rc != MB_EINVAL && rc != MB_ENOMEM) abort();
            free(text);
        }
        free(ids);
        char *out = NULL;
        size_t on = 0, *ends = NULL;
        if (mb_tokenizer_normalize(t, TEXTS[k], strlen(TEXTS[k]), &out, &on) == 0 && strlen(out) > on) abort();
        free(out);
        if (mb_tokenizer_pretokenize(t, TEXTS[k], strlen(TEXTS[k]), &out, &ends, &n) == 0)
            for (int64_t i = 1; i < n; i++)
                if (ends[i] < ends[i - 1]) abort();
        free(out);
        free(ends);
    }
    mb_tokenizer_free(t);
    return 0;
}
