//! The image builder: the reference fixture's tree, rebuilt by `rafsd::builder`, must read back exactly as
//! `manifest.tsv` describes it (through `unpack`, through `check` with validation, and for v6 through the
//! kernel's EROFS driver), for every format version, compressor, digester and a range of chunk sizes;
//! from a directory, a tar and a tar.gz; on a parent layer and merged, against a real overlayfs mount.

mod manifest;

use std::ffi::CString;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use rafsd::builder::{self, BuildOptions, BuildReport};
use rafsd::format::{Compressor, Digester};
use rafsd::{check, ImageOptions, RafsImage};

const ENTRIES: u64 = 3405;
const FILES: u64 = 3200;
const BYTES: u64 = 12_196_193;

/// The fixture source tree (what `rafsd unpack` of any fixture produces), unpacked once per run.
fn source_tree() -> &'static Path {
    static SRC: OnceLock<PathBuf> = OnceLock::new();
    SRC.get_or_init(|| {
        manifest::assert_root("building from a tree with device nodes, owners and trusted.* xattrs");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("builder-source");
        let _ = fs::remove_dir_all(&dir);
        let case = "v6-zstd-blake3";
        let image = RafsImage::open_local(&manifest::case_bootstrap(case), Some(&manifest::case_blob_dir(case)), ImageOptions::default())
            .expect("open fixture");
        let tree = dir.join("tree");
        rafsd::unpack::unpack(&image, &tree).expect("unpack fixture");
        tree
    })
}

fn opts(fs_version: u32, compressor: Compressor, digester: Digester, chunk_size: u32) -> BuildOptions {
    BuildOptions { fs_version, compressor, digester, chunk_size, ..BuildOptions::default() }
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
    let report = builder::build(source, Some(&bootstrap), &blob_dir, o).unwrap_or_else(|e| panic!("build {}: {e}", source.display()));
    Built { _dir: dir, bootstrap, blob_dir, report }
}

fn open(bootstrap: &Path, blob_dir: &Path, validate: bool) -> RafsImage {
    RafsImage::open_local(bootstrap, Some(blob_dir), ImageOptions { validate, ..Default::default() })
        .unwrap_or_else(|e| panic!("open {}: {e}", bootstrap.display()))
}

fn root_mtime_only() -> manifest::Allowances {
    manifest::Allowances { skip_root_mtime: true, owner_is_reader: false }
}

/// Unpack the image and compare it with the manifest; check it with digest validation.
fn assert_reads_back(what: &str, bootstrap: &Path, blob_dir: &Path, allow: manifest::Allowances) {
    let image = open(bootstrap, blob_dir, true);
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("tree");
    let stats = rafsd::unpack::unpack(&image, &dest).unwrap_or_else(|e| panic!("{what}: unpack: {e}"));
    assert_eq!(stats.entries, ENTRIES, "{what}: entries");
    let problems = manifest::compare_tree(&dest, allow);
    assert!(problems.is_empty(), "{what}: {} mismatches, first: {:#?}", problems.len(), &problems[..problems.len().min(10)]);
    let report = check::check(&image, 10).unwrap();
    assert!(report.errors.is_empty(), "{what}: check: {:?}", report.errors);
    assert_eq!((report.entries, report.files, report.bytes), (ENTRIES, FILES, BYTES), "{what}: check totals");
}

#[test]
fn v6_from_a_directory_reads_back_as_the_manifest() {
    let built = build(source_tree(), &BuildOptions::default());
    assert_reads_back("v6 default", &built.bootstrap, &built.blob_dir, root_mtime_only());
    let image = open(&built.bootstrap, &built.blob_dir, false);
    let info = image.info();
    assert_eq!(info.version, 6);
    assert_eq!(info.blobs.len(), 1);
    let blob = &info.blobs[0];
    assert_eq!(Some(&blob.id), built.report.blob_id.as_ref());
    // The blob is named by its sha256.
    let bytes = fs::read(built.blob_dir.join(&blob.id)).unwrap();
    assert_eq!(rafsd::storage::digest::hex(&rafsd::storage::digest::digest(Digester::Sha256, &bytes)), blob.id);
    // Dedup within the layer: special/random-copy repeats special/random-2m5, the 64 KiB blocks repeat.
    assert!(built.report.chunks.chunks_deduped >= 2, "{:?}", built.report.chunks);
    // Every chunk carries a CRC32C in the chunk table.
    let special = image.lookup(image.root_ino(), b"special").unwrap().unwrap();
    let file = image.lookup(special, b"random-2m5").unwrap().unwrap();
    for info in image.file_chunks(file).unwrap() {
        assert!(info.crc32.is_some() && info.digest.is_some(), "{info:?}");
    }
}

