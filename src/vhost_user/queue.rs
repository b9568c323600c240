//! Answering one virtqueue's requests: in order on the queue's thread (the hiprio queue, and every queue
//! with `--thread-pool-size 0`), or through a [`RequestQueue`]: a worker pool, with the queue's thread
//! answering some requests itself, and a watcher (a [`Watch`], one for all the request queues of a
//! connection) that takes over the ring when one of those turns slow.
//!
//! A request that finds others waiting with it goes to a worker, so they run side by side; so do
//! requests on file data other than READ (WRITE, FSYNC, SETUPMAPPING, ...), which may wait on a disk or a
//! backend. A lone metadata request (the common case: a guest process waits for each of its LOOKUPs and
//! GETATTRs) the queue thread answers itself, which spares it a hand-over to another thread; a lone READ
//! too, as long as the last [`FAST_READS`] READs each took less than [`SLOW_REQUEST`] (they came from the
//! cache), and otherwise a worker does: a cold read streaming from a registry then runs on workers while
//! the queue thread stays free. Either way a request goes into the used ring as soon as it is done, in
//! any order (virtio allows that; the guest matches replies by descriptor).
//!
//! Only the queue's thread learns of new requests (the guest kicks its eventfd), so while it answers one
//! itself nobody would take the next off the ring. Should that request be slow after all (the first
//! cold READ after cached ones, a passthrough share on a hung disk), the watcher notices: a one-shot
//! timer (set by a queue thread when it starts answering after a pause, then by the watcher itself)
//! wakes it at most once per [`SLOW_REQUEST`] while some queue thread is busy, never while all are idle.
//! When a queue thread has been on one request for [`SLOW_REQUEST`], the watcher hands what arrives
//! behind it to the workers, looking every [`WATCH_INTERVAL`], until the queue thread is done with it.
//! One watcher serves every queue: on a busy device that is one wake-up per [`SLOW_REQUEST`] in all,
//! not one per queue, each a context switch on the CPUs the queue threads need.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{InHeader, InitIn, InitIn2, Opcode, OutHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::Vfs;
use fuse_backend_rs::transport::FsCacheReqHandler;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Address, ByteValued, Bytes, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::bounds;
use super::inflight_log::{InflightLog, Recovered};
use super::MAX_RINGS;
use crate::cold_slots::{self, ColdSlots};
use crate::daemon::{RafsIndex, RafsRead};
use crate::dax::{Admission, DaxWindow};
use crate::fs::pseudo_xattr;
use crate::takeover::state::FuseSession;
use crate::worker_pool::WorkerPool;

/// How long the queue thread may answer one request itself before the watcher takes requests off the
/// ring for the workers: far above a metadata request or a cached 4 KiB read (microseconds), above a
/// cached 1 MiB read, well below a fetch from a registry.
pub const SLOW_REQUEST: Duration = Duration::from_millis(1);
/// How often the watcher looks at the ring while the queue thread is held up.
pub const WATCH_INTERVAL: Duration = Duration::from_micros(250);
/// READs in a row that finished within [`SLOW_REQUEST`] before the queue thread answers lone READs
/// itself (again). One that takes longer sends READs back to the workers.
pub const FAST_READS: u32 = 8;

/// The largest READ the queue thread looks at to tell whether it needs the backend (see
/// [`Requests::cold_image`]); a larger one counts as cold.
const CLASSIFIED: u64 = 4 << 20;

pub type Memory = GuestMemoryLoadGuard<GuestMemoryMmap>;
type Chain = DescriptorChain<Memory>;

/// A request to answer: its descriptor chain, the ring it goes back to (and that ring's index), what
/// it does, and whether a dead daemon took it before (`rerun`) or it is to be answered with EIO
/// rather than run (a request that was running in two daemons that died: see [`InflightLog`]).
pub struct Job {
    chain: Chain,
    vring: VringRwLock,
    ring: usize,
    /// The ring's [`Requests::stops`] count when the request was taken.
    stop: u32,
    kind: Kind,
    rerun: bool,
    fail: bool,
    /// The image whose cold slot it holds, if it is a READ that needs the backend (see [`ColdSlots`]).
    cold: Option<u8>,
}

/// What answering a request needs; shared by the queue threads, watchers and workers of one connection.
pub struct Requests {
    server: Server<Arc<Vfs>>,
    /// The server's `Vfs`, for what the device answers itself (`pseudo_xattr`).
    vfs: Arc<Vfs>,
    /// The RAFS images of the `Vfs`, to tell READs that need the backend (see [`ColdSlots`]).
    rafs: Arc<RafsIndex>,
    event_idx: AtomicBool,
    /// The DAX window once the backend channel is up.
    dax: RwLock<Option<Arc<DaxWindow>>>,
    /// False once the connection is over: requests finishing later stay out of its rings.
    live: RwLock<bool>,
    /// Taking requests off the rings, stopped for a live upgrade.
    gate: Gate,
    /// The guest's last FUSE_INIT, handed to a successor (which never sees it).
    init: Mutex<Option<FuseSession>>,
    /// Called when the guest sends FUSE_INIT (the state to hand over changed).
    on_init: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// Requests taken and not answered yet, for a daemon restarted after a crash.
    log: Option<Arc<InflightLog>>,
    /// Per ring, how many times the VMM stopped it (GET_VRING_BASE): a request taken before the last
    /// stop stays out of the ring (see [`Requests::ring_stopped`]).
    stops: [AtomicU32; MAX_RINGS],
    /// Per ring, whether the guest's available index is more than a ring ahead of what was taken (see
    /// [`Requests::pop_logged`]).
    overrun: [AtomicBool; MAX_RINGS],
}

/// Whether requests may be taken off the rings, and how many taken are not answered yet. A live
/// upgrade closes it and waits until none is left, so that each ring's next avail index is also its
/// used index when the successor takes over.
#[derive(Default)]
struct Gate {
    closed: RwLock<bool>,
    taken: Mutex<Taken>,
    answered: Condvar,
}

/// Requests taken and not answered, and whether a pause waits for them to be answered.
#[derive(Default)]
struct Taken {
    count: usize,
    /// Pauses waiting on `answered`. Only then does the last answer notify: a condvar's notify is a
    /// futex call whether or not anyone waits, and every lone request would make it.
    pausing: usize,
}

