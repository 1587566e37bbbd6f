/* tests/fuzz_safetensors.c: libFuzzer target for the safetensors header parser (make fuzz). Any input
 * must either parse (and then every view lies inside the buffer) or fail with MB_EFORMAT. */
#include <stdint.h>
#include <stdlib.h>

#include "formats/formats.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct mb_st_file *f = NULL;
    int rc = mb_st_parse("fuzz", data, size, &f);
    if (rc == 0) {
        for (int i = 0; i < f->n; i++) {
            const struct mb_tensor_info *t = &f->t[i];
            if ((const uint8_t *)t->data < data || (const uint8_t *)t->data + t->nbytes > data + size) abort();
            volatile uint8_t sum = 0;
            for (size_t k = 0; k < t->nbytes; k++) sum += ((const uint8_t *)t->data)[k];
        }
        mb_st_close(f);
    } else if (rc != MB_EFORMAT && rc != MB_ENOMEM) {
        abort();
    }
    return 0;
}
