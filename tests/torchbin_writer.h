/* tests/torchbin_writer.h: enough of torch.save's output to vary it in tests and fuzz seeds (test-only):
 * byte buffers, a pickle writer (protocol 2 as torch writes it, or protocol 4 opcodes with `proto4`)
 * and a zip writer (stored or deflated members, torch's 64-byte data alignment, zip64 records). All
 * functions are static; include it in one file per program. */
#ifndef MB_TORCHBIN_WRITER_H
#define MB_TORCHBIN_WRITER_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

struct buf { uint8_t *p; size_t n, cap; };

static inline void b_put(struct buf *b, const void *p, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        if (!b->p) { perror("realloc"); exit(1); }
    }
    if (n) memcpy(b->p + b->n, p, n);
    b->n += n;
}
static inline void b_u8(struct buf *b, unsigned v) { uint8_t x = (uint8_t)v; b_put(b, &x, 1); }
static inline void b_u16(struct buf *b, unsigned v) { b_u8(b, v & 0xff); b_u8(b, (v >> 8) & 0xff); }
static inline void b_u32(struct buf *b, uint32_t v) { b_u16(b, v & 0xffff); b_u16(b, v >> 16); }
static inline void b_u64(struct buf *b, uint64_t v) { b_u32(b, (uint32_t)v); b_u32(b, (uint32_t)(v >> 32)); }
static inline void b_str(struct buf *b, const char *s) { b_put(b, s, strlen(s)); }
static inline void b_free(struct buf *b) { free(b->p); memset(b, 0, sizeof *b); }

static int proto4; /* write strings and globals as protocol 4 does */

static inline void pk_str(struct buf *b, const char *s) {
    size_t n = strlen(s);
    if (proto4 && n < 256) { b_u8(b, 0x8c); b_u8(b, (unsigned)n); }
    else { b_u8(b, 'X'); b_u32(b, (uint32_t)n); }
    b_put(b, s, n);
}

static inline void pk_int(struct buf *b, int64_t v) {
    if (v >= 0 && v < 256) { b_u8(b, 'K'); b_u8(b, (unsigned)v); }
    else if (v >= 0 && v < 65536) { b_u8(b, 'M'); b_u16(b, (unsigned)v); }
    else if (v >= INT32_MIN && v <= INT32_MAX) { b_u8(b, 'J'); b_u32(b, (uint32_t)v); }
    else { b_u8(b, 0x8a); b_u8(b, 8); b_u64(b, (uint64_t)v); }
}

static inline void pk_global(struct buf *b, const char *mod, const char *name) {
    if (proto4) { pk_str(b, mod); pk_str(b, name); b_u8(b, 0x93); b_u8(b, 0x94); return; } /* STACK_GLOBAL, MEMOIZE */
    b_u8(b, 'c');
    b_str(b, mod);
    b_u8(b, '\n');
    b_str(b, name);
    b_u8(b, '\n');
}

static inline void pk_begin(struct buf *b) {
    b_u8(b, 0x80);
    b_u8(b, proto4 ? 4 : 2);
    if (proto4) { b_u8(b, 0x95); b_u64(b, 0); } /* FRAME (a length hint) */
}

/* ('storage', torch.<cls>, key, 'cpu', numel) as a persistent id */
static inline void pk_storage(struct buf *b, const char *cls, const char *key, int64_t numel) {
    b_u8(b, '(');
    pk_str(b, "storage");
    pk_global(b, "torch", cls);
    pk_str(b, key);
    pk_str(b, "cpu");
    pk_int(b, numel);
    b_u8(b, 't');
    b_u8(b, 'Q');
}

static inline void pk_ints(struct buf *b, int n, const int64_t *v) {
    b_u8(b, '(');
    for (int i = 0; i < n; i++) pk_int(b, v[i]);
    b_u8(b, 't');
}

/* _rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict()) */
static inline void pk_tensor(struct buf *b, const char *cls, const char *key, int64_t numel, int64_t off, int nd, const int64_t *shape, const int64_t *stride) {
    pk_global(b, "torch._utils", "_rebuild_tensor_v2");
    b_u8(b, '(');
    pk_storage(b, cls, key, numel);
    pk_int(b, off);
    pk_ints(b, nd, shape);
    pk_ints(b, nd, stride);
    b_u8(b, 0x89);
    pk_global(b, "collections", "OrderedDict");
    b_u8(b, ')');
    b_u8(b, 'R');
    b_u8(b, 't');
    b_u8(b, 'R');
}

struct zm { const char *name; const void *data; size_t len; int deflate; };
struct zopt { int zip64, align, misalign; };
#define ZW_MAX 512 /* members per archive */
struct zinfo { size_t lho[ZW_MAX], data[ZW_MAX], cde[ZW_MAX], cd_off, eocd; };

