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

/// Why a chain is refused: "request" or "reply", and the bytes it claims.
pub fn oversized<M>(chain: &DescriptorChain<M>) -> Option<(&'static str, u64)>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    let readable: u64 = chain.clone().readable().map(|d| u64::from(d.len())).sum();
    if readable > MAX_REQUEST {
        return Some(("request", readable));
    }
    let writable: u64 = chain.clone().writable().map(|d| u64::from(d.len())).sum();
    (writable > MAX_REPLY).then_some(("reply", writable))
}
