#!/usr/bin/env python3
"""Write the seed inputs of the `virtiofs` fuzz target to tests/fuzz/seeds/virtiofs/ (committed).

Each seed is a request sequence in the target's input format (tests/fuzz/README.md): a u32 XORed into
FUSE_INIT's flags, then per request `op node reply flags [raw opcode u32] [raw nodeid u64] [raw reply
size u32] [raw header length u32] arglen(u16) args`. Node selectors index the harness's table: 0..4 are the
share (root, a.txt, dir, link, dir/b), 5 is the pseudo root, then the image mounts and their entries.
Standard library only.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "seeds", "virtiofs")

OP = dict(LOOKUP=1, FORGET=2, GETATTR=3, SETATTR=4, READLINK=5, SYMLINK=6, MKNOD=8, MKDIR=9, UNLINK=10,
          RMDIR=11, RENAME=12, LINK=13, OPEN=14, READ=15, WRITE=16, STATFS=17, RELEASE=18, FSYNC=20,
          SETXATTR=21, GETXATTR=22, LISTXATTR=23, REMOVEXATTR=24, FLUSH=25, INIT=26, OPENDIR=27,
          READDIR=28, RELEASEDIR=29, ACCESS=34, CREATE=35, DESTROY=38, BATCH_FORGET=42,
          FALLOCATE=43, READDIRPLUS=44, RENAME2=45, LSEEK=46, COPY_FILE_RANGE=47, SETUPMAPPING=48,
          REMOVEMAPPING=49)
# Reply buffer sizes of the harness (bytes -> selector); selector 15 takes a raw u32.
REPLY = {n: i for i, n in enumerate([0, 16, 24, 40, 64, 120, 144, 160, 256, 1024, 4096, 8192, 65536,
                                     131072, 1 << 20])}
RAW_REPLY = 15
FLAG_RAW_LEN, FLAG_HANDLE, FLAG_NODE = 1, 2, 4
SHARE, A_TXT, DIR, LINK, B = range(5)
ROOT = 5
# Selector of the node learnt last (from LOOKUP, CREATE, MKDIR, ... replies); 201 the one before, ...
LAST = 200


def req(opcode, node, args=b"", reply=256, fh=False, node_arg=False, pieces=1, layout=0):
    """One well-formed request. `fh` / `node_arg` patch the argument's first 8 bytes with the handle /
    node whose index is in its first byte."""
    flags = (FLAG_HANDLE if fh else 0) | (FLAG_NODE if node_arg else 0) | ((pieces - 1) << 3) | (layout << 5)
    return struct.pack("<BBBBH", opcode - 1, node, REPLY[reply], flags, len(args)) + args


def raw(opcode=None, nodeid=None, reply_raw=None, hdr_len=None, args=b"", opsel=None, node=ROOT, reply=256):
    """A request with raw fields: unknown opcode, raw node id, raw reply size, wrong header length."""
    op = opsel if opsel is not None else (0xff if opcode is not None else 2)
    n = 240 if nodeid is not None else node
    rep = RAW_REPLY if reply_raw is not None else REPLY[reply]
    flags = FLAG_RAW_LEN if hdr_len is not None else 0
    out = struct.pack("<BBBB", op, n, rep, flags)
    if opcode is not None:
        out += struct.pack("<I", opcode)
    if nodeid is not None:
        out += struct.pack("<Q", nodeid)
    if reply_raw is not None:
        out += struct.pack("<I", reply_raw)
    if hdr_len is not None:
        out += struct.pack("<I", hdr_len)
    return out + struct.pack("<H", len(args)) + args


def cstr(s):
    return s.encode() + b"\0"


def read_in(handle, offset, size):
    return struct.pack("<QQIIQII", handle, offset, size, 0, 0, 0, 0)


def setupmapping(handle, foffset, length, flags, moffset):
    return struct.pack("<QQQQQ", handle, foffset, length, flags, moffset)


def seeds():
    init = struct.pack("<I", 0)
    s = {}
    # The image trees: list, stat, look up.
    walk = b""
    for n in range(ROOT, ROOT + 40):
        walk += req(OP["READDIRPLUS"], n, read_in(0, 0, 4096), reply=8192)
        walk += req(OP["GETATTR"], n, struct.pack("<IIQ", 0, 0, 0), reply=120)
    for name in ["special", "bigdir", "random-2m5", "xattrs", "bootstrap", "etc", "usr"]:
        walk += req(OP["LOOKUP"], ROOT + 1, cstr(name), reply=144)
    s["walk"] = walk
    # Reads of files, with handles, at odd offsets and sizes, over split buffers.
    reads = b""
    for n in range(ROOT + 3, ROOT + 60, 3):
        reads += req(OP["OPEN"], n, struct.pack("<II", 0, 0), reply=40)
        for off, size, layout in [(0, 4096, 0), (4095, 65536, 3), (1 << 20, 131072, 2), (1 << 40, 4096, 1)]:
            reads += req(OP["READ"], n, bytes([1]) + read_in(0, off, size)[1:], reply=size if size in REPLY else 4096,
                         fh=True, pieces=2, layout=layout)
        reads += req(OP["RELEASE"], n, struct.pack("<QIIQ", 0, 0, 0, 0), reply=16)
    s["reads"] = reads
    # Directories through READDIR with small buffers and cookies.
    dirs = b""
    for n in range(ROOT, ROOT + 30, 2):
        dirs += req(OP["OPENDIR"], n, struct.pack("<II", 0, 0), reply=40)
        for cookie in [0, 3, 100, 1 << 40]:
            dirs += req(OP["READDIR"], n, read_in(0, cookie, 512), reply=1024)
        dirs += req(OP["RELEASEDIR"], n, struct.pack("<QIIQ", 0, 0, 0, 0), reply=16)
    s["dirs"] = dirs
    # Extended attributes and links.
    xattr = b""
    for n in range(ROOT, ROOT + 50, 2):
        xattr += req(OP["LISTXATTR"], n, struct.pack("<II", 0, 0), reply=24)
        xattr += req(OP["LISTXATTR"], n, struct.pack("<II", 256, 0), reply=256)
        xattr += req(OP["GETXATTR"], n, struct.pack("<II", 64, 0) + cstr("user.fuzz"), reply=64)
        xattr += req(OP["READLINK"], n, reply=1024)
        xattr += req(OP["ACCESS"], n, struct.pack("<II", 4, 0), reply=16)
    s["xattr"] = xattr
    # The DAX window: maps of image files, in and out of the window, then removed.
    dax = b""
    for i, n in enumerate(range(ROOT + 3, ROOT + 40, 4)):
        moff = (i % 8) << 21
        dax += req(OP["SETUPMAPPING"], n, setupmapping(0, 0, 2 << 20, 2, moff), reply=16)
        dax += req(OP["SETUPMAPPING"], n, setupmapping(0, 4096, 4096, 2, moff + 8192), reply=16)
        dax += req(OP["SETUPMAPPING"], n, setupmapping(0, 0, 1 << 40, 2, 0), reply=16)
        dax += req(OP["REMOVEMAPPING"], n, struct.pack("<IQQ", 1, moff, 2 << 20), reply=16)
    dax += req(OP["SETUPMAPPING"], A_TXT, setupmapping(0, 0, 2 << 20, 3, 0), reply=16)
    s["dax"] = dax
    # The share: create, write, read back, resize, rename, link, remove.
    share = b""
    share += req(OP["CREATE"], SHARE, struct.pack("<IIII", os.O_RDWR, 0o100644, 0o022, 0) + cstr("new"), reply=160)
    write = struct.pack("<QQIIQII", 0, 0, 12, 0, 0, 0, 0)
    share += req(OP["WRITE"], LAST, bytes([1]) + write[1:] + b"hello world\n", reply=24, fh=True)
    share += req(OP["READ"], LAST, bytes([1]) + read_in(0, 0, 4096)[1:], reply=8192, fh=True)
    share += req(OP["FALLOCATE"], LAST, bytes([1]) + struct.pack("<QQQII", 0, 0, 1 << 20, 0, 0)[1:], reply=16, fh=True)
    share += req(OP["LSEEK"], LAST, bytes([1]) + struct.pack("<QQII", 0, 0, 3, 0)[1:], reply=24, fh=True)
    share += req(OP["FSYNC"], LAST, bytes([1]) + struct.pack("<QII", 0, 0, 0)[1:], reply=16, fh=True)
    share += req(OP["SETUPMAPPING"], LAST, bytes([1]) + setupmapping(0, 0, 2 << 20, 3, 0)[1:], reply=16, fh=True)
    share += req(OP["MKDIR"], SHARE, struct.pack("<II", 0o755, 0o022) + cstr("sub"), reply=144)
    share += req(OP["SYMLINK"], SHARE, cstr("sym") + cstr("../../etc/passwd"), reply=144)
    share += req(OP["MKNOD"], SHARE, struct.pack("<IIII", 0o010644, 0, 0o022, 0) + cstr("fifo"), reply=144)
    share += req(OP["LINK"], SHARE, struct.pack("<Q", A_TXT) + cstr("hard"), reply=144, node_arg=True)
    share += req(OP["RENAME"], SHARE, struct.pack("<Q", SHARE) + cstr("a.txt") + cstr("b.txt"), reply=16,
                 node_arg=True)
    share += req(OP["RENAME2"], DIR, struct.pack("<QII", SHARE, 2, 0) + cstr("b") + cstr("b.txt"), reply=16,
                 node_arg=True)
    copy = struct.pack("<QQQQQQQ", 0, 0, 0, 0, 100, 6, 0)
    share += req(OP["COPY_FILE_RANGE"], LAST + 5, bytes([1]) + copy[1:], reply=24, fh=True)
    share += req(OP["RELEASE"], LAST + 5, bytes([1]) + struct.pack("<QIIQ", 0, 0, 0, 0)[1:], reply=16, fh=True)
    share += req(OP["SETXATTR"], A_TXT, struct.pack("<II", 3, 0) + cstr("user.k") + b"val", reply=16)
    share += req(OP["GETXATTR"], A_TXT, struct.pack("<II", 64, 0) + cstr("user.k"), reply=64)
    share += req(OP["REMOVEXATTR"], A_TXT, cstr("user.k"), reply=16)
    share += req(OP["SETATTR"], B, struct.pack("<IIQQQQQQIIIIIIII", 8, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
                 reply=120)
    share += req(OP["LOOKUP"], SHARE, cstr(".."), reply=144)
    share += req(OP["UNLINK"], SHARE, cstr("new"), reply=16)
    share += req(OP["RMDIR"], SHARE, cstr("sub"), reply=16)
    share += req(OP["SETUPMAPPING"], B, setupmapping(0, 0, 8192, 2, 0), reply=16)
    share += req(OP["STATFS"], SHARE, reply=144)
    s["share"] = share
    # Hostile framing: unknown opcodes, bogus node ids, header lengths that lie, tiny reply buffers,
    # requests split over several descriptors, a new session in the middle.
    hostile = b""
    for opcode in [0, 7, 19, 50, 51, 4096, 0xFFFFFFFF]:
        hostile += raw(opcode=opcode)
    for nodeid in [0, 2, 1 << 56, (1 << 56) | 128, (3 << 56) | 0xFFFFFF, 0xFFFFFFFFFFFFFFFF]:
        hostile += raw(opsel=OP["GETATTR"] - 1, nodeid=nodeid, args=struct.pack("<IIQ", 0, 0, 0))
    for hdr in [0, 8, 39, 41, 1 << 20, 0xFFFFFFFF]:
        hostile += raw(opsel=OP["LOOKUP"] - 1, hdr_len=hdr, args=cstr("rafs"))
    for size in [1, 15, 17, 100]:
        hostile += raw(opsel=OP["READDIRPLUS"] - 1, node=ROOT + 1, reply_raw=size, args=read_in(0, 0, 4096))
    hostile += req(OP["BATCH_FORGET"], ROOT, struct.pack("<IIQQ", 1, 0, 1 << 56 | 128, 1 << 40), reply=0)
    hostile += req(OP["FORGET"], ROOT + 1, struct.pack("<Q", 1 << 63), reply=0)
    hostile += req(OP["DESTROY"], 0, reply=16)
    hostile += req(OP["INIT"], 0, struct.pack("<IIII", 7, 31, 0, 0), reply=256)
    hostile += req(OP["LOOKUP"], ROOT, cstr("rafs"), reply=144, pieces=4)
    s["hostile"] = hostile
    return {k: init + v for k, v in s.items()}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, data in seeds().items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
