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
    p->bos = 1;
    p->bos_id = 1;
}

struct window { int64_t begin, T, lo, hi; int bos; }; /* targets [lo, hi) window-relative; logits at t-1 */

/* p99 of the per-position KLD without keeping every value: a histogram of 8192 log-spaced bins over
 * [1e-12, 1e3] (0.42% wide each); the reported p99 is the upper edge of the bin holding it */
#define KH_BINS 8192
#define KH_LO (-12.0)
#define KH_HI 3.0

struct ppl_state {
    const struct mb_model *m;
    const struct mb_config *c;
    const struct mb_ppl_params *p;
    const struct mb_ops *ops;
    struct mb_fwd f;
    int64_t rows, H, V, head_rows;
    /* backend buffers: hidden states, scored rows, logits and per-row results */
    float *x, *xs, *logits;
    int32_t *sidx_b, *tgt_b, *ids_b, *am_b;
    double *lse_b;
    float *tl_b, *vals_b;
    /* host */
    int32_t *bids, *sidx, *tgt, *tk_ids, *ref_ids, *am;
    float *tk_v, *tl, *ref_lq;
    double *lse;
    /* token stream: tok[i] is stream position base + i */
    int32_t *tok;
    int64_t base, ntok, cap, consumed;
    uint64_t hash, tok_hash;
    int done_feeding;
    /* windows */
    int64_t next_begin, prev_end;
    struct window *pend;
    int npend, pend_cap;
    /* results */
    double nll_sum, kld_sum;
    int64_t scored, same, evaluated;
    int64_t *khist;
    /* files */
    struct mb_atomic_file af;
    int saving;
    FILE *kf;
    int K, kref;
    uint8_t *rec, *srec; /* reference records read for KLD (head_rows of them), one record being saved */
    size_t recsz, srecsz;
    struct mb_progress pr;
    double t0;
    uint64_t ref_positions, ref_hash, ref_n;
};

static void put32(uint8_t *b, uint32_t v) { for (int i = 0; i < 4; i++) b[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *b, uint64_t v) { for (int i = 0; i < 8; i++) b[i] = (uint8_t)(v >> (8 * i)); }
static uint32_t get32(const uint8_t *b) { uint32_t v = 0; for (int i = 3; i >= 0; i--) v = (v << 8) | b[i]; return v; }
static uint64_t get64(const uint8_t *b) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = (v << 8) | b[i]; return v; }

static int write_header(struct ppl_state *st) {
    uint8_t h[LP_HEADER];
    memcpy(h, LP_MAGIC, 8);
    put32(h + 8, (uint32_t)st->K);
    put32(h + 12, (uint32_t)st->V);
    put64(h + 16, (uint64_t)st->scored);
    put64(h + 24, st->tok_hash);
    put64(h + 32, st->hash);
    put32(h + 40, (uint32_t)st->p->convention);
    put32(h + 44, (uint32_t)st->p->ctx);
    put64(h + 48, (uint64_t)st->consumed);
    if (fseek(st->af.f, 0, SEEK_SET) != 0 || fwrite(h, 1, LP_HEADER, st->af.f) != LP_HEADER || fseek(st->af.f, 0, SEEK_END) != 0)
        return mb_fail(MB_EIO, "%s: write failed", st->p->save_logprobs);
    return 0;
}

/* score the rows gathered in xs (targets tgt): per-row statistics on the backend, the sums on the host in
 * row order */
