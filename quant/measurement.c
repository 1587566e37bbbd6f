/* quant/measurement.c: the measurement.json reader (layout in quant.h). Everything in the file is
 * checked before it is used: types, accuracy in [0, 1], total_bits a positive integer, each projection's
 * setting well-formed, the projections of a module consistent with its kind, and sizes bounded. Every
 * error is one line naming the file, the module and the option index. */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"

/* Bounds: a Mixtral 8x22B measurement (56 layers, 2 modules each, 19 options) is about 2 MB and 112
 * modules; these leave two orders of magnitude of room and keep every count inside int. */
#define MEAS_MAX_BYTES ((size_t)64 << 20)
#define MEAS_MAX_MODULES 65536
#define MEAS_MAX_OPTIONS 1024
#define MEAS_MAX_GROUP 65536 /* EXL2 row indices are 16-bit */
#define MEAS_PROP_TOL 1e-3   /* bits_prop must sum to 1 within this (the tables' shares are short decimals) */

/* projection keys, in the order options store them */
static const char *const proj_keys[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w3", "w2"};
#define N_PROJ_KEYS ((int)(sizeof proj_keys / sizeof *proj_keys))
enum { K_Q, K_K, K_V, K_O, K_GATE, K_UP, K_DOWN, K_W1, K_W3, K_W2 };
#define BIT(k) (1u << (k))
#define SET_ATTN (BIT(K_Q) | BIT(K_K) | BIT(K_V) | BIT(K_O))
#define SET_MLP (BIT(K_GATE) | BIT(K_UP) | BIT(K_DOWN))
#define SET_MLP_NOGATE (BIT(K_UP) | BIT(K_DOWN))
#define SET_MOE (BIT(K_W1) | BIT(K_W3) | BIT(K_W2))

static int proj_index(const char *k) {
    for (int i = 0; i < N_PROJ_KEYS; i++)
        if (!strcmp(k, proj_keys[i])) return i;
    return -1;
}

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

void mb_measurement_free(struct mb_measurement *m) {
    if (!m) return;
    for (int i = 0; i < m->n_modules; i++) free(m->modules[i].opts);
    free(m->modules);
    free(m);
}

/* context for messages: "FILE: MODULE option I: proj: ..." */
struct ctx { const char *file, *module; size_t opt; const char *proj; };
#define FAILP(c, ...) fail_at((c), __VA_ARGS__)
static int fail_at(const struct ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail_at(const struct ctx *c, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (c->proj) return mb_fail(MB_EFORMAT, "%s: %.128s option %zu: %s: %s", c->file, c->module, c->opt, c->proj, msg);
    return mb_fail(MB_EFORMAT, "%s: %.128s option %zu: %s", c->file, c->module, c->opt, msg);
}

/* one projection's {"group_size", "bits", "bits_prop", "scale_bits"} -> a setting */
static int parse_proj(const struct ctx *c, json_t *o, struct mb_qsetting *q, char *str, size_t strsz) {
    memset(q, 0, sizeof *q);
    if (!json_is_object(o)) return FAILP(c, "is %s, expected an object", mb_json_kind(o));
    const char *key;
    json_t *v;
    json_object_foreach(o, key, v)
        if (strcmp(key, "group_size") && strcmp(key, "bits") && strcmp(key, "bits_prop") && strcmp(key, "scale_bits"))
            return FAILP(c, "unknown key \"%.64s\"", key);
    json_t *jb = json_object_get(o, "bits"), *jp = json_object_get(o, "bits_prop"), *jg = json_object_get(o, "group_size"), *js = json_object_get(o, "scale_bits");
    if (!json_is_array(jb) || json_array_size(jb) < 1 || json_array_size(jb) > MB_QS_MAX)
        return FAILP(c, "\"bits\" is %s, expected a list of 1 to %d bit widths", jb ? mb_json_kind(jb) : "missing", MB_QS_MAX);
    size_t n = json_array_size(jb);
    if (!json_is_array(jp) || json_array_size(jp) != n)
        return FAILP(c, "\"bits_prop\" is %s, expected a list of %zu shares", jp ? (json_is_array(jp) ? "a list of another length" : mb_json_kind(jp)) : "missing", n);
    if (!json_is_integer(js) || json_integer_value(js) != 4)
        return FAILP(c, "\"scale_bits\" must be 4 (the only scale width EXL2 has)");
    q->n = (int)n;
    q->scale_bits = 4;
    double sum = 0;
    for (size_t i = 0; i < n; i++) {
        json_t *b = json_array_get(jb, i), *p = json_array_get(jp, i);
        json_int_t bi = json_is_integer(b) ? json_integer_value(b) : -1;
        if (bi != 2 && bi != 3 && bi != 4 && bi != 5 && bi != 6 && bi != 8)
            return FAILP(c, "\"bits\"[%zu] is not one of 2, 3, 4, 5, 6, 8", i);
        if (i && bi > q->bits[i - 1]) return FAILP(c, "\"bits\" must be in descending order");
        double pv = json_is_number(p) ? json_number_value(p) : NAN;
        if (!isfinite(pv) || !(pv > 0) || pv > 1) return FAILP(c, "\"bits_prop\"[%zu] is not a share in (0, 1]", i);
        q->bits[i] = (int)bi;
        q->prop[i] = pv;
        sum += pv;
        /* the group size of this part: {"<bits>": g}, [g per part] or one g */
        json_t *g = NULL;
        if (json_is_object(jg)) {
            char bk[8];
            snprintf(bk, sizeof bk, "%d", (int)bi);
            g = json_object_get(jg, bk);
            if (!g) return FAILP(c, "\"group_size\" has no entry for %d bits", (int)bi);
        } else if (json_is_array(jg)) {
            if (json_array_size(jg) != n) return FAILP(c, "\"group_size\" has %zu entries for %zu parts", json_array_size(jg), n);
            g = json_array_get(jg, i);
        } else if (json_is_integer(jg)) {
            g = jg;
        } else {
            return FAILP(c, "\"group_size\" is %s, expected an object, a list or an integer", jg ? mb_json_kind(jg) : "missing");
        }
        json_int_t gi = json_is_integer(g) ? json_integer_value(g) : -1;
        if (gi < 32 || gi > MEAS_MAX_GROUP || gi % 32)
            return FAILP(c, "group size for %d bits is not a multiple of 32 in 32..%d", (int)bi, MEAS_MAX_GROUP);
        q->gsize[i] = (int)gi;
    }
    if (fabs(sum - 1.0) > MEAS_PROP_TOL) return FAILP(c, "\"bits_prop\" sums to %g, not 1", sum);
    if (json_is_object(jg)) { /* no stray keys: every key is the width of a part */
        const char *gk;
        json_t *gv;
        json_object_foreach(jg, gk, gv) {
            int found = 0;
            for (int i = 0; i < q->n; i++) {
                char bk[8];
                snprintf(bk, sizeof bk, "%d", q->bits[i]);
                found |= !strcmp(gk, bk);
            }
            if (!found) return FAILP(c, "\"group_size\" has an entry \"%.16s\" for a width not in \"bits\"", gk);
            (void)gv;
        }
    }
    /* the string form must read back as the same setting (what convert and the tables use) */
    mb_qsetting_str(q, str, strsz);
    struct mb_qsetting back;
    if (mb_qsetting_parse(str, &back)) return FAILP(c, "setting %s: %s", str, mb_errmsg());
    return 0;
}

static int parse_option(const struct ctx *c0, json_t *o, struct mb_meas_option *op, unsigned *keyset) {
    struct ctx c = *c0;
    memset(op, 0, sizeof *op);
    if (!json_is_object(o)) return FAILP(&c, "is %s, expected an object", mb_json_kind(o));
    json_t *a = json_object_get(o, "accuracy"), *tb = json_object_get(o, "total_bits");
    if (!a) return FAILP(&c, "no \"accuracy\"");
    if (!json_is_number(a)) return FAILP(&c, "\"accuracy\" is %s, expected a number in [0, 1]", mb_json_kind(a));
    op->accuracy = json_number_value(a);
    if (!isfinite(op->accuracy) || op->accuracy < 0 || op->accuracy > 1) return FAILP(&c, "\"accuracy\" %g is outside [0, 1]", op->accuracy);
    if (!tb) return FAILP(&c, "no \"total_bits\"");
    if (!json_is_integer(tb) || json_integer_value(tb) <= 0 || json_integer_value(tb) > ((json_int_t)1 << 62))
        return FAILP(&c, "\"total_bits\" is %s, expected a positive integer", json_is_integer(tb) ? "out of range" : mb_json_kind(tb));
    op->total_bits = (int64_t)json_integer_value(tb);
    unsigned seen = 0;
    const char *key;
    json_t *v;
    json_object_foreach(o, key, v) {
        if (!strcmp(key, "accuracy") || !strcmp(key, "total_bits")) continue;
        int k = proj_index(key);
        if (k < 0) return FAILP(&c, "unknown key \"%.64s\" (projections: q_proj .. o_proj, gate_proj, up_proj, down_proj, w1, w3, w2)", key);
        seen |= BIT(k);
    }
    int np = __builtin_popcount(seen);
    if (np > MB_MEAS_MAX_PROJ) return FAILP(&c, "has %d projections, more than a module has (%d)", np, MB_MEAS_MAX_PROJ);
    /* stored in the fixed order of proj_keys */
    for (int k = 0; k < N_PROJ_KEYS; k++) {
        if (!(seen & BIT(k))) continue;
        int i = op->n_proj++;
        c.proj = proj_keys[k];
        snprintf(op->proj[i], sizeof op->proj[i], "%s", proj_keys[k]);
        int rc = parse_proj(&c, json_object_get(o, proj_keys[k]), &op->q[i], op->setting[i], sizeof op->setting[i]);
        if (rc) return rc;
    }
    *keyset = seen;
    return 0;
}

static int cmp_module(const void *a, const void *b) {
    return strcmp(((const struct mb_meas_module *)a)->name, ((const struct mb_meas_module *)b)->name);
}

int mb_measurement_parse(const char *name, const char *text, size_t len, struct mb_measurement **out) {
    *out = NULL;
    if (len > MEAS_MAX_BYTES) return mb_fail(MB_EFORMAT, "%s: larger than %zu bytes", name, MEAS_MAX_BYTES);
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) return mb_fail(MB_EFORMAT, "%s: invalid JSON: %s (line %d)", name, jerr.text, jerr.line);
    struct mb_measurement *m = calloc(1, sizeof *m);
    int rc = 0;
    if (!m) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto fail; }
    m->last_module_idx = -1;
    if (!json_is_object(root)) { rc = mb_fail(MB_EFORMAT, "%s: not a JSON object", name); goto fail; }
    json_t *meas = json_object_get(root, "measurement"), *lm = json_object_get(root, "last_module_idx");
    if (!json_is_object(meas)) { rc = mb_fail(MB_EFORMAT, "%s: \"measurement\" is %s, expected an object", name, meas ? mb_json_kind(meas) : "missing"); goto fail; }
    if (lm && !json_is_null(lm)) {
        if (!json_is_integer(lm) || json_integer_value(lm) < 0 || json_integer_value(lm) > 4 * MEAS_MAX_MODULES) {
            rc = mb_fail(MB_EFORMAT, "%s: \"last_module_idx\" is not an integer in 0..%d", name, 4 * MEAS_MAX_MODULES);
            goto fail;
        }
        m->last_module_idx = (int64_t)json_integer_value(lm);
    }
    size_t nmod = json_object_size(meas);
    if (nmod > MEAS_MAX_MODULES) { rc = mb_fail(MB_EFORMAT, "%s: %zu modules, more than %d", name, nmod, MEAS_MAX_MODULES); goto fail; }
    m->modules = calloc(nmod ? nmod : 1, sizeof *m->modules);
    if (!m->modules) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto fail; }
    const char *mname;
    json_t *arr;
    json_object_foreach(meas, mname, arr) {
        if (json_is_null(arr)) continue; /* modules the reference converter does not measure (norms, head) */
        if (!mname[0] || strlen(mname) >= sizeof m->modules[0].name) { rc = mb_fail(MB_EFORMAT, "%s: module name \"%.64s\" is empty or longer than %zu bytes", name, mname, sizeof m->modules[0].name - 1); goto fail; }
        unsigned want[2] = {0, 0};
        if (ends_with(mname, ".self_attn")) want[0] = SET_ATTN;
        else if (ends_with(mname, ".mlp")) { want[0] = SET_MLP; want[1] = SET_MLP_NOGATE; }
        else if (ends_with(mname, ".block_sparse_moe")) want[0] = SET_MOE;
        else { rc = mb_fail(MB_EFORMAT, "%s: %.128s: not a module mixbit measures (expected a name ending in .self_attn, .mlp or .block_sparse_moe)", name, mname); goto fail; }
        if (!json_is_array(arr)) { rc = mb_fail(MB_EFORMAT, "%s: %.128s is %s, expected a list of options", name, mname, mb_json_kind(arr)); goto fail; }
        size_t no = json_array_size(arr);
        if (no < 1 || no > MEAS_MAX_OPTIONS) { rc = mb_fail(MB_EFORMAT, "%s: %.128s has %zu options, expected 1..%d", name, mname, no, MEAS_MAX_OPTIONS); goto fail; }
        struct mb_meas_module *mod = &m->modules[m->n_modules++];
        snprintf(mod->name, sizeof mod->name, "%s", mname);
        mod->opts = calloc(no, sizeof *mod->opts);
        if (!mod->opts) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto fail; }
        mod->n_opts = (int)no;
        unsigned first = 0;
        for (size_t i = 0; i < no; i++) {
            struct ctx c = {name, mname, i, NULL};
            unsigned ks = 0;
            if ((rc = parse_option(&c, json_array_get(arr, i), &mod->opts[i], &ks))) goto fail;
            if (i == 0) {
                first = ks;
                if (ks != want[0] && (!want[1] || ks != want[1])) { /* an option with no projection matches nothing */
                    rc = FAILP(&c, "projections do not match the module kind (%s)", want[0] == SET_ATTN ? "q_proj, k_proj, v_proj, o_proj" : want[0] == SET_MOE ? "w1, w3, w2" : "gate_proj, up_proj, down_proj");
                    goto fail;
                }
            } else if (ks != first) {
                rc = FAILP(&c, "has other projections than option 0");
                goto fail;
            }
        }
    }
    qsort(m->modules, (size_t)m->n_modules, sizeof *m->modules, cmp_module);
    json_decref(root);
    *out = m;
    return 0;
fail:
    json_decref(root);
    mb_measurement_free(m);
    return rc;
}

int mb_measurement_load(const char *path, struct mb_measurement **out) {
    *out = NULL;
    char *text;
    size_t len;
    int rc = mb_read_file(path, &text, &len, MEAS_MAX_BYTES); /* regular files only, bounded */
    if (rc) return rc;
    rc = mb_measurement_parse(path, text, len, out);
    free(text);
    return rc;
}

const struct mb_meas_module *mb_measurement_find(const struct mb_measurement *m, const char *module) {
    int lo = 0, hi = m->n_modules - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2, c = strcmp(m->modules[mid].name, module);
        if (!c) return &m->modules[mid];
        if (c < 0) lo = mid + 1; else hi = mid - 1;
    }
    return NULL;
}

const char *mb_meas_option_setting(const struct mb_meas_option *o, const char *proj) {
    for (int i = 0; i < o->n_proj; i++)
        if (!strcmp(o->proj[i], proj)) return o->setting[i];
    return NULL;
}
