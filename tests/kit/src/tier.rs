//! Test tiers.
//!
//! - The fast tier, `cargo test`: tests that need nothing but a clone of the repository. They run as any
//!   user, with no servers, QEMU or special kernel, in about a minute.
//! - The full tier, every test marked `#[ignore = "needs root: ci/test.sh"]` (the reason names what the
//!   test needs: root, servers, QEMU, the fscache kernel). `cargo test` lists them as ignored with that
//!   reason; `ci/test.sh` runs them as root (`cargo test -- --ignored`) and checks that each tier ran tests
//!   and that the full tier ran every test the fast one skipped.
//!
//! Every kit helper that starts a daemon, a server or a guest, or needs root, calls [`require_full`]
//! first: a test using one without the `#[ignore]` mark fails at once, also as root, instead of slowing
//! the fast tier down or failing later with EPERM for another user. `ci/test.sh` runs the fast tier as
//! `nobody`, which catches a test that needs root without going through the kit.

/// Whether this process runs the full tier: the test harness was asked to run ignored tests
/// (`--ignored`, `--include-ignored`), or this is a benchmark (`cargo bench` passes `--bench`).
pub fn full_tier() -> bool {
    std::env::args()
        .skip(1)
        .any(|a| a == "--ignored" || a == "--include-ignored" || a == "--bench")
}

/// Panics unless this process runs the full tier (see the module documentation); `what` names what the
/// test needs.
#[track_caller]
pub fn require_full(what: &str) {
    assert!(
        full_tier(),
        "{what}: a full-tier test. Mark it #[ignore = \"needs root: ci/test.sh\"] and run it with \
         `cargo test -- --ignored` as root, or ci/test.sh (README, \"Tests\")"
    );
}
