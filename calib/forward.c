/* calib/forward.c: the Llama / Mistral / Mixtral forward pass over the operations table, and the runner that
 * streams the weights one layer at a time (views in their stored dtype, the next layer prefetched). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "calib.h"

/* ---------------------------------------------------------------------------------------------- */
/* weights                                                                                         */

static int view_of(const struct mb_tensor_info *t, int64_t rows, int64_t cols, struct mb_weight *out) {
    memset(out, 0, sizeof *out);
    out->name = t->name;
    out->n = rows;
    out->k = cols;
    out->data = t->data;
    switch (t->dtype) {
    case MB_F32: out->type = MB_W_F32; break;
    case MB_F16: out->type = MB_W_F16; break;
    case MB_BF16: out->type = MB_W_BF16; break;
    default: return mb_fail(MB_EUNSUPPORTED, "%s: tensor %s has dtype %s; weights must be F32, F16 or BF16", t->file, t->name, mb_dtype_name(t->dtype));
    }
    if (t->numel != rows * cols)
        return mb_fail(MB_EFORMAT, "%s: tensor %s has %lld elements, expected %lld", t->file, t->name, (long long)t->numel, (long long)(rows * cols));
    return 0;
}

int mb_model_weight(const struct mb_model *m, const char *module, int64_t rows, int64_t cols, struct mb_weight *out) {
    char nm[192];
    memset(out, 0, sizeof *out);
    snprintf(nm, sizeof nm, "%s.q_weight", module);
    const struct mb_tensor_info *qw = m->cfg.is_exl2 ? mb_st_find(m->st, nm) : NULL;
    if (qw) {
        int rc = mb_exl2_from_set(m->st, module, rows, cols, &out->q);
        if (rc) return rc;
        out->type = MB_W_EXL2;
        out->n = rows;
        out->k = cols;
        out->name = qw->name;
        return 0;
    }
    /* names of float tensors: a module ("...q_proj") gets ".weight"; full names ("...norm.weight") are used as they are */
    size_t ln = strlen(module);
    if (ln > 7 && !strcmp(module + ln - 7, ".weight")) snprintf(nm, sizeof nm, "%s", module);
    else snprintf(nm, sizeof nm, "%s.weight", module);
    const struct mb_tensor_info *t;
    int rc = mb_st_get(m->st, nm, &t);
    if (rc) return rc;
    return view_of(t, rows, cols, out);
}

struct mb_weight *mb_layer_slot(struct mb_layer_w *w, int proj, int expert) {
    return expert >= 0 ? &w->xw[proj - MB_P_GATE][expert] : &w->w[proj];
}

void mb_layer_free(struct mb_layer_w *w) {
    if (!w) return;
    const struct mb_ops *o = w->ops;
    o->free(w->attn_norm);
    o->free(w->mlp_norm);
    for (int p = 0; p < MB_P_COUNT; p++) if (w->w[p].data || w->w[p].type == MB_W_EXL2) o->weight_release(&w->w[p]);
    if (w->router.data) o->weight_release(&w->router);
    for (int k = 0; k < 3; k++) {
        if (!w->xw[k]) continue;
        for (int e = 0; e < w->n_experts; e++) o->weight_release(&w->xw[k][e]);
        free(w->xw[k]);
    }
    free(w);
}

static int load_vector(const struct mb_model *m, const struct mb_ops *ops, const char *name, int64_t n, float **out) {
    struct mb_weight v;
    int rc = mb_model_weight(m, name, 1, n, &v);
    if (!rc) rc = ops->vector_load(out, &v);
    return rc;
}

