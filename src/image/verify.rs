//! A chunk's stored bytes decoded and checked against what the image records (size, digest, CRC32C).
//! Shared by the reader and the background streams, which must check alike.

use crate::error::{Error, Result};
use crate::format::{BlobInfo, ChunkInfo};
use crate::storage::compress;
use crate::storage::digest::{crc32c, digest, hex};

/// The uncompressed bytes of a chunk from its stored bytes (a raw chunk is copied).
pub(super) fn decode_chunk(blob: &BlobInfo, info: &ChunkInfo, stored: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    decode_chunk_into(blob, info, stored, &mut out)?;
    Ok(out)
}

/// [`decode_chunk`] into `out`, resized to the chunk: a buffer reused from chunk to chunk is zero-filled
/// only where it grows.
pub(super) fn decode_chunk_into(
    blob: &BlobInfo,
    info: &ChunkInfo,
    stored: &[u8],
    out: &mut Vec<u8>,
) -> Result<()> {
    if !info.compressed {
        check_raw_size(blob, info, stored.len())?;
        out.clear();
        out.extend_from_slice(stored);
        return Ok(());
    }
    out.resize(info.uncompressed_size as usize, 0);
    compress::decompress_into(blob.compressor, stored, out).map_err(|e| {
        // The codec's own message, without a second "integrity check failed" prefix.
        let why = match e {
            Error::Integrity(m) => m,
            other => other.to_string(),
        };
        Error::Integrity(format!("blob {} chunk {}: {why}", blob.id, info.index))
    })
}

/// A chunk stored raw is stored at its uncompressed size.
pub(super) fn check_raw_size(blob: &BlobInfo, info: &ChunkInfo, stored: usize) -> Result<()> {
    if stored != info.uncompressed_size as usize {
        return Err(Error::Integrity(format!(
            "blob {} chunk {}: stored raw but sizes differ",
            blob.id, info.index
        )));
    }
    Ok(())
}

/// Size, digest and CRC32C (when recorded) of a chunk's uncompressed bytes. The digest is checked when
/// validating (then it must be recorded) and whenever the chunk may go into a cache shared by images
/// (`for_cache`), which takes nothing unchecked. Returns whether the digest was checked.
pub(super) fn verify_chunk(
    blob: &BlobInfo,
    info: &ChunkInfo,
    data: &[u8],
    validate: bool,
    for_cache: bool,
) -> Result<bool> {
    let what = || format!("blob {} chunk {}", blob.id, info.index);
    if data.len() != info.uncompressed_size as usize {
        return Err(Error::Integrity(format!(
            "{}: {} bytes, expected {}",
            what(),
            data.len(),
            info.uncompressed_size
        )));
    }
    if validate && info.digest.is_none() {
        return Err(Error::Integrity(format!(
            "{}: no digest recorded to validate against",
            what()
        )));
    }
    // Digest first: it is the stronger check and names the algorithm the image chose.
    let mut checked = false;
    if let Some(want) = info.digest.filter(|_| validate || for_cache) {
        let got = digest(blob.digester, data);
        if got != want {
            return Err(Error::Integrity(format!(
                "{}: {} digest {} does not match the recorded {}",
                what(),
                blob.digester.name(),
                hex(&got),
                hex(&want)
            )));
        }
        checked = true;
    }
    if let Some(want) = info.crc32 {
        let got = crc32c(data);
        if got != want {
            return Err(Error::Integrity(format!(
                "{}: CRC32C {got:#010x}, expected {want:#010x}",
                what()
            )));
        }
    }
    Ok(checked)
}

/// The chunk's digest is recorded and `data` has it.
pub(super) fn digest_matches(blob: &BlobInfo, info: &ChunkInfo, data: &[u8]) -> bool {
    info.digest
        .is_some_and(|want| digest(blob.digester, data) == want)
}
