//! The blob meta ("blob.meta") of a v6 data blob: the chunk-info (CI) array that locates every chunk in
//! compressed and uncompressed space, its 4096-byte header, and the batch contexts of batched blobs.

use super::bytes::{slice, Le};
use super::limits;
use super::{blob_features as bf, BlobInfo, ChunkInfo, CiLocation};
use crate::corrupt;
use crate::error::{Error, Result};

pub const CI_HEADER_SIZE: u64 = 4096;
pub const CI_MAGIC: u32 = 0xB10B_B10B;
pub const CI_V1_SIZE: u64 = 16;
const CI_V2_SIZE: u64 = 24;
const BATCH_CONTEXT_SIZE: u64 = 40;
/// Largest CI buffer we accept per chunk: a V2 entry plus one batch context.
const MAX_CI_BYTES_PER_CHUNK: u64 = CI_V2_SIZE + BATCH_CONTEXT_SIZE;

const CI_COMPRESSED: u64 = 0x01;
const CI_ZRAN: u64 = 0x02;
const CI_BATCH: u64 = 0x04;
const CI_ENCRYPTED: u64 = 0x08;
const CI_HAS_CRC32: u64 = 0x10;

/// A decoded chunk-info array for one blob.
pub struct ChunkInfoArray {
    blob_index: u32,
    buf: Vec<u8>,
    v2: bool,
    count: u32,
    /// Per batch: (compressed size, uncompressed size).
    batches: Vec<(u32, u32)>,
}

impl ChunkInfoArray {
    /// Check the 4096-byte header at the end of `raw` against the bootstrap's record of the blob.
    pub fn check_header(blob: &BlobInfo, ci: &CiLocation, raw: &[u8]) -> Result<()> {
        let header = slice(raw, ci.compressed_size, CI_HEADER_SIZE, "blob meta header")?;
        let id = &blob.id;
        if header.u32_at(0) != CI_MAGIC || header.u32_at(4092) != CI_MAGIC {
            return Err(corrupt!("blob {id}: blob meta header has bad magic"));
        }
        let fields_match = header.u32_at(8) == compressor_number(ci)
            && header.u32_at(12) == blob.chunk_count
            && header.u64_at(16) == ci.offset
            && header.u64_at(24) == ci.compressed_size
            && header.u64_at(32) == ci.uncompressed_size;
        if !fields_match {
            return Err(corrupt!(
                "blob {id}: blob meta header disagrees with the bootstrap's blob table"
            ));
        }
        Ok(())
    }

