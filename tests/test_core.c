/* tests/test_core.c: the core helpers every reader relies on: checked sizes (overflow, negative factors,
 * limits, messages naming what was sized), the safe open of regular files (FIFOs, devices, directories
 * refused without blocking), the bounded whole-file read, and the progress line (done/total, ETA, a rate
 * that stays meaningful when slow). */
#include <signal.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../core/core.h"
#include "harness.h"

static char tmpdir[256];

/* a read that blocks on a FIFO would hang the test: fail loudly instead */
static void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "test_core: blocked (a FIFO or device was opened in blocking mode)\n";
    if (write(2, msg, sizeof msg - 1)) {}
    _exit(3);
}

static void test_size_mul(void) {
    size_t n = 7;
    CHECK_EQ(mb_size_mul(&n, MB_SIZE_LIMIT, "rows", 100, 2048, sizeof(int32_t)), 0);
    CHECK_EQ(n, 100 * 2048 * 4);
    CHECK_EQ(mb_size_mul(&n, 10, "one factor", 10), 0);
    CHECK_EQ(n, 10);
    CHECK_EQ(mb_size_mul(&n, 10, "zero", 0, INT64_MAX), 0); /* a zero factor: no overflow */
    CHECK_EQ(n, 0);
    /* over the limit: the message names what and the factors */
    CHECK_EQ(mb_size_mul(&n, (size_t)1 << 31, "calibration rows", 100000000, 2048, 4), MB_ERANGE);
    CHECK_EQ(n, 0);
    CHECK_MSG(strstr(mb_errmsg(), "calibration rows") && strstr(mb_errmsg(), "100000000 x 2048 x 4") && strstr(mb_errmsg(), "limit"), "%s", mb_errmsg());
    /* wrap-around in size_t */
    CHECK_EQ(mb_size_mul(&n, SIZE_MAX, "huge", INT64_MAX, INT64_MAX, 8), MB_ERANGE);
    CHECK_MSG(strstr(mb_errmsg(), "huge") && strstr(mb_errmsg(), "overflows"), "%s", mb_errmsg());
    CHECK_EQ(mb_size_mul(&n, SIZE_MAX, "wrap", (int64_t)1 << 32, (int64_t)1 << 32), MB_ERANGE);
    /* negative factors */
    CHECK_EQ(mb_size_mul(&n, MB_SIZE_LIMIT, "negative rows", -5, 2048), MB_ERANGE);
    CHECK_MSG(strstr(mb_errmsg(), "negative rows") && strstr(mb_errmsg(), "negative"), "%s", mb_errmsg());
    /* the array form */
    const int64_t shape[3] = {4, 5, 6};
    CHECK_EQ(mb_size_mul_n(&n, 1000, "shape", shape, 3), 0);
    CHECK_EQ(n, 120);
    CHECK_EQ(mb_size_mul_n(&n, 119, "shape", shape, 3), MB_ERANGE);
}

