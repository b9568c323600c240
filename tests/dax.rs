//! The virtio-fs DAX window end to end: the real `rafsd virtiofs --dax-window` process, and the test
//! frontend playing a VMM that owns a VIRTIO Shared Memory Region (kit::frontend::window): it answers
//! the device's SHMEM_MAP by mmapping the received fd into its window and SHMEM_UNMAP by making the range
//! inaccessible again. The guest's FUSE_SETUPMAPPING / REMOVEMAPPING go through the virtqueue; the
//! window's bytes are compared with manifest.tsv for every file of every fixture.

use kit::{daemon, frontend, manifest};

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use frontend::window::{Window, WindowServer};
use frontend::{Guest, Options, VirtiofsDaemon, ROOT};
use fuse_backend_rs::abi::fuse_abi::{FsOptions, FUSE_ATTR_DAX};
use sha2::Digest;
use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};

const BIN: &str = env!("CARGO_BIN_EXE_rafsd");
const WINDOW: u64 = 64 << 20;
/// The Linux guest maps its window in ranges of this size (FUSE_DAX_SZ).
const RANGE: u64 = 2 << 20;
const PAGE: u64 = 4096;
const READ: u64 = 2; // SetupmappingFlags::READ
const WRITE: u64 = 1; // SetupmappingFlags::WRITE

