//! The local conversion cache: one entry per converted source layer, keyed by the chain of source
//! layer digests up to it (a layer's chunks are deduplicated against the layers below, so the same
//! layer on another base converts differently) and the build options. An entry holds the layer's
//! standalone bootstrap and the digest and size of the data blob it produced; a layer whose entry is
//! there and whose blob the target repository already has is neither pulled, built nor pushed again.
//!
//! Entries are written through a temporary directory and renamed, so a crash leaves none half-written;
//! an entry that does not parse is ignored (and rebuilt).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::builder::BuildOptions;
use crate::error::{Error, Result};

/// Bumped when the builder's output for the same input changes.
const FORMAT: &str = "rafsd-convert-layer-cache-v1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobRecord {
    pub digest: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// The source layer this entry converts.
    pub source_digest: String,
    /// The data blob the layer produced (none when all its data was already below it, or it has none).
    pub blob: Option<BlobRecord>,
}

pub struct LayerCache {
    dir: PathBuf,
}

/// The key of layer `chain.last()` on the layers before it, built with `opts`.
pub fn layer_key(chain: &[String], opts: &BuildOptions) -> String {
    let mut h = Sha256::new();
    h.update(FORMAT.as_bytes());
    h.update(
        format!(
            "\nv{} chunk {:#x} {} {}\n",
            opts.fs_version,
            opts.chunk_size,
            opts.compressor.name(),
            opts.digester.name()
        )
        .as_bytes(),
    );
    for d in chain {
        h.update(d.as_bytes());
        h.update(b"\n");
    }
    crate::storage::digest::hex(&h.finalize())
}

impl LayerCache {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create cache dir {}", dir.display()), e))?;
        Ok(LayerCache {
            dir: dir.to_path_buf(),
        })
    }

    /// The entry for `key`: its record and the path of its bootstrap.
    pub fn get(&self, key: &str) -> Option<(Record, PathBuf)> {
        let entry = self.dir.join(key);
        let bootstrap = entry.join("bootstrap");
        let record: Record =
            serde_json::from_slice(&std::fs::read(entry.join("record.json")).ok()?)
                .map_err(|e| log::warn!("cache entry {}: {e}; ignored", entry.display()))
                .ok()?;
        if let Some(b) = &record.blob {
            crate::storage::distribution::check_digest(&b.digest).ok()?;
        }
        bootstrap.is_file().then_some((record, bootstrap))
    }

    /// Store an entry (replacing an old one).
    pub fn put(&self, key: &str, record: &Record, bootstrap: &Path) -> Result<()> {
        let io = |what: &str, p: &Path, e| Error::io(format!("{what} {}", p.display()), e);
        let tmp = self.dir.join(format!(".{key}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| io("create", &tmp, e))?;
        std::fs::copy(bootstrap, tmp.join("bootstrap")).map_err(|e| io("copy", bootstrap, e))?;
        let json = serde_json::to_vec_pretty(record).unwrap_or_default();
        std::fs::write(tmp.join("record.json"), json).map_err(|e| io("write", &tmp, e))?;
        let entry = self.dir.join(key);
        let _ = std::fs::remove_dir_all(&entry);
        std::fs::rename(&tmp, &entry).map_err(|e| io("rename", &tmp, e))
    }
}

/// `$XDG_CACHE_HOME/rafsd`, else `~/.cache/rafsd`, else `/var/cache/rafsd`.
pub fn default_root() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("XDG_CACHE_HOME")
        .map(|d| d.join("rafsd"))
        .or_else(|| env("HOME").map(|h| h.join(".cache/rafsd")))
        .unwrap_or_else(|| PathBuf::from("/var/cache/rafsd"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_the_chain_and_the_options() {
        let o = BuildOptions::default();
        let a = layer_key(&["sha256:a".into()], &o);
        assert_eq!(a, layer_key(&["sha256:a".into()], &o));
        assert_ne!(a, layer_key(&["sha256:b".into(), "sha256:a".into()], &o));
        let v5 = BuildOptions {
            fs_version: 5,
            ..BuildOptions::default()
        };
        assert_ne!(a, layer_key(&["sha256:a".into()], &v5));
    }

    #[test]
    fn entries_round_trip_and_broken_ones_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LayerCache::open(dir.path()).unwrap();
        let boot = dir.path().join("b");
        std::fs::write(&boot, b"boot").unwrap();
        let rec = Record {
            source_digest: "sha256:x".into(),
            blob: Some(BlobRecord {
                digest: format!("sha256:{}", "ab".repeat(32)),
                size: 9,
            }),
        };
        cache.put("k", &rec, &boot).unwrap();
        let (got, path) = cache.get("k").unwrap();
        assert_eq!(got, rec);
        assert_eq!(std::fs::read(path).unwrap(), b"boot");
        std::fs::write(dir.path().join("k/record.json"), b"{").unwrap();
        assert!(cache.get("k").is_none());
        assert!(cache.get("missing").is_none());
    }
}
