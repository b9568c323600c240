//! READ replies spliced into /dev/fuse. fuse-backend-rs's writer copies a reply's file data into a buffer
//! of ours (`pread`) and then into the kernel (`writev`, which also pins the buffer's pages); a warm read
//! of the blob cache spent most of the daemon's CPU on those two copies. Here the cache file's pages go by
//! reference into a pipe (`splice`), and the kernel copies them once, from the pipe into the reader's page
//! cache. Bytes fetched from the backend and zeros for holes are written into the pipe (one copy each, as
//! before).
//!
//! A whole reply must sit in the pipe before it is spliced into the device, and a pipe holds a page per
//! slot: a 1 MiB reply and its header take 257, one more than the largest pipe an unprivileged process may
//! have by default (`fs.pipe-max-size`, 1 MiB). So INIT's answer asks for READs of at most
//! [`init_max_pages`] pages when the largest pipe a worker gets is smaller than 2 MiB: 252 pages (1008 KiB)
//! for a 1 MiB pipe. A worker's pipe has the ordinary 16 slots while idle and grows for a large reply only
//! while it is in the pipe: the kernel counts every pipe's slots against the user (`pipe-user-pages-soft`),
//! so large pipes kept open by every worker of every daemon would leave the user's other processes with
//! tiny pipes. The pipe is never waited on: a reply that does not fit after all (cache ranges starting
//! mid-page take a slot more each; the pipe could not grow), or any other failure of the pipe, throws the
//! reply away and the request goes to the server, which copies it as before.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader, ReadIn};
use vm_memory::ByteValued;

use crate::daemon::RafsRead;
use crate::fs::{RafsFs, ReadReply, ZERO_PAGE};

const PAGE: usize = 4096;
/// The largest READ fuse-backend-rs negotiates: 256 pages.
const MAX_READ: usize = 256 * PAGE;
/// Room for a 1 MiB reply, its header and a page more for each cache range that starts mid-page.
const FULL_PIPE: usize = 2 * MAX_READ;
/// A pipe's size while no large reply is in it: the kernel's default.
const IDLE_PIPE: usize = 16 * PAGE;
/// Pages a reply needs beyond its data: the header's, and slack for cache ranges starting mid-page.
const SLACK_PAGES: usize = 4;

/// One worker's pipe for spliced replies.
pub struct ReplyPipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What the pipe holds now, in bytes (a page per slot).
    capacity: usize,
}

/// The most pages a READ should ask for so that its reply fits the largest pipe this process gets; `None`
/// when 1 MiB READs fit (or when pipes cannot grow even to 1 MiB, where smaller READs would only slow the
/// copying path down).
pub fn init_max_pages() -> Option<u16> {
    let mut pipe = ReplyPipe::new().ok()?;
    if pipe.grow(FULL_PIPE) {
        return None;
    }
    if !pipe.grow(MAX_READ) {
        return None;
    }
    Some((pipe.capacity / PAGE - SLACK_PAGES) as u16)
}

