#!/usr/bin/env bash
# Host FUSE benchmark: a rootfs-sized image built from this machine's own files, read through `rafsd fuse`
# and natively from the source tree, in one run. Prints MB/s, IOPS, walk time and peak RSS, each with its
# ratio to native.
#   ci/bench-fuse.sh [SOURCE_DIR...]     (default: /usr/lib/python3.11 /usr/lib/gcc /usr/share/doc)
# Page caches are dropped before every cold/warm measurement (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
ci/install-deps.sh
cargo build --release -q
bin=$PWD/target/release/rafsd
. ci/lib/fuse-bench.sh
fuse_bench_work bench-fuse "$@"
bytes=$(du -sb "$work/src" | cut -f1)
files=$(find "$work/src" -type f | wc -l)
echo "source tree: $((bytes / 1048576)) MiB, $files files"
/usr/bin/time -f "build: %e s, peak RSS %M KiB" "$bin" build "$work/src" --bootstrap "$work/bootstrap" --blob-dir "$work/blobs" -l warn >/dev/null

cat >"$work/config.json" <<JSON
{"device":{"backend":{"type":"localfs","config":{"dir":"$work/blobs"}},
           "cache":{"type":"blobcache","config":{"work_dir":"$work/cache"}}},
 "mode":"direct","amplify_io":1048576}
JSON

mount_rafsd() {
    "$bin" --config "$work/config.json" --bootstrap "$work/bootstrap" --mountpoint "$work/mnt" --thread-num 4 -l warn &
    pid=$!
    for _ in $(seq 200); do mountpoint -q "$work/mnt" && return; sleep 0.05; done
    echo "rafsd did not mount" >&2; exit 1
}
unmount_rafsd() { kill "$pid"; wait "$pid" || true; pid=; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
# Sequential read of every file of at least 1 MiB; prints MB/s.
seq_read() {
    local root=$1 t0 t1 n
    n=$(find "$root" -type f -size +1023k -printf '%s\n' | awk '{s+=$1} END {print s}')
    t0=$(now); find "$root" -type f -size +1023k -print0 | xargs -0 cat >/dev/null; t1=$(now)
    awk -v n="$n" -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", n / (b - a) / 1e6}'
}
# Random 4 KiB reads over the large files for a fixed count; prints IOPS.
rand_read() {
    python3 - "$1" <<'PY'
import os, random, sys, time
root = sys.argv[1]
files = []
for d, _, names in os.walk(root):
    for n in names:
        p = os.path.join(d, n)
        if not os.path.islink(p) and os.path.getsize(p) >= 1 << 20:
            files.append((p, os.path.getsize(p)))
rng = random.Random(7)
fds = [(os.open(p, os.O_RDONLY), s) for p, s in files]
count = 20000
t0 = time.perf_counter()
for _ in range(count):
    fd, size = fds[rng.randrange(len(fds))]
    os.pread(fd, 4096, rng.randrange(0, size - 4096) & ~4095)
print(f"{count / (time.perf_counter() - t0):.0f}")
PY
}
walk() {
    local t0 t1
    t0=$(now); find "$1" -ls >/dev/null; t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}'
}

drop; native_seq=$(seq_read "$work/src")
drop; native_rand=$(rand_read "$work/src")
drop; native_walk=$(walk "$work/src")

mount_rafsd
drop; cold_seq=$(seq_read "$work/mnt")          # chunks fetched from the blob dir, decompressed, cached
unmount_rafsd
mount_rafsd
drop; warm_seq=$(seq_read "$work/mnt")          # chunks served from the cache files
drop; warm_rand=$(rand_read "$work/mnt")
drop; fuse_walk=$(walk "$work/mnt")
rss=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
unmount_rafsd

printf '\n%-34s %12s %12s %8s\n' measurement rafsd native ratio
row() { awk -v m="$1" -v r="$2" -v n="$3" -v u="$4" 'BEGIN {printf "%-34s %12s %12s %8.2f\n", m " (" u ")", r, n, r / n}'; }
row "sequential read, cold" "$cold_seq" "$native_seq" "MB/s"
row "sequential read, warm" "$warm_seq" "$native_seq" "MB/s"
row "random 4 KiB read, warm" "$warm_rand" "$native_rand" "IOPS"
row "find -ls walk" "$fuse_walk" "$native_walk" "s"
echo "rafsd peak RSS: $rss KiB"
