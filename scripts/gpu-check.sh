#!/bin/bash
# `make gpu-check`: everything CUDA in mixbit, checked and measured in one command on a GPU machine (under 10
# minutes on an H100). Run scripts/gpu-prepare.sh on the developer machine first and carry .gpu (the device
# machine has no ../shared; ../shared is used instead when present).
#
#   1. build (CUDA, sm_90), then every GPU test against its CPU twin on fresh random inputs (test_ops: the ops
#      table and GPTQ; test_kernels: the EXL2 kernels), MB_REQUIRE_GPU=1 so a missing GPU fails
#   2. compute-sanitizer: memcheck over both test programs, racecheck over the EXL2 kernels
#   3. kjv-llama (the demo) and kjv-mixtral converted at 3.5 bpw on the GPU and on the CPU; compared: the
#      measured accuracies (max difference), the chosen options, perplexity after (within 0.1%)
#   4. the EXL2 kernel benchmark (bench_kernels)
#   5. a synthetic Mixtral-8x7B-shape model of one decoder layer (bench/synth_model): conversion on the GPU at
#      the default calibration (16 x 2048 tokens measured, 100 x 2048 quantized) with stage times and peak
#      device memory (nvidia-smi every 0.2 s); GPU perplexity speed on it and on kjv-mixtral
#
# Results in $OUT (default bench/gpu-out): summary.md, and gpu-check.tgz with every log and report.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu-out}
mkdir -p "$OUT"
L=$(mktemp -d /tmp/gpu-check.XXXXXX)
W=/tmp/gpu-check-work
rm -rf "$W"
mkdir -p "$W"
if [ -d ../shared/models/kjv-mixtral ]; then S=../shared; T=../shared/tokenizers/llama2; else S=.gpu; T=.gpu/tokenizers/llama2; fi
SUM="$OUT/summary.md"
echo "# gpu-check $(date -u +%Y-%m-%dT%H:%MZ)" > "$SUM"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$SUM" 2>&1
echo "" >> "$SUM"
echo "| step | exit | seconds |" >> "$SUM"
echo "|---|---|---|" >> "$SUM"

step() { # step NAME CMD...: run, log to $L/NAME.log, one summary row
    local name=$1
    shift
    local t0=$(date +%s.%N)
    "$@" > "$L/$name.log" 2>&1
    local rc=$?
    awk -v n="$name" -v rc="$rc" -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "| %s | %d | %.1f |\n", n, rc, b - a }' >> "$SUM"
    tail -n 3 "$L/$name.log" | sed "s/^/    [$name] /"
    return $rc
}

step build make -j16 mixbit build/tests/test_ops build/tests/test_kernels build/bench/bench_kernels build/bench/synth_model
./mixbit gpu > "$L/mixbit-gpu.txt" 2>&1
cat "$L/mixbit-gpu.txt"
export MB_REQUIRE_GPU=1
step test_ops ./build/tests/test_ops
step test_kernels ./build/tests/test_kernels
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
step memcheck_ops "$CS" --tool memcheck --error-exitcode 1 ./build/tests/test_ops
step memcheck_kernels "$CS" --tool memcheck --error-exitcode 1 ./build/tests/test_kernels --quick
step racecheck_kernels "$CS" --tool racecheck --error-exitcode 1 ./build/tests/test_kernels --quick
unset MB_REQUIRE_GPU

# 3. the same conversions on both devices
for m in kjv-llama kjv-mixtral; do
    src=$S/models/$m
    [ "$m" = kjv-llama ] && src=demo/kjv-llama
    for d in cuda cpu; do
        step "convert_${m}_$d" /usr/bin/time -v ./mixbit convert "$src" "$W/$m-$d" --device "$d" --bpw 3.5 --cal "$S/text/calib-kjv-jargon.txt" \
            --eval "$S/text/kjv-eval.txt" --json
        cp "$W/$m-$d/mixbit-report.json" "$L/$m-$d-report.json" 2>/dev/null
        cp "$W/$m-$d/measurement.json" "$L/$m-$d-measurement.json" 2>/dev/null
    done
