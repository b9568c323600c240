//! A test-only vhost-user *frontend*: it plays the VMM (and the guest's virtio-fs driver) against the
//! `rafsd virtiofs` device. Guest RAM is a memfd shared through SET_MEM_TABLE; the split virtqueues
//! (descriptor table, avail ring, used ring) are laid out here by hand; requests are kicked through an
//! eventfd and completions awaited on the call eventfd, with EVENT_IDX and INDIRECT_DESC as a Linux guest
//! uses them. FUSE messages are encoded with fuse-backend-rs's ABI structs.
//!
//! Every wait is bounded: vhost-user messages (socket timeouts), used-ring completions (`poll` on the
//! call eventfd), the daemon start and the admin API. Shared by tests/vhost_frontend.rs, tests/dax.rs and
//! the benchmarks tests/bench/virtiofs.rs and tests/bench/dax.rs; `window` is the VMM's side of a DAX window.

pub mod window;

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, Dirent, Direntplus, EntryOut, ForgetIn, FsOptions, GetattrIn, GetxattrIn, GetxattrOut,
    InHeader, InitIn, InitOut, MknodIn, Opcode, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn,
    KERNEL_MINOR_VERSION, KERNEL_VERSION,
};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::{ByteValued, Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Bound on every single wait: a vhost-user reply, a used-ring completion, an API reply.
pub const WAIT: Duration = Duration::from_secs(10);

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const USED_F_NO_NOTIFY: u16 = 1;
const PAGE: u64 = 4096;

fn err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

// ---------------------------------------------------------------------------------------------------
// Guest RAM
// ---------------------------------------------------------------------------------------------------

/// "Guest RAM": one memfd mapped at guest physical address 0, shared with the device by SET_MEM_TABLE.
pub struct GuestRam {
    pub mem: GuestMemoryMmap,
    size: u64,
    next: u64,
}

impl GuestRam {
    pub fn new(size: usize) -> io::Result<Self> {
        let name = CString::new("rafsd-test-guest-ram").unwrap();
        // SAFETY: valid NUL-terminated name; the returned fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| err(format!("map guest RAM: {e}")))?;
        Ok(GuestRam {
            mem,
            size: size as u64,
            next: 0,
        })
    }

    /// Carve `len` bytes (page aligned) out of guest RAM; never freed (the RAM lives as long as the guest).
    pub fn alloc(&mut self, len: u64) -> GuestAddress {
        let start = self.next;
        self.next = (start + len).div_ceil(PAGE) * PAGE;
        assert!(
            self.next <= self.size,
            "guest RAM of {} bytes exhausted",
            self.size
        );
        GuestAddress(start)
    }

    pub fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo::from_guest_region(self.mem.iter().next().expect("one region"))
            .expect("file-backed region")
    }

    /// The address of guest memory in this process, which is what SET_VRING_ADDR carries ("VMM addresses").
    fn vmm_addr(&self, gpa: GuestAddress) -> u64 {
        self.region().userspace_addr + gpa.0
    }
}

// ---------------------------------------------------------------------------------------------------
// Split virtqueue, driver side
// ---------------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}
// SAFETY: plain old data without padding.
unsafe impl ByteValued for Desc {}

/// A request as the guest driver builds it: device-readable buffers, then device-writable buffer sizes.
#[derive(Clone, Default)]
pub struct Chain {
    pub readable: Vec<Vec<u8>>,
    pub writable: Vec<u32>,
    /// Put the whole chain in an indirect table (one ring descriptor).
    pub indirect: bool,
    /// Raw descriptors written as they are (addresses, lengths and flags not checked): hostile input.
    pub raw: Option<Vec<(u64, u32, u16, u16)>>,
    /// Copy at most this many reply bytes out of guest RAM (a guest uses the data where it landed).
    pub peek: Option<u32>,
}

/// A used-ring entry with the device-written bytes (the first `len` bytes of the writable buffers).
pub struct Completion {
    pub head: u16,
    pub len: u32,
    pub data: Vec<u8>,
}

struct Inflight {
    descs: Vec<u16>,
    slot: usize,
    writable: Vec<(GuestAddress, u32)>,
    peek: Option<u32>,
}

pub struct Virtqueue {
    pub index: usize,
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    pub kick: EventFd,
    pub call: EventFd,
    event_idx: bool,
    avail_idx: u16,
    /// avail idx when we last decided whether to kick.
    notified_idx: u16,
    last_used: u16,
    free: Vec<u16>,
    slots: Vec<GuestAddress>,
    slot_len: u64,
    free_slots: Vec<usize>,
    inflight: HashMap<u16, Inflight>,
    pub kicks: u64,
    pub kicks_suppressed: u64,
}

impl Virtqueue {
    /// Lay the rings out in guest RAM (all zero: avail/used idx 0, no flags), plus `slots` data areas of
    /// `slot_len` bytes each for requests in flight.
    fn new(
        ram: &mut GuestRam,
        index: usize,
        size: u16,
        event_idx: bool,
        slots: usize,
        slot_len: u64,
    ) -> io::Result<Self> {
        let n = size as u64;
        let desc = ram.alloc(16 * n);
        let avail = ram.alloc(6 + 2 * n);
        let used = ram.alloc(6 + 8 * n);
        let slots: Vec<GuestAddress> = (0..slots).map(|_| ram.alloc(slot_len)).collect();
        Ok(Virtqueue {
            index,
            size,
            desc,
            avail,
            used,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            call: EventFd::new(libc::EFD_NONBLOCK)?,
            event_idx,
            avail_idx: 0,
            notified_idx: 0,
            last_used: 0,
            free: (0..size).rev().collect(),
            free_slots: (0..slots.len()).rev().collect(),
            slots,
            slot_len,
            inflight: HashMap::new(),
            kicks: 0,
            kicks_suppressed: 0,
        })
    }

