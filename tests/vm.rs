//! End to end in a real guest: `rafsd virtiofs` serves a QEMU (TCG) guest through vhost-user-fs, with the
//! images mounted through the nydusd-compatible admin API the way Kata does it. The guest's /init
//! (ci/guest/init) hashes every file of two images and reports on the serial console; the host compares each
//! hash with the fixtures' manifest.tsv, then unmounts one image through the API and checks that the guest
//! no longer sees it, that a chunk corrupted in a third image's blob reads as EIO with validation on, and that
//! the passthrough share is writable from the guest.
//!
//! Needs root, QEMU and busybox-static (ci/install-vm-deps.sh) and the guest kernel (ci/guest-kernel.sh);
//! ci/test.sh provides all three. A missing piece fails the test: it is never skipped.

use kit::{daemon, guestvm, manifest};

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guestvm::{die_with_parent, marker_at, Guard, Vm};

const IMAGE_A: (&str, &str) = ("/rafs/a/lowerdir", "v6-zstd-blake3");
const IMAGE_B: (&str, &str) = ("/rafs/b/lowerdir", "v5-lz4-blake3-repeatable");
/// Uncompressed chunks: a flipped byte is caught by the digest alone, not by a decompressor.
const IMAGE_BAD: (&str, &str) = ("/rafs/bad/lowerdir", "v6-none-blake3-4k");
const BAD_FILE: &str = "special/random-2m5";
/// Hard bound on QEMU's life (timeout -k 5 QEMU_LIMIT). The whole run takes about 15 s on an idle machine.
const QEMU_LIMIT: u64 = 240;
const PHASE1_LIMIT: Duration = Duration::from_secs(150);
const PHASE2_LIMIT: Duration = Duration::from_secs(90);

/// Mount RAFS image `case` (its blobs read from `blob_dir`) at `mountpoint` the way Kata does, with
/// validation on.
fn mount_rafs(vm: &Vm, mountpoint: &str, case: &str, blob_dir: &Path) {
    let (status, reply) = vm.mount_image(
        mountpoint,
        "rafs",
        &manifest::case_bootstrap(case),
        blob_dir,
        true,
    );
    if status != 204 {
        vm.fail(format!(
            "POST /api/v1/mount?mountpoint={mountpoint}: status {status}, want 204; reply {reply:?}"
        ));
    }
}

/// Copy `case`'s blobs to `dest` and flip one byte in the middle of every chunk of `file`: the copy then
/// yields wrong data for that file only. Returns how many chunks were damaged.
fn corrupt_copy(case: &str, file: &str, dest: &Path) -> usize {
    let blobs = manifest::case_blob_dir(case);
    std::fs::create_dir_all(dest).unwrap();
    for e in std::fs::read_dir(&blobs).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dest.join(e.file_name())).unwrap();
        std::fs::set_permissions(
            dest.join(e.file_name()),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
    }
    let image = rafsd::RafsImage::open_local(
        &manifest::case_bootstrap(case),
        Some(dest),
        rafsd::ImageOptions::default(),
    )
    .unwrap();
    let mut ino = image.root_ino();
    for part in file.split('/') {
        ino = image
            .lookup(ino, part.as_bytes())
            .unwrap()
            .unwrap_or_else(|| panic!("{case} has no {file}"));
    }
    let chunks = image.file_chunks(ino).unwrap();
    assert!(!chunks.is_empty(), "{case}:{file} has no chunks");
    let blob_names: Vec<PathBuf> = {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dest)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    assert_eq!(blob_names.len(), 1, "{case}: expected one data blob");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&blob_names[0])
        .unwrap();
    for c in &chunks {
        let at = c.compressed_offset + u64::from(c.compressed_size) / 2;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        b[0] ^= 0x5a;
        f.write_all_at(&b, at).unwrap();
    }
    chunks.len()
}

