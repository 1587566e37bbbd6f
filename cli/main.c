/* cli/main.c: `mixbit <command> [options]`. Argument parsing only; the work is in convert/.
 * Exit codes: 0 success, 1 bad input or failure, 2 bad usage (see args.h for which is which). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <signal.h>
#include <jansson.h>

#include "../convert/convert.h"
#include "../kernels/kernels.h"
#include "../quant/quant.h"
#include "args.h"

/* Upper bounds of numeric options (documented in each --help): contexts and row lengths up to 2^20
 * tokens, calibration token counts up to 2^31 (rows x length, the sizes downstream stay inside int32
 * indexing and a sane allocation). */
#define MB_CLI_MAX_CTX 1048576
/* option tables give a range (min, max, flags) only where it applies; the others are zero */
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#define MB_CLI_MAX_TOKENS 2147483648LL

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
        {"text", MB_OPT_STR, &p.text, "FILE", "text to evaluate (.txt or .gz), tokenized whole (required)"},
        {"bos", MB_OPT_STR, &p.bos, "yes|no", "start the stream (and llamacpp chunks) with BOS (default: as the model's tokenizer does)"},
        {"device", MB_OPT_STR, &p.device, "NAME", "auto (default: the GPU when one is usable), cuda or cpu"},
        {"convention", MB_OPT_STR, &p.convention, "NAME", "paper (default: windows of ctx, all positions scored) or llamacpp"},
        {"ctx", MB_OPT_INT, &p.ctx, "N", "context / chunk length (default 2048 paper, 512 llamacpp; at most the model's positions)", 2, MB_CLI_MAX_CTX},
        {"stride", MB_OPT_INT, &p.stride, "N", "paper: window stride < ctx, scoring only new tokens", 1, MB_CLI_MAX_CTX},
        {"max-tokens", MB_OPT_INT, &p.max_tokens, "N", "evaluate only the first N tokens of the stream", 1, 1099511627776.0},
        {"batch-tokens", MB_OPT_INT, &p.batch_tokens, "N", "rows per forward batch (default 4096)", 1, 16777216},
        {"save-logprobs", MB_OPT_STR, &p.save_logprobs, "FILE", "store top-k log-probabilities per scored position"},
        {"topk", MB_OPT_INT, &p.topk, "K", "k for --save-logprobs (default 32)", 1, 4096},
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
    if (!p.text) return mb_args_usage_error(&spec, "--text is required");
    if (p.stride && p.ctx && p.stride >= p.ctx) return mb_args_usage_error(&spec, "--stride %lld must be smaller than --ctx %lld", (long long)p.stride, (long long)p.ctx);
    p.model = pos[0];
    return finish(mb_ppl_cmd(&p));
}

/* ---- convert ---- */
/* Ctrl-C during a conversion: say what was kept and how to continue (the state is checkpointed atomically,
 * so stopping at any moment is safe) */
static char g_interrupt_msg[9000];
static void on_interrupt(int sig) {
    ssize_t w = write(2, g_interrupt_msg, strlen(g_interrupt_msg));
    (void)w;
    _exit(128 + sig);
}
/* files shipped beside the binary (demo/), found through /proc/self/exe */
static const char *beside_binary(const char *rel, char *buf, size_t n) {
    char exe[4096];
    ssize_t k = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (k <= 0) return NULL;
    exe[k] = 0;
    char *sl = strrchr(exe, '/');
    if (!sl) return NULL;
    *sl = 0;
    for (int up = 0; up < 3; up++) { /* ./mixbit or build/mixbit */
        snprintf(buf, n, "%.3000s/%s", exe, rel);
        if (access(buf, R_OK) == 0) return buf;
        sl = strrchr(exe, '/');
        if (!sl) break;
        *sl = 0;
    }
    return NULL;
}

