#!/usr/bin/env bash
# Install what the build and tests need on a fresh Debian machine (idempotent; CI and developers run it).
set -euo pipefail

need_apt=()
command -v cc >/dev/null || need_apt+=(gcc)
command -v python3 >/dev/null || need_apt+=(python3)
command -v make >/dev/null || need_apt+=(make)
[ -x /usr/bin/time ] || need_apt+=(time)
if [ ${#need_apt[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}"
fi
command -v cargo >/dev/null || { echo "install-deps: cargo is required (rustup toolchain)" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
# rafs-guest (the in-guest helper) is linked statically against musl; without the target, ci/guest-helper.sh
# falls back to glibc with crt-static.
rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl ||
    rustup target add x86_64-unknown-linux-musl || echo "install-deps: no musl target; rafs-guest uses glibc crt-static" >&2
