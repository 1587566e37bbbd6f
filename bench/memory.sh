#!/bin/bash
# Memory benchmark of the streaming engine (issue 10): peak anonymous memory (RssAnon sampled by
# bench/peakmem.sh; the checkpoint's mmap'd pages are page cache and do not count) on synthetic checkpoints
# with Mixtral-8x7B shapes (bench/synth_model: hidden 4096, 32 / 8 heads, 8 experts of ffn 14336, top-2,
# vocab 32000, BF16):
#
#   ppl       2 decoder layers (6.3 GB), ctx 512, 4 windows            [this binary, and OLD=path for the old one]
#   uniform   2 decoder layers, convert --uniform 1:4b_128g, 4 x 512 calibration tokens, no evaluation
#   measure   1 decoder layer with 2 experts, convert until the measurement of the MoE module is done (killed at
#             the start of quantization); 4 x 512 measured tokens
#
#   bench/memory.sh [ppl|uniform|measure]...    (default: all; OLD=/path/to/old/mixbit adds its ppl run)
# Needs about 13 GB of disk in $SYN (default /tmp/mb-synth) and 20 GB of memory for `uniform`.
set -u
cd "$(dirname "$0")/.."
S=${MB_SHARED:-../shared}
SYN=${SYN:-/tmp/mb-synth}
make -s mixbit build/bench/synth_model >/dev/null || exit 1
mkdir -p "$SYN"
[ -f "$SYN/m2/model.safetensors" ] || ./build/bench/synth_model "$SYN/m2" mixtral-8x7b 2 "$S/tokenizers/llama2"
[ -f "$SYN/m1e2/model.safetensors" ] || ./build/bench/synth_model "$SYN/m1e2" mixtral-8x7b 1 "$S/tokenizers/llama2" 2
head -c 400000 "$S/text/wikitext-2-raw-test.txt" > "$SYN/text.txt"
what=${*:-ppl uniform measure}
for w in $what; do
    case $w in
    ppl)
        bash bench/peakmem.sh ./mixbit ppl "$SYN/m2" --text "$SYN/text.txt" --ctx 512 --max-tokens 2048 -q
        [ -n "${OLD:-}" ] && bash bench/peakmem.sh "$OLD" ppl "$SYN/m2" --text "$SYN/text.txt" --ctx 512 --max-tokens 2048 -q
        ;;
    uniform)
        rm -rf "$SYN/u" "$SYN/u.partial"
        bash bench/peakmem.sh ./mixbit convert "$SYN/m2" "$SYN/u" --uniform 1:4b_128g --cal "$SYN/text.txt" --rows 4 --length 512 --no-eval
        ;;
    measure)
        rm -rf "$SYN/me" "$SYN/me.partial"
        MB_TEST_KILL=quant:0 bash bench/peakmem.sh ./mixbit convert "$SYN/m1e2" "$SYN/me" --bpw 3.5 --cal "$SYN/text.txt" --measure-rows 4 --rows 4 --length 512 --no-eval
        rm -rf "$SYN/me.partial"
        ;;
    esac
done
