/* quant/exl2_read.c: reading EXL2 layers back from a checkpoint (summaries for inspect). */
#include <stdlib.h>
#include <string.h>

#include "quant.h"

static int summarize_one(const struct mb_st_set *st, const char *mod, int64_t K, int64_t N, struct mb_exl2_summary *s) {
    char nm[192];
    const struct mb_tensor_info *qw, *qg, *bias;
    int rc;
    snprintf(nm, sizeof nm, "%s.q_weight", mod);
    if ((rc = mb_st_get(st, nm, &qw))) return rc;
    snprintf(nm, sizeof nm, "%s.q_groups", mod);
    if ((rc = mb_st_get(st, nm, &qg))) return rc;
    snprintf(nm, sizeof nm, "%s.bias", mod);
    bias = mb_st_find(st, nm);
    int64_t G = qg->shape[0] / 2, Np = qw->shape[1], packed_rows = qw->shape[0];
    const int16_t *g = qg->data;
    int64_t rows_by_bits[9] = {0};
    for (int64_t i = 0; i < G; i++) {
        int16_t b, off, next;
        memcpy(&b, g + 2 * i, 2);
        memcpy(&off, g + 2 * i + 1, 2);
        if (i + 1 < G) memcpy(&next, g + 2 * i + 3, 2); else next = (int16_t)packed_rows;
        if (b < 1 || b > 8 || next < off) return mb_fail(MB_EFORMAT, "%s: %s.q_groups: bad group %lld (bits %d, offset %d)", st->path, mod, (long long)i, b, off);
        rows_by_bits[b] += (int64_t)((uint16_t)next - (uint16_t)off) * 32 / b;
    }
    double bits = (double)packed_rows * 32 * Np + G * 16.0 + G * 32.0 + (double)G * Np * 4 + K * 32.0 + (bias ? 16.0 * Np : 0);
    snprintf(s->name, sizeof s->name, "%s", mod);
    s->K = K;
    s->N = N;
    s->bpw = bits / ((double)K * N);
    size_t k = 0;
    s->bits_desc[0] = 0;
    int64_t tot = 0;
    for (int b = 8; b >= 1; b--) tot += rows_by_bits[b];
    for (int b = 8; b >= 1; b--)
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
