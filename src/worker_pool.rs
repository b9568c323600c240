//! A bounded pool of worker threads for one request queue: requests run side by side and finish in any
//! order, so one that waits on the network does not hold back the ones behind it.
//!
//! Whoever takes requests off the queue [`WorkerPool::submit`]s them, or runs one itself with
//! [`WorkerPool::run_here`] (which spares the hand-over to another thread), asking
//! [`WorkerPool::has_room`] first. When `capacity` requests are in flight it stops taking them (they stay
//! where they are, which pushes back on whoever queues them), and the next request to finish calls the
//! pool's `on_room` hook once, which tells the queue's thread to go on. Memory therefore stays bounded by
//! `capacity` requests per queue.
//!
//! Workers start on demand, when a request arrives and no worker is free (up to `capacity`; the first one
//! at once), and stay until [`WorkerPool::close`].

use std::collections::VecDeque;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Runs one job on a worker.
pub type Handler<J> = Box<dyn Fn(J) + Send + Sync>;
/// Called (on a worker, with no lock held) when a job finishes while the pool was full.
pub type OnRoom = Box<dyn Fn() + Send + Sync>;

pub struct WorkerPool<J: Send + 'static> {
    shared: Arc<Shared<J>>,
}

struct Shared<J> {
    name: String,
    capacity: usize,
    run: Handler<J>,
    on_room: OnRoom,
    state: Mutex<State<J>>,
    work: Condvar,
}

struct State<J> {
    jobs: VecDeque<J>,
    /// Jobs submitted and not finished (queued or running).
    in_flight: usize,
    /// Worker threads alive.
    workers: usize,
    /// Workers waiting for a job, counted until they hold the lock again (so a worker that was woken
    /// for a job and has not taken it yet still counts: a second job then gets a worker of its own).
    idle: usize,
    /// `has_room` said no since the last `on_room` call.
    full: bool,
    closed: bool,
}

impl<J: Send + 'static> WorkerPool<J> {
    /// A pool of up to `capacity` (at least 1) workers named `name-N`, running each job with `run`.
    /// Starts the first worker (an error if that fails: nothing could serve the queue).
    pub fn new(
        name: impl Into<String>,
        capacity: usize,
        run: Handler<J>,
        on_room: OnRoom,
    ) -> io::Result<Self> {
        let pool = WorkerPool {
            shared: Arc::new(Shared {
                name: name.into(),
                capacity: capacity.max(1),
                run,
                on_room,
                state: Mutex::new(State {
                    jobs: VecDeque::new(),
                    in_flight: 0,
                    // The first worker counts as idle from the start, so the first job does not start a second.
                    workers: 1,
                    idle: 1,
                    full: false,
                    closed: false,
                }),
                work: Condvar::new(),
            }),
        };
        pool.spawn(0, true)?;
        Ok(pool)
    }

    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Jobs submitted and not finished yet.
    pub fn in_flight(&self) -> usize {
        self.shared.lock().in_flight
    }

    /// Worker threads started so far.
    pub fn workers(&self) -> usize {
        self.shared.lock().workers
    }

    /// Whether one more job may be submitted now. When not, `on_room` is called as soon as a job finishes.
    pub fn has_room(&self) -> bool {
        let mut st = self.shared.lock();
        if st.in_flight < self.shared.capacity {
            return true;
        }
        st.full = true;
        false
    }

    /// Queue `job` for a free worker, starting a new worker when none is free and the pool is not at
    /// capacity. Callers ask [`Self::has_room`] first; a job beyond capacity still runs, later.
    pub fn submit(&self, job: J) {
        let mut st = self.shared.lock();
        st.jobs.push_back(job);
        st.in_flight += 1;
        let grow = st.jobs.len() > st.idle && st.workers < self.shared.capacity && !st.closed;
        if !grow {
            drop(st);
            self.shared.work.notify_one();
            return;
        }
        st.workers += 1;
        let n = st.workers - 1;
        drop(st);
        if let Err(e) = self.spawn(n, false) {
            // The job waits for one of the workers already running (there is always at least one).
            log::warn!("{}: cannot start another worker: {e}", self.shared.name);
            self.shared.lock().workers -= 1;
            self.shared.work.notify_one();
        }
    }

    /// Run `job` on the calling thread, counted in flight like a submitted job while it runs (so
    /// `capacity` bounds both). Saves the hand-over to a worker when the caller has nothing else to do.
    pub fn run_here(&self, job: J) {
        self.shared.lock().in_flight += 1;
        self.shared.run(job);
        self.shared.finish();
    }

    /// Stop the workers: idle ones exit now, busy ones after the job they run (queued jobs still run).
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.work.notify_all();
    }

    fn spawn(&self, n: usize, counted_idle: bool) -> io::Result<()> {
        let shared = self.shared.clone();
        std::thread::Builder::new()
            .name(format!("{}-{n}", self.shared.name))
            .spawn(move || shared.work_loop(counted_idle))
            .map(drop)
    }
}

