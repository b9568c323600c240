//! The seccomp policies: `seccomp/<arch>.json`, compiled into BPF by `seccomp/build.rs` (all filters once
//! per mismatch action) and installed on every thread of the daemon, and on the supervisor.
//!
//! The daemon gets the `refuse_*` filters (calls its libraries make and cope without, answered with an
//! errno) and then the `rafsd` allow-list; the supervisor gets the `supervisor` allow-list. Rules that
//! name a pid compare with placeholders ([`OWN_PID`], [`DAEMON_PID`]) that [`install`] replaces with the
//! real pids: the filter is installed once the process's pid is final (after the last fork), and a pid
//! is the only value the policy cannot know at build time.
//!
//! Why unusual syscalls are on the lists is written down in `seccomp/README.md`.

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

/// In the policy, "the pid of the process the filter is installed on" (0x5AFE0001: above any pid_max).
pub const OWN_PID: u32 = 0x5AFE_0001;
/// In the supervisor's policy, "the pid of the daemon it supervises".
pub const DAEMON_PID: u32 = 0x5AFE_0002;

/// BPF instruction class of conditional jumps, the only instructions that compare with a value.
const BPF_JMP: u16 = 0x05;

/// One compiled filter of the policy.
struct Program {
    name: String,
    insns: Vec<seccompiler::sock_filter>,
}

/// Split `raw` (the framing `seccomp/build.rs` writes) into its filters.
fn parse(raw: &[u8]) -> Option<Vec<Program>> {
    let mut programs = Vec::new();
    let mut rest = raw;
    while let Some((&len, tail)) = rest.split_first() {
        let (name, tail) = tail.split_at_checked(len.into())?;
        let (count, tail) = tail.split_at_checked(4)?;
        let count = u32::from_le_bytes(count.try_into().ok()?) as usize;
        let (body, tail) = tail.split_at_checked(count.checked_mul(8)?)?;
        let insns = body
            .chunks_exact(8)
            .map(|i| seccompiler::sock_filter {
                code: u16::from_ne_bytes([i[0], i[1]]),
                jt: i[2],
                jf: i[3],
                k: u32::from_ne_bytes([i[4], i[5], i[6], i[7]]),
            })
            .collect();
        programs.push(Program {
            name: String::from_utf8(name.to_vec()).ok()?,
            insns,
        });
        rest = tail;
    }
    Some(programs)
}

/// The embedded filters for `mode` (none for `None`).
fn programs(mode: SeccompMode) -> Result<Vec<Program>> {
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
    parse(raw).ok_or_else(|| Error::Invalid("embedded seccomp policy is malformed".into()))
}

/// `insns` with every comparison against a placeholder turned into one against its pid. A placeholder
/// without a pid (or a pid that is not positive) is an error, so no rule is left comparing with it.
fn specialise(
    mut insns: Vec<seccompiler::sock_filter>,
    pids: &[(u32, libc::pid_t)],
) -> Result<Vec<seccompiler::sock_filter>> {
    for insn in insns.iter_mut().filter(|i| i.code & 0x07 == BPF_JMP) {
        if insn.k != OWN_PID && insn.k != DAEMON_PID {
            continue;
        }
        let pid = pids
            .iter()
            .find(|(placeholder, _)| *placeholder == insn.k)
            .and_then(|(_, pid)| u32::try_from(*pid).ok().filter(|p| *p > 0))
            .ok_or_else(|| {
                Error::Invalid(format!("seccomp policy compares with pid placeholder {:#x}, but no pid was given for it", insn.k))
            })?;
        insn.k = pid;
    }
    Ok(insns)
}

/// Install `insns` on every thread of the process (TSYNC), so no thread is left unfiltered even if one
/// was started earlier. seccompiler also sets NO_NEW_PRIVS, which the kernel requires.
fn apply(name: &str, insns: &[seccompiler::sock_filter]) -> Result<()> {
    seccompiler::apply_filter_all_threads(insns)
        .map_err(|e| Error::Invalid(format!("install seccomp filter {name}: {e}")))
}

