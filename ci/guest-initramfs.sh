#!/usr/bin/env bash
# Pack the test guest's initramfs: a static busybox, ci/guest/init, and the kernel modules the guest needs
# that the 6.12 kernel does not build in (with their dependencies and soft dependencies, in load order,
# decompressed so busybox insmod can load them). virtio-pci, virtio-fs and FUSE are built in; by default only
# EROFS (for in-guest EROFS mounts: crc32c, libcrc32c, erofs) is added.
#
# Usage: ci/guest-initramfs.sh [OUT]    default OUT: $RAFSD_GUEST_DIR/initramfs.cpio (target/guest)
# Env: RAFSD_GUEST_MODULES="erofs ..." modules to add ("" for none); RAFSD_GUEST_EXTRA="HOST:GUEST ..." extra
#      files (e.g. a static guest helper binary). Needs ci/guest-kernel.sh to have run (for the modules).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${RAFSD_GUEST_DIR:-target/guest}
out=${1:-$dir/initramfs.cpio}
modules_wanted=${RAFSD_GUEST_MODULES-erofs}
busybox=/bin/busybox
if ! dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
    echo "guest-initramfs: busybox-static is not installed; run ci/install-vm-deps.sh" >&2
    exit 1
fi
command -v cpio >/dev/null || { echo "guest-initramfs: cpio missing; run ci/install-vm-deps.sh" >&2; exit 1; }

stage=$(mktemp -d /tmp/rafsd-initramfs.XXXXXX)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,dev,proc,sys,mnt,tmp,lib/modules}
cp "$busybox" "$stage/bin/busybox"
install -m 0755 ci/guest/init "$stage/init"
# The kernel opens /dev/console before running /init: provide it in case devtmpfs is not mounted yet.
mknod -m 600 "$stage/dev/console" c 5 1
mknod -m 666 "$stage/dev/null" c 1 3

if [ -n "$modules_wanted" ]; then
    [ -f "$dir/kernel.env" ] || { echo "guest-initramfs: no guest kernel in $dir; run ci/guest-kernel.sh" >&2; exit 1; }
    # shellcheck disable=SC1091
    . "$dir/kernel.env"
    modprobe=$(command -v modprobe || echo /usr/sbin/modprobe)
    : >"$stage/lib/modules/load.list"
    for m in $modules_wanted; do
        # --show-depends resolves dependencies and soft dependencies against the guest's own module tree.
        "$modprobe" -d "$MODULES" -S "$VERSION" --show-depends "$m" >"$stage/deps"
        while read -r kind path _; do
            [ "$kind" = insmod ] || continue
            name=$(basename "$path")
            name=${name%.xz}
            name=${name%.zst}
            name=${name%.gz}
            grep -qx "$name" "$stage/lib/modules/load.list" && continue
            case $path in
                *.xz) xz -dc "$path" >"$stage/lib/modules/$name" ;;
                *.zst) zstd -qdc "$path" >"$stage/lib/modules/$name" ;;
                *.gz) gzip -dc "$path" >"$stage/lib/modules/$name" ;;
                *) cp "$path" "$stage/lib/modules/$name" ;;
            esac
            echo "$name" >>"$stage/lib/modules/load.list"
        done <"$stage/deps"
    done
    rm -f "$stage/deps"
fi

for pair in ${RAFSD_GUEST_EXTRA:-}; do
    src=${pair%%:*}
    dst=${pair#*:}
    mkdir -p "$stage/$(dirname "$dst")"
    cp "$src" "$stage/$dst"
done

mkdir -p "$(dirname "$out")"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --quiet) >"$out.tmp"
mv "$out.tmp" "$out"
echo "INITRD=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
