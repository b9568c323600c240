//! EROFS over fscache in a real guest: a kernel built by ci/fscache-kernel.sh (Debian's 6.12 source with
//! CONFIG_EROFS_FS_ONDEMAND and CONFIG_CACHEFILES_ONDEMAND, which Debian's own kernels lack) runs
//! `rafs-guest fscache`, the on-demand daemon, over rafsd's blob view of a RAFS v6 image. The kernel asks
//! the daemon for every bootstrap and blob range it lacks (OPEN/READ/CLOSE on /dev/cachefiles); the guest
//! hashes every file and the host compares with manifest.tsv. A damaged blob read through the same path
//! must fail with EIO while the daemons stay up.
//!
//! Needs the kernel from ci/fscache-kernel.sh (about 4 minutes of compiling on 2 cores; cached in
//! target/fscache-kernel, `RAFSD_FSCACHE_KERNEL_DIR`), plus what tests/vm_erofs.rs needs.

use kit::{daemon, guestvm, manifest};

use std::collections::BTreeMap;
use std::time::Duration;

use guestvm::{compare_with_manifest, parse_hashes, Vm, HASH_TREE_SH};

const IMAGE: &str = "v6-zstd-batch";
/// Uncompressed chunks with a flipped byte each: caught by the digest on the host.
const IMAGE_BAD: &str = "v6-none-blake3-4k";
const BAD_FILE: &str = "special/random-2m5";
const QEMU_LIMIT: u64 = 300;

fn guest_script(nonce: &str) -> String {
    let badread = guestvm::badread_sh(&format!("/e/bad/{BAD_FILE}"));
    format!(
        r#"N={nonce}
G=/mnt/containers/rafs-guest
{HASH_TREE_SH}
grep -q '^nodev.*erofs' /proc/filesystems && echo "EROFS-BUILTIN $N"
# cachefiles needs a cache filesystem with user xattrs, sync_fs and real SEEK_HOLE (it asks for what is
# missing by looking for holes): ext4, made by the host, on a loop device.
mkdir -p /fscache
loopdev=$(losetup -f)
losetup "$loopdev" /mnt/containers/cache.ext4
mount -t ext4 "$loopdev" /fscache || echo "CACHE-MOUNT-FAILED $N"
# start_daemon NAME FSID: serve /mnt/rafs/NAME/blobs and mount it at /e/NAME; sets $daemon.
start_daemon() {{
    mkdir -p /e/$1
    $G fscache --dir /fscache --bootstrap /mnt/rafs/$1/blobs/bootstrap --blob-dir /mnt/rafs/$1/blobs \
        --fsid $2 --mount /e/$1 >/tmp/fscache-$1.log 2>&1 &
    daemon=$!
    i=0
    while ! grep -q " /e/$1 erofs " /proc/mounts; do
        i=$((i + 1))
        if [ $i -gt 120 ] || ! kill -0 $daemon 2>/dev/null; then
            echo "FSCACHE-MOUNT-FAILED $N $1 $(tr '\n' ' ' </tmp/fscache-$1.log)"
            dmesg | tail -n 25 | sed "s|^|DMESG $N |"
            break
        fi
        sleep 0.5
    done
    grep " /e/$1 " /proc/mounts | sed "s|^|FSCACHE-MOUNT $N |"
}}
start_daemon a rafs-a
hash_tree /e/a /fscache/a
umount /e/a && echo "UMOUNTED $N"
kill -0 $daemon && echo "DAEMON-ALIVE $N"
kill $daemon
wait $daemon
# cachefiles links its objects into the cache tree when they are let go.
echo "CACHE-FILES $N $(find /fscache/cache -type f | wc -l)"
sed "s|^|FSCACHE-LOG $N |" /tmp/fscache-a.log | head -n 20
# A blob whose chunks fail verification on the host: EIO in the guest, both daemons stay up.
start_daemon bad rafs-bad
{badread}
kill -0 $daemon && echo "BAD-DAEMON-ALIVE $N"
umount /e/bad
kill $daemon
"#
    )
}

