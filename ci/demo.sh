#!/usr/bin/env bash
# The main job on an embedded default: open a sample RAFS image, verify every chunk, unpack it and show the
# tree. (The virtio-fs guest demo replaces this once the vhost-user-fs device lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
ci/install-deps.sh
cargo build --release -q
fixtures=${RAFSD_FIXTURES:-tests/fixtures/rafs}
case=${1:-v6-zstd-blake3}
bootstrap=$fixtures/$case/bootstrap
[ -f "$bootstrap" ] || bootstrap=$(ls "$fixtures/$case"/blobs/*)
out=$(mktemp -d /tmp/rafsd-demo.XXXXXX)
trap 'rm -rf "$out"' EXIT
echo "== rafsd inspect $bootstrap"
target/release/rafsd inspect "$bootstrap"
echo "== rafsd check (every chunk decompressed and digest-verified)"
target/release/rafsd check "$bootstrap" --blob-dir "$fixtures/$case/blobs"
echo "== rafsd unpack"
target/release/rafsd unpack "$bootstrap" --blob-dir "$fixtures/$case/blobs" --output "$out/tree"
ls -la "$out/tree/special" | head -30
