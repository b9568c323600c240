//! A RAFS image opened for reading: the bootstrap's metadata (v5 or v6) joined with a blob backend.
//!
//! This is the read path every front end shares: file range → chunks → blob ranges → decompress →
//! verify (CRC always when recorded, digest when validation is on, for v5 and v6 alike) → bytes.
//!
//! This file is the facade: opening an image, its metadata calls and the tree walk. The read path lives
//! in the submodules, one concern each: `lookup` (a chunk address to the chunk the image records),
//! `chunk_info` (v6 blobs' chunk-info arrays, loaded once), `reader` (file reads, the cache, backend
//! fetches, prefetch), `predict` (which chunks to fetch with a miss), `stream` (runs of chunks in one
//! request), `speculate` (the budget for fetching past nearby misses), `verify` (a chunk's bytes decoded
//! and checked), `demand` (what user reads asked for) and `inline` (metadata from a bootstrap or an
//! inline-meta blob).

mod chunk_info;
mod demand;
mod failures;
mod inline;
mod lookup;
mod predict;
mod reader;
mod siblings;
mod speculate;
mod stream;
mod verify;

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crate::cache::key::cache_keys;
use crate::cache::BlobCache;
use crate::corrupt;
use crate::error::Result;
use crate::format::{v5, v6, DirEntry, InodeAttr, MetaBytes, MetaReader, SuperInfo};
use crate::storage::localfs::LocalFs;
use crate::storage::metrics::{BackendMetrics, Metered};
use crate::storage::BlobBackend;
use chunk_info::BlobMetaSlot;
pub use chunk_info::FAILED_LOAD_RETRY_AFTER;
use demand::Demand;
pub use demand::DemandSummary;
pub use inline::load_metadata;
use reader::DecodedBatch;
use stream::Streams;

#[derive(Debug, Clone, Default)]
pub struct ImageOptions {
    /// Verify every chunk's digest after decompression (`digest_validate` / `cache.validate`).
    pub validate: bool,
    /// Keep fetched chunks, uncompressed, in this directory (`blobcache` work_dir).
    pub cache_dir: Option<PathBuf>,
    /// Fetch the chunks a read predicts (the rest of a file read front to back, the prefetch table's files)
    /// with the one it misses, in one streamed request; 0 turns that off. Any other value enables it: the
    /// size of such a run follows the link's rate, not this number.
    pub amplify_io: u64,
    /// Where the blobs come from (backend type and location, no credentials): part of the cache key of
    /// images whose chunks carry no digest (see [`crate::cache::key`]). Empty: such images are not cached.
    pub backend_location: String,
    /// Keep the set of chunks user reads asked for ([`RafsImage::demand`]; the config's `access_pattern`).
    pub record_demand: bool,
}

/// A piece of a file read, handed to the reader's sink as it is produced.
pub enum Segment<'a> {
    /// `len` bytes at `offset` of a cache file: a chunk whose digest was checked when it was stored, to be
    /// copied straight from the file.
    Cached {
        file: &'a File,
        offset: u64,
        len: usize,
    },
    /// Verified bytes of a chunk.
    Bytes(&'a [u8]),
    /// A hole.
    Zeros(usize),
}

