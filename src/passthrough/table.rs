//! The guest's view of a passthrough share (the inode numbers and file handles it holds, each with
//! where it is on the host), kept in a memfd that outlives the daemon: a successor (live upgrade, with
//! the descriptor in the state) or a daemon restarted after a crash (the keeper holds the descriptor
//! of the last checkpoint) reads it to give every number the guest holds its file back.
//!
//! Only the daemon serving the share writes it, under the share's lock; a reader reads it only once
//! that daemon stopped (drained or dead). A daemon may die in the middle of a write, so every record
//! has a state word written last (and set to `WRITING` first while a name changes): a record cut
//! short reads as unresolvable, never as another file. The reader also checks each file it finds
//! against the device and inode number recorded, so a record out of date (a rename by the host, a
//! death between the host's change and the record's) resolves to nothing rather than to another file.
//!
//! Layout: a page of header, then the inode records, then the handle records: [`INODE_CAP`] and
//! [`HANDLE_CAP`] of them, or fewer (a power of two each, named in the header) where the process's
//! file size limit (RLIMIT_FSIZE, which a memfd obeys) is lower. The memfd is sparse: only the pages
//! of records ever written take memory.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Inode numbers the guest may hold at once in one share, the root included (virtiofsd's default
/// open-file limit is as large: each inode holds an O_PATH descriptor of the daemon).
pub const INODE_CAP: u64 = 1 << INODE_BITS;
/// Open files and directories of the guest in one share at once.
pub const HANDLE_CAP: u64 = 1 << HANDLE_BITS;
/// A guest's number is a record index (its low bits) and that record's generation, one more each time
/// the record is used again: a number the guest should no longer hold (a FORGET or RELEASE run twice
/// after a crash) names nothing rather than the record's next file.
const INODE_BITS: u32 = 20;
const HANDLE_BITS: u32 = 18;
/// Inode numbers stay below 2^56 (the Vfs keeps the mount index above).
const NUMBER_BITS: u32 = 56;
/// Linux's NAME_MAX: no file name is longer.
pub const NAME_MAX: usize = 255;

/// Changed with every change of the layout below.
const MAGIC: u64 = u64::from_le_bytes(*b"rafsdsh2");
const HEADER_BYTES: usize = 4096;

/// A record no number uses.
const FREE: u32 = 0;
/// A number the guest holds, with the name it was last found under.
const NAMED: u32 = 1;
/// A record whose name is being written: unresolvable if the writer died.
const WRITING: u32 = 2;
/// A number the guest holds whose name is gone (unlinked, or overwritten by a rename).
const UNNAMED: u32 = 3;

#[repr(C)]
struct Header {
    magic: AtomicU64,
    inode_cap: AtomicU64,
    handle_cap: AtomicU64,
    /// One above the highest inode / handle record ever written: a reader scans no further.
    inodes_used: AtomicU64,
    handles_used: AtomicU64,
}

#[repr(C)]
struct InodeRecord {
    state: AtomicU32,
    name_len: AtomicU32,
    parent: AtomicU64,
    dev: AtomicU64,
    ino: AtomicU64,
    born: AtomicU64,
    /// The guest's outstanding lookups.
    lookups: AtomicU64,
    /// The generation of the number using the record, kept when it is freed.
    generation: AtomicU64,
    name: [AtomicU64; 32],
}

#[repr(C)]
struct HandleRecord {
    state: AtomicU32,
    /// The open flags (O_CREAT, O_EXCL and O_TRUNC are dropped when a successor opens again).
    flags: AtomicU32,
    dir: AtomicU32,
    _pad: AtomicU32,
    inode: AtomicU64,
    generation: AtomicU64,
}

const INODES_AT: usize = HEADER_BYTES;
/// Fewest records of each kind a table is made with.
const MIN_CAP: u64 = 1 << 10;

/// The process's soft limit of `resource` (getrlimit), if it can be read.
pub fn soft_limit(resource: libc::__rlimit_resource_t) -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit.
    (unsafe { libc::getrlimit(resource, &mut lim) } == 0).then_some(lim.rlim_cur)
}

