//! Reads that will wait on the network get at most three quarters of a front end's workers, and one
//! image at most three quarters of those while other images have cold reads too. A worker answers one request at a time, so with
//! every worker inside a cold READ (a slow registry, many readers starting at once, or one image whose
//! registry drips its bytes on purpose) metadata requests and cache hits of every image would wait
//! behind chunk transfers; and with every cold slot taken by one image, the cold reads of every other
//! image of a shared daemon (nydus-snapshotter's shared mode, or a Kata sandbox's containers) would wait
//! behind that image's.
//!
//! So a READ that needs the backend takes one of `limit` cold slots (all workers but a quarter), of which
//! its image (its Vfs mount) may hold `per_image` while another image has cold READs running or waiting,
//! or had one end less than [`LINGER`] ago (alone, an image may take them all: idle images cost it
//! nothing). The linger is for images read one request at a time (a program reading its files in turn):
//! between two of its reads such an image has none running, and an image holding every slot would take
//! the one it freed straight back, so that each of its reads waited for one of the other image's to end.
//! Without a slot it may take, the request waits in its image's queue and the worker (or the
//! virtqueue's thread) goes on with the next request. Whoever finishes a cold READ passes its slot to the oldest waiting request of the image with
//! the fewest cold READs running, and answers it before anything else, so the queues drain as slots free
//! up, no image waits behind another's queue, and no waiting request needs a wake-up that might never
//! come. An image arriving while another holds every slot waits for the first of those reads to end
//! (each is bounded by its backend's timeouts); from then on the other holds at most its share. The FUSE workers (`fusedev::worker`)
//! queue copies of READ requests; the virtio-fs queues (`vhost_user::queue`) their descriptor chains.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Waiting requests beyond this go at once, as without the slots: neither the kernel nor a guest's driver
/// has that many READs outstanding unless something is badly wrong.
const MAX_WAITING: usize = 16384;

/// Images one `Vfs` serves at most: its mount index is the top byte of an inode number.
const IMAGES: usize = 256;

/// How long an image whose last cold READ ended still keeps the others to their share: longer than a
/// reader's pause between two reads, short enough that a lone image soon has every slot again.
pub const LINGER: Duration = Duration::from_secs(1);

/// The cold slots of one set of workers, and the requests (`T`) waiting for one.
pub struct ColdSlots<T> {
    limit: usize,
    per_image: usize,
    state: Mutex<State<T>>,
}

struct State<T> {
    /// Cold READs being answered.
    cold: usize,
    /// Requests waiting, in all queues.
    waiting: usize,
    /// Order of arrival, so that the oldest waiting request goes first among images alike.
    next_seq: u64,
    /// Images with cold READs running or waiting.
    active: usize,
    /// When the last cold READs ended.
    ended: LastEnds,
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
    /// It holds a slot: answer it now, then call [`ColdSlots::done`]. When older requests of its image
    /// were waiting, this is the oldest of them, and the one offered waits in its place.
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
    /// on, and at least one slot); one image of several active may hold all but a quarter of those (at
    /// least one).
    pub fn new(workers: usize) -> Self {
        let keep = |n: usize| n.saturating_sub((n / 4).max(1)).max(1);
        let limit = keep(workers);
        ColdSlots {
            limit,
            per_image: keep(limit),
            state: Mutex::new(State {
                cold: 0,
                waiting: 0,
                next_seq: 0,
                active: 0,
                ended: LastEnds([None, None]),
                images: (0..IMAGES)
                    .map(|_| ImageQueue {
                        cold: 0,
                        waiting: VecDeque::new(),
                    })
                    .collect(),
            }),
        }
    }

    /// A READ of `image` that needs the backend is about to be answered.
    pub fn admit(&self, image: u8, request: T) -> Admission<T> {
        self.admit_at(image, request, Instant::now())
    }

