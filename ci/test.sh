#!/usr/bin/env bash
# The project's test command: formatting, lints, then every unit and integration test.
# Integration tests read the reference images in tests/fixtures/rafs (override with RAFSD_FIXTURES)
# and must run as root (they create device nodes, set owners and trusted.* xattrs).
set -euo pipefail
cd "$(dirname "$0")/.."
ci/install-deps.sh
# tests/vm.rs boots a QEMU guest: QEMU, busybox-static and cpio, and the guest kernel (cached in target/guest).
ci/install-vm-deps.sh
ci/guest-kernel.sh >/dev/null
# tests/vm_fscache.rs needs a kernel with EROFS over fscache: compiled once (~4 min), cached in target/.
ci/fscache-kernel.sh >/dev/null
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The library's modules import each other without circles.
python3 ci/import-graph.py
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
cargo test --workspace 2>&1 | tee target/test.log
# The embedding example (tests/examples/embed.rs): a program serving a reference image through
# rafsd::embed over FUSE, checked against the manifest.
cargo run --quiet --example embed
# Fail loudly if no test ran at all (a broken filter would otherwise pass): empty binaries and doc-tests
# also print "test result: ok. 0 passed", so count the passed tests.
awk '/^test result:/ { n += $4 } END { exit !(n > 0) }' target/test.log
# The tests copy the reference images before changing anything; the originals must be untouched.
if [ -n "$(git status --porcelain -- tests/fixtures 2>/dev/null)" ]; then
    echo "ci/test.sh: the tests changed tests/fixtures:" >&2
    git status --porcelain -- tests/fixtures >&2
    exit 1
fi
