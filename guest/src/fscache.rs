//! `rafs-guest fscache`: the EROFS-over-fscache on-demand daemon. The kernel (CONFIG_EROFS_FS_ONDEMAND,
//! CONFIG_CACHEFILES_ONDEMAND) asks through /dev/cachefiles for every piece of the image it lacks in its
//! cache: OPEN names a cookie (the fsid for the bootstrap, a device tag = blob id for a blob) and hands us
//! an anonymous fd onto the cache file; READ asks for a range, which we copy from the source (the blob view
//! that rafsd serves, i.e. uncompressed blobs) into that fd before completing the request; CLOSE drops it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::sys;

const OP_OPEN: u32 = 0;
const OP_CLOSE: u32 = 1;
const OP_READ: u32 = 2;
const MSG_HEADER: usize = 16;
/// `_IOW(0x98, 1, int)`.
const CACHEFILES_IOC_READ_COMPLETE: libc::c_ulong = 0x4004_9801;
/// Copy granularity for READ requests.
const COPY_BUF: usize = 1 << 20;

pub struct FscacheArgs {
    /// The cachefiles cache directory (on a filesystem with xattrs, e.g. tmpfs).
    pub cache_dir: PathBuf,
    pub bootstrap: PathBuf,
    pub blob_dir: PathBuf,
    /// The fsid the image is mounted with (`mount -t erofs none T -o fsid=FSID`).
    pub fsid: String,
    /// Mount the image at this target once the daemon is bound.
    pub mount: Option<PathBuf>,
}

/// An opened cookie: the kernel's anonymous cache-file fd and where its bytes come from.
struct Object {
    anon: File,
    source: File,
    size: u64,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A key from an OPEN message: NUL-terminated string of `len` bytes.
fn key(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

pub fn run(args: &FscacheArgs) -> Result<(), String> {
    std::fs::create_dir_all(&args.cache_dir)
        .map_err(|e| format!("create {}: {e}", args.cache_dir.display()))?;
    let mut dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/cachefiles")
        .map_err(|e| {
            format!("/dev/cachefiles: {e} (a kernel with CONFIG_CACHEFILES and CONFIG_CACHEFILES_ONDEMAND is needed)")
        })?;
    let dir = args.cache_dir.to_str().ok_or("cache dir is not UTF-8")?;
    // No `tag`: EROFS asks for the default cache.
    for cmd in [format!("dir {dir}"), "bind ondemand".into()] {
        dev.write_all(cmd.as_bytes()).map_err(|e| {
            let hint = if cmd == "bind ondemand" && e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                " (a kernel without CONFIG_CACHEFILES_ONDEMAND, or a cache directory on a filesystem cachefiles cannot use: it needs user xattrs, O_TMPFILE and sync_fs, e.g. ext4, xfs or ext2 -o user_xattr, not tmpfs)"
            } else {
                ""
            };
            format!("/dev/cachefiles: {cmd:?}: {e}{hint}")
        })?;
    }
    eprintln!("rafs-guest fscache: bound {} in on-demand mode", dir);
    if let Some(target) = args.mount.clone() {
        let fsid = args.fsid.clone();
        // mount(2) blocks until the kernel has opened the bootstrap through us: run it beside the loop.
        std::thread::spawn(move || {
            let opts = format!("fsid={fsid}");
            match sys::mount(
                std::path::Path::new("none"),
                &target,
                "erofs",
                libc::MS_RDONLY,
                &opts,
            ) {
                Ok(()) => eprintln!(
                    "rafs-guest fscache: mounted fsid {fsid} on {}",
                    target.display()
                ),
                Err(e) => {
                    // Nothing to serve without the mount: fail the daemon so the caller sees it.
                    eprintln!(
                        "rafs-guest: error: mount -t erofs -o {opts} none {}: {e}; kernel log: {:?}",
                        target.display(),
                        sys::kernel_log_lines("erofs:")
                    );
                    std::process::exit(1);
                }
            }
        });
    }
    let verbose = std::env::var_os("RAFS_GUEST_VERBOSE").is_some();
    let mut copy_buf = AlignedBuf::new(COPY_BUF);
    let mut objects: HashMap<u32, Object> = HashMap::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let mut pfd = libc::pollfd {
            fd: dev.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll /dev/cachefiles: {e}"));
        }
        // SAFETY: reading into our buffer from our descriptor.
        let n = unsafe { libc::read(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
                continue;
            }
            return Err(format!("read /dev/cachefiles: {e}"));
        }
        let msg = &buf[..n as usize];
        if msg.len() < MSG_HEADER {
            continue;
        }
        let (msg_id, opcode, object_id) = (u32_at(msg, 0), u32_at(msg, 4), u32_at(msg, 12));
        let body = &msg[MSG_HEADER..];
        if verbose {
            eprintln!("rafs-guest fscache: message {msg_id} opcode {opcode} object {object_id} body {body:02x?}");
        }
        match opcode {
            OP_OPEN => {
                let reply = open(args, &mut objects, msg_id, object_id, body);
                dev.write_all(reply.as_bytes())
                    .map_err(|e| format!("/dev/cachefiles: {reply:?}: {e}"))?;
            }
            OP_READ if body.len() >= 16 => {
                let (off, len) = (u64_at(body, 0), u64_at(body, 8));
                match objects.get(&object_id) {
                    Some(obj) => {
                        if let Err(e) = fill(obj, &mut copy_buf, off, len) {
                            // The kernel sees the range still missing and fails the read with EIO.
                            eprintln!(
                                "rafs-guest fscache: object {object_id} read {off}+{len}: {e}"
                            );
                        }
                        // SAFETY: ioctl on the anonymous fd the kernel gave us, with the request id.
                        unsafe {
                            libc::ioctl(
                                obj.anon.as_raw_fd(),
                                CACHEFILES_IOC_READ_COMPLETE as _,
                                msg_id as libc::c_ulong,
                            )
                        };
                    }
                    None => eprintln!("rafs-guest fscache: READ for unknown object {object_id}"),
                }
            }
            OP_CLOSE => {
                objects.remove(&object_id);
            }
            other => eprintln!("rafs-guest fscache: ignoring message opcode {other}"),
        }
    }
}

