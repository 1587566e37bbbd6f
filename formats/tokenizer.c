/* formats/tokenizer.c: Hugging Face tokenizer.json (BPE models), bit-exact with the tokenizers library.
 *
 * Pipeline, as the library runs it for encode(text):
 *   1. added tokens: non-normalized added tokens are matched in the raw text (leftmost-longest), then each
 *      remaining piece is normalized and normalized added tokens (their normalized form) are matched in it;
 *   2. normalizers, in order: Sequence, Prepend, Replace (string or regex), Strip, StripAccents, NFC, NFD,
 *      NFKC, NFKD (utf8proc), Lowercase, Nmt, BertNormalizer, ByteLevel;
 *   3. pre-tokenizers, in order, each splitting every piece further: ByteLevel (GPT-2 regex, then bytes ->
 *      byte-level characters), Split (string or regex, all five behaviors, invert), Metaspace (prepend_scheme
 *      first/always/never, split), Digits, Punctuation, Whitespace, WhitespaceSplit, BertPreTokenizer,
 *      CharDelimiterSplit, FixedLength, Sequence;
 *   4. BPE per pre-token: characters (or byte-fallback <0xNN> tokens, or unk), then merges by rank, lowest
 *      rank first and leftmost first on ties, with a binary heap (n log n in the word length);
 *   5. post-processor (TemplateProcessing, BertProcessing, RobertaProcessing, ByteLevel, Sequence) only as
 *      far as it decides BOS/EOS; tokenizer_config.json beside the file overrides add_bos/add_eos.
 * Decoding runs the decoder chain on the token strings: ByteLevel, Metaspace, ByteFallback, Fuse, Strip,
 * Replace, WordPiece, BPEDecoder, CTC, Sequence (no decoder: tokens joined by spaces, as the library does).
 *
 * Regexes are PCRE2 with Oniguruma's (Ruby syntax) conventions where they differ: ^ and $ match at line
 * boundaries, and an empty match right after the previous match is skipped. Character classes come from
 * utf8proc (Unicode 15): the library's own tables are older (Unicode 11-12 for normalization, 8-9 for the
 * punctuation class), so a few hundred characters assigned or re-categorized since then differ; see
 * tests/data/tokenizers/README.md for the exact list.
 *
 * Speed: a pre-token is cut further at "safe" character boundaries (x|y where no merge joins a token ending
 * in x to a token starting with y, computed from the merges), which cannot change the result, and words
 * are cached. Anything the loader does not understand is an error naming the construct and where it is.
 *
 * Hostile files: every id is checked where it is read (integer, 0 <= id < MB_TOK_MAX_ID, one token per id,
 * one id per token, added tokens agreeing with the vocab, merges of known tokens, post-processor specials
 * in the vocab); lists and nesting are bounded; regex matching has a match limit and its failures are
 * errors, never silent no-matches.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <jansson.h>
#include <pcre2.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>
#include <zlib.h>
#include <unistd.h>

#include "formats.h"

/* Sane bounds for hostile files (the largest real vocabularies are about 260k ids and 500k merges). */
#define MB_TOK_MAX_ID (1 << 22)
#define MB_TOK_MAX_MERGES (1 << 24)
#define MB_TOK_MAX_STEPS 64  /* normalizers, pre-tokenizers, decoders, processors, each */
#define MB_TOK_MAX_DEPTH 8   /* nested Sequences */
#define MB_TOK_MAX_WORD ((size_t)1 << 28) /* bytes of one pre-token handed to BPE */
#define MB_TOK_MATCH_LIMIT 10000000 /* PCRE2 backtracking steps per match call (its own default) */

/* ------------------------------------------------------------------------------------------------ */
/* small utilities                                                                                  */

static uint64_t fnv1a(const void *p, size_t n, uint64_t h) {
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) { h ^= b[i]; h *= 0x100000001b3ull; }
    return h;
}
#define FNV0 0xcbf29ce484222325ull

/* length of the UTF-8 sequence at s (n bytes left); 0 if invalid */
static inline __attribute__((always_inline)) int utf8_len(const uint8_t *s, size_t n) {
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

static inline __attribute__((always_inline)) uint32_t utf8_cp(const uint8_t *s, int len) {
    if (len == 1) return s[0];
    uint32_t cp = s[0] & (len == 2 ? 0x1f : len == 3 ? 0x0f : 0x07);
    for (int i = 1; i < len; i++) cp = (cp << 6) | (s[i] & 0x3f);
    return cp;
}

/* decode the character at s[i] (valid UTF-8, i < n): returns the code point, *l its length */
static uint32_t utf8_next(const char *s, size_t n, size_t i, int *l) {
    int k = utf8_len((const uint8_t *)s + i, n - i);
    if (!k) k = 1; /* cannot happen on validated text; stay in bounds */
    *l = k;
    return utf8_cp((const uint8_t *)s + i, k);
}

static int utf8_put(uint32_t cp, char *o) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xc0 | (cp >> 6)); o[1] = (char)(0x80 | (cp & 0x3f)); return 2; }
    if (cp < 0x10000) { o[0] = (char)(0xe0 | (cp >> 12)); o[1] = (char)(0x80 | ((cp >> 6) & 0x3f)); o[2] = (char)(0x80 | (cp & 0x3f)); return 3; }
    o[0] = (char)(0xf0 | (cp >> 18)); o[1] = (char)(0x80 | ((cp >> 12) & 0x3f)); o[2] = (char)(0x80 | ((cp >> 6) & 0x3f)); o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* a JSON string that is exactly one character: its code point, or -1 */
static int64_t one_char(json_t *s) {
    if (!json_is_string(s)) return -1;
    size_t n = json_string_length(s);
    const char *p = json_string_value(s);
    if (n == 0) return -1;
    int l = utf8_len((const uint8_t *)p, n);
    return l && (size_t)l == n ? (int64_t)utf8_cp((const uint8_t *)p, l) : -1;
}

/* growable byte buffer */
struct buf { char *p; size_t n, cap; };
static int buf_reserve(struct buf *b, size_t extra) {
    if (b->n + extra + 1 <= b->cap) return 0;
    if (extra > ((size_t)1 << 40)) return mb_fail(MB_ENOMEM, "tokenizer: out of memory");
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
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return 0;
}
static int buf_cp(struct buf *b, uint32_t cp) {
    char o[4];
    return buf_add(b, o, (size_t)utf8_put(cp, o));
}

/* ------------------------------------------------------------------------------------------------ */
/* Unicode classes, as the library (Rust) defines them, from utf8proc's categories                   */

static int cat_of(uint32_t cp) { return (int)utf8proc_category((utf8proc_int32_t)cp); }

/* char::is_whitespace: the White_Space property = Zs, Zl, Zp, U+0009..U+000D, U+0085 */
static int is_white(uint32_t cp) {
    if (cp < 0x80) return cp == ' ' || (cp >= 9 && cp <= 13);
    if (cp == 0x85) return 1;
    int c = cat_of(cp);
    return c == UTF8PROC_CATEGORY_ZS || c == UTF8PROC_CATEGORY_ZL || c == UTF8PROC_CATEGORY_ZP;
}
/* char::is_numeric: Nd, Nl, No */
static int is_numeric(uint32_t cp) {
    if (cp < 0x80) return cp >= '0' && cp <= '9';
    int c = cat_of(cp);
    return c == UTF8PROC_CATEGORY_ND || c == UTF8PROC_CATEGORY_NL || c == UTF8PROC_CATEGORY_NO;
}
/* the Punctuation / BertPreTokenizer class: ASCII punctuation (which includes $+<=>^`|~) or P* */
static int is_punct(uint32_t cp) {
    if (cp < 0x80) return (cp >= 0x21 && cp <= 0x2f) || (cp >= 0x3a && cp <= 0x40) || (cp >= 0x5b && cp <= 0x60) || (cp >= 0x7b && cp <= 0x7e);
    int c = cat_of(cp);
    return c >= UTF8PROC_CATEGORY_PC && c <= UTF8PROC_CATEGORY_PO;
}
/* Rust regex \w: Alphabetic, M*, Nd, Pc, Join_Control. Alphabetic = L*, Nl and Other_Alphabetic, whose
 * members outside M* and L* are the circled and squared letters below (PropList.txt). */
static int is_word(uint32_t cp) {
    if (cp < 0x80) return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') || cp == '_';
    int c = cat_of(cp);
    if ((c >= UTF8PROC_CATEGORY_LU && c <= UTF8PROC_CATEGORY_ME) || c == UTF8PROC_CATEGORY_ND || c == UTF8PROC_CATEGORY_NL || c == UTF8PROC_CATEGORY_PC) return 1;
    return cp == 0x200c || cp == 0x200d || (cp >= 0x24b6 && cp <= 0x24e9) || (cp >= 0x1f130 && cp <= 0x1f149) ||
           (cp >= 0x1f150 && cp <= 0x1f169) || (cp >= 0x1f170 && cp <= 0x1f189);
}
/* unicode_normalization::char::is_combining_mark: General_Category M */
static int is_mark(uint32_t cp) {
    if (cp < 0x300) return 0;
    int c = cat_of(cp);
    return c >= UTF8PROC_CATEGORY_MN && c <= UTF8PROC_CATEGORY_ME;
}
/* BertNormalizer's is_control: C* except unassigned, without \t \n \r */
static int is_bert_control(uint32_t cp) {
    if (cp == '\t' || cp == '\n' || cp == '\r') return 0;
    int c = cat_of(cp);
    return c == UTF8PROC_CATEGORY_CC || c == UTF8PROC_CATEGORY_CF || c == UTF8PROC_CATEGORY_CO || c == UTF8PROC_CATEGORY_CS;
}
static int is_chinese(uint32_t c) {
    return (c >= 0x4e00 && c <= 0x9fff) || (c >= 0x3400 && c <= 0x4dbf) || (c >= 0x20000 && c <= 0x2a6df) || (c >= 0x2a700 && c <= 0x2b73f) ||
           (c >= 0x2b740 && c <= 0x2b81f) || (c >= 0x2b920 && c <= 0x2ceaf) || (c >= 0xf900 && c <= 0xfaff) || (c >= 0x2f800 && c <= 0x2fa1f);
}
/* char::to_lowercase appended to b. U+0130 is the one character whose full lowercase mapping has two
 * characters (SpecialCasing.txt); utf8proc gives the simple mapping. */
static int lower_cp(struct buf *b, uint32_t cp) {
    if (cp < 0x80) { char c = (char)(cp >= 'A' && cp <= 'Z' ? cp + 32 : cp); return buf_add(b, &c, 1); }
    if (cp == 0x130) return buf_add(b, "i\xcc\x87", 3);
    return buf_cp(b, (uint32_t)utf8proc_tolower((utf8proc_int32_t)cp));
}

/* Unicode normalization (utf8proc options) of s[0, n) appended to b. Runs of ASCII characters followed by
 * ASCII are copied as they are: no composition has an ASCII second character and ASCII is invariant, so
 * normalizing the pieces between them separately gives the same result. */
