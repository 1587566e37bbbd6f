#!/bin/sh
# Perplexity speed (issue 4): kjv-llama and kjv-mixtral on kjv-eval.txt, llama.cpp convention, ctx 256,
# 5 runs each; prints every run's tok/s and the median.
cd "$(dirname "$0")/.." && make -s mixbit >/dev/null || exit 1
S=${MB_SHARED:-../shared}
for m in kjv-llama kjv-mixtral; do
    rates=""
    for i in 1 2 3 4 5; do
        r=$(./mixbit ppl $S/models/$m --text $S/text/kjv-eval.txt --convention llamacpp --ctx 256 --json -q | sed 's/.*"tok_per_s": \([0-9.]*\).*/\1/')
        rates="$rates $r"
    done
    med=$(echo $rates | tr ' ' '\n' | sort -n | sed -n 3p)
    echo "$m: tok/s$rates; median $med"
done