fn sha256_hex(data: &[u8]) -> String {
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A guest connected with a DAX window: SHMEM negotiated, the window served on its own thread.
struct DaxGuest {
    g: Guest,
    window: Arc<Window>,
    _server: WindowServer,
}

fn connect(sock: &Path) -> DaxGuest {
    connect_with_window(sock, WINDOW)
}

/// `connect`, with a VMM-side window of `vmm_window` bytes (a VMM that disagrees with the device).
fn connect_with_window(sock: &Path, vmm_window: u64) -> DaxGuest {
    let window = Window::new(vmm_window).unwrap();
    let server = WindowServer::start(window.clone()).unwrap();
    let opts = Options {
        extra_protocol: VhostUserProtocolFeatures::SHMEM
            | VhostUserProtocolFeatures::BACKEND_SEND_FD,
        backend_req_fd: Some(server.device_fd),
        ..Options::default()
    };
    let mut g = Guest::connect(sock, opts).expect("vhost-user handshake");
    assert!(
        g.conn.protocol.contains(
            VhostUserProtocolFeatures::SHMEM
                | VhostUserProtocolFeatures::BACKEND_SEND_FD
                | VhostUserProtocolFeatures::REPLY_ACK
        ),
        "the device offers what DAX needs: {:?}",
        g.conn.protocol
    );
    let shm = g
        .conn
        .frontend
        .get_shmem_config()
        .expect("GET_SHMEM_CONFIG");
    let sizes = shm.memory_sizes;
    assert_eq!(
        (shm.nregions, sizes[0]),
        (1, WINDOW),
        "one shared memory region of --dax-window bytes"
    );
    DaxGuest {
        g,
        window,
        _server: server,
    }
}

/// Regular files of the tree under `dir` (path relative to the image root -> nodeid), by READDIRPLUS.
fn walk(g: &mut Guest, dir: u64, prefix: &str, out: &mut BTreeMap<String, u64>) {
    for e in g.list_dir(dir).unwrap() {
        if e.name == b"." || e.name == b".." {
            continue;
        }
        let path = format!("{prefix}{}", String::from_utf8_lossy(&e.name));
        match e.mode & libc::S_IFMT {
            libc::S_IFDIR => walk(g, e.nodeid, &format!("{path}/"), out),
            libc::S_IFREG => {
                out.insert(path, e.nodeid);
            }
            _ => {}
        }
    }
}

/// Check the window against the files of one round of maps, then unmap them all in one REMOVEMAPPING.
fn flush(
    d: &mut DaxGuest,
    round: &mut Vec<(String, u64, u64)>,
    t: &mut Totals,
    content: &mut HashMap<String, Vec<u8>>,
    sizes: &HashMap<String, (u64, String)>,
) {
    // Which file backs the file's bytes (page-rounded) in each slot: the blob cache or a copy.
    let backing = d.window.backing();
    for (slot, (path, foffset, _)) in round.iter().enumerate() {
        let start = slot as u64 * RANGE;
        let end = start + (sizes[path].0 - foffset).min(RANGE).div_ceil(PAGE) * PAGE;
        for (off, len, name) in &backing {
            let overlap = (off + len).min(end).saturating_sub((*off).max(start));
            if name.contains(".blob.data") {
                t.from_cache += overlap;
            } else if name.contains("rafsd-dax") {
                t.from_memfd += overlap;
            } else {
                panic!("window range backed by unexpected {name}");
            }
        }
    }
    let mut ranges = Vec::new();
    for (slot, (path, foffset, nodeid)) in round.drain(..).enumerate() {
        let moffset = slot as u64 * RANGE;
        let size = sizes[&path].0;
        let valid = (size - foffset).min(RANGE);
        let data = content.entry(path.clone()).or_default();
        assert_eq!(data.len() as u64, foffset, "{path}: ranges in order");
        data.extend_from_slice(d.window.bytes(moffset, valid));
        // Past end of file the window shows zeros, never another file's bytes from the cache.
        let page_end = valid.div_ceil(PAGE) * PAGE;
        assert!(
            d.window
                .bytes(moffset + valid, page_end - valid)
                .iter()
                .all(|&b| b == 0),
            "{path}: bytes after end of file in its last page"
        );
        ranges.push((nodeid, moffset));
    }
    if ranges.is_empty() {
        return;
    }
    // One REMOVEMAPPING with every range, as the guest batches them.
    let list: Vec<(u64, u64)> = ranges.iter().map(|&(_, m)| (m, RANGE)).collect();
    d.g.removemapping(ranges[0].0, &list).unwrap();
    for &(_, m) in &ranges {
        assert!(
            !d.window.is_mapped(m),
            "window range {m:#x} still accessible after REMOVEMAPPING"
        );
    }
}

struct Totals {
    files: usize,
    bytes: u64,
    from_cache: u64,
    from_memfd: u64,
}

/// Map every regular file of the image mounted at `image` in 2 MiB ranges, a window-full at a time;
/// check each file's bytes against the manifest, the bytes past end of file are zeros, and that
/// REMOVEMAPPING leaves the ranges inaccessible.
fn map_every_file(d: &mut DaxGuest, image: u64, sizes: &HashMap<String, (u64, String)>) -> Totals {
    let mut files = BTreeMap::new();
    walk(&mut d.g, image, "", &mut files);
    let mut t = Totals {
        files: 0,
        bytes: 0,
        from_cache: 0,
        from_memfd: 0,
    };
    let slots = WINDOW / RANGE;
    // (path, file offset, nodeid) of the ranges mapped in this round; range i sits in window slot i.
    let mut round: Vec<(String, u64, u64)> = Vec::new();
    let mut content: HashMap<String, Vec<u8>> = HashMap::new();
    for (path, nodeid) in &files {
        let (size, _) = &sizes[path];
        if *size == 0 {
            // Nothing to map: a range that starts at end of file is refused.
            let e = d.g.setupmapping(*nodeid, 0, 0, RANGE, READ, 0).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{path}");
            content.insert(path.clone(), Vec::new());
            continue;
        }
        let mut foffset = 0;
        while foffset < *size {
            if round.len() as u64 == slots {
                flush(d, &mut round, &mut t, &mut content, sizes);
            }
            let moffset = round.len() as u64 * RANGE;
            d.g.setupmapping(*nodeid, 0, foffset, RANGE, READ, moffset)
                .unwrap_or_else(|e| panic!("SETUPMAPPING {path} at {foffset:#x}: {e}"));
            round.push((path.clone(), foffset, *nodeid));
            foffset += RANGE;
        }
    }
    flush(d, &mut round, &mut t, &mut content, sizes);
    for (path, data) in &content {
        let (size, sha) = &sizes[path];
        assert_eq!(data.len() as u64, *size, "{path}");
        assert_eq!(&sha256_hex(data), sha, "{path}: bytes in the DAX window");
        t.files += 1;
        t.bytes += size;
    }
    assert_eq!(t.files, files.len());
    t
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn every_fixture_maps_every_file_through_the_dax_window() {
    let dir = tempfile::tempdir().unwrap();
    let d = VirtiofsDaemon::start(BIN, dir.path(), &["--dax-window", "64M"]);
    let cases = manifest::cases();
    for (i, case) in cases.iter().enumerate() {
        // Every other image verifies chunks on every read (digest_validate), the others trust the cache.
        let config = daemon::v1_config(
            &manifest::case_blob_dir(case),
            &dir.path().join(format!("cache-{case}")),
            i % 2 == 1,
            "",
        );
        d.mount_rafs(
            &format!("/{case}"),
            &manifest::case_bootstrap(case),
            &config,
        );
    }
    let sizes: HashMap<String, (u64, String)> = manifest::load_manifest()
        .into_iter()
        .filter(|r| r["type"] == "f")
        .map(|r| {
            (
                r["path"].clone(),
                (r["size"].parse().unwrap(), r["sha256"].clone()),
            )
        })
        .collect();

    let mut dg = connect(&d.sock);
    let init = dg.g.fuse_init_with(FsOptions::PERFILE_DAX).unwrap();
    assert!(
        (init.flags as u64 | (init.flags2 as u64) << 32) & FsOptions::PERFILE_DAX.bits() != 0,
        "the device accepts per-file DAX (dax=inode)"
    );
    for case in &cases {
        let image = dg.g.lookup(ROOT, case.as_bytes()).unwrap();
        assert_eq!(
            image.attr.flags & FUSE_ATTR_DAX,
            0,
            "directories are not DAX"
        );
        let etc = dg.g.lookup(image.nodeid, b"etc").unwrap();
        let f = dg.g.lookup(etc.nodeid, b"adduser.conf").unwrap();
        assert_ne!(
            f.attr.flags & FUSE_ATTR_DAX,
            0,
            "{case}: regular files carry FUSE_ATTR_DAX for dax=inode"
        );
        let t = map_every_file(&mut dg, image.nodeid, &sizes);
        eprintln!(
            "{case}: {} files, {} bytes through the window; mapped from the blob cache {} KiB, from copies {} KiB",
            t.files,
            t.bytes,
            t.from_cache >> 10,
            t.from_memfd >> 10
        );
        assert!(t.files > 100, "{case}: the fixture's files were mapped");
        if case.starts_with("v6") || case == "v5-none-aligned" {
            // Page-aligned chunks in the cache: the data is mapped from it, not copied.
            assert!(
                t.from_cache > t.bytes / 2,
                "{case}: only {} of {} bytes mapped straight from the blob cache",
                t.from_cache,
                t.bytes
            );
        }
    }
    assert_eq!(
        dg.window
            .maps
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.2)
            .count(),
        0,
        "no writable map of an image"
    );
    drop(dg);
    d.kill_and_check();
}

/// A daemon with a 64 MiB DAX window serving fixture `case` at /img (blob cache under `dir`, chunks not
/// validated on read).
fn daemon_with_image(dir: &Path, case: &str) -> VirtiofsDaemon {
    let d = VirtiofsDaemon::start(BIN, dir, &["--dax-window", "64M"]);
    d.mount_case("/img", case, &dir.join("cache"), false);
    d
}

/// FUSE_READ of `[offset, offset + len)` (short at end of file), in reads that fit a request slot.
fn read_range(g: &mut Guest, ino: u64, offset: u64, len: u64) -> Vec<u8> {
    let fh = g.open(ino).unwrap().fh;
    let mut out = Vec::new();
    while (out.len() as u64) < len {
        let got = g
            .read(ino, fh, offset + out.len() as u64, 512 << 10)
            .unwrap();
        if got.is_empty() {
            break;
        }
        out.extend_from_slice(&got);
    }
    out.truncate(len as usize);
    g.release(ino, fh, false).unwrap();
    out
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn hostile_mapping_requests_are_refused_and_map_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = VirtiofsDaemon::start(BIN, dir.path(), &["--dax-window", "64M"]);
    let case = "v6-zstd-blake3";
    let config = daemon::v1_config(
        &manifest::case_blob_dir(case),
        &dir.path().join("cache"),
        false,
        "",
    );
    d.mount_rafs("/img", &manifest::case_bootstrap(case), &config);
    let mut dg = connect(&d.sock);
    dg.g.fuse_init().unwrap();
    let img = dg.g.lookup(ROOT, b"img").unwrap();
    let special = dg.g.lookup(img.nodeid, b"special").unwrap();
    let big = dg.g.lookup(special.nodeid, b"random-2m5").unwrap();
    let ino = big.nodeid;
    let size = big.attr.size;
    let errno = |r: std::io::Result<()>| r.unwrap_err().raw_os_error();
    let maps_before = dg.window.maps.lock().unwrap().len();
    let einval = Some(libc::EINVAL);
    let g = &mut dg.g;
    // Unaligned file offset, window offset, length; empty length.
    assert_eq!(errno(g.setupmapping(ino, 0, 4097, RANGE, READ, 0)), einval);
    assert_eq!(errno(g.setupmapping(ino, 0, 0, RANGE, READ, 512)), einval);
    assert_eq!(errno(g.setupmapping(ino, 0, 0, 5000, READ, 0)), einval);
    assert_eq!(errno(g.setupmapping(ino, 0, 0, 0, READ, 0)), einval);
    // Outside the window, and offsets that overflow.
    assert_eq!(
        errno(g.setupmapping(ino, 0, 0, RANGE, READ, WINDOW - RANGE + PAGE)),
        einval
    );
    assert_eq!(
        errno(g.setupmapping(ino, 0, 0, RANGE, READ, WINDOW)),
        einval
    );
    assert_eq!(
        errno(g.setupmapping(ino, 0, 0, RANGE, READ, u64::MAX - PAGE + 1)),
        einval
    );
    assert_eq!(
        errno(g.setupmapping(ino, 0, u64::MAX - PAGE + 1, RANGE, READ, 0)),
        einval
    );
    // Beyond end of file.
    let past = size.div_ceil(PAGE) * PAGE;
    assert_eq!(errno(g.setupmapping(ino, 0, past, RANGE, READ, 0)), einval);
    assert_eq!(
        errno(g.setupmapping(ino, 0, 1 << 40, RANGE, READ, 0)),
        einval
    );
    // Writable maps of a read-only image; a directory; flags nobody defined.
    assert_eq!(
        errno(g.setupmapping(ino, 0, 0, RANGE, READ | WRITE, 0)),
        Some(libc::EROFS)
    );
    assert_eq!(
        errno(g.setupmapping(special.nodeid, 0, 0, RANGE, READ, 0)),
        einval
    );
    assert_eq!(
        errno(g.setupmapping(ino, 0, 0, RANGE, READ | 0x80, 0)),
        einval
    );
    assert_eq!(
        dg.window.maps.lock().unwrap().len(),
        maps_before,
        "no refused request reached the VMM"
    );
    assert!(!dg.window.is_mapped(0));

    // A good map, then one that overlaps it half-way: refused, the first stays intact.
    let want = {
        let g = &mut dg.g;
        read_range(g, ino, 0, RANGE)
    };
    dg.g.setupmapping(ino, 0, 0, RANGE, READ, 0).unwrap();
    assert_eq!(dg.window.bytes(0, RANGE), &want[..]);
    let maps_now = dg.window.maps.lock().unwrap().len();
    assert_eq!(
        errno(dg.g.setupmapping(ino, 0, 0, RANGE, READ, RANGE / 2)),
        einval,
        "overlapping a live mapping"
    );
    assert_eq!(
        errno(dg.g.setupmapping(ino, 0, RANGE, RANGE, READ, RANGE - PAGE)),
        einval
    );
    assert_eq!(dg.window.maps.lock().unwrap().len(), maps_now);
    assert_eq!(dg.window.bytes(0, RANGE), &want[..], "first map intact");
    // The very same range again is a re-map in place (the guest does that), not an overlap.
    dg.g.setupmapping(ino, 0, 0, RANGE, READ, 0).unwrap();
    assert_eq!(dg.window.bytes(0, RANGE), &want[..]);

    // REMOVEMAPPING outside the window or unaligned is refused as a whole; nothing is unmapped.
    let unmaps = dg.window.unmaps.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        errno(dg.g.removemapping(ino, &[(0, RANGE), (WINDOW, RANGE)])),
        einval
    );
    assert_eq!(errno(dg.g.removemapping(ino, &[(100, PAGE)])), einval);
    assert_eq!(
        dg.window.unmaps.load(std::sync::atomic::Ordering::Relaxed),
        unmaps
    );
    assert!(dg.window.is_mapped(0));
    dg.g.removemapping(ino, &[(0, RANGE)]).unwrap();
    assert!(!dg.window.is_mapped(0) && !dg.window.is_mapped(RANGE - PAGE));
    // The freed range can be used again.
    dg.g.setupmapping(ino, 0, RANGE, RANGE, READ, 0).unwrap();
    let tail = size - RANGE;
    let want_tail = read_range(&mut dg.g, ino, RANGE, RANGE);
    assert_eq!(dg.window.bytes(0, tail), &want_tail[..]);
    drop(dg);

    // Without --dax-window: no SHMEM feature, and SETUPMAPPING is refused.
    let dir2 = tempfile::tempdir().unwrap();
    let d2 = VirtiofsDaemon::start(
        BIN,
        dir2.path(),
        &["--allow-path-rw", dir.path().to_str().unwrap()],
    );
    d2.mount_rafs("/img", &manifest::case_bootstrap(case), &config);
    let mut g2 = Guest::connect(&d2.sock, Options::default()).unwrap();
    let offered = g2.conn.frontend.get_protocol_features().unwrap();
    assert!(!offered.contains(VhostUserProtocolFeatures::SHMEM));
    g2.fuse_init().unwrap();
    let img = g2.lookup(ROOT, b"img").unwrap();
    let special = g2.lookup(img.nodeid, b"special").unwrap();
    let f = g2.lookup(special.nodeid, b"random-2m5").unwrap();
    assert_eq!(
        errno(g2.setupmapping(f.nodeid, 0, 0, RANGE, READ, 0)),
        einval
    );
    drop(g2);
    d2.kill_and_check();
    d.kill_and_check();
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn passthrough_files_map_directly() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let mut rng = frontend::Rng(0x5eed);
    let data: Vec<u8> = (0..(5 << 20) + 1234).map(|_| rng.next() as u8).collect();
    std::fs::write(share.join("blob.bin"), &data).unwrap();
    let share_arg = share.to_str().unwrap();
    let d = VirtiofsDaemon::start(
        BIN,
        dir.path(),
        &["--dax-window", "64M", "--shared-dir", share_arg],
    );
    let mut dg = connect(&d.sock);
    dg.g.fuse_init().unwrap();
    let f = dg.g.lookup(ROOT, b"blob.bin").unwrap();
    let mut got = Vec::new();
    let mut slot = 0;
    for foffset in (0..data.len() as u64).step_by(RANGE as usize) {
        dg.g.setupmapping(f.nodeid, 0, foffset, RANGE, READ, slot)
            .unwrap();
        let n = (data.len() as u64 - foffset).min(RANGE);
        got.extend_from_slice(dg.window.bytes(slot, n));
        slot += RANGE;
    }
    assert_eq!(sha256_hex(&got), sha256_hex(&data));
    let backing = dg.window.backing();
    assert!(
        backing
            .iter()
            .all(|(_, _, name)| name.ends_with("/share/blob.bin")),
        "passthrough maps the shared file itself: {backing:?}"
    );
    dg.g.removemapping(f.nodeid, &[(0, slot)]).unwrap();
    assert!(!dg.window.is_mapped(0));
    // Outside the window is refused for passthrough too.
    let e =
        dg.g.setupmapping(f.nodeid, 0, 0, RANGE, READ, WINDOW - PAGE)
            .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    drop(dg);
    d.kill_and_check();
}

