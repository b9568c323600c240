//! The vhost-user message relay that makes the device replaceable under a running VMM.
//!
//! vhost-user-backend serves only a connection it accepted itself and cannot be rebuilt from state, and
//! QEMU's vhost-user-fs never reconnects. So the process keeps the VMM's connected socket itself and
//! gives the library a private connection: [`run`] forwards each message (with its descriptors) from
//! the VMM to the library and the library's reply back, and keeps a [`Journal`] of what the messages
//! set up (features, memory table, vrings, backend request channel) with its own copies of their
//! descriptors. A successor process (or this one after a failed hand-over) gets the VMM's socket and
//! the journal, and replays it into a fresh library instance ([`Journal::replay_stopped`], then
//! [`Journal::start`]): the VMM sees nothing.
//!
//! Messages are rare control messages (set-up, reset, stop); requests and replies of the guest go
//! through shared memory and eventfds, which the relay never touches, so it costs nothing per I/O.
//! The protocol is strictly request/reply, so the relay reads one request, forwards it, and reads one
//! reply when the request has one ([`has_reply`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use super::wire::{Msg, FLAG_NEED_REPLY};
use crate::takeover::state::{Device, MemoryRegion, Vring, VringAddr};

// vhost-user request codes (the specification's numbers).
pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_OWNER: u32 = 3;
pub const RESET_OWNER: u32 = 4;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_LOG_BASE: u32 = 6;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const SET_VRING_BASE: u32 = 10;
pub const GET_VRING_BASE: u32 = 11;
pub const SET_VRING_KICK: u32 = 12;
pub const SET_VRING_CALL: u32 = 13;
pub const SET_VRING_ERR: u32 = 14;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const GET_QUEUE_NUM: u32 = 17;
pub const SET_VRING_ENABLE: u32 = 18;
pub const SET_BACKEND_REQ_FD: u32 = 21;
pub const GET_CONFIG: u32 = 24;
pub const POSTCOPY_ADVISE: u32 = 28;
pub const GET_INFLIGHT_FD: u32 = 31;
pub const RESET_DEVICE: u32 = 34;
pub const GET_MAX_MEM_SLOTS: u32 = 36;
pub const GET_STATUS: u32 = 40;
pub const GET_SHARED_OBJECT: u32 = 41;
pub const SET_DEVICE_STATE_FD: u32 = 42;
pub const CHECK_DEVICE_STATE: u32 = 43;
pub const GET_SHMEM_CONFIG: u32 = 44;

/// VHOST_USER_F_PROTOCOL_FEATURES and VHOST_USER_PROTOCOL_F_REPLY_ACK.
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// SET_VRING_KICK/CALL/ERR: the ring index is the low byte; this bit says "no descriptor".
const VRING_NOFD: u64 = 1 << 8;

/// Whether the backend answers `msg` (as vhost 0.16's request handler does): the GET_ requests and a
/// few others always; any other only when it asks for an ack and REPLY_ACK was negotiated.
pub fn has_reply(request: u32, flags: u32, reply_ack: bool) -> bool {
    matches!(
        request,
        GET_FEATURES
            | GET_VRING_BASE
            | GET_PROTOCOL_FEATURES
            | GET_QUEUE_NUM
            | GET_CONFIG
            | GET_INFLIGHT_FD
            | GET_MAX_MEM_SLOTS
            | GET_STATUS
            | GET_SHARED_OBJECT
            | SET_DEVICE_STATE_FD
            | CHECK_DEVICE_STATE
            | GET_SHMEM_CONFIG
            | SET_LOG_BASE
            | POSTCOPY_ADVISE
    ) || (reply_ack && flags & FLAG_NEED_REPLY != 0)
}

/// One vring as the VMM set it up.
#[derive(Default)]
struct RingJournal {
    size: Option<u32>,
    addr: Option<VringAddr>,
    base: Option<u32>,
    kick: Option<File>,
    call: Option<File>,
    err: Option<File>,
    enabled: Option<bool>,
}