    fn config(&self, ram: &GuestRam) -> VringConfigData {
        VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: ram.vmm_addr(self.desc),
            used_ring_addr: ram.vmm_addr(self.used),
            avail_ring_addr: ram.vmm_addr(self.avail),
            log_addr: None,
        }
    }

    /// The descriptor id the next single-descriptor chain will get.
    pub fn next_free(&self) -> Option<u16> {
        self.free.last().copied()
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    fn write_desc(&self, ram: &GuestRam, table: GuestAddress, i: u16, d: Desc) {
        ram.mem
            .write_obj(d, GuestAddress(table.0 + 16 * i as u64))
            .unwrap();
    }

    /// Write a request into a free slot and publish it in the avail ring (no kick yet: see `notify`).
    pub fn submit(&mut self, ram: &GuestRam, chain: &Chain) -> io::Result<u16> {
        let slot = self
            .free_slots
            .pop()
            .ok_or_else(|| err(format!("queue {}: no free request slot", self.index)))?;
        let base = self.slots[slot];
        let mut bump = base.0;
        let mut take = |len: u64| -> io::Result<GuestAddress> {
            let at = GuestAddress(bump);
            bump = (bump + len).div_ceil(8) * 8;
            if bump > base.0 + self.slot_len {
                return Err(err("request larger than its slot"));
            }
            Ok(at)
        };
        // The buffers, in order: readable then writable.
        let mut bufs: Vec<Desc> = Vec::new();
        let mut writable = Vec::new();
        if let Some(raw) = &chain.raw {
            bufs.extend(raw.iter().map(|&(addr, len, flags, next)| Desc {
                addr,
                len,
                flags,
                next,
            }));
            // What the device may write, so that a reply to a raw chain can be read back.
            writable.extend(
                raw.iter()
                    .filter(|d| d.2 & (DESC_F_WRITE | DESC_F_INDIRECT) == DESC_F_WRITE)
                    .map(|&(addr, len, _, _)| (GuestAddress(addr), len)),
            );
        } else {
            for r in &chain.readable {
                let at = take(r.len() as u64)?;
                ram.mem.write_slice(r, at).unwrap();
                bufs.push(Desc {
                    addr: at.0,
                    len: r.len() as u32,
                    flags: 0,
                    next: 0,
                });
            }
            for &w in &chain.writable {
                let at = take(w as u64)?;
                bufs.push(Desc {
                    addr: at.0,
                    len: w,
                    flags: DESC_F_WRITE,
                    next: 0,
                });
                writable.push((at, w));
            }
        }
        let descs: Vec<u16>;
        let head;
        if chain.indirect {
            let table = take(16 * bufs.len() as u64)?;
            let last = bufs.len().saturating_sub(1);
            for (i, mut d) in bufs.into_iter().enumerate() {
                if chain.raw.is_none() && i < last {
                    d.flags |= DESC_F_NEXT;
                    d.next = i as u16 + 1;
                }
                self.write_desc(ram, table, i as u16, d);
            }
            let d = self
                .free
                .pop()
                .ok_or_else(|| err("descriptor table full"))?;
            self.write_desc(
                ram,
                self.desc,
                d,
                Desc {
                    addr: table.0,
                    len: (16 * (last + 1)) as u32,
                    flags: DESC_F_INDIRECT,
                    next: 0,
                },
            );
            descs = vec![d];
            head = d;
        } else {
            if bufs.len() > self.free.len() {
                self.free_slots.push(slot);
                return Err(err("descriptor table full"));
            }
            let ids: Vec<u16> = (0..bufs.len()).map(|_| self.free.pop().unwrap()).collect();
            for (i, mut d) in bufs.into_iter().enumerate() {
                if chain.raw.is_none() && i + 1 < ids.len() {
                    d.flags |= DESC_F_NEXT;
                    d.next = ids[i + 1];
                }
                self.write_desc(ram, self.desc, ids[i], d);
            }
            head = ids[0];
            descs = ids;
        }
        // Publish: ring entry, then (after a barrier) the new avail idx.
        let ring = GuestAddress(self.avail.0 + 4 + 2 * (self.avail_idx % self.size) as u64);
        ram.mem.write_obj(head.to_le(), ring).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        ram.mem
            .store(
                self.avail_idx.to_le(),
                GuestAddress(self.avail.0 + 2),
                Ordering::Release,
            )
            .unwrap();
        self.inflight.insert(
            head,
            Inflight {
                descs,
                slot,
                writable,
                peek: chain.peek,
            },
        );
        Ok(head)
    }

    /// Write the avail ring's index `ahead` entries past the requests posted, as a hostile driver may
    /// (`ahead` 0 puts the real index back), and kick the device whatever it asked for.
    pub fn force_avail_idx(&mut self, ram: &GuestRam, ahead: u16) {
        let idx = self.avail_idx.wrapping_add(ahead);
        ram.mem
            .store(
                idx.to_le(),
                GuestAddress(self.avail.0 + 2),
                Ordering::Release,
            )
            .unwrap();
        self.kick.write(1).unwrap();
    }

    /// Kick the device if it asked for it (EVENT_IDX avail_event, or no VRING_USED_F_NO_NOTIFY).
    pub fn notify(&mut self, ram: &GuestRam) {
        fence(Ordering::SeqCst);
        let (old, new) = (self.notified_idx, self.avail_idx);
        self.notified_idx = new;
        if old == new {
            return;
        }
        let needed = if self.event_idx {
            let ev: u16 = ram
                .mem
                .load(
                    GuestAddress(self.used.0 + 4 + 8 * self.size as u64),
                    Ordering::Acquire,
                )
                .unwrap();
            new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags: u16 = ram.mem.load(self.used, Ordering::Acquire).unwrap();
            flags & USED_F_NO_NOTIFY == 0
        };
        if needed {
            self.kick.write(1).unwrap();
            self.kicks += 1;
        } else {
            self.kicks_suppressed += 1;
        }
    }

    fn used_idx(&self, ram: &GuestRam) -> u16 {
        u16::from_le(
            ram.mem
                .load(GuestAddress(self.used.0 + 2), Ordering::Acquire)
                .unwrap(),
        )
    }

    /// Reap everything the device has put in the used ring; wait (bounded by `timeout`) for at least one.
    pub fn wait_used(&mut self, ram: &GuestRam, timeout: Duration) -> io::Result<Vec<Completion>> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.event_idx {
                // "Interrupt me when the entry at last_used is written."
                let at = GuestAddress(self.avail.0 + 4 + 2 * self.size as u64);
                ram.mem
                    .store(self.last_used.to_le(), at, Ordering::Release)
                    .unwrap();
                fence(Ordering::SeqCst);
            }
            let idx = self.used_idx(ram);
            if idx != self.last_used {
                let mut done = Vec::new();
                while self.last_used != idx {
                    let at =
                        GuestAddress(self.used.0 + 4 + 8 * (self.last_used % self.size) as u64);
                    let id = u32::from_le(ram.mem.read_obj::<u32>(at).unwrap());
                    let len =
                        u32::from_le(ram.mem.read_obj::<u32>(GuestAddress(at.0 + 4)).unwrap());
                    self.last_used = self.last_used.wrapping_add(1);
                    let head = u16::try_from(id).map_err(|_| {
                        err(format!("queue {}: used id {id} out of range", self.index))
                    })?;
                    let f = self.inflight.remove(&head).ok_or_else(|| {
                        err(format!(
                            "queue {}: used id {head} was not in flight",
                            self.index
                        ))
                    })?;
                    if f.writable.iter().map(|w| w.1 as u64).sum::<u64>() < len as u64 {
                        return Err(err(format!(
                            "queue {}: used len {len} exceeds the writable buffers",
                            self.index
                        )));
                    }
                    let mut left = len.min(f.peek.unwrap_or(u32::MAX)) as usize;
                    let mut data = Vec::with_capacity(left);
                    for (at, wlen) in &f.writable {
                        if left == 0 {
                            break;
                        }
                        let n = left.min(*wlen as usize);
                        let start = data.len();
                        data.resize(start + n, 0);
                        ram.mem.read_slice(&mut data[start..], *at).unwrap();
                        left -= n;
                    }
                    self.free.extend(f.descs);
                    self.free_slots.push(f.slot);
                    done.push(Completion { head, len, data });
                }
                return Ok(done);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("queue {}: no used buffer within {timeout:?}", self.index),
                ));
            }
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return Err(io::Error::last_os_error());
            }
            if r > 0 {
                let _ = self.call.read();
            }
        }
    }

    /// Whether the call eventfd fired (consumes it): for "no interrupt was sent" checks.
    pub fn take_interrupt(&self) -> bool {
        self.call.read().is_ok()
    }
}

