/* cli/args.h: option parsing shared by every mixbit command (private to cli/).
 *
 * A command declares a table of options; mb_args_parse fills the pointed-to variables and collects
 * positional arguments. "--name value" and "--name=value" both work; flags take no value. -q / -v / -h /
 * --version are handled for every command.
 *
 * Exit codes: bad usage is 2 (an unknown option, a missing or malformed value, a number outside the
 * option's documented range, a value outside its set), bad input is 1 (a file that is missing or whose
 * content is wrong, a model that cannot do what was asked). Numeric options carry their range in the
 * table ([min, max], or (min, max] with MB_OPT_OPEN_MIN); it is checked when the option is parsed and
 * shown in --help. Non-finite numbers (nan, inf) are never accepted. */
#ifndef MB_CLI_ARGS_H
#define MB_CLI_ARGS_H

#include <stdint.h>

enum mb_opt_type { MB_OPT_FLAG, MB_OPT_INT, MB_OPT_DOUBLE, MB_OPT_STR };

enum { MB_OPT_OPEN_MIN = 1 }; /* the range excludes min: (min, max] */

struct mb_opt {
    const char *name; /* without dashes, e.g. "ctx" */
    enum mb_opt_type type;
    void *ptr;        /* int* for FLAG, int64_t* for INT, double* for DOUBLE, const char** for STR */
    const char *meta; /* value placeholder for help, e.g. "N" */
    const char *help;
    double min, max;  /* INT / DOUBLE: allowed range (both 0: any finite value) */
    int flags;        /* MB_OPT_OPEN_MIN */
};

struct mb_cmd_spec {
    const char *name;
    const char *usage;   /* e.g. "mixbit inspect PATH [--json]" */
    const char *summary; /* one line */
    const char *details; /* paragraphs after the usage, may be NULL */
    const struct mb_opt *opts;
    int min_pos, max_pos;
};

/* Parse argv (argv[0] is the command name). Returns 0 and fills pos/npos, 1 when help was printed
 * (exit 0), or 2 on a usage error (message printed to stderr). */
int mb_args_parse(const struct mb_cmd_spec *spec, int argc, char **argv, const char **pos, int *npos);
void mb_args_help(const struct mb_cmd_spec *spec, FILE *f);
/* A usage error after parsing (a combination of options, a value outside a set): prints
 * "mixbit CMD: MESSAGE" and the --help hint to stderr and returns 2, the exit code. */
int mb_args_usage_error(const struct mb_cmd_spec *spec, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* "mixbit 0.1.0 (CUDA)" on stdout. */
void mb_args_version(void);

#endif
