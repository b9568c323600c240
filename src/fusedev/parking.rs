//! Reads that will wait on the network get at most three quarters of the FUSE workers, and one image of
//! several at most three quarters of those. A worker answers one request at a time, so with every worker inside a
//! cold READ (a slow registry, many readers starting at once, or one image whose registry drips its bytes
//! on purpose) metadata requests and cache hits of every image would wait behind chunk transfers; and with
//! every cold slot taken by one image, the cold reads of every other image of a shared daemon
//! (nydus-snapshotter's shared mode) would wait behind that image's. Here a READ that needs the backend
//! takes one of `limit` cold slots (all workers but a quarter), of which its image (its Vfs mount) may
//! hold `per_image` while the daemon serves other images too (a daemon of one image gives it all);
//! without a slot it can take, it is copied into its image's queue (a READ request is
//! 80 bytes) and the worker goes back for the next request. Whoever finishes a cold READ passes its slot
//! to the oldest parked request of the image with the fewest cold READs running, and answers it before
//! reading new requests, so the queues drain as slots free up, no image waits behind another's queue,
//! and no parked request waits for a wake-up that never comes.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Parked requests beyond this are answered at once, by the worker that read them (as without parking):
/// the kernel does not send that many READs at once unless something is badly wrong. At most about 2 MiB.
const MAX_PARKED: usize = 16384;

/// Images one `Vfs` serves at most: its mount index is the top byte of an inode number.
const IMAGES: usize = 256;

/// The cold slots and the requests waiting for one.
pub struct Parking {
    limit: usize,
    per_image: usize,
    state: Mutex<State>,
}

struct State {
    /// Cold READs being answered.
    cold: usize,
    /// Requests parked, in all queues.
    parked: usize,
    /// Order of arrival, so that the oldest parked request goes first among images alike.
    next_seq: u64,
    /// Per image (Vfs mount index).
    images: Vec<ImageQueue>,
}

#[derive(Default)]
struct ImageQueue {
    /// Cold READs of this image being answered.
    cold: usize,
    /// Copies of the requests waiting for a slot, oldest first, with their order of arrival.
    parked: VecDeque<(u64, Vec<u8>)>,
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

/// A parked request whose turn has come: answer it, then call [`Parking::done`] with its image.
pub struct Turn {
    pub image: u8,
    pub request: Vec<u8>,
}

impl Parking {
    /// Cold slots for `workers` workers: all but a quarter of them (at least one kept from two workers
    /// on, and at least one slot); one image may hold all but a quarter of those (at least one).
    pub fn new(workers: usize) -> Self {
        let keep = |n: usize| n.saturating_sub((n / 4).max(1)).max(1);
        let limit = keep(workers);
        Parking {
            limit,
            per_image: keep(limit),
            state: Mutex::new(State {
                cold: 0,
                parked: 0,
                next_seq: 0,
                images: (0..IMAGES).map(|_| ImageQueue::default()).collect(),
            }),
        }
    }

    /// The slots one image may hold while the daemon serves `images` images.
    fn share(&self, images: usize) -> usize {
        if images > 1 {
            self.per_image
        } else {
            self.limit
        }
    }

    /// A READ of `image` that needs the backend (`request`: its bytes, header included) is about to be
    /// answered; the daemon serves `images` images.
    pub fn admit(&self, image: u8, images: usize, request: &[u8]) -> Admission {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *s;
        let queue = &mut s.images[usize::from(image)];
        let no_slot = s.cold >= self.limit || queue.cold >= self.share(images);
        if no_slot && s.parked < MAX_PARKED {
            queue.parked.push_back((s.next_seq, request.to_vec()));
            s.next_seq += 1;
            s.parked += 1;
            return Admission::Parked;
        }
        queue.cold += 1;
        s.cold += 1;
        Admission::Go
    }