#[test]
#[ignore = "needs root, QEMU, the fscache kernel: ci/test.sh"]
fn guest_reads_an_image_through_erofs_over_fscache() {
    manifest::assert_root("the EROFS-over-fscache guest test");
    guestvm::require_tools();
    let kernel = guestvm::kernel_from_env(
        "RAFSD_FSCACHE_KERNEL_DIR",
        "target/fscache-kernel",
        "ci/fscache-kernel.sh",
    );
    let tmp = guestvm::work_dir("rafsd-vm-fscache.");
    let vm = Vm::new(tmp.path());
    // Everything is built into this kernel: no modules.
    let (helper, initrd) = guestvm::guest_files(&vm.dir, "");
    let shared = vm.helper_share(&helper, "fscache.sh", &guest_script(&vm.nonce));
    // The guest's cache filesystem (busybox cannot make ext4): e2fsprogs is part of every Debian install.
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096"])
        .arg(shared.join("cache.ext4"))
        .arg("96M")
        .output()
        .expect("run mkfs.ext4 (e2fsprogs)");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut rafsd = vm.start_rafsd(&[]);
    let (status, reply) = vm.mount_image(
        "/rafs/a/blobs",
        "blob_view",
        &manifest::case_bootstrap(IMAGE),
        &manifest::case_blob_dir(IMAGE),
        true,
    );
    if status != 204 {
        vm.fail(format!("mount blob_view: {status} {reply}"));
    }
    let bad_blobs = vm.dir.join("bad-blobs");
    guestvm::corrupt_copy(IMAGE_BAD, BAD_FILE, &bad_blobs);
    let (status, reply) = vm.mount_image(
        "/rafs/bad/blobs",
        "blob_view",
        &manifest::case_bootstrap(IMAGE_BAD),
        &bad_blobs,
        true,
    );
    if status != 204 {
        vm.fail(format!("mount the damaged blob_view: {status} {reply}"));
    }
    vm.share("/containers", &shared);
    let mut qemu = vm.start_qemu(
        &kernel,
        &initrd,
        "rafs_run=/containers/fscache.sh",
        512,
        QEMU_LIMIT,
    );
    vm.wait_for(
        &format!("DONE {}", vm.nonce),
        Duration::from_secs(QEMU_LIMIT - 20),
        &mut qemu,
        &mut rafsd,
    );
    let serial = vm.serial_text();
    let n = &vm.nonce;
    let seen = |words: &str| guestvm::marker_at(&serial, &format!("{words}\n")).is_some();
    if let Some(l) = vm.line(&format!("FSCACHE-MOUNT-FAILED {n} ")) {
        // Either mount: the damaged image's bootstrap is intact, so it must mount too.
        vm.fail(format!("the fscache mount did not come up: {l}"));
    }
    match vm.line(&format!("FSCACHE-MOUNT {n} ")) {
        Some(l) if l.contains("/e/a erofs") && l.contains("fsid=rafs-a") => {}
        other => vm.fail(format!(
            "want an fscache-backed EROFS mount at /e/a, /proc/mounts: {other:?}"
        )),
    }
    let manifest_files: BTreeMap<String, String> = manifest::load_manifest()
        .into_iter()
        .filter(|r| r["type"] == "f")
        .map(|r| (r["path"].clone(), r["sha256"].clone()))
        .collect();
    let problems = compare_with_manifest(&parse_hashes(&serial, "/fscache/a"), &manifest_files);
    if !problems.is_empty() {
        vm.fail(format!(
            "{} mismatches with manifest.tsv, first: {:#?}",
            problems.len(),
            &problems[..problems.len().min(15)]
        ));
    }
    // The kernel kept what it fetched as cache files under the cachefiles directory.
    let cached: u64 = vm
        .line(&format!("CACHE-FILES {n} "))
        .and_then(|l| l.split(' ').nth(2).and_then(|c| c.trim().parse().ok()))
        .unwrap_or(0);
    if cached < 2 {
        vm.fail(format!(
            "want the bootstrap and the blob as cache files, found {cached}"
        ));
    }
    match vm.line(&format!("BADREAD {n} ")) {
        Some(l) if l.contains("EIO") => {}
        other => vm.fail(format!(
            "reading {BAD_FILE} of the damaged image over fscache: want EIO, got {other:?}"
        )),
    }
    for marker in ["UMOUNTED", "DAEMON-ALIVE", "BAD-DAEMON-ALIVE"] {
        if !seen(&format!("{marker} {n}")) {
            vm.fail(format!("no {marker} from the guest"));
        }
    }
    if rafsd.exited().is_some() {
        vm.fail("rafsd exited during the guest's run");
    }
    let qemu_status = daemon::wait_bounded(qemu.child.as_mut().unwrap(), Duration::from_secs(30));
    eprintln!(
        "vm_fscache: OK in {:.1} s: {} files through EROFS over fscache; QEMU exit {qemu_status:?}",
        vm.started.elapsed().as_secs_f64(),
        manifest_files.len()
    );
}
