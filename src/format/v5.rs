//! RAFS v5: an 8 KiB superblock, an inode table of 8-byte-aligned record offsets, a blob table, and
//! 128-byte inode records each followed by name, symlink target, xattrs and chunk records.
//!
//! Inode numbers are the builder's (root = 1); a directory's children occupy consecutive inode-table
//! slots, sorted by name. A hard link's extra names have their own slot whose record carries the first
//! link's inode number.

use std::collections::HashSet;

use rafs_layout::v5::{ChunkRecord, ExtBlobEntry, Inode, SuperBlock};
use rafs_layout::Record;

use super::bytes::{record, round_up, slice, Le};
use super::limits;
use super::{
    blob_features as bf, check_blob_id, check_name, flags, BlobInfo, ChunkAddr, ChunkInfo,
    Compressor, Digester, DirEntry, InodeAttr, MetaBytes, MetaReader, Named, SuperInfo,
};
use crate::corrupt;
use crate::error::{Error, Result};

pub use rafs_layout::v5::{
    CHUNK_BATCH, CHUNK_COMPRESSED, CHUNK_ENCRYPTED, CHUNK_HAS_CRC32, I_HAS_HOLE, I_SYMLINK,
    I_XATTR, RAFS_V5_MAGIC, SUPER_SIZE,
};
pub const INODE_SIZE: u64 = Inode::SIZE as u64;
pub const CHUNK_SIZE: u64 = ChunkRecord::SIZE as u64;
pub const EXT_BLOB_ENTRY_SIZE: u64 = ExtBlobEntry::SIZE as u64;

pub fn detect(data: &[u8]) -> bool {
    // The magic and the version word: anything shorter is not recognisably a bootstrap.
    slice(data, 0, 8, "").is_ok_and(|b| b.u32_at(0) == RAFS_V5_MAGIC)
}

/// The data path's view of a `RafsV5ChunkInfo` record (v5 chunk records and the v6 chunk table).
pub fn chunk_info(e: &ChunkRecord) -> ChunkInfo {
    ChunkInfo {
        blob_index: e.blob_index,
        index: e.index,
        compressed_offset: e.compressed_offset,
        compressed_size: e.compressed_size,
        uncompressed_offset: e.uncompressed_offset,
        uncompressed_size: e.uncompressed_size,
        compressed: e.flags & CHUNK_COMPRESSED != 0,
        batch: None,
        digest: Some(e.digest),
        crc32: (e.flags & CHUNK_HAS_CRC32 != 0).then_some(e.crc32),
    }
}

/// The fields of one inode record that locate its trailing data.
struct InodeRecord {
    attr: InodeAttr,
    flags: u64,
    child_index: u32,
    child_count: u32,
    name_size: u64,
    symlink_size: u64,
}

pub struct V5Meta {
    data: MetaBytes,
    info: SuperInfo,
    inode_table: (u64, u32),
}

impl V5Meta {
    pub fn parse(data: MetaBytes) -> Result<Self> {
        let sb: SuperBlock = record(&data, 0, "RAFS v5 superblock").map_err(|_| {
            corrupt!(
                "v5 bootstrap is {} bytes, shorter than its 8 KiB superblock",
                data.len()
            )
        })?;
        check_superblock(&sb)?;
        let chunk_size = sb.block_size;
        let sflags = sb.flags;
        let inode_count = sb.inodes_count;
        let inode_table_off = sb.inode_table_offset;
        let prefetch_off = sb.prefetch_table_offset;
        let inode_entries = sb.inode_table_entries;
        let prefetch_entries = sb.prefetch_table_entries as u64;

        slice(
            &data,
            inode_table_off,
            inode_entries as u64 * 4,
            "inode table",
        )?;
        if inode_entries == 0 {
            return Err(corrupt!("inode table is empty"));
        }
        let compressor = Compressor::from_flags(sflags)?;
        let digester = Digester::from_flags(sflags)?;
        let blobs = parse_blob_table(&data, &sb, compressor, digester)?;
        let prefetch = parse_prefetch_table(&data, prefetch_off, prefetch_entries)?;

        let info = SuperInfo {
            version: 5,
            flags: sflags,
            chunk_size,
            block_size: 4096,
            inode_count,
            root_ino: 1,
            compressor,
            digester,
            blobs,
            prefetch,
            build_time: 0,
        };
        let meta = V5Meta {
            data,
            info,
            inode_table: (inode_table_off, inode_entries),
        };
        if !meta.inode(1)?.is_dir() {
            return Err(corrupt!("root inode is not a directory"));
        }
        meta.check_xattr_areas()?;
        Ok(meta)
    }

