//! Which host bytes back a range of a RAFS file in the DAX window.
//!
//! RAFS file data lives compressed in blobs; the blob cache keeps each chunk uncompressed at its
//! uncompressed offset in `<blob id>.blob.data`. A SETUPMAPPING first makes every chunk of the range ready
//! (fetched, verified, stored), then maps:
//! - straight from the cache file (a read-only descriptor), the whole pages of each chunk whose cache
//!   offset is page-aligned like its file offset: the guest reads the host page cache, no copy. Adjacent
//!   chunks that are adjacent in the cache file too become one map; elsewhere a range needs several.
//! - from one sealed memfd built for the request, everything else: holes, the part of the range past end
//!   of file, a chunk's partial last page (in the cache file the rest of that page may belong to another
//!   chunk, which this file must not show), chunks not page-aligned in the cache (v5 images packed without
//!   alignment), and every chunk of an image without a cache. These bytes are copied, so they cost host
//!   memory per mapping; the guest still gets no second copy in its page cache.
//!
//! Requests are checked before anything is mapped: page-aligned offsets and length, a regular file,
//! read-only access, a start inside the file. A range that fails half-way is unmapped again.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use fuse_backend_rs::abi::virtio_fs::{RemovemappingOne, SetupmappingFlags};
use fuse_backend_rs::transport::FsCacheReqHandler;

use super::{sealed_copy, PAGE};
use crate::error::{Error, Result};
use crate::format::{ChunkInfo, InodeAttr};
use crate::image::RafsImage;

/// Where one page-aligned piece of the requested range comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// `offset` in a blob cache data file.
    Cache { file: Arc<File>, offset: u64 },
    /// The same offset (relative to the request) in the request's sealed memfd.
    Copy,
}

/// One map: `len` bytes at `rel` from the start of the requested range.
#[derive(Debug, Clone)]
pub struct Piece {
    pub rel: u64,
    pub len: u64,
    pub source: Source,
}

/// The maps that make up one request, and the bytes the memfd must hold (at offsets relative to it).
pub struct Plan {
    pub len: u64,
    pub pieces: Vec<Piece>,
    pub copies: Vec<(u64, Vec<u8>)>,
}

fn round_up(v: u64) -> u64 {
    v.div_ceil(PAGE) * PAGE
}

fn round_down(v: u64) -> u64 {
    v / PAGE * PAGE
}

/// Plan `[foffset, foffset + len)` of regular file `ino`, fetching and verifying the chunks it needs.
pub fn plan(image: &RafsImage, ino: u64, foffset: u64, len: u64) -> Result<Plan> {
    let inode = mappable_file(image, ino, foffset, len)?;
    let data_end = (foffset + len).min(inode.size);
    let mut direct: Vec<Piece> = Vec::new();
    let mut copies: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut pos = foffset;
    for (file_offset, addr) in image
        .meta()
        .file_chunks(&inode, foffset, data_end - foffset)?
    {
        let info = image.resolve(&addr)?;
        // As the read path: a v6 chunk holds exactly the file's bytes at its offset, never fewer.
        let expected = (image.info().chunk_size as u64).min(inode.size.saturating_sub(file_offset));
        if image.info().version == 6 && info.uncompressed_size as u64 != expected {
            return Err(crate::corrupt!(
                "inode {ino}: chunk at file offset {file_offset} holds {} bytes, the file needs {expected}",
                info.uncompressed_size
            ));
        }
        let chunk_end = file_offset.saturating_add(info.uncompressed_size as u64);
        let (from, to) = (pos.max(file_offset), data_end.min(chunk_end));
        if from >= to {
            continue;
        }
        let chunk = ReadyChunk::get(image, &info, ino, file_offset)?;
        chunk.place(foffset, from, to, &mut direct, &mut copies)?;
        pos = to;
    }
    Ok(Plan {
        len,
        pieces: fill_and_merge(direct, len),
        copies,
    })
}

