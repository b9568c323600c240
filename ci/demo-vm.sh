#!/usr/bin/env bash
# The main job, end to end: build a RAFS image, serve it to a QEMU guest with `rafsd virtiofs` (mounted
# through the admin API the way Kata mounts a container's image), and show what the guest sees.
#
# Usage: ci/demo-vm.sh [SOURCE]   SOURCE: a directory, .tar or .tar.gz to build the image from
#                                 (default: a small sample tree made here)
# Env: RAFSD_BIN (default: a release build), RAFSD_GUEST_DIR (guest kernel cache, default target/guest).
set -euo pipefail
cd "$(dirname "$0")/.."
ci/install-deps.sh
ci/install-vm-deps.sh
eval "$(ci/guest-kernel.sh)"
if [ -z "${RAFSD_BIN:-}" ]; then
    cargo build --release -q
    RAFSD_BIN=${CARGO_TARGET_DIR:-target}/release/rafsd
fi

work=$(mktemp -d /tmp/rafsd-demo-vm.XXXXXX)
rafsd_pid='' qemu_pid=''
cleanup() {
    if [ -n "$qemu_pid" ]; then kill "$qemu_pid" 2>/dev/null || true; fi
    if [ -n "$rafsd_pid" ]; then
        kill "$rafsd_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$rafsd_pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$rafsd_pid" 2>/dev/null || true
    fi
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# 1. An image.
source=${1:-}
if [ -z "$source" ]; then
    source=$work/sample
    mkdir -p "$source/etc" "$source/bin" "$source/docs/empty"
    printf 'Hello from a RAFS image served by rafsd over virtio-fs.\nBuilt %s on %s.\n' "$(date -u +%FT%TZ)" "$(hostname)" >"$source/README.txt"
    cp /etc/os-release "$source/etc/os-release"
    cp /bin/bash "$source/bin/bash"
    ln -s ../README.txt "$source/docs/readme-link"
    seq 1 20000 >"$source/docs/numbers.txt"
fi
echo "== rafsd build $source"
"$RAFSD_BIN" build "$source" --bootstrap "$work/image/bootstrap" --blob-dir "$work/image/blobs" --log-level warn
"$RAFSD_BIN" inspect "$work/image/bootstrap" | head -n 12

# 2. The daemon, started empty, as Kata starts nydusd, in its default sandbox (pid/mount/network namespaces,
#    Landlock, seccomp kill mode): the paths the API mounts will name must be allowed up front.
api=$work/api.sock sock=$work/vhost-fs.sock
mkdir -p "$work/cache" "$work/shared"
"$RAFSD_BIN" virtiofs --sock "$sock" --apisock "$api" --log-level info --sandbox namespace --seccomp kill \
    --allow-path "$work/image" --allow-path-rw "$work/cache" --allow-path-rw "$work/shared" >"$work/rafsd.log" 2>&1 &
rafsd_pid=$!
call() { # METHOD PATH [BODY]: prints the HTTP status
    curl -s -o "$work/reply" -w '%{http_code}' --unix-socket "$api" -X "$1" "http://localhost$2" \
        ${3:+-H 'Content-Type: application/json' --data "$3"}
}
for _ in $(seq 100); do
    [ -S "$api" ] && [ "$(call GET /api/v1/daemon)" = 200 ] && grep -q '"RUNNING"' "$work/reply" && break
    kill -0 "$rafsd_pid" 2>/dev/null || { cat "$work/rafsd.log"; echo "demo-vm: rafsd exited" >&2; exit 1; }
    sleep 0.1
done
echo "== rafsd virtiofs (pid $rafsd_pid) is RUNNING"
# The supervisor stays in the host namespaces; the daemon is its child, pid 1 of a new pid namespace.
daemon_pid=$(sed -n 's/.*started the daemon as pid \([0-9]*\).*/\1/p' "$work/rafsd.log" | head -n 1)
[ -n "$daemon_pid" ] && grep -E '^(Seccomp|NoNewPrivs|CapEff):' "/proc/$daemon_pid/status" | sed 's/^/   daemon /'

# 3. Mount the image and a read-write share through the API.
config=$(printf '{"device":{"backend":{"type":"localfs","config":{"dir":"%s"}},"cache":{"type":"blobcache","config":{"work_dir":"%s"}}},"mode":"direct","digest_validate":true}' \
    "$work/image/blobs" "$work/cache")
config_str=${config//\"/\\\"}
for req in "/rafs/demo/lowerdir|{\"source\":\"$work/image/bootstrap\",\"fs_type\":\"rafs\",\"config\":\"$config_str\"}" \
    "/containers|{\"source\":\"$work/shared\",\"fs_type\":\"passthrough_fs\",\"config\":\"\"}"; do
    status=$(call POST "/api/v1/mount?mountpoint=${req%%|*}" "${req#*|}")
    echo "POST /api/v1/mount?mountpoint=${req%%|*} -> $status"
    [ "$status" = 204 ] || { cat "$work/reply" "$work/rafsd.log"; exit 1; }
done

# 4. What the guest runs once it has mounted the share (busybox sh).
cat >"$work/shared/demo.sh" <<'EOF'
img=/mnt/rafs/demo/lowerdir
echo "DEMO-BEGIN"
echo "guest\$ grep virtiofs /proc/mounts"; grep virtiofs /proc/mounts
echo "guest\$ ls /mnt /mnt/rafs"; ls /mnt /mnt/rafs
echo "guest\$ ls -la $img"; ls -la "$img"
for d in "$img"/*; do [ -d "$d" ] && [ ! -L "$d" ] && { echo "guest\$ ls -la ${d#/mnt}"; ls -la "$d"; }; done
for f in README.txt etc/os-release; do
    [ -f "$img/$f" ] && { echo "guest\$ head -n 5 $f"; head -n 5 "$img/$f"; }
done
echo "guest\$ sha256sum (every regular file)"; (cd "$img" && find . -type f -exec sha256sum {} + | sort -k 2)
echo "DEMO-END"
EOF
(cd "$source" 2>/dev/null && find . -type f -exec sha256sum {} + | LC_ALL=C sort -k 2) >"$work/host-sums" || true

# 5. Boot the guest (TCG) and let it power off.
nonce=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
log=$work/serial.log
initrd=$(ci/guest-initramfs.sh "$work/initramfs.cpio" | sed 's/^INITRD=//')
echo "== booting the guest (QEMU TCG, kernel $VERSION)"
start=$SECONDS
timeout -k 5 180 qemu-system-x86_64 -machine q35 -accel tcg -cpu max -smp 1 -m 512M \
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -chardev socket,id=char0,path="$sock" -device vhost-user-fs-pci,chardev=char0,tag=kataShared \
    -kernel "$KERNEL" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 no_timer_check loglevel=4 rafs_tag=kataShared rafs_nonce=$nonce rafs_run=/containers/demo.sh" \
    -nographic -no-reboot -nic none -monitor none -serial "file:$log" &
qemu_pid=$!
wait "$qemu_pid" || echo "demo-vm: QEMU exited with $?" >&2
qemu_pid=
echo "== the guest ran for $((SECONDS - start)) s; its serial console:"
# Drop the firmware's escape codes; show the demo section only.
tr -d '\r' <"$log" | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g' | sed -n '/DEMO-BEGIN/,/DEMO-END/p' | sed '1d;$d' | tee "$work/guest-out"
grep -q "DONE $nonce" "$log" || { echo "demo-vm: the guest did not finish; serial log tail:" >&2; tail -n 30 "$log" >&2; exit 1; }
if [ -s "$work/host-sums" ]; then
    if sed -n '/sha256sum (every regular file)/,$p' "$work/guest-out" | sed 1d | LC_ALL=C sort -k 2 | cmp -s - "$work/host-sums"; then
        echo "== every file's sha256 in the guest matches the source on the host ($(wc -l <"$work/host-sums") files)"
    else
        echo "demo-vm: the guest's sha256 sums differ from the source's" >&2
        exit 1
    fi
fi
echo "== stopping rafsd (pid $rafsd_pid)"
kill "$rafsd_pid"
wait "$rafsd_pid" || true
rafsd_pid=
