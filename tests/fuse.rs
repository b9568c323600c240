//! The host FUSE fallback, through real /dev/fuse mounts of `rafsd` daemons: every reference image, cold
//! and warm, concurrent readers, crash recovery of the blob cache, cache corruption, bad configuration.
//! Needs root (mounting).

use kit::built::pseudo_random;
use kit::{daemon, manifest, services};

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use daemon::{run_bounded, v1_config, Daemon};
use rafsd::{ImageOptions, RafsImage};

struct Case {
    name: String,
    bootstrap: PathBuf,
    blobs: PathBuf,
}

fn case(name: &str) -> Case {
    Case {
        name: name.into(),
        bootstrap: manifest::case_bootstrap(name),
        blobs: manifest::case_blob_dir(name),
    }
}

fn start(c: &Case, dir: &Path, validate: bool, extra: &str) -> Daemon {
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        v1_config(&c.blobs, &dir.join("cache"), validate, extra),
    )
    .unwrap();
    Daemon::start(
        &[
            "--config",
            config.to_str().unwrap(),
            "--bootstrap",
            c.bootstrap.to_str().unwrap(),
            "--thread-num",
            "4",
        ],
        &dir.join("mnt"),
        &dir.join("rafsd.log"),
    )
}

fn assert_tree(d: &Daemon, c: &Case, pass: &str) {
    let problems = manifest::compare_tree(&d.mountpoint, manifest::allowances_for(&c.name));
    assert!(
        problems.is_empty(),
        "{} ({pass}): {} mismatches, first: {:#?}\nlog:\n{}",
        c.name,
        problems.len(),
        &problems[..problems.len().min(10)],
        d.log_text()
    );
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn every_fixture_mounts_and_matches_the_manifest_cold_and_warm() {
    manifest::assert_root("FUSE mounts");
    for name in manifest::cases() {
        let c = case(&name);
        let dir = tempfile::tempdir().unwrap();
        let d = start(&c, dir.path(), false, "");
        assert_tree(&d, &c, "cold: chunks from the blob dir");
        assert!(d.stop().success());
        // A new daemon on the same cache serves everything from it, READ replies spliced from the
        // cache files into /dev/fuse (those that fit its pipes: all of these files' reads do).
        let d = start(&c, dir.path(), false, "");
        assert_tree(&d, &c, "warm: chunks from the cache");
        assert!(
            d.log_text()
                .contains("READ replies are spliced into /dev/fuse"),
            "{}: no READ reply was spliced; log:\n{}",
            c.name,
            d.log_text()
        );
        assert!(d.stop().success());
    }
}

/// Expected bytes of every regular file, read through the library without a cache.
fn reference_files(c: &Case) -> Vec<(String, Vec<u8>)> {
    let image = RafsImage::open_local(
        &c.bootstrap,
        Some(&c.blobs),
        ImageOptions {
            validate: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut files = Vec::new();
    image
        .walk(&mut |rel, attr, ev| {
            if ev == rafsd::image::WalkEvent::Node && attr.is_reg() && attr.size > 0 {
                let mut buf = vec![0u8; attr.size as usize];
                image.read(attr.ino, 0, &mut buf)?;
                files.push((rel.to_string_lossy().into_owned(), buf));
            }
            Ok(())
        })
        .unwrap();
    files
}

/// xorshift64*: deterministic, dependency-free randomness for the readers.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn random_reads(root: &Path, files: &[(String, Vec<u8>)], seed: u64, count: usize) -> Vec<String> {
    let mut rng = Rng(seed);
    let mut wrong = Vec::new();
    for _ in 0..count {
        let (path, want) = &files[(rng.next() % files.len() as u64) as usize];
        let off = rng.next() % want.len() as u64;
        let len = 1 + (rng.next() % (256 << 10)) as usize;
        let mut got = vec![0u8; len];
        let f = std::fs::File::open(root.join(path)).unwrap();
        let n = f.read_at(&mut got, off).unwrap();
        let expect = &want[off as usize..(off as usize + len).min(want.len())];
        if &got[..n] != expect {
            wrong.push(format!(
                "{path} at {off}+{len}: got {n} bytes, want {}",
                expect.len()
            ));
        }
    }
    wrong
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn eight_concurrent_random_readers_get_the_right_bytes_cold_and_warm() {
    manifest::assert_root("FUSE mounts");
    for name in [
        "v6-zstd-blake3",
        "v5-lz4-blake3-repeatable",
        "v6-zstd-batch",
    ] {
        let c = case(name);
        let files = reference_files(&c);
        let dir = tempfile::tempdir().unwrap();
        for pass in ["cold", "warm"] {
            let d = start(&c, dir.path(), false, r#","amplify_io":262144"#);
            let root = d.mountpoint.clone();
            let wrong: Vec<String> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|t| {
                        let (root, files) = (&root, &files);
                        s.spawn(move || {
                            random_reads(root, files, 0x9E37_79B9_7F4A_7C15 ^ (t + 1), 300)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().unwrap())
                    .collect()
            });
            assert!(wrong.is_empty(), "{name} {pass}: {wrong:#?}");
            assert!(d.stop().success());
        }
    }
}

/// Wait (at most `secs` seconds) until all `chunks` chunks are ready in the blob cache at `cache`.
fn wait_cached(cache: &Path, chunks: u32, secs: u64, d: &Daemon, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (ready, _) = chunk_map_ready_bits(cache);
        if ready == chunks {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {ready} of {chunks} chunks cached in {secs} s\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn chunk_map_ready_bits(cache: &Path) -> (u32, u64) {
    blob_ready_bits(cache, "")
}

/// Chunks ready in the blob cache at `cache`, of the blobs whose ids start with `blob` (all for ""), and
/// the chunk maps' bytes.
fn blob_ready_bits(cache: &Path, blob: &str) -> (u32, u64) {
    let mut ready = 0;
    let mut total_bytes = 0;
    for e in std::fs::read_dir(cache).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with(blob) && name.ends_with(".chunk_map") {
            let bytes = std::fs::read(&p).unwrap();
            // A map being created may not have its 4 KiB header yet.
            let bits = bytes.get(4096..).unwrap_or_default();
            ready += bits.iter().map(|b| b.count_ones()).sum::<u32>();
            total_bytes += bytes.len() as u64;
        }
    }
    (ready, total_bytes)
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn kill_9_during_cold_reads_never_leaves_a_torn_chunk() {
    manifest::assert_root("FUSE mounts");
    let c = case("v6-none-blake3-4k"); // 3174 small chunks: many cache writes to interrupt
    let dir = tempfile::tempdir().unwrap();
    for delay_ms in [30u64, 120, 400] {
        let d = start(&c, dir.path(), false, r#","amplify_io":0"#);
        let root = d.mountpoint.clone();
        let reader = std::thread::spawn(move || {
            // Read everything until the daemon dies under us; errors are expected then.
            for e in walk(&root) {
                let _ = std::fs::read(&e);
            }
        });
        // Kill `delay_ms` after this daemon cached its first chunk: a loaded machine may take longer
        // than any fixed delay just to list the tree, and a kill before any store proves nothing.
        let cache = dir.path().join("cache");
        let cached = || match cache.exists() {
            true => chunk_map_ready_bits(&cache).0,
            false => 0,
        };
        let before = cached();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && cached() <= before {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        d.kill9();
        reader.join().unwrap();
    }
    let (ready, _) = chunk_map_ready_bits(&dir.path().join("cache"));
    assert!(
        ready > 0,
        "the killed daemons cached nothing; the test did not exercise a partial cache"
    );
    // Restart on the same cache without validation: whatever is marked ready is served as-is.
    let d = start(&c, dir.path(), false, "");
    assert_tree(&d, &c, "after kill -9 restarts");
    assert!(d.stop().success());
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// Flip 16 bytes at `offset` of `path`.
fn flip(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 16];
    f.read_exact_at(&mut b, offset).unwrap();
    for x in &mut b {
        *x ^= 0x5a;
    }
    f.write_all_at(&b, offset).unwrap();
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn flipped_bytes_in_the_cache_are_caught_with_validation() {
    manifest::assert_root("FUSE mounts");
    let c = case("v6-zstd-blake3");
    let dir = tempfile::tempdir().unwrap();
    // Our own copy of the blob, so the second half can damage it too.
    let blobs = dir.path().join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    for e in std::fs::read_dir(&c.blobs).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), blobs.join(e.file_name())).unwrap();
    }
    let c = Case { blobs, ..c };
    let d = start(&c, dir.path(), true, "");
    let victim = d.mountpoint.join("special/random-2m5");
    let good = std::fs::read(&victim).unwrap();
    assert!(d.stop().success());

    let image =
        RafsImage::open_local(&c.bootstrap, Some(&c.blobs), ImageOptions::default()).unwrap();
    let special = image.lookup(image.root_ino(), b"special").unwrap().unwrap();
    let ino = image.lookup(special, b"random-2m5").unwrap().unwrap();
    let chunk = image.file_chunks(ino).unwrap()[1].clone();
    let blob_id = image.info().blobs[chunk.blob_index as usize].id.clone();
    // `<blob id>.<cache key>.blob.data`: the only data file of this blob in the cache.
    let cache_file = std::fs::read_dir(dir.path().join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(&format!("{blob_id}.")) && name.ends_with(".blob.data")
        })
        .expect("the blob's cache data file");
    let pristine = std::fs::read(&cache_file).unwrap();

    // 1. Only the cache is damaged: caught, logged, and repaired from the backend; never wrong bytes.
    flip(&cache_file, chunk.uncompressed_offset + 100);
    let mut d = start(&c, dir.path(), true, "");
    let read = std::fs::read(&victim).map_err(|e| e.to_string());
    assert!(
        read.as_ref().is_ok_and(|r| *r == good),
        "damaged cache must be repaired, got {:?}",
        read.map(|r| r.len())
    );
    let log = d.log_text();
    assert!(
        log.contains("digest")
            && log.contains(&format!("chunk {}", chunk.index))
            && log.contains("dropping the cached chunk"),
        "log must name the failed chunk:\n{log}"
    );
    assert!(d.is_running());
    assert!(d.stop().success());
    assert!(
        std::fs::read(&cache_file).unwrap() == pristine,
        "the cache file holds the verified chunk again"
    );

    // 2. Cache and blob both damaged: no verified copy exists, so the reader gets EIO; the daemon stays up.
    flip(&cache_file, chunk.uncompressed_offset + 100);
    flip(&c.blobs.join(&blob_id), chunk.compressed_offset + 10);
    let mut d = start(&c, dir.path(), true, "");
    match std::fs::read(&victim) {
        Ok(bytes) => panic!("{} bytes served from a corrupt chunk", bytes.len()),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
    assert!(d.is_running(), "daemon must stay up");
    assert!(
        std::fs::read(d.mountpoint.join("special/xattrs")).is_ok(),
        "other files still read"
    );
    assert!(d.log_text().contains(&format!("chunk {}", chunk.index)));
    assert!(d.stop().success());
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_full_cache_disk_degrades_to_backend_reads() {
    manifest::assert_root("tmpfs and FUSE mounts");
    let c = case("v5-zstd-sha256-128k");
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    daemon::mount_tmpfs(&cache, c"size=256k");
    let d = start(&c, dir.path(), false, "");
    assert_tree(&d, &c, "cache disk full");
    let log = d.log_text();
    assert!(d.stop().success());
    daemon::lazy_unmount(&cache);
    // Storing stops at the disk's floor (or, had a write failed first, for a while).
    assert!(
        log.contains("serving from the backend without"),
        "expected a warning about the full cache:\n{log}"
    );
}

/// A cache disk with room for a chunk map's header and nothing more (a co-tenant filled it): the first
/// access to the map's bitmap page, which nobody wrote, needs a block the disk does not have. Through the
/// shared mapping that is SIGBUS, which killed the daemon and every mount in it; maps are now allocated
/// in full when made or opened, and a blob whose map cannot be is read from the backend.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_cache_disk_with_room_for_a_map_header_only_does_not_kill_the_daemon() {
    manifest::assert_root("tmpfs and FUSE mounts");
    let c = case("v5-zstd-sha256-128k");
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    daemon::mount_tmpfs(&cache, c"size=1m");
    // Every page but one goes to another file: the fixture's one blob gets its map's header, no more.
    let mut filler = std::fs::File::create(cache.join("filler")).unwrap();
    let page = [0u8; 4096];
    while std::io::Write::write_all(&mut filler, &page).is_ok() {}
    let filled = filler.metadata().unwrap().len();
    filler.set_len(filled / 4096 * 4096 - 4096).unwrap();
    drop(filler);
    let d = start(&c, dir.path(), false, "");
    assert_tree(&d, &c, "cache disk with room for a map header");
    let log = d.log_text();
    assert!(d.stop().success(), "the daemon died:\n{log}");
    daemon::lazy_unmount(&cache);
    assert!(
        log.contains("cannot cache blob"),
        "expected the blob to be read uncached:\n{log}"
    );
}

/// (available, size) in bytes of the filesystem holding `path`.
fn filesystem_space(path: &Path) -> (u64, u64) {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs64 is plain old data, filled by the call.
    let mut st: libc::statvfs64 = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a pointer to a struct of the right type.
    assert_eq!(unsafe { libc::statvfs64(p.as_ptr(), &mut st) }, 0);
    (st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)
}

/// An image (uncompressed, in `dir`) of one file `big` of `mib` MiB of random bytes, and the bytes.
fn build_one_big_file(dir: &Path, mib: usize) -> (Case, Vec<u8>) {
    let mut rng = Rng(7);
    let data: Vec<u8> = (0..mib << 17)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    let files = vec![("big".into(), data.clone())];
    (
        built_case(dir, "built", files, &["--compressor", "none"]),
        data,
    )
}

/// The image `kit::built::build_tree` builds in `dir/name` from `files`, as a case.
fn built_case(dir: &Path, name: &str, files: Vec<(String, Vec<u8>)>, args: &[&str]) -> Case {
    let built = kit::built::build_tree(dir, name, files, None, args);
    Case {
        name: name.into(),
        bootstrap: built.bootstrap,
        blobs: built.blob_dir,
    }
}

/// An image larger than the cache's filesystem, read whole: the cache used to store chunks until the
/// disk was full (then turned itself off for a while, and tried again), taking the last bytes from
/// everything else writing there. It now stops at 5% free and the reads go on from the backend.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn an_image_larger_than_the_cache_disk_leaves_the_disk_its_floor() {
    manifest::assert_root("tmpfs and FUSE mounts");
    let dir = tempfile::tempdir().unwrap();
    let (c, data) = build_one_big_file(dir.path(), 24);
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    daemon::mount_tmpfs(&cache, c"size=16m");
    let d = start(&c, dir.path(), false, "");
    for pass in ["cold", "again"] {
        assert!(
            std::fs::read(d.mountpoint.join("big")).unwrap() == data,
            "{pass} read differs"
        );
        let (available, size) = filesystem_space(&cache);
        assert!(
            available >= size / 20,
            "{pass}: the cache left {available} of {size} bytes free"
        );
    }
    // Someone else can still write there.
    std::fs::write(cache.join("other"), vec![1u8; 256 << 10]).unwrap();
    let log = d.log_text();
    assert!(d.stop().success(), "{log}");
    daemon::lazy_unmount(&cache);
    assert_eq!(
        log.matches("the cache leaves").count(),
        1,
        "one warning expected:\n{log}"
    );
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn prefetch_all_fills_the_cache_without_reads() {
    manifest::assert_root("FUSE mounts");
    let c = case("v6-lz4-sha256-64k");
    let dir = tempfile::tempdir().unwrap();
    let d = start(
        &c,
        dir.path(),
        false,
        r#","fs_prefetch":{"enable":true,"threads_count":2,"merging_size":131072,"prefetch_all":true}"#,
    );
    let image =
        RafsImage::open_local(&c.bootstrap, Some(&c.blobs), ImageOptions::default()).unwrap();
    let chunks: u32 = image.info().blobs.iter().map(|b| b.chunk_count).sum();
    wait_cached(&dir.path().join("cache"), chunks, 60, &d, "prefetch");
    assert_tree(&d, &c, "after prefetch");
    assert!(d.stop().success());
}

/// Prefetch with a bandwidth limit and a merging size larger than the limiter's bucket (16 MiB): the
/// 40 MiB of one uncompressed blob, contiguous, used to become one merged request the limiter never
/// granted, so prefetch hung. It now completes, at about the configured rate.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn prefetch_with_a_bandwidth_limit_completes_runs_larger_than_the_bucket() {
    manifest::assert_root("FUSE mounts");
    let dir = tempfile::tempdir().unwrap();
    let (c, data) = build_one_big_file(dir.path(), 40);
    let started = Instant::now();
    let d = start(
        &c,
        dir.path(),
        false,
        r#","fs_prefetch":{"enable":true,"threads_count":1,"merging_size":67108864,"bandwidth_rate":8388608,"prefetch_all":true}"#,
    );
    wait_cached(&dir.path().join("cache"), 40, 60, &d, "prefetch");
    // 16 MiB at once (the bucket starts full), the other 24 MiB at 8 MiB/s.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "the limit was not applied: {took:?}"
    );
    assert_eq!(std::fs::read(d.mountpoint.join("big")).unwrap(), data);
    assert!(d.stop().success());
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn write_requests_are_refused_with_erofs() {
    manifest::assert_root("FUSE mounts");
    let c = case("v6-zstd-blake3");
    let dir = tempfile::tempdir().unwrap();
    let d = start(&c, dir.path(), false, "");
    let m = &d.mountpoint;
    let errno = |r: std::io::Result<()>| r.err().and_then(|e| e.raw_os_error());
    assert_eq!(
        errno(
            std::fs::OpenOptions::new()
                .write(true)
                .open(m.join("special/xattrs"))
                .map(drop)
        ),
        Some(libc::EROFS)
    );
    assert_eq!(
        errno(std::fs::create_dir(m.join("newdir"))),
        Some(libc::EROFS)
    );
    assert_eq!(
        errno(std::fs::write(m.join("new-file"), b"x")),
        Some(libc::EROFS)
    );
    assert_eq!(
        errno(std::fs::remove_file(m.join("special/xattrs"))),
        Some(libc::EROFS)
    );
    assert_eq!(
        errno(std::fs::rename(
            m.join("special/xattrs"),
            m.join("special/x2")
        )),
        Some(libc::EROFS)
    );
    // xattr size queries and ERANGE through the kernel.
    let file = m.join("special/xattrs");
    assert_eq!(get_xattr(&file, c"user.color", 0).unwrap(), 4);
    assert_eq!(
        get_xattr(&file, c"user.color", 2)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ERANGE)
    );
    assert_eq!(
        get_xattr(&file, c"user.absent", 2)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENODATA)
    );
    assert!(d.stop().success());
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn bad_configs_and_missing_files_exit_with_a_clear_error() {
    manifest::assert_root("FUSE mounts");
    let c = case("v6-zstd-blake3");
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let empty_blobs = dir.path().join("no-blobs");
    std::fs::create_dir_all(&empty_blobs).unwrap();
    let good = write(
        "good.json",
        &v1_config(&c.blobs, &dir.path().join("cache"), false, ""),
    );
    let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
        (
            vec![
                "--config".into(),
                write("syntax.json", "{not json").into(),
                "--bootstrap".into(),
                c.bootstrap.clone().into(),
            ],
            "not valid JSON",
        ),
        (
            vec![
                "--config".into(),
                write(
                    "type.json",
                    &v1_config(&c.blobs, dir.path(), false, "")
                        .replace("\"digest_validate\":false", "\"digest_validate\":1"),
                )
                .into(),
                "--bootstrap".into(),
                c.bootstrap.clone().into(),
            ],
            "`digest_validate`: expected true or false",
        ),
        (
            vec![
                "--config".into(),
                good.clone().into(),
                "--bootstrap".into(),
                dir.path().join("missing-bootstrap").into(),
            ],
            "missing-bootstrap: No such file",
        ),
        (
            vec![
                "--config".into(),
                write(
                    "noblob.json",
                    &v1_config(&empty_blobs, &dir.path().join("cache"), false, ""),
                )
                .into(),
                "--bootstrap".into(),
                c.bootstrap.clone().into(),
            ],
            "blob 7d5a286946361db8a441e2a8a4af051955540213fb2623a4e58303d8f192e959",
        ),
        (
            vec![
                "--config".into(),
                dir.path().join("absent.json").into(),
                "--bootstrap".into(),
                c.bootstrap.clone().into(),
            ],
            "absent.json",
        ),
        (
            vec![
                "--config".into(),
                good.clone().into(),
                "--bootstrap".into(),
                good.clone().into(),
            ],
            "not a RAFS bootstrap",
        ),
    ];
    for (mut args, want) in cases {
        args.push("--mountpoint".into());
        args.push(mnt.clone().into());
        let argv: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let (code, out) = run_bounded(&argv, Duration::from_secs(20));
        assert_eq!(code, Some(1), "{args:?} should exit 1:\n{out}");
        assert!(
            out.contains(want),
            "{args:?}: output lacks {want:?}:\n{out}"
        );
        assert!(!out.contains("panicked"), "{args:?} panicked:\n{out}");
        assert!(!daemon::is_mounted(&mnt), "{args:?} left a mount behind");
    }
    // A mountpoint that does not exist.
    let bad_mnt = dir.path().join("no/such/dir");
    let argv: Vec<&std::ffi::OsStr> = vec![
        "--config".as_ref(),
        good.as_os_str(),
        "--bootstrap".as_ref(),
        c.bootstrap.as_os_str(),
        "--mountpoint".as_ref(),
        bad_mnt.as_os_str(),
    ];
    let (code, out) = run_bounded(&argv, Duration::from_secs(20));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("mountpoint"), "{out}");
}

/// Regular non-empty files of an image as (path, RAFS ino, size), in walk order.
fn regular_files(c: &Case) -> Vec<(String, u64, u64)> {
    let image =
        RafsImage::open_local(&c.bootstrap, Some(&c.blobs), ImageOptions::default()).unwrap();
    let mut files = Vec::new();
    image
        .walk(&mut |rel, attr, ev| {
            if ev == rafsd::image::WalkEvent::Node && attr.is_reg() && attr.size > 0 {
                files.push((rel.to_string_lossy().into_owned(), attr.ino, attr.size));
            }
            Ok(())
        })
        .unwrap();
    files
}

fn api_json(sock: &Path, target: &str) -> serde_json::Value {
    let (status, body) =
        daemon::api_request(sock, "GET", target, "", Duration::from_secs(10)).unwrap();
    assert_eq!(status, 200, "GET {target}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {target}: {e}: {body}"))
}

/// `llistxattr(path)` with a buffer of `size` bytes: the names' total length (size 0) or the names.
fn list_xattrs(path: &Path, size: usize) -> std::io::Result<(isize, Vec<u8>)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; size];
    // SAFETY: a valid path and a buffer of `size` bytes.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), size) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    names.truncate(if size == 0 { 0 } else { n as usize });
    Ok((n, names))
}