/// The capacities of a table that fits a file size limit of `limit` bytes (the smallest if none does:
/// its creation then fails with EFBIG, a clear error).
fn capacities(limit: u64) -> (u64, u64) {
    let (mut inode_cap, mut handle_cap) = (INODE_CAP, HANDLE_CAP);
    while layout(inode_cap, handle_cap).1 as u64 > limit && inode_cap > MIN_CAP {
        inode_cap /= 2;
        handle_cap = (handle_cap / 2).max(MIN_CAP);
    }
    (inode_cap, handle_cap)
}

/// Where the handle records start and the table's length, for these capacities.
fn layout(inode_cap: u64, handle_cap: u64) -> (usize, usize) {
    let handles_at = INODES_AT + inode_cap as usize * size_of::<InodeRecord>();
    (
        handles_at,
        handles_at + handle_cap as usize * size_of::<HandleRecord>(),
    )
}

/// Where an inode the guest holds was last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub parent: u64,
    pub name: Vec<u8>,
    pub dev: u64,
    pub ino: u64,
    /// The file's birth time in nanoseconds (statx), 0 where the filesystem has none: with the device
    /// and inode number, what tells the file from a later one given the same inode number.
    pub born: u64,
}

/// An inode record as a successor reads it: `place` is None when it has no name (unlinked) or was
/// cut short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedInode {
    pub number: u64,
    pub lookups: u64,
    pub place: Option<Place>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedHandle {
    pub number: u64,
    pub inode: u64,
    pub flags: u32,
    pub dir: bool,
}

pub struct ShareTable {
    file: File,
    base: *mut u8,
    inode_cap: u64,
    handle_cap: u64,
}

// SAFETY: the mapping lives as long as the table and is only accessed through atomics.
unsafe impl Send for ShareTable {}
// SAFETY: as above.
unsafe impl Sync for ShareTable {}

impl ShareTable {
    /// A new, empty table in a memfd of its own, as large as the file size limit allows.
    pub fn create() -> io::Result<ShareTable> {
        let limit = soft_limit(libc::RLIMIT_FSIZE).unwrap_or(u64::MAX);
        let (inode_cap, handle_cap) = capacities(limit);
        ShareTable::create_with(inode_cap, handle_cap)
    }

    pub(super) fn create_with(inode_cap: u64, handle_cap: u64) -> io::Result<ShareTable> {
        // SAFETY: a NUL-terminated name and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"rafsd-share".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(layout(inode_cap, handle_cap).1 as u64)?;
        let table = ShareTable::map(file, inode_cap, handle_cap)?;
        let h = table.header();
        h.inode_cap.store(inode_cap, Ordering::Relaxed);
        h.handle_cap.store(handle_cap, Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
        Ok(table)
    }

    /// The table a predecessor wrote. Refused unless it has this layout.
    pub fn adopt(file: File) -> io::Result<ShareTable> {
        let len = file.metadata()?.len();
        let mut header = [0u8; size_of::<Header>()];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut header, 0)?;
        let word = |i: usize| u64::from_ne_bytes(header[i * 8..i * 8 + 8].try_into().unwrap());
        let (inode_cap, handle_cap) = (word(1), word(2));
        let fits = |cap: u64, max: u64| cap.is_power_of_two() && (MIN_CAP..=max).contains(&cap);
        if word(0) != MAGIC
            || !fits(inode_cap, INODE_CAP)
            || !fits(handle_cap, HANDLE_CAP)
            || len != layout(inode_cap, handle_cap).1 as u64
        {
            return Err(io::Error::other("a share table of another layout"));
        }
        ShareTable::map(file, inode_cap, handle_cap)
    }

