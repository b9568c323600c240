#!/usr/bin/env bash
# Host FUSE benchmark: a rootfs-sized image built from this machine's own files, read through `rafsd fuse`
# and natively from the source tree (on the same filesystem as the blob cache), in one run. Prints the median
# over ROUNDS of MB/s, IOPS and walk time, each with its ratio to native, then the peak RSS of one daemon
# serving IMAGES mounts of the image while READERS processes stream large files from them.
#   [RAFSD_BENCH_BASE=BIN] ci/bench-fuse.sh [--rounds N] [--images N] [--readers N] [SOURCE_DIR...]
#   (defaults: 3 rounds, 20 images, 8 readers; sources /usr/lib/python3.11 /usr/lib/gcc /usr/share/doc)
# Page, dentry and inode caches are dropped (echo 3 > drop_caches) before every measurement of either side,
# so both start cold from the disk (needs root). The daemons run with the default --thread-num.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3 images=20 readers=8
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --images) images=$2; shift 2 ;;
        --readers) readers=$2; shift 2 ;;
        *) break ;;
    esac
done
ci/install-deps.sh
cargo build --release -q
bin=$PWD/target/release/rafsd
# RAFSD_BENCH_BASE: another rafsd binary (e.g. a release build of main) measured in the same rounds.
declare -A bins=([rafsd]=$bin)
names=(rafsd)
if [ -n "${RAFSD_BENCH_BASE:-}" ]; then
    bins[base]=$(realpath "$RAFSD_BENCH_BASE")
    names+=(base)
fi
. ci/lib/fuse-bench.sh
fuse_bench_work bench-fuse "$@"
bytes=$(du -sb "$work/src" | cut -f1)
files=$(find "$work/src" -type f | wc -l)
entries=$(find "$work/src" | wc -l)
echo "source tree: $((bytes / 1048576)) MiB, $files files, $entries entries; $rounds rounds, medians"
# READ replies are spliced through pipes of at most this size (README, "Request processing").
echo "fs.pipe-max-size: $(cat /proc/sys/fs/pipe-max-size)"
/usr/bin/time -f "build: %e s, peak RSS %M KiB" "$bin" build "$work/src" --bootstrap "$work/bootstrap" --blob-dir "$work/blobs" -l warn >/dev/null

cat >"$work/config.json" <<JSON
{"device":{"backend":{"type":"localfs","config":{"dir":"$work/blobs"}},
           "cache":{"type":"blobcache","config":{"work_dir":"$work/cache"}}},
 "mode":"direct","amplify_io":1048576}
JSON

