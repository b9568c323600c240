//! RAFS v6: EROFS-compatible metadata (superblock, device slots, 32-byte-slot inodes, directory blocks,
//! chunk-index arrays) plus the RAFS extended superblock, blob table and chunk table.
//!
//! Inode numbers are EROFS nids, as nydusd and the kernel both use them.

use std::collections::HashMap;
use std::sync::OnceLock;

use rafs_layout::erofs::{
    BlobEntry, ChunkIndex, DeviceSlot, Dirent, ExtSuperBlock, InodeCompact, InodeExtended,
    SuperBlock, XattrEntry, XattrIbodyHeader,
};
use rafs_layout::v5::ChunkRecord;
use rafs_layout::{padded, Record};

use super::bytes::{record, round_up, slice, Le};
use super::limits;
use super::{
    blob_features as bf, check_blob_id, check_name, flags, BlobInfo, ChunkAddr, ChunkInfo,
    CiLocation, Compressor, Digester, DirEntry, InodeAttr, MetaBytes, MetaReader, Named, SuperInfo,
};
use crate::corrupt;
use crate::error::{Error, Result};

pub use rafs_layout::erofs::{
    COMPAT_RAFS_V6, EROFS_MAGIC, EXT_SUPER_OFFSET, FORMAT_EXTENDED, INCOMPAT_CHUNKED_FILE,
    INCOMPAT_DEVICE_TABLE, LAYOUT_CHUNK_BASED, LAYOUT_FLAT_INLINE, LAYOUT_FLAT_PLAIN, SUPER_OFFSET,
};
pub const DEVICE_SLOT_SIZE: u64 = DeviceSlot::SIZE as u64;
pub const BLOB_ENTRY_SIZE: u64 = BlobEntry::SIZE as u64;
pub const CHUNK_TABLE_ENTRY_SIZE: u64 = rafs_layout::v5::ChunkRecord::SIZE as u64;
pub const DIRENT_SIZE: usize = Dirent::SIZE;
/// A directory cookie is `block << COOKIE_SLOT_BITS | slot`: the directory block and the entry's
/// 1-based position in it. Unique, increasing in listing order, stable for the image, and a listing
/// resumes in the cookie's block instead of parsing every block before it again. A block holds at most
/// 4096 / 12 = 341 entries, below 2^9.
const COOKIE_SLOT_BITS: u32 = 9;
const COOKIE_SLOT_MASK: u64 = (1 << COOKIE_SLOT_BITS) - 1;
/// The id the builder writes for the blob that will carry the bootstrap itself (inline-meta images).
pub const INLINE_BLOB_PLACEHOLDER: &str =
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

/// Is this a RAFS v6 bootstrap (EROFS magic at 1024)?
pub fn detect(data: &[u8]) -> bool {
    // Only the magic: callers may hand just the first 1028 bytes of a file.
    slice(data, SUPER_OFFSET, 4, "").is_ok_and(|b| b.u32_at(0) == EROFS_MAGIC)
}

/// What the inode slot says, beyond the attributes: where its data and xattrs are.
struct RawInode {
    attr: InodeAttr,
    offset: u64,
    layout: u16,
    /// Raw `i_u`: block address for dirs/symlinks, chunk header for files, rdev for devices.
    i_u: u32,
    inode_size: u64,
    xattr_size: u64,
}

/// (blob index, CI index) → row of the chunk table.
type ChunkRows = HashMap<(u32, u32), u32>;

pub struct V6Meta {
    data: MetaBytes,
    info: SuperInfo,
    meta_base: u64,
    block_size: u64,
    chunk_table: (u64, u64),
    /// (blob index, CI index) → chunk-table row, built on first use.
    chunk_rows: OnceLock<std::result::Result<ChunkRows, String>>,
}

