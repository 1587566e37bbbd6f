/* formats/safetensors.c: mmap'd, validating safetensors reader and atomic (sharded) writer. Layout and
 * rules in formats.h. */
#include "formats.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_MAX_HEADER (100u * 1000u * 1000u) /* the format's own limit (safetensors MAX_HEADER_SIZE) */

static const struct { const char *name; size_t size; } dtypes[MB_DTYPE_COUNT] = {
    [MB_F64] = {"F64", 8}, [MB_F32] = {"F32", 4}, [MB_F16] = {"F16", 2}, [MB_BF16] = {"BF16", 2},
    [MB_I64] = {"I64", 8}, [MB_I32] = {"I32", 4}, [MB_I16] = {"I16", 2}, [MB_I8] = {"I8", 1},
    [MB_U8] = {"U8", 1},   [MB_BOOL] = {"BOOL", 1},
};

size_t mb_dtype_size(enum mb_dtype t) { return (unsigned)t < MB_DTYPE_COUNT ? dtypes[t].size : 0; }
const char *mb_dtype_name(enum mb_dtype t) { return (unsigned)t < MB_DTYPE_COUNT ? dtypes[t].name : "?"; }

int mb_dtype_parse(const char *s, enum mb_dtype *out) {
    for (int i = 0; i < MB_DTYPE_COUNT; i++)
        if (strcmp(s, dtypes[i].name) == 0) { *out = (enum mb_dtype)i; return 0; }
    return MB_EFORMAT;
}

/* ---- conversion ---- */
int mb_tensor_slice_to_f32(const struct mb_tensor_info *t, int64_t start, int64_t count, float *out) {
    if (start < 0 || count < 0 || start > t->numel || count > t->numel - start)
        return mb_fail(MB_ERANGE, "%s: slice [%lld, +%lld) outside %lld elements", t->name, (long long)start,
                       (long long)count, (long long)t->numel);
    const uint8_t *p = (const uint8_t *)t->data + (size_t)start * mb_dtype_size(t->dtype);
    int64_t i;
    switch (t->dtype) {
    case MB_F32: memcpy(out, p, (size_t)count * 4); break;
    case MB_F64: for (i = 0; i < count; i++) { double v; memcpy(&v, p + 8 * i, 8); out[i] = (float)v; } break;
    case MB_F16: for (i = 0; i < count; i++) { uint16_t v; memcpy(&v, p + 2 * i, 2); out[i] = mb_f16_to_f32(v); } break;
    case MB_BF16: for (i = 0; i < count; i++) { uint16_t v; memcpy(&v, p + 2 * i, 2); out[i] = mb_bf16_to_f32(v); } break;
    case MB_I64: for (i = 0; i < count; i++) { int64_t v; memcpy(&v, p + 8 * i, 8); out[i] = (float)v; } break;
    case MB_I32: for (i = 0; i < count; i++) { int32_t v; memcpy(&v, p + 4 * i, 4); out[i] = (float)v; } break;
    case MB_I16: for (i = 0; i < count; i++) { int16_t v; memcpy(&v, p + 2 * i, 2); out[i] = (float)v; } break;
    case MB_I8: for (i = 0; i < count; i++) out[i] = (float)(int8_t)p[i]; break;
    case MB_U8: case MB_BOOL: for (i = 0; i < count; i++) out[i] = (float)p[i]; break;
    default: return mb_fail(MB_EUNSUPPORTED, "%s: dtype not convertible", t->name);
    }
    return 0;
}

int mb_tensor_to_f32(const struct mb_tensor_info *t, float *out) { return mb_tensor_slice_to_f32(t, 0, t->numel, out); }

