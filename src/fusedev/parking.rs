//! Reads that will wait on the network get at most three quarters of the FUSE workers. A worker answers
//! one request at a time, so with every worker inside a cold READ (a slow registry, many readers starting
//! at once, or one image whose registry drips its bytes on purpose) metadata requests and cache hits of
//! every image would wait behind chunk transfers. Here a READ that needs the backend takes one of `limit`
//! cold slots (all workers but a quarter); without a free slot it is copied into a queue (a READ request
//! is 80 bytes) and the worker goes back for the next request. Whoever finishes a cold READ passes its
//! slot to the oldest parked one and answers it before reading new requests, so the queue drains as slots
//! free up and no parked request waits for a wake-up that never comes.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Parked requests beyond this are answered at once, by the worker that read them (as without parking):
/// the kernel does not send that many READs at once unless something is badly wrong.
const MAX_PARKED: usize = 4096;

/// The cold slots and the requests waiting for one.
pub struct Parking {
    limit: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Cold READs being answered.
    cold: usize,
    /// Copies of the requests waiting for a slot, oldest first.
    parked: VecDeque<Vec<u8>>,
}

/// What becomes of parked requests once the workers are told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OnStop {
    /// Answered as usual (the mount stays for a successor that will not see them again).
    Answer = 0,
    /// Failed with EIO rather than fetched from a backend that may be slow: the mount goes away, and a
    /// request still queued in the kernel fails then too.
    Fail = 1,
    /// Left unanswered: the kernel resends them to the successor.
    Leave = 2,
}

impl OnStop {
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => OnStop::Fail,
            2 => OnStop::Leave,
            _ => OnStop::Answer,
        }
    }
}

/// What a worker does with a cold READ it read.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Answer it now, then call [`Parking::done`].
    Go,
    /// A copy waits in the queue; the request is not this worker's any more.
    Parked,
}

impl Parking {
    /// Cold slots for `workers` workers: all but a quarter of them (at least one kept from two workers
    /// on, and at least one slot).
    pub fn new(workers: usize) -> Self {
        Parking {
            limit: workers.saturating_sub((workers / 4).max(1)).max(1),
            state: Mutex::default(),
        }
    }

    /// A READ that needs the backend (`request`: its bytes, header included) is about to be answered.
    pub fn admit(&self, request: &[u8]) -> Admission {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.cold >= self.limit && s.parked.len() < MAX_PARKED {
            s.parked.push_back(request.to_vec());
            return Admission::Parked;
        }
        s.cold += 1;
        Admission::Go
    }

    /// A cold READ is answered: the oldest parked request, which takes over its slot (answer it, then call
    /// this again), or `None` when none waits (the slot is free).
    pub fn done(&self) -> Option<Vec<u8>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let next = s.parked.pop_front();
        if next.is_none() {
            s.cold = s.cold.saturating_sub(1);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cold_reads_beyond_the_slots_wait_and_take_over_freed_slots_in_order() {
        let p = Parking::new(16);
        assert_eq!(p.limit, 12, "a quarter of the workers is kept for the rest");
        assert_eq!(Parking::new(2).limit, 1, "one of two workers is kept");
        assert_eq!(Parking::new(3).limit, 2);
        for _ in 0..12 {
            assert_eq!(p.admit(b"r"), Admission::Go);
        }
        assert_eq!(p.admit(b"first"), Admission::Parked);
        assert_eq!(p.admit(b"second"), Admission::Parked);
        // A finished read hands its slot to the oldest waiting one.
        assert_eq!(p.done().as_deref(), Some(&b"first"[..]));
        assert_eq!(p.done().as_deref(), Some(&b"second"[..]));
        // Then slots are freed: 12 in use until the first `None`, 11 after it.
        assert_eq!(p.done(), None);
        assert_eq!(p.admit(b"r"), Admission::Go);
        assert_eq!(p.admit(b"third"), Admission::Parked);
    }

    #[test]
    fn one_worker_still_has_a_slot_and_the_queue_is_bounded() {
        let p = Parking::new(1);
        assert_eq!(p.admit(b"r"), Admission::Go);
        for _ in 0..MAX_PARKED {
            assert_eq!(p.admit(b"x"), Admission::Parked);
        }
        // A full queue parks nothing more: the worker answers the request itself.
        assert_eq!(p.admit(b"y"), Admission::Go);
        let mut served = 0;
        while p.done().is_some() {
            served += 1;
        }
        assert_eq!(served, MAX_PARKED);
    }
}
