//! The VMM's side of a virtio-fs DAX window: a VIRTIO Shared Memory Region reserved in this process
//! (PROT_NONE, so nothing else can land in it), filled by the device's SHMEM_MAP requests (mmap of the
//! received fd, MAP_FIXED at the requested offset) and emptied by SHMEM_UNMAP (back to PROT_NONE).
//! The backend request channel is served by the vhost crate's `FrontendReqHandler` on its own thread.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{VhostUserMMap, VhostUserMMapFlags};
use vhost::vhost_user::{FrontendReqHandler, HandlerResult, VhostUserFrontendReqHandler};

/// The reserved window. Its mappings are what the guest would see at the window's guest addresses.
pub struct Window {
    base: usize,
    pub size: u64,
    /// (offset, len, writable) of every SHMEM_MAP accepted, and the number of SHMEM_UNMAPs.
    pub maps: Mutex<Vec<(u64, u64, bool)>>,
    pub unmaps: AtomicU64,
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl Window {
    pub fn new(size: u64) -> io::Result<Arc<Self>> {
        // SAFETY: a fresh anonymous reservation; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(Window {
            base: base as usize,
            size,
            maps: Mutex::new(Vec::new()),
            unmaps: AtomicU64::new(0),
        }))
    }

    fn check(&self, req: &VhostUserMMap) -> io::Result<usize> {
        let (off, len) = (req.shm_offset, req.len);
        if req.shmid != 0 || off % 4096 != 0 || len % 4096 != 0 || off + len > self.size {
            return Err(einval());
        }
        Ok(self.base + off as usize)
    }

    /// The bytes at `[offset, offset + len)` of the window, as the guest reads them. Panics (SIGSEGV) on
    /// an unmapped page: use [`Window::is_mapped`] first where that may be the case.
    pub fn bytes(&self, offset: u64, len: u64) -> &[u8] {
        assert!(offset + len <= self.size);
        // SAFETY: inside our reservation; the caller knows these pages are mapped.
        unsafe {
            std::slice::from_raw_parts((self.base + offset as usize) as *const u8, len as usize)
        }
    }

    /// The file-backed ranges of the window, from /proc/self/maps: (window offset, len, backing name).
    pub fn backing(&self) -> Vec<(u64, u64, String)> {
        let base = self.base as u64;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mut out = Vec::new();
        for line in maps.lines() {
            let mut cols = line.split_whitespace();
            let Some((s, e)) = cols.next().and_then(|r| r.split_once('-')) else {
                continue;
            };
            let name = cols.nth(4).unwrap_or("").to_string();
            let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) else {
                continue;
            };
            if s >= base && e <= base + self.size && !name.is_empty() {
                out.push((s - base, e - s, name));
            }
        }
        out
    }

    /// Whether the page at `offset` is readable. Asked of the kernel: `write(2)` of one byte from it into
    /// a pipe copies with fault handling, so an inaccessible page gives EFAULT instead of a SIGSEGV here.
    pub fn is_mapped(&self, offset: u64) -> bool {
        let mut fds = [0; 2];
        // SAFETY: plain syscalls on our own descriptors; the kernel checks the user address for us.
        unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            let n = libc::write(
                fds[1],
                (self.base + offset as usize) as *const libc::c_void,
                1,
            );
            libc::close(fds[0]);
            libc::close(fds[1]);
            n == 1
        }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: our reservation, unmapped once.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size as usize) };
    }
}

impl VhostUserFrontendReqHandler for Window {
    fn shmem_map(&self, req: &VhostUserMMap, fd: &dyn AsRawFd) -> HandlerResult<u64> {
        let at = self.check(req)?;
        let writable = req.flags & VhostUserMMapFlags::WRITABLE.bits() != 0;
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: MAP_FIXED inside our own reservation only (checked above).
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                req.len as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                req.fd_offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.maps
            .lock()
            .unwrap()
            .push((req.shm_offset, req.len, writable));
        Ok(0)
    }

    fn shmem_unmap(&self, req: &VhostUserMMap) -> HandlerResult<u64> {
        let at = self.check(req)?;
        // SAFETY: back to an inaccessible reservation, inside our own window only.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                req.len as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.unmaps.fetch_add(1, Ordering::Relaxed);
        Ok(0)
    }
}

/// Serves the device's backend requests for a window until dropped.
pub struct WindowServer {
    /// The device's end of the channel, to send with SET_BACKEND_REQ_FD.
    pub device_fd: RawFd,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WindowServer {
    pub fn start(window: Arc<Window>) -> io::Result<Self> {
        let mut handler = FrontendReqHandler::new(window)
            .map_err(|e| io::Error::other(format!("backend request handler: {e}")))?;
        handler.set_reply_ack_flag(true);
        let device_fd = handler.get_tx_raw_fd();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: handler.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd on our own socket, bounded wait so `stop` is seen.
                if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
                    continue;
                }
                match handler.handle_request() {
                    // A refused request was answered with its errno; keep serving.
                    Ok(_) | Err(vhost::vhost_user::Error::ReqHandlerError(_)) => {}
                    Err(_) => break,
                }
            }
        });
        Ok(WindowServer {
            device_fd,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for WindowServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