int mb_tensor_to_f16(const struct mb_tensor_info *t, uint16_t *out) {
    if (t->dtype == MB_F16) { memcpy(out, t->data, t->nbytes); return 0; }
    const int64_t chunk = 4096;
    float buf[4096];
    for (int64_t s = 0; s < t->numel; s += chunk) {
        int64_t c = t->numel - s < chunk ? t->numel - s : chunk;
        int rc = mb_tensor_slice_to_f32(t, s, c, buf);
        if (rc) return rc;
        for (int64_t i = 0; i < c; i++) out[s + i] = mb_f32_to_f16(buf[i]);
    }
    return 0;
}

/* ---- parsing ---- */
static void file_free(struct mb_st_file *f) {
    if (!f) return;
    for (int i = 0; i < f->n; i++) free(f->t[i].name);
    free(f->t);
    for (int i = 0; i < f->n_meta; i++) { free(f->meta_keys[i]); free(f->meta_vals[i]); }
    free(f->meta_keys);
    free(f->meta_vals);
    for (int i = 0; i < f->n_owned; i++) free(f->owned[i]);
    free(f->owned);
    free(f->path);
    free(f);
}

void mb_st_close(struct mb_st_file *f) {
    if (!f) return;
    if (f->map) munmap(f->map, f->map_size);
    file_free(f);
}

