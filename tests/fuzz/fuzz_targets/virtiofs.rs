//! Fuzz the guest's side of the virtio-fs device: arbitrary FUSE request sequences, FUSE_INIT first, fed
//! to the same `Server<Vfs>` and per-request path (`rafsd::vhost_user::handle_request`: opcode screening,
//! the DAX window's admission, dispatch) that `rafsd virtiofs` runs for every descriptor chain.
//!
//! Transport: fuse-backend-rs's virtio-fs `Reader` / `VirtioFsWriter` over descriptor chains in an
//! in-memory guest RAM (vm-memory), laid out with virtio-queue's mock split queue, as the device's queue
//! workers build them. That is the transport a hostile guest reaches (the fusedev transport only ever
//! carries requests from the host kernel), and it brings chains split into several readable and writable
//! descriptors, undersized reply buffers and SETUPMAPPING with a DAX window along.
//!
//! The `Vfs` is built as `rafsd virtiofs` builds it, through `Daemon::mount`: a RAFS v6 image (blob cache,
//! digest validation, every per-file metric on) at /rafs, a RAFS v5 image without a cache at /v5, the v6
//! image's blob view at /blobs, and a passthrough share of a scratch directory at /share (re-created for
//! every input). The DAX window is the device's `DaxWindow` over a real backend channel, answered by the
//! test VMM of kit::frontend::window (mmap of each received fd into a reserved region).
//!
//! Checks beyond "no panic, no hang, no runaway memory": every reply's header names the request and the
//! length the server reports; every byte of a RAFS or blob-view range the device maps into the window
//! can be read (a map past the end of a cache file would SIGBUS the VMM).
//!
//! Safety net: the share is writable and the fuzzer runs as root, so the process first moves into a
//! private mount namespace whose root mount is read-only; only /dev/shm (the scratch space) and this
//! directory (corpus and artifacts) stay writable. File sizes are capped by RLIMIT_FSIZE.
//!
//! Input format (see tests/fuzz/README.md): a u32 XORed into FUSE_INIT's flags, then requests of
//! `op node reply flags [raw opcode u32] [raw nodeid u64] [raw reply size u32] [raw header length u32]
//! arglen(u16) args`.
#![no_main]

#[allow(dead_code)]
#[path = "../../kit/src/frontend/window.rs"]
mod window;

use std::ffi::CString;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use fuse_backend_rs::abi::fuse_abi::{
    Direntplus, EntryOut, FsOptions, InHeader, InitIn, InitIn2, OpenOut, OutHeader,
    KERNEL_MINOR_VERSION, KERNEL_VERSION,
};
use fuse_backend_rs::abi::virtio_fs::SetupmappingIn;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::{Vfs, VfsOptions};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use libfuzzer_sys::fuzz_target;
use rafsd::daemon::{Daemon, FsType, MountCmd};
use rafsd::dax::DaxWindow;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use window::{Window, WindowServer};

const MEM_SIZE: usize = 8 << 20;
const QUEUE_LEN: u16 = 1024;
const REQ_ADDR: u64 = 1 << 20;
const REQ_MAX: usize = 1 << 20;
const REP_ADDR: u64 = 2 << 20;
const REP_MAX: u32 = (2 << 20) + 4096;
const WINDOW: u64 = 16 << 20;
const VRING_DESC_F_WRITE: u16 = 2;
/// Nodes and handles remembered from replies, per input.
const MAX_NODES: usize = 512;
const MAX_HANDLES: usize = 64;
/// Bytes per file the share may hold.
const FSIZE_LIMIT: u64 = 64 << 20;

const OP_LOOKUP: u32 = 1;
const OP_SYMLINK: u32 = 6;
const OP_MKNOD: u32 = 8;
const OP_MKDIR: u32 = 9;
const OP_LINK: u32 = 13;
const OP_OPEN: u32 = 14;
const OP_INIT: u32 = 26;
const OP_OPENDIR: u32 = 27;
const OP_CREATE: u32 = 35;
const OP_READDIRPLUS: u32 = 44;
const OP_SETUPMAPPING: u32 = 48;

