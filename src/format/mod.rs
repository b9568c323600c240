//! RAFS on-disk formats: the v5 and v6 bootstraps, the data-blob sections (chunk-info array, ToC) and the
//! types they share. Parsing only: nothing here does I/O except through the bytes it is handed.

pub mod blob_meta;
pub mod bytes;
pub mod limits;
pub mod toc;
pub mod v5;
pub mod v6;

use crate::corrupt;
use crate::error::{Error, Result};

/// `RafsSuperFlags` bits (v5 superblock and v6 extended superblock).
pub mod flags {
    pub const COMPRESSION_NONE: u64 = 0x1;
    pub const COMPRESSION_LZ4: u64 = 0x2;
    pub const HASH_BLAKE3: u64 = 0x4;
    pub const HASH_SHA256: u64 = 0x8;
    pub const EXPLICIT_UID_GID: u64 = 0x10;
    pub const HAS_XATTR: u64 = 0x20;
    pub const COMPRESSION_GZIP: u64 = 0x40;
    pub const COMPRESSION_ZSTD: u64 = 0x80;
    pub const INLINED_CHUNK_DIGEST: u64 = 0x100;
    pub const TARFS_MODE: u64 = 0x200;
    pub const ENCRYPTION_NONE: u64 = 0x0100_0000;
    pub const ENCRYPTION_AES128XTS: u64 = 0x0200_0000;
    /// Every bit an image may carry; anything else is refused.
    pub const KNOWN: u64 = 0x3FF | 0x0300_0000 | 0xFC00_0000;
}

/// `BlobFeatures` bits (v6 blob table, v5 extended blob table, CI header).
pub mod blob_features {
    pub const ALIGNED: u32 = 0x1;
    pub const INLINED_FS_META: u32 = 0x2;
    pub const CHUNK_INFO_V2: u32 = 0x4;
    pub const ZRAN: u32 = 0x8;
    pub const SEPARATE: u32 = 0x10;
    pub const INLINED_CHUNK_DIGEST: u32 = 0x20;
    pub const TARFS: u32 = 0x40;
    pub const BATCH: u32 = 0x80;
    pub const ENCRYPTED: u32 = 0x100;
    pub const EXTERNAL: u32 = 0x800;
    pub const HAS_TAR_HEADER: u32 = 0x1000_0000;
    pub const HAS_TOC: u32 = 0x2000_0000;
    pub const CAP_TAR_TOC: u32 = 0x4000_0000;
    pub const V5_NO_EXT_BLOB_TABLE: u32 = 0x8000_0000;
}

/// Chunk compression, as numbered in blob tables and CI headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compressor {
    None,
    Lz4Block,
    Gzip,
    Zstd,
}

impl Compressor {
    pub fn from_u32(v: u32) -> Result<Self> {
        Ok(match v {
            0 => Compressor::None,
            1 => Compressor::Lz4Block,
            2 => Compressor::Gzip,
            3 => Compressor::Zstd,
            _ => return Err(corrupt!("unknown compression algorithm {v}")),
        })
    }

    /// From superblock flags; no compression bit means lz4 (the upstream default for old images).
    pub fn from_flags(f: u64) -> Result<Self> {
        let bits = f
            & (flags::COMPRESSION_NONE
                | flags::COMPRESSION_LZ4
                | flags::COMPRESSION_GZIP
                | flags::COMPRESSION_ZSTD);
        Ok(match bits {
            0 | flags::COMPRESSION_LZ4 => Compressor::Lz4Block,
            flags::COMPRESSION_NONE => Compressor::None,
            flags::COMPRESSION_GZIP => Compressor::Gzip,
            flags::COMPRESSION_ZSTD => Compressor::Zstd,
            _ => {
                return Err(corrupt!(
                    "superblock flags {f:#x} name more than one compressor"
                ))
            }
        })
    }

    /// The number blob tables and CI headers use (inverse of `from_u32`).
    pub fn to_u32(self) -> u32 {
        match self {
            Compressor::None => 0,
            Compressor::Lz4Block => 1,
            Compressor::Gzip => 2,
            Compressor::Zstd => 3,
        }
    }

    /// The superblock flag naming this compressor.
    pub fn flag(self) -> u64 {
        match self {
            Compressor::None => flags::COMPRESSION_NONE,
            Compressor::Lz4Block => flags::COMPRESSION_LZ4,
            Compressor::Gzip => flags::COMPRESSION_GZIP,
            Compressor::Zstd => flags::COMPRESSION_ZSTD,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compressor::None => "none",
            Compressor::Lz4Block => "lz4_block",
            Compressor::Gzip => "gzip",
            Compressor::Zstd => "zstd",
        }
    }
}

