//! The in-memory tree an image is built from: one node per name, regular-file contents shared between
//! hard links, and a scanner that fills it from a host directory.
//!
//! Nodes live in an arena (`Tree::nodes`) and directories list their children by index, so overlaying
//! layers and removing whiteouts only edits child lists; unreachable nodes are simply never written.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub type NodeId = usize;
pub type FileId = usize;

/// Attributes every entry has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Full st_mode: type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub mtime_nsec: u32,
    /// Device number of character and block devices.
    pub rdev_major: u32,
    pub rdev_minor: u32,
    /// Sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

#[derive(Debug, Clone)]
pub enum Kind {
    /// Children, sorted by name once the tree is complete.
    Dir(Vec<NodeId>),
    /// Index into `Tree::files`; hard links share one.
    File(FileId),
    Symlink(Vec<u8>),
    /// Character or block device, or fifo: everything is in `Meta`.
    Special,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: Vec<u8>,
    pub meta: Meta,
    pub kind: Kind,
}

/// The contents of one regular file (one inode, however many names it has).
#[derive(Debug, Clone, Default)]
pub struct FileData {
    pub size: u64,
    /// Where to read the data from, for directory sources (tar data is chunked while the tar is read).
    pub source: Option<PathBuf>,
    /// Indexes into the build's `ChunkTable`, one per `chunk_size` piece of the file.
    pub chunks: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct Tree {
    pub nodes: Vec<Node>,
    pub files: Vec<FileData>,
}

pub const ROOT: NodeId = 0;

impl Tree {
    pub fn new(root: Meta) -> Self {
        Tree {
            nodes: vec![Node {
                name: Vec::new(),
                meta: root,
                kind: Kind::Dir(Vec::new()),
            }],
            files: Vec::new(),
        }
    }

    pub fn children(&self, dir: NodeId) -> &[NodeId] {
        match &self.nodes[dir].kind {
            Kind::Dir(c) => c,
            _ => &[],
        }
    }

    pub fn children_mut(&mut self, dir: NodeId) -> &mut Vec<NodeId> {
        match &mut self.nodes[dir].kind {
            Kind::Dir(c) => c,
            _ => panic!("node {dir} is not a directory"),
        }
    }

    pub fn is_dir(&self, node: NodeId) -> bool {
        matches!(self.nodes[node].kind, Kind::Dir(_))
    }

    /// Add `node` under `dir` without checking for an existing entry of that name.
    pub fn push_child(&mut self, dir: NodeId, node: Node) -> NodeId {
        let id = self.nodes.len();
        self.nodes.push(node);
        self.children_mut(dir).push(id);
        id
    }

    pub fn add_file(&mut self, data: FileData) -> FileId {
        self.files.push(data);
        self.files.len() - 1
    }

    /// The child of `dir` called `name` (linear: only used on small or not yet sorted lists).
    pub fn child(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        self.children(dir)
            .iter()
            .copied()
            .find(|&c| self.nodes[c].name == name)
    }

    /// Sort every directory's children bytewise by name, as both formats require.
    pub fn sort(&mut self) {
        let names: Vec<Vec<u8>> = self.nodes.iter().map(|n| n.name.clone()).collect();
        for node in &mut self.nodes {
            if let Kind::Dir(children) = &mut node.kind {
                children.sort_by(|a, b| names[*a].cmp(&names[*b]));
            }
        }
    }

    /// Look up an absolute or relative path ("/a/b", "a/b") below the root.
    pub fn lookup_path(&self, path: &[u8]) -> Option<NodeId> {
        let mut node = ROOT;
        for part in path
            .split(|&b| b == b'/')
            .filter(|p| !p.is_empty() && *p != b".")
        {
            node = self.child(node, part)?;
        }
        Some(node)
    }

    /// Every node reachable from the root with its parent, directories before their contents, children
    /// in name order (breadth first: the order upstream writes chunk data in).
    pub fn bfs(&self) -> Vec<(NodeId, NodeId)> {
        let mut out = vec![(ROOT, ROOT)];
        let mut i = 0;
        while i < out.len() {
            let dir = out[i].0;
            out.extend(self.children(dir).iter().map(|&c| (c, dir)));
            i += 1;
        }
        out
    }
}

/// The only xattr namespaces RAFS can record (v5 and v6 alike): fail early, naming the file.
pub fn check_xattr(path: &Path, name: &[u8], value: &[u8]) -> Result<()> {
    let known = [&b"user."[..], b"trusted.", b"security."]
        .iter()
        .any(|p| name.starts_with(p) && name.len() > p.len())
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default";
    let shown = || String::from_utf8_lossy(name).into_owned();
    if !known {
        return Err(Error::Invalid(format!(
            "{}: xattr {:?} is outside the namespaces RAFS records (user., trusted., security., POSIX ACLs)",
            path.display(),
            shown()
        )));
    }
    if name.len() > 255 || value.len() > 65535 {
        return Err(Error::Invalid(format!(
            "{}: xattr {:?} has a name over 255 or a value over 65535 bytes",
            path.display(),
            shown()
        )));
    }
    Ok(())
}

/// A file name must be one component of at most 255 bytes.
pub fn check_name(path: &Path, name: &[u8]) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Error::Invalid(format!(
            "{}: {:?} is not a valid file name",
            path.display(),
            String::from_utf8_lossy(name)
        )));
    }
    if name.len() > 255 {
        return Err(Error::Invalid(format!(
            "{}: file name is {} bytes, over the 255-byte limit",
            path.display(),
            name.len()
        )));
    }
    Ok(())
}

fn cpath(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("{} contains NUL", path.display())))
}

