#!/bin/sh
# Run every test program given as an argument; add up their "N passed, N failed, N skipped" lines.
# Exit non-zero when any program fails, crashes or prints no summary.
P=0; F=0; S=0; BAD=0
for t in "$@"; do
    echo "== $t" >&2
    t0=$(date +%s)
    out=$("$t"); rc=$?
    t1=$(date +%s)
    line=$(printf '%s\n' "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$' | tail -1)
    if [ -z "$line" ]; then echo "$t: no summary line (exit $rc)" >&2; BAD=$((BAD+1)); continue; fi
    echo "   $line ($((t1 - t0)) s)" >&2
    p=$(echo "$line" | awk '{print $1}'); f=$(echo "$line" | awk '{print $3}'); s=$(echo "$line" | awk '{print $5}')
    P=$((P+p)); F=$((F+f)); S=$((S+s))
    if [ $rc -ne 0 ] && [ "$f" = "0" ]; then echo "$t: exit $rc" >&2; BAD=$((BAD+1)); fi
done
[ $BAD -ne 0 ] && F=$((F+BAD))
echo "$P passed, $F failed, $S skipped"
[ $F -eq 0 ]