done
python3 - "$L" >> "$SUM" <<'PY'
import json, sys, os
L = sys.argv[1]
print("\n## GPU vs CPU conversions (3.5 bpw, calib-kjv-jargon, kjv-eval, paper ctx 512)\n")
print("| model | max abs accuracy diff | options chosen alike | ppl after cuda / cpu | rel diff | KLD cuda / cpu | seconds cuda / cpu |")
print("|---|---|---|---|---|---|---|")
for m in ("kjv-llama", "kjv-mixtral"):
    try:
        a = json.load(open(f"{L}/{m}-cuda-measurement.json"))["measurement"]; b = json.load(open(f"{L}/{m}-cpu-measurement.json"))["measurement"]
        ra = json.load(open(f"{L}/{m}-cuda-report.json")); rb = json.load(open(f"{L}/{m}-cpu-report.json"))
    except Exception as e:
        print(f"| {m} | missing: {e} |"); continue
    md = max(abs(x["accuracy"] - y["accuracy"]) for k in a for x, y in zip(a[k], b[k]))
    same = sum(x["option"] == y["option"] for x, y in zip(ra["modules"], rb["modules"]))
    pa, pb = ra["eval"]["ppl_after"], rb["eval"]["ppl_after"]
    print(f"| {m} | {md:.2e} | {same}/{len(ra['modules'])} | {pa:.4f} / {pb:.4f} | {pa / pb - 1:+.2e} | {ra['eval']['kld_mean']:.5f} / {rb['eval']['kld_mean']:.5f} | {ra['seconds']:.1f} / {rb['seconds']:.1f} |")
PY

# 4. kernels
step bench_kernels ./build/bench/bench_kernels
cp "$L/bench_kernels.log" "$OUT/bench_kernels.md"

# 5. a Mixtral-8x7B-shape layer on the GPU: conversion time per layer, device memory, perplexity speed
step synth ./build/bench/synth_model "$W/syn" mixtral-8x7b 1 "$T"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$L/gpu-mem.csv" 2>/dev/null &
SMI=$!
step convert_synth ./mixbit convert "$W/syn" "$W/syn-3.5" --device cuda --bpw 3.5 --cal "$S/text/calib-kjv-jargon.txt" --no-eval --json
kill $SMI 2>/dev/null
cp "$W/syn-3.5/mixbit-report.json" "$L/synth-report.json" 2>/dev/null
step ppl_synth ./mixbit ppl "$W/syn" --device cuda --text "$S/text/wikitext-2-raw-test.txt" --ctx 2048 --max-tokens 32768 --json
step ppl_kjv_mixtral ./mixbit ppl "$S/models/kjv-mixtral" --device cuda --text "$S/text/kjv-eval.txt" --ctx 512 --json
step ppl_kjv_mixtral_cpu ./mixbit ppl "$S/models/kjv-mixtral" --device cpu --text "$S/text/kjv-eval.txt" --ctx 512 --json
python3 - "$L" >> "$SUM" <<'PY'
import json, sys
L = sys.argv[1]
print("\n## Synthetic Mixtral-8x7B-shape layer (hidden 4096, 8 experts of 14336, top-2), on the GPU\n")
try:
    r = json.load(open(f"{L}/synth-report.json")); s = r.get("stage_seconds", {})
    mem = [int(x) for x in open(f"{L}/gpu-mem.csv").read().split() if x.strip().isdigit()]
    print(f"- measurement {s.get('measure', 0):.1f} s, quantization {s.get('quantize', 0):.1f} s, head {s.get('head', 0):.1f} s per decoder layer "
          f"(calibration {r['calibration']['measurement_rows']} x {r['calibration']['length']} measured, {r['calibration']['rows']} x {r['calibration']['length']} quantized)")
    per = s.get('measure', 0) + s.get('quantize', 0)
    print(f"- extrapolated Mixtral-8x7B (32 layers): {32 * per / 60:.1f} min + head")
    print(f"- peak device memory (nvidia-smi, all processes): {max(mem) / 1024 if mem else float('nan'):.2f} GiB")
except Exception as e:
    print(f"- missing: {e}")
for n in ("ppl_synth", "ppl_kjv_mixtral", "ppl_kjv_mixtral_cpu"):
    try:
        d = json.loads([l for l in open(f"{L}/{n}.log") if l.startswith("{")][-1])
        print(f"- {n}: {d['tok_per_s']:.0f} tok/s, ppl {d['ppl']:.4f} over {d['tokens']} tokens")
    except Exception as e:
        print(f"- {n}: missing ({e})")
PY
tar czf "$OUT/gpu-check.tgz" -C "$L" .
cat "$SUM"