    fn map(file: File, inode_cap: u64, handle_cap: u64) -> io::Result<ShareTable> {
        // SAFETY: a shared mapping of the whole memfd, checked; unmapped in Drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                layout(inode_cap, handle_cap).1,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ShareTable {
            file,
            base: base.cast(),
            inode_cap,
            handle_cap,
        })
    }

    /// Inode records this table has: numbers are given out below it.
    pub fn inode_cap(&self) -> u64 {
        self.inode_cap
    }

    pub fn handle_cap(&self) -> u64 {
        self.handle_cap
    }

    /// The memfd, to hand to a successor.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn header(&self) -> &Header {
        // SAFETY: the header is at the start of the mapping; all of it is atomics.
        unsafe { &*self.base.cast::<Header>() }
    }

    /// The record of number `n` in the array of `cap` records (a power of two) of type `T` at `at`.
    fn record<T>(&self, at: usize, cap: u64, n: u64) -> &T {
        let index = (n & (cap - 1)) as usize;
        // SAFETY: within the mapping (the index is masked to the array, laid out by `layout`); all
        // of each record is atomics.
        unsafe { &*self.base.add(at + index * size_of::<T>()).cast::<T>() }
    }

    fn inode(&self, n: u64) -> &InodeRecord {
        self.record(INODES_AT, self.inode_cap, n)
    }

    fn handle(&self, n: u64) -> &HandleRecord {
        self.record(
            layout(self.inode_cap, self.handle_cap).0,
            self.handle_cap,
            n,
        )
    }

    /// A number the guest now holds (`lookups` of them), found at `place`.
    pub fn set_inode(&self, n: u64, place: &Place, lookups: u64) {
        let r = self.inode(n);
        r.lookups.store(lookups, Ordering::Relaxed);
        r.generation.store(n >> INODE_BITS, Ordering::Relaxed);
        self.write_place(r, place);
        self.header()
            .inodes_used
            .fetch_max((n & (self.inode_cap - 1)) + 1, Ordering::Release);
    }

    /// The inode `n` is now found at `place` (a rename, or a lookup through another link).
    pub fn move_inode(&self, n: u64, place: &Place) {
        self.write_place(self.inode(n), place);
    }

    fn write_place(&self, r: &InodeRecord, place: &Place) {
        r.state.store(WRITING, Ordering::Relaxed);
        // No field store moves before the WRITING mark (a seqlock's writer).
        fence(Ordering::Release);
        r.parent.store(place.parent, Ordering::Relaxed);
        r.dev.store(place.dev, Ordering::Relaxed);
        r.ino.store(place.ino, Ordering::Relaxed);
        r.born.store(place.born, Ordering::Relaxed);
        let name = &place.name[..place.name.len().min(NAME_MAX)];
        for (i, word) in r.name.iter().enumerate() {
            let mut bytes = [0u8; 8];
            let from = (i * 8).min(name.len());
            let to = (from + 8).min(name.len());
            bytes[..to - from].copy_from_slice(&name[from..to]);
            word.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
        }
        r.name_len.store(name.len() as u32, Ordering::Relaxed);
        r.state.store(NAMED, Ordering::Release);
    }

    pub fn set_lookups(&self, n: u64, lookups: u64) {
        self.inode(n).lookups.store(lookups, Ordering::Release);
    }

    /// The inode `n` lost its name (still held by the guest).
    pub fn unname_inode(&self, n: u64) {
        self.inode(n).state.store(UNNAMED, Ordering::Release);
    }

    pub fn free_inode(&self, n: u64) {
        self.inode(n).state.store(FREE, Ordering::Release);
    }

    pub fn set_handle(&self, n: u64, inode: u64, flags: u32, dir: bool) {
        let r = self.handle(n);
        r.state.store(WRITING, Ordering::Relaxed);
        fence(Ordering::Release);
        r.inode.store(inode, Ordering::Relaxed);
        r.flags.store(flags, Ordering::Relaxed);
        r.dir.store(dir.into(), Ordering::Relaxed);
        r.generation.store(n >> HANDLE_BITS, Ordering::Relaxed);
        r.state.store(NAMED, Ordering::Release);
        self.header()
            .handles_used
            .fetch_max((n & (self.handle_cap - 1)) + 1, Ordering::Release);
    }

    pub fn free_handle(&self, n: u64) {
        self.handle(n).state.store(FREE, Ordering::Release);
    }

    /// The numbers a daemon that adopted the table gives out next for the records below the highest
    /// used that are free: each record's next generation. Then (inode records used, handle records
    /// used): new records start there.
    pub fn free_numbers(&self) -> (Vec<u64>, Vec<u64>, u64, u64) {
        let h = self.header();
        let inodes_used = h.inodes_used.load(Ordering::Acquire).min(self.inode_cap);
        let handles_used = h.handles_used.load(Ordering::Acquire).min(self.handle_cap);
        let inodes = (0..inodes_used)
            .filter(|&i| self.inode(i).state.load(Ordering::Acquire) == FREE)
            .map(|i| {
                next_number(
                    i,
                    self.inode(i).generation.load(Ordering::Relaxed),
                    INODE_BITS,
                )
            })
            .collect();
        let handles = (0..handles_used)
            .filter(|&i| self.handle(i).state.load(Ordering::Acquire) == FREE)
            .map(|i| {
                next_number(
                    i,
                    self.handle(i).generation.load(Ordering::Relaxed),
                    HANDLE_BITS,
                )
            })
            .collect();
        (inodes, handles, inodes_used, handles_used)
    }

    /// Forget every record (a new FUSE session, whose guest holds no number yet).
    pub fn clear(&self) {
        let h = self.header();
        for i in 0..h.inodes_used.load(Ordering::Acquire).min(self.inode_cap) {
            self.free_inode(i);
        }
        for i in 0..h.handles_used.load(Ordering::Acquire).min(self.handle_cap) {
            self.free_handle(i);
        }
        h.inodes_used.store(0, Ordering::Release);
        h.handles_used.store(0, Ordering::Release);
    }

    /// Every inode record in use.
    pub fn inodes(&self) -> Vec<SavedInode> {
        let used = self.header().inodes_used.load(Ordering::Acquire);
        let mut out = Vec::new();
        for i in 0..used.min(self.inode_cap) {
            let r = self.inode(i);
            let state = r.state.load(Ordering::Acquire);
            if state == FREE {
                continue;
            }
            let lookups = r.lookups.load(Ordering::Relaxed);
            let place = (state == NAMED).then(|| {
                let len = (r.name_len.load(Ordering::Relaxed) as usize).min(NAME_MAX);
                let mut name: Vec<u8> = r
                    .name
                    .iter()
                    .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
                    .collect();
                name.truncate(len);
                Place {
                    parent: r.parent.load(Ordering::Relaxed),
                    name,
                    dev: r.dev.load(Ordering::Relaxed),
                    ino: r.ino.load(Ordering::Relaxed),
                    born: r.born.load(Ordering::Relaxed),
                }
            });
            // A record whose state changed while it was read is being written: unresolvable.
            let place = place.filter(|_| r.state.load(Ordering::Acquire) == state);
            out.push(SavedInode {
                number: i | r.generation.load(Ordering::Relaxed) << INODE_BITS,
                lookups,
                place,
            });
        }
        out
    }

    /// Every handle record in use (one cut short is left out: its number answers EBADF).
    pub fn handles(&self) -> Vec<SavedHandle> {
        let used = self.header().handles_used.load(Ordering::Acquire);
        (0..used.min(self.handle_cap))
            .filter_map(|i| {
                let r = self.handle(i);
                (r.state.load(Ordering::Acquire) == NAMED).then(|| SavedHandle {
                    number: i | r.generation.load(Ordering::Relaxed) << HANDLE_BITS,
                    inode: r.inode.load(Ordering::Relaxed),
                    flags: r.flags.load(Ordering::Relaxed),
                    dir: r.dir.load(Ordering::Relaxed) != 0,
                })
            })
            .collect()
    }
}

