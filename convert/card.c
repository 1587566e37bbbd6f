/* convert/card.c: the model card (OUT_DIR/README.md) and the bit-allocation chart (OUT_DIR/mixbit-bits.svg),
 * built from OUT_DIR/mixbit-report.json alone, so `mixbit card OUT_DIR` can re-create them. See convert.h.
 *
 * Report keys read (missing optional ones are left out of the card; reports from before the card existed
 * have "calibration" as a string and rows/length/measurement_rows at the top level, "model" and eval
 * "text" as paths, and no per-module "error"):
 *   name, model, base_model, license, quantized_by, target_bpw (required), decoder_bpw (required),
 *   head_bits, head_bpw, device, mixbit_version, date, seconds, source_card,
 *   calibration {name, rows, length, measurement_rows},
 *   eval {text, convention, ctx, tokens, bos, ppl_before, ppl_after, ppl_ratio, kld_mean, kld_p99, same_top1_percent},
 *   modules [{module, option, bpw, accuracy, error}] (required).
 * Every file is named by its base name: no path of the converting machine reaches the card.
 *
 * Text put into YAML is double-quoted with escapes; into Markdown, backslash-escaped; into SVG, XML-escaped;
 * invalid UTF-8 and control characters never pass through. */
#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "../formats/formats.h"
#include "convert.h"

#define REPORT_MAX ((size_t)256 << 20) /* the report holds the source card: allow a long one */

/* ---------------------------------------------------------------------------------------------- */
/* a growing string                                                                                */

struct sb {
    char *s;
    size_t n, cap;
    int oom;
};

static void sb_free(struct sb *b) { free(b->s); memset(b, 0, sizeof *b); }

static void sb_put(struct sb *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n + 1) cap *= 2;
        char *t = realloc(b->s, cap);
        if (!t) { b->oom = 1; return; }
        b->s = t;
        b->cap = cap;
    }
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = 0;
}

static void sb_puts(struct sb *b, const char *s) { sb_put(b, s, strlen(s)); }

__attribute__((format(printf, 2, 3))) static void sb_printf(struct sb *b, const char *fmt, ...) {
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (k < 0) return;
    if ((size_t)k < sizeof tmp) { sb_put(b, tmp, (size_t)k); return; }
    char *big = malloc((size_t)k + 1);
    if (!big) { b->oom = 1; return; }
    va_start(ap, fmt);
    vsnprintf(big, (size_t)k + 1, fmt, ap);
    va_end(ap);
    sb_put(b, big, (size_t)k);
    free(big);
}

/* ---------------------------------------------------------------------------------------------- */
/* UTF-8 and escaping                                                                              */