    /// Refuse an inode whose xattr area is larger than [`limits::MAX_XATTR_AREA`]: GETXATTR decodes the
    /// area whole, so its size bounds the work of every call. One pass over the inode table; records
    /// that cannot be read are left to fail when they are used, as without this check.
    fn check_xattr_areas(&self) -> Result<()> {
        for slot in 1..=self.inode_table.1 as u64 {
            let Ok(rec) = self.slot_offset(slot).and_then(|o| self.record_at(o)) else {
                continue;
            };
            if rec.flags & I_XATTR == 0 {
                continue;
            }
            let Ok(total) = slice(&self.data, self.after_names(&rec), 8, "").map(|b| b.u64_at(0))
            else {
                continue;
            };
            if total > limits::MAX_XATTR_AREA {
                return Err(limits::exceeded(
                    format!(
                        "the xattr area of inode {} takes {total} bytes",
                        rec.attr.ino
                    ),
                    "256 KiB per inode",
                ));
            }
        }
        Ok(())
    }

    /// Byte offset of the record in inode-table slot `slot` (1-based, like inode numbers).
    fn slot_offset(&self, slot: u64) -> Result<u64> {
        let (table_off, entries) = self.inode_table;
        if slot == 0 || slot > entries as u64 {
            return Err(corrupt!(
                "inode {slot} is outside the inode table (1..={entries})"
            ));
        }
        let v = slice(&self.data, table_off + (slot - 1) * 4, 4, "inode table")?.u32_at(0) as u64;
        let offset = v << 3;
        if offset < SUPER_SIZE {
            return Err(corrupt!(
                "inode table slot {slot} points into the superblock ({offset})"
            ));
        }
        Ok(offset)
    }

    fn record_at(&self, offset: u64) -> Result<InodeRecord> {
        let r: Inode = record(&self.data, offset, "inode record")?;
        let ino = r.ino;
        let attr = InodeAttr {
            ino,
            mode: r.mode,
            uid: r.uid,
            gid: r.gid,
            size: r.size,
            nlink: r.nlink,
            mtime: r.mtime,
            mtime_nsec: r.mtime_nsec,
            rdev: r.rdev,
            has_xattr: r.flags & I_XATTR != 0,
            record: offset,
        };
        attr.check_file_type(Named("inode", ino))?;
        Ok(InodeRecord {
            attr,
            flags: r.flags,
            child_index: r.child_index,
            child_count: r.child_count,
            name_size: r.name_size as u64,
            symlink_size: r.symlink_size as u64,
        })
    }

    fn record(&self, ino: u64) -> Result<InodeRecord> {
        let rec = self.record_at(self.slot_offset(ino)?)?;
        if rec.attr.ino != ino {
            return Err(corrupt!(
                "inode table slot {ino} holds a record for inode {}",
                rec.attr.ino
            ));
        }
        Ok(rec)
    }

    fn name_of(&self, rec: &InodeRecord) -> Result<&[u8]> {
        slice(
            &self.data,
            rec.attr.record + INODE_SIZE,
            rec.name_size,
            "inode name",
        )
    }

