//! Live upgrade and crash restart of `rafsd virtiofs` under a running QEMU (TCG) guest, which reads
//! and hashes files of two RAFS images in a loop (ci/guest/init's `rafs_loop`, caches dropped each
//! round so every round goes to the daemon): a new process takes the device over (`rafsd virtiofs
//! --upgrade-from API`, which asks `PUT /api/v1/daemon/upgrade` of the running one), or the serving
//! process is killed and the sandbox's keeper starts another one that carries on.
//!
//! The upgrades alternate between this build and a second build of the same sources with another version
//! string; the refusal test upgrades to a build whose state format is one version ahead. Both come from
//! ci/upgrade-builds.sh (target/upgrade-builds/).
//!
//! Needs root, QEMU and busybox-static (ci/install-vm-deps.sh), the guest kernel (ci/guest-kernel.sh) and
//! the second builds (ci/upgrade-builds.sh); ci/test.sh provides all of them. A missing piece fails the
//! test: it is never skipped.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kit::{daemon, frontend, guestvm, manifest};

use guestvm::{die_with_parent, Guard, Vm};

const IMAGE_A: (&str, &str) = ("/rafs/a/lowerdir", "v6-zstd-blake3");
const IMAGE_B: (&str, &str) = ("/rafs/b/lowerdir", "v5-lz4-blake3-repeatable");
const QEMU_LIMIT: u64 = 600;
const UPGRADES: usize = 10;

/// A binary of ci/upgrade-builds.sh.
fn second_build(name: &str) -> PathBuf {
    let bin = guestvm::root().join("target/upgrade-builds").join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run ci/upgrade-builds.sh (ci/test.sh does)",
        bin.display()
    );
    bin
}

/// `package_ver` of the daemon answering at `api`.
fn package_version(api: &Path) -> String {
    let (_, body) =
        daemon::api_request(api, "GET", "/api/v1/daemon", "", Duration::from_secs(10)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["version"]["package_ver"].as_str().unwrap().to_string()
}

fn mount_rafs(vm: &Vm, (mountpoint, case): (&str, &str)) {
    let (status, reply) = vm.mount_image(
        mountpoint,
        "rafs",
        &manifest::case_bootstrap(case),
        &manifest::case_blob_dir(case),
        true,
    );
    if status != 204 {
        vm.fail(format!("mount {mountpoint}: {status} {reply}"));
    }
}

/// The guest's reading loop over the images and a passthrough share (mounted here): booted, its file
/// lists made, reading.
fn boot_reading_guest(vm: &Vm, dir: &Path, loop_secs: u32, rafsd: &mut Guard) -> Guard {
    guestvm::require_tools();
    vm.share(SHARE, &share_of_files(dir));
    let kernel = guestvm::debian_kernel();
    let (_, initrd) = guestvm::guest_files(dir, "");
    let append = format!(
        "rafs_images={},{},{SHARE} rafs_loop={loop_secs} rafs_loop_files=60 rafs_loop_hold={SHARE}/{HELD}",
        IMAGE_A.0, IMAGE_B.0
    );
    let mut qemu = vm.start_qemu(&kernel, &initrd, &append, 512, QEMU_LIMIT);
    vm.wait_for(
        &format!("LOOP-READY {}", vm.nonce),
        Duration::from_secs(240),
        &mut qemu,
        rafsd,
    );
    // Every file of the share is in the loop (40 and the held one).
    if !vm.serial_text().contains(&format!("LOOP-FILES {SHARE} 41")) {
        vm.fail("the guest does not read the share's 41 files");
    }
    qemu
}

/// `cmd` (a rafsd binary, or `setpriv` before one) with the arguments of a successor taking the device
/// from the daemon whose API socket is `api`, with its own API socket `new_api`.
fn successor<'a>(cmd: &'a mut Command, api: &Path, new_api: &Path) -> &'a mut Command {
    cmd.args(["virtiofs", "--upgrade-from"])
        .arg(api)
        .arg("--apisock")
        .arg(new_api)
}

