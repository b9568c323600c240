//! Embedding a daemon in another Rust program, instead of spawning `rafsd fuse` or `rafsd virtiofs`.
//!
//! Three steps, each a value:
//! 1. [`Builder`]: the daemon's id, its mounts (RAFS images, blob views of RAFS v6 images, passthrough
//!    shares of host directories) and, optionally, the admin API socket;
//! 2. [`Service`] ([`Builder::build`]): the daemon with its mounts in place, not serving yet; more
//!    mounts can be added or removed through [`Service::daemon`] (as the admin API does);
//! 3. [`Running`] ([`Service::serve_fuse`] or [`Service::serve_virtiofs`]): the daemon serving on the
//!    host through /dev/fuse at a path, or as a vhost-user-fs device on a Unix socket for a VMM, until
//!    [`Running::shutdown`] (or drop), or until [`Running::wait`] sees `PUT /api/v1/daemon/exit`.
//!
//! Mounts sit at paths inside the daemon's share: with one mount only, `/` puts the image at the root
//! of the FUSE mount (or of the guest's share); with several, each gets its own path (`/image`,
//! `/share`), which may not nest in one another. A RAFS or blob-view mount takes the nydusd config JSON
//! the `rafsd` command line and the admin API take (see the README's "Configuration").
//!
//! What stays with the binary: the sandbox ([`crate::launch`]: namespaces, Landlock, capabilities,
//! seccomp), which would confine the whole embedding process; shutdown signals, which stay the
//! embedding program's business; live upgrade and failover (`--supervisor`, takeover). Serving over FUSE
//! needs what mounting FUSE needs (root, or CAP_SYS_ADMIN).
//!
//! ```no_run
//! use rafsd::embed::Builder;
//!
//! let config = r#"{"device": {"backend": {"type": "localfs", "config": {"dir": "/images/blobs"}}},
//!                  "mode": "direct"}"#;
//! let running = Builder::new()
//!     .id("app")
//!     .rafs("/", "/images/app/bootstrap", config)
//!     .api_socket("/run/app-rafs.sock")
//!     .build()?
//!     .serve_fuse("/mnt/app")?;
//! let motd = std::fs::read_to_string("/mnt/app/etc/motd");
//! running.shutdown()?; // unmounts /mnt/app, removes the API socket
//! # Ok::<(), rafsd::Error>(())
//! ```
//!
//! `tests/examples/embed.rs` (`cargo run --example embed`, run by `ci/test.sh`) serves a reference
//! image, a blob view and a share over FUSE and checks what it reads against the fixtures' manifest.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::daemon::{Daemon, DaemonState, FsType, MountCmd};
use crate::error::{Error, Result};
use crate::launch::VhostUserServer;

pub use crate::vhost_user::DeviceOptions;

/// How long [`Running::shutdown`] waits for a front end's threads before leaving them behind.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// What the daemon will serve; see the [module docs](self).
#[derive(Default)]
pub struct Builder {
    id: Option<String>,
    mounts: Vec<(String, MountCmd)>,
    api_socket: Option<PathBuf>,
    fuse_threads: Option<usize>,
}