impl V6Meta {
    /// Parse a v6 bootstrap. `inline_blob_id` replaces the builder's placeholder id when the bootstrap
    /// was extracted from an inline-meta blob (whose real id is its file name).
    pub fn parse(data: MetaBytes, inline_blob_id: Option<&str>) -> Result<Self> {
        if data.len() < 4096 {
            return Err(corrupt!(
                "v6 bootstrap is {} bytes, shorter than one 4 KiB block",
                data.len()
            ));
        }
        let sb: SuperBlock = record(&data, SUPER_OFFSET, "EROFS superblock")?;
        let block_size = check_superblock(&sb)?;
        let root_nid = sb.root_nid as u64;
        let inode_count = sb.inos;
        let build_time = sb.build_time;
        let meta_blkaddr = sb.meta_blkaddr as u64;

        let ext: ExtSuperBlock = record(&data, EXT_SUPER_OFFSET, "RAFS v6 extended superblock")?;
        check_ext_superblock(&data, &ext)?;
        let sflags = ext.flags;
        let chunk_size = ext.chunk_size;
        let chunk_table = (ext.chunk_table_offset, ext.chunk_table_size);
        let compressor = Compressor::from_flags(sflags)?;
        let digester = Digester::from_flags(sflags)?;
        let blobs = parse_blob_table(&data, &sb, &ext, inline_blob_id)?;
        let prefetch = parse_prefetch_table(
            &data,
            ext.prefetch_table_offset,
            ext.prefetch_table_size as u64,
        )?;

        let info = SuperInfo {
            version: 6,
            flags: sflags,
            chunk_size,
            block_size: block_size as u32,
            inode_count,
            root_ino: root_nid,
            compressor,
            digester,
            blobs,
            prefetch,
            build_time,
        };
        let meta = V6Meta {
            data,
            info,
            meta_base: meta_blkaddr * block_size,
            block_size,
            chunk_table,
            chunk_rows: OnceLock::new(),
        };
        let root = meta.inode(root_nid)?;
        if !root.is_dir() {
            return Err(corrupt!("root inode (nid {root_nid}) is not a directory"));
        }
        Ok(meta)
    }

    fn raw(&self, nid: u64) -> Result<RawInode> {
        let offset = nid
            .checked_mul(rafs_layout::erofs::INODE_SLOT)
            .and_then(|o| o.checked_add(self.meta_base))
            .ok_or_else(|| corrupt!("nid {nid} is out of range"))?;
        let head: InodeCompact = record(&self.data, offset, Named("inode nid", nid))?;
        let format = head.format;
        if format >> 4 != 0 {
            return Err(corrupt!("inode nid {nid}: unknown i_format {format:#x}"));
        }
        let layout = (format >> 1) & 0x7;
        if ![LAYOUT_FLAT_PLAIN, LAYOUT_FLAT_INLINE, LAYOUT_CHUNK_BASED].contains(&layout) {
            return Err(Error::Unsupported(format!(
                "inode nid {nid}: data layout {layout} (EROFS compression is not used by RAFS)"
            )));
        }
        let xattr_icount = head.xattr_icount;
        let xattr_size = rafs_layout::erofs::xattr_area_size(xattr_icount);
        let mode = head.mode as u32;
        let (attr, inode_size, i_u) = if format & FORMAT_EXTENDED == 0 {
            let attr = InodeAttr {
                ino: nid,
                mode,
                uid: head.uid as u32,
                gid: head.gid as u32,
                size: head.size as u64,
                nlink: head.nlink as u32,
                mtime: self.info.build_time,
                mtime_nsec: 0,
                rdev: head.i_u,
                has_xattr: xattr_icount > 0,
                record: offset,
            };
            (attr, InodeCompact::SIZE as u64, head.i_u)
        } else {
            let ext: InodeExtended = record(&self.data, offset, Named("extended inode nid", nid))?;
            let attr = InodeAttr {
                ino: nid,
                mode,
                uid: ext.uid,
                gid: ext.gid,
                size: ext.size,
                nlink: ext.nlink,
                mtime: ext.mtime,
                mtime_nsec: ext.mtime_nsec,
                rdev: ext.i_u,
                has_xattr: xattr_icount > 0,
                record: offset,
            };
            (attr, InodeExtended::SIZE as u64, ext.i_u)
        };
        attr.check_file_type(Named("inode nid", nid))?;
        let mut attr = attr;
        if !matches!(attr.file_type(), libc::S_IFCHR | libc::S_IFBLK) {
            attr.rdev = 0;
        } else {
            let (major, minor) = super::decode_rdev(attr.rdev);
            attr.rdev = super::make_dev(major, minor) as u32;
        }
        Ok(RawInode {
            attr,
            offset,
            layout,
            i_u,
            inode_size,
            xattr_size,
        })
    }