static int score_rows(struct ppl_state *st, int64_t ns) {
    const struct mb_ops *o = st->ops;
    int64_t V = st->V, H = st->H;
    int rc = 0, K = st->K;
    if ((rc = o->upload(st->tgt_b, st->tgt, (size_t)ns * sizeof *st->tgt))) return rc;
    for (int64_t r0 = 0; r0 < ns && !rc; r0 += st->head_rows) {
        int64_t nr = ns - r0 < st->head_rows ? ns - r0 : st->head_rows;
        if ((rc = mb_fwd_logits(&st->f, st->xs + r0 * H, nr, st->logits))) break;
        o->logit_stats(st->logits, nr, V, st->tgt_b + r0, st->lse_b, st->tl_b, st->am_b);
        if ((rc = o->download(st->lse, st->lse_b, (size_t)nr * sizeof *st->lse)) || (rc = o->download(st->tl, st->tl_b, (size_t)nr * sizeof *st->tl)) ||
            (rc = o->download(st->am, st->am_b, (size_t)nr * sizeof *st->am)))
            break;
        if (st->saving) {
            o->topk(st->logits, nr, V, K, st->ids_b, st->vals_b);
            if ((rc = o->download(st->tk_ids, st->ids_b, (size_t)(nr * K) * sizeof *st->tk_ids)) ||
                (rc = o->download(st->tk_v, st->vals_b, (size_t)(nr * K) * sizeof *st->tk_v)))
                break;
        }
        if (st->kf) { /* the reference records of these rows, and this model's logits at their ids */
            for (int64_t i = 0; i < nr && !rc; i++) {
                uint8_t *rec = st->rec + (size_t)i * st->recsz;
                if (fread(rec, 1, st->recsz, st->kf) != st->recsz) { rc = mb_fail(MB_EINVAL, "%s: has fewer positions than this run (made on another text?)", st->p->kld); break; }
                for (int k = 0; k < st->kref; k++) {
                    uint32_t id = get32(rec + 8 * k);
                    if (id >= (uint32_t)V) { rc = mb_fail(MB_EFORMAT, "%s: token id %u out of range", st->p->kld, id); break; }
                    st->ref_ids[i * st->kref + k] = (int32_t)id;
                }
            }
            if (rc) break;
            if ((rc = o->upload(st->ids_b, st->ref_ids, (size_t)(nr * st->kref) * sizeof *st->ref_ids))) break;
            o->gather_cols(st->logits, nr, V, st->ids_b, st->kref, st->vals_b);
            if ((rc = o->download(st->ref_lq, st->vals_b, (size_t)(nr * st->kref) * sizeof *st->ref_lq))) break;
        }
        for (int64_t i = 0; i < nr && !rc; i++) {
            double lse = st->lse[i];
            if (!isfinite(lse) || !isfinite(st->tl[i])) {
                rc = mb_fail(MB_ENUMERIC, "the logits at scored position %lld are not finite (log-sum-exp %g): the final norm or the head (lm_head) holds non-finite values",
                             (long long)(st->scored), lse);
                break;
            }
            st->nll_sum += lse - st->tl[i];
            if (st->saving) {
                const int32_t *ids = st->tk_ids + i * K;
                const float *vals = st->tk_v + i * K;
                uint8_t *rec = st->srec;
                double mass = 0;
                for (int k = 0; k < K; k++) {
                    double lp = vals[k] - lse;
                    mass += exp(lp);
                    put32(rec + 8 * k, (uint32_t)ids[k]);
                    float fl = (float)lp;
                    memcpy(rec + 8 * k + 4, &fl, 4);
                }
                float rest = mass < 1 ? (float)log1p(-mass) : -INFINITY;
                memcpy(rec + 8 * K, &rest, 4);
                if (fwrite(rec, 1, st->srecsz, st->af.f) != st->srecsz) { rc = mb_fail(MB_EIO, "%s: write failed", st->p->save_logprobs); break; }
            }
            if (st->kf) {
                const uint8_t *rec = st->rec + (size_t)i * st->recsz;
                double kl = 0, qmass = 0;
                for (int k = 0; k < st->kref; k++) {
                    float lp;
                    memcpy(&lp, rec + 8 * k + 4, 4);
                    /* a log-probability is finite and at most 0 (1e-4 of rounding) */
                    if (!isfinite(lp) || lp > 1e-4f) {
                        rc = mb_fail(MB_EFORMAT, "%s: position %lld, entry %d: %g is not a log-probability", st->p->kld, (long long)st->scored, k, lp);
                        break;
                    }
                    double lq = st->ref_lq[i * st->kref + k] - lse, pp = exp((double)lp);
                    kl += pp * ((double)lp - lq);
                    qmass += exp(lq);
                }
                if (rc) break;
                float rest;
                memcpy(&rest, rec + 8 * st->kref, 4);
                if (isnan(rest) || rest > 1e-4f) { rc = mb_fail(MB_EFORMAT, "%s: position %lld: remaining mass %g is not a log-probability", st->p->kld, (long long)st->scored, rest); break; }
                double prest = isfinite(rest) ? exp((double)rest) : 0, qrest = 1 - qmass;
                if (qrest < 1e-30) qrest = 1e-30;
                if (prest > 0) kl += prest * ((double)rest - log(qrest));
                if (kl < 0) kl = 0; /* rounding of a sum of tiny terms */
                st->kld_sum += kl;
                int bin = kl <= 0 ? 0 : (int)floor((log10(kl) - KH_LO) / (KH_HI - KH_LO) * KH_BINS);
                st->khist[bin < 0 ? 0 : bin >= KH_BINS ? KH_BINS - 1 : bin]++;
                st->same += get32(rec) == (uint32_t)st->am[i];
            }
            st->scored++;
        }
    }
    return rc;
}

