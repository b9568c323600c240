//! Independent readers of the RAFS on-disk structures, for tests that craft images by patching bytes of
//! the reference fixtures. They follow `../shared/docs/nydus-format-and-interfaces.md` (§1 for v6, §2 for
//! v5) and name the fields as the document does, and are written independently of the crate's parsers on
//! purpose: a test that found its target through the code under test could not notice that code
//! misreading the format.

// ------------------------------------------------------------------------------------------------------
// Little-endian field access.

pub mod le {
    pub fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    pub fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    pub fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }
    pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
        b[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
    /// Write `id` into a fixed-size, NUL-padded id field.
    pub fn put_padded(b: &mut [u8], off: usize, len: usize, id: &str) {
        assert!(id.len() <= len);
        b[off..off + len].fill(0);
        b[off..off + id.len()].copy_from_slice(id.as_bytes());
    }
}

// ------------------------------------------------------------------------------------------------------
// RAFS v6 (§1): EROFS superblock, RAFS extended superblock, device slots, blob table, inodes, directories,
// chunk indexes, chunk table and the blob's chunk-info (CI) array.

pub mod v6 {
    use super::le::*;

    /// §1.2 `RafsV6SuperBlock`: 128 bytes at file offset 1024.
    pub const SB: usize = 1024;
    pub const S_MAGIC: usize = SB;
    pub const S_BLKSZBITS: usize = SB + 12;
    pub const S_ROOT_NID: usize = SB + 14;
    pub const S_META_BLKADDR: usize = SB + 40;
    pub const S_DEVT_SLOTOFF: usize = SB + 88;
    /// §1.3 `RafsV6SuperBlockExt`: 256 bytes at file offset 1152.
    pub const EXT: usize = 1152;
    pub const S_BLOB_TABLE_OFFSET: usize = EXT + 8;
    pub const S_CHUNK_SIZE: usize = EXT + 20;
    pub const S_CHUNK_TABLE_OFFSET: usize = EXT + 24;
    pub const S_CHUNK_TABLE_SIZE: usize = EXT + 32;
    /// §1.6 `RafsV6Blob` fields, relative to the 256-byte entry.
    pub const BLOB_ID: usize = 0;
    pub const BLOB_ID_LEN: usize = 64;
    pub const BLOB_CHUNK_COUNT: usize = 72;
    pub const BLOB_COMPRESSION_ALGO: usize = 76;
    pub const BLOB_FEATURES: usize = 84;
    pub const BLOB_UNCOMPRESSED_SIZE: usize = 96;
    pub const BLOB_CI_COMPRESSOR: usize = 108;
    pub const BLOB_CI_OFFSET: usize = 112;
    pub const BLOB_CI_COMPRESSED_SIZE: usize = 120;
    pub const BLOB_CI_UNCOMPRESSED_SIZE: usize = 128;
    /// §1.6 `BlobFeatures::CHUNK_INFO_V2`: 24-byte CI entries instead of 16-byte V1 ones.
    pub const CHUNK_INFO_V2: u32 = 0x4;
    /// §2.7 `RafsV5ChunkInfo` (the §1.13 chunk table row) field: uncompressed_size.
    pub const ROW_UNCOMPRESSED_SIZE: usize = 44;
    pub const ROW_INDEX: usize = 72;
    pub const ROW_BLOB_INDEX: usize = 32;
    /// §1.8 inode field offsets (same in compact and extended inodes): i_format, i_size.
    pub const I_SIZE: usize = 8;
    const LAYOUT_FLAT_INLINE: u16 = 2;
    const LAYOUT_CHUNK_BASED: u16 = 4;
    pub const BLOCK: usize = 4096;

    pub fn root_nid(b: &[u8]) -> u64 {
        u16_at(b, S_ROOT_NID) as u64
    }

    /// Inodes live at `s_meta_blkaddr * blksz + nid * 32` (§1.8). The fixtures use 4 KiB blocks.
    pub fn meta_base(b: &[u8]) -> usize {
        assert_eq!(b[S_BLKSZBITS], 12, "fixture uses 4 KiB metadata blocks");
        u32_at(b, S_META_BLKADDR) as usize * BLOCK
    }

