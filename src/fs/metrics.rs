//! Per-filesystem I/O counters in the shape of nydusd's `FsIoStats` (served by `/api/v1/metrics`).

use std::sync::atomic::{AtomicU64, Ordering};

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

#[derive(Default)]
pub struct FsMetrics {
    pub nr_opens: AtomicU64,
    pub data_read: AtomicU64,
    /// Reads by size: <1K, <4K, <16K, <64K, <128K, <512K, <1M, 1M+.
    pub block_count_read: [AtomicU64; 8],
    pub fop_hits: [AtomicU64; FOPS],
    pub fop_errors: [AtomicU64; FOPS],
}

impl FsMetrics {
    pub fn record<T>(&self, fop: Fop, result: &std::io::Result<T>) {
        self.fop_hits[fop as usize].fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            self.fop_errors[fop as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn record_read(&self, bytes: usize) {
        self.data_read.fetch_add(bytes as u64, Ordering::Relaxed);
        let bucket = match bytes {
            0..1024 => 0,
            1024..4096 => 1,
            4096..16384 => 2,
            16384..65536 => 3,
            65536..131072 => 4,
            131072..524288 => 5,
            524288..1048576 => 6,
            _ => 7,
        };
        self.block_count_read[bucket].fetch_add(1, Ordering::Relaxed);
    }

    pub fn to_json(&self, id: &str) -> serde_json::Value {
        let load = |v: &[AtomicU64]| {
            v.iter()
                .map(|a| a.load(Ordering::Relaxed))
                .collect::<Vec<_>>()
        };
        serde_json::json!({
            "files_account_enabled": false,
            "access_pattern_enabled": false,
            "record_latest_read_files_enabled": false,
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
}
