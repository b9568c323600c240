//! The virtio-fs DAX window: the guest maps file data straight from host pages instead of copying it
//! through FUSE_READ.
//!
//! The VMM reserves a VIRTIO Shared Memory Region (shmid 0) of `--dax-window` bytes and learns its size
//! through GET_SHMEM_CONFIG. The guest's FUSE_SETUPMAPPING asks us to place `len` bytes of a file at
//! `moffset` in that window; we answer with SHMEM_MAP requests on the backend channel (the fd travels as
//! SCM_RIGHTS), and FUSE_REMOVEMAPPING with SHMEM_UNMAP. [`DaxWindow`] is the connection's side of that
//! channel and the bookkeeping that refuses requests outside the window, unaligned or overlapping a live
//! mapping; [`admit`] refuses a SETUPMAPPING outside the window or longer than a 2 MiB range (and
//! [`DaxWindow::admit`] one over a live mapping) before any filesystem works on it;
//! [`rafs`] decides which bytes back a RAFS file range.

pub mod rafs;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode};
use fuse_backend_rs::abi::virtio_fs::{
    RemovemappingIn, RemovemappingOne, SetupmappingFlags, SetupmappingIn,
};
use fuse_backend_rs::transport::{FsCacheReqHandler, Reader};
use vhost::vhost_user::message::{VhostUserMMap, VhostUserMMapFlags};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vm_memory::bitmap::BitmapSlice;

use crate::error::{Error, Result};

/// Mappings are made of whole host pages.
pub const PAGE: u64 = 4096;
/// The Linux guest manages its window in 2 MiB ranges (FUSE_DAX_SZ), so the window is a multiple of that.
pub const WINDOW_ALIGN: u64 = 2 << 20;
/// Most ranges one REMOVEMAPPING may list: what fits a 64 KiB guest page, the most a Linux guest sends
/// (a page of 16-byte entries). The server allocates room for the guest's count before reading them.
pub const MAX_REMOVEMAPPING: u32 = (64 << 10) / 16;

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// Parse a window size: bytes, or a number with a binary suffix K, M, G or T (`8G`, `512M`, `512MiB`).
pub fn parse_size(text: &str) -> Result<u64> {
    let size = crate::config::parse_binary_size(text)
        .ok_or_else(|| Error::Invalid(format!("DAX window size {text:?}: not a size")))?;
    if size == 0 || !size.is_multiple_of(WINDOW_ALIGN) {
        return Err(Error::Invalid(format!(
            "DAX window size {text:?}: must be a non-zero multiple of 2 MiB"
        )));
    }
    Ok(size)
}

/// `[moffset, moffset + len)` lies inside a window of `size` bytes, on page boundaries; returns its end.
fn window_range(size: u64, moffset: u64, len: u64) -> io::Result<u64> {
    let end = moffset.checked_add(len).ok_or_else(einval)?;
    if len == 0 || !moffset.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) || end > size {
        return Err(einval());
    }
    Ok(end)
}

/// What the device makes of a request before the server hands it to a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// FUSE_INIT: a new session, which starts with an empty window.
    NewSession,
    /// A SETUPMAPPING outside the window, unaligned, longer than [`WINDOW_ALIGN`], with unknown flags
    /// or over another live mapping: answered EINVAL without reaching a filesystem (a RAFS file would
    /// otherwise fetch and copy the range before the window refused it).
    Refuse,
    /// Anything else, for the server and the filesystem to handle.
    Pass,
}

/// What the window needs to know of a request, read once from a copy of its reader.
enum Screened {
    Init,
    /// A SETUPMAPPING and its argument (a truncated one is the server's to refuse).
    SetupMapping(SetupmappingIn),
    /// A REMOVEMAPPING of this many ranges.
    RemoveMapping(u32),
    Other,
}

