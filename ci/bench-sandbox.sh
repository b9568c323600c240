#!/usr/bin/env bash
# What the sandbox costs: the virtio-fs benchmark (tests/bench/virtiofs.rs) run twice in one go, with the
# default sandbox (namespaces, Landlock, capabilities, seccomp kill) and with `--sandbox none --seccomp none`,
# then the median rates side by side as a ratio sandboxed/unsandboxed (1.00 = no cost), with one request
# queue (add --queues 1,4 for four).
#   ci/bench-sandbox.sh [--rounds N] [--size-mib M] [--random N]      (needs root)
set -euo pipefail
cd "$(dirname "$0")/.."
ci/install-deps.sh
cargo bench --bench virtiofs --no-run
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
args=(--rounds 3 --size-mib 64 --random 5000 --queues 1 "$@")
RAFSD_BENCH_DAEMON_ARGS="" cargo bench --bench virtiofs -- "${args[@]}" | tee "$out/on"
RAFSD_BENCH_DAEMON_ARGS="--sandbox none --seccomp none" cargo bench --bench virtiofs -- "${args[@]}" | tee "$out/off"
# A section starts "N request queue(s) ..."; its rows end with the columns
# "unit virtio-fs in-order host-FUSE virtio/FUSE pool/in-order reqs": print queues, name, virtio-fs, FUSE.
rates() {
    awk '/^[0-9]+ request queue/ { q = $1 }
         /^(READ|LOOKUP|GETATTR)/ { name = $1; for (i = 2; i <= NF - 7; i++) name = name " " $i
                                    print q "\t" name "\t" $(NF - 5) "\t" $(NF - 3) }' "$1"
}
echo
echo "sandbox cost: median rate with the sandbox / without (1.00 = no cost; medians move with other load"
echo "on the machine)"
printf '%-6s %-24s %10s %10s\n' queues operation virtio-fs "host FUSE"
paste <(rates "$out/on") <(rates "$out/off") |
    awk -F'\t' '{ printf "%-6s %-24s %10.2f %10.2f\n", $1, $2, $3 / $7, $4 / $8 }'
