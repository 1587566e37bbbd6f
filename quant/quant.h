/* quant/quant.h: EXL2 quantization: settings and option tables, Hessians, GPTQ, scales, packing and
 * unpacking of the EXL2 tensors (byte layout: ../shared/docs/exl2-format.md, summarized in exl2.c). */
#ifndef MB_QUANT_H
#define MB_QUANT_H

#include "../core/core.h"
#include "../formats/formats.h"
#include "../kernels/kernels.h"

/* One quantized layer of an EXL2 model, as `inspect` shows it. */
struct mb_exl2_summary {
    char name[128];
    int64_t K, N;       /* in, out features */
    double bpw;         /* storage bits / (K * N), formula of the format doc */
    char bits_desc[96]; /* e.g. "8b 10%, 6b 90%" */
};
/* Summaries of every quantized layer of an EXL2 model (owned array, free()). */
int mb_exl2_summarize(const struct mb_model *m, struct mb_exl2_summary **out, int *n);


/* ------------------------------------------------------------------------------------------------ */
/* settings and option tables                                                                       */

#define MB_QS_MAX 4
/* One projection's setting: parts of the (act-ordered) rows, each with a bit width, a share of the rows
 * and a group size; written "0.05:3b_64g/0.95:2b_64g". Widths are listed in descending order. */
struct mb_qsetting {
    int n;
    int bits[MB_QS_MAX];
    double prop[MB_QS_MAX];
    int gsize[MB_QS_MAX];
    int scale_bits; /* always 4 */
};

#define MB_ATTN_OPTIONS 19
#define MB_MLP_OPTIONS 17
/* The reference converter's option tables: attention rows give (q, k, v, o), MLP rows (gate, up, down). */
extern const char *const mb_attn_table[MB_ATTN_OPTIONS][4];
extern const char *const mb_mlp_table[MB_MLP_OPTIONS][3];
/* Head options by head bits (2, 3, 4, 5, 6, 8); NULL for others. */
const char *mb_head_option(int head_bits);

int mb_qsetting_parse(const char *s, struct mb_qsetting *q);
/* "0.05:3b_64g/0.95:2b_64g" */
void mb_qsetting_str(const struct mb_qsetting *q, char *buf, size_t n);

/* The groups a setting gives a matrix with K rows (K a multiple of 32 after padding): G groups with
 * bits[g] and rows[g] (arrays of at least K/32 entries). Same rule as the reference converter: per part,
 * ceil(min(K*prop, rows left) / gsize) groups, the last one cut short when the rows run out. */
int mb_qsetting_groups(const struct mb_qsetting *q, int64_t K, int *G, int *bits, int64_t *rows);
/* Exact storage cost in bits of a K x N layer (format doc formula; bias adds 16 * N). */
int64_t mb_qsetting_bits(const struct mb_qsetting *q, int64_t K, int64_t N, int bias);

/* ------------------------------------------------------------------------------------------------ */
/* decoder modules and their option tables                                                          */
/* Module m of a model: even m is layer m/2's attention block (q, k, v, o), odd m its MLP or MoE block    */
/* (gate, up, down; every expert of a MoE block gets the same setting).                              */

#define MB_MODULE_OPTIONS_MAX (MB_ATTN_OPTIONS + 1)
/* The setting added to both tables near their minimum (see convert.c) */
#define MB_EXTRA_SETTING "1:2b_32g"

struct mb_module_table {
    int n;                                         /* options */
    int nproj;                                     /* 4 (attention) or 3 (MLP / MoE) */
    int proj[4];                                   /* enum mb_proj of each column */
    int experts;                                   /* 1, or the experts of a MoE block */
    const char *setting[MB_MODULE_OPTIONS_MAX][4]; /* static strings */
    int64_t bits[MB_MODULE_OPTIONS_MAX];           /* exact storage bits of the whole module */
    int f16[4];                                    /* projection kept unquantized (F16 .weight): K % 32 != 0 */
};
/* The option table of module m: the reference converter's rows, plus MB_EXTRA_SETTING when extra; or one row
 * with `uniform` for every projection when uniform != NULL (a copy is not kept: the string must outlive t).
 * Rows are in increasing total bits (stable), as the reference converter's optimizer assumes. A projection
 * whose input size is not a multiple of 32 cannot be EXL2 (the runtime's kernels walk 32 rows at a time):
 * it is kept as F16 and counted at 16 bits per weight in every row. */
int mb_module_table(const struct mb_config *c, int m, int extra, const char *uniform, struct mb_module_table *t);
/* Weight shape of projection p: N outputs, K inputs */
void mb_proj_shape(const struct mb_config *c, int p, int64_t *N, int64_t *K);
/* "model.layers.3.self_attn" / ".mlp" / ".block_sparse_moe" */
void mb_module_name(const struct mb_config *c, int m, char *buf, size_t n);
/* "model.layers.3.self_attn.q_proj", "model.layers.3.block_sparse_moe.experts.5.w2" */
void mb_linear_name(const struct mb_config *c, int layer, int p, int expert, char *buf, size_t n);

