/* calib/ppl.c: perplexity (paper and llama.cpp conventions, ../shared/docs/perplexity.md) and KL
 * divergence against saved top-k log-probabilities.
 *
 * Log-probability file (little-endian):
 *   [0, 8)    magic "MBLOGP01"
 *   u32 k, u32 vocab, u64 positions, u64 tokenizer hash, u64 token-stream hash, u32 convention, u32 ctx,
 *   u64 stream length
 *   then per scored position: k x (i32 id, f32 log-prob), sorted by log-prob descending, then f32 log of the
 *   remaining probability mass (-inf when none).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "calib.h"

#define LP_MAGIC "MBLOGP01"
#define LP_HEADER 56

void mb_ppl_default_params(struct mb_ppl_params *p) {
    memset(p, 0, sizeof *p);
    p->convention = MB_PPL_PAPER;
    p->ctx = 2048;
    p->batch_tokens = 4096;
    p->topk = 32;
    p->ops = &mb_ops_cpu;
    p->progress = 1;
}

struct window { int64_t begin, T, lo, hi; int bos; }; /* targets [lo, hi) window-relative; logits at t-1 */

static int plan_windows(const struct mb_ppl_params *p, int64_t n, struct window **out, int64_t *nw) {
    int64_t cap = 16, k = 0;
    struct window *w = malloc(cap * sizeof *w);
    if (!w) return mb_fail(MB_ENOMEM, "out of memory");
    if (p->convention == MB_PPL_LLAMACPP) {
        int64_t chunks = n / p->ctx;
        for (int64_t i = 0; i < chunks; i++) {
            if (k == cap) { cap *= 2; struct window *nw2 = realloc(w, cap * sizeof *w); if (!nw2) { free(w); return mb_fail(MB_ENOMEM, "out of memory"); } w = nw2; }
            w[k++] = (struct window){i * p->ctx, p->ctx, p->ctx / 2 + 1, p->ctx, 1};
        }
    } else {
        int64_t stride = p->stride > 0 ? p->stride : p->ctx, prev_end = 0;
        for (int64_t begin = 0; begin < n; begin += stride) {
            int64_t end = begin + p->ctx < n ? begin + p->ctx : n, T = end - begin;
            int64_t lo = (prev_end > begin + 1 ? prev_end : begin + 1) - begin;
            if (T >= 2 && lo < T) {
                if (k == cap) { cap *= 2; struct window *nw2 = realloc(w, cap * sizeof *w); if (!nw2) { free(w); return mb_fail(MB_ENOMEM, "out of memory"); } w = nw2; }
                w[k++] = (struct window){begin, T, lo, T, 0};
            }
            prev_end = end;
            if (end == n) break;
        }
    }
    *out = w;
    *nw = k;
    return 0;
}

/* top-k of row x [V] into ids/vals (sorted descending) with a min-heap */
static void topk_row(const float *x, int64_t V, int k, int32_t *ids, float *vals) {
    int n = 0;
    for (int64_t i = 0; i < V; i++) {
        float v = x[i];
        if (n < k) {
            int j = n++;
            ids[j] = (int32_t)i; vals[j] = v;
            while (j > 0) { int pj = (j - 1) / 2; if (vals[pj] <= vals[j]) break; float tv = vals[pj]; vals[pj] = vals[j]; vals[j] = tv; int32_t ti = ids[pj]; ids[pj] = ids[j]; ids[j] = ti; j = pj; }
        } else if (v > vals[0]) {
            vals[0] = v; ids[0] = (int32_t)i;
            int j = 0;
            for (;;) {
                int l = 2 * j + 1, r = l + 1, m = j;
                if (l < n && vals[l] < vals[m]) m = l;
                if (r < n && vals[r] < vals[m]) m = r;
                if (m == j) break;
                float tv = vals[m]; vals[m] = vals[j]; vals[j] = tv; int32_t ti = ids[m]; ids[m] = ids[j]; ids[j] = ti; j = m;
            }
        }
    }
    /* heap -> descending (insertion sort, k small) */
    for (int i = 1; i < n; i++) {
        float v = vals[i]; int32_t id = ids[i]; int j = i - 1;
        while (j >= 0 && (vals[j] < v || (vals[j] == v && ids[j] > id))) { vals[j + 1] = vals[j]; ids[j + 1] = ids[j]; j--; }
        vals[j + 1] = v; ids[j + 1] = id;
    }
}

static void put32(uint8_t *b, uint32_t v) { for (int i = 0; i < 4; i++) b[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *b, uint64_t v) { for (int i = 0; i < 8; i++) b[i] = (uint8_t)(v >> (8 * i)); }
static uint32_t get32(const uint8_t *b) { uint32_t v = 0; for (int i = 3; i >= 0; i--) v = (v << 8) | b[i]; return v; }
static uint64_t get64(const uint8_t *b) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = (v << 8) | b[i]; return v; }