static int cmp_offset(const void *a, const void *b) {
    const struct mb_tensor_info *x = a, *y = b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

/* integer from JSON, non-negative, fits in int64 */
static int json_nonneg(json_t *v, int64_t *out) {
    if (!json_is_integer(v)) return 0;
    json_int_t x = json_integer_value(v);
    if (x < 0) return 0;
    *out = (int64_t)x;
    return 1;
}

int mb_st_parse(const char *name, const uint8_t *buf, size_t size, struct mb_st_file **out) {
    *out = NULL;
    if (size < 8) return mb_fail(MB_EFORMAT, "%s: file too short for a safetensors header (%zu bytes)", name, size);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | buf[i];
    if (hlen > size - 8)
        return mb_fail(MB_EFORMAT, "%s: header length %llu exceeds the file (%zu bytes)", name, (unsigned long long)hlen, size);
    if (hlen > ST_MAX_HEADER)
        return mb_fail(MB_EFORMAT, "%s: header length %llu exceeds the 100 MB limit", name, (unsigned long long)hlen);
    if (hlen < 2 || buf[8] != '{')
        return mb_fail(MB_EFORMAT, "%s: header is not a JSON object", name);

    json_error_t jerr;
    json_t *root = json_loadb((const char *)buf + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) return mb_fail(MB_EFORMAT, "%s: header is not valid JSON: %s (at byte %d)", name, jerr.text, jerr.position);
    if (!json_is_object(root)) { json_decref(root); return mb_fail(MB_EFORMAT, "%s: header is not a JSON object", name); }

    struct mb_st_file *f = calloc(1, sizeof *f);
    int rc = MB_ENOMEM;
    if (!f || !(f->path = strdup(name))) { rc = mb_fail(MB_ENOMEM, "%s: out of memory", name); goto fail; }
    f->header_len = (size_t)hlen;
    f->data = buf + 8 + hlen;
    f->data_size = size - 8 - (size_t)hlen;
    size_t nkeys = json_object_size(root);
    f->t = calloc(nkeys ? nkeys : 1, sizeof *f->t);
    if (!f->t) { rc = mb_fail(MB_ENOMEM, "%s: out of memory", name); goto fail; }

    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0) {
            if (!json_is_object(val)) { rc = mb_fail(MB_EFORMAT, "%s: __metadata__ is not an object", name); goto fail; }
            size_t nm = json_object_size(val);
            f->meta_keys = calloc(nm ? nm : 1, sizeof(char *));
            f->meta_vals = calloc(nm ? nm : 1, sizeof(char *));
            if (!f->meta_keys || !f->meta_vals) { rc = mb_fail(MB_ENOMEM, "%s: out of memory", name); goto fail; }
            const char *mk;
            json_t *mv;
            json_object_foreach(val, mk, mv) {
                if (!json_is_string(mv)) { rc = mb_fail(MB_EFORMAT, "%s: __metadata__ value of \"%s\" is not a string", name, mk); goto fail; }
                f->meta_keys[f->n_meta] = strdup(mk);
                f->meta_vals[f->n_meta] = strdup(json_string_value(mv));
                f->n_meta++;
                if (!f->meta_keys[f->n_meta - 1] || !f->meta_vals[f->n_meta - 1]) { rc = mb_fail(MB_ENOMEM, "%s: out of memory", name); goto fail; }
            }
            continue;
        }
        if (key[0] == 0) { rc = mb_fail(MB_EFORMAT, "%s: tensor with an empty name", name); goto fail; }
        if (!json_is_object(val)) { rc = mb_fail(MB_EFORMAT, "%s: tensor %s: entry is not an object", name, key); goto fail; }
        json_t *jd = json_object_get(val, "dtype"), *js = json_object_get(val, "shape"), *jo = json_object_get(val, "data_offsets");
        if (!json_is_string(jd)) { rc = mb_fail(MB_EFORMAT, "%s: tensor %s: missing or non-string dtype", name, key); goto fail; }
        if (!json_is_array(js)) { rc = mb_fail(MB_EFORMAT, "%s: tensor %s: missing or non-array shape", name, key); goto fail; }
        if (!json_is_array(jo) || json_array_size(jo) != 2) { rc = mb_fail(MB_EFORMAT, "%s: tensor %s: data_offsets is not an array of two integers", name, key); goto fail; }
        struct mb_tensor_info *t = &f->t[f->n];
        if (!(t->name = strdup(key))) { rc = mb_fail(MB_ENOMEM, "%s: out of memory", name); goto fail; }
        f->n++;
        t->file = f->path;
        if (mb_dtype_parse(json_string_value(jd), &t->dtype)) { rc = mb_fail(MB_EFORMAT, "%s: tensor %s: unknown dtype \"%.32s\"", name, key, json_string_value(jd)); goto fail; }
        size_t nd = json_array_size(js);
        if (nd > MB_MAX_DIMS) { rc = mb_fail(MB_EFORMAT, "%s: tensor %s: rank %zu exceeds %d", name, key, nd, MB_MAX_DIMS); goto fail; }
        t->ndim = (int)nd;
        size_t numel = 1;
        for (size_t d = 0; d < nd; d++) {
            int64_t dim;
            if (!json_nonneg(json_array_get(js, d), &dim)) { rc = mb_fail(MB_EFORMAT, "%s: tensor %s: shape[%zu] is not a non-negative integer", name, key, d); goto fail; }
            t->shape[d] = dim;
        }
        {
            char what[300];
            snprintf(what, sizeof what, "%s: tensor %s: element count", name, key);
            if (mb_size_mul_n(&numel, (size_t)INT64_MAX, what, t->shape, t->ndim)) { rc = MB_EFORMAT; goto fail; }
        }
        t->numel = (int64_t)numel;
        int64_t b, e;
        if (!json_nonneg(json_array_get(jo, 0), &b) || !json_nonneg(json_array_get(jo, 1), &e)) { rc = mb_fail(MB_EFORMAT, "%s: tensor %s: data_offsets are not non-negative integers", name, key); goto fail; }
        if (b > e) { rc = mb_fail(MB_EFORMAT, "%s: tensor %s: data_offsets begin %lld > end %lld", name, key, (long long)b, (long long)e); goto fail; }
        if ((uint64_t)e > f->data_size) { rc = mb_fail(MB_EFORMAT, "%s: tensor %s: data_offsets end %lld beyond the data area (%zu bytes)", name, key, (long long)e, f->data_size); goto fail; }
        size_t nbytes;
        {
            char what[300];
            snprintf(what, sizeof what, "%s: tensor %s: byte size", name, key);
            if (mb_size_mul(&nbytes, (size_t)INT64_MAX, what, t->numel, mb_dtype_size(t->dtype))) { rc = MB_EFORMAT; goto fail; }
        }
        if (nbytes != (size_t)(e - b)) { rc = mb_fail(MB_EFORMAT, "%s: tensor %s: %lld bytes in data_offsets but shape and dtype %s need %zu", name, key, (long long)(e - b), mb_dtype_name(t->dtype), nbytes); goto fail; }
        t->offset = (size_t)b;
        t->nbytes = nbytes;
        t->data = f->data + b;
    }
    json_decref(root);
    root = NULL;

    /* tiling: sorted by offset, each begins where the previous ended, last ends at the data size */
    {
        struct mb_tensor_info *s = malloc((f->n ? f->n : 1) * sizeof *s);
        if (!s) { rc = mb_fail(MB_ENOMEM, "%s: out of memory", name); goto fail; }
        memcpy(s, f->t, f->n * sizeof *s);
        qsort(s, f->n, sizeof *s, cmp_offset);
        size_t pos = 0;
        for (int i = 0; i < f->n; i++) {
            if (s[i].offset < pos) { rc = mb_fail(MB_EFORMAT, "%s: tensor %s: data overlaps the previous tensor (%s)", name, s[i].name, s[i - 1].name); free(s); goto fail; }
            if (s[i].offset > pos) { rc = mb_fail(MB_EFORMAT, "%s: tensor %s: hole of %zu bytes before its data", name, s[i].name, s[i].offset - pos); free(s); goto fail; }
            pos = s[i].offset + s[i].nbytes;
        }
        free(s);
        if (pos != f->data_size) { rc = mb_fail(MB_EFORMAT, "%s: %zu bytes of data after the last tensor", name, f->data_size - pos); goto fail; }
    }
    *out = f;
    return 0;