/// Manifest sizes and digests of regular files, by path.
fn manifest_files() -> HashMap<String, (u64, String)> {
    manifest::load_manifest()
        .into_iter()
        .filter(|r| r["type"] == "f")
        .map(|r| {
            (
                r["path"].clone(),
                (r["size"].parse().unwrap(), r["sha256"].clone()),
            )
        })
        .collect()
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn images_without_a_cache_map_copies_and_corrupt_chunks_are_never_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let d = VirtiofsDaemon::start(BIN, dir.path(), &["--dax-window", "64M"]);
    // No cache at all: every byte comes from a verified copy.
    let case = "v6-zstd-blake3";
    let nocache = format!(
        r#"{{"device":{{"backend":{{"type":"localfs","config":{{"dir":"{}"}}}},"cache":{{"type":"dummycache"}}}},"mode":"direct","digest_validate":true}}"#,
        manifest::case_blob_dir(case).display()
    );
    d.mount_rafs("/nocache", &manifest::case_bootstrap(case), &nocache);
    // An uncompressed image whose blob has a flipped byte in the middle, digests checked.
    let case = "v6-none-blake3-4k";
    let blobs = dir.path().join("corrupt-blobs");
    std::fs::create_dir(&blobs).unwrap();
    for e in std::fs::read_dir(manifest::case_blob_dir(case)).unwrap() {
        let e = e.unwrap();
        let mut bytes = std::fs::read(e.path()).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x5a;
        std::fs::write(blobs.join(e.file_name()), bytes).unwrap();
    }
    let config = daemon::v1_config(&blobs, &dir.path().join("cache"), true, "");
    d.mount_rafs("/corrupt", &manifest::case_bootstrap(case), &config);
    let sizes = manifest_files();
    let mut dg = connect(&d.sock);
    dg.g.fuse_init().unwrap();

    let nocache = dg.g.lookup(ROOT, b"nocache").unwrap().nodeid;
    let t = map_every_file(&mut dg, nocache, &sizes);
    assert_eq!(t.from_cache, 0, "no cache file to map from");
    assert!(t.from_memfd >= t.bytes, "every byte from a copy");

    let corrupt = dg.g.lookup(ROOT, b"corrupt").unwrap().nodeid;
    let mut files = BTreeMap::new();
    walk(&mut dg.g, corrupt, "", &mut files);
    let (mut refused, mut whole) = (0, 0);
    for (path, nodeid) in &files {
        let size = sizes[path].0;
        let mut data = Vec::new();
        let mut foffset = 0;
        let mut failed = false;
        while foffset < size {
            let len = (size - foffset).min(RANGE);
            let fh = dg.g.open(*nodeid).unwrap().fh;
            let read = dg.g.read(*nodeid, fh, foffset, 4096);
            dg.g.release(*nodeid, fh, false).unwrap();
            match dg.g.setupmapping(*nodeid, 0, foffset, RANGE, READ, 0) {
                Ok(()) => {
                    data.extend_from_slice(dg.window.bytes(0, len));
                    dg.g.removemapping(*nodeid, &[(0, RANGE)]).unwrap();
                }
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{path} at {foffset:#x}");
                    assert!(!dg.window.is_mapped(0), "{path}: nothing mapped on failure");
                    // FUSE_READ of the range agrees that some chunk of it is bad.
                    let mut bad = read.is_err();
                    let fh = dg.g.open(*nodeid).unwrap().fh;
                    let mut at = foffset;
                    while !bad && at < foffset + len {
                        bad = dg.g.read(*nodeid, fh, at, 512 << 10).is_err();
                        at += 512 << 10;
                    }
                    dg.g.release(*nodeid, fh, false).unwrap();
                    assert!(
                        bad,
                        "{path} at {foffset:#x}: refused to map a range FUSE_READ serves"
                    );
                    failed = true;
                }
            }
            foffset += RANGE;
        }
        if failed {
            refused += 1;
        } else {
            assert_eq!(sha256_hex(&data), sizes[path].1, "{path}");
            whole += 1;
        }
    }
    assert!(
        refused >= 1,
        "the flipped byte belongs to some file's chunk"
    );
    assert!(whole > 100, "the other files map fine");
    drop(dg);
    d.kill_and_check();
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_vmm_that_refuses_or_drops_maps_gets_eio_and_reads_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon_with_image(dir.path(), "v6-zstd-blake3");
    // The VMM reserved only half of the window the device announced, and refuses maps beyond it.
    let DaxGuest {
        mut g,
        window,
        _server: server,
    } = connect_with_window(&d.sock, WINDOW / 2);
    g.fuse_init().unwrap();
    let img = g.lookup(ROOT, b"img").unwrap();
    let special = g.lookup(img.nodeid, b"special").unwrap();
    let f = g.lookup(special.nodeid, b"random-2m5").unwrap();
    let e = g
        .setupmapping(f.nodeid, 0, 0, RANGE, READ, WINDOW / 2 + RANGE)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "the VMM said no");
    // The refused range is not booked: mapping it elsewhere and there again later is not an overlap.
    g.setupmapping(f.nodeid, 0, 0, RANGE, READ, 0).unwrap();
    let want = read_range(&mut g, f.nodeid, 0, RANGE);
    assert_eq!(window.bytes(0, RANGE), &want[..]);
    g.removemapping(f.nodeid, &[(0, RANGE)]).unwrap();
    // The VMM stops serving the backend channel: maps fail with EIO, not a hang; reads still work.
    drop(server);
    let e = g.setupmapping(f.nodeid, 0, 0, RANGE, READ, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert!(!window.is_mapped(0));
    let data = read_range(&mut g, f.nodeid, 0, f.attr.size);
    assert_eq!(
        sha256_hex(&data),
        manifest_files()["special/random-2m5"].1,
        "FUSE_READ after the DAX channel broke"
    );
    drop(g);
    d.kill_and_check();
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_new_fuse_session_starts_with_an_empty_window() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon_with_image(dir.path(), "v5-none-aligned");
    let mut dg = connect(&d.sock);
    let lookup = |g: &mut Guest| {
        let img = g.lookup(ROOT, b"img").unwrap();
        let special = g.lookup(img.nodeid, b"special").unwrap();
        g.lookup(special.nodeid, b"random-2m5").unwrap().nodeid
    };
    dg.g.fuse_init().unwrap();
    let f = lookup(&mut dg.g);
    dg.g.setupmapping(f, 0, 0, RANGE, READ, 0).unwrap();
    dg.g.setupmapping(f, 0, RANGE, RANGE, READ, RANGE).unwrap();
    assert!(dg.window.is_mapped(RANGE));
    // The guest unmounts (FUSE_DESTROY, no REMOVEMAPPING) and mounts again: its new session believes
    // the window is empty, and so must the device.
    // (fuse-backend-rs writes the DESTROY reply but reports 0 bytes used; only completion is checked.)
    let (_, chain) = dg.g.request_chain(
        fuse_backend_rs::abi::fuse_abi::Opcode::Destroy as u32,
        0,
        &[],
        0,
    );
    let q = dg.g.queue;
    dg.g.conn.roundtrip(q, &chain).unwrap();
    dg.g.fuse_init().unwrap();
    assert!(
        !dg.window.is_mapped(0) && !dg.window.is_mapped(RANGE),
        "the previous session's mappings are gone"
    );
    let f = lookup(&mut dg.g);
    dg.g.setupmapping(f, 0, 0, RANGE, READ, RANGE).unwrap();
    let want = read_range(&mut dg.g, f, 0, RANGE);
    assert_eq!(dg.window.bytes(RANGE, RANGE), &want[..]);
    drop(dg);
    d.kill_and_check();
}

