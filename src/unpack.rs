//! Write an image's tree to a host directory: contents, modes, owners, mtimes, xattrs, symlinks, hard
//! links, device nodes and fifos.
//!
//! Names were already checked to be single components and directories are walked from the top, so every
//! path created is a fresh entry below `output`; files are created with O_EXCL|O_NOFOLLOW all the same.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::InodeAttr;
use crate::image::{RafsImage, WalkEvent};

/// What `unpack` wrote.
#[derive(Debug, Default, Clone)]
pub struct UnpackStats {
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
}

pub fn unpack(image: &RafsImage, output: &Path) -> Result<UnpackStats> {
    prepare_output(output)?;
    let explicit_owner = image.info().explicit_uid_gid();
    let mut stats = UnpackStats::default();
    // First path of each multiply-linked regular file, so later names become hard links to it.
    let mut links: HashMap<u64, PathBuf> = HashMap::new();
    let mut buf = vec![0u8; 1 << 20];
    image.walk(&mut |rel, attr, event| {
        let path = output.join(rel);
        if event == WalkEvent::DirDone {
            return set_times(&path, attr);
        }
        stats.entries += 1;
        let fail =
            |what: &str, e: std::io::Error| Error::io(format!("{what} {}", path.display()), e);
        let ftype = attr.file_type();
        if attr.is_reg() && attr.nlink > 1 {
            if let Some(first) = links.get(&attr.ino) {
                return fs::hard_link(first, &path).map_err(|e| fail("link", e));
            }
            links.insert(attr.ino, path.clone());
        }
        match ftype {
            libc::S_IFDIR => {
                if !rel.as_os_str().is_empty() {
                    fs::create_dir(&path).map_err(|e| fail("mkdir", e))?;
                }
            }
            libc::S_IFREG => {
                write_file(image, attr, rel, &path, &mut buf)?;
                stats.files += 1;
                stats.bytes += attr.size;
            }
            libc::S_IFLNK => {
                let target = image.readlink(attr.ino)?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &path)
                    .map_err(|e| fail("symlink", e))?;
            }
            libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO | libc::S_IFSOCK => {
                let c = cpath(&path)?;
                // SAFETY: c is a valid NUL-terminated path.
                let rc =
                    unsafe { libc::mknod(c.as_ptr(), ftype | 0o600, attr.rdev as libc::dev_t) };
                if rc != 0 {
                    return Err(fail("mknod", std::io::Error::last_os_error()));
                }
            }
            other => {
                return Err(Error::Corrupt(format!(
                    "{}: unknown file type {other:#o}",
                    rel.display()
                )))
            }
        }
        set_owner_mode_xattrs(image, &path, attr, explicit_owner)?;
        if ftype != libc::S_IFDIR {
            set_times(&path, attr)?;
        }
        Ok(())
    })?;
    Ok(stats)
}