/* run the pending windows (all of length T) as one batch */
static int run_pending(struct ppl_state *st) {
    if (st->npend == 0) return 0;
    int64_t T = st->pend[0].T, S = st->npend, H = st->H;
    int rc = 0;
    for (int64_t s = 0; s < S; s++) {
        memcpy(st->bids + s * T, st->tok + (st->pend[s].begin - st->base), (size_t)T * sizeof *st->bids);
        if (st->pend[s].bos) st->bids[s * T] = st->p->bos_id;
    }
    if ((rc = mb_fwd_embed(&st->f, st->bids, S * T, st->x))) return rc;
    if ((rc = mb_fwd_run(&st->f, 0, (int)(2 * st->c->n_layers), st->x, S, T, NULL))) return rc;
    st->evaluated += S * T;
    int64_t ns = 0;
    for (int64_t s = 0; s < S; s++)
        for (int64_t t = st->pend[s].lo; t < st->pend[s].hi; t++) {
            st->sidx[ns] = (int32_t)(s * T + t - 1);
            st->tgt[ns++] = st->tok[st->pend[s].begin - st->base + t];
        }
    if ((rc = st->ops->upload(st->sidx_b, st->sidx, (size_t)ns * sizeof *st->sidx))) return rc;
    st->ops->gather_rows(st->xs, st->x, st->sidx_b, ns, H);                       // xs [ns, H]: the scored rows
    rc = score_rows(st, ns);
    st->npend = 0;
    mb_progress_update(&st->pr, st->consumed);
    return rc;
}

static int add_window(struct ppl_state *st, struct window w) {
    int rc;
    if (st->npend > 0 && (st->pend[0].T != w.T || (st->npend + 1) * w.T > st->rows) && (rc = run_pending(st))) return rc;
    if (st->npend == st->pend_cap) {
        int nc = st->pend_cap ? st->pend_cap * 2 : 16;
        struct window *np = realloc(st->pend, nc * sizeof *np);
        if (!np) return mb_fail(MB_ENOMEM, "out of memory");
        st->pend = np;
        st->pend_cap = nc;
    }
    st->pend[st->npend++] = w;
    return 0;
}

