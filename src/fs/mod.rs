//! The read-only filesystem service over a RAFS image: fuse-backend-rs `FileSystem` +
//! `BackendFileSystem`, shared by the host FUSE mount and the virtio-fs device (where several images are
//! pseudo mounts of one `Vfs`).
//!
//! Inode numbers are the image's own (v6 nids, v5 inode numbers) with the mount's epoch above them
//! ([`epoch`]); the image is immutable, so attributes and entries can be cached by the kernel for long.

pub mod blob_view;
pub mod epoch;
pub mod metrics;
pub mod pseudo_xattr;
pub mod readahead;

use std::any::Any;
use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader,
    ZeroCopyWriter,
};
use fuse_backend_rs::api::BackendFileSystem;
use fuse_backend_rs::transport::FsCacheReqHandler;

use crate::cache::prefetch::Prefetcher;
use crate::format::InodeAttr;
use crate::image::{RafsImage, Segment};
use epoch::Epoch;
use metrics::{FileLimit, FileMetricsOptions, Fop, FsMetrics};

/// How long the kernel may cache attributes and entries of an immutable image.
pub const CACHE_TIMEOUT: Duration = Duration::from_secs(1 << 32);
/// Inodes above this cannot be given with an epoch (the `Vfs` keeps the top 8 bits for the mount index,
/// the epoch the next 16).
const MAX_INO: u64 = epoch::MAX_INO;

/// (inode, value) pairs: lookup counts, or the parents of directories.
pub type InodePairs = Vec<(u64, u64)>;

pub struct RafsFs {
    image: Arc<RafsImage>,
    /// xattr requests are answered when the image records xattrs or the config asks for them.
    xattr_enabled: bool,
    /// Owner reported for every entry of an image built without uid/gid (`--repeatable`).
    default_owner: (u32, u32),
    /// The mount's `id_mapping`: owners are reported as the host sees them (see
    /// [`crate::config::IdMapping`]).
    id_mapping: Option<crate::config::IdMapping>,
    /// Kernel lookup counts per inode (FUSE LOOKUP/READDIRPLUS minus FORGET).
    lookups: Mutex<HashMap<u64, u64>>,
    /// Parent of each directory the kernel has looked up, for the ".." entry of readdir (the formats keep
    /// no parent pointer that both versions share). Pruned with the lookup counts.
    parents: Mutex<HashMap<u64, u64>>,
    pub metrics: FsMetrics,
    prefetcher: Mutex<Option<Prefetcher>>,
    /// The guest mounted with `dax=inode` (FUSE_PERFILE_DAX): mark regular files FUSE_ATTR_DAX.
    perfile_dax: AtomicBool,
    /// The files being read front to back, for read-ahead in the cache file.
    readahead: readahead::ReadAhead,
    /// Above every inode number the kernel is given (see [`epoch`]).
    epoch: Epoch,
}

