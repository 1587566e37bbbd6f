/* calib/calib.h: the forward pass (Llama / Mistral / Mixtral), executed one decoder module at a time over
 * a batch of sequences, perplexity and KL divergence.
 *
 * The model is written once against a table of operations (struct mb_ops). calib/ops_cpu.c implements it
 * on the CPU (OpenMP, OpenBLAS sgemm); a CUDA table implements the same signatures on device buffers.
 * All activations are f32; weights are converted to f32 when a layer is loaded (F32/F16/BF16 from the
 * mmap, EXL2 by dequantizing).
 *
 * Layout conventions: activations are row-major [rows, features]; a batch of S sequences of T tokens is
 * [S*T, H] with sequence s at rows s*T .. s*T+T-1. Linear weights are stored as Hugging Face does, W [N, K]
 * (out, in), and y [M, N] = x [M, K] @ W^T.
 */
#ifndef MB_CALIB_H
#define MB_CALIB_H

#include "../core/core.h"
#include "../formats/formats.h"

/* ------------------------------------------------------------------------------------------------ */
/* operations table                                                                                 */

struct mb_ops {
    const char *name;
    void *(*alloc)(size_t bytes);                  /* NULL on failure */
    void (*free)(void *p);
    /* y [M, N] = x [M, K] @ W^T, W [N, K]; accumulate: y += instead of y = */
    void (*matmul)(float *y, const float *x, const float *w, int64_t M, int64_t K, int64_t N, int accumulate);
    /* out [M, H] = x * rsqrt(mean(x^2) + eps) * w */
    void (*rmsnorm)(float *out, const float *x, const float *w, int64_t M, int64_t H, float eps);
    /* rotate heads of x [S*T, n_heads*hd] in place; cos/sin tables [T, hd/2] (position t of each sequence) */
    void (*rope)(float *x, int64_t S, int64_t T, int64_t n_heads, int64_t hd, const float *cos_t, const float *sin_t);
    /* out [S*T, nh*hd] = causal softmax(q k^T / sqrt(hd)) v per sequence and head, kv heads shared by
     * nh/nkv query heads; window > 0 limits each query to the last `window` keys (Mistral) */
    void (*attention)(float *out, const float *q, const float *k, const float *v, int64_t S, int64_t T, int64_t nh,
                      int64_t nkv, int64_t hd, int64_t window);
    /* g [n] = silu(g) * u */
    void (*swiglu)(float *g, const float *u, int64_t n);
    /* x [n] += y */
    void (*add)(float *x, const float *y, int64_t n);
};

extern const struct mb_ops mb_ops_cpu;

/* ------------------------------------------------------------------------------------------------ */
/* weights of one decoder layer, f32                                                                */

struct mb_layer_w {
    int layer;
    float *attn_norm, *mlp_norm; /* [H] */
    float *w[MB_P_COUNT];        /* dense projections [N, K]; for MoE only q, k, v, o */
    float *router;               /* [E, H] */
    float **xw[3];               /* experts: xw[0][e] gate (w1) [ffn, H], xw[1][e] up (w3), xw[2][e] down (w2) [H, ffn] */
    int n_experts;
};

/* Load a layer from the model (converted to f32; EXL2 layers dequantized). Owned; mb_layer_free. */
int mb_layer_load(const struct mb_model *m, int layer, struct mb_layer_w **out);
void mb_layer_free(struct mb_layer_w *w);

/* Load one weight matrix ([rows, cols] of expect) as f32: float checkpoints convert, EXL2 dequantizes. */
int mb_weight_f32(const struct mb_model *m, const char *module, int64_t rows, int64_t cols, float *out);

/* ------------------------------------------------------------------------------------------------ */
/* forward pass                                                                                     */

/* Intermediate inputs of the linear layers, for Hessians (calibration). Called from the forward pass
 * with the rows that the named group of projections consumes:
 *   MB_CAP_QKV   x [M, H]      normed input of q/k/v
 *   MB_CAP_O     x [M, nh*hd]  attention output, input of o_proj
 *   MB_CAP_GATEUP x [M, H]     normed input of gate/up (MoE: all tokens, for every expert's w1/w3)
 *   MB_CAP_DOWN  x [M, ffn]    input of down (MoE: the rows routed to `expert`) */