/// The successor `cmd` runs, fails and says every one of `says` on stderr, which is returned.
fn refused(cmd: &mut Command, says: &[&str]) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && says.iter().all(|s| err.contains(s)),
        "{}: {err}",
        out.status
    );
    err
}

/// Start `bin` as the successor of the daemon serving `vm` and wait until it serves and the
/// predecessor has exited.
fn upgrade(vm: &Vm, bin: &Path, round: usize, old: &mut Guard) -> Guard {
    let log = vm.dir.join(format!("rafsd-{round}.log"));
    let mut cmd = Command::new(bin);
    successor(die_with_parent(&mut cmd, libc::SIGKILL), &vm.api, &vm.api)
        .args(["--log-level", "info"])
        .args(daemon::sandbox_allow_args(&vm.dir));
    let child = daemon::spawn_ready(&mut cmd, &log, Duration::from_secs(60), || {
        old.exited().is_some() && guestvm::api_says_running(&vm.api)
    })
    .unwrap_or_else(|e| {
        vm.fail(format!(
            "upgrade {round}: rafsd {e}\n--- new daemon log ---\n{}",
            daemon::read_log(&log)
        ))
    });
    let status = old.exited().unwrap();
    assert!(
        status.success(),
        "upgrade {round}: the old daemon exited with {status}"
    );
    Guard {
        name: "rafsd",
        child: Some(child),
        inner_pidfile: None,
    }
}

/// Uptimes of the guest's successful reads ("R <uptime>") in `serial`.
fn reads(serial: &str) -> Vec<f64> {
    serial
        .lines()
        .filter_map(|l| l.trim().strip_prefix("R "))
        .filter_map(|t| t.trim().parse().ok())
        .collect()
}

