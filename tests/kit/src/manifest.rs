//! Compare a host tree (an unpacked image, later a FUSE or virtio-fs mount) with the fixtures'
//! `manifest.tsv`, entry by entry and column by column, like the reference `check-tree.py` tool.

use std::collections::{BTreeMap, HashSet};
use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::Digest;

pub const COLUMNS: [&str; 11] = [
    "path", "type", "mode", "uid", "gid", "size", "nlink", "mtime", "target", "sha256", "xattrs",
];

/// The reference images: `$RAFSD_FIXTURES`, else the repository's own `tests/fixtures/rafs`.
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("RAFSD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("tests/fixtures/rafs"))
}

/// Case names from the fixtures' CASES file.
pub fn cases() -> Vec<String> {
    let text = std::fs::read_to_string(fixtures_dir().join("CASES")).expect("read fixtures CASES");
    let cases: Vec<String> = text
        .lines()
        .filter_map(|l| l.split(':').next())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    assert!(
        cases.len() >= 9,
        "expected the nine reference cases, found {cases:?}"
    );
    cases
}

/// What to open for a case: its bootstrap, or the blob itself when the metadata is inlined.
pub fn case_bootstrap(case: &str) -> PathBuf {
    let dir = fixtures_dir().join(case);
    let bootstrap = dir.join("bootstrap");
    if bootstrap.exists() {
        return bootstrap;
    }
    let mut blobs: Vec<_> = std::fs::read_dir(dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        blobs.len(),
        1,
        "inline-meta case {case} should have one blob"
    );
    blobs.pop().unwrap()
}

pub fn case_blob_dir(case: &str) -> PathBuf {
    fixtures_dir().join(case).join("blobs")
}

pub type Row = BTreeMap<&'static str, String>;

pub fn load_manifest() -> Vec<Row> {
    let text =
        std::fs::read_to_string(fixtures_dir().join("manifest.tsv")).expect("read manifest.tsv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split('\t').collect();
    assert_eq!(header, COLUMNS, "manifest.tsv columns changed");
    lines
        .map(|l| {
            let fields: Vec<&str> = l.split('\t').collect();
            assert_eq!(fields.len(), COLUMNS.len(), "bad manifest line {l:?}");
            COLUMNS
                .iter()
                .zip(fields)
                .map(|(c, f)| (*c, f.to_string()))
                .collect()
        })
        .collect()
}

/// What the tree shows at `root/rel`, in manifest terms.
pub fn probe(root: &Path, rel: &str) -> std::io::Result<Row> {
    let path = if rel == "." {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let md = std::fs::symlink_metadata(&path)?;
    let ft = md.file_type();
    let t = if ft.is_file() {
        "f"
    } else if ft.is_dir() {
        "d"
    } else if ft.is_symlink() {
        "l"
    } else if ft.is_char_device() {
        "c"
    } else if ft.is_block_device() {
        "b"
    } else if ft.is_fifo() {
        "p"
    } else {
        "?"
    };
    let mut row = Row::new();
    row.insert("path", rel.to_string());
    row.insert("type", t.to_string());
    row.insert("mode", format!("{:o}", md.mode() & 0o7777));
    row.insert("uid", md.uid().to_string());
    row.insert("gid", md.gid().to_string());
    row.insert(
        "size",
        if t == "d" {
            String::new()
        } else {
            md.size().to_string()
        },
    );
    row.insert(
        "nlink",
        if t == "d" {
            String::new()
        } else {
            md.nlink().to_string()
        },
    );
    row.insert("mtime", md.mtime().to_string());
    let target = match t {
        "l" => std::fs::read_link(&path)?
            .as_os_str()
            .to_string_lossy()
            .into_owned(),
        "c" | "b" => format!("{}:{}", libc::major(md.rdev()), libc::minor(md.rdev())),
        _ => String::new(),
    };
    row.insert("target", target);
    let mut sha = String::new();
    if t == "f" {
        sha = sha256_file(&path)?;
    }
    row.insert("sha256", sha);
    row.insert("xattrs", xattrs(&path)?);
    Ok(row)
}

/// sha256 of `data`, lower-case hex (the manifest's form).
pub fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(data))
}

/// The manifest's sha256 of the regular file at `path` (relative to the image root).
pub fn manifest_sha(path: &str) -> String {
    load_manifest()
        .into_iter()
        .find(|r| r["path"] == path)
        .unwrap_or_else(|| panic!("{path} not in manifest"))["sha256"]
        .clone()
}

/// sha256 of a file's contents, lower-case hex (the manifest's form).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn xattrs(path: &Path) -> std::io::Result<String> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: valid path and buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOTSUP) {
            Ok(String::new())
        } else {
            Err(e)
        };
    }
    let mut list: Vec<Vec<u8>> = names[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| s.to_vec())
        .collect();
    list.sort();
    let mut out = Vec::new();
    for name in list {
        let cn = CString::new(name.clone()).unwrap();
        let mut value = vec![0u8; 65536];
        // SAFETY: valid path, name and buffer.
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cn.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hex: String = value[..len as usize]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        out.push(format!("{}={hex}", String::from_utf8_lossy(&name)));
    }
    Ok(out.join(","))
}

/// Known, documented differences (fixtures README): the root directory's mtime is the build time, and
/// images built with --repeatable carry no uid/gid, so every entry belongs to the reader's euid/egid.
#[derive(Clone, Copy, Default)]
pub struct Allowances {
    pub skip_root_mtime: bool,
    pub owner_is_reader: bool,
}

pub fn allowances_for(case: &str) -> Allowances {
    Allowances {
        skip_root_mtime: true,
        owner_is_reader: case.contains("repeatable"),
    }
}

/// Every mismatch between the tree at `root` and the manifest, one line each (empty = identical).
pub fn compare_tree(root: &Path, allow: Allowances) -> Vec<String> {
    let manifest = load_manifest();
    // SAFETY: plain getters.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let mut problems = Vec::new();
    let mut seen = HashSet::new();
    for want in &manifest {
        let rel = want["path"].clone();
        seen.insert(rel.clone());
        let got = match probe(root, &rel) {
            Ok(g) => g,
            Err(e) => {
                problems.push(format!("{rel}: missing ({e})"));
                continue;
            }
        };
        for col in &COLUMNS[1..] {
            let mut expected = want[col].clone();
            if allow.owner_is_reader && *col == "uid" {
                expected = euid.to_string();
            }
            if allow.owner_is_reader && *col == "gid" {
                expected = egid.to_string();
            }
            if allow.skip_root_mtime && rel == "." && *col == "mtime" {
                continue;
            }
            if got[col] != expected {
                problems.push(format!(
                    "{rel}: {col}: want {expected:?} got {:?}",
                    got[col]
                ));
            }
        }
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if !seen.contains(&rel) {
                problems.push(format!("{rel}: unexpected entry"));
            }
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    problems
}

#[track_caller]
pub fn assert_root(what: &str) {
    crate::tier::require_full(what);
    // SAFETY: plain getter.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "{what} needs root (device nodes, owners, trusted.* xattrs); CI runs as root"
    );
}
