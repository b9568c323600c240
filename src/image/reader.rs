//! The chunk reader: a file range produced chunk by chunk (cache file ranges, verified bytes, holes),
//! each chunk from the blob cache when it holds a verified copy, else from the backend (alone, in a v6
//! batch, or in a streamed run with the chunks predicted after it) and then stored; and prefetch, which
//! brings chunks into the cache without a reader.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::siblings::DirGuess;
use super::stream::{self, Pending, StreamCtx};
use super::verify::{decode_chunk, digest_matches, verify_chunk};
use super::{RafsImage, Segment};
use crate::cache::BlobCache;
use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::ChunkInfo;
use crate::storage::compress;

/// Counts a user read for as long as it lives.
pub(super) struct UserRead<'a>(&'a AtomicUsize);

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

/// (blob index, batch index, decompressed batch).
pub(super) type DecodedBatch = (u32, u32, Arc<Vec<u8>>);

impl RafsImage {
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
            let cached = match &self.cache {
                Some(c) if !self.validate => c.ready_location(&info).or_else(|| {
                    // Being fetched (a background stream): once it is stored, serve it from the cache
                    // file like a hit, rather than reading it back into a buffer of our own.
                    if c.is_claimed(&info) {
                        c.wait_unclaimed(&info);
                    }
                    c.ready_location(&info)
                }),
                _ => None,
            };
            match cached {
                Some((file, chunk_offset)) => {
                    self.count_hit();
                    self.speculation.hit(info.blob_index, info.index);
                    sink(Segment::Cached {
                        file: &file,
                        offset: chunk_offset + inner as u64,
                        len,
                    })?;
                }
                None => {
                    // Followers only for a miss (with validation on, hits come this way too).
                    let (follow, dir) = match &self.cache {
                        Some(cache) if self.amplify_io > 0 && !cache.is_ready(&info) => (
                            self.sequential_followers(cache, &inode, file_offset),
                            self.dir_guess(&inode),
                        ),
                        _ => (Vec::new(), DirGuess::Unknown),
                    };
                    let data = self
                        .chunk_data_with(&info, &follow, &dir)
                        .map_err(|e| match e {
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

    /// Whether reading `[offset, offset + size)` of `ino` needs nothing from the backend: every chunk the
    /// range covers is in the blob cache (holes need none). The FUSE front end keeps reads that will wait on
    /// the network from taking every worker with it. A range it cannot tell about (a bad inode, a broken
    /// chunk record) counts as cached: its read fails at once.
    pub fn range_is_cached(&self, ino: u64, offset: u64, size: usize) -> bool {
        let Ok(inode) = self.meta.inode(ino) else {
            return true;
        };
        if !inode.is_reg() || offset >= inode.size || size == 0 {
            return true;
        }
        let len = (size as u64).min(inode.size - offset);
        let Ok(chunks) = self.meta.file_chunks(&inode, offset, len) else {
            return true;
        };
        chunks.iter().all(|(file_offset, addr)| {
            match (&self.cache, self.file_chunk(&inode, *file_offset, addr)) {
                (_, Err(_)) => true,
                (Some(cache), Ok(info)) => cache.is_ready(&info),
                (None, Ok(_)) => false,
            }
        })
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

    /// The verified, uncompressed bytes of one chunk (as [`Self::resolve`] gives it): from the cache when it
    /// holds them, else from the backend (with the chunks after it that the image's prefetch table
    /// predicts) and then kept in the cache.
    pub fn chunk_data(&self, info: &ChunkInfo) -> Result<Vec<u8>> {
        self.chunk_data_with(info, &[], &DirGuess::Unknown)
    }

    /// [`Self::chunk_data`], fetching `follow` (chunks a reader predicts it will want next, as
    /// [`Self::resolve`] gives them, in order) in the same backend request when they lie right after it in
    /// the blob and nobody has them or fetches them yet; or, when none follow, the chunks of `dir` (the
    /// file's directory, being read file after file) after it.
    fn chunk_data_with(
        &self,
        info: &ChunkInfo,
        follow: &[ChunkInfo],
        dir: &DirGuess,
    ) -> Result<Vec<u8>> {
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
        // A guess that did not bring it (its request failed) is not credited when it is read later.
        self.speculation.forget(info.blob_index, info.index);
        // Not cached, or the cached copy failed verification and was dropped: fetch a verified copy.
        let located = self.locate(info)?;
        // A blob whose requests find no answer: this chunk alone (it fails at once, waits for another
        // request trying the blob again, or is that request), claiming and streaming nothing more.
        let slot = match located.batch.is_none()
            && self.amplify_io > 0
            && !self.failures.is_failing(located.blob_index)
        {
            true => self.streams.reserve(
                located.blob_index,
                self.stream_buffer_bytes(located.blob_index),
            ),
            false => None,
        };
        let Some(slot) = slot else {
            let (data, checked) = self.fetch_one(&located)?;
            cache.store(&located, &data, checked);
            drop(claim);
            return Ok(data);
        };
        let mut run = self.predicted_run(cache, &located, follow, dir);
        if run.is_empty() {
            drop(slot);
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
        self.fetch_streamed(cache, slot, run)
    }

    /// Fetch `run` (back to back in one blob, all claimed): the first chunk is read here and returned, the
    /// rest of its request is stored by a background stream holding `slot`. A long run is cut into parts,
    /// one more ranged request each, as far as [`Streams::reserve`](stream::Streams::reserve) grants
    /// streams: several requests of the blob are in flight at once, so the round trip and the server's
    /// per-request time overlap, and checking and storing runs on as many threads. A part that gets no
    /// stream stays in the request before it. A body that breaks before the first chunk is in is not the
    /// reader's failure: its chunk is fetched alone, with the backend's retries, and the rest released.
    fn fetch_streamed(
        &self,
        cache: &Arc<BlobCache>,
        slot: stream::Slot,
        mut run: Vec<Pending>,
    ) -> Result<Vec<u8>> {
        let first = run.remove(0);
        let ctx = self.stream_ctx(cache, first.info.blob_index);
        // Where a chunk's stored bytes end in the blob.
        let end = |p: &Pending| p.info.compressed_offset + p.info.compressed_size as u64;
        let span = |part: &[Pending]| -> (u64, usize) {
            let start = part[0].info.compressed_offset;
            (start, (end(&part[part.len() - 1]) - start) as usize)
        };
        let rest_bytes: u64 = run.iter().map(|p| p.info.compressed_size as u64).sum();
        let mut extra = Vec::new();
        let wanted = (rest_bytes / stream::MIN_PART_BYTES).min(stream::MAX_BLOB_STREAMS as u64);
        while (extra.len() as u64) + 1 < wanted {
            let buffer = self.stream_buffer_bytes(first.info.blob_index);
            match self.streams.reserve(first.info.blob_index, buffer) {
                Some(s) => extra.push(s),
                None => break,
            }
        }
        let mut parts = stream::split_run(run, |p| p.info.compressed_size as u64, extra.len() + 1);
        extra.truncate(parts.len().saturating_sub(1));
        let head = match parts.is_empty() {
            true => Vec::new(),
            false => parts.remove(0),
        };
        let head_len = (end(head.last().unwrap_or(&first)) - first.info.compressed_offset) as usize;
        let opened = self
            .backend_stream(
                first.info.blob_index,
                first.info.compressed_offset,
                head_len,
            )
            .and_then(|mut reader| {
                let got = stream::read_chunk(&ctx, &mut *reader, &first.info, &mut Vec::new())?;
                Ok((reader, got))
            });
        let (reader, (data, checked)) = match opened {
            Ok(v) => v,
            Err(e) => {
                drop((slot, extra, head, parts));
                // Alone it would fail too: at once, the blob's failure being remembered.
                if matches!(e, Error::Integrity(_))
                    || self.failures.is_failing(first.info.blob_index)
                {
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
        let rate = stream::RunRate::new(rest_bytes, 1 + parts.len());
        for (part, slot) in parts.into_iter().zip(extra) {
            let backend = self.backend.clone();
            let id = ctx.blob.id.clone();
            let (offset, len) = span(&part);
            let open = move || backend.open_range(&id, offset, len);
            self.streams
                .spawn(ctx.clone(), slot, rate.clone(), open, part);
        }
        if head.is_empty() {
            rate.part_done(self.streams.link());
        } else {
            self.streams
                .spawn(ctx, slot, rate, move || Ok(reader), head);
        }
        Ok(data)
    }

    /// What one background stream of blob `blob_index` may hold at once: one chunk's stored and decoded
    /// bytes, each at most the chunk size a located chunk may have.
    fn stream_buffer_bytes(&self, blob_index: u32) -> u64 {
        let blob = self
            .info()
            .blobs
            .get(blob_index as usize)
            .map_or(0, |b| b.chunk_size);
        2 * blob.max(self.info().chunk_size) as u64
    }

    fn stream_ctx(&self, cache: &Arc<BlobCache>, blob_index: u32) -> StreamCtx {
        StreamCtx {
            blob: self.info().blobs[blob_index as usize].clone(),
            validate: self.validate,
            for_cache: cache.needs_digest(blob_index),
            cache: cache.clone(),
            image_gone: self.streams.image_gone(),
        }
    }

    /// A cached chunk, verified. A copy that fails verification (a damaged cache file) is logged and
    /// dropped, and reported as absent so the caller fetches a verified copy from the backend; one of a
    /// shared cache whose digest matches is not damaged, and fails this read alone.
    fn cached_chunk(&self, cache: &BlobCache, info: &ChunkInfo) -> Result<Option<Vec<u8>>> {
        let Some(data) = cache.read(info)? else {
            return Ok(None);
        };
        match self.verify(info, &data) {
            Ok(_) => {
                self.count_hit();
                self.speculation.hit(info.blob_index, info.index);
                Ok(Some(data))
            }
            // Bytes with the digest the shared files' key covers are what every image sharing them
            // expects: only this image's own records (a CRC) disagree. Its read fails; the cache stays,
            // or any image could clear another's ready bits by naming its chunks with wrong CRCs.
            Err(e)
                if cache.needs_digest(info.blob_index)
                    && digest_matches(
                        &self.info().blobs[info.blob_index as usize],
                        info,
                        &data,
                    ) =>
            {
                Err(e)
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

    /// `len` bytes of blob `index` as a stream (one backend read in the metrics), unless the blob's last
    /// request found no answer (`failures`).
    fn backend_stream(
        &self,
        index: u32,
        offset: u64,
        len: usize,
    ) -> Result<Box<dyn std::io::Read + Send>> {
        let id = &self.info().blobs[index as usize].id;
        self.failures
            .request(index, || self.backend.open_range(id, offset, len))
    }

    /// `len` bytes of blob `index`, unless its last request found no answer (`failures`).
    fn backend_read(&self, index: u32, offset: u64, len: usize) -> Result<Vec<u8>> {
        let id = &self.info().blobs[index as usize].id;
        self.failures
            .request(index, || self.backend.read_exact_at(id, offset, len))
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
                    info.blob_index,
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
        let stored = self.backend_read(blob_index, compressed_offset, compressed as usize)?;
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

    /// Bring `chunks` (sorted by compressed offset, one blob) into the cache, skipping those cached or
    /// being fetched; chunks back to back in the blob come in one streamed request, except while the
    /// blob's requests find no answer (`failures`): then a chunk alone asks it again, so the others stay
    /// unclaimed for readers. Returns the compressed bytes read from the backend.
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
            let failing = self.failures.is_failing(run[0].info.blob_index);
            while !failing
                && i < chunks.len()
                && chunks[i].batch.is_none()
                && run[0].info.batch.is_none()
            {
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
                    run[0].info.blob_index,
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
}
