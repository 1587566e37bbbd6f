/* bench/bench_tokenizer.c: tokenizer throughput on one core.
 * usage: bench_tokenizer [TOKENIZER] [TEXT] [REPEATS]
 * defaults: ../shared/tokenizers/llama2 and ../shared/text/wikitext-2-raw-test.txt, 7 repeats.
 * Each repeat encodes the whole file in memory with a fresh tokenizer (cold word cache); prints the
 * median time and MB/s, and the id count (341,469 with BOS for the default pair). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../formats/formats.h"

static int cmp_d(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }

int main(int argc, char **argv) {
    const char *tp = argc > 1 ? argv[1] : "../shared/tokenizers/llama2";
    const char *xp = argc > 2 ? argv[2] : "../shared/text/wikitext-2-raw-test.txt";
    int reps = argc > 3 ? atoi(argv[3]) : 7;
    if (reps < 1 || reps > 100) reps = 7;
    char *text;
    size_t len;
    if (mb_read_file(xp, &text, &len, 0)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
    double t[100];
    int64_t n = 0;
    for (int r = 0; r < reps; r++) {
        struct mb_tokenizer *tok;
        if (mb_tokenizer_load(tp, &tok)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
        int32_t *ids = NULL;
        int64_t cap = 0;
        n = 0;
        double t0 = mb_now();
        if (mb_tokenize(tok, text, len, 1, 0, &ids, &n, &cap)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
        t[r] = mb_now() - t0;
        free(ids);
        mb_tokenizer_free(tok);
    }
    qsort(t, reps, sizeof *t, cmp_d);
    double med = t[reps / 2];
    printf("tokenizer %s\ntext %s (%zu bytes)\nids %lld (with BOS)\nmedian %.4f s over %d runs (min %.4f, max %.4f)\n%.1f MB/s\n",
           tp, xp, len, (long long)n, med, reps, t[0], t[reps - 1], len / med / 1e6);
    free(text);
    return 0;
}
