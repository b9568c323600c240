//! The RAFS v5 bootstrap writer (doc §2): an 8 KiB superblock, the inode table, prefetch table, blob
//! table and extended blob table, then one 128-byte record per name in depth-first pre-order, each
//! followed by its name, symlink target, xattrs and chunk records.
//!
//! Inode numbers are table slots assigned breadth first, so a directory's children are consecutive
//! (`[child_index, child_index + child_count)`) and lookup is a binary search. A hard link's later names
//! keep their own slot and record, but carry the first name's inode number.

use super::chunker::ChunkTable;
use super::tree::{Kind, NodeId, Tree, ROOT};
use super::v6::ImageParams;
use crate::error::{Error, Result};
use crate::format::bytes::round_up;
use crate::format::v5::{
    CHUNK_SIZE, EXT_BLOB_ENTRY_SIZE, INODE_SIZE, I_SYMLINK, I_XATTR, RAFS_V5_MAGIC, SUPER_SIZE,
};
use crate::format::{flags, BlobInfo};
use crate::storage::digest::digest;
use rafs_layout::v5::{ChunkRecord, ExtBlobEntry, Inode, SuperBlock, RAFS_V5_VERSION};
use rafs_layout::{Field, Record};

const ALIGN: u64 = 8;

/// Every node's inode-table slot and inode number, and what its record says about its place in the tree.
struct Inodes {
    /// Nodes breadth first, each with its parent.
    order: Vec<(NodeId, NodeId)>,
    slot: Vec<u32>,
    parent: Vec<NodeId>,
    ino: Vec<u32>,
    /// Names of each regular file (its nlink).
    file_names: Vec<u32>,
    /// Distinct inode numbers.
    unique: u64,
    /// Merkle-style inode digests.
    digests: Vec<[u8; 32]>,
}

/// The tables after the superblock and where each goes (each padded to 8 bytes).
struct Tables {
    inode_table_off: u64,
    prefetch_off: u64,
    prefetch: Vec<u32>,
    blob_table_off: u64,
    blob_table: Vec<u8>,
    ext_off: u64,
    records_off: u64,
}

/// The inode records in depth-first pre-order: each node's xattr area and record offset, and the end.
struct Records {
    xattrs: Vec<Vec<u8>>,
    record_off: Vec<u64>,
    dfs: Vec<NodeId>,
    total: u64,
}

pub fn write(
    tree: &Tree,
    chunks: &ChunkTable,
    blobs: &[BlobInfo],
    p: &ImageParams,
) -> Result<Vec<u8>> {
    let inodes = number_inodes(tree, chunks, p)?;
    let tables = tables(&inodes, blobs, p);
    let records = place_records(tree, tables.records_off, inodes.order.len());
    let mut out = vec![
        0u8;
        usize::try_from(records.total)
            .map_err(|_| Error::Invalid("bootstrap too large".into()))?
    ];
    write_tables(&mut out, &tables, &inodes, &records, blobs, p)?;
    for &node in &records.dfs {
        write_record(&mut out, tree, chunks, p, &inodes, &records, node);
    }
    Ok(out)
}

