//! The RAFS v6 bootstrap writer: an EROFS image the kernel can mount (extended inodes, flat directories
//! and symlinks with inline tails, chunk-based files with chunk index arrays naming blob devices) plus the
//! RAFS extended superblock, blob table, prefetch table and chunk table that nydusd-style readers use.
//!
//! Layout (doc §1.1): superblocks and device slots in block 0, blob and prefetch tables from block 1,
//! the meta area base after them with the root inode one block further (nid 128), inodes in pre-order
//! (a directory, its non-directory children, then its subdirectories), full directory/symlink blocks,
//! then the sorted chunk table; the file is a whole number of 4 KiB blocks.

use super::chunker::{Chunk, ChunkTable};
use super::tree::{Kind, NodeId, Tree, ROOT};
use crate::error::{Error, Result};
use crate::format::bytes::round_up;
use crate::format::v6::{
    xattr_prefix, BLOB_ENTRY_SIZE, CHUNK_TABLE_ENTRY_SIZE, COMPAT_RAFS_V6, DEVICE_SLOT_SIZE,
    DIRENT_SIZE, EROFS_MAGIC, EXT_SUPER_OFFSET, FORMAT_EXTENDED, INCOMPAT_CHUNKED_FILE,
    INCOMPAT_DEVICE_TABLE, LAYOUT_CHUNK_BASED, LAYOUT_FLAT_INLINE, LAYOUT_FLAT_PLAIN, SUPER_OFFSET,
};
use crate::format::{blob_features as bf, flags, BlobInfo, Compressor, Digester};
use rafs_layout::erofs::{
    file_type, BlobEntry, ChunkIndex, DeviceSlot, Dirent, ExtSuperBlock, InodeExtended, SuperBlock,
    XattrEntry, XattrIbodyHeader, CHUNK_FORMAT_INDEXES,
};
use rafs_layout::{pad, Field, Record};

const BLOCK: u64 = 4096;
const BLOCK_BITS: u32 = 12;
/// Every inode is written extended, so mtimes and 32-bit owners are kept.
const INODE_SIZE: u64 = InodeExtended::SIZE as u64;
const DEVICE_TABLE_OFFSET: u64 = 1408;
/// Device slots start at 1408 = 11 * 128.
const DEVT_SLOTOFF: u16 = 11;
/// The root inode sits one block into the meta area, so nid 0 never names an inode.
const ROOT_OFFSET: u64 = BLOCK;
/// Device slots map blobs into one address space at this granularity (512 KiB).
const MAPPED_ALIGN: u64 = 0x8_0000;
const CHUNK_ADDR_SIZE: u64 = ChunkIndex::SIZE as u64;

/// Whole-image settings the writer records.
pub struct ImageParams<'a> {
    pub chunk_size: u32,
    pub compressor: Compressor,
    pub digester: Digester,
    pub explicit_uid_gid: bool,
    /// Nodes named by the prefetch list.
    pub prefetch: &'a [NodeId],
}

/// One on-disk inode (hard links share one).
struct Ino {
    node: NodeId,
    layout: u16,
    xattrs: Vec<u8>,
    size: u64,
    nlink: u32,
    /// Directory or symlink data: the tail kept after the inode, and full blocks kept at `blkaddr`.
    inline_len: u64,
    blocks: u64,
    /// Chunk index array bytes (regular files).
    index_bytes: u64,
    /// Byte offset from the meta area base (nid = offset / 32).
    offset: u64,
    blkaddr: u32,
}

impl Ino {
    fn nid(&self) -> u64 {
        self.offset / 32
    }
}

/// Where the parts of the bootstrap go: byte offsets and sizes in the file.
struct Layout {
    blob_table_off: u64,
    blob_table_size: u64,
    prefetch_off: u64,
    prefetch_size: u64,
    meta_base: u64,
    chunk_table_off: u64,
    chunk_table_size: u64,
    /// The file's size, a whole number of blocks.
    total: u64,
}

