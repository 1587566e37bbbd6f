/* quant/alloc.c: bit allocation across slots (multiple-choice knapsack). See quant.h. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"

void mb_alloc_range(const struct mb_alloc_slot *s, int ns, int64_t *min_bits, int64_t *max_bits) {
    int64_t lo = 0, hi = 0;
    for (int i = 0; i < ns; i++) {
        int64_t a = s[i].bits[0], b = s[i].bits[0];
        for (int o = 1; o < s[i].n; o++) { if (s[i].bits[o] < a) a = s[i].bits[o]; if (s[i].bits[o] > b) b = s[i].bits[o]; }
        lo += a;
        hi += b;
    }
    *min_bits = lo;
    *max_bits = hi;
}

double mb_alloc_eval(const struct mb_alloc_slot *s, int ns, const int *choice, int64_t *bits) {
    double e = 0;
    int64_t b = 0;
    for (int i = 0; i < ns; i++) { e += s[i].err[choice[i]]; b += s[i].bits[choice[i]]; }
    if (bits) *bits = b;
    return e;
}

/* spend the remaining budget: repeatedly take the single-slot change with the best error decrease per
 * extra bit that still fits */
static void greedy_fill(const struct mb_alloc_slot *s, int ns, int64_t budget, int *choice) {
    int64_t used;
    mb_alloc_eval(s, ns, choice, &used);
    for (;;) {
        double best = 0;
        int bi = -1, bo = -1;
        for (int i = 0; i < ns; i++)
            for (int o = 0; o < s[i].n; o++) {
                double de = s[i].err[choice[i]] - s[i].err[o];
                int64_t db = s[i].bits[o] - s[i].bits[choice[i]];
                if (de <= 0 || used + db > budget) continue;
                double score = db > 0 ? de / (double)db : INFINITY;
                if (score > best) { best = score; bi = i; bo = o; }
            }
        if (bi < 0) break;
        used += s[bi].bits[bo] - s[bi].bits[choice[bi]];
        choice[bi] = bo;
    }
}

/* pairwise exchange: the best change of two slots at once that fits and lowers the error, repeated. This
 * recovers what rounding the costs up in the dynamic program can exclude near the budget's edge. */
static void pair_improve(const struct mb_alloc_slot *s, int ns, int64_t budget, int *choice) {
    int64_t used;
    mb_alloc_eval(s, ns, choice, &used);
    for (int pass = 0; pass < 100; pass++) {
        double best = 1e-15;
        int bi = -1, bj = -1, boi = -1, boj = -1;
        for (int i = 0; i < ns; i++)
            for (int j = i + 1; j < ns; j++)
                for (int oi = 0; oi < s[i].n; oi++) {
                    double ei = s[i].err[choice[i]] - s[i].err[oi];
                    int64_t bdi = s[i].bits[oi] - s[i].bits[choice[i]];
                    for (int oj = 0; oj < s[j].n; oj++) {
                        double de = ei + s[j].err[choice[j]] - s[j].err[oj];
                        if (de <= best) continue;
                        if (used + bdi + s[j].bits[oj] - s[j].bits[choice[j]] > budget) continue;
                        best = de; bi = i; bj = j; boi = oi; boj = oj;
                    }
                }
        if (bi < 0) break;
        used += s[bi].bits[boi] - s[bi].bits[choice[bi]] + s[bj].bits[boj] - s[bj].bits[choice[bj]];
        choice[bi] = boi;
        choice[bj] = boj;
    }
}

/* Exact: dynamic program over the Pareto frontier of (bits, error) with exact bit counts. After each slot
 * only non-dominated partial choices are kept (fewer bits or less error than every other); the frontier
 * stays small in practice. Returns 1 when the frontier grew past `cap` (the caller falls back). */
struct pstate { int64_t bits; double err; int32_t parent; int16_t opt; };
static int cmp_pstate(const void *a, const void *b) {
    const struct pstate *x = a, *y = b;
    if (x->bits != y->bits) return x->bits < y->bits ? -1 : 1;
    return x->err < y->err ? -1 : x->err > y->err;
}

static int pareto_solve(const struct mb_alloc_slot *s, int ns, int64_t budget, int *choice, int64_t cap) {
    struct pstate **fr = calloc(ns, sizeof *fr);
    int64_t *nf = calloc(ns, sizeof *nf);
    struct pstate *cand = NULL;
    int rc = 1;
    if (!fr || !nf) goto out;
    for (int i = 0; i < ns; i++) {
        int64_t prev_n = i ? nf[i - 1] : 1, nc = 0;
        if (prev_n * s[i].n > cap) goto out;
        cand = malloc((size_t)(prev_n * s[i].n) * sizeof *cand);
        if (!cand) goto out;
        for (int64_t k = 0; k < prev_n; k++) {
            int64_t b0 = i ? fr[i - 1][k].bits : 0;
            double e0 = i ? fr[i - 1][k].err : 0;
            for (int o = 0; o < s[i].n; o++) {
                int64_t b = b0 + s[i].bits[o];
                if (b > budget) continue;
                cand[nc++] = (struct pstate){b, e0 + s[i].err[o], (int32_t)k, (int16_t)o};
            }
        }
        qsort(cand, (size_t)nc, sizeof *cand, cmp_pstate);
        int64_t w = 0; /* keep strictly decreasing error along increasing bits */
        for (int64_t k = 0; k < nc; k++)
            if (w == 0 || cand[k].err < cand[w - 1].err) cand[w++] = cand[k];
        if (w == 0) goto out;
        fr[i] = realloc(cand, (size_t)w * sizeof *cand);
        if (!fr[i]) { fr[i] = cand; }
        cand = NULL;
        nf[i] = w;
    }
    /* the last frontier's best error is its last entry; walk the parents back */
    int64_t k = nf[ns - 1] - 1;
    for (int i = ns - 1; i >= 0; i--) {
        choice[i] = fr[i][k].opt;
        k = fr[i][k].parent;
    }
    rc = 0;
out:
    free(cand);
    if (fr) for (int i = 0; i < ns; i++) free(fr[i]);
    free(fr);
    free(nf);
    return rc;
}

