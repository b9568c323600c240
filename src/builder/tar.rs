//! Read a tar stream (an OCI layer, plain or gzip-compressed) into a tree. A tar can only be read once
//! and in order, so file contents are chunked while the entries go by.
//!
//! Later entries replace earlier ones of the same path (a directory over a directory only updates its
//! attributes); parents missing from the tar are created as 0755 root-owned directories. Whiteouts are
//! kept as plain entries here: they only mean something when the layer is put on a parent.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use super::chunker::Chunker;
use super::tar_stream::{TarEntry, TarStream};
use super::tree::{
    check_name, check_xattr, FileData, FileId, Kind, Meta, Node, NodeId, Tree, ROOT,
};
use crate::error::{Error, Result};

struct Builder {
    tree: Tree,
    /// (directory, name) → (child, its place in the directory's list), so replacing and linking
    /// entries is not a linear search.
    index: HashMap<(NodeId, Vec<u8>), (NodeId, usize)>,
}

fn dir_meta() -> Meta {
    Meta {
        mode: libc::S_IFDIR | 0o755,
        ..Default::default()
    }
}

impl Builder {
    /// The directory at `parts`, creating missing ones.
    fn ensure_dir(&mut self, parts: &[Vec<u8>], path: &str) -> Result<NodeId> {
        let mut dir = ROOT;
        for part in parts {
            dir = match self.index.get(&(dir, part.clone())) {
                Some(&(c, _)) if self.tree.is_dir(c) => c,
                Some(_) => {
                    return Err(Error::Invalid(format!(
                        "tar entry {path}: a parent is not a directory"
                    )))
                }
                None => self.insert(
                    dir,
                    Node {
                        name: part.clone(),
                        meta: dir_meta(),
                        kind: Kind::Dir(Vec::new()),
                    },
                ),
            };
        }
        Ok(dir)
    }

    /// Add `node` to `dir`, replacing an entry of the same name (a directory over a directory keeps
    /// its contents and takes the new attributes).
    fn insert(&mut self, dir: NodeId, node: Node) -> NodeId {
        let key = (dir, node.name.clone());
        if let Some(&(old, place)) = self.index.get(&key) {
            if self.tree.is_dir(old) && matches!(node.kind, Kind::Dir(_)) {
                self.tree.nodes[old].meta = node.meta;
                return old;
            }
            // In the old one's place (the list is sorted by name later): removing it from the list
            // made N replacements in a directory of M entries cost N*M.
            let id = self.tree.nodes.len();
            self.tree.nodes.push(node);
            self.tree.children_mut(dir)[place] = id;
            self.index.insert(key, (id, place));
            return id;
        }
        let place = self.tree.children(dir).len();
        let id = self.tree.push_child(dir, node);
        self.index.insert(key, (id, place));
        id
    }

    fn lookup(&self, parts: &[Vec<u8>]) -> Option<NodeId> {
        let mut node = ROOT;
        for part in parts {
            node = self.index.get(&(node, part.clone()))?.0;
        }
        Some(node)
    }
}

/// The longest entry path taken, PATH_MAX: every level of a path costs the tree, the merge and the
/// bootstrap walk a copy of the path to it, so depth is what must stay bounded.
const PATH_LIMIT: usize = 4096;

/// Path components of a tar name: "./a//b/" → [a, b]. ".." is refused (it would escape the root).
fn components(raw: &[u8], shown: &str) -> Result<Vec<Vec<u8>>> {
    let mut parts = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                return Err(Error::Invalid(format!(
                    "tar entry {shown}: path contains \"..\""
                )))
            }
            p => {
                check_name(Path::new(shown), p)?;
                parts.push(p.to_vec());
            }
        }
    }
    Ok(parts)
}

