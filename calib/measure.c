/* calib/measure.c: calibration over the hidden states of all calibration rows, one decoder module at a time:
 * the states store, Hessian collection, measurement of the option table (candidates kept packed and scored
 * through the EXL2 product of the ops table) and quantization of a module with its chosen option. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "calib.h"

/* ---------------------------------------------------------------------------------------------- */
/* hidden states                                                                                   */

int mb_states_open(struct mb_states *s, const struct mb_ops *ops, int64_t R, int64_t L, int64_t H, int where, const char *spill_dir) {
    memset(s, 0, sizeof *s);
    s->R = R;
    s->L = L;
    s->H = H;
    s->ops = ops;
    size_t bytes;
    int rc;
    if (R <= 0 || L <= 0) return mb_fail(MB_ERANGE, "hidden states of %lld x %lld tokens", (long long)R, (long long)L);
    if ((rc = mb_size_mul(&bytes, MB_SIZE_LIMIT, "hidden states", R, L, H, sizeof(float)))) return rc;
    s->mapped = where == 1;
    s->on_backend = where == 2 || !ops->device;
    for (int k = 0; k < 2; k++) {
        if (where == 2) {
            if (!(s->buf[k] = ops->alloc(bytes))) { mb_states_close(s); return mb_fail(MB_ENOMEM, "out of %s memory for hidden states (%zu bytes)", ops->name, bytes); }
            continue;
        }
        if (!s->mapped) {
            if (!(s->buf[k] = malloc(bytes))) { mb_states_close(s); return mb_fail(MB_ENOMEM, "out of memory for hidden states (%zu bytes; use --max-memory to spill them to disk)", bytes); }
            continue;
        }
        snprintf(s->path[k], sizeof s->path[k], "%.4150s/states_%c.f32", spill_dir, 'a' + k);
        int fd = open(s->path[k], O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0) { int e = errno; mb_states_close(s); return mb_fail(MB_EIO, "%s: %s", s->path[k], strerror(e)); }
        if (ftruncate(fd, (off_t)bytes) != 0) { int e = errno; close(fd); mb_states_close(s); return mb_fail(MB_EIO, "%s: cannot size to %zu bytes: %s", s->path[k], bytes, strerror(e)); }
        /* reserve the blocks now so a full disk fails here, not with SIGBUS later */
        int e = posix_fallocate(fd, 0, (off_t)bytes);
        if (e) { close(fd); mb_states_close(s); return mb_fail(MB_EIO, "%s: cannot reserve %zu bytes: %s", s->path[k], bytes, strerror(e)); }
        void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        if (p == MAP_FAILED) { mb_states_close(s); return mb_fail(MB_EIO, "%s: mmap failed", s->path[k]); }
        s->buf[k] = p;
    }
    return 0;
}

void mb_states_close(struct mb_states *s) {
    size_t bytes = (size_t)(s->R * s->L * s->H) * sizeof(float);
    for (int k = 0; k < 2; k++) {
        if (!s->buf[k]) continue;
        if (s->mapped) munmap(s->buf[k], bytes);
        else if (s->on_backend && s->ops->device) s->ops->free(s->buf[k]);
        else free(s->buf[k]);
        s->buf[k] = NULL;
    }
}

/* host memory for device states moved in chunks of at most 64 MB */
#define STATE_CHUNK ((size_t)64 << 20)

/* bytes of a buffer to / from an open file: host memory (o NULL) in one call, backend memory of o through a
 * host buffer in chunks of STATE_CHUNK */
static int file_put(FILE *f, const char *path, const struct mb_ops *o, const void *src, size_t bytes) {
    if (!o) return bytes && fwrite(src, 1, bytes, f) != bytes ? mb_fail(MB_EIO, "%s: write failed: %s", path, strerror(errno)) : 0;
    char *tmp = malloc(bytes < STATE_CHUNK ? bytes : STATE_CHUNK);
    int rc = tmp || !bytes ? 0 : mb_fail(MB_ENOMEM, "out of memory");
    for (size_t off = 0; off < bytes && !rc; off += STATE_CHUNK) {
        size_t n = bytes - off < STATE_CHUNK ? bytes - off : STATE_CHUNK;
        if (!(rc = o->download(tmp, (const char *)src + off, n)) && fwrite(tmp, 1, n, f) != n)
            rc = mb_fail(MB_EIO, "%s: write failed: %s", path, strerror(errno));
    }
    free(tmp);
    return rc;
}

