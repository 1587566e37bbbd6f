/* quant/settings.c: per-projection quantization settings, the option tables (same contents as the
 * reference converter's, exllamav2 conversion/qparams.py, written here in the notation of
 * ../shared/docs/conversion.md), group plans and exact storage cost. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"

/* rows: (q, k, v, o) */
const char *const mb_attn_table[MB_ATTN_OPTIONS][4] = {
    {"0.05:3b_64g/0.95:2b_64g", "0.05:3b_64g/0.95:2b_64g", "0.05:3b_64g/0.95:2b_64g", "0.05:3b_64g/0.95:2b_64g"},
    {"0.1:3b_64g/0.9:2b_64g", "0.1:3b_64g/0.9:2b_64g", "0.25:3b_64g/0.75:2b_64g", "0.1:3b_64g/0.9:2b_64g"},
    {"0.1:3b_64g/0.9:2b_64g", "0.1:3b_64g/0.9:2b_64g", "0.1:4b_128g/0.9:3b_128g", "0.1:3b_64g/0.9:2b_64g"},
    {"0.1:3b_64g/0.9:2b_64g", "0.1:3b_64g/0.9:2b_64g", "0.1:4b_128g/0.9:3b_128g", "0.1:4b_128g/0.9:3b_128g"},
    {"0.1:4b_128g/0.9:3b_128g", "0.1:4b_128g/0.9:3b_128g", "0.1:4b_128g/0.9:3b_128g", "0.1:4b_128g/0.9:3b_128g"},
    {"0.1:4b_128g/0.9:3b_128g", "0.1:4b_128g/0.9:3b_128g", "0.1:4b_64g/0.9:3b_64g", "0.1:4b_128g/0.9:3b_128g"},
    {"1:4b_128g", "1:4b_128g", "1:4b_128g", "1:4b_128g"},
    {"1:4b_128g", "1:4b_128g", "1:4b_64g", "1:4b_128g"},
    {"1:4b_64g", "1:4b_64g", "1:4b_32g", "1:4b_64g"},
    {"1:4b_32g", "1:4b_32g", "1:4b_32g", "1:4b_32g"},
    {"0.1:5b_128g/0.9:4b_128g", "0.1:5b_128g/0.9:4b_128g", "0.1:5b_64g/0.9:4b_64g", "0.1:5b_128g/0.9:4b_128g"},
    {"0.1:5b_64g/0.9:4b_64g", "0.1:5b_64g/0.9:4b_64g", "0.1:5b_32g/0.9:4b_32g", "0.1:5b_64g/0.9:4b_64g"},
    {"0.1:5b_64g/0.9:4b_64g", "0.1:5b_64g/0.9:4b_64g", "1:5b_64g", "0.1:5b_64g/0.9:4b_64g"},
    {"0.1:5b_32g/0.9:4b_32g", "0.1:5b_32g/0.9:4b_32g", "1:5b_32g", "0.1:5b_32g/0.9:4b_32g"},
    {"0.1:6b_128g/0.9:5b_128g", "0.1:6b_128g/0.9:5b_128g", "1:6b_128g", "0.1:6b_128g/0.9:5b_128g"},
    {"0.1:6b_32g/0.9:5b_32g", "0.1:6b_32g/0.9:5b_32g", "1:6b_32g", "0.1:6b_32g/0.9:5b_32g"},
    {"1:6b_128g", "1:6b_128g", "1:6b_128g", "1:6b_128g"},
    {"1:6b_32g", "1:6b_32g", "1:8b_32g", "1:6b_32g"},
    {"1:8b_128g", "1:8b_128g", "1:8b_128g", "1:8b_128g"},
};

