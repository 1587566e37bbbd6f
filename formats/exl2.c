/* formats/exl2.c: EXL2 tensors of one quantized linear layer: packing, validation, unpacking (the CPU
 * reference every GPU kernel is tested against). Byte layout in formats.h (from
 * ../shared/docs/exl2-format.md). */
#include <stdlib.h>
#include <string.h>

#include "formats.h"

#define valid_bits mb_exl2_bits_ok

static int32_t rd32(const void *p, int64_t i) { return (int32_t)mb_exl2_u32(p, i); }
static int16_t rd16(const void *p, int64_t i) { return (int16_t)mb_exl2_i16(p, i); }
static uint16_t rdu16(const void *p, int64_t i) { return (uint16_t)mb_exl2_i16(p, i); }

int mb_exl2_validate(const struct mb_exl2_layer *L, const char *name) {
    if (L->N <= 0 || L->K <= 0) return mb_fail(MB_EFORMAT, "%s: empty layer", name);
    if (L->Np != (L->N + 31) / 32 * 32) return mb_fail(MB_EFORMAT, "%s: q_weight has %lld columns, expected %lld", name, (long long)L->Np, (long long)((L->N + 31) / 32 * 32));
    if (L->G <= 0) return mb_fail(MB_EFORMAT, "%s: no groups", name);
    if (L->Kp < L->K || L->Kp > (L->K + 31) / 32 * 32 || L->Kp > 65535)
        return mb_fail(MB_EFORMAT, "%s: q_invperm has %lld rows for %lld inputs", name, (long long)L->Kp, (long long)L->K);
    int64_t rows = 0, prev_off = -1;
    int prev_bits = 99;
    for (int64_t g = 0; g < L->G; g++) {
        int b = rd16(L->q_groups, 2 * g);
        int64_t off = (uint16_t)rd16(L->q_groups, 2 * g + 1);
        int64_t next = g + 1 < L->G ? (uint16_t)rd16(L->q_groups, 2 * g + 3) : L->P;
        if (!valid_bits(b)) return mb_fail(MB_EFORMAT, "%s: group %lld has %d bits (allowed: 2 3 4 5 6 8)", name, (long long)g, b);
        if (b > prev_bits) return mb_fail(MB_EFORMAT, "%s: group %lld: bit widths must not increase (%d after %d)", name, (long long)g, b, prev_bits);
        if (off <= prev_off || next <= off || next > L->P || (g == 0 && off != 0))
            return mb_fail(MB_EFORMAT, "%s: group %lld: packed rows [%lld, %lld) out of order or outside q_weight (%lld rows)", name, (long long)g, (long long)off, (long long)next, (long long)L->P);
        if (((next - off) * 32) % b) return mb_fail(MB_EFORMAT, "%s: group %lld: %lld packed words do not hold whole %d-bit values", name, (long long)g, (long long)(next - off), b);
        rows += (next - off) * 32 / b;
        prev_off = off;
        prev_bits = b;
    }
    if (rows != L->Kp) return mb_fail(MB_EFORMAT, "%s: groups hold %lld rows, q_invperm has %lld", name, (long long)rows, (long long)L->Kp);
    /* q_invperm must be a permutation */
    unsigned char *seen = calloc((size_t)L->Kp, 1);
    if (!seen) return mb_fail(MB_ENOMEM, "out of memory");
    for (int64_t i = 0; i < L->Kp; i++) {
        int32_t v = rd32(L->q_invperm, i);
        if (v < 0 || v >= L->Kp || seen[v]) { free(seen); return mb_fail(MB_EFORMAT, "%s: q_invperm is not a permutation (entry %lld = %d)", name, (long long)i, v); }
        seen[v] = 1;
    }
    free(seen);
    return 0;
}

/* value i (0-based, within the group whose packed words start at row `off`) of column n */
static inline uint32_t get_q(const void *qw, int64_t Np, int64_t off, int b, int64_t i, int64_t n) {
    int64_t bit = i * b, w = bit >> 5;
    int sh = (int)(bit & 31);
    uint32_t lo = (uint32_t)rd32(qw, (off + w) * Np + n);
    uint32_t v = lo >> sh;
    if (sh + b > 32) v |= (uint32_t)rd32(qw, (off + w + 1) * Np + n) << (32 - sh);
    return v & ((1u << b) - 1);
}

