//! Which requests each ring has taken and not answered yet, kept in memory shared with the process that
//! restarts the daemon after a crash ([`crate::takeover::keeper`]), so that a new daemon answers exactly
//! the requests the dead one took and never answered, and takes the rest where it stopped.
//!
//! Taking a request off a ring only changes the taking process's own next-avail index; putting it in
//! the used ring is what the guest sees. So the log records, per ring:
//! - the next avail index after each take, and each taken head as in flight. Both are written while
//!   the ring is locked; a take cut short between the two is completed from the `taking` word on
//!   recovery, so the log never says "taken" for a head the index does not cover, or the reverse;
//! - each answer being put into the used ring (`completing`: the head and the used index before it).
//!   A process that dies after publishing the used index but before clearing the head is recognised
//!   by the used index in guest memory having moved past the one noted, and the head is not answered
//!   twice.
//!
//! A head is 0 (free), taken (once) or re-run (running again in a restarted daemon). A
//! head still in flight after it started running again killed two daemons: it is answered with EIO
//! instead of a third try, so one poisonous request cannot keep the device down.
//!
//! The log also keeps the guest's FUSE_INIT parameters, written before the reply to FUSE_INIT is
//! published: a guest never sends FUSE_INIT twice, so a daemon restarted after it must know them.
//!
//! The model is the vhost-user INFLIGHT_SHMFD area (per-descriptor in-flight flags plus the last
//! batch's used index), shrunk to what this daemon's out-of-order completion needs.

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};

use super::{MAX_RINGS, QUEUE_SIZE};
use crate::takeover::state::FuseSession;

/// Taken by the daemon that took it off the ring.
const TAKEN: u8 = 1;
/// Running again in a daemon restarted after the one that took it died.
const RERUN: u8 = 2;
/// The ring's header has been set by a SET_VRING_BASE on this connection.
const VALID: u32 = 1 << 16;

#[repr(C)]
struct RingHeader {
    /// The next avail index (low 16 bits), with [`VALID`].
    next_avail: AtomicU32,
    /// A take being recorded: head + 1 (low 16 bits), next avail index after it (high 16), or 0.
    taking: AtomicU32,
    /// An answer being published: head + 1 (low 16 bits), used index before it (high 16), or 0.
    completing: AtomicU32,
    _pad: u32,
}

/// The guest's FUSE_INIT: valid (1 or 0), major, minor, max_readahead, flags (low, high).
#[repr(C)]
struct SessionRecord([AtomicU32; 6]);

#[repr(C)]
struct Mapping {
    session: SessionRecord,
    rings: [RingLog; MAX_RINGS],
}

#[repr(C)]
struct RingLog {
    header: RingHeader,
    heads: [AtomicU8; QUEUE_SIZE],
}

/// What a restarted daemon does with a ring: continue taking at `next_avail`, answer `rerun` again,
/// answer `fail` with EIO.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub rerun: Vec<u16>,
    pub fail: Vec<u16>,
}

/// The log of every ring of the device, in a shared anonymous mapping that every process forked
/// after [`InflightLog::new`] shares.
pub struct InflightLog {
    mapping: *mut Mapping,
}

// SAFETY: the mapping lives as long as the log and is only accessed through atomics.
unsafe impl Send for InflightLog {}
// SAFETY: as above.
unsafe impl Sync for InflightLog {}

fn pack(low: u16, high: u16) -> u32 {
    u32::from(low) | (u32::from(high) << 16)
}

impl InflightLog {
    /// A zeroed log for [`MAX_RINGS`] rings (about 66 KiB), shared with the children forked later.
    pub fn new() -> std::io::Result<Self> {
        let len = std::mem::size_of::<Mapping>();
        // SAFETY: a fresh anonymous shared mapping; zero-filled by the kernel, which is a valid state
        // of every atomic in it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(InflightLog { mapping: p.cast() })
    }

    fn mapping(&self) -> &Mapping {
        // SAFETY: the mapping lives as long as `self`; all of it is atomics.
        unsafe { &*self.mapping }
    }

    fn ring(&self, ring: usize) -> Option<&RingLog> {
        self.mapping().rings.get(ring)
    }

    /// The guest sent FUSE_INIT with these parameters (call before its reply is published).
    pub fn set_session(&self, s: &FuseSession) {
        let r = &self.mapping().session.0;
        r[0].store(0, Ordering::SeqCst);
        for (i, v) in [
            s.major,
            s.minor,
            s.max_readahead,
            s.flags as u32,
            (s.flags >> 32) as u32,
        ]
        .into_iter()
        .enumerate()
        {
            r[i + 1].store(v, Ordering::SeqCst);
        }
        r[0].store(1, Ordering::SeqCst);
    }