/* rows: (gate, up, down) */
const char *const mb_mlp_table[MB_MLP_OPTIONS][3] = {
    {"0.05:3b_64g/0.95:2b_64g", "0.05:3b_64g/0.95:2b_64g", "0.05:6b_32g/0.2:3b_64g/0.75:2b_64g"},
    {"0.1:3b_64g/0.9:2b_64g", "0.25:3b_64g/0.75:2b_64g", "0.05:6b_32g/0.2:3b_64g/0.75:2b_64g"},
    {"0.1:3b_64g/0.9:2b_64g", "0.3:3b_64g/0.7:2b_64g", "0.05:5b_32g/0.95:3b_32g"},
    {"0.1:3b_64g/0.9:2b_64g", "0.3:3b_64g/0.7:2b_64g", "0.05:5b_32g/0.95:4b_32g"},
    {"0.1:4b_128g/0.9:3b_128g", "0.25:4b_128g/0.75:3b_128g", "0.05:8b_32g/0.1:4b_128g/0.85:3b_128g"},
    {"0.1:4b_32g/0.9:3b_32g", "0.25:4b_32g/0.75:3b_32g", "0.05:8b_32g/0.1:4b_32g/0.85:3b_32g"},
    {"0.1:4b_32g/0.9:3b_32g", "0.25:4b_32g/0.75:3b_32g", "0.05:8b_32g/0.95:4b_128g"},
    {"1:4b_128g", "1:4b_32g", "0.05:8b_32g/0.95:4b_128g"},
    {"1:4b_32g", "1:4b_32g", "0.05:8b_32g/0.95:4b_32g"},
    {"0.1:5b_128g/0.9:4b_128g", "0.25:5b_128g/0.75:4b_128g", "0.05:8b_32g/0.1:5b_128g/0.85:4b_128g"},
    {"0.1:5b_32g/0.9:4b_32g", "0.25:5b_32g/0.75:4b_32g", "0.05:8b_32g/0.1:5b_32g/0.85:4b_32g"},
    {"0.1:6b_128g/0.9:5b_128g", "0.25:6b_128g/0.75:5b_128g", "0.05:8b_32g/0.1:6b_128g/0.85:5b_128g"},
    {"0.1:6b_32g/0.9:5b_32g", "0.25:6b_32g/0.75:5b_32g", "0.05:8b_32g/0.1:6b_32g/0.85:5b_32g"},
    {"1:6b_128g", "1:6b_128g", "0.05:8b_32g/0.95:6b_128g"},
    {"0.1:8b_128g/0.9:6b_128g", "0.1:8b_128g/0.9:6b_128g", "0.15:8b_128g/0.85:6b_128g"},
    {"0.1:8b_128g/0.9:6b_128g", "0.1:8b_128g/0.9:6b_128g", "1:8b_128g"},
    {"1:8b_128g", "1:8b_128g", "1:8b_128g"},
};

const char *mb_head_option(int head_bits) {
    switch (head_bits) {
    case 2: return "0.3:4b_32g/0.7:2b_32g";
    case 3: return "0.15:4b_32g/0.85:3b_32g";
    case 4: return "0.15:6b_32g/0.85:4b_32g";
    case 5: return "0.15:6b_128g/0.85:5b_128g";
    case 6: return "0.15:8b_128g/0.85:6b_128g";
    case 8: return "1:8b_128g";
    default: return NULL;
    }
}

int mb_qsetting_parse(const char *s, struct mb_qsetting *q) {
    memset(q, 0, sizeof *q);
    q->scale_bits = 4;
    const char *p = s;
    while (*p) {
        if (q->n == MB_QS_MAX) return mb_fail(MB_EINVAL, "setting \"%s\": more than %d parts", s, MB_QS_MAX);
        char *end;
        double prop = strtod(p, &end);
        int b, g, used = 0;
        if (end == p || *end != ':' || sscanf(end + 1, "%db_%dg%n", &b, &g, &used) != 2)
            return mb_fail(MB_EINVAL, "setting \"%s\": expected parts like 0.1:4b_128g", s);
        if (!(prop > 0 && prop <= 1) || (b != 2 && b != 3 && b != 4 && b != 5 && b != 6 && b != 8) || g < 32 || g % 32)
            return mb_fail(MB_EINVAL, "setting \"%s\": bad part (share in (0,1], bits 2/3/4/5/6/8, group a multiple of 32)", s);
        if (q->n && b > q->bits[q->n - 1]) return mb_fail(MB_EINVAL, "setting \"%s\": bit widths must be in descending order", s);
        q->prop[q->n] = prop;
        q->bits[q->n] = b;
        q->gsize[q->n] = g;
        q->n++;
        p = end + 1 + used;
        if (*p == '/') p++;
        else if (*p) return mb_fail(MB_EINVAL, "setting \"%s\": unexpected \"%s\"", s, p);
    }
    if (q->n == 0) return mb_fail(MB_EINVAL, "empty setting");
    return 0;
}

