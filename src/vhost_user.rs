//! The virtio-fs device: a vhost-user backend that feeds FUSE requests from the guest's virtqueues to a
//! fuse-backend-rs `Server` over the daemon's `Vfs` (where each image is a pseudo mount).
//!
//! Queue 0 is the hiprio queue (FORGET, INTERRUPT), queues 1.. carry requests; each queue has its own
//! thread. The hiprio queue's thread answers its requests itself, in order (they are cheap, and the
//! guest expects FORGETs in the order sent). Each request queue also has a pool of `--thread-pool-size`
//! workers, so that a request waiting on the network holds back nobody and requests finish in any order;
//! [`queue`] says how the queue thread, the workers and a watcher (one for all queues) share the work. With
//! `--thread-pool-size 0` request queues are answered like the hiprio queue, one at a time in order.
//!
//! A request that fails is answered (or dropped) by the server and logged; it never ends a thread. When
//! the VMM disconnects we listen again for the next one; requests still running then are not put in the
//! old connection's rings.
//!
//! The VMM's connection goes through a [`relay`] to the library's (vhost-user-backend) private one, so
//! that the device can be handed to a new process under a running guest: see [`upgrade`].
//!
//! With `--dax-window` the device also offers a DAX window (SHMEM, GET_SHMEM_CONFIG) and answers
//! SETUPMAPPING/REMOVEMAPPING through the backend request channel: see [`crate::dax`].

/// Request rings of the largest device (`--thread-num`). vhost-user-backend gives each of its threads
/// the rings it serves as a `u64` bit mask, and the hiprio ring takes bit 0: 63 request rings fill it.
pub const MAX_REQUEST_QUEUES: usize = 63;
/// Rings of the largest device: the hiprio ring and the request rings.
pub const MAX_RINGS: usize = 1 + MAX_REQUEST_QUEUES;

pub mod bounds;
pub mod inflight_log;
pub mod queue;
pub mod relay;
pub mod upgrade;
pub mod wire;

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use fuse_backend_rs::api::Vfs;
use vhost::vhost_user::message::{
    VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Backend, Error as VhostUserError, Listener};
