/* kernels/exl2_ref.c: CPU references of the EXL2 GPU kernels (always built). */
#include <stdlib.h>
#include <string.h>

#include "../formats/formats.h"
#include "kernels.h"

int mb_exl2_ref_dequant_f16(const struct mb_exl2_layer *L, uint16_t *wt) {
    float *f = malloc((size_t)(L->K * L->N) * sizeof *f);
    if (!f) return mb_fail(MB_ENOMEM, "out of memory");
    int rc = mb_exl2_unpack_wt(L, f);
    /* the product (q - z) * scale is exact in f32; the runtime rounds it to fp16 */
    for (int64_t i = 0; !rc && i < L->K * L->N; i++) wt[i] = mb_f32_to_f16(f[i]);
    free(f);
    return rc;
}

int mb_exl2_ref_gemm(const struct mb_exl2_layer *L, const uint16_t *x, int64_t M, float *y) {
    float *f = malloc((size_t)(L->K * L->N) * sizeof *f);
    double *acc = malloc((size_t)L->N * sizeof *acc);
    if (!f || !acc) { free(f); free(acc); return mb_fail(MB_ENOMEM, "out of memory"); }
    int rc = mb_exl2_unpack_wt(L, f);
    for (int64_t m = 0; !rc && m < M; m++) {
        for (int64_t n = 0; n < L->N; n++) acc[n] = 0;
        for (int64_t k = 0; k < L->K; k++) {
            double xv = mb_f16_to_f32(x[m * L->K + k]);
            if (xv == 0) continue;
            const float *row = f + k * L->N;
            for (int64_t n = 0; n < L->N; n++) acc[n] += xv * row[n];
        }
        for (int64_t n = 0; n < L->N; n++) y[m * L->N + n] = (float)acc[n];
    }
    free(f);
    free(acc);
    return rc;
}
