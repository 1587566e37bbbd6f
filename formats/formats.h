/* formats/formats.h: readers and writers of the files mixbit consumes and produces.
 *
 * safetensors byte layout (https://github.com/huggingface/safetensors, as validated here):
 *
 *   [0, 8)          u64 little-endian N: length of the JSON header
 *   [8, 8+N)        UTF-8 JSON object, optionally padded with spaces:
 *                   { "__metadata__": {str: str, ...},                       (optional)
 *                     "<tensor name>": { "dtype": "F32"|"F16"|..., "shape": [d0, d1, ...],
 *                                        "data_offsets": [begin, end] }, ... }
 *   [8+N, EOF)      data area; each tensor's bytes are data[begin, end), row-major, little-endian.
 *
 * Rules enforced by the reader: N within the file and <= 100 MB, the header is a JSON object without
 * duplicate keys, every entry has exactly the right types (dtype a known string, shape an array of
 * non-negative integers, data_offsets two integers with begin <= end), offsets inside the data area, the
 * entries tile the data area exactly (no overlap, no hole, nothing after the last one), and
 * end - begin == product(shape) * dtype size, computed with overflow checks. __metadata__ maps string to
 * string. Any violation is an MB_EFORMAT naming the file and the tensor.
 *
 * Sharded checkpoints: "<base>.safetensors.index.json" = {"metadata": {...}, "weight_map": {tensor: file}}.
 *
 * Also here: config.json (model description), tokenizer.json (BPE), text datasets.
 */
#ifndef MB_FORMATS_H
#define MB_FORMATS_H

#include "../core/core.h"

/* A JSON value's kind for messages ("an object", "a list", "a string", "an integer", ...) */
struct json_t;
const char *mb_json_kind(const struct json_t *v);

/* ------------------------------------------------------------------------------------------------ */
/* dtypes                                                                                           */

enum mb_dtype { MB_F64, MB_F32, MB_F16, MB_BF16, MB_I64, MB_I32, MB_I16, MB_I8, MB_U8, MB_BOOL, MB_DTYPE_COUNT };

size_t mb_dtype_size(enum mb_dtype t);
const char *mb_dtype_name(enum mb_dtype t);
/* Parse a safetensors dtype string; returns 0 or MB_EFORMAT (no message set). */
int mb_dtype_parse(const char *s, enum mb_dtype *out);

#define MB_MAX_DIMS 8

/* One tensor of a safetensors file: a borrowed, zero-copy view into the file's mapping (PyTorch .bin: into
 * the archive's mapping, or into a buffer the file owns). `data` stays valid until the owning file/set is
 * closed. */
struct mb_tensor_info {
    char *name;          /* owned by the file */
    enum mb_dtype dtype;
    int ndim;
    int64_t shape[MB_MAX_DIMS];
    int64_t numel;
    size_t nbytes;
    size_t offset;       /* begin offset inside the data area (PyTorch: in the archive; 0 when owned) */
    const void *data;    /* borrowed view */
    const char *file;    /* path of the file holding it (borrowed) */
};

/* Convert a tensor (any float or integer dtype) to f32 / f16, writing numel elements to out. */
int mb_tensor_to_f32(const struct mb_tensor_info *t, float *out);
int mb_tensor_to_f16(const struct mb_tensor_info *t, uint16_t *out);
/* Convert elements [start, start+count) only (flat index). */
int mb_tensor_slice_to_f32(const struct mb_tensor_info *t, int64_t start, int64_t count, float *out);

/* ------------------------------------------------------------------------------------------------ */
/* safetensors reader                                                                               */

struct mb_st_file {
    char *path;
    void *map;            /* mmap of the whole file (NULL for parse-from-buffer) */
    size_t map_size;
    const uint8_t *data;  /* start of the data area */
    size_t data_size;
    size_t header_len;
    int n;                /* tensors, in header order */
    struct mb_tensor_info *t;
    int n_meta;
    char **meta_keys, **meta_vals;
    int n_owned;          /* PyTorch .bin: buffers holding inflated or re-strided tensors, freed by mb_st_close */
    void **owned;
};

/* Parse a complete safetensors image held in memory (buf, size). `name` is used in messages. Tensor views
 * point into buf, which must outlive the result. On success *out is owned by the caller (mb_st_close). */