/* plan the windows the tokens seen so far allow (all of them when the stream has ended) */
static int plan(struct ppl_state *st) {
    const struct mb_ppl_params *p = st->p;
    int64_t n = st->consumed, ctx = p->ctx;
    int rc = 0;
    if (p->convention == MB_PPL_LLAMACPP) {
        while (!rc && st->next_begin + ctx <= n) {
            rc = add_window(st, (struct window){st->next_begin, ctx, ctx / 2 + 1, ctx, p->bos});
            st->next_begin += ctx;
        }
    } else {
        int64_t stride = p->stride > 0 ? p->stride : ctx;
        while (!rc && st->next_begin < n && (st->done_feeding || st->next_begin + ctx <= n)) {
            int64_t begin = st->next_begin, end = begin + ctx < n ? begin + ctx : n, T = end - begin;
            int64_t lo = (st->prev_end > begin + 1 ? st->prev_end : begin + 1) - begin;
            if (T >= 2 && lo < T) rc = add_window(st, (struct window){begin, T, lo, T, 0});
            st->prev_end = end;
            st->next_begin += stride;
            if (end == n && st->done_feeding) break;
        }
    }
    return rc;
}

static int ppl_feed(const int32_t *ids, int64_t n, void *user) {
    struct ppl_state *st = user;
    if (st->p->max_tokens > 0 && st->consumed + n > st->p->max_tokens) n = st->p->max_tokens - st->consumed;
    if (n <= 0) return 0;
    /* drop what no pending or future window needs */
    int64_t keep = st->npend ? st->pend[0].begin : st->next_begin;
    if (keep > st->base) {
        int64_t drop = keep - st->base < st->ntok ? keep - st->base : st->ntok;
        memmove(st->tok, st->tok + drop, (size_t)(st->ntok - drop) * sizeof *st->tok);
        st->ntok -= drop;
        st->base += drop;
    }
    if (st->ntok + n > st->cap) {
        int64_t nc = st->cap ? st->cap : 65536;
        while (nc < st->ntok + n) nc *= 2;
        int32_t *np = realloc(st->tok, (size_t)nc * sizeof *np);
        if (!np) return mb_fail(MB_ENOMEM, "out of memory for the token window");
        st->tok = np;
        st->cap = nc;
    }
    memcpy(st->tok + st->ntok, ids, (size_t)n * sizeof *ids);
    st->ntok += n;
    const uint8_t *b = (const uint8_t *)ids;
    for (int64_t i = 0; i < n * 4; i++) { st->hash ^= b[i]; st->hash *= 0x100000001b3ull; }
    st->consumed += n;
    return plan(st);
}

static void ppl_free(struct ppl_state *st) {
    if (st->saving && st->af.f) mb_atomic_abort(&st->af);
    if (st->kf) fclose(st->kf);
    if (st->f.ops) {
        const struct mb_ops *o = st->ops;
        o->free(st->x); o->free(st->xs); o->free(st->logits);
        o->free(st->sidx_b); o->free(st->tgt_b); o->free(st->ids_b); o->free(st->am_b); o->free(st->lse_b); o->free(st->tl_b); o->free(st->vals_b);
        mb_fwd_free(&st->f);
    }
    free(st->bids); free(st->sidx); free(st->tgt); free(st->tk_ids); free(st->ref_ids); free(st->am); free(st->tk_v); free(st->tl); free(st->ref_lq);
    free(st->lse); free(st->rec); free(st->srec); free(st->tok); free(st->pend); free(st->khist);
}

