/* bench/synth_model.c: synthetic checkpoints with real model shapes, for memory and speed benchmarks.
 *
 *   synth_model OUT_DIR PRESET [LAYERS] [TOKENIZER_DIR] [EXPERTS]
 *
 * PRESET: mixtral-8x7b (hidden 4096, 32 / 8 heads, 8 experts of ffn 14336, top-2, vocab 32000),
 * mixtral-8x22b (hidden 6144, 48 / 8 heads, 8 experts of ffn 16384, top-2, vocab 32000), llama-7b (hidden
 * 4096, ffn 11008, 32 heads), tiny-moe (hidden 256, 4 experts of ffn 512: a quick self-test).
 * Writes config.json, model.safetensors (BF16, streamed to disk: memory stays small whatever the size) and
 * the tokenizer files copied from TOKENIZER_DIR (default ../shared/tokenizers/llama2, 32000 ids).
 *
 * Weights are random but shaped like trained ones: W[n, k] = 0.02 * z * r_n * c_k with z close to normal
 * (sum of four uniforms) and one value in 1000 eight times larger (heavy tails), row scales r_n log-normal
 * (sigma 0.5) and a few outlier input channels (c_k = 8 for 0.5% of k, else 1); norms 1 +- 0.1. Every
 * tensor has its own seed, so the file is the same bytes on any machine and thread count. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../core/core.h"

struct preset {
    const char *name;
    int64_t hidden, heads, kv_heads, ffn, vocab, experts, topk, layers;
    double theta;
};
static const struct preset presets[] = {
    {"mixtral-8x7b", 4096, 32, 8, 14336, 32000, 8, 2, 32, 1e6},
    {"mixtral-8x22b", 6144, 48, 8, 16384, 32000, 8, 2, 56, 1e6},
    {"llama-7b", 4096, 32, 32, 11008, 32000, 0, 0, 32, 1e4},
    {"tiny-moe", 256, 8, 4, 512, 32000, 4, 2, 2, 1e4},
};

struct tens {
    char name[160];
    int64_t rows, cols; /* cols 0: a vector of rows */
    int norm;
    uint64_t seed;
};

static uint64_t fnv(const char *s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) { h ^= (uint8_t)*s; h *= 0x100000001b3ull; }
    return h;
}

static int cmp_tens(const void *a, const void *b) { return strcmp(((const struct tens *)a)->name, ((const struct tens *)b)->name); }

