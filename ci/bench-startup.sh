#!/usr/bin/env bash
# Container start-up benchmark: a Debian bookworm minbase + python3-minimal rootfs (debootstrap, made once and
# kept in target/bench-startup) built into a RAFS image with `rafsd build`, its blob in a local Debian
# `docker-registry`, reached over a slow link: everything runs in a network namespace this script creates
# (and removes) whose loopback is capped at 100 Mbit/s by `tc tbf`, with a forwarder (ci/lib/delay-proxy.py)
# adding 2 ms each way in front of the registry (the kernel has no netem). The program is
# `chroot ROOT python3 -c 'import os, re, subprocess, argparse, ...'`, started:
#   - after a full pull: the rootfs as a tar.gz layer fetched with curl, unpacked, then run;
#   - from `rafsd fuse` with the registry backend, cold blob cache;
#   - from upstream nydusd (when $NYDUSD names its binary), the same config;
#   - from `rafsd fuse` on the image rebuilt with a prefetch list made from the access trace of a first
#     run (`/api/v1/metrics/pattern` → `rafsd prefetch-list` → `rafsd build --prefetch-files`), prefetch on;
#   - with STARTUP_GUEST=1, from `rafsd virtiofs` in a QEMU (TCG) guest (tests/bench/startup.rs), both
#     images, with a warm run of the same program in the guest as its CPU floor.
# For each: median time over the rounds (from the daemon's start for the FUSE columns, so a mount's prefetch
# counts; from the first byte for the pull; rounds interleave the configurations, caches are dropped before
# each run), bytes fetched from the registry (counted by the forwarder), and for rafsd the compressed size
# of the chunks the program read (the daemon's access records), with the ratios the issue's targets use.
#   [NYDUSD=/path/to/nydusd] [STARTUP_GUEST=1] [STARTUP_PREFETCH=0] [RAFSD_BIN=...] [RAFSD_BENCH_BASE=BIN]
#   ci/bench-startup.sh [ROUNDS]
# (default 3 rounds; STARTUP_PREFETCH=0 leaves the prefetch-list columns out; RAFSD_BENCH_BASE adds columns
# for another rafsd binary, e.g. a release build of main, without and with the prefetch list, in the same
# rounds)
# Needs root, debootstrap, docker-registry, tc and nsenter; the guest column also QEMU and the guest kernel.
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib/registry.sh
ci/install-deps.sh
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
rounds=${1:-3}
rate_mbit=100
delay_ms=2
cache=$PWD/target/bench-startup
mirror=${RAFSD_BENCH_MIRROR:-http://deb.debian.org/debian}
modules='os, re, subprocess, argparse, logging, tempfile, collections, functools, typing, pathlib, inspect, datetime, email.parser, urllib.parse, socket, threading, random, hashlib, base64, ast, configparser, ipaddress, csv, pickle, platform, optparse, calendar, tokenize, ssl'
program=(/usr/bin/python3 -c "import $modules")

mkdir -p "$cache"
if [ ! -x "$cache/rootfs/usr/bin/python3" ]; then
    rm -rf "$cache/rootfs"
    echo "debootstrap --variant=minbase --include=python3-minimal bookworm from $mirror (once; kept in $cache)"
    debootstrap --variant=minbase --include=python3-minimal bookworm "$cache/rootfs" "$mirror" \
        >"$cache/debootstrap.log" 2>&1 || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
fi
if [ ! -s "$cache/layer.tar.gz" ]; then
    tar --numeric-owner --xattrs -C "$cache/rootfs" -cf - . | gzip -6 >"$cache/layer.tar.gz.new"
    mv "$cache/layer.tar.gz.new" "$cache/layer.tar.gz"
fi
# RAFSD_BIN: another build of rafsd to measure (the guest column always uses this tree's).
if [ -z "${RAFSD_BIN:-}" ]; then cargo build --release -q; fi
bin=${RAFSD_BIN:-$PWD/target/release/rafsd}
if [ "${STARTUP_GUEST:-0}" != 0 ]; then
    ci/install-vm-deps.sh
    ci/guest-kernel.sh >/dev/null
    cargo bench --bench startup --no-run -q 2>/dev/null
fi

work=$(mktemp -d /tmp/rafsd-bench-startup.XXXXXX)
ns=rafsd-startup-$$
pids=()
mnt=$work/mnt
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    mountpoint -q "$mnt" && umount -l "$mnt" || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
# nsenter execs the command (no fork for a network namespace), so `$!` of a background one is its pid.
in_ns=(nsenter --net="/run/netns/$ns")
now() { date +%s.%N; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
median() { sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

# The link: loopback of a private namespace at 100 Mbit/s (MTU 1500, so tbf shapes packets of a real link).
ip netns add "$ns"
ip -n "$ns" link set lo mtu 1500 up
tc -n "$ns" qdisc add dev lo root tbf rate "${rate_mbit}mbit" burst 32kb latency 100ms
registry_config "$work/registry.yml" "$work/storage" unix "$work/registry.sock"
"${in_ns[@]}" docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
pids+=($!)
# Clients reach the registry through the forwarder only: 127.0.0.1:5000 (the registry's own socket is a
# unix socket, off the shaped link, so each byte crosses the link once).
"${in_ns[@]}" python3 ci/lib/delay-proxy.py 5000 "$work/registry.sock" "$delay_ms" 5001 &
pids+=($!)
wait_for_url "http://127.0.0.1:5000/v2/" "${in_ns[@]}"
proxy_down() { "${in_ns[@]}" python3 -c 'import socket; s = socket.create_connection(("127.0.0.1", 5001)); print(s.makefile().readline().split()[0])'; }
repo=bench/startup
push() { # FILE DIGEST: monolithic upload over the registry's own socket
    local location code
    location=$(curl -s --unix-socket "$work/registry.sock" -D - -o /dev/null -X POST "http://r/v2/$repo/blobs/uploads/" |
        awk 'tolower($1) == "location:" {print $2}' | tr -d '\r')
    location=${location#http://r}
    code=$(curl -s --unix-socket "$work/registry.sock" -o /dev/null -w '%{http_code}' -X PUT \
        -H 'Content-Type: application/octet-stream' --data-binary "@$1" "http://r$location&digest=sha256:$2")
    [ "$code" = 201 ] || { echo "upload of $1 failed: $code" >&2; exit 1; }
}

# The images: plain, and (later) rebuilt with a prefetch list.
build() { # NAME [build options]: bootstrap and blob in $work/NAME, blob pushed
    local name=$1
    shift
    mkdir -p "$work/$name/blobs"
    "$bin" build "$cache/rootfs" --bootstrap "$work/$name/bootstrap" --blob-dir "$work/$name/blobs" -l warn "$@" >/dev/null
    local blob
    blob=$(ls "$work/$name/blobs")
    push "$work/$name/blobs/$blob" "$blob"
    echo "$blob"
}
plain_blob=$(build plain)
blob_bytes=$(stat -c %s "$work/plain/blobs/$plain_blob")
layer_digest=$(sha256sum "$cache/layer.tar.gz" | cut -d' ' -f1)
push "$cache/layer.tar.gz" "$layer_digest"
layer_bytes=$(stat -c %s "$cache/layer.tar.gz")
echo "rootfs: $(du -sm "$cache/rootfs" | cut -f1) MiB; RAFS blob $((blob_bytes / 1000)) kB (zstd); tar.gz layer $((layer_bytes / 1000)) kB"
echo "link: ${rate_mbit} Mbit/s (tbf), ${delay_ms} ms each way (forwarder); program: python3 -c 'import $modules'"

config() { # WORK_DIR EXTRA_JSON
    cat <<JSON
{"device":{"backend":{"type":"registry","config":{"scheme":"http","host":"127.0.0.1:5000","repo":"$repo","timeout":30}},
           "cache":{"type":"blobcache","config":{"work_dir":"$1"}}},
 "mode":"direct","digest_validate":false,"enable_xattr":true$2}
JSON
}
mkdir -p "$mnt"
# One cold start from a FUSE daemon: prints "seconds fetched needed" (needed: "-" unless rafsd).
# Args: rafsd|nydusd BOOTSTRAP EXTRA_JSON [RAFSD_BINARY]
cold_start() {
    local kind=$1 bootstrap=$2 extra=$3 rafsd=${4:-$bin} daemon_pid d0 d1 t0 t1 needed=-
    rm -rf "$work/cache" "$work/api.sock"
    config "$work/cache" "$extra" >"$work/config.json"
    # The clock runs from the daemon's start: what it does before the program's first read (mounting,
    # prefetch under way) is part of the start-up.
    drop
    d0=$(proxy_down)
    t0=$(now)
    if [ "$kind" = nydusd ]; then
        "${in_ns[@]}" "$NYDUSD" --config "$work/config.json" --bootstrap "$bootstrap" --mountpoint "$mnt" \
            --apisock "$work/api.sock" --log-level warn --rlimit-nofile 0 >"$work/daemon.log" 2>&1 &
    else
        "${in_ns[@]}" "$rafsd" fuse --config "$work/config.json" --bootstrap "$bootstrap" --mountpoint "$mnt" \
            --apisock "$work/api.sock" -l warn >"$work/daemon.log" 2>&1 &
    fi
    daemon_pid=$!
    pids+=("$daemon_pid")
    for _ in $(seq 2000); do mountpoint -q "$mnt" && break; sleep 0.01; done
    mountpoint -q "$mnt" || { cat "$work/daemon.log" >&2; echo "$kind did not mount" >&2; exit 1; }
    chroot "$mnt" "${program[@]}" >/dev/null || { echo "the program failed under $kind" >&2; exit 1; }
    t1=$(now)
    sleep 0.2 # let readahead and amplification that were in flight land in the count
    d1=$(proxy_down)
    if [ "$kind" = rafsd ]; then
        needed=$(curl -s --unix-socket "$work/api.sock" http://d/api/v1/metrics/backend |
            python3 -c 'import json, sys; print(json.load(sys.stdin).get("demand_compressed_bytes") or "-")')
        curl -s --unix-socket "$work/api.sock" http://d/api/v1/metrics/pattern >"$work/pattern.json"
    fi
    kill "$daemon_pid"
    wait "$daemon_pid" 2>/dev/null || true
    mountpoint -q "$mnt" && umount "$mnt"
    echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}') $((d1 - d0)) $needed"
}
full_pull() {
    local t0 t1 d0 d1
    rm -rf "$work/pulled"
    mkdir "$work/pulled"
    drop
    d0=$(proxy_down)
    t0=$(now)
    "${in_ns[@]}" curl -s "http://127.0.0.1:5000/v2/$repo/blobs/sha256:$layer_digest" | tar -xz -C "$work/pulled"
    chroot "$work/pulled" "${program[@]}" >/dev/null
    t1=$(now)
    d1=$(proxy_down)
    echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}') $((d1 - d0)) -"
}
link_rate() { # bytes/s of curl fetching the RAFS blob whole
    local t0 t1
    drop
    t0=$(now)
    "${in_ns[@]}" curl -s -o /dev/null "http://127.0.0.1:5000/v2/$repo/blobs/sha256:$plain_blob"
    t1=$(now)
    awk -v n="$blob_bytes" -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", n / (b - a)}'
}

# The access trace of one cold start, turned into a prefetch list, and the image rebuilt with it.
prefetch=${STARTUP_PREFETCH:-1}
if [ "$prefetch" != 0 ]; then
    read -r _ _ _ < <(cold_start rafsd "$work/plain/bootstrap" ',"access_pattern":true')
    "$bin" prefetch-list "$work/plain/bootstrap" "$work/pattern.json" -o "$work/prefetch.list" 2>"$work/prefetch-list.err"
    echo "prefetch list: $(wc -l <"$work/prefetch.list") files from the access trace"
    build prefetch --prefetch-files "$work/prefetch.list" >/dev/null
fi
prefetch_json=',"access_pattern":true,"fs_prefetch":{"enable":true,"threads_count":4}'

declare -A runs
labels=("full pull" "rafsd FUSE")
[ -n "${RAFSD_BENCH_BASE:-}" ] && labels+=("base rafsd FUSE")
[ -n "${NYDUSD:-}" ] && labels+=("nydusd FUSE")
[ "$prefetch" != 0 ] && labels+=("rafsd FUSE, prefetch list")
[ "$prefetch" != 0 ] && [ -n "${RAFSD_BENCH_BASE:-}" ] && labels+=("base rafsd FUSE, prefetch list")
rates=()
for round in $(seq "$rounds"); do
    rates+=("$(link_rate)")
    runs["full pull"]+="$(full_pull);"
    runs["rafsd FUSE"]+="$(cold_start rafsd "$work/plain/bootstrap" ',"access_pattern":true');"
    [ -n "${RAFSD_BENCH_BASE:-}" ] && runs["base rafsd FUSE"]+="$(cold_start rafsd "$work/plain/bootstrap" ',"access_pattern":true' "$RAFSD_BENCH_BASE");"
    [ -n "${NYDUSD:-}" ] && runs["nydusd FUSE"]+="$(cold_start nydusd "$work/plain/bootstrap" '');"
    [ "$prefetch" != 0 ] && runs["rafsd FUSE, prefetch list"]+="$(cold_start rafsd "$work/prefetch/bootstrap" "$prefetch_json");"
    [ "$prefetch" != 0 ] && [ -n "${RAFSD_BENCH_BASE:-}" ] && runs["base rafsd FUSE, prefetch list"]+="$(cold_start rafsd "$work/prefetch/bootstrap" "$prefetch_json" "$RAFSD_BENCH_BASE");"
    echo "round $round: $(for l in "${labels[@]}"; do printf '%s [%s] ' "$l" "$(echo "${runs[$l]}" | tr ';' '\n' | grep . | tail -1)"; done)"
done

if [ "${STARTUP_GUEST:-0}" != 0 ]; then
    echo "guest: booting QEMU (TCG) in the namespace ..."
    images=(--image "plain:0:$work/plain/bootstrap")
    [ "$prefetch" != 0 ] && images+=(--image "prefetch:1:$work/prefetch/bootstrap")
    "${in_ns[@]}" cargo bench -q --bench startup -- --registry 127.0.0.1:5000 --repo "$repo" --rounds "$rounds" \
        "${images[@]}" -- "${program[@]}" >"$work/guest.out" 2>"$work/guest.err" ||
        { tail -30 "$work/guest.err" >&2; echo "guest benchmark failed" >&2; exit 1; }
    while read -r tag label _ secs fetched needed; do
        [ "$tag" = STARTUP ] || continue
        case $label in
            plain) runs["rafsd virtio-fs (guest)"]+="$secs $fetched $needed;" ;;
            prefetch) runs["rafsd virtio-fs (guest), prefetch list"]+="$secs $fetched $needed;" ;;
            warm) runs["guest, warm (CPU floor)"]+="$secs 0 -;" ;;
        esac
    done <"$work/guest.out"
    labels+=("rafsd virtio-fs (guest)" "rafsd virtio-fs (guest), prefetch list" "guest, warm (CPU floor)")
