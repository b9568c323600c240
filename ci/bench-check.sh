#!/usr/bin/env bash
# Benchmark `rafsd check` (read + decompress + verify every chunk) against `cat` of the same tree unpacked on
# the host, in one run, for each reference image. Prints MB/s, the ratio to cat, and peak RSS.
# Usage: ci/bench-check.sh [ROUNDS]   (both sides read from a warm page cache; ROUNDS repeats each side)
set -euo pipefail
cd "$(dirname "$0")/.."
ci/install-deps.sh
cargo build --release -q
rounds=${1:-5}
fixtures=${RAFSD_FIXTURES:-tests/fixtures/rafs}
work=$(mktemp -d /tmp/rafsd-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
bin=target/release/rafsd

now() { date +%s.%N; }
printf '%-26s %10s %10s %8s %10s %10s\n' case check_MB/s cat_MB/s ratio check_RSS cat_RSS
while read -r line; do
    case=${line%%:*}
    bootstrap=$fixtures/$case/bootstrap
    [ -f "$bootstrap" ] || bootstrap=$(ls "$fixtures/$case"/blobs/*)
    blobs=$fixtures/$case/blobs
    $bin unpack "$bootstrap" --blob-dir "$blobs" --output "$work/$case" >/dev/null
    bytes=$(find "$work/$case" -type f -links 1 -printf '%s\n' | awk '{s+=$1} END {print s}')
    # Warm both sides once, then time ROUNDS passes each.
    $bin check "$bootstrap" --blob-dir "$blobs" >/dev/null
    find "$work/$case" -type f -print0 | xargs -0 cat >/dev/null
    t0=$(now); for _ in $(seq "$rounds"); do $bin check "$bootstrap" --blob-dir "$blobs" >/dev/null; done; t1=$(now)
    for _ in $(seq "$rounds"); do find "$work/$case" -type f -print0 | xargs -0 cat >/dev/null; done; t2=$(now)
    rss_check=$( { /usr/bin/time -f %M $bin check "$bootstrap" --blob-dir "$blobs" >/dev/null; } 2>&1 | tail -1)
    rss_cat=$( { /usr/bin/time -f %M sh -c "find '$work/$case' -type f -print0 | xargs -0 cat >/dev/null"; } 2>&1 | tail -1)
    awk -v c="$case" -v b="$bytes" -v r="$rounds" -v a="$t0" -v m="$t1" -v z="$t2" -v rc="$rss_check" -v rt="$rss_cat" 'BEGIN {
        ck = b * r / (m - a) / 1e6; ct = b * r / (z - m) / 1e6;
        printf "%-26s %10.1f %10.1f %8.2f %8dKiB %8dKiB\n", c, ck, ct, ck / ct, rc, rt }'
    rm -rf "${work:?}/$case"
done < "$fixtures/CASES"