pub fn write(
    tree: &Tree,
    chunks: &ChunkTable,
    blobs: &[BlobInfo],
    p: &ImageParams,
) -> Result<Vec<u8>> {
    if blobs.len() > 255 {
        return Err(Error::Invalid(format!(
            "{} blobs: a v6 image can name at most 255",
            blobs.len()
        )));
    }
    let (inodes, node_ino, parents) = collect(tree, p)?;
    let prefetch: Vec<NodeId> = if blobs.is_empty() {
        Vec::new()
    } else {
        p.prefetch.to_vec()
    };
    let mut inodes = inodes;
    let layout = place(&mut inodes, blobs.len() as u64, prefetch.len() as u64)?;
    let table = chunk_table(tree, &inodes, chunks);
    let (chunk_table_off, chunk_table_size) = if table.is_empty() {
        (0, 0)
    } else {
        (layout.total, CHUNK_TABLE_ENTRY_SIZE * table.len() as u64)
    };
    let layout = Layout {
        chunk_table_off,
        chunk_table_size,
        total: round_up(layout.total + chunk_table_size, BLOCK),
        ..layout
    };
    let mut out = vec![
        0u8;
        usize::try_from(layout.total)
            .map_err(|_| Error::Invalid("bootstrap too large".into()))?
    ];
    let root_nid = inodes[node_ino[ROOT]].nid();
    write_superblocks(
        &mut out,
        &layout,
        &inodes,
        root_nid,
        blobs,
        p,
        prefetch.is_empty(),
    )?;
    write_blob_tables(&mut out, &layout, blobs, p.chunk_size)?;
    for (i, &node) in prefetch.iter().enumerate() {
        let nid = inodes[node_ino[node]].nid();
        let nid = u32::try_from(nid)
            .map_err(|_| Error::Invalid(format!("prefetch nid {nid} does not fit 32 bits")))?;
        nid.put(&mut out, layout.prefetch_off as usize + 4 * i);
    }

    // Inodes and their data.
    for (seq, ino) in inodes.iter().enumerate() {
        let node = &tree.nodes[ino.node];
        let at = (layout.meta_base + ino.offset) as usize;
        let data = inode_data(tree, &inodes, &node_ino, &parents, ino);
        inode_record(tree, ino, seq, p).write_to(&mut out[at..]);
        let after_core = at + INODE_SIZE as usize;
        out[after_core..after_core + ino.xattrs.len()].copy_from_slice(&ino.xattrs);
        let after_xattrs = after_core + ino.xattrs.len();
        if ino.blocks > 0 {
            let full = (ino.blocks * BLOCK).min(data.len() as u64) as usize;
            let b = ino.blkaddr as usize * BLOCK as usize;
            out[b..b + full].copy_from_slice(&data[..full]);
        }
        if ino.inline_len > 0 {
            let tail = &data[data.len() - ino.inline_len as usize..];
            out[after_xattrs..after_xattrs + tail.len()].copy_from_slice(tail);
        }
        if let Kind::File(f) = node.kind {
            let base = at + round_up(INODE_SIZE + ino.xattrs.len() as u64, 8) as usize;
            for (k, &c) in tree.files[f].chunks.iter().enumerate() {
                chunk_addr(chunks.get(c))?
                    .write_to(&mut out[base + k * CHUNK_ADDR_SIZE as usize..]);
            }
        }
    }

    for (i, c) in table.iter().enumerate() {
        c.write_to(&mut out[(chunk_table_off + CHUNK_TABLE_ENTRY_SIZE * i as u64) as usize..]);
    }
    Ok(out)
}