/// Read the whole archive, chunking file contents with `chunker`. `source` names the tar in errors.
pub fn scan(reader: impl Read, chunker: &mut Chunker, source: &Path) -> Result<Tree> {
    let mut stream = TarStream::new(reader);
    let broken =
        |e: std::io::Error| Error::Invalid(format!("{}: broken tar: {e}", source.display()));
    let mut b = Builder {
        tree: Tree::new(dir_meta()),
        index: HashMap::new(),
    };
    while let Some(entry) = stream.next_entry().map_err(broken)? {
        let header = &entry.header;
        let etype = header.entry_type();
        if etype.is_pax_global_extensions() {
            continue;
        }
        if entry.path.len() > PATH_LIMIT {
            return Err(Error::Invalid(format!(
                "{}: tar entry {}...: a path of {} bytes is over the {PATH_LIMIT}-byte limit",
                source.display(),
                String::from_utf8_lossy(&entry.path[..200]),
                entry.path.len()
            )));
        }
        let shown = String::from_utf8_lossy(&entry.path).into_owned();
        let parts = components(&entry.path, &shown)?;
        let mut meta = entry_meta(&entry, &shown, source)?;
        let kind_bits = type_bits(etype, &shown, source)?;
        meta.mode |= kind_bits;

        let Some((name, parents)) = parts.split_last() else {
            // The archive root ("./"): its attributes become the image root's.
            if kind_bits != libc::S_IFDIR {
                return Err(Error::Invalid(format!(
                    "{}: tar entry {shown} names the root but is not a directory",
                    source.display()
                )));
            }
            b.tree.nodes[ROOT].meta = meta;
            continue;
        };
        let dir = b.ensure_dir(parents, &shown)?;
        let name = name.clone();
        let node = match etype {
            tar::EntryType::Link => b.hard_link(&entry, name, &shown, source)?,
            tar::EntryType::Directory => Node {
                name,
                meta,
                kind: Kind::Dir(Vec::new()),
            },
            tar::EntryType::Symlink => Node {
                name,
                meta,
                kind: Kind::Symlink(symlink_target(&entry, &shown, source)?),
            },
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                if kind_bits != libc::S_IFIFO {
                    (meta.rdev_major, meta.rdev_minor) = device_numbers(header, &shown, source)?;
                }
                Node {
                    name,
                    meta,
                    kind: Kind::Special,
                }
            }
            _ => Node {
                name,
                meta,
                kind: Kind::File(b.add_file(&mut stream, entry.size, chunker, &shown, source)?),
            },
        };
        b.insert(dir, node);
    }
    Ok(b.tree)
}

/// An error reading field `what` of tar entry `shown`.
fn entry_error(source: &Path, shown: &str, what: &str, e: std::io::Error) -> Error {
    Error::Invalid(format!(
        "{}: tar entry {shown}: {what}: {e}",
        source.display()
    ))
}

/// An entry's attributes: mode bits, owner and mtime from its header, xattrs and a precise mtime from its
/// pax extensions. The file type bits are the caller's.
fn entry_meta(entry: &TarEntry, shown: &str, source: &Path) -> Result<Meta> {
    let header = &entry.header;
    let bad = |what: &str, e: std::io::Error| entry_error(source, shown, what, e);
    // Some writers leave numeric fields blank: that reads as 0; anything else unparsable is an error.
    let old = header.as_old();
    let number = |value: std::io::Result<u64>, raw: &[u8], what: &str| match value {
        Ok(v) => Ok(v),
        Err(_) if raw.iter().all(|&c| c == 0 || c == b' ') => Ok(0),
        Err(e) => Err(bad(what, e)),
    };
    let mut meta = Meta {
        mode: number(header.mode().map(u64::from), &old.mode, "mode")? as u32 & 0o7777,
        uid: number(header.uid(), &old.uid, "uid")? as u32,
        gid: number(header.gid(), &old.gid, "gid")? as u32,
        mtime: number(header.mtime(), &old.mtime, "mtime")?,
        ..Default::default()
    };
    if let Some(exts) = entry.pax_extensions() {
        for ext in exts {
            let ext = ext.map_err(|e| bad("pax header", e))?;
            let key = ext.key_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                check_xattr(Path::new(shown), name, ext.value_bytes())?;
                meta.xattrs
                    .push((name.to_vec(), ext.value_bytes().to_vec()));
            } else if key == b"mtime" {
                // "seconds[.fraction]": keep the nanoseconds the ustar field cannot hold.
                let text = String::from_utf8_lossy(ext.value_bytes()).into_owned();
                let (secs, frac) = text.split_once('.').unwrap_or((&text, ""));
                if let Ok(s) = secs.parse::<u64>() {
                    meta.mtime = s;
                    let digits: String = frac.chars().take(9).collect();
                    meta.mtime_nsec = format!("{digits:0<9}").parse().unwrap_or(0);
                }
            }
        }
    }
    meta.xattrs.sort();
    Ok(meta)
}