static int nf_append(struct buf *b, const char *s, size_t n, int opts) {
    size_t i = 0;
    while (i < n) {
        size_t j = i;
        while (j < n && (uint8_t)s[j] < 0x80 && (j + 1 == n || (uint8_t)s[j + 1] < 0x80)) j++;
        if (j > i) { int rc = buf_add(b, s + i, j - i); if (rc) return rc; i = j; continue; }
        /* a non-ASCII region: up to the next ASCII character followed by ASCII (or the end) */
        j = i + 1;
        while (j < n && !((uint8_t)s[j] < 0x80 && (j + 1 == n || (uint8_t)s[j + 1] < 0x80))) j++;
        utf8proc_uint8_t *out = NULL;
        utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(j - i), &out, (utf8proc_option_t)opts);
        if (r < 0) { free(out); return mb_fail(MB_EINVAL, "tokenizer: Unicode normalization failed: %s", utf8proc_errmsg(r)); }
        int rc = buf_add(b, out, (size_t)r);
        free(out);
        if (rc) return rc;
        i = j;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* hash maps                                                                                        */

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
    while (m->cap < (uint64_t)expect * 2 + 16) m->cap *= 2; /* expect <= MB_TOK_MAX_ID: no overflow */
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

/* insert; returns 1 if the key existed (value not changed), -1 out of memory */
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

static inline uint32_t hash64(uint64_t k) {
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
static inline __attribute__((always_inline)) int pset_has(const struct pset *s, uint64_t key) {
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

/* pieces of a string: array of [start, end) */
struct span { size_t a, b; };
struct spans { struct span *v; size_t n, cap; };
static int spans_add(struct spans *s, size_t a, size_t b) {
    if (s->n == s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 64;
        struct span *nv = realloc(s->v, nc * sizeof *nv);
        if (!nv) return mb_fail(MB_ENOMEM, "tokenizer: out of memory");
        s->v = nv;
        s->cap = nc;
    }
    s->v[s->n++] = (struct span){a, b};
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* patterns: a literal string or a regex, matched as the library's SysRegex (Oniguruma) find_iter     */

struct pat {
    char *str; size_t slen; /* the literal (non-empty) when re == NULL, else the regex source (or NULL) */
    pcre2_code *re;
    char what[96];          /* where it was read, for messages */
};

static void pat_free(struct pat *p) {
    free(p->str);
    if (p->re) pcre2_code_free(p->re);
}

/* Every match of p in s[0, n), appended to m as spans (possibly empty ones), non-overlapping, left to right.
 * Oniguruma's find_iter: an empty match right where the previous match ended is skipped (advance one
 * character). A match error (the match limit) is an error, never a silent non-match. */
static int pat_find(const struct pat *p, const char *s, size_t n, pcre2_match_data *md, pcre2_match_context *mc, struct spans *m) {
    if (!p->re) {
        size_t pos = 0;
        while (n - pos >= p->slen) {
            const char *hit = memmem(s + pos, n - pos, p->str, p->slen);
            if (!hit) break;
            size_t ms = (size_t)(hit - s);
            int rc = spans_add(m, ms, ms + p->slen);
            if (rc) return rc;
            pos = ms + p->slen;
        }
        return 0;
    }
    size_t pos = 0, last_end = 0;
    int have_last = 0;
    while (pos <= n) {
        int r = pcre2_match(p->re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK, md, mc);
        if (r == PCRE2_ERROR_NOMATCH) break;
        if (r < 0) {
            PCRE2_UCHAR msg[160];
            pcre2_get_error_message(r, msg, sizeof msg);
            return mb_fail(MB_EINVAL, "tokenizer: %s regex failed on the text: %s", p->what, (char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t ms = ov[0], me = ov[1];
        if (me < ms) me = ms; /* \K tricks: never a backwards span */
        if (ms == me && have_last && last_end == me) {
            if (pos >= n) break;
            int l;
            utf8_next(s, n, pos, &l);
            pos += (size_t)l;
            continue;
        }
        int rc = spans_add(m, ms, me);
        if (rc) return rc;
        pos = me;
        last_end = me;
        have_last = 1;
    }
    return 0;
}

static int compile_re(const char *file, const char *what, const char *pat, size_t plen, pcre2_code **out) {
    int err;
    PCRE2_SIZE off;
    /* MULTILINE: Oniguruma's Ruby syntax, the library's default, makes ^ and $ line anchors */
    *out = pcre2_compile((PCRE2_SPTR)pat, plen, PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE, &err, &off, NULL);
    if (!*out) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return mb_fail(MB_EUNSUPPORTED, "%s: %s: regex \"%.80s\" does not compile (at %zu): %s", file, what, pat, (size_t)off, (char *)msg);
    }
    pcre2_jit_compile(*out, PCRE2_JIT_COMPLETE); /* optional speed-up; falls back to the interpreter */
    return 0;
}

/* {"String": s} or {"Regex": r}. An empty String matches the empty string everywhere, as the library's
 * escaped-literal regex does. */
static int load_pattern(const char *file, const char *what, json_t *pat, struct pat *p) {
    snprintf(p->what, sizeof p->what, "%.90s", what);
    json_t *s = json_object_get(pat, "String"), *r = json_object_get(pat, "Regex");
    if (json_is_string(s) && !r) {
        p->slen = json_string_length(s);
        if (p->slen == 0) return compile_re(file, what, "", 0, &p->re);
        p->str = malloc(p->slen + 1);
        if (!p->str) return mb_fail(MB_ENOMEM, "out of memory");
        memcpy(p->str, json_string_value(s), p->slen + 1);
        return 0;
    }
    if (json_is_string(r) && !s) { /* keep the source (for stream_check) */
        p->slen = json_string_length(r);
        if (!(p->str = malloc(p->slen + 1))) return mb_fail(MB_ENOMEM, "out of memory");
        memcpy(p->str, json_string_value(r), p->slen + 1);
        return compile_re(file, what, p->str, p->slen, &p->re);
    }
    return mb_fail(MB_EFORMAT, "%s: %s: pattern is neither {\"String\": ...} nor {\"Regex\": ...}", file, what);
}

/* ------------------------------------------------------------------------------------------------ */
/* tokenizer structure                                                                              */

enum norm_type { N_PREPEND, N_REPLACE, N_STRIP, N_NF, N_LOWER, N_STRIP_ACCENTS, N_NMT, N_BERT, N_BYTELEVEL };
struct norm {
    enum norm_type type;
    struct pat pat;         /* Replace */
    char *s; size_t slen;   /* Prepend: the prefix; Replace: the content */
    int left, right;        /* Strip */
    int nf;                 /* NF*: utf8proc options */
    int clean_text, chinese, strip_accents, lowercase; /* BertNormalizer */
};

enum split_behavior { B_ISOLATED, B_REMOVED, B_MERGED_PREV, B_MERGED_NEXT, B_CONTIGUOUS };
enum pre_type { P_BYTELEVEL, P_SPLIT, P_METASPACE, P_CHARS, P_WHITESPACE, P_FIXED };
enum char_class { C_NUMERIC, C_PUNCT, C_WHITE, C_CHAR };
struct pre {
    enum pre_type type;
    int add_prefix_space, use_regex;  /* ByteLevel */
    struct pat pat;                   /* Split; ByteLevel's GPT-2 regex */
    int invert;                       /* Split */
    enum split_behavior behavior;     /* Split, P_CHARS */
    enum char_class cls; uint32_t ch; /* P_CHARS: the class, or the delimiter for C_CHAR */
    int prepend_scheme, split;        /* Metaspace: 0 never, 1 first, 2 always */
    char repl[8]; size_t repl_len;    /* Metaspace replacement (one character) */
    size_t length;                    /* FixedLength, characters */
    int stream_role;                  /* see stream_check() */
};

enum dec_type { D_BYTELEVEL, D_METASPACE, D_BYTEFALLBACK, D_FUSE, D_STRIP, D_REPLACE, D_WORDPIECE, D_BPE, D_CTC };
struct dec {
    enum dec_type type;
    struct pat pat;           /* Replace */
    char *s; size_t slen;     /* Replace content, WordPiece prefix, BPEDecoder suffix, CTC pad token */
    char *s2; size_t s2len;   /* CTC word delimiter */
    uint32_t ch;              /* Strip content, Metaspace replacement */
    size_t start, stop;       /* Strip */
    int flag;                 /* Metaspace: prepend_scheme != never; WordPiece / CTC: cleanup */
};

struct added {
    char *s; size_t n;         /* the text matched: content, normalized when `normalized` */
    int32_t id;
    int special, normalized, lstrip, rstrip, single_word;
};

struct word_cache_ent { uint32_t len, nids; char *key; int32_t *ids; };

struct mb_tokenizer {
    char *name;       /* file name, for messages */
    int64_t vocab_n;
    char **tok;       /* id -> string (NULL if the id is unused) */
    uint32_t *toklen;
    uint8_t *is_added; /* id -> 1 for added tokens */
    struct smap vocab;     /* the model's vocabulary (what BPE sees) */
    struct smap addmap;    /* added tokens that are not in the model's vocabulary */
    struct mmap_ merges;
    int n_merges;
    int32_t unk_id;
    int byte_fallback, fuse_unk, ignore_merges;
    int32_t byte_ids[256]; /* <0xNN> ids, or -1 */
    uint32_t byte2cp[256];
    int16_t cp2byte[512];  /* for decoding; -1 if not a byte-level char (cps < 512 in the GPT-2 map) */
    struct norm *norms; int n_norms;
    struct pre *pres; int n_pres;
    struct dec *decs; int n_decs, has_decoder;
    struct added *added; int n_added;
    int32_t *cand;               /* per pass (0: raw, 1: normalized) and first byte, the added tokens that */
    int32_t cand_start[2][257];  /* may match there, longest first: cand[cand_start[p][b] .. cand_start[p][b+1]) */
    uint8_t added_first[2][256]; /* 1 where that range is not empty */
    int32_t tpl_bos, tpl_eos;    /* from the post-processor, -1 when none */
    int32_t bos_id, eos_id;
    int add_bos, add_eos;
    int can_split;         /* safe-boundary splitting allowed */
    struct pset pairs;
    int streamable;
    uint64_t hash;
    pcre2_match_context *mctx;
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
    if (t->tok) for (int64_t i = 0; i < t->vocab_n; i++) free(t->tok[i]);
    free(t->tok);
    free(t->toklen);
    free(t->is_added);
    if (t->vocab.slot_id) smap_free(&t->vocab);
    if (t->addmap.slot_id) smap_free(&t->addmap);
    free(t->merges.e);
    for (int i = 0; i < t->n_norms; i++) { pat_free(&t->norms[i].pat); free(t->norms[i].s); }
    free(t->norms);
    for (int i = 0; i < t->n_pres; i++) pat_free(&t->pres[i].pat);
    free(t->pres);
    for (int i = 0; i < t->n_decs; i++) { pat_free(&t->decs[i].pat); free(t->decs[i].s); free(t->decs[i].s2); }
    free(t->decs);
    for (int i = 0; i < t->n_added; i++) free(t->added[i].s);
    free(t->added);
    free(t->cand);
    free(t->pairs.k);
    if (t->cache) for (uint32_t i = 0; i < t->cache_cap; i++) { free(t->cache[i].key); free(t->cache[i].ids); }
    free(t->cache);
    if (t->mctx) pcre2_match_context_free(t->mctx);
    free(t->name);
    free(t);
}

/* ------------------------------------------------------------------------------------------------ */
/* loading: normalizers, pre-tokenizers, decoders, post-processor                                  */

static const char *GPT2_PATTERN = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int get_bool(const char *file, const char *where, json_t *o, const char *key, int def, int *out) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) { *out = def; return 0; }
    if (!json_is_boolean(v)) return mb_fail(MB_EFORMAT, "%s: %s: \"%s\" is not true or false", file, where, key);
    *out = json_is_true(v);
    return 0;
}

/* a string field (NULL when absent or null; an error when it has another type) */
static int get_str(const char *file, const char *where, json_t *o, const char *key, json_t **out) {
    json_t *v = json_object_get(o, key);
    *out = NULL;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v)) return mb_fail(MB_EFORMAT, "%s: %s: \"%s\" is not a string", file, where, key);
    *out = v;
    return 0;
}

static int dup_str(json_t *s, const char *dflt, char **out, size_t *len) {
    const char *p = s ? json_string_value(s) : dflt;
    size_t n = s ? json_string_length(s) : strlen(dflt);
    *out = malloc(n + 1);
    if (!*out) return mb_fail(MB_ENOMEM, "out of memory");
    memcpy(*out, p, n);
    (*out)[n] = 0;
    *len = n;
    return 0;
}

static int parse_behavior(const char *file, const char *where, json_t *o, int required, enum split_behavior *out) {
    json_t *v = json_object_get(o, "behavior");
    if (!v || json_is_null(v)) {
        if (required) return mb_fail(MB_EFORMAT, "%s: %s: no \"behavior\"", file, where);
        *out = B_ISOLATED;
        return 0;
    }
    const char *b = json_string_value(v);
    if (!b) return mb_fail(MB_EFORMAT, "%s: %s: \"behavior\" is not a string", file, where);
    if (!strcmp(b, "Isolated")) *out = B_ISOLATED;
    else if (!strcmp(b, "Removed")) *out = B_REMOVED;
    else if (!strcmp(b, "MergedWithPrevious")) *out = B_MERGED_PREV;
    else if (!strcmp(b, "MergedWithNext")) *out = B_MERGED_NEXT;
    else if (!strcmp(b, "Contiguous")) *out = B_CONTIGUOUS;
    else return mb_fail(MB_EUNSUPPORTED, "%s: %s: behavior \"%.40s\" is not supported (Isolated, Removed, MergedWithPrevious, MergedWithNext, Contiguous)", file, where, b);
    return 0;
}

/* prepend_scheme / add_prefix_space of Metaspace (pre-tokenizer and decoder): 0 never, 1 first, 2 always */
static int parse_prepend_scheme(const char *file, const char *where, json_t *o, int *out) {
    json_t *ps;
    int rc = get_str(file, where, o, "prepend_scheme", &ps);
    if (rc) return rc;
    *out = 2;
    if (ps) {
        const char *s = json_string_value(ps);
        if (!strcmp(s, "always")) *out = 2;
        else if (!strcmp(s, "first")) *out = 1;
        else if (!strcmp(s, "never")) *out = 0;
        else return mb_fail(MB_EUNSUPPORTED, "%s: %s: prepend_scheme \"%.40s\" is not supported (first, always, never)", file, where, s);
    }
    json_t *aps = json_object_get(o, "add_prefix_space");
    if (json_is_false(aps)) {
        if (*out != 0) return mb_fail(MB_EFORMAT, "%s: %s: add_prefix_space false does not match prepend_scheme", file, where);
        *out = 0;
    }
    return 0;
}

static int check_object(const char *file, const char *where, json_t *o, const char **type) {
    if (!json_is_object(o)) return mb_fail(MB_EFORMAT, "%s: %s is not an object", file, where);
    *type = json_string_value(json_object_get(o, "type"));
    if (!*type) return mb_fail(MB_EFORMAT, "%s: %s has no \"type\"", file, where);
    return 0;
}

static struct norm *norm_new(struct mb_tokenizer *t, const char *file, const char *where) {
    if (t->n_norms >= MB_TOK_MAX_STEPS) { mb_fail(MB_EFORMAT, "%s: %s: more than %d normalizers", file, where, MB_TOK_MAX_STEPS); return NULL; }
    struct norm *nn = realloc(t->norms, (size_t)(t->n_norms + 1) * sizeof *nn);
    if (!nn) { mb_fail(MB_ENOMEM, "out of memory"); return NULL; }
    t->norms = nn;
    struct norm *x = &t->norms[t->n_norms++];
    memset(x, 0, sizeof *x);
    return x;
}

static int load_normalizer(struct mb_tokenizer *t, const char *file, const char *where, json_t *n, int depth) {
    if (!n || json_is_null(n)) return 0;
    const char *type;
    int rc = check_object(file, where, n, &type);
    if (rc) return rc;
    if (!strcmp(type, "Sequence")) {
        json_t *arr = json_object_get(n, "normalizers");
        if (!json_is_array(arr)) return mb_fail(MB_EFORMAT, "%s: %s: Sequence without a \"normalizers\" list", file, where);
        if (depth >= MB_TOK_MAX_DEPTH) return mb_fail(MB_EFORMAT, "%s: %s: Sequences nested deeper than %d", file, where, MB_TOK_MAX_DEPTH);
        for (size_t i = 0; i < json_array_size(arr); i++) {
            char w[160];
            snprintf(w, sizeof w, "%.100s.normalizers[%zu]", where, i);
            if ((rc = load_normalizer(t, file, w, json_array_get(arr, i), depth + 1))) return rc;
        }
        return 0;
    }
    char what[160];
    snprintf(what, sizeof what, "%.100s (%.30s)", where, type);
    struct norm *x = norm_new(t, file, where);
    if (!x) return MB_ENOMEM;
    if (!strcmp(type, "Prepend")) {
        json_t *p;
        if ((rc = get_str(file, what, n, "prepend", &p))) return rc;
        if (!p) return mb_fail(MB_EFORMAT, "%s: %s: no \"prepend\" string", file, what);
        x->type = N_PREPEND;
        return dup_str(p, NULL, &x->s, &x->slen);
    }
    if (!strcmp(type, "Replace")) {
        json_t *c;
        if ((rc = get_str(file, what, n, "content", &c))) return rc;
        if (!c) return mb_fail(MB_EFORMAT, "%s: %s: no \"content\" string", file, what);
        x->type = N_REPLACE;
        if ((rc = dup_str(c, NULL, &x->s, &x->slen))) return rc;
        return load_pattern(file, what, json_object_get(n, "pattern"), &x->pat);
    }
    if (!strcmp(type, "Strip")) {
        x->type = N_STRIP;
        if ((rc = get_bool(file, what, n, "strip_left", 0, &x->left))) return rc;
        return get_bool(file, what, n, "strip_right", 0, &x->right);
    }
    if (!strcmp(type, "NFC")) { x->type = N_NF; x->nf = UTF8PROC_STABLE | UTF8PROC_COMPOSE; return 0; }
    if (!strcmp(type, "NFD")) { x->type = N_NF; x->nf = UTF8PROC_STABLE | UTF8PROC_DECOMPOSE; return 0; }
    if (!strcmp(type, "NFKC")) { x->type = N_NF; x->nf = UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT; return 0; }
    if (!strcmp(type, "NFKD")) { x->type = N_NF; x->nf = UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT; return 0; }
    if (!strcmp(type, "Lowercase")) { x->type = N_LOWER; return 0; }
    if (!strcmp(type, "StripAccents")) { x->type = N_STRIP_ACCENTS; return 0; }
    if (!strcmp(type, "Nmt")) { x->type = N_NMT; return 0; }
    if (!strcmp(type, "ByteLevel")) { x->type = N_BYTELEVEL; return 0; }
    if (!strcmp(type, "BertNormalizer")) {
        x->type = N_BERT;
        if ((rc = get_bool(file, what, n, "clean_text", 1, &x->clean_text)) || (rc = get_bool(file, what, n, "handle_chinese_chars", 1, &x->chinese)) ||
            (rc = get_bool(file, what, n, "lowercase", 1, &x->lowercase)))
            return rc;
        return get_bool(file, what, n, "strip_accents", x->lowercase, &x->strip_accents);
    }
    return mb_fail(MB_EUNSUPPORTED, "%s: %s: normalizer \"%.40s\" is not supported (supported: Sequence, Prepend, Replace, Strip, StripAccents, "
                   "NFC, NFD, NFKC, NFKD, Lowercase, Nmt, BertNormalizer, ByteLevel)", file, where, type);
}

static struct pre *pre_new(struct mb_tokenizer *t, const char *file, const char *where) {
    if (t->n_pres >= MB_TOK_MAX_STEPS) { mb_fail(MB_EFORMAT, "%s: %s: more than %d pre-tokenizers", file, where, MB_TOK_MAX_STEPS); return NULL; }
    struct pre *np = realloc(t->pres, (size_t)(t->n_pres + 1) * sizeof *np);
    if (!np) { mb_fail(MB_ENOMEM, "out of memory"); return NULL; }
    t->pres = np;
    struct pre *x = &t->pres[t->n_pres++];
    memset(x, 0, sizeof *x);
    return x;
}

static int load_pre(struct mb_tokenizer *t, const char *file, const char *where, json_t *p, int depth) {
    if (!p || json_is_null(p)) return 0;
    const char *type;
    int rc = check_object(file, where, p, &type);
    if (rc) return rc;
    if (!strcmp(type, "Sequence")) {
        json_t *arr = json_object_get(p, "pretokenizers");
        if (!json_is_array(arr)) return mb_fail(MB_EFORMAT, "%s: %s: Sequence without a \"pretokenizers\" list", file, where);
        if (depth >= MB_TOK_MAX_DEPTH) return mb_fail(MB_EFORMAT, "%s: %s: Sequences nested deeper than %d", file, where, MB_TOK_MAX_DEPTH);
        for (size_t i = 0; i < json_array_size(arr); i++) {
            char w[160];
            snprintf(w, sizeof w, "%.100s.pretokenizers[%zu]", where, i);
            if ((rc = load_pre(t, file, w, json_array_get(arr, i), depth + 1))) return rc;
        }
        return 0;
    }
    char what[160];
    snprintf(what, sizeof what, "%.100s (%.30s)", where, type);
    struct pre *x = pre_new(t, file, where);
    if (!x) return MB_ENOMEM;
    if (!strcmp(type, "ByteLevel")) {
        x->type = P_BYTELEVEL;
        if ((rc = get_bool(file, what, p, "add_prefix_space", 0, &x->add_prefix_space)) || (rc = get_bool(file, what, p, "use_regex", 1, &x->use_regex))) return rc;
        if (x->use_regex) {
            snprintf(x->pat.what, sizeof x->pat.what, "%.90s", what);
            if ((rc = compile_re(file, what, GPT2_PATTERN, strlen(GPT2_PATTERN), &x->pat.re))) return rc;
        }
        return 0;
    }
    if (!strcmp(type, "Split")) {
        x->type = P_SPLIT;
        if ((rc = load_pattern(file, what, json_object_get(p, "pattern"), &x->pat))) return rc;
        if ((rc = parse_behavior(file, what, p, 1, &x->behavior))) return rc;
        return get_bool(file, what, p, "invert", 0, &x->invert);
    }
    if (!strcmp(type, "Metaspace")) {
        x->type = P_METASPACE;
        json_t *r = json_object_get(p, "replacement");
        int64_t cp = r ? one_char(r) : 0x2581;
        if (cp < 0) return mb_fail(MB_EFORMAT, "%s: %s: \"replacement\" must be one character", file, what);
        x->repl_len = (size_t)utf8_put((uint32_t)cp, x->repl);
        if ((rc = parse_prepend_scheme(file, what, p, &x->prepend_scheme))) return rc;
        return get_bool(file, what, p, "split", 1, &x->split);
    }
    if (!strcmp(type, "Digits")) {
        int ind = 0;
        if ((rc = get_bool(file, what, p, "individual_digits", 0, &ind))) return rc;
        x->type = P_CHARS;
        x->cls = C_NUMERIC;
        x->behavior = ind ? B_ISOLATED : B_CONTIGUOUS;
        return 0;
    }
    if (!strcmp(type, "Punctuation")) {
        x->type = P_CHARS;
        x->cls = C_PUNCT;
        return parse_behavior(file, what, p, 0, &x->behavior);
    }
    if (!strcmp(type, "Whitespace")) { x->type = P_WHITESPACE; return 0; }
    if (!strcmp(type, "WhitespaceSplit")) { x->type = P_CHARS; x->cls = C_WHITE; x->behavior = B_REMOVED; return 0; }
    if (!strcmp(type, "BertPreTokenizer")) { /* whitespace removed, then punctuation isolated */
        x->type = P_CHARS; x->cls = C_WHITE; x->behavior = B_REMOVED;
        if (!(x = pre_new(t, file, where))) return MB_ENOMEM;
        x->type = P_CHARS; x->cls = C_PUNCT; x->behavior = B_ISOLATED;
        return 0;
    }
    if (!strcmp(type, "CharDelimiterSplit")) {
        int64_t cp = one_char(json_object_get(p, "delimiter"));
        if (cp < 0) return mb_fail(MB_EFORMAT, "%s: %s: \"delimiter\" must be one character", file, what);
        x->type = P_CHARS; x->cls = C_CHAR; x->ch = (uint32_t)cp; x->behavior = B_REMOVED;
        return 0;
    }
    if (!strcmp(type, "FixedLength")) {
        json_t *l = json_object_get(p, "length");
        x->type = P_FIXED;
        x->length = 5;
        if (l && !json_is_null(l)) {
            if (!json_is_integer(l) || json_integer_value(l) < 1 || json_integer_value(l) > (1 << 20))
                return mb_fail(MB_EFORMAT, "%s: %s: \"length\" is not an integer in 1..%d", file, what, 1 << 20);
            x->length = (size_t)json_integer_value(l);
        }
        return 0;
    }
    return mb_fail(MB_EUNSUPPORTED, "%s: %s: pre_tokenizer \"%.40s\" is not supported (supported: Sequence, ByteLevel, Split, Metaspace, Digits, "
                   "Punctuation, Whitespace, WhitespaceSplit, BertPreTokenizer, CharDelimiterSplit, FixedLength)", file, where, type);
}

static struct dec *dec_new(struct mb_tokenizer *t, const char *file, const char *where) {
    if (t->n_decs >= MB_TOK_MAX_STEPS) { mb_fail(MB_EFORMAT, "%s: %s: more than %d decoders", file, where, MB_TOK_MAX_STEPS); return NULL; }
    struct dec *nd = realloc(t->decs, (size_t)(t->n_decs + 1) * sizeof *nd);
    if (!nd) { mb_fail(MB_ENOMEM, "out of memory"); return NULL; }
    t->decs = nd;
    struct dec *x = &t->decs[t->n_decs++];
    memset(x, 0, sizeof *x);
    return x;
}

static int get_count(const char *file, const char *where, json_t *o, const char *key, size_t *out) {
    json_t *v = json_object_get(o, key);
    *out = 0;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > (1 << 20))
        return mb_fail(MB_EFORMAT, "%s: %s: \"%s\" is not an integer in 0..%d", file, where, key, 1 << 20);
    *out = (size_t)json_integer_value(v);
    return 0;
}

static int load_decoder(struct mb_tokenizer *t, const char *file, const char *where, json_t *d, int depth) {
    if (!d || json_is_null(d)) return 0;
    const char *type;
    int rc = check_object(file, where, d, &type);
    if (rc) return rc;
    t->has_decoder = 1;
    if (!strcmp(type, "Sequence")) {
        json_t *arr = json_object_get(d, "decoders");
        if (!json_is_array(arr)) return mb_fail(MB_EFORMAT, "%s: %s: Sequence without a \"decoders\" list", file, where);
        if (depth >= MB_TOK_MAX_DEPTH) return mb_fail(MB_EFORMAT, "%s: %s: Sequences nested deeper than %d", file, where, MB_TOK_MAX_DEPTH);
        for (size_t i = 0; i < json_array_size(arr); i++) {
            char w[160];
            snprintf(w, sizeof w, "%.100s.decoders[%zu]", where, i);
            if ((rc = load_decoder(t, file, w, json_array_get(arr, i), depth + 1))) return rc;
        }
        return 0;
    }
    char what[160];
    snprintf(what, sizeof what, "%.100s (%.30s)", where, type);
    struct dec *x = dec_new(t, file, where);
    if (!x) return MB_ENOMEM;
    json_t *s;
    if (!strcmp(type, "ByteLevel")) { x->type = D_BYTELEVEL; return 0; }
    if (!strcmp(type, "ByteFallback")) { x->type = D_BYTEFALLBACK; return 0; }
    if (!strcmp(type, "Fuse")) { x->type = D_FUSE; return 0; }
    if (!strcmp(type, "Metaspace")) {
        x->type = D_METASPACE;
        json_t *r = json_object_get(d, "replacement");
        int64_t cp = r ? one_char(r) : 0x2581;
        if (cp < 0) return mb_fail(MB_EFORMAT, "%s: %s: \"replacement\" must be one character", file, what);
        x->ch = (uint32_t)cp;
        int scheme;
        if ((rc = parse_prepend_scheme(file, what, d, &scheme))) return rc;
        x->flag = scheme != 0;
        return 0;
    }
    if (!strcmp(type, "Strip")) {
        x->type = D_STRIP;
        int64_t cp = one_char(json_object_get(d, "content"));
        if (cp < 0) return mb_fail(MB_EFORMAT, "%s: %s: \"content\" must be one character", file, what);
        x->ch = (uint32_t)cp;
        if ((rc = get_count(file, what, d, "start", &x->start))) return rc;
        return get_count(file, what, d, "stop", &x->stop);
    }
    if (!strcmp(type, "Replace")) {
        x->type = D_REPLACE;
        if ((rc = get_str(file, what, d, "content", &s))) return rc;
        if (!s) return mb_fail(MB_EFORMAT, "%s: %s: no \"content\" string", file, what);
        if ((rc = dup_str(s, NULL, &x->s, &x->slen))) return rc;
        return load_pattern(file, what, json_object_get(d, "pattern"), &x->pat);
    }
    if (!strcmp(type, "WordPiece")) {
        x->type = D_WORDPIECE;
        if ((rc = get_str(file, what, d, "prefix", &s)) || (rc = dup_str(s, "##", &x->s, &x->slen))) return rc;
        return get_bool(file, what, d, "cleanup", 1, &x->flag);
    }
    if (!strcmp(type, "BPEDecoder")) {
        x->type = D_BPE;
        if ((rc = get_str(file, what, d, "suffix", &s))) return rc;
        return dup_str(s, "</w>", &x->s, &x->slen);
    }
    if (!strcmp(type, "CTC")) {
        x->type = D_CTC;
        if ((rc = get_str(file, what, d, "pad_token", &s)) || (rc = dup_str(s, "<pad>", &x->s, &x->slen))) return rc;
        if ((rc = get_str(file, what, d, "word_delimiter_token", &s)) || (rc = dup_str(s, "|", &x->s2, &x->s2len))) return rc;
        return get_bool(file, what, d, "cleanup", 1, &x->flag);
    }
    return mb_fail(MB_EUNSUPPORTED, "%s: %s: decoder \"%.40s\" is not supported (supported: Sequence, ByteLevel, Metaspace, ByteFallback, Fuse, "
                   "Strip, Replace, WordPiece, BPEDecoder, CTC)", file, where, type);
}

/* an id that must name a token of the vocabulary (optionally with the given text) */
static int check_special(struct mb_tokenizer *t, const char *file, const char *where, json_t *id, json_t *text, int32_t *out) {
    if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) >= t->vocab_n || !t->tok[json_integer_value(id)])
        return mb_fail(MB_EFORMAT, "%s: %s: id is not an integer naming a token of the vocabulary", file, where);
    int64_t i = json_integer_value(id);
    if (text && (!json_is_string(text) || json_string_length(text) != t->toklen[i] || memcmp(json_string_value(text), t->tok[i], t->toklen[i])))
        return mb_fail(MB_EFORMAT, "%s: %s: token \"%.40s\" does not match id %lld (\"%.40s\" in the vocabulary)", file, where,
                       json_is_string(text) ? json_string_value(text) : "?", (long long)i, t->tok[i]);
    *out = (int32_t)i;
    return 0;
}

