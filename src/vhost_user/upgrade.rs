//! Live upgrade of the virtio-fs daemon: the running daemon hands its VMM connection, device set-up and
//! filesystems to a new process, which carries on serving the same guest.
//!
//! The new process (`rafsd virtiofs --upgrade-from OLD_APISOCK ...`) connects to the running daemon's
//! API socket and sends `PUT /api/v1/daemon/upgrade`; the daemon answers `101 Switching Protocols` and
//! the connection carries frames (a 4-byte length, a tag byte, a body; descriptors by SCM_RIGHTS):
//!
//! 1. old → new `S` + state (a dry run: no descriptors). The new process decodes it: a state it
//!    cannot read (a newer version, an unknown field) is answered `E` + why, and the old daemon
//!    carries on as if nothing had happened.
//! 2. new → old `O`: it can. The old daemon stops taking requests off the rings, waits until every
//!    request it took is answered (they complete out of order), stops each started ring
//!    (GET_VRING_BASE on its own backend connection), and exports the state again, now with each
//!    ring's next avail index (= its used index) and the filesystems' lookup counts as they are.
//! 3. old → new `S` + state, with the descriptors it names: the VMM connection, the listening socket,
//!    memory regions, kick/call/err eventfds, the backend request channel.
//! 4. The new process mounts the filesystems, replays the device set-up into its own backend, kicks
//!    every ring once and answers `O`; the old daemon exits (its copies of the descriptors close, the
//!    VMM's connection stays open through the new process's). `E` + why instead: the old daemon starts
//!    its rings again where they stopped and carries on.
//!
//! Between 1 and 4 the old daemon reads no vhost-user message, so the set-up cannot change under the
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

/// How long either side waits for the other's next frame.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long requests in flight may take to finish before a hand-over is given up.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Descriptors one state may carry: connection, listener, 8 memory regions, 3 per ring, backend.
const MAX_FDS: usize = 2 + 8 + 3 * 66 + 1;
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

/// The next frame: its tag, body and descriptors. `E` frames become errors.
pub fn recv(peer: &UnixStream) -> Result<(u8, Vec<u8>, Vec<File>)> {
    let (data, files) =
        recv_frame(peer, state::MAX_BYTES + 1, MAX_FDS).map_err(|e| io_err("receive", e))?;
    match data.split_first() {
        Some((b'E', why)) => Err(Error::Invalid(format!(
            "the other daemon refused: {}",
            String::from_utf8_lossy(why)
        ))),
        Some((tag, body)) => Ok((*tag, body.to_vec(), files)),
        None => Err(Error::Invalid("live upgrade: empty frame".into())),
    }
}

pub fn refuse(peer: &UnixStream, why: &Error) {
    let _ = send(peer, b'E', why.to_string().as_bytes(), &[]);
}

/// Check who asks and set the step timeouts on a hand-over connection. The state carries the guest's
/// memory and the VMM's connection: only a process of this daemon's user (or root) gets them, whoever
/// else may reach the API socket.
pub fn prepare(peer: &UnixStream) -> Result<()> {
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
    peer.set_read_timeout(Some(STEP_TIMEOUT))
        .and_then(|()| peer.set_write_timeout(Some(STEP_TIMEOUT)))
        .map_err(|e| io_err("socket timeouts", e))
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
        let (tag, bytes, _) = recv(&peer)?;
        if tag != b'S' {
            return Err(Error::Invalid("live upgrade: expected the state".into()));
        }
        match State::decode(&bytes, "virtiofs") {
            Ok(offered) => Ok(Successor { peer, offered }),
            Err(e) => {
                log::error!("refusing the running daemon's state: {e}");
                refuse(&peer, &e);
                Err(e)
            }
        }
    }

    /// Say yes; get the final state and its descriptors (the old daemon has stopped serving now).
    pub fn accept(self) -> Result<Handover> {
        send(&self.peer, b'O', &[], &[])?;
        let (tag, bytes, files) = recv(&self.peer)?;
        if tag != b'S' {
            return Err(Error::Invalid("live upgrade: expected the state".into()));
        }
        let state = State::decode(&bytes, "virtiofs").inspect_err(|e| refuse(&self.peer, e))?;
        Ok(Handover {
            peer: self.peer,
            state,
            files: files.into_iter().map(Some).collect(),
        })
    }
}

/// What the new process got; [`Handover::done`] tells the old daemon how it went.
pub struct Handover {
    peer: UnixStream,
    pub state: State,
    pub files: Vec<Option<File>>,
}

impl Handover {
    pub fn done(&self, result: &Result<()>) {
        match result {
            Ok(()) => {
                let _ = send(&self.peer, b'O', &[], &[]);
            }
            Err(e) => refuse(&self.peer, e),
        }
    }

    pub fn peer_fd(&self) -> RawFd {
        self.peer.as_raw_fd()
    }
}
