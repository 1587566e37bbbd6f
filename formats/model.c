/* formats/model.c: config.json parsing, the tensor names of each architecture, and the check of a
 * checkpoint against its description. */
#include "formats.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

static int get_int(const char *name, json_t *root, const char *key, int required, int64_t def, int64_t *out) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        if (required) return mb_fail(MB_EFORMAT, "%s: missing \"%s\"", name, key);
        *out = def;
        return 0;
    }
    if (!json_is_integer(v)) return mb_fail(MB_EFORMAT, "%s: \"%s\" is not an integer", name, key);
    *out = (int64_t)json_integer_value(v);
    return 0;
}

static int get_num(const char *name, json_t *root, const char *key, double def, double *out) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) { *out = def; return 0; }
    if (!json_is_number(v)) return mb_fail(MB_EFORMAT, "%s: \"%s\" is not a number", name, key);
    *out = json_number_value(v);
    return 0;
}

int mb_config_parse(const char *name, const char *text, size_t len, struct mb_config *c) {
    memset(c, 0, sizeof *c);
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) return mb_fail(MB_EFORMAT, "%s: invalid JSON: %s (line %d)", name, jerr.text, jerr.line);
    int rc = 0;
    if (!json_is_object(root)) { rc = mb_fail(MB_EFORMAT, "%s: not a JSON object", name); goto out; }
    json_t *archs = json_object_get(root, "architectures");
    const char *arch = NULL;
    if (json_is_array(archs) && json_array_size(archs) > 0 && json_is_string(json_array_get(archs, 0)))
        arch = json_string_value(json_array_get(archs, 0));
    if (!arch) {
        json_t *mt = json_object_get(root, "model_type");
        const char *m = json_is_string(mt) ? json_string_value(mt) : NULL;
        if (m && !strcmp(m, "llama")) arch = "LlamaForCausalLM";
        else if (m && !strcmp(m, "mistral")) arch = "MistralForCausalLM";
        else if (m && !strcmp(m, "mixtral")) arch = "MixtralForCausalLM";
        else { rc = mb_fail(MB_EUNSUPPORTED, "%s: no \"architectures\" entry and model_type \"%s\" is not supported (supported: %s)", name, m ? m : "(none)", MB_SUPPORTED_ARCHS); goto out; }
    }
    snprintf(c->arch_name, sizeof c->arch_name, "%s", arch);
    if (!strcmp(arch, "LlamaForCausalLM")) c->arch = MB_ARCH_LLAMA;
    else if (!strcmp(arch, "MistralForCausalLM")) c->arch = MB_ARCH_MISTRAL;
    else if (!strcmp(arch, "MixtralForCausalLM")) c->arch = MB_ARCH_MIXTRAL;
    else { rc = mb_fail(MB_EUNSUPPORTED, "%s: architecture %s is not supported (supported: %s)", name, arch, MB_SUPPORTED_ARCHS); goto out; }

    int64_t v;
    if ((rc = get_int(name, root, "hidden_size", 1, 0, &c->hidden)) || (rc = get_int(name, root, "num_hidden_layers", 1, 0, &c->n_layers)) ||
        (rc = get_int(name, root, "num_attention_heads", 1, 0, &c->n_heads)) || (rc = get_int(name, root, "intermediate_size", 1, 0, &c->ffn)) ||
        (rc = get_int(name, root, "vocab_size", 1, 0, &c->vocab)))
        goto out;
    if ((rc = get_int(name, root, "num_key_value_heads", 0, c->n_heads, &c->n_kv_heads))) goto out;
    if (c->hidden <= 0 || c->n_layers <= 0 || c->n_heads <= 0 || c->ffn <= 0 || c->vocab <= 0 || c->n_kv_heads <= 0 ||
        c->hidden > (1 << 20) || c->n_layers > 4096 || c->ffn > (1 << 22) || c->vocab > (1 << 24) || c->n_heads > 4096) {
        rc = mb_fail(MB_EFORMAT, "%s: sizes out of range (hidden %lld, layers %lld, heads %lld/%lld, ffn %lld, vocab %lld)", name,
                     (long long)c->hidden, (long long)c->n_layers, (long long)c->n_heads, (long long)c->n_kv_heads, (long long)c->ffn, (long long)c->vocab);
        goto out;
    }
    if (c->n_heads % c->n_kv_heads) { rc = mb_fail(MB_EFORMAT, "%s: num_attention_heads %lld is not a multiple of num_key_value_heads %lld", name, (long long)c->n_heads, (long long)c->n_kv_heads); goto out; }
    if ((rc = get_int(name, root, "head_dim", 0, c->hidden / c->n_heads, &c->head_dim))) goto out;
    if (c->head_dim <= 0 || c->head_dim % 2 || c->head_dim > 1024) { rc = mb_fail(MB_EFORMAT, "%s: head_dim %lld is not a positive even number <= 1024", name, (long long)c->head_dim); goto out; }
    if ((rc = get_int(name, root, "max_position_embeddings", 0, 4096, &c->max_pos))) goto out;
    if ((rc = get_num(name, root, "rms_norm_eps", 1e-6, &c->rms_eps)) || (rc = get_num(name, root, "rope_theta", 10000.0, &c->rope_theta))) goto out;
    json_t *tie = json_object_get(root, "tie_word_embeddings");
    c->tied = json_is_true(tie);
    json_t *ab = json_object_get(root, "attention_bias");
    c->attention_bias = json_is_true(ab);
    if (c->attention_bias) { rc = mb_fail(MB_EUNSUPPORTED, "%s: attention_bias = true is not supported", name); goto out; }
    json_t *mb = json_object_get(root, "mlp_bias");
    if (json_is_true(mb)) { rc = mb_fail(MB_EUNSUPPORTED, "%s: mlp_bias = true is not supported", name); goto out; }
    json_t *act = json_object_get(root, "hidden_act");
    if (json_is_string(act) && strcmp(json_string_value(act), "silu")) { rc = mb_fail(MB_EUNSUPPORTED, "%s: hidden_act \"%s\" is not supported (only silu)", name, json_string_value(act)); goto out; }
    if ((rc = get_int(name, root, "bos_token_id", 0, -1, &c->bos_id)) ) goto out;
    json_t *eos = json_object_get(root, "eos_token_id");
    if (json_is_array(eos)) eos = json_array_get(eos, 0);
    c->eos_id = json_is_integer(eos) ? (int64_t)json_integer_value(eos) : -1;

    if (c->arch != MB_ARCH_LLAMA) {
        if ((rc = get_int(name, root, "sliding_window", 0, 0, &v))) goto out;
        c->sliding_window = v > 0 ? v : 0;
    }
    if (c->arch == MB_ARCH_MIXTRAL) {
        int64_t ne, nk;
        if ((rc = get_int(name, root, "num_local_experts", 1, 0, &ne)) || (rc = get_int(name, root, "num_experts_per_tok", 1, 0, &nk))) goto out;
        if (ne < 1 || ne > 1024 || nk < 1 || nk > ne) { rc = mb_fail(MB_EFORMAT, "%s: num_local_experts %lld / num_experts_per_tok %lld out of range", name, (long long)ne, (long long)nk); goto out; }
        c->n_experts = (int)ne;
        c->n_experts_per_tok = (int)nk;
    }

    c->rope_type = MB_ROPE_DEFAULT;
    json_t *rs = json_object_get(root, "rope_scaling");
    if (rs && !json_is_null(rs)) {
        if (!json_is_object(rs)) { rc = mb_fail(MB_EFORMAT, "%s: rope_scaling is not an object", name); goto out; }
        json_t *ty = json_object_get(rs, "rope_type");
        if (!json_is_string(ty)) ty = json_object_get(rs, "type");
        const char *t = json_is_string(ty) ? json_string_value(ty) : "";
        if (!strcmp(t, "default")) c->rope_type = MB_ROPE_DEFAULT;
        else if (!strcmp(t, "linear")) c->rope_type = MB_ROPE_LINEAR;
        else if (!strcmp(t, "llama3")) c->rope_type = MB_ROPE_LLAMA3;
        else { rc = mb_fail(MB_EUNSUPPORTED, "%s: rope_scaling type \"%s\" is not supported (supported: default, linear, llama3)", name, t); goto out; }
        if ((rc = get_num(name, rs, "factor", 1.0, &c->rope_factor)) || (rc = get_num(name, rs, "low_freq_factor", 1.0, &c->rope_low_freq)) ||
            (rc = get_num(name, rs, "high_freq_factor", 4.0, &c->rope_high_freq)) ||
            (rc = get_int(name, rs, "original_max_position_embeddings", 0, 8192, &c->rope_orig_max_pos)))
            goto out;
        if (c->rope_type != MB_ROPE_DEFAULT && !(c->rope_factor > 0)) { rc = mb_fail(MB_EFORMAT, "%s: rope_scaling factor must be positive", name); goto out; }
        if (c->rope_type == MB_ROPE_LLAMA3 && !(c->rope_high_freq > c->rope_low_freq)) { rc = mb_fail(MB_EFORMAT, "%s: rope_scaling high_freq_factor must exceed low_freq_factor", name); goto out; }
    }

    json_t *qc = json_object_get(root, "quantization_config");
    if (qc && !json_is_null(qc)) {
        json_t *qm = json_object_get(qc, "quant_method");
        const char *m = json_is_string(qm) ? json_string_value(qm) : "?";
        if (strcmp(m, "exl2")) { rc = mb_fail(MB_EUNSUPPORTED, "%s: quantization method \"%s\" is not supported (only exl2)", name, m); goto out; }
        c->is_exl2 = 1;
        if ((rc = get_num(name, qc, "bits", 0, &c->exl2_bits)) || (rc = get_num(name, qc, "head_bits", 0, &c->exl2_head_bits))) goto out;
    }