/// Place the tables before the meta area (device slots, blob table, prefetch table), every inode in the
/// meta area (`offset`) and the full data blocks after it (`blkaddr`). The layout's chunk table is left
/// empty and its `total` is where the chunk table goes.
fn place(inodes: &mut [Ino], nblobs: u64, nprefetch: u64) -> Result<Layout> {
    // Tables before the meta area: device slots, blob table, prefetch table.
    let blob_table_off = round_up(DEVICE_TABLE_OFFSET + DEVICE_SLOT_SIZE * nblobs, BLOCK);
    let blob_table_size = BLOB_ENTRY_SIZE * nblobs;
    let prefetch_off = blob_table_off + blob_table_size;
    let prefetch_size = 4 * nprefetch;
    let meta_base = round_up(prefetch_off + prefetch_size, BLOCK);

    // Inode area, then full data blocks, then the chunk table.
    let mut pos = ROOT_OFFSET;
    for ino in inodes.iter_mut() {
        let core = INODE_SIZE + ino.xattrs.len() as u64;
        let together = core + ino.inline_len;
        // An inline tail must not cross a block; keep every small inode inside one block.
        if together <= BLOCK && pos % BLOCK + together > BLOCK {
            pos = round_up(pos, BLOCK);
        }
        ino.offset = pos;
        let total = if ino.index_bytes > 0 {
            round_up(core, 8) + ino.index_bytes
        } else {
            together
        };
        pos += round_up(total, 32);
    }
    let mut cursor = round_up(meta_base + pos, BLOCK);
    for ino in inodes.iter_mut() {
        if ino.blocks > 0 {
            ino.blkaddr = block_addr(cursor)?;
            cursor += ino.blocks * BLOCK;
        }
    }
    Ok(Layout {
        blob_table_off,
        blob_table_size,
        prefetch_off,
        prefetch_size,
        meta_base,
        chunk_table_off: 0,
        chunk_table_size: 0,
        total: cursor,
    })
}

/// The EROFS superblock and the RAFS extended superblock.
fn write_superblocks(
    out: &mut [u8],
    layout: &Layout,
    inodes: &[Ino],
    root_nid: u64,
    blobs: &[BlobInfo],
    p: &ImageParams,
    no_prefetch: bool,
) -> Result<()> {
    let has_xattr = inodes.iter().any(|i| !i.xattrs.is_empty());
    let all_digests = !blobs.is_empty()
        && blobs
            .iter()
            .all(|b| b.features & bf::INLINED_CHUNK_DIGEST != 0);
    let sflags = p.compressor.flag()
        | p.digester.flag()
        | flags::ENCRYPTION_NONE
        | if p.explicit_uid_gid {
            flags::EXPLICIT_UID_GID
        } else {
            0
        }
        | if has_xattr { flags::HAS_XATTR } else { 0 }
        | if all_digests {
            flags::INLINED_CHUNK_DIGEST
        } else {
            0
        };
    let total_blocks: u64 = blobs.iter().map(|b| b.uncompressed_size / BLOCK).sum();
    SuperBlock {
        magic: EROFS_MAGIC,
        feature_compat: COMPAT_RAFS_V6,
        blkszbits: BLOCK_BITS as u8,
        root_nid: root_nid as u16,
        inos: inodes.len() as u64,
        blocks: total_blocks as u32,
        meta_blkaddr: block_addr(layout.meta_base)?,
        feature_incompat: INCOMPAT_CHUNKED_FILE | INCOMPAT_DEVICE_TABLE,
        extra_devices: blobs.len() as u16,
        devt_slotoff: DEVT_SLOTOFF,
        ..Default::default()
    }
    .write_to(&mut out[SUPER_OFFSET as usize..]);
    let (prefetch_table_offset, prefetch_table_size) = if no_prefetch {
        (0, 0)
    } else {
        (layout.prefetch_off, layout.prefetch_size as u32)
    };
    ExtSuperBlock {
        flags: sflags,
        blob_table_offset: layout.blob_table_off,
        blob_table_size: layout.blob_table_size as u32,
        chunk_size: p.chunk_size,
        chunk_table_offset: layout.chunk_table_off,
        chunk_table_size: layout.chunk_table_size,
        prefetch_table_offset,
        prefetch_table_size,
    }
    .write_to(&mut out[EXT_SUPER_OFFSET as usize..]);
    Ok(())
}

