//! The blob meta ("blob.meta") of a v6 data blob: the chunk-info (CI) array that locates every chunk in
//! compressed and uncompressed space, its 4096-byte header, and the batch contexts of batched blobs.

use rafs_layout::blob::{ci_flags, BatchContext, CiHeader, CiV1, CiV2};
use rafs_layout::Record;

use super::bytes::{record, slice};
use super::limits;
use super::{blob_features as bf, BlobInfo, ChunkInfo, CiLocation};
use crate::corrupt;
use crate::error::{Error, Result};

pub use rafs_layout::blob::CI_MAGIC;
pub const CI_HEADER_SIZE: u64 = CiHeader::SIZE as u64;
pub const CI_V1_SIZE: u64 = CiV1::SIZE as u64;
const CI_V2_SIZE: u64 = CiV2::SIZE as u64;
const BATCH_CONTEXT_SIZE: u64 = BatchContext::SIZE as u64;
/// Largest CI buffer we accept per chunk: a V2 entry plus one batch context.
const MAX_CI_BYTES_PER_CHUNK: u64 = CI_V2_SIZE + BATCH_CONTEXT_SIZE;

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
        let header: CiHeader = record(raw, ci.compressed_size, "blob meta header")?;
        let id = &blob.id;
        if header.magic != CI_MAGIC || header.magic2 != CI_MAGIC {
            return Err(corrupt!("blob {id}: blob meta header has bad magic"));
        }
        let fields_match = header.ci_compressor == ci.compressor.to_u32()
            && header.ci_entries == blob.chunk_count
            && header.ci_offset == ci.offset
            && header.ci_compressed_size == ci.compressed_size
            && header.ci_uncompressed_size == ci.uncompressed_size;
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
        let header: CiHeader = record(raw, ci.compressed_size, "blob meta header")?;
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
                header.ci_zran_offset,
                header.ci_zran_size,
                header.ci_zran_count as u64,
            );
            if off != entry_size * count || size != n * BATCH_CONTEXT_SIZE {
                return Err(corrupt!(
                    "blob {id}: batch table at {off} size {size} for {n} batches"
                ));
            }
            let table = slice(&buf, off, size, "batch table")?;
            for c in table.chunks_exact(BATCH_CONTEXT_SIZE as usize) {
                let c = BatchContext::read(c).expect("a whole context");
                batches.push((c.compressed_size, c.uncompressed_batch_size));
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
            let e = CiV2::read(&self.buf[index as usize * CI_V2_SIZE as usize..])
                .expect("the array holds count entries");
            let flags = e.flags();
            if flags & (ci_flags::ZRAN | ci_flags::ENCRYPTED) != 0 {
                return Err(Error::Unsupported(format!(
                    "chunk {index}: zran or encrypted chunk"
                )));
            }
            let batch = (flags & ci_flags::BATCH != 0).then(|| e.position());
            ChunkInfo {
                blob_index: self.blob_index,
                index,
                compressed_offset: e.compressed_offset(),
                compressed_size: e.compressed_size(),
                uncompressed_offset: e.uncompressed_offset(),
                uncompressed_size: e.uncompressed_size(),
                compressed: flags & ci_flags::COMPRESSED != 0,
                batch,
                digest: None,
                crc32: e.crc32(),
            }
        } else {
            let e = CiV1::read(&self.buf[index as usize * CI_V1_SIZE as usize..])
                .expect("the array holds count entries");
            let (csize, usize_) = (e.compressed_size(), e.uncompressed_size());
            ChunkInfo {
                blob_index: self.blob_index,
                index,
                compressed_offset: e.compressed_offset(),
                compressed_size: csize,
                uncompressed_offset: e.uncompressed_offset(),
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
        info.check_stored_size()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A V2 entry: `flags`, a chunk of `size` bytes at uncompressed offset 0, stored in `stored` bytes at 0.
    fn v2_entry(flags: u8, size: u32, stored: u32) -> [u8; CI_V2_SIZE as usize] {
        let entry = CiV2 {
            uncomp_info: (flags as u64) << 56 | ((size - 1) as u64) << 32,
            comp_info: (stored as u64) << 40,
            data: 0,
        };
        let mut out = [0u8; CI_V2_SIZE as usize];
        entry.write_to(&mut out);
        out
    }

    fn array(entries: &[[u8; CI_V2_SIZE as usize]]) -> ChunkInfoArray {
        ChunkInfoArray {
            blob_index: 0,
            buf: entries.concat(),
            v2: true,
            count: entries.len() as u32,
            batches: Vec::new(),
        }
    }

    #[test]
    fn v2_entries_stored_in_no_bytes_or_more_than_their_size_can_take_are_refused() {
        let mib = 1 << 20;
        let a = array(&[
            v2_entry(ci_flags::COMPRESSED, mib, 300),
            v2_entry(ci_flags::COMPRESSED, mib, mib + mib / 128 + 1024),
            v2_entry(0, mib, mib),
            // A 1 MiB chunk in 0 bytes: a predicted run never grew its window on such chunks.
            v2_entry(ci_flags::COMPRESSED, mib, 0),
            v2_entry(ci_flags::COMPRESSED, 1, 4 << 20),
            v2_entry(0, 4096, 4095),
        ]);
        for ok in 0..3 {
            a.get(ok).unwrap();
        }
        for (bad, says) in [
            (3, "chunk 3: 0 bytes stored (compressed) for 1048576 bytes"),
            (4, "chunk 4: 4194304 bytes stored (compressed) for 1 bytes"),
            (5, "chunk 5: 4095 bytes stored (raw) for 4096 bytes"),
        ] {
            let e = a.get(bad).unwrap_err();
            assert!(matches!(&e, Error::Corrupt(m) if m.contains(says)), "{e:?}");
        }
    }
}
