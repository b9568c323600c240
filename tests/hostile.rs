//! Hostile input: a damaged or forged bootstrap or blob must give a clear error naming what is wrong, never
//! a panic, a hang or an unbounded allocation.
//!
//! Every case copies one reference image (`tests/fixtures/rafs/<case>`, see its README) into a temporary
//! directory and patches bytes at offsets found by parsing the structures with the small readers of
//! `kit::layout` (`le`, `v6`, `v5`), written from the format document independently of the crate's parsers.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rafsd::format::MetaBytes;
use rafsd::storage::localfs::LocalFs;
use rafsd::storage::BlobBackend;
use rafsd::{Error, ImageOptions, RafsImage};

use kit::{layout, manifest};

/// How long one `rafsd` run may take before it counts as a hang.
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

use layout::{le, v5, v6};

// ------------------------------------------------------------------------------------------------------
// Fixture copies and runners.

fn fixtures() -> PathBuf {
    manifest::fixtures_dir()
}

/// A private copy of one reference image: the bootstrap is copied (and patched in `boot`), the blob
/// directory holds symlinks to the read-only fixture blobs until a test replaces one with a patched copy.
struct Img {
    dir: tempfile::TempDir,
    case: &'static str,
    bootstrap: PathBuf,
    blob_dir: PathBuf,
    /// The image's only blob, as named in the fixture's blob directory.
    blob: String,
    boot: Vec<u8>,
}

impl Img {
    fn new(case: &'static str) -> Img {
        Img::with_blob_dir(case, "blobs")
    }

