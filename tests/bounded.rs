//! Work is bounded by what the request can carry and by documented limits, not by what a guest or an image
//! asks for: a FUSE_READ with a 4 GiB size and a 4 KiB reply buffer fetches only what the reply holds, and
//! images whose bootstrap asks for more memory than the limits allow (a chunk-info array, the blob view's
//! placements, a v5 xattr area) are refused at mount time with a clear error. After every attack the
//! daemon keeps serving its other mounts. Driven through `rafsd virtiofs`, its admin API and the test
//! frontend (`kit::frontend`) playing the guest.

use kit::{built, daemon, frontend, layout, manifest};

use std::path::Path;

use built::{build_tree, pseudo_random, Built};
use frontend::{Guest, Options, VirtiofsDaemon, ROOT};
use fuse_backend_rs::abi::fuse_abi::{Opcode, ReadIn};
use layout::{le, v5, v6};
use manifest::{manifest_sha, sha256_hex};
use vm_memory::ByteValued;

const BIN: &str = env!("CARGO_BIN_EXE_rafsd");
/// 4 KiB chunks, stored uncompressed: backend bytes = chunks fetched x 4096.
const CASE_4K: &str = "v6-none-blake3-4k";
const GOOD: &str = "v6-zstd-blake3";

/// A fixture case's config: localfs over its blobs, a blob cache under `dir`, no read amplification (so
/// every backend byte is one a read asked for).
fn config(blob_dir: &Path, dir: &Path) -> String {
    daemon::v1_config(blob_dir, &dir.join("cache"), false, r#","amplify_io":0"#)
}

fn start(dir: &Path) -> (VirtiofsDaemon, Guest) {
    let d = VirtiofsDaemon::start(BIN, dir, &["--log-level", "info"]);
    let mut g = Guest::connect(&d.sock, Options::default()).expect("vhost-user handshake");
    g.fuse_init().unwrap();
    (d, g)
}

/// `read_amount_total` of a mount's backend metrics.
fn backend_bytes(d: &VirtiofsDaemon, mountpoint: &str) -> u64 {
    let (status, body) = d
        .api(
            "GET",
            &format!("/api/v1/metrics/backend?id={mountpoint}"),
            "",
        )
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["read_amount_total"].as_u64().unwrap()
}

/// FUSE_READ of `size` bytes at `offset` with a reply buffer of `reply_len` bytes, as a guest driver may
/// send it; returns the data of a successful reply or the errno.
fn raw_read(
    g: &mut Guest,
    node: u64,
    fh: u64,
    offset: u64,
    size: u32,
    reply_len: u32,
) -> Result<Vec<u8>, i32> {
    let a = ReadIn {
        fh,
        offset,
        size,
        flags: libc::O_RDONLY as u32,
        ..Default::default()
    };
    let r = g
        .call(Opcode::Read, node, &[a.as_slice()], reply_len)
        .expect("an answer to the READ");
    if r.header.error < 0 {
        return Err(-r.header.error);
    }
    Ok(r.body)
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_read_asking_for_4_gib_with_a_4_kib_buffer_fetches_one_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let (d, mut g) = start(dir.path());
    let config = config(&manifest::case_blob_dir(CASE_4K), dir.path());
    d.mount_rafs("/img", &manifest::case_bootstrap(CASE_4K), &config);
    let node = g
        .lookup_path(ROOT, "img/special/random-2m5")
        .unwrap()
        .nodeid;
    let fh = g.open(node).unwrap().fh;
    assert_eq!(backend_bytes(&d, "/img"), 0);
    // The backend counters count every read, the blob's chunk-info array too: an ordinary 4 KiB READ far
    // from the ranges below loads that first, so what follows counts chunks only.
    g.read(node, fh, 600 * 4096, 4096).unwrap();
    let before = backend_bytes(&d, "/img");

    // At the start of the file, then in the middle (chunk 300 of 640).
    let mut expected_bytes = 0;
    for offset in [0u64, 300 * 4096 + 100] {
        let got = raw_read(&mut g, node, fh, offset, u32::MAX, 4096)
            .unwrap_or_else(|e| panic!("READ at {offset}: errno {e}\n{}", d.log_text()));
        assert_eq!(got.len(), 4096, "the reply holds what its buffer holds");
        let again = g.read(node, fh, offset, 4096).unwrap();
        assert_eq!(got, again, "the same bytes as an ordinary 4 KiB READ");
        // The second range straddles two chunks.
        expected_bytes += if offset % 4096 == 0 { 4096 } else { 8192 };
        let fetched = backend_bytes(&d, "/img") - before;
        assert!(
            fetched <= expected_bytes,
            "READ at {offset} of u32::MAX bytes into a 4 KiB buffer made the daemon fetch {fetched} bytes \
             (the chunks under the reply are {expected_bytes})"
        );
    }
    // The file still reads whole and right, and the daemon serves on.
    let data = g.read_file(node, 128 << 10).unwrap();
    assert_eq!(sha256_hex(&data), manifest_sha("special/random-2m5"));
    g.release(node, fh, false).unwrap();
}

// ---------------------------------------------------------------------------------------------------
// Image-controlled sizes, refused at mount time.

/// A copy of fixture `case` (bootstrap patched by `patch`, blobs by symlink) under `dir/name`.
fn patched_copy(dir: &Path, name: &str, case: &str, patch: impl FnOnce(&mut Vec<u8>)) -> Built {
    let root = dir.join(name);
    let blob_dir = root.join("blobs");
    std::fs::create_dir_all(&blob_dir).unwrap();
    let mut blob_id = String::new();
    for e in std::fs::read_dir(manifest::case_blob_dir(case)).unwrap() {
        let e = e.unwrap();
        // Canonical: the sandboxed daemon sees the fixtures at their own path only.
        let target = e.path().canonicalize().unwrap();
        std::os::unix::fs::symlink(target, blob_dir.join(e.file_name())).unwrap();
        blob_id = e.file_name().into_string().unwrap();
    }
    let mut boot = std::fs::read(manifest::case_bootstrap(case)).unwrap();
    patch(&mut boot);
    let bootstrap = root.join("bootstrap");
    std::fs::write(&bootstrap, boot).unwrap();
    Built {
        bootstrap,
        blob_dir,
        blob_id,
        files: Vec::new(),
    }
}

/// Set blob `i`'s chunk count, and a chunk-info array size that matches it (16-byte V1 entries).
fn set_chunk_count(boot: &mut [u8], i: usize, count: u32) {
    let e = v6::blob_entry(boot, i);
    le::put_u32(boot, e + v6::BLOB_CHUNK_COUNT, count);
    le::put_u64(boot, e + v6::BLOB_CI_UNCOMPRESSED_SIZE, 16 * count as u64);
}

/// Mount `image` at `mountpoint` with `fs_type`: the status and body of the API's answer.
fn try_mount(d: &VirtiofsDaemon, mountpoint: &str, fs_type: &str, image: &Built) -> (u16, String) {
    let config = config(&image.blob_dir, image.bootstrap.parent().unwrap());
    d.try_mount(mountpoint, fs_type, &image.bootstrap, &config)
}

#[track_caller]
fn assert_refused(answer: (u16, String), needles: &[&str]) {
    let (status, body) = answer;
    assert!(
        (400..500).contains(&status),
        "want a 4xx refusal naming {needles:?}, got {status} {body}"
    );
    for n in needles {
        assert!(body.contains(n), "the refusal does not say {n:?}: {body}");
    }
}

/// The good mount still serves its files exactly.
fn assert_good_mount_serves(g: &mut Guest) {
    let node = g
        .lookup_path(ROOT, "good/special/random-2m5")
        .unwrap()
        .nodeid;
    let data = g.read_file(node, 128 << 10).unwrap();
    assert_eq!(sha256_hex(&data), manifest_sha("special/random-2m5"));
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn images_asking_for_more_memory_than_the_limits_are_refused_at_mount() {
    let dir = tempfile::tempdir().unwrap();
    let (d, mut g) = start(dir.path());
    let good = config(&manifest::case_blob_dir(GOOD), dir.path());
    d.mount_rafs("/good", &manifest::case_bootstrap(GOOD), &good);
    assert_good_mount_serves(&mut g);

    // A blob of 2^24 chunks whose chunk-info array (a few KiB of zstd in the blob) decompresses to 256 MiB.
    let bomb = patched_copy(dir.path(), "ci-bomb", GOOD, |b| {
        set_chunk_count(b, 0, 1 << 24)
    });
    assert_refused(
        try_mount(&d, "/ci-bomb", "rafs", &bomb),
        &["chunk-info array", "limit"],
    );
    assert_good_mount_serves(&mut g);

    // A v5 inode whose xattr area covers 300 KiB of the bootstrap, copied whole on every GETXATTR: the
    // directory `etc` (an early record) gets the XATTR flag and an area over the records that follow it
    // (the 21 bytes written land in the next record's unchecked i_digest).
    let case = "v5-lz4-blake3-repeatable";
    let xattrs = patched_copy(dir.path(), "v5-xattrs", case, |b| {
        let rec = v5::find(b, "etc");
        le::put_u64(b, rec.off + v5::I_FLAGS, rec.flags | v5::I_XATTR);
        let table = v5::xattr_table(&v5::find(b, "etc"));
        let total = 300 << 10;
        assert!(table + 8 + total < b.len(), "the area fits the bootstrap");
        le::put_u64(b, table, total as u64);
        // One pair spanning the area: `user.big`, then everything that follows as its value.
        le::put_u32(b, table + 8, total as u32 - 4);
        b[table + 12..table + 21].copy_from_slice(b"user.big\0");
    });
    assert_refused(
        try_mount(&d, "/v5-xattrs", "rafs", &xattrs),
        &["xattr", "limit"],
    );
    assert_good_mount_serves(&mut g);

    // Two layers of 2.1 million chunks each: within the chunk-info limits, but 4.2 million chunks take
    // more placement memory than the blob view allows.
    let base = build_tree(
        dir.path(),
        "base",
        vec![("a".into(), pseudo_random(8192, 1))],
        None,
        &[],
    );
    let upper = build_tree(
        dir.path(),
        "upper",
        vec![("b".into(), pseudo_random(8192, 2))],
        Some(&base),
        &[],
    );
    let mut boot = std::fs::read(&upper.bootstrap).unwrap();
    for i in 0..2 {
        set_chunk_count(&mut boot, i, 2_100_000);
    }
    std::fs::write(&upper.bootstrap, boot).unwrap();
    let (status, body) = try_mount(&d, "/layers", "rafs", &upper);
    assert_eq!(status, 204, "the image itself is within limits: {body}");
    assert_refused(
        try_mount(&d, "/layers-view", "blob_view", &upper),
        &["blob view", "chunks", "limit"],
    );
    assert_good_mount_serves(&mut g);
}