/// The inode of a request that may be mapped: page-aligned offset and length, a regular file, a start
/// inside the file.
fn mappable_file(image: &RafsImage, ino: u64, foffset: u64, len: u64) -> Result<InodeAttr> {
    if len == 0
        || !foffset.is_multiple_of(PAGE)
        || !len.is_multiple_of(PAGE)
        || foffset.checked_add(len).is_none()
    {
        return Err(Error::Invalid(format!(
            "DAX map of [{foffset:#x}, +{len:#x}): offset and length must be non-zero multiples of 4 KiB"
        )));
    }
    let inode = image.meta().inode(ino)?;
    if !inode.is_reg() {
        return Err(Error::Invalid(format!(
            "DAX map of inode {ino}: not a regular file"
        )));
    }
    // The guest maps 2 MiB ranges and may reach past end of file; a range that starts there holds nothing.
    if foffset >= inode.size {
        return Err(Error::Invalid(format!(
            "DAX map of inode {ino} at {foffset:#x}: beyond end of file ({:#x})",
            inode.size
        )));
    }
    Ok(inode)
}

/// A chunk of the file at `file_offset`, verified: its bytes in hand, or where the cache holds them, or
/// both.
struct ReadyChunk {
    ino: u64,
    file_offset: u64,
    location: Option<(Arc<File>, u64)>,
    data: Option<Vec<u8>>,
}

impl ReadyChunk {
    fn get(image: &RafsImage, info: &ChunkInfo, ino: u64, file_offset: u64) -> Result<Self> {
        let cache = image.cache();
        // Ready and verified in the cache (or at least in hand): never map bytes nobody checked.
        let ready = |c: &Arc<crate::cache::BlobCache>| c.ready_location_read_only(info);
        let (location, data) = match cache.filter(|_| !image.validates()).and_then(ready) {
            Some(loc) => (Some(loc), None),
            None => {
                let data = image.chunk_data(info)?;
                (cache.and_then(ready), Some(data))
            }
        };
        Ok(ReadyChunk {
            ino,
            file_offset,
            location,
            data,
        })
    }

    /// The chunk's bytes at file offsets `[a, b)`.
    fn bytes(&self, a: u64, b: u64) -> Result<Vec<u8>> {
        let (i, j) = (
            (a - self.file_offset) as usize,
            (b - self.file_offset) as usize,
        );
        match (&self.data, &self.location) {
            (Some(d), _) => d.get(i..j).map(<[u8]>::to_vec).ok_or_else(|| {
                crate::corrupt!("chunk of inode {} shorter than its extent", self.ino)
            }),
            (None, Some((file, offset))) => {
                let mut buf = vec![0u8; j - i];
                file.read_exact_at(&mut buf, offset + i as u64)
                    .map_err(|e| Error::io("read blob cache", e))?;
                Ok(buf)
            }
            (None, None) => unreachable!("either the bytes or their cache location"),
        }
    }

    /// Map file offsets `[from, to)` of this chunk (relative to `foffset`, the request's start): its
    /// whole pages straight from the cache file when the cache offset is page-aligned like the file
    /// offset, the rest copied.
    fn place(
        &self,
        foffset: u64,
        from: u64,
        to: u64,
        direct: &mut Vec<Piece>,
        copies: &mut Vec<(u64, Vec<u8>)>,
    ) -> Result<()> {
        let (a, b) = (round_up(from), round_down(to));
        match self
            .location
            .as_ref()
            .filter(|(_, off)| off % PAGE == self.file_offset % PAGE)
        {
            Some((file, offset)) if a < b => {
                direct.push(Piece {
                    rel: a - foffset,
                    len: b - a,
                    source: Source::Cache {
                        file: file.clone(),
                        offset: offset + (a - self.file_offset),
                    },
                });
                if from < a {
                    copies.push((from - foffset, self.bytes(from, a)?));
                }
                if b < to {
                    copies.push((b - foffset, self.bytes(b, to)?));
                }
            }
            _ => copies.push((from - foffset, self.bytes(from, to)?)),
        }
        Ok(())
    }
}