/// `lgetxattr(path, name)` with a buffer of `size` bytes (none for 0: a size query): the value's length.
fn get_xattr(path: &Path, name: &std::ffi::CStr, size: usize) -> std::io::Result<isize> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut value = vec![0u8; size];
    let buf = if size == 0 {
        std::ptr::null_mut()
    } else {
        value.as_mut_ptr().cast()
    };
    // SAFETY: a valid path and name; `buf` is null or `size` bytes long.
    let n = unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), buf, size) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n)
}

/// Asking for the xattrs of the daemon's own directories (the mount's root above the images mounted
/// through the API) takes no image's xattrs away. fuse-backend-rs's pseudo filesystem answered ENOSYS
/// there, which the kernel takes as "no xattrs on this connection": one `getfattr` of the mount point
/// and every image of a shared daemon (nydus-snapshotter's shared mode) lost its xattrs for good.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn xattrs_of_the_daemons_own_directories_take_no_images_xattrs_away() {
    manifest::assert_root("FUSE mounts");
    let c = case(&manifest::cases()[0]);
    let dir = tempfile::tempdir().unwrap();
    let (d, sock) = start_without_image(dir.path(), &[]);
    let config = v1_config(&c.blobs, &dir.path().join("cache"), false, "");
    api_mount(&sock, "/img", &c.bootstrap, config);
    let file = d.mountpoint.join("img/special/xattrs");
    let (_, before) = list_xattrs(&file, 4096).unwrap();
    assert!(!before.is_empty(), "the fixture's file has xattrs");
    // The daemon's own root: no xattrs, whether asked for their length or their names, and no value.
    assert_eq!(list_xattrs(&d.mountpoint, 0).unwrap().0, 0);
    assert_eq!(list_xattrs(&d.mountpoint, 4096).unwrap(), (0, Vec::new()));
    assert_eq!(
        get_xattr(&d.mountpoint, c"user.x", 64)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENODATA)
    );
    // The image's file keeps its xattrs.
    assert_eq!(list_xattrs(&file, 4096).unwrap().1, before);
    assert!(d.stop().success());
}