    pub fn chunk_size(b: &[u8]) -> u64 {
        u32_at(b, S_CHUNK_SIZE) as u64
    }

    /// §1.5: device slot `i` is 128 bytes at `s_devt_slotoff * 128 + 128 * i`; its first 64 bytes are the
    /// blob id.
    pub fn device_slot(b: &[u8], i: usize) -> usize {
        u16_at(b, S_DEVT_SLOTOFF) as usize * 128 + 128 * i
    }

    /// §1.6: blob table entry `i` is 256 bytes at `s_blob_table_offset + 256 * i`.
    pub fn blob_entry(b: &[u8], i: usize) -> usize {
        u64_at(b, S_BLOB_TABLE_OFFSET) as usize + 256 * i
    }

    pub fn blob_id(b: &[u8], i: usize) -> String {
        let e = blob_entry(b, i) + BLOB_ID;
        let field = &b[e..e + BLOB_ID_LEN];
        let end = field.iter().position(|&c| c == 0).unwrap_or(BLOB_ID_LEN);
        String::from_utf8(field[..end].to_vec()).unwrap()
    }

    /// Name blob `i` `id` in both places a v6 bootstrap names it: the blob table entry and the device slot.
    pub fn set_blob_id(b: &mut [u8], i: usize, id: &str) {
        let entry = blob_entry(b, i) + BLOB_ID;
        put_padded(b, entry, BLOB_ID_LEN, id);
        let slot = device_slot(b, i);
        put_padded(b, slot, BLOB_ID_LEN, id);
    }

    /// §1.13: the chunk table row whose (blob_index, index) is the given chunk.
    pub fn chunk_row(b: &[u8], blob_index: u32, ci_index: u32) -> usize {
        let (off, size) = (
            u64_at(b, S_CHUNK_TABLE_OFFSET) as usize,
            u64_at(b, S_CHUNK_TABLE_SIZE) as usize,
        );
        (off..off + size)
            .step_by(80)
            .find(|&row| {
                u32_at(b, row + ROW_BLOB_INDEX) == blob_index
                    && u32_at(b, row + ROW_INDEX) == ci_index
            })
            .unwrap_or_else(|| panic!("no chunk table row for blob {blob_index} chunk {ci_index}"))
    }

    /// §1.8: what an inode slot says.
    pub struct Inode {
        /// File offset of the inode.
        pub off: usize,
        /// i_format bits 1..3: 0 FLAT_PLAIN, 2 FLAT_INLINE, 4 CHUNK_BASED.
        pub layout: u16,
        pub extended: bool,
        pub size: u64,
        pub i_u: u32,
        pub xattr_size: usize,
    }

    impl Inode {
        pub fn inode_size(&self) -> usize {
            if self.extended {
                64
            } else {
                32
            }
        }
    }

    pub fn inode(b: &[u8], nid: u64) -> Inode {
        let off = meta_base(b) + nid as usize * 32;
        let i_format = u16_at(b, off);
        let extended = i_format & 1 == 1;
        let i_xattr_icount = u16_at(b, off + 2) as usize;
        Inode {
            off,
            layout: (i_format >> 1) & 7,
            extended,
            // i_size: u32 in the compact inode, u64 in the extended one (both at offset 8).
            size: if extended {
                u64_at(b, off + I_SIZE)
            } else {
                u32_at(b, off + I_SIZE) as u64
            },
            i_u: u32_at(b, off + 16),
            // §1.12: `12 + 4 * (n - 1)` bytes of inline xattrs when i_xattr_icount = n > 0.
            xattr_size: if i_xattr_icount == 0 {
                0
            } else {
                12 + 4 * (i_xattr_icount - 1)
            },
        }
    }

    /// One 12-byte `RafsV6Dirent` (§1.10) and where it and its name are in the file.
    pub struct Dirent {
        pub name: Vec<u8>,
        pub nid: u64,
        pub file_type: u8,
        /// File offset of the dirent; e_nid is at +0, e_nameoff at +8, e_file_type at +10.
        pub at: usize,
        /// File offset of the name bytes.
        pub name_at: usize,
    }