fn eno(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// An entry the kernel may cache as long as it likes: image contents never change.
fn cached_entry(inode: u64, attr: stat64, attr_flags: u32) -> Entry {
    Entry {
        inode,
        generation: 0,
        attr,
        attr_flags,
        attr_timeout: CACHE_TIMEOUT,
        entry_timeout: CACHE_TIMEOUT,
    }
}

/// statfs of a read-only image: 4 KiB blocks, none free, 255-byte names.
fn image_statfs(blocks: u64, files: u64) -> statvfs64 {
    // SAFETY: statvfs64 is plain old data.
    let mut st: statvfs64 = unsafe { std::mem::zeroed() };
    st.f_bsize = 4096;
    st.f_frsize = 4096;
    st.f_blocks = blocks;
    st.f_files = files;
    st.f_namemax = 255;
    st
}

/// Turn an image error into the errno the kernel sees, logging what the reader cannot see.
fn to_io(e: crate::Error, what: &str) -> io::Error {
    match &e {
        crate::Error::NotFound(_) => {}
        crate::Error::Integrity(_) | crate::Error::Corrupt(_) => log::error!("{what}: {e}"),
        _ => log::warn!("{what}: {e}"),
    }
    eno(e.errno())
}

impl RafsFs {
    pub fn new(image: Arc<RafsImage>, enable_xattr: bool) -> Self {
        // SAFETY: plain getters.
        let owner = unsafe { (libc::geteuid(), libc::getegid()) };
        let xattr_enabled = enable_xattr || image.info().has_xattr();
        RafsFs {
            image,
            xattr_enabled,
            default_owner: owner,
            id_mapping: None,
            lookups: Mutex::new(HashMap::new()),
            parents: Mutex::new(HashMap::new()),
            metrics: FsMetrics::default(),
            prefetcher: Mutex::new(None),
            perfile_dax: AtomicBool::new(false),
            readahead: readahead::ReadAhead::default(),
            epoch: Epoch::NONE,
        }
    }

    /// Give the kernel inode numbers of `epoch` (none by default).
    pub fn with_epoch(mut self, epoch: Epoch) -> Self {
        self.epoch = epoch;
        self
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Keep the per-file records the config asks for (`iostats_files`, `access_pattern`,
    /// `latest_read_files`); without this call none are kept.
    pub fn with_file_metrics(mut self, opts: FileMetricsOptions) -> Self {
        let image = self.image.clone();
        let limit = FileLimit::new(self.image.info().inode_count, move |ino| {
            ino <= MAX_INO && image.inode(ino).is_ok()
        });
        self.metrics = FsMetrics::new(opts, limit);
        self
    }

    /// Report owners through `mapping` (a pod in a user namespace).
    pub fn with_id_mapping(mut self, mapping: Option<crate::config::IdMapping>) -> Self {
        self.id_mapping = mapping;
        self
    }

    pub fn image(&self) -> &Arc<RafsImage> {
        &self.image
    }

    /// Keep a running prefetch alive as long as the filesystem (stopped on unmount).
    pub fn set_prefetcher(&self, p: Prefetcher) {
        *self.prefetcher.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    }

    /// Outstanding kernel lookups of `ino` (for tests and diagnostics).
    pub fn lookup_count(&self, ino: u64) -> u64 {
        self.lookups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino)
            .copied()
            .unwrap_or(0)
    }

    /// The kernel's references into this filesystem, for a successor daemon: (inode, lookups) and
    /// (directory, parent) pairs.
    pub fn export_lookups(&self) -> (InodePairs, InodePairs) {
        let lookups = self.lookups.lock().unwrap_or_else(|e| e.into_inner());
        let parents = self.parents.lock().unwrap_or_else(|e| e.into_inner());
        (
            lookups.iter().map(|(k, v)| (*k, *v)).collect(),
            parents.iter().map(|(k, v)| (*k, *v)).collect(),
        )
    }

    /// [`RafsFs::import_lookups`] in place of those it holds.
    pub fn replace_lookups(&self, lookups: &[(u64, u64)], parents: &[(u64, u64)]) {
        self.lookups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.parents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.import_lookups(lookups, parents);
    }

    /// Take over the references a predecessor daemon handed down (see [`RafsFs::export_lookups`]).
    pub fn import_lookups(&self, lookups: &[(u64, u64)], parents: &[(u64, u64)]) {
        self.lookups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(lookups.iter().copied());
        self.parents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(parents.iter().copied());
    }

    fn attr(&self, ino: u64) -> io::Result<InodeAttr> {
        if ino > MAX_INO {
            return Err(eno(libc::EIO));
        }
        self.image
            .inode(ino)
            .map_err(|e| to_io(e, &format!("inode {ino}")))
    }

    fn stat(&self, a: &InodeAttr) -> stat64 {
        // SAFETY: stat64 is plain old data; all-zero is a valid value.
        let mut st: stat64 = unsafe { std::mem::zeroed() };
        let (uid, gid) = if self.image.info().explicit_uid_gid() {
            (a.uid, a.gid)
        } else {
            self.default_owner
        };
        let (uid, gid) = match &self.id_mapping {
            Some(m) => (m.to_external(uid), m.to_external(gid)),
            None => (uid, gid),
        };
        st.st_ino = a.ino;
        st.st_mode = a.mode;
        st.st_nlink = a.nlink as _;
        st.st_uid = uid;
        st.st_gid = gid;
        st.st_rdev = a.rdev as _;
        st.st_size = a.size as _;
        st.st_blksize = 4096;
        st.st_blocks = a.blocks() as _;
        for (sec, nsec) in [
            (&mut st.st_atime, &mut st.st_atime_nsec),
            (&mut st.st_mtime, &mut st.st_mtime_nsec),
            (&mut st.st_ctime, &mut st.st_ctime_nsec),
        ] {
            *sec = a.mtime as _;
            *nsec = a.mtime_nsec as _;
        }
        st
    }

    fn entry(&self, a: &InodeAttr) -> Entry {
        // Every regular file may be mapped: its bytes never change. (The kernel ignores the flag when
        // the device has no DAX window.)
        let attr_flags = if a.is_reg() && self.perfile_dax.load(Ordering::Relaxed) {
            fuse_backend_rs::abi::fuse_abi::FUSE_ATTR_DAX
        } else {
            0
        };
        cached_entry(self.epoch.outer(a.ino), self.stat(a), attr_flags)
    }

    fn remember_parent(&self, dir: u64, parent: u64) {
        self.parents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dir, parent);
    }

    /// The ".." of `dir`: the root is its own parent; a directory the kernel never looked up (it cannot
    /// list one it holds no reference to) falls back to itself.
    fn parent_of(&self, dir: u64) -> u64 {
        if dir == self.image.root_ino() {
            return dir;
        }
        self.parents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&dir)
            .copied()
            .unwrap_or(dir)
    }

    fn add_lookup(&self, ino: u64) {
        *self
            .lookups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(ino)
            .or_insert(0) += 1;
    }

    fn do_lookup(&self, parent: u64, name: &CStr) -> io::Result<Entry> {
        let found = self
            .image
            .lookup(parent, name.to_bytes())
            .map_err(|e| to_io(e, &format!("lookup in {parent}")))?;
        match found {
            // A negative entry the kernel may cache: the image never changes.
            None => Ok(cached_entry(0, self.stat(&self.attr(parent)?), 0)),
            Some(ino) => {
                let attr = self.attr(ino)?;
                let entry = self.entry(&attr);
                if attr.is_dir() {
                    self.remember_parent(ino, parent);
                } else if attr.is_reg() {
                    self.image.note_parent(ino, parent);
                }
                self.add_lookup(ino);
                Ok(entry)
            }
        }
    }

    /// The bytes a READ of `size` at `offset` of `ino` answers (fewer than `size` at the end of the file);
    /// `None` when `ino` is not a regular file of this image.
    pub fn read_size(&self, ino: u64, offset: u64, size: usize) -> Option<usize> {
        let inode = self.image.inode(ino).ok().filter(|i| i.is_reg())?;
        Some(inode.size.saturating_sub(offset).min(size as u64) as usize)
    }

    /// Whether a READ of `size` at `offset` of `ino` is answered without the backend (see
    /// [`RafsImage::range_is_cached`]).
    pub fn read_is_cached(&self, ino: u64, offset: u64, size: usize) -> bool {
        self.image.range_is_cached(ino, offset, size)
    }

    /// Answer a READ of `ino` into `reply`, as the `read` request does: the front ends that send a reply
    /// their own way (the FUSE front end's spliced replies) come here.
    pub fn read_into(
        &self,
        ino: u64,
        reply: &mut dyn ReadReply,
        size: u32,
        offset: u64,
    ) -> io::Result<usize> {
        let r = self.do_read(ino, reply, size, offset);
        if !reply.refused() {
            self.metrics.record_on(ino, Fop::Read, &r);
        }
        r
    }

    fn do_read(
        &self,
        ino: u64,
        reply: &mut dyn ReadReply,
        size: u32,
        offset: u64,
    ) -> io::Result<usize> {
        // The guest's size is not checked by the FUSE layer: never fetch more than the reply can carry.
        let size = (size as usize).min(reply.room());
        let to_reply = |e: io::Error| crate::Error::io("write the FUSE reply", e);
        // Cache file ranges that follow each other (the chunks of a file lie back to back in the blob)
        // go out as one range, so the disk sees the whole reply's range at once.
        let mut pending: Option<(RawFd, u64, usize)> = None;
        // Where the reply's last bytes lie in a cache file, when they come from one.
        let mut cached_end: Option<(RawFd, u64)> = None;
        let flush = |reply: &mut dyn ReadReply, p: &mut Option<(RawFd, u64, usize)>| match p.take()
        {
            Some((fd, offset, len)) => reply.cached(fd, offset, len).map_err(to_reply),
            None => Ok(()),
        };
        let total = self
            .image
            .read_with(ino, offset, size, &mut |segment| {
                let (fd, offset, len) = match segment {
                    Segment::Cached { file, offset, len } => (file.as_raw_fd(), offset, len),
                    other => {
                        cached_end = None;
                        flush(reply, &mut pending)?;
                        return match other {
                            Segment::Bytes(data) => reply.bytes(data).map_err(to_reply),
                            _ => reply.zeros(other.len()).map_err(to_reply),
                        };
                    }
                };
                cached_end = Some((fd, offset + len as u64));
                match &mut pending {
                    Some((pfd, po, plen)) if *pfd == fd && *po + *plen as u64 == offset => {
                        *plen += len
                    }
                    _ => {
                        flush(reply, &mut pending)?;
                        pending = Some((fd, offset, len));
                    }
                }
                Ok(())
            })
            .and_then(|n| flush(reply, &mut pending).map(|()| n));
        let total = match total {
            Ok(n) => n,
            Err(_) if reply.refused() => return Err(eno(libc::EAGAIN)),
            Err(e) => return Err(to_io(e, &format!("read inode {ino}"))),
        };
        if let Some((fd, cache_offset)) = cached_end {
            self.read_ahead(ino, offset, total as u64, fd, cache_offset);
        }
        self.metrics.record_read(ino, total);
        Ok(total)
    }

    /// After a reply of `len` bytes at `offset` of `ino` whose end lies at `cache_offset` of the cache file
    /// `fd`: read ahead the cache file bytes that follow, when the file is being read front to back (see
    /// [`readahead`]).
    fn read_ahead(&self, ino: u64, offset: u64, len: u64, fd: RawFd, cache_offset: u64) {
        if len < readahead::MIN_REQUEST {
            return;
        }
        let Ok(size) = self.image.inode(ino).map(|i| i.size) else {
            return;
        };
        let end = offset + len;
        if let Some((from, to)) = self.readahead.plan(ino, size, offset, end) {
            // A file's chunks lie back to back in the blob in the usual layout, so its next bytes follow
            // its last ones in the cache file. Where they do not, other bytes of the cache file are
            // loaded: wasted, never served (a reply's bytes are picked chunk by chunk).
            // SAFETY: as in do_read, the descriptor is the cache's; ManuallyDrop never closes it.
            let file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
            readahead::submit(&file, cache_offset.saturating_add(from - end), to - from);
        }
    }

    fn do_readdir(
        &self,
        dir: u64,
        offset: u64,
        plus: bool,
        add: &mut dyn FnMut(DirEntry, Option<Entry>) -> io::Result<usize>,
    ) -> io::Result<()> {
        if !self.attr(dir)?.is_dir() {
            return Err(eno(libc::ENOTDIR));
        }
        // "." and ".." come first, with cookies 1 and 2, as readdir(3) callers expect; the image's own
        // entries follow with their cookies moved up by two. The kernel takes no reference for the two
        // dot entries of READDIRPLUS, so they add no lookup count.
        for (cookie, name, ino) in [(1, &b"."[..], dir), (2, &b".."[..], self.parent_of(dir))] {
            if offset >= cookie {
                continue;
            }
            let dirent = DirEntry {
                ino: self.epoch.outer(ino),
                offset: cookie,
                type_: libc::DT_DIR as u32,
                name,
            };
            let entry = if plus {
                Some(self.entry(&self.attr(ino)?))
            } else {
                None
            };
            if add(dirent, entry)? == 0 {
                return Ok(());
            }
        }
        let mut failure = None;
        let walked = self
            .image
            .read_dir(dir, offset.saturating_sub(2), &mut |e| {
                let dirent = DirEntry {
                    // As the kernel will know the entry (a number no inode can have goes as it is).
                    ino: if e.ino <= MAX_INO {
                        self.epoch.outer(e.ino)
                    } else {
                        e.ino
                    },
                    offset: e.offset + 2,
                    type_: dtype(e.file_type),
                    name: &e.name,
                };
                let entry = if plus {
                    match self.attr(e.ino) {
                        Ok(a) => Some(self.entry(&a)),
                        Err(err) => {
                            failure = Some(err);
                            return Ok(false);
                        }
                    }
                } else {
                    None
                };
                match add(dirent, entry) {
                    // 0: the reply buffer is full; this entry was not sent, so it gets no lookup count.
                    Ok(0) => Ok(false),
                    Ok(_) => {
                        if plus {
                            if e.file_type == libc::S_IFDIR {
                                self.remember_parent(e.ino, dir);
                            } else if e.file_type == libc::S_IFREG {
                                self.image.note_parent(e.ino, dir);
                            }
                            self.add_lookup(e.ino);
                        }
                        Ok(true)
                    }
                    Err(err) => {
                        failure = Some(err);
                        Ok(false)
                    }
                }
            });
        walked.map_err(|e| to_io(e, &format!("readdir {dir}")))?;
        failure.map_or(Ok(()), Err)
    }

    /// The xattrs of `ino`; none when they are off. Never ENOSYS: the kernel takes that as "no xattrs
    /// on this connection", for every mount of the daemon (other images, a VM's passthrough shares).
    fn xattr_list(&self, ino: u64) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if !self.xattr_enabled {
            return Ok(Vec::new());
        }
        self.image
            .xattrs(ino)
            .map_err(|e| to_io(e, &format!("xattrs of {ino}")))
    }
}

