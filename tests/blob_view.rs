//! The blob view (`fs_type` `"blob_view"`) of every reference RAFS v6 image: its `bootstrap` is the
//! bootstrap byte for byte, and each blob file is the blob's uncompressed layout (each chunk's verified
//! bytes at its uncompressed offset, zeros elsewhere) whatever the compressor, read here in pieces that
//! straddle chunk boundaries. Images the EROFS driver cannot take (v5, inline metadata) are refused.
//! The guest side of the same files is tests/vm_erofs.rs.

use kit::manifest;

use std::sync::Arc;

use rafsd::fs::blob_view::{BlobViewFs, BOOTSTRAP_NAME};
use rafsd::{Error, ImageOptions, RafsImage};

fn open(case: &str) -> Arc<RafsImage> {
    let opts = ImageOptions {
        validate: true,
        ..Default::default()
    };
    Arc::new(
        RafsImage::open_local(
            &manifest::case_bootstrap(case),
            Some(&manifest::case_blob_dir(case)),
            opts,
        )
        .unwrap_or_else(|e| panic!("{case}: {e}")),
    )
}

/// The uncompressed blob as the kernel expects it, built chunk by chunk from the image itself.
fn expected_blob(image: &RafsImage, b: u32) -> Vec<u8> {
    let size = image.info().blobs[b as usize].uncompressed_size as usize;
    let mut out = vec![0u8; size];
    let array = image.chunk_info_array(b).unwrap();
    for ci in 0..array.len() {
        let info = image.blob_chunk(b, ci).unwrap();
        let data = image.chunk_data(&info).unwrap();
        let at = info.uncompressed_offset as usize;
        out[at..at + data.len()].copy_from_slice(&data);
    }
    out
}

#[test]
fn blob_files_hold_the_uncompressed_layout_of_every_v6_fixture() {
    let mut checked = 0;
    for case in manifest::cases() {
        let image = open(&case);
        if image.info().version != 6 || !manifest::case_bootstrap(&case).ends_with("bootstrap") {
            continue;
        }
        let view = BlobViewFs::new(image.clone()).unwrap_or_else(|e| panic!("{case}: {e}"));
        let bootstrap = std::fs::read(manifest::case_bootstrap(&case)).unwrap();
        assert_eq!(
            view.read_file(BOOTSTRAP_NAME, 0, bootstrap.len() + 4096)
                .unwrap(),
            bootstrap,
            "{case}: bootstrap"
        );
        for (b, blob) in image.info().blobs.iter().enumerate() {
            let want = expected_blob(&image, b as u32);
            // An odd piece size: reads start and end inside chunks.
            let piece = 77_777;
            let mut got = Vec::with_capacity(want.len());
            let mut at = 0u64;
            loop {
                let part = view.read_file(&blob.id, at, piece).unwrap();
                if part.is_empty() {
                    break;
                }
                at += part.len() as u64;
                got.extend_from_slice(&part);
            }
            assert_eq!(got.len(), want.len(), "{case}: blob {} size", blob.id);
            let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
            assert_eq!(first_diff, None, "{case}: blob {} differs", blob.id);
            assert!(
                view.read_file(&blob.id, want.len() as u64, 4096)
                    .unwrap()
                    .is_empty(),
                "{case}: read past the end"
            );
        }
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} v6 fixtures with a bootstrap");
}

#[test]
fn images_the_kernel_cannot_mount_are_refused() {
    for (case, why) in [
        ("v5-lz4-blake3-repeatable", "v5"),
        ("v6-inline-meta", "separate bootstrap"),
    ] {
        match BlobViewFs::new(open(case)) {
            Err(Error::Unsupported(m)) => assert!(m.contains(why), "{case}: {m}"),
            Err(e) => panic!("{case}: want Unsupported, got {e}"),
            Ok(_) => panic!("{case}: the blob view accepted it"),
        }
    }
}
