#!/usr/bin/env bash
# Install what the guest (QEMU) end-to-end test and demo need on a fresh Debian machine (idempotent):
# QEMU with vhost-user-fs-pci, a static busybox and cpio for the initramfs, depmod for the guest modules.
# The guest kernel itself is not installed on the host: ci/guest-kernel.sh fetches it into a cache folder.
set -euo pipefail

need_apt=()
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || need_apt+=(busybox-static)
command -v cpio >/dev/null || need_apt+=(cpio)
command -v depmod >/dev/null || [ -x /usr/sbin/depmod ] || [ -x /sbin/depmod ] || need_apt+=(kmod)
command -v dpkg-deb >/dev/null || need_apt+=(dpkg)
command -v xz >/dev/null || need_apt+=(xz-utils)
command -v zstd >/dev/null || need_apt+=(zstd)
command -v timeout >/dev/null || need_apt+=(coreutils)
command -v curl >/dev/null || need_apt+=(curl) # ci/demo-vm.sh talks to the admin API with it
# ci/fscache-kernel.sh compiles the fscache guest kernel; tests/vm_fscache.rs makes its cache fs with mkfs.ext4.
for tool in gcc make flex bison bc; do command -v "$tool" >/dev/null || need_apt+=("$tool"); done
[ -f /usr/include/libelf.h ] || need_apt+=(libelf-dev)
command -v mkfs.ext4 >/dev/null || [ -x /usr/sbin/mkfs.ext4 ] || [ -x /sbin/mkfs.ext4 ] || need_apt+=(e2fsprogs)
if [ ${#need_apt[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