    /// Block `index` of a directory's or symlink's data (the inline tail for FLAT_INLINE).
    fn data_block(&self, raw: &RawInode, index: u64) -> Result<&[u8]> {
        let size = raw.attr.size;
        let start = index * self.block_size;
        if start >= size {
            return Err(corrupt!(
                "inode nid {}: block {index} past its size {size}",
                raw.attr.ino
            ));
        }
        let len = (size - start).min(self.block_size);
        let nblocks = size.div_ceil(self.block_size);
        let what = Named("data of inode nid", raw.attr.ino);
        match raw.layout {
            LAYOUT_FLAT_INLINE if index == nblocks - 1 && !size.is_multiple_of(self.block_size) => {
                let off = raw.offset + raw.inode_size + raw.xattr_size;
                if off % self.block_size + len > self.block_size {
                    return Err(corrupt!(
                        "inode nid {}: inline data crosses a block boundary",
                        raw.attr.ino
                    ));
                }
                slice(&self.data, off, len, what)
            }
            LAYOUT_FLAT_INLINE | LAYOUT_FLAT_PLAIN => {
                // A huge i_size lets a READDIR cookie name a block far past the image.
                let off = (raw.i_u as u64)
                    .checked_add(index)
                    .and_then(|block| block.checked_mul(self.block_size))
                    .ok_or_else(|| {
                        corrupt!("inode nid {}: block {index} is out of range", raw.attr.ino)
                    })?;
                slice(&self.data, off, len, what)
            }
            _ => Err(corrupt!(
                "inode nid {}: directory or symlink with chunk-based layout",
                raw.attr.ino
            )),
        }
    }

    fn dir_raw(&self, dir: &InodeAttr) -> Result<RawInode> {
        let raw = self.raw(dir.ino)?;
        if !raw.attr.is_dir() {
            return Err(Error::Invalid(format!(
                "nid {} is not a directory",
                dir.ino
            )));
        }
        Ok(raw)
    }

    fn chunk_rows(&self) -> Result<&ChunkRows> {
        let rows = self.chunk_rows.get_or_init(|| {
            let (off, size) = self.chunk_table;
            let table = slice(&self.data, off, size, "chunk table").map_err(|e| e.to_string())?;
            let mut map = HashMap::with_capacity((size / CHUNK_TABLE_ENTRY_SIZE) as usize);
            for (row, e) in table
                .chunks_exact(CHUNK_TABLE_ENTRY_SIZE as usize)
                .enumerate()
            {
                let e = ChunkRecord::read(e).expect("a whole row");
                map.entry((e.blob_index, e.index)).or_insert(row as u32);
            }
            Ok(map)
        });
        rows.as_ref().map_err(|e| Error::Corrupt(e.clone()))
    }
}

