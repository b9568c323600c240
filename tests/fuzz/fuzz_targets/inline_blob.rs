//! Fuzz the inline-meta path: the input is a data blob whose tail (tar header, ToC, image.boot) locates
//! the bootstrap. `RafsImage::open` reads it from a file, so the input is written to a file under /dev/shm
//! (one per process) and opened with a localfs backend over the same directory.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rafsd::{ImageOptions, RafsImage};

/// A private directory holding one file named like a blob id, rewritten for every input.
fn blob_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = PathBuf::from(format!("/dev/shm/rafsd-fuzz-inline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create fuzz scratch directory");
        dir.join("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
    })
}

fuzz_target!(|data: &[u8]| {
    let path = blob_path();
    std::fs::write(path, data).expect("write fuzz input");
    let dir = path.parent().unwrap();
    if let Ok(image) = RafsImage::open_local(path, Some(dir), ImageOptions { validate: true, ..Default::default() }) {
        let _ = rafsd::check::check(&image, 64);
        let _ = rafsd::inspect::to_json(&image);
    }
});