int mb_layer_load(const struct mb_model *m, const struct mb_ops *ops, int layer, int async, struct mb_layer_w **out) {
    *out = NULL;
    const struct mb_config *c = &m->cfg;
    if (layer < 0 || layer >= c->n_layers) return mb_fail(MB_ERANGE, "layer %d out of range", layer);
    struct mb_layer_w *w = calloc(1, sizeof *w);
    if (!w) return mb_fail(MB_ENOMEM, "out of memory");
    w->layer = layer;
    w->ops = ops;
    w->n_experts = c->n_experts;
    int rc = 0;
    char nm[192];
    snprintf(nm, sizeof nm, "model.layers.%d.input_layernorm.weight", layer);
    if ((rc = load_vector(m, ops, nm, c->hidden, &w->attn_norm))) goto fail;
    snprintf(nm, sizeof nm, "model.layers.%d.post_attention_layernorm.weight", layer);
    if ((rc = load_vector(m, ops, nm, c->hidden, &w->mlp_norm))) goto fail;
    if (c->n_experts)
        for (int k = 0; k < 3; k++)
            if (!(w->xw[k] = calloc(c->n_experts, sizeof *w->xw[k]))) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto fail; }
    for (int i = 0; i < m->n_ex; i++) {
        const struct mb_expect *e = &m->ex[i];
        if (e->layer != layer || (e->kind != MB_T_LINEAR && e->kind != MB_T_ROUTER)) continue;
        struct mb_weight host;
        if ((rc = mb_model_weight(m, e->name, e->rows, e->cols, &host))) goto fail;
        struct mb_weight *slot = e->kind == MB_T_ROUTER ? &w->router : mb_layer_slot(w, e->proj, e->expert);
        if ((rc = ops->weight_load(slot, &host, async))) goto fail;
    }
    *out = w;
    return 0;
fail:
    mb_layer_free(w);
    return rc;
}

/* ---------------------------------------------------------------------------------------------- */
/* the runner                                                                                      */

void mb_fwd_free(struct mb_fwd *f) {
    if (!f->ops) return;
    const struct mb_ops *o = f->ops;
    mb_layer_free(f->cur);
    mb_layer_free(f->next);
    o->free(f->cos_t); o->free(f->sin_t);
    o->free(f->xn); o->free(f->q); o->free(f->k); o->free(f->v); o->free(f->att);
    o->free(f->g); o->free(f->u); o->free(f->tmp);
    o->free(f->rl); o->free(f->probs); o->free(f->wsel); o->free(f->roww); o->free(f->xg); o->free(f->xgo);
    o->free(f->sel); o->free(f->rowidx);
    if (f->embed.type || f->embed.data) o->weight_release(&f->embed);
    if (f->head.type || f->head.data) o->weight_release(&f->head);
    o->free(f->norm);
    memset(f, 0, sizeof *f);
}

/* inverse frequencies of the rotary embedding [hd/2] (Hugging Face's default, linear and llama3 rules) */
static void rope_inv_freq(const struct mb_config *c, double *inv_freq) {
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
        inv_freq[j] = inv;
    }
}

#define BALLOC(ptr, n, sz)                                                                                         \
    do {                                                                                                           \
        size_t b_;                                                                                                 \
        if (mb_mul_ok((size_t)(n), (sz), &b_) == 0 || !((ptr) = o->alloc(b_))) {                                 \
            rc = mb_fail(MB_ENOMEM, "out of %s memory for activations (%lld x %zu bytes)", o->name, (long long)(n), (size_t)(sz)); \
            goto fail;                                                                                             \
        }                                                                                                          \
    } while (0)

int64_t mb_fwd_bytes(const struct mb_config *c, int64_t max_rows, int64_t max_T) {
    int64_t H = c->hidden, qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim, F = c->ffn, half = c->head_dim / 2;
    int64_t f = 2 * max_T * half + max_rows * ((H > qd ? H : qd) + qd + 2 * kvd + qd + 2 * F + H);
    if (c->n_experts) f += max_rows * (2 * c->n_experts + 2 * c->n_experts_per_tok + 2 + 2 * H);
    return f * 4;
}

int64_t mb_layer_bytes(const struct mb_model *m, int layer) {
    int64_t b = 0;
    for (int i = 0; i < m->n_ex; i++) {
        const struct mb_expect *e = &m->ex[i];
        if (e->layer != layer) continue;
        char nm[192];
        const struct mb_tensor_info *t;
        snprintf(nm, sizeof nm, "%s%s", e->name, e->kind == MB_T_LINEAR ? ".weight" : "");
        if ((t = mb_st_find(m->st, nm))) b += (int64_t)t->nbytes;
        else if (e->kind == MB_T_LINEAR) { /* EXL2: its q_* tensors */
            static const char *suf[] = {"q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm"};
            for (int k = 0; k < 5; k++) {
                snprintf(nm, sizeof nm, "%s.%s", e->name, suf[k]);
                if ((t = mb_st_find(m->st, nm))) b += (int64_t)t->nbytes;
            }
        }
    }
    return b;
}

