#!/bin/bash
# Quality on a real trained model (issue 13 item 4): SmolLM2-135M converted at 2.5 ... 5.0 bpw, perplexity and
# KL divergence against the F32 model on held-out wikitext-2, for comparison with llama.cpp's imatrix types.
#
#   bench/smollm2.sh [BPW...]            (default: 2.5 3.0 3.5 4.0 4.5 5.0; WORK=dir, default /tmp/mb-smollm2;
#                                         MIXBIT=binary, default ./mixbit rebuilt)
#   EXTRA="--head-bits 8" TAG=h8 bench/smollm2.sh 4.0     (variants: extra convert options, a tag for the run)
#
# The model: ../shared/tools/get-smollm2.sh WORK/f32 --digits (F32 and a BF16 copy in WORK/f32-bf16; the
# BF16 copy is converted, the F32 one is the reference). Texts: wikitext-2-raw-test.txt cut at the first
# newline at or after byte 648,185; the first half calibrates (64 rows x 512 tokens, the same amount as
# llama.cpp's imatrix run), the second half evaluates: llama.cpp convention, chunks of 512, the first 16
# (8192 tokens, 4080 scored), without BOS as the model's tokenizer_config says. The reference keeps the
# top 4096 log-probabilities per position (the rest as one mass: a bound within about 1e-6 of the full KLD
# for this 49152-token vocabulary). The first conversion measures; the others reuse its measurement.json.
# Results: WORK/runs/NAME.{json,ppl.json,err,du}; a table on stdout.
set -u
cd "$(dirname "$0")/.."
S=${MB_SHARED:-../shared}
W=${WORK:-/tmp/mb-smollm2}
TAG=${TAG:-}
mkdir -p "$W/runs"
if [ -n "${MIXBIT:-}" ]; then M=$MIXBIT; else make -s mixbit >/dev/null || exit 1; M=$PWD/mixbit; fi
[ -f "$W/f32/model.safetensors" ] || sh "$S/tools/get-smollm2.sh" "$W/f32" --digits || exit 1
BF=$W/f32-bf16
if [ ! -f "$W/cal-half.txt" ]; then
    python3 - "$S/text/wikitext-2-raw-test.txt" "$W" <<'PY'
import sys
t = open(sys.argv[1], 'rb').read()
cut = t.index(b'\n', 648185) + 1
open(sys.argv[2] + '/cal-half.txt', 'wb').write(t[:cut])
open(sys.argv[2] + '/eval-half.txt', 'wb').write(t[cut:])
PY
fi
EV="--text $W/eval-half.txt --convention llamacpp --ctx 512 --max-tokens 8192"
[ -f "$W/runs/f32.lp" ] || $M ppl "$W/f32" $EV --topk 4096 --save-logprobs "$W/runs/f32.lp" --json > "$W/runs/f32.ppl.json" || exit 1
CAL="--cal $W/cal-half.txt --rows 64 --measure-rows 64 --length 512"
first=""
for b in ${*:-2.5 3.0 3.5 4.0 4.5 5.0}; do
    n=bpw$b$TAG
    meas=""
    if [ -f "$W/runs/measurement.json" ]; then meas="--measurement $W/runs/measurement.json"; fi
    rm -rf "$W/runs/$n" "$W/runs/$n.partial"
    /usr/bin/time -v $M convert "$BF" "$W/runs/$n" --bpw "$b" $CAL $meas --no-eval --json ${EXTRA:-} > "$W/runs/$n.json" 2> "$W/runs/$n.err" || { tail -3 "$W/runs/$n.err"; exit 1; }
    [ -f "$W/runs/measurement.json" ] || cp "$W/runs/$n/measurement.json" "$W/runs/measurement.json"
    $M ppl "$W/runs/$n" $EV --kld "$W/runs/f32.lp" --json > "$W/runs/$n.ppl.json" || exit 1
    du -sb "$W/runs/$n" > "$W/runs/$n.du"
done
echo "| run | decoder bpw | head bpw | output bytes | ppl | KLD mean | KLD p99 | same top-1 % | convert s | peak RSS MB |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for f in "$W"/runs/bpw*.ppl.json; do
    n=$(basename "$f" .ppl.json)
    python3 - "$W/runs/$n" <<'PY'
import json, re, sys
p = sys.argv[1]
c = json.load(open(p + '.json')); e = json.load(open(p + '.ppl.json'))
err = open(p + '.err').read()
rss = int(re.search(r'Maximum resident set size \(kbytes\): (\d+)', err).group(1)) / 1024
du = int(open(p + '.du').read().split()[0])
print(f"| {p.split('/')[-1]} | {c['decoder_bpw']:.3f} | {c['head_bpw']:.2f} | {du:,} | {e['ppl']:.3f} | {e['kld_mean']:.4f} | {e['kld_p99']:.3f} | {e['same_top1']:.1f} | {c['seconds']:.0f} | {rss:.0f} |")
PY
done