int mb_exl2_unpack_wt(const struct mb_exl2_layer *L, float *wt) {
    /* packed row j (permuted order) -> original row perm[j]; invperm[orig] = j */
    int64_t *perm = malloc((size_t)L->Kp * sizeof *perm);
    if (!perm) return mb_fail(MB_ENOMEM, "out of memory");
    for (int64_t i = 0; i < L->Kp; i++) perm[rd32(L->q_invperm, i)] = i;
    int64_t row0 = 0;
    for (int64_t g = 0; g < L->G; g++) {
        int b = rd16(L->q_groups, 2 * g);
        int64_t off = (uint16_t)rd16(L->q_groups, 2 * g + 1);
        int64_t next = g + 1 < L->G ? (uint16_t)rd16(L->q_groups, 2 * g + 3) : L->P;
        int64_t rows = (next - off) * 32 / b;
        uint16_t smax = rdu16(L->q_scale_max, g);
        int zero = 1 << (b - 1);
        for (int64_t n = 0; n < L->N; n++) {
            int code = (int)(((uint32_t)rd32(L->q_scale, g * (L->Np / 8) + n / 8) >> (4 * (n % 8))) & 15);
            float sc = mb_exl2_scale(code, smax);
            for (int64_t i = 0; i < rows; i++) {
                int64_t orig = perm[row0 + i];
                if (orig >= L->K) continue; /* padding row */
                wt[orig * L->N + n] = (float)((int)get_q(L->q_weight, L->Np, off, b, i, n) - zero) * sc;
            }
        }
        row0 += rows;
    }
    free(perm);
    return 0;
}

int mb_exl2_from_set(const struct mb_st_set *st, const char *module, int64_t N, int64_t K, struct mb_exl2_layer *L) {
    memset(L, 0, sizeof *L);
    char nm[192];
    const struct mb_tensor_info *qw, *qs, *qm, *qg, *qi, *bias;
    int rc;
#define GET(var, suffix, dt, nd)                                                                              \
    snprintf(nm, sizeof nm, "%s.%s", module, suffix);                                                        \
    if ((rc = mb_st_get(st, nm, &var))) return rc;                                                           \
    if (var->dtype != dt || var->ndim != nd) return mb_fail(MB_EFORMAT, "%s: %s: expected %s with %d dims", st->path, nm, mb_dtype_name(dt), nd);
    GET(qw, "q_weight", MB_I32, 2)
    GET(qs, "q_scale", MB_I32, 2)
    GET(qm, "q_scale_max", MB_F16, 1)
    GET(qg, "q_groups", MB_I16, 1)
    GET(qi, "q_invperm", MB_I32, 1)
#undef GET
    snprintf(nm, sizeof nm, "%s.bias", module);
    bias = mb_st_find(st, nm);
    L->K = K;
    L->N = N;
    L->Np = qw->shape[1];
    L->P = qw->shape[0];
    L->G = qm->shape[0];
    L->Kp = qi->shape[0];
    if (qs->shape[0] != L->G || qs->shape[1] * 8 != L->Np || qg->shape[0] != 2 * L->G)
        return mb_fail(MB_EFORMAT, "%s: %s: q_scale / q_groups shapes do not match %lld groups and %lld columns", st->path, module, (long long)L->G, (long long)L->Np);
    if (bias && (bias->dtype != MB_F16 || bias->numel != L->Np)) return mb_fail(MB_EFORMAT, "%s: %s.bias: expected F16 [%lld]", st->path, module, (long long)L->Np);
    L->q_weight = qw->data;
    L->q_scale = qs->data;
    L->q_scale_max = qm->data;
    L->q_groups = qg->data;
    L->q_invperm = qi->data;
    L->bias = bias ? bias->data : NULL;
    snprintf(nm, sizeof nm, "%s: %s", st->path, module);
    return mb_exl2_validate(L, nm);
}

int mb_exl2_load_dense(const struct mb_st_set *st, const char *module, int64_t N, int64_t K, float *w) {
    struct mb_exl2_layer L;
    int rc = mb_exl2_from_set(st, module, N, K, &L);
    if (rc) return rc;
    float *wt = malloc((size_t)(K * N) * sizeof *wt);
    if (!wt) return mb_fail(MB_ENOMEM, "out of memory");
    rc = mb_exl2_unpack_wt(&L, wt);
    if (!rc) /* W^T (K, N) -> W (N, K) */
        for (int64_t k = 0; k < K; k++)
            for (int64_t n = 0; n < N; n++) w[n * K + k] = wt[k * N + n];
    free(wt);
    return rc;
}

void mb_exl2_packed_free(struct mb_exl2_packed *p) {
    if (!p) return;
    free(p->q_weight);
    free(p->q_scale);
    free(p->q_scale_max);
    free(p->q_groups);
    free(p->q_invperm);
    memset(p, 0, sizeof *p);
}

