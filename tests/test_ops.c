/* tests/test_ops.c: the operations tables. CPU: products with weights in every stored dtype (BF16 / F16 tiles and
 * EXL2 views give the same bits as the f32 product), the MoE, check and reduction ops against plain loops.
 * CUDA: every op of the CUDA table against the CPU table on fresh random inputs, and GPTQ on the GPU against
 * the CPU GPTQ; without a GPU these report skipped (MB_REQUIRE_GPU=1 turns that into a failure).
 *
 * Tolerances, GPU vs CPU (relative Frobenius error; NaN never passes):
 *   TOL_F32     1e-5  f32 products and attention: same operations, another summation order (K up to 4096:
 *                     about sqrt(K) * 2^-24 typical, well under 1e-5)
 *   TOL_ELEM    1e-6  elementwise ops with one transcendental (rmsnorm, rope, swiglu, softmax weights)
 *   TOL_F64     1e-12 f64 sums (log-sum-exp, output errors, Hessians)
 *   GPTQ: the same act order; U within 1e-4 (f64 Cholesky, other blocking, rounded to f32); quantized values
 *   equal for at least 99% of the weights (a value on a rounding boundary may flip), output error of the two
 *   quantizations within 2% of each other. */
#include <unistd.h>

#include "../calib/calib.h"
#include "../kernels/kernels.h"
#include "../quant/quant.h"
#include "harness.h"

#define TOL_F32 1e-5
#define TOL_ELEM 1e-6
#define TOL_F64 1e-12

static const struct mb_ops *gpu;

static int gpu_ok(void) {
    if (gpu) return 1;
    char name[256];
    if (mb_cuda_probe(name, sizeof name)) return 0;
    return mb_ops_cuda(&gpu) == 0;
}

#define NEED_GPU()                                                                                  \
    do {                                                                                            \
        if (!gpu_ok()) {                                                                            \
            if (getenv("MB_REQUIRE_GPU")) { CHECK_MSG(0, "no usable GPU: %s", mb_errmsg()); return; } \
            SKIP("no usable GPU (%s)", mb_errmsg());                                                \
        }                                                                                           \
    } while (0)

static double rel_err(const float *a, const float *ref, int64_t n) {
    double d = 0, r = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(a[i]) || !isfinite(ref[i])) return INFINITY;
        d += ((double)a[i] - ref[i]) * ((double)a[i] - ref[i]);
        r += (double)ref[i] * ref[i];
    }
    return r > 0 ? sqrt(d / r) : sqrt(d);
}

static float *randf(int64_t n, uint64_t seed, float scale) {
    float *x = malloc((size_t)n * sizeof *x);
    struct mb_rng g = {seed};
    for (int64_t i = 0; i < n; i++) x[i] = scale * mb_rng_normal(&g);
    return x;
}

/* ---- CPU ---- */

