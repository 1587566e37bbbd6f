/* formats/model.c: config.json parsing, the tensor names of each architecture, and the check of a
 * checkpoint against its description. */
#include "formats.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- config.json fields: every field the parser reads is type- and range-checked here, and each error
 * is one line naming the file and the field ("config.json: \"rope_theta\" is -1, expected a number > 1
 * and <= 1e+12"). Nested fields are named with their parent ("rope_scaling.factor"). */

const char *mb_json_kind(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "a list";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a real number";
    case JSON_TRUE: case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

static void field_name(char *buf, size_t n, const char *parent, const char *key) {
    snprintf(buf, n, "%s%s%s", parent ? parent : "", parent ? "." : "", key);
}

/* integer field in [lo, hi]; absent or null: `def` unless required */
static int get_int(const char *name, json_t *obj, const char *parent, const char *key, int required, int64_t def, int64_t lo, int64_t hi, int64_t *out) {
    char f[96];
    field_name(f, sizeof f, parent, key);
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        if (required) return mb_fail(MB_EFORMAT, "%s: missing \"%s\"", name, f);
        *out = def;
        return 0;
    }
    if (!json_is_integer(v)) return mb_fail(MB_EFORMAT, "%s: \"%s\" is %s, expected an integer in %lld..%lld", name, f, mb_json_kind(v), (long long)lo, (long long)hi);
    int64_t x = (int64_t)json_integer_value(v);
    if (x < lo || x > hi) return mb_fail(MB_EFORMAT, "%s: \"%s\" is %lld, expected an integer in %lld..%lld", name, f, (long long)x, (long long)lo, (long long)hi);
    *out = x;
    return 0;
}

/* finite number in (lo, hi] when lo_open, else [lo, hi]; absent or null: `def` unless required */
static int get_num(const char *name, json_t *obj, const char *parent, const char *key, int required, double def, double lo, int lo_open, double hi, double *out) {
    char f[96];
    field_name(f, sizeof f, parent, key);
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        if (required) return mb_fail(MB_EFORMAT, "%s: missing \"%s\"", name, f);
        *out = def;
        return 0;
    }
    const char *want = lo_open ? ">" : ">=";
    if (!json_is_number(v)) return mb_fail(MB_EFORMAT, "%s: \"%s\" is %s, expected a number %s %g and <= %g", name, f, mb_json_kind(v), want, lo, hi);
    double x = json_number_value(v);
    if (!isfinite(x) || (lo_open ? !(x > lo) : !(x >= lo)) || !(x <= hi))
        return mb_fail(MB_EFORMAT, "%s: \"%s\" is %g, expected a number %s %g and <= %g", name, f, x, want, lo, hi);
    *out = x;
    return 0;
}

/* true / false; absent or null: def */
static int get_bool(const char *name, json_t *obj, const char *key, int def, int *out) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) { *out = def; return 0; }
    if (!json_is_boolean(v)) return mb_fail(MB_EFORMAT, "%s: \"%s\" is %s, expected true or false", name, key, mb_json_kind(v));
    *out = json_is_true(v);
    return 0;
}

/* string; absent or null: NULL */
static int get_str(const char *name, json_t *obj, const char *parent, const char *key, const char **out) {
    char f[96];
    field_name(f, sizeof f, parent, key);
    json_t *v = json_object_get(obj, key);
    *out = NULL;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v)) return mb_fail(MB_EFORMAT, "%s: \"%s\" is %s, expected a string", name, f, mb_json_kind(v));
    *out = json_string_value(v);
    return 0;
}

