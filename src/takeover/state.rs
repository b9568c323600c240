//! The state a daemon hands to its successor (failover, live upgrade): everything needed to serve the
//! kernel's existing FUSE connection exactly as before. The supervisor (nydus-snapshotter) stores the
//! bytes without looking at them.
//!
//! Encoding: the line `rafsd-state` followed by JSON. The JSON's `version` is checked before anything
//! else, and every object refuses fields it does not know, so a state written by a newer daemon is
//! refused with a clear error instead of being half understood. Bump [`VERSION`] for any change a
//! reader of the previous version would misread; issue 17 (virtio-fs live upgrade) adds vrings, the
//! memory table and DAX mappings as new fields of a new version.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The version this daemon writes and the only one it reads.
pub const VERSION: u32 = 1;
/// A state larger than this is refused (a lookup table of millions of inodes stays well below it).
pub const MAX_BYTES: usize = 64 << 20;
const MAGIC: &[u8] = b"rafsd-state\n";

/// The FUSE session as the kernel negotiated it at FUSE_INIT (it is not sent again to a successor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FuseSession {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    /// The kernel's INIT flags, 64 bits (flags2 in the high half).
    pub flags: u64,
}

/// A directory of the pseudo filesystem that joins the mounts, with its inode number (known to the
/// kernel). Listed in creation order: recreating them in this order gives the same numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PseudoDir {
    pub path: String,
    pub ino: u64,
}

/// One pseudo mount: what was mounted, where, under which index (the top byte of its inode numbers as
/// the kernel sees them), and the kernel's references into it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    pub mountpoint: String,
    pub fs_index: u8,
    /// "rafs" or "blob_view".
    pub fs_type: String,
    pub source: PathBuf,
    /// The mount's daemon config as given (credentials included: the supervisor is trusted with them,
    /// as with the config file it wrote).
    pub config: String,
    /// The instance id when the config named none (the command line's `--id`).
    pub id: Option<String>,
    pub prefetch_files: Vec<String>,
    /// (inode, outstanding kernel lookups).
    pub lookups: Vec<(u64, u64)>,
    /// (directory, parent) for the ".." of directories the kernel knows.
    pub parents: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub version: u32,
    /// "fusedev" (virtio-fs comes with issue 17).
    pub front_end: String,
    pub daemon_id: Option<String>,
    pub fuse: FuseSession,
    pub pseudo_dirs: Vec<PseudoDir>,
    pub mounts: Vec<Mount>,
}

impl State {
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = MAGIC.to_vec();
        serde_json::to_writer(&mut out, self)
            .map_err(|e| Error::Internal(format!("encode the daemon state: {e}")))?;
        if out.len() > MAX_BYTES {
            return Err(Error::Unsupported(format!(
                "the daemon state is {} bytes, more than {MAX_BYTES}",
                out.len()
            )));
        }
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<State> {
        if bytes.len() > MAX_BYTES {
            return Err(Error::Invalid(format!(
                "daemon state of {} bytes is larger than {MAX_BYTES}",
                bytes.len()
            )));
        }
        let Some(json) = bytes.strip_prefix(MAGIC) else {
            return Err(Error::Invalid(
                "the supervisor's state was not written by rafsd (a nydusd state cannot be taken over)"
                    .into(),
            ));
        };
        let value: serde_json::Value = serde_json::from_slice(json)
            .map_err(|e| Error::Invalid(format!("daemon state is not valid JSON: {e}")))?;
        match value.get("version").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(VERSION) => {}
            Some(v) => {
                return Err(Error::Unsupported(format!(
                    "daemon state version {v}; this rafsd reads version {VERSION} only"
                )))
            }
            None => return Err(Error::Invalid("daemon state has no version".into())),
        }
        let state: State = serde_json::from_value(value)
            .map_err(|e| Error::Invalid(format!("daemon state version {VERSION}: {e}")))?;
        if state.front_end != "fusedev" {
            return Err(Error::Unsupported(format!(
                "daemon state of a {:?} front end; this daemon serves fusedev",
                state.front_end
            )));
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            version: VERSION,
            front_end: "fusedev".into(),
            daemon_id: Some("abc".into()),
            fuse: FuseSession {
                major: 7,
                minor: 41,
                max_readahead: 131072,
                flags: 1 << 39 | 1,
            },
            pseudo_dirs: vec![PseudoDir {
                path: "/s1".into(),
                ino: 2,
            }],
            mounts: vec![Mount {
                mountpoint: "/s1".into(),
                fs_index: 1,
                fs_type: "rafs".into(),
                source: "/b".into(),
                config: "{}".into(),
                id: None,
                prefetch_files: vec![],
                lookups: vec![(1, 3), (12, 1)],
                parents: vec![(12, 1)],
            }],
        }
    }

    #[test]
    fn round_trips() {
        let s = sample();
        assert_eq!(State::decode(&s.encode().unwrap()).unwrap(), s);
    }

    #[test]
    fn newer_versions_unknown_fields_and_foreign_bytes_are_refused() {
        let text = String::from_utf8(sample().encode().unwrap()).unwrap();
        let newer = text.replace("\"version\":1", "\"version\":2");
        let e = State::decode(newer.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("version 2"), "{e}");
        let extra = text.replace("\"fs_index\":1", "\"fs_index\":1,\"dax\":[]");
        let e = State::decode(extra.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
        let top = text.replacen('{', "{\"vrings\":[],", 1);
        assert!(State::decode(top.as_bytes()).is_err());
        assert!(State::decode(b"\x01\x00versionize bytes").is_err());
        assert!(State::decode(b"rafsd-state\n{").is_err());
        let index = text.replace("\"fs_index\":1", "\"fs_index\":300");
        assert!(State::decode(index.as_bytes()).is_err());
    }
}