int mb_st_parse(const char *name, const uint8_t *buf, size_t size, struct mb_st_file **out);
/* mmap and parse a file. */
int mb_st_open(const char *path, struct mb_st_file **out);
void mb_st_close(struct mb_st_file *f);
const struct mb_tensor_info *mb_st_file_find(const struct mb_st_file *f, const char *name);
const char *mb_st_meta(const struct mb_st_file *f, const char *key);

/* A checkpoint: one file, a sharded set with an index, or every *.safetensors of a directory (EXL2).
 * PyTorch .bin files (and pytorch_model.bin.index.json) are read by mb_torch_open into the same structures. */
struct mb_st_set {
    char *path;
    int n_files;
    struct mb_st_file **files;
    int n;                               /* all tensors */
    const struct mb_tensor_info **sorted; /* sorted by name */
};

/* Open `path`: a .safetensors or .bin file, a .index.json, or a directory (model.safetensors.index.json,
 * model.safetensors, all *.safetensors, then pytorch_model.bin.index.json, pytorch_model.bin). Duplicate
 * names across shards and index/file disagreements are errors. */
int mb_st_set_open(const char *path, struct mb_st_set **out);
void mb_st_set_close(struct mb_st_set *s);
const struct mb_tensor_info *mb_st_find(const struct mb_st_set *s, const char *name);
/* Same but records an error "tensor NAME not found in PATH" when missing. */
int mb_st_get(const struct mb_st_set *s, const char *name, const struct mb_tensor_info **out);

/* ------------------------------------------------------------------------------------------------ */
/* PyTorch checkpoints (torch.save, torch >= 1.6), read without running pickle (formats/torchbin.c)    */
/*
 * A zip archive (APPNOTE.TXT; members stored, as torch writes them, or deflated; zip64 records and extra
 * fields when present) whose members share one top folder PREFIX:
 *   PREFIX/data.pkl     pickle (protocol 2, as torch.save writes; protocols 3-5 opcodes accepted) of a
 *                       dict or collections.OrderedDict {name: tensor}
 *   PREFIX/data/KEY     raw little-endian bytes of storage KEY
 *   PREFIX/byteorder    optional, "little" (anything else is refused); other members are ignored
 * Each tensor is REDUCE(torch._utils._rebuild_tensor_v2, (storage, offset, size, stride, requires_grad,
 * OrderedDict() [, metadata])), optionally wrapped in _rebuild_parameter; the storage is a persistent id
 * ('storage', torch.<T>Storage, KEY, location, numel). The pickle is interpreted by a restricted machine:
 * only the opcodes torch emits, only the globals collections.OrderedDict, torch._utils._rebuild_tensor_v2,
 * _rebuild_parameter(_with_state), torch.{Float,Double,Half,BFloat16,Long,Int,Short,Char,Byte,Bool}Storage
 * and torch dtypes; any other global is refused by name when its opcode is read (nothing is ever called:
 * the machine only builds values). Bounded: pickle size, values, container items, memo, stack, nesting
 * depth; no recursion.
 * Checked: every zip offset and size against the file, member names (no absolute or '..' paths, no
 * duplicates), local against central headers, CRC-32 (skipped when 0: torch can save without it), deflate
 * output size, storage size == numel * element size, every element of every tensor inside its storage.
 * Tensors: contiguous ones are views into the mapping (or into the inflated storage); strided ones
 * (transposed, expanded) and ones not aligned to their element size are copied into owned contiguous
 * buffers; tensors sharing a storage (tied weights) share its bytes. Legacy files (torch < 1.6, not zip) are refused with a message saying so. */

/* Parse a complete archive held in memory (buf, size); `name` is used in messages. Views point into buf,
 * which must outlive the result; owned copies are freed by mb_st_close. MB_EFORMAT (malformed), or
 * MB_EUNSUPPORTED (legacy format, refused global, unsupported storage type or compression). */
int mb_torch_parse(const char *name, const uint8_t *buf, size_t size, struct mb_st_file **out);
/* mmap and parse a .bin file; the result is closed with mb_st_close. */
int mb_torch_open(const char *path, struct mb_st_file **out);
/* Whether a path names a PyTorch checkpoint by its extension (.bin, .pt, .pth). */
int mb_torch_path(const char *path);

/* ------------------------------------------------------------------------------------------------ */
/* safetensors writer                                                                               */

