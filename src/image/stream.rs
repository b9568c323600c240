//! Several chunks in one backend request: when a read predicts the chunks after the one it misses (the rest
//! of a file read front to back, the image's prefetch table), they are asked for with the missing one in a
//! single ranged request whose body is used as it arrives. The reader gets its own chunk as soon as that is
//! in; a background thread stores the others in the blob cache one by one, releasing each to whoever waits
//! for it the moment it is stored. A long run is cut into parts, each a ranged request of its own on a
//! thread of its own, so several requests of a blob are in flight at once: the round trip and the server's
//! per-request time overlap, and receiving, checking and storing use more than one core. Memory is one
//! chunk per stream, whatever the request's length, and streams are capped per image, per blob and for the
//! whole daemon, as are the bytes they may hold. The daemon's streams and bytes are shared equally among
//! the images running streams, so one image (a hostile one reading all the time) cannot leave the others
//! without.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::verify::{check_raw_size, decode_chunk_into, verify_chunk};
use crate::cache::{BlobCache, Claim};
use crate::error::{Error, Result};
use crate::format::{BlobInfo, ChunkInfo};

/// Background streams one image runs at most; a read that would start another fetches its chunk alone.
pub const MAX_STREAMS: usize = 8;
/// Background streams of one blob at most: the ranged requests one image keeps in flight for a blob
/// (besides the readers' own; images sharing the blob count apart, the daemon's cap binds them all).
pub const MAX_BLOB_STREAMS: usize = 4;
/// Background streams of the whole daemon at most, all images together.
pub const MAX_DAEMON_STREAMS: usize = 32;
/// Chunk bytes the daemon's background streams may hold at once: each holds one chunk's stored and
/// decoded bytes, so a stream reserves twice the largest chunk its image may have.
pub const MAX_DAEMON_STREAM_BYTES: u64 = 256 << 20;
/// A predicted run is split into parts fetched in parallel (one ranged request each) when each part
/// gets at least this many compressed bytes: below that the round trip costs more than it saves.
pub const MIN_PART_BYTES: u64 = 1 << 20;

/// A chunk of a run, claimed (nobody else fetches it) until it is stored.
pub struct Pending {
    pub info: ChunkInfo,
    pub claim: Claim,
}

/// What checking and storing a blob's chunks needs, owned so that a background thread can hold it.
#[derive(Clone)]
pub struct StreamCtx {
    pub blob: BlobInfo,
    pub validate: bool,
    pub for_cache: bool,
    pub cache: Arc<BlobCache>,
    /// Set when the image is gone (see [`Streams::image_gone`]).
    pub image_gone: Arc<AtomicBool>,
}

/// Read one chunk's stored bytes from `reader` (positioned at it), then decode and verify them. Returns the
/// data and whether its digest was checked.
pub fn read_chunk(
    ctx: &StreamCtx,
    reader: &mut dyn Read,
    info: &ChunkInfo,
    scratch: &mut Vec<u8>,
) -> Result<(Vec<u8>, bool)> {
    let mut data = Vec::new();
    let checked = read_chunk_into(ctx, reader, info, scratch, &mut data)?;
    Ok((data, checked))
}

/// [`read_chunk`] into `data`, with `scratch` for the stored bytes of a compressed chunk (a raw one is read
/// straight into `data`): a stream reuses both from chunk to chunk, so it allocates and zero-fills its
/// buffers once, not per chunk.
fn read_chunk_into(
    ctx: &StreamCtx,
    reader: &mut dyn Read,
    info: &ChunkInfo,
    scratch: &mut Vec<u8>,
    data: &mut Vec<u8>,
) -> Result<bool> {
    let stored = info.compressed_size as usize;
    let what = |e: std::io::Error| {
        Error::io(
            format!(
                "blob {} chunk {}: read from the backend",
                ctx.blob.id, info.index
            ),
            e,
        )
    };
    if info.compressed {
        scratch.resize(stored, 0);
        reader.read_exact(scratch).map_err(what)?;
        decode_chunk_into(&ctx.blob, info, scratch, data)?;
    } else {
        check_raw_size(&ctx.blob, info, stored)?;
        data.resize(stored, 0);
        reader.read_exact(data).map_err(what)?;
    }
    verify_chunk(&ctx.blob, info, data, ctx.validate, ctx.for_cache)
}