int mb_fwd_init(struct mb_fwd *f, const struct mb_model *m, const struct mb_ops *ops, int64_t max_rows, int64_t max_T) {
    memset(f, 0, sizeof *f);
    const struct mb_config *c = &m->cfg;
    const struct mb_ops *o = ops;
    int rc = 0;
    double *inv = NULL;
    f->m = m;
    f->c = c;
    f->ops = ops;
    f->max_rows = max_rows;
    f->max_T = max_T;
    int64_t H = c->hidden, qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim, F = c->ffn, half = c->head_dim / 2;
    BALLOC(f->cos_t, max_T * half, sizeof(float));
    BALLOC(f->sin_t, max_T * half, sizeof(float));
    if (!(inv = malloc((size_t)half * sizeof *inv))) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto fail; }
    rope_inv_freq(c, inv);
    if ((rc = o->rope_tables(f->cos_t, f->sin_t, inv, half, max_T))) goto fail;
    BALLOC(f->xn, max_rows * (H > qd ? H : qd), sizeof(float));
    BALLOC(f->q, max_rows * qd, sizeof(float));
    BALLOC(f->k, max_rows * kvd, sizeof(float));
    BALLOC(f->v, max_rows * kvd, sizeof(float));
    BALLOC(f->att, max_rows * qd, sizeof(float));
    BALLOC(f->g, max_rows * F, sizeof(float));
    BALLOC(f->u, max_rows * F, sizeof(float));
    BALLOC(f->tmp, max_rows * H, sizeof(float));
    if (c->n_experts) {
        int64_t E = c->n_experts, K = c->n_experts_per_tok;
        BALLOC(f->rl, max_rows * E, sizeof(float));
        BALLOC(f->probs, max_rows * E, sizeof(float));
        BALLOC(f->wsel, max_rows * K, sizeof(float));
        BALLOC(f->sel, max_rows * K, sizeof(int32_t));
        BALLOC(f->roww, max_rows, sizeof(float));
        BALLOC(f->rowidx, max_rows, sizeof(int32_t));
        BALLOC(f->xg, max_rows * H, sizeof(float));
        BALLOC(f->xgo, max_rows * H, sizeof(float));
    }
    struct mb_weight v;
    if ((rc = mb_model_weight(m, "model.embed_tokens", c->vocab, H, &v)) || (rc = o->weight_load(&f->embed, &v, 0))) goto fail;
    if ((rc = load_vector(m, o, "model.norm.weight", H, &f->norm))) goto fail;
    int head_present = mb_st_find(m->st, "lm_head.weight") || mb_st_find(m->st, "lm_head.q_weight");
    if (c->tied && !head_present) rc = mb_model_weight(m, "model.embed_tokens", c->vocab, H, &v);
    else rc = mb_model_weight(m, "lm_head", c->vocab, H, &v);
    if (rc || (rc = o->weight_load(&f->head, &v, 0))) goto fail;
    free(inv);
    return 0;
fail:
    free(inv);
    mb_fwd_free(f);
    return rc;
}

int mb_fwd_embed(struct mb_fwd *f, const int32_t *ids, int64_t M, float *x) {
    for (int64_t i = 0; i < M; i++)
        if (ids[i] < 0 || ids[i] >= f->c->vocab) return mb_fail(MB_ERANGE, "token id %d outside the model's vocabulary (%lld)", ids[i], (long long)f->c->vocab);
    return f->ops->embed(x, &f->embed, ids, M);
}

int mb_fwd_layer(struct mb_fwd *f, int layer, const struct mb_layer_w **out) {
    int rc = 0;
    if (!f->cur || f->cur->layer != layer) {
        mb_layer_free(f->cur);
        f->cur = NULL;
        if (f->next && f->next->layer == layer) { f->cur = f->next; f->next = NULL; }
        else if ((rc = mb_layer_load(f->m, f->ops, layer, 0, &f->cur))) return rc;
        /* prefetch the layer after it (the first again after the last: the next batch of a perplexity run) */
        int nl = layer + 1 < f->c->n_layers ? layer + 1 : 0;
        if (nl != layer && (!f->next || f->next->layer != nl)) {
            mb_layer_free(f->next);
            f->next = NULL;
            if ((rc = mb_layer_load(f->m, f->ops, nl, 1, &f->next))) return rc;
        }
    }
    *out = f->cur;
    return 0;
}