struct mb_st_entry {
    const char *name;
    enum mb_dtype dtype;
    int ndim;
    int64_t shape[MB_MAX_DIMS];
    const void *data; /* nbytes = numel * dtype size */
};

/* Write one file atomically (temporary name, fsync, rename). Header sorted by name, data in the same
 * order, header padded with spaces to a multiple of 8 bytes. meta: n_meta (key, value) pairs. */
int mb_st_write(const char *path, const struct mb_st_entry *e, int n, const char *const *meta_kv, int n_meta);

/* Write a checkpoint into dir as "<base>.safetensors" when it fits in max_shard_bytes (0: no limit), else
 * "<base>-0000i-of-0000N.safetensors" plus "<base>.safetensors.index.json". Each file is atomic; the index
 * is written last. *n_shards_out (optional) receives N. */
int mb_st_write_sharded(const char *dir, const char *base, const struct mb_st_entry *e, int n,
                        const char *const *meta_kv, int n_meta, size_t max_shard_bytes, int *n_shards_out);

/* ------------------------------------------------------------------------------------------------ */
/* config.json: model description                                                                   */

enum mb_arch { MB_ARCH_LLAMA, MB_ARCH_MISTRAL, MB_ARCH_MIXTRAL };
enum mb_rope_type { MB_ROPE_DEFAULT, MB_ROPE_LINEAR, MB_ROPE_LLAMA3 };

#define MB_SUPPORTED_ARCHS "LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM"

struct mb_config {
    enum mb_arch arch;
    char arch_name[64];
    int64_t hidden, n_layers, n_heads, n_kv_heads, head_dim, ffn, vocab, max_pos;
    double rms_eps, rope_theta;
    enum mb_rope_type rope_type;
    double rope_factor, rope_low_freq, rope_high_freq;
    int64_t rope_orig_max_pos;
    int64_t sliding_window; /* 0: none */
    int tied;
    int n_experts, n_experts_per_tok; /* 0 for dense */
    int attention_bias;
    int64_t bos_id, eos_id; /* -1 when absent */
    /* EXL2 quantization_config, when present */
    int is_exl2;
    double exl2_bits, exl2_head_bits;
};

/* Parse config.json text. `name` is used in messages. Every field read is checked for its type and range
 * (sizes, max_position_embeddings >= 2, rms_norm_eps in (0, 0.1], rope_theta in (1, 1e12], every
 * rope_scaling field, sliding_window, experts, bos/eos ids inside the vocabulary, booleans, strings);
 * each error is one MB_EFORMAT line naming the file and the field (MB_EUNSUPPORTED for an architecture
 * or feature mixbit does not handle). */
int mb_config_parse(const char *name, const char *text, size_t len, struct mb_config *c);
int mb_config_load(const char *path, struct mb_config *c);

/* Kinds of tensors a model has. */
enum mb_tkind { MB_T_EMBED, MB_T_NORM, MB_T_LINEAR, MB_T_ROUTER, MB_T_HEAD };

/* Linear layers of one decoder layer, in a fixed order. */
enum mb_proj { MB_P_Q, MB_P_K, MB_P_V, MB_P_O, MB_P_GATE, MB_P_UP, MB_P_DOWN, MB_P_COUNT };

/* One expected tensor (for a linear: the module name without ".weight"). */
struct mb_expect {
    char name[128];
    enum mb_tkind kind;
    int64_t rows, cols; /* weight shape [rows, cols] = [out, in]; norms: rows = n, cols = 0 */
    int layer;          /* -1 outside the decoder */
    int proj;           /* enum mb_proj for linears, -1 otherwise */
    int expert;         /* -1 when not an expert */
};

/* List every tensor a model with this config must have (owned array, free()). The head is listed even
 * when tied (kind MB_T_HEAD, flagged by cfg->tied). */
int mb_config_expected(const struct mb_config *c, struct mb_expect **out, int *n);
/* How many tensors mb_config_expected lists (the head included), without allocating; -1 outside the
 * parser's limits. mb_model_open compares it with the checkpoint before allocating the list. */
int64_t mb_config_n_expected(const struct mb_config *c);

/* A model on disk: config + checkpoint, checked against each other. */
struct mb_model {
    char dir[4096];
    struct mb_config cfg;
    struct mb_st_set *st;
    struct mb_expect *ex;
    int n_ex;
};

