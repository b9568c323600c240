//! RAFS v6 bootstraps: EROFS records the kernel reads (superblock, device slots, inodes, directory entries,
//! chunk indexes, inline xattrs) and the RAFS records only Nydus readers use (extended superblock, blob
//! table, chunk table; the chunk table row is [`crate::v5::ChunkRecord`]).

use crate::record;

/// File offset of the EROFS superblock (the first 1024 bytes are the boot area).
pub const SUPER_OFFSET: u64 = 1024;
/// File offset of the RAFS extended superblock, right after the EROFS one.
pub const EXT_SUPER_OFFSET: u64 = 1152;
pub const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
/// `feature_compat` bit marking an EROFS image as a RAFS v6 bootstrap.
pub const COMPAT_RAFS_V6: u32 = 0x4000_0000;
pub const INCOMPAT_CHUNKED_FILE: u32 = 0x4;
pub const INCOMPAT_DEVICE_TABLE: u32 = 0x8;
/// Inodes live in 32-byte slots: nid × 32 from the meta area base.
pub const INODE_SLOT: u64 = 32;

/// `i_format` bit 0: 0 = compact (32 B), 1 = extended (64 B) inode.
pub const FORMAT_EXTENDED: u16 = 0x1;
/// Data layouts (`i_format` bits 1..3).
pub const LAYOUT_FLAT_PLAIN: u16 = 0;
pub const LAYOUT_FLAT_INLINE: u16 = 2;
pub const LAYOUT_CHUNK_BASED: u16 = 4;
/// Chunk-format header of a chunk-based file (`i_u`): the array holds 8-byte chunk indexes.
pub const CHUNK_FORMAT_INDEXES: u32 = 0x20;

/// Directory entry file types.
pub mod file_type {
    pub const UNKNOWN: u8 = 0;
    pub const REG: u8 = 1;
    pub const DIR: u8 = 2;
    pub const CHR: u8 = 3;
    pub const BLK: u8 = 4;
    pub const FIFO: u8 = 5;
    pub const SOCK: u8 = 6;
    pub const SYMLINK: u8 = 7;
}

record! {
    /// The EROFS superblock, 128 bytes at [`SUPER_OFFSET`].
    pub struct SuperBlock(128) {
        magic: u32 = 0,
        checksum: u32 = 4,
        feature_compat: u32 = 8,
        blkszbits: u8 = 12,
        extslots: u8 = 13,
        root_nid: u16 = 14,
        inos: u64 = 16,
        build_time: u64 = 24,
        build_time_nsec: u32 = 32,
        /// Blocks of all devices (statfs); RAFS writes the blobs' uncompressed blocks.
        blocks: u32 = 36,
        /// Block address of the meta area, the base of inode slots.
        meta_blkaddr: u32 = 40,
        xattr_blkaddr: u32 = 44,
        uuid: [u8; 16] = 48,
        volume_name: [u8; 16] = 64,
        feature_incompat: u32 = 80,
        /// Compression settings in EROFS; zero in RAFS.
        u1: u16 = 84,
        extra_devices: u16 = 86,
        /// Device table offset in units of [`DeviceSlot`]s.
        devt_slotoff: u16 = 88,
    }
}

record! {
    /// The RAFS v6 extended superblock, 256 bytes at [`EXT_SUPER_OFFSET`] (the kernel never reads it).
    pub struct ExtSuperBlock(256) {
        /// `RafsSuperFlags`: compressor, digester, uid/gid, xattrs, encryption.
        flags: u64 = 0,
        blob_table_offset: u64 = 8,
        blob_table_size: u32 = 16,
        chunk_size: u32 = 20,
        chunk_table_offset: u64 = 24,
        chunk_table_size: u64 = 32,
        prefetch_table_offset: u64 = 40,
        prefetch_table_size: u32 = 48,
    }
}

record! {
    /// One EROFS device slot (128 bytes): a blob, device id = slot index + 1.
    pub struct DeviceSlot(128) {
        /// The blob id, NUL padded (the EROFS device tag).
        tag: [u8; 64] = 0,
        /// The blob's uncompressed size in blocks.
        blocks: u32 = 64,
        /// Start of the blob in a flattened address space.
        mapped_blkaddr: u32 = 68,
    }
}

record! {
    /// A compact (32-byte) inode: no mtime, 16-bit owners and link count, 32-bit size.
    pub struct InodeCompact(32) {
        format: u16 = 0,
        xattr_icount: u16 = 2,
        mode: u16 = 4,
        nlink: u16 = 6,
        size: u32 = 8,
        /// Block address (dirs, symlinks), chunk-format header (files) or rdev (devices).
        i_u: u32 = 16,
        ino: u32 = 20,
        uid: u16 = 24,
        gid: u16 = 26,
    }
}

