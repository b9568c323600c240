//! Reading an image's metadata from a file: a bootstrap is mapped as it is; a data blob with inlined
//! metadata (`--blob-inline-meta`) has its bootstrap found through the trailing tar header or ToC,
//! bounds-checked, decompressed and checked against the ToC's digest.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::MetaSource;
use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::limits::{self, MAX_INLINE_BOOTSTRAP_BYTES};
use crate::format::toc::{self, TarHeader, TAR_HEADER_SIZE};
use crate::format::{v5, v6, MetaBytes};
use crate::storage::compress;
use crate::storage::digest::{digest, hex};

/// Read the metadata at `path`: map a bootstrap, or extract the bootstrap from an inline-meta blob.
pub fn load_metadata(path: &Path) -> Result<(MetaBytes, MetaSource)> {
    let file = File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
        .len();
    let mut head = [0u8; 1028];
    let n = read_at(&file, 0, &mut head)?;
    if v5::detect(&head[..n]) || v6::detect(&head[..n]) {
        // SAFETY: the mapping is read-only and private; bootstraps are immutable image files.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::io(format!("mmap {}", path.display()), e))?;
        return Ok((
            MetaBytes::Mapped(map),
            MetaSource::Bootstrap(path.to_path_buf()),
        ));
    }
    let blob_id = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: no usable file name for a blob id",
                path.display()
            ))
        })?
        .to_string();
    let bytes = extract_inline_bootstrap(&file, size).map_err(|e| match e {
        Error::Corrupt(m) => corrupt!(
            "{}: not a RAFS bootstrap, and not a blob with inlined metadata ({m})",
            path.display()
        ),
        other => other,
    })?;
    crate::format::check_blob_id(&blob_id)?;
    Ok((
        MetaBytes::Owned(bytes),
        MetaSource::InlineBlob {
            path: path.to_path_buf(),
            blob_id,
        },
    ))
}

fn read_at(file: &File, offset: u64, buf: &mut [u8]) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read metadata", e)),
        }
    }
    Ok(done)
}

fn read_section(file: &File, size: u64, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    if offset.checked_add(len).is_none_or(|end| end > size) || len > MAX_INLINE_BOOTSTRAP_BYTES {
        return Err(corrupt!(
            "{what} at {offset}+{len} lies outside the {size}-byte blob"
        ));
    }
    let mut buf = vec![0u8; len as usize];
    if read_at(file, offset, &mut buf)? != buf.len() {
        return Err(corrupt!("{what}: short read"));
    }
    Ok(buf)
}

/// The last tar header of a blob and the offset where its payload starts.
fn tail_section(file: &File, size: u64) -> Result<(TarHeader, u64)> {
    if size < TAR_HEADER_SIZE {
        return Err(corrupt!("file of {size} bytes is too short"));
    }
    let header = toc::parse_tar_header(&read_section(
        file,
        size,
        size - TAR_HEADER_SIZE,
        TAR_HEADER_SIZE,
        "tar header",
    )?)?;
    let start = (size - TAR_HEADER_SIZE)
        .checked_sub(header.size)
        .ok_or_else(|| {
            corrupt!(
                "last section claims {} bytes, more than the blob holds",
                header.size
            )
        })?;
    Ok((header, start))
}

fn extract_inline_bootstrap(file: &File, size: u64) -> Result<Vec<u8>> {
    let (header, start) = tail_section(file, size)?;
    let too_large = |bytes: u64| {
        limits::exceeded(
            format!("the inlined bootstrap (image.boot) takes {bytes} bytes decoded"),
            "256 MiB",
        )
    };
    if header.name == b"image.boot" {
        if header.size > MAX_INLINE_BOOTSTRAP_BYTES {
            return Err(too_large(header.size));
        }
        return read_section(file, size, start, header.size, "image.boot");
    }
    if header.name != toc::TOC_NAME {
        return Err(corrupt!(
            "last section is {:?}, not a ToC or image.boot",
            String::from_utf8_lossy(&header.name)
        ));
    }
    let entries = toc::parse_toc(&read_section(file, size, start, header.size, "blob ToC")?)?;
    let boot = entries
        .iter()
        .find(|e| e.name == b"image.boot")
        .ok_or_else(|| corrupt!("blob ToC has no image.boot entry"))?;
    if boot.uncompressed_size > MAX_INLINE_BOOTSTRAP_BYTES {
        return Err(too_large(boot.uncompressed_size));
    }
    let stored = read_section(
        file,
        size,
        boot.compressed_offset,
        boot.compressed_size,
        "image.boot",
    )?;
    let bytes = match boot.compression {
        toc::TOC_COMPRESS_NONE => stored,
        toc::TOC_COMPRESS_ZSTD => compress::decompress(
            crate::format::Compressor::Zstd,
            &stored,
            boot.uncompressed_size as usize,
        )?,
        other => {
            return Err(Error::Unsupported(format!(
                "image.boot compressed with ToC flag {other:#x}"
            )))
        }
    };
    let got = digest(crate::format::Digester::Sha256, &bytes);
    if got != boot.uncompressed_digest {
        return Err(Error::Integrity(format!(
            "image.boot sha256 {} does not match the ToC's {}",
            hex(&got),
            hex(&boot.uncompressed_digest)
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rafs_layout::blob::{TarHeader, TocEntry};
    use rafs_layout::Record;
    use std::os::unix::fs::FileExt;

    /// A blob whose ToC names a zstd `image.boot` of `claimed` bytes decoded, stored in `stored` bytes.
    fn blob_with_toc(claimed: u64, stored: &[u8]) -> tempfile::NamedTempFile {
        let entry = TocEntry {
            flags: toc::TOC_COMPRESS_ZSTD,
            name: rafs_layout::pad(b"image.boot").unwrap(),
            uncompressed_digest: [0; 32],
            compressed_offset: 0,
            compressed_size: stored.len() as u64,
            uncompressed_size: claimed,
        };
        let mut toc = [0u8; TocEntry::SIZE];
        entry.write_to(&mut toc);
        let mut blob = stored.to_vec();
        blob.extend_from_slice(&toc);
        blob.extend_from_slice(&TarHeader::section(toc::TOC_NAME, toc.len() as u64).unwrap());
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &blob).unwrap();
        file
    }

    #[test]
    fn an_inlined_bootstrap_beyond_the_limit_is_refused_before_decompression() {
        // A few KiB of zeros claimed as 512 MiB: under the old 1 GiB bound it was decompressed.
        let stored = compress::compress(crate::format::Compressor::Zstd, &[0u8; 4096]).unwrap();
        let file = blob_with_toc(512 << 20, &stored);
        let size = file.as_file().metadata().unwrap().len();
        let err = extract_inline_bootstrap(file.as_file(), size).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("image refused")
                && msg.contains("image.boot")
                && msg.contains(&format!("{} bytes", 512u64 << 20))
                && msg.contains("256 MiB"),
            "{msg}"
        );
    }

    #[test]
    fn an_old_style_inlined_bootstrap_beyond_the_limit_is_refused_as_such() {
        // No ToC: the blob ends with image.boot itself (a sparse file of 512 MiB), refused with the limit
        // named rather than as a section outside the blob.
        let claimed = 512u64 << 20;
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(claimed).unwrap();
        let header = TarHeader::section(b"image.boot", claimed).unwrap();
        file.as_file().write_all_at(&header, claimed).unwrap();
        let size = file.as_file().metadata().unwrap().len();
        let msg = extract_inline_bootstrap(file.as_file(), size)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("image refused") && msg.contains("256 MiB"),
            "{msg}"
        );
    }
}
