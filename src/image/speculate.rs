//! Fetching a little past a miss that lands near the previous one, when neither the reader nor the
//! image's prefetch table predicts anything. Programs starting up read many small files that sit close
//! together in the blob (a language's library directory); each would cost a round trip of its own. The
//! bytes fetched this way are capped at a share of what reads needed so far, so everything fetched stays
//! within `1 + 1/SHARE_DIVISOR` times what was read, whether or not the guess was right.

use std::sync::atomic::{AtomicU64, Ordering};

/// A miss within this many bytes of the blob's previous miss counts as "near".
pub const NEAR_BYTES: u64 = 1 << 20;
/// Most bytes one miss fetches past itself on speculation.
pub const MAX_AHEAD: u64 = 256 << 10;
/// Speculative bytes stay within 1/SHARE_DIVISOR of the bytes misses needed.
pub const SHARE_DIVISOR: u64 = 4;

pub struct Speculation {
    /// Per blob: 1 + the offset where its last miss ended (0: none yet).
    last_miss_end: Vec<AtomicU64>,
    /// Compressed bytes of the chunks reads missed.
    needed: AtomicU64,
    /// Compressed bytes fetched past misses on speculation.
    speculative: AtomicU64,
}

impl Speculation {
    pub fn new(blobs: usize) -> Self {
        Speculation {
            last_miss_end: (0..blobs).map(|_| AtomicU64::new(0)).collect(),
            needed: AtomicU64::new(0),
            speculative: AtomicU64::new(0),
        }
    }

    /// A read missed `size` compressed bytes at `offset` of blob `blob`. Returns how many bytes after them
    /// may be fetched on speculation, already counted as spent: the caller [`Speculation::refund`]s what
    /// it does not use.
    pub fn miss(&self, blob: u32, offset: u64, size: u64) -> u64 {
        self.needed.fetch_add(size, Ordering::Relaxed);
        let Some(last) = self.last_miss_end.get(blob as usize) else {
            return 0;
        };
        let prev = last.swap(
            offset.saturating_add(size).saturating_add(1),
            Ordering::Relaxed,
        );
        if prev == 0 || offset.abs_diff(prev - 1) > NEAR_BYTES {
            return 0;
        }
        let cap = self.needed.load(Ordering::Relaxed) / SHARE_DIVISOR;
        let mut granted = 0;
        let _ = self
            .speculative
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |spent| {
                granted = cap.saturating_sub(spent).min(MAX_AHEAD);
                Some(spent + granted)
            });
        granted
    }

    /// Give back speculative bytes granted but not fetched.
    pub fn refund(&self, bytes: u64) {
        let _ = self
            .speculative
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some(s.saturating_sub(bytes))
            });
    }

    /// (bytes misses needed, bytes fetched on speculation)
    pub fn totals(&self) -> (u64, u64) {
        (
            self.needed.load(Ordering::Relaxed),
            self.speculative.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_near_misses_speculate_and_never_past_the_share() {
        let s = Speculation::new(2);
        assert_eq!(
            s.miss(0, 10 << 20, 400 << 10),
            0,
            "a first miss predicts nothing"
        );
        assert_eq!(
            s.miss(0, 40 << 20, 400 << 10),
            0,
            "a far miss predicts nothing"
        );
        // 800 KiB needed so far plus this 400: a quarter is 300 KiB, capped per miss.
        assert_eq!(s.miss(0, (40 << 20) + (600 << 10), 400 << 10), MAX_AHEAD);
        assert_eq!(s.miss(1, 0, 4096), 0, "blobs are apart");
        // Everything granted, whatever happens to it, stays within the share of what was needed.
        for i in 0..100u64 {
            s.miss(0, (41 << 20) + i * 8192, 4096);
            let (needed, spent) = s.totals();
            assert!(spent * SHARE_DIVISOR <= needed, "{spent} of {needed}");
        }
        s.refund(u64::MAX);
        assert_eq!(s.totals().1, 0);
    }
}