/* TemplateProcessing "single": [specials..., {"Sequence": {"id": "A"}}, specials...]; at most one special on
 * each side (BOS / EOS), each a special_tokens entry with exactly one id */
static int load_template(struct mb_tokenizer *t, const char *file, const char *where, json_t *p) {
    json_t *single = json_object_get(p, "single"), *specials = json_object_get(p, "special_tokens");
    if (!json_is_array(single)) return mb_fail(MB_EFORMAT, "%s: %s: TemplateProcessing without a \"single\" list", file, where);
    if (specials && !json_is_object(specials)) return mb_fail(MB_EFORMAT, "%s: %s: \"special_tokens\" is not an object", file, where);
    size_t n = json_array_size(single), seq = (size_t)-1;
    int32_t side[2] = {-1, -1};
    for (size_t i = 0; i < n; i++) {
        json_t *piece = json_array_get(single, i), *sq = json_object_get(piece, "Sequence"), *sp = json_object_get(piece, "SpecialToken");
        char w[200];
        snprintf(w, sizeof w, "%.100s.single[%zu]", where, i);
        if (json_is_object(sq) && !sp) {
            const char *sid = json_string_value(json_object_get(sq, "id"));
            if (!sid || strcmp(sid, "A") || seq != (size_t)-1) return mb_fail(MB_EUNSUPPORTED, "%s: %s: only one Sequence \"A\" is supported in \"single\"", file, w);
            seq = i;
            continue;
        }
        if (!json_is_object(sp) || sq) return mb_fail(MB_EFORMAT, "%s: %s: neither a Sequence nor a SpecialToken", file, w);
        const char *name = json_string_value(json_object_get(sp, "id"));
        json_t *ent = name ? json_object_get(specials, name) : NULL;
        if (!ent) return mb_fail(MB_EFORMAT, "%s: %s: special token \"%.40s\" is not in special_tokens", file, w, name ? name : "?");
        json_t *ids = json_object_get(ent, "ids"), *toks = json_object_get(ent, "tokens");
        if (!json_is_array(ids) || json_array_size(ids) != 1 || (toks && (!json_is_array(toks) || json_array_size(toks) != 1)))
            return mb_fail(MB_EUNSUPPORTED, "%s: %s: special token \"%.40s\" must have exactly one id (several are not supported)", file, w, name);
        int k = seq == (size_t)-1 ? 0 : 1;
        if (side[k] >= 0) return mb_fail(MB_EUNSUPPORTED, "%s: %s: more than one special token %s the sequence is not supported", file, w, k ? "after" : "before");
        char w2[260];
        snprintf(w2, sizeof w2, "%s: special_tokens[\"%.40s\"]", w, name);
        int rc = check_special(t, file, w2, json_array_get(ids, 0), toks ? json_array_get(toks, 0) : NULL, &side[k]);
        if (rc) return rc;
    }
    if (seq == (size_t)-1) return mb_fail(MB_EFORMAT, "%s: %s: \"single\" has no Sequence \"A\"", file, where);
    t->tpl_bos = side[0];
    t->tpl_eos = side[1];
    return 0;
}