impl Gate {
    /// Take requests with `pop` (which returns how many it took) unless the gate is closed: `None`.
    fn take<T>(&self, pop: impl FnOnce() -> (T, usize)) -> Option<T> {
        let closed = self.closed.read().unwrap_or_else(|e| e.into_inner());
        if *closed {
            return None;
        }
        let (t, n) = pop();
        self.add_taken(n);
        Some(t)
    }

    fn add_taken(&self, n: usize) {
        self.taken.lock().unwrap_or_else(|e| e.into_inner()).count += n;
    }

    /// One request answered; true if it was the last one a pause waited for (and it was woken).
    fn answered(&self) -> bool {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        taken.count = taken.count.saturating_sub(1);
        let wake = taken.count == 0 && taken.pausing > 0;
        drop(taken);
        if wake {
            self.answered.notify_all();
        }
        wake
    }

    /// Close the gate and wait (at most `timeout`) until every request taken is answered; whether
    /// none is left.
    fn close_and_drain(&self, timeout: Duration) -> bool {
        *self.closed.write().unwrap_or_else(|e| e.into_inner()) = true;
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        taken.pausing += 1;
        let (mut taken, _) = self
            .answered
            .wait_timeout_while(taken, timeout, |t| t.count > 0)
            .unwrap_or_else(|e| e.into_inner());
        taken.pausing -= 1;
        taken.count == 0
    }

