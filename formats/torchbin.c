/* formats/torchbin.c: PyTorch checkpoints (torch.save zip archives) read without running pickle: a zip
 * reader, a restricted pickle machine that only builds values, and the assembly of tensor views. Layout
 * and rules in formats.h. Nothing here calls into Python or executes anything named in the file. */
#include "formats.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

/* Limits. A state dict's pickle costs ~100 bytes and ~15 values per tensor and nests 4 deep; these leave
 * room for ~250k tensors while bounding what a hostile file can make us allocate. */
#define TB_MAX_PICKLE (256u << 20)  /* data.pkl bytes */
#define TB_MAX_VALUES (1u << 22)    /* values the pickle machine may create */
#define TB_MAX_STACK (1u << 20)     /* stack entries (BINGET pushes without creating a value) */
#define TB_MAX_ITEMS (1u << 24)     /* container items in all (APPEND of one value repeats it) */
#define TB_MAX_DEPTH 64             /* MARK nesting and container nesting */
#define TB_MAX_NAME 1024            /* member, tensor and global names */
#define TB_MAX_MEMBERS (1u << 20)   /* zip entries */
#define TB_DEFLATE_RATIO 1032       /* deflate expands at most ~1032:1 (a 258-byte match per 2 bits) */

/* ------------------------------------------------------------------------------------------------ */
/* messages                                                                                         */

/* printable copy of untrusted bytes for a message: non-printable bytes become '?', long names are cut */
static const char *clean(char *out, size_t outsz, const void *s, size_t n) {
    const unsigned char *p = s;
    size_t k = 0, lim = outsz - 4;
    for (size_t i = 0; i < n && k < lim; i++) out[k++] = (p[i] >= 0x20 && p[i] < 0x7f) ? (char)p[i] : '?';
    if (n > lim) { out[k++] = '.'; out[k++] = '.'; out[k++] = '.'; }
    out[k] = 0;
    return out;
}

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t rd32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }

/* ------------------------------------------------------------------------------------------------ */
/* zip                                                                                              */

struct zmem {
    const char *name; /* points into the archive, not NUL-terminated */
    size_t nlen;
    uint16_t flags, method;
    uint32_t crc;
    uint64_t csize, usize, lho, data; /* compressed / uncompressed size, local header and data offsets */
};

struct zip {
    const char *path;
    const uint8_t *buf;
    size_t size;
    struct zmem *m;
    size_t n;
    struct zmem **byname; /* sorted by name */
};

static void zip_free(struct zip *z) {
    free(z->m);
    free(z->byname);
}

static int cmp_name(const char *a, size_t an, const char *b, size_t bn) {
    int c = memcmp(a, b, an < bn ? an : bn);
    return c ? c : (an < bn ? -1 : an > bn);
}

static int cmp_zname(const void *a, const void *b) {
    const struct zmem *x = *(const struct zmem *const *)a, *y = *(const struct zmem *const *)b;
    return cmp_name(x->name, x->nlen, y->name, y->nlen);
}

static int cmp_zlho(const void *a, const void *b) {
    const struct zmem *x = *(const struct zmem *const *)a, *y = *(const struct zmem *const *)b;
    return x->lho < y->lho ? -1 : x->lho > y->lho;
}

static const struct zmem *zip_find(const struct zip *z, const char *name, size_t nlen) {
    size_t lo = 0, hi = z->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = cmp_name(z->byname[mid]->name, z->byname[mid]->nlen, name, nlen);
        if (c == 0) return z->byname[mid];
        if (c < 0) lo = mid + 1; else hi = mid;
    }
    return NULL;
}

/* A member name must be relative, without '.', '..' or empty components, control bytes or backslashes;
 * a trailing '/' (a directory entry) is allowed. */
static int name_ok(const char *s, size_t n) {
    if (n == 0 || n > TB_MAX_NAME || s[0] == '/') return 0;
    size_t start = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && ((unsigned char)s[i] < 0x20 || s[i] == '\\' || s[i] == 0x7f)) return 0;
        if (i == n || s[i] == '/') {
            size_t len = i - start;
            if (len == 0 && i != n) return 0;
            if ((len == 1 && s[start] == '.') || (len == 2 && s[start] == '.' && s[start + 1] == '.')) return 0;
            start = i + 1;
        }
    }
    return 1;
}

#define ZFAIL(...) do { rc = mb_fail(MB_EFORMAT, __VA_ARGS__); goto fail; } while (0)

