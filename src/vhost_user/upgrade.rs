//! Live upgrade of the virtio-fs daemon: the running daemon hands its VMM connection, device set-up and
//! filesystems to a new process, which carries on serving the same guest.
//!
//! The new process (`rafsd virtiofs --upgrade-from OLD_APISOCK ...`) connects to the running daemon's
//! API socket and sends `PUT /api/v1/daemon/upgrade`; the daemon answers `101 Switching Protocols` and
//! the connection carries frames (a 4-byte length, a tag byte, a body; descriptors by SCM_RIGHTS). It
//! is a two-phase commit: exactly one process serves the rings at any time.
//!
//! 1. old → new [`STATE`] (a dry run: no descriptors). The new process decodes it and mounts its
//!    filesystems (the slow part, while the old daemon still serves). A state it cannot read or
//!    mount is answered [`REFUSE`] + why, and the old daemon carries on as if nothing had happened.
//! 2. new → old [`YES`]. The old daemon stops taking requests off the rings, waits until every
//!    request it took is answered (they complete out of order), stops each started ring
//!    (GET_VRING_BASE on its own backend connection), and exports the state again, now with each
//!    ring's next avail index (= its used index) and the filesystems' lookup counts as they are.
//! 3. old → new [`STATE`], with the descriptors it names: the VMM connection, the listening socket,
//!    memory regions, kick/call/err eventfds, the backend request channel.
//! 4. The new process takes the final lookup counts, replays the device set-up into its own backend
//!    without starting the rings (no kick eventfd, no SET_VRING_ENABLE), adopts the DAX mappings and
//!    answers [`READY`]; [`REFUSE`] + why instead (or no answer within [`STEP_TIMEOUT`]), and the old
//!    daemon starts its rings again where they stopped and carries on.
//! 5. old → new [`COMMIT`]: from then on the old daemon never serves again (it exits, also when the
//!    frame cannot be sent). Only on [`COMMIT`] does the new process start the rings and kick them;
//!    without it (an error, the old daemon gone, [`STEP_TIMEOUT`]) it exits without touching them.
//!
//! Between 1 and 5 the old daemon reads no vhost-user message, so the set-up cannot change under the
//! hand-over (a message the VMM sends meanwhile waits in the socket for the new process).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::wire::{recv_frame, send_frame};
use crate::error::{Error, Result};
use crate::takeover::state::{self, State};

/// How long the old daemon waits for the new process's yes: it mounts the filesystems meanwhile
/// (the old daemon serves the guest all along).
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long either side waits for the other's next frame once the old daemon stopped serving.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long requests in flight may take to finish before a hand-over is given up.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Frame tags: a state (with or without descriptors), the new process's yes, its readiness to serve,
/// the old daemon's commit, a refusal with its reason.
pub const STATE: u8 = b'S';
pub const YES: u8 = b'O';
pub const READY: u8 = b'R';
pub const COMMIT: u8 = b'C';
pub const REFUSE: u8 = b'E';
/// Descriptors one state may carry: connection, listener, 8 memory regions, 3 per ring (the hiprio
/// ring and up to 63 request rings: [`super::MAX_RINGS`]), backend channel, one table per passthrough
/// share. Below the kernel's 253 per message (SCM_MAX_FD).
pub const MAX_STATE_FDS: usize = 2 + 8 + 3 * super::MAX_RINGS + 1 + crate::daemon::MAX_SHARES;
const _: () = assert!(MAX_STATE_FDS <= 253);
/// The answer that switches the API connection to the hand-over protocol.
pub const SWITCH_HEAD: &str =
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: rafsd-upgrade\r\nConnection: Upgrade\r\n\r\n";

fn io_err(what: &str, e: std::io::Error) -> Error {
    Error::io(format!("live upgrade: {what}"), e)
}

pub fn send(peer: &UnixStream, tag: u8, body: &[u8], fds: &[RawFd]) -> Result<()> {
    let mut data = Vec::with_capacity(1 + body.len());
    data.push(tag);
    data.extend_from_slice(body);
    send_frame(peer, &data, fds).map_err(|e| io_err("send", e))
}

/// The next frame within `timeout`, which must be tagged `tag`: its body and descriptors. A
/// [`REFUSE`] frame, another tag, the end of the connection or the timeout are errors.
pub fn expect(peer: &UnixStream, tag: u8, timeout: Duration) -> Result<(Vec<u8>, Vec<File>)> {
    peer.set_read_timeout(Some(timeout))
        .map_err(|e| io_err("socket timeout", e))?;
    let (data, files) =
        recv_frame(peer, state::MAX_BYTES + 1, MAX_STATE_FDS).map_err(|e| io_err("receive", e))?;
    match data.split_first() {
        Some((&REFUSE, why)) => Err(Error::Invalid(format!(
            "the other daemon refused: {}",
            String::from_utf8_lossy(why)
        ))),
        Some((t, body)) if *t == tag => Ok((body.to_vec(), files)),
        Some((t, _)) => Err(Error::Invalid(format!(
            "live upgrade: expected frame {:?}, got {:?}",
            tag as char, *t as char
        ))),
        None => Err(Error::Invalid("live upgrade: empty frame".into())),
    }
}

