//! Records inside a Nydus data blob: the chunk-info (CI) array with its 4096-byte header and batch
//! contexts ("blob.meta"), the table of contents, and the "reverse tar" headers that follow each section.

use crate::record;

pub const CI_MAGIC: u32 = 0xB10B_B10B;

/// Flags in the top byte of a V2 entry's `uncomp_info`.
pub mod ci_flags {
    pub const COMPRESSED: u8 = 0x01;
    pub const ZRAN: u8 = 0x02;
    pub const BATCH: u8 = 0x04;
    pub const ENCRYPTED: u8 = 0x08;
    pub const HAS_CRC32: u8 = 0x10;
}

record! {
    /// The header after the (compressed) CI array, 4096 bytes; `magic2` is the record's last word.
    pub struct CiHeader(4096) {
        magic: u32 = 0,
        /// `BlobFeatures`, as in the blob table.
        features: u32 = 4,
        ci_compressor: u32 = 8,
        ci_entries: u32 = 12,
        ci_offset: u64 = 16,
        ci_compressed_size: u64 = 24,
        ci_uncompressed_size: u64 = 32,
        /// Offset of the zran or batch table inside the uncompressed CI buffer.
        ci_zran_offset: u64 = 40,
        ci_zran_size: u64 = 48,
        ci_zran_count: u32 = 56,
        magic2: u32 = 4092,
    }
}

record! {
    /// A V1 chunk-info entry (16 bytes): offsets and sizes packed into two words (sizes minus one, split
    /// into low 20 and high 4 bits). Use [`CiV1::new`] and the accessors rather than the raw words.
    pub struct CiV1(16) {
        uncomp_info: u64 = 0,
        comp_info: u64 = 8,
    }
}

impl CiV1 {
    /// Sizes must be 1..=16 MiB, the uncompressed offset 4 KiB aligned and below 2^44, the compressed
    /// offset below 2^40; other bits are masked off.
    pub fn new(
        compressed_offset: u64,
        compressed_size: u32,
        uncompressed_offset: u64,
        uncompressed_size: u32,
    ) -> Self {
        let us = uncompressed_size.wrapping_sub(1) as u64;
        let cs = compressed_size.wrapping_sub(1) as u64;
        CiV1 {
            uncomp_info: (uncompressed_offset & 0xFFF_FFFF_F000)
                | (us & 0xF_FFFF) << 44
                | (us >> 20 & 0xF) << 8,
            comp_info: (compressed_offset & 0xFF_FFFF_FFFF)
                | (cs & 0xF_FFFF) << 44
                | (cs >> 20 & 0xF) << 40,
        }
    }
    pub fn uncompressed_offset(&self) -> u64 {
        self.uncomp_info & 0xFFF_FFFF_F000
    }
    pub fn uncompressed_size(&self) -> u32 {
        ((self.uncomp_info >> 44) | ((self.uncomp_info >> 8) & 0xF) << 20) as u32 + 1
    }
    pub fn compressed_offset(&self) -> u64 {
        self.comp_info & 0xFF_FFFF_FFFF
    }
    pub fn compressed_size(&self) -> u32 {
        ((self.comp_info >> 44) | ((self.comp_info >> 40) & 0xF) << 20) as u32 + 1
    }
}

record! {
    /// A V2 chunk-info entry (24 bytes): flags in the top byte, and a data word holding a batch or zran
    /// position, or the chunk's CRC32C.
    pub struct CiV2(24) {
        uncomp_info: u64 = 0,
        comp_info: u64 = 8,
        data: u64 = 16,
    }
}

impl CiV2 {
    pub fn flags(&self) -> u8 {
        (self.uncomp_info >> 56) as u8
    }
    pub fn uncompressed_offset(&self) -> u64 {
        (self.uncomp_info & 0xFFFF_FFFF) << 12
    }
    pub fn uncompressed_size(&self) -> u32 {
        ((self.uncomp_info >> 32) & 0xFF_FFFF) as u32 + 1
    }
    pub fn compressed_offset(&self) -> u64 {
        self.comp_info & 0xFF_FFFF_FFFF
    }
    pub fn compressed_size(&self) -> u32 {
        (self.comp_info >> 40) as u32
    }
    /// (batch or zran index, offset inside it), for batched and zran chunks.
    pub fn position(&self) -> (u32, u32) {
        ((self.data >> 32) as u32, self.data as u32)
    }
    /// The CRC32C, when the flags say the data word holds one.
    pub fn crc32(&self) -> Option<u32> {
        let f = self.flags();
        (f & ci_flags::HAS_CRC32 != 0 && f & ci_flags::BATCH == 0).then_some(self.data as u32)
    }
}