/// Store the chunks of `run` (back to back in the blob, `reader` positioned at the first) one by one,
/// releasing each claim once its chunk is in the cache. On an error the chunks not stored yet are released
/// unstored: their readers fetch them themselves.
pub fn store_run(ctx: &StreamCtx, reader: &mut dyn Read, run: Vec<Pending>) -> Result<()> {
    let (mut scratch, mut data) = (Vec::new(), Vec::new());
    for p in run {
        if ctx.image_gone.load(Ordering::Acquire) {
            return Err(Error::Invalid(format!(
                "blob {}: the image is unmounted",
                ctx.blob.id
            )));
        }
        let checked = read_chunk_into(ctx, reader, &p.info, &mut scratch, &mut data)?;
        ctx.cache.store(&p.info, &data, checked);
        drop(p.claim);
    }
    Ok(())
}

/// Streams and buffered bytes, counted for the whole daemon.
pub struct DaemonBudget {
    streams: AtomicUsize,
    bytes: AtomicU64,
    /// Images with at least one stream running: each may use its equal share of the budget.
    images: AtomicUsize,
    max_streams: usize,
    max_bytes: u64,
}

impl DaemonBudget {
    pub const fn new(max_streams: usize, max_bytes: u64) -> Self {
        DaemonBudget {
            streams: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            images: AtomicUsize::new(0),
            max_streams,
            max_bytes,
        }
    }

    /// (streams, bytes) reserved now.
    #[cfg(test)]
    pub fn in_use(&self) -> (usize, u64) {
        (
            self.streams.load(Ordering::Acquire),
            self.bytes.load(Ordering::Acquire),
        )
    }
}

/// The budget every image of this process shares.
pub static DAEMON_BUDGET: DaemonBudget =
    DaemonBudget::new(MAX_DAEMON_STREAMS, MAX_DAEMON_STREAM_BYTES);

/// Add `n` to `counter` if the sum stays within `max`; the value before.
fn take_usize(counter: &AtomicUsize, n: usize, max: usize) -> Option<usize> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (v + n <= max).then_some(v + n)
        })
        .ok()
}

fn take_u64(counter: &AtomicU64, n: u64, max: u64) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (v.saturating_add(n) <= max).then_some(v + n)
        })
        .is_ok()
}

/// What one image's streams use now.
#[derive(Default)]
struct ImageUse {
    running: AtomicUsize,
    bytes: AtomicU64,
}

/// Streams running in the background for one image, and the rate they see.
pub struct Streams {
    used: Arc<ImageUse>,
    /// Per blob index.
    per_blob: Arc<Vec<AtomicUsize>>,
    budget: &'static DaemonBudget,
    link: Arc<LinkRate>,
    /// Set when the image is dropped: its streams end at their next chunk, instead of keeping their
    /// part of the daemon's streams (and a registry's connection) for a run no mount will read.
    gone: Arc<AtomicBool>,
}

impl Drop for Streams {
    fn drop(&mut self) {
        self.gone.store(true, Ordering::Release);
    }
}

impl Streams {
    /// Streams of an image with `blobs` blobs, within the daemon's budget.
    pub fn new(blobs: usize) -> Self {
        Self::with_budget(blobs, &DAEMON_BUDGET)
    }

    pub fn with_budget(blobs: usize, budget: &'static DaemonBudget) -> Self {
        Streams {
            used: Arc::default(),
            per_blob: Arc::new((0..blobs).map(|_| AtomicUsize::new(0)).collect()),
            budget,
            link: Arc::default(),
            gone: Arc::default(),
        }
    }

    /// The flag the image's streams watch (see [`StreamCtx::image_gone`]).
    pub fn image_gone(&self) -> Arc<AtomicBool> {
        self.gone.clone()
    }

    /// Room for one more background stream of blob `blob` holding up to `buffer_bytes` at a time: within
    /// the image's and the blob's stream counts, and within this image's equal share of the daemon's
    /// streams and buffered bytes (one stream at least) as well as the daemon's totals. The slot is given
    /// back when dropped (or when the stream it is handed to ends).
    pub fn reserve(&self, blob: u32, buffer_bytes: u64) -> Option<Slot> {
        let per_blob = self.per_blob.get(blob as usize)?;
        let b = self.budget;
        let sharing = (b.images.load(Ordering::Acquire)
            + usize::from(self.used.running.load(Ordering::Acquire) == 0))
        .max(1);
        let streams_here = (b.max_streams / sharing).clamp(1, MAX_STREAMS);
        if take_usize(&self.used.running, 1, streams_here)? == 0 {
            b.images.fetch_add(1, Ordering::AcqRel);
        }
        let mut slot = Slot {
            used: self.used.clone(),
            budget: b,
            per_blob: None,
            daemon_stream: false,
            bytes: 0,
        };
        take_usize(per_blob, 1, MAX_BLOB_STREAMS)?;
        slot.per_blob = Some((self.per_blob.clone(), blob as usize));
        take_usize(&b.streams, 1, b.max_streams)?;
        slot.daemon_stream = true;
        if !take_u64(&self.used.bytes, buffer_bytes, b.max_bytes / sharing as u64) {
            return None;
        }
        if !take_u64(&b.bytes, buffer_bytes, b.max_bytes) {
            self.used.bytes.fetch_sub(buffer_bytes, Ordering::AcqRel);
            return None;
        }
        slot.bytes = buffer_bytes;
        Some(slot)
    }

