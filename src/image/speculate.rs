//! Fetching a little past a miss that lands near the previous one, when neither the reader, the image's
//! prefetch table nor the miss's directory (`siblings.rs`, which spends from the same budget) predicts
//! anything. Programs starting up read many small files that sit close together in the blob (a language's
//! library directory); each would cost a round trip of its own. The bytes fetched this way are capped at a
//! share of what reads needed so far (the chunks they missed, and the guessed chunks they then read): the
//! guessed bytes no read has used yet stay within that share, so everything fetched stays within
//! `1 + 1/SHARE_DIVISOR` times what was read, however wrong the guesses (misses and guesses that proved
//! right are chunks read; the rest is at most the share of them).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// A miss within this many bytes of the blob's previous miss counts as "near".
pub const NEAR_BYTES: u64 = 1 << 20;
/// Most bytes one miss fetches past itself on speculation.
pub const MAX_AHEAD: u64 = 256 << 10;
/// Speculative bytes stay within 1/SHARE_DIVISOR of the bytes reads needed.
pub const SHARE_DIVISOR: u64 = 4;
/// Guessed chunks remembered until read (beyond, a guess that proves right is simply not credited).
const MAX_UNREAD: usize = 1 << 16;
/// Bits of the filter that spares a cache hit the lock when its chunk was never guessed.
const FILTER_BITS: usize = 1 << 16;

pub struct Speculation {
    /// Per blob: 1 + the offset where its last miss ended (0: none yet).
    last_miss_end: Vec<AtomicU64>,
    /// Compressed bytes of the chunks reads missed.
    needed: AtomicU64,
    /// Compressed bytes fetched past misses on speculation.
    speculative: AtomicU64,
    /// Of those, the bytes of guessed chunks reads then asked for (each once).
    credited: AtomicU64,
    /// Chunks fetched on a guess that no read has asked for yet: (blob, chunk) → compressed size.
    unread: Mutex<HashMap<(u32, u32), u32>>,
    /// `unread.len()`, so reads need not lock while nothing is owed.
    unread_count: AtomicUsize,
    /// One bit per hash of a guessed chunk, never cleared: a hit whose bit is clear was never guessed
    /// and takes no lock.
    filter: Vec<AtomicU64>,
}

fn filter_bit(blob: u32, index: u32) -> (usize, u64) {
    let h = ((blob as u64) << 32 | index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48;
    let bit = h as usize % FILTER_BITS;
    (bit / 64, 1 << (bit % 64))
}

impl Speculation {
    pub fn new(blobs: usize) -> Self {
        Speculation {
            last_miss_end: (0..blobs).map(|_| AtomicU64::new(0)).collect(),
            needed: AtomicU64::new(0),
            speculative: AtomicU64::new(0),
            credited: AtomicU64::new(0),
            unread: Mutex::new(HashMap::new()),
            unread_count: AtomicUsize::new(0),
            filter: (0..FILTER_BITS / 64).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// `chunks` ((blob, chunk, compressed size)) are being fetched on a guess.
    pub fn guessed(&self, chunks: impl ExactSizeIterator<Item = (u32, u32, u32)>) {
        if chunks.len() == 0 {
            return;
        }
        let mut unread = self.unread.lock().unwrap_or_else(|e| e.into_inner());
        for (blob, index, size) in chunks {
            if unread.len() >= MAX_UNREAD {
                break;
            }
            unread.insert((blob, index), size);
            let (word, bit) = filter_bit(blob, index);
            self.filter[word].fetch_or(bit, Ordering::Relaxed);
        }
        self.unread_count.store(unread.len(), Ordering::Relaxed);
    }

    /// A read found chunk `index` of blob `blob` in the cache: if a guess brought it, the guess was right
    /// and its bytes count as needed (once).
    pub fn hit(&self, blob: u32, index: u32) {
        if let Some(size) = self.take_unread(blob, index) {
            self.credited.fetch_add(size as u64, Ordering::Relaxed);
        }
    }

    /// A read is fetching chunk `index` of blob `blob` itself: a guess of it brought nothing (its request
    /// failed), so a later hit of it is no right guess.
    pub fn forget(&self, blob: u32, index: u32) {
        self.take_unread(blob, index);
    }

    fn take_unread(&self, blob: u32, index: u32) -> Option<u32> {
        let (word, bit) = filter_bit(blob, index);
        if self.unread_count.load(Ordering::Relaxed) == 0
            || self.filter[word].load(Ordering::Relaxed) & bit == 0
        {
            return None;
        }
        let mut unread = self.unread.lock().unwrap_or_else(|e| e.into_inner());
        let size = unread.remove(&(blob, index))?;
        self.unread_count.store(unread.len(), Ordering::Relaxed);
        Some(size)
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
        self.grant(MAX_AHEAD)
    }

    /// Up to `max` speculative bytes out of what the share leaves, counted as spent: the caller
    /// [`Speculation::refund`]s what it does not use.
    pub fn grant(&self, max: u64) -> u64 {
        let credited = self.credited.load(Ordering::Acquire);
        let cap = (self.needed.load(Ordering::Relaxed) + credited) / SHARE_DIVISOR;
        let mut granted = 0;
        let _ = self
            .speculative
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |spent| {
                let unused = spent.saturating_sub(credited);
                granted = cap.saturating_sub(unused).min(max);
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

    /// (bytes misses needed, bytes fetched on speculation, whether reads used them or not)
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

    #[test]
    fn a_guess_that_is_read_counts_as_needed_once_and_frees_its_share() {
        let s = Speculation::new(1);
        s.miss(0, 0, 4000);
        assert_eq!(s.grant(u64::MAX), 1000, "a quarter of 4000");
        s.guessed([(0, 1, 600), (0, 2, 400)].into_iter());
        s.hit(0, 1);
        s.hit(0, 1);
        s.hit(0, 7);
        assert_eq!(
            s.credited.load(Ordering::Relaxed),
            600,
            "read once; unguessed hits not at all"
        );
        assert_eq!(
            s.grant(u64::MAX),
            750,
            "a quarter of 4600 read, less the 400 guessed and unread"
        );
        s.hit(0, 2);
        assert_eq!(s.unread_count.load(Ordering::Relaxed), 0);
        // A guess whose request failed: the reader fetches the chunk itself, and a later hit is no credit.
        s.guessed([(0, 3, 1000)].into_iter());
        s.forget(0, 3);
        s.hit(0, 3);
        assert_eq!(
            s.credited.load(Ordering::Relaxed),
            1000,
            "only chunks 1 and 2"
        );
        assert_eq!(
            s.grant(u64::MAX),
            500,
            "a quarter of 5000, less the 750 unread"
        );
        // Bounded, whatever is guessed.
        s.guessed((0..2 * MAX_UNREAD as u32).map(|i| (0, i, 1)));
        assert_eq!(s.unread.lock().unwrap().len(), MAX_UNREAD);
    }
}