static int cmd_convert(int argc, char **argv) {
    struct mb_convert_params p;
    mb_convert_default_params(&p);
    int json = 0, no_eval = 0;
    const char *objective = NULL;
    int64_t head_bits = p.head_bits, seed = (int64_t)p.seed;
    double ckpt = p.checkpoint_interval;
    const struct mb_opt opts[] = {
        {"bpw", MB_OPT_DOUBLE, &p.bpw, "B", "target bits per weight of the decoder linears (default 3.5)", 0, 16, MB_OPT_OPEN_MIN},
        {"head-bits", MB_OPT_INT, &head_bits, "N", "bits of the output head: 2, 3, 4, 5, 6 (default) or 8"},
        {"cal", MB_OPT_STR, &p.cal, "FILE", "calibration text: .txt / .jsonl / .gz or a directory (required, but for the bundled demo model)"},
        {"cal-name", MB_OPT_STR, &p.cal_name, "NAME", "name of the calibration text in config.json and the model card (default: its file name)"},
        {"base-model", MB_OPT_STR, &p.base_model, "ID", "the source's Hub repository id for the model card (default: config.json _name_or_path)"},
        {"quantized-by", MB_OPT_STR, &p.quantized_by, "NAME", "who made this quantization, for the model card"},
        {"device", MB_OPT_STR, &p.device, "NAME", "auto (default: the GPU when one is usable), cuda or cpu"},
        {"field", MB_OPT_STR, &p.cal_field, "NAME", "jsonl field holding the text (default text)"},
        {"rows", MB_OPT_INT, &p.rows, "N", "calibration rows for quantization (default 100)", 1, MB_CLI_MAX_TOKENS},
        {"measure-rows", MB_OPT_INT, &p.mrows, "N", "calibration rows for measurement (default 16)", 1, MB_CLI_MAX_TOKENS},
        {"length", MB_OPT_INT, &p.length, "N", "tokens per row (default min(2048, max_position_embeddings))", 2, MB_CLI_MAX_CTX},
        {"measurement", MB_OPT_STR, &p.measurement, "FILE", "reuse a measurement.json and skip the measurement pass"},
        {"eval", MB_OPT_STR, &p.eval, "FILE", "text for perplexity / KLD before and after (default: the last 10% of --cal, never calibrated on)"},
        {"eval-ctx", MB_OPT_INT, &p.eval_ctx, "N", "context for the before/after perplexity (default min(2048, max positions))", 2, MB_CLI_MAX_CTX},
        {"no-eval", MB_OPT_FLAG, &no_eval, NULL, "skip the before/after evaluation"},
        {"shard-size", MB_OPT_INT, &p.shard_mb, "MB", "maximum shard size (default 8192)", 1, 1048576},
        {"max-memory", MB_OPT_DOUBLE, &p.max_memory_mb, "MB", "hidden states above this spill to disk (default 0: no limit)", 0, 1e12},
        {"min-expert-tokens", MB_OPT_INT, &p.min_expert_tokens, "N", "MoE: calibration rows guaranteed to every expert (default 0: 5% / experts)", 0, MB_CLI_MAX_TOKENS},
        {"checkpoint-interval", MB_OPT_DOUBLE, &ckpt, "SEC", "seconds between checkpoints inside the passes (default 60, 0: every module)", 0, 1e7},
        {"fail-ppl-ratio", MB_OPT_DOUBLE, &p.fail_ppl_ratio, "X", "fail when perplexity after / before exceeds X (default 10, 0: never)", 0, 1e12},
        {"seed", MB_OPT_INT, &seed, "N", "seed for calibration sampling (default 1)", 0, 1e18},
        {"uniform", MB_OPT_STR, &p.uniform, "SETTING", "baseline: one setting (e.g. 1:4b_128g) for every projection, no measurement"},
        {"rtn", MB_OPT_FLAG, &p.rtn, NULL, "baseline: round to nearest instead of GPTQ"},
        {"extra-options", MB_OPT_FLAG, &p.extra_options, NULL, "add 1:2b_32g to both option tables (more choice near the tables' minimum)"},
        {"alloc-power", MB_OPT_DOUBLE, &p.alloc_power, "P", "allocation minimises the sum of error^P over modules (default 1)", 0, 16, MB_OPT_OPEN_MIN},
        {"sens-tokens", MB_OPT_INT, &p.sens_tokens, "N", "tokens of the pass that weighs each module's error by the KL divergence it causes in the output (default 2048, 0: off, as ExLlamaV2)", 0, MB_CLI_MAX_TOKENS},
        {"objective", MB_OPT_STR, &objective, "NAME", "measurement error relative to the module's output (default, as ExLlamaV2) or to its delta (output - input)"},
        {"json", MB_OPT_FLAG, &json, NULL, "print the summary as JSON"},
        {0},
    };
    const struct mb_cmd_spec spec = {"convert", "mixbit convert IN_DIR OUT_DIR [--bpw 3.5] [--cal FILE] [options]",
                                     "Quantize a Hugging Face Llama / Mistral / Mixtral checkpoint to a mixed-bit EXL2 model.",
                                     "Stages: calibration rows, per-module measurement of the option tables, bit allocation to the\n"
                                     "target (exact knapsack), GPTQ with error propagation, EXL2 packing with a self-check, the output\n"
                                     "directory, then perplexity and KL divergence before and after. The output is built in\n"
                                     "OUT_DIR.partial and renamed when complete; rerunning the same command after an interruption\n"
                                     "continues from the last checkpoint.\n"
                                     "Example: mixbit convert demo/kjv-llama out/kjv-3.5bpw --bpw 3.5",
                                     opts, 2, 2};
    const char *pos[2];
    int np, r = mb_args_parse(&spec, argc, argv, pos, &np);
    if (r) return r == 1 ? 0 : 2;
    /* values outside a set, and products of options: usage errors too (exit 2) */
    if (head_bits < 2 || head_bits > 8 || !mb_head_option((int)head_bits)) return mb_args_usage_error(&spec, "--head-bits must be 2, 3, 4, 5, 6 or 8, not %lld", (long long)head_bits);
    {
        int64_t len = p.length > 0 ? p.length : 2048, rq = p.rows > 0 ? p.rows : 100, rm = p.mrows > 0 ? p.mrows : 16;
        if ((rq + rm) * len > MB_CLI_MAX_TOKENS) /* each factor <= 2^31: no overflow */
            return mb_args_usage_error(&spec, "(--rows %lld + --measure-rows %lld) x --length %lld = %lld calibration tokens, more than %lld", (long long)rq,
                                       (long long)rm, (long long)len, (long long)((rq + rm) * len), (long long)MB_CLI_MAX_TOKENS);
    }
    if (p.uniform) {
        struct mb_qsetting uq;
        if (mb_qsetting_parse(p.uniform, &uq)) return mb_args_usage_error(&spec, "--uniform: %s", mb_errmsg());
    }
    if (p.cal_field && !p.cal_field[0]) return mb_args_usage_error(&spec, "--field must not be empty");
    if (objective && strcmp(objective, "output") && strcmp(objective, "delta")) return mb_args_usage_error(&spec, "--objective must be output or delta, not \"%s\"", objective);
    p.objective = objective && !strcmp(objective, "delta");
    p.in = pos[0];
    p.out = pos[1];
    p.head_bits = (int)head_bits;
    p.seed = (uint64_t)seed;
    p.checkpoint_interval = ckpt;
    /* the bundled demo model comes with its own calibration and evaluation texts; any other model needs a
     * calibration text written for it (Bible verses are not a calibration set for a chat model) */
    char calb[4096], evb[4096], demo[4096], a[4096], b[4096];
    int is_demo = beside_binary("demo/kjv-llama", demo, sizeof demo) && realpath(demo, a) && realpath(p.in, b) && !strcmp(a, b);
    if (!p.cal) {
        if (!is_demo) return mb_args_usage_error(&spec, "--cal is required: a calibration text for this model (.txt / .jsonl / .gz or a directory)");
        if (!(p.cal = beside_binary("demo/calib.txt", calb, sizeof calb))) {
            fprintf(stderr, "mixbit convert: the shipped demo/calib.txt was not found\n");
            return 1;
        }
        if (!p.eval && !no_eval) p.eval = beside_binary("demo/eval.txt", evb, sizeof evb);
    }
    if (p.device && strcmp(p.device, "auto") && strcmp(p.device, "cuda") && strcmp(p.device, "cpu"))
        return mb_args_usage_error(&spec, "--device must be auto, cuda or cpu, not \"%s\"", p.device);
    if (no_eval) {
        p.eval = NULL;
        p.holdout = 0;
    }
    snprintf(g_interrupt_msg, sizeof g_interrupt_msg,
             "\nmixbit: interrupted: the work up to the last checkpoint (after every stage, and every %g s inside the passes) is kept in %s.partial; "
             "run the same command again to continue from there\n",
             ckpt, p.out);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_interrupt;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    json_t *rep = NULL;
    int rc = mb_convert(&p, &rep);
    if (rc) return finish(rc);
    if (json) {
        char *s = json_dumps(rep, JSON_INDENT(1) | JSON_PRESERVE_ORDER);
        if (s) { puts(s); free(s); }
    } else {
        printf("converted %s -> %s\n", p.in, p.out);
        printf("decoder bpw %.4f (target %.2f), head %d bits setting (%.2f bpw stored)\n", json_real_value(json_object_get(rep, "decoder_bpw")), p.bpw, p.head_bits,
               json_real_value(json_object_get(rep, "head_bpw")));
        json_t *e = json_object_get(rep, "eval");
        if (e) {
            printf("perplexity before %.4f, after %.4f (x%.4f) on %s (%lld tokens, paper, ctx %lld)\n", json_real_value(json_object_get(e, "ppl_before")),
                   json_real_value(json_object_get(e, "ppl_after")), json_real_value(json_object_get(e, "ppl_ratio")), json_string_value(json_object_get(e, "text")),
                   (long long)json_integer_value(json_object_get(e, "tokens")), (long long)json_integer_value(json_object_get(e, "ctx")));
            printf("KL divergence mean %.6f, p99 %.6f, same top-1 %.2f%%\n", json_real_value(json_object_get(e, "kld_mean")), json_real_value(json_object_get(e, "kld_p99")),
                   json_real_value(json_object_get(e, "same_top1_percent")));
        }
    }
    json_decref(rep);
    return 0;
}