/// `output` as an empty directory: created when missing, refused when it holds anything.
fn prepare_output(output: &Path) -> Result<()> {
    match fs::read_dir(output) {
        Ok(mut it) => {
            if it.next().is_some() {
                return Err(Error::Invalid(format!(
                    "output directory {} is not empty",
                    output.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(output)
                .map_err(|e| Error::io(format!("create {}", output.display()), e))?;
        }
        Err(e) => return Err(Error::io(format!("open {}", output.display()), e)),
    }
    Ok(())
}

/// Create regular file `path` (image path `rel`) and write its data, `buf` at a time.
fn write_file(
    image: &RafsImage,
    attr: &InodeAttr,
    rel: &Path,
    path: &Path,
    buf: &mut [u8],
) -> Result<()> {
    let fail = |what: &str, e: std::io::Error| Error::io(format!("{what} {}", path.display()), e);
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)
        .map_err(|e| fail("create", e))?;
    // Only the ranges chunks hold are read and written; holes (v5 HAS_HOLE) stay holes in the
    // output, made by the final set_len, so a hostile 2^62-byte sparse file is an error from the
    // filesystem (EFBIG) rather than exabytes of zeros written.
    for (start, end) in image.data_extents(attr.ino).map_err(|e| in_file(e, rel))? {
        let mut offset = start;
        while offset < end {
            let want = (end - offset).min(buf.len() as u64) as usize;
            let n = image
                .read(attr.ino, offset, &mut buf[..want])
                .map_err(|e| in_file(e, rel))?;
            if n == 0 {
                return Err(Error::Corrupt(format!(
                    "{}: data ends at {offset} of {}",
                    rel.display(),
                    attr.size
                )));
            }
            f.write_all_at(&buf[..n], offset)
                .map_err(|e| fail("write", e))?;
            offset += n as u64;
        }
    }
    f.set_len(attr.size).map_err(|e| fail("set size of", e))
}

/// Owner (when the image records owners), mode (not of symlinks) and xattrs of a new entry.
fn set_owner_mode_xattrs(
    image: &RafsImage,
    path: &Path,
    attr: &InodeAttr,
    explicit_owner: bool,
) -> Result<()> {
    let fail = |what: &str, e: std::io::Error| Error::io(format!("{what} {}", path.display()), e);
    // Owner before mode (chown clears set-id bits), xattrs after both (chown drops security.capability).
    if explicit_owner {
        let c = cpath(path)?;
        // SAFETY: c is a valid NUL-terminated path.
        if unsafe { libc::lchown(c.as_ptr(), attr.uid, attr.gid) } != 0 {
            return Err(fail("chown", std::io::Error::last_os_error()));
        }
    }
    if attr.file_type() != libc::S_IFLNK {
        fs::set_permissions(path, fs::Permissions::from_mode(attr.mode & 0o7777))
            .map_err(|e| fail("chmod", e))?;
    }
    for (name, value) in image.xattrs(attr.ino)? {
        set_xattr(path, &name, &value)?;
    }
    Ok(())
}

fn in_file(e: Error, rel: &Path) -> Error {
    match e {
        Error::Integrity(m) => Error::Integrity(format!("{}: {m}", rel.display())),
        Error::Corrupt(m) => Error::Corrupt(format!("{}: {m}", rel.display())),
        other => other,
    }
}

fn cpath(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("{} contains NUL", path.display())))
}

fn set_xattr(path: &Path, name: &[u8], value: &[u8]) -> Result<()> {
    let c = cpath(path)?;
    let n = CString::new(name).map_err(|_| Error::Corrupt("xattr name contains NUL".into()))?;
    // SAFETY: valid C strings and a value buffer of the given length.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::io(
            format!(
                "set xattr {} on {}",
                String::from_utf8_lossy(name),
                path.display()
            ),
            e,
        ));
    }
    Ok(())
}

fn set_times(path: &Path, attr: &InodeAttr) -> Result<()> {
    let c = cpath(path)?;
    let t = libc::timespec {
        tv_sec: attr.mtime as libc::time_t,
        tv_nsec: attr.mtime_nsec as libc::c_long,
    };
    let times = [t, t];
    // SAFETY: valid path and a two-element timespec array.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(Error::io(
            format!("set times on {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::time::{Duration, Instant};

    use super::unpack;
    use crate::check::tests::{sparse_v5_image, SPARSE_CHUNK_AT};

    #[test]
    fn holes_stay_holes() {
        // A 1 TiB HAS_HOLE file with one 4 KiB chunk: written as that chunk plus a sparse size, not as
        // a terabyte of zeros.
        let size = 1u64 << 40;
        let image = sparse_v5_image(size);
        let out = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let result = unpack(&image, &out.path().join("tree"));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "unpack took {:?}",
            start.elapsed()
        );
        match result {
            Ok(stats) => {
                assert_eq!((stats.entries, stats.files), (2, 1));
                let path = out.path().join("tree/file");
                let meta = std::fs::metadata(&path).unwrap();
                assert_eq!(meta.len(), size);
                assert!(meta.blocks() < 1024, "{} blocks allocated", meta.blocks());
                let file = std::fs::File::open(&path).unwrap();
                let mut buf = vec![0u8; 8192];
                std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, SPARSE_CHUNK_AT - 4096)
                    .unwrap();
                assert!(
                    buf[..4096].iter().all(|&x| x == 0) && buf[4096..].iter().all(|&x| x == 0xAB)
                );
            }
            // A filesystem that cannot hold a file this large refuses the size: an error, not a hang.
            Err(e) => assert!(e.to_string().contains("set size of"), "{e}"),
        }
    }
}
