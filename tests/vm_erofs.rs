//! The in-guest EROFS helper in a real guest (QEMU TCG, Debian's 6.12 kernel): `rafsd virtiofs` serves
//! the blob view of RAFS v6 images (`fs_type` `"blob_view"`: bootstrap plus uncompressed blobs, read
//! lazily through the verified read path) and `rafs-guest mount` in the guest mounts them with the guest
//! kernel's EROFS driver, file-backed and through loop devices. The guest hashes every file; the host
//! compares with manifest.tsv. Then the errors: a bootstrap that is not EROFS, one the kernel refuses, a
//! missing and a truncated blob, and a blob whose chunks fail verification on the host. Each gives a
//! clear message (or EIO for the damaged data) in the guest, and the daemon keeps serving.
//!
//! Needs root, QEMU, busybox-static (ci/install-vm-deps.sh), the guest kernel (ci/guest-kernel.sh) and a
//! Rust target for the static helper (ci/guest-helper.sh); never skipped.

use kit::{daemon, guestvm, manifest};

use std::collections::BTreeMap;
use std::time::Duration;

use guestvm::{compare_with_manifest, parse_hashes, Vm, HASH_TREE_SH};

/// File-backed mount (zstd chunks, blake3).
const IMAGE_A: &str = "v6-zstd-blake3";
/// Loop-device mount (lz4 chunks, sha256, 64 KiB chunks).
const IMAGE_B: &str = "v6-lz4-sha256-64k";
/// Uncompressed chunks: a flipped byte is caught by the digest (validation on), not by a decompressor.
const IMAGE_BAD: &str = "v6-none-blake3-4k";
const BAD_FILE: &str = "special/random-2m5";
const QEMU_LIMIT: u64 = 300;

fn blob_ids(case: &str) -> Vec<(String, u64)> {
    let image = rafsd::RafsImage::open_local(
        &manifest::case_bootstrap(case),
        Some(&manifest::case_blob_dir(case)),
        rafsd::ImageOptions::default(),
    )
    .unwrap();
    image
        .info()
        .blobs
        .iter()
        .map(|b| (b.id.clone(), b.uncompressed_size))
        .collect()
}

/// The guest's script: mount, hash, then every error case, each reported on one line.
fn guest_script(nonce: &str) -> String {
    let badread = guestvm::badread_sh(&format!("/e/bad/{BAD_FILE}"));
    format!(
        r#"N={nonce}
G=/mnt/containers/rafs-guest
{HASH_TREE_SH}
mkdir -p /e/a /e/b /e/bad /e/x
try() {{
    name=$1
    shift
    if $G mount "$@" >/tmp/out 2>&1; then
        echo "MOUNT-OK $N $name"
    else
        echo "MOUNT-ERR $N $name rc=$? $(tr '\n' ' ' </tmp/out)"
    fi
}}
try a --bootstrap /mnt/rafs/a/blobs/bootstrap --blob-dir /mnt/rafs/a/blobs /e/a
hash_tree /e/a /erofs/a
try b --loop --bootstrap /mnt/rafs/b/blobs/bootstrap --blob-dir /mnt/rafs/b/blobs /e/b
hash_tree /e/b /erofs/b
grep ' erofs ' /proc/mounts | sed "s|^|EROFS-MOUNT $N |"
try not-erofs --bootstrap /mnt/containers/not-erofs --blob-dir /mnt/rafs/a/blobs /e/x
try bad-incompat --bootstrap /mnt/containers/bad-incompat --blob-dir /mnt/rafs/a/blobs /e/x
try no-blob --bootstrap /mnt/rafs/a/blobs/bootstrap --blob-dir /mnt/containers/noblobs /e/x
try short-blob --bootstrap /mnt/rafs/a/blobs/bootstrap --blob-dir /mnt/containers/shortblobs /e/x
try bad --bootstrap /mnt/rafs/bad/blobs/bootstrap --blob-dir /mnt/rafs/bad/blobs /e/bad
{badread}
sha256sum /e/a/{BAD_FILE} | sed "s|^|AFTER $N erofs |"
sha256sum /mnt/rafs/a/lowerdir/{BAD_FILE} | sed "s|^|AFTER $N fuse |"
umount /e/a && umount /e/b && umount /e/bad && echo "UMOUNTED $N"
"#
    )
}

