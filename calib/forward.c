/* calib/forward.c: the Llama / Mistral / Mixtral forward pass over the operations table, one decoder
 * module at a time over a batch of sequences. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "calib.h"

/* ---- weights ---- */
int mb_weight_f32(const struct mb_model *m, const char *module, int64_t rows, int64_t cols, float *out) {
    char nm[192];
    snprintf(nm, sizeof nm, "%s.q_weight", module);
    if (m->cfg.is_exl2 && mb_st_find(m->st, nm)) return mb_exl2_load_dense(m->st, module, rows, cols, out);
    snprintf(nm, sizeof nm, "%s.weight", module);
    const struct mb_tensor_info *t;
    int rc = mb_st_get(m->st, nm, &t);
    if (rc) return rc;
    if (t->numel != rows * cols) return mb_fail(MB_EFORMAT, "%s: tensor %s has %lld elements, expected %lld", t->file, nm, (long long)t->numel, (long long)(rows * cols));
    return mb_tensor_to_f32(t, out);
}

static float *load_vec(const struct mb_model *m, const char *name, int64_t n, int *rc) {
    const struct mb_tensor_info *t;
    if ((*rc = mb_st_get(m->st, name, &t))) return NULL;
    if (t->numel != n) { *rc = mb_fail(MB_EFORMAT, "%s: tensor %s has %lld elements, expected %lld", t->file, name, (long long)t->numel, (long long)n); return NULL; }
    float *v = mb_malloc((size_t)n * sizeof *v, name);
    if (!v) { *rc = MB_ENOMEM; return NULL; }
    if ((*rc = mb_tensor_to_f32(t, v))) { free(v); return NULL; }
    return v;
}

void mb_layer_free(struct mb_layer_w *w) {
    if (!w) return;
    free(w->attn_norm);
    free(w->mlp_norm);
    for (int p = 0; p < MB_P_COUNT; p++) free(w->w[p]);
    free(w->router);
    for (int k = 0; k < 3; k++) {
        if (!w->xw[k]) continue;
        for (int e = 0; e < w->n_experts; e++) free(w->xw[k][e]);
        free(w->xw[k]);
    }
    free(w);
}

int mb_layer_load(const struct mb_model *m, int layer, struct mb_layer_w **out) {
    *out = NULL;
    const struct mb_config *c = &m->cfg;
    if (layer < 0 || layer >= c->n_layers) return mb_fail(MB_ERANGE, "layer %d out of range", layer);
    struct mb_layer_w *w = calloc(1, sizeof *w);
    if (!w) return mb_fail(MB_ENOMEM, "out of memory");
    w->layer = layer;
    int rc = 0;
    char nm[192];
    snprintf(nm, sizeof nm, "model.layers.%d.input_layernorm.weight", layer);
    if (!(w->attn_norm = load_vec(m, nm, c->hidden, &rc))) goto fail;
    snprintf(nm, sizeof nm, "model.layers.%d.post_attention_layernorm.weight", layer);
    if (!(w->mlp_norm = load_vec(m, nm, c->hidden, &rc))) goto fail;
    for (int i = 0; i < m->n_ex; i++) {
        const struct mb_expect *e = &m->ex[i];
        if (e->layer != layer || e->kind != MB_T_LINEAR) continue;
        float *buf = mb_malloc((size_t)(e->rows * e->cols) * sizeof(float), e->name);
        if (!buf) { rc = MB_ENOMEM; goto fail; }
        if ((rc = mb_weight_f32(m, e->name, e->rows, e->cols, buf))) { free(buf); goto fail; }
        if (e->expert >= 0) {
            int k = e->proj - MB_P_GATE;
            if (!w->xw[k]) {
                w->xw[k] = calloc(c->n_experts, sizeof(float *));
                if (!w->xw[k]) { free(buf); rc = mb_fail(MB_ENOMEM, "out of memory"); goto fail; }
            }
            w->xw[k][e->expert] = buf;
        } else {
            w->w[e->proj] = buf;
        }
    }
    w->n_experts = c->n_experts;
    if (c->n_experts) {
        snprintf(nm, sizeof nm, "model.layers.%d.block_sparse_moe.gate.weight", layer);
        if (!(w->router = load_vec(m, nm, (int64_t)c->n_experts * c->hidden, &rc))) goto fail;
    }
    *out = w;
    return 0;
fail:
    mb_layer_free(w);
    return rc;
}

