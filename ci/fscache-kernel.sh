#!/usr/bin/env bash
# Build the small guest kernel for the EROFS-over-fscache test: Debian's kernels leave out
# CONFIG_EROFS_FS_ONDEMAND and CONFIG_CACHEFILES_ONDEMAND, so this compiles bookworm-backports' own 6.12
# source (package linux-source-6.12, fetched with the private apt configuration of ci/lib/private-apt.sh
# that ci/guest-kernel.sh uses too: /etc/apt is never read or written) from `tinyconfig` plus what the test guest needs: serial console,
# initramfs, virtio-pci, virtio-fs, EROFS (file-backed and on-demand), fscache and cachefiles on demand,
# ext4 (the cachefiles cache: it needs user xattrs, sync_fs and real SEEK_HOLE; tmpfs lacks sync_fs, ext2
# reports holes as data), loop devices,
# ACPI power-off. Everything is built in (no modules).
#
# Usage: ci/fscache-kernel.sh     cache: $RAFSD_FSCACHE_KERNEL_DIR, default target/fscache-kernel
# Prints: KERNEL=<bzImage> VERSION=<release>. Idempotent: a second run only prints the paths.
# Needs: gcc, make, flex, bison, bc, libelf-dev (ci/install-vm-deps.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${RAFSD_FSCACHE_KERNEL_DIR:-target/fscache-kernel}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
stamp=$dir/kernel.env

if [ -f "$stamp" ]; then
    # shellcheck disable=SC1090
    . "$stamp"
    if [ -f "${KERNEL:-}" ]; then
        cat "$stamp"
        exit 0
    fi
fi

for tool in gcc make flex bison bc; do
    command -v "$tool" >/dev/null || { echo "fscache-kernel: $tool missing; run ci/install-vm-deps.sh" >&2; exit 1; }
done
[ -f /usr/include/libelf.h ] || { echo "fscache-kernel: libelf-dev missing; run ci/install-vm-deps.sh" >&2; exit 1; }

# shellcheck source=ci/lib/private-apt.sh
. ci/lib/private-apt.sh
private_apt fscache-kernel "$dir"
src=$dir/src
if [ ! -f "$src/Makefile" ]; then
    echo "fscache-kernel: fetching the bookworm-backports package list into $apt_dir" >&2
    apt-get "${apt_opts[@]}" -qq update
    rm -f "$apt_dir/download/"*.deb
    echo "fscache-kernel: downloading linux-source-6.12" >&2
    (cd "$apt_dir/download" && apt-get "${apt_opts[@]}" -o APT::Sandbox::User=root -qq download linux-source-6.12)
    deb=$(ls "$apt_dir/download/"*.deb)
    rm -rf "$dir/pkg" "$src.tmp"
    dpkg-deb -x "$deb" "$dir/pkg"
    mkdir -p "$src.tmp"
    tar -xf "$dir"/pkg/usr/src/linux-source-6.12.tar.* -C "$src.tmp" --strip-components=1
    rm -rf "$dir/pkg" "$deb" "$src"
    mv "$src.tmp" "$src"
fi

cd "$src"
make -s tinyconfig
want=(
    64BIT PRINTK TTY SERIAL_8250 SERIAL_8250_CONSOLE BLK_DEV_INITRD BINFMT_ELF BINFMT_SCRIPT
    PROC_FS SYSFS DEVTMPFS DEVTMPFS_MOUNT MULTIUSER FUTEX EPOLL SIGNALFD TIMERFD EVENTFD SHMEM TMPFS
    TMPFS_XATTR EXT4_FS FILE_LOCKING POSIX_TIMERS ACPI PCI PCI_MSI VIRTIO_MENU VIRTIO VIRTIO_PCI FUSE_FS VIRTIO_FS
    BLOCK BLK_DEV BLK_DEV_LOOP MISC_FILESYSTEMS NETFS_SUPPORT FSCACHE CACHEFILES CACHEFILES_ONDEMAND
    EROFS_FS EROFS_FS_XATTR EROFS_FS_POSIX_ACL EROFS_FS_SECURITY EROFS_FS_BACKED_BY_FILE EROFS_FS_ONDEMAND
)
args=()
for o in "${want[@]}"; do args+=(--enable "$o"); done
scripts/config "${args[@]}" --disable EROFS_FS_ZIP --disable MODULES
make -s olddefconfig
# olddefconfig drops what a dependency refuses: check every option made it.
missing=()
for o in "${want[@]}"; do grep -qx "CONFIG_$o=y" .config || missing+=("$o"); done
[ ${#missing[@]} -eq 0 ] || { echo "fscache-kernel: not enabled after olddefconfig: ${missing[*]}" >&2; exit 1; }
echo "fscache-kernel: building bzImage with $(nproc) jobs" >&2
start=$(date +%s)
make -s -j"$(nproc)" bzImage >"$dir/build.log" 2>&1 || { tail -n 40 "$dir/build.log" >&2; exit 1; }
echo "fscache-kernel: built in $(($(date +%s) - start)) s" >&2
cp arch/x86/boot/bzImage "$dir/bzImage"
version=$(make -s kernelrelease)
cd - >/dev/null
cat >"$stamp" <<EOF
KERNEL=$dir/bzImage
VERSION=$version
EOF
cat "$stamp"
