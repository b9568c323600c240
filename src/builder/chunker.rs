//! Split file contents into chunks, then digest, CRC and compress each one and append it to the blob,
//! deduplicating chunks whose content was already stored (in this layer or in a parent's blobs).
//!
//! Digesting and compressing run on a pool of worker threads; the caller's thread reads the files and
//! commits results strictly in submission order, so the blob is the same whatever the thread count.
//! At most `window` chunks are in flight, which bounds memory by the window, not by the image size.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use super::blob::BlobWriter;
use super::tree::FileId;
use crate::error::{Error, Result};
use crate::format::{Compressor, Digester};
use crate::storage::{compress, digest};

/// One chunk as the bootstrap records it: the on-disk chunk record itself (its `file_offset` is set per
/// file when a v5 writer places it after an inode).
pub use rafs_layout::v5::ChunkRecord as Chunk;

/// Every chunk an image refers to, each once. Files hold indexes into it.
#[derive(Debug, Default, Clone)]
pub struct ChunkTable {
    chunks: Vec<Chunk>,
    by_location: HashMap<(u32, u32), u32>,
    by_content: HashMap<([u8; 32], u32), u32>,
}

impl ChunkTable {
    /// Add a chunk known by its location, or return the index it already has.
    pub fn add(&mut self, chunk: Chunk) -> u32 {
        if let Some(&i) = self.by_location.get(&(chunk.blob_index, chunk.index)) {
            return i;
        }
        let i = self.chunks.len() as u32;
        self.chunks.push(chunk);
        self.by_location.insert((chunk.blob_index, chunk.index), i);
        self.by_content
            .entry((chunk.digest, chunk.uncompressed_size))
            .or_insert(i);
        i
    }

    /// A stored chunk with this content (dedup key: digest and uncompressed size).
    pub fn find(&self, digest: &[u8; 32], size: u32) -> Option<u32> {
        self.by_content.get(&(*digest, size)).copied()
    }

    pub fn get(&self, i: u32) -> &Chunk {
        &self.chunks[i as usize]
    }

    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    fn content_keys(&self) -> HashSet<([u8; 32], u32)> {
        self.by_content.keys().copied().collect()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ChunkOptions {
    pub chunk_size: u32,
    pub compressor: Compressor,
    pub digester: Digester,
    /// Worker threads; 1 processes every chunk on the caller's thread.
    pub threads: usize,
}

/// What chunking did.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChunkStats {
    /// File bytes read.
    pub bytes_read: u64,
    /// Chunks and bytes appended to the blob (compressed size as stored).
    pub chunks_written: u64,
    pub bytes_written: u64,
    /// Chunks found already stored, and their uncompressed bytes.
    pub chunks_deduped: u64,
    pub bytes_deduped: u64,
}

/// (file, chunk position in the file, chunk table index) of one committed chunk.
pub type Assignment = (FileId, u32, u32);

struct Job {
    seq: u64,
    data: Vec<u8>,
}

/// A processed chunk: `stored` is what goes into the blob (compressed, or raw when that is not smaller).
struct Done {
    seq: u64,
    digest: [u8; 32],
    crc32: u32,
    size: u32,
    stored: Vec<u8>,
    compressed: bool,
}

fn process(opts: &ChunkOptions, known: &HashSet<([u8; 32], u32)>, job: Job) -> Result<Done> {
    let size = job.data.len() as u32;
    let d = digest::digest(opts.digester, &job.data);
    let crc32 = digest::crc32c(&job.data);
    // A chunk the parent already stores will be deduplicated: skip compressing it.
    if opts.compressor == Compressor::None || known.contains(&(d, size)) {
        return Ok(Done {
            seq: job.seq,
            digest: d,
            crc32,
            size,
            stored: job.data,
            compressed: false,
        });
    }
    let packed = compress::compress(opts.compressor, &job.data)?;
    let (stored, compressed) = if packed.len() < job.data.len() {
        (packed, true)
    } else {
        (job.data, false)
    };
    Ok(Done {
        seq: job.seq,
        digest: d,
        crc32,
        size,
        stored,
        compressed,
    })
}

pub struct Chunker<'a> {
    opts: ChunkOptions,
    blob: &'a mut BlobWriter,
    table: &'a mut ChunkTable,
    blob_index: u32,
    known: Arc<HashSet<([u8; 32], u32)>>,
    jobs: Option<mpsc::SyncSender<Job>>,
    results: Option<mpsc::Receiver<Result<Done>>>,
    workers: Vec<JoinHandle<()>>,
    window: usize,
    next_seq: u64,
    next_commit: u64,
    /// Results that arrived ahead of an earlier chunk.
    pending: BTreeMap<u64, Done>,
    /// (file, chunk position in file) of every chunk submitted and not yet committed, in order.
    targets: std::collections::VecDeque<(FileId, u32)>,
    assignments: Vec<Assignment>,
    stats: ChunkStats,
}