fn screen<S: BitmapSlice>(request: &Reader<'_, S>) -> Screened {
    let mut r = request.clone();
    match r.read_obj::<InHeader>() {
        Ok(h) if h.opcode == Opcode::Init as u32 => Screened::Init,
        Ok(h) if h.opcode == Opcode::SetupMapping as u32 => match r.read_obj::<SetupmappingIn>() {
            Ok(a) => Screened::SetupMapping(a),
            Err(_) => Screened::Other,
        },
        Ok(h) if h.opcode == Opcode::RemoveMapping as u32 => {
            match r.read_obj::<RemovemappingIn>() {
                Ok(a) => Screened::RemoveMapping(a.count),
                Err(_) => Screened::Other,
            }
        }
        _ => Screened::Other,
    }
}

/// Screen `request` for a window of `window` bytes (the virtio-fs device does this for every request;
/// the fuzz target too). Reads a copy of the reader: the request itself is left for the server. A
/// Linux guest maps its window in ranges of [`WINDOW_ALIGN`] (FUSE_DAX_SZ); a longer one would only
/// make a RAFS file fetch and copy more before the mapping is checked.
pub fn admit<S: BitmapSlice>(window: u64, request: &Reader<'_, S>) -> Admission {
    match screen(request) {
        Screened::Init => Admission::NewSession,
        Screened::SetupMapping(a) => admit_mapping(window, &a),
        Screened::RemoveMapping(count) => admit_removal(count),
        Screened::Other => Admission::Pass,
    }
}

/// A REMOVEMAPPING of `count` ranges: at most [`MAX_REMOVEMAPPING`].
fn admit_removal(count: u32) -> Admission {
    match count > MAX_REMOVEMAPPING {
        true => Admission::Refuse,
        false => Admission::Pass,
    }
}

/// A SETUPMAPPING's argument, screened for a window of `window` bytes (see [`admit`]).
fn admit_mapping(window: u64, a: &SetupmappingIn) -> Admission {
    if window_range(window, a.moffset, a.len).is_err()
        || a.len > WINDOW_ALIGN
        || SetupmappingFlags::from_bits(a.flags).is_none()
    {
        return Admission::Refuse;
    }
    Admission::Pass
}

/// The live mapping in the way of `[moffset, end)`, if any: only the very same range may be mapped
/// again (the guest re-maps a range in place to make it writable); anything else would silently
/// replace part of another file.
fn clash(maps: &BTreeMap<u64, u64>, moffset: u64, end: u64) -> Option<(u64, u64)> {
    maps.range(..end)
        .next_back()
        .map(|(&s, &e)| (s, e))
        .filter(|&(s, e)| e > moffset && (s, e) != (moffset, end))
}

/// One connection's DAX window: the backend request channel and the ranges mapped in it.
pub struct DaxWindow {
    size: u64,
    backend: Backend,
    /// Live mappings, start -> end (window offsets). Held across a request so two queues cannot race
    /// for the same range.
    maps: Mutex<BTreeMap<u64, u64>>,
}

