//! A program embedding rafsd through [`rafsd::embed`] instead of spawning the binary: one daemon serves
//! a reference image, the blob view of the same image and a host directory over FUSE, with the admin
//! API; the program reads through the mount, checks what it reads against the fixtures' manifest and
//! the image's files, and shuts the daemon down.
//!
//! `cargo run --example embed [-- CASE]` as root (FUSE mounts); `ci/test.sh` runs it. CASE is one of
//! tests/fixtures/rafs/CASES (default v6-zstd-blake3; `$RAFSD_FIXTURES` overrides the fixtures folder).
//! Exits 0 when every check passed, 1 with the reason otherwise.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use rafsd::embed::{is_mounted, Builder};
use sha2::{Digest, Sha256};

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("embed: ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("embed: {e}");
            ExitCode::from(1)
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn run() -> Result<()> {
    let fixtures = std::env::var_os("RAFSD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rafs"));
    let case = std::env::args().nth(1).unwrap_or("v6-zstd-blake3".into());
    let image = fixtures.join(&case);
    let work = tempfile::tempdir()?;
    let (mnt, cache, share) = (
        work.path().join("mnt"),
        work.path().join("cache"),
        work.path().join("share"),
    );
    for d in [&mnt, &cache, &share] {
        std::fs::create_dir(d)?;
    }
    std::fs::write(share.join("hello"), "from the host\n")?;
    let api = work.path().join("api.sock");
    // The nydusd config the command line and the admin API take: blobs in the fixture, cached in `cache`.
    let config = serde_json::json!({
        "device": {
            "backend": {"type": "localfs", "config": {"dir": image.join("blobs")}},
            "cache": {"type": "blobcache", "config": {"work_dir": cache}},
        },
        "mode": "direct",
        "digest_validate": true,
    })
    .to_string();

    let bootstrap = image.join("bootstrap");
    let mut builder = Builder::new()
        .id("embed-example")
        .rafs("/image", &bootstrap, &config)
        .passthrough("/share", &share)
        .api_socket(&api);
    // The blob view is what the guest's EROFS driver reads: RAFS v6 only.
    let v6 = case.starts_with("v6");
    if v6 {
        builder = builder.blob_view("/blobs", &bootstrap, &config);
    }
    let running = builder.build()?.serve_fuse(&mnt)?;
    println!("embed: serving {case} at {}", mnt.display());

    // Every regular file of the manifest, read through the mount, has the manifest's digest.
    let manifest = std::fs::read_to_string(fixtures.join("manifest.tsv"))?;
    let mut files = 0;
    for line in manifest.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        if let Some([path, "f", .., sha]) = cols.get(..10) {
            let got = sha256(&std::fs::read(mnt.join("image").join(path))?);
            if got != *sha {
                return Err(format!("/image/{path}: sha256 {got}, the manifest says {sha}").into());
            }
            files += 1;
        }
    }
    if files == 0 {
        return Err("the manifest lists no regular file".into());
    }
    println!("embed: {files} files match the manifest");

    // The share shows the host's files, also one added while it is served (the FUSE mount itself is
    // read-only, as `rafsd fuse`'s is).
    std::fs::write(share.join("later"), "added later\n")?;
    for (name, want) in [("hello", "from the host\n"), ("later", "added later\n")] {
        let got = std::fs::read_to_string(mnt.join("share").join(name))?;
        if got != want {
            return Err(
                format!("/share/{name} reads {got:?}, the host file holds {want:?}").into(),
            );
        }
    }

    // The blob view's `bootstrap` is the image's bootstrap, byte for byte.
    if v6 && std::fs::read(mnt.join("blobs/bootstrap"))? != std::fs::read(&bootstrap)? {
        return Err("/blobs/bootstrap differs from the image's bootstrap".into());
    }

    // The admin API answers for the embedded daemon.
    let info = api_get(&api, "/api/v1/daemon")?;
    for want in ["\"state\":\"RUNNING\"", "\"id\":\"embed-example\""] {
        if !info.contains(want) {
            return Err(format!("GET /api/v1/daemon lacks {want}: {info}").into());
        }
    }

    running.shutdown()?;
    if is_mounted(&mnt) {
        // Detached, so removing the work folder does not wait on a connection nobody serves.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&mnt)
            .status();
        return Err(format!("{} is still mounted after shutdown", mnt.display()).into());
    }
    if api.exists() {
        return Err("the API socket is still there after shutdown".into());
    }
    println!("embed: shut down, {} unmounted", mnt.display());
    Ok(())
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One GET on the admin API's Unix socket; returns the body (HTTP/1.1 with `Connection: close`).
fn api_get(sock: &Path, path: &str) -> Result<String> {
    let mut s = UnixStream::connect(sock)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    if !reply.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {path}: {}", reply.lines().next().unwrap_or("")).into());
    }
    Ok(reply.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}