/// Where the bytes of a READ reply go, piece by piece: ranges of blob cache files, bytes, zeros.
pub trait ReadReply {
    /// The most bytes the reply can carry.
    fn room(&self) -> usize;
    /// `len` bytes of the file `fd` (a blob cache file, valid for the call) at `offset`.
    fn cached(&mut self, fd: RawFd, offset: u64, len: usize) -> io::Result<()>;
    fn bytes(&mut self, data: &[u8]) -> io::Result<()>;
    fn zeros(&mut self, len: usize) -> io::Result<()>;
    /// The reply's own way out failed (not the read): the front end answers the request another way, so
    /// this attempt is neither an error of the read nor counted as one.
    fn refused(&self) -> bool {
        false
    }
}

/// A reply through fuse-backend-rs's writer, which copies every piece into its buffer.
struct WriterReply<'a>(&'a mut dyn ZeroCopyWriter);

impl ReadReply for WriterReply<'_> {
    fn room(&self) -> usize {
        self.0.available_bytes()
    }

    fn cached(&mut self, fd: RawFd, offset: u64, len: usize) -> io::Result<()> {
        // SAFETY: the caller keeps `fd` open for the call; ManuallyDrop never closes it.
        let mut borrowed = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
        let mut done = 0;
        while done < len {
            match self
                .0
                .write_from(&mut *borrowed, len - done, offset + done as u64)?
            {
                0 => return Err(eno(libc::EIO)),
                n => done += n,
            }
        }
        Ok(())
    }

    fn bytes(&mut self, data: &[u8]) -> io::Result<()> {
        self.0.write_all(data)
    }

    fn zeros(&mut self, len: usize) -> io::Result<()> {
        write_zeros(&mut *self.0, len)
    }
}