/* ---- convert-weights ---- */
static int cmd_convert_weights(int argc, char **argv) {
    struct mb_convert_weights_params p = {0};
    const struct mb_opt opts[] = {{0}};
    const struct mb_cmd_spec spec = {"convert-weights", "mixbit convert-weights IN OUT",
                                     "Convert a PyTorch .bin checkpoint to safetensors without running its pickle.",
                                     "IN is a .bin file, a pytorch_model.bin.index.json, or a model directory holding\n"
                                     "pytorch_model.bin or its shards; OUT is a new (or empty) directory, or a .safetensors path.\n"
                                     "Tensor names, dtypes, values and sharding are kept; config and tokenizer files are copied\n"
                                     "when IN is a directory. The pickle is read by a restricted interpreter: anything but\n"
                                     "tensors and their storages is refused by name. The output appears only when complete.\n"
                                     "Example: mixbit convert-weights ../shared/models/stories260K-torchbin/sharded-bf16 out/bf16",
                                     opts, 2, 2};
    const char *pos[2];
    int np, r = mb_args_parse(&spec, argc, argv, pos, &np);
    if (r) return r == 1 ? 0 : 2;
    p.in = pos[0];
    p.out = pos[1];
    return finish(mb_convert_weights(&p));
}

/* ---- card ---- */
static int cmd_card(int argc, char **argv) {
    struct mb_card_params p = {0};
    const struct mb_opt opts[] = {
        {"base-model", MB_OPT_STR, &p.base_model, "ID", "Hub repository id of the source model (default: from the report)"},
        {"quantized-by", MB_OPT_STR, &p.quantized_by, "NAME", "who made this quantization (default: from the report, else left out)"},
        {0},
    };
    const struct mb_cmd_spec spec = {"card", "mixbit card OUT_DIR [--base-model ID] [--quantized-by NAME]",
                                     "Write the model card (README.md) and bit-allocation chart (mixbit-bits.svg) of a converted model.",
                                     "Both are built from OUT_DIR/mixbit-report.json alone, so they can be re-created at any time.\n"
                                     "When OUT_DIR has a " MB_MANIFEST_NAME ", the entries of the two files are updated in it.\n"
                                     "Example: mixbit card out/kjv-3.5bpw --base-model mixbit-dev/kjv-llama --quantized-by me",
                                     opts, 1, 1};
    const char *pos[1];
    int np, r = mb_args_parse(&spec, argc, argv, pos, &np);
    if (r) return r == 1 ? 0 : 2;
    int rc = mb_card_write(pos[0], &p);
    char mp[4200];
    snprintf(mp, sizeof mp, "%s/%s", pos[0], MB_MANIFEST_NAME);
    const char *names[] = {"README.md", "mixbit-bits.svg"};
    if (!rc && mb_file_exists(mp)) rc = mb_manifest_refresh(pos[0], names, 2);
    if (!rc) printf("wrote %s/README.md and %s/mixbit-bits.svg\n", pos[0], pos[0]);
    return finish(rc);
}

