//! Rebuilding a `Vfs` so that the kernel's inode numbers mean the same files as before.
//!
//! The kernel knows a file of a pseudo mount as `(mount index << 56) | inode`, and a directory of the
//! pseudo filesystem that joins the mounts by its own small number. fuse-backend-rs gives out both in
//! order and (without its `persist` feature, which brings its own serialization) offers no way to choose
//! them, so the successor replays the order:
//! - pseudo directories are created path by path in their original creation order;
//! - mount indexes come from a counter that skips indexes in use: to give a mount index `k`, the
//!   successor mounts throw-away placeholders at the same path (each over-mount frees the previous
//!   one) until the counter's next free index is `k`, then mounts the real filesystem over them.

use std::any::Any;
use std::io;

use fuse_backend_rs::api::filesystem::{Entry, FileSystem};
use fuse_backend_rs::api::{BackFileSystem, BackendFileSystem, Vfs};

use super::state::PseudoDir;
use crate::error::{Error, Result};

/// Recreate the pseudo directories in order and check each gets the inode number the kernel knows.
/// The caller has checked their paths ([`crate::daemon::check_mountpoint`]).
pub fn replay_pseudo_dirs(vfs: &Vfs, dirs: &[PseudoDir]) -> Result<()> {
    let root = vfs.get_root_pseudofs();
    for d in dirs {
        let ino = root
            .mount(&d.path)
            .map_err(|e| Error::Invalid(format!("recreate pseudo directory {}: {e}", d.path)))?;
        if ino != d.ino {
            return Err(Error::Invalid(format!(
                "pseudo directory {} came back as inode {ino}, the kernel knows it as {}",
                d.path, d.ino
            )));
        }
    }
    Ok(())
}

/// An empty filesystem that only holds a mount index until the real one replaces it (or for good, in
/// place of a filesystem that could not be carried on: every request gets an error).
struct Placeholder;

/// An empty filesystem that answers every request with an error, to hold a mount index.
pub fn placeholder() -> BackFileSystem {
    Box::new(Placeholder)
}

impl FileSystem for Placeholder {
    type Inode = u64;
    type Handle = u64;
}