/// Device slots and blob table, in the same order; device ids in chunk indexes are slot + 1.
fn write_blob_tables(
    out: &mut [u8],
    layout: &Layout,
    blobs: &[BlobInfo],
    chunk_size: u32,
) -> Result<()> {
    let mut mapped_pos = layout.total;
    for (i, blob) in blobs.iter().enumerate() {
        let tag: [u8; 64] = pad(blob.id.as_bytes()).ok_or_else(|| {
            Error::Invalid(format!("blob id {:?} is longer than 64 bytes", blob.id))
        })?;
        let blocks = blob.uncompressed_size / BLOCK;
        let mapped = round_up(mapped_pos, MAPPED_ALIGN) / BLOCK;
        mapped_pos = (mapped + blocks) * BLOCK;
        DeviceSlot {
            tag,
            blocks: blocks as u32,
            mapped_blkaddr: mapped as u32,
        }
        .write_to(&mut out[(DEVICE_TABLE_OFFSET + DEVICE_SLOT_SIZE * i as u64) as usize..]);
        let ci = blob.ci.unwrap_or(crate::format::CiLocation {
            compressor: Compressor::None,
            offset: 0,
            compressed_size: 0,
            uncompressed_size: 0,
        });
        BlobEntry {
            blob_id: tag,
            blob_index: i as u32,
            chunk_size,
            chunk_count: blob.chunk_count,
            compression_algo: blob.compressor.to_u32(),
            digest_algo: blob.digester.to_u32(),
            features: blob.features,
            compressed_size: blob.compressed_size,
            uncompressed_size: blob.uncompressed_size,
            blob_toc_size: blob.toc_size,
            ci_compressor: ci.compressor.to_u32(),
            ci_offset: ci.offset,
            ci_compressed_size: ci.compressed_size,
            ci_uncompressed_size: ci.uncompressed_size,
            blob_toc_digest: blob.toc_digest,
            ..Default::default()
        }
        .write_to(&mut out[(layout.blob_table_off + BLOB_ENTRY_SIZE * i as u64) as usize..]);
    }
    Ok(())
}

/// A directory's entries (`.`, `..` and its children, sorted by name, packed into blocks) or a symlink's
/// target; nothing for other inodes.
fn inode_data(
    tree: &Tree,
    inodes: &[Ino],
    node_ino: &[usize],
    parents: &[NodeId],
    ino: &Ino,
) -> Vec<u8> {
    match &tree.nodes[ino.node].kind {
        Kind::Dir(children) => {
            let parent = parents[ino.node];
            let mut entries: Vec<(&[u8], u64, u8)> = vec![
                (b".", ino.nid(), file_type::DIR),
                (b"..", inodes[node_ino[parent]].nid(), file_type::DIR),
            ];
            for &c in children {
                entries.push((
                    &tree.nodes[c].name,
                    inodes[node_ino[c]].nid(),
                    dirent_type(tree, c),
                ));
            }
            entries.sort_by(|a, b| a.0.cmp(b.0));
            pack_dir(&entries)
        }
        Kind::Symlink(target) => target.clone(),
        _ => Vec::new(),
    }
}

/// The extended inode record of `ino`, the `seq`th inode written.
fn inode_record(tree: &Tree, ino: &Ino, seq: usize, p: &ImageParams) -> InodeExtended {
    let node = &tree.nodes[ino.node];
    let chunk_bits = p.chunk_size.trailing_zeros();
    let i_u = match &node.kind {
        Kind::Dir(_) | Kind::Symlink(_) => ino.blkaddr,
        Kind::File(_) => CHUNK_FORMAT_INDEXES | (chunk_bits - BLOCK_BITS),
        Kind::Special => encode_dev(node.meta.rdev_major, node.meta.rdev_minor),
    };
    let (uid, gid) = if p.explicit_uid_gid {
        (node.meta.uid, node.meta.gid)
    } else {
        (0, 0)
    };
    let icount = if ino.xattrs.is_empty() {
        0
    } else {
        (ino.xattrs.len() - 12) / 4 + 1
    };
    InodeExtended {
        format: FORMAT_EXTENDED | ino.layout << 1,
        xattr_icount: icount as u16,
        mode: node.meta.mode as u16,
        size: ino.size,
        i_u,
        ino: seq as u32 + 1,
        uid,
        gid,
        mtime: node.meta.mtime,
        mtime_nsec: node.meta.mtime_nsec,
        nlink: ino.nlink,
    }
}