void mb_qsetting_str(const struct mb_qsetting *q, char *buf, size_t n) {
    size_t k = 0;
    buf[0] = 0;
    for (int i = 0; i < q->n && k < n; i++) k += snprintf(buf + k, n - k, "%s%g:%db_%dg", i ? "/" : "", q->prop[i], q->bits[i], q->gsize[i]);
}

int mb_qsetting_groups(const struct mb_qsetting *q, int64_t K, int *G, int *bits, int64_t *rows) {
    int64_t remaining = K, left = K;
    int k = 0;
    for (int i = 0; i < q->n; i++) {
        double want = (double)K * q->prop[i];
        if (want > (double)remaining) want = (double)remaining;
        int64_t g = (int64_t)ceil(want / q->gsize[i] - 1e-9);
        if (g < 0) g = 0;
        remaining -= g * q->gsize[i];
        for (int64_t j = 0; j < g && left > 0; j++) {
            int64_t r = q->gsize[i] < left ? q->gsize[i] : left;
            bits[k] = q->bits[i];
            rows[k] = r;
            left -= r;
            k++;
        }
    }
    if (left > 0) return mb_fail(MB_EINVAL, "setting covers only %lld of %lld rows", (long long)(K - left), (long long)K);
    *G = k;
    return 0;
}

int64_t mb_qsetting_bits(const struct mb_qsetting *q, int64_t K, int64_t N, int bias) {
    int bits[4096];
    int64_t rows[4096];
    int G;
    int64_t Kp = (K + 31) / 32 * 32;
    if (Kp / 32 > 4096 || mb_qsetting_groups(q, Kp, &G, bits, rows)) return -1;
    int64_t total = 0, Np = (N + 31) / 32 * 32; /* bits actually stored: columns padded to 32 */
    for (int g = 0; g < G; g++) total += rows[g] * Np * bits[g];
    total += (int64_t)G * 16 + (int64_t)G * 32 + (int64_t)G * Np * q->scale_bits + Kp * 32;
    if (bias) total += 16 * Np;
    return total;
}

int mb_exl2_random(int64_t K, int64_t N, const char *setting, uint64_t seed, struct mb_exl2_packed *out) {
    struct mb_qsetting q;
    int rc = mb_qsetting_parse(setting, &q);
    if (rc) return rc;
    if (K % 32) return mb_fail(MB_EINVAL, "random layer: K %lld is not a multiple of 32", (long long)K);
    int G, *bits = malloc((size_t)(K / 32) * sizeof *bits);
    int64_t *rows = malloc((size_t)(K / 32) * sizeof *rows);
    uint8_t *qv = malloc((size_t)(K * N)), *qs = NULL;
    uint16_t *smax = NULL;
    int32_t *perm = malloc((size_t)K * sizeof *perm);
    if (!bits || !rows || !qv || !perm) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto out; }
    if ((rc = mb_qsetting_groups(&q, K, &G, bits, rows))) goto out;
    qs = malloc((size_t)(G * N));
    smax = malloc((size_t)G * sizeof *smax);
    if (!qs || !smax) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto out; }
    struct mb_rng g = {seed};
    int64_t r0 = 0;
    for (int gi = 0; gi < G; gi++) {
        for (int64_t r = r0; r < r0 + rows[gi]; r++)
            for (int64_t n = 0; n < N; n++) qv[r * N + n] = (uint8_t)(mb_rng_next(&g) % (1u << bits[gi]));
        for (int64_t n = 0; n < N; n++) qs[gi * N + n] = (uint8_t)(1 + mb_rng_next(&g) % 16);
        smax[gi] = mb_f32_to_f16(0.01f * (float)(1.0 + mb_rng_uniform(&g)));
        r0 += rows[gi];
    }
    for (int64_t i = 0; i < K; i++) perm[i] = (int32_t)i;
    for (int64_t i = K - 1; i > 0; i--) {
        int64_t j = (int64_t)(mb_rng_next(&g) % (uint64_t)(i + 1));
        int32_t t = perm[i]; perm[i] = perm[j]; perm[j] = t;
    }
    rc = mb_exl2_pack(K, N, G, bits, rows, qv, qs, smax, perm, out);