/// Chunk digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Digester {
    Blake3,
    Sha256,
}

impl Digester {
    pub fn from_u32(v: u32) -> Result<Self> {
        match v {
            0 => Ok(Digester::Blake3),
            1 => Ok(Digester::Sha256),
            _ => Err(corrupt!("unknown digest algorithm {v}")),
        }
    }

    /// From superblock flags; no hash bit means blake3.
    pub fn from_flags(f: u64) -> Result<Self> {
        match f & (flags::HASH_BLAKE3 | flags::HASH_SHA256) {
            0 | flags::HASH_BLAKE3 => Ok(Digester::Blake3),
            flags::HASH_SHA256 => Ok(Digester::Sha256),
            _ => Err(corrupt!(
                "superblock flags {f:#x} name two digest algorithms"
            )),
        }
    }

    /// The number blob tables use (inverse of `from_u32`).
    pub fn to_u32(self) -> u32 {
        match self {
            Digester::Blake3 => 0,
            Digester::Sha256 => 1,
        }
    }

    /// The superblock flag naming this digester.
    pub fn flag(self) -> u64 {
        match self {
            Digester::Blake3 => flags::HASH_BLAKE3,
            Digester::Sha256 => flags::HASH_SHA256,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Digester::Blake3 => "blake3",
            Digester::Sha256 => "sha256",
        }
    }
}

/// One data blob as the bootstrap describes it.
#[derive(Debug, Clone)]
pub struct BlobInfo {
    pub index: u32,
    pub id: String,
    pub chunk_size: u32,
    pub chunk_count: u32,
    pub compressor: Compressor,
    pub digester: Digester,
    pub features: u32,
    /// Size of the blob's chunk-data section as stored (v6 inline-meta: before the bootstrap).
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    /// Where the chunk-info array lives in the blob (v6 only; zero for v5).
    pub ci: Option<CiLocation>,
    pub toc_size: u32,
    pub toc_digest: [u8; 32],
    /// v5 blob-level readahead range (informational).
    pub readahead: (u32, u32),
}

#[cfg(test)]
impl BlobInfo {
    /// Blob 0, named "b", of `chunks` raw chunks of `chunk_size` bytes: for unit tests of the cache and
    /// the streams.
    pub fn raw_for_tests(chunks: u32, chunk_size: u32) -> BlobInfo {
        let size = u64::from(chunks) * u64::from(chunk_size);
        BlobInfo {
            index: 0,
            id: "b".into(),
            chunk_size,
            chunk_count: chunks,
            compressor: Compressor::None,
            digester: Digester::Sha256,
            features: 0,
            compressed_size: size,
            uncompressed_size: size,
            ci: None,
            toc_size: 0,
            toc_digest: [0; 32],
            readahead: (0, 0),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct CiLocation {
    pub compressor: Compressor,
    pub offset: u64,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
}

/// Whole-image facts shown by `inspect` and used to serve the image.
#[derive(Debug, Clone)]
pub struct SuperInfo {
    /// 5 or 6.
    pub version: u32,
    pub flags: u64,
    pub chunk_size: u32,
    /// Metadata block size (4096; 512 for tarfs images).
    pub block_size: u32,
    pub inode_count: u64,
    pub root_ino: u64,
    pub compressor: Compressor,
    pub digester: Digester,
    pub blobs: Vec<BlobInfo>,
    /// Inode numbers named by the build-time prefetch list.
    pub prefetch: Vec<u64>,
    /// Used as mtime for v6 compact inodes, as the kernel does.
    pub build_time: u64,
}

impl SuperInfo {
    pub fn explicit_uid_gid(&self) -> bool {
        self.flags & flags::EXPLICIT_UID_GID != 0
    }
    pub fn has_xattr(&self) -> bool {
        self.flags & flags::HAS_XATTR != 0
    }
}

/// Inode attributes in one shape for both format versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InodeAttr {
    pub ino: u64,
    /// Full st_mode (type and permission bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u32,
    pub mtime: u64,
    pub mtime_nsec: u32,
    pub rdev: u32,
    pub has_xattr: bool,
    /// Byte offset of the on-disk record, so later calls need not look it up again.
    pub(crate) record: u64,
}

impl InodeAttr {
    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.file_type() == libc::S_IFDIR
    }
    pub fn is_reg(&self) -> bool {
        self.file_type() == libc::S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.file_type() == libc::S_IFLNK
    }
    /// Refuse a mode whose type bits name no file type; `what` names the inode in the error.
    pub fn check_file_type(&self, what: impl std::fmt::Display) -> Result<()> {
        match self.file_type() {
            libc::S_IFREG
            | libc::S_IFDIR
            | libc::S_IFLNK
            | libc::S_IFCHR
            | libc::S_IFBLK
            | libc::S_IFIFO
            | libc::S_IFSOCK => Ok(()),
            t => Err(corrupt!("{what}: unknown file type {t:#o}")),
        }
    }

    /// 512-byte blocks, as stat reports them.
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(512)
    }
}

