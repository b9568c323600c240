//! The local blob cache (`blobcache` / `filecache`): each blob's chunks, uncompressed, at their
//! uncompressed offsets in a data file, with a persistent ready-bitmap beside it (nydusd's `.chunk_map`
//! layout). The cache survives restarts and kill -9.
//!
//! The files of a blob are named `<blob id>.<key>.blob.data` and `<...>.blob.data.chunk_map`, where the
//! key ([`key`]) fingerprints everything a reader relies on for that blob: every chunk's index, place,
//! size and digest as the mounting image records them. Images that expect the same bytes at every place
//! (genuine images sharing a layer) share the files; an image that names another's blob id but describes
//! it differently (a forged bootstrap) gets files of its own. Only chunks whose digest was checked against
//! the image's record are stored, whatever `digest_validate` says, so a ready chunk holds exactly the
//! bytes every image using those files expects and can be served without another check.
//!
//! The cache is an optimisation, never a requirement: a cache that cannot be created or written (full or
//! read-only disk) is logged and reads go to the backend; a failed write turns storing off for a while
//! ([`DEGRADED_FOR`]), then it is tried again.
//!
//! The cache never takes the last of its filesystem: a chunk is stored only if the space left afterwards
//! stays above [`free_space_floor`]. Images are hostile, and a cache that fills the disk would take it
//! from everything else the host writes there (logs, containers, the runtime's own state).

pub mod chunk_map;
pub mod key;
pub mod prefetch;

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use chunk_map::ChunkMap;
pub use key::CacheKey;

use crate::error::{Error, Result};
use crate::format::{BlobInfo, ChunkInfo};

/// How long the cache stays off after a failed write before storing is tried again: a full disk may be
/// freed, and one co-tenant filling it must not leave every other mount uncached for good.
pub const DEGRADED_FOR: Duration = Duration::from_secs(30);

/// The most space the cache leaves free on a large filesystem.
pub const MAX_FREE_SPACE_FLOOR: u64 = 2 << 30;

/// Space the cache leaves to others on a filesystem of `size` bytes: 5% of it, at most
/// [`MAX_FREE_SPACE_FLOOR`].
pub fn free_space_floor(size: u64) -> u64 {
    (size / 20).min(MAX_FREE_SPACE_FLOOR)
}

/// How far above the floor the space must be again before the cache says it stores again: the largest
/// chunk, so that chunks of different sizes near the floor do not turn the warning on and off.
const ROOM_AGAIN: u64 = 16 << 20;

/// Whether storing `len` more bytes leaves the floor free on a filesystem with `available` of `size`
/// bytes (what an unprivileged writer may still use, so the root reserve is kept too).
fn leaves_floor(available: u64, size: u64, len: u64) -> bool {
    available.saturating_sub(len) >= free_space_floor(size)
}