#[test]
#[ignore = "needs root, QEMU: ci/test.sh"]
fn guest_reads_images_mounted_through_the_api() {
    manifest::assert_root("the VM test (vhost-user sockets, QEMU, owner-preserving passthrough)");
    let kernel = guestvm::debian_kernel();
    guestvm::require_tools();
    let tmp = guestvm::work_dir("rafsd-vm.");
    let run = Vm::new(tmp.path());

    // The initramfs is cheap to pack, so it always carries the current ci/guest/init.
    let initrd = run.dir.join("initramfs.cpio");
    guestvm::ci_value(
        "ci/guest-initramfs.sh",
        &[initrd.to_str().unwrap()],
        &[],
        "INITRD",
    );

    let bad_blobs = run.dir.join("bad-blobs");
    let damaged = corrupt_copy(IMAGE_BAD.1, BAD_FILE, &bad_blobs);
    let shared = run.dir.join("containers");
    std::fs::create_dir(&shared).unwrap();

    // The daemon starts empty, as Kata starts it (with Kata's default virtio_fs_extra_args, so its
    // `--thread-pool-size=1` gets the worker pools), with the sandbox's defaults spelled out.
    let mut cmd = daemon::rafsd();
    die_with_parent(&mut cmd, libc::SIGKILL)
        .args([
            "virtiofs",
            "--log-level",
            "info",
            "--seccomp",
            "kill",
            "--sandbox",
            "namespace",
            "--thread-pool-size=1",
            "--announce-submounts",
        ])
        .args(daemon::sandbox_allow_args(&run.dir))
        .arg("--sock")
        .arg(&run.sock)
        .arg("--apisock")
        .arg(&run.api);
    let child = daemon::spawn_ready(&mut cmd, &run.daemon_log, Duration::from_secs(20), || {
        guestvm::api_says_running(&run.api)
    })
    .unwrap_or_else(|e| run.fail(format!("rafsd {e} (GET /api/v1/daemon reports RUNNING)")));
    let mut rafsd = Guard {
        name: "rafsd",
        child: Some(child),
        inner_pidfile: None,
    };
    // Kata starts the VMM once the API says RUNNING, so the vhost-user socket should be there by then. rafsd
    // binds it on its own thread, which can lag: wait (bounded) and say so, rather than fail at random.
    let running_at = Instant::now();
    while !run.sock.exists() {
        if running_at.elapsed() > Duration::from_secs(10) {
            run.fail(format!(
                "no vhost-user socket at {} 10 s after RUNNING",
                run.sock.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if running_at.elapsed() > Duration::from_millis(5) {
        eprintln!(
            "vm: warning: the vhost-user socket appeared {:?} after the API reported RUNNING",
            running_at.elapsed()
        );
    }

    for (mountpoint, case) in [IMAGE_A, IMAGE_B] {
        mount_rafs(&run, mountpoint, case, &manifest::case_blob_dir(case));
    }
    mount_rafs(&run, IMAGE_BAD.0, IMAGE_BAD.1, &bad_blobs);
    run.share("/containers", &shared);

    let append = format!(
        "rafs_images={},{} rafs_unmounted={} rafs_bad={}/{BAD_FILE} rafs_rw=/containers rafs_wait=120",
        IMAGE_A.0, IMAGE_B.0, IMAGE_B.0, IMAGE_BAD.0
    );
    let mut qemu = run.start_qemu(&kernel, &initrd, &append, 512, QEMU_LIMIT);
    eprintln!(
        "vm: rafsd pid {}, QEMU (under timeout) pid {}, work dir {}",
        rafsd.pid(),
        qemu.pid(),
        run.dir.display()
    );

    // Phase 1: the guest hashes every file of both images.
    run.wait_for(
        &format!("PHASE1-DONE {}", run.nonce),
        PHASE1_LIMIT,
        &mut qemu,
        &mut rafsd,
    );
    let phase1 = run.started.elapsed();
    let serial = run.serial_text();
    let manifest_files: BTreeMap<String, String> = manifest::load_manifest()
        .into_iter()
        .filter(|r| r["type"] == "f")
        .map(|r| (r["path"].clone(), r["sha256"].clone()))
        .collect();
    let mut problems = Vec::new();
    for (mountpoint, case) in [IMAGE_A, IMAGE_B] {
        let g = guestvm::parse_hashes(&serial, mountpoint);
        problems.extend(
            guestvm::compare_with_manifest(&g, &manifest_files)
                .into_iter()
                .map(|p| format!("{case} at {mountpoint}: {p}")),
        );
    }
    if !problems.is_empty() {
        run.fail(format!(
            "{} mismatches between the guest's view and manifest.tsv, first: {:#?}",
            problems.len(),
            &problems[..problems.len().min(15)]
        ));
    }

    // Phase 2: unmount image b while the guest runs, then let the guest look.
    run.expect_api(
        "DELETE",
        &format!("/api/v1/mount?mountpoint={}", IMAGE_B.0),
        "",
        204,
    );
    std::fs::write(shared.join("go"), run.nonce.as_bytes()).unwrap();
    run.wait_for(
        &format!("DONE {}", run.nonce),
        PHASE2_LIMIT,
        &mut qemu,
        &mut rafsd,
    );
    let serial = run.serial_text();
    let after = |marker: &str| {
        serial
            .lines()
            .find_map(|l| marker_at(l, marker).map(|i| l[i..].to_string()))
    };
    if after("UNMOUNTED-GONE").is_none() {
        run.fail(format!(
            "{} is still visible in the guest after DELETE: {:?}",
            IMAGE_B.0,
            after("UNMOUNTED-")
        ));
    }
    match after("BADREAD ") {
        Some(l) if l.starts_with("BADREAD EIO") => {}
        other => run.fail(format!("reading {BAD_FILE} with {damaged} corrupted chunks and validation on: want EIO, got {other:?}")),
    }
    let written = std::fs::read_to_string(shared.join("from-guest")).unwrap_or_default();
    if !written.contains(&run.nonce) {
        run.fail(format!(
            "the guest's file is not in the passthrough dir (read {written:?}; guest said {:?})",
            after("WROTE").or(after("WRITE-FAILED"))
        ));
    }

    // The guest powers off by itself; QEMU then exits.
    let qemu_status = daemon::wait_bounded(qemu.child.as_mut().unwrap(), Duration::from_secs(30));
    let total = run.started.elapsed();
    let daemon_alive = rafsd.exited().is_none();
    let rafsd_status = rafsd.stop(Duration::from_secs(10));
    eprintln!(
        "vm: OK: {} files hashed in the guest in {:.1} s (boot included), whole run {:.1} s; QEMU exit {:?}; rafsd alive after the guest left: {daemon_alive}, stop: {:?}",
        2 * manifest_files.len(),
        phase1.as_secs_f64(),
        total.as_secs_f64(),
        qemu_status,
        rafsd_status
    );
    if qemu_status.is_none() {
        run.fail("QEMU did not exit within 30 s of the guest's DONE");
    }
}