static void test_open_regular(void) {
    char reg[512], fifo[512], dir[512];
    snprintf(reg, sizeof reg, "%s/file.txt", tmpdir);
    snprintf(fifo, sizeof fifo, "%s/fifo.txt", tmpdir);
    snprintf(dir, sizeof dir, "%s/dir.txt", tmpdir);
    FILE *f = fopen(reg, "w");
    fputs("hello", f);
    fclose(f);
    CHECK_EQ(mkfifo(fifo, 0600), 0);
    CHECK_EQ(mkdir(dir, 0700), 0);

    int fd = -1;
    size_t size = 0;
    CHECK_EQ(mb_open_regular(reg, &fd, &size), 0);
    CHECK_EQ(size, 5);
    CHECK(fd >= 0);
    char buf[8];
    CHECK_EQ(read(fd, buf, sizeof buf), 5); /* blocking mode again: a plain read works */
    if (fd >= 0) close(fd);
    FILE *fp = NULL;
    CHECK_EQ(mb_fopen_regular(reg, &fp, NULL), 0);
    if (fp) fclose(fp);
    CHECK_EQ(mb_check_regular(reg), 0);

    alarm(20);
    struct { const char *path, *want; } bad[] = {
        {fifo, "FIFO"}, {dir, "directory"}, {"/dev/null", "character device"}, {"/dev/zero", "character device"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        fd = 123;
        CHECK_EQ(mb_open_regular(bad[i].path, &fd, &size), MB_EIO);
        CHECK_EQ(fd, -1);
        CHECK_MSG(strstr(mb_errmsg(), bad[i].path) && strstr(mb_errmsg(), bad[i].want), "%s", mb_errmsg());
        CHECK_EQ(mb_check_regular(bad[i].path), MB_EIO);
        fp = (FILE *)1;
        CHECK_EQ(mb_fopen_regular(bad[i].path, &fp, NULL), MB_EIO);
        CHECK(fp == NULL);
        char *text = NULL;
        CHECK_EQ(mb_read_file(bad[i].path, &text, NULL, 0), MB_EIO);
        CHECK(text == NULL);
    }
    alarm(0);
    char missing[600];
    snprintf(missing, sizeof missing, "%s/nothing-here", tmpdir);
    CHECK_EQ(mb_open_regular(missing, &fd, NULL), MB_EIO);
    CHECK_MSG(strstr(mb_errmsg(), missing) && strstr(mb_errmsg(), "no such file"), "%s", mb_errmsg());
}

static void test_read_file(void) {
    char p[512];
    snprintf(p, sizeof p, "%s/read.bin", tmpdir);
    FILE *f = fopen(p, "wb");
    for (int i = 0; i < 100000; i++) fputc(i * 13 & 0xff, f);
    fclose(f);
    char *b = NULL;
    size_t n = 0;
    CHECK_EQ(mb_read_file(p, &b, &n, 0), 0);
    CHECK_EQ(n, 100000);
    int bad = 0;
    for (int i = 0; b && i < 100000; i++) bad += (uint8_t)b[i] != (uint8_t)(i * 13 & 0xff);
    CHECK_EQ(bad, 0);
    if (b) CHECK_EQ(b[n], 0);
    free(b);
    b = NULL;
    /* over the cap: refused before reading, naming the file */
    CHECK_EQ(mb_read_file(p, &b, &n, 1000), MB_EFORMAT);
    CHECK(b == NULL);
    CHECK_MSG(strstr(mb_errmsg(), p) && strstr(mb_errmsg(), "larger than 1000"), "%s", mb_errmsg());
    CHECK_EQ(mb_read_file(p, &b, &n, 100000), 0); /* exactly at the cap */
    free(b);
}

static void test_progress_line(void) {
    struct mb_progress p;
    char line[256];
    /* slow: 3 modules in 45 s -> 15 s/module, ETA for 21 more = 5m15s */
    mb_progress_begin(&p, "measuring", "modules", 24);
    p.done = 3;
    mb_progress_line(&p, 45.0, 0, line, sizeof line);
    CHECK_MSG(strstr(line, "3/24 modules") && strstr(line, "15.0 s/module") && strstr(line, "ETA 5m15s"), "%s", line);
    CHECK_MSG(!strstr(line, "0.0 modules/s"), "%s", line);
    /* fast: tokens per second */
    mb_progress_begin(&p, "perplexity", "tok", 100000);
    p.done = 50000;
    mb_progress_line(&p, 10.0, 0, line, sizeof line);
    CHECK_MSG(strstr(line, "50000/100000 tok") && strstr(line, "5000.0 tok/s") && strstr(line, "ETA 10s"), "%s", line);
    /* before the first unit: no fake rate, ETA unknown */
    p.done = 0;
    mb_progress_line(&p, 3.0, 0, line, sizeof line);
    CHECK_MSG(strstr(line, "0/100000") && strstr(line, "ETA ?") && strstr(line, "? tok/s"), "%s", line);
    /* final: the total time */
    p.done = 100000;
    mb_progress_line(&p, 3725.0, 1, line, sizeof line);
    CHECK_MSG(strstr(line, "100000/100000") && strstr(line, "done in 1h02m"), "%s", line);
    /* unknown total: count, rate and elapsed time */
    mb_progress_begin(&p, "reading", "tok", 0);
    p.done = 7;
    mb_progress_line(&p, 14.0, 0, line, sizeof line);
    CHECK_MSG(strstr(line, "7 tok") && strstr(line, "2.0 s/tok") && strstr(line, "14s elapsed"), "%s", line);
}

int main(void) {
    signal(SIGALRM, on_alarm);
    snprintf(tmpdir, sizeof tmpdir, "/tmp/mb_test_core_XXXXXX");
    if (!mkdtemp(tmpdir)) { perror("mkdtemp"); return 1; }
    RUN(test_size_mul);
    RUN(test_open_regular);
    RUN(test_read_file);
    RUN(test_progress_line);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd)) {}
    TEST_MAIN_END();
}
