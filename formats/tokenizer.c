/* formats/tokenizer.c: Hugging Face tokenizer.json (BPE models), bit-exact with the tokenizers library.
 *
 * Pipeline, as the library runs it for encode(text):
 *   1. added tokens: non-normalized added tokens are matched in the raw text (leftmost-longest), then each
 *      remaining piece is normalized and normalized added tokens are matched in it;
 *   2. normalizer per remaining piece: Sequence / Prepend / Replace (string or regex) / Strip;
 *   3. pre-tokenizer: none, ByteLevel (GPT-2 regex + byte-to-unicode), Split (regex), Metaspace, Sequence;
 *   4. BPE per pre-token: characters (or byte-fallback <0xNN> tokens, or unk), then merges by rank, lowest
 *      rank first and leftmost first on ties, with a binary heap (n log n in the word length).
 *
 * Speed: a pre-token is cut further at "safe" character boundaries (x|y where no merge joins a token ending
 * in x to a token starting with y, computed from the merges), which cannot change the result, and words
 * are cached. Anything the loader does not understand is an error naming the feature.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <jansson.h>
#include <pcre2.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "formats.h"

/* ------------------------------------------------------------------------------------------------ */
/* small utilities                                                                                  */

static uint64_t fnv1a(const void *p, size_t n, uint64_t h) {
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) { h ^= b[i]; h *= 0x100000001b3ull; }
    return h;
}
#define FNV0 0xcbf29ce484222325ull

/* length of the UTF-8 sequence at s (n bytes left); 0 if invalid */
static int utf8_len(const uint8_t *s, size_t n) {
    uint8_t c = s[0];
    if (c < 0x80) return 1;
    int len;
    uint32_t cp;
    if ((c & 0xe0) == 0xc0) { len = 2; cp = c & 0x1f; }
    else if ((c & 0xf0) == 0xe0) { len = 3; cp = c & 0x0f; }
    else if ((c & 0xf8) == 0xf0) { len = 4; cp = c & 0x07; }
    else return 0;
    if ((size_t)len > n) return 0;
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    return len;
}

static uint32_t utf8_cp(const uint8_t *s, int len) {
    if (len == 1) return s[0];
    uint32_t cp = s[0] & (len == 2 ? 0x1f : len == 3 ? 0x0f : 0x07);
    for (int i = 1; i < len; i++) cp = (cp << 6) | (s[i] & 0x3f);
    return cp;
}

static int utf8_put(uint32_t cp, char *o) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xc0 | (cp >> 6)); o[1] = (char)(0x80 | (cp & 0x3f)); return 2; }
    if (cp < 0x10000) { o[0] = (char)(0xe0 | (cp >> 12)); o[1] = (char)(0x80 | ((cp >> 6) & 0x3f)); o[2] = (char)(0x80 | (cp & 0x3f)); return 3; }
    o[0] = (char)(0xf0 | (cp >> 18)); o[1] = (char)(0x80 | ((cp >> 12) & 0x3f)); o[2] = (char)(0x80 | ((cp >> 6) & 0x3f)); o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* growable byte buffer */
struct buf { char *p; size_t n, cap; };
static int buf_reserve(struct buf *b, size_t extra) {
    if (b->n + extra + 1 <= b->cap) return 0;
    size_t nc = b->cap ? b->cap : 256;
    while (nc < b->n + extra + 1) nc *= 2;
    char *np = realloc(b->p, nc);
    if (!np) return mb_fail(MB_ENOMEM, "tokenizer: out of memory");
    b->p = np;
    b->cap = nc;
    return 0;
}
static int buf_add(struct buf *b, const void *s, size_t n) {
    if (buf_reserve(b, n)) return MB_ENOMEM;
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return 0;
}

/* string -> int32 hash map (open addressing over a pool of strings owned by the map) */
struct smap {
    uint32_t cap, count;
    int32_t *slot_id;    /* -1 empty */
    uint32_t *slot_key;  /* index into keys */
    char **keys;
    uint32_t *klen;
    uint32_t nkeys, kcap;
};

static int smap_init(struct smap *m, uint32_t expect) {
    memset(m, 0, sizeof *m);
    m->cap = 16;
    while (m->cap < expect * 2 + 16) m->cap *= 2;
    m->slot_id = malloc(m->cap * sizeof *m->slot_id);
    m->slot_key = malloc(m->cap * sizeof *m->slot_key);
    if (!m->slot_id || !m->slot_key) return mb_fail(MB_ENOMEM, "tokenizer: out of memory");
    for (uint32_t i = 0; i < m->cap; i++) m->slot_id[i] = -1;
    return 0;
}

static void smap_free(struct smap *m) {
    for (uint32_t i = 0; i < m->nkeys; i++) free(m->keys[i]);
    free(m->keys);
    free(m->klen);
    free(m->slot_id);
    free(m->slot_key);
}

static int32_t smap_get(const struct smap *m, const char *s, size_t n) {
    uint32_t h = (uint32_t)fnv1a(s, n, FNV0), mask = m->cap - 1;
    for (uint32_t i = h & mask;; i = (i + 1) & mask) {
        if (m->slot_id[i] < 0) return -1;
        uint32_t k = m->slot_key[i];
        if (m->klen[k] == n && memcmp(m->keys[k], s, n) == 0) return m->slot_id[i];
    }
}

/* insert; returns 1 if the key existed (value not changed) */
static int smap_put(struct smap *m, const char *s, size_t n, int32_t id) {
    if ((m->count + 1) * 2 > m->cap) {
        struct smap nm;
        if (smap_init(&nm, m->cap)) return -1;
        for (uint32_t i = 0; i < m->cap; i++) {
            if (m->slot_id[i] < 0) continue;
            uint32_t k = m->slot_key[i], h = (uint32_t)fnv1a(m->keys[k], m->klen[k], FNV0), mask = nm.cap - 1, j = h & mask;
            while (nm.slot_id[j] >= 0) j = (j + 1) & mask;
            nm.slot_id[j] = m->slot_id[i];
            nm.slot_key[j] = k;
        }
        free(m->slot_id);
        free(m->slot_key);
        m->slot_id = nm.slot_id;
        m->slot_key = nm.slot_key;
        m->cap = nm.cap;
    }
    uint32_t h = (uint32_t)fnv1a(s, n, FNV0), mask = m->cap - 1, i;
    for (i = h & mask; m->slot_id[i] >= 0; i = (i + 1) & mask) {
        uint32_t k = m->slot_key[i];
        if (m->klen[k] == n && memcmp(m->keys[k], s, n) == 0) return 1;
    }
    if (m->nkeys == m->kcap) {
        uint32_t nc = m->kcap ? m->kcap * 2 : 1024;
        char **nk = realloc(m->keys, nc * sizeof *nk);
        if (!nk) return -1;
        m->keys = nk;
        uint32_t *nl = realloc(m->klen, nc * sizeof *nl);
        if (!nl) return -1;
        m->klen = nl;
        m->kcap = nc;
    }
    char *copy = malloc(n + 1);
    if (!copy) return -1;
    memcpy(copy, s, n);
    copy[n] = 0;
    m->keys[m->nkeys] = copy;
    m->klen[m->nkeys] = (uint32_t)n;
    m->slot_id[i] = id;
    m->slot_key[i] = m->nkeys++;
    m->count++;
    return 0;
}

/* (a, b) -> (rank, new id) */
struct merge_ent { uint64_t key; int32_t rank, new_id; };
struct mmap_ { uint32_t cap; struct merge_ent *e; };

static uint32_t hash64(uint64_t k) {
    k ^= k >> 33; k *= 0xff51afd7ed558ccdull; k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53ull; k ^= k >> 33;
    return (uint32_t)k;
}

static const struct merge_ent *mmap_get(const struct mmap_ *m, uint64_t key) {
    uint32_t mask = m->cap - 1;
    for (uint32_t i = hash64(key) & mask;; i = (i + 1) & mask) {
        if (m->e[i].rank < 0) return NULL;
        if (m->e[i].key == key) return &m->e[i];
    }
}

/* codepoint-pair set for safe boundaries */
struct pset { uint32_t cap; uint64_t *k; /* 0 = empty; stored key+1 */ };
static int pset_has(const struct pset *s, uint64_t key) {
    uint32_t mask = s->cap - 1;
    key += 1;
    for (uint32_t i = hash64(key) & mask;; i = (i + 1) & mask) {
        if (s->k[i] == 0) return 0;
        if (s->k[i] == key) return 1;
    }
}
static void pset_add(struct pset *s, uint64_t key) {
    uint32_t mask = s->cap - 1;
    key += 1;
    uint32_t i;
    for (i = hash64(key) & mask; s->k[i] && s->k[i] != key; i = (i + 1) & mask) {}
    s->k[i] = key;
}

