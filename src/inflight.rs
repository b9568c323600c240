//! The FUSE requests being served right now, one slot per worker, for `GET /api/v1/metrics/inflight`
//! (nydus-snapshotter's hung-I/O metric reads it): inode, opcode, unique id and start time of each.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub inode: u64,
    pub opcode: u32,
    pub unique: u64,
    pub timestamp_secs: u64,
}

/// One slot per worker thread; a worker fills its slot while it serves a request.
pub struct Inflight {
    slots: Vec<Mutex<Option<Op>>>,
}

impl Inflight {
    pub fn new(workers: usize) -> Self {
        Inflight {
            slots: (0..workers).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Worker `slot` started serving a request.
    pub fn begin(&self, slot: usize, inode: u64, opcode: u32, unique: u64) {
        if let Some(s) = self.slots.get(slot) {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            *s.lock().unwrap_or_else(|e| e.into_inner()) = Some(Op {
                inode,
                opcode,
                unique,
                timestamp_secs: now,
            });
        }
    }

    /// Worker `slot` is done with its request.
    pub fn end(&self, slot: usize) {
        if let Some(s) = self.slots.get(slot) {
            *s.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    pub fn snapshot(&self) -> Vec<Op> {
        self.slots
            .iter()
            .filter_map(|s| *s.lock().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    /// nydusd's JSON: `[{"inode", "opcode", "unique", "timestamp_secs"}]`.
    pub fn to_json(&self) -> Value {
        Value::Array(
            self.snapshot()
                .into_iter()
                .map(|o| {
                    json!({
                        "inode": o.inode,
                        "opcode": o.opcode,
                        "unique": o.unique,
                        "timestamp_secs": o.timestamp_secs,
                    })
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_fill_and_clear() {
        let f = Inflight::new(2);
        assert!(f.snapshot().is_empty());
        f.begin(1, 7, 15, 42);
        f.begin(9, 1, 1, 1); // no such worker: ignored
        let v = f.to_json();
        assert_eq!(v[0]["inode"], 7);
        assert_eq!(v[0]["opcode"], 15);
        assert_eq!(v[0]["unique"], 42);
        assert!(v[0]["timestamp_secs"].as_u64().unwrap() > 0);
        f.end(1);
        assert!(f.snapshot().is_empty());
    }
}
