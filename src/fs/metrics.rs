//! Per-filesystem I/O counters in the shape of nydusd's `FsIoStats` (served by `/api/v1/metrics`), and the
//! optional per-file accounting behind `/metrics/files` and `/metrics/pattern` (`iostats_files`,
//! `access_pattern`, `latest_read_files`).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// FUSE operations counted, in nydusd's `fop_hits` / `fop_errors` order.
#[derive(Debug, Clone, Copy)]
pub enum Fop {
    Getattr = 0,
    Readlink,
    Open,
    Release,
    Read,
    Statfs,
    Getxattr,
    Listxattr,
    Opendir,
    Lookup,
    Readdir,
    Readdirplus,
    Access,
    Forget,
    BatchForget,
}

const FOPS: usize = 15;

/// Which per-file records to keep (the RAFS config's `iostats_files`, `access_pattern`, `latest_read_files`).
#[derive(Debug, Clone, Copy, Default)]
pub struct FileMetricsOptions {
    pub iostats_files: bool,
    pub access_pattern: bool,
    pub latest_read_files: bool,
}

impl FileMetricsOptions {
    fn any(&self) -> bool {
        self.iostats_files || self.access_pattern || self.latest_read_files
    }
}

/// Most inodes that get per-file records, whatever the image claims (about 360 bytes each, so at most
/// ~380 MB for an image of a million files or more).
pub const MAX_FILE_RECORDS: usize = 1 << 20;

/// Which inodes may get a per-file record: only inodes of the image (`exists`), and at most `max` of
/// them (the image's inode count, capped at [`MAX_FILE_RECORDS`]). A guest naming inode numbers the image
/// does not have cannot grow the records.
pub struct FileLimit {
    pub max: usize,
    pub exists: Box<dyn Fn(u64) -> bool + Send + Sync>,
}

impl FileLimit {
    pub fn new(inode_count: u64, exists: impl Fn(u64) -> bool + Send + Sync + 'static) -> Self {
        FileLimit {
            max: inode_count.min(MAX_FILE_RECORDS as u64) as usize,
            exists: Box::new(exists),
        }
    }
}

#[derive(Default)]
pub struct FsMetrics {
    pub nr_opens: AtomicU64,
    pub data_read: AtomicU64,
    /// Reads by size: <1K, <4K, <16K, <64K, <128K, <512K, <1M, 1M+.
    pub block_count_read: [AtomicU64; 8],
    pub fop_hits: [AtomicU64; FOPS],
    pub fop_errors: [AtomicU64; FOPS],
    /// None unless an option asks for per-file records, so the default hot path pays one branch.
    files: Option<FileMetrics>,
}

/// Size bucket of one read, as in `block_count_read` (and the backend's `read_count_block_size_dist`).
pub(crate) fn size_bucket(bytes: usize) -> usize {
    match bytes {
        0..1024 => 0,
        1024..4096 => 1,
        4096..16384 => 2,
        16384..65536 => 3,
        65536..131072 => 4,
        131072..524288 => 5,
        524288..1048576 => 6,
        _ => 7,
    }
}

fn load(v: &[AtomicU64]) -> Vec<u64> {
    v.iter().map(|a| a.load(Ordering::Relaxed)).collect()
}

impl FsMetrics {
    pub fn new(opts: FileMetricsOptions, limit: FileLimit) -> Self {
        FsMetrics {
            files: opts.any().then(|| FileMetrics {
                opts,
                limit,
                full_warned: AtomicBool::new(false),
                inodes: RwLock::default(),
                latest: Mutex::default(),
            }),
            ..Default::default()
        }
    }