static int load_post(struct mb_tokenizer *t, const char *file, const char *where, json_t *p, int depth, int *n_adding) {
    if (!p || json_is_null(p)) return 0;
    const char *type;
    int rc = check_object(file, where, p, &type);
    if (rc) return rc;
    if (!strcmp(type, "Sequence")) {
        json_t *arr = json_object_get(p, "processors");
        if (!json_is_array(arr)) return mb_fail(MB_EFORMAT, "%s: %s: Sequence without a \"processors\" list", file, where);
        if (depth >= MB_TOK_MAX_DEPTH || json_array_size(arr) > MB_TOK_MAX_STEPS) return mb_fail(MB_EFORMAT, "%s: %s: too many or too deeply nested processors", file, where);
        for (size_t i = 0; i < json_array_size(arr); i++) {
            char w[160];
            snprintf(w, sizeof w, "%.100s.processors[%zu]", where, i);
            if ((rc = load_post(t, file, w, json_array_get(arr, i), depth + 1, n_adding))) return rc;
        }
        return 0;
    }
    if (!strcmp(type, "ByteLevel")) return 0; /* offsets only */
    if (!strcmp(type, "TemplateProcessing") || !strcmp(type, "BertProcessing") || !strcmp(type, "RobertaProcessing")) {
        if (++*n_adding > 1) return mb_fail(MB_EUNSUPPORTED, "%s: %s: more than one processor adding special tokens is not supported", file, where);
        if (type[0] == 'T') return load_template(t, file, where, p);
        /* "cls": ["<s>", 0], "sep": ["</s>", 2]: cls $A sep */
        json_t *cls = json_object_get(p, "cls"), *sep = json_object_get(p, "sep");
        char w[200];
        snprintf(w, sizeof w, "%.100s.cls", where);
        if (!json_is_array(cls) || json_array_size(cls) != 2) return mb_fail(MB_EFORMAT, "%s: %s is not [token, id]", file, w);
        if ((rc = check_special(t, file, w, json_array_get(cls, 1), json_array_get(cls, 0), &t->tpl_bos))) return rc;
        snprintf(w, sizeof w, "%.100s.sep", where);
        if (!json_is_array(sep) || json_array_size(sep) != 2) return mb_fail(MB_EFORMAT, "%s: %s is not [token, id]", file, w);
        return check_special(t, file, w, json_array_get(sep, 1), json_array_get(sep, 0), &t->tpl_eos);
    }
    return mb_fail(MB_EUNSUPPORTED, "%s: %s: post_processor \"%.40s\" is not supported (supported: TemplateProcessing, BertProcessing, "
                   "RobertaProcessing, ByteLevel, Sequence)", file, where, type);
}

/* ------------------------------------------------------------------------------------------------ */
/* loading: model, vocabulary, merges, added tokens                                                 */

static void init_byte_map(struct mb_tokenizer *t) {
    int n = 0;
    for (int b = 0; b < 256; b++) {
        if ((b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff)) t->byte2cp[b] = (uint32_t)b;
        else t->byte2cp[b] = (uint32_t)(256 + n++);
    }
    for (int i = 0; i < 512; i++) t->cp2byte[i] = -1;
    for (int b = 0; b < 256; b++) t->cp2byte[t->byte2cp[b]] = (int16_t)b;
}

/* an id read from the file: an integer in [0, MB_TOK_MAX_ID) */
static int check_id(const char *file, json_t *v, const char *where, const char *tok, int64_t *id) {
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= MB_TOK_MAX_ID)
        return mb_fail(MB_EFORMAT, "%s: %s \"%.40s\": the id is not an integer in 0..%d", file, where, tok, MB_TOK_MAX_ID - 1);
    *id = json_integer_value(v);
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
    if (n == 0) return 0;
    int l = utf8_len((const uint8_t *)s, n);
    return l ? utf8_cp((const uint8_t *)s, l) : 0;
}

static int hexval(char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1; }
/* "<0xNN>" (the ByteFallback decoder's test: six bytes, u8::from_str_radix of the two in the middle, which
 * also takes "+N"); returns the byte or -1 */
static int byte_token(const char *s, size_t n) {
    if (n != 6 || memcmp(s, "<0x", 3) || s[5] != '>') return -1;
    if (s[3] == '+') return hexval(s[4]);
    int h = hexval(s[3]), l = hexval(s[4]);
    return h < 0 || l < 0 ? -1 : h * 16 + l;
}

/* model.vocab and the added tokens' ids: checked, vocab_n = max id + 1 */
static int load_ids(struct mb_tokenizer *t, const char *file, json_t *model, json_t *added) {
    if (!json_is_object(model)) return mb_fail(MB_EFORMAT, "%s: no \"model\" object", file);
    json_t *ty = json_object_get(model, "type");
    const char *type = json_string_value(ty);
    if (ty && !type) return mb_fail(MB_EFORMAT, "%s: model.type is not a string", file);
    if (!type) type = json_object_get(model, "merges") ? "BPE" : "?";
    if (strcmp(type, "BPE")) return mb_fail(MB_EUNSUPPORTED, "%s: model type \"%.40s\" is not supported (only BPE)", file, type);
    json_t *vocab = json_object_get(model, "vocab"), *merges = json_object_get(model, "merges");
    if (!json_is_object(vocab)) return mb_fail(MB_EFORMAT, "%s: BPE model without a vocab object", file);
    if (!json_is_array(merges)) return mb_fail(MB_EFORMAT, "%s: BPE model without a merges list", file);
    if (json_object_size(vocab) > MB_TOK_MAX_ID) return mb_fail(MB_EFORMAT, "%s: model.vocab has more than %d entries", file, MB_TOK_MAX_ID);
    if (json_array_size(merges) > MB_TOK_MAX_MERGES) return mb_fail(MB_EFORMAT, "%s: model.merges has more than %d entries", file, MB_TOK_MAX_MERGES);
    if (json_array_size(added) > MB_TOK_MAX_ID) return mb_fail(MB_EFORMAT, "%s: added_tokens has more than %d entries", file, MB_TOK_MAX_ID);
    json_t *dropout = json_object_get(model, "dropout");
    if (json_is_number(dropout) && json_number_value(dropout) > 0) return mb_fail(MB_EUNSUPPORTED, "%s: model.dropout: BPE dropout is not supported", file);
    json_t *csp = json_object_get(model, "continuing_subword_prefix"), *eows = json_object_get(model, "end_of_word_suffix");
    if ((json_is_string(csp) && json_string_length(csp)) || (json_is_string(eows) && json_string_length(eows)))
        return mb_fail(MB_EUNSUPPORTED, "%s: model: BPE continuing_subword_prefix / end_of_word_suffix are not supported", file);
    int rc;
    if ((rc = get_bool(file, "model", model, "byte_fallback", 0, &t->byte_fallback)) || (rc = get_bool(file, "model", model, "fuse_unk", 0, &t->fuse_unk)) ||
        (rc = get_bool(file, "model", model, "ignore_merges", 0, &t->ignore_merges)))
        return rc;
    const char *k;
    json_t *v;
    int64_t id;
    json_object_foreach(vocab, k, v) {
        if ((rc = check_id(file, v, "model.vocab", k, &id))) return rc;
        if (id >= t->vocab_n) t->vocab_n = id + 1;
    }
    for (size_t i = 0; i < json_array_size(added); i++) {
        json_t *a = json_array_get(added, i), *c = json_object_get(a, "content");
        char w[64];
        snprintf(w, sizeof w, "added_tokens[%zu]", i);
        if (!json_is_object(a) || !json_is_string(c)) return mb_fail(MB_EFORMAT, "%s: %s is not an object with a \"content\" string", file, w);
        if ((rc = check_id(file, json_object_get(a, "id"), w, json_string_value(c), &id))) return rc;
        if (id >= t->vocab_n) t->vocab_n = id + 1;
    }
    return 0;
}

static int set_token(struct mb_tokenizer *t, const char *file, const char *where, const char *s, size_t n, int64_t id) {
    if (t->tok[id] && (t->toklen[id] != n || memcmp(t->tok[id], s, n)))
        return mb_fail(MB_EFORMAT, "%s: %s \"%.40s\": id %lld is already the token \"%.40s\"", file, where, s, (long long)id, t->tok[id]);
    if (!t->tok[id]) {
        if (!(t->tok[id] = malloc(n + 1))) return mb_fail(MB_ENOMEM, "out of memory");
        memcpy(t->tok[id], s, n);
        t->tok[id][n] = 0;
        t->toklen[id] = (uint32_t)n;
    }
    return 0;
}

static int build_vocab(struct mb_tokenizer *t, const char *file, json_t *model) {
    size_t nv = t->vocab_n ? (size_t)t->vocab_n : 1;
    t->tok = calloc(nv, sizeof *t->tok);
    t->toklen = calloc(nv, sizeof *t->toklen);
    t->is_added = calloc(nv, 1);
    if (!t->tok || !t->toklen || !t->is_added) return mb_fail(MB_ENOMEM, "out of memory");
    json_t *vocab = json_object_get(model, "vocab");
    if (smap_init(&t->vocab, (uint32_t)json_object_size(vocab))) return MB_ENOMEM;
    const char *k;
    json_t *v;
    json_object_foreach(vocab, k, v) {
        size_t n = strlen(k);
        int64_t id = json_integer_value(v);
        int rc = set_token(t, file, "model.vocab", k, n, id);
        if (rc) return rc;
        if (smap_put(&t->vocab, k, n, (int32_t)id) < 0) return mb_fail(MB_ENOMEM, "out of memory");
    }
    uint64_t h = FNV0;
    for (int64_t i = 0; i < t->vocab_n; i++)
        if (t->tok[i]) { h = fnv1a(t->tok[i], t->toklen[i], h); h = fnv1a(&i, sizeof i, h); }
    t->hash = h;
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
    while (t->merges.cap < n * 2 + 16) t->merges.cap *= 2; /* n <= MB_TOK_MAX_MERGES */
    t->merges.e = malloc(t->merges.cap * sizeof *t->merges.e);
    t->pairs.cap = t->merges.cap;
    t->pairs.k = calloc(t->pairs.cap, sizeof *t->pairs.k);
    if (!t->merges.e || !t->pairs.k) return mb_fail(MB_ENOMEM, "out of memory");
    for (uint32_t i = 0; i < t->merges.cap; i++) t->merges.e[i].rank = -1;
    t->can_split = 1;
    struct buf joined = {0};
    int rc = 0;
    for (size_t r = 0; r < n && !rc; r++) {
        json_t *m = json_array_get(merges, r);
        const char *a, *b;
        size_t al, bl;
        if (json_is_string(m)) { /* "a b" */
            a = json_string_value(m);
            const char *sp = strchr(a, ' ');
            if (!sp || sp == a || sp[1] == 0 || strchr(sp + 1, ' ')) { rc = mb_fail(MB_EFORMAT, "%s: merges[%zu] \"%.40s\" is not two tokens separated by one space", file, r, a); break; }
            al = (size_t)(sp - a);
            b = sp + 1;
            bl = strlen(b);
        } else if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) && json_is_string(json_array_get(m, 1))) {
            a = json_string_value(json_array_get(m, 0));
            al = json_string_length(json_array_get(m, 0));
            b = json_string_value(json_array_get(m, 1));
            bl = json_string_length(json_array_get(m, 1));
        } else {
            rc = mb_fail(MB_EFORMAT, "%s: merges[%zu] is neither \"a b\" nor [a, b]", file, r);
            break;
        }
        int32_t ia = smap_get(&t->vocab, a, al), ib = smap_get(&t->vocab, b, bl);
        if (ia < 0 || ib < 0) { rc = mb_fail(MB_EFORMAT, "%s: merges[%zu]: token \"%.*s\" is not in the vocab", file, r, (int)(ia < 0 ? (al > 40 ? 40 : al) : (bl > 40 ? 40 : bl)), ia < 0 ? a : b); break; }
        joined.n = 0;
        if ((rc = buf_add(&joined, a, al)) || (rc = buf_add(&joined, b, bl))) break;
        int32_t inew = smap_get(&t->vocab, joined.p, joined.n);
        if (inew < 0) { rc = mb_fail(MB_EFORMAT, "%s: merges[%zu]: merged token \"%.*s\" is not in the vocab", file, r, (int)(joined.n > 60 ? 60 : joined.n), joined.p); break; }
        uint64_t key = ((uint64_t)(uint32_t)ia << 32) | (uint32_t)ib;
        uint32_t mask = t->merges.cap - 1, i;
        for (i = hash64(key) & mask; t->merges.e[i].rank >= 0 && t->merges.e[i].key != key; i = (i + 1) & mask) {}
        if (t->merges.e[i].rank < 0) { /* first occurrence wins, as in the library */
            t->merges.e[i].key = key;
            t->merges.e[i].rank = (int32_t)r;
            t->merges.e[i].new_id = inew;
        }
        if (byte_token(a, al) >= 0 || byte_token(b, bl) >= 0 || ia == t->unk_id || ib == t->unk_id) t->can_split = 0;
        pset_add(&t->pairs, ((uint64_t)last_cp(a, al) << 32) | first_cp(b, bl));
        t->hash = fnv1a(joined.p, joined.n, t->hash);
    }
    free(joined.p);
    t->n_merges = (int)n;
    return rc;
}

