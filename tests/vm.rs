//! End to end in a real guest: `rafsd virtiofs` serves a QEMU (TCG) guest through vhost-user-fs, with the
//! images mounted through the nydusd-compatible admin API the way Kata does it. The guest's /init
//! (ci/guest/init) hashes every file of two images and reports on the serial console; the host compares each
//! hash with the fixtures' manifest.tsv, then unmounts one image through the API and checks that the guest
//! no longer sees it, that a chunk corrupted in a third image's blob reads as EIO with validation on, and that
//! the passthrough share is writable from the guest.
//!
//! Needs root, QEMU and busybox-static (ci/install-vm-deps.sh) and the guest kernel (ci/guest-kernel.sh);
//! ci/test.sh provides all three. A missing piece fails the test: it is never skipped.

mod daemon;
mod manifest;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TAG: &str = "kataShared";
const IMAGE_A: (&str, &str) = ("/rafs/a/lowerdir", "v6-zstd-blake3");
const IMAGE_B: (&str, &str) = ("/rafs/b/lowerdir", "v5-lz4-blake3-repeatable");
/// Uncompressed chunks: a flipped byte is caught by the digest alone, not by a decompressor.
const IMAGE_BAD: (&str, &str) = ("/rafs/bad/lowerdir", "v6-none-blake3-4k");
const BAD_FILE: &str = "special/random-2m5";
/// Hard bound on QEMU's life (timeout -k 5 QEMU_LIMIT). The whole run takes about 15 s on an idle machine.
const QEMU_LIMIT: u64 = 240;
const PHASE1_LIMIT: Duration = Duration::from_secs(150);
const PHASE2_LIMIT: Duration = Duration::from_secs(90);

/// A process we started, killed by pid (and reaped) when dropped: also when the test panics.
struct Guard {
    name: &'static str,
    child: Option<Child>,
    /// QEMU's own pid (from -pidfile): `timeout` would not pass on a SIGKILL to it.
    inner_pidfile: Option<PathBuf>,
}

