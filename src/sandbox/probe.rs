//! Test probes, debug builds only: with `RAFSD_TEST_FORBIDDEN_SYSCALL=<probe>` in its environment the
//! daemon (for `supervisor`, the supervisor) does one thing its sandbox must stop, right after the sandbox
//! is complete, and logs what happened. `tests/sandbox.rs` uses them to show each rule on the running
//! daemon; release builds ignore the variable.
//!
//! | probe | what it does | with the rule |
//! |---|---|---|
//! | `1`, `personality` | `personality(0xffffffff)` (a query), not on the allow-list | killed |
//! | `fork` | `clone(SIGCHLD)`: a new process | killed |
//! | `clone-namespace` | `clone` with thread flags plus `CLONE_NEWNET` | killed |
//! | `clone3` | `clone3(NULL, 0)`, then a `std::thread` | ENOSYS, the thread starts (glibc falls back to `clone`) |
//! | `socket-vsock` | `socket(AF_VSOCK)` | killed |
//! | `socket-netlink` | `socket(AF_UNIX)`, `socket(AF_INET)`, then `socket(AF_NETLINK)` | the first two work, netlink gets EAFNOSUPPORT |
//! | `tgkill:PID` | `tgkill(own pid, own tid, 0)`, then `tgkill(PID, PID, 0)` | the first works, the second is killed |
//! | `open:PATH[,PATH...]` | `open(PATH, O_RDONLY)` (device nodes in a share) | EACCES (nodev) |
//! | `supervisor` | `personality(0xffffffff)` in the supervisor | the supervisor is killed |

use std::io;

const VAR: &str = "RAFSD_TEST_FORBIDDEN_SYSCALL";

/// The probe asked for, in debug builds only.
fn requested() -> Option<String> {
    if !cfg!(debug_assertions) {
        return None;
    }
    std::env::var(VAR).ok()
}

/// The outcome of a raw syscall, as the log shows it.
fn outcome(r: libc::c_long) -> String {
    if r < 0 {
        format!("{r} ({})", io::Error::last_os_error())
    } else {
        r.to_string()
    }
}

fn personality() {
    log::warn!("{VAR}: calling personality(0xffffffff), which the policy forbids");
    // SAFETY: personality with 0xffffffff only reads the current persona.
    let r = unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) };
    log::warn!("{VAR}: personality returned {}; still alive", outcome(r));
}

/// Run the probe the environment asks for in the daemon, once its sandbox is complete.
pub fn daemon() {
    let Some(probe) = requested() else {
        return;
    };
    let (name, arg) = probe.split_once(':').unwrap_or((&probe, ""));
    log::warn!("{VAR}: probe {name:?} {arg:?}");
    match name {
        "1" | "personality" => return personality(),
        "fork" => {
            // SAFETY: a fork-like clone without a new stack; a child (only without the rule) exits at once.
            let r = unsafe {
                libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0)
            };
            if r == 0 {
                // SAFETY: leaving the child without running anything of the parent's.
                unsafe { libc::_exit(0) };
            }
            log::warn!("{VAR}: fork returned {}", outcome(r));
        }
        "clone-namespace" => {
            let flags = libc::CLONE_VM
                | libc::CLONE_FS
                | libc::CLONE_FILES
                | libc::CLONE_SIGHAND
                | libc::CLONE_THREAD
                | libc::CLONE_SYSVSEM
                | libc::CLONE_NEWNET;
            // SAFETY: the daemon holds no CAP_SYS_ADMIN, so without the rule the kernel answers EPERM
            // and no thread is created on this stack.
            let r = unsafe { libc::syscall(libc::SYS_clone, flags as libc::c_ulong, 0, 0, 0, 0) };
            log::warn!("{VAR}: clone with CLONE_NEWNET returned {}", outcome(r));
        }
        "clone3" => {
            // SAFETY: a null argument with size 0 is refused before anything is read.
            let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
            log::warn!("{VAR}: clone3 returned {}", outcome(r));
            let t = std::thread::spawn(|| 42).join();
            log::warn!("{VAR}: a std::thread ran and returned {t:?}");
        }
        "socket-vsock" => socket("AF_VSOCK", libc::AF_VSOCK, libc::SOCK_STREAM, 0),
        "socket-netlink" => {
            socket("AF_UNIX", libc::AF_UNIX, libc::SOCK_STREAM, 0);
            socket("AF_INET", libc::AF_INET, libc::SOCK_STREAM, 0);
            socket(
                "AF_NETLINK",
                libc::AF_NETLINK,
                libc::SOCK_RAW,
                libc::NETLINK_ROUTE,
            );
        }
        "tgkill" => {
            // SAFETY: signal 0 only checks that the target exists.
            let own = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), 0) };
            log::warn!("{VAR}: tgkill of our own thread returned {}", outcome(own));
            let pid: libc::pid_t = arg.parse().unwrap_or(0);
            // SAFETY: as above.
            let other = unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, 0) };
            log::warn!("{VAR}: tgkill of pid {pid} returned {}", outcome(other));
        }
        "open" => {
            for path in arg.split(',') {
                match std::fs::File::open(path) {
                    Ok(_) => log::warn!("{VAR}: open {path} succeeded"),
                    Err(e) => log::warn!("{VAR}: open {path} failed: {e}"),
                }
            }
        }
        "supervisor" => return,
        _ => log::warn!("{VAR}: unknown probe {probe:?}"),
    }
    log::warn!("{VAR}: probe {name:?} done; still alive");
}

fn socket(what: &str, domain: libc::c_int, kind: libc::c_int, protocol: libc::c_int) {
    // SAFETY: plain integer arguments; the descriptor is closed right away.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    log::warn!("{VAR}: socket({what}) returned {}", outcome(fd.into()));
    if fd >= 0 {
        // SAFETY: closing the descriptor we just got.
        unsafe { libc::close(fd) };
    }
}

/// Run the `supervisor` probe in the supervisor, once its filter is installed.
pub fn supervisor() {
    if requested().as_deref() == Some("supervisor") {
        personality();
    }
}
