/* tests/test_kernels.c: the CUDA EXL2 kernels against their CPU references on fresh random layers of
 * every bit width and mixed widths, shapes with N not a multiple of 128 and K = 14336. Outputs are poisoned
 * (0xFF bytes, NaN) before every run; NaN never passes. Without a GPU every GPU test reports skipped
 * (MB_REQUIRE_GPU=1 turns that into a failure). `--quick` runs a small subset (for compute-sanitizer). */
#include <unistd.h>

#include "../kernels/kernels.h"
#include "../quant/quant.h"
#include "harness.h"

/* Tolerances (relative Frobenius error against the CPU reference):
 *  dequant: bit-exact (the same fp16 rounding of an exact f32 product)
 *  gemm_small, f32 out: weights are exact in f32 on both sides; only the summation order differs (f32 on
 *    the GPU vs f64 on the CPU): about K * 2^-24 worst case, 1e-5 typical for K = 14336 -> 2e-5
 *  f16 out: one fp16 rounding of each output, 2^-11 relative -> 1e-3
 *  gemm_large: the weights are rounded to fp16 before cuBLAS (2^-12 relative each, random signs) -> 2e-3 */
#define TOL_SMALL_F32 2e-5
#define TOL_F16_OUT 1e-3
#define TOL_LARGE 2e-3

static int quick;

static int gpu_ok(void) {
    char name[256];
    if (mb_cuda_probe(name, sizeof name) == 0) return 1;
    return 0;
}

#define NEED_GPU()                                                                                  \
    do {                                                                                            \
        if (!gpu_ok()) {                                                                            \
            if (getenv("MB_REQUIRE_GPU")) { CHECK_MSG(0, "no usable GPU: %s", mb_errmsg()); return; } \
            SKIP("no usable GPU (%s)", mb_errmsg());                                                \
        }                                                                                           \
    } while (0)

static double rel_err(const float *a, const float *ref, int64_t n, int *nan) {
    double d = 0, r = 0;
    *nan = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(a[i])) { (*nan)++; continue; }
        d += ((double)a[i] - ref[i]) * ((double)a[i] - ref[i]);
        r += (double)ref[i] * ref[i];
    }
    return r > 0 ? sqrt(d / r) : sqrt(d);
}

/* CPU-only: the references agree with the unpacker */
static void test_references(void) {
    struct mb_exl2_packed pk;
    CHECK_EQ(mb_exl2_random(256, 72, "0.05:8b_32g/0.1:4b_128g/0.85:3b_128g", 5, &pk), 0);
    struct mb_exl2_layer L;
    mb_exl2_packed_view(&pk, &L);
    float *wt = malloc(256 * 72 * sizeof *wt), *y = malloc(3 * 72 * sizeof *y);
    uint16_t *h = malloc(256 * 72 * 2), *x = malloc(3 * 256 * 2);
    CHECK_EQ(mb_exl2_unpack_wt(&L, wt), 0);
    CHECK_EQ(mb_exl2_ref_dequant_f16(&L, h), 0);
    int bad = 0;
    for (int i = 0; i < 256 * 72; i++) bad += h[i] != mb_f32_to_f16(wt[i]);
    CHECK_EQ(bad, 0);
    struct mb_rng g = {9};
    for (int i = 0; i < 3 * 256; i++) x[i] = mb_f32_to_f16(mb_rng_normal(&g));
    CHECK_EQ(mb_exl2_ref_gemm(&L, x, 3, y), 0);
    double md = 0;
    for (int m = 0; m < 3; m++)
        for (int n = 0; n < 72; n++) {
            double s = 0;
            for (int k = 0; k < 256; k++) s += (double)mb_f16_to_f32(x[m * 256 + k]) * wt[k * 72 + n];
            if (fabs(s - y[m * 72 + n]) > md) md = fabs(s - y[m * 72 + n]);
        }
    CHECK(md < 1e-6);
    free(wt); free(y); free(h); free(x);
    mb_exl2_packed_free(&pk);
}

/* without a GPU the entries fail cleanly */
static void test_no_gpu_errors(void) {
    if (gpu_ok()) SKIP("a GPU is present");
    struct mb_exl2_packed pk;
    CHECK_EQ(mb_exl2_random(64, 32, "1:4b_32g", 1, &pk), 0);
    struct mb_exl2_layer L;
    mb_exl2_packed_view(&pk, &L);
    struct mb_exl2_dev *d = (struct mb_exl2_dev *)1;
    CHECK_EQ(mb_exl2_dev_upload(&L, &d), MB_ENOCUDA);
    CHECK(d == NULL);
    CHECK(strstr(mb_errmsg(), "CUDA") != NULL);
    void *p = (void *)1;
    CHECK_EQ(mb_cuda_malloc(&p, 16), MB_ENOCUDA);
    mb_exl2_packed_free(&pk);
}

struct shape { int64_t K, N; };