#[test]
#[ignore = "needs root, QEMU: ci/test.sh"]
fn guest_mounts_blob_views_with_its_erofs_driver() {
    manifest::assert_root("the in-guest EROFS test (QEMU, vhost-user, mount in the guest)");
    guestvm::require_tools();
    let kernel = guestvm::debian_kernel();
    let tmp = guestvm::work_dir("rafsd-vm-erofs.");
    let vm = Vm::new(tmp.path());
    let (helper, initrd) = guestvm::guest_files(&vm.dir, "erofs loop");

    // The passthrough share: the helper, the script, and the bad inputs.
    let shared = vm.helper_share(&helper, "erofs.sh", &guest_script(&vm.nonce));
    std::fs::copy(
        manifest::case_bootstrap("v5-zstd-sha256-128k"),
        shared.join("not-erofs"),
    )
    .unwrap();
    // An EROFS incompat feature bit no kernel knows: the guest's parser passes it, the kernel refuses it.
    let mut bad = std::fs::read(manifest::case_bootstrap(IMAGE_A)).unwrap();
    bad[1024 + 83] |= 0x80;
    std::fs::write(shared.join("bad-incompat"), bad).unwrap();
    std::fs::create_dir(shared.join("noblobs")).unwrap();
    std::fs::create_dir(shared.join("shortblobs")).unwrap();
    for (id, _) in blob_ids(IMAGE_A) {
        std::fs::write(shared.join("shortblobs").join(id), vec![0u8; 4096]).unwrap();
    }
    let bad_blobs = vm.dir.join("bad-blobs");
    let damaged = guestvm::corrupt_copy(IMAGE_BAD, BAD_FILE, &bad_blobs);

    let mut rafsd = vm.start_rafsd(&[]);
    let fixture = |case: &str| {
        (
            manifest::case_bootstrap(case),
            manifest::case_blob_dir(case),
        )
    };
    let (a_boot, a_blobs) = fixture(IMAGE_A);
    let (b_boot, b_blobs) = fixture(IMAGE_B);
    for (mp, fs_type, boot, blobs) in [
        ("/rafs/a/lowerdir", "rafs", &a_boot, &a_blobs),
        ("/rafs/a/blobs", "blob_view", &a_boot, &a_blobs),
        ("/rafs/b/blobs", "blob_view", &b_boot, &b_blobs),
        (
            "/rafs/bad/blobs",
            "blob_view",
            &manifest::case_bootstrap(IMAGE_BAD),
            &bad_blobs,
        ),
    ] {
        let (status, reply) = vm.mount_image(mp, fs_type, boot, blobs, true);
        if status != 204 {
            vm.fail(format!("mount {fs_type} at {mp}: {status} {reply}"));
        }
    }
    // Images the kernel cannot take are refused by the API as unsupported (501), saying why.
    for (case, want) in [
        ("v5-lz4-blake3-repeatable", "v5"),
        ("v6-inline-meta", "separate bootstrap"),
    ] {
        let (boot, blobs) = fixture(case);
        let (status, reply) = vm.mount_image("/rafs/refused", "blob_view", &boot, &blobs, true);
        if status != 501 || !reply.contains(want) {
            vm.fail(format!(
                "blob_view of {case}: want 501 naming {want:?}, got {status} {reply}"
            ));
        }
    }
    vm.share("/containers", &shared);

    let mut qemu = vm.start_qemu(
        &kernel,
        &initrd,
        "rafs_run=/containers/erofs.sh",
        512,
        QEMU_LIMIT,
    );
    eprintln!(
        "vm_erofs: rafsd pid {}, QEMU pid {}, work dir {}",
        rafsd.pid(),
        qemu.pid(),
        vm.dir.display()
    );
    vm.wait_for(
        &format!("DONE {}", vm.nonce),
        Duration::from_secs(QEMU_LIMIT - 20),
        &mut qemu,
        &mut rafsd,
    );
    let serial = vm.serial_text();
    let n = &vm.nonce;
    let line = |marker: &str| vm.line(&format!("{marker} {n} "));
    let seen = |words: &str| guestvm::marker_at(&serial, &format!("{words}\n")).is_some();

    let manifest_files: BTreeMap<String, String> = manifest::load_manifest()
        .into_iter()
        .filter(|r| r["type"] == "f")
        .map(|r| (r["path"].clone(), r["sha256"].clone()))
        .collect();
    for (name, image) in [("a", "/erofs/a"), ("b", "/erofs/b")] {
        if !seen(&format!("MOUNT-OK {n} {name}")) {
            vm.fail(format!(
                "rafs-guest mount of {name} failed: {:?}",
                line("MOUNT-ERR")
            ));
        }
        let problems = compare_with_manifest(&parse_hashes(&serial, image), &manifest_files);
        if !problems.is_empty() {
            vm.fail(format!(
                "{image}: {} mismatches with manifest.tsv, first: {:#?}",
                problems.len(),
                &problems[..problems.len().min(15)]
            ));
        }
    }
    // One mount file-backed (the bootstrap itself is the source), one through loop devices.
    let mounts: Vec<String> = serial
        .lines()
        .filter_map(|l| guestvm::marker_at(l, "EROFS-MOUNT ").map(|i| l[i..].to_string()))
        .collect();
    let has = |src: &str, dir: &str| mounts.iter().any(|m| m.contains(src) && m.contains(dir));
    if !has("/mnt/rafs/a/blobs/bootstrap", "/e/a") || !has("/dev/loop", "/e/b") {
        vm.fail(format!(
            "expected a file-backed /e/a and a loop /e/b, /proc/mounts says {mounts:#?}"
        ));
    }

    let mount_err = |name: &str| -> String {
        let tag = format!("MOUNT-ERR {n} {name} ");
        serial
            .lines()
            .find_map(|l| guestvm::marker_at(l, &tag).map(|i| l[i + tag.len()..].to_string()))
            .unwrap_or_else(|| vm.fail(format!("no MOUNT-ERR for {name}")))
    };
    let (a_id, a_size) = blob_ids(IMAGE_A).remove(0);
    for (name, wants) in [
        ("not-erofs", vec!["rc=1", "not an EROFS", "RAFS v5"]),
        ("bad-incompat", vec!["rc=1", "Invalid argument", "refused"]),
        ("no-blob", vec!["rc=1", a_id.as_str(), "No such file"]),
        (
            "short-blob",
            vec![
                "rc=1",
                a_id.as_str(),
                "is 4096 bytes, the bootstrap addresses",
            ],
        ),
    ] {
        let got = mount_err(name);
        if let Some(w) = wants.iter().find(|w| !got.contains(**w)) {
            vm.fail(format!("{name}: the guest's error lacks {w:?}: {got}"));
        }
        eprintln!("vm_erofs: {name}: {got}");
    }
    assert!(a_size > 4096, "{IMAGE_A}'s blob is larger than one block");
    if !seen(&format!("MOUNT-OK {n} bad")) {
        vm.fail(format!(
            "the damaged image should mount (its bootstrap is fine): {:?}",
            mount_err("bad")
        ));
    }
    match line("BADREAD") {
        Some(l) if l.contains("EIO") => {}
        other => vm.fail(format!(
            "reading {BAD_FILE} with {damaged} damaged chunks through EROFS: want EIO, got {other:?}"
        )),
    }
    let want = &manifest_files[BAD_FILE];
    for path in ["erofs", "fuse"] {
        match vm.line(&format!("AFTER {n} {path} ")) {
            Some(l) if l.contains(want.as_str()) => {}
            other => vm.fail(format!(
                "after the errors, {BAD_FILE} of {IMAGE_A} through {path}: want {want}, got {other:?}"
            )),
        }
    }
    if !seen(&format!("UMOUNTED {n}")) {
        vm.fail("the guest could not unmount its EROFS mounts");
    }
    // The host side of the damaged read: the daemon logged the verification failure and is still up.
    let log = vm.daemon_text();
    if !log.contains("blob view: read blob") || !log.contains("digest") {
        vm.fail("rafsd did not log the blob view's verification failure");
    }
    if rafsd.exited().is_some() {
        vm.fail("rafsd exited during the guest's run");
    }
    vm.expect_api("GET", "/api/v1/daemon", "", 200);
    let qemu_status = daemon::wait_bounded(qemu.child.as_mut().unwrap(), Duration::from_secs(30));
    eprintln!(
        "vm_erofs: OK in {:.1} s: 2 × {} files through rafs-guest mount; QEMU exit {qemu_status:?}",
        vm.started.elapsed().as_secs_f64(),
        manifest_files.len()
    );
}