/* BF16 / F16 weights multiplied in tiles give the bits of the product with the f32 copy; so do EXL2 views */
static void test_cpu_matmul_dtypes(void) {
    const int64_t M = 37, N = 2500, K = 2048; /* N above one tile (TILE_FLOATS / K = 2048 rows): two tiles */
    float *x = randf(M * K, 1, 1.0f), *w = randf(N * K, 2, 0.02f), *w32 = malloc(N * K * 4), *y0 = malloc(M * N * 4), *y1 = malloc(M * N * 4);
    uint16_t *h = malloc(N * K * 2);
    for (int dt = 0; dt < 2; dt++) {
        for (int64_t i = 0; i < N * K; i++) {
            h[i] = dt ? mb_f32_to_f16(w[i]) : mb_f32_to_bf16(w[i]);
            w32[i] = dt ? mb_f16_to_f32(h[i]) : mb_bf16_to_f32(h[i]);
        }
        struct mb_weight v32 = mb_weight_view_f32(w32, N, K, "w32"), vh = v32;
        vh.type = dt ? MB_W_F16 : MB_W_BF16;
        vh.data = h;
        CHECK_EQ(mb_ops_cpu.matmul(y0, x, &v32, M, 0), 0);
        CHECK_EQ(mb_ops_cpu.matmul(y1, x, &vh, M, 0), 0);
        CHECK_MSG(!memcmp(y0, y1, M * N * 4), "%s product differs from the f32 product", dt ? "F16" : "BF16");
        /* accumulate: y += x W^T (the product is added block by block: same value up to rounding) */
        CHECK_EQ(mb_ops_cpu.matmul(y1, x, &vh, M, 1), 0);
        for (int64_t i = 0; i < M * N; i++) y0[i] *= 2;
        CHECK_MSG(rel_err(y1, y0, M * N) <= 1e-6, "accumulate: %.3g", rel_err(y1, y0, M * N));
    }
    /* EXL2 */
    struct mb_exl2_packed pk;
    CHECK_EQ(mb_exl2_random(1024, 300, "0.05:8b_32g/0.1:4b_128g/0.85:3b_128g", 3, &pk), 0);
    struct mb_weight q;
    memset(&q, 0, sizeof q);
    q.type = MB_W_EXL2;
    mb_exl2_packed_view(&pk, &q.q);
    q.n = 300;
    q.k = 1024;
    float *wt = malloc(1024 * 300 * 4), *wd = malloc(1024 * 300 * 4);
    CHECK_EQ(mb_exl2_unpack_wt(&q.q, wt), 0);
    for (int64_t k = 0; k < 1024; k++)
        for (int64_t n = 0; n < 300; n++) wd[n * 1024 + k] = wt[k * 300 + n];
    struct mb_weight vd = mb_weight_view_f32(wd, 300, 1024, "dense");
    CHECK_EQ(mb_ops_cpu.matmul(y0, x, &vd, M, 0), 0);
    CHECK_EQ(mb_ops_cpu.matmul(y1, x, &q, M, 0), 0);
    CHECK_MSG(!memcmp(y0, y1, M * 300 * 4), "EXL2 product differs from the dequantized product");
    /* rows of the view */
    float *rows = malloc(7 * 1024 * 4);
    CHECK_EQ(mb_weight_rows_f32(&q, 100, 107, rows), 0);
    CHECK(!memcmp(rows, wd + 100 * 1024, 7 * 1024 * 4));
    CHECK_EQ(mb_weight_rows_f32(&q, 299, 301, rows), MB_ERANGE);
    mb_exl2_packed_free(&pk);
    free(x); free(w); free(w32); free(y0); free(y1); free(h); free(wt); free(wd); free(rows);
}

static void test_cpu_checks(void) {
    float x[1000];
    for (int i = 0; i < 1000; i++) x[i] = (float)i;
    int64_t idx;
    float v;
    CHECK_EQ(mb_ops_cpu.find_nonfinite(x, 1000, &idx, &v), 0);
    CHECK_EQ(idx, -1);
    x[700] = INFINITY;
    x[900] = NAN;
    CHECK_EQ(mb_ops_cpu.find_nonfinite(x, 1000, &idx, &v), 0);
    CHECK_EQ(idx, 700);
    CHECK(isinf(v));
    /* logit statistics against plain loops */
    const int64_t M = 5, V = 1000;
    float *lg = randf(M * V, 4, 3.0f);
    lg[2 * V + 17] = lg[2 * V + 500] = 50; /* a tie: the first index wins */
    int32_t tgt[5] = {0, 999, 17, 3, 4}, am[5], ids[5 * 8];
    double lse[5];
    float tl[5], vals[5 * 8], gc[5 * 8];
    mb_ops_cpu.logit_stats(lg, M, V, tgt, lse, tl, am);
    mb_ops_cpu.topk(lg, M, V, 8, ids, vals);
    mb_ops_cpu.gather_cols(lg, M, V, ids, 8, gc);
    for (int64_t i = 0; i < M; i++) {
        double mx = -INFINITY, s = 0;
        int32_t a = 0;
        for (int64_t j = 0; j < V; j++) if (lg[i * V + j] > mx) { mx = lg[i * V + j]; a = (int32_t)j; }
        for (int64_t j = 0; j < V; j++) s += exp(lg[i * V + j] - mx);
        CHECK_NEAR(lse[i], mx + log(s), 1e-9);
        CHECK_EQ(am[i], a);
        CHECK_EQ(tl[i], lg[i * V + tgt[i]]);
        CHECK_EQ(ids[i * 8], a);
        for (int k = 0; k < 8; k++) CHECK_EQ(gc[i * 8 + k], vals[i * 8 + k]);
        for (int k = 1; k < 8; k++) CHECK(vals[i * 8 + k] <= vals[i * 8 + k - 1]);
    }
    CHECK_EQ(am[2], 17);
    CHECK(ids[16] == 17 && ids[17] == 500);
    free(lg);
}