use vhost_user_backend::{
    Error as DaemonError, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::EventFd;

use crate::daemon::{Daemon, RafsIndex};
use crate::dax::DaxWindow;
use crate::error::{Error, Result};
use crate::takeover::keeper::CheckpointSink;
use crate::takeover::state::{self, State};
use inflight_log::InflightLog;
pub use queue::handle_request;
use queue::{Memory, RequestQueue, Requests, Watch};

/// Descriptors per queue (QEMU asks for 128 by default; nydusd offers 1024).
pub const QUEUE_SIZE: usize = 1024;
/// hiprio + request queues offered; the VMM's `num-request-queues` must not exceed `QUEUES - 1`.
pub const DEFAULT_REQUEST_QUEUES: usize = 4;
/// Requests of one request queue in flight at most, the queue thread's own included, and so workers at
/// most. Workers start only when requests overlap, so a guest that sends one request at a time costs one
/// idle worker per queue. 16 leaves room for the reads a few streaming readers keep in flight (a Linux
/// guest's readahead keeps one or two per file) to wait on the network while metadata and cached reads
/// still get through; the cap bounds memory to 16 replies (at most 1 MiB each, written straight into
/// guest memory) plus the chunk buffers of 16 reads per queue.
pub const DEFAULT_POOL_SIZE: usize = 16;

type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// How long a VMM's GET_VRING_BASE (a ring stopping) waits for the requests in flight.
const STOP_DRAIN: std::time::Duration = std::time::Duration::from_secs(3);

/// The pool size for `--thread-pool-size`: absent means [`DEFAULT_POOL_SIZE`]; 0 means no pool (each
/// queue answered in order by its own thread, as virtiofsd's 0 does). Kata passes `=1` to every
/// virtio-fs daemon by default, a virtiofsd tuning for local passthrough I/O; one at a time would put
/// every request of the guest behind any chunk being fetched from a registry, which is what the pool is
/// for, so 1 also gets the default (0 still gives in-order service to whoever wants it).
pub fn pool_size(requested: Option<u32>) -> usize {
    match requested {
        None => DEFAULT_POOL_SIZE,
        Some(1) => {
            log::info!(
                "--thread-pool-size=1 (Kata's default for virtiofsd) means the default pool of \
                 {DEFAULT_POOL_SIZE} per request queue here, so that a request waiting on a backend \
                 does not hold back the others; --thread-pool-size=0 answers requests in order"
            );
            DEFAULT_POOL_SIZE
        }
        Some(n) => n as usize,
    }
}

pub struct VirtioFsBackend {
    requests: Arc<Requests>,
    mem: RwLock<Option<GuestMem>>,
    queues: usize,
    /// One exit event per queue thread, so the threads stop when a connection ends.
    exits: Vec<(EventConsumer, EventNotifier)>,
    /// Per queue: how a request queue is served (none for the hiprio queue, or with pool size 0).
    pools: Vec<Option<Arc<RequestQueue>>>,
    backend_req: Mutex<Option<Backend>>,
    /// DAX window size in bytes (0: no window).
    dax_window_size: u64,
    /// Per queue: take the used index from guest memory before the first request (a ring handed
    /// over by a predecessor; the library starts counting at 0).
    resync_used: Vec<AtomicBool>,
    /// The rings come from a daemon that died: answer again what it took and did not answer.
    recovering: AtomicBool,
}

/// Request queues 1..`queues` served with pools of `pool_size` and one watcher for them all (the
/// hiprio queue 0 gets none).
fn request_queues_with_pools(
    requests: &Arc<Requests>,
    queues: usize,
    pool_size: usize,
) -> io::Result<Vec<Option<Arc<RequestQueue>>>> {
    let watch = Watch::new()?;
    let mut made: Vec<Arc<RequestQueue>> = Vec::with_capacity(queues);
    let started = (1..queues)
        .try_for_each(|q| {
            made.push(RequestQueue::new(
                q,
                requests.clone(),
                pool_size,
                watch.clone(),
            )?);
            Ok(())
        })
        .and_then(|()| watch.start(made.clone()));
    if let Err(e) = started {
        // The queues made so far have threads of their own: stop them.
        made.iter().for_each(|rq| rq.close());
        return Err(e);
    }
    Ok(std::iter::once(None)
        .chain(made.into_iter().map(Some))
        .collect())
}

impl VirtioFsBackend {
    /// `inflight`: the log of requests taken and not answered, for crash restart.
    pub fn new(
        vfs: Arc<Vfs>,
        rafs: Arc<RafsIndex>,
        request_queues: usize,
        pool_size: usize,
        dax_window_size: u64,
        inflight: Option<Arc<InflightLog>>,
    ) -> io::Result<Self> {
        if request_queues > MAX_REQUEST_QUEUES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{request_queues} request queues: at most {MAX_REQUEST_QUEUES}"),
            ));
        }
        let queues = 1 + request_queues.max(1);
        let exits = (0..queues)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        let requests = Arc::new(Requests::new(vfs, rafs, inflight));
        let pools = if pool_size == 0 {
            (0..queues).map(|_| None).collect()
        } else {
            request_queues_with_pools(&requests, queues, pool_size)?
        };
        Ok(VirtioFsBackend {
            requests,
            mem: RwLock::new(None),
            queues,
            exits,
            pools,
            backend_req: Mutex::new(None),
            dax_window_size,
            resync_used: (0..queues).map(|_| AtomicBool::new(false)).collect(),
            recovering: AtomicBool::new(false),
        })
    }

    /// The rings come from a predecessor: each continues at the used index in guest memory.
    fn resync_used_rings(&self) {
        for r in &self.resync_used {
            r.store(true, Ordering::SeqCst);
        }
    }

    /// The event (epoll data) of a queue's resume eventfd: past the queue and exit events.
    fn resume_event(&self) -> u16 {
        self.queues as u16 + 1
    }

    /// End of the connection: no more used entries or interrupts; watchers and idle workers exit.
    fn close(&self) {
        self.requests.close();
        for q in self.pools.iter().flatten() {
            q.close();
        }
    }

    /// At the first event of a ring carried on from another process: continue at the used index in
    /// guest memory and, after a crash, take back the requests the dead daemon left unanswered.
    fn resync(&self, ring: usize, vring: &VringRwLock, mem: &Memory) -> Vec<queue::Job> {
        if !self
            .resync_used
            .get(ring)
            .is_some_and(|r| r.swap(false, Ordering::SeqCst))
        {
            return Vec::new();
        }
        let used = match vring.queue_used_idx() {
            Ok(used) => used,
            Err(e) => {
                log::error!("virtio-fs: queue {ring}: used index: {e}");
                return Vec::new();
            }
        };
        vring.set_queue_next_used(used);
        if !self.recovering.load(Ordering::SeqCst) {
            return Vec::new();
        }
        self.requests
            .recovered_jobs(ring, vring, mem, used)
            .unwrap_or_else(|e| {
                log::error!("virtio-fs: queue {ring}: requests in flight at the crash: {e}");
                Vec::new()
            })
    }

    fn memory(&self) -> io::Result<Memory> {
        Ok(self
            .mem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .ok_or_else(|| {
                io::Error::other("virtqueue kicked before the guest memory table was set")
            })?
            .memory())
    }
}