fail:
    if (root) json_decref(root);
    file_free(f);
    return rc;
}

int mb_st_open(const char *path, struct mb_st_file **out) {
    *out = NULL;
    int fd;
    size_t size;
    int rc0 = mb_open_regular(path, &fd, &size); /* FIFOs, devices, directories: refused, never blocking */
    if (rc0) return rc0;
    if (size < 8) { close(fd); return mb_fail(MB_EFORMAT, "%s: file too short for a safetensors header (%zu bytes)", path, size); }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return mb_fail(MB_EIO, "%s: mmap: %s", path, strerror(errno));
    struct mb_st_file *f;
    int rc = mb_st_parse(path, map, size, &f);
    if (rc) { munmap(map, size); return rc; }
    f->map = map;
    f->map_size = size;
    *out = f;
    return 0;
}

const struct mb_tensor_info *mb_st_file_find(const struct mb_st_file *f, const char *name) {
    for (int i = 0; i < f->n; i++)
        if (strcmp(f->t[i].name, name) == 0) return &f->t[i];
    return NULL;
}

const char *mb_st_meta(const struct mb_st_file *f, const char *key) {
    for (int i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta_keys[i], key) == 0) return f->meta_vals[i];
    return NULL;
}

/* ---- sets ---- */
static int cmp_tinfo_name(const void *a, const void *b) {
    return strcmp((*(const struct mb_tensor_info *const *)a)->name, (*(const struct mb_tensor_info *const *)b)->name);
}

void mb_st_set_close(struct mb_st_set *s) {
    if (!s) return;
    for (int i = 0; i < s->n_files; i++) mb_st_close(s->files[i]);
    free(s->files);
    free(s->sorted);
    free(s->path);
    free(s);
}

static int set_add(struct mb_st_set *s, const char *path) {
    struct mb_st_file **nf = realloc(s->files, (s->n_files + 1) * sizeof *nf);
    if (!nf) return mb_fail(MB_ENOMEM, "%s: out of memory", path);
    s->files = nf;
    int rc = mb_torch_path(path) ? mb_torch_open(path, &s->files[s->n_files]) : mb_st_open(path, &s->files[s->n_files]);
    if (rc) return rc;
    s->n_files++;
    return 0;
}