    /// Every entry of directory `nid`, "." and ".." included, in on-disk order (§1.10).
    pub fn dirents(b: &[u8], nid: u64) -> Vec<Dirent> {
        let dir = inode(b, nid);
        assert_eq!(dir.layout & 1, 0, "nid {nid}: not a flat directory");
        let nblocks = (dir.size as usize).div_ceil(BLOCK);
        let mut out = Vec::new();
        for k in 0..nblocks {
            let len = (dir.size as usize - k * BLOCK).min(BLOCK);
            // The last, partial block of a FLAT_INLINE directory follows the inode and its xattrs;
            // every other block is at block address `i_u + k`.
            let start = if dir.layout == LAYOUT_FLAT_INLINE
                && k == nblocks - 1
                && !(dir.size as usize).is_multiple_of(BLOCK)
            {
                dir.off + dir.inode_size() + dir.xattr_size
            } else {
                (dir.i_u as usize + k) * BLOCK
            };
            let block = &b[start..start + len];
            let count = u16_at(block, 8) as usize / 12;
            for i in 0..count {
                let d = i * 12;
                let name_start = u16_at(block, d + 8) as usize;
                let name_end = if i + 1 < count {
                    u16_at(block, d + 12 + 8) as usize
                } else {
                    len
                };
                let mut name = &block[name_start..name_end];
                if i + 1 == count {
                    // The last name runs to the end of the block, or to the first NUL.
                    name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
                }
                out.push(Dirent {
                    name: name.to_vec(),
                    nid: u64_at(block, d),
                    file_type: block[d + 10],
                    at: start + d,
                    name_at: start + name_start,
                });
            }
        }
        out
    }

    /// The dirent naming `path` (relative to the root, '/'-separated).
    pub fn entry(b: &[u8], path: &str) -> Dirent {
        let mut dir = root_nid(b);
        let mut found = None;
        for part in path.split('/') {
            let e = dirents(b, dir)
                .into_iter()
                .find(|e| e.name == part.as_bytes())
                .unwrap_or_else(|| panic!("{path}: no entry {part:?}"));
            dir = e.nid;
            found = Some(e);
        }
        found.unwrap()
    }

    pub fn nid(b: &[u8], path: &str) -> u64 {
        if path.is_empty() {
            root_nid(b)
        } else {
            entry(b, path).nid
        }
    }

    /// Names of the regular files directly in directory `path`, in on-disk (sorted) order.
    pub fn files_in(b: &[u8], path: &str) -> Vec<String> {
        dirents(b, nid(b, path))
            .into_iter()
            .filter(|e| e.file_type == 1)
            .map(|e| format!("{path}/{}", String::from_utf8(e.name).unwrap()))
            .collect()
    }

    /// §1.9 `RafsV6InodeChunkAddr` of chunk `k` of a chunk-based file.
    pub struct ChunkIndex {
        pub blob_index: u32,
        pub ci_index: u32,
    }

    /// The chunk index array follows the inode and its xattrs at `round_up(inode_size + xattr_size, 8)`.
    pub fn chunk_index(b: &[u8], nid: u64, k: usize) -> ChunkIndex {
        let ino = inode(b, nid);
        assert_eq!(
            ino.layout, LAYOUT_CHUNK_BASED,
            "nid {nid} is not a chunk-based file"
        );
        let at = ino.off + (ino.inode_size() + ino.xattr_size).next_multiple_of(8) + 8 * k;
        let (lo, hi) = (u16_at(b, at) as u32, u16_at(b, at + 2) as u32);
        // c_blob_addr_hi: low byte = blob index + 1 (the EROFS device id), high byte = CI index bits 16..23.
        ChunkIndex {
            blob_index: (hi & 0xff) - 1,
            ci_index: lo | (hi >> 8) << 16,
        }
    }

    /// A decoded V1 chunk-info entry (§1.16).
    pub struct CiEntry {
        pub compressed_offset: u64,
        pub compressed_size: u32,
        pub uncompressed_size: u32,
    }