/// What the VMM's messages set up on this connection, with our own copies of their descriptors.
#[derive(Default)]
pub struct Journal {
    /// What the backend offered (GET_FEATURES): with PROTOCOL_FEATURES among them and REPLY_ACK acked,
    /// requests that ask for an ack get one.
    offered: Option<u64>,
    owner: bool,
    features: Option<u64>,
    protocol_features: Option<u64>,
    memory: Option<(Vec<MemoryRegion>, Vec<File>)>,
    rings: Vec<RingJournal>,
    backend_req: Option<File>,
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn dup(f: &File) -> io::Result<File> {
    f.try_clone()
}

impl Journal {
    /// Rings beyond this index are not journaled (the backend refuses them anyway).
    const MAX_RINGS: usize = 256;

    fn ring(&mut self, index: u64) -> Option<&mut RingJournal> {
        let i = usize::try_from(index)
            .ok()
            .filter(|i| *i < Self::MAX_RINGS)?;
        if self.rings.len() <= i {
            self.rings.resize_with(i + 1, RingJournal::default);
        }
        self.rings.get_mut(i)
    }

    /// Acks were negotiated: requests with NEED_REPLY get one.
    pub fn reply_ack(&self) -> bool {
        self.offered.unwrap_or(0) & F_PROTOCOL_FEATURES != 0
            && self.protocol_features.unwrap_or(0) & PROTOCOL_F_REPLY_ACK != 0
    }

    /// Note what a request from the VMM sets up (before it is forwarded; a request the backend then
    /// refuses ends the connection, journal and all). Malformed requests are not noted: the backend
    /// refuses them.
    pub fn record(&mut self, m: &Msg) -> io::Result<()> {
        let p = &m.payload;
        let first = m.files.first();
        match m.request {
            SET_OWNER => self.owner = true,
            // vhost-user-backend keeps what it offered and the acked protocol features (so whether
            // requests get an ack) across a reset; so does the journal.
            RESET_OWNER | RESET_DEVICE => {
                *self = Journal {
                    offered: self.offered,
                    protocol_features: self.protocol_features,
                    ..Journal::default()
                }
            }
            SET_FEATURES => self.features = m.u64().or(self.features),
            SET_PROTOCOL_FEATURES => self.protocol_features = m.u64().or(self.protocol_features),
            SET_MEM_TABLE => {
                let n = le_u32(p, 0).unwrap_or(0) as usize;
                if n != m.files.len() || p.len() < 8 + 32 * n {
                    return Ok(());
                }
                let regions = (0..n)
                    .map(|i| {
                        let at = 8 + 32 * i;
                        MemoryRegion {
                            guest_phys_addr: le_u64(p, at).unwrap_or(0),
                            memory_size: le_u64(p, at + 8).unwrap_or(0),
                            user_addr: le_u64(p, at + 16).unwrap_or(0),
                            mmap_offset: le_u64(p, at + 24).unwrap_or(0),
                            fd: i as u32,
                        }
                    })
                    .collect();
                let files = m.files.iter().map(dup).collect::<io::Result<_>>()?;
                self.memory = Some((regions, files));
            }
            SET_VRING_NUM | SET_VRING_BASE | SET_VRING_ENABLE => {
                let Some((index, value)) = m.ring_state() else {
                    return Ok(());
                };
                let request = m.request;
                if let Some(r) = self.ring(index.into()) {
                    match request {
                        SET_VRING_NUM => r.size = Some(value),
                        SET_VRING_BASE => r.base = Some(value),
                        _ => r.enabled = Some(value != 0),
                    }
                }
            }
            SET_VRING_ADDR => {
                let (Some(index), Some(flags)) = (le_u32(p, 0), le_u32(p, 4)) else {
                    return Ok(());
                };
                let addr = VringAddr {
                    flags,
                    descriptor: le_u64(p, 8).unwrap_or(0),
                    used: le_u64(p, 16).unwrap_or(0),
                    available: le_u64(p, 24).unwrap_or(0),
                    log: le_u64(p, 32).unwrap_or(0),
                };
                if let Some(r) = self.ring(index.into()) {
                    r.addr = Some(addr);
                }
            }
            SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => {
                let Some(v) = m.u64() else { return Ok(()) };
                let file = match first {
                    Some(f) if v & VRING_NOFD == 0 => Some(dup(f)?),
                    _ => None,
                };
                let request = m.request;
                if let Some(r) = self.ring(v & 0xff) {
                    match request {
                        SET_VRING_KICK => r.kick = file,
                        SET_VRING_CALL => r.call = file,
                        _ => r.err = file,
                    }
                }
            }
            SET_BACKEND_REQ_FD => self.backend_req = first.map(dup).transpose()?,
            _ => {}
        }
        Ok(())
    }

