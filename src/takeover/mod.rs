//! Failover and live upgrade of the FUSE daemon, nydus-snapshotter's way: the daemon hands its state and
//! its /dev/fuse connection to the snapshotter's supervisor socket (`PUT /api/v1/daemon/fuse/sendfd`);
//! a successor (a restarted daemon after a crash, or a new binary started with `--upgrade`) takes them
//! over (`PUT /api/v1/daemon/fuse/takeover`) and serves the same kernel connection
//! (`PUT /api/v1/daemon/start`). The mount never goes away: the kernel keeps the connection while the
//! supervisor holds the descriptor.
//!
//! - [`state`]: what is handed over, versioned.
//! - [`keeper`]: crash restart of the virtio-fs daemon (the sandbox's first process keeps its state).
//! - [`supervisor`]: the supervisor socket protocol (state bytes plus SCM_RIGHTS).
//! - [`vfs_index`]: rebuilding the `Vfs` with the inode numbers the kernel already knows.
//! - [`MountFate`]: whether the sandbox supervisor process unmounts when the daemon ends.

pub mod keeper;
pub mod state;
pub mod supervisor;
pub mod vfs_index;

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

use crate::error::{Error, Result};

/// What the daemon tells the sandbox supervisor process (which unmounts for it, see
/// [`crate::fusedev::unmount_fuse`]) about its FUSE mount, through a pipe. The last `Unmount` or
/// `Keep` counts; a daemon that never said either (it crashed) leaves the mount if it said
/// `HeldElsewhere`, and has it unmounted otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The connection is also held by the snapshotter's supervisor (sent or taken over): a crash of
    /// this daemon must leave the mount for a successor.
    HeldElsewhere,
    /// Ending normally and nobody takes over: unmount.
    Unmount,
    /// Ending, and a successor serves (or will serve) the mount: leave it.
    Keep,
}

impl Fate {
    fn byte(self) -> u8 {
        match self {
            Fate::HeldElsewhere => b'H',
            Fate::Unmount => b'U',
            Fate::Keep => b'K',
        }
    }
}

/// The daemon's end of the pipe.
pub struct MountFate(std::fs::File);

/// The sandbox supervisor's end.
pub struct MountFateReader(std::fs::File);

/// A pipe from the daemon to its sandbox supervisor process; create it before the fork.
pub fn mount_fate_pipe() -> Result<(MountFate, MountFateReader)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io("pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((MountFate(w.into()), MountFateReader(r.into())))
}

impl MountFate {
    pub fn tell(&self, fate: Fate) {
        if let Err(e) = (&self.0).write_all(&[fate.byte()]) {
            log::warn!("cannot tell the supervisor process about the mount ({fate:?}): {e}");
        }
    }
}

impl MountFateReader {
    /// After the daemon ended: unmount? Without any word (a daemon that never got that far) yes.
    pub fn should_unmount(mut self) -> bool {
        let mut said = Vec::new();
        let _ = self.0.read_to_end(&mut said);
        match said.iter().rev().find(|b| **b != b'H') {
            Some(b'K') => false,
            Some(_) => true,
            None => !said.contains(&b'H'),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(words: &[Fate]) -> bool {
        let (w, r) = mount_fate_pipe().unwrap();
        for f in words {
            w.tell(*f);
        }
        drop(w);
        r.should_unmount()
    }

    #[test]
    fn the_last_word_decides_and_a_crash_keeps_a_handed_over_mount() {
        assert!(decide(&[]), "died before saying anything: unmount");
        assert!(decide(&[Fate::Unmount]));
        assert!(!decide(&[Fate::HeldElsewhere]), "crash after sendfd: keep");
        assert!(
            decide(&[Fate::HeldElsewhere, Fate::Unmount]),
            "SIGTERM: unmount"
        );
        assert!(
            !decide(&[Fate::HeldElsewhere, Fate::Keep]),
            "upgrade exit: keep"
        );
        assert!(!decide(&[Fate::Keep, Fate::HeldElsewhere]));
    }
}