    /// The guest's FUSE_INIT on this connection, if it sent one.
    pub fn session(&self) -> Option<FuseSession> {
        let r = &self.mapping().session.0;
        let v = |i: usize| r[i].load(Ordering::SeqCst);
        (v(0) == 1).then(|| FuseSession {
            major: v(1),
            minor: v(2),
            max_readahead: v(3),
            flags: u64::from(v(4)) | (u64::from(v(5)) << 32),
        })
    }

    fn head(&self, ring: usize, head: u16) -> Option<&AtomicU8> {
        self.ring(ring)?.heads.get(usize::from(head))
    }

    /// A new connection: nothing is known of any ring, nor of the guest's session.
    pub fn clear(&self) {
        self.mapping().session.0[0].store(0, Ordering::SeqCst);
        for r in 0..MAX_RINGS {
            self.reset(r, None);
        }
    }

    /// The VMM (re)started `ring` at `base` (SET_VRING_BASE); `None`: forget the ring.
    pub fn reset(&self, ring: usize, base: Option<u16>) {
        let Some(r) = self.ring(ring) else { return };
        r.header
            .next_avail
            .store(base.map_or(0, |b| pack(b, 0) | VALID), Ordering::SeqCst);
        r.header.taking.store(0, Ordering::SeqCst);
        r.header.completing.store(0, Ordering::SeqCst);
        for h in &r.heads {
            h.store(0, Ordering::Relaxed);
        }
    }

    /// `head` was taken off `ring`, whose next avail index is now `next_avail`. Call with the ring
    /// locked.
    pub fn taken(&self, ring: usize, head: u16, next_avail: u16) {
        let (Some(r), Some(h)) = (self.ring(ring), self.head(ring, head)) else {
            return;
        };
        r.header
            .taking
            .store(pack(head.wrapping_add(1), next_avail), Ordering::SeqCst);
        h.store(TAKEN, Ordering::SeqCst);
        r.header
            .next_avail
            .store(pack(next_avail, 0) | VALID, Ordering::SeqCst);
        r.header.taking.store(0, Ordering::SeqCst);
    }

    /// `head` goes into `ring`'s used ring at used index `used`: call before the used entry is
    /// published and [`InflightLog::completed`] after, with the ring locked.
    pub fn completing(&self, ring: usize, head: u16, used: u16) {
        if let Some(r) = self.ring(ring) {
            r.header
                .completing
                .store(pack(head.wrapping_add(1), used), Ordering::SeqCst);
        }
    }

    pub fn completed(&self, ring: usize, head: u16) {
        if let Some(h) = self.head(ring, head) {
            h.store(0, Ordering::SeqCst);
        }
        if let Some(r) = self.ring(ring) {
            r.header.completing.store(0, Ordering::SeqCst);
        }
    }

    /// After a crash, before the ring is set up again: finish a take that was cut short, and return
    /// where taking continues (`None`: the dead daemon never had the ring).
    pub fn next_avail(&self, ring: usize) -> Option<u16> {
        let r = self.ring(ring)?;
        let taking = r.header.taking.swap(0, Ordering::SeqCst);
        if taking != 0 {
            let head = (taking as u16).wrapping_sub(1);
            if let Some(h) = self.head(ring, head) {
                let _ = h.compare_exchange(0, TAKEN, Ordering::SeqCst, Ordering::SeqCst);
            }
            r.header
                .next_avail
                .store(pack((taking >> 16) as u16, 0) | VALID, Ordering::SeqCst);
        }
        let n = r.header.next_avail.load(Ordering::SeqCst);
        (n & VALID != 0).then_some(n as u16)
    }

    /// After a crash, once the used index in guest memory (`used`) is known: the heads to answer
    /// again (each marked when it starts running again: [`InflightLog::rerunning`]), and those that
    /// were running again already, to answer with an error.
    pub fn recover(&self, ring: usize, used: u16) -> Recovered {
        let mut out = Recovered::default();
        let Some(r) = self.ring(ring) else { return out };
        let completing = r.header.completing.swap(0, Ordering::SeqCst);
        if completing != 0 {
            let head = (completing as u16).wrapping_sub(1);
            let before = (completing >> 16) as u16;
            // Published (the used index moved past the one noted): the guest has its answer.
            if used == before.wrapping_add(1) {
                if let Some(h) = self.head(ring, head) {
                    h.store(0, Ordering::SeqCst);
                }
            }
        }
        for (i, h) in r.heads.iter().enumerate() {
            match h.load(Ordering::SeqCst) {
                0 => {}
                TAKEN => out.rerun.push(i as u16),
                _ => out.fail.push(i as u16),
            }
        }
        out
    }

