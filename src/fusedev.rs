//! The host FUSE front end: mount a `Vfs` through /dev/fuse (or take over the connection of a
//! predecessor daemon, see [`crate::takeover`]), serve it from worker threads, answer the admin API's
//! control requests (sendfd, takeover, start) on the main thread, and end on SIGTERM/SIGINT, on
//! `PUT /daemon/exit` or when someone else unmounts.
//!
//! The daemon never unmounts itself (the sandbox forbids it): it tells the sandbox supervisor process
//! whether to ([`MountFate`]), which then calls [`unmount_fuse`]; a mount whose connection the snapshotter's supervisor also holds
//! survives the daemon's crash and an upgrade's exit.

use std::ffi::CString;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{FsOptions, InHeader, InitIn, InitIn2, OutHeader};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::Vfs;
use fuse_backend_rs::transport::FuseSession;
use vm_memory::ByteValued;

mod channel;
mod splice;
mod worker;

use crate::cold_slots::ColdSlots;
use crate::daemon::{Control, Daemon, DaemonState};
use crate::error::{Error, Result};
use crate::signals::wait_for_signal;
use crate::takeover::state::{self, State};
use crate::takeover::{supervisor, Fate, MountFate};

const FUSE_INIT: u32 = 26;
const FUSE_READ: u32 = 15;
/// INIT flag: the request carries a second flags word (flags2, the high 32 bits).
const FUSE_INIT_EXT: u32 = 1 << 30;
/// The kernel can queue again the requests a daemon read but never answered (Linux 6.9+).
const FUSE_HAS_RESEND: u64 = 1 << 39;
/// Notification code asking for that.
const FUSE_NOTIFY_RESEND: i32 = 7;
/// Set in the `unique` of a request the kernel sent again.
const FUSE_UNIQUE_RESEND: u64 = 1 << 63;

/// `--failover-policy`: what a daemon that takes over a FUSE connection does with the requests its
/// predecessor had read but not answered (their callers would otherwise wait forever).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailoverPolicy {
    /// Leave them.
    None,
    /// Have the kernel queue them again (FUSE_NOTIFY_RESEND, Linux 6.9+), so they are served.
    Resend,
    /// Fail them with EIO.
    Flush,
}

/// Default `--thread-num`. Each worker answers one request at a time and the kernel hands each request
/// to a free one, so requests finish out of order and one waiting on the network holds back only its own
/// worker. With the 4 MiB readahead below, one streaming reader keeps four 1 MiB reads in flight, all of
/// which may wait on a fetch; 16 leaves room for a few such readers while metadata requests and cached
/// reads still find a free worker. An idle worker costs a blocked thread and an untouched buffer.
pub const DEFAULT_THREADS: usize = 16;

/// Kernel readahead for the mount. FUSE starts at 128 KiB and FUSE_INIT can only lower it, which caps
/// sequential reads at one 128 KiB round trip each; a larger window keeps several 1 MiB requests in flight.
const READAHEAD_KB: u32 = 4096;

/// Raise the readahead of the mount's backing device info (best effort: sysfs may be read-only). The
/// device number comes from /proc/self/mountinfo: stat()ing our own mountpoint here would wait for a FUSE
/// reply that no worker is running yet to send.
fn raise_readahead(mountpoint: &Path, kb: u32) {
    let Ok(canonical) = mountpoint.canonicalize() else {
        return;
    };
    let want = canonical.to_string_lossy();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // Fields: id parent major:minor root mountpoint ...; the last mount at a path is the one on top.
    let Some(dev) = info
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(&*want))
        .and_then(|l| l.split(' ').nth(2))
    else {
        return;
    };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    // FUSE_INIT's reply lowers the window again, so repeat until the kernel has processed it.
    for _ in 0..40 {
        if let Err(e) = std::fs::write(&knob, kb.to_string()) {
            log::info!("cannot raise readahead through {knob}: {e}");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        if std::fs::read_to_string(&knob).is_ok_and(|v| v.trim() == kb.to_string()) {
            log::debug!("readahead of {} set to {kb} KiB", mountpoint.display());
            return;
        }
    }
}