/* routing, the row lists of an expert (with the starved-expert fill), gather and weighted scatter */
static void test_cpu_moe(void) {
    const int64_t M = 64, H = 16;
    const int E = 4, K = 2;
    float *lg = randf(M * E, 5, 2.0f), probs[64 * 4], wsel[64 * 2], roww[64];
    int32_t sel[64 * 2], rowidx[64];
    for (int64_t i = 0; i < M; i++) lg[i * E + 3] -= 20; /* expert 3 is starved */
    mb_ops_cpu.moe_route(sel, wsel, probs, lg, M, E, K);
    for (int64_t i = 0; i < M; i++) {
        CHECK(sel[i * K] != sel[i * K + 1]);
        CHECK_NEAR(wsel[i * K] + wsel[i * K + 1], 1.0, 1e-6);
        CHECK(probs[i * E + sel[i * K]] >= probs[i * E + sel[i * K + 1]]);
    }
    int64_t routed, n;
    CHECK_EQ(mb_ops_cpu.moe_rows(rowidx, roww, sel, wsel, probs, M, E, K, 3, 10, &routed, &n), 0);
    CHECK_EQ(routed, 0);
    CHECK_EQ(n, 10);
    for (int j = 0; j < 10; j++) CHECK_EQ(roww[j], 0);
    for (int j = 1; j < 10; j++) CHECK(probs[rowidx[j] * E + 3] <= probs[rowidx[j - 1] * E + 3]);
    CHECK_EQ(mb_ops_cpu.moe_rows(rowidx, roww, sel, wsel, probs, M, E, K, 0, 0, &routed, &n), 0);
    CHECK(routed == n && n > 0);
    for (int64_t j = 1; j < n; j++) CHECK(rowidx[j] > rowidx[j - 1]);
    float *x = randf(M * H, 6, 1.0f), *g = malloc(M * H * 4), *acc = calloc(M * H, 4);
    mb_ops_cpu.gather_rows(g, x, rowidx, n, H);
    for (int64_t j = 0; j < n; j++) CHECK(!memcmp(g + j * H, x + rowidx[j] * H, H * 4));
    mb_ops_cpu.scatter_add(acc, g, rowidx, roww, n, H);
    for (int64_t j = 0; j < n; j++) CHECK_EQ(acc[rowidx[j] * H + 5], roww[j] * g[j * H + 5]);
    free(lg); free(x); free(g); free(acc);
}

/* ---- CUDA vs CPU ---- */

/* a device copy of host floats */
static float *dev_f(const float *h, int64_t n) {
    float *d = gpu->alloc((size_t)n * 4);
    if (d) gpu->upload(d, h, (size_t)n * 4);
    return d;
}

static float *host_f(const float *d, int64_t n) {
    float *h = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) h[i] = NAN; /* poisoned: a missing write fails */
    gpu->download(h, d, (size_t)n * 4);
    return h;
}

