//! Put one layer's tree on top of another the way overlayfs shows a stack: upper entries replace lower
//! ones, directories present in both are merged, and whiteouts remove lower entries.
//!
//! Whiteout conventions (`--whiteout-spec`):
//! - `oci`: `.wh.NAME` removes NAME; `.wh..wh..opq` makes its directory opaque (hides all lower entries).
//! - `overlayfs`: a character device 0:0 removes its name; a directory with `trusted.overlay.opaque=y`
//!   is opaque. overlayfs hides its private `trusted.overlay.*` xattrs, so they are dropped too.
//! - `none`: nothing is special; every entry is taken as it is.
//!
//! Whiteouts never appear in the result.

use std::collections::HashMap;

use super::tree::{FileId, Kind, Meta, Node, NodeId, Tree, ROOT};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhiteoutSpec {
    Oci,
    Overlayfs,
    None,
}

impl std::str::FromStr for WhiteoutSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "oci" => Ok(WhiteoutSpec::Oci),
            "overlayfs" => Ok(WhiteoutSpec::Overlayfs),
            "none" => Ok(WhiteoutSpec::None),
            _ => Err(format!(
                "unknown whiteout spec {s:?} (oci, overlayfs or none)"
            )),
        }
    }
}

const OCI_PREFIX: &[u8] = b".wh.";
const OCI_OPAQUE: &[u8] = b".wh..wh..opq";
/// `.wh..wh.*` names are the whiteout format's own metadata (opaque marker, aufs link dirs).
const OCI_META_PREFIX: &[u8] = b".wh..wh.";
const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
const OVERLAY_OPAQUE: &[u8] = b"trusted.overlay.opaque";

/// What an upper entry means besides being itself.
enum Role<'a> {
    Entry,
    /// Removes the lower entry of this name.
    Whiteout(&'a [u8]),
    /// Whiteout-format metadata: dropped.
    Marker,
}

fn role<'a>(tree: &'a Tree, node: NodeId, spec: WhiteoutSpec) -> Role<'a> {
    let n = &tree.nodes[node];
    match spec {
        WhiteoutSpec::Oci if n.name.starts_with(OCI_META_PREFIX) => Role::Marker,
        WhiteoutSpec::Oci if n.name.starts_with(OCI_PREFIX) => {
            Role::Whiteout(&n.name[OCI_PREFIX.len()..])
        }
        WhiteoutSpec::Overlayfs
            if matches!(n.kind, Kind::Special)
                && n.meta.file_type() == libc::S_IFCHR
                && n.meta.rdev_major == 0
                && n.meta.rdev_minor == 0 =>
        {
            Role::Whiteout(&n.name)
        }
        _ => Role::Entry,
    }
}

fn is_opaque(tree: &Tree, dir: NodeId, spec: WhiteoutSpec) -> bool {
    match spec {
        WhiteoutSpec::Oci => tree
            .children(dir)
            .iter()
            .any(|&c| tree.nodes[c].name == OCI_OPAQUE),
        WhiteoutSpec::Overlayfs => tree.nodes[dir]
            .meta
            .xattrs
            .iter()
            .any(|(k, v)| k == OVERLAY_OPAQUE && v == b"y"),
        WhiteoutSpec::None => false,
    }
}

/// Attributes as they appear in the merged view.
fn visible(meta: &Meta, spec: WhiteoutSpec) -> Meta {
    let mut meta = meta.clone();
    if spec == WhiteoutSpec::Overlayfs {
        meta.xattrs
            .retain(|(k, _)| !k.starts_with(OVERLAY_XATTR_PREFIX));
    }
    meta
}

/// Apply `upper` onto `lower` in place. Both trees' files must index the same chunk table.
pub fn apply(lower: &mut Tree, upper: &Tree, spec: WhiteoutSpec) {
    let mut files: HashMap<FileId, FileId> = HashMap::new();
    lower.nodes[ROOT].meta = visible(&upper.nodes[ROOT].meta, spec);
    let mut stack = vec![(ROOT, ROOT)];
    while let Some((ldir, udir)) = stack.pop() {
        let mut by_name: HashMap<Vec<u8>, NodeId> = if is_opaque(upper, udir, spec) {
            HashMap::new()
        } else {
            lower
                .children(ldir)
                .iter()
                .map(|&c| (lower.nodes[c].name.clone(), c))
                .collect()
        };
        for &c in upper.children(udir) {
            if let Role::Whiteout(target) = role(upper, c, spec) {
                by_name.remove(target);
            }
        }
        for &c in upper.children(udir) {
            if !matches!(role(upper, c, spec), Role::Entry) {
                continue;
            }
            let name = &upper.nodes[c].name;
            match by_name.get(name) {
                Some(&l) if lower.is_dir(l) && upper.is_dir(c) => {
                    lower.nodes[l].meta = visible(&upper.nodes[c].meta, spec);
                    stack.push((l, c));
                }
                _ => {
                    let new = import(lower, upper, c, spec, &mut files);
                    by_name.insert(name.clone(), new);
                }
            }
        }
        let mut children: Vec<NodeId> = by_name.into_values().collect();
        children.sort_by(|a, b| lower.nodes[*a].name.cmp(&lower.nodes[*b].name));
        *lower.children_mut(ldir) = children;
    }
}

/// Copy an upper subtree that has nothing below it: whiteouts in it have nothing to remove.
fn import(
    lower: &mut Tree,
    upper: &Tree,
    node: NodeId,
    spec: WhiteoutSpec,
    files: &mut HashMap<FileId, FileId>,
) -> NodeId {
    let root = copy_node(lower, upper, node, spec, files);
    let mut stack = vec![(root, node)];
    while let Some((ldir, udir)) = stack.pop() {
        for &c in upper.children(udir) {
            if !matches!(role(upper, c, spec), Role::Entry) {
                continue;
            }
            let new = copy_node(lower, upper, c, spec, files);
            lower.children_mut(ldir).push(new);
            if upper.is_dir(c) {
                stack.push((new, c));
            }
        }
    }
    root
}

fn copy_node(
    lower: &mut Tree,
    upper: &Tree,
    node: NodeId,
    spec: WhiteoutSpec,
    files: &mut HashMap<FileId, FileId>,
) -> NodeId {
    let n = &upper.nodes[node];
    let kind = match &n.kind {
        Kind::Dir(_) => Kind::Dir(Vec::new()),
        Kind::File(f) => Kind::File(
            *files
                .entry(*f)
                .or_insert_with(|| lower.add_file(upper.files[*f].clone())),
        ),
        other => other.clone(),
    };
    lower.nodes.push(Node {
        name: n.name.clone(),
        meta: visible(&n.meta, spec),
        kind,
    });
    lower.nodes.len() - 1
}

/// Drop nothing, but check whether a standalone layer carries whiteouts (worth a note to the user).
pub fn has_whiteouts(tree: &Tree, spec: WhiteoutSpec) -> bool {
    tree.bfs().iter().any(|&(n, _)| {
        !matches!(role(tree, n, spec), Role::Entry) || (tree.is_dir(n) && is_opaque(tree, n, spec))
    })
}
