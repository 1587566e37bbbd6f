/* convert/convert.c: `mixbit convert IN_DIR OUT_DIR --bpw B`, the driver: a list of stages, each a function
 * calling the folder that owns the work (calib/ for calibration, Hessians and measurement, quant/ for the
 * option tables, GPTQ and allocation, formats/ for the files):
 *
 *   rows       calibration rows from the text (tokenized with the model's tokenizer)
 *   measure    per module: Hessians, every option scored (calib/measure.c)
 *   allocate   one option per module under the bit budget (quant/alloc.c)
 *   quantize   per module: Hessians on the quantized model's states, GPTQ with the chosen option, packing
 *   head       the output head at --head-bits
 *   compile    output.safetensors (or shards), config.json, tokenizer files, measurement.json
 *   evaluate   perplexity and KL divergence before and after, the report
 *
 * Everything is built in OUT_DIR.partial/ (work files under OUT_DIR.partial/work/) and the directory is
 * renamed to OUT_DIR only when complete. State is checkpointed (atomic renames) after stages and modules;
 * re-running the same command continues from the last checkpoint and gives byte-identical output.
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ftw.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../calib/calib.h"
#include "../quant/quant.h"
#include "convert.h"

enum { ST_ROWS = 0, ST_MEASURE = 1, ST_SENS = 2, ST_QUANT = 3, ST_HEAD = 4, ST_COMPILE = 5, ST_EVAL = 6, ST_DONE = 7 };

/* Near the bottom of the reference tables the allocator has almost no choice (every module at its
 * cheapest row), and small models carry so much fixed overhead per row (the 32-bit q_invperm entry, one
 * 4-bit scale per column and group) that the tables cannot even reach some targets (stories260K: 3.75
 * bpw at least). When the target is within EXTRA_MARGIN bpw of the tables' minimum (or below it), one
 * option is added to both tables: MB_EXTRA_SETTING (1:2b_32g) for every projection. measurement.json then
 * has 20 / 18 entries per module. On kjv-llama at 2.5 bpw this halves the KL divergence (bench/RESULTS.md). */
#define EXTRA_MARGIN 0.5

/* Default tokens of the sensitivity pass (--sens-tokens): the calibration rows whose final logits weigh each
 * module's measured error by its effect on the model's output (bench/RESULTS.md, "SmolLM2"). */
#define SENS_TOKENS 2048

struct conv {
    const struct mb_convert_params *p;
    const struct mb_ops *ops;
    struct mb_model *m;
    struct mb_tokenizer *tok;
    const struct mb_config *c;
    char out[4100], part[4200], work[4300];
    int lock_fd;           /* OUT_DIR.lock, flock'd for the whole run (-1: none) */
    char lock_path[4200];
    char args_hash[32];
    int nmod;
    int stage, next_module;
    int64_t L, Rm, Rq;     /* row length, measurement rows, quantization rows */
    int32_t *rows_m, *rows_q;
    int32_t *cal_ids;      /* the tokenized calibration text (fresh starts only) */
    int64_t cal_n, cal_used; /* its tokens, and the head of them calibration draws from (the rest: held-out eval) */
    struct mb_states st;
    int states_cur;        /* which states buffer holds the current input (kept across stages) */
    struct mb_fwd f;
    int extra;             /* MB_EXTRA_SETTING in the tables */
    int bos;               /* calibration rows and evaluation start with BOS: the model's rule */
    struct mb_module_table *tab; /* [nmod] */
    double *acc;           /* [nmod][MB_MODULE_OPTIONS_MAX] accuracy per option */
    double *sens_kld;      /* [nmod] output KLD of the module's probe (the sensitivity pass), NULL: none */
    int *sens_probe;       /* [nmod] the probe's option row */
    int64_t sens_S;        /* sequences of the sensitivity pass (0: off) */
    int sens_loaded;       /* the sensitivity came with --measurement */
    struct mb_sens sens;   /* the sensitivity pass in progress (its streams are checkpointed) */
    int *choice;           /* [nmod] */
    double last_ckpt;
    int64_t *expert_tokens;/* [layers][experts] */
    int64_t decoder_numel;
    int64_t chunk_rows;
    size_t device_reserve; /* device bytes kept free for weights and work buffers when placing the states */
    double alloc_err, sa_err, sa_bpw;
    double t_measure, t_sens, t_quant, t_head, t_eval; /* seconds of the stages run by this process (0: resumed past them) */
};

#define ACC(cv, m, r) ((cv)->acc[(size_t)(m) * MB_MODULE_OPTIONS_MAX + (r)])

/* test hook: MB_TEST_KILL="measure:3" or "quant:2" kills the process (SIGKILL, like kill -9) in the
 * middle of that module, after some of its work and before its checkpoint */
static void maybe_kill(const char *stage, int m) {
    const char *k = getenv("MB_TEST_KILL");
    if (!k) return;
    char want[64];
    snprintf(want, sizeof want, "%s:%d", stage, m);
    if (!strcmp(k, want)) { fflush(NULL); raise(SIGKILL); }
}

/* ---------------------------------------------------------------------------------------------- */
/* files                                                                                           */

static int wpath(const struct conv *cv, char *out, size_t n, const char *name) { return mb_path_join(out, n, cv->work, name); }

static int write_json_atomic(const char *path, json_t *j) {
    char *s = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
    if (!s) return mb_fail(MB_ENOMEM, "out of memory");
    size_t n = strlen(s);
    char *t = realloc(s, n + 2);
    if (!t) { free(s); return mb_fail(MB_ENOMEM, "out of memory"); }
    t[n] = '\n';
    t[n + 1] = 0;
    int rc = mb_write_file_atomic(path, t, n + 1);
    free(t);
    return rc;
}

/* the last component of a path (no directory of the converting machine ever reaches the output) */
static const char *base_name(const char *path) {
    if (!path) return NULL;
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/') n--;
    static _Thread_local char buf[512];
    size_t b = n;
    while (b > 0 && path[b - 1] != '/') b--;
    snprintf(buf, sizeof buf, "%.*s", (int)(n - b), path + b);
    return buf;
}

/* the calibration text's name as recorded in the output */
static const char *cal_name(const struct conv *cv) {
    static _Thread_local char buf[512];
    snprintf(buf, sizeof buf, "%s", cv->p->cal_name ? cv->p->cal_name : cv->p->cal ? base_name(cv->p->cal) : "none");
    return buf;
}

/* ---------------------------------------------------------------------------------------------- */
/* hidden states and checkpoints                                                                   */

/* the states of R rows: on the device when the backend is a GPU and they fit (with room for one layer and
 * the work buffers), else in host memory, spilled to files in the work directory beyond --max-memory; on
 * resume the checkpointed states are read back */
static int states_open(struct conv *cv, int64_t R, int resume) {
    size_t bytes = (size_t)(R * cv->L * cv->c->hidden) * sizeof(float);
    int where = cv->p->max_memory_mb > 0 && 2.0 * (double)bytes > cv->p->max_memory_mb * 1024 * 1024 ? 1 : 0;
    if (cv->ops->device && where == 0) {
        size_t fr = 0, tot = 0;
        if (!mb_cuda_mem_info(&fr, &tot) && 2 * bytes + cv->device_reserve < fr) where = 2;
    }
    int rc = mb_states_open(&cv->st, cv->ops, R, cv->L, cv->c->hidden, where, cv->work);
    if (rc) return rc;
    cv->st.cur = cv->states_cur;
    char p[4400];
    wpath(cv, p, sizeof p, "states.f32");
    if (resume && (rc = mb_states_load(&cv->st, p))) return rc;
    if (where == 1) mb_info("hidden states: 2 x %.1f MB, spilled to %s (over --max-memory)", bytes / 1e6, cv->work);
    if (where == 2) mb_info("hidden states: 2 x %.1f MB on the %s device", bytes / 1e6, cv->ops->name);
    return 0;
}

static int save_state(struct conv *cv) {
    struct mb_states *s = &cv->st;
    int rc = 0;
    char p[4400];
    if (s->buf[0] && (cv->stage == ST_MEASURE || cv->stage == ST_SENS || cv->stage == ST_QUANT || cv->stage == ST_HEAD)) {
        wpath(cv, p, sizeof p, "states.f32");
        if ((rc = mb_states_save(s, p))) return rc;
    }
    if (cv->stage == ST_SENS && cv->next_module > 0 && cv->sens.stream) {
        wpath(cv, p, sizeof p, "sens.f32");
        if ((rc = mb_sens_save(&cv->sens, cv->next_module, p))) return rc;
    }
    json_t *j = json_object();
    json_object_set_new(j, "args", json_string(cv->args_hash));
    json_object_set_new(j, "stage", json_integer(cv->stage));
    json_object_set_new(j, "next_module", json_integer(cv->next_module));
    json_object_set_new(j, "states_buffer", json_integer(cv->states_cur));
    json_object_set_new(j, "states_mapped", json_integer(s->mapped));
    json_t *acc = json_array();
    for (int m = 0; m < cv->nmod; m++) {
        json_t *a = json_array();
        for (int o = 0; o < cv->tab[m].n; o++) json_array_append_new(a, json_real(ACC(cv, m, o)));
        json_array_append_new(acc, a);
    }
    json_object_set_new(j, "accuracy", acc);
    json_t *ch = json_array();
    for (int m = 0; m < cv->nmod; m++) json_array_append_new(ch, json_integer(cv->choice[m]));
    json_object_set_new(j, "choice", ch);
    json_t *et = json_array();
    for (int64_t i = 0; i < cv->c->n_layers * cv->c->n_experts; i++) json_array_append_new(et, json_integer(cv->expert_tokens[i]));
    json_object_set_new(j, "expert_tokens", et);
    if (cv->sens_S && cv->stage > ST_SENS) {
        json_t *sk = json_array(), *sp = json_array();
        for (int m = 0; m < cv->nmod; m++) { json_array_append_new(sk, json_real(cv->sens_kld[m])); json_array_append_new(sp, json_integer(cv->sens_probe[m])); }
        json_object_set_new(j, "sensitivity_kld", sk);
        json_object_set_new(j, "sensitivity_probe", sp);
    }
    wpath(cv, p, sizeof p, "state.json");
    rc = write_json_atomic(p, j);
    json_decref(j);
    cv->last_ckpt = mb_now();
    return rc;
}