    /// Answer every request of a batch taken with [`Gate::take`] with `answer`, counting each one as
    /// answered even when `answer` fails (a guest's bad head index, a failed interrupt): a request
    /// left counted would make every later pause time out. The first error is returned after the batch.
    fn answer_each<C>(
        &self,
        batch: Vec<C>,
        mut answer: impl FnMut(C) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut first = Ok(());
        for c in batch {
            let r = answer(c);
            self.answered();
            if let Err(e) = r {
                log::warn!("virtio-fs: returning a descriptor: {e}");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

impl Requests {
    pub fn new(vfs: Arc<Vfs>, rafs: Arc<RafsIndex>, log: Option<Arc<InflightLog>>) -> Self {
        Requests {
            server: Server::new(vfs.clone()),
            vfs,
            rafs,
            event_idx: AtomicBool::new(false),
            dax: RwLock::new(None),
            live: RwLock::new(true),
            gate: Gate::default(),
            init: Mutex::new(None),
            on_init: Mutex::new(None),
            log,
            stops: std::array::from_fn(|_| AtomicU32::new(0)),
            overrun: std::array::from_fn(|_| AtomicBool::new(false)),
        }
    }

    /// The VMM stopped ring `ring` (GET_VRING_BASE, once the wait for the requests in flight is over):
    /// it owns the ring now, and a guest reset reuses its heads for new requests. A request taken
    /// before and answered after puts nothing in the used ring and leaves the crash log alone (its
    /// reply would answer another request, and clearing its head would drop that request's log entry).
    /// Its reply may still have been written into the buffers it had (see the README's limits).
    pub fn ring_stopped(&self, ring: usize) {
        if let Some(stops) = self.stops.get(ring) {
            stops.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Whether ring `ring` was found with an available index out of range at its last pop.
    fn is_overrun(&self, ring: usize) -> bool {
        self.overrun
            .get(ring)
            .is_some_and(|f| f.load(Ordering::Relaxed))
    }

    fn stop_count(&self, ring: usize) -> u32 {
        self.stops
            .get(ring)
            .map_or(0, |s| s.load(Ordering::Acquire))
    }

    /// Requests are logged for crash restart.
    pub fn logged(&self) -> bool {
        self.log.is_some()
    }

    /// Call `f` whenever the guest (re)initialises its FUSE session.
    pub fn on_fuse_init(&self, f: Box<dyn Fn() + Send + Sync>) {
        *self.on_init.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// The guest's FUSE_INIT parameters, if it sent one on this connection.
    pub fn fuse_session(&self) -> Option<FuseSession> {
        *self.init.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A successor's connection: the guest initialised the session with the predecessor.
    pub fn set_fuse_session(&self, init: FuseSession) {
        *self.init.lock().unwrap_or_else(|e| e.into_inner()) = Some(init);
    }

    /// Stop taking requests off the rings and wait (at most `timeout`) until every request taken is
    /// answered; false if some are still running then (the gate stays closed: [`Requests::resume`]).
    pub fn pause(&self, timeout: Duration) -> bool {
        self.gate.close_and_drain(timeout)
    }

    /// Take requests again (a hand-over that did not happen), then `kick_all`: a queue thread woken
    /// while the gate was closed consumed its kick and left without re-enabling notifications, so
    /// without a kick of every started ring (after the gate opens) a guest using EVENT_IDX would never
    /// kick that ring again.
    pub fn resume(&self, kick_all: impl FnOnce()) {
        *self.gate.closed.write().unwrap_or_else(|e| e.into_inner()) = false;
        kick_all();
    }

    pub fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    pub fn dax(&self) -> Option<Arc<DaxWindow>> {
        self.dax.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_dax(&self, window: Arc<DaxWindow>) {
        *self.dax.write().unwrap_or_else(|e| e.into_inner()) = Some(window);
    }

    /// End of the connection: no more used entries or interrupts.
    pub fn close(&self) {
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = false;
    }

    /// One FUSE request; returns the bytes written to the guest (0 when no reply could be built).
    fn handle_chain(&self, chain: Chain) -> u32 {
        if let Some((what, n)) = bounds::oversized(&chain) {
            log::warn!("virtio-fs: refused a chain of {n} {what}, more than a request may have");
            return fail_chain(chain, libc::EINVAL);
        }
        let mem = chain.memory();
        let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("virtio-fs: malformed request descriptors: {e}");
                return 0;
            }
        };
        let writer = match VirtioFsWriter::new(mem, chain.clone()) {
            Ok(w) => w,
            Err(e) => {
                log::warn!("virtio-fs: malformed reply descriptors: {e}");
                return 0;
            }
        };
        // Only an INIT the server takes starts a session (a second one, without DESTROY, is refused).
        if let Some(init) = fuse_init(&reader).filter(|_| !self.vfs.initialized()) {
            // Before the reply: a daemon restarted after it is answered needs the session.
            if let Some(log) = &self.log {
                log.set_session(&init);
            }
            *self.init.lock().unwrap_or_else(|e| e.into_inner()) = Some(init);
            if let Some(f) = &*self.on_init.lock().unwrap_or_else(|e| e.into_inner()) {
                f();
            }
        }
        crash_probe(&reader);
        let window = self.dax.read().unwrap_or_else(|e| e.into_inner()).clone();
        handle_request(&self.server, &self.vfs, reader, writer, window.as_ref())
    }

    /// The image of `chain` when it is a READ of an image's file that needs the backend (a chunk not in
    /// the blob cache). A panic telling (a bug) counts as not: the request is answered as any other.
    fn cold_image(&self, chain: &Chain) -> Option<u8> {
        // A chain refused for its size is answered without a reader over all its descriptors.
        if self.rafs.images() == 0 || bounds::oversized(chain).is_some() {
            return None;
        }
        catch_unwind(AssertUnwindSafe(|| {
            let reader = Reader::from_descriptor_chain(chain.memory(), chain.clone()).ok()?;
            let header = reader.clone().read_obj::<InHeader>().ok()?;
            let mut read = RafsRead::of(&self.rafs, &header, &reader)?;
            // What the guest asks for is not what it gets: the reply holds at most the chain's
            // writable bytes (a guest may ask for 4 GiB with a 4 KiB buffer). A READ of more than
            // CLASSIFIED bytes (INIT limits READs to 1 MiB) counts as cold without a look, so that
            // telling costs the queue thread a bounded walk of chunk records.
            let room = chain
                .clone()
                .writable()
                .map(|d| u64::from(d.len()))
                .sum::<u64>()
                .saturating_sub(std::mem::size_of::<OutHeader>() as u64);
            let size = u64::from(read.read_in.size).min(room);
            let image = RafsIndex::image_of(header.nodeid);
            if size > CLASSIFIED {
                return Some(image);
            }
            read.read_in.size = size as u32;
            read.is_cold().then_some(image)
        }))
        .ok()
        .flatten()
    }

    /// Answer a request (or fail it, see [`Job`]), put it in the used ring, interrupt the guest if it
    /// wants that now.
    fn run(&self, job: Job) {
        /// Counts the request answered however `run` ends (a panic in the crash log or the ring
        /// included): one left counted would make every later pause time out.
        struct Answered<'a>(&'a Gate);
        impl Drop for Answered<'_> {
            fn drop(&mut self) {
                self.0.answered();
            }
        }
        let _answered = Answered(&self.gate);
        let (ring, stop, head, vring) = (
            job.ring,
            job.stop,
            job.chain.head_index(),
            job.vring.clone(),
        );
        let len = self.answer(job);
        if let Err(e) = self.complete(ring, stop, &vring, head, len) {
            log::warn!("virtio-fs: returning descriptor {head}: {e}");
        }
    }

    /// Write the reply of `job` (or its EIO); the bytes written.
    fn answer(&self, job: Job) -> u32 {
        if job.stop != self.stop_count(job.ring) {
            // Taken before its ring stopped and not started since (it waited for a cold slot or a
            // worker): the VMM has its buffers back, so it is neither run nor answered.
            return 0;
        }
        if job.fail {
            return fail_chain(job.chain, libc::EIO);
        }
        if let (true, Some(log)) = (job.rerun, &self.log) {
            log.rerunning(job.ring, job.chain.head_index());
        }
        self.handle_caught(job.chain)
    }

    /// [`Requests::handle_chain`], a panic answered as an empty reply: the descriptor must still go
    /// back, or the guest waits for it forever.
    fn handle_caught(&self, chain: Chain) -> u32 {
        catch_unwind(AssertUnwindSafe(|| self.handle_chain(chain))).unwrap_or_else(|_| {
            log::error!("virtio-fs: request handler panicked; returning the descriptor empty");
            0
        })
    }

    /// Put `head` into the used ring with the log's two marks around it (see [`InflightLog`]); the
    /// caller holds the ring's lock.
    fn put_used(
        &self,
        ring: usize,
        stop: u32,
        state: &mut vhost_user_backend::VringState,
        head: u16,
        len: u32,
    ) -> io::Result<()> {
        // Under the ring's lock, which the stop's handling takes too: an entry is added before the
        // stop or not at all.
        if self.stop_count(ring) != stop {
            log::warn!(
                "virtio-fs: queue {ring}: request {head} answered after its ring stopped; \
                 its reply stays out of the ring"
            );
            return Ok(());
        }
        if let Some(log) = &self.log {
            log.completing(ring, head, state.get_queue().next_used());
        }
        let r = state.add_used(head, len).map_err(io::Error::other);
        if let Some(log) = &self.log {
            log.completed(ring, head);
        }
        r
    }

    /// Take the next request off `vring` (ring `ring`), noting it in the log.
    /// The next request of ring `ring`, if one is available and the ring is sound.
    ///
    /// A guest may write an available index more than a ring ahead of the requests taken, which no
    /// driver can: virtio-queue then pops nothing (logging an error each time), while EVENT_IDX's
    /// check for more says there is more, and the queue thread would go round at full speed, a line
    /// of log each time, until the ring is reset. Such a ring is left alone (said once) until its
    /// index is back in range.
    fn pop_logged(&self, ring: usize, vring: &VringRwLock, mem: &Memory) -> Option<Chain> {
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let ahead = queue
            .avail_idx(&**mem, Ordering::Acquire)
            .map_or(0, |idx| idx.0.wrapping_sub(queue.next_avail()));
        let overrun = ahead > queue.size();
        if let Some(flag) = self.overrun.get(ring) {
            // A load on every pop, a store only when the ring changes state (pops of a ring are
            // serialised by its lock).
            if flag.load(Ordering::Relaxed) != overrun {
                flag.store(overrun, Ordering::Relaxed);
                if overrun {
                    log::error!(
                        "virtio-fs: queue {ring}: the guest's available index is {} requests ahead \
                         of a ring of {}; the ring is left alone until it is reset",
                        ahead,
                        queue.size()
                    );
                }
            }
        }
        if overrun {
            return None;
        }
        let chain = queue.pop_descriptor_chain(mem.clone())?;
        if let Some(log) = &self.log {
            log.taken(ring, chain.head_index(), state.get_queue().next_avail());
        }
        Some(chain)
    }

    /// A daemon restarted after a crash, at its first event on `ring`: the used index in guest memory
    /// is where the ring continues; the requests the dead daemon took and did not answer are rebuilt
    /// from their heads (the guest does not reuse a head before it is answered) as jobs to answer
    /// again (or fail).
    pub fn recovered_jobs(
        &self,
        ring: usize,
        vring: &VringRwLock,
        mem: &Memory,
        used: u16,
    ) -> io::Result<Vec<Job>> {
        let Some(log) = &self.log else {
            return Ok(Vec::new());
        };
        let Recovered { rerun, fail } = log.recover(ring, used);
        if rerun.is_empty() && fail.is_empty() {
            return Ok(Vec::new());
        }
        log::warn!(
            "virtio-fs: queue {ring}: answering again {} requests the previous daemon took and \
             did not answer; failing {} that were in flight in two daemons that died",
            rerun.len(),
            fail.len()
        );
        let (desc_table, size) = {
            let state = vring.get_ref();
            (state.get_queue().desc_table(), state.get_queue().size())
        };
        let heads = rerun.iter().chain(&fail).copied();
        let chains = chains_at(mem, desc_table, size, heads)?;
        let taken = chains.len();
        let jobs = chains
            .into_iter()
            .map(|chain| Job {
                kind: Kind::of(&chain),
                stop: self.stop_count(ring),
                cold: None,
                rerun: true,
                fail: fail.contains(&chain.head_index()),
                chain,
                vring: vring.clone(),
                ring,
            })
            .collect();
        self.gate.add_taken(taken);
        Ok(jobs)
    }

    fn complete(
        &self,
        ring: usize,
        stop: u32,
        vring: &VringRwLock,
        head: u16,
        len: u32,
    ) -> io::Result<()> {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        if !*live {
            return Ok(());
        }
        // The ring lock is held just for the used entry and the notification check (a few stores and
        // loads), so requests finishing together do not queue up behind each other for long.
        // The VMM expects a stop (GET_VRING_BASE) to drain the requests in flight: the relay holds it
        // back until they are answered (vhost-user-backend would answer it at once); a request still
        // running after that wait is answered late and stays out of the ring (`put_used`).
        let notify = {
            let mut state = vring.get_mut();
            self.put_used(ring, stop, &mut state, head, len)?;
            // With EVENT_IDX each check covers the entries added since the previous one, whichever
            // thread added them, so an entry is never left without its interrupt.
            !self.event_idx.load(Ordering::Relaxed) || state.needs_notification().unwrap_or(true)
        };
        if notify {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Answer every available request of ring `ring` on this thread, in order, then notify once.
    /// `recovered`: requests a dead predecessor took, answered first.
    pub fn process_in_order(
        &self,
        ring: usize,
        vring: &VringRwLock,
        mem: Memory,
        recovered: Vec<Job>,
    ) -> io::Result<()> {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        self.gate.answer_each(recovered, |job| {
            let (head, stop) = (job.chain.head_index(), job.stop);
            let used = self.answer(job);
            self.put_used(ring, stop, &mut vring.get_mut(), head, used)
        })?;
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let stop = self.stop_count(ring);
            let Some(chains) = self.gate.take(|| {
                let chains: Vec<_> =
                    std::iter::from_fn(|| self.pop_logged(ring, vring, &mem)).collect();
                let n = chains.len();
                (chains, n)
            }) else {
                return Ok(());
            };
            self.gate.answer_each(chains, |chain| {
                if self.stop_count(ring) != stop {
                    // The ring stopped while earlier requests of the batch ran: the VMM has this one's
                    // buffers back (see `answer`).
                    return Ok(());
                }
                let head = chain.head_index();
                let used = self.handle_caught(chain);
                self.put_used(ring, stop, &mut vring.get_mut(), head, used)
            })?;
            if !event_idx || vring.needs_notification().map_err(io::Error::other)? {
                vring.signal_used_queue()?;
            }
            // With EVENT_IDX, re-enable notifications and drain again if more arrived meanwhile.
            if !event_idx
                || !vring.enable_notification().map_err(io::Error::other)?
                || self.is_overrun(ring)
            {
                return Ok(());
            }
        }
    }
}

/// What a request does, as far as where to answer it goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// Answered from metadata (LOOKUP, GETATTR, OPEN, READDIR, ...).
    Metadata,
    /// READ: from the cache, or from a backend (a registry) when the data is not cached yet.
    Read,
    /// Other requests on file data (WRITE, FSYNC, SETUPMAPPING, ...), which may wait on a disk or backend.
    Data,
}

impl Kind {
    /// From the FUSE opcode in the request's first descriptor (a header split across descriptors, or
    /// one that cannot be read, is taken for metadata: the server answers it with an error).
    fn of(chain: &Chain) -> Kind {
        const DATA: [Opcode; 7] = [
            Opcode::Write,
            Opcode::Fsync,
            Opcode::Fsyncdir,
            Opcode::Fallocate,
            Opcode::CopyFileRange,
            Opcode::SetupMapping,
            Opcode::RemoveMapping,
        ];
        let Some(first) = chain.clone().next() else {
            return Kind::Metadata;
        };
        // InHeader: len (u32), then opcode (u32).
        let Some(at) = first.addr().checked_add(4) else {
            return Kind::Metadata;
        };
        if first.is_write_only() || first.len() < 8 {
            return Kind::Metadata;
        }
        match chain.memory().read_obj::<u32>(at).map(u32::from_le) {
            Ok(op) if op == Opcode::Read as u32 => Kind::Read,
            Ok(op) if DATA.iter().any(|&d| d as u32 == op) => Kind::Data,
            _ => Kind::Metadata,
        }
    }
}

/// READs that finished within [`SLOW_REQUEST`], in a row (up to [`FAST_READS`]).
#[derive(Default)]
struct ReadStreak(AtomicU32);

impl ReadStreak {
    fn record(&self, took: Duration) {
        if took < SLOW_REQUEST {
            let _ = self
                .0
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some((n + 1).min(FAST_READS))
                });
        } else {
            self.0.store(0, Ordering::Relaxed);
        }
    }

    fn fast(&self) -> bool {
        self.0.load(Ordering::Relaxed) >= FAST_READS
    }
}

/// A worker's job: answer it; if it held a cold slot, answer the requests waiting for one its slot
/// passes to, one after the other, until none may take it.
fn run_pooled(requests: &Requests, streak: &ReadStreak, cold_slots: &ColdSlots<Job>, job: Job) {
    let mut slot = job.cold;
    run_caught(requests, streak, job);
    while let Some(image) = slot.take() {
        if let Some(turn) = cold_slots.done(image) {
            slot = Some(turn.image);
            run_caught(requests, streak, turn.request);
        }
    }
}

/// [`run_timed`], a panic outside the request handler (which has its own catch) logged here, so that
/// a cold slot is always passed on.
fn run_caught(requests: &Requests, streak: &ReadStreak, job: Job) {
    if catch_unwind(AssertUnwindSafe(|| run_timed(requests, streak, job))).is_err() {
        log::error!("virtio-fs: answering a request panicked");
    }
}

/// Answer `chain`, timing it when it is a READ.
fn run_timed(requests: &Requests, streak: &ReadStreak, job: Job) {
    let start = Instant::now();
    let kind = job.kind;
    requests.run(job);
    if kind == Kind::Read {
        streak.record(start.elapsed());
    }
}

/// What taking a request off the ring gave.
enum Pop {
    Request(Chain),
    /// Nothing available.
    Empty,
    /// Taking requests is stopped for a live upgrade.
    Paused,
    /// The pool is at capacity: leave the rest in the ring (a finishing request sends the resume event).
    Full,
}

/// A request queue served with a worker pool (see the module doc).
pub struct RequestQueue {
    index: usize,
    requests: Arc<Requests>,
    pool: WorkerPool<Job>,
    /// READs that need the backend take a slot here before a worker, or wait for one.
    cold_slots: Arc<ColdSlots<Job>>,
    /// A worker writes it when the pool has room again after being full; the queue thread waits on it.
    pub resume: EventConsumer,
    /// The connection's watcher (one for all its request queues).
    watch: Arc<Watch>,
    /// When the queue thread started answering the request it answers itself (nanoseconds since the
    /// watcher's epoch, never 0), or 0.
    busy_since: AtomicU64,
    /// Whether lone READs have been fast lately (answered from the cache).
    reads: Arc<ReadStreak>,
    /// While the queue thread answers a request itself: its ring and memory, for the watcher.
    ring: Mutex<Option<(VringRwLock, Memory)>>,
}

/// The watcher of a connection's request queues: one thread, woken by one alarm, for all of them, so
/// that queues answering back to back cost one wake-up per [`SLOW_REQUEST`] together, not one each.
pub struct Watch {
    /// Wakes the watcher to look at how long the queue threads have been answering their requests.
    alarm: Alarm,
    /// The alarm is set (or the watcher is about to decide whether to set it again).
    armed: AtomicBool,
    epoch: Instant,
    /// Ends the watcher.
    stop: (EventConsumer, EventNotifier),
}

impl Watch {
    pub fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(Watch {
            alarm: Alarm::new()?,
            armed: AtomicBool::new(false),
            epoch: Instant::now(),
            stop: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
        }))
    }

    /// Start the watcher thread over `queues` (which were made with this watch).
    pub fn start(self: &Arc<Self>, queues: Vec<Arc<RequestQueue>>) -> io::Result<()> {
        let watch = self.clone();
        std::thread::Builder::new()
            .name("vq-watch".into())
            .spawn(move || watch.run(&queues))
            .map(drop)
    }

    /// End the watcher (every queue's close calls it; once is enough).
    fn stop(&self) {
        if let Err(e) = self.stop.1.notify() {
            log::error!("virtio-fs: cannot stop the queues' watcher: {e}");
        }
    }

    /// Nanoseconds since `epoch`, never 0.
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 | 1
    }