record! {
    /// One batch context (40 bytes) of a batched blob: the sizes of a batch of small chunks.
    pub struct BatchContext(40) {
        compressed_size: u32 = 0,
        uncompressed_batch_size: u32 = 4,
    }
}

/// ToC entry compression flags.
pub const TOC_COMPRESS_NONE: u32 = 0x1;
pub const TOC_COMPRESS_ZSTD: u32 = 0x2;
pub const TOC_COMPRESS_LZ4: u32 = 0x4;
/// The name of the ToC section (its tar header is the blob's last 512 bytes).
pub const TOC_NAME: &[u8] = b"rafs.blob.toc";

record! {
    /// One table-of-contents entry (128 bytes) naming a section of the blob.
    pub struct TocEntry(128) {
        /// Compression in the low 4 bits ([`TOC_COMPRESS_NONE`], ...).
        flags: u32 = 0,
        name: [u8; 16] = 8,
        /// sha256 of the section's uncompressed bytes.
        uncompressed_digest: [u8; 32] = 24,
        compressed_offset: u64 = 56,
        compressed_size: u64 = 64,
        uncompressed_size: u64 = 72,
    }
}

pub const TAR_HEADER_SIZE: u64 = 512;

record! {
    /// The fields of a GNU tar header (512 bytes) that blob sections use; numbers are ASCII octal (see
    /// [`TarHeader::section`] and [`TarHeader::size`]).
    pub struct TarHeader(512) {
        name: [u8; 100] = 0,
        mode: [u8; 8] = 100,
        size: [u8; 12] = 124,
        mtime: [u8; 12] = 136,
        checksum: [u8; 8] = 148,
        type_flag: u8 = 156,
        magic: [u8; 8] = 257,
    }
}

impl TarHeader {
    /// The header written after a section of `size` bytes named `name` (at most 100 bytes): a regular
    /// file with a valid checksum, so tar tools accept it. `None` when the name does not fit.
    pub fn section(name: &[u8], size: u64) -> Option<[u8; 512]> {
        let mut field = [0u8; 12];
        if size < 1 << 33 {
            field[..11].copy_from_slice(octal(size, 11).as_slice());
        } else {
            // Too big for 11 octal digits: GNU base-256 (high bit set, big-endian value).
            field[0] = 0x80;
            field[4..].copy_from_slice(&size.to_be_bytes());
        }
        let mut mtime = [0u8; 12];
        mtime[..11].copy_from_slice(b"00000000000");
        let header = TarHeader {
            name: crate::pad(name)?,
            mode: [0; 8],
            size: field,
            mtime,
            checksum: [b' '; 8],
            type_flag: b'0',
            magic: *b"ustar  \0",
        };
        let mut out = [0u8; 512];
        crate::Record::write_to(&header, &mut out);
        let sum: u64 = out.iter().map(|&b| b as u64).sum();
        let mut checksum = [0u8; 8];
        checksum[..7].copy_from_slice(octal(sum, 7).as_slice());
        out[148..156].copy_from_slice(&checksum);
        Some(out)
    }

    /// The section size, octal or GNU base-256; `None` when unreadable.
    pub fn size(&self) -> Option<u64> {
        if self.size[0] & 0x80 != 0 {
            if self.size[..4] != [0x80, 0, 0, 0] {
                return None;
            }
            return Some(u64::from_be_bytes(self.size[4..].try_into().ok()?));
        }
        parse_octal(&self.size)
    }

    /// Does the stored checksum match the header's bytes (`raw`, the 512 bytes it was read from)?
    pub fn checksum_matches(&self, raw: &[u8]) -> bool {
        let Some(stored) = parse_octal(&self.checksum) else {
            return false;
        };
        let sum: u64 = raw
            .iter()
            .take(512)
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    b as u64
                }
            })
            .sum();
        stored == sum
    }
}

/// `value` as `digits` zero-padded octal digits.
fn octal(value: u64, digits: usize) -> Vec<u8> {
    format!("{value:0digits$o}").into_bytes()
}

