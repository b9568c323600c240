//! Image building the benchmarks share: a large incompressible file, and `rafsd build` of a source tree.

use std::io::Write;
use std::path::Path;
use std::process::Output;

/// Write `size_mib` MiB of `next()`'s 64-bit words (little-endian) to `path`: data no compressor shrinks,
/// so the blob holds the full size.
pub fn write_random_file(path: &Path, size_mib: u64, mut next: impl FnMut() -> u64) {
    let mut file = std::fs::File::create(path).unwrap();
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..size_mib {
        for c in block.chunks_mut(8) {
            c.copy_from_slice(&next().to_le_bytes());
        }
        file.write_all(&block).unwrap();
    }
}

/// `rafsd build SRC --bootstrap BOOTSTRAP --blob-dir BLOBS -l warn`, which must succeed; its output.
pub fn rafsd_build(src: &Path, bootstrap: &Path, blobs: &Path) -> Output {
    let out = crate::daemon::rafsd()
        .arg("build")
        .arg(src)
        .arg("--bootstrap")
        .arg(bootstrap)
        .arg("--blob-dir")
        .arg(blobs)
        .args(["-l", "warn"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rafsd build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