/* next code point of s[*i..n): the value, or -1 for an invalid byte (one byte consumed) */
static long next_cp(const unsigned char *s, size_t n, size_t *i) {
    unsigned c = s[*i];
    int len = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
    if (!len || *i + (size_t)len > n) { (*i)++; return -1; }
    long v = len == 1 ? (long)c : len == 2 ? (long)(c & 0x1F) : len == 3 ? (long)(c & 0x0F) : (long)(c & 0x07);
    for (int k = 1; k < len; k++) {
        if ((s[*i + k] & 0xC0) != 0x80) { (*i)++; return -1; }
        v = (v << 6) | (s[*i + k] & 0x3F);
    }
    static const long min[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (v < min[len] || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) { (*i)++; return -1; }
    *i += (size_t)len;
    return v;
}

static void put_utf8(struct sb *b, long v) {
    char u[4];
    if (v < 0x80) { u[0] = (char)v; sb_put(b, u, 1); }
    else if (v < 0x800) { u[0] = (char)(0xC0 | (v >> 6)); u[1] = (char)(0x80 | (v & 0x3F)); sb_put(b, u, 2); }
    else if (v < 0x10000) { u[0] = (char)(0xE0 | (v >> 12)); u[1] = (char)(0x80 | ((v >> 6) & 0x3F)); u[2] = (char)(0x80 | (v & 0x3F)); sb_put(b, u, 3); }
    else { u[0] = (char)(0xF0 | (v >> 18)); u[1] = (char)(0x80 | ((v >> 12) & 0x3F)); u[2] = (char)(0x80 | ((v >> 6) & 0x3F)); u[3] = (char)(0x80 | (v & 0x3F)); sb_put(b, u, 4); }
}

/* a YAML double-quoted scalar: printable characters as they are, '"' and '\' escaped, control and
 * non-printable characters (C0, DEL, C1, U+2028/9, BOM) as \uXXXX, invalid UTF-8 as U+FFFD */
static void yaml_quote(struct sb *b, const char *str) {
    const unsigned char *s = (const unsigned char *)str;
    size_t n = strlen(str), i = 0;
    sb_puts(b, "\"");
    while (i < n) {
        long v = next_cp(s, n, &i);
        if (v < 0) v = 0xFFFD;
        if (v == '"') sb_puts(b, "\\\"");
        else if (v == '\\') sb_puts(b, "\\\\");
        else if (v < 0x20 || (v >= 0x7F && v <= 0x9F) || v == 0x2028 || v == 0x2029 || v == 0xFEFF || v == 0xFFFE || v == 0xFFFF) sb_printf(b, "\\u%04lx", v);
        else put_utf8(b, v);
    }
    sb_puts(b, "\"");
}

/* XML text or attribute value; characters XML 1.0 forbids are dropped, invalid UTF-8 becomes U+FFFD */
static void xml_escape(struct sb *b, const char *str) {
    const unsigned char *s = (const unsigned char *)str;
    size_t n = strlen(str), i = 0;
    while (i < n) {
        long v = next_cp(s, n, &i);
        if (v < 0) v = 0xFFFD;
        if (v == '&') sb_puts(b, "&amp;");
        else if (v == '<') sb_puts(b, "&lt;");
        else if (v == '>') sb_puts(b, "&gt;");
        else if (v == '"') sb_puts(b, "&quot;");
        else if (v == '\'') sb_puts(b, "&#39;");
        else if ((v < 0x20 && v != '\t') || v == 0xFFFE || v == 0xFFFF) continue;
        else put_utf8(b, v);
    }
}

/* Markdown inline text: ASCII punctuation with a meaning backslash-escaped, line breaks as spaces, control
 * characters dropped */
static void md_escape(struct sb *b, const char *str) {
    const unsigned char *s = (const unsigned char *)str;
    size_t n = strlen(str), i = 0;
    while (i < n) {
        long v = next_cp(s, n, &i);
        if (v < 0) v = 0xFFFD;
        if (v == '\n' || v == '\r' || v == '\t') sb_puts(b, " ");
        else if (v < 0x20 || (v >= 0x7F && v <= 0x9F)) continue;
        else if (v < 0x80 && strchr("\\`*_{}[]<>()#+!|&~", (int)v)) { char e[2] = {'\\', (char)v}; sb_put(b, e, 2); }
        else put_utf8(b, v);
    }
}

/* the last component of a path ('/' or '\'), trailing separators ignored; into out */
static void base_name(const char *p, char *out, size_t n) {
    size_t len = strlen(p);
    while (len > 1 && (p[len - 1] == '/' || p[len - 1] == '\\')) len--;
    size_t st = len;
    while (st > 0 && p[st - 1] != '/' && p[st - 1] != '\\') st--;
    size_t k = len - st < n - 1 ? len - st : n - 1;
    memcpy(out, p + st, k);
    out[k] = 0;
}

/* A Hub repository id: "name" or "namespace/name", each part 1..96 of [A-Za-z0-9_.-], not starting or
 * ending with '-' or '.', without "--" or ".." (the Hub's own rule for repo ids) */
int mb_hub_repo_id_ok(const char *id) {
    const char *slash = strchr(id, '/');
    if (slash && strchr(slash + 1, '/')) return 0;
    for (int part = 0; part < (slash ? 2 : 1); part++) {
        const char *s = part == 0 ? id : slash + 1, *e = part == 0 && slash ? slash : s + strlen(s);
        size_t n = (size_t)(e - s);
        if (n < 1 || n > 96) return 0;
        if (s[0] == '-' || s[0] == '.' || e[-1] == '-' || e[-1] == '.') return 0;
        for (const char *c = s; c < e; c++) {
            if (!(isalnum((unsigned char)*c) || *c == '_' || *c == '.' || *c == '-')) return 0;
            if (c + 1 < e && (c[0] == '-' || c[0] == '.') && c[1] == c[0]) return 0;
        }
    }
    return 1;
}

/* Hub license ids are lowercase letters, digits and . - + ("apache-2.0", "cc-by-nc-4.0", "llama3.1",
 * "openrail++", "other"); anything else would be refused by the Hub */
static int license_id_ok(const char *s) {
    if (!*s || strlen(s) > 64 || !(islower((unsigned char)*s) || isdigit((unsigned char)*s))) return 0;
    for (; *s; s++)
        if (!(islower((unsigned char)*s) || isdigit((unsigned char)*s) || *s == '.' || *s == '-' || *s == '+')) return 0;
    return 1;
}

/* ---------------------------------------------------------------------------------------------- */
/* the source card's front matter                                                                  */

/* Split a Markdown card into its YAML front matter (between a first line "---" and the next "---" or
 * "..." line) and its body. Without a closed front matter, fm is empty and the body is the whole text. */
static void split_front_matter(const char *text, const char **fm, size_t *fm_len, const char **body) {
    const char *t = text;
    if (!strncmp(t, "\xEF\xBB\xBF", 3)) t += 3; /* BOM */
    *fm = "";
    *fm_len = 0;
    *body = t;
    size_t l0 = strcspn(t, "\n");
    if (!(l0 >= 3 && !strncmp(t, "---", 3) && strspn(t + 3, " \t\r") == l0 - 3) || !t[l0]) return;
    const char *s = t + l0 + 1;
    for (const char *line = s; *line;) {
        size_t ll = strcspn(line, "\n");
        if (ll >= 3 && (!strncmp(line, "---", 3) || !strncmp(line, "...", 3)) && strspn(line + 3, " \t\r") == ll - 3) {
            *fm = s;
            *fm_len = (size_t)(line - s);
            const char *b = line + ll;
            while (*b == '\n' || *b == '\r') b++;
            *body = b;
            return;
        }
        line += ll;
        if (*line) line++;
    }
}

/* A top-level scalar `key: value` of front matter (quotes removed, "# comment" dropped); for a block list
 * (`key:` followed by "- item" lines) its first item. Returns 1 when found and non-empty. */
static int fm_scalar(const char *fm, size_t fm_len, const char *key, char *out, size_t n) {
    size_t kl = strlen(key);
    const char *end = fm + fm_len;
    for (const char *line = fm; line < end;) {
        const char *nl = memchr(line, '\n', (size_t)(end - line));
        const char *le = nl ? nl : end;
        if ((size_t)(le - line) > kl && !strncmp(line, key, kl) && line[kl] == ':') {
            const char *v = line + kl + 1;
            while (v < le && (*v == ' ' || *v == '\t')) v++;
            const char *ve = le;
            if (v == ve && nl) { /* block list: the first "- item" line */
                const char *l2 = nl + 1, *nl2 = memchr(l2, '\n', (size_t)(end - l2));
                const char *le2 = nl2 ? nl2 : end;
                while (l2 < le2 && (*l2 == ' ' || *l2 == '\t')) l2++;
                if (l2 < le2 && *l2 == '-') { v = l2 + 1; ve = le2; while (v < ve && (*v == ' ' || *v == '\t')) v++; }
            }
            char q = v < ve ? *v : 0;
            if (q == '"' || q == '\'') {
                const char *c = memchr(v + 1, q, (size_t)(ve - v - 1));
                if (!c) return 0;
                v++;
                ve = c;
            } else {
                for (const char *c = v; c < ve; c++)
                    if (*c == '#' && (c == v || c[-1] == ' ' || c[-1] == '\t')) { ve = c; break; }
            }
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t' || ve[-1] == '\r')) ve--;
            size_t k = (size_t)(ve - v);
            if (!k || k >= n) return 0;
            memcpy(out, v, k);
            out[k] = 0;
            return 1;
        }
        line = nl ? nl + 1 : end;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* the report                                                                                      */

static const char *jstr(const json_t *o, const char *k) { return json_string_value(json_object_get(o, k)); }
static int jnum(const json_t *o, const char *k, double *v) {
    json_t *x = json_object_get(o, k);
    if (!json_is_number(x)) return 0;
    *v = json_number_value(x);
    return isfinite(*v);
}

/* per layer: bits per weight and measured error of the attention and MLP/MoE modules (NAN when absent) */
struct layers {
    int n;
    double *attn_bpw, *ffn_bpw, *attn_err, *ffn_err;
    int moe;
};

static void layers_free(struct layers *L) {
    free(L->attn_bpw);
    memset(L, 0, sizeof *L);
}

/* measured: 0 for a baseline conversion (--uniform), whose report carries no measured error */
static int read_layers(const char *rp, const json_t *mods, int measured, struct layers *L) {
    memset(L, 0, sizeof *L);
    size_t nm = json_array_size(mods);
    if (!json_is_array(mods) || nm == 0) return mb_fail(MB_EFORMAT, "%s: no \"modules\" array", rp);
    int n = 0;
    for (size_t i = 0; i < nm; i++) {
        const char *name = jstr(json_array_get(mods, i), "module");
        int l;
        if (!name || sscanf(name, "model.layers.%d.", &l) != 1 || l < 0 || l > 100000) l = (int)(i / 2);
        if (l + 1 > n) n = l + 1;
    }
    double *a = malloc((size_t)n * 4 * sizeof *a);
    if (!a) return mb_fail(MB_ENOMEM, "out of memory");
    for (int i = 0; i < 4 * n; i++) a[i] = NAN;
    L->n = n;
    L->attn_bpw = a;
    L->ffn_bpw = a + n;
    L->attn_err = a + 2 * n;
    L->ffn_err = a + 3 * n;
    for (size_t i = 0; i < nm; i++) {
        const json_t *o = json_array_get(mods, i);
        const char *name = jstr(o, "module");
        int l, attn;
        if (name && sscanf(name, "model.layers.%d.", &l) == 1 && l >= 0 && l < n) attn = strstr(name, "self_attn") != NULL;
        else { l = (int)(i / 2); attn = i % 2 == 0; }
        if (name && strstr(name, "block_sparse_moe")) L->moe = 1;
        double bpw, acc, err;
        if (!jnum(o, "bpw", &bpw)) { layers_free(L); return mb_fail(MB_EFORMAT, "%s: modules[%zu] has no bpw", rp, i); }
        if (!jnum(o, "error", &err)) err = jnum(o, "accuracy", &acc) ? 1.0 - acc : NAN;
        if (!measured) err = NAN;
        (attn ? L->attn_bpw : L->ffn_bpw)[l] = bpw;
        (attn ? L->attn_err : L->ffn_err)[l] = err;
    }
    return 0;
}

/* "3.5", "4.0", "2.25": up to three decimals, at least one */
static void fmt_bpw(double x, char *out, size_t n) {
    snprintf(out, n, "%.3f", x);
    char *dot = strchr(out, '.');
    if (!dot) return;
    char *e = out + strlen(out) - 1;
    while (e > dot + 1 && *e == '0') *e-- = 0;
}

/* 12345 -> "12,345" */
static void fmt_count(long long v, char *out, size_t n) {
    char d[32];
    snprintf(d, sizeof d, "%lld", v < 0 ? -v : v);
    size_t nd = strlen(d), k = 0;
    if (v < 0 && k + 1 < n) out[k++] = '-';
    for (size_t i = 0; i < nd && k + 2 < n; i++) {
        out[k++] = d[i];
        if ((nd - i - 1) % 3 == 0 && i + 1 < nd) out[k++] = ',';
    }
    out[k] = 0;
}

static void fmt_duration(double s, char *out, size_t n) {
    if (s < 60) snprintf(out, n, "%.0f s", s);
    else if (s < 3600) snprintf(out, n, "%d min %d s", (int)(s / 60), (int)fmod(s, 60));
    else snprintf(out, n, "%d h %d min", (int)(s / 3600), (int)fmod(s / 60, 60));
}

/* ---------------------------------------------------------------------------------------------- */
/* the chart                                                                                       */

/* Colours, chosen for a light neutral panel that reads the same on the Hub's light and dark themes (the
 * panel carries its own background, so no colour depends on the page's): text #1e293b on #f8fafc is
 * 14:1; blue #2563eb and orange #ea580c are told apart with every common colour-vision deficiency; the
 * error dots are near-black with a white ring so they stay visible on top of either bar colour. */
#define C_PANEL "#f8fafc"
#define C_BORDER "#94a3b8"
#define C_TEXT "#1e293b"
#define C_MUTED "#475569"
#define C_GRID "#e2e8f0"
#define C_AXIS "#64748b"
#define C_ATTN "#2563eb"
#define C_FFN "#ea580c"
#define C_TARGET "#dc2626"
#define C_DOT "#0f172a"

/* name cut to at most max code points (with an ellipsis) */
static void clip_cp(const char *s, size_t max, char *out, size_t n) {
    size_t i = 0, len = strlen(s), cps = 0, cut = 0;
    while (i < len) {
        if (cps == max) { cut = 1; break; }
        next_cp((const unsigned char *)s, len, &i);
        cps++;
    }
    size_t k = i < n - 4 ? i : n - 4;
    memcpy(out, s, k);
    out[k] = 0;
    if (cut) strcat(out, "\xE2\x80\xA6");
}

static void svg_text(struct sb *b, double x, double y, const char *anchor, int size, const char *fill, const char *extra, const char *text) {
    sb_printf(b, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"%s\" font-size=\"%d\" fill=\"%s\"%s%s>", x, y, anchor, size, fill, extra ? " " : "", extra ? extra : "");
    xml_escape(b, text);
    sb_puts(b, "</text>\n");
}

static int chart_svg(const char *name, double target, double decoder_bpw, const struct layers *L, struct sb *b) {
    const double W = 880, H = 460, x0 = 72, x1 = W - 92, y0 = 74, y1 = H - 104;
    const int n = L->n;
    /* left axis: bits per weight, 0 .. ymax */
    double vmax = target;
    for (int l = 0; l < n; l++) {
        if (L->attn_bpw[l] > vmax) vmax = L->attn_bpw[l];
        if (L->ffn_bpw[l] > vmax) vmax = L->ffn_bpw[l];
    }
    int ymax = (int)ceil(vmax + 0.25), ystep = ymax > 10 ? 2 : 1;
    if (ymax % ystep) ymax += ystep - ymax % ystep;
#define YB(v) (y1 - (y1 - y0) * (v) / ymax)
    /* right axis: the measured error, log scale when it spans more than a decade */
    double emin = INFINITY, emax = 0;
    for (int l = 0; l < n; l++) {
        double e[2] = {L->attn_err[l], L->ffn_err[l]};
        for (int k = 0; k < 2; k++)
            if (isfinite(e[k]) && e[k] > 0) { if (e[k] < emin) emin = e[k]; if (e[k] > emax) emax = e[k]; }
    }
    int have_err = emax > 0, elog = have_err && emax / emin > 10;
    double elo = 0, ehi = 1, estep = 1; /* log: decades elo..ehi; linear: 0..ehi by estep */
    if (elog) {
        elo = floor(log10(emin));
        ehi = ceil(log10(emax));
        if (ehi <= elo) ehi = elo + 1;
        estep = ehi - elo > 6 ? 2 : 1;
    } else if (have_err) {
        double mag = pow(10, floor(log10(emax)));
        double steps[] = {0.2, 0.25, 0.5, 1, 2, 2.5, 5, 10};
        for (int i = 0; i < 8; i++) { estep = steps[i] * mag; if (emax / estep <= 5) break; }
        ehi = ceil(emax / estep) * estep;
    }
    double ey_scale = y1 - y0;
#define YE(v) (elog ? y1 - ey_scale * (log10((v) > 0 ? (v) : pow(10, elo)) - elo) / (ehi - elo) : y1 - ey_scale * (v) / ehi)

    char tb[64], nm[256], line[512];
    fmt_bpw(target, tb, sizeof tb);
    clip_cp(name, 48, nm, sizeof nm);
    sb_printf(b, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
                 "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
                 "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\" role=\"img\">\n",
              W, H, W, H);
    snprintf(line, sizeof line, "Bits per weight by layer: %s, EXL2 %s bpw", nm, tb);
    sb_puts(b, "<title>");
    xml_escape(b, line);
    sb_puts(b, "</title>\n<desc>Per decoder layer, the bits per weight of the attention and ");
    sb_puts(b, L->moe ? "MoE" : "MLP");
    sb_puts(b, " modules chosen by mixbit, the target as a dashed line, and the measured error of each chosen option as dots on the right-hand axis.</desc>\n");
    sb_printf(b, "<rect x=\"0.5\" y=\"0.5\" width=\"%.0f\" height=\"%.0f\" rx=\"10\" fill=\"%s\" stroke=\"%s\"/>\n", W - 1, H - 1, C_PANEL, C_BORDER);
    svg_text(b, W / 2, 30, "middle", 17, C_TEXT, "font-weight=\"bold\"", line);
    char db[64];
    fmt_bpw(decoder_bpw, db, sizeof db);
    if (have_err) snprintf(line, sizeof line, "decoder average %s bpw; one bar per module (its chosen option), one dot per module (that option's measured error)", db);
    else snprintf(line, sizeof line, "decoder average %s bpw; one bar per module (no measured error in this report)", db);
    svg_text(b, W / 2, 52, "middle", 12, C_MUTED, NULL, line);
    /* grid and left axis */
    for (int v = 0; v <= ymax; v += ystep) {
        double y = YB(v);
        sb_printf(b, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\"/>\n", x0, y, x1, y, C_GRID);
        snprintf(line, sizeof line, "%d", v);
        svg_text(b, x0 - 8, y + 4, "end", 12, C_TEXT, NULL, line);
    }
    char attr[128];
    snprintf(attr, sizeof attr, "transform=\"rotate(-90 20 %.0f)\"", (y0 + y1) / 2);
    svg_text(b, 20, (y0 + y1) / 2, "middle", 13, C_TEXT, attr, "bits per weight");
    /* bars */
    double gw = (x1 - x0) / n, bw = gw * 0.36;
    for (int l = 0; l < n; l++) {
        double gx = x0 + gw * l;
        double v[2] = {L->attn_bpw[l], L->ffn_bpw[l]};
        const char *col[2] = {C_ATTN, C_FFN};
        for (int k = 0; k < 2; k++) {
            if (!isfinite(v[k])) continue;
            double x = gx + gw * (k == 0 ? 0.13 : 0.51), y = YB(v[k] < ymax ? v[k] : ymax);
            sb_printf(b, "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"%s\"><title>layer %d %s: %.3f bpw</title></rect>\n", x, y, bw,
                      y1 - y, col[k], l, k == 0 ? "attention" : L->moe ? "MoE" : "MLP", v[k]);
        }
    }
    /* target */
    sb_printf(b, "<line x1=\"%.1f\" y1=\"%.2f\" x2=\"%.1f\" y2=\"%.2f\" stroke=\"%s\" stroke-width=\"2\" stroke-dasharray=\"7 4\"/>\n", x0, YB(target), x1,
              YB(target), C_TARGET);
    /* the error series */
    if (have_err) {
        double r = bw / 2 < 4 ? (bw / 2 > 1.8 ? bw / 2 : 1.8) : 4;
        for (int l = 0; l < n; l++) {
            double e[2] = {L->attn_err[l], L->ffn_err[l]};
            for (int k = 0; k < 2; k++) {
                if (!isfinite(e[k])) continue;
                double x = x0 + gw * l + gw * (k == 0 ? 0.13 : 0.51) + bw / 2, y = YE(e[k] > 0 ? e[k] : 0);
                if (y < y0) y = y0;
                if (y > y1) y = y1;
                sb_printf(b, "<circle cx=\"%.2f\" cy=\"%.2f\" r=\"%.1f\" fill=\"%s\" stroke=\"#ffffff\" stroke-width=\"1.2\"><title>layer %d %s: error %.3g</title></circle>\n",
                          x, y, r, C_DOT, l, k == 0 ? "attention" : L->moe ? "MoE" : "MLP", e[k]);
            }
        }
        /* right axis */
        sb_printf(b, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\"/>\n", x1, y0, x1, y1, C_AXIS);
        if (elog) {
            for (double d = elo; d <= ehi + 1e-9; d += estep) {
                double y = YE(pow(10, d));
                sb_printf(b, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\"/>\n", x1, y, x1 + 5, y, C_AXIS);
                snprintf(line, sizeof line, "1e%d", (int)d);
                svg_text(b, x1 + 8, y + 4, "start", 12, C_TEXT, NULL, line);
            }
        } else {
            for (double v = 0; v <= ehi + estep * 1e-6; v += estep) {
                double y = YE(v);
                sb_printf(b, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\"/>\n", x1, y, x1 + 5, y, C_AXIS);
                snprintf(line, sizeof line, "%.3g", v);
                svg_text(b, x1 + 8, y + 4, "start", 12, C_TEXT, NULL, line);
            }
        }
        snprintf(attr, sizeof attr, "transform=\"rotate(90 %.0f %.0f)\"", W - 20, (y0 + y1) / 2);
        svg_text(b, W - 20, (y0 + y1) / 2, "middle", 13, C_TEXT, attr, elog ? "measured error, 1 - accuracy (log scale)" : "measured error, 1 - accuracy");
    }
    /* bottom axis */
    sb_printf(b, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\"/>\n", x0, y1, x1, y1, C_AXIS);
    sb_printf(b, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\"/>\n", x0, y0, x0, y1, C_AXIS);
    int every = 1;
    static const int nice[] = {1, 2, 5, 10, 20, 50, 100, 200, 500, 1000};
    for (int i = 0; i < 10; i++) { every = nice[i]; if (gw * every >= 30) break; }
    for (int l = 0; l < n; l += every) {
        snprintf(line, sizeof line, "%d", l);
        svg_text(b, x0 + gw * (l + 0.5), y1 + 18, "middle", 12, C_TEXT, NULL, line);
    }
    svg_text(b, (x0 + x1) / 2, y1 + 40, "middle", 13, C_TEXT, NULL, "decoder layer");
    /* legend */
    double lx = x0, ly = H - 30;
    const char *ffn = L->moe ? "MoE (experts)" : "MLP";
    sb_printf(b, "<rect x=\"%.1f\" y=\"%.1f\" width=\"14\" height=\"14\" fill=\"%s\"/>\n", lx, ly - 11, C_ATTN);
    svg_text(b, lx + 20, ly, "start", 13, C_TEXT, NULL, "attention");
    lx += 20 + 9 * 7.5 + 24;
    sb_printf(b, "<rect x=\"%.1f\" y=\"%.1f\" width=\"14\" height=\"14\" fill=\"%s\"/>\n", lx, ly - 11, C_FFN);
    svg_text(b, lx + 20, ly, "start", 13, C_TEXT, NULL, ffn);
    lx += 20 + strlen(ffn) * 7.5 + 24;
    sb_printf(b, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"2\" stroke-dasharray=\"7 4\"/>\n", lx, ly - 4, lx + 26, ly - 4, C_TARGET);
    snprintf(line, sizeof line, "target %s bpw", tb);
    svg_text(b, lx + 32, ly, "start", 13, C_TEXT, NULL, line);
    lx += 32 + strlen(line) * 7.5 + 24;
    if (have_err) {
        sb_printf(b, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"4\" fill=\"%s\" stroke=\"#ffffff\" stroke-width=\"1.2\"/>\n", lx + 6, ly - 4, C_DOT);
        svg_text(b, lx + 16, ly, "start", 13, C_TEXT, NULL, "measured error of the chosen option (right axis)");
    }
    sb_puts(b, "</svg>\n");
#undef YB
#undef YE
    return b->oom ? mb_fail(MB_ENOMEM, "out of memory") : 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* the card                                                                                        */

static const char *convention_words(const char *c) {
    if (!c) return NULL;
    if (!strcmp(c, "paper")) return "paper convention (non-overlapping windows, every position scored)";
    if (!strcmp(c, "llamacpp")) return "llama.cpp convention (chunks, second half scored)";
    return NULL;
}

static void row_begin(struct sb *b, const char *what) { sb_printf(b, "| %s | ", what); }
static void row_end(struct sb *b) { sb_puts(b, " |\n"); }

int mb_card_write(const char *out_dir, const struct mb_card_params *p) {
    struct mb_card_params none = {0};
    if (!p) p = &none;
    char rp[4096], readme[4096], svgp[4096];
    if (mb_path_join(rp, sizeof rp, out_dir, "mixbit-report.json") || mb_path_join(readme, sizeof readme, out_dir, "README.md") ||
        mb_path_join(svgp, sizeof svgp, out_dir, "mixbit-bits.svg"))
        return mb_fail(MB_EINVAL, "%s: path too long", out_dir);
    if (p->base_model && !mb_hub_repo_id_ok(p->base_model))
        return mb_fail(MB_EUSAGE, "base model \"%.200s\" is not a Hub repository id (\"name\" or \"namespace/name\": letters, digits, '-', '_', '.')", p->base_model);
    if (!mb_file_exists(rp)) return mb_fail(MB_EIO, "%s: no mixbit-report.json (the card is built from the conversion report)", out_dir);
    char *text = NULL;
    size_t tlen;
    int rc = mb_read_file(rp, &text, &tlen, REPORT_MAX);
    if (rc) return rc;
    json_error_t jerr;
    json_t *r = json_loadb(text, tlen, 0, &jerr);
    free(text);
    if (!r) return mb_fail(MB_EFORMAT, "%s: invalid JSON: %s (line %d)", rp, jerr.text, jerr.line);
    struct sb card = {0}, svg = {0};
    struct layers L = {0};
    char name[512], tmp[512], tb[64], db[64];
    double target, decoder, v;
    if (!json_is_object(r) || !jnum(r, "target_bpw", &target) || !jnum(r, "decoder_bpw", &decoder)) {
        rc = mb_fail(MB_EFORMAT, "%s: target_bpw and decoder_bpw must be numbers", rp);
        goto fail;
    }
    const char *uniform = jstr(r, "uniform");
    if ((rc = read_layers(rp, json_object_get(r, "modules"), !uniform, &L))) goto fail;
    /* names, never paths */
    if (jstr(r, "name")) base_name(jstr(r, "name"), name, sizeof name);
    else if (jstr(r, "model")) base_name(jstr(r, "model"), name, sizeof name);
    else name[0] = 0;
    if (!name[0] || !strcmp(name, ".") || !strcmp(name, "..")) snprintf(name, sizeof name, "the source model");
    const char *base = p->base_model ? p->base_model : jstr(r, "base_model");
    if (base && !mb_hub_repo_id_ok(base)) {
        mb_warn("%s: base_model \"%.200s\" is not a Hub repository id: left out of the card", rp, base);
        base = NULL;
    }
    const char *quantized_by = p->quantized_by ? p->quantized_by : jstr(r, "quantized_by");
    const char *src = jstr(r, "source_card"), *src_fm = "", *src_body = NULL;
    size_t src_fm_len = 0;
    if (src) split_front_matter(src, &src_fm, &src_fm_len, &src_body);
    char license[256] = "", license_name[256] = "", license_link[512] = "";
    if (jstr(r, "license") && jstr(r, "license")[0]) snprintf(license, sizeof license, "%s", jstr(r, "license"));
    else if (src) fm_scalar(src_fm, src_fm_len, "license", license, sizeof license);
    if (license[0] == '[') { /* a flow list: its first item */
        size_t k = strcspn(license + 1, ",]");
        memmove(license, license + 1, k);
        license[k] = 0;
        char *a = license, *z = license + strlen(license);
        while (*a == ' ' || *a == '"' || *a == '\'') a++;
        while (z > a && (z[-1] == ' ' || z[-1] == '"' || z[-1] == '\'')) z--;
        memmove(license, a, (size_t)(z - a));
        license[z - a] = 0;
    }
    if (src && !strcmp(license, "other")) { /* the Hub wants the name and link of an "other" license */
        fm_scalar(src_fm, src_fm_len, "license_name", license_name, sizeof license_name);
        fm_scalar(src_fm, src_fm_len, "license_link", license_link, sizeof license_link);
    }
    if (license[0] && !license_id_ok(license)) {
        mb_warn("%s: license \"%.100s\" is not a Hub license id: left out of the front matter", rp, license);
        license[0] = 0;
    }
    fmt_bpw(target, tb, sizeof tb);
    fmt_bpw(decoder, db, sizeof db);

    /* ---- the chart ---- */
    if ((rc = chart_svg(name, target, decoder, &L, &svg))) goto fail;
    if ((rc = mb_write_file_atomic(svgp, svg.s, svg.n))) goto fail;

    /* ---- front matter ---- */
    struct sb *b = &card;
    sb_puts(b, "---\n");
    if (base) {
        sb_puts(b, "base_model: ");
        yaml_quote(b, base);
        sb_puts(b, "\nbase_model_relation: quantized\n");
    }
    if (license[0]) {
        sb_puts(b, "license: ");
        yaml_quote(b, license);
        sb_puts(b, "\n");
        if (license_name[0]) { sb_puts(b, "license_name: "); yaml_quote(b, license_name); sb_puts(b, "\n"); }
        if (license_link[0]) { sb_puts(b, "license_link: "); yaml_quote(b, license_link); sb_puts(b, "\n"); }
    }
    sb_puts(b, "tags:\n- exl2\n- quantized\n- mixbit\n");
    if (quantized_by && quantized_by[0]) {
        sb_puts(b, "quantized_by: ");
        yaml_quote(b, quantized_by);
        sb_puts(b, "\n");
    }
    sb_puts(b, "pipeline_tag: text-generation\nlibrary_name: exllamav2\n---\n\n");

    /* ---- heading and summary ---- */
    sb_printf(b, "# EXL2 %s bpw quantization of ", tb);
    md_escape(b, name);
    sb_puts(b, "\n\n");
    if (base) {
        sb_puts(b, "[");
        md_escape(b, base);
        sb_printf(b, "](https://huggingface.co/%s)", base); /* a valid repo id needs no escaping in a URL */
    } else {
        md_escape(b, name);
    }
    const char *ver = jstr(r, "mixbit_version");
    sb_puts(b, " quantized to EXL2, the format of ExLlamaV2, by mixbit");
    if (ver) { sb_puts(b, " "); md_escape(b, ver); }
    sb_printf(b, ": %s bits per weight on average over the decoder's linear layers (target %s), ", db, tb);
    if (uniform) {
        sb_puts(b, "one setting for every projection (");
        md_escape(b, uniform);
        sb_puts(b, ", a baseline without measurement)");
    } else {
        sb_printf(b, "the bits of every attention and %s block chosen from its measured quantization error under that budget", L.moe ? "MoE" : "MLP");
    }
    double hb;
    if (jnum(r, "head_bits", &hb)) sb_printf(b, "; the output head at %.0f bits", hb);
    sb_puts(b, ".\n\n");

    /* ---- results ---- */
    sb_puts(b, "## Results\n\n| | |\n|---|---|\n");
    row_begin(b, "Decoder");
    sb_printf(b, "%s bits per weight (target %s)", db, tb);
    row_end(b);
    if (jnum(r, "head_bits", &hb)) {
        row_begin(b, "Output head");
        sb_printf(b, "%.0f bits", hb);
        if (jnum(r, "head_bpw", &v)) { fmt_bpw(v, tmp, sizeof tmp); sb_printf(b, " (%s bits per weight with scales)", tmp); }
        row_end(b);
    }
    const json_t *e = json_object_get(r, "eval");
    double before, after, ratio, ctx, tokens;
    if (json_is_object(e) && jnum(e, "ppl_before", &before) && jnum(e, "ppl_after", &after)) {
        row_begin(b, "Perplexity");
        sb_printf(b, "%.4f before, %.4f after", before, after);
        if (!jnum(e, "ppl_ratio", &ratio)) ratio = after / before;
        sb_printf(b, " (%+.2f%%)", (ratio - 1) * 100);
        row_end(b);
        row_begin(b, "Evaluated on");
        int any = 0;
        if (jnum(e, "tokens", &tokens)) { fmt_count((long long)tokens, tmp, sizeof tmp); sb_printf(b, "%s tokens", tmp); any = 1; }
        if (jstr(e, "text")) {
            base_name(jstr(e, "text"), tmp, sizeof tmp);
            sb_puts(b, any ? " of " : "");
            md_escape(b, tmp);
            any = 1;
        }
        if (jnum(e, "ctx", &ctx)) { sb_printf(b, "%scontext %.0f", any ? ", " : "", ctx); any = 1; }
        const char *cw = convention_words(jstr(e, "convention"));
        if (cw) sb_printf(b, "%s%s", any ? ", " : "", cw);
        else if (jstr(e, "convention")) { sb_puts(b, any ? ", " : ""); md_escape(b, jstr(e, "convention")); sb_puts(b, " convention"); }
        json_t *bos = json_object_get(e, "bos");
        if (json_is_boolean(bos)) sb_puts(b, json_is_true(bos) ? ", BOS first" : ", no BOS");
        row_end(b);
        double km, kp, st;
        if (jnum(e, "kld_mean", &km)) {
            row_begin(b, "KL divergence from the source");
            sb_printf(b, "mean %.5f", km);
            if (jnum(e, "kld_p99", &kp)) sb_printf(b, ", 99th percentile %.5f", kp);
            if (jnum(e, "same_top1_percent", &st)) sb_printf(b, "; same top-1 token %.2f%%", st);
            row_end(b);
        }
    } else {
        row_begin(b, "Perplexity");
        sb_puts(b, "not evaluated in this conversion");
        row_end(b);
    }
    const json_t *cal = json_object_get(r, "calibration");
    const char *calname = json_is_object(cal) ? jstr(cal, "name") : json_string_value(cal);
    const json_t *cs = json_is_object(cal) ? cal : r; /* older reports: rows / length at the top level */
    double rows, len, mrows;
    row_begin(b, "Calibration");
    if (calname) { base_name(calname, tmp, sizeof tmp); md_escape(b, tmp); }
    else sb_puts(b, "(not recorded)");
    if (jnum(cs, "rows", &rows) && jnum(cs, "length", &len)) sb_printf(b, ", %.0f rows x %.0f tokens", rows, len);
    if (jnum(cs, "measurement_rows", &mrows)) sb_printf(b, " (%.0f rows for the measurement)", mrows);
    row_end(b);
    if (ver) { row_begin(b, "mixbit version"); md_escape(b, ver); row_end(b); }
    if (jstr(r, "date")) { row_begin(b, "Date"); md_escape(b, jstr(r, "date")); row_end(b); }
    if (jnum(r, "seconds", &v)) { row_begin(b, "Conversion time"); fmt_duration(v, tmp, sizeof tmp); sb_puts(b, tmp); row_end(b); }
    if (jstr(r, "device")) { row_begin(b, "Device"); md_escape(b, jstr(r, "device")); row_end(b); }
    sb_puts(b, "\n");

    /* ---- how to load it ---- */
    char dirname[256];
    base_name(out_dir, dirname, sizeof dirname);
    char *real = (!strcmp(dirname, ".") || !strcmp(dirname, "..")) ? realpath(out_dir, NULL) : NULL; /* "mixbit card ." */
    if (real) base_name(real, dirname, sizeof dirname);
    free(real);
    size_t dl = strlen(dirname); /* convert writes into OUT_DIR.partial before renaming it */
    if (dl > 8 && !strcmp(dirname + dl - 8, ".partial")) dirname[dl - 8] = 0;
    int plain = 1; /* the folder name as a Python string literal: only when it needs no escaping */
    for (const char *c = dirname; *c; c++)
        if (!(isalnum((unsigned char)*c) || strchr("._-+", *c))) plain = 0;
    if (!dirname[0] || !strcmp(dirname, ".") || !strcmp(dirname, "..") || !plain) snprintf(dirname, sizeof dirname, "model-exl2");
    int64_t seq = 4096;
    struct mb_config cfg;
    char cfgp[4096];
    if (!mb_path_join(cfgp, sizeof cfgp, out_dir, "config.json") && mb_config_load(cfgp, &cfg) == 0 && cfg.max_pos > 0 && cfg.max_pos < seq) seq = cfg.max_pos;
    json_t *bos = json_is_object(e) ? json_object_get(e, "bos") : NULL;
    sb_printf(b, "## How to use it\n\n"
                 "With [ExLlamaV2](https://github.com/turboderp-org/exllamav2) (0.3 or later), after downloading this repository into `%s`:\n\n"
                 "```python\n"
                 "from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Cache, ExLlamaV2Tokenizer\n"
                 "from exllamav2.generator import ExLlamaV2DynamicGenerator\n\n"
                 "config = ExLlamaV2Config(\"%s\")\n"
                 "model = ExLlamaV2(config)\n"
                 "cache = ExLlamaV2Cache(model, max_seq_len=%lld, lazy=True)\n"
                 "model.load_autosplit(cache)  # spread over the available GPUs\n"
                 "tokenizer = ExLlamaV2Tokenizer(config)\n"
                 "generator = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer)\n"
                 "print(generator.generate(prompt=\"Once upon a time\", max_new_tokens=100, add_bos=%s))\n"
                 "```\n\n"
                 "With [TabbyAPI](https://github.com/theroyallama/tabbyAPI) (an OpenAI-compatible server on ExLlamaV2): put the folder "
                 "under its `models/` directory and set `model_name: %s` in `config.yml`, or load it through its `/v1/model/load` endpoint.\n\n",
              dirname, dirname, (long long)seq, json_is_false(bos) ? "False" : "True", dirname);

    /* ---- the chart ---- */
    sb_printf(b, "## Bit allocation\n\n"
                 "![Bits per weight of the attention and %s modules of every layer, the target, and the measured error of the chosen options](mixbit-bits.svg)\n\n"
                 "Each bar is one module's chosen option in bits per weight (scales and group tables included); the dashed line is the target; each dot "
                 "is that option's measured error (1 - accuracy of the module's output on the calibration rows), on the right-hand axis. %s\n\n",
              L.moe ? "MoE" : "MLP",
              json_integer_value(json_object_get(r, "sensitivity_tokens")) > 0
                  ? "Each module's error is weighted by what it costs at the model's output (the KL divergence of the final logits when that "
                    "module alone is quantized, measured on calibration tokens), and the allocation minimises the predicted output KL "
                    "divergence within the bit budget, so bits go where the output is most sensitive."
                  : "The allocation minimises the summed error of all modules within the bit budget, so bits go where they reduce the error most.");
    sb_printf(b, "## Checking the files\n\n"
                 "`%s` lists the size and SHA-256 of every file; `mixbit verify DIR` checks them, the safetensors headers, every tensor "
                 "`config.json` implies, and the structure of every EXL2 layer. `mixbit-report.json` holds every number above and the option "
                 "chosen for each module; `measurement.json` lets mixbit allocate another bit rate without measuring again.\n\n",
              MB_MANIFEST_NAME);

    /* ---- the source card ---- */
    sb_puts(b, "## Original model card\n\n");
    if (src_body && src_body[0]) {
        sb_puts(b, src_body);
        if (src_body[strlen(src_body) - 1] != '\n') sb_puts(b, "\n");
    } else {
        sb_puts(b, "The source model came without a model card (README.md).\n");
    }
    if (b->oom) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto fail; }
    rc = mb_write_file_atomic(readme, card.s, card.n);
fail:
    layers_free(&L);
    sb_free(&card);
    sb_free(&svg);
    json_decref(r);
    return rc;
}