static int ppl_begin(struct ppl_state *st, const struct mb_model *m, uint64_t tok_hash, const struct mb_ppl_params *p) {
    memset(st, 0, sizeof *st);
    st->m = m;
    st->c = &m->cfg;
    st->p = p;
    st->ops = p->ops ? p->ops : &mb_ops_cpu;
    st->tok_hash = tok_hash;
    st->hash = 0xcbf29ce484222325ull;
    const struct mb_config *c = st->c;
    if (p->ctx < 4) return mb_fail(MB_EINVAL, "context %lld is too small", (long long)p->ctx);
    if (p->topk < 1 || p->topk > c->vocab || p->topk > 4096) return mb_fail(MB_EINVAL, "top-k %d outside 1..%lld", p->topk, (long long)(c->vocab < 4096 ? c->vocab : 4096));
    if (p->stride < 0 || p->stride > p->ctx) return mb_fail(MB_EINVAL, "stride %lld outside 1..ctx", (long long)p->stride);
    if (p->bos && (p->bos_id < 0 || p->bos_id >= c->vocab)) return mb_fail(MB_EINVAL, "BOS id %d outside the model's vocabulary (%lld)", p->bos_id, (long long)c->vocab);
    st->rows = p->batch_tokens > p->ctx ? p->batch_tokens / p->ctx * p->ctx : p->ctx;
    size_t lb;
    int rc;
    if ((rc = mb_size_mul(&lb, MB_SIZE_LIMIT, "perplexity batch", st->rows, c->hidden > c->ffn ? c->hidden : c->ffn, sizeof(float))) ||
        (rc = mb_size_mul(&lb, MB_SIZE_LIMIT, "logits", 256, c->vocab, sizeof(float))))
        return rc;
    st->H = c->hidden;
    st->V = c->vocab;
    st->head_rows = 256;
    st->K = p->topk;
    st->srecsz = (size_t)8 * st->K + 4;
    if ((rc = mb_fwd_init(&st->f, m, st->ops, st->rows, p->ctx))) return rc;
    /* k columns per row: top-k (saving) or the reference's k (KLD), at most 4096 */
    const struct mb_ops *o = st->ops;
    int64_t R = st->rows, HR = st->head_rows, KC = 4096;
    st->x = o->alloc((size_t)(R * st->H) * sizeof(float));
    st->xs = o->alloc((size_t)(R * st->H) * sizeof(float));
    st->logits = o->alloc((size_t)(HR * st->V) * sizeof(float));
    st->sidx_b = o->alloc((size_t)R * sizeof(int32_t));
    st->tgt_b = o->alloc((size_t)R * sizeof(int32_t));
    st->ids_b = o->alloc((size_t)(HR * KC) * sizeof(int32_t));
    st->vals_b = o->alloc((size_t)(HR * KC) * sizeof(float));
    st->am_b = o->alloc((size_t)HR * sizeof(int32_t));
    st->lse_b = o->alloc((size_t)HR * sizeof(double));
    st->tl_b = o->alloc((size_t)HR * sizeof(float));
    st->bids = malloc((size_t)R * sizeof *st->bids);
    st->sidx = malloc((size_t)R * sizeof *st->sidx);
    st->tgt = malloc((size_t)R * sizeof *st->tgt);
    st->tk_ids = malloc((size_t)(HR * st->K) * sizeof *st->tk_ids);
    st->tk_v = malloc((size_t)(HR * st->K) * sizeof *st->tk_v);
    st->ref_ids = malloc((size_t)(HR * KC) * sizeof *st->ref_ids);
    st->ref_lq = malloc((size_t)(HR * KC) * sizeof *st->ref_lq);
    st->am = malloc((size_t)HR * sizeof *st->am);
    st->lse = malloc((size_t)HR * sizeof *st->lse);
    st->tl = malloc((size_t)HR * sizeof *st->tl);
    st->rec = malloc((size_t)HR * (8 * KC + 4));
    st->srec = malloc((size_t)8 * KC + 4);
    if (!st->x || !st->xs || !st->logits || !st->sidx_b || !st->tgt_b || !st->ids_b || !st->vals_b || !st->am_b || !st->lse_b || !st->tl_b || !st->bids ||
        !st->sidx || !st->tgt || !st->tk_ids || !st->tk_v || !st->ref_ids || !st->ref_lq || !st->am || !st->lse || !st->tl || !st->rec || !st->srec)
        return mb_fail(MB_ENOMEM, "out of memory for perplexity buffers");
    if (p->save_logprobs) {
        if ((rc = mb_atomic_open(&st->af, p->save_logprobs))) return rc;
        st->saving = 1;
        if ((rc = write_header(st))) return rc; /* placeholder, rewritten at the end */
    }
    if (p->kld) {
        size_t ksize;
        if ((rc = mb_fopen_regular(p->kld, &st->kf, &ksize))) return rc;
        uint8_t h[LP_HEADER];
        if (fread(h, 1, LP_HEADER, st->kf) != LP_HEADER || memcmp(h, LP_MAGIC, 8)) return mb_fail(MB_EFORMAT, "%s: not a mixbit log-probability file", p->kld);
        st->kref = (int)get32(h + 8);
        if (st->kref < 1 || st->kref > 4096) return mb_fail(MB_EFORMAT, "%s: bad k %d", p->kld, st->kref);
        if (get32(h + 12) != (uint32_t)st->V) return mb_fail(MB_EINVAL, "%s: vocabulary %u differs from this model's %lld", p->kld, get32(h + 12), (long long)st->V);
        if (get64(h + 24) != tok_hash) return mb_fail(MB_EINVAL, "%s: made with another tokenizer", p->kld);
        if (get32(h + 40) != (uint32_t)p->convention || get32(h + 44) != (uint32_t)p->ctx)
            return mb_fail(MB_EINVAL, "%s: made with another convention or context (%s, ctx %u)", p->kld, get32(h + 40) ? "llamacpp" : "paper", get32(h + 44));
        st->ref_positions = get64(h + 16);
        st->ref_hash = get64(h + 32);
        st->ref_n = get64(h + 48);
        st->recsz = (size_t)8 * st->kref + 4;
        st->khist = calloc(KH_BINS, sizeof *st->khist);
        if (!st->khist) return mb_fail(MB_ENOMEM, "out of memory");
    }
    mb_progress_begin(&st->pr, "perplexity", "tok", p->max_tokens);
    if (!p->progress) st->pr.active = 0;
    st->t0 = mb_now();
    return 0;
}

