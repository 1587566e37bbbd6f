/* convert/convert_weights.c: `mixbit convert-weights`: a PyTorch checkpoint (.bin, single or sharded with
 * pytorch_model.bin.index.json) to safetensors with the same tensor names, dtypes, values and sharding.
 * The pickle is never run (formats/torchbin.c). Every input file is read and checked before anything is
 * written; a directory output is built under OUT.tmp.<pid> and renamed onto OUT when complete, so a
 * failure leaves nothing under OUT. */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../formats/formats.h"
#include "convert.h"

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

static const char *base_name(const char *p) {
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

/* Files beside the weights that a model directory needs (config, tokenizer, generation settings, card,
 * license); weights, indexes and hidden files are not copied. */
static int side_file(const char *name) {
    if (name[0] == '.' || ends_with(name, ".index.json")) return 0;
    static const char *const keep[] = {".json", ".model", ".txt", ".md", ".jinja", ".tiktoken"};
    for (size_t i = 0; i < sizeof keep / sizeof *keep; i++)
        if (ends_with(name, keep[i])) return 1;
    return strncmp(name, "LICENSE", 7) == 0;
}

/* remove a directory this job created, with the regular files in it */
static void remove_tree(const char *dir) {
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *de;
        char p[4400];
        while ((de = readdir(d)))
            if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..") && !mb_path_join(p, sizeof p, dir, de->d_name)) unlink(p);
        closedir(d);
    }
    rmdir(dir);
}

/* 1 when path is an empty directory */
static int empty_dir(const char *path) {
    DIR *d = opendir(path);
    if (!d) return 0;
    struct dirent *de;
    int empty = 1;
    while (empty && (de = readdir(d))) empty = !strcmp(de->d_name, ".") || !strcmp(de->d_name, "..");
    closedir(d);
    return empty;
}

/* "pytorch_model-00001-of-00002.bin" -> "model-00001-of-00002.safetensors" (the Hugging Face names) */
static int shard_name(const char *in, char *out, size_t n) {
    const char *b = base_name(in);
    size_t len = strlen(b);
    static const char *const ext[] = {".bin", ".pth", ".pt"};
    for (size_t i = 0; i < 3; i++)
        if (ends_with(b, ext[i])) { len -= strlen(ext[i]); break; }
    const char *stem = b;
    if (!strncmp(b, "pytorch_model", 13)) { stem = b + 8; len -= 8; } /* keep "model..." */
    int k = snprintf(out, n, "%.*s.safetensors", (int)len, stem);
    if (k < 0 || (size_t)k >= n) return mb_fail(MB_EINVAL, "%s: file name too long", in);
    return 0;
}

/* the entries of one file (views; nothing copied) */
static int entries_of(const struct mb_st_file *f, struct mb_st_entry *e) {
    for (int i = 0; i < f->n; i++) {
        const struct mb_tensor_info *t = &f->t[i];
        e[i].name = t->name;
        e[i].dtype = t->dtype;
        e[i].ndim = t->ndim;
        memcpy(e[i].shape, t->shape, sizeof e[i].shape);
        e[i].data = t->data;
    }
    return f->n;
}

