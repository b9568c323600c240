//! One image cannot damage another image's blob cache. The cache is shared by every image mounted with the
//! same `work_dir` (with Kata's defaults, every sandbox on the host), and a bootstrap may name any blob id:
//! a hostile image naming a victim's blob id must neither poison the victim's cached chunks nor take its
//! daemon down, whatever the order of the mounts, in one daemon (two API mounts) and in two daemons.
//!
//! Images are made by `rafsd build`; the hostile bootstrap then gets the victim's blob id in its blob table
//! and device slot (`kit::layout`), and its own blob is stored under that name in its own blob directory.
//! Validation is off, as in the default configs of Kata and nydus-snapshotter.

use kit::{built, daemon, frontend, layout, manifest};

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use built::{assert_content, build_one as build, pseudo_random, steal_blob_id, Built};
use daemon::{v1_config, Daemon};
use frontend::{Guest, Options, VirtiofsDaemon, ROOT};

const BIN: &str = env!("CARGO_BIN_EXE_rafsd");

fn filled(byte: u8, len: usize) -> Vec<u8> {
    vec![byte; len]
}

// ---------------------------------------------------------------------------------------------------
// One daemon: two API mounts over one work_dir, read through the virtio-fs device.

struct OneDaemon {
    d: VirtiofsDaemon,
    g: Guest,
    work_dir: PathBuf,
}

impl OneDaemon {
    fn start(dir: &Path) -> OneDaemon {
        let d = VirtiofsDaemon::start(BIN, dir, &["--log-level", "info"]);
        let mut g = Guest::connect(&d.sock, Options::default()).expect("vhost-user handshake");
        g.fuse_init().unwrap();
        OneDaemon {
            d,
            g,
            work_dir: dir.join("cache"),
        }
    }

    fn mount(&self, mountpoint: &str, image: &Built) {
        let config = v1_config(&image.blob_dir, &self.work_dir, false, "");
        self.d
            .mount_rafs(&format!("/{mountpoint}"), &image.bootstrap, &config);
    }

    /// `/<mountpoint>/f`, read whole through FUSE_READ.
    fn read(&mut self, mountpoint: &str) -> Vec<u8> {
        let node = self
            .g
            .lookup_path(ROOT, &format!("{mountpoint}/f"))
            .unwrap()
            .nodeid;
        match self.g.read_file(node, 128 << 10) {
            Ok(data) => data,
            Err(e) => panic!("read /{mountpoint}/f: {e}\nlog:\n{}", self.d.log_text()),
        }
    }

    fn assert_alive(&mut self) {
        assert!(
            self.d.is_running(),
            "the daemon died:\n{}",
            self.d.log_text()
        );
    }
}