    /// The backend's reply to a request, for what it says about the rings: GET_VRING_BASE stops one
    /// (vhost-user-backend drops its kick and call descriptors; a successor must not restart it).
    pub fn record_reply(&mut self, m: &Msg) {
        if m.request == GET_FEATURES {
            self.offered = m.u64().or(self.offered);
        }
        if m.request == GET_VRING_BASE {
            if let (Some(index), Some(base)) = (le_u32(&m.payload, 0), le_u32(&m.payload, 4)) {
                if let Some(r) = self.ring(index.into()) {
                    r.base = Some(base);
                    r.kick = None;
                    r.call = None;
                }
            }
        }
    }

    /// Rings the VMM started (they have a kick descriptor): the ones to stop and hand over.
    pub fn started_rings(&self) -> Vec<u32> {
        (0..self.rings.len() as u32)
            .filter(|i| self.rings[*i as usize].kick.is_some())
            .collect()
    }

    /// Each ring's next avail index, where one was set.
    pub fn bases(&self) -> Vec<(usize, u16)> {
        self.rings
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((i, r.base? as u16)))
            .collect()
    }

    pub fn set_base(&mut self, index: u32, base: u32) {
        if let Some(r) = self.ring(index.into()) {
            r.base = Some(base);
        }
    }

    /// The serialisable form, with the descriptors it names (duplicates: the journal keeps its own).
    /// Descriptors 0 and 1 are the connection and the listener, given by the caller.
    pub fn export(
        &self,
        connection: &UnixStream,
        listener: RawFd,
        socket_path: &std::path::Path,
        rings: usize,
    ) -> io::Result<(Device, Vec<File>)> {
        let mut files: Vec<File> = vec![dup_raw(connection.as_raw_fd())?, dup_raw(listener)?];
        let mut add = |f: &File| -> io::Result<u32> {
            files.push(dup(f)?);
            Ok(files.len() as u32 - 1)
        };
        let memory = match &self.memory {
            None => None,
            Some((regions, mem)) => {
                let mut out = Vec::with_capacity(regions.len());
                for r in regions {
                    let f = mem
                        .get(r.fd as usize)
                        .ok_or_else(|| io::Error::other("memory region without its descriptor"))?;
                    out.push(MemoryRegion { fd: add(f)?, ..*r });
                }
                Some(out)
            }
        };
        let mut vrings = Vec::new();
        // Only the device's rings (the backend refuses others): the descriptors stay within what one
        // state may carry.
        for (i, r) in self.rings.iter().enumerate().take(rings) {
            let opt = |f: &Option<File>, add: &mut dyn FnMut(&File) -> io::Result<u32>| {
                f.as_ref().map(add).transpose()
            };
            vrings.push(Vring {
                index: i as u32,
                size: r.size,
                addr: r.addr,
                next_avail: r.base,
                kick_fd: opt(&r.kick, &mut add)?,
                call_fd: opt(&r.call, &mut add)?,
                err_fd: opt(&r.err, &mut add)?,
                enabled: r.enabled,
            });
        }
        let backend_req_fd = self.backend_req.as_ref().map(&mut add).transpose()?;
        let features = self.features;
        Ok((
            Device {
                connection_fd: 0,
                listener_fd: 1,
                socket_path: socket_path.to_path_buf(),
                owner: self.owner,
                features,
                protocol_features: self.protocol_features,
                event_idx: features.unwrap_or(0) & VIRTIO_RING_F_EVENT_IDX != 0,
                memory,
                vrings,
                backend_req_fd,
                request_queues: 0,
                dax_window: 0,
                dax_mappings: Vec::new(),
            },
            files,
        ))
    }