static int load_state(struct conv *cv, int *found) {
    char p[4400];
    *found = 0;
    wpath(cv, p, sizeof p, "state.json");
    if (!mb_file_exists(p)) return 0;
    json_error_t jerr;
    json_t *j = json_load_file(p, 0, &jerr);
    if (!j) return mb_fail(MB_EFORMAT, "%s: corrupt checkpoint: %s", p, jerr.text);
    int rc = 0;
    const char *args = json_string_value(json_object_get(j, "args"));
    if (!args || strcmp(args, cv->args_hash)) {
        rc = mb_fail(MB_EINVAL, "%s holds a conversion with other options; rerun with the same options or remove it", cv->part);
        goto out;
    }
    json_t *jst = json_object_get(j, "stage"), *jnm = json_object_get(j, "next_module");
    if (!json_is_integer(jst) || json_integer_value(jst) < ST_ROWS || json_integer_value(jst) > ST_DONE || !json_is_integer(jnm) ||
        json_integer_value(jnm) < -1 || json_integer_value(jnm) > cv->nmod) {
        rc = mb_fail(MB_EFORMAT, "%s: corrupt checkpoint (stage or module out of range); remove %s to start over", p, cv->part);
        goto out;
    }
    cv->stage = (int)json_integer_value(jst);
    cv->next_module = (int)json_integer_value(jnm);
    cv->states_cur = (int)json_integer_value(json_object_get(j, "states_buffer")) & 1;
    json_t *acc = json_object_get(j, "accuracy"), *ch = json_object_get(j, "choice"), *et = json_object_get(j, "expert_tokens");
    if (json_array_size(acc) != (size_t)cv->nmod || json_array_size(ch) != (size_t)cv->nmod) { rc = mb_fail(MB_EFORMAT, "%s: corrupt checkpoint", p); goto out; }
    for (int m = 0; m < cv->nmod; m++) {
        json_t *a = json_array_get(acc, m);
        for (int o = 0; o < cv->tab[m].n && o < (int)json_array_size(a); o++) ACC(cv, m, o) = json_number_value(json_array_get(a, o));
        cv->choice[m] = (int)json_integer_value(json_array_get(ch, m));
    }
    for (size_t i = 0; i < json_array_size(et) && i < (size_t)(cv->c->n_layers * cv->c->n_experts); i++) cv->expert_tokens[i] = json_integer_value(json_array_get(et, i));
    if (cv->sens_S && cv->stage > ST_SENS) {
        json_t *sk = json_object_get(j, "sensitivity_kld"), *sp = json_object_get(j, "sensitivity_probe");
        if (json_array_size(sk) != (size_t)cv->nmod || json_array_size(sp) != (size_t)cv->nmod) { rc = mb_fail(MB_EFORMAT, "%s: corrupt checkpoint (sensitivity)", p); goto out; }
        for (int m = 0; m < cv->nmod; m++) {
            cv->sens_kld[m] = json_number_value(json_array_get(sk, m));
            cv->sens_probe[m] = (int)json_integer_value(json_array_get(sp, m));
            if (!(cv->sens_kld[m] >= 0) || cv->sens_probe[m] < 0 || cv->sens_probe[m] >= cv->tab[m].n) { rc = mb_fail(MB_EFORMAT, "%s: corrupt checkpoint (sensitivity)", p); goto out; }
        }
    }
    *found = 1;
out:
    json_decref(j);
    return rc;
}

static int maybe_checkpoint(struct conv *cv, int force) {
    double iv = cv->p->checkpoint_interval;
    if (force || cv->st.mapped || iv <= 0 || mb_now() - cv->last_ckpt >= iv) return save_state(cv);
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* the module passes                                                                               */

static void module_name(const struct conv *cv, int m, char *buf, size_t n) { mb_module_name(cv->c, m, buf, n); }

/* the module's input becomes its output: the next module's input */
static void flip(struct conv *cv) { cv->st.cur ^= 1; cv->states_cur = cv->st.cur; }

static int measure_module(struct conv *cv, int m) {
    const struct mb_layer_w *w;
    struct mb_hset hs = {0};
    char mname[96];
    module_name(cv, m, mname, sizeof mname);
    int rc = mb_fwd_layer(&cv->f, m / 2, &w);
    if (!rc) rc = mb_collect_hessians(&cv->st, &cv->f, w, m, cv->chunk_rows, cv->p->min_expert_tokens, NULL, &hs);
    if (!rc) {
        maybe_kill("measure", m);
        rc = mb_measure_module(&cv->st, &cv->f, w, m, &hs, &cv->tab[m], cv->chunk_rows, cv->p->objective, &ACC(cv, m, 0));
    }
    mb_hset_free(&hs);
    if (rc) return mb_fail_ctx(rc, "measuring %s", mname);
    flip(cv); /* the reference output is the next module's input */
    return 0;
}

struct entries {
    struct mb_st_entry *e;
    int n, cap;
    void **owned;
    int nowned;
};

static int ent_add(struct entries *es, const char *name, enum mb_dtype dt, int ndim, int64_t d0, int64_t d1, void *data, int own) {
    if (es->n == es->cap) {
        int nc = es->cap ? es->cap * 2 : 64;
        struct mb_st_entry *ne = realloc(es->e, nc * sizeof *ne);
        if (!ne) return mb_fail(MB_ENOMEM, "out of memory");
        es->e = ne;
        void **no = realloc(es->owned, (size_t)nc * sizeof *no);
        if (!no) return mb_fail(MB_ENOMEM, "out of memory");
        es->owned = no;
        es->cap = nc;
    }
    struct mb_st_entry *x = &es->e[es->n++];
    memset(x, 0, sizeof *x);
    x->name = strdup(name);
    x->dtype = dt;
    x->ndim = ndim;
    x->shape[0] = d0;
    x->shape[1] = d1;
    x->data = data;
    if (own) es->owned[es->nowned++] = data;
    return x->name ? 0 : mb_fail(MB_ENOMEM, "out of memory");
}

static void ent_free(struct entries *es) {
    for (int i = 0; i < es->n; i++) free((char *)es->e[i].name);
    for (int i = 0; i < es->nowned; i++) free(es->owned[i]);
    free(es->e);
    free(es->owned);
    memset(es, 0, sizeof *es);
}

/* the EXL2 tensors of one packed layer; the packed buffers' ownership moves to es */
static int add_packed(struct entries *es, const char *mod, struct mb_exl2_packed *pk) {
    char nm[200];
    int rc;
    snprintf(nm, sizeof nm, "%s.q_weight", mod);
    if ((rc = ent_add(es, nm, MB_I32, 2, pk->P, pk->Np, pk->q_weight, 1))) return rc;
    snprintf(nm, sizeof nm, "%s.q_scale", mod);
    if ((rc = ent_add(es, nm, MB_I32, 2, pk->G, pk->Np / 8, pk->q_scale, 1))) return rc;
    snprintf(nm, sizeof nm, "%s.q_scale_max", mod);
    if ((rc = ent_add(es, nm, MB_F16, 1, pk->G, 0, pk->q_scale_max, 1))) return rc;
    snprintf(nm, sizeof nm, "%s.q_groups", mod);
    if ((rc = ent_add(es, nm, MB_I16, 1, 2 * pk->G, 0, pk->q_groups, 1))) return rc;
    snprintf(nm, sizeof nm, "%s.q_invperm", mod);
    if ((rc = ent_add(es, nm, MB_I32, 1, pk->K, 0, pk->q_invperm, 1))) return rc;
    memset(pk, 0, sizeof *pk);
    return 0;
}

/* a weight kept unquantized (input size not a multiple of 32): "<name>.weight" as F16, from the source tensor src */
static int add_f16_weight(struct conv *cv, struct entries *es, const char *name, const char *src, int64_t N, int64_t K) {
    struct mb_weight v;
    int rc = mb_model_weight(cv->m, src, N, K, &v);
    if (rc) return rc;
    float *f = malloc((size_t)(N * K) * sizeof *f);
    uint16_t *h = malloc((size_t)(N * K) * sizeof *h);
    if (!f || !h) { free(f); free(h); return mb_fail(MB_ENOMEM, "out of memory"); }
    if ((rc = mb_weight_rows_f32(&v, 0, N, f))) { free(f); free(h); return rc; }
    for (int64_t i = 0; i < N * K; i++) h[i] = mb_f32_to_f16(f[i]);
    free(f);
    char nm[200];
    snprintf(nm, sizeof nm, "%s.weight", name);
    return ent_add(es, nm, MB_F16, 2, N, K, h, 1);
}

static int add_f16(struct conv *cv, struct entries *es, const char *ln, int proj) {
    int64_t N, K;
    mb_proj_shape(cv->c, proj, &N, &K);
    return add_f16_weight(cv, es, ln, ln, N, K);
}

static int quant_module(struct conv *cv, int m) {
    const struct mb_module_table *t = &cv->tab[m];
    const struct mb_layer_w *w;
    struct mb_layer_w *q = NULL;
    struct mb_hset hs = {0};
    struct entries es = {0};
    struct mb_exl2_packed *pk = NULL;
    int n = t->nproj * t->experts, rc;
    char mname[96];
    module_name(cv, m, mname, sizeof mname);
    if (!(pk = calloc((size_t)n, sizeof *pk))) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto out; }
    if ((rc = mb_fwd_layer(&cv->f, m / 2, &w))) goto out;
    /* Hessians on the states that the already-quantized modules produced */
    if ((rc = mb_collect_hessians(&cv->st, &cv->f, w, m, cv->chunk_rows, cv->p->min_expert_tokens, cv->expert_tokens, &hs))) goto out;
    maybe_kill("quant", m);
    if ((rc = mb_quantize_module(&cv->f, w, m, &hs, t, cv->p->uniform ? 0 : cv->choice[m], cv->p->uniform, cv->p->rtn, pk, &q))) goto out;
    for (int pi = 0; pi < t->nproj && !rc; pi++)
        for (int e = 0; e < t->experts && !rc; e++) {
            char ln[160];
            mb_linear_name(cv->c, m / 2, t->proj[pi], t->experts > 1 || (m % 2 && cv->c->n_experts) ? e : -1, ln, sizeof ln);
            rc = t->f16[pi] ? add_f16(cv, &es, ln, t->proj[pi]) : add_packed(&es, ln, &pk[pi * t->experts + e]);
        }
    if (rc) goto out;
    char p[4400], fn[64];
    snprintf(fn, sizeof fn, "q_%04d.safetensors", m);
    wpath(cv, p, sizeof p, fn);
    if ((rc = mb_st_write(p, es.e, es.n, NULL, 0))) goto out;
    /* forward with the quantized weights: the next module's input */
    rc = mb_states_forward(&cv->st, &cv->f, q, m, cv->chunk_rows, NULL);
out:
    mb_quantized_free(q, m, t);
    ent_free(&es);
    if (pk) for (int i = 0; i < n; i++) mb_exl2_packed_free(&pk[i]);
    free(pk);
    mb_hset_free(&hs);
    if (rc) return mb_fail_ctx(rc, "quantizing %s", mname);
    flip(cv);
    return 0;
}

