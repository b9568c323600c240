//! Fuzz the bootstrap parsers (v5 and v6) and everything an opened image does with its metadata.
//!
//! The input is the bootstrap, and also the content of every blob the bootstrap names, so the blob meta
//! (chunk-info array, batch table), the chunk read path and the decompressors see hostile bytes too.
//! Any `Err` is fine; a panic, abort, hang or huge allocation is a bug.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use rafsd::format::MetaBytes;
use rafsd::image::MetaSource;
use rafsd::storage::BlobBackend;
use rafsd::{ImageOptions, RafsImage};

/// Serves the same bytes for every blob id.
struct SameBytes(Arc<Vec<u8>>);

impl BlobBackend for SameBytes {
    fn kind(&self) -> &'static str {
        "fuzz"
    }

    fn read_at(&self, _blob_id: &str, offset: u64, buf: &mut [u8]) -> rafsd::Result<usize> {
        let data = self.0.as_slice();
        let start = offset.min(data.len() as u64) as usize;
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }

    fn blob_size(&self, _blob_id: &str) -> rafsd::Result<u64> {
        Ok(self.0.len() as u64)
    }
}

fuzz_target!(|data: &[u8]| {
    let bytes = Arc::new(data.to_vec());
    let backend = Arc::new(SameBytes(bytes.clone()));
    let opened = RafsImage::from_metadata(
        MetaBytes::Owned(data.to_vec()),
        MetaSource::Bootstrap("fuzz".into()),
        backend,
        ImageOptions { validate: true, ..Default::default() },
    );
    if let Ok(image) = opened {
        let _ = rafsd::check::check(&image, 64);
        let _ = rafsd::inspect::to_json(&image);
    }
});
