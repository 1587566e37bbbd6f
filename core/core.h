/* core/core.h: shared basics of mixbit.
 *
 * - status codes (one X-macro table) and a per-thread error message naming the file/tensor/line involved;
 * - logging and progress on stderr (results go to stdout, never here);
 * - fp16 / bf16 conversion (round to nearest even, as hardware does);
 * - small file helpers: read a whole file, write a file atomically (temporary name + rename);
 * - a monotonic clock.
 *
 * Conventions: a function that can fail returns 0 or a negative MB_E* code and has called mb_fail() with a
 * message; the CLI prints mb_errmsg() and exits 1. free functions accept NULL.
 */
#ifndef MB_CORE_H
#define MB_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdarg.h>

#define MB_VERSION "0.1.0"

#define MB_STATUS_TABLE(X)                                               \
    X(MB_OK, 0, "ok")                                                    \
    X(MB_EINVAL, -1, "invalid input")                                    \
    X(MB_EIO, -2, "i/o error")                                           \
    X(MB_ENOMEM, -3, "out of memory")                                    \
    X(MB_EFORMAT, -4, "malformed file")                                  \
    X(MB_EUNSUPPORTED, -5, "unsupported")                                \
    X(MB_ENOCUDA, -6, "CUDA unavailable")                                \
    X(MB_ENUMERIC, -7, "numerical failure")                              \
    X(MB_ERANGE, -8, "out of range")                                     \
    X(MB_EUSAGE, -9, "bad usage")

enum mb_status {
#define MB__ENUM(name, val, str) name = val,
    MB_STATUS_TABLE(MB__ENUM)
#undef MB__ENUM
};

/* Name ("MB_EFORMAT") and description of a status code. Static strings. */
const char *mb_status_name(int status);
const char *mb_status_str(int status);

