//! The image builder: the reference fixture's tree, rebuilt by `rafsd::builder`, must read back exactly as
//! `manifest.tsv` describes it (through `unpack`, through `check` with validation, and for v6 through the
//! kernel's EROFS driver), for every format version, compressor, digester and a range of chunk sizes;
//! from a directory, a tar and a tar.gz; on a parent layer and merged, against a real overlayfs mount.

use kit::built::pseudo_random;
use kit::manifest;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use rafsd::builder::{self, BuildOptions, BuildReport, WhiteoutSpec};
use rafsd::format::{Compressor, Digester};
use rafsd::{check, ImageOptions, RafsImage};

const ENTRIES: u64 = 3405;
const FILES: u64 = 3200;
const BYTES: u64 = 12_196_193;

/// The fixture source tree (what `rafsd unpack` of any fixture produces), unpacked once per run.
fn source_tree() -> &'static Path {
    static SRC: OnceLock<PathBuf> = OnceLock::new();
    SRC.get_or_init(|| {
        manifest::assert_root(
            "building from a tree with device nodes, owners and trusted.* xattrs",
        );
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("builder-source");
        let _ = fs::remove_dir_all(&dir);
        let case = "v6-zstd-blake3";
        let image = RafsImage::open_local(
            &manifest::case_bootstrap(case),
            Some(&manifest::case_blob_dir(case)),
            ImageOptions::default(),
        )
        .expect("open fixture");
        let tree = dir.join("tree");
        rafsd::unpack::unpack(&image, &tree).expect("unpack fixture");
        tree
    })
}

fn opts(
    fs_version: u32,
    compressor: Compressor,
    digester: Digester,
    chunk_size: u32,
) -> BuildOptions {
    BuildOptions {
        fs_version,
        compressor,
        digester,
        chunk_size,
        ..BuildOptions::default()
    }
}

struct Built {
    _dir: tempfile::TempDir,
    bootstrap: PathBuf,
    blob_dir: PathBuf,
    report: BuildReport,
}

fn build(source: &Path, o: &BuildOptions) -> Built {
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = dir.path().join("bootstrap");
    let blob_dir = dir.path().join("blobs");
    let report = builder::build(source, Some(&bootstrap), &blob_dir, o)
        .unwrap_or_else(|e| panic!("build {}: {e}", source.display()));
    Built {
        _dir: dir,
        bootstrap,
        blob_dir,
        report,
    }
}