/// Inodes in placement order, the inode of every reachable node, and every directory's parent.
#[allow(clippy::type_complexity)]
fn collect(tree: &Tree, p: &ImageParams) -> Result<(Vec<Ino>, Vec<usize>, Vec<NodeId>)> {
    let mut names_of_file = vec![0u32; tree.files.len()];
    let mut parents = vec![ROOT; tree.nodes.len()];
    for (node, parent) in tree.bfs() {
        parents[node] = parent;
        if let Kind::File(f) = tree.nodes[node].kind {
            names_of_file[f] += 1;
        }
    }
    let mut node_ino = vec![usize::MAX; tree.nodes.len()];
    let mut file_ino = vec![usize::MAX; tree.files.len()];
    let mut inodes = Vec::new();
    let mut place = |node: NodeId, inodes: &mut Vec<Ino>| -> Result<()> {
        if let Kind::File(f) = tree.nodes[node].kind {
            if file_ino[f] != usize::MAX {
                node_ino[node] = file_ino[f];
                return Ok(());
            }
            file_ino[f] = inodes.len();
        }
        node_ino[node] = inodes.len();
        inodes.push(new_ino(tree, node, names_of_file.as_slice(), p)?);
        Ok(())
    };
    // Pre-order over directories: the directory, its other children, then each subdirectory.
    let mut stack = vec![ROOT];
    while let Some(dir) = stack.pop() {
        place(dir, &mut inodes)?;
        let children = tree.children(dir);
        for &c in children.iter().filter(|&&c| !tree.is_dir(c)) {
            place(c, &mut inodes)?;
        }
        stack.extend(children.iter().rev().filter(|&&c| tree.is_dir(c)));
    }
    Ok((inodes, node_ino, parents))
}

fn new_ino(tree: &Tree, node: NodeId, names_of_file: &[u32], p: &ImageParams) -> Result<Ino> {
    let n = &tree.nodes[node];
    let xattrs = xattr_area(&n.meta.xattrs)?;
    let mut ino = Ino {
        node,
        layout: LAYOUT_FLAT_PLAIN,
        xattrs,
        size: 0,
        nlink: 1,
        inline_len: 0,
        blocks: 0,
        index_bytes: 0,
        offset: 0,
        blkaddr: 0,
    };
    let data_len = match &n.kind {
        Kind::Dir(children) => {
            ino.nlink = 2 + children.iter().filter(|&&c| tree.is_dir(c)).count() as u32;
            let mut names: Vec<&[u8]> = vec![b".", b".."];
            names.extend(children.iter().map(|&c| tree.nodes[c].name.as_slice()));
            names.sort();
            Some(dir_size(&names))
        }
        Kind::Symlink(target) => Some(target.len() as u64),
        Kind::File(f) => {
            let file = &tree.files[*f];
            let expected = file.size.div_ceil(p.chunk_size as u64);
            if file.chunks.len() as u64 != expected {
                return Err(Error::Invalid(format!(
                    "file {:?}: {} chunks recorded for {} bytes",
                    String::from_utf8_lossy(&n.name),
                    file.chunks.len(),
                    file.size
                )));
            }
            ino.layout = LAYOUT_CHUNK_BASED;
            ino.size = file.size;
            ino.nlink = names_of_file[*f];
            ino.index_bytes = CHUNK_ADDR_SIZE * expected;
            None
        }
        Kind::Special => None,
    };
    if let Some(len) = data_len {
        ino.size = len;
        let tail = len % BLOCK;
        if tail != 0 && INODE_SIZE + ino.xattrs.len() as u64 + tail <= BLOCK {
            ino.layout = LAYOUT_FLAT_INLINE;
            ino.inline_len = tail;
            ino.blocks = len / BLOCK;
        } else {
            ino.blocks = len.div_ceil(BLOCK);
        }
    }
    Ok(ino)
}

