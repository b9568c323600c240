//! Background prefetch: bring the chunks of chosen files (the image's prefetch table, `--prefetch-files`,
//! or everything) into the blob cache before anyone asks, without getting in the way of user reads.
//!
//! Chosen files are what a container reads as it starts, and `rafsd build --prefetch-files` lays them
//! out first in the blob, in the order it reads them. When the first chosen file's data starts the
//! plan so (the head), the first [`HEAD_BYTES`] of it go first, as one request on one worker, alone:
//! the bytes then arrive in the order the program asks for them, at the link's whole rate, so it runs
//! while they stream. Several requests at once would share the link, and each of the first bytes needed
//! would come as slowly as the requests in flight are many (a container's start-up from a recorded
//! prefetch list took 0.78 s against 0.84 s, see the README's start-up benchmark). Until the head is
//! fetched, a read that misses one of its chunks takes that chunk alone, and no read's predicted run
//! reaches into it (`RafsImage::prefetch_head`; while the plan is made, the table's chunks stand for
//! it): a container's first read races the plan, and its own run would share the link with the head
//! (0.77 s against 0.85 s). The rest follows in merged requests on all workers; so does what is left
//! of the head when its request fails.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::PrefetchConfig;
use crate::error::{BackendErrorKind, Error, Result};
use crate::format::ChunkInfo;
use crate::image::{PrefetchHead, RafsImage, WalkEvent};

/// The bytes of chosen files fetched first, in one request (a stream stored chunk by chunk: its size
/// costs no memory, except through a plain forward proxy, whose ranged answers are read whole).
pub const HEAD_BYTES: u64 = 16 << 20;

/// What to prefetch.
#[derive(Debug, Clone)]
pub enum PrefetchTarget {
    /// Files and directories (everything below) by inode number.
    Inodes(Vec<u64>),
    All,
}