/// Cover `[0, len)`: the direct pieces (sorted, disjoint, page-aligned), gaps from the memfd, and
/// neighbours that continue each other in the same file merged into one map.
fn fill_and_merge(direct: Vec<Piece>, len: u64) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    let mut push = |p: Piece| {
        if let Some(last) = out.last_mut() {
            let continues = match (&last.source, &p.source) {
                (Source::Copy, Source::Copy) => true,
                (
                    Source::Cache {
                        file: f1,
                        offset: o1,
                    },
                    Source::Cache {
                        file: f2,
                        offset: o2,
                    },
                ) => Arc::ptr_eq(f1, f2) && o1 + last.len == *o2,
                _ => false,
            };
            if continues && last.rel + last.len == p.rel {
                last.len += p.len;
                return;
            }
        }
        out.push(p);
    };
    let mut at = 0;
    for p in direct {
        if p.rel > at {
            push(Piece {
                rel: at,
                len: p.rel - at,
                source: Source::Copy,
            });
        }
        at = p.rel + p.len;
        push(p);
    }
    if at < len {
        push(Piece {
            rel: at,
            len: len - at,
            source: Source::Copy,
        });
    }
    out
}

/// FUSE_SETUPMAPPING of a RAFS file: plan, then one map per piece; on failure, unmap what was mapped.
pub fn setup(
    image: &RafsImage,
    ino: u64,
    foffset: u64,
    len: u64,
    flags: u64,
    moffset: u64,
    req: &mut dyn FsCacheReqHandler,
) -> io::Result<()> {
    // Flags, offsets and length are checked before anything is fetched (the device has already
    // checked that the range fits the window).
    if SetupmappingFlags::from_bits(flags).is_none() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    if flags & SetupmappingFlags::WRITE.bits() != 0 {
        return Err(io::Error::from_raw_os_error(libc::EROFS));
    }
    if moffset.checked_add(len).is_none() || !moffset.is_multiple_of(PAGE) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let plan = plan(image, ino, foffset, len).map_err(|e| {
        log::warn!("DAX: {e}");
        io::Error::from_raw_os_error(e.errno())
    })?;
    let memfd = if plan.pieces.iter().any(|p| matches!(p.source, Source::Copy)) {
        Some(sealed_copy(plan.len, &plan.copies)?)
    } else {
        None
    };
    let mut mapped: Vec<RemovemappingOne> = Vec::new();
    for p in &plan.pieces {
        let (fd, fd_offset) = match &p.source {
            Source::Cache { file, offset } => (file.as_raw_fd(), *offset),
            Source::Copy => (memfd.as_ref().expect("memfd for copies").as_raw_fd(), p.rel),
        };
        let window_offset = moffset + p.rel;
        if let Err(e) = req.map(fd_offset, window_offset, p.len, flags, fd) {
            if !mapped.is_empty() {
                if let Err(e2) = req.unmap(mapped) {
                    log::warn!("DAX: undoing a partial map: {e2}");
                }
            }
            return Err(e);
        }
        mapped.push(RemovemappingOne {
            moffset: window_offset,
            len: p.len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_come_from_the_memfd_and_neighbours_merge() {
        let f = Arc::new(tempfile::tempfile().unwrap());
        let cache = |rel, len, offset| Piece {
            rel,
            len,
            source: Source::Cache {
                file: f.clone(),
                offset,
            },
        };
        // Two chunks adjacent in the file and the cache, then one elsewhere in the cache, then a hole.
        let plan = fill_and_merge(
            vec![
                cache(PAGE, PAGE, 0),
                cache(2 * PAGE, PAGE, PAGE),
                cache(3 * PAGE, PAGE, 10 * PAGE),
            ],
            6 * PAGE,
        );
        let got: Vec<(u64, u64, Option<u64>)> = plan
            .iter()
            .map(|p| {
                let off = match &p.source {
                    Source::Cache { offset, .. } => Some(*offset),
                    Source::Copy => None,
                };
                (p.rel, p.len, off)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (0, PAGE, None),
                (PAGE, 2 * PAGE, Some(0)),
                (3 * PAGE, PAGE, Some(10 * PAGE)),
                (4 * PAGE, 2 * PAGE, None)
            ]
        );
    }
}
