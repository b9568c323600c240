//! Which cache files a blob of an image may use. The data file and bitmap of a blob are shared only by
//! images that expect identical bytes at every chunk location, so no image can store bytes another image
//! would read as its own:
//! - When the bootstrap records a digest for its chunks (v5 chunk records, the v6 chunk table), the key
//!   fingerprints, per blob, everything the read path relies on: the blob's uncompressed size, chunk
//!   count, chunk size and digester, and every chunk's CI index, uncompressed offset, uncompressed size
//!   and digest. Two images share the files only if all of these agree; chunks enter them only with their
//!   digest checked. Genuine images sharing a layer blob (and referencing the same chunks of it) share its
//!   cache; a bootstrap naming a victim's blob id but describing it differently gets its own.
//! - A v6 bootstrap without a chunk table has no digest to check a chunk against: its blobs get files
//!   private to that exact bootstrap read from that exact backend (a fingerprint of the bootstrap's bytes
//!   and the backend's location and route), so only a mount of the same image from the same source,
//!   by the same mirrors and proxy, shares them.
//!
//! Fingerprints are the first 128 bits of a SHA-256 (32 hex digits): a forged bootstrap would need a
//! second preimage to get another image's files.
//!
//! The records are also checked here, because the cache trusts them: a chunk described twice in two ways,
//! chunks overlapping in the blob's uncompressed space, or a chunk past the blob's end would let one
//! chunk's bytes be served as another's. Such an image is refused when it is opened with a cache.

use sha2::{Digest, Sha256};

use crate::corrupt;
use crate::error::Result;
use crate::format::{BlobInfo, ChunkInfo, MetaReader};
use crate::storage::digest::hex;

/// The name part that selects a blob's cache files, and how chunks may enter them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    /// 32 hex digits.
    pub tag: String,
    /// Chunks enter only with their digest checked against the image's record.
    pub verified: bool,
}

/// What the read path relies on for one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Record {
    blob_index: u32,
    index: u32,
    uncompressed_offset: u64,
    uncompressed_size: u32,
    digest: [u8; 32],
}

/// One key per blob of the image (`None`: the blob cannot be cached). `backend_location` names where the
/// blobs come from (type and location, no credentials), for the private caches of images without chunk
/// digests; empty when unknown, which leaves those images uncached.
pub fn cache_keys(meta: &dyn MetaReader, backend_location: &str) -> Result<Vec<Option<CacheKey>>> {
    let blobs = &meta.info().blobs;
    if !meta.has_chunk_digests() {
        if backend_location.is_empty() {
            log::info!("blob cache: no chunk digests and no known backend location: not caching");
            return Ok(vec![None; blobs.len()]);
        }
        let mut h = Sha256::new();
        h.update(b"rafsd private blob cache v1\0");
        h.update((meta.bytes().len() as u64).to_le_bytes());
        h.update(meta.bytes());
        h.update(backend_location.as_bytes());
        let tag = hex(&h.finalize()[..16]);
        return Ok(blobs
            .iter()
            .map(|b| {
                cacheable(b).then(|| CacheKey {
                    tag: tag.clone(),
                    verified: false,
                })
            })
            .collect());
    }
    let mut records = Vec::new();
    meta.chunk_records(&mut |c: &ChunkInfo| {
        let digest = c
            .digest
            .ok_or_else(|| corrupt!("blob index {} chunk {}: no digest", c.blob_index, c.index))?;
        records.push(Record {
            blob_index: c.blob_index,
            index: c.index,
            uncompressed_offset: c.uncompressed_offset,
            uncompressed_size: c.uncompressed_size,
            digest,
        });
        Ok(())
    })?;
    records.sort_unstable();
    records.dedup();
    for w in records.windows(2) {
        if (w[0].blob_index, w[0].index) == (w[1].blob_index, w[1].index) {
            let id = blobs.get(w[0].blob_index as usize).map_or("?", |b| &b.id);
            return Err(corrupt!(
                "blob {id} chunk {} is described twice, differently",
                w[0].index
            ));
        }
    }
    let mut keys = Vec::with_capacity(blobs.len());
    let mut rest = records.as_slice();
    for blob in blobs {
        let n = rest.partition_point(|r| r.blob_index == blob.index);
        let (mine, after) = rest.split_at(n);
        rest = after;
        if !cacheable(blob) {
            keys.push(None);
            continue;
        }
        check_layout(blob, mine)?;
        keys.push(Some(CacheKey {
            tag: fingerprint(blob, mine),
            verified: true,
        }));
    }
    if let Some(r) = rest.first() {
        return Err(corrupt!(
            "chunk {} names blob index {}, which does not exist",
            r.index,
            r.blob_index
        ));
    }
    Ok(keys)
}

/// The cache needs a chunk count (bitmap) and an uncompressed size (data file).
fn cacheable(blob: &BlobInfo) -> bool {
    blob.chunk_count > 0 && blob.uncompressed_size > 0
}

/// Every chunk lies inside the blob, and no two overlap.
fn check_layout(blob: &BlobInfo, records: &[Record]) -> Result<()> {
    let id = &blob.id;
    for r in records {
        let end = r
            .uncompressed_offset
            .checked_add(r.uncompressed_size as u64);
        if r.index >= blob.chunk_count
            || r.uncompressed_size > blob.chunk_size
            || end.is_none_or(|e| e > blob.uncompressed_size)
        {
            return Err(corrupt!(
                "blob {id} chunk {}: {}+{} lies outside the blob ({} chunks, {} bytes)",
                r.index,
                r.uncompressed_offset,
                r.uncompressed_size,
                blob.chunk_count,
                blob.uncompressed_size
            ));
        }
    }
    // Genuine blobs place chunks in index order; sort only when they do not.
    let in_order = records.windows(2).all(|w| {
        w[0].uncompressed_offset + w[0].uncompressed_size as u64 <= w[1].uncompressed_offset
    });
    if !in_order {
        let mut extents: Vec<(u64, u64, u32)> = records
            .iter()
            .map(|r| {
                let start = r.uncompressed_offset;
                (start, start + r.uncompressed_size as u64, r.index)
            })
            .collect();
        extents.sort_unstable();
        if let Some(w) = extents.windows(2).find(|w| w[0].1 > w[1].0) {
            return Err(corrupt!(
                "blob {id}: chunks {} and {} overlap in the uncompressed blob",
                w[0].2,
                w[1].2
            ));
        }
    }
    Ok(())
}

fn fingerprint(blob: &BlobInfo, records: &[Record]) -> String {
    let mut h = Sha256::new();
    h.update(b"rafsd blob cache v1\0");
    h.update(blob.id.as_bytes());
    h.update([0]);
    h.update(blob.uncompressed_size.to_le_bytes());
    h.update(blob.chunk_count.to_le_bytes());
    h.update(blob.chunk_size.to_le_bytes());
    h.update(blob.digester.to_u32().to_le_bytes());
    h.update((records.len() as u64).to_le_bytes());
    for r in records {
        h.update(r.index.to_le_bytes());
        h.update(r.uncompressed_offset.to_le_bytes());
        h.update(r.uncompressed_size.to_le_bytes());
        h.update(r.digest);
    }
    hex(&h.finalize()[..16])
}