    fn admit_at(&self, image: u8, request: T, now: Instant) -> Admission<T> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *s;
        let was_active = s.images[usize::from(image)].is_active();
        // This image counts among the active ones from now on, either way.
        let active = s.active + usize::from(!was_active);
        let share = self.share(active, s.ended.other_than(image, now));
        let queue = &mut s.images[usize::from(image)];
        let no_slot = s.cold >= self.limit || queue.cold >= share;
        let room = s.waiting < MAX_WAITING;
        if room && (no_slot || !queue.waiting.is_empty()) {
            queue.waiting.push_back((s.next_seq, request));
            s.next_seq += 1;
            s.active = active;
            if no_slot {
                s.waiting += 1;
                return Admission::Waiting;
            }
            // A slot this image may take while older requests of its own wait (its share grew: another
            // image's reads ended long enough ago): the oldest goes first, this one waits in its place.
            let (_, oldest) = queue.waiting.pop_front().expect("just queued");
            queue.cold += 1;
            s.cold += 1;
            return Admission::Go(oldest);
        }
        queue.cold += 1;
        s.cold += 1;
        s.active = active;
        Admission::Go(request)
    }

    /// A cold READ of `image` is answered: the waiting request its slot passes to (answer it, then call
    /// this again with its image), or `None` when none may take it (the slot is free).
    pub fn done(&self, image: u8) -> Option<Turn<T>> {
        self.done_at(image, Instant::now())
    }

    fn done_at(&self, image: u8, now: Instant) -> Option<Turn<T>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *s;
        let queue = &mut s.images[usize::from(image)];
        queue.cold = queue.cold.saturating_sub(1);
        if !queue.is_active() {
            s.active = s.active.saturating_sub(1);
        }
        s.cold = s.cold.saturating_sub(1);
        s.ended.record(image, now);
        // Beyond the limit only after the queues overflowed: the slot goes.
        if s.waiting == 0 || s.cold >= self.limit {
            return None;
        }
        let (active, ended) = (s.active, s.ended);
        // The image with the fewest cold READs running, among those that may take one more; of those
        // alike, the one whose request came first.
        let (next, queue) = s
            .images
            .iter_mut()
            .enumerate()
            .filter_map(|(i, q)| Some(((q.cold, q.waiting.front()?.0), i, q)))
            .filter(|((cold, _), i, _)| *cold < self.share(active, ended.other_than(*i as u8, now)))
            .min_by_key(|(key, _, _)| *key)
            .map(|(_, i, q)| (i, q))?;
        let (_, request) = queue.waiting.pop_front()?;
        // Still active: it runs this one now.
        queue.cold += 1;
        s.cold += 1;
        s.waiting -= 1;
        Some(Turn {
            image: next as u8,
            request,
        })
    }

    /// The slots one image may hold while `active` images (itself among them) have cold READs, and
    /// another's cold READ ended within [`LINGER`] or not.
    fn share(&self, active: usize, other_ended_lately: bool) -> usize {
        if active > 1 || other_ended_lately {
            self.per_image
        } else {
            self.limit
        }
    }

    /// Take every waiting request out (the connection they came on is gone).
    pub fn clear(&self) -> Vec<T> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.waiting = 0;
        let taken: Vec<T> = s
            .images
            .iter_mut()
            .flat_map(|q| q.waiting.drain(..).map(|(_, t)| t))
            .collect();
        s.active = s.images.iter().filter(|q| q.is_active()).count();
        taken
    }
}

/// The two images whose cold READs ended last, each with the time of its last one, latest first: the
/// latest end by an image other than any given one is one of them.
#[derive(Clone, Copy)]
struct LastEnds([Option<(u8, Instant)>; 2]);

impl LastEnds {
    /// A cold READ of `image` ended at `now`.
    fn record(&mut self, image: u8, now: Instant) {
        if self.0[0].is_some_and(|(e, _)| e != image) {
            self.0[1] = self.0[0];
        }
        self.0[0] = Some((image, now));
    }

    /// Whether a cold READ of an image other than `image` ended within [`LINGER`] before `now`.
    fn other_than(&self, image: u8, now: Instant) -> bool {
        self.0
            .iter()
            .flatten()
            .find(|(e, _)| *e != image)
            .is_some_and(|(_, at)| now.duration_since(*at) < LINGER)
    }
}