pub struct Prefetcher {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Prefetcher {
    /// Plan and run the prefetch on `cfg.threads` workers. Returns at once; planning happens on a worker.
    pub fn start(
        image: Arc<RafsImage>,
        cfg: &PrefetchConfig,
        target: PrefetchTarget,
    ) -> Prefetcher {
        let stop = Arc::new(AtomicBool::new(false));
        let queue: Arc<Mutex<Option<Plan>>> = Arc::new(Mutex::new(None));
        let limiter = Arc::new(Bandwidth::new(cfg.bandwidth_limit));
        // A merged request never outgrows the limiter's bucket: it could never be paid for at once.
        let merge = cfg.merging_size.max(128 << 10).min(limiter.burst());
        let head = match target {
            PrefetchTarget::Inodes(_) => HEAD_BYTES.min(limiter.burst()),
            PrefetchTarget::All => 0,
        };
        // Until the plan says where the head lies, if anywhere, reads leave the table's chunks to it
        // when the table is what is prefetched (a container's first read races the plan).
        image.set_prefetch_head(match &target {
            PrefetchTarget::Inodes(inos) if head > 0 && *inos == image.info().prefetch => {
                PrefetchHead::PlanningTable
            }
            _ => PrefetchHead::None,
        });
        let mut threads = Vec::new();
        for worker in 0..cfg.threads.max(1) {
            let (image, stop, queue, limiter, target) = (
                image.clone(),
                stop.clone(),
                queue.clone(),
                limiter.clone(),
                target.clone(),
            );
            let spawned = std::thread::Builder::new()
                .name(format!("prefetch-{worker}"))
                .spawn(move || {
                    if worker == 0 {
                        let started = Instant::now();
                        // A panic while planning must not leave the head set or the others waiting.
                        let planned =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                plan(&image, &target, merge, head, &stop)
                            }));
                        let (runs, has_head) = match planned {
                            Ok(Ok(r)) => r,
                            Ok(Err(e)) => {
                                log::warn!("prefetch: cannot plan ({e}); skipping prefetch");
                                (VecDeque::new(), false)
                            }
                            Err(_) => {
                                log::error!("prefetch: planning panicked; skipping prefetch");
                                (VecDeque::new(), false)
                            }
                        };
                        log::info!(
                            "prefetch: {} merged requests planned in {:?}",
                            runs.len(),
                            started.elapsed()
                        );
                        image.set_prefetch_head(match (has_head, runs.front()) {
                            (true, Some(run)) => head_range(run),
                            _ => PrefetchHead::None,
                        });
                        let plan = Plan {
                            head: match has_head {
                                true => Head::Waiting,
                                false => Head::Done,
                            },
                            runs,
                            requeued: 0,
                        };
                        *queue.lock().unwrap_or_else(|e| e.into_inner()) = Some(plan);
                    }
                    run_worker(&image, &stop, &queue, &limiter, merge);
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    log::warn!("prefetch: cannot start worker {worker}: {e}");
                    if worker == 0 {
                        break; // the planner: the others would wait for its plan forever
                    }
                }
            }
        }
        if threads.is_empty() {
            image.set_prefetch_head(PrefetchHead::None); // nobody plans
        }
        Prefetcher { stop, threads }
    }

    /// Wait for the workers to finish the plan (tests, `--prefetch-wait`).
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Prefetcher {
    /// Stops the workers without waiting for them: each ends at its next check, after the request in
    /// hand, which a slow or hostile registry may draw out for as long as its timeouts allow. They hold
    /// the image; the unmount that drops this (holding the daemon's mount lock) must not wait on them.
    /// A mount of the same image meanwhile has a prefetch of its own: until the old request ends, both
    /// may fetch the same chunks (the cache takes either).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The merged requests to make, in order, the first of them the head until it is done.
struct Plan {
    runs: VecDeque<Vec<ChunkInfo>>,
    head: Head,
    /// Runs put back in a row because their blob found no answer (see [`MAX_REQUEUES`]).
    requeued: u32,
}

impl Plan {
    /// The next run: the head while it waits, else the first run of a blob that may be asked now (the
    /// runs before it keep their place, to go first once their blob may be asked again), else the first
    /// run (its worker waits for its blob). A blob that found no answer holds back only its own runs.
    fn take(&mut self, image: &RafsImage) -> Option<Vec<ChunkInfo>> {
        let mut pick = 0;
        if self.head != Head::Waiting {
            // Runs come grouped by blob: ask about a group's blob once.
            let mut last: Option<(u32, bool)> = None;
            let found = self.runs.iter().position(|run| {
                let Some(blob) = run.first().map(|c| c.blob_index) else {
                    return true;
                };
                let waits = match last {
                    Some((b, waits)) if b == blob => waits,
                    _ => image.blob_retry_at(blob).is_some(),
                };
                last = Some((blob, waits));
                !waits
            });
            pick = found.unwrap_or(0);
        }
        self.runs.remove(pick)
    }
}

/// Runs put back in a row, at most, because their blob found no answer: with the 5 s pause between
/// requests of such a blob, a minute or so of a registry that is down.
const MAX_REQUEUES: u32 = 12;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Head {
    /// The first run is the head, not taken yet.
    Waiting,
    /// A worker fetches it: the others wait.
    InFlight,
    /// Fetched, or none: every worker takes the next run.
    Done,
}

/// Marks the head done when dropped (also when its fetch panics), so that the other workers go on and
/// reads predict again.
struct HeadDone<'a>(&'a Mutex<Option<Plan>>, &'a RafsImage);

impl Drop for HeadDone<'_> {
    fn drop(&mut self) {
        self.1.set_prefetch_head(PrefetchHead::None);
        if let Some(plan) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            plan.head = Head::Done;
        }
    }
}