/* ------------------------------------------------------------------------------------------------ */
/* tokenizer structure                                                                              */

enum norm_type { N_PREPEND, N_REPLACE_STR, N_REPLACE_RE, N_STRIP };
struct norm { enum norm_type type; char *a; size_t alen; char *b; size_t blen; pcre2_code *re; int left, right; };

enum pre_type { P_BYTELEVEL, P_SPLIT, P_METASPACE };
enum split_behavior { B_ISOLATED, B_REMOVED, B_MERGED_PREV, B_MERGED_NEXT, B_CONTIGUOUS };
struct pre {
    enum pre_type type;
    int add_prefix_space, use_regex, invert, split_ws;
    enum split_behavior behavior;
    pcre2_code *re;
    char *str; size_t slen; /* string pattern for Split */
    int prepend_scheme; /* metaspace: 0 never, 1 first, 2 always */
    char repl[8]; size_t repl_len;
};

struct added { char *s; size_t n; int32_t id; int special, normalized, lstrip, rstrip, single_word; };

enum dec_type { D_NONE, D_BYTELEVEL, D_SP, D_METASPACE };

struct word_cache_ent { uint32_t len, nids; char *key; int32_t *ids; };

struct mb_tokenizer {
    int64_t vocab_n;
    char **tok;       /* id -> string (NULL if the id is unused) */
    uint32_t *toklen;
    struct smap vocab;
    struct mmap_ merges;
    int n_merges;
    int32_t unk_id;
    int byte_fallback, fuse_unk, ignore_merges;
    int32_t byte_ids[256]; /* <0xNN> ids, or -1 */
    int byte_level;        /* model works on byte-level unicode chars */
    uint32_t byte2cp[256];
    int16_t cp2byte[512];  /* for decoding; -1 if not a byte-level char (cps < 512 in the GPT-2 map) */
    struct norm *norms; int n_norms;
    struct pre *pres; int n_pres;
    struct added *added; int n_added;
    uint8_t added_first[2][256]; /* first-byte bitmap per pass (0: raw, 1: normalized) */
    enum dec_type dec;
    int dec_strip_start;
    int32_t bos_id, eos_id;
    int add_bos, add_eos;
    int can_split;         /* safe-boundary splitting allowed */
    struct pset pairs;
    int streamable;
    uint64_t hash;
    /* word cache (not thread-safe: a tokenizer is used by one thread at a time) */
    struct word_cache_ent *cache;
    uint32_t cache_cap, cache_n;
};

int64_t mb_tokenizer_vocab_size(const struct mb_tokenizer *t) { return t->vocab_n; }
int32_t mb_tokenizer_bos(const struct mb_tokenizer *t) { return t->bos_id; }
int32_t mb_tokenizer_eos(const struct mb_tokenizer *t) { return t->eos_id; }
int mb_tokenizer_adds_bos(const struct mb_tokenizer *t) { return t->add_bos; }
uint64_t mb_tokenizer_hash(const struct mb_tokenizer *t) { return t->hash; }

void mb_tokenizer_free(struct mb_tokenizer *t) {
    if (!t) return;
    for (int64_t i = 0; i < t->vocab_n; i++) free(t->tok[i]);
    free(t->tok);
    free(t->toklen);
    if (t->vocab.slot_id) smap_free(&t->vocab);
    free(t->merges.e);
    for (int i = 0; i < t->n_norms; i++) { free(t->norms[i].a); free(t->norms[i].b); if (t->norms[i].re) pcre2_code_free(t->norms[i].re); }
    free(t->norms);
    for (int i = 0; i < t->n_pres; i++) { if (t->pres[i].re) pcre2_code_free(t->pres[i].re); free(t->pres[i].str); }
    free(t->pres);
    for (int i = 0; i < t->n_added; i++) free(t->added[i].s);
    free(t->added);
    free(t->pairs.k);
    for (uint32_t i = 0; i < t->cache_cap; i++) { free(t->cache[i].key); free(t->cache[i].ids); }
    free(t->cache);
    free(t);
}

/* ------------------------------------------------------------------------------------------------ */
/* loading                                                                                          */

static const char *GPT2_PATTERN = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int compile_re(const char *file, const char *what, const char *pat, pcre2_code **out) {
    int err;
    PCRE2_SIZE off;
    *out = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &err, &off, NULL);
    if (!*out) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return mb_fail(MB_EUNSUPPORTED, "%s: %s regex \"%.80s\" does not compile (at %zu): %s", file, what, pat, (size_t)off, (char *)msg);
    }
    pcre2_jit_compile(*out, PCRE2_JIT_COMPLETE); /* optional speed-up; falls back to the interpreter */
    return 0;
}

static int load_pattern(const char *file, const char *what, json_t *pat, char **str, size_t *slen, pcre2_code **re) {
    json_t *s = json_object_get(pat, "String"), *r = json_object_get(pat, "Regex");
    if (json_is_string(s)) {
        *slen = json_string_length(s);
        *str = malloc(*slen + 1);
        if (!*str) return mb_fail(MB_ENOMEM, "out of memory");
        memcpy(*str, json_string_value(s), *slen + 1);
        return 0;
    }
    if (json_is_string(r)) return compile_re(file, what, json_string_value(r), re);
    return mb_fail(MB_EFORMAT, "%s: %s pattern is neither String nor Regex", file, what);
}

static int load_normalizer(struct mb_tokenizer *t, const char *file, json_t *n) {
    if (!n || json_is_null(n)) return 0;
    const char *type = json_string_value(json_object_get(n, "type"));
    if (!type) return mb_fail(MB_EFORMAT, "%s: normalizer without a type", file);
    if (!strcmp(type, "Sequence")) {
        json_t *arr = json_object_get(n, "normalizers");
        if (!json_is_array(arr)) return mb_fail(MB_EFORMAT, "%s: Sequence normalizer without a list", file);
        for (size_t i = 0; i < json_array_size(arr); i++) {
            int rc = load_normalizer(t, file, json_array_get(arr, i));
            if (rc) return rc;
        }
        return 0;
    }
    struct norm *nn = realloc(t->norms, (t->n_norms + 1) * sizeof *nn);
    if (!nn) return mb_fail(MB_ENOMEM, "out of memory");
    t->norms = nn;
    struct norm *x = &t->norms[t->n_norms];
    memset(x, 0, sizeof *x);
    if (!strcmp(type, "Prepend")) {
        json_t *p = json_object_get(n, "prepend");
        if (!json_is_string(p)) return mb_fail(MB_EFORMAT, "%s: Prepend normalizer without a string", file);
        x->type = N_PREPEND;
        x->a = strdup(json_string_value(p));
        x->alen = strlen(x->a);
    } else if (!strcmp(type, "Replace")) {
        json_t *c = json_object_get(n, "content");
        if (!json_is_string(c)) return mb_fail(MB_EFORMAT, "%s: Replace normalizer without content", file);
        x->b = strdup(json_string_value(c));
        x->blen = strlen(x->b);
        int rc = load_pattern(file, "Replace normalizer", json_object_get(n, "pattern"), &x->a, &x->alen, &x->re);
        if (rc) { free(x->b); return rc; }
        x->type = x->re ? N_REPLACE_RE : N_REPLACE_STR;
        if (x->type == N_REPLACE_STR && x->alen == 0) { free(x->a); free(x->b); return mb_fail(MB_EFORMAT, "%s: Replace normalizer with an empty pattern", file); }
    } else if (!strcmp(type, "Strip")) {
        x->type = N_STRIP;
        x->left = json_is_true(json_object_get(n, "strip_left"));
        x->right = json_is_true(json_object_get(n, "strip_right"));
    } else {
        return mb_fail(MB_EUNSUPPORTED, "%s: normalizer \"%s\" is not supported (supported: Sequence, Prepend, Replace, Strip)", file, type);
    }
    t->n_norms++;
    return 0;
}

