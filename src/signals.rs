//! Shutdown signals. The daemon never runs a signal handler: SIGINT and SIGTERM are blocked in every
//! thread ([`block_shutdown_signals`], before the first thread starts, so all threads inherit the mask)
//! and collected by whichever loop decides to stop ([`wait_for_signal`]): the FUSE front end's main
//! loop, the virtio-fs wait loop, or the sandbox supervisor, which forwards them to the daemon child.

use std::time::Duration;

/// Block SIGINT/SIGTERM in this thread and every thread it starts later, so they can be collected with
/// [`wait_for_signal`]. Call before starting any thread.
pub fn block_shutdown_signals() -> libc::sigset_t {
    let set = shutdown_set();
    // SAFETY: changes this thread's signal mask only; `set` is a valid, initialised set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    set
}

/// SIGINT and SIGTERM, not blocked: for a caller that leaves the mask alone.
fn shutdown_set() -> libc::sigset_t {
    let mut set = no_signals();
    // SAFETY: adding valid signal numbers to an initialised set.
    unsafe {
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
    }
    set
}

/// The empty set: [`wait_for_signal`] on it never returns a signal. Front ends embedded in another
/// program ([`crate::embed`]) wait on it, leaving that program's signals alone.
pub fn no_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set it is given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        set
    }
}

/// Wait up to `timeout` for one of `set` (blocked by the caller); returns the signal number. A set
/// without SIGINT and SIGTERM ([`no_signals`]) just waits out the timeout.
pub fn wait_for_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    // SAFETY: sigismember reads an initialised set.
    let shutdown = unsafe {
        libc::sigismember(set, libc::SIGINT) == 1 || libc::sigismember(set, libc::SIGTERM) == 1
    };
    if !shutdown {
        std::thread::sleep(timeout);
        return None;
    }
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as _,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    // SAFETY: valid set and timeout.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_set_waits_out_the_timeout_and_returns_nothing() {
        let start = std::time::Instant::now();
        assert_eq!(
            wait_for_signal(&no_signals(), Duration::from_millis(30)),
            None
        );
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn a_blocked_signal_sent_to_the_thread_is_collected() {
        // In a thread of its own: the mask and the pending signal stay there.
        std::thread::spawn(|| {
            let set = block_shutdown_signals();
            // SAFETY: signalling this thread, which blocks the signal.
            unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGTERM) };
            assert_eq!(
                wait_for_signal(&set, Duration::from_secs(1)),
                Some(libc::SIGTERM)
            );
        })
        .join()
        .unwrap();
    }
}
