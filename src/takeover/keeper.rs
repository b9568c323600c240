//! Crash restart of the virtio-fs daemon under `--sandbox namespace`: QEMU's vhost-user-fs never
//! reconnects, so a daemon that dies (kill -9, a seccomp kill, a panic) would take the guest's
//! filesystem with it. Instead the sandbox's first process becomes a *keeper*: it forks the daemon that
//! serves (the worker), keeps the latest state the worker sends it (a [`Checkpoint`]: the same
//! versioned state a live upgrade hands over, with the VMM connection, memory and eventfd descriptors)
//! and, when the worker dies, forks a new one that carries on from that state and from the inflight
//! log ([`crate::vhost_user::inflight_log`]) both share. The VMM's socket never closes, since the
//! keeper holds a copy of it, so the guest sees a pause.
//!
//! The keeper runs in the sandbox (namespaces, minimal root, Landlock, reduced capabilities) but
//! without the worker's seccomp filter, which forbids forking; it reads nothing from the guest, and
//! from the worker only framed state bytes and descriptors that it stores without parsing. It is
//! single-threaded (it forks).
//!
//! A worker is restarted when it was killed by a signal or panicked (exit status 101), and only when it
//! has sent a checkpoint; three deaths in a row each within [`QUICK_DEATH`] of the start end the
//! daemon, like any other exit (the keeper then exits the way the worker did, and the supervisor
//! outside passes that on).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sandbox::Exit;
use crate::vhost_user::inflight_log::InflightLog;
use crate::vhost_user::upgrade;

/// Frame tag of a checkpoint (see [`upgrade::send`]).
pub const CHECKPOINT: u8 = b'K';
/// A worker that dies this soon after its start counts as a quick death.
pub const QUICK_DEATH: Duration = Duration::from_secs(2);
/// Quick deaths in a row after which the keeper gives up.
const QUICK_DEATHS: u32 = 3;
/// How long the keeper waits for the rest of a checkpoint once its first bytes arrived.
const FRAME_TIMEOUT: Duration = Duration::from_secs(2);

/// The latest state a worker sent, with the descriptors it names.
pub struct Checkpoint {
    pub bytes: Vec<u8>,
    pub files: Vec<File>,
}

/// The worker's end of the checkpoint channel. A send that fails (the keeper stopped reading within
/// 2 s) may have left part of a frame, after which the stream means nothing: the sink
/// is then broken for good and sends no more (the keeper, seeing garbage, forgets the state too).
pub struct CheckpointSink {
    sock: Mutex<UnixStream>,
    broken: AtomicBool,
}

impl CheckpointSink {
    /// Send the state now; false if it could not be sent (an error is logged once).
    pub fn save(&self, bytes: &[u8], fds: &[RawFd]) -> bool {
        let sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        if self.broken.load(Ordering::SeqCst) {
            return false;
        }
        match upgrade::send(&sock, CHECKPOINT, bytes, fds) {
            Ok(()) => true,
            Err(e) => {
                self.broken.store(true, Ordering::SeqCst);
                log::error!(
                    "crash restart: cannot send the state to the keeper ({e}); this daemon will not \
                     be restarted"
                );
                false
            }
        }
    }

    /// The device is no longer this daemon's (handed over by a live upgrade): the keeper drops its
    /// checkpoint, so a death from now on is not restarted. False if that could not be said.
    pub fn forget(&self) -> bool {
        self.save(&[], &[])
    }
}

/// What a forked worker gets.
pub struct Worker {
    pub checkpoints: Arc<CheckpointSink>,
    /// The state to carry on from (a restart), or none (the first worker).
    pub restart: Option<Checkpoint>,
    pub inflight: Arc<InflightLog>,
}