/// Answer OPEN: find the cookie's source, keep the anonymous fd, reply `copen ID,SIZE` (or a -errno).
fn open(
    args: &FscacheArgs,
    objects: &mut HashMap<u32, Object>,
    msg_id: u32,
    object_id: u32,
    body: &[u8],
) -> String {
    if body.len() < 16 {
        return format!("copen {msg_id},{}", -libc::EINVAL);
    }
    let (vlen, clen, fd) = (
        u32_at(body, 0) as usize,
        u32_at(body, 4) as usize,
        u32_at(body, 8),
    );
    // SAFETY: the kernel installed this fd in our table for us; we own it from here on.
    let anon = unsafe { File::from_raw_fd(fd as i32) };
    let keys = &body[16..];
    if keys.len() < vlen + clen {
        return format!("copen {msg_id},{}", -libc::EINVAL);
    }
    let volume = key(&keys[..vlen]);
    let cookie = key(&keys[vlen..vlen + clen]);
    if objects.contains_key(&object_id) {
        return format!("copen {msg_id},{}", -libc::EALREADY);
    }
    let path = if cookie == args.fsid {
        args.bootstrap.clone()
    } else if !cookie.is_empty() && !cookie.contains('/') && cookie != ".." {
        args.blob_dir.join(&cookie)
    } else {
        eprintln!("rafs-guest fscache: volume {volume:?}: refusing cookie {cookie:?}");
        return format!("copen {msg_id},{}", -libc::ENOENT);
    };
    let source = match File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "rafs-guest fscache: volume {volume:?} cookie {cookie:?}: {}: {e}",
                path.display()
            );
            return format!(
                "copen {msg_id},{}",
                -e.raw_os_error().unwrap_or(libc::ENOENT)
            );
        }
    };
    let size = match source.metadata() {
        Ok(m) => m.len(),
        Err(e) => return format!("copen {msg_id},{}", -e.raw_os_error().unwrap_or(libc::EIO)),
    };
    eprintln!(
        "rafs-guest fscache: open {volume}/{cookie} → {} ({size} bytes)",
        path.display()
    );
    objects.insert(object_id, Object { anon, source, size });
    format!("copen {msg_id},{size}")
}

/// Block alignment of writes into the cache file: cachefiles writes its backing files with O_DIRECT, so
/// the buffer, the offset and the length must all be aligned.
const ALIGN: usize = 4096;

/// A zeroed, `ALIGN`-aligned buffer for O_DIRECT writes.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, ALIGN).expect("valid layout");
        // SAFETY: the layout has a non-zero size (COPY_BUF).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `len` initialised bytes owned by us.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, ALIGN).expect("valid layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// Copy `[off, off + len)` of the source into the cache file, widened to whole blocks (zeros past the
/// end of the source).
fn fill(obj: &Object, buf: &mut AlignedBuf, off: u64, len: u64) -> io::Result<()> {
    let start = off - off % ALIGN as u64;
    let end = obj.size.min(off.saturating_add(len));
    let mut pos = start;
    while pos < end {
        let n = ((end - pos) as usize).min(buf.len);
        let padded = n.div_ceil(ALIGN) * ALIGN;
        let data = &mut buf.as_mut()[..padded];
        obj.source.read_exact_at(&mut data[..n], pos)?;
        data[n..].fill(0);
        obj.anon.write_all_at(data, pos)?;
        pos += n as u64;
    }
    Ok(())
}