out:
    json_decref(root);
    return rc;
}

int mb_config_load(const char *path, struct mb_config *c) {
    char *text;
    size_t len;
    int rc = mb_read_file(path, &text, &len, 16u << 20);
    if (rc) return rc;
    rc = mb_config_parse(path, text, len, c);
    free(text);
    return rc;
}

static const char *proj_dense[MB_P_COUNT] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};
static const char *proj_moe[3] = {"w1", "w3", "w2"}; /* gate, up, down */

const char *mb_proj_name(enum mb_proj p, int moe) {
    if (moe && p >= MB_P_GATE) return proj_moe[p - MB_P_GATE];
    return proj_dense[p];
}

int mb_config_expected(const struct mb_config *c, struct mb_expect **out, int *n) {
    int per_layer = 2 + 4 + (c->n_experts ? 1 + 3 * c->n_experts : 3);
    int cap = 3 + (int)c->n_layers * per_layer;
    struct mb_expect *e = calloc(cap, sizeof *e);
    if (!e) return mb_fail(MB_ENOMEM, "out of memory");
    int k = 0;
#define ADD(kind_, rows_, cols_, layer_, proj_, expert_, ...)                \
    do {                                                                     \
        snprintf(e[k].name, sizeof e[k].name, __VA_ARGS__);                  \
        e[k].kind = kind_; e[k].rows = rows_; e[k].cols = cols_;             \
        e[k].layer = layer_; e[k].proj = proj_; e[k].expert = expert_; k++; \
    } while (0)
    int64_t H = c->hidden, qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;
    ADD(MB_T_EMBED, c->vocab, H, -1, -1, -1, "model.embed_tokens.weight");
    for (int l = 0; l < c->n_layers; l++) {
        ADD(MB_T_NORM, H, 0, l, -1, -1, "model.layers.%d.input_layernorm.weight", l);
        ADD(MB_T_NORM, H, 0, l, -1, -1, "model.layers.%d.post_attention_layernorm.weight", l);
        ADD(MB_T_LINEAR, qd, H, l, MB_P_Q, -1, "model.layers.%d.self_attn.q_proj", l);
        ADD(MB_T_LINEAR, kvd, H, l, MB_P_K, -1, "model.layers.%d.self_attn.k_proj", l);
        ADD(MB_T_LINEAR, kvd, H, l, MB_P_V, -1, "model.layers.%d.self_attn.v_proj", l);
        ADD(MB_T_LINEAR, H, qd, l, MB_P_O, -1, "model.layers.%d.self_attn.o_proj", l);
        if (c->n_experts) {
            ADD(MB_T_ROUTER, c->n_experts, H, l, -1, -1, "model.layers.%d.block_sparse_moe.gate.weight", l);
            for (int x = 0; x < c->n_experts; x++) {
                ADD(MB_T_LINEAR, c->ffn, H, l, MB_P_GATE, x, "model.layers.%d.block_sparse_moe.experts.%d.w1", l, x);
                ADD(MB_T_LINEAR, c->ffn, H, l, MB_P_UP, x, "model.layers.%d.block_sparse_moe.experts.%d.w3", l, x);
                ADD(MB_T_LINEAR, H, c->ffn, l, MB_P_DOWN, x, "model.layers.%d.block_sparse_moe.experts.%d.w2", l, x);
            }
        } else {
            ADD(MB_T_LINEAR, c->ffn, H, l, MB_P_GATE, -1, "model.layers.%d.mlp.gate_proj", l);
            ADD(MB_T_LINEAR, c->ffn, H, l, MB_P_UP, -1, "model.layers.%d.mlp.up_proj", l);
            ADD(MB_T_LINEAR, H, c->ffn, l, MB_P_DOWN, -1, "model.layers.%d.mlp.down_proj", l);
        }
    }
    ADD(MB_T_NORM, H, 0, -1, -1, -1, "model.norm.weight");
    ADD(MB_T_HEAD, c->vocab, H, -1, -1, -1, "lm_head");
#undef ADD
    *out = e;
    *n = k;
    return 0;
}