static inline void raw_deflate(const void *in, size_t n, struct buf *out) {
    z_stream s;
    memset(&s, 0, sizeof s);
    deflateInit2(&s, 9, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY);
    uLong bound = deflateBound(&s, (uLong)n);
    out->n = 0;
    b_put(out, NULL, 0);
    out->p = realloc(out->p, bound + 16);
    s.next_in = (Bytef *)in;
    s.avail_in = (uInt)n;
    s.next_out = out->p;
    s.avail_out = (uInt)bound + 16;
    deflate(&s, Z_FINISH);
    out->n = s.total_out;
    out->cap = bound + 16;
    deflateEnd(&s);
}

/* a zip archive of the members, as torch.save lays it out (local headers, data, central directory,
 * zip64 end records when asked); `align` pads every data start to 64 bytes like torch, `misalign` to
 * 64k + 1 */
static inline void zip_build(struct buf *out, const struct zm *m, int n, const struct zopt *o, struct zinfo *zi) {
    if (n > ZW_MAX) { fprintf(stderr, "zip_build: at most %d members\n", ZW_MAX); exit(1); }
    struct buf *comp = calloc((size_t)n + 1, sizeof *comp);
    uint32_t *crc = calloc((size_t)n + 1, sizeof *crc);
    if (!comp || !crc) { perror("calloc"); exit(1); }
    out->n = 0;
    for (int i = 0; i < n; i++) {
        crc[i] = (uint32_t)crc32(0, m[i].data, (uInt)m[i].len);
        if (m[i].deflate) raw_deflate(m[i].data, m[i].len, &comp[i]);
        else b_put(&comp[i], m[i].data, m[i].len);
        size_t nl = strlen(m[i].name), pad = 0;
        if (o->align || o->misalign) {
            size_t at = out->n + 30 + nl + 4, want = o->misalign ? 1 : 0;
            pad = (64 + want - at % 64) % 64;
        }
        zi->lho[i] = out->n;
        b_u32(out, 0x04034b50);
        b_u16(out, 20); b_u16(out, 0); b_u16(out, m[i].deflate ? 8 : 0); b_u16(out, 0); b_u16(out, 0);
        b_u32(out, crc[i]); b_u32(out, (uint32_t)comp[i].n); b_u32(out, (uint32_t)m[i].len);
        b_u16(out, (unsigned)nl); b_u16(out, (o->align || o->misalign) ? (unsigned)(4 + pad) : 0);
        b_str(out, m[i].name);
        if (o->align || o->misalign) {
            b_u16(out, 0x4246); /* "FB", torch's padding field */
            b_u16(out, (unsigned)pad);
            for (size_t k = 0; k < pad; k++) b_u8(out, 'Z');
        }
        zi->data[i] = out->n;
        b_put(out, comp[i].p, comp[i].n);
    }
    zi->cd_off = out->n;
    for (int i = 0; i < n; i++) {
        size_t nl = strlen(m[i].name);
        zi->cde[i] = out->n;
        b_u32(out, 0x02014b50);
        b_u16(out, o->zip64 ? 45 : 20); b_u16(out, o->zip64 ? 45 : 20); b_u16(out, 0); b_u16(out, m[i].deflate ? 8 : 0);
        b_u16(out, 0); b_u16(out, 0);
        b_u32(out, crc[i]);
        b_u32(out, o->zip64 ? 0xffffffffu : (uint32_t)comp[i].n);
        b_u32(out, o->zip64 ? 0xffffffffu : (uint32_t)m[i].len);
        b_u16(out, (unsigned)nl); b_u16(out, o->zip64 ? 28 : 0); b_u16(out, 0);
        b_u16(out, 0); b_u16(out, 0); b_u32(out, 0);
        b_u32(out, o->zip64 ? 0xffffffffu : (uint32_t)zi->lho[i]);
        b_str(out, m[i].name);
        if (o->zip64) { /* zip64 extended information: uncompressed, compressed, local header offset */
            b_u16(out, 1); b_u16(out, 24);
            b_u64(out, m[i].len); b_u64(out, comp[i].n); b_u64(out, zi->lho[i]);
        }
    }
    size_t cd_size = out->n - zi->cd_off;
    if (o->zip64) {
        size_t z64 = out->n;
        b_u32(out, 0x06064b50); b_u64(out, 44); b_u16(out, 45); b_u16(out, 45); b_u32(out, 0); b_u32(out, 0);
        b_u64(out, (uint64_t)n); b_u64(out, (uint64_t)n); b_u64(out, cd_size); b_u64(out, zi->cd_off);
        b_u32(out, 0x07064b50); b_u32(out, 0); b_u64(out, z64); b_u32(out, 1);
    }
    zi->eocd = out->n;
    b_u32(out, 0x06054b50); b_u16(out, 0); b_u16(out, 0);
    b_u16(out, o->zip64 ? 0xffff : (unsigned)n); b_u16(out, o->zip64 ? 0xffff : (unsigned)n);
    b_u32(out, o->zip64 ? 0xffffffffu : (uint32_t)cd_size); b_u32(out, o->zip64 ? 0xffffffffu : (uint32_t)zi->cd_off);
    b_u16(out, 0);
    for (int i = 0; i < n; i++) b_free(&comp[i]);
    free(comp);
    free(crc);
}

#endif
