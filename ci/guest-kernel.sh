#!/usr/bin/env bash
# Fetch the guest kernel for the QEMU end-to-end test: Debian bookworm-backports' linux-image-6.12*-amd64
# (virtio-fs, virtio-pci and FUSE built in). It is downloaded with a private apt configuration (this script
# never reads or writes /etc/apt's source lists, and never installs the package on the host), unpacked into a
# cache folder, and its modules indexed with `depmod -b`. Idempotent: a second run only prints the paths.
#
# Usage: ci/guest-kernel.sh            cache: $RAFSD_GUEST_DIR, default target/guest
# Prints:  KERNEL=<vmlinuz>  MODULES=<root holding lib/modules/VERSION>  VERSION=<kernel release>
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${RAFSD_GUEST_DIR:-target/guest}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
stamp=$dir/kernel.env

if [ -f "$stamp" ]; then
    # shellcheck disable=SC1090
    . "$stamp"
    if [ -f "${KERNEL:-}" ] && [ -f "${MODULES:-}/lib/modules/${VERSION:-}/modules.dep" ]; then
        cat "$stamp"
        exit 0
    fi
fi

command -v apt-get >/dev/null || { echo "guest-kernel: needs apt-get (Debian)" >&2; exit 1; }
command -v dpkg-deb >/dev/null || { echo "guest-kernel: needs dpkg-deb" >&2; exit 1; }
depmod=$(command -v depmod || echo /usr/sbin/depmod)
[ -x "$depmod" ] || { echo "guest-kernel: needs depmod (package kmod); run ci/install-vm-deps.sh" >&2; exit 1; }

# shellcheck source=ci/lib/private-apt.sh
. ci/lib/private-apt.sh
private_apt guest-kernel "$dir"
echo "guest-kernel: fetching the bookworm-backports package list into $apt_dir" >&2
apt-get "${apt_opts[@]}" -qq update

# linux-image-amd64 (the metapackage) names the current 6.12 image package; pin the version line to 6.12.
pkg=$(apt-cache "${apt_opts[@]}" depends linux-image-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-6\.12[^ ]*-amd64\)$/\1/p' | head -n 1)
if [ -z "$pkg" ]; then
    pkg=$(apt-cache "${apt_opts[@]}" pkgnames linux-image-6.12 2>/dev/null |
        grep -E '^linux-image-6\.12[^ ]*-amd64$' | sort -V | tail -n 1 || true)
fi
[ -n "$pkg" ] || { echo "guest-kernel: no linux-image-6.12*-amd64 in bookworm-backports" >&2; exit 1; }
echo "guest-kernel: downloading $pkg" >&2
rm -f "$apt_dir/download/"*.deb
(cd "$apt_dir/download" && apt-get "${apt_opts[@]}" -o APT::Sandbox::User=root -qq download "$pkg")
deb=$(ls "$apt_dir/download/"*.deb)

# Unpack into a fresh root (never dpkg -i), then index the modules.
root=$dir/root
rm -rf "$root" "$root.tmp"
mkdir -p "$root.tmp"
dpkg-deb -x "$deb" "$root.tmp"
mv "$root.tmp" "$root"
kernel=$(ls "$root"/boot/vmlinuz-* | head -n 1)
version=${kernel##*/vmlinuz-}
# depmod -b wants BASE/lib/modules/VERSION; newer packages ship /usr/lib/modules.
if [ ! -d "$root/lib/modules/$version" ] && [ -d "$root/usr/lib/modules/$version" ]; then
    mkdir -p "$root/lib"
    ln -s ../usr/lib/modules "$root/lib/modules"
fi
"$depmod" -b "$root" "$version"
rm -f "$deb"
cat >"$stamp" <<EOF
KERNEL=$kernel
MODULES=$root
VERSION=$version
EOF
cat "$stamp"
