/* calib/calib.h: the forward pass (Llama / Mistral / Mixtral), written once against the operations table of
 * kernels/kernels.h and streamed one decoder module at a time; calibration (hidden states of the
 * calibration rows, Hessians), measurement of the quantization options, perplexity and KL divergence.
 *
 * One runner (struct mb_fwd) serves every job: perplexity runs all modules over a batch of windows,
 * calibration / measurement / quantization run one module over all calibration rows in chunks. Weights are
 * views in their stored dtype (struct mb_weight), acquired one layer at a time through the runner, which
 * prefetches the next layer while the current one computes; nothing holds the whole model.
 *
 * Modules: m = 0 .. 2*layers-1; even m is layer m/2's attention block, odd m its MLP / MoE block.
 * Layout conventions: see kernels.h (activations [rows, features] f32, S sequences of T tokens as [S*T, H]).
 */
#ifndef MB_CALIB_H
#define MB_CALIB_H

#include "../core/core.h"
#include "../formats/formats.h"
#include "../kernels/kernels.h"
#include "../quant/quant.h"

/* ------------------------------------------------------------------------------------------------ */
/* weights                                                                                          */

/* Host view of one weight matrix of the model ([rows, cols] of its mb_expect entry): a float checkpoint's
 * tensor in its stored dtype (zero-copy into the mapping), or an EXL2 module's q_* tensors. The view's name
 * points into the checkpoint and lives as long as the model. */
int mb_model_weight(const struct mb_model *m, const char *module, int64_t rows, int64_t cols, struct mb_weight *out);

/* Weights of one decoder layer, loaded for a backend */
struct mb_layer_w {
    int layer;
    float *attn_norm, *mlp_norm;    /* [H] f32 backend buffers */
    struct mb_weight w[MB_P_COUNT]; /* dense projections [N, K]; for MoE only q, k, v, o */
    struct mb_weight router;        /* [E, H] */
    struct mb_weight *xw[3];        /* experts: xw[0][e] gate (w1) [ffn, H], xw[1][e] up (w3), xw[2][e] down (w2) [H, ffn] */
    int n_experts;
    const struct mb_ops *ops;
};

/* Load layer `layer` for ops (async: start the copies / read-ahead and return). Owned; mb_layer_free. */
int mb_layer_load(const struct mb_model *m, const struct mb_ops *ops, int layer, int async, struct mb_layer_w **out);
void mb_layer_free(struct mb_layer_w *w);
/* The slot of projection p (expert e, or -1) in a layer */
struct mb_weight *mb_layer_slot(struct mb_layer_w *w, int proj, int expert);

/* ------------------------------------------------------------------------------------------------ */
/* the runner                                                                                       */

/* Intermediate inputs of the linear layers, for Hessians. Called from the forward pass with a backend
 * buffer of the runner's ops table holding the rows that the named group of projections consumes:
 *   MB_CAP_QKV    x [M, H]      normed input of q/k/v
 *   MB_CAP_O      x [M, nh*hd]  attention output, input of o_proj
 *   MB_CAP_GATEUP x [M, H]      normed input of gate/up (MoE: all tokens, for every expert's w1/w3)
 *   MB_CAP_DOWN   x [M, ffn]    input of down (MoE: the rows routed to `expert`)
 * A non-zero return stops the forward pass with that status. */
enum mb_cap { MB_CAP_QKV, MB_CAP_O, MB_CAP_GATEUP, MB_CAP_DOWN, MB_CAP_COUNT };
struct mb_capture {
    int (*fn)(void *user, int layer, enum mb_cap which, int expert, const float *x, int64_t M, int64_t K);
    void *user;
    /* MoE: make sure every expert sees at least this many rows for its down-projection Hessian; starved
     * experts also get the rows that rank them highest (their outputs are not used) */
    int64_t min_expert_rows;
    /* MoE: tokens routed to each expert, accumulated [n_layers][n_experts] (optional, host) */
    int64_t *expert_tokens;
};

struct mb_fwd {
    const struct mb_model *m;
    const struct mb_config *c;
    const struct mb_ops *ops;
    int64_t max_rows; /* S*T capacity of the buffers */
    int64_t max_T;
    float *cos_t, *sin_t; /* [max_T, hd/2] */
    /* scratch (backend buffers) */
    float *xn, *q, *k, *v, *att, *g, *u, *tmp;
    float *rl, *probs, *wsel, *roww, *xg, *xgo; /* MoE */
    int32_t *sel, *rowidx;
    /* embeddings, final norm, head: loaded views and a vector */
    struct mb_weight embed, head;
    float *norm;
    /* layer streaming: the current layer and the one being prefetched */
    struct mb_layer_w *cur, *next;
};