impl VhostUserBackend for VirtioFsBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queues
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let base = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        if self.dax_window_size == 0 {
            return base;
        }
        // SHMEM_MAP carries the file descriptor (BACKEND_SEND_FD) and is acknowledged (REPLY_ACK).
        base | VhostUserProtocolFeatures::BACKEND_SEND_FD | VhostUserProtocolFeatures::SHMEM
    }

    fn get_shmem_config(&self) -> io::Result<VhostUserShMemConfig> {
        if self.dax_window_size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no DAX window (--dax-window)",
            ));
        }
        // One VIRTIO Shared Memory Region, shmid 0: the virtio-fs DAX window.
        Ok(VhostUserShMemConfig::new(1, &[self.dax_window_size]))
    }

    fn set_event_idx(&self, enabled: bool) {
        self.requests.set_event_idx(enabled);
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        if self.dax_window_size != 0 {
            self.requests
                .set_dax(DaxWindow::new(self.dax_window_size, backend.clone()));
        }
        *self.backend_req.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend);
    }

    /// One worker thread per queue: a slow read on one request queue does not hold up the others.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.exits.get(thread_index)?;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            log::warn!("virtio-fs: unexpected event set {evset:?}");
            return Ok(());
        }
        // One thread per queue (`queues_per_thread`): thread `q` serves queue `q`, its only vring.
        let Some(vring) = vrings.first() else {
            log::warn!("virtio-fs: event {device_event} on thread {thread} without a queue");
            return Ok(());
        };
        let serve = || {
            self.memory().and_then(|mem| {
                let recovered = self.resync(thread, vring, &mem);
                match self.pools.get(thread).and_then(Option::as_ref) {
                    Some(q) => {
                        if device_event == self.resume_event() {
                            let _ = q.resume.consume();
                        }
                        q.serve(vring, mem, recovered)
                    }
                    None => self
                        .requests
                        .process_in_order(thread, vring, mem, recovered),
                }
            })
        };
        // A panic here would leave the queue without its thread for good; with crash restart, the
        // keeper starts a whole new daemon instead.
        let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(serve)) {
            Ok(r) => r,
            Err(_) if self.requests.logged() => {
                log::error!(
                    "virtio-fs: queue {thread}'s thread panicked; aborting to be restarted"
                );
                std::process::abort();
            }
            Err(_) => Err(io::Error::other("the queue's thread panicked")),
        };
        // Never return an error: that would end this queue's thread for good.
        if let Err(e) = result {
            log::error!("virtio-fs: queue {thread}: {e}");
        }
        Ok(())
    }
}

/// Bind the vhost-user socket (replacing a stale one). Done before the API reports RUNNING, because the
/// VMM connects as soon as it sees that state. The listening socket is kept for the daemon's life (and
/// handed to a successor): re-binding it per connection, as `VhostUserDaemon::serve` does, loses a VMM
/// that reconnects right away (its connection lands in the old listener's backlog and is reset when
/// that listener closes, or finds no socket file at all).
///
/// The socket keeps the mode bind(2) gives it (0777 less the umask): never chmod'ed, it has no moment
/// with a wider mode, and the VMM, which may run as another user, must be able to connect.
pub fn bind(sock: &Path) -> Result<UnixListener> {
    let _ = std::fs::remove_file(sock);
    UnixListener::bind(sock)
        .map_err(|e| Error::Invalid(format!("vhost-user socket {}: {e}", sock.display())))
}

/// Options of the device that stay the same across VMM connections.
#[derive(Clone, Copy, Debug)]
pub struct DeviceOptions {
    /// Request queues offered (the hiprio queue comes on top).
    pub request_queues: usize,
    /// Workers per request queue (see [`pool_size`]); 0 answers requests in order on the queue's thread.
    pub pool_size: usize,
    /// DAX window size in bytes; 0 offers none.
    pub dax_window_size: u64,
}

impl Default for DeviceOptions {
    /// What `rafsd virtiofs` offers without options: [`DEFAULT_REQUEST_QUEUES`] queues of
    /// [`DEFAULT_POOL_SIZE`] workers each, no DAX window.
    fn default() -> Self {
        DeviceOptions {
            request_queues: DEFAULT_REQUEST_QUEUES,
            pool_size: DEFAULT_POOL_SIZE,
            dax_window_size: 0,
        }
    }
}

/// Live-upgrade requests from the admin API (`PUT /api/v1/daemon/upgrade`): the connections of new
/// processes asking for the hand-over, for the serving thread.
pub struct Upgrades {
    waiting: Mutex<Vec<UnixStream>>,
    wake: EventFd,
    /// (the daemon is stopping, a hand-over was committed): never both, so a daemon stopping on a
    /// signal knows whether the socket files are still its own.
    decided: Mutex<(bool, bool)>,
    /// The state a successor or a restarted daemon would get changed (mounts, FUSE_INIT): the
    /// serving thread sends the keeper a checkpoint.
    changed: AtomicBool,
}