static int load_pre(struct mb_tokenizer *t, const char *file, json_t *p) {
    if (!p || json_is_null(p)) return 0;
    const char *type = json_string_value(json_object_get(p, "type"));
    if (!type) return mb_fail(MB_EFORMAT, "%s: pre_tokenizer without a type", file);
    if (!strcmp(type, "Sequence")) {
        json_t *arr = json_object_get(p, "pretokenizers");
        if (!json_is_array(arr)) return mb_fail(MB_EFORMAT, "%s: Sequence pre_tokenizer without a list", file);
        for (size_t i = 0; i < json_array_size(arr); i++) {
            int rc = load_pre(t, file, json_array_get(arr, i));
            if (rc) return rc;
        }
        return 0;
    }
    struct pre *np = realloc(t->pres, (t->n_pres + 1) * sizeof *np);
    if (!np) return mb_fail(MB_ENOMEM, "out of memory");
    t->pres = np;
    struct pre *x = &t->pres[t->n_pres];
    memset(x, 0, sizeof *x);
    if (!strcmp(type, "ByteLevel")) {
        x->type = P_BYTELEVEL;
        x->add_prefix_space = json_is_true(json_object_get(p, "add_prefix_space"));
        json_t *ur = json_object_get(p, "use_regex");
        x->use_regex = ur ? json_is_true(ur) : 1;
        if (x->use_regex) { int rc = compile_re(file, "ByteLevel", GPT2_PATTERN, &x->re); if (rc) return rc; }
        t->byte_level = 1;
    } else if (!strcmp(type, "Split")) {
        x->type = P_SPLIT;
        int rc = load_pattern(file, "Split pre_tokenizer", json_object_get(p, "pattern"), &x->str, &x->slen, &x->re);
        if (rc) return rc;
        const char *b = json_string_value(json_object_get(p, "behavior"));
        if (!b) b = "Isolated";
        if (!strcmp(b, "Isolated")) x->behavior = B_ISOLATED;
        else if (!strcmp(b, "Removed")) x->behavior = B_REMOVED;
        else if (!strcmp(b, "MergedWithPrevious")) x->behavior = B_MERGED_PREV;
        else if (!strcmp(b, "MergedWithNext")) x->behavior = B_MERGED_NEXT;
        else if (!strcmp(b, "Contiguous")) x->behavior = B_CONTIGUOUS;
        else return mb_fail(MB_EUNSUPPORTED, "%s: Split behavior \"%s\" is not supported", file, b);
        if (json_is_true(json_object_get(p, "invert"))) return mb_fail(MB_EUNSUPPORTED, "%s: Split with invert = true is not supported", file);
    } else if (!strcmp(type, "Metaspace")) {
        x->type = P_METASPACE;
        const char *r = json_string_value(json_object_get(p, "replacement"));
        if (!r) r = "\xe2\x96\x81";
        x->repl_len = strlen(r);
        if (x->repl_len == 0 || x->repl_len >= sizeof x->repl) return mb_fail(MB_EFORMAT, "%s: Metaspace replacement must be one character", file);
        memcpy(x->repl, r, x->repl_len + 1);
        const char *ps = json_string_value(json_object_get(p, "prepend_scheme"));
        json_t *aps = json_object_get(p, "add_prefix_space");
        if (ps) x->prepend_scheme = !strcmp(ps, "always") ? 2 : !strcmp(ps, "first") ? 1 : 0;
        else x->prepend_scheme = (aps && !json_is_true(aps)) ? 0 : 2;
        json_t *sp = json_object_get(p, "split");
        x->split_ws = sp ? json_is_true(sp) : 1;
    } else {
        return mb_fail(MB_EUNSUPPORTED, "%s: pre_tokenizer \"%s\" is not supported (supported: ByteLevel, Split, Metaspace, Sequence)", file, type);
    }
    t->n_pres++;
    return 0;
}

static int load_decoder(struct mb_tokenizer *t, const char *file, json_t *d) {
    if (!d || json_is_null(d)) { t->dec = t->byte_level ? D_BYTELEVEL : D_NONE; return 0; }
    const char *type = json_string_value(json_object_get(d, "type"));
    if (!type) return mb_fail(MB_EFORMAT, "%s: decoder without a type", file);
    if (!strcmp(type, "ByteLevel")) { t->dec = D_BYTELEVEL; return 0; }
    if (!strcmp(type, "Metaspace")) { t->dec = D_METASPACE; t->dec_strip_start = 1; return 0; }
    if (!strcmp(type, "Sequence")) {
        json_t *arr = json_object_get(d, "decoders");
        t->dec = D_SP;
        for (size_t i = 0; i < json_array_size(arr); i++) {
            json_t *x = json_array_get(arr, i);
            const char *ty = json_string_value(json_object_get(x, "type"));
            if (!ty) continue;
            if (!strcmp(ty, "Strip")) t->dec_strip_start = (int)json_integer_value(json_object_get(x, "start"));
            else if (!strcmp(ty, "ByteLevel")) t->dec = D_BYTELEVEL;
            else if (strcmp(ty, "Replace") && strcmp(ty, "ByteFallback") && strcmp(ty, "Fuse"))
                return mb_fail(MB_EUNSUPPORTED, "%s: decoder \"%s\" is not supported", file, ty);
        }
        return 0;
    }
    return mb_fail(MB_EUNSUPPORTED, "%s: decoder \"%s\" is not supported", file, type);
}

static void init_byte_map(struct mb_tokenizer *t) {
    int n = 0;
    for (int b = 0; b < 256; b++) {
        if ((b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff)) t->byte2cp[b] = (uint32_t)b;
        else t->byte2cp[b] = (uint32_t)(256 + n++);
    }
    for (int i = 0; i < 512; i++) t->cp2byte[i] = -1;
    for (int b = 0; b < 256; b++) t->cp2byte[t->byte2cp[b]] = (int16_t)b;
}

static int set_token(struct mb_tokenizer *t, const char *file, const char *s, size_t n, int64_t id) {
    if (id < 0 || id >= t->vocab_n) return mb_fail(MB_EFORMAT, "%s: token id %lld out of range", file, (long long)id);
    if (t->tok[id] && (t->toklen[id] != n || memcmp(t->tok[id], s, n))) return mb_fail(MB_EFORMAT, "%s: id %lld is used by two different tokens", file, (long long)id);
    if (!t->tok[id]) {
        if (!(t->tok[id] = malloc(n + 1))) return mb_fail(MB_ENOMEM, "out of memory");
        memcpy(t->tok[id], s, n);
        t->tok[id][n] = 0;
        t->toklen[id] = (uint32_t)n;
    }
    return 0;
}

static int cmp_added_len(const void *a, const void *b) {
    const struct added *x = a, *y = b;
    return x->n < y->n ? 1 : x->n > y->n ? -1 : 0;
}

/* last / first codepoint of a token string */
static uint32_t last_cp(const char *s, size_t n) {
    size_t i = n;
    while (i > 0 && ((uint8_t)s[i - 1] & 0xc0) == 0x80) i--;
    if (i == 0) return 0;
    i--;
    return utf8_cp((const uint8_t *)s + i, (int)(n - i));
}
static uint32_t first_cp(const char *s, size_t n) {
    int l = utf8_len((const uint8_t *)s, n);
    return l ? utf8_cp((const uint8_t *)s, l) : 0;
}

static int is_byte_token(const char *s, size_t n) {
    return n == 6 && s[0] == '<' && s[1] == '0' && s[2] == 'x' && s[5] == '>';
}

static int load_model(struct mb_tokenizer *t, const char *file, json_t *model) {
    if (!json_is_object(model)) return mb_fail(MB_EFORMAT, "%s: no \"model\" object", file);
    const char *type = json_string_value(json_object_get(model, "type"));
    if (!type) type = json_object_get(model, "merges") ? "BPE" : "?";
    if (strcmp(type, "BPE")) return mb_fail(MB_EUNSUPPORTED, "%s: model type \"%s\" is not supported (only BPE)", file, type);
    json_t *vocab = json_object_get(model, "vocab"), *merges = json_object_get(model, "merges");
    if (!json_is_object(vocab)) return mb_fail(MB_EFORMAT, "%s: BPE model without a vocab object", file);
    if (!json_is_array(merges)) return mb_fail(MB_EFORMAT, "%s: BPE model without a merges list", file);
    json_t *dropout = json_object_get(model, "dropout");
    if (json_is_number(dropout) && json_number_value(dropout) > 0) return mb_fail(MB_EUNSUPPORTED, "%s: BPE dropout is not supported", file);
    const char *csp = json_string_value(json_object_get(model, "continuing_subword_prefix"));
    const char *eows = json_string_value(json_object_get(model, "end_of_word_suffix"));
    if ((csp && *csp) || (eows && *eows)) return mb_fail(MB_EUNSUPPORTED, "%s: BPE continuing_subword_prefix / end_of_word_suffix are not supported", file);
    t->byte_fallback = json_is_true(json_object_get(model, "byte_fallback"));
    t->fuse_unk = json_is_true(json_object_get(model, "fuse_unk"));
    t->ignore_merges = json_is_true(json_object_get(model, "ignore_merges"));

    /* vocab size = max id + 1 over vocab and added tokens (filled by the caller first) */
    const char *k;
    json_t *v;
    json_object_foreach(vocab, k, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= (1 << 24))
            return mb_fail(MB_EFORMAT, "%s: vocab entry \"%.40s\" has no valid id", file, k);
        if (json_integer_value(v) >= t->vocab_n) t->vocab_n = json_integer_value(v) + 1;
    }
    return 0;
}

