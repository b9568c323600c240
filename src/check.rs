//! `rafsd check`: walk the whole tree, read every file through the verified data path, and report.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::InodeAttr;
use crate::image::{RafsImage, WalkEvent};

#[derive(Debug, Default, Clone)]
pub struct CheckReport {
    pub entries: u64,
    pub files: u64,
    /// File data read and verified (holes of sparse files are not read, so not counted).
    pub bytes: u64,
    /// One line per problem, naming the path.
    pub errors: Vec<String>,
}

/// Read every regular file once (hard links once) and every symlink and xattr. Stops after
/// `max_errors` problems so a badly broken image still finishes quickly.
pub fn check(image: &RafsImage, max_errors: usize) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let mut seen = std::collections::HashSet::new();
    let mut buf = vec![0u8; 1 << 20];
    let walked = image.walk(&mut |rel, attr, event| {
        if event == WalkEvent::DirDone {
            return Ok(());
        }
        report.entries += 1;
        let shown = if rel.as_os_str().is_empty() {
            Path::new("/")
        } else {
            rel
        };
        let mut problem = |e: Error| -> Result<()> {
            report.errors.push(format!("{}: {e}", shown.display()));
            if report.errors.len() >= max_errors {
                return Err(Error::Invalid(format!("stopped after {max_errors} errors")));
            }
            Ok(())
        };
        if let Err(e) = image.xattrs(attr.ino) {
            problem(e)?;
        }
        if attr.is_symlink() {
            if let Err(e) = image.readlink(attr.ino) {
                problem(e)?;
            }
        }
        if attr.is_reg() && seen.insert(attr.ino) {
            let mut read = 0;
            if let Err(e) = read_file(image, attr, &mut buf, &mut read) {
                problem(e)?;
            }
            report.files += 1;
            report.bytes += read;
        }
        Ok(())
    });
    if let Err(e) = walked {
        report.errors.push(format!("walk: {e}"));
    }
    Ok(report)
}