/* One pass over all modules (measurement or quantization), from the checkpointed module on: the states
 * are embedded first when the pass starts fresh. */
typedef int (*module_fn)(struct conv *cv, int m);
static int run_pass(struct conv *cv, const char *name, const int32_t *rows, int64_t R, module_fn fn, int ckpt_last) {
    int rc;
    if ((rc = states_open(cv, R, cv->next_module >= 0))) return rc;
    if (cv->next_module < 0) {
        if ((rc = mb_states_embed(&cv->st, &cv->f, rows, cv->chunk_rows))) return rc;
        cv->next_module = 0;
    }
    struct mb_progress pr;
    mb_progress_begin(&pr, name, "modules", cv->nmod);
    for (int m = cv->next_module; m < cv->nmod; m++) {
        if ((rc = fn(cv, m))) return rc;
        cv->next_module = m + 1;
        mb_progress_update(&pr, m + 1);
        if ((rc = maybe_checkpoint(cv, ckpt_last && m + 1 == cv->nmod))) return rc;
    }
    mb_progress_end(&pr);
    return 0;
}

static int quant_head(struct conv *cv) {
    const struct mb_config *c = cv->c;
    const struct mb_ops *o = cv->ops;
    int64_t H = c->hidden, V = c->vocab, M = cv->Rq * cv->L, CH = cv->chunk_rows;
    int rc;
    if (H % 32) { /* an input size the EXL2 kernels cannot take: the head stays F16 (as the decoder's such layers) */
        struct entries es = {0};
        char p[4400];
        rc = add_f16_weight(cv, &es, "lm_head", c->tied && !mb_st_find(cv->m->st, "lm_head.weight") ? "model.embed_tokens" : "lm_head", V, H);
        wpath(cv, p, sizeof p, "q_head.safetensors");
        if (!rc) rc = mb_st_write(p, es.e, es.n, NULL, 0);
        ent_free(&es);
        return rc;
    }
    struct mb_hessian h;
    if ((rc = mb_hessian_init(&h, o, H))) return rc;
    float *xn = o->alloc((size_t)(CH * H) * sizeof *xn), *stage = cv->st.on_backend ? NULL : o->alloc((size_t)(CH * H) * sizeof *stage);
    struct entries es = {0};
    if (!xn || (!cv->st.on_backend && !stage)) { rc = mb_fail(MB_ENOMEM, "out of %s memory for the head", o->name); goto out; }
    const float *x = cv->st.buf[cv->st.cur];
    for (int64_t r0 = 0; r0 < M && !rc; r0 += CH) {
        int64_t n = M - r0 < CH ? M - r0 : CH;
        const float *xb = x + r0 * H;
        if (stage) {
            if ((rc = o->upload(stage, xb, (size_t)(n * H) * sizeof *stage))) break;
            xb = stage;
        }
        o->rmsnorm(xn, xb, cv->f.norm, n, H, (float)c->rms_eps);
        rc = mb_hessian_add(&h, xn, n);
    }
    if (rc) goto out;
    struct mb_qsetting q;
    if ((rc = mb_qsetting_parse(mb_head_option(cv->p->head_bits), &q))) goto out;
    struct mb_gptq_params gp;
    mb_gptq_default_params(&gp);
    gp.name = "lm_head";
    gp.rtn = cv->p->rtn;
    struct mb_qresult qr;
    if (cv->f.head.n != V) { rc = mb_fail(MB_EINVAL, "head has %lld rows, expected %lld", (long long)cv->f.head.n, (long long)V); goto out; }
    if ((rc = mb_gptq_quantize(&cv->f.head, &h, &q, &gp, &qr))) goto out;
    struct mb_exl2_packed pk;
    rc = mb_qresult_pack(&qr, "lm_head", &pk);
    mb_qresult_free(&qr);
    if (rc) goto out;
    rc = add_packed(&es, "lm_head", &pk);
    char p[4400];
    wpath(cv, p, sizeof p, "q_head.safetensors");
    if (!rc) rc = mb_st_write(p, es.e, es.n, NULL, 0);
out:
    ent_free(&es);
    o->free(xn);
    o->free(stage);
    mb_hessian_free(&h);
    return rc;
}

/* ---------------------------------------------------------------------------------------------- */
/* allocation                                                                                      */

static int allocate(struct conv *cv, int report) {
    struct mb_alloc_slot *s = calloc(cv->nmod, sizeof *s);
    double (*err)[MB_MODULE_OPTIONS_MAX] = calloc(cv->nmod, sizeof *err);
    if (!s || !err) { free(s); free(err); return mb_fail(MB_ENOMEM, "out of memory"); }
    for (int m = 0; m < cv->nmod; m++) {
        if (cv->sens_S) {
            /* the output's KLD: the probe's, scaled by the square of the measured error relative to the probe's */
            double ep = 1.0 - ACC(cv, m, cv->sens_probe[m]), wm = ep > 0 ? cv->sens_kld[m] / (ep * ep) : 0;
            for (int r = 0; r < cv->tab[m].n; r++) err[m][r] = wm * (1.0 - ACC(cv, m, r)) * (1.0 - ACC(cv, m, r));
        } else
            for (int r = 0; r < cv->tab[m].n; r++) err[m][r] = pow(1.0 - ACC(cv, m, r), cv->p->alloc_power > 0 ? cv->p->alloc_power : 1.0);
        s[m] = (struct mb_alloc_slot){cv->tab[m].n, cv->tab[m].bits, err[m]};
    }
    int64_t budget = (int64_t)floor(cv->p->bpw * (double)cv->decoder_numel);
    int rc = mb_alloc_solve(s, cv->nmod, budget, cv->choice);
    if (!rc && report) {
        int64_t used;
        double e = mb_alloc_eval(s, cv->nmod, cv->choice, &used);
        int *sa = malloc((size_t)cv->nmod * sizeof *sa);
        if (sa && !mb_alloc_anneal(s, cv->nmod, budget, cv->p->seed + 17, 200000, sa)) {
            int64_t sb;
            double se = mb_alloc_eval(s, cv->nmod, sa, &sb);
            mb_info("allocation: %.4f bpw, summed error %.6f (simulated annealing on the same measurement: %.4f bpw, %.6f)",
                    (double)used / cv->decoder_numel, e, (double)sb / cv->decoder_numel, se);
            cv->sa_err = se;
            cv->sa_bpw = (double)sb / cv->decoder_numel;
        }
        free(sa);
        cv->alloc_err = e;
    }
    free(s);
    free(err);
    return rc;
}

/* ---------------------------------------------------------------------------------------------- */
/* output                                                                                          */

static json_t *qparams_json(const char *setting) {
    struct mb_qsetting q;
    mb_qsetting_parse(setting, &q);
    json_t *o = json_object(), *gs = json_object(), *b = json_array(), *bp = json_array();
    for (int i = 0; i < q.n; i++) {
        char k[8];
        snprintf(k, sizeof k, "%d", q.bits[i]);
        json_object_set_new(gs, k, json_integer(q.gsize[i]));
        json_array_append_new(b, json_integer(q.bits[i]));
        json_array_append_new(bp, json_real(q.prop[i]));
    }
    json_object_set_new(o, "group_size", gs);
    json_object_set_new(o, "bits", b);
    json_object_set_new(o, "bits_prop", bp);
    json_object_set_new(o, "scale_bits", json_integer(q.scale_bits));
    return o;
}

/* the measurement.json keys of module m's projections */
static const char *proj_key(const struct conv *cv, int m, int pi) {
    static const char *attn[4] = {"q_proj", "k_proj", "v_proj", "o_proj"}, *mlp[3] = {"gate_proj", "up_proj", "down_proj"}, *moe[3] = {"w1", "w3", "w2"};
    return m % 2 == 0 ? attn[pi] : cv->c->n_experts ? moe[pi] : mlp[pi];
}

/* measurement.json in the reference converter's key layout */
static json_t *measurement_json(const struct conv *cv) {
    json_t *root = json_object(), *meas = json_object();
    for (int m = 0; m < cv->nmod; m++) {
        const struct mb_module_table *t = &cv->tab[m];
        char mn[96];
        module_name(cv, m, mn, sizeof mn);
        json_t *arr = json_array();
        for (int r = 0; r < t->n; r++) {
            json_t *o = json_object();
            json_object_set_new(o, "accuracy", json_real(ACC(cv, m, r)));
            json_object_set_new(o, "total_bits", json_integer(t->bits[r]));
            for (int pi = 0; pi < t->nproj; pi++)
                json_object_set_new(o, proj_key(cv, m, pi), qparams_json(t->setting[r][pi]));
            json_array_append_new(arr, o);
        }
        json_object_set_new(meas, mn, arr);
    }
    json_object_set_new(root, "measurement", meas);
    json_object_set_new(root, "last_module_idx", json_integer(cv->nmod));
    if (cv->sens_S) {
        /* ours (ExLlamaV2 reads only the keys above): the output KLD of each module's probe row, reused with --measurement */
        json_t *sj = json_object(), *mods = json_object();
        json_object_set_new(sj, "tokens", json_integer(cv->sens_S * cv->L));
        for (int m = 0; m < cv->nmod; m++) {
            char mn[96];
            module_name(cv, m, mn, sizeof mn);
            json_t *e = json_object();
            json_object_set_new(e, "kld", json_real(cv->sens_kld[m]));
            json_object_set_new(e, "probe", json_integer(cv->sens_probe[m]));
            json_object_set_new(mods, mn, e);
        }
        json_object_set_new(sj, "modules", mods);
        json_object_set_new(root, "mixbit_sensitivity", sj);
    }
    return root;
}

/* a setting in the canonical form the measurement reader gives (mb_qsetting_str) */
static void canon(const char *setting, char *buf, size_t n) {
    struct mb_qsetting q;
    if (mb_qsetting_parse(setting, &q)) snprintf(buf, n, "%s", setting);
    else mb_qsetting_str(&q, buf, n);
}

/* The sensitivity a measurement.json of ours holds ("mixbit_sensitivity"), for the same tables; absent (the
 * reference converter's file): the sensitivity pass runs. */
