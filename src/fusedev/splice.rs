//! READ replies spliced into /dev/fuse. fuse-backend-rs's writer copies a reply's file data into a buffer
//! of ours (`pread`) and then into the kernel (`writev`, which also pins the buffer's pages); a warm read
//! of the blob cache spent most of the daemon's CPU on those two copies. Here the cache file's pages go by
//! reference into a pipe (`splice`), and the kernel copies them once, from the pipe into the reader's page
//! cache. Bytes fetched from the backend and zeros for holes are written into the pipe (one copy each, as
//! before).
//!
//! A whole reply must sit in the pipe before it is spliced into the device, and a pipe holds a page per
//! slot: a 1 MiB reply and its header take 257, one more than the 1 MiB pipe an unprivileged process may
//! have (`fs.pipe-max-size`). So each worker asks for a 2 MiB pipe (granted to root with
//! CAP_SYS_RESOURCE) and takes what it gets; a READ too large for its pipe goes to the server, which copies
//! it as before. The pipe is never waited on: a reply that does not fit after all (cache ranges starting
//! mid-page take a slot more each) is thrown away and the request goes to the server instead.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader, ReadIn};
use fuse_backend_rs::transport::Reader;
use vm_memory::ByteValued;

use crate::daemon::RafsIndex;
use crate::fs::{RafsFs, ReadReply, ZERO_PAGE};

const PAGE: usize = 4096;
/// The largest READ the kernel sends: the 256 pages fuse-backend-rs negotiates.
const MAX_READ: usize = 256 * PAGE;
/// Room for a 1 MiB reply, its header and a page more for each cache range that starts mid-page.
pub const PIPE_BYTES: usize = 2 * MAX_READ;
/// A smaller pipe is not worth its descriptors.
const MIN_PIPE_BYTES: usize = 64 * PAGE;

/// One worker's pipe for spliced replies.
pub struct ReplyPipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What the pipe holds, in bytes (a page per slot).
    capacity: usize,
}

