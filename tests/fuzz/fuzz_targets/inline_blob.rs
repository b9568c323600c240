//! Fuzz the inline-meta path: the input is a data blob whose tail (tar header, ToC, image.boot) locates
//! the bootstrap. `RafsImage::open` reads it from a file, so the input is written to a file named like a
//! blob id in a scratch directory under /dev/shm (one per process, removed after every input) and opened
//! with a localfs backend over that directory.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rafsd::{ImageOptions, RafsImage};

fn scratch_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| PathBuf::from(format!("/dev/shm/rafsd-fuzz-inline-{}", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch_dir();
    std::fs::create_dir_all(dir).expect("create fuzz scratch directory");
    let path = dir.join("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
    std::fs::write(&path, data).expect("write fuzz input");
    let opened = RafsImage::open_local(&path, Some(dir), ImageOptions { validate: true, ..Default::default() });
    if let Ok(image) = opened {
        let _ = rafsd::check::check(&image, 64);
        let _ = rafsd::inspect::to_json(&image);
    }
    let _ = std::fs::remove_dir_all(dir);
});
