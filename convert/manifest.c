/* convert/manifest.c: mixbit-manifest.json (size and SHA-256 of every file of an output directory) and
 * `mixbit verify` (the files against the manifest, the checkpoint against config.json, every EXL2 layer's
 * structure). See convert.h.
 *
 * mixbit-manifest.json:
 *   {"files": [{"path": "config.json", "bytes": 1234, "sha256": "<64 lowercase hex>"}, ...]}
 *   sorted by path (byte order), every regular file under OUT_DIR with its path relative to OUT_DIR ('/'
 *   between folders), except the manifest itself and names starting with '.' (.git, .gitattributes,
 *   .cache/huggingface: what version control and Hub downloads add beside the files).
 *
 * SHA-256 comes from libcrypto (EVP API), fed in 4 MiB reads so an 8 GB shard needs no more memory. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>
#include <openssl/evp.h>

#include "../formats/formats.h"
#include "convert.h"

#define HASH_CHUNK ((size_t)4 << 20) /* bytes per read: large enough that syscalls cost nothing next to hashing */
#define MAX_DEPTH 16                 /* folder nesting we follow (also stops symlink loops) */
#define MANIFEST_MAX ((size_t)64 << 20) /* a manifest of 64 MB would list some 500k files: refuse beyond */

struct mfile {
    char *path; /* relative to OUT_DIR, owned */
    int64_t bytes;
    char sha[65];
};

struct flist {
    struct mfile *f;
    int n, cap;
};

static void flist_free(struct flist *l) {
    if (!l) return;
    for (int i = 0; i < l->n; i++) free(l->f[i].path);
    free(l->f);
    memset(l, 0, sizeof *l);
}

static int flist_add(struct flist *l, const char *path, int64_t bytes, const char *sha) {
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 32;
        struct mfile *nf = realloc(l->f, (size_t)cap * sizeof *nf);
        if (!nf) return mb_fail(MB_ENOMEM, "out of memory");
        l->f = nf;
        l->cap = cap;
    }
    struct mfile *m = &l->f[l->n];
    memset(m, 0, sizeof *m);
    if (!(m->path = strdup(path))) return mb_fail(MB_ENOMEM, "out of memory");
    m->bytes = bytes;
    if (sha) snprintf(m->sha, sizeof m->sha, "%s", sha);
    l->n++;
    return 0;
}

static int cmp_path(const void *a, const void *b) { return strcmp(((const struct mfile *)a)->path, ((const struct mfile *)b)->path); }

/* every regular file under root/rel (rel "" at the top), recursively, into l */
static int walk(const char *root, const char *rel, int depth, struct flist *l) {
    char dir[4096];
    if (rel[0]) { if (mb_path_join(dir, sizeof dir, root, rel)) return mb_fail(MB_EINVAL, "%s/%s: path too long", root, rel); }
    else snprintf(dir, sizeof dir, "%s", root);
    if (depth > MAX_DEPTH) return mb_fail(MB_EINVAL, "%s: folders nested deeper than %d", dir, MAX_DEPTH);
    DIR *d = opendir(dir);
    if (!d) return mb_fail(MB_EIO, "%s: cannot open: %s", dir, strerror(errno));
    int rc = 0;
    struct dirent *de;
    while (!rc && (de = readdir(d))) {
        const char *nm = de->d_name;
        if (nm[0] == '.') continue; /* ., .., and version-control / download-cache entries */
        if (!rel[0] && !strcmp(nm, MB_MANIFEST_NAME)) continue;
        char r[4096], full[4096];
        if (rel[0]) { if (snprintf(r, sizeof r, "%s/%s", rel, nm) >= (int)sizeof r) { rc = mb_fail(MB_EINVAL, "%s/%s: path too long", dir, nm); break; } }
        else snprintf(r, sizeof r, "%s", nm);
        if (mb_path_join(full, sizeof full, root, r)) { rc = mb_fail(MB_EINVAL, "%s/%s: path too long", dir, nm); break; }
        struct stat st;
        if (stat(full, &st) != 0) { rc = mb_fail(MB_EIO, "%s: %s", full, strerror(errno)); break; }
        if (S_ISDIR(st.st_mode)) rc = walk(root, r, depth + 1, l);
        else if (S_ISREG(st.st_mode)) rc = flist_add(l, r, (int64_t)st.st_size, NULL);
        else rc = mb_fail(MB_EINVAL, "%s: not a regular file or folder", full);
    }
    closedir(d);
    return rc;
}