static int load_sensitivity(struct conv *cv, const char *path) {
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je), *sj = root ? json_object_get(root, "mixbit_sensitivity") : NULL;
    int rc = 0;
    if (!root) return mb_fail(MB_EFORMAT, "%s: %s (line %d)", path, je.text, je.line);
    if (sj) {
        json_t *mods = json_object_get(sj, "modules");
        if (!json_is_object(mods)) rc = mb_fail(MB_EFORMAT, "%s: \"mixbit_sensitivity\" has no \"modules\" object", path);
        for (int m = 0; m < cv->nmod && !rc; m++) {
            char mn[96];
            module_name(cv, m, mn, sizeof mn);
            json_t *e = json_object_get(mods, mn), *k = json_object_get(e, "kld"), *pr = json_object_get(e, "probe");
            double kv = json_is_number(k) ? json_number_value(k) : -1;
            json_int_t pv = json_is_integer(pr) ? json_integer_value(pr) : -1;
            if (!(kv >= 0 && kv < 1e6) || pv < 0 || pv >= cv->tab[m].n)
                rc = mb_fail(MB_EFORMAT, "%s: \"mixbit_sensitivity\" of %s: missing, or kld / probe out of range", path, mn);
            else {
                cv->sens_kld[m] = kv;
                cv->sens_probe[m] = (int)pv;
            }
        }
        if (!rc) cv->sens_loaded = 1;
    }
    json_decref(root);
    return rc;
}

/* Accuracies from a measurement.json (ours or the reference converter's), matched to the table rows by
 * their settings (any order); every row must be found with the same exact bit cost (else the file is for
 * another model or table). The reader (quant/measurement.c) validates the file. */
static int load_measurement(struct conv *cv, const char *path) {
    struct mb_measurement *ms = NULL;
    int rc = mb_measurement_load(path, &ms);
    for (int m = 0; m < cv->nmod && !rc; m++) {
        const struct mb_module_table *t = &cv->tab[m];
        char mn[96];
        module_name(cv, m, mn, sizeof mn);
        const struct mb_meas_module *mm = mb_measurement_find(ms, mn);
        if (!mm) { rc = mb_fail(MB_EFORMAT, "%s: no measurement of %s", path, mn); break; }
        for (int r = 0; r < t->n && !rc; r++) {
            int found = -1;
            for (int o = 0; o < mm->n_opts && found < 0; o++) {
                int same = 1;
                for (int pi = 0; pi < t->nproj && same; pi++) {
                    char a[128];
                    const char *b = mb_meas_option_setting(&mm->opts[o], proj_key(cv, m, pi));
                    canon(t->setting[r][pi], a, sizeof a);
                    same = b && !strcmp(a, b);
                }
                if (same) found = o;
            }
            if (found < 0) { rc = mb_fail(MB_EFORMAT, "%s: %s has no option %s / ... (table row %d)", path, mn, t->setting[r][0], r); break; }
            if (mm->opts[found].total_bits != t->bits[r])
                rc = mb_fail(MB_EINVAL, "%s: %s option %d is for another model or table (%lld bits, expected %lld)", path, mn, found,
                             (long long)mm->opts[found].total_bits, (long long)t->bits[r]);
            else ACC(cv, m, r) = mm->opts[found].accuracy;
        }
    }
    mb_measurement_free(ms);
    if (!rc && cv->sens_S) rc = load_sensitivity(cv, path);
    return rc;
}

static int copy_side_files(struct conv *cv) {
    static const char *names[] = {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "added_tokens.json"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        char a[4400], b[4400];
        mb_path_join(a, sizeof a, cv->m->dir, names[i]);
        if (!mb_file_exists(a)) continue;
        mb_path_join(b, sizeof b, cv->part, names[i]);
        int rc = mb_copy_file(a, b);
        if (rc) return rc;
    }
    return 0;
}

static int write_config(struct conv *cv) {
    char a[4400], b[4400];
    mb_path_join(a, sizeof a, cv->m->dir, "config.json");
    json_error_t jerr;
    json_t *cfg = json_load_file(a, 0, &jerr);
    if (!cfg) return mb_fail(MB_EFORMAT, "%s: %s", a, jerr.text);
    json_t *q = json_object(), *cal = json_object();
    json_object_set_new(q, "quant_method", json_string("exl2"));
    json_object_set_new(q, "version", json_string("mixbit " MB_VERSION));
    json_object_set_new(q, "bits", json_real(cv->p->bpw));
    json_object_set_new(q, "head_bits", json_integer(cv->p->head_bits));
    json_object_set_new(cal, "rows", json_integer(cv->Rq));
    json_object_set_new(cal, "length", json_integer(cv->L));
    json_object_set_new(cal, "dataset", json_string(cal_name(cv)));
    json_object_set_new(q, "calibration", cal);
    json_object_set_new(cfg, "quantization_config", q);
    mb_path_join(b, sizeof b, cv->part, "config.json");
    int rc = write_json_atomic(b, cfg);
    json_decref(cfg);
    return rc;
}

static int compile_output(struct conv *cv) {
    struct entries es = {0};
    struct mb_st_file **qf = calloc(cv->nmod + 1, sizeof *qf);
    int rc = qf ? 0 : mb_fail(MB_ENOMEM, "out of memory");
    /* float tensors as F16 */
    for (int i = 0; i < cv->m->n_ex && !rc; i++) {
        const struct mb_expect *e = &cv->m->ex[i];
        if (e->kind != MB_T_EMBED && e->kind != MB_T_NORM && e->kind != MB_T_ROUTER) continue;
        const struct mb_tensor_info *t;
        const char *nm = e->name; /* float tensors are listed with their full names */
        if ((rc = mb_st_get(cv->m->st, nm, &t))) break;
        uint16_t *h = malloc((size_t)t->numel * 2);
        if (!h) { rc = mb_fail(MB_ENOMEM, "out of memory"); break; }
        if ((rc = mb_tensor_to_f16(t, h))) { free(h); break; }
        rc = ent_add(&es, nm, MB_F16, t->ndim, t->shape[0], t->ndim > 1 ? t->shape[1] : 0, h, 1);
    }
    /* packed layers */
    for (int k = 0; k <= cv->nmod && !rc; k++) {
        char p[4400], fn[64];
        if (k < cv->nmod) snprintf(fn, sizeof fn, "q_%04d.safetensors", k); else snprintf(fn, sizeof fn, "q_head.safetensors");
        wpath(cv, p, sizeof p, fn);
        if ((rc = mb_st_open(p, &qf[k]))) break;
        for (int i = 0; i < qf[k]->n && !rc; i++) {
            const struct mb_tensor_info *t = &qf[k]->t[i];
            rc = ent_add(&es, t->name, t->dtype, t->ndim, t->shape[0], t->ndim > 1 ? t->shape[1] : 0, (void *)t->data, 0);
        }
    }
    int ns = 0;
    const char *meta[] = {"format", "pt"};
    if (!rc) rc = mb_st_write_sharded(cv->part, "output", es.e, es.n, meta, 1, (size_t)cv->p->shard_mb * 1024 * 1024, &ns);
    if (!rc) rc = write_config(cv);
    if (!rc) rc = copy_side_files(cv);
    if (!rc && !cv->p->uniform) {
        json_t *mj = measurement_json(cv);
        char p[4400];
        mb_path_join(p, sizeof p, cv->part, "measurement.json");
        rc = write_json_atomic(p, mj);
        json_decref(mj);
    }
    if (!rc) mb_info("wrote %d tensors in %d shard%s", es.n, ns, ns == 1 ? "" : "s");
    ent_free(&es);
    if (qf) for (int k = 0; k <= cv->nmod; k++) mb_st_close(qf[k]);
    free(qf);
    return rc;
}

/* ---------------------------------------------------------------------------------------------- */
/* before / after                                                                                  */

static int evaluate(struct conv *cv, json_t *report) {
    const struct mb_config *c = cv->c;
    int rc;
    struct mb_ppl_params pp;
    mb_ppl_default_params(&pp);
    pp.ops = cv->ops;
    pp.convention = MB_PPL_PAPER;
    pp.bos = cv->bos;
    pp.bos_id = mb_tokenizer_bos(cv->tok);
    pp.ctx = cv->p->eval_ctx > 0 ? cv->p->eval_ctx : (c->max_pos < 2048 ? c->max_pos : 2048);
    pp.max_tokens = cv->p->eval_tokens;
    char lp[4400];
    wpath(cv, lp, sizeof lp, "reference.logprobs");
    pp.save_logprobs = lp;
    struct mb_ppl_result a, b;
    /* the text: --eval, or the held-out tail of the calibration text (tokenized at the rows stage) */
    int32_t *ev = NULL;
    size_t evb = 0;
    char ep[4400], tname[600];
    if (cv->p->eval) snprintf(tname, sizeof tname, "%s", base_name(cv->p->eval));
    else {
        snprintf(tname, sizeof tname, "%s (held-out last %.0f%%)", cal_name(cv), 100 * cv->p->holdout);
        wpath(cv, ep, sizeof ep, "eval.i32");
        if ((rc = mb_read_file(ep, (char **)&ev, &evb, 0))) return mb_fail_ctx(rc, "the held-out evaluation tokens");
        if (evb < 8 || evb % 4) { free(ev); return mb_fail(MB_EFORMAT, "%s: corrupt", ep); }
    }
    uint64_t th = mb_tokenizer_hash(cv->tok);
    mb_info("evaluating the source model on %s (paper convention, ctx %lld, BOS %s)", tname, (long long)pp.ctx, pp.bos ? "yes" : "no");
    rc = ev ? mb_ppl_run(cv->m, ev, (int64_t)(evb / 4), th, &pp, &a) : mb_ppl_run_file(cv->m, cv->tok, cv->p->eval, &pp, &a);
    struct mb_model *q = NULL;
    if (!rc) rc = mb_model_open(cv->part, &q);
    if (!rc) {
        pp.save_logprobs = NULL;
        pp.kld = lp;
        mb_info("evaluating the quantized model");
        rc = ev ? mb_ppl_run(q, ev, (int64_t)(evb / 4), th, &pp, &b) : mb_ppl_run_file(q, cv->tok, cv->p->eval, &pp, &b);
    }
    mb_model_close(q);
    free(ev);
    if (rc) return rc;
    json_t *e = json_object();
    json_object_set_new(e, "text", json_string(tname));
    json_object_set_new(e, "bos", json_boolean(pp.bos));
    json_object_set_new(e, "convention", json_string("paper"));
    json_object_set_new(e, "ctx", json_integer(pp.ctx));
    json_object_set_new(e, "tokens", json_integer(a.tokens));
    json_object_set_new(e, "ppl_before", json_real(a.ppl));
    json_object_set_new(e, "ppl_after", json_real(b.ppl));
    json_object_set_new(e, "ppl_ratio", json_real(b.ppl / a.ppl));
    json_object_set_new(e, "kld_mean", json_real(b.kld_mean));
    json_object_set_new(e, "kld_p99", json_real(b.kld_p99));
    json_object_set_new(e, "same_top1_percent", json_real(b.same_top1));
    json_object_set_new(report, "eval", e);
    if (b.ppl / a.ppl > 2.0)
        mb_warn("perplexity rose from %.4f to %.4f (x%.2f): check the quantized model before publishing it", a.ppl, b.ppl, b.ppl / a.ppl);
    if (cv->p->fail_ppl_ratio > 0 && b.ppl / a.ppl > cv->p->fail_ppl_ratio)
        return mb_fail(MB_ENUMERIC, "perplexity rose from %.4f to %.4f (x%.2f, over --fail-ppl-ratio %.2f): the quantized model is likely broken",
                       a.ppl, b.ppl, b.ppl / a.ppl, cv->p->fail_ppl_ratio);
    return 0;
}