impl DaxWindow {
    /// `backend` must come from a frontend that negotiated SHMEM and REPLY_ACK: every map is
    /// acknowledged before the guest hears that its SETUPMAPPING succeeded.
    pub fn new(size: u64, backend: Backend) -> Arc<Self> {
        backend.set_shmem_flag(true);
        backend.set_reply_ack_flag(true);
        Arc::new(DaxWindow {
            size,
            backend,
            maps: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The handler fuse-backend-rs passes to `FileSystem::setupmapping`/`removemapping`.
    pub fn requests(self: &Arc<Self>) -> WindowRequests {
        WindowRequests(self.clone())
    }

    /// Look at a request before the server hands it to a filesystem: see [`admit`].
    /// Also refuses a SETUPMAPPING over another live mapping, before a filesystem fetches its range.
    /// Best effort: the lock is not held until the map, which checks again.
    pub fn admit<S: BitmapSlice>(&self, request: &Reader<'_, S>) -> Admission {
        let a = match screen(request) {
            Screened::Init => return Admission::NewSession,
            Screened::Other => return Admission::Pass,
            Screened::RemoveMapping(count) => return admit_removal(count),
            Screened::SetupMapping(a) => a,
        };
        if admit_mapping(self.size, &a) == Admission::Refuse {
            return Admission::Refuse;
        }
        let maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        // Inside the window (admitted above): the end does not overflow.
        match clash(&maps, a.moffset, a.moffset + a.len) {
            Some((s, e)) => {
                log::warn!(
                    "DAX: SETUPMAPPING of window [{:#x}, {:#x}) overlaps the mapping [{s:#x}, {e:#x})",
                    a.moffset,
                    a.moffset + a.len
                );
                Admission::Refuse
            }
            None => Admission::Pass,
        }
    }

    fn check_range(&self, moffset: u64, len: u64) -> io::Result<u64> {
        window_range(self.size, moffset, len)
    }

    fn map(&self, foffset: u64, moffset: u64, len: u64, flags: u64, fd: RawFd) -> io::Result<()> {
        let end = self.check_range(moffset, len)?;
        if !foffset.is_multiple_of(PAGE) || foffset.checked_add(len).is_none() {
            return Err(einval());
        }
        let flags = SetupmappingFlags::from_bits(flags).ok_or_else(einval)?;
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, e)) = clash(&maps, moffset, end) {
            log::warn!(
                "DAX: map of window [{moffset:#x}, {end:#x}) overlaps the mapping [{s:#x}, {e:#x})"
            );
            return Err(einval());
        }
        let msg = VhostUserMMap {
            shmid: 0,
            fd_offset: foffset,
            shm_offset: moffset,
            len,
            flags: if flags.contains(SetupmappingFlags::WRITE) {
                VhostUserMMapFlags::WRITABLE.bits()
            } else {
                VhostUserMMapFlags::empty().bits()
            },
            ..Default::default()
        };
        self.backend.shmem_map(&msg, &fd).map_err(|e| {
            log::warn!("DAX: SHMEM_MAP [{moffset:#x}, {end:#x}): {e}");
            io::Error::from_raw_os_error(libc::EIO)
        })?;
        maps.insert(moffset, end);
        Ok(())
    }

    /// The live mappings, `(window offset, length)`, for a successor (live upgrade).
    pub fn live(&self) -> Vec<(u64, u64)> {
        let maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        maps.iter().map(|(&s, &e)| (s, e - s)).collect()
    }

    /// Take over a predecessor's live mappings (they stay mapped in the VMM), so that later overlap
    /// checks and REMOVEMAPPINGs know them. Ranges outside the window, unaligned or overlapping are
    /// refused, and then none is taken.
    pub fn adopt(&self, live: &[(u64, u64)]) -> io::Result<()> {
        let mut taken = BTreeMap::new();
        for &(start, len) in live {
            let end = self.check_range(start, len)?;
            if taken
                .range(..end)
                .next_back()
                .is_some_and(|(_, &e)| e > start)
            {
                return Err(einval());
            }
            taken.insert(start, end);
        }
        *self.maps.lock().unwrap_or_else(|e| e.into_inner()) = taken;
        Ok(())
    }

    /// A new FUSE session (FUSE_INIT) starts with an empty window: the guest's DAX code assumes so after
    /// a remount or reboot, and never removes what the previous session left. Unmap it all.
    pub fn reset(&self) {
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        if maps.is_empty() {
            return;
        }
        let msg = VhostUserMMap {
            shmid: 0,
            shm_offset: 0,
            len: self.size,
            ..Default::default()
        };
        match self.backend.shmem_unmap(&msg) {
            Ok(_) => maps.clear(),
            Err(e) => log::warn!("DAX: unmapping the window for a new session: {e}"),
        }
    }

    fn unmap(&self, requests: &[RemovemappingOne]) -> io::Result<()> {
        // Check every range before unmapping any, so a bad list changes nothing.
        for r in requests {
            self.check_range(r.moffset, r.len)?;
        }
        // Ranges that touch or overlap are one unmap: each is a round trip to the VMM with the window
        // locked (a list of 4096 adjacent pages was 4096 of them).
        let mut ranges: Vec<(u64, u64)> = requests
            .iter()
            .map(|r| (r.moffset, r.moffset + r.len))
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        for (start, end) in merged {
            let msg = VhostUserMMap {
                shmid: 0,
                shm_offset: start,
                len: end - start,
                ..Default::default()
            };
            self.backend.shmem_unmap(&msg).map_err(|e| {
                log::warn!("DAX: SHMEM_UNMAP [{start:#x}, {end:#x}): {e}");
                io::Error::from_raw_os_error(libc::EIO)
            })?;
            carve(&mut maps, start, end);
        }
        Ok(())
    }
}

/// Remove `[start, end)` from the set of live ranges, keeping the parts of ranges outside it.
fn carve(maps: &mut BTreeMap<u64, u64>, start: u64, end: u64) {
    let hit: Vec<(u64, u64)> = maps
        .range(..end)
        .rev()
        .take_while(|(_, &e)| e > start)
        .map(|(&s, &e)| (s, e))
        .collect();
    for (s, e) in hit {
        maps.remove(&s);
        if s < start {
            maps.insert(s, start);
        }
        if e > end {
            maps.insert(end, e);
        }
    }
}

/// `FsCacheReqHandler` over one connection's window (the trait wants an owned, `'static` value).
pub struct WindowRequests(Arc<DaxWindow>);

impl FsCacheReqHandler for WindowRequests {
    fn map(
        &mut self,
        foffset: u64,
        moffset: u64,
        len: u64,
        flags: u64,
        fd: RawFd,
    ) -> io::Result<()> {
        self.0.map(foffset, moffset, len, flags, fd)
    }

