/* core/core.c: status codes, errors, logging, progress, fp16/bf16, files. See core.h. */
#include "core.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

const char *mb_status_name(int s) {
    switch (s) {
#define MB__NAME(name, val, str) case val: return #name;
        MB_STATUS_TABLE(MB__NAME)
#undef MB__NAME
    }
    return "MB_E?";
}

const char *mb_status_str(int s) {
    switch (s) {
#define MB__STR(name, val, str) case val: return str;
        MB_STATUS_TABLE(MB__STR)
#undef MB__STR
    }
    return "unknown error";
}

static _Thread_local char errbuf[2048];

int mb_fail(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, sizeof errbuf, fmt, ap);
    va_end(ap);
    return status;
}

int mb_fail_ctx(int status, const char *fmt, ...) {
    char ctx[1024], old[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx, sizeof ctx, fmt, ap);
    va_end(ap);
    memcpy(old, errbuf, sizeof old);
    snprintf(errbuf, sizeof errbuf, "%.1000s: %.1000s", ctx, old);
    return status;
}

const char *mb_errmsg(void) { return errbuf; }

int mb_log_level = MB_LOG_INFO;

void mb_log(int level, const char *fmt, ...) {
    if (level > mb_log_level) return;
    static const char *tag[] = {"error", "warning", "info", "debug"};
    char line[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "mixbit: %s: %s\n", tag[level < 0 ? 0 : level > 3 ? 3 : level], line);
}

double mb_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- progress ---- */
void mb_progress_begin(struct mb_progress *p, const char *stage, const char *unit, int64_t total) {
    memset(p, 0, sizeof *p);
    p->stage = stage;
    p->unit = unit ? unit : "";
    p->total = total;
    p->t0 = p->last = mb_now();
    p->tty = isatty(2);
    p->active = mb_log_level >= MB_LOG_INFO;
}

/* "1h02m", "3m05s", "42s" */
static void fmt_duration(double s, char *buf, size_t n) {
    if (!(s >= 0) || s > 1e9) { snprintf(buf, n, "?"); return; }
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, n, "%ldh%02ldm", t / 3600, t / 60 % 60);
    else if (t >= 60) snprintf(buf, n, "%ldm%02lds", t / 60, t % 60);
    else snprintf(buf, n, "%lds", t);
}

/* "12.3 tok/s", or "4.2 s/module" below one unit per second (singular of "modules"), "? modules/s"
 * before the first unit */
static void fmt_rate(int64_t done, double el, const char *unit, char *buf, size_t n) {
    if (done <= 0 || !(el > 0)) { snprintf(buf, n, "? %s/s", unit); return; }
    double rate = done / el;
    if (rate >= 1.0) { snprintf(buf, n, "%.1f %s/s", rate, unit); return; }
    size_t ul = strlen(unit);
    int plural = ul > 3 && unit[ul - 1] == 's';
    snprintf(buf, n, "%.1f s/%.*s", el / done, (int)(plural ? ul - 1 : ul), unit);
}

void mb_progress_line(const struct mb_progress *p, double el, int final, char *buf, size_t n) {
    char rate[64], t[32];
    fmt_rate(p->done, el, p->unit, rate, sizeof rate);
    if (p->total <= 0) { /* unknown total: count, rate and elapsed time */
        fmt_duration(el, t, sizeof t);
        snprintf(buf, n, "%s: %lld %s, %s, %s elapsed", p->stage, (long long)p->done, p->unit, rate, t);
        return;
    }
    if (final) { /* the total time instead of an ETA */
        fmt_duration(el, t, sizeof t);
        snprintf(buf, n, "%s: %lld/%lld %s, %s, done in %s", p->stage, (long long)p->done, (long long)p->total, p->unit, rate, t);
        return;
    }
    /* ETA from the mean rate so far; unknown until the first unit is done */
    if (p->done >= p->total) fmt_duration(0, t, sizeof t);
    else if (p->done > 0 && el > 0) fmt_duration((double)(p->total - p->done) * el / (double)p->done, t, sizeof t);
    else snprintf(t, sizeof t, "?");
    snprintf(buf, n, "%s: %lld/%lld %s, %s, ETA %s", p->stage, (long long)p->done, (long long)p->total, p->unit, rate, t);
}