static int build_vocab(struct mb_tokenizer *t, const char *file, json_t *model, json_t *added) {
    t->tok = calloc(t->vocab_n ? t->vocab_n : 1, sizeof *t->tok);
    t->toklen = calloc(t->vocab_n ? t->vocab_n : 1, sizeof *t->toklen);
    if (!t->tok || !t->toklen) return mb_fail(MB_ENOMEM, "out of memory");
    json_t *vocab = json_object_get(model, "vocab");
    if (smap_init(&t->vocab, (uint32_t)json_object_size(vocab))) return MB_ENOMEM;
    const char *k;
    json_t *v;
    uint64_t h = FNV0;
    json_object_foreach(vocab, k, v) {
        size_t n = strlen(k);
        int64_t id = json_integer_value(v);
        int rc = set_token(t, file, k, n, id);
        if (rc) return rc;
        int r = smap_put(&t->vocab, k, n, (int32_t)id);
        if (r < 0) return mb_fail(MB_ENOMEM, "out of memory");
    }
    for (int64_t i = 0; i < t->vocab_n; i++)
        if (t->tok[i]) { h = fnv1a(t->tok[i], t->toklen[i], h); h = fnv1a(&i, sizeof i, h); }
    for (size_t i = 0; i < json_array_size(added); i++) {
        json_t *a = json_array_get(added, i);
        json_t *c = json_object_get(a, "content"), *id = json_object_get(a, "id");
        if (!json_is_string(c) || !json_is_integer(id)) return mb_fail(MB_EFORMAT, "%s: added_tokens[%zu] needs content and id", file, i);
        int rc = set_token(t, file, json_string_value(c), json_string_length(c), json_integer_value(id));
        if (rc) return rc;
        smap_put(&t->vocab, json_string_value(c), json_string_length(c), (int32_t)json_integer_value(id));
    }
    t->hash = h;
    /* unk */
    const char *unk = json_string_value(json_object_get(model, "unk_token"));
    t->unk_id = unk ? smap_get(&t->vocab, unk, strlen(unk)) : -1;
    if (unk && t->unk_id < 0) return mb_fail(MB_EFORMAT, "%s: unk_token \"%s\" is not in the vocab", file, unk);
    for (int b = 0; b < 256; b++) {
        char s[8];
        snprintf(s, sizeof s, "<0x%02X>", b);
        t->byte_ids[b] = smap_get(&t->vocab, s, 6);
    }
    return 0;
}

static int build_merges(struct mb_tokenizer *t, const char *file, json_t *merges) {
    size_t n = json_array_size(merges);
    t->merges.cap = 16;
    while (t->merges.cap < n * 2 + 16) t->merges.cap *= 2;
    t->merges.e = malloc(t->merges.cap * sizeof *t->merges.e);
    t->pairs.cap = t->merges.cap;
    t->pairs.k = calloc(t->pairs.cap, sizeof *t->pairs.k);
    if (!t->merges.e || !t->pairs.k) return mb_fail(MB_ENOMEM, "out of memory");
    for (uint32_t i = 0; i < t->merges.cap; i++) t->merges.e[i].rank = -1;
    t->can_split = 1;
    char *joined = NULL;
    size_t jcap = 0;
    for (size_t r = 0; r < n; r++) {
        json_t *m = json_array_get(merges, r);
        const char *a, *b;
        size_t al, bl;
        if (json_is_string(m)) { /* "a b" */
            a = json_string_value(m);
            const char *sp = strchr(a, ' ');
            if (!sp || sp == a || sp[1] == 0 || strchr(sp + 1, ' ')) { free(joined); return mb_fail(MB_EFORMAT, "%s: merges[%zu] \"%.40s\" is not two tokens separated by one space", file, r, a); }
            al = (size_t)(sp - a);
            b = sp + 1;
            bl = strlen(b);
        } else if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) && json_is_string(json_array_get(m, 1))) {
            a = json_string_value(json_array_get(m, 0));
            al = json_string_length(json_array_get(m, 0));
            b = json_string_value(json_array_get(m, 1));
            bl = json_string_length(json_array_get(m, 1));
        } else {
            free(joined);
            return mb_fail(MB_EFORMAT, "%s: merges[%zu] is neither \"a b\" nor [a, b]", file, r);
        }
        int32_t ia = smap_get(&t->vocab, a, al), ib = smap_get(&t->vocab, b, bl);
        if (ia < 0 || ib < 0) { free(joined); return mb_fail(MB_EFORMAT, "%s: merges[%zu]: token \"%.*s\" is not in the vocab", file, r, (int)(ia < 0 ? al : bl), ia < 0 ? a : b); }
        if (al + bl + 1 > jcap) { jcap = (al + bl + 1) * 2; char *nj = realloc(joined, jcap); if (!nj) { free(joined); return mb_fail(MB_ENOMEM, "out of memory"); } joined = nj; }
        memcpy(joined, a, al);
        memcpy(joined + al, b, bl);
        int32_t inew = smap_get(&t->vocab, joined, al + bl);
        if (inew < 0) {
            mb_fail(MB_EFORMAT, "%s: merges[%zu]: merged token \"%.*s\" is not in the vocab", file, r, (int)(al + bl), joined);
            free(joined);
            return MB_EFORMAT;
        }
        uint64_t key = ((uint64_t)(uint32_t)ia << 32) | (uint32_t)ib;
        uint32_t mask = t->merges.cap - 1, i;
        for (i = hash64(key) & mask; t->merges.e[i].rank >= 0 && t->merges.e[i].key != key; i = (i + 1) & mask) {}
        if (t->merges.e[i].rank < 0) { /* first occurrence wins, as in the library */
            t->merges.e[i].key = key;
            t->merges.e[i].rank = (int32_t)r;
            t->merges.e[i].new_id = inew;
        }
        if (is_byte_token(a, al) || is_byte_token(b, bl) || ia == t->unk_id || ib == t->unk_id) t->can_split = 0;
        pset_add(&t->pairs, ((uint64_t)last_cp(a, al) << 32) | first_cp(b, bl));
        t->hash = fnv1a(joined, al + bl, t->hash);
    }
    free(joined);
    t->n_merges = (int)n;
    return 0;
}

static int load_added(struct mb_tokenizer *t, const char *file, json_t *added) {
    size_t n = json_array_size(added);
    t->added = calloc(n ? n : 1, sizeof *t->added);
    if (!t->added) return mb_fail(MB_ENOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        json_t *a = json_array_get(added, i);
        struct added *x = &t->added[t->n_added];
        size_t len = json_string_length(json_object_get(a, "content"));
        if (len == 0) continue;
        x->s = malloc(len + 1);
        if (!x->s) return mb_fail(MB_ENOMEM, "out of memory");
        memcpy(x->s, json_string_value(json_object_get(a, "content")), len + 1);
        x->n = len;
        x->id = (int32_t)json_integer_value(json_object_get(a, "id"));
        x->special = json_is_true(json_object_get(a, "special"));
        json_t *nz = json_object_get(a, "normalized");
        x->normalized = nz ? json_is_true(nz) : !x->special;
        x->lstrip = json_is_true(json_object_get(a, "lstrip"));
        x->rstrip = json_is_true(json_object_get(a, "rstrip"));
        x->single_word = json_is_true(json_object_get(a, "single_word"));
        t->added_first[x->normalized ? 1 : 0][(uint8_t)x->s[0]] = 1;
        t->n_added++;
    }
    qsort(t->added, t->n_added, sizeof *t->added, cmp_added_len);
    (void)file;
    return 0;
}

/* read tokenizer_config.json (optional) for add_bos_token / add_eos_token / bos / eos */
static int token_id_of(struct mb_tokenizer *t, json_t *v) {
    if (json_is_object(v)) v = json_object_get(v, "content");
    if (!json_is_string(v)) return -1;
    return smap_get(&t->vocab, json_string_value(v), json_string_length(v));
}