/// How the FUSE daemon runs.
pub struct FuseOptions {
    pub mountpoint: PathBuf,
    pub threads: usize,
    pub failover_policy: FailoverPolicy,
    /// nydus-snapshotter's supervisor socket (`--supervisor`).
    pub supervisor: Option<PathBuf>,
    /// Mount nothing; wait in state INIT for a takeover (`--upgrade`, or a crashed predecessor).
    pub take_over: bool,
    /// No supervisor process unmounts: the daemon does it itself when it stops serving and the mount
    /// is not left for a successor (a daemon embedded in another program, [`crate::embed`]).
    pub unmount_on_exit: bool,
}

/// What the workers share with the main loop.
#[derive(Default)]
struct Shared {
    /// The session as FUSE_INIT set it up (seen by a worker, or taken over).
    init: Mutex<Option<state::FuseSession>>,
    /// `--failover-policy flush` after a takeover: requests the kernel sent again fail with EIO.
    flush_resent: AtomicBool,
    /// The /dev/fuse descriptor, for replies written outside the server.
    fd: AtomicI32,
    /// Set when the workers are to stop.
    stop: OnceLock<channel::Stop>,
    /// A READ reply was spliced (logged once).
    spliced: AtomicBool,
    /// What becomes of the requests waiting for a cold slot once the workers stop (see `crate::cold_slots`).
    parked_on_stop: AtomicU8,
}

impl Shared {
    fn kernel_resends(&self) -> bool {
        self.init
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|i| i.flags & FUSE_HAS_RESEND != 0)
    }
}

/// Record FUSE_INIT's parameters from a copy of the request's reader.
fn capture_init(mut r: fuse_backend_rs::transport::Reader<'_>, shared: &Shared) {
    let (Ok(_), Ok(init)) = (r.read_obj::<InHeader>(), r.read_obj::<InitIn>()) else {
        return;
    };
    let mut flags = u64::from(init.flags);
    if init.flags & FUSE_INIT_EXT != 0 {
        if let Ok(more) = r.read_obj::<InitIn2>() {
            flags |= u64::from(more.flags2) << 32;
        }
    }
    log::info!(
        "FUSE_INIT {}.{} flags {flags:#x}; the kernel {} resend pending requests",
        init.major,
        init.minor,
        if flags & FUSE_HAS_RESEND != 0 {
            "can"
        } else {
            "cannot"
        }
    );
    *shared.init.lock().unwrap_or_else(|e| e.into_inner()) = Some(state::FuseSession {
        major: init.major,
        minor: init.minor,
        max_readahead: init.max_readahead,
        flags,
    });
}

/// Write a message of our own (a notification or an error reply) to the FUSE device.
fn write_fuse(fd: RawFd, header: OutHeader) -> std::io::Result<()> {
    write_message(fd, header.as_slice())
}

/// Write one whole message (header included) to the FUSE device.
fn write_message(fd: RawFd, bytes: &[u8]) -> std::io::Result<()> {
    // SAFETY: writing a plain byte buffer to a descriptor the daemon keeps open.
    let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `--failover-policy flush`: fail a request the dead daemon had read with EIO.
fn flush(shared: &Shared, unique: u64) {
    let eio = OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -libc::EIO,
        unique,
    };
    match write_fuse(shared.fd.load(Ordering::Relaxed), eio) {
        Ok(()) => log::info!("request {unique:#x} failed with EIO (--failover-policy flush)"),
        Err(e) => log::warn!("flushing request {unique:#x}: {e}"),
    }
}

/// Why the main loop ended.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    Signal,
    Exit,
    Unmounted,
}

struct FuseDaemon<'a> {
    vfs: Arc<Vfs>,
    daemon: &'a Daemon,
    opts: FuseOptions,
    server: Arc<Server<Arc<Vfs>>>,
    shared: Arc<Shared>,
    inflight: Arc<crate::inflight::Inflight>,
    /// Never dropped: dropping unmounts, which is the sandbox supervisor's job.
    session: Option<ManuallyDrop<FuseSession>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    running: Arc<AtomicUsize>,
    fate: MountFate,
    /// The snapshotter's supervisor holds this connection too (sent, or taken over from it).
    handed_over: bool,
    /// A takeover that failed half way: the Vfs is no longer empty, so another one is refused.
    takeover_failed: Option<String>,
}