static int file_get(FILE *f, const char *path, const struct mb_ops *o, void *dst, size_t bytes) {
    if (!o) return fread(dst, 1, bytes, f) != bytes ? mb_fail(MB_EFORMAT, "%s: truncated checkpoint", path) : 0;
    char *tmp = malloc(bytes < STATE_CHUNK ? bytes : STATE_CHUNK);
    int rc = tmp || !bytes ? 0 : mb_fail(MB_ENOMEM, "out of memory");
    for (size_t off = 0; off < bytes && !rc; off += STATE_CHUNK) {
        size_t n = bytes - off < STATE_CHUNK ? bytes - off : STATE_CHUNK;
        if (fread(tmp, 1, n, f) != n) rc = mb_fail(MB_EFORMAT, "%s: truncated checkpoint", path);
        else rc = o->upload((char *)dst + off, tmp, n);
    }
    free(tmp);
    return rc;
}

int mb_states_save(struct mb_states *s, const char *path) {
    size_t bytes = (size_t)(s->R * s->L * s->H) * sizeof(float);
    if (s->mapped) return msync(s->buf[s->cur], bytes, MS_SYNC) ? mb_fail(MB_EIO, "%s: msync: %s", s->path[s->cur], strerror(errno)) : 0;
    struct mb_atomic_file af;
    int rc = mb_atomic_open(&af, path);
    if (rc) return rc;
    if ((rc = file_put(af.f, path, s->ops->device && s->on_backend ? s->ops : NULL, s->buf[s->cur], bytes))) { mb_atomic_abort(&af); return rc; }
    return mb_atomic_commit(&af);
}

int mb_states_load(struct mb_states *s, const char *path) {
    size_t bytes = (size_t)(s->R * s->L * s->H) * sizeof(float);
    if (s->mapped) return 0; /* the files are the states */
    FILE *f;
    size_t fsz;
    int rc = mb_fopen_regular(path, &f, &fsz);
    if (rc) return mb_fail_ctx(rc, "checkpoint of the hidden states");
    if (fsz != bytes) { fclose(f); return mb_fail(MB_EFORMAT, "%s: truncated checkpoint (%zu of %zu bytes)", path, fsz, bytes); }
    rc = file_get(f, path, s->ops->device && s->on_backend ? s->ops : NULL, s->buf[s->cur], bytes);
    fclose(f);
    return rc;
}

int mb_states_embed(struct mb_states *s, struct mb_fwd *f, const int32_t *rows, int64_t chunk_rows) {
    int64_t L = s->L, H = s->H, S = chunk_rows / L > 0 ? chunk_rows / L : 1;
    const struct mb_ops *o = f->ops;
    int rc = 0;
    if (s->on_backend) return mb_fwd_embed(f, rows, s->R * L, s->buf[s->cur]);
    for (int64_t s0 = 0; s0 < s->R && !rc; s0 += S) {
        int64_t ns = s->R - s0 < S ? s->R - s0 : S;
        if (!(rc = mb_fwd_embed(f, rows + s0 * L, ns * L, f->tmp)))
            rc = o->download(s->buf[s->cur] + s0 * L * H, f->tmp, (size_t)(ns * L * H) * sizeof(float));
    }
    return rc;
}

/* a copy of sequences [s0, s0 + ns) of buffer k in the backend buffer dst */
static int states_rows(struct mb_states *s, int k, int64_t s0, int64_t ns, float *dst) {
    const float *x = s->buf[k] + s0 * s->L * s->H;
    size_t bytes = (size_t)(ns * s->L * s->H) * sizeof(float);
    if (s->on_backend) { s->ops->copy(dst, x, bytes); return 0; }
    return s->ops->upload(dst, x, bytes);
}

/* the chunk of sequences [s0, s0 + ns) of buffer k as a backend pointer: the states themselves when they
 * live on the backend, else a copy in `stage` */
static float *chunk_in(struct mb_states *s, int k, int64_t s0, int64_t ns, float *stage, int *rc) {
    float *p = s->buf[k] + s0 * s->L * s->H;
    if (s->on_backend) return p;
    *rc = s->ops->upload(stage, p, (size_t)(ns * s->L * s->H) * sizeof(float));
    return stage;
}

