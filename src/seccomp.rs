//! The seccomp allow-list: `seccomp/<arch>.json`, compiled into BPF by `seccomp/build.rs` (one program per
//! mismatch action) and installed on every thread of the daemon.
//!
//! Why unusual syscalls are on the list is written down in `seccomp/README.md`.

use crate::error::{Error, Result};

/// What happens when the daemon makes a syscall outside the policy (`--seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Kill the whole process (SECCOMP_RET_KILL_PROCESS): the default.
    Kill,
    /// Allow the call and have the kernel log it (audit type 1326): for finding gaps in the policy.
    Log,
    /// Send SIGSYS to the calling thread.
    Trap,
    /// Install no filter.
    None,
}

static KILL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-kill.bpf"));
static LOG: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-log.bpf"));
static TRAP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-trap.bpf"));

/// The embedded BPF program for `mode` (empty for `None`).
fn program(mode: SeccompMode) -> Result<Vec<seccompiler::sock_filter>> {
    let raw = match mode {
        SeccompMode::None => return Ok(Vec::new()),
        SeccompMode::Kill => KILL,
        SeccompMode::Log => LOG,
        SeccompMode::Trap => TRAP,
    };
    if raw.is_empty() {
        return Err(Error::Unsupported(format!(
            "no seccomp policy for {}; run with --seccomp none",
            std::env::consts::ARCH
        )));
    }
    Ok(raw
        .chunks_exact(8)
        .map(|i| seccompiler::sock_filter {
            code: u16::from_ne_bytes([i[0], i[1]]),
            jt: i[2],
            jf: i[3],
            k: u32::from_ne_bytes([i[4], i[5], i[6], i[7]]),
        })
        .collect())
}

/// Install the filter on every thread of the process (TSYNC), so no thread is left unfiltered even if
/// one was started earlier. Also sets NO_NEW_PRIVS, which the kernel requires for unprivileged filters.
pub fn install(mode: SeccompMode) -> Result<()> {
    let prog = program(mode)?;
    if prog.is_empty() {
        log::warn!("seccomp: disabled (--seccomp none)");
        return Ok(());
    }
    seccompiler::apply_filter_all_threads(&prog)
        .map_err(|e| Error::Invalid(format!("install seccomp filter: {e}")))?;
    log::info!(
        "seccomp: {} syscall filter installed ({} instructions, mismatch: {mode:?})",
        std::env::consts::ARCH,
        prog.len()
    );
    Ok(())
}

/// Test hook, debug builds only: with `RAFSD_TEST_FORBIDDEN_SYSCALL=1` in its environment the daemon
/// makes one syscall that the policy does not allow (`personality(0xffffffff)`, which only queries)
/// right after the filter is in place. `tests/sandbox.rs` uses it to prove that kill mode kills and log
/// mode logs. Release builds ignore the variable.
pub fn test_hook_forbidden_syscall() {
    if cfg!(debug_assertions) && std::env::var_os("RAFSD_TEST_FORBIDDEN_SYSCALL").is_some() {
        log::warn!("RAFSD_TEST_FORBIDDEN_SYSCALL: calling personality(0xffffffff), which the policy forbids");
        // SAFETY: personality with 0xffffffff only reads the current persona.
        let r = unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) };
        log::warn!("RAFSD_TEST_FORBIDDEN_SYSCALL: personality returned {r}; still alive");
    }
}