    /// The journal of a device handed over, taking its descriptors out of `files`.
    pub fn import(d: &Device, files: &mut [Option<File>]) -> io::Result<Journal> {
        let mut take = |i: u32| -> io::Result<File> {
            files
                .get_mut(i as usize)
                .and_then(Option::take)
                .ok_or_else(|| io::Error::other(format!("descriptor {i} missing or used twice")))
        };
        let memory = match &d.memory {
            None => None,
            Some(regions) => {
                let mut out = Vec::new();
                let mut mem = Vec::new();
                for (k, r) in regions.iter().enumerate() {
                    mem.push(take(r.fd)?);
                    out.push(MemoryRegion { fd: k as u32, ..*r });
                }
                Some((out, mem))
            }
        };
        let mut rings = Vec::new();
        for (i, v) in d.vrings.iter().enumerate() {
            if v.index as usize != i || i >= Self::MAX_RINGS {
                return Err(io::Error::other("vrings out of order"));
            }
            rings.push(RingJournal {
                size: v.size,
                addr: v.addr,
                base: v.next_avail,
                kick: v.kick_fd.map(&mut take).transpose()?,
                call: v.call_fd.map(&mut take).transpose()?,
                err: v.err_fd.map(&mut take).transpose()?,
                enabled: v.enabled,
            });
        }
        Ok(Journal {
            offered: None,
            owner: d.owner,
            features: d.features,
            protocol_features: d.protocol_features,
            memory,
            rings,
            backend_req: d.backend_req_fd.map(&mut take).transpose()?,
        })
    }