fn open(bootstrap: &Path, blob_dir: &Path, validate: bool) -> RafsImage {
    RafsImage::open_local(
        bootstrap,
        Some(blob_dir),
        ImageOptions {
            validate,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", bootstrap.display()))
}

fn root_mtime_only() -> manifest::Allowances {
    manifest::Allowances {
        skip_root_mtime: true,
        owner_is_reader: false,
    }
}

/// Unpack the image and compare it with the manifest; check it with digest validation.
fn assert_reads_back(what: &str, bootstrap: &Path, blob_dir: &Path, allow: manifest::Allowances) {
    let image = open(bootstrap, blob_dir, true);
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("tree");
    let stats =
        rafsd::unpack::unpack(&image, &dest).unwrap_or_else(|e| panic!("{what}: unpack: {e}"));
    assert_eq!(stats.entries, ENTRIES, "{what}: entries");
    let problems = manifest::compare_tree(&dest, allow);
    assert!(
        problems.is_empty(),
        "{what}: {} mismatches, first: {:#?}",
        problems.len(),
        &problems[..problems.len().min(10)]
    );
    let report = check::check(&image, 10).unwrap();
    assert!(
        report.errors.is_empty(),
        "{what}: check: {:?}",
        report.errors
    );
    assert_eq!(
        (report.entries, report.files, report.bytes),
        (ENTRIES, FILES, BYTES),
        "{what}: check totals"
    );
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn v6_from_a_directory_reads_back_as_the_manifest() {
    let built = build(source_tree(), &BuildOptions::default());
    assert_reads_back(
        "v6 default",
        &built.bootstrap,
        &built.blob_dir,
        root_mtime_only(),
    );
    let image = open(&built.bootstrap, &built.blob_dir, false);
    let info = image.info();
    assert_eq!(info.version, 6);
    assert_eq!(info.blobs.len(), 1);
    let blob = &info.blobs[0];
    assert_eq!(Some(&blob.id), built.report.blob_id.as_ref());
    // The blob is named by its sha256.
    let bytes = fs::read(built.blob_dir.join(&blob.id)).unwrap();
    assert_eq!(
        rafsd::storage::digest::hex(&rafsd::storage::digest::digest(Digester::Sha256, &bytes)),
        blob.id
    );
    // Dedup within the layer: special/random-copy repeats special/random-2m5, the 64 KiB blocks repeat.
    assert!(
        built.report.chunks.chunks_deduped >= 2,
        "{:?}",
        built.report.chunks
    );
    // Every chunk carries a CRC32C in the chunk table.
    let special = image.lookup(image.root_ino(), b"special").unwrap().unwrap();
    let file = image.lookup(special, b"random-2m5").unwrap().unwrap();
    for info in image.file_chunks(file).unwrap() {
        assert!(info.crc32.is_some() && info.digest.is_some(), "{info:?}");
    }
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn v6_bootstrap_mounts_with_the_kernel_erofs_driver() {
    manifest::assert_root("mounting EROFS");
    require_erofs();
    for compressor in [Compressor::None, Compressor::Zstd] {
        let built = build(
            source_tree(),
            &BuildOptions {
                compressor,
                ..BuildOptions::default()
            },
        );
        let image = open(&built.bootstrap, &built.blob_dir, true);
        // The kernel reads uncompressed blob bytes at blkaddr * 4096: lay every chunk out that way.
        let data = built._dir.path().join("blob.data");
        write_blob_data(&image, 0, &built.blob_dir, &data);
        let mnt = built._dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let mount = ErofsMount::new(&built.bootstrap, &[data], &mnt);
        let problems = manifest::compare_tree(&mnt, root_mtime_only());
        drop(mount);
        assert!(
            problems.is_empty(),
            "{compressor:?}: kernel mount: {} mismatches, first: {:#?}",
            problems.len(),
            &problems[..problems.len().min(10)]
        );
    }
}

/// The kernel's EROFS driver, loaded if it is a module; a kernel without one fails the test.
fn require_erofs() {
    let listed = || {
        fs::read_to_string("/proc/filesystems")
            .unwrap_or_default()
            .contains("erofs")
    };
    if !listed() {
        let _ = Command::new("modprobe").arg("erofs").status();
    }
    assert!(
        listed(),
        "this kernel has no EROFS driver (modprobe erofs failed)"
    );
}

/// A `.blob.data`-style file: each chunk's uncompressed bytes at its uncompressed offset.
fn write_blob_data(image: &RafsImage, blob_index: u32, blob_dir: &Path, out: &Path) {
    let blob = &image.info().blobs[blob_index as usize];
    let src = File::open(blob_dir.join(&blob.id)).unwrap();
    let dst = File::create(out).unwrap();
    let arr = image.chunk_info_array(blob_index).unwrap();
    for i in 0..arr.len() {
        let c = arr.get(i).unwrap();
        let mut stored = vec![0u8; c.compressed_size as usize];
        src.read_exact_at(&mut stored, c.compressed_offset).unwrap();
        let bytes = if c.compressed {
            rafsd::storage::compress::decompress(
                blob.compressor,
                &stored,
                c.uncompressed_size as usize,
            )
            .unwrap()
        } else {
            stored
        };
        dst.write_all_at(&bytes, c.uncompressed_offset).unwrap();
    }
    dst.set_len(blob.uncompressed_size).unwrap();
}

/// A read-only EROFS mount of a bootstrap with its blob devices, unmounted on drop. File-backed
/// mounts (Linux 6.12+) first; loop devices otherwise.
struct ErofsMount {
    mnt: PathBuf,
    loops: Vec<String>,
}

impl ErofsMount {
    fn new(bootstrap: &Path, devices: &[PathBuf], mnt: &Path) -> Self {
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();
        let opts: Vec<String> = devices
            .iter()
            .map(|d| format!("device={}", d.display()))
            .collect();
        let data = CString::new(opts.join(",")).unwrap();
        let fstype = CString::new("erofs").unwrap();
        // SAFETY: valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c(bootstrap).as_ptr(),
                c(mnt).as_ptr(),
                fstype.as_ptr(),
                libc::MS_RDONLY,
                data.as_ptr().cast(),
            )
        };
        if rc == 0 {
            return ErofsMount {
                mnt: mnt.to_path_buf(),
                loops: Vec::new(),
            };
        }
        let direct = std::io::Error::last_os_error();
        let mut loops = Vec::new();
        for d in devices.iter().map(|d| d.as_path()).chain([bootstrap]) {
            let out = Command::new("losetup")
                .args(["-f", "--show", "-r"])
                .arg(d)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "losetup {}: {}",
                d.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            loops.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        let primary = loops.last().unwrap().clone();
        let opts: Vec<String> = loops[..loops.len() - 1]
            .iter()
            .map(|l| format!("device={l}"))
            .collect();
        let out = Command::new("mount")
            .args(["-t", "erofs", "-o"])
            .arg(format!("ro,{}", opts.join(",")))
            .arg(&primary)
            .arg(mnt)
            .output()
            .unwrap();
        let mount = ErofsMount {
            mnt: mnt.to_path_buf(),
            loops,
        };
        assert!(
            out.status.success(),
            "mount erofs (file-backed: {direct}; loop: {})",
            String::from_utf8_lossy(&out.stderr)
        );
        mount
    }
}

impl Drop for ErofsMount {
    fn drop(&mut self) {
        let c = CString::new(self.mnt.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        for l in &self.loops {
            let _ = Command::new("losetup").arg("-d").arg(l).status();
        }
    }
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn every_version_compressor_and_digester_reads_back() {
    let mut cases = Vec::new();
    for fs_version in [5, 6] {
        for compressor in [Compressor::None, Compressor::Lz4Block, Compressor::Zstd] {
            for digester in [Digester::Blake3, Digester::Sha256] {
                cases.push(opts(fs_version, compressor, digester, 0x10_0000));
            }
        }
    }
    // Smaller chunks: many more chunks, CI entries and chunk records per file.
    cases.push(opts(6, Compressor::None, Digester::Blake3, 0x1000));
    cases.push(opts(5, Compressor::Zstd, Digester::Sha256, 0x1000));
    cases.push(opts(6, Compressor::Lz4Block, Digester::Sha256, 0x10000));
    cases.push(opts(5, Compressor::Lz4Block, Digester::Blake3, 0x10000));
    cases.push(opts(6, Compressor::Zstd, Digester::Blake3, 0x100_0000));
    for o in cases {
        let what = format!(
            "v{} {} {} {:#x}",
            o.fs_version,
            o.compressor.name(),
            o.digester.name(),
            o.chunk_size
        );
        let built = build(source_tree(), &o);
        assert_reads_back(&what, &built.bootstrap, &built.blob_dir, root_mtime_only());
        let info = open(&built.bootstrap, &built.blob_dir, false)
            .info()
            .clone();
        assert_eq!(
            (
                info.version,
                info.compressor,
                info.digester,
                info.chunk_size
            ),
            (o.fs_version, o.compressor, o.digester, o.chunk_size),
            "{what}"
        );
    }
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn builds_are_reproducible_whatever_the_thread_count() {
    let one = build(
        source_tree(),
        &BuildOptions {
            threads: 1,
            ..BuildOptions::default()
        },
    );
    let many = build(
        source_tree(),
        &BuildOptions {
            threads: 3,
            ..BuildOptions::default()
        },
    );
    assert_eq!(one.report.blob_id, many.report.blob_id);
    assert_eq!(
        fs::read(&one.bootstrap).unwrap(),
        fs::read(&many.bootstrap).unwrap()
    );
    // --repeatable drops owners: readers then show their own uid/gid.
    let rep = build(
        source_tree(),
        &BuildOptions {
            repeatable: true,
            fs_version: 5,
            ..BuildOptions::default()
        },
    );
    let info = open(&rep.bootstrap, &rep.blob_dir, false).info().clone();
    assert!(!info.explicit_uid_gid());
    let allow = manifest::Allowances {
        skip_root_mtime: true,
        owner_is_reader: true,
    };
    assert_reads_back("v5 repeatable", &rep.bootstrap, &rep.blob_dir, allow);
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn v5_hard_links_share_the_first_names_inode_number() {
    let built = build(
        source_tree(),
        &opts(5, Compressor::Lz4Block, Digester::Blake3, 0x10_0000),
    );
    let image = open(&built.bootstrap, &built.blob_dir, false);
    let special = image.lookup(image.root_ino(), b"special").unwrap().unwrap();
    let mut by_ino: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    image
        .read_dir(special, 0, &mut |e| {
            by_ino.entry(e.ino).or_default().push(e.name);
            Ok(true)
        })
        .unwrap();
    let shared: Vec<_> = by_ino.iter().filter(|(_, names)| names.len() > 1).collect();
    assert_eq!(
        shared.len(),
        1,
        "one hard-linked pair in special/: {shared:?}"
    );
    let (&ino, _) = shared[0];
    assert_eq!(image.inode(ino).unwrap().nlink, 2);
    // Children of a directory have consecutive inode numbers (except the hard link's second name).
    let mut inos: Vec<u64> = by_ino.keys().copied().collect();
    inos.sort();
    assert!(
        inos.windows(2).filter(|w| w[1] != w[0] + 1).count() <= 1,
        "{inos:?}"
    );
}

// ---------------------------------------------------------------------------------------------------
// tar and tar.gz sources

fn gnu_tar(src: &Path, out: &Path, gzip: bool) {
    let mut cmd = Command::new("tar");
    cmd.args([
        "--format=posix",
        "--xattrs",
        "--xattrs-include=*",
        "--numeric-owner",
        "-C",
    ])
    .arg(src);
    cmd.arg(if gzip { "-czf" } else { "-cf" }).arg(out).arg(".");
    let out = cmd.output().expect("run GNU tar");
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn tar_and_tar_gz_layers_read_back_as_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    for (gzip, name) in [(false, "layer.tar"), (true, "layer.tar.gz")] {
        let tar = dir.path().join(name);
        gnu_tar(source_tree(), &tar, gzip);
        for fs_version in [6, 5] {
            let built = build(
                &tar,
                &opts(fs_version, Compressor::Zstd, Digester::Sha256, 0x10_0000),
            );
            assert_reads_back(
                &format!("{name} v{fs_version}"),
                &built.bootstrap,
                &built.blob_dir,
                root_mtime_only(),
            );
        }
    }
}

fn tar_entry(builder: &mut tar::Builder<Vec<u8>>, path: &[u8], data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mtime(1_700_000_000);
    builder
        .append_data(&mut h, std::ffi::OsStr::from_bytes(path), data)
        .unwrap();
}

fn build_err(source: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = dir.path().join("bootstrap");
    let blobs = dir.path().join("blobs");
    let err = builder::build(source, Some(&bootstrap), &blobs, &BuildOptions::default())
        .expect_err("the build must fail")
        .to_string();
    // A failed build leaves neither a bootstrap nor a blob (nor a temporary file) behind.
    assert!(!bootstrap.exists(), "{err}");
    let left: Vec<_> = fs::read_dir(&blobs)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{err}: left {left:?}");
    err
}

/// A GNU base-256 number field (what GNU tar writes for values too large for octal).
fn base256(value: u64) -> [u8; 12] {
    let mut field = [0u8; 12];
    field[4..].copy_from_slice(&value.to_be_bytes());
    field[0] = 0x80;
    field
}

/// `work()`'s result, or a failure once `limit` has passed (a hostile input must fail quickly, not
/// keep the test running for days).
fn within<T: Send + 'static>(limit: Duration, work: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("no result within {limit:?}"))
}

#[test]
fn broken_or_hostile_tars_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        fs::write(&p, bytes).unwrap();
        p
    };
    let good = {
        let mut b = tar::Builder::new(Vec::new());
        tar_entry(&mut b, b"dir/a", &vec![7u8; 300_000]);
        tar_entry(&mut b, b"dir/b", b"hello");
        b.into_inner().unwrap()
    };
    // The well-formed archive builds; parents missing from the tar are created.
    let ok = write("good.tar", &good);
    let built = build(&ok, &BuildOptions::default());
    let image = open(&built.bootstrap, &built.blob_dir, true);
    let d = image.lookup(image.root_ino(), b"dir").unwrap().unwrap();
    assert!(image.inode(d).unwrap().is_dir());

    let cut_in_data = write("cut.tar", &good[..100_000]);
    assert!(
        build_err(&cut_in_data).contains("data ends at"),
        "{}",
        build_err(&cut_in_data)
    );
    // Cut exactly after the last entry's data: no end-of-archive blocks.
    let last_end = good.len() - 1024;
    let cut_at_end = write("noend.tar", &good[..last_end]);
    assert!(
        build_err(&cut_at_end).contains("end-of-archive"),
        "{}",
        build_err(&cut_at_end)
    );
    let garbage = write("garbage.tar", &[0x5a; 4096]);
    assert!(
        build_err(&garbage).contains("broken tar"),
        "{}",
        build_err(&garbage)
    );

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&good).unwrap();
    let gz = gz.finish().unwrap();
    let cut_gz = write("cut.tar.gz", &gz[..gz.len() / 2]);
    let err = build_err(&cut_gz);
    assert!(err.contains("tar") || err.contains("data ends"), "{err}");

    let long = {
        let mut b = tar::Builder::new(Vec::new());
        let name = [b"d/".as_slice(), &[b'n'; 300]].concat();
        tar_entry(&mut b, &name, b"x");
        b.into_inner().unwrap()
    };
    let long = write("long.tar", &long);
    assert!(
        build_err(&long).contains("over the 255-byte limit"),
        "{}",
        build_err(&long)
    );

    let escape = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_entry_type(tar::EntryType::Regular);
        // Written by hand: the tar crate refuses ".." itself.
        h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        b.into_inner().unwrap()
    };
    let escape = write("escape.tar", &escape);
    assert!(
        build_err(&escape).contains("\"..\""),
        "{}",
        build_err(&escape)
    );

    // A GNU sparse entry claiming 2^50 bytes of holes: the tar crate would expand them with zeros for
    // the chunker to read, hash and compress. Refused before any data is read.
    let sparse = {
        let claimed: u64 = 1 << 50;
        let mut h = tar::Header::new_gnu();
        h.set_path("sparse").unwrap();
        h.set_mode(0o644);
        h.set_size(512);
        h.set_entry_type(tar::EntryType::GNUSparse);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.sparse[0].offset = base256(claimed - 512);
        gnu.sparse[0].numbytes = base256(512);
        gnu.realsize = base256(claimed);
        h.set_cksum();
        [h.as_bytes().as_slice(), &[b'x'; 512], &[0; 1024]].concat()
    };
    let sparse = write("sparse.tar", &sparse);
    let err = within(Duration::from_secs(20), move || build_err(&sparse));
    assert!(err.contains("unsupported entry type 'S'"), "{err}");

    // A path past PATH_MAX (4096 bytes) of names each within 255: each level cost the tree, the
    // merge and the bootstrap walk a copy of the whole path (a 1 MB tar 4000 levels deep took 4 GB).
    let too_deep = {
        let mut b = tar::Builder::new(Vec::new());
        let path = [[b'd'; 200].as_slice(), b"/"].concat().repeat(21);
        tar_entry(&mut b, &[path.as_slice(), b"f"].concat(), b"x");
        b.into_inner().unwrap()
    };
    let too_deep = write("too_deep.tar", &too_deep);
    let err = build_err(&too_deep);
    assert!(err.contains("over the 4096-byte limit"), "{err}");

    let dangling = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        b.append_link(&mut h, "link", "missing").unwrap();
        b.into_inner().unwrap()
    };
    let dangling = write("dangling.tar", &dangling);
    assert!(
        build_err(&dangling).contains("not earlier in the tar"),
        "{}",
        build_err(&dangling)
    );
}

/// Run `rafsd` with `args` and at most `limit` bytes of address space (allocations past it fail and
/// abort it): (success, stderr). The limit, not a measured peak: a child's ru_maxrss counts its
/// parent's, the test process, whose memory depends on the tests beside it.
fn rafsd_within_memory(args: &[&std::ffi::OsStr], limit: u64) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rafsd"));
    // One malloc arena: each thread's own would reserve 64 MiB of the address space.
    cmd.args(args).env("MALLOC_ARENA_MAX", "1");
    // SAFETY: setrlimit is async-signal-safe and touches nothing of the parent's.
    unsafe {
        cmd.pre_exec(move || {
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &rlimit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_huge_long_name_record_fails_quickly_in_little_memory() {
    // A 64 MiB GNU long name record: the tar crate read it whole (and a 1 GiB one cost 4.7 GB) before
    // the 255-byte name check could refuse it.
    let dir = tempfile::tempdir().unwrap();
    let record: u64 = 64 << 20;
    let mut h = tar::Header::new_gnu();
    h.set_path("././@LongLink").unwrap();
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_size(record);
    h.set_cksum();
    let tar = dir.path().join("longname.tar");
    {
        let mut out = std::io::BufWriter::new(File::create(&tar).unwrap());
        out.write_all(h.as_bytes()).unwrap();
        let block = vec![b'a'; 1 << 20];
        for _ in 0..record >> 20 {
            out.write_all(&block).unwrap();
        }
        let mut b = tar::Builder::new(Vec::new());
        tar_entry(&mut b, b"f", b"x");
        out.write_all(&b.into_inner().unwrap()).unwrap();
    }
    let (boot, blobs) = (dir.path().join("b"), dir.path().join("blobs"));
    // 256 MiB: two threads' stacks and arenas fit; the old reading took 317 MB of RSS.
    let (ok, stderr) = rafsd_within_memory(
        &[
            "build".as_ref(),
            tar.as_os_str(),
            "--bootstrap".as_ref(),
            boot.as_os_str(),
            "--blob-dir".as_ref(),
            blobs.as_os_str(),
            "--threads".as_ref(),
            "2".as_ref(),
        ],
        256 << 20,
    );
    // Only the message's end: the old one held the whole name.
    let tail = &stderr[stderr.len().saturating_sub(300)..];
    assert!(!ok && stderr.contains("too long"), "{tail}");
}

#[test]
fn a_name_replaced_many_times_in_a_large_directory_builds_quickly() {
    // Each later entry of a name replaces the earlier one: a scan of the whole directory per
    // replacement made 60000 replacements in a directory of 30000 about 2*10^9 steps (13 s); these
    // would be about 23 s (estimated), and take about 2 s (the bound leaves room for a loaded machine).
    let (names, replacements) = (40000, 80000);
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..names {
        tar_entry(&mut b, format!("d/{i:08}").as_bytes(), b"");
    }
    for _ in 0..replacements {
        tar_entry(&mut b, b"d/00000000", b"");
    }
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("many.tar");
    fs::write(&tar, b.into_inner().unwrap()).unwrap();
    let built = within(Duration::from_secs(12), move || {
        build(&tar, &BuildOptions::default())
    });
    // The root, d and its names: the replaced entries are gone.
    assert_eq!(built.report.entries, names + 2);
}

#[test]
fn a_tree_as_deep_as_tar_paths_allow_merges_in_little_memory() {
    // 2047 directories "a" and a file: a path of 4095 bytes, within the limit.
    let dir = tempfile::tempdir().unwrap();
    let depth = 2047;
    let mut b = tar::Builder::new(Vec::new());
    tar_entry(&mut b, &[b"a/".repeat(depth), b"f".to_vec()].concat(), b"x");
    let tar = dir.path().join("deep.tar");
    fs::write(&tar, b.into_inner().unwrap()).unwrap();
    let built = build(&tar, &BuildOptions::default());
    let merged = dir.path().join("merged");
    let (ok, stderr) = rafsd_within_memory(
        &[
            "merge".as_ref(),
            built.bootstrap.as_os_str(),
            "--bootstrap".as_ref(),
            merged.as_os_str(),
        ],
        256 << 20,
    );
    assert!(ok, "{stderr}");
    let image = open(&merged, &built.blob_dir, false);
    let mut deepest = 0;
    image
        .walk(&mut |path, _, _| {
            deepest = deepest.max(path.as_os_str().len());
            Ok(())
        })
        .unwrap();
    assert_eq!(deepest, 2 * depth + 1);
}

// ---------------------------------------------------------------------------------------------------
// Layers: whiteouts, --parent-bootstrap and merge, with a real overlayfs mount as the truth

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn put(path: &Path, data: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
}

fn mknod(path: &Path, mode: u32, major: u32, minor: u32) {
    // SAFETY: valid path.
    let rc = unsafe { libc::mknod(cstr(path).as_ptr(), mode, libc::makedev(major, minor)) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn setxattr(path: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid strings and buffer.
    let rc = unsafe {
        libc::lsetxattr(
            cstr(path).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Give every entry below `root` (and root) a fixed mtime, children before parents.
fn settle_times(root: &Path, mtime: i64) {
    let mut all = vec![root.to_path_buf()];
    let mut i = 0;
    while i < all.len() {
        if fs::symlink_metadata(&all[i]).unwrap().is_dir() {
            for e in fs::read_dir(&all[i]).unwrap() {
                all.push(e.unwrap().path());
            }
        }
        i += 1;
    }
    for p in all.iter().rev() {
        let t = libc::timespec {
            tv_sec: mtime,
            tv_nsec: 0,
        };
        // SAFETY: valid path and two timespecs.
        unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                cstr(p).as_ptr(),
                [t, t].as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
    }
}

/// The lower layer, and the upper layer with overlayfs-style whiteouts (char 0:0, opaque xattr).
fn make_layers(base: &Path) -> (PathBuf, PathBuf) {
    let (lower, upper) = (base.join("lower"), base.join("upper"));
    put(&lower.join("a.txt"), b"lower a");
    put(&lower.join("keep.txt"), b"kept from the lower layer");
    put(&lower.join("big.bin"), &pseudo_random(3 << 20, 1));
    put(&lower.join("dir1/x.txt"), b"x");
    put(&lower.join("dir1/y.txt"), b"y is whited out");
    put(&lower.join("dir1/sub/z.txt"), b"lower z");
    put(&lower.join("dir2/p.txt"), b"hidden by an opaque upper dir");
    put(
        &lower.join("gone/q.txt"),
        b"the whole directory is whited out",
    );
    put(
        &lower.join("replace-me"),
        b"a file the upper layer turns into a directory",
    );
    put(
        &lower.join("dir3/inner.txt"),
        b"a directory the upper layer turns into a file",
    );
    put(&lower.join("hl1"), b"hard linked");
    fs::hard_link(lower.join("hl1"), lower.join("hl2")).unwrap();
    std::os::unix::fs::symlink("a.txt", lower.join("link")).unwrap();
    mknod(&lower.join("fifo"), libc::S_IFIFO | 0o644, 0, 0);
    fs::set_permissions(lower.join("keep.txt"), fs::Permissions::from_mode(0o600)).unwrap();

    put(&upper.join("a.txt"), b"upper a replaces lower a");
    // A copy of the parent's big file: its chunks are already stored.
    put(&upper.join("big-copy.bin"), &pseudo_random(3 << 20, 1));
    put(&upper.join("new.txt"), &pseudo_random(10_000, 2));
    put(&upper.join("dir1/new-in-dir1.txt"), b"new");
    mknod(&upper.join("dir1/y.txt"), libc::S_IFCHR, 0, 0);
    put(&upper.join("dir1/sub/z.txt"), b"upper z");
    put(&upper.join("dir2/p2.txt"), b"only entry of the opaque dir");
    setxattr(&upper.join("dir2"), "trusted.overlay.opaque", b"y");
    mknod(&upper.join("gone"), libc::S_IFCHR, 0, 0);
    put(&upper.join("replace-me/inside.txt"), b"now a directory");
    put(&upper.join("dir3"), b"now a file");
    put(&upper.join("attrs"), b"with xattrs");
    setxattr(&upper.join("attrs"), "user.note", b"hello");
    setxattr(&upper.join("attrs"), "trusted.secret", b"root only");
    fs::set_permissions(&upper, fs::Permissions::from_mode(0o750)).unwrap();
    settle_times(&lower, 1_600_000_000);
    settle_times(&upper, 1_700_000_000);
    (lower, upper)
}

/// The same upper layer with OCI whiteouts: `.wh.NAME` files and `.wh..wh..opq` markers.
fn oci_copy(upper: &Path, out: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(upper)
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success());
    for rel in ["dir1/y.txt", "gone"] {
        let p = out.join(rel);
        fs::remove_file(&p).unwrap();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        put(&p.with_file_name(format!(".wh.{name}")), b"");
    }
    let c = cstr(&out.join("dir2"));
    let n = CString::new("trusted.overlay.opaque").unwrap();
    // SAFETY: valid strings.
    assert_eq!(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) }, 0);
    put(&out.join("dir2/.wh..wh..opq"), b"");
    settle_times(out, 1_700_000_000);
}

/// Every entry below `root` as comparable text: type, mode, owner, size, mtime, nlink (files),
/// content hash, symlink target or device, and xattrs other than overlayfs's private ones.
fn describe_tree(root: &Path) -> BTreeMap<String, String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let mut text = format!(
            "mode={:o} uid={} gid={} mtime={}",
            md.mode(),
            md.uid(),
            md.gid(),
            md.mtime()
        );
        if ft.is_file() {
            let data = fs::read(&p).unwrap();
            let sum = rafsd::storage::digest::hex(&rafsd::storage::digest::digest(
                Digester::Sha256,
                &data,
            ));
            text += &format!(" size={} nlink={} sha256={sum}", md.len(), md.nlink());
        } else if ft.is_symlink() {
            text += &format!(" target={}", fs::read_link(&p).unwrap().display());
        } else if ft.is_char_device() || ft.is_block_device() {
            text += &format!(
                " rdev={}:{}",
                libc::major(md.rdev()),
                libc::minor(md.rdev())
            );
        }
        let mut names = vec![0u8; 4096];
        // SAFETY: valid path and buffer.
        let n =
            unsafe { libc::llistxattr(cstr(&p).as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        let mut list: Vec<&[u8]> = names[..n.max(0) as usize]
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .collect();
        list.sort();
        for name in list
            .into_iter()
            .filter(|n| !n.starts_with(b"trusted.overlay."))
        {
            let cn = CString::new(name).unwrap();
            let mut v = vec![0u8; 4096];
            // SAFETY: valid strings and buffer.
            let len = unsafe {
                libc::lgetxattr(
                    cstr(&p).as_ptr(),
                    cn.as_ptr(),
                    v.as_mut_ptr().cast(),
                    v.len(),
                )
            };
            text += &format!(
                " {}={}",
                String::from_utf8_lossy(name),
                rafsd::storage::digest::hex(&v[..len.max(0) as usize])
            );
        }
        out.insert(rel, text);
        if ft.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

/// What overlayfs shows for `upper` on `lower` (read-only, both as lower layers).
fn overlay_truth(lower: &Path, upper: &Path, mnt: &Path) -> BTreeMap<String, String> {
    fs::create_dir_all(mnt).unwrap();
    let opts = format!("ro,lowerdir={}:{}", upper.display(), lower.display());
    let out = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount overlay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = describe_tree(mnt);
    let status = Command::new("umount").arg(mnt).status().unwrap();
    assert!(status.success());
    tree
}

fn unpacked(bootstrap: &Path, blob_dir: &Path) -> (tempfile::TempDir, BTreeMap<String, String>) {
    let image = open(bootstrap, blob_dir, true);
    let report = check::check(&image, 10).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("tree");
    rafsd::unpack::unpack(&image, &dest).unwrap();
    let tree = describe_tree(&dest);
    (out, tree)
}

fn assert_same(what: &str, want: &BTreeMap<String, String>, got: &BTreeMap<String, String>) {
    let mut diffs = Vec::new();
    for (k, v) in want {
        match got.get(k) {
            Some(g) if g == v => {}
            Some(g) => diffs.push(format!("{k:?}: want {v}\n      got  {g}")),
            None => diffs.push(format!("{k:?}: missing")),
        }
    }
    diffs.extend(
        got.keys()
            .filter(|k| !want.contains_key(*k))
            .map(|k| format!("{k:?}: unexpected")),
    );
    assert!(
        diffs.is_empty(),
        "{what}: {} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn upper_layers_match_an_overlayfs_mount() {
    manifest::assert_root("mounting overlayfs and making whiteout devices");
    let dir = tempfile::tempdir().unwrap();
    let (lower, upper) = make_layers(dir.path());
    let upper_oci = dir.path().join("upper-oci");
    oci_copy(&upper, &upper_oci);
    let truth = overlay_truth(&lower, &upper, &dir.path().join("mnt"));
    assert!(
        truth.contains_key("dir2/p2.txt")
            && !truth.contains_key("dir2/p.txt")
            && !truth.contains_key("gone")
    );

    for fs_version in [6, 5] {
        let blobs = dir.path().join(format!("blobs-v{fs_version}"));
        let boot = |name: &str| dir.path().join(format!("{name}-v{fs_version}.boot"));
        let base = BuildOptions {
            fs_version,
            ..BuildOptions::default()
        };
        let lower_report = builder::build(&lower, Some(&boot("lower")), &blobs, &base).unwrap();

        // --parent-bootstrap, both whiteout conventions.
        for (spec, src, name) in [
            (WhiteoutSpec::Overlayfs, &upper, "upper"),
            (WhiteoutSpec::Oci, &upper_oci, "upper-oci"),
        ] {
            let o = BuildOptions {
                parent_bootstrap: Some(boot("lower")),
                whiteout_spec: spec,
                ..base.clone()
            };
            let report = builder::build(src, Some(&boot(name)), &blobs, &o).unwrap();
            let (_keep, got) = unpacked(&boot(name), &blobs);
            assert_same(&format!("v{fs_version} {name} on its parent"), &truth, &got);
            // big-copy.bin repeats the parent's big.bin: only the small new files add data.
            let c = report.chunks;
            eprintln!(
                "v{fs_version} {name}: layer read {} bytes, wrote {} chunks / {} blob bytes (blob file {} bytes), deduplicated {} chunks / {} bytes; parent blob {} bytes",
                c.bytes_read, c.chunks_written, c.bytes_written, report.blob_size, c.chunks_deduped, c.bytes_deduped, lower_report.blob_size
            );
            assert!(c.chunks_deduped >= 3 && c.bytes_deduped >= 3 << 20, "{c:?}");
            assert!(c.bytes_written < 64 << 10, "{c:?}");
            let image = open(&boot(name), &blobs, false);
            assert_eq!(
                image.info().blobs.len(),
                2,
                "the parent's blob is kept, the layer's added"
            );
            // The kernel sees the same stack: chunks address both blob devices.
            if fs_version == 6 {
                require_erofs();
                let mut devices = Vec::new();
                for i in 0..2 {
                    let data = dir.path().join(format!("{name}-blob{i}.data"));
                    write_blob_data(&image, i, &blobs, &data);
                    devices.push(data);
                }
                let mnt = dir.path().join(format!("{name}-erofs"));
                fs::create_dir(&mnt).unwrap();
                let mount = ErofsMount::new(&boot(name), &devices, &mnt);
                let got = describe_tree(&mnt);
                drop(mount);
                assert_same(&format!("{name} through the kernel"), &truth, &got);
            }
        }

        // A standalone upper layer keeps its whiteouts as entries; merge applies them.
        let standalone = BuildOptions {
            whiteout_spec: WhiteoutSpec::Oci,
            ..base.clone()
        };
        builder::build(&upper_oci, Some(&boot("upper-alone")), &blobs, &standalone).unwrap();
        let (_keep, alone) = unpacked(&boot("upper-alone"), &blobs);
        assert!(alone.contains_key(".wh.gone") && alone.contains_key("dir2/.wh..wh..opq"));
        let merged = boot("merged");
        let bin = env!("CARGO_BIN_EXE_rafsd");
        let out = Command::new(bin)
            .arg("merge")
            .arg(boot("lower"))
            .arg(boot("upper-alone"))
            .arg("--bootstrap")
            .arg(&merged)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "merge: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (_keep, got) = unpacked(&merged, &blobs);
        assert_same(&format!("v{fs_version} merged"), &truth, &got);

        // --whiteout-spec none takes whiteouts literally.
        let o = BuildOptions {
            parent_bootstrap: Some(boot("lower")),
            whiteout_spec: WhiteoutSpec::None,
            ..base.clone()
        };
        builder::build(&upper_oci, Some(&boot("literal")), &blobs, &o).unwrap();
        let (_keep, got) = unpacked(&boot("literal"), &blobs);
        assert!(
            got.contains_key(".wh.gone")
                && got.contains_key("gone/q.txt")
                && got.contains_key("dir2/p.txt")
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// Inline metadata, prefetch, the command line, bad input

#[test]
#[ignore = "needs root: ci/test.sh"]
fn inline_meta_blob_is_readable_on_its_own() {
    for compressor in [Compressor::Zstd, Compressor::None] {
        inline_meta_case(compressor);
    }
}

fn inline_meta_case(compressor: Compressor) {
    let dir = tempfile::tempdir().unwrap();
    let blobs = dir.path().join("blobs");
    let copy = dir.path().join("bootstrap");
    let o = BuildOptions {
        blob_inline_meta: true,
        compressor,
        ..BuildOptions::default()
    };
    let report = builder::build(source_tree(), Some(&copy), &blobs, &o).unwrap();
    let blob = report.blob_path.clone().unwrap();
    // The blob alone is the image: its metadata is found through the ToC, its id is its file name.
    assert_reads_back("inline meta blob", &blob, &blobs, root_mtime_only());
    // The standalone copy names the real blob id instead of the placeholder.
    assert_reads_back("inline meta copy", &copy, &blobs, root_mtime_only());
    let image = open(&blob, &blobs, false);
    let info = &image.info().blobs[0];
    assert_eq!(&info.id, report.blob_id.as_ref().unwrap());
    use rafsd::format::blob_features as bf;
    assert_eq!(
        info.features & (bf::INLINED_FS_META | bf::HAS_TOC | bf::INLINED_CHUNK_DIGEST),
        bf::INLINED_FS_META | bf::HAS_TOC | bf::INLINED_CHUNK_DIGEST
    );

    // Every ToC entry's sha256 matches its section; the id is the sha256 of all but the digest array.
    use rafsd::format::toc;
    let bytes = fs::read(&blob).unwrap();
    let header = toc::parse_tar_header(&bytes[bytes.len() - 512..]).unwrap();
    assert_eq!(header.name, toc::TOC_NAME);
    let start = bytes.len() - 512 - header.size as usize;
    let entries = toc::parse_toc(&bytes[start..bytes.len() - 512]).unwrap();
    let names: Vec<&[u8]> = entries.iter().map(|e| e.name.as_slice()).collect();
    assert_eq!(
        names,
        [
            &b"image.blob"[..],
            b"blob.meta",
            b"blob.meta.header",
            b"blob.digest",
            b"image.boot"
        ]
    );
    let sha = |b: &[u8]| rafsd::storage::digest::digest(Digester::Sha256, b);
    let mut without_digests = Vec::new();
    for e in &entries {
        let stored = &bytes
            [e.compressed_offset as usize..(e.compressed_offset + e.compressed_size) as usize];
        let plain = if e.compression == toc::TOC_COMPRESS_ZSTD {
            rafsd::storage::compress::decompress(
                Compressor::Zstd,
                stored,
                e.uncompressed_size as usize,
            )
            .unwrap()
        } else {
            stored.to_vec()
        };
        if e.name != b"image.blob" {
            assert_eq!(
                plain.len() as u64,
                e.uncompressed_size,
                "{:?}",
                String::from_utf8_lossy(&e.name)
            );
        }
        assert_eq!(
            sha(&plain),
            e.uncompressed_digest,
            "{:?}",
            String::from_utf8_lossy(&e.name)
        );
        if e.name == b"blob.digest" {
            without_digests = [
                &bytes[..e.compressed_offset as usize],
                &bytes[(e.compressed_offset + e.compressed_size) as usize..],
            ]
            .concat();
        }
    }
    assert_eq!(rafsd::storage::digest::hex(&sha(&without_digests)), info.id);
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn prefetch_list_fills_the_prefetch_table_and_leads_the_blob() {
    for fs_version in [6, 5] {
        let list = vec![b"/special/random-2m5".to_vec(), b"/etc/apt".to_vec()];
        let o = BuildOptions {
            fs_version,
            prefetch_files: list,
            ..BuildOptions::default()
        };
        let built = build(source_tree(), &o);
        let image = open(&built.bootstrap, &built.blob_dir, false);
        let special = image.lookup(image.root_ino(), b"special").unwrap().unwrap();
        let random = image.lookup(special, b"random-2m5").unwrap().unwrap();
        let etc = image.lookup(image.root_ino(), b"etc").unwrap().unwrap();
        let apt = image.lookup(etc, b"apt").unwrap().unwrap();
        assert_eq!(image.info().prefetch, vec![random, apt], "v{fs_version}");
        // The first prefetch file's data comes first in the blob.
        let first = &image.file_chunks(random).unwrap()[0];
        assert_eq!(
            (first.compressed_offset, first.index),
            (0, 0),
            "v{fs_version}"
        );
    }
}

/// A prefetch table's data, which the builder lays out first in the blob, is prefetched with its first
/// 16 MiB in one request (the head) on one worker, rather than as requests of `merging_size` on every
/// worker at once: those share the link, and the bytes a starting container reads first would come as
/// slowly as the requests in flight are many. What lies past the head goes on all workers as before,
/// and files not laid out in the list's order get no head.
#[test]
fn a_prefetch_tables_data_is_fetched_first_in_one_request() {
    use rafsd::cache::prefetch::{PrefetchTarget, Prefetcher};
    use rafsd::config::PrefetchConfig;
    let src = tempfile::tempdir().unwrap();
    for i in 0..18u64 {
        fs::write(
            src.path().join(format!("f{i:02}")),
            pseudo_random(1 << 20, 40 + i),
        )
        .unwrap();
    }
    let listed = BuildOptions {
        prefetch_files: (0..18).map(|i| format!("/f{i:02}").into_bytes()).collect(),
        ..BuildOptions::default()
    };
    // Backend requests for prefetching `files` of `built` (with 4 threads, 1 MiB merged), and bytes;
    // with `read_first`, a read of the first file's start right after the prefetch starts, as a
    // container's first exec races the prefetch's plan.
    let prefetch = |built: &Built, files: &[&str], read_first: bool| {
        let cache = tempfile::tempdir().unwrap();
        let image = std::sync::Arc::new(open_cached(built, cache.path(), false));
        let root = image.root_ino();
        let inos: Vec<u64> = files
            .iter()
            .map(|f| image.lookup(root, f.as_bytes()).unwrap().unwrap())
            .collect();
        let config = PrefetchConfig {
            enable: true,
            threads: 4,
            merging_size: 1 << 20,
            bandwidth_limit: 0,
            prefetch_all: false,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let first = inos[0];
        let prefetcher = Prefetcher::start(image.clone(), &config, PrefetchTarget::Inodes(inos));
        if read_first {
            let mut buf = vec![0; 4096];
            assert_eq!(image.read(first, 0, &mut buf).unwrap(), buf.len());
        }
        std::thread::spawn(move || {
            prefetcher.wait();
            let _ = tx.send(());
        });
        rx.recv_timeout(std::time::Duration::from_secs(60))
            .expect("prefetch did not end");
        // Reads predict again once the head is fetched, or when there is none.
        assert_eq!(
            image.prefetch_head(),
            rafsd::image::PrefetchHead::None,
            "the head stayed set"
        );
        let (metrics, _) = image.backend_metrics();
        (metrics.reads(), metrics.bytes())
    };
    let names: Vec<String> = (0..18).map(|i| format!("f{i:02}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    // The chunk-info array, the head (16 MiB), the 2 MiB after it in two requests. Before: 18 + 1.
    let built = build(src.path(), &listed);
    let (reads, bytes) = prefetch(&built, &names, false);
    assert!(
        (18 << 20..(18 << 20) + (64 << 10)).contains(&bytes),
        "{bytes} bytes"
    );
    assert_eq!(
        reads, 4,
        "requests: the chunk-info array, the head, two after it"
    );
    // A read racing the plan takes its own chunk at most: the rest of the table stays the head's, in
    // one request (before: the read's prediction took the next 3 MiB in 3 parallel requests, 7 in all).
    for _ in 0..5 {
        let (reads, bytes) = prefetch(&built, &names, true);
        assert!(
            (18 << 20..(18 << 20) + (64 << 10)).contains(&bytes),
            "{bytes} bytes"
        );
        assert!(
            (4..=5).contains(&reads),
            "{reads} requests: the chunk-info array, the read's chunk (unless the head had it), the \
             head, two after it"
        );
    }
    // Files chosen by --prefetch-files rather than the table: the head once planned.
    let (reads, _) = prefetch(&built, &names[..17], false);
    assert_eq!(
        reads, 3,
        "requests: the chunk-info array, the head, one after it"
    );
    // The files in another order than the blob's: no head, one request per merged MiB.
    let unlisted = build(src.path(), &BuildOptions::default());
    let (reads, _) = prefetch(&unlisted, &["f05", "f00", "f01"], false);
    assert_eq!(reads, 4, "requests: the chunk-info array, one per file");
}

/// `built` with a blob cache in `cache` and read prediction on, as a daemon opens it.
fn open_cached(built: &Built, cache: &Path, validate: bool) -> RafsImage {
    RafsImage::open_local(
        &built.bootstrap,
        Some(&built.blob_dir),
        ImageOptions {
            cache_dir: Some(cache.to_path_buf()),
            amplify_io: 1,
            validate,
            ..Default::default()
        },
    )
    .unwrap()
}

/// What `image` fetched from its backend, once background streams still running have stopped adding to it.
fn settled_bytes(image: &RafsImage) -> u64 {
    let mut last = image.backend_metrics().0.bytes();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let now = image.backend_metrics().0.bytes();
        if now == last {
            return now;
        }
        last = now;
    }
}

/// A directory read file after file in no particular order (a program importing its library): once
/// three of its files missed, each later miss brings the directory's files after it in the blob in the
/// same request, so reading 200 small files takes a handful of requests, not one each. What is fetched
/// stays within 1.25x of what was read.
#[test]
fn a_directory_read_file_after_file_comes_in_a_few_requests() {
    let src = tempfile::tempdir().unwrap();
    // A large file read first (the reader's budget for guesses is a share of what it needed), then a
    // directory of 200 incompressible 8 KiB files: 1.6 MB, past what a guess near a miss may fetch.
    fs::write(src.path().join("big"), pseudo_random(8 << 20, 1)).unwrap();
    fs::create_dir(src.path().join("lib")).unwrap();
    for i in 0..200u64 {
        let name = src.path().join(format!("lib/m{i:03}"));
        fs::write(name, pseudo_random(8 << 10, 10 + i)).unwrap();
    }
    let built = build(src.path(), &BuildOptions::default());
    // With digest validation too: cache hits then take another path, which must credit right guesses.
    for validate in [false, true] {
        let cache = tempfile::tempdir().unwrap();
        let image = open_cached(&built, cache.path(), validate);
        let read_all = |ino: u64| {
            let size = image.inode(ino).unwrap().size as usize;
            let mut buf = vec![0; size];
            assert_eq!(image.read(ino, 0, &mut buf).unwrap(), size);
            buf
        };
        let root = image.root_ino();
        read_all(image.lookup(root, b"big").unwrap().unwrap());
        let lib = image.lookup(root, b"lib").unwrap().unwrap();
        let requests_before = image.backend_metrics().0.reads();
        // Far apart first (no guess near a miss), then the rest in order.
        let first = [0u64, 150, 100];
        let order = first
            .into_iter()
            .chain((0..200).filter(|i| !first.contains(i)));
        for i in order {
            let ino = image
                .lookup(lib, format!("m{i:03}").as_bytes())
                .unwrap()
                .unwrap();
            // As the FUSE and virtio-fs front ends do on a LOOKUP of a regular file.
            image.note_parent(ino, lib);
            let got = read_all(ino);
            assert!(got == pseudo_random(8 << 10, 10 + i), "m{i:03}");
        }
        let requests = image.backend_metrics().0.reads() - requests_before;
        assert!(
            requests <= 8,
            "validate {validate}: 200 files of one directory took {requests} requests"
        );
        // Everything was read, so every byte fetched was needed: the guesses were right.
        let blob_id = built.report.blob_id.as_deref().unwrap();
        let blob = fs::metadata(built.blob_dir.join(blob_id)).unwrap().len();
        let fetched = settled_bytes(&image);
        assert!(fetched <= blob, "fetched {fetched} of a {blob}-byte blob");
    }
}

/// Guesses about a directory stay within the share of what reads needed, however wrong: a program
/// reading a few files of each of many large directories of small files fetches at most 1.25x what it
/// read.
#[test]
fn wrong_guesses_about_directories_stay_within_a_quarter_of_what_was_read() {
    let src = tempfile::tempdir().unwrap();
    for d in 0..20u64 {
        fs::create_dir(src.path().join(format!("d{d:02}"))).unwrap();
        for i in 0..100u64 {
            let name = src.path().join(format!("d{d:02}/f{i:03}"));
            fs::write(name, pseudo_random(8 << 10, 1000 * d + i)).unwrap();
        }
    }
    let built = build(src.path(), &BuildOptions::default());
    let cache = tempfile::tempdir().unwrap();
    let image = open_cached(&built, cache.path(), false);
    let root = image.root_ino();
    // Compressed bytes of the chunks read, and what was fetched before the guesses could start (the
    // blob's chunk-info array and the first file).
    let mut read = 0;
    let mut base = None;
    for d in 0..20u64 {
        let dir = image
            .lookup(root, format!("d{d:02}").as_bytes())
            .unwrap()
            .unwrap();
        // Four files far apart in each directory: the fourth miss is a guess's trigger, never its target.
        for i in [0u64, 90, 30, 60] {
            let ino = image
                .lookup(dir, format!("f{i:03}").as_bytes())
                .unwrap()
                .unwrap();
            image.note_parent(ino, dir);
            let mut buf = vec![0; 8 << 10];
            assert_eq!(image.read(ino, 0, &mut buf).unwrap(), 8 << 10);
            let compressed: u64 = image
                .file_chunks(ino)
                .unwrap()
                .iter()
                .map(|c| c.compressed_size as u64)
                .sum();
            match base {
                None => base = Some(image.backend_metrics().0.bytes()),
                Some(_) => read += compressed,
            }
        }
    }
    let fetched = settled_bytes(&image) - base.unwrap();
    // The first file's share of the budget is not in `read`: allow it.
    assert!(
        fetched as f64 <= 1.25 * read as f64 + 2048.0,
        "fetched {fetched} for {read} read"
    );
    let (_, speculative) = image.speculation();
    assert!(
        speculative > 0,
        "no guess was made at all: the test proves nothing"
    );
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn command_line_build_and_check() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_rafsd");
    let (boot, blobs) = (dir.path().join("b"), dir.path().join("blobs"));
    let out = Command::new(bin)
        .arg("build")
        .arg(source_tree())
        .args(["--bootstrap"])
        .arg(&boot)
        .arg("--blob-dir")
        .arg(&blobs)
        .args([
            "--fs-version",
            "5",
            "--chunk-size",
            "65536",
            "--compressor",
            "lz4_block",
            "--digester",
            "sha256",
            "--threads",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("blob: ") && text.contains("3405 entries"),
        "{text}"
    );
    let info = open(&boot, &blobs, false).info().clone();
    assert_eq!(
        (
            info.version,
            info.chunk_size,
            info.compressor,
            info.digester
        ),
        (5, 0x10000, Compressor::Lz4Block, Digester::Sha256)
    );
    let out = Command::new(bin)
        .arg("check")
        .arg(&boot)
        .arg("--blob-dir")
        .arg(&blobs)
        .output()
        .unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains(": 0 errors"));
    for bad in [
        &["--chunk-size", "0x1234"][..],
        &["--compressor", "gzip"],
        &["--fs-version", "4"],
        &["--whiteout-spec", "aufs"],
    ] {
        let out = Command::new(bin)
            .arg("build")
            .arg(source_tree())
            .arg("-B")
            .arg(&boot)
            .arg("-D")
            .arg(&blobs)
            .args(bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?} was accepted");
    }
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn sockets_are_skipped_and_unreadable_files_fail_the_build() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    put(&src.join("a.txt"), b"a");
    put(&src.join("secret"), b"only root may read this");
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    let built = build(&src, &BuildOptions::default());
    assert_eq!(built.report.skipped.len(), 1, "{:?}", built.report.skipped);
    let image = open(&built.bootstrap, &built.blob_dir, true);
    assert!(image.lookup(image.root_ino(), b"sock").unwrap().is_none());
    assert!(image.lookup(image.root_ino(), b"secret").unwrap().is_some());

    // As an unprivileged user, the root-only file cannot be read: a clear error, and no image.
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    for p in [dir.path(), &src, &out_dir] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o777)).unwrap();
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_rafsd"),
            "build",
        ])
        .arg(&src)
        .arg("-B")
        .arg(out_dir.join("boot"))
        .arg("-D")
        .arg(out_dir.join("blobs"))
        .output()
        .expect("setpriv (util-linux) drops privileges");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an unreadable file must fail the build"
    );
    assert!(
        err.contains("secret") && err.contains("ermission denied"),
        "{err}"
    );
    assert!(!out_dir.join("boot").exists());
    let left: Vec<_> = fs::read_dir(out_dir.join("blobs"))
        .map(|d| d.collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}
