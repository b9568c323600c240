//! The largest request and reply a descriptor chain may describe.
//!
//! fuse-backend-rs sizes a request's reader and reply writer by adding up the chain's descriptor lengths,
//! and descriptors may overlap: one 2 MiB guest buffer listed 2048 times in an indirect table reads as
//! 4 GiB, and the server trusts that (FUSE_IOCTL allocated and copied as much input as the reader held).
//! So a chain is refused before the server sees it when it holds more than the device's FUSE_INIT lets
//! any request or reply be.

use fuse_backend_rs::api::server::{MAX_BUFFER_SIZE, MAX_REQ_PAGES};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

/// Headers and fixed arguments around the largest payload; fuse-backend-rs refuses a request whose
/// header says it is longer than `MAX_BUFFER_SIZE` plus this, so no legal request is.
const HEADERS: u64 = 4096;
/// The largest page a Linux guest may have (arm64, ppc64): INIT's `max_pages` counts the guest's pages,
/// so a 64 KiB-page guest reads up to 256 of them at once.
const GUEST_PAGE_MAX: u64 = 64 << 10;

/// Readable bytes of the largest request: a WRITE of `max_write` (1 MiB) with its headers.
pub const MAX_REQUEST: u64 = MAX_BUFFER_SIZE as u64 + HEADERS;
/// Writable bytes of the largest reply: a READ (or READDIR) of `max_pages` of the guest's pages and
/// its header.
pub const MAX_REPLY: u64 = MAX_REQ_PAGES as u64 * GUEST_PAGE_MAX + HEADERS;

/// Most descriptors of one chain: the largest queue (1024, Kata's and QEMU's most) — the spec bounds an
/// indirect table by the queue's size, and a Linux guest's largest request (a READ of 256 pages) has
/// fewer than 300. virtio-queue follows tables of up to 65535 entries, and fuse-backend-rs keeps a
/// slice per descriptor for the reader and writer and each of their copies: zero-length descriptors,
/// which add nothing to the sizes below, made each request held in flight cost megabytes.
pub const MAX_DESCRIPTORS: u64 = 1024;

/// Why a chain is refused: what it has too many of ("request bytes", "reply bytes", "descriptors")
/// and how many.
pub fn oversized<M>(chain: &DescriptorChain<M>) -> Option<(&'static str, u64)>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    let (mut readable, mut writable, mut count) = (0u64, 0u64, 0u64);
    for d in chain.clone() {
        count += 1;
        if count > MAX_DESCRIPTORS {
            return Some(("descriptors", count));
        }
        match d.is_write_only() {
            true => writable += u64::from(d.len()),
            false => readable += u64::from(d.len()),
        }
    }
    if readable > MAX_REQUEST {
        return Some(("request bytes", readable));
    }
    (writable > MAX_REPLY).then_some(("reply bytes", writable))
}