static int load_tok_config(struct mb_tokenizer *t, const char *dir, json_t *post) {
    /* defaults from the post-processor template: a SpecialToken before the sequence means BOS */
    t->bos_id = t->eos_id = -1;
    json_t *single = json_object_get(post, "single");
    if (json_is_array(single) && json_array_size(single) > 0) {
        json_t *first = json_object_get(json_array_get(single, 0), "SpecialToken");
        json_t *last = json_object_get(json_array_get(single, json_array_size(single) - 1), "SpecialToken");
        if (first) { t->add_bos = 1; t->bos_id = token_id_of(t, json_object_get(first, "id")); }
        if (last && json_array_size(single) > 1) { t->add_eos = 1; t->eos_id = token_id_of(t, json_object_get(last, "id")); }
    }
    char p[4096];
    if (mb_path_join(p, sizeof p, dir, "tokenizer_config.json") || !mb_file_exists(p)) {
        if (t->bos_id < 0) t->bos_id = smap_get(&t->vocab, "<s>", 3);
        if (t->eos_id < 0) t->eos_id = smap_get(&t->vocab, "</s>", 4);
        return 0;
    }
    json_error_t jerr;
    json_t *c = json_load_file(p, 0, &jerr);
    if (!c) return mb_fail(MB_EFORMAT, "%s: invalid JSON: %s (line %d)", p, jerr.text, jerr.line);
    json_t *ab = json_object_get(c, "add_bos_token"), *ae = json_object_get(c, "add_eos_token");
    if (json_is_boolean(ab)) t->add_bos = json_is_true(ab);
    if (json_is_boolean(ae)) t->add_eos = json_is_true(ae);
    int b = token_id_of(t, json_object_get(c, "bos_token")), e = token_id_of(t, json_object_get(c, "eos_token"));
    if (b >= 0) t->bos_id = b;
    if (e >= 0) t->eos_id = e;
    json_decref(c);
    if (t->add_bos && t->bos_id < 0) return mb_fail(MB_EFORMAT, "%s: add_bos_token is set but there is no BOS token", p);
    return 0;
}

int mb_tokenizer_load(const char *path, struct mb_tokenizer **out) {
    *out = NULL;
    char file[4096], dir[4096];
    if (mb_is_dir(path)) {
        snprintf(dir, sizeof dir, "%s", path);
        if (mb_path_join(file, sizeof file, path, "tokenizer.json")) return MB_EINVAL;
        if (!mb_file_exists(file)) return mb_fail(MB_EIO, "%s: no tokenizer.json in the directory", path);
    } else {
        snprintf(file, sizeof file, "%s", path);
        snprintf(dir, sizeof dir, "%s", path);
        char *sl = strrchr(dir, '/');
        if (sl) *sl = 0; else strcpy(dir, ".");
    }
    char *text;
    size_t len;
    int rc = mb_read_file(file, &text, &len, 1u << 30);
    if (rc) return rc;
    json_error_t jerr;
    json_t *root = json_loadb(text, len, 0, &jerr);
    free(text);
    if (!root) return mb_fail(MB_EFORMAT, "%s: invalid JSON: %s (line %d)", file, jerr.text, jerr.line);
    struct mb_tokenizer *t = calloc(1, sizeof *t);
    if (!t) { json_decref(root); return mb_fail(MB_ENOMEM, "out of memory"); }
    init_byte_map(t);
    json_t *model = json_object_get(root, "model"), *added = json_object_get(root, "added_tokens");
    if (!json_is_object(root)) { rc = mb_fail(MB_EFORMAT, "%s: not a JSON object", file); goto fail; }
    if (added && !json_is_array(added)) { rc = mb_fail(MB_EFORMAT, "%s: added_tokens is not a list", file); goto fail; }
    if ((rc = load_model(t, file, model))) goto fail;
    for (size_t i = 0; i < json_array_size(added); i++) {
        json_int_t id = json_integer_value(json_object_get(json_array_get(added, i), "id"));
        if (id < 0 || id >= (1 << 24)) { rc = mb_fail(MB_EFORMAT, "%s: added_tokens[%zu] has no valid id", file, i); goto fail; }
        if (id >= t->vocab_n) t->vocab_n = id + 1;
    }
    if ((rc = build_vocab(t, file, model, added))) goto fail;
    if ((rc = build_merges(t, file, json_object_get(model, "merges")))) goto fail;
    if ((rc = load_added(t, file, added))) goto fail;
    if ((rc = load_normalizer(t, file, json_object_get(root, "normalizer")))) goto fail;
    if ((rc = load_pre(t, file, json_object_get(root, "pre_tokenizer")))) goto fail;
    if ((rc = load_decoder(t, file, json_object_get(root, "decoder")))) goto fail;
    if ((rc = load_tok_config(t, dir, json_object_get(root, "post_processor")))) goto fail;
    /* streaming cuts text after a '\n' followed by a non-space; safe unless a regex normalizer could
     * reach across lines (only the anchored/local patterns of the Llama-family files are known safe) */
    t->streamable = 1;
    for (int i = 0; i < t->n_norms; i++)
        if (t->norms[i].type == N_REPLACE_RE) t->streamable = 0;
    t->cache_cap = 1 << 16;
    t->cache = calloc(t->cache_cap, sizeof *t->cache);
    if (!t->cache) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto fail; }
    json_decref(root);
    *out = t;
    return 0;
fail:
    json_decref(root);
    mb_tokenizer_free(t);
    return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* encoding                                                                                         */

struct ids { int32_t **p; int64_t *n, *cap; };
static int ids_push(struct ids *v, int32_t id) {
    if (*v->n == *v->cap) {
        int64_t nc = *v->cap ? *v->cap * 2 : 1024;
        int32_t *np = realloc(*v->p, nc * sizeof *np);
        if (!np) return mb_fail(MB_ENOMEM, "tokenizer: out of memory");
        *v->p = np;
        *v->cap = nc;
    }
    (*v->p)[(*v->n)++] = id;
    return 0;
}

struct sym { int32_t id, prev, next; };
struct hent { int32_t rank, pos, new_id; };

static int heap_less(const struct hent *a, const struct hent *b) { return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos); }
static void heap_push(struct hent *h, int *n, struct hent e) {
    int i = (*n)++;
    h[i] = e;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!heap_less(&h[i], &h[p])) break;
        struct hent tmp = h[i]; h[i] = h[p]; h[p] = tmp;
        i = p;
    }
}
static struct hent heap_pop(struct hent *h, int *n) {
    struct hent top = h[0];
    h[0] = h[--(*n)];
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < *n && heap_less(&h[l], &h[m])) m = l;
        if (r < *n && heap_less(&h[r], &h[m])) m = r;
        if (m == i) break;
        struct hent tmp = h[i]; h[i] = h[m]; h[m] = tmp;
        i = m;
    }
    return top;
}

/* scratch buffers for one word */
struct scratch { struct sym *s; struct hent *h; int cap; };
static int scratch_reserve(struct scratch *sc, int n) {
    if (n <= sc->cap) return 0;
    int nc = sc->cap ? sc->cap : 64;
    while (nc < n) nc *= 2;
    struct sym *ns = realloc(sc->s, nc * sizeof *ns);
    if (!ns) return mb_fail(MB_ENOMEM, "tokenizer: out of memory");
    sc->s = ns;
    struct hent *nh = realloc(sc->h, (size_t)nc * 2 * sizeof *nh);
    if (!nh) return mb_fail(MB_ENOMEM, "tokenizer: out of memory");
    sc->h = nh;
    sc->cap = nc;
    return 0;
}

/* BPE of one word (model-level chars, UTF-8) appended to out */
static int bpe_word(const struct mb_tokenizer *t, const char *w, size_t n, struct scratch *sc, struct ids *out) {
    if (t->ignore_merges) {
        int32_t id = smap_get(&t->vocab, w, n);
        if (id >= 0) return ids_push(out, id);
    }
    int rc;
    if ((rc = scratch_reserve(sc, (int)n + 1))) return rc;
    int ns = 0;
    int32_t unk_pending = -1;
    for (size_t i = 0; i < n;) {
        int l = utf8_len((const uint8_t *)w + i, n - i);
        if (!l) return mb_fail(MB_EINVAL, "tokenizer: invalid UTF-8");
        int32_t id = smap_get(&t->vocab, w + i, (size_t)l);
        if (id >= 0) {
            if (unk_pending >= 0) { sc->s[ns++].id = unk_pending; unk_pending = -1; }
            sc->s[ns++].id = id;
        } else {
            int ok = t->byte_fallback;
            for (int k = 0; ok && k < l; k++) ok = t->byte_ids[(uint8_t)w[i + k]] >= 0;
            if (ok) {
                if (unk_pending >= 0) { sc->s[ns++].id = unk_pending; unk_pending = -1; }
                for (int k = 0; k < l; k++) sc->s[ns++].id = t->byte_ids[(uint8_t)w[i + k]];
            } else if (t->unk_id >= 0) {
                if (unk_pending >= 0 && !t->fuse_unk) sc->s[ns++].id = unk_pending;
                unk_pending = t->unk_id;
            } else {
                return mb_fail(MB_EINVAL, "tokenizer: character U+%04X is not in the vocab and there is no unk token", utf8_cp((const uint8_t *)w + i, l));
            }
        }
        i += (size_t)l;
    }
    if (unk_pending >= 0) sc->s[ns++].id = unk_pending;
    for (int i = 0; i < ns; i++) { sc->s[i].prev = i - 1; sc->s[i].next = i + 1 < ns ? i + 1 : -1; }
    int nh = 0;
    for (int i = 0; i + 1 < ns; i++) {
        const struct merge_ent *m = mmap_get(&t->merges, ((uint64_t)(uint32_t)sc->s[i].id << 32) | (uint32_t)sc->s[i + 1].id);
        if (m) heap_push(sc->h, &nh, (struct hent){m->rank, i, m->new_id});
    }
    while (nh > 0) {
        struct hent top = heap_pop(sc->h, &nh);
        struct sym *cur = &sc->s[top.pos];
        if (cur->id < 0 || cur->next < 0) continue;
        struct sym *right = &sc->s[cur->next];
        const struct merge_ent *m = mmap_get(&t->merges, ((uint64_t)(uint32_t)cur->id << 32) | (uint32_t)right->id);
        if (!m || m->new_id != top.new_id) continue; /* stale entry */
        cur->id = top.new_id;
        int rn = right->next;
        right->id = -1;
        cur->next = rn;
        if (rn >= 0) sc->s[rn].prev = top.pos;
        if (nh + 2 > 2 * sc->cap) continue; /* cannot happen: at most 2 pushes per merge, n merges */
        if (cur->prev >= 0) {
            const struct merge_ent *pm = mmap_get(&t->merges, ((uint64_t)(uint32_t)sc->s[cur->prev].id << 32) | (uint32_t)cur->id);
            if (pm) heap_push(sc->h, &nh, (struct hent){pm->rank, cur->prev, pm->new_id});
        }
        if (cur->next >= 0) {
            const struct merge_ent *nm = mmap_get(&t->merges, ((uint64_t)(uint32_t)cur->id << 32) | (uint32_t)sc->s[cur->next].id);
            if (nm) heap_push(sc->h, &nh, (struct hent){nm->rank, top.pos, nm->new_id});
        }
    }
    for (int i = 0; i >= 0 && i < ns; i = sc->s[i].next)
        if ((rc = ids_push(out, sc->s[i].id))) return rc;
    return 0;
}