/// A remount (`PUT /api/v1/mount`) keeps the mount's index, as nydusd's update in place does: the
/// kernel reaches the mount's root, and keeps the path to it cached (for 2^32 s), by inode numbers
/// whose top byte is the index, and a new index left the cached path leading nowhere (ENOENT).
#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_remounted_image_is_reached_through_the_path_the_kernel_cached() {
    manifest::assert_root("FUSE mounts");
    let dir = tempfile::tempdir().unwrap();
    let (d, sock) = start_without_image(dir.path(), &[]);
    let body = |case: &str| {
        let c = self::case(case);
        let config = v1_config(&c.blobs, &dir.path().join("cache"), false, "");
        serde_json::json!({"source": c.bootstrap, "fs_type": "rafs", "config": config}).to_string()
    };
    let call = |method: &str, target: &str, body: &str| {
        daemon::api_request(&sock, method, target, body, Duration::from_secs(10)).unwrap()
    };
    // Another mount first, so that the counter has moved past the image's index.
    for mp in ["/other", "/img"] {
        let (status, text) = call(
            "POST",
            &format!("/api/v1/mount?mountpoint={mp}"),
            &body("v6-zstd-blake3"),
        );
        assert_eq!(status, 204, "{text}");
    }
    use std::os::unix::fs::MetadataExt;
    let inode = |path: &Path| std::fs::metadata(path).unwrap().ino();
    let root_before = inode(&d.mountpoint.join("img"));
    let adduser = d.mountpoint.join("img/etc/adduser.conf");
    let before = std::fs::read(&adduser).unwrap();
    for round in 0..3 {
        let (status, text) = call(
            "PUT",
            "/api/v1/mount?mountpoint=/img",
            &body("v6-lz4-sha256-64k"),
        );
        assert_eq!(status, 204, "round {round}: {text}");
        assert_eq!(
            inode(&d.mountpoint.join("img")),
            root_before,
            "round {round}"
        );
        assert_eq!(std::fs::read(&adduser).unwrap(), before, "round {round}");
    }
    assert!(
        d.log_text().matches("under a new index").count() == 0,
        "{}",
        d.log_text()
    );
    assert!(d.stop().success());
}