/// The EROFS superblock of a RAFS v6 image: magic, the RAFS compat bit, a block size of 4 KiB (512 for
/// tarfs) and no EROFS features beyond chunked files and the device table. Returns the block size.
fn check_superblock(sb: &SuperBlock) -> Result<u64> {
    if sb.magic != EROFS_MAGIC {
        return Err(corrupt!("bad EROFS magic {:#x} at offset 1024", sb.magic));
    }
    if sb.feature_compat & COMPAT_RAFS_V6 == 0 {
        return Err(Error::Unsupported(
            "EROFS image without the RAFS v6 compat bit (a plain EROFS image, not RAFS)".into(),
        ));
    }
    let blkszbits = sb.blkszbits;
    if blkszbits != 12 && blkszbits != 9 {
        return Err(corrupt!(
            "block size bits {blkszbits} (expected 12, or 9 for tarfs)"
        ));
    }
    let incompat = sb.feature_incompat;
    if incompat & !(INCOMPAT_CHUNKED_FILE | INCOMPAT_DEVICE_TABLE) != 0 {
        return Err(Error::Unsupported(format!(
            "EROFS incompat features {incompat:#x} (only chunked files and the device table are RAFS)"
        )));
    }
    Ok(1u64 << blkszbits)
}

/// The RAFS extended superblock: known flags, no encryption or tarfs, a chunk size in range, whole
/// blob and chunk table entries, a chunk table inside the bootstrap.
fn check_ext_superblock(data: &[u8], ext: &ExtSuperBlock) -> Result<()> {
    let sflags = ext.flags;
    if sflags & !flags::KNOWN != 0 {
        return Err(corrupt!(
            "unknown superblock flags {:#x}",
            sflags & !flags::KNOWN
        ));
    }
    if sflags & flags::ENCRYPTION_AES128XTS != 0 {
        return Err(Error::Unsupported("encrypted image (AES-128-XTS)".into()));
    }
    if sflags & flags::TARFS_MODE != 0 {
        return Err(Error::Unsupported("tar-tarfs image".into()));
    }
    let blob_table_size = ext.blob_table_size as u64;
    let chunk_size = ext.chunk_size;
    let chunk_table = (ext.chunk_table_offset, ext.chunk_table_size);
    if !chunk_size.is_power_of_two() || !(0x1000..=0x100_0000).contains(&chunk_size) {
        return Err(corrupt!(
            "chunk size {chunk_size:#x} is not a power of two in 4 KiB..16 MiB"
        ));
    }
    if !blob_table_size.is_multiple_of(BLOB_ENTRY_SIZE) {
        return Err(corrupt!(
            "blob table size {blob_table_size} is not a multiple of 256"
        ));
    }
    if !chunk_table.1.is_multiple_of(CHUNK_TABLE_ENTRY_SIZE) {
        return Err(corrupt!(
            "chunk table size {} is not a multiple of 80",
            chunk_table.1
        ));
    }
    slice(data, chunk_table.0, chunk_table.1, "chunk table")?;
    Ok(())
}

