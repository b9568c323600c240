//! The virtio-fs device: a vhost-user backend that feeds FUSE requests from the guest's virtqueues to a
//! fuse-backend-rs `Server` over the daemon's `Vfs` (where each image is a pseudo mount).
//!
//! Queue 0 is the hiprio queue (FORGET, INTERRUPT), queues 1.. carry requests; each queue has its own
//! thread. The hiprio queue's thread answers its requests itself, in order (they are cheap and the guest
//! expects FORGETs in the order sent). A request queue's thread only takes requests off the ring and hands
//! them to the queue's [`WorkerPool`] (`--thread-pool-size` workers, started as needed): a request waiting
//! on the network then holds back nobody, and each request goes into the used ring when it is done, in any
//! order (virtio allows that; the guest matches replies by descriptor). At most pool-size requests of a
//! queue are in flight: then the queue thread stops taking requests, so the guest's ring fills up and the
//! guest waits, until a worker finishes and wakes the queue thread through its resume event. With
//! `--thread-pool-size 0` request queues are answered like the hiprio queue, one at a time in order.
//!
//! A request that fails is answered (or dropped) by the server and logged; it never ends a thread. When
//! the VMM disconnects we listen again for the next one; requests still running then are not put in the
//! old connection's rings.
//!
//! With `--dax-window` the device also offers a DAX window (SHMEM, GET_SHMEM_CONFIG) and answers
//! SETUPMAPPING/REMOVEMAPPING through the backend request channel: see [`crate::dax`].

use std::io;
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::Vfs;
use fuse_backend_rs::transport::FsCacheReqHandler;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
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
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::dax::DaxWindow;
use crate::error::{Error, Result};
use crate::worker_pool::WorkerPool;

/// Descriptors per queue (QEMU asks for 128 by default; nydusd offers 1024).
pub const QUEUE_SIZE: usize = 1024;
/// hiprio + request queues offered; the VMM's `num-request-queues` must not exceed `QUEUES - 1`.
pub const DEFAULT_REQUEST_QUEUES: usize = 4;
/// Workers per request queue, which is also the cap on its requests in flight. Workers start only when
/// requests overlap, so an idle or one-request-at-a-time guest costs one thread per queue. 16 leaves room
/// for the reads a few streaming readers keep in flight (a Linux guest's readahead keeps one or two per
/// file) to wait on the network while metadata and cached reads still find a free worker; the cap bounds
/// memory to 16 replies (at most 1 MiB each, written straight into guest memory) plus the chunk buffers
/// of 16 reads per queue.
pub const DEFAULT_POOL_SIZE: usize = 16;

type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;
type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>;
/// A request handed to a worker: its descriptor chain and the ring it goes back to.
type Job = (Chain, VringRwLock);

/// The pool size for `--thread-pool-size`: absent means [`DEFAULT_POOL_SIZE`]; 0 means no pool (each
/// queue answered in order by its own thread, as virtiofsd's 0 does). Kata passes `=1` to every
/// virtio-fs daemon by default, a virtiofsd tuning for local passthrough I/O; one worker would put every
/// request of the guest behind any chunk being fetched from a registry, which is what the pool is for,
/// so 1 also gets the default (0 still gives in-order service to whoever wants it).
pub fn pool_size(requested: Option<u32>) -> usize {
    match requested {
        None => DEFAULT_POOL_SIZE,
        Some(1) => {
            log::info!(
                "--thread-pool-size=1 (Kata's default for virtiofsd) means the default pool of \
                 {DEFAULT_POOL_SIZE} workers per request queue here, so that a request waiting on a \
                 backend does not hold back the others; --thread-pool-size=0 answers requests in order"
            );
            DEFAULT_POOL_SIZE
        }
        Some(n) => n as usize,
    }
}

/// What answering a request needs; shared by the queue threads and the workers of one connection.
struct Requests {
    server: Arc<Server<Arc<Vfs>>>,
    event_idx: AtomicBool,
    /// The DAX window once the backend channel is up.
    dax: RwLock<Option<Arc<DaxWindow>>>,
    /// False once the connection is over: requests finishing later stay out of its rings.
    live: RwLock<bool>,
}

