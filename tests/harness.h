/* tests/harness.h: a tiny test harness. A test is a function; RUN(fn) runs it and counts it as passed,
 * failed (any CHECK failed) or skipped (SKIP called). Failures print file:line, the expression and the
 * values. TEST_MAIN_END prints "N passed, N failed, N skipped" and returns non-zero on any failure. */
#ifndef MB_TEST_HARNESS_H
#define MB_TEST_HARNESS_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int th_passed, th_failed, th_skipped, th_cur_failed, th_cur_skipped;
static const char *th_cur_name;

#define CHECK(cond)                                                                               \
    do {                                                                                          \
        if (!(cond)) {                                                                            \
            fprintf(stderr, "%s:%d: %s: CHECK(%s) failed\n", __FILE__, __LINE__, th_cur_name, #cond); \
            th_cur_failed = 1;                                                                    \
        }                                                                                         \
    } while (0)

#define CHECK_MSG(cond, ...)                                                                      \
    do {                                                                                          \
        if (!(cond)) {                                                                            \
            fprintf(stderr, "%s:%d: %s: CHECK(%s) failed: ", __FILE__, __LINE__, th_cur_name, #cond); \
            fprintf(stderr, __VA_ARGS__);                                                         \
            fprintf(stderr, "\n");                                                                \
            th_cur_failed = 1;                                                                    \
        }                                                                                         \
    } while (0)

#define CHECK_EQ(a, b)                                                                            \
    do {                                                                                          \
        long long th_a = (long long)(a), th_b = (long long)(b);                                   \
        if (th_a != th_b) {                                                                       \
            fprintf(stderr, "%s:%d: %s: CHECK_EQ(%s, %s) failed: %lld != %lld\n", __FILE__, __LINE__, \
                    th_cur_name, #a, #b, th_a, th_b);                                             \
            th_cur_failed = 1;                                                                    \
        }                                                                                         \
    } while (0)

#define CHECK_STR(a, b)                                                                           \
    do {                                                                                          \
        const char *th_a = (a), *th_b = (b);                                                      \
        if (!th_a || !th_b || strcmp(th_a, th_b)) {                                               \
            fprintf(stderr, "%s:%d: %s: CHECK_STR(%s, %s) failed: \"%s\" != \"%s\"\n", __FILE__,  \
                    __LINE__, th_cur_name, #a, #b, th_a ? th_a : "(null)", th_b ? th_b : "(null)"); \
            th_cur_failed = 1;                                                                    \
        }                                                                                         \
    } while (0)

/* |a - b| <= tol; NaN never passes */
#define CHECK_NEAR(a, b, tol)                                                                     \
    do {                                                                                          \
        double th_a = (double)(a), th_b = (double)(b), th_t = (double)(tol);                      \
        if (!(fabs(th_a - th_b) <= th_t)) {                                                       \
            fprintf(stderr, "%s:%d: %s: CHECK_NEAR(%s, %s, %s) failed: %.9g vs %.9g (diff %.3g)\n", \
                    __FILE__, __LINE__, th_cur_name, #a, #b, #tol, th_a, th_b, fabs(th_a - th_b)); \
            th_cur_failed = 1;                                                                    \
        }                                                                                         \
    } while (0)

#define SKIP(...)                                                                                 \
    do {                                                                                          \
        fprintf(stderr, "%s: skipped: ", th_cur_name);                                            \
        fprintf(stderr, __VA_ARGS__);                                                             \
        fprintf(stderr, "\n");                                                                    \
        th_cur_skipped = 1;                                                                       \
        return;                                                                                   \
    } while (0)

#define RUN(fn)                                                                                   \
    do {                                                                                          \
        th_cur_name = #fn;                                                                        \
        th_cur_failed = th_cur_skipped = 0;                                                       \
        fn();                                                                                     \
        if (th_cur_failed) { th_failed++; fprintf(stderr, "FAIL %s\n", #fn); }                    \
        else if (th_cur_skipped) th_skipped++;                                                    \
        else th_passed++;                                                                         \
    } while (0)

#define TEST_MAIN_END()                                                                           \
    do {                                                                                          \
        printf("%d passed, %d failed, %d skipped\n", th_passed, th_failed, th_skipped);           \
        return th_failed ? 1 : 0;                                                                 \
    } while (0)

/* ../shared, or $MB_SHARED */
static inline const char *th_shared(void) {
    const char *s = getenv("MB_SHARED");
    return s ? s : "../shared";
}

#endif