/// An ASCII octal field, NUL- or space-terminated; empty reads as 0.
fn parse_octal(field: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(crate::padded(field)).ok()?.trim();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Record;

    #[test]
    fn ci_header_round_trips_with_both_magics() {
        let h = CiHeader {
            magic: CI_MAGIC,
            features: 0x5000_0003,
            ci_compressor: 3,
            ci_entries: 5,
            ci_offset: 0x207a,
            ci_compressed_size: 72,
            ci_uncompressed_size: 80,
            ci_zran_offset: 0,
            ci_zran_size: 0,
            ci_zran_count: 0,
            magic2: CI_MAGIC,
        };
        let bytes = h.to_bytes();
        assert_eq!(&bytes[4092..], &CI_MAGIC.to_le_bytes());
        assert_eq!(CiHeader::read(&bytes), Some(h));
    }

    #[test]
    fn ci_entries_pack_and_unpack() {
        // Values from a real build (doc §1.14): (uoff, usz, coff, csz).
        for (uoff, usz, coff, csz) in [
            (0u64, 6u32, 0u64, 6u32),
            (4096, 1 << 20, 6, 1 << 20),
            (3_006_464, 5000, 3_000_006, 5000),
            (0xFFF_FFFF_F000, 16 << 20, (1 << 40) - 1, 1),
        ] {
            let e = CiV1::new(coff, csz, uoff, usz);
            let e = CiV1::read(&e.to_bytes()).unwrap();
            assert_eq!(
                (
                    e.uncompressed_offset(),
                    e.uncompressed_size(),
                    e.compressed_offset(),
                    e.compressed_size()
                ),
                (uoff, usz, coff, csz)
            );
        }
        let v2 = CiV2 {
            uncomp_info: ((ci_flags::COMPRESSED | ci_flags::HAS_CRC32) as u64) << 56
                | (4095u64 << 32)
                | 3,
            comp_info: 100 << 40 | 12345,
            data: 0xdead_beef,
        };
        let v2 = CiV2::read(&v2.to_bytes()).unwrap();
        assert_eq!(v2.uncompressed_offset(), 3 << 12);
        assert_eq!(v2.uncompressed_size(), 4096);
        assert_eq!((v2.compressed_offset(), v2.compressed_size()), (12345, 100));
        assert_eq!(v2.crc32(), Some(0xdead_beef));
        let batched = CiV2 {
            uncomp_info: ((ci_flags::BATCH | ci_flags::HAS_CRC32) as u64) << 56,
            comp_info: 0,
            data: 7 << 32 | 512,
        };
        assert_eq!(batched.position(), (7, 512));
        assert_eq!(batched.crc32(), None, "a batch position is not a CRC");
        let b = BatchContext {
            compressed_size: 10,
            uncompressed_batch_size: 20,
        };
        assert_eq!(BatchContext::read(&b.to_bytes()), Some(b));
    }

    #[test]
    fn toc_entries_round_trip() {
        let e = TocEntry {
            flags: TOC_COMPRESS_ZSTD,
            name: crate::pad(b"blob.meta").unwrap(),
            uncompressed_digest: [5; 32],
            compressed_offset: 0x207a,
            compressed_size: 72,
            uncompressed_size: 80,
        };
        let bytes = e.to_bytes();
        assert_eq!(&bytes[8..17], b"blob.meta");
        assert_eq!(TocEntry::read(&bytes), Some(e));
    }

    #[test]
    fn tar_headers_carry_name_size_and_a_valid_checksum() {
        for size in [0u64, 4096 + 80, (1 << 33) - 1, 1 << 33, 5 << 40] {
            let raw = TarHeader::section(b"blob.meta", size).unwrap();
            let h = TarHeader::read(&raw).unwrap();
            assert!(h.checksum_matches(&raw), "size {size}");
            assert_eq!(h.size(), Some(size));
            assert_eq!(crate::padded(&h.name), b"blob.meta");
            assert_eq!(h.type_flag, b'0');
        }
        let mut raw = TarHeader::section(TOC_NAME, 512).unwrap();
        raw[0] ^= 1;
        assert!(!TarHeader::read(&raw).unwrap().checksum_matches(&raw));
        assert!(TarHeader::section(&[b'a'; 101], 1).is_none());
    }
}
