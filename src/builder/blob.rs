//! The data blob writer. Chunks are appended as they are committed; v6 blobs then get the chunk-info
//! (CI) array and its 4096-byte header, and with inline metadata also the chunk digest array, the
//! compressed bootstrap and a ToC, each section followed by a "reverse" tar header naming it.
//!
//! The blob id is the sha256 of everything written except the chunk digest array (doc §1.18), so it is
//! hashed while streaming and the file is renamed to `<blob dir>/<id>` at the end.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::format::blob_features as bf;
use crate::format::blob_meta::CI_HEADER_SIZE;
use crate::format::{CiLocation, Compressor};
use crate::storage::compress;
use rafs_layout::blob::{
    CiHeader, CiV1, TarHeader, TocEntry, CI_MAGIC, TAR_HEADER_SIZE, TOC_COMPRESS_LZ4,
    TOC_COMPRESS_NONE, TOC_COMPRESS_ZSTD, TOC_NAME,
};
use rafs_layout::{pad, Record};

/// Uncompressed chunk offsets of v6 blobs start on 4 KiB boundaries (the EROFS block size).
const ALIGNMENT: u64 = 4096;

#[derive(Debug, Clone, Copy)]
pub struct BlobOptions {
    /// 5: bare concatenated chunks. 6: chunks, CI array and header.
    pub fs_version: u32,
    pub compressor: Compressor,
    /// Write the sections a ToC needs and the ToC itself (used with inline metadata).
    pub toc: bool,
}

/// Where one chunk landed.
#[derive(Debug, Clone, Copy)]
pub struct ChunkLocation {
    pub index: u32,
    pub compressed_offset: u64,
    pub uncompressed_offset: u64,
}

/// What the bootstrap's blob table needs to know about a finished blob.
#[derive(Debug, Clone, Copy)]
pub struct BlobLayout {
    pub chunk_count: u32,
    pub features: u32,
    /// Bytes written so far: the whole blob, or the part before an inlined bootstrap.
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub ci: Option<CiLocation>,
}

struct TocRecord {
    name: &'static [u8],
    flags: u32,
    digest: [u8; 32],
    offset: u64,
    compressed_size: u64,
    uncompressed_size: u64,
}

pub struct BlobWriter {
    opts: BlobOptions,
    out: BufWriter<File>,
    tmp: PathBuf,
    dir: PathBuf,
    /// Running sha256 of the bytes that make up the blob id.
    id_hash: Sha256,
    pos: u64,
    uncompressed_end: u64,
    chunk_count: u32,
    /// V1 chunk-info entries (v6 only).
    ci: Vec<u8>,
    /// Chunk digests in CI order, for the blob.digest section.
    digests: Vec<u8>,
    toc: Vec<TocRecord>,
    features: u32,
    committed: bool,
}

impl BlobWriter {
    /// Start a blob in a temporary file inside `dir`.
    pub fn create(dir: &Path, opts: BlobOptions) -> Result<Self> {
        fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create blob directory {}", dir.display()), e))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let tmp = dir.join(format!(".rafsd-blob-{}-{nanos}.tmp", std::process::id()));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
        Ok(BlobWriter {
            opts,
            out: BufWriter::with_capacity(1 << 20, file),
            tmp,
            dir: dir.to_path_buf(),
            id_hash: Sha256::new(),
            pos: 0,
            uncompressed_end: 0,
            chunk_count: 0,
            ci: Vec::new(),
            digests: Vec::new(),
            toc: Vec::new(),
            features: bf::CAP_TAR_TOC | if opts.fs_version == 6 { bf::ALIGNED } else { 0 },
            committed: false,
        })
    }

    pub fn chunk_count(&self) -> u32 {
        self.chunk_count
    }

