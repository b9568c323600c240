//! Chunk digests and CRCs.

use sha2::Digest as _;

use crate::format::Digester;

pub fn digest(algo: Digester, data: &[u8]) -> [u8; 32] {
    match algo {
        Digester::Blake3 => *blake3::hash(data).as_bytes(),
        Digester::Sha256 => sha2::Sha256::digest(data).into(),
    }
}

/// CRC-32C (Castagnoli), as the builder records per chunk.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