/// Zero bytes for holes, written a page at a time.
pub const ZERO_PAGE: [u8; 4096] = [0; 4096];

/// `n` zero bytes into `w`, from a small static buffer (a hole costs no allocation).
fn write_zeros(w: &mut dyn io::Write, mut n: usize) -> io::Result<()> {
    while n > 0 {
        let k = n.min(ZERO_PAGE.len());
        w.write_all(&ZERO_PAGE[..k])?;
        n -= k;
    }
    Ok(())
}

/// The xattr reply rule: a size-0 request only asks for the length (false); a buffer too small for `len`
/// bytes is ERANGE; otherwise the data is sent (true).
fn reply_fits(len: usize, size: u32) -> io::Result<bool> {
    match size {
        0 => Ok(false),
        s if len > s as usize => Err(eno(libc::ERANGE)),
        _ => Ok(true),
    }
}

fn dtype(file_type: u32) -> u32 {
    (match file_type {
        libc::S_IFREG => libc::DT_REG,
        libc::S_IFDIR => libc::DT_DIR,
        libc::S_IFLNK => libc::DT_LNK,
        libc::S_IFCHR => libc::DT_CHR,
        libc::S_IFBLK => libc::DT_BLK,
        libc::S_IFIFO => libc::DT_FIFO,
        libc::S_IFSOCK => libc::DT_SOCK,
        _ => libc::DT_UNKNOWN,
    }) as u32
}

