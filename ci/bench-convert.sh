#!/usr/bin/env bash
# `rafsd convert` benchmark: a Debian bookworm rootfs (debootstrap --variant=minbase, made here and kept in
# target/bench-convert) as a two-layer OCI image (everything but /usr/share, then /usr/share; tar+gzip) in a
# local Debian `docker-registry`, pushed with rafsd's own registry client, converted with `rafsd convert`
# cold (no cache, empty target repository) and warm (layer cache), against a baseline in the same run:
# curl pulling the same layers plus `rafsd build` of each. Prints the medians, their ratio, and the bytes
# pushed against the source's compressed size.
#   ci/bench-convert.sh [ROUNDS]   (default 3; mirror: $RAFSD_BENCH_MIRROR, default http://deb.debian.org/debian)
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib/registry.sh
ci/install-deps.sh
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
rounds=${1:-3}
cache=$PWD/target/bench-convert
mirror=${RAFSD_BENCH_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$cache"
if [ ! -s "$cache/layer-2.tar.gz" ]; then
    rm -rf "$cache/rootfs"
    echo "debootstrap --variant=minbase bookworm from $mirror (once; kept in $cache)"
    debootstrap --variant=minbase bookworm "$cache/rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
        { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
    tar --numeric-owner --xattrs -C "$cache/rootfs" --exclude=./usr/share -cf - . | gzip -6 >"$cache/layer-1.tar.gz"
    tar --numeric-owner --xattrs -C "$cache/rootfs" -cf - ./usr/share | gzip -6 >"$cache/layer-2.tar.gz"
    rm -rf "$cache/rootfs"
fi
cargo build --release -q
work=$(mktemp -d /tmp/rafsd-bench-convert.XXXXXX)
reg=
cleanup() {
    [ -n "$reg" ] && kill "$reg" 2>/dev/null && wait "$reg" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
registry_config "$work/registry.yml" "$work/storage" tcp "127.0.0.1:$port"
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
reg=$!
wait_for_url "http://127.0.0.1:$port/v2/"
mkdir -p "$work/convert"
cargo bench -q --bench convert -- --registry "127.0.0.1:$port" --rafsd "$PWD/target/release/rafsd" \
    --work "$work/convert" --rounds "$rounds" "$cache/layer-1.tar.gz" "$cache/layer-2.tar.gz"