impl<T> ImageQueue<T> {
    fn is_active(&self) -> bool {
        self.cold > 0 || !self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(t: Option<Turn<&'static str>>) -> Option<(u8, &'static str)> {
        t.map(|t| (t.image, t.request))
    }

    fn admit_n(p: &ColdSlots<&'static str>, image: u8, n: usize) -> bool {
        (0..n).all(|_| p.admit(image, "r") == Admission::Go("r"))
    }

    #[test]
    fn a_quarter_of_the_workers_and_of_the_slots_is_kept() {
        let sizes = |workers| {
            let s = ColdSlots::<()>::new(workers);
            (s.limit, s.per_image)
        };
        assert_eq!(
            [sizes(1), sizes(2), sizes(3), sizes(4), sizes(16)],
            [(1, 1), (1, 1), (2, 1), (3, 2), (12, 9)]
        );
    }

    #[test]
    fn an_image_alone_takes_every_slot_and_then_its_oldest_waits() {
        let p = ColdSlots::new(16);
        assert!(admit_n(&p, 1, 12), "idle images cost it nothing");
        assert_eq!(p.admit(1, "first"), Admission::Waiting);
        assert_eq!(p.admit(1, "second"), Admission::Waiting);
        assert_eq!(turn(p.done(1)), Some((1, "first")));
        assert_eq!(turn(p.done(1)), Some((1, "second")));
        // Then slots are freed: 12 in use until the first `None`, 11 after it.
        assert_eq!(turn(p.done(1)), None);
        assert!(admit_n(&p, 1, 1));
        assert_eq!(p.admit(1, "third"), Admission::Waiting);
    }

    #[test]
    fn a_second_image_gets_the_next_slot_and_keeps_the_first_to_its_share() {
        let p = ColdSlots::new(16);
        assert!(admit_n(&p, 7, 12));
        // The hog queues many before another image comes.
        for _ in 0..100 {
            assert_eq!(p.admit(7, "hog"), Admission::Waiting);
        }
        assert_eq!(p.admit(9, "late"), Admission::Waiting);
        // A slot the hog frees goes to image 9, which runs none, not to the hog's older requests.
        assert_eq!(turn(p.done(7)), Some((9, "late")));
        // With two images active the hog holds at most 9: its next two slots are freed, not passed on.
        assert_eq!(turn(p.done(7)), None);
        assert_eq!(turn(p.done(7)), None);
        assert_eq!(turn(p.done(7)), Some((7, "hog")), "8 running: one more");
        // Image 9 gets a free slot at once.
        assert!(admit_n(&p, 9, 1));
        // Image 9 done with both: the hog stays at its share while image 9's reads ended lately (the
        // next may come at once)...
        let now = Instant::now();
        assert_eq!(turn(p.done_at(9, now)), None);
        assert_eq!(turn(p.done_at(9, now)), None);
        assert_eq!(p.admit_at(7, "hog", now + LINGER / 2), Admission::Waiting);
        assert!(p.admit_at(9, "next", now + LINGER / 2) == Admission::Go("next"));
        assert_eq!(turn(p.done_at(9, now + LINGER / 2)), None);
        // ... and then, alone, it takes the free slots too: a finished read passes its slot on, and
        // new ones go at once.
        let later = now + LINGER * 2;
        assert_eq!(turn(p.done_at(7, later)), Some((7, "hog")));
        assert!((0..3).all(|_| p.admit_at(7, "hog", later) == Admission::Go("hog")));
        assert_eq!(
            p.admit_at(7, "hog", later),
            Admission::Waiting,
            "12 running"
        );
        // The connection goes: what waits is taken out, and finishing reads pass nothing on.
        assert_eq!(p.clear().len(), 100);
        assert_eq!(turn(p.done_at(7, later)), None);
    }

    #[test]
    fn a_share_that_grows_goes_to_the_oldest_waiting_request_first() {
        let p = ColdSlots::new(4);
        let t = Instant::now();
        assert!(p.admit_at(2, "other", t) == Admission::Go("other"));
        assert_eq!(turn(p.done_at(2, t)), None);
        // Image 2's read ended just now: image 1 is held to 2 of the 3 slots.
        assert!(p.admit_at(1, "a", t) == Admission::Go("a"));
        assert!(p.admit_at(1, "b", t) == Admission::Go("b"));
        assert_eq!(p.admit_at(1, "old", t), Admission::Waiting);
        // Later the third slot is its own again: the request waiting goes first, the new one waits.
        let later = t + LINGER * 2;
        assert_eq!(p.admit_at(1, "new", later), Admission::Go("old"));
        assert_eq!(turn(p.done_at(1, later)), Some((1, "new")));
        assert_eq!(turn(p.done_at(1, later)), None);
    }

    #[test]
    fn the_last_ends_of_two_images_are_told_apart() {
        let t = Instant::now();
        let mut ends = LastEnds([None, None]);
        assert!(!ends.other_than(1, t), "nothing ended yet");
        ends.record(1, t);
        assert!(!ends.other_than(1, t), "only its own");
        assert!(ends.other_than(2, t + LINGER / 2));
        assert!(!ends.other_than(2, t + LINGER), "too long ago");
        // Image 1 again, then 2, then 1 again: 2's end is still known to image 1.
        ends.record(2, t + LINGER);
        ends.record(1, t + LINGER * 3 / 2);
        assert!(ends.other_than(1, t + LINGER * 3 / 2));
        assert!(ends.other_than(2, t + LINGER * 2), "image 1's end at 1.5");
        assert!(!ends.other_than(1, t + LINGER * 2), "image 2's end at 1");
        // A third image pushes out the oldest.
        ends.record(3, t + LINGER * 2);
        assert!(ends.other_than(1, t + LINGER * 2));
        assert!(ends.other_than(3, t + LINGER * 2));
    }

    #[test]
    fn one_worker_still_has_a_slot_and_the_queue_is_bounded() {
        let p = ColdSlots::<&str>::new(1);
        assert_eq!(p.admit(0, "r"), Admission::Go("r"));
        for i in 0..MAX_WAITING {
            assert_eq!(p.admit((i % 3) as u8, "x"), Admission::Waiting);
        }
        // A full queue holds nothing more: the request goes at once.
        assert_eq!(p.admit(5, "y"), Admission::Go("y"));
        // Then slots past the limit go as they finish, and the queue is served to its end.
        let mut served = 0;
        let mut image = 0;
        assert!(p.done(5).is_none());
        while let Some(t) = p.done(image) {
            image = t.image;
            served += 1;
        }
        assert_eq!(served, MAX_WAITING);
    }
}
