//! Bytes with file descriptors (SCM_RIGHTS) over a Unix stream socket: whole vhost-user messages for the
//! [relay](super::relay), length-prefixed frames for the [upgrade](super::upgrade) handover.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Descriptors accepted with one vhost-user message (vhost-user's own limit; a memory table has at
/// most 8).
pub const MAX_MSG_FDS: usize = 32;

/// Read exactly `buf.len()` bytes, keeping every descriptor that comes with them (at most `max_fds`;
/// more is an error). `Ok(false)` when the peer hung up before the first byte.
pub fn read_exact_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    files: &mut Vec<File>,
    max_fds: usize,
) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        // Room for one more than allowed: a message with more is refused, not cut short unnoticed.
        let mut fds = vec![-1 as RawFd; max_fds.saturating_sub(files.len()) + 1];
        let rest = &mut buf[got..];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        // SAFETY: the iovec points into `buf`, which any bytes may fill.
        let (n, nfds) = match unsafe { sock.recv_with_fds(&mut iov, &mut fds) } {
            Ok(r) => r,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        };
        for fd in &fds[..nfds] {
            // SAFETY: the kernel just gave us these descriptors; nothing else owns them.
            files.push(unsafe { File::from_raw_fd(*fd) });
            // Not inherited by a process this one starts (recvmsg without MSG_CMSG_CLOEXEC).
            // SAFETY: fcntl on a descriptor we own.
            unsafe { libc::fcntl(*fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        if files.len() > max_fds {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {max_fds} file descriptors with one message"),
            ));
        }
        if n == 0 {
            if got == 0 && files.is_empty() {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(true)
}

/// Write all of `parts`, the descriptors going with the first byte.
pub fn write_all_fds(sock: &UnixStream, parts: &[&[u8]], fds: &[RawFd]) -> io::Result<()> {
    let data: Vec<u8> = parts.concat();
    let mut sent = 0;
    if !fds.is_empty() {
        sent = loop {
            match sock.send_with_fds(&[&data[..]], fds) {
                Ok(n) => break n,
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
            }
        };
    }
    io::Write::write_all(&mut &*sock, &data[sent..])
}

/// A vhost-user message: the 12-byte header's request code and flags, the payload and descriptors.
pub struct Msg {
    pub request: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
    pub files: Vec<File>,
}

/// vhost-user's limit on a payload (the memory table of 8 regions is 264 bytes).
pub const MAX_PAYLOAD: usize = 0x1000;
/// Header flags: protocol version 1, a reply, a request that wants an ack.
pub const VERSION_1: u32 = 0x1;
pub const FLAG_REPLY: u32 = 0x4;
pub const FLAG_NEED_REPLY: u32 = 0x8;

impl Msg {
    pub fn new(request: u32, payload: Vec<u8>, files: Vec<File>) -> Self {
        Msg {
            request,
            flags: VERSION_1,
            payload,
            files,
        }
    }

    /// The payload's first 8 bytes as a little-endian u64 (the body of most requests).
    /// The (ring index, number) of a SET_VRING_NUM/BASE/ENABLE or GET_VRING_BASE payload.
    pub fn ring_state(&self) -> Option<(u32, u32)> {
        let p = self.payload.get(..8)?;
        Some((
            u32::from_le_bytes(p[..4].try_into().ok()?),
            u32::from_le_bytes(p[4..].try_into().ok()?),
        ))
    }

    pub fn u64(&self) -> Option<u64> {
        Some(u64::from_le_bytes(self.payload.get(..8)?.try_into().ok()?))
    }

    /// Read one message; `None` when the peer hung up between messages.
    pub fn recv(sock: &UnixStream) -> io::Result<Option<Msg>> {
        let mut head = [0u8; 12];
        let mut files = Vec::new();
        if !read_exact_fds(sock, &mut head, &mut files, MAX_MSG_FDS)? {
            return Ok(None);
        }
        let word = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap_or_default());
        let (request, flags, size) = (word(0), word(4), word(8) as usize);
        if size > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("vhost-user message {request} of {size} bytes"),
            ));
        }
        let mut payload = vec![0u8; size];
        if size > 0 && !read_exact_fds(sock, &mut payload, &mut files, MAX_MSG_FDS)? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(Some(Msg {
            request,
            flags,
            payload,
            files,
        }))
    }

    pub fn send(&self, sock: &UnixStream) -> io::Result<()> {
        let mut head = [0u8; 12];
        head[0..4].copy_from_slice(&self.request.to_le_bytes());
        head[4..8].copy_from_slice(&self.flags.to_le_bytes());
        head[8..12].copy_from_slice(&(self.payload.len() as u32).to_le_bytes());
        let fds: Vec<RawFd> = self.files.iter().map(AsRawFd::as_raw_fd).collect();
        write_all_fds(sock, &[&head, &self.payload], &fds)
    }
}

/// Write one frame: a 4-byte length, then `data`, with `fds` attached.
pub fn send_frame(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    write_all_fds(sock, &[&(data.len() as u32).to_le_bytes(), data], fds)
}

/// Read one frame of at most `max` bytes with at most `max_fds` descriptors.
pub fn recv_frame(
    sock: &UnixStream,
    max: usize,
    max_fds: usize,
) -> io::Result<(Vec<u8>, Vec<File>)> {
    let mut files = Vec::new();
    let mut len = [0u8; 4];
    if !read_exact_fds(sock, &mut len, &mut files, max_fds)? {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes, more than {max}"),
        ));
    }
    let mut data = vec![0u8; len];
    if len > 0 && !read_exact_fds(sock, &mut data, &mut files, max_fds)? {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok((data, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-over state carries up to 3 descriptors per ring: more than a vhost-user message's 32 all
    /// arrive, and more than allowed is an error, not a frame quietly missing some.
    #[test]
    fn frames_carry_as_many_descriptors_as_allowed() {
        let f = tempfile::tempfile().unwrap();
        let fds = vec![f.as_raw_fd(); 200];
        let (a, b) = UnixStream::pair().unwrap();
        send_frame(&a, b"S-state", &fds).unwrap();
        let (data, files) = recv_frame(&b, 64, 206).unwrap();
        assert_eq!(data, b"S-state");
        assert_eq!(files.len(), 200);
        for got in &files {
            // SAFETY: plain fcntl query on a descriptor we own.
            let flags = unsafe { libc::fcntl(got.as_raw_fd(), libc::F_GETFD) };
            assert!(flags & libc::FD_CLOEXEC != 0, "close-on-exec");
        }
        send_frame(&a, b"S-state", &fds[..40]).unwrap();
        assert!(recv_frame(&b, 64, 39).is_err(), "one descriptor too many");
    }

    #[test]
    fn messages_and_frames_keep_their_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        Msg::new(5, vec![7; 40], vec![f.try_clone().unwrap()])
            .send(&a)
            .unwrap();
        let m = Msg::recv(&b).unwrap().unwrap();
        assert_eq!((m.request, m.flags, m.payload.len()), (5, VERSION_1, 40));
        assert_eq!(m.files.len(), 1);
        send_frame(&a, &[1, 2, 3], &[f.as_raw_fd(), f.as_raw_fd()]).unwrap();
        let (data, files) = recv_frame(&b, 10, 4).unwrap();
        assert_eq!((data, files.len()), (vec![1, 2, 3], 2));
        send_frame(&a, &[0; 11], &[]).unwrap();
        assert!(recv_frame(&b, 10, 4).is_err(), "a frame over the limit");
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(
            Msg::recv(&b).unwrap().is_none(),
            "a hang-up between messages"
        );
    }
}