/// (available, size) in bytes of the filesystem holding `file`, `None` when it cannot be asked.
fn filesystem_space(file: &File) -> Option<(u64, u64)> {
    // SAFETY: statfs64 is plain old data, filled by the call.
    let mut st: libc::statfs64 = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a pointer to a struct of the right type.
    if unsafe { libc::fstatfs64(file.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    // Counts are in fragments; kernels that report no fragment size count in blocks.
    let unit = if st.f_frsize > 0 {
        st.f_frsize
    } else {
        st.f_bsize
    } as u64;
    Some((
        st.f_bavail.saturating_mul(unit),
        st.f_blocks.saturating_mul(unit),
    ))
}

struct CachedBlob {
    id: String,
    /// The data file's name in the work dir.
    name: String,
    /// Chunks are stored only with their digest checked (false: a cache private to one bootstrap whose
    /// chunks have no digest to check, see [`key`]).
    verified: bool,
    data: Arc<File>,
    /// The data file opened read-only, for handing to a VMM (DAX maps), opened on first use.
    data_read_only: std::sync::OnceLock<Option<Arc<File>>>,
    map: ChunkMap,
    size: u64,
}

/// Counters in the shape of nydusd's BlobcacheMetrics.
#[derive(Default)]
pub struct CacheMetrics {
    pub partial_hits: AtomicU64,
    pub whole_hits: AtomicU64,
    pub total: AtomicU64,
    pub prefetch_data_amount: AtomicU64,
    pub prefetch_requests_count: AtomicU64,
    pub prefetch_unmerged_chunks: AtomicU64,
    pub prefetch_begin_millis: AtomicU64,
    pub prefetch_end_millis: AtomicU64,
    pub backend_bytes: AtomicU64,
    pub backend_requests: AtomicU64,
}

pub struct BlobCache {
    work_dir: PathBuf,
    /// One slot per blob index; `None` where that blob could not be cached.
    blobs: Vec<Option<CachedBlob>>,
    /// After a failed write, until when (milliseconds after `opened`; 0: never failed) we stop writing
    /// and serve from the backend.
    degraded_until: AtomicU64,
    opened: Instant,
    /// A store found the filesystem at its floor, and the space has not come back since (one warning
    /// per stretch).
    at_floor: AtomicBool,
    /// (available, size) of the filesystem holding a file ([`filesystem_space`]; tests set their own).
    space: fn(&File) -> Option<(u64, u64)>,
    /// Chunks some thread is fetching right now, so others wait instead of fetching twice.
    inflight: Mutex<HashSet<(u32, u32)>>,
    inflight_done: Condvar,
    pub metrics: CacheMetrics,
}

impl BlobCache {
    /// Open (or create) the cache files of `blobs` under `work_dir`, named by their `keys` (a blob whose
    /// key is `None` is not cached).
    pub fn open(work_dir: &Path, blobs: &[BlobInfo], keys: &[Option<CacheKey>]) -> Result<Self> {
        std::fs::create_dir_all(work_dir)
            .map_err(|e| Error::io(format!("create cache dir {}", work_dir.display()), e))?;
        let mut slots = Vec::with_capacity(blobs.len());
        for (blob, key) in blobs.iter().zip(keys) {
            let Some(key) = key else {
                slots.push(None);
                continue;
            };
            match open_blob(work_dir, blob, key) {
                Ok(b) => slots.push(Some(b)),
                Err(e) => {
                    log::warn!(
                        "blob cache: cannot cache blob {} ({e}); reading it from the backend",
                        blob.id
                    );
                    slots.push(None);
                }
            }
        }
        Ok(BlobCache {
            work_dir: work_dir.to_path_buf(),
            blobs: slots,
            degraded_until: AtomicU64::new(0),
            opened: Instant::now(),
            at_floor: AtomicBool::new(false),
            space: filesystem_space,
            inflight: Mutex::new(HashSet::new()),
            inflight_done: Condvar::new(),
            metrics: CacheMetrics::default(),
        })
    }

    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// The cache data files, for metrics (`underlying_files`).
    pub fn files(&self) -> Vec<String> {
        self.blobs
            .iter()
            .flatten()
            .map(|b| b.name.clone())
            .collect()
    }

    /// Chunks of blob `blob_index` enter the cache only with their digest checked.
    pub fn needs_digest(&self, blob_index: u32) -> bool {
        self.blob(blob_index).is_some_and(|b| b.verified)
    }

    pub fn is_degraded(&self) -> bool {
        self.is_degraded_at(Instant::now())
    }

    fn is_degraded_at(&self, now: Instant) -> bool {
        self.millis_at(now) < self.degraded_until.load(Ordering::Relaxed)
    }

    /// `now` in milliseconds after `opened`, from 1 (0 means "never failed").
    fn millis_at(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.opened).as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    fn blob(&self, index: u32) -> Option<&CachedBlob> {
        self.blobs.get(index as usize).and_then(Option::as_ref)
    }

    pub fn is_ready(&self, chunk: &ChunkInfo) -> bool {
        self.blob(chunk.blob_index)
            .is_some_and(|b| b.map.is_ready(chunk.index))
    }

    /// (ready, total) chunks over all cached blobs.
    pub fn ready_counts(&self) -> (u64, u64) {
        self.blobs.iter().flatten().fold((0, 0), |(r, t), b| {
            (r + b.map.ready_count() as u64, t + b.map.count() as u64)
        })
    }

    /// The data file and offset of a ready chunk, for zero-copy reads.
    pub fn ready_location(&self, chunk: &ChunkInfo) -> Option<(Arc<File>, u64)> {
        let b = self.blob(chunk.blob_index)?;
        b.map
            .is_ready(chunk.index)
            .then(|| (b.data.clone(), chunk.uncompressed_offset))
    }

    /// Like [`Self::ready_location`], through a read-only descriptor of the data file: what a DAX map
    /// gives the VMM, so that it can never write into the cache.
    pub fn ready_location_read_only(&self, chunk: &ChunkInfo) -> Option<(Arc<File>, u64)> {
        let b = self.blob(chunk.blob_index)?;
        let file = b
            .data_read_only
            .get_or_init(|| {
                // Through the descriptor, not the name: the name may lead to another file by now.
                let path = format!("/proc/self/fd/{}", b.data.as_raw_fd());
                File::open(&path)
                    .map_err(|e| log::warn!("blob cache: reopen {} read-only: {e}", b.name))
                    .ok()
                    .map(Arc::new)
            })
            .clone()?;
        b.map
            .is_ready(chunk.index)
            .then_some((file, chunk.uncompressed_offset))
    }

    /// The bytes of a ready chunk, or `None` when it is not cached.
    pub fn read(&self, chunk: &ChunkInfo) -> Result<Option<Vec<u8>>> {
        let Some(b) = self.blob(chunk.blob_index) else {
            return Ok(None);
        };
        if !b.map.is_ready(chunk.index) {
            return Ok(None);
        }
        let mut buf = vec![0u8; chunk.uncompressed_size as usize];
        b.data
            .read_exact_at(&mut buf, chunk.uncompressed_offset)
            .map_err(|e| {
                Error::io(
                    format!(
                        "read cache file of blob {} at {}",
                        b.id, chunk.uncompressed_offset
                    ),
                    e,
                )
            })?;
        Ok(Some(buf))
    }

    /// Keep a verified chunk; `digest_checked` says whether its digest was checked against the image's
    /// record (a cache shared by images takes nothing less). Best effort: a failed write turns the cache
    /// off for [`DEGRADED_FOR`] with one warning.
    pub fn store(&self, chunk: &ChunkInfo, data: &[u8], digest_checked: bool) {
        self.store_at(chunk, data, digest_checked, Instant::now())
    }

    fn store_at(&self, chunk: &ChunkInfo, data: &[u8], digest_checked: bool, now: Instant) {
        let Some(b) = self.blob(chunk.blob_index) else {
            return;
        };
        if self.is_degraded_at(now)
            || b.map.is_ready(chunk.index)
            || (b.verified && !digest_checked)
        {
            return;
        }
        if chunk.uncompressed_offset + data.len() as u64 > b.size {
            log::warn!(
                "blob cache: chunk {} of blob {} lies past the blob's uncompressed size",
                chunk.index,
                b.id
            );
            return;
        }
        if !self.has_room(b, data.len() as u64) {
            return;
        }
        // Data first, bit second: the bit is the commit point.
        match b.data.write_all_at(data, chunk.uncompressed_offset) {
            Ok(()) => b.map.set_ready(chunk.index),
            Err(e) => {
                let now = self.millis_at(now);
                let until = now.saturating_add(DEGRADED_FOR.as_millis() as u64);
                // One warning per stretch off: concurrent failures of the same stretch find it set.
                if self.degraded_until.swap(until, Ordering::Relaxed) <= now {
                    log::warn!(
                        "blob cache in {}: write failed ({e}); serving from the backend without caching for {} s",
                        self.work_dir.display(),
                        DEGRADED_FOR.as_secs()
                    );
                }
            }
        }
    }

    /// Whether `len` more bytes in `b`'s data file leave the filesystem's floor free; logs once when the
    /// floor is reached and once when there is room again (a chunk's worth above the floor). A
    /// filesystem that cannot be asked has room (a failed write still turns storing off).
    fn has_room(&self, b: &CachedBlob, len: u64) -> bool {
        let Some((available, size)) = (self.space)(&b.data) else {
            return true;
        };
        let floor = free_space_floor(size);
        let room = leaves_floor(available, size, len);
        if !room && !self.at_floor.swap(true, Ordering::Relaxed) {
            log::warn!(
                "blob cache in {}: {} MiB free of {} MiB, the cache leaves {} MiB to others; serving from the backend without storing until space is freed",
                self.work_dir.display(),
                available >> 20,
                size >> 20,
                floor >> 20
            );
        } else if room
            && available.saturating_sub(len) >= floor.saturating_add(ROOM_AGAIN)
            && self.at_floor.load(Ordering::Relaxed)
            && self.at_floor.swap(false, Ordering::Relaxed)
        {
            log::info!(
                "blob cache in {}: space was freed, storing chunks again",
                self.work_dir.display()
            );
        }
        room
    }

    /// Stores without asking the filesystem for its free space (unit tests, whose disk may be nearly
    /// full).
    #[cfg(test)]
    pub fn without_space_checks(mut self) -> Self {
        self.space = |_| None;
        self
    }

    /// Forget a chunk whose cached bytes failed verification, so the next read fetches it again.
    pub fn invalidate(&self, chunk: &ChunkInfo) {
        if let Some(b) = self.blob(chunk.blob_index) {
            b.map.clear(chunk.index);
        }
    }

    /// The chunks being fetched, once nobody fetches `key` (locked).
    fn unclaimed(&self, key: (u32, u32)) -> std::sync::MutexGuard<'_, HashSet<(u32, u32)>> {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        while inflight.contains(&key) {
            inflight = self
                .inflight_done
                .wait(inflight)
                .unwrap_or_else(|e| e.into_inner());
        }
        inflight
    }

    /// Wait until no other thread fetches `chunk`, then claim it.
    pub fn claim(self: &Arc<Self>, chunk: &ChunkInfo) -> Claim {
        let key = (chunk.blob_index, chunk.index);
        self.unclaimed(key).insert(key);
        Claim {
            cache: self.clone(),
            keys: vec![key],
        }
    }

    /// An empty claim, to be grown with [`BlobCache::try_claim_more`].
    pub fn claim_none(self: &Arc<Self>) -> Claim {
        Claim {
            cache: self.clone(),
            keys: Vec::new(),
        }
    }

    /// A claim on `chunk` alone if nobody is fetching it and it is not cached yet.
    pub fn try_claim(self: &Arc<Self>, chunk: &ChunkInfo) -> Option<Claim> {
        let mut claim = self.claim_none();
        self.try_claim_more(&mut claim, chunk).then_some(claim)
    }

    /// Wait until nobody fetches `chunk` (without claiming it): then it is cached, or its fetch failed.
    pub fn wait_unclaimed(&self, chunk: &ChunkInfo) {
        drop(self.unclaimed((chunk.blob_index, chunk.index)));
    }

    /// Someone is fetching `chunk` right now.
    pub fn is_claimed(&self, chunk: &ChunkInfo) -> bool {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&(chunk.blob_index, chunk.index))
    }

    /// Claim `chunk` too if nobody is fetching it and it is not cached yet; false otherwise.
    pub fn try_claim_more(&self, claim: &mut Claim, chunk: &ChunkInfo) -> bool {
        let key = (chunk.blob_index, chunk.index);
        if self.is_ready(chunk) {
            return false;
        }
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if !inflight.insert(key) {
            return false;
        }
        claim.keys.push(key);
        true
    }

    pub fn mark_complete_blobs(&self) {
        for b in self.blobs.iter().flatten() {
            b.map.mark_all_ready_if_complete();
        }
    }
}

