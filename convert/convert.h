/* convert/convert.h: the end-to-end jobs behind each mixbit command (inspect, tokenize, ppl, convert, card, verify).
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
    int objective;              /* measurement: 0 relative error of the module output (ExLlamaV2's), 1 of its delta */
    int64_t sens_tokens;        /* tokens of the output-sensitivity pass that weights the allocation (-1: default, 0: off) */
    int extra_options;          /* add the 1:2b_32g option to both tables even when the target does not need it */
    const char *device;         /* "auto" (default: CUDA when a usable GPU is present), "cuda" or "cpu" */
    const char *base_model;     /* the source repository id for the model card (default: config.json _name_or_path) */
    const char *quantized_by;   /* for the model card (default: left out) */
};
void mb_convert_default_params(struct mb_convert_params *p);
/* Run (or resume) a conversion; *report (optional) receives the summary (json_t *, caller decrefs). */
int mb_convert(const struct mb_convert_params *p, struct json_t **report);

/* ---- the published repository (convert/card.c, convert/manifest.c) ---- */

/* Model card overrides; NULL fields fall back to the report's "base_model" / "quantized_by". */
/* 1 when id is a valid Hugging Face Hub repository id ("org/name") */
int mb_hub_repo_id_ok(const char *id);
struct mb_card_params {
    const char *base_model;   /* Hub repo id of the source model ("org/name"); an invalid id is MB_EUSAGE */
    const char *quantized_by; /* who made this quantization; omitted from the card when unknown */
};
/* Write OUT_DIR/mixbit-bits.svg (bits per weight per layer for attention and MLP/MoE, the target, the
 * measured error of the chosen options) and OUT_DIR/README.md (Hub front matter, results table, how to load
 * it, the chart, the source model's card) from OUT_DIR/mixbit-report.json alone, both atomically. Names a
 * file only by its base name: no path of the converting machine appears. p may be NULL. */
int mb_card_write(const char *out_dir, const struct mb_card_params *p);

#define MB_MANIFEST_NAME "mixbit-manifest.json"
/* Write OUT_DIR/mixbit-manifest.json atomically: {"files": [{"path", "bytes", "sha256"}]} sorted by path,
 * every regular file under OUT_DIR except the manifest and names starting with '.'. Call it last. */
int mb_manifest_write(const char *out_dir);
/* Re-hash the named files (relative to OUT_DIR) into an existing manifest, adding them when absent, and
 * leave every other entry as it was (`mixbit card` after the manifest was written). */
int mb_manifest_refresh(const char *out_dir, const char *const *names, int n);

/* Check an output directory: every file of the manifest present with its size and SHA-256 and no other
 * file; the safetensors headers and every tensor config.json implies with its dtype and shape
 * (mb_model_open); every EXL2 layer through mb_exl2_from_set / mb_exl2_validate and its q_scale_max
 * finite and > 0. Returns 0, or MB_EFORMAT (or the I/O status) with a message naming the first problem. */
int mb_verify(const char *out_dir);
struct mb_verify_info {
    int files, tensors, exl2_layers;
    int64_t bytes;
    char arch[64];
};
/* The same, filling *info (optional) for a summary line. */
int mb_verify_ex(const char *out_dir, struct mb_verify_info *info);

#endif
