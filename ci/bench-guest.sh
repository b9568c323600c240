#!/usr/bin/env bash
# In-guest benchmark: one QEMU (TCG) guest reads the same RAFS v6 image through the virtio-fs FUSE path and
# through the EROFS helper path (rafs-guest mount over rafsd's blob view, buffered and -o directio):
# metadata walk (ls -lR), sequential read of a large file, read of every small file; host-cold and
# host-warm with the guest's caches dropped; prints each path and the ratio EROFS/FUSE.
# Needs root, QEMU and the guest kernel (ci/install-vm-deps.sh, ci/guest-kernel.sh).
#   ci/bench-guest.sh [--rounds N] [--size-mib M]
set -euo pipefail
cd "$(dirname "$0")/.."
ci/install-deps.sh
ci/install-vm-deps.sh
ci/guest-kernel.sh >/dev/null
cargo bench --bench guest --no-run
cargo bench --bench guest -- "$@"