#[test]
fn v6_bootstrap_mounts_with_the_kernel_erofs_driver() {
    if !fs::read_to_string("/proc/filesystems").unwrap_or_default().contains("erofs") {
        eprintln!("SKIP: this kernel has no EROFS driver");
        return;
    }
    manifest::assert_root("mounting EROFS");
    for compressor in [Compressor::None, Compressor::Zstd] {
        let built = build(source_tree(), &BuildOptions { compressor, ..BuildOptions::default() });
        let image = open(&built.bootstrap, &built.blob_dir, true);
        // The kernel reads uncompressed blob bytes at blkaddr * 4096: lay every chunk out that way.
        let data = built._dir.path().join("blob.data");
        write_blob_data(&image, 0, &built.blob_dir, &data);
        let mnt = built._dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let mount = ErofsMount::new(&built.bootstrap, &[data], &mnt);
        let problems = manifest::compare_tree(&mnt, root_mtime_only());
        drop(mount);
        assert!(problems.is_empty(), "{compressor:?}: kernel mount: {} mismatches, first: {:#?}", problems.len(), &problems[..problems.len().min(10)]);
    }
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
            rafsd::storage::compress::decompress(blob.compressor, &stored, c.uncompressed_size as usize).unwrap()
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
        let opts: Vec<String> = devices.iter().map(|d| format!("device={}", d.display())).collect();
        let data = CString::new(opts.join(",")).unwrap();
        let fstype = CString::new("erofs").unwrap();
        // SAFETY: valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(c(bootstrap).as_ptr(), c(mnt).as_ptr(), fstype.as_ptr(), libc::MS_RDONLY, data.as_ptr().cast())
        };
        if rc == 0 {
            return ErofsMount { mnt: mnt.to_path_buf(), loops: Vec::new() };
        }
        let direct = std::io::Error::last_os_error();
        let mut loops = Vec::new();
        for d in devices.iter().map(|d| d.as_path()).chain([bootstrap]) {
            let out = Command::new("losetup").args(["-f", "--show", "-r"]).arg(d).output().unwrap();
            assert!(out.status.success(), "losetup {}: {}", d.display(), String::from_utf8_lossy(&out.stderr));
            loops.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        let primary = loops.last().unwrap().clone();
        let opts: Vec<String> = loops[..loops.len() - 1].iter().map(|l| format!("device={l}")).collect();
        let out = Command::new("mount").args(["-t", "erofs", "-o"]).arg(format!("ro,{}", opts.join(","))).arg(&primary).arg(mnt).output().unwrap();
        let mount = ErofsMount { mnt: mnt.to_path_buf(), loops };
        assert!(out.status.success(), "mount erofs (file-backed: {direct}; loop: {})", String::from_utf8_lossy(&out.stderr));
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
        let what = format!("v{} {} {} {:#x}", o.fs_version, o.compressor.name(), o.digester.name(), o.chunk_size);
        let built = build(source_tree(), &o);
        assert_reads_back(&what, &built.bootstrap, &built.blob_dir, root_mtime_only());
        let info = open(&built.bootstrap, &built.blob_dir, false).info().clone();
        assert_eq!((info.version, info.compressor, info.digester, info.chunk_size), (o.fs_version, o.compressor, o.digester, o.chunk_size), "{what}");
    }
}

#[test]
fn builds_are_reproducible_whatever_the_thread_count() {
    let one = build(source_tree(), &BuildOptions { threads: 1, ..BuildOptions::default() });
    let many = build(source_tree(), &BuildOptions { threads: 3, ..BuildOptions::default() });
    assert_eq!(one.report.blob_id, many.report.blob_id);
    assert_eq!(fs::read(&one.bootstrap).unwrap(), fs::read(&many.bootstrap).unwrap());
    // --repeatable drops owners: readers then show their own uid/gid.
    let rep = build(source_tree(), &BuildOptions { repeatable: true, fs_version: 5, ..BuildOptions::default() });
    let info = open(&rep.bootstrap, &rep.blob_dir, false).info().clone();
    assert!(!info.explicit_uid_gid());
    let allow = manifest::Allowances { skip_root_mtime: true, owner_is_reader: true };
    assert_reads_back("v5 repeatable", &rep.bootstrap, &rep.blob_dir, allow);
}
