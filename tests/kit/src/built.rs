//! Small images made by `rafsd build` for tests that need content of their own (a known byte pattern,
//! a chunk count, a second layer), with helpers to forge their bootstraps (through `kit::layout`).

use std::path::{Path, PathBuf};

use crate::layout::{le, v5, v6};

/// An image built by `rafsd build`; `blob_id` is the blob this layer added.
pub struct Built {
    pub bootstrap: PathBuf,
    pub blob_dir: PathBuf,
    pub blob_id: String,
    /// The files of the source tree, relative paths and contents.
    pub files: Vec<(String, Vec<u8>)>,
}

impl Built {
    /// The content of the tree's first file.
    pub fn content(&self) -> &[u8] {
        &self.files[0].1
    }
}

/// Build `<dir>/<name>/{bootstrap,blobs}` from a tree holding `files` (relative paths), with extra
/// `rafsd build` arguments; a layer on `parent` shares its blob directory.
pub fn build_tree(
    dir: &Path,
    name: &str,
    files: Vec<(String, Vec<u8>)>,
    parent: Option<&Built>,
    args: &[&str],
) -> Built {
    let root = dir.join(name);
    let src = root.join("src");
    for (path, content) in &files {
        let p = src.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    let bootstrap = root.join("bootstrap");
    let blob_dir = parent.map_or_else(|| root.join("blobs"), |p| p.blob_dir.clone());
    let before = blob_ids(&blob_dir);
    let mut cmd = crate::daemon::rafsd();
    cmd.arg("build")
        .arg(&src)
        .arg("--bootstrap")
        .arg(&bootstrap)
        .arg("--blob-dir")
        .arg(&blob_dir)
        .args(args);
    if let Some(p) = parent {
        cmd.arg("--parent-bootstrap").arg(&p.bootstrap);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "rafsd build {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let added: Vec<String> = blob_ids(&blob_dir)
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    assert_eq!(added.len(), 1, "{name}: one new blob, got {added:?}");
    Built {
        bootstrap,
        blob_dir,
        blob_id: added[0].clone(),
        files,
    }
}

/// An image of one file `f` holding `content`.
pub fn build_one(dir: &Path, name: &str, content: Vec<u8>, args: &[&str]) -> Built {
    build_tree(dir, name, vec![("f".into(), content)], None, args)
}

fn blob_ids(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

/// Make `hostile` name `victim_id` instead of its own blob: the bootstrap's blob table (and v6 device
/// slot) say `victim_id`, and its blob is stored under that name in its own blob directory.
pub fn steal_blob_id(hostile: &mut Built, victim_id: &str) {
    let mut boot = std::fs::read(&hostile.bootstrap).unwrap();
    if le::u32_at(&boot, v5::S_MAGIC) == 0x5241_4653 {
        let (at, id) = v5::first_blob_id(&boot);
        assert_eq!(id.len(), victim_id.len());
        boot[at..at + id.len()].copy_from_slice(victim_id.as_bytes());
    } else {
        v6::set_blob_id(&mut boot, 0, victim_id);
    }
    std::fs::write(&hostile.bootstrap, boot).unwrap();
    std::fs::rename(
        hostile.blob_dir.join(&hostile.blob_id),
        hostile.blob_dir.join(victim_id),
    )
    .unwrap();
    hostile.blob_id = victim_id.to_string();
}

/// Deterministic incompressible bytes (splitmix64): every 4 KiB chunk is distinct, so none is deduplicated.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Where a mismatch starts, for a readable failure instead of two dumps of megabytes.
#[track_caller]
pub fn assert_content(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let at = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: {} bytes read, {} expected; first difference at byte {at}: got {:?}, want {:?}",
            got.len(),
            want.len(),
            got.get(at),
            want.get(at)
        );
    }
}