/* the added tokens' ids and strings: each id names one token, each token has one id */
static int add_added_ids(struct mb_tokenizer *t, const char *file, json_t *added) {
    if (smap_init(&t->addmap, (uint32_t)json_array_size(added))) return MB_ENOMEM;
    for (size_t i = 0; i < json_array_size(added); i++) {
        json_t *a = json_array_get(added, i), *c = json_object_get(a, "content");
        const char *s = json_string_value(c);
        size_t n = json_string_length(c);
        int64_t id = json_integer_value(json_object_get(a, "id"));
        char w[64];
        snprintf(w, sizeof w, "added_tokens[%zu]", i);
        int32_t have = smap_get(&t->vocab, s, n);
        if (have < 0) have = smap_get(&t->addmap, s, n);
        if (have >= 0 && have != id)
            return mb_fail(MB_EFORMAT, "%s: %s \"%.40s\" has id %lld but the same token has id %d elsewhere in the file", file, w, s, (long long)id, have);
        int rc = set_token(t, file, w, s, n, id);
        if (rc) return rc;
        t->is_added[id] = 1;
        if (have < 0 && smap_put(&t->addmap, s, n, (int32_t)id) < 0) return mb_fail(MB_ENOMEM, "out of memory");
    }
    return 0;
}

/* id of a token of the vocabulary or of the added tokens, -1 when none */
static int32_t token_id(const struct mb_tokenizer *t, const char *s, size_t n) {
    int32_t id = smap_get(&t->vocab, s, n);
    return id >= 0 ? id : smap_get(&t->addmap, s, n);
}

static int normalize(const struct mb_tokenizer *t, const char *s, size_t n, int allow_prepend, struct buf *b, int *lead_removed);

/* the matching entries of the added tokens (longest first); normalized ones match their normalized form */
static int load_added(struct mb_tokenizer *t, const char *file, json_t *added) {
    size_t n = json_array_size(added);
    t->added = calloc(n ? n : 1, sizeof *t->added);
    if (!t->added) return mb_fail(MB_ENOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        json_t *a = json_array_get(added, i);
        struct added *x = &t->added[t->n_added];
        char w[64];
        snprintf(w, sizeof w, "added_tokens[%zu]", i);
        int rc;
        if ((rc = get_bool(file, w, a, "special", 0, &x->special))) return rc;
        if ((rc = get_bool(file, w, a, "normalized", !x->special, &x->normalized)) || (rc = get_bool(file, w, a, "lstrip", 0, &x->lstrip)) ||
            (rc = get_bool(file, w, a, "rstrip", 0, &x->rstrip)) || (rc = get_bool(file, w, a, "single_word", 0, &x->single_word)))
            return rc;
        json_t *c = json_object_get(a, "content");
        x->id = (int32_t)json_integer_value(json_object_get(a, "id"));
        struct buf pb = {0};
        int lr;
        if (x->normalized) rc = normalize(t, json_string_value(c), json_string_length(c), 1, &pb, &lr);
        else rc = buf_add(&pb, json_string_value(c), json_string_length(c));
        if (rc) { free(pb.p); return mb_fail_ctx(rc, "%s: %s", file, w); }
        x->s = pb.p;
        x->n = pb.n;
        if (x->normalized && (pb.n != json_string_length(c) || memcmp(pb.p, json_string_value(c), pb.n))) t->is_added[x->id] = 2; /* decodes as normalized */
        t->n_added++;
    }
    qsort(t->added, (size_t)t->n_added, sizeof *t->added, cmp_added_len);
    /* candidates by (pass, first byte), keeping the longest-first order; an empty token never matches */
    t->cand = malloc(((size_t)t->n_added + 1) * sizeof *t->cand);
    if (!t->cand) return mb_fail(MB_ENOMEM, "out of memory");
    int32_t count[512] = {0}; /* bucket p * 256 + b */
    for (int i = 0; i < t->n_added; i++)
        if (t->added[i].n > 0) count[(t->added[i].normalized ? 256 : 0) + (uint8_t)t->added[i].s[0]]++;
    int32_t k = 0;
    for (int j = 0; j < 512; j++) { t->cand_start[j / 256][j % 256] = k; k += count[j]; count[j] = t->cand_start[j / 256][j % 256]; }
    t->cand_start[1][256] = k;
    t->cand_start[0][256] = t->cand_start[1][0];
    for (int i = 0; i < t->n_added; i++) /* stable: longest first within a bucket */
        if (t->added[i].n > 0) t->cand[count[(t->added[i].normalized ? 256 : 0) + (uint8_t)t->added[i].s[0]]++] = i;
    for (int p = 0; p < 2; p++)
        for (int b = 0; b < 256; b++) t->added_first[p][b] = t->cand_start[p][b + 1] > t->cand_start[p][b];
    return 0;
}

static int token_id_of(struct mb_tokenizer *t, json_t *v) {
    if (json_is_object(v)) v = json_object_get(v, "content");
    if (!json_is_string(v)) return -1;
    return token_id(t, json_string_value(v), json_string_length(v));
}

/* BOS/EOS: the post-processor's specials, then tokenizer_config.json (optional) for add_bos_token /
 * add_eos_token / bos_token / eos_token */
static int load_tok_config(struct mb_tokenizer *t, const char *config_path) {
    t->bos_id = t->tpl_bos;
    t->eos_id = t->tpl_eos;
    t->add_bos = t->tpl_bos >= 0;
    t->add_eos = t->tpl_eos >= 0;
    if (!config_path) {
        if (t->bos_id < 0) t->bos_id = token_id(t, "<s>", 3);
        if (t->eos_id < 0) t->eos_id = token_id(t, "</s>", 4);
        /* no tokenizer_config.json and no template: the family's default. SentencePiece models (Llama 2,
         * Mistral: byte-fallback BPE with <s>) start with BOS, as their slow tokenizers do */
        if (t->tpl_bos < 0 && t->byte_fallback && t->bos_id >= 0) t->add_bos = 1;
        return 0;
    }
    char *text;
    size_t len;
    int rc = mb_read_file(config_path, &text, &len, 16u << 20);
    if (rc) return rc;
    json_error_t jerr;
    json_t *c = json_loadb(text, len, 0, &jerr);
    free(text);
    if (!c) return mb_fail(MB_EFORMAT, "%s: invalid JSON: %s (line %d)", config_path, jerr.text, jerr.line);
    if (!json_is_object(c)) { json_decref(c); return mb_fail(MB_EFORMAT, "%s: not a JSON object", config_path); }
    json_t *ab = json_object_get(c, "add_bos_token"), *ae = json_object_get(c, "add_eos_token");
    if (json_is_boolean(ab)) t->add_bos = json_is_true(ab);
    if (json_is_boolean(ae)) t->add_eos = json_is_true(ae);
    int b = token_id_of(t, json_object_get(c, "bos_token")), e = token_id_of(t, json_object_get(c, "eos_token"));
    if (b >= 0) t->bos_id = b;
    if (e >= 0) t->eos_id = e;
    json_decref(c);
    if (t->add_bos && t->bos_id < 0) return mb_fail(MB_EFORMAT, "%s: add_bos_token is set but there is no BOS token", config_path);
    if (t->add_eos && t->eos_id < 0) return mb_fail(MB_EFORMAT, "%s: add_eos_token is set but there is no EOS token", config_path);
    return 0;
}

/* Split regexes whose effect on a cut "X\nY" (X, Y printable non-space ASCII) is known: the GPT-2, Llama 3
 * and Qwen2 patterns always end a match at the '\n' and start one at Y (every character is matched, no
 * match spans "\nY", a lone '\n' after a non-space is matched alone whether Y follows or the text ends);
 * \p{N} patterns never match '\n'. */
static const char *SEPARATING_RE[] = {
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
};
static const char *NEUTRAL_RE[] = {"\\p{N}", "\\p{N}{1,3}", "\\p{N}+"};

static int src_in(const struct pat *p, const char **list, size_t n) {
    if (!p->re || !p->str) return 0;
    for (size_t i = 0; i < n; i++)
        if (p->slen == strlen(list[i]) && !memcmp(p->str, list[i], p->slen)) return 1;
    return 0;
}

/* May a text be cut after "X\nY" (X, Y printable non-space ASCII) and the parts encoded one after the
 * other (the later ones as continuations: no Prepend, no Metaspace "first")? True when no normalizer
 * reaches across the cut and either a pre-tokenizer step always separates there (steps before it only split,
 * never join, and treat the piece after the cut like any other) or no merge joins '\n' to Y. Anything not
 * known to be safe reads the text whole. */
static int stream_check(const struct mb_tokenizer *t) {
    int mapped = 0, sep = 0;
    for (int i = 0; i < t->n_norms; i++) {
        const struct norm *x = &t->norms[i];
        switch (x->type) {
        case N_PREPEND: case N_NF: case N_LOWER: case N_STRIP_ACCENTS: break;
        case N_REPLACE: if (x->pat.re || memchr(x->pat.str, '\n', x->pat.slen)) return 0; break;
        case N_BYTELEVEL: mapped = 1; break;
        default: return 0; /* Strip, Nmt, BertNormalizer change the ends or '\n' */
        }
    }
    for (int i = 0; i < t->n_added; i++)
        if (t->added[i].lstrip || (t->added[i].n > 1 && memchr(t->added[i].s, '\n', t->added[i].n - 1))) return 0;
    for (int i = 0; i < t->n_pres && !sep; i++) {
        const struct pre *p = &t->pres[i];
        switch (p->type) {
        case P_BYTELEVEL:
            if (p->add_prefix_space) return 0; /* a new piece would get a space */
            if (p->use_regex && !mapped) sep = 1;
            mapped = 1;
            break;
        case P_SPLIT:
            if (mapped || p->invert) return 0;
            if (src_in(&p->pat, SEPARATING_RE, sizeof SEPARATING_RE / sizeof *SEPARATING_RE) && (p->behavior == B_ISOLATED || p->behavior == B_REMOVED)) sep = 1;
            else if (!src_in(&p->pat, NEUTRAL_RE, sizeof NEUTRAL_RE / sizeof *NEUTRAL_RE)) return 0;
            break;
        case P_METASPACE: if (p->prepend_scheme == 2) return 0; break;
        case P_CHARS:
            if (mapped) return 0;
            if (p->cls == C_WHITE || (p->cls == C_CHAR && p->ch == '\n')) sep = 1;
            break;
        case P_WHITESPACE: if (mapped) return 0; sep = 1; break;
        case P_FIXED: return 0;
        }
    }
    if (sep) return 1;
    /* one BPE word may span the cut: safe when no merge joins '\n' to a printable character */
    if (!t->can_split || t->ignore_merges) return 0;
    uint32_t nl = mapped ? t->byte2cp['\n'] : '\n';
    char nls[4];
    int nll = utf8_put(nl, nls);
    if (smap_get(&t->vocab, nls, (size_t)nll) < 0 && !(!mapped && t->byte_fallback && t->byte_ids['\n'] >= 0)) return 0;
    for (uint32_t c = 0x21; c < 0x7f; c++)
        if (pset_has(&t->pairs, ((uint64_t)nl << 32) | (mapped ? t->byte2cp[c] : c))) return 0;
    return 1;
}

int mb_tokenizer_parse(const char *name, const char *text, size_t len, const char *config_path, struct mb_tokenizer **out) {
    *out = NULL;
    json_error_t jerr;
    /* duplicate keys would silently drop vocab entries: refuse them */
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) return mb_fail(MB_EFORMAT, "%s: invalid JSON: %s (line %d)", name, jerr.text, jerr.line);
    struct mb_tokenizer *t = calloc(1, sizeof *t);
    int rc = 0;
    if (!t) { json_decref(root); return mb_fail(MB_ENOMEM, "out of memory"); }
    t->unk_id = t->tpl_bos = t->tpl_eos = -1;
    init_byte_map(t);
    if (!(t->name = strdup(name)) || !(t->mctx = pcre2_match_context_create(NULL))) { rc = mb_fail(MB_ENOMEM, "out of memory"); goto fail; }
    pcre2_set_match_limit(t->mctx, MB_TOK_MATCH_LIMIT);
    if (!json_is_object(root)) { rc = mb_fail(MB_EFORMAT, "%s: not a JSON object", name); goto fail; }
    json_t *model = json_object_get(root, "model"), *added = json_object_get(root, "added_tokens");
    if (added && !json_is_null(added) && !json_is_array(added)) { rc = mb_fail(MB_EFORMAT, "%s: added_tokens is not a list", name); goto fail; }
    if ((rc = load_ids(t, name, model, added))) goto fail;
    if ((rc = build_vocab(t, name, model))) goto fail;
    if ((rc = add_added_ids(t, name, added))) goto fail;
    json_t *unk = json_object_get(model, "unk_token");
    if (unk && !json_is_null(unk)) {
        if (!json_is_string(unk)) { rc = mb_fail(MB_EFORMAT, "%s: model.unk_token is not a string", name); goto fail; }
        t->unk_id = token_id(t, json_string_value(unk), json_string_length(unk));
        if (t->unk_id < 0) { rc = mb_fail(MB_EFORMAT, "%s: model.unk_token \"%.40s\" is not in the vocab", name, json_string_value(unk)); goto fail; }
    }
    if ((rc = build_merges(t, name, json_object_get(model, "merges")))) goto fail;
    if ((rc = load_normalizer(t, name, "normalizer", json_object_get(root, "normalizer"), 0))) goto fail;
    if ((rc = load_pre(t, name, "pre_tokenizer", json_object_get(root, "pre_tokenizer"), 0))) goto fail;
    if ((rc = load_decoder(t, name, "decoder", json_object_get(root, "decoder"), 0))) goto fail;
    if ((rc = load_added(t, name, added))) goto fail;
    int n_adding = 0;
    if ((rc = load_post(t, name, "post_processor", json_object_get(root, "post_processor"), 0, &n_adding))) goto fail;
    if ((rc = load_tok_config(t, config_path))) goto fail;
    t->streamable = stream_check(t);
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