static int is_float(enum mb_dtype t) { return t == MB_F32 || t == MB_F16 || t == MB_BF16 || t == MB_F64; }

static int check_shape(const char *file, const struct mb_tensor_info *t, int ndim, int64_t a, int64_t b) {
    int ok = t->ndim == ndim && t->shape[0] == a && (ndim < 2 || t->shape[1] == b);
    if (!ok) {
        char got[128] = "", *p = got;
        for (int d = 0; d < t->ndim && p < got + 100; d++) p += sprintf(p, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
        if (ndim == 2) return mb_fail(MB_EFORMAT, "%s: tensor %s has shape [%s], expected [%lld, %lld]", file, t->name, got, (long long)a, (long long)b);
        return mb_fail(MB_EFORMAT, "%s: tensor %s has shape [%s], expected [%lld]", file, t->name, got, (long long)a);
    }
    if (!is_float(t->dtype)) return mb_fail(MB_EFORMAT, "%s: tensor %s has dtype %s, expected a float type", file, t->name, mb_dtype_name(t->dtype));
    return 0;
}

/* EXL2 linear: q_weight I32 [*, Np], q_scale I32 [G, Np/8], q_scale_max F16 [G], q_groups I16 [2G],
 * q_invperm I32 [K] (or q_perm), optional bias F16 [Np] */
static int check_exl2_linear(const struct mb_st_set *s, const char *mod, int64_t N, int64_t K) {
    char nm[160];
    int64_t Np = (N + 31) / 32 * 32;
    const struct mb_tensor_info *qw, *qs, *qm, *qg, *qi;
    int rc;
#define GET(var, suffix)                                              \
    snprintf(nm, sizeof nm, "%s.%s", mod, suffix);                   \
    if ((rc = mb_st_get(s, nm, &var))) return rc;
    GET(qw, "q_weight");
    GET(qs, "q_scale");
    GET(qm, "q_scale_max");
    GET(qg, "q_groups");
    GET(qi, "q_invperm");
#undef GET
    if (qw->dtype != MB_I32 || qw->ndim != 2 || qw->shape[1] != Np)
        return mb_fail(MB_EFORMAT, "%s.q_weight: expected I32 [*, %lld]", mod, (long long)Np);
    if (qm->dtype != MB_F16 || qm->ndim != 1) return mb_fail(MB_EFORMAT, "%s.q_scale_max: expected F16 [G]", mod);
    int64_t G = qm->shape[0];
    if (qs->dtype != MB_I32 || qs->ndim != 2 || qs->shape[0] != G || qs->shape[1] != Np / 8)
        return mb_fail(MB_EFORMAT, "%s.q_scale: expected I32 [%lld, %lld]", mod, (long long)G, (long long)(Np / 8));
    if (qg->dtype != MB_I16 || qg->ndim != 1 || qg->shape[0] != 2 * G) return mb_fail(MB_EFORMAT, "%s.q_groups: expected I16 [%lld]", mod, (long long)(2 * G));
    if (qi->dtype != MB_I32 || qi->ndim != 1 || qi->shape[0] < K || qi->shape[0] > (K + 31) / 32 * 32)
        return mb_fail(MB_EFORMAT, "%s.q_invperm: expected I32 [%lld]", mod, (long long)K);
    return 0;
}

/* first index in the sorted names not below key */
static int lower_bound(const struct mb_st_set *s, const char *key) {
    int lo = 0, hi = s->n;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (strcmp(s->sorted[mid]->name, key) < 0) lo = mid + 1; else hi = mid;
    }
    return lo;
}