/* cached BPE of a word */
static int bpe_cached(struct mb_tokenizer *t, const char *w, size_t n, struct scratch *sc, struct ids *out) {
    if (n > 64) return bpe_word(t, w, n, sc, out);
    uint32_t h = (uint32_t)fnv1a(w, n, FNV0), mask = t->cache_cap - 1, i;
    for (i = h & mask; t->cache[i].key; i = (i + 1) & mask) {
        struct word_cache_ent *e = &t->cache[i];
        if (e->len == n && memcmp(e->key, w, n) == 0) {
            for (uint32_t k = 0; k < e->nids; k++) { int rc = ids_push(out, e->ids[k]); if (rc) return rc; }
            return 0;
        }
    }
    int64_t start = *out->n;
    int rc = bpe_word(t, w, n, sc, out);
    if (rc) return rc;
    if (t->cache_n * 2 < t->cache_cap) { /* fill to half, then stop caching new words */
        struct word_cache_ent *e = &t->cache[i];
        e->key = malloc(n);
        e->ids = malloc((size_t)(*out->n - start) * sizeof(int32_t) + 1);
        if (e->key && e->ids) {
            memcpy(e->key, w, n);
            e->len = (uint32_t)n;
            e->nids = (uint32_t)(*out->n - start);
            memcpy(e->ids, *out->p + start, e->nids * sizeof(int32_t));
            t->cache_n++;
        } else { free(e->key); free(e->ids); e->key = NULL; e->ids = NULL; }
    }
    return 0;
}

/* BPE over a pre-token, cut at safe boundaries */
static int bpe_pretoken(struct mb_tokenizer *t, const char *w, size_t n, struct scratch *sc, struct ids *out) {
    if (!t->can_split || t->ignore_merges) return bpe_cached(t, w, n, sc, out);
    size_t start = 0, i = 0;
    uint32_t prev_cp = 0;
    int have_prev = 0;
    while (i < n) {
        int l = utf8_len((const uint8_t *)w + i, n - i);
        if (!l) return mb_fail(MB_EINVAL, "tokenizer: invalid UTF-8");
        uint32_t cp = utf8_cp((const uint8_t *)w + i, l);
        if (have_prev && !pset_has(&t->pairs, ((uint64_t)prev_cp << 32) | cp)) {
            int rc = bpe_cached(t, w + start, i - start, sc, out);
            if (rc) return rc;
            start = i;
        }
        prev_cp = cp;
        have_prev = 1;
        i += (size_t)l;
    }
    if (n > start) return bpe_cached(t, w + start, n - start, sc, out);
    return 0;
}

/* apply the normalizers to s (n bytes) into b */
static int normalize(const struct mb_tokenizer *t, const char *s, size_t n, int allow_prepend, struct buf *b) {
    struct buf cur = {0}, nxt = {0};
    int rc = buf_add(&cur, s, n);
    if (rc) return rc;
    pcre2_match_data *md = NULL;
    for (int k = 0; k < t->n_norms && !rc; k++) {
        const struct norm *x = &t->norms[k];
        nxt.n = 0;
        switch (x->type) {
        case N_PREPEND:
            if (cur.n > 0 && allow_prepend) { rc = buf_add(&nxt, x->a, x->alen); if (!rc) rc = buf_add(&nxt, cur.p, cur.n); }
            else rc = buf_add(&nxt, cur.p, cur.n);
            break;
        case N_REPLACE_STR: {
            size_t i = 0;
            while (i < cur.n && !rc) {
                const char *hit = cur.n - i >= x->alen ? memmem(cur.p + i, cur.n - i, x->a, x->alen) : NULL;
                if (!hit) { rc = buf_add(&nxt, cur.p + i, cur.n - i); break; }
                rc = buf_add(&nxt, cur.p + i, (size_t)(hit - (cur.p + i)));
                if (!rc) rc = buf_add(&nxt, x->b, x->blen);
                i = (size_t)(hit - cur.p) + x->alen;
            }
            if (cur.n == 0) rc = buf_add(&nxt, "", 0);
            break;
        }
        case N_REPLACE_RE: {
            if (!md) md = pcre2_match_data_create(4, NULL);
            if (!md) { rc = mb_fail(MB_ENOMEM, "out of memory"); break; }
            size_t i = 0;
            for (;;) {
                int r = pcre2_match(x->re, (PCRE2_SPTR)cur.p, cur.n, i, PCRE2_NO_UTF_CHECK, md, NULL);
                if (r < 0) { rc = buf_add(&nxt, cur.p + i, cur.n - i); break; }
                PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
                rc = buf_add(&nxt, cur.p + i, ov[0] - i);
                if (!rc) rc = buf_add(&nxt, x->b, x->blen);
                if (rc) break;
                if (ov[1] == ov[0]) { /* empty match: copy one char and go on */
                    if (ov[1] >= cur.n) { i = cur.n; break; }
                    int l = utf8_len((const uint8_t *)cur.p + ov[1], cur.n - ov[1]);
                    rc = buf_add(&nxt, cur.p + ov[1], (size_t)(l ? l : 1));
                    i = ov[1] + (size_t)(l ? l : 1);
                } else i = ov[1];
                if (i > cur.n) break;
            }
            break;
        }
        case N_STRIP: {
            size_t a = 0, e = cur.n;
            if (x->left) while (a < e && (cur.p[a] == ' ' || cur.p[a] == '\t' || cur.p[a] == '\n' || cur.p[a] == '\r')) a++;
            if (x->right) while (e > a && (cur.p[e - 1] == ' ' || cur.p[e - 1] == '\t' || cur.p[e - 1] == '\n' || cur.p[e - 1] == '\r')) e--;
            rc = buf_add(&nxt, cur.p + a, e - a);
            break;
        }
        }
        struct buf tmp = cur; cur = nxt; nxt = tmp;
    }
    if (md) pcre2_match_data_free(md);
    free(nxt.p);
    if (rc) { free(cur.p); return rc; }
    b->n = 0;
    rc = buf_add(b, cur.p ? cur.p : "", cur.n);
    free(cur.p);
    return rc;
}

/* pieces of a string: array of [start, end) */
struct span { size_t a, b; };
struct spans { struct span *v; int n, cap; };
static int spans_add(struct spans *s, size_t a, size_t b) {
    if (s->n == s->cap) {
        int nc = s->cap ? s->cap * 2 : 64;
        struct span *nv = realloc(s->v, nc * sizeof *nv);
        if (!nv) return mb_fail(MB_ENOMEM, "tokenizer: out of memory");
        s->v = nv;
        s->cap = nc;
    }
    s->v[s->n++] = (struct span){a, b};
    return 0;
}