static int list_dir(const char *root, struct flist *l) {
    memset(l, 0, sizeof *l);
    if (!mb_is_dir(root)) return mb_fail(MB_EIO, "%s: no such directory", root);
    int rc = walk(root, "", 0, l);
    if (rc) { flist_free(l); return rc; }
    if (l->n) qsort(l->f, (size_t)l->n, sizeof *l->f, cmp_path);
    return 0;
}

/* SHA-256 of a file as lowercase hex; *bytes receives its size. prog (optional) advances by bytes read
 * (pdone: bytes before this file). */
static int sha256_file(const char *path, int64_t *bytes, char hex[65], struct mb_progress *prog, int64_t pdone) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return mb_fail(MB_EIO, "%s: cannot open: %s", path, strerror(errno));
    unsigned char *buf = malloc(HASH_CHUNK);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int rc = 0;
    int64_t n = 0;
    if (!buf || !ctx) { rc = mb_fail(MB_ENOMEM, "%s: out of memory", path); goto fail; }
    if (EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1) { rc = mb_fail(MB_EIO, "%s: libcrypto: SHA-256 unavailable", path); goto fail; }
#ifdef POSIX_FADV_SEQUENTIAL
    posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
#endif
    for (;;) {
        ssize_t r = read(fd, buf, HASH_CHUNK);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { rc = mb_fail(MB_EIO, "%s: read error: %s", path, strerror(errno)); goto fail; }
        if (r == 0) break;
        if (EVP_DigestUpdate(ctx, buf, (size_t)r) != 1) { rc = mb_fail(MB_EIO, "%s: libcrypto: SHA-256 update failed", path); goto fail; }
        n += r;
        if (prog) mb_progress_update(prog, (pdone + n) >> 20);
    }
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (EVP_DigestFinal_ex(ctx, md, &mdlen) != 1 || mdlen != 32) { rc = mb_fail(MB_EIO, "%s: libcrypto: SHA-256 failed", path); goto fail; }
    for (int i = 0; i < 32; i++) snprintf(hex + 2 * i, 3, "%02x", md[i]);
    *bytes = n;
fail:
    EVP_MD_CTX_free(ctx);
    free(buf);
    close(fd);
    return rc;
}

static int64_t total_bytes(const struct flist *l) {
    int64_t t = 0;
    for (int i = 0; i < l->n; i++) t += l->f[i].bytes;
    return t;
}

/* hash every file of l (paths relative to dir), filling bytes and sha */
static int hash_all(const char *dir, struct flist *l) {
    struct mb_progress prog;
    mb_progress_begin(&prog, "hashing", "MiB", total_bytes(l) >> 20);
    int64_t done = 0;
    for (int i = 0; i < l->n; i++) {
        char p[4096];
        if (mb_path_join(p, sizeof p, dir, l->f[i].path)) return mb_fail(MB_EINVAL, "%s/%s: path too long", dir, l->f[i].path);
        int rc = sha256_file(p, &l->f[i].bytes, l->f[i].sha, &prog, done);
        if (rc) return rc;
        done += l->f[i].bytes;
    }
    mb_progress_end(&prog);
    return 0;
}

static int write_manifest(const char *dir, const struct flist *l) {
    json_t *root = json_object(), *arr = json_array();
    int rc = 0;
    char *s = NULL;
    if (!root || !arr) { json_decref(root); json_decref(arr); return mb_fail(MB_ENOMEM, "out of memory"); }
    json_object_set_new(root, "files", arr);
    for (int i = 0; i < l->n; i++) {
        json_t *o = json_pack("{s:s, s:I, s:s}", "path", l->f[i].path, "bytes", (json_int_t)l->f[i].bytes, "sha256", l->f[i].sha);
        if (!o || json_array_append_new(arr, o)) { rc = mb_fail(MB_EINVAL, "%s: cannot record %s (not UTF-8?)", dir, l->f[i].path); goto fail; }
    }
    s = json_dumps(root, JSON_INDENT(1) | JSON_PRESERVE_ORDER);
    if (!s) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto fail; }
    size_t n = strlen(s);
    char *t = realloc(s, n + 2);
    if (!t) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto fail; }
    s = t;
    s[n++] = '\n';
    char p[4096];
    if (mb_path_join(p, sizeof p, dir, MB_MANIFEST_NAME)) { rc = mb_fail(MB_EINVAL, "%s: path too long", dir); goto fail; }
    rc = mb_write_file_atomic(p, s, n);
fail:
    free(s);
    json_decref(root);
    return rc;
}

int mb_manifest_write(const char *out_dir) {
    struct flist l;
    int rc = list_dir(out_dir, &l);
    if (rc) return rc;
    rc = hash_all(out_dir, &l);
    if (!rc) rc = write_manifest(out_dir, &l);
    flist_free(&l);
    return rc;
}

