/* quant/exl2_read.c: reading EXL2 layers back from a checkpoint (summaries for inspect). */
#include <stdlib.h>
#include <string.h>

#include "quant.h"

/* Summary of one layer from the one EXL2 structure validator (mb_exl2_from_set -> mb_exl2_validate): a
 * layer that fails any structural rule is an error naming the tensor, never a table of nonsense bits. */
static int summarize_one(const struct mb_st_set *st, const char *mod, int64_t K, int64_t N, struct mb_exl2_summary *s) {
    struct mb_exl2_layer L;
    int rc = mb_exl2_from_set(st, mod, N, K, &L);
    if (rc) return rc;
    int64_t rows_by_bits[9] = {0};
    for (int64_t g = 0; g < L.G; g++) { /* validated: widths in {2..8}, offsets increasing inside q_weight */
        int16_t b, off;
        memcpy(&b, (const char *)L.q_groups + 4 * g, 2);
        memcpy(&off, (const char *)L.q_groups + 4 * g + 2, 2);
        int64_t next = L.P;
        if (g + 1 < L.G) { int16_t nx; memcpy(&nx, (const char *)L.q_groups + 4 * (g + 1) + 2, 2); next = (uint16_t)nx; }
        rows_by_bits[b] += (next - (uint16_t)off) * 32 / b;
    }
    /* storage bits: the format doc's formula (q_weight, q_scale_max, q_groups, q_scale, q_invperm, bias) */
    double bits = (double)L.P * 32 * L.Np + L.G * 16.0 + L.G * 32.0 + (double)L.G * L.Np * 4 + L.Kp * 32.0 + (L.bias ? 16.0 * L.Np : 0);
    snprintf(s->name, sizeof s->name, "%s", mod);
    s->K = K;
    s->N = N;
    s->bpw = bits / ((double)K * N);
    size_t k = 0;
    s->bits_desc[0] = 0;
    int64_t tot = 0;
    for (int b = 8; b >= 2; b--) tot += rows_by_bits[b];
    for (int b = 8; b >= 2; b--)
        if (rows_by_bits[b] && k < sizeof s->bits_desc)
            k += snprintf(s->bits_desc + k, sizeof s->bits_desc - k, "%s%db %.0f%%", k ? ", " : "", b, 100.0 * rows_by_bits[b] / (tot ? tot : 1));
    return 0;
}

int mb_exl2_summarize(const struct mb_model *m, struct mb_exl2_summary **out, int *n) {
    *out = NULL;
    *n = 0;
    struct mb_exl2_summary *s = calloc(m->n_ex ? m->n_ex : 1, sizeof *s);
    if (!s) return mb_fail(MB_ENOMEM, "out of memory");
    int k = 0;
    for (int i = 0; i < m->n_ex; i++) {
        const struct mb_expect *e = &m->ex[i];
        if (e->kind != MB_T_LINEAR && e->kind != MB_T_HEAD) continue;
        char nm[192];
        snprintf(nm, sizeof nm, "%s.q_weight", e->name);
        if (!mb_st_find(m->st, nm)) continue;
        int rc = summarize_one(m->st, e->name, e->cols, e->rows, &s[k]);
        if (rc) { free(s); return rc; }
        k++;
    }
    *out = s;
    *n = k;
    return 0;
}