static void progress_print(struct mb_progress *p, int final) {
    char line[512];
    mb_progress_line(p, mb_now() - p->t0, final, line, sizeof line);
    if (!p->tty) { fprintf(stderr, "mixbit: %s\n", line); return; }
    char bar[40] = "";
    if (p->total > 0) {
        int w = 30, fill = (int)(w * (double)(p->done < p->total ? p->done : p->total) / (double)p->total);
        bar[0] = '[';
        for (int i = 0; i < w; i++) bar[1 + i] = i < fill ? '#' : '.';
        bar[w + 1] = ']';
        bar[w + 2] = ' ';
        bar[w + 3] = 0;
    }
    fprintf(stderr, "\r%s%s\033[K%s", bar, line, final ? "\n" : "");
}

void mb_progress_update(struct mb_progress *p, int64_t done) {
    p->done = done;
    if (!p->active) return;
    double t = mb_now();
    if (t - p->last < (p->tty ? 0.2 : 5.0)) return;
    p->last = t;
    progress_print(p, 0);
}

void mb_progress_end(struct mb_progress *p) {
    if (!p->active) return;
    if (p->tty || mb_now() - p->t0 > 1.0) progress_print(p, 1);
}

/* ---- fp16 / bf16 ---- */
float mb_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { /* subnormal */
            float f = (float)man * (1.0f / 16777216.0f);
            return sign ? -f : f;
        }
    } else if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else bits = sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t mb_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0)); /* inf/nan */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* rounds to >= 65520: inf */
    if (ax < 0x38800000u) { /* below smallest normal 2^-14: subnormal or zero */
        if (ax < 0x33000000u) return (uint16_t)sign; /* < 2^-25: rounds to zero (2^-25 ties to even 0) */
        uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000;
        /* value = m * 2^(e-150) = (m * 2^(e-126)) units of 2^-24 (the half subnormal step): shift right by
         * s = 126 - e, s in [14, 24], rounding half to even */
        int s = 126 - (int)e;
        uint32_t r = m >> s, rem = m & ((1u << s) - 1), half = 1u << (s - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ((ax >> 13) - (112u << 10));
    uint32_t rem = ax & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++;
    return (uint16_t)(sign | r);
}

float mb_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t mb_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);
    x += 0x7fff + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

/* ---- memory ---- */
void *mb_malloc(size_t n, const char *what) {
    void *p = malloc(n ? n : 1);
    if (!p) mb_fail(MB_ENOMEM, "out of memory allocating %zu bytes for %s", n, what);
    return p;
}

void *mb_calloc(size_t n, size_t size, const char *what) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) mb_fail(MB_ENOMEM, "out of memory allocating %zu x %zu bytes for %s", n, size, what);
    return p;
}

int mb_mul_ok(size_t a, size_t b, size_t *out) {
    if (a && b > SIZE_MAX / a) return 0;
    *out = a * b;
    return 1;
}

int mb_size_mul_n(size_t *out, size_t limit, const char *what, const int64_t *f, int n) {
    *out = 0;
    size_t prod = 1;
    int over = 0, neg = 0;
    for (int i = 0; i < n; i++) {
        if (f[i] < 0) neg = 1;
        else if (!over && !mb_mul_ok(prod, (size_t)f[i], &prod)) over = 1;
    }
    if (!neg && !over && prod <= limit) { *out = prod; return 0; }
    char fs[256];
    size_t k = 0;
    fs[0] = 0;
    for (int i = 0; i < n && k < sizeof fs; i++) k += (size_t)snprintf(fs + k, sizeof fs - k, "%s%lld", i ? " x " : "", (long long)f[i]);
    if (neg) return mb_fail(MB_ERANGE, "%s: %s has a negative factor", what, fs);
    if (over) return mb_fail(MB_ERANGE, "%s: %s overflows", what, fs);
    return mb_fail(MB_ERANGE, "%s: %s = %zu exceeds the limit of %zu", what, fs, prod, limit);
}

/* ---- files ---- */
static const char *file_kind(mode_t m) {
    if (S_ISDIR(m)) return "a directory";
    if (S_ISFIFO(m)) return "a FIFO";
    if (S_ISCHR(m)) return "a character device";
    if (S_ISBLK(m)) return "a block device";
    if (S_ISSOCK(m)) return "a socket";
    return "not a regular file";
}