impl Upgrades {
    pub fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(Upgrades {
            waiting: Mutex::new(Vec::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            decided: Mutex::new((false, false)),
            changed: AtomicBool::new(false),
        }))
    }

    /// The daemon's state changed: have the serving thread send a checkpoint.
    pub fn state_changed(&self) {
        self.changed.store(true, Ordering::SeqCst);
        if let Err(e) = self.wake.write(1) {
            log::error!("cannot wake the vhost-user thread: {e}");
        }
    }

    fn take_changed(&self) -> bool {
        self.changed.swap(false, Ordering::SeqCst)
    }

    /// The hand-over is about to be committed: true unless the daemon is stopping (then it is not).
    fn commit(&self) -> bool {
        let mut d = self.decided.lock().unwrap_or_else(|e| e.into_inner());
        d.1 = !d.0;
        d.1
    }

    /// The daemon stops (a signal, `PUT /daemon/exit`): no hand-over commits from now on. True if
    /// one did already (the device and its socket files are the successor's).
    pub fn stopping(&self) -> bool {
        let mut d = self.decided.lock().unwrap_or_else(|e| e.into_inner());
        d.0 = true;
        d.1
    }

    /// A new process's API connection asking for the hand-over: answered here, on the API thread.
    /// Only a process of this daemon's user (or root) gets `101` (others `403`), and only while no
    /// other request waits (`409`): then the connection waits for the serving thread.
    pub fn request(&self, mut peer: UnixStream) {
        let no = |peer: &mut UnixStream, status: u16, code: &str, why: String| {
            log::warn!("live upgrade refused: {why}");
            let _ = crate::api::http::answer(
                peer,
                &crate::api::http::Response::error(status, code, why),
            );
        };
        if let Err(e) = upgrade::check_peer(&peer) {
            return no(&mut peer, 403, "Forbidden", e.to_string());
        }
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if !waiting.is_empty() {
            drop(waiting);
            let why = "another live upgrade is waiting to be served".to_string();
            return no(&mut peer, 409, "Conflict", why);
        }
        if (&peer).write_all(upgrade::SWITCH_HEAD.as_bytes()).is_err() {
            return;
        }
        let _ = peer.set_write_timeout(None);
        waiting.push(peer);
        drop(waiting);
        if let Err(e) = self.wake.write(1) {
            log::error!("live upgrade: cannot wake the vhost-user thread: {e}");
        }
    }

    fn take(&self) -> Vec<UnixStream> {
        let _ = self.wake.read();
        std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A device handed over by a predecessor, to serve first (see [`upgrade`]).
pub struct Restore {
    pub handover: upgrade::Handover,
    /// Called once this process serves the device (the predecessor has let go): from then on the
    /// socket files are this process's.
    pub serving: Box<dyn FnOnce() + Send>,
}

/// A device state kept by the crash-restart keeper (see [`crate::takeover::keeper`]), to carry on
/// after the daemon that served it died.
pub struct Recovery {
    pub state: State,
    pub files: Vec<Option<std::fs::File>>,
}

/// A device to carry on before serving new VMM connections.
pub enum Carried {
    /// Handed over by a running predecessor (live upgrade).
    Upgrade(Restore),
    /// Left by a daemon that died (crash restart).
    Crash(Recovery),
}

/// Crash restart: where requests in flight are logged and the device's state is sent.
pub struct CrashRestart {
    pub inflight: Arc<InflightLog>,
    pub checkpoints: Arc<CheckpointSink>,
}

/// What serving one VMM connection needs.
struct Connection<'a> {
    daemon: &'a Arc<Daemon>,
    listener: &'a UnixListener,
    sock: &'a Path,
    opts: DeviceOptions,
    crash: Option<&'a CrashRestart>,
}