pub fn refuse(peer: &UnixStream, why: &Error) {
    let _ = send(peer, REFUSE, why.to_string().as_bytes(), &[]);
}

/// Check who asks and set the write timeout on a hand-over connection.
pub fn prepare(peer: &UnixStream) -> Result<()> {
    check_peer(peer)?;
    peer.set_write_timeout(Some(STEP_TIMEOUT))
        .map_err(|e| io_err("socket timeouts", e))
}

/// The state carries the guest's memory and the VMM's connection: only a process of this daemon's
/// user (or root) gets them, whoever else may reach the API socket.
pub fn check_peer(peer: &UnixStream) -> Result<()> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the size given.
    let r = unsafe {
        libc::getsockopt(
            peer.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io_err("peer credentials", std::io::Error::last_os_error()));
    }
    // SAFETY: plain getter.
    let me = unsafe { libc::geteuid() };
    if cred.uid != me && cred.uid != 0 {
        return Err(Error::Forbidden(format!(
            "live upgrade asked by uid {} (pid {}); only uid {me} or root may take the device",
            cred.uid, cred.pid
        )));
    }
    Ok(())
}

/// The new process's side, up to the dry run: connected to the running daemon, which offered a state
/// this process can read.
pub struct Successor {
    peer: UnixStream,
    pub offered: State,
}

impl Successor {
    /// Connect to the running daemon's API socket and ask for the hand-over; refuse (and fail) if its
    /// state cannot be read here.
    pub fn connect(api_sock: &Path) -> Result<Successor> {
        let peer = UnixStream::connect(api_sock).map_err(|e| {
            Error::io(
                format!("connect to the running daemon's API {}", api_sock.display()),
                e,
            )
        })?;
        prepare(&peer)?;
        peer.set_read_timeout(Some(STEP_TIMEOUT))
            .map_err(|e| io_err("socket timeout", e))?;
        (&peer)
            .write_all(
                b"PUT /api/v1/daemon/upgrade HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
            )
            .map_err(|e| io_err("send the request", e))?;
        // The head, byte by byte: nothing past it may be read into a buffer (the frames follow).
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() > 16 << 10
                || (&peer).read(&mut byte).map_err(|e| io_err("answer", e))? == 0
            {
                break;
            }
            head.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        if !text.starts_with("HTTP/1.1 101") {
            // An error answer: the body says why (e.g. a FUSE daemon, or no upgrade support).
            let mut body = String::new();
            let _ = BufReader::new(&peer).take(64 << 10).read_line(&mut body);
            return Err(Error::Unsupported(format!(
                "the running daemon did not accept the upgrade: {} {}",
                text.lines().next().unwrap_or(""),
                body.trim()
            )));
        }
        let (bytes, _) = expect(&peer, STATE, STEP_TIMEOUT)?;
        match State::decode(&bytes, "virtiofs") {
            Ok(offered) => Ok(Successor { peer, offered }),
            Err(e) => {
                log::error!("refusing the running daemon's state: {e}");
                refuse(&peer, &e);
                Err(e)
            }
        }
    }

    /// Say no (the offered state could not be mounted): the old daemon carries on.
    pub fn refuse(&self, why: &Error) {
        refuse(&self.peer, why);
    }

    /// Say yes; get the final state and its descriptors (the old daemon has stopped serving now).
    pub fn accept(self) -> Result<Handover> {
        send(&self.peer, YES, &[], &[])?;
        let (bytes, files) = expect(&self.peer, STATE, DRAIN_TIMEOUT + STEP_TIMEOUT)?;
        let state = State::decode(&bytes, "virtiofs").inspect_err(|e| refuse(&self.peer, e))?;
        Ok(Handover {
            peer: self.peer,
            state,
            files: files.into_iter().map(Some).collect(),
        })
    }
}

/// What the new process got: [`Handover::refuse`] (the old daemon serves again) or
/// [`Handover::ready`] (and serve only if the old daemon commits).
pub struct Handover {
    peer: UnixStream,
    pub state: State,
    pub files: Vec<Option<File>>,
}

impl Handover {
    pub fn refuse(&self, why: &Error) {
        refuse(&self.peer, why);
    }

    /// Say the device is set up, rings not started; Ok once the old daemon committed (it never
    /// serves again), an error if it did not (then the rings are still the old daemon's).
    pub fn ready(&self) -> Result<()> {
        send(&self.peer, READY, &[], &[])?;
        expect(&self.peer, COMMIT, STEP_TIMEOUT).map(drop)
    }

    pub fn peer_fd(&self) -> RawFd {
        self.peer.as_raw_fd()
    }
}
