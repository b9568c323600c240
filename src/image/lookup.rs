//! Chunk lookup: from a chunk address a file (or the blob view) names to the chunk the image records —
//! blob, index, uncompressed extent, digest and CRC — and, when it must be fetched, where the blob stores
//! it. Every answer is checked against the image's other records and against the blob's extent before a
//! read uses it.

use super::RafsImage;
use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::{ChunkAddr, ChunkInfo, InodeAttr};

impl RafsImage {
    /// The chunk at `file_offset` of a regular file, as the image records it. A v6 chunk holds exactly the
    /// bytes the file needs there (a whole chunk, or the file's tail).
    pub(super) fn file_chunk(
        &self,
        inode: &InodeAttr,
        file_offset: u64,
        addr: &ChunkAddr,
    ) -> Result<ChunkInfo> {
        let need = (self.info().version == 6)
            .then(|| (self.info().chunk_size as u64).min(inode.size - file_offset) as u32);
        self.expected(addr, need)
    }

    /// The chunk a chunk address names, as the image's own records describe it: blob, CI index,
    /// uncompressed offset and size, digest and CRC. Enough to find it in the cache and to check its
    /// bytes; `locate` adds where it is stored in the blob. v5 chunk records say it all. For v6
    /// the offset is the inode's block address and the rest comes from the bootstrap's chunk table, so a
    /// cache hit needs nothing from the blob; without a chunk table row, the size is `need` (what the
    /// file needs) or, without that, the blob's chunk-info array says it. A v6 chunk must hold exactly
    /// `need` bytes.
    fn expected(&self, addr: &ChunkAddr, need: Option<u32>) -> Result<ChunkInfo> {
        let (blob_index, ci_index, blk_addr) = match addr {
            ChunkAddr::Full(info) => {
                self.check_extent(info)?;
                return Ok(info.clone());
            }
            ChunkAddr::Indexed {
                blob_index,
                ci_index,
                blk_addr,
            } => (*blob_index, *ci_index, *blk_addr),
        };
        let offset = blk_addr as u64 * self.info().block_size as u64;
        let info = match (self.meta.chunk_table_entry(blob_index, ci_index)?, need) {
            (Some(row), need) => {
                if row.uncompressed_offset != offset {
                    return Err(corrupt!(
                        "blob {} chunk {ci_index}: the inode says block {blk_addr}, the chunk table says \
                         offset {}",
                        self.blob_id(blob_index),
                        row.uncompressed_offset
                    ));
                }
                if let Some(need) = need.filter(|&n| n != row.uncompressed_size) {
                    return Err(corrupt!(
                        "blob {} chunk {ci_index}: the chunk table says {} bytes, the file needs {need}",
                        self.blob_id(blob_index),
                        row.uncompressed_size
                    ));
                }
                ChunkInfo {
                    blob_index,
                    index: ci_index,
                    uncompressed_offset: offset,
                    uncompressed_size: row.uncompressed_size,
                    digest: row.digest,
                    crc32: row.crc32,
                    ..Default::default()
                }
            }
            (None, Some(size)) => ChunkInfo {
                blob_index,
                index: ci_index,
                uncompressed_offset: offset,
                uncompressed_size: size,
                ..Default::default()
            },
            (None, None) => self.resolve_ci(blob_index, ci_index)?,
        };
        if info.uncompressed_offset != offset {
            return Err(corrupt!(
                "blob {} chunk {ci_index}: the inode says block {blk_addr}, the blob meta says offset {}",
                self.blob_id(blob_index),
                info.uncompressed_offset
            ));
        }
        self.check_extent(&info)?;
        Ok(info)
    }

    /// The chunk a chunk address names, as the image's own records describe it (index, uncompressed offset
    /// and size, digest, CRC): enough to find it in the cache. For v6 where it is stored in the blob is
    /// left out (unless the bootstrap has no chunk table): [`Self::chunk_data`] looks that up when it must
    /// fetch the chunk, so cache hits need nothing from the blob.
    pub fn resolve(&self, addr: &ChunkAddr) -> Result<ChunkInfo> {
        self.expected(addr, None)
    }

    /// `info` (as the image records it) with where its bytes are stored in the blob: v6 reads the blob's
    /// chunk-info array, which must agree with the image on the chunk's uncompressed offset and size.
    pub(super) fn locate(&self, info: &ChunkInfo) -> Result<ChunkInfo> {
        if self.info().version != 6 {
            return Ok(info.clone());
        }
        let located = self.chunk_info_array(info.blob_index)?.get(info.index)?;
        self.join(located, info, "the bootstrap")
    }

