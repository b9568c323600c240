//! How much memory an image may make the daemon hold. Each size below is recorded in the bootstrap, so an
//! image beyond a limit is refused when it is opened (at mount time), with an error naming the limit,
//! instead of costing memory or CPU later at a guest's request. Each value is far above what real images
//! use (the reason is given with it); raising one is a deliberate choice, not a tuning knob.

use crate::error::{Error, Result};

/// Largest decoded chunk-info array of one v6 blob: 64 MiB. It is read from the blob and kept decoded
/// while the image is mounted, and a few KiB of zstd can claim it (a decompression bomb). 64 MiB holds
/// 4 Mi 16-byte (V1) or 2.8 Mi 24-byte (V2) entries: a 4 TiB layer in the default 1 MiB chunks, 16 GiB
/// in 4 KiB chunks.
pub const MAX_CI_ARRAY_BYTES: u64 = 64 << 20;

/// Largest sum of the decoded chunk-info arrays of one image: 256 MiB, so that an image of many blobs (up
/// to 255) cannot multiply the per-blob limit.
pub const MAX_IMAGE_CI_BYTES: u64 = 256 << 20;

/// Largest bootstrap extracted from a blob with inlined metadata: 256 MiB, like the chunk-info arrays of
/// one image. It is decompressed into memory and held while the image is mounted, and its ToC entry says
/// how large it is (a few KiB of zstd can claim it). Separate bootstraps are mapped, not held.
pub const MAX_INLINE_BOOTSTRAP_BYTES: u64 = 256 << 20;

/// Most blobs of one image: 255, what a v6 chunk address can name (v5 is held to it too). Each blob gets
/// cache files, descriptors and mappings at mount.
pub const MAX_BLOBS: usize = 255;

/// Most chunks of one blob: 2^24 (the v6 blob table's bound, applied to v5's extended blob table too).
/// Per-blob bitmaps (the cache's chunk map, the access pattern) have a bit per chunk index.
pub const MAX_BLOB_CHUNKS: u32 = 1 << 24;

/// Most chunks of all the blobs of one image: 2^26, so that an image of many blobs (up to 255) cannot
/// multiply the per-blob limit: 8 MiB of cache bitmaps (on disk, and walked whole by each
/// `/api/v1/metrics/blobcache`) instead of 510 MiB. 2^26 chunks are 64 TiB in 1 MiB chunks, 256 GiB in
/// 4 KiB chunks.
pub const MAX_IMAGE_CHUNKS: u64 = 1 << 26;

/// Largest xattr area of one v5 inode: 256 KiB, the most a v6 (EROFS) inode can carry (a 16-bit count of
/// 4-byte units). GETXATTR and LISTXATTR decode the area whole on every call.
pub const MAX_XATTR_AREA: u64 = 256 << 10;

/// Most chunks the blob view indexes for one image: 4 Mi, i.e. 16 MiB of 4-byte placements (the view
/// keeps each blob's chunks sorted by uncompressed offset). 4 Mi chunks are 4 TiB in 1 MiB chunks.
pub const MAX_VIEW_CHUNKS: u64 = 4 << 20;

/// The error for a size beyond one of the limits above: `what` says whose size it is and how large,
/// `limit` the limit in words ("64 MiB per blob").
pub fn exceeded(what: String, limit: &str) -> Error {
    Error::Invalid(format!(
        "image refused: {what}, more than the limit of {limit}"
    ))
}

/// A blob table of `blobs` blobs (`listed` says how many in words: a table read entry by entry knows
/// only "256 blobs or more"): within [`MAX_BLOBS`], or the error naming the limit.
pub fn check_blob_count(blobs: u64, listed: &str) -> Result<()> {
    match blobs > MAX_BLOBS as u64 {
        true => Err(exceeded(
            format!("the blob table lists {listed}"),
            "255 blobs (what a v6 chunk address can name)",
        )),
        false => Ok(()),
    }
}

/// Blob `id` of `chunks` chunks: within [`MAX_BLOB_CHUNKS`], or the error naming the limit.
pub fn check_blob_chunks(id: &str, chunks: u32) -> Result<()> {
    match chunks > MAX_BLOB_CHUNKS {
        true => Err(exceeded(
            format!("blob {id} has {chunks} chunks"),
            "2^24 chunks per blob",
        )),
        false => Ok(()),
    }
}

/// The blob table's chunk counts added up: within [`MAX_IMAGE_CHUNKS`], or the error naming the limit.
pub fn check_image_chunks(blobs: &[super::BlobInfo]) -> Result<()> {
    let total: u64 = blobs.iter().map(|b| u64::from(b.chunk_count)).sum();
    match total > MAX_IMAGE_CHUNKS {
        true => Err(exceeded(
            format!("its {} blobs have {total} chunks", blobs.len()),
            "2^26 chunks per image",
        )),
        false => Ok(()),
    }
}