    /// Offset just past name and symlink target, where xattrs (then chunks) begin.
    fn after_names(&self, rec: &InodeRecord) -> u64 {
        rec.attr.record + INODE_SIZE + round_up(rec.name_size, 8) + round_up(rec.symlink_size, 8)
    }

    /// Offset of the chunk records: after name, symlink and xattr area.
    fn chunks_offset(&self, rec: &InodeRecord) -> Result<u64> {
        let mut off = self.after_names(rec);
        if rec.flags & I_XATTR != 0 {
            let total = slice(&self.data, off, 8, "xattr area size")?.u64_at(0);
            off = off.checked_add(8 + round_up(total, 8)).ok_or_else(|| {
                corrupt!("inode {}: xattr area size {total} overflows", rec.attr.ino)
            })?;
        }
        Ok(off)
    }

    fn dir_record(&self, dir: &InodeAttr) -> Result<InodeRecord> {
        let rec = self.record(dir.ino)?;
        if !rec.attr.is_dir() {
            return Err(Error::Invalid(format!(
                "inode {} is not a directory",
                dir.ino
            )));
        }
        let end = rec.child_index as u64 + rec.child_count as u64;
        if rec.child_count > 0 && (rec.child_index < 2 || end - 1 > self.inode_table.1 as u64) {
            return Err(corrupt!(
                "directory {}: children {}..{end} are outside the inode table",
                dir.ino,
                rec.child_index
            ));
        }
        Ok(rec)
    }

    /// Child `k` of a directory: its name and the inode number it names.
    fn child(&self, dir: &InodeRecord, k: u32) -> Result<(Vec<u8>, InodeRecord)> {
        let rec = self.record_at(self.slot_offset(dir.child_index as u64 + k as u64)?)?;
        let name = self.name_of(&rec)?.to_vec();
        check_name(&name, Named("directory", dir.attr.ino))?;
        Ok((name, rec))
    }
}

/// The v5 superblock: magic, a version nydus writes, its own size, a chunk size in range, known flags.
fn check_superblock(sb: &SuperBlock) -> Result<()> {
    if sb.magic != RAFS_V5_MAGIC {
        return Err(corrupt!("bad RAFS v5 magic {:#x}", sb.magic));
    }
    let version = sb.fs_version;
    if version != 0x500 && version != 0x400 {
        return Err(Error::Unsupported(format!(
            "RAFS v5 superblock version {version:#x}"
        )));
    }
    if sb.sb_size as u64 != SUPER_SIZE {
        return Err(corrupt!(
            "v5 superblock size {} (expected 8192)",
            sb.sb_size
        ));
    }
    let chunk_size = sb.block_size;
    if !chunk_size.is_power_of_two() || !(0x1000..=0x100_0000).contains(&chunk_size) {
        return Err(corrupt!(
            "chunk size {chunk_size:#x} is not a power of two in 4 KiB..16 MiB"
        ));
    }
    let sflags = sb.flags;
    if sflags & !flags::KNOWN != 0 {
        return Err(corrupt!(
            "unknown superblock flags {:#x}",
            sflags & !flags::KNOWN
        ));
    }
    Ok(())
}