int mb_exl2_pack(int64_t K, int64_t N, int G, const int *group_bits, const int64_t *group_rows, const uint8_t *q, const uint8_t *qs,
                 const uint16_t *scale_max, const int32_t *perm, struct mb_exl2_packed *out) {
    memset(out, 0, sizeof *out);
    int64_t Np = (N + 31) / 32 * 32, total = 0, P = 0;
    for (int g = 0; g < G; g++) {
        if (!valid_bits(group_bits[g])) return mb_fail(MB_EINVAL, "pack: group %d has %d bits", g, group_bits[g]);
        if (group_rows[g] <= 0 || group_rows[g] % 32) return mb_fail(MB_EINVAL, "pack: group %d has %lld rows (must be a positive multiple of 32)", g, (long long)group_rows[g]);
        if (g && group_bits[g] > group_bits[g - 1]) return mb_fail(MB_EINVAL, "pack: bit widths must not increase");
        total += group_rows[g];
        P += group_rows[g] * group_bits[g] / 32;
    }
    if (total != K) return mb_fail(MB_EINVAL, "pack: groups hold %lld rows, the layer has %lld", (long long)total, (long long)K);
    if (K > 65535 || P > 32767) return mb_fail(MB_EINVAL, "pack: %lld rows exceed the format's 16-bit row indices", (long long)K);
    out->K = K;
    out->N = N;
    out->Np = Np;
    out->G = G;
    out->P = P;
    out->q_weight = calloc((size_t)(P * Np), sizeof(int32_t));
    out->q_scale = calloc((size_t)(G * Np / 8), sizeof(int32_t));
    out->q_scale_max = malloc((size_t)G * sizeof(uint16_t));
    out->q_groups = malloc((size_t)G * 2 * sizeof(int16_t));
    out->q_invperm = malloc((size_t)K * sizeof(int32_t));
    if (!out->q_weight || !out->q_scale || !out->q_scale_max || !out->q_groups || !out->q_invperm) { mb_exl2_packed_free(out); return mb_fail(MB_ENOMEM, "out of memory"); }
    int64_t row0 = 0, off = 0;
    for (int g = 0; g < G; g++) {
        int b = group_bits[g];
        uint32_t zero = 1u << (b - 1), maxq = (1u << b) - 1;
        out->q_groups[2 * g] = (int16_t)b;
        out->q_groups[2 * g + 1] = (int16_t)off;
        out->q_scale_max[g] = scale_max[g];
        for (int64_t n = 0; n < Np; n++) {
            uint32_t code = 0;
            if (n < N) {
                if (qs[g * N + n] < 1 || qs[g * N + n] > 16) { mb_exl2_packed_free(out); return mb_fail(MB_EINVAL, "pack: sub-scale %d outside 1..16", qs[g * N + n]); }
                code = (uint32_t)(qs[g * N + n] - 1);
            }
            ((uint32_t *)out->q_scale)[g * (Np / 8) + n / 8] |= code << (4 * (n % 8));
            for (int64_t i = 0; i < group_rows[g]; i++) {
                uint32_t v = n < N ? q[(row0 + i) * N + n] : zero;
                if (v > maxq) { mb_exl2_packed_free(out); return mb_fail(MB_EINVAL, "pack: value %u does not fit %d bits", v, b); }
                int64_t bit = i * b, w = bit >> 5;
                int sh = (int)(bit & 31);
                uint32_t *lo = (uint32_t *)&out->q_weight[(off + w) * Np + n];
                *lo |= v << sh;
                if (sh + b > 32) ((uint32_t *)out->q_weight)[(off + w + 1) * Np + n] |= v >> (32 - sh);
            }
        }
        row0 += group_rows[g];
        off += group_rows[g] * b / 32;
    }
    for (int64_t j = 0; j < K; j++) {
        if (perm[j] < 0 || perm[j] >= K) { mb_exl2_packed_free(out); return mb_fail(MB_EINVAL, "pack: permutation entry %lld = %d out of range", (long long)j, perm[j]); }
        out->q_invperm[perm[j]] = (int32_t)j;
    }
    return 0;
}

void mb_exl2_packed_view(const struct mb_exl2_packed *p, struct mb_exl2_layer *L) {
    memset(L, 0, sizeof *L);
    L->K = p->K;
    L->Kp = p->K;
    L->N = p->N;
    L->Np = p->Np;
    L->G = p->G;
    L->P = p->P;
    L->q_weight = p->q_weight;
    L->q_scale = p->q_scale;
    L->q_scale_max = p->q_scale_max;
    L->q_groups = p->q_groups;
    L->q_invperm = p->q_invperm;
}
