//! The state a daemon hands to its successor (failover, live upgrade): everything needed to serve the
//! kernel's existing FUSE connection exactly as before. The supervisor (nydus-snapshotter) stores the
//! bytes without looking at them.
//!
//! Encoding: the line `rafsd-state` followed by JSON. The JSON's `version` is checked before anything
//! else, and every object refuses fields it does not know, so a state written by a newer daemon is
//! refused with a clear error instead of being half understood. Bump [`VERSION`] for any change a
//! reader of the previous version would misread. Version 2 added [`Device`]: what a virtio-fs daemon
//! hands to its successor besides the filesystems (the vhost-user connection's negotiated features,
//! memory table, vrings and DAX mappings; the descriptors travel beside the bytes, named by index).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The version this daemon writes.
pub const VERSION: u32 = 2;
/// Version 1 (rafsd before virtio-fs live upgrade): version 2 without [`State::device`], read for the
/// "fusedev" front end so that a FUSE daemon can still take over from an older rafsd.
const FUSEDEV_V1: u32 = 1;
/// A state larger than this is refused (a lookup table of millions of inodes stays well below it).
pub const MAX_BYTES: usize = 64 << 20;
const MAGIC: &[u8] = b"rafsd-state\n";

/// The FUSE session as the kernel negotiated it at FUSE_INIT (it is not sent again to a successor).
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// A passthrough share's table of the guest's inode numbers and handles (a memfd, see
    /// [`crate::passthrough::table`]): an index into the descriptors sent with the state. Absent
    /// for RAFS mounts, so a state without shares stays readable by rafsd before shares were
    /// carried over; one with a share is refused by it (an unknown field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_table: Option<u32>,
    /// The epoch above the inode numbers of an image or blob view ([`crate::fs::epoch`]). Absent
    /// for 0, as from rafsd before epochs (whose numbers had none); one present is refused by it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u16,
}

fn is_zero(n: &u16) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub version: u32,
    /// "fusedev" or "virtiofs".
    pub front_end: String,
    pub daemon_id: Option<String>,
    pub fuse: FuseSession,
    pub pseudo_dirs: Vec<PseudoDir>,
    pub mounts: Vec<Mount>,
    /// The virtio-fs device (front end "virtiofs" only).
    pub device: Option<Device>,
}

