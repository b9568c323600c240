//! The tail of a v6 data blob: "reverse tar" headers that follow each section, and the table of contents
//! (ToC) that names the sections. Used to find the bootstrap inside an inline-meta blob.

use super::bytes::{padded_str, slice, Le};
use crate::corrupt;
use crate::error::Result;

pub const TAR_HEADER_SIZE: u64 = 512;
pub const TOC_NAME: &[u8] = b"rafs.blob.toc";
pub const TOC_ENTRY_SIZE: u64 = 128;

/// A GNU tar header written after its payload: the section's name and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarHeader {
    pub name: Vec<u8>,
    pub size: u64,
}

/// Parse a 512-byte tar header, checking its checksum so random bytes are not taken for one.
pub fn parse_tar_header(h: &[u8]) -> Result<TarHeader> {
    let h = slice(h, 0, TAR_HEADER_SIZE, "tar header")?;
    let stored =
        parse_octal(&h[148..156]).ok_or_else(|| corrupt!("tar header: unreadable checksum"))?;
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u64
            }
        })
        .sum();
    if stored != sum {
        return Err(corrupt!(
            "tar header: checksum {stored} does not match {sum}"
        ));
    }
    let size = parse_octal(&h[124..136]).ok_or_else(|| corrupt!("tar header: unreadable size"))?;
    Ok(TarHeader {
        name: padded_str(&h[..100]).to_vec(),
        size,
    })
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(padded_str(field)).ok()?.trim();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
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

pub const TOC_COMPRESS_NONE: u32 = 0x1;
pub const TOC_COMPRESS_ZSTD: u32 = 0x2;
pub const TOC_COMPRESS_LZ4: u32 = 0x4;

pub fn parse_toc(entries: &[u8]) -> Result<Vec<TocEntry>> {
    if !(entries.len() as u64).is_multiple_of(TOC_ENTRY_SIZE) {
        return Err(corrupt!(
            "blob ToC of {} bytes is not a whole number of entries",
            entries.len()
        ));
    }
    Ok(entries
        .chunks_exact(TOC_ENTRY_SIZE as usize)
        .map(|e| TocEntry {
            name: padded_str(&e[8..24]).to_vec(),
            compression: e.u32_at(0) & 0xF,
            uncompressed_digest: e[24..56].try_into().unwrap(),
            compressed_offset: e.u64_at(56),
            compressed_size: e.u64_at(64),
            uncompressed_size: e.u64_at(72),
        })
        .collect())
}