wait_mounted() {
    for _ in $(seq 200); do mountpoint -q "$1" && return; sleep 0.05; done
    echo "rafsd did not mount $1" >&2; exit 1
}
mount_rafsd() {
    "${bins[$1]}" --config "$work/config.json" --bootstrap "$work/bootstrap" --mountpoint "$work/mnt" -l warn &
    pid=$!
    wait_mounted "$work/mnt"
}
unmount_rafsd() { kill "$pid"; wait "$pid" || true; pid=; }
# Peak RSS (KiB) of the serving daemon: the process started is the sandbox supervisor, the daemon its child.
daemon_hwm() {
    local d
    d=$(pgrep -P "$pid" | head -1)
    [ -n "$d" ] || d=$pid
    awk '/VmHWM/ {print $2}' "/proc/$d/status"
}
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
# The files of at least 1 MiB, relative paths, listed once: the timed reads below walk no tree.
(cd "$work/src" && find . -type f -size +1023k -print0 | sort -z) >"$work/big.list"
big_bytes=$(cd "$work/src" && xargs -0 cat <"$work/big.list" | wc -c)
echo "sequential reads: $(tr -cd '\0' <"$work/big.list" | wc -c) files of at least 1 MiB, $((big_bytes / 1048576)) MiB"
# Sequential read of those files under ROOT, one after the other (caches dropped first); prints MB/s.
seq_read() {
    local t0 t1
    drop
    t0=$(now); (cd "$1" && xargs -0 cat <"$work/big.list" >/dev/null); t1=$(now)
    awk -v n="$big_bytes" -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", n / (b - a) / 1e6}'
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

declare -A got
for r in $(seq "$rounds"); do
    got[native_seq]+="$(seq_read "$work/src") "
    drop; got[native_rand]+="$(rand_read "$work/src") "
    drop; got[native_walk]+="$(walk "$work/src") "
    for b in "${names[@]}"; do
        rm -rf "$work/cache"
        mount_rafsd "$b"
        got[$b-cold_seq]+="$(seq_read "$work/mnt") "   # chunks fetched from the blob dir, decompressed, cached
        unmount_rafsd
        mount_rafsd "$b"
        got[$b-warm_seq]+="$(seq_read "$work/mnt") "   # chunks served from the cache files
        drop; got[$b-warm_rand]+="$(rand_read "$work/mnt") "
        drop; got[$b-walk]+="$(walk "$work/mnt") "
        got[$b-rss]+="$(daemon_hwm) "
        unmount_rafsd
    done
    echo "round $r done" >&2
done

median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
m() { echo "${got[$1]}" | median; }
row() {
    awk -v m="$1" -v r="$(m "$2")" -v n="$(m "$3")" -v u="$4" -v a="${got[$2]}" -v b="${got[$3]}" \
        'BEGIN {printf "%-34s %12s %12s %8.2f   %s| %s\n", m " (" u ")", r, n, r / n, a, b}'
}
for b in "${names[@]}"; do
    printf '\n%-34s %12s %12s %8s   %s\n' measurement "$b" native ratio "rounds ($b | native)"
    row "sequential read, cold" "$b-cold_seq" native_seq "MB/s"
    row "sequential read, warm" "$b-warm_seq" native_seq "MB/s"
    row "random 4 KiB read, warm" "$b-warm_rand" native_rand "IOPS"
    row "find -ls walk" "$b-walk" native_walk "s, ratio = × native time"
    echo "$b peak RSS, one image: $(m "$b-rss") KiB (rounds: ${got[$b-rss]})"
done

# Peak RSS of one daemon serving $images mounts (each its own copy of the image's metadata, one shared blob
# cache) while $readers processes stream the large files, each from its own mount, cold (fetch, decompress,
# verify, store), then warm.
mapfile -d '' -t big <"$work/big.list"
stream() {
    local k p kids=()
    for k in $(seq "$readers"); do
        (for p in "${big[@]}"; do cat "$work/multi/img$(( (k - 1) % images + 1 ))/$p"; done >/dev/null) &
        kids+=($!)
    done
    wait "${kids[@]}"   # not a bare wait: the daemon is a child too
}
body=$(python3 -c 'import json, sys; print(json.dumps({"source": sys.argv[1], "fs_type": "rafs", "config": open(sys.argv[2]).read()}))' \
    "$work/bootstrap" "$work/config.json")
for b in "${names[@]}"; do
    rm -rf "$work/cache" "$work/api.sock"
    mkdir -p "$work/multi" "$work/cache"
    "${bins[$b]}" fuse --mountpoint "$work/multi" --apisock "$work/api.sock" -l warn \
        --allow-path "$work/bootstrap" --allow-path "$work/blobs" --allow-path-rw "$work/cache" &
    pid=$!
    wait_mounted "$work/multi"
    for _ in $(seq 100); do [ -S "$work/api.sock" ] && break; sleep 0.05; done
    for i in $(seq "$images"); do
        curl -sf --unix-socket "$work/api.sock" -X POST -H 'Content-Type: application/json' -d "$body" \
            "http://localhost/api/v1/mount?mountpoint=/img$i" >/dev/null
    done
    rss_idle=$(daemon_hwm)
    drop; t0=$(now); stream; t1=$(now)
    rss_cold=$(daemon_hwm)
    drop; t2=$(now); stream; t3=$(now)
    rss_warm=$(daemon_hwm)
    unmount_rafsd
    awk -v bin="$b" -v i="$images" -v r="$readers" -v n="$big_bytes" -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" \
        -v idle="$rss_idle" -v cold="$rss_cold" -v warm="$rss_warm" 'BEGIN {
        printf "\n%s: one daemon, %d images, %d readers streaming %.0f MiB each:\n", bin, i, r, n / 1048576
        printf "  peak RSS once the images are mounted: %d KiB\n", idle
        printf "  peak RSS after the cold pass (%.0f MB/s in all): %d KiB\n", r * n / (b - a) / 1e6, cold
        printf "  peak RSS after the warm pass (%.0f MB/s in all): %d KiB\n", r * n / (d - c) / 1e6, warm }'
done