/* split [a, b) of s by regex matches with a behavior; appends to out */
static int split_regex(const pcre2_code *re, const char *pat, size_t plen, enum split_behavior beh, const char *s, size_t a, size_t b, pcre2_match_data *md, struct spans *out) {
    size_t pos = a;
    /* matches as [ms, me) */
    struct spans m = {0};
    int rc = 0;
    while (pos < b) {
        size_t ms, me;
        if (re) {
            int r = pcre2_match(re, (PCRE2_SPTR)s, b, pos, PCRE2_NO_UTF_CHECK, md, NULL);
            if (r < 0) break;
            PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
            ms = ov[0];
            me = ov[1];
        } else {
            const char *hit = plen && b - pos >= plen ? memmem(s + pos, b - pos, pat, plen) : NULL;
            if (!hit) break;
            ms = (size_t)(hit - s);
            me = ms + plen;
        }
        if (me == ms) { /* empty match: skip one char */
            int l = ms < b ? utf8_len((const uint8_t *)s + ms, b - ms) : 1;
            pos = ms + (size_t)(l ? l : 1);
            continue;
        }
        if ((rc = spans_add(&m, ms, me))) break;
        pos = me;
    }
    if (!rc) {
        /* the library's SplitDelimiterBehavior on (non-match, match) alternation */
        size_t prev_end = a;
        size_t pend_a = (size_t)-1; /* MergedWithNext: a delimiter waiting for the next piece */
        for (int i = 0; i < m.n && !rc; i++) {
            size_t ms = m.v[i].a, me = m.v[i].b;
            if (ms > prev_end) { /* non-match piece */
                if (beh == B_MERGED_NEXT && pend_a != (size_t)-1) { rc = spans_add(out, pend_a, ms); pend_a = (size_t)-1; }
                else rc = spans_add(out, prev_end, ms);
                if (rc) break;
            }
            switch (beh) {
            case B_ISOLATED: rc = spans_add(out, ms, me); break;
            case B_REMOVED: break;
            case B_MERGED_PREV:
                if (ms > prev_end && out->n > 0) out->v[out->n - 1].b = me;
                else rc = spans_add(out, ms, me);
                break;
            case B_MERGED_NEXT:
                if (pend_a != (size_t)-1) rc = spans_add(out, pend_a, ms);
                pend_a = ms;
                break;
            case B_CONTIGUOUS:
                if (out->n > 0 && out->v[out->n - 1].b == ms && i > 0 && m.v[i - 1].b == ms) out->v[out->n - 1].b = me;
                else rc = spans_add(out, ms, me);
                break;
            }
            prev_end = me;
        }
        if (!rc) {
            if (beh == B_MERGED_NEXT && pend_a != (size_t)-1) rc = spans_add(out, pend_a, b);
            else if (prev_end < b) rc = spans_add(out, prev_end, b);
        }
    }
    free(m.v);
    return rc;
}

/* pre-tokenize + BPE a normalized piece */
static int encode_normalized(struct mb_tokenizer *t, const char *s, size_t n, int first_piece, struct scratch *sc, struct ids *out) {
    if (n == 0) return 0;
    int rc = 0;
    struct buf work = {0};
    struct spans cur = {0}, nxt = {0};
    pcre2_match_data *md = NULL;
    if ((rc = buf_add(&work, s, n))) return rc;
    if ((rc = spans_add(&cur, 0, n))) goto done;
    int mapped = 0; /* bytes already mapped to byte-level chars */
    for (int k = 0; k < t->n_pres && !rc; k++) {
        const struct pre *p = &t->pres[k];
        if (p->type == P_METASPACE) {
            /* replace ' ' by the replacement, prepend per scheme, then optionally split before each replacement */
            struct buf nb = {0};
            struct spans ns = {0};
            for (int i = 0; i < cur.n && !rc; i++) {
                size_t start = nb.n;
                if (p->prepend_scheme == 2 || (p->prepend_scheme == 1 && first_piece && i == 0))
                    if (!(work.p[cur.v[i].a] == p->repl[0] && cur.v[i].b - cur.v[i].a >= p->repl_len && !memcmp(work.p + cur.v[i].a, p->repl, p->repl_len)))
                        rc = buf_add(&nb, p->repl, p->repl_len);
                for (size_t j = cur.v[i].a; j < cur.v[i].b && !rc; j++)
                    rc = work.p[j] == ' ' ? buf_add(&nb, p->repl, p->repl_len) : buf_add(&nb, work.p + j, 1);
                if (rc) break;
                if (p->split_ws) rc = split_regex(NULL, p->repl, p->repl_len, B_MERGED_NEXT, nb.p, start, nb.n, NULL, &ns);
                else rc = spans_add(&ns, start, nb.n);
            }
            free(work.p);
            work = nb;
            free(cur.v);
            cur = ns;
            continue;
        }
        if (p->type == P_SPLIT || (p->type == P_BYTELEVEL && p->use_regex)) {
            if (!md) md = pcre2_match_data_create(8, NULL);
            if (!md) { rc = mb_fail(MB_ENOMEM, "out of memory"); break; }
        }
        if (p->type == P_BYTELEVEL && p->add_prefix_space && work.n > 0 && work.p[0] != ' ') {
            struct buf nb = {0};
            rc = buf_add(&nb, " ", 1);
            if (!rc) rc = buf_add(&nb, work.p, work.n);
            free(work.p);
            work = nb;
            for (int i = 0; i < cur.n; i++) { if (i) cur.v[i].a++; cur.v[i].b++; }
            if (rc) break;
        }
        nxt.n = 0;
        for (int i = 0; i < cur.n && !rc; i++) {
            if (p->type == P_SPLIT) rc = split_regex(p->re, p->str, p->slen, p->behavior, work.p, cur.v[i].a, cur.v[i].b, md, &nxt);
            else if (p->type == P_BYTELEVEL && p->use_regex) rc = split_regex(p->re, NULL, 0, B_ISOLATED, work.p, cur.v[i].a, cur.v[i].b, md, &nxt);
            else rc = spans_add(&nxt, cur.v[i].a, cur.v[i].b);
        }
        struct spans tmp = cur; cur = nxt; nxt = tmp;
        if (p->type == P_BYTELEVEL) mapped = 1;
    }
    if (rc) goto done;
    /* the model: byte-level chars when a ByteLevel step ran, raw UTF-8 otherwise */
    struct buf piece = {0};
    for (int i = 0; i < cur.n && !rc; i++) {
        const char *w = work.p + cur.v[i].a;
        size_t wn = cur.v[i].b - cur.v[i].a;
        if (wn == 0) continue;
        if (mapped || t->byte_level) {
            piece.n = 0;
            for (size_t j = 0; j < wn && !rc; j++) {
                char o[4];
                int l = utf8_put(t->byte2cp[(uint8_t)w[j]], o);
                rc = buf_add(&piece, o, (size_t)l);
            }
            if (!rc) rc = bpe_pretoken(t, piece.p, piece.n, sc, out);
        } else {
            rc = bpe_pretoken(t, w, wn, sc, out);
        }
    }
    free(piece.p);
done:
    if (md) pcre2_match_data_free(md);
    free(work.p);
    free(cur.v);
    free(nxt.v);
    return rc;
}

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
static int is_word_char(const char *s, size_t n, size_t i) { (void)n; unsigned char c = (unsigned char)s[i]; return c >= 0x80 || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }

/* find the leftmost-longest added-token match in [pos, n) of pass `pass`; returns 1 and the match span
 * (extended by lstrip/rstrip) */
static int find_added(const struct mb_tokenizer *t, int pass, const char *s, size_t lo, size_t n, size_t *ms, size_t *me, int32_t *id) {
    for (size_t i = lo; i < n; i++) {
        if (!t->added_first[pass][(uint8_t)s[i]]) continue;
        for (int k = 0; k < t->n_added; k++) { /* sorted longest first */
            const struct added *a = &t->added[k];
            if ((a->normalized ? 1 : 0) != pass || a->n > n - i || memcmp(s + i, a->s, a->n)) continue;
            size_t b = i, e = i + a->n;
            if (a->single_word && ((b > 0 && is_word_char(s, n, b - 1)) || (e < n && is_word_char(s, n, e)))) continue;
            if (a->lstrip) while (b > lo && is_ws(s[b - 1])) b--;
            if (a->rstrip) while (e < n && is_ws(s[e])) e++;
            *ms = b;
            *me = e;
            *id = a->id;
            return 1;
        }
    }
    return 0;
}

/* one raw segment (no non-normalized added tokens inside): normalize, split normalized added tokens, encode */
static int encode_segment(struct mb_tokenizer *t, const char *s, size_t n, int allow_prepend, int literal, struct scratch *sc, struct ids *out) {
    struct buf nb = {0};
    int rc = normalize(t, s, n, allow_prepend, &nb);
    if (rc) { free(nb.p); return rc; }
    size_t pos = 0, ms, me;
    int32_t id;
    int first = 1;
    while (!rc && pos < nb.n) {
        if (!literal && find_added(t, 1, nb.p, pos, nb.n, &ms, &me, &id)) {
            rc = encode_normalized(t, nb.p + pos, ms - pos, first && allow_prepend, sc, out);
            if (!rc) rc = ids_push(out, id);
            pos = me;
        } else {
            rc = encode_normalized(t, nb.p + pos, nb.n - pos, first && allow_prepend, sc, out);
            pos = nb.n;
        }
        first = 0;
    }
    free(nb.p);
    return rc;
}

