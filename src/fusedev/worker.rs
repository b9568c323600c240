//! One FUSE worker: reads a request from its channel, answers it (itself for what the server must not
//! see or cannot do well: INIT's parameters, resent requests under `--failover-policy flush`, xattrs of
//! the Vfs's own directories, spliced READ replies; the server for the rest), and goes back for the next.
//! Cold READs beyond their share of the workers wait for a slot (see [`crate::cold_slots`]).

use std::io::Read;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{FsOptions, InHeader, InitOut, OutHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::Vfs;
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader};
use vm_memory::ByteValued;

use super::channel::Channel;
use super::splice::{self, ReplyPipe};
use super::{capture_init, flush, write_fuse, write_message, Shared};
use super::{FUSE_INIT, FUSE_READ, FUSE_UNIQUE_RESEND};
use crate::cold_slots::{Admission, ColdSlots};
use crate::daemon::{RafsIndex, RafsRead};
use crate::fs::pseudo_xattr;
use crate::inflight::Inflight;

/// A READ request is 80 bytes (its header and `fuse_read_in`); a longer one never waits for a slot.
const MAX_PARKED_REQUEST: usize = 128;

/// A copy of a READ request waiting for a cold slot (the kernel's copy is gone once read).
pub(super) struct ParkedRead {
    bytes: [u8; MAX_PARKED_REQUEST],
    len: usize,
}

impl ParkedRead {
    /// The request's unique id (`fuse_in_header`: len, opcode, then unique).
    fn unique(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bytes[8..16]);
        u64::from_ne_bytes(b)
    }
}

/// What becomes of parked requests once the workers are told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OnStop {
    /// Answered as usual (the mount stays for a successor that will not see them again).
    Answer = 0,
    /// Failed with EIO rather than fetched from a backend that may be slow: the mount goes away, and a
    /// request still queued in the kernel fails then too.
    Fail = 1,
    /// Left unanswered: the kernel resends them to the successor.
    Leave = 2,
}

impl OnStop {
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => OnStop::Fail,
            2 => OnStop::Leave,
            _ => OnStop::Answer,
        }
    }
}

pub(super) struct Worker {
    /// This worker's number (its slot in `inflight`).
    pub index: usize,
    pub server: Arc<Server<Arc<Vfs>>>,
    pub vfs: Arc<Vfs>,
    pub shared: Arc<Shared>,
    pub inflight: Arc<Inflight>,
    pub rafs_index: Arc<RafsIndex>,
    pub cold_slots: Arc<ColdSlots<ParkedRead>>,
    /// For spliced READ replies (made when the worker starts); without one, every reply goes through the
    /// server.
    pub reply_pipe: Option<ReplyPipe>,
}

impl Worker {
    /// Serve requests until a stop is requested or the connection ends.
    pub fn run(mut self, mut channel: Channel) {
        self.reply_pipe = ReplyPipe::new()
            .map_err(|e| log::warn!("no pipe for READ replies, they are copied: {e}"))
            .ok();
        let shared = self.shared.clone();
        let stop = shared.stop.get().expect("set before the workers start");
        loop {
            let cold = match channel.next(stop) {
                Ok(Some((reader, writer))) => self.take(reader, writer),
                Ok(None) => break,
                Err(e) => {
                    log::warn!("FUSE channel: {e}");
                    break;
                }
            };
            if let Some(image) = cold {
                self.answer_parked(&mut channel, image);
            }
        }
    }