fn run_worker(
    image: &RafsImage,
    stop: &AtomicBool,
    queue: &Mutex<Option<Plan>>,
    limiter: &Bandwidth,
    merge: u64,
) {
    let metrics = image.cache().map(|c| &c.metrics);
    loop {
        if stop.load(Ordering::Relaxed) {
            image.set_prefetch_head(PrefetchHead::None);
            return;
        }
        let next = {
            let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
            match q.as_mut() {
                None => None,
                Some(plan) if plan.head == Head::InFlight => None,
                Some(plan) => {
                    let Some(run) = plan.take(image) else {
                        return;
                    };
                    let is_head = plan.head == Head::Waiting;
                    if is_head {
                        plan.head = Head::InFlight;
                    }
                    let gave_up = plan.requeued >= MAX_REQUEUES;
                    Some((run, is_head, gave_up))
                }
            }
        };
        let Some((run, is_head, gave_up)) = next else {
            std::thread::sleep(Duration::from_millis(5)); // plan not ready yet, or the head in flight
            continue;
        };
        let _head_done = is_head.then(|| HeadDone(queue, image));
        let blob = run.first().map(|c| c.blob_index);
        if gave_up && blob.is_some_and(|b| image.blob_failing(b)) {
            continue; // its registry stayed down: the rest of the plan for that blob goes unasked
        }
        // User reads first: wait while any is in progress (the head, what they will ask for first,
        // goes at once).
        while !is_head && image.user_reads_in_flight() > 0 && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
        }
        // A blob whose requests found no answer, and no other blob's run to take instead: wait until
        // it may be asked again, rather than have each run fail at once and the plan thrown away in
        // milliseconds.
        if let Some(blob) = blob {
            while let Some(at) = image.blob_retry_at(blob) {
                let now = Instant::now();
                if stop.load(Ordering::Relaxed) || at <= now {
                    break;
                }
                std::thread::sleep((at - now).min(Duration::from_millis(100)));
            }
        }
        if stop.load(Ordering::Relaxed) {
            continue; // the loop's first step ends the worker
        }
        // While the blob fails, `prefetch` asks it with one chunk first: pay for that one.
        let bytes: u64 = match blob.is_some_and(|b| image.blob_failing(b)) {
            true => run.first().map_or(0, |c| c.compressed_size as u64),
            false => run.iter().map(|c| c.compressed_size as u64).sum(),
        };
        limiter.take(bytes, stop);
        if stop.load(Ordering::Relaxed) {
            continue; // stopped while waiting for the limiter: no new request
        }
        match image.prefetch(&run) {
            Ok(fetched) => {
                if let Some(plan) = queue.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    plan.requeued = 0;
                }
                if let Some(m) = metrics {
                    m.prefetch_data_amount.fetch_add(fetched, Ordering::Relaxed);
                    m.prefetch_requests_count.fetch_add(1, Ordering::Relaxed);
                }
            }
            // The blob found no answer: the run waits for it to be asked again (other runs first), not
            // dropped; for at most MAX_REQUEUES runs in a row, so prefetch gives up a registry that
            // stays down within a minute or so.
            Err(Error::Backend(b)) if b.kind == BackendErrorKind::Unavailable => {
                let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                match q.as_mut() {
                    Some(plan) if plan.requeued < MAX_REQUEUES => {
                        plan.requeued += 1;
                        log::debug!("prefetch: {b}; the run waits for its blob");
                        for part in merged(run, merge) {
                            plan.runs.push_back(part);
                        }
                    }
                    _ => log::warn!("prefetch: {b}"),
                }
            }
            Err(e) => {
                log::warn!("prefetch: {e}");
                if is_head {
                    // The head's chunks not stored go again, in merged requests on all workers.
                    if let Some(plan) = queue.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                        for part in merged(run, merge).into_iter().rev() {
                            plan.runs.push_front(part);
                        }
                    }
                }
            }
        }
    }
}

/// The chunks to prefetch, deduplicated, sorted by blob and compressed offset, merged into runs of
/// contiguous compressed bytes of at most `merge` bytes; and whether the first run is the head, of at
/// most `head` bytes: when the first chosen file with data is a regular file whose first chunk comes
/// first.
fn plan(
    image: &RafsImage,
    target: &PrefetchTarget,
    merge: u64,
    head: u64,
    stop: &AtomicBool,
) -> Result<(VecDeque<Vec<ChunkInfo>>, bool)> {
    let mut files = HashSet::new();
    match target {
        PrefetchTarget::All => image.walk(&mut |_, attr, ev| {
            if ev == WalkEvent::Node && attr.is_reg() {
                files.insert(attr.ino);
            }
            Ok(())
        })?,
        PrefetchTarget::Inodes(inos) => {
            for &ino in inos {
                collect_below(image, ino, &mut files)?;
            }
        }
    }
    let mut seen = HashSet::new();
    let mut chunks = Vec::new();
    for ino in files {
        // A file's chunks may need a blob's chunk-info array from the backend: a stop ends the plan.
        if stop.load(Ordering::Relaxed) {
            return Ok((VecDeque::new(), false));
        }
        for c in image.file_chunks(ino)? {
            if seen.insert((c.blob_index, c.index)) {
                chunks.push(c);
            }
        }
    }
    chunks.sort_by_key(|c| (c.blob_index, c.compressed_offset, c.index));
    let leads = match target {
        PrefetchTarget::Inodes(inos) if head > 0 => {
            let first = first_chunk(image, inos)?;
            first.is_some_and(|f| {
                chunks
                    .first()
                    .is_some_and(|c| (c.blob_index, c.index) == (f.blob_index, f.index))
            })
        }
        _ => false,
    };
    let runs = merged_with_head(chunks, merge, if leads { head } else { 0 });
    Ok((runs, leads))
}

/// Where the head `run` lies in its blob.
fn head_range(run: &[ChunkInfo]) -> PrefetchHead {
    match (run.first(), run.last()) {
        (Some(first), Some(last)) => PrefetchHead::Range {
            blob: first.blob_index,
            start: first.compressed_offset,
            end: last.compressed_offset + last.compressed_size as u64,
        },
        _ => PrefetchHead::None,
    }
}