/* ------------------------------------------------------------------------------------------------ */
/* measurement.json: per-module accuracy of every option (the reference converter's layout, which      */
/* mixbit convert also writes)                                                                       */
/*
 * { "measurement": {
 *     "model.layers.0.self_attn": [                       one entry per option row of the table
 *       { "accuracy": 0.9731, "total_bits": 1234567,
 *         "q_proj": { "group_size": {"3": 64, "2": 64}, "bits": [3, 2], "bits_prop": [0.05, 0.95],
 *                     "scale_bits": 4 },
 *         "k_proj": {...}, "v_proj": {...}, "o_proj": {...} }, ... ],
 *     "model.layers.0.mlp": [ { ..., "gate_proj": {...}, "up_proj": {...}, "down_proj": {...} }, ... ],
 *     "model.layers.0.block_sparse_moe": [ { ..., "w1": {...}, "w3": {...}, "w2": {...} }, ... ],
 *     "model.norm.norm": null, "lm_head.linear": null },  unmeasured modules: skipped
 *   "last_module_idx": 11 }
 *
 * Checked: accuracy finite in [0, 1]; total_bits a positive integer; each projection's bits (2..8,
 * descending, at most MB_QS_MAX parts), bits_prop (shares in (0, 1] summing to 1), group_size (an object
 * keyed by width, a list, or one integer; multiples of 32) and scale_bits (4); the projections of every
 * option match the module's kind (.self_attn: q/k/v/o; .mlp: gate/up/down or up/down;
 * .block_sparse_moe: w1/w3/w2) and agree across its options; at most 65536 modules of 1..1024 options,
 * 64 MiB of file. Every error is one MB_EFORMAT line naming the file, the module and the option index.
 */
#define MB_MEAS_MAX_PROJ 4
struct mb_meas_option {
    double accuracy;                    /* in [0, 1] */
    int64_t total_bits;                 /* > 0: exact storage bits of the module with this option */
    int n_proj;
    char proj[MB_MEAS_MAX_PROJ][16];    /* "q_proj", ... in the order q k v o gate up down w1 w3 w2 */
    char setting[MB_MEAS_MAX_PROJ][96]; /* mb_qsetting_str form, e.g. "0.05:3b_64g/0.95:2b_64g" */
    struct mb_qsetting q[MB_MEAS_MAX_PROJ]; /* the same, parsed (exact shares) */
};
struct mb_meas_module {
    char name[128];                     /* "model.layers.0.self_attn" */
    int n_opts;
    struct mb_meas_option *opts;        /* [n_opts], in file order (option index = table row) */
};
struct mb_measurement {
    int n_modules;
    struct mb_meas_module *modules;     /* sorted by name (mb_measurement_find) */
    int64_t last_module_idx;            /* -1 when absent */
};
/* Read and validate a measurement.json (a regular file, at most 64 MiB). *out is owned by the caller
 * (mb_measurement_free). */
int mb_measurement_load(const char *path, struct mb_measurement **out);
/* The same from text in memory; `name` is used in messages. */
int mb_measurement_parse(const char *name, const char *text, size_t len, struct mb_measurement **out);
void mb_measurement_free(struct mb_measurement *m);
/* A module by name, NULL when the file has none. Valid while m lives. */
const struct mb_meas_module *mb_measurement_find(const struct mb_measurement *m, const char *module);
/* An option's setting string for a projection key ("q_proj", "w2", ...), NULL when absent. */
const char *mb_meas_option_setting(const struct mb_meas_option *o, const char *proj);

/* ------------------------------------------------------------------------------------------------ */
/* Hessians                                                                                         */

/* H = sum over calibration rows of x^T x (K x K, f64, upper triangle kept), with the row count, in the memory
 * of a backend (the rule of its hessian_add op). */
struct mb_hessian {
    int64_t K;
    int64_t count;
    double *H;
    const struct mb_ops *ops; /* owner of H */
};
/* ops NULL: the CPU table */
int mb_hessian_init(struct mb_hessian *h, const struct mb_ops *ops, int64_t K);
void mb_hessian_free(struct mb_hessian *h);
/* Add x [M, K] (f32, a buffer of h->ops). */
int mb_hessian_add(struct mb_hessian *h, const float *x, int64_t M);
/* a += b */
int mb_hessian_merge(struct mb_hessian *a, const struct mb_hessian *b);
/* Act order: perm[j] = index of the j-th largest diagonal entry (stable on ties). */
int mb_hessian_act_order(const struct mb_hessian *h, int32_t *perm);

/* ------------------------------------------------------------------------------------------------ */
/* GPTQ                                                                                             */

struct mb_gptq_params {
    double damp;       /* relative damping, default 0.12 of the mean diagonal */
    int max_damp_tries;/* default 10: damping added again after a failed Cholesky */
    int rtn;           /* 1: round to nearest with the same groups and scales, no error feedback */
    int keep_wq;       /* 1: also return the fake-quantized weights (mb_qresult.wq) */
    const char *name;  /* layer name for messages */
};
void mb_gptq_default_params(struct mb_gptq_params *p);