/// One directory entry; `offset` is the cookie that resumes the listing after this entry (never 0).
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    /// S_IF* file type bits.
    pub file_type: u32,
    pub offset: u64,
}

/// A chunk as the data path needs it: where its bytes are in the blob and how to check them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkInfo {
    pub blob_index: u32,
    /// Index of the chunk inside its blob (the CI index).
    pub index: u32,
    pub compressed_offset: u64,
    pub compressed_size: u32,
    pub uncompressed_offset: u64,
    pub uncompressed_size: u32,
    pub compressed: bool,
    /// Set for chunks packed into a batch: (batch index, offset inside the decompressed batch).
    pub batch: Option<(u32, u32)>,
    pub digest: Option<[u8; 32]>,
    pub crc32: Option<u32>,
}

/// Most bytes a chunk of `uncompressed` bytes may be stored in: what zstd, lz4 and gzip can grow
/// incompressible data to, with room to spare (builders store such chunks raw anyway). A record that
/// claims more makes a small chunk cost a large backend read.
pub fn max_stored_size(uncompressed: u32) -> u64 {
    let u = uncompressed as u64;
    u + u / 128 + 1024
}

impl ChunkInfo {
    /// A chunk's stored size must fit its uncompressed size: equal when stored raw, within
    /// [`max_stored_size`] and not 0 when compressed (a 0-byte chunk looks free to whoever sums sizes, such
    /// as a predicted run's window). A batch chunk's stored size is its batch's, checked with the batch.
    /// Every chunk record is checked when decoded (v5 chunk records, v6 chunk-info entries). Where the
    /// stored bytes end must be a u64: the read path sums offset and size unchecked.
    pub fn check_stored_size(&self) -> Result<()> {
        if self
            .compressed_offset
            .checked_add(self.compressed_size as u64)
            .is_none()
        {
            return Err(corrupt!(
                "blob {} chunk {}: stored at {} in {} bytes, it ends past the largest offset",
                self.blob_index,
                self.index,
                self.compressed_offset,
                self.compressed_size
            ));
        }
        if self.batch.is_some() {
            return Ok(());
        }
        let (stored, size) = (self.compressed_size, self.uncompressed_size);
        let fits = if self.compressed {
            (stored > 0 || size == 0) && stored as u64 <= max_stored_size(size)
        } else {
            stored == size
        };
        if !fits {
            let how = if self.compressed { "compressed" } else { "raw" };
            return Err(corrupt!(
                "blob {} chunk {}: {stored} bytes stored ({how}) for {size} bytes",
                self.blob_index,
                self.index
            ));
        }
        Ok(())
    }

    /// The on-disk chunk record of this chunk (file offset 0), or `None` without a digest to record.
    /// The inverse of [`v5::chunk_info`].
    pub fn to_record(&self) -> Option<rafs_layout::v5::ChunkRecord> {
        use rafs_layout::v5::{CHUNK_COMPRESSED, CHUNK_HAS_CRC32};
        Some(rafs_layout::v5::ChunkRecord {
            digest: self.digest?,
            blob_index: self.blob_index,
            flags: if self.compressed { CHUNK_COMPRESSED } else { 0 }
                | if self.crc32.is_some() {
                    CHUNK_HAS_CRC32
                } else {
                    0
                },
            compressed_size: self.compressed_size,
            uncompressed_size: self.uncompressed_size,
            compressed_offset: self.compressed_offset,
            uncompressed_offset: self.uncompressed_offset,
            file_offset: 0,
            index: self.index,
            crc32: self.crc32.unwrap_or(0),
        })
    }
}