/// The file type bits of an entry type (0 for a hard link, which takes its target's); other entry
/// types are refused. GNU sparse entries among them: their map may claim up to 2^63 bytes of holes,
/// each one read, hashed and compressed, and Docker and BuildKit never write them.
fn type_bits(etype: tar::EntryType, shown: &str, source: &Path) -> Result<u32> {
    Ok(match etype {
        tar::EntryType::Regular | tar::EntryType::Continuous => libc::S_IFREG,
        tar::EntryType::Directory => libc::S_IFDIR,
        tar::EntryType::Symlink => libc::S_IFLNK,
        tar::EntryType::Char => libc::S_IFCHR,
        tar::EntryType::Block => libc::S_IFBLK,
        tar::EntryType::Fifo => libc::S_IFIFO,
        tar::EntryType::Link => 0,
        other => {
            return Err(Error::Invalid(format!(
                "{}: tar entry {shown}: unsupported entry type {:?}",
                source.display(),
                other.as_byte() as char
            )))
        }
    })
}

/// A device entry's major and minor numbers (0 when the header leaves them out).
fn device_numbers(header: &tar::Header, shown: &str, source: &Path) -> Result<(u32, u32)> {
    let bad = |what: &str, e: std::io::Error| entry_error(source, shown, what, e);
    let major = header
        .device_major()
        .map_err(|e| bad("device major", e))?
        .unwrap_or(0);
    let minor = header
        .device_minor()
        .map_err(|e| bad("device minor", e))?
        .unwrap_or(0);
    Ok((major, minor))
}

/// A symlink entry's target: 1 to 4095 bytes.
fn symlink_target(entry: &TarEntry, shown: &str, source: &Path) -> Result<Vec<u8>> {
    let target = entry.link_name.clone().unwrap_or_default();
    if target.is_empty() || target.len() > 4095 {
        return Err(Error::Invalid(format!(
            "{}: symlink {shown} has a target of {} bytes",
            source.display(),
            target.len()
        )));
    }
    Ok(target)
}

impl Builder {
    /// A regular file's contents, chunked as they go by.
    fn add_file(
        &mut self,
        data: &mut dyn Read,
        size: u64,
        chunker: &mut Chunker,
        shown: &str,
        source: &Path,
    ) -> Result<FileId> {
        let file = self.tree.add_file(FileData {
            size,
            source: None,
            chunks: Vec::new(),
        });
        chunker.add_file(
            file,
            data,
            size,
            &format!("{}: tar entry {shown}", source.display()),
        )?;
        Ok(file)
    }

    /// A hard link named `name` to an earlier entry (not a directory).
    fn hard_link(
        &self,
        entry: &TarEntry,
        name: Vec<u8>,
        shown: &str,
        source: &Path,
    ) -> Result<Node> {
        let target_raw = entry.link_name.clone().unwrap_or_default();
        let target_shown = String::from_utf8_lossy(&target_raw).into_owned();
        let target = self
            .lookup(&components(&target_raw, &target_shown)?)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: hard link {shown} to {target_shown}, which is not earlier in the tar",
                    source.display()
                ))
            })?;
        let t = &self.tree.nodes[target];
        if matches!(t.kind, Kind::Dir(_)) {
            return Err(Error::Invalid(format!(
                "{}: hard link {shown} to directory {target_shown}",
                source.display()
            )));
        }
        // A regular file shares the target's contents (one inode); other types get a copy.
        Ok(Node {
            name,
            meta: t.meta.clone(),
            kind: t.kind.clone(),
        })
    }
}