    /// A queue thread starts answering a request itself: set the alarm unless it is set already.
    fn busy(&self) {
        if !self.armed.swap(true, Ordering::SeqCst) {
            self.alarm.set(Some(SLOW_REQUEST));
        }
    }

    /// The watcher thread: asleep until the alarm; then every queue thread that has been answering one
    /// request for [`SLOW_REQUEST`] gets the requests arriving behind it handed to the workers, every
    /// [`WATCH_INTERVAL`] until it is done with that one; the alarm is set again for the next queue
    /// thread to reach [`SLOW_REQUEST`], and left unset when all are idle.
    fn run(&self, queues: &[Arc<RequestQueue>]) {
        loop {
            if wait_readable([self.alarm.fd(), self.stop.0.as_raw_fd()], None)
                .is_some_and(|ready| ready[1])
            {
                return;
            }
            self.alarm.clear();
            loop {
                let now = self.now();
                let (mut held_up, mut next) = (false, None::<Duration>);
                for q in queues {
                    let since = q.busy_since.load(Ordering::SeqCst);
                    if since == 0 {
                        continue;
                    }
                    let age = Duration::from_nanos(now.saturating_sub(since));
                    if age < SLOW_REQUEST {
                        next = Some(next.map_or(SLOW_REQUEST - age, |n| n.min(SLOW_REQUEST - age)));
                    } else {
                        held_up = true;
                        q.take_over();
                    }
                }
                if held_up {
                    // Look again soon, while one is still held up by its request.
                    if wait_readable([self.stop.0.as_raw_fd()], Some(WATCH_INTERVAL))
                        .is_some_and(|ready| ready[0])
                    {
                        return;
                    }
                    continue;
                }
                if let Some(next) = next {
                    self.alarm.set(Some(next));
                    break;
                }
                // All idle: unset. A queue thread sets the alarm for its next request, unless one
                // started just now and still saw it set: then we do.
                self.armed.store(false, Ordering::SeqCst);
                if queues
                    .iter()
                    .any(|q| q.busy_since.load(Ordering::SeqCst) != 0)
                    && !self.armed.swap(true, Ordering::SeqCst)
                {
                    self.alarm.set(Some(SLOW_REQUEST));
                }
                break;
            }
        }
    }
}