/// A REMOVEMAPPING is bounded by what a guest page holds (4096 ranges) and costs the VMM one unmap per
/// run of touching ranges: a list of 65536 ranges had the server allocate for them all, and each range
/// was a round trip to the VMM with the window locked for every queue. A second FUSE_INIT (refused by
/// the server: no DESTROY came) leaves the guest's mappings: it emptied the window under a guest still
/// using it.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn removals_are_bounded_and_merged_and_a_refused_init_keeps_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon_with_image(dir.path(), "v5-none-aligned");
    let mut dg = connect(&d.sock);
    dg.g.fuse_init().unwrap();
    let img = dg.g.lookup(ROOT, b"img").unwrap();
    let special = dg.g.lookup(img.nodeid, b"special").unwrap();
    let f = dg.g.lookup(special.nodeid, b"random-2m5").unwrap().nodeid;
    dg.g.setupmapping(f, 0, 0, RANGE, READ, 0).unwrap();
    dg.g.setupmapping(f, 0, RANGE, RANGE, READ, RANGE).unwrap();

    // INIT again without DESTROY: refused, and the window keeps both ranges.
    let e = dg.g.fuse_init().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    assert!(dg.window.is_mapped(0) && dg.window.is_mapped(RANGE));
    let want = read_range(&mut dg.g, f, 0, RANGE);
    assert!(dg.window.bytes(0, RANGE) == &want[..], "window bytes");

    // More ranges than a guest page holds: refused, nothing unmapped.
    let unmaps = || dg.window.unmaps.load(std::sync::atomic::Ordering::Relaxed);
    let before = unmaps();
    let e = dg.g.removemapping(f, &[(0, 4096); 4097]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    assert_eq!(unmaps(), before);
    assert!(dg.window.is_mapped(0));
    // The first range as 512 adjacent pages and the second whole: one unmap for all of it.
    let mut pages: Vec<(u64, u64)> = (0..RANGE / 4096).map(|i| (i * 4096, 4096)).collect();
    pages.push((RANGE, RANGE));
    dg.g.removemapping(f, &pages).unwrap();
    assert_eq!(unmaps() - before, 1, "one SHMEM_UNMAP for touching ranges");
    assert!(!dg.window.is_mapped(0) && !dg.window.is_mapped(RANGE));
    drop(dg);
    d.kill_and_check();
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn live_mappings_survive_a_live_upgrade_and_are_unmapped_later() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = daemon_with_image(dir.path(), "v5-none-aligned");
    let mut dg = connect(&d.sock);
    dg.g.fuse_init().unwrap();
    let img = dg.g.lookup(ROOT, b"img").unwrap();
    let special = dg.g.lookup(img.nodeid, b"special").unwrap();
    let f = dg.g.lookup(special.nodeid, b"random-2m5").unwrap().nodeid;
    let want = read_range(&mut dg.g, f, 0, 2 * RANGE);
    dg.g.setupmapping(f, 0, 0, RANGE, READ, 0).unwrap();
    dg.g.setupmapping(f, 0, RANGE, RANGE, READ, RANGE).unwrap();
    let n = want.len() as u64; // 2.5 MiB: the file ends in the second range
    assert!(dg.window.bytes(0, n) == &want[..], "window bytes");
    let old = d.pid();
    d.upgrade(BIN, dir.path());
    assert_ne!(d.pid(), old);
    // The VMM kept the mapping; the guest reads it as before.
    assert!(dg.window.bytes(0, n) == &want[..], "window bytes");
    // The new daemon knows it: an overlapping map of another file range is refused, nothing changes.
    let e = dg.g.setupmapping(f, 0, 0, RANGE, READ, RANGE).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    assert!(dg.window.bytes(0, n) == &want[..], "window bytes");
    // And unmaps it when the guest asks.
    dg.g.removemapping(f, &[(0, 2 * RANGE)]).unwrap();
    assert!(!dg.window.is_mapped(0) && !dg.window.is_mapped(RANGE));
    dg.g.setupmapping(f, 0, RANGE, RANGE, READ, 0).unwrap();
    assert!(
        dg.window.bytes(0, n - RANGE) == &want[RANGE as usize..],
        "window bytes"
    );
    // Requests go on through the rings the new daemon took over.
    assert!(read_range(&mut dg.g, f, 0, 2 * RANGE) == want, "read");
    drop(dg);
    d.kill_and_check();
}