/// The blobs of the blob table, each matched with its device slot, no id twice, their chunk-info arrays
/// within the per-image limit.
fn parse_blob_table(
    data: &[u8],
    sb: &SuperBlock,
    ext: &ExtSuperBlock,
    inline_blob_id: Option<&str>,
) -> Result<Vec<BlobInfo>> {
    let extra_devices = sb.extra_devices as u64;
    let devt_slotoff = sb.devt_slotoff as u64;
    let (blob_table_off, blob_table_size) = (ext.blob_table_offset, ext.blob_table_size as u64);
    let chunk_size = ext.chunk_size;
    let nblobs = blob_table_size / BLOB_ENTRY_SIZE;
    if nblobs != extra_devices {
        return Err(corrupt!(
            "{extra_devices} device slots but {nblobs} blob table entries"
        ));
    }
    super::limits::check_blob_count(nblobs, &format!("{nblobs} blobs"))?;
    let table = slice(data, blob_table_off, blob_table_size, "blob table")?;
    let devices = slice(
        data,
        devt_slotoff * DEVICE_SLOT_SIZE,
        nblobs * DEVICE_SLOT_SIZE,
        "device table",
    )?;
    let mut blobs = Vec::with_capacity(nblobs as usize);
    for i in 0..nblobs as usize {
        let e: BlobEntry = record(table, i as u64 * BLOB_ENTRY_SIZE, "blob table entry")?;
        let blob = parse_blob_entry(&e, i as u32, chunk_size, inline_blob_id)?;
        let slot: DeviceSlot = record(devices, i as u64 * DEVICE_SLOT_SIZE, "device slot")?;
        let slot_id = String::from_utf8_lossy(padded(&slot.tag)).into_owned();
        let slot_id = match inline_blob_id {
            Some(id) if slot_id == INLINE_BLOB_PLACEHOLDER => id.to_string(),
            _ => slot_id,
        };
        if slot_id != blob.id {
            return Err(corrupt!(
                "device slot {i} names blob {slot_id:?} but blob entry {i} is {:?}",
                blob.id
            ));
        }
        blobs.push(blob);
    }
    for (i, a) in blobs.iter().enumerate() {
        if blobs[..i].iter().any(|b| b.id == a.id) {
            return Err(corrupt!("blob {:?} appears twice in the blob table", a.id));
        }
    }
    let mut ci_total = 0u64;
    for blob in &blobs {
        let ci = blob
            .ci
            .as_ref()
            .expect("v6 blobs have a chunk-info location");
        super::blob_meta::check_size(blob, ci)?;
        ci_total += ci.uncompressed_size;
    }
    if ci_total > limits::MAX_IMAGE_CI_BYTES {
        return Err(limits::exceeded(
            format!("its chunk-info arrays take {ci_total} bytes decoded"),
            "256 MiB per image",
        ));
    }
    limits::check_image_chunks(&blobs)?;
    Ok(blobs)
}

/// The inodes of the prefetch table (none when it is absent), up to its first 0.
fn parse_prefetch_table(data: &[u8], prefetch_off: u64, prefetch_size: u64) -> Result<Vec<u64>> {
    let mut prefetch = Vec::new();
    if prefetch_off != 0 && prefetch_size != 0 {
        if !prefetch_size.is_multiple_of(4) {
            return Err(corrupt!(
                "prefetch table size {prefetch_size} is not a multiple of 4"
            ));
        }
        let p = slice(data, prefetch_off, prefetch_size, "prefetch table")?;
        for i in 0..(prefetch_size / 4) as usize {
            match p.u32_at(i * 4) {
                0 => break,
                nid => prefetch.push(nid as u64),
            }
        }
    }
    Ok(prefetch)
}

fn parse_blob_entry(
    e: &BlobEntry,
    index: u32,
    chunk_size: u32,
    inline_id: Option<&str>,
) -> Result<BlobInfo> {
    let raw_id = String::from_utf8_lossy(padded(&e.blob_id)).into_owned();
    let id = match inline_id {
        Some(real) if raw_id == INLINE_BLOB_PLACEHOLDER => real.to_string(),
        _ => raw_id,
    };
    check_blob_id(&id)?;
    if e.blob_index != index {
        return Err(corrupt!(
            "blob entry {index} says it is blob {}",
            e.blob_index
        ));
    }
    if e.chunk_size != chunk_size {
        return Err(corrupt!(
            "blob {id}: chunk size {:#x} differs from the image's {chunk_size:#x}",
            e.chunk_size
        ));
    }
    let chunk_count = e.chunk_count;
    super::limits::check_blob_chunks(&id, chunk_count)?;
    let features = e.features;
    if features & 0xF000 != 0 || features & bf::V5_NO_EXT_BLOB_TABLE != 0 {
        return Err(corrupt!("blob {id}: unknown feature bits {features:#x}"));
    }
    for (bit, what) in [
        (bf::ZRAN, "zran (OCI tar.gz referenced in place)"),
        (bf::SEPARATE, "separate blob meta"),
        (bf::ENCRYPTED, "encrypted chunks"),
        (bf::TARFS, "tarfs"),
        (bf::EXTERNAL, "external backend"),
    ] {
        if features & bit != 0 {
            return Err(Error::Unsupported(format!("blob {id}: {what}")));
        }
    }
    let ci = CiLocation {
        compressor: Compressor::from_u32(e.ci_compressor)?,
        offset: e.ci_offset,
        compressed_size: e.ci_compressed_size,
        uncompressed_size: e.ci_uncompressed_size,
    };
    if ci.compressed_size > ci.uncompressed_size {
        return Err(corrupt!(
            "blob {id}: chunk-info array compressed size exceeds its uncompressed size"
        ));
    }
    Ok(BlobInfo {
        index,
        id,
        chunk_size,
        chunk_count,
        compressor: Compressor::from_u32(e.compression_algo)?,
        digester: Digester::from_u32(e.digest_algo)?,
        features,
        compressed_size: e.compressed_size,
        uncompressed_size: e.uncompressed_size,
        ci: Some(ci),
        toc_size: e.blob_toc_size,
        toc_digest: e.blob_toc_digest,
        readahead: (0, 0),
    })
}

