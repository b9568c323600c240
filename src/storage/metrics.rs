//! Backend traffic of one image in the shape of nydusd's `BackendMetrics` (`/api/v1/metrics/backend`):
//! every read of a blob range, failed or not, with its size and latency.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::BlobBackend;
use crate::error::Result;
use crate::fs::metrics::size_bucket;

/// Latency buckets in milliseconds, as nydusd's: <=1, <=20, <=50, <=100, <=500, <=1000, <=2000, more.
const LATENCY_MS: [u64; 7] = [1, 20, 50, 100, 500, 1000, 2000];

fn latency_bucket(ms: u64) -> usize {
    LATENCY_MS.iter().position(|&l| ms <= l).unwrap_or(7)
}

#[derive(Default)]
pub struct BackendMetrics {
    read_count: AtomicU64,
    read_errors: AtomicU64,
    read_amount_total: AtomicU64,
    latency_millis_total: AtomicU64,
    /// Per request-size bucket (as `block_count_read`): cumulative latency, and request count.
    latency_millis_by_size: [AtomicU64; 8],
    count_by_size: [AtomicU64; 8],
    /// [size bucket][latency bucket] request counts.
    latency_by_size: [[AtomicU64; 8]; 8],
}

fn load(v: &[AtomicU64]) -> Vec<u64> {
    v.iter().map(|a| a.load(Ordering::Relaxed)).collect()
}

impl BackendMetrics {
    /// One read of `len` bytes that took `elapsed`; `got` is what it returned (0 when it failed).
    pub fn record(&self, len: usize, got: Option<usize>, elapsed: Duration) {
        let ms = elapsed.as_millis().min(u64::MAX as u128) as u64;
        let size = size_bucket(len);
        self.read_count.fetch_add(1, Ordering::Relaxed);
        if got.is_none() {
            self.read_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.read_amount_total
            .fetch_add(got.unwrap_or(0) as u64, Ordering::Relaxed);
        self.latency_millis_total.fetch_add(ms, Ordering::Relaxed);
        self.latency_millis_by_size[size].fetch_add(ms, Ordering::Relaxed);
        self.count_by_size[size].fetch_add(1, Ordering::Relaxed);
        self.latency_by_size[size][latency_bucket(ms)].fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes of a streamed read ([`BlobBackend::open_range`]) as they arrive; the read itself was recorded
    /// when it opened, with none.
    pub fn add_amount(&self, n: usize) {
        self.read_amount_total
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Reads so far, failed ones included.
    pub fn reads(&self) -> u64 {
        self.read_count.load(Ordering::Relaxed)
    }

    /// Bytes the backend returned so far.
    pub fn bytes(&self) -> u64 {
        self.read_amount_total.load(Ordering::Relaxed)
    }

    /// nydusd's JSON keys, for a backend of type `kind` (`localfs`, `registry`, `s3`, `oss`, `http-proxy`).
    pub fn to_json(&self, kind: &str) -> serde_json::Value {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "backend_type": kind,
            "read_count": get(&self.read_count),
            "read_errors": get(&self.read_errors),
            "read_amount_total": get(&self.read_amount_total),
            "read_cumulative_latency_millis_total": get(&self.latency_millis_total),
            "read_cumulative_latency_millis_dist": load(&self.latency_millis_by_size),
            "read_count_block_size_dist": load(&self.count_by_size),
            "read_latency_sizes_dist": self.latency_by_size.iter().map(|r| load(r)).collect::<Vec<_>>(),
        })
    }
}

/// A backend whose reads are counted in a [`BackendMetrics`].
pub struct Metered {
    inner: Arc<dyn BlobBackend>,
    metrics: Arc<BackendMetrics>,
}

impl Metered {
    pub fn new(inner: Arc<dyn BlobBackend>, metrics: Arc<BackendMetrics>) -> Self {
        Metered { inner, metrics }
    }
}

impl BlobBackend for Metered {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn read_at(&self, blob_id: &str, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let start = Instant::now();
        let r = self.inner.read_at(blob_id, offset, buf);
        self.metrics
            .record(buf.len(), r.as_ref().ok().copied(), start.elapsed());
        r
    }