/// The daemon's filters: the `refuse_*` ones first, then the allow-list, which forbids `seccomp(2)`
/// itself. `tgkill` is limited to the calling process (what `abort()` and `raise()` do).
pub fn install(mode: SeccompMode) -> Result<()> {
    let programs = programs(mode)?;
    if programs.is_empty() {
        log::warn!("seccomp: disabled (--seccomp none)");
        return Ok(());
    }
    // SAFETY: getpid has no preconditions.
    let own = unsafe { libc::getpid() };
    let (allow, refuse): (Vec<Program>, Vec<Program>) = programs
        .into_iter()
        .filter(|p| p.name != "supervisor")
        .partition(|p| p.name == "rafsd");
    for p in &refuse {
        apply(&p.name, &specialise(p.insns.clone(), &[(OWN_PID, own)])?)?;
    }
    let Some(allow) = allow.first() else {
        return Err(Error::Invalid(
            "embedded seccomp policy has no rafsd filter".into(),
        ));
    };
    let insns = specialise(allow.insns.clone(), &[(OWN_PID, own)])?;
    apply(&allow.name, &insns)?;
    log::info!(
        "seccomp: {} syscall filter installed ({} instructions, mismatch: {mode:?}; {} refusal filters)",
        std::env::consts::ARCH,
        insns.len(),
        refuse.len()
    );
    Ok(())
}

/// The supervisor's allow-list: waiting for and signalling `daemon` only, logging, removing sockets,
/// unmounting (`rafsd fuse`), exiting the way the daemon did.
pub fn install_supervisor(mode: SeccompMode, daemon: libc::pid_t) -> Result<()> {
    let programs = programs(mode)?;
    let Some(p) = programs.iter().find(|p| p.name == "supervisor") else {
        return if programs.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(
                "embedded seccomp policy has no supervisor filter".into(),
            ))
        };
    };
    // SAFETY: getpid has no preconditions.
    let own = unsafe { libc::getpid() };
    let insns = specialise(p.insns.clone(), &[(OWN_PID, own), (DAEMON_PID, daemon)])?;
    apply(&p.name, &insns)?;
    log::info!(
        "supervisor: seccomp filter installed ({} instructions, mismatch: {mode:?})",
        insns.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jumps_to(insns: &[seccompiler::sock_filter], k: u32) -> usize {
        insns
            .iter()
            .filter(|i| i.code & 0x07 == BPF_JMP && i.k == k)
            .count()
    }

    #[test]
    fn the_embedded_policy_has_every_filter_and_its_placeholders() {
        for mode in [SeccompMode::Kill, SeccompMode::Log, SeccompMode::Trap] {
            let programs = programs(mode).unwrap();
            let names: Vec<&str> = programs.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(
                names,
                [
                    "rafsd",
                    "refuse_eafnosupport",
                    "refuse_enosys",
                    "refuse_eperm",
                    "supervisor"
                ]
            );
            let get = |n: &str| &programs.iter().find(|p| p.name == n).unwrap().insns;
            // tgkill in both; kill and wait4 of the daemon in the supervisor's.
            assert_eq!(jumps_to(get("rafsd"), OWN_PID), 1);
            assert_eq!(jumps_to(get("rafsd"), DAEMON_PID), 0);
            assert_eq!(jumps_to(get("supervisor"), OWN_PID), 1);
            assert_eq!(jumps_to(get("supervisor"), DAEMON_PID), 2);
        }
        assert!(programs(SeccompMode::None).unwrap().is_empty());
    }

    #[test]
    fn placeholders_become_pids_and_none_is_left_over() {
        let supervisor = programs(SeccompMode::Kill)
            .unwrap()
            .into_iter()
            .find(|p| p.name == "supervisor")
            .unwrap()
            .insns;
        let done = specialise(supervisor.clone(), &[(OWN_PID, 4242), (DAEMON_PID, 4243)]).unwrap();
        assert_eq!(jumps_to(&done, OWN_PID) + jumps_to(&done, DAEMON_PID), 0);
        assert_eq!(jumps_to(&done, 4242), 1);
        assert_eq!(jumps_to(&done, 4243), 2);
        // Only the comparisons changed.
        assert_eq!(done.len(), supervisor.len());
        // A placeholder without a pid, or a pid that is not one, is refused.
        assert!(specialise(supervisor.clone(), &[(OWN_PID, 4242)]).is_err());
        assert!(specialise(supervisor, &[(OWN_PID, 0), (DAEMON_PID, 1)]).is_err());
    }

    #[test]
    fn malformed_framing_is_refused() {
        assert!(parse(&[]).unwrap().is_empty());
        assert!(parse(&[5, b'a']).is_none());
        assert!(parse(&[1, b'a', 1, 0, 0, 0, 1, 2]).is_none());
        let one = parse(&[1, b'a', 1, 0, 0, 0, 6, 0, 1, 2, 0xff, 0x7f, 0, 0]).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].name, "a");
        let i = &one[0].insns[0];
        assert_eq!((i.code, i.jt, i.jf), (u16::from_ne_bytes([6, 0]), 1, 2));
    }
}