    /// A cold READ of `image` is answered: the parked request its slot passes to (answer it, then call
    /// this again with its image), or `None` when none may take it (the slot is free). The daemon serves
    /// `images` images.
    pub fn done(&self, image: u8, images: usize) -> Option<Turn> {
        let share = self.share(images);
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *s;
        let queue = &mut s.images[usize::from(image)];
        queue.cold = queue.cold.saturating_sub(1);
        s.cold = s.cold.saturating_sub(1);
        // Beyond the limit only after the queue overflowed: the slot goes.
        if s.parked == 0 || s.cold >= self.limit {
            return None;
        }
        // The image with the fewest cold READs running, among those that may take one more; of those
        // alike, the one whose request came first.
        let (next, queue) = s
            .images
            .iter_mut()
            .enumerate()
            .filter(|(_, q)| q.cold < share)
            .filter_map(|(i, q)| Some(((q.cold, q.parked.front()?.0), i, q)))
            .min_by_key(|(key, _, _)| *key)
            .map(|(_, i, q)| (i, q))?;
        let (_, request) = queue.parked.pop_front()?;
        queue.cold += 1;
        s.cold += 1;
        s.parked -= 1;
        Some(Turn {
            image: next as u8,
            request,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(t: Option<Turn>) -> Option<(u8, Vec<u8>)> {
        t.map(|t| (t.image, t.request))
    }

    #[test]
    fn cold_reads_beyond_the_slots_wait_and_take_over_freed_slots_in_order() {
        let p = Parking::new(16);
        assert_eq!(p.limit, 12, "a quarter of the workers is kept for the rest");
        assert_eq!(
            p.per_image, 9,
            "a quarter of the cold slots is kept for other images"
        );
        assert_eq!((Parking::new(2).limit, Parking::new(2).per_image), (1, 1));
        assert_eq!((Parking::new(3).limit, Parking::new(3).per_image), (2, 1));
        assert_eq!((Parking::new(4).limit, Parking::new(4).per_image), (3, 2));
        // Image 1 takes 9 slots, image 2 the other 3.
        for _ in 0..9 {
            assert_eq!(p.admit(1, 3, b"r"), Admission::Go);
        }
        assert_eq!(
            p.admit(1, 3, b"first"),
            Admission::Parked,
            "image 1 has its share"
        );
        for _ in 0..3 {
            assert_eq!(p.admit(2, 3, b"r"), Admission::Go);
        }
        assert_eq!(
            p.admit(2, 3, b"second"),
            Admission::Parked,
            "no slot is left"
        );
        assert_eq!(p.admit(1, 3, b"third"), Admission::Parked);
        // A slot image 1 frees goes to image 2, which runs fewer (3 against 8), then to image 1's oldest
        // once image 2's queue is empty.
        assert_eq!(turn(p.done(1, 3)), Some((2, b"second".to_vec())));
        assert_eq!(turn(p.done(1, 3)), Some((1, b"first".to_vec())));
        assert_eq!(turn(p.done(2, 3)), Some((1, b"third".to_vec())));
        // Then slots are freed: 12 in use until the first `None`, 11 after it.
        assert_eq!(turn(p.done(2, 3)), None);
        assert_eq!(p.admit(3, 3, b"r"), Admission::Go);
        assert_eq!(p.admit(3, 3, b"fourth"), Admission::Parked);
    }

    #[test]
    fn the_only_image_of_a_daemon_may_take_every_cold_slot() {
        let p = Parking::new(16);
        for _ in 0..12 {
            assert_eq!(p.admit(4, 1, b"r"), Admission::Go);
        }
        assert_eq!(p.admit(4, 1, b"next"), Admission::Parked);
        assert_eq!(turn(p.done(4, 1)), Some((4, b"next".to_vec())));
        // A second image mounted: the first keeps what it runs, and gets no more than its share.
        assert_eq!(turn(p.done(4, 2)), None);
        assert_eq!(p.admit(4, 2, b"r"), Admission::Parked);
        assert_eq!(p.admit(5, 2, b"r"), Admission::Go);
    }

    #[test]
    fn a_freed_slot_goes_to_the_image_with_the_fewest_cold_reads_running() {
        let p = Parking::new(16);
        for _ in 0..9 {
            assert_eq!(p.admit(7, 3, b"hog"), Admission::Go);
        }
        for _ in 0..3 {
            assert_eq!(p.admit(8, 3, b"r"), Admission::Go);
        }
        // The hog queues many before a third image comes.
        for _ in 0..100 {
            assert_eq!(p.admit(7, 3, b"hog"), Admission::Parked);
        }
        assert_eq!(p.admit(9, 3, b"late"), Admission::Parked);
        // A slot freed by the hog goes to image 9, which runs none, not to the hog's older requests.
        assert_eq!(turn(p.done(7, 3)), Some((9, b"late".to_vec())));
        // Image 8 finishing: the hog runs 8 and may take it.
        assert_eq!(turn(p.done(8, 3)), Some((7, b"hog".to_vec())));
        // The hog at its share again: a slot image 8 frees while only the hog waits is freed, and
        // the hog's own finished reads pass to its queue.
        assert_eq!(turn(p.done(8, 3)), None);
        assert_eq!(turn(p.done(7, 3)), Some((7, b"hog".to_vec())));
    }

    #[test]
    fn one_worker_still_has_a_slot_and_the_queue_is_bounded() {
        let p = Parking::new(1);
        assert_eq!(p.admit(0, 3, b"r"), Admission::Go);
        for i in 0..MAX_PARKED {
            assert_eq!(p.admit((i % 3) as u8, 3, b"x"), Admission::Parked);
        }
        // A full queue parks nothing more: the worker answers the request itself.
        assert_eq!(p.admit(5, 3, b"y"), Admission::Go);
        // Then slots past the limit go as they finish, and the queue is served to its end.
        let mut served = 0;
        let mut image = 0;
        assert!(p.done(5, 3).is_none());
        while let Some(t) = p.done(image, 3) {
            image = t.image;
            served += 1;
        }
        assert_eq!(served, MAX_PARKED);
    }
}