/// Slots (1-based) breadth first, so each directory's children get consecutive slots; a hard link's
/// inode number is the slot of its first name. Digests are computed children before parents.
fn number_inodes(tree: &Tree, chunks: &ChunkTable, p: &ImageParams) -> Result<Inodes> {
    let order = tree.bfs();
    let mut slot = vec![0u32; tree.nodes.len()];
    let mut parent = vec![ROOT; tree.nodes.len()];
    for (i, &(node, par)) in order.iter().enumerate() {
        slot[node] =
            u32::try_from(i + 1).map_err(|_| Error::Invalid("more than 2^32 entries".into()))?;
        parent[node] = par;
    }
    // A hard link's inode number is the slot of its first name.
    let mut file_ino = vec![0u32; tree.files.len()];
    let mut file_names = vec![0u32; tree.files.len()];
    let mut ino = vec![0u32; tree.nodes.len()];
    for &(node, _) in &order {
        ino[node] = slot[node];
        if let Kind::File(f) = tree.nodes[node].kind {
            if file_ino[f] == 0 {
                file_ino[f] = slot[node];
            }
            ino[node] = file_ino[f];
            file_names[f] += 1;
        }
    }
    let unique = order.iter().filter(|&&(n, _)| ino[n] == slot[n]).count() as u64;

    // Merkle-style inode digests, children before parents (reverse breadth-first order).
    let mut digests = vec![[0u8; 32]; tree.nodes.len()];
    for &(node, _) in order.iter().rev() {
        digests[node] = match &tree.nodes[node].kind {
            Kind::File(f) => {
                let mut all = Vec::with_capacity(tree.files[*f].chunks.len() * 32);
                for &c in &tree.files[*f].chunks {
                    all.extend_from_slice(&chunks.get(c).digest);
                }
                digest(p.digester, &all)
            }
            Kind::Symlink(target) => digest(p.digester, target),
            Kind::Special => digest(p.digester, b""),
            Kind::Dir(children) => {
                let all: Vec<u8> = children.iter().flat_map(|&c| digests[c]).collect();
                digest(p.digester, &all)
            }
        };
    }
    Ok(Inodes {
        order,
        slot,
        parent,
        ino,
        file_names,
        unique,
        digests,
    })
}

/// Lay out the inode table, prefetch table, blob table and extended blob table after the superblock.
fn tables(inodes: &Inodes, blobs: &[BlobInfo], p: &ImageParams) -> Tables {
    // Tables after the superblock, each padded to 8 bytes.
    let entries = inodes.order.len() as u64;
    let inode_table_off = SUPER_SIZE;
    let prefetch_off = inode_table_off + round_up(4 * entries, ALIGN);
    let prefetch: Vec<u32> = if blobs.is_empty() {
        Vec::new()
    } else {
        p.prefetch
            .iter()
            .map(|&n| inodes.ino[n])
            .filter(|&i| i != 0)
            .collect()
    };
    let blob_table_off = prefetch_off + round_up(4 * prefetch.len() as u64, ALIGN);
    let mut blob_table = Vec::new();
    for (i, blob) in blobs.iter().enumerate() {
        if i > 0 {
            blob_table.push(0);
        }
        blob_table.extend_from_slice(&blob.readahead.0.to_le_bytes());
        blob_table.extend_from_slice(&blob.readahead.1.to_le_bytes());
        blob_table.extend_from_slice(blob.id.as_bytes());
    }
    blob_table.resize(round_up(blob_table.len() as u64, ALIGN) as usize, 0);
    let ext_off = blob_table_off + blob_table.len() as u64;
    let records_off = ext_off + EXT_BLOB_ENTRY_SIZE * blobs.len() as u64;
    Tables {
        inode_table_off,
        prefetch_off,
        prefetch,
        blob_table_off,
        blob_table,
        ext_off,
        records_off,
    }
}

/// Record sizes and offsets from `records_off`, depth-first pre-order.
fn place_records(tree: &Tree, records_off: u64, count: usize) -> Records {
    let xattrs: Vec<Vec<u8>> = tree
        .nodes
        .iter()
        .map(|n| xattr_area(&n.meta.xattrs))
        .collect();
    let mut record_off = vec![0u64; tree.nodes.len()];
    let mut pos = records_off;
    let mut stack = vec![ROOT];
    let mut dfs = Vec::with_capacity(count);
    while let Some(node) = stack.pop() {
        dfs.push(node);
        record_off[node] = pos;
        pos += record_size(tree, node, &xattrs[node]);
        stack.extend(tree.children(node).iter().rev());
    }
    Records {
        xattrs,
        record_off,
        dfs,
        total: pos,
    }
}