    /// Store `run` on a thread of its own from the reader `open` gives (the rest of a request already
    /// under way, or a new one), holding `slot` until it ends. If no thread can be started, or the request
    /// fails, the run is dropped: its claims are released and its readers fetch their chunks themselves.
    pub fn spawn(
        &self,
        ctx: StreamCtx,
        slot: Slot,
        run_rate: Arc<RunRate>,
        open: impl FnOnce() -> Result<Box<dyn Read + Send>> + Send + 'static,
        run: Vec<Pending>,
    ) {
        let link = self.link.clone();
        let spawned = std::thread::Builder::new()
            .name("rafs-stream".into())
            .spawn(move || {
                let _slot = slot;
                match open().and_then(|mut reader| store_run(&ctx, &mut *reader, run)) {
                    Ok(()) => run_rate.part_done(&link),
                    Err(e) => log::warn!("background fetch of blob {}: {e}", ctx.blob.id),
                }
            });
        if let Err(e) = spawned {
            log::warn!("cannot start a background fetch: {e}");
        }
    }

    /// Compressed bytes a predicted run may span: about what the link moves in [`STREAM_SECONDS`], within
    /// [`MIN_STREAM_BYTES`, `MAX_STREAM_BYTES`]. A reader that stops early leaves at most this much fetched
    /// for nothing.
    pub fn window_bytes(&self) -> u64 {
        self.link.window()
    }

    pub fn link(&self) -> &LinkRate {
        &self.link
    }
}

/// A reserved stream, given back when dropped (its thread ended, or it was never started).
pub struct Slot {
    used: Arc<ImageUse>,
    budget: &'static DaemonBudget,
    per_blob: Option<(Arc<Vec<AtomicUsize>>, usize)>,
    daemon_stream: bool,
    bytes: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.used.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.budget.images.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some((blobs, i)) = &self.per_blob {
            blobs[*i].fetch_sub(1, Ordering::AcqRel);
        }
        if self.daemon_stream {
            self.budget.streams.fetch_sub(1, Ordering::AcqRel);
        }
        self.used.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// One run fetched in parallel parts: its rate (all parts together, from the start of the run to the end
/// of its last part) feeds the link's moving average, which sizes later runs.
pub struct RunRate {
    started: Instant,
    bytes: u64,
    parts_left: AtomicUsize,
}

impl RunRate {
    pub fn new(bytes: u64, parts: usize) -> Arc<Self> {
        Arc::new(RunRate {
            started: Instant::now(),
            bytes,
            parts_left: AtomicUsize::new(parts),
        })
    }

    /// A part stored all its chunks; the last one records the run's rate.
    pub fn part_done(&self, link: &LinkRate) {
        if self.parts_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            link.record(self.bytes, self.started.elapsed().as_secs_f64());
        }
    }
}

/// Cut `run` (chunks back to back in one blob, `size` giving each one's compressed bytes) into at most
/// `parts` pieces of about equal size, in blob order; none is empty.
pub fn split_run<T>(run: Vec<T>, size: impl Fn(&T) -> u64, parts: usize) -> Vec<Vec<T>> {
    let total: u64 = run.iter().map(&size).sum();
    let parts = parts.clamp(1, run.len().max(1)) as u64;
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut done = 0u64;
    for p in run {
        // A chunk goes to the part its first byte falls in.
        let k = ((done as u128 * parts as u128) / total.max(1) as u128).min(parts as u128 - 1);
        done += size(&p);
        while out.len() <= k as usize {
            out.push(Vec::new());
        }
        out[k as usize].push(p);
    }
    out.retain(|part| !part.is_empty());
    out
}

/// Seconds of link time a predicted run may take.
pub const STREAM_SECONDS: f64 = 0.5;
/// Bounds of a predicted run, in compressed bytes.
pub const MIN_STREAM_BYTES: u64 = 4 << 20;
pub const MAX_STREAM_BYTES: u64 = 64 << 20;