static void test_gpu_matmul(void) {
    NEED_GPU();
    const int64_t M = 33, N = 700, K = 1024;
    float *x = randf(M * K, 11, 1.0f), *w = randf(N * K, 12, 0.02f), *y = malloc(M * N * 4);
    uint16_t *h = malloc(N * K * 2);
    for (int dt = 0; dt < 3; dt++) {
        struct mb_weight host = mb_weight_view_f32(w, N, K, "w"), dw;
        if (dt) {
            for (int64_t i = 0; i < N * K; i++) h[i] = dt == 1 ? mb_f32_to_bf16(w[i]) : mb_f32_to_f16(w[i]);
            host.type = dt == 1 ? MB_W_BF16 : MB_W_F16;
            host.data = h;
        }
        CHECK_EQ(mb_ops_cpu.matmul(y, x, &host, M, 0), 0);
        CHECK_MSG(gpu->weight_load(&dw, &host, dt == 2) == 0, "%s", mb_errmsg()); /* F16 through the async loader */
        float *xd = dev_f(x, M * K), *yd = gpu->alloc(M * N * 4);
        CHECK_EQ(gpu->matmul(yd, xd, &dw, M, 0), 0);
        float *yg = host_f(yd, M * N);
        double e = rel_err(yg, y, M * N);
        CHECK_MSG(e <= TOL_F32, "dtype %d: rel err %.3g", dt, e);
        gpu->weight_release(&dw);
        gpu->free(xd); gpu->free(yd); free(yg);
    }
    /* EXL2 */
    struct mb_exl2_packed pk;
    CHECK_EQ(mb_exl2_random(K, N, "0.1:6b_32g/0.9:5b_32g", 13, &pk), 0);
    struct mb_weight q, dq;
    memset(&q, 0, sizeof q);
    q.type = MB_W_EXL2;
    mb_exl2_packed_view(&pk, &q.q);
    q.n = N;
    q.k = K;
    CHECK_EQ(mb_ops_cpu.matmul(y, x, &q, M, 0), 0);
    CHECK_MSG(gpu->weight_load(&dq, &q, 1) == 0, "%s", mb_errmsg());
    float *xd = dev_f(x, M * K), *yd = gpu->alloc(M * N * 4);
    CHECK_EQ(gpu->matmul(yd, xd, &dq, M, 0), 0);
    float *yg = host_f(yd, M * N);
    CHECK_MSG(rel_err(yg, y, M * N) <= TOL_F32, "EXL2: rel err %.3g", rel_err(yg, y, M * N));
    gpu->weight_release(&dq);
    gpu->free(xd); gpu->free(yd); free(yg);
    mb_exl2_packed_free(&pk);
    free(x); free(w); free(y); free(h);
}