impl<'a> Chunker<'a> {
    /// Chunks new data into `blob` (blob number `blob_index` of the image), deduplicating against
    /// everything already in `table`.
    pub fn new(
        opts: ChunkOptions,
        blob: &'a mut BlobWriter,
        table: &'a mut ChunkTable,
        blob_index: u32,
    ) -> Self {
        let threads = opts.threads.max(1);
        let known = Arc::new(table.content_keys());
        // Two chunks per worker keep every thread busy while the reader fills the next one.
        let window = 2 * threads + 2;
        let mut chunker = Chunker {
            opts,
            blob,
            table,
            blob_index,
            known,
            jobs: None,
            results: None,
            workers: Vec::new(),
            window,
            next_seq: 0,
            next_commit: 0,
            pending: BTreeMap::new(),
            targets: Default::default(),
            assignments: Vec::new(),
            stats: ChunkStats::default(),
        };
        if threads > 1 {
            let (job_tx, job_rx) = mpsc::sync_channel::<Job>(window);
            let (done_tx, done_rx) = mpsc::channel::<Result<Done>>();
            let job_rx = Arc::new(Mutex::new(job_rx));
            for _ in 0..threads {
                let (job_rx, done_tx, known) =
                    (job_rx.clone(), done_tx.clone(), chunker.known.clone());
                chunker.workers.push(std::thread::spawn(move || loop {
                    let job = match job_rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    };
                    if done_tx.send(process(&opts, &known, job)).is_err() {
                        return;
                    }
                }));
            }
            chunker.jobs = Some(job_tx);
            chunker.results = Some(done_rx);
        }
        chunker
    }

    /// Read `size` bytes of file `file` from `reader` and chunk them. `what` names the file in errors.
    /// The reader must hold exactly `size` bytes: fewer or more means the source changed or is broken.
    pub fn add_file(
        &mut self,
        file: FileId,
        reader: &mut dyn Read,
        size: u64,
        what: &str,
    ) -> Result<()> {
        let chunk_size = self.opts.chunk_size as u64;
        let mut offset = 0u64;
        let mut k = 0u32;
        while offset < size {
            let len = chunk_size.min(size - offset) as usize;
            let mut data = vec![0u8; len];
            read_full(reader, &mut data)
                .map_err(|e| Error::io(format!("read {what}"), e))
                .and_then(|n| {
                    if n < len {
                        Err(Error::Invalid(format!(
                            "{what}: data ends at {} of {size} bytes (changed or truncated)",
                            offset + n as u64
                        )))
                    } else {
                        Ok(())
                    }
                })?;
            self.stats.bytes_read += len as u64;
            self.submit(file, k, data)?;
            offset += len as u64;
            k += 1;
        }
        let mut probe = [0u8; 1];
        if read_full(reader, &mut probe).map_err(|e| Error::io(format!("read {what}"), e))? != 0 {
            return Err(Error::Invalid(format!("{what}: holds more than the {size} bytes it had when scanned (changed while building)")));
        }
        Ok(())
    }

    fn submit(&mut self, file: FileId, k: u32, data: Vec<u8>) -> Result<()> {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.targets.push_back((file, k));
        let Some(jobs) = &self.jobs else {
            let done = process(&self.opts, &self.known, Job { seq, data })?;
            return self.commit(done);
        };
        jobs.send(Job { seq, data })
            .map_err(|_| Error::Invalid("chunk worker threads exited".into()))?;
        while self.next_seq - self.next_commit >= self.window as u64 {
            self.wait_one()?;
        }
        Ok(())
    }

    /// Take one result from the workers and commit everything that is now in order.
    fn wait_one(&mut self) -> Result<()> {
        let results = self.results.as_ref().expect("workers running");
        let done = results
            .recv()
            .map_err(|_| Error::Invalid("chunk worker threads exited".into()))??;
        self.pending.insert(done.seq, done);
        while let Some(done) = self.pending.remove(&self.next_commit) {
            self.commit(done)?;
        }
        Ok(())
    }

    fn commit(&mut self, done: Done) -> Result<()> {
        debug_assert_eq!(done.seq, self.next_commit);
        self.next_commit += 1;
        let (file, k) = self
            .targets
            .pop_front()
            .expect("a target per submitted chunk");
        let index = match self.table.find(&done.digest, done.size) {
            Some(i) => {
                self.stats.chunks_deduped += 1;
                self.stats.bytes_deduped += done.size as u64;
                i
            }
            None => {
                let loc = self.blob.write_chunk(
                    &done.stored,
                    done.size,
                    done.compressed,
                    &done.digest,
                )?;
                self.stats.chunks_written += 1;
                self.stats.bytes_written += done.stored.len() as u64;
                self.table.add(
                    crate::format::ChunkInfo {
                        blob_index: self.blob_index,
                        index: loc.index,
                        compressed_offset: loc.compressed_offset,
                        compressed_size: done.stored.len() as u32,
                        uncompressed_offset: loc.uncompressed_offset,
                        uncompressed_size: done.size,
                        compressed: done.compressed,
                        batch: None,
                        digest: Some(done.digest),
                        crc32: Some(done.crc32),
                    }
                    .to_record()
                    .expect("a chunk with a digest"),
                )
            }
        };
        self.assignments.push((file, k, index));
        Ok(())
    }

    /// Wait for every chunk in flight; returns (file, chunk position, chunk index) for every chunk.
    pub fn finish(mut self) -> Result<(Vec<Assignment>, ChunkStats)> {
        while self.next_commit < self.next_seq {
            self.wait_one()?;
        }
        self.stop();
        Ok((std::mem::take(&mut self.assignments), self.stats))
    }

    fn stop(&mut self) {
        // Closing the job channel ends the workers' loops.
        self.jobs = None;
        self.results = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for Chunker<'_> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Read until `buf` is full or the reader ends; returns the bytes read.
fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match reader.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