/* reachable decoder bpw with tables with or without the extra option */
static int bpw_range(const struct conv *cv, int extra, double *lo, double *hi) {
    int64_t a0 = 0, b0 = 0;
    for (int m = 0; m < cv->nmod; m++) {
        struct mb_module_table t;
        int rc = mb_module_table(cv->c, m, extra, NULL, &t);
        if (rc) return rc;
        int64_t a = INT64_MAX, b = 0;
        for (int r = 0; r < t.n; r++) { if (t.bits[r] < a) a = t.bits[r]; if (t.bits[r] > b) b = t.bits[r]; }
        a0 += a;
        b0 += b;
    }
    *lo = (double)a0 / cv->decoder_numel;
    *hi = (double)b0 / cv->decoder_numel;
    return 0;
}

/* does a measurement.json carry the extra option (every projection at MB_EXTRA_SETTING in some option)? */
static int measurement_has_extra(const struct conv *cv, const char *path, int *extra) {
    struct mb_measurement *ms = NULL;
    int rc = mb_measurement_load(path, &ms);
    if (rc) return rc;
    char mn[96], want[64];
    module_name(cv, 0, mn, sizeof mn);
    canon(MB_EXTRA_SETTING, want, sizeof want);
    const struct mb_meas_module *mm = mb_measurement_find(ms, mn);
    *extra = 0;
    for (int o = 0; mm && o < mm->n_opts && !*extra; o++) {
        int all = 1;
        for (int pi = 0; pi < 4 && all; pi++) {
            const char *b = mb_meas_option_setting(&mm->opts[o], proj_key(cv, 0, pi));
            all = b && !strcmp(b, want);
        }
        *extra = all;
    }
    mb_measurement_free(ms);
    return mm ? 0 : mb_fail(MB_EFORMAT, "%s: no measurement of %s", path, mn);
}

/* ---------------------------------------------------------------------------------------------- */
/* driver                                                                                          */

void mb_convert_default_params(struct mb_convert_params *p) {
    memset(p, 0, sizeof *p);
    p->bpw = 3.5;
    p->head_bits = 6;
    p->shard_mb = 8192;
    p->seed = 1;
    p->checkpoint_interval = 60;
    p->min_expert_tokens = 0; /* 0: automatic (5% of the calibration tokens / experts) */
    p->fail_ppl_ratio = 10.0;
    p->alloc_power = 1.0;
    p->holdout = 0.1;
    p->sens_tokens = -1;
}

static void args_hash(const struct mb_convert_params *p, const char *in, char out[32]) {
    char buf[8192];
    snprintf(buf, sizeof buf, "%s|%s|%d|%s|%.6f|%d|%s|%s|%lld|%lld|%lld|%lld|%s|%llu|%lld|%s|%g|%d", p->uniform ? p->uniform : "", in, p->rtn, p->out, p->bpw, p->head_bits, p->cal ? p->cal : "",
             p->cal_field ? p->cal_field : "", (long long)p->rows, (long long)p->length, (long long)p->mrows, (long long)p->min_expert_tokens,
             p->measurement ? p->measurement : "", (unsigned long long)p->seed, (long long)p->shard_mb, MB_VERSION, p->alloc_power, p->extra_options);
    if (!p->eval && p->holdout > 0) snprintf(buf + strlen(buf), sizeof buf - strlen(buf), "|holdout %g", p->holdout);
    if (p->objective) snprintf(buf + strlen(buf), sizeof buf - strlen(buf), "|objective %d", p->objective);
    snprintf(buf + strlen(buf), sizeof buf - strlen(buf), "|sens %lld", (long long)p->sens_tokens);
    uint64_t h = 0xcbf29ce484222325ull;
    for (const char *c = buf; *c; c++) { h ^= (uint8_t)*c; h *= 0x100000001b3ull; }
    snprintf(out, 32, "%016llx", (unsigned long long)h);
}

/* remove a directory tree (the work directory: files and directories mixbit made; symlinks are removed, not
 * followed) */
static int rm_entry(const char *path, const struct stat *sb, int type, struct FTW *ftw) {
    (void)sb; (void)ftw;
    return (type == FTW_DP ? rmdir(path) : unlink(path)) ? -1 : 0;
}

static int rm_rf(const char *path) {
    if (nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS) != 0 && errno != ENOENT) return mb_fail(MB_EIO, "%s: cannot remove: %s", path, strerror(errno));
    return 0;
}

/* Tokens of the evaluation text, counted as it streams (validates it: readable, UTF-8, not empty) */
static int count_ids(const int32_t *ids, int64_t n, void *user) { (void)ids; *(int64_t *)user += n; return 0; }

/* Peak memory of the long stages, from the shapes (bench/RESULTS.md checks it against measured peaks):
 *   states      2 x rows x length x hidden x 4            (module input and output of every calibration row)
 *   work        the runner's activations for chunk_rows rows (mb_fwd_bytes) + the weight tile
 *   hessians    per module, f64: attention H^2 + (heads*hd)^2; MLP H^2 + ffn^2; MoE H^2 + experts x ffn^2
 *   gptq        the largest projection: 2 x Kp^2 x 8 (factorization) + Kp x N x 4 (weights in act order)
 *   candidates  measurement: every distinct setting of every projection, packed (bits / 8 bytes);
 *               quantization: the chosen setting only
 *   weights     on a GPU: the current and the prefetched layer (CPU: the mapping, page cache, not counted)
 * peak(stage) = states + work + max over modules (hessians + gptq + candidates) [+ 2 x largest layer on a GPU] */
struct mem_plan { double states_m, states_q, work, layer, hess, gptq, cand_m, cand_q, streams; };

static void memory_plan(const struct conv *cv, struct mem_plan *mp) {
    const struct mb_config *c = cv->c;
    int64_t H = c->hidden, E = c->n_experts ? c->n_experts : 1;
    memset(mp, 0, sizeof *mp);
    mp->states_m = 2.0 * cv->Rm * cv->L * H * 4;
    mp->states_q = 2.0 * cv->Rq * cv->L * H * 4;
    mp->streams = (double)cv->nmod * cv->sens_S * cv->L * H * 4;
    mp->work = (double)mb_fwd_bytes(c, cv->chunk_rows, cv->L) + (cv->ops->device ? (256.0 + 1024.0) * 1048576 : 16.0 * 1048576);
    for (int m = 0; m < cv->nmod; m++) {
        const struct mb_module_table *t = &cv->tab[m];
        int64_t qd = c->n_heads * c->head_dim;
        double hs = m % 2 == 0 ? (double)H * H + (double)qd * qd : (double)H * H + (double)(c->n_experts ? E : 1) * c->ffn * c->ffn;
        if (hs * 8 > mp->hess) mp->hess = hs * 8;
        double cand = 0, chosen = 0;
        for (int pi = 0; pi < t->nproj; pi++) {
            int64_t N, K;
            mb_proj_shape(c, t->proj[pi], &N, &K);
            int64_t Kp = (K + 31) / 32 * 32;
            double g = 2.0 * Kp * Kp * 8 + (double)Kp * N * 4;
            if (g > mp->gptq) mp->gptq = g;
            const char *seen[MB_MODULE_OPTIONS_MAX];
            int ns = 0;
            for (int r = 0; r < t->n; r++) {
                int dup = 0;
                for (int k = 0; k < ns; k++) dup |= !strcmp(seen[k], t->setting[r][pi]);
                if (dup) continue;
                seen[ns++] = t->setting[r][pi];
                struct mb_qsetting q;
                if (!mb_qsetting_parse(t->setting[r][pi], &q)) cand += (double)t->experts * mb_qsetting_bits(&q, K, N, 0) / 8;
            }
        }
        for (int r = 0; r < t->n; r++) if ((double)t->bits[r] / 8 > chosen) chosen = (double)t->bits[r] / 8;
        if (cand > mp->cand_m) mp->cand_m = cand;
        if (chosen > mp->cand_q) mp->cand_q = chosen;
    }
    for (int l = 0; l < c->n_layers; l++) {
        double b = (double)mb_layer_bytes(cv->m, l);
        if (b > mp->layer) mp->layer = b;
    }
}

static double plan_peak(const struct mem_plan *mp, int measure, int device) {
    /* the sensitivity pass holds the measurement states and the streams instead of the candidates */
    double m = mp->states_m + (mp->cand_m > mp->streams ? mp->cand_m : mp->streams);
    return (measure ? m : mp->states_q + mp->cand_q) + mp->work + mp->hess + mp->gptq + (device ? 2 * mp->layer : 0);
}

/* everything that can be checked before the first long stage: inputs, the model, the target, the
 * calibration geometry; then the work directory and a checkpoint to resume from */