/// The blobs of the blob table (readahead, id) with what the extended blob table adds, no id twice and
/// none encrypted.
fn parse_blob_table(
    data: &[u8],
    sb: &SuperBlock,
    compressor: Compressor,
    digester: Digester,
) -> Result<Vec<BlobInfo>> {
    let chunk_size = sb.block_size;
    let blob_table_off = sb.blob_table_offset;
    let blob_table_size = sb.blob_table_size as u64;
    let ext_entries = sb.extended_blob_table_entries as u64;
    let ext_off = sb.extended_blob_table_offset;
    let table = slice(data, blob_table_off, blob_table_size, "blob table")?;
    let ext = slice(
        data,
        ext_off,
        ext_entries * EXT_BLOB_ENTRY_SIZE,
        "extended blob table",
    )?;
    let mut blobs = Vec::new();
    let mut ids = HashSet::new();
    let mut pos = 0usize;
    while pos + 8 <= table.len() {
        let readahead = (table.u32_at(pos), table.u32_at(pos + 4));
        let rest = &table[pos + 8..];
        let id_len = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        if id_len == 0 {
            break; // zero padding after the last entry
        }
        let id = String::from_utf8_lossy(&rest[..id_len]).into_owned();
        check_blob_id(&id)?;
        limits::check_blob_count(blobs.len() as u64 + 1, "256 blobs or more")?;
        // Chunks name blobs by index; two indexes for one blob would share its cache files while
        // describing it differently.
        if !ids.insert(id.clone()) {
            return Err(corrupt!("blob {id:?} appears twice in the blob table"));
        }
        let index = blobs.len() as u32;
        let (chunk_count, features, uncompressed_size, compressed_size) =
            if (index as u64) < ext_entries {
                let e: ExtBlobEntry = record(
                    ext,
                    index as u64 * EXT_BLOB_ENTRY_SIZE,
                    "extended blob entry",
                )?;
                (
                    e.chunk_count,
                    e.features,
                    e.uncompressed_size,
                    e.compressed_size,
                )
            } else {
                (0, bf::V5_NO_EXT_BLOB_TABLE, 0, 0)
            };
        if features & bf::ENCRYPTED != 0 {
            return Err(Error::Unsupported(format!("blob {id}: encrypted chunks")));
        }
        limits::check_blob_chunks(&id, chunk_count)?;
        blobs.push(BlobInfo {
            index,
            id,
            chunk_size,
            chunk_count,
            compressor,
            digester,
            features,
            compressed_size,
            uncompressed_size,
            ci: None,
            toc_size: 0,
            toc_digest: [0; 32],
            readahead,
        });
        pos += 8 + id_len + 1;
    }
    limits::check_image_chunks(&blobs)?;
    Ok(blobs)
}

/// The inodes of the prefetch table's `entries` slots, up to the first 0.
fn parse_prefetch_table(data: &[u8], prefetch_off: u64, entries: u64) -> Result<Vec<u64>> {
    let mut prefetch = Vec::new();
    if entries > 0 {
        let p = slice(data, prefetch_off, entries * 4, "prefetch table")?;
        for i in 0..entries as usize {
            match p.u32_at(i * 4) {
                0 => break,
                ino => prefetch.push(ino as u64),
            }
        }
    }
    Ok(prefetch)
}

impl MetaReader for V5Meta {
    fn info(&self) -> &SuperInfo {
        &self.info
    }

    fn inode(&self, ino: u64) -> Result<InodeAttr> {
        Ok(self.record(ino)?.attr)
    }

