//! The blob view: a read-only directory that shows a RAFS v6 image the way the guest kernel's EROFS
//! driver wants it. It holds `bootstrap` (the bootstrap file, byte for byte) and one file per blob, named
//! by blob id, of the blob's *uncompressed* size with every chunk's bytes at its uncompressed offset: the
//! kernel reads device `blob index + 1` at `blkaddr * block size` from the chunk indexes, so the file must
//! be laid out as if the blob had never been compressed. Reads are served lazily through the image's
//! verified read path (fetch, decompress, verify, cache); bytes no chunk covers read as zeros.
//!
//! Mounted through the admin API like any pseudo mount, with `fs_type` `"blob_view"` and the same source
//! and config as the `"rafs"` mount of the image; `rafs-guest mount` in the guest then mounts EROFS from it.

use std::any::Any;
use std::ffi::CStr;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, FsOptions, OpenOptions};
use fuse_backend_rs::api::filesystem::{Context, DirEntry, Entry, FileSystem, ZeroCopyWriter};
use fuse_backend_rs::api::BackendFileSystem;

use super::epoch::Epoch;
use super::{cached_entry, eno, image_statfs, write_zeros, CACHE_TIMEOUT};
use crate::error::{Error, Result};
use crate::format::blob_meta::ChunkInfoArray;
use crate::format::{limits, MetaBytes};
use crate::image::{load_metadata, MetaSource, RafsImage};
use crate::service::{open_image, RafsMount};

const ROOT_INO: u64 = 1;
const BOOTSTRAP_INO: u64 = 2;
/// Blob `i` is inode `FIRST_BLOB_INO + i`.
const FIRST_BLOB_INO: u64 = 3;
/// The name of the bootstrap file in the view.
pub const BOOTSTRAP_NAME: &str = "bootstrap";

/// One chunk's place in the uncompressed blob: (uncompressed offset, uncompressed size, CI index).
type Placement = (u64, u32, u32);

pub struct BlobViewFs {
    image: Arc<RafsImage>,
    bootstrap: MetaBytes,
    /// Per blob, the CI indexes of its chunks sorted by uncompressed offset (4 bytes a chunk, at most
    /// [`limits::MAX_VIEW_CHUNKS`] over the image); built on the first read of that blob.
    placements: Mutex<Vec<Option<Arc<Vec<u32>>>>>,
    owner: (u32, u32),
    /// Above every inode number the kernel is given, as for an image ([`super::epoch`]).
    epoch: Epoch,
}

fn to_io(e: Error, what: &str) -> io::Error {
    log::error!("blob view: {what}: {e}");
    eno(e.errno())
}

impl BlobViewFs {
    /// Open the image a `"rafs"` mount with the same source and config would serve, and view its blobs.
    pub fn build(mount: &RafsMount) -> Result<Self> {
        Self::new(open_image(mount)?)
    }

    pub fn new(image: Arc<RafsImage>) -> Result<Self> {
        if image.info().version != 6 {
            return Err(Error::Unsupported(
                "the blob view needs a RAFS v6 image (v5 metadata is not EROFS)".into(),
            ));
        }
        let path = match image.source() {
            MetaSource::Bootstrap(p) => p.clone(),
            // The device table of an inline-meta bootstrap names a placeholder, not the blob: a guest
            // kernel could not tell which device is which.
            MetaSource::InlineBlob { path, .. } => {
                return Err(Error::Unsupported(format!(
                    "{}: the blob view needs a separate bootstrap, not metadata inlined in a blob",
                    path.display()
                )))
            }
        };
        let chunks: u64 = image
            .info()
            .blobs
            .iter()
            .map(|b| b.chunk_count as u64)
            .sum();
        if chunks > limits::MAX_VIEW_CHUNKS {
            return Err(limits::exceeded(
                format!("the blob view would index its {chunks} chunks"),
                "4 Mi chunks per image",
            ));
        }
        let (bootstrap, _) = load_metadata(&path)?;
        let nblobs = image.info().blobs.len();
        // SAFETY: plain getters.
        let owner = unsafe { (libc::geteuid(), libc::getegid()) };
        Ok(BlobViewFs {
            image,
            bootstrap,
            placements: Mutex::new(vec![None; nblobs]),
            owner,
            epoch: Epoch::NONE,
        })
    }