impl BackendFileSystem for Placeholder {
    fn mount(&self) -> io::Result<(Entry, u64)> {
        // SAFETY: stat64 is plain old data.
        let mut attr: libc::stat64 = unsafe { std::mem::zeroed() };
        attr.st_ino = 1;
        attr.st_mode = libc::S_IFDIR | 0o555;
        Ok((
            Entry {
                inode: 1,
                generation: 0,
                attr,
                attr_flags: 0,
                attr_timeout: std::time::Duration::ZERO,
                entry_timeout: std::time::Duration::ZERO,
            },
            1,
        ))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Leave `path` of a `Vfs` that is serving such that its next mount gets index `want` (free, and not in
/// `in_use`, the indexes of the other mounts): a placeholder mounted there shows where the counter is,
/// and further ones walk it round to `want` (at most 255 mounts of an empty filesystem). The caller
/// mounts over the last placeholder, which frees its index.
pub fn walk_counter_to(vfs: &Vfs, path: &str, want: u8, in_use: &[u8]) -> Result<()> {
    let placeholder = |vfs: &Vfs| {
        vfs.mount(Box::new(Placeholder), path)
            .map_err(|e| Error::Invalid(format!("placeholder at {path}: {e}")))
    };
    let first = placeholder(vfs)?;
    let mut counter = IndexReplay {
        next: first.wrapping_add(1),
        used: [false; 256],
    };
    for &i in in_use {
        counter.used[i as usize] = true;
    }
    counter.used[first as usize] = true;
    let mut held = first;
    for _ in 0..512 {
        let next = counter
            .predict()
            .ok_or_else(|| Error::Internal("no free mount index left".into()))?;
        if next == want {
            return Ok(());
        }
        let got = placeholder(vfs)?;
        if got != next {
            return Err(Error::Internal(format!(
                "the Vfs gave index {got} where {next} was expected"
            )));
        }
        counter.mounted(got, Some(held));
        held = got;
    }
    Err(Error::Internal(format!(
        "mount index {want} of {path} was not reached"
    )))
}

/// The index counter of a fresh `Vfs`, followed step by step.
pub struct IndexReplay {
    /// The counter: where the next search for a free index starts.
    next: u8,
    used: [bool; 256],
}

impl Default for IndexReplay {
    fn default() -> Self {
        // A new Vfs starts after index 0, which is its pseudo filesystem's.
        IndexReplay {
            next: 1,
            used: [false; 256],
        }
    }
}

impl IndexReplay {
    /// The index the next `Vfs::mount` will give: the first unused one from the counter on.
    fn predict(&self) -> Option<u8> {
        (0..=255u8)
            .map(|step| self.next.wrapping_add(step))
            .find(|&i| i != 0 && !self.used[i as usize])
    }

    fn mounted(&mut self, index: u8, replaced: Option<u8>) {
        if let Some(old) = replaced {
            self.used[old as usize] = false;
        }
        self.used[index as usize] = true;
        self.next = index.wrapping_add(1);
    }

    /// Mount `fs` at `path` (an existing pseudo directory or "/") under index `want`.
    pub fn mount_at(&mut self, vfs: &Vfs, fs: BackFileSystem, path: &str, want: u8) -> Result<()> {
        if want == 0 || self.used[want as usize] {
            return Err(Error::Invalid(format!(
                "mount index {want} of {path} is invalid or used twice"
            )));
        }
        let mut placeholder = None;
        loop {
            let next = self
                .predict()
                .ok_or_else(|| Error::Internal("no free mount index left".into()))?;
            if next == want {
                break;
            }
            let got = vfs
                .mount(Box::new(Placeholder), path)
                .map_err(|e| Error::Invalid(format!("placeholder at {path}: {e}")))?;
            if got != next {
                return Err(Error::Internal(format!(
                    "the Vfs gave index {got} where {next} was expected"
                )));
            }
            self.mounted(got, placeholder.replace(got));
        }
        let got = vfs
            .mount(fs, path)
            .map_err(|e| Error::Invalid(format!("attach {path}: {e}")))?;
        if got != want {
            return Err(Error::Invalid(format!(
                "{path} came back under index {got}, the kernel knows it as {want}"
            )));
        }
        self.mounted(got, placeholder);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_backend_rs::api::VfsOptions;

    fn index_of(vfs: &Vfs, path: &str) -> u8 {
        vfs.get_rootfs(path).unwrap().unwrap().1
    }

    #[test]
    fn indexes_and_pseudo_inodes_come_back_as_they_were() {
        // The original: mounts come and go, so indexes and pseudo inodes have gaps.
        let old = Vfs::new(VfsOptions::default());
        for p in ["/a", "/b/c", "/d", "/e"] {
            old.mount(Box::new(Placeholder), p).unwrap();
        }
        old.umount("/b/c").unwrap();
        old.umount("/a").unwrap();
        old.mount(Box::new(Placeholder), "/f").unwrap();
        let live = ["/d", "/e", "/f"];
        let dirs: Vec<PseudoDir> = ["/a", "/b/c", "/d", "/e", "/f"]
            .iter()
            .map(|p| PseudoDir {
                path: p.to_string(),
                ino: old.get_root_pseudofs().path_walk(p).unwrap().unwrap(),
            })
            .collect();
        let mut want: Vec<(&str, u8)> = live.iter().map(|p| (*p, index_of(&old, p))).collect();
        want.sort_by_key(|(_, i)| *i);

        let new = Vfs::new(VfsOptions::default());
        replay_pseudo_dirs(&new, &dirs).unwrap();
        let mut replay = IndexReplay::default();
        for (p, i) in &want {
            replay.mount_at(&new, Box::new(Placeholder), p, *i).unwrap();
        }
        for (p, i) in &want {
            assert_eq!(index_of(&new, p), *i, "{p}");
        }
        for d in &dirs {
            assert_eq!(
                new.get_root_pseudofs().path_walk(&d.path).unwrap(),
                Some(d.ino)
            );
        }
        // The placeholders are gone: each index is the real mount's, the others are free.
        assert!(new.get_rootfs("/a").unwrap().is_none());
        // A pseudo directory list in another order is caught.
        let mut swapped = dirs.clone();
        swapped.swap(0, 2);
        assert!(replay_pseudo_dirs(&Vfs::new(VfsOptions::default()), &swapped).is_err());
    }

    #[test]
    fn an_index_past_the_wrap_is_reached() {
        let new = Vfs::new(VfsOptions::default());
        new.get_root_pseudofs().mount("/x").unwrap();
        new.get_root_pseudofs().mount("/y").unwrap();
        let mut replay = IndexReplay::default();
        replay
            .mount_at(&new, Box::new(Placeholder), "/x", 250)
            .unwrap();
        // After 250 the counter wraps past 255 and 0 to reach 3.
        replay
            .mount_at(&new, Box::new(Placeholder), "/y", 3)
            .unwrap();
        assert_eq!(index_of(&new, "/x"), 250);
        assert_eq!(index_of(&new, "/y"), 3);
        assert!(replay
            .mount_at(&new, Box::new(Placeholder), "/y", 3)
            .is_err());
    }
}
