#!/usr/bin/env bash
# DAX benchmark: bytes/s reading one large RAFS file through the virtio-fs DAX window (SETUPMAPPING, the
# guest copying out of the window, REMOVEMAPPING) vs. FUSE_READ, against one `rafsd virtiofs --dax-window`
# process and the test frontend as VMM, in one run; prints MiB/s with the ratio to FUSE_READ.
#   ci/bench-dax.sh [--rounds N] [--size-mib M]      (default: 5 rounds over a 256 MiB file)
# The image (one random file) is built once under target/tmp and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
ci/install-deps.sh
cargo bench --bench dax --no-run
cargo bench --bench dax -- "$@"
