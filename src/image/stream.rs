//! Several chunks in one backend request: when a read predicts the chunks after the one it misses (the rest
//! of a file read front to back, the image's prefetch table), they are asked for with the missing one in a
//! single ranged request whose body is used as it arrives. The reader gets its own chunk as soon as that is
//! in; a background thread stores the others in the blob cache one by one, releasing each to whoever waits
//! for it the moment it is stored. Memory is one chunk per stream, whatever the request's length; the
//! round trip and the server's per-request cost are paid once per run, not per chunk.

use std::io::Read;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::verify::{decode_chunk, verify_chunk};
use crate::cache::{BlobCache, Claim};
use crate::error::{Error, Result};
use crate::format::{BlobInfo, ChunkInfo};

/// Background streams one image runs at most; a read that would start another fetches its chunk alone.
pub const MAX_STREAMS: usize = 8;

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
}

/// Read one chunk's stored bytes from `reader` (positioned at it), then decode and verify them. Returns the
/// data and whether its digest was checked.
pub fn read_chunk(
    ctx: &StreamCtx,
    reader: &mut dyn Read,
    info: &ChunkInfo,
    scratch: &mut Vec<u8>,
) -> Result<(Vec<u8>, bool)> {
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
    let data = if info.compressed {
        scratch.resize(stored, 0);
        reader.read_exact(scratch).map_err(what)?;
        decode_chunk(&ctx.blob, info, scratch)?
    } else {
        // Stored raw: read straight into the chunk's buffer (no second copy).
        let mut data = vec![0u8; stored];
        reader.read_exact(&mut data).map_err(what)?;
        if data.len() != info.uncompressed_size as usize {
            return Err(Error::Integrity(format!(
                "blob {} chunk {}: stored raw but sizes differ",
                ctx.blob.id, info.index
            )));
        }
        data
    };
    let checked = verify_chunk(&ctx.blob, info, &data, ctx.validate, ctx.for_cache)?;
    Ok((data, checked))
}

/// Store the chunks of `run` (back to back in the blob, `reader` positioned at the first) one by one,
/// releasing each claim once its chunk is in the cache. On an error the chunks not stored yet are released
/// unstored: their readers fetch them themselves.
pub fn store_run(ctx: &StreamCtx, reader: &mut dyn Read, run: Vec<Pending>) -> Result<()> {
    let mut scratch = Vec::new();
    for p in run {
        let (data, checked) = read_chunk(ctx, reader, &p.info, &mut scratch)?;
        ctx.cache.store(&p.info, &data, checked);
        drop(p.claim);
    }
    Ok(())
}

/// Streams running in the background for one image, and the rate they see.
#[derive(Default)]
pub struct Streams {
    running: Arc<AtomicUsize>,
    link: Arc<LinkRate>,
}

impl Streams {
    /// Room for one more background stream? The caller must then [`Streams::spawn`] or [`Streams::cancel`].
    pub fn reserve(&self) -> bool {
        self.running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_STREAMS).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn cancel(&self) {
        self.running.fetch_sub(1, Ordering::AcqRel);
    }

    /// Finish `run` from `reader` on a thread of its own. If no thread can be started the run is dropped:
    /// its claims are released and its readers fetch their chunks themselves.
    pub fn spawn(&self, ctx: StreamCtx, mut reader: Box<dyn Read + Send>, run: Vec<Pending>) {
        let slot = Slot(self.running.clone());
        let link = self.link.clone();
        let bytes: u64 = run.iter().map(|p| p.info.compressed_size as u64).sum();
        let spawned = std::thread::Builder::new()
            .name("rafs-stream".into())
            .spawn(move || {
                let _slot = slot;
                let started = Instant::now();
                match store_run(&ctx, &mut *reader, run) {
                    Ok(()) => link.record(bytes, started.elapsed().as_secs_f64()),
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

/// A reserved stream, given back when its thread ends (or was never started).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
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
}
