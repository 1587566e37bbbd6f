/* kernels/exl2_ref.c: CPU references of the EXL2 GPU kernels (always built), on the CPU table's dequant. */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

static struct mb_weight exl2_view(const struct mb_exl2_layer *L) {
    struct mb_weight w;
    memset(&w, 0, sizeof w);
    w.type = MB_W_EXL2;
    w.n = L->N;
    w.k = L->K;
    w.q = *L;
    w.name = "exl2 reference";
    return w;
}

/* W [N, K] f32, caller frees */
static int dense(const struct mb_exl2_layer *L, float **out) {
    *out = malloc((size_t)(L->K * L->N) * sizeof **out);
    if (!*out) return mb_fail(MB_ENOMEM, "out of memory");
    struct mb_weight w = exl2_view(L);
    int rc = mb_weight_rows_f32(&w, 0, L->N, *out);
    if (rc) { free(*out); *out = NULL; }
    return rc;
}

int mb_exl2_ref_dequant_f16(const struct mb_exl2_layer *L, uint16_t *wt) {
    float *f;
    int rc = dense(L, &f);
    if (rc) return rc;
    /* the product (q - z) * scale is exact in f32; the runtime rounds it to fp16 */
    for (int64_t k = 0; k < L->K; k++)
        for (int64_t n = 0; n < L->N; n++) wt[k * L->N + n] = mb_f32_to_f16(f[n * L->K + k]);
    free(f);
    return 0;
}

int mb_exl2_ref_gemm(const struct mb_exl2_layer *L, const uint16_t *x, int64_t M, float *y) {
    float *f;
    int rc = dense(L, &f);
    if (rc) return rc;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < L->N; n++) {
            const float *row = f + n * L->K;
            double acc = 0;
            for (int64_t k = 0; k < L->K; k++) acc += (double)mb_f16_to_f32(x[m * L->K + k]) * row[k];
            y[m * L->N + n] = (float)acc;
        }
    free(f);
    return 0;
}
