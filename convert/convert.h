/* convert/convert.h: the end-to-end jobs behind each mixbit command (inspect, tokenize, ppl, convert).
 * The CLI parses options into these params structs and calls one entry; results go to stdout, progress
 * and logs to stderr. Each entry returns 0 or a negative MB_E* status with mb_errmsg() set. */
#ifndef MB_CONVERT_H
#define MB_CONVERT_H

#include "../core/core.h"

struct mb_inspect_params {
    const char *path; /* model directory or .safetensors file */
    int json;
    int no_tensors;   /* summary only */
};
int mb_inspect(const struct mb_inspect_params *p);

struct mb_tokenize_params {
    const char *tokenizer; /* model directory or tokenizer.json */
    const char *text;      /* or */
    const char *file;      /* .txt / .gz file, streamed */
    int bos, json, count, decode, literal;
};
/* Print ids (or their count, or with decode the text of whitespace/comma separated ids). */
int mb_tokenize_cmd(const struct mb_tokenize_params *p);

struct mb_ppl_cmd_params {
    const char *model, *text;
    const char *convention; /* "paper" (default) or "llamacpp" */
    int64_t ctx, stride, max_tokens, batch_tokens, topk;
    const char *save_logprobs, *kld;
    const char *device;     /* auto / cuda / cpu */
    const char *bos;        /* "yes", "no", or NULL: the model's rule (tokenizer_config.json, else the tokenizer's default) */
    int json;
};
/* Perplexity (and KL divergence) of a model on a text file; prints the result. */
int mb_ppl_cmd(const struct mb_ppl_cmd_params *p);

struct mb_convert_weights_params {
    const char *in;  /* .bin/.pt/.pth file, a .bin.index.json, or a directory with pytorch_model.bin(.index.json) */
    const char *out; /* a directory (created; may exist empty) or a .safetensors path */
};
/* PyTorch checkpoint -> safetensors: same names, dtypes, values and sharding (model.safetensors or
 * model-0000k-of-0000N.safetensors + index), side files copied from a directory input. Atomic. */
int mb_convert_weights(const struct mb_convert_weights_params *p);

struct json_t;
struct mb_convert_params {
    const char *in, *out;
    double bpw;            /* target decoder bits per weight (default 3.5) */
    int head_bits;         /* 2, 3, 4, 5, 6 (default) or 8 */
    const char *cal;       /* calibration text (txt / jsonl / gz / directory) */
    const char *cal_field; /* jsonl field (default "text") */
    const char *cal_name;  /* name recorded in config.json and the card (default: the file's name, never a path) */
    int64_t rows, length, mrows; /* quantization rows, row length, measurement rows (0: defaults) */
    const char *eval;      /* held-out text for before/after (NULL: the calibration text's tail, see holdout) */
    double holdout;        /* without eval: this share of the calibration text's tokens (its tail, default 0.1) is
                            * never used for calibration and evaluates before/after; 0: no evaluation */
    int64_t eval_ctx, eval_tokens;
    int64_t shard_mb;      /* default 8192 */
    double max_memory_mb;  /* hidden states beyond this spill to disk (0: no limit) */
    const char *measurement; /* reuse a measurement.json */
    uint64_t seed;
    double checkpoint_interval; /* seconds between checkpoints inside the passes (0: every module) */
    int64_t min_expert_tokens;  /* MoE: rows guaranteed to every expert's Hessian (0: automatic) */
    double fail_ppl_ratio;      /* fail when ppl after / before exceeds this (0: never) */
    const char *uniform;        /* baseline: this setting for every projection, no measurement */
    int rtn;                    /* baseline: round to nearest (no GPTQ error feedback) */
    double alloc_power;         /* allocation minimises sum of err^p (default 1) */
    int extra_options;          /* add the 1:2b_32g option to both tables even when the target does not need it */
    const char *device;         /* "auto" (default: CUDA when a usable GPU is present), "cuda" or "cpu" */
    const char *base_model;     /* the source repository id for the model card (default: config.json _name_or_path) */
};
void mb_convert_default_params(struct mb_convert_params *p);
/* Run (or resume) a conversion; *report (optional) receives the summary (json_t *, caller decrefs). */
int mb_convert(const struct mb_convert_params *p, struct json_t **report);

#endif