static int preflight(struct conv *cv, int *found) {
    const struct mb_convert_params *p = cv->p;
    int rc;
    /* the output path: without trailing slashes; its directory is created when missing (as mkdir -p); one
     * conversion at a time */
    size_t ol = strlen(p->out);
    while (ol > 1 && p->out[ol - 1] == '/') ol--;
    if (ol == 0 || ol > 4000) return mb_fail(MB_EUSAGE, "output path \"%s\": empty or too long", p->out);
    snprintf(cv->out, sizeof cv->out, "%.*s", (int)ol, p->out);
    if (access(cv->out, F_OK) == 0) return mb_fail(MB_EINVAL, "%s already exists; choose a new output directory", cv->out);
    {
        char parent[4100];
        snprintf(parent, sizeof parent, "%s", cv->out);
        char *sl = strrchr(parent, '/');
        if (sl) { if (sl == parent) sl[1] = 0; else *sl = 0; } else snprintf(parent, sizeof parent, ".");
        if (!mb_is_dir(parent) && mb_mkdir_p(parent)) return mb_fail(MB_EIO, "%s: cannot create the output's directory: %s", cv->out, mb_errmsg());
        char lk[4200];
        snprintf(lk, sizeof lk, "%s.lock", cv->out);
        cv->lock_fd = open(lk, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (cv->lock_fd < 0) return mb_fail(MB_EIO, "%s: %s", lk, strerror(errno));
        if (flock(cv->lock_fd, LOCK_EX | LOCK_NB)) return mb_fail(MB_EINVAL, "%s: another mixbit is converting into %s", lk, cv->out);
        snprintf(cv->lock_path, sizeof cv->lock_path, "%s", lk);
    }
    /* inputs named on the command line must exist before any work starts */
    if (!p->uniform && !p->measurement && !p->cal) return mb_fail(MB_EUSAGE, "no calibration text (--cal)");
    if (p->cal && !mb_is_dir(p->cal) && (rc = mb_check_regular(p->cal))) return mb_fail_ctx(rc, "calibration text");
    if (p->eval && (rc = mb_check_regular(p->eval))) return mb_fail_ctx(rc, "evaluation text");
    if (p->eval_ctx && p->eval_ctx < 2) return mb_fail(MB_EUSAGE, "--eval-ctx must be at least 2");
    if (p->measurement && (rc = mb_check_regular(p->measurement))) return mb_fail_ctx(rc, "measurement file");
    if ((rc = mb_model_open(p->in, &cv->m))) return rc;
    cv->c = &cv->m->cfg;
    if (cv->c->is_exl2) return mb_fail(MB_EINVAL, "%s is already an EXL2 model", p->in);
    if ((rc = mb_tokenizer_load(cv->m->dir, &cv->tok))) return mb_fail_ctx(rc, "the model's tokenizer is needed for calibration");
    cv->bos = mb_tokenizer_adds_bos(cv->tok) && mb_tokenizer_bos(cv->tok) >= 0;
    if (!mb_head_option(p->head_bits)) return mb_fail(MB_EUSAGE, "--head-bits must be 2, 3, 4, 5, 6 or 8");
    if (p->base_model && !mb_hub_repo_id_ok(p->base_model)) return mb_fail(MB_EUSAGE, "--base-model \"%s\" is not a Hub repository id (org/name)", p->base_model);
    cv->nmod = (int)(2 * cv->c->n_layers);
    size_t accb;
    if ((rc = mb_size_mul(&accb, MB_SIZE_LIMIT, "accuracy table", cv->nmod, MB_MODULE_OPTIONS_MAX, sizeof *cv->acc))) return rc;
    cv->tab = calloc(cv->nmod, sizeof *cv->tab);
    cv->acc = calloc(1, accb);
    cv->choice = calloc(cv->nmod, sizeof *cv->choice);
    cv->expert_tokens = calloc((size_t)(cv->c->n_layers * (cv->c->n_experts ? cv->c->n_experts : 1)), sizeof *cv->expert_tokens);
    if (!cv->tab || !cv->acc || !cv->choice || !cv->expert_tokens) return mb_fail(MB_ENOMEM, "out of memory");
    /* the budget: reachable range first, before any work */
    for (int i = 0; i < cv->m->n_ex; i++) if (cv->m->ex[i].kind == MB_T_LINEAR) cv->decoder_numel += cv->m->ex[i].rows * cv->m->ex[i].cols;
    cv->extra = 0;
    if (p->uniform) {
        struct mb_qsetting uq;
        if ((rc = mb_qsetting_parse(p->uniform, &uq))) return rc;
    } else {
        /* the option tables: the reference converter's, plus 1:2b_32g near or below their minimum (or on
         * request), or whatever a reused measurement.json was made with */
        double lo0, hi0, lo1, hi1;
        if ((rc = bpw_range(cv, 0, &lo0, &hi0)) || (rc = bpw_range(cv, 1, &lo1, &hi1))) return rc;
        cv->extra = p->extra_options || p->bpw < lo0 + EXTRA_MARGIN;
        if (p->measurement && (rc = measurement_has_extra(cv, p->measurement, &cv->extra))) return rc;
        double lo = cv->extra ? lo1 : lo0, hi = cv->extra ? hi1 : hi0;
        if (!(p->bpw >= lo && p->bpw <= hi))
            return mb_fail(MB_ERANGE, "--bpw %.3f is outside the reachable range %.3f .. %.3f for this model", p->bpw, ceil(lo * 1000) / 1000, floor(hi * 1000) / 1000);
        if (cv->extra) mb_info("--bpw %.3f is near the reference tables' minimum (%.3f) for this model: the option %s is added to both tables", p->bpw, lo0, MB_EXTRA_SETTING);
    }
    for (int m = 0; m < cv->nmod; m++)
        if ((rc = mb_module_table(cv->c, m, cv->extra, p->uniform, &cv->tab[m]))) return rc;
    /* the evaluation text, read now (UTF-8, not empty, long enough) rather than after hours of work */
    if (p->eval) {
        int64_t ctx = p->eval_ctx > 0 ? p->eval_ctx : (cv->c->max_pos < 2048 ? cv->c->max_pos : 2048), n = 0;
        if (ctx > cv->c->max_pos) return mb_fail(MB_EUSAGE, "--eval-ctx %lld exceeds the model's max_position_embeddings %lld", (long long)ctx, (long long)cv->c->max_pos);
        if ((rc = mb_tokenize_stream(cv->tok, p->eval, 0, count_ids, &n))) return mb_fail_ctx(rc, "evaluation text");
        if (n < 2) return mb_fail(MB_EINVAL, "%s: the evaluation text has %lld tokens: nothing to score", p->eval, (long long)n);
    }
    /* calibration geometry: reference defaults (16 / 100 rows of 2048 tokens), shorter rows for shorter contexts */
    cv->L = p->length > 0 ? p->length : (cv->c->max_pos < 2048 ? cv->c->max_pos : 2048);
    cv->Rq = p->rows > 0 ? p->rows : 100;
    cv->Rm = p->mrows > 0 ? p->mrows : 16;
    snprintf(cv->part, sizeof cv->part, "%.4000s.partial", cv->out);
    snprintf(cv->work, sizeof cv->work, "%.4100s/work", cv->part);
    int holdout = !p->eval && p->holdout > 0;
    if (holdout && !(p->holdout < 0.9)) return mb_fail(MB_EUSAGE, "the held-out share of the calibration text must be below 0.9");
    if (p->cal && !mb_is_dir(cv->part) && (p->rows <= 0 || p->mrows <= 0 || holdout)) {
        /* the text once, tokenized: its tail is held out for the evaluation (never calibrated on) */
        if ((rc = mb_calib_tokens(cv->tok, p->cal, p->cal_field, &cv->cal_ids, &cv->cal_n))) return rc;
        cv->cal_used = holdout ? cv->cal_n - (int64_t)((double)cv->cal_n * p->holdout) : cv->cal_n;
        if (holdout && cv->cal_n - cv->cal_used < 64)
            return mb_fail(MB_EINVAL, "%s: %lld tokens: too short to hold %.0f%% out for the evaluation (give --eval, or --no-eval)", p->cal, (long long)cv->cal_n, 100 * p->holdout);
    }
    if ((p->rows <= 0 || p->mrows <= 0) && cv->cal_ids) {
        /* a short calibration text: fewer rows (each text token in about two rows) instead of many copies */
        int64_t cap = 2 * cv->cal_used / cv->L;
        if (cap < 4) cap = 4;
        if (p->rows <= 0 && cv->Rq > cap) { mb_info("calibration text has %lld tokens: %lld quantization rows instead of %lld", (long long)cv->cal_used, (long long)cap, (long long)cv->Rq); cv->Rq = cap; }
        if (p->mrows <= 0 && cv->Rm > cap) cv->Rm = cap;
    }
    cv->chunk_rows = cv->L * ((4096 + cv->L - 1) / cv->L);
    /* the sensitivity pass: about sens_tokens tokens of the measurement rows (whole rows) */
    if (!p->uniform) {
        int64_t st = p->sens_tokens < 0 ? SENS_TOKENS : p->sens_tokens;
        cv->sens_S = st > 0 ? (st + cv->L - 1) / cv->L : 0;
        if (cv->sens_S > cv->Rm) cv->sens_S = cv->Rm;
        if (cv->sens_S && (!(cv->sens_kld = calloc(cv->nmod, sizeof *cv->sens_kld)) || !(cv->sens_probe = calloc(cv->nmod, sizeof *cv->sens_probe))))
            return mb_fail(MB_ENOMEM, "out of memory");
    }
    if (!p->min_expert_tokens && cv->c->n_experts) {
        struct mb_convert_params *pw = (struct mb_convert_params *)p;
        pw->min_expert_tokens = cv->Rq * cv->L / 20 / cv->c->n_experts + 1;
    }
    /* the memory each long stage will need, said before it starts; a GPU that cannot hold it is refused now */
    struct mem_plan mp;
    memory_plan(cv, &mp);
    double pm = plan_peak(&mp, 1, cv->ops->device), pq = plan_peak(&mp, 0, cv->ops->device);
    mb_info("memory plan (compute on the %s): measurement %.2f GB, quantization %.2f GB (states %.2f / %.2f, Hessians %.2f, GPTQ %.2f, candidates %.2f, "
            "work %.2f, layer %.2f GB; sensitivity streams %.2f GB)", cv->ops->name, pm / 1e9, pq / 1e9, mp.states_m / 1e9, mp.states_q / 1e9, mp.hess / 1e9, mp.gptq / 1e9,
            mp.cand_m / 1e9, mp.work / 1e9, mp.layer / 1e9, mp.streams / 1e9);
    if (cv->ops->device) {
        size_t fr = 0, tot = 0;
        double need = (p->uniform || p->measurement ? pq : (pm > pq ? pm : pq)) - (p->uniform || p->measurement ? mp.states_q : (mp.states_m > mp.states_q ? mp.states_m : mp.states_q));
        if (!mb_cuda_mem_info(&fr, &tot) && need > (double)fr)
            return mb_fail(MB_ENOMEM, "the conversion needs about %.1f GB of device memory besides the hidden states; %.1f GB of %.1f GB are free", need / 1e9, fr / 1e9, tot / 1e9);
        cv->device_reserve = (size_t)need;
    }
    args_hash(p, cv->m->dir, cv->args_hash);
    if ((rc = mb_mkdir_p(cv->work))) return rc;
    if ((rc = load_state(cv, found))) return rc;
    if (*found) mb_info("resuming the conversion in %s (stage %d, module %d)", cv->part, cv->stage, cv->next_module);
    return 0;
}

/* calibration rows (measurement rows, then quantization rows), or the ones a checkpoint holds */
static int stage_rows(struct conv *cv, int found) {
    const struct mb_convert_params *p = cv->p;
    char rp[4400];
    int rc;
    wpath(cv, rp, sizeof rp, "rows.i32");
    size_t bytes;
    if ((rc = mb_size_mul(&bytes, MB_SIZE_LIMIT, "calibration rows", cv->Rm + cv->Rq, cv->L, sizeof(int32_t)))) return rc;
    int64_t nrows_total = (int64_t)(bytes / sizeof(int32_t));
    if (found && mb_file_exists(rp)) {
        char *buf;
        size_t len;
        if ((rc = mb_read_file(rp, &buf, &len, 0))) return rc;
        if (len != (size_t)nrows_total * 4) { free(buf); return mb_fail(MB_EFORMAT, "%s: corrupt", rp); }
        cv->rows_m = (int32_t *)buf;
    } else {
        int32_t *a = NULL, *b = NULL;
        mb_info("calibration: %s, %lld x %lld tokens for measurement, %lld x %lld for quantization", p->cal, (long long)cv->Rm, (long long)cv->L, (long long)cv->Rq, (long long)cv->L);
        if (!cv->cal_ids) {
            if ((rc = mb_calib_tokens(cv->tok, p->cal, p->cal_field, &cv->cal_ids, &cv->cal_n))) return rc;
            cv->cal_used = cv->cal_n;
        }
        if ((rc = mb_calib_rows_from(cv->tok, p->cal, cv->cal_ids, cv->cal_used, cv->Rm, cv->L, cv->bos, p->seed, &a))) return rc;
        if ((rc = mb_calib_rows_from(cv->tok, p->cal, cv->cal_ids, cv->cal_used, cv->Rq, cv->L, cv->bos, p->seed + 1, &b))) { free(a); return rc; }
        if (cv->cal_used < cv->cal_n) { /* the held-out tail, as the evaluation's token stream */
            char ep[4400];
            int64_t ne = cv->cal_n - cv->cal_used + (cv->bos ? 1 : 0);
            int32_t *ev = malloc((size_t)ne * sizeof *ev);
            if (!ev) { free(a); free(b); return mb_fail(MB_ENOMEM, "out of memory"); }
            if (cv->bos) ev[0] = mb_tokenizer_bos(cv->tok);
            memcpy(ev + (cv->bos ? 1 : 0), cv->cal_ids + cv->cal_used, (size_t)(cv->cal_n - cv->cal_used) * sizeof *ev);
            wpath(cv, ep, sizeof ep, "eval.i32");
            rc = mb_write_file_atomic(ep, ev, (size_t)ne * sizeof *ev);
            free(ev);
            if (rc) { free(a); free(b); return rc; }
            mb_info("evaluation: the last %.0f%% of %s (%lld tokens), held out from calibration", 100 * p->holdout, cal_name(cv), (long long)(ne));
        }
        cv->rows_m = malloc((size_t)nrows_total * 4);
        if (!cv->rows_m) { free(a); free(b); return mb_fail(MB_ENOMEM, "out of memory"); }
        memcpy(cv->rows_m, a, (size_t)(cv->Rm * cv->L) * 4);
        memcpy(cv->rows_m + cv->Rm * cv->L, b, (size_t)(cv->Rq * cv->L) * 4);
        free(a);
        free(b);
        if ((rc = mb_write_file_atomic(rp, cv->rows_m, (size_t)nrows_total * 4))) return rc;
        cv->next_module = -1; /* states not yet embedded */
        if (p->measurement && (rc = load_measurement(cv, p->measurement))) return rc;
        cv->stage = p->uniform ? ST_QUANT : p->measurement ? (cv->sens_S && !cv->sens_loaded ? ST_SENS : ST_QUANT) : ST_MEASURE;
        if ((rc = save_state(cv))) return rc;
    }
    cv->rows_q = cv->rows_m + cv->Rm * cv->L;
    return 0;
}

static int stage_measure(struct conv *cv) {
    double t0 = mb_now();
    int rc = run_pass(cv, "measuring", cv->rows_m, cv->Rm, measure_module, 1);
    if (rc) return rc;
    mb_states_close(&cv->st);
    cv->stage = cv->sens_S ? ST_SENS : ST_QUANT;
    cv->next_module = -1;
    cv->t_measure = mb_now() - t0;
    return save_state(cv);
}

/* the option row whose bits per weight are nearest the target: the module's probe */
static int probe_row(const struct conv *cv, int m) {
    const struct mb_module_table *t = &cv->tab[m];
    double numel = 0;
    for (int pi = 0; pi < t->nproj; pi++) {
        int64_t N, K;
        mb_proj_shape(cv->c, t->proj[pi], &N, &K);
        numel += (double)N * K * t->experts;
    }
    int best = 0;
    for (int r = 1; r < t->n; r++)
        if (fabs((double)t->bits[r] / numel - cv->p->bpw) < fabs((double)t->bits[best] / numel - cv->p->bpw)) best = r;
    return best;
}

/* The sensitivity pass (calib/calib.h mb_sens): each module quantized alone with its probe row, the KL
 * divergence of the final logits on the first sens_S measurement rows. Checkpointed inside like the other
 * passes: the states and the streams of the modules probed so far (work/sens.f32); the probe rows follow
 * from the tables and the target. z->err holds the errors of the probes run by this process (diagnostics). */
static int stage_sens(struct conv *cv) {
    double t0 = mb_now();
    struct mb_sens *z = &cv->sens;
    int rc, resume = cv->next_module >= 0;
    char sp[4400];
    wpath(cv, sp, sizeof sp, "sens.f32");
    if ((rc = states_open(cv, cv->Rm, resume))) return rc;
    if ((rc = mb_sens_open(z, cv->ops, cv->nmod, cv->sens_S, cv->L, cv->c->hidden))) return rc;
    for (int m = 0; m < cv->nmod; m++) cv->sens_probe[m] = probe_row(cv, m);
    if (resume) {
        if ((rc = mb_sens_load(z, cv->next_module, sp))) goto out;
    } else {
        if ((rc = mb_states_embed(&cv->st, &cv->f, cv->rows_m, cv->chunk_rows))) goto out;
        cv->next_module = 0;
    }
    mb_info("sensitivity: each module quantized alone, KL divergence of the output on %lld x %lld tokens", (long long)cv->sens_S, (long long)cv->L);
    struct mb_progress pr;
    mb_progress_begin(&pr, "sensitivity", "modules", cv->nmod);
    for (int m = cv->next_module; m < cv->nmod && !rc; m++) {
        const struct mb_module_table *t = &cv->tab[m];
        const struct mb_layer_w *w;
        struct mb_layer_w *q = NULL;
        struct mb_hset hs = {0};
        int n = t->nproj * t->experts;
        struct mb_exl2_packed *pk = calloc((size_t)n, sizeof *pk);
        char mname[96];
        module_name(cv, m, mname, sizeof mname);
        if (!pk) rc = mb_fail(MB_ENOMEM, "out of memory");
        if (!rc) rc = mb_fwd_layer(&cv->f, m / 2, &w);
        if (!rc) rc = mb_collect_hessians(&cv->st, &cv->f, w, m, cv->chunk_rows, cv->p->min_expert_tokens, NULL, &hs);
        if (!rc) maybe_kill("sens", m);
        if (!rc) rc = mb_quantize_module(&cv->f, w, m, &hs, t, cv->sens_probe[m], NULL, cv->p->rtn, pk, &q);
        if (!rc) rc = mb_sens_module(z, &cv->st, &cv->f, w, q, m, cv->chunk_rows);
        mb_quantized_free(q, m, t);
        if (pk) for (int i = 0; i < n; i++) mb_exl2_packed_free(&pk[i]);
        free(pk);
        mb_hset_free(&hs);
        if (rc) { rc = mb_fail_ctx(rc, "sensitivity of %s", mname); break; }
        flip(cv);
        cv->next_module = m + 1;
        mb_progress_update(&pr, m + 1);
        if (m + 1 < cv->nmod) rc = maybe_checkpoint(cv, 0);
    }
    if (!rc) rc = mb_sens_finish(z, &cv->st, &cv->f, cv->chunk_rows);
    if (!rc) {
        mb_progress_end(&pr);
        for (int m = 0; m < cv->nmod; m++) cv->sens_kld[m] = z->kld[m];
    }
out:
    mb_sens_close(z);
    mb_states_close(&cv->st);
    if (rc) return rc;
    cv->t_sens = mb_now() - t0;
    cv->stage = ST_QUANT;
    cv->next_module = -1;
    if ((rc = save_state(cv))) return rc;
    unlink(sp); /* after the checkpoint that no longer needs it */
    return 0;
}

static int stage_quantize(struct conv *cv) {
    double t0 = mb_now();
    int rc = run_pass(cv, "quantizing", cv->rows_q, cv->Rq, quant_module, 0);
    if (rc) return rc;
    cv->stage = ST_HEAD;
    if ((rc = save_state(cv))) return rc;
    cv->t_quant = mb_now() - t0;
    return 0;
}

static int stage_head(struct conv *cv) {
    int rc;
    double t0 = mb_now();
    if (!cv->st.buf[0] && (rc = states_open(cv, cv->Rq, 1))) return rc;
    mb_info("quantizing the head (%d bits)", cv->p->head_bits);
    if ((rc = quant_head(cv))) return rc;
    mb_states_close(&cv->st);
    cv->t_head = mb_now() - t0;
    cv->stage = ST_COMPILE;
    return save_state(cv);
}

static int stage_compile(struct conv *cv) {
    int rc = compile_output(cv);
    if (rc) return rc;
    cv->stage = ST_EVAL;
    return save_state(cv);
}

/* the front-matter value of `key` in a model card (first "key: value" line between the leading "---" lines),
 * malloc'd, or NULL */
static char *card_field(const char *card, const char *key) {
    if (!card || strncmp(card, "---", 3)) return NULL;
    const char *end = strstr(card + 3, "\n---");
    size_t kl = strlen(key);
    for (const char *l = strchr(card, '\n'); l && (!end || l < end); l = strchr(l + 1, '\n')) {
        const char *k = l + 1;
        if (strncmp(k, key, kl) || k[kl] != ':') continue;
        const char *v = k + kl + 1;
        while (*v == ' ' || *v == '\t') v++;
        size_t n = strcspn(v, "\r\n");
        while (n && (v[n - 1] == ' ' || v[n - 1] == '\t')) n--;
        if (n >= 2 && (v[0] == '"' || v[0] == '\'') && v[n - 1] == v[0]) { v++; n -= 2; }
        if (!n) return NULL;
        char *r = malloc(n + 1);
        if (r) { memcpy(r, v, n); r[n] = 0; }
        return r;
    }
    return NULL;
}

/* the source repository id: --base-model, else config.json's _name_or_path when it looks like "org/name" */
static json_t *base_model_json(const struct conv *cv) {
    if (cv->p->base_model) return json_string(cv->p->base_model);
    char p[4400];
    mb_path_join(p, sizeof p, cv->m->dir, "config.json");
    json_t *cfg = json_load_file(p, 0, NULL), *r = json_null();
    const char *n = json_string_value(json_object_get(cfg, "_name_or_path"));
    if (n && n[0] != '/' && n[0] != '.' && strchr(n, '/') && !strchr(strchr(n, '/') + 1, '/') && strlen(n) < 200) r = json_string(n);
    json_decref(cfg);
    return r;
}

/* the summary: what was converted and how, choices, bpw, accuracies, expert routing. The model card and the
 * manifest (convert/card.c) are made from it; no path of the converting machine goes in. */
static json_t *report_json(const struct conv *cv) {
    const struct mb_convert_params *p = cv->p;
    json_t *report = json_object();
    int64_t used = 0;
    for (int m = 0; m < cv->nmod; m++) used += cv->tab[m].bits[p->uniform ? 0 : cv->choice[m]];
    json_object_set_new(report, "name", json_string(base_name(cv->m->dir)));
    json_object_set_new(report, "model", json_string(base_name(cv->m->dir)));
    json_object_set_new(report, "output", json_string(base_name(p->out)));
    json_object_set_new(report, "base_model", base_model_json(cv));
    if (p->quantized_by) json_object_set_new(report, "quantized_by", json_string(p->quantized_by));
    char src[4400], *card = NULL;
    size_t cl;
    mb_path_join(src, sizeof src, cv->m->dir, "README.md");
    if (mb_file_exists(src) && mb_read_file(src, &card, &cl, 16u << 20)) card = NULL;
    char *lic = card_field(card, "license");
    json_object_set_new(report, "license", lic ? json_string(lic) : json_null());
    free(lic);
    json_object_set_new(report, "architecture", json_string(cv->c->arch_name));
    json_object_set_new(report, "target_bpw", json_real(p->bpw));
    json_object_set_new(report, "decoder_bpw", json_real((double)used / cv->decoder_numel));
    json_object_set_new(report, "head_bits", json_integer(p->head_bits));
    {
        struct mb_qsetting q;
        int64_t H = cv->c->hidden, V = cv->c->vocab;
        double hb = H % 32 ? 16.0 : !mb_qsetting_parse(mb_head_option(p->head_bits), &q) ? (double)mb_qsetting_bits(&q, H, V, 0) / ((double)H * V) : 0;
        json_object_set_new(report, "head_bpw", json_real(hb));
    }
    char dev[300];
    if (cv->ops->device) {
        char gname[256] = "";
        mb_cuda_probe(gname, sizeof gname);
        snprintf(dev, sizeof dev, "%s: %s", cv->ops->name, gname);
    } else snprintf(dev, sizeof dev, "%s", cv->ops->name);
    json_object_set_new(report, "device", json_string(dev));
    json_object_set_new(report, "mixbit_version", json_string(MB_VERSION));
    {
        char d[32];
        time_t now = time(NULL);
        struct tm tmv;
        gmtime_r(&now, &tmv);
        strftime(d, sizeof d, "%Y-%m-%dT%H:%M:%SZ", &tmv);
        json_object_set_new(report, "date", json_string(d));
    }
    json_t *cal = json_object();
    json_object_set_new(cal, "name", json_string(cal_name(cv)));
    json_object_set_new(cal, "rows", json_integer(cv->Rq));
    json_object_set_new(cal, "length", json_integer(cv->L));
    json_object_set_new(cal, "measurement_rows", json_integer(cv->Rm));
    json_object_set_new(cal, "bos", json_boolean(cv->bos));
    json_object_set_new(report, "calibration", cal);
    json_object_set_new(report, "rows", json_integer(cv->Rq));
    json_object_set_new(report, "measurement_rows", json_integer(cv->Rm));
    json_object_set_new(report, "length", json_integer(cv->L));
    if (p->uniform) json_object_set_new(report, "uniform", json_string(p->uniform));
    json_object_set_new(report, "rtn", json_boolean(p->rtn));
    json_object_set_new(report, "objective", json_string(p->objective ? "delta" : "output"));
    json_object_set_new(report, "sensitivity_tokens", json_integer(cv->sens_S * cv->L));
    json_object_set_new(report, "allocation_error_sum", json_real(cv->alloc_err));
    json_object_set_new(report, "annealing_error_sum", json_real(cv->sa_err));
    json_t *ch = json_array();
    for (int m = 0; m < cv->nmod; m++) {
        char mn[96];
        module_name(cv, m, mn, sizeof mn);
        json_t *o = json_object();
        int row = p->uniform ? 0 : cv->choice[m];
        json_object_set_new(o, "module", json_string(mn));
        json_object_set_new(o, "option", json_integer(row));
        int64_t numel = m % 2 == 0 ? 2 * cv->c->hidden * (cv->c->n_heads + cv->c->n_kv_heads) * cv->c->head_dim
                                   : 3 * cv->c->hidden * cv->c->ffn * (cv->c->n_experts ? cv->c->n_experts : 1);
        json_object_set_new(o, "bpw", json_real((double)cv->tab[m].bits[row] / (double)numel));
        json_object_set_new(o, "accuracy", json_real(ACC(cv, m, row)));
        json_object_set_new(o, "error", json_real(1.0 - ACC(cv, m, row)));
        json_array_append_new(ch, o);
    }
    json_object_set_new(report, "modules", ch);
    if (cv->c->n_experts) {
        json_t *et = json_array();
        for (int l = 0; l < cv->c->n_layers; l++) {
            json_t *row = json_array();
            for (int e = 0; e < cv->c->n_experts; e++) json_array_append_new(row, json_integer(cv->expert_tokens[l * cv->c->n_experts + e]));
            json_array_append_new(et, row);
        }
        json_object_set_new(report, "expert_tokens", et);
        json_object_set_new(report, "min_expert_tokens", json_integer(p->min_expert_tokens));
    }
    json_object_set_new(report, "source_card", card ? json_stringn(card, strlen(card)) : json_null());
    free(card);
    return report;
}

static int stage_evaluate(struct conv *cv, json_t *report, double t_start) {
    int rc;
    double t0 = mb_now();
    if ((cv->p->eval || cv->p->holdout > 0) && (rc = evaluate(cv, report))) return rc;
    cv->t_eval = mb_now() - t0;
    json_object_set_new(report, "seconds", json_real(mb_now() - t_start));
    json_t *ts = json_object();
    json_object_set_new(ts, "measure", json_real(cv->t_measure));
    json_object_set_new(ts, "sensitivity", json_real(cv->t_sens));
    json_object_set_new(ts, "quantize", json_real(cv->t_quant));
    json_object_set_new(ts, "head", json_real(cv->t_head));
    json_object_set_new(ts, "evaluate", json_real(cv->t_eval));
    json_object_set_new(report, "stage_seconds", ts);
    char rp[4400];
    mb_path_join(rp, sizeof rp, cv->part, "mixbit-report.json");
    /* the report holds timings: written last, outside the byte-identical tensors */
    if ((rc = write_json_atomic(rp, report))) return rc;
    cv->stage = ST_DONE;
    return save_state(cv);
}

int mb_convert(const struct mb_convert_params *p, json_t **report_out) {
    struct conv cvs;
    struct conv *cv = &cvs;
    memset(cv, 0, sizeof *cv);
    cv->p = p;
    cv->lock_fd = -1;
    json_t *report = NULL;
    int rc = 0, found = 0;
    double t_start = mb_now();
    if ((rc = mb_ops_select(p->device, &cv->ops))) goto out;
    if ((rc = preflight(cv, &found))) goto out;
    if ((rc = stage_rows(cv, found))) goto out;
    if (cv->stage <= ST_HEAD && (rc = mb_fwd_init(&cv->f, cv->m, cv->ops, cv->chunk_rows, cv->L))) goto out;
    if (cv->stage == ST_MEASURE && (rc = stage_measure(cv))) goto out;
    if (cv->stage == ST_SENS && (rc = stage_sens(cv))) goto out;
    if (!p->uniform && (rc = allocate(cv, 1))) goto out;
    if (cv->stage == ST_QUANT && (rc = stage_quantize(cv))) goto out;
    if (cv->stage == ST_HEAD && (rc = stage_head(cv))) goto out;
    mb_fwd_free(&cv->f);
    if (cv->stage == ST_COMPILE && (rc = stage_compile(cv))) goto out;
    report = report_json(cv);
    if (cv->stage == ST_EVAL && (rc = stage_evaluate(cv, report, t_start))) goto out;
    if (cv->stage == ST_DONE) {
        /* the published repository: the work files go, the model card and chart come from the report, the
         * manifest hashes everything; nothing is written after it */
        struct mb_card_params cp = {p->base_model, p->quantized_by};
        if ((rc = rm_rf(cv->work)) || (rc = mb_card_write(cv->part, &cp)) || (rc = mb_manifest_write(cv->part))) goto out;
        if (rename(cv->part, cv->out) != 0) { rc = mb_fail(MB_EIO, "rename %s -> %s: %s", cv->part, cv->out, strerror(errno)); goto out; }
    }
out:
    mb_fwd_free(&cv->f);
    mb_states_close(&cv->st);
    free(cv->rows_m);
    free(cv->cal_ids);
    free(cv->tab);
    free(cv->acc);
    free(cv->sens_kld);
    free(cv->sens_probe);
    mb_sens_close(&cv->sens);
    free(cv->choice);
    free(cv->expert_tokens);
    mb_tokenizer_free(cv->tok);
    mb_model_close(cv->m);
    if (cv->lock_fd >= 0) {
        unlink(cv->lock_path);
        close(cv->lock_fd);
    }
    if (rc || !report_out) json_decref(report);
    else *report_out = report;
    return rc;
}
