#!/usr/bin/env bash
# Two more builds of rafsd for tests/upgrade.rs, made from this checkout's sources (tracked files, as they are
# in the work tree) copied to a temporary directory:
#   target/upgrade-builds/rafsd-b           the same sources as package version <version>-upgrade-b: a live
#                                           upgrade to "another version" and back;
#   target/upgrade-builds/rafsd-next-state  the daemon state format's VERSION raised by one: a binary that cannot
#                                           read this build's state (the refusal test).
# They share target/ with the main build, so only the rafsd crates are compiled again; the main binary
# (target/debug/rafsd, which each of them overwrites) is rebuilt at the end. The copies are not git checkouts:
# their build script runs with SOURCE_DATE_EPOCH set, so that the main build's runs again afterwards (it
# reruns when that variable changes) and its `Git Commit:` stays this checkout's.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=target/upgrade-builds
mkdir -p "$out"
sources() { # the checkout's files, NUL-separated: tracked ones in a git checkout, else all but target/
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git ls-files -z
    else
        find . \( -path ./target -o -path ./.git \) -prune -o -type f -print0 | sed -z 's|^\./||'
    fi
}
build() { # NAME FILE SED-EXPRESSION: copy the sources, change FILE, build, keep the binary as $out/NAME
    local name=$1 file=$2 expr=$3 src
    src=$(mktemp -d /tmp/rafsd-upgrade-src.XXXXXX)
    sources | grep -zv '^tests/fixtures/' | tar --null -T - -c | tar -x -C "$src"
    cp "$src/$file" "$src/$file.orig"
    sed -i "$expr" "$src/$file"
    if cmp -s "$src/$file" "$src/$file.orig"; then
        echo "upgrade-builds: $expr changed nothing in $file" >&2
        exit 1
    fi
    (cd "$src" && SOURCE_DATE_EPOCH=$(date +%s) CARGO_TARGET_DIR="$root/target" cargo build --quiet -p rafsd --bin rafsd)
    cp target/debug/rafsd "$out/$name.tmp"
    mv "$out/$name.tmp" "$out/$name"
    rm -rf "$src"
}
build rafsd-b Cargo.toml '0,/^version = "\(.*\)"/s//version = "\1-upgrade-b"/'
build rafsd-next-state src/takeover/state.rs 's/^pub const VERSION: u32 = \([0-9]*\);/echo "pub const VERSION: u32 = $((\1 + 1));"/e'
cargo build --quiet -p rafsd --bin rafsd
echo "RAFSD_B=$root/$out/rafsd-b"
echo "RAFSD_NEXT_STATE=$root/$out/rafsd-next-state"