impl ReplyPipe {
    /// A non-blocking pipe of [`PIPE_BYTES`], or of the most the system allows; an error when that is
    /// less than [`MIN_PIPE_BYTES`].
    pub fn new() -> io::Result<Self> {
        let mut size = PIPE_BYTES;
        loop {
            match Self::with_capacity(size) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) && size > MIN_PIPE_BYTES => {
                    size /= 2
                }
                other => return other,
            }
        }
    }

    /// What the pipe holds, in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn with_capacity(bytes: usize) -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 returns.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned here only.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, bytes as i32) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ReplyPipe {
            read,
            write,
            capacity: size as usize,
        })
    }

    /// Answer the READ `reader` holds (`header` already read from it) with the data of the RAFS file
    /// it names, spliced into the FUSE device `dev`; false when the server is to answer it instead (not
    /// a RAFS file, or a reply too large for the pipe).
    pub fn reply(
        &mut self,
        index: &RafsIndex,
        header: &InHeader,
        reader: &Reader<'_>,
        dev: RawFd,
    ) -> bool {
        let Some((fs, ino)) = index.get(header.nodeid) else {
            return false;
        };
        let Some(fs) = fs.as_any().downcast_ref::<RafsFs>() else {
            return false;
        };
        let mut r = reader.clone();
        let Ok(read_in) = r
            .read_obj::<InHeader>()
            .and_then(|_| r.read_obj::<ReadIn>())
        else {
            return false;
        };
        let size = read_in.size as usize;
        let Some(expected) = fs.read_size(ino, read_in.offset, size) else {
            return false;
        };
        // The header's page, and one more should the data start mid-page.
        if size > MAX_READ || size + 2 * PAGE > self.capacity {
            return false;
        }
        let out = OutHeader {
            len: (std::mem::size_of::<OutHeader>() + expected) as u32,
            error: 0,
            unique: header.unique,
        };
        let mut body = PipeBody {
            pipe: self.write.as_raw_fd(),
            room: size,
            full: false,
        };
        let answer = body
            .bytes(out.as_slice())
            .and_then(|()| fs.read_into(ino, &mut body, read_in.size, read_in.offset));
        match answer {
            Ok(n) if n == expected => {
                let len = out.len as usize;
                match splice(self.read.as_raw_fd(), None, dev, len) {
                    Ok(n) if n == len => return true,
                    // Not taken (the request was interrupted meanwhile, or the message refused): the
                    // server answers it the usual way.
                    Ok(_) | Err(_) => {}
                }
            }
            // An error of the read itself (not of the pipe) is the answer, as the server would give it.
            Err(e) if !body.full => {
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
        // The pipe could not hold the reply (its data counted in the metrics twice, as it is read
        // again by the server: rare, as it takes many cache ranges starting mid-page).
        self.drain();
        false
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

/// A reply's body going into the pipe's write end; `full` once the pipe refused bytes.
struct PipeBody {
    pipe: RawFd,
    room: usize,
    full: bool,
}

impl PipeBody {
    fn refused(&mut self, e: io::Error) -> io::Error {
        if e.kind() == io::ErrorKind::WouldBlock {
            self.full = true;
        }
        e
    }
}

impl ReadReply for PipeBody {
    fn room(&self) -> usize {
        self.room
    }

    fn cached(&mut self, fd: RawFd, offset: u64, len: usize) -> io::Result<()> {
        let mut at = offset as i64;
        let end = at + len as i64;
        while at < end {
            let want = (end - at) as usize;
            match splice(fd, Some(&mut at), self.pipe, want) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
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

    fn pipe_contents(pipe: &ReplyPipe) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            // SAFETY: reading into a live buffer of its length.
            let n =
                unsafe { libc::read(pipe.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
    }

    fn file_of(bytes: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn a_reply_goes_into_the_pipe_piece_by_piece_in_order() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let file = file_of(&data);
        let pipe = ReplyPipe::with_capacity(256 * 1024).unwrap();
        let mut body = PipeBody {
            pipe: pipe.write.as_raw_fd(),
            room: 1 << 20,
            full: false,
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
        let got = pipe_contents(&pipe);
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the pipe holds other bytes than the reply's");
        assert!(!body.full);
    }

    #[test]
    fn a_reply_larger_than_the_pipe_is_refused_at_once_and_drained() {
        let data = vec![7u8; 512 * 1024];
        let file = file_of(&data);
        let mut pipe = ReplyPipe::with_capacity(64 * 1024).unwrap();
        assert_eq!(pipe.capacity(), 64 * 1024);
        let mut body = PipeBody {
            pipe: pipe.write.as_raw_fd(),
            room: 1 << 20,
            full: false,
        };
        // Never waits for a reader of the pipe: a full pipe is an error, and says so.
        let e = body.cached(file.as_raw_fd(), 0, data.len()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(body.full);
        let mut body = PipeBody {
            pipe: pipe.write.as_raw_fd(),
            room: 1 << 20,
            full: false,
        };
        assert!(body.zeros(128 * 1024).is_err() && body.full);
        // Thrown away, the pipe is empty for the next reply.
        pipe.drain();
        assert!(pipe_contents(&pipe).is_empty());
        let mut body = PipeBody {
            pipe: pipe.write.as_raw_fd(),
            room: 1 << 20,
            full: false,
        };
        body.bytes(b"next").unwrap();
        assert_eq!(pipe_contents(&pipe), b"next");
    }

    #[test]
    fn a_pipe_is_made_as_large_as_the_system_allows() {
        let pipe = ReplyPipe::new().unwrap();
        // 2 MiB for a process with CAP_SYS_RESOURCE, else fs.pipe-max-size (1 MiB by default).
        let max: usize = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            pipe.capacity() >= max.min(PIPE_BYTES),
            "{}",
            pipe.capacity()
        );
        assert!(pipe.capacity() <= PIPE_BYTES);
    }
}