/* ---- forward ---- */
void mb_fwd_free(struct mb_fwd *f) {
    if (!f->ops) return;
    const struct mb_ops *o = f->ops;
    o->free(f->cos_t); o->free(f->sin_t);
    o->free(f->xn); o->free(f->q); o->free(f->k); o->free(f->v); o->free(f->att);
    o->free(f->g); o->free(f->u); o->free(f->tmp); o->free(f->rl);
    o->free(f->xg); o->free(f->xgo);
    free(f->rowidx); free(f->roww);
    if (f->head != f->embed) o->free(f->head);
    o->free(f->embed);
    o->free(f->norm);
    memset(f, 0, sizeof *f);
}

static void rope_tables(const struct mb_config *c, int64_t T, float *cos_t, float *sin_t) {
    int64_t half = c->head_dim / 2;
    for (int64_t j = 0; j < half; j++) {
        double inv = 1.0 / pow(c->rope_theta, (double)(2 * j) / (double)c->head_dim);
        if (c->rope_type == MB_ROPE_LINEAR) inv /= c->rope_factor;
        else if (c->rope_type == MB_ROPE_LLAMA3) {
            double old = (double)c->rope_orig_max_pos, lo_wl = old / c->rope_low_freq, hi_wl = old / c->rope_high_freq;
            double wl = 2 * M_PI / inv;
            if (wl < hi_wl) {}
            else if (wl > lo_wl) inv /= c->rope_factor;
            else {
                double smooth = (old / wl - c->rope_low_freq) / (c->rope_high_freq - c->rope_low_freq);
                inv = (1 - smooth) * inv / c->rope_factor + smooth * inv;
            }
        }
        for (int64_t t = 0; t < T; t++) {
            double a = (double)t * inv;
            cos_t[t * half + j] = (float)cos(a);
            sin_t[t * half + j] = (float)sin(a);
        }
    }
}

#define FALLOC(ptr, n)                                                                      \
    do {                                                                                    \
        if (!((ptr) = o->alloc((size_t)(n) * sizeof(float)))) { rc = mb_fail(MB_ENOMEM, "out of memory for activations (%lld floats)", (long long)(n)); goto fail; } \
    } while (0)

int mb_fwd_init(struct mb_fwd *f, const struct mb_model *m, const struct mb_ops *ops, int64_t max_rows, int64_t max_T) {
    memset(f, 0, sizeof *f);
    const struct mb_config *c = &m->cfg;
    const struct mb_ops *o = ops;
    int rc = 0;
    f->m = m;
    f->c = c;
    f->ops = ops;
    f->max_rows = max_rows;
    f->max_T = max_T;
    int64_t H = c->hidden, qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim, F = c->ffn;
    FALLOC(f->cos_t, max_T * (c->head_dim / 2));
    FALLOC(f->sin_t, max_T * (c->head_dim / 2));
    rope_tables(c, max_T, f->cos_t, f->sin_t);
    FALLOC(f->xn, max_rows * (H > qd ? H : qd));
    FALLOC(f->q, max_rows * qd);
    FALLOC(f->k, max_rows * kvd);
    FALLOC(f->v, max_rows * kvd);
    FALLOC(f->att, max_rows * qd);
    FALLOC(f->g, max_rows * F);
    FALLOC(f->u, max_rows * F);
    FALLOC(f->tmp, max_rows * H);
    if (c->n_experts) {
        FALLOC(f->rl, max_rows * c->n_experts);
        FALLOC(f->xg, max_rows * H);
        FALLOC(f->xgo, max_rows * H);
        f->rowidx = malloc((size_t)max_rows * sizeof *f->rowidx);
        f->roww = malloc((size_t)max_rows * sizeof *f->roww);
        if (!f->rowidx || !f->roww) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto fail; }
    }
    FALLOC(f->embed, c->vocab * H);
    if ((rc = mb_weight_f32(m, "model.embed_tokens", c->vocab, H, f->embed))) goto fail;
    FALLOC(f->norm, H);
    {
        const struct mb_tensor_info *t;
        if ((rc = mb_st_get(m->st, "model.norm.weight", &t)) || (rc = mb_tensor_to_f32(t, f->norm))) goto fail;
    }
    int head_present = mb_st_find(m->st, "lm_head.weight") || mb_st_find(m->st, "lm_head.q_weight");
    if (c->tied && !head_present) f->head = f->embed;
    else {
        FALLOC(f->head, c->vocab * H);
        if ((rc = mb_weight_f32(m, "lm_head", c->vocab, H, f->head))) goto fail;
    }
    return 0;
fail:
    mb_fwd_free(f);
    return rc;
}

