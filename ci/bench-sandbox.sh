#!/usr/bin/env bash
# What the sandbox costs: the virtio-fs benchmark (tests/bench/virtiofs.rs) run twice in one go, with the
# default sandbox (namespaces, Landlock, capabilities, seccomp kill) and with `--sandbox none --seccomp none`,
# then the median rates side by side as a ratio sandboxed/unsandboxed (1.00 = no cost).
#   ci/bench-sandbox.sh [--rounds N] [--size-mib M] [--random N]      (needs root)
set -euo pipefail
cd "$(dirname "$0")/.."
ci/install-deps.sh
cargo bench --bench virtiofs --no-run
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
args=(--rounds 3 --size-mib 64 --random 5000 "$@")
RAFSD_BENCH_DAEMON_ARGS="" cargo bench --bench virtiofs -- "${args[@]}" | tee "$out/on"
RAFSD_BENCH_DAEMON_ARGS="--sandbox none --seccomp none" cargo bench --bench virtiofs -- "${args[@]}" | tee "$out/off"
# Rows look like: "READ 4 KiB random      op/s      1234 / 1300       2345 / 2400   0.53 / 0.54   ...".
rates() { awk '/^(READ|LOOKUP|GETATTR)/ { n = split($0, f, "  +"); split(f[3], v, " / "); split(f[4], h, " / "); print f[1] "\t" v[1] "\t" v[2] "\t" h[1] "\t" h[2] }' "$1"; }
echo
echo "sandbox cost: rate with the sandbox / without, median and best of the rounds (1.00 = no cost;"
echo "medians move with other load on the machine, best rates less so)"
printf '%-24s %18s %18s\n' operation "virtio-fs med/best" "host FUSE med/best"
paste <(rates "$out/on") <(rates "$out/off") |
    awk -F'\t' '{ printf "%-24s %11.2f / %4.2f %11.2f / %4.2f\n", $1, $2 / $7, $3 / $8, $4 / $9, $5 / $10 }'