/// The rate background streams achieve (bytes per second, a moving average; 0 until one finished).
#[derive(Default)]
pub struct LinkRate {
    bytes_per_sec: AtomicU64,
}

impl LinkRate {
    pub fn record(&self, bytes: u64, secs: f64) {
        if bytes < (1 << 20) || secs <= 0.0 {
            return; // too short to tell the rate from the round trip
        }
        let now = (bytes as f64 / secs) as u64;
        let _ = self
            .bytes_per_sec
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 { now } else { (old * 3 + now) / 4 })
            });
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec.load(Ordering::Relaxed)
    }

    fn window(&self) -> u64 {
        let rate = self.bytes_per_sec();
        if rate == 0 {
            return MIN_STREAM_BYTES;
        }
        ((rate as f64 * STREAM_SECONDS) as u64).clamp(MIN_STREAM_BYTES, MAX_STREAM_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_stay_within_the_image_blob_and_daemon_caps() {
        static BUDGET: DaemonBudget = DaemonBudget::new(6, 100);
        let a = Streams::with_budget(2, &BUDGET);
        // One blob: MAX_BLOB_STREAMS at most, whatever the image and daemon would allow.
        let blob0: Vec<Slot> = std::iter::from_fn(|| a.reserve(0, 10)).take(100).collect();
        assert_eq!(blob0.len(), MAX_BLOB_STREAMS);
        assert!(a.reserve(7, 10).is_none(), "no such blob");
        // The daemon's stream count binds across images.
        let b = Streams::with_budget(1, &BUDGET);
        let blob1 = a.reserve(1, 10).unwrap();
        let other = b.reserve(0, 10).unwrap();
        assert_eq!(BUDGET.in_use(), (6, 60));
        assert!(b.reserve(0, 1).is_none(), "daemon-wide stream cap");
        drop(blob0);
        assert_eq!(BUDGET.in_use(), (2, 20), "slots given back on drop");
        // So does its byte budget: a reservation that would pass it fails and takes nothing.
        drop(other);
        assert!(a.reserve(0, 91).is_none());
        assert_eq!(BUDGET.in_use(), (1, 10));
        assert_eq!(a.used.running.load(Ordering::Acquire), 1);
        let last = a.reserve(0, 90).unwrap();
        assert!(b.reserve(0, 1).is_none(), "daemon-wide byte cap");
        drop((blob1, last));
        assert_eq!(BUDGET.in_use(), (0, 0));
        assert_eq!(a.used.running.load(Ordering::Acquire), 0);
        assert!(a.per_blob.iter().all(|n| n.load(Ordering::Acquire) == 0));
        assert_eq!(BUDGET.images.load(Ordering::Acquire), 0);
    }

    /// An image that keeps every stream it can (a hostile one reading all the time) leaves the others
    /// their equal share of the daemon's streams and bytes as its own streams end.
    #[test]
    fn images_running_streams_share_the_daemons_budget_equally() {
        static BUDGET: DaemonBudget = DaemonBudget::new(8, 800);
        let greedy = Streams::with_budget(2, &BUDGET);
        let take = |s: &Streams, blob, bytes| -> Vec<Slot> {
            std::iter::from_fn(|| s.reserve(blob, bytes))
                .take(100)
                .collect()
        };
        // Alone, it may take the whole budget.
        let mut held = take(&greedy, 0, 100);
        held.extend(take(&greedy, 1, 100));
        assert_eq!(BUDGET.in_use(), (8, 800));
        let other = Streams::with_budget(1, &BUDGET);
        assert!(other.reserve(0, 1).is_none(), "the budget is used up");
        assert_eq!(
            BUDGET.images.load(Ordering::Acquire),
            1,
            "a failed try counts no image"
        );
        // As its streams end, the other image starts one; the greedy one then gets back to its half of
        // the daemon's streams, no more, and the rest is left to the other.
        held.truncate(2);
        let mut others = vec![other.reserve(0, 100).unwrap()];
        held.extend(take(&greedy, 0, 100));
        held.extend(take(&greedy, 1, 100));
        assert_eq!(held.len(), 4, "the greedy image takes its half, no more");
        others.extend(take(&other, 0, 100));
        assert_eq!(others.len(), 4, "the other image gets its half");
        assert_eq!(BUDGET.in_use(), (8, 800));
        // Bytes are shared the same way: with two images streaming, 400 each.
        drop(others);
        let big = other.reserve(0, 400).unwrap();
        assert!(
            other.reserve(0, 1).is_none(),
            "its half of the bytes is used"
        );
        drop((big, held));
        assert_eq!(BUDGET.in_use(), (0, 0));
        assert_eq!(BUDGET.images.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_run_splits_into_contiguous_parts_of_about_equal_bytes() {
        let sizes =
            |parts: &[Vec<u64>]| -> Vec<u64> { parts.iter().map(|p| p.iter().sum()).collect() };
        let run: Vec<u64> = vec![100; 10];
        let parts = split_run(run.clone(), |s| *s, 4);
        assert_eq!(sizes(&parts), vec![300, 200, 300, 200]);
        assert_eq!(parts.concat(), run, "in order, nothing lost");
        assert_eq!(split_run(run.clone(), |s| *s, 1), vec![run.clone()]);
        assert_eq!(
            split_run(vec![6u64, 6], |s| *s, 8),
            vec![vec![6], vec![6]],
            "no more parts than chunks"
        );
        // A huge chunk goes with the part its first byte falls in; the part it empties is left out.
        let parts = split_run(vec![1u64, 1000, 1, 1], |s| *s, 3);
        assert_eq!(parts, vec![vec![1, 1000], vec![1, 1]]);
        assert!(split_run(Vec::<u64>::new(), |s| *s, 3).is_empty());
        let zeros = split_run(vec![0u64; 3], |s| *s, 2);
        assert_eq!(zeros.concat(), vec![0; 3]);
    }

    #[test]
    fn window_follows_the_link_within_bounds() {
        let l = LinkRate::default();
        assert_eq!(l.window(), MIN_STREAM_BYTES, "unknown rate");
        l.record(100 << 20, 1.0);
        assert_eq!(l.window(), 50 << 20);
        let slow = LinkRate::default();
        slow.record(2 << 20, 1.0);
        assert_eq!(slow.window(), MIN_STREAM_BYTES);
        let fast = LinkRate::default();
        fast.record(1 << 30, 1.0);
        assert_eq!(fast.window(), MAX_STREAM_BYTES);
        fast.record(1000, 1.0);
        assert_eq!(fast.window(), MAX_STREAM_BYTES, "short reads say nothing");
    }

    /// A run whose image goes away stops at the next chunk: its claims are released and nothing more is
    /// read from the request, instead of the rest of the run streaming in for no mount.
    #[test]
    fn a_run_of_an_image_gone_stops_at_the_next_chunk() {
        use crate::cache::CacheKey;
        const CHUNK: u32 = 4096;
        let dir = tempfile::tempdir().unwrap();
        let blob = BlobInfo::raw_for_tests(8, CHUNK);
        let key = CacheKey {
            tag: "0".repeat(32),
            verified: false,
        };
        let cache = Arc::new(
            BlobCache::open(dir.path(), std::slice::from_ref(&blob), &[Some(key)])
                .unwrap()
                .without_space_checks(),
        );
        let gone = Arc::new(AtomicBool::new(false));
        let ctx = StreamCtx {
            blob,
            validate: false,
            for_cache: false,
            cache: cache.clone(),
            image_gone: gone.clone(),
        };
        let run: Vec<Pending> = (0..8u32)
            .map(|i| {
                let info = ChunkInfo {
                    index: i,
                    uncompressed_offset: (i * CHUNK) as u64,
                    compressed_offset: (i * CHUNK) as u64,
                    uncompressed_size: CHUNK,
                    compressed_size: CHUNK,
                    ..ChunkInfo::default()
                };
                Pending {
                    claim: cache.claim(&info),
                    info,
                }
            })
            .collect();
        // The body: the image goes away while the third chunk arrives.
        struct Body {
            sent: usize,
            gone: Arc<AtomicBool>,
        }
        impl Read for Body {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.sent >= 2 * CHUNK as usize {
                    self.gone.store(true, Ordering::Release);
                }
                let n = buf.len().min(CHUNK as usize);
                buf[..n].fill(7);
                self.sent += n;
                Ok(n)
            }
        }
        let mut body = Body { sent: 0, gone };
        let e = store_run(&ctx, &mut body, run).unwrap_err();
        assert!(e.to_string().contains("unmounted"), "{e}");
        assert_eq!(body.sent, 3 * CHUNK as usize, "read past the chunk in hand");
        // Every claim is released: another reader may fetch the rest.
        let rest = ChunkInfo {
            index: 5,
            uncompressed_offset: 5 * CHUNK as u64,
            ..ChunkInfo::default()
        };
        assert!(cache.try_claim(&rest).is_some());
    }
}