/// The xattrs of `path` itself (not a symlink's target), sorted by name.
pub fn read_xattrs(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = cpath(path)?;
    let fail = |what: &str| {
        Error::io(
            format!("{what} {}", path.display()),
            std::io::Error::last_os_error(),
        )
    };
    let mut names = vec![0u8; 4096];
    loop {
        // SAFETY: valid NUL-terminated path and a buffer of the stated length.
        let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if n >= 0 {
            names.truncate(n as usize);
            break;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ERANGE) => names.resize(names.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(fail("list xattrs of")),
        }
    }
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn =
            CString::new(name).map_err(|_| Error::Invalid("xattr name contains NUL".into()))?;
        let mut value = vec![0u8; 256];
        loop {
            // SAFETY: valid path, name and buffer.
            let n = unsafe {
                libc::lgetxattr(
                    c.as_ptr(),
                    cn.as_ptr(),
                    value.as_mut_ptr().cast(),
                    value.len(),
                )
            };
            if n >= 0 {
                value.truncate(n as usize);
                break;
            }
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ERANGE) if value.len() < 1 << 20 => value.resize(value.len() * 16, 0),
                // Removed between listing and reading: the file changed under us; skip the attribute.
                Some(libc::ENODATA) => {
                    value.clear();
                    break;
                }
                _ => {
                    return Err(fail(&format!(
                        "read xattr {} of",
                        String::from_utf8_lossy(name)
                    )))
                }
            }
        }
        check_xattr(path, name, &value)?;
        out.push((name.to_vec(), value));
    }
    out.sort();
    Ok(out)
}

pub fn meta_of(md: &fs::Metadata, xattrs: Vec<(Vec<u8>, Vec<u8>)>) -> Meta {
    let rdev = md.rdev();
    let device = md.file_type().is_char_device() || md.file_type().is_block_device();
    Meta {
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime().max(0) as u64,
        mtime_nsec: md.mtime_nsec().clamp(0, 999_999_999) as u32,
        rdev_major: if device { libc::major(rdev) } else { 0 },
        rdev_minor: if device { libc::minor(rdev) } else { 0 },
        xattrs,
    }
}

/// What a directory scan saw besides the tree.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// Entries left out, with the reason (sockets cannot be stored in an image).
    pub skipped: Vec<String>,
}

/// Read a host directory into a tree. File contents are not read here, only recorded by path.
/// Sockets are skipped with a warning; anything unreadable is an error naming the path.
pub fn scan_dir(root: &Path) -> Result<(Tree, ScanReport)> {
    let md =
        fs::symlink_metadata(root).map_err(|e| Error::io(format!("stat {}", root.display()), e))?;
    if !md.is_dir() {
        return Err(Error::Invalid(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut tree = Tree::new(meta_of(&md, read_xattrs(root)?));
    let mut report = ScanReport::default();
    // (device, inode) of regular files with more than one link → their shared contents.
    let mut links: HashMap<(u64, u64), FileId> = HashMap::new();
    let mut stack: Vec<(NodeId, PathBuf)> = vec![(ROOT, root.to_path_buf())];
    while let Some((dir, path)) = stack.pop() {
        for name in sorted_names(&path)? {
            let child = path.join(&name);
            check_name(&child, name.as_bytes())?;
            let md = fs::symlink_metadata(&child)
                .map_err(|e| Error::io(format!("stat {}", child.display()), e))?;
            let ft = md.file_type();
            if ft.is_socket() {
                log::warn!(
                    "skipping socket {}: sockets cannot be stored in an image",
                    child.display()
                );
                report.skipped.push(format!("{}: socket", child.display()));
                continue;
            }
            let meta = meta_of(&md, read_xattrs(&child)?);
            let kind = if ft.is_dir() {
                Kind::Dir(Vec::new())
            } else if ft.is_file() {
                let key = (md.dev(), md.ino());
                match links.get(&key) {
                    Some(&f) => Kind::File(f),
                    None => {
                        let f = tree.add_file(FileData {
                            size: md.len(),
                            source: Some(child.clone()),
                            chunks: Vec::new(),
                        });
                        if md.nlink() > 1 {
                            links.insert(key, f);
                        }
                        Kind::File(f)
                    }
                }
            } else if ft.is_symlink() {
                Kind::Symlink(symlink_target(&child)?)
            } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
                Kind::Special
            } else {
                return Err(Error::Invalid(format!(
                    "{}: unknown file type {:#o}",
                    child.display(),
                    md.mode()
                )));
            };
            let is_dir = matches!(kind, Kind::Dir(_));
            let id = tree.push_child(
                dir,
                Node {
                    name: name.as_bytes().to_vec(),
                    meta,
                    kind,
                },
            );
            if is_dir {
                stack.push((id, child));
            }
        }
    }
    Ok((tree, report))
}

/// The names in directory `path`, sorted by their bytes.
fn sorted_names(path: &Path) -> Result<Vec<std::ffi::OsString>> {
    let listing = fs::read_dir(path)
        .map_err(|e| Error::io(format!("read directory {}", path.display()), e))?;
    let mut names = Vec::new();
    for entry in listing {
        let entry =
            entry.map_err(|e| Error::io(format!("read directory {}", path.display()), e))?;
        names.push(entry.file_name());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// The target of symlink `child`: 1 to 4095 bytes.
fn symlink_target(child: &Path) -> Result<Vec<u8>> {
    let target =
        fs::read_link(child).map_err(|e| Error::io(format!("read link {}", child.display()), e))?;
    let target = target.as_os_str().as_bytes().to_vec();
    if target.is_empty() || target.len() > 4095 {
        return Err(Error::Invalid(format!(
            "{}: symlink target of {} bytes",
            child.display(),
            target.len()
        )));
    }
    Ok(target)
}