/// Reply buffer sizes a request may come with (one selector past the end takes a raw size).
const REPLY_SIZES: [u32; 15] = [
    0,
    16,
    24,
    40,
    64,
    120,
    144,
    160,
    256,
    1024,
    4096,
    8192,
    65536,
    131072,
    1 << 20,
];
/// Request flags: a raw header length follows; patch the argument's first 8 bytes with a handle, a node
/// id of the table, or (both bits) a node id learnt from a reply; bits 3-4: readable descriptors - 1;
/// bits 5-6: reply buffer layout.
const FLAG_RAW_LEN: u8 = 1;
const FLAG_HANDLE: u8 = 2;
const FLAG_NODE: u8 = 4;

struct Harness {
    share: PathBuf,
    daemon: Arc<Daemon>,
    server: Server<Arc<Vfs>>,
    mem: GuestMemoryMmap,
    dax: Arc<DaxWindow>,
    vmm: Arc<Window>,
    _vmm_server: WindowServer,
    /// Pseudo root, mount roots and entries of the images, found once at start.
    image_nodes: Vec<u64>,
    unique: u64,
}

/// The reference images: `RAFSD_FIXTURES`, or ../shared/fixtures/rafs beside the checkout.
fn fixtures() -> PathBuf {
    std::env::var_os("RAFSD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/rafs")
        })
}