/* Open a model directory (or a single .safetensors file plus a config.json beside it). Every expected
 * tensor must be present with the expected shape and dtype class, and no unexpected tensor may exist
 * (rotary_emb.inv_freq buffers excepted). EXL2 directories are checked for the q_* tensors. */
int mb_model_open(const char *path, struct mb_model **out);
void mb_model_close(struct mb_model *m);
/* Name of the weight tensor of a linear (".weight" appended) for float checkpoints. */
const char *mb_proj_name(enum mb_proj p, int moe);

/* ------------------------------------------------------------------------------------------------ */
/* EXL2 tensors of one quantized linear layer: the layout and the view struct (struct mb_exl2_layer) are  */
/* defined once for C and CUDA in core/exl2_layout.h; here: validation, reading from a checkpoint, packing  */
/*
 * K not a multiple of 32 (e.g. stories260K's down_proj, K = 172): convert keeps such a layer F16 (ExLlamaV2's
 * kernels need K % 32 == 0). Reading still accepts the padded form older mixbit versions wrote: Kp = K rounded
 * up to 32 rows of zero weight, placed last in act order; q_invperm has Kp entries and the padding rows
 * (original index >= K) are dropped when unpacking.
 */
struct mb_exl2_packed { /* owned buffers */
    int64_t K, N, Np, G, P;
    int32_t *q_weight, *q_scale, *q_invperm;
    uint16_t *q_scale_max;
    int16_t *q_groups;
};
/* Check every structural rule (bit widths, group order, offsets, row counts, permutation). */
int mb_exl2_validate(const struct mb_exl2_layer *L, const char *name);
/* Dequantize to W^T [K, N] in original row order (f32, exact product of q and the fp16 scale). */
int mb_exl2_unpack_wt(const struct mb_exl2_layer *L, float *wt);
/* Views of module's q_* tensors in a checkpoint, validated. */
int mb_exl2_from_set(const struct mb_st_set *st, const char *module, int64_t N, int64_t K, struct mb_exl2_layer *L);
/* Dequantize a module to W [N, K] (Hugging Face layout). */
int mb_exl2_load_dense(const struct mb_st_set *st, const char *module, int64_t N, int64_t K, float *w);
/* Pack: K rows (a multiple of 32) in G groups; q [K, N] values in permuted row order, qs [G, N] sub-scales
 * in 1..16, scale_max [G] fp16 bits, perm [K] (packed row j = original row perm[j]). */
int mb_exl2_pack(int64_t K, int64_t N, int G, const int *group_bits, const int64_t *group_rows, const uint8_t *q, const uint8_t *qs,
                 const uint16_t *scale_max, const int32_t *perm, struct mb_exl2_packed *out);
void mb_exl2_packed_free(struct mb_exl2_packed *p);
void mb_exl2_packed_view(const struct mb_exl2_packed *p, struct mb_exl2_layer *L);

/* ------------------------------------------------------------------------------------------------ */
/* tokenizer.json                                                                                   */

struct mb_tokenizer;

/* Load tokenizer.json from a path, or from a model directory (plus tokenizer_config.json beside it for
 * add_bos_token / add_eos_token). Unsupported features are errors naming the feature. Supported: BPE models;
 * normalizers Sequence, Prepend, Replace, Strip, StripAccents, NFC, NFD, NFKC, NFKD, Lowercase, Nmt,
 * BertNormalizer, ByteLevel; pre-tokenizers Sequence, ByteLevel, Split, Metaspace, Digits, Punctuation,
 * Whitespace, WhitespaceSplit, BertPreTokenizer, CharDelimiterSplit, FixedLength; decoders Sequence,
 * ByteLevel, Metaspace, ByteFallback, Fuse, Strip, Replace, WordPiece, BPEDecoder, CTC; post-processors
 * TemplateProcessing, BertProcessing, RobertaProcessing, ByteLevel, Sequence (for BOS/EOS). */
int mb_tokenizer_load(const char *path, struct mb_tokenizer **out);
/* The same from tokenizer.json text in memory (len bytes; `name` is used in messages); config_path: a
 * tokenizer_config.json to read, or NULL. */
int mb_tokenizer_parse(const char *name, const char *json, size_t len, const char *config_path, struct mb_tokenizer **out);
void mb_tokenizer_free(struct mb_tokenizer *t);