/// The superblock, inode table, prefetch table, blob table and extended blob table.
fn write_tables(
    out: &mut [u8],
    t: &Tables,
    inodes: &Inodes,
    records: &Records,
    blobs: &[BlobInfo],
    p: &ImageParams,
) -> Result<()> {
    let has_xattr = records.xattrs.iter().any(|x| !x.is_empty());
    let sflags = p.compressor.flag()
        | p.digester.flag()
        | if p.explicit_uid_gid {
            flags::EXPLICIT_UID_GID
        } else {
            0
        }
        | if has_xattr { flags::HAS_XATTR } else { 0 };
    SuperBlock {
        magic: RAFS_V5_MAGIC,
        fs_version: RAFS_V5_VERSION,
        sb_size: SUPER_SIZE as u32,
        block_size: p.chunk_size,
        flags: sflags,
        inodes_count: inodes.unique,
        inode_table_offset: t.inode_table_off,
        prefetch_table_offset: t.prefetch_off,
        blob_table_offset: t.blob_table_off,
        inode_table_entries: inodes.order.len() as u32,
        prefetch_table_entries: t.prefetch.len() as u32,
        blob_table_size: t.blob_table.len() as u32,
        extended_blob_table_entries: blobs.len() as u32,
        extended_blob_table_offset: t.ext_off,
    }
    .write_to(out);
    for &(node, _) in &inodes.order {
        let off = records.record_off[node];
        if off >> 3 > u32::MAX as u64 {
            return Err(Error::Invalid("v5 bootstrap over 32 GiB".into()));
        }
        ((off >> 3) as u32).put(
            out,
            (t.inode_table_off + 4 * (inodes.slot[node] as u64 - 1)) as usize,
        );
    }
    for (i, &n) in t.prefetch.iter().enumerate() {
        n.put(out, t.prefetch_off as usize + 4 * i);
    }
    out[t.blob_table_off as usize..t.ext_off as usize].copy_from_slice(&t.blob_table);
    for (i, blob) in blobs.iter().enumerate() {
        ExtBlobEntry {
            chunk_count: blob.chunk_count,
            features: blob.features,
            uncompressed_size: blob.uncompressed_size,
            compressed_size: blob.compressed_size,
        }
        .write_to(&mut out[(t.ext_off + EXT_BLOB_ENTRY_SIZE * i as u64) as usize..]);
    }
    Ok(())
}

/// What a record says about its node's contents.
struct Shape<'t> {
    size: u64,
    /// A directory's first child slot; 0 otherwise.
    child_index: u32,
    /// A directory's children, or a file's chunks.
    child_count: u32,
    nlink: u32,
    iflags: u64,
    symlink: &'t [u8],
    file_chunks: &'t [u32],
}

fn record_shape<'t>(tree: &'t Tree, inodes: &Inodes, node: NodeId) -> Shape<'t> {
    let (mut size, mut child_index, mut child_count, mut nlink, mut iflags) =
        (0u64, 0u32, 0u32, 1u32, 0u64);
    let mut symlink: &[u8] = &[];
    let mut file_chunks: &[u32] = &[];
    match &tree.nodes[node].kind {
        Kind::Dir(children) => {
            let names: u64 = children
                .iter()
                .map(|&c| tree.nodes[c].name.len() as u64 + 8)
                .sum();
            size = round_up(names, 4096).max(4096);
            child_index = children.first().map(|&c| inodes.slot[c]).unwrap_or(0);
            child_count = children.len() as u32;
            nlink = 2 + children.iter().filter(|&&c| tree.is_dir(c)).count() as u32;
        }
        Kind::File(f) => {
            size = tree.files[*f].size;
            file_chunks = &tree.files[*f].chunks;
            child_count = file_chunks.len() as u32;
            nlink = inodes.file_names[*f];
        }
        Kind::Symlink(target) => {
            symlink = target;
            size = target.len() as u64;
            iflags |= I_SYMLINK;
        }
        Kind::Special => {}
    }
    Shape {
        size,
        child_index,
        child_count,
        nlink,
        iflags,
        symlink,
        file_chunks,
    }
}