#[test]
fn bad_window_sizes_are_refused_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["0", "3M", "1K", "lots", "-2M", "99999999999999T"] {
        let out = std::process::Command::new(BIN)
            .args(["virtiofs", "--sock"])
            .arg(dir.path().join("s.sock"))
            .arg(format!("--dax-window={bad}"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "--dax-window {bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("DAX window size"), "--dax-window {bad}: {err}");
        assert!(
            !dir.path().join("s.sock").exists(),
            "refused before binding the socket"
        );
    }
}

/// The image's backend reads so far, from `/api/v1/metrics/backend?id=MP`.
fn backend_reads(d: &VirtiofsDaemon, mountpoint: &str) -> u64 {
    let (status, body) = d
        .api(
            "GET",
            &format!("/api/v1/metrics/backend?id={mountpoint}"),
            "",
        )
        .unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["read_count"]
        .as_u64()
        .unwrap()
}

/// A SETUPMAPPING whose window range cannot fit (1 TiB, past the window's end, overflowing) or whose
/// flags are unknown is refused with EINVAL before the file's chunks are fetched: zero backend reads,
/// nothing mapped, and both images (with and without a cache) keep serving.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn oversized_mappings_are_refused_before_any_backend_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon_with_image(dir.path(), "v6-zstd-blake3");
    let case = "v5-zstd-sha256-128k";
    let nocache = format!(
        r#"{{"device":{{"backend":{{"type":"localfs","config":{{"dir":"{}"}}}},"cache":{{"type":"dummycache"}}}},"mode":"direct","digest_validate":true}}"#,
        manifest::case_blob_dir(case).display()
    );
    d.mount_rafs("/nocache", &manifest::case_bootstrap(case), &nocache);
    let mut dg = connect(&d.sock);
    dg.g.fuse_init().unwrap();
    let einval = Some(libc::EINVAL);
    for mp in ["img", "nocache"] {
        let root = dg.g.lookup(ROOT, mp.as_bytes()).unwrap();
        let special = dg.g.lookup(root.nodeid, b"special").unwrap();
        let f = dg.g.lookup(special.nodeid, b"random-2m5").unwrap().nodeid;
        assert_eq!(
            backend_reads(&d, &format!("/{mp}")),
            0,
            "{mp}: nothing read yet"
        );
        let maps_before = dg.window.maps.lock().unwrap().len();
        for (len, moffset, flags) in [
            (1 << 40, 0, READ),
            (WINDOW + RANGE, 0, READ),
            (2 * RANGE, WINDOW - RANGE, READ),
            (RANGE, u64::MAX - PAGE + 1, READ),
            (RANGE, 0, READ | 0x80),
        ] {
            let e = dg.g.setupmapping(f, 0, 0, len, flags, moffset).unwrap_err();
            assert_eq!(
                e.raw_os_error(),
                einval,
                "{mp}: len {len:#x} at {moffset:#x}"
            );
            assert_eq!(
                backend_reads(&d, &format!("/{mp}")),
                0,
                "{mp}: SETUPMAPPING of {len:#x} bytes at {moffset:#x} read the backend before it was refused"
            );
        }
        assert_eq!(
            dg.window.maps.lock().unwrap().len(),
            maps_before,
            "{mp}: nothing mapped"
        );
        // A mapping that fits works, and FUSE_READ agrees with it.
        dg.g.setupmapping(f, 0, 0, RANGE, READ, 0).unwrap();
        let want = read_range(&mut dg.g, f, 0, RANGE);
        assert_eq!(dg.window.bytes(0, RANGE), &want[..], "{mp}");
        dg.g.removemapping(f, &[(0, RANGE)]).unwrap();
    }
    let sizes = manifest_files();
    let img = dg.g.lookup(ROOT, b"img").unwrap().nodeid;
    let t = map_every_file(&mut dg, img, &sizes);
    assert!(t.files > 100);
    drop(dg);
    d.kill_and_check();
}