/// Mount indexes are one byte, given in turn: 255 mounts after an image is unmounted, its index names
/// another image. A file of the old image held open, and its path the kernel caches (for 2^32 s), named
/// the new image's file of the same inode number, and read that image's bytes. The kernel's numbers now
/// carry the mount's epoch, and a number of an earlier mount is stale.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_file_of_an_unmounted_image_never_reads_the_image_that_takes_its_index() {
    manifest::assert_root("FUSE mounts");
    let dir = tempfile::tempdir().unwrap();
    let (victim_bytes, other_bytes) = (vec![b'a'; 8192], vec![b'b'; 8192]);
    // The same tree with other bytes: the same inode numbers.
    let built = |name: &str, bytes: &[u8]| {
        let files = vec![("secret".into(), bytes.to_vec())];
        built_case(dir.path(), name, files, &["--compressor", "none"])
    };
    let (victim, other) = (built("victim", &victim_bytes), built("other", &other_bytes));
    let (d, sock) = start_without_image(dir.path(), &[]);
    let config = |c: &Case| v1_config(&c.blobs, &dir.path().join("cache"), false, "");
    let call = |method: &str, target: &str| {
        let (status, text) =
            daemon::api_request(&sock, method, target, "", Duration::from_secs(10)).unwrap();
        assert_eq!(status, 204, "{method} {target}: {text}");
    };
    use std::os::unix::fs::MetadataExt;
    let index_of = |mp: &str| std::fs::metadata(d.mountpoint.join(mp)).unwrap().ino() >> 56;

    api_mount(&sock, "/victim", &victim.bootstrap, config(&victim));
    let secret = d.mountpoint.join("victim/secret");
    let held = std::fs::File::open(&secret).unwrap();
    assert_eq!(std::fs::read(&secret).unwrap(), victim_bytes);
    let victim_index = index_of("victim");
    call("DELETE", "/api/v1/mount?mountpoint=/victim");

    // Other images until one takes the victim's index (a path each: a path used again leads nowhere).
    let mut taker = None;
    for round in 0..300 {
        let mp = format!("/o{round}");
        api_mount(&sock, &mp, &other.bootstrap, config(&other));
        if index_of(&mp[1..]) == victim_index {
            taker = Some(mp);
            break;
        }
        call("DELETE", &format!("/api/v1/mount?mountpoint={mp}"));
    }
    let taker = taker.expect("no mount took the victim's index again");
    eprintln!("{taker} took index {victim_index}");
    let theirs = d.mountpoint.join(&taker[1..]).join("secret");
    // The kernel knew the victim's file by the same number: the new image read its cached pages.
    let read_theirs = || std::fs::read(&theirs).unwrap() == other_bytes;
    assert!(read_theirs(), "the new image reads the victim's bytes");

    // Past the page cache, so that the reads reach the daemon.
    // SAFETY: fadvise on a descriptor we own.
    let rc = unsafe { libc::posix_fadvise(held.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
    let mut buf = vec![0u8; 4096];
    let through_fd = held.read_at(&mut buf, 4096);
    assert!(
        through_fd.is_err(),
        "the held file read {:?}",
        through_fd.map(|n| String::from_utf8_lossy(&buf[..n.min(8)]).into_owned())
    );
    let through_path = std::fs::read(&secret);
    assert!(
        through_path.is_err(),
        "the cached path read {:?}",
        through_path.map(|b| String::from_utf8_lossy(&b[..b.len().min(8)]).into_owned())
    );
    // The image that took the index reads as before.
    assert!(read_theirs(), "the new image reads the victim's bytes");
    drop(held);
    let log = d.log_text();
    assert!(d.stop().success(), "{log}");
}

/// Start a FUSE daemon with an admin socket and no image (mounted later with [`api_mount`]), with
/// `extra` arguments.
fn start_without_image(dir: &Path, extra: &[&str]) -> (Daemon, PathBuf) {
    let sock = dir.join("api.sock");
    let mut args: Vec<std::ffi::OsString> =
        vec!["fuse".into(), "--apisock".into(), sock.clone().into()];
    args.extend(extra.iter().map(Into::into));
    args.extend(daemon::sandbox_allow_args(dir));
    let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
    let d = Daemon::start(&args, &dir.join("mnt"), &dir.join("rafsd.log"));
    (d, sock)
}

/// Mount the image `bootstrap` with `config` at `mountpoint` through the admin API.
fn api_mount(sock: &Path, mountpoint: &str, bootstrap: &Path, config: String) {
    let body =
        serde_json::json!({"source": bootstrap, "fs_type": "rafs", "config": config}).to_string();
    let (status, text) = daemon::api_request(
        sock,
        "POST",
        &format!("/api/v1/mount?mountpoint={mountpoint}"),
        &body,
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(status, 204, "{mountpoint}: {text}");
}

/// Start a FUSE daemon with an admin socket, with `extra` config keys.
fn start_with_api(c: &Case, dir: &Path, extra: &str) -> (Daemon, PathBuf) {
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        v1_config(&c.blobs, &dir.join("cache"), false, extra),
    )
    .unwrap();
    Daemon::start_with_api(&config, &c.bootstrap, dir)
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn per_file_metrics_count_reads_by_rafs_inode_when_enabled() {
    manifest::assert_root("FUSE mounts");
    let c = case(&manifest::cases()[0]);
    let mut files = regular_files(&c);
    assert!(files.len() >= 3, "{}: too few regular files", c.name);
    // The smallest, the largest and one in between: several size buckets.
    files.sort_by_key(|f| f.2);
    let picked = [
        files[0].clone(),
        files[files.len() / 2].clone(),
        files[files.len() - 1].clone(),
    ];

    let dir = tempfile::tempdir().unwrap();
    let (d, sock) = start_with_api(
        &c,
        dir.path(),
        r#","iostats_files":true,"access_pattern":true,"latest_read_files":true"#,
    );
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let fs_stats = api_json(&sock, "/api/v1/metrics?id=/");
    assert_eq!(fs_stats["files_account_enabled"], true);
    assert_eq!(fs_stats["access_pattern_enabled"], true);
    assert_eq!(fs_stats["record_latest_read_files_enabled"], true);
    // Nothing read yet.
    assert_eq!(
        api_json(&sock, "/api/v1/metrics/files?id=/&latest=true"),
        serde_json::json!([])
    );

    let mut inos = Vec::new();
    for (rel, ino, size) in &picked {
        let path = d.mountpoint.join(rel);
        use std::os::unix::fs::MetadataExt;
        // The kernel sees the VFS's numbers: mount index 1 in the top byte, the mount's epoch in the next
        // 16 bits, the image's inode below. The metrics are keyed by the image's own numbers, as nydusd's
        // are.
        let kernel_ino = std::fs::metadata(&path).unwrap().ino();
        assert_eq!(kernel_ino >> 56, 1, "{rel}");
        assert_eq!(kernel_ino & ((1 << 40) - 1), *ino, "{rel}");
        assert_eq!(std::fs::read(&path).unwrap().len() as u64, *size, "{rel}");
        inos.push(*ino);
    }
    inos.sort_unstable();
    inos.dedup();

    let stats = api_json(&sock, "/api/v1/metrics/files?id=/");
    for (rel, ino, size) in &picked {
        let s = &stats[ino.to_string()];
        assert_eq!(s["data_read"], *size, "{rel} (ino {ino}): {s}");
        let reads = s["fop_hits"][4].as_u64().unwrap();
        assert!(reads >= 1, "{rel}: no Read hits: {s}");
        assert_eq!(s["fop_errors"][4], 0, "{rel}: {s}");
        let buckets: u64 = s["block_count_read"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap())
            .sum();
        assert_eq!(buckets, reads, "{rel}: one bucket count per read: {s}");
        assert!(
            s["fop_hits"][2].as_u64().unwrap() >= 1,
            "{rel}: no Open hit: {s}"
        );
        assert!(s["total_fops"].as_u64().unwrap() > reads, "{rel}: {s}");
    }

    // Runs of consecutive inode numbers, as nydusd prints them.
    let mut want: Vec<Vec<u64>> = Vec::new();
    for &ino in &inos {
        match want.last_mut() {
            Some(run) if *run.last().unwrap() + 1 == ino => {
                run.truncate(1);
                run.push(ino);
            }
            _ => want.push(vec![ino]),
        }
    }
    assert_eq!(
        api_json(&sock, "/api/v1/metrics/files?id=/&latest=true"),
        serde_json::json!(want)
    );
    assert_eq!(
        api_json(&sock, "/api/v1/metrics/files?id=/&latest=true"),
        serde_json::json!([]),
        "reading the latest set clears it"
    );

    let pattern = api_json(&sock, "/api/v1/metrics/pattern?id=/");
    let listed: Vec<u64> = pattern
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["ino"].as_u64().unwrap())
        .collect();
    assert_eq!(listed, inos, "only the files read: {pattern}");
    let now = before + 60;
    for p in pattern.as_array().unwrap() {
        assert!(p["nr_read"].as_u64().unwrap() >= 1, "{p}");
        let secs = p["first_access_time_secs"].as_u64().unwrap();
        assert!((before..now).contains(&secs), "{p}");
        assert!(
            p["first_access_time_nanos"].as_u64().unwrap() < 1_000_000_000,
            "{p}"
        );
    }
    assert!(d.stop().success());

    // With the options off the endpoints show nothing, even after reads.
    let dir = tempfile::tempdir().unwrap();
    let (d, sock) = start_with_api(&c, dir.path(), "");
    let (rel, _, size) = &picked[2];
    assert_eq!(
        std::fs::read(d.mountpoint.join(rel)).unwrap().len() as u64,
        *size
    );
    let fs_stats = api_json(&sock, "/api/v1/metrics?id=/");
    assert_eq!(fs_stats["files_account_enabled"], false);
    assert_eq!(
        fs_stats["data_read"], *size,
        "the filesystem totals still count"
    );
    assert_eq!(
        api_json(&sock, "/api/v1/metrics/files?id=/"),
        serde_json::json!({})
    );
    assert_eq!(
        api_json(&sock, "/api/v1/metrics/files?id=/&latest=true"),
        serde_json::json!([])
    );
    assert_eq!(
        api_json(&sock, "/api/v1/metrics/pattern?id=/"),
        serde_json::json!([])
    );
    assert!(d.stop().success());
}

/// Every entry `readdir(3)` returns for `dir`, as (name, d_ino), in order.
fn raw_readdir(dir: &Path) -> Vec<(String, u64)> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; the stream is closed below and entries are copied out first.
    let stream = unsafe { libc::opendir(path.as_ptr()) };
    assert!(!stream.is_null(), "opendir {}", dir.display());
    let mut entries = Vec::new();
    loop {
        // SAFETY: `stream` is open; the returned entry stays valid until the next readdir call.
        let e = unsafe { libc::readdir(stream) };
        if e.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated within the entry.
        let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
        entries.push((name.to_string_lossy().into_owned(), unsafe { (*e).d_ino }));
    }
    // SAFETY: opened above, closed once.
    unsafe { libc::closedir(stream) };
    entries
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn readdir_lists_dot_and_dot_dot_first_with_their_inodes() {
    use std::os::unix::fs::MetadataExt;
    manifest::assert_root("FUSE mounts");
    for name in ["v5-zstd-sha256-128k", "v6-zstd-blake3"] {
        let c = case(name);
        let dir = tempfile::tempdir().unwrap();
        let d = start(&c, dir.path(), false, "");
        let m = &d.mountpoint;
        // A directory two levels down, so that its ".." is neither the mount root nor itself.
        // (`walk` lists files: take the second-level ancestor of a deeper file.)
        let nested = walk(m)
            .into_iter()
            .find(|p| p.strip_prefix(m).unwrap().components().count() >= 3)
            .map(|p| {
                let rel: PathBuf = p.strip_prefix(m).unwrap().components().take(2).collect();
                m.join(rel)
            })
            .expect("a directory two levels down");
        let parent = nested.parent().unwrap();
        for (dir, up) in [(nested.as_path(), parent), (m.as_path(), m.as_path())] {
            let entries = raw_readdir(dir);
            assert!(entries.len() >= 2, "{name}: {}: {entries:?}", dir.display());
            assert_eq!(
                entries[0],
                (".".into(), std::fs::metadata(dir).unwrap().ino()),
                "{name}"
            );
            assert_eq!(entries[1].0, "..", "{name}");
            if dir != m {
                assert_eq!(entries[1].1, std::fs::metadata(up).unwrap().ino(), "{name}");
            }
            // The rest is exactly what std's read_dir (which hides the dots) lists, in image order.
            let rest: Vec<String> = entries[2..].iter().map(|e| e.0.clone()).collect();
            let mut listed: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            let mut sorted = rest.clone();
            sorted.sort();
            listed.sort();
            assert_eq!(sorted, listed, "{name}: {}", dir.display());
            assert!(
                !rest.iter().any(|n| n == "." || n == ".."),
                "{name}: dots listed twice"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Requests complete out of order: reads waiting on the network hold back nobody.

/// `rafsd fuse` with the default worker count, serving `v6-lz4-sha256-64k` (64 KiB chunks) from a
/// registry the test controls (the fault server of `kit::services`). While eight O_DIRECT reads of
/// uncached chunks wait on the backend (more than a streaming reader's 4 MiB readahead keeps in flight,
/// and more than the 4 workers the daemon had before), a GETATTR, a LOOKUP and a cached read are
/// answered; then the eight reads finish with the right bytes.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn reads_stalled_on_the_backend_hold_back_no_other_fuse_request() {
    // 16 workers, 12 of them for cold reads: all eight reach the backend.
    stalled_reads_hold_back_nothing(&[], 8);
}

/// The same with 4 workers and the eight cold reads held: only 3 of them take a worker (a slow or hostile
/// registry may not take every worker, so a quarter is kept for everything else); the other 5 wait in
/// the daemon's queue without a worker, and are answered once reads before them finish. Before the
/// queue, all 4 workers waited on the backend and the GETATTR, LOOKUP and cached read waited for them.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn more_cold_reads_than_workers_leave_a_worker_for_everything_else() {
    stalled_reads_hold_back_nothing(&["--thread-num", "4"], 3);
}

/// Two images in one daemon (nydus-snapshotter's shared mode), 4 workers (3 cold slots): eight cold reads
/// of one image wait at its registry, which answers each request after 4 s (slow, not failing: a
/// failure would be remembered, and the image's next reads would fail at once, see `tests/backends.rs`),
/// and hold all 3 slots; then eight cold reads of the other image, from its own backend, come. When the
/// slow image's first reads end, a freed slot goes to the other image, which runs none, rather than to
/// the slow image's older requests, and the slow image keeps to its share (2) while the other image has
/// reads: the other image's reads are all answered before the slow image's next round of requests
/// ends, so at most 6 of the slow image's requests have reached its registry by then. Served first
/// come, first served, the other image's reads waited behind all 8.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn an_image_whose_registry_stalls_leaves_cold_slots_to_the_other_images() {
    let t = SlowAndOther::start(60);
    let (d, server) = (&t.daemon, &t.server);
    let (held, readers) = t.hold_slow_reads();
    // All 8 are in flight for the admin API, the 5 waiting for a slot too (their callers wait as well:
    // nydus-snapshotter's hung-I/O metric reads this).
    let (status, body) = daemon::api_request(
        &t.sock,
        "GET",
        "/api/v1/metrics/inflight",
        "",
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let ops: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let reads = ops.iter().filter(|o| o["opcode"] == 15).count();
    assert_eq!(reads, 8, "READs listed in flight: {body}");

    // The other image's file, never read: every chunk comes from its backend.
    let other = &t.other;
    let (other_readers, other_done) = held_reads(other);
    for _ in 0..8 {
        while_held(
            &other_done,
            d,
            "the other image's cold reads were not answered while the slow image's reads wait",
        );
    }
    let reached = server.held_in_all();
    assert!(
        reached <= 6,
        "{reached} of the slow image's requests reached its registry before the other image's reads \
         were answered: they waited behind the slow image's queue\nlog:\n{}",
        d.log_text()
    );
    check_held_reads(other_readers, other);
    drop(held);
    t.end(readers);
}

/// An image read one request at a time (a program reading its files in turn) beside one whose registry
/// answers each request after 4 s, in a daemon with 4 workers (3 cold slots): eight cold reads of the
/// slow image hold all 3 slots, so the other image's first cold read waits until one of them ends. Its
/// next reads, each sent when the one before is answered, then find a slot at once: the slow image
/// stays at its share (2) for a while after another image's cold read ended, rather than taking the
/// freed slot back the moment the reader between two reads has none running. Without that, each waited
/// for the slow image's next round of answers, 4 s apart.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn an_image_read_one_request_at_a_time_keeps_a_cold_slot_beside_a_stalled_one() {
    let t = SlowAndOther::start(60);
    let (held, readers) = t.hold_slow_reads();
    let file = open_direct(&t.other);
    // Each read on a thread of its own, so that a read that never ends fails the test rather than
    // hanging it.
    let read_at = |off: u64| {
        let f = file.try_clone().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut buf, skew) = aligned(64 << 10);
            let got = f.read_at(&mut buf[skew..skew + (64 << 10)], off);
            let _ = tx.send(got.map(|n| buf[skew..skew + n].to_vec()));
        });
        while_held(&rx, &t.daemon, "a read of the other image was not answered")
            .unwrap_or_else(|e| panic!("read at {off}: {e}"))
    };
    let mut got = vec![(0, read_at(0))];
    let start = Instant::now();
    for i in 1..6u64 {
        let off = i * (320 << 10);
        got.push((off, read_at(off)));
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the other image's 5 reads after its first took {took:?}: each waited for a slot the slow \
         image took back\nlog:\n{}",
        t.daemon.log_text()
    );
    let whole = std::fs::read(&t.other).unwrap();
    for (off, bytes) in got {
        assert_eq!(bytes.len(), 64 << 10, "read at {off}");
        assert!(
            bytes == whole[off as usize..off as usize + bytes.len()],
            "read at {off}"
        );
    }
    drop(held);
    t.end(readers);
}