/* a manifest path must name a file inside OUT_DIR: relative, no empty, "." or ".." component, no
 * component starting with '.', no backslash or control character */
static int safe_rel_path(const char *p) {
    if (!p[0] || p[0] == '/') return 0;
    for (const char *c = p; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == '\\') return 0;
    const char *s = p;
    for (;;) {
        const char *e = strchr(s, '/');
        size_t n = e ? (size_t)(e - s) : strlen(s);
        if (n == 0 || s[0] == '.') return 0;
        if (!e) break;
        s = e + 1;
    }
    return 1;
}

/* read and check mixbit-manifest.json of dir into l (sorted, unique, safe paths) */
static int read_manifest(const char *dir, struct flist *l) {
    memset(l, 0, sizeof *l);
    char p[4096];
    if (mb_path_join(p, sizeof p, dir, MB_MANIFEST_NAME)) return mb_fail(MB_EINVAL, "%s: path too long", dir);
    if (!mb_file_exists(p)) return mb_fail(MB_EIO, "%s: no %s (it is written at the end of a conversion)", dir, MB_MANIFEST_NAME);
    char *text = NULL;
    size_t len;
    int rc = mb_read_file(p, &text, &len, MANIFEST_MAX);
    if (rc) return rc;
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    free(text);
    if (!root) return mb_fail(MB_EFORMAT, "%s: invalid JSON: %s (line %d)", p, jerr.text, jerr.line);
    json_t *arr = json_object_get(root, "files");
    if (!json_is_object(root) || !json_is_array(arr)) { rc = mb_fail(MB_EFORMAT, "%s: expected {\"files\": [...]}", p); goto fail; }
    for (size_t i = 0; i < json_array_size(arr); i++) {
        json_t *o = json_array_get(arr, i), *jp = json_object_get(o, "path"), *jb = json_object_get(o, "bytes"), *js = json_object_get(o, "sha256");
        if (!json_is_string(jp) || !json_is_integer(jb) || !json_is_string(js)) {
            rc = mb_fail(MB_EFORMAT, "%s: files[%zu]: expected {\"path\": string, \"bytes\": integer, \"sha256\": string}", p, i);
            goto fail;
        }
        const char *path = json_string_value(jp), *sha = json_string_value(js);
        if (!safe_rel_path(path) || strlen(path) >= 4000) { rc = mb_fail(MB_EFORMAT, "%s: files[%zu]: path \"%.200s\" is not a plain name inside the directory", p, i, path); goto fail; }
        int hex = strlen(sha) == 64;
        for (int k = 0; hex && k < 64; k++) hex = (sha[k] >= '0' && sha[k] <= '9') || (sha[k] >= 'a' && sha[k] <= 'f');
        if (!hex) { rc = mb_fail(MB_EFORMAT, "%s: %s: sha256 is not 64 lowercase hex digits", p, path); goto fail; }
        if (json_integer_value(jb) < 0) { rc = mb_fail(MB_EFORMAT, "%s: %s: negative size", p, path); goto fail; }
        if (l->n && strcmp(l->f[l->n - 1].path, path) >= 0) { rc = mb_fail(MB_EFORMAT, "%s: %s: paths not sorted or listed twice", p, path); goto fail; }
        if ((rc = flist_add(l, path, (int64_t)json_integer_value(jb), sha))) goto fail;
    }
    json_decref(root);
    return 0;
fail:
    json_decref(root);
    flist_free(l);
    return rc;
}

int mb_manifest_refresh(const char *out_dir, const char *const *names, int n) {
    struct flist l;
    int rc = read_manifest(out_dir, &l);
    if (rc) return rc;
    for (int i = 0; i < n && !rc; i++) {
        char p[4096], sha[65];
        int64_t bytes;
        if (!safe_rel_path(names[i]) || mb_path_join(p, sizeof p, out_dir, names[i])) { rc = mb_fail(MB_EINVAL, "%s: not a plain name inside %s", names[i], out_dir); break; }
        if ((rc = sha256_file(p, &bytes, sha, NULL, 0))) break;
        int k = 0;
        while (k < l.n && strcmp(l.f[k].path, names[i])) k++;
        if (k == l.n && (rc = flist_add(&l, names[i], bytes, sha))) break;
        l.f[k].bytes = bytes;
        memcpy(l.f[k].sha, sha, sizeof sha);
    }
    if (!rc) {
        qsort(l.f, (size_t)l.n, sizeof *l.f, cmp_path);
        rc = write_manifest(out_dir, &l);
    }
    flist_free(&l);
    return rc;
}

/* every EXL2 layer of an open model: the one validator (group table, row counts, permutation) plus
 * q_scale_max values finite and > 0. *layers receives the count. */