/// Private mount namespace with a read-only root mount; /dev/shm and this crate's directory (corpus,
/// artifacts) stay writable. Needs root; without it the fuzzer runs unprotected and says so.
fn confine() {
    let keep = CString::new(env!("CARGO_MANIFEST_DIR")).unwrap();
    // SAFETY: mount-namespace syscalls on this thread with valid NUL-terminated strings.
    let ok = unsafe {
        libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
            && libc::mount(
                keep.as_ptr(),
                keep.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ) == 0
            && libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                std::ptr::null(),
            ) == 0
    };
    if !ok {
        eprintln!(
            "virtiofs fuzz target: no read-only root ({}); the passthrough share can write anywhere its bugs let it",
            std::io::Error::last_os_error()
        );
    }
    let limit = libc::rlimit {
        rlim_cur: FSIZE_LIMIT,
        rlim_max: FSIZE_LIMIT,
    };
    // SAFETY: plain process settings; writes past the limit then fail with EFBIG instead of SIGXFSZ.
    unsafe {
        libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

fn rafs_config(blobs: &Path, cache: Option<&Path>, validate: bool) -> String {
    let cache = match cache {
        Some(dir) => serde_json::json!({"type": "blobcache", "config": {"work_dir": dir}}),
        None => serde_json::json!({"type": "dummycache"}),
    };
    serde_json::json!({
        "device": {"backend": {"type": "localfs", "config": {"dir": blobs}}, "cache": cache},
        "mode": "direct",
        "digest_validate": validate,
        "iostats_files": true,
        "access_pattern": true,
        "latest_read_files": true,
        "enable_xattr": true,
    })
    .to_string()
}

/// The share's starting content: a file, a directory with a file, a symlink.
fn fill_share(share: &Path) {
    let _ = std::fs::remove_dir_all(share);
    std::fs::create_dir_all(share.join("dir")).unwrap();
    std::fs::write(share.join("a.txt"), b"hello from the share\n").unwrap();
    std::fs::write(share.join("dir/b"), vec![0x5au8; 8192]).unwrap();
    let _ = std::os::unix::fs::symlink("a.txt", share.join("link"));
}

fn share_cmd(share: &Path) -> MountCmd {
    MountCmd::new(FsType::Passthrough, share.to_path_buf(), String::new())
}

impl Harness {
    fn new() -> Harness {
        confine();
        let dir = PathBuf::from(format!(
            "/dev/shm/rafsd-fuzz-virtiofs-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        extern "C" fn cleanup() {
            let _ = std::fs::remove_dir_all(format!(
                "/dev/shm/rafsd-fuzz-virtiofs-{}",
                std::process::id()
            ));
        }
        // SAFETY: registering a plain function to run at exit.
        unsafe { libc::atexit(cleanup) };
        let share = dir.join("share");
        fill_share(&share);

        let vfs = Arc::new(Vfs::new(VfsOptions {
            no_open: false,
            no_opendir: false,
            no_writeback: true,
            ..Default::default()
        }));
        let daemon = Daemon::new(None, vfs.clone());
        let f = fixtures();
        let v6 = f.join("v6-zstd-blake3");
        let v5 = f.join("v5-zstd-sha256-128k");
        let mount = |mp: &str, fs_type, source: PathBuf, config: String| {
            daemon
                .mount(mp, MountCmd::new(fs_type, source, config))
                .unwrap_or_else(|e| panic!("mount {mp}: {e}"));
        };
        mount(
            "/rafs",
            FsType::Rafs,
            v6.join("bootstrap"),
            rafs_config(&v6.join("blobs"), Some(&dir.join("cache6")), true),
        );
        mount(
            "/v5",
            FsType::Rafs,
            v5.join("bootstrap"),
            rafs_config(&v5.join("blobs"), None, false),
        );
        mount(
            "/blobs",
            FsType::BlobView,
            v6.join("bootstrap"),
            rafs_config(&v6.join("blobs"), Some(&dir.join("cacheview")), true),
        );
        daemon.mount("/share", share_cmd(&share)).unwrap();

        let vmm = Window::new(WINDOW).unwrap();
        let vmm_server = WindowServer::start(vmm.clone()).unwrap();
        // SAFETY: a duplicate of the channel's device end, owned by the stream from here on.
        let stream =
            unsafe { std::os::unix::net::UnixStream::from_raw_fd(libc::dup(vmm_server.device_fd)) };
        let dax = DaxWindow::new(WINDOW, vhost::vhost_user::Backend::from_stream(stream));

        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut h = Harness {
            share,
            daemon,
            server: Server::new(vfs),
            mem,
            dax,
            vmm,
            _vmm_server: vmm_server,
            image_nodes: Vec::new(),
            unique: 0,
        };
        h.image_nodes = h.walk_images();
        h
    }

    /// One request (`bytes`, over `pieces` readable descriptors) through the device path; returns the
    /// reply (header and body) if there is one.
    fn request(
        &mut self,
        bytes: &[u8],
        pieces: usize,
        reply_len: u32,
        layout: u8,
    ) -> Option<(OutHeader, Vec<u8>)> {
        if bytes.len() > REQ_MAX {
            return None;
        }
        let mut descs = Vec::new();
        let mut at = REQ_ADDR;
        for part in bytes.chunks(bytes.len().div_ceil(pieces.max(1)).max(1)) {
            self.mem.write_slice(part, GuestAddress(at)).unwrap();
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                at,
                part.len() as u32,
                0,
                0,
            )));
            at += part.len() as u64;
        }
        // Reply buffers: pages as a Linux guest gives them, one block, a tiny first piece, or odd pieces.
        let mut left = reply_len.min(REP_MAX);
        let mut at = REP_ADDR;
        let mut first = true;
        while left > 0 {
            let n = match layout & 3 {
                0 => left.min(4096),
                1 => left,
                2 if first => left.min(16),
                2 => left,
                _ => left.min(1000),
            };
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                at,
                n,
                VRING_DESC_F_WRITE,
                0,
            )));
            at += n as u64;
            left -= n;
            first = false;
        }
        if descs.is_empty() || descs.len() > QUEUE_LEN as usize {
            return None;
        }
        // Stale reply bytes must not pass for a reply.
        self.mem
            .write_obj(OutHeader::default(), GuestAddress(REP_ADDR))
            .unwrap();
        let queue = MockSplitQueue::create(&self.mem, GuestAddress(0), QUEUE_LEN);
        let chain = queue.build_desc_chain(&descs).ok()?;
        let reader = Reader::from_descriptor_chain(&self.mem, chain.clone()).ok()?;
        let writer = VirtioFsWriter::new(&self.mem, chain).ok()?;
        let unique = bytes
            .get(8..16)
            .map(|u| u64::from_le_bytes(u.try_into().unwrap()));
        let n = rafsd::vhost_user::handle_request(
            &self.server,
            self.server_vfs(),
            reader,
            writer,
            Some(&self.dax),
        );
        if n == 0 {
            return None;
        }
        assert!(
            n <= reply_len,
            "reply of {n} bytes in a {reply_len}-byte buffer"
        );
        let header: OutHeader = self.mem.read_obj(GuestAddress(REP_ADDR)).unwrap();
        assert_eq!(
            header.len, n,
            "reply header length vs bytes written: {header:?}"
        );
        assert_eq!(
            Some(header.unique),
            unique,
            "reply to another request: {header:?}"
        );
        let mut body = vec![0u8; n as usize - std::mem::size_of::<OutHeader>()];
        self.mem
            .read_slice(
                &mut body,
                GuestAddress(REP_ADDR + std::mem::size_of::<OutHeader>() as u64),
            )
            .unwrap();
        Some((header, body))
    }

    /// A well-formed request; returns the reply body when it succeeded.
    fn call(
        &mut self,
        opcode: u32,
        nodeid: u64,
        args: &[&[u8]],
        reply_len: u32,
    ) -> Option<Vec<u8>> {
        self.unique += 1;
        let len = std::mem::size_of::<InHeader>() + args.iter().map(|a| a.len()).sum::<usize>();
        let h = InHeader {
            len: len as u32,
            opcode,
            unique: self.unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            padding: 0,
        };
        let mut bytes = h.as_slice().to_vec();
        for a in args {
            bytes.extend_from_slice(a);
        }
        match self.request(&bytes, 1, reply_len, 0) {
            Some((h, body)) if h.error == 0 => Some(body),
            _ => None,
        }
    }

    fn init(&mut self, xor: u32) {
        let flags = FsOptions::ASYNC_READ
            | FsOptions::DO_READDIRPLUS
            | FsOptions::READDIRPLUS_AUTO
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::MAX_PAGES
            | FsOptions::INIT_EXT;
        let init = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 128 << 10,
            flags: flags.bits() as u32 ^ xor,
        };
        let init2 = InitIn2 {
            flags2: (FsOptions::PERFILE_DAX.bits() >> 32) as u32,
            unused: [0; 11],
        };
        self.call(OP_INIT, 0, &[init.as_slice(), init2.as_slice()], 256);
    }

    /// Node ids of the pseudo root, the image mounts and their entries (a few per directory).
    fn walk_images(&mut self) -> Vec<u64> {
        self.init(0);
        let mut nodes = vec![1u64];
        let mut at = 0;
        while at < nodes.len() && nodes.len() < MAX_NODES - 16 {
            let dir = nodes[at];
            at += 1;
            let read = fuse_backend_rs::abi::fuse_abi::ReadIn {
                size: 4096,
                ..Default::default()
            };
            let Some(body) = self.call(OP_READDIRPLUS, dir, &[read.as_slice()], 4096) else {
                continue;
            };
            for (i, (name, nodeid)) in direntplus(&body).into_iter().enumerate() {
                if i >= 24
                    || name == b"."
                    || name == b".."
                    || name == b"share"
                    || nodes.contains(&nodeid)
                {
                    continue;
                }
                nodes.push(nodeid);
            }
        }
        nodes
    }

    /// Back to a fresh connection: session ended (as on a VMM disconnect), share re-created.
    fn reset(&mut self) -> Vec<u64> {
        fuse_backend_rs::api::filesystem::FileSystem::destroy(&**self.server_vfs());
        self.vmm.maps.lock().unwrap().clear();
        let _ = self.daemon.umount("/share");
        fill_share(&self.share);
        self.daemon.mount("/share", share_cmd(&self.share)).unwrap();
        let mut nodes = self.image_nodes.clone();
        let mut share = Vec::new();
        self.init(0);
        if let Some(root) = self.lookup(1, b"share") {
            share.push(root);
            for name in [&b"a.txt"[..], b"dir", b"link"] {
                share.extend(self.lookup(root, name));
            }
            if let Some(dir) = share.get(2).copied() {
                share.extend(self.lookup(dir, b"b"));
            }
        }
        // Share nodes first, at fixed selectors 0..5.
        share.append(&mut nodes);
        share
    }

    fn server_vfs(&self) -> &Arc<Vfs> {
        &self.daemon.vfs
    }

    fn lookup(&mut self, parent: u64, name: &[u8]) -> Option<u64> {
        let mut n = name.to_vec();
        n.push(0);
        let body = self.call(OP_LOOKUP, parent, &[&n], 256)?;
        let e: EntryOut = read(&body)?;
        (e.nodeid != 0).then_some(e.nodeid)
    }

    /// Touch every page of a successful SETUPMAPPING of a RAFS file or blob-view file: all of it must be
    /// readable (zeros past end of file), or the VMM would fault on the guest's access.
    fn touch_window(&self, nodeid: u64, args: &[u8]) {
        let Some(m) = read::<SetupmappingIn>(args) else {
            return;
        };
        let share_idx = self.share_index();
        if Some(nodeid >> 56) == share_idx
            || m.len == 0
            || m.moffset.checked_add(m.len).is_none_or(|e| e > WINDOW)
        {
            return;
        }
        let bytes = self.vmm.bytes(m.moffset, m.len);
        let mut sum = 0u8;
        for page in bytes.chunks(4096) {
            sum = sum.wrapping_add(page[0]).wrapping_add(page[page.len() - 1]);
        }
        std::hint::black_box(sum);
    }

    fn share_index(&self) -> Option<u64> {
        self.daemon
            .vfs
            .get_rootfs("/share")
            .ok()
            .flatten()
            .map(|(_, idx)| idx as u64)
    }
}

