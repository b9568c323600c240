#!/usr/bin/env bash
# Prove the guest half of the end-to-end test on its own, with QEMU's legacy C virtiofsd as the backend
# instead of rafsd: the guest kernel, the initramfs and its /init, and the hash comparison with manifest.tsv.
# The share is a host folder laid out like rafsd's pseudo-root (rafs/a/lowerdir, rafs/b/lowerdir, containers)
# holding two fixtures unpacked by `rafsd unpack`. "Unmounting" b empties its folder; a plain folder cannot
# produce a corrupted-chunk EIO, so the bad-read check only has to complete here.
#
# Usage: ci/vm-standin.sh [RAFSD_BIN]   (default target/debug/rafsd, built if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
ci/install-vm-deps.sh
eval "$(ci/guest-kernel.sh)"
fixtures=${RAFSD_FIXTURES:-tests/fixtures/rafs}
bin=${1:-target/debug/rafsd}
[ -x "$bin" ] || cargo build -q
virtiofsd=/usr/lib/qemu/virtiofsd
[ -x "$virtiofsd" ] || { echo "vm-standin: $virtiofsd missing (package qemu-system-common)" >&2; exit 1; }

work=$(mktemp -d /tmp/rafsd-standin.XXXXXX)
vfs_pid='' qemu_pid=''
cleanup() {
    if [ -n "$qemu_pid" ]; then kill "$qemu_pid" 2>/dev/null || true; fi
    if [ -n "$vfs_pid" ]; then kill "$vfs_pid" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    if [ -n "${RAFSD_KEEP:-}" ]; then echo "vm-standin: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

share=$work/share
mkdir -p "$share/rafs/a" "$share/rafs/b" "$share/rafs/bad/lowerdir/special" "$share/containers"
for pair in a:v6-zstd-blake3 b:v5-lz4-blake3-repeatable; do
    name=${pair%%:*} case=${pair#*:}
    bootstrap=$fixtures/$case/bootstrap
    "$bin" unpack "$bootstrap" --blob-dir "$fixtures/$case/blobs" --output "$share/rafs/$name/lowerdir" >/dev/null
done
head -c 1000 /dev/urandom >"$share/rafs/bad/lowerdir/special/random-2m5"
ci/guest-initramfs.sh "$work/initramfs.cpio" >/dev/null

"$virtiofsd" --socket-path="$work/vfs.sock" -o source="$share" -o cache=none -o sandbox=chroot \
    >"$work/virtiofsd.log" 2>&1 &
vfs_pid=$!
for _ in $(seq 100); do [ -S "$work/vfs.sock" ] && break; sleep 0.1; done

nonce=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
images=/rafs/a/lowerdir,/rafs/b/lowerdir
append="console=ttyS0 panic=-1 no_timer_check loglevel=4 rafs_tag=myfs rafs_nonce=$nonce rafs_images=$images"
append+=" rafs_unmounted=/rafs/b/lowerdir rafs_bad=/rafs/bad/lowerdir/special/random-2m5 rafs_rw=/containers rafs_wait=120"
log=$work/serial.log
start=$(date +%s.%N)
timeout -k 5 240 qemu-system-x86_64 -machine q35 -accel tcg -cpu max -smp 2 -m 512M \
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -chardev socket,id=char0,path="$work/vfs.sock" -device vhost-user-fs-pci,chardev=char0,tag=myfs \
    -kernel "$KERNEL" -initrd "$work/initramfs.cpio" -append "$append" \
    -nographic -no-reboot -nic none -monitor none -serial "file:$log" &
qemu_pid=$!

wait_for() { # MARKER SECONDS
    local deadline=$((SECONDS + $2))
    while ! grep -aq "$1" "$log" 2>/dev/null; do
        if [ $SECONDS -ge $deadline ] || ! kill -0 "$qemu_pid" 2>/dev/null; then
            echo "vm-standin: no '$1' in the serial log; its tail:" >&2
            tail -n 30 "$log" >&2 || true
            exit 1
        fi
        sleep 0.5
    done
}
wait_for "PHASE1-DONE $nonce" 200
t1=$(date +%s.%N)
rm -rf "$share/rafs/b/lowerdir"/*
echo go >"$share/containers/go"
wait_for "DONE $nonce" 150
wait "$qemu_pid" || true
qemu_pid=
t2=$(date +%s.%N)

# Compare the guest's hashes with the manifest: every regular file of both images, nothing else.
tr -d '\r' <"$log" | grep -a 'HASH /rafs/' | sed 's/^.*HASH /HASH /' >"$work/hashes"
awk -F'\t' '$2 == "f" {print $10 " " $1}' "$fixtures/manifest.tsv" | LC_ALL=C sort >"$work/want"
fail=0
for name in a b; do
    grep -a "^HASH /rafs/$name/lowerdir " "$work/hashes" | cut -d' ' -f3- | LC_ALL=C sort >"$work/got-$name"
    if ! cmp -s "$work/want" "$work/got-$name"; then
        echo "vm-standin: image $name differs from manifest.tsv:" >&2
        diff "$work/want" "$work/got-$name" | head -n 10 >&2
        fail=1
    fi
done
grep -aq "UNMOUNTED-GONE" "$log" || { echo "vm-standin: emptied image still visible" >&2; fail=1; }
grep -aq "BADREAD" "$log" || { echo "vm-standin: no BADREAD line" >&2; fail=1; }
grep -q "$nonce" "$share/containers/from-guest" || { echo "vm-standin: guest did not write from-guest" >&2; fail=1; }
tr -d '\r' <"$log" | grep -aoE '(GUEST-UP|MOUNTED|LIST|PHASE1-DONE|GO-SEEN|UNMOUNTED-[A-Z-]+|BADREAD|WROTE|DONE) .*'
awk -v a="$start" -v b="$t1" -v c="$t2" 'BEGIN { printf "boot+hash %.1f s, phase 2 %.1f s\n", b - a, c - b }'
kill "$vfs_pid" 2>/dev/null || true
[ $fail -eq 0 ] && echo "vm-standin: OK ($(wc -l <"$work/hashes") files hashed in the guest)"
exit $fail