impl RequestQueue {
    /// Queue `index` answered with up to `pool_size` requests in flight, watched by `watch` (whose
    /// thread the caller starts with all its queues); starts its first worker.
    pub fn new(
        index: usize,
        requests: Arc<Requests>,
        pool_size: usize,
        watch: Arc<Watch>,
    ) -> io::Result<Arc<Self>> {
        let (resume, wake) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        let (r, reads) = (requests.clone(), Arc::new(ReadStreak::default()));
        let streak = reads.clone();
        let cold_slots = Arc::new(ColdSlots::new(pool_size));
        let slots = cold_slots.clone();
        let pool = WorkerPool::new(
            format!("vq{index}-worker"),
            pool_size,
            Box::new(move |job| run_pooled(&r, &streak, &slots, job)),
            Box::new(move || {
                if let Err(e) = wake.notify() {
                    log::error!("virtio-fs: cannot wake queue {index}'s thread: {e}");
                }
            }),
        )?;
        Ok(Arc::new(RequestQueue {
            index,
            requests,
            pool,
            cold_slots,
            resume,
            watch,
            busy_since: AtomicU64::new(0),
            reads,
            ring: Mutex::new(None),
        }))
    }

    /// End of the connection: the watcher and idle workers exit, busy workers after their request;
    /// requests waiting for a cold slot are dropped unanswered (nothing goes into the rings any more).
    pub fn close(&self) {
        self.pool.close();
        self.watch.stop();
        self.cold_slots.clear();
    }