/* a token id: null, an integer in [0, vocab), or (list_ok) a non-empty list of them (the first is kept) */
static int get_token_id(const char *name, json_t *obj, const char *key, int64_t vocab, int list_ok, int64_t *out) {
    json_t *v = json_object_get(obj, key);
    *out = -1;
    if (!v || json_is_null(v)) return 0;
    if (json_is_array(v) && list_ok) {
        if (json_array_size(v) == 0) return mb_fail(MB_EFORMAT, "%s: \"%s\" is an empty list", name, key);
        size_t i;
        json_t *e;
        json_array_foreach(v, i, e) {
            if (!json_is_integer(e) || json_integer_value(e) < 0 || json_integer_value(e) >= vocab)
                return mb_fail(MB_EFORMAT, "%s: \"%s\"[%zu] is not a token id in 0..%lld", name, key, i, (long long)(vocab - 1));
        }
        *out = (int64_t)json_integer_value(json_array_get(v, 0));
        return 0;
    }
    if (!json_is_integer(v)) return mb_fail(MB_EFORMAT, "%s: \"%s\" is %s, expected a token id in 0..%lld", name, key, mb_json_kind(v), (long long)(vocab - 1));
    int64_t x = (int64_t)json_integer_value(v);
    if (x < 0 || x >= vocab) return mb_fail(MB_EFORMAT, "%s: \"%s\" is %lld, outside the vocabulary (0..%lld)", name, key, (long long)x, (long long)(vocab - 1));
    *out = x;
    return 0;
}

/* Limits of the parser (the largest public models are far inside them; they keep every product of sizes
 * well inside int64 and the expected-tensor list inside int). */
#define CFG_MAX_HIDDEN (1 << 20)
#define CFG_MAX_LAYERS 4096
#define CFG_MAX_HEADS 4096
#define CFG_MAX_FFN (1 << 22)
#define CFG_MAX_VOCAB (1 << 24)
#define CFG_MAX_HEAD_DIM 1024
#define CFG_MAX_POS (1 << 24)
#define CFG_MAX_EXPERTS 1024
#define CFG_MAX_ROPE_FACTOR 1024.0