impl Requests {
    /// One FUSE request; returns the bytes written to the guest (0 when no reply could be built).
    fn handle_chain(&self, chain: Chain) -> u32 {
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
        // Without a window SETUPMAPPING/REMOVEMAPPING get EINVAL from the server.
        let window = self.dax.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(w) = &window {
            // A new FUSE session starts with an empty window (header peeked through a copy of the reader).
            let init = reader.clone().read_obj::<InHeader>();
            if init.is_ok_and(|h| h.opcode == Opcode::Init as u32) {
                w.reset();
            }
        }
        let mut dax = window.as_ref().map(DaxWindow::requests);
        let dax = dax.as_mut().map(|d| d as &mut dyn FsCacheReqHandler);
        match self.server.handle_message(reader, writer.into(), dax, None) {
            Ok(n) => n as u32,
            Err(e) => {
                log::warn!("virtio-fs: request failed: {e}");
                0
            }
        }
    }

    /// A worker's request: answer it, put it in the used ring, interrupt the guest if it wants that now.
    fn run(&self, (chain, vring): Job) {
        let head = chain.head_index();
        // A panic in the server must still give the descriptor back, or the guest waits for it forever.
        let len =
            catch_unwind(AssertUnwindSafe(|| self.handle_chain(chain))).unwrap_or_else(|_| {
                log::error!("virtio-fs: request handler panicked; returning the descriptor empty");
                0
            });
        if let Err(e) = self.complete(&vring, head, len) {
            log::warn!("virtio-fs: returning descriptor {head}: {e}");
        }
    }

