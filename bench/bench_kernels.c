/* bench/bench_kernels.c: EXL2 GEMV/GEMM on the GPU against cuBLAS fp16 (issue 7).
 *
 *   bench_kernels [--quick]
 *
 * Shapes (K x N): 4096x4096, 4096x14336, 14336x4096 (Mixtral-8x7B), 6144x16384, 16384x6144 (Mixtral-8x22B);
 * mixes of about 2.5, 3.5, 4.5 and 6 bpw; batch 1, 2, 4, 8, 16, 32, 128. For each: median time of 7
 * repeats of 20 back-to-back calls, effective GB/s (packed weight + scale + activation + output bytes /
 * time), % of the device-to-device copy bandwidth measured at the start of the same run, the cuBLAS fp16
 * time for the same shape (x [M,K] @ W [K,N], fp16 weights) and the speedup. Markdown on stdout. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/kernels.h"
#include "../quant/quant.h"

static int cmp_d(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }

typedef int (*call_fn)(void *ctx);
struct ctx_q { const struct mb_exl2_dev *d; void *x, *y; int64_t M; };
struct ctx_b { void *x, *w, *y; int64_t M, K, N; };
static int call_q(void *c) { struct ctx_q *q = c; return mb_exl2_dev_gemm(q->d, q->x, q->M, q->y, 0, NULL); }
static int call_b(void *c) { struct ctx_b *b = c; return mb_cuda_gemm_f16(b->x, b->w, b->M, b->K, b->N, b->y, 0, NULL); }

static double time_it(call_fn f, void *ctx) {
    const int reps = 7, inner = 20;
    double t[7];
    if (f(ctx) || mb_cuda_sync()) return -1; /* warm-up */
    for (int r = 0; r < reps; r++) {
        double t0 = mb_now();
        for (int i = 0; i < inner; i++) if (f(ctx)) return -1;
        if (mb_cuda_sync()) return -1;
        t[r] = (mb_now() - t0) / inner;
    }
    qsort(t, reps, sizeof *t, cmp_d);
    return t[reps / 2];
}

int main(int argc, char **argv) {
    int quick = argc > 1 && !strcmp(argv[1], "--quick");
    char name[256];
    if (mb_cuda_probe(name, sizeof name)) { fprintf(stderr, "bench_kernels: %s\n", mb_errmsg()); return 1; }
    double copy_bw;
    if (mb_cuda_copy_bandwidth((size_t)1 << 30, 20, &copy_bw)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
    printf("GPU: %s; device-to-device copy: %.0f GB/s (bytes read + written, 1 GiB, median of 20)\n\n", name, copy_bw);
    const int64_t shapes[][2] = {{4096, 4096}, {4096, 14336}, {14336, 4096}, {6144, 16384}, {16384, 6144}};
    const char *mixes[] = {"0.3:3b_64g/0.7:2b_64g", "0.5:4b_128g/0.5:3b_128g", "0.5:5b_128g/0.5:4b_128g", "1:6b_128g"};
    const int64_t batches[] = {1, 2, 4, 8, 16, 32, 128};
    int nshapes = quick ? 1 : 5, nmix = quick ? 2 : 4, nbatch = quick ? 3 : 7;
    printf("| K x N | setting | bpw | batch | time us | eff. GB/s | %% of copy BW | cuBLAS fp16 us | speedup |\n|---|---|---|---|---|---|---|---|---|\n");
    for (int si = 0; si < nshapes; si++) {
        int64_t K = shapes[si][0], N = shapes[si][1];
        void *x_d = NULL, *y_d = NULL, *w_d = NULL;
        if (mb_cuda_malloc(&x_d, 128 * K * 2) || mb_cuda_malloc(&y_d, 128 * N * 4) || mb_cuda_malloc(&w_d, K * N * 2)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
        mb_cuda_memset(x_d, 0x22, 128 * K * 2); /* finite fp16 values */
        mb_cuda_memset(w_d, 0x11, K * N * 2);
        double tb[7];
        for (int bi = 0; bi < nbatch; bi++) {
            struct ctx_b cb = {x_d, w_d, y_d, batches[bi], K, N};
            tb[bi] = time_it(call_b, &cb);
        }
        for (int mi = 0; mi < nmix; mi++) {
            struct mb_exl2_packed pk;
            if (mb_exl2_random(K, N, mixes[mi], 1 + si * 10 + mi, &pk)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
            struct mb_exl2_layer L;
            mb_exl2_packed_view(&pk, &L);
            struct mb_exl2_dev *d;
            if (mb_exl2_dev_upload(&L, &d)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
            double wbytes = (double)pk.P * pk.Np * 4 + (double)pk.G * N * 2 + (double)K * 4 + (double)(K / 32) * 16;
            double bpw = ((double)pk.P * pk.Np * 32 + pk.G * 16.0 + pk.G * 32.0 + (double)pk.G * pk.Np * 4 + K * 32.0) / ((double)K * N);
            for (int bi = 0; bi < nbatch; bi++) {
                int64_t M = batches[bi];
                struct ctx_q cq = {d, x_d, y_d, M};
                double t = time_it(call_q, &cq);
                if (t < 0) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
                double bytes = wbytes + (double)M * K * 2 + (double)M * N * 2;
                double gbs = bytes / t / 1e9;
                printf("| %lldx%lld | %s | %.2f | %lld | %.1f | %.0f | %.0f%% | %.1f | %.2fx |\n", (long long)K, (long long)N, mixes[mi], bpw, (long long)M, t * 1e6, gbs,
                       100 * gbs / copy_bw, tb[bi] * 1e6, tb[bi] / t);
                fflush(stdout);
            }
            mb_exl2_dev_free(d);
            mb_exl2_packed_free(&pk);
        }
        mb_cuda_free(x_d);
        mb_cuda_free(y_d);
        mb_cuda_free(w_d);
    }
    return 0;
}