    /// Decode the CI array. `raw` is `ci.compressed_size` bytes of (possibly compressed) CI followed by the
    /// header, as read from the blob at `ci.offset`.
    pub fn parse(blob: &BlobInfo, ci: &CiLocation, raw: &[u8]) -> Result<Self> {
        let id = &blob.id;
        Self::check_header(blob, ci, raw)?;
        let header = &raw[ci.compressed_size as usize..];
        let v2 = blob.features & bf::CHUNK_INFO_V2 != 0;
        let entry_size = if v2 { CI_V2_SIZE } else { CI_V1_SIZE };
        let count = blob.chunk_count as u64;
        check_size(blob, ci)?;
        let stored = &raw[..ci.compressed_size as usize];
        let buf = if ci.compressed_size == ci.uncompressed_size {
            stored.to_vec()
        } else {
            crate::storage::compress::decompress(
                ci.compressor,
                stored,
                ci.uncompressed_size as usize,
            )
            .map_err(|e| corrupt!("blob {id}: chunk-info array: {e}"))?
        };
        let mut batches = Vec::new();
        if blob.features & bf::BATCH != 0 {
            let (off, size, n) = (
                header.u64_at(40),
                header.u64_at(48),
                header.u32_at(56) as u64,
            );
            if off != entry_size * count || size != n * BATCH_CONTEXT_SIZE {
                return Err(corrupt!(
                    "blob {id}: batch table at {off} size {size} for {n} batches"
                ));
            }
            let table = slice(&buf, off, size, "batch table")?;
            for k in 0..n as usize {
                let c = &table[k * 40..k * 40 + 40];
                batches.push((c.u32_at(0), c.u32_at(4)));
            }
        }
        Ok(ChunkInfoArray {
            blob_index: blob.index,
            buf,
            v2,
            count: blob.chunk_count,
            batches,
        })
    }

    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Chunk `index` of this blob (digest and CRC are filled in by the caller from the chunk table).
    pub fn get(&self, index: u32) -> Result<ChunkInfo> {
        if index >= self.count {
            return Err(corrupt!(
                "chunk index {index} past the {} chunks of blob {}",
                self.count,
                self.blob_index
            ));
        }
        let mut info = if self.v2 {
            let e = &self.buf[index as usize * 24..index as usize * 24 + 24];
            let (u, c, data) = (e.u64_at(0), e.u64_at(8), e.u64_at(16));
            let flags = u >> 56;
            if flags & (CI_ZRAN | CI_ENCRYPTED) != 0 {
                return Err(Error::Unsupported(format!(
                    "chunk {index}: zran or encrypted chunk"
                )));
            }
            let batch = (flags & CI_BATCH != 0).then_some(((data >> 32) as u32, data as u32));
            ChunkInfo {
                blob_index: self.blob_index,
                index,
                compressed_offset: c & ((1 << 40) - 1),
                compressed_size: (c >> 40) as u32,
                uncompressed_offset: (u & 0xFFFF_FFFF) << 12,
                uncompressed_size: ((u >> 32) & 0xFF_FFFF) as u32 + 1,
                compressed: flags & CI_COMPRESSED != 0,
                batch,
                digest: None,
                crc32: (flags & CI_HAS_CRC32 != 0 && batch.is_none()).then_some(data as u32),
            }
        } else {
            let e = &self.buf[index as usize * 16..index as usize * 16 + 16];
            let (u, c) = (e.u64_at(0), e.u64_at(8));
            let usize_ = ((u >> 44) | ((u >> 8) & 0xF) << 20) as u32 + 1;
            let csize = ((c >> 44) | ((c >> 40) & 0xF) << 20) as u32 + 1;
            ChunkInfo {
                blob_index: self.blob_index,
                index,
                compressed_offset: c & ((1 << 40) - 1),
                compressed_size: csize,
                uncompressed_offset: u & 0xFFF_FFFF_F000,
                uncompressed_size: usize_,
                compressed: csize != usize_,
                batch: None,
                digest: None,
                crc32: None,
            }
        };
        if let Some((batch, _)) = info.batch {
            let (compressed, _) = self.batch(batch)?;
            info.compressed_size = compressed;
        }
        Ok(info)
    }

    /// (compressed size, uncompressed size) of batch `index`.
    pub fn batch(&self, index: u32) -> Result<(u32, u32)> {
        self.batches
            .get(index as usize)
            .copied()
            .ok_or_else(|| corrupt!("batch {index} of blob {} does not exist", self.blob_index))
    }
}

/// The chunk-info array's decoded size, as the bootstrap records it, must fit the blob's chunk count and
/// the memory limits: checked when the image is opened, before anything is read or decompressed.
pub fn check_size(blob: &BlobInfo, ci: &CiLocation) -> Result<()> {
    let entry_size = if blob.features & bf::CHUNK_INFO_V2 != 0 {
        CI_V2_SIZE
    } else {
        CI_V1_SIZE
    };
    let count = blob.chunk_count as u64;
    if ci.uncompressed_size < entry_size * count
        || ci.uncompressed_size > MAX_CI_BYTES_PER_CHUNK * count.max(1)
    {
        return Err(corrupt!(
            "blob {}: chunk-info array of {} bytes does not fit {count} chunks",
            blob.id,
            ci.uncompressed_size
        ));
    }
    if ci.uncompressed_size > limits::MAX_CI_ARRAY_BYTES {
        return Err(limits::exceeded(
            format!(
                "blob {}: its chunk-info array takes {} bytes decoded",
                blob.id, ci.uncompressed_size
            ),
            "64 MiB per blob",
        ));
    }
    Ok(())
}

fn compressor_number(ci: &CiLocation) -> u32 {
    match ci.compressor {
        super::Compressor::None => 0,
        super::Compressor::Lz4Block => 1,
        super::Compressor::Gzip => 2,
        super::Compressor::Zstd => 3,
    }
}
