#!/bin/sh
# Build the seed corpora of the fuzz targets from the reference images in ../shared/fixtures/rafs.
# Usage: tests/fuzz/seed.sh [FIXTURES_DIR]   (run from anywhere; writes tests/fuzz/corpus/<target>/)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
fixtures=${1:-$here/../../../shared/fixtures/rafs}
[ -d "$fixtures" ] || { echo "no fixtures at $fixtures" >&2; exit 1; }

meta=$here/corpus/metadata
inline=$here/corpus/inline_blob
mkdir -p "$meta" "$inline"

for dir in "$fixtures"/*/; do
    case=$(basename "$dir")
    boot=$dir/bootstrap
    if [ -f "$boot" ]; then
        # Whole bootstraps (650-820 KiB: run with -max_len=1048576) and prefixes of them, so the fuzzer
        # starts from both complete images and small inputs that reach the superblock and table parsers.
        cp "$boot" "$meta/$case-full"
        for kib in 4 8 16 64; do
            head -c $((kib * 1024)) "$boot" > "$meta/$case-head$kib"
        done
    fi
    if [ -f "$dir/bootstrap.external" ]; then
        cp "$dir/bootstrap.external" "$meta/$case-external"
    fi
    # A blob tail: the chunk-info array, ToC and (for inline-meta) the bootstrap all live at the end.
    for blob in "$dir"/blobs/*; do
        [ -f "$blob" ] || continue
        tail -c 16384 "$blob" > "$inline/$case-tail16k"
        if [ "$case" = v6-inline-meta ]; then
            # The whole inline-meta blob is 5.5 MiB; its last 1 MiB holds image.boot, the ToC and their
            # tar headers, which is what the inline extraction path reads.
            tail -c 1048576 "$blob" > "$inline/$case-tail1m"
            tail -c 1048576 "$blob" > "$meta/$case-tail1m"
        fi
    done
done
echo "seeded: $(ls "$meta" | wc -l) metadata inputs, $(ls "$inline" | wc -l) inline_blob inputs"