/* Read the central directory and check every member's headers and extent. */
static int zip_parse(struct zip *z) {
    const uint8_t *b = z->buf;
    size_t size = z->size;
    const char *path = z->path;
    int rc = 0;
    char nm[128];
    struct zmem **bylho = NULL;
    if (size < 22) return mb_fail(MB_EFORMAT, "%s: truncated zip archive (%zu bytes, no end of central directory record)", path, size);
    /* end of central directory: 22 bytes + a comment of up to 65535 bytes at the very end */
    size_t lo = size - 22 > 65535 ? size - 22 - 65535 : 0, eocd = SIZE_MAX;
    for (size_t p = size - 22 + 1; p-- > lo;)
        if (rd32(b + p) == 0x06054b50 && p + 22 + rd16(b + p + 20) == size) { eocd = p; break; }
    if (eocd == SIZE_MAX) return mb_fail(MB_EFORMAT, "%s: truncated or damaged zip archive (no end of central directory record)", path);
    uint64_t disk = rd16(b + eocd + 4), cd_disk = rd16(b + eocd + 6), n_here = rd16(b + eocd + 8), n = rd16(b + eocd + 10);
    uint64_t cd_size = rd32(b + eocd + 12), cd_off = rd32(b + eocd + 16), limit = eocd;
    if (eocd >= 20 && rd32(b + eocd - 20) == 0x07064b50) { /* zip64 locator, then the zip64 end record */
        const uint8_t *loc = b + eocd - 20;
        uint64_t zoff = rd64(loc + 8);
        if (rd32(loc + 4) != 0 || rd32(loc + 16) > 1) return mb_fail(MB_EUNSUPPORTED, "%s: multi-disk zip archives are not supported", path);
        if (zoff > eocd - 20 || eocd - 20 - zoff < 56 || rd32(b + zoff) != 0x06064b50)
            return mb_fail(MB_EFORMAT, "%s: zip64 end of central directory record missing or out of range (offset %llu)", path, (unsigned long long)zoff);
        uint64_t rsize = rd64(b + zoff + 4);
        if (rsize < 44 || rsize > eocd - 20 - zoff - 12) return mb_fail(MB_EFORMAT, "%s: zip64 end of central directory record has a bad size (%llu)", path, (unsigned long long)rsize);
        disk = rd32(b + zoff + 16);
        cd_disk = rd32(b + zoff + 20);
        n_here = rd64(b + zoff + 24);
        n = rd64(b + zoff + 32);
        cd_size = rd64(b + zoff + 40);
        cd_off = rd64(b + zoff + 48);
        limit = zoff;
    }
    if (disk || cd_disk || n_here != n) return mb_fail(MB_EUNSUPPORTED, "%s: multi-disk zip archives are not supported", path);
    if (cd_off > limit || cd_size > limit - cd_off)
        return mb_fail(MB_EFORMAT, "%s: central directory (offset %llu, %llu bytes) lies outside the file (%zu bytes)", path, (unsigned long long)cd_off, (unsigned long long)cd_size, size);
    if (n > cd_size / 46 || n > TB_MAX_MEMBERS)
        return mb_fail(MB_EFORMAT, "%s: %llu zip entries cannot fit in a %llu-byte central directory", path, (unsigned long long)n, (unsigned long long)cd_size);
    z->m = calloc(n ? n : 1, sizeof *z->m);
    z->byname = calloc(n ? n : 1, sizeof *z->byname);
    bylho = calloc(n ? n : 1, sizeof *bylho);
    if (!z->m || !z->byname || !bylho) { rc = mb_fail(MB_ENOMEM, "%s: out of memory", path); goto fail; }
    size_t p = cd_off, end = cd_off + cd_size;
    for (uint64_t i = 0; i < n; i++) {
        struct zmem *m = &z->m[i];
        if (end - p < 46 || rd32(b + p) != 0x02014b50) ZFAIL("%s: central directory entry %llu: bad signature or truncated", path, (unsigned long long)i);
        const uint8_t *e = b + p;
        size_t nl = rd16(e + 28), el = rd16(e + 30), cl = rd16(e + 32);
        if (46 + nl + el + cl > end - p) ZFAIL("%s: central directory entry %llu runs past the directory", path, (unsigned long long)i);
        m->flags = rd16(e + 8);
        m->method = rd16(e + 10);
        m->crc = rd32(e + 16);
        m->csize = rd32(e + 20);
        m->usize = rd32(e + 24);
        m->lho = rd32(e + 42);
        m->name = (const char *)e + 46;
        m->nlen = nl;
        uint32_t start_disk = rd16(e + 34);
        /* zip64 extended information: the 64-bit values of the fields set to 0xFFFFFFFF, in this order */
        int need_u = m->usize == 0xffffffffu, need_c = m->csize == 0xffffffffu, need_l = m->lho == 0xffffffffu, need_d = start_disk == 0xffff;
        const uint8_t *x = e + 46 + nl, *xe = x + el;
        while (xe - x >= 4) {
            uint16_t id = rd16(x), len = rd16(x + 2);
            if (len > xe - x - 4) ZFAIL("%s: member %s: extra field runs past its entry", path, clean(nm, sizeof nm, m->name, nl));
            if (id == 0x0001) {
                const uint8_t *q = x + 4, *qe = q + len;
                if (need_u) { if (qe - q < 8) break; m->usize = rd64(q); q += 8; need_u = 0; }
                if (need_c) { if (qe - q < 8) break; m->csize = rd64(q); q += 8; need_c = 0; }
                if (need_l) { if (qe - q < 8) break; m->lho = rd64(q); q += 8; need_l = 0; }
                if (need_d) { if (qe - q < 4) break; start_disk = rd32(q); need_d = 0; }
            }
            x += 4 + len;
        }
        if (need_u || need_c || need_l || need_d) ZFAIL("%s: member %s: zip64 sizes or offset missing", path, clean(nm, sizeof nm, m->name, nl));
        if (start_disk != 0) ZFAIL("%s: member %s: on disk %u of a multi-disk archive", path, clean(nm, sizeof nm, m->name, nl), start_disk);
        p += 46 + nl + el + cl;
    }
    if (p != end) ZFAIL("%s: %zu unexplained bytes at the end of the central directory", path, end - p);
    z->n = n;
    for (size_t i = 0; i < n; i++) {
        struct zmem *m = &z->m[i];
        clean(nm, sizeof nm, m->name, m->nlen);
        if (!name_ok(m->name, m->nlen)) ZFAIL("%s: member \"%s\": unsafe or invalid name (absolute, '..', empty component or control byte)", path, nm);
        if (m->flags & 0x41) { rc = mb_fail(MB_EUNSUPPORTED, "%s: member %s is encrypted", path, nm); goto fail; }
        if (m->method != 0 && m->method != 8) { rc = mb_fail(MB_EUNSUPPORTED, "%s: member %s: compression method %u is not supported (only stored and deflate)", path, nm, m->method); goto fail; }
        if (m->method == 0 && m->csize != m->usize) ZFAIL("%s: member %s: stored but sizes differ (%llu, %llu)", path, nm, (unsigned long long)m->csize, (unsigned long long)m->usize);
        if (m->method == 8 && m->usize / TB_DEFLATE_RATIO > m->csize + 1)
            ZFAIL("%s: member %s: %llu bytes cannot inflate to the declared %llu", path, nm, (unsigned long long)m->csize, (unsigned long long)m->usize);
        if (m->lho > cd_off || cd_off - m->lho < 30 || rd32(b + m->lho) != 0x04034b50)
            ZFAIL("%s: member %s: local header offset %llu out of range or not a local header", path, nm, (unsigned long long)m->lho);
        const uint8_t *h = b + m->lho;
        size_t lnl = rd16(h + 26), lel = rd16(h + 28);
        if (30 + lnl + lel > cd_off - m->lho) ZFAIL("%s: member %s: local header runs into the central directory", path, nm);
        if (lnl != m->nlen || memcmp(h + 30, m->name, lnl) != 0) ZFAIL("%s: member %s: local header names a different file", path, nm);
        m->data = m->lho + 30 + lnl + lel;
        if (m->csize > cd_off - m->data)
            ZFAIL("%s: member %s: data (offset %llu, %llu bytes) runs past the file's data area (%llu bytes)", path, nm, (unsigned long long)m->data, (unsigned long long)m->csize, (unsigned long long)cd_off);
        if (m->nlen && m->name[m->nlen - 1] == '/' && m->usize) ZFAIL("%s: member %s: a directory entry with data", path, nm);
        z->byname[i] = m;
        bylho[i] = m;
    }
    /* no two members may share bytes */
    qsort(bylho, n, sizeof *bylho, cmp_zlho);
    for (size_t i = 1; i < n; i++)
        if (bylho[i - 1]->data + bylho[i - 1]->csize > bylho[i]->lho)
            ZFAIL("%s: members %s and the next one overlap", path, clean(nm, sizeof nm, bylho[i - 1]->name, bylho[i - 1]->nlen));
    qsort(z->byname, n, sizeof *z->byname, cmp_zname);
    for (size_t i = 1; i < n; i++)
        if (cmp_name(z->byname[i - 1]->name, z->byname[i - 1]->nlen, z->byname[i]->name, z->byname[i]->nlen) == 0)
            ZFAIL("%s: member %s appears twice", path, clean(nm, sizeof nm, z->byname[i]->name, z->byname[i]->nlen));
    free(bylho);
    return 0;
fail:
    free(bylho);
    zip_free(z);
    z->m = NULL;
    z->byname = NULL;
    z->n = 0;
    return rc;
}

/* The bytes of a member: a view into the archive when stored, else inflated into *owned (malloc'd, the
 * caller frees it). `max` bytes at most (0: no cap). CRC-32 checked unless the archive records 0. */