int mb_states_forward(struct mb_states *s, struct mb_fwd *f, const struct mb_layer_w *w, int m, int64_t chunk_rows, const struct mb_capture *cap) {
    int64_t L = s->L, H = s->H, S = chunk_rows / L > 0 ? chunk_rows / L : 1;
    const struct mb_ops *o = f->ops;
    float *src = s->buf[s->cur], *dst = s->buf[s->cur ^ 1];
    int rc = 0;
    if (s->on_backend) {
        o->copy(dst, src, (size_t)(s->R * L * H) * sizeof(float));
        for (int64_t s0 = 0; s0 < s->R && !rc; s0 += S) {
            int64_t ns = s->R - s0 < S ? s->R - s0 : S;
            rc = mb_fwd_module(f, w, m, dst + s0 * L * H, ns, L, cap);
        }
        return rc;
    }
    /* host states, device backend: each chunk goes up, through the module and back */
    float *stage = o->alloc((size_t)(S * L * H) * sizeof(float));
    if (!stage) return mb_fail(MB_ENOMEM, "out of %s memory for a chunk of hidden states", o->name);
    for (int64_t s0 = 0; s0 < s->R && !rc; s0 += S) {
        int64_t ns = s->R - s0 < S ? s->R - s0 : S;
        float *x = chunk_in(s, s->cur, s0, ns, stage, &rc);
        if (!rc) rc = mb_fwd_module(f, w, m, x, ns, L, cap);
        if (!rc) rc = o->download(dst + s0 * L * H, x, (size_t)(ns * L * H) * sizeof(float));
    }
    o->free(stage);
    return rc;
}

/* ---------------------------------------------------------------------------------------------- */
/* Hessians                                                                                        */

void mb_hset_free(struct mb_hset *h) {
    mb_hessian_free(&h->a);
    mb_hessian_free(&h->b);
    if (h->down) for (int e = 0; e < h->n_experts; e++) mb_hessian_free(&h->down[e]);
    free(h->down);
    memset(h, 0, sizeof *h);
}

const struct mb_hessian *mb_hset_for(const struct mb_hset *h, int m, int p, int expert) {
    if (m % 2 == 0) return p == MB_P_O ? &h->b : &h->a;
    if (p == MB_P_DOWN) return expert >= 0 ? &h->down[expert] : &h->b;
    return &h->a;
}

static int hcap(void *user, int layer, enum mb_cap which, int expert, const float *x, int64_t M, int64_t K) {
    struct mb_hset *h = user;
    struct mb_hessian *t = which == MB_CAP_QKV || which == MB_CAP_GATEUP ? &h->a : expert >= 0 ? &h->down[expert] : &h->b;
    int rc;
    if (!t->H && (rc = mb_hessian_init(t, h->ops, K))) return rc;
    (void)layer;
    return mb_hessian_add(t, x, M);
}

int mb_collect_hessians(struct mb_states *s, struct mb_fwd *f, const struct mb_layer_w *w, int m, int64_t chunk_rows, int64_t min_expert_rows,
                        int64_t *expert_tokens, struct mb_hset *hs) {
    const struct mb_config *c = f->c;
    memset(hs, 0, sizeof *hs);
    hs->ops = f->ops;
    hs->n_experts = c->n_experts;
    if (hs->n_experts && !(hs->down = calloc(hs->n_experts, sizeof *hs->down))) return mb_fail(MB_ENOMEM, "out of memory");
    struct mb_capture cap = {hcap, hs, 0, NULL};
    int moe = m % 2 == 1 && c->n_experts;
    if (moe) {
        cap.min_expert_rows = min_expert_rows;
        cap.expert_tokens = expert_tokens;
    }
    int rc = mb_states_forward(s, f, w, m, chunk_rows, &cap);
    if (!rc && moe)
        for (int e = 0; e < c->n_experts && !rc; e++)
            if (!hs->down[e].H) rc = mb_fail(MB_ENUMERIC, "layer %d expert %d received no calibration tokens", m / 2, e);
    if (rc) mb_hset_free(hs);
    return rc;
}

/* ---------------------------------------------------------------------------------------------- */
/* quantizing projections                                                                          */

/* The GPTQ preparation (act order, factorization) of the Hessian used last: projections that share a Hessian
 * (q/k/v, gate/up, every expert's w1/w3) and every candidate setting reuse it */
struct prep_cache {
    const struct mb_hessian *h;
    int rtn;
    struct mb_gptq_prep prep;
};

static void prep_cache_free(struct prep_cache *pc) {
    mb_gptq_prep_free(&pc->prep);
    memset(pc, 0, sizeof *pc);
}