impl ReplyPipe {
    /// A non-blocking pipe of the ordinary size.
    pub fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 returns.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned here only.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut pipe = ReplyPipe {
            read,
            write,
            capacity: 0,
        };
        // SAFETY: fcntl on a descriptor we own.
        let size = unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        pipe.capacity = size as usize;
        Ok(pipe)
    }

    /// The write end, for a writer that fills the pipe (INIT's answer).
    pub fn write_fd(&self) -> RawFd {
        self.write.as_raw_fd()
    }

    /// Everything in the pipe.
    pub fn take_all(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading into a live buffer of its length from a descriptor we own.
            let n =
                unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
    }

    /// Make the pipe hold at least `bytes`; false when the system allows no pipe that large.
    fn grow(&mut self, bytes: usize) -> bool {
        if self.capacity >= bytes {
            return true;
        }
        self.resize(bytes)
    }

    /// Give back what a large reply needed (the pipe is empty by then).
    fn shrink(&mut self) {
        if self.capacity > IDLE_PIPE {
            self.resize(IDLE_PIPE);
        }
    }

    fn resize(&mut self, bytes: usize) -> bool {
        // SAFETY: fcntl on a descriptor we own.
        let size = unsafe { libc::fcntl(self.write.as_raw_fd(), libc::F_SETPIPE_SZ, bytes as i32) };
        if size < 0 {
            return false;
        }
        self.capacity = size as usize;
        true
    }

    /// Answer `read` with the file's data spliced into the FUSE device `dev`; false when the server is
    /// to answer it instead (the reply could not go through the pipe).
    pub fn reply(&mut self, read: &RafsRead, header: &InHeader, dev: RawFd) -> bool {
        let (fs, ino, read_in) = (read.rafs(), read.ino, &read.read_in);
        let size = read_in.size as usize;
        let Some(expected) = fs.read_size(ino, read_in.offset, size) else {
            return false;
        };
        if size > MAX_READ || !self.grow(expected + 2 * PAGE) {
            return false;
        }
        let answered = self.send(fs, ino, header, read_in, expected, dev);
        self.shrink();
        answered
    }

    /// [`Self::reply`] once the pipe is large enough for `expected` bytes of data.
    fn send(
        &mut self,
        fs: &RafsFs,
        ino: u64,
        header: &InHeader,
        read_in: &ReadIn,
        expected: usize,
        dev: RawFd,
    ) -> bool {
        let out = OutHeader {
            len: (std::mem::size_of::<OutHeader>() + expected) as u32,
            error: 0,
            unique: header.unique,
        };
        let mut body = PipeBody {
            pipe: self.write.as_raw_fd(),
            room: read_in.size as usize,
            refused: false,
        };
        let answer = body
            .bytes(out.as_slice())
            .and_then(|()| fs.read_into(ino, &mut body, read_in.size, read_in.offset));
        match answer {
            Ok(n) if n == expected => {
                let len = out.len as usize;
                match splice(self.read.as_raw_fd(), None, dev, len) {
                    Ok(_) => return true,
                    // The kernel takes the message out of the pipe before it looks at it: once taken,
                    // the request is answered (an error the kernel gave the caller itself, or a request
                    // interrupted meanwhile). Only a message left whole in the pipe goes to the server.
                    Err(e) if self.held() < len => {
                        log::debug!("FUSE reply of {len} bytes spliced: {e}");
                        self.drain();
                        return true;
                    }
                    Err(_) => {}
                }
            }
            // An error of the read itself (not of the pipe) is the answer, as the server would give it.
            Err(e) if !body.refused => {
                self.drain();
                let error = OutHeader {
                    len: std::mem::size_of::<OutHeader>() as u32,
                    error: -e.raw_os_error().unwrap_or(libc::EIO),
                    unique: header.unique,
                };
                if let Err(e) = super::write_fuse(dev, error) {
                    log::debug!("FUSE reply: {e}");
                }
                return true;
            }
            _ => {}
        }
        // The pipe could not take the reply (rare: it takes many cache ranges starting mid-page).
        self.drain();
        false
    }

    /// Empty the pipe and give back its room, whatever state a reply left it in.
    pub fn reset(&mut self) {
        self.drain();
        self.shrink();
    }

    /// The bytes in the pipe.
    fn held(&self) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        if unsafe { libc::ioctl(self.read.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
            return 0;
        }
        n as usize
    }

    /// Empty the pipe of a reply that was not sent whole.
    fn drain(&mut self) {
        let mut scratch = [0u8; 16384];
        loop {
            // SAFETY: reading into a live buffer of its length from a descriptor we own.
            let n = unsafe {
                libc::read(
                    self.read.as_raw_fd(),
                    scratch.as_mut_ptr().cast(),
                    scratch.len(),
                )
            };
            if n <= 0 {
                return;
            }
        }
    }
}

