#!/usr/bin/env bash
# Latency benchmark: p50/p99 of small operations (GETATTR, LOOKUP, 4 KiB cached READs) without and while one
# reader streams a 256 MiB file cold from a registry paced at ~20 MB/s (the fault server of `kit::services`),
# through the virtio-fs device (`kit::frontend`, one request queue) and a host FUSE mount; each with its
# worker pool and with the old one-at-a-time service as the baseline of the same run (virtio-fs
# --thread-pool-size 0, FUSE --thread-num 1); median of the rounds; prints the ratios.
#   ci/bench-latency.sh [--rounds N] [--size-mib M] [--rate-mb R] [--gap-us U] [--depth D] [--only virtiofs|fuse]
#                       [--cold-readers N] [--base BIN]   (N FUSE readers at once; D: the virtio-fs reader's READs in
#                       flight; BIN: another rafsd binary, its daemons measured too)
# Needs root (FUSE mount). The image is built once under target/tmp and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
ci/install-deps.sh
cargo bench --bench latency --no-run
cargo bench --bench latency -- "$@"
