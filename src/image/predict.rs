//! Which chunks to fetch with a miss, in the same backend request: the rest of a file read front to back,
//! the chunks of the image's prefetch table, or (within the `speculate` budget) the chunks of the miss's
//! directory once several of its files missed (`siblings`), or else the chunks after a miss that lands
//! near the previous one. Each predicted chunk is claimed so nobody fetches it twice; none of the prefetch
//! head's while it is planned or fetched (`cache::prefetch`).

use std::cell::Cell;
use std::collections::HashSet;
use std::sync::Arc;

use super::siblings::{self, DirGuess, Verdict};
use super::stream::Pending;
use super::{PrefetchHead, RafsImage};
use crate::cache::BlobCache;
use crate::format::{ChunkInfo, InodeAttr};

/// Most chunk lookups [`RafsImage`] makes to index its prefetch table (so at most as many chunks, 16 bytes
/// each in a set).
const MAX_PREFETCH_CHUNKS: usize = 1 << 20;

/// A predicted run's uncompressed bytes, in windows (the window counts stored bytes; the run's own,
/// when speculation granted less): room for text that compresses 10:1 and for a 16 MiB chunk in the
/// least window, while chunks that claim to be stored in next to nothing cannot make a run of a whole
/// blob.
const MAX_RUN_EXPANSION: u64 = 16;

impl RafsImage {
    /// The chunks to fetch with `first` (located): those of `follow` that lie back to back after it in its
    /// blob, or else, when `first` belongs to a file of the prefetch table, the chunks after it in the blob
    /// that do too, up to the link's window; or else, when `first` is one of `dir`'s chunks (its file's
    /// directory, being read file after file), the chunks after it that are too, and else, when `first`
    /// lies near the blob's previous miss, the chunks after it, both up to what
    /// [`speculate::Speculation`] grants. Each is claimed. Empty when nothing is predicted, and for a
    /// chunk of the prefetch head while it is planned or fetched; no run reaches into the head.
    pub(super) fn predicted_run(
        &self,
        cache: &Arc<BlobCache>,
        first: &ChunkInfo,
        follow: &[ChunkInfo],
        dir: &DirGuess,
    ) -> Vec<Pending> {
        let first_end = first.compressed_offset + first.compressed_size as u64;
        // Counted for every miss (the share of speculation follows them), granted only when nothing
        // else predicts the run.
        let granted = self.speculation.miss(
            first.blob_index,
            first.compressed_offset,
            first.compressed_size as u64,
        );
        // The prefetch head brings the chunks after this one in one request, in the order the program
        // reads them; a run here would share the link with it.
        let head = self.prefetch_head();
        if self.left_to_prefetch_head(head, first) {
            self.speculation.refund(granted);
            return Vec::new();
        }
        let mut window = self.streams.window_bytes();
        let mut run = Vec::new();
        let mut end = first_end;
        let uncompressed = Cell::new(first.uncompressed_size as u64);
        let take = |next: ChunkInfo, run: &mut Vec<Pending>, end: &mut u64, window: u64| -> bool {
            if next.blob_index != first.blob_index
                || next.batch.is_some()
                || next.compressed_offset != *end
                || *end + next.compressed_size as u64 - first.compressed_offset > window
                || uncompressed.get() + next.uncompressed_size as u64 > MAX_RUN_EXPANSION * window
                || self.left_to_prefetch_head(head, &next)
            {
                return false;
            }
            let Some(claim) = cache.try_claim(&next) else {
                return false;
            };
            *end += next.compressed_size as u64;
            uncompressed.set(uncompressed.get() + next.uncompressed_size as u64);
            run.push(Pending { info: next, claim });
            true
        };
        if !follow.is_empty() {
            self.speculation.refund(granted);
            for f in follow {
                let Ok(next) = self.locate(f) else { break };
                if !take(next, &mut run, &mut end, window) {
                    break;
                }
            }
            return run;
        }
        let key = (first.blob_index, first.index);
        let table = self.prefetch_chunks().filter(|p| p.contains(&key));
        let mut granted = granted;
        let mut dir_chunks = None;
        if table.is_some() {
            self.speculation.refund(granted);
        } else {
            match dir {
                DirGuess::Unknown => {}
                // The directory's files instead of a blind guess, as far as the window and budget go.
                DirGuess::Chunks(d) if d.contains(&key) => {
                    self.speculation.refund(granted);
                    let room = window.saturating_sub(first_end - first.compressed_offset);
                    granted = self.speculation.grant(room);
                    dir_chunks = Some(&**d);
                }
                _ => {
                    self.speculation.refund(granted);
                    granted = 0;
                }
            }
            // Near the previous miss, or in the directory: the chunks right after it, within the grant.
            window = first_end - first.compressed_offset + granted;
        }
        let within = table.or(dir_chunks);
        if self.info().version == 6 && window > first_end - first.compressed_offset {
            if let Ok(array) = self.chunk_info_array(first.blob_index) {
                for index in first.index + 1..array.len() {
                    if within.is_some_and(|p| !p.contains(&(first.blob_index, index))) {
                        break;
                    }
                    let Ok(next) = self.resolve_ci(first.blob_index, index) else {
                        break;
                    };
                    // A chunk without a digest cannot be validated (a chunk no file references).
                    if (self.validate && next.digest.is_none())
                        || !take(next, &mut run, &mut end, window)
                    {
                        break;
                    }
                }
            }
        }
        if table.is_none() {
            self.speculation.refund(granted - (end - first_end));
            let guessed = run
                .iter()
                .map(|p| (p.info.blob_index, p.info.index, p.info.compressed_size));
            self.speculation.guessed(guessed);
        }
        run
    }

