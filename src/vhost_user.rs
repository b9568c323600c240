//! The virtio-fs device: a vhost-user backend that feeds FUSE requests from the guest's virtqueues to a
//! fuse-backend-rs `Server` over the daemon's `Vfs` (where each image is a pseudo mount).
//!
//! Queue 0 is the hiprio queue (FORGET, INTERRUPT), queues 1.. carry requests; each queue has its own
//! worker thread. A request that fails is answered (or dropped) by the server and logged; it never ends a
//! worker. When the VMM disconnects we listen again for the next one.
//!
//! With `--dax-window` the device also offers a DAX window (SHMEM, GET_SHMEM_CONFIG) and answers
//! SETUPMAPPING/REMOVEMAPPING through the backend request channel: see [`crate::dax`].

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
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
use virtio_queue::QueueOwnedT;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::dax::{Admission, DaxWindow};
use crate::error::{Error, Result};

/// Descriptors per queue (QEMU asks for 128 by default; nydusd offers 1024).
pub const QUEUE_SIZE: usize = 1024;
/// hiprio + request queues offered; the VMM's `num-request-queues` must not exceed `QUEUES - 1`.
pub const DEFAULT_REQUEST_QUEUES: usize = 4;

type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

pub struct VirtioFsBackend {
    server: Arc<Server<Arc<Vfs>>>,
    mem: RwLock<Option<GuestMem>>,
    event_idx: AtomicBool,
    queues: usize,
    /// One exit event per worker thread, so the workers stop when a connection ends.
    exits: Vec<(EventConsumer, EventNotifier)>,
    backend_req: Mutex<Option<Backend>>,
    /// DAX window size in bytes (0: no window), and the window once the backend channel is up.
    dax_window_size: u64,
    dax: RwLock<Option<Arc<DaxWindow>>>,
}

impl VirtioFsBackend {
    pub fn new(vfs: Arc<Vfs>, request_queues: usize, dax_window_size: u64) -> io::Result<Self> {
        let queues = 1 + request_queues.max(1);
        let exits = (0..queues)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(VirtioFsBackend {
            server: Arc::new(Server::new(vfs)),
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            queues,
            exits,
            backend_req: Mutex::new(None),
            dax_window_size,
            dax: RwLock::new(None),
        })
    }

    fn process_queue(&self, vring: &VringRwLock) -> io::Result<()> {
        let mem = self
            .mem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .ok_or_else(|| {
                io::Error::other("virtqueue kicked before the guest memory table was set")
            })?
            .memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
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
                let used = self.handle_chain(chain);
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

    /// One FUSE request; returns the bytes written to the guest (0 when no reply could be built).
    fn handle_chain(
        &self,
        chain: virtio_queue::DescriptorChain<vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap>>,
    ) -> u32 {
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
        let window = self.dax.read().unwrap_or_else(|e| e.into_inner()).clone();
        handle_request(&self.server, reader, writer, window.as_ref())
    }
}

/// Opcodes below fuse-backend-rs's `MaxOpcode` (50) that name no request. The server's trace line turns
/// every opcode into its `Opcode` enum by transmute, and these are not variants of it: undefined
/// behaviour (a crash, in practice) whenever trace logging is on. The device answers them itself.
const NO_REQUEST_OPCODES: [u32; 3] = [0, 7, 19];

/// One FUSE request from the guest, as the device handles it: an opcode the server must not see is
/// answered ENOSYS here; the DAX window screens the request (a SETUPMAPPING it cannot take is refused
/// before any filesystem fetches the range; FUSE_INIT starts a new session with an empty window); then
/// the server dispatches it to the `Vfs`. Returns the bytes written for the guest (0: no reply). Public
/// so the fuzz target (tests/fuzz) feeds requests through exactly this path.
pub fn handle_request<S: BitmapSlice>(
    server: &Server<Arc<Vfs>>,
    reader: Reader<'_, S>,
    writer: VirtioFsWriter<'_, S>,
    window: Option<&Arc<DaxWindow>>,
) -> u32 {
    if let Ok(header) = reader.clone().read_obj::<InHeader>() {
        if NO_REQUEST_OPCODES.contains(&header.opcode) {
            return reply_error(writer, header.unique, libc::ENOSYS);
        }
    }
    // Without a window SETUPMAPPING/REMOVEMAPPING get EINVAL from the server; so does a SETUPMAPPING
    // the window refuses.
    let mut window = window;
    match window.map(|w| w.admit(&reader)) {
        Some(Admission::NewSession) => window.map_or((), |w| w.reset()),
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

/// A reply carrying only `-errno`, as the server writes it.
fn reply_error<S: BitmapSlice>(mut writer: VirtioFsWriter<'_, S>, unique: u64, errno: i32) -> u32 {
    let out = OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    };
    match writer.write_all(out.as_slice()) {
        Ok(()) => out.len,
        Err(e) => {
            log::warn!("virtio-fs: cannot write a reply: {e}");
            0
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
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        if self.dax_window_size != 0 {
            *self.dax.write().unwrap_or_else(|e| e.into_inner()) =
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
        _thread: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            log::warn!("virtio-fs: unexpected event set {evset:?}");
            return Ok(());
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            log::warn!("virtio-fs: event for unknown queue {device_event}");
            return Ok(());
        };
        // Never return an error: that would end this worker thread for good.
        if let Err(e) = self.process_queue(vring) {
            log::error!("virtio-fs: queue processing: {e}");
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

pub fn serve(
    vfs: Arc<Vfs>,
    mut listener: Listener,
    sock: &Path,
    request_queues: usize,
    dax_window_size: u64,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let sock: PathBuf = sock.to_path_buf();
    while !stop.load(Ordering::Relaxed) {
        let backend = Arc::new(
            VirtioFsBackend::new(vfs.clone(), request_queues, dax_window_size)
                .map_err(|e| Error::io("create virtio-fs backend", e))?,
        );
        let mut daemon = VhostUserDaemon::new(
            "rafsd-virtiofs".into(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| Error::Invalid(format!("vhost-user daemon: {e}")))?;
        log::info!("virtio-fs: waiting for a VMM on {}", sock.display());
        let result = daemon.start(&mut listener).and_then(|()| daemon.wait());
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