/// How a file's chunk is named in the metadata: v5 records carry everything, v6 names a CI slot in a blob.
#[derive(Debug, Clone)]
pub enum ChunkAddr {
    Full(ChunkInfo),
    /// v6: chunk `ci_index` of blob `blob_index`, whose uncompressed data starts at block `blk_addr`.
    Indexed {
        blob_index: u32,
        ci_index: u32,
        blk_addr: u32,
    },
}

/// Read access to one bootstrap's metadata. Implemented by the v5 and v6 parsers over an mmap: nothing is
/// loaded per inode until asked for, so opening a large image costs only its superblock and tables.
pub trait MetaReader: Send + Sync {
    fn info(&self) -> &SuperInfo;
    fn inode(&self, ino: u64) -> Result<InodeAttr>;
    /// Child `name` of directory `dir`, if present.
    fn lookup(&self, dir: &InodeAttr, name: &[u8]) -> Result<Option<u64>>;
    /// Entries of `dir` from cookie `offset` on (0 = start), without "." and "..". `f` returns false to stop.
    fn read_dir(
        &self,
        dir: &InodeAttr,
        offset: u64,
        f: &mut dyn FnMut(DirEntry) -> Result<bool>,
    ) -> Result<()>;
    fn readlink(&self, inode: &InodeAttr) -> Result<Vec<u8>>;
    fn xattrs(&self, inode: &InodeAttr) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// The chunks of a regular file overlapping `[offset, offset + len)`, each with its file offset.
    fn file_chunks(
        &self,
        inode: &InodeAttr,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, ChunkAddr)>>;
    /// The largest inode number the image can name.
    fn max_ino(&self) -> u64;
    /// The bootstrap's own record of a blob chunk (v6 chunk table): digest, sizes and CRC used to verify
    /// data located through the blob's chunk-info array. v5 records carry these inline, so v5 has none.
    fn chunk_table_entry(&self, _blob_index: u32, _ci_index: u32) -> Result<Option<ChunkInfo>> {
        Ok(None)
    }
    /// The bootstrap's bytes.
    fn bytes(&self) -> &[u8];
    /// Whether the bootstrap records a digest for its chunks (v5 always; v6 in its chunk table).
    fn has_chunk_digests(&self) -> bool;
    /// Visit every chunk record of the bootstrap (v5: those of every file, in inode-table order, a chunk
    /// shared by several files once per file; v6: the chunk table). Bounded by the bootstrap's size.
    fn chunk_records(&self, f: &mut dyn FnMut(&ChunkInfo) -> Result<()>) -> Result<()>;
}

/// A directory entry name must be a single path component; `what` names the directory in the error.
pub fn check_name(name: &[u8], what: impl std::fmt::Display) -> Result<()> {
    if name.is_empty() {
        return Err(corrupt!("{what}: empty file name"));
    }
    if name.len() > 255 {
        return Err(corrupt!("{what}: name longer than 255 bytes"));
    }
    if name == b"." || name == b".." {
        return Err(corrupt!(
            "{what}: entry named {:?} is not allowed",
            String::from_utf8_lossy(name)
        ));
    }
    if name.iter().any(|&b| b == b'/' || b == 0) {
        return Err(corrupt!(
            "{what}: name {:?} contains '/' or NUL",
            String::from_utf8_lossy(name)
        ));
    }
    Ok(())
}

/// Names a metadata record in an error ("`{0} {1}`", e.g. "inode nid 42"), formatted only when an error
/// is built: the request paths read inodes, blocks and names on every LOOKUP, GETATTR and READ.
#[derive(Clone, Copy)]
pub struct Named(pub &'static str, pub u64);

impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.0, self.1)
    }
}

/// Blob ids become file names and URL path segments: refuse anything that could leave the blob directory.
pub fn check_blob_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 255
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::Corrupt(format!(
            "blob id {:?} is not a plain name (letters, digits, '-', '_', '.')",
            id.escape_debug().to_string()
        )))
    }
}

/// Bootstrap bytes: mapped from a file, or owned when extracted from an inline-meta blob.
pub enum MetaBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for MetaBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            MetaBytes::Mapped(m) => m,
            MetaBytes::Owned(v) => v,
        }
    }
}

/// Decode a v6/EROFS device number (the kernel's new_encode_dev layout).
pub fn decode_rdev(v: u32) -> (u32, u32) {
    let major = (v & 0xfff00) >> 8;
    let minor = (v & 0xff) | ((v >> 12) & 0xfff00);
    (major, minor)
}

/// st_rdev in the C library's encoding.
pub fn make_dev(major: u32, minor: u32) -> u64 {
    libc::makedev(major, minor)
}