int mb_config_parse(const char *name, const char *text, size_t len, struct mb_config *c) {
    memset(c, 0, sizeof *c);
    c->bos_id = c->eos_id = -1;
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) return mb_fail(MB_EFORMAT, "%s: invalid JSON: %s (line %d)", name, jerr.text, jerr.line);
    int rc = 0;
    if (!json_is_object(root)) { rc = mb_fail(MB_EFORMAT, "%s: not a JSON object", name); goto out; }
    /* architecture: "architectures" (a non-empty list of strings, the first one counts), else model_type */
    json_t *archs = json_object_get(root, "architectures");
    const char *arch = NULL, *mtype = NULL;
    if (archs && !json_is_null(archs)) {
        if (!json_is_array(archs) || json_array_size(archs) == 0) { rc = mb_fail(MB_EFORMAT, "%s: \"architectures\" is %s, expected a non-empty list of strings", name, json_is_array(archs) ? "an empty list" : mb_json_kind(archs)); goto out; }
        size_t i;
        json_t *e;
        json_array_foreach(archs, i, e)
            if (!json_is_string(e)) { rc = mb_fail(MB_EFORMAT, "%s: \"architectures\"[%zu] is %s, expected a string", name, i, mb_json_kind(e)); goto out; }
        arch = json_string_value(json_array_get(archs, 0));
    }
    if ((rc = get_str(name, root, NULL, "model_type", &mtype))) goto out;
    if (!arch) {
        if (mtype && !strcmp(mtype, "llama")) arch = "LlamaForCausalLM";
        else if (mtype && !strcmp(mtype, "mistral")) arch = "MistralForCausalLM";
        else if (mtype && !strcmp(mtype, "mixtral")) arch = "MixtralForCausalLM";
        else { rc = mb_fail(MB_EUNSUPPORTED, "%s: no \"architectures\" entry and model_type \"%.64s\" is not supported (supported: %s)", name, mtype ? mtype : "(none)", MB_SUPPORTED_ARCHS); goto out; }
    }
    snprintf(c->arch_name, sizeof c->arch_name, "%s", arch);
    if (!strcmp(arch, "LlamaForCausalLM")) c->arch = MB_ARCH_LLAMA;
    else if (!strcmp(arch, "MistralForCausalLM")) c->arch = MB_ARCH_MISTRAL;
    else if (!strcmp(arch, "MixtralForCausalLM")) c->arch = MB_ARCH_MIXTRAL;
    else { rc = mb_fail(MB_EUNSUPPORTED, "%s: architecture %.64s is not supported (supported: %s)", name, arch, MB_SUPPORTED_ARCHS); goto out; }

    /* sizes */
    if ((rc = get_int(name, root, NULL, "hidden_size", 1, 0, 1, CFG_MAX_HIDDEN, &c->hidden)) ||
        (rc = get_int(name, root, NULL, "num_hidden_layers", 1, 0, 1, CFG_MAX_LAYERS, &c->n_layers)) ||
        (rc = get_int(name, root, NULL, "num_attention_heads", 1, 0, 1, CFG_MAX_HEADS, &c->n_heads)) ||
        (rc = get_int(name, root, NULL, "intermediate_size", 1, 0, 1, CFG_MAX_FFN, &c->ffn)) ||
        (rc = get_int(name, root, NULL, "vocab_size", 1, 0, 1, CFG_MAX_VOCAB, &c->vocab)) ||
        (rc = get_int(name, root, NULL, "num_key_value_heads", 0, c->n_heads, 1, c->n_heads, &c->n_kv_heads)))
        goto out;
    if (c->n_heads % c->n_kv_heads) { rc = mb_fail(MB_EFORMAT, "%s: \"num_attention_heads\" %lld is not a multiple of \"num_key_value_heads\" %lld", name, (long long)c->n_heads, (long long)c->n_kv_heads); goto out; }
    json_t *hd = json_object_get(root, "head_dim");
    if ((!hd || json_is_null(hd)) && c->hidden % c->n_heads) {
        rc = mb_fail(MB_EFORMAT, "%s: \"hidden_size\" %lld is not a multiple of \"num_attention_heads\" %lld and there is no \"head_dim\"", name, (long long)c->hidden, (long long)c->n_heads);
        goto out;
    }
    if ((rc = get_int(name, root, NULL, "head_dim", 0, c->hidden / c->n_heads, 2, CFG_MAX_HEAD_DIM, &c->head_dim))) goto out;
    if (c->head_dim % 2) { rc = mb_fail(MB_EFORMAT, "%s: \"head_dim\" %lld is odd (rotary embeddings need an even head size)", name, (long long)c->head_dim); goto out; }
    if (c->head_dim > c->hidden || c->n_heads * c->head_dim > CFG_MAX_HIDDEN) {
        rc = mb_fail(MB_EFORMAT, "%s: \"head_dim\" %lld does not fit \"hidden_size\" %lld (head_dim <= hidden_size, heads x head_dim <= %d)", name, (long long)c->head_dim, (long long)c->hidden, CFG_MAX_HIDDEN);
        goto out;
    }
    /* max_position_embeddings 0 or 1 would leave no room for a single prediction (and 0 divides by zero) */
    if ((rc = get_int(name, root, NULL, "max_position_embeddings", 0, 4096, 2, CFG_MAX_POS, &c->max_pos))) goto out;
    if ((rc = get_num(name, root, NULL, "rms_norm_eps", 0, 1e-6, 0, 1, 0.1, &c->rms_eps)) ||
        (rc = get_num(name, root, NULL, "rope_theta", 0, 10000.0, 1, 1, 1e12, &c->rope_theta)))
        goto out;
    int ab = 0, mlpb = 0;
    if ((rc = get_bool(name, root, "tie_word_embeddings", 0, &c->tied)) || (rc = get_bool(name, root, "attention_bias", 0, &ab)) ||
        (rc = get_bool(name, root, "mlp_bias", 0, &mlpb)))
        goto out;
    c->attention_bias = ab;
    if (ab) { rc = mb_fail(MB_EUNSUPPORTED, "%s: \"attention_bias\" = true is not supported", name); goto out; }
    if (mlpb) { rc = mb_fail(MB_EUNSUPPORTED, "%s: \"mlp_bias\" = true is not supported", name); goto out; }
    const char *act;
    if ((rc = get_str(name, root, NULL, "hidden_act", &act))) goto out;
    if (act && strcmp(act, "silu") && strcmp(act, "swish")) { rc = mb_fail(MB_EUNSUPPORTED, "%s: \"hidden_act\" \"%.64s\" is not supported (only silu)", name, act); goto out; }
    if ((rc = get_token_id(name, root, "bos_token_id", c->vocab, 0, &c->bos_id)) || (rc = get_token_id(name, root, "eos_token_id", c->vocab, 1, &c->eos_id))) goto out;

    if (c->arch != MB_ARCH_LLAMA) { /* null or 0: no sliding window */
        if ((rc = get_int(name, root, NULL, "sliding_window", 0, 0, 0, CFG_MAX_POS, &c->sliding_window))) goto out;
    }
    if (c->arch == MB_ARCH_MIXTRAL) {
        int64_t ne, nk;
        if ((rc = get_int(name, root, NULL, "num_local_experts", 1, 0, 1, CFG_MAX_EXPERTS, &ne)) ||
            (rc = get_int(name, root, NULL, "num_experts_per_tok", 1, 0, 1, ne, &nk)))
            goto out;
        c->n_experts = (int)ne;
        c->n_experts_per_tok = (int)nk;
    }

    /* rope_scaling: null, or {"rope_type" | "type": "default" | "linear" | "llama3", ...} */
    c->rope_type = MB_ROPE_DEFAULT;
    c->rope_factor = 1.0;
    c->rope_low_freq = 1.0;
    c->rope_high_freq = 4.0;
    c->rope_orig_max_pos = c->max_pos;
    json_t *rs = json_object_get(root, "rope_scaling");
    if (rs && !json_is_null(rs)) {
        if (!json_is_object(rs)) { rc = mb_fail(MB_EFORMAT, "%s: \"rope_scaling\" is %s, expected an object or null", name, mb_json_kind(rs)); goto out; }
        const char *t = NULL, *t2 = NULL;
        if ((rc = get_str(name, rs, "rope_scaling", "rope_type", &t)) || (rc = get_str(name, rs, "rope_scaling", "type", &t2))) goto out;
        if (!t) t = t2;
        if (!t) { rc = mb_fail(MB_EFORMAT, "%s: \"rope_scaling\" has no \"rope_type\"", name); goto out; }
        if (!strcmp(t, "default")) c->rope_type = MB_ROPE_DEFAULT;
        else if (!strcmp(t, "linear")) c->rope_type = MB_ROPE_LINEAR;
        else if (!strcmp(t, "llama3")) c->rope_type = MB_ROPE_LLAMA3;
        else { rc = mb_fail(MB_EUNSUPPORTED, "%s: \"rope_scaling.rope_type\" \"%.64s\" is not supported (supported: default, linear, llama3)", name, t); goto out; }
        int need = c->rope_type != MB_ROPE_DEFAULT, l3 = c->rope_type == MB_ROPE_LLAMA3;
        if ((rc = get_num(name, rs, "rope_scaling", "factor", need, 1.0, 1.0, 0, CFG_MAX_ROPE_FACTOR, &c->rope_factor)) ||
            (rc = get_num(name, rs, "rope_scaling", "low_freq_factor", l3, 1.0, 0, 1, CFG_MAX_ROPE_FACTOR, &c->rope_low_freq)) ||
            (rc = get_num(name, rs, "rope_scaling", "high_freq_factor", l3, 4.0, 0, 1, CFG_MAX_ROPE_FACTOR, &c->rope_high_freq)) ||
            (rc = get_int(name, rs, "rope_scaling", "original_max_position_embeddings", l3, c->max_pos, 2, CFG_MAX_POS, &c->rope_orig_max_pos)))
            goto out;
        if (l3 && !(c->rope_high_freq > c->rope_low_freq)) {
            rc = mb_fail(MB_EFORMAT, "%s: \"rope_scaling.high_freq_factor\" %g must exceed \"rope_scaling.low_freq_factor\" %g", name, c->rope_high_freq, c->rope_low_freq);
            goto out;
        }
    }

    json_t *qc = json_object_get(root, "quantization_config");
    if (qc && !json_is_null(qc)) {
        if (!json_is_object(qc)) { rc = mb_fail(MB_EFORMAT, "%s: \"quantization_config\" is %s, expected an object", name, mb_json_kind(qc)); goto out; }
        const char *m;
        if ((rc = get_str(name, qc, "quantization_config", "quant_method", &m))) goto out;
        if (!m || strcmp(m, "exl2")) { rc = mb_fail(MB_EUNSUPPORTED, "%s: quantization method \"%.64s\" is not supported (only exl2)", name, m ? m : "(none)"); goto out; }
        c->is_exl2 = 1;
        int64_t hb;
        if ((rc = get_num(name, qc, "quantization_config", "bits", 0, 0, 0, 1, 16, &c->exl2_bits)) ||
            (rc = get_int(name, qc, "quantization_config", "head_bits", 0, 0, 0, 16, &hb)))
            goto out;
        if (hb && hb != 2 && hb != 3 && hb != 4 && hb != 5 && hb != 6 && hb != 8 && hb != 16) {
            rc = mb_fail(MB_EFORMAT, "%s: \"quantization_config.head_bits\" is %lld, expected 2, 3, 4, 5, 6, 8 or 16", name, (long long)hb);
            goto out;
        }
        c->exl2_head_bits = (double)hb;
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

int64_t mb_config_n_expected(const struct mb_config *c) {
    if (c->n_layers < 0 || c->n_layers > CFG_MAX_LAYERS || c->n_experts < 0 || c->n_experts > CFG_MAX_EXPERTS) return -1;
    int64_t per_layer = 2 + 4 + (c->n_experts ? 1 + 3 * (int64_t)c->n_experts : 3);
    return 3 + c->n_layers * per_layer;
}

/* The idx-th expected tensor (0 <= idx < mb_config_n_expected), computed without the list: embedding,
 * per layer (2 norms, q k v o, router + w1 w3 w2 per expert or gate up down), final norm, head. */
static void expect_at(const struct mb_config *c, int64_t idx, struct mb_expect *e) {
    memset(e, 0, sizeof *e);
    int64_t H = c->hidden, qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;
    int64_t per_layer = 2 + 4 + (c->n_experts ? 1 + 3 * (int64_t)c->n_experts : 3), last = 1 + c->n_layers * per_layer;
#define SET(kind_, rows_, cols_, layer_, proj_, expert_, ...)                          \
    do {                                                                               \
        snprintf(e->name, sizeof e->name, __VA_ARGS__);                                \
        e->kind = kind_; e->rows = rows_; e->cols = cols_;                             \
        e->layer = layer_; e->proj = proj_; e->expert = expert_;                       \
    } while (0)
    if (idx == 0) { SET(MB_T_EMBED, c->vocab, H, -1, -1, -1, "model.embed_tokens.weight"); return; }
    if (idx == last) { SET(MB_T_NORM, H, 0, -1, -1, -1, "model.norm.weight"); return; }
    if (idx == last + 1) { SET(MB_T_HEAD, c->vocab, H, -1, -1, -1, "lm_head"); return; }
    int l = (int)((idx - 1) / per_layer), j = (int)((idx - 1) % per_layer);
    static const char *attn[4] = {"q_proj", "k_proj", "v_proj", "o_proj"};
    if (j == 0) SET(MB_T_NORM, H, 0, l, -1, -1, "model.layers.%d.input_layernorm.weight", l);
    else if (j == 1) SET(MB_T_NORM, H, 0, l, -1, -1, "model.layers.%d.post_attention_layernorm.weight", l);
    else if (j < 6) {
        int p = j - 2;
        SET(MB_T_LINEAR, p == MB_P_Q ? qd : p == MB_P_O ? H : kvd, p == MB_P_O ? qd : H, l, p, -1, "model.layers.%d.self_attn.%s", l, attn[p]);
    } else if (c->n_experts && j == 6) {
        SET(MB_T_ROUTER, c->n_experts, H, l, -1, -1, "model.layers.%d.block_sparse_moe.gate.weight", l);
    } else {
        int x = c->n_experts ? (j - 7) / 3 : -1, p = MB_P_GATE + (c->n_experts ? (j - 7) % 3 : j - 6);
        int64_t rows = p == MB_P_DOWN ? H : c->ffn, cols = p == MB_P_DOWN ? c->ffn : H;
        if (x >= 0) SET(MB_T_LINEAR, rows, cols, l, p, x, "model.layers.%d.block_sparse_moe.experts.%d.%s", l, x, mb_proj_name(p, 1));
        else SET(MB_T_LINEAR, rows, cols, l, p, -1, "model.layers.%d.%s", l, mb_proj_name(p, 0));
    }
#undef SET
}

int mb_config_expected(const struct mb_config *c, struct mb_expect **out, int *n) {
    *out = NULL;
    *n = 0;
    int64_t cap = mb_config_n_expected(c);
    size_t bytes;
    int rc;
    if (cap < 0) return mb_fail(MB_ERANGE, "config: %lld layers / %d experts outside the parser's limits", (long long)c->n_layers, c->n_experts);
    if ((rc = mb_size_mul(&bytes, MB_SIZE_LIMIT, "list of expected tensors", cap, sizeof(struct mb_expect)))) return rc;
    struct mb_expect *e = calloc((size_t)cap, sizeof *e);
    if (!e) return mb_fail(MB_ENOMEM, "out of memory for the list of %lld expected tensors", (long long)cap);
    for (int64_t i = 0; i < cap; i++) expect_at(c, i, &e[i]);
    *out = e;
    *n = (int)cap;
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
    if (!path || !path[0]) return mb_fail(MB_EIO, "empty model path");
    if (strlen(path) >= sizeof ((struct mb_model *)0)->dir) return mb_fail(MB_EINVAL, "%.200s...: path too long", path);
    if (access(path, F_OK) != 0) return mb_fail(MB_EIO, "%s: no such directory", path);
    struct mb_model *m = calloc(1, sizeof *m);
    if (!m) return mb_fail(MB_ENOMEM, "out of memory");
    int rc = 0;
    unsigned char *used = NULL;
    char cfgp[4200];
    snprintf(m->dir, sizeof m->dir, "%s", path);
    if (!mb_is_dir(path)) { /* a checkpoint file: config.json lives beside it */
        char *sl = strrchr(m->dir, '/');
        if (!sl) strcpy(m->dir, ".");
        else if (sl == m->dir) m->dir[1] = 0; /* "/model.safetensors" -> "/" */
        else *sl = 0;
    }
    if ((rc = mb_path_join(cfgp, sizeof cfgp, m->dir, "config.json"))) goto fail;
    if (access(cfgp, F_OK) != 0) { rc = mb_fail(MB_EIO, "%s: no config.json (needed to describe the model)", m->dir); goto fail; }
    if ((rc = mb_config_load(cfgp, &m->cfg))) goto fail; /* a FIFO or directory named config.json is refused there */
    if ((rc = mb_st_set_open(path, &m->st))) goto fail;
    /* Before anything proportional to the config is allocated: the checkpoint must hold at least one
     * tensor per expected tensor (the list itself is proportional to layers x experts, and a tiny
     * config.json could otherwise ask for gigabytes). */
    {
        int64_t total = mb_config_n_expected(&m->cfg), need = total - (m->cfg.tied ? 1 : 0);
        if (need > m->st->n) { /* name the first expected tensor that is missing, found without the list */
            struct mb_expect e;
            char nm[192];
            for (int64_t i = 0; i < total; i++) {
                expect_at(&m->cfg, i, &e);
                if (e.kind == MB_T_HEAD && m->cfg.tied) continue;
                if (e.kind == MB_T_LINEAR || e.kind == MB_T_HEAD) {
                    snprintf(nm, sizeof nm, "%s.weight", e.name);
                    if (mb_st_find(m->st, nm)) continue;
                    snprintf(nm, sizeof nm, "%s.q_weight", e.name);
                    if (mb_st_find(m->st, nm)) continue;
                    snprintf(nm, sizeof nm, "%s.weight", e.name);
                } else {
                    snprintf(nm, sizeof nm, "%s", e.name);
                    if (mb_st_find(m->st, nm)) continue;
                }
                break;
            }
            rc = mb_fail(MB_EFORMAT, "%s: tensor %s not found (config.json describes %lld tensors, the checkpoint holds %d)", m->st->path, nm,
                         (long long)need, m->st->n);
            goto fail;
        }
    }
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