    fn lookup(&self, dir: &InodeAttr, name: &[u8]) -> Result<Option<u64>> {
        let rec = self.dir_record(dir)?;
        let (mut lo, mut hi) = (0u32, rec.child_count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (child_name, child) = self.child(&rec, mid)?;
            match child_name.as_slice().cmp(name) {
                std::cmp::Ordering::Equal => return Ok(Some(child.attr.ino)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
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
        let rec = self.dir_record(dir)?;
        let mut previous: Option<Vec<u8>> = None;
        for k in offset.min(rec.child_count as u64) as u32..rec.child_count {
            let (name, child) = self.child(&rec, k)?;
            if previous.as_deref().is_some_and(|p| p >= name.as_slice()) {
                return Err(corrupt!(
                    "directory {}: entries are not in sorted order",
                    dir.ino
                ));
            }
            previous = Some(name.clone());
            let entry = DirEntry {
                name,
                ino: child.attr.ino,
                file_type: child.attr.file_type(),
                offset: k as u64 + 1,
            };
            if !f(entry)? {
                break;
            }
        }
        Ok(())
    }

    fn readlink(&self, inode: &InodeAttr) -> Result<Vec<u8>> {
        let rec = self.record(inode.ino)?;
        if !rec.attr.is_symlink() || rec.flags & I_SYMLINK == 0 {
            return Err(Error::Invalid(format!(
                "inode {} is not a symlink",
                inode.ino
            )));
        }
        if rec.symlink_size == 0 {
            return Err(corrupt!("symlink {} has an empty target", inode.ino));
        }
        let off = rec.attr.record + INODE_SIZE + round_up(rec.name_size, 8);
        Ok(slice(&self.data, off, rec.symlink_size, "symlink target")?.to_vec())
    }

    fn xattrs(&self, inode: &InodeAttr) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let rec = self.record(inode.ino)?;
        if rec.flags & I_XATTR == 0 {
            return Ok(Vec::new());
        }
        let what = Named("xattrs of inode", inode.ino);
        let off = self.after_names(&rec);
        let total = slice(&self.data, off, 8, what)?.u64_at(0);
        let area = slice(&self.data, off + 8, total, what)?;
        let mut out = Vec::new();
        let mut pos = 0usize;
        while pos < area.len() {
            let size = area
                .get(pos..pos + 4)
                .ok_or_else(|| corrupt!("{what}: truncated pair"))?
                .u32_at(0) as usize;
            let pair = area
                .get(pos + 4..pos + 4 + size)
                .ok_or_else(|| corrupt!("{what}: pair runs past the area"))?;
            let nul = pair
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(|| corrupt!("{what}: name without NUL"))?;
            if nul == 0 {
                return Err(corrupt!("{what}: empty name"));
            }
            out.push((pair[..nul].to_vec(), pair[nul + 1..].to_vec()));
            pos += 4 + size;
        }
        Ok(out)
    }

    fn max_ino(&self) -> u64 {
        self.inode_table.1 as u64
    }

    fn bytes(&self) -> &[u8] {
        &self.data
    }

    fn has_chunk_digests(&self) -> bool {
        true
    }

    fn chunk_records(&self, f: &mut dyn FnMut(&ChunkInfo) -> Result<()>) -> Result<()> {
        // Each record is visited once however many slots name it, and records may not overlap: in all,
        // no more chunk records than the bootstrap has room for.
        let mut seen = std::collections::HashSet::new();
        let mut budget = self.data.len() as u64 / CHUNK_SIZE;
        for slot in 1..=self.inode_table.1 as u64 {
            let Ok(rec) = self.slot_offset(slot).and_then(|o| self.record_at(o)) else {
                continue; // fails when used, as without this pass
            };
            if !rec.attr.is_reg() || rec.child_count == 0 || !seen.insert(rec.attr.record) {
                continue;
            }
            let what = Named("chunks of inode", rec.attr.ino);
            let count = rec.child_count as u64;
            budget = budget.checked_sub(count).ok_or_else(|| {
                corrupt!("{what}: chunk records overlap (more of them than the bootstrap holds)")
            })?;
            let Ok(records) = self
                .chunks_offset(&rec)
                .and_then(|base| slice(&self.data, base, count * CHUNK_SIZE, what))
            else {
                continue;
            };
            for e in records.chunks_exact(CHUNK_SIZE as usize) {
                let info = chunk_info(&ChunkRecord::read(e).expect("a whole record"));
                if info.blob_index as usize >= self.info.blobs.len() {
                    return Err(corrupt!(
                        "{what}: a chunk names blob {} of {}",
                        info.blob_index,
                        self.info.blobs.len()
                    ));
                }
                f(&info)?;
            }
        }
        Ok(())
    }

    fn file_chunks(
        &self,
        inode: &InodeAttr,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, ChunkAddr)>> {
        let rec = self.record(inode.ino)?;
        if !rec.attr.is_reg() {
            return Err(Error::Invalid(format!(
                "inode {} is not a regular file",
                inode.ino
            )));
        }
        let what = Named("chunks of inode", inode.ino);
        let size = rec.attr.size;
        let chunk_size = self.info.chunk_size as u64;
        // Without HAS_HOLE, chunk k holds bytes [k * chunk size, (k + 1) * chunk size) of the file, all of
        // them: a range no chunk covers is corrupt, not zeros (so a huge i_size over few chunks cannot read
        // as endless zeros, nor a misplaced chunk leave a silent gap).
        let dense = rec.flags & I_HAS_HOLE == 0;
        let needed = size.div_ceil(chunk_size);
        if dense && needed != rec.child_count as u64 {
            return Err(corrupt!(
                "{what}: a {size}-byte file needs {needed} chunks of {chunk_size} bytes, its record has {}",
                rec.child_count
            ));
        }
        let end = offset.saturating_add(len).min(size);
        if offset >= end || rec.child_count == 0 {
            return Ok(Vec::new());
        }
        let base = self.chunks_offset(&rec)?;
        let records = slice(&self.data, base, rec.child_count as u64 * CHUNK_SIZE, what)?;
        let raw = |k: usize| {
            ChunkRecord::read(&records[k * CHUNK_SIZE as usize..])
                .expect("inside the checked array")
        };
        let chunk = |k: usize| chunk_info(&raw(k));
        let file_offset = |k: usize| raw(k).file_offset;
        let n = rec.child_count as usize;
        let mut lo = (offset / chunk_size) as usize;
        if !dense {
            // Records are in file order; find the first one that ends after `offset`.
            let mut hi = n;
            lo = 0;
            while lo < hi {
                let mid = (lo + hi) / 2;
                if file_offset(mid).saturating_add(chunk(mid).uncompressed_size as u64) <= offset {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
        }
        let mut out = Vec::new();
        let mut previous_end = 0u64;
        for k in lo..n {
            let (foff, info) = (file_offset(k), chunk(k));
            // Builders cut files at multiples of the chunk size, holes or not: a chunk is a whole chunk or
            // the file's tail. Tiny chunks would make one READ touch thousands of them.
            let want_offset = if dense {
                k as u64 * chunk_size
            } else {
                foff - foff % chunk_size
            };
            let want_size = chunk_size.min(size.saturating_sub(want_offset));
            if (dense || foff < size)
                && (foff != want_offset || info.uncompressed_size as u64 != want_size)
            {
                return Err(corrupt!(
                    "{what}: chunk {k} holds {} bytes at file offset {foff}, the file needs {want_size} at \
                     {want_offset}",
                    info.uncompressed_size
                ));
            }
            if foff >= end {
                break;
            }
            if foff < previous_end {
                return Err(corrupt!("{what}: chunk {k} overlaps the one before it"));
            }
            if info.batch.is_some() || raw(k).flags & (CHUNK_BATCH | CHUNK_ENCRYPTED) != 0 {
                return Err(Error::Unsupported(format!(
                    "{what}: batch or encrypted chunk in a v5 image"
                )));
            }
            let Some(blob) = self.info.blobs.get(info.blob_index as usize) else {
                return Err(corrupt!(
                    "{what}: chunk {k} names blob {} of {}",
                    info.blob_index,
                    self.info.blobs.len()
                ));
            };
            // Old stargz conversions stored gzip chunks with no stored size: unreadable here either way,
            // and said so before their size is judged.
            if info.compressed && blob.compressor == Compressor::Gzip {
                return Err(Error::Unsupported(format!("{what}: gzip compression")));
            }
            info.check_stored_size()?;
            previous_end = foff
                .checked_add(info.uncompressed_size as u64)
                .filter(|&chunk_end| chunk_end <= size)
                .ok_or_else(|| {
                    corrupt!(
                        "{what}: chunk {k} at file offset {foff} runs past the {size}-byte file"
                    )
                })?;
            out.push((foff, ChunkAddr::Full(info)));
        }
        Ok(out)
    }
}