/* ---- verify ---- */
static int cmd_verify(int argc, char **argv) {
    const struct mb_opt opts[] = {{0}};
    const struct mb_cmd_spec spec = {"verify", "mixbit verify OUT_DIR",
                                     "Check a converted model: files against " MB_MANIFEST_NAME ", tensors against config.json, EXL2 structure.",
                                     "Every file of the manifest is re-hashed (size, then SHA-256; a missing or extra file is a problem),\n"
                                     "the safetensors headers are checked and every tensor config.json implies must be present with its\n"
                                     "dtype and shape, and every EXL2 layer must unpack (group table, permutation, finite scales).\n"
                                     "Exit 0 with one line on stdout when all holds, 1 naming the first problem.",
                                     opts, 1, 1};
    const char *pos[1];
    int np, r = mb_args_parse(&spec, argc, argv, pos, &np);
    if (r) return r == 1 ? 0 : 2;
    struct mb_verify_info vi;
    int rc = mb_verify_ex(pos[0], &vi);
    if (!rc)
        printf("OK %s: %d files (%.1f MB) match %s; %s, %d tensors, %d EXL2 layers valid\n", pos[0], vi.files, vi.bytes / 1e6, MB_MANIFEST_NAME, vi.arch,
               vi.tensors, vi.exl2_layers);
    return finish(rc);
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
    if (mb_cuda_probe(name, sizeof name) == 0) {
        size_t fr = 0, tot = 0;
        mb_cuda_mem_info(&fr, &tot);
        printf("gpu: %s, %.1f GB of memory, %.1f GB free\n", name, tot / 1e9, fr / 1e9);
        const struct mb_ops *o;
        if (mb_cuda_libs_check() || mb_ops_cuda(&o)) {
            printf("gpu libraries: %s\nevery stage runs on the CPU\n", mb_errmsg());
            return 0;
        }
        printf("gpu libraries: cuBLAS, cuSOLVER loaded\n");
        printf("with --device auto (the default), on the GPU: convert (calibration forward passes, Hessians, measurement of every option,\n"
               "the sensitivity pass, GPTQ, the quantized forward, the head, the before/after evaluation) and ppl; on the CPU: tokenizing,\n"
               "allocation, EXL2 packing and its self-check, writing the output\n");
    } else {
        printf("gpu: none (%s)\n", mb_errmsg());
        printf("every stage runs on the CPU (--device auto)\n");
    }
    return 0;
}