/// Serve `vfs` on the FUSE connection at `opts.mountpoint` until a shutdown signal, an exit request or
/// an external unmount.
///
/// `start` runs once the mount exists (or, when taking over, before waiting for the takeover) and
/// before any worker starts: the sandbox goes up there, with `true` when it should mount the command
/// line's image.
pub fn run(
    vfs: Arc<Vfs>,
    opts: FuseOptions,
    signals: &libc::sigset_t,
    daemon: &Daemon,
    fate: MountFate,
    start: impl FnOnce(bool) -> Result<()>,
) -> Result<()> {
    let controls = daemon.control_channel();
    let threads = opts.threads.max(1);
    if let Some(s) = &opts.supervisor {
        daemon.set_supervisor(s);
    }
    let take_over = opts.take_over;
    let mut d = FuseDaemon {
        server: Arc::new(Server::new(vfs.clone())),
        vfs,
        daemon,
        opts,
        shared: Arc::new(Shared::default()),
        inflight: Arc::new(crate::inflight::Inflight::new(threads)),
        session: None,
        workers: Vec::new(),
        running: Arc::new(AtomicUsize::new(0)),
        fate,
        handed_over: false,
        takeover_failed: None,
    };
    daemon.set_inflight(d.inflight.clone());
    if take_over {
        // The mount is the predecessor's: whatever happens to this daemon, it is not ours to remove.
        d.fate.tell(Fate::Keep);
        log::info!(
            "waiting in state INIT for PUT /api/v1/daemon/fuse/takeover (the FUSE connection of {} comes from the supervisor)",
            d.opts.mountpoint.display()
        );
        start(false)?;
    } else {
        d.mount()?;
        if let Err(e) = start(true) {
            d.fate.tell(Fate::Unmount);
            return Err(e);
        }
        d.daemon.set_state(DaemonState::Ready);
        d.start_service()?;
        let mp = d.opts.mountpoint.clone();
        let _ = std::thread::Builder::new()
            .name("readahead".into())
            .spawn(move || {
                // Have the kernel cache the root's attributes (for as long as we let it) while we
                // serve: after a crash, nydus-snapshotter stats the mountpoint before it starts a
                // successor, and a stat the kernel cannot answer from its cache would wait forever.
                if let Err(e) = std::fs::metadata(&mp) {
                    log::warn!("stat {}: {e}", mp.display());
                }
                raise_readahead(&mp, READAHEAD_KB)
            });
    }
    let ending = d.serve_controls(&controls, signals);
    d.finish(ending);
    Ok(())
}

