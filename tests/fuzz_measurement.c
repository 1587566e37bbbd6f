/* tests/fuzz_measurement.c: libFuzzer target for the measurement.json reader (make fuzz-measurement).
 * Any input must either parse into modules whose every option satisfies the documented checks, or fail
 * with MB_EFORMAT and a message naming the file. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant/quant.h"

#define NAME "fuzz/measurement.json"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct mb_measurement *m = NULL;
    int rc = mb_measurement_parse(NAME, (const char *)data, size, &m);
    if (rc) {
        if (m || (rc != MB_EFORMAT && rc != MB_ENOMEM)) abort();
        if (!strstr(mb_errmsg(), NAME)) abort();
        return 0;
    }
    for (int i = 0; i < m->n_modules; i++) {
        const struct mb_meas_module *mod = &m->modules[i];
        if (mb_measurement_find(m, mod->name) != mod || mod->n_opts < 1) abort();
        for (int r = 0; r < mod->n_opts; r++) {
            const struct mb_meas_option *o = &mod->opts[r];
            if (!isfinite(o->accuracy) || o->accuracy < 0 || o->accuracy > 1 || o->total_bits <= 0) abort();
            if (o->n_proj < 2 || o->n_proj > MB_MEAS_MAX_PROJ) abort();
            for (int p = 0; p < o->n_proj; p++) {
                struct mb_qsetting q;
                if (mb_qsetting_parse(o->setting[p], &q)) abort();
                if (mb_meas_option_setting(o, o->proj[p]) != o->setting[p]) abort();
                /* the group plan of a 4096-row matrix covers it */
                int G, bits[4096 / 32];
                int64_t rows[4096 / 32];
                if (mb_qsetting_groups(&o->q[p], 4096, &G, bits, rows)) abort();
            }
        }
    }
    mb_measurement_free(m);
    return 0;
}