/* the first non-finite value of a host weight view (-1 when none), scanned in tiles */
static int64_t weight_nonfinite(const struct mb_weight *w) {
    const int64_t RB = 64;
    float *t = malloc((size_t)(RB * w->k) * sizeof *t);
    int64_t bad = -1;
    for (int64_t r0 = 0; t && r0 < w->n && bad < 0; r0 += RB) {
        int64_t r1 = r0 + RB < w->n ? r0 + RB : w->n;
        if (mb_weight_rows_f32(w, r0, r1, t)) break;
        for (int64_t i = 0; i < (r1 - r0) * w->k; i++)
            if (!isfinite(t[i])) { bad = r0 * w->k + i; break; }
    }
    free(t);
    return bad;
}

/* After a non-finite activation: name the tensor of module m that holds non-finite values, if one does */
static int name_bad_weight(struct mb_fwd *f, int m, const char *what, int64_t at, float val) {
    const struct mb_model *md = f->m;
    int layer = m / 2;
    for (int i = 0; i < md->n_ex; i++) {
        const struct mb_expect *e = &md->ex[i];
        if (e->layer != layer) continue;
        int in_module = e->kind == MB_T_NORM ? (strstr(e->name, "input_layernorm") != NULL) == (m % 2 == 0)
                        : e->kind == MB_T_ROUTER ? m % 2 == 1 : (e->proj <= MB_P_O) == (m % 2 == 0);
        if (!in_module) continue;
        struct mb_weight v;
        if (mb_model_weight(md, e->name, e->kind == MB_T_NORM ? 1 : e->rows, e->kind == MB_T_NORM ? e->rows : e->cols, &v)) continue;
        int64_t bad = weight_nonfinite(&v);
        if (bad >= 0) return mb_fail(MB_ENUMERIC, "layer %d %s: non-finite activation: tensor %s holds a non-finite value at element %lld", layer, what, v.name, (long long)bad);
    }
    return mb_fail(MB_ENUMERIC, "layer %d %s: non-finite activation (%g at element %lld)", layer, what, val, (long long)at);
}

static int check_finite(struct mb_fwd *f, const float *x, int64_t n, const char *what, int m) {
    float val = 0;
    int64_t i;
    int rc = f->ops->find_nonfinite(x, n, &i, &val);
    if (rc) return mb_fail_ctx(rc, "layer %d %s", m / 2, what);
    if (i >= 0) return name_bad_weight(f, m, what, i, val);
    return 0;
}

#define TRY(call) do { if ((rc = (call))) return rc; } while (0)

static int fwd_attn(struct mb_fwd *f, const struct mb_layer_w *w, float *x, int64_t S, int64_t T, const struct mb_capture *cap) {
    const struct mb_config *c = f->c;
    const struct mb_ops *o = f->ops;
    int64_t M = S * T, H = c->hidden, qd = c->n_heads * c->head_dim;
    int rc;
    o->rmsnorm(f->xn, x, w->attn_norm, M, H, (float)c->rms_eps);                  // xn [M, H]
    if (cap && cap->fn) TRY(cap->fn(cap->user, w->layer, MB_CAP_QKV, -1, f->xn, M, H));
    TRY(o->matmul(f->q, f->xn, &w->w[MB_P_Q], M, 0));                             // q [M, nh*hd]
    TRY(o->matmul(f->k, f->xn, &w->w[MB_P_K], M, 0));                             // k [M, nkv*hd]
    TRY(o->matmul(f->v, f->xn, &w->w[MB_P_V], M, 0));                             // v [M, nkv*hd]
    o->rope(f->q, S, T, c->n_heads, c->head_dim, f->cos_t, f->sin_t);
    o->rope(f->k, S, T, c->n_kv_heads, c->head_dim, f->cos_t, f->sin_t);
    o->attention(f->att, f->q, f->k, f->v, S, T, c->n_heads, c->n_kv_heads, c->head_dim, c->sliding_window); // att [M, nh*hd]
    if (cap && cap->fn) TRY(cap->fn(cap->user, w->layer, MB_CAP_O, -1, f->att, M, qd));
    TRY(o->matmul(x, f->att, &w->w[MB_P_O], M, 1));                               // x += att @ Wo^T
    return check_finite(f, x, M * H, "attention output", 2 * w->layer);
}

