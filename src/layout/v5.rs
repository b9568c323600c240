//! RAFS v5 bootstraps: the 8 KiB superblock, the extended blob table, inode records and chunk records.
//! The 80-byte chunk record is also the row of a v6 bootstrap's chunk table.

use crate::record;

pub const RAFS_V5_MAGIC: u32 = 0x5241_4653;
/// `s_fs_version` of v5 images (0x400, v4, is read too).
pub const RAFS_V5_VERSION: u32 = 0x500;
pub const SUPER_SIZE: u64 = 8192;

/// Inode record flags (`i_flags`).
pub const I_SYMLINK: u64 = 0x1;
pub const I_HARDLINK: u64 = 0x2;
pub const I_XATTR: u64 = 0x4;
/// The file may have ranges no chunk covers (read as zeros); without it, chunk k covers the k-th chunk.
pub const I_HAS_HOLE: u64 = 0x8;

/// Chunk record flags.
pub const CHUNK_COMPRESSED: u32 = 0x1;
pub const CHUNK_ENCRYPTED: u32 = 0x4;
pub const CHUNK_BATCH: u32 = 0x8;
pub const CHUNK_HAS_CRC32: u32 = 0x10;

record! {
    /// The v5 superblock (8192 bytes at offset 0; fields past 80 are reserved).
    pub struct SuperBlock(8192) {
        magic: u32 = 0,
        fs_version: u32 = 4,
        sb_size: u32 = 8,
        /// The chunk size.
        block_size: u32 = 12,
        /// `RafsSuperFlags`.
        flags: u64 = 16,
        inodes_count: u64 = 24,
        inode_table_offset: u64 = 32,
        prefetch_table_offset: u64 = 40,
        blob_table_offset: u64 = 48,
        inode_table_entries: u32 = 56,
        prefetch_table_entries: u32 = 60,
        blob_table_size: u32 = 64,
        extended_blob_table_entries: u32 = 68,
        extended_blob_table_offset: u64 = 72,
    }
}

record! {
    /// One extended blob table entry (64 bytes, same order as the blob table).
    pub struct ExtBlobEntry(64) {
        chunk_count: u32 = 0,
        /// `BlobFeatures` bits.
        features: u32 = 4,
        uncompressed_size: u64 = 8,
        compressed_size: u64 = 16,
    }
}

record! {
    /// An inode record (128 bytes), followed by its name, symlink target, xattrs and chunk records.
    pub struct Inode(128) {
        digest: [u8; 32] = 0,
        parent: u64 = 32,
        ino: u64 = 40,
        uid: u32 = 48,
        gid: u32 = 52,
        projid: u32 = 56,
        mode: u32 = 60,
        size: u64 = 64,
        /// 512-byte blocks.
        blocks: u64 = 72,
        flags: u64 = 80,
        nlink: u32 = 88,
        /// Directories: inode-table slot of the first child.
        child_index: u32 = 92,
        /// Directories: children; regular files: chunk records.
        child_count: u32 = 96,
        name_size: u16 = 100,
        symlink_size: u16 = 102,
        rdev: u32 = 104,
        mtime_nsec: u32 = 108,
        mtime: u64 = 112,
    }
}

record! {
    /// `RafsV5ChunkInfo` (80 bytes): a v5 file's chunk record and a v6 chunk-table row.
    pub struct ChunkRecord(80) {
        /// Digest of the chunk's uncompressed bytes.
        digest: [u8; 32] = 0,
        blob_index: u32 = 32,
        flags: u32 = 36,
        compressed_size: u32 = 40,
        uncompressed_size: u32 = 44,
        compressed_offset: u64 = 48,
        uncompressed_offset: u64 = 56,
        file_offset: u64 = 64,
        /// The chunk's index inside its blob.
        index: u32 = 72,
        /// CRC32C of the uncompressed bytes, when `flags` has [`CHUNK_HAS_CRC32`].
        crc32: u32 = 76,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Record;

    #[test]
    fn v5_records_round_trip() {
        let sb = SuperBlock {
            magic: RAFS_V5_MAGIC,
            fs_version: RAFS_V5_VERSION,
            sb_size: SUPER_SIZE as u32,
            block_size: 0x10_0000,
            flags: 0x16,
            inodes_count: 6,
            inode_table_offset: 8192,
            prefetch_table_offset: 8224,
            blob_table_offset: 8224,
            inode_table_entries: 7,
            prefetch_table_entries: 0,
            blob_table_size: 72,
            extended_blob_table_entries: 1,
            extended_blob_table_offset: 8296,
        };
        let bytes = sb.to_bytes();
        assert_eq!(bytes.len(), 8192);
        assert_eq!(&bytes[..4], b"SFAR", "the magic as it appears on disk");
        assert_eq!(SuperBlock::read(&bytes), Some(sb));
        let e = ExtBlobEntry {
            chunk_count: 5,
            features: 0x4000_0000,
            uncompressed_size: 3_005_006,
            compressed_size: 3_000_036,
        };
        assert_eq!(ExtBlobEntry::read(&e.to_bytes()), Some(e));
    }

    #[test]
    fn inode_and_chunk_records_round_trip() {
        let i = Inode {
            digest: [3; 32],
            parent: 1,
            ino: 2,
            uid: 1000,
            gid: 100,
            projid: 0,
            mode: 0o100644,
            size: 6,
            blocks: 1,
            flags: I_XATTR,
            nlink: 2,
            child_index: 0,
            child_count: 1,
            name_size: 1,
            symlink_size: 0,
            rdev: 0,
            mtime_nsec: 9,
            mtime: 1_700_000_000,
        };
        assert_eq!(Inode::read(&i.to_bytes()), Some(i));
        let c = ChunkRecord {
            digest: [9; 32],
            blob_index: 1,
            flags: CHUNK_COMPRESSED | CHUNK_HAS_CRC32,
            compressed_size: 100,
            uncompressed_size: 4096,
            compressed_offset: 6,
            uncompressed_offset: 4096,
            file_offset: 1 << 20,
            index: 3,
            crc32: 0xdead_beef,
        };
        let bytes = c.to_bytes();
        assert_eq!(&bytes[72..80], &[3, 0, 0, 0, 0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(ChunkRecord::read(&bytes), Some(c));
    }
}