int mb_alloc_solve(const struct mb_alloc_slot *s, int ns, int64_t budget, int *choice) {
    int64_t lo, hi;
    mb_alloc_range(s, ns, &lo, &hi);
    if (budget < lo) return mb_fail(MB_ERANGE, "bit budget %lld below the smallest possible %lld", (long long)budget, (long long)lo);
    if (pareto_solve(s, ns, budget, choice, 50000000) == 0) return 0; /* exact */
    int64_t unit = budget / 100000 > 0 ? budget / 100000 : 1, B = budget / unit;
    double *dp = malloc((size_t)(B + 1) * sizeof *dp), *nd = malloc((size_t)(B + 1) * sizeof *nd);
    uint8_t *bt = malloc((size_t)ns * (size_t)(B + 1));
    if (!dp || !nd || !bt) { free(dp); free(nd); free(bt); return mb_fail(MB_ENOMEM, "out of memory for the allocator"); }
    for (int64_t c = 0; c <= B; c++) dp[c] = 0;
    /* dp[c] = least error of slots < i with cost at most c */
    for (int i = 0; i < ns; i++) {
        for (int64_t c = 0; c <= B; c++) { nd[c] = INFINITY; bt[(size_t)i * (B + 1) + c] = 255; }
        for (int o = 0; o < s[i].n; o++) {
            int64_t cost = (s[i].bits[o] + unit - 1) / unit;
            for (int64_t c = cost; c <= B; c++) {
                double v = dp[c - cost] + s[i].err[o];
                if (v < nd[c]) { nd[c] = v; bt[(size_t)i * (B + 1) + c] = (uint8_t)o; }
            }
        }
        double *t = dp; dp = nd; nd = t;
    }
    int rc = 0;
    if (!isfinite(dp[B])) {
        /* rounding the costs up made the budget unreachable: start from the cheapest choice */
        for (int i = 0; i < ns; i++) {
            int best = 0;
            for (int o = 1; o < s[i].n; o++) if (s[i].bits[o] < s[i].bits[best]) best = o;
            choice[i] = best;
        }
    } else {
        int64_t c = B;
        for (int i = ns - 1; i >= 0; i--) {
            int o = bt[(size_t)i * (B + 1) + c];
            choice[i] = o;
            c -= (s[i].bits[o] + unit - 1) / unit;
        }
    }
    greedy_fill(s, ns, budget, choice);
    pair_improve(s, ns, budget, choice);
    greedy_fill(s, ns, budget, choice);
    free(dp); free(nd); free(bt);
    return rc;
}

int mb_alloc_anneal(const struct mb_alloc_slot *s, int ns, int64_t budget, uint64_t seed, int iters, int *choice) {
    int64_t lo, hi;
    mb_alloc_range(s, ns, &lo, &hi);
    if (budget < lo) return mb_fail(MB_ERANGE, "bit budget %lld below the smallest possible %lld", (long long)budget, (long long)lo);
    int *cur = malloc((size_t)ns * sizeof *cur);
    if (!cur) return mb_fail(MB_ENOMEM, "out of memory");
    for (int i = 0; i < ns; i++) {
        int best = 0;
        for (int o = 1; o < s[i].n; o++) if (s[i].bits[o] < s[i].bits[best]) best = o;
        cur[i] = choice[i] = best;
    }
    int64_t used;
    double e = mb_alloc_eval(s, ns, cur, &used), best_e = e;
    struct mb_rng g = {seed};
    double t0 = 0.05, t1 = 1e-5;
    for (int it = 0; it < iters; it++) {
        double temp = t0 * pow(t1 / t0, (double)it / iters);
        int i = (int)(mb_rng_next(&g) % (uint64_t)ns), o = (int)(mb_rng_next(&g) % (uint64_t)s[i].n);
        int64_t nb = used - s[i].bits[cur[i]] + s[i].bits[o];
        if (nb > budget) continue;
        double ne = e - s[i].err[cur[i]] + s[i].err[o];
        if (ne <= e || mb_rng_uniform(&g) < exp((e - ne) / temp)) {
            cur[i] = o; e = ne; used = nb;
            if (e < best_e) { best_e = e; memcpy(choice, cur, (size_t)ns * sizeof *cur); }
        }
    }
    free(cur);
    greedy_fill(s, ns, budget, choice);
    return 0;
}
