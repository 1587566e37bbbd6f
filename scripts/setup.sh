#!/bin/sh
# Install the Debian packages mixbit builds with. A no-op when they are all present.
# Build tools (gcc, make, clang for `make fuzz`) and the CUDA toolkit are expected from the machine image;
# without nvcc the build simply leaves CUDA out.
set -e
# libssl-dev: libcrypto for SHA-256 (mixbit-manifest.json); librsvg2-bin: rsvg-convert, the tests rasterize the chart
PKGS="make gcc libjansson-dev zlib1g-dev libpcre2-dev libutf8proc-dev libopenblas-openmp-dev pkg-config libssl-dev librsvg2-bin"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup: installing$missing" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
echo "setup: dependencies present" >&2
