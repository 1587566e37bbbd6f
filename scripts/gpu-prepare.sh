#!/bin/sh
# On the developer machine, before a device call: copy what `make gpu-check` needs from ../shared into .gpu/
# (ignored by git; the device machine gets the repository only, so name .gpu in the call's `carry`). The demo
# model (demo/kjv-llama) is kjv-llama itself and travels with the repository. About 36 MB.
set -e
cd "$(dirname "$0")/.."
S=${MB_SHARED:-../shared}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu/models .gpu/text .gpu/tokenizers
mkdir -p .gpu/models .gpu/text .gpu/tokenizers/llama2
cp -r "$S/models/kjv-mixtral" .gpu/models/
cp "$S/tokenizers/llama2/tokenizer.json" "$S/tokenizers/llama2/tokenizer_config.json" .gpu/tokenizers/llama2/ 2>/dev/null || \
    cp "$S/tokenizers/llama2/tokenizer.json" .gpu/tokenizers/llama2/
cp "$S/text/calib-kjv-jargon.txt" "$S/text/kjv-eval.txt" "$S/text/wikitext-2-raw-test.txt" .gpu/text/
du -sh .gpu
echo "gpu-prepare: done; call the device with carry [\".gpu\"] and: make gpu-check"
