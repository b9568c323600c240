#!/usr/bin/env bash
# Install what the build and tests need on a fresh Debian machine (idempotent; CI and developers run it).
set -euo pipefail

need_apt=()
command -v cc >/dev/null || need_apt+=(gcc)
command -v python3 >/dev/null || need_apt+=(python3)
command -v make >/dev/null || need_apt+=(make)
[ -x /usr/bin/time ] || need_apt+=(time)
# Network backend tests (tests/backends.rs) and ci/bench-registry.sh: the CNCF distribution registry,
# an HTTP proxy, htpasswd for the registry's bcrypt file, curl for the benchmark's baseline.
net_apt=()
command -v docker-registry >/dev/null || net_apt+=(docker-registry)
command -v tinyproxy >/dev/null || net_apt+=(tinyproxy)
command -v htpasswd >/dev/null || net_apt+=(apache2-utils)
command -v curl >/dev/null || net_apt+=(curl)
command -v openssl >/dev/null || net_apt+=(openssl)
# ip(8): tests/backends.rs gives a test network namespace an address standing for a remote registry's.
command -v ip >/dev/null || net_apt+=(iproute2)
need_apt+=("${net_apt[@]}")
if [ ${#need_apt[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}"
fi
if [ ${#net_apt[@]} -gt 0 ]; then
    # The tests run their own instances on free loopback ports; the packages' system services are not
    # wanted (where a postinst started them).
    for svc in docker-registry tinyproxy; do
        systemctl disable --now "$svc" >/dev/null 2>&1 || service "$svc" stop >/dev/null 2>&1 || true
    done
fi
# moto's S3 server (with IAM signature checks) and boto3 for the S3 backend test.
if ! python3 -c "import moto.server, boto3, cryptography, flask_cors" 2>/dev/null; then
    python3 -m pip --version >/dev/null 2>&1 || {
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq python3-pip
    }
    python3 -m pip install -q "moto[server]==5.2.1" ||
        python3 -m pip install -q --break-system-packages "moto[server]==5.2.1"
fi
command -v cargo >/dev/null || { echo "install-deps: cargo is required (rustup toolchain)" >&2; exit 1; }
for component in clippy rustfmt; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
done
# rafs-guest (the in-guest helper) is linked statically against musl; without the target, ci/guest-helper.sh
# falls back to glibc with crt-static.
rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl ||
    timeout 300 rustup target add x86_64-unknown-linux-musl || echo "install-deps: no musl target; rafs-guest uses glibc crt-static" >&2