impl FuseDaemon<'_> {
    fn mount(&mut self) -> Result<()> {
        let mp = &self.opts.mountpoint;
        let mut session = FuseSession::new(mp, "rafs", "", true)
            .map_err(|e| Error::Invalid(format!("FUSE mountpoint {}: {e}", mp.display())))?;
        session
            .mount()
            .map_err(|e| Error::Invalid(format!("mount FUSE at {}: {e}", mp.display())))?;
        log::info!("FUSE filesystem mounted at {}", mp.display());
        self.adopt_session(session);
        Ok(())
    }

    fn adopt_session(&mut self, session: FuseSession) {
        if let Some(f) = session.get_fuse_file() {
            self.shared.fd.store(f.as_raw_fd(), Ordering::SeqCst);
        }
        self.session = Some(ManuallyDrop::new(session));
    }

    /// Main loop: the API's control requests, shutdown signals, exit requests, an external unmount.
    fn serve_controls(
        &mut self,
        controls: &std::sync::mpsc::Receiver<(Control, std::sync::mpsc::Sender<Result<()>>)>,
        signals: &libc::sigset_t,
    ) -> Ending {
        loop {
            if let Ok((c, reply)) = controls.recv_timeout(Duration::from_millis(20)) {
                let r = match c {
                    Control::SendFd => self.send_fd(),
                    Control::Takeover => self.take_over(),
                    Control::Start => self.start_service(),
                };
                if let Err(e) = &r {
                    log::warn!("{c:?}: {e}");
                }
                let _ = reply.send(r);
            }
            if let Some(sig) = wait_for_signal(signals, Duration::ZERO) {
                log::info!("signal {sig}: stopping");
                return Ending::Signal;
            }
            if self.daemon.exit_requested() {
                log::info!("exit requested through the API");
                return Ending::Exit;
            }
            if !self.workers.is_empty() && self.running.load(Ordering::SeqCst) < self.workers.len()
            {
                log::info!("FUSE session ended (unmounted from outside)");
                return Ending::Unmounted;
            }
        }
    }

    /// Stop serving and tell the sandbox supervisor what becomes of the mount.
    fn finish(mut self, ending: Ending) {
        let state = self.served_state();
        let fate = match ending {
            // Nothing here is ours yet: the mount is the predecessor's, for the next takeover.
            _ if state == DaemonState::Init => Fate::Keep,
            // nydusd's exit never unmounts; unmounting is right only when nobody can take over.
            Ending::Exit if self.handed_over => Fate::Keep,
            _ => Fate::Unmount,
        };
        // A successor asks the kernel to resend what was read but not answered: no need to wait for
        // slow requests (a cold read from a slow backend) before handing over.
        let abandon = fate == Fate::Keep
            && self.opts.failover_policy == FailoverPolicy::Resend
            && self.shared.kernel_resends();
        let parked = if abandon {
            worker::OnStop::Leave
        } else if fate == Fate::Keep {
            worker::OnStop::Answer
        } else {
            worker::OnStop::Fail
        };
        self.shared
            .parked_on_stop
            .store(parked as u8, Ordering::SeqCst);
        if let Some(stop) = self.shared.stop.get() {
            if let Err(e) = stop.request() {
                log::warn!("waking FUSE workers: {e}");
            }
        }
        if abandon {
            log::info!("leaving unanswered requests to the successor (the kernel resends them)");
        } else {
            for w in self.workers.drain(..) {
                let _ = w.join();
            }
        }
        self.fate.tell(fate);
        log::info!(
            "FUSE workers stopped; the mount at {} is {}",
            self.opts.mountpoint.display(),
            match fate {
                Fate::Keep => "left for a successor",
                _ if self.opts.unmount_on_exit => "unmounted",
                _ => "unmounted by the supervisor process",
            }
        );
        if fate != Fate::Keep && self.opts.unmount_on_exit {
            // Dropping the session unmounts and closes the connection.
            if let Some(session) = self.session.take() {
                drop(ManuallyDrop::into_inner(session));
            }
        }
    }

    /// How far the daemon got (the reported state is STOPPED once exit was requested).
    fn served_state(&self) -> DaemonState {
        if self.session.is_none() {
            DaemonState::Init
        } else if self.workers.is_empty() {
            DaemonState::Ready
        } else {
            DaemonState::Running
        }
    }

    fn supervisor(&self) -> Result<PathBuf> {
        self.opts
            .supervisor
            .clone()
            .ok_or_else(|| Error::Invalid("the daemon was started without --supervisor".into()))
    }

    /// The parameters of FUSE_INIT, which the kernel sends as the first request after the mount.
    fn fuse_init(&self) -> Result<state::FuseSession> {
        for _ in 0..200 {
            if let Some(i) = *self.shared.init.lock().unwrap_or_else(|e| e.into_inner()) {
                return Ok(i);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(Error::Invalid(
            "the kernel has not sent FUSE_INIT yet; nothing to hand over".into(),
        ))
    }

    /// PUT /daemon/fuse/sendfd.
    fn send_fd(&mut self) -> Result<()> {
        let sock = self.supervisor()?;
        let sent = (|| {
            let session = self.session.as_ref().ok_or_else(|| {
                Error::Invalid("no FUSE connection yet (state INIT): take over first".into())
            })?;
            let file = session
                .get_fuse_file()
                .ok_or_else(|| Error::Invalid("the FUSE session has no device file".into()))?;
            let (pseudo_dirs, mounts) = self.daemon.export(false)?;
            let bytes = State {
                version: state::VERSION,
                front_end: "fusedev".into(),
                daemon_id: self.daemon.id.clone(),
                fuse: self.fuse_init()?,
                pseudo_dirs,
                mounts,
                device: None,
            }
            .encode()?;
            supervisor::send(&sock, &bytes, file.as_fd())?;
            Ok::<usize, Error>(bytes.len())
        })();
        match sent {
            Ok(n) => {
                log::info!(
                    "sent the state ({n} bytes) and the FUSE connection to {}",
                    sock.display()
                );
                self.handed_over = true;
                self.fate.tell(Fate::HeldElsewhere);
                Ok(())
            }
            Err(e) => {
                // The supervisor waits for a connection before it looks at our answer.
                supervisor::hang_up(&sock);
                Err(e)
            }
        }
    }

    /// PUT /daemon/fuse/takeover.
    fn take_over(&mut self) -> Result<()> {
        let now = self.daemon.state();
        if now != DaemonState::Init || self.session.is_some() {
            return Err(Error::Invalid(format!(
                "takeover is only valid in state INIT; the daemon is {}",
                now.as_str()
            )));
        }
        if let Some(why) = &self.takeover_failed {
            return Err(Error::Invalid(format!(
                "an earlier takeover failed half way ({why}); start a new daemon"
            )));
        }
        let sock = self.supervisor()?;
        let (bytes, file) = supervisor::receive(&sock)?;
        let taken = State::decode(&bytes, "fusedev").and_then(|state| {
            check_fuse_device(&file)?;
            // A FUSE daemon's state never carries a share's table (see `send_fd`).
            if state
                .mounts
                .iter()
                .any(|m| m.share_table.is_some() || m.fs_type == "passthrough_fs")
            {
                return Err(Error::Unsupported(
                    "passthrough shares cannot be taken over".into(),
                ));
            }
            Ok(state)
        })?;
        let restored = self
            .daemon
            .restore(&taken.pseudo_dirs, &taken.mounts, None)
            .and_then(|()| {
                self.vfs
                    .init(FsOptions::from_bits_truncate(taken.fuse.flags))
                    .map(|_| ())
                    .map_err(|e| Error::io("initialize the taken-over session", e))
            });
        if let Err(e) = restored {
            self.takeover_failed = Some(e.to_string());
            return Err(e);
        }
        *self.shared.init.lock().unwrap_or_else(|e| e.into_inner()) = Some(taken.fuse);
        // The mountpoint is not looked at (stat would wait on the connection nobody serves yet); the
        // session only carries the device file.
        let mut session = FuseSession::new(Path::new("/"), "rafs", "", true)
            .map_err(|e| Error::Internal(format!("FUSE session: {e}")))?;
        session.set_fuse_file(file);
        self.adopt_session(session);
        self.handed_over = true;
        self.fate.tell(Fate::HeldElsewhere);
        log::info!(
            "took over the FUSE connection of {} with {} mounts ({} bytes of state)",
            self.opts.mountpoint.display(),
            taken.mounts.len(),
            bytes.len()
        );
        self.daemon.set_state(DaemonState::Ready);
        Ok(())
    }

    /// PUT /daemon/start (and the end of a fresh start): serve.
    fn start_service(&mut self) -> Result<()> {
        let now = self.daemon.state();
        if now != DaemonState::Ready {
            return Err(Error::Invalid(format!(
                "start is only valid in state READY; the daemon is {}",
                now.as_str()
            )));
        }
        if self.handed_over && self.workers.is_empty() {
            self.recover_pending_requests();
        }
        self.spawn_workers()?;
        self.daemon.set_state(DaemonState::Running);
        Ok(())
    }

    /// After a takeover, before serving: apply `--failover-policy` to the requests the predecessor read
    /// but never answered. Only the kernel can find them (FUSE_NOTIFY_RESEND, Linux 6.9+); without it
    /// they stay blocked until the mount goes away.
    fn recover_pending_requests(&self) {
        let policy = self.opts.failover_policy;
        if policy == FailoverPolicy::None {
            return;
        }
        if !self.shared.kernel_resends() {
            log::warn!(
                "--failover-policy {policy:?}: this kernel cannot resend pending FUSE requests (FUSE_NOTIFY_RESEND needs Linux 6.9); requests the previous daemon read but did not answer stay blocked until the mount is gone"
            );
            return;
        }
        self.shared
            .flush_resent
            .store(policy == FailoverPolicy::Flush, Ordering::SeqCst);
        let notify = OutHeader {
            len: std::mem::size_of::<OutHeader>() as u32,
            error: FUSE_NOTIFY_RESEND,
            unique: 0,
        };
        match write_fuse(self.shared.fd.load(Ordering::SeqCst), notify) {
            Ok(()) => log::info!(
                "asked the kernel to resend pending requests ({})",
                if policy == FailoverPolicy::Flush {
                    "they fail with EIO"
                } else {
                    "they are served again"
                }
            ),
            Err(e) => log::warn!("FUSE_NOTIFY_RESEND: {e}"),
        }
    }

    fn spawn_workers(&mut self) -> Result<()> {
        let session = self
            .session
            .as_ref()
            .ok_or_else(|| Error::Invalid("no FUSE connection to serve".into()))?;
        let dev = session
            .get_fuse_file()
            .ok_or_else(|| Error::Invalid("the FUSE session has no device file".into()))?;
        if self.shared.stop.get().is_none() {
            let stop = channel::Stop::new().map_err(|e| Error::io("FUSE stop event", e))?;
            let _ = self.shared.stop.set(stop);
        }
        let stop = self.shared.stop.get().expect("set above");
        // Each channel is a dup of the one device file: all workers share the kernel's queues, and a
        // request a dead worker had read stays on the file the supervisor holds.
        let channels = (0..self.opts.threads.max(1))
            .map(|_| channel::Channel::new(dev, stop))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Error::io("FUSE channel", e))?;
        let cold_slots = Arc::new(ColdSlots::new(channels.len()));
        for (i, channel) in channels.into_iter().enumerate() {
            let w = worker::Worker {
                index: i,
                server: self.server.clone(),
                vfs: self.vfs.clone(),
                shared: self.shared.clone(),
                inflight: self.inflight.clone(),
                rafs_index: self.daemon.rafs_index(),
                cold_slots: cold_slots.clone(),
                reply_pipe: None,
            };
            let running = self.running.clone();
            running.fetch_add(1, Ordering::SeqCst);
            let worker = std::thread::Builder::new()
                .name(format!("fuse-{i}"))
                .spawn(move || {
                    w.run(channel);
                    running.fetch_sub(1, Ordering::SeqCst);
                });
            self.workers
                .push(worker.map_err(|e| Error::io("start FUSE worker", e))?);
        }
        Ok(())
    }
}

