#!/usr/bin/env bash
# virtio-fs benchmark: FUSE_READ (1 MiB sequential over a large file, 4 KiB random), LOOKUP and GETATTR ops/s
# through the vhost-user device's virtqueue (`kit::frontend` plays the VMM and the guest driver) and through a
# host FUSE mount of the same image (O_DIRECT reads, statx), in one run; prints a table with ratios.
# It runs twice: processes placed by the scheduler, then everything pinned to one CPU, which shows the
# per-request cost without the cross-CPU eventfd wakeups that dominate small requests on a VM host.
#   ci/bench-virtiofs.sh [--rounds N] [--size-mib M] [--random N]      (needs root for the FUSE mount)
# The image (a copy of /usr/include plus an M MiB random file) is built once under target/tmp and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
ci/install-deps.sh
cargo bench --bench virtiofs --no-run
cargo bench --bench virtiofs -- "$@"
cargo bench --bench virtiofs -- --pin-cpu 0 "$@"
