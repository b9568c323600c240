//! A RAFS image opened for reading: the bootstrap's metadata (v5 or v6) joined with a blob backend.
//!
//! This is the read path every front end shares: file range → chunks → blob ranges → decompress →
//! verify (CRC always when recorded, digest when validation is on, for v5 and v6 alike) → bytes.

mod speculate;
mod stream;

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::cache::key::cache_keys;
use crate::cache::BlobCache;
use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::blob_meta::ChunkInfoArray;
use crate::format::toc::{self, TarHeader, TAR_HEADER_SIZE};
use crate::format::{
    v5, v6, BlobInfo, ChunkAddr, ChunkInfo, DirEntry, InodeAttr, MetaBytes, MetaReader, SuperInfo,
};
use crate::storage::digest::{crc32c, digest, hex};
use crate::storage::localfs::LocalFs;
use crate::storage::metrics::{BackendMetrics, Metered};
use crate::storage::{compress, BlobBackend};
use stream::{Pending, StreamCtx, Streams};

/// Largest bootstrap we extract from an inline-meta blob into memory.
const MAX_INLINE_BOOTSTRAP: u64 = 1 << 30;

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

/// The chunks user reads asked for (not what amplification or prefetch added), one bit per chunk of each
/// blob, grown up to the highest chunk read (at most 2^24 bits per blob): what a program needed from an
/// image, to compare with what was fetched.
struct Demand {
    blobs: Vec<Mutex<Vec<u64>>>,
    /// Compressed bytes of the chunks whose records carry their size (v5); v6 sizes are looked up when
    /// asked ([`RafsImage::demand`]).
    recorded_bytes: AtomicU64,
}

impl Demand {
    /// Mark a chunk; true the first time.
    fn mark(&self, blob: u32, index: u32) -> bool {
        let Some(bits) = self.blobs.get(blob as usize) else {
            return false;
        };
        let mut bits = bits.lock().unwrap_or_else(|e| e.into_inner());
        let word = index as usize / 64;
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        let mask = 1u64 << (index % 64);
        let first = bits[word] & mask == 0;
        bits[word] |= mask;
        first
    }
}

/// What user reads of an image asked for: distinct chunks and, when every blob's chunk sizes are known
/// without the network, their compressed size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemandSummary {
    pub chunks: u64,
    pub compressed_bytes: Option<u64>,
}

/// Counts a user read for as long as it lives.
struct UserRead<'a>(&'a AtomicUsize);

impl<'a> UserRead<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        UserRead(counter)
    }
}

impl Drop for UserRead<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where the metadata came from: a bootstrap file, or the tail of an inline-meta data blob.
#[derive(Debug, Clone)]
pub enum MetaSource {
    Bootstrap(PathBuf),
    InlineBlob { path: PathBuf, blob_id: String },
}

/// (blob index, batch index, decompressed batch).
type DecodedBatch = (u32, u32, Arc<Vec<u8>>);

/// How long a failed chunk-info array load is remembered: readers of that blob get the error at once for
/// this long, then the next reader loads it again. About one backend request timeout (5 s by default): an
/// unreachable layer does not cost every reader a full round of retries, and a backend that recovers is
/// used again within seconds.
pub const FAILED_LOAD_RETRY_AFTER: Duration = Duration::from_secs(5);

/// The chunk-info array of one v6 blob, loaded on first use by one reader while the others of that blob
/// wait for it (readers of other blobs are not held up: no lock is kept across backend I/O).
#[derive(Default)]
struct BlobMetaSlot {
    state: Mutex<LoadState>,
    done: Condvar,
}

#[derive(Default)]
enum LoadState {
    #[default]
    Idle,
    Loading,
    Ready(Arc<ChunkInfoArray>),
    Failed {
        at: Instant,
        error: Error,
    },
}

/// Puts a slot back to `Idle` if its loader unwinds, so waiters do not wait forever.
struct Loading<'a>(Option<&'a BlobMetaSlot>);

impl Loading<'_> {
    fn finish(mut self, state: LoadState) {
        if let Some(slot) = self.0.take() {
            *slot.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
            slot.done.notify_all();
        }
    }
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            *slot.state.lock().unwrap_or_else(|e| e.into_inner()) = LoadState::Idle;
            slot.done.notify_all();
        }
    }
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
    /// Every read of the backend (`backend` counts into it).
    backend_metrics: Arc<BackendMetrics>,
    demand: Option<Demand>,
    /// Runs of predicted chunks being stored in the background.
    streams: Streams,
    /// The chunks of the files in the image's prefetch table, computed on the first miss (`None`: no
    /// table, or too many chunks to index).
    prefetch_chunks: OnceLock<Option<HashSet<(u32, u32)>>>,
    /// Misses near each other, and the bytes fetched past them on that guess.
    speculation: speculate::Speculation,
}