/// Victim and hostile image in one daemon, mounted and read in the given order.
fn one_daemon_poisoning(fs_version: &str, hostile_first: bool) {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--fs-version", fs_version];
    let victim = build(dir.path(), "victim", filled(b'a', 1 << 20), &args);
    let mut hostile = build(dir.path(), "hostile", filled(b'b', 1 << 20), &args);
    steal_blob_id(&mut hostile, &victim.blob_id);
    let mut one = OneDaemon::start(dir.path());
    let order: [(&str, &Built); 2] = if hostile_first {
        [("hostile", &hostile), ("victim", &victim)]
    } else {
        [("victim", &victim), ("hostile", &hostile)]
    };
    for (mp, image) in order {
        one.mount(mp, image);
        let got = one.read(mp);
        assert_content(
            &format!("v{fs_version}, {mp} read after the other image"),
            &got,
            image.content(),
        );
    }
    // Both again, now that both have filled the cache.
    for (mp, image) in order {
        let got = one.read(mp);
        assert_content(
            &format!("v{fs_version}, {mp} re-read"),
            &got,
            image.content(),
        );
    }
    one.assert_alive();
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn hostile_image_mounted_first_in_the_same_daemon_cannot_poison_the_victim() {
    for v in ["6", "5"] {
        one_daemon_poisoning(v, true);
    }
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn hostile_image_mounted_second_in_the_same_daemon_reads_its_own_bytes() {
    for v in ["6", "5"] {
        one_daemon_poisoning(v, false);
    }
}

// ---------------------------------------------------------------------------------------------------
// Two daemons (`rafsd fuse`) over one work_dir.

fn fuse_daemon(dir: &Path, name: &str, image: &Built, work_dir: &Path) -> Daemon {
    let config = dir.join(format!("{name}.json"));
    std::fs::write(&config, v1_config(&image.blob_dir, work_dir, false, "")).unwrap();
    Daemon::start(
        &[
            "fuse",
            "--config",
            config.to_str().unwrap(),
            "--bootstrap",
            image.bootstrap.to_str().unwrap(),
        ],
        &dir.join(format!("mnt-{name}")),
        &dir.join(format!("{name}.log")),
    )
}

/// Read `f` of a FUSE mount past the host's page cache (dropped first), so the daemon serves it again.
fn read_fuse(d: &Daemon) -> Vec<u8> {
    let path = d.mountpoint.join("f");
    if let Ok(f) = std::fs::File::open(&path) {
        // SAFETY: a valid descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("read {}: {e}\nlog:\n{}", path.display(), d.log_text()))
}

#[track_caller]
fn assert_running(d: &mut Daemon, what: &str) {
    assert!(d.is_running(), "{what}: the daemon died:\n{}", d.log_text());
}

fn two_daemon_poisoning(hostile_first: bool) {
    let dir = tempfile::tempdir().unwrap();
    let work_dir = dir.path().join("cache");
    let victim = build(dir.path(), "victim", filled(b'a', 1 << 20), &[]);
    let mut hostile = build(dir.path(), "hostile", filled(b'b', 1 << 20), &[]);
    steal_blob_id(&mut hostile, &victim.blob_id);
    let (first, second) = if hostile_first {
        (("hostile", &hostile), ("victim", &victim))
    } else {
        (("victim", &victim), ("hostile", &hostile))
    };
    let mut a = fuse_daemon(dir.path(), first.0, first.1, &work_dir);
    assert_content(first.0, &read_fuse(&a), first.1.content());
    let mut b = fuse_daemon(dir.path(), second.0, second.1, &work_dir);
    assert_content(
        &format!("{} after {}", second.0, first.0),
        &read_fuse(&b),
        second.1.content(),
    );
    assert_content(
        &format!("{} again", first.0),
        &read_fuse(&a),
        first.1.content(),
    );
    assert_running(&mut a, first.0);
    assert_running(&mut b, second.0);
    a.stop();
    b.stop();
    // A fresh daemon of the victim over the cache both left behind.
    let v = fuse_daemon(dir.path(), "victim-again", &victim, &work_dir);
    assert_content("victim after both", &read_fuse(&v), victim.content());
    v.stop();
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn hostile_image_in_a_second_daemon_cannot_poison_the_victim_in_either_order() {
    two_daemon_poisoning(true);
    two_daemon_poisoning(false);
}

// ---------------------------------------------------------------------------------------------------
// A hostile one-chunk image over a large victim: the victim's cache files must never shrink under it.

/// More chunks than one page of ready bits holds (4096 * 8), so the victim's bitmap spans three pages.
const MANY_CHUNKS: usize = 32768 + 512;

fn large_victim_and_tiny_hostile(dir: &Path) -> (Built, Built) {
    let args = ["--chunk-size", "0x1000", "--compressor", "none"];
    let victim = build(dir, "victim", pseudo_random(MANY_CHUNKS * 4096, 7), &args);
    let mut hostile = build(dir, "hostile", filled(b'b', 4096), &args);
    steal_blob_id(&mut hostile, &victim.blob_id);
    (victim, hostile)
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_second_daemon_mounting_a_tiny_image_over_a_large_victims_blob_id_does_not_kill_it() {
    let dir = tempfile::tempdir().unwrap();
    let work_dir = dir.path().join("cache");
    let (victim, hostile) = large_victim_and_tiny_hostile(dir.path());
    let mut a = fuse_daemon(dir.path(), "victim", &victim, &work_dir);
    assert_content("victim, cold", &read_fuse(&a), victim.content());
    let mut b = fuse_daemon(dir.path(), "hostile", &hostile, &work_dir);
    assert_content("hostile", &read_fuse(&b), hostile.content());
    assert_content(
        "victim, after the hostile mount",
        &read_fuse(&a),
        victim.content(),
    );
    assert_running(&mut a, "victim");
    assert_running(&mut b, "hostile");
    a.stop();
    b.stop();
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn the_same_daemon_mounting_a_tiny_image_over_a_large_victims_blob_id_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (victim, hostile) = large_victim_and_tiny_hostile(dir.path());
    let mut one = OneDaemon::start(dir.path());
    one.mount("victim", &victim);
    assert_content("victim, cold", &one.read("victim"), victim.content());
    one.mount("hostile", &hostile);
    assert_content("hostile", &one.read("hostile"), hostile.content());
    one.assert_alive();
    assert_content(
        "victim, after the hostile mount",
        &one.read("victim"),
        victim.content(),
    );
    one.assert_alive();
}

// ---------------------------------------------------------------------------------------------------
// Bootstraps that describe one cache slot two ways are refused when mounted with a cache.

/// The API's answer to mounting `bootstrap` over `blob_dir` with a blob cache.
fn try_mount(
    one: &OneDaemon,
    mountpoint: &str,
    bootstrap: &Path,
    blob_dir: &Path,
) -> (u16, String) {
    let config = v1_config(blob_dir, &one.work_dir, false, "");
    one.d.try_mount(mountpoint, "rafs", bootstrap, &config)
}

#[track_caller]
fn assert_refused(answer: (u16, String), needles: &[&str]) {
    let (status, body) = answer;
    assert_eq!(status, 400, "{body}");
    for n in needles {
        assert!(body.contains(n), "the refusal does not say {n:?}: {body}");
    }
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_v5_blob_table_naming_one_blob_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let v5 = ["--fs-version", "5"];
    let base = built::build_tree(
        dir.path(),
        "base",
        vec![("a".into(), pseudo_random(8192, 1))],
        None,
        &v5,
    );
    let upper = built::build_tree(
        dir.path(),
        "upper",
        vec![("b".into(), pseudo_random(8192, 2))],
        Some(&base),
        &v5,
    );
    let mut boot = std::fs::read(&upper.bootstrap).unwrap();
    // §2.4: `u32 readahead_offset, u32 readahead_size, id`, entries separated by one NUL.
    let (at, first) = layout::v5::first_blob_id(&boot);
    let second = at + first.len() + 1 + 8;
    assert_eq!(&boot[second..second + 64], upper.blob_id.as_bytes());
    boot.copy_within(at..at + 64, second);
    std::fs::write(&upper.bootstrap, boot).unwrap();
    let one = OneDaemon::start(dir.path());
    assert_refused(
        try_mount(&one, "/dup", &upper.bootstrap, &upper.blob_dir),
        &["appears twice in the blob table"],
    );
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn chunk_records_that_contradict_each_other_are_refused_with_a_cache() {
    let case = "v5-lz4-blake3-repeatable";
    let fixture = manifest::fixtures_dir().join(case).canonicalize().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let one = OneDaemon::start(dir.path());
    let pristine = std::fs::read(fixture.join("bootstrap")).unwrap();
    let first = |b: &[u8], path: &str| {
        let rec = layout::v5::find(b, path);
        layout::v5::chunk_record(b, &rec, 0)
    };
    let (a, b) = (
        first(&pristine, "etc/adduser.conf"),
        first(&pristine, "etc/passwd"),
    );
    let cases: [(&str, usize, &str); 2] = [
        // passwd's chunk claims adduser.conf's index, with its own place and digest.
        ("index", layout::v5::C_INDEX, "described twice, differently"),
        // passwd's chunk claims adduser.conf's place in the uncompressed blob.
        (
            "place",
            layout::v5::C_UNCOMPRESSED_OFFSET,
            "overlap in the uncompressed blob",
        ),
    ];
    for (name, field, why) in cases {
        let mut boot = pristine.clone();
        let width = if field == layout::v5::C_INDEX { 4 } else { 8 };
        boot.copy_within(a + field..a + field + width, b + field);
        let bootstrap = dir.path().join(format!("bootstrap-{name}"));
        std::fs::write(&bootstrap, boot).unwrap();
        assert_refused(
            try_mount(
                &one,
                &format!("/{name}"),
                &bootstrap,
                &fixture.join("blobs"),
            ),
            &[why],
        );
    }
}

/// A copy of the victim's v5 bootstrap whose chunk records carry wrong CRC32Cs: same chunks, places and
/// digests, so the same cache key and files as the victim's. Its reads find the victim's cached chunks,
/// whose digest matches; the CRC does not. That used to drop the victim's ready bits on every read; the
/// copy now gets its integrity error and the cache stays, so the victim reads on without its backend.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn an_image_recording_wrong_crcs_for_the_victims_chunks_leaves_its_cache_warm() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--fs-version", "5", "--chunk-size", "0x10000"];
    let victim = build(dir.path(), "victim", pseudo_random(1 << 20, 11), &args);
    let mut boot = std::fs::read(&victim.bootstrap).unwrap();
    let rec = layout::v5::find(&boot, "f");
    assert_eq!(rec.child_count, 16, "one record per 64 KiB chunk");
    for k in 0..rec.child_count as usize {
        let at = layout::v5::chunk_record(&boot, &rec, k);
        let flags = layout::le::u32_at(&boot, at + layout::v5::C_FLAGS);
        layout::le::put_u32(&mut boot, at + layout::v5::C_FLAGS, flags | 0x10);
        let crc = layout::le::u32_at(&boot, at + layout::v5::CHUNK_RECORD - 4);
        layout::le::put_u32(&mut boot, at + layout::v5::CHUNK_RECORD - 4, !crc);
    }
    // Its own backend holds the genuine blob: what it fetches fails the CRC too, and is never stored.
    let hostile_dir = dir.path().join("hostile");
    std::fs::create_dir_all(hostile_dir.join("blobs")).unwrap();
    std::fs::copy(
        victim.blob_dir.join(&victim.blob_id),
        hostile_dir.join("blobs").join(&victim.blob_id),
    )
    .unwrap();
    std::fs::write(hostile_dir.join("bootstrap"), boot).unwrap();
    let hostile = Built {
        bootstrap: hostile_dir.join("bootstrap"),
        blob_dir: hostile_dir.join("blobs"),
        blob_id: victim.blob_id.clone(),
        files: victim.files.clone(),
    };

    let mut one = OneDaemon::start(dir.path());
    one.mount("victim", &victim);
    assert_content("victim, cold", &one.read("victim"), victim.content());
    // With validation on, as a blob view always is: cache hits are checked, not served as they are.
    let validating = v1_config(&hostile.blob_dir, &one.work_dir, true, "");
    one.d
        .mount_rafs("/hostile", &hostile.bootstrap, &validating);
    for _ in 0..2 {
        let node = one.g.lookup_path(ROOT, "hostile/f").unwrap().nodeid;
        let got = one.g.read_file(node, 64 << 10);
        assert_eq!(
            got.err().and_then(|e| e.raw_os_error()),
            Some(libc::EIO),
            "the wrong CRCs must fail the hostile image's reads"
        );
    }
    assert_eq!(
        ready_bits(&one.work_dir),
        16,
        "the victim's chunks stay cached"
    );
    // The victim's backend is gone (emptied: the backend may hold the file open): every chunk must come
    // from the cache.
    std::fs::File::options()
        .write(true)
        .open(victim.blob_dir.join(&victim.blob_id))
        .and_then(|f| f.set_len(0))
        .unwrap();
    assert_content(
        "victim, from its cache alone",
        &one.read("victim"),
        victim.content(),
    );
    one.assert_alive();
}

/// Chunks marked ready in every chunk map under `work_dir` (bits after the 4 KiB header).
fn ready_bits(work_dir: &Path) -> u32 {
    let mut ready = 0;
    for e in std::fs::read_dir(work_dir).unwrap() {
        let p = e.unwrap().path();
        if p.to_string_lossy().ends_with(".chunk_map") {
            let bytes = std::fs::read(&p).unwrap();
            ready += bytes[4096..].iter().map(|b| b.count_ones()).sum::<u32>();
        }
    }
    ready
}
