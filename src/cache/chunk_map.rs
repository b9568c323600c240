//! The persistent ready-bitmap of a cached blob, in nydusd's layout: a 4096-byte header, then one bit per
//! chunk (MSB first).
//!
//! A bit is set only after the chunk's bytes were written to the data file, so a daemon killed at any
//! point leaves either a ready chunk or a missing one, never a torn one marked ready.
//!
//! Other daemons may have the same bitmap mapped: a file is never resized or rewritten in place (a shrunk
//! mapping kills its other users with SIGBUS). A bitmap that does not fit is replaced by a fresh file
//! renamed over it; whoever has the old one keeps it. Every page of a bitmap has its block before it is
//! mapped (a page without one faults on a full disk: SIGBUS again).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

use super::install;
use crate::error::{Error, Result};

const HEADER_SIZE: usize = 4096;
const MAGIC: u32 = 0x424D_4150;
const MAGIC2: u32 = 0x434D_4150;
const ALL_READY: u32 = 0x4D4D_4150;
const VERSION: u32 = 1;

pub struct ChunkMap {
    map: memmap2::MmapMut,
    count: u32,
}

fn file_size(count: u32) -> u64 {
    HEADER_SIZE as u64 + (count as u64).div_ceil(8)
}

/// The header of a fresh bitmap (no chunk ready).
fn fresh_header() -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&MAGIC2.to_le_bytes());
    h
}

/// Size and header of an existing bitmap file agree with `count` chunks.
fn fits(file: &File, count: u32) -> Result<bool> {
    let len = file
        .metadata()
        .map_err(|e| Error::io("stat chunk map", e))?
        .len();
    let mut head = [0u8; 16];
    if len != file_size(count) || file.read_exact_at(&mut head, 0).is_err() {
        return Ok(false);
    }
    let at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap());
    Ok(at(0) == MAGIC && at(4) == VERSION && at(8) == MAGIC2)
}

/// Give the first `len` bytes of a bitmap file their blocks. Bits are set through a shared mapping, where
/// the first store to a page without a block needs one: on a full disk that is SIGBUS, which kills the
/// daemon and every mount in it. A `fresh` file (not linked yet, no bits) that the filesystem cannot
/// fallocate is written with zeros instead; an existing one is left as it is (writing would race with
/// other daemons setting bits).
fn allocate(file: &File, len: u64, fresh: bool) -> std::io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    loop {
        // SAFETY: fallocate on a descriptor we own; mode 0 only allocates, the size is unchanged.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) if fresh => {
                return file.write_all_at(&vec![0u8; len as usize], 0);
            }
            Some(libc::EOPNOTSUPP) => {
                log::warn!("chunk map: the cache filesystem cannot preallocate ({e}); a full disk may fault");
                return Ok(());
            }
            _ => return Err(e),
        }
    }
}