record! {
    /// An extended (64-byte) inode.
    pub struct InodeExtended(64) {
        format: u16 = 0,
        xattr_icount: u16 = 2,
        mode: u16 = 4,
        size: u64 = 8,
        /// Block address (dirs, symlinks), chunk-format header (files) or rdev (devices).
        i_u: u32 = 16,
        ino: u32 = 20,
        uid: u32 = 24,
        gid: u32 = 28,
        mtime: u64 = 32,
        mtime_nsec: u32 = 40,
        nlink: u32 = 44,
    }
}

record! {
    /// A directory entry (12 bytes); a block holds the entries, then their names.
    pub struct Dirent(12) {
        nid: u64 = 0,
        /// Offset of the name inside the block.
        nameoff: u16 = 8,
        file_type: u8 = 10,
    }
}

record! {
    /// One entry of a chunk-based file's index array (8 bytes).
    pub struct ChunkIndex(8) {
        /// Bits 0..15 of the chunk's index in its blob.
        blob_addr_lo: u16 = 0,
        /// Low byte: device id (blob index + 1); high byte: bits 16..23 of the chunk index.
        blob_addr_hi: u16 = 2,
        /// Block of the chunk in the blob's uncompressed space.
        blkaddr: u32 = 4,
    }
}

impl ChunkIndex {
    /// The index naming chunk `ci_index` of blob `blob_index` at block `blkaddr`.
    pub fn new(blob_index: u32, ci_index: u32, blkaddr: u32) -> Self {
        ChunkIndex {
            blob_addr_lo: (ci_index & 0xffff) as u16,
            blob_addr_hi: (((blob_index + 1) & 0xff) | ((ci_index >> 16) & 0xff) << 8) as u16,
            blkaddr,
        }
    }
    /// Device id: blob index + 1 (0 names no blob).
    pub fn device(&self) -> u32 {
        self.blob_addr_hi as u32 & 0xff
    }
    /// The chunk's index inside its blob (24 bits).
    pub fn ci_index(&self) -> u32 {
        self.blob_addr_lo as u32 | (self.blob_addr_hi as u32 >> 8) << 16
    }
}

record! {
    /// The header of an inode's inline xattr area (12 bytes).
    pub struct XattrIbodyHeader(12) {
        name_filter: u32 = 0,
        shared_count: u8 = 4,
    }
}

record! {
    /// The head of one inline xattr entry (4 bytes), followed by the name suffix and the value.
    pub struct XattrEntry(4) {
        name_len: u8 = 0,
        name_index: u8 = 1,
        value_size: u16 = 2,
    }
}

/// Bytes of an inline xattr area holding `icount` 4-byte units (0: none): the header counts as the first.
pub fn xattr_area_size(icount: u16) -> u64 {
    match icount {
        0 => 0,
        n => <XattrIbodyHeader as crate::Record>::SIZE as u64 + 4 * (n as u64 - 1),
    }
}

record! {
    /// One blob table entry (256 bytes), in device-slot order.
    pub struct BlobEntry(256) {
        blob_id: [u8; 64] = 0,
        blob_index: u32 = 64,
        chunk_size: u32 = 68,
        chunk_count: u32 = 72,
        compression_algo: u32 = 76,
        digest_algo: u32 = 80,
        /// `BlobFeatures` bits.
        features: u32 = 84,
        compressed_size: u64 = 88,
        uncompressed_size: u64 = 96,
        blob_toc_size: u32 = 104,
        ci_compressor: u32 = 108,
        ci_offset: u64 = 112,
        ci_compressed_size: u64 = 120,
        ci_uncompressed_size: u64 = 128,
        blob_toc_digest: [u8; 32] = 136,
        blob_meta_digest: [u8; 32] = 168,
        blob_meta_size: u64 = 200,
        cipher_iv: [u8; 8] = 208,
        cipher_algo: u32 = 216,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Record;

