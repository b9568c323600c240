#!/usr/bin/env bash
# The read path's cost against another build of rafsd, in one run: cold reads (every chunk fetched from the
# blob dir, decompressed, verified and stored in the blob cache) and warm reads (every chunk a cache hit)
# of an image built from this machine's files, through `rafsd fuse` with validation off. The blob stays in
# the page cache, so the daemon's own work is what differs; each round runs both builds. Prints the median
# wall time (MB/s) and the median CPU seconds of the daemon, and the ratios this build / BASE_BIN.
#   ci/bench-cache.sh BASE_BIN [ROUNDS] [SOURCE_DIR...]   (DIGESTER=sha256 for a sha256 image)
# BASE_BIN: e.g. a release build of main (`git archive main | tar -x -C /tmp/base`, `cargo build --release`).
set -euo pipefail
cd "$(dirname "$0")/.."
base=$(realpath "$1") rounds=${2:-5}
shift 2 || shift $#
cargo build --release -q
new=$PWD/target/release/rafsd
. ci/lib/fuse-bench.sh
fuse_bench_work bench-cache "$@"
bytes=$(find "$work/src" -type f -printf '%s\n' | awk '{s+=$1} END {print s}')
echo "source tree: $((bytes / 1048576)) MiB in $(find "$work/src" -type f | wc -l) files, digester ${DIGESTER:-blake3}"
"$new" build "$work/src" --bootstrap "$work/bootstrap" --blob-dir "$work/blobs" --digester "${DIGESTER:-blake3}" -l warn >/dev/null
cat "$work/blobs"/* >/dev/null
cat >"$work/config.json" <<JSON
{"device":{"backend":{"type":"localfs","config":{"dir":"$work/blobs"}},
           "cache":{"type":"blobcache","config":{"work_dir":"$work/cache"}}},
 "mode":"direct","digest_validate":false}
JSON

now() { date +%s.%N; }
read_all() {
    local t0 t1
    t0=$(now); find "$work/mnt" -type f -print0 | xargs -0 cat >/dev/null; t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}'
}
mount_rafsd() {
    "$1" --config "$work/config.json" --bootstrap "$work/bootstrap" --mountpoint "$work/mnt" --thread-num 4 -l warn &
    pid=$!
    for _ in $(seq 200); do mountpoint -q "$work/mnt" && return; sleep 0.05; done
    echo "rafsd did not mount" >&2; exit 1
}
# CPU seconds (user + system, all threads) of a process and its children so far.
tree_cpu() {
    local total kids k
    total=$(awk -v hz="$(getconf CLK_TCK)" '{sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz}' "/proc/$1/stat")
    kids=$(cat /proc/"$1"/task/*/children 2>/dev/null || true)
    for k in $kids; do total=$(awk -v a="$total" -v b="$(tree_cpu "$k")" 'BEGIN {printf "%.2f", a + b}'); done
    echo "$total"
}
# Read everything once through a fresh mount: "wall-seconds cpu-seconds".
timed_pass() {
    local wall cpu
    mount_rafsd "$1"; wall=$(read_all); cpu=$(tree_cpu "$pid")
    kill "$pid"; wait "$pid" || true; pid=
    echo "$wall $cpu"
}
declare -A wall cpu
for _ in $(seq "$rounds"); do
    for name in base new; do
        bin=$base; [ $name = new ] && bin=$new
        rm -rf "$work/cache"
        for kind in cold warm; do
            read -r w c < <(timed_pass "$bin")
            wall[$name-$kind]+="$w "; cpu[$name-$kind]+="$c "
        done
    done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for kind in cold warm; do
    bw=$(echo "${wall[base-$kind]}" | median); nw=$(echo "${wall[new-$kind]}" | median)
    bc=$(echo "${cpu[base-$kind]}" | median); nc=$(echo "${cpu[new-$kind]}" | median)
    awk -v k=$kind -v bw="$bw" -v nw="$nw" -v bc="$bc" -v nc="$nc" -v n="$bytes" 'BEGIN {
        printf "%s read: base %.0f MB/s, this build %.0f MB/s (time ratio %.3f); daemon CPU base %.2f s, this build %.2f s (ratio %.3f)\n",
            k, n / bw / 1e6, n / nw / 1e6, nw / bw, bc, nc, nc / bc }'
    echo "  rounds: wall base [${wall[base-$kind]}] this [${wall[new-$kind]}]; cpu base [${cpu[base-$kind]}] this [${cpu[new-$kind]}]"
done