static void test_gpu_elementwise(void) {
    NEED_GPU();
    const int64_t S = 2, T = 50, nh = 4, nkv = 2, hd = 16, H = 64, M = S * T, V = 500;
    /* rmsnorm */
    float *x = randf(M * H, 21, 1.0f), *nw = randf(H, 22, 1.0f), *o = malloc(M * H * 4);
    mb_ops_cpu.rmsnorm(o, x, nw, M, H, 1e-5f);
    float *xd = dev_f(x, M * H), *nwd = dev_f(nw, H), *od = gpu->alloc(M * H * 4);
    gpu->rmsnorm(od, xd, nwd, M, H, 1e-5f);
    float *og = host_f(od, M * H);
    CHECK_MSG(rel_err(og, o, M * H) <= TOL_ELEM, "rmsnorm %.3g", rel_err(og, o, M * H));
    /* swiglu, add */
    float *u = randf(M * H, 23, 1.0f), *ud = dev_f(u, M * H);
    memcpy(o, x, M * H * 4);
    mb_ops_cpu.swiglu(o, u, M * H);
    gpu->copy(od, xd, M * H * 4);
    gpu->swiglu(od, ud, M * H);
    free(og);
    og = host_f(od, M * H);
    CHECK(rel_err(og, o, M * H) <= TOL_ELEM);
    mb_ops_cpu.add(o, u, M * H);
    gpu->add(od, ud, M * H);
    free(og);
    og = host_f(od, M * H);
    CHECK(rel_err(og, o, M * H) <= TOL_ELEM);
    /* rope tables and rotation, attention with and without a window */
    double inv[8];
    for (int j = 0; j < 8; j++) inv[j] = 1.0 / pow(10000.0, 2.0 * j / 16);
    float *ct = malloc(T * 8 * 4), *st = malloc(T * 8 * 4), *ctd = gpu->alloc(T * 8 * 4), *std_ = gpu->alloc(T * 8 * 4);
    CHECK_EQ(mb_ops_cpu.rope_tables(ct, st, inv, 8, T), 0);
    CHECK_EQ(gpu->rope_tables(ctd, std_, inv, 8, T), 0);
    float *ctg = host_f(ctd, T * 8), *stg = host_f(std_, T * 8);
    CHECK(rel_err(ctg, ct, T * 8) <= TOL_ELEM && rel_err(stg, st, T * 8) <= TOL_ELEM);
    float *q = randf(M * nh * hd, 24, 1.0f), *k = randf(M * nkv * hd, 25, 1.0f), *v = randf(M * nkv * hd, 26, 1.0f);
    float *qd = dev_f(q, M * nh * hd), *kd = dev_f(k, M * nkv * hd), *vd = dev_f(v, M * nkv * hd);
    mb_ops_cpu.rope(q, S, T, nh, hd, ct, st);
    gpu->rope(qd, S, T, nh, hd, ctd, std_);
    float *qg = host_f(qd, M * nh * hd);
    CHECK(rel_err(qg, q, M * nh * hd) <= TOL_ELEM);
    for (int64_t window = 0; window <= 7; window += 7) {
        float *a = malloc(M * nh * hd * 4), *ad = gpu->alloc(M * nh * hd * 4);
        mb_ops_cpu.attention(a, q, k, v, S, T, nh, nkv, hd, window);
        gpu->attention(ad, qd, kd, vd, S, T, nh, nkv, hd, window);
        float *ag = host_f(ad, M * nh * hd);
        CHECK_MSG(rel_err(ag, a, M * nh * hd) <= TOL_F32, "attention window %lld: %.3g", (long long)window, rel_err(ag, a, M * nh * hd));
        free(a); free(ag);
        gpu->free(ad);
    }
    /* logit statistics, top-k, columns */
    float *lg = randf(M * V, 27, 3.0f), *lgd = dev_f(lg, M * V);
    int32_t *tgt = malloc(M * 4), *tgtd = gpu->alloc(M * 4), am[100], amg[100], ids[100 * 8], idsg[100 * 8], *am_d = gpu->alloc(M * 4), *ids_d = gpu->alloc(M * 32);
    for (int64_t i = 0; i < M; i++) tgt[i] = (int32_t)((i * 37) % V);
    gpu->upload(tgtd, tgt, M * 4);
    double lse[100], lseg[100], *lse_d = gpu->alloc(M * 8);
    float tl[100], *tl_d = gpu->alloc(M * 4), vals[800], *vals_d = gpu->alloc(M * 32);
    mb_ops_cpu.logit_stats(lg, M, V, tgt, lse, tl, am);
    gpu->logit_stats(lgd, M, V, tgtd, lse_d, tl_d, am_d);
    gpu->download(lseg, lse_d, M * 8);
    gpu->download(amg, am_d, M * 4);
    int bad = 0;
    for (int64_t i = 0; i < M; i++) bad += !(fabs(lseg[i] - lse[i]) <= TOL_F64 * fabs(lse[i])) || amg[i] != am[i];
    CHECK_EQ(bad, 0);
    mb_ops_cpu.topk(lg, M, V, 8, ids, vals);
    gpu->topk(lgd, M, V, 8, ids_d, vals_d);
    gpu->download(idsg, ids_d, M * 32);
    CHECK(!memcmp(ids, idsg, M * 32));
    /* output errors per sequence */
    double d[2], r[2], dg[2], rg[2], *dd = gpu->alloc(16), *rd = gpu->alloc(16);
    mb_ops_cpu.seq_error(x, u, S, T * H, d, r);
    gpu->seq_error(xd, ud, S, T * H, dd, rd);
    gpu->download(dg, dd, 16);
    gpu->download(rg, rd, 16);
    for (int s = 0; s < 2; s++) CHECK(fabs(dg[s] - d[s]) <= TOL_F64 * d[s] && fabs(rg[s] - r[s]) <= TOL_F64 * r[s]);
    /* non-finite check */
    x[123] = NAN;
    gpu->upload(xd, x, M * H * 4);
    int64_t idx;
    float val;
    CHECK_EQ(gpu->find_nonfinite(xd, M * H, &idx, &val), 0);
    CHECK_EQ(idx, 123);
    free(x); free(nw); free(o); free(og); free(u); free(ct); free(st); free(ctg); free(stg); free(q); free(k); free(v); free(qg); free(lg); free(tgt);
    gpu->free(xd); gpu->free(nwd); gpu->free(od); gpu->free(ud); gpu->free(ctd); gpu->free(std_); gpu->free(qd); gpu->free(kd); gpu->free(vd);
    gpu->free(lgd); gpu->free(tgtd); gpu->free(am_d); gpu->free(ids_d); gpu->free(lse_d); gpu->free(tl_d); gpu->free(vals_d); gpu->free(dd); gpu->free(rd);
}

