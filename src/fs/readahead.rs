//! Read-ahead in the blob cache's data file for files read front to back.
//!
//! A warm read is served from the cache file, one synchronous `pread` per FUSE request. The kernel's
//! readahead of the FUSE file keeps only a few such requests in flight, and its readahead of the cache
//! file, shared by workers that read it out of order, keeps fewer: the disk idles between requests where
//! a native reader's readahead keeps it busy. So for a reader that goes front to back, the daemon asks
//! the kernel to read ahead the cache file bytes that follow the reply (`readahead(2)`, from a thread of
//! its own so that no reply waits for it), and the next requests find them in the page cache.
//!
//! Bounds: a read-ahead only follows a request that continues an earlier one exactly (random readers,
//! which never do, get none) and is at least [`MIN_REQUEST`] long; its distance starts at twice the
//! request and doubles with each further request up to [`WINDOW`] past the furthest byte read, within the
//! file; [`STREAMS`] files per mount are followed; the daemon has one read-ahead thread and a queue of
//! [`QUEUE`] jobs, and a job that does not fit is dropped. Read-ahead only loads the page cache: what a
//! reply carries is still decided chunk by chunk by the cache's ready map.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};

/// How far past the furthest byte read a stream reads ahead, at most (a native reader's window on the
/// cache disk here is 8 MiB).
pub const WINDOW: u64 = 8 << 20;
/// Shorter requests never start a read-ahead: the kernel's own readahead of a sequential reader asks for
/// 128 KiB and more, a random reader for a page or a few.
pub const MIN_REQUEST: u64 = 64 << 10;
/// Files followed at a time per mount (the least recently read one makes room).
pub const STREAMS: usize = 16;
/// Read-ahead jobs waiting for the daemon's read-ahead thread.
pub const QUEUE: usize = 32;
/// Requests remembered per stream: the kernel's readahead requests reach the workers out of order, so a
/// request may continue any of the last few.
const RECENT: usize = 8;

/// The sequential streams of one mount.
#[derive(Default)]
pub struct ReadAhead {
    streams: Mutex<Vec<Stream>>,
}

struct Stream {
    ino: u64,
    /// The last requests, `[start, end)` in file offsets.
    recent: [(u64, u64); RECENT],
    next_slot: usize,
    /// Where the stream started, the furthest byte read and the end of what was read ahead (file
    /// offsets).
    start: u64,
    furthest: u64,
    ahead: u64,
    /// How far past `furthest` to read ahead now: doubles with each request that continues the stream.
    distance: u64,
    /// For picking the least recently used stream.
    used: u64,
}

impl Stream {
    fn new(ino: u64, start: u64, end: u64, used: u64) -> Self {
        let mut recent = [(u64::MAX, u64::MAX); RECENT];
        recent[0] = (start, end);
        Stream {
            ino,
            recent,
            next_slot: 1,
            start,
            furthest: end,
            ahead: end,
            distance: 0,
            used,
        }
    }

    /// Does `[start, end)` adjoin one of the last requests (either side: they arrive out of order)?
    fn continues(&self, start: u64, end: u64) -> bool {
        self.recent.iter().any(|&(s, e)| e == start || s == end)
    }
}

impl ReadAhead {
    /// A request `[start, end)` of file `ino` (`size` bytes) was served; returns the file range to read
    /// ahead, if any. Recorded whatever the answer.
    pub fn plan(&self, ino: u64, size: u64, start: u64, end: u64) -> Option<(u64, u64)> {
        if end <= start || end - start < MIN_REQUEST {
            return None;
        }
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let tick = streams.iter().map(|s| s.used).max().unwrap_or(0) + 1;
        let Some(s) = streams.iter_mut().find(|s| s.ino == ino) else {
            let fresh = Stream::new(ino, start, end, tick);
            if streams.len() < STREAMS {
                streams.push(fresh);
            } else if let Some(lru) = streams.iter_mut().min_by_key(|s| s.used) {
                *lru = fresh;
            }
            // A reader that starts at the front is taken to go on; any other waits for its next request.
            let s = streams.iter_mut().find(|s| s.ino == ino)?;
            return if start == 0 { s.advance(size) } else { None };
        };
        s.used = tick;
        let continues = s.continues(start, end);
        if !continues && (start < s.start || end > s.ahead.max(s.furthest)) {
            *s = Stream::new(ino, start, end, tick);
            return None;
        }
        s.recent[s.next_slot] = (start, end);
        s.next_slot = (s.next_slot + 1) % RECENT;
        s.furthest = s.furthest.max(end);
        if !continues {
            // Inside what the stream covers, its neighbours not seen yet (requests arrive out of
            // order): part of the stream, but it proves nothing more.
            return None;
        }
        s.distance = match s.distance {
            0 => 2 * (end - start),
            d => 2 * d,
        };
        s.advance(size)
    }
}

impl Stream {
    /// The range between what was read ahead and `distance` past the furthest byte read.
    fn advance(&mut self, size: u64) -> Option<(u64, u64)> {
        if self.distance == 0 {
            self.distance = 2 * (self.recent[0].1 - self.recent[0].0);
        }
        self.distance = self.distance.min(WINDOW);
        let from = self.ahead.max(self.furthest);
        let to = self.furthest.saturating_add(self.distance).min(size);
        if from >= to {
            return None;
        }
        self.ahead = to;
        Some((from, to))
    }
}

struct Job {
    file: File,
    offset: u64,
    len: u64,
}

/// Hand `len` bytes of `file` at `offset` to the daemon's read-ahead thread; false when the queue is full
/// (or the thread cannot start), in which case nothing is read ahead.
pub fn submit(file: &File, offset: u64, len: u64) -> bool {
    static THREAD: OnceLock<Option<SyncSender<Job>>> = OnceLock::new();
    let queue = THREAD.get_or_init(|| {
        let (tx, rx) = sync_channel::<Job>(QUEUE);
        std::thread::Builder::new()
            .name("cache-readahead".into())
            .spawn(move || {
                for job in rx {
                    // SAFETY: a plain syscall on a descriptor the job owns. Failure only means no read-ahead.
                    unsafe {
                        libc::readahead(job.file.as_raw_fd(), job.offset as i64, job.len as usize);
                    }
                }
            })
            .map_err(|e| log::warn!("no cache read-ahead thread: {e}"))
            .ok()
            .map(|_| tx)
    });
    let Some(tx) = queue else {
        return false;
    };
    // The job keeps its own descriptor: the cache file stays open until the job ran.
    let Ok(file) = file.try_clone() else {
        return false;
    };
    match tx.try_send(Job { file, offset, len }) {
        Ok(()) => true,
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
    }
}