    fn complete(&self, vring: &VringRwLock, head: u16, len: u32) -> io::Result<()> {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        if !*live {
            return Ok(());
        }
        // The ring lock is held just for the used entry and the notification check (a few stores and
        // loads), so workers finishing together do not queue up behind each other for long.
        // A ring stopped by GET_VRING_BASE still gets the entry: the VMM expects a stop to drain the
        // requests in flight (vhost-user-backend answers it without waiting for them, so they drain late);
        // a pause then resumes with every request answered.
        let notify = {
            let mut state = vring.get_mut();
            state.add_used(head, len).map_err(io::Error::other)?;
            // With EVENT_IDX each check covers the entries added since the previous one, whichever
            // worker added them, so an entry is never left without its interrupt.
            !self.event_idx.load(Ordering::Relaxed) || state.needs_notification().unwrap_or(true)
        };
        if notify {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

/// A request queue's workers, and the event its queue thread waits on after finding the pool full.
struct QueuePool {
    pool: WorkerPool<Job>,
    resume: EventConsumer,
}

pub struct VirtioFsBackend {
    requests: Arc<Requests>,
    mem: RwLock<Option<GuestMem>>,
    queues: usize,
    /// One exit event per queue thread, so the threads stop when a connection ends.
    exits: Vec<(EventConsumer, EventNotifier)>,
    /// Per queue: its worker pool (request queues, unless the pool size is 0).
    pools: Vec<Option<QueuePool>>,
    backend_req: Mutex<Option<Backend>>,
    /// DAX window size in bytes (0: no window).
    dax_window_size: u64,
}

impl VirtioFsBackend {
    pub fn new(
        vfs: Arc<Vfs>,
        request_queues: usize,
        pool_size: usize,
        dax_window_size: u64,
    ) -> io::Result<Self> {
        let queues = 1 + request_queues.max(1);
        let exits = (0..queues)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        let requests = Arc::new(Requests {
            server: Arc::new(Server::new(vfs)),
            event_idx: AtomicBool::new(false),
            dax: RwLock::new(None),
            live: RwLock::new(true),
        });
        let mut pools = Vec::with_capacity(queues);
        for q in 0..queues {
            if q == 0 || pool_size == 0 {
                pools.push(None);
                continue;
            }
            let (resume, wake) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
            let r = requests.clone();
            let pool = WorkerPool::new(
                format!("vq{q}-worker"),
                pool_size,
                Box::new(move |job| r.run(job)),
                Box::new(move || {
                    if let Err(e) = wake.notify() {
                        log::error!("virtio-fs: cannot wake queue {q}'s thread: {e}");
                    }
                }),
            )?;
            pools.push(Some(QueuePool { pool, resume }));
        }
        Ok(VirtioFsBackend {
            requests,
            mem: RwLock::new(None),
            queues,
            exits,
            pools,
            backend_req: Mutex::new(None),
            dax_window_size,
        })
    }

    /// The event (epoll data) of a queue's resume eventfd: past the queue and exit events.
    fn resume_event(&self) -> u16 {
        self.queues as u16 + 1
    }

    /// End of the connection: no more used entries or interrupts; idle workers exit.
    fn close(&self) {
        *self
            .requests
            .live
            .write()
            .unwrap_or_else(|e| e.into_inner()) = false;
        for qp in self.pools.iter().flatten() {
            qp.pool.close();
        }
    }

    fn memory(&self) -> io::Result<GuestMemoryLoadGuard<GuestMemoryMmap>> {
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

    /// Answer every available request on this thread, in order, then notify once.
    fn process_in_order(&self, vring: &VringRwLock) -> io::Result<()> {
        let mem = self.memory()?;
        let event_idx = self.requests.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let chains: Vec<_> = vring
                .get_mut()
                .get_queue_mut()
                .iter(mem.clone())
                .map_err(io::Error::other)?
                .collect();
            for chain in chains {
                let head = chain.head_index();
                let used = self.requests.handle_chain(chain);
                vring.add_used(head, used).map_err(io::Error::other)?;
            }
            if !event_idx || vring.needs_notification().map_err(io::Error::other)? {
                vring.signal_used_queue()?;
            }
            // With EVENT_IDX, re-enable notifications and drain again if more arrived meanwhile.
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }

    /// Hand every available request to the pool, as long as it has room. The workers return them.
    fn dispatch(&self, vring: &VringRwLock, pool: &WorkerPool<Job>) -> io::Result<()> {
        {
            // The resume event does not go through the library's enabled check the kick goes through.
            let state = vring.get_ref();
            if !state.get_queue().ready() || !state.is_enabled() {
                return Ok(());
            }
        }
        let mem = self.memory()?;
        let event_idx = self.requests.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            loop {
                if !pool.has_room() {
                    // The ring keeps the rest (with EVENT_IDX the guest stops kicking, since we do not
                    // re-enable notifications); the next request to finish sends the resume event.
                    return Ok(());
                }
                // The ring lock is held for one pop only.
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else { break };
                pool.submit((chain, vring.clone()));
            }
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
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
        self.requests.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        if self.dax_window_size != 0 {
            *self.requests.dax.write().unwrap_or_else(|e| e.into_inner()) =
                Some(DaxWindow::new(self.dax_window_size, backend.clone()));
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
        let result = match self.pools.get(thread).and_then(Option::as_ref) {
            Some(qp) => {
                if device_event == self.resume_event() {
                    let _ = qp.resume.consume();
                }
                self.dispatch(vring, &qp.pool)
            }
            None => self.process_in_order(vring),
        };
        // Never return an error: that would end this queue's thread for good.
        if let Err(e) = result {
            log::error!("virtio-fs: queue {thread}: {e}");
        }
        Ok(())
    }
}

/// Serve `vfs` on the vhost-user socket `sock` until `stop` is set: one VMM connection at a time, each
/// with a fresh backend and vring workers.
///
/// The listening socket is bound once and kept for the daemon's life. (Re-binding it per connection, as
/// `VhostUserDaemon::serve` does, loses a VMM that reconnects right away: its connection lands in the old
/// listener's backlog and is reset when that listener closes, or finds no socket file at all.)
/// Bind the vhost-user socket (replacing a stale one). Done before the API reports RUNNING, because the
/// VMM connects as soon as it sees that state.
pub fn bind(sock: &Path) -> Result<Listener> {
    Listener::new(sock, true)
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

pub fn serve(
    vfs: Arc<Vfs>,
    mut listener: Listener,
    sock: &Path,
    opts: DeviceOptions,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let sock: PathBuf = sock.to_path_buf();
    while !stop.load(Ordering::Relaxed) {
        let backend = Arc::new(
            VirtioFsBackend::new(
                vfs.clone(),
                opts.request_queues,
                opts.pool_size,
                opts.dax_window_size,
            )
            .map_err(|e| Error::io("create virtio-fs backend", e))?,
        );
        let mut daemon = VhostUserDaemon::new(
            "rafsd-virtiofs".into(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| Error::Invalid(format!("vhost-user daemon: {e}")))?;
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
        log::info!("virtio-fs: waiting for a VMM on {}", sock.display());
        let result = daemon.start(&mut listener).and_then(|()| daemon.wait());
        backend.close();
        for worker in daemon.get_epoll_handlers() {
            worker.send_exit_event();
        }
        // The next guest starts from FUSE_INIT again; reset the Vfs session (mounts stay).
        fuse_backend_rs::api::filesystem::FileSystem::destroy(&*vfs);
        match result {
            Ok(())
            | Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => {
                log::info!("virtio-fs: VMM disconnected")
            }
            Err(e @ DaemonError::CreateBackendListener(_)) => {
                log::warn!("virtio-fs: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => log::warn!("virtio-fs: connection ended: {e}"),
        }
    }
    Ok(())
}
