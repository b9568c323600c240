//! The FUSE requests being served right now, one slot per worker, and those read from the kernel that
//! wait for a cold slot (see `crate::cold_slots`), for `GET /api/v1/metrics/inflight` (nydus-snapshotter's
//! hung-I/O metric reads it): inode, opcode, unique id and start time of each.

use std::collections::HashMap;
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
    /// Requests waiting for a cold slot, by unique id: their callers wait as for the ones served.
    waiting: Mutex<HashMap<u64, Op>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Inflight {
    pub fn new(workers: usize) -> Self {
        Inflight {
            slots: (0..workers).map(|_| Mutex::new(None)).collect(),
            waiting: Mutex::default(),
        }
    }

    /// Worker `slot` started serving a request, which the caller has waited for since `since` (seconds
    /// since the epoch; now if `None`).
    pub fn begin(&self, slot: usize, inode: u64, opcode: u32, unique: u64, since: Option<u64>) {
        if let Some(s) = self.slots.get(slot) {
            *s.lock().unwrap_or_else(|e| e.into_inner()) = Some(Op {
                inode,
                opcode,
                unique,
                timestamp_secs: since.unwrap_or_else(now_secs),
            });
        }
    }

    /// A request waits for a cold slot.
    pub fn wait(&self, inode: u64, opcode: u32, unique: u64) {
        let op = Op {
            inode,
            opcode,
            unique,
            timestamp_secs: now_secs(),
        };
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(unique, op);
    }

    /// A request waits no more (it is served, failed or left to a successor): since when it waited.
    pub fn unwait(&self, unique: u64) -> Option<u64> {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&unique)
            .map(|op| op.timestamp_secs)
    }

    /// Worker `slot` is done with its request.
    pub fn end(&self, slot: usize) {
        if let Some(s) = self.slots.get(slot) {
            *s.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    pub fn snapshot(&self) -> Vec<Op> {
        let mut ops: Vec<Op> = self
            .slots
            .iter()
            .filter_map(|s| *s.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        ops.extend(waiting.values().copied());
        ops
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
        f.begin(1, 7, 15, 42, None);
        f.begin(9, 1, 1, 1, None); // no such worker: ignored
        let v = f.to_json();
        assert_eq!(v[0]["inode"], 7);
        assert_eq!(v[0]["opcode"], 15);
        assert_eq!(v[0]["unique"], 42);
        assert!(v[0]["timestamp_secs"].as_u64().unwrap() > 0);
        f.end(1);
        assert!(f.snapshot().is_empty());
    }

    #[test]
    fn requests_waiting_for_a_cold_slot_are_listed_with_the_time_they_came() {
        let f = Inflight::new(1);
        f.wait(7, 15, 42);
        f.wait(8, 15, 43);
        assert_eq!(f.snapshot().len(), 2);
        let since = f.unwait(42).unwrap();
        assert_eq!(f.unwait(42), None, "once");
        f.begin(0, 7, 15, 42, Some(since - 5));
        let mut listed: Vec<_> = f
            .snapshot()
            .iter()
            .map(|o| (o.unique, o.timestamp_secs))
            .collect();
        listed.sort();
        assert_eq!(listed[0], (42, since - 5), "served, since it came");
        assert_eq!(listed[1].0, 43);
    }
}
