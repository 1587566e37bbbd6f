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
    int json;
};
/* Perplexity (and KL divergence) of a model on a text file; prints the result. */
int mb_ppl_cmd(const struct mb_ppl_cmd_params *p);

#endif