/// Read every byte of a regular file that chunks hold through the verified data path, adding the bytes
/// read to `read`. Holes are skipped: they hold no data to verify, and a hostile sparse file can claim
/// 2^62 bytes over no chunk at all, which read as zeros would never finish.
fn read_file(image: &RafsImage, attr: &InodeAttr, buf: &mut [u8], read: &mut u64) -> Result<()> {
    for (start, end) in image.data_extents(attr.ino)? {
        let mut offset = start;
        while offset < end {
            let want = (end - offset).min(buf.len() as u64) as usize;
            match image.read(attr.ino, offset, &mut buf[..want])? {
                0 => {
                    return Err(Error::Corrupt(format!(
                        "data ends at {offset} of {}",
                        attr.size
                    )))
                }
                n => {
                    offset += n as u64;
                    *read += n as u64;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::check;
    use crate::format::{Digester, MetaBytes};
    use crate::image::{ImageOptions, MetaSource, RafsImage};
    use crate::storage::digest::digest;
    use crate::storage::BlobBackend;

    /// One blob held in memory.
    struct MemBlob(Vec<u8>);

    impl BlobBackend for MemBlob {
        fn kind(&self) -> &'static str {
            "memory"
        }
        fn read_at(&self, _blob_id: &str, offset: u64, buf: &mut [u8]) -> crate::Result<usize> {
            let start = offset.min(self.0.len() as u64) as usize;
            let n = buf.len().min(self.0.len() - start);
            buf[..n].copy_from_slice(&self.0[start..start + n]);
            Ok(n)
        }
        fn blob_size(&self, _blob_id: &str) -> crate::Result<u64> {
            Ok(self.0.len() as u64)
        }
    }

    /// The 4 KiB chunk of the sparse file below.
    pub(crate) const SPARSE_CHUNK_AT: u64 = 1 << 30;

    /// A hand-made RAFS v5 image (4 KiB chunks, no compression, blake3): root (inode 1) holding `file`
    /// (inode 2), a HAS_HOLE regular file of `size` bytes whose only chunk, 4096 bytes of 0xAB, sits at
    /// file offset `SPARSE_CHUNK_AT`. Everything else in it is a hole.
    pub(crate) fn sparse_v5_image(size: u64) -> RafsImage {
        use rafs_layout::v5::{ChunkRecord, ExtBlobEntry, Inode, SuperBlock, I_HAS_HOLE};
        use rafs_layout::{Field, Record};
        let chunk = vec![0xABu8; 4096];
        let mut b = vec![0u8; 8624];
        // Superblock: chunk size 4 KiB, COMPRESSION_NONE | HASH_BLAKE3, 2 inodes, inode table at 8192,
        // blob table at 8200 (16 bytes), extended blob table at 8216 (1 entry).
        SuperBlock {
            magic: rafs_layout::v5::RAFS_V5_MAGIC,
            fs_version: rafs_layout::v5::RAFS_V5_VERSION,
            sb_size: 8192,
            block_size: 4096,
            flags: 0x1 | 0x4,
            inodes_count: 2,
            inode_table_offset: 8192,
            prefetch_table_offset: 0,
            blob_table_offset: 8200,
            inode_table_entries: 2,
            prefetch_table_entries: 0,
            blob_table_size: 16,
            extended_blob_table_entries: 1,
            extended_blob_table_offset: 8216,
        }
        .write_to(&mut b);
        // Inode table: records at 8280 and 8408, as offsets >> 3.
        (8280u32 >> 3).put(&mut b, 8192);
        (8408u32 >> 3).put(&mut b, 8196);
        // Blob table: readahead (0, 0), id "blob0". Extended entry: 1 chunk, 4096 bytes both ways.
        b[8208..8213].copy_from_slice(b"blob0");
        ExtBlobEntry {
            chunk_count: 1,
            features: 0,
            uncompressed_size: 4096,
            compressed_size: 4096,
        }
        .write_to(&mut b[8216..]);
        // Root directory: ino 1, drwxr-xr-x, one child in slot 2.
        Inode {
            ino: 1,
            mode: libc::S_IFDIR | 0o755,
            size: 4096,
            nlink: 2,
            child_index: 2,
            child_count: 1,
            ..Inode::default()
        }
        .write_to(&mut b[8280..]);
        // "file": ino 2, -rw-r--r--, `size` bytes, HAS_HOLE, one chunk record after its padded name.
        Inode {
            ino: 2,
            mode: libc::S_IFREG | 0o644,
            size,
            flags: I_HAS_HOLE,
            nlink: 1,
            child_count: 1,
            name_size: 4,
            ..Inode::default()
        }
        .write_to(&mut b[8408..]);
        b[8536..8540].copy_from_slice(b"file");
        ChunkRecord {
            digest: digest(Digester::Blake3, &chunk),
            compressed_size: 4096,
            uncompressed_size: 4096,
            file_offset: SPARSE_CHUNK_AT,
            ..ChunkRecord::default()
        }
        .write_to(&mut b[8544..]);
        RafsImage::from_metadata(
            MetaBytes::Owned(b),
            MetaSource::Bootstrap("sparse".into()),
            Arc::new(MemBlob(chunk)),
            ImageOptions {
                validate: true,
                ..Default::default()
            },
        )
        .expect("hand-made sparse v5 image opens")
    }

    #[test]
    fn holes_are_skipped_not_read() {
        // Found by the `metadata` fuzz target: a HAS_HOLE file claiming 2^62 bytes made `check` read
        // 2^42 windows of zeros (a libFuzzer timeout). Only the chunk is read now.
        let image = sparse_v5_image(1 << 62);
        let start = Instant::now();
        let report = check(&image, 10).unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "check took {:?}",
            start.elapsed()
        );
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!((report.entries, report.files, report.bytes), (2, 1, 4096));
        // The hole still reads as zeros and the chunk as its data, through the ordinary read path.
        let mut buf = vec![1u8; 8192];
        assert_eq!(
            image.read(2, SPARSE_CHUNK_AT - 4096, &mut buf).unwrap(),
            8192
        );
        assert!(buf[..4096].iter().all(|&x| x == 0) && buf[4096..].iter().all(|&x| x == 0xAB));
        assert_eq!(
            image.data_extents(2).unwrap(),
            vec![(SPARSE_CHUNK_AT, SPARSE_CHUNK_AT + 4096)]
        );
    }
}