enum mb_cap { MB_CAP_QKV, MB_CAP_O, MB_CAP_GATEUP, MB_CAP_DOWN, MB_CAP_COUNT };
struct mb_capture {
    void (*fn)(void *user, int layer, enum mb_cap which, int expert, const float *x, int64_t M, int64_t K);
    void *user;
    /* MoE: make sure every expert sees at least this many rows for its down-projection Hessian; starved
     * experts also get the rows that rank them highest (their outputs are not used) */
    int64_t min_expert_rows;
    /* MoE: tokens routed to each expert, accumulated [n_layers][n_experts] (optional) */
    int64_t *expert_tokens;
};

struct mb_fwd {
    const struct mb_model *m;
    const struct mb_config *c;
    const struct mb_ops *ops;
    int64_t max_rows; /* S*T capacity of the buffers */
    int64_t max_T;
    float *cos_t, *sin_t; /* [max_T, hd/2] */
    /* scratch */
    float *xn, *q, *k, *v, *att, *g, *u, *tmp, *rl;
    float *embed;   /* [vocab, H] f32, or NULL when read per row from the mmap */
    float *norm;    /* final norm [H] */
    float *head;    /* [vocab, H] f32 */
    int64_t moe_cap;
    float *xg, *xgo; int64_t *rowidx; float *roww;
};

/* Allocate buffers for batches of up to max_rows rows and sequences of up to max_T tokens. Loads the
 * embeddings, final norm and head (f32). */
int mb_fwd_init(struct mb_fwd *f, const struct mb_model *m, const struct mb_ops *ops, int64_t max_rows, int64_t max_T);
void mb_fwd_free(struct mb_fwd *f);
/* x [M, H] = embeddings of ids [M] */
int mb_fwd_embed(struct mb_fwd *f, const int32_t *ids, int64_t M, float *x);
/* x [S*T, H] += attention block of layer w (input norm, q/k/v, rope, attention, o) */
int mb_fwd_attn(struct mb_fwd *f, const struct mb_layer_w *w, float *x, int64_t S, int64_t T, const struct mb_capture *cap);
/* x [M, H] += MLP or MoE block of layer w */
int mb_fwd_mlp(struct mb_fwd *f, const struct mb_layer_w *w, float *x, int64_t M, const struct mb_capture *cap);
/* logits [M, vocab] of rows x [M, H] (final norm + head); x is not modified */
int mb_fwd_logits(struct mb_fwd *f, const float *x, int64_t M, float *logits);

/* ------------------------------------------------------------------------------------------------ */
/* perplexity / KL divergence                                                                       */

enum mb_ppl_convention { MB_PPL_PAPER, MB_PPL_LLAMACPP };

struct mb_ppl_params {
    enum mb_ppl_convention convention;
    int64_t ctx;          /* window length */
    int64_t stride;       /* paper: 0 = ctx */
    int64_t max_tokens;   /* cut the token stream ([BOS] + text) to this many, 0 = all */
    int64_t batch_tokens; /* rows per forward batch (default 4096) */
    const char *save_logprobs; /* write top-k reference log-probabilities here */
    int topk;             /* default 32 */
    const char *kld;      /* compare against this file */
    const struct mb_ops *ops;
    int progress;
};

struct mb_ppl_result {
    double ppl, mean_nll;
    int64_t tokens;       /* scored */
    int64_t evaluated;    /* tokens run through the model */
    double seconds, tok_per_s;
    /* KLD mode */
    int has_kld;
    double kld_mean, kld_p99, same_top1;
};

void mb_ppl_default_params(struct mb_ppl_params *p);
/* Evaluate a token stream ids [n] (BOS first, as the conventions expect). */
int mb_ppl_run(const struct mb_model *m, const int32_t *ids, int64_t n, uint64_t tokenizer_hash, const struct mb_ppl_params *p,
               struct mb_ppl_result *r);
/* The same on a text file, tokenized as it streams: memory stays bounded by one batch of windows, whatever
 * the text's length (the p99 of the KLD comes from a 0.42%-resolution histogram). */
int mb_ppl_run_file(const struct mb_model *m, const struct mb_tokenizer *t, const char *path, const struct mb_ppl_params *p,
                    struct mb_ppl_result *r);
/* Forward one sequence ids [T] and return nll [T-1] of each next token (argmax [T-1] optional). */
int mb_seq_nll(const struct mb_model *m, const struct mb_ops *ops, const int32_t *ids, int64_t T, double *nll, int32_t *argmax);

#endif
