#!/usr/bin/env bash
# Benchmark `rafsd build` over a few hundred MB of real files copied from this machine: build throughput
# (MB/s of file data) and peak RSS, single- vs multi-threaded, per compressor; then `rafsd check` of the built
# image beside `cat` of the same tree (MB/s and their ratio), the figure the reader issue tracks.
# Usage: ci/bench-build.sh [ROUNDS]
#   BENCH_SOURCES  directories to copy (default: parts of /usr/lib and /usr/share, ~350 MB)
#   BENCH_COMPRESSORS  compressors to time (default: "zstd lz4_block none")
# Both sides read from a warm page cache; ROUNDS repeats the check/cat timing (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
ci/install-deps.sh
cargo build --release -q --bin rafsd
bin=${CARGO_TARGET_DIR:-target}/release/rafsd
rounds=${1:-3}
sources=${BENCH_SOURCES:-/usr/lib/gcc /usr/lib/python3 /usr/lib/python3.11 /usr/share/doc /usr/share/perl /usr/share/i18n}
compressors=${BENCH_COMPRESSORS:-zstd lz4_block none}
work=$(mktemp -d /tmp/rafsd-bench-build.XXXXXX)
trap 'rm -rf "$work"' EXIT

mkdir "$work/src"
for s in $sources; do
    if [ -d "$s" ]; then
        dest="$work/src/$(echo "${s#/}" | tr / _)"
        cp -a "$s" "$dest"
    fi
done
# Sockets cannot go into an image (the builder skips them with a warning); none are expected here.
find "$work/src" -type s -delete
# Hard-linked files count once, as the builder stores them once.
bytes=$(find "$work/src" -type f -printf '%i %s\n' | sort -u | awk '{s+=$2} END {print s}')
files=$(find "$work/src" -type f | wc -l)
entries=$(find "$work/src" | wc -l)
threads_max=$(nproc)
echo "source: $entries entries, $files files, $bytes bytes ($(awk -v b="$bytes" 'BEGIN {printf "%.0f", b/1e6}') MB) from: $sources"
find "$work/src" -type f -print0 | xargs -0 cat >/dev/null   # warm the page cache

now() { date +%s.%N; }
printf '%-10s %8s %10s %10s %12s %14s\n' compressor threads seconds build_MB/s peak_RSS blob_bytes
for compressor in $compressors; do
    for threads in 1 "$threads_max"; do
        rm -rf "$work/out"
        /usr/bin/time -f '%e %M' -o "$work/time" \
            "$bin" build "$work/src" --bootstrap "$work/out/bootstrap" --blob-dir "$work/out/blobs" \
            --compressor "$compressor" --threads "$threads" >"$work/build.log"
        read -r secs rss <"$work/time"
        blob=$(find "$work/out/blobs" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
        awk -v c="$compressor" -v t="$threads" -v s="$secs" -v b="$bytes" -v r="$rss" -v z="$blob" 'BEGIN {
            printf "%-10s %8d %10.2f %10.1f %9dKiB %14d\n", c, t, s, b / s / 1e6, r, z }'
    done
done

# The default image (zstd, all threads) read back: rafsd check (read + decompress + verify every chunk)
# against cat of the same tree.
rm -rf "$work/out"
"$bin" build "$work/src" --bootstrap "$work/out/bootstrap" --blob-dir "$work/out/blobs" >/dev/null
"$bin" check "$work/out/bootstrap" --blob-dir "$work/out/blobs" >/dev/null
t0=$(now); for _ in $(seq "$rounds"); do "$bin" check "$work/out/bootstrap" --blob-dir "$work/out/blobs" >/dev/null; done; t1=$(now)
for _ in $(seq "$rounds"); do find "$work/src" -type f -print0 | xargs -0 cat >/dev/null; done; t2=$(now)
rss_check=$( { /usr/bin/time -f %M "$bin" check "$work/out/bootstrap" --blob-dir "$work/out/blobs" >/dev/null; } 2>&1 | tail -1)
awk -v b="$bytes" -v r="$rounds" -v a="$t0" -v m="$t1" -v z="$t2" -v rc="$rss_check" 'BEGIN {
    ck = b * r / (m - a) / 1e6; ct = b * r / (z - m) / 1e6;
    printf "check of the zstd image: %.1f MB/s, cat: %.1f MB/s, ratio %.2f, check peak RSS %dKiB\n", ck, ct, ck / ct, rc }'
