# shellcheck shell=bash
# The scratch tree of a benchmark that serves an image built from this machine's files with `rafsd fuse`.
#
# Usage: . ci/lib/fuse-bench.sh; fuse_bench_work NAME SOURCE_DIR...
# Sets work (a new /tmp/rafsd-NAME.XXXXXX holding src/, blobs/, mnt/) and pid (empty; the benchmark sets it
# to its daemon's), copies the source dirs into $work/src (default /usr/lib/python3.11 /usr/lib/gcc
# /usr/share/doc), and on exit kills the daemon, detaches the mount and removes the tree.

fuse_bench_work() {
    local name=$1 s
    shift
    local sources=("$@")
    [ ${#sources[@]} -gt 0 ] || sources=(/usr/lib/python3.11 /usr/lib/gcc /usr/share/doc)
    work=$(mktemp -d "/tmp/rafsd-$name.XXXXXX")
    pid=
    trap fuse_bench_cleanup EXIT
    mkdir -p "$work/src" "$work/blobs" "$work/mnt"
    for s in "${sources[@]}"; do
        [ -d "$s" ] && cp -a "$s" "$work/src/$(basename "$s")-$(echo "$s" | md5sum | cut -c1-6)"
    done
}

fuse_bench_cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    mountpoint -q "$work/mnt" && umount -l "$work/mnt" || true
    rm -rf "$work"
}
