//! The numbers a passthrough share gives the guest, and what each stands for in the passthrough
//! filesystem beneath (the *inner* numbers, which that filesystem gives out in order and which
//! therefore mean nothing to another process). Every change is also written to the share's
//! [`ShareTable`], from which a successor gives each number its file back.
//!
//! An inode number holds exactly one reference of the inner filesystem, however many times the guest
//! looked it up; extra inner references taken by a lookup are dropped by the caller.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::table::{
    next_handle_number, next_inode_number, soft_limit, Place, ShareTable, HANDLE_CAP, INODE_CAP,
};

/// FUSE's root inode: the same number on both sides, never forgotten.
pub const ROOT: u64 = 1;

/// Inode numbers and handles the guest holds in all shares of this process: each costs a
/// descriptor of the inner filesystem.
static HELD: AtomicU64 = AtomicU64::new(0);

/// At most three quarters of the process's open-file limit go to what guests hold in shares, so a
/// guest filling its share leaves descriptors for the other mounts, the API and the device.
pub(super) fn held_limit() -> u64 {
    static LIMIT: OnceLock<u64> = OnceLock::new();
    *LIMIT.get_or_init(|| soft_limit(libc::RLIMIT_NOFILE).unwrap_or(1024) / 4 * 3)
}

/// Count one more number held, unless the limit is reached.
fn hold() -> io::Result<()> {
    HELD.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
        (n < held_limit()).then_some(n + 1)
    })
    .map(drop)
    .map_err(|_| enfile())
}

fn let_go(n: u64) {
    HELD.fetch_sub(n, Ordering::AcqRel);
}

pub struct Inode {
    /// The inner inode, or None: the file could not be found again after a hand-over (stale).
    pub inner: Option<u64>,
    pub lookups: u64,
    /// Where it was last found (what the table records); None once no name is known.
    pub place: Option<Place>,
    /// Other names (hard links) it was found under before, newest last: one takes the place's
    /// name when that is unlinked.
    pub aliases: Vec<Key>,
}

/// Other names kept per inode.
const MAX_ALIASES: usize = 4;

/// A name in the share: the guest's number of the directory, and the name in it.
type Key = (u64, Box<[u8]>);

fn key_of(p: &Place) -> Key {
    (p.parent, p.name.clone().into_boxed_slice())
}

/// `place` is at `key` (without building a key of it).
fn is_at(place: &Place, key: &Key) -> bool {
    place.parent == key.0 && *place.name == *key.1
}

/// Move `place`, the one the table records for `ours`, to `key`: the device, inode number and birth
/// time stay the file's own.
fn move_to(table: &ShareTable, ours: u64, place: &mut Place, key: &Key) {
    place.parent = key.0;
    place.name = key.1.to_vec();
    table.move_inode(ours, place);
}

pub struct Handle {
    /// The inner handle and the inner inode it is of, or None: the file could not be opened again
    /// after a hand-over.
    pub inner: Option<(u64, u64)>,
    pub inode: u64,
}

pub struct Slots {
    pub table: ShareTable,
    pub inodes: HashMap<u64, Inode>,
    pub by_inner: HashMap<u64, u64>,
    pub names: HashMap<Key, u64>,
    pub handles: HashMap<u64, Handle>,
    /// Numbers a successor could not give their files back: their records are marked unnamed once
    /// this process owns the table ([`Slots::unname_stale`]).
    pub stale: Vec<u64>,
    /// Numbers to give out again (a freed record's next generation), then fresh records from `next_*`.
    free_inodes: Vec<u64>,
    next_inode: u64,
    free_handles: Vec<u64>,
    next_handle: u64,
}

fn enfile() -> io::Error {
    io::Error::from_raw_os_error(libc::ENFILE)
}

impl Slots {
    pub fn new(table: ShareTable) -> Slots {
        Slots {
            table,
            inodes: HashMap::new(),
            by_inner: HashMap::new(),
            names: HashMap::new(),
            handles: HashMap::new(),
            stale: Vec::new(),
            free_inodes: Vec::new(),
            next_inode: ROOT + 1,
            free_handles: Vec::new(),
            next_handle: 1,
        }
    }

    /// After a hand-over: the numbers to give out next, as the table has them.
    pub fn settle_free_numbers(&mut self) {
        let (inodes, handles, inodes_used, handles_used) = self.table.free_numbers();
        self.free_inodes = inodes
            .into_iter()
            .filter(|&n| n & (INODE_CAP - 1) > ROOT)
            .collect();
        self.next_inode = inodes_used.max(ROOT + 1);
        self.free_handles = handles
            .into_iter()
            .filter(|&n| n & (HANDLE_CAP - 1) > 0)
            .collect();
        self.next_handle = handles_used.max(1);
    }

