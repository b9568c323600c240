//! `passthrough_fs` mounts (Kata's `/containers` share): a read-write view of one host directory, built on
//! fuse-backend-rs's passthrough filesystem and confined to that directory.
//!
//! Under a `Vfs`, that filesystem accepts "." and ".." in LOOKUP (for NFS export), which would let a guest
//! step above the shared directory. This wrapper refuses "." / ".." / names with '/' in every request that
//! takes a name before the request reaches it. Symlinks are never followed on the host (the passthrough
//! filesystem opens with O_NOFOLLOW relative to directory fds); the guest resolves them in its own tree.

use std::any::Any;
use std::ffi::CStr;
use std::io;
use std::path::Path;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, IoctlData, ListxattrReply,
    ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::api::BackendFileSystem;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::FsCacheReqHandler;

use crate::error::{Error, Result};

pub struct ConfinedPassthrough {
    inner: PassthroughFs<()>,
}

impl ConfinedPassthrough {
    pub fn new(dir: &Path) -> Result<Self> {
        let root = dir
            .canonicalize()
            .map_err(|e| Error::io(format!("passthrough source {}", dir.display()), e))?;
        if !root.is_dir() {
            return Err(Error::Invalid(format!(
                "passthrough source {} is not a directory",
                root.display()
            )));
        }
        let cfg = Config {
            root_dir: root.to_string_lossy().into_owned(),
            do_import: true,
            xattr: true,
            writeback: false,
            cache_policy: CachePolicy::Auto,
            attr_timeout: Duration::from_secs(1),
            entry_timeout: Duration::from_secs(1),
            ..Default::default()
        };
        let inner = PassthroughFs::<()>::new(cfg)
            .map_err(|e| Error::io("create passthrough filesystem", e))?;
        inner
            .import()
            .map_err(|e| Error::io(format!("open passthrough root {}", root.display()), e))?;
        Ok(ConfinedPassthrough { inner })
    }
}

/// Linux's XATTR_SIZE_MAX and XATTR_LIST_MAX: no xattr value or name list is longer.
const XATTR_MAX: u32 = 65536;

/// A name a request may create or look up: one component, never "." or "..".
fn check(name: &CStr) -> io::Result<()> {
    let b = name.to_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    Ok(())
}

macro_rules! delegate {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        $(fn $name(&self, $($arg: $ty),*) -> $ret { self.inner.$name($($arg),*) })*
    };
}