    pub fn record<T>(&self, fop: Fop, result: &std::io::Result<T>) {
        self.fop_hits[fop as usize].fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            self.fop_errors[fop as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count `fop` on the filesystem and, when per-file stats are on, on RAFS inode `ino`.
    pub fn record_on<T>(&self, ino: u64, fop: Fop, result: &std::io::Result<T>) {
        self.record(fop, result);
        if let Some(f) = self.files.as_ref().filter(|f| f.opts.iostats_files) {
            f.with_inode(ino, |s| s.record(fop, result.is_err()));
        }
    }

    /// Count a successful read of `bytes` from RAFS inode `ino`.
    pub fn record_read(&self, ino: u64, bytes: usize) {
        self.data_read.fetch_add(bytes as u64, Ordering::Relaxed);
        let bucket = size_bucket(bytes);
        self.block_count_read[bucket].fetch_add(1, Ordering::Relaxed);
        if let Some(f) = &self.files {
            f.record_read(ino, bytes as u64, bucket);
        }
    }

    pub fn to_json(&self, id: &str) -> serde_json::Value {
        let opts = self.files.as_ref().map(|f| f.opts).unwrap_or_default();
        serde_json::json!({
            "files_account_enabled": opts.iostats_files,
            "access_pattern_enabled": opts.access_pattern,
            "record_latest_read_files_enabled": opts.latest_read_files,
            "measure_latency": false,
            "id": id,
            "nr_opens": self.nr_opens.load(Ordering::Relaxed),
            "data_read": self.data_read.load(Ordering::Relaxed),
            "block_count_read": load(&self.block_count_read),
            "fop_hits": load(&self.fop_hits),
            "fop_errors": load(&self.fop_errors),
            "fop_cumulative_latency_total": vec![0u64; FOPS],
            "read_latency_dist": vec![0u64; 8],
        })
    }

    /// `/metrics/files`: RAFS ino (as a string) → InodeIoStats; `{}` when `iostats_files` is off.
    pub fn files_json(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        if let Some(f) = self.files.as_ref().filter(|f| f.opts.iostats_files) {
            let inodes = f.inodes.read().unwrap_or_else(|e| e.into_inner());
            let mut sorted: Vec<_> = inodes.iter().collect();
            sorted.sort_by_key(|(ino, _)| **ino);
            for (ino, s) in sorted {
                out.insert(
                    ino.to_string(),
                    serde_json::json!({
                        "total_fops": s.total_fops.load(Ordering::Relaxed),
                        "data_read": s.data_read.load(Ordering::Relaxed),
                        "block_count_read": load(&s.block_count_read),
                        "fop_hits": load(&s.fop_hits),
                        "fop_errors": load(&s.fop_errors),
                    }),
                );
            }
        }
        serde_json::Value::Object(out)
    }

    /// `/metrics/files?latest=true`: inodes read since the last call, as runs `[ino]` or `[first, last]`;
    /// reading clears the set. `[]` when `latest_read_files` is off.
    pub fn take_latest_read_json(&self) -> serde_json::Value {
        let Some(f) = self.files.as_ref().filter(|f| f.opts.latest_read_files) else {
            return serde_json::json!([]);
        };
        let set = std::mem::take(&mut *f.latest.lock().unwrap_or_else(|e| e.into_inner()));
        serde_json::json!(runs(set.into_iter()))
    }

    /// `/metrics/pattern`: files read at least once, with their first read time; `[]` when
    /// `access_pattern` is off.
    pub fn pattern_json(&self) -> serde_json::Value {
        let Some(f) = self.files.as_ref().filter(|f| f.opts.access_pattern) else {
            return serde_json::json!([]);
        };
        let inodes = f.inodes.read().unwrap_or_else(|e| e.into_inner());
        let mut sorted: Vec<_> = inodes
            .iter()
            .filter(|(_, s)| s.nr_read.load(Ordering::Relaxed) > 0)
            .collect();
        sorted.sort_by_key(|(ino, _)| **ino);
        let list: Vec<_> = sorted
            .into_iter()
            .map(|(ino, s)| {
                let (secs, nanos) = s.first_read();
                serde_json::json!({
                    "ino": ino,
                    "nr_read": s.nr_read.load(Ordering::Relaxed),
                    "first_access_time_secs": secs,
                    "first_access_time_nanos": nanos,
                })
            })
            .collect();
        serde_json::Value::Array(list)
    }
}

/// Sorted inode numbers as runs of consecutive numbers: `[n]` alone, `[first, last]` for longer runs.
fn runs(sorted: impl Iterator<Item = u64>) -> Vec<Vec<u64>> {
    let mut out: Vec<Vec<u64>> = Vec::new();
    for ino in sorted {
        match out.last_mut() {
            Some(run) if run.last().is_some_and(|&l| l.checked_add(1) == Some(ino)) => {
                if run.len() == 1 {
                    run.push(ino);
                } else {
                    run[1] = ino;
                }
            }
            _ => out.push(vec![ino]),
        }
    }
    out
}

/// Per-file records: one entry per inode of the image touched (344 bytes of counters plus the map slot),
/// so memory is bounded by the inodes the workload touched and by `limit`.
struct FileMetrics {
    opts: FileMetricsOptions,
    limit: FileLimit,
    /// The limit was reached and said so once in the log.
    full_warned: AtomicBool,
    /// Read-locked on every counted operation; write-locked only the first time an inode is seen.
    inodes: RwLock<HashMap<u64, InodeStats>>,
    /// Inodes read since the last `latest=true` query (at most `limit.max`).
    latest: Mutex<BTreeSet<u64>>,
}

impl FileMetrics {
    /// Run `f` on the record of `ino` under the read lock (no refcount traffic). The first sighting of an
    /// inode checks that the image has it and that there is room, then takes the write lock once to add
    /// its record; an inode that gets none is only counted filesystem-wide.
    fn with_inode(&self, ino: u64, f: impl Fn(&InodeStats)) {
        if let Some(s) = self
            .inodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino)
        {
            return f(s);
        }
        if !(self.limit.exists)(ino) {
            return;
        }
        let mut inodes = self.inodes.write().unwrap_or_else(|e| e.into_inner());
        if !inodes.contains_key(&ino) && !self.room(inodes.len()) {
            return;
        }
        f(inodes.entry(ino).or_default());
    }

    /// Whether a set of `len` records may take one more.
    fn room(&self, len: usize) -> bool {
        if len < self.limit.max {
            return true;
        }
        if !self.full_warned.swap(true, Ordering::Relaxed) {
            log::warn!(
                "per-file metrics: {} inodes recorded, the most this image gets; others are not recorded",
                self.limit.max
            );
        }
        false
    }

    fn record_read(&self, ino: u64, bytes: u64, bucket: usize) {
        if self.opts.iostats_files || self.opts.access_pattern {
            self.with_inode(ino, |s| {
                if self.opts.iostats_files {
                    s.data_read.fetch_add(bytes, Ordering::Relaxed);
                    s.block_count_read[bucket].fetch_add(1, Ordering::Relaxed);
                }
                if self.opts.access_pattern && s.nr_read.fetch_add(1, Ordering::Relaxed) == 0 {
                    let t = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default();
                    s.first_read_secs.store(t.as_secs(), Ordering::Relaxed);
                    s.first_read_nanos
                        .store(u64::from(t.subsec_nanos()), Ordering::Relaxed);
                }
            });
        }
        if self.opts.latest_read_files {
            let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
            if latest.contains(&ino) || ((self.limit.exists)(ino) && self.room(latest.len())) {
                latest.insert(ino);
            }
        }
    }
}

#[derive(Default)]
struct InodeStats {
    total_fops: AtomicU64,
    data_read: AtomicU64,
    block_count_read: [AtomicU64; 8],
    fop_hits: [AtomicU64; FOPS],
    fop_errors: [AtomicU64; FOPS],
    nr_read: AtomicU64,
    first_read_secs: AtomicU64,
    first_read_nanos: AtomicU64,
}

impl InodeStats {
    fn record(&self, fop: Fop, failed: bool) {
        self.total_fops.fetch_add(1, Ordering::Relaxed);
        self.fop_hits[fop as usize].fetch_add(1, Ordering::Relaxed);
        if failed {
            self.fop_errors[fop as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn first_read(&self) -> (u64, u64) {
        (
            self.first_read_secs.load(Ordering::Relaxed),
            self.first_read_nanos.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_reads_come_out_as_runs() {
        let r = runs([1, 5, 65, 66, 40001, 40002, 40003].into_iter());
        assert_eq!(r, vec![vec![1], vec![5], vec![65, 66], vec![40001, 40003]]);
        assert!(runs(std::iter::empty()).is_empty());
        assert_eq!(
            runs([u64::MAX - 1, u64::MAX].into_iter()),
            vec![vec![u64::MAX - 1, u64::MAX]]
        );
    }

    #[test]
    fn per_file_records_follow_the_options() {
        let off = FsMetrics::default();
        off.record_read(7, 100);
        off.record_on(7, Fop::Read, &Ok(()));
        assert_eq!(off.files_json(), serde_json::json!({}));
        assert_eq!(off.pattern_json(), serde_json::json!([]));
        assert_eq!(off.take_latest_read_json(), serde_json::json!([]));

        let on = FsMetrics::new(
            FileMetricsOptions {
                iostats_files: true,
                access_pattern: true,
                latest_read_files: true,
            },
            FileLimit::new(100, |ino| ino < 10),
        );
        on.record_read(7, 5000);
        on.record_on(7, Fop::Read, &Ok(()));
        on.record_on::<()>(8, Fop::Getattr, &Err(std::io::Error::from_raw_os_error(2)));
        let files = on.files_json();
        assert_eq!(files["7"]["data_read"], 5000);
        assert_eq!(files["7"]["block_count_read"][2], 1);
        assert_eq!(files["7"]["fop_hits"][Fop::Read as usize], 1);
        assert_eq!(files["8"]["fop_errors"][Fop::Getattr as usize], 1);
        let pattern = on.pattern_json();
        assert_eq!(
            pattern.as_array().unwrap().len(),
            1,
            "only inodes with reads"
        );
        assert_eq!(pattern[0]["ino"], 7);
        assert_eq!(on.take_latest_read_json(), serde_json::json!([[7]]));
        assert_eq!(on.take_latest_read_json(), serde_json::json!([]));
    }

    #[test]
    fn records_are_kept_only_for_inodes_of_the_image_and_up_to_the_limit() {
        let m = FsMetrics::new(
            FileMetricsOptions {
                iostats_files: true,
                access_pattern: true,
                latest_read_files: true,
            },
            FileLimit::new(3, |ino| ino % 2 == 0),
        );
        for ino in 0..1000u64 {
            m.record_on::<()>(
                ino,
                Fop::Getattr,
                &Err(std::io::Error::from_raw_os_error(5)),
            );
            m.record_read(ino, 10);
        }
        let files = m.files_json();
        let keys: Vec<&String> = files.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["0", "2", "4"], "three inodes that exist");
        assert_eq!(m.pattern_json().as_array().unwrap().len(), 3);
        assert_eq!(
            m.take_latest_read_json(),
            serde_json::json!([[0], [2], [4]])
        );
        // Filesystem-wide counters still see every request.
        assert_eq!(
            m.fop_errors[Fop::Getattr as usize].load(Ordering::Relaxed),
            1000
        );
        assert_eq!(m.data_read.load(Ordering::Relaxed), 10_000);
    }
}