/* Result of quantizing one layer: the EXL2 ingredients and the fake-quantized weights. */
struct mb_qresult {
    int64_t K, Kp, N;   /* Kp = K rounded up to 32 */
    int G;
    int *gbits;         /* [G] */
    int64_t *grows;     /* [G] */
    uint8_t *q;         /* [Kp, N] values in permuted row order */
    uint8_t *qs;        /* [G, N] sub-scales 1..16 */
    uint16_t *scale_max;/* [G] fp16 */
    int32_t *perm;      /* [Kp] */
    float *wq;          /* [N, K] dequantized weights, original order (Hugging Face layout); only with keep_wq */
    double damp_used;
};
void mb_qresult_free(struct mb_qresult *r);

/* The part of GPTQ that depends only on the Hessian, shared by every setting (and every projection) quantized
 * with it: the act order and the upper Cholesky factor U of the damped inverse Hessian. Computed where the
 * Hessian lives (h->ops): on the CPU here, on the GPU by mb_gptq_cuda_prepare (kernels.h). Memory: two
 * Kp x Kp f64 matrices while factorizing, then U (f32). */
struct mb_gptq_prep {
    int64_t K, Kp;
    int32_t *perm;          /* [Kp] packed row j = original row perm[j] (host) */
    float *U;               /* [Kp, Kp] upper triangle, host (NULL for round-to-nearest or on the GPU) */
    struct mb_gptq_dev *dev;/* the GPU form, or NULL */
    double damp_used;       /* relative damping that made the factorization succeed */
    int rtn;
};
int mb_gptq_prepare(const struct mb_hessian *h, const struct mb_gptq_params *p, struct mb_gptq_prep *out);
void mb_gptq_prep_free(struct mb_gptq_prep *p);
/* GPTQ of W [N, K] with a prepared Hessian and a setting: the column loop with per-group scale search. A
 * host view for a CPU preparation, a device view (loaded by the CUDA table) for a GPU one. */
int mb_gptq_run(const struct mb_weight *w, const struct mb_gptq_prep *prep, const struct mb_qsetting *qs, const struct mb_gptq_params *p,
                struct mb_qresult *out);
/* prepare + run: quantize W [N, K] (a host view in any stored type) with Hessian h (K x K, from mb_hessian;
 * normalized inside) and a setting. Memory: the weight in f32 once, H twice in f64 for the factorization. */
int mb_gptq_quantize(const struct mb_weight *w, const struct mb_hessian *h, const struct mb_qsetting *qs, const struct mb_gptq_params *p,
                     struct mb_qresult *out);
/* Pack a result into EXL2 tensors, rebuild them and compare with the quantizer's values (fails with the
 * layer name when any element differs by more than 0.05, the reference converter's check). */
int mb_qresult_pack(const struct mb_qresult *r, const char *name, struct mb_exl2_packed *out);
/* Relative output error ||X W^T - X Q^T||_F / ||X W^T||_F computed from H = X^T X. */
double mb_output_error(const float *w, const float *wq, int64_t N, int64_t K, const struct mb_hessian *h);

/* ------------------------------------------------------------------------------------------------ */
/* bit allocation: one option per slot (a layer's attention or MLP), minimise the summed error under a  */
/* bit budget (multiple-choice knapsack)                                                             */

struct mb_alloc_slot {
    int n;               /* options */
    const int64_t *bits; /* [n] exact storage bits */
    const double *err;   /* [n] measured error (1 - accuracy) */
};
/* Smallest and largest total bits over all choices. */
void mb_alloc_range(const struct mb_alloc_slot *s, int ns, int64_t *min_bits, int64_t *max_bits);
/* Exact minimum: dynamic program over the Pareto frontier of (exact bits, summed error). Should the
 * frontier grow too large, a dynamic program over bits in units of budget/100000 (costs rounded up, so the
 * result fits) followed by greedy and pairwise-exchange passes. choice [ns]. */
int mb_alloc_solve(const struct mb_alloc_slot *s, int ns, int64_t budget, int *choice);
/* Simulated annealing baseline in the style of the reference converter (random single-slot moves,
 * geometric cooling, best feasible kept, then the same greedy fill). */
int mb_alloc_anneal(const struct mb_alloc_slot *s, int ns, int64_t budget, uint64_t seed, int iters, int *choice);
/* Summed error and bits of a choice. */
double mb_alloc_eval(const struct mb_alloc_slot *s, int ns, const int *choice, int64_t *bits);

/* A random EXL2 layer with the groups of `setting` (K a multiple of 32): random values, sub-scales, group
 * maxima around `scale` and a random permutation. For kernel tests and benchmarks. */
int mb_exl2_random(int64_t K, int64_t N, const char *setting, uint64_t seed, struct mb_exl2_packed *out);

#endif