macro_rules! delegate_checked {
    ($($name:ident[$($checked:ident),*]($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        $(fn $name(&self, $($arg: $ty),*) -> $ret {
            $(check($checked)?;)*
            self.inner.$name($($arg),*)
        })*
    };
}

impl FileSystem for ConfinedPassthrough {
    type Inode = u64;
    type Handle = u64;

    delegate_checked! {
        lookup[name](ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry>;
        symlink[name](ctx: &Context, linkname: &CStr, parent: u64, name: &CStr) -> io::Result<Entry>;
        mknod[name](ctx: &Context, inode: u64, name: &CStr, mode: u32, rdev: u32, umask: u32) -> io::Result<Entry>;
        mkdir[name](ctx: &Context, parent: u64, name: &CStr, mode: u32, umask: u32) -> io::Result<Entry>;
        unlink[name](ctx: &Context, parent: u64, name: &CStr) -> io::Result<()>;
        rmdir[name](ctx: &Context, parent: u64, name: &CStr) -> io::Result<()>;
        rename[oldname, newname](ctx: &Context, olddir: u64, oldname: &CStr, newdir: u64, newname: &CStr, flags: u32) -> io::Result<()>;
        link[newname](ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry>;
        create[name](ctx: &Context, parent: u64, name: &CStr, args: CreateIn) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)>;
    }

    delegate! {
        init(capable: FsOptions) -> io::Result<FsOptions>;
        forget(ctx: &Context, inode: u64, count: u64) -> ();
        batch_forget(ctx: &Context, requests: Vec<(u64, u64)>) -> ();
        getattr(ctx: &Context, inode: u64, handle: Option<u64>) -> io::Result<(stat64, Duration)>;
        setattr(ctx: &Context, inode: u64, attr: stat64, handle: Option<u64>, valid: SetattrValid) -> io::Result<(stat64, Duration)>;
        readlink(ctx: &Context, inode: u64) -> io::Result<Vec<u8>>;
        open(ctx: &Context, inode: u64, flags: u32, fuse_flags: u32) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)>;
        read(ctx: &Context, inode: u64, handle: u64, w: &mut dyn ZeroCopyWriter, size: u32, offset: u64, lock_owner: Option<u64>, flags: u32) -> io::Result<usize>;
        write(ctx: &Context, inode: u64, handle: u64, r: &mut dyn ZeroCopyReader, size: u32, offset: u64, lock_owner: Option<u64>, delayed_write: bool, flags: u32, fuse_flags: u32) -> io::Result<usize>;
        flush(ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()>;
        fsync(ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()>;
        fallocate(ctx: &Context, inode: u64, handle: u64, mode: u32, offset: u64, length: u64) -> io::Result<()>;
        release(ctx: &Context, inode: u64, flags: u32, handle: u64, flush: bool, flock_release: bool, lock_owner: Option<u64>) -> io::Result<()>;
        statfs(ctx: &Context, inode: u64) -> io::Result<statvfs64>;
        setxattr(ctx: &Context, inode: u64, name: &CStr, value: &[u8], flags: u32) -> io::Result<()>;
        removexattr(ctx: &Context, inode: u64, name: &CStr) -> io::Result<()>;
        opendir(ctx: &Context, inode: u64, flags: u32) -> io::Result<(Option<u64>, OpenOptions)>;
        readdir(ctx: &Context, inode: u64, handle: u64, size: u32, offset: u64, add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>) -> io::Result<()>;
        readdirplus(ctx: &Context, inode: u64, handle: u64, size: u32, offset: u64, add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>) -> io::Result<()>;
        fsyncdir(ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()>;
        releasedir(ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()>;
        setupmapping(ctx: &Context, inode: u64, handle: u64, foffset: u64, len: u64, flags: u64, moffset: u64, vu_req: &mut dyn FsCacheReqHandler) -> io::Result<()>;
        removemapping(ctx: &Context, inode: u64, requests: Vec<RemovemappingOne>, vu_req: &mut dyn FsCacheReqHandler) -> io::Result<()>;
        access(ctx: &Context, inode: u64, mask: u32) -> io::Result<()>;
        lseek(ctx: &Context, inode: u64, handle: u64, offset: u64, whence: u32) -> io::Result<u64>;
        getlk(ctx: &Context, inode: u64, handle: u64, owner: u64, lock: FileLock, flags: u32) -> io::Result<FileLock>;
        setlk(ctx: &Context, inode: u64, handle: u64, owner: u64, lock: FileLock, flags: u32) -> io::Result<()>;
        setlkw(ctx: &Context, inode: u64, handle: u64, owner: u64, lock: FileLock, flags: u32) -> io::Result<()>;
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    // The passthrough filesystem allocates the guest's `size` up front (up to 4 GiB per request);
    // Linux never returns more than XATTR_SIZE_MAX / XATTR_LIST_MAX bytes, so larger sizes change nothing
    // but the allocation.
    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size.min(XATTR_MAX))
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size.min(XATTR_MAX))
    }

    fn ioctl(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        self.inner
            .ioctl(ctx, inode, handle, flags, cmd, data, out_size)
    }
}

impl BackendFileSystem for ConfinedPassthrough {
    fn mount(&self) -> io::Result<(Entry, u64)> {
        self.inner.mount()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_names_are_refused() {
        for bad in [c".", c"..", c"a/b", c""] {
            assert_eq!(
                check(bad).unwrap_err().raw_os_error(),
                Some(libc::EPERM),
                "{bad:?}"
            );
        }
        assert!(check(c"file").is_ok());
        assert!(check(c"...").is_ok());
    }

    #[test]
    fn lookups_cannot_leave_the_shared_directory() {
        let outer = tempfile::tempdir().unwrap();
        std::fs::write(outer.path().join("secret"), b"host only").unwrap();
        let share = outer.path().join("share");
        std::fs::create_dir(&share).unwrap();
        std::fs::write(share.join("file"), b"shared").unwrap();
        std::os::unix::fs::symlink("../secret", share.join("escape")).unwrap();
        let fs = ConfinedPassthrough::new(&share).unwrap();
        let ctx = Context::default();
        let root = fuse_backend_rs::api::filesystem::ROOT_ID;
        fs.init(FsOptions::empty()).unwrap();
        for bad in [c"..", c"."] {
            assert_eq!(
                fs.lookup(&ctx, root, bad).unwrap_err().raw_os_error(),
                Some(libc::EPERM),
                "{bad:?}"
            );
            assert_eq!(
                fs.mkdir(&ctx, root, bad, 0o755, 0)
                    .unwrap_err()
                    .raw_os_error(),
                Some(libc::EPERM)
            );
        }
        assert!(fs.lookup(&ctx, root, c"file").unwrap().inode != 0);
        // A symlink is returned as a link (the guest resolves it in its own tree), never followed here.
        let link = fs.lookup(&ctx, root, c"escape").unwrap();
        assert_eq!(link.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(fs.readlink(&ctx, link.inode).unwrap(), b"../secret");
        assert!(
            fs.lookup(&ctx, link.inode, c"secret").is_err(),
            "a symlink is not a directory to look into"
        );
    }
}