    /// The queue thread, on a kick or a resume event: take requests off the ring as long as the pool
    /// has room; answer a lone metadata request here (a lone READ too while READs are fast), hand the
    /// others to workers.
    /// `recovered`: requests a dead predecessor took (see [`Requests::recovered_jobs`]), handed to the
    /// workers first.
    pub fn serve(&self, vring: &VringRwLock, mem: Memory, recovered: Vec<Job>) -> io::Result<()> {
        for job in recovered {
            if let Some(job) = self.cold_or_back(job) {
                self.pool.submit(job);
            }
        }
        {
            // The resume event does not go through the library's enabled check the kick goes through.
            let state = vring.get_ref();
            if !state.get_queue().ready() || !state.is_enabled() {
                return Ok(());
            }
        }
        let event_idx = self.requests.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            loop {
                match self.pop(vring, &mem) {
                    Pop::Request(chain) => {
                        let kind = Kind::of(&chain);
                        let Some(job) = self.cold_or_back(self.job(chain, vring, kind)) else {
                            continue;
                        };
                        let here = match kind {
                            Kind::Metadata => true,
                            Kind::Read => self.reads.fast(),
                            Kind::Data => false,
                        };
                        if here && !more_available(vring, &mem) {
                            self.answer_here(job, &mem);
                        } else {
                            self.pool.submit(job);
                        }
                    }
                    Pop::Empty => break,
                    Pop::Paused => return Ok(()),
                    // The ring keeps the rest (with EVENT_IDX the guest stops kicking, since we do not
                    // re-enable notifications) until the resume event.
                    Pop::Full => return Ok(()),
                }
            }
            if !event_idx
                || !vring.enable_notification().map_err(io::Error::other)?
                || self.requests.is_overrun(self.index)
            {
                return Ok(());
            }
        }
    }

    fn job(&self, chain: Chain, vring: &VringRwLock, kind: Kind) -> Job {
        Job {
            chain,
            vring: vring.clone(),
            ring: self.index,
            stop: self.requests.stop_count(self.index),
            kind,
            rerun: false,
            fail: false,
            cold: None,
        }
    }

    /// A READ that needs the backend goes to a worker once it has a cold slot, or waits for one
    /// (`None`: taken care of); any other job comes back.
    fn cold_or_back(&self, job: Job) -> Option<Job> {
        let image = match job.kind {
            Kind::Read if !job.fail => self.requests.cold_image(&job.chain),
            _ => None,
        };
        let Some(image) = image else {
            return Some(job);
        };
        if let cold_slots::Admission::Go(mut job) = self.cold_slots.admit(image, job) {
            job.cold = Some(image);
            self.pool.submit(job);
        }
        None
    }

    fn pop(&self, vring: &VringRwLock, mem: &Memory) -> Pop {
        if !self.pool.has_room() {
            return Pop::Full;
        }
        // The ring lock is held for one pop only.
        let chain = self.requests.gate.take(|| {
            let chain = self.requests.pop_logged(self.index, vring, mem);
            let n = usize::from(chain.is_some());
            (chain, n)
        });
        match chain {
            None => Pop::Paused,
            Some(c) => c.map_or(Pop::Empty, Pop::Request),
        }
    }

    /// Answer a request on the queue thread, with the watcher ready to take over the ring if it is slow.
    /// The alarm is set only when it is not set already: while requests keep coming, the watcher wakes
    /// once per [`SLOW_REQUEST`] to look (and sets it again), instead of two timer syscalls per request.
    fn answer_here(&self, job: Job, mem: &Memory) {
        *self.ring.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((job.vring.clone(), mem.clone()));
        self.busy_since.store(self.watch.now(), Ordering::SeqCst);
        self.watch.busy();
        self.pool.run_here(job);
        self.busy_since.store(0, Ordering::SeqCst);
        *self.ring.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The watcher, while the queue thread is held up by a request: hand what waits in the ring behind
    /// it to the workers.
    fn take_over(&self) {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some((vring, mem)) = ring {
            while let Pop::Request(chain) = self.pop(&vring, &mem) {
                let kind = Kind::of(&chain);
                if let Some(job) = self.cold_or_back(self.job(chain, &vring, kind)) {
                    self.pool.submit(job);
                }
            }
        }
    }
}

/// More requests in the ring than we have taken.
fn more_available(vring: &VringRwLock, mem: &Memory) -> bool {
    let state = vring.get_ref();
    let queue = state.get_queue();
    queue
        .avail_idx(&**mem, Ordering::Acquire)
        .is_ok_and(|idx| idx.0 != queue.next_avail())
}

/// Wait until one of `fds` is readable (bounded by `timeout` if given); which ones are, or None on a
/// timeout or error (EINTR included: the callers loop).
fn wait_readable<const N: usize>(fds: [i32; N], timeout: Option<Duration>) -> Option<[bool; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ms = timeout.map_or(-1, |t| {
        t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
    });
    // SAFETY: `pfds` is a valid array of N pollfds.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, ms) };
    (n > 0).then(|| pfds.map(|p| p.revents & libc::POLLIN != 0))
}

/// A one-shot CLOCK_MONOTONIC timer (timerfd): armed and disarmed by one thread, waited on by another.
struct Alarm(OwnedFd);