    /// Set a fresh backend up as the journal says, on its connection `sock`, except what starts the
    /// rings (their kick eventfds and SET_VRING_ENABLE: [`Journal::start`]), then make sure it took
    /// everything (a GET_FEATURES round trip: the backend ends the connection on a request it refuses).
    /// Until the rings start the backend takes nothing off them: a successor that is not told to go
    /// ahead leaves them to its predecessor untouched.
    pub fn replay_stopped(&mut self, sock: &UnixStream) -> io::Result<()> {
        let ask = |request: u32| -> io::Result<Msg> {
            Msg::new(request, Vec::new(), Vec::new()).send(sock)?;
            Msg::recv(sock)?.ok_or_else(|| {
                io::Error::other(format!(
                    "the backend ended the connection at request {request}"
                ))
            })
        };
        let send = |request: u32, payload: Vec<u8>, files: Vec<File>| {
            Msg::new(request, payload, files).send(sock)
        };
        self.offered = ask(GET_FEATURES)?.u64();
        ask(GET_PROTOCOL_FEATURES)?;
        if self.owner {
            send(SET_OWNER, Vec::new(), Vec::new())?;
        }
        if let Some(f) = self.protocol_features {
            send(SET_PROTOCOL_FEATURES, f.to_le_bytes().to_vec(), Vec::new())?;
        }
        if let Some(f) = self.features {
            send(SET_FEATURES, f.to_le_bytes().to_vec(), Vec::new())?;
        }
        if let Some((regions, mem)) = &self.memory {
            let mut p = Vec::with_capacity(8 + 32 * regions.len());
            p.extend_from_slice(&(regions.len() as u32).to_le_bytes());
            p.extend_from_slice(&0u32.to_le_bytes());
            for r in regions {
                for v in [r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
            }
            let files = mem.iter().map(dup).collect::<io::Result<_>>()?;
            send(SET_MEM_TABLE, p, files)?;
        }
        if let Some(f) = &self.backend_req {
            send(SET_BACKEND_REQ_FD, Vec::new(), vec![dup(f)?])?;
        }
        let state = |i: usize, v: u32| [(i as u32).to_le_bytes(), v.to_le_bytes()].concat();
        for (i, r) in self.rings.iter().enumerate() {
            if let Some(n) = r.size {
                send(SET_VRING_NUM, state(i, n), Vec::new())?;
            }
            if let Some(a) = r.addr {
                let mut p = state(i, a.flags);
                for v in [a.descriptor, a.used, a.available, a.log] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
                send(SET_VRING_ADDR, p, Vec::new())?;
            }
            if let Some(b) = r.base {
                send(SET_VRING_BASE, state(i, b), Vec::new())?;
            }
            for (request, f) in [(SET_VRING_CALL, &r.call), (SET_VRING_ERR, &r.err)] {
                if let Some(f) = f {
                    send(request, (i as u64).to_le_bytes().to_vec(), vec![dup(f)?])?;
                }
            }
        }
        round_trip(sock)
    }

    /// Start the rings [`Journal::replay_stopped`] left out (kick eventfds, SET_VRING_ENABLE) and kick
    /// each once.
    pub fn start(&self, sock: &UnixStream) -> io::Result<()> {
        let state = |i: usize, v: u32| [(i as u32).to_le_bytes(), v.to_le_bytes()].concat();
        for (i, r) in self.rings.iter().enumerate() {
            if let Some(f) = &r.kick {
                let p = (i as u64).to_le_bytes().to_vec();
                Msg::new(SET_VRING_KICK, p, vec![dup(f)?]).send(sock)?;
            }
            if let Some(e) = r.enabled {
                Msg::new(SET_VRING_ENABLE, state(i, e.into()), Vec::new()).send(sock)?;
            }
        }
        round_trip(sock)?;
        self.kick_all();
        Ok(())
    }

    /// Kick every started ring once, so that requests the guest queued while nobody served it are
    /// taken now rather than at its next kick.
    pub fn kick_all(&self) {
        for r in &self.rings {
            signal(&r.kick);
        }
    }

    /// Interrupt the guest once on every ring: answers a process published just before it died
    /// never got their interrupt (a spurious one costs the guest a look at the used ring).
    pub fn call_all(&self) {
        for r in self.rings.iter().filter(|r| r.kick.is_some()) {
            signal(&r.call);
        }
    }
}

/// Write 1 to an eventfd, if there is one.
fn signal(eventfd: &Option<File>) {
    if let Some(f) = eventfd {
        let one = 1u64.to_ne_bytes();
        // SAFETY: an eventfd write of 8 bytes from a local buffer.
        unsafe { libc::write(f.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

fn dup_raw(fd: RawFd) -> io::Result<File> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we hold gives a new one we own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nobody else.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(new) })
}

/// Why [`run`] returned.
pub enum End {
    /// The VMM hung up (or the backend ended the connection on a request it refused).
    Disconnected,
    /// `on_wake` said the connection now belongs to another process.
    HandedOver,
}

/// Relay between the VMM's socket and the backend's until one ends, or until `on_wake` (called when
/// `wake` is readable, between two messages) says the connection was handed over. `relayed` is called
/// after each message (and its reply) went through.
pub fn run(
    vmm: &UnixStream,
    backend: &UnixStream,
    journal: &mut Journal,
    wake: RawFd,
    mut on_wake: impl FnMut(&mut Journal) -> bool,
    mut forwarding: impl FnMut(&Msg),
    mut relayed: impl FnMut(&Journal, &Msg),
) -> io::Result<End> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: vmm.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents & libc::POLLIN != 0 && on_wake(journal) {
            return Ok(End::HandedOver);
        }
        if fds[0].revents == 0 {
            continue;
        }
        let Some(m) = Msg::recv(vmm)? else {
            return Ok(End::Disconnected);
        };
        // After the journal took the request: a SET_PROTOCOL_FEATURES changes whether it is acked.
        journal.record(&m)?;
        let reply = has_reply(m.request, m.flags, journal.reply_ack());
        forwarding(&m);
        m.send(backend)?;
        let r = match reply {
            false => None,
            true => match Msg::recv(backend)? {
                Some(r) => Some(r),
                None => return Ok(End::Disconnected),
            },
        };
        if let Some(r) = &r {
            journal.record_reply(r);
        }
        // Before the VMM hears the reply: whoever carries on after this process sees the set-up the
        // VMM was told about.
        relayed(journal, &m);
        if let Some(r) = r {
            r.send(vmm)?;
        }
    }
}