static int validate_utf8(const char *s, size_t n, size_t *bad) {
    for (size_t i = 0; i < n;) {
        if ((uint8_t)s[i] < 0x80) { i++; continue; }
        int l = utf8_len((const uint8_t *)s + i, n - i);
        if (!l) { *bad = i; return 0; }
        i += (size_t)l;
    }
    return 1;
}

/* encode text; `continuation`: this text continues an earlier chunk (no Prepend on its first segment) */
static int encode_text(struct mb_tokenizer *t, const char *text, size_t len, int literal, int continuation, struct ids *out) {
    size_t bad;
    if (!validate_utf8(text, len, &bad)) return mb_fail(MB_EINVAL, "text is not valid UTF-8 (byte offset %zu)", bad);
    struct scratch sc = {0};
    int rc = 0;
    size_t pos = 0, ms, me;
    int32_t id;
    int first = 1;
    while (!rc && pos < len) {
        if (!literal && find_added(t, 0, text, pos, len, &ms, &me, &id)) {
            if (ms > pos) rc = encode_segment(t, text + pos, ms - pos, !(first && continuation), literal, &sc, out);
            if (!rc) rc = ids_push(out, id);
            pos = me;
        } else {
            rc = encode_segment(t, text + pos, len - pos, !(first && continuation), literal, &sc, out);
            pos = len;
        }
        first = 0;
    }
    free(sc.s);
    free(sc.h);
    return rc;
}

int mb_tokenize(const struct mb_tokenizer *tc, const char *text, size_t len, int add_special, int literal, int32_t **ids, int64_t *n, int64_t *cap) {
    struct mb_tokenizer *t = (struct mb_tokenizer *)tc; /* the word cache is mutable state */
    struct ids out = {ids, n, cap};
    int rc;
    if (add_special && t->add_bos && t->bos_id >= 0 && (rc = ids_push(&out, t->bos_id))) return rc;
    if ((rc = encode_text(t, text, len, literal, 0, &out))) return rc;
    if (add_special && t->add_eos && t->eos_id >= 0 && (rc = ids_push(&out, t->eos_id))) return rc;
    return 0;
}

int mb_tokenize_stream(const struct mb_tokenizer *tc, const char *path, int bos, mb_ids_cb cb, void *user) {
    struct mb_tokenizer *t = (struct mb_tokenizer *)tc;
    int32_t *ids = NULL;
    int64_t n = 0, cap = 0;
    struct ids out = {&ids, &n, &cap};
    int rc = 0;
    if (bos) {
        if (t->bos_id < 0) return mb_fail(MB_EINVAL, "%s: the tokenizer has no BOS token", path);
        if ((rc = ids_push(&out, t->bos_id))) return rc;
    }
    gzFile f = gzopen(path, "rb");
    if (!f) { free(ids); return mb_fail(MB_EIO, "%s: cannot open", path); }
    const size_t CHUNK = 1 << 20;
    struct buf b = {0};
    int eof = 0, first = 1;
    int64_t line_base = 1;
    while (!rc && !(eof && b.n == 0)) {
        while (!eof && (b.n < CHUNK || !t->streamable)) {
            if ((rc = buf_reserve(&b, CHUNK))) break;
            int r = gzread(f, b.p + b.n, (unsigned)CHUNK);
            if (r < 0) { int e; rc = mb_fail(MB_EIO, "%s: read error: %s", path, gzerror(f, &e)); break; }
            if (r == 0) eof = 1;
            b.n += (size_t)r;
            b.p[b.n] = 0;
        }
        if (rc) break;
        /* cut after a '\n' followed by a printable ASCII character (see the header comment) */
        size_t cut = b.n;
        if (!eof) {
            cut = 0;
            for (size_t i = b.n - 1; i > 0; i--)
                if (b.p[i - 1] == '\n' && b.p[i] > 0x20 && b.p[i] < 0x7f) { cut = i; break; }
            if (cut == 0) { /* no cut point in the whole buffer: read more */
                if (b.n > ((size_t)1 << 31)) { rc = mb_fail(MB_EINVAL, "%s: no usable line break in 2 GB of text", path); break; }
                if ((rc = buf_reserve(&b, CHUNK))) break;
                int r = gzread(f, b.p + b.n, (unsigned)CHUNK);
                if (r < 0) { int e; rc = mb_fail(MB_EIO, "%s: read error: %s", path, gzerror(f, &e)); break; }
                if (r == 0) eof = 1;
                b.n += (size_t)r;
                b.p[b.n] = 0;
                continue;
            }
        }
        size_t bad;
        if (!validate_utf8(b.p, cut, &bad)) {
            int64_t line = line_base;
            for (size_t i = 0; i < bad; i++) line += b.p[i] == '\n';
            rc = mb_fail(MB_EINVAL, "%s:%lld: invalid UTF-8", path, (long long)line);
            break;
        }
        for (size_t i = 0; i < cut; i++) line_base += b.p[i] == '\n';
        rc = encode_text(t, b.p, cut, 0, !first, &out);
        if (rc) { mb_fail_ctx(rc, "%s", path); break; }
        first = 0;
        memmove(b.p, b.p + cut, b.n - cut);
        b.n -= cut;
        if (n > 0) { rc = cb(ids, n, user); n = 0; }
    }
    if (!rc && n > 0) rc = cb(ids, n, user); /* an empty file with BOS */
    gzclose(f);
    free(b.p);
    free(ids);
    return rc;
}

struct collect { int32_t *ids; int64_t n, cap; };
static int collect_cb(const int32_t *ids, int64_t n, void *user) {
    struct collect *c = user;
    if (c->n + n > c->cap) {
        int64_t nc = c->cap ? c->cap : 4096;
        while (nc < c->n + n) nc *= 2;
        int32_t *np = realloc(c->ids, (size_t)nc * sizeof *np);
        if (!np) return mb_fail(MB_ENOMEM, "out of memory for token ids");
        c->ids = np;
        c->cap = nc;
    }
    memcpy(c->ids + c->n, ids, (size_t)n * sizeof *ids);
    c->n += n;
    return 0;
}

int mb_tokenize_file(const struct mb_tokenizer *t, const char *path, int bos, int32_t **ids, int64_t *n) {
    struct collect c = {0};
    int rc = mb_tokenize_stream(t, path, bos, collect_cb, &c);
    if (rc) { free(c.ids); *ids = NULL; *n = 0; return rc; }
    *ids = c.ids;
    *n = c.n;
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* decoding                                                                                         */

int mb_detokenize(const struct mb_tokenizer *t, const int32_t *ids, int64_t n, char **text) {
    struct buf b = {0};
    int rc = buf_add(&b, "", 0);
    for (int64_t i = 0; i < n && !rc; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->vocab_n || !t->tok[id]) { rc = mb_fail(MB_EINVAL, "id %d is not in the vocabulary", id); break; }
        const char *s = t->tok[id];
        size_t l = t->toklen[id];
        int is_added = 0;
        for (int k = 0; k < t->n_added; k++) if (t->added[k].id == id) { is_added = 1; break; }
        if (is_added) { rc = buf_add(&b, s, l); continue; }
        if (t->dec == D_BYTELEVEL) {
            for (size_t j = 0; j < l && !rc;) {
                int cl = utf8_len((const uint8_t *)s + j, l - j);
                uint32_t cp = cl ? utf8_cp((const uint8_t *)s + j, cl) : 0xfffd;
                char c = (char)(cp < 512 && t->cp2byte[cp] >= 0 ? t->cp2byte[cp] : '?');
                rc = buf_add(&b, &c, 1);
                j += (size_t)(cl ? cl : 1);
            }
            continue;
        }
        if (is_byte_token(s, l) && t->byte_fallback) {
            char c = (char)strtol(s + 3, NULL, 16);
            rc = buf_add(&b, &c, 1);
            continue;
        }
        for (size_t j = 0; j < l && !rc;) {
            if (l - j >= 3 && !memcmp(s + j, "\xe2\x96\x81", 3)) { rc = buf_add(&b, " ", 1); j += 3; }
            else { rc = buf_add(&b, s + j, 1); j++; }
        }
    }
    if (!rc && t->dec != D_BYTELEVEL && t->dec_strip_start && b.n > 0 && b.p[0] == ' ') { memmove(b.p, b.p + 1, b.n); b.n--; }
    if (rc) { free(b.p); return rc; }
    *text = b.p;
    return 0;
}