static int ppl_end(struct ppl_state *st, struct mb_ppl_result *r) {
    const struct mb_ppl_params *p = st->p;
    int rc;
    st->done_feeding = 1;
    if ((rc = plan(st)) || (rc = run_pending(st))) return rc;
    mb_progress_end(&st->pr);
    if (p->convention == MB_PPL_LLAMACPP && st->consumed < p->ctx)
        return mb_fail(MB_EINVAL, "the text has %lld tokens, fewer than one chunk of %lld (llamacpp convention)", (long long)st->consumed, (long long)p->ctx);
    if (st->scored == 0) return mb_fail(MB_EINVAL, "the text has too few tokens (%lld) to score", (long long)st->consumed);
    r->seconds = mb_now() - st->t0;
    r->tokens = st->scored;
    r->evaluated = st->evaluated;
    r->mean_nll = st->nll_sum / (double)st->scored;
    r->ppl = exp(r->mean_nll);
    if (!isfinite(r->ppl)) return mb_fail(MB_ENUMERIC, "perplexity is not finite (mean NLL %g over %lld tokens)", r->mean_nll, (long long)st->scored);
    r->tok_per_s = st->evaluated / (r->seconds > 0 ? r->seconds : 1e-9);
    if (st->kf) {
        uint8_t extra;
        if (st->ref_positions != (uint64_t)st->scored || st->ref_hash != st->hash || st->ref_n != (uint64_t)st->consumed || fread(&extra, 1, 1, st->kf) == 1)
            return mb_fail(MB_EINVAL, "%s: made on another text (token streams differ)", p->kld);
        r->has_kld = 1;
        r->kld_mean = st->kld_sum / (double)st->scored;
        int64_t want = (int64_t)ceil(0.99 * st->scored), acc = 0;
        for (int b = 0; b < KH_BINS; b++) {
            acc += st->khist[b];
            if (acc >= want) { r->kld_p99 = b == 0 && st->khist[0] == acc ? 0 : pow(10.0, KH_LO + (KH_HI - KH_LO) * (b + 1) / KH_BINS); break; }
        }
        r->same_top1 = 100.0 * st->same / (double)st->scored;
    }
    if (st->saving) {
        if ((rc = write_header(st))) return rc;
        rc = mb_atomic_commit(&st->af);
        st->saving = 0;
        if (rc) return rc;
    }
    return 0;
}