    /// Answer (or park) a request just read; when it was a cold READ answered here, the image (Vfs mount
    /// index) whose cold slot the caller passes on with [`Self::answer_parked`].
    fn take(&mut self, reader: Reader<'_>, writer: FuseDevWriter<'_>) -> Option<u8> {
        let Ok(h) = reader.clone().read_obj::<InHeader>() else {
            // Too short to be a request; the server says so.
            let _ = self
                .server
                .handle_message(reader, writer.into(), None, None);
            return None;
        };
        if h.opcode == FUSE_INIT {
            capture_init(reader.clone(), &self.shared);
            if let Some(pages) = splice::init_max_pages() {
                self.answer_init(reader, writer, pages);
                return None;
            }
        }
        if h.unique & FUSE_UNIQUE_RESEND != 0 {
            log::info!(
                "request {:#x} (opcode {}) sent again by the kernel after the takeover",
                h.unique,
                h.opcode
            );
            if self.shared.flush_resent.load(Ordering::Relaxed) {
                flush(&self.shared, h.unique);
                return None;
            }
        }
        if let Some(reply) = pseudo_xattr::reply(&self.vfs, &h, &reader) {
            let fd = self.shared.fd.load(Ordering::Relaxed);
            if let Err(e) = write_message(fd, &reply) {
                log::debug!("FUSE reply: {e}");
            }
            return None;
        }
        // A READ of an image's file, looked up once for the classification and the spliced reply. A panic
        // looking it up or classifying it (a bug) counts as cached: answering it fails it with EIO.
        let read = (h.opcode == FUSE_READ)
            .then(|| {
                catch_unwind(AssertUnwindSafe(|| {
                    RafsRead::of(&self.rafs_index, &h, &reader)
                }))
            })
            .and_then(Result::ok)
            .flatten();
        let mut cold = None;
        if read
            .as_ref()
            .is_some_and(|r| catch_unwind(AssertUnwindSafe(|| r.is_cold())).unwrap_or(false))
        {
            let mut copy = ParkedRead {
                bytes: [0u8; MAX_PARKED_REQUEST],
                len: h.len as usize,
            };
            if (std::mem::size_of::<InHeader>()..=copy.bytes.len()).contains(&copy.len)
                && reader
                    .clone()
                    .read_exact(&mut copy.bytes[..copy.len])
                    .is_ok()
            {
                let image = RafsIndex::image_of(h.nodeid);
                // Listed first: once it waits, another worker may take it up at once.
                self.inflight.wait(h.nodeid, h.opcode, h.unique);
                match self.cold_slots.admit(image, copy) {
                    Admission::Waiting => return None,
                    Admission::Go(mut older) if older.unique() != h.unique => {
                        // An older request of the image goes first; this one waits in its place.
                        let since = self.inflight.unwait(older.unique());
                        self.answer_copy(&mut older, writer, since);
                        return Some(image);
                    }
                    Admission::Go(_) => {
                        self.inflight.unwait(h.unique);
                        cold = Some(image);
                    }
                }
            }
        }
        self.answer(&h, read.as_ref(), reader, writer, None);
        cold
    }

    /// Answer INIT through the server, asking for READs of at most `max_pages` pages (so that their
    /// replies fit the pipes, see [`splice`]): the server's answer goes into a pipe, is changed, and goes
    /// on to the device.
    fn answer_init(&self, reader: Reader<'_>, writer: FuseDevWriter<'_>, max_pages: u16) {
        let dev = self.shared.fd.load(Ordering::Relaxed);
        let mut answer = match ReplyPipe::new() {
            Err(e) => {
                log::warn!("FUSE INIT answered as it is: no pipe to change it in ({e})");
                if let Err(e) = self
                    .server
                    .handle_message(reader, writer.into(), None, None)
                {
                    log::warn!("FUSE INIT: {e}");
                }
                return;
            }
            Ok(pipe) => {
                let mut buf = vec![0u8; 4096];
                match FuseDevWriter::new(pipe.write_fd(), &mut buf) {
                    Ok(writer) => {
                        if let Err(e) =
                            self.server
                                .handle_message(reader, writer.into(), None, None)
                        {
                            log::warn!("FUSE INIT: {e}");
                        }
                        pipe.take_all()
                    }
                    Err(e) => {
                        log::warn!("FUSE INIT reply buffer: {e}");
                        return;
                    }
                }
            }
        };
        let header = std::mem::size_of::<OutHeader>();
        let end = header + std::mem::size_of::<InitOut>();
        if let Some(bytes) = answer.get_mut(header..end) {
            if let Some(init) = InitOut::from_mut_slice(bytes) {
                if u64::from(init.flags) & FsOptions::MAX_PAGES.bits() != 0
                    && init.max_pages > max_pages
                {
                    log::info!(
                        "FUSE READs of at most {max_pages} pages, so that READ replies fit a pipe"
                    );
                    init.max_pages = max_pages;
                }
            }
        }
        if let Err(e) = write_message(dev, &answer) {
            log::warn!("FUSE INIT reply: {e}");
        }
    }

