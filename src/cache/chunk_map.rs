//! The persistent ready-bitmap of a cached blob, `<blob id>.blob.data.chunk_map`, in nydusd's layout so
//! cache directories can be shared: a 4096-byte header, then one bit per chunk (MSB first).
//!
//! A bit is set only after the chunk's bytes were written to the data file, so a daemon killed at any
//! point leaves either a ready chunk or a missing one, never a torn one marked ready.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

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

impl ChunkMap {
    /// Open or create the bitmap for `count` chunks. A file of the wrong size or with a foreign header is
    /// reset (its state cannot be trusted); a zero header (crash right after creation) is repaired.
    pub fn open(path: &Path, count: u32) -> Result<Self> {
        let size = HEADER_SIZE as u64 + (count as u64).div_ceil(8);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(format!("open chunk map {}", path.display()), e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
            .len();
        let mut reset = len != size;
        if reset {
            if len != 0 {
                log::warn!(
                    "chunk map {} has size {len}, expected {size}: starting it afresh",
                    path.display()
                );
            }
            file.set_len(0)
                .and_then(|_| file.set_len(size))
                .map_err(|e| Error::io(format!("size {}", path.display()), e))?;
        }
        // SAFETY: the file is ours (under the cache work_dir) and stays at this size while mapped; bits are
        // only touched through atomics.
        let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }
            .map_err(|e| Error::io(format!("mmap {}", path.display()), e))?;
        let header = |m: &[u8], at: usize| u32::from_le_bytes(m[at..at + 4].try_into().unwrap());
        let zero_header = map[..16].iter().all(|&b| b == 0);
        if !reset
            && !zero_header
            && (header(&map, 0) != MAGIC || header(&map, 8) != MAGIC2 || header(&map, 4) != VERSION)
        {
            log::warn!(
                "chunk map {} has a foreign header: starting it afresh",
                path.display()
            );
            map[HEADER_SIZE..].fill(0);
            reset = true;
        }
        if reset || zero_header {
            map[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            map[4..8].copy_from_slice(&VERSION.to_le_bytes());
            map[8..12].copy_from_slice(&MAGIC2.to_le_bytes());
            map[12..16].copy_from_slice(&0u32.to_le_bytes());
        }
        Ok(ChunkMap { map, count })
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

    pub fn ready_count(&self) -> u32 {
        (0..self.count).filter(|&i| self.is_ready(i)).count() as u32
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

    #[test]
    fn bits_persist_and_bad_files_are_reset() {
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
        drop(m);
        // A different chunk count means a different blob layout: nothing may be trusted.
        let m = ChunkMap::open(&path, 30).unwrap();
        assert_eq!(m.ready_count(), 0);
        drop(m);
        // Zeroed header (crash between create and header write) is repaired, bitmap kept.
        let m = ChunkMap::open(&path, 30).unwrap();
        m.set_ready(7);
        drop(m);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..16].fill(0);
        std::fs::write(&path, &bytes).unwrap();
        let m = ChunkMap::open(&path, 30).unwrap();
        assert!(m.is_ready(7));
        assert_eq!(&std::fs::read(&path).unwrap()[0..4], &MAGIC.to_le_bytes());
    }
}
