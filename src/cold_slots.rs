//! Reads that will wait on the network get at most three quarters of a front end's workers, and one
//! image of several at most three quarters of those. A worker answers one request at a time, so with
//! every worker inside a cold READ (a slow registry, many readers starting at once, or one image whose
//! registry drips its bytes on purpose) metadata requests and cache hits of every image would wait
//! behind chunk transfers; and with every cold slot taken by one image, the cold reads of every other
//! image of a shared daemon (nydus-snapshotter's shared mode, or a Kata sandbox's containers) would wait
//! behind that image's.
//!
//! So a READ that needs the backend takes one of `limit` cold slots (all workers but a quarter), of which
//! its image (its Vfs mount) may hold `per_image` while the daemon serves other images too (a daemon of
//! one image gives it all). Without a slot it may take, the request waits in its image's queue and the
//! worker (or the virtqueue's thread) goes on with the next request. Whoever finishes a cold READ passes
//! its slot to the oldest waiting request of the image with the fewest cold READs running, and answers
//! it before anything else, so the queues drain as slots free up, no image waits behind another's queue,
//! and no waiting request needs a wake-up that might never come. The FUSE workers (`fusedev::worker`)
//! queue copies of READ requests; the virtio-fs queues (`vhost_user::queue`) their descriptor chains.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Waiting requests beyond this go at once, as without the slots (unless the caller asks
/// [`ColdSlots::has_room`] first): the kernel does not send that many READs at once unless something is
/// badly wrong.
const MAX_WAITING: usize = 16384;

/// Called (with no lock held) when a request leaves the queues after [`ColdSlots::has_room`] said no.
pub type OnRoom = Box<dyn Fn() + Send + Sync>;

/// Images one `Vfs` serves at most: its mount index is the top byte of an inode number.
const IMAGES: usize = 256;

/// The cold slots of one set of workers, and the requests (`T`) waiting for one.
pub struct ColdSlots<T> {
    limit: usize,
    per_image: usize,
    /// Requests that may wait at once.
    max_waiting: usize,
    on_room: Option<OnRoom>,
    state: Mutex<State<T>>,
}

struct State<T> {
    /// Cold READs being answered.
    cold: usize,
    /// Requests waiting, in all queues.
    waiting: usize,
    /// Order of arrival, so that the oldest waiting request goes first among images alike.
    next_seq: u64,
    /// `has_room` said no since a request last left the queues.
    full: bool,
    /// Per image (Vfs mount index).
    images: Vec<ImageQueue<T>>,
}

struct ImageQueue<T> {
    /// Cold READs of this image being answered.
    cold: usize,
    /// The requests waiting for a slot, oldest first, with their order of arrival.
    waiting: VecDeque<(u64, T)>,
}

/// What becomes of a cold READ offered to [`ColdSlots::admit`].
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<T> {
    /// It holds a slot: answer it now, then call [`ColdSlots::done`].
    Go(T),
    /// It waits in its image's queue; the request is not the caller's any more.
    Waiting,
}

/// A waiting request whose turn has come: answer it, then call [`ColdSlots::done`] with its image.
#[derive(Debug, PartialEq, Eq)]
pub struct Turn<T> {
    pub image: u8,
    pub request: T,
}

impl<T> ColdSlots<T> {
    /// Cold slots for `workers` workers: all but a quarter of them (at least one kept from two workers
    /// on, and at least one slot); one image of several may hold all but a quarter of those (at least
    /// one).
    pub fn new(workers: usize) -> Self {
        Self::with_room(workers, MAX_WAITING, None)
    }