/// An image whose registry stops answering (hostile, or down): after one of its data requests found no
/// answer (the backend's 2 s timeout), its next reads fail at once without asking the registry, for
/// `FAILED_LOAD_RETRY_AFTER`; then one request tries again while the others wait for it (at most a
/// second) and fail with it; once the registry answers again, so does the image, readers waiting for
/// the request that tries first included. Before, every read waited for its own request's timeout, 3
/// at a time in the cold slots (eight reads: about 6 s, and 8 requests at the registry).
#[test]
#[ignore = "needs root: ci/test.sh"]
fn reads_of_a_blob_that_stopped_answering_fail_at_once_and_one_request_tries_again() {
    let t = SlowAndOther::start(2);
    let held = std::cell::RefCell::new(None);
    reads_of_a_silent_registry_fail_at_once(
        &t,
        |silent| *held.borrow_mut() = silent.then(|| t.server.hold_data()),
        || t.server.held_in_all(),
    );
    assert!(t.daemon.stop().success());
}

/// The same for a registry that sends the head of each answer and then nothing: that is no answer
/// either. Before, it counted as an answer: it was not remembered, each read waited for its own
/// request's timeout, and a streamed request's reader asked again for its chunk alone.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn reads_of_a_blob_whose_answers_stall_after_their_head_fail_at_once_too() {
    let t = SlowAndOther::start(2);
    let before = t.server.counters.data_requests.load(Ordering::Relaxed);
    reads_of_a_silent_registry_fail_at_once(
        &t,
        |silent| {
            let stall = services::Fault::Stall(Duration::from_secs(20));
            t.server.set_always(silent.then_some(stall));
        },
        || (t.server.counters.data_requests.load(Ordering::Relaxed) - before) as usize,
    );
    assert!(t.daemon.stop().success());
}

/// The slow image's registry falls silent (`silent(true)`, `asked` counting its data requests since):
/// its first read fails at its timeout; the next reads fail at once without asking; after the pause one
/// request asks again; once it answers again (`silent(false)`), the file reads back right.
fn reads_of_a_silent_registry_fail_at_once(
    t: &SlowAndOther,
    silent: impl Fn(bool),
    asked: impl Fn() -> usize,
) {
    use rafsd::image::FAILED_LOAD_RETRY_AFTER;
    silent(true);
    let read_at = |off: u64| {
        let f = open_direct(&t.slow);
        let (mut buf, skew) = aligned(64 << 10);
        f.read_at(&mut buf[skew..skew + (64 << 10)], off)
    };
    // Eight reads at once; how long each took, in the order they ended.
    let eight_reads = || {
        let start = Instant::now();
        let (readers, done) = held_reads(&t.slow);
        let mut took = Vec::new();
        for _ in 0..8 {
            while_held(&done, &t.daemon, "a read of /slow was not answered");
            took.push(start.elapsed());
        }
        for h in readers {
            let (off, got) = h.join().unwrap();
            let e = got.expect_err("the registry answers nothing");
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "read at {off}");
        }
        took
    };
    let start = Instant::now();
    let e = read_at(0).expect_err("the registry answers nothing");
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(asked(), 1, "the first read's requests");

    let took = eight_reads();
    assert!(
        took[7] < Duration::from_secs(1),
        "eight reads after the failure took {took:?}: they asked the registry again\nlog:\n{}",
        t.daemon.log_text()
    );
    assert_eq!(asked(), 1, "reads after the failure asked the registry");

    // After the pause: one request goes (and fails at its timeout); the other seven wait for it, at most
    // a second each, and fail with it. Asking the registry each (before) took three rounds of timeouts.
    std::thread::sleep(FAILED_LOAD_RETRY_AFTER + Duration::from_millis(200));
    let took = eight_reads();
    assert_eq!(
        asked(),
        2,
        "after the pause more than one request tried the registry again; reads took {took:?}"
    );
    assert!(
        took[7] < Duration::from_secs(5),
        "after the pause: {took:?}\nlog:\n{}",
        t.daemon.log_text()
    );

    // The registry answers again: after the pause, so does the image, with the right bytes.
    silent(false);
    std::thread::sleep(FAILED_LOAD_RETRY_AFTER + Duration::from_millis(200));
    assert_eq!(
        manifest::sha256_file(&t.slow)
            .unwrap_or_else(|e| panic!("{e}\nlog:\n{}", t.daemon.log_text())),
        stalled_file_sha256()
    );
}