static void test_gpu_moe_and_hessian(void) {
    NEED_GPU();
    const int64_t M = 300;
    const int E = 8, K = 2;
    float *lg = randf(M * E, 31, 2.0f);
    for (int64_t i = 0; i < M; i++) lg[i * E + 7] -= 30;
    int32_t *sel = malloc(M * K * 4), *selg = malloc(M * K * 4), *rowidx = malloc(M * 4), *rowg = malloc(M * 4);
    float *wsel = malloc(M * K * 4), *probs = malloc(M * E * 4), *roww = malloc(M * 4);
    mb_ops_cpu.moe_route(sel, wsel, probs, lg, M, E, K);
    float *lgd = dev_f(lg, M * E), *wd = gpu->alloc(M * K * 4), *pd = gpu->alloc(M * E * 4), *rwd = gpu->alloc(M * 4);
    int32_t *sd = gpu->alloc(M * K * 4), *rid = gpu->alloc(M * 4);
    gpu->moe_route(sd, wd, pd, lgd, M, E, K);
    gpu->download(selg, sd, M * K * 4);
    CHECK(!memcmp(sel, selg, M * K * 4));
    for (int e = 0; e < E; e++) {
        int64_t r0, n0, r1, n1;
        CHECK_EQ(mb_ops_cpu.moe_rows(rowidx, roww, sel, wsel, probs, M, E, K, e, 20, &r0, &n0), 0);
        CHECK_EQ(gpu->moe_rows(rid, rwd, sd, wd, pd, M, E, K, e, 20, &r1, &n1), 0);
        CHECK(r0 == r1 && n0 == n1);
        gpu->download(rowg, rid, (size_t)n1 * 4);
        CHECK(!memcmp(rowidx, rowg, (size_t)n0 * 4));
    }
    /* Hessian */
    const int64_t Kh = 96, Mh = 2500;
    float *x = randf(Mh * Kh, 32, 1.0f), *xd = dev_f(x, Mh * Kh);
    struct mb_hessian hc, hg;
    CHECK_EQ(mb_hessian_init(&hc, NULL, Kh), 0);
    CHECK_EQ(mb_hessian_init(&hg, gpu, Kh), 0);
    CHECK_EQ(mb_hessian_add(&hc, x, Mh), 0);
    CHECK_EQ(mb_hessian_add(&hg, xd, Mh), 0);
    double *hh = malloc(Kh * Kh * 8);
    gpu->download(hh, hg.H, Kh * Kh * 8);
    double md = 0;
    for (int64_t i = 0; i < Kh; i++)
        for (int64_t j = i; j < Kh; j++) md = fmax(md, fabs(hh[i * Kh + j] - hc.H[i * Kh + j]) / (fabs(hc.H[i * Kh + i]) + 1e-30));
    CHECK_MSG(md <= TOL_F64 * 100, "Hessian max rel diff %.3g", md); /* sums of 2500 terms */
    /* GPTQ: prepare + run on the GPU against the CPU */
    const int64_t N = 200;
    float *w = randf(N * Kh, 33, 0.02f);
    struct mb_weight wv = mb_weight_view_f32(w, N, Kh, "gptq.test"), wdv;
    CHECK_EQ(gpu->weight_load(&wdv, &wv, 0), 0);
    struct mb_qsetting qs;
    mb_qsetting_parse("0.1:4b_32g/0.9:3b_32g", &qs);
    struct mb_gptq_params gp;
    mb_gptq_default_params(&gp);
    gp.name = "gptq.test";
    struct mb_gptq_prep pc, pg;
    CHECK_EQ(mb_gptq_prepare(&hc, &gp, &pc), 0);
    CHECK_MSG(mb_gptq_prepare(&hg, &gp, &pg) == 0, "%s", mb_errmsg());
    CHECK(!memcmp(pc.perm, pg.perm, pc.Kp * 4));
    struct mb_qresult rc_, rg;
    CHECK_EQ(mb_gptq_run(&wv, &pc, &qs, &gp, &rc_), 0);
    CHECK_MSG(mb_gptq_run(&wdv, &pg, &qs, &gp, &rg) == 0, "%s", mb_errmsg());
    int64_t same = 0;
    for (int64_t i = 0; i < rc_.Kp * N; i++) same += rc_.q[i] == rg.q[i];
    CHECK_MSG(same >= 0.99 * rc_.Kp * N, "GPU GPTQ values equal to the CPU's for %lld of %lld", (long long)same, (long long)(rc_.Kp * N));
    struct mb_exl2_packed a, b;
    CHECK_EQ(mb_qresult_pack(&rc_, "cpu", &a), 0);
    CHECK_EQ(mb_qresult_pack(&rg, "gpu", &b), 0);
    mb_qresult_free(&rc_);
    mb_qresult_free(&rg);
    mb_gptq_prep_free(&pc);
    mb_gptq_prep_free(&pg);
    mb_exl2_packed_free(&a);
    mb_exl2_packed_free(&b);
    gpu->weight_release(&wdv);
    mb_hessian_free(&hc);
    mb_hessian_free(&hg);
    free(lg); free(sel); free(selg); free(rowidx); free(rowg); free(wsel); free(probs); free(roww); free(x); free(hh); free(w);
    gpu->free(lgd); gpu->free(wd); gpu->free(pd); gpu->free(rwd); gpu->free(sd); gpu->free(rid); gpu->free(xd);
}

/* the libraries of the GPU path resolve (dlopen'd on first use); needs no GPU */
static void test_cuda_libs(void) {
    if (!mb_cuda_built()) SKIP("built without CUDA");
    CHECK_MSG(mb_cuda_libs_check() == 0, "%s", mb_errmsg());
}

int main(void) {
    RUN(test_cpu_matmul_dtypes);
    RUN(test_cpu_checks);
    RUN(test_cpu_moe);
    RUN(test_cuda_libs);
    RUN(test_gpu_matmul);
    RUN(test_gpu_elementwise);
    RUN(test_gpu_moe_and_hessian);
    TEST_MAIN_END();
}