/* GPTQ (or round to nearest) of one projection of the loaded layer w with `setting`, packed with the self-check */
static int quantize_projection(const struct mb_fwd *f, const struct mb_layer_w *w, const struct mb_hset *hs, int m, int proj, int expert,
                               const char *setting, int rtn, struct prep_cache *pc, struct mb_exl2_packed *pk) {
    const struct mb_config *c = f->c;
    struct mb_qsetting q;
    int rc = mb_qsetting_parse(setting, &q);
    if (rc) return rc;
    char ln[160];
    mb_linear_name(c, m / 2, proj, expert, ln, sizeof ln);
    struct mb_gptq_params gp;
    mb_gptq_default_params(&gp);
    gp.name = ln;
    gp.rtn = rtn;
    const struct mb_hessian *h = mb_hset_for(hs, m, proj, expert);
    if (pc->h != h || pc->rtn != rtn) {
        prep_cache_free(pc);
        if ((rc = mb_gptq_prepare(h, &gp, &pc->prep))) return rc;
        pc->h = h;
        pc->rtn = rtn;
    }
    struct mb_qresult qr;
    if ((rc = mb_gptq_run(mb_layer_slot((struct mb_layer_w *)w, proj, expert), &pc->prep, &q, &gp, &qr))) return rc;
    rc = mb_qresult_pack(&qr, ln, pk);
    mb_qresult_free(&qr);
    return rc;
}

/* a copy of layer w whose module-m projections can be replaced (MoE: its own expert arrays) */
static int layer_shadow(const struct mb_layer_w *w, int m, struct mb_layer_w **out) {
    struct mb_layer_w *q = malloc(sizeof *q);
    if (!q) return mb_fail(MB_ENOMEM, "out of memory");
    *q = *w;
    for (int k = 0; k < 3; k++) q->xw[k] = NULL;
    if (m % 2 == 1 && w->n_experts)
        for (int k = 0; k < 3; k++) {
            if (!(q->xw[k] = malloc((size_t)w->n_experts * sizeof *q->xw[k]))) {
                for (int j = 0; j < k; j++) free(q->xw[j]);
                free(q);
                return mb_fail(MB_ENOMEM, "out of memory");
            }
            memcpy(q->xw[k], w->xw[k], (size_t)w->n_experts * sizeof *q->xw[k]);
        }
    *out = q;
    return 0;
}

static void shadow_free(struct mb_layer_w *q) {
    if (!q) return;
    for (int k = 0; k < 3; k++) free(q->xw[k]);
    free(q);
}

static struct mb_weight exl2_view(const struct mb_exl2_packed *pk, int64_t K, const char *name) {
    struct mb_weight v;
    memset(&v, 0, sizeof v);
    v.type = MB_W_EXL2;
    mb_exl2_packed_view(pk, &v.q);
    v.q.K = K;
    v.n = pk->N;
    v.k = K;
    v.name = name;
    return v;
}

/* ---------------------------------------------------------------------------------------------- */
/* measurement                                                                                     */

/* sequences [s0, s0 + ns): a copy of the module input in the backend buffer tmp (the forward pass overwrites
 * it), and *y_ref their reference outputs as a backend pointer (chunk_in, staged in ref when needed) */
static int measure_chunk(struct mb_states *s, int64_t s0, int64_t ns, float *tmp, float *ref, const float **y_ref) {
    int rc = states_rows(s, s->cur, s0, ns, tmp);
    if (!rc) *y_ref = chunk_in(s, s->cur ^ 1, s0, ns, ref, &rc);
    return rc;
}