/* Bytes of the work buffers mb_fwd_init allocates for these sizes (activations, rope tables, MoE lists) */
int64_t mb_fwd_bytes(const struct mb_config *c, int64_t max_rows, int64_t max_T);
/* Stored bytes of layer `layer`'s weights (norms, projections, router) */
int64_t mb_layer_bytes(const struct mb_model *m, int layer);

/* Buffers for batches of up to max_rows rows and sequences of up to max_T tokens; loads embeddings, final
 * norm and head for the backend. */
int mb_fwd_init(struct mb_fwd *f, const struct mb_model *m, const struct mb_ops *ops, int64_t max_rows, int64_t max_T);
void mb_fwd_free(struct mb_fwd *f);
/* x [M, H] = embeddings of ids [M] (host array) */
int mb_fwd_embed(struct mb_fwd *f, const int32_t *ids, int64_t M, float *x);
/* The weights of `layer`, streamed: the runner keeps the current layer and prefetches the next one. Valid
 * until the next call with another layer. */
int mb_fwd_layer(struct mb_fwd *f, int layer, const struct mb_layer_w **out);
/* x [S*T, H] = modules [m0, m1) applied to x, weights streamed */
int mb_fwd_run(struct mb_fwd *f, int m0, int m1, float *x, int64_t S, int64_t T, const struct mb_capture *cap);
/* x [S*T, H] = module m with the weights w (the model's, measurement candidates, or quantized ones) */
int mb_fwd_module(struct mb_fwd *f, const struct mb_layer_w *w, int m, float *x, int64_t S, int64_t T, const struct mb_capture *cap);
/* logits [M, vocab] of rows x [M, H] (final norm + head); x is not modified */
int mb_fwd_logits(struct mb_fwd *f, const float *x, int64_t M, float *logits);

/* ------------------------------------------------------------------------------------------------ */
/* calibration: hidden states, Hessians, measurement                                                */

/* Hidden states of R calibration sequences of L tokens: two buffers [R*L, H] f32, the current module's
 * input (buf[cur]) and output. Host memory, memory-mapped files under spill_dir (beyond a memory limit;
 * blocks reserved up front so a full disk fails here), or backend memory (device tables, when they fit). */
struct mb_states {
    int64_t R, L, H;
    float *buf[2];
    int cur;
    int mapped;     /* files */
    int on_backend; /* buffers allocated by the ops table */
    const struct mb_ops *ops;
    char path[2][4200];
};
/* where: 0 host memory, 1 files in spill_dir, 2 backend memory of ops */
int mb_states_open(struct mb_states *s, const struct mb_ops *ops, int64_t R, int64_t L, int64_t H, int where, const char *spill_dir);
void mb_states_close(struct mb_states *s);
/* Checkpoint buf[cur] to `path` atomically (mapped files: msync instead, path unused), and read it back. Device
 * buffers go through host memory in chunks. */
int mb_states_save(struct mb_states *s, const char *path);
int mb_states_load(struct mb_states *s, const char *path);
/* Embed rows [R, L] (host ids) into buf[cur] */
int mb_states_embed(struct mb_states *s, struct mb_fwd *f, const int32_t *rows, int64_t chunk_rows);
/* buf[cur ^ 1] = module m (weights w) of buf[cur], chunks of whole sequences up to chunk_rows rows; the
 * capture sees every chunk. Does not flip cur. */
int mb_states_forward(struct mb_states *s, struct mb_fwd *f, const struct mb_layer_w *w, int m, int64_t chunk_rows, const struct mb_capture *cap);

/* Hessians of one module's projections, in the backend's memory: attention: a = q/k/v input, b = o input;
 * MLP: a = gate/up input, b = down input; MoE: a = gate/up input of all tokens, down[e] per expert */
struct mb_hset {
    struct mb_hessian a, b;
    struct mb_hessian *down;
    int n_experts;
    const struct mb_ops *ops;
};
void mb_hset_free(struct mb_hset *h);
/* The Hessian that projection p (expert e or -1) of module m is quantized with */
const struct mb_hessian *mb_hset_for(const struct mb_hset *h, int m, int p, int expert);
/* Run module m over the states (buf[cur ^ 1] = module(buf[cur])) collecting its Hessians. MoE: experts get at
 * least min_expert_rows rows; routed tokens are added to expert_tokens [layers][experts] when not NULL. An
 * expert that receives no row is an error naming it. */
int mb_collect_hessians(struct mb_states *s, struct mb_fwd *f, const struct mb_layer_w *w, int m, int64_t chunk_rows, int64_t min_expert_rows,
                        int64_t *expert_tokens, struct mb_hset *hs);