/// Prefetch of an image whose registry stops answering once the plan is made (it closes every
/// connection without a word): the first runs fail and the blob's failure is remembered; the runs then
/// wait until the blob may be asked again, rather than each failing at once and being dropped, so once
/// the registry answers the whole blob comes into the cache. Without the wait, the plan was thrown away
/// in milliseconds.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn prefetch_waits_for_a_registry_that_stopped_answering_and_completes() {
    manifest::assert_root("FUSE mounts");
    let server = services::FakeServer::with_blobs_of(
        "rafsd/prefetch",
        &manifest::case_blob_dir(STALLED_CASE),
    );
    // The chunk-info array (the plan's first request) comes; no data request after it is answered.
    server.set_always(Some(services::Fault::Reset));
    server.queue(&[services::Fault::Slow(Duration::ZERO)]);
    let dir = tempfile::tempdir().unwrap();
    let (daemon, sock) = start_without_image(dir.path(), &[]);
    let cache = dir.path().join("cache");
    let mut config: serde_json::Value =
        serde_json::from_str(&held_registry_config(&server, "rafsd/prefetch", &cache, 2)).unwrap();
    config["fs_prefetch"] = serde_json::json!({
        "enable": true, "threads_count": 2, "merging_size": 131072, "prefetch_all": true
    });
    api_mount(
        &sock,
        "/img",
        &manifest::case_bootstrap(STALLED_CASE),
        config.to_string(),
    );
    // The first runs fail; a moment later the registry answers again.
    let asked = Instant::now() + Duration::from_secs(10);
    while server.counters.data_requests.load(Ordering::Relaxed) < 2 {
        assert!(
            Instant::now() < asked,
            "prefetch asked nothing\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    server.set_always(None);
    let image = RafsImage::open_local(
        &manifest::case_bootstrap(STALLED_CASE),
        Some(&manifest::case_blob_dir(STALLED_CASE)),
        ImageOptions::default(),
    )
    .unwrap();
    let chunks: u32 = image.info().blobs.iter().map(|b| b.chunk_count).sum();
    wait_cached(
        &cache,
        chunks,
        60,
        &daemon,
        "prefetch once the registry answered again",
    );
    assert!(daemon.stop().success());
}

/// Prefetch of a two-layer image whose lower layer's blob stops answering: the upper layer's runs, planned
/// after the lower one's, come into the cache at once, not after the lower blob's runs each waited for
/// it to be asked again; once the lower blob answers, its runs complete too. Before, both workers took
/// the lower blob's runs one after another and waited 5 s for each: the upper layer waited 30 s or so.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn prefetch_of_a_blob_that_stopped_answering_holds_back_no_other_blob() {
    manifest::assert_root("FUSE mounts");
    let dir = tempfile::tempdir().unwrap();
    // Four files of 256 KiB in 64 KiB chunks per layer, in a v5 image (no chunk-info array to load).
    let files = |layer: &str, seed: u64| {
        (0..4)
            .map(|i| (format!("{layer}{i}"), pseudo_random(256 << 10, seed + i)))
            .collect::<Vec<_>>()
    };
    let args = ["--fs-version", "5", "--chunk-size", "0x10000"];
    let lower = kit::built::build_tree(dir.path(), "lower", files("a", 10), None, &args);
    let upper = kit::built::build_tree(dir.path(), "upper", files("b", 20), Some(&lower), &args);
    let server = services::FakeServer::start(services::FakeOptions::plain("rafsd/layers"));
    for id in [&lower.blob_id, &upper.blob_id] {
        let blob = std::fs::read(lower.blob_dir.join(id)).unwrap();
        assert_eq!(&server.add_blob(blob), id);
    }
    server.set_blob_fault(&lower.blob_id, Some(services::Fault::Reset));
    let (daemon, sock) = start_without_image(dir.path(), &[]);
    let cache = dir.path().join("cache");
    let mut config: serde_json::Value =
        serde_json::from_str(&held_registry_config(&server, "rafsd/layers", &cache, 2)).unwrap();
    config["fs_prefetch"] = serde_json::json!({
        "enable": true, "threads_count": 2, "merging_size": 65536, "prefetch_all": true
    });
    let mounted = Instant::now();
    api_mount(&sock, "/img", &upper.bootstrap, config.to_string());
    // Chunks ready in the cache, of the blob `id`.
    let ready = |id: &str| blob_ready_bits(&cache, id).0;
    // Within the 5 s the lower blob waits to be asked again: its runs would have held both workers.
    while ready(&upper.blob_id) < 16 {
        assert!(
            mounted.elapsed() < Duration::from_secs(4),
            "{} of the upper layer's 16 chunks cached in 4 s while the lower blob failed\n{}",
            ready(&upper.blob_id),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ready(&lower.blob_id), 0, "the lower blob answered nothing");
    assert!(server.counters.data_requests.load(Ordering::Relaxed) >= 1);
    server.set_blob_fault(&lower.blob_id, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready(&lower.blob_id) < 16 {
        assert!(
            Instant::now() < deadline,
            "{} of the lower layer's 16 chunks cached once it answered again\n{}",
            ready(&lower.blob_id),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (name, content) in lower.files.iter().chain(&upper.files) {
        let got = std::fs::read(daemon.mountpoint.join("img").join(name)).unwrap();
        assert!(&got == content, "{name}");
    }
    assert!(daemon.stop().success());
}

/// Unmounting an image whose prefetch waits on its registry (slow, or hostile) does not hold the mount
/// API: another tenant's mount goes through at once. Before, the unmount waited, holding the API's mount
/// lock, for the prefetch workers to end, each at most after its request's timeout (30 s here; a run of
/// `merging_size` bytes drip-fed at the least pace the stream allows takes far longer).
#[test]
#[ignore = "needs root: ci/test.sh"]
fn unmounting_an_image_whose_prefetch_waits_holds_back_no_other_mount() {
    manifest::assert_root("FUSE mounts");
    let server = services::FakeServer::with_blobs_of(
        "rafsd/prefetch",
        &manifest::case_blob_dir(STALLED_CASE),
    );
    let dir = tempfile::tempdir().unwrap();
    let (daemon, sock) = start_without_image(dir.path(), &[]);
    let mut config: serde_json::Value = serde_json::from_str(&held_registry_config(
        &server,
        "rafsd/prefetch",
        &dir.path().join("cache"),
        30,
    ))
    .unwrap();
    config["fs_prefetch"] = serde_json::json!({
        "enable": true, "threads_count": 2, "prefetch_all": true
    });
    // The chunk-info array comes; the data requests after it are held.
    server.queue(&[services::Fault::Slow(Duration::ZERO)]);
    let held = server.hold_data();
    api_mount(
        &sock,
        "/held",
        &manifest::case_bootstrap(STALLED_CASE),
        config.to_string(),
    );
    assert!(
        server.wait_held(1, Duration::from_secs(10)),
        "prefetch asked nothing\n{}",
        daemon.log_text()
    );
    let umount = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            daemon::api_request(
                &sock,
                "DELETE",
                "/api/v1/mount?mountpoint=/held",
                "",
                Duration::from_secs(60),
            )
        })
    };
    // Time for the unmount to reach the daemon first (it holds the mount lock while it works); with
    // the prefetch request let go, the mount below would prove nothing.
    std::thread::sleep(Duration::from_millis(500));
    assert!(server.held() >= 1, "the prefetch request was let go");
    let start = Instant::now();
    let other = v1_config(
        &manifest::case_blob_dir(STALLED_CASE),
        &dir.path().join("other-cache"),
        true,
        "",
    );
    api_mount(
        &sock,
        "/other",
        &manifest::case_bootstrap(STALLED_CASE),
        other,
    );
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "another image's mount took {took:?} while an unmount waited for its prefetch\n{}",
        daemon.log_text()
    );
    let (status, text) = umount.join().unwrap().unwrap();
    assert_eq!(status, 204, "{text}");
    assert!(server.held() >= 1, "the prefetch request was let go");
    drop(held);
    assert_eq!(
        manifest::sha256_file(&daemon.mountpoint.join("other").join(STALLED_FILE)).unwrap(),
        stalled_file_sha256()
    );
    assert!(daemon.stop().success());
}

/// A daemon with 4 workers (3 cold slots, 2 per image while another has cold reads) serving
/// [`STALLED_CASE`] twice: at `/slow` from `server`'s registry (whose data a test holds; not retried),
/// its chunk-info array already cached, and at `/other` from the blob dir, nothing of it read yet.
struct SlowAndOther {
    daemon: Daemon,
    sock: PathBuf,
    server: services::FakeServer,
    /// [`STALLED_FILE`] in either image.
    slow: PathBuf,
    other: PathBuf,
    _dir: tempfile::TempDir,
}

impl SlowAndOther {
    /// The two images, /slow's backend giving each request up after `timeout` seconds.
    fn start(timeout: u64) -> Self {
        manifest::assert_root("FUSE mounts");
        let server = services::FakeServer::with_blobs_of(
            "rafsd/stalled",
            &manifest::case_blob_dir(STALLED_CASE),
        );
        let dir = tempfile::tempdir().unwrap();
        let (daemon, sock) = start_without_image(dir.path(), &["--thread-num", "4"]);
        let bootstrap = manifest::case_bootstrap(STALLED_CASE);
        let cache = dir.path().join("slow-cache");
        let config = held_registry_config(&server, "rafsd/stalled", &cache, timeout);
        api_mount(&sock, "/slow", &bootstrap, config);
        let other_config = v1_config(
            &manifest::case_blob_dir(STALLED_CASE),
            &dir.path().join("other-cache"),
            true,
            r#","amplify_io":0"#,
        );
        api_mount(&sock, "/other", &bootstrap, other_config);
        // The slow image's chunk-info array comes into its cache first, so that only data waits.
        std::fs::read(daemon.mountpoint.join("slow/etc/passwd")).unwrap();
        SlowAndOther {
            slow: daemon.mountpoint.join("slow").join(STALLED_FILE),
            other: daemon.mountpoint.join("other").join(STALLED_FILE),
            daemon,
            sock,
            server,
            _dir: dir,
        }
    }

    /// Eight cold reads of the slow image's file, each answered [`SLOW_ANSWER`] after it reached its
    /// registry (see [`held_reads`]), once the first three reached it: they hold every cold slot, the
    /// other five wait for one.
    fn hold_slow_reads(&self) -> (services::HeldData<'_>, Vec<HeldRead>) {
        let held = self.server.hold_data_for(SLOW_ANSWER);
        let (readers, _) = held_reads(&self.slow);
        assert!(
            self.server.wait_held(3, Duration::from_secs(10)),
            "{} of the slow image's reads reached its registry, 3 expected\nlog:\n{}",
            self.server.held(),
            self.daemon.log_text()
        );
        (held, readers)
    }

    /// The slow image's held `readers` end with the right bytes, and the daemon stops cleanly.
    fn end(self, readers: Vec<HeldRead>) {
        let whole = std::fs::read(&self.slow).unwrap();
        for h in readers {
            let (off, got) = h.join().unwrap();
            let got = got.unwrap_or_else(|e| panic!("read at {off}: {e}"));
            assert!(
                got == whole[off as usize..off as usize + got.len()],
                "read at {off}"
            );
        }
        assert!(self.daemon.stop().success());
    }
}

/// How long the slow image's registry takes to answer each request in the two-image tests.
const SLOW_ANSWER: Duration = Duration::from_secs(4);

/// The image whose reads are held at the registry (64 KiB chunks), and the file they read.
const STALLED_CASE: &str = "v6-lz4-sha256-64k";
const STALLED_FILE: &str = "special/random-2m5";

fn stalled_file_sha256() -> String {
    manifest::load_manifest()
        .into_iter()
        .find(|r| r["path"] == STALLED_FILE)
        .unwrap()["sha256"]
        .clone()
}