impl Alarm {
    fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is checked and then owned here.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(Alarm(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn fd(&self) -> i32 {
        self.0.as_raw_fd()
    }

    /// Fire once after `after`, or never (None).
    fn set(&self, after: Option<Duration>) {
        let after = after.unwrap_or_default();
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: valid fd and itimerspec; the old value is not asked for.
        if unsafe { libc::timerfd_settime(self.fd(), 0, &spec, std::ptr::null_mut()) } != 0 {
            log::error!("virtio-fs: timerfd_settime: {}", io::Error::last_os_error());
        }
    }

    /// Consume an expiry (nothing to do if there was none: the fd is non-blocking).
    fn clear(&self) {
        let mut count = 0u64;
        // SAFETY: reads at most 8 bytes into `count`.
        unsafe {
            libc::read(
                self.fd(),
                (&mut count as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// Opcodes below fuse-backend-rs's `MaxOpcode` (50) that name no request. The server's trace line turns
/// every opcode into its `Opcode` enum by transmute, and these are not variants of it: undefined
/// behaviour (a crash, in practice) whenever trace logging is on. The device answers them itself.
const NO_REQUEST_OPCODES: [u32; 3] = [0, 7, 19];
/// FUSE_IOCTL: no filesystem here implements it, and the server allocates the guest's `in_size` bytes
/// before asking one. The device answers it ENOSYS too.
const IOCTL: u32 = Opcode::Ioctl as u32;

/// One FUSE request from the guest, as the device handles it: an opcode the server must not see (or
/// IOCTL) is answered ENOSYS here, an xattr request on one of the `Vfs`'s own directories as `pseudo_xattr` says
/// (`vfs` is the server's); the DAX window screens the request (a SETUPMAPPING it cannot take is refused
/// before any filesystem fetches the range; FUSE_INIT starts a new session with an empty window); then
/// the server dispatches it to the `Vfs`. Returns the bytes written for the guest (0: no reply). Public
/// so the fuzz target (tests/fuzz) feeds requests through exactly this path.
pub fn handle_request<S: BitmapSlice>(
    server: &Server<Arc<Vfs>>,
    vfs: &Vfs,
    reader: Reader<'_, S>,
    writer: VirtioFsWriter<'_, S>,
    window: Option<&Arc<DaxWindow>>,
) -> u32 {
    if let Ok(header) = reader.clone().read_obj::<InHeader>() {
        if NO_REQUEST_OPCODES.contains(&header.opcode) || header.opcode == IOCTL {
            return reply_error(writer, header.unique, libc::ENOSYS);
        }
        if let Some(reply) = pseudo_xattr::reply(vfs, &header, &reader) {
            return write_reply(writer, &reply);
        }
    }
    // Without a window SETUPMAPPING/REMOVEMAPPING get EINVAL from the server; so does a SETUPMAPPING
    // the window refuses.
    let mut window = window;
    match window.map(|w| w.admit(&reader)) {
        // Only for an INIT the server takes: a refused second one leaves the guest's mappings.
        Some(Admission::NewSession) if !vfs.initialized() => window.map_or((), |w| w.reset()),
        Some(Admission::NewSession) => {}
        Some(Admission::Refuse) => window = None,
        Some(Admission::Pass) | None => {}
    }
    let mut dax = window.map(DaxWindow::requests);
    let dax = dax.as_mut().map(|d| d as &mut dyn FsCacheReqHandler);
    match server.handle_message(reader, writer.into(), dax, None) {
        Ok(n) => n as u32,
        Err(e) => {
            log::warn!("virtio-fs: request failed: {e}");
            0
        }
    }
}

/// Test probe, debug builds only: with `RAFSD_TEST_CRASH_ON_LOOKUP=NAME` in its environment the daemon
/// aborts on a LOOKUP of NAME, so that the crash-restart tests can kill it with that request in flight
/// (and again when it is run again). Release builds ignore the variable.
fn crash_probe<S: BitmapSlice>(reader: &Reader<'_, S>) {
    static NAME: std::sync::OnceLock<Option<Vec<u8>>> = std::sync::OnceLock::new();
    if !cfg!(debug_assertions) {
        return;
    }
    let name = NAME.get_or_init(|| {
        use std::os::unix::ffi::OsStringExt;
        std::env::var_os("RAFSD_TEST_CRASH_ON_LOOKUP").map(OsStringExt::into_vec)
    });
    let Some(name) = name else { return };
    let mut r = reader.clone();
    let Ok(header) = r.read_obj::<InHeader>() else {
        return;
    };
    let mut asked = [0u8; 256];
    let len = (header.len as usize)
        .saturating_sub(std::mem::size_of::<InHeader>())
        .min(asked.len());
    if header.opcode == Opcode::Lookup as u32
        && std::io::Read::read_exact(&mut r, &mut asked[..len]).is_ok()
        && asked[..len].strip_suffix(&[0]) == Some(name.as_slice())
    {
        log::error!("RAFSD_TEST_CRASH_ON_LOOKUP: aborting on a LOOKUP of {name:?}");
        std::process::abort();
    }
}

/// The parameters of a FUSE_INIT request (the flags as 64 bits, flags2 in the high half).
fn fuse_init<S: BitmapSlice>(reader: &Reader<'_, S>) -> Option<FuseSession> {
    let mut r = reader.clone();
    let header = r.read_obj::<InHeader>().ok()?;
    if header.opcode != Opcode::Init as u32 {
        return None;
    }
    let init = r.read_obj::<InitIn>().ok()?;
    let mut flags = u64::from(init.flags);
    // FUSE_INIT_EXT (bit 30): flags2 follows.
    if init.flags & (1 << 30) != 0 {
        if let Ok(more) = r.read_obj::<InitIn2>() {
            flags |= u64::from(more.flags2) << 32;
        }
    }
    Some(FuseSession {
        major: init.major,
        minor: init.minor,
        max_readahead: init.max_readahead,
        flags,
    })
}

/// Answer `chain` with `-errno` without running it; the bytes written.
fn fail_chain(chain: Chain, errno: i32) -> u32 {
    let mem = chain.memory();
    let (Ok(reader), Ok(writer)) = (
        Reader::<()>::from_descriptor_chain(mem, chain.clone()),
        VirtioFsWriter::new(mem, chain.clone()),
    ) else {
        return 0;
    };
    match reader.clone().read_obj::<InHeader>() {
        Ok(header) => reply_error(writer, header.unique, errno),
        Err(_) => 0,
    }
}

/// The descriptor chains whose heads are `heads`, in the ring of `size` descriptors whose table is at
/// `desc_table` (a daemon restarted after a crash answers them again). virtio-queue builds chains only
/// from an avail ring, and the guest's has moved on: so a private avail ring listing `heads` is put
/// in a region of our own added above the guest's memory. The chains read and write the guest's
/// memory like any other (the regions are the same mappings).
fn chains_at(
    mem: &Memory,
    desc_table: u64,
    size: u16,
    heads: impl Iterator<Item = u16>,
) -> io::Result<Vec<Chain>> {
    use virtio_queue::Queue;
    use vm_memory::{
        GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestRegionMmap,
        MmapRegion,
    };
    const PAGE: u64 = 4096;
    // The avail ring (6 + 2 per descriptor bytes) in the first page, the used ring (6 + 8 per
    // descriptor; never written: answers go to the guest's ring) after it.
    let len = PAGE + (6 + 8 * u64::from(size)).next_multiple_of(PAGE);
    // A page apart from the guest's memory, so that a descriptor running past the guest's top does
    // not reach our ring.
    let base = mem
        .last_addr()
        .raw_value()
        .checked_add(1 + PAGE)
        .and_then(|a| a.checked_next_multiple_of(PAGE))
        .ok_or_else(|| io::Error::other("no room above the guest's memory"))?;
    let region = GuestRegionMmap::new(
        MmapRegion::<()>::new(len as usize).map_err(io::Error::other)?,
        GuestAddress(base),
    )
    .ok_or_else(|| io::Error::other("no room above the guest's memory"))?;
    let extended = mem
        .insert_region(Arc::new(region))
        .map_err(io::Error::other)?;
    let heads: Vec<u16> = heads.collect();
    let avail = GuestAddress(base);
    let count = u16::try_from(heads.len()).map_err(io::Error::other)?;
    extended
        .write_obj(count.to_le(), avail.unchecked_add(2))
        .map_err(io::Error::other)?;
    for (i, h) in heads.iter().enumerate() {
        extended
            .write_obj(h.to_le(), avail.unchecked_add(4 + 2 * i as u64))
            .map_err(io::Error::other)?;
    }
    let mem = GuestMemoryAtomic::new(extended).memory();
    let mut queue = Queue::new(size).map_err(io::Error::other)?;
    queue.set_size(size);
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(desc_table);
    queue.set_desc_table_address(lo, hi);
    let (lo, hi) = split(base);
    queue.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(base + PAGE);
    queue.set_used_ring_address(lo, hi);
    queue.set_ready(true);
    let chains: Vec<Chain> =
        std::iter::from_fn(|| queue.pop_descriptor_chain(mem.clone())).collect();
    if chains.len() != heads.len() {
        log::error!(
            "virtio-fs: {} of {} requests in flight could not be read again",
            heads.len() - chains.len(),
            heads.len()
        );
    }
    Ok(chains)
}

/// A reply carrying only `-errno`, as the server writes it.
fn reply_error<S: BitmapSlice>(writer: VirtioFsWriter<'_, S>, unique: u64, errno: i32) -> u32 {
    let out = OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    };
    write_reply(writer, out.as_slice())
}

/// Write a whole reply of our own (header included); the bytes written.
fn write_reply<S: BitmapSlice>(mut writer: VirtioFsWriter<'_, S>, reply: &[u8]) -> u32 {
    match writer.write_all(reply) {
        Ok(()) => reply.len() as u32,
        Err(e) => {
            log::warn!("virtio-fs: cannot write a reply: {e}");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_count_as_fast_after_a_streak_and_one_slow_read_resets_it() {
        let s = ReadStreak::default();
        for _ in 0..FAST_READS - 1 {
            s.record(Duration::from_micros(50));
        }
        assert!(!s.fast(), "one short of the streak");
        s.record(Duration::from_micros(50));
        assert!(s.fast());
        s.record(Duration::from_micros(50));
        assert!(s.fast(), "stays fast");
        s.record(SLOW_REQUEST);
        assert!(!s.fast(), "a read as slow as the watcher's alarm resets it");
    }

    /// A hostile guest's bad head (add_used refuses it) in the middle of a batch: every request of the
    /// batch still counts as answered, so a live upgrade's pause does not wait for them forever.
    #[test]
    fn a_failed_answer_in_a_batch_leaves_nothing_counted_as_taken() {
        let gate = Gate::default();
        let batch = gate.take(|| (vec![0u16, 0xffff, 2], 3)).unwrap();
        let mut answered = Vec::new();
        let r = gate.answer_each(batch, |head| {
            answered.push(head);
            if head == 0xffff {
                return Err(io::Error::other("bad head"));
            }
            Ok(())
        });
        assert!(r.is_err(), "the error is reported");
        assert_eq!(
            answered,
            [0, 0xffff, 2],
            "the rest of the batch is answered"
        );
        assert_eq!(gate.taken.lock().unwrap().count, 0);
    }

    /// An answer wakes a pause only when one waits and the answer was the last: lone requests make no
    /// futex call each; a pause still returns as soon as the last request is answered.
    #[test]
    fn an_answer_wakes_only_a_waiting_pause() {
        let gate = Arc::new(Gate::default());
        gate.take(|| ((), 2)).unwrap();
        assert!(!gate.answered(), "no pause waits");
        assert!(!gate.answered(), "no pause waits, none left");
        gate.add_taken(2);
        let pause = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                (
                    gate.close_and_drain(Duration::from_secs(20)),
                    start.elapsed(),
                )
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while gate.taken.lock().unwrap().pausing == 0 {
            assert!(Instant::now() < deadline, "the pause never waited");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!gate.answered(), "one still taken: the pause waits on");
        assert!(gate.answered(), "the last answer wakes the pause");
        let (drained, took) = pause.join().unwrap();
        assert!(drained);
        assert!(took < Duration::from_secs(10), "woken, not timed out");
        assert_eq!(gate.taken.lock().unwrap().pausing, 0);
    }

    /// A failed hand-over opens the gate before kicking: a queue thread woken by the kick must find
    /// it open, or it consumes the kick without taking anything and the ring stalls.
    #[test]
    fn resume_kicks_after_the_gate_opens() {
        let requests = Requests::new(Arc::new(Vfs::new(Default::default())), Arc::default(), None);
        assert!(requests.pause(Duration::from_millis(10)));
        assert!(requests.gate.take(|| ((), 0)).is_none(), "paused");
        let mut kicked_open = None;
        requests.resume(|| kicked_open = Some(requests.gate.take(|| ((), 0)).is_some()));
        assert_eq!(kicked_open, Some(true));
    }

    /// A pause that times out leaves the gate closed until the caller resumes (and kicks).
    #[test]
    fn a_pause_that_times_out_stays_closed_until_resumed() {
        let requests = Requests::new(Arc::new(Vfs::new(Default::default())), Arc::default(), None);
        requests.gate.take(|| ((), 1)).unwrap();
        assert!(!requests.pause(Duration::from_millis(10)));
        assert!(requests.gate.take(|| ((), 0)).is_none());
        let mut kicks = 0;
        requests.resume(|| kicks += 1);
        assert_eq!(kicks, 1);
        assert!(requests.gate.take(|| ((), 0)).is_some());
    }
}