/* Measurement of module m: every projection is GPTQ-quantized once per distinct setting of the option table
 * (kept packed, never as f32 matrices), then every option row is scored by the relative error of the module
 * output against the reference output buf[cur ^ 1] (computed by mb_collect_hessians) for the input buf[cur]:
 *   objective 0 (ExLlamaV2's): err = mean over sequences of ||Y_q - Y_ref||_F / ||Y_ref||_F
 *   objective 1 (delta):       err = mean over sequences of ||Y_q - Y_ref||_F / ||Y_ref - X||_F
 *                              (relative to what the module adds to the residual stream)
 *   accuracy = 1 - err (at least 1e-6). acc [t->n]. Fails when every option has accuracy below 0.1 (an
 * inference or measurement error). */
int mb_measure_module(struct mb_states *s, struct mb_fwd *f, const struct mb_layer_w *w, int m, const struct mb_hset *hs,
                      const struct mb_module_table *t, int64_t chunk_rows, int objective, double *acc);

/* Quantize the projections of module m with one row of its option table (or the given setting for every
 * projection when `uniform`), GPTQ (rtn: round to nearest) and EXL2 packing with the self-check. On success
 * packed [t->nproj * experts] (projection-major) holds the packed tensors (mb_exl2_packed_free each; empty for the
 * projections the table keeps in F16, which keep the layer's weights) and *q a
 * copy of layer w whose module-m projections are those packed layers, loaded for the backend (it shares w's
 * other weights: use it while w is loaded; free with mb_quantized_free). */
int mb_quantize_module(const struct mb_fwd *f, const struct mb_layer_w *w, int m, const struct mb_hset *hs, const struct mb_module_table *t,
                       int row, const char *uniform, int rtn, struct mb_exl2_packed *packed, struct mb_layer_w **q);
void mb_quantized_free(struct mb_layer_w *q, int m, const struct mb_module_table *t);

/* Sensitivity of the model's output to each module. One probe per module: the module quantized with one
 * option row (its "probe"), applied to the reference input of S calibration sequences, then the rest of
 * the model in full precision; kld[m] = mean KL divergence (reference || probed) of the final logits over
 * those S*L positions. The streams of all probed modules advance together through the layers, so the
 * pass streams the weights once. Quantization errors of different modules add to first order, so the
 * output's KLD of a whole conversion is about sum_m kld[m] * (err_m / err_m(probe))^2 (convert's allocation). */
struct mb_sens {
    int nmod;
    int64_t S, L, H;
    const struct mb_ops *ops;
    float **stream;  /* [nmod] backend buffers [S*L, H]; NULL until module m is probed */
    double *err;     /* [nmod] the probe's relative output error on these rows (ExLlamaV2's error measure) */
    double *kld;     /* [nmod] */
};
int mb_sens_open(struct mb_sens *z, const struct mb_ops *ops, int nmod, int64_t S, int64_t L, int64_t H);
void mb_sens_close(struct mb_sens *z);
/* Module m: stream m = module m with the probe weights q applied to sequences [0, S) of the states' input
 * buf[cur] (err[m] against the reference output buf[cur ^ 1], which mb_collect_hessians computed); every
 * stream probed before m advances through module m with the model's weights w. */
int mb_sens_module(struct mb_sens *z, struct mb_states *s, struct mb_fwd *f, const struct mb_layer_w *w, const struct mb_layer_w *q, int m,
                   int64_t chunk_rows);
/* Checkpoint the streams of modules [0, upto) to `path` atomically (device buffers through host memory in
 * chunks), and read them back into a freshly opened z. */
int mb_sens_save(const struct mb_sens *z, int upto, const char *path);
int mb_sens_load(struct mb_sens *z, int upto, const char *path);
/* After the last module (buf[cur] = the reference final states): kld[m] of every probed stream. */
int mb_sens_finish(struct mb_sens *z, struct mb_states *s, struct mb_fwd *f, int64_t chunk_rows);

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
    /* BOS: the token stream starts with BOS and the llamacpp convention replaces each chunk's first token
     * by it (bos_id), or neither; callers pass the model's rule (mb_tokenizer_adds_bos) or --bos */
    int bos;
    int32_t bos_id;
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
/* Evaluate a token stream ids [n] (with BOS first when p->bos, as the conventions expect). */
int mb_ppl_run(const struct mb_model *m, const int32_t *ids, int64_t n, uint64_t tokenizer_hash, const struct mb_ppl_params *p,
               struct mb_ppl_result *r);
/* The same on a text file, tokenized as it streams: memory stays bounded by one batch of windows, whatever
 * the text's length (the p99 of the KLD comes from a 0.42%-resolution histogram). */
int mb_ppl_run_file(const struct mb_model *m, const struct mb_tokenizer *t, const char *path, const struct mb_ppl_params *p,
                    struct mb_ppl_result *r);
/* Forward one sequence ids [T] and return nll [T-1] of each next token (argmax [T-1] optional). */
int mb_seq_nll(const struct mb_model *m, const struct mb_ops *ops, const int32_t *ids, int64_t T, double *nll, int32_t *argmax);

#endif
