/* bench/bench_torchbin.c: the cost of opening a PyTorch .bin archive (zip checks, pickle, CRC-32 of every
 * storage) and of writing it back as safetensors.
 *   bench_torchbin [SIZE_MB] [DIR] [--deflate]
 * Writes DIR/bench_torchbin.bin (default 2048 MB in 15 F32 tensors, stored and 64-byte aligned like
 * torch.save, zip64 records) with tests/torchbin_writer.h, then times mb_torch_open 5 times (warm page
 * cache: the file was just written) and one mb_st_write of all tensors, prints medians and GB/s, and
 * removes both files. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../formats/formats.h"
#include "../tests/torchbin_writer.h"

static int cmp_d(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }

int main(int argc, char **argv) {
    long mb = argc > 1 ? atol(argv[1]) : 2048;
    const char *dir = argc > 2 ? argv[2] : "/tmp";
    int defl = argc > 3 && !strcmp(argv[3], "--deflate");
    enum { NT = 15 };
    long m = mb * (1L << 20) / 4 / NT / 1024 * 1024; /* floats per tensor, a multiple of 1024 */
    if (m <= 0) { fprintf(stderr, "usage: bench_torchbin [SIZE_MB] [DIR] [--deflate]\n"); return 2; }
    float *data = malloc((size_t)m * 4 * NT);
    if (!data) { perror("malloc"); return 1; }
    for (long i = 0; i < m * NT; i++) data[i] = (float)(i % 1000) * 0.001f;
    struct buf pk = {0}, z = {0};
    pk_begin(&pk);
    b_u8(&pk, '}');
    b_u8(&pk, '(');
    char keys[NT][16], names[NT][32];
    struct zm zm[NT + 1];
    for (int i = 0; i < NT; i++) {
        char nm[64];
        snprintf(nm, sizeof nm, "model.layers.%d.weight", i);
        snprintf(keys[i], sizeof keys[i], "%d", i);
        snprintf(names[i], sizeof names[i], "archive/data/%d", i);
        int64_t sh[2] = {m / 1024, 1024}, st[2] = {1024, 1};
        pk_str(&pk, nm);
        pk_tensor(&pk, "FloatStorage", keys[i], m, 0, 2, sh, st);
        zm[i + 1] = (struct zm){names[i], data + m * i, (size_t)m * 4, defl};
    }
    b_u8(&pk, 'u');
    b_u8(&pk, '.');
    zm[0] = (struct zm){"archive/data.pkl", pk.p, pk.n, 0};
    struct zopt o = {.align = 1, .zip64 = 1};
    static struct zinfo zi;
    zip_build(&z, zm, NT + 1, &o, &zi);
    free(data);
    char path[4096], out[4200];
    snprintf(path, sizeof path, "%s/bench_torchbin.bin", dir);
    snprintf(out, sizeof out, "%s/bench_torchbin.safetensors", dir);
    if (mb_write_file_atomic(path, z.p, z.n)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
    size_t file_size = z.n;
    b_free(&z);
    b_free(&pk);
    double t[5];
    struct mb_st_file *f = NULL;
    for (int r = 0; r < 5; r++) {
        double t0 = mb_now();
        if (mb_torch_open(path, &f)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
        t[r] = mb_now() - t0;
        if (r < 4) mb_st_close(f);
    }
    qsort(t, 5, sizeof *t, cmp_d);
    size_t bytes = 0;
    struct mb_st_entry e[NT];
    for (int i = 0; i < f->n; i++) {
        const struct mb_tensor_info *ti = &f->t[i];
        e[i] = (struct mb_st_entry){ti->name, ti->dtype, ti->ndim, {ti->shape[0], ti->shape[1]}, ti->data};
        bytes += ti->nbytes;
    }
    double t0 = mb_now();
    if (mb_st_write(out, e, f->n, NULL, 0)) { fprintf(stderr, "%s\n", mb_errmsg()); return 1; }
    double tw = mb_now() - t0;
    printf("archive %.1f MB (%s), %d tensors, %.1f MB of data\n", file_size / 1e6, defl ? "deflated" : "stored", f->n, bytes / 1e6);
    printf("mb_torch_open: median %.3f s of 5 (min %.3f, max %.3f), %.2f GB/s of tensor data\n", t[2], t[0], t[4], bytes / t[2] / 1e9);
    printf("mb_st_write (safetensors, fsync): %.3f s, %.2f GB/s\n", tw, bytes / tw / 1e9);
    mb_st_close(f);
    unlink(path);
    unlink(out);
    return 0;
}