/// The virtio-fs device as the VMM set it up over vhost-user. Descriptors are indexes into the list
/// sent with the state (SCM_RIGHTS).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// The connected vhost-user socket.
    pub connection_fd: u32,
    /// The listening socket and its path (for the VMM's next connection).
    pub listener_fd: u32,
    pub socket_path: PathBuf,
    pub owner: bool,
    /// Virtio features the VMM acked (SET_FEATURES), if it did.
    pub features: Option<u64>,
    /// Protocol features the VMM acked (SET_PROTOCOL_FEATURES), if it did.
    pub protocol_features: Option<u64>,
    /// VIRTIO_RING_F_EVENT_IDX among the acked features.
    pub event_idx: bool,
    /// SET_MEM_TABLE's regions, if it was sent.
    pub memory: Option<Vec<MemoryRegion>>,
    pub vrings: Vec<Vring>,
    /// The backend request channel (SET_BACKEND_REQ_FD).
    pub backend_req_fd: Option<u32>,
    /// Request queues offered (the hiprio queue comes on top): the successor offers the same.
    pub request_queues: u32,
    /// The DAX window's size (0: none) and its live mappings, which the VMM keeps mapped.
    pub dax_window: u64,
    pub dax_mappings: Vec<DaxMapping>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRegion {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    /// The address in the VMM's process (vring addresses are given in these).
    pub user_addr: u64,
    pub mmap_offset: u64,
    pub fd: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vring {
    pub index: u32,
    /// SET_VRING_NUM.
    pub size: Option<u32>,
    /// SET_VRING_ADDR.
    pub addr: Option<VringAddr>,
    /// Where the successor starts taking requests: the old daemon's next avail index once it has
    /// stopped the ring with every request it took answered (so also the used index).
    pub next_avail: Option<u32>,
    pub kick_fd: Option<u32>,
    pub call_fd: Option<u32>,
    pub err_fd: Option<u32>,
    /// SET_VRING_ENABLE.
    pub enabled: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VringAddr {
    pub flags: u32,
    pub descriptor: u64,
    pub used: u64,
    pub available: u64,
    pub log: u64,
}

/// A live mapping of the DAX window (FUSE_SETUPMAPPING): window offset and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaxMapping {
    pub offset: u64,
    pub len: u64,
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

    /// Read a state for a daemon serving `front_end` ("fusedev" or "virtiofs").
    /// The same filesystems at the same places as `other` (the kernel's lookup counts aside): what a
    /// live upgrade's successor mounted from the offered state serves the final one.
    pub fn same_mounts(&self, other: &State) -> bool {
        let shape = |s: &State| {
            let mut mounts = s.mounts.clone();
            for m in &mut mounts {
                m.lookups.clear();
                m.parents.clear();
                m.share_table = None;
            }
            (s.pseudo_dirs.clone(), mounts)
        };
        self.front_end == other.front_end && shape(self) == shape(other)
    }

    pub fn decode(bytes: &[u8], front_end: &str) -> Result<State> {
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
        let version = match value.get("version").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(VERSION) => VERSION,
            Some(v)
                if v == u64::from(FUSEDEV_V1)
                    && front_end == "fusedev"
                    && value.get("device").is_none_or(serde_json::Value::is_null) =>
            {
                FUSEDEV_V1
            }
            Some(v) => {
                return Err(Error::Unsupported(format!(
                    "daemon state version {v}; this rafsd reads version {VERSION} only (and \
                     version {FUSEDEV_V1} of a FUSE daemon)"
                )))
            }
            None => return Err(Error::Invalid("daemon state has no version".into())),
        };
        let state: State = serde_json::from_value(value)
            .map_err(|e| Error::Invalid(format!("daemon state version {version}: {e}")))?;
        if state.front_end != front_end {
            return Err(Error::Unsupported(format!(
                "daemon state of a {:?} front end; this daemon serves {front_end}",
                state.front_end
            )));
        }
        if (front_end == "virtiofs") != state.device.is_some() {
            return Err(Error::Invalid(format!(
                "a {front_end} daemon state {} a device",
                if state.device.is_some() {
                    "with"
                } else {
                    "without"
                }
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
                share_table: None,
                epoch: 0,
            }],
            device: None,
        }
    }

    #[test]
    fn round_trips() {
        let s = sample();
        assert_eq!(State::decode(&s.encode().unwrap(), "fusedev").unwrap(), s);
    }

    #[test]
    fn mounts_are_the_same_whatever_the_lookup_counts() {
        let a = sample();
        let mut b = sample();
        b.mounts[0].lookups = vec![(1, 9)];
        b.mounts[0].parents.clear();
        assert!(a.same_mounts(&b));
        b.mounts[0].config = "{\"other\":1}".into();
        assert!(!a.same_mounts(&b), "another config");
        let mut c = sample();
        c.pseudo_dirs.push(PseudoDir {
            path: "/s2".into(),
            ino: 3,
        });
        assert!(!a.same_mounts(&c), "a mount added meanwhile");
        let mut d = sample();
        d.mounts.clear();
        assert!(!a.same_mounts(&d), "a mount removed meanwhile");
    }

    /// A FUSE daemon takes over from a rafsd that wrote version 1 (no `device` key); a virtio-fs one
    /// does not, nor does a version 1 state with a device.
    #[test]
    fn a_version_1_fusedev_state_is_read() {
        let text = String::from_utf8(sample().encode().unwrap()).unwrap();
        let v1 = text
            .replace("\"version\":2", "\"version\":1")
            .replace(",\"device\":null", "");
        assert!(!v1.contains("device"), "{v1}");
        let s = State::decode(v1.as_bytes(), "fusedev").unwrap();
        assert_eq!(s.mounts, sample().mounts);
        assert_eq!(s.device, None);
        let virtiofs = v1.replace("\"fusedev\"", "\"virtiofs\"");
        let e = State::decode(virtiofs.as_bytes(), "virtiofs").unwrap_err();
        assert!(e.to_string().contains("version 1"), "{e}");
        let with_device = v1.replacen('{', "{\"device\":{},", 1);
        assert!(State::decode(with_device.as_bytes(), "fusedev").is_err());
    }

    #[test]
    fn newer_versions_unknown_fields_and_foreign_bytes_are_refused() {
        let text = String::from_utf8(sample().encode().unwrap()).unwrap();
        let newer = text.replace("\"version\":2", "\"version\":3");
        let e = State::decode(newer.as_bytes(), "fusedev")
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 3"), "{e}");
        let extra = text.replace("\"fs_index\":1", "\"fs_index\":1,\"dax\":[]");
        let e = State::decode(extra.as_bytes(), "fusedev")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
        let top = text.replacen('{', "{\"vrings\":[],", 1);
        assert!(State::decode(top.as_bytes(), "fusedev").is_err());
        assert!(State::decode(b"\x01\x00versionize bytes", "fusedev").is_err());
        assert!(State::decode(b"rafsd-state\n{", "fusedev").is_err());
        let index = text.replace("\"fs_index\":1", "\"fs_index\":300");
        assert!(State::decode(index.as_bytes(), "fusedev").is_err());
    }
}