impl Builder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The instance id reported by `GET /api/v1/daemon` (a mount's config may name its own).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// A RAFS v5/v6 image (a bootstrap, or a blob with inlined metadata) at `mountpoint`, its blobs
    /// found and cached as the nydusd `config` JSON says.
    pub fn rafs(self, mountpoint: &str, bootstrap: impl Into<PathBuf>, config: &str) -> Self {
        let cmd = MountCmd::new(FsType::Rafs, bootstrap.into(), config.into());
        self.mount(mountpoint, cmd)
    }

    /// The bootstrap and uncompressed blobs of a RAFS v6 image, as the guest's EROFS driver reads them
    /// (see [`crate::fs::blob_view`]); the same source and config as [`Builder::rafs`].
    pub fn blob_view(self, mountpoint: &str, bootstrap: impl Into<PathBuf>, config: &str) -> Self {
        let cmd = MountCmd::new(FsType::BlobView, bootstrap.into(), config.into());
        self.mount(mountpoint, cmd)
    }

    /// The host directory `dir`, read-write (what Kata shares as `/containers`).
    pub fn passthrough(self, mountpoint: &str, dir: impl Into<PathBuf>) -> Self {
        let cmd = MountCmd::new(FsType::Passthrough, dir.into(), String::new());
        self.mount(mountpoint, cmd)
    }

    /// Any mount request, as the admin API takes it (e.g. with files to prefetch).
    pub fn mount(mut self, mountpoint: &str, cmd: MountCmd) -> Self {
        self.mounts.push((mountpoint.to_string(), cmd));
        self
    }

    /// Serve the nydusd-compatible admin API on this Unix socket (replacing a stale one) while the
    /// daemon serves; removed again at shutdown.
    pub fn api_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.api_socket = Some(path.into());
        self
    }

    /// FUSE worker threads for [`Service::serve_fuse`] (default [`crate::fusedev::DEFAULT_THREADS`]).
    pub fn fuse_threads(mut self, threads: usize) -> Self {
        self.fuse_threads = Some(threads.max(1));
        self
    }

    /// Build the daemon and mount everything, in order; the first mount that fails is the error.
    pub fn build(self) -> Result<Service> {
        let daemon = Daemon::new(self.id, crate::launch::new_vfs());
        for (mountpoint, cmd) in self.mounts {
            daemon.mount(&mountpoint, cmd)?;
        }
        let api = self
            .api_socket
            .map(|path| Ok::<_, Error>((crate::api::http::bind(&path)?, path)))
            .transpose()?;
        Ok(Service {
            daemon,
            api,
            fuse_threads: self.fuse_threads.unwrap_or(crate::fusedev::DEFAULT_THREADS),
        })
    }
}

/// A daemon with its mounts, not serving yet.
pub struct Service {
    daemon: Arc<Daemon>,
    api: Option<(UnixListener, PathBuf)>,
    fuse_threads: usize,
}

impl Service {
    /// The daemon: mount, remount and unmount while it serves, read its info and metrics.
    pub fn daemon(&self) -> &Arc<Daemon> {
        &self.daemon
    }