    pub fn ci_v1(e: &[u8]) -> CiEntry {
        let (u, c) = (u64_at(e, 0), u64_at(e, 8));
        // uncomp_info bits 44..63 = low 20 bits of (size - 1), bits 8..11 = its bits 20..23; comp_info alike
        // with bits 40..43 for the high bits; compressed offset = comp_info bits 0..39.
        CiEntry {
            compressed_offset: c & ((1 << 40) - 1),
            compressed_size: ((c >> 44) | ((c >> 40) & 0xf) << 20) as u32 + 1,
            uncompressed_size: ((u >> 44) | ((u >> 8) & 0xf) << 20) as u32 + 1,
        }
    }

    /// Re-encode the uncompressed size of a V1 entry.
    pub fn set_ci_v1_uncompressed_size(e: &mut [u8], size: u32) {
        let s = (size - 1) as u64;
        let mut u = u64_at(e, 0);
        u &= !(0xf_ffff << 44) & !(0xf << 8);
        u |= (s & 0xf_ffff) << 44 | ((s >> 20) & 0xf) << 8;
        put_u64(e, 0, u);
    }
}

// ------------------------------------------------------------------------------------------------------
// RAFS v5 (§2): superblock, inode table, blob table, inode records and chunk records.

pub mod v5 {
    use super::le::*;

    /// §2.1 `RafsV5SuperBlock` fields.
    pub const S_MAGIC: usize = 0;
    pub const S_BLOCK_SIZE: usize = 12;
    pub const S_FLAGS: usize = 16;
    pub const S_INODE_TABLE_OFFSET: usize = 32;
    pub const S_PREFETCH_TABLE_OFFSET: usize = 40;
    pub const S_BLOB_TABLE_OFFSET: usize = 48;
    pub const S_INODE_TABLE_ENTRIES: usize = 56;
    pub const S_PREFETCH_TABLE_ENTRIES: usize = 60;
    pub const S_BLOB_TABLE_SIZE: usize = 64;
    pub const S_EXT_BLOB_TABLE_ENTRIES: usize = 68;
    pub const S_EXT_BLOB_TABLE_OFFSET: usize = 72;
    /// §2.5: an extended blob table entry is 64 bytes, its chunk count the first u32.
    pub const EXT_BLOB_ENTRY: usize = 64;
    /// §2.6 `RafsV5Inode` (128-byte record) fields.
    pub const INODE_SIZE: usize = 128;
    pub const I_INO: usize = 40;
    pub const I_MODE: usize = 60;
    pub const I_SIZE: usize = 64;
    pub const I_FLAGS: usize = 80;
    pub const I_CHILD_INDEX: usize = 92;
    pub const I_CHILD_COUNT: usize = 96;
    pub const I_NAME_SIZE: usize = 100;
    pub const I_SYMLINK_SIZE: usize = 102;
    /// i_flags bits: an xattr table follows the name and symlink target; the file may have holes.
    pub const I_XATTR: u64 = 0x4;
    pub const I_HAS_HOLE: u64 = 0x8;
    /// §2.7 `RafsV5ChunkInfo` (80-byte record) fields.
    pub const CHUNK_RECORD: usize = 80;
    pub const C_BLOB_INDEX: usize = 32;
    pub const C_FLAGS: usize = 36;
    pub const C_COMPRESSED_SIZE: usize = 40;
    pub const C_UNCOMPRESSED_SIZE: usize = 44;
    pub const C_COMPRESSED_OFFSET: usize = 48;
    pub const C_UNCOMPRESSED_OFFSET: usize = 56;
    pub const C_FILE_OFFSET: usize = 64;
    pub const C_INDEX: usize = 72;
    /// Chunk flag COMPRESSED.
    pub const COMPRESSED: u32 = 0x1;

    /// §2.2: the inode table holds one u32 per slot (slot = ino, 1-based); value = record offset >> 3.
    pub fn slot_entry(b: &[u8], slot: u32) -> usize {
        u64_at(b, S_INODE_TABLE_OFFSET) as usize + (slot as usize - 1) * 4
    }

    pub struct Record {
        pub slot: u32,
        /// File offset of the 128-byte record.
        pub off: usize,
        pub ino: u64,
        pub mode: u32,
        pub size: u64,
        pub flags: u64,
        pub child_index: u32,
        pub child_count: u32,
        pub name: Vec<u8>,
        pub symlink_size: usize,
    }

