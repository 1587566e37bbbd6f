/* cli/args.c: the option parser of args.h. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/core.h"
#include "args.h"

void mb_args_help(const struct mb_cmd_spec *spec, FILE *f) {
    fprintf(f, "usage: %s\n\n%s\n", spec->usage, spec->summary);
    if (spec->details) fprintf(f, "\n%s\n", spec->details);
    fprintf(f, "\noptions:\n");
    for (const struct mb_opt *o = spec->opts; o && o->name; o++) {
        char left[64];
        snprintf(left, sizeof left, "--%s%s%s", o->name, o->type == MB_OPT_FLAG ? "" : " ", o->type == MB_OPT_FLAG ? "" : (o->meta ? o->meta : "X"));
        fprintf(f, "  %-24s %s\n", left, o->help);
    }
    fprintf(f, "  %-24s %s\n  %-24s %s\n  %-24s %s\n", "-q, --quiet", "only errors on stderr", "-v, --verbose",
            "debug messages on stderr", "-h, --help", "this help");
}

static int usage_err(const struct mb_cmd_spec *spec, const char *msg, const char *arg) {
    fprintf(stderr, "mixbit %s: %s%s%s\nrun 'mixbit %s --help' for usage\n", spec->name, msg, arg ? ": " : "", arg ? arg : "", spec->name);
    return 2;
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
            if (errno || end == val || *end) return usage_err(spec, "not an integer", val);
            *(int64_t *)o->ptr = v;
            break;
        }
        case MB_OPT_DOUBLE: {
            double v = strtod(val, &end);
            if (errno || end == val || *end) return usage_err(spec, "not a number", val);
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