fi

rate=$(printf '%s\n' "${rates[@]}" | median)
col() { echo "${runs[$1]}" | tr ';' '\n' | grep . | awk -v k="$2" '{print $k}' | median; }
pull_s=$(col "full pull" 1)
needed=$(col "rafsd FUSE" 3)
echo
echo "link rate measured by curl of the whole RAFS blob: $(awk -v r="$rate" 'BEGIN {printf "%.2f", r / 1e6}') MB/s (median)"
echo "needed: the compressed chunks the program read, $(awk -v n="$needed" 'BEGIN {printf "%.1f", n / 1e6}') MB; at the link rate $(awk -v n="$needed" -v r="$rate" 'BEGIN {printf "%.2f", n / r}') s"
printf '\n%-40s %9s %10s %12s %9s %11s %12s\n' "median of $rounds rounds" "time (s)" "speed-up" "fetched (MB)" "of blob" "fetched /" "time /"
printf '%-40s %9s %10s %12s %9s %11s %12s\n' "" "" "vs pull" "" "" "needed" "(needed/rate)"
for l in "${labels[@]}"; do
    [ -n "${runs[$l]:-}" ] || continue
    s=$(col "$l" 1)
    f=$(col "$l" 2)
    n=$(col "$l" 3)
    [ "$n" = - ] && n=$needed
    awk -v l="$l" -v s="$s" -v f="$f" -v n="$n" -v p="$pull_s" -v b="$blob_bytes" -v r="$rate" 'BEGIN {
        printf "%-40s %9.2f %9.1fx %12.1f %8.1f%% %11.2f %12.2f\n", l, s, p / s, f / 1e6, 100 * f / b,
            (n > 0 ? f / n : 0), (n > 0 ? s / (n / r) : 0) }'
done
echo
echo "targets: without a prefetch list >= 10x faster than the full pull and <= 10% of the blob fetched;"
echo "         fetched <= 1.3x needed; with a prefetch list, time <= 1.2x (needed / link rate)"