static void run_case(int64_t K, int64_t N, const char *setting, uint64_t seed) {
    struct mb_exl2_packed pk;
    CHECK_EQ(mb_exl2_random(K, N, setting, seed, &pk), 0);
    struct mb_exl2_layer L;
    mb_exl2_packed_view(&pk, &L);
    struct mb_exl2_dev *d = NULL;
    int rc = mb_exl2_dev_upload(&L, &d);
    CHECK_MSG(rc == 0, "%s", mb_errmsg());
    if (rc) { mb_exl2_packed_free(&pk); return; }
    const int64_t batches[] = {1, 3, 8, 32, 33, 128};
    const int nb = quick ? 3 : 6;
    int64_t maxM = 128;
    uint16_t *x = malloc(maxM * K * 2), *wt_ref = malloc(K * N * 2), *wt_gpu = malloc(K * N * 2), *yh = malloc(maxM * N * 2);
    float *y = malloc(maxM * N * 4), *yref = malloc(maxM * N * 4), *y2 = malloc(maxM * N * 4), *yf = malloc(maxM * N * 4);
    void *x_d = NULL, *y_d = NULL, *w_d = NULL;
    struct mb_rng g = {seed * 31 + 7};
    for (int64_t i = 0; i < maxM * K; i++) x[i] = mb_f32_to_f16(mb_rng_normal(&g));
    CHECK_EQ(mb_cuda_malloc(&x_d, maxM * K * 2), 0);
    CHECK_EQ(mb_cuda_malloc(&y_d, maxM * N * 4), 0);
    CHECK_EQ(mb_cuda_malloc(&w_d, K * N * 2), 0);
    CHECK_EQ(mb_cuda_h2d(x_d, x, maxM * K * 2), 0);
    /* dequant: bit-exact */
    CHECK_EQ(mb_exl2_ref_dequant_f16(&L, wt_ref), 0);
    mb_cuda_memset(w_d, 0xff, K * N * 2);
    CHECK_EQ(mb_exl2_dev_dequant(d, w_d, NULL), 0);
    CHECK_EQ(mb_cuda_sync(), 0);
    CHECK_EQ(mb_cuda_d2h(wt_gpu, w_d, K * N * 2), 0);
    int64_t diff = 0;
    for (int64_t i = 0; i < K * N; i++) diff += wt_gpu[i] != wt_ref[i];
    CHECK_MSG(diff == 0, "%s K %lld N %lld: dequant differs in %lld elements", setting, (long long)K, (long long)N, (long long)diff);
    CHECK_EQ(mb_exl2_ref_gemm(&L, x, maxM, yref), 0);
    for (int bi = 0; bi < nb; bi++) {
        int64_t M = batches[bi];
        for (int f32 = 1; f32 >= 0; f32--) {
            mb_cuda_memset(y_d, 0xff, M * N * 4);
            rc = mb_exl2_dev_gemm(d, x_d, M, y_d, f32, NULL);
            CHECK_MSG(rc == 0, "%s", mb_errmsg());
            CHECK_EQ(mb_cuda_sync(), 0);
            if (f32) CHECK_EQ(mb_cuda_d2h(y, y_d, M * N * 4), 0);
            else {
                CHECK_EQ(mb_cuda_d2h(yh, y_d, M * N * 2), 0);
                for (int64_t i = 0; i < M * N; i++) y[i] = mb_f16_to_f32(yh[i]);
            }
            int nan;
            double e = rel_err(y, yref, M * N, &nan);
            double tol = M > 32 ? TOL_LARGE : f32 ? TOL_SMALL_F32 : TOL_F16_OUT;
            CHECK_MSG(nan == 0 && e <= tol, "%s K %lld N %lld M %lld %s: rel err %.3g (tol %.1g), %d NaN", setting, (long long)K, (long long)N, (long long)M,
                      f32 ? "f32" : "f16", e, tol, nan);
            if (f32) memcpy(yf, y, M * N * 4);
        }
        /* determinism: the same call twice gives the same bits */
        mb_cuda_memset(y_d, 0xff, M * N * 4);
        CHECK_EQ(mb_exl2_dev_gemm(d, x_d, M, y_d, 1, NULL), 0);
        CHECK_EQ(mb_cuda_sync(), 0);
        CHECK_EQ(mb_cuda_d2h(y2, y_d, M * N * 4), 0);
        CHECK_MSG(memcmp(y2, yf, M * N * 4) == 0, "%s M %lld: results differ between runs", setting, (long long)M);
    }
    mb_cuda_free(x_d);
    mb_cuda_free(y_d);
    mb_cuda_free(w_d);
    free(x); free(wt_ref); free(wt_gpu); free(yh); free(y); free(yref); free(y2); free(yf);
    mb_exl2_dev_free(d);
    mb_exl2_packed_free(&pk);
}

static void test_gpu_every_width(void) {
    NEED_GPU();
    const char *settings[] = {"1:2b_32g", "1:3b_32g", "1:4b_128g", "1:5b_64g", "1:6b_32g", "1:8b_128g"};
    for (int i = 0; i < (quick ? 2 : 6); i++) run_case(256, 200, settings[i], 100 + i);
}

static void test_gpu_mixed(void) {
    NEED_GPU();
    const char *settings[] = {"0.05:8b_32g/0.1:4b_128g/0.85:3b_128g", "0.1:6b_32g/0.9:5b_32g", "0.3:4b_32g/0.7:2b_32g", "0.05:6b_32g/0.2:3b_64g/0.75:2b_64g"};
    const struct shape shapes[] = {{512, 1000}, {14336, 96}, {4096, 4096}, {1024, 130}};
    for (int i = 0; i < (quick ? 1 : 4); i++) run_case(shapes[i].K, shapes[i].N, settings[i], 200 + i);
}

int main(int argc, char **argv) {
    quick = argc > 1 && !strcmp(argv[1], "--quick");
    RUN(test_references);
    RUN(test_no_gpu_errors);
    RUN(test_gpu_every_width);
    RUN(test_gpu_mixed);
    TEST_MAIN_END();
}