/// The descriptor a supervisor hands over must be a /dev/fuse connection (character device 10:229).
fn check_fuse_device(file: &std::fs::File) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = file
        .metadata()
        .map_err(|e| Error::io("stat the received descriptor", e))?;
    let rdev = meta.rdev();
    if !meta.file_type().is_char_device() || (libc::major(rdev), libc::minor(rdev)) != (10, 229) {
        return Err(Error::Invalid(
            "the supervisor's descriptor is not a /dev/fuse connection".into(),
        ));
    }
    Ok(())
}

/// Was the last daemon at `mountpoint` killed? Our FUSE mount is still there while nothing answers on
/// the API socket (nydusd's test for a crash, which makes a restarted daemon wait for a takeover).
/// The mountpoint itself is never stat'ed: that would wait on the connection nobody serves.
pub fn predecessor_crashed(mountpoint: &Path, apisock: &Path) -> bool {
    is_our_fuse_mount(&resolve_mountpoint(mountpoint))
        && std::os::unix::net::UnixStream::connect(apisock).is_err()
}

/// Is `mountpoint` a FUSE mount of ours (fstype fuse, source "rafs"), per /proc/self/mountinfo?
pub fn is_our_fuse_mount(mountpoint: &Path) -> bool {
    let want = mountpoint.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let Some(dash) = fields.iter().position(|f| *f == "-") else {
                return false;
            };
            fields.get(4) == Some(&&*want)
                && fields.get(dash + 1).is_some_and(|t| t.starts_with("fuse"))
                && fields.get(dash + 2) == Some(&"rafs")
        })
}

/// The absolute path of `mountpoint` as /proc/self/mountinfo shows it. Only the parent is resolved: a
/// stat of the mountpoint itself waits on its FUSE connection, which nobody may be serving any more
/// (the snapshotter's supervisor can keep it open across daemons).
pub fn resolve_mountpoint(mountpoint: &Path) -> PathBuf {
    let (Some(parent), Some(name)) = (mountpoint.parent(), mountpoint.file_name()) else {
        return mountpoint.to_path_buf();
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    parent
        .canonicalize()
        .map(|p| p.join(name))
        .unwrap_or(mountpoint.to_path_buf())
}

/// Lazily unmount our FUSE mount at `mountpoint` if it is still there (the supervisor's cleanup: the
/// sandboxed daemon may not unmount).
pub fn unmount_fuse(mountpoint: &Path) {
    let mp = resolve_mountpoint(mountpoint);
    if !is_our_fuse_mount(&mp) {
        return;
    }
    if let Ok(c) = CString::new(mp.as_os_str().as_bytes()) {
        // SAFETY: valid C string.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            log::info!("supervisor: unmounted {}", mp.display());
        } else {
            log::warn!(
                "supervisor: unmount {}: {}",
                mp.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}