/// Stop `rings` through the backend connection (GET_VRING_BASE), noting in the journal where each
/// stopped as its reply arrives. Returns the rings stopped, and the error that ended the stop early
/// if one did: only those rings may be restarted at their noted base (one not stopped still runs,
/// past the base the journal had).
pub fn stop_rings(
    backend: &UnixStream,
    journal: &mut Journal,
    rings: &[u32],
) -> (Vec<u32>, io::Result<()>) {
    let mut stopped = Vec::new();
    for &i in rings {
        let base = (|| {
            let p = [i.to_le_bytes(), 0u32.to_le_bytes()].concat();
            Msg::new(GET_VRING_BASE, p, Vec::new()).send(backend)?;
            let r = Msg::recv(backend)?.ok_or_else(|| {
                io::Error::other("the backend ended the connection at GET_VRING_BASE")
            })?;
            r.ring_state()
                .map(|(_, base)| base)
                .ok_or_else(|| io::Error::other("short GET_VRING_BASE reply"))
        })();
        match base {
            Ok(b) => {
                journal.set_base(i, b);
                stopped.push(i);
            }
            Err(e) => return (stopped, Err(e)),
        }
    }
    (stopped, Ok(()))
}

/// Start rings stopped by [`stop_rings`] again at the same place (a hand-over that failed after the
/// stop): base, call and kick as before. The caller kicks them once the gate is open again.
pub fn restart_rings(backend: &UnixStream, journal: &Journal, rings: &[u32]) -> io::Result<()> {
    for &i in rings {
        let Some(r) = journal.rings.get(i as usize) else {
            continue;
        };
        if let Some(b) = r.base {
            let p = [i.to_le_bytes(), b.to_le_bytes()].concat();
            Msg::new(SET_VRING_BASE, p, Vec::new()).send(backend)?;
        }
        for (request, f) in [(SET_VRING_CALL, &r.call), (SET_VRING_KICK, &r.kick)] {
            if let Some(f) = f {
                let p = u64::from(i).to_le_bytes().to_vec();
                Msg::new(request, p, vec![dup(f)?]).send(backend)?;
            }
        }
    }
    round_trip(backend)
}