int mb_tokenizer_load(const char *path, struct mb_tokenizer **out) {
    *out = NULL;
    char file[4096], dir[4096], cfg[4096];
    if (mb_is_dir(path)) {
        snprintf(dir, sizeof dir, "%s", path);
        if (mb_path_join(file, sizeof file, path, "tokenizer.json")) return mb_fail(MB_EINVAL, "%s: path too long", path);
        if (!mb_file_exists(file)) return mb_fail(MB_EIO, "%s: no tokenizer.json in the directory", path);
    } else {
        if (strlen(path) >= sizeof file) return mb_fail(MB_EINVAL, "%s: path too long", path);
        snprintf(file, sizeof file, "%s", path);
        snprintf(dir, sizeof dir, "%s", path);
        char *sl = strrchr(dir, '/');
        if (sl) *sl = 0; else strcpy(dir, ".");
    }
    char *text;
    size_t len;
    int rc = mb_read_file(file, &text, &len, 1u << 30);
    if (rc) return rc;
    int have_cfg = !mb_path_join(cfg, sizeof cfg, dir, "tokenizer_config.json") && mb_file_exists(cfg);
    rc = mb_tokenizer_parse(file, text, len, have_cfg ? cfg : NULL, out);
    free(text);
    return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* encoding: BPE                                                                                    */

struct ids { int32_t **p; int64_t *n, *cap; };
static int ids_push(struct ids *v, int32_t id) {
    if (*v->n == *v->cap) {
        int64_t nc = *v->cap ? *v->cap * 2 : 1024;
        int32_t *np = realloc(*v->p, (size_t)nc * sizeof *np);
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

/* scratch buffers for one word, and for pre-tokenization */
struct seg { size_t a, b; int m; };
struct segs { struct seg *v; size_t n, cap; };
struct scratch {
    struct sym *s; struct hent *h; int cap;
    struct spans m;           /* matches of one piece */
    struct spans sub;         /* ByteLevel: the regex pieces of one piece */
    struct segs alt, acc;     /* split: alternation and folded pieces */
    struct buf tmp;
    pcre2_match_data *md;
};
static void scratch_free(struct scratch *sc) {
    free(sc->s); free(sc->h); free(sc->m.v); free(sc->sub.v); free(sc->alt.v); free(sc->acc.v); free(sc->tmp.p);
    if (sc->md) pcre2_match_data_free(sc->md);
}
static int scratch_reserve(struct scratch *sc, int n) {
    if (n <= sc->cap) return 0;
    int nc = sc->cap ? sc->cap : 64;
    while (nc < n) nc *= 2;
    struct sym *ns = realloc(sc->s, (size_t)nc * sizeof *ns);
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
    if (n > MB_TOK_MAX_WORD) return mb_fail(MB_EINVAL, "tokenizer: a pre-token of %zu bytes is longer than %zu", n, MB_TOK_MAX_WORD);
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
        e->key = malloc(n ? n : 1);
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

/* bytes s[0, n) as byte-level characters (each 1 or 2 UTF-8 bytes) appended to b */
static int map_bytes(const struct mb_tokenizer *t, struct buf *b, const char *s, size_t n) {
    int rc = buf_reserve(b, 2 * n);
    if (rc) return rc;
    char *o = b->p + b->n;
    for (size_t i = 0; i < n; i++) {
        uint32_t cp = t->byte2cp[(uint8_t)s[i]];
        if (cp < 0x80) *o++ = (char)cp;
        else { *o++ = (char)(0xc0 | (cp >> 6)); *o++ = (char)(0x80 | (cp & 0x3f)); }
    }
    b->n = (size_t)(o - b->p);
    b->p[b->n] = 0;
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* encoding: normalizers                                                                            */

/* keep (and map) the characters of s: NMT / StripAccents / BertNormalizer's cleaning; sets *lead when the
 * first character is dropped */
static int filter_chars(const char *s, size_t n, int kind, struct buf *o, int *lead) {
    int rc = 0;
    for (size_t i = 0; i < n && !rc;) {
        int l;
        uint32_t c = utf8_next(s, n, i, &l);
        int keep = 1;
        uint32_t to = c;
        if (kind == N_STRIP_ACCENTS) keep = !is_mark(c);
        else if (kind == N_NMT) {
            keep = !((c >= 1 && c <= 8) || c == 0xb || (c >= 0xe && c <= 0x1f) || c == 0x7f || c == 0x8f || c == 0x9f);
            if (c == 9 || c == 10 || c == 12 || c == 13 || c == 0x1680 || (c >= 0x200b && c <= 0x200f) || c == 0x2028 || c == 0x2029 || c == 0x2581 ||
                c == 0xfeff || c == 0xfffd)
                to = ' ';
        } else { /* BertNormalizer clean_text */
            keep = !(c == 0 || c == 0xfffd || is_bert_control(c));
            if (c == '\t' || c == '\n' || c == '\r' || is_white(c)) to = ' ';
        }
        if (!keep && i == 0) *lead = 1;
        if (keep) rc = to == c ? buf_add(o, s + i, (size_t)l) : buf_cp(o, to);
        i += (size_t)l;
    }
    return rc;
}

static int bert_normalize(const struct norm *x, const char *s, size_t n, struct buf *o, int *lead) {
    struct buf a = {0}, b = {0};
    int rc = buf_add(&a, s, n);
    if (!rc && x->clean_text) { b.n = 0; rc = filter_chars(a.p, a.n, N_BERT, &b, lead); struct buf t = a; a = b; b = t; }
    if (!rc && x->chinese) {
        b.n = 0;
        rc = buf_add(&b, "", 0);
        for (size_t i = 0; i < a.n && !rc;) {
            int l;
            uint32_t c = utf8_next(a.p, a.n, i, &l);
            if (is_chinese(c)) { rc = buf_add(&b, " ", 1); if (!rc) rc = buf_add(&b, a.p + i, (size_t)l); if (!rc) rc = buf_add(&b, " ", 1); }
            else rc = buf_add(&b, a.p + i, (size_t)l);
            i += (size_t)l;
        }
        struct buf t = a; a = b; b = t;
    }
    if (!rc && x->strip_accents) { /* NFD, then drop Mn */
        b.n = 0;
        rc = nf_append(&b, a.p, a.n, UTF8PROC_STABLE | UTF8PROC_DECOMPOSE);
        a.n = 0;
        for (size_t i = 0; i < b.n && !rc;) {
            int l;
            uint32_t c = utf8_next(b.p, b.n, i, &l);
            if (c < 0x300 || cat_of(c) != UTF8PROC_CATEGORY_MN) rc = buf_add(&a, b.p + i, (size_t)l);
            else if (i == 0) *lead = 1;
            i += (size_t)l;
        }
    }
    if (!rc && x->lowercase) {
        b.n = 0;
        rc = buf_add(&b, "", 0);
        for (size_t i = 0; i < a.n && !rc;) {
            int l;
            uint32_t c = utf8_next(a.p, a.n, i, &l);
            rc = lower_cp(&b, c);
            i += (size_t)l;
        }
        struct buf t = a; a = b; b = t;
    }
    if (!rc) rc = buf_add(o, a.p ? a.p : "", a.n);
    free(a.p);
    free(b.p);
    return rc;
}

/* apply the normalizers to s (n bytes) into b; *lead_removed: characters at the start were dropped (the
 * normalized text no longer starts at original offset 0) */
static int normalize(const struct mb_tokenizer *t, const char *s, size_t n, int allow_prepend, struct buf *b, int *lead_removed) {
    struct buf cur = {0}, nxt = {0};
    struct spans m = {0};
    pcre2_match_data *md = NULL;
    *lead_removed = 0;
    int rc = buf_add(&cur, s, n);
    for (int k = 0; k < t->n_norms && !rc && cur.n > 0; k++) { /* every normalizer maps "" to "" */
        const struct norm *x = &t->norms[k];
        nxt.n = 0;
        rc = buf_add(&nxt, "", 0);
        switch (x->type) {
        case N_PREPEND:
            if (allow_prepend) rc = buf_add(&nxt, x->s, x->slen);
            if (!rc) rc = buf_add(&nxt, cur.p, cur.n);
            break;
        case N_REPLACE: {
            m.n = 0;
            if (x->pat.re) {
                if (md) pcre2_match_data_free(md);
                if (!(md = pcre2_match_data_create_from_pattern(x->pat.re, NULL))) { rc = mb_fail(MB_ENOMEM, "out of memory"); break; }
            }
            if ((rc = pat_find(&x->pat, cur.p, cur.n, md, t->mctx, &m))) break;
            size_t prev = 0;
            for (size_t i = 0; i < m.n && !rc; i++) {
                rc = buf_add(&nxt, cur.p + prev, m.v[i].a - prev);
                if (!rc) rc = buf_add(&nxt, x->s, x->slen);
                prev = m.v[i].b;
            }
            if (!rc) rc = buf_add(&nxt, cur.p + prev, cur.n - prev);
            if (m.n > 0 && m.v[0].a == 0 && m.v[0].b > 0 && x->slen == 0) *lead_removed = 1;
            break;
        }
        case N_STRIP: {
            size_t a = 0, e = cur.n;
            int l;
            if (x->left) while (a < e && is_white(utf8_next(cur.p, cur.n, a, &l))) a += (size_t)l;
            if (x->right)
                while (e > a) {
                    size_t p = e - 1;
                    while (p > a && ((uint8_t)cur.p[p] & 0xc0) == 0x80) p--;
                    if (!is_white(utf8_next(cur.p, cur.n, p, &l))) break;
                    e = p;
                }
            if (a > 0) *lead_removed = 1;
            rc = buf_add(&nxt, cur.p + a, e - a);
            break;
        }
        case N_NF: rc = nf_append(&nxt, cur.p, cur.n, x->nf); break;
        case N_LOWER:
            for (size_t i = 0; i < cur.n && !rc;) {
                if ((uint8_t)cur.p[i] < 0x80) { char c = cur.p[i]; if (c >= 'A' && c <= 'Z') c += 32; rc = buf_add(&nxt, &c, 1); i++; continue; }
                int l;
                uint32_t c = utf8_next(cur.p, cur.n, i, &l);
                rc = lower_cp(&nxt, c);
                i += (size_t)l;
            }
            break;
        case N_STRIP_ACCENTS: case N_NMT: rc = filter_chars(cur.p, cur.n, (int)x->type, &nxt, lead_removed); break;
        case N_BERT: rc = bert_normalize(x, cur.p, cur.n, &nxt, lead_removed); break;
        case N_BYTELEVEL:
            rc = map_bytes(t, &nxt, cur.p, cur.n);
            break;
        }
        struct buf tmp = cur; cur = nxt; nxt = tmp;
    }
    if (md) pcre2_match_data_free(md);
    free(m.v);
    free(nxt.p);
    if (rc) { free(cur.p); return rc; }
    b->n = 0;
    rc = buf_add(b, cur.p ? cur.p : "", cur.n);
    free(cur.p);
    return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* encoding: pre-tokenizers                                                                         */

static int segs_add(struct segs *s, size_t a, size_t b, int m) {
    if (s->n == s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 64;
        struct seg *nv = realloc(s->v, nc * sizeof *nv);
        if (!nv) return mb_fail(MB_ENOMEM, "tokenizer: out of memory");
        s->v = nv;
        s->cap = nc;
    }
    s->v[s->n++] = (struct seg){a, b, m};
    return 0;
}

/* The library's NormalizedString::split of the piece [a, b) given its matches m (absolute offsets, in
 * order, possibly empty): the pieces kept, appended to out (empty ones dropped, as PreTokenizedString does) */
static int split_piece(struct scratch *sc, size_t a, size_t b, enum split_behavior beh, int invert, struct spans *out) {
    struct segs *alt = &sc->alt, *acc = &sc->acc;
    const struct spans *m = &sc->m;
    int rc = 0;
    alt->n = acc->n = 0;
    size_t prev = a;
    if (beh == B_ISOLATED || beh == B_REMOVED) { /* no folding: the pieces straight from the matches */
        int keep_match = beh == B_ISOLATED || invert, keep_gap = beh == B_ISOLATED || !invert;
        for (size_t i = 0; i < m->n && !rc; i++) {
            if (keep_gap && m->v[i].a > prev) rc = spans_add(out, prev, m->v[i].a);
            if (!rc && keep_match && m->v[i].b > m->v[i].a) rc = spans_add(out, m->v[i].a, m->v[i].b);
            prev = m->v[i].b;
        }
        if (!rc && keep_gap && b > prev) rc = spans_add(out, prev, b);
        return rc;
    }
    for (size_t i = 0; i < m->n && !rc; i++) {
        if (prev != m->v[i].a) rc = segs_add(alt, prev, m->v[i].a, 0);
        if (!rc) rc = segs_add(alt, m->v[i].a, m->v[i].b, 1);
        prev = m->v[i].b;
    }
    if (!rc && prev != b) rc = segs_add(alt, prev, b, 0);
    if (rc) return rc;
    if (invert) for (size_t i = 0; i < alt->n; i++) alt->v[i].m = !alt->v[i].m;
    switch (beh) {
    case B_ISOLATED:
        for (size_t i = 0; i < alt->n && !rc; i++) if (alt->v[i].b > alt->v[i].a) rc = spans_add(out, alt->v[i].a, alt->v[i].b);
        return rc;
    case B_REMOVED:
        for (size_t i = 0; i < alt->n && !rc; i++) if (!alt->v[i].m && alt->v[i].b > alt->v[i].a) rc = spans_add(out, alt->v[i].a, alt->v[i].b);
        return rc;
    case B_CONTIGUOUS: {
        int pm = 0;
        for (size_t i = 0; i < alt->n && !rc; i++) {
            if (alt->v[i].m == pm && acc->n > 0) acc->v[acc->n - 1].b = alt->v[i].b;
            else rc = segs_add(acc, alt->v[i].a, alt->v[i].b, 0);
            pm = alt->v[i].m;
        }
        break;
    }
    case B_MERGED_PREV: {
        int pm = 0;
        for (size_t i = 0; i < alt->n && !rc; i++) {
            if (alt->v[i].m && !pm && acc->n > 0) acc->v[acc->n - 1].b = alt->v[i].b;
            else rc = segs_add(acc, alt->v[i].a, alt->v[i].b, 0);
            pm = alt->v[i].m;
        }
        break;
    }
    case B_MERGED_NEXT: { /* the same fold from the right, built reversed */
        int pm = 0;
        for (size_t i = alt->n; i-- > 0 && !rc;) {
            if (alt->v[i].m && !pm && acc->n > 0) acc->v[acc->n - 1].a = alt->v[i].a;
            else rc = segs_add(acc, alt->v[i].a, alt->v[i].b, 0);
            pm = alt->v[i].m;
        }
        for (size_t i = 0; i < acc->n / 2; i++) { struct seg x = acc->v[i]; acc->v[i] = acc->v[acc->n - 1 - i]; acc->v[acc->n - 1 - i] = x; }
        break;
    }
    }
    for (size_t i = 0; i < acc->n && !rc; i++) if (acc->v[i].b > acc->v[i].a) rc = spans_add(out, acc->v[i].a, acc->v[i].b);
    return rc;
}

static int char_in_class(const struct pre *p, uint32_t c) {
    switch (p->cls) {
    case C_NUMERIC: return is_numeric(c);
    case C_PUNCT: return is_punct(c);
    case C_WHITE: return is_white(c);
    case C_CHAR: return c == p->ch;
    }
    return 0;
}

static int match_data_for(struct scratch *sc, const pcre2_code *re) {
    if (sc->md) pcre2_match_data_free(sc->md);
    sc->md = pcre2_match_data_create_from_pattern(re, NULL);
    return sc->md ? 0 : mb_fail(MB_ENOMEM, "out of memory");
}

/* matches of a pattern inside work[a, b), as absolute offsets in sc->m */
static int find_in(const struct mb_tokenizer *t, const struct pat *p, const char *work, size_t a, size_t b, struct scratch *sc) {
    sc->m.n = 0;
    int rc = pat_find(p, work + a, b - a, sc->md, t->mctx, &sc->m);
    for (size_t i = 0; i < sc->m.n; i++) { sc->m.v[i].a += a; sc->m.v[i].b += a; }
    return rc;
}

/* Pre-tokenize the normalized text s[0, n): the pieces as spans of *work (which holds the text as the last
 * step left it: Metaspace replacements, byte-level characters). orig0: s starts at offset 0 of the
 * original text (Metaspace prepend_scheme "first"). */
static int pretokenize(const struct mb_tokenizer *t, const char *s, size_t n, int orig0, struct scratch *sc, struct buf *work, struct spans *cur) {
    struct buf nb = {0};
    struct spans nxt = {0};
    int rc = 0;
    work->n = 0;
    cur->n = 0;
    if ((rc = buf_add(work, s, n))) return rc;
    if (n > 0 && (rc = spans_add(cur, 0, n))) return rc;
    for (int k = 0; k < t->n_pres && !rc; k++) {
        const struct pre *p = &t->pres[k];
        nxt.n = 0;
        if (p->pat.re && (rc = match_data_for(sc, p->pat.re))) break;
        if (p->type == P_BYTELEVEL || p->type == P_METASPACE) { /* these rewrite the text: build a new work buffer */
            nb.n = 0;
            if ((rc = buf_add(&nb, "", 0))) break;
            for (size_t i = 0; i < cur->n && !rc; i++) {
                const char *w = work->p + cur->v[i].a;
                size_t wn = cur->v[i].b - cur->v[i].a;
                if (p->type == P_METASPACE) {
                    size_t start = nb.n;
                    int starts = w[0] == ' ' || (wn >= p->repl_len && !memcmp(w, p->repl, p->repl_len));
                    if (!starts && (p->prepend_scheme == 2 || (p->prepend_scheme == 1 && orig0 && cur->v[i].a == 0))) rc = buf_add(&nb, p->repl, p->repl_len);
                    for (size_t j = 0; j < wn && !rc;) {
                        size_t e = j;
                        while (e < wn && w[e] != ' ') e++;
                        rc = buf_add(&nb, w + j, e - j);
                        if (!rc && e < wn) rc = buf_add(&nb, p->repl, p->repl_len);
                        j = e + 1;
                    }
                    if (rc) break;
                    if (p->split) { /* each replacement character merged with what follows it */
                        sc->m.n = 0;
                        for (size_t j = start; j + p->repl_len <= nb.n && !rc;) {
                            if (!memcmp(nb.p + j, p->repl, p->repl_len)) { rc = spans_add(&sc->m, j, j + p->repl_len); j += p->repl_len; }
                            else j++;
                        }
                        if (!rc) rc = split_piece(sc, start, nb.n, B_MERGED_NEXT, 0, &nxt);
                    } else if (nb.n > start) rc = spans_add(&nxt, start, nb.n);
                } else { /* ByteLevel: optional prefix space, the GPT-2 regex, then bytes -> characters */
                    const char *x = w;
                    size_t xn = wn;
                    if (p->add_prefix_space && w[0] != ' ') {
                        sc->tmp.n = 0;
                        if ((rc = buf_add(&sc->tmp, " ", 1)) || (rc = buf_add(&sc->tmp, w, wn))) break;
                        x = sc->tmp.p;
                        xn = sc->tmp.n;
                    }
                    sc->m.n = 0;
                    if (p->use_regex) {
                        if ((rc = find_in(t, &p->pat, x, 0, xn, sc))) break;
                        sc->sub.n = 0;
                        rc = split_piece(sc, 0, xn, B_ISOLATED, 0, &sc->sub);
                        for (size_t j = 0; j < sc->sub.n && !rc; j++) {
                            size_t st = nb.n;
                            rc = map_bytes(t, &nb, x + sc->sub.v[j].a, sc->sub.v[j].b - sc->sub.v[j].a);
                            if (!rc) rc = spans_add(&nxt, st, nb.n);
                        }
                    } else {
                        size_t st = nb.n;
                        rc = map_bytes(t, &nb, x, xn);
                        if (!rc) rc = spans_add(&nxt, st, nb.n);
                    }
                }
            }
            struct buf tb = *work; *work = nb; nb = tb;
        } else {
            for (size_t i = 0; i < cur->n && !rc; i++) {
                size_t a = cur->v[i].a, b = cur->v[i].b;
                if (p->type == P_SPLIT) {
                    if (!(rc = find_in(t, &p->pat, work->p, a, b, sc))) rc = split_piece(sc, a, b, p->behavior, p->invert, &nxt);
                } else if (p->type == P_CHARS) {
                    sc->m.n = 0;
                    for (size_t j = a; j < b && !rc;) {
                        int l;
                        uint32_t c = utf8_next(work->p, b, j, &l);
                        if (char_in_class(p, c)) rc = spans_add(&sc->m, j, j + (size_t)l);
                        j += (size_t)l;
                    }
                    if (!rc) rc = split_piece(sc, a, b, p->behavior, 0, &nxt);
                } else if (p->type == P_WHITESPACE) { /* \w+|[^\w\s]+, the rest removed */
                    size_t st = a;
                    int cls = -1; /* 0 whitespace, 1 word, 2 other */
                    for (size_t j = a; j < b && !rc;) {
                        int l;
                        uint32_t c = utf8_next(work->p, b, j, &l);
                        int k2 = is_word(c) ? 1 : is_white(c) ? 0 : 2;
                        if (k2 != cls) {
                            if (cls > 0) rc = spans_add(&nxt, st, j);
                            st = j;
                            cls = k2;
                        }
                        j += (size_t)l;
                    }
                    if (!rc && cls > 0) rc = spans_add(&nxt, st, b);
                } else { /* P_FIXED: pieces of `length` characters */
                    size_t st = a, cnt = 0;
                    for (size_t j = a; j < b && !rc;) {
                        int l;
                        utf8_next(work->p, b, j, &l);
                        j += (size_t)l;
                        if (++cnt == p->length) { rc = spans_add(&nxt, st, j); st = j; cnt = 0; }
                    }
                    if (!rc && st < b) rc = spans_add(&nxt, st, b);
                }
            }
        }
        struct spans tmp = *cur; *cur = nxt; nxt = tmp;
    }
    free(nb.p);
    free(nxt.v);
    return rc;
}

/* pre-tokenize + BPE a normalized piece */
static int encode_normalized(struct mb_tokenizer *t, const char *s, size_t n, int orig0, struct scratch *sc, struct ids *out) {
    if (n == 0) return 0;
    if (t->n_pres == 0) return bpe_pretoken(t, s, n, sc, out);
    struct buf work = {0};
    struct spans cur = {0};
    int rc = pretokenize(t, s, n, orig0, sc, &work, &cur);
    for (size_t i = 0; i < cur.n && !rc; i++) rc = bpe_pretoken(t, work.p + cur.v[i].a, cur.v[i].b - cur.v[i].a, sc, out);
    free(work.p);
    free(cur.v);
    return rc;
}

/* the character before s[i] / at s[i], for the added tokens' word and space tests */
static uint32_t cp_before(const char *s, size_t i) {
    size_t p = i - 1;
    while (p > 0 && ((uint8_t)s[p] & 0xc0) == 0x80) p--;
    int l;
    return utf8_next(s, i, p, &l);
}

/* The next added-token match of pass `pass` in s[lo, n) (the library's leftmost-longest automaton, a match
 * failing single_word is dropped and the search goes on after it): returns 1 and the span (extended by
 * lstrip / rstrip) */
static int find_added(const struct mb_tokenizer *t, int pass, const char *s, size_t lo, size_t n, size_t *ms, size_t *me, int32_t *id) {
    size_t i = lo;
    if (t->cand_start[pass][256] == t->cand_start[pass][0]) return 0; /* none in this pass */
    const uint8_t *first = t->added_first[pass];
    while (i < n) {
        while (i < n && !first[(uint8_t)s[i]]) i++;
        if (i == n) break;
        uint8_t c = (uint8_t)s[i];
        int32_t k0 = t->cand_start[pass][c], k1 = t->cand_start[pass][c + 1];
        const struct added *a = NULL;
        for (int32_t k = k0; k < k1; k++) { /* longest first */
            const struct added *x = &t->added[t->cand[k]];
            if (x->n <= n - i && !memcmp(s + i, x->s, x->n)) { a = x; break; }
        }
        if (!a) { i++; continue; }
        size_t b = i, e = i + a->n;
        int l;
        if (a->single_word && ((b > 0 && is_word(cp_before(s, b))) || (e < n && is_word(utf8_next(s, n, e, &l))))) { i = e; continue; }
        if (a->lstrip) while (b > lo && is_white(cp_before(s, b))) { size_t p = b - 1; while (p > 0 && ((uint8_t)s[p] & 0xc0) == 0x80) p--; b = p; }
        if (a->rstrip) while (e < n && is_white(utf8_next(s, n, e, &l))) e += (size_t)l;
        *ms = b;
        *me = e;
        *id = a->id;
        return 1;
    }
    return 0;
}

/* one raw segment (no non-normalized added tokens inside): normalize, split normalized added tokens, encode.
 * allow_prepend: the Prepend normalizer applies (not a stream continuation); orig0: the segment starts the
 * text */
static int encode_segment(struct mb_tokenizer *t, const char *s, size_t n, int allow_prepend, int orig0, int literal, struct scratch *sc, struct ids *out) {
    struct buf nb = {0};
    int lead_removed;
    int rc = normalize(t, s, n, allow_prepend, &nb, &lead_removed);
    if (rc) { free(nb.p); return rc; }
    size_t pos = 0, ms, me;
    int32_t id;
    while (!rc && pos < nb.n) {
        int o0 = orig0 && pos == 0 && !lead_removed;
        if (!literal && find_added(t, 1, nb.p, pos, nb.n, &ms, &me, &id)) {
            rc = encode_normalized(t, nb.p + pos, ms - pos, o0, sc, out);
            if (!rc) rc = ids_push(out, id);
            pos = me;
        } else {
            rc = encode_normalized(t, nb.p + pos, nb.n - pos, o0, sc, out);
            pos = nb.n;
        }
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

/* encode text; `continuation`: this text continues an earlier chunk (no Prepend on its first segment, and it
 * does not start the text) */
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
            if (ms > pos) rc = encode_segment(t, text + pos, ms - pos, !(first && continuation), pos == 0 && !continuation, literal, &sc, out);
            if (!rc) rc = ids_push(out, id);
            pos = me;
        } else {
            rc = encode_segment(t, text + pos, len - pos, !(first && continuation), pos == 0 && !continuation, literal, &sc, out);
            pos = len;
        }
        first = 0;
    }
    scratch_free(&sc);
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

int mb_tokenizer_normalize(const struct mb_tokenizer *t, const char *text, size_t len, char **out, size_t *out_len) {
    size_t bad;
    *out = NULL;
    if (!validate_utf8(text, len, &bad)) return mb_fail(MB_EINVAL, "text is not valid UTF-8 (byte offset %zu)", bad);
    struct buf b = {0};
    int lead;
    int rc = normalize(t, text, len, 1, &b, &lead);
    if (!rc) rc = buf_add(&b, "", 0);
    if (rc) { free(b.p); return rc; }
    *out = b.p;
    if (out_len) *out_len = b.n;
    return 0;
}

int mb_tokenizer_pretokenize(const struct mb_tokenizer *t, const char *text, size_t len, char **out, size_t **ends, int64_t *n) {
    size_t bad;
    *out = NULL;
    *ends = NULL;
    *n = 0;
    if (!validate_utf8(text, len, &bad)) return mb_fail(MB_EINVAL, "text is not valid UTF-8 (byte offset %zu)", bad);
    struct scratch sc = {0};
    struct buf work = {0}, o = {0};
    struct spans cur = {0};
    int rc = pretokenize(t, text, len, 1, &sc, &work, &cur);
    size_t *e = rc ? NULL : malloc((cur.n ? cur.n : 1) * sizeof *e);
    if (!rc && !e) rc = mb_fail(MB_ENOMEM, "out of memory");
    if (!rc) rc = buf_add(&o, "", 0);
    for (size_t i = 0; i < cur.n && !rc; i++) {
        rc = buf_add(&o, work.p + cur.v[i].a, cur.v[i].b - cur.v[i].a);
        e[i] = o.n;
    }
    scratch_free(&sc);
    free(work.p);
    free(cur.v);
    if (rc) { free(o.p); free(e); return rc; }
    *out = o.p;
    *ends = e;
    *n = (int64_t)cur.n;
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* files                                                                                            */

/* Piece size of mb_tokenize_stream; a variable so that tests can make it small (test hook, not API). */
size_t mb__tokenize_chunk = (size_t)1 << 20;
#define MB_TOK_MAX_TEXT ((size_t)1 << 31) /* bytes read before a cut point (or the whole text) must appear */

/* a cut point: after "X\nY", X and Y printable non-space ASCII (see stream_check) */
static int is_graph(char c) { return c > 0x20 && c < 0x7f; }

/* gzread with the errors zlib keeps to itself: a stream cut short reads as a plain end of file unless asked */
static int gz_read(gzFile f, const char *path, char *dst, unsigned n, int *rc) {
    int r = gzread(f, dst, n);
    if (r < 0) {
        int e;
        *rc = mb_fail(MB_EIO, "%s: read error: %s", path, gzerror(f, &e));
        return 0;
    }
    if (r == 0) {
        int e = Z_OK;
        const char *msg = gzerror(f, &e);
        if (e == Z_BUF_ERROR) *rc = mb_fail(MB_EFORMAT, "%s: truncated gzip data (%s)", path, msg && msg[0] ? msg : "unexpected end of file");
        else if (e != Z_OK) *rc = mb_fail(MB_EIO, "%s: read error: %s", path, msg);
    }
    return r;
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
    int fd;
    if ((rc = mb_open_regular(path, &fd, NULL))) { free(ids); return rc; } /* FIFOs and devices refused without blocking */
    gzFile f = gzdopen(fd, "rb");
    if (!f) { close(fd); free(ids); return mb_fail(MB_ENOMEM, "%s: cannot open: out of memory", path); }
    const size_t CHUNK = mb__tokenize_chunk ? mb__tokenize_chunk : 1;
    const unsigned READ = 1u << 20;
    struct buf b = {0};
    int eof = 0, first = 1;
    int64_t line_base = 1;
    while (!rc && !(eof && b.n == 0)) {
        /* fill to CHUNK (streamable) or to the end (not streamable), reading at most MB_TOK_MAX_TEXT */
        while (!eof && (b.n < CHUNK || !t->streamable)) {
            if (b.n > MB_TOK_MAX_TEXT) { rc = mb_fail(MB_EINVAL, "%s: more than %zu bytes of text for a tokenizer that must read it whole", path, MB_TOK_MAX_TEXT); break; }
            if ((rc = buf_reserve(&b, READ))) break;
            int r = gz_read(f, path, b.p + b.n, READ, &rc);
            if (rc) break;
            if (r == 0) eof = 1;
            b.n += (size_t)r;
            b.p[b.n] = 0;
        }
        if (rc) break;
        size_t cut = b.n;
        if (!eof) {
            cut = 0;
            for (size_t i = b.n - 1; i >= 2; i--)
                if (b.p[i - 1] == '\n' && is_graph(b.p[i]) && is_graph(b.p[i - 2])) { cut = i; break; }
            if (cut == 0) { /* no cut point in the whole buffer: read more */
                if (b.n > MB_TOK_MAX_TEXT) { rc = mb_fail(MB_EINVAL, "%s: no usable line break in %zu bytes of text", path, MB_TOK_MAX_TEXT); break; }
                if ((rc = buf_reserve(&b, READ))) break;
                int r = gz_read(f, path, b.p + b.n, READ, &rc);
                if (rc) break;
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
    int cr = gzclose_r(f); /* Z_BUF_ERROR: the last read ended inside a gzip stream */
    if (!rc && cr == Z_BUF_ERROR) rc = mb_fail(MB_EFORMAT, "%s: truncated gzip data", path);
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
/* decoding: the decoder chain on the tokens' strings                                                */

struct strs { struct buf *v; size_t n, cap; };
static void strs_free(struct strs *s) {
    for (size_t i = 0; i < s->cap; i++) free(s->v[i].p);
    free(s->v);
    memset(s, 0, sizeof *s);
}
/* append an empty string */
static struct buf *strs_new(struct strs *s) {
    if (s->n == s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 16;
        struct buf *nv = realloc(s->v, nc * sizeof *nv);
        if (!nv) { mb_fail(MB_ENOMEM, "out of memory"); return NULL; }
        memset(nv + s->cap, 0, (nc - s->cap) * sizeof *nv);
        s->v = nv;
        s->cap = nc;
    }
    struct buf *b = &s->v[s->n++];
    b->n = 0;
    if (buf_add(b, "", 0)) return NULL;
    return b;
}

/* Rust's str::replace (an empty pattern inserts `rep` at every character boundary, both ends included) */
static int replace_all(struct buf *o, const char *s, size_t n, const char *pat, size_t pn, const char *rep, size_t rn) {
    int rc = 0;
    if (pn == 0) {
        for (size_t i = 0; i < n && !rc;) {
            int l;
            utf8_next(s, n, i, &l);
            rc = buf_add(o, rep, rn);
            if (!rc) rc = buf_add(o, s + i, (size_t)l);
            i += (size_t)l;
        }
        return rc ? rc : buf_add(o, rep, rn);
    }
    size_t i = 0;
    while (!rc && i < n) {
        const char *hit = n - i >= pn ? memmem(s + i, n - i, pat, pn) : NULL;
        if (!hit) return buf_add(o, s + i, n - i);
        rc = buf_add(o, s + i, (size_t)(hit - (s + i)));
        if (!rc) rc = buf_add(o, rep, rn);
        i = (size_t)(hit - s) + pn;
    }
    return rc;
}

/* the WordPiece decoder's cleanup of tokenization spaces */
static int wp_cleanup(struct buf *b) {
    static const char *rules[][2] = {{" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"}, {" n't", "n't"}, {" 'm", "'m"},
                                     {" do not", " don't"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
    int rc = 0;
    for (size_t r = 0; r < sizeof rules / sizeof *rules && !rc; r++) {
        struct buf o = {0};
        rc = buf_add(&o, "", 0);
        if (!rc) rc = replace_all(&o, b->p, b->n, rules[r][0], strlen(rules[r][0]), rules[r][1], strlen(rules[r][1]));
        if (rc) { free(o.p); break; }
        free(b->p);
        *b = o;
    }
    return rc;
}

/* String::from_utf8_lossy: each maximal invalid subsequence becomes U+FFFD */
static int utf8_lossy(struct buf *o, const uint8_t *s, size_t n) {
    int rc = 0;
    for (size_t i = 0; i < n && !rc;) {
        uint8_t c = s[i];
        if (c < 0x80) { rc = buf_add(o, s + i, 1); i++; continue; }
        int need;
        uint8_t lo = 0x80, hi = 0xbf;
        if (c >= 0xc2 && c <= 0xdf) need = 1;
        else if (c >= 0xe0 && c <= 0xef) { need = 2; if (c == 0xe0) lo = 0xa0; if (c == 0xed) hi = 0x9f; }
        else if (c >= 0xf0 && c <= 0xf4) { need = 3; if (c == 0xf0) lo = 0x90; if (c == 0xf4) hi = 0x8f; }
        else { rc = buf_add(o, "\xef\xbf\xbd", 3); i++; continue; }
        size_t k = 1;
        while ((int)k <= need && i + k < n) {
            uint8_t d = s[i + k];
            if (k == 1 ? (d < lo || d > hi) : (d < 0x80 || d > 0xbf)) break;
            k++;
        }
        if ((int)k == need + 1) rc = buf_add(o, s + i, k);
        else rc = buf_add(o, "\xef\xbf\xbd", 3);
        i += k;
    }
    return rc;
}

/* one decoder step: in -> out (out is empty on entry) */
static int decode_step(const struct mb_tokenizer *t, const struct dec *d, struct strs *in, struct strs *out) {
    int rc = 0;
    struct buf *o;
    switch (d->type) {
    case D_FUSE:
        if (!(o = strs_new(out))) return MB_ENOMEM;
        for (size_t i = 0; i < in->n && !rc; i++) rc = buf_add(o, in->v[i].p, in->v[i].n);
        return rc;
    case D_BYTELEVEL: {
        struct buf raw = {0};
        for (size_t i = 0; i < in->n && !rc; i++) {
            const char *s = in->v[i].p;
            size_t n = in->v[i].n, st = raw.n;
            int ok = 1;
            for (size_t j = 0; j < n && !rc;) {
                int l;
                uint32_t c = utf8_next(s, n, j, &l);
                if (c >= 512 || t->cp2byte[c] < 0) { ok = 0; break; }
                char bb = (char)t->cp2byte[c];
                rc = buf_add(&raw, &bb, 1);
                j += (size_t)l;
            }
            if (!rc && !ok) { raw.n = st; rc = buf_add(&raw, s, n); } /* not all byte-level characters: the raw token */
        }
        if (!rc && !(o = strs_new(out))) rc = MB_ENOMEM;
        if (!rc) rc = utf8_lossy(o, (const uint8_t *)(raw.p ? raw.p : ""), raw.n);
        free(raw.p);
        return rc;
    }
    case D_BYTEFALLBACK: {
        struct buf bytes = {0};
        for (size_t i = 0; i <= in->n && !rc; i++) {
            int bv = i < in->n ? byte_token(in->v[i].p, in->v[i].n) : -1;
            if (bv >= 0) { char c = (char)bv; rc = buf_add(&bytes, &c, 1); continue; }
            if (bytes.n > 0) { /* the pending bytes: their text if valid UTF-8, else one U+FFFD per byte */
                size_t bad;
                if (validate_utf8(bytes.p, bytes.n, &bad)) { if (!(o = strs_new(out))) rc = MB_ENOMEM; else rc = buf_add(o, bytes.p, bytes.n); }
                else for (size_t k = 0; k < bytes.n && !rc; k++) { if (!(o = strs_new(out))) rc = MB_ENOMEM; else rc = buf_add(o, "\xef\xbf\xbd", 3); }
                bytes.n = 0;
            }
            if (!rc && i < in->n) { if (!(o = strs_new(out))) rc = MB_ENOMEM; else rc = buf_add(o, in->v[i].p, in->v[i].n); }
        }
        free(bytes.p);
        return rc;
    }
    default: break;
    }
    /* token by token */
    size_t last = in->n;
    for (size_t i = 0; i < in->n && !rc; i++) {
        const char *s = in->v[i].p;
        size_t n = in->v[i].n;
        if (d->type == D_CTC && i > 0 && in->v[i - 1].n == n && !memcmp(in->v[i - 1].p, s, n)) continue; /* dedup */
        if (!(o = strs_new(out))) return MB_ENOMEM;
        switch (d->type) {
        case D_METASPACE:
            for (size_t j = 0; j < n && !rc;) {
                int l;
                uint32_t c = utf8_next(s, n, j, &l);
                if (c == d->ch) { if (!(i == 0 && d->flag)) rc = buf_add(o, " ", 1); }
                else rc = buf_add(o, s + j, (size_t)l);
                j += (size_t)l;
            }
            break;
        case D_STRIP: {
            size_t a = 0, e = n, cnt = 0;
            int l;
            while (cnt < d->start && a < n && utf8_next(s, n, a, &l) == d->ch) { a += (size_t)l; cnt++; }
            cnt = 0;
            while (cnt < d->stop && e > 0) {
                size_t p = e - 1;
                while (p > 0 && ((uint8_t)s[p] & 0xc0) == 0x80) p--;
                if (utf8_next(s, n, p, &l) != d->ch) break;
                e = p;
                cnt++;
            }
            if (e > a) rc = buf_add(o, s + a, e - a);
            break;
        }
        case D_REPLACE: {
            struct spans m = {0};
            pcre2_match_data *md = d->pat.re ? pcre2_match_data_create_from_pattern(d->pat.re, NULL) : NULL;
            if (d->pat.re && !md) { rc = mb_fail(MB_ENOMEM, "out of memory"); break; }
            if (n > 0) rc = pat_find(&d->pat, s, n, md, t->mctx, &m); /* an empty token has no match */
            size_t prev = 0;
            for (size_t k = 0; k < m.n && !rc; k++) {
                rc = buf_add(o, s + prev, m.v[k].a - prev);
                if (!rc) rc = buf_add(o, d->s, d->slen);
                prev = m.v[k].b;
            }
            if (!rc) rc = buf_add(o, s + prev, n - prev);
            free(m.v);
            if (md) pcre2_match_data_free(md);
            break;
        }
        case D_WORDPIECE:
            if (i != 0) {
                if (n >= d->slen && !memcmp(s, d->s, d->slen)) { s += d->slen; n -= d->slen; }
                else rc = buf_add(o, " ", 1);
            }
            if (!rc) rc = buf_add(o, s, n);
            if (!rc && d->flag) rc = wp_cleanup(o);
            break;
        case D_BPE:
            rc = replace_all(o, s, n, d->s, d->slen, i + 1 == last ? "" : " ", i + 1 == last ? 0 : 1);
            break;
        case D_CTC: {
            rc = replace_all(o, s, n, d->s, d->slen, "", 0);
            if (!rc && d->flag) {
                rc = wp_cleanup(o);
                struct buf r = {0};
                if (!rc) rc = buf_add(&r, "", 0);
                if (!rc) rc = replace_all(&r, o->p, o->n, d->s2, d->s2len, " ", 1);
                if (!rc) { free(o->p); *o = r; } else free(r.p);
            }
            if (!rc && o->n == 0) out->n--; /* empty tokens are dropped */
            break;
        }
        default: break;
        }
    }
    return rc;
}

/* the string the library's decode starts from: the added token's (normalized) text, else the vocab's */
static void token_text(const struct mb_tokenizer *t, int32_t id, const char **s, size_t *n) {
    *s = t->tok[id];
    *n = t->toklen[id];
    if (t->is_added[id] == 2)
        for (int k = 0; k < t->n_added; k++)
            if (t->added[k].id == id) { *s = t->added[k].s; *n = t->added[k].n; break; }
}

int mb_detokenize(const struct mb_tokenizer *t, const int32_t *ids, int64_t n, char **text) {
    struct strs a = {0}, b = {0};
    int rc = 0;
    *text = NULL;
    for (int64_t i = 0; i < n && !rc; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->vocab_n || !t->tok[id]) { rc = mb_fail(MB_EINVAL, "id %d is not in the vocabulary", id); break; }
        const char *s;
        size_t l;
        token_text(t, id, &s, &l);
        struct buf *o = strs_new(&a);
        rc = o ? buf_add(o, s, l) : MB_ENOMEM;
    }
    for (int k = 0; k < t->n_decs && !rc; k++) {
        b.n = 0;
        rc = decode_step(t, &t->decs[k], &a, &b);
        struct strs tmp = a; a = b; b = tmp;
    }
    struct buf o = {0};
    if (!rc) rc = buf_add(&o, "", 0);
    for (size_t i = 0; i < a.n && !rc; i++) { /* no decoder: tokens joined by spaces */
        if (i > 0 && !t->has_decoder) rc = buf_add(&o, " ", 1);
        if (!rc) rc = buf_add(&o, a.v[i].p, a.v[i].n);
    }
    strs_free(&a);
    strs_free(&b);
    if (rc) { free(o.p); return rc; }
    *text = o.p;
    return 0;
}

/* test hook (not API): whether mb_tokenize_stream cuts texts for this tokenizer */
int mb__tokenizer_streamable(const struct mb_tokenizer *t);
int mb__tokenizer_streamable(const struct mb_tokenizer *t) { return t->streamable; }
