/* cli/main.c: `mixbit <command> [options]`. Argument parsing only; the work is in convert/.
 * Exit codes: 0 success, 1 bad input or failure, 2 bad usage. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../convert/convert.h"
#include "../kernels/kernels.h"
#include "args.h"

static int finish(int rc) {
    if (rc == 0) return 0;
    fprintf(stderr, "mixbit: error: %s\n", mb_errmsg()[0] ? mb_errmsg() : mb_status_str(rc));
    return rc == MB_EUSAGE ? 2 : 1;
}

/* ---- inspect ---- */
static int cmd_inspect(int argc, char **argv) {
    struct mb_inspect_params p = {0};
    int json = 0, summary = 0;
    const struct mb_opt opts[] = {
        {"json", MB_OPT_FLAG, &json, NULL, "print JSON on stdout"},
        {"summary", MB_OPT_FLAG, &summary, NULL, "no tensor table"},
        {0},
    };
    const struct mb_cmd_spec spec = {"inspect", "mixbit inspect PATH [--json] [--summary]",
                                     "Show a model's architecture, parameter count, bytes by dtype and tensor table.",
                                     "PATH is a model directory (config.json + safetensors, sharded or not, float or EXL2)\n"
                                     "or a single .safetensors file. The checkpoint is validated against config.json.",
                                     opts, 1, 1};
    const char *pos[1];
    int np, r = mb_args_parse(&spec, argc, argv, pos, &np);
    if (r) return r == 1 ? 0 : 2;
    p.path = pos[0];
    p.json = json;
    p.no_tensors = summary;
    return finish(mb_inspect(&p));
}

/* ---- tokenize ---- */
static int cmd_tokenize(int argc, char **argv) {
    struct mb_tokenize_params p = {0};
    const struct mb_opt opts[] = {
        {"text", MB_OPT_STR, &p.text, "STR", "text to encode (or ids to decode)"},
        {"file", MB_OPT_STR, &p.file, "F", "file to encode (.txt or .gz, streamed), or ids to decode"},
        {"bos", MB_OPT_FLAG, &p.bos, NULL, "prepend the BOS token"},
        {"json", MB_OPT_FLAG, &p.json, NULL, "print {\"ids\": [...], \"count\": n}"},
        {"count", MB_OPT_FLAG, &p.count, NULL, "print only the number of ids"},
        {"decode", MB_OPT_FLAG, &p.decode, NULL, "turn ids (space or comma separated) back into text"},
        {"literal", MB_OPT_FLAG, &p.literal, NULL, "do not match special tokens such as <s> in the text"},
        {0},
    };
    const struct mb_cmd_spec spec = {"tokenize", "mixbit tokenize TOKENIZER (--text STR | --file F) [--bos] [--json] [--count] [--decode]",
                                     "Encode text with a model's tokenizer.json (bit-exact with Hugging Face tokenizers), or decode ids.",
                                     "TOKENIZER is a model directory (tokenizer.json + tokenizer_config.json) or a tokenizer.json path.\n"
                                     "Example: mixbit tokenize ../shared/models/kjv-llama --text \"In the beginning\" --bos",
                                     opts, 1, 1};
    const char *pos[1];
    int np, r = mb_args_parse(&spec, argc, argv, pos, &np);
    if (r) return r == 1 ? 0 : 2;
    p.tokenizer = pos[0];
    return finish(mb_tokenize_cmd(&p));
}