    #[test]
    fn superblocks_round_trip() {
        let sb = SuperBlock {
            magic: EROFS_MAGIC,
            feature_compat: COMPAT_RAFS_V6,
            blkszbits: 12,
            root_nid: 128,
            inos: 7,
            blocks: 736,
            meta_blkaddr: 2,
            feature_incompat: INCOMPAT_CHUNKED_FILE | INCOMPAT_DEVICE_TABLE,
            extra_devices: 1,
            devt_slotoff: 11,
            ..Default::default()
        };
        let bytes = sb.to_bytes();
        assert_eq!(
            &bytes[..4],
            &[0xe2, 0xe1, 0xf5, 0xe0],
            "the magic as the kernel reads it"
        );
        assert_eq!(bytes[12], 12);
        assert_eq!(&bytes[86..90], &[1, 0, 11, 0]);
        assert_eq!(SuperBlock::read(&bytes), Some(sb));

        let ext = ExtSuperBlock {
            flags: 0x0100_0194,
            blob_table_offset: 4096,
            blob_table_size: 256,
            chunk_size: 0x10_0000,
            chunk_table_offset: 0x4000,
            chunk_table_size: 160,
            prefetch_table_offset: 4352,
            prefetch_table_size: 8,
        };
        assert_eq!(ExtSuperBlock::read(&ext.to_bytes()), Some(ext));
    }

    #[test]
    fn inodes_dirents_and_slots_round_trip() {
        let compact = InodeCompact {
            format: LAYOUT_FLAT_INLINE << 1,
            xattr_icount: 3,
            mode: 0o40755,
            nlink: 2,
            size: 67,
            i_u: 9,
            ino: 1,
            uid: 1000,
            gid: 1000,
        };
        assert_eq!(InodeCompact::read(&compact.to_bytes()), Some(compact));
        let ext = InodeExtended {
            format: FORMAT_EXTENDED | LAYOUT_CHUNK_BASED << 1,
            xattr_icount: 0,
            mode: 0o100644,
            size: 3_000_000,
            i_u: CHUNK_FORMAT_INDEXES | 8,
            ino: 3,
            uid: 70000,
            gid: 70001,
            mtime: 1_700_000_000,
            mtime_nsec: 5,
            nlink: 1,
        };
        let bytes = ext.to_bytes();
        assert_eq!(&bytes[8..16], &3_000_000u64.to_le_bytes());
        assert_eq!(InodeExtended::read(&bytes), Some(ext));
        let d = Dirent {
            nid: 133,
            nameoff: 48,
            file_type: file_type::REG,
        };
        assert_eq!(Dirent::read(&d.to_bytes()), Some(d));
        let slot = DeviceSlot {
            tag: crate::pad(b"be7d77ee").unwrap(),
            blocks: 9,
            mapped_blkaddr: 512,
        };
        assert_eq!(DeviceSlot::read(&slot.to_bytes()), Some(slot));
        assert_eq!(crate::padded(&slot.tag), b"be7d77ee");
    }

    #[test]
    fn chunk_indexes_split_the_ci_index_around_the_device() {
        let c = ChunkIndex::new(4, 0x12_3456, 513);
        assert_eq!(c.blob_addr_lo, 0x3456);
        assert_eq!(c.blob_addr_hi, 0x1205);
        assert_eq!((c.device(), c.ci_index()), (5, 0x12_3456));
        assert_eq!(ChunkIndex::read(&c.to_bytes()), Some(c));
    }

    #[test]
    fn blob_entries_and_xattrs_round_trip() {
        let e = BlobEntry {
            blob_id: crate::pad(&[b'a'; 64]).unwrap(),
            blob_index: 0,
            chunk_size: 0x10_0000,
            chunk_count: 2,
            compression_algo: 3,
            digest_algo: 0,
            features: 0x7000_0021,
            compressed_size: 0x38da,
            uncompressed_size: 0x9000,
            blob_toc_size: 1024,
            ci_compressor: 0,
            ci_offset: 0x207a,
            ci_compressed_size: 32,
            ci_uncompressed_size: 32,
            blob_toc_digest: [7; 32],
            blob_meta_digest: [0; 32],
            blob_meta_size: 0,
            cipher_iv: [0; 8],
            cipher_algo: 0,
        };
        let bytes = e.to_bytes();
        assert_eq!(&bytes[112..120], &0x207au64.to_le_bytes());
        assert_eq!(BlobEntry::read(&bytes), Some(e));
        let x = XattrEntry {
            name_len: 3,
            name_index: 1,
            value_size: 300,
        };
        assert_eq!(XattrEntry::read(&x.to_bytes()), Some(x));
        assert_eq!(xattr_area_size(0), 0);
        assert_eq!(xattr_area_size(3), 20);
        let h = XattrIbodyHeader {
            name_filter: 0,
            shared_count: 0,
        };
        assert_eq!(XattrIbodyHeader::read(&h.to_bytes()), Some(h));
    }
}