    /// Give the kernel inode numbers of `epoch` (none by default).
    pub fn with_epoch(mut self, epoch: Epoch) -> Self {
        self.epoch = epoch;
        self
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    fn blob_of(&self, ino: u64) -> Option<u32> {
        let i = ino.checked_sub(FIRST_BLOB_INO)?;
        (i < self.image.info().blobs.len() as u64).then_some(i as u32)
    }

    fn name_of(&self, ino: u64) -> Option<&str> {
        match ino {
            BOOTSTRAP_INO => Some(BOOTSTRAP_NAME),
            _ => self
                .blob_of(ino)
                .map(|b| self.image.info().blobs[b as usize].id.as_str()),
        }
    }

    fn size_of(&self, ino: u64) -> u64 {
        match ino {
            BOOTSTRAP_INO => self.bootstrap.len() as u64,
            _ => self
                .blob_of(ino)
                .map_or(0, |b| self.image.info().blobs[b as usize].uncompressed_size),
        }
    }

    fn stat(&self, ino: u64) -> io::Result<stat64> {
        // SAFETY: stat64 is plain old data; all-zero is a valid value.
        let mut st: stat64 = unsafe { std::mem::zeroed() };
        st.st_ino = ino;
        if ino == ROOT_INO {
            st.st_mode = libc::S_IFDIR | 0o555;
            st.st_nlink = 2;
        } else if self.name_of(ino).is_some() {
            st.st_mode = libc::S_IFREG | 0o444;
            st.st_nlink = 1;
            st.st_size = self.size_of(ino) as _;
            st.st_blocks = self.size_of(ino).div_ceil(512) as _;
        } else {
            return Err(eno(libc::ENOENT));
        }
        st.st_uid = self.owner.0;
        st.st_gid = self.owner.1;
        st.st_blksize = 4096;
        st.st_mtime = self.image.info().build_time as _;
        st.st_ctime = st.st_mtime;
        st.st_atime = st.st_mtime;
        Ok(st)
    }

    fn entry(&self, ino: u64) -> io::Result<Entry> {
        Ok(cached_entry(self.epoch.outer(ino), self.stat(ino)?, 0))
    }

    /// The files of the root directory, in readdir order.
    fn children(&self) -> impl Iterator<Item = (u64, &str)> {
        let blobs = self.image.info().blobs.len() as u64;
        std::iter::once(BOOTSTRAP_INO)
            .chain(FIRST_BLOB_INO..FIRST_BLOB_INO + blobs)
            .filter_map(|ino| self.name_of(ino).map(|n| (ino, n)))
    }

    /// CI indexes of blob `b`'s chunks by uncompressed offset, from its chunk-info array.
    fn placements(&self, b: u32) -> Result<Arc<Vec<u32>>> {
        if let Some(p) = &self.placements.lock().unwrap_or_else(|e| e.into_inner())[b as usize] {
            return Ok(p.clone());
        }
        let array = self.image.chunk_info_array(b)?;
        let mut keyed = Vec::with_capacity(array.len() as usize);
        for ci in 0..array.len() {
            keyed.push((array.get(ci)?.uncompressed_offset, ci));
        }
        keyed.sort_unstable();
        let list = Arc::new(keyed.into_iter().map(|(_, ci)| ci).collect::<Vec<u32>>());
        self.placements.lock().unwrap_or_else(|e| e.into_inner())[b as usize] = Some(list.clone());
        Ok(list)
    }

    /// Placement `k` of blob `b`: its chunk's (uncompressed offset, uncompressed size, CI index).
    fn placement(&self, array: &ChunkInfoArray, list: &[u32], k: usize) -> Result<Placement> {
        let c = array.get(list[k])?;
        Ok((c.uncompressed_offset, c.uncompressed_size, list[k]))
    }

    /// Read `[offset, offset + size)` of the view's file `name` (`bootstrap` or a blob id), as the guest
    /// would see it.
    pub fn read_file(&self, name: &str, offset: u64, size: usize) -> Result<Vec<u8>> {
        let (ino, _) = self
            .children()
            .find(|(_, n)| *n == name)
            .ok_or_else(|| Error::NotFound(format!("blob view has no file {name:?}")))?;
        let mut out = Vec::with_capacity(size);
        match self.blob_of(ino) {
            Some(b) => {
                self.read_blob(b, &mut out, offset, size)?;
            }
            None => out.extend_from_slice(self.bootstrap_range(offset, size)),
        }
        Ok(out)
    }

    fn bootstrap_range(&self, offset: u64, size: usize) -> &[u8] {
        let data: &[u8] = &self.bootstrap;
        let start = offset.min(data.len() as u64) as usize;
        &data[start..data.len().min(start.saturating_add(size))]
    }

    /// `[offset, offset + size)` of uncompressed blob `b` into `w`: verified chunk bytes, zeros between.
    fn read_blob(&self, b: u32, w: &mut dyn Write, offset: u64, size: usize) -> Result<usize> {
        let blob_size = self.image.info().blobs[b as usize].uncompressed_size;
        if offset >= blob_size {
            return Ok(0);
        }
        let end = blob_size.min(offset.saturating_add(size as u64));
        let array = self.image.chunk_info_array(b)?;
        let list = self.placements(b)?;
        let first = list.partition_point(|&ci| {
            array.get(ci).map_or(true, |c| {
                c.uncompressed_offset + c.uncompressed_size as u64 <= offset
            })
        });
        let mut pos = offset;
        let io = |e: io::Error| Error::io("write the FUSE reply", e);
        for k in first..list.len() {
            let (at, len, ci) = self.placement(&array, &list, k)?;
            if at >= end {
                break;
            }
            let chunk_end = at + len as u64;
            if chunk_end <= pos {
                continue; // overlaps one already served (corrupt metadata): keep the first
            }
            if at > pos {
                write_zeros(w, (at - pos) as usize).map_err(io)?;
                pos = at;
            }
            let info = self.image.blob_chunk(b, ci)?;
            let data = self.image.chunk_data(&info)?;
            let from = (pos - at) as usize;
            let to = (end.min(chunk_end) - at) as usize;
            let bytes = data.get(from..to).ok_or_else(|| {
                Error::Integrity(format!(
                    "blob {} chunk {ci}: {} bytes, the blob meta says {len}",
                    info.blob_index,
                    data.len()
                ))
            })?;
            w.write_all(bytes).map_err(io)?;
            pos = at + to as u64;
        }
        if pos < end {
            write_zeros(w, (end - pos) as usize).map_err(io)?;
        }
        Ok((end - offset) as usize)
    }
}

impl FileSystem for BlobViewFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        Ok(capable
            & (FsOptions::ASYNC_READ
                | FsOptions::PARALLEL_DIROPS
                | FsOptions::MAX_PAGES
                | FsOptions::ZERO_MESSAGE_OPENDIR))
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let parent = self.epoch.inner(parent)?;
        if parent != ROOT_INO {
            return Err(eno(libc::ENOTDIR));
        }
        let name = name.to_bytes();
        match self.children().find(|(_, n)| n.as_bytes() == name) {
            Some((ino, _)) => self.entry(ino),
            None => Err(eno(libc::ENOENT)),
        }
    }

    fn getattr(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        Ok((self.stat(self.epoch.inner(inode)?)?, CACHE_TIMEOUT))
    }

    fn open(
        &self,
        _ctx: &Context,
        inode: u64,
        flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        if flags as i32 & (libc::O_WRONLY | libc::O_RDWR | libc::O_TRUNC | libc::O_APPEND) != 0 {
            return Err(eno(libc::EROFS));
        }
        let inode = self.epoch.inner(inode)?;
        if inode == ROOT_INO {
            return Err(eno(libc::EISDIR));
        }
        self.stat(inode)?;
        Ok((None, OpenOptions::KEEP_CACHE, None))
    }

    fn release(
        &self,
        _ctx: &Context,
        _inode: u64,
        _flags: u32,
        _handle: u64,
        _flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        Ok(())
    }

    fn read(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let inode = self.epoch.inner(inode)?;
        if inode == BOOTSTRAP_INO {
            let data = self.bootstrap_range(offset, (size as usize).min(w.available_bytes()));
            w.write_all(data)?;
            return Ok(data.len());
        }
        let b = self.blob_of(inode).ok_or_else(|| eno(libc::EBADF))?;
        // The guest's size is not checked by the FUSE layer: never fetch more than the reply can carry.
        let size = (size as usize).min(w.available_bytes());
        self.read_blob(b, w as &mut dyn Write, offset, size)
            .map_err(|e| to_io(e, &format!("read blob {b} at {offset}+{size}")))
    }

    fn opendir(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        if self.epoch.inner(inode)? != ROOT_INO {
            return Err(eno(libc::ENOTDIR));
        }
        Ok((None, OpenOptions::CACHE_DIR | OpenOptions::KEEP_CACHE))
    }

    fn releasedir(&self, _ctx: &Context, _inode: u64, _flags: u32, _handle: u64) -> io::Result<()> {
        Ok(())
    }

    fn readdir(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        if self.epoch.inner(inode)? != ROOT_INO {
            return Err(eno(libc::ENOTDIR));
        }
        for (i, (ino, name)) in self.children().enumerate().skip(offset as usize) {
            let added = add_entry(DirEntry {
                ino: self.epoch.outer(ino),
                offset: i as u64 + 1,
                type_: libc::DT_REG as u32,
                name: name.as_bytes(),
            })?;
            if added == 0 {
                break;
            }
        }
        Ok(())
    }

    fn statfs(&self, _ctx: &Context, _inode: u64) -> io::Result<statvfs64> {
        let bytes: u64 = self.children().map(|(ino, _)| self.size_of(ino)).sum();
        Ok(image_statfs(
            bytes / 4096,
            self.children().count() as u64 + 1,
        ))
    }

    fn access(&self, _ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        self.stat(self.epoch.inner(inode)?)?;
        if mask as i32 & libc::W_OK != 0 {
            return Err(eno(libc::EROFS));
        }
        Ok(())
    }
}

impl BackendFileSystem for BlobViewFs {
    fn mount(&self) -> io::Result<(Entry, u64)> {
        Ok((
            self.entry(ROOT_INO)?,
            self.epoch
                .outer(FIRST_BLOB_INO + self.image.info().blobs.len() as u64),
        ))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