impl Segment<'_> {
    pub fn len(&self) -> usize {
        match self {
            Segment::Cached { len, .. } => *len,
            Segment::Bytes(b) => b.len(),
            Segment::Zeros(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the metadata came from: a bootstrap file, or the tail of an inline-meta data blob.
#[derive(Debug, Clone)]
pub enum MetaSource {
    Bootstrap(PathBuf),
    InlineBlob { path: PathBuf, blob_id: String },
}

/// The prefetch head (`cache::prefetch`: the first bytes of the chosen files, fetched first in one
/// request) while it is planned or fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefetchHead {
    None,
    /// Being planned from the image's prefetch table, where it lies is not known yet: the table's
    /// chunks are left to it.
    PlanningTable,
    /// Planned or being fetched: compressed bytes `start..end` of blob `blob`.
    Range {
        blob: u32,
        start: u64,
        end: u64,
    },
}

pub struct RafsImage {
    meta: Box<dyn MetaReader>,
    source: MetaSource,
    backend: Arc<dyn BlobBackend>,
    validate: bool,
    /// One per blob: its decoded chunk-info array (v6).
    blob_meta: Vec<BlobMetaSlot>,
    /// The last decompressed batch: small files of one batch are usually read one after another.
    last_batch: Mutex<Option<DecodedBatch>>,
    cache: Option<Arc<BlobCache>>,
    amplify_io: u64,
    user_reads: AtomicUsize,
    /// Blobs whose data requests found no answer lately (`failures`).
    failures: failures::BlobFailures,
    /// Every read of the backend (`backend` counts into it).
    backend_metrics: Arc<BackendMetrics>,
    demand: Option<Demand>,
    /// Runs of predicted chunks being stored in the background.
    streams: Streams,
    /// The chunks of the files in the image's prefetch table, computed on the first miss (`None`: no
    /// table, or too many chunks to index).
    prefetch_chunks: OnceLock<Option<HashSet<(u32, u32)>>>,
    /// The prefetch head while it is planned or fetched (`cache::prefetch`): a miss on one of its chunks
    /// fetches only that chunk, and no predicted run reaches into it, so the head's one request does not
    /// share the link with runs of the same bytes.
    prefetch_head: Mutex<PrefetchHead>,
    /// Misses near each other, and the bytes fetched past them on that guess.
    speculation: speculate::Speculation,
    /// Which files lie in which directory, and the directories being read file after file.
    siblings: siblings::Siblings,
}

impl RafsImage {
    /// Open `path` (a bootstrap, or a data blob with inlined metadata) over `backend`.
    pub fn open(path: &Path, backend: Arc<dyn BlobBackend>, opts: ImageOptions) -> Result<Self> {
        let (bytes, source) = load_metadata(path)?;
        Self::from_metadata(bytes, source, backend, opts)
    }

    /// Build an image from bootstrap bytes already in memory (used by the fuzz target and by embedders
    /// that fetch metadata themselves). Nothing is asked of the backend: blobs are first read when a
    /// read needs them.
    pub fn from_metadata(
        bytes: MetaBytes,
        source: MetaSource,
        backend: Arc<dyn BlobBackend>,
        opts: ImageOptions,
    ) -> Result<Self> {
        let inline_id = match &source {
            MetaSource::InlineBlob { blob_id, .. } => Some(blob_id.as_str()),
            MetaSource::Bootstrap(_) => None,
        };
        let path = match &source {
            MetaSource::Bootstrap(p) | MetaSource::InlineBlob { path: p, .. } => p.clone(),
        };
        let meta: Box<dyn MetaReader> = if v5::detect(&bytes) {
            Box::new(v5::V5Meta::parse(bytes)?)
        } else if v6::detect(&bytes) {
            Box::new(v6::V6Meta::parse(bytes, inline_id)?)
        } else {
            return Err(corrupt!(
                "{}: neither a RAFS v5 nor a RAFS v6 bootstrap",
                path.display()
            ));
        };
        let backend_metrics = Arc::new(BackendMetrics::default());
        let backend: Arc<dyn BlobBackend> =
            Arc::new(Metered::new(backend, backend_metrics.clone()));
        let nblobs = meta.info().blobs.len();
        let cache = match &opts.cache_dir {
            Some(dir) => {
                // An image the cache could not trust is refused, not served uncached.
                let started = Instant::now();
                let keys = cache_keys(meta.as_ref(), &opts.backend_location)?;
                log::info!(
                    "blob cache: keys of {nblobs} blobs computed in {:?}",
                    started.elapsed()
                );
                match BlobCache::open(dir, &meta.info().blobs, &keys) {
                    Ok(c) => Some(Arc::new(c)),
                    Err(e) => {
                        log::warn!(
                            "blob cache unavailable ({e}); reading every chunk from the backend"
                        );
                        None
                    }
                }
            }
            None => None,
        };
        Ok(RafsImage {
            meta,
            source,
            backend,
            validate: opts.validate,
            blob_meta: (0..nblobs).map(|_| BlobMetaSlot::default()).collect(),
            last_batch: Mutex::new(None),
            cache,
            amplify_io: opts.amplify_io,
            user_reads: AtomicUsize::new(0),
            failures: failures::BlobFailures::new(nblobs),
            backend_metrics,
            demand: opts.record_demand.then(|| Demand {
                blobs: (0..nblobs).map(|_| Mutex::new(Vec::new())).collect(),
                recorded_bytes: AtomicU64::new(0),
            }),
            streams: Streams::new(nblobs),
            prefetch_chunks: OnceLock::new(),
            prefetch_head: Mutex::new(PrefetchHead::None),
            speculation: speculate::Speculation::new(nblobs),
            siblings: siblings::Siblings::default(),
        })
    }

    /// Open with a localfs backend over `blob_dir`; without one, blobs are looked for beside an inline-meta
    /// blob, or in `<bootstrap dir>/blobs` and the bootstrap's own directory.
    pub fn open_local(path: &Path, blob_dir: Option<&Path>, opts: ImageOptions) -> Result<Self> {
        let parent = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let backend = match blob_dir {
            Some(dir) => LocalFs::with_dir(dir),
            None => LocalFs::new(Some(parent.join("blobs")), vec![parent], None)?,
        };
        Self::open(path, Arc::new(backend), opts)
    }

    pub fn info(&self) -> &SuperInfo {
        self.meta.info()
    }

    pub fn source(&self) -> &MetaSource {
        &self.source
    }

    pub fn meta(&self) -> &dyn MetaReader {
        self.meta.as_ref()
    }

    pub fn root_ino(&self) -> u64 {
        self.info().root_ino
    }

    pub fn inode(&self, ino: u64) -> Result<InodeAttr> {
        self.meta.inode(ino)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<u64>> {
        self.meta.lookup(&self.meta.inode(parent)?, name)
    }

    /// Regular file `child` was named in directory `parent` (a LOOKUP or a READDIRPLUS entry): a directory
    /// read file after file has its other files fetched with a miss (see the README's read path).
    pub fn note_parent(&self, child: u64, parent: u64) {
        self.siblings.note_parent(child, parent);
    }

    pub fn read_dir(
        &self,
        dir: u64,
        offset: u64,
        f: &mut dyn FnMut(DirEntry) -> Result<bool>,
    ) -> Result<()> {
        self.meta.read_dir(&self.meta.inode(dir)?, offset, f)
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        self.meta.readlink(&self.meta.inode(ino)?)
    }

    pub fn xattrs(&self, ino: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.meta.xattrs(&self.meta.inode(ino)?)
    }

    /// Visit every entry below the root, depth first, parents before children. Directories are also
    /// reported after their contents (`WalkEvent::DirDone`), which is when their mtime can be set.
    /// A directory reached twice (a cycle in a hostile image) is an error, not an endless walk.
    pub fn walk(
        &self,
        visit: &mut dyn FnMut(&Path, &InodeAttr, WalkEvent) -> Result<()>,
    ) -> Result<()> {
        use std::os::unix::ffi::OsStrExt;
        // One path for the whole walk, each directory's frame remembering its length: a path per
        // frame made the walk's memory quadratic in the depth.
        struct Frame {
            path_len: usize,
            attr: InodeAttr,
            entries: std::vec::IntoIter<DirEntry>,
        }
        fn as_path(bytes: &[u8]) -> &Path {
            Path::new(std::ffi::OsStr::from_bytes(bytes))
        }
        let root = self.inode(self.root_ino())?;
        let mut seen_dirs = HashSet::from([root.ino]);
        visit(Path::new(""), &root, WalkEvent::Node)?;
        let mut path: Vec<u8> = Vec::new();
        let mut stack = vec![Frame {
            path_len: 0,
            entries: self.list_dir(&root)?.into_iter(),
            attr: root,
        }];
        while let Some(frame) = stack.last_mut() {
            let Some(entry) = frame.entries.next() else {
                let done = stack.pop().unwrap();
                path.truncate(done.path_len);
                visit(as_path(&path), &done.attr, WalkEvent::DirDone)?;
                continue;
            };
            path.truncate(frame.path_len);
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&entry.name);
            let attr = self.inode(entry.ino)?;
            visit(as_path(&path), &attr, WalkEvent::Node)?;
            if attr.is_dir() {
                if !seen_dirs.insert(attr.ino) {
                    return Err(corrupt!(
                        "directory inode {} is reached a second time at {} (a cycle)",
                        attr.ino,
                        as_path(&path).display()
                    ));
                }
                let entries = self.list_dir(&attr)?.into_iter();
                stack.push(Frame {
                    path_len: path.len(),
                    attr,
                    entries,
                });
            }
        }
        Ok(())
    }

    fn list_dir(&self, dir: &InodeAttr) -> Result<Vec<DirEntry>> {
        let mut entries = Vec::new();
        self.meta.read_dir(dir, 0, &mut |e| {
            entries.push(e);
            Ok(true)
        })?;
        Ok(entries)
    }

    /// Reads from users in progress; prefetch workers yield while this is non-zero.
    pub fn user_reads_in_flight(&self) -> usize {
        self.user_reads.load(Ordering::Relaxed)
    }

    /// When a data request of blob `index` may go to the backend without failing at once (None: now),
    /// after one that found no answer (`failures`). Prefetch waits for it rather than failing its runs.
    pub fn blob_retry_at(&self, index: u32) -> Option<std::time::Instant> {
        self.failures.retry_at(index)
    }

    /// Whether blob `index`'s last data request found no answer (`failures`).
    pub fn blob_failing(&self, index: u32) -> bool {
        self.failures.is_failing(index)
    }

    /// The prefetch head the prefetcher plans or fetches (misses leave its chunks to it).
    pub(crate) fn set_prefetch_head(&self, head: PrefetchHead) {
        *self.prefetch_head.lock().unwrap_or_else(|e| e.into_inner()) = head;
    }

    /// The prefetch head planned or being fetched, if any.
    pub fn prefetch_head(&self) -> PrefetchHead {
        *self.prefetch_head.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the image's blobs come from.
    pub fn backend(&self) -> &Arc<dyn BlobBackend> {
        &self.backend
    }

    pub fn cache(&self) -> Option<&Arc<BlobCache>> {
        self.cache.as_ref()
    }

    /// Backend reads of this image, and the backend's type.
    pub fn backend_metrics(&self) -> (&BackendMetrics, &'static str) {
        (&self.backend_metrics, self.backend.kind())
    }

    /// Compressed bytes of the chunks reads missed (as far as they could start a run), and of those
    /// fetched past such misses on speculation (see the README's read path).
    pub fn speculation(&self) -> (u64, u64) {
        self.speculation.totals()
    }

    pub fn validates(&self) -> bool {
        self.validate
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkEvent {
    Node,
    DirDone,
}