    /// The chunks of `inode` after the one at `file_offset`, when the file is being read front to back:
    /// the chunks before it are cached or being fetched. As many follow as came before (so the runs double
    /// as the reader keeps going), within the link's window; none for a first or random read.
    pub(super) fn sequential_followers(
        &self,
        cache: &BlobCache,
        inode: &InodeAttr,
        file_offset: u64,
    ) -> Vec<ChunkInfo> {
        let chunk = self.info().chunk_size as u64;
        if chunk == 0 {
            return Vec::new();
        }
        let limit = (self.streams.window_bytes() / chunk).max(1);
        let mut behind = 0;
        while behind < limit && file_offset >= (behind + 1) * chunk {
            let at = file_offset - (behind + 1) * chunk;
            let seen = self
                .meta
                .file_chunks(inode, at, 1)
                .ok()
                .and_then(|c| c.into_iter().next())
                .and_then(|(o, addr)| self.file_chunk(inode, o, &addr).ok())
                .is_some_and(|c| cache.is_ready(&c) || cache.is_claimed(&c));
            if !seen {
                break;
            }
            behind += 1;
        }
        if behind == 0 {
            return Vec::new();
        }
        let from = file_offset + chunk;
        let to = from.saturating_add(behind * chunk).min(inode.size);
        if from >= to {
            return Vec::new();
        }
        let Ok(chunks) = self.meta.file_chunks(inode, from, to - from) else {
            return Vec::new();
        };
        chunks
            .into_iter()
            .map_while(|(o, addr)| self.file_chunk(inode, o, &addr).ok())
            .collect()
    }

    /// Whether `chunk` is `head`'s, planned or being fetched (see [`PrefetchHead`]).
    fn left_to_prefetch_head(&self, head: PrefetchHead, chunk: &ChunkInfo) -> bool {
        match head {
            PrefetchHead::None => false,
            PrefetchHead::PlanningTable => self
                .prefetch_chunks()
                .is_some_and(|p| p.contains(&(chunk.blob_index, chunk.index))),
            PrefetchHead::Range { blob, start, end } => {
                chunk.blob_index == blob
                    && chunk.compressed_offset < end
                    && chunk.compressed_offset + chunk.compressed_size as u64 > start
            }
        }
    }

    /// The chunks of the files in the image's prefetch table (a table naming the root predicts nothing:
    /// that is everything). `None` past [`MAX_PREFETCH_CHUNKS`] chunk lookups, repeats included: a file
    /// listed again is indexed once, but chunk records naming one chunk each cost a lookup, and this is
    /// built on the first cold read while every other cold read waits for it.
    fn prefetch_chunks(&self) -> Option<&HashSet<(u32, u32)>> {
        self.prefetch_chunks
            .get_or_init(|| {
                let table = &self.info().prefetch;
                if table.is_empty() || table.contains(&self.root_ino()) {
                    return None;
                }
                let mut files = table.clone();
                files.sort_unstable();
                files.dedup();
                let mut set = HashSet::new();
                let mut looked_up = 0;
                for ino in files {
                    let inode = self.meta.inode(ino).ok()?;
                    if !inode.is_reg() {
                        continue;
                    }
                    for (o, addr) in self.meta.file_chunks(&inode, 0, inode.size).ok()? {
                        looked_up += 1;
                        if looked_up > MAX_PREFETCH_CHUNKS {
                            return None;
                        }
                        let c = self.file_chunk(&inode, o, &addr).ok()?;
                        set.insert((c.blob_index, c.index));
                    }
                }
                Some(set)
            })
            .as_ref()
    }

    /// When reading regular file `inode` missed, what its directory predicts (see `siblings`): the chunks
    /// of its small files once enough of them have missed, indexed here the first time. v6 only (v5 runs
    /// are not walked by index).
    pub(super) fn dir_guess(&self, inode: &InodeAttr) -> DirGuess {
        if self.info().version != 6 || inode.size > siblings::SMALL_FILE_BYTES {
            return DirGuess::Unknown;
        }
        match self.siblings.missed(inode.ino) {
            Verdict::Unknown => DirGuess::Unknown,
            Verdict::NotYet => DirGuess::NotYet,
            Verdict::Chunks(c) => DirGuess::Chunks(c),
            Verdict::Index(dir) => {
                let chunks = Arc::new(self.dir_chunks(dir).unwrap_or_default());
                self.siblings.indexed(dir, chunks.clone());
                DirGuess::Chunks(chunks)
            }
        }
    }

    /// The chunks of `dir`'s small regular files (among its first [`siblings::MAX_DIR_ENTRIES`] entries);
    /// `None` past [`siblings::MAX_DIR_CHUNKS`] chunk lookups (repeats included: entries naming one file
    /// again, chunks shared) or on any error: a guess is never worth a failure.
    fn dir_chunks(&self, dir: u64) -> Option<HashSet<(u32, u32)>> {
        let mut files = Vec::new();
        let mut seen = 0;
        self.read_dir(dir, 0, &mut |e| {
            seen += 1;
            if e.file_type == libc::S_IFREG {
                files.push(e.ino);
            }
            Ok(seen < siblings::MAX_DIR_ENTRIES)
        })
        .ok()?;
        files.sort_unstable();
        files.dedup();
        let mut set = HashSet::new();
        let mut looked_up = 0;
        for ino in files {
            let inode = self.meta.inode(ino).ok()?;
            if inode.size > siblings::SMALL_FILE_BYTES {
                continue;
            }
            for (o, addr) in self.meta.file_chunks(&inode, 0, inode.size).ok()? {
                looked_up += 1;
                if looked_up > siblings::MAX_DIR_CHUNKS {
                    return None;
                }
                let c = self.file_chunk(&inode, o, &addr).ok()?;
                set.insert((c.blob_index, c.index));
            }
        }
        Some(set)
    }
}
