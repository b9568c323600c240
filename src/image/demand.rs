//! What user reads of an image asked for (the config's `access_pattern`): one bit per chunk, kept apart
//! from what amplification and prefetch fetched, to compare the two.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::RafsImage;
use crate::format::limits::MAX_BLOB_CHUNKS;

/// The chunks user reads asked for (not what amplification or prefetch added), one bit per chunk of each
/// blob, grown up to the highest chunk read (at most 2^24 bits per blob): what a program needed from an
/// image, to compare with what was fetched.
pub(super) struct Demand {
    pub(super) blobs: Vec<Mutex<Vec<u64>>>,
    /// Compressed bytes of the chunks whose records carry their size (v5); v6 sizes are looked up when
    /// asked ([`RafsImage::demand`]).
    pub(super) recorded_bytes: AtomicU64,
}

impl Demand {
    /// Mark a chunk; true the first time. An index no blob can have is not marked: a v5 record's index is
    /// a full u32, and the bitmap grows to it (512 MiB for the last one).
    pub(super) fn mark(&self, blob: u32, index: u32) -> bool {
        if index >= MAX_BLOB_CHUNKS {
            return false;
        }
        let Some(bits) = self.blobs.get(blob as usize) else {
            return false;
        };
        let mut bits = bits.lock().unwrap_or_else(|e| e.into_inner());
        let word = index as usize / 64;
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        let mask = 1u64 << (index % 64);
        let first = bits[word] & mask == 0;
        bits[word] |= mask;
        first
    }
}

/// What user reads of an image asked for: distinct chunks and, when every blob's chunk sizes are known
/// without the network, their compressed size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemandSummary {
    pub chunks: u64,
    pub compressed_bytes: Option<u64>,
}

impl RafsImage {
    /// The chunks user reads asked for, when the image records them
    /// ([`ImageOptions::record_demand`](super::ImageOptions::record_demand)). Compressed sizes of v6 chunks come from the blobs' chunk-info arrays already loaded; `None` when
    /// one is not (only cache hits on that blob so far) rather than a network round trip.
    pub fn demand(&self) -> Option<DemandSummary> {
        let d = self.demand.as_ref()?;
        let mut chunks = 0;
        let mut bytes = Some(d.recorded_bytes.load(Ordering::Relaxed));
        for (blob, bits) in d.blobs.iter().enumerate() {
            let bits = bits.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let marked: u64 = bits.iter().map(|w| w.count_ones() as u64).sum();
            chunks += marked;
            if marked == 0 || self.info().version != 6 {
                continue;
            }
            let array = self.loaded_chunk_info_array(blob as u32);
            for (word, w) in bits.iter().enumerate() {
                for bit in (0..64).filter(|b| w & (1 << b) != 0) {
                    let size = array
                        .as_ref()
                        .and_then(|a| a.get((word * 64 + bit) as u32).ok())
                        .map(|c| c.compressed_size as u64);
                    bytes = bytes.zip(size).map(|(a, b)| a + b);
                }
            }
        }
        Some(DemandSummary {
            chunks,
            compressed_bytes: bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_index_no_blob_can_have_is_not_marked() {
        let demand = Demand {
            blobs: vec![Mutex::new(Vec::new())],
            recorded_bytes: AtomicU64::new(0),
        };
        assert!(demand.mark(0, 70));
        assert!(!demand.mark(0, 70));
        for index in [MAX_BLOB_CHUNKS, u32::MAX] {
            assert!(!demand.mark(0, index));
        }
        // The bitmap holds bit 70 only: two words, not 2^26 for index u32::MAX.
        assert_eq!(demand.blobs[0].lock().unwrap().len(), 2);
        assert!(demand.mark(0, MAX_BLOB_CHUNKS - 1));
    }
}