static int stat_regular(const char *path, const struct stat *st) {
    if (S_ISREG(st->st_mode)) return 0;
    const char *k = file_kind(st->st_mode);
    if (!strcmp(k, "not a regular file")) return mb_fail(MB_EIO, "%s: not a regular file", path);
    return mb_fail(MB_EIO, "%s: is %s, not a regular file", path, k);
}

int mb_check_regular(const char *path) {
    struct stat st;
    if (!path || !path[0]) return mb_fail(MB_EIO, "empty file name");
    if (stat(path, &st) != 0) {
        if (errno == ENOENT || errno == ENOTDIR) return mb_fail(MB_EIO, "%s: no such file", path);
        return mb_fail(MB_EIO, "%s: %s", path, strerror(errno));
    }
    return stat_regular(path, &st);
}

int mb_open_regular(const char *path, int *fd_out, size_t *size) {
    *fd_out = -1;
    if (size) *size = 0;
    int rc = mb_check_regular(path); /* refuse FIFOs and devices before opening them at all */
    if (rc) return rc;
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) return mb_fail(MB_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) { rc = mb_fail(MB_EIO, "%s: stat: %s", path, strerror(errno)); close(fd); return rc; }
    if ((rc = stat_regular(path, &st))) { close(fd); return rc; } /* replaced between stat and open */
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) != 0) { rc = mb_fail(MB_EIO, "%s: fcntl: %s", path, strerror(errno)); close(fd); return rc; }
    if (st.st_size < 0) { close(fd); return mb_fail(MB_EIO, "%s: negative size", path); }
    *fd_out = fd;
    if (size) *size = (size_t)st.st_size;
    return 0;
}

int mb_fopen_regular(const char *path, FILE **out, size_t *size) {
    *out = NULL;
    int fd, rc = mb_open_regular(path, &fd, size);
    if (rc) return rc;
    FILE *f = fdopen(fd, "rb");
    if (!f) { rc = mb_fail(MB_EIO, "%s: cannot open: %s", path, strerror(errno)); close(fd); return rc; }
    *out = f;
    return 0;
}

int mb_read_file(const char *path, char **buf, size_t *len, size_t max) {
    *buf = NULL;
    if (len) *len = 0;
    int fd;
    size_t size;
    int rc = mb_open_regular(path, &fd, &size);
    if (rc) return rc;
    if (max && size > max) { close(fd); return mb_fail(MB_EFORMAT, "%s: larger than %zu bytes (%zu)", path, max, size); }
    if (size >= SIZE_MAX / 2) { close(fd); return mb_fail(MB_ERANGE, "%s: too large (%zu bytes)", path, size); }
    char *b = malloc(size + 1);
    if (!b) { close(fd); return mb_fail(MB_ENOMEM, "%s: out of memory reading %zu bytes", path, size); }
    size_t n = 0;
    while (n < size) { /* at most `size` bytes: bounded whatever the file does */
        ssize_t r = read(fd, b + n, size - n > (1u << 30) ? (1u << 30) : size - n);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { rc = mb_fail(MB_EIO, "%s: read error: %s", path, strerror(errno)); break; }
        if (r == 0) { rc = mb_fail(MB_EIO, "%s: shrank while being read (%zu of %zu bytes)", path, n, size); break; }
        n += (size_t)r;
    }
    if (!rc) {
        char extra;
        ssize_t r;
        while ((r = read(fd, &extra, 1)) < 0 && errno == EINTR) {}
        if (r > 0) rc = mb_fail(MB_EIO, "%s: grew while being read (more than %zu bytes)", path, size);
        else if (r < 0) rc = mb_fail(MB_EIO, "%s: read error: %s", path, strerror(errno));
    }
    close(fd);
    if (rc) { free(b); return rc; }
    b[n] = 0;
    *buf = b;
    if (len) *len = n;
    return 0;
}

int mb_atomic_open(struct mb_atomic_file *af, const char *path) {
    memset(af, 0, sizeof *af);
    if (strlen(path) >= sizeof af->path) return mb_fail(MB_EINVAL, "%s: path too long", path);
    strcpy(af->path, path);
    snprintf(af->tmp, sizeof af->tmp, "%s.tmp.%ld", path, (long)getpid());
    af->f = fopen(af->tmp, "wb");
    if (!af->f) return mb_fail(MB_EIO, "%s: cannot create: %s", af->tmp, strerror(errno));
    return 0;
}

