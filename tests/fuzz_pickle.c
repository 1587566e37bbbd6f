/* tests/fuzz_pickle.c: libFuzzer target for the PyTorch .bin reader (make fuzz-pickle): the zip parser,
 * the restricted pickle machine and the tensor assembly. An input starting with "PK" is a whole archive;
 * any other input is a pickle, wrapped here into a valid archive (members a/data.pkl and storages
 * a/data/0..3: 48 bytes, 6 bytes, empty, 64 bytes deflated; a/byteorder) so that mutations reach the pickle machine
 * instead of failing the CRC. Every input must either parse, with nbytes = numel * element size and every
 * byte of every tensor readable (inside the input, or in a buffer the file owns: ASan checks), or fail
 * with MB_EFORMAT, MB_EUNSUPPORTED or MB_ENOMEM.
 *
 * Built with -DFUZZ_SEED_MAIN instead, this file is a small program writing seed inputs into a directory:
 * state dicts over those storages in protocol 2 and 4, and their whole archives (plain, zip64). */
#include <stdint.h>
#include <stdlib.h>

#include "formats/formats.h"
#include "tests/torchbin_writer.h"

static const float st0[12] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
static const uint8_t st1[6] = {1, 2, 3, 4, 5, 6};
static const float st3[16] = {1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4};

static void wrap(const uint8_t *pkl, size_t n, struct buf *z, int zip64) {
    struct zm m[] = {{"a/data.pkl", pkl, n, 0}, {"a/data/0", st0, sizeof st0, 0}, {"a/data/1", st1, sizeof st1, 0},
                     {"a/data/2", "", 0, 0}, {"a/data/3", st3, sizeof st3, 1}, {"a/byteorder", "little", 6, 0}};
    struct zopt o = {.align = 1, .zip64 = zip64};
    struct zinfo zi;
    zip_build(z, m, 6, &o, &zi);
}

static void parse(const uint8_t *data, size_t size) {
    struct mb_st_file *f = NULL;
    int rc = mb_torch_parse("fuzz", data, size, &f);
    if (rc == 0) {
        for (int i = 0; i < f->n; i++) {
            const struct mb_tensor_info *t = &f->t[i];
            if (t->nbytes != (size_t)t->numel * mb_dtype_size(t->dtype) || t->ndim < 0 || t->ndim > MB_MAX_DIMS) abort();
            int in_input = (const uint8_t *)t->data >= data && (const uint8_t *)t->data <= data + size;
            if (in_input && (const uint8_t *)t->data + t->nbytes > data + size) abort();
            volatile uint8_t sum = 0;
            for (size_t k = 0; k < t->nbytes; k++) sum += ((const uint8_t *)t->data)[k];
        }
        mb_st_close(f);
    } else if (rc != MB_EFORMAT && rc != MB_EUNSUPPORTED && rc != MB_ENOMEM) {
        abort();
    }
}

#ifndef FUZZ_SEED_MAIN
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size >= 2 && data[0] == 'P' && data[1] == 'K') {
        parse(data, size);
    } else {
        struct buf z = {0};
        wrap(data, size, &z, 0);
        parse(z.p, z.n);
        b_free(&z);
    }
    return 0;
}
#else
/* seeds: state dicts whose storages match wrap()'s members */
static void seed_dict(struct buf *pk, int p4) {
    const int64_t sh34[] = {3, 4}, st34[] = {4, 1}, sh43[] = {4, 3}, st43[] = {1, 4}, st0s[] = {0, 1}, sh3[] = {3}, st1s[] = {1}, sh44[] = {4, 4}, sh0[] = {0};
    proto4 = p4;
    pk->n = 0;
    pk_begin(pk);
    if (p4) { pk_global(pk, "collections", "OrderedDict"); b_u8(pk, ')'); b_u8(pk, 'R'); }
    else b_u8(pk, '}');
    b_u8(pk, 'q'); b_u8(pk, 0);
    b_u8(pk, '(');
    pk_str(pk, "a"); pk_tensor(pk, "FloatStorage", "0", 12, 0, 2, sh34, st34);
    b_u8(pk, 'q'); b_u8(pk, 1); /* BINPUT 1: the tensor "a", tied below */
    pk_str(pk, "t"); pk_tensor(pk, "FloatStorage", "0", 12, 0, 2, sh43, st43);
    pk_str(pk, "e"); pk_tensor(pk, "FloatStorage", "0", 12, 4, 2, sh34, st0s);
    pk_str(pk, "s"); pk_tensor(pk, "FloatStorage", "0", 12, 3, 0, NULL, NULL);
    pk_str(pk, "h"); pk_tensor(pk, "ByteStorage", "1", 6, 0, 1, sh3, st1s);
    pk_str(pk, "z"); pk_tensor(pk, "ByteStorage", "2", 0, 0, 1, sh0, st1s);
    pk_str(pk, "d"); pk_tensor(pk, "FloatStorage", "3", 16, 0, 2, sh44, st34);
    pk_str(pk, "p");
    pk_global(pk, "torch._utils", "_rebuild_parameter");
    b_u8(pk, '(');
    pk_tensor(pk, "ByteStorage", "1", 6, 1, 1, sh3, st1s);
    b_u8(pk, 0x88);
    pk_global(pk, "collections", "OrderedDict"); b_u8(pk, ')'); b_u8(pk, 'R');
    b_u8(pk, 't'); b_u8(pk, 'R');
    pk_str(pk, "tied"); b_u8(pk, 'h'); b_u8(pk, 1); /* BINGET 1: the same tensor under a second name */
    b_u8(pk, 'u');
    if (p4) {
        b_u8(pk, '}'); pk_str(pk, "_metadata"); b_u8(pk, 'N'); b_u8(pk, 's'); b_u8(pk, 'b');
    }
    b_u8(pk, '.');
    proto4 = 0;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s DIR\n", argv[0]); return 2; }
    struct buf pk = {0}, z = {0};
    char path[4096];
    for (int p4 = 0; p4 < 2; p4++) {
        seed_dict(&pk, p4);
        wrap(pk.p, pk.n, &z, p4); /* the protocol 4 seed's archive has zip64 records */
        struct mb_st_file *f = NULL;
        if (mb_torch_parse("seed", z.p, z.n, &f) || f->n != 9) { fprintf(stderr, "seed %d does not parse: %s\n", p4, mb_errmsg()); return 1; }
        mb_st_close(f);
        snprintf(path, sizeof path, "%s/seed-pickle-p%d", argv[1], p4 ? 4 : 2);
        FILE *fp = fopen(path, "wb");
        if (!fp || fwrite(pk.p, 1, pk.n, fp) != pk.n || fclose(fp)) { perror(path); return 1; }
        snprintf(path, sizeof path, "%s/seed-archive-p%d", argv[1], p4 ? 4 : 2);
        fp = fopen(path, "wb");
        if (!fp || fwrite(z.p, 1, z.n, fp) != z.n || fclose(fp)) { perror(path); return 1; }
    }
    b_free(&pk);
    b_free(&z);
    return 0;
}
#endif