out:
    free(bits); free(rows); free(qv); free(qs); free(smax); free(perm);
    return rc;
}

/* ---- decoder modules ---- */
void mb_proj_shape(const struct mb_config *c, int p, int64_t *N, int64_t *K) {
    int64_t H = c->hidden, qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;
    switch (p) {
    case MB_P_Q: *N = qd; *K = H; break;
    case MB_P_K: case MB_P_V: *N = kvd; *K = H; break;
    case MB_P_O: *N = H; *K = qd; break;
    case MB_P_GATE: case MB_P_UP: *N = c->ffn; *K = H; break;
    default: *N = H; *K = c->ffn; break;
    }
}

void mb_module_name(const struct mb_config *c, int m, char *buf, size_t n) {
    snprintf(buf, n, "model.layers.%d.%s", m / 2, m % 2 == 0 ? "self_attn" : c->n_experts ? "block_sparse_moe" : "mlp");
}

void mb_linear_name(const struct mb_config *c, int layer, int p, int expert, char *buf, size_t n) {
    if (expert >= 0) snprintf(buf, n, "model.layers.%d.block_sparse_moe.experts.%d.%s", layer, expert, mb_proj_name(p, 1));
    else snprintf(buf, n, "model.layers.%d.%s", layer, mb_proj_name(p, c->n_experts > 0 && p >= MB_P_GATE));
}

int mb_module_table(const struct mb_config *c, int m, int extra, const char *uniform, struct mb_module_table *t) {
    memset(t, 0, sizeof *t);
    int attn = m % 2 == 0;
    t->nproj = attn ? 4 : 3;
    for (int i = 0; i < t->nproj; i++) t->proj[i] = attn ? MB_P_Q + i : MB_P_GATE + i;
    t->experts = !attn && c->n_experts ? c->n_experts : 1;
    if (uniform) {
        t->n = 1;
        for (int i = 0; i < t->nproj; i++) t->setting[0][i] = uniform;
    } else {
        int nref = attn ? MB_ATTN_OPTIONS : MB_MLP_OPTIONS;
        for (int r = 0; r < nref; r++)
            for (int i = 0; i < t->nproj; i++) t->setting[r][i] = attn ? mb_attn_table[r][i] : mb_mlp_table[r][i];
        t->n = nref;
        if (extra) {
            for (int i = 0; i < t->nproj; i++) t->setting[nref][i] = MB_EXTRA_SETTING;
            t->n++;
        }
    }
    for (int i = 0; i < t->nproj; i++) {
        int64_t N, K;
        mb_proj_shape(c, t->proj[i], &N, &K);
        t->f16[i] = K % 32 != 0;
    }
    for (int r = 0; r < t->n; r++) {
        int64_t total = 0;
        for (int i = 0; i < t->nproj; i++) {
            struct mb_qsetting q;
            int rc = mb_qsetting_parse(t->setting[r][i], &q);
            if (rc) return rc;
            int64_t N, K;
            mb_proj_shape(c, t->proj[i], &N, &K);
            int64_t b = t->f16[i] ? 16 * N * K : mb_qsetting_bits(&q, K, N, 0);
            if (b < 0) return mb_fail(MB_EINVAL, "setting %s does not fit a %lld x %lld layer", t->setting[r][i], (long long)N, (long long)K);
            total += (int64_t)t->experts * b;
        }
        t->bits[r] = total;
    }
    /* increasing cost, stable (insertion sort of at most 20 rows) */
    for (int r = 1; r < t->n; r++) {
        int64_t b = t->bits[r];
        const char *row[4];
        memcpy(row, t->setting[r], sizeof row);
        int j = r - 1;
        for (; j >= 0 && t->bits[j] > b; j--) {
            t->bits[j + 1] = t->bits[j];
            memcpy(t->setting[j + 1], t->setting[j], sizeof row);
        }
        t->bits[j + 1] = b;
        memcpy(t->setting[j + 1], row, sizeof row);
    }
    return 0;
}