static int set_index(struct mb_st_set *s) {
    int64_t total = 0;
    for (int i = 0; i < s->n_files; i++) total += s->files[i]->n;
    if (total > INT32_MAX) return mb_fail(MB_ERANGE, "%s: %lld tensors, more than the reader handles", s->path, (long long)total);
    s->sorted = malloc((size_t)(total ? total : 1) * sizeof *s->sorted);
    if (!s->sorted) return mb_fail(MB_ENOMEM, "%s: out of memory", s->path);
    s->n = 0;
    for (int i = 0; i < s->n_files; i++)
        for (int j = 0; j < s->files[i]->n; j++) s->sorted[s->n++] = &s->files[i]->t[j];
    qsort(s->sorted, s->n, sizeof *s->sorted, cmp_tinfo_name);
    for (int i = 1; i < s->n; i++)
        if (strcmp(s->sorted[i]->name, s->sorted[i - 1]->name) == 0)
            return mb_fail(MB_EFORMAT, "%s: tensor %s appears twice (%s and %s)", s->path, s->sorted[i]->name,
                           s->sorted[i - 1]->file, s->sorted[i]->file);
    return 0;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int open_index(struct mb_st_set *s, const char *index_path) {
    char *text;
    size_t len;
    int rc = mb_read_file(index_path, &text, &len, 256u << 20);
    if (rc) return rc;
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    free(text);
    if (!root) return mb_fail(MB_EFORMAT, "%s: invalid JSON: %s (line %d)", index_path, jerr.text, jerr.line);
    json_t *wm = json_object_get(root, "weight_map");
    if (!json_is_object(wm)) { json_decref(root); return mb_fail(MB_EFORMAT, "%s: no weight_map object", index_path); }
    /* distinct files, opened in sorted order */
    size_t nw = json_object_size(wm), nf = 0;
    char **names = calloc(nw ? nw : 1, sizeof(char *));
    if (!names) { json_decref(root); return mb_fail(MB_ENOMEM, "out of memory"); }
    const char *k;
    json_t *v;
    rc = 0;
    json_object_foreach(wm, k, v) {
        if (!json_is_string(v)) { rc = mb_fail(MB_EFORMAT, "%s: weight_map entry %s is not a string", index_path, k); break; }
        const char *fn = json_string_value(v);
        if (strchr(fn, '/') || strcmp(fn, "..") == 0 || fn[0] == 0) { rc = mb_fail(MB_EFORMAT, "%s: weight_map entry %s names a file outside the directory: \"%s\"", index_path, k, fn); break; }
        size_t i;
        for (i = 0; i < nf; i++) if (strcmp(names[i], fn) == 0) break;
        if (i == nf) names[nf++] = (char *)fn;
    }
    if (!rc) {
        qsort(names, nf, sizeof *names, cmp_str);
        char dir[4096];
        snprintf(dir, sizeof dir, "%s", index_path);
        char *slash = strrchr(dir, '/');
        if (slash) *slash = 0; else strcpy(dir, ".");
        for (size_t i = 0; i < nf && !rc; i++) {
            char p[4096];
            rc = mb_path_join(p, sizeof p, dir, names[i]);
            if (!rc) rc = set_add(s, p);
        }
    }
    if (!rc) rc = set_index(s);
    if (!rc) { /* the index and the files must agree */
        json_object_foreach(wm, k, v) {
            const struct mb_tensor_info *t = mb_st_find(s, k);
            if (!t) { rc = mb_fail(MB_EFORMAT, "%s: tensor %s is listed but not found in %s", index_path, k, json_string_value(v)); break; }
            const char *base = strrchr(t->file, '/');
            base = base ? base + 1 : t->file;
            if (strcmp(base, json_string_value(v)) != 0) { rc = mb_fail(MB_EFORMAT, "%s: tensor %s is listed in %s but found in %s", index_path, k, json_string_value(v), base); break; }
        }
        if (!rc && (size_t)s->n != nw) {
            for (int i = 0; i < s->n; i++)
                if (!json_object_get(wm, s->sorted[i]->name)) { rc = mb_fail(MB_EFORMAT, "%s: tensor %s in %s is not listed in the index", index_path, s->sorted[i]->name, s->sorted[i]->file); break; }
        }
    }
    free(names);
    json_decref(root);
    return rc;
}

/* any directory entry at all (FIFOs included: they are then refused by mb_open_regular, not skipped) */
static int exists(const char *p) { return access(p, F_OK) == 0; }

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

int mb_st_set_open(const char *path, struct mb_st_set **out) {
    *out = NULL;
    struct mb_st_set *s = calloc(1, sizeof *s);
    if (!s || !(s->path = strdup(path))) { free(s); return mb_fail(MB_ENOMEM, "out of memory"); }
    int rc = 0;
    char p[4096];
    if (!exists(path)) {
        rc = mb_fail(MB_EIO, "%s: no such file or directory", path);
    } else if (mb_is_dir(path)) {
        if (!(rc = mb_path_join(p, sizeof p, path, "model.safetensors.index.json")) && exists(p)) {
            rc = open_index(s, p);
        } else if (!rc && !(rc = mb_path_join(p, sizeof p, path, "model.safetensors")) && exists(p)) {
            rc = set_add(s, p);
            if (!rc) rc = set_index(s);
        } else if (!rc) {
            DIR *d = opendir(path);
            if (!d) { rc = mb_fail(MB_EIO, "%s: cannot open directory: %s", path, strerror(errno)); goto done; }
            char **names = NULL;
            size_t nn = 0;
            struct dirent *de;
            errno = 0;
            while ((de = readdir(d))) {
                if (!ends_with(de->d_name, ".safetensors")) continue;
                char **nb = realloc(names, (nn + 1) * sizeof *nb);
                if (!nb || !(nb[nn] = strdup(de->d_name))) { names = nb ? nb : names; rc = mb_fail(MB_ENOMEM, "out of memory"); break; }
                names = nb;
                nn++;
                errno = 0;
            }
            if (!rc && errno) rc = mb_fail(MB_EIO, "%s: reading the directory: %s", path, strerror(errno));
            closedir(d);
            if (!rc && nn == 0) { /* PyTorch checkpoints, read without unpickling (torchbin.c) */
                char bin[4096];
                if (!mb_path_join(bin, sizeof bin, path, "pytorch_model.bin.index.json") && mb_file_exists(bin))
                    rc = open_index(s, bin);
                else if (!mb_path_join(bin, sizeof bin, path, "pytorch_model.bin") && mb_file_exists(bin)) {
                    if (!(rc = set_add(s, bin))) rc = set_index(s);
                } else
                    rc = mb_fail(MB_EIO, "%s: no .safetensors files (nor pytorch_model.bin) in the directory", path);
                free(names);
                goto done;
            }
            if (!rc) qsort(names, nn, sizeof *names, cmp_str);
            for (size_t i = 0; i < nn && !rc; i++) {
                rc = mb_path_join(p, sizeof p, path, names[i]);
                if (!rc) rc = set_add(s, p);
            }
            for (size_t i = 0; i < nn; i++) free(names[i]);
            free(names);
            if (!rc) rc = set_index(s);
        }
    } else if (ends_with(path, ".json")) {
        rc = open_index(s, path);
    } else {
        rc = set_add(s, path);
        if (!rc) rc = set_index(s);
    }
done:
    if (rc) { mb_st_set_close(s); return rc; }
    *out = s;
    return 0;
}

const struct mb_tensor_info *mb_st_find(const struct mb_st_set *s, const char *name) {
    int lo = 0, hi = s->n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2, c = strcmp(s->sorted[mid]->name, name);
        if (c == 0) return s->sorted[mid];
        if (c < 0) lo = mid + 1; else hi = mid - 1;
    }
    return NULL;
}

