//! The tail of a v6 data blob: "reverse tar" headers that follow each section, and the table of contents
//! (ToC) that names the sections. Used to find the bootstrap inside an inline-meta blob. The records
//! themselves are defined in `rafs_layout::blob`.

use rafs_layout::blob::TocEntry as TocRecord;
use rafs_layout::{padded, Record};

use super::bytes::record;
use crate::corrupt;
use crate::error::Result;

pub use rafs_layout::blob::{
    TarHeader as TarHeaderRecord, TAR_HEADER_SIZE, TOC_COMPRESS_LZ4, TOC_COMPRESS_NONE,
    TOC_COMPRESS_ZSTD, TOC_NAME,
};
pub const TOC_ENTRY_SIZE: u64 = TocRecord::SIZE as u64;

/// A GNU tar header written after its payload: the section's name and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarHeader {
    pub name: Vec<u8>,
    pub size: u64,
}

/// Parse a 512-byte tar header, checking its checksum so random bytes are not taken for one.
pub fn parse_tar_header(h: &[u8]) -> Result<TarHeader> {
    let header: TarHeaderRecord = record(h, 0, "tar header")?;
    if !header.checksum_matches(h) {
        return Err(corrupt!("tar header: checksum does not match its bytes"));
    }
    let size = header
        .size()
        .ok_or_else(|| corrupt!("tar header: unreadable size"))?;
    Ok(TarHeader {
        name: padded(&header.name).to_vec(),
        size,
    })
}

/// One ToC entry.
#[derive(Debug, Clone)]
pub struct TocEntry {
    pub name: Vec<u8>,
    /// 0x1 none, 0x2 zstd, 0x4 lz4_block.
    pub compression: u32,
    pub uncompressed_digest: [u8; 32],
    pub compressed_offset: u64,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
}

pub fn parse_toc(entries: &[u8]) -> Result<Vec<TocEntry>> {
    if !(entries.len() as u64).is_multiple_of(TOC_ENTRY_SIZE) {
        return Err(corrupt!(
            "blob ToC of {} bytes is not a whole number of entries",
            entries.len()
        ));
    }
    Ok(entries
        .chunks_exact(TOC_ENTRY_SIZE as usize)
        .map(|e| {
            let e = TocRecord::read(e).expect("a whole entry");
            TocEntry {
                name: padded(&e.name).to_vec(),
                compression: e.flags & 0xF,
                uncompressed_digest: e.uncompressed_digest,
                compressed_offset: e.compressed_offset,
                compressed_size: e.compressed_size,
                uncompressed_size: e.uncompressed_size,
            }
        })
        .collect())
}
