/* formats/dataset.c: text datasets (.txt, .jsonl, their .gz versions, directories of them) and
 * calibration rows. gzip is read with zlib (gzread passes plain files through unchanged). */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "formats.h"

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

static int is_jsonl(const char *p) { return ends_with(p, ".jsonl") || ends_with(p, ".jsonl.gz"); }
static int is_text(const char *p) { return ends_with(p, ".txt") || ends_with(p, ".txt.gz"); }

/* Largest text mixbit reads into memory from one file (after decompression), and for all the files of a
 * calibration directory together: bounds every read loop (a file that keeps growing, a gzip bomb) and
 * keeps token counts inside int32 ranges downstream. Calibration and evaluation texts are megabytes. */
#define TEXT_MAX ((size_t)1 << 31)

/* read a whole (possibly gzipped) regular file; a truncated or corrupt .gz is an error naming the file */
static int read_gz(const char *path, char **out, size_t *len) {
    *out = NULL;
    *len = 0;
    int fd, rc = mb_open_regular(path, &fd, NULL); /* FIFOs, devices, directories refused without blocking */
    if (rc) return rc;
    gzFile f = gzdopen(fd, "rb");
    if (!f) { close(fd); return mb_fail(MB_ENOMEM, "%s: cannot open: out of memory", path); }
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap + 1);
    for (;;) {
        if (!b) { rc = mb_fail(MB_ENOMEM, "%s: out of memory", path); break; }
        if (n == cap) {
            if (cap >= TEXT_MAX) { rc = mb_fail(MB_ERANGE, "%s: more than %zu bytes of text", path, TEXT_MAX); break; }
            cap *= 2;
            char *nb = realloc(b, cap + 1);
            if (!nb) { rc = mb_fail(MB_ENOMEM, "%s: out of memory", path); break; }
            b = nb;
        }
        int r = gzread(f, b + n, (unsigned)(cap - n > (1u << 30) ? (1u << 30) : cap - n));
        if (r < 0) { int e; rc = mb_fail(MB_EIO, "%s: read error: %s", path, gzerror(f, &e)); break; }
        if (r == 0) {
            /* gzread reports a stream cut short (Z_BUF_ERROR) as a plain end of file: ask */
            int e = Z_OK;
            const char *msg = gzerror(f, &e);
            if (e == Z_BUF_ERROR) rc = mb_fail(MB_EFORMAT, "%s: truncated gzip data (%s after %zu bytes)", path, msg && msg[0] ? msg : "unexpected end of file", n);
            else if (e != Z_OK) rc = mb_fail(MB_EIO, "%s: read error: %s", path, msg);
            break;
        }
        n += (size_t)r;
    }
    int cr = gzclose_r(f); /* closes fd too; Z_BUF_ERROR: the last read ended inside a gzip stream */
    if (!rc && cr == Z_BUF_ERROR) rc = mb_fail(MB_EFORMAT, "%s: truncated gzip data", path);
    else if (!rc && cr != Z_OK) rc = mb_fail(MB_EIO, "%s: read error (zlib status %d)", path, cr);
    if (rc) { free(b); return rc; }
    b[n] = 0;
    *out = b;
    *len = n;
    return 0;
}