/* ---- ppl ---- */
static int cmd_ppl(int argc, char **argv) {
    struct mb_ppl_cmd_params p = {0};
    const struct mb_opt opts[] = {
        {"text", MB_OPT_STR, &p.text, "FILE", "text to evaluate (.txt or .gz), tokenized whole with BOS first (required)"},
        {"convention", MB_OPT_STR, &p.convention, "NAME", "paper (default: windows of ctx, all positions scored) or llamacpp"},
        {"ctx", MB_OPT_INT, &p.ctx, "N", "context / chunk length (default 2048 paper, 512 llamacpp)"},
        {"stride", MB_OPT_INT, &p.stride, "N", "paper: window stride < ctx, scoring only new tokens"},
        {"max-tokens", MB_OPT_INT, &p.max_tokens, "N", "evaluate only the first N tokens of the stream"},
        {"batch-tokens", MB_OPT_INT, &p.batch_tokens, "N", "rows per forward batch (default 4096)"},
        {"save-logprobs", MB_OPT_STR, &p.save_logprobs, "FILE", "store top-k log-probabilities per scored position"},
        {"topk", MB_OPT_INT, &p.topk, "K", "k for --save-logprobs (default 32)"},
        {"kld", MB_OPT_STR, &p.kld, "FILE", "report KL divergence against a --save-logprobs file"},
        {"json", MB_OPT_FLAG, &p.json, NULL, "print JSON"},
        {0},
    };
    const struct mb_cmd_spec spec = {"ppl", "mixbit ppl MODEL --text FILE [--convention paper|llamacpp] [--ctx N] [--json]",
                                     "Perplexity of a model (float or EXL2) on a text, and KL divergence against a reference run.",
                                     "Examples:\n  mixbit ppl ../shared/models/kjv-llama --text ../shared/text/kjv-eval.txt --convention llamacpp --ctx 256\n"
                                     "  mixbit ppl MODEL --text T --ctx 256 --save-logprobs ref.bin && mixbit ppl QUANT --text T --ctx 256 --kld ref.bin",
                                     opts, 1, 1};
    const char *pos[1];
    int np, r = mb_args_parse(&spec, argc, argv, pos, &np);
    if (r) return r == 1 ? 0 : 2;
    if (!p.text) { fprintf(stderr, "mixbit ppl: --text is required\n"); return 2; }
    p.model = pos[0];
    return finish(mb_ppl_cmd(&p));
}

/* ---- gpu ---- */
static int cmd_gpu(int argc, char **argv) {
    const struct mb_opt opts[] = {{0}};
    const struct mb_cmd_spec spec = {"gpu", "mixbit gpu", "Say whether this binary has CUDA and whether a GPU is usable.", NULL, opts, 0, 0};
    const char *pos[1];
    int np, r = mb_args_parse(&spec, argc, argv, pos, &np);
    if (r) return r == 1 ? 0 : 2;
    char name[256];
    printf("cuda built: %s\n", mb_cuda_built() ? "yes" : "no");
    if (mb_cuda_probe(name, sizeof name) == 0) printf("gpu: %s\n", name);
    else printf("gpu: none (%s)\n", mb_errmsg());
    return 0;
}

struct command {
    const char *name;
    int (*fn)(int, char **);
    const char *summary;
};

static const struct command commands[] = {
    {"inspect", cmd_inspect, "show a model's architecture, sizes and tensors"},
    {"tokenize", cmd_tokenize, "encode text to token ids, or decode ids"},
    {"ppl", cmd_ppl, "perplexity and KL divergence on a text"},
    {"gpu", cmd_gpu, "report CUDA build and GPU availability"},
};

static void usage(FILE *f) {
    fprintf(f, "mixbit %s: quantize Hugging Face Llama / Mistral / Mixtral checkpoints to EXL2\n\n", MB_VERSION);
    fprintf(f, "usage: mixbit <command> [options]\n       mixbit <command> --help\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof *commands; i++) fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\ncommon options: -q (quiet), -v (verbose), -h/--help; --version\n"
               "results go to stdout, progress and logs to stderr; exit 0 ok, 1 failure, 2 bad usage\n");
}

int main(int argc, char **argv) {
    if (argc < 2) { usage(stderr); return 2; }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) { usage(stdout); return 0; }
    if (!strcmp(argv[1], "--version")) { printf("mixbit %s (%s)\n", MB_VERSION, mb_cuda_built() ? "CUDA" : "no CUDA"); return 0; }
    for (size_t i = 0; i < sizeof commands / sizeof *commands; i++)
        if (!strcmp(argv[1], commands[i].name)) return commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "mixbit: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