static int check_exl2_layers(const struct mb_model *m, int *layers) {
    *layers = 0;
    for (int i = 0; i < m->n_ex; i++) {
        const struct mb_expect *e = &m->ex[i];
        if (e->kind != MB_T_LINEAR && e->kind != MB_T_HEAD) continue;
        char nm[192];
        snprintf(nm, sizeof nm, "%s.q_weight", e->name);
        if (!mb_st_find(m->st, nm)) continue; /* kept in float (checked by mb_model_open) */
        struct mb_exl2_layer L;
        int rc = mb_exl2_from_set(m->st, e->name, e->rows, e->cols, &L);
        if (rc) return rc;
        for (int64_t g = 0; g < L.G; g++) {
            float s = mb_f16_to_f32((uint16_t)mb_exl2_i16(L.q_scale_max, g));
            if (!isfinite(s) || s <= 0)
                return mb_fail(MB_EFORMAT, "%s: %s.q_scale_max[%lld] = %g (a group scale must be finite and > 0)", m->st->path, e->name, (long long)g, s);
        }
        (*layers)++;
    }
    return 0;
}

int mb_verify_ex(const char *out_dir, struct mb_verify_info *info) {
    struct flist want = {0}, have = {0};
    struct mb_model *m = NULL;
    int rc;
    if (info) memset(info, 0, sizeof *info);
    if ((rc = read_manifest(out_dir, &want))) goto fail;
    if ((rc = list_dir(out_dir, &have))) goto fail;
    /* 1. the same names, the same sizes (cheap, first); walk both sorted lists together so that the first
     * problem by name is the one reported */
    for (int i = 0, j = 0; i < want.n || j < have.n;) {
        int c = i == want.n ? 1 : j == have.n ? -1 : strcmp(want.f[i].path, have.f[j].path);
        if (c < 0) { rc = mb_fail(MB_EFORMAT, "%s: %s is listed in %s but missing", out_dir, want.f[i].path, MB_MANIFEST_NAME); goto fail; }
        if (c > 0) { rc = mb_fail(MB_EFORMAT, "%s: %s is not in %s (a file added after the conversion)", out_dir, have.f[j].path, MB_MANIFEST_NAME); goto fail; }
        if (want.f[i].bytes != have.f[j].bytes) {
            rc = mb_fail(MB_EFORMAT, "%s: %s has %lld bytes, %s says %lld (truncated or changed)", out_dir, have.f[j].path, (long long)have.f[j].bytes,
                         MB_MANIFEST_NAME, (long long)want.f[i].bytes);
            goto fail;
        }
        i++, j++;
    }
    /* 2. the contents */
    if ((rc = hash_all(out_dir, &have))) goto fail;
    for (int i = 0; i < have.n; i++) {
        if (have.f[i].bytes != want.f[i].bytes) { /* changed while we read it */
            rc = mb_fail(MB_EFORMAT, "%s: %s has %lld bytes, %s says %lld", out_dir, have.f[i].path, (long long)have.f[i].bytes, MB_MANIFEST_NAME, (long long)want.f[i].bytes);
            goto fail;
        }
        if (strcmp(have.f[i].sha, want.f[i].sha)) {
            rc = mb_fail(MB_EFORMAT, "%s: %s: sha256 %.16s... differs from %s (%.16s...): the file changed after the conversion", out_dir, have.f[i].path,
                         have.f[i].sha, MB_MANIFEST_NAME, want.f[i].sha);
            goto fail;
        }
    }
    /* 3. safetensors headers, every tensor config.json implies with its dtype and shape, nothing else */
    if ((rc = mb_model_open(out_dir, &m))) { rc = mb_fail_ctx(rc, "%s: model check", out_dir); goto fail; }
    if (!m->cfg.is_exl2) { rc = mb_fail(MB_EFORMAT, "%s: config.json has no exl2 quantization_config", out_dir); goto fail; }
    /* 4. every EXL2 layer's structure */
    int layers = 0;
    if ((rc = check_exl2_layers(m, &layers))) goto fail;
    if (layers == 0) { rc = mb_fail(MB_EFORMAT, "%s: no EXL2 layer found", out_dir); goto fail; }
    if (info) {
        info->files = have.n;
        info->bytes = total_bytes(&have);
        info->tensors = m->st->n;
        info->exl2_layers = layers;
        snprintf(info->arch, sizeof info->arch, "%s", m->cfg.arch_name);
    }
fail:
    mb_model_close(m);
    flist_free(&want);
    flist_free(&have);
    return rc;
}

int mb_verify(const char *out_dir) { return mb_verify_ex(out_dir, NULL); }