/* first invalid UTF-8 byte, or len */
static size_t utf8_check(const char *s, size_t len) {
    const uint8_t *p = (const uint8_t *)s;
    for (size_t i = 0; i < len;) {
        uint8_t c = p[i];
        if (c < 0x80) { i++; continue; }
        int l = (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3 : (c & 0xf8) == 0xf0 ? 4 : 0;
        if (!l || i + l > len) return i;
        uint32_t cp = c & (l == 2 ? 0x1f : l == 3 ? 0x0f : 0x07);
        for (int k = 1; k < l; k++) {
            if ((p[i + k] & 0xc0) != 0x80) return i;
            cp = (cp << 6) | (p[i + k] & 0x3f);
        }
        if ((l == 2 && cp < 0x80) || (l == 3 && cp < 0x800) || (l == 4 && (cp < 0x10000 || cp > 0x10ffff)) || (cp >= 0xd800 && cp <= 0xdfff)) return i;
        i += (size_t)l;
    }
    return len;
}

static int64_t line_of(const char *s, size_t off) {
    int64_t line = 1;
    for (size_t i = 0; i < off; i++) line += s[i] == '\n';
    return line;
}

static int read_one(const char *path, const char *field, mb_doc_cb cb, void *user) {
    char *text = NULL;
    size_t len = 0;
    int rc = read_gz(path, &text, &len);
    if (rc) return rc;
    size_t bad = utf8_check(text, len);
    if (bad < len) {
        rc = mb_fail(MB_EFORMAT, "%s:%lld: invalid UTF-8", path, (long long)line_of(text, bad));
        free(text);
        return rc;
    }
    if (!is_jsonl(path)) {
        rc = cb(text, len, user);
        free(text);
        return rc;
    }
    const char *fld = field ? field : "text";
    int64_t line = 1;
    for (size_t i = 0; i < len && !rc; line++) {
        char *nl = memchr(text + i, '\n', len - i);
        size_t e = nl ? (size_t)(nl - text) : len;
        size_t a = i;
        while (a < e && (text[a] == ' ' || text[a] == '\t' || text[a] == '\r')) a++;
        if (a < e) {
            json_error_t jerr;
            json_t *o = json_loadb(text + a, e - a, 0, &jerr);
            if (!o) rc = mb_fail(MB_EFORMAT, "%s:%lld: malformed JSON: %s", path, (long long)line, jerr.text);
            else {
                json_t *v = json_object_get(o, fld);
                if (!json_is_string(v)) rc = mb_fail(MB_EFORMAT, "%s:%lld: no string field \"%s\"", path, (long long)line, fld);
                else rc = cb(json_string_value(v), json_string_length(v), user);
                json_decref(o);
            }
        }
        i = e + 1;
    }
    free(text);
    return rc;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int mb_dataset_read(const char *path, const char *field, mb_doc_cb cb, void *user) {
    if (!mb_is_dir(path)) return read_one(path, field, cb, user); /* read_one refuses missing and non-regular files */
    DIR *d = opendir(path);
    if (!d) return mb_fail(MB_EIO, "%s: cannot open directory: %s", path, strerror(errno));
    char **names = NULL;
    size_t n = 0;
    int rc = 0;
    struct dirent *de;
    errno = 0;
    while ((de = readdir(d))) {
        if (!is_jsonl(de->d_name) && !is_text(de->d_name)) { errno = 0; continue; }
        if (n >= 1000000) { rc = mb_fail(MB_ERANGE, "%s: more than 1000000 text files", path); break; }
        char **nn = realloc(names, (n + 1) * sizeof *nn);
        if (!nn) { rc = mb_fail(MB_ENOMEM, "out of memory"); break; }
        names = nn;
        if (!(names[n] = strdup(de->d_name))) { rc = mb_fail(MB_ENOMEM, "out of memory"); break; }
        n++;
        errno = 0;
    }
    if (!rc && errno) rc = mb_fail(MB_EIO, "%s: reading the directory: %s", path, strerror(errno));
    closedir(d);
    if (!rc && n == 0) rc = mb_fail(MB_EIO, "%s: no .txt/.jsonl(.gz) files in the directory", path);
    if (!rc) qsort(names, n, sizeof *names, cmp_str);
    for (size_t i = 0; i < n && !rc; i++) {
        char p[4096];
        rc = mb_path_join(p, sizeof p, path, names[i]);
        if (!rc) rc = read_one(p, field, cb, user);
    }
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
    return rc;
}

/* ---- calibration rows ---- */
struct join { char *p; size_t n, cap; int docs; };
static int join_cb(const char *doc, size_t len, void *user) {
    struct join *j = user;
    if (len > TEXT_MAX || j->n + len + 3 > TEXT_MAX) return mb_fail(MB_ERANGE, "calibration text: more than %zu bytes in all", TEXT_MAX);
    size_t need = j->n + len + 3;
    if (need > j->cap) {
        size_t nc = j->cap ? j->cap : 1 << 16;
        while (nc < need) nc *= 2;
        char *np = realloc(j->p, nc);
        if (!np) return mb_fail(MB_ENOMEM, "out of memory reading calibration text");
        j->p = np;
        j->cap = nc;
    }
    if (j->docs++) { memcpy(j->p + j->n, "\n\n", 2); j->n += 2; }
    memcpy(j->p + j->n, doc, len);
    j->n += len;
    j->p[j->n] = 0;
    return 0;
}

int mb_calib_tokens(const struct mb_tokenizer *t, const char *path, const char *field, int32_t **ids, int64_t *n) {
    *ids = NULL;
    *n = 0;
    struct join j = {0};
    int rc = mb_dataset_read(path, field, join_cb, &j);
    if (rc) { free(j.p); return rc; }
    int64_t cap = 0;
    rc = mb_tokenize(t, j.p ? j.p : "", j.n, 0, 0, ids, n, &cap);
    free(j.p);
    if (rc) { free(*ids); *ids = NULL; *n = 0; return mb_fail_ctx(rc, "%s", path); }
    return 0;
}

int mb_calib_rows_from(const struct mb_tokenizer *t, const char *name, const int32_t *ids, int64_t n, int64_t rows, int64_t length, int bos, uint64_t seed,
                       int32_t **out) {
    *out = NULL;
    if (rows <= 0 || length < 2) return mb_fail(MB_EINVAL, "calibration rows x length must be positive (got %lld x %lld)", (long long)rows, (long long)length);
    size_t bytes;
    int rc = mb_size_mul(&bytes, MB_CALIB_MAX_TOKENS * sizeof(int32_t), "calibration rows x length x 4 bytes", rows, length, sizeof(int32_t));
    if (rc) return rc;
    int64_t body = length - (bos ? 1 : 0);
    if (n < body) return mb_fail(MB_EINVAL, "%s: %lld tokens of calibration text, fewer than one row of %lld", name, (long long)n, (long long)length);
    int32_t *r = malloc(bytes);
    if (!r) return mb_fail(MB_ENOMEM, "out of memory for %lld x %lld calibration tokens", (long long)rows, (long long)length);
    /* stratified: row i starts at a random offset inside its share of the stream, so rows overlap only
     * when the text is shorter than rows x length */
    struct mb_rng g = {seed ^ 0x6d69786269742121ull};
    int64_t span = n - body + 1;
    for (int64_t i = 0; i < rows; i++) {
        int64_t lo = span * i / rows, hi = span * (i + 1) / rows;
        if (hi <= lo) hi = lo + 1;
        int64_t start = lo + (int64_t)(mb_rng_next(&g) % (uint64_t)(hi - lo));
        if (start > n - body) start = n - body;
        int32_t *row = r + i * length;
        if (bos) row[0] = mb_tokenizer_bos(t);
        memcpy(row + (bos ? 1 : 0), ids + start, (size_t)body * sizeof *row);
    }
    *out = r;
    return 0;
}

int mb_calib_rows(const struct mb_tokenizer *t, const char *path, const char *field, int64_t rows, int64_t length, int bos,
                  uint64_t seed, int32_t **out) {
    *out = NULL;
    size_t bytes; /* checked before any reading */
    if (rows <= 0 || length < 2) return mb_fail(MB_EINVAL, "calibration rows x length must be positive (got %lld x %lld)", (long long)rows, (long long)length);
    int rc = mb_size_mul(&bytes, MB_CALIB_MAX_TOKENS * sizeof(int32_t), "calibration rows x length x 4 bytes", rows, length, sizeof(int32_t));
    if (rc) return rc;
    int32_t *ids;
    int64_t n;
    if ((rc = mb_calib_tokens(t, path, field, &ids, &n))) return rc;
    rc = mb_calib_rows_from(t, path, ids, n, rows, length, bos, seed, out);
    free(ids);
    return rc;
}
