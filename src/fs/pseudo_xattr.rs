//! xattr requests on the `Vfs`'s own directories (its root, and the directories leading to mount points)
//! are answered by the front ends, not by fuse-backend-rs's pseudo filesystem: that one answers ENOSYS,
//! and the kernel takes an ENOSYS to an xattr request as "this connection has no xattrs" for every inode
//! from then on — every image of a shared daemon and every passthrough share of a VM would lose their
//! xattrs because someone listed the xattrs of the mount's root directory. These directories have none.

use fuse_backend_rs::abi::fuse_abi::{GetxattrIn, GetxattrOut, InHeader, Opcode, OutHeader};
use fuse_backend_rs::api::Vfs;
use fuse_backend_rs::transport::Reader;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::ByteValued;

/// Where fuse-backend-rs puts a mount's index in an inode number; index 0 is its pseudo filesystem.
const VFS_INDEX_SHIFT: u32 = 56;
/// The root directory's inode number.
const ROOT: u64 = 1;

/// The whole reply to the request `reader` holds (`header` is its header, already read by the caller)
/// when it is an xattr request on one of the `Vfs`'s own directories; `None` for any other request,
/// which goes to the server.
pub fn reply<S: BitmapSlice>(
    vfs: &Vfs,
    header: &InHeader,
    reader: &Reader<'_, S>,
) -> Option<Vec<u8>> {
    let op = header.opcode;
    let xattr = [
        Opcode::Setxattr,
        Opcode::Getxattr,
        Opcode::Listxattr,
        Opcode::Removexattr,
    ];
    if !xattr.iter().any(|&o| o as u32 == op) || header.nodeid >> VFS_INDEX_SHIFT != 0 {
        return None;
    }
    // A mount at "/" makes the root its own, not the pseudo filesystem's.
    if header.nodeid == ROOT && !matches!(vfs.get_rootfs("/"), Ok(None)) {
        return None;
    }
    let (error, payload) = if op == Opcode::Listxattr as u32 {
        let mut r = reader.clone();
        let size = r
            .read_obj::<InHeader>()
            .and_then(|_| r.read_obj::<GetxattrIn>())
            .map_or(0, |i| i.size);
        // No names: their total length when asked for it, else an empty list.
        match size {
            0 => (0, GetxattrOut::default().as_slice().to_vec()),
            _ => (0, Vec::new()),
        }
    } else if op == Opcode::Setxattr as u32 {
        (libc::EPERM, Vec::new())
    } else {
        (libc::ENODATA, Vec::new())
    };
    let out = OutHeader {
        len: (std::mem::size_of::<OutHeader>() + payload.len()) as u32,
        error: -error,
        unique: header.unique,
    };
    let mut bytes = out.as_slice().to_vec();
    bytes.extend_from_slice(&payload);
    Some(bytes)
}