/// Chunks a thread is fetching; released (and waiters woken) on drop.
pub struct Claim {
    cache: Arc<BlobCache>,
    keys: Vec<(u32, u32)>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut inflight = self
            .cache
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for k in &self.keys {
            inflight.remove(k);
        }
        self.cache.inflight_done.notify_all();
    }
}

/// The cache data file of a blob under `key` (the ready bitmap adds `.chunk_map`).
fn data_file_name(blob_id: &str, key: &CacheKey) -> String {
    format!("{blob_id}.{}.blob.data", key.tag)
}

/// Put a new file at `path`, never exposing it half-made: `prepare` sizes and fills it under a temporary
/// name in the same directory, then it is linked to `path` if nothing is there (`Ok(false)` when another
/// process got there first: theirs stays), or with `replace` renamed over whatever is (whoever has the old
/// file open keeps it, unchanged).
fn install(
    path: &Path,
    replace: bool,
    prepare: impl FnOnce(&File) -> std::io::Result<()>,
) -> Result<bool> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(
        ".new.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = PathBuf::from(tmp);
    let made = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|f| prepare(&f));
    let placed = made.and_then(|()| {
        if replace {
            std::fs::rename(&tmp, path).map(|()| true)
        } else {
            match std::fs::hard_link(&tmp, path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            }
        }
    });
    if !(replace && placed.is_ok()) {
        let _ = std::fs::remove_file(&tmp);
    }
    placed.map_err(|e| Error::io(format!("create {}", path.display()), e))
}