/// `splice(from, offset, to, NULL, len)`: returns the bytes moved.
fn splice(from: RawFd, offset: Option<&mut i64>, to: RawFd, len: usize) -> io::Result<usize> {
    let off = offset.map_or(std::ptr::null_mut(), |o| o as *mut i64);
    // SAFETY: plain system call on descriptors the caller keeps open; `off` is null or a live i64.
    let n = unsafe {
        libc::splice(
            from,
            off,
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// A reply's body going into the pipe's write end; `refused` once the pipe failed (full, or any other
/// error of its own): the reply then goes through the server, not to the caller as an error.
struct PipeBody {
    pipe: RawFd,
    room: usize,
    refused: bool,
}

impl PipeBody {
    fn refused(&mut self, e: io::Error) -> io::Error {
        self.refused = true;
        e
    }
}

impl ReadReply for PipeBody {
    fn room(&self) -> usize {
        self.room
    }

    fn refused(&self) -> bool {
        self.refused
    }

    fn cached(&mut self, fd: RawFd, offset: u64, len: usize) -> io::Result<()> {
        let mut at = offset as i64;
        let end = at + len as i64;
        while at < end {
            let want = (end - at) as usize;
            match splice(fd, Some(&mut at), self.pipe, want) {
                Ok(0) => return Err(self.refused(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.refused(e)),
            }
        }
        Ok(())
    }

    fn bytes(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            // SAFETY: writing a live buffer of its length to a descriptor the pipe owns.
            let n = unsafe { libc::write(self.pipe, data.as_ptr().cast(), data.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.refused(e));
            }
            data = &data[n as usize..];
        }
        Ok(())
    }

    fn zeros(&mut self, mut len: usize) -> io::Result<()> {
        while len > 0 {
            let k = len.min(ZERO_PAGE.len());
            self.bytes(&ZERO_PAGE[..k])?;
            len -= k;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(bytes: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn a_reply_goes_into_the_pipe_piece_by_piece_in_order() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let file = file_of(&data);
        let mut pipe = ReplyPipe::new().unwrap();
        assert!(pipe.grow(256 * 1024));
        let mut body = PipeBody {
            pipe: pipe.write.as_raw_fd(),
            room: 1 << 20,
            refused: false,
        };
        body.bytes(b"header--16-bytes").unwrap();
        // A range starting mid-page, then zeros for a hole, fetched bytes, another cache range.
        body.cached(file.as_raw_fd(), 5000, 40_000).unwrap();
        body.zeros(10_000).unwrap();
        body.bytes(b"fetched").unwrap();
        body.cached(file.as_raw_fd(), 0, 4096).unwrap();
        let mut want = b"header--16-bytes".to_vec();
        want.extend_from_slice(&data[5000..45_000]);
        want.extend_from_slice(&[0; 10_000]);
        want.extend_from_slice(b"fetched");
        want.extend_from_slice(&data[..4096]);
        let got = pipe.take_all();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the pipe holds other bytes than the reply's");
        assert!(!body.refused);
    }

    #[test]
    fn a_reply_larger_than_the_pipe_is_refused_at_once_and_drained() {
        let data = vec![7u8; 512 * 1024];
        let file = file_of(&data);
        let mut pipe = ReplyPipe::new().unwrap();
        assert_eq!(pipe.capacity, IDLE_PIPE, "a new pipe has the ordinary size");
        let mut body = PipeBody {
            pipe: pipe.write.as_raw_fd(),
            room: 1 << 20,
            refused: false,
        };
        // Never waits for a reader of the pipe: a full pipe is an error, and says so.
        let e = body.cached(file.as_raw_fd(), 0, data.len()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(body.refused);
        let mut body = PipeBody {
            pipe: pipe.write.as_raw_fd(),
            room: 1 << 20,
            refused: false,
        };
        assert!(body.zeros(128 * 1024).is_err() && body.refused);
        // Thrown away, the pipe is empty for the next reply.
        pipe.drain();
        assert!(pipe.take_all().is_empty());
        let mut body = PipeBody {
            pipe: pipe.write.as_raw_fd(),
            room: 1 << 20,
            refused: false,
        };
        body.bytes(b"next").unwrap();
        assert_eq!(pipe.take_all(), b"next");
    }

    #[test]
    fn a_pipe_grows_for_a_reply_and_gives_the_room_back() {
        let mut pipe = ReplyPipe::new().unwrap();
        // fs.pipe-max-size (1 MiB by default) is what any process may have.
        let max: usize = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(pipe.grow(max.min(MAX_READ)));
        assert!(pipe.capacity >= max.min(MAX_READ));
        pipe.shrink();
        assert_eq!(pipe.capacity, IDLE_PIPE);
        // INIT asks for READs whose replies fit the largest pipe, when that is under 2 MiB.
        let full = ReplyPipe::new().unwrap().grow(FULL_PIPE);
        match init_max_pages() {
            Some(pages) => {
                assert!(!full, "{pages} pages asked though a 2 MiB pipe can be had");
                assert_eq!(pages as usize, MAX_READ / PAGE - SLACK_PAGES);
            }
            None => assert!(
                full || max < MAX_READ,
                "1 MiB READs do not fit a pipe of {max}"
            ),
        }
    }
}