/// A config reading [`STALLED_CASE`]'s blob from `server`'s registry `repo` (whose data the test holds),
/// each request given up after `timeout` seconds, not retried.
fn held_registry_config(
    server: &services::FakeServer,
    repo: &str,
    cache: &Path,
    timeout: u64,
) -> String {
    serde_json::json!({
        "device": {
            "backend": {"type": "registry", "config": {
                "scheme": "http", "host": format!("127.0.0.1:{}", server.port),
                "repo": repo, "timeout": timeout, "retry_limit": 0
            }},
            "cache": {"type": "blobcache", "config": {"work_dir": cache}}
        },
        "mode": "direct", "digest_validate": true, "amplify_io": 0
    })
    .to_string()
}

/// `path` opened for reading with O_DIRECT: each read is one FUSE READ, with no kernel readahead.
fn open_direct(path: impl AsRef<Path>) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap()
}

/// A 4 KiB-aligned slice of `len` bytes in a buffer of its own (O_DIRECT wants aligned buffers).
fn aligned(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + 4096];
    let skew = v.as_ptr().align_offset(4096);
    (v, skew)
}

/// Eight O_DIRECT reads of 64 KiB of `file`, 320 KiB apart (each in chunks of its own), each on a thread
/// of its own: their handles, and a receiver that gets a message as each read finishes. The files are
/// opened first: an OPEN waiting for a worker would block this thread, not the test.
type HeldRead = std::thread::JoinHandle<(u64, std::io::Result<Vec<u8>>)>;
fn held_reads(file: &Path) -> (Vec<HeldRead>, std::sync::mpsc::Receiver<()>) {
    let files: Vec<_> = (0..8).map(|_| open_direct(file)).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let readers = files
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let tx = tx.clone();
            let off = i as u64 * (320 << 10);
            std::thread::spawn(move || {
                let (mut buf, skew) = aligned(64 << 10);
                let n = f.read_at(&mut buf[skew..skew + (64 << 10)], off);
                let _ = tx.send(());
                (off, n.map(|n| buf[skew..skew + n].to_vec()))
            })
        })
        .collect();
    (readers, rx)
}

/// What `rx` receives while reads are held, or a failure saying `what`. The held reads stay held until
/// the test releases them (the gate and the backend's timeout allow 60 s), so the wait can be long enough
/// for a loaded machine: what matters is that the answer comes while they are held (each test checks
/// that after it).
fn while_held<T>(rx: &std::sync::mpsc::Receiver<T>, d: &Daemon, what: &str) -> T {
    rx.recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("{what}\nlog:\n{}", d.log_text()))
}

/// The held reads, released, got the right bytes; so does a whole read of `file`.
fn check_held_reads(readers: Vec<HeldRead>, file: &Path) {
    let whole = std::fs::read(file).unwrap();
    assert_eq!(manifest::sha256_file(file).unwrap(), stalled_file_sha256());
    for h in readers {
        let (off, got) = h.join().unwrap();
        let got = got.unwrap();
        assert_eq!(got.len(), 64 << 10);
        assert!(
            got == whole[off as usize..off as usize + got.len()],
            "read at {off}"
        );
    }
}

/// Eight O_DIRECT reads of uncached chunks held at the registry (`at_backend` of them reach it), then a
/// GETATTR, a LOOKUP and a cached read must be answered; then the eight finish with the right bytes.
fn stalled_reads_hold_back_nothing(daemon_args: &[&str], at_backend: usize) {
    use std::sync::mpsc;
    manifest::assert_root("FUSE mounts");
    let server =
        services::FakeServer::with_blobs_of("rafsd/queues", &manifest::case_blob_dir(STALLED_CASE));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        held_registry_config(&server, "rafsd/queues", &dir.path().join("cache"), 60),
    )
    .unwrap();
    let bootstrap = manifest::case_bootstrap(STALLED_CASE);
    let mut args = vec![
        "--config",
        config.to_str().unwrap(),
        "--bootstrap",
        bootstrap.to_str().unwrap(),
    ];
    args.extend_from_slice(daemon_args);
    let d = Daemon::start(
        &args,
        &dir.path().join("mnt"),
        &dir.path().join("rafsd.log"),
    );
    let root = d.mountpoint.clone();
    // Warm up: a small file's chunks (and the blob's chunk-info array) come into the cache.
    let passwd = std::fs::read(root.join("etc/passwd")).unwrap();
    let pf = open_direct(root.join("etc/passwd"));
    let held = server.hold_data();
    let (readers, finished) = held_reads(&root.join(STALLED_FILE));
    assert!(
        server.wait_held(at_backend, Duration::from_secs(10)),
        "{} of the {at_backend} reads expected reached the backend: the other requests wait for a free \
         FUSE worker\nlog:\n{}",
        server.held(),
        d.log_text()
    );

    // GETATTR (statx forced to the daemon), LOOKUP of a name the kernel has not seen, a cached read.
    let (done_tx, done_rx) = mpsc::channel();
    let r = root.clone();
    let fast = std::thread::spawn(move || {
        let path =
            std::ffi::CString::new(r.join(STALLED_FILE).to_str().unwrap().as_bytes().to_vec())
                .unwrap();
        // SAFETY: statx is plain old data; valid path and buffer.
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::statx(
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::AT_STATX_FORCE_SYNC,
                libc::STATX_BASIC_STATS,
                &mut stx,
            )
        };
        assert_eq!(rc, 0);
        assert_eq!(stx.stx_size, 2_621_440);
        let missing = std::fs::metadata(r.join("etc/no-such-file-while-stalled"));
        assert_eq!(missing.unwrap_err().kind(), std::io::ErrorKind::NotFound);
        let (mut v, skew) = aligned(4096);
        let n = pf.read_at(&mut v[skew..skew + 4096], 0).unwrap();
        done_tx.send(v[skew..skew + n].to_vec()).unwrap();
    });
    let head = while_held(
        &done_rx,
        &d,
        "GETATTR/LOOKUP/cached READ not answered while reads wait on the backend",
    );
    fast.join().unwrap();
    assert_eq!(head, passwd[..head.len()]);
    assert!(
        finished.try_recv().is_err(),
        "a stalled read finished early"
    );
    assert_eq!(
        server.held(),
        at_backend,
        "cold reads beyond their share of the workers reached the backend"
    );

    drop(held);
    check_held_reads(readers, &root.join(STALLED_FILE));
    assert!(d.stop().success());
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn an_access_trace_becomes_a_prefetch_list_in_first_read_order() {
    manifest::assert_root("FUSE mounts");
    let c = case(&manifest::cases()[0]);
    let mut files = regular_files(&c);
    files.sort_by_key(|f| f.2);
    // Read the largest file first, then the smallest: the list follows the reads, not the image's order.
    let picked = [files[files.len() - 1].clone(), files[0].clone()];
    let dir = tempfile::tempdir().unwrap();
    let (d, sock) = start_with_api(&c, dir.path(), r#","access_pattern":true"#);
    for (rel, _, size) in &picked {
        assert_eq!(
            std::fs::read(d.mountpoint.join(rel)).unwrap().len() as u64,
            *size
        );
        // First-read times are kept to the nanosecond; keep them apart anyway.
        std::thread::sleep(Duration::from_millis(20));
    }
    let trace = api_json(&sock, "/api/v1/metrics/pattern");
    let backend = api_json(&sock, "/api/v1/metrics/backend");
    assert!(d.stop().success());
    let trace_file = dir.path().join("trace.json");
    std::fs::write(&trace_file, trace.to_string()).unwrap();
    let list_file = dir.path().join("prefetch.list");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rafsd"))
        .arg("prefetch-list")
        .arg(&c.bootstrap)
        .arg(&trace_file)
        .arg("-o")
        .arg(&list_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let list = std::fs::read_to_string(&list_file).unwrap();
    let want: Vec<String> = picked.iter().map(|(rel, _, _)| format!("/{rel}")).collect();
    assert_eq!(list.lines().collect::<Vec<_>>(), want, "trace: {trace}");
    // What the reads needed is reported beside what was fetched.
    let needed = backend["demand_compressed_bytes"].as_u64().unwrap();
    assert!(needed > 0, "{backend}");
    assert!(
        backend["read_amount_total"].as_u64().unwrap() >= needed,
        "{backend}"
    );
}

// ---------------------------------------------------------------------------------------------------
// A tree walk costs one READDIRPLUS per batch of entries and nothing per entry.

/// `find -ls` over a fresh mount of a directory far larger than one READDIRPLUS reply: every batch comes
/// with attributes (the daemon does not offer READDIRPLUS_AUTO, under which the kernel asks for plain
/// READDIR after the first batch and then LOOKUPs every entry it stats), so the daemon sees no READDIR
/// and no LOOKUP but the one on the way to the directory, and the listing matches the tree.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_walk_of_a_large_directory_costs_no_lookup_per_entry() {
    use std::os::unix::fs::MetadataExt;
    manifest::assert_root("FUSE mounts");
    let dir = tempfile::tempdir().unwrap();
    // Long names: 3000 entries are many READDIRPLUS replies whatever buffer the kernel uses.
    let files: Vec<(String, Vec<u8>)> = (0..3000)
        .map(|i| {
            (
                format!("big/{i:04}-{}", "n".repeat(100)),
                vec![i as u8; i % 7],
            )
        })
        .collect();
    let c = built_case(dir.path(), "wide", files.clone(), &[]);
    let (d, sock) = start_with_api(&c, dir.path(), "");
    let big = d.mountpoint.join("big");
    // As find(1) does: read the whole directory, then stat what it lists.
    let names: Vec<String> = std::fs::read_dir(&big)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), files.len());
    for name in &names {
        let meta = std::fs::symlink_metadata(big.join(name)).unwrap();
        let i: usize = name[..4].parse().unwrap();
        assert_eq!(meta.size(), (i % 7) as u64, "{name}");
    }
    let hits = &api_json(&sock, "/api/v1/metrics")["fop_hits"];
    let count = |fop: usize| hits[fop].as_u64().unwrap();
    // Fop order: Getattr, Readlink, Open, Release, Read, Statfs, Getxattr, Listxattr, Opendir, Lookup,
    // Readdir, Readdirplus, ...
    let (lookups, readdirs, readdirpluses) = (count(9), count(10), count(11));
    assert!(
        readdirpluses >= 3,
        "{readdirpluses} READDIRPLUS for 3000 entries: {hits}"
    );
    // The one LOOKUP is that of `big` itself, on the way to it.
    assert_eq!(
        (lookups, readdirs),
        (1, 0),
        "LOOKUPs and READDIRs during the walk: {hits}\nlog:\n{}",
        d.log_text()
    );
    assert!(d.stop().success());
}