    /// The same with at most `max_waiting` requests waiting: the caller asks [`Self::has_room`] before
    /// it takes a request that may have to wait, and `on_room` is called when one leaves the queues
    /// after it said no.
    pub fn with_room(workers: usize, max_waiting: usize, on_room: Option<OnRoom>) -> Self {
        let keep = |n: usize| n.saturating_sub((n / 4).max(1)).max(1);
        let limit = keep(workers);
        ColdSlots {
            limit,
            per_image: keep(limit),
            max_waiting: max_waiting.max(1),
            on_room,
            state: Mutex::new(State {
                cold: 0,
                waiting: 0,
                next_seq: 0,
                full: false,
                images: (0..IMAGES)
                    .map(|_| ImageQueue {
                        cold: 0,
                        waiting: VecDeque::new(),
                    })
                    .collect(),
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

    /// A READ of `image` that needs the backend is about to be answered; the daemon serves `images`
    /// images.
    pub fn admit(&self, image: u8, images: usize, request: T) -> Admission<T> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *s;
        let queue = &mut s.images[usize::from(image)];
        let no_slot = s.cold >= self.limit || queue.cold >= self.share(images);
        if no_slot && s.waiting < self.max_waiting {
            queue.waiting.push_back((s.next_seq, request));
            s.next_seq += 1;
            s.waiting += 1;
            return Admission::Waiting;
        }
        queue.cold += 1;
        s.cold += 1;
        Admission::Go(request)
    }

    /// A cold READ of `image` is answered: the waiting request its slot passes to (answer it, then call
    /// this again with its image), or `None` when none may take it (the slot is free). The daemon serves
    /// `images` images.
    pub fn done(&self, image: u8, images: usize) -> Option<Turn<T>> {
        let share = self.share(images);
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        let queue = &mut s.images[usize::from(image)];
        queue.cold = queue.cold.saturating_sub(1);
        s.cold = s.cold.saturating_sub(1);
        // Beyond the limit only after the queues overflowed: the slot goes.
        if s.waiting == 0 || s.cold >= self.limit {
            return None;
        }
        // The image with the fewest cold READs running, among those that may take one more; of those
        // alike, the one whose request came first.
        let (next, queue) = s
            .images
            .iter_mut()
            .enumerate()
            .filter(|(_, q)| q.cold < share)
            .filter_map(|(i, q)| Some(((q.cold, q.waiting.front()?.0), i, q)))
            .min_by_key(|(key, _, _)| *key)
            .map(|(_, i, q)| (i, q))?;
        let (_, request) = queue.waiting.pop_front()?;
        queue.cold += 1;
        s.cold += 1;
        s.waiting -= 1;
        let room_again = std::mem::take(&mut s.full);
        drop(guard);
        if let (true, Some(on_room)) = (room_again, &self.on_room) {
            on_room();
        }
        Some(Turn {
            image: next as u8,
            request,
        })
    }

    /// Whether a request may wait (fewer than `max_waiting` do); if not, `on_room` is called when one
    /// leaves the queues.
    pub fn has_room(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let room = s.waiting < self.max_waiting;
        s.full |= !room;
        room
    }

    /// Take every waiting request out (the connection they came on is gone).
    pub fn clear(&self) -> Vec<T> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.waiting = 0;
        s.images
            .iter_mut()
            .flat_map(|q| q.waiting.drain(..).map(|(_, t)| t))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(t: Option<Turn<&'static str>>) -> Option<(u8, &'static str)> {
        t.map(|t| (t.image, t.request))
    }

    #[test]
    fn cold_reads_beyond_the_slots_wait_and_take_over_freed_slots_in_order() {
        let p = ColdSlots::<&str>::new(16);
        assert_eq!(p.limit, 12, "a quarter of the workers is kept for the rest");
        assert_eq!(
            p.per_image, 9,
            "a quarter of the cold slots is kept for other images"
        );
        let sizes = |workers| {
            let s = ColdSlots::<()>::new(workers);
            (s.limit, s.per_image)
        };
        assert_eq!([sizes(2), sizes(3), sizes(4)], [(1, 1), (2, 1), (3, 2)]);
        // Image 1 takes 9 slots, image 2 the other 3; then each has to wait (its share, no slot left).
        let take = |image, n| (0..n).all(|_| p.admit(image, 3, "r") == Admission::Go("r"));
        assert!(take(1, 9));
        assert_eq!(p.admit(1, 3, "first"), Admission::Waiting);
        assert!(take(2, 3));
        assert_eq!(p.admit(2, 3, "second"), Admission::Waiting);
        assert_eq!(p.admit(1, 3, "third"), Admission::Waiting);
        // A slot image 1 frees goes to image 2, which runs fewer (3 against 8), then to image 1's oldest
        // once image 2's queue is empty.
        assert_eq!(turn(p.done(1, 3)), Some((2, "second")));
        assert_eq!(turn(p.done(1, 3)), Some((1, "first")));
        assert_eq!(turn(p.done(2, 3)), Some((1, "third")));
        // Then slots are freed: 12 in use until the first `None`, 11 after it.
        assert_eq!(turn(p.done(2, 3)), None);
        assert_eq!(p.admit(3, 3, "r"), Admission::Go("r"));
        assert_eq!(p.admit(3, 3, "fourth"), Admission::Waiting);
    }

    #[test]
    fn the_only_image_of_a_daemon_may_take_every_cold_slot() {
        let p = ColdSlots::<&str>::new(16);
        for _ in 0..12 {
            assert_eq!(p.admit(4, 1, "r"), Admission::Go("r"));
        }
        assert_eq!(p.admit(4, 1, "next"), Admission::Waiting);
        assert_eq!(turn(p.done(4, 1)), Some((4, "next")));
        // A second image mounted: the first keeps what it runs, and gets no more than its share.
        assert_eq!(turn(p.done(4, 2)), None);
        assert_eq!(p.admit(4, 2, "r"), Admission::Waiting);
        assert_eq!(p.admit(5, 2, "r"), Admission::Go("r"));
    }

    #[test]
    fn a_freed_slot_goes_to_the_image_with_the_fewest_cold_reads_running() {
        let p = ColdSlots::<&str>::new(16);
        for _ in 0..9 {
            assert_eq!(p.admit(7, 3, "hog"), Admission::Go("hog"));
        }
        for _ in 0..3 {
            assert_eq!(p.admit(8, 3, "r"), Admission::Go("r"));
        }
        // The hog queues many before a third image comes.
        for _ in 0..100 {
            assert_eq!(p.admit(7, 3, "hog"), Admission::Waiting);
        }
        assert_eq!(p.admit(9, 3, "late"), Admission::Waiting);
        // A slot freed by the hog goes to image 9, which runs none, not to the hog's older requests.
        assert_eq!(turn(p.done(7, 3)), Some((9, "late")));
        // Image 8 finishing: the hog runs 8 and may take it.
        assert_eq!(turn(p.done(8, 3)), Some((7, "hog")));
        // The hog at its share again: a slot image 8 frees while only the hog waits is freed, and
        // the hog's own finished reads pass to its queue.
        assert_eq!(turn(p.done(8, 3)), None);
        assert_eq!(turn(p.done(7, 3)), Some((7, "hog")));
        // The connection goes: what waits is taken out, and finishing reads pass nothing on.
        assert_eq!(p.clear().len(), 98);
        assert_eq!(turn(p.done(7, 3)), None);
    }

    #[test]
    fn a_bounded_queue_says_when_it_has_room_again() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let woken = Arc::new(AtomicUsize::new(0));
        let w = woken.clone();
        let on_room: OnRoom = Box::new(move || {
            w.fetch_add(1, Ordering::SeqCst);
        });
        // Two workers: one cold slot; two requests may wait.
        let p = ColdSlots::<&str>::with_room(2, 2, Some(on_room));
        assert_eq!(p.admit(0, 1, "r"), Admission::Go("r"));
        assert!(p.has_room());
        assert_eq!(p.admit(0, 1, "a"), Admission::Waiting);
        assert_eq!(p.admit(0, 1, "b"), Admission::Waiting);
        assert!(!p.has_room());
        assert!(!p.has_room());
        assert_eq!(turn(p.done(0, 1)), Some((0, "a")));
        assert_eq!(woken.load(Ordering::SeqCst), 1, "told once");
        assert!(p.has_room());
        assert_eq!(turn(p.done(0, 1)), Some((0, "b")));
        assert_eq!(woken.load(Ordering::SeqCst), 1, "not asked since");
    }

    #[test]
    fn one_worker_still_has_a_slot_and_the_queue_is_bounded() {
        let p = ColdSlots::<&str>::new(1);
        assert_eq!(p.admit(0, 3, "r"), Admission::Go("r"));
        for i in 0..MAX_WAITING {
            assert_eq!(p.admit((i % 3) as u8, 3, "x"), Admission::Waiting);
        }
        // A full queue holds nothing more: the request goes at once.
        assert_eq!(p.admit(5, 3, "y"), Admission::Go("y"));
        // Then slots past the limit go as they finish, and the queue is served to its end.
        let mut served = 0;
        let mut image = 0;
        assert!(p.done(5, 3).is_none());
        while let Some(t) = p.done(image, 3) {
            image = t.image;
            served += 1;
        }
        assert_eq!(served, MAX_WAITING);
    }
}