/// One directory block's entries: (name, nid, dirent file type).
fn dir_block_entries(block: &[u8], nid: u64) -> Result<Vec<(&[u8], u64, u8)>> {
    if block.len() < DIRENT_SIZE {
        return Err(corrupt!(
            "directory nid {nid}: block of {} bytes holds no entry",
            block.len()
        ));
    }
    let nameoff = |i: usize| {
        Dirent::read(&block[i * DIRENT_SIZE..])
            .expect("entry i lies before the first name")
            .nameoff as usize
    };
    let first = Dirent::read(block).map_or(0, |d| d.nameoff as usize);
    if first < DIRENT_SIZE || !first.is_multiple_of(DIRENT_SIZE) || first > block.len() {
        return Err(corrupt!(
            "directory nid {nid}: bad first name offset {first}"
        ));
    }
    let count = first / DIRENT_SIZE;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let d =
            Dirent::read(&block[i * DIRENT_SIZE..]).expect("entry i lies before the first name");
        let start = d.nameoff as usize;
        let end = if i + 1 < count {
            nameoff(i + 1)
        } else {
            block.len()
        };
        if start < first || start > end || end > block.len() {
            return Err(corrupt!(
                "directory nid {nid}: entry {i} has name range {start}..{end}"
            ));
        }
        let mut name = &block[start..end];
        if i + 1 == count {
            name = padded(name);
        }
        if name != b"." && name != b".." {
            check_name(name, Named("directory nid", nid))?;
        }
        out.push((name, d.nid, d.file_type));
    }
    Ok(out)
}

fn dirent_type(t: u8) -> u32 {
    match t {
        1 => libc::S_IFREG,
        2 => libc::S_IFDIR,
        3 => libc::S_IFCHR,
        4 => libc::S_IFBLK,
        5 => libc::S_IFIFO,
        6 => libc::S_IFSOCK,
        7 => libc::S_IFLNK,
        _ => 0,
    }
}

pub fn xattr_prefix(index: u8) -> Result<&'static [u8]> {
    Ok(match index {
        0 => b"",
        1 => b"user.",
        2 => b"system.posix_acl_access",
        3 => b"system.posix_acl_default",
        4 => b"trusted.",
        5 => b"lustre.",
        6 => b"security.",
        _ => return Err(corrupt!("unknown xattr name index {index}")),
    })
}

impl MetaReader for V6Meta {
    fn info(&self) -> &SuperInfo {
        &self.info
    }

    fn inode(&self, ino: u64) -> Result<InodeAttr> {
        Ok(self.raw(ino)?.attr)
    }