int mb_measure_module(struct mb_states *s, struct mb_fwd *f, const struct mb_layer_w *w, int m, const struct mb_hset *hs,
                      const struct mb_module_table *t, int64_t chunk_rows, int objective, double *acc) {
    const struct mb_config *c = f->c;
    const struct mb_ops *o = f->ops;
    int64_t R = s->R, L = s->L, H = s->H, S = chunk_rows / L > 0 ? chunk_rows / L : 1;
    int np = t->nproj, no = t->n, ne = t->experts, moe = ne > 1 || (m % 2 == 1 && c->n_experts);
    int rc = 0;
    struct prep_cache pc = {0};
    /* distinct settings per projection: dist[pi][k], map[r][pi] = k */
    int map[MB_MODULE_OPTIONS_MAX][4], nd[4] = {0};
    const char *dist[4][MB_MODULE_OPTIONS_MAX];
    for (int pi = 0; pi < np; pi++)
        for (int r = 0; r < no; r++) {
            int k;
            for (k = 0; k < nd[pi]; k++) if (!strcmp(dist[pi][k], t->setting[r][pi])) break;
            if (k == nd[pi]) dist[pi][nd[pi]++] = t->setting[r][pi];
            map[r][pi] = k;
        }
    /* candidates, packed: var[(pi * MAX + k) * ne + e] */
    size_t nvar = (size_t)4 * MB_MODULE_OPTIONS_MAX * ne;
    struct mb_exl2_packed *var = calloc(nvar, sizeof *var);
    struct mb_weight *vw = calloc(nvar, sizeof *vw);
    struct mb_layer_w *cand = NULL;
    float *tmp = NULL, *ref = NULL;
    double *dd = NULL, *rr = NULL, *hd = NULL, *hr = NULL, *den = NULL;
    if (!var || !vw) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto out; }
    for (int pi = 0; pi < np && !rc; pi++)
        for (int e = 0; e < ne && !rc && !t->f16[pi]; e++) /* F16 projections keep their weights in every option */
            for (int k = 0; k < nd[pi] && !rc; k++) {
                size_t i = ((size_t)pi * MB_MODULE_OPTIONS_MAX + k) * ne + e;
                int64_t N, K;
                mb_proj_shape(c, t->proj[pi], &N, &K);
                if ((rc = quantize_projection(f, w, hs, m, t->proj[pi], moe ? e : -1, dist[pi][k], 0, &pc, &var[i]))) break;
                struct mb_weight v = exl2_view(&var[i], K, "measurement candidate");
                rc = o->weight_load(&vw[i], &v, 0);
            }
    prep_cache_free(&pc);
    if (rc) goto out;
    /* score every option row: relative error of the module output, mean over calibration sequences */
    if ((rc = layer_shadow(w, m, &cand))) goto out;
    size_t chunk_bytes = (size_t)(S * L * H) * sizeof(float);
    tmp = o->alloc(chunk_bytes);
    ref = s->on_backend ? NULL : o->alloc(chunk_bytes);
    dd = o->alloc((size_t)S * sizeof *dd);
    rr = o->alloc((size_t)S * sizeof *rr);
    hd = malloc((size_t)S * sizeof *hd);
    hr = malloc((size_t)S * sizeof *hr);
    if (!tmp || (!s->on_backend && !ref) || !dd || !rr || !hd || !hr) { rc = mb_fail(MB_ENOMEM, "out of %s memory for measurement buffers", o->name); goto out; }
    /* the denominators per sequence: ||Y_ref||^2, or ||Y_ref - X||^2 for the delta objective */
    if (!(den = malloc((size_t)R * sizeof *den))) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto out; }
    for (int64_t s0 = 0; s0 < R && !rc; s0 += S) {
        int64_t ns = R - s0 < S ? R - s0 : S;
        const float *y_ref;
        if ((rc = measure_chunk(s, s0, ns, tmp, ref, &y_ref))) break;
        o->seq_error(tmp, y_ref, ns, L * H, dd, rr);
        if ((rc = o->download(hd, dd, (size_t)ns * sizeof *hd)) || (rc = o->download(hr, rr, (size_t)ns * sizeof *hr))) break;
        for (int64_t j = 0; j < ns; j++) den[s0 + j] = objective == 1 ? hd[j] : hr[j];
    }
    if (rc) goto out;
    for (int r = 0; r < no && !rc; r++) {
        for (int pi = 0; pi < np; pi++)
            for (int e = 0; e < ne && !t->f16[pi]; e++) *mb_layer_slot(cand, t->proj[pi], moe ? e : -1) = vw[((size_t)pi * MB_MODULE_OPTIONS_MAX + map[r][pi]) * ne + e];
        double sum = 0;
        for (int64_t s0 = 0; s0 < R && !rc; s0 += S) {
            int64_t ns = R - s0 < S ? R - s0 : S;
            const float *y_ref;
            if ((rc = measure_chunk(s, s0, ns, tmp, ref, &y_ref))) break;
            if ((rc = mb_fwd_module(f, cand, m, tmp, ns, L, NULL))) break;
            o->seq_error(tmp, y_ref, ns, L * H, dd, rr);
            if ((rc = o->download(hd, dd, (size_t)ns * sizeof *hd)) || (rc = o->download(hr, rr, (size_t)ns * sizeof *hr))) break;
            for (int64_t j = 0; j < ns; j++) sum += den[s0 + j] > 0 ? sqrt(hd[j] / den[s0 + j]) : 0;
        }
        double a = 1.0 - sum / (double)R;
        acc[r] = a < 1e-6 ? 1e-6 : a;
    }
    if (!rc) {
        double best = 0;
        for (int r = 0; r < no; r++) if (acc[r] > best) best = acc[r];
        if (best < 0.1) {
            char mn[96];
            mb_module_name(c, m, mn, sizeof mn);
            rc = mb_fail(MB_ENUMERIC, "%s: every option has accuracy below 0.1 (best %.4f): measurement or inference error", mn, best);
        }
    }