    /// A number a predecessor gave the guest, with its file found again (`inner`) or not.
    pub fn restore_inode(
        &mut self,
        ours: u64,
        inner: Option<u64>,
        lookups: u64,
        place: Option<Place>,
    ) {
        HELD.fetch_add(1, Ordering::AcqRel);
        if inner.is_none() {
            self.stale.push(ours);
        }
        let place = place.filter(|_| inner.is_some());
        if let Some(p) = &place {
            self.names.insert(key_of(p), ours);
        }
        if let Some(i) = inner {
            self.by_inner.insert(i, ours);
        }
        self.inodes.insert(
            ours,
            Inode {
                inner,
                lookups,
                place,
                aliases: Vec::new(),
            },
        );
    }

    /// A handle a predecessor gave the guest, opened again (`inner`) or not.
    pub fn restore_handle(&mut self, ours: u64, inner: Option<(u64, u64)>, inode: u64) {
        HELD.fetch_add(1, Ordering::AcqRel);
        self.handles.insert(ours, Handle { inner, inode });
    }

    /// Mark the records of the numbers found stale as unnamed, so that no later successor gives their
    /// files back to them (the guest may hold those files under newer numbers by then).
    pub fn unname_stale(&mut self) {
        for n in std::mem::take(&mut self.stale) {
            self.table.unname_inode(n);
        }
    }

    /// The guest's number for `inner`: the one it already has (true), or a new one not yet taken
    /// ([`Slots::commit`] takes it, [`Slots::cancel`] gives it back).
    pub fn reserve(&mut self, inner: u64) -> io::Result<(u64, bool)> {
        if inner == ROOT {
            return Ok((ROOT, true));
        }
        if let Some(&ours) = self.by_inner.get(&inner) {
            return Ok((ours, true));
        }
        hold()?;
        let ours = self.new_inode_number().inspect_err(|_| let_go(1))?;
        Ok((ours, false))
    }

    fn new_inode_number(&mut self) -> io::Result<u64> {
        if let Some(ours) = self.free_inodes.pop() {
            return Ok(ours);
        }
        if self.next_inode >= self.table.inode_cap() {
            return Err(enfile());
        }
        self.next_inode += 1;
        Ok(self.next_inode - 1)
    }

    pub fn cancel(&mut self, ours: u64, existing: bool) {
        if !existing {
            self.free_inodes.push(ours);
            let_go(1);
        }
    }

    /// One more lookup of `ours` (reserved for `inner`), found at `place`.
    pub fn commit(&mut self, ours: u64, existing: bool, inner: u64, place: Place) {
        if ours == ROOT {
            return;
        }
        let key = if existing {
            let Some(slot) = self.inodes.get_mut(&ours) else {
                return;
            };
            slot.lookups += 1;
            self.table.set_lookups(ours, slot.lookups);
            // Looked up again where it was: the usual case, with nothing to build.
            if slot
                .place
                .as_ref()
                .is_some_and(|p| p.parent == place.parent && p.name == place.name)
            {
                return;
            }
            let key = key_of(&place);
            // Found through another link (or renamed by the host): remember the name that works.
            // The file's identity stays what it was when first found.
            let place = match &slot.place {
                Some(old) => Place {
                    dev: old.dev,
                    ino: old.ino,
                    born: old.born,
                    ..place
                },
                None => place,
            };
            self.table.move_inode(ours, &place);
            slot.aliases.retain(|a| *a != key);
            if let Some(old) = slot.place.replace(place).map(|old| key_of(&old)) {
                if self.names.get(&old) == Some(&ours) {
                    slot.aliases.push(old);
                }
            }
            if slot.aliases.len() > MAX_ALIASES {
                let dropped = slot.aliases.remove(0);
                if self.names.get(&dropped) == Some(&ours) {
                    self.names.remove(&dropped);
                }
            }
            key
        } else {
            let key = key_of(&place);
            self.table.set_inode(ours, &place, 1);
            self.inodes.insert(
                ours,
                Inode {
                    inner: Some(inner),
                    lookups: 1,
                    place: Some(place),
                    aliases: Vec::new(),
                },
            );
            self.by_inner.insert(inner, ours);
            key
        };
        // Another number named here is out of date (its file was replaced behind the guest's back).
        if let Some(other) = self.names.insert(key.clone(), ours) {
            if other != ours {
                self.drop_name(other, &key);
            }
        }
    }

