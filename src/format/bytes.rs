//! Bounds-checked little-endian access to on-disk structures. Every offset read from an image goes through
//! here, so a hostile offset becomes a `Corrupt` error instead of a panic or an out-of-bounds read.

use crate::corrupt;
use crate::error::Result;

/// `data[off..off+len]`, or an error naming `what` when the range is not inside `data`.
pub fn slice<'a>(data: &'a [u8], off: u64, len: u64, what: &str) -> Result<&'a [u8]> {
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

/// Fixed-layout little-endian field reads on a slice already known to be long enough for the structure.
/// Callers obtain that slice with [`slice`](fn@slice), so the indexing below cannot fail.
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

/// A NUL-padded ASCII field (blob ids, ToC names).
pub fn padded_str(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}