out:
    prep_cache_free(&pc);
    if (vw) for (size_t i = 0; i < nvar; i++) if (vw[i].type == MB_W_EXL2) o->weight_release(&vw[i]);
    if (var) for (size_t i = 0; i < nvar; i++) mb_exl2_packed_free(&var[i]);
    free(var);
    free(vw);
    shadow_free(cand);
    o->free(tmp);
    o->free(ref);
    o->free(dd);
    o->free(rr);
    free(hd);
    free(hr);
    free(den);
    return rc;
}

/* ---------------------------------------------------------------------------------------------- */
/* quantization of a module                                                                        */

int mb_quantize_module(const struct mb_fwd *f, const struct mb_layer_w *w, int m, const struct mb_hset *hs, const struct mb_module_table *t,
                       int row, const char *uniform, int rtn, struct mb_exl2_packed *packed, struct mb_layer_w **qout) {
    const struct mb_config *c = f->c;
    const struct mb_ops *o = f->ops;
    int ne = t->experts, moe = m % 2 == 1 && c->n_experts, rc = 0;
    struct mb_layer_w *q = NULL;
    struct prep_cache pc = {0};
    *qout = NULL;
    memset(packed, 0, sizeof *packed * (size_t)(t->nproj * ne));
    if ((rc = layer_shadow(w, m, &q))) return rc;
    /* the shadow's projection slots are replaced below; mark them empty first so a failure releases only ours */
    for (int pi = 0; pi < t->nproj; pi++)
        for (int e = 0; e < ne && !t->f16[pi]; e++) memset(mb_layer_slot(q, t->proj[pi], moe ? e : -1), 0, sizeof(struct mb_weight));
    for (int pi = 0; pi < t->nproj && !rc; pi++)
        for (int e = 0; e < ne && !rc && !t->f16[pi]; e++) { /* F16 projections keep the layer's own weights */
            int64_t N, K;
            mb_proj_shape(c, t->proj[pi], &N, &K);
            struct mb_exl2_packed *pk = &packed[pi * ne + e];
            if ((rc = quantize_projection(f, w, hs, m, t->proj[pi], moe ? e : -1, uniform ? uniform : t->setting[row][pi], rtn, &pc, pk))) break;
            struct mb_weight v = exl2_view(pk, K, "quantized layer");
            rc = o->weight_load(mb_layer_slot(q, t->proj[pi], moe ? e : -1), &v, 0);
        }
    prep_cache_free(&pc);
    if (rc) {
        mb_quantized_free(q, m, t);
        for (int i = 0; i < t->nproj * ne; i++) mb_exl2_packed_free(&packed[i]);
        return rc;
    }
    *qout = q;
    return 0;
}

void mb_quantized_free(struct mb_layer_w *q, int m, const struct mb_module_table *t) {
    if (!q) return;
    int moe = m % 2 == 1 && q->n_experts;
    for (int pi = 0; pi < t->nproj; pi++)
        for (int e = 0; e < (moe ? q->n_experts : 1) && !t->f16[pi]; e++) {
            struct mb_weight *sl = mb_layer_slot(q, t->proj[pi], moe ? e : -1);
            if (sl->type == MB_W_EXL2) q->ops->weight_release(sl);
        }
    shadow_free(q);
}

/* ---------------------------------------------------------------------------------------------- */
/* sensitivity of the output to each module                                                        */

/* reference columns per position scored exactly; the rest of the reference's mass is one term */
#define SENS_TOPK 128

int mb_sens_open(struct mb_sens *z, const struct mb_ops *ops, int nmod, int64_t S, int64_t L, int64_t H) {
    memset(z, 0, sizeof *z);
    z->nmod = nmod;
    z->S = S;
    z->L = L;
    z->H = H;
    z->ops = ops;
    z->stream = calloc((size_t)nmod, sizeof *z->stream);
    z->err = calloc((size_t)nmod, sizeof *z->err);
    z->kld = calloc((size_t)nmod, sizeof *z->kld);
    if (!z->stream || !z->err || !z->kld) { mb_sens_close(z); return mb_fail(MB_ENOMEM, "out of memory"); }
    return 0;
}