impl Guard {
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, up to `grace` for an exit, then SIGKILL.
    fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Some(pidfile) = &self.inner_pidfile {
            let pid = std::fs::read_to_string(pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            // Only while it is still the child of our `timeout` (a reaped pid may have been reused).
            if let (Some(pid), Some(parent)) = (pid, self.child.as_ref().map(|c| c.id())) {
                if parent_of(pid) == Some(parent) {
                    // SAFETY: signalling the QEMU process this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = daemon::wait_bounded(&mut child, grace);
        if status.is_none() {
            eprintln!(
                "vm: {} (pid {}) ignored SIGTERM for {grace:?}; SIGKILL",
                self.name,
                child.id()
            );
            let _ = child.kill();
            return child.wait().ok();
        }
        status
    }
}

/// The parent pid of `pid`, from /proc/PID/stat (the field after the parenthesised command name).
fn parent_of(pid: i32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Have the kernel send `sig` to the child if the test dies without running its guards (SIGKILL, abort).
fn die_with_parent(cmd: &mut Command, sig: libc::c_int) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Everything a failure message needs.
struct Run {
    dir: PathBuf,
    api: PathBuf,
    serial: PathBuf,
    daemon_log: PathBuf,
    nonce: String,
    started: Instant,
}

impl Run {
    fn serial_text(&self) -> String {
        let raw = std::fs::read(&self.serial).unwrap_or_default();
        String::from_utf8_lossy(&raw).replace('\r', "")
    }

    fn logs(&self) -> String {
        let serial = self.serial_text();
        let tail: Vec<&str> = serial.lines().rev().take(40).collect();
        let daemon = std::fs::read_to_string(&self.daemon_log).unwrap_or_default();
        let dtail: Vec<&str> = daemon.lines().rev().take(60).collect();
        format!(
            "\n--- serial log tail ({}) ---\n{}\n--- rafsd log tail ({}) ---\n{}\n--- {:.1} s into the run",
            self.serial.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            self.daemon_log.display(),
            dtail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            self.started.elapsed().as_secs_f64()
        )
    }

    fn fail(&self, what: impl std::fmt::Display) -> ! {
        panic!("vm: {what}{}", self.logs())
    }

    /// One HTTP/1.1 request on the admin socket; (status, body).
    fn api(&self, method: &str, target: &str, body: &str) -> (u16, String) {
        daemon::api_request(&self.api, method, target, body, Duration::from_secs(30))
            .unwrap_or_else(|e| {
                self.fail(format!("{method} {target} on {}: {e}", self.api.display()))
            })
    }

    fn expect_api(&self, method: &str, target: &str, body: &str, want: u16) {
        let (status, reply) = self.api(method, target, body);
        if status != want {
            self.fail(format!(
                "{method} {target}: status {status}, want {want}; reply {reply:?}"
            ));
        }
    }

    /// Poll the serial log until `marker` (never anchored: the console adds escape codes) shows up.
    fn wait_for(&self, marker: &str, limit: Duration, qemu: &mut Guard, rafsd: &mut Guard) {
        let deadline = Instant::now() + limit;
        loop {
            if has_marker(&self.serial_text(), marker) {
                return;
            }
            if let Some(status) = rafsd.exited() {
                self.fail(format!(
                    "rafsd exited ({status}) while waiting for {marker:?}"
                ));
            }
            if let Some(status) = qemu.exited() {
                // One last look: the marker may have been written just before QEMU ended.
                if has_marker(&self.serial_text(), marker) {
                    return;
                }
                self.fail(format!(
                    "QEMU exited ({status}) before the guest printed {marker:?}"
                ));
            }
            if Instant::now() > deadline {
                self.fail(format!("no {marker:?} in the serial log within {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// `marker` as a word of its own anywhere in `text` (so "DONE x" does not match "PHASE1-DONE x").
fn has_marker(text: &str, marker: &str) -> bool {
    marker_at(text, marker).is_some()
}

fn marker_at(text: &str, marker: &str) -> Option<usize> {
    text.match_indices(marker)
        .map(|(i, _)| i)
        .find(|&i| !text[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '-'))
}

/// `KERNEL=...` from ci/guest-kernel.sh's cache.
fn guest_kernel(root: &Path) -> PathBuf {
    let dir = std::env::var_os("RAFSD_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/guest"));
    let env = dir.join("kernel.env");
    let text = std::fs::read_to_string(&env).unwrap_or_else(|e| {
        panic!("vm: no guest kernel ({}: {e}); run ci/guest-kernel.sh (ci/test.sh does) or set RAFSD_GUEST_DIR", env.display())
    });
    let kernel = text
        .lines()
        .find_map(|l| l.strip_prefix("KERNEL="))
        .map(PathBuf::from);
    match kernel {
        Some(k) if k.is_file() => k,
        _ => panic!(
            "vm: {} names no existing KERNEL; rerun ci/guest-kernel.sh",
            env.display()
        ),
    }
}

fn nonce() -> String {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The request body Kata sends for a RAFS mount (config is the nydusd v1 config as a string).
fn rafs_mount_body(bootstrap: &Path, blob_dir: &Path, cache: &Path, validate: bool) -> String {
    let config = daemon::v1_config(blob_dir, cache, validate, "");
    serde_json::json!({"source": bootstrap, "fs_type": "rafs", "config": config}).to_string()
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

/// `HASH <image> <sha256> <path>` lines of one image (the path is last and may hold spaces), plus the
/// LIST count and any HASHERR lines.
struct GuestImage {
    hashes: BTreeMap<String, String>,
    duplicates: Vec<String>,
    errors: Vec<String>,
    listed: Option<i64>,
}

fn parse_guest(serial: &str, image: &str) -> GuestImage {
    let mut g = GuestImage {
        hashes: BTreeMap::new(),
        duplicates: Vec::new(),
        errors: Vec::new(),
        listed: None,
    };
    let hash_tag = format!("HASH {image} ");
    let err_tag = format!("HASHERR {image} ");
    let list_tag = format!("LIST {image} ");
    for line in serial.lines() {
        if let Some(i) = line.find(&hash_tag) {
            let rest = &line[i + hash_tag.len()..];
            if let Some((sha, path)) = rest.split_once(' ') {
                if g.hashes.insert(path.to_string(), sha.to_string()).is_some() {
                    g.duplicates.push(path.to_string());
                }
            } else {
                g.errors.push(format!("malformed: {line}"));
            }
        } else if let Some(i) = line.find(&err_tag) {
            g.errors.push(line[i + err_tag.len()..].to_string());
        } else if let Some(i) = line.find(&list_tag) {
            g.listed = line[i + list_tag.len()..]
                .split(' ')
                .next()
                .and_then(|n| n.parse().ok());
        }
    }
    g
}

/// Every regular file of the manifest, with the right sha256, and nothing else.
fn compare_with_manifest(g: &GuestImage, want: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems = Vec::new();
    for (path, sha) in want {
        match g.hashes.get(path) {
            None => problems.push(format!("{path}: missing")),
            Some(got) if got != sha => problems.push(format!("{path}: sha256 {got}, want {sha}")),
            Some(_) => {}
        }
    }
    for path in g.hashes.keys().filter(|p| !want.contains_key(*p)) {
        problems.push(format!("{path}: not in the manifest"));
    }
    problems.extend(g.duplicates.iter().map(|p| format!("{p}: listed twice")));
    problems.extend(g.errors.iter().map(|e| format!("guest error: {e}")));
    if g.listed != Some(want.len() as i64) {
        problems.push(format!("LIST count {:?}, want {}", g.listed, want.len()));
    }
    problems
}

#[test]
fn guest_reads_images_mounted_through_the_api() {
    manifest::assert_root("the VM test (vhost-user sockets, QEMU, owner-preserving passthrough)");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kernel = guest_kernel(root);
    for tool in ["qemu-system-x86_64", "timeout"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "vm: {tool} is missing; run ci/install-vm-deps.sh (ci/test.sh does)"
        );
    }
    let mut tmp = tempfile::Builder::new()
        .prefix("rafsd-vm.")
        .tempdir()
        .unwrap();
    // RAFSD_VM_KEEP=1 keeps the work dir (serial log, daemon log, sockets) for a look afterwards.
    tmp.disable_cleanup(std::env::var_os("RAFSD_VM_KEEP").is_some());
    let dir = tmp.path().to_path_buf();
    let run = Run {
        api: dir.join("api.sock"),
        serial: dir.join("serial.log"),
        daemon_log: dir.join("rafsd.log"),
        nonce: nonce(),
        started: Instant::now(),
        dir,
    };

    // The initramfs is cheap to pack, so it always carries the current ci/guest/init.
    let initrd = run.dir.join("initramfs.cpio");
    let out = Command::new(root.join("ci/guest-initramfs.sh"))
        .arg(&initrd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vm: ci/guest-initramfs.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let bad_blobs = run.dir.join("bad-blobs");
    let damaged = corrupt_copy(IMAGE_BAD.1, BAD_FILE, &bad_blobs);
    let shared = run.dir.join("containers");
    std::fs::create_dir(&shared).unwrap();

    // The daemon starts empty, as Kata starts it.
    let sock = run.dir.join("vhost-fs.sock");
    let child = die_with_parent(
        &mut Command::new(env!("CARGO_BIN_EXE_rafsd")),
        libc::SIGKILL,
    )
    .args([
        "virtiofs",
        "--log-level",
        "info",
        "--seccomp",
        "kill",
        "--sandbox",
        "namespace",
    ])
    .args(daemon::sandbox_allow_args(&run.dir))
    .arg("--sock")
    .arg(&sock)
    .arg("--apisock")
    .arg(&run.api)
    .stdin(Stdio::null())
    .stdout(std::fs::File::create(&run.daemon_log).unwrap())
    .stderr(
        std::fs::OpenOptions::new()
            .append(true)
            .open(&run.daemon_log)
            .unwrap(),
    )
    .spawn()
    .expect("spawn rafsd virtiofs");
    let mut rafsd = Guard {
        name: "rafsd",
        child: Some(child),
        inner_pidfile: None,
    };

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = rafsd.exited() {
            run.fail(format!("rafsd exited ({status}) at start-up"));
        }
        if UnixStream::connect(&run.api).is_ok() {
            let (status, body) = run.api("GET", "/api/v1/daemon", "");
            if status == 200 && body.contains("\"RUNNING\"") {
                break;
            }
        }
        if Instant::now() > deadline {
            run.fail("GET /api/v1/daemon never reported RUNNING within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Kata starts the VMM once the API says RUNNING, so the vhost-user socket should be there by then. rafsd
    // binds it on its own thread, which can lag: wait (bounded) and say so, rather than fail at random.
    let running_at = Instant::now();
    while !sock.exists() {
        if running_at.elapsed() > Duration::from_secs(10) {
            run.fail(format!(
                "no vhost-user socket at {} 10 s after RUNNING",
                sock.display()
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

    for (i, (mountpoint, case)) in [IMAGE_A, IMAGE_B].into_iter().enumerate() {
        let body = rafs_mount_body(
            &manifest::case_bootstrap(case),
            &manifest::case_blob_dir(case),
            &run.dir.join(format!("cache-{i}")),
            true,
        );
        run.expect_api(
            "POST",
            &format!("/api/v1/mount?mountpoint={mountpoint}"),
            &body,
            204,
        );
    }
    let body = rafs_mount_body(
        &manifest::case_bootstrap(IMAGE_BAD.1),
        &bad_blobs,
        &run.dir.join("cache-bad"),
        true,
    );
    run.expect_api(
        "POST",
        &format!("/api/v1/mount?mountpoint={}", IMAGE_BAD.0),
        &body,
        204,
    );
    let body = serde_json::json!({"source": shared, "fs_type": "passthrough_fs", "config": ""})
        .to_string();
    run.expect_api("POST", "/api/v1/mount?mountpoint=/containers", &body, 204);

    let append = format!(
        "console=ttyS0 panic=-1 loglevel=4 rafs_tag={TAG} rafs_nonce={} rafs_images={},{} rafs_unmounted={} rafs_bad={}/{BAD_FILE} rafs_rw=/containers rafs_wait=120",
        run.nonce, IMAGE_A.0, IMAGE_B.0, IMAGE_B.0, IMAGE_BAD.0
    );
    let pidfile = run.dir.join("qemu.pid");
    // SIGTERM for `timeout`: it passes that on to QEMU.
    let child = die_with_parent(&mut Command::new("timeout"), libc::SIGTERM)
        .args(["-k", "5", &QEMU_LIMIT.to_string(), "qemu-system-x86_64"])
        .args([
            "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "512M",
        ])
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-numa",
            "node,memdev=mem",
        ])
        .arg("-chardev")
        .arg(format!("socket,id=char0,path={}", sock.display()))
        .arg("-device")
        .arg(format!("vhost-user-fs-pci,chardev=char0,tag={TAG}"))
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", &append])
        .args([
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
            "-monitor",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", run.serial.display()))
        .arg("-pidfile")
        .arg(&pidfile)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(run.dir.join("qemu.log")).unwrap())
        .stderr(
            std::fs::OpenOptions::new()
                .append(true)
                .open(run.dir.join("qemu.log"))
                .unwrap(),
        )
        .spawn()
        .expect("spawn timeout qemu-system-x86_64");
    let mut qemu = Guard {
        name: "qemu",
        child: Some(child),
        inner_pidfile: Some(pidfile),
    };
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
        let g = parse_guest(&serial, mountpoint);
        problems.extend(
            compare_with_manifest(&g, &manifest_files)
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