/// Become the keeper: fork workers until one ends for good, then exit the way it did. Returns only in
/// a worker. `after_first_fork` runs in the keeper once the first worker is forked (it drops what only
/// the first worker may use). Must be called while the process has a single thread; `signals` are the
/// blocked shutdown signals, forwarded to the worker.
pub fn keep(signals: &libc::sigset_t, after_first_fork: impl FnOnce()) -> Result<Worker> {
    let inflight = Arc::new(InflightLog::new().map_err(|e| Error::io("inflight log", e))?);
    // Not ptrace-able nor its memory writable through /proc by the daemon it forks (which a guest
    // might take over), on top of seccomp (no ptrace) and Landlock (/proc read-only) there.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0) };
    let mut after_first_fork = Some(after_first_fork);
    let mut checkpoint: Option<Checkpoint> = None;
    let mut quick_deaths = 0;
    let mut restarts = 0u64;
    loop {
        let (ours, theirs) = UnixStream::pair().map_err(|e| Error::io("socketpair", e))?;
        let started = Instant::now();
        // SAFETY: single-threaded (documented precondition).
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(Error::io("fork", io::Error::last_os_error()));
        }
        if pid == 0 {
            drop(ours);
            // The daemon itself stays as it was (its /proc files its own, core dumps as configured).
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1) };
            // A keeper that stopped reading must not hold up the device's thread for long.
            if let Err(e) = theirs.set_write_timeout(Some(FRAME_TIMEOUT)) {
                log::warn!("crash restart: checkpoint channel timeout: {e}");
            }
            return Ok(Worker {
                checkpoints: Arc::new(CheckpointSink {
                    sock: Mutex::new(theirs),
                    broken: AtomicBool::new(false),
                }),
                restart: checkpoint.take(),
                inflight,
            });
        }
        drop(theirs);
        if let Some(f) = after_first_fork.take() {
            f();
        }
        if restarts == 0 {
            log::info!("crash restart: the keeper started the daemon as pid {pid}");
        }
        let (exit, stopping) = watch(pid, &ours, signals, &mut checkpoint);
        let restart =
            !stopping && matches!(exit, Exit::Signal(_) | Exit::Code(101)) && checkpoint.is_some();
        quick_deaths = if started.elapsed() < QUICK_DEATH {
            quick_deaths + 1
        } else {
            0
        };
        if !restart || quick_deaths >= QUICK_DEATHS {
            log::info!("crash restart: the daemon (pid {pid}) ended with {exit:?}");
            if restart {
                log::error!(
                    "crash restart: the daemon died {QUICK_DEATHS} times in a row within {QUICK_DEATH:?} \
                     of its start; giving up"
                );
            }
            // As pid 1 of its namespace the keeper cannot die by a signal it raises itself: a death
            // by signal is passed on as a shell reports it, 128 + the signal (see
            // [`Exit::from_keeper`]).
            match exit {
                Exit::Signal(sig) => std::process::exit(128 + sig),
                Exit::Code(c) => std::process::exit(c.into()),
            }
        }
        restarts += 1;
        log::warn!(
            "crash restart: the daemon (pid {pid}) ended with {exit:?}; starting it again from its \
             last state (restart {restarts})"
        );
    }
}

/// Until worker `pid` ends: store its checkpoints, forward shutdown signals. How it ended, and whether
/// a shutdown signal was forwarded.
fn watch(
    pid: libc::pid_t,
    sock: &UnixStream,
    signals: &libc::sigset_t,
    checkpoint: &mut Option<Checkpoint>,
) -> (Exit, bool) {
    let mut open = true;
    let mut stopping = false;
    loop {
        if open && readable(sock, Duration::from_millis(50)) {
            open = receive(sock, checkpoint);
        }
        let wait = if open {
            Duration::ZERO
        } else {
            Duration::from_millis(50)
        };
        if let Some(sig) = crate::signals::wait_for_signal(signals, wait) {
            stopping = true;
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, sig) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            // Checkpoints sent just before the end are still in the socket.
            while open && readable(sock, Duration::ZERO) {
                open = receive(sock, checkpoint);
            }
            let exit = if libc::WIFSIGNALED(status) {
                Exit::Signal(libc::WTERMSIG(status))
            } else {
                Exit::Code(libc::WEXITSTATUS(status) as u8)
            };
            return (exit, stopping);
        }
        if r < 0 {
            return (Exit::Code(1), stopping);
        }
    }
}

fn readable(sock: &UnixStream, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
    n > 0 && p.revents != 0
}

/// Take one checkpoint frame; false once the channel is over. The worker's end closing (it died,
/// maybe in the middle of a frame) keeps the last whole checkpoint; anything else (a frame that is no
/// checkpoint, or one not finished within [`FRAME_TIMEOUT`]: the worker's sink broke) leaves the
/// stream meaningless, and the keeper forgets the state rather than restart from one it cannot trust.
fn receive(sock: &UnixStream, checkpoint: &mut Option<Checkpoint>) -> bool {
    let frame = sock.set_read_timeout(Some(FRAME_TIMEOUT)).and_then(|()| {
        crate::vhost_user::wire::recv_frame(
            sock,
            crate::takeover::state::MAX_BYTES + 1,
            upgrade::MAX_STATE_FDS,
        )
    });
    let why = match frame {
        Ok((data, files)) => match data.split_first() {
            Some((&CHECKPOINT, [])) => {
                *checkpoint = None;
                return true;
            }
            Some((&CHECKPOINT, body)) => {
                *checkpoint = Some(Checkpoint {
                    bytes: body.to_vec(),
                    files,
                });
                return true;
            }
            _ => "a frame that is no checkpoint".to_string(),
        },
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return false,
        Err(e) => e.to_string(),
    };
    log::error!(
        "crash restart: checkpoint channel broken ({why}); the daemon will not be restarted"
    );
    *checkpoint = None;
    false
}
