//! The daemon's side of nydus-snapshotter's supervisor socket (`--supervisor`), which keeps a daemon's
//! state and FUSE connection while daemons come and go (pkg/supervisor in the snapshotter):
//! - to hand them over, the daemon connects, sends the state bytes with the /dev/fuse descriptor
//!   attached (SCM_RIGHTS) and closes; the supervisor reads until EOF;
//! - to take them over, the daemon connects and reads until EOF: the state bytes, with the descriptor
//!   attached to the first message.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::state::MAX_BYTES;
use crate::error::{Error, Result};

/// How long one exchange may take; the supervisor listens before it asks, so this is generous.
const TIMEOUT: Duration = Duration::from_secs(10);

fn connect(sock: &Path) -> Result<UnixStream> {
    let s = UnixStream::connect(sock)
        .map_err(|e| Error::io(format!("connect to the supervisor {}", sock.display()), e))?;
    s.set_read_timeout(Some(TIMEOUT))
        .and_then(|_| s.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| Error::io("supervisor socket timeouts", e))?;
    Ok(s)
}

/// Hand `state` and the FUSE descriptor `fd` to the supervisor at `sock`.
pub fn send(sock: &Path, state: &[u8], fd: BorrowedFd) -> Result<()> {
    let mut s = connect(sock)?;
    if state.is_empty() {
        return Err(Error::Invalid("no state to send".into()));
    }
    let head = &state[..state.len().min(64 << 10)];
    let n = s
        .send_with_fd(head, fd.as_raw_fd())
        .map_err(|e| Error::io("send the state and FUSE fd to the supervisor", e.into()))?;
    let mut rest = state.get(n..).unwrap_or_default();
    while !rest.is_empty() {
        let k = s
            .write(rest)
            .map_err(|e| Error::io("send the state to the supervisor", e))?;
        rest = &rest[k..];
    }
    // EOF tells the supervisor the state is complete.
    let _ = s.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// Connect and hang up at once: the supervisor then stops waiting (it reports "no file descriptor")
/// instead of waiting forever for a state that will not come.
pub fn hang_up(sock: &Path) {
    if let Ok(s) = UnixStream::connect(sock) {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
}

/// Fetch the state bytes and the FUSE descriptor from the supervisor at `sock`.
pub fn receive(sock: &Path) -> Result<(Vec<u8>, File)> {
    let mut s = connect(sock)?;
    let mut data = Vec::new();
    let mut fuse = None;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        // Descriptors travel with the first message; later ones are read the same way and dropped.
        let (n, file) = s
            .recv_with_fd(&mut buf)
            .map_err(|e| Error::io("receive the state from the supervisor", e.into()))?;
        if fuse.is_none() {
            fuse = file;
        }
        if n == 0 {
            break;
        }
        if data.len() + n > MAX_BYTES {
            return Err(Error::Invalid(format!(
                "the supervisor sent more than {MAX_BYTES} bytes of state"
            )));
        }
        data.extend_from_slice(&buf[..n]);
    }
    // Nothing more is expected; make sure nothing is left unread either.
    let _ = s.read(&mut [0u8; 1]);
    if data.is_empty() {
        return Err(Error::NotFound(
            "the supervisor holds no state for this daemon (was PUT /api/v1/daemon/fuse/sendfd ever called?)"
                .into(),
        ));
    }
    let fuse = fuse.ok_or_else(|| {
        Error::Invalid("the supervisor sent the state without the FUSE file descriptor".into())
    })?;
    Ok((data, fuse))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixListener;

    #[test]
    fn state_and_descriptor_round_trip_through_a_supervisor() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let state: Vec<u8> = (0..700_000u32).map(|i| i as u8).collect();
        let file = tempfile::tempfile().unwrap();
        let want = state.clone();
        let keeper = std::thread::spawn(move || {
            // Receive as the snapshotter does, then serve the same bytes and fd back.
            let (c, _) = listener.accept().unwrap();
            let (got, fd) = receive_from(&c);
            assert_eq!(got, want);
            let (c, _) = listener.accept().unwrap();
            c.send_with_fd(&got[..1000], fd.as_raw_fd()).unwrap();
            (&c).write_all(&got[1000..]).unwrap();
        });
        send(&sock, &state, file.as_fd()).unwrap();
        let (back, fd) = receive(&sock).unwrap();
        keeper.join().unwrap();
        assert_eq!(back, state);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fd.metadata().unwrap().ino(), file.metadata().unwrap().ino());
    }

    fn receive_from(c: &UnixStream) -> (Vec<u8>, File) {
        let mut data = Vec::new();
        let mut fd = None;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let (n, f) = c.recv_with_fd(&mut buf).unwrap();
            fd = fd.or(f);
            if n == 0 {
                break;
            }
            data.extend_from_slice(&buf[..n]);
        }
        (data, fd.unwrap())
    }

    #[test]
    fn an_empty_supervisor_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || drop(listener.accept().unwrap()));
        let e = receive(&sock).unwrap_err().to_string();
        t.join().unwrap();
        assert!(e.contains("holds no state"), "{e}");
        assert!(receive(&dir.path().join("missing.sock")).is_err());
    }
}