int mb_convert_weights(const struct mb_convert_weights_params *p) {
    struct mb_st_set *st = NULL;
    struct mb_st_entry *e = NULL;
    json_t *wm = NULL;
    char src[4096], tmp[4200] = "", srcdir[4096];
    int rc = 0, indexed = 0, copy_side = 0;
    const char *meta[] = {"format", "pt"};

    /* what the input is */
    if (mb_is_dir(p->in)) {
        snprintf(srcdir, sizeof srcdir, "%s", p->in);
        copy_side = 1;
        if ((rc = mb_path_join(src, sizeof src, p->in, "pytorch_model.bin.index.json"))) return rc;
        indexed = mb_file_exists(src);
        if (!indexed) {
            if ((rc = mb_path_join(src, sizeof src, p->in, "pytorch_model.bin"))) return rc;
            if (!mb_file_exists(src)) return mb_fail(MB_EIO, "%s: no pytorch_model.bin or pytorch_model.bin.index.json in the directory", p->in);
        }
    } else if (!mb_file_exists(p->in)) {
        return mb_fail(MB_EIO, "%s: no such file or directory", p->in);
    } else if (ends_with(p->in, ".index.json") || mb_torch_path(p->in)) {
        snprintf(src, sizeof src, "%s", p->in);
        indexed = ends_with(p->in, ".index.json");
    } else {
        return mb_fail(MB_EINVAL, "%s: not a PyTorch checkpoint (a .bin, .pt or .pth file, a .bin.index.json, or a directory with pytorch_model.bin)", p->in);
    }
    /* where the output goes: refused before any work when it is taken */
    int single = ends_with(p->out, ".safetensors");
    struct stat sb;
    if (single && lstat(p->out, &sb) == 0) return mb_fail(MB_EINVAL, "%s already exists; choose a new output path", p->out);
    if (!single && lstat(p->out, &sb) == 0 && !(S_ISDIR(sb.st_mode) && empty_dir(p->out)))
        return mb_fail(MB_EINVAL, "%s already exists and is not an empty directory; choose a new output directory", p->out);

    /* read and check every input file */
    if ((rc = mb_st_set_open(src, &st))) return rc;
    for (int i = 0; i < st->n_files; i++)
        if (!mb_torch_path(st->files[i]->path)) {
            rc = mb_fail(MB_EINVAL, "%s: lists %s, which is not a PyTorch .bin file", src, st->files[i]->path);
            goto out;
        }
    size_t total = 0;
    for (int i = 0; i < st->n; i++) total += st->sorted[i]->nbytes;
    e = calloc(st->n ? (size_t)st->n : 1, sizeof *e);
    if (!e) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto out; }

    if (single) { /* every tensor in one file, written atomically */
        int n = 0;
        for (int i = 0; i < st->n_files; i++) n += entries_of(st->files[i], e + n);
        if ((rc = mb_st_write(p->out, e, n, meta, 1))) goto out;
        printf("converted %s -> %s: %d tensors, %zu bytes, 1 file\n", p->in, p->out, n, total);
        goto out;
    }

    /* a directory: one safetensors file per input file, built beside OUT and renamed onto it */
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", p->out, (long)getpid());
    if (mkdir(tmp, 0755) != 0) { rc = mb_fail(MB_EIO, "%s: mkdir: %s", tmp, strerror(errno)); tmp[0] = 0; goto out; }
    wm = json_object();
    if (!wm) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto out; }
    for (int k = 0; k < st->n_files && !rc; k++) {
        const struct mb_st_file *f = st->files[k];
        char name[512], path[4800];
        if (!indexed) snprintf(name, sizeof name, "model.safetensors");
        else if ((rc = shard_name(f->path, name, sizeof name))) break;
        for (int j = 0; indexed && j < k; j++) { /* two inputs must not map to one output name */
            char other[512];
            if (!shard_name(st->files[j]->path, other, sizeof other) && !strcmp(other, name)) {
                rc = mb_fail(MB_EINVAL, "%s: %s and %s would both be written as %s", src, st->files[j]->path, f->path, name);
                break;
            }
        }
        if (rc) break;
        int n = entries_of(f, e);
        if ((rc = mb_path_join(path, sizeof path, tmp, name)) || (rc = mb_st_write(path, e, n, meta, 1))) break;
        for (int i = 0; i < n; i++) json_object_set_new(wm, f->t[i].name, json_string(name));
        mb_info("wrote %s (%d tensors, %d/%d)", name, n, k + 1, st->n_files);
    }
    if (rc) goto out;
    if (indexed) {
        json_t *root = json_object(), *md = json_object();
        json_object_set_new(md, "total_size", json_integer((json_int_t)total));
        json_object_set_new(root, "metadata", md);
        json_object_set(root, "weight_map", wm);
        char *txt = json_dumps(root, JSON_INDENT(2) | JSON_SORT_KEYS);
        json_decref(root);
        char path[4800];
        if (!txt) rc = mb_fail(MB_ENOMEM, "out of memory");
        else if (!(rc = mb_path_join(path, sizeof path, tmp, "model.safetensors.index.json"))) rc = mb_write_file_atomic(path, txt, strlen(txt));
        free(txt);
        if (rc) goto out;
    }
    int copied = 0;
    if (copy_side) {
        DIR *d = opendir(srcdir);
        if (!d) { rc = mb_fail(MB_EIO, "%s: cannot open directory: %s", srcdir, strerror(errno)); goto out; }
        struct dirent *de;
        while (!rc && (de = readdir(d))) {
            char a[4400], b[4800];
            if (!side_file(de->d_name)) continue;
            if (mb_path_join(a, sizeof a, srcdir, de->d_name) || !mb_file_exists(a)) continue;
            if (!(rc = mb_path_join(b, sizeof b, tmp, de->d_name)) && !(rc = mb_copy_file(a, b))) copied++;
        }
        closedir(d);
        if (rc) goto out;
    }
    if (rename(tmp, p->out) != 0) { rc = mb_fail(MB_EIO, "%s: cannot rename %s onto it: %s", p->out, tmp, strerror(errno)); goto out; }
    tmp[0] = 0;
    printf("converted %s -> %s: %d tensors, %zu bytes, %d file%s%s, %d side file%s copied\n", p->in, p->out, st->n, total, st->n_files,
           st->n_files == 1 ? "" : "s", indexed ? " + model.safetensors.index.json" : "", copied, copied == 1 ? "" : "s");
out:
    if (tmp[0]) remove_tree(tmp);
    json_decref(wm);
    free(e);
    mb_st_set_close(st);
    return rc;
}
