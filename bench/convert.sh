#!/bin/sh
# Conversion quality (issue 6): kjv-llama and kjv-mixtral at 3.5 and 2.5 bpw with measurement + allocation,
# against uniform-setting baselines (GPTQ, and round-to-nearest) of about the same or slightly higher size.
# Calibration: calib-kjv-jargon.txt (100 rows x 512); evaluation: kjv-eval.txt, paper convention, ctx 512.
# The "reference tables only" rows reuse the 3.5 bpw measurement, which has no extra option.
# Prints one markdown row per conversion.
cd "$(dirname "$0")/.." && make -s mixbit build/bench/bench_alloc >/dev/null || exit 1
S=${MB_SHARED:-../shared}
O=${OUT:-/tmp/mb_bench_convert}
rm -rf "$O"; mkdir -p "$O"
row() { # name dir
    python3 - "$1" "$2" <<'PY'
import json, sys
r = json.load(open(sys.argv[2] + "/mixbit-report.json")); e = r["eval"]
print("| %s | %.3f | %.4f | %.4f | %+.2f%% | %.5f | %.4f | %.2f |" % (sys.argv[1], r["decoder_bpw"], e["ppl_before"], e["ppl_after"],
      100 * (e["ppl_ratio"] - 1), e["kld_mean"], e["kld_p99"], e["same_top1_percent"]))
PY
}
conv() { # model out args...
    m=$1; o=$2; shift 2
    ./mixbit convert $S/models/$m "$O/$o" --cal $S/text/calib-kjv-jargon.txt --eval $S/text/kjv-eval.txt --eval-ctx 512 -q --fail-ppl-ratio 0 "$@" >/dev/null || exit 1
}
echo "| model / method | decoder bpw | ppl before | ppl after | change | KLD mean | KLD p99 | same top-1 % |"
echo "|---|---|---|---|---|---|---|---|"
for m in kjv-llama kjv-mixtral; do
    conv $m $m-3.5 --bpw 3.5;                                   row "$m, mixbit 3.5 (measure + allocate + GPTQ)" "$O/$m-3.5"
    conv $m $m-u35 --uniform 0.25:4b_128g/0.75:3b_128g;         row "$m, uniform 0.25:4b/0.75:3b g128, GPTQ" "$O/$m-u35"
    conv $m $m-r36 --uniform 0.4:4b_128g/0.6:3b_128g --rtn;     row "$m, uniform 0.4:4b/0.6:3b g128, RTN" "$O/$m-r36"
    conv $m $m-2.5 --bpw 2.5;                                   row "$m, mixbit 2.5 (tables + 1:2b_32g, see README)" "$O/$m-2.5"
    conv $m $m-2.5r --bpw 2.5 --measurement "$O/$m-3.5/measurement.json"; row "$m, mixbit 2.5, reference tables only" "$O/$m-2.5r"
    conv $m $m-u25 --uniform 0.3:3b_64g/0.7:2b_64g;             row "$m, uniform 0.3:3b/0.7:2b g64, GPTQ" "$O/$m-u25"
    conv $m $m-r26 --uniform 0.4:3b_64g/0.6:2b_64g --rtn;       row "$m, uniform 0.4:3b/0.6:2b g64, RTN" "$O/$m-r26"
    ./build/bench/bench_alloc $S/models/$m "$O/$m-2.5/measurement.json" 2.5 3.0 3.5 >> "$O/alloc.txt"
done
cat "$O/alloc.txt"