/// Serve the daemon's share on `listener` until `stop` is set or the device was handed over (then
/// `Ok(true)`): one VMM connection at a time, each with a fresh backend and vring workers behind a
/// [`relay`]. With `restore`, first carry on the predecessor's connection.
#[allow(clippy::too_many_arguments)]
pub fn serve(
    daemon: Arc<Daemon>,
    listener: UnixListener,
    sock: &Path,
    opts: DeviceOptions,
    stop: Arc<AtomicBool>,
    upgrades: Arc<Upgrades>,
    carried: Option<Carried>,
    crash: Option<CrashRestart>,
) -> Result<bool> {
    let c = Connection {
        daemon: &daemon,
        listener: &listener,
        sock,
        opts,
        crash: crash.as_ref(),
    };
    let start = match carried {
        Some(Carried::Upgrade(r)) => Some(Start::Restored(Box::new(r))),
        Some(Carried::Crash(r)) if r.state.device.is_some() => Some(Start::Recovered(Box::new(r))),
        Some(Carried::Crash(_)) | None => None,
    };
    if let Some(start) = start {
        if c.session(start, &upgrades)? {
            return Ok(true);
        }
    }
    while !stop.load(Ordering::Relaxed) {
        log::info!("virtio-fs: waiting for a VMM on {}", sock.display());
        c.checkpoint_mounts();
        let ready = wait_readable(&[listener.as_raw_fd(), upgrades.wake.as_raw_fd()]);
        if ready[1] {
            // The mounts changed: the checkpoint at the top of the next round sends them.
            upgrades.take_changed();
            for peer in upgrades.take() {
                upgrade::refuse(
                    &peer,
                    &Error::Invalid(
                        "no VMM is connected: start the new daemon on the socket instead".into(),
                    ),
                );
            }
        }
        if !ready[0] {
            continue;
        }
        let vmm = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => {
                log::warn!("virtio-fs: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        if c.session(Start::Fresh(vmm), &upgrades)? {
            return Ok(true);
        }
    }
    Ok(false)
}

enum Start {
    Fresh(UnixStream),
    Restored(Box<Restore>),
    Recovered(Box<Recovery>),
}

/// poll() for readability; which of `fds` are readable (none on EINTR).
fn wait_readable<const N: usize>(fds: &[RawFd; N]) -> [bool; N] {
    let mut p = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: N valid pollfds.
    let n = unsafe { libc::poll(p.as_mut_ptr(), N as libc::nfds_t, -1) };
    p.map(|p| n > 0 && p.revents != 0)
}

/// A listening socket in the abstract namespace only this process knows the name of, for the library's
/// side of the relay.
fn private_listener() -> io::Result<(UnixListener, std::os::unix::net::SocketAddr)> {
    use std::os::linux::net::SocketAddrExt;
    let mut nonce = [0u8; 16];
    // SAFETY: getrandom into a local buffer.
    unsafe { libc::getrandom(nonce.as_mut_ptr().cast(), nonce.len(), 0) };
    let name: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(format!("rafsd-vu-{name}"))?;
    Ok((UnixListener::bind_addr(&addr)?, addr))
}

impl Connection<'_> {
    /// One VMM connection, to its end (`Ok(false)`) or its hand-over to a new process (`Ok(true)`).
    fn session(&self, start: Start, upgrades: &Arc<Upgrades>) -> Result<bool> {
        let opts = self.opts;
        let vfs = self.daemon.vfs.clone();
        let backend = Arc::new(
            VirtioFsBackend::new(
                vfs.clone(),
                self.daemon.rafs_index(),
                opts.request_queues,
                opts.pool_size,
                opts.dax_window_size,
                self.crash.map(|c| c.inflight.clone()),
            )
            .map_err(|e| Error::io("create virtio-fs backend", e))?,
        );
        let mut daemon = VhostUserDaemon::new(
            "rafsd-virtiofs".into(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| Error::Internal(format!("vhost-user daemon: {e}")))?;
        // Each pooled queue's thread also waits on its resume event (a worker's "room again").
        for (q, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            if let Some(qp) = backend.pools.get(q).and_then(Option::as_ref) {
                handler
                    .register_listener(
                        qp.resume.as_raw_fd(),
                        EventSet::IN,
                        u64::from(backend.resume_event()),
                    )
                    .map_err(|e| Error::io(format!("register queue {q}'s resume event"), e))?;
            }
        }
        let (private, addr) =
            private_listener().map_err(|e| Error::io("private vhost-user socket", e))?;
        let inner = UnixStream::connect_addr(&addr)
            .map_err(|e| Error::io("connect the private vhost-user socket", e))?;
        let mut private = Listener::from(private);
        daemon
            .start(&mut private)
            .map_err(|e| Error::Internal(format!("vhost-user daemon: {e}")))?;
        drop(private);
        let (vmm, mut journal) = match start {
            Start::Fresh(vmm) => {
                if let Some(c) = self.crash {
                    c.inflight.clear();
                }
                (vmm, relay::Journal::default())
            }
            Start::Recovered(r) => self.recover(&backend, &inner, *r).inspect_err(|e| {
                log::error!("crash restart: carrying on the device failed: {e}")
            })?,
            Start::Restored(r) => {
                let Restore { handover, serving } = *r;
                match self.restore(&backend, &inner, handover) {
                    Ok(x) => {
                        serving();
                        x
                    }
                    Err(e) => {
                        log::error!(
                            "live upgrade: carrying on the predecessor's device failed: {e}"
                        );
                        return Err(e);
                    }
                }
            }
        };
        if self.crash.is_some() {
            let upgrades = upgrades.clone();
            backend
                .requests
                .on_fuse_init(Box::new(move || upgrades.state_changed()));
        }
        self.checkpoint(&journal, &vmm, &backend);
        let handed = relay::run(
            &vmm,
            &inner,
            &mut journal,
            upgrades.wake.as_raw_fd(),
            |journal| {
                if upgrades.take_changed() {
                    self.checkpoint(journal, &vmm, &backend);
                }
                upgrades
                    .take()
                    .into_iter()
                    .any(|peer| self.hand_over(peer, journal, &vmm, &inner, &backend, upgrades))
            },
            |m| {
                // The VMM stops a ring (a guest reset, the VM stopping) and then takes the guest's
                // buffers back: no request taken before may write them after the reply. So the stop
                // waits until every request taken is answered (bounded: a hung backend is waited
                // for STOP_DRAIN at most; its late reply then stays out of the ring).
                if m.request == relay::GET_VRING_BASE {
                    if !backend.requests.pause(STOP_DRAIN) {
                        log::warn!(
                            "virtio-fs: a ring stops with requests still running after \
                             {STOP_DRAIN:?}; their replies will stay out of it"
                        );
                    }
                    if let Some((ring, _)) = m.ring_state() {
                        backend.requests.ring_stopped(ring as usize);
                    }
                }
            },
            |journal, m| {
                if m.request == relay::GET_VRING_BASE {
                    backend.requests.resume(|| journal.kick_all());
                }
                if let (Some(c), relay::SET_VRING_BASE) = (self.crash, m.request) {
                    if let Some((ring, base)) = m.ring_state() {
                        c.inflight.reset(ring as usize, Some(base as u16));
                    }
                }
                self.checkpoint(journal, &vmm, &backend);
            },
        );
        backend.close();
        drop(inner);
        for worker in daemon.get_epoll_handlers() {
            worker.send_exit_event();
        }
        let ended = daemon.wait();
        if !matches!(handed, Ok(relay::End::HandedOver)) {
            // The crash-restart keeper holds a copy of the connection: shut it down, so the VMM
            // hears the end now (a copy of a closed descriptor would keep it open).
            let _ = vmm.shutdown(std::net::Shutdown::Both);
        }
        match handed {
            Ok(relay::End::HandedOver) => {
                log::info!("virtio-fs: the device now belongs to the new daemon");
                return Ok(true);
            }
            Ok(relay::End::Disconnected) => log::info!("virtio-fs: VMM disconnected"),
            Err(e) => log::warn!("virtio-fs: connection ended: {e}"),
        }
        match ended {
            Ok(())
            | Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => {}
            Err(e) => log::warn!("virtio-fs: the backend ended: {e}"),
        }
        // The next guest starts from FUSE_INIT again; reset the Vfs session (mounts stay).
        fuse_backend_rs::api::filesystem::FileSystem::destroy(&*vfs);
        Ok(false)
    }

    /// The state to hand over: filesystems and device as they are now, with each passthrough share's
    /// table among the descriptors. `checkpoint`: for the crash-restart keeper, which also takes a
    /// device whose guest has not sent FUSE_INIT yet (an empty session), and the filesystems as of
    /// the last mount or unmount (without waiting on a mount in progress).
    fn export(
        &self,
        journal: &relay::Journal,
        vmm: &UnixStream,
        backend: &VirtioFsBackend,
        checkpoint: bool,
    ) -> Result<(Vec<u8>, Vec<std::fs::File>)> {
        let fuse = match backend.requests.fuse_session() {
            Some(f) => f,
            None if checkpoint => state::FuseSession::default(),
            None => {
                return Err(Error::Invalid(
                    "the guest has not initialised its FUSE session yet; try again".into(),
                ))
            }
        };
        let (pseudo_dirs, mut mounts) = if checkpoint {
            self.daemon.saved_filesystems()?
        } else {
            self.daemon.export(true)?
        };
        let (mut device, mut files) = journal
            .export(
                vmm,
                self.listener.as_raw_fd(),
                self.sock,
                1 + self.opts.request_queues.max(1),
            )
            .map_err(|e| Error::io("export the device", e))?;
        device.request_queues = self.opts.request_queues as u32;
        device.dax_window = self.opts.dax_window_size;
        if let Some(window) = backend.requests.dax() {
            device.dax_mappings = window
                .live()
                .into_iter()
                .map(|(offset, len)| state::DaxMapping { offset, len })
                .collect();
        }
        self.daemon.attach_share_tables(&mut mounts, &mut files)?;
        let bytes = self.encode(fuse, pseudo_dirs, mounts, Some(device))?;
        Ok((bytes, files))
    }

    /// This daemon's state as a successor reads it.
    fn encode(
        &self,
        fuse: state::FuseSession,
        pseudo_dirs: Vec<state::PseudoDir>,
        mounts: Vec<state::Mount>,
        device: Option<state::Device>,
    ) -> Result<Vec<u8>> {
        State {
            version: state::VERSION,
            front_end: "virtiofs".into(),
            daemon_id: self.daemon.id.clone(),
            fuse,
            pseudo_dirs,
            mounts,
            device,
        }
        .encode()
    }

    /// Send the keeper the state as it is now (crash restart).
    fn checkpoint(&self, journal: &relay::Journal, vmm: &UnixStream, backend: &VirtioFsBackend) {
        if self.crash.is_some() {
            self.save_checkpoint(self.export(journal, vmm, backend, true));
        }
    }

    /// Send the keeper the filesystems only (no VMM connected).
    fn checkpoint_mounts(&self) {
        if self.crash.is_some() {
            let state = self
                .daemon
                .saved_filesystems()
                .and_then(|(dirs, mut mounts)| {
                    let mut files = Vec::new();
                    self.daemon.attach_share_tables(&mut mounts, &mut files)?;
                    let bytes = self.encode(state::FuseSession::default(), dirs, mounts, None)?;
                    Ok((bytes, files))
                });
            self.save_checkpoint(state);
        }
    }

    fn save_checkpoint(&self, state: Result<(Vec<u8>, Vec<std::fs::File>)>) {
        let Some(c) = self.crash else { return };
        match state {
            Ok((bytes, files)) => {
                let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
                c.checkpoints.save(&bytes, &fds);
            }
            Err(e) => log::error!("crash restart: cannot export the state: {e}"),
        }
    }

    /// The running daemon's side of [`upgrade`]; true once it committed the hand-over (from then on
    /// the new process serves the connection, or nobody does: never both).
    fn hand_over(
        &self,
        peer: UnixStream,
        journal: &mut relay::Journal,
        vmm: &UnixStream,
        inner: &UnixStream,
        backend: &VirtioFsBackend,
        upgrades: &Upgrades,
    ) -> bool {
        log::info!("live upgrade: a new daemon asks for the device");
        // The new process mounts the filesystems before it says yes; this daemon serves meanwhile.
        let offered = upgrade::prepare(&peer).and_then(|()| {
            let (bytes, _) = self.export(journal, vmm, backend, false)?;
            upgrade::send(&peer, upgrade::STATE, &bytes, &[])?;
            upgrade::expect(&peer, upgrade::YES, upgrade::MOUNT_TIMEOUT)
        });
        if let Err(e) = offered {
            log::error!("live upgrade not done, still serving: {e}");
            upgrade::refuse(&peer, &e);
            return false;
        }
        let started = std::time::Instant::now();
        if !backend.requests.pause(upgrade::DRAIN_TIMEOUT) {
            backend.requests.resume(|| journal.kick_all());
            let e = Error::Invalid(format!(
                "requests in flight did not finish within {:?}",
                upgrade::DRAIN_TIMEOUT
            ));
            log::error!("live upgrade not done, still serving: {e}");
            upgrade::refuse(&peer, &e);
            return false;
        }
        let (stopped, result) = relay::stop_rings(inner, journal, &journal.started_rings());
        let ready = result
            .map_err(|e| Error::io("stop the rings", e))
            .and_then(|()| {
                let (bytes, files) = self.export(journal, vmm, backend, false)?;
                let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
                upgrade::send(&peer, upgrade::STATE, &bytes, &fds)?;
                upgrade::expect(&peer, upgrade::READY, upgrade::STEP_TIMEOUT)?;
                // The device is the new process's from the commit on: a crash of this one must not
                // have the keeper start another daemon on it. Said before the commit (a hand-over
                // that fails after this sends a checkpoint again as it serves on).
                if self.crash.is_some_and(|c| !c.checkpoints.forget()) {
                    return Err(Error::Invalid(
                        "the crash-restart keeper cannot be told to let the device go".into(),
                    ));
                }
                if !upgrades.commit() {
                    return Err(Error::Invalid("the running daemon is stopping".into()));
                }
                Ok(())
            });
        match ready {
            Ok(_) => {
                // The new process starts the rings only on this word; once it is on its way this
                // daemon never serves again, even if it cannot be sent (then nobody serves: the new
                // process, if alive, exits without touching the rings).
                if let Err(e) = upgrade::send(&peer, upgrade::COMMIT, &[], &[]) {
                    log::error!("live upgrade: cannot send the commit ({e}); stopping anyway");
                }
                log::info!(
                    "live upgrade: handed over after {} ms without serving",
                    started.elapsed().as_millis()
                );
                true
            }
            Err(e) => {
                // The new process did not say it is ready: it has not started the rings.
                log::error!("live upgrade failed after the rings stopped ({e}); serving again");
                upgrade::refuse(&peer, &e);
                if let Err(e) = relay::restart_rings(inner, journal, &stopped) {
                    log::error!("live upgrade: cannot restart the rings: {e}");
                }
                backend.requests.resume(|| journal.kick_all());
                // The keeper may have been told to let the device go: it is ours again.
                self.checkpoint(journal, vmm, backend);
                false
            }
        }
    }

    /// Set the fresh backend up as the device in `state` was, with the rings not started (see
    /// [`relay::Journal::replay_stopped`]); `bases` overrides the rings' next avail indexes.
    fn replay(
        &self,
        backend: &VirtioFsBackend,
        inner: &UnixStream,
        state: &State,
        files: &mut [Option<std::fs::File>],
        bases: impl Fn(usize) -> Option<u16>,
    ) -> Result<(UnixStream, relay::Journal)> {
        let device = state
            .device
            .as_ref()
            .ok_or_else(|| Error::Invalid("the state has no device".into()))?;
        let vmm: UnixStream = files
            .get_mut(device.connection_fd as usize)
            .and_then(Option::take)
            .map(std::os::fd::OwnedFd::from)
            .ok_or_else(|| Error::Invalid("no VMM connection in the state".into()))?
            .into();
        let mut journal = relay::Journal::import(device, files)
            .map_err(|e| Error::io("the device's descriptors", e))?;
        for ring in 0..device.vrings.len() {
            if let Some(base) = bases(ring) {
                journal.set_base(ring as u32, base.into());
            }
        }
        // A guest that has not sent FUSE_INIT yet (a checkpoint taken before it) sends it later.
        if state.fuse.major != 0 {
            backend.requests.set_fuse_session(state.fuse);
        }
        backend.resync_used_rings();
        journal
            .replay_stopped(inner)
            .map_err(|e| Error::io("set the backend up", e))?;
        if !device.dax_mappings.is_empty() {
            let live: Vec<(u64, u64)> = device
                .dax_mappings
                .iter()
                .map(|m| (m.offset, m.len))
                .collect();
            backend
                .requests
                .dax()
                .ok_or_else(|| Error::Invalid("DAX mappings but no DAX window".into()))?
                .adopt(&live)
                .map_err(|e| Error::io("the DAX window's live mappings", e))?;
        }
        Ok((vmm, journal))
    }

    /// The new process's side of a live upgrade: set the fresh backend up as the predecessor's was
    /// with the rings not started, say ready, and start them only once the predecessor committed.
    fn restore(
        &self,
        backend: &VirtioFsBackend,
        inner: &UnixStream,
        mut handover: upgrade::Handover,
    ) -> Result<(UnixStream, relay::Journal)> {
        let prepared = self.replay(backend, inner, &handover.state, &mut handover.files, |_| {
            None
        });
        let (vmm, journal) =
            prepared.inspect_err(|e| handover.refuse(&Error::Internal(e.to_string())))?;
        // The predecessor drained its rings: nothing is in flight, each continues at its base.
        if let Some(c) = self.crash {
            c.inflight.clear();
            c.inflight.set_session(&handover.state.fuse);
            for (ring, base) in journal.bases() {
                c.inflight.reset(ring, Some(base));
            }
        }
        // Without the commit the rings stay the predecessor's: this process exits untouched.
        handover.ready()?;
        journal
            .start(inner)
            .map_err(|e| Error::io("start the rings", e))?;
        Ok((vmm, journal))
    }

    /// A daemon restarted after a crash: carry on the device of the keeper's last checkpoint. Each
    /// ring continues where the inflight log says the dead daemon stopped taking requests; the ones it
    /// took and did not answer are answered again at the ring's first event
    /// ([`VirtioFsBackend::resync`]).
    fn recover(
        &self,
        backend: &VirtioFsBackend,
        inner: &UnixStream,
        mut recovery: Recovery,
    ) -> Result<(UnixStream, relay::Journal)> {
        let inflight = self
            .crash
            .map(|c| c.inflight.clone())
            .ok_or_else(|| Error::Internal("crash recovery without an inflight log".into()))?;
        backend.recovering.store(true, Ordering::SeqCst);
        let (vmm, journal) = self.replay(
            backend,
            inner,
            &recovery.state,
            &mut recovery.files,
            |ring| inflight.next_avail(ring),
        )?;
        journal
            .start(inner)
            .map_err(|e| Error::io("start the rings", e))?;
        journal.call_all();
        log::warn!("crash restart: carrying on the device of the daemon that died");
        Ok((vmm, journal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The library's ring masks are 64 bits with the hiprio ring in bit 0: a 64th request ring would
    /// shift past the mask.
    #[test]
    fn the_largest_device_fits_the_ring_masks() {
        let vfs = Arc::new(Vfs::new(fuse_backend_rs::api::VfsOptions::default()));
        let largest =
            VirtioFsBackend::new(vfs.clone(), Arc::default(), MAX_REQUEST_QUEUES, 1, 0, None)
                .unwrap();
        let masks = largest.queues_per_thread();
        assert_eq!(masks.len(), MAX_RINGS);
        assert_eq!(masks.last(), Some(&(1u64 << 63)));
        let err = VirtioFsBackend::new(vfs, Arc::default(), MAX_REQUEST_QUEUES + 1, 1, 0, None)
            .err()
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    /// A daemon stopping on a signal and a hand-over committing decide once: stopping first, the
    /// hand-over does not commit; committed first, the stopping daemon learns the sockets are no longer
    /// its own.
    #[test]
    fn stopping_and_committing_exclude_each_other() {
        let u = Upgrades::new().unwrap();
        assert!(!u.stopping(), "nothing committed");
        assert!(!u.commit(), "a stopping daemon does not commit");
        let u = Upgrades::new().unwrap();
        assert!(u.commit());
        assert!(u.stopping(), "committed before the stop");
    }
}
