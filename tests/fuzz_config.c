/* tests/fuzz_config.c: libFuzzer target for the config.json parser (make fuzz-config). Any input must
 * either parse into a config whose every field lies inside the documented ranges, or fail with
 * MB_EFORMAT / MB_EUNSUPPORTED and a message naming the file. Never a crash, a leak or a huge allocation:
 * the expected-tensor list is built for small configs and its size is computed for all. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "formats/formats.h"

#define NAME "fuzz/config.json"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct mb_config c;
    int rc = mb_config_parse(NAME, (const char *)data, size, &c);
    if (rc) {
        if (rc != MB_EFORMAT && rc != MB_EUNSUPPORTED && rc != MB_ENOMEM) abort();
        if (!strstr(mb_errmsg(), NAME)) abort(); /* every error names the file */
        return 0;
    }
    /* the ranges the parser promises (formats.h) */
    if (c.hidden < 1 || c.n_layers < 1 || c.n_heads < 1 || c.n_kv_heads < 1 || c.n_kv_heads > c.n_heads || c.n_heads % c.n_kv_heads) abort();
    if (c.head_dim < 2 || c.head_dim % 2 || c.head_dim > c.hidden || c.ffn < 1 || c.vocab < 1) abort();
    if (c.max_pos < 2 || !(c.rms_eps > 0 && c.rms_eps <= 0.1) || !(c.rope_theta > 1 && c.rope_theta <= 1e12)) abort();
    if (c.sliding_window < 0 || c.bos_id < -1 || c.bos_id >= c.vocab || c.eos_id < -1 || c.eos_id >= c.vocab) abort();
    if (c.arch == MB_ARCH_MIXTRAL ? (c.n_experts < 1 || c.n_experts_per_tok < 1 || c.n_experts_per_tok > c.n_experts) : c.n_experts != 0) abort();
    if (c.rope_type != MB_ROPE_DEFAULT && !(c.rope_factor >= 1)) abort();
    if (c.rope_type == MB_ROPE_LLAMA3 && (!(c.rope_high_freq > c.rope_low_freq) || !(c.rope_low_freq > 0) || c.rope_orig_max_pos < 2)) abort();
    int64_t n = mb_config_n_expected(&c);
    if (n < 3) abort();
    if (n <= 20000) { /* the list itself, for configs of a sane size */
        struct mb_expect *e = NULL;
        int ne = 0;
        if (mb_config_expected(&c, &e, &ne)) abort();
        if (ne != n) abort();
        for (int i = 0; i < ne; i++)
            if (e[i].rows < 1 || e[i].cols < 0 || !e[i].name[0]) abort();
        free(e);
    }
    return 0;
}