static uint64_t hash_ids(const int32_t *ids, int64_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    const uint8_t *b = (const uint8_t *)ids;
    for (int64_t i = 0; i < n * 4; i++) { h ^= b[i]; h *= 0x100000001b3ull; }
    return h;
}

static int cmp_double(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }

int mb_ppl_run(const struct mb_model *m, const int32_t *ids_in, int64_t n, uint64_t tok_hash, const struct mb_ppl_params *p,
               struct mb_ppl_result *r) {
    memset(r, 0, sizeof *r);
    const struct mb_config *c = &m->cfg;
    const struct mb_ops *ops = p->ops ? p->ops : &mb_ops_cpu;
    if (p->max_tokens > 0 && n > p->max_tokens) n = p->max_tokens;
    if (p->ctx < 4) return mb_fail(MB_EINVAL, "context %lld is too small", (long long)p->ctx);
    if (p->convention == MB_PPL_LLAMACPP && n < p->ctx) return mb_fail(MB_EINVAL, "the text has %lld tokens, fewer than one chunk of %lld (llamacpp convention)", (long long)n, (long long)p->ctx);
    if (p->topk < 1 || p->topk > c->vocab) return mb_fail(MB_EINVAL, "top-k %d outside 1..%lld", p->topk, (long long)c->vocab);
    struct window *win = NULL;
    int64_t nw = 0;
    int rc = plan_windows(p, n, &win, &nw);
    if (rc) return rc;
    if (nw == 0) { free(win); return mb_fail(MB_EINVAL, "the text has too few tokens (%lld) to score", (long long)n); }
    int64_t maxT = 0, positions = 0;
    for (int64_t i = 0; i < nw; i++) { if (win[i].T > maxT) maxT = win[i].T; positions += win[i].hi - win[i].lo; }
    int64_t rows = p->batch_tokens > maxT ? p->batch_tokens / maxT * maxT : maxT;
    uint64_t ids_hash = hash_ids(ids_in, n);
    int K = p->topk;

    struct mb_fwd f;
    float *x = NULL, *xs = NULL, *logits = NULL;
    int32_t *bids = NULL, *tk_ids = NULL, *tgt = NULL;
    float *tk_v = NULL;
    double *klds = NULL;
    struct mb_layer_w **layers = NULL;
    struct mb_atomic_file af = {0};
    FILE *kf = NULL;
    uint8_t *rec = NULL;
    size_t recsz = (size_t)8 * K + 4;
    int kref = 0;
    memset(&f, 0, sizeof f);
    if ((rc = mb_fwd_init(&f, m, ops, rows, maxT))) goto done;
    int64_t H = c->hidden, V = c->vocab, head_rows = 256;
    x = ops->alloc((size_t)(rows * H) * sizeof *x);
    xs = ops->alloc((size_t)(rows * H) * sizeof *xs);
    logits = ops->alloc((size_t)(head_rows * V) * sizeof *logits);
    bids = malloc((size_t)rows * sizeof *bids);
    tgt = malloc((size_t)rows * sizeof *tgt);
    tk_ids = malloc((size_t)K * sizeof *tk_ids);
    tk_v = malloc((size_t)K * sizeof *tk_v);
    rec = malloc(recsz > 256 ? recsz : 256);
    layers = calloc(c->n_layers, sizeof *layers);
    if (!x || !xs || !logits || !bids || !tgt || !tk_ids || !tk_v || !rec || !layers) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto done; }
    /* weights: resident for the whole run (the forward pass itself touches one layer at a time) */
    for (int l = 0; l < c->n_layers; l++)
        if ((rc = mb_layer_load(m, l, &layers[l]))) goto done;

    if (p->save_logprobs) {
        if ((rc = mb_atomic_open(&af, p->save_logprobs))) goto done;
        uint8_t h[LP_HEADER];
        memcpy(h, LP_MAGIC, 8);
        put32(h + 8, (uint32_t)K);
        put32(h + 12, (uint32_t)V);
        put64(h + 16, (uint64_t)positions);
        put64(h + 24, tok_hash);
        put64(h + 32, ids_hash);
        put32(h + 40, (uint32_t)p->convention);
        put32(h + 44, (uint32_t)p->ctx);
        put64(h + 48, (uint64_t)n);
        if (fwrite(h, 1, LP_HEADER, af.f) != LP_HEADER) { rc = mb_fail(MB_EIO, "%s: write failed", p->save_logprobs); goto done; }
    }
    if (p->kld) {
        kf = fopen(p->kld, "rb");
        if (!kf) { rc = mb_fail(MB_EIO, "%s: cannot open", p->kld); goto done; }
        uint8_t h[LP_HEADER];
        if (fread(h, 1, LP_HEADER, kf) != LP_HEADER || memcmp(h, LP_MAGIC, 8)) { rc = mb_fail(MB_EFORMAT, "%s: not a mixbit log-probability file", p->kld); goto done; }
        kref = (int)get32(h + 8);
        if (kref < 1 || kref > 4096) { rc = mb_fail(MB_EFORMAT, "%s: bad k %d", p->kld, kref); goto done; }
        if (get32(h + 12) != (uint32_t)V) { rc = mb_fail(MB_EINVAL, "%s: vocabulary %u differs from this model's %lld", p->kld, get32(h + 12), (long long)V); goto done; }
        if (get64(h + 24) != tok_hash) { rc = mb_fail(MB_EINVAL, "%s: made with another tokenizer", p->kld); goto done; }
        if (get64(h + 32) != ids_hash || get64(h + 48) != (uint64_t)n) { rc = mb_fail(MB_EINVAL, "%s: made on another text (token streams differ)", p->kld); goto done; }
        if (get32(h + 40) != (uint32_t)p->convention || get32(h + 44) != (uint32_t)p->ctx || get64(h + 16) != (uint64_t)positions) {
            rc = mb_fail(MB_EINVAL, "%s: made with another convention or context (%s, ctx %u)", p->kld, get32(h + 40) ? "llamacpp" : "paper", get32(h + 44));
            goto done;
        }
        recsz = (size_t)8 * kref + 4;
        free(rec);
        rec = malloc(recsz);
        klds = malloc((size_t)positions * sizeof *klds);
        if (!rec || !klds) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto done; }
    }

    double nll_sum = 0, kld_sum = 0;
    int64_t scored = 0, same = 0, evaluated = 0;
    struct mb_progress pr;
    mb_progress_begin(&pr, "perplexity", "tok", nw * 0 + positions);
    if (!p->progress) pr.active = 0;
    double t0 = mb_now();
    for (int64_t wi = 0; wi < nw && !rc;) {
        int64_t T = win[wi].T, S = 0;
        while (wi + S < nw && win[wi + S].T == T && (S + 1) * T <= rows) S++;
        for (int64_t s = 0; s < S; s++) {
            memcpy(bids + s * T, ids_in + win[wi + s].begin, (size_t)T * sizeof *bids);
            if (win[wi + s].bos) bids[s * T] = (int32_t)(c->bos_id >= 0 ? c->bos_id : 1);
        }
        if ((rc = mb_fwd_embed(&f, bids, S * T, x))) break;
        for (int l = 0; l < c->n_layers && !rc; l++) {
            rc = mb_fwd_attn(&f, layers[l], x, S, T, NULL);
            if (!rc) rc = mb_fwd_mlp(&f, layers[l], x, S * T, NULL);
        }
        if (rc) break;
        evaluated += S * T;
        /* gather the rows whose logits are scored */
        int64_t ns = 0;
        for (int64_t s = 0; s < S; s++)
            for (int64_t t = win[wi + s].lo; t < win[wi + s].hi; t++) {
                memcpy(xs + ns * H, x + (s * T + t - 1) * H, (size_t)H * sizeof *xs);
                tgt[ns++] = ids_in[win[wi + s].begin + t];
            }
        for (int64_t r0 = 0; r0 < ns && !rc; r0 += head_rows) {
            int64_t nr = ns - r0 < head_rows ? ns - r0 : head_rows;
            if ((rc = mb_fwd_logits(&f, xs + r0 * H, nr, logits))) break;
            for (int64_t i = 0; i < nr && !rc; i++) {
                const float *lg = logits + i * V;
                float mx = lg[0];
                int32_t am = 0;
                for (int64_t v = 1; v < V; v++) if (lg[v] > mx) { mx = lg[v]; am = (int32_t)v; }
                double se = 0;
                for (int64_t v = 0; v < V; v++) se += exp((double)lg[v] - mx);
                double lse = mx + log(se);
                nll_sum += lse - lg[tgt[r0 + i]];
                if (p->save_logprobs) {
                    topk_row(lg, V, K, tk_ids, tk_v);
                    double mass = 0;
                    for (int k = 0; k < K; k++) {
                        double lp = tk_v[k] - lse;
                        mass += exp(lp);
                        put32(rec + 8 * k, (uint32_t)tk_ids[k]);
                        float fl = (float)lp;
                        memcpy(rec + 8 * k + 4, &fl, 4);
                    }
                    float rest = mass < 1 ? (float)log1p(-mass) : -INFINITY;
                    memcpy(rec + 8 * K, &rest, 4);
                    if (fwrite(rec, 1, recsz, af.f) != recsz) { rc = mb_fail(MB_EIO, "%s: write failed", p->save_logprobs); break; }
                }
                if (kf) {
                    if (fread(rec, 1, recsz, kf) != recsz) { rc = mb_fail(MB_EFORMAT, "%s: truncated", p->kld); break; }
                    double kl = 0, qmass = 0, pmass = 0;
                    for (int k = 0; k < kref; k++) {
                        uint32_t id = get32(rec + 8 * k);
                        float lp;
                        memcpy(&lp, rec + 8 * k + 4, 4);
                        if (id >= (uint32_t)V) { rc = mb_fail(MB_EFORMAT, "%s: token id %u out of range", p->kld, id); break; }
                        double lq = lg[id] - lse, pp = exp((double)lp);
                        kl += pp * ((double)lp - lq);
                        qmass += exp(lq);
                        pmass += pp;
                    }
                    float rest;
                    memcpy(&rest, rec + 8 * kref, 4);
                    double prest = isfinite(rest) ? exp((double)rest) : 0, qrest = 1 - qmass;
                    if (qrest < 1e-30) qrest = 1e-30;
                    if (prest > 0) kl += prest * ((double)rest - log(qrest));
                    if (kl < 0) kl = 0; /* rounding of a sum of tiny terms */
                    klds[scored] = kl;
                    kld_sum += kl;
                    same += get32(rec) == (uint32_t)am;
                    (void)pmass;
                }
                scored++;
            }
        }
        mb_progress_update(&pr, scored);
        wi += S;
    }
    mb_progress_end(&pr);
    if (rc) goto done;
    r->seconds = mb_now() - t0;
    r->tokens = scored;
    r->evaluated = evaluated;
    r->mean_nll = nll_sum / (double)scored;
    r->ppl = exp(r->mean_nll);
    r->tok_per_s = evaluated / (r->seconds > 0 ? r->seconds : 1e-9);
    if (kf) {
        qsort(klds, scored, sizeof *klds, cmp_double);
        r->has_kld = 1;
        r->kld_mean = kld_sum / (double)scored;
        int64_t i99 = (int64_t)ceil(0.99 * scored) - 1;
        r->kld_p99 = klds[i99 < 0 ? 0 : i99];
        r->same_top1 = 100.0 * same / (double)scored;
    }
    if (p->save_logprobs) { rc = mb_atomic_commit(&af); af.f = NULL; }
