/* quant/quant.h: EXL2 quantization: settings and option tables, Hessians, GPTQ, scales, packing and
 * unpacking of the EXL2 tensors (byte layout: ../shared/docs/exl2-format.md, summarized in exl2.c). */
#ifndef MB_QUANT_H
#define MB_QUANT_H

#include "../core/core.h"
#include "../formats/formats.h"

/* One quantized layer of an EXL2 model, as `inspect` shows it. */
struct mb_exl2_summary {
    char name[128];
    int64_t K, N;       /* in, out features */
    double bpw;         /* storage bits / (K * N), formula of the format doc */
    char bits_desc[96]; /* e.g. "8b 10%, 6b 90%" */
};
/* Summaries of every quantized layer of an EXL2 model (owned array, free()). */
int mb_exl2_summarize(const struct mb_model *m, struct mb_exl2_summary **out, int *n);

#endif
