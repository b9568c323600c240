#!/usr/bin/env bash
# Registry backend benchmark: a cold sequential read of one large file through `rafsd fuse` with the
# `registry` backend, against `curl` fetching the same blob from the same registry, in the same run.
# Both go to a local Debian `docker-registry` over loopback. Prints MB/s of each and their ratio.
#   [AMPLIFY_IO=BYTES] [RAFSD_BENCH_BASE=BIN] ci/bench-registry.sh [SIZE_MIB] [ROUNDS]
# (default 256 MiB, 3 rounds, amplify_io 1 MiB; RAFSD_BENCH_BASE adds another rafsd binary, e.g. a release
# build of main, measured in the same rounds.) Each round drops the page cache and starts rafsd with an
# empty blob cache; curl and rafsd alternate, and the medians are compared, since a shared machine makes
# single runs noisy. Each rafsd read also prints the ranged requests it made (the registry's access log).
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib/registry.sh
ci/install-deps.sh
cargo build --release -q
bin=$PWD/target/release/rafsd
size_mib=${1:-256}
rounds=${2:-3}
repo=bench/rafsd
work=$(mktemp -d /tmp/rafsd-bench-registry.XXXXXX)
pid=
reg=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    mountpoint -q "$work/mnt" && umount -l "$work/mnt" || true
    [ -n "$reg" ] && kill "$reg" 2>/dev/null && wait "$reg" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
now() { date +%s.%N; }
mbps() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN {printf "%.1f", n / (b - a) / 1e6}'; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

mkdir -p "$work/src" "$work/blobs" "$work/mnt"
head -c "$((size_mib << 20))" /dev/urandom >"$work/src/big"
"$bin" build "$work/src" --bootstrap "$work/bootstrap" --blob-dir "$work/blobs" -l warn >/dev/null
blob=$(ls "$work/blobs")
blob_bytes=$(stat -c %s "$work/blobs/$blob")

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
registry_config "$work/registry.yml" "$work/storage" tcp "127.0.0.1:$port"
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
reg=$!
wait_for_url "http://127.0.0.1:$port/v2/"

# Monolithic upload: POST for a session, PUT the bytes with their digest.
location=$(curl -s -D - -o /dev/null -X POST "http://127.0.0.1:$port/v2/$repo/blobs/uploads/" |
    awk 'tolower($1) == "location:" {print $2}' | tr -d '\r')
case $location in /*) location="http://127.0.0.1:$port$location" ;; esac
code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT -H 'Content-Type: application/octet-stream' \
    --data-binary "@$work/blobs/$blob" "$location&digest=sha256:$blob")
[ "$code" = 201 ] || { echo "blob upload failed: $code" >&2; exit 1; }
url="http://127.0.0.1:$port/v2/$repo/blobs/sha256:$blob"
echo "image: one ${size_mib} MiB file, blob of $((blob_bytes / 1048576)) MiB in a local docker-registry"

cat >"$work/config.json" <<JSON
{"device":{"backend":{"type":"registry","config":{"scheme":"http","host":"127.0.0.1:$port","repo":"$repo",
                                                  "timeout":30}},
           "cache":{"type":"blobcache","config":{"work_dir":"$work/cache"}}},
 "mode":"direct","amplify_io":${AMPLIFY_IO:-1048576}}
JSON
median() { sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
cold_read() { # BIN: "MB/s requests" of one cold read of the file (requests: the daemon's backend reads)
    rm -rf "$work/cache"
    "$1" fuse --config "$work/config.json" --bootstrap "$work/bootstrap" --mountpoint "$work/mnt" \
        --thread-num 4 --apisock "$work/api.sock" -l error &
    pid=$!
    for _ in $(seq 200); do mountpoint -q "$work/mnt" && break; sleep 0.05; done
    mountpoint -q "$work/mnt" || { echo "rafsd did not mount" >&2; exit 1; }
    drop
    file_bytes=$(stat -c %s "$work/mnt/big")
    t0=$(now); cat "$work/mnt/big" >/dev/null; t1=$(now)
    gets=$(curl -s --unix-socket "$work/api.sock" http://d/api/v1/metrics/backend |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["read_count"])')
    [ "$round" = 1 ] && { cmp -s "$work/mnt/big" "$work/src/big" || { echo "content mismatch" >&2; exit 1; }; }
    kill "$pid"; wait "$pid" || true; pid=
    echo "$(mbps "$file_bytes" "$t0" "$t1") $gets"
}
curl_runs=()
rafsd_runs=()
base_runs=()
for round in $(seq "$rounds"); do
    drop
    t0=$(now); curl -s -o /dev/null "$url"; t1=$(now)
    curl_runs+=("$(mbps "$blob_bytes" "$t0" "$t1")")
    cold_read "$bin" >"$work/run"
    read -r speed gets <"$work/run"
    rafsd_runs+=("$speed")
    line="round $round: curl ${curl_runs[-1]} MB/s, rafsd $speed MB/s ($gets ranged requests)"
    if [ -n "${RAFSD_BENCH_BASE:-}" ]; then
        cold_read "$RAFSD_BENCH_BASE" >"$work/run"
        read -r speed gets <"$work/run"
        base_runs+=("$speed")
        line+=", base $speed MB/s ($gets)"
    fi
    echo "$line"
done
curl_mbps=$(printf '%s\n' "${curl_runs[@]}" | median)
rafsd_mbps=$(printf '%s\n' "${rafsd_runs[@]}" | median)
echo "curl, whole blob (median):          $curl_mbps MB/s"
echo "rafsd registry, cold read (median): $rafsd_mbps MB/s"
awk -v a="$rafsd_mbps" -v b="$curl_mbps" 'BEGIN {printf "ratio rafsd/curl:                   %.2f\n", a / b}'
# Rounds pair runs made moments apart: the median of the per-round ratios is less noisy than the ratio of
# medians when the machine's load changes during the run.
per_round() { paste -d' ' <(printf '%s\n' "${!1}") <(printf '%s\n' "${!2}") | awk '{print $1 / $2}' | median; }
echo "ratio rafsd/curl, median of rounds: $(per_round 'rafsd_runs[@]' 'curl_runs[@]' | xargs printf '%.2f')"
if [ -n "${RAFSD_BENCH_BASE:-}" ]; then
    base_mbps=$(printf '%s\n' "${base_runs[@]}" | median)
    echo "base rafsd, cold read (median):     $base_mbps MB/s"
    awk -v a="$base_mbps" -v b="$curl_mbps" 'BEGIN {printf "ratio base/curl:                    %.2f\n", a / b}'
    echo "ratio base/curl, median of rounds:  $(per_round 'base_runs[@]' 'curl_runs[@]' | xargs printf '%.2f')"
    echo "ratio rafsd/base, median of rounds: $(per_round 'rafsd_runs[@]' 'base_runs[@]' | xargs printf '%.2f')"
fi