fn open_blob(work_dir: &Path, blob: &BlobInfo, key: &CacheKey) -> Result<CachedBlob> {
    if blob.chunk_count == 0 || blob.uncompressed_size == 0 {
        return Err(Error::Invalid(
            "blob table gives no chunk count or uncompressed size".into(),
        ));
    }
    let name = data_file_name(&blob.id, key);
    let path = work_dir.join(&name);
    let map_path = work_dir.join(format!("{name}.chunk_map"));
    let size = blob.uncompressed_size;
    for _ in 0..4 {
        let data = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // The bitmap first: bits left by an older data file of this name must never describe the
                // new one, and whoever finds the new data file finds the new bitmap too.
                ChunkMap::reset(&map_path, blob.chunk_count)?;
                install(&path, false, |f| f.set_len(size))?;
                continue;
            }
            Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
        };
        let meta = data
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        if meta.len() != size {
            // Only tampering makes one: every file of this name is made at this size. Others may have
            // it mapped, so it is replaced, not resized.
            log::warn!(
                "blob cache: {} has {} bytes, not the blob's {size}: replacing it",
                path.display(),
                meta.len()
            );
            ChunkMap::reset(&map_path, blob.chunk_count)?;
            install(&path, true, |f| f.set_len(size))?;
            continue;
        }
        let map = ChunkMap::open(&map_path, blob.chunk_count)?;
        // The name may have been given to a new data file (and a new bitmap) since we opened ours: start
        // over rather than pair our data file with a bitmap made for another.
        let now = std::fs::metadata(&path).ok();
        if now.is_none_or(|m| (m.dev(), m.ino()) != (meta.dev(), meta.ino())) {
            continue;
        }
        return Ok(CachedBlob {
            id: blob.id.clone(),
            name,
            verified: key.verified,
            data: Arc::new(data),
            data_read_only: std::sync::OnceLock::new(),
            map,
            size,
        });
    }
    Err(Error::Invalid(format!(
        "{} keeps being replaced under us",
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(index: u32) -> ChunkInfo {
        ChunkInfo {
            index,
            uncompressed_offset: 4096 * index as u64,
            uncompressed_size: 4096,
            compressed_size: 4096,
            ..ChunkInfo::default()
        }
    }

    /// A cache in `dir` of one blob of `chunks` chunks of `chunk_size` bytes, shared (digests checked).
    fn one_blob(dir: &Path, chunks: u32, chunk_size: u32) -> BlobCache {
        let key = CacheKey {
            tag: "0".repeat(32),
            verified: true,
        };
        BlobCache::open(
            dir,
            &[BlobInfo::raw_for_tests(chunks, chunk_size)],
            &[Some(key)],
        )
        .unwrap()
    }

    /// A failed write turns storing off for a while, not for the mount's life: a co-tenant that filled
    /// the disk once must not leave every other mount uncached after the space is freed.
    #[test]
    fn a_failed_write_turns_storing_off_for_a_while_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = one_blob(dir.path(), 4, 4096).without_space_checks();
        let data = vec![7u8; 4096];
        let writable = cache.blobs[0].as_ref().unwrap().data.clone();
        // A descriptor that cannot write stands for a full disk.
        let path = dir.path().join(&cache.blobs[0].as_ref().unwrap().name);
        cache.blobs[0].as_mut().unwrap().data = Arc::new(File::open(&path).unwrap());
        let failed_at = Instant::now();
        cache.store_at(&chunk(0), &data, true, failed_at);
        assert!(!cache.is_ready(&chunk(0)) && cache.is_degraded_at(failed_at));

        // The space is back; within the period nothing is stored, after it storing resumes.
        cache.blobs[0].as_mut().unwrap().data = writable;
        let soon = failed_at + Duration::from_secs(1);
        cache.store_at(&chunk(1), &data, true, soon);
        assert!(!cache.is_ready(&chunk(1)) && cache.is_degraded_at(soon));
        let later = failed_at + DEGRADED_FOR + Duration::from_millis(1);
        assert!(!cache.is_degraded_at(later));
        cache.store_at(&chunk(1), &data, true, later);
        assert!(cache.is_ready(&chunk(1)));
        assert_eq!(cache.read(&chunk(1)).unwrap(), Some(data));
    }

    /// Free space of the fake filesystem of [`near_the_floor_chunks_of_any_size_keep_the_cache_at_it`].
    static FREE: AtomicU64 = AtomicU64::new(0);

    /// Near the floor, a large chunk is refused and a small one still fits: the cache stays "at the
    /// floor" (one warning) until the space is a chunk's worth above it.
    #[test]
    fn near_the_floor_chunks_of_any_size_keep_the_cache_at_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = one_blob(dir.path(), 8, 1 << 20);
        // A 1 GiB filesystem: the floor is 51.2 MiB.
        cache.space = |_| Some((FREE.load(Ordering::Relaxed), 1 << 30));
        let big = |index| ChunkInfo {
            uncompressed_size: 1 << 20,
            compressed_size: 1 << 20,
            uncompressed_offset: (1 << 20) * index as u64,
            index,
            ..ChunkInfo::default()
        };
        FREE.store(52 << 20, Ordering::Relaxed);
        cache.store(&big(0), &vec![1u8; 1 << 20], true);
        assert!(!cache.is_ready(&big(0)) && cache.at_floor.load(Ordering::Relaxed));
        let small = ChunkInfo {
            uncompressed_size: 4096,
            ..big(4)
        };
        cache.store(&small, &[2u8; 4096], true);
        assert!(cache.is_ready(&small), "a small chunk fits");
        assert!(cache.at_floor.load(Ordering::Relaxed), "still at the floor");
        FREE.store(80 << 20, Ordering::Relaxed);
        cache.store(&big(1), &vec![3u8; 1 << 20], true);
        assert!(cache.is_ready(&big(1)) && !cache.at_floor.load(Ordering::Relaxed));
    }

    #[test]
    fn the_floor_is_five_percent_of_the_filesystem_and_at_most_two_gib() {
        assert_eq!(free_space_floor(1 << 20), (1 << 20) / 20);
        assert_eq!(free_space_floor(10 << 30), (10 << 30) / 20);
        assert_eq!(free_space_floor(1 << 40), MAX_FREE_SPACE_FLOOR);
        assert!(leaves_floor(100 << 20, 1 << 30, 1 << 20));
        // 1 GiB: floor 51.2 MiB; 52 MiB free takes a 0.5 MiB chunk, not a 1 MiB one.
        assert!(leaves_floor(52 << 20, 1 << 30, 512 << 10));
        assert!(!leaves_floor(52 << 20, 1 << 30, 1 << 20));
        assert!(!leaves_floor(0, 1 << 30, 4096));
    }
}
