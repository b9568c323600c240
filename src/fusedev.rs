//! The host FUSE front end: mount a `Vfs` through /dev/fuse, serve it from worker threads, and unmount
//! cleanly on SIGTERM/SIGINT (or exit when someone else unmounts it).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::Vfs;
use fuse_backend_rs::transport::FuseSession;

use crate::error::{Error, Result};

/// Default `--thread-num`. Each worker answers one request at a time and the kernel hands each request
/// to a free one, so requests finish out of order and one waiting on the network holds back only its own
/// worker. With the 4 MiB readahead below, one streaming reader keeps four 1 MiB reads in flight, all of
/// which may wait on a fetch; 16 leaves room for a few such readers while metadata requests and cached
/// reads still find a free worker. An idle worker costs a blocked thread and an untouched buffer.
pub const DEFAULT_THREADS: usize = 16;

/// Block SIGINT/SIGTERM in this thread and every thread it starts later, so they can be collected with
/// [`wait_for_signal`]. Call before starting any thread.
pub fn block_shutdown_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, zeroed set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Wait up to `timeout` for one of `set`; returns the signal number.
pub fn wait_for_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as _,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    // SAFETY: valid set and timeout.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

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

/// Serve `vfs` at `mountpoint` with `threads` workers until a shutdown signal or an external unmount.
///
/// `start` runs once the mount and its channels exist and before any worker starts (the sandbox goes
/// up there). The mount is left in place at the end: the sandboxed daemon may not unmount, so the
/// supervisor process does it ([`crate::sandbox::unmount_fuse`]).
pub fn serve(
    vfs: Arc<Vfs>,
    mountpoint: &Path,
    threads: usize,
    signals: &libc::sigset_t,
    daemon: &crate::daemon::Daemon,
    start: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let mut session = FuseSession::new(mountpoint, "rafs", "", true)
        .map_err(|e| Error::Invalid(format!("FUSE mountpoint {}: {e}", mountpoint.display())))?;
    session
        .mount()
        .map_err(|e| Error::Invalid(format!("mount FUSE at {}: {e}", mountpoint.display())))?;
    log::info!("FUSE filesystem mounted at {}", mountpoint.display());
    let server = Arc::new(Server::new(vfs));
    let running = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    // Each channel opens /dev/fuse again, which the sandbox will not allow: open them all first.
    let channels = (0..threads.max(1))
        .map(|_| session.new_channel())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Invalid(format!("FUSE channel: {e}")))?;
    if let Err(e) = start() {
        // Nobody will serve this mount; the supervisor unmounts it.
        std::mem::forget(session);
        return Err(e);
    }
    for (i, mut channel) in channels.into_iter().enumerate() {
        let (server, running) = (server.clone(), running.clone());
        running.fetch_add(1, Ordering::SeqCst);
        let worker = std::thread::Builder::new()
            .name(format!("fuse-{i}"))
            .spawn(move || {
                loop {
                    match channel.get_request() {
                        Ok(Some((reader, writer))) => {
                            // A failed request is answered or dropped by the server; the worker carries on.
                            if let Err(e) = server.handle_message(reader, writer.into(), None, None)
                            {
                                log::debug!("FUSE request: {e}");
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            log::warn!("FUSE channel: {e}");
                            break;
                        }
                    }
                }
                running.fetch_sub(1, Ordering::SeqCst);
            });
        workers.push(worker.map_err(|e| Error::io("start FUSE worker", e))?);
    }
    let mp = mountpoint.to_path_buf();
    let _ = std::thread::Builder::new()
        .name("readahead".into())
        .spawn(move || raise_readahead(&mp, READAHEAD_KB));
    loop {
        if let Some(sig) = wait_for_signal(signals, Duration::from_millis(200)) {
            log::info!("signal {sig}: unmounting {}", mountpoint.display());
            break;
        }
        if daemon.exit_requested() {
            log::info!("exit requested: unmounting {}", mountpoint.display());
            break;
        }
        if running.load(Ordering::SeqCst) < workers.len() {
            log::info!("FUSE session ended (unmounted from outside)");
            break;
        }
    }
    // Wake the workers first so they stop reading the device, then take the mount down.
    if let Err(e) = session.wake() {
        log::warn!("waking FUSE workers: {e}");
    }
    for w in workers {
        let _ = w.join();
    }
    // Dropping the session would unmount, which the sandbox forbids; the supervisor unmounts instead.
    std::mem::forget(session);
    log::info!(
        "FUSE workers stopped; leaving the unmount of {} to the supervisor",
        mountpoint.display()
    );
    Ok(())
}
