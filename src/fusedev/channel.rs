//! One FUSE worker's connection to /dev/fuse: waits for a request, reads it into the worker's own buffer
//! and hands the server a reader over the request and a writer over a separate reply buffer.
//!
//! Why not fuse-backend-rs's `FuseChannel`: every one of its channels polls the shared device file with
//! a plain (level-triggered, non-exclusive) epoll, so each request wakes every idle worker, and all but
//! one of them find nothing to read (EAGAIN) and go back to sleep: with 4 workers, 4 wake-ups and 7
//! system calls per request. Here a worker that has just answered a request tries the next one
//! straight away (one `read`, no poll, while requests are queued) and otherwise sleeps in an epoll
//! registered with EPOLLEXCLUSIVE, which the kernel wakes one at a time. Its reply buffer is also
//! separate from the request buffer, so the reply never aliases the request it answers.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader};

/// The largest request or reply: fuse-backend-rs negotiates 256 of the host's pages per request
/// (`max_write`: 1 MiB with 4 KiB pages, 16 MiB with 64 KiB ones), plus a page for the headers. The
/// kernel refuses to hand a request to a smaller buffer (EINVAL on every read of /dev/fuse), so the
/// size follows the host's page size.
pub fn buf_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (256 + 1) * usize::try_from(page).unwrap_or(4096).max(4096)
}

/// Told once to every worker: stop taking requests.
pub struct Stop {
    requested: AtomicBool,
    /// Readable once stop is requested; every worker's epoll watches it (not exclusively).
    event: OwnedFd,
}

impl Stop {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain system call; the descriptor is owned right away.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Stop {
            requested: AtomicBool::new(false),
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            event: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Wake every worker; each ends once it has answered the request it is on.
    pub fn request(&self) -> io::Result<()> {
        self.requested.store(true, Ordering::SeqCst);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a live buffer to our eventfd.
        let n = unsafe { libc::write(self.event.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}

pub struct Channel {
    /// A duplicate of the connection's descriptor (the same open file: all workers share the kernel's
    /// queue), non-blocking.
    dev: File,
    epoll: OwnedFd,
    request: Vec<u8>,
    reply: Vec<u8>,
}

const DEV: u64 = 0;
const STOP: u64 = 1;

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn watch(epoll: RawFd, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: both descriptors are open; `ev` lives across the call.
    check(unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(|_| ())
}

impl Channel {
    pub fn new(dev: &File, stop: &Stop) -> io::Result<Self> {
        let dev = dev.try_clone()?;
        let fd = dev.as_raw_fd();
        // The descriptor may come from a supervisor (takeover): make sure a read never blocks, so that
        // a worker always gets back to its epoll and sees a stop request.
        // SAFETY: fcntl on an open descriptor.
        let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
        if flags & libc::O_NONBLOCK == 0 {
            check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
        }
        // SAFETY: plain system call; the descriptor is owned right away.
        let epoll =
            unsafe { OwnedFd::from_raw_fd(check(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        watch(
            epoll.as_raw_fd(),
            fd,
            (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
            DEV,
        )?;
        watch(
            epoll.as_raw_fd(),
            stop.event.as_raw_fd(),
            libc::EPOLLIN as u32,
            STOP,
        )?;
        Ok(Channel {
            dev,
            epoll,
            // Zeroed allocations this large come from fresh mappings: only the pages a request or a
            // reply touches count towards the daemon's memory.
            request: vec![0; buf_size()],
            reply: vec![0; buf_size()],
        })
    }

    /// The next request, with a writer for its reply; `None` once a stop is requested or the
    /// connection is gone (unmounted, aborted).
    pub fn next(&mut self, stop: &Stop) -> io::Result<Option<(Reader<'_>, FuseDevWriter<'_>)>> {
        let fd = self.dev.as_raw_fd();
        let len = loop {
            if stop.requested() {
                return Ok(None);
            }
            // SAFETY: reading into our own buffer of that length.
            let n = unsafe { libc::read(fd, self.request.as_mut_ptr().cast(), self.request.len()) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => self.wait()?,
                // ENOENT: the request was interrupted before we read it.
                Some(libc::EINTR | libc::ENOENT) => {}
                Some(libc::ENODEV) => {
                    log::info!("FUSE connection ended (unmounted)");
                    return Ok(None);
                }
                _ => return Err(e),
            }
        };
        let reader = Reader::from_fuse_buffer(FuseBuf::new(&mut self.request[..len]))
            .map_err(|e| io::Error::other(format!("FUSE request buffer: {e}")))?;
        let writer = FuseDevWriter::new(fd, &mut self.reply)
            .map_err(|e| io::Error::other(format!("FUSE reply buffer: {e}")))?;
        Ok(Some((reader, writer)))
    }

    /// A writer over the reply buffer, for a request read earlier (one that waited for a cold slot, see `crate::cold_slots`).
    pub fn writer(&mut self) -> io::Result<FuseDevWriter<'_>> {
        FuseDevWriter::new(self.dev.as_raw_fd(), &mut self.reply)
            .map_err(|e| io::Error::other(format!("FUSE reply buffer: {e}")))
    }

    /// Sleep until a request may be there or a stop is requested.
    fn wait(&self) -> io::Result<()> {
        // SAFETY: all-zero is a valid epoll_event.
        let mut events: [libc::epoll_event; 2] = unsafe { std::mem::zeroed() };
        // SAFETY: the buffer holds `events.len()` entries.
        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_backend_rs::abi::fuse_abi::{InHeader, WriteIn};

    /// The buffer takes the largest WRITE the server's INIT answer allows (`max_write`, 256 of the
    /// host's pages), which the kernel checks before it hands a request over.
    #[test]
    fn the_buffer_holds_the_largest_write_the_server_negotiates() {
        let max_write = 256 * fuse_backend_rs::transport::pagesize();
        let headers = std::mem::size_of::<InHeader>() + std::mem::size_of::<WriteIn>();
        assert!(buf_size() >= headers + max_write);
    }
}