    /// `blob_dir` is relative to the temporary directory (it may be nested).
    fn with_blob_dir(case: &'static str, blob_dir: &str) -> Img {
        let dir = tempfile::tempdir().unwrap();
        let src = fixtures().join(case);
        let boot = fs::read(src.join("bootstrap"))
            .unwrap_or_else(|e| panic!("{case}: read bootstrap: {e}"));
        let bootstrap = dir.path().join("bootstrap");
        fs::write(&bootstrap, &boot).unwrap();
        let blob_dir = dir.path().join(blob_dir);
        fs::create_dir_all(&blob_dir).unwrap();
        let mut ids: Vec<OsString> = fs::read_dir(src.join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(ids.len(), 1, "{case}: one blob");
        let blob = ids.pop().unwrap().into_string().unwrap();
        std::os::unix::fs::symlink(src.join("blobs").join(&blob), blob_dir.join(&blob)).unwrap();
        Img {
            dir,
            case,
            bootstrap,
            blob_dir,
            blob,
            boot,
        }
    }

    fn save(&self) {
        fs::write(&self.bootstrap, &self.boot).unwrap();
    }

    fn truncate(&mut self, len: usize) {
        self.boot.truncate(len);
        self.save();
    }

    fn read_blob(&self) -> Vec<u8> {
        fs::read(self.blob_dir.join(&self.blob)).unwrap()
    }

    /// Replace the blob symlink with a patched private copy.
    fn write_blob(&self, data: &[u8]) {
        let path = self.blob_dir.join(&self.blob);
        fs::remove_file(&path).unwrap();
        fs::write(&path, data).unwrap();
    }

    fn open(&self, validate: bool) -> rafsd::Result<RafsImage> {
        RafsImage::open_local(
            &self.bootstrap,
            Some(&self.blob_dir),
            ImageOptions {
                validate,
                ..Default::default()
            },
        )
    }

    fn opened(&self, validate: bool) -> RafsImage {
        self.open(validate)
            .unwrap_or_else(|e| panic!("{}: open the patched image: {e}", self.case))
    }

    fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Run `rafsd check` on this copy.
    fn run_check(&self) -> Run {
        run_rafsd(
            &[
                OsStr::new("check"),
                self.bootstrap.as_os_str(),
                OsStr::new("-D"),
                self.blob_dir.as_os_str(),
            ],
            self.dir.path(),
        )
    }

    /// Run `rafsd unpack` on this copy into a fresh directory, which is returned with the run.
    fn run_unpack(&self, extra: &[&str]) -> (Run, PathBuf) {
        let out = (0..)
            .map(|n| self.scratch(&format!("unpacked-by-cli-{n}")))
            .find(|p| !p.exists())
            .unwrap();
        let mut args = vec![
            OsStr::new("unpack"),
            self.bootstrap.as_os_str(),
            OsStr::new("-D"),
            self.blob_dir.as_os_str(),
            OsStr::new("-o"),
            out.as_os_str(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        (run_rafsd(&args, self.dir.path()), out)
    }
}

fn pristine(case: &str) -> RafsImage {
    let dir = fixtures().join(case);
    RafsImage::open_local(
        &dir.join("bootstrap"),
        Some(&dir.join("blobs")),
        ImageOptions {
            validate: true,
            ..Default::default()
        },
    )
    .unwrap()
}

/// The whole content of regular file `ino`.
fn file_content(image: &RafsImage, ino: u64) -> rafsd::Result<Vec<u8>> {
    let size = image.inode(ino)?.size as usize;
    let mut data = vec![0u8; size];
    let mut done = 0;
    while done < size {
        let n = image.read(ino, done as u64, &mut data[done..])?;
        assert!(n > 0, "short read at {done} of {size}");
        done += n;
    }
    Ok(data)
}

fn walk(image: &RafsImage) -> rafsd::Result<()> {
    image.walk(&mut |_, _, _| Ok(()))
}

/// The error of `r`, which must be `Error::Corrupt` whose message contains every needle.
#[track_caller]
fn expect_corrupt<T>(r: rafsd::Result<T>, needles: &[&str]) -> String {
    expect_error(
        r,
        "a corrupt-image error",
        |e| matches!(e, Error::Corrupt(_)),
        needles,
    )
}

/// The error of `r`, which must be `Error::Integrity` whose message contains every needle.
#[track_caller]
fn expect_integrity<T>(r: rafsd::Result<T>, needles: &[&str]) -> String {
    expect_error(
        r,
        "an integrity error",
        |e| matches!(e, Error::Integrity(_)),
        needles,
    )
}

/// The error of `r`, which must be an image limit's (`image refused: ...`) whose message contains every
/// needle.
#[track_caller]
fn expect_refused<T>(r: rafsd::Result<T>, needles: &[&str]) -> String {
    let is_limit = |e: &Error| matches!(e, Error::Invalid(m) if m.starts_with("image refused: "));
    expect_error(r, "an image limit's error", is_limit, needles)
}

/// The error of `r`, which must be `what` (as `is` tells) and whose message contains every needle.
#[track_caller]
fn expect_error<T>(
    r: rafsd::Result<T>,
    what: &str,
    is: impl Fn(&Error) -> bool,
    needles: &[&str],
) -> String {
    let e = match r {
        Ok(_) => panic!("expected {what} mentioning {needles:?}, got success"),
        Err(e) => e,
    };
    assert!(is(&e), "expected {what}, got {e:?}");
    assert_mentions(&e.to_string(), needles);
    e.to_string()
}

#[track_caller]
fn assert_mentions(message: &str, needles: &[&str]) {
    for n in needles {
        assert!(
            message.contains(n),
            "error {message:?} does not mention {n:?}"
        );
    }
}

/// `rafsd::check::check` on `image`: returns its error lines, which must not be empty.
#[track_caller]
fn check_errors(image: &RafsImage) -> Vec<String> {
    let report = rafsd::check::check(image, 100).expect("check returns a report");
    assert!(!report.errors.is_empty(), "check found no problem");
    report.errors
}

#[track_caller]
fn assert_some_line(lines: &[String], needles: &[&str]) {
    assert!(
        lines.iter().any(|l| needles.iter().all(|n| l.contains(n))),
        "no line mentions all of {needles:?}:\n{}",
        lines.join("\n")
    );
}

struct Run {
    code: Option<i32>,
    stderr: String,
    elapsed: Duration,
}

/// Run the `rafsd` binary with a deadline: a run still going after [`RUN_TIMEOUT`] is killed and fails the
/// test. Output goes to files (a pipe nobody drains could block the child).
fn run_rafsd(args: &[&OsStr], scratch: &Path) -> Run {
    let out_path = scratch.join("rafsd.stdout");
    let err_path = scratch.join("rafsd.stderr");
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rafsd"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn rafsd");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("rafsd {args:?} did not finish within {RUN_TIMEOUT:?} (a hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stderr: fs::read_to_string(&err_path).unwrap(),
        elapsed: start.elapsed(),
    }
}

/// Exit status 1, no panic, and one stderr line mentioning every needle.
#[track_caller]
fn assert_clean_failure(run: &Run, needles: &[&str]) {
    assert!(
        !run.stderr.contains("panicked"),
        "rafsd panicked:\n{}",
        run.stderr
    );
    assert_eq!(
        run.code,
        Some(1),
        "rafsd exit status; stderr:\n{}",
        run.stderr
    );
    let lines: Vec<String> = run.stderr.lines().map(str::to_string).collect();
    assert_some_line(&lines, needles);
}

// ------------------------------------------------------------------------------------------------------
// Truncated bootstraps.

#[test]
fn truncated_v5_bootstrap_is_refused_at_every_cut() {
    let full = Img::new("v5-lz4-blake3-repeatable");
    let b = &full.boot;
    let inode_table = le::u64_at(b, v5::S_INODE_TABLE_OFFSET) as usize;
    let blob_table = le::u64_at(b, v5::S_BLOB_TABLE_OFFSET) as usize;
    let root = v5::record(b, 1);
    // (cut, what the open error must say)
    let refused_at_open = [
        // Shorter than s_magic + s_fs_version: not recognisable as any bootstrap.
        (6, "not a RAFS bootstrap"),
        // Mid-superblock (the superblock is 8192 bytes).
        (100, "shorter than its 8 KiB superblock"),
        (8191, "shorter than its 8 KiB superblock"),
        // Inside the inode table, the blob table, and the root's inode record.
        (inode_table + 10, "inode table: range"),
        (blob_table + 20, "blob table: range"),
        (root.off + v5::INODE_SIZE / 2, "inode record: range"),
    ];
    for (cut, needle) in refused_at_open {
        let mut img = Img::new("v5-lz4-blake3-repeatable");
        img.truncate(cut);
        let msg = expect_corrupt(img.open(true), &[needle]);
        if cut >= 8 {
            assert_mentions(&msg, &[&format!("{cut}")]);
        }
    }

    // Mid-inode-area: the superblock, tables and root record are intact, so the image opens, and the walk
    // fails at the first record past the cut.
    let mut img = Img::new("v5-lz4-blake3-repeatable");
    let cut = b.len() / 2;
    img.truncate(cut);
    let image = img.opened(true);
    expect_corrupt(
        walk(&image),
        &[&format!("lies outside the {cut}-byte metadata")],
    );
    assert_some_line(
        &check_errors(&image),
        &[&format!("lies outside the {cut}-byte metadata")],
    );
    let run = img.run_check();
    assert_clean_failure(
        &run,
        &["error: ", &format!("lies outside the {cut}-byte metadata")],
    );

    // Cut inside the last record's chunk records.
    let mut img = Img::new("v5-lz4-blake3-repeatable");
    let cut = b.len() - 40;
    img.truncate(cut);
    let image = img.opened(true);
    assert_some_line(
        &check_errors(&image),
        &[&format!("lies outside the {cut}-byte metadata")],
    );
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn truncated_v6_bootstrap_is_refused_at_every_cut() {
    let full = Img::new("v6-zstd-blake3");
    let b = &full.boot;
    let chunk_table = le::u64_at(b, v6::S_CHUNK_TABLE_OFFSET) as usize;
    let root = v6::inode(b, v6::root_nid(b));
    let refused_at_open = [
        // Before the end of s_magic at 1024..1028: not recognisable.
        (1026, "not a RAFS bootstrap"),
        // Mid-superblock, and mid extended superblock: shorter than the first 4 KiB block.
        (1100, "shorter than one 4 KiB block"),
        (1200, "shorter than one 4 KiB block"),
        // Mid blob table, mid inode area and mid chunk table: the chunk table (checked first) lies outside.
        (4096 + 100, "chunk table: range"),
        (root.off + 10, "chunk table: range"),
        (chunk_table + 40, "chunk table: range"),
    ];
    for (cut, needle) in refused_at_open {
        let mut img = Img::new("v6-zstd-blake3");
        img.truncate(cut);
        let msg = expect_corrupt(img.open(true), &[needle]);
        if cut >= 1028 {
            assert_mentions(&msg, &[&format!("{cut}")]);
        }
    }

    // Mid-inode-area with the chunk table emptied (offset 0, size 0 is what an image without chunks
    // says), so opening gets past the tables and the walk meets the cut.
    for cut in [root.off + 40, (root.off + chunk_table) / 2] {
        let mut img = Img::new("v6-zstd-blake3");
        le::put_u64(&mut img.boot, v6::S_CHUNK_TABLE_OFFSET, 0);
        le::put_u64(&mut img.boot, v6::S_CHUNK_TABLE_SIZE, 0);
        img.truncate(cut);
        match img.open(false) {
            // The root inode itself was cut.
            Err(e) => {
                assert!(cut < root.off + 64);
                expect_corrupt::<()>(
                    Err(e),
                    &[
                        "inode nid",
                        &format!("lies outside the {cut}-byte metadata"),
                    ],
                );
            }
            Ok(image) => {
                expect_corrupt(
                    walk(&image),
                    &[&format!("lies outside the {cut}-byte metadata")],
                );
                // (`rafsd check` would first report every file's missing digest, the chunk table being
                // gone; `unpack` does not validate, so it meets the cut.)
                let (run, _) = img.run_unpack(&[]);
                assert_clean_failure(
                    &run,
                    &["rafsd: ", &format!("lies outside the {cut}-byte metadata")],
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------------
// Bad magic.

#[test]
fn bad_v5_magic_is_refused() {
    let mut img = Img::new("v5-none-aligned");
    // s_magic 0x52414653 ("SFAR") → "SFAX".
    img.boot[v5::S_MAGIC + 3] ^= 0x0b;
    img.save();
    expect_corrupt(img.open(true), &["not a RAFS bootstrap"]);
    // The v5 parser on its own names the field.
    let parsed = rafsd::format::v5::V5Meta::parse(MetaBytes::Owned(img.boot.clone()));
    expect_corrupt(parsed, &["bad RAFS v5 magic"]);
    let run = img.run_check();
    assert_clean_failure(&run, &["rafsd: ", "not a RAFS bootstrap"]);
}

#[test]
fn bad_v6_magic_is_refused() {
    let mut img = Img::new("v6-none-blake3-4k");
    // s_magic 0xE0F5E1E2 at 1024.
    le::put_u32(&mut img.boot, v6::S_MAGIC, 0xE0F5_E1E3);
    img.save();
    expect_corrupt(img.open(true), &["not a RAFS bootstrap"]);
    let parsed = rafsd::format::v6::V6Meta::parse(MetaBytes::Owned(img.boot.clone()), None);
    expect_corrupt(parsed, &["bad EROFS magic"]);
    let run = img.run_check();
    assert_clean_failure(&run, &["rafsd: ", "not a RAFS bootstrap"]);
}

// ------------------------------------------------------------------------------------------------------
// Offsets and counts past the end.

#[test]
fn v6_table_offsets_past_the_end_are_refused() {
    let len = Img::new("v6-zstd-blake3").boot.len() as u64;

    // s_blob_table_offset one block past the end of the file.
    let mut img = Img::new("v6-zstd-blake3");
    le::put_u64(&mut img.boot, v6::S_BLOB_TABLE_OFFSET, len + 4096);
    img.save();
    expect_corrupt(
        img.open(true),
        &[
            "blob table: range",
            &format!("outside the {len}-byte metadata"),
        ],
    );

    // s_blob_table_offset so large that offset + size overflows.
    let mut img = Img::new("v6-zstd-blake3");
    le::put_u64(&mut img.boot, v6::S_BLOB_TABLE_OFFSET, u64::MAX - 100);
    img.save();
    expect_corrupt(img.open(true), &["blob table", "overflows"]);

    // s_chunk_table_size of 2^40 rows (still a multiple of 80).
    let mut img = Img::new("v6-zstd-blake3");
    le::put_u64(&mut img.boot, v6::S_CHUNK_TABLE_SIZE, 80 << 40);
    img.save();
    expect_corrupt(
        img.open(true),
        &[
            "chunk table: range",
            &format!("outside the {len}-byte metadata"),
        ],
    );

    // s_chunk_table_offset near 2^64.
    let mut img = Img::new("v6-zstd-blake3");
    le::put_u64(&mut img.boot, v6::S_CHUNK_TABLE_OFFSET, u64::MAX - 8);
    img.save();
    expect_corrupt(img.open(true), &["chunk table", "overflows"]);

    // s_meta_blkaddr past the end: the root inode (meta base + root nid * 32) is outside the file.
    let mut img = Img::new("v6-zstd-blake3");
    le::put_u32(&mut img.boot, v6::S_META_BLKADDR, (len / 4096) as u32 + 1);
    img.save();
    let root = v6::root_nid(&img.boot);
    expect_corrupt(
        img.open(true),
        &[&format!("inode nid {root}: range"), "lies outside"],
    );
    le::put_u32(&mut img.boot, v6::S_META_BLKADDR, u32::MAX);
    img.save();
    expect_corrupt(
        img.open(true),
        &[&format!("inode nid {root}: range"), "lies outside"],
    );
    let run = img.run_check();
    assert_clean_failure(&run, &["rafsd: ", "inode nid", "lies outside"]);
}

#[test]
fn v6_dirent_nid_past_the_end_is_refused() {
    let mut img = Img::new("v6-zstd-blake3");
    let e = v6::entry(&img.boot, "special/owned");
    // e_nid of the dirent: an inode far past the end of the metadata.
    le::put_u64(&mut img.boot, e.at, 1 << 40);
    img.save();
    let image = img.opened(true);
    expect_corrupt(
        walk(&image),
        &[&format!("inode nid {}: range", 1u64 << 40), "lies outside"],
    );
}

#[test]
fn v6_huge_file_size_runs_the_chunk_index_array_past_the_end() {
    let mut img = Img::new("v6-zstd-blake3");
    let nid = v6::nid(&img.boot, "special/owned");
    let ino = v6::inode(&img.boot, nid);
    assert!(
        ino.extended,
        "special/owned has an extended inode (u64 i_size)"
    );
    // i_size = 2^50: ceil(2^50 / chunk size) chunk indexes of 8 bytes cannot fit in the bootstrap.
    le::put_u64(&mut img.boot, ino.off + v6::I_SIZE, 1 << 50);
    img.save();
    let image = img.opened(true);
    let mut buf = vec![0u8; 4096];
    expect_corrupt(
        image.read(nid, 0, &mut buf),
        &[
            &format!("chunk index array of nid {nid}: range"),
            "lies outside",
        ],
    );
    // Reading near the end of the claimed size fails the same way instead of allocating for it.
    expect_corrupt(
        image.read(nid, (1 << 50) - 10, &mut buf),
        &[&format!("chunk index array of nid {nid}")],
    );
    assert_some_line(
        &check_errors(&image),
        &["special/owned: ", "chunk index array", "lies outside"],
    );
    let run = img.run_check();
    assert_clean_failure(&run, &["error: special/owned: ", "chunk index array"]);
}

#[test]
fn v6_ci_offset_past_the_end_of_the_blob_is_refused() {
    let mut img = Img::new("v6-zstd-blake3");
    let entry = v6::blob_entry(&img.boot, 0);
    le::put_u64(&mut img.boot, entry + v6::BLOB_CI_OFFSET, 1 << 39);
    img.save();
    let image = img.opened(true);
    let nid = v6::nid(&img.boot, "etc/adduser.conf");
    let mut buf = vec![0u8; 4096];
    expect_corrupt(
        image.read(nid, 0, &mut buf),
        &["chunk-info array", "lies past the blob"],
    );
}

#[test]
fn v5_huge_inode_table_entries_are_refused() {
    let mut img = Img::new("v5-lz4-blake3-repeatable");
    le::put_u32(&mut img.boot, v5::S_INODE_TABLE_ENTRIES, u32::MAX);
    img.save();
    let len = img.boot.len();
    expect_corrupt(
        img.open(true),
        &[
            "inode table: range",
            &format!("outside the {len}-byte metadata"),
        ],
    );
    let run = img.run_check();
    assert_clean_failure(&run, &["rafsd: ", "inode table"]);
}

#[test]
fn v5_inode_table_slot_past_the_end_is_refused() {
    let mut img = Img::new("v5-lz4-blake3-repeatable");
    let owned = v5::find(&img.boot, "special/owned");
    // The slot's value is the record offset >> 3: u32::MAX points 32 GiB into a 745 KiB file.
    let slot = v5::slot_entry(&img.boot, owned.slot);
    le::put_u32(&mut img.boot, slot, u32::MAX);
    img.save();
    let image = img.opened(true);
    let far = (u32::MAX as u64) << 3;
    expect_corrupt(walk(&image), &["inode record: range", &format!("{far}..")]);
    expect_corrupt(image.inode(owned.ino), &["inode record: range"]);
    let run = img.run_check();
    assert_clean_failure(&run, &["error: walk: ", "inode record: range"]);

    // The root's own slot: refused at open.
    let mut img = Img::new("v5-lz4-blake3-repeatable");
    let slot = v5::slot_entry(&img.boot, 1);
    le::put_u32(&mut img.boot, slot, u32::MAX);
    img.save();
    expect_corrupt(img.open(true), &["inode record: range"]);
}

#[test]
fn v5_chunk_count_and_file_offset_past_the_end_are_refused() {
    // i_child_count of a regular file (its chunk count) far beyond what the bootstrap holds: a 6-byte file
    // has exactly one chunk.
    let mut img = Img::new("v5-lz4-blake3-repeatable");
    let rec = v5::find(&img.boot, "special/owned");
    le::put_u32(&mut img.boot, rec.off + v5::I_CHILD_COUNT, u32::MAX);
    img.save();
    let image = img.opened(true);
    let mut buf = vec![0u8; 4096];
    let what = format!("chunks of inode {}", rec.ino);
    expect_corrupt(
        image.read(rec.ino, 0, &mut buf),
        &[
            &what,
            "needs 1 chunks",
            &format!("its record has {}", u32::MAX),
        ],
    );
    // With HAS_HOLE (chunks need not cover the file) the count is still bounded by the records present.
    le::put_u64(
        &mut img.boot,
        rec.off + v5::I_FLAGS,
        rec.flags | v5::I_HAS_HOLE,
    );
    img.save();
    let image = img.opened(true);
    expect_corrupt(
        image.read(rec.ino, 0, &mut buf),
        &[&format!("{what}: range"), "lies outside"],
    );

    // A chunk record whose file_offset is near 2^64 (its end would overflow).
    let mut img = Img::new("v5-lz4-blake3-repeatable");
    let rec = v5::find(&img.boot, "special/tail-unaligned");
    let at = v5::chunk_record(&img.boot, &rec, 1);
    le::put_u64(&mut img.boot, at + v5::C_FILE_OFFSET, u64::MAX - 10);
    img.save();
    let image = img.opened(true);
    let mut buf = vec![0u8; 1 << 20];
    expect_corrupt(
        image.read(rec.ino, 1 << 20, &mut buf),
        &[&format!("chunks of inode {}", rec.ino), "chunk 1"],
    );
    assert_some_line(
        &check_errors(&image),
        &["special/tail-unaligned: ", "chunk 1"],
    );
}

#[test]
fn v5_chunks_of_a_file_with_holes_are_whole_chunks_at_chunk_boundaries() {
    // HAS_HOLE lets chunks skip parts of a file, not shrink: 1-byte chunks would make a 4 KiB READ touch
    // thousands of them. special/tail-unaligned has a whole first chunk and a tail.
    let forge = |k: usize, file_offset: Option<u64>, size: Option<u32>| {
        let mut img = Img::new("v5-lz4-blake3-repeatable");
        let rec = v5::find(&img.boot, "special/tail-unaligned");
        assert!(rec.child_count >= 2);
        le::put_u64(
            &mut img.boot,
            rec.off + v5::I_FLAGS,
            rec.flags | v5::I_HAS_HOLE,
        );
        let at = v5::chunk_record(&img.boot, &rec, k);
        if let Some(o) = file_offset {
            le::put_u64(&mut img.boot, at + v5::C_FILE_OFFSET, o);
        }
        if let Some(s) = size {
            le::put_u32(&mut img.boot, at + v5::C_UNCOMPRESSED_SIZE, s);
        }
        img.save();
        (img, rec)
    };
    let (img, rec) = forge(0, None, None);
    let chunk = le::u32_at(&img.boot, v5::S_BLOCK_SIZE) as u64;
    let mut buf = vec![0u8; 4096];
    img.opened(true).read(rec.ino, 0, &mut buf).unwrap();

    let what = format!("chunks of inode {}", rec.ino);
    let (img, _) = forge(0, None, Some(1));
    expect_corrupt(
        img.opened(true).read(rec.ino, 0, &mut buf),
        &[
            &what,
            &format!("chunk 0 holds 1 bytes at file offset 0, the file needs {chunk} at 0"),
        ],
    );
    let (img, _) = forge(1, Some(chunk + 1), None);
    expect_corrupt(
        img.opened(true).read(rec.ino, chunk, &mut buf),
        &[
            &what,
            "chunk 1 holds",
            &format!("at file offset {}", chunk + 1),
        ],
    );
}

/// A file under `etc` of a v5 image stored in one chunk (a compressed one if `compressed`): its record
/// and where its chunk record is.
fn v5_one_chunk_file(img: &Img, compressed: bool) -> Option<(v5::Record, usize)> {
    v5::files_in(&img.boot, "etc")
        .iter()
        .map(|path| v5::find(&img.boot, path))
        .filter(|rec| rec.child_count == 1)
        .map(|rec| {
            let at = v5::chunk_record(&img.boot, &rec, 0);
            (rec, at)
        })
        .find(|(_, at)| {
            !compressed || le::u32_at(&img.boot, at + v5::C_FLAGS) & v5::COMPRESSED != 0
        })
}

#[test]
fn v5_chunk_stored_in_more_than_its_size_can_compress_to_is_refused() {
    // A chunk claims to be stored in the chunk size (1 MiB; the old bound) though its few bytes compress
    // to far less, or, stored raw, in one byte more than it holds: a small read would be a large backend
    // read.
    for (case, compressed) in [
        ("v5-lz4-blake3-repeatable", true),
        ("v5-none-aligned", false),
    ] {
        let mut img = Img::new(case);
        let chunk_size = le::u32_at(&img.boot, v5::S_BLOCK_SIZE);
        let (rec, at) = v5_one_chunk_file(&img, compressed)
            .unwrap_or_else(|| panic!("{case}: a file of one chunk"));
        let size = le::u32_at(&img.boot, at + v5::C_UNCOMPRESSED_SIZE);
        let claimed = if compressed { chunk_size } else { size + 1 };
        assert!(size < chunk_size / 2, "{case}: a small chunk");
        le::put_u32(&mut img.boot, at + v5::C_COMPRESSED_SIZE, claimed);
        img.save();
        let image = img.opened(true);
        let mut buf = vec![0u8; 4096];
        let how = if compressed { "compressed" } else { "raw" };
        expect_corrupt(
            image.read(rec.ino, 0, &mut buf),
            &[&format!("{claimed} bytes stored ({how}) for {size} bytes")],
        );
    }
}

#[test]
fn v5_gzip_chunk_stored_in_no_bytes_stays_unsupported() {
    // nydus-image up to 2.1 converted stargz layers into v5 images of gzip chunks recorded with no stored
    // size. They cannot be read here (no gzip codec), and a read says so (EOPNOTSUPP), as it did before
    // chunk sizes were checked, not that the image is corrupt.
    let mut img = Img::new("v5-lz4-blake3-repeatable");
    let flags = le::u64_at(&img.boot, v5::S_FLAGS);
    le::put_u64(&mut img.boot, v5::S_FLAGS, (flags & !0xc3) | 0x40);
    let (rec, at) = v5_one_chunk_file(&img, true).expect("a file of one compressed chunk");
    le::put_u32(&mut img.boot, at + v5::C_COMPRESSED_SIZE, 0);
    img.save();
    let image = img.opened(true);
    let e = image.read(rec.ino, 0, &mut [0u8; 4096]).unwrap_err();
    assert_eq!(e.errno(), libc::EOPNOTSUPP, "{e}");
    assert!(e.to_string().contains("gzip"), "{e}");
}

#[test]
fn v5_prefetch_table_listing_one_file_again_and_again_is_indexed_once() {
    // special/repeated-chunks: 2 MiB in 16 chunks of 128 KiB, all the same chunk (so the distinct-chunk
    // cap never trips). The table lists it 2^21 times: indexing the table on the first cold read, which
    // every other cold read waits for, looked its chunks up 2^25 times.
    let mut img = Img::new("v5-zstd-sha256-128k");
    let rec = v5::find(&img.boot, "special/repeated-chunks");
    assert_eq!(rec.child_count, 16);
    let repeats = 1usize << 21;
    let at = img.boot.len().next_multiple_of(8);
    img.boot.resize(at, 0);
    for _ in 0..repeats {
        img.boot.extend_from_slice(&(rec.ino as u32).to_le_bytes());
    }
    le::put_u64(&mut img.boot, v5::S_PREFETCH_TABLE_OFFSET, at as u64);
    le::put_u32(&mut img.boot, v5::S_PREFETCH_TABLE_ENTRIES, repeats as u32);
    img.save();
    let image = RafsImage::open_local(
        &img.bootstrap,
        Some(&img.blob_dir),
        ImageOptions {
            validate: true,
            cache_dir: Some(img.scratch("cache")),
            amplify_io: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(image.info().prefetch.len(), repeats);
    let started = Instant::now();
    let data = file_content(&image, rec.ino).unwrap();
    let took = started.elapsed();
    assert_eq!(data.len(), 2 << 20);
    assert!(
        took < Duration::from_secs(5),
        "the first read took {took:?}"
    );
}

#[test]
fn v5_chunk_uncompressed_offset_past_the_end_of_the_blob_is_refused() {
    // The first value makes offset + size overflow (special/owned holds 6 bytes).
    for bad in [u64::MAX - 2, 1 << 50] {
        let mut img = Img::new("v5-lz4-blake3-repeatable");
        let rec = v5::find(&img.boot, "special/owned");
        let at = v5::chunk_record(&img.boot, &rec, 0);
        le::put_u64(&mut img.boot, at + v5::C_UNCOMPRESSED_OFFSET, bad);
        img.save();
        let image = img.opened(true);
        let mut buf = vec![0u8; 4096];
        let blob = v5::first_blob_id(&img.boot).1;
        expect_corrupt(
            image.read(rec.ino, 0, &mut buf),
            &[&format!("blob {blob} chunk"), "lies outside the blob"],
        );
    }
}

#[test]
fn v5_chunk_whose_stored_end_overflows_is_refused() {
    // compressed_offset + compressed_size past u64::MAX: the read path's sums (a predicted run's end, a
    // stream's end, the backend's range) overflowed, a panic in a debug build. Read with a cache and
    // amplify_io, as a daemon does, so a predicted run is planned from it.
    let mut img = Img::new("v5-lz4-blake3-repeatable");
    let rec = v5::find(&img.boot, "special/owned");
    let at = v5::chunk_record(&img.boot, &rec, 0);
    le::put_u64(&mut img.boot, at + v5::C_COMPRESSED_OFFSET, u64::MAX - 2);
    img.save();
    let image = RafsImage::open_local(
        &img.bootstrap,
        Some(&img.blob_dir),
        ImageOptions {
            cache_dir: Some(img.scratch("cache")),
            amplify_io: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    expect_corrupt(
        image.read(rec.ino, 0, &mut [0u8; 4096]),
        &[
            &format!("stored at {}", u64::MAX - 2),
            "ends past the largest offset",
        ],
    );
}

#[test]
fn v5_huge_file_size_without_chunks_is_refused() {
    // special/empty has no chunk records; claim it is 2^62 bytes long. Reading it must not produce 2^62
    // bytes of zeros (which `check` would spend forever on).
    let mut img = Img::new("v5-lz4-blake3-repeatable");
    let rec = v5::find(&img.boot, "special/empty");
    assert_eq!((rec.size, rec.child_count), (0, 0));
    le::put_u64(&mut img.boot, rec.off + v5::I_SIZE, 1 << 62);
    img.save();
    let image = img.opened(true);
    let mut buf = vec![0u8; 4096];
    expect_corrupt(
        image.read(rec.ino, 0, &mut buf),
        &[&format!("inode {}", rec.ino), "chunks"],
    );
    let run = img.run_check();
    assert_clean_failure(&run, &["error: special/empty: ", "chunks"]);
}

// ------------------------------------------------------------------------------------------------------
// Directory cycles.

#[test]
#[ignore = "needs root: ci/test.sh"]
fn v6_directory_pointing_back_at_the_root_is_a_cycle() {
    let mut img = Img::new("v6-zstd-blake3");
    let root = v6::root_nid(&img.boot);
    let sticky = v6::entry(&img.boot, "special/sticky");
    assert_eq!(sticky.file_type, 2, "special/sticky is a directory");
    // e_nid of special/sticky → the root directory.
    le::put_u64(&mut img.boot, sticky.at, root);
    img.save();
    let image = img.opened(true);
    let start = Instant::now();
    expect_corrupt(
        walk(&image),
        &[
            "cycle",
            &format!("directory inode {root}"),
            "special/sticky",
        ],
    );
    assert!(start.elapsed() < RUN_TIMEOUT);

    let run = img.run_check();
    assert_clean_failure(&run, &["error: walk: ", "cycle", "special/sticky"]);
    assert!(run.elapsed < RUN_TIMEOUT);
    let (run, _) = img.run_unpack(&[]);
    assert_clean_failure(&run, &["rafsd: ", "cycle", "special/sticky"]);
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn v6_directory_pointing_at_an_ancestor_is_a_cycle() {
    let mut img = Img::new("v6-zstd-blake3");
    // special/deep/d0/d1/...: point d0's child at special/deep.
    let deep = v6::nid(&img.boot, "special/deep");
    let d0 = v6::nid(&img.boot, "special/deep/d0");
    let child = v6::dirents(&img.boot, d0)
        .into_iter()
        .find(|e| e.file_type == 2 && e.name != b"." && e.name != b"..");
    let child = child.expect("special/deep/d0 has a subdirectory");
    let name = String::from_utf8(child.name.clone()).unwrap();
    le::put_u64(&mut img.boot, child.at, deep);
    img.save();
    let image = img.opened(true);
    let cycle_at = format!("special/deep/d0/{name}");
    expect_corrupt(
        walk(&image),
        &["cycle", &format!("directory inode {deep}"), &cycle_at],
    );
    let run = img.run_check();
    assert_clean_failure(&run, &["error: walk: ", "cycle", &cycle_at]);
    let (run, _) = img.run_unpack(&[]);
    assert_clean_failure(&run, &["rafsd: ", "cycle", &cycle_at]);
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn v5_child_slot_pointing_at_an_ancestor_is_a_cycle() {
    let mut img = Img::new("v5-lz4-blake3-repeatable");
    let deep = v5::find(&img.boot, "special/deep");
    let d0 = v5::find(&img.boot, "special/deep/d0");
    let child = v5::children(&img.boot, &d0)
        .into_iter()
        .find(|c| c.mode & 0o170000 == 0o040000);
    let child = child.expect("special/deep/d0 has a subdirectory");
    // The child's inode-table slot now holds special/deep's record offset (>> 3): d0's only child is a
    // directory named "deep" whose inode is special/deep.
    let deep_value = le::u32_at(&img.boot, v5::slot_entry(&img.boot, deep.slot));
    let slot = v5::slot_entry(&img.boot, child.slot);
    le::put_u32(&mut img.boot, slot, deep_value);
    img.save();
    let image = img.opened(true);
    expect_corrupt(
        walk(&image),
        &[
            "cycle",
            &format!("directory inode {}", deep.ino),
            "special/deep/d0/deep",
        ],
    );
    let run = img.run_check();
    assert_clean_failure(&run, &["error: walk: ", "cycle", "special/deep/d0/deep"]);
    let (run, _) = img.run_unpack(&[]);
    assert_clean_failure(&run, &["rafsd: ", "cycle", "special/deep/d0/deep"]);
}

#[test]
fn v5_directory_whose_children_include_itself_is_a_cycle() {
    let mut img = Img::new("v5-lz4-blake3-repeatable");
    // special/deep/d0's child range → special/deep's child range, which holds d0 itself.
    let deep = v5::find(&img.boot, "special/deep");
    let d0 = v5::find(&img.boot, "special/deep/d0");
    le::put_u32(&mut img.boot, d0.off + v5::I_CHILD_INDEX, deep.child_index);
    le::put_u32(&mut img.boot, d0.off + v5::I_CHILD_COUNT, deep.child_count);
    img.save();
    let image = img.opened(true);
    expect_corrupt(
        walk(&image),
        &[
            "cycle",
            &format!("directory inode {}", d0.ino),
            "special/deep/d0/d0",
        ],
    );
}

// ------------------------------------------------------------------------------------------------------
// Names that are not a single path component.

#[test]
fn v5_name_with_a_slash_is_refused() {
    let mut img = Img::new("v5-lz4-blake3-repeatable");
    let rec = v5::find(&img.boot, "special/owned");
    // "owned" → "ow/ed" (same length, so the record layout is unchanged).
    img.boot[rec.off + v5::INODE_SIZE + 2] = b'/';
    img.save();
    let image = img.opened(true);
    let special = v5::find(&img.boot, "special");
    expect_corrupt(
        walk(&image),
        &[&format!("directory {}", special.ino), "\"ow/ed\"", "'/'"],
    );
    expect_corrupt(image.lookup(special.ino, b"owned"), &["\"ow/ed\""]);
    let (run, out) = img.run_unpack(&[]);
    assert_clean_failure(&run, &["rafsd: ", "\"ow/ed\"", "'/'"]);
    // Nothing was created for the bad name (the listing fails before any child of special/ is made).
    assert!(!out.join("special/ow").exists());
}

#[test]
fn v5_name_dot_dot_is_refused() {
    let mut img = Img::new("v5-lz4-blake3-repeatable");
    // special/deep/d0/d1 → special/deep/d0/.. (same length).
    let rec = v5::find(&img.boot, "special/deep/d0/d1");
    img.boot[rec.off + v5::INODE_SIZE..rec.off + v5::INODE_SIZE + 2].copy_from_slice(b"..");
    img.save();
    let image = img.opened(true);
    expect_corrupt(walk(&image), &["entry named \"..\" is not allowed"]);
    let run = img.run_check();
    assert_clean_failure(&run, &["error: walk: ", "\"..\""]);

    // A shorter name: special/owned → "..", with i_name_size 5 → 2 (both pad to 8, so the chunk records
    // stay where they were).
    let mut img = Img::new("v5-lz4-blake3-repeatable");
    let rec = v5::find(&img.boot, "special/owned");
    le::put_u16(&mut img.boot, rec.off + v5::I_NAME_SIZE, 2);
    img.boot[rec.off + v5::INODE_SIZE..rec.off + v5::INODE_SIZE + 2].copy_from_slice(b"..");
    img.save();
    let image = img.opened(true);
    expect_corrupt(walk(&image), &["entry named \"..\" is not allowed"]);
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn v6_name_with_a_slash_is_refused() {
    let mut img = Img::new("v6-zstd-blake3");
    let e = v6::entry(&img.boot, "special/owned");
    // "owned" → "ow/ed": still sorted between its neighbours ("nnn…" < "ow/ed" < "random-2m5").
    img.boot[e.name_at + 2] = b'/';
    img.save();
    let image = img.opened(true);
    let special = v6::nid(&img.boot, "special");
    expect_corrupt(
        walk(&image),
        &[&format!("directory nid {special}"), "\"ow/ed\"", "'/'"],
    );
    let run = img.run_check();
    assert_clean_failure(&run, &["error: walk: ", "\"ow/ed\"", "'/'"]);
    let (run, out) = img.run_unpack(&[]);
    assert_clean_failure(&run, &["rafsd: ", "\"ow/ed\""]);
    assert!(!out.join("special/ow").exists());
}

#[test]
fn v6_name_with_a_slash_in_the_last_entry_of_a_block_is_refused() {
    let mut img = Img::new("v6-zstd-blake3");
    // The last name of a block runs to the block end (or NUL): put '/' in special/xattrs, the last entry.
    let special = v6::nid(&img.boot, "special");
    let last = v6::dirents(&img.boot, special).pop().unwrap();
    assert_eq!(last.name, b"xattrs");
    img.boot[last.name_at + 1] = b'/';
    img.save();
    let image = img.opened(true);
    expect_corrupt(walk(&image), &["\"x/ttrs\"", "'/'"]);
}

#[test]
fn v6_name_dot_dot_is_refused() {
    let mut img = Img::new("v6-zstd-blake3");
    // special/deep/d0 lists ".", "..", "d1". Renaming "d1" to ".." keeps the names in non-decreasing
    // order (".." follows ".."), so the problem to report is the second "..", not the order.
    let d0 = v6::nid(&img.boot, "special/deep/d0");
    let d1 = v6::entry(&img.boot, "special/deep/d0/d1");
    img.boot[d1.name_at..d1.name_at + 2].copy_from_slice(b"..");
    img.save();
    let image = img.opened(true);
    expect_corrupt(walk(&image), &[&format!("directory nid {d0}"), "\"..\""]);
    let run = img.run_check();
    assert_clean_failure(&run, &["error: walk: ", "\"..\""]);

    // The same, with the second ".." a regular file (e_file_type 1, e_nid of special/owned).
    let mut img = Img::new("v6-zstd-blake3");
    let d1 = v6::entry(&img.boot, "special/deep/d0/d1");
    img.boot[d1.name_at..d1.name_at + 2].copy_from_slice(b"..");
    img.boot[d1.at + 10] = 1;
    let owned = v6::nid(&img.boot, "special/owned");
    le::put_u64(&mut img.boot, d1.at, owned);
    img.save();
    let image = img.opened(true);
    expect_corrupt(walk(&image), &[&format!("directory nid {d0}"), "\"..\""]);
}

#[test]
fn v6_readdir_cookie_past_a_huge_directory_is_refused() {
    // special/deep/d0 (an extended inode) made a FLAT_PLAIN directory of almost 2^64 bytes whose blocks
    // start at block 16: a cookie naming its last block puts that block past 2^64 bytes into the image.
    let mut img = Img::new("v6-zstd-blake3");
    let d0 = v6::nid(&img.boot, "special/deep/d0");
    let ino = v6::inode(&img.boot, d0);
    assert!(ino.extended, "special/deep/d0 has a 64-bit i_size");
    let block = v6::BLOCK as u64;
    let size = u64::MAX - (block - 1);
    le::put_u16(&mut img.boot, ino.off, 1); // extended, FLAT_PLAIN
    le::put_u64(&mut img.boot, ino.off + v6::I_SIZE, size);
    le::put_u32(&mut img.boot, ino.off + 16, 16);
    img.save();
    let image = img.opened(true);
    let last = size / block - 1;
    expect_corrupt(
        image.read_dir(d0, last << 9, &mut |_| Ok(true)),
        &[&format!("inode nid {d0}: block {last} is out of range")],
    );
}

// ------------------------------------------------------------------------------------------------------
// Blob ids that are not plain names.

/// A backend that records every blob id it is asked for.
struct Recording {
    inner: LocalFs,
    asked: Mutex<Vec<String>>,
}

impl BlobBackend for Recording {
    fn kind(&self) -> &'static str {
        "recording"
    }
    fn read_at(&self, blob_id: &str, offset: u64, buf: &mut [u8]) -> rafsd::Result<usize> {
        self.asked.lock().unwrap().push(blob_id.to_string());
        self.inner.read_at(blob_id, offset, buf)
    }
    fn blob_size(&self, blob_id: &str) -> rafsd::Result<u64> {
        self.asked.lock().unwrap().push(blob_id.to_string());
        self.inner.blob_size(blob_id)
    }
}

/// Put a copy of the real blob, and a FIFO, where an id escaping the blob directory would lead. Opening
/// the FIFO for reading would block, so a reader that followed the id would hang instead of failing.
fn plant_decoys(img: &Img, evil_id: &str) {
    let target = img.blob_dir.join(evil_id);
    assert!(
        target.starts_with(img.dir.path()),
        "decoy stays inside the test's directory"
    );
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    fs::write(&target, img.read_blob()).unwrap();
    let fifo = std::ffi::CString::new(format!("{}.fifo", target.display())).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
}

fn assert_id_refused(img: &Img, evil_id: &str) {
    let shown = format!("blob id {:?}", evil_id);
    expect_corrupt(img.open(true), &[&shown, "not a plain name"]);
    // Through a recording backend: the image is refused before any blob is asked for.
    let backend = Arc::new(Recording {
        inner: LocalFs::with_dir(&img.blob_dir),
        asked: Mutex::new(Vec::new()),
    });
    let opened = RafsImage::open(
        &img.bootstrap,
        backend.clone(),
        ImageOptions {
            validate: true,
            ..Default::default()
        },
    );
    expect_corrupt(opened, &[&shown]);
    assert!(
        backend.asked.lock().unwrap().is_empty(),
        "blobs were requested: {:?}",
        backend.asked.lock().unwrap()
    );
    // The localfs backend refuses the id on its own too, although a file exists where it leads.
    let direct = LocalFs::with_dir(&img.blob_dir);
    assert!(img.blob_dir.join(evil_id).exists());
    expect_corrupt(direct.blob_size(evil_id), &[&shown]);
    expect_corrupt(
        direct.read_exact_at(&format!("{evil_id}.fifo"), 0, 1),
        &["not a plain name"],
    );
    // And the binary fails quickly (it did not block on the FIFO) with the id in its message.
    let run = img.run_check();
    assert_clean_failure(&run, &["rafsd: ", &shown]);
    let (run, out) = img.run_unpack(&[]);
    assert_clean_failure(&run, &["rafsd: ", &shown]);
    assert!(
        !out.exists() || fs::read_dir(&out).unwrap().next().is_none(),
        "nothing unpacked"
    );
}

#[test]
fn v6_blob_id_with_path_separators_is_refused() {
    for evil in ["../../etc/x", "a/b"] {
        // Blobs in <tmp>/x/y/blobs, so "../../etc/x" leads to <tmp>/x/etc/x, inside the test directory.
        let mut img = Img::with_blob_dir("v6-none-blake3-4k", "x/y/blobs");
        plant_decoys(&img, evil);
        // The same id in blob table entry 0 and device slot 0 (they must agree).
        let entry = v6::blob_entry(&img.boot, 0);
        le::put_padded(&mut img.boot, entry + v6::BLOB_ID, v6::BLOB_ID_LEN, evil);
        let slot = v6::device_slot(&img.boot, 0);
        le::put_padded(&mut img.boot, slot, v6::BLOB_ID_LEN, evil);
        img.save();
        assert_id_refused(&img, evil);
    }
}

#[test]
fn v6_blob_id_only_in_the_device_slot_is_refused() {
    let mut img = Img::new("v6-none-blake3-4k");
    let slot = v6::device_slot(&img.boot, 0);
    le::put_padded(&mut img.boot, slot, v6::BLOB_ID_LEN, "../../etc/x");
    img.save();
    expect_corrupt(img.open(true), &["device slot 0", "\"../../etc/x\""]);
}

#[test]
fn v5_blob_id_with_path_separators_is_refused() {
    for evil in ["../../etc/x", "a/b"] {
        let mut img = Img::with_blob_dir("v5-none-aligned", "x/y/blobs");
        plant_decoys(&img, evil);
        // Overwrite the start of the 64-character id and end it with the NUL that separates entries.
        let (at, id) = v5::first_blob_id(&img.boot);
        assert_eq!(id.len(), 64);
        img.boot[at..at + evil.len()].copy_from_slice(evil.as_bytes());
        img.boot[at + evil.len()] = 0;
        img.save();
        assert_id_refused(&img, evil);
    }
}

/// The v5 fixture with a new blob table of `n` entries appended (the fixture's blob first, the chunks
/// still name it), and, with `chunks`, a new extended blob table giving each blob that many chunks.
fn v5_with_blob_table(n: usize, chunks: Option<u32>) -> Img {
    let mut img = Img::new("v5-none-aligned");
    let (_, first) = v5::first_blob_id(&img.boot);
    let mut table = Vec::new();
    for k in 0..n {
        table.extend_from_slice(&[0; 8]); // readahead offset and size
        let id = if k == 0 {
            first.clone()
        } else {
            format!("{k:064x}")
        };
        table.extend_from_slice(id.as_bytes());
        table.push(0);
    }
    let at = img.boot.len().next_multiple_of(8);
    img.boot.resize(at, 0);
    img.boot.extend_from_slice(&table);
    le::put_u64(&mut img.boot, v5::S_BLOB_TABLE_OFFSET, at as u64);
    le::put_u32(&mut img.boot, v5::S_BLOB_TABLE_SIZE, table.len() as u32);
    if let Some(chunks) = chunks {
        let old = le::u64_at(&img.boot, v5::S_EXT_BLOB_TABLE_OFFSET) as usize;
        let first_entry = img.boot[old..old + v5::EXT_BLOB_ENTRY].to_vec();
        let at = img.boot.len().next_multiple_of(8);
        img.boot.resize(at, 0);
        for _ in 0..n {
            let entry = img.boot.len();
            img.boot.extend_from_slice(&first_entry);
            le::put_u32(&mut img.boot, entry, chunks);
        }
        le::put_u64(&mut img.boot, v5::S_EXT_BLOB_TABLE_OFFSET, at as u64);
        le::put_u32(&mut img.boot, v5::S_EXT_BLOB_TABLE_ENTRIES, n as u32);
    }
    img.save();
    img
}

#[test]
fn v5_blob_table_of_more_than_255_blobs_is_refused() {
    // Each blob costs cache files, descriptors and mappings at mount: v5 is held to v6's 255.
    let img = v5_with_blob_table(255, None);
    assert_eq!(img.opened(true).info().blobs.len(), 255);
    let img = v5_with_blob_table(256, None);
    expect_refused(img.open(true), &["256 blobs", "limit of 255 blobs"]);
    let run = img.run_check();
    assert_clean_failure(&run, &["rafsd: ", "limit of 255 blobs"]);
}

#[test]
fn v5_blobs_of_more_than_2_pow_26_chunks_in_all_are_refused() {
    // Each blob within its own limit of 2^24 chunks, but 255 of them would be 510 MiB of cache bitmaps
    // (on disk, and walked by every blob-cache metrics request). Four are within the image's limit.
    let img = v5_with_blob_table(4, Some(1 << 24));
    let image = img.opened(true);
    assert_eq!(image.info().blobs[3].chunk_count, 1 << 24);
    let img = v5_with_blob_table(5, Some(1 << 24));
    expect_refused(
        img.open(true),
        &[
            &format!("its 5 blobs have {} chunks", 5u64 << 24),
            "limit of 2^26 chunks per image",
        ],
    );
}

#[test]
fn v5_extended_blob_entry_of_more_than_2_pow_24_chunks_is_refused() {
    let mut img = Img::new("v5-lz4-blake3-repeatable");
    assert!(le::u32_at(&img.boot, v5::S_EXT_BLOB_TABLE_ENTRIES) >= 1);
    let entry = le::u64_at(&img.boot, v5::S_EXT_BLOB_TABLE_OFFSET) as usize;
    le::put_u32(&mut img.boot, entry, (1 << 24) + 1);
    img.save();
    let blob = v5::first_blob_id(&img.boot).1;
    expect_refused(
        img.open(true),
        &[
            &format!("blob {blob} has {} chunks", (1 << 24) + 1),
            "limit of 2^24 chunks per blob",
        ],
    );
}

// ------------------------------------------------------------------------------------------------------
// Flipped bytes inside a chunk.

/// Where, inside a stored chunk, flipping a byte changes the decompressed bytes without breaking the
/// stream: anywhere in a raw chunk; in an lz4 block, a byte of the first literal run; in a zstd frame, a
/// byte of a raw block or of a raw literals section. `None` if the chunk has no such byte.
fn literal_byte(compressor: u32, compressed: bool, stored: &[u8]) -> Option<usize> {
    if !compressed {
        return Some(stored.len() / 2);
    }
    match compressor {
        // lz4 block: token (high nibble = literal length, 15 = more length bytes follow), then literals.
        1 => {
            let mut pos = 1;
            let mut len = (stored[0] >> 4) as usize;
            if len == 15 {
                loop {
                    let more = stored[pos] as usize;
                    pos += 1;
                    len += more;
                    if more != 255 {
                        break;
                    }
                }
            }
            (len > 0).then_some(pos + len / 2)
        }
        // zstd frame: magic, frame header descriptor, [window descriptor], [dictionary id], [content size],
        // then the first block header (3 bytes: last, type, size).
        3 => {
            assert_eq!(le::u32_at(stored, 0), 0xFD2F_B528, "zstd frame magic");
            let fhd = stored[4];
            let single_segment = fhd >> 5 & 1 == 1;
            let mut pos = 5 + usize::from(!single_segment);
            pos += [0, 1, 2, 4][(fhd & 3) as usize];
            pos += match fhd >> 6 {
                0 => usize::from(single_segment),
                1 => 2,
                2 => 4,
                _ => 8,
            };
            let block = le::u32_at(&[stored[pos], stored[pos + 1], stored[pos + 2], 0], 0);
            let (block_type, block_size) = ((block >> 1) & 3, (block >> 3) as usize);
            pos += 3;
            match block_type {
                0 => (block_size > 0).then_some(pos + block_size / 2),
                2 => {
                    // Literals section header: type in bits 0..1 (0 = raw), size format in bits 2..3.
                    let h = stored[pos];
                    if h & 3 != 0 {
                        return None;
                    }
                    let (header, size) = match (h >> 2) & 3 {
                        0 | 2 => (1, (h >> 3) as usize),
                        1 => (2, (h >> 4) as usize | (stored[pos + 1] as usize) << 4),
                        _ => (
                            3,
                            (h >> 4) as usize
                                | (stored[pos + 1] as usize) << 4
                                | (stored[pos + 2] as usize) << 12,
                        ),
                    };
                    (size > 0).then_some(pos + header + size / 2)
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// One chunk of one file, located in the bootstrap and the blob.
struct Target {
    path: String,
    ino: u64,
    blob_id: String,
    /// The chunk's index in its blob (v5 chunk record `index`, v6 CI index).
    chunk: u32,
    /// Which chunk of the file (file offset = this × chunk size).
    file_chunk: usize,
    /// Offset in the blob of the byte to flip.
    flip_at: usize,
}

fn v5_target(img: &Img, paths: &[String], file_chunk: usize) -> Option<Target> {
    let b = &img.boot;
    let compressor = v5::compressor(b);
    let blob = img.read_blob();
    let (_, blob_id) = v5::first_blob_id(b);
    for path in paths {
        let rec = v5::find(b, path);
        if (rec.child_count as usize) <= file_chunk {
            continue;
        }
        let c = v5::chunk_record(b, &rec, file_chunk);
        let coff = le::u64_at(b, c + v5::C_COMPRESSED_OFFSET) as usize;
        let csize = le::u32_at(b, c + v5::C_COMPRESSED_SIZE) as usize;
        let compressed = le::u32_at(b, c + v5::C_FLAGS) & v5::COMPRESSED != 0;
        if compressor != 0 && !compressed {
            continue; // looking for a chunk the codec really decodes
        }
        assert_eq!(le::u32_at(b, c + v5::C_BLOB_INDEX), 0);
        assert_eq!(
            le::u64_at(b, c + v5::C_FILE_OFFSET),
            file_chunk as u64 * le::u32_at(b, v5::S_BLOCK_SIZE) as u64
        );
        if let Some(k) = literal_byte(compressor, compressed, &blob[coff..coff + csize]) {
            return Some(Target {
                path: path.clone(),
                ino: rec.ino,
                blob_id,
                chunk: le::u32_at(b, c + v5::C_INDEX),
                file_chunk,
                flip_at: coff + k,
            });
        }
    }
    None
}

/// The blob's CI array, decompressed (§1.16; the CI compressor numbering is §1.6's).
fn v6_ci_array(b: &[u8], blob: &[u8]) -> Vec<u8> {
    let e = v6::blob_entry(b, 0);
    assert_eq!(
        le::u32_at(b, e + v6::BLOB_FEATURES) & v6::CHUNK_INFO_V2,
        0,
        "V1 chunk-info entries"
    );
    let off = le::u64_at(b, e + v6::BLOB_CI_OFFSET) as usize;
    let csize = le::u64_at(b, e + v6::BLOB_CI_COMPRESSED_SIZE) as usize;
    let usize_ = le::u64_at(b, e + v6::BLOB_CI_UNCOMPRESSED_SIZE) as usize;
    let stored = &blob[off..off + csize];
    if csize == usize_ {
        return stored.to_vec();
    }
    match le::u32_at(b, e + v6::BLOB_CI_COMPRESSOR) {
        1 => lz4_flex::block::decompress(stored, usize_).unwrap(),
        3 => zstd::bulk::decompress(stored, usize_).unwrap(),
        other => panic!("CI compressor {other}"),
    }
}

fn v6_target(img: &Img, paths: &[String], file_chunk: usize) -> Option<Target> {
    let b = &img.boot;
    let compressor = le::u32_at(b, v6::blob_entry(b, 0) + v6::BLOB_COMPRESSION_ALGO);
    let blob = img.read_blob();
    let ci = v6_ci_array(b, &blob);
    for path in paths {
        let nid = v6::nid(b, path);
        let size = v6::inode(b, nid).size;
        if size <= file_chunk as u64 * v6::chunk_size(b) {
            continue;
        }
        let index = v6::chunk_index(b, nid, file_chunk);
        assert_eq!(index.blob_index, 0);
        let e = v6::ci_v1(&ci[index.ci_index as usize * 16..index.ci_index as usize * 16 + 16]);
        // V1 entries say "compressed" by having different sizes.
        let compressed = e.compressed_size != e.uncompressed_size;
        if compressor != 0 && !compressed {
            continue;
        }
        let (coff, csize) = (e.compressed_offset as usize, e.compressed_size as usize);
        if let Some(k) = literal_byte(compressor, compressed, &blob[coff..coff + csize]) {
            return Some(Target {
                path: path.clone(),
                ino: nid,
                blob_id: v6::blob_id(b, 0),
                chunk: index.ci_index,
                file_chunk,
                flip_at: coff + k,
            });
        }
    }
    None
}

/// Flip one byte of `t`'s chunk in a private copy of the blob, then show every reader refuses the file:
/// the library read (digest checked), `check` (library and binary) naming path, blob, chunk and digest,
/// and `unpack` (CRC checked without --validate, digest with it) failing without writing any wrong byte.
fn assert_flipped_chunk_detected(img: &Img, t: &Target) {
    let original = file_content(&pristine(img.case), t.ino).unwrap();
    let mut blob = img.read_blob();
    blob[t.flip_at] ^= 0x5a;
    img.write_blob(&blob);

    let chunk_size = img.opened(true).info().chunk_size as u64;
    let file_offset = t.file_chunk as u64 * chunk_size;
    let names_chunk = format!("blob {} chunk {}", t.blob_id, t.chunk);
    let at = format!("inode {} at file offset {file_offset}", t.ino);
    let digest = ["digest", "does not match the recorded"];

    // Library read with validation: the digest names the damage.
    let image = img.opened(true);
    let mut buf = vec![0u8; chunk_size as usize];
    let msg = expect_integrity(
        image.read(t.ino, file_offset, &mut buf),
        &[&at, &names_chunk],
    );
    assert_mentions(&msg, &digest);
    // Without validation the recorded CRC32C still catches it.
    let unvalidated = img.opened(false);
    expect_integrity(
        unvalidated.read(t.ino, file_offset, &mut buf),
        &[&names_chunk, "CRC32C"],
    );

    // check, through the library and the binary.
    let line = format!("{}: integrity check failed: ", t.path);
    assert_some_line(
        &check_errors(&image),
        &[&line, &names_chunk, digest[0], digest[1]],
    );
    let run = img.run_check();
    assert_clean_failure(
        &run,
        &[
            &format!("error: {line}"),
            &names_chunk,
            digest[0],
            digest[1],
        ],
    );

    // unpack through the library without validation (CRC) ...
    let out = img.scratch("unpacked");
    let e = rafsd::unpack::unpack(&unvalidated, &out).expect_err("unpack fails");
    assert!(matches!(e, Error::Integrity(_)), "{e:?}");
    assert_mentions(&e.to_string(), &[&t.path, &names_chunk, "CRC32C"]);
    // ... and what it wrote of the file is a correct prefix: no wrong byte reached the disk.
    let written = fs::read(out.join(&t.path)).unwrap_or_default();
    assert!(
        written.len() < original.len() && original.starts_with(&written),
        "unpack wrote wrong bytes"
    );
    assert!(
        written.len() as u64 <= file_offset,
        "unpack wrote past the last good chunk"
    );
    // ... and the binary with --validate (digest).
    let (run, out) = img.run_unpack(&["--validate"]);
    assert_clean_failure(
        &run,
        &["rafsd: ", &t.path, &names_chunk, digest[0], digest[1]],
    );
    let written = fs::read(out.join(&t.path)).unwrap_or_default();
    assert!(
        written.len() < original.len() && original.starts_with(&written),
        "unpack --validate wrote wrong bytes"
    );
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn flipped_bytes_in_an_uncompressed_v5_chunk() {
    let img = Img::new("v5-none-aligned");
    // The second 1 MiB chunk of a 1 MiB + 1 byte file: unpack writes the first chunk, then must stop.
    let t = v5_target(&img, &["special/tail-unaligned".into()], 1).unwrap();
    assert_flipped_chunk_detected(&img, &t);
}

#[test]
fn flipped_bytes_in_an_lz4_v5_chunk() {
    let img = Img::new("v5-lz4-blake3-repeatable");
    let files = v5::files_in(&img.boot, "etc");
    let t = v5_target(&img, &files, 0).expect("an lz4-compressed chunk in etc/");
    assert_flipped_chunk_detected(&img, &t);
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn flipped_bytes_in_a_zstd_v5_chunk() {
    let img = Img::new("v5-zstd-sha256-128k");
    let mut files = v5::files_in(&img.boot, "etc");
    files.extend(v5::files_in(&img.boot, "special"));
    let t = v5_target(&img, &files, 0).expect("a zstd chunk with raw literals");
    assert_flipped_chunk_detected(&img, &t);
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn flipped_bytes_in_an_uncompressed_v6_chunk() {
    let img = Img::new("v6-none-blake3-4k");
    let t = v6_target(&img, &["special/tail-unaligned".into()], 1).unwrap();
    assert_flipped_chunk_detected(&img, &t);
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn flipped_bytes_in_an_lz4_v6_chunk() {
    let img = Img::new("v6-lz4-sha256-64k");
    let files = v6::files_in(&img.boot, "etc");
    let t = v6_target(&img, &files, 0).expect("an lz4-compressed chunk in etc/");
    assert_flipped_chunk_detected(&img, &t);
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn flipped_bytes_in_a_zstd_v6_chunk() {
    let img = Img::new("v6-zstd-blake3");
    let mut files = v6::files_in(&img.boot, "etc");
    files.extend(v6::files_in(&img.boot, "special"));
    let t = v6_target(&img, &files, 0).expect("a zstd chunk with raw literals");
    assert_flipped_chunk_detected(&img, &t);
}

// ------------------------------------------------------------------------------------------------------
// Chunks that decompress to the wrong size.

#[test]
fn v5_chunk_with_wrong_uncompressed_size() {
    // (case, change of the chunk's uncompressed size, what the codec says when the metadata is consistent)
    let cases = [
        (
            "v5-lz4-blake3-repeatable",
            1i64,
            "lz4_block data decompressed to {size} bytes, expected {wrong}",
        ),
        (
            "v5-lz4-blake3-repeatable",
            -1,
            "lz4_block data does not decompress",
        ),
        (
            "v5-zstd-sha256-128k",
            -1,
            "zstd data decompresses past the expected {wrong} bytes",
        ),
        (
            "v5-zstd-sha256-128k",
            1,
            "zstd data decompressed to {size} bytes, expected {wrong}",
        ),
    ];
    for (case, delta, codec_says) in cases {
        let img = Img::new(case);
        let files = v5::files_in(&img.boot, "etc");
        let t = v5_target(&img, &files, 0).unwrap();
        let rec = v5::find(&img.boot, &t.path);
        assert_eq!(rec.child_count, 1, "{}: a single-chunk file", t.path);
        let c = v5::chunk_record(&img.boot, &rec, 0);
        let size = le::u32_at(&img.boot, c + v5::C_UNCOMPRESSED_SIZE);
        let wrong = (size as i64 + delta) as u32;
        let names_chunk = format!("blob {} chunk {}", t.blob_id, t.chunk);

        // Only the chunk record's uncompressed_size changed: it no longer matches what the file needs.
        let mut bad = Img::new(case);
        le::put_u32(&mut bad.boot, c + v5::C_UNCOMPRESSED_SIZE, wrong);
        bad.save();
        let image = bad.opened(false);
        let mut buf = vec![0u8; 1 << 20];
        expect_corrupt(
            image.read(t.ino, 0, &mut buf),
            &[
                &format!("chunks of inode {}: chunk 0 holds {wrong} bytes", t.ino),
                &format!("the file needs {size}"),
            ],
        );
        let run = bad.run_check();
        assert_clean_failure(
            &run,
            &[
                &format!("error: {}: ", t.path),
                &format!("chunk 0 holds {wrong} bytes"),
            ],
        );

        // The record and i_size agree on the wrong size, so only the codec can tell: the stored chunk
        // decompresses to `size` bytes, not `wrong`.
        let mut forged = Img::new(case);
        le::put_u32(&mut forged.boot, c + v5::C_UNCOMPRESSED_SIZE, wrong);
        le::put_u64(&mut forged.boot, rec.off + v5::I_SIZE, wrong as u64);
        forged.save();
        let image = forged.opened(false);
        let msg = expect_integrity(
            image.read(t.ino, 0, &mut buf),
            &[&format!("inode {} at file offset 0", t.ino), &names_chunk],
        );
        let codec_says = codec_says
            .replace("{size}", &size.to_string())
            .replace("{wrong}", &wrong.to_string());
        assert_mentions(&msg, &[&format!("chunk {}: {codec_says}", t.chunk)]);
        assert_eq!(
            msg.matches("integrity check failed").count(),
            1,
            "one prefix: {msg}"
        );
        let run = forged.run_check();
        assert_clean_failure(
            &run,
            &[
                &format!("error: {}: integrity check failed: ", t.path),
                &names_chunk,
            ],
        );
    }
}

#[test]
fn v6_chunk_table_row_with_wrong_uncompressed_size() {
    let mut img = Img::new("v6-zstd-blake3");
    let nid = v6::nid(&img.boot, "etc/adduser.conf");
    let index = v6::chunk_index(&img.boot, nid, 0);
    let row = v6::chunk_row(&img.boot, index.blob_index, index.ci_index);
    let size = le::u32_at(&img.boot, row + v6::ROW_UNCOMPRESSED_SIZE);
    le::put_u32(&mut img.boot, row + v6::ROW_UNCOMPRESSED_SIZE, size + 1);
    img.save();
    let image = img.opened(true);
    let mut buf = vec![0u8; 4096];
    let blob = v6::blob_id(&img.boot, 0);
    expect_corrupt(
        image.read(nid, 0, &mut buf),
        &[
            &format!("blob {blob} chunk {}", index.ci_index),
            &format!("chunk table says {} bytes", size + 1),
        ],
    );
    let run = img.run_check();
    assert_clean_failure(&run, &["error: etc/adduser.conf: ", "chunk table says"]);
}

#[test]
fn v6_ci_entry_with_wrong_uncompressed_size() {
    // The none image stores its CI array raw, so the entry can be patched in place in the blob.
    let img = Img::new("v6-none-blake3-4k");
    let b = &img.boot;
    let nid = v6::nid(b, "special/owned");
    let size = v6::inode(b, nid).size as u32;
    let index = v6::chunk_index(b, nid, 0);
    let e = v6::blob_entry(b, 0);
    assert_eq!(le::u32_at(b, e + v6::BLOB_CI_COMPRESSOR), 0);
    let ci_at = le::u64_at(b, e + v6::BLOB_CI_OFFSET) as usize + 16 * index.ci_index as usize;
    let mut blob = img.read_blob();
    assert_eq!(v6::ci_v1(&blob[ci_at..ci_at + 16]).uncompressed_size, size);
    v6::set_ci_v1_uncompressed_size(&mut blob[ci_at..ci_at + 16], size + 1);
    img.write_blob(&blob);

    // Only the CI entry changed: it disagrees with the chunk table.
    let image = img.opened(true);
    let mut buf = vec![0u8; 4096];
    expect_corrupt(
        image.read(nid, 0, &mut buf),
        &[&format!("chunk {}", index.ci_index), "blob meta says"],
    );

    // CI entry, chunk table row and i_size all agree on size + 1 bytes, but the stored chunk holds `size`
    // bytes (V1 then calls it compressed, since its two sizes differ): the codec reports the mismatch.
    let mut img2 = Img::new("v6-none-blake3-4k");
    img2.write_blob(&blob);
    let row = v6::chunk_row(&img2.boot, 0, index.ci_index);
    le::put_u32(&mut img2.boot, row + v6::ROW_UNCOMPRESSED_SIZE, size + 1);
    let ino = v6::inode(&img2.boot, nid);
    if ino.extended {
        le::put_u64(&mut img2.boot, ino.off + v6::I_SIZE, size as u64 + 1);
    } else {
        le::put_u32(&mut img2.boot, ino.off + v6::I_SIZE, size + 1);
    }
    img2.save();
    let image = img2.opened(true);
    expect_integrity(
        image.read(nid, 0, &mut buf),
        &[
            &format!("chunk {}", index.ci_index),
            &format!("decompressed to {size} bytes, expected {}", size + 1),
        ],
    );
    let run = img2.run_check();
    assert_clean_failure(&run, &["error: special/owned: ", "decompressed to"]);
}