void mb_sens_close(struct mb_sens *z) {
    if (z->stream)
        for (int m = 0; m < z->nmod; m++) z->ops->free(z->stream[m]);
    free(z->stream);
    free(z->err);
    free(z->kld);
    memset(z, 0, sizeof *z);
}

/* module m (weights w) over the S sequences of a stream, in chunks the runner's buffers hold */
static int stream_module(struct mb_fwd *f, const struct mb_layer_w *w, int m, float *x, int64_t S, int64_t L, int64_t H, int64_t chunk_rows) {
    int64_t C = chunk_rows / L > 0 ? chunk_rows / L : 1;
    int rc = 0;
    for (int64_t s0 = 0; s0 < S && !rc; s0 += C) rc = mb_fwd_module(f, w, m, x + s0 * L * H, S - s0 < C ? S - s0 : C, L, NULL);
    return rc;
}

int mb_sens_module(struct mb_sens *z, struct mb_states *s, struct mb_fwd *f, const struct mb_layer_w *w, const struct mb_layer_w *q, int m,
                   int64_t chunk_rows) {
    const struct mb_ops *o = z->ops;
    int64_t S = z->S, L = z->L, H = z->H;
    size_t bytes = (size_t)(S * L * H) * sizeof(float);
    int rc = 0;
    for (int k = 0; k < m && !rc; k++)
        if (z->stream[k]) rc = stream_module(f, w, m, z->stream[k], S, L, H, chunk_rows);
    if (rc) return rc;
    if (!(z->stream[m] = o->alloc(bytes))) return mb_fail(MB_ENOMEM, "out of %s memory for a sensitivity stream (%zu bytes)", o->name, bytes);
    if ((rc = states_rows(s, s->cur, 0, S, z->stream[m])) || (rc = stream_module(f, q, m, z->stream[m], S, L, H, chunk_rows))) return rc;
    /* the probe's error against the reference output, as the measurement scores it */
    float *ref = o->alloc(bytes);
    double *dd = o->alloc((size_t)S * sizeof *dd), *rr = o->alloc((size_t)S * sizeof *rr);
    double *hd = malloc((size_t)S * sizeof *hd), *hr = malloc((size_t)S * sizeof *hr);
    if (!ref || !dd || !rr || !hd || !hr) rc = mb_fail(MB_ENOMEM, "out of %s memory for the sensitivity error", o->name);
    if (!rc) rc = states_rows(s, s->cur ^ 1, 0, S, ref);
    if (!rc) {
        o->seq_error(z->stream[m], ref, S, L * H, dd, rr);
        if (!(rc = o->download(hd, dd, (size_t)S * sizeof *hd)) && !(rc = o->download(hr, rr, (size_t)S * sizeof *hr))) {
            double e = 0;
            for (int64_t j = 0; j < S; j++) e += hr[j] > 0 ? sqrt(hd[j] / hr[j]) : 0;
            z->err[m] = e / (double)S;
        }
    }
    o->free(ref);
    o->free(dd);
    o->free(rr);
    free(hd);
    free(hr);
    return rc;
}