    fn unmap(&mut self, requests: Vec<RemovemappingOne>) -> io::Result<()> {
        self.0.unmap(&requests)
    }
}

/// An anonymous, sealed, read-only file holding `len` bytes: zeros except where `parts` put bytes. It
/// backs the pieces of a mapping that no cache file can (holes, the page after end of file, chunks that
/// are not page-aligned in the cache, images without a cache).
pub fn sealed_copy(len: u64, parts: &[(u64, Vec<u8>)]) -> io::Result<std::fs::File> {
    use std::os::unix::fs::FileExt;
    // SAFETY: a NUL-terminated name and flags; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"rafsd-dax".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(len)?;
    for (offset, bytes) in parts {
        file.write_all_at(bytes, *offset)?;
    }
    // The VMM gets this fd: seal it so the guest-visible bytes cannot change under the mapping.
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on our own descriptor.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes_and_must_fit_the_guest() {
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("2097152").unwrap(), 2 << 20);
        for bad in ["", "0", "1M", "3M", "abc", "-2M", "99999999999T", "2X"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn carving_keeps_the_outer_parts() {
        let mut m = BTreeMap::from([(0, 8192), (8192, 16384), (32768, 40960)]);
        carve(&mut m, 4096, 12288);
        assert_eq!(
            m.into_iter().collect::<Vec<_>>(),
            vec![(0, 4096), (12288, 16384), (32768, 40960)]
        );
    }

    #[test]
    fn sealed_copies_hold_the_parts_and_refuse_writes() {
        use std::os::unix::fs::FileExt;
        let f = sealed_copy(3 * PAGE, &[(PAGE, b"abc".to_vec())]).unwrap();
        let mut buf = vec![1u8; 3 * PAGE as usize];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[PAGE as usize..PAGE as usize + 3], b"abc");
        assert!(buf[..PAGE as usize].iter().all(|&b| b == 0));
        assert!(f.write_all_at(b"x", 0).is_err(), "sealed against writes");
    }
}