/// Referenced chunks, once each, sorted by (digest, blob, index) as upstream sorts its chunk table.
fn chunk_table(tree: &Tree, inodes: &[Ino], chunks: &ChunkTable) -> Vec<Chunk> {
    let mut used: Vec<u32> = Vec::new();
    for ino in inodes {
        if let Kind::File(f) = tree.nodes[ino.node].kind {
            used.extend_from_slice(&tree.files[f].chunks);
        }
    }
    used.sort_unstable();
    used.dedup();
    let mut table: Vec<Chunk> = used.iter().map(|&i| *chunks.get(i)).collect();
    table.sort_by_key(|c| (c.digest, c.blob_index, c.index));
    table
}

/// A chunk's 8-byte index entry: its CI index, its blob as device (index + 1), and its block in the
/// blob's uncompressed space (doc §1.9).
fn chunk_addr(c: &Chunk) -> Result<ChunkIndex> {
    if c.blob_index >= 255 || c.index >= 1 << 24 || !c.uncompressed_offset.is_multiple_of(BLOCK) {
        return Err(Error::Invalid(format!(
            "chunk {} of blob {} cannot be addressed in v6 (blob index, CI index or unaligned offset {})",
            c.index, c.blob_index, c.uncompressed_offset
        )));
    }
    Ok(ChunkIndex::new(
        c.blob_index,
        c.index,
        block_addr(c.uncompressed_offset)?,
    ))
}

fn block_addr(offset: u64) -> Result<u32> {
    u32::try_from(offset / BLOCK).map_err(|_| {
        Error::Invalid(format!(
            "offset {offset} is past the 16 TiB a block address reaches"
        ))
    })
}

fn dirent_type(tree: &Tree, node: NodeId) -> u8 {
    let n = &tree.nodes[node];
    match &n.kind {
        Kind::Dir(_) => file_type::DIR,
        Kind::File(_) => file_type::REG,
        Kind::Symlink(_) => file_type::SYMLINK,
        Kind::Special => match n.meta.file_type() {
            libc::S_IFCHR => file_type::CHR,
            libc::S_IFBLK => file_type::BLK,
            libc::S_IFIFO => file_type::FIFO,
            libc::S_IFSOCK => file_type::SOCK,
            _ => file_type::UNKNOWN,
        },
    }
}

/// Split sorted directory entries into blocks: a block holds dirents then names, and a new block starts
/// when the next entry (12 bytes + name) would not fit. Returns the entry count of each block.
fn dir_blocks(names: &[&[u8]]) -> Vec<(usize, u64)> {
    let mut blocks = Vec::new();
    let (mut count, mut used) = (0usize, 0u64);
    for name in names {
        let need = DIRENT_SIZE as u64 + name.len() as u64;
        if used + need > BLOCK {
            blocks.push((count, used));
            (count, used) = (0, 0);
        }
        count += 1;
        used += need;
    }
    blocks.push((count, used));
    blocks
}

/// Directory size: full blocks plus what the last block uses.
fn dir_size(names: &[&[u8]]) -> u64 {
    let blocks = dir_blocks(names);
    (blocks.len() as u64 - 1) * BLOCK + blocks.last().map(|b| b.1).unwrap_or(0)
}

/// Directory data for sorted (name, nid, type) entries; the last block is not padded.
fn pack_dir(entries: &[(&[u8], u64, u8)]) -> Vec<u8> {
    let names: Vec<&[u8]> = entries.iter().map(|e| e.0).collect();
    let blocks = dir_blocks(&names);
    let mut out = Vec::with_capacity(blocks.len() * BLOCK as usize);
    let mut next = 0;
    for (i, &(count, used)) in blocks.iter().enumerate() {
        let mut block = vec![
            0u8;
            if i + 1 == blocks.len() {
                used as usize
            } else {
                BLOCK as usize
            }
        ];
        let mut name_off = count * DIRENT_SIZE;
        for (k, (name, nid, t)) in entries[next..next + count].iter().enumerate() {
            Dirent {
                nid: *nid,
                nameoff: name_off as u16,
                file_type: *t,
            }
            .write_to(&mut block[k * DIRENT_SIZE..]);
            block[name_off..name_off + name.len()].copy_from_slice(name);
            name_off += name.len();
        }
        next += count;
        out.extend_from_slice(&block);
    }
    out
}

