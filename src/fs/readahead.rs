//! Read-ahead in the blob cache's data file for files read front to back.
//!
//! A cached read is one synchronous `pread` of the cache file per request. The kernel's readahead of that
//! file, shared by workers that read it out of order, follows the requests poorly: with 128 KiB requests
//! warm sequential reads ran at 0.37× native with the daemon spending 370 ms of CPU per 158 MiB. The
//! daemon sees the requests of each file, so when one is read front to back it asks for the cache file
//! bytes that follow a reply (`readahead(2)`, from one thread of its own so that no reply waits for it),
//! and the next requests find them in the page cache: 0.51× and 150 ms in the same run. With the 1 MiB
//! requests of a FUSE mount whose readahead the daemon raised, the kernel keeps enough requests in flight
//! that this adds little. (Turning the kernel's readahead of the cache file off instead,
//! `POSIX_FADV_RANDOM`, cost 8 readers of one image on 20 mounts a fifth of their throughput.)
//!
//! Bounds: a read-ahead only follows a request of at least [`MIN_REQUEST`] bytes that continues one of
//! the last few of its file exactly, or starts it (random readers get none); it reaches at most a
//! distance past the last requests that starts at twice the request and doubles with each request that
//! continues the stream, up to [`WINDOW`], within the file, and no byte is read ahead twice while the
//! stream lasts (a jump far from the last requests starts a new one); [`STREAMS`] files per mount are
//! followed; the daemon has one read-ahead thread and a queue of [`QUEUE`] jobs, and a job that does not
//! fit is dropped. Read-ahead only loads the page cache: what a reply carries is still decided chunk by
//! chunk by the cache's ready map.

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
    /// The last requests, `[start, end)` in file offsets (empty slots are `(u64::MAX, u64::MAX)`).
    recent: [(u64, u64); RECENT],
    next_slot: usize,
    /// The end of what was read ahead (a file offset): nothing before it is read ahead again.
    ahead: u64,
    /// How far past the last requests to read ahead now: doubles with each request that continues the
    /// stream, up to [`WINDOW`].
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
            ahead: end,
            distance: 0,
            used,
        }
    }

    fn record(&mut self, start: u64, end: u64) {
        self.recent[self.next_slot] = (start, end);
        self.next_slot = (self.next_slot + 1) % RECENT;
    }

    fn requests(&self) -> impl Iterator<Item = &(u64, u64)> {
        self.recent.iter().filter(|r| r.0 != u64::MAX)
    }

    /// Does `[start, end)` adjoin one of the last requests (either side: they arrive out of order)?
    fn continues(&self, start: u64, end: u64) -> bool {
        self.requests().any(|&(s, e)| e == start || s == end)
    }

    /// Is `[start, end)` within a window of the last requests (part of the same batch of the kernel's
    /// readahead, its neighbours not seen yet)?
    fn near(&self, start: u64, end: u64) -> bool {
        self.requests()
            .any(|&(s, e)| start <= e.saturating_add(WINDOW) && end.saturating_add(WINDOW) >= s)
    }

    /// The range from what was read ahead to `distance` past the last requests, within the file.
    fn advance(&mut self, size: u64) -> Option<(u64, u64)> {
        let front = self.requests().map(|r| r.1).max().unwrap_or(0);
        let from = self.ahead.max(front);
        let to = front.saturating_add(self.distance).min(size);
        if from >= to {
            return None;
        }
        self.ahead = to;
        Some((from, to))
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
        let s = match streams.iter().position(|s| s.ino == ino) {
            Some(i) => &mut streams[i],
            None => {
                let fresh = Stream::new(ino, start, end, tick);
                let i = if streams.len() < STREAMS {
                    streams.push(fresh);
                    streams.len() - 1
                } else {
                    let i = (0..streams.len()).min_by_key(|&i| streams[i].used)?;
                    streams[i] = fresh;
                    i
                };
                // A reader that starts at the front is taken to go on; any other waits for its next
                // request.
                let s = &mut streams[i];
                if start != 0 {
                    return None;
                }
                s.distance = (2 * (end - start)).min(WINDOW);
                return s.advance(size);
            }
        };
        s.used = tick;
        let continues = s.continues(start, end);
        if !continues && !s.near(start, end) {
            // A jump: a new stream from here.
            *s = Stream::new(ino, start, end, tick);
            return None;
        }
        s.record(start, end);
        if !continues {
            return None;
        }
        s.distance = match s.distance {
            0 => 2 * (end - start),
            d => 2 * d,
        }
        .min(WINDOW);
        s.advance(size)
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Total read-ahead planned for `requests` of one file of `size` bytes, checking on the way that no
    /// plan reaches past the file or more than WINDOW past the furthest byte requested so far.
    fn run(ra: &ReadAhead, ino: u64, size: u64, requests: &[(u64, u64)]) -> u64 {
        let mut furthest = 0;
        let mut planned = 0;
        for &(start, end) in requests {
            furthest = furthest.max(end);
            if let Some((from, to)) = ra.plan(ino, size, start, end) {
                assert!(
                    from < to && to <= size,
                    "{from}..{to} past the file ({size})"
                );
                assert!(
                    to <= furthest + WINDOW,
                    "{to} is more than WINDOW past {furthest}"
                );
                planned += to - from;
            }
        }
        planned
    }

    #[test]
    fn a_file_read_front_to_back_is_read_ahead_up_to_the_window() {
        let ra = ReadAhead::default();
        let size = 64 * MIB;
        let mut ahead = 0;
        for i in 0..64 {
            if let Some((from, to)) = ra.plan(1, size, i * MIB, (i + 1) * MIB) {
                assert!(from >= ahead, "read ahead twice: {from} < {ahead}");
                ahead = to;
            }
        }
        // The whole file beyond the first request, in ranges that never overlap.
        assert_eq!(ahead, size);
        // The first request already reads ahead twice its size.
        let ra = ReadAhead::default();
        assert_eq!(ra.plan(2, size, 0, MIB), Some((MIB, 3 * MIB)));
        // ... and the distance doubles up to the window.
        assert_eq!(ra.plan(2, size, MIB, 2 * MIB), Some((3 * MIB, 6 * MIB)));
        assert_eq!(
            ra.plan(2, size, 2 * MIB, 3 * MIB),
            Some((6 * MIB, 11 * MIB))
        );
        assert_eq!(
            ra.plan(2, size, 3 * MIB, 4 * MIB),
            Some((11 * MIB, 12 * MIB))
        );
    }

    #[test]
    fn requests_that_arrive_out_of_order_keep_the_stream() {
        let ra = ReadAhead::default();
        let size = 64 * MIB;
        // The kernel sends a window of four requests at a time; workers pick them up in another order.
        let mut planned = Vec::new();
        for batch in (0..64).step_by(4) {
            for i in [batch + 3, batch + 1, batch, batch + 2] {
                if let Some(range) = ra.plan(1, size, i * MIB, (i + 1) * MIB) {
                    planned.push(range);
                }
            }
        }
        // Nothing is read ahead twice (the stream was never lost and started over) ...
        planned.sort();
        for pair in planned.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "read ahead twice: {pair:?}");
        }
        // ... and all but the first window of the file is.
        let covered: u64 = planned.iter().map(|(from, to)| to - from).sum();
        assert!(covered >= size - 4 * MIB, "only {covered} bytes read ahead");
    }

    #[test]
    fn random_readers_get_no_read_ahead() {
        let ra = ReadAhead::default();
        let size = 256 * MIB;
        let mut x: u64 = 7;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Large requests at random places (never continuing one another) and small ones anywhere,
        // including back to back from the front of the file.
        let large: Vec<(u64, u64)> = (0..1000)
            .map(|_| {
                let start = (next() % ((size - MIB) / 4096) + 1) * 4096;
                (start, start + MIB)
            })
            .collect();
        assert_eq!(run(&ra, 1, size, &large), 0);
        let small: Vec<(u64, u64)> = (0..1000).map(|i| (i * 4096, (i + 1) * 4096)).collect();
        assert_eq!(run(&ra, 2, size, &small), 0);
    }

    #[test]
    fn a_stream_never_reads_ahead_more_than_the_window_past_its_reads() {
        let ra = ReadAhead::default();
        // Requests that keep continuing one another, but back and forth: what is read ahead stays
        // within WINDOW of the furthest request, however many requests come.
        let size = 1 << 40;
        let mut requests = vec![(0, MIB)];
        for _ in 0..1000 {
            requests.push((MIB, 2 * MIB));
            requests.push((0, MIB));
        }
        assert!(run(&ra, 1, size, &requests) <= 2 * MIB + WINDOW);
    }

    #[test]
    fn the_streams_of_a_mount_are_bounded() {
        let ra = ReadAhead::default();
        for ino in 0..10 * STREAMS as u64 {
            assert!(ra.plan(ino, 64 * MIB, 0, MIB).is_some());
        }
        assert_eq!(ra.streams.lock().unwrap().len(), STREAMS);
        // The most recent streams are the ones kept.
        let last = 10 * STREAMS as u64 - 1;
        assert!(ra.plan(last, 64 * MIB, MIB, 2 * MIB).is_some());
        assert!(ra.plan(0, 64 * MIB, MIB, 2 * MIB).is_none());
    }
}