    fn write(&mut self, bytes: &[u8], hashed: bool) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(format!("write {}", self.tmp.display()), e))?;
        if hashed {
            self.id_hash.update(bytes);
        }
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Append one chunk as stored (compressed or raw) and record it in the CI array.
    pub fn write_chunk(
        &mut self,
        stored: &[u8],
        size: u32,
        compressed: bool,
        digest: &[u8; 32],
    ) -> Result<ChunkLocation> {
        if self.chunk_count >= 1 << 24 {
            return Err(Error::Invalid(
                "more than 2^24 chunks in one blob (use a larger chunk size)".into(),
            ));
        }
        let compressed_offset = self.pos;
        let uncompressed_offset = if self.features & bf::ALIGNED != 0 {
            self.uncompressed_end.div_ceil(ALIGNMENT) * ALIGNMENT
        } else {
            self.uncompressed_end
        };
        debug_assert_eq!(compressed, stored.len() as u32 != size);
        self.write(stored, true)?;
        self.uncompressed_end = uncompressed_offset + size as u64;
        if self.opts.fs_version == 6 {
            let entry = CiV1::new(
                compressed_offset,
                stored.len() as u32,
                uncompressed_offset,
                size,
            );
            self.ci.extend_from_slice(&entry.to_bytes());
        }
        self.digests.extend_from_slice(digest);
        let index = self.chunk_count;
        self.chunk_count += 1;
        Ok(ChunkLocation {
            index,
            compressed_offset,
            uncompressed_offset,
        })
    }

    /// Size of the blob's uncompressed image: v6 rounds the last chunk up to a block.
    fn uncompressed_size(&self) -> u64 {
        if self.features & bf::ALIGNED != 0 {
            self.uncompressed_end.div_ceil(ALIGNMENT) * ALIGNMENT
        } else {
            self.uncompressed_end
        }
    }

    /// Write what follows the chunk data (v6: CI array and header; with a ToC also the digest array)
    /// and describe the blob for the bootstrap.
    pub fn finish_data(&mut self) -> Result<BlobLayout> {
        if self.opts.fs_version != 6 {
            return Ok(BlobLayout {
                chunk_count: self.chunk_count,
                features: self.features,
                compressed_size: self.pos,
                uncompressed_size: self.uncompressed_size(),
                ci: None,
            });
        }
        if self.opts.toc {
            self.end_data_section()?;
        }
        // The CI array is compressed like the chunks, and kept raw when that is not smaller.
        let ci_raw = std::mem::take(&mut self.ci);
        let (ci_stored, ci_compressor) = match self.opts.compressor {
            Compressor::None => (ci_raw.clone(), Compressor::None),
            c => match compress::compress(c, &ci_raw)? {
                packed if packed.len() < ci_raw.len() => (packed, c),
                _ => (ci_raw.clone(), Compressor::None),
            },
        };
        let ci = CiLocation {
            compressor: ci_compressor,
            offset: self.pos,
            compressed_size: ci_stored.len() as u64,
            uncompressed_size: ci_raw.len() as u64,
        };
        if self.opts.toc {
            self.features |= bf::INLINED_FS_META;
        }
        let header = ci_header(self.features, &ci, self.chunk_count);
        self.write(&ci_stored, true)?;
        self.write(&header, true)?;
        if self.opts.toc {
            self.end_meta_sections(&ci, &ci_raw, &header)?;
        }
        Ok(BlobLayout {
            chunk_count: self.chunk_count,
            features: self.features,
            compressed_size: self.pos,
            uncompressed_size: self.uncompressed_size(),
            ci: Some(ci),
        })
    }

    /// With a ToC: close the chunk data as the `image.blob` section (its tar header and ToC record).
    fn end_data_section(&mut self) -> Result<()> {
        self.features |= bf::HAS_TAR_HEADER | bf::HAS_TOC | bf::INLINED_CHUNK_DIGEST;
        let data_digest: [u8; 32] = self.id_hash.clone().finalize().into();
        let (data_size, usize_) = (self.pos, self.uncompressed_size());
        self.toc.push(TocRecord {
            name: b"image.blob",
            flags: TOC_COMPRESS_NONE,
            digest: data_digest,
            offset: 0,
            compressed_size: data_size,
            uncompressed_size: usize_,
        });
        self.write(&tar_header(b"image.blob", data_size), true)
    }

    /// With a ToC: close the CI array and header just written as the `blob.meta` section, then write the
    /// digest array as the `blob.digest` section.
    fn end_meta_sections(&mut self, ci: &CiLocation, ci_raw: &[u8], header: &[u8]) -> Result<()> {
        let flags = match ci.compressor {
            Compressor::Zstd => TOC_COMPRESS_ZSTD,
            Compressor::Lz4Block => TOC_COMPRESS_LZ4,
            _ => TOC_COMPRESS_NONE,
        };
        self.toc.push(TocRecord {
            name: b"blob.meta",
            flags,
            digest: sha256(ci_raw),
            offset: ci.offset,
            compressed_size: ci.compressed_size,
            uncompressed_size: ci.uncompressed_size,
        });
        self.toc.push(TocRecord {
            name: b"blob.meta.header",
            flags: TOC_COMPRESS_NONE,
            digest: sha256(header),
            offset: ci.offset + ci.compressed_size,
            compressed_size: CI_HEADER_SIZE,
            uncompressed_size: CI_HEADER_SIZE,
        });
        self.write(
            &tar_header(b"blob.meta", ci.compressed_size + CI_HEADER_SIZE),
            true,
        )?;
        // The digest array is left out of the blob id (upstream's rule), its tar header is not.
        let digests = std::mem::take(&mut self.digests);
        self.toc.push(TocRecord {
            name: b"blob.digest",
            flags: TOC_COMPRESS_NONE,
            digest: sha256(&digests),
            offset: self.pos,
            compressed_size: digests.len() as u64,
            uncompressed_size: digests.len() as u64,
        });
        self.write(&digests, false)?;
        self.write(&tar_header(b"blob.digest", digests.len() as u64), true)
    }

    /// Inline metadata: append the bootstrap (zstd-compressed) and the ToC that locates every section.
    pub fn append_bootstrap(&mut self, bootstrap: &[u8]) -> Result<()> {
        let packed = compress::compress(Compressor::Zstd, bootstrap)?;
        self.toc.push(TocRecord {
            name: b"image.boot",
            flags: TOC_COMPRESS_ZSTD,
            digest: sha256(bootstrap),
            offset: self.pos,
            compressed_size: packed.len() as u64,
            uncompressed_size: bootstrap.len() as u64,
        });
        self.write(&packed, true)?;
        self.write(&tar_header(b"image.boot", packed.len() as u64), true)?;
        let mut toc = Vec::with_capacity(self.toc.len() * TocEntry::SIZE);
        for r in &self.toc {
            let entry = TocEntry {
                flags: r.flags,
                name: pad(r.name).expect("section names fit 16 bytes"),
                uncompressed_digest: r.digest,
                compressed_offset: r.offset,
                compressed_size: r.compressed_size,
                uncompressed_size: r.uncompressed_size,
            };
            toc.extend_from_slice(&entry.to_bytes());
        }
        self.write(&toc, true)?;
        self.write(&tar_header(TOC_NAME, toc.len() as u64), true)
    }

    /// Flush, name the blob by its id and move it into place. Returns (id, size, path).
    pub fn commit(mut self) -> Result<(String, u64, PathBuf)> {
        self.out
            .flush()
            .map_err(|e| Error::io(format!("write {}", self.tmp.display()), e))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(|e| Error::io(format!("sync {}", self.tmp.display()), e))?;
        let id = crate::storage::digest::hex(&self.id_hash.clone().finalize());
        let path = self.dir.join(&id);
        fs::rename(&self.tmp, &path)
            .map_err(|e| Error::io(format!("rename blob to {}", path.display()), e))?;
        self.committed = true;
        Ok((id, self.pos, path))
    }
}

impl Drop for BlobWriter {
    /// A blob that was not committed (error, or no chunks) leaves no file behind.
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The 4096-byte header that follows the CI array; the reader checks it against the blob table.
fn ci_header(features: u32, ci: &CiLocation, chunk_count: u32) -> Vec<u8> {
    CiHeader {
        magic: CI_MAGIC,
        features,
        ci_compressor: ci.compressor.to_u32(),
        ci_entries: chunk_count,
        ci_offset: ci.offset,
        ci_compressed_size: ci.compressed_size,
        ci_uncompressed_size: ci.uncompressed_size,
        ci_zran_offset: 0,
        ci_zran_size: 0,
        ci_zran_count: 0,
        magic2: CI_MAGIC,
    }
    .to_bytes()
}

/// A GNU tar header for a section that precedes it: name, regular file, size and checksum.
fn tar_header(name: &[u8], size: u64) -> [u8; TAR_HEADER_SIZE as usize] {
    TarHeader::section(name, size).expect("section names are short constants")
}