/* Encode text (len bytes, UTF-8). Appends to *ids (realloc'd; *n and *cap updated). `add_special`:
 * add BOS/EOS as tokenizer_config.json says. `literal`: do not match special tokens in the text. */
int mb_tokenize(const struct mb_tokenizer *t, const char *text, size_t len, int add_special, int literal,
                int32_t **ids, int64_t *n, int64_t *cap);
/* Decode ids to text (malloc'd, NUL-terminated): the decoder chain, as the library's decode(ids, False). */
int mb_detokenize(const struct mb_tokenizer *t, const int32_t *ids, int64_t n, char **text);
/* For tests and diagnostics, as the library's normalizer.normalize_str / pre_tokenizer.pre_tokenize_str:
 * the normalized text (malloc'd, NUL-terminated, *out_len bytes), and the pre-tokens of an already
 * normalized text: *n pieces, concatenated in *out, piece i ending at byte (*ends)[i] (both malloc'd). */
int mb_tokenizer_normalize(const struct mb_tokenizer *t, const char *text, size_t len, char **out, size_t *out_len);
int mb_tokenizer_pretokenize(const struct mb_tokenizer *t, const char *text, size_t len, char **out, size_t **ends, int64_t *n);
int64_t mb_tokenizer_vocab_size(const struct mb_tokenizer *t);
int32_t mb_tokenizer_bos(const struct mb_tokenizer *t); /* -1 when none */
int32_t mb_tokenizer_eos(const struct mb_tokenizer *t);
int mb_tokenizer_adds_bos(const struct mb_tokenizer *t);
/* A fingerprint (FNV-1a 64 over vocab and merges) so two runs can check they share a tokenizer. */
uint64_t mb_tokenizer_hash(const struct mb_tokenizer *t);

/* Tokenize a text file (plain or gzip) in pieces of about 1 MB cut after a '\n' that is followed by a
 * printable ASCII character (where no normalizer, pre-tokenizer or merge of the supported tokenizers can
 * reach across), calling cb with the ids of each piece; BOS first when bos != 0. Memory stays bounded by
 * one piece. Tokenizers with regex normalizers are read whole. */
typedef int (*mb_ids_cb)(const int32_t *ids, int64_t n, void *user);
int mb_tokenize_stream(const struct mb_tokenizer *t, const char *path, int bos, mb_ids_cb cb, void *user);
/* The same, collected into one malloc'd array. */
int mb_tokenize_file(const struct mb_tokenizer *t, const char *path, int bos, int32_t **ids, int64_t *n);

/* ------------------------------------------------------------------------------------------------ */
/* text datasets                                                                                    */

/* Read documents from a .txt, .jsonl (field `field`, default "text"), their .gz versions, or a directory
 * of such files (sorted by name). Calls cb(doc, len, user) per document: a .txt file is one document, a
 * .jsonl line is one. Invalid UTF-8 and malformed JSON lines are errors naming file and line; a truncated
 * or corrupt .gz, a read error, a FIFO / device / directory where a file is expected (never opened in a
 * blocking way), and more than 2 GiB of text in one file are errors naming the file. */
typedef int (*mb_doc_cb)(const char *doc, size_t len, void *user);
int mb_dataset_read(const char *path, const char *field, mb_doc_cb cb, void *user);

/* Calibration rows: rows x length token ids (row-major), contiguous slices of the tokenized dataset
 * (documents joined by "\n\n"), chosen with a seeded generator; bos != 0 puts BOS first in every row.
 * Fails when the text has fewer than length tokens, or (MB_ERANGE) when rows x length exceeds
 * MB_CALIB_MAX_TOKENS. */
#define MB_CALIB_MAX_TOKENS ((size_t)1 << 31)
/* The tokens of a calibration text: its documents joined by "\n\n", tokenized without BOS (ids malloc'd) */
int mb_calib_tokens(const struct mb_tokenizer *t, const char *path, const char *field, int32_t **ids, int64_t *n);
/* Calibration rows (as mb_calib_rows) drawn from the token stream ids [n]; name is used in messages */
int mb_calib_rows_from(const struct mb_tokenizer *t, const char *name, const int32_t *ids, int64_t n, int64_t rows, int64_t length, int bos, uint64_t seed,
                       int32_t **out);
int mb_calib_rows(const struct mb_tokenizer *t, const char *path, const char *field, int64_t rows,
                  int64_t length, int bos, uint64_t seed, int32_t **out);

#endif