    pub fn record(b: &[u8], slot: u32) -> Record {
        let off = (u32_at(b, slot_entry(b, slot)) as usize) << 3;
        let name_size = u16_at(b, off + I_NAME_SIZE) as usize;
        Record {
            slot,
            off,
            ino: u64_at(b, off + I_INO),
            mode: u32_at(b, off + I_MODE),
            size: u64_at(b, off + I_SIZE),
            flags: u64_at(b, off + I_FLAGS),
            child_index: u32_at(b, off + I_CHILD_INDEX),
            child_count: u32_at(b, off + I_CHILD_COUNT),
            // §2.9: the name follows the record.
            name: b[off + INODE_SIZE..off + INODE_SIZE + name_size].to_vec(),
            symlink_size: u16_at(b, off + I_SYMLINK_SIZE) as usize,
        }
    }

    /// A directory's children occupy slots `[i_child_index, i_child_index + i_child_count)` (§2.2).
    pub fn children(b: &[u8], dir: &Record) -> Vec<Record> {
        (0..dir.child_count)
            .map(|k| record(b, dir.child_index + k))
            .collect()
    }

    /// The record (and slot) of `path`, found from the root (slot 1) by name.
    pub fn find(b: &[u8], path: &str) -> Record {
        let mut rec = record(b, 1);
        if path.is_empty() {
            return rec;
        }
        for part in path.split('/') {
            rec = children(b, &rec)
                .into_iter()
                .find(|c| c.name == part.as_bytes())
                .unwrap_or_else(|| panic!("{path}: no entry {part:?}"));
        }
        rec
    }

    pub fn files_in(b: &[u8], path: &str) -> Vec<String> {
        children(b, &find(b, path))
            .into_iter()
            .filter(|c| c.mode & 0o170000 == 0o100000)
            .map(|c| format!("{path}/{}", String::from_utf8(c.name).unwrap()))
            .collect()
    }

    /// §2.6: after the record come the name and the symlink target (each padded to 8), then the xattr
    /// table (`u64 total_size` + pairs, padded to 8) when I_XATTR is set, then the chunk records.
    pub fn chunk_record(b: &[u8], rec: &Record, k: usize) -> usize {
        assert!(
            k < rec.child_count as usize,
            "{:?} has {} chunks",
            String::from_utf8_lossy(&rec.name),
            rec.child_count
        );
        let mut off = rec.off
            + INODE_SIZE
            + rec.name.len().next_multiple_of(8)
            + rec.symlink_size.next_multiple_of(8);
        if rec.flags & I_XATTR != 0 {
            off += 8 + (u64_at(b, off) as usize).next_multiple_of(8);
        }
        off + k * CHUNK_RECORD
    }

    /// §2.8: where the xattr table of a record with I_XATTR starts (its `u64 total_size`), after the name
    /// and the symlink target, each padded to 8.
    pub fn xattr_table(rec: &Record) -> usize {
        assert!(rec.flags & I_XATTR != 0, "record has no xattrs");
        rec.off
            + INODE_SIZE
            + rec.name.len().next_multiple_of(8)
            + rec.symlink_size.next_multiple_of(8)
    }

    /// §2.4: the first blob table entry is `u32 readahead_offset, u32 readahead_size, blob id`; returns the
    /// file offset of the id and the id.
    pub fn first_blob_id(b: &[u8]) -> (usize, String) {
        let table = u64_at(b, S_BLOB_TABLE_OFFSET) as usize;
        let end = table + u32_at(b, S_BLOB_TABLE_SIZE) as usize;
        let at = table + 8;
        // Entries are separated by one NUL; the last one may run to the end of the table.
        let len = b[at..end].iter().position(|&c| c == 0).unwrap_or(end - at);
        (at, String::from_utf8(b[at..at + len].to_vec()).unwrap())
    }

    /// §1.4 compression flags of s_flags, as the §1.6 numbering (0 none, 1 lz4_block, 3 zstd).
    pub fn compressor(b: &[u8]) -> u32 {
        match u64_at(b, S_FLAGS) & (0x1 | 0x2 | 0x40 | 0x80) {
            0x1 => 0,
            0x2 | 0 => 1,
            0x80 => 3,
            f => panic!("compression flags {f:#x}"),
        }
    }
}
