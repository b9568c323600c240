#!/usr/bin/env bash
# The project's test command: formatting, lints, then every unit and integration test.
# Integration tests read the reference images in tests/fixtures/rafs (override with RAFSD_FIXTURES).
# Runs as root: the full tier creates device nodes, mounts, namespaces, sets owners and trusted.* xattrs.
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
# tests/upgrade.rs upgrades to a second build with another version string and to one a state version ahead.
ci/upgrade-builds.sh >/dev/null
# Two tiers (README, "Tests"); every test runs in exactly one of them.
# The fast tier, as user nobody: it must pass without root (a test that needs root fails here instead of
# passing only because CI is root). Cargo runs each test executable through setpriv (so the checkout must
# be readable by nobody); doc-tests run as they are.
as_nobody=(setpriv --reuid=65534 --regid=65534 --clear-groups)
runner=()
if "${as_nobody[@]}" test -r "$PWD/tests/fixtures/rafs/manifest.tsv" -a -x "$PWD/target"; then
    runner=(--config "target.'cfg(all())'.runner = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups']")
else
    # A checkout under a private directory (/root) cannot be read by nobody: the fast tier then runs as
    # root (every test still runs; only the check that it needs no root is lost).
    echo "ci/test.sh: user nobody cannot read $PWD; the fast tier runs as $(id -un)" >&2
fi
cargo test --workspace "${runner[@]}" 2>&1 | tee target/test-fast.log
# The full tier, as root: every test marked #[ignore = "needs ...: ci/test.sh"].
cargo test --workspace -- --ignored 2>&1 | tee target/test-full.log
# Fail loudly if a tier ran no test (a broken filter would otherwise pass: empty binaries and doc-tests also
# print "test result: ok. 0 passed"), and unless the full tier ran every test the fast tier skipped.
count() { awk -v col="$1" '/^test result:/ { n += $col } END { print n + 0 }' "$2"; }
fast=$(count 4 target/test-fast.log)
skipped=$(count 8 target/test-fast.log)
full=$(count 4 target/test-full.log)
echo "ci/test.sh: fast tier $fast passed; full tier $full passed of the $skipped the fast tier skipped"
if [ "$fast" -eq 0 ] || [ "$full" -eq 0 ] || [ "$full" -ne "$skipped" ]; then
    echo "ci/test.sh: a tier ran no test, or the full tier did not run every skipped test" >&2
    exit 1
fi
# The embedding example (tests/examples/embed.rs), as root (it mounts FUSE): a program serving a
# reference image through rafsd::embed, checked against the manifest.
cargo run --quiet --example embed
# The tests copy the reference images before changing anything; the originals must be untouched.
if [ -n "$(git status --porcelain -- tests/fixtures 2>/dev/null)" ]; then
    echo "ci/test.sh: the tests changed tests/fixtures:" >&2
    git status --porcelain -- tests/fixtures >&2
    exit 1
fi