fn read<T: ByteValued + Default>(b: &[u8]) -> Option<T> {
    let mut v = T::default();
    let n = std::mem::size_of::<T>();
    v.as_mut_slice().copy_from_slice(b.get(..n)?);
    Some(v)
}

/// (name, nodeid) of each READDIRPLUS entry.
fn direntplus(body: &[u8]) -> Vec<(Vec<u8>, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    let fixed = std::mem::size_of::<Direntplus>();
    while let Some(d) = body.get(at..).and_then(read::<Direntplus>) {
        let len = d.dirent.namelen as usize;
        let Some(name) = body.get(at + fixed..at + fixed + len) else {
            break;
        };
        out.push((name.to_vec(), d.entry_out.nodeid));
        at += (fixed + len).div_ceil(8) * 8;
    }
    out
}

/// Reads the input front to back; short reads end the input.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .map(|b| u16::from_le_bytes(b.try_into().unwrap()))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    }
}

/// Run one input: INIT, then its requests. See the module comment and README for the format.
fn run(h: &mut Harness, data: &[u8]) {
    let nodes = h.reset();
    let mut learned: Vec<u64> = Vec::new();
    let mut handles: Vec<u64> = vec![0];
    let mut input = Input(data);
    let Some(xor) = input.u32() else { return };
    h.init(xor);
    while let Some(op) = input.u8() {
        let (Some(node), Some(reply), Some(flags)) = (input.u8(), input.u8(), input.u8()) else {
            return;
        };
        let opcode = match op {
            sel @ 0..=49 => sel as u32 + 1,
            _ => match input.u32() {
                Some(raw) => raw,
                None => return,
            },
        };
        let nodeid = match node {
            // The node learnt k requests ago (the file just created, the entry just looked up).
            200..=239 if !learned.is_empty() => {
                learned[learned.len() - 1 - (node as usize - 200) % learned.len()]
            }
            0..=239 => nodes[node as usize % nodes.len()],
            240..=254 => match input.u64() {
                Some(raw) => raw,
                None => return,
            },
            255 => 0,
        };
        let reply_len = match reply as usize % (REPLY_SIZES.len() + 1) {
            i if i < REPLY_SIZES.len() => REPLY_SIZES[i],
            _ => match input.u32() {
                Some(raw) => raw % (REP_MAX + 1),
                None => return,
            },
        };
        let raw_len = if flags & FLAG_RAW_LEN != 0 {
            match input.u32() {
                Some(raw) => Some(raw),
                None => return,
            }
        } else {
            None
        };
        let Some(arg_len) = input.u16() else { return };
        let Some(args) = input.take((arg_len as usize).min(input.0.len())) else {
            return;
        };
        let mut args = args.to_vec();
        // The argument may start with a handle (READ, RELEASE, WRITE, ...) or a node id (RENAME's
        // new directory, LINK's inode) the guest was given: its first byte says which one.
        if args.len() >= 8 {
            let patch = match flags & (FLAG_HANDLE | FLAG_NODE) {
                FLAG_HANDLE => Some(handles[args[0] as usize % handles.len()]),
                FLAG_NODE => Some(nodes[args[0] as usize % nodes.len()]),
                f if f == FLAG_HANDLE | FLAG_NODE && !learned.is_empty() => {
                    Some(learned[learned.len() - 1 - args[0] as usize % learned.len()])
                }
                _ => None,
            };
            if let Some(id) = patch {
                args[..8].copy_from_slice(&id.to_le_bytes());
            }
        }
        h.unique += 1;
        let header = InHeader {
            len: raw_len.unwrap_or((std::mem::size_of::<InHeader>() + args.len()) as u32),
            opcode,
            unique: h.unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            padding: 0,
        };
        // Split the request over 1-4 readable descriptors (header alone, arguments in pieces).
        let pieces = 1 + ((flags >> 3) & 3) as usize;
        let mut request = header.as_slice().to_vec();
        request.extend_from_slice(&args);
        let reply = h.request(&request, pieces, reply_len, flags >> 5);
        if trace() {
            let answer = reply.as_ref().map(|(o, b)| (o.error, b.len()));
            eprintln!(
                "opcode {opcode} node {nodeid:#x} args {} reply {reply_len}: {answer:?}",
                args.len()
            );
        }
        let Some((out, body)) = reply else { continue };
        if out.error != 0 {
            continue;
        }
        // Remember what the guest learnt: node ids and handles.
        let learn = |id: u64, list: &mut Vec<u64>, max: usize| {
            if id != 0 && list.len() < max && !list.contains(&id) {
                list.push(id);
            }
        };
        match opcode {
            OP_LOOKUP | OP_MKNOD | OP_MKDIR | OP_SYMLINK | OP_LINK => {
                if let Some(e) = read::<EntryOut>(&body) {
                    learn(e.nodeid, &mut learned, MAX_NODES);
                }
            }
            OP_CREATE => {
                if let Some(e) = read::<EntryOut>(&body) {
                    learn(e.nodeid, &mut learned, MAX_NODES);
                }
                if let Some(o) = body
                    .get(std::mem::size_of::<EntryOut>()..)
                    .and_then(read::<OpenOut>)
                {
                    learn(o.fh, &mut handles, MAX_HANDLES);
                }
            }
            OP_OPEN | OP_OPENDIR => {
                if let Some(o) = read::<OpenOut>(&body) {
                    learn(o.fh, &mut handles, MAX_HANDLES);
                }
            }
            OP_READDIRPLUS => {
                for (_, id) in direntplus(&body) {
                    learn(id, &mut learned, MAX_NODES);
                }
            }
            OP_SETUPMAPPING => h.touch_window(nodeid, &args),
            _ => {}
        }
    }
}

/// `RAFSD_FUZZ_TRACE=1`: print every request and its answer (for replaying an input).
fn trace() -> bool {
    static T: OnceLock<bool> = OnceLock::new();
    *T.get_or_init(|| std::env::var_os("RAFSD_FUZZ_TRACE").is_some())
}

fn harness() -> &'static Mutex<Harness> {
    static H: OnceLock<Mutex<Harness>> = OnceLock::new();
    H.get_or_init(|| Mutex::new(Harness::new()))
}

fuzz_target!(|data: &[u8]| {
    let mut h = harness().lock().unwrap_or_else(|e| e.into_inner());
    run(&mut h, data);
});
