//! The local blob cache (`blobcache` / `filecache`): each blob's chunks, uncompressed, at their
//! uncompressed offsets in `<work_dir>/<blob id>.blob.data`, with a persistent ready-bitmap beside it.
//! The cache survives restarts and can be shared with nydusd.
//!
//! The cache is an optimisation, never a requirement: a cache that cannot be created or written (full or
//! read-only disk) is logged once and reads go to the backend.

pub mod chunk_map;
pub mod prefetch;

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use chunk_map::ChunkMap;

use crate::error::{Error, Result};
use crate::format::{BlobInfo, ChunkInfo};

struct CachedBlob {
    id: String,
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
    /// Set after the first failed write: we stop writing and serve from the backend.
    degraded: AtomicBool,
    /// Chunks some thread is fetching right now, so others wait instead of fetching twice.
    inflight: Mutex<HashSet<(u32, u32)>>,
    inflight_done: Condvar,
    pub metrics: CacheMetrics,
}

impl BlobCache {
    /// Open (or create) the cache files of `blobs` under `work_dir`.
    pub fn open(work_dir: &Path, blobs: &[BlobInfo]) -> Result<Self> {
        std::fs::create_dir_all(work_dir)
            .map_err(|e| Error::io(format!("create cache dir {}", work_dir.display()), e))?;
        let mut slots = Vec::with_capacity(blobs.len());
        for blob in blobs {
            match open_blob(work_dir, blob) {
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
            degraded: AtomicBool::new(false),
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
            .map(|b| data_file_name(&b.id))
            .collect()
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
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
                let path = self.work_dir.join(data_file_name(&b.id));
                File::open(&path)
                    .map_err(|e| log::warn!("blob cache: reopen {} read-only: {e}", path.display()))
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

    /// Keep a verified chunk. Best effort: a failed write turns the cache off with one warning.
    pub fn store(&self, chunk: &ChunkInfo, data: &[u8]) {
        let Some(b) = self.blob(chunk.blob_index) else {
            return;
        };
        if self.is_degraded() || b.map.is_ready(chunk.index) {
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
        // Data first, bit second: the bit is the commit point.
        match b.data.write_all_at(data, chunk.uncompressed_offset) {
            Ok(()) => b.map.set_ready(chunk.index),
            Err(e) => {
                if !self.degraded.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "blob cache in {}: write failed ({e}); serving from the backend without caching",
                        self.work_dir.display()
                    );
                }
            }
        }
    }

    /// Forget a chunk whose cached bytes failed verification, so the next read fetches it again.
    pub fn invalidate(&self, chunk: &ChunkInfo) {
        if let Some(b) = self.blob(chunk.blob_index) {
            b.map.clear(chunk.index);
        }
    }

    /// Wait until no other thread fetches `chunk`, then claim it.
    pub fn claim(self: &Arc<Self>, chunk: &ChunkInfo) -> Claim {
        let key = (chunk.blob_index, chunk.index);
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        while inflight.contains(&key) {
            inflight = self
                .inflight_done
                .wait(inflight)
                .unwrap_or_else(|e| e.into_inner());
        }
        inflight.insert(key);
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

/// The cache data file of a blob, as nydusd names it (the ready bitmap adds `.chunk_map`).
fn data_file_name(blob_id: &str) -> String {
    format!("{blob_id}.blob.data")
}

fn open_blob(work_dir: &Path, blob: &BlobInfo) -> Result<CachedBlob> {
    if blob.chunk_count == 0 || blob.uncompressed_size == 0 {
        return Err(Error::Invalid(
            "blob table gives no chunk count or uncompressed size".into(),
        ));
    }
    let path = work_dir.join(data_file_name(&blob.id));
    let data = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let len = data
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
        .len();
    let map = ChunkMap::open(
        &work_dir.join(format!("{}.chunk_map", data_file_name(&blob.id))),
        blob.chunk_count,
    )?;
    if len != blob.uncompressed_size {
        // A data file of another size cannot hold what the bitmap claims.
        for i in 0..blob.chunk_count {
            map.clear(i);
        }
        data.set_len(blob.uncompressed_size)
            .map_err(|e| Error::io(format!("size {}", path.display()), e))?;
    }
    Ok(CachedBlob {
        id: blob.id.clone(),
        data: Arc::new(data),
        data_read_only: std::sync::OnceLock::new(),
        map,
        size: blob.uncompressed_size,
    })
}