/* Record a formatted message for this thread and return `status` (so: `return mb_fail(MB_EIO, ...)`). */
int mb_fail(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prefix the current message with more context: "ctx: old message". Returns status. */
int mb_fail_ctx(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The last message recorded on this thread ("" if none). Valid until the next mb_fail on this thread. */
const char *mb_errmsg(void);

/* ---- logging (stderr) ---- */
enum { MB_LOG_ERROR = 0, MB_LOG_WARN = 1, MB_LOG_INFO = 2, MB_LOG_DEBUG = 3 };
extern int mb_log_level; /* default MB_LOG_INFO; -q sets WARN, -v sets DEBUG */
void mb_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define mb_info(...) mb_log(MB_LOG_INFO, __VA_ARGS__)
#define mb_warn(...) mb_log(MB_LOG_WARN, __VA_ARGS__)
#define mb_debug(...) mb_log(MB_LOG_DEBUG, __VA_ARGS__)

/* ---- progress (stderr): a bar with rate and ETA on a terminal, a line every few seconds otherwise ---- */
struct mb_progress {
    const char *stage; /* borrowed */
    const char *unit;  /* borrowed, e.g. "tok" */
    int64_t total, done;
    double t0, last;
    int tty, active;
};
void mb_progress_begin(struct mb_progress *p, const char *stage, const char *unit, int64_t total);
void mb_progress_update(struct mb_progress *p, int64_t done);
void mb_progress_end(struct mb_progress *p);
/* The text of one progress line after `elapsed` seconds: "stage: done/total unit, rate, ETA 3m05s" when the
 * total is known (ETA "?" before the first unit; "done in 42s" when final), "stage: done unit, rate,
 * 12s elapsed" otherwise. The rate reads "4.2 s/module" below one unit per second. */
void mb_progress_line(const struct mb_progress *p, double elapsed, int final, char *buf, size_t n);

/* ---- time ---- */
double mb_now(void); /* seconds, monotonic */

/* ---- fp16 / bf16 ---- */
float mb_f16_to_f32(uint16_t h);
uint16_t mb_f32_to_f16(float f); /* round to nearest even, overflow to inf */
float mb_bf16_to_f32(uint16_t h);
uint16_t mb_f32_to_bf16(float f); /* round to nearest even */
static inline float mb_f16_round(float f) { return mb_f16_to_f32(mb_f32_to_f16(f)); }

/* ---- memory ---- */
/* malloc/calloc that record MB_ENOMEM with `what` on failure (return NULL). */
void *mb_malloc(size_t n, const char *what);
void *mb_calloc(size_t n, size_t size, const char *what);
/* n * size with overflow check; returns 0 on overflow. */
int mb_mul_ok(size_t a, size_t b, size_t *out);

/* ---- checked sizes: every size computed from user input or file contents goes through this ---- */
/* *out = the product of the factors, or MB_ERANGE (and *out = 0) with a message naming `what` and the
 * factors when a factor is negative, the product overflows, or it exceeds `limit` (same unit as the
 * product). Factors are converted to int64_t, so pass element counts, shapes and sizeof() freely:
 *   size_t bytes;
 *   if ((rc = mb_size_mul(&bytes, MB_SIZE_LIMIT, "calibration rows", rows, length, sizeof(int32_t)))) return rc;
 * gives "calibration rows: 100000000 x 2048 x 4 exceeds the limit of 1099511627776". */
int mb_size_mul_n(size_t *out, size_t limit, const char *what, const int64_t *factors, int n);
#define mb_size_mul(out, limit, what, ...)                                                            \
    mb_size_mul_n((out), (limit), (what), (const int64_t[]){__VA_ARGS__},                           \
                  (int)(sizeof((const int64_t[]){__VA_ARGS__}) / sizeof(int64_t)))
/* The default upper bound for one allocation: 1 TiB, far beyond any buffer mixbit needs, far below a
 * wrapped-around size. Callers with a tighter natural bound (token counts, 2^31) pass it instead. */
#define MB_SIZE_LIMIT ((size_t)1 << 40)

/* ---- files ---- */
/* Open an existing regular file for reading without ever blocking: FIFOs, devices, sockets and
 * directories are refused (MB_EIO, "PATH: is a FIFO, not a regular file"); a missing file is MB_EIO
 * "PATH: no such file". The path is stat'ed first, opened with O_RDONLY | O_NONBLOCK | O_CLOEXEC |
 * O_NOCTTY, the opened descriptor fstat'ed again (a file swapped for a FIFO in between is refused too),
 * then O_NONBLOCK is cleared. *fd is owned by the caller (close); *size (optional) receives the size at
 * open time. Use this (or the two below) for every file mixbit reads. */
int mb_open_regular(const char *path, int *fd, size_t *size);
/* The same as a stdio stream opened "rb" (caller fcloses). */
int mb_fopen_regular(const char *path, FILE **f, size_t *size);
/* The same check without opening: 0 when `path` is a regular file, else the error above. */
int mb_check_regular(const char *path);
/* Read a whole regular file (mb_open_regular) into a NUL-terminated malloc'd buffer (caller frees).
 * Files larger than `max` bytes (0: no cap) are refused before reading; exactly the size the file had at
 * open time is read, and a file that grows or shrinks meanwhile is an error, so the loop is bounded. */
int mb_read_file(const char *path, char **buf, size_t *len, size_t max);
/* Atomic write: open "<path>.tmp.<pid>" for writing; mb_atomic_commit fsyncs, closes and renames it onto
 * `path`; mb_atomic_abort closes and removes it. A struct is owned by the caller (stack). */
struct mb_atomic_file {
    FILE *f;
    char path[4096];
    char tmp[4200];
};
int mb_atomic_open(struct mb_atomic_file *af, const char *path);
int mb_atomic_commit(struct mb_atomic_file *af);
void mb_atomic_abort(struct mb_atomic_file *af);
/* Write a whole buffer atomically. */
int mb_write_file_atomic(const char *path, const void *data, size_t len);
int mb_file_exists(const char *path);
int mb_is_dir(const char *path);
/* Join dir and name into out (size outsz). Returns MB_EINVAL if it does not fit. */
int mb_path_join(char *out, size_t outsz, const char *dir, const char *name);
int mb_mkdir_p(const char *path);
int mb_copy_file(const char *src, const char *dst);

/* ---- threads ---- */
int mb_num_threads(void);

/* ---- weight views ---- */
#include "exl2_layout.h"

/* Stored types of a weight matrix */
enum mb_wtype { MB_W_F32, MB_W_F16, MB_W_BF16, MB_W_EXL2 };

/* One weight matrix W [n, k] (out, in: Hugging Face layout) as it is stored, never converted as a whole: a
 * borrowed view into a safetensors mapping, into packed EXL2 tensors, or into a backend's device copy. The
 * compute backends multiply by it directly (kernels/kernels.h, struct mb_ops). */
struct mb_weight {
    enum mb_wtype type;
    int64_t n, k;
    const void *data;       /* F32 / F16 / BF16: row-major [n, k], possibly unaligned for F16/BF16 */
    struct mb_exl2_layer q; /* EXL2: the packed tensors (q.N = n, q.K = k) */
    int device;             /* 0: host memory; 1: device memory of the backend that loaded it */
    void *priv;             /* the loading backend's own form (e.g. an uploaded EXL2 layer); NULL on the host */
    const char *name;       /* for messages (borrowed) */
};
const char *mb_wtype_name(enum mb_wtype t);
/* Bytes the stored form occupies (q_* tensors for EXL2) */
size_t mb_weight_bytes(const struct mb_weight *w);
/* An F32 view of a caller-owned matrix w [n, k] */
struct mb_weight mb_weight_view_f32(const float *w, int64_t n, int64_t k, const char *name);

/* ---- random (splitmix64 / xoshiro-like, reproducible across platforms) ---- */
struct mb_rng { uint64_t s; };
static inline uint64_t mb_rng_next(struct mb_rng *r) {
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static inline double mb_rng_uniform(struct mb_rng *r) { return (mb_rng_next(r) >> 11) * (1.0 / 9007199254740992.0); }
float mb_rng_normal(struct mb_rng *r);

#endif