/// A GET_FEATURES round trip: the backend took every message before it (it ends the connection on
/// a request it refuses).
fn round_trip(backend: &UnixStream) -> io::Result<()> {
    Msg::new(GET_FEATURES, Vec::new(), Vec::new()).send(backend)?;
    Msg::recv(backend)?.ok_or_else(|| io::Error::other("the backend ended the connection"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    fn msg(request: u32, payload: Vec<u8>, files: Vec<File>) -> Msg {
        Msg::new(request, payload, files)
    }

    fn state(i: u32, v: u32) -> Vec<u8> {
        [i.to_le_bytes(), v.to_le_bytes()].concat()
    }

    /// What a VMM sets up, journaled, exported, carried as a state, imported and replayed: the
    /// replayed messages say the same, with the bases given at the hand-over and the same files.
    #[test]
    fn a_journal_survives_export_and_replays_the_same_set_up() {
        let mem = tempfile::tempfile().unwrap();
        let kick = tempfile::tempfile().unwrap();
        let call = tempfile::tempfile().unwrap();
        let mut j = Journal::default();
        let mut table = state(1, 0);
        for v in [0x1000u64, 0x4000, 0x7f00_0000_0000, 0] {
            table.extend_from_slice(&v.to_le_bytes());
        }
        let mut addr = state(1, 0);
        for v in [0x7f00_0000_1000u64, 0x7f00_0000_2000, 0x7f00_0000_3000, 0] {
            addr.extend_from_slice(&v.to_le_bytes());
        }
        let features = F_PROTOCOL_FEATURES | VIRTIO_RING_F_EVENT_IDX;
        for m in [
            msg(SET_OWNER, vec![], vec![]),
            msg(SET_PROTOCOL_FEATURES, 9u64.to_le_bytes().to_vec(), vec![]),
            msg(SET_FEATURES, features.to_le_bytes().to_vec(), vec![]),
            msg(SET_MEM_TABLE, table, vec![mem.try_clone().unwrap()]),
            msg(SET_VRING_NUM, state(1, 128), vec![]),
            msg(SET_VRING_ADDR, addr, vec![]),
            msg(SET_VRING_BASE, state(1, 0), vec![]),
            msg(
                SET_VRING_KICK,
                1u64.to_le_bytes().to_vec(),
                vec![kick.try_clone().unwrap()],
            ),
            msg(
                SET_VRING_CALL,
                1u64.to_le_bytes().to_vec(),
                vec![call.try_clone().unwrap()],
            ),
            msg(SET_VRING_ENABLE, state(1, 1), vec![]),
        ] {
            j.record(&m).unwrap();
        }
        assert_eq!(j.started_rings(), vec![1]);
        j.set_base(1, 77);
        let (conn, _peer) = UnixStream::pair().unwrap();
        let (device, files) = j
            .export(&conn, conn.as_raw_fd(), Path::new("/s"), 2)
            .unwrap();
        assert!(device.event_idx);
        let state_files = files.len();
        let mut files: Vec<Option<File>> = files.into_iter().map(Some).collect();
        let back = Journal::import(&device, &mut files).unwrap();
        assert_eq!(
            files.iter().flatten().count(),
            2,
            "connection and listener left"
        );
        assert_eq!(state_files, 5);
        let (ours, theirs) = UnixStream::pair().unwrap();
        let backend = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while let Some(m) = Msg::recv(&theirs).unwrap() {
                if matches!(m.request, GET_FEATURES | GET_PROTOCOL_FEATURES) {
                    Msg::new(m.request, features.to_le_bytes().to_vec(), vec![])
                        .send(&theirs)
                        .unwrap();
                }
                seen.push(m);
            }
            seen
        });
        let mut back = back;
        back.replay_stopped(&ours).unwrap();
        // Nothing starts a ring before the successor is told to go ahead: the stopped set-up ends
        // with its round trip, then come the kicks and enables.
        back.start(&ours).unwrap();
        drop(ours);
        let seen = backend.join().unwrap();
        let started = seen
            .iter()
            .position(|m| matches!(m.request, SET_VRING_KICK | SET_VRING_ENABLE))
            .unwrap();
        assert_eq!(seen[started - 1].request, GET_FEATURES);
        assert_eq!(
            seen[..started]
                .iter()
                .filter(|m| m.request == GET_FEATURES)
                .count(),
            2,
            "replay_stopped (its first question and its round trip) sent no kick or enable"
        );
        let find = |r: u32| seen.iter().find(|m| m.request == r).unwrap();
        assert_eq!(find(SET_FEATURES).u64(), Some(features));
        assert_eq!(find(SET_VRING_BASE).payload, state(1, 77));
        assert_eq!(find(SET_VRING_NUM).payload, state(1, 128));
        let ino = |f: &File| f.metadata().unwrap().ino();
        assert_eq!(ino(&find(SET_MEM_TABLE).files[0]), ino(&mem));
        assert_eq!(ino(&find(SET_VRING_KICK).files[0]), ino(&kick));
        assert_eq!(le_u64(&find(SET_MEM_TABLE).payload, 8), Some(0x1000));
        assert_eq!(
            seen.last().unwrap().request,
            GET_FEATURES,
            "ends with a round trip"
        );
        assert!(back.reply_ack() || features & (1 << 3) == 0);
        // GET_VRING_BASE stops a ring: it is not started again by a successor.
        let mut j = back;
        j.record_reply(&msg(GET_VRING_BASE, state(1, 80), vec![]));
        assert!(j.started_rings().is_empty());
    }

    /// After RESET_OWNER the backend still acks requests that ask for it (vhost-user-backend keeps
    /// the acked protocol features): the relay must keep waiting for those replies.
    #[test]
    fn a_reset_keeps_the_acks() {
        let mut j = Journal::default();
        j.record_reply(&msg(
            GET_FEATURES,
            F_PROTOCOL_FEATURES.to_le_bytes().to_vec(),
            vec![],
        ));
        j.record(&msg(
            SET_PROTOCOL_FEATURES,
            PROTOCOL_F_REPLY_ACK.to_le_bytes().to_vec(),
            vec![],
        ))
        .unwrap();
        assert!(j.reply_ack());
        j.record(&msg(RESET_OWNER, vec![], vec![])).unwrap();
        assert!(j.reply_ack(), "RESET_OWNER");
        j.record(&msg(RESET_DEVICE, vec![], vec![])).unwrap();
        assert!(j.reply_ack(), "RESET_DEVICE");
    }

    /// A ring stop that fails part way: the rings stopped before the failure have their bases noted
    /// and are the only ones to restart; the ring that did not answer is not among them.
    #[test]
    fn a_partly_failed_stop_notes_the_bases_it_got() {
        let mut j = Journal::default();
        for i in 0..3u32 {
            j.record(&msg(SET_VRING_BASE, state(i, 5), vec![])).unwrap();
        }
        let (ours, theirs) = UnixStream::pair().unwrap();
        let backend = std::thread::spawn(move || {
            for base in [40u32, 70] {
                let m = Msg::recv(&theirs).unwrap().unwrap();
                let i = le_u32(&m.payload, 0).unwrap();
                Msg::new(GET_VRING_BASE, state(i, base), vec![])
                    .send(&theirs)
                    .unwrap();
            }
            // The third stop: the backend hangs up.
            Msg::recv(&theirs).unwrap();
        });
        let (stopped, result) = stop_rings(&ours, &mut j, &[0, 1, 2]);
        backend.join().unwrap();
        assert!(result.is_err());
        assert_eq!(stopped, [0, 1]);
        let bases: Vec<_> = j.rings.iter().map(|r| r.base).collect();
        assert_eq!(bases, [Some(40), Some(70), Some(5)]);
    }

    #[test]
    fn replies_are_expected_where_the_backend_sends_them() {
        assert!(has_reply(GET_FEATURES, 1, false));
        assert!(has_reply(GET_VRING_BASE, 1, false));
        assert!(!has_reply(SET_MEM_TABLE, 1 | FLAG_NEED_REPLY, false));
        assert!(has_reply(SET_MEM_TABLE, 1 | FLAG_NEED_REPLY, true));
        assert!(!has_reply(SET_VRING_KICK, 1, true));
    }
}
