#!/usr/bin/env bash
# Build `rafs-guest` (the in-guest EROFS helper, guest/) as a static binary that runs in the busybox
# initramfs: for x86_64-unknown-linux-musl when that target is installed (ci/install-deps.sh adds it),
# else for the glibc target with crt-static. Its own target dir, so it can run while another cargo holds
# target/ (the VM tests call it).
#
# Usage: ci/guest-helper.sh      Prints: RAFS_GUEST=<path of the static binary>
# RAFS_GUEST_LIBC=gnu forces the glibc fallback (what a machine without the musl target gets).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${RAFSD_GUEST_HELPER_TARGET:-target/rafs-guest}
# Small: no debug info in a binary that is copied into every guest.
export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols
if [ "${RAFS_GUEST_LIBC:-}" != gnu ] &&
    rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
    target=x86_64-unknown-linux-musl
    cargo build -q --release -p rafs-guest --target "$target" >&2
else
    target=x86_64-unknown-linux-gnu
    RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release -p rafs-guest --target "$target" >&2
fi
bin=$CARGO_TARGET_DIR/$target/release/rafs-guest
# Static or nothing: the initramfs has no dynamic loader.
if readelf -lW "$bin" | grep -q "program interpreter"; then
    echo "guest-helper: $bin is dynamically linked" >&2
    exit 1
fi
echo "RAFS_GUEST=$(cd "$(dirname "$bin")" && pwd)/rafs-guest"