/// The number record `index` of an array of `1 << bits` gives out after one of generation `generation`.
pub fn next_number(index: u64, generation: u64, bits: u32) -> u64 {
    let generation = (generation + 1) % (1 << (NUMBER_BITS - bits));
    index | generation << bits
}

/// The number after `n` for its inode record (freed and used again).
pub fn next_inode_number(n: u64) -> u64 {
    next_number(n & (INODE_CAP - 1), n >> INODE_BITS, INODE_BITS)
}

/// The number after `n` for its handle record.
pub fn next_handle_number(n: u64) -> u64 {
    next_number(n & (HANDLE_CAP - 1), n >> HANDLE_BITS, HANDLE_BITS)
}

impl Drop for ShareTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of that length.
        unsafe { libc::munmap(self.base.cast(), layout(self.inode_cap, self.handle_cap).1) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(parent: u64, name: &str, ino: u64) -> Place {
        Place {
            parent,
            name: name.as_bytes().to_vec(),
            dev: 7,
            ino,
            born: ino * 1000,
        }
    }

    #[test]
    fn a_successor_reads_what_was_written() {
        let t = ShareTable::create().unwrap();
        t.set_inode(2, &place(1, "dir", 100), 3);
        t.set_inode(3, &place(2, &"n".repeat(255), 101), 1);
        t.set_inode(4, &place(2, "gone", 102), 1);
        t.unname_inode(4);
        t.set_inode(5, &place(2, "freed", 103), 1);
        t.free_inode(5);
        t.set_handle(1, 3, libc::O_RDWR as u32, false);
        t.set_handle(2, 2, 0, true);
        t.set_handle(3, 3, 0, false);
        t.free_handle(3);
        let next = ShareTable::adopt(t.file().try_clone().unwrap()).unwrap();
        assert_eq!(
            next.inodes(),
            vec![
                SavedInode {
                    number: 2,
                    lookups: 3,
                    place: Some(place(1, "dir", 100))
                },
                SavedInode {
                    number: 3,
                    lookups: 1,
                    place: Some(place(2, &"n".repeat(255), 101))
                },
                SavedInode {
                    number: 4,
                    lookups: 1,
                    place: None
                },
            ]
        );
        assert_eq!(
            next.handles(),
            vec![
                SavedHandle {
                    number: 1,
                    inode: 3,
                    flags: libc::O_RDWR as u32,
                    dir: false
                },
                SavedHandle {
                    number: 2,
                    inode: 2,
                    flags: 0,
                    dir: true
                },
            ]
        );
        next.clear();
        assert!(t.inodes().is_empty() && t.handles().is_empty());
    }

    /// A writer that died in the middle of a name leaves a record that names nothing.
    #[test]
    fn a_record_cut_short_has_no_place() {
        let t = ShareTable::create().unwrap();
        t.set_inode(2, &place(1, "a", 100), 1);
        t.inode(2).state.store(WRITING, Ordering::Release);
        assert_eq!(t.inodes()[0].place, None);
        assert_eq!(t.inodes()[0].lookups, 1);
    }

    /// Under a file size limit (which a memfd obeys) the table is made smaller, and a successor
    /// reads it as it is.
    #[test]
    fn a_file_size_limit_makes_a_smaller_table() {
        assert_eq!(capacities(u64::MAX), (INODE_CAP, HANDLE_CAP));
        let (inodes, handles) = capacities(64 << 20);
        assert!(layout(inodes, handles).1 as u64 <= 64 << 20);
        assert!(inodes >= INODE_CAP / 8 && inodes.is_power_of_two() && handles.is_power_of_two());
        let t = ShareTable::create_with(inodes, handles).unwrap();
        t.set_inode(inodes - 1, &place(1, "last", 9), 1);
        t.set_handle(handles - 1, inodes - 1, 0, false);
        let next = ShareTable::adopt(t.file().try_clone().unwrap()).unwrap();
        assert_eq!((next.inode_cap(), next.handle_cap()), (inodes, handles));
        assert_eq!(next.inodes()[0].place, Some(place(1, "last", 9)));
        assert_eq!(next.handles()[0].inode, inodes - 1);
    }

    #[test]
    fn other_files_are_refused() {
        let f = tempfile_of(4096);
        assert!(ShareTable::adopt(f).is_err());
        let t = ShareTable::create().unwrap();
        t.header().magic.store(0, Ordering::Release);
        assert!(ShareTable::adopt(t.file().try_clone().unwrap()).is_err());
    }

    fn tempfile_of(len: u64) -> File {
        // SAFETY: as in `create`.
        let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }
}
