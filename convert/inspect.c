/* convert/inspect.c: `mixbit inspect`: architecture summary, parameter count, bytes by dtype, tensor
 * table; for EXL2 models the bits and bpw of every quantized layer. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../formats/formats.h"
#include "../quant/quant.h"
#include "convert.h"

static void shape_str(const struct mb_tensor_info *t, char *buf, size_t n) {
    size_t k = 0;
    buf[0] = 0;
    k += snprintf(buf + k, n - k, "[");
    for (int d = 0; d < t->ndim && k < n; d++) k += snprintf(buf + k, n - k, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
    if (k < n) snprintf(buf + k, n - k, "]");
}

static const char *arch_desc(const struct mb_config *c) {
    return c->arch == MB_ARCH_MIXTRAL ? "mixture of experts" : "dense";
}

int mb_inspect(const struct mb_inspect_params *p) {
    struct mb_model *m = NULL;
    struct mb_st_set *st = NULL;
    int rc;
    char cfgp[4096];
    int have_cfg = 0;
    if (mb_is_dir(p->path)) {
        if ((rc = mb_path_join(cfgp, sizeof cfgp, p->path, "config.json"))) return rc;
        have_cfg = access(cfgp, F_OK) == 0; /* any entry: a FIFO or directory named config.json is refused, not ignored */
    }
    if (have_cfg) {
        if ((rc = mb_model_open(p->path, &m))) return rc;
        st = m->st;
    } else {
        if ((rc = mb_st_set_open(p->path, &st))) return rc;
    }

    size_t by_dtype[MB_DTYPE_COUNT] = {0};
    int64_t params = 0;
    size_t total = 0;
    for (int i = 0; i < st->n; i++) {
        by_dtype[st->sorted[i]->dtype] += st->sorted[i]->nbytes;
        params += st->sorted[i]->numel;
        total += st->sorted[i]->nbytes;
    }
    /* EXL2 layers */
    struct mb_exl2_summary *qs = NULL;
    int nq = 0;
    if (m && m->cfg.is_exl2) {
        rc = mb_exl2_summarize(m, &qs, &nq);
        if (rc) { mb_model_close(m); return rc; }
    }

    if (p->json) {
        json_t *root = json_object();
        json_object_set_new(root, "path", json_string(p->path));
        json_object_set_new(root, "files", json_integer(st->n_files));
        if (m) {
            const struct mb_config *c = &m->cfg;
            json_t *a = json_object();
            json_object_set_new(a, "architecture", json_string(c->arch_name));
            json_object_set_new(a, "hidden_size", json_integer(c->hidden));
            json_object_set_new(a, "layers", json_integer(c->n_layers));
            json_object_set_new(a, "heads", json_integer(c->n_heads));
            json_object_set_new(a, "kv_heads", json_integer(c->n_kv_heads));
            json_object_set_new(a, "head_dim", json_integer(c->head_dim));
            json_object_set_new(a, "intermediate_size", json_integer(c->ffn));
            json_object_set_new(a, "vocab_size", json_integer(c->vocab));
            json_object_set_new(a, "rms_norm_eps", json_real(c->rms_eps));
            json_object_set_new(a, "rope_theta", json_real(c->rope_theta));
            json_object_set_new(a, "rope_scaling", json_string(c->rope_type == MB_ROPE_LINEAR ? "linear" : c->rope_type == MB_ROPE_LLAMA3 ? "llama3" : "default"));
            json_object_set_new(a, "sliding_window", c->sliding_window ? json_integer(c->sliding_window) : json_null());
            json_object_set_new(a, "tie_word_embeddings", json_boolean(c->tied));
            json_object_set_new(a, "experts", json_integer(c->n_experts));
            json_object_set_new(a, "experts_per_token", json_integer(c->n_experts_per_tok));
            json_object_set_new(a, "exl2", json_boolean(c->is_exl2));
            if (c->is_exl2) json_object_set_new(a, "exl2_bits", json_real(c->exl2_bits));
            if (c->is_exl2) json_object_set_new(a, "exl2_head_bits", json_integer((json_int_t)c->exl2_head_bits));
            json_object_set_new(root, "model", a);
        }
        json_object_set_new(root, "tensors_count", json_integer(st->n));
        json_object_set_new(root, "elements", json_integer(params));
        json_object_set_new(root, "bytes", json_integer((json_int_t)total));
        json_t *bd = json_object();
        for (int d = 0; d < MB_DTYPE_COUNT; d++)
            if (by_dtype[d]) json_object_set_new(bd, mb_dtype_name(d), json_integer((json_int_t)by_dtype[d]));
        json_object_set_new(root, "bytes_by_dtype", bd);
        if (nq) {
            json_t *ql = json_array();
            for (int i = 0; i < nq; i++) {
                json_t *o = json_object();
                json_object_set_new(o, "name", json_string(qs[i].name));
                json_object_set_new(o, "in", json_integer(qs[i].K));
                json_object_set_new(o, "out", json_integer(qs[i].N));
                json_object_set_new(o, "bpw", json_real(qs[i].bpw));
                json_object_set_new(o, "bits", json_string(qs[i].bits_desc));
                json_array_append_new(ql, o);
            }
            json_object_set_new(root, "exl2_layers", ql);
        }
        if (!p->no_tensors) {
            json_t *tl = json_array();
            for (int i = 0; i < st->n; i++) {
                const struct mb_tensor_info *t = st->sorted[i];
                json_t *o = json_object(), *sh = json_array();
                json_object_set_new(o, "name", json_string(t->name));
                json_object_set_new(o, "dtype", json_string(mb_dtype_name(t->dtype)));
                for (int d = 0; d < t->ndim; d++) json_array_append_new(sh, json_integer(t->shape[d]));
                json_object_set_new(o, "shape", sh);
                json_object_set_new(o, "bytes", json_integer((json_int_t)t->nbytes));
                json_array_append_new(tl, o);
            }
            json_object_set_new(root, "tensors", tl);
        }
        char *s = json_dumps(root, JSON_INDENT(1) | JSON_PRESERVE_ORDER);
        json_decref(root);
        if (s) { fputs(s, stdout); fputc('\n', stdout); free(s); }
    } else {
        printf("path:        %s (%d file%s)\n", p->path, st->n_files, st->n_files == 1 ? "" : "s");
        if (m) {
            const struct mb_config *c = &m->cfg;
            printf("model:       %s (%s%s)\n", c->arch_name, arch_desc(c), c->is_exl2 ? ", EXL2 quantized" : "");
            printf("layers:      %lld, hidden %lld, intermediate %lld, vocab %lld\n", (long long)c->n_layers, (long long)c->hidden, (long long)c->ffn, (long long)c->vocab);
            printf("attention:   %lld heads, %lld kv heads, head_dim %lld%s\n", (long long)c->n_heads, (long long)c->n_kv_heads, (long long)c->head_dim,
                   c->n_heads != c->n_kv_heads ? " (grouped-query)" : "");
            printf("rope:        theta %g, scaling %s", c->rope_theta, c->rope_type == MB_ROPE_LINEAR ? "linear" : c->rope_type == MB_ROPE_LLAMA3 ? "llama3" : "none");
            if (c->rope_type != MB_ROPE_DEFAULT) printf(" (factor %g)", c->rope_factor);
            printf("\nnorm eps:    %g\n", c->rms_eps);
            if (c->sliding_window) printf("sliding win: %lld\n", (long long)c->sliding_window);
            if (c->n_experts) printf("experts:     %d experts, %d per token\n", c->n_experts, c->n_experts_per_tok);
            printf("embeddings:  %s\n", c->tied ? "tied (head shares the embedding matrix)" : "untied");
            if (c->is_exl2) /* the head's setting, not its storage cost: the table below has every layer's stored bpw */
                printf("exl2:        %.2f bpw target (decoder), head setting %.0f bits (stored bpw per layer below)\n", c->exl2_bits, c->exl2_head_bits);
        }
        printf("tensors:     %d\n", st->n);
        printf("elements:    %lld (%.2f M)\n", (long long)params, params / 1e6);
        printf("bytes:       %zu (%.2f MB)", total, total / 1e6);
        for (int d = 0; d < MB_DTYPE_COUNT; d++)
            if (by_dtype[d]) printf(", %s %zu", mb_dtype_name(d), by_dtype[d]);
        printf("\n");
        if (nq) {
            printf("\n%-56s %7s %7s %6s  %s\n", "quantized layer", "in", "out", "bpw", "bits (rows share)");
            for (int i = 0; i < nq; i++)
                printf("%-56s %7lld %7lld %6.3f  %s\n", qs[i].name, (long long)qs[i].K, (long long)qs[i].N, qs[i].bpw, qs[i].bits_desc);
        }
        if (!p->no_tensors) {
            printf("\n%-64s %-5s %-18s %12s\n", "name", "dtype", "shape", "bytes");
            for (int i = 0; i < st->n; i++) {
                char sh[96];
                shape_str(st->sorted[i], sh, sizeof sh);
                printf("%-64s %-5s %-18s %12zu\n", st->sorted[i]->name, mb_dtype_name(st->sorted[i]->dtype), sh, st->sorted[i]->nbytes);
            }
        }
    }
    free(qs);
    if (m) mb_model_close(m);
    else mb_st_set_close(st);
    return 0;
}