/// Most chunks [`RafsImage`] indexes for its prefetch table (16 bytes each in a set).
const MAX_PREFETCH_CHUNKS: usize = 1 << 20;

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
            backend_metrics,
            demand: opts.record_demand.then(|| Demand {
                blobs: (0..nblobs).map(|_| Mutex::new(Vec::new())).collect(),
                recorded_bytes: AtomicU64::new(0),
            }),
            streams: Streams::default(),
            prefetch_chunks: OnceLock::new(),
            speculation: speculate::Speculation::new(nblobs),
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

    /// Produce `[offset, offset + size)` of a regular file into `sink`, piece by piece as each chunk is
    /// ready: ranges of cache files (when validation is off), verified chunk bytes, zeros for holes. One
    /// chunk is held at a time, whatever `size` says; callers bound `size` by what they can take. Returns
    /// the bytes produced (fewer than `size` only at end of file).
    pub fn read_with(
        &self,
        ino: u64,
        offset: u64,
        size: usize,
        sink: &mut dyn FnMut(Segment<'_>) -> Result<()>,
    ) -> Result<usize> {
        let _user = UserRead::enter(&self.user_reads);
        let inode = self.meta.inode(ino)?;
        if !inode.is_reg() {
            return Err(Error::Invalid(format!("inode {ino} is not a regular file")));
        }
        if offset >= inode.size || size == 0 {
            return Ok(0);
        }
        let end = offset + (size as u64).min(inode.size - offset);
        let mut pos = offset;
        for (file_offset, addr) in self.meta.file_chunks(&inode, offset, end - offset)? {
            let info = self.file_chunk(&inode, file_offset, &addr)?;
            let from = pos.max(file_offset);
            let to = end.min(file_offset + info.uncompressed_size as u64);
            if from >= to {
                continue;
            }
            if from > pos {
                sink(Segment::Zeros((from - pos) as usize))?;
            }
            let inner = (from - file_offset) as usize;
            let len = (to - from) as usize;
            if let Some(d) = &self.demand {
                // v5 records carry the compressed size; v6 sizes are looked up when asked.
                if d.mark(info.blob_index, info.index) && self.info().version != 6 {
                    d.recorded_bytes
                        .fetch_add(info.compressed_size as u64, Ordering::Relaxed);
                }
            }
            let cached = if self.validate {
                None
            } else {
                self.cache.as_ref().and_then(|c| c.ready_location(&info))
            };
            match cached {
                Some((file, chunk_offset)) => {
                    self.count_hit();
                    sink(Segment::Cached {
                        file: &file,
                        offset: chunk_offset + inner as u64,
                        len,
                    })?;
                }
                None => {
                    // Followers only for a miss (with validation on, hits come this way too).
                    let follow = match &self.cache {
                        Some(cache) if self.amplify_io > 0 && !cache.is_ready(&info) => {
                            self.sequential_followers(cache, &inode, file_offset)
                        }
                        _ => Vec::new(),
                    };
                    let data = self.chunk_data_with(&info, &follow).map_err(|e| match e {
                        Error::Integrity(m) => Error::Integrity(format!(
                            "inode {ino} at file offset {file_offset}: {m}"
                        )),
                        other => other,
                    })?;
                    sink(Segment::Bytes(&data[inner..inner + len]))?;
                }
            }
            pos = to;
        }
        if pos < end {
            sink(Segment::Zeros((end - pos) as usize))?;
        }
        Ok((end - offset) as usize)
    }

    /// Read file data at `offset` into `buf`; returns the bytes read (short only at end of file).
    pub fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        self.read_with(ino, offset, buf.len(), &mut |segment| {
            let dst = &mut buf[done..done + segment.len()];
            match segment {
                Segment::Cached { file, offset, .. } => file
                    .read_exact_at(dst, offset)
                    .map_err(|e| Error::io("read blob cache", e))?,
                Segment::Bytes(data) => dst.copy_from_slice(data),
                Segment::Zeros(_) => dst.fill(0),
            }
            done += dst.len();
            Ok(())
        })
    }

    /// The chunk at `file_offset` of a regular file, as the image records it. A v6 chunk holds exactly the
    /// bytes the file needs there (a whole chunk, or the file's tail).
    fn file_chunk(
        &self,
        inode: &InodeAttr,
        file_offset: u64,
        addr: &ChunkAddr,
    ) -> Result<ChunkInfo> {
        let need = (self.info().version == 6)
            .then(|| (self.info().chunk_size as u64).min(inode.size - file_offset) as u32);
        self.expected(addr, need)
    }

    /// The chunk a chunk address names, as the image's own records describe it: blob, CI index,
    /// uncompressed offset and size, digest and CRC. Enough to find it in the cache and to check its
    /// bytes; `locate` adds where it is stored in the blob. v5 chunk records say it all. For v6
    /// the offset is the inode's block address and the rest comes from the bootstrap's chunk table, so a
    /// cache hit needs nothing from the blob; without a chunk table row, the size is `need` (what the
    /// file needs) or, without that, the blob's chunk-info array says it. A v6 chunk must hold exactly
    /// `need` bytes.
    fn expected(&self, addr: &ChunkAddr, need: Option<u32>) -> Result<ChunkInfo> {
        let (blob_index, ci_index, blk_addr) = match addr {
            ChunkAddr::Full(info) => {
                self.check_extent(info)?;
                return Ok(info.clone());
            }
            ChunkAddr::Indexed {
                blob_index,
                ci_index,
                blk_addr,
            } => (*blob_index, *ci_index, *blk_addr),
        };
        let offset = blk_addr as u64 * self.info().block_size as u64;
        let info = match (self.meta.chunk_table_entry(blob_index, ci_index)?, need) {
            (Some(row), need) => {
                if row.uncompressed_offset != offset {
                    return Err(corrupt!(
                        "blob {} chunk {ci_index}: the inode says block {blk_addr}, the chunk table says \
                         offset {}",
                        self.blob_id(blob_index),
                        row.uncompressed_offset
                    ));
                }
                if let Some(need) = need.filter(|&n| n != row.uncompressed_size) {
                    return Err(corrupt!(
                        "blob {} chunk {ci_index}: the chunk table says {} bytes, the file needs {need}",
                        self.blob_id(blob_index),
                        row.uncompressed_size
                    ));
                }
                ChunkInfo {
                    blob_index,
                    index: ci_index,
                    uncompressed_offset: offset,
                    uncompressed_size: row.uncompressed_size,
                    digest: row.digest,
                    crc32: row.crc32,
                    ..Default::default()
                }
            }
            (None, Some(size)) => ChunkInfo {
                blob_index,
                index: ci_index,
                uncompressed_offset: offset,
                uncompressed_size: size,
                ..Default::default()
            },
            (None, None) => self.resolve_ci(blob_index, ci_index)?,
        };
        if info.uncompressed_offset != offset {
            return Err(corrupt!(
                "blob {} chunk {ci_index}: the inode says block {blk_addr}, the blob meta says offset {}",
                self.blob_id(blob_index),
                info.uncompressed_offset
            ));
        }
        self.check_extent(&info)?;
        Ok(info)
    }

    /// The chunk a chunk address names, as the image's own records describe it (index, uncompressed offset
    /// and size, digest, CRC): enough to find it in the cache. For v6 where it is stored in the blob is
    /// left out (unless the bootstrap has no chunk table): [`Self::chunk_data`] looks that up when it must
    /// fetch the chunk, so cache hits need nothing from the blob.
    pub fn resolve(&self, addr: &ChunkAddr) -> Result<ChunkInfo> {
        self.expected(addr, None)
    }

    /// `info` (as the image records it) with where its bytes are stored in the blob: v6 reads the blob's
    /// chunk-info array, which must agree with the image on the chunk's uncompressed offset and size.
    fn locate(&self, info: &ChunkInfo) -> Result<ChunkInfo> {
        if self.info().version != 6 {
            return Ok(info.clone());
        }
        let located = self.chunk_info_array(info.blob_index)?.get(info.index)?;
        self.join(located, info, "the bootstrap")
    }

    /// A chunk-info array entry joined with the image's own record of that chunk (`record`, from `source`):
    /// both must place it at the same uncompressed offset and size; the digest comes from the record, and
    /// the record's CRC is preferred.
    fn join(&self, mut located: ChunkInfo, record: &ChunkInfo, source: &str) -> Result<ChunkInfo> {
        if (located.uncompressed_offset, located.uncompressed_size)
            != (record.uncompressed_offset, record.uncompressed_size)
        {
            return Err(corrupt!(
                "blob {} chunk {}: {source} says {}+{}, the blob meta says {}+{}",
                self.blob_id(located.blob_index),
                located.index,
                record.uncompressed_offset,
                record.uncompressed_size,
                located.uncompressed_offset,
                located.uncompressed_size
            ));
        }
        located.digest = record.digest;
        located.crc32 = record.crc32.or(located.crc32);
        self.check_extent(&located)?;
        Ok(located)
    }

    fn blob_id(&self, blob_index: u32) -> &str {
        self.info()
            .blobs
            .get(blob_index as usize)
            .map_or("?", |b| &b.id)
    }

    /// Chunk `ci_index` of v6 blob `blob_index`, checked like a chunk a file names (the blob view reads
    /// blobs by chunk, not by file).
    pub fn blob_chunk(&self, blob_index: u32, ci_index: u32) -> Result<ChunkInfo> {
        self.resolve_ci(blob_index, ci_index)
    }

    /// Chunk `ci_index` of v6 blob `blob_index`: location from the blob meta, digest and CRC from the
    /// bootstrap's chunk table, whose offset and size the blob meta must agree with.
    fn resolve_ci(&self, blob_index: u32, ci_index: u32) -> Result<ChunkInfo> {
        let info = self.chunk_info_array(blob_index)?.get(ci_index)?;
        match self.meta.chunk_table_entry(blob_index, ci_index)? {
            Some(row) => self.join(info, &row, "the chunk table"),
            None => {
                self.check_extent(&info)?;
                Ok(info)
            }
        }
    }

    /// A chunk must fit its blob: it becomes a cache-file offset and a backend read size.
    fn check_extent(&self, info: &ChunkInfo) -> Result<()> {
        let blob = self
            .info()
            .blobs
            .get(info.blob_index as usize)
            .ok_or_else(|| corrupt!("chunk names blob {} which does not exist", info.blob_index))?;
        let limit = blob.chunk_size.max(self.info().chunk_size);
        if info.uncompressed_size > limit || info.compressed_size > limit {
            return Err(corrupt!(
                "blob {} chunk {}: sizes {}/{} exceed the chunk size {limit}",
                blob.id,
                info.index,
                info.compressed_size,
                info.uncompressed_size
            ));
        }
        let known_size = blob.uncompressed_size > 0 && blob.chunk_count > 0;
        let past_end = (info
            .uncompressed_offset
            .checked_add(info.uncompressed_size as u64))
        .is_none_or(|end| end > blob.uncompressed_size);
        if known_size && (info.index >= blob.chunk_count || past_end) {
            return Err(corrupt!(
                "blob {} chunk {}: index or extent {}+{} lies outside the blob ({} chunks, {} bytes)",
                blob.id,
                info.index,
                info.uncompressed_offset,
                info.uncompressed_size,
                blob.chunk_count,
                blob.uncompressed_size
            ));
        }
        Ok(())
    }

    /// The verified, uncompressed bytes of one chunk (as [`Self::resolve`] gives it): from the cache when it
    /// holds them, else from the backend (with the chunks after it that the image's prefetch table
    /// predicts) and then kept in the cache.
    pub fn chunk_data(&self, info: &ChunkInfo) -> Result<Vec<u8>> {
        self.chunk_data_with(info, &[])
    }

    /// [`Self::chunk_data`], fetching `follow` (chunks a reader predicts it will want next, as
    /// [`Self::resolve`] gives them, in order) in the same backend request when they lie right after it in
    /// the blob and nobody has them or fetches them yet.
    fn chunk_data_with(&self, info: &ChunkInfo, follow: &[ChunkInfo]) -> Result<Vec<u8>> {
        let Some(cache) = &self.cache else {
            let located = self.locate(info)?;
            return self.fetch_one(&located).map(|(data, _)| data);
        };
        if let Some(data) = self.cached_chunk(cache, info)? {
            return Ok(data);
        }
        let claim = cache.claim(info);
        // Another thread may have fetched it while we waited for the claim.
        if let Some(data) = self.cached_chunk(cache, info)? {
            return Ok(data);
        }
        // Not cached, or the cached copy failed verification and was dropped: fetch a verified copy.
        let located = self.locate(info)?;
        if located.batch.is_some() || self.amplify_io == 0 || !self.streams.reserve() {
            let (data, checked) = self.fetch_one(&located)?;
            cache.store(&located, &data, checked);
            drop(claim);
            return Ok(data);
        }
        let mut run = self.predicted_run(cache, &located, follow);
        if run.is_empty() {
            self.streams.cancel();
            let (data, checked) = self.fetch_one(&located)?;
            cache.store(&located, &data, checked);
            drop(claim);
            return Ok(data);
        }
        run.insert(
            0,
            Pending {
                info: located,
                claim,
            },
        );
        self.fetch_streamed(cache, run)
    }

    /// Fetch `run` (back to back in one blob, all claimed) with one request: the first chunk is read here
    /// and returned, the others are stored by a background stream (whose slot the caller reserved; given
    /// back here when no stream starts). A body that breaks before the first chunk is in is not the
    /// reader's failure: its chunk is fetched alone, with the backend's retries, and the rest released.
    fn fetch_streamed(&self, cache: &Arc<BlobCache>, mut run: Vec<Pending>) -> Result<Vec<u8>> {
        let first = run.remove(0);
        let ctx = self.stream_ctx(cache, first.info.blob_index);
        let last = run.last().map_or(&first.info, |p| &p.info);
        let len = (last.compressed_offset + last.compressed_size as u64
            - first.info.compressed_offset) as usize;
        let opened = self
            .backend_stream(&ctx.blob.id, first.info.compressed_offset, len)
            .and_then(|mut reader| {
                let got = stream::read_chunk(&ctx, &mut *reader, &first.info, &mut Vec::new())?;
                Ok((reader, got))
            });
        let (reader, (data, checked)) = match opened {
            Ok(v) => v,
            Err(e) => {
                self.streams.cancel();
                drop(run);
                if matches!(e, Error::Integrity(_)) {
                    return Err(e);
                }
                log::warn!(
                    "streamed fetch of blob {} chunk {}: {e}; fetching it alone",
                    ctx.blob.id,
                    first.info.index
                );
                let (data, checked) = self.fetch_one(&first.info)?;
                cache.store(&first.info, &data, checked);
                return Ok(data);
            }
        };
        cache.store(&first.info, &data, checked);
        drop(first.claim);
        self.streams.spawn(ctx, reader, run);
        Ok(data)
    }

    fn stream_ctx(&self, cache: &Arc<BlobCache>, blob_index: u32) -> StreamCtx {
        StreamCtx {
            blob: self.info().blobs[blob_index as usize].clone(),
            validate: self.validate,
            for_cache: cache.needs_digest(blob_index),
            cache: cache.clone(),
        }
    }

    /// The chunks to fetch with `first` (located): those of `follow` that lie back to back after it in its
    /// blob, or else, when `first` belongs to a file of the prefetch table, the chunks after it in the blob
    /// that do too, up to the link's window; or else, when `first` lies near the blob's previous miss, the
    /// chunks after it up to what [`speculate::Speculation`] grants. Each is claimed. Empty when nothing is
    /// predicted.
    fn predicted_run(
        &self,
        cache: &Arc<BlobCache>,
        first: &ChunkInfo,
        follow: &[ChunkInfo],
    ) -> Vec<Pending> {
        let first_end = first.compressed_offset + first.compressed_size as u64;
        // Counted for every miss (the share of speculation follows them), granted only when nothing
        // else predicts the run.
        let granted = self.speculation.miss(
            first.blob_index,
            first.compressed_offset,
            first.compressed_size as u64,
        );
        let mut window = self.streams.window_bytes();
        let mut run = Vec::new();
        let mut end = first_end;
        let take = |next: ChunkInfo, run: &mut Vec<Pending>, end: &mut u64, window: u64| -> bool {
            if next.blob_index != first.blob_index
                || next.batch.is_some()
                || next.compressed_offset != *end
                || *end + next.compressed_size as u64 - first.compressed_offset > window
            {
                return false;
            }
            let Some(claim) = cache.try_claim(&next) else {
                return false;
            };
            *end += next.compressed_size as u64;
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
        let table = self
            .prefetch_chunks()
            .filter(|p| p.contains(&(first.blob_index, first.index)));
        if table.is_some() {
            self.speculation.refund(granted);
        } else {
            // Near the previous miss: the chunks right after it, within what was granted.
            window = first_end - first.compressed_offset + granted;
        }
        if self.info().version == 6 && window > first_end - first.compressed_offset {
            if let Ok(array) = self.chunk_info_array(first.blob_index) {
                for index in first.index + 1..array.len() {
                    if table.is_some_and(|p| !p.contains(&(first.blob_index, index))) {
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
        }
        run
    }

    /// The chunks of `inode` after the one at `file_offset`, when the file is being read front to back:
    /// the chunks before it are cached or being fetched. As many follow as came before (so the runs double
    /// as the reader keeps going), within the link's window; none for a first or random read.
    fn sequential_followers(
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

    /// The chunks of the files in the image's prefetch table (a table naming the root predicts nothing:
    /// that is everything).
    fn prefetch_chunks(&self) -> Option<&HashSet<(u32, u32)>> {
        self.prefetch_chunks
            .get_or_init(|| {
                let table = &self.info().prefetch;
                if table.is_empty() || table.contains(&self.root_ino()) {
                    return None;
                }
                let mut set = HashSet::new();
                for &ino in table {
                    let inode = self.meta.inode(ino).ok()?;
                    if !inode.is_reg() {
                        continue;
                    }
                    for (o, addr) in self.meta.file_chunks(&inode, 0, inode.size).ok()? {
                        let c = self.file_chunk(&inode, o, &addr).ok()?;
                        set.insert((c.blob_index, c.index));
                        if set.len() > MAX_PREFETCH_CHUNKS {
                            return None;
                        }
                    }
                }
                Some(set)
            })
            .as_ref()
    }

    /// A cached chunk, verified. A copy that fails verification (a damaged cache file) is logged and
    /// dropped, and reported as absent so the caller fetches a verified copy from the backend.
    fn cached_chunk(&self, cache: &BlobCache, info: &ChunkInfo) -> Result<Option<Vec<u8>>> {
        let Some(data) = cache.read(info)? else {
            return Ok(None);
        };
        match self.verify(info, &data) {
            Ok(_) => {
                self.count_hit();
                Ok(Some(data))
            }
            Err(e) => {
                log::error!(
                    "blob cache {}: {e}; dropping the cached chunk and fetching it again",
                    cache.work_dir().display()
                );
                cache.invalidate(info);
                Ok(None)
            }
        }
    }

    fn count_hit(&self) {
        if let Some(c) = &self.cache {
            c.metrics.whole_hits.fetch_add(1, Ordering::Relaxed);
            c.metrics.total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `len` bytes of a blob as a stream (one backend read in the metrics).
    fn backend_stream(
        &self,
        blob_id: &str,
        offset: u64,
        len: usize,
    ) -> Result<Box<dyn std::io::Read + Send>> {
        self.backend.open_range(blob_id, offset, len)
    }

    fn backend_read(&self, blob_id: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.backend.read_exact_at(blob_id, offset, len)
    }

    /// One chunk straight from the backend, decoded and verified.
    fn fetch_one(&self, info: &ChunkInfo) -> Result<(Vec<u8>, bool)> {
        let blob = &self.info().blobs[info.blob_index as usize];
        let data = match info.batch {
            Some((batch, inner)) => {
                let buffer = self.batch_data(info.blob_index, batch, info.compressed_offset)?;
                let range = inner as usize..inner as usize + info.uncompressed_size as usize;
                buffer
                    .get(range)
                    .ok_or_else(|| {
                        corrupt!(
                            "blob {} chunk {}: lies outside its batch {batch}",
                            blob.id,
                            info.index
                        )
                    })?
                    .to_vec()
            }
            None => {
                let stored = self.backend_read(
                    &blob.id,
                    info.compressed_offset,
                    info.compressed_size as usize,
                )?;
                self.decode(info, &stored)?
            }
        };
        let checked = self.verify(info, &data)?;
        Ok((data, checked))
    }

    fn decode(&self, info: &ChunkInfo, stored: &[u8]) -> Result<Vec<u8>> {
        decode_chunk(&self.info().blobs[info.blob_index as usize], info, stored)
    }

    /// Size, digest and CRC32C of a chunk's uncompressed bytes (see [`verify_chunk`]). Returns whether the
    /// digest was checked.
    fn verify(&self, info: &ChunkInfo, data: &[u8]) -> Result<bool> {
        let for_cache = self
            .cache
            .as_ref()
            .is_some_and(|c| c.needs_digest(info.blob_index));
        verify_chunk(
            &self.info().blobs[info.blob_index as usize],
            info,
            data,
            self.validate,
            for_cache,
        )
    }

    /// Every chunk of a regular file, located in its blob (for prefetch; v6 reads the blob's chunk-info
    /// array).
    pub fn file_chunks(&self, ino: u64) -> Result<Vec<ChunkInfo>> {
        let inode = self.meta.inode(ino)?;
        self.meta
            .file_chunks(&inode, 0, inode.size)?
            .iter()
            .map(|(file_offset, addr)| self.locate(&self.file_chunk(&inode, *file_offset, addr)?))
            .collect()
    }

    /// The byte ranges `[start, end)` of a regular file that chunks hold, in file order, merged where they
    /// touch. The rest of the file (v5 HAS_HOLE files) is holes, zeros by definition: tools that visit every
    /// byte (`check`, `unpack`) skip them instead of reading them, so a sparse file's size, which a hostile
    /// image sets freely (2^62 over no chunk at all), does not decide how long they take.
    pub fn data_extents(&self, ino: u64) -> Result<Vec<(u64, u64)>> {
        let inode = self.meta.inode(ino)?;
        if !inode.is_reg() {
            return Err(Error::Invalid(format!("inode {ino} is not a regular file")));
        }
        let chunk_size = self.info().chunk_size as u64;
        let mut extents: Vec<(u64, u64)> = Vec::new();
        for (start, addr) in self.meta.file_chunks(&inode, 0, inode.size)? {
            let len = match &addr {
                ChunkAddr::Full(info) => info.uncompressed_size as u64,
                ChunkAddr::Indexed { .. } => chunk_size,
            };
            let end = start.saturating_add(len).min(inode.size);
            match extents.last_mut() {
                Some(last) if last.1 >= start => last.1 = last.1.max(end),
                _ if start < end => extents.push((start, end)),
                _ => {}
            }
        }
        Ok(extents)
    }

    /// Bring `chunks` (sorted by compressed offset, one blob) into the cache, skipping those cached or
    /// being fetched; chunks back to back in the blob come in one streamed request. Returns the compressed
    /// bytes read from the backend.
    pub fn prefetch(&self, chunks: &[ChunkInfo]) -> Result<u64> {
        let Some(cache) = &self.cache else {
            return Ok(0);
        };
        let mut fetched = 0;
        let mut i = 0;
        while i < chunks.len() {
            let Some(claim) = cache.try_claim(&chunks[i]) else {
                i += 1;
                continue;
            };
            let mut run = vec![Pending {
                info: chunks[i].clone(),
                claim,
            }];
            i += 1;
            while i < chunks.len() && chunks[i].batch.is_none() && run[0].info.batch.is_none() {
                let prev = &run[run.len() - 1].info;
                let next = &chunks[i];
                if next.blob_index != prev.blob_index
                    || next.compressed_offset
                        != prev.compressed_offset + prev.compressed_size as u64
                {
                    break;
                }
                let Some(claim) = cache.try_claim(next) else {
                    break;
                };
                run.push(Pending {
                    info: next.clone(),
                    claim,
                });
                i += 1;
            }
            let bytes: u64 = run.iter().map(|p| p.info.compressed_size as u64).sum();
            let count = run.len() as u64;
            if run.len() == 1 {
                let p = run.remove(0);
                let (data, checked) = self.fetch_one(&p.info)?;
                cache.store(&p.info, &data, checked);
            } else {
                let ctx = self.stream_ctx(cache, run[0].info.blob_index);
                let started = Instant::now();
                let mut reader = self.backend_stream(
                    &ctx.blob.id,
                    run[0].info.compressed_offset,
                    bytes as usize,
                )?;
                stream::store_run(&ctx, &mut *reader, run)?;
                self.streams
                    .link()
                    .record(bytes, started.elapsed().as_secs_f64());
            }
            fetched += bytes;
            cache
                .metrics
                .prefetch_unmerged_chunks
                .fetch_add(count, Ordering::Relaxed);
        }
        Ok(fetched)
    }

    /// Reads from users in progress; prefetch workers yield while this is non-zero.
    pub fn user_reads_in_flight(&self) -> usize {
        self.user_reads.load(Ordering::Relaxed)
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

    /// The chunks user reads asked for, when the image records them ([`ImageOptions::record_demand`]).
    /// Compressed sizes of v6 chunks come from the blobs' chunk-info arrays already loaded; `None` when
    /// one is not (only cache hits on that blob so far) rather than a network round trip.
    pub fn demand(&self) -> Option<DemandSummary> {
        let d = self.demand.as_ref()?;
        let mut chunks = 0;
        let mut bytes = Some(d.recorded_bytes.load(Ordering::Relaxed));
        for (blob, bits) in d.blobs.iter().enumerate() {
            let bits = bits.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let marked: u64 = bits.iter().map(|w| w.count_ones() as u64).sum();
            chunks += marked;
            if marked == 0 || self.info().version != 6 {
                continue;
            }
            let array = self.loaded_chunk_info_array(blob as u32);
            for (word, w) in bits.iter().enumerate() {
                for bit in (0..64).filter(|b| w & (1 << b) != 0) {
                    let size = array
                        .as_ref()
                        .and_then(|a| a.get((word * 64 + bit) as u32).ok())
                        .map(|c| c.compressed_size as u64);
                    bytes = bytes.zip(size).map(|(a, b)| a + b);
                }
            }
        }
        Some(DemandSummary {
            chunks,
            compressed_bytes: bytes,
        })
    }

    pub fn validates(&self) -> bool {
        self.validate
    }

    fn batch_data(
        &self,
        blob_index: u32,
        batch: u32,
        compressed_offset: u64,
    ) -> Result<Arc<Vec<u8>>> {
        {
            let last = self.last_batch.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((b, k, data)) = last.as_ref() {
                if *b == blob_index && *k == batch {
                    return Ok(data.clone());
                }
            }
        }
        let blob = &self.info().blobs[blob_index as usize];
        let (compressed, uncompressed) = self.chunk_info_array(blob_index)?.batch(batch)?;
        if uncompressed > blob.chunk_size || compressed > uncompressed {
            return Err(corrupt!(
                "blob {} batch {batch}: sizes {compressed}/{uncompressed} out of range",
                blob.id
            ));
        }
        let stored = self.backend_read(&blob.id, compressed_offset, compressed as usize)?;
        // A batch that did not shrink under compression is stored raw.
        let data = if compressed == uncompressed {
            stored
        } else {
            compress::decompress(blob.compressor, &stored, uncompressed as usize)
                .map_err(|e| Error::Integrity(format!("blob {} batch {batch}: {e}", blob.id)))?
        };
        let data = Arc::new(data);
        *self.last_batch.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((blob_index, batch, data.clone()));
        Ok(data)
    }

    /// The decoded chunk-info array of v6 blob `index`, read from the blob on first use. Concurrent first
    /// readers of one blob share one load; a failed load is remembered for [`FAILED_LOAD_RETRY_AFTER`].
    pub fn chunk_info_array(&self, index: u32) -> Result<Arc<ChunkInfoArray>> {
        let slot = self
            .blob_meta
            .get(index as usize)
            .ok_or_else(|| corrupt!("blob index {index} does not exist"))?;
        let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match &*state {
                LoadState::Ready(array) => return Ok(array.clone()),
                LoadState::Failed { at, error } if at.elapsed() < FAILED_LOAD_RETRY_AFTER => {
                    return Err(error.replay())
                }
                LoadState::Loading => {
                    state = slot.done.wait(state).unwrap_or_else(|e| e.into_inner());
                }
                LoadState::Idle | LoadState::Failed { .. } => break,
            }
        }
        *state = LoadState::Loading;
        drop(state);
        let loading = Loading(Some(slot));
        let loaded = self.load_chunk_info_array(index).map(Arc::new);
        loading.finish(match &loaded {
            Ok(array) => LoadState::Ready(array.clone()),
            Err(e) => LoadState::Failed {
                at: Instant::now(),
                error: e.replay(),
            },
        });
        loaded
    }

    /// The chunk-info array of v6 blob `index` if it is loaded already (never loads it).
    fn loaded_chunk_info_array(&self, index: u32) -> Option<Arc<ChunkInfoArray>> {
        let slot = self.blob_meta.get(index as usize)?;
        match &*slot.state.lock().unwrap_or_else(|e| e.into_inner()) {
            LoadState::Ready(array) => Some(array.clone()),
            _ => None,
        }
    }

    fn load_chunk_info_array(&self, index: u32) -> Result<ChunkInfoArray> {
        let blob = &self.meta.info().blobs[index as usize];
        let ci = blob
            .ci
            .ok_or_else(|| corrupt!("blob {} has no chunk-info array", blob.id))?;
        let len = ci
            .compressed_size
            .checked_add(crate::format::blob_meta::CI_HEADER_SIZE)
            .ok_or_else(|| corrupt!("blob {}: chunk-info size overflows", blob.id))?;
        // Its size was checked against the limits when the image was opened; the blob's own size is not
        // asked for (a network round trip): a range past its end is a short read.
        let raw = self
            .backend
            .read_exact_at(&blob.id, ci.offset, len as usize)
            .map_err(|e| match e {
                Error::Corrupt(m) => corrupt!(
                    "blob {}: chunk-info array at {}+{len} lies past the blob's end ({m})",
                    blob.id,
                    ci.offset
                ),
                other => other,
            })?;
        ChunkInfoArray::parse(blob, &ci, &raw)
    }

    /// Visit every entry below the root, depth first, parents before children. Directories are also
    /// reported after their contents (`WalkEvent::DirDone`), which is when their mtime can be set.
    /// A directory reached twice (a cycle in a hostile image) is an error, not an endless walk.
    pub fn walk(
        &self,
        visit: &mut dyn FnMut(&Path, &InodeAttr, WalkEvent) -> Result<()>,
    ) -> Result<()> {
        struct Frame {
            path: PathBuf,
            attr: InodeAttr,
            entries: std::vec::IntoIter<DirEntry>,
        }
        let root = self.inode(self.root_ino())?;
        let mut seen_dirs = HashSet::from([root.ino]);
        visit(Path::new(""), &root, WalkEvent::Node)?;
        let mut stack = vec![Frame {
            path: PathBuf::new(),
            entries: self.list_dir(&root)?.into_iter(),
            attr: root,
        }];
        while let Some(frame) = stack.last_mut() {
            let Some(entry) = frame.entries.next() else {
                let done = stack.pop().unwrap();
                visit(&done.path, &done.attr, WalkEvent::DirDone)?;
                continue;
            };
            let path = frame
                .path
                .join(std::ffi::OsStr::from_encoded_bytes_checked(&entry.name));
            let attr = self.inode(entry.ino)?;
            visit(&path, &attr, WalkEvent::Node)?;
            if attr.is_dir() {
                if !seen_dirs.insert(attr.ino) {
                    return Err(corrupt!(
                        "directory inode {} is reached a second time at {} (a cycle)",
                        attr.ino,
                        path.display()
                    ));
                }
                let entries = self.list_dir(&attr)?.into_iter();
                stack.push(Frame {
                    path,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkEvent {
    Node,
    DirDone,
}

/// Name bytes to an OsStr without any conversion (Unix names are bytes).
trait FromBytes {
    fn from_encoded_bytes_checked(b: &[u8]) -> &std::ffi::OsStr;
}
impl FromBytes for std::ffi::OsStr {
    fn from_encoded_bytes_checked(b: &[u8]) -> &std::ffi::OsStr {
        std::os::unix::ffi::OsStrExt::from_bytes(b)
    }
}

/// The uncompressed bytes of a chunk from its stored bytes (a raw chunk is copied).
fn decode_chunk(blob: &BlobInfo, info: &ChunkInfo, stored: &[u8]) -> Result<Vec<u8>> {
    if info.compressed {
        compress::decompress(blob.compressor, stored, info.uncompressed_size as usize).map_err(
            |e| {
                // The codec's own message, without a second "integrity check failed" prefix.
                let why = match e {
                    Error::Integrity(m) => m,
                    other => other.to_string(),
                };
                Error::Integrity(format!("blob {} chunk {}: {why}", blob.id, info.index))
            },
        )
    } else if stored.len() != info.uncompressed_size as usize {
        Err(Error::Integrity(format!(
            "blob {} chunk {}: stored raw but sizes differ",
            blob.id, info.index
        )))
    } else {
        Ok(stored.to_vec())
    }
}

/// Size, digest and CRC32C (when recorded) of a chunk's uncompressed bytes. The digest is checked when
/// validating (then it must be recorded) and whenever the chunk may go into a cache shared by images
/// (`for_cache`), which takes nothing unchecked. Returns whether the digest was checked.
fn verify_chunk(
    blob: &BlobInfo,
    info: &ChunkInfo,
    data: &[u8],
    validate: bool,
    for_cache: bool,
) -> Result<bool> {
    let what = || format!("blob {} chunk {}", blob.id, info.index);
    if data.len() != info.uncompressed_size as usize {
        return Err(Error::Integrity(format!(
            "{}: {} bytes, expected {}",
            what(),
            data.len(),
            info.uncompressed_size
        )));
    }
    if validate && info.digest.is_none() {
        return Err(Error::Integrity(format!(
            "{}: no digest recorded to validate against",
            what()
        )));
    }
    // Digest first: it is the stronger check and names the algorithm the image chose.
    let mut checked = false;
    if let Some(want) = info.digest.filter(|_| validate || for_cache) {
        let got = digest(blob.digester, data);
        if got != want {
            return Err(Error::Integrity(format!(
                "{}: {} digest {} does not match the recorded {}",
                what(),
                blob.digester.name(),
                hex(&got),
                hex(&want)
            )));
        }
        checked = true;
    }
    if let Some(want) = info.crc32 {
        let got = crc32c(data);
        if got != want {
            return Err(Error::Integrity(format!(
                "{}: CRC32C {got:#010x}, expected {want:#010x}",
                what()
            )));
        }
    }
    Ok(checked)
}

/// Read the metadata at `path`: map a bootstrap, or extract the bootstrap from an inline-meta blob.
pub fn load_metadata(path: &Path) -> Result<(MetaBytes, MetaSource)> {
    let file = File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
        .len();
    let mut head = [0u8; 1028];
    let n = read_at(&file, 0, &mut head)?;
    if v5::detect(&head[..n]) || v6::detect(&head[..n]) {
        // SAFETY: the mapping is read-only and private; bootstraps are immutable image files.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::io(format!("mmap {}", path.display()), e))?;
        return Ok((
            MetaBytes::Mapped(map),
            MetaSource::Bootstrap(path.to_path_buf()),
        ));
    }
    let blob_id = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: no usable file name for a blob id",
                path.display()
            ))
        })?
        .to_string();
    let bytes = extract_inline_bootstrap(&file, size).map_err(|e| match e {
        Error::Corrupt(m) => corrupt!(
            "{}: not a RAFS bootstrap, and not a blob with inlined metadata ({m})",
            path.display()
        ),
        other => other,
    })?;
    crate::format::check_blob_id(&blob_id)?;
    Ok((
        MetaBytes::Owned(bytes),
        MetaSource::InlineBlob {
            path: path.to_path_buf(),
            blob_id,
        },
    ))
}

fn read_at(file: &File, offset: u64, buf: &mut [u8]) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read metadata", e)),
        }
    }
    Ok(done)
}

fn read_section(file: &File, size: u64, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    if offset.checked_add(len).is_none_or(|end| end > size) || len > MAX_INLINE_BOOTSTRAP {
        return Err(corrupt!(
            "{what} at {offset}+{len} lies outside the {size}-byte blob"
        ));
    }
    let mut buf = vec![0u8; len as usize];
    if read_at(file, offset, &mut buf)? != buf.len() {
        return Err(corrupt!("{what}: short read"));
    }
    Ok(buf)
}

/// The last tar header of a blob and the offset where its payload starts.
fn tail_section(file: &File, size: u64) -> Result<(TarHeader, u64)> {
    if size < TAR_HEADER_SIZE {
        return Err(corrupt!("file of {size} bytes is too short"));
    }
    let header = toc::parse_tar_header(&read_section(
        file,
        size,
        size - TAR_HEADER_SIZE,
        TAR_HEADER_SIZE,
        "tar header",
    )?)?;
    let start = (size - TAR_HEADER_SIZE)
        .checked_sub(header.size)
        .ok_or_else(|| {
            corrupt!(
                "last section claims {} bytes, more than the blob holds",
                header.size
            )
        })?;
    Ok((header, start))
}

fn extract_inline_bootstrap(file: &File, size: u64) -> Result<Vec<u8>> {
    let (header, start) = tail_section(file, size)?;
    if header.name == b"image.boot" {
        return read_section(file, size, start, header.size, "image.boot");
    }
    if header.name != toc::TOC_NAME {
        return Err(corrupt!(
            "last section is {:?}, not a ToC or image.boot",
            String::from_utf8_lossy(&header.name)
        ));
    }
    let entries = toc::parse_toc(&read_section(file, size, start, header.size, "blob ToC")?)?;
    let boot = entries
        .iter()
        .find(|e| e.name == b"image.boot")
        .ok_or_else(|| corrupt!("blob ToC has no image.boot entry"))?;
    if boot.uncompressed_size > MAX_INLINE_BOOTSTRAP {
        return Err(corrupt!(
            "image.boot claims {} bytes",
            boot.uncompressed_size
        ));
    }
    let stored = read_section(
        file,
        size,
        boot.compressed_offset,
        boot.compressed_size,
        "image.boot",
    )?;
    let bytes = match boot.compression {
        toc::TOC_COMPRESS_NONE => stored,
        toc::TOC_COMPRESS_ZSTD => compress::decompress(
            crate::format::Compressor::Zstd,
            &stored,
            boot.uncompressed_size as usize,
        )?,
        other => {
            return Err(Error::Unsupported(format!(
                "image.boot compressed with ToC flag {other:#x}"
            )))
        }
    };
    let got = digest(crate::format::Digester::Sha256, &bytes);
    if got != boot.uncompressed_digest {
        return Err(Error::Integrity(format!(
            "image.boot sha256 {} does not match the ToC's {}",
            hex(&got),
            hex(&boot.uncompressed_digest)
        )));
    }
    Ok(bytes)
}