int mb_st_get(const struct mb_st_set *s, const char *name, const struct mb_tensor_info **out) {
    *out = mb_st_find(s, name);
    if (!*out) return mb_fail(MB_EFORMAT, "%s: tensor %s not found", s->path, name);
    return 0;
}

/* ---- writer ---- */
static int cmp_entry_ptr(const void *a, const void *b) {
    return strcmp((*(const struct mb_st_entry *const *)a)->name, (*(const struct mb_st_entry *const *)b)->name);
}

static size_t entry_bytes(const struct mb_st_entry *e) {
    size_t n = mb_dtype_size(e->dtype);
    for (int d = 0; d < e->ndim; d++) n *= (size_t)e->shape[d];
    return n;
}

/* write entries (already in the desired order) to one file */
static int write_file(const char *path, const struct mb_st_entry *const *e, int n, const char *const *meta, int n_meta) {
    json_t *root = json_object();
    if (!root) return mb_fail(MB_ENOMEM, "out of memory");
    int rc = 0;
    if (n_meta > 0) {
        json_t *m = json_object();
        for (int i = 0; i < n_meta; i++) json_object_set_new(m, meta[2 * i], json_string(meta[2 * i + 1]));
        json_object_set_new(root, "__metadata__", m);
    }
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        if (e[i]->ndim < 0 || e[i]->ndim > MB_MAX_DIMS) { rc = mb_fail(MB_EINVAL, "%s: tensor %s: bad rank %d", path, e[i]->name, e[i]->ndim); break; }
        if (json_object_get(root, e[i]->name)) { rc = mb_fail(MB_EINVAL, "%s: tensor %s written twice", path, e[i]->name); break; }
        json_t *t = json_object(), *sh = json_array();
        json_object_set_new(t, "dtype", json_string(mb_dtype_name(e[i]->dtype)));
        for (int d = 0; d < e[i]->ndim; d++) json_array_append_new(sh, json_integer(e[i]->shape[d]));
        json_object_set_new(t, "shape", sh);
        size_t nb = entry_bytes(e[i]);
        json_t *o = json_array();
        json_array_append_new(o, json_integer((json_int_t)off));
        json_array_append_new(o, json_integer((json_int_t)(off + nb)));
        json_object_set_new(t, "data_offsets", o);
        json_object_set_new(root, e[i]->name, t);
        off += nb;
    }
    char *hdr = rc ? NULL : json_dumps(root, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(root);
    if (rc) return rc;
    if (!hdr) return mb_fail(MB_ENOMEM, "%s: cannot serialize header", path);
    size_t hl = strlen(hdr), padded = (hl + 7) & ~(size_t)7;
    struct mb_atomic_file af;
    rc = mb_atomic_open(&af, path);
    if (rc) { free(hdr); return rc; }
    uint8_t lenb[8];
    for (int i = 0; i < 8; i++) lenb[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    int ok = fwrite(lenb, 1, 8, af.f) == 8 && fwrite(hdr, 1, hl, af.f) == hl;
    for (size_t i = hl; ok && i < padded; i++) ok = fputc(' ', af.f) != EOF;
    free(hdr);
    for (int i = 0; ok && i < n; i++) {
        size_t nb = entry_bytes(e[i]);
        if (nb) ok = fwrite(e[i]->data, 1, nb, af.f) == nb;
    }
    if (!ok) {
        int er = errno;
        mb_atomic_abort(&af);
        return mb_fail(MB_EIO, "%s: write failed: %s", path, strerror(er));
    }
    return mb_atomic_commit(&af);
}

/* entries sorted by name, after checking every rank and byte size (entry_bytes is then safe) */
static int sorted_entries(const char *path, const struct mb_st_entry *e, int n, const struct mb_st_entry ***out) {
    *out = NULL;
    for (int i = 0; i < n; i++) {
        size_t nb;
        char what[300];
        int rc;
        if (e[i].ndim < 0 || e[i].ndim > MB_MAX_DIMS) return mb_fail(MB_EINVAL, "%s: tensor %s: bad rank %d", path, e[i].name, e[i].ndim);
        snprintf(what, sizeof what, "%s: tensor %s: byte size", path, e[i].name);
        if ((rc = mb_size_mul_n(&nb, (size_t)INT64_MAX, what, e[i].shape, e[i].ndim)) ||
            (rc = mb_size_mul(&nb, (size_t)INT64_MAX, what, (int64_t)nb, mb_dtype_size(e[i].dtype))))
            return rc;
    }
    const struct mb_st_entry **s = malloc((n > 0 ? (size_t)n : 1) * sizeof *s);
    if (!s) return mb_fail(MB_ENOMEM, "out of memory");
    for (int i = 0; i < n; i++) s[i] = &e[i];
    qsort(s, n, sizeof *s, cmp_entry_ptr);
    *out = s;
    return 0;
}

int mb_st_write(const char *path, const struct mb_st_entry *e, int n, const char *const *meta_kv, int n_meta) {
    const struct mb_st_entry **s;
    int rc = sorted_entries(path, e, n, &s);
    if (rc) return rc;
    rc = write_file(path, s, n, meta_kv, n_meta);
    free(s);
    return rc;
}

int mb_st_write_sharded(const char *dir, const char *base, const struct mb_st_entry *e, int n,
                        const char *const *meta_kv, int n_meta, size_t max_shard_bytes, int *n_shards_out) {
    const struct mb_st_entry **s;
    int rc = sorted_entries(dir, e, n, &s);
    if (rc) return rc;
    /* assign shards greedily in name order */
    int *shard = malloc((n > 0 ? (size_t)n : 1) * sizeof *shard), ns = 1;
    size_t cur = 0, total = 0;
    if (!shard) { free(s); return mb_fail(MB_ENOMEM, "out of memory"); }
    for (int i = 0; i < n; i++) {
        size_t b = entry_bytes(s[i]);
        if (max_shard_bytes && cur > 0 && cur + b > max_shard_bytes) { ns++; cur = 0; }
        shard[i] = ns - 1;
        cur += b;
        total += b;
    }
    char path[4096], fname[512];
    if (ns == 1) {
        snprintf(fname, sizeof fname, "%s.safetensors", base);
        rc = mb_path_join(path, sizeof path, dir, fname);
        if (!rc) rc = write_file(path, s, n, meta_kv, n_meta);
    } else {
        json_t *wm = json_object();
        for (int k = 0, i0 = 0; k < ns && !rc; k++) {
            int i1 = i0;
            while (i1 < n && shard[i1] == k) i1++;
            snprintf(fname, sizeof fname, "%s-%05d-of-%05d.safetensors", base, k + 1, ns);
            rc = mb_path_join(path, sizeof path, dir, fname);
            if (!rc) rc = write_file(path, s + i0, i1 - i0, meta_kv, n_meta);
            for (int i = i0; i < i1; i++) json_object_set_new(wm, s[i]->name, json_string(fname));
            i0 = i1;
        }
        if (!rc) {
            json_t *root = json_object(), *md = json_object();
            json_object_set_new(md, "total_size", json_integer((json_int_t)total));
            json_object_set_new(root, "metadata", md);
            json_object_set(root, "weight_map", wm);
            char *txt = json_dumps(root, JSON_INDENT(2) | JSON_SORT_KEYS);
            json_decref(root);
            snprintf(fname, sizeof fname, "%s.safetensors.index.json", base);
            rc = mb_path_join(path, sizeof path, dir, fname);
            if (!rc && !txt) rc = mb_fail(MB_ENOMEM, "out of memory");
            if (!rc) {
                rc = mb_write_file_atomic(path, txt, strlen(txt));
            }
            free(txt);
        }
        json_decref(wm);
    }
    free(shard);
    free(s);
    if (!rc && n_shards_out) *n_shards_out = ns;
    return rc;
}