// ---------------------------------------------------------------------------------------------------
// Several ranged requests of one blob in flight, within the caps.

/// Background streams (ranged requests) one blob has at most: rafsd's `image::stream::MAX_BLOB_STREAMS`.
const MAX_BLOB_STREAMS: u64 = 4;

/// `rafsd fuse` over `built` served by the fault server `server` (registry backend, blob cache, the
/// default 1 MiB amplification), with `--thread-num threads`.
fn registry_daemon(
    built: &kit::built::Built,
    server: &services::FakeServer,
    repo: &str,
    dir: &Path,
    threads: usize,
) -> Daemon {
    let config = dir.join("config.json");
    let cfg = serde_json::json!({
        "device": {
            "backend": {"type": "registry", "config": {
                "scheme": "http", "host": format!("127.0.0.1:{}", server.port),
                "repo": repo, "timeout": 60
            }},
            "cache": {"type": "blobcache", "config": {"work_dir": dir.join("cache")}}
        },
        "mode": "direct", "amplify_io": 1048576
    });
    std::fs::write(&config, cfg.to_string()).unwrap();
    Daemon::start(
        &[
            "--config",
            config.to_str().unwrap(),
            "--bootstrap",
            built.bootstrap.to_str().unwrap(),
            "--thread-num",
            &threads.to_string(),
        ],
        &dir.join("mnt"),
        &dir.join("rafsd.log"),
    )
}

/// A cold front-to-back read of a 24 MiB file (1 MiB chunks) from a registry paced at 40 MB/s, through a
/// daemon with one FUSE worker: the runs the reader's followers predict go out as several ranged requests
/// of the blob at once (the fault server counts the GETs it is answering at the same time), never more
/// than the blob's stream cap besides the worker's own, over connections kept alive from run to run, and
/// the file reads back right. (One request per run, as before, never had more than one in flight here.)
#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_cold_sequential_read_keeps_several_ranged_requests_of_its_blob_in_flight() {
    manifest::assert_root("FUSE mounts");
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(24 << 20, 7);
    let built = kit::built::build_tree(dir.path(), "big", vec![("big".into(), data)], None, &[]);
    let server = services::FakeServer::with_blobs_of("rafsd/parts", &built.blob_dir);
    server.set_rate(Some(40 << 20));
    let d = registry_daemon(&built, &server, "rafsd/parts", dir.path(), 1);
    let got = std::fs::read(d.mountpoint.join("big")).unwrap();
    assert!(got == built.content(), "the file reads back wrong");
    let c = &server.counters;
    let peak = c.data_in_flight_peak.load(Ordering::SeqCst);
    let requests = c.data_requests.load(Ordering::SeqCst);
    assert!(
        (3..=MAX_BLOB_STREAMS + 1).contains(&peak),
        "{peak} ranged requests in flight at once at most ({requests} in all)\nlog:\n{}",
        d.log_text()
    );
    // Each byte fetched once (the chunk-info array aside): parts do not overlap.
    let fetched = c.bytes.load(Ordering::SeqCst);
    assert!(
        fetched < (24 << 20) + (1 << 20),
        "{fetched} bytes fetched for a 24 MiB file"
    );
    // Connections are kept alive and reused by the next runs' parts: never more than were busy at once.
    let connections = c.connections.load(Ordering::SeqCst);
    assert!(
        connections <= MAX_BLOB_STREAMS + 2 && connections < requests,
        "{connections} connections for {requests} requests"
    );
    assert!(d.stop().success());
}

/// Eight readers stream eight files of one blob at once, cold, from a registry paced at 40 MB/s, through
/// a daemon with 2 FUSE workers: the blob never has more ranged requests in flight than its background
/// streams' cap plus one per worker, and every file reads back right.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn many_readers_of_one_blob_stay_within_its_cap_of_requests_in_flight() {
    manifest::assert_root("FUSE mounts");
    const WORKERS: u64 = 2;
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("f{i}"), pseudo_random(6 << 20, 100 + i)))
        .collect();
    let built = kit::built::build_tree(dir.path(), "many", files.clone(), None, &[]);
    let server = services::FakeServer::with_blobs_of("rafsd/caps", &built.blob_dir);
    server.set_rate(Some(40 << 20));
    let d = registry_daemon(&built, &server, "rafsd/caps", dir.path(), WORKERS as usize);
    let readers: Vec<_> = files
        .iter()
        .map(|(name, _)| {
            let path = d.mountpoint.join(name);
            std::thread::spawn(move || std::fs::read(path).unwrap())
        })
        .collect();
    for (h, (name, want)) in readers.into_iter().zip(&files) {
        assert!(h.join().unwrap() == *want, "{name} reads back wrong");
    }
    let peak = server.counters.data_in_flight_peak.load(Ordering::SeqCst);
    assert!(
        (2..=MAX_BLOB_STREAMS + WORKERS).contains(&peak),
        "{peak} ranged requests of one blob in flight at once\nlog:\n{}",
        d.log_text()
    );
    assert!(d.stop().success());
}

/// Parts that fail (a body cut short, a 500, a reset) during a cold front-to-back read: the chunks a
/// failed part had not stored go back to their readers, which fetch them with the backend's retries, and
/// the file reads back right.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn failed_parts_leave_their_chunks_to_the_readers() {
    use services::Fault;
    manifest::assert_root("FUSE mounts");
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(24 << 20, 11);
    let built = kit::built::build_tree(dir.path(), "big", vec![("big".into(), data)], None, &[]);
    let server = services::FakeServer::with_blobs_of("rafsd/faults", &built.blob_dir);
    server.set_rate(Some(40 << 20));
    // The first runs are small (no parts yet): let them through, then break the next requests.
    let ok = Fault::Slow(Duration::ZERO);
    server.queue(&[
        ok.clone(),
        ok.clone(),
        ok,
        Fault::Truncate,
        Fault::Status(500),
    ]);
    server.queue(&[
        Fault::Truncate,
        Fault::Reset,
        Fault::Truncate,
        Fault::Status(503),
    ]);
    let d = registry_daemon(&built, &server, "rafsd/faults", dir.path(), 1);
    let got = std::fs::read(d.mountpoint.join("big")).unwrap();
    assert!(got == built.content(), "the file reads back wrong");
    assert!(
        server.faults.lock().unwrap().queue.is_empty(),
        "every fault was met"
    );
    assert!(
        server.counters.data_in_flight_peak.load(Ordering::SeqCst) >= 3,
        "parts were in flight"
    );
    assert!(d.stop().success());
}

// ---------------------------------------------------------------------------------------------------
// Read-ahead in the cache file for files read front to back, none for random readers.

/// Pages of `path` in the page cache (mincore of a shared mapping).
fn resident_bytes(path: &Path) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a read-only shared mapping of a file we keep open, unmapped below; mincore fills one
    // byte per page of the vector it is given.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED);
        let mut pages = vec![0u8; len.div_ceil(4096)];
        assert_eq!(libc::mincore(map, len, pages.as_mut_ptr()), 0);
        libc::munmap(map, len);
        pages.iter().filter(|p| *p & 1 != 0).count() as u64 * 4096
    }
}

/// The blob cache's data file under `dir`, written back and dropped from the page cache.
fn evicted_cache_file(dir: &Path) -> PathBuf {
    let data = std::fs::read_dir(dir.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".blob.data"))
        .expect("a cache data file");
    let f = std::fs::File::open(&data).unwrap();
    f.sync_all().unwrap();
    // SAFETY: a plain syscall on a descriptor we own.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert!(
        resident_bytes(&data) < 1 << 20,
        "the cache file left the page cache"
    );
    data
}

/// Read `reads` (offset, length) of `path` with O_DIRECT: one FUSE READ each, no kernel readahead of the
/// FUSE file, so the daemon sees exactly these requests.
fn direct_reads(path: &Path, reads: &[(u64, usize)], expected: &[u8]) {
    let f = open_direct(path);
    // O_DIRECT wants an aligned buffer.
    let layout = std::alloc::Layout::from_size_align(1 << 20, 4096).unwrap();
    // SAFETY: a fresh allocation of that layout, freed below; only its first `len` bytes are used.
    let buf = unsafe { std::slice::from_raw_parts_mut(std::alloc::alloc(layout), 1 << 20) };
    for &(offset, len) in reads {
        f.read_exact_at(&mut buf[..len], offset).unwrap();
        assert!(
            buf[..len] == expected[offset as usize..offset as usize + len],
            "bytes at {offset}"
        );
    }
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(buf.as_mut_ptr(), layout) };
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_file_read_front_to_back_is_read_ahead_in_the_cache_file_and_a_random_reader_is_not() {
    manifest::assert_root("FUSE mounts");
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let big = pseudo_random(48 * MIB, 11);
    let c = built_case(dir.path(), "ra", vec![("big".into(), big.clone())], &[]);
    // Fill the cache.
    let d = start(&c, dir.path(), false, "");
    assert!(std::fs::read(d.mountpoint.join("big")).unwrap() == big);
    assert!(d.stop().success());

    // Front to back in 128 KiB requests, 1 MiB in all: the daemon reads ahead of them.
    let data = evicted_cache_file(dir.path());
    let d = start(&c, dir.path(), false, "");
    let reads: Vec<(u64, usize)> = (0..8).map(|i| (i * (128 << 10), 128 << 10)).collect();
    direct_reads(&d.mountpoint.join("big"), &reads, &big);
    // The daemon reads ahead on a thread of its own after it has answered: wait (bounded) for it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sequential = resident_bytes(&data);
        if sequential >= 8 * MIB as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{sequential} bytes of the cache file loaded 20 s after 1 MiB read front to back: no read-ahead of the daemon's"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.stop().success());

    // The same amount in random places: only what was asked for is loaded.
    let data = evicted_cache_file(dir.path());
    let d = start(&c, dir.path(), false, "");
    let reads: Vec<(u64, usize)> = [37, 5, 201, 90, 333, 150, 12, 260]
        .iter()
        .map(|&i| (i * (128 << 10), 128 << 10))
        .collect();
    direct_reads(&d.mountpoint.join("big"), &reads, &big);
    std::thread::sleep(Duration::from_millis(500));
    let random = resident_bytes(&data);
    assert!(d.stop().success());
    assert!(
        random <= 2 * MIB as u64,
        "{random} bytes of the cache file loaded for 1 MiB read in random places"
    );
}