    /// Answer request `h` (`read`: the READ of an image's file it is, if it is one; `since`: when it
    /// came, if it waited for a cold slot).
    fn answer(
        &mut self,
        h: &InHeader,
        read: Option<&RafsRead>,
        reader: Reader<'_>,
        writer: FuseDevWriter<'_>,
        since: Option<u64>,
    ) {
        self.inflight
            .begin(self.index, h.nodeid, h.opcode, h.unique, since);
        // A panic answering one request (a bug) fails that request, not the worker, whose cold slot
        // and parked requests would otherwise be lost with it.
        let answered = catch_unwind(AssertUnwindSafe(|| {
            if let (Some(pipe), Some(read)) = (self.reply_pipe.as_mut(), read) {
                let fd = self.shared.fd.load(Ordering::Relaxed);
                if pipe.reply(read, h, fd) {
                    if !self.shared.spliced.swap(true, Ordering::Relaxed) {
                        log::info!("READ replies are spliced into /dev/fuse");
                    }
                    return;
                }
            }
            // A failed request is answered or dropped by the server; carry on.
            if let Err(e) = self
                .server
                .handle_message(reader, writer.into(), None, None)
            {
                log::debug!("FUSE request: {e}");
            }
        }));
        if answered.is_err() {
            log::error!(
                "FUSE request {:#x} (opcode {}) panicked; it fails with EIO",
                h.unique,
                h.opcode
            );
            self.fail(h.unique);
            // A reply left half in the pipe would go out ahead of the next one.
            if let Some(pipe) = self.reply_pipe.as_mut() {
                pipe.reset();
            }
        }
        self.inflight.end(self.index);
    }

    /// Answer request `unique` with EIO.
    fn fail(&self, unique: u64) {
        let eio = OutHeader {
            len: std::mem::size_of::<OutHeader>() as u32,
            error: -libc::EIO,
            unique,
        };
        if let Err(e) = write_fuse(self.shared.fd.load(Ordering::Relaxed), eio) {
            log::debug!("FUSE reply: {e}");
        }
    }

    /// A cold READ of `image` answered by this worker: answer the parked requests its slot passes to,
    /// one after the other, until none may take it.
    fn answer_parked(&mut self, channel: &mut Channel, mut image: u8) {
        let shared = self.shared.clone();
        let stop = shared.stop.get().expect("set before the workers start");
        while let Some(turn) = self.cold_slots.done(image) {
            image = turn.image;
            let mut request = turn.request;
            let since = self.inflight.unwait(request.unique());
            if stop.requested() {
                match OnStop::from_u8(shared.parked_on_stop.load(Ordering::SeqCst)) {
                    OnStop::Answer => {}
                    OnStop::Fail => {
                        self.fail(request.unique());
                        continue;
                    }
                    OnStop::Leave => continue,
                }
            }
            let Ok(writer) = channel.writer() else {
                // Cannot happen: the reply buffer is ours.
                log::warn!("a parked FUSE request could not be answered");
                continue;
            };
            self.answer_copy(&mut request, writer, since);
        }
    }

    /// Answer a waiting READ whose turn came, from its copy.
    fn answer_copy(
        &mut self,
        request: &mut ParkedRead,
        writer: FuseDevWriter<'_>,
        since: Option<u64>,
    ) {
        let reader = Reader::from_fuse_buffer(FuseBuf::new(&mut request.bytes[..request.len]));
        let Ok(reader) = reader else {
            // Cannot happen: the copy is a whole request.
            log::warn!("a parked FUSE request could not be answered");
            return;
        };
        let Ok(h) = reader.clone().read_obj::<InHeader>() else {
            return;
        };
        let read = catch_unwind(AssertUnwindSafe(|| {
            RafsRead::of(&self.rafs_index, &h, &reader)
        }))
        .ok()
        .flatten();
        self.answer(&h, read.as_ref(), reader, writer, since);
    }
}