static int zip_read(const struct zip *z, const struct zmem *m, size_t max, const uint8_t **data, uint8_t **owned) {
    char nm[128];
    clean(nm, sizeof nm, m->name, m->nlen);
    *data = NULL;
    *owned = NULL;
    if (max && m->usize > max) return mb_fail(MB_EFORMAT, "%s: member %s: %llu bytes exceeds the %zu-byte limit", z->path, nm, (unsigned long long)m->usize, max);
    if (m->usize > SIZE_MAX / 2) return mb_fail(MB_EFORMAT, "%s: member %s: size %llu too large", z->path, nm, (unsigned long long)m->usize);
    const uint8_t *src = z->buf + m->data;
    if (m->method == 0) {
        *data = src;
    } else {
        uint8_t *buf = malloc(m->usize ? (size_t)m->usize : 1);
        if (!buf) return mb_fail(MB_ENOMEM, "%s: member %s: out of memory inflating %llu bytes", z->path, nm, (unsigned long long)m->usize);
        z_stream s;
        memset(&s, 0, sizeof s);
        if (inflateInit2(&s, -15) != Z_OK) { free(buf); return mb_fail(MB_ENOMEM, "%s: member %s: inflateInit failed", z->path, nm); }
        const size_t chunk = 1u << 30;
        size_t in = 0, out = 0;
        int zr;
        for (;;) {
            size_t ci = m->csize - in, co = m->usize - out;
            s.next_in = (Bytef *)(src + in);
            s.avail_in = (uInt)(ci > chunk ? chunk : ci);
            s.next_out = buf + out;
            s.avail_out = (uInt)(co > chunk ? chunk : co);
            uInt ai = s.avail_in, ao = s.avail_out;
            zr = inflate(&s, Z_NO_FLUSH);
            in += ai - s.avail_in;
            out += ao - s.avail_out;
            if (zr == Z_STREAM_END) break;
            if (zr != Z_OK && zr != Z_BUF_ERROR) break;
            if (ai == s.avail_in && ao == s.avail_out) break; /* no progress: input or output exhausted */
        }
        inflateEnd(&s);
        const char *why = NULL;
        if (zr == Z_STREAM_END) {
            if (out != m->usize) why = "inflates to fewer bytes than declared";
            else if (in != m->csize) why = "bytes after the end of the deflate stream";
        } else if (zr == Z_DATA_ERROR || zr == Z_STREAM_ERROR || zr == Z_NEED_DICT) why = "corrupt deflate data";
        else if (zr == Z_MEM_ERROR) { free(buf); return mb_fail(MB_ENOMEM, "%s: member %s: out of memory inflating", z->path, nm); }
        else if (out == m->usize) why = "inflates to more bytes than declared";
        else why = "deflate data truncated";
        if (why) { free(buf); return mb_fail(MB_EFORMAT, "%s: member %s: %s", z->path, nm, why); }
        *owned = buf;
        *data = buf;
    }
    if (m->crc != 0) {
        uLong c = crc32_z(0L, Z_NULL, 0);
        c = crc32_z(c, *data, (z_size_t)m->usize);
        if ((uint32_t)c != m->crc) {
            free(*owned);
            *owned = NULL;
            *data = NULL;
            return mb_fail(MB_EFORMAT, "%s: member %s: CRC-32 mismatch (recorded %08x, data %08x): the file is damaged", z->path, nm, m->crc, (uint32_t)c);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* the pickle machine                                                                               */

enum vkind { V_NONE, V_BOOL, V_INT, V_FLOAT, V_STR, V_TUPLE, V_LIST, V_DICT, V_GLOBAL, V_STORAGE, V_TENSOR };
static const char *const vkind_name[] = {"None", "bool", "int", "float", "str", "tuple", "list", "dict", "class or function", "storage", "tensor"};

/* the globals a state dict may name, and nothing else */
enum gkind { G_ODICT, G_REBUILD_V2, G_REBUILD_PARAM, G_REBUILD_PARAM_STATE, G_STORAGE, G_DTYPE };
static const struct { const char *mod, *name; enum gkind kind; enum mb_dtype dt; } allowed[] = {
    {"collections", "OrderedDict", G_ODICT, 0},
    {"torch._utils", "_rebuild_tensor_v2", G_REBUILD_V2, 0},
    {"torch._utils", "_rebuild_parameter", G_REBUILD_PARAM, 0},
    {"torch._utils", "_rebuild_parameter_with_state", G_REBUILD_PARAM_STATE, 0},
    {"torch", "FloatStorage", G_STORAGE, MB_F32},
    {"torch", "DoubleStorage", G_STORAGE, MB_F64},
    {"torch", "HalfStorage", G_STORAGE, MB_F16},
    {"torch", "BFloat16Storage", G_STORAGE, MB_BF16},
    {"torch", "LongStorage", G_STORAGE, MB_I64},
    {"torch", "IntStorage", G_STORAGE, MB_I32},
    {"torch", "ShortStorage", G_STORAGE, MB_I16},
    {"torch", "CharStorage", G_STORAGE, MB_I8},
    {"torch", "ByteStorage", G_STORAGE, MB_U8},
    {"torch", "BoolStorage", G_STORAGE, MB_BOOL},
    {"torch", "float32", G_DTYPE, MB_F32},
    {"torch", "float64", G_DTYPE, MB_F64},
    {"torch", "float16", G_DTYPE, MB_F16},
    {"torch", "bfloat16", G_DTYPE, MB_BF16},
    {"torch", "int64", G_DTYPE, MB_I64},
    {"torch", "int32", G_DTYPE, MB_I32},
    {"torch", "int16", G_DTYPE, MB_I16},
    {"torch", "int8", G_DTYPE, MB_I8},
    {"torch", "uint8", G_DTYPE, MB_U8},
    {"torch", "bool", G_DTYPE, MB_BOOL},
};
#define N_ALLOWED ((int)(sizeof allowed / sizeof *allowed))

struct val {
    uint8_t kind, depth; /* depth: 0 for scalars, 1 + the deepest item for containers */
    uint32_t n, cap;     /* containers: items (a dict holds key, value, key, value, ...) */
    union {
        int64_t i;
        double f;
        struct { const char *s; size_t len; } str; /* points into the pickle */
        struct val **items;
        int g;   /* V_GLOBAL: index into allowed[] */
        int idx; /* V_STORAGE, V_TENSOR: index into the machine's tables */
    } u;
};

struct storage {
    const char *key; /* points into the pickle */
    size_t klen;
    enum mb_dtype dt;
    int64_t numel;
    const uint8_t *data; /* resolved: the member's bytes */
    int used;
};

struct tensor {
    int storage;
    int64_t offset;
    int ndim;
    int64_t shape[MB_MAX_DIMS], stride[MB_MAX_DIMS];
};

struct pm {
    const char *path, *member; /* for messages */
    const uint8_t *p;
    size_t n, pos, op; /* pickle bytes, read position, offset of the current opcode */
    struct val **stack;
    size_t sp, scap;
    size_t marks[TB_MAX_DEPTH];
    int nmarks;
    struct val **memo;
    size_t nmemo, memo_count;
    struct val **all; /* every value created, freed at the end */
    size_t nall, acap;
    size_t nitems;    /* container items added */
    struct storage *st;
    int nst, stcap;
    int *slot; /* open-addressing table of storage indices by key (-1: empty), hcap slots */
    size_t hcap;
    struct tensor *tt;
    int ntt, ttcap;
};

static int pm_fail(struct pm *m, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int pm_fail(struct pm *m, int status, const char *fmt, ...) {
    char msg[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return mb_fail(status, "%s: %s, offset %zu: %s", m->path, m->member, m->op, msg);
}

static void pm_free(struct pm *m) {
    for (size_t i = 0; i < m->nall; i++) {
        struct val *v = m->all[i];
        if (v->kind == V_TUPLE || v->kind == V_LIST || v->kind == V_DICT) free(v->u.items);
        free(v);
    }
    free(m->all);
    free(m->stack);
    free(m->memo);
    free(m->st);
    free(m->slot);
    free(m->tt);
}

static uint64_t key_hash(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h;
}

/* index of the storage with this key, or where to insert it (*slot_out) */
static int storage_find(const struct pm *m, const char *key, size_t klen, size_t *slot_out) {
    size_t i = (size_t)key_hash(key, klen) & (m->hcap - 1);
    for (;; i = (i + 1) & (m->hcap - 1)) {
        int s = m->slot[i];
        if (s < 0) { *slot_out = i; return -1; }
        if (m->st[s].klen == klen && !memcmp(m->st[s].key, key, klen)) return s;
    }
}

/* keep the table at most half full */
static int storage_rehash(struct pm *m) {
    if ((size_t)(m->nst + 1) * 2 <= m->hcap) return 0;
    size_t nc = m->hcap ? m->hcap * 2 : 128;
    int *ns = malloc(nc * sizeof *ns);
    if (!ns) return MB_ENOMEM;
    for (size_t i = 0; i < nc; i++) ns[i] = -1;
    free(m->slot);
    m->slot = ns;
    m->hcap = nc;
    for (int s = 0; s < m->nst; s++) {
        size_t at;
        storage_find(m, m->st[s].key, m->st[s].klen, &at);
        m->slot[at] = s;
    }
    return 0;
}

static struct val *newval(struct pm *m, int kind) {
    if (m->nall >= TB_MAX_VALUES) { pm_fail(m, MB_EFORMAT, "more than %u values", TB_MAX_VALUES); return NULL; }
    if (m->nall == m->acap) {
        size_t nc = m->acap ? m->acap * 2 : 256;
        struct val **na = realloc(m->all, nc * sizeof *na);
        if (!na) { pm_fail(m, MB_ENOMEM, "out of memory"); return NULL; }
        m->all = na;
        m->acap = nc;
    }
    struct val *v = calloc(1, sizeof *v);
    if (!v) { pm_fail(m, MB_ENOMEM, "out of memory"); return NULL; }
    v->kind = (uint8_t)kind;
    m->all[m->nall++] = v;
    return v;
}

static int push(struct pm *m, struct val *v) {
    if (!v) return MB_EFORMAT; /* newval recorded why */
    if (m->sp >= TB_MAX_STACK) return pm_fail(m, MB_EFORMAT, "stack deeper than %u entries", TB_MAX_STACK);
    if (m->sp == m->scap) {
        size_t nc = m->scap ? m->scap * 2 : 64;
        struct val **ns = realloc(m->stack, nc * sizeof *ns);
        if (!ns) return pm_fail(m, MB_ENOMEM, "out of memory");
        m->stack = ns;
        m->scap = nc;
    }
    m->stack[m->sp++] = v;
    return 0;
}

/* the stack above the innermost mark must hold at least k values */
static size_t floor_(const struct pm *m) { return m->nmarks ? m->marks[m->nmarks - 1] : 0; }

static struct val *pop(struct pm *m) {
    if (m->sp <= floor_(m)) { pm_fail(m, MB_EFORMAT, "stack underflow"); return NULL; }
    return m->stack[--m->sp];
}

static int add_item(struct pm *m, struct val *c, struct val *x) {
    if (x->depth + 1 > TB_MAX_DEPTH) return pm_fail(m, MB_EFORMAT, "values nested deeper than %d", TB_MAX_DEPTH);
    if (++m->nitems > TB_MAX_ITEMS) return pm_fail(m, MB_EFORMAT, "more than %u container items", TB_MAX_ITEMS);
    if (c->n == c->cap) {
        uint32_t nc = c->cap ? c->cap * 2 : 4;
        struct val **ni = realloc(c->u.items, (size_t)nc * sizeof *ni);
        if (!ni) return pm_fail(m, MB_ENOMEM, "out of memory");
        c->u.items = ni;
        c->cap = nc;
    }
    c->u.items[c->n++] = x;
    if (x->depth + 1 > c->depth) c->depth = (uint8_t)(x->depth + 1);
    return 0;
}

/* a tuple of the stack's values from index `from` up, which are removed */
static int make_tuple(struct pm *m, size_t from) {
    struct val *t = newval(m, V_TUPLE);
    if (!t) return MB_EFORMAT;
    for (size_t i = from; i < m->sp; i++) {
        int rc = add_item(m, t, m->stack[i]);
        if (rc) return rc;
    }
    m->sp = from;
    return push(m, t);
}

static int pop_mark(struct pm *m, size_t *k) {
    if (m->nmarks == 0) return pm_fail(m, MB_EFORMAT, "no MARK to close");
    *k = m->marks[--m->nmarks];
    return 0;
}

static int need(struct pm *m, size_t k) {
    if (m->n - m->pos < k) return pm_fail(m, MB_EFORMAT, "truncated pickle");
    return 0;
}

static int memo_put(struct pm *m, size_t idx) {
    if (m->sp == floor_(m)) return pm_fail(m, MB_EFORMAT, "memo store with an empty stack");
    /* the pickler numbers memo entries 0, 1, 2, ... as it creates objects, so a valid index never exceeds
     * the values made so far: this bounds the memo by the work done */
    if (idx > m->nall) return pm_fail(m, MB_EFORMAT, "memo index %zu out of range", idx);
    if (idx >= m->nmemo) {
        size_t nn = idx + 1 > m->nmemo * 2 ? idx + 1 : m->nmemo * 2;
        struct val **nm = realloc(m->memo, nn * sizeof *nm);
        if (!nm) return pm_fail(m, MB_ENOMEM, "out of memory");
        memset(nm + m->nmemo, 0, (nn - m->nmemo) * sizeof *nm);
        m->memo = nm;
        m->nmemo = nn;
    }
    if (!m->memo[idx]) m->memo_count++;
    m->memo[idx] = m->stack[m->sp - 1];
    return 0;
}

static int memo_get(struct pm *m, size_t idx) {
    if (idx >= m->nmemo || !m->memo[idx]) return pm_fail(m, MB_EFORMAT, "memo index %zu was never stored", idx);
    return push(m, m->memo[idx]);
}

static int do_global(struct pm *m, const char *mod, size_t ml, const char *name, size_t nl) {
    for (int i = 0; i < N_ALLOWED; i++)
        if (strlen(allowed[i].mod) == ml && strlen(allowed[i].name) == nl && !memcmp(allowed[i].mod, mod, ml) && !memcmp(allowed[i].name, name, nl)) {
            struct val *v = newval(m, V_GLOBAL);
            if (!v) return MB_EFORMAT;
            v->u.g = i;
            return push(m, v);
        }
    char a[160], b[160];
    clean(a, sizeof a, mod, ml);
    clean(b, sizeof b, name, nl);
    if (ml == 5 && !memcmp(mod, "torch", 5) && nl > 7 && !memcmp(name + nl - 7, "Storage", 7))
        return pm_fail(m, MB_EUNSUPPORTED, "storage type torch.%s is not supported (Float, Double, Half, BFloat16, Long, Int, Short, Char, Byte and Bool are)", b);
    return pm_fail(m, MB_EUNSUPPORTED, "refusing to import %s.%s: a state dict only needs collections.OrderedDict, "
                   "torch._utils._rebuild_tensor_v2 / _rebuild_parameter and torch storage types (nothing was executed)", a, b);
}

static int is_str(const struct val *v, const char *s) {
    return v->kind == V_STR && v->u.str.len == strlen(s) && !memcmp(v->u.str.s, s, v->u.str.len);
}

static int empty_or_none(const struct val *v) { return v->kind == V_NONE || ((v->kind == V_DICT || v->kind == V_TUPLE) && v->n == 0); }

/* BINPERSID: ('storage', torch.<T>Storage, key, location, numel) -> a storage value */
static int do_persid(struct pm *m) {
    struct val *pid = pop(m);
    if (!pid) return MB_EFORMAT;
    if (pid->kind != V_TUPLE || pid->n != 5 || !is_str(pid->u.items[0], "storage"))
        return pm_fail(m, MB_EFORMAT, "persistent id is not ('storage', type, key, location, numel)");
    struct val **it = pid->u.items;
    if (it[1]->kind != V_GLOBAL || allowed[it[1]->u.g].kind != G_STORAGE) return pm_fail(m, MB_EFORMAT, "persistent id: the storage type is not a torch storage class");
    if (it[2]->kind != V_STR || it[3]->kind != V_STR || it[4]->kind != V_INT || it[4]->u.i < 0)
        return pm_fail(m, MB_EFORMAT, "persistent id: key, location or numel has the wrong type");
    const char *key = it[2]->u.str.s;
    size_t klen = it[2]->u.str.len;
    char kb[160];
    clean(kb, sizeof kb, key, klen);
    int ok = klen > 0 && klen <= 255;
    for (size_t i = 0; ok && i < klen; i++) {
        char c = key[i];
        ok = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == '-' || c == '.';
    }
    if (!ok || (klen <= 2 && key[0] == '.' && key[klen - 1] == '.')) return pm_fail(m, MB_EFORMAT, "persistent id: storage key \"%s\" is not a plain name", kb);
    enum mb_dtype dt = allowed[it[1]->u.g].dt;
    int64_t numel = it[4]->u.i;
    if (storage_rehash(m)) return pm_fail(m, MB_ENOMEM, "out of memory");
    size_t at;
    int s = storage_find(m, key, klen, &at);
    if (s >= 0) {
        if (m->st[s].dt != dt || m->st[s].numel != numel)
            return pm_fail(m, MB_EFORMAT, "storage %s is described twice with different types or sizes", kb);
    } else {
        if (m->nst == m->stcap) {
            int nc = m->stcap ? m->stcap * 2 : 64;
            struct storage *ns = realloc(m->st, (size_t)nc * sizeof *ns);
            if (!ns) return pm_fail(m, MB_ENOMEM, "out of memory");
            m->st = ns;
            m->stcap = nc;
        }
        s = m->nst++;
        m->st[s] = (struct storage){key, klen, dt, numel, NULL, 0};
        m->slot[at] = s;
    }
    struct val *v = newval(m, V_STORAGE);
    if (!v) return MB_EFORMAT;
    v->u.idx = s;
    return push(m, v);
}

/* _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata]) */
static int rebuild_tensor(struct pm *m, struct val *args) {
    if (args->n != 6 && args->n != 7) return pm_fail(m, MB_EFORMAT, "_rebuild_tensor_v2 takes 6 or 7 arguments, got %u", args->n);
    struct val **a = args->u.items;
    if (a[0]->kind != V_STORAGE) return pm_fail(m, MB_EFORMAT, "_rebuild_tensor_v2: first argument is a %s, not a storage", vkind_name[a[0]->kind]);
    if (a[1]->kind != V_INT || a[1]->u.i < 0) return pm_fail(m, MB_EFORMAT, "_rebuild_tensor_v2: storage offset is not a non-negative integer");
    if (a[2]->kind != V_TUPLE || a[3]->kind != V_TUPLE || a[2]->n != a[3]->n)
        return pm_fail(m, MB_EFORMAT, "_rebuild_tensor_v2: size and stride are not tuples of the same length");
    if (a[2]->n > MB_MAX_DIMS) return pm_fail(m, MB_EFORMAT, "_rebuild_tensor_v2: rank %u exceeds %d", a[2]->n, MB_MAX_DIMS);
    if (a[4]->kind != V_BOOL) return pm_fail(m, MB_EFORMAT, "_rebuild_tensor_v2: requires_grad is not a bool");
    if (a[5]->kind != V_DICT || a[5]->n != 0) return pm_fail(m, MB_EFORMAT, "_rebuild_tensor_v2: backward hooks are not an empty dict");
    if (args->n == 7 && !empty_or_none(a[6])) return pm_fail(m, MB_EUNSUPPORTED, "_rebuild_tensor_v2: tensor metadata is not supported");
    struct tensor t = {.storage = a[0]->u.idx, .offset = a[1]->u.i, .ndim = (int)a[2]->n};
    for (int d = 0; d < t.ndim; d++) {
        struct val *sz = a[2]->u.items[d], *st = a[3]->u.items[d];
        if (sz->kind != V_INT || st->kind != V_INT || sz->u.i < 0 || st->u.i < 0)
            return pm_fail(m, MB_EFORMAT, "_rebuild_tensor_v2: size and stride must be non-negative integers");
        t.shape[d] = sz->u.i;
        t.stride[d] = st->u.i;
    }
    if (m->ntt == m->ttcap) {
        int nc = m->ttcap ? m->ttcap * 2 : 64;
        struct tensor *nt = realloc(m->tt, (size_t)nc * sizeof *nt);
        if (!nt) return pm_fail(m, MB_ENOMEM, "out of memory");
        m->tt = nt;
        m->ttcap = nc;
    }
    m->tt[m->ntt] = t;
    struct val *v = newval(m, V_TENSOR);
    if (!v) return MB_EFORMAT;
    v->u.idx = m->ntt++;
    return push(m, v);
}

/* REDUCE: call an allowed global on a tuple. Only builds values; nothing outside this file runs. */
static int do_reduce(struct pm *m) {
    struct val *args = pop(m), *fn = args ? pop(m) : NULL;
    if (!fn) return MB_EFORMAT;
    if (fn->kind != V_GLOBAL) return pm_fail(m, MB_EFORMAT, "REDUCE on a %s", vkind_name[fn->kind]);
    if (args->kind != V_TUPLE) return pm_fail(m, MB_EFORMAT, "REDUCE arguments are a %s, not a tuple", vkind_name[args->kind]);
    switch (allowed[fn->u.g].kind) {
    case G_ODICT: {
        if (args->n != 0) return pm_fail(m, MB_EFORMAT, "OrderedDict called with arguments");
        return push(m, newval(m, V_DICT));
    }
    case G_REBUILD_V2: return rebuild_tensor(m, args);
    case G_REBUILD_PARAM:
    case G_REBUILD_PARAM_STATE: {
        uint32_t want = allowed[fn->u.g].kind == G_REBUILD_PARAM ? 3 : 4;
        struct val **a = args->u.items;
        if (args->n != want || a[0]->kind != V_TENSOR || a[1]->kind != V_BOOL || a[2]->kind != V_DICT || a[2]->n != 0 || (want == 4 && !empty_or_none(a[3])))
            return pm_fail(m, MB_EFORMAT, "%s: arguments are not (tensor, bool, empty hooks%s)", allowed[fn->u.g].name, want == 4 ? ", empty state" : "");
        return push(m, a[0]); /* a parameter is its tensor */
    }
    default:
        return pm_fail(m, MB_EFORMAT, "%s.%s cannot be called in a state dict", allowed[fn->u.g].mod, allowed[fn->u.g].name);
    }
}

static int read_str(struct pm *m, size_t len, int kind) {
    if (m->n - m->pos < len) return pm_fail(m, MB_EFORMAT, "truncated pickle (string of %zu bytes)", len);
    struct val *v = newval(m, kind);
    if (!v) return MB_EFORMAT;
    v->u.str.s = (const char *)m->p + m->pos;
    v->u.str.len = len;
    m->pos += len;
    return push(m, v);
}

static int push_int(struct pm *m, int64_t x) {
    struct val *v = newval(m, V_INT);
    if (!v) return MB_EFORMAT;
    v->u.i = x;
    return push(m, v);
}

/* Run the pickle to its STOP; *result is the single value left. */
static int pm_run(struct pm *m, struct val **result) {
    int rc = 0;
    for (;;) {
        m->op = m->pos;
        if (m->pos >= m->n) return pm_fail(m, MB_EFORMAT, "truncated pickle (no STOP)");
        uint8_t op = m->p[m->pos++];
        struct val *v, *x, *y;
        size_t k = 0;
        switch (op) {
        case 0x80: /* PROTO */
            if ((rc = need(m, 1))) return rc;
            if (m->p[m->pos] > 5) return pm_fail(m, MB_EUNSUPPORTED, "pickle protocol %d", m->p[m->pos]);
            m->pos++;
            break;
        case 0x95: /* FRAME: a length hint */
            if ((rc = need(m, 8))) return rc;
            m->pos += 8;
            break;
        case '.': /* STOP */
            if (m->nmarks) return pm_fail(m, MB_EFORMAT, "STOP with an open MARK");
            if (m->sp != 1) return pm_fail(m, MB_EFORMAT, "STOP with %zu values on the stack, expected 1", m->sp);
            *result = m->stack[0];
            return 0;
        case '(': /* MARK */
            if (m->nmarks >= TB_MAX_DEPTH) return pm_fail(m, MB_EFORMAT, "MARKs nested deeper than %d", TB_MAX_DEPTH);
            m->marks[m->nmarks++] = m->sp;
            break;
        case '}': rc = push(m, newval(m, V_DICT)); break;  /* EMPTY_DICT */
        case ']': rc = push(m, newval(m, V_LIST)); break;  /* EMPTY_LIST */
        case ')': rc = push(m, newval(m, V_TUPLE)); break; /* EMPTY_TUPLE */
        case 'N': rc = push(m, newval(m, V_NONE)); break;  /* NONE */
        case 0x88: case 0x89: /* NEWTRUE, NEWFALSE */
            if ((v = newval(m, V_BOOL))) v->u.i = op == 0x88;
            rc = push(m, v);
            break;
        case 't': /* TUPLE */
            if ((rc = pop_mark(m, &k))) return rc;
            rc = make_tuple(m, k);
            break;
        case 0x85: case 0x86: case 0x87: /* TUPLE1, TUPLE2, TUPLE3 */
            k = (size_t)(op - 0x84);
            if (m->sp - floor_(m) < k) return pm_fail(m, MB_EFORMAT, "stack underflow");
            rc = make_tuple(m, m->sp - k);
            break;
        case 'a': /* APPEND */
            if (!(x = pop(m))) return MB_EFORMAT;
            if (m->sp == floor_(m) || (v = m->stack[m->sp - 1])->kind != V_LIST) return pm_fail(m, MB_EFORMAT, "APPEND to something that is not a list");
            rc = add_item(m, v, x);
            break;
        case 'e': /* APPENDS */
            if ((rc = pop_mark(m, &k))) return rc;
            if (k == floor_(m) || (v = m->stack[k - 1])->kind != V_LIST) return pm_fail(m, MB_EFORMAT, "APPENDS to something that is not a list");
            for (size_t i = k; i < m->sp && !rc; i++) rc = add_item(m, v, m->stack[i]);
            m->sp = k;
            break;
        case 's': /* SETITEM */
            if (!(y = pop(m)) || !(x = pop(m))) return MB_EFORMAT;
            if (m->sp == floor_(m) || (v = m->stack[m->sp - 1])->kind != V_DICT) return pm_fail(m, MB_EFORMAT, "SETITEM on something that is not a dict");
            if (!(rc = add_item(m, v, x))) rc = add_item(m, v, y);
            break;
        case 'u': /* SETITEMS */
            if ((rc = pop_mark(m, &k))) return rc;
            if (k == floor_(m) || (v = m->stack[k - 1])->kind != V_DICT) return pm_fail(m, MB_EFORMAT, "SETITEMS on something that is not a dict");
            if ((m->sp - k) % 2) return pm_fail(m, MB_EFORMAT, "SETITEMS with an odd number of values");
            for (size_t i = k; i < m->sp && !rc; i++) rc = add_item(m, v, m->stack[i]);
            m->sp = k;
            break;
        case 'q': /* BINPUT */
            if ((rc = need(m, 1))) return rc;
            rc = memo_put(m, m->p[m->pos++]);
            break;
        case 'r': /* LONG_BINPUT */
            if ((rc = need(m, 4))) return rc;
            rc = memo_put(m, rd32(m->p + m->pos));
            m->pos += 4;
            break;
        case 0x94: /* MEMOIZE */
            rc = memo_put(m, m->memo_count);
            break;
        case 'h': /* BINGET */
            if ((rc = need(m, 1))) return rc;
            rc = memo_get(m, m->p[m->pos++]);
            break;
        case 'j': /* LONG_BINGET */
            if ((rc = need(m, 4))) return rc;
            rc = memo_get(m, rd32(m->p + m->pos));
            m->pos += 4;
            break;
        case 'c': { /* GLOBAL "module\nname\n" */
            const char *s = (const char *)m->p + m->pos;
            size_t left = m->n - m->pos, lim = left < 2 * TB_MAX_NAME ? left : 2 * TB_MAX_NAME;
            const char *n1 = memchr(s, '\n', lim);
            const char *n2 = n1 ? memchr(n1 + 1, '\n', lim - (size_t)(n1 + 1 - s)) : NULL;
            if (!n2) return pm_fail(m, MB_EFORMAT, "GLOBAL without two newline-terminated names");
            m->pos += (size_t)(n2 + 1 - s);
            rc = do_global(m, s, (size_t)(n1 - s), n1 + 1, (size_t)(n2 - n1 - 1));
            break;
        }
        case 0x93: /* STACK_GLOBAL */
            if (!(y = pop(m)) || !(x = pop(m))) return MB_EFORMAT;
            if (x->kind != V_STR || y->kind != V_STR) return pm_fail(m, MB_EFORMAT, "STACK_GLOBAL needs two strings");
            rc = do_global(m, x->u.str.s, x->u.str.len, y->u.str.s, y->u.str.len);
            break;
        case 'R': rc = do_reduce(m); break; /* REDUCE */
        case 'b': /* BUILD: only an OrderedDict's attributes (e.g. _metadata), which are dropped */
            if (!(y = pop(m))) return MB_EFORMAT;
            if (m->sp == floor_(m)) return pm_fail(m, MB_EFORMAT, "stack underflow");
            x = m->stack[m->sp - 1];
            if (x->kind != V_DICT || (y->kind != V_DICT && y->kind != V_NONE))
                return pm_fail(m, MB_EFORMAT, "BUILD on a %s with a %s is not part of a state dict", vkind_name[x->kind], vkind_name[y->kind]);
            break;
        case 'Q': rc = do_persid(m); break; /* BINPERSID */
        case 'J': /* BININT */
            if ((rc = need(m, 4))) return rc;
            rc = push_int(m, (int32_t)rd32(m->p + m->pos));
            m->pos += 4;
            break;
        case 'K': /* BININT1 */
            if ((rc = need(m, 1))) return rc;
            rc = push_int(m, m->p[m->pos++]);
            break;
        case 'M': /* BININT2 */
            if ((rc = need(m, 2))) return rc;
            rc = push_int(m, rd16(m->p + m->pos));
            m->pos += 2;
            break;
        case 0x8a: { /* LONG1: n bytes, little-endian two's complement */
            if ((rc = need(m, 1))) return rc;
            size_t nb = m->p[m->pos++];
            if ((rc = need(m, nb))) return rc;
            if (nb > 8) return pm_fail(m, MB_EFORMAT, "integer of %zu bytes does not fit in 64 bits", nb);
            uint64_t u = 0;
            for (size_t i = 0; i < nb; i++) u |= (uint64_t)m->p[m->pos + i] << (8 * i);
            if (nb && nb < 8 && (m->p[m->pos + nb - 1] & 0x80)) u |= ~0ull << (8 * nb); /* sign-extend */
            m->pos += nb;
            int64_t sv;
            memcpy(&sv, &u, 8);
            rc = push_int(m, sv);
            break;
        }
        case 'G': { /* BINFLOAT: big-endian double */
            if ((rc = need(m, 8))) return rc;
            uint64_t u = 0;
            for (int i = 0; i < 8; i++) u = u << 8 | m->p[m->pos + i];
            m->pos += 8;
            if ((v = newval(m, V_FLOAT))) memcpy(&v->u.f, &u, 8);
            rc = push(m, v);
            break;
        }
        case 'X': /* BINUNICODE */
            if ((rc = need(m, 4))) return rc;
            k = rd32(m->p + m->pos);
            m->pos += 4;
            rc = read_str(m, k, V_STR);
            break;
        case 0x8c: /* SHORT_BINUNICODE */
            if ((rc = need(m, 1))) return rc;
            k = m->p[m->pos++];
            rc = read_str(m, k, V_STR);
            break;
        case 0x8d: { /* BINUNICODE8 */
            if ((rc = need(m, 8))) return rc;
            uint64_t len = rd64(m->p + m->pos);
            m->pos += 8;
            if (len > m->n - m->pos) return pm_fail(m, MB_EFORMAT, "truncated pickle (string of %llu bytes)", (unsigned long long)len);
            rc = read_str(m, (size_t)len, V_STR);
            break;
        }
        default:
            if (op >= 0x20 && op < 0x7f) return pm_fail(m, MB_EUNSUPPORTED, "pickle opcode '%c' (0x%02x) is not allowed in a state dict", op, op);
            return pm_fail(m, MB_EUNSUPPORTED, "pickle opcode 0x%02x is not allowed in a state dict", op);
        }
        if (rc) return rc;
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* tensors                                                                                          */

/* strict UTF-8: no overlongs, surrogates or code points above U+10FFFF */
static int utf8_ok(const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        size_t k = 0;
        uint32_t cp;
        if (c < 0x80) { i++; continue; }
        if (c >= 0xc2 && c <= 0xdf) { k = 1; cp = c & 0x1f; }
        else if (c >= 0xe0 && c <= 0xef) { k = 2; cp = c & 0x0f; }
        else if (c >= 0xf0 && c <= 0xf4) { k = 3; cp = c & 0x07; }
        else return 0;
        if (n - i <= k) return 0;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80) return 0;
            cp = cp << 6 | (s[i + j] & 0x3f);
        }
        if ((k == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (k == 3 && (cp < 0x10000 || cp > 0x10ffff))) return 0;
        i += k + 1;
    }
    return 1;
}

static int own(struct mb_st_file *f, void *p) {
    void **no = realloc(f->owned, (size_t)(f->n_owned + 1) * sizeof *no);
    if (!no) { free(p); return mb_fail(MB_ENOMEM, "%s: out of memory", f->path); }
    f->owned = no;
    f->owned[f->n_owned++] = p;
    return 0;
}

/* the bytes of storage s: member PREFIX/data/KEY, exactly numel elements */
static int resolve_storage(struct mb_st_file *f, const struct zip *z, const char *prefix, size_t plen, struct storage *s) {
    char name[TB_MAX_NAME + 300], kb[160];
    clean(kb, sizeof kb, s->key, s->klen);
    int nl = snprintf(name, sizeof name, "%.*s/data/%.*s", (int)plen, prefix, (int)s->klen, s->key);
    const struct zmem *zm = zip_find(z, name, (size_t)nl);
    if (!zm) return mb_fail(MB_EFORMAT, "%s: storage %s: member %s is missing", f->path, kb, clean(kb, sizeof kb, name, (size_t)nl));
    size_t es = mb_dtype_size(s->dt), want;
    if (!mb_mul_ok((size_t)s->numel, es, &want) || want != zm->usize)
        return mb_fail(MB_EFORMAT, "%s: storage %s: %lld elements of %s need %llu bytes but member %s holds %llu", f->path, kb, (long long)s->numel,
                       mb_dtype_name(s->dt), (unsigned long long)s->numel * es, clean(name, sizeof name, name, (size_t)nl), (unsigned long long)zm->usize);
    uint8_t *owned = NULL;
    int rc = zip_read(z, zm, 0, &s->data, &owned);
    if (rc) return rc;
    if (owned && (rc = own(f, owned))) return rc;
    return 0;
}

/* Fill f->t[i] from tensor t of storage s: a view when contiguous and aligned, else an owned copy. */
static int build_tensor(struct mb_st_file *f, struct mb_tensor_info *ti, const struct tensor *t, const struct storage *s) {
    size_t es = mb_dtype_size(s->dt);
    ti->dtype = s->dt;
    ti->ndim = t->ndim;
    size_t numel = 1;
    for (int d = 0; d < t->ndim; d++) {
        ti->shape[d] = t->shape[d];
        if (!mb_mul_ok(numel, (size_t)t->shape[d], &numel) || numel > (size_t)INT64_MAX / 8)
            return mb_fail(MB_EFORMAT, "%s: tensor %s: element count overflows", f->path, ti->name);
    }
    ti->numel = (int64_t)numel;
    ti->nbytes = numel * es;
    if (numel == 0) { /* nothing to read; the view needs no storage bytes */
        if (t->offset > s->numel) return mb_fail(MB_EFORMAT, "%s: tensor %s: storage offset %lld beyond its storage (%lld elements)", f->path, ti->name, (long long)t->offset, (long long)s->numel);
        ti->data = s->data;
        return 0;
    }
    /* the last element reached: offset + sum (shape - 1) * stride, which must lie inside the storage */
    uint64_t last = (uint64_t)t->offset;
    int contiguous = 1;
    int64_t expect = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
        size_t span;
        if (!mb_mul_ok((size_t)(t->shape[d] - 1), (size_t)t->stride[d], &span) || span > UINT64_MAX - last)
            return mb_fail(MB_EFORMAT, "%s: tensor %s: strides overflow", f->path, ti->name);
        last += span;
        if (t->shape[d] != 1 && t->stride[d] != expect) contiguous = 0;
        expect *= t->shape[d];
    }
    if (last >= (uint64_t)s->numel) {
        char kb[160];
        return mb_fail(MB_EFORMAT, "%s: tensor %s: shape and strides reach element %llu but storage %s holds %lld", f->path, ti->name,
                       (unsigned long long)last, clean(kb, sizeof kb, s->key, s->klen), (long long)s->numel);
    }
    const uint8_t *base = s->data + (size_t)t->offset * es;
    if (contiguous && (uintptr_t)base % es == 0) {
        ti->data = base;
        if (base >= f->data && base < f->data + f->data_size) ti->offset = (size_t)(base - f->data);
        return 0;
    }
    /* strided or misaligned: gather into a contiguous buffer, row-major */
    uint8_t *dst = malloc(ti->nbytes);
    if (!dst) return mb_fail(MB_ENOMEM, "%s: tensor %s: out of memory (%zu bytes)", f->path, ti->name, ti->nbytes);
    int64_t idx[MB_MAX_DIMS] = {0};
    for (size_t k = 0; k < numel; k++) {
        int64_t off = t->offset;
        for (int d = 0; d < t->ndim; d++) off += idx[d] * t->stride[d];
        memcpy(dst + k * es, s->data + (size_t)off * es, es);
        for (int d = t->ndim - 1; d >= 0; d--) {
            if (++idx[d] < t->shape[d]) break;
            idx[d] = 0;
        }
    }
    ti->data = dst;
    return own(f, dst);
}

static int cmp_tname(const void *a, const void *b) {
    return strcmp((*(const struct mb_tensor_info *const *)a)->name, (*(const struct mb_tensor_info *const *)b)->name);
}

/* the state dict: every (name, tensor) item of the top-level dict becomes f->t[i], in pickle order */
static int assemble(struct mb_st_file *f, struct pm *m, const struct val *top, const struct zip *z, const char *prefix, size_t plen) {
    char nb[200];
    if (top->kind != V_DICT) return mb_fail(MB_EFORMAT, "%s: %s: the pickle holds a %s, not a state dict", f->path, m->member, vkind_name[top->kind]);
    int n = (int)(top->n / 2);
    f->t = calloc(n ? (size_t)n : 1, sizeof *f->t);
    if (!f->t) return mb_fail(MB_ENOMEM, "%s: out of memory", f->path);
    for (int i = 0; i < n; i++) {
        const struct val *k = top->u.items[2 * i], *v = top->u.items[2 * i + 1];
        if (k->kind != V_STR) return mb_fail(MB_EFORMAT, "%s: %s: state dict key %d is a %s, not a name", f->path, m->member, i, vkind_name[k->kind]);
        clean(nb, sizeof nb, k->u.str.s, k->u.str.len);
        if (k->u.str.len == 0 || k->u.str.len > TB_MAX_NAME || memchr(k->u.str.s, 0, k->u.str.len) || !utf8_ok((const unsigned char *)k->u.str.s, k->u.str.len))
            return mb_fail(MB_EFORMAT, "%s: %s: tensor name \"%s\" is empty, too long or not UTF-8", f->path, m->member, nb);
        if (v->kind != V_TENSOR) return mb_fail(MB_EFORMAT, "%s: %s: entry %s is a %s, not a tensor", f->path, m->member, nb, vkind_name[v->kind]);
        struct mb_tensor_info *ti = &f->t[i];
        if (!(ti->name = strndup(k->u.str.s, k->u.str.len))) return mb_fail(MB_ENOMEM, "%s: out of memory", f->path);
        ti->file = f->path;
        f->n = i + 1;
        m->st[m->tt[v->u.idx].storage].used = 1;
    }
    /* names are unique */
    const struct mb_tensor_info **s = malloc((n ? (size_t)n : 1) * sizeof *s);
    if (!s) return mb_fail(MB_ENOMEM, "%s: out of memory", f->path);
    for (int i = 0; i < n; i++) s[i] = &f->t[i];
    qsort(s, (size_t)n, sizeof *s, cmp_tname);
    for (int i = 1; i < n; i++)
        if (!strcmp(s[i]->name, s[i - 1]->name)) {
            int rc = mb_fail(MB_EFORMAT, "%s: tensor %s appears twice in the state dict", f->path, clean(nb, sizeof nb, s[i]->name, strlen(s[i]->name)));
            free(s);
            return rc;
        }
    free(s);
    /* storages, each read (and checked) once, then the tensors */
    for (int i = 0; i < m->nst; i++) {
        if (!m->st[i].used) continue;
        int rc = resolve_storage(f, z, prefix, plen, &m->st[i]);
        if (rc) return rc;
    }
    for (int i = 0; i < n; i++) {
        const struct tensor *t = &m->tt[top->u.items[2 * i + 1]->u.idx];
        int rc = build_tensor(f, &f->t[i], t, &m->st[t->storage]);
        if (rc) return rc;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* entry points                                                                                     */

static void torch_file_free(struct mb_st_file *f) {
    if (!f) return;
    f->map = NULL; /* the caller owns the buffer */
    mb_st_close(f);
}

/* what a file that is not a zip archive probably is */
static int not_zip(const char *name, const uint8_t *buf, size_t size) {
    static const uint8_t legacy_magic[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};
    int legacy = (size >= sizeof legacy_magic && !memcmp(buf, legacy_magic, sizeof legacy_magic)) ||
                 (size >= 262 && !memcmp(buf + 257, "ustar", 5)); /* torch < 1.6 pickle stream, or the older tar */
    if (legacy)
        return mb_fail(MB_EUNSUPPORTED, "%s: legacy PyTorch format (torch < 1.6, not a zip archive); re-save it with torch>=1.6 "
                       "(torch.save(torch.load(f, weights_only=True), f2)) or convert it to safetensors with transformers' "
                       "save_pretrained(..., safe_serialization=True)", name);
    if (size >= 1 && buf[0] == 0x80)
        return mb_fail(MB_EUNSUPPORTED, "%s: a bare pickle, not a torch.save zip archive; mixbit reads only torch>=1.6 checkpoints", name);
    return mb_fail(MB_EFORMAT, "%s: not a PyTorch checkpoint (a torch.save zip archive starts with \"PK\")", name);
}

int mb_torch_parse(const char *name, const uint8_t *buf, size_t size, struct mb_st_file **out) {
    *out = NULL;
    if (size < 4 || memcmp(buf, "PK\3\4", 4) != 0) {
        if (size >= 4 && !memcmp(buf, "PK\5\6", 4)) return mb_fail(MB_EFORMAT, "%s: an empty zip archive (no data.pkl)", name);
        return not_zip(name, buf, size);
    }
    struct zip z = {.path = name, .buf = buf, .size = size};
    struct pm m;
    memset(&m, 0, sizeof m);
    uint8_t *pkl_owned = NULL;
    struct mb_st_file *f = NULL;
    char member[TB_MAX_NAME + 16], nb[160];
    int rc = zip_parse(&z);
    if (rc) return rc;
    /* the one PREFIX/data.pkl */
    const struct zmem *pk = NULL;
    for (size_t i = 0; i < z.n; i++) {
        const struct zmem *zm = &z.m[i];
        const char *sl = memchr(zm->name, '/', zm->nlen);
        if (!sl || (size_t)(sl - zm->name) + 9 != zm->nlen || memcmp(sl + 1, "data.pkl", 8)) continue;
        if (pk) { rc = mb_fail(MB_EFORMAT, "%s: two pickles (%s and another data.pkl)", name, clean(nb, sizeof nb, zm->name, zm->nlen)); goto fail; }
        pk = zm;
    }
    if (!pk) { rc = mb_fail(MB_EFORMAT, "%s: no PREFIX/data.pkl member: not a torch.save archive", name); goto fail; }
    size_t plen = pk->nlen - 9;
    snprintf(member, sizeof member, "%.*s", (int)pk->nlen, pk->name);
    /* byte order: only little-endian data is read */
    {
        char bo[TB_MAX_NAME + 16];
        int bl = snprintf(bo, sizeof bo, "%.*s/byteorder", (int)plen, pk->name);
        const struct zmem *bm = zip_find(&z, bo, (size_t)bl);
        if (bm) {
            const uint8_t *d;
            uint8_t *o;
            if ((rc = zip_read(&z, bm, 64, &d, &o))) goto fail;
            int little = bm->usize == 6 && !memcmp(d, "little", 6);
            free(o);
            if (!little) { rc = mb_fail(MB_EUNSUPPORTED, "%s: %s: only little-endian checkpoints are supported", name, bo); goto fail; }
        }
    }
    const uint8_t *pkl;
    if ((rc = zip_read(&z, pk, TB_MAX_PICKLE, &pkl, &pkl_owned))) goto fail;
    f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(name))) { free(f); f = NULL; rc = mb_fail(MB_ENOMEM, "%s: out of memory", name); goto fail; }
    f->data = buf;
    f->data_size = size;
    m.path = f->path;
    m.member = member;
    m.p = pkl;
    m.n = (size_t)pk->usize;
    struct val *top = NULL;
    if ((rc = pm_run(&m, &top))) goto fail;
    if ((rc = assemble(f, &m, top, &z, pk->name, plen))) goto fail;
    pm_free(&m);
    free(pkl_owned);
    zip_free(&z);
    *out = f;
    return 0;
fail:
    pm_free(&m);
    free(pkl_owned);
    zip_free(&z);
    torch_file_free(f);
    return rc;
}

int mb_torch_open(const char *path, struct mb_st_file **out) {
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return mb_fail(MB_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) { close(fd); return mb_fail(MB_EIO, "%s: stat: %s", path, strerror(errno)); }
    if (!S_ISREG(st.st_mode)) { close(fd); return mb_fail(MB_EIO, "%s: not a regular file", path); }
    size_t size = (size_t)st.st_size;
    if (size == 0) { close(fd); return mb_fail(MB_EFORMAT, "%s: empty file", path); }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return mb_fail(MB_EIO, "%s: mmap: %s", path, strerror(errno));
    struct mb_st_file *f;
    int rc = mb_torch_parse(path, map, size, &f);
    if (rc) { munmap(map, size); return rc; }
    f->map = map;
    f->map_size = size;
    *out = f;
    return 0;
}

int mb_torch_path(const char *path) {
    size_t n = strlen(path);
    return (n >= 4 && !strcmp(path + n - 4, ".bin")) || (n >= 3 && !strcmp(path + n - 3, ".pt")) || (n >= 4 && !strcmp(path + n - 4, ".pth"));
}