/// The record of `node` with its name, symlink target, xattrs and chunk records.
fn write_record(
    out: &mut [u8],
    tree: &Tree,
    chunks: &ChunkTable,
    p: &ImageParams,
    inodes: &Inodes,
    records: &Records,
    node: NodeId,
) {
    let n = &tree.nodes[node];
    let xattrs = &records.xattrs[node];
    let at = records.record_off[node] as usize;
    let name: &[u8] = if node == ROOT { b"/" } else { &n.name };
    let Shape {
        size,
        child_index,
        child_count,
        nlink,
        mut iflags,
        symlink,
        file_chunks,
    } = record_shape(tree, inodes, node);
    if !xattrs.is_empty() {
        iflags |= I_XATTR;
    }
    let (uid, gid) = if p.explicit_uid_gid {
        (n.meta.uid, n.meta.gid)
    } else {
        (0, 0)
    };
    let rdev = match n.meta.file_type() {
        libc::S_IFCHR | libc::S_IFBLK => libc::makedev(n.meta.rdev_major, n.meta.rdev_minor) as u32,
        _ => 0,
    };
    Inode {
        digest: inodes.digests[node],
        parent: if node == ROOT {
            0
        } else {
            inodes.ino[inodes.parent[node]] as u64
        },
        ino: inodes.ino[node] as u64,
        uid,
        gid,
        projid: 0,
        mode: n.meta.mode,
        size,
        blocks: (size + xattrs.len() as u64).div_ceil(512),
        flags: iflags,
        nlink,
        child_index,
        child_count,
        name_size: name.len() as u16,
        symlink_size: symlink.len() as u16,
        rdev,
        mtime_nsec: n.meta.mtime_nsec,
        mtime: n.meta.mtime,
    }
    .write_to(&mut out[at..]);
    let mut pos = at + INODE_SIZE as usize;
    out[pos..pos + name.len()].copy_from_slice(name);
    pos += round_up(name.len() as u64, ALIGN) as usize;
    out[pos..pos + symlink.len()].copy_from_slice(symlink);
    pos += round_up(symlink.len() as u64, ALIGN) as usize;
    out[pos..pos + xattrs.len()].copy_from_slice(xattrs);
    pos += xattrs.len();
    for (k, &c) in file_chunks.iter().enumerate() {
        ChunkRecord {
            file_offset: k as u64 * p.chunk_size as u64,
            ..*chunks.get(c)
        }
        .write_to(&mut out[pos..]);
        pos += CHUNK_SIZE as usize;
    }
}

fn record_size(tree: &Tree, node: NodeId, xattrs: &[u8]) -> u64 {
    let n = &tree.nodes[node];
    let name_len = if node == ROOT { 1 } else { n.name.len() as u64 };
    let (symlink, chunks) = match &n.kind {
        Kind::Symlink(t) => (t.len() as u64, 0),
        Kind::File(f) => (0, tree.files[*f].chunks.len() as u64),
        _ => (0, 0),
    };
    INODE_SIZE
        + round_up(name_len, ALIGN)
        + round_up(symlink, ALIGN)
        + xattrs.len() as u64
        + CHUNK_SIZE * chunks
}

/// `u64 total`, then `u32 pair size, name, NUL, value` pairs; the area is padded to 8 bytes.
fn xattr_area(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    if xattrs.is_empty() {
        return Vec::new();
    }
    let mut pairs = Vec::new();
    for (name, value) in xattrs {
        pairs.extend_from_slice(&((name.len() + 1 + value.len()) as u32).to_le_bytes());
        pairs.extend_from_slice(name);
        pairs.push(0);
        pairs.extend_from_slice(value);
    }
    let mut area = (pairs.len() as u64).to_le_bytes().to_vec();
    area.extend_from_slice(&pairs);
    area.resize(round_up(area.len() as u64, ALIGN) as usize, 0);
    area
}