int mb_sens_finish(struct mb_sens *z, struct mb_states *s, struct mb_fwd *f, int64_t chunk_rows) {
    const struct mb_ops *o = z->ops;
    int64_t S = z->S, L = z->L, H = z->H, V = f->c->vocab, M = S * L, K = SENS_TOPK < V ? SENS_TOPK : V;
    int64_t CR = ((int64_t)256 << 20) / (V * (int64_t)sizeof(float));
    if (CR > f->max_rows) CR = f->max_rows;
    if (CR > chunk_rows) CR = chunk_rows;
    if (CR < 1) CR = 1;
    int rc = 0;
    /* ref [M, H] final states; lg [CR, V] logits of CR positions; ids_b / vals_b [CR, K] the reference's top K */
    float *ref = o->alloc((size_t)(M * H) * sizeof(float)), *lg = o->alloc((size_t)(CR * V) * sizeof(float));
    float *vals_b = o->alloc((size_t)(CR * K) * sizeof(float));
    int32_t *ids_b = o->alloc((size_t)(CR * K) * sizeof(int32_t));
    double *lse_b = o->alloc((size_t)CR * sizeof(double));
    float *rv = malloc((size_t)(CR * K) * sizeof *rv), *qv = malloc((size_t)(CR * K) * sizeof *qv);
    double *rl = malloc((size_t)CR * sizeof *rl), *ql = malloc((size_t)CR * sizeof *ql);
    if (!ref || !lg || !vals_b || !ids_b || !lse_b || !rv || !qv || !rl || !ql) { rc = mb_fail(MB_ENOMEM, "out of %s memory for the sensitivity logits", o->name); goto out; }
    if ((rc = states_rows(s, s->cur, 0, S, ref))) goto out;
    for (int m = 0; m < z->nmod; m++) z->kld[m] = 0;
    for (int64_t r0 = 0; r0 < M && !rc; r0 += CR) {
        int64_t n = M - r0 < CR ? M - r0 : CR;
        /* the reference: log-sum-exp and its top K log-probabilities */
        if ((rc = mb_fwd_logits(f, ref + r0 * H, n, lg))) break;
        o->logit_stats(lg, n, V, NULL, lse_b, NULL, NULL);
        o->topk(lg, n, V, (int)K, ids_b, vals_b);
        if ((rc = o->download(rv, vals_b, (size_t)(n * K) * sizeof *rv)) || (rc = o->download(rl, lse_b, (size_t)n * sizeof *rl))) break;
        for (int m = 0; m < z->nmod && !rc; m++) {
            if (!z->stream[m]) continue;
            if ((rc = mb_fwd_logits(f, z->stream[m] + r0 * H, n, lg))) break;
            o->logit_stats(lg, n, V, NULL, lse_b, NULL, NULL);
            o->gather_cols(lg, n, V, ids_b, (int)K, vals_b);
            if ((rc = o->download(qv, vals_b, (size_t)(n * K) * sizeof *qv)) || (rc = o->download(ql, lse_b, (size_t)n * sizeof *ql))) break;
            double sum = 0;
            for (int64_t i = 0; i < n; i++) {
                double kl = 0, pm = 0, qm = 0;
                for (int64_t k = 0; k < K; k++) {
                    double lp = rv[i * K + k] - rl[i], lq = qv[i * K + k] - ql[i], p = exp(lp);
                    kl += p * (lp - lq);
                    pm += p;
                    qm += exp(lq);
                }
                double pr = 1 - pm, qr = 1 - qm;
                if (pr > 1e-12 && qr > 1e-30) kl += pr * log(pr / qr);
                if (!isfinite(kl)) {
                    char mn[96];
                    mb_module_name(f->c, m, mn, sizeof mn);
                    rc = mb_fail(MB_ENUMERIC, "%s: the output KL divergence of its probe is not finite", mn);
                    break;
                }
                sum += kl > 0 ? kl : 0;
            }
            z->kld[m] += sum;
        }
    }
    for (int m = 0; m < z->nmod; m++) z->kld[m] /= (double)M;
out:
    o->free(ref);
    o->free(lg);
    o->free(vals_b);
    o->free(ids_b);
    o->free(lse_b);
    free(rv);
    free(qv);
    free(rl);
    free(ql);
    return rc;
}

int mb_sens_save(const struct mb_sens *z, int upto, const char *path) {
    size_t bytes = (size_t)(z->S * z->L * z->H) * sizeof(float);
    struct mb_atomic_file af;
    int rc = mb_atomic_open(&af, path);
    if (rc) return rc;
    for (int m = 0; m < upto && !rc; m++)
        rc = z->stream[m] ? file_put(af.f, path, z->ops, z->stream[m], bytes) : mb_fail(MB_EINVAL, "sensitivity stream %d missing", m);
    if (rc) { mb_atomic_abort(&af); return rc; }
    return mb_atomic_commit(&af);
}

int mb_sens_load(struct mb_sens *z, int upto, const char *path) {
    size_t bytes = (size_t)(z->S * z->L * z->H) * sizeof(float);
    FILE *f;
    size_t fsz;
    int rc = mb_fopen_regular(path, &f, &fsz);
    if (rc) return mb_fail_ctx(rc, "checkpoint of the sensitivity streams");
    if (fsz != bytes * (size_t)upto) { fclose(f); return mb_fail(MB_EFORMAT, "%s: truncated checkpoint (%zu of %zu bytes)", path, fsz, bytes * (size_t)upto); }
    for (int m = 0; m < upto && !rc; m++) {
        if (!z->stream[m] && !(z->stream[m] = z->ops->alloc(bytes))) { rc = mb_fail(MB_ENOMEM, "out of %s memory for a sensitivity stream (%zu bytes)", z->ops->name, bytes); break; }
        rc = file_get(f, path, z->ops, z->stream[m], bytes);
    }
    fclose(f);
    return rc;
}
