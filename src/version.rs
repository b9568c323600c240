//! What this build is: package version, git commit, build time, profile and compiler (set by the build
//! script, `seccomp/build_info.rs`), in the shapes nydusd's clients read.

use serde_json::{json, Value};

pub const PACKAGE_VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_COMMIT: &str = env!("RAFSD_GIT_COMMIT");
/// Seconds since the epoch when the build script ran (or `SOURCE_DATE_EPOCH`).
pub const BUILD_EPOCH: &str = env!("RAFSD_BUILD_EPOCH");
pub const RUSTC: &str = env!("RAFSD_RUSTC");
pub const PROFILE: &str = if cfg!(debug_assertions) {
    "debug"
} else {
    "release"
};

/// The build time as RFC 3339 UTC.
pub fn build_time() -> String {
    let secs = BUILD_EPOCH.parse::<u64>().unwrap_or(0);
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    let (y, mo, d, h, mi, s, _) = crate::storage::object_store::civil(t);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `rafsd --version`, one `Key: value` line each as nydusd prints them: nydus-snapshotter parses
/// `Git Commit:\s*(.+)` from it before it adopts running daemons.
pub fn long_text() -> String {
    format!(
        "Version: \t{PACKAGE_VERSION}\nGit Commit: \t{GIT_COMMIT}\nBuild Time: \t{}\nProfile: \t{PROFILE}\nRustc: \t\t{RUSTC}\n",
        build_time()
    )
}

/// nydusd's `BuildTimeInfo`, the `version` object of `GET /api/v1/daemon`.
pub fn to_json() -> Value {
    json!({
        "package_ver": PACKAGE_VERSION,
        "git_commit": GIT_COMMIT,
        "build_time": build_time(),
        "profile": PROFILE,
        "rustc": RUSTC,
    })
}
