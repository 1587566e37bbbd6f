/* bench/bench_alloc.c: the allocators on a saved measurement.json.
 *   bench_alloc MODEL_DIR MEASUREMENT_JSON BPW [BPW ...]
 * Reads total_bits and accuracy of every option of every module, sets the budget to bpw x the model's
 * decoder linear weights, and prints the summed error (1 - accuracy) and bpw chosen by the dynamic program
 * (mb_alloc_solve) and by simulated annealing (mb_alloc_anneal, 200,000 moves, 5 seeds: best and median). */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../quant/quant.h"

static int cmp_d(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: bench_alloc MODEL_DIR MEASUREMENT_JSON BPW [BPW ...]\n"); return 2; }
    struct mb_model *m;
    if (mb_model_open(argv[1], &m)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
    int64_t numel = 0;
    for (int i = 0; i < m->n_ex; i++) if (m->ex[i].kind == MB_T_LINEAR) numel += m->ex[i].rows * m->ex[i].cols;
    json_error_t jerr;
    json_t *root = json_load_file(argv[2], 0, &jerr);
    json_t *meas = root ? json_object_get(root, "measurement") : NULL;
    if (!meas) { fprintf(stderr, "%s: no measurement\n", argv[2]); return 1; }
    int ns = (int)(2 * m->cfg.n_layers);
    struct mb_alloc_slot *s = calloc(ns, sizeof *s);
    for (int k = 0; k < ns; k++) {
        char key[128];
        snprintf(key, sizeof key, "model.layers.%d.%s", k / 2, k % 2 == 0 ? "self_attn" : m->cfg.n_experts ? "block_sparse_moe" : "mlp");
        json_t *arr = json_object_get(meas, key);
        int n = (int)json_array_size(arr);
        if (n == 0) { fprintf(stderr, "%s: no %s\n", argv[2], key); return 1; }
        int64_t *bits = malloc(n * sizeof *bits);
        double *err = malloc(n * sizeof *err);
        for (int o = 0; o < n; o++) {
            json_t *e = json_array_get(arr, o);
            bits[o] = json_integer_value(json_object_get(e, "total_bits"));
            err[o] = 1.0 - json_number_value(json_object_get(e, "accuracy"));
        }
        s[k] = (struct mb_alloc_slot){n, bits, err};
    }
    int *c = malloc(ns * sizeof *c);
    for (int a = 3; a < argc; a++) {
        double bpw = atof(argv[a]);
        int64_t budget = (int64_t)(bpw * (double)numel), used;
        if (mb_alloc_solve(s, ns, budget, c)) { printf("bpw %.3f: %s\n", bpw, mb_errmsg()); continue; }
        double e = mb_alloc_eval(s, ns, c, &used);
        double se[5];
        int64_t sb = 0;
        for (int seed = 0; seed < 5; seed++) {
            mb_alloc_anneal(s, ns, budget, 100 + seed, 200000, c);
            se[seed] = mb_alloc_eval(s, ns, c, &sb);
        }
        qsort(se, 5, sizeof *se, cmp_d);
        printf("target %.3f bpw: dynamic program %.6f (%.4f bpw); simulated annealing best %.6f, median %.6f (5 seeds)\n", bpw, e,
               (double)used / numel, se[0], se[2]);
    }
    return 0;
}