static int mark_used(const struct mb_st_set *s, const char *name, unsigned char *used) {
    int i = lower_bound(s, name);
    if (i < s->n && strcmp(s->sorted[i]->name, name) == 0) { used[i] = 1; return 1; }
    return 0;
}

static int mark_prefix(const struct mb_st_set *s, const char *prefix, unsigned char *used) {
    size_t pl = strlen(prefix);
    int k = 0;
    for (int i = lower_bound(s, prefix); i < s->n && strncmp(s->sorted[i]->name, prefix, pl) == 0; i++) { used[i] = 1; k++; }
    return k;
}

void mb_model_close(struct mb_model *m) {
    if (!m) return;
    mb_st_set_close(m->st);
    free(m->ex);
    free(m);
}

int mb_model_open(const char *path, struct mb_model **out) {
    *out = NULL;
    struct mb_model *m = calloc(1, sizeof *m);
    if (!m) return mb_fail(MB_ENOMEM, "out of memory");
    int rc = 0;
    unsigned char *used = NULL;
    char cfgp[4096];
    if (mb_is_dir(path)) {
        snprintf(m->dir, sizeof m->dir, "%s", path);
    } else {
        snprintf(m->dir, sizeof m->dir, "%s", path);
        char *sl = strrchr(m->dir, '/');
        if (sl) *sl = 0; else strcpy(m->dir, ".");
    }
    if ((rc = mb_path_join(cfgp, sizeof cfgp, m->dir, "config.json"))) goto fail;
    if (!mb_file_exists(cfgp)) { rc = mb_fail(MB_EIO, "%s: no config.json (needed to describe the model)", m->dir); goto fail; }
    if ((rc = mb_config_load(cfgp, &m->cfg))) goto fail;
    if ((rc = mb_st_set_open(path, &m->st))) goto fail;
    if ((rc = mb_config_expected(&m->cfg, &m->ex, &m->n_ex))) goto fail;
    used = calloc(m->st->n ? m->st->n : 1, 1);
    if (!used) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto fail; }
    const struct mb_config *c = &m->cfg;
    for (int i = 0; i < m->n_ex; i++) {
        const struct mb_expect *e = &m->ex[i];
        char nm[160];
        const struct mb_tensor_info *t;
        if (e->kind == MB_T_LINEAR || e->kind == MB_T_HEAD) {
            if (e->kind == MB_T_HEAD && c->tied) {
                /* tied: the head may be absent (float) or present quantized (EXL2), or present as a copy */
                snprintf(nm, sizeof nm, "%s.weight", e->name);
                if ((t = mb_st_find(m->st, nm))) {
                    if ((rc = check_shape(m->st->path, t, 2, e->rows, e->cols))) goto fail;
                    mark_used(m->st, nm, used);
                }
                if (c->is_exl2) {
                    snprintf(nm, sizeof nm, "%s.q_weight", e->name);
                    if (mb_st_find(m->st, nm)) {
                        if ((rc = check_exl2_linear(m->st, e->name, e->rows, e->cols))) goto fail;
                        snprintf(nm, sizeof nm, "%s.q_", e->name);
                        mark_prefix(m->st, nm, used);
                    }
                }
                continue;
            }
            if (c->is_exl2) {
                snprintf(nm, sizeof nm, "%s.q_weight", e->name);
                if (mb_st_find(m->st, nm)) {
                    if ((rc = check_exl2_linear(m->st, e->name, e->rows, e->cols))) goto fail;
                    snprintf(nm, sizeof nm, "%s.q_", e->name);
                    mark_prefix(m->st, nm, used);
                    snprintf(nm, sizeof nm, "%s.bias", e->name);
                    mark_used(m->st, nm, used);
                    continue;
                }
                /* an EXL2 model may keep a layer unquantized (fall through) */
            }
            snprintf(nm, sizeof nm, "%s.weight", e->name);
            if ((rc = mb_st_get(m->st, nm, &t))) goto fail;
            if ((rc = check_shape(m->st->path, t, 2, e->rows, e->cols))) goto fail;
            mark_used(m->st, nm, used);
        } else {
            if ((rc = mb_st_get(m->st, e->name, &t))) goto fail;
            if ((rc = check_shape(m->st->path, t, e->cols ? 2 : 1, e->rows, e->cols))) goto fail;
            mark_used(m->st, e->name, used);
        }
    }
    for (int i = 0; i < m->st->n; i++) {
        if (used[i]) continue;
        const char *nm = m->st->sorted[i]->name;
        if (strstr(nm, "rotary_emb.inv_freq")) continue; /* non-persistent buffer some old exports contain */
        rc = mb_fail(MB_EFORMAT, "%s: unexpected tensor %s (not part of a %s with this config)", m->st->path, nm, c->arch_name);
        goto fail;
    }
    free(used);
    *out = m;
    return 0;
fail:
    free(used);
    mb_model_close(m);
    return rc;
}
