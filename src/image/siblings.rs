//! Which directories are being read file after file. A program starting up opens many small files of a
//! few directories (a language's library and its byte-code caches), one after another, each a miss and a
//! round trip of its own, while the link sits idle. Builders lay a directory's files out back to back in
//! the blob (breadth first), so once several files of one directory have missed, the chunks of its other
//! files that follow the next miss come in the same ranged request (`predict.rs`), paid for out of the
//! speculation budget (`speculate.rs`) like any guess.
//!
//! Only small files count and are fetched this way (see [`SMALL_FILE_BYTES`]). Files are tied to their directory by the lookups and READDIRPLUS entries that named them (the v6
//! format records no parents). Everything here is bounded: a fixed table of child → parent pairs, a few
//! directories counted at once, and a cap on the entries and chunks indexed per directory.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

/// Distinct files of one directory that must miss before its other files come with the next miss.
pub const ARM_AFTER_FILES: usize = 3;
/// Only files up to this size count and are fetched: a round trip per file matters for small files; a
/// directory of large ones (shared libraries) is read in a few requests anyway, and rarely whole.
pub const SMALL_FILE_BYTES: u64 = 256 << 10;
/// Child → parent pairs remembered, direct-mapped by child: an overwritten pair only loses a guess.
const PARENT_SLOTS: usize = 4096;
/// Directories whose misses are counted at once; the one missed least recently is forgotten.
const TRACKED_DIRS: usize = 16;
/// Entries of one directory looked at when indexing it.
pub const MAX_DIR_ENTRIES: usize = 2048;
/// Chunk lookups for one directory at most, repeats included (a directory needing more predicts nothing).
pub const MAX_DIR_CHUNKS: usize = 4096;

/// The chunks (blob index, chunk index) of a directory's regular files.
pub type DirChunks = Arc<HashSet<(u32, u32)>>;

/// What a miss in a file says about its directory.
pub enum Verdict {
    /// Its directory is unknown.
    Unknown,
    /// Too few of its directory's files missed yet.
    NotYet,
    /// Enough of its files missed: index `dir` and [`Siblings::indexed`] the result.
    Index(u64),
    /// Its files' chunks, indexed before.
    Chunks(DirChunks),
}

/// What a miss's directory predicts, for `predict.rs`.
pub enum DirGuess {
    /// Nothing known: a blind guess (near the previous miss) may be tried.
    Unknown,
    /// The directory is known and predicts nothing yet: no blind guess either, the budget is kept for it.
    NotYet,
    /// The chunks of the directory's small files.
    Chunks(DirChunks),
}

struct Tracked {
    dir: u64,
    /// Distinct files that missed, up to [`ARM_AFTER_FILES`].
    missed: Vec<u64>,
    chunks: Option<DirChunks>,
}

pub struct Siblings {
    /// Slot `child % PARENT_SLOTS`: (child, parent); child 0 marks an empty slot (no inode is 0).
    parents: Mutex<Vec<(u64, u64)>>,
    /// Most recently missed first.
    dirs: Mutex<VecDeque<Tracked>>,
}

impl Default for Siblings {
    fn default() -> Self {
        Siblings {
            parents: Mutex::new(vec![(0, 0); PARENT_SLOTS]),
            dirs: Mutex::new(VecDeque::with_capacity(TRACKED_DIRS + 1)),
        }
    }
}

impl Siblings {
    /// Regular file `child` was named in directory `parent` (a LOOKUP or a READDIRPLUS entry).
    pub fn note_parent(&self, child: u64, parent: u64) {
        let mut parents = self.parents.lock().unwrap_or_else(|e| e.into_inner());
        parents[(child % PARENT_SLOTS as u64) as usize] = (child, parent);
    }

    /// A read of regular file `ino` (of at most [`SMALL_FILE_BYTES`]) missed the cache.
    pub fn missed(&self, ino: u64) -> Verdict {
        let parent = {
            let parents = self.parents.lock().unwrap_or_else(|e| e.into_inner());
            match parents[(ino % PARENT_SLOTS as u64) as usize] {
                (child, parent) if child == ino && ino != 0 => parent,
                _ => return Verdict::Unknown,
            }
        };
        let mut dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        let mut tracked = match dirs.iter().position(|t| t.dir == parent) {
            Some(i) => dirs.remove(i).expect("index from position"),
            None => Tracked {
                dir: parent,
                missed: Vec::with_capacity(ARM_AFTER_FILES),
                chunks: None,
            },
        };
        if tracked.missed.len() < ARM_AFTER_FILES && !tracked.missed.contains(&ino) {
            tracked.missed.push(ino);
        }
        let verdict = match (&tracked.chunks, tracked.missed.len() >= ARM_AFTER_FILES) {
            (Some(chunks), _) => Verdict::Chunks(chunks.clone()),
            (None, true) => {
                // Indexed once: misses on other threads meanwhile see no chunks (and make no blind guess).
                tracked.chunks = Some(DirChunks::default());
                Verdict::Index(parent)
            }
            (None, false) => Verdict::NotYet,
        };
        dirs.push_front(tracked);
        dirs.truncate(TRACKED_DIRS);
        verdict
    }

    /// `dir`'s chunks, indexed after [`Verdict::Index`] (an empty set when it had too many): later misses
    /// in it get them without indexing again, for as long as it stays tracked.
    pub fn indexed(&self, dir: u64, chunks: DirChunks) {
        let mut dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = dirs.iter_mut().find(|t| t.dir == dir) {
            t.chunks = Some(chunks);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_index(v: Verdict, dir: u64) -> bool {
        matches!(v, Verdict::Index(d) if d == dir)
    }

    #[test]
    fn a_directory_is_indexed_once_enough_of_its_files_missed() {
        let s = Siblings::default();
        assert!(matches!(s.missed(10), Verdict::Unknown));
        for f in [10, 11, 12, 20] {
            s.note_parent(f, if f < 20 { 5 } else { 6 });
        }
        assert!(matches!(s.missed(10), Verdict::NotYet));
        assert!(
            matches!(s.missed(10), Verdict::NotYet),
            "the same file twice counts once"
        );
        assert!(matches!(s.missed(20), Verdict::NotYet), "another directory");
        assert!(matches!(s.missed(11), Verdict::NotYet));
        assert!(is_index(s.missed(12), 5));
        assert!(
            matches!(s.missed(11), Verdict::Chunks(c) if c.is_empty()),
            "being indexed: indexed once"
        );
        s.indexed(5, Arc::new(HashSet::from([(0, 7)])));
        assert!(matches!(s.missed(10), Verdict::Chunks(c) if c.contains(&(0, 7))));
    }

    #[test]
    fn memory_stays_bounded_whatever_is_looked_up_and_missed() {
        let s = Siblings::default();
        for i in 1..100_000u64 {
            s.note_parent(i, i / 3);
            s.missed(i);
        }
        assert_eq!(s.parents.lock().unwrap().len(), PARENT_SLOTS);
        assert!(s.dirs.lock().unwrap().len() <= TRACKED_DIRS);
        // An overwritten pair names no parent rather than a wrong one.
        s.note_parent(1 + PARENT_SLOTS as u64, 9);
        assert!(matches!(s.missed(1), Verdict::Unknown));
    }
}