// ---------------------------------------------------------------------------------------------------
// vhost-user connection
// ---------------------------------------------------------------------------------------------------

#[derive(Clone)]
pub struct Options {
    /// Request queues to set up (the hiprio queue 0 always is).
    pub request_queues: usize,
    pub queue_size: u16,
    pub event_idx: bool,
    pub indirect: bool,
    /// Requests that may be in flight per queue, and the guest RAM each may use.
    pub slots: usize,
    pub slot_len: u64,
    /// Split read buffers into descriptors of this size (a guest's pages).
    pub page: u32,
    /// Protocol features to negotiate beyond MQ, REPLY_ACK and BACKEND_REQ (e.g. SHMEM for DAX).
    pub extra_protocol: VhostUserProtocolFeatures,
    /// Send this as the backend request channel (e.g. a `window::WindowServer`'s) instead of a socket
    /// nobody reads.
    pub backend_req_fd: Option<std::os::fd::RawFd>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            request_queues: 2,
            queue_size: 128,
            event_idx: true,
            indirect: true,
            slots: 4,
            slot_len: 2 << 20,
            page: 4096,
            extra_protocol: VhostUserProtocolFeatures::empty(),
            backend_req_fd: None,
        }
    }
}

/// One VMM connection: the vhost-user session, guest RAM and the virtqueues.
pub struct VhostConn {
    pub frontend: Frontend,
    pub ram: GuestRam,
    /// Queue 0 is hiprio; 1.. are request queues.
    pub queues: Vec<Virtqueue>,
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
    pub device_queues: u64,
    /// Our end of the backend request channel (SET_BACKEND_REQ_FD), kept open for the session.
    _backend_req: Option<UnixStream>,
}