int mb_fwd_embed(struct mb_fwd *f, const int32_t *ids, int64_t M, float *x) {
    int64_t H = f->c->hidden;
    for (int64_t i = 0; i < M; i++) {
        if (ids[i] < 0 || ids[i] >= f->c->vocab) return mb_fail(MB_ERANGE, "token id %d outside the model's vocabulary (%lld)", ids[i], (long long)f->c->vocab);
        memcpy(x + i * H, f->embed + (int64_t)ids[i] * H, (size_t)H * sizeof *x);
    }
    return 0;
}

static int check_finite(const float *x, int64_t n, const char *what, int layer) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return mb_fail(MB_ENUMERIC, "layer %d %s: non-finite activation (%g at element %lld)", layer, what, x[i], (long long)i);
    return 0;
}

int mb_fwd_attn(struct mb_fwd *f, const struct mb_layer_w *w, float *x, int64_t S, int64_t T, const struct mb_capture *cap) {
    const struct mb_config *c = f->c;
    const struct mb_ops *o = f->ops;
    int64_t M = S * T, H = c->hidden, qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;
    if (M > f->max_rows || T > f->max_T) return mb_fail(MB_ERANGE, "batch %lld x %lld exceeds the buffers (%lld rows, %lld tokens)", (long long)S, (long long)T, (long long)f->max_rows, (long long)f->max_T);
    o->rmsnorm(f->xn, x, w->attn_norm, M, H, (float)c->rms_eps);                  // xn [M, H]
    if (cap && cap->fn) cap->fn(cap->user, w->layer, MB_CAP_QKV, -1, f->xn, M, H);
    o->matmul(f->q, f->xn, w->w[MB_P_Q], M, H, qd, 0);                             // q [M, nh*hd]
    o->matmul(f->k, f->xn, w->w[MB_P_K], M, H, kvd, 0);                            // k [M, nkv*hd]
    o->matmul(f->v, f->xn, w->w[MB_P_V], M, H, kvd, 0);                            // v [M, nkv*hd]
    o->rope(f->q, S, T, c->n_heads, c->head_dim, f->cos_t, f->sin_t);
    o->rope(f->k, S, T, c->n_kv_heads, c->head_dim, f->cos_t, f->sin_t);
    o->attention(f->att, f->q, f->k, f->v, S, T, c->n_heads, c->n_kv_heads, c->head_dim, c->sliding_window); // att [M, nh*hd]
    if (cap && cap->fn) cap->fn(cap->user, w->layer, MB_CAP_O, -1, f->att, M, qd);
    o->matmul(x, f->att, w->w[MB_P_O], M, qd, H, 1);                               // x += att @ Wo^T
    return check_finite(x, M * H, "attention output", w->layer);
}

/* MoE routing of one row as Hugging Face's Mixtral: softmax over the router logits (f32), top-k,
 * weights renormalized over the chosen experts */
static void route_row(const float *logits, int E, int K, int *sel, float *wsel, float *probs) {
    float mx = logits[0];
    for (int e = 1; e < E; e++) if (logits[e] > mx) mx = logits[e];
    double sum = 0;
    for (int e = 0; e < E; e++) { probs[e] = expf(logits[e] - mx); sum += probs[e]; }
    for (int e = 0; e < E; e++) probs[e] = (float)(probs[e] / sum);
    unsigned char used[1024] = {0};
    double ws = 0;
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int e = 0; e < E; e++) if (!used[e] && (best < 0 || probs[e] > probs[best])) best = e;
        used[best] = 1;
        sel[k] = best;
        wsel[k] = probs[best];
        ws += probs[best];
    }
    for (int k = 0; k < K; k++) wsel[k] = (float)(wsel[k] / ws);
}

struct rank_ent { float p; int64_t row; };
static int cmp_rank(const void *a, const void *b) {
    const struct rank_ent *x = a, *y = b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return x->row < y->row ? -1 : x->row > y->row;
}