    fn open_range(&self, blob_id: &str, offset: u64, len: usize) -> Result<Box<dyn Read + Send>> {
        let start = Instant::now();
        let r = self.inner.open_range(blob_id, offset, len);
        self.metrics
            .record(len, r.as_ref().ok().map(|_| 0), start.elapsed());
        Ok(Box::new(MeteredRead {
            inner: r?,
            metrics: self.metrics.clone(),
        }))
    }

    fn blob_size(&self, blob_id: &str) -> Result<u64> {
        self.inner.blob_size(blob_id)
    }

    // Every other method forwards too: the meter must not change what the backend is.
    fn is_remote(&self) -> bool {
        self.inner.is_remote()
    }

    fn set_registry_auth(&self, auth: Option<&str>) -> Result<()> {
        self.inner.set_registry_auth(auth)
    }
}

/// A streamed read counting its bytes as they arrive.
struct MeteredRead {
    inner: Box<dyn Read + Send>,
    metrics: Arc<BackendMetrics>,
}

impl Read for MeteredRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.metrics.add_amount(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A remote backend that takes credentials, to see the meter forward what it does not measure.
    struct Remote;
    impl BlobBackend for Remote {
        fn kind(&self) -> &'static str {
            "remote"
        }
        fn read_at(&self, _: &str, _: u64, _: &mut [u8]) -> Result<usize> {
            Ok(0)
        }
        fn blob_size(&self, _: &str) -> Result<u64> {
            Ok(0)
        }
        fn is_remote(&self) -> bool {
            true
        }
        fn set_registry_auth(&self, _: Option<&str>) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_meter_is_the_backend_it_wraps() {
        let m = Metered::new(Arc::new(Remote), Arc::new(BackendMetrics::default()));
        assert!(m.is_remote(), "no network at mount depends on it");
        assert!(
            m.set_registry_auth(Some("dTpw")).is_ok(),
            "credential renewal depends on it"
        );
    }

    /// A local blob of 100 bytes, 0..100.
    struct Local;
    impl BlobBackend for Local {
        fn kind(&self) -> &'static str {
            "localfs"
        }
        fn read_at(&self, _: &str, offset: u64, buf: &mut [u8]) -> Result<usize> {
            let n = buf.len().min(100usize.saturating_sub(offset as usize));
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = (offset as usize + i) as u8;
            }
            Ok(n)
        }
        fn blob_size(&self, _: &str) -> Result<u64> {
            Ok(100)
        }
    }

    #[test]
    fn a_streamed_read_counts_once_with_the_bytes_that_arrived() {
        let metrics = Arc::new(BackendMetrics::default());
        let m = Metered::new(Arc::new(Local), metrics.clone());
        let mut r = m.open_range("b", 10, 50).unwrap();
        let mut got = [0u8; 20];
        r.read_exact(&mut got).unwrap();
        assert_eq!(got[0], 10);
        assert_eq!(
            metrics.to_json("x")["read_amount_total"],
            20,
            "only what arrived"
        );
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        let j = metrics.to_json("x");
        assert_eq!(
            (j["read_count"].clone(), j["read_amount_total"].clone()),
            (1.into(), 50.into())
        );
    }

    #[test]
    fn reads_are_counted_by_outcome_size_and_latency() {
        let m = BackendMetrics::default();
        m.record(4096, Some(4096), Duration::from_micros(300));
        m.record(1 << 20, None, Duration::from_millis(30));
        m.record(100, Some(60), Duration::from_secs(3));
        let j = m.to_json("registry");
        assert_eq!(j["backend_type"], "registry");
        assert_eq!(j["read_count"], 3);
        assert_eq!(j["read_errors"], 1);
        assert_eq!(j["read_amount_total"], 4156);
        assert_eq!(j["read_cumulative_latency_millis_total"], 3030);
        assert_eq!(
            j["read_count_block_size_dist"],
            serde_json::json!([1, 0, 1, 0, 0, 0, 0, 1])
        );
        assert_eq!(j["read_latency_sizes_dist"][2][0], 1);
        assert_eq!(j["read_latency_sizes_dist"][7][2], 1);
        assert_eq!(j["read_latency_sizes_dist"][0][7], 1);
        assert_eq!(j["read_cumulative_latency_millis_dist"][7], 30);
    }
}