int mb_ppl_run(const struct mb_model *m, const int32_t *ids, int64_t n, uint64_t tok_hash, const struct mb_ppl_params *p, struct mb_ppl_result *r) {
    memset(r, 0, sizeof *r);
    struct ppl_state *st = malloc(sizeof *st);
    if (!st) return mb_fail(MB_ENOMEM, "out of memory");
    int rc = ppl_begin(st, m, tok_hash, p);
    for (int64_t i = 0; !rc && i < n; i += 65536) rc = ppl_feed(ids + i, n - i < 65536 ? n - i : 65536, st);
    if (!rc) rc = ppl_end(st, r);
    ppl_free(st);
    free(st);
    return rc;
}

int mb_ppl_run_file(const struct mb_model *m, const struct mb_tokenizer *t, const char *path, const struct mb_ppl_params *p, struct mb_ppl_result *r) {
    memset(r, 0, sizeof *r);
    struct ppl_state *st = malloc(sizeof *st);
    if (!st) return mb_fail(MB_ENOMEM, "out of memory");
    int rc = ppl_begin(st, m, mb_tokenizer_hash(t), p);
    if (!rc) rc = mb_tokenize_stream(t, path, p->bos, ppl_feed, st);
    if (!rc) rc = ppl_end(st, r);
    ppl_free(st);
    free(st);
    return rc;
}

int mb_seq_nll(const struct mb_model *m, const struct mb_ops *ops, const int32_t *ids, int64_t T, double *nll, int32_t *argmax) {
    const struct mb_config *c = &m->cfg;
    struct mb_fwd f;
    int rc = mb_fwd_init(&f, m, ops, T, T);
    if (rc) return rc;
    int64_t H = c->hidden, V = c->vocab;
    float *x = ops->alloc((size_t)(T * H) * sizeof *x), *lg = ops->alloc((size_t)(T * V) * sizeof *lg), *tl_b = ops->alloc((size_t)T * sizeof(float));
    double *lse_b = ops->alloc((size_t)T * sizeof(double)), *lse = malloc((size_t)T * sizeof *lse);
    int32_t *tgt_b = ops->alloc((size_t)T * sizeof(int32_t)), *am_b = ops->alloc((size_t)T * sizeof(int32_t)), *tgt = malloc((size_t)T * sizeof *tgt);
    float *tl = malloc((size_t)T * sizeof *tl);
    int32_t *am = malloc((size_t)T * sizeof *am);
    if (!x || !lg || !tl_b || !lse_b || !lse || !tgt_b || !am_b || !tgt || !tl || !am) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto done; }
    for (int64_t i = 0; i < T; i++) tgt[i] = i + 1 < T ? ids[i + 1] : 0;
    if ((rc = mb_fwd_embed(&f, ids, T, x))) goto done;
    if ((rc = mb_fwd_run(&f, 0, (int)(2 * c->n_layers), x, 1, T, NULL))) goto done;
    if ((rc = mb_fwd_logits(&f, x, T, lg))) goto done;
    if ((rc = ops->upload(tgt_b, tgt, (size_t)T * sizeof *tgt))) goto done;
    ops->logit_stats(lg, T, V, tgt_b, lse_b, tl_b, am_b);
    if ((rc = ops->download(lse, lse_b, (size_t)T * sizeof *lse)) || (rc = ops->download(tl, tl_b, (size_t)T * sizeof *tl)) ||
        (rc = ops->download(am, am_b, (size_t)T * sizeof *am)))
        goto done;
    for (int64_t i = 0; i + 1 < T; i++) {
        nll[i] = lse[i] - tl[i];
        if (argmax) argmax[i] = am[i];
    }
done:
    ops->free(x); ops->free(lg); ops->free(tl_b); ops->free(lse_b); ops->free(tgt_b); ops->free(am_b);
    free(lse); free(tgt); free(tl); free(am);
    mb_fwd_free(&f);
    return rc;
}