/// The first chunk of the first regular file with data among `inos` (empty files skipped), unless a
/// directory comes before it (the order of its files is not the list's).
fn first_chunk(image: &RafsImage, inos: &[u64]) -> Result<Option<ChunkInfo>> {
    for &ino in inos {
        let attr = image.inode(ino)?;
        if !attr.is_reg() {
            return Ok(None);
        }
        if let Some(first) = image.file_chunks(ino)?.into_iter().next() {
            return Ok(Some(first));
        }
    }
    Ok(None)
}

/// `chunks` (sorted) merged into runs of contiguous compressed bytes of at most `merge` bytes.
fn merged(chunks: Vec<ChunkInfo>, merge: u64) -> VecDeque<Vec<ChunkInfo>> {
    merged_with_head(chunks, merge, 0)
}

/// [`merged`], the first run of at most `head` bytes when that is more.
fn merged_with_head(chunks: Vec<ChunkInfo>, merge: u64, head: u64) -> VecDeque<Vec<ChunkInfo>> {
    let mut runs: VecDeque<Vec<ChunkInfo>> = VecDeque::new();
    let mut size = 0u64;
    for c in chunks {
        let limit = if runs.len() == 1 {
            merge.max(head)
        } else {
            merge
        };
        let extend = runs.back().and_then(|r| r.last()).is_some_and(|last| {
            last.blob_index == c.blob_index
                && last.batch.is_none()
                && c.batch.is_none()
                && c.compressed_offset == last.compressed_offset + last.compressed_size as u64
                && size + c.compressed_size as u64 <= limit
        });
        if extend {
            size += c.compressed_size as u64;
            runs.back_mut().unwrap().push(c);
        } else {
            size = c.compressed_size as u64;
            runs.push_back(vec![c]);
        }
    }
    runs
}

/// Regular files at or below inode `ino` (a directory means everything under it).
fn collect_below(image: &RafsImage, ino: u64, files: &mut HashSet<u64>) -> Result<()> {
    let mut stack = vec![ino];
    let mut seen_dirs = HashSet::new();
    while let Some(ino) = stack.pop() {
        let attr = image.inode(ino)?;
        if attr.is_reg() {
            files.insert(ino);
        } else if attr.is_dir() && seen_dirs.insert(ino) {
            image.read_dir(ino, 0, &mut |e| {
                stack.push(e.ino);
                Ok(true)
            })?;
        }
    }
    Ok(())
}

/// A token bucket: `limit` bytes per second, refilled continuously, burst of one second (at least 16 MiB
/// so one merged request always fits).
struct Bandwidth {
    limit: u64,
    state: Mutex<(f64, Instant)>,
}

impl Bandwidth {
    fn new(limit: u64) -> Self {
        Bandwidth {
            limit,
            state: Mutex::new((limit.max(16 << 20) as f64, Instant::now())),
        }
    }

    /// The most one request may take at once (no limit: unbounded).
    fn burst(&self) -> u64 {
        match self.limit {
            0 => u64::MAX,
            l => l.max(16 << 20),
        }
    }

    /// Wait until `bytes` may be fetched. A request larger than the bucket (one huge chunk) waits for a
    /// full bucket and leaves it in debt, so it neither waits forever nor beats the rate.
    fn take(&self, bytes: u64, stop: &AtomicBool) {
        if self.limit == 0 {
            return;
        }
        let capacity = self.burst() as f64;
        let need = (bytes as f64).min(capacity);
        loop {
            let wait = {
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                s.0 =
                    (s.0 + now.duration_since(s.1).as_secs_f64() * self.limit as f64).min(capacity);
                s.1 = now;
                if s.0 >= need {
                    s.0 -= bytes as f64;
                    return;
                }
                (need - s.0) / self.limit as f64
            };
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_secs_f64(wait.min(0.1)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_larger_than_the_bucket_are_paid_for_not_waited_on_forever() {
        let stop = AtomicBool::new(false);
        let b = Bandwidth::new(64 << 20);
        assert_eq!(b.burst(), 64 << 20);
        let start = Instant::now();
        // Twice the bucket: goes at once (the bucket starts full) and leaves a debt of one bucket...
        b.take(128 << 20, &stop);
        // (Waiting for the bucket would take about a second: the bound leaves a loaded machine room.)
        assert!(start.elapsed() < Duration::from_millis(800));
        // ...which the next request pays: about a second for 64 MiB at 64 MiB/s, then 0.1 s for its own.
        b.take(6 << 20, &stop);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "{took:?}"
        );
        assert_eq!(Bandwidth::new(0).burst(), u64::MAX);
        assert_eq!(Bandwidth::new(1 << 20).burst(), 16 << 20);
    }
}