    /// A chunk-info array entry joined with the image's own record of that chunk (`record`, from `source`):
    /// both must place it at the same uncompressed offset and size; the digest comes from the record, and
    /// the record's CRC is preferred.
    fn join(&self, mut located: ChunkInfo, record: &ChunkInfo, source: &str) -> Result<ChunkInfo> {
        if (located.uncompressed_offset, located.uncompressed_size)
            != (record.uncompressed_offset, record.uncompressed_size)
        {
            return Err(corrupt!(
                "blob {} chunk {}: {source} says {}+{}, the blob meta says {}+{}",
                self.blob_id(located.blob_index),
                located.index,
                record.uncompressed_offset,
                record.uncompressed_size,
                located.uncompressed_offset,
                located.uncompressed_size
            ));
        }
        located.digest = record.digest;
        located.crc32 = record.crc32.or(located.crc32);
        self.check_extent(&located)?;
        Ok(located)
    }

    fn blob_id(&self, blob_index: u32) -> &str {
        self.info()
            .blobs
            .get(blob_index as usize)
            .map_or("?", |b| &b.id)
    }

    /// Chunk `ci_index` of v6 blob `blob_index`, checked like a chunk a file names (the blob view reads
    /// blobs by chunk, not by file).
    pub fn blob_chunk(&self, blob_index: u32, ci_index: u32) -> Result<ChunkInfo> {
        self.resolve_ci(blob_index, ci_index)
    }

    /// Chunk `ci_index` of v6 blob `blob_index`: location from the blob meta, digest and CRC from the
    /// bootstrap's chunk table, whose offset and size the blob meta must agree with.
    pub(super) fn resolve_ci(&self, blob_index: u32, ci_index: u32) -> Result<ChunkInfo> {
        let info = self.chunk_info_array(blob_index)?.get(ci_index)?;
        match self.meta.chunk_table_entry(blob_index, ci_index)? {
            Some(row) => self.join(info, &row, "the chunk table"),
            None => {
                self.check_extent(&info)?;
                Ok(info)
            }
        }
    }

    /// A chunk must fit its blob: it becomes a cache-file offset and a backend read size.
    fn check_extent(&self, info: &ChunkInfo) -> Result<()> {
        let blob = self
            .info()
            .blobs
            .get(info.blob_index as usize)
            .ok_or_else(|| corrupt!("chunk names blob {} which does not exist", info.blob_index))?;
        let limit = blob.chunk_size.max(self.info().chunk_size);
        if info.uncompressed_size > limit || info.compressed_size > limit {
            return Err(corrupt!(
                "blob {} chunk {}: sizes {}/{} exceed the chunk size {limit}",
                blob.id,
                info.index,
                info.compressed_size,
                info.uncompressed_size
            ));
        }
        let known_size = blob.uncompressed_size > 0 && blob.chunk_count > 0;
        let past_end = (info
            .uncompressed_offset
            .checked_add(info.uncompressed_size as u64))
        .is_none_or(|end| end > blob.uncompressed_size);
        if known_size && (info.index >= blob.chunk_count || past_end) {
            return Err(corrupt!(
                "blob {} chunk {}: index or extent {}+{} lies outside the blob ({} chunks, {} bytes)",
                blob.id,
                info.index,
                info.uncompressed_offset,
                info.uncompressed_size,
                blob.chunk_count,
                blob.uncompressed_size
            ));
        }
        Ok(())
    }

    /// Every chunk of a regular file, located in its blob (for prefetch; v6 reads the blob's chunk-info
    /// array).
    pub fn file_chunks(&self, ino: u64) -> Result<Vec<ChunkInfo>> {
        let inode = self.meta.inode(ino)?;
        self.meta
            .file_chunks(&inode, 0, inode.size)?
            .iter()
            .map(|(file_offset, addr)| self.locate(&self.file_chunk(&inode, *file_offset, addr)?))
            .collect()
    }

    /// The byte ranges `[start, end)` of a regular file that chunks hold, in file order, merged where they
    /// touch. The rest of the file (v5 HAS_HOLE files) is holes, zeros by definition: tools that visit every
    /// byte (`check`, `unpack`) skip them instead of reading them, so a sparse file's size, which a hostile
    /// image sets freely (2^62 over no chunk at all), does not decide how long they take.
    pub fn data_extents(&self, ino: u64) -> Result<Vec<(u64, u64)>> {
        let inode = self.meta.inode(ino)?;
        if !inode.is_reg() {
            return Err(Error::Invalid(format!("inode {ino} is not a regular file")));
        }
        let chunk_size = self.info().chunk_size as u64;
        let mut extents: Vec<(u64, u64)> = Vec::new();
        for (start, addr) in self.meta.file_chunks(&inode, 0, inode.size)? {
            let len = match &addr {
                ChunkAddr::Full(info) => info.uncompressed_size as u64,
                ChunkAddr::Indexed { .. } => chunk_size,
            };
            let end = start.saturating_add(len).min(inode.size);
            match extents.last_mut() {
                Some(last) if last.1 >= start => last.1 = last.1.max(end),
                _ if start < end => extents.push((start, end)),
                _ => {}
            }
        }
        Ok(extents)
    }
}