    /// `ours` is no longer found at `key`: an alias is forgotten; the place's name is taken over by
    /// the newest alias still naming it, or the inode has no name left.
    fn drop_name(&mut self, ours: u64, key: &Key) {
        let Some(slot) = self.inodes.get_mut(&ours) else {
            return;
        };
        slot.aliases.retain(|a| a != key);
        let Some(place) = slot.place.as_mut().filter(|p| is_at(p, key)) else {
            return;
        };
        while let Some(alias) = slot.aliases.pop() {
            if self.names.get(&alias) == Some(&ours) {
                move_to(&self.table, ours, place, &alias);
                return;
            }
        }
        slot.place = None;
        self.table.unname_inode(ours);
    }

    /// The guest forgets `count` lookups of `ours`; the inner inode to forget once when it was the last.
    pub fn forget(&mut self, ours: u64, count: u64) -> Option<u64> {
        let slot = self.inodes.get_mut(&ours)?;
        slot.lookups = slot.lookups.saturating_sub(count);
        if slot.lookups > 0 {
            self.table.set_lookups(ours, slot.lookups);
            return None;
        }
        let slot = self.inodes.remove(&ours)?;
        self.table.free_inode(ours);
        self.free_inodes.push(next_inode_number(ours));
        let_go(1);
        for key in slot
            .place
            .as_ref()
            .map(key_of)
            .into_iter()
            .chain(slot.aliases)
        {
            if self.names.get(&key) == Some(&ours) {
                self.names.remove(&key);
            }
        }
        let inner = slot.inner?;
        self.by_inner.remove(&inner);
        Some(inner)
    }

    /// `parent`/`name` was unlinked (or replaced by a rename).
    pub fn unlinked(&mut self, parent: u64, name: &[u8]) {
        let key = (parent, Box::from(name));
        if let Some(ours) = self.names.remove(&key) {
            self.drop_name(ours, &key);
        }
    }

    /// A rename the host did: the number found at the old name is now at the new one (with
    /// RENAME_EXCHANGE the two swap).
    pub fn renamed(&mut self, from: (u64, &[u8]), to: (u64, &[u8]), exchange: bool) {
        let from_key = (from.0, Box::<[u8]>::from(from.1));
        let to_key = (to.0, Box::<[u8]>::from(to.1));
        let moved = self.names.remove(&from_key);
        // A lookup of the new name between the host's rename and this may have found the moved
        // file there already: that is no file replaced.
        let replaced = self.names.remove(&to_key).filter(|r| Some(*r) != moved);
        match (exchange, replaced) {
            (true, Some(other)) => self.rename_name(other, &to_key, from_key.clone()),
            (false, Some(other)) => self.drop_name(other, &to_key),
            (_, None) => {}
        }
        if let Some(ours) = moved {
            self.rename_name(ours, &from_key, to_key);
        }
    }

    /// `ours`, found at `from` (its place or an alias), is now found at `to`.
    fn rename_name(&mut self, ours: u64, from: &Key, to: Key) {
        let Some(slot) = self.inodes.get_mut(&ours) else {
            return;
        };
        match slot.place.as_mut() {
            Some(place) if is_at(place, from) => move_to(&self.table, ours, place, &to),
            _ => match slot.aliases.iter_mut().find(|a| *a == from) {
                Some(alias) => *alias = to.clone(),
                None => return,
            },
        }
        self.names.insert(to, ours);
    }

    /// A new handle number for `inner` (a handle of the inner filesystem, of its inode `inner_inode`)
    /// on the guest's `inode`.
    pub fn open(
        &mut self,
        inner: (u64, u64),
        inode: u64,
        flags: u32,
        dir: bool,
    ) -> io::Result<u64> {
        let ours = match self.free_handles.pop() {
            Some(h) => h,
            None if self.next_handle < self.table.handle_cap() => {
                self.next_handle += 1;
                self.next_handle - 1
            }
            None => return Err(enfile()),
        };
        if let Err(e) = hold() {
            self.free_handles.push(ours);
            return Err(e);
        }
        self.handles.insert(
            ours,
            Handle {
                inner: Some(inner),
                inode,
            },
        );
        self.table.set_handle(ours, inode, flags, dir);
        Ok(ours)
    }

    /// The handle `ours` is released; its inner handle and inode, if it has them.
    pub fn release(&mut self, ours: u64) -> Option<(u64, u64)> {
        let h = self.handles.remove(&ours)?;
        self.table.free_handle(ours);
        self.free_handles.push(next_handle_number(ours));
        let_go(1);
        h.inner
    }

    /// A new FUSE session: nothing is held any more.
    pub fn clear(&mut self) {
        let_go((self.inodes.len() + self.handles.len()) as u64);
        self.table.clear();
        self.inodes.clear();
        self.by_inner.clear();
        self.names.clear();
        self.handles.clear();
        self.stale.clear();
        self.free_inodes.clear();
        self.next_inode = ROOT + 1;
        self.free_handles.clear();
        self.next_handle = 1;
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        let_go((self.inodes.len() + self.handles.len()) as u64);
    }
}