impl<J: Send + 'static> Drop for WorkerPool<J> {
    fn drop(&mut self) {
        self.close();
    }
}

impl<J> Shared<J> {
    fn lock(&self) -> MutexGuard<'_, State<J>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self, job: J) {
        // A panicking handler costs its job, never the thread or the pool's accounting.
        if catch_unwind(AssertUnwindSafe(|| (self.run)(job))).is_err() {
            log::error!("{}: a request handler panicked", self.name);
        }
    }

    /// A job is done: one more slot, and `on_room` if someone was refused one.
    fn finish(&self) {
        let mut st = self.lock();
        st.in_flight -= 1;
        if st.full {
            st.full = false;
            drop(st);
            (self.on_room)();
        }
    }

    fn work_loop(&self, counted_idle: bool) {
        let mut st = self.lock();
        if counted_idle {
            st.idle -= 1;
        }
        loop {
            if let Some(job) = st.jobs.pop_front() {
                drop(st);
                self.run(job);
                self.finish();
                st = self.lock();
                continue;
            }
            if st.closed {
                st.workers -= 1;
                return;
            }
            st.idle += 1;
            st = self.work.wait(st).unwrap_or_else(|e| e.into_inner());
            st.idle -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// A job that blocks until its gate opens, then reports its id.
    struct Job {
        id: usize,
        gate: mpsc::Receiver<()>,
    }

    fn pool(capacity: usize) -> (WorkerPool<Job>, mpsc::Receiver<usize>, Arc<AtomicUsize>) {
        let (done_tx, done_rx) = mpsc::channel();
        let done_tx = Mutex::new(done_tx);
        let rooms = Arc::new(AtomicUsize::new(0));
        let r = rooms.clone();
        let p = WorkerPool::new(
            "test-pool",
            capacity,
            Box::new(move |j: Job| {
                j.gate.recv_timeout(Duration::from_secs(10)).unwrap();
                done_tx.lock().unwrap().send(j.id).unwrap();
            }),
            Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
        (p, done_rx, rooms)
    }

    fn job(id: usize) -> (Job, mpsc::Sender<()>) {
        let (tx, rx) = mpsc::channel();
        (Job { id, gate: rx }, tx)
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn jobs_finish_in_any_order_and_a_blocked_one_holds_back_nobody() {
        let (p, done, _) = pool(4);
        let (slow, open_slow) = job(0);
        p.submit(slow);
        let mut gates = Vec::new();
        for id in 1..4 {
            let (j, g) = job(id);
            p.submit(j);
            gates.push(g);
        }
        for g in gates.iter().rev() {
            g.send(()).unwrap();
        }
        let mut first = Vec::new();
        for _ in 1..4 {
            first.push(done.recv_timeout(Duration::from_secs(10)).unwrap());
        }
        first.sort();
        assert_eq!(
            first,
            [1, 2, 3],
            "the three fast jobs finish while job 0 waits"
        );
        assert!(done.try_recv().is_err());
        open_slow.send(()).unwrap();
        assert_eq!(done.recv_timeout(Duration::from_secs(10)).unwrap(), 0);
        wait_until("in_flight 0", || p.in_flight() == 0);
        assert_eq!(p.workers(), 4);
    }

    #[test]
    fn a_full_pool_says_so_and_calls_on_room_once_a_job_finishes() {
        let (p, done, rooms) = pool(2);
        let (a, ga) = job(1);
        let (b, gb) = job(2);
        assert!(p.has_room());
        p.submit(a);
        assert!(p.has_room());
        p.submit(b);
        assert!(!p.has_room(), "two of two in flight");
        assert!(!p.has_room());
        assert_eq!(rooms.load(Ordering::SeqCst), 0);
        gb.send(()).unwrap();
        assert_eq!(done.recv_timeout(Duration::from_secs(10)).unwrap(), 2);
        room_again_then_last_job(&p, &done, &rooms, ga);
        assert_eq!(
            rooms.load(Ordering::SeqCst),
            1,
            "on_room only after a refusal"
        );
        assert_eq!(p.workers(), 2, "never more workers than capacity");
    }

    /// After a refusal and one job done: `on_room` was called, there is room; then job 1 (gated by `gate`)
    /// finishes and nothing is left in flight.
    fn room_again_then_last_job(
        p: &WorkerPool<Job>,
        done: &mpsc::Receiver<usize>,
        rooms: &AtomicUsize,
        gate: mpsc::Sender<()>,
    ) {
        wait_until("on_room", || rooms.load(Ordering::SeqCst) == 1);
        assert!(p.has_room());
        gate.send(()).unwrap();
        assert_eq!(done.recv_timeout(Duration::from_secs(10)).unwrap(), 1);
        wait_until("in_flight 0", || p.in_flight() == 0);
    }

    /// Submit job `id`, let it run, wait until it is done.
    fn submit_and_finish(p: &WorkerPool<Job>, done: &mpsc::Receiver<usize>, id: usize) {
        let (j, g) = job(id);
        p.submit(j);
        g.send(()).unwrap();
        assert_eq!(done.recv_timeout(Duration::from_secs(10)).unwrap(), id);
        wait_until("in_flight 0", || p.in_flight() == 0);
    }

    #[test]
    fn one_request_at_a_time_needs_one_worker() {
        let (p, done, _) = pool(8);
        for id in 0..20 {
            submit_and_finish(&p, &done, id);
        }
        assert_eq!(p.workers(), 1);
    }

    #[test]
    fn a_panicking_job_frees_its_slot_and_the_worker_goes_on() {
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let p: WorkerPool<bool> = WorkerPool::new(
            "test-panic",
            1,
            Box::new(move |boom: bool| {
                r.fetch_add(1, Ordering::SeqCst);
                assert!(!boom, "handler panics on purpose");
            }),
            Box::new(|| {}),
        )
        .unwrap();
        p.submit(true);
        p.submit(false);
        wait_until("both jobs", || ran.load(Ordering::SeqCst) == 2);
        wait_until("in_flight 0", || p.in_flight() == 0);
        assert!(p.has_room());
    }

    #[test]
    fn a_job_run_here_counts_against_the_capacity() {
        let (p, done, rooms) = pool(2);
        let (a, ga) = job(1);
        p.submit(a);
        let (b, gb) = job(2);
        std::thread::scope(|s| {
            s.spawn(|| p.run_here(b));
            wait_until("two in flight", || p.in_flight() == 2);
            assert!(!p.has_room(), "one on a worker, one run here: full");
            gb.send(()).unwrap();
            assert_eq!(done.recv_timeout(Duration::from_secs(10)).unwrap(), 2);
        });
        room_again_then_last_job(&p, &done, &rooms, ga);
        assert_eq!(p.workers(), 1, "the job run here needed no worker");
    }

    #[test]
    fn close_stops_idle_workers() {
        let (p, done, _) = pool(3);
        for id in 0..3 {
            submit_and_finish(&p, &done, id);
        }
        p.close();
        wait_until("workers gone", || p.workers() == 0);
    }
}