static int fwd_mlp(struct mb_fwd *f, const struct mb_layer_w *w, float *x, int64_t M, const struct mb_capture *cap) {
    const struct mb_config *c = f->c;
    const struct mb_ops *o = f->ops;
    int64_t H = c->hidden, F = c->ffn;
    int rc;
    o->rmsnorm(f->xn, x, w->mlp_norm, M, H, (float)c->rms_eps);                  // xn [M, H]
    if (cap && cap->fn) TRY(cap->fn(cap->user, w->layer, MB_CAP_GATEUP, -1, f->xn, M, H));
    if (!c->n_experts) {
        TRY(o->matmul(f->g, f->xn, &w->w[MB_P_GATE], M, 0));                      // g [M, F]
        TRY(o->matmul(f->u, f->xn, &w->w[MB_P_UP], M, 0));                        // u [M, F]
        o->swiglu(f->g, f->u, M * F);                                             // g = silu(g) * u
        if (cap && cap->fn) TRY(cap->fn(cap->user, w->layer, MB_CAP_DOWN, -1, f->g, M, F));
        TRY(o->matmul(x, f->g, &w->w[MB_P_DOWN], M, 1));                          // x += g @ Wd^T
        return check_finite(f, x, M * H, "MLP output", 2 * w->layer + 1);
    }
    /* sparse MoE: softmax router, top-k, weights renormalized over the chosen experts */
    int E = c->n_experts, K = c->n_experts_per_tok;
    TRY(o->matmul(f->rl, f->xn, &w->router, M, 0));                               // rl [M, E]
    o->moe_route(f->sel, f->wsel, f->probs, f->rl, M, E, K);                      // sel, wsel [M, K]
    o->zero(f->tmp, (size_t)(M * H) * sizeof(float));
    int64_t min_rows = cap && cap->fn ? cap->min_expert_rows : 0;
    for (int e = 0; e < E; e++) {
        int64_t routed, n;
        TRY(o->moe_rows(f->rowidx, f->roww, f->sel, f->wsel, f->probs, M, E, K, e, min_rows, &routed, &n));
        if (cap && cap->expert_tokens) cap->expert_tokens[(int64_t)w->layer * E + e] += routed;
        if (n == 0) continue;
        o->gather_rows(f->xg, f->xn, f->rowidx, n, H);                            // xg [n, H]
        TRY(o->matmul(f->g, f->xg, &w->xw[0][e], n, 0));                          // g [n, F]
        TRY(o->matmul(f->u, f->xg, &w->xw[1][e], n, 0));                          // u [n, F]
        o->swiglu(f->g, f->u, n * F);
        if (cap && cap->fn) TRY(cap->fn(cap->user, w->layer, MB_CAP_DOWN, e, f->g, n, F));
        TRY(o->matmul(f->xgo, f->g, &w->xw[2][e], routed, 0));                    // xgo [routed, H]
        o->scatter_add(f->tmp, f->xgo, f->rowidx, f->roww, routed, H);            // tmp[row] += weight * xgo
    }
    o->add(x, f->tmp, M * H);
    return check_finite(f, x, M * H, "MoE output", 2 * w->layer + 1);
}

int mb_fwd_module(struct mb_fwd *f, const struct mb_layer_w *w, int m, float *x, int64_t S, int64_t T, const struct mb_capture *cap) {
    if (S * T > f->max_rows || T > f->max_T)
        return mb_fail(MB_ERANGE, "batch %lld x %lld exceeds the buffers (%lld rows, %lld tokens)", (long long)S, (long long)T, (long long)f->max_rows, (long long)f->max_T);
    return m % 2 == 0 ? fwd_attn(f, w, x, S, T, cap) : fwd_mlp(f, w, x, S * T, cap);
}

int mb_fwd_run(struct mb_fwd *f, int m0, int m1, float *x, int64_t S, int64_t T, const struct mb_capture *cap) {
    int rc = 0;
    for (int m = m0; m < m1 && !rc; m++) {
        const struct mb_layer_w *w;
        if (!(rc = mb_fwd_layer(f, m / 2, &w))) rc = mb_fwd_module(f, w, m, x, S, T, cap);
    }
    return rc;
}

int mb_fwd_logits(struct mb_fwd *f, const float *x, int64_t M, float *logits) {
    const struct mb_config *c = f->c;
    if (M > f->max_rows) return mb_fail(MB_ERANGE, "batch of %lld rows exceeds the buffers", (long long)M);
    f->ops->rmsnorm(f->tmp, x, f->norm, M, c->hidden, (float)c->rms_eps);
    return f->ops->matmul(logits, f->tmp, &f->head, M, 0);                         // logits [M, vocab]
}