impl ChunkMap {
    /// Open the bitmap at `path` for `count` chunks. A missing one is created (all clear); one of another
    /// size or with a foreign header is replaced by a fresh one (its state cannot be trusted).
    pub fn open(path: &Path, count: u32) -> Result<Self> {
        for _ in 0..4 {
            let file = match OpenOptions::new().read(true).write(true).open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    install(path, false, |f| Self::prepare(f, count))?;
                    continue;
                }
                Err(e) => return Err(Error::io(format!("open chunk map {}", path.display()), e)),
            };
            if !fits(&file, count)? {
                log::warn!(
                    "chunk map {} does not fit {count} chunks: replacing it with an empty one",
                    path.display()
                );
                Self::reset(path, count)?;
                continue;
            }
            // Maps made by earlier versions may have holes; cheap where the blocks are there already.
            allocate(&file, file_size(count), false)
                .map_err(|e| Error::io(format!("allocate chunk map {}", path.display()), e))?;
            // SAFETY: the file has its final size and is never resized or rewritten in place by rafsd
            // (replacements are renamed over it); bits are only touched through atomics.
            let map = unsafe { memmap2::MmapMut::map_mut(&file) }
                .map_err(|e| Error::io(format!("mmap {}", path.display()), e))?;
            return Ok(ChunkMap { map, count });
        }
        Err(Error::Invalid(format!(
            "chunk map {} keeps being replaced under us",
            path.display()
        )))
    }

    /// Put a fresh bitmap (no chunk ready) at `path`, replacing whatever is there.
    pub fn reset(path: &Path, count: u32) -> Result<()> {
        install(path, true, |f| Self::prepare(f, count)).map(drop)
    }

    fn prepare(f: &File, count: u32) -> std::io::Result<()> {
        f.set_len(file_size(count))?;
        allocate(f, file_size(count), true)?;
        f.write_all_at(&fresh_header(), 0)
    }

    fn byte(&self, index: u32) -> &AtomicU8 {
        let slot = &self.map[HEADER_SIZE + (index / 8) as usize];
        // SAFETY: AtomicU8 has the layout of u8, and the mapping lives as long as `self`.
        unsafe { &*(slot as *const u8 as *const AtomicU8) }
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn is_ready(&self, index: u32) -> bool {
        index < self.count && self.byte(index).load(Ordering::Acquire) & (0x80 >> (index % 8)) != 0
    }

    pub fn set_ready(&self, index: u32) {
        if index < self.count {
            self.byte(index)
                .fetch_or(0x80 >> (index % 8), Ordering::Release);
        }
    }

    pub fn clear(&self, index: u32) {
        if index < self.count {
            self.byte(index)
                .fetch_and(!(0x80 >> (index % 8)), Ordering::Release);
        }
    }

    /// Chunks marked ready, a byte at a time (the metrics API asks for it; up to 2^24 chunks per blob).
    /// Bytes, not u64 words: other daemons set the bits with byte-wide atomics, and mixing atomic sizes
    /// on one location is not allowed.
    pub fn ready_count(&self) -> u32 {
        let full = (self.count / 8) as usize;
        let bits = &self.map[HEADER_SIZE..HEADER_SIZE + self.count.div_ceil(8) as usize];
        let mut ready = 0;
        for (k, slot) in bits.iter().enumerate() {
            // SAFETY: as in `byte`.
            let byte = unsafe { &*(slot as *const u8 as *const AtomicU8) }.load(Ordering::Acquire);
            // The last byte's bits past `count` are no chunk's (MSB first).
            let mask = if k < full {
                0xFF
            } else {
                !(0xFFu8 >> (self.count % 8))
            };
            ready += (byte & mask).count_ones();
        }
        ready
    }

    /// Record in the header that every chunk is present (nydusd reads this to skip the bitmap).
    pub fn mark_all_ready_if_complete(&self) {
        if self.ready_count() == self.count {
            let slot = &self.map[12];
            // SAFETY: as in `byte`; the u32 is written one byte at a time, each atomically.
            for (i, b) in ALL_READY.to_le_bytes().iter().enumerate() {
                unsafe { &*((slot as *const u8).add(i) as *const AtomicU8) }
                    .store(*b, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn bits_persist_and_bad_files_are_replaced_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.blob.data.chunk_map");
        {
            let m = ChunkMap::open(&path, 20).unwrap();
            assert!(!m.is_ready(3));
            m.set_ready(3);
            m.set_ready(19);
            m.set_ready(25); // out of range: ignored
        }
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 4096 + 3);
        assert_eq!(&bytes[0..4], &MAGIC.to_le_bytes());
        assert_eq!(bytes[4096], 0x10, "chunk 3 is bit 0x80 >> 3");
        let m = ChunkMap::open(&path, 20).unwrap();
        assert!(m.is_ready(3) && m.is_ready(19) && !m.is_ready(4));
        m.clear(3);
        assert!(!m.is_ready(3));

        // Another chunk count: a new, empty file takes the name; the one still mapped is left as it was.
        let old_inode = std::fs::metadata(&path).unwrap().ino();
        let other = ChunkMap::open(&path, 30).unwrap();
        assert_eq!(other.ready_count(), 0);
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), old_inode);
        assert!(m.is_ready(19), "the first map still reads its own file");
        drop((m, other));

        // A foreign or zeroed header is not trusted either.
        let m = ChunkMap::open(&path, 30).unwrap();
        m.set_ready(7);
        drop(m);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..16].fill(0);
        std::fs::write(&path, &bytes).unwrap();
        let m = ChunkMap::open(&path, 30).unwrap();
        assert!(!m.is_ready(7));
        assert_eq!(&std::fs::read(&path).unwrap()[0..4], &MAGIC.to_le_bytes());
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_sparse_map_left_by_an_earlier_version_is_allocated_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.blob.data.chunk_map");
        let count = 1 << 16;
        let f = File::create(&path).unwrap();
        f.set_len(file_size(count)).unwrap();
        f.write_all_at(&fresh_header(), 0).unwrap();
        assert!(f.metadata().unwrap().blocks() * 512 < file_size(count));
        let m = ChunkMap::open(&path, count).unwrap();
        assert!(f.metadata().unwrap().blocks() * 512 >= file_size(count));
        assert_eq!(m.ready_count(), 0);
    }

    #[test]
    fn ready_count_counts_a_full_blob_bytewise_and_ignores_bits_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.blob.data.chunk_map");
        let m = ChunkMap::open(&path, 20).unwrap();
        for i in [0, 7, 8, 19] {
            m.set_ready(i);
        }
        // Bits 20..24 of the last byte belong to no chunk (another writer's stray bits).
        m.byte(16).fetch_or(0x0F, Ordering::Release);
        assert_eq!(m.ready_count(), 4);
        drop(m);

        // A blob of 2^24 chunks, all ready, as the metrics API polls it: bit by bit this took seconds.
        let count = 1 << 24;
        let m = ChunkMap::open(&path, count).unwrap();
        for b in 0..count / 8 {
            m.byte(b * 8).store(0xFF, Ordering::Relaxed);
        }
        let started = std::time::Instant::now();
        for _ in 0..8 {
            assert_eq!(m.ready_count(), count);
        }
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_secs(4), "{took:?}");
    }
}
