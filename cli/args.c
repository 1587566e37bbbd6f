/* cli/args.c: the option parser of args.h. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/core.h"
#include "../kernels/kernels.h"
#include "args.h"

void mb_args_version(void) { printf("mixbit %s (%s)\n", MB_VERSION, mb_cuda_built() ? "CUDA" : "no CUDA"); }

static int has_range(const struct mb_opt *o) { return (o->type == MB_OPT_INT || o->type == MB_OPT_DOUBLE) && (o->min != 0 || o->max != 0); }

/* "[1..1048576]", "(0..16]" */
static void range_str(const struct mb_opt *o, char *buf, size_t n) {
    snprintf(buf, n, "%s%.15g..%.15g]", o->flags & MB_OPT_OPEN_MIN ? "(" : "[", o->min, o->max);
}

void mb_args_help(const struct mb_cmd_spec *spec, FILE *f) {
    fprintf(f, "usage: %s\n\n%s\n", spec->usage, spec->summary);
    if (spec->details) fprintf(f, "\n%s\n", spec->details);
    fprintf(f, "\noptions:\n");
    for (const struct mb_opt *o = spec->opts; o && o->name; o++) {
        char left[64], range[80] = "";
        snprintf(left, sizeof left, "--%s%s%s", o->name, o->type == MB_OPT_FLAG ? "" : " ", o->type == MB_OPT_FLAG ? "" : (o->meta ? o->meta : "X"));
        if (has_range(o)) { range[0] = ' '; range_str(o, range + 1, sizeof range - 1); }
        fprintf(f, "  %-24s %s%s\n", left, o->help, range);
    }
    fprintf(f, "  %-24s %s\n  %-24s %s\n  %-24s %s\n  %-24s %s\n", "-q, --quiet", "only errors on stderr", "-v, --verbose",
            "debug messages on stderr", "-h, --help", "this help", "--version", "print the version");
}

static int usage_err(const struct mb_cmd_spec *spec, const char *msg, const char *arg) {
    fprintf(stderr, "mixbit %s: %s%s%s\nrun 'mixbit %s --help' for usage\n", spec->name, msg, arg ? ": " : "", arg ? arg : "", spec->name);
    return 2;
}

int mb_args_usage_error(const struct mb_cmd_spec *spec, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return usage_err(spec, msg, NULL);
}

/* value outside the option's range: "--ctx must be in [2..1048576], not 0" */
static int range_err(const struct mb_cmd_spec *spec, const struct mb_opt *o, const char *val) {
    char r[80];
    range_str(o, r, sizeof r);
    return mb_args_usage_error(spec, "--%s must be in %s, not %s", o->name, r, val);
}

static int in_range(const struct mb_opt *o, double v) {
    if (!has_range(o)) return 1;
    if (o->flags & MB_OPT_OPEN_MIN ? !(v > o->min) : !(v >= o->min)) return 0;
    return v <= o->max;
}

int mb_args_parse(const struct mb_cmd_spec *spec, int argc, char **argv, const char **pos, int *npos) {
    *npos = 0;
    int only_pos = 0;
    for (int i = 1; i < argc; i++) {
        char *a = argv[i];
        if (only_pos || a[0] != '-' || a[1] == 0) {
            if (*npos >= spec->max_pos) return usage_err(spec, "unexpected argument", a);
            pos[(*npos)++] = a;
            continue;
        }
        if (!strcmp(a, "--")) { only_pos = 1; continue; }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { mb_args_help(spec, stdout); return 1; }
        if (!strcmp(a, "--version")) { mb_args_version(); return 1; }
        if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) { mb_log_level = MB_LOG_WARN; continue; }
        if (!strcmp(a, "-v") || !strcmp(a, "--verbose")) { mb_log_level = MB_LOG_DEBUG; continue; }
        if (a[1] != '-') return usage_err(spec, "unknown option", a);
        char name[64];
        const char *val = NULL, *eq = strchr(a + 2, '=');
        size_t nl = eq ? (size_t)(eq - (a + 2)) : strlen(a + 2);
        if (nl >= sizeof name) return usage_err(spec, "unknown option", a);
        memcpy(name, a + 2, nl);
        name[nl] = 0;
        if (eq) val = eq + 1;
        const struct mb_opt *o = spec->opts;
        while (o && o->name && strcmp(o->name, name)) o++;
        if (!o || !o->name) return usage_err(spec, "unknown option", a);
        if (o->type == MB_OPT_FLAG) {
            if (val) return usage_err(spec, "option takes no value", a);
            *(int *)o->ptr = 1;
            continue;
        }
        if (!val) {
            if (i + 1 >= argc) return usage_err(spec, "option needs a value", a);
            val = argv[++i];
        }
        char *end;
        errno = 0;
        switch (o->type) {
        case MB_OPT_INT: {
            long long v = strtoll(val, &end, 10);
            if (errno == ERANGE) return range_err(spec, o, val);
            if (errno || end == val || *end) return mb_args_usage_error(spec, "--%s: not an integer: %s", o->name, val);
            if (!in_range(o, (double)v) || (has_range(o) && (v < (long long)o->min || (double)v > o->max))) return range_err(spec, o, val);
            *(int64_t *)o->ptr = v;
            break;
        }
        case MB_OPT_DOUBLE: {
            double v = strtod(val, &end);
            if (end == val || *end) return mb_args_usage_error(spec, "--%s: not a number: %s", o->name, val);
            if (!isfinite(v)) return mb_args_usage_error(spec, "--%s must be a finite number, not %s", o->name, val);
            if (errno == ERANGE && v != 0) return range_err(spec, o, val); /* overflow (underflow to ~0 is harmless) */
            if (!in_range(o, v)) return range_err(spec, o, val);
            *(double *)o->ptr = v;
            break;
        }
        case MB_OPT_STR: *(const char **)o->ptr = val; break;
        default: break;
        }
    }
    if (*npos < spec->min_pos) return usage_err(spec, "missing argument", spec->usage);
    return 0;
}