/// Connect to the device socket, retrying (bounded) while it is not there yet or being re-created.
pub fn connect_socket(sock: &Path, limit: Duration) -> io::Result<UnixStream> {
    let deadline = Instant::now() + limit;
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(err(format!("connect {}: {e}", sock.display())))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

impl VhostConn {
    /// The handshake a VMM (QEMU's vhost-user-fs-pci) does, then vrings set up and enabled.
    pub fn connect(sock: &Path, opts: &Options) -> io::Result<Self> {
        let stream = connect_socket(sock, WAIT)?;
        Self::handshake(stream, opts)
    }

    pub fn handshake(stream: UnixStream, opts: &Options) -> io::Result<Self> {
        stream.set_read_timeout(Some(WAIT))?;
        stream.set_write_timeout(Some(WAIT))?;
        let ve = |what: &'static str| move |e: vhost::Error| err(format!("vhost-user {what}: {e}"));
        let nq = 1 + opts.request_queues;
        let mut fe = Frontend::from_stream(stream, nq as u64);
        fe.set_owner().map_err(ve("SET_OWNER"))?;
        let offered = fe.get_features().map_err(ve("GET_FEATURES"))?;
        let mut want =
            (1u64 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if opts.event_idx {
            want |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        if opts.indirect {
            want |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
        }
        if offered & want != want {
            return Err(err(format!(
                "device offers features {offered:#x}, we need {want:#x}"
            )));
        }
        let offered_pf = fe
            .get_protocol_features()
            .map_err(ve("GET_PROTOCOL_FEATURES"))?;
        let protocol = offered_pf
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::BACKEND_REQ
                | opts.extra_protocol);
        fe.set_protocol_features(protocol)
            .map_err(ve("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every message is acknowledged: the device has applied it before we send the next one.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let device_queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            fe.get_queue_num().map_err(ve("GET_QUEUE_NUM"))?
        } else {
            1
        };
        if (device_queues as usize) < nq {
            return Err(err(format!(
                "device has {device_queues} queues, we want {nq}"
            )));
        }
        let backend_req = if let (Some(fd), true) = (
            opts.backend_req_fd,
            protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ),
        ) {
            fe.set_backend_request_fd(&fd)
                .map_err(ve("SET_BACKEND_REQ_FD"))?;
            None
        } else if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let (ours, theirs) = UnixStream::pair()?;
            fe.set_backend_request_fd(&theirs)
                .map_err(ve("SET_BACKEND_REQ_FD"))?;
            Some(ours)
        } else {
            None
        };
        fe.set_features(want).map_err(ve("SET_FEATURES"))?;

        // Guest RAM: the rings plus request slots for every queue.
        let per_queue = 16 * opts.queue_size as u64
            + 3 * PAGE
            + 8 * opts.queue_size as u64
            + opts.slots as u64 * opts.slot_len;
        let mut ram = GuestRam::new(
            ((per_queue + PAGE) * nq as u64).div_ceil(1 << 20) as usize * (1 << 20) + (1 << 20),
        )?;
        let queues: Vec<Virtqueue> = (0..nq)
            .map(|i| {
                Virtqueue::new(
                    &mut ram,
                    i,
                    opts.queue_size,
                    opts.event_idx,
                    opts.slots,
                    opts.slot_len,
                )
            })
            .collect::<io::Result<_>>()?;
        fe.set_mem_table(&[ram.region()])
            .map_err(ve("SET_MEM_TABLE"))?;
        for q in &queues {
            fe.set_vring_num(q.index, q.size)
                .map_err(ve("SET_VRING_NUM"))?;
            fe.set_vring_base(q.index, 0)
                .map_err(ve("SET_VRING_BASE"))?;
            fe.set_vring_addr(q.index, &q.config(&ram))
                .map_err(ve("SET_VRING_ADDR"))?;
            fe.set_vring_kick(q.index, &q.kick)
                .map_err(ve("SET_VRING_KICK"))?;
            fe.set_vring_call(q.index, &q.call)
                .map_err(ve("SET_VRING_CALL"))?;
        }
        for q in &queues {
            fe.set_vring_enable(q.index, true)
                .map_err(ve("SET_VRING_ENABLE"))?;
        }
        Ok(VhostConn {
            frontend: fe,
            ram,
            queues,
            features: want,
            protocol,
            device_queues,
            _backend_req: backend_req,
        })
    }

    /// Submit one chain on queue `q`, kick, and wait (bounded) for its completion.
    pub fn roundtrip(&mut self, q: usize, chain: &Chain) -> io::Result<Completion> {
        let vq = &mut self.queues[q];
        let head = vq.submit(&self.ram, chain)?;
        vq.notify(&self.ram);
        let mut done = vq.wait_used(&self.ram, WAIT)?;
        if done.len() != 1 || done[0].head != head {
            return Err(err(format!(
                "queue {q}: expected completion of {head}, got {:?}",
                done.iter().map(|c| c.head).collect::<Vec<_>>()
            )));
        }
        Ok(done.pop().unwrap())
    }
}

// ---------------------------------------------------------------------------------------------------
// FUSE over the virtqueues
// ---------------------------------------------------------------------------------------------------

/// A FUSE reply: the header and the bytes after it.
pub struct Reply {
    pub header: OutHeader,
    pub body: Vec<u8>,
}

/// A directory entry from READDIRPLUS.
#[derive(Debug, Clone)]
pub struct DirEntryPlus {
    pub name: Vec<u8>,
    pub nodeid: u64,
    pub ino: u64,
    pub off: u64,
    pub type_: u32,
    pub mode: u32,
    pub size: u64,
}

pub enum Xattr {
    Size(u32),
    Value(Vec<u8>),
}

/// The argument of a FUSE_READ of a regular file opened read-only.
pub fn read_in(fh: u64, offset: u64, size: u32) -> ReadIn {
    ReadIn {
        fh,
        offset,
        size,
        read_flags: 0,
        lock_owner: 0,
        flags: libc::O_RDONLY as u32,
        padding: 0,
    }
}

/// A request in flight, from [`Guest::post`].
#[derive(Clone, Copy, Debug)]
pub struct Posted {
    pub head: u16,
    pub unique: u64,
    pub opcode: Opcode,
}

/// Check a completion's framing (unique, header len = used len) and split it into header and body.
fn parse_reply(opcode: Opcode, unique: u64, c: Completion) -> io::Result<Reply> {
    let header: OutHeader = read_obj(&c.data)?;
    if header.unique != unique {
        return Err(err(format!(
            "{opcode:?}: reply for unique {} to request {unique}",
            header.unique
        )));
    }
    if header.len != c.len {
        return Err(err(format!(
            "{opcode:?}: header len {} but used len {}",
            header.len, c.len
        )));
    }
    let mut body = c.data;
    body.drain(..std::mem::size_of::<OutHeader>());
    Ok(Reply { header, body })
}

pub fn fuse_errno(h: &OutHeader) -> io::Result<()> {
    if h.error < 0 {
        Err(io::Error::from_raw_os_error(-h.error))
    } else {
        Ok(())
    }
}

fn read_obj<T: ByteValued + Default>(b: &[u8]) -> io::Result<T> {
    // Reply bytes are not aligned for T: copy through a default value.
    let mut v = T::default();
    let n = std::mem::size_of::<T>();
    if b.len() < n {
        return Err(err(format!("reply body of {} bytes, want {n}", b.len())));
    }
    v.as_mut_slice().copy_from_slice(&b[..n]);
    Ok(v)
}

/// The entries of a READDIR(PLUS) reply: fixed part `T` (whose name length `namelen` gives), name, padding
/// to 8 bytes; each turned into an `E` by `entry`.
fn dirents<T: ByteValued + Default, E>(
    body: &[u8],
    namelen: impl Fn(&T) -> u32,
    entry: impl Fn(T, Vec<u8>) -> E,
) -> io::Result<Vec<E>> {
    let mut out = Vec::new();
    let mut at = 0;
    let fixed = std::mem::size_of::<T>();
    while at < body.len() {
        let d: T = read_obj(&body[at..])?;
        let len = namelen(&d) as usize;
        let name = body
            .get(at + fixed..at + fixed + len)
            .ok_or_else(|| err("dirent name past the reply"))?
            .to_vec();
        out.push(entry(d, name));
        at += (fixed + len).div_ceil(8) * 8;
    }
    Ok(out)
}

fn cstr(name: &[u8]) -> Vec<u8> {
    let mut v = name.to_vec();
    v.push(0);
    v
}

/// The guest's FUSE client: what the virtio-fs driver of a Linux guest sends.
pub struct Guest {
    pub conn: VhostConn,
    opts: Options,
    unique: u64,
    /// Request queue used by the typed calls below.
    pub queue: usize,
    pub init: Option<InitOut>,
    /// Requests are posted without a kick until [`Guest::kick`] (see [`Guest::hold_kicks`]).
    kicks_held: bool,
}

pub const ROOT: u64 = 1;

impl Guest {
    pub fn connect(sock: &Path, opts: Options) -> io::Result<Self> {
        let conn = VhostConn::connect(sock, &opts)?;
        Ok(Guest {
            conn,
            opts,
            unique: 0,
            queue: 1,
            init: None,
            kicks_held: false,
        })
    }

    /// One `Guest` per request queue, for one driver thread each (as a guest's vCPUs use their queues):
    /// each owns its queue (as its queue 0, so it has no hiprio queue of its own) and numbers its requests
    /// apart from the others. `self` keeps the hiprio queue; the session lasts while any of them lives.
    pub fn split_queues(&mut self) -> Vec<Guest> {
        let rest = self.conn.queues.split_off(1);
        self.queue = 0;
        rest.into_iter()
            .map(|vq| {
                let q = vq.index;
                Guest {
                    conn: VhostConn {
                        frontend: self.conn.frontend.clone(),
                        ram: GuestRam {
                            mem: self.conn.ram.mem.clone(),
                            size: self.conn.ram.size,
                            next: self.conn.ram.size,
                        },
                        queues: vec![vq],
                        features: self.conn.features,
                        protocol: self.conn.protocol,
                        device_queues: self.conn.device_queues,
                        _backend_req: None,
                    },
                    opts: self.opts.clone(),
                    unique: (q as u64) << 48,
                    queue: 0,
                    init: self.init,
                    kicks_held: false,
                }
            })
            .collect()
    }

    /// Build the chain of one FUSE request: the in-header and each argument in its own readable
    /// descriptor (as the Linux driver does), the out-header and the reply data in writable ones, reply
    /// data split into pages.
    pub fn request_chain(
        &mut self,
        opcode: u32,
        nodeid: u64,
        args: &[&[u8]],
        reply_len: u32,
    ) -> (u64, Chain) {
        self.unique += 2;
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
        let mut readable = vec![h.as_slice().to_vec()];
        readable.extend(args.iter().filter(|a| !a.is_empty()).map(|a| a.to_vec()));
        let mut writable = vec![std::mem::size_of::<OutHeader>() as u32];
        let mut left = reply_len;
        while left > 0 {
            let n = left.min(self.opts.page);
            writable.push(n);
            left -= n;
        }
        // Direct chains must fit in the ring; a Linux guest uses an indirect table for long ones.
        let indirect = self.opts.indirect && readable.len() + writable.len() > 2;
        (
            self.unique,
            Chain {
                readable,
                writable,
                indirect,
                ..Default::default()
            },
        )
    }

    /// Send one request on the current queue and check the reply's framing (unique, len = used len).
    pub fn call(
        &mut self,
        opcode: Opcode,
        nodeid: u64,
        args: &[&[u8]],
        reply_len: u32,
    ) -> io::Result<Reply> {
        self.call_peek(opcode, nodeid, args, reply_len, None)
    }

    /// `call`, copying at most `peek` reply bytes (header included) out of guest RAM.
    pub fn call_peek(
        &mut self,
        opcode: Opcode,
        nodeid: u64,
        args: &[&[u8]],
        reply_len: u32,
        peek: Option<u32>,
    ) -> io::Result<Reply> {
        let p = self.post(opcode, nodeid, args, reply_len, peek)?;
        let mut done = self.reap(&[p], WAIT)?;
        match (done.pop(), done.is_empty()) {
            (Some((_, reply)), true) => Ok(reply),
            _ => Err(err(format!(
                "queue {}: more than one completion for one request",
                self.queue
            ))),
        }
    }

    /// Put one request on the current queue and kick the device without waiting for the reply, which
    /// [`Guest::reap`] collects: several requests in flight on one queue, as a guest with several busy
    /// processes has. At most `peek` reply bytes (header included) are copied out of guest RAM.
    pub fn post(
        &mut self,
        opcode: Opcode,
        nodeid: u64,
        args: &[&[u8]],
        reply_len: u32,
        peek: Option<u32>,
    ) -> io::Result<Posted> {
        let (unique, mut chain) = self.request_chain(opcode as u32, nodeid, args, reply_len);
        chain.peek = peek;
        let q = &mut self.conn.queues[self.queue];
        let head = q.submit(&self.conn.ram, &chain)?;
        if !self.kicks_held {
            q.notify(&self.conn.ram);
        }
        Ok(Posted {
            head,
            unique,
            opcode,
        })
    }

    /// Post the next requests without kicking the device, so that it finds them in the ring together
    /// at the next [`Guest::kick`].
    pub fn hold_kicks(&mut self) {
        self.kicks_held = true;
    }

    /// Kick the device for the requests posted since [`Guest::hold_kicks`], and kick after each again.
    pub fn kick(&mut self) {
        self.kicks_held = false;
        self.conn.queues[self.queue].notify(&self.conn.ram);
    }

    /// The replies the device has put in the current queue's used ring, in that order, each checked
    /// against the request in `posted` it answers; waits (bounded by `timeout`) for at least one.
    pub fn reap(
        &mut self,
        posted: &[Posted],
        timeout: Duration,
    ) -> io::Result<Vec<(Posted, Reply)>> {
        let done = self.conn.queues[self.queue].wait_used(&self.conn.ram, timeout)?;
        done.into_iter()
            .map(|c| {
                let p = posted
                    .iter()
                    .find(|p| p.head == c.head)
                    .copied()
                    .ok_or_else(|| err(format!("used head {} was not posted", c.head)))?;
                Ok((p, parse_reply(p.opcode, p.unique, c)?))
            })
            .collect()
    }

    fn call_ok(
        &mut self,
        opcode: Opcode,
        nodeid: u64,
        args: &[&[u8]],
        reply_len: u32,
    ) -> io::Result<Vec<u8>> {
        let r = self.call(opcode, nodeid, args, reply_len)?;
        fuse_errno(&r.header)?;
        Ok(r.body)
    }

    /// A request whose successful reply is one fixed-size `T`.
    fn call_for<T: ByteValued + Default>(
        &mut self,
        opcode: Opcode,
        nodeid: u64,
        args: &[&[u8]],
    ) -> io::Result<T> {
        read_obj(&self.call_ok(opcode, nodeid, args, std::mem::size_of::<T>() as u32)?)
    }

    pub fn fuse_init(&mut self) -> io::Result<InitOut> {
        self.fuse_init_with(FsOptions::empty())
    }

    /// FUSE_INIT offering `extra` flags too (flags above bit 31 go in the INIT_EXT word, as Linux sends
    /// FUSE_PERFILE_DAX for `dax=inode`).
    pub fn fuse_init_with(&mut self, extra: FsOptions) -> io::Result<InitOut> {
        let mut flags = extra
            | FsOptions::ASYNC_READ
            | FsOptions::BIG_WRITES
            | FsOptions::DO_READDIRPLUS
            | FsOptions::READDIRPLUS_AUTO
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::MAX_PAGES
            | FsOptions::CACHE_SYMLINKS;
        if flags.bits() >> 32 != 0 {
            flags |= FsOptions::INIT_EXT;
        }
        let init = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 128 << 10,
            flags: flags.bits() as u32,
        };
        let ext = fuse_backend_rs::abi::fuse_abi::InitIn2 {
            flags2: (flags.bits() >> 32) as u32,
            unused: [0; 11],
        };
        let args: Vec<&[u8]> = if flags.contains(FsOptions::INIT_EXT) {
            vec![init.as_slice(), ext.as_slice()]
        } else {
            vec![init.as_slice()]
        };
        let body = self.call_ok(
            Opcode::Init,
            0,
            &args,
            std::mem::size_of::<InitOut>() as u32,
        )?;
        let out: InitOut = read_obj(&body)?;
        self.init = Some(out);
        Ok(out)
    }

    /// FUSE_SETUPMAPPING: map `len` bytes of the file at `foffset` to `moffset` in the DAX window.
    pub fn setupmapping(
        &mut self,
        nodeid: u64,
        fh: u64,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
    ) -> io::Result<()> {
        let arg = fuse_backend_rs::abi::virtio_fs::SetupmappingIn {
            fh,
            foffset,
            len,
            flags,
            moffset,
        };
        self.call_ok(Opcode::SetupMapping, nodeid, &[arg.as_slice()], 0)
            .map(drop)
    }

    /// FUSE_REMOVEMAPPING of `(moffset, len)` ranges of the DAX window.
    pub fn removemapping(&mut self, nodeid: u64, ranges: &[(u64, u64)]) -> io::Result<()> {
        let head = fuse_backend_rs::abi::virtio_fs::RemovemappingIn {
            count: ranges.len() as u32,
        };
        let mut body = head.as_slice().to_vec();
        for &(moffset, len) in ranges {
            body.extend_from_slice(
                fuse_backend_rs::abi::virtio_fs::RemovemappingOne { moffset, len }.as_slice(),
            );
        }
        self.call_ok(Opcode::RemoveMapping, nodeid, &[&body], 0)
            .map(drop)
    }

    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> io::Result<EntryOut> {
        let name = cstr(name);
        let e: EntryOut = self.call_for(Opcode::Lookup, parent, &[&name])?;
        if e.nodeid == 0 {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        Ok(e)
    }

    /// LOOKUP each component of `path` from `start`.
    pub fn lookup_path(&mut self, start: u64, path: &str) -> io::Result<EntryOut> {
        let mut e = None;
        let mut at = start;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let found = self.lookup(at, part.as_bytes())?;
            at = found.nodeid;
            e = Some(found);
        }
        e.ok_or_else(|| err("empty path"))
    }

    /// FUSE_MKNOD `name` in `parent`: `mode` holds the file type and permissions, `rdev` the device.
    pub fn mknod(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
    ) -> io::Result<EntryOut> {
        let a = MknodIn {
            mode,
            rdev,
            umask: 0,
            padding: 0,
        };
        let name = cstr(name);
        self.call_for::<EntryOut>(Opcode::Mknod, parent, &[a.as_slice(), &name])
    }

    pub fn getattr(&mut self, nodeid: u64) -> io::Result<AttrOut> {
        let a = GetattrIn::default();
        self.call_for::<AttrOut>(Opcode::Getattr, nodeid, &[a.as_slice()])
    }

    pub fn open(&mut self, nodeid: u64) -> io::Result<OpenOut> {
        let a = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        self.call_for::<OpenOut>(Opcode::Open, nodeid, &[a.as_slice()])
    }

    pub fn opendir(&mut self, nodeid: u64) -> io::Result<OpenOut> {
        let a = OpenIn {
            flags: (libc::O_RDONLY | libc::O_DIRECTORY) as u32,
            fuse_flags: 0,
        };
        self.call_for::<OpenOut>(Opcode::Opendir, nodeid, &[a.as_slice()])
    }

    pub fn release(&mut self, nodeid: u64, fh: u64, dir: bool) -> io::Result<()> {
        let a = ReleaseIn {
            fh,
            flags: libc::O_RDONLY as u32,
            release_flags: 0,
            lock_owner: 0,
        };
        self.call_ok(
            if dir {
                Opcode::Releasedir
            } else {
                Opcode::Release
            },
            nodeid,
            &[a.as_slice()],
            0,
        )
        .map(|_| ())
    }

    pub fn read(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let a = read_in(fh, offset, size);
        self.call_ok(Opcode::Read, nodeid, &[a.as_slice()], size)
    }

    /// READ that leaves the data in guest RAM (as a guest's page cache would); returns the bytes read.
    pub fn read_in_place(
        &mut self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> io::Result<usize> {
        let a = read_in(fh, offset, size);
        let r = self.call_peek(
            Opcode::Read,
            nodeid,
            &[a.as_slice()],
            size,
            Some(std::mem::size_of::<OutHeader>() as u32),
        )?;
        fuse_errno(&r.header)?;
        Ok(r.header.len as usize - std::mem::size_of::<OutHeader>())
    }

    pub fn readdirplus(
        &mut self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> io::Result<Vec<DirEntryPlus>> {
        let body = self.dir_reply(Opcode::Readdirplus, nodeid, fh, offset, size)?;
        dirents(
            &body,
            |d: &Direntplus| d.dirent.namelen,
            |d, name| DirEntryPlus {
                name,
                nodeid: d.entry_out.nodeid,
                ino: d.dirent.ino,
                off: d.dirent.off,
                type_: d.dirent.type_,
                mode: d.entry_out.attr.mode,
                size: d.entry_out.attr.size,
            },
        )
    }

    /// FUSE_READDIR from cookie `offset` into a reply of `size` bytes: (name, ino, cookie) per entry.
    pub fn readdir(
        &mut self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> io::Result<Vec<(Vec<u8>, u64, u64)>> {
        let body = self.dir_reply(Opcode::Readdir, nodeid, fh, offset, size)?;
        dirents(
            &body,
            |d: &Dirent| d.namelen,
            |d, name| (name, d.ino, d.off),
        )
    }

    /// The body of a READDIR or READDIRPLUS reply.
    fn dir_reply(
        &mut self,
        opcode: Opcode,
        nodeid: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> io::Result<Vec<u8>> {
        let a = ReadIn {
            fh,
            offset,
            size,
            read_flags: 0,
            lock_owner: 0,
            flags: 0,
            padding: 0,
        };
        self.call_ok(opcode, nodeid, &[a.as_slice()], size)
    }

    /// All entries of a directory: OPENDIR, READDIRPLUS until empty, RELEASEDIR.
    pub fn list_dir(&mut self, nodeid: u64) -> io::Result<Vec<DirEntryPlus>> {
        let fh = self.opendir(nodeid)?.fh;
        let mut all = Vec::new();
        let mut off = 0;
        loop {
            let batch = self.readdirplus(nodeid, fh, off, 64 << 10)?;
            let Some(last) = batch.last() else { break };
            off = last.off;
            all.extend(batch);
        }
        // fuse-backend-rs's PseudoFs (the share root and the directories above mounts) has no releasedir
        // and answers ENOSYS; the kernel does not look at RELEASEDIR replies. Anything else is an error.
        match self.release(nodeid, fh, true) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) && nodeid >> 56 == 0 => {}
            other => other?,
        }
        Ok(all)
    }

    pub fn getxattr(&mut self, nodeid: u64, name: &str, size: u32) -> io::Result<Xattr> {
        let a = GetxattrIn { size, padding: 0 };
        let n = cstr(name.as_bytes());
        let reply_len = if size == 0 {
            std::mem::size_of::<GetxattrOut>() as u32
        } else {
            size
        };
        let body = self.call_ok(Opcode::Getxattr, nodeid, &[a.as_slice(), &n], reply_len)?;
        if size == 0 {
            Ok(Xattr::Size(read_obj::<GetxattrOut>(&body)?.size))
        } else {
            Ok(Xattr::Value(body))
        }
    }

    /// FORGET goes on the hiprio queue and gets no reply: the chain has no writable descriptor.
    pub fn forget(&mut self, nodeid: u64, nlookup: u64) -> io::Result<()> {
        let a = ForgetIn { nlookup };
        self.unique += 2;
        let h = InHeader {
            len: (std::mem::size_of::<InHeader>() + std::mem::size_of::<ForgetIn>()) as u32,
            opcode: Opcode::Forget as u32,
            unique: self.unique,
            nodeid,
            ..Default::default()
        };
        let chain = Chain {
            readable: vec![h.as_slice().to_vec(), a.as_slice().to_vec()],
            ..Default::default()
        };
        let c = self.conn.roundtrip(0, &chain)?;
        if c.len != 0 {
            return Err(err(format!("FORGET got a {}-byte reply", c.len)));
        }
        Ok(())
    }

    /// Read a whole file with OPEN / READ(chunk) / RELEASE.
    pub fn read_file(&mut self, nodeid: u64, chunk: u32) -> io::Result<Vec<u8>> {
        let fh = self.open(nodeid)?.fh;
        let mut data = Vec::new();
        loop {
            let got = self.read(nodeid, fh, data.len() as u64, chunk)?;
            if got.is_empty() {
                break;
            }
            data.extend_from_slice(&got);
        }
        self.release(nodeid, fh, false)?;
        Ok(data)
    }
}

// ---------------------------------------------------------------------------------------------------
// The device process
// ---------------------------------------------------------------------------------------------------

/// `rafsd virtiofs --sock S --apisock A`, killed by pid on drop (also when a test fails).
pub struct VirtiofsDaemon {
    child: Option<Child>,
    pid: i32,
    pub sock: PathBuf,
    pub apisock: PathBuf,
    pub log: PathBuf,
}

impl VirtiofsDaemon {
    pub fn start(bin: &str, dir: &Path, extra: &[&str]) -> Self {
        Self::start_with_env(bin, dir, extra, &[])
    }

    /// [`Self::start`] with `env` added to the daemon's environment (inherited by the processes it
    /// starts), not to the test's: the tests of one binary run in parallel threads.
    pub fn start_with_env(bin: &str, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let (sock, apisock) = Self::sockets(dir);
        let mut cmd = Command::new(bin);
        cmd.args(["virtiofs", "--sock"])
            .arg(&sock)
            .arg("--apisock")
            .arg(&apisock)
            .args(crate::daemon::sandbox_allow_args(dir))
            .args(extra)
            .envs(env.iter().copied());
        Self::spawn(&mut cmd, sock, apisock, dir)
    }

    /// Where [`Self::start`] puts the vhost-user and API sockets for `dir`.
    pub fn sockets(dir: &Path) -> (PathBuf, PathBuf) {
        (dir.join("vhost-user.sock"), dir.join("api.sock"))
    }

    /// `bin ARGS` exactly (the sockets in `args` must be [`Self::sockets`]); waits until the API answers.
    pub fn start_with_args(bin: &str, dir: &Path, args: &[std::ffi::OsString]) -> Self {
        let (sock, apisock) = Self::sockets(dir);
        Self::start_at(bin, sock, apisock, dir, args)
    }

    /// `bin ARGS` exactly, with the sockets `args` names (where a client such as Kata puts them) and the
    /// log in `dir`; waits until the API answers.
    pub fn start_at(
        bin: &str,
        sock: PathBuf,
        apisock: PathBuf,
        dir: &Path,
        args: &[std::ffi::OsString],
    ) -> Self {
        Self::spawn(Command::new(bin).args(args), sock, apisock, dir)
    }

    /// Start `cmd` (log in `dir`) and wait until the API answers.
    fn spawn(cmd: &mut Command, sock: PathBuf, apisock: PathBuf, dir: &Path) -> Self {
        let log = dir.join("rafsd-virtiofs.log");
        let child = crate::daemon::spawn_ready(cmd, &log, Duration::from_secs(30), || {
            sock.exists()
                && apisock.exists()
                && crate::daemon::api_request(&apisock, "GET", "/api/v1/daemon", "", WAIT)
                    .is_ok_and(|(s, _)| s == 200)
        })
        .unwrap_or_else(|e| panic!("rafsd virtiofs {e}:\n{}", crate::daemon::read_log(&log)));
        VirtiofsDaemon {
            pid: child.id() as i32,
            child: Some(child),
            sock,
            apisock,
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Live upgrade: start `bin virtiofs --upgrade-from API --apisock API` (with the sandbox allow
    /// arguments for `dir`), wait until it serves and this daemon has exited, and become it.
    pub fn upgrade(&mut self, bin: &str, dir: &Path) {
        let log = dir.join(format!("rafsd-virtiofs-{}.log", self.pid));
        let mut cmd = Command::new(bin);
        cmd.arg("virtiofs")
            .arg("--upgrade-from")
            .arg(&self.apisock)
            .arg("--apisock")
            .arg(&self.apisock)
            .args(crate::daemon::sandbox_allow_args(dir));
        let apisock = self.apisock.clone();
        let mut old = self.child.take().expect("a running daemon");
        let child = crate::daemon::spawn_ready(&mut cmd, &log, Duration::from_secs(30), || {
            old.try_wait().unwrap().is_some()
                && crate::daemon::api_request(&apisock, "GET", "/api/v1/daemon", "", WAIT)
                    .is_ok_and(|(s, _)| s == 200)
        })
        .unwrap_or_else(|e| {
            panic!(
                "rafsd virtiofs --upgrade-from {e}:\n{}\n--- the old daemon's log ---\n{}",
                crate::daemon::read_log(&log),
                self.log_text()
            )
        });
        let status = old.wait().unwrap();
        assert!(status.success(), "the old daemon exited with {status}");
        self.pid = child.id() as i32;
        self.child = Some(child);
        self.log = log;
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// One HTTP/1.1 request to the admin API; returns (status, body).
    pub fn api(&self, method: &str, target: &str, body: &str) -> io::Result<(u16, String)> {
        crate::daemon::api_request(&self.apisock, method, target, body, WAIT)
    }

    /// POST /api/v1/mount?mountpoint=MP of `source` as `fs_type` with a nydusd v1 config: (status, body).
    pub fn try_mount(
        &self,
        mountpoint: &str,
        fs_type: &str,
        source: &Path,
        config: &str,
    ) -> (u16, String) {
        let body =
            serde_json::json!({"source": source, "fs_type": fs_type, "config": config}).to_string();
        self.api(
            "POST",
            &format!("/api/v1/mount?mountpoint={mountpoint}"),
            &body,
        )
        .expect("mount API call")
    }

    /// Mount reference image `case` at `mountpoint` from its blob directory (localfs backend), with the
    /// blob cache in `cache` and chunks checked on read if `validate`.
    pub fn mount_case(&self, mountpoint: &str, case: &str, cache: &Path, validate: bool) {
        let config =
            crate::daemon::v1_config(&crate::manifest::case_blob_dir(case), cache, validate, "");
        self.mount_rafs(mountpoint, &crate::manifest::case_bootstrap(case), &config);
    }

    /// POST /api/v1/mount?mountpoint=MP with a RAFS image and its nydusd v1 config.
    pub fn mount_rafs(&self, mountpoint: &str, bootstrap: &Path, config: &str) {
        let (status, text) = self.try_mount(mountpoint, "rafs", bootstrap, config);
        assert_eq!(
            status,
            204,
            "mount {mountpoint}: {text}\nlog:\n{}",
            self.log_text()
        );
    }

    /// SIGKILL by pid, reap, and check nothing is left: neither the process nor any other holding our socket.
    pub fn kill_and_check(mut self) {
        if std::env::var_os("RAFSD_TEST_SHOW_LOG").is_some() {
            eprintln!("--- {} ---\n{}", self.log.display(), self.log_text());
        }
        self.kill();
        assert!(
            !Path::new(&format!("/proc/{}", self.pid)).exists(),
            "rafsd pid {} still exists after kill",
            self.pid
        );
        let sock = self.sock.to_string_lossy().into_owned();
        // The sandboxed daemon (the supervisor's child) dies of PDEATHSIG right after: allow a moment.
        let deadline = Instant::now() + WAIT;
        loop {
            let holders: Vec<String> = std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|entry| {
                    let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                    let cmdline = String::from_utf8_lossy(&cmdline).into_owned();
                    cmdline
                        .contains(&sock)
                        .then(|| format!("pid {:?}: {cmdline}", entry.file_name()))
                })
                .collect();
            if holders.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a process still serves {sock}: {holders:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let deadline = Instant::now() + WAIT;
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.wait();
        }
    }
}

impl Drop for VirtiofsDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// xorshift64*: deterministic offsets without a dependency.
pub struct Rng(pub u64);

impl Rng {
    // Named like the tests and benchmarks call it; an Iterator would hand out Options they never need.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}