/// The inline xattr area: a 12-byte header, then entries (name index, suffix, value) padded to 4 bytes.
fn xattr_area(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<u8>> {
    if xattrs.is_empty() {
        return Ok(Vec::new());
    }
    // The header (name filter 0, no shared xattrs) is all zeros.
    let mut area = XattrIbodyHeader::default().to_bytes();
    for (name, value) in xattrs {
        let (index, suffix) = split_xattr_name(name)?;
        let value_len = u16::try_from(value.len())
            .map_err(|_| Error::Invalid("xattr value over 65535 bytes".into()))?;
        area.extend_from_slice(
            &XattrEntry {
                name_len: suffix.len() as u8,
                name_index: index,
                value_size: value_len,
            }
            .to_bytes(),
        );
        area.extend_from_slice(suffix);
        area.extend_from_slice(value);
        area.resize(round_up(area.len() as u64, 4) as usize, 0);
    }
    if area.len() as u64 > rafs_layout::erofs::xattr_area_size(u16::MAX) {
        return Err(Error::Invalid(format!(
            "{} bytes of xattrs on one inode (v6 holds at most 256 KiB)",
            area.len()
        )));
    }
    Ok(area)
}

/// EROFS name index and the rest of the name: POSIX ACLs are whole names, the others prefixes.
fn split_xattr_name(name: &[u8]) -> Result<(u8, &[u8])> {
    for index in [2u8, 3] {
        if name == xattr_prefix(index)? {
            return Ok((index, &[]));
        }
    }
    for index in [1u8, 4, 6] {
        let prefix = xattr_prefix(index)?;
        if let Some(suffix) = name.strip_prefix(prefix) {
            if !suffix.is_empty() && suffix.len() <= 255 {
                return Ok((index, suffix));
            }
        }
    }
    Err(Error::Invalid(format!(
        "xattr {:?} cannot be stored in RAFS",
        String::from_utf8_lossy(name)
    )))
}

/// The kernel's new_encode_dev layout.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major & 0xfff) << 8 | (minor & !0xff) << 12
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_blocks_break_before_overflowing() {
        // 255-byte names: 15 entries of 267 bytes fit in 4096 (4005), the 16th starts a new block.
        let long = vec![b'a'; 255];
        let names: Vec<&[u8]> = (0..20).map(|_| long.as_slice()).collect();
        let blocks = dir_blocks(&names);
        assert_eq!(blocks, vec![(15, 15 * 267), (5, 5 * 267)]);
        assert_eq!(dir_size(&names), 4096 + 5 * 267);
    }

    #[test]
    fn device_numbers_round_trip_through_the_reader() {
        for (major, minor) in [(0, 0), (1, 3), (8, 1), (259, 70000)] {
            let (m, n) = crate::format::decode_rdev(encode_dev(major, minor));
            assert_eq!((m, n), (major, minor));
        }
    }

    #[test]
    fn xattr_names_map_to_erofs_indexes() {
        assert_eq!(split_xattr_name(b"user.foo").unwrap(), (1, &b"foo"[..]));
        assert_eq!(
            split_xattr_name(b"trusted.overlay.opaque").unwrap(),
            (4, &b"overlay.opaque"[..])
        );
        assert_eq!(
            split_xattr_name(b"security.capability").unwrap(),
            (6, &b"capability"[..])
        );
        assert_eq!(
            split_xattr_name(b"system.posix_acl_access").unwrap(),
            (2, &b""[..])
        );
        assert!(split_xattr_name(b"system.other").is_err());
        assert!(split_xattr_name(b"user.").is_err());
    }
}
