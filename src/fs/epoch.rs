//! Mount epochs: which mount of an index a kernel inode number was given by.
//!
//! The `Vfs` puts a mount's index (one byte, handed out in turn) above the filesystem's own inode
//! number. 255 mounts after an unmount the index names another image, and every number the kernel still
//! holds of the old one (an open file, a cached path: entries are cached for 2^32 s) would name the new
//! image's file of the same number. So a RAFS filesystem gives the kernel its numbers with the mount's
//! epoch above them (bits 40 to 55), and answers a number of another epoch with ESTALE. A remount keeps
//! its epoch as it keeps its index (nydusd's update in place); epoch 0 stands for none, what a daemon
//! before epochs handed over.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// Where the epoch starts in an inode number as the `Vfs` sees it (it keeps bits 56 to 63).
const SHIFT: u32 = 40;
/// The largest inode number of an image that can be given with an epoch.
pub const MAX_INO: u64 = (1 << SHIFT) - 1;

/// How many epochs there are before they repeat: a prime, so that with mount indexes handed out in turn
/// (a cycle of 255) an index meets every epoch before one comes back, 255 x 65,521 mounts later. (With
/// 65,535 = 255 x 257 epochs an index would see only 257 of them.)
const PERIOD: u32 = 65_521;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Epoch(u16);

impl Epoch {
    /// No epoch: numbers go out as the image has them.
    pub const NONE: Epoch = Epoch(0);

    /// The epoch a handed-over state recorded.
    pub fn saved(value: u16) -> Self {
        Epoch(value)
    }

    pub fn value(self) -> u16 {
        self.0
    }

    /// A new mount's epoch: the next of a counter that starts at a random place in each process, so that
    /// a successor daemon is unlikely to repeat the epochs its predecessor gave (1 in 65,521 for a
    /// mount at the index of an unmounted one). 0 is skipped.
    pub fn next() -> Self {
        static COUNTER: OnceLock<AtomicU32> = OnceLock::new();
        let counter = COUNTER.get_or_init(|| AtomicU32::new(random_start()));
        Epoch::nth(counter.fetch_add(1, Ordering::Relaxed))
    }

    /// The epoch of the `n`th mount.
    fn nth(n: u32) -> Self {
        Epoch((n % PERIOD) as u16 + 1)
    }

    /// The number the kernel is given for the image's inode `ino` (at most [`MAX_INO`]).
    pub fn outer(self, ino: u64) -> u64 {
        debug_assert!(ino <= MAX_INO, "inode {ino} has no room for an epoch");
        ino | u64::from(self.0) << SHIFT
    }

    /// The image's inode behind the kernel's `number`; ESTALE when it was given by another mount.
    pub fn inner(self, number: u64) -> io::Result<u64> {
        if number >> SHIFT == u64::from(self.0) {
            Ok(number & MAX_INO)
        } else {
            Err(io::Error::from_raw_os_error(libc::ESTALE))
        }
    }
}

fn random_start() -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: getrandom writes at most the length given into the buffer.
    let got =
        unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), libc::GRND_NONBLOCK) };
    if got == bytes.len() as isize {
        return u32::from_ne_bytes(bytes);
    }
    // No entropy yet (early boot): the clock will do, epochs need to differ, not to be secret.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ std::process::id())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_of_another_epoch_are_stale() {
        let (a, b) = (Epoch::saved(7), Epoch::saved(8));
        let n = a.outer(12345);
        assert_eq!(a.inner(n).unwrap(), 12345);
        assert_eq!(b.inner(n).unwrap_err().raw_os_error(), Some(libc::ESTALE));
        assert_eq!(Epoch::NONE.outer(5), 5);
        assert_eq!(Epoch::NONE.inner(5).unwrap(), 5);
        assert!(Epoch::NONE.inner(a.outer(5)).is_err());
        // The largest epoch stays below the Vfs's index byte.
        assert!(Epoch::saved(u16::MAX).outer(MAX_INO) < 1 << 56);
    }

    #[test]
    fn new_epochs_are_never_none_and_differ_in_turn() {
        let first = Epoch::next();
        let second = Epoch::next();
        assert_ne!(first, Epoch::NONE);
        assert_ne!(second, Epoch::NONE);
        assert_ne!(first, second);
    }

    /// Mount indexes come round every 255 mounts: the mounts that meet at one index get distinct
    /// epochs for 255 x PERIOD mounts.
    #[test]
    fn an_index_meets_every_epoch_before_one_comes_back() {
        let mut seen = std::collections::HashSet::new();
        for k in 0..PERIOD {
            assert!(
                seen.insert(Epoch::nth(k * 255).value()),
                "repeated after {k}"
            );
        }
        assert_eq!(Epoch::nth(PERIOD * 255), Epoch::nth(0));
    }
}