/// Linux maps its window in 2 MiB ranges (FUSE_DAX_SZ). A longer SETUPMAPPING, or one over another live
/// mapping, is refused with EINVAL before the file's chunks are fetched: a RAFS file fetched and copied
/// the whole range into memory before the window looked at it.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn long_or_overlapping_mappings_are_refused_before_any_backend_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon_with_image(dir.path(), "v6-zstd-blake3");
    let mut dg = connect(&d.sock);
    dg.g.fuse_init().unwrap();
    let img = dg.g.lookup(ROOT, b"img").unwrap();
    let special = dg.g.lookup(img.nodeid, b"special").unwrap();
    let f = dg.g.lookup(special.nodeid, b"random-2m5").unwrap().nodeid;
    let einval = Some(libc::EINVAL);
    assert_eq!(backend_reads(&d, "/img"), 0, "nothing read yet");
    let e = dg.g.setupmapping(f, 0, 0, 2 * RANGE, READ, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), einval, "two ranges at once: {e}");
    assert_eq!(backend_reads(&d, "/img"), 0, "read before it was refused");
    assert!(dg.window.maps.lock().unwrap().is_empty(), "nothing mapped");
    // A range at 0, then the file's second range half-way over it.
    dg.g.setupmapping(f, 0, 0, RANGE, READ, 0).unwrap();
    let reads = backend_reads(&d, "/img");
    let e =
        dg.g.setupmapping(f, 0, RANGE, RANGE, READ, RANGE / 2)
            .unwrap_err();
    assert_eq!(e.raw_os_error(), einval, "overlapping a live mapping: {e}");
    assert_eq!(
        backend_reads(&d, "/img"),
        reads,
        "the overlapping range was read before it was refused"
    );
    // The same range again is a re-map in place; the second range where it fits maps.
    dg.g.setupmapping(f, 0, 0, RANGE, READ, 0).unwrap();
    dg.g.setupmapping(f, 0, RANGE, RANGE, READ, RANGE).unwrap();
    let want = read_range(&mut dg.g, f, 0, 2 * RANGE);
    let n = want.len() as u64;
    assert!(dg.window.bytes(0, n) == &want[..], "window bytes");
    drop(dg);
    d.kill_and_check();
}