/// The longest time between two successful reads from the last read before `before` reads to the
/// first one after `after` reads (the reads counted when the event started and ended).
fn gap_ms(times: &[f64], before: usize, after: usize) -> f64 {
    let from = before.saturating_sub(1);
    let to = (after + 1).min(times.len());
    times[from..to]
        .windows(2)
        .map(|w| (w[1] - w[0]) * 1000.0)
        .fold(0.0, f64::max)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn loop_end(vm: &Vm) -> (u64, u64) {
    let line = vm
        .line(&format!("LOOP-END {}", vm.nonce))
        .unwrap_or_else(|| vm.fail("no LOOP-END"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |key: &str| -> u64 {
        let i = words.iter().position(|w| *w == key).unwrap();
        words[i + 1].parse().unwrap()
    };
    (num("reads"), num("bad"))
}

/// Where the reading guest finds the passthrough share, and the file of it it keeps open.
const SHARE: &str = "/share";
const HELD: &str = "d1/held";

/// A host directory for the passthrough share: 40 files of distinct bytes in nested directories, and
/// [`HELD`].
fn share_of_files(dir: &Path) -> PathBuf {
    let share = dir.join("share");
    for i in 0..40u64 {
        let sub = share.join(format!("d{}/e{}", i % 4, i % 3));
        std::fs::create_dir_all(&sub).unwrap();
        let len = 1000 + i as usize * 3001;
        std::fs::write(
            sub.join(format!("f{i}")),
            kit::built::pseudo_random(len, i + 1),
        )
        .unwrap();
    }
    std::fs::write(share.join(HELD), kit::built::pseudo_random(70_000, 99)).unwrap();
    share
}

/// A daemon serving both images and a passthrough share to a guest that reads them for `loop_secs`:
/// (work dir, VM, rafsd, QEMU).
fn daemon_under_a_reading_guest(
    prefix: &str,
    loop_secs: u32,
) -> (tempfile::TempDir, Vm, Guard, Guard) {
    let tmp = guestvm::work_dir(prefix);
    let vm = Vm::new(tmp.path());
    let mut rafsd = vm.start_rafsd(&[]);
    mount_rafs(&vm, IMAGE_A);
    mount_rafs(&vm, IMAGE_B);
    let qemu = boot_reading_guest(&vm, tmp.path(), loop_secs, &mut rafsd);
    (tmp, vm, rafsd, qemu)
}

/// Once the guest has read on past `serving` reads (the event `what` ended with that many), the longest
/// gap between its reads from `before` (their count when the event started).
fn gap_after(vm: &Vm, what: &str, before: usize, serving: usize) -> f64 {
    reads_on(vm, what, serving + 3);
    gap_ms(&reads(&vm.serial_text()), before, serving)
}

/// Wait (bounded) until the guest has read on past `past` reads: the daemon serves it.
fn reads_on(vm: &Vm, what: &str, past: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while reads(&vm.serial_text()).len() <= past {
        if Instant::now() > deadline {
            vm.fail(format!("{what}: the guest reads no more"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The end of the guest's loop: every read right, none failed; (reads, median gap, longest gap).
fn loop_read_right(vm: &Vm, qemu: &mut Guard, rafsd: &mut Guard, gaps: &[f64]) -> (u64, f64, f64) {
    vm.wait_for(
        &format!("LOOP-END {}", vm.nonce),
        Duration::from_secs(300),
        qemu,
        rafsd,
    );
    let serial = vm.serial_text();
    let bad: Vec<&str> = serial.lines().filter(|l| l.contains("BAD ")).collect();
    assert!(bad.is_empty(), "guest read errors: {bad:#?}{}", vm.logs());
    let (n, nbad) = loop_end(vm);
    assert!(n > 0 && nbad == 0, "reads {n}, bad {nbad}{}", vm.logs());
    let max = gaps.iter().copied().fold(0.0, f64::max);
    (n, median(&mut gaps.to_vec()), max)
}

#[test]
#[ignore = "needs root, QEMU: ci/test.sh"]
fn the_daemon_is_upgraded_ten_times_under_a_reading_guest() {
    let (_tmp, vm, mut rafsd, mut qemu) = daemon_under_a_reading_guest("rafsd-upgrade-", 150);
    let mut pids = vec![rafsd.pid()];
    let mut gaps = Vec::new();
    let this = (kit::rafsd_bin().to_path_buf(), package_version(&vm.api));
    let other = second_build("rafsd-b");
    let other = (other, format!("{}-upgrade-b", this.1));
    for round in 0..UPGRADES {
        std::thread::sleep(Duration::from_secs(3));
        let before = reads(&vm.serial_text()).len();
        let started = Instant::now();
        let (bin, version) = if round % 2 == 0 { &other } else { &this };
        rafsd = upgrade(&vm, Path::new(bin), round, &mut rafsd);
        assert_eq!(&package_version(&vm.api), version, "upgrade {round}");
        let took = started.elapsed();
        let serving = reads(&vm.serial_text()).len();
        let gap = gap_after(&vm, &format!("upgrade {round}"), before, serving);
        eprintln!(
            "upgrade {round} to {version}: pid {} -> {}, {} ms for the new process to serve, longest gap between guest reads {gap:.0} ms",
            pids.last().unwrap(),
            rafsd.pid(),
            took.as_millis()
        );
        assert!(!pids.contains(&rafsd.pid()), "the pid must change");
        pids.push(rafsd.pid());
        gaps.push(gap);
    }
    let (n, med, max) = loop_read_right(&vm, &mut qemu, &mut rafsd, &gaps);
    eprintln!(
        "live upgrade x{UPGRADES}: service gap median {med:.0} ms, max {max:.0} ms ({n} guest reads, none wrong)"
    );
}

/// Under `--sandbox namespace` the daemon is restarted when it dies: kill the serving process with
/// SIGKILL ten times while the guest reads; the guest must see pauses only, no error and no wrong byte
/// (requests the dead daemon had taken are answered by the next one, from the inflight log).
#[test]
#[ignore = "needs root, QEMU: ci/test.sh"]
fn the_daemon_is_killed_ten_times_under_a_reading_guest() {
    let (_tmp, vm, mut rafsd, mut qemu) = daemon_under_a_reading_guest("rafsd-crash-", 120);
    let supervisor = rafsd.pid() as i32;
    let mut gaps = Vec::new();
    for round in 0..UPGRADES {
        std::thread::sleep(Duration::from_secs(3));
        let before = reads(&vm.serial_text()).len();
        let killed = Instant::now();
        let (victim, next) = daemon::kill_worker(supervisor, Duration::from_secs(30));
        let next =
            next.unwrap_or_else(|| vm.fail(format!("kill {round}: no new daemon after 30 s")));
        let restarted = killed.elapsed();
        let serving = reads(&vm.serial_text()).len();
        let gap = gap_after(&vm, &format!("kill {round}"), before, serving);
        eprintln!(
            "kill {round}: pid {victim} -> {next} in {} ms, longest gap between guest reads {gap:.0} ms",
            restarted.as_millis()
        );
        assert!(
            rafsd.exited().is_none(),
            "kill {round}: the supervisor ended"
        );
        gaps.push(gap);
    }
    let (n, med, max) = loop_read_right(&vm, &mut qemu, &mut rafsd, &gaps);
    let rerun = vm.daemon_text().matches("answering again").count();
    eprintln!(
        "crash restart x{UPGRADES}: service gap median {med:.0} ms, max {max:.0} ms ({n} guest reads, none wrong; \
         {rerun} times requests in flight were answered again)"
    );
}

/// Play a new daemon that cannot read the state: ask for the hand-over and refuse what comes.
fn refuse_upgrade(api: &Path) -> String {
    let mut s = UnixStream::connect(api).unwrap();
    s.write_all(b"PUT /api/v1/daemon/upgrade HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "the daemon hung up");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut frame = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut frame).unwrap();
    assert_eq!(frame[0], b'S', "the state frame");
    let why = b"Eunsupported: daemon state version 2; this rafsd reads version 3 only";
    s.write_all(&(why.len() as u32).to_le_bytes()).unwrap();
    s.write_all(why).unwrap();
    String::from_utf8_lossy(&frame[1..]).into_owned()
}

#[test]
#[ignore = "needs root, QEMU: ci/test.sh"]
fn a_refused_upgrade_leaves_the_old_daemon_serving() {
    let tmp = guestvm::work_dir("rafsd-upgrade-refused-");
    let dir = tmp.path();
    let vm = Vm::new(dir);
    let mut rafsd = vm.start_rafsd(&[]);
    mount_rafs(&vm, IMAGE_A);
    mount_rafs(&vm, IMAGE_B);
    // Long enough a loop that the guest still reads after every step below on a loaded machine.
    let mut qemu = boot_reading_guest(&vm, dir, 60, &mut rafsd);
    std::thread::sleep(Duration::from_secs(2));
    // A real build one state version ahead cannot read this daemon's state: it says so and exits.
    let mut next = Command::new(second_build("rafsd-next-state"));
    successor(&mut next, &vm.api, &dir.join("api-next.sock")).args(daemon::sandbox_allow_args(dir));
    refused(&mut next, &["reads version 3 only"]);
    let before = reads(&vm.serial_text()).len();
    reads_on(&vm, "after a refused successor", before);
    assert!(rafsd.exited().is_none(), "the old daemon must carry on");
    // The same, played by hand: the state offered, then refused.
    let state = refuse_upgrade(&vm.api);
    assert!(state.starts_with("rafsd-state\n"), "{state}");
    let json: serde_json::Value = serde_json::from_str(&state["rafsd-state\n".len()..]).unwrap();
    assert_eq!(json["front_end"], "virtiofs");
    assert_eq!(json["mounts"].as_array().unwrap().len(), 3);
    let before = reads(&vm.serial_text()).len();
    reads_on(&vm, "after a refused upgrade", before);
    assert!(rafsd.exited().is_none(), "the old daemon must carry on");
    assert!(guestvm::api_says_running(&vm.api));
    // Another user who can reach the API socket does not get the guest's memory and connection.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&vm.api, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut nobody = Command::new("setpriv");
    nobody
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(kit::rafsd_bin());
    successor(&mut nobody, &vm.api, &dir.join("api-nobody.sock"));
    refused(&mut nobody, &["may take the device"]);
    assert!(rafsd.exited().is_none(), "the old daemon must carry on");
    vm.wait_for(
        &format!("LOOP-END {}", vm.nonce),
        Duration::from_secs(120),
        &mut qemu,
        &mut rafsd,
    );
    let (n, nbad) = loop_end(&vm);
    assert!(n > 0 && nbad == 0, "reads {n}, bad {nbad}{}", vm.logs());
}

/// A daemon (`bin`, files under `dir`) serving fixture v5-none-aligned at /img to an in-repo guest that
/// has sent FUSE_INIT.
fn daemon_serving_a_guest(bin: &str, dir: &Path) -> (frontend::VirtiofsDaemon, frontend::Guest) {
    let d = frontend::VirtiofsDaemon::start(bin, dir, &[]);
    d.mount_case("/img", "v5-none-aligned", &dir.join("cache"), false);
    let mut g = frontend::Guest::connect(&d.sock, frontend::Options::default()).unwrap();
    g.fuse_init().unwrap();
    (d, g)
}

/// A successor that fails after its sandbox is up (here its sandbox hides the image it must mount)
/// leaves the running daemon's socket files alone: the vhost-user socket (the VMM's next connection)
/// and the admin API socket, although the successor was started with the same `--apisock`. The old
/// daemon carries on serving the guest's connection, and a new one later. (In-repo frontend, no QEMU.)
#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_failed_successor_leaves_the_running_daemons_sockets() {
    use frontend::{Guest, Options, ROOT};
    let bin = kit::rafsd_bin();
    let bin = bin.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (d, mut g) = daemon_serving_a_guest(bin, dir.path());
    let img = g.lookup(ROOT, b"img").unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let mut next = Command::new(bin);
    successor(&mut next, &d.apisock, &d.apisock)
        .arg("--allow-path-rw")
        .arg(elsewhere.path());
    let err = refused(&mut next, &[]);
    assert!(
        d.sock.exists() && d.apisock.exists(),
        "the failed successor removed the running daemon's sockets: {err}"
    );
    let (status, body) = d.api("GET", "/api/v1/daemon", "").unwrap();
    assert_eq!(status, 200, "{body}");
    g.lookup(img.nodeid, b"special")
        .unwrap_or_else(|e| panic!("the guest is not served: {e}\n{}", d.log_text()));
    drop(g);
    let mut g = Guest::connect(&d.sock, Options::default()).unwrap();
    g.fuse_init().unwrap();
    g.lookup(ROOT, b"img").unwrap();
    drop(g);
    d.kill_and_check();
}

/// Read an HTTP head (up to the blank line) from `from` and write it to `to`, byte by byte (frames follow).
fn forward_head(from: &mut UnixStream, to: &mut UnixStream) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(from.read(&mut b).unwrap(), 1, "hung up in the HTTP head");
        head.push(b[0]);
    }
    to.write_all(&head).unwrap();
}

/// The two-phase commit: a successor told nothing after it said it is ready (here a proxy between it
/// and the running daemon refuses in its name and hangs up on it) exits without serving, and the
/// running daemon, which never committed, serves the guest again. Before the commit the successor
/// started the rings, so both processes would have served them. (In-repo frontend, no QEMU.)
#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_successor_without_the_commit_exits_and_the_old_daemon_serves() {
    use frontend::ROOT;
    use rafsd::vhost_user::wire::{recv_frame, send_frame};
    use std::os::fd::AsRawFd;
    let bin = kit::rafsd_bin();
    let bin = bin.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut d, mut g) = daemon_serving_a_guest(bin, dir.path());
    let img = g.lookup(ROOT, b"img").unwrap();
    let proxy_path = dir.path().join("proxy.sock");
    let proxy = std::os::unix::net::UnixListener::bind(&proxy_path).unwrap();
    let api = d.apisock.clone();
    let proxy = std::thread::spawn(move || {
        let (mut new, _) = proxy.accept().unwrap();
        let mut old = UnixStream::connect(&api).unwrap();
        forward_head(&mut new, &mut old);
        forward_head(&mut old, &mut new);
        let pass = |from: &UnixStream, to: &UnixStream| {
            let (data, files) = recv_frame(from, 64 << 20, 512).unwrap();
            let fds: Vec<i32> = files.iter().map(AsRawFd::as_raw_fd).collect();
            send_frame(to, &data, &fds).unwrap();
            data[0]
        };
        assert_eq!(pass(&old, &new), b'S', "the offered state");
        assert_eq!(pass(&new, &old), b'O', "the successor's yes");
        assert_eq!(pass(&old, &new), b'S', "the final state");
        // The successor's next word (ready) is not passed on: the old daemon hears a refusal.
        let (word, _) = recv_frame(&new, 64 << 20, 512).unwrap();
        send_frame(&old, b"Ethe test refuses in the successor's name", &[]).unwrap();
        drop(new);
        word[0]
    });
    let mut next = successor(
        &mut Command::new(bin),
        &proxy_path,
        &dir.path().join("api-next.sock"),
    )
    .args(daemon::sandbox_allow_args(dir.path()))
    .stderr(std::fs::File::create(dir.path().join("next.log")).unwrap())
    .spawn()
    .unwrap();
    let word = proxy.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = next.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let next_log = std::fs::read_to_string(dir.path().join("next.log")).unwrap_or_default();
    if status.is_none() {
        let _ = next.kill();
        let _ = next.wait();
    }
    assert!(
        status.is_some_and(|s| !s.success()),
        "the successor (last word {:?}) must exit without the commit, not serve: {status:?}\n{next_log}",
        word as char
    );
    assert!(d.is_running(), "the old daemon carries on");
    for _ in 0..20 {
        g.lookup(img.nodeid, b"special")
            .unwrap_or_else(|e| panic!("the guest is not served: {e}\n{}", d.log_text()));
    }
    drop(g);
    d.kill_and_check();
}

/// `PUT /api/v1/daemon/upgrade` on `api`: the connection and the answer's head.
fn ask_upgrade(api: &Path) -> (UnixStream, String) {
    let mut s = UnixStream::connect(api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"PUT /api/v1/daemon/upgrade HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap() == 1 {
        head.push(b[0]);
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

/// Upgrade requests are answered on the API thread before anything is queued: a second one while
/// another waits gets 409, a process of another user 403; the hand-overs refused, the daemon serves.
/// (In-repo frontend, no QEMU.)
#[test]
#[ignore = "needs root: ci/test.sh"]
fn upgrade_requests_are_bounded_and_checked_before_they_are_queued() {
    use frontend::ROOT;
    use rafsd::vhost_user::wire::{recv_frame, send_frame};
    let bin = kit::rafsd_bin();
    let bin = bin.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (d, mut g) = daemon_serving_a_guest(bin, dir.path());
    // The first is being handed over (the daemon waits for its yes), the second waits behind it.
    let (first, head) = ask_upgrade(&d.apisock);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(recv_frame(&first, 64 << 20, 512).unwrap().0[0], b'S');
    let (second, head) = ask_upgrade(&d.apisock);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (_, head) = ask_upgrade(&d.apisock);
    assert!(
        head.starts_with("HTTP/1.1 409"),
        "a third while one waits: {head}"
    );
    send_frame(&first, b"Ethe test says no", &[]).unwrap();
    assert_eq!(recv_frame(&second, 64 << 20, 512).unwrap().0[0], b'S');
    send_frame(&second, b"Ethe test says no", &[]).unwrap();
    // Another user reaching the API socket is refused before the hand-over starts.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&d.apisock, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut nobody = Command::new("setpriv");
    nobody
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin);
    successor(&mut nobody, &d.apisock, &dir.path().join("api-nobody.sock"));
    refused(&mut nobody, &["403", "may take the device"]);
    let img = g.lookup(ROOT, b"img").unwrap();
    g.lookup(img.nodeid, b"special").unwrap();
    drop(g);
    d.kill_and_check();
}
