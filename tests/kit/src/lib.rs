//! The test kit: everything rafsd's integration tests (`tests/*.rs`) and benchmarks (`tests/bench/*.rs`)
//! share, compiled once as a dev-dependency instead of once per test binary.
//!
//! - [`tier`]: the fast tier (`cargo test`) and the full tier (`ci/test.sh`), and the check that keeps a
//!   test needing root, a daemon, a server or a guest out of the fast one.
//! - [`daemon`]: `rafsd` as a real process: [`daemon::spawn_ready`], the one start-up wait of every daemon
//!   the tests run; FUSE daemons ([`daemon::Daemon`]), bounded runs, admin API requests.
//! - [`frontend`]: a vhost-user frontend that plays the VMM and the guest's virtio-fs driver against
//!   `rafsd virtiofs` ([`frontend::VirtiofsDaemon`], [`frontend::Guest`]), and the DAX window.
//! - [`guestvm`]: QEMU (TCG) guests served by `rafsd virtiofs`.
//! - [`services`]: docker-registry, moto's S3 server, tinyproxy, a token issuer, a fault-injecting server.
//! - [`nydus_snapshotter`]: nydus-snapshotter's side of the daemon contract, byte for byte.
//! - [`manifest`]: the reference images (`tests/fixtures/rafs`) and checks of a tree against `manifest.tsv`.
//! - [`built`]: small images made by `rafsd build`; [`layout`]: independent readers of the on-disk
//!   records, to patch images.
//! - [`mod@bench`]: statistics, options and images for the benchmarks.

pub mod bench;
pub mod built;
pub mod daemon;
pub mod frontend;
pub mod guestvm;
pub mod layout;
pub mod manifest;
pub mod nydus_snapshotter;
pub mod services;
pub mod tier;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The `rafsd` binary cargo built for the running test or benchmark: `target/<profile>/rafsd`, beside
/// the `deps/` directory holding the test executable (`CARGO_BIN_EXE_rafsd` exists only while a test
/// target itself compiles, not in a library it uses).
pub fn rafsd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test executable's path");
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .map(|profile| profile.join("rafsd"))
            .filter(|bin| bin.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "no rafsd binary beside {}: run the tests through cargo",
                    exe.display()
                )
            });
        bin
    })
}

/// The repository's root directory (where `ci/` and `tests/` are).
pub fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}
