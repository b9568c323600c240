//! Bounds-checked little-endian access to on-disk structures. Every offset read from an image goes through
//! here, so a hostile offset becomes a `Corrupt` error instead of a panic or an out-of-bounds read.

use rafs_layout::Record;

use crate::corrupt;
use crate::error::Result;

/// `data[off..off+len]`, or an error naming `what` when the range is not inside `data`.
pub fn slice(data: &[u8], off: u64, len: u64, what: impl std::fmt::Display) -> Result<&[u8]> {
    let end = off
        .checked_add(len)
        .ok_or_else(|| corrupt!("{what}: offset {off} + length {len} overflows"))?;
    if end > data.len() as u64 {
        return Err(corrupt!(
            "{what}: range {off}..{end} lies outside the {}-byte metadata",
            data.len()
        ));
    }
    Ok(&data[off as usize..end as usize])
}

/// The record `R` at `off` of `data`, or an error naming `what` when it does not fit.
pub fn record<R: Record>(data: &[u8], off: u64, what: impl std::fmt::Display) -> Result<R> {
    let bytes = slice(data, off, R::SIZE as u64, what)?;
    Ok(R::read(bytes).expect("slice has the record's size"))
}

/// Fixed-layout little-endian field reads on a slice already known to be long enough for the structure.
/// Callers obtain that slice with [`fn@slice`], so the indexing below cannot fail.
pub trait Le {
    fn u8_at(&self, off: usize) -> u8;
    fn u16_at(&self, off: usize) -> u16;
    fn u32_at(&self, off: usize) -> u32;
    fn u64_at(&self, off: usize) -> u64;
}

impl Le for [u8] {
    fn u8_at(&self, off: usize) -> u8 {
        self[off]
    }
    fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes(self[off..off + 2].try_into().unwrap())
    }
    fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self[off..off + 4].try_into().unwrap())
    }
    fn u64_at(&self, off: usize) -> u64 {
        u64::from_le_bytes(self[off..off + 8].try_into().unwrap())
    }
}

pub fn round_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}
