//! Build facts for `rafsd --version` and `GET /api/v1/daemon`: the git commit, the build time and the
//! compiler, handed to the crate as `RAFSD_GIT_COMMIT`, `RAFSD_BUILD_EPOCH` and `RAFSD_RUSTC`.
//!
//! nydus-snapshotter reads `Git Commit:` from `nydusd --version` when it restarts with live daemons, so
//! a build outside a git checkout (a source tarball, no git installed) still says something:
//! "unknown".

use std::path::Path;
use std::process::Command;

/// Run git in the package directory; `None` when git is missing or the tree is not a checkout.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_string())
}

/// Ask cargo to run the build script again when `path` changes. Only existing files are named: cargo
/// reruns the script on every build for a path that does not exist.
fn watch(path: &str) {
    if Path::new(path).exists() {
        println!("cargo:rerun-if-changed={path}");
    }
}

/// `SOURCE_DATE_EPOCH` (reproducible builds) or now, in seconds since the epoch; the crate formats it.
fn build_epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        })
}

pub fn emit() {
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    // HEAD, the branch it points at (a loose ref) and packed refs: a commit or checkout changes one.
    for name in ["HEAD", "packed-refs"] {
        if let Some(p) = git(&["rev-parse", "--git-path", name]) {
            watch(&p);
        }
    }
    if let Some(p) =
        git(&["symbolic-ref", "-q", "HEAD"]).and_then(|r| git(&["rev-parse", "--git-path", &r]))
    {
        watch(&p);
    }
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc_version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=RAFSD_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=RAFSD_BUILD_EPOCH={}", build_epoch());
    println!("cargo:rustc-env=RAFSD_RUSTC={rustc_version}");
}