    /// A head of `ring` found by [`InflightLog::recover`] starts running again.
    pub fn rerunning(&self, ring: usize, head: u16) {
        if let Some(h) = self.head(ring, head) {
            let _ = h.compare_exchange(TAKEN, RERUN, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    /// Heads of `ring` in flight now (for tests and logs).
    pub fn in_flight(&self, ring: usize) -> usize {
        self.ring(ring).map_or(0, |r| {
            r.heads
                .iter()
                .filter(|h| h.load(Ordering::SeqCst) != 0)
                .count()
        })
    }
}

impl Drop for InflightLog {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of that length.
        unsafe { libc::munmap(self.mapping.cast(), std::mem::size_of::<Mapping>()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answered_requests_are_not_rerun_and_unanswered_ones_are() {
        let log = InflightLog::new().unwrap();
        log.reset(1, Some(10));
        log.taken(1, 5, 11);
        log.taken(1, 7, 12);
        log.taken(1, 9, 13);
        log.completing(1, 7, 0);
        log.completed(1, 7);
        assert_eq!(log.next_avail(1), Some(13));
        assert_eq!(
            log.recover(1, 1),
            Recovered {
                rerun: vec![5, 9],
                fail: vec![]
            }
        );
        assert_eq!(log.next_avail(0), None, "a ring never started");
    }

    #[test]
    fn a_take_cut_short_is_finished_on_recovery() {
        let log = InflightLog::new().unwrap();
        log.reset(2, Some(65535));
        // The daemon died after noting the take, before the head and index were written.
        log.ring(2)
            .unwrap()
            .header
            .taking
            .store(pack(4, 0), Ordering::SeqCst);
        assert_eq!(log.next_avail(2), Some(0), "the index wraps");
        assert_eq!(log.recover(2, 0).rerun, vec![3]);
    }

    #[test]
    fn an_answer_published_before_the_crash_is_not_given_twice() {
        let log = InflightLog::new().unwrap();
        log.reset(1, Some(0));
        log.taken(1, 3, 1);
        log.taken(1, 4, 2);
        // Both died in the middle of their answer: 3's used index was published, 4's was not.
        log.completing(1, 3, 65535);
        let published = log.recover(1, 0);
        assert_eq!(published.rerun, vec![4]);
        let log = InflightLog::new().unwrap();
        log.reset(1, Some(0));
        log.taken(1, 3, 1);
        log.completing(1, 3, 65535);
        assert_eq!(log.recover(1, 65535).rerun, vec![3], "not published");
    }

    #[test]
    fn a_request_that_killed_two_daemons_is_failed_not_run_a_third_time() {
        let log = InflightLog::new().unwrap();
        log.reset(1, Some(0));
        log.taken(1, 8, 1);
        assert_eq!(log.recover(1, 0).rerun, vec![8]);
        // A restarted daemon that dies before it ran the request again leaves it a first try.
        assert_eq!(log.recover(1, 0).rerun, vec![8]);
        // The restarted daemon died running it again.
        log.rerunning(1, 8);
        let again = log.recover(1, 0);
        assert_eq!((again.rerun.len(), again.fail), (0, vec![8]));
    }

    #[test]
    fn the_guests_session_is_kept_until_the_next_connection() {
        let log = InflightLog::new().unwrap();
        assert_eq!(log.session(), None);
        let s = FuseSession {
            major: 7,
            minor: 38,
            max_readahead: 1 << 20,
            flags: 0x1_0000_0001,
        };
        log.set_session(&s);
        assert_eq!(log.session(), Some(s));
        log.clear();
        assert_eq!(log.session(), None);
    }

    #[test]
    fn the_log_is_shared_with_a_forked_child() {
        let log = InflightLog::new().unwrap();
        log.reset(3, Some(0));
        // SAFETY: the child only touches the shared mapping and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            log.taken(3, 1, 1);
            // SAFETY: leave the child without running the parent's destructors or test harness.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(log.in_flight(3), 1);
        assert_eq!(log.next_avail(3), Some(1));
    }

    #[test]
    fn heads_and_rings_out_of_range_are_ignored() {
        let log = InflightLog::new().unwrap();
        log.reset(MAX_RINGS, Some(0));
        log.taken(1, QUEUE_SIZE as u16, 1);
        log.taken(MAX_RINGS + 5, 1, 1);
        assert_eq!(log.in_flight(1), 0);
    }
}