struct command {
    const char *name;
    int (*fn)(int, char **);
    const char *summary;
};

static const struct command commands[] = {
    {"inspect", cmd_inspect, "show a model's architecture, sizes and tensors"},
    {"convert", cmd_convert, "quantize a model to EXL2 and measure perplexity before and after"},
    {"tokenize", cmd_tokenize, "encode text to token ids, or decode ids"},
    {"ppl", cmd_ppl, "perplexity and KL divergence on a text"},
    {"convert-weights", cmd_convert_weights, "PyTorch .bin checkpoint to safetensors (pickle never run)"},
    {"card", cmd_card, "write the model card and bit-allocation chart of a converted model"},
    {"verify", cmd_verify, "check a converted model against its manifest, config and EXL2 rules"},
    {"gpu", cmd_gpu, "report CUDA build and GPU availability"},
};

static void usage(FILE *f) {
    fprintf(f, "mixbit %s: quantize Hugging Face Llama / Mistral / Mixtral checkpoints to EXL2\n\n", MB_VERSION);
    fprintf(f, "usage: mixbit <command> [options]\n       mixbit <command> --help\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof *commands; i++) fprintf(f, "  %-16s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\ncommon options: -q (quiet), -v (verbose), -h/--help; --version\n"
               "results go to stdout, progress and logs to stderr; exit 0 ok, 1 failure, 2 bad usage\n");
}

/* OpenMP threads that wait for work spin for a while by default (libgomp: about 300,000 iterations). On a
 * machine shared with another busy process that turns every barrier into a fight for the cores: the demo
 * conversion took 7 min 43 s instead of 50 s next to one busy process. libgomp reads its settings before
 * main() runs, so mixbit sets OMP_WAIT_POLICY=passive (threads sleep at once) and re-executes itself, unless
 * the user chose a policy (OMP_WAIT_POLICY or GOMP_SPINCOUNT set). Costs and gains: bench/RESULTS.md. */
static void wait_policy(char **argv) {
    if (getenv("OMP_WAIT_POLICY") || getenv("GOMP_SPINCOUNT")) return;
    if (setenv("OMP_WAIT_POLICY", "passive", 1)) return;
    execv("/proc/self/exe", argv);
    /* exec failed (no /proc): go on with the default policy */
}

int main(int argc, char **argv) {
    wait_policy(argv);
    /* a file size limit (full disk simulation, quotas) makes writes fail with EFBIG instead of killing us */
    signal(SIGXFSZ, SIG_IGN);
    if (argc < 2) { usage(stderr); return 2; }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) { usage(stdout); return 0; }
    if (!strcmp(argv[1], "--version")) { mb_args_version(); return 0; }
    for (size_t i = 0; i < sizeof commands / sizeof *commands; i++)
        if (!strcmp(argv[1], commands[i].name)) return commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "mixbit: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