int mb_atomic_commit(struct mb_atomic_file *af) {
    if (!af->f) return mb_fail(MB_EIO, "%s: not open", af->path);
    int bad = fflush(af->f) != 0 || ferror(af->f);
    int e = errno;
    if (!bad && fsync(fileno(af->f)) != 0) { bad = 1; e = errno; }
    if (fclose(af->f) != 0 && !bad) { bad = 1; e = errno; }
    af->f = NULL;
    if (bad) {
        unlink(af->tmp);
        return mb_fail(MB_EIO, "%s: write failed: %s", af->path, strerror(e));
    }
    if (rename(af->tmp, af->path) != 0) {
        e = errno;
        unlink(af->tmp);
        return mb_fail(MB_EIO, "%s: rename failed: %s", af->path, strerror(e));
    }
    return 0;
}

void mb_atomic_abort(struct mb_atomic_file *af) {
    if (af->f) { fclose(af->f); af->f = NULL; }
    if (af->tmp[0]) unlink(af->tmp);
}

int mb_write_file_atomic(const char *path, const void *data, size_t len) {
    struct mb_atomic_file af;
    int rc = mb_atomic_open(&af, path);
    if (rc) return rc;
    if (len && fwrite(data, 1, len, af.f) != len) {
        int e = errno;
        mb_atomic_abort(&af);
        return mb_fail(MB_EIO, "%s: write failed: %s", path, strerror(e));
    }
    return mb_atomic_commit(&af);
}

int mb_file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

int mb_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int mb_path_join(char *out, size_t outsz, const char *dir, const char *name) {
    size_t dl = strlen(dir);
    int n = snprintf(out, outsz, "%s%s%s", dir, (dl && dir[dl - 1] == '/') ? "" : "/", name);
    if (n < 0 || (size_t)n >= outsz) return mb_fail(MB_EINVAL, "%s/%s: path too long", dir, name);
    return 0;
}

int mb_mkdir_p(const char *path) {
    char tmp[4096];
    if (strlen(path) >= sizeof tmp) return mb_fail(MB_EINVAL, "%s: path too long", path);
    strcpy(tmp, path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            if (mkdir(tmp, 0755) != 0 && errno != EEXIST) return mb_fail(MB_EIO, "%s: mkdir: %s", tmp, strerror(errno));
            *p = '/';
        }
    }
    if (mkdir(tmp, 0755) != 0 && errno != EEXIST) return mb_fail(MB_EIO, "%s: mkdir: %s", tmp, strerror(errno));
    if (!mb_is_dir(tmp)) return mb_fail(MB_EIO, "%s: not a directory", tmp);
    return 0;
}

int mb_copy_file(const char *src, const char *dst) {
    char *buf;
    size_t len;
    int rc = mb_read_file(src, &buf, &len, 0);
    if (rc) return rc;
    rc = mb_write_file_atomic(dst, buf, len);
    free(buf);
    return rc;
}

int mb_num_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

float mb_rng_normal(struct mb_rng *r) {
    double u1 = mb_rng_uniform(r), u2 = mb_rng_uniform(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* ---- weight views ---- */
const char *mb_wtype_name(enum mb_wtype t) {
    switch (t) {
    case MB_W_F32: return "F32";
    case MB_W_F16: return "F16";
    case MB_W_BF16: return "BF16";
    case MB_W_EXL2: return "EXL2";
    }
    return "?";
}

size_t mb_weight_bytes(const struct mb_weight *w) {
    if (w->type != MB_W_EXL2) return (size_t)(w->n * w->k) * (w->type == MB_W_F32 ? 4 : 2);
    const struct mb_exl2_layer *q = &w->q;
    return (size_t)(q->P * q->Np) * 4 + (size_t)(q->G * q->Np / 8) * 4 + (size_t)q->G * 2 + (size_t)q->G * 4 + (size_t)q->Kp * 4 +
           (q->bias ? (size_t)q->Np * 2 : 0);
}

struct mb_weight mb_weight_view_f32(const float *w, int64_t n, int64_t k, const char *name) {
    struct mb_weight v;
    memset(&v, 0, sizeof v);
    v.type = MB_W_F32;
    v.n = n;
    v.k = k;
    v.data = w;
    v.name = name;
    return v;
}