done:
    if (rc && af.f) mb_atomic_abort(&af);
    if (kf) fclose(kf);
    if (layers) for (int l = 0; l < c->n_layers; l++) mb_layer_free(layers[l]);
    free(layers);
    if (f.ops) {
        ops->free(x); ops->free(xs); ops->free(logits);
        mb_fwd_free(&f);
    }
    free(bids); free(tgt); free(tk_ids); free(tk_v); free(rec); free(klds); free(win);
    return rc;
}

int mb_seq_nll(const struct mb_model *m, const struct mb_ops *ops, const int32_t *ids, int64_t T, double *nll, int32_t *argmax) {
    const struct mb_config *c = &m->cfg;
    struct mb_fwd f;
    int rc = mb_fwd_init(&f, m, ops, T, T);
    if (rc) return rc;
    int64_t H = c->hidden, V = c->vocab;
    float *x = ops->alloc((size_t)(T * H) * sizeof *x), *lg = ops->alloc((size_t)(T * V) * sizeof *lg);
    if (!x || !lg) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto done; }
    if ((rc = mb_fwd_embed(&f, ids, T, x))) goto done;
    for (int l = 0; l < c->n_layers && !rc; l++) {
        struct mb_layer_w *w;
        if ((rc = mb_layer_load(m, l, &w))) break;
        rc = mb_fwd_attn(&f, w, x, 1, T, NULL);
        if (!rc) rc = mb_fwd_mlp(&f, w, x, T, NULL);
        mb_layer_free(w);
    }
    if (!rc) rc = mb_fwd_logits(&f, x, T, lg);
    for (int64_t i = 0; !rc && i + 1 < T; i++) {
        const float *r = lg + i * V;
        float mx = r[0];
        int32_t am = 0;
        for (int64_t v = 1; v < V; v++) if (r[v] > mx) { mx = r[v]; am = (int32_t)v; }
        double se = 0;
        for (int64_t v = 0; v < V; v++) se += exp((double)r[v] - mx);
        nll[i] = mx + log(se) - r[ids[i + 1]];
        if (argmax) argmax[i] = am;
    }
done:
    ops->free(x);
    ops->free(lg);
    mb_fwd_free(&f);
    return rc;
}