/* one block of rows [r0, r1) of tensor t as bf16 */
static void fill(const struct tens *t, int64_t r0, int64_t r1, const float *colscale, uint16_t *out) {
    int64_t cols = t->cols ? t->cols : 1;
#pragma omp parallel for schedule(static)
    for (int64_t r = r0; r < r1; r++) {
        struct mb_rng g = {t->seed ^ (0x9E3779B97F4A7C15ull * (uint64_t)(r + 1))};
        uint16_t *o = out + (r - r0) * cols;
        if (t->norm) { o[0] = mb_f32_to_bf16((float)(1.0 + 0.2 * (mb_rng_uniform(&g) - 0.5))); continue; }
        /* log-normal row scale: exp(0.5 * N(0,1)) */
        double u1 = mb_rng_uniform(&g) + 1e-12, u2 = mb_rng_uniform(&g);
        float rs = (float)exp(0.5 * sqrt(-2 * log(u1)) * cos(2 * M_PI * u2));
        for (int64_t c = 0; c < cols; c++) {
            uint64_t x = mb_rng_next(&g);
            /* four 16-bit uniforms: sum - 2 has variance 1/3 */
            double z = ((double)(x & 0xffff) + (double)((x >> 16) & 0xffff) + (double)((x >> 32) & 0xffff) + (double)(x >> 48)) / 65536.0 - 2.0;
            z *= 1.7320508;
            if ((x & 0x3ff) == 7) z *= 8; /* heavy tail */
            o[c] = mb_f32_to_bf16((float)(0.02 * z) * rs * colscale[c]);
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: synth_model OUT_DIR PRESET [LAYERS] [TOKENIZER_DIR] [EXPERTS]\npresets:");
        for (size_t i = 0; i < sizeof presets / sizeof *presets; i++) fprintf(stderr, " %s", presets[i].name);
        fprintf(stderr, "\n");
        return 2;
    }
    const char *out = argv[1];
    const struct preset *P = NULL;
    for (size_t i = 0; i < sizeof presets / sizeof *presets; i++) if (!strcmp(argv[2], presets[i].name)) P = &presets[i];
    if (!P) { fprintf(stderr, "synth_model: unknown preset %s\n", argv[2]); return 2; }
    int64_t layers = argc > 3 ? atoll(argv[3]) : P->layers;
    const char *tokdir = argc > 4 ? argv[4] : "../shared/tokenizers/llama2";
    struct preset pv = *P;
    if (argc > 5) pv.experts = atoll(argv[5]); /* the preset's shapes with fewer experts (memory benchmarks) */
    if (pv.experts < 0 || pv.experts > 64 || (pv.experts && pv.topk > pv.experts)) { fprintf(stderr, "synth_model: bad expert count\n"); return 2; }
    P = &pv;
    if (layers < 1 || layers > 1000) { fprintf(stderr, "synth_model: bad layer count\n"); return 2; }
    if (mb_mkdir_p(out)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }

    /* tensor list */
    int64_t H = P->hidden, hd = H / P->heads, qd = P->heads * hd, kvd = P->kv_heads * hd, F = P->ffn, E = P->experts;
    int cap = (int)(4 + layers * (8 + 3 * (E ? E : 1) + 1));
    struct tens *t = calloc(cap, sizeof *t);
    int n = 0;
#define T(r, c, nrm, ...) do { snprintf(t[n].name, sizeof t[n].name, __VA_ARGS__); t[n].rows = r; t[n].cols = c; t[n].norm = nrm; t[n].seed = fnv(t[n].name); n++; } while (0)
    T(P->vocab, H, 0, "model.embed_tokens.weight");
    T(P->vocab, H, 0, "lm_head.weight");
    T(H, 0, 1, "model.norm.weight");
    for (int64_t l = 0; l < layers; l++) {
        T(H, 0, 1, "model.layers.%lld.input_layernorm.weight", (long long)l);
        T(H, 0, 1, "model.layers.%lld.post_attention_layernorm.weight", (long long)l);
        T(qd, H, 0, "model.layers.%lld.self_attn.q_proj.weight", (long long)l);
        T(kvd, H, 0, "model.layers.%lld.self_attn.k_proj.weight", (long long)l);
        T(kvd, H, 0, "model.layers.%lld.self_attn.v_proj.weight", (long long)l);
        T(H, qd, 0, "model.layers.%lld.self_attn.o_proj.weight", (long long)l);
        if (E) {
            T(E, H, 0, "model.layers.%lld.block_sparse_moe.gate.weight", (long long)l);
            for (int64_t e = 0; e < E; e++) {
                T(F, H, 0, "model.layers.%lld.block_sparse_moe.experts.%lld.w1.weight", (long long)l, (long long)e);
                T(H, F, 0, "model.layers.%lld.block_sparse_moe.experts.%lld.w2.weight", (long long)l, (long long)e);
                T(F, H, 0, "model.layers.%lld.block_sparse_moe.experts.%lld.w3.weight", (long long)l, (long long)e);
            }
        } else {
            T(F, H, 0, "model.layers.%lld.mlp.gate_proj.weight", (long long)l);
            T(F, H, 0, "model.layers.%lld.mlp.up_proj.weight", (long long)l);
            T(H, F, 0, "model.layers.%lld.mlp.down_proj.weight", (long long)l);
        }
    }
#undef T
    qsort(t, n, sizeof *t, cmp_tens);

    /* header: sorted names, consecutive offsets, padded with spaces to a multiple of 8 */
    size_t hcap = (size_t)n * 256 + 256, hl = 0, off = 0;
    char *hdr = malloc(hcap);
    hl += snprintf(hdr + hl, hcap - hl, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (int i = 0; i < n; i++) {
        size_t bytes = (size_t)(t[i].rows * (t[i].cols ? t[i].cols : 1)) * 2;
        if (t[i].cols) hl += snprintf(hdr + hl, hcap - hl, ",\"%s\":{\"dtype\":\"BF16\",\"shape\":[%lld,%lld],\"data_offsets\":[%zu,%zu]}", t[i].name, (long long)t[i].rows, (long long)t[i].cols, off, off + bytes);
        else hl += snprintf(hdr + hl, hcap - hl, ",\"%s\":{\"dtype\":\"BF16\",\"shape\":[%lld],\"data_offsets\":[%zu,%zu]}", t[i].name, (long long)t[i].rows, off, off + bytes);
        off += bytes;
    }
    hl += snprintf(hdr + hl, hcap - hl, "}");
    while (hl % 8) hdr[hl++] = ' ';
    char path[4300];
    snprintf(path, sizeof path, "%s/model.safetensors", out);
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); return 1; }
    uint64_t hl64 = hl;
    fwrite(&hl64, 8, 1, f);
    fwrite(hdr, 1, hl, f);
    /* data, in blocks of rows */
    float *colscale = malloc((size_t)(F > H ? F : H) * sizeof *colscale);
    const int64_t RB = 256;
    uint16_t *buf = malloc((size_t)(RB * (F > H ? F : H)) * 2);
    double t0 = mb_now();
    for (int i = 0; i < n; i++) {
        int64_t cols = t[i].cols ? t[i].cols : 1;
        struct mb_rng g = {t[i].seed * 3 + 1};
        for (int64_t c = 0; c < cols; c++) colscale[c] = mb_rng_uniform(&g) < 0.005 ? 8.0f : 1.0f;
        for (int64_t r0 = 0; r0 < t[i].rows; r0 += (t[i].cols ? RB : t[i].rows)) {
            int64_t r1 = t[i].cols ? (r0 + RB < t[i].rows ? r0 + RB : t[i].rows) : t[i].rows;
            if (t[i].cols) fill(&t[i], r0, r1, colscale, buf);
            else fill(&t[i], 0, t[i].rows, colscale, buf);
            if (fwrite(buf, 2, (size_t)((r1 - r0) * cols), f) != (size_t)((r1 - r0) * cols)) { perror(path); return 1; }
        }
    }
    if (fclose(f)) { perror(path); return 1; }
    fprintf(stderr, "synth_model: %s: %d tensors, %.2f GB in %.1f s\n", path, n, (double)off / 1e9, mb_now() - t0);

    /* config.json */
    snprintf(path, sizeof path, "%s/config.json", out);
    f = fopen(path, "w");
    if (!f) { perror(path); return 1; }
    fprintf(f, "{\n  \"architectures\": [\"%s\"],\n  \"model_type\": \"%s\",\n  \"hidden_size\": %lld,\n  \"intermediate_size\": %lld,\n"
               "  \"num_attention_heads\": %lld,\n  \"num_key_value_heads\": %lld,\n  \"num_hidden_layers\": %lld,\n  \"vocab_size\": %lld,\n"
               "  \"max_position_embeddings\": 32768,\n  \"rms_norm_eps\": 1e-05,\n  \"rope_theta\": %g,\n  \"tie_word_embeddings\": false,\n"
               "  \"hidden_act\": \"silu\",\n  \"bos_token_id\": 1,\n  \"eos_token_id\": 2,\n  \"torch_dtype\": \"bfloat16\"",
            E ? "MixtralForCausalLM" : "LlamaForCausalLM", E ? "mixtral" : "llama", (long long)H, (long long)F, (long long)P->heads,
            (long long)P->kv_heads, (long long)layers, (long long)P->vocab, P->theta);
    if (E) fprintf(f, ",\n  \"num_local_experts\": %lld,\n  \"num_experts_per_tok\": %lld,\n  \"sliding_window\": null", (long long)E, (long long)P->topk);
    fprintf(f, "\n}\n");
    fclose(f);
    const char *side[] = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"};
    for (int i = 0; i < 4; i++) {
        char a[4300], b[4300];
        snprintf(a, sizeof a, "%s/%s", tokdir, side[i]);
        snprintf(b, sizeof b, "%s/%s", out, side[i]);
        if (mb_file_exists(a) && mb_copy_file(a, b)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
    }
    free(t); free(hdr); free(colscale); free(buf);
    return 0;
}