int mb_fwd_mlp(struct mb_fwd *f, const struct mb_layer_w *w, float *x, int64_t M, const struct mb_capture *cap) {
    const struct mb_config *c = f->c;
    const struct mb_ops *o = f->ops;
    int64_t H = c->hidden, F = c->ffn;
    if (M > f->max_rows) return mb_fail(MB_ERANGE, "batch of %lld rows exceeds the buffers (%lld)", (long long)M, (long long)f->max_rows);
    o->rmsnorm(f->xn, x, w->mlp_norm, M, H, (float)c->rms_eps);                  // xn [M, H]
    if (cap && cap->fn) cap->fn(cap->user, w->layer, MB_CAP_GATEUP, -1, f->xn, M, H);
    if (!c->n_experts) {
        o->matmul(f->g, f->xn, w->w[MB_P_GATE], M, H, F, 0);                       // g [M, F]
        o->matmul(f->u, f->xn, w->w[MB_P_UP], M, H, F, 0);                         // u [M, F]
        o->swiglu(f->g, f->u, M * F);                                              // g = silu(g) * u
        if (cap && cap->fn) cap->fn(cap->user, w->layer, MB_CAP_DOWN, -1, f->g, M, F);
        o->matmul(x, f->g, w->w[MB_P_DOWN], M, F, H, 1);                           // x += g @ Wd^T
        return check_finite(x, M * H, "MLP output", w->layer);
    }
    /* sparse MoE */
    int E = c->n_experts, K = c->n_experts_per_tok;
    o->matmul(f->rl, f->xn, w->router, M, H, E, 0);                                // rl [M, E]
    int *sel = malloc((size_t)M * K * sizeof *sel);
    float *wsel = malloc((size_t)M * K * sizeof *wsel), *probs = malloc((size_t)M * E * sizeof *probs);
    struct rank_ent *rank = NULL;
    if (!sel || !wsel || !probs) { free(sel); free(wsel); free(probs); return mb_fail(MB_ENOMEM, "out of memory"); }
    for (int64_t i = 0; i < M; i++) route_row(f->rl + i * E, E, K, sel + i * K, wsel + i * K, probs + i * E);
    memset(f->tmp, 0, (size_t)(M * H) * sizeof(float));
    int rc = 0;
    for (int e = 0; e < E && !rc; e++) {
        int64_t n = 0;
        for (int64_t i = 0; i < M; i++)
            for (int k = 0; k < K; k++)
                if (sel[i * K + k] == e) { f->rowidx[n] = i; f->roww[n] = wsel[i * K + k]; n++; }
        int64_t routed = n;
        if (cap && cap->expert_tokens) cap->expert_tokens[(int64_t)w->layer * E + e] += routed;
        /* starved expert: add the rows that rank it highest, for the Hessian only */
        if (cap && cap->fn && cap->min_expert_rows > routed && routed < M) {
            if (!rank && !(rank = malloc((size_t)M * sizeof *rank))) { rc = mb_fail(MB_ENOMEM, "out of memory"); break; }
            int64_t nr = 0;
            for (int64_t i = 0; i < M; i++) {
                int chosen = 0;
                for (int k = 0; k < K; k++) chosen |= sel[i * K + k] == e;
                if (!chosen) rank[nr++] = (struct rank_ent){probs[i * E + e], i};
            }
            qsort(rank, nr, sizeof *rank, cmp_rank);
            for (int64_t j = 0; j < nr && n < cap->min_expert_rows; j++) { f->rowidx[n] = rank[j].row; f->roww[n] = 0; n++; }
        }
        if (n == 0) continue;
        for (int64_t j = 0; j < n; j++) memcpy(f->xg + j * H, f->xn + f->rowidx[j] * H, (size_t)H * sizeof(float)); // xg [n, H]
        o->matmul(f->g, f->xg, w->xw[0][e], n, H, F, 0);                          // g [n, F]
        o->matmul(f->u, f->xg, w->xw[1][e], n, H, F, 0);                          // u [n, F]
        o->swiglu(f->g, f->u, n * F);
        if (cap && cap->fn) cap->fn(cap->user, w->layer, MB_CAP_DOWN, e, f->g, n, F);
        o->matmul(f->xgo, f->g, w->xw[2][e], routed, F, H, 0);                    // xgo [routed, H]
        for (int64_t j = 0; j < routed; j++) {
            float *dst = f->tmp + f->rowidx[j] * H;
            const float *src = f->xgo + j * H;
            float wt = f->roww[j];
            for (int64_t h = 0; h < H; h++) dst[h] += wt * src[h];
        }
    }
    free(rank);
    free(sel);
    free(wsel);
    free(probs);
    if (rc) return rc;
    o->add(x, f->tmp, M * H);
    return check_finite(x, M * H, "MoE output", w->layer);
}

int mb_fwd_logits(struct mb_fwd *f, const float *x, int64_t M, float *logits) {
    const struct mb_config *c = f->c;
    if (M > f->max_rows) return mb_fail(MB_ERANGE, "batch of %lld rows exceeds the buffers", (long long)M);
    f->ops->rmsnorm(f->tmp, x, f->norm, M, c->hidden, (float)c->rms_eps);
    f->ops->matmul(logits, f->tmp, f->head, M, c->hidden, c->vocab, 0);           // logits [M, vocab]
    return 0;
}