/// Every request that would change the image.
macro_rules! read_only {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        $(fn $name(&self, $(_: $ty),*) -> io::Result<$ret> { Err(eno(libc::EROFS)) })*
    };
}

impl FileSystem for RafsFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let wanted = FsOptions::ASYNC_READ
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::BIG_WRITES
            | FsOptions::DO_READDIRPLUS
            | FsOptions::CACHE_SYMLINKS
            | FsOptions::MAX_PAGES
            | FsOptions::ZERO_MESSAGE_OPENDIR
            | FsOptions::PERFILE_DAX;
        self.perfile_dax
            .store(capable.contains(FsOptions::PERFILE_DAX), Ordering::Relaxed);
        Ok(capable & wanted)
    }

    fn destroy(&self) {
        // Stop background prefetch with the filesystem.
        self.prefetcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let r = self
            .epoch
            .inner(parent)
            .and_then(|parent| self.do_lookup(parent, name));
        self.metrics.record(Fop::Lookup, &r);
        r
    }

    fn forget(&self, _ctx: &Context, inode: u64, count: u64) {
        // A number of another mount holds nothing here.
        let Ok(inode) = self.epoch.inner(inode) else {
            return;
        };
        let mut lookups = self.lookups.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = lookups.get_mut(&inode) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                lookups.remove(&inode);
                self.parents
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&inode);
            }
        }
        drop(lookups);
        self.metrics.record::<()>(Fop::Forget, &Ok(()));
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in requests {
            self.forget(ctx, inode, count);
        }
        self.metrics.record::<()>(Fop::BatchForget, &Ok(()));
    }

    fn getattr(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        let inode = self.epoch.inner(inode)?;
        let r = self.attr(inode).map(|a| (self.stat(&a), CACHE_TIMEOUT));
        self.metrics.record_on(inode, Fop::Getattr, &r);
        r
    }

    fn readlink(&self, _ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        let inode = self.epoch.inner(inode)?;
        let r = self
            .image
            .readlink(inode)
            .map_err(|e| to_io(e, &format!("readlink {inode}")));
        self.metrics.record_on(inode, Fop::Readlink, &r);
        r
    }

    fn open(
        &self,
        _ctx: &Context,
        inode: u64,
        flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let inode = self.epoch.inner(inode)?;
        let r = if flags as i32 & (libc::O_WRONLY | libc::O_RDWR | libc::O_TRUNC | libc::O_APPEND)
            != 0
        {
            Err(eno(libc::EROFS))
        } else {
            self.attr(inode)
                .map(|_| (None, OpenOptions::KEEP_CACHE, None))
        };
        if r.is_ok() {
            self.metrics
                .nr_opens
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.metrics.record_on(inode, Fop::Open, &r);
        r
    }

    fn release(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
        _handle: u64,
        _flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        let inode = self.epoch.inner(inode)?;
        self.metrics.record_on::<()>(inode, Fop::Release, &Ok(()));
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
        self.read_into(inode, &mut WriterReply(w), size, offset)
    }

    fn setupmapping(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        let inode = self.epoch.inner(inode)?;
        crate::dax::rafs::setup(&self.image, inode, foffset, len, flags, moffset, vu_req)
    }

    fn removemapping(
        &self,
        _ctx: &Context,
        _inode: u64,
        requests: Vec<RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        vu_req.unmap(requests)
    }

    fn statfs(&self, _ctx: &Context, _inode: u64) -> io::Result<statvfs64> {
        let info = self.image.info();
        let r = Ok(image_statfs(
            info.blobs.iter().map(|b| b.uncompressed_size / 4096).sum(),
            info.inode_count,
        ));
        self.metrics.record(Fop::Statfs, &r);
        r
    }

    fn getxattr(
        &self,
        _ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let inode = self.epoch.inner(inode)?;
        let r = self.xattr_list(inode).and_then(|list| {
            let value = list
                .into_iter()
                .find(|(n, _)| n.as_slice() == name.to_bytes())
                .map(|(_, v)| v)
                .ok_or_else(|| eno(libc::ENODATA))?;
            Ok(match reply_fits(value.len(), size)? {
                true => GetxattrReply::Value(value),
                false => GetxattrReply::Count(value.len() as u32),
            })
        });
        self.metrics.record_on(inode, Fop::Getxattr, &r);
        r
    }

    fn listxattr(&self, _ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        let inode = self.epoch.inner(inode)?;
        let r = self.xattr_list(inode).and_then(|list| {
            let mut names = Vec::new();
            for (n, _) in list {
                names.extend_from_slice(&n);
                names.push(0);
            }
            Ok(match reply_fits(names.len(), size)? {
                true => ListxattrReply::Names(names),
                false => ListxattrReply::Count(names.len() as u32),
            })
        });
        self.metrics.record_on(inode, Fop::Listxattr, &r);
        r
    }

    fn opendir(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let inode = self.epoch.inner(inode)?;
        let r = self.attr(inode).and_then(|a| {
            if a.is_dir() {
                Ok((None, OpenOptions::CACHE_DIR | OpenOptions::KEEP_CACHE))
            } else {
                Err(eno(libc::ENOTDIR))
            }
        });
        self.metrics.record_on(inode, Fop::Opendir, &r);
        r
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
        let inode = self.epoch.inner(inode)?;
        let r = self.do_readdir(inode, offset, false, &mut |d, _| add_entry(d));
        self.metrics.record_on(inode, Fop::Readdir, &r);
        r
    }

    fn readdirplus(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let inode = self.epoch.inner(inode)?;
        let r = self.do_readdir(inode, offset, true, &mut |d, e| {
            add_entry(d, e.expect("readdirplus entries carry attributes"))
        });
        self.metrics.record_on(inode, Fop::Readdirplus, &r);
        r
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        let inode = self.epoch.inner(inode)?;
        let r = self.attr(inode).and_then(|a| {
            let mask = mask as i32;
            if mask & libc::W_OK != 0 {
                return Err(eno(libc::EROFS));
            }
            let st = self.stat(&a);
            let mode = st.st_mode;
            let granted = if ctx.uid == 0 {
                // root reads anything; executes only what some x bit (or a directory) allows.
                libc::R_OK
                    | if a.is_dir() || mode & 0o111 != 0 {
                        libc::X_OK
                    } else {
                        0
                    }
            } else {
                let bits = if ctx.uid == st.st_uid {
                    mode >> 6
                } else if ctx.gid == st.st_gid {
                    mode >> 3
                } else {
                    mode
                } & 0o7;
                (if bits & 0o4 != 0 { libc::R_OK } else { 0 })
                    | (if bits & 0o1 != 0 { libc::X_OK } else { 0 })
            };
            if mask & !granted & (libc::R_OK | libc::X_OK) != 0 {
                Err(eno(libc::EACCES))
            } else {
                Ok(())
            }
        });
        self.metrics.record_on(inode, Fop::Access, &r);
        r
    }

    read_only! {
        setattr(ctx: &Context, inode: u64, attr: stat64, handle: Option<u64>, valid: SetattrValid) -> (stat64, Duration);
        symlink(ctx: &Context, linkname: &CStr, parent: u64, name: &CStr) -> Entry;
        mknod(ctx: &Context, parent: u64, name: &CStr, mode: u32, rdev: u32, umask: u32) -> Entry;
        mkdir(ctx: &Context, parent: u64, name: &CStr, mode: u32, umask: u32) -> Entry;
        unlink(ctx: &Context, parent: u64, name: &CStr) -> ();
        rmdir(ctx: &Context, parent: u64, name: &CStr) -> ();
        rename(ctx: &Context, olddir: u64, oldname: &CStr, newdir: u64, newname: &CStr, flags: u32) -> ();
        link(ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> Entry;
        create(ctx: &Context, parent: u64, name: &CStr, args: CreateIn) -> (Entry, Option<u64>, OpenOptions, Option<u32>);
        write(ctx: &Context, inode: u64, handle: u64, r: &mut dyn ZeroCopyReader, size: u32, offset: u64, lock_owner: Option<u64>, delayed_write: bool, flags: u32, fuse_flags: u32) -> usize;
        fallocate(ctx: &Context, inode: u64, handle: u64, mode: u32, offset: u64, length: u64) -> ();
        setxattr(ctx: &Context, inode: u64, name: &CStr, value: &[u8], flags: u32) -> ();
        removexattr(ctx: &Context, inode: u64, name: &CStr) -> ();
    }
}

impl BackendFileSystem for RafsFs {
    fn mount(&self) -> io::Result<(Entry, u64)> {
        let root = self.attr(self.image.root_ino())?;
        let max = self.epoch.outer(self.image.meta().max_ino().min(MAX_INO));
        Ok((self.entry(&root), max))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
