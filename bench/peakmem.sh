#!/bin/bash
# bench/peakmem.sh CMD [ARGS...]: run CMD and report its peak anonymous memory on stderr.
# RssAnon (heap, stacks, anonymous mmaps) is sampled from /proc/PID/status every 20 ms; file-backed pages (the
# checkpoint's mmap, which belongs to the page cache) are not counted. Also prints the peak total RSS (VmHWM).
# Exit status: CMD's.
"$@" &
pid=$!
peak=0
hwm=0
while kill -0 "$pid" 2>/dev/null; do
    read -r a h < <(awk '/^RssAnon:/{a=$2} /^VmHWM:/{h=$2} END{print a+0, h+0}' "/proc/$pid/status" 2>/dev/null)
    [ -n "$a" ] && [ "$a" -gt "$peak" ] && peak=$a
    [ -n "$h" ] && [ "$h" -gt "$hwm" ] && hwm=$h
    sleep 0.02
done
wait "$pid"
rc=$?
awk -v a="$peak" -v h="$hwm" -v rc="$rc" -v cmd="$*" 'BEGIN { printf "peakmem: peak RssAnon %.1f MB, peak RSS (VmHWM) %.1f MB, exit %d: %s\n", a / 1024, h / 1024, rc, cmd }' >&2
exit $rc
