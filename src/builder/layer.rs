//! Load an existing bootstrap (a parent layer, or a `merge` source) back into a tree. Only metadata is
//! read: file contents stay where they are, as chunk references into the image's blobs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::chunker::ChunkTable;
use super::tree::{FileData, FileId, Kind, Meta, Node, NodeId, Tree, ROOT};
use crate::error::{Error, Result};
use crate::format::{BlobInfo, ChunkAddr, Compressor, Digester, InodeAttr};
use crate::image::{ImageOptions, RafsImage, WalkEvent};
use crate::storage::localfs::LocalFs;

/// A loaded layer: its tree plus the whole-image settings a layer built on it must share.
pub struct Layer {
    pub tree: Tree,
    pub version: u32,
    pub chunk_size: u32,
    pub compressor: Compressor,
    pub digester: Digester,
    pub explicit_uid_gid: bool,
}

/// Load the bootstrap at `path` (or a blob with inlined metadata). Its blobs are appended to `blobs`
/// unless an entry with the same id is already there, and its chunks are added to `table` with blob
/// indexes renumbered accordingly.
pub fn load(path: &Path, table: &mut ChunkTable, blobs: &mut Vec<BlobInfo>) -> Result<Layer> {
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    // Metadata only: the backend is never asked for blob data.
    let image = RafsImage::open(
        path,
        Arc::new(LocalFs::with_dir(dir)),
        ImageOptions::default(),
    )?;
    let info = image.info();
    let blob_map = add_blobs(&info.blobs, blobs);
    let chunk_size = info.chunk_size as u64;
    let shown = path.display().to_string();

    let mut tree = Tree::new(Meta::default());
    // The directories from the root down to the walk's current one (the walk is depth first and
    // reports each directory's end): a map of full paths cost memory quadratic in the depth.
    let mut dirs: Vec<NodeId> = vec![ROOT];
    // Inode number → contents, so hard links stay one inode.
    let mut links: HashMap<u64, FileId> = HashMap::new();
    image.walk(&mut |rel, attr, event| {
        if event == WalkEvent::DirDone {
            dirs.pop();
            return Ok(());
        }
        let node_meta = node_meta(&image, attr)?;
        if rel.as_os_str().is_empty() {
            tree.nodes[ROOT].meta = node_meta;
            return Ok(());
        }
        let parent = dirs.last().copied().ok_or_else(|| {
            Error::Corrupt(format!(
                "{shown}: {} reached before its directory",
                rel.display()
            ))
        })?;
        let kind = match attr.file_type() {
            libc::S_IFDIR => Kind::Dir(Vec::new()),
            libc::S_IFLNK => Kind::Symlink(image.readlink(attr.ino)?),
            libc::S_IFREG => match links.get(&attr.ino) {
                Some(&f) => Kind::File(f),
                None => {
                    let chunks =
                        file_chunks(&image, attr, &blob_map, table, chunk_size, &shown, rel)?;
                    let f = tree.add_file(FileData {
                        size: attr.size,
                        source: None,
                        chunks,
                    });
                    if attr.nlink > 1 {
                        links.insert(attr.ino, f);
                    }
                    Kind::File(f)
                }
            },
            _ => Kind::Special,
        };
        let is_dir = matches!(kind, Kind::Dir(_));
        let name =
            std::os::unix::ffi::OsStrExt::as_bytes(rel.file_name().unwrap_or_default()).to_vec();
        let id = tree.push_child(
            parent,
            Node {
                name,
                meta: node_meta,
                kind,
            },
        );
        if is_dir {
            dirs.push(id);
        }
        Ok(())
    })?;
    Ok(Layer {
        tree,
        version: info.version,
        chunk_size: info.chunk_size,
        compressor: info.compressor,
        digester: info.digester,
        explicit_uid_gid: info.explicit_uid_gid(),
    })
}

/// Append the blobs of a loaded image to `blobs`, except those already there (by id); returns the
/// index in `blobs` of each of the image's blobs.
fn add_blobs(image_blobs: &[BlobInfo], blobs: &mut Vec<BlobInfo>) -> Vec<u32> {
    let mut blob_map = Vec::with_capacity(image_blobs.len());
    for blob in image_blobs {
        let index = match blobs.iter().position(|b| b.id == blob.id) {
            Some(i) => i,
            None => {
                blobs.push(BlobInfo {
                    index: blobs.len() as u32,
                    ..blob.clone()
                });
                blobs.len() - 1
            }
        };
        blob_map.push(index as u32);
    }
    blob_map
}

/// An entry's attributes as the builder keeps them (xattrs sorted, device numbers split).
fn node_meta(image: &RafsImage, attr: &InodeAttr) -> Result<Meta> {
    let mut xattrs = image.xattrs(attr.ino)?;
    xattrs.sort();
    let device = matches!(attr.file_type(), libc::S_IFCHR | libc::S_IFBLK);
    let rdev = attr.rdev as libc::dev_t;
    Ok(Meta {
        mode: attr.mode,
        uid: attr.uid,
        gid: attr.gid,
        mtime: attr.mtime,
        mtime_nsec: attr.mtime_nsec,
        rdev_major: if device { libc::major(rdev) } else { 0 },
        rdev_minor: if device { libc::minor(rdev) } else { 0 },
        xattrs,
    })
}

/// A file's chunks as table indexes: v5 records are complete; v6 indexes are completed from the
/// bootstrap's chunk table (digest, offsets, CRC), which every builder writes.
fn file_chunks(
    image: &RafsImage,
    attr: &InodeAttr,
    blob_map: &[u32],
    table: &mut ChunkTable,
    chunk_size: u64,
    shown: &str,
    rel: &Path,
) -> Result<Vec<u32>> {
    let what = || format!("{shown}: {}", rel.display());
    let mut out = Vec::new();
    for (k, (file_offset, addr)) in image
        .meta()
        .file_chunks(attr, 0, attr.size)?
        .into_iter()
        .enumerate()
    {
        if file_offset != k as u64 * chunk_size {
            return Err(Error::Unsupported(format!("{}: file with holes", what())));
        }
        let info = match addr {
            ChunkAddr::Full(info) => info,
            ChunkAddr::Indexed {
                blob_index,
                ci_index,
                blk_addr,
            } => {
                let info = image
                    .meta()
                    .chunk_table_entry(blob_index, ci_index)?
                    .ok_or_else(|| {
                        Error::Corrupt(format!(
                            "{}: chunk {ci_index} of blob {blob_index} is not in the chunk table",
                            what()
                        ))
                    })?;
                if info.uncompressed_offset != blk_addr as u64 * 4096 {
                    return Err(Error::Corrupt(format!(
                        "{}: chunk table and chunk index disagree on chunk {ci_index}",
                        what()
                    )));
                }
                info
            }
        };
        if info.batch.is_some() {
            return Err(Error::Unsupported(format!(
                "{}: batch chunks cannot be reused by the builder",
                what()
            )));
        }
        let mut chunk = info
            .to_record()
            .ok_or_else(|| Error::Corrupt(format!("{}: chunk without a digest", what())))?;
        chunk.blob_index = *blob_map.get(info.blob_index as usize).ok_or_else(|| {
            Error::Corrupt(format!("{}: chunk names blob {}", what(), info.blob_index))
        })?;
        out.push(table.add(chunk));
    }
    if out.len() as u64 != attr.size.div_ceil(chunk_size) {
        return Err(Error::Unsupported(format!(
            "{}: {} chunks for {} bytes (holes)",
            what(),
            out.len(),
            attr.size
        )));
    }
    Ok(out)
}