    /// Mount the daemon's share at `mountpoint` through /dev/fuse, read-only (as `rafsd fuse` does),
    /// and serve it from worker threads. Returns once the mount is there and the workers run.
    pub fn serve_fuse(self, mountpoint: impl Into<PathBuf>) -> Result<Running> {
        let opts = crate::fusedev::FuseOptions {
            mountpoint: mountpoint.into(),
            threads: self.fuse_threads,
            failover_policy: crate::fusedev::FailoverPolicy::None,
            supervisor: None,
            take_over: false,
            unmount_on_exit: true,
        };
        let (fate, fate_reader) = crate::takeover::mount_fate_pipe()?;
        let daemon = self.daemon.clone();
        let thread = std::thread::Builder::new()
            .name("fuse-main".into())
            .spawn(move || {
                let vfs = daemon.vfs.clone();
                let signals = crate::signals::no_signals();
                crate::fusedev::run(vfs, opts, &signals, &daemon, fate, |_| Ok(()))
            })
            .map_err(|e| Error::io("start the FUSE thread", e))?;
        // Running once the workers are up; a failed mount ends the thread first.
        while self.daemon.state() != DaemonState::Running {
            if thread.is_finished() {
                return match thread.join() {
                    Ok(Err(e)) => Err(e),
                    _ => Err(Error::Internal("the FUSE front end ended at start".into())),
                };
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let front = Front::Fuse {
            thread,
            _fate: fate_reader,
        };
        self.running(front)
    }

    /// Serve the daemon's share as a vhost-user-fs device on the Unix socket `sock` (replacing a stale
    /// one): the VMM connects there (`-chardev socket,path=SOCK` with `vhost-user-fs-pci` in QEMU), one
    /// VMM at a time. [`DeviceOptions::default`] is what `rafsd virtiofs` offers without options.
    pub fn serve_virtiofs(
        self,
        sock: impl Into<PathBuf>,
        device: DeviceOptions,
    ) -> Result<Running> {
        let sock = sock.into();
        let listener = crate::vhost_user::bind(&sock)?;
        let wake = dup(&listener)?;
        // The embedding program owns the process: no live upgrade hands its device away.
        let server = VhostUserServer::start(
            self.daemon.clone(),
            listener,
            &sock,
            device,
            None,
            None,
            false,
        )?;
        self.daemon.set_state(DaemonState::Running);
        self.running(Front::Virtiofs { server, wake, sock })
    }

    /// The front end serves: start the API too. If it cannot start, the front end stops again.
    fn running(mut self, front: Front) -> Result<Running> {
        let mut running = Running {
            daemon: self.daemon.clone(),
            front: Some(front),
            api: None,
        };
        if let Some((listener, path)) = self.api.take() {
            let started = dup(&listener).and_then(|wake| {
                let thread = crate::api::start_on(listener, self.daemon.clone())?;
                Ok(Api {
                    thread,
                    wake,
                    path: path.clone(),
                })
            });
            match started {
                Ok(api) => running.api = Some(api),
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
            }
        }
        Ok(running)
    }
}

impl Drop for Service {
    /// A service that never served leaves no API socket behind.
    fn drop(&mut self) {
        if let Some((_, path)) = self.api.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A second descriptor of a listening socket: `shutdown()` on it wakes the thread in `accept()`.
fn dup(listener: &impl AsRawFd) -> Result<OwnedFd> {
    // SAFETY: borrowing a descriptor the listener keeps open for this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(listener.as_raw_fd()) };
    fd.try_clone_to_owned()
        .map_err(|e| Error::io("duplicate a listening socket", e))
}

fn wake(listener: &OwnedFd) {
    // SAFETY: shutdown of a socket we own a descriptor of; accept() on it then fails with EINVAL.
    unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
}

/// Wait for `thread` until `deadline`; `None` if it is still running then (it is left behind).
fn join_by<T>(thread: JoinHandle<T>, deadline: Instant) -> Option<std::thread::Result<T>> {
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(thread.join())
}

enum Front {
    Fuse {
        thread: JoinHandle<Result<()>>,
        /// Read end of the mount-fate pipe, kept open so the daemon's word about its mount is heard.
        _fate: crate::takeover::MountFateReader,
    },
    Virtiofs {
        server: VhostUserServer,
        wake: OwnedFd,
        sock: PathBuf,
    },
}

struct Api {
    thread: JoinHandle<()>,
    wake: OwnedFd,
    path: PathBuf,
}

/// A serving daemon. Dropping it shuts it down, as [`Running::shutdown`] does.
pub struct Running {
    daemon: Arc<Daemon>,
    front: Option<Front>,
    api: Option<Api>,
}

impl Running {
    pub fn daemon(&self) -> &Arc<Daemon> {
        &self.daemon
    }

    /// Serve until `PUT /api/v1/daemon/exit` (or, over FUSE, until someone unmounts), then shut down.
    pub fn wait(mut self) -> Result<()> {
        loop {
            let ended = match &self.front {
                Some(Front::Fuse { thread, .. }) => thread.is_finished(),
                Some(Front::Virtiofs { server, .. }) => server.is_finished(),
                None => true,
            };
            if ended || self.daemon.exit_requested() {
                return self.stop();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop serving: the FUSE front end lets its workers finish the requests they hold and unmounts;
    /// the vhost-user front end stops accepting VMMs (a VMM still connected keeps its session until it
    /// disconnects; its thread is left behind after a few seconds). The API socket is closed and
    /// removed. Returns the front end's error, if it ended with one.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        self.daemon.request_exit();
        let deadline = Instant::now() + STOP_WAIT;
        let result = match self.front.take() {
            // The FUSE main loop sees the exit request within a few milliseconds.
            Some(Front::Fuse { thread, _fate }) => match thread.join() {
                Ok(r) => r,
                Err(_) => Err(Error::Internal("the FUSE front end panicked".into())),
            },
            Some(Front::Virtiofs {
                server,
                wake: w,
                sock,
            }) => {
                let thread = server.stop();
                wake(&w);
                let _ = std::fs::remove_file(&sock);
                match thread.and_then(|t| join_by(t, deadline)) {
                    Some(Ok(r)) => r.map(drop),
                    Some(Err(_)) => Err(Error::Internal("the vhost-user server panicked".into())),
                    None => {
                        log::warn!(
                            "vhost-user: a VMM is still connected; its session is left to end"
                        );
                        Ok(())
                    }
                }
            }
            None => Ok(()),
        };
        if let Some(api) = self.api.take() {
            wake(&api.wake);
            let _ = join_by(api.thread, deadline);
            let _ = std::fs::remove_file(&api.path);
        }
        result
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::warn!("stopping the embedded daemon: {e}");
        }
    }
}

/// Is a FUSE mount of ours (what [`Service::serve_fuse`] mounts) at `mountpoint`, per
/// /proc/self/mountinfo? For callers checking that a shutdown unmounted it.
pub fn is_mounted(mountpoint: &Path) -> bool {
    crate::fusedev::is_our_fuse_mount(&crate::fusedev::resolve_mountpoint(mountpoint))
}
