//! The virtio-fs device: a vhost-user backend that feeds FUSE requests from the guest's virtqueues to a
//! fuse-backend-rs `Server` over the daemon's `Vfs` (where each image is a pseudo mount).
//!
//! Queue 0 is the hiprio queue (FORGET, INTERRUPT), queues 1.. carry requests; each queue has its own
//! thread. The hiprio queue's thread answers its requests itself, in order (they are cheap, and the
//! guest expects FORGETs in the order sent). Each request queue also has a pool of `--thread-pool-size`
//! workers, so that a request waiting on the network holds back nobody and requests finish in any order;
//! [`queue`] says how the queue thread, the workers and a watcher share the work. With
//! `--thread-pool-size 0` request queues are answered like the hiprio queue, one at a time in order.
//!
//! A request that fails is answered (or dropped) by the server and logged; it never ends a thread. When
//! the VMM disconnects we listen again for the next one; requests still running then are not put in the
//! old connection's rings.
//!
//! With `--dax-window` the device also offers a DAX window (SHMEM, GET_SHMEM_CONFIG) and answers
//! SETUPMAPPING/REMOVEMAPPING through the backend request channel: see [`crate::dax`].

pub mod queue;

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use fuse_backend_rs::api::Vfs;
use vhost::vhost_user::message::{
    VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Backend, Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserBackend, VhostUserDaemon, VringRwLock};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::dax::DaxWindow;
use crate::error::{Error, Result};
pub use queue::handle_request;
use queue::{Memory, RequestQueue, Requests};

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
        let requests = Arc::new(Requests::new(vfs));
        let mut pools = Vec::with_capacity(queues);
        for q in 0..queues {
            if q == 0 || pool_size == 0 {
                pools.push(None);
                continue;
            }
            match RequestQueue::new(q, requests.clone(), pool_size) {
                Ok(rq) => pools.push(Some(rq)),
                Err(e) => {
                    // The queues made so far have threads of their own: stop them.
                    pools
                        .iter()
                        .flatten()
                        .for_each(|rq: &Arc<RequestQueue>| rq.close());
                    return Err(e);
                }
            }
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

    /// End of the connection: no more used entries or interrupts; watchers and idle workers exit.
    fn close(&self) {
        self.requests.close();
        for q in self.pools.iter().flatten() {
            q.close();
        }
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
        let result =
            self.memory().and_then(
                |mem| match self.pools.get(thread).and_then(Option::as_ref) {
                    Some(q) => {
                        if device_event == self.resume_event() {
                            let _ = q.resume.consume();
                        }
                        q.serve(vring, mem)
                    }
                    None => self.requests.process_in_order(vring, mem),
                },
            );
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