    fn lookup(&self, dir: &InodeAttr, name: &[u8]) -> Result<Option<u64>> {
        let raw = self.dir_raw(dir)?;
        if name == b"." || name == b".." || raw.attr.size == 0 {
            return Ok(None);
        }
        // Entries are sorted across the whole directory: binary search the blocks, then the entries.
        let (mut lo, mut hi) = (0u64, raw.attr.size.div_ceil(self.block_size));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let entries = dir_block_entries(self.data_block(&raw, mid)?, dir.ino)?;
            let (first, last) = (entries[0].0, entries[entries.len() - 1].0);
            if name < first {
                hi = mid;
            } else if name > last {
                lo = mid + 1;
            } else {
                return Ok(entries
                    .binary_search_by(|e| e.0.cmp(name))
                    .ok()
                    .map(|i| entries[i].1));
            }
        }
        Ok(None)
    }

    fn read_dir(
        &self,
        dir: &InodeAttr,
        offset: u64,
        f: &mut dyn FnMut(DirEntry) -> Result<bool>,
    ) -> Result<()> {
        let raw = self.dir_raw(dir)?;
        // Resume in the block the cookie names: no block before it is parsed again.
        let (first_block, skip) = match offset {
            0 => (0, 0),
            c => (c >> COOKIE_SLOT_BITS, c & COOKIE_SLOT_MASK),
        };
        let mut previous: Option<&[u8]> = None;
        // "." and ".." are each allowed once; a second one (a renamed entry) is named before the order is.
        let (mut dot, mut dot_dot) = (false, false);
        for block in first_block..raw.attr.size.div_ceil(self.block_size) {
            let entries = dir_block_entries(self.data_block(&raw, block)?, dir.ino)?;
            for (slot, (name, nid, t)) in (1u64..).zip(entries) {
                let seen = match name {
                    b"." => Some(&mut dot),
                    b".." => Some(&mut dot_dot),
                    _ => None,
                };
                if seen.is_some_and(|seen| std::mem::replace(seen, true)) {
                    return Err(corrupt!(
                        "directory nid {}: more than one entry named {:?}",
                        dir.ino,
                        String::from_utf8_lossy(name)
                    ));
                }
                if previous.is_some_and(|p| p >= name) {
                    return Err(corrupt!(
                        "directory nid {}: entries are not in sorted order",
                        dir.ino
                    ));
                }
                previous = Some(name);
                if name == b"." || name == b".." || (block == first_block && slot <= skip) {
                    continue;
                }
                let entry = DirEntry {
                    name: name.to_vec(),
                    ino: nid,
                    file_type: dirent_type(t),
                    // The block is inside the bootstrap (it was just read), far below 2^55.
                    offset: block << COOKIE_SLOT_BITS | slot,
                };
                if !f(entry)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn readlink(&self, inode: &InodeAttr) -> Result<Vec<u8>> {
        let raw = self.raw(inode.ino)?;
        if !raw.attr.is_symlink() {
            return Err(Error::Invalid(format!(
                "nid {} is not a symlink",
                inode.ino
            )));
        }
        if raw.attr.size == 0 || raw.attr.size > 4096 {
            return Err(corrupt!(
                "symlink nid {}: target length {}",
                inode.ino,
                raw.attr.size
            ));
        }
        let mut target = Vec::with_capacity(raw.attr.size as usize);
        for block in 0..raw.attr.size.div_ceil(self.block_size) {
            target.extend_from_slice(self.data_block(&raw, block)?);
        }
        Ok(target)
    }

    fn xattrs(&self, inode: &InodeAttr) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let raw = self.raw(inode.ino)?;
        if raw.xattr_size == 0 {
            return Ok(Vec::new());
        }
        let what = Named("xattrs of nid", inode.ino);
        let area = slice(
            &self.data,
            raw.offset + raw.inode_size,
            raw.xattr_size,
            what,
        )?;
        let header: XattrIbodyHeader = record(area, 0, what)?;
        if header.shared_count != 0 {
            return Err(Error::Unsupported(format!("{what}: shared xattrs")));
        }
        let mut out = Vec::new();
        let mut pos = XattrIbodyHeader::SIZE;
        while pos < area.len() {
            let head = XattrEntry::read(&area[pos..])
                .ok_or_else(|| corrupt!("{what}: truncated entry"))?;
            let (name_len, index, value_len) = (
                head.name_len as usize,
                head.name_index,
                head.value_size as usize,
            );
            let body = area
                .get(pos + 4..pos + 4 + name_len + value_len)
                .ok_or_else(|| corrupt!("{what}: entry runs past the xattr area"))?;
            let mut name = xattr_prefix(index)?.to_vec();
            name.extend_from_slice(&body[..name_len]);
            if name.is_empty() || name.contains(&0) {
                return Err(corrupt!("{what}: empty or NUL-containing name"));
            }
            out.push((name, body[name_len..].to_vec()));
            pos += round_up((4 + name_len + value_len) as u64, 4) as usize;
        }
        Ok(out)
    }

    fn file_chunks(
        &self,
        inode: &InodeAttr,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, ChunkAddr)>> {
        let raw = self.raw(inode.ino)?;
        let size = raw.attr.size;
        if size == 0 || offset >= size || len == 0 {
            return Ok(Vec::new());
        }
        if raw.layout != LAYOUT_CHUNK_BASED {
            return Err(Error::Unsupported(format!(
                "regular file nid {} with flat data layout",
                inode.ino
            )));
        }
        let chunk_size = self.info.chunk_size as u64;
        let total = size.div_ceil(chunk_size);
        let index_off = raw.offset + round_up(raw.inode_size + raw.xattr_size, 8);
        let what = Named("chunk index array of nid", inode.ino);
        let bytes = total
            .checked_mul(8)
            .ok_or_else(|| corrupt!("{what}: size {size} overflows"))?;
        let array = slice(&self.data, index_off, bytes, what)?;
        let end = offset.saturating_add(len).min(size);
        let mut out = Vec::new();
        for k in offset / chunk_size..end.div_ceil(chunk_size) {
            let e = ChunkIndex::read(&array[k as usize * 8..]).expect("inside the checked array");
            let device = e.device();
            if device == 0 || device as usize > self.info.blobs.len() {
                return Err(corrupt!(
                    "nid {} chunk {k}: device id {device} names no blob",
                    inode.ino
                ));
            }
            let addr = ChunkAddr::Indexed {
                blob_index: device - 1,
                ci_index: e.ci_index(),
                blk_addr: e.blkaddr,
            };
            out.push((k * chunk_size, addr));
        }
        Ok(out)
    }

    fn max_ino(&self) -> u64 {
        (self.data.len() as u64).saturating_sub(self.meta_base) / rafs_layout::erofs::INODE_SLOT
    }

    fn bytes(&self) -> &[u8] {
        &self.data
    }

    fn has_chunk_digests(&self) -> bool {
        self.chunk_table.1 > 0
    }

    fn chunk_records(&self, f: &mut dyn FnMut(&ChunkInfo) -> Result<()>) -> Result<()> {
        let (off, size) = self.chunk_table;
        let table = slice(&self.data, off, size, "chunk table")?;
        for row in table.chunks_exact(CHUNK_TABLE_ENTRY_SIZE as usize) {
            f(&super::v5::chunk_info(
                &ChunkRecord::read(row).expect("a whole row"),
            ))?;
        }
        Ok(())
    }

    fn chunk_table_entry(&self, blob_index: u32, ci_index: u32) -> Result<Option<ChunkInfo>> {
        let Some(&row) = self.chunk_rows()?.get(&(blob_index, ci_index)) else {
            return Ok(None);
        };
        let e: ChunkRecord = record(
            &self.data,
            self.chunk_table.0 + row as u64 * CHUNK_TABLE_ENTRY_SIZE,
            "chunk table row",
        )?;
        Ok(Some(super::v5::chunk_info(&e)))
    }
}
