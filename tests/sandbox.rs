//! The sandbox, checked on the running daemon: seccomp mode, NO_NEW_PRIVS and capabilities of every
//! thread (from /proc), namespaces and the minimal root, a syscall outside the policy (kill and log
//! modes), API mounts outside the allowed paths, and symlinks in a passthrough share that point out of it.

use kit::{daemon, frontend, manifest};

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use frontend::{Guest, Options, VirtiofsDaemon, ROOT};

const BIN: &str = env!("CARGO_BIN_EXE_rafsd");

/// CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETGID, SETUID, MKNOD, SETFCAP (src/sandbox.rs KEPT_CAPS).
const KEPT_CAPS: u64 =
    (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 6) | (1 << 7) | (1 << 27) | (1 << 31);

/// The sandboxed daemon: the only child of the supervisor we started.
fn daemon_child(supervisor: i32) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = kit::daemon::serving_process(supervisor) {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "supervisor {supervisor} has children {:?}, expected one daemon",
            kit::daemon::children(supervisor)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The crash-restart keeper (pid 1 of the daemon's namespaces, the serving daemon `worker`'s parent):
/// NO_NEW_PRIVS, the daemon's capabilities at most, the same namespaces as the daemon. It has no
/// seccomp filter (it forks the next daemon; see src/takeover/keeper.rs).
fn assert_keeper_confined(keeper: i32, worker: i32) {
    let status = std::fs::read_to_string(format!("/proc/{keeper}/status")).unwrap();
    let nspid = status_field(&status, "NSpid");
    assert!(
        nspid.ends_with("\t1") || nspid.ends_with(" 1"),
        "NSpid: {nspid}"
    );
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    assert_eq!(
        status_field(&status, "Threads"),
        "1",
        "the keeper forks: one thread"
    );
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        let caps = u64::from_str_radix(&status_field(&status, set), 16).unwrap();
        assert_eq!(caps & !KEPT_CAPS, 0, "keeper {set}: {caps:x}");
    }
    let ns = |pid: i32, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
    for kind in ["mnt", "net"] {
        assert_eq!(ns(keeper, kind), ns(worker, kind), "{kind} namespace");
    }
}

/// The daemon's pid as the supervisor logs it (usable after the daemon died, unlike /proc).
fn daemon_pid_from_log(log: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(pid) = text
            .lines()
            .find_map(|l| l.split("started the daemon as pid ").nth(1))
            .and_then(|p| p.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no daemon pid in the log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in status:\n{status}"))
        .trim()
        .to_string()
}

/// Every thread of `pid`: seccomp filter mode, NO_NEW_PRIVS, and only the kept capabilities in every
/// set (none inheritable or ambient). Returns the thread count.
fn assert_every_thread_confined(pid: i32) -> usize {
    let tasks: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let mut checked = 0;
    for task in &tasks {
        // A short-lived thread (an API connection) may end between the listing and the read.
        let Ok(status) = std::fs::read_to_string(task.join("status")) else {
            continue;
        };
        checked += 1;
        let name = status_field(&status, "Name");
        let cap = |k: &str| u64::from_str_radix(&status_field(&status, k), 16).unwrap();
        assert_eq!(status_field(&status, "Seccomp"), "2", "{task:?} ({name})");
        assert_eq!(
            status_field(&status, "NoNewPrivs"),
            "1",
            "{task:?} ({name})"
        );
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(
                cap(set),
                KEPT_CAPS,
                "{set} of {task:?} ({name}): {:#x}",
                cap(set)
            );
        }
        for set in ["CapInh", "CapAmb"] {
            assert_eq!(cap(set), 0, "{set} of {task:?} ({name})");
        }
    }
    assert!(checked > 0, "no thread of {pid} could be read");
    checked
}

/// The supervisor keeps `caps` only, in every set, and runs under its own seccomp filter (installed,
/// after the capabilities are dropped, while the daemon starts: allow it a moment).
fn assert_supervisor_confined(pid: i32, caps: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        if status_field(&status, "Seccomp") == "2" || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        let v = u64::from_str_radix(&status_field(&status, set), 16).unwrap();
        assert_eq!(v, caps, "supervisor {set}: {v:#x}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    assert_eq!(status_field(&status, "Seccomp"), "2", "supervisor");
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn virtiofs_daemon_threads_are_confined_in_their_own_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("hello"), b"hello from the share\n").unwrap();
    let d = VirtiofsDaemon::start(BIN, dir.path(), &["--seccomp", "kill"]);
    d.mount_case("/img", "v6-zstd-blake3", &dir.path().join("cache"), true);
    let body = serde_json::json!({"source": share, "fs_type": "passthrough_fs"}).to_string();
    let (status, text) = d
        .api("POST", "/api/v1/mount?mountpoint=/share", &body)
        .unwrap();
    assert_eq!(status, 204, "{text}");

    // A guest connects, so the vring worker threads exist too, and reads through both mounts.
    let mut g = Guest::connect(&d.sock, Options::default()).expect("vhost-user handshake");
    g.fuse_init().unwrap();
    let hello = g.lookup_path(ROOT, "share/hello").unwrap();
    assert_eq!(
        g.read_file(hello.nodeid, 4096).unwrap(),
        b"hello from the share\n"
    );
    let img = g.lookup(ROOT, b"img").unwrap();
    assert!(!g.list_dir(img.nodeid).unwrap().is_empty());

    let pid = daemon_child(d.pid());
    let threads = assert_every_thread_confined(pid);
    assert!(
        threads >= 4,
        "API, vhost-user and vring worker threads: {threads}"
    );
    // Pid 2 of its own pid namespace (pid 1 is the crash-restart keeper, which forked it), with its
    // own mount and network namespaces.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status_field(&status, "NSpid");
    assert!(
        nspid.ends_with("\t2") || nspid.ends_with(" 2"),
        "NSpid: {nspid}"
    );
    let keeper = daemon::children(d.pid())[0];
    assert_keeper_confined(keeper, pid);
    for kind in ["mnt", "pid", "net"] {
        assert_ne!(
            ns(&pid.to_string(), kind),
            ns("self", kind),
            "{kind} namespace"
        );
    }
    // Its root holds the allowed paths at their host paths, and not the rest of the host.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap());
    assert!(inside(&share.join("hello")).exists());
    assert!(inside(
        &manifest::case_bootstrap("v6-zstd-blake3")
            .canonicalize()
            .unwrap()
    )
    .exists());
    for hidden in [
        "etc/passwd",
        "etc/shadow",
        "root",
        "home",
        "var",
        "usr/bin",
        "bin/sh",
    ] {
        assert!(
            !root.join(hidden).exists(),
            "/{hidden} is visible in the sandbox"
        );
    }
    // The supervisor stays in the host's namespaces, with only what its clean-up needs.
    assert_eq!(ns(&d.pid().to_string(), "mnt"), ns("self", "mnt"));
    assert_supervisor_confined(d.pid(), 1 << 1);
    d.kill_and_check();
}

/// SIGTERM to the supervisor, then wait (10 s at most) for it to exit; returns the daemon's log.
fn sigterm_and_wait(d: &mut VirtiofsDaemon) -> String {
    // SAFETY: signalling the process we started.
    unsafe { libc::kill(d.pid(), libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.is_running() {
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    d.log_text()
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn sigterm_to_the_supervisor_stops_the_sandboxed_daemon_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = VirtiofsDaemon::start(BIN, dir.path(), &[]);
    // The supervisor's child: the crash-restart keeper, which passes the signal on and exits as the
    // daemon did.
    let pid = daemon::children(d.pid())[0];
    // The filtered supervisor forwards the signal, reports the exit code and removes the sockets.
    assert_supervisor_confined(d.pid(), 1 << 1);
    let log = sigterm_and_wait(&mut d);
    assert!(log.contains("rafsd virtiofs stopped"), "{log}");
    assert!(
        log.contains(&format!("daemon {pid} ended: Code(0)")),
        "{log}"
    );
    assert!(!d.sock.exists() && !d.apisock.exists(), "sockets removed");
}

/// `rafsd virtiofs` sharing `dir/share`, with `extra` options and the test probe
/// `RAFSD_TEST_FORBIDDEN_SYSCALL=<probe>` (src/sandbox/probe.rs): right after its sandbox is complete the
/// daemon does one thing a rule must stop and logs what happened. Killed by pid on drop.
struct Probed {
    child: Child,
    log: PathBuf,
    probe: String,
}

impl Probed {
    fn start(dir: &Path, probe: &str, extra: &[&str]) -> Self {
        let share = dir.join("share");
        std::fs::create_dir_all(&share).unwrap();
        let log = dir.join("rafsd.log");
        let child = Command::new(BIN)
            .arg("virtiofs")
            .arg("--sock")
            .arg(dir.join("vhost.sock"))
            .arg("--shared-dir")
            .arg(&share)
            .args(extra)
            .env("RAFSD_TEST_FORBIDDEN_SYSCALL", probe)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::OpenOptions::new().append(true).open(&log).unwrap())
            .spawn()
            .unwrap();
        Probed {
            child,
            log,
            probe: probe.to_string(),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait (20 s at most) for the process we started to end; returns how it ended and the log.
    fn ended(&mut self) -> (std::process::ExitStatus, String) {
        let status = daemon::wait_bounded(&mut self.child, Duration::from_secs(20));
        let text = self.log_text();
        let probe = &self.probe;
        let status =
            status.unwrap_or_else(|| panic!("probe {probe}: the daemon was not stopped:\n{text}"));
        (status, text)
    }

    /// Wait (20 s at most) until the probe reports it is done with the daemon still serving.
    fn done(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.log_text();
            if text.contains("done; still alive") {
                return text;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "probe {}: the daemon ended ({status:?}):\n{text}",
                    self.probe
                );
            }
            assert!(
                Instant::now() < deadline,
                "probe {}: not done:\n{text}",
                self.probe
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM; the daemon must stop with exit code 0. Returns the log.
    fn stop(mut self) -> String {
        // SAFETY: signalling the process we started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let (status, text) = self.ended();
        assert_eq!(
            status.code(),
            Some(0),
            "probe {}: {status:?}\n{text}",
            self.probe
        );
        text
    }
}

impl Drop for Probed {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: killing the process we started, by its pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// Run `probe` in a fresh daemon (kill mode, `extra` options) that the filter must kill: the process we
/// started (the supervisor passes the daemon's death on) ends by SIGSYS, before the probe reports back.
fn killed_by_the_filter(probe: &str, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Probed::start(dir.path(), probe, extra);
    let (status, text) = p.ended();
    let name = probe.split(':').next().unwrap();
    assert!(text.contains(&format!("probe \"{name}\"")), "{text}");
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "{probe}: {status:?}\n{text}"
    );
    assert!(!text.contains("still alive"), "{probe}:\n{text}");
    text
}

/// The kernel's audit record (type 1326) of a seccomp decision on `pid` for personality(2), if logged.
fn audit_record(pid: i32) -> Option<String> {
    #[cfg(target_arch = "x86_64")]
    let nr = 135;
    #[cfg(target_arch = "aarch64")]
    let nr = 92;
    // Without auditd the kernel log has the record; with auditd running, its log does.
    let out = Command::new("dmesg").output().ok()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&std::fs::read_to_string("/var/log/audit/audit.log").unwrap_or_default());
    text.lines()
        .find(|l| {
            l.contains("type=1326")
                && l.contains(&format!(" pid={pid} "))
                && l.contains(&format!(" syscall={nr} "))
        })
        .map(str::to_string)
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_syscall_outside_the_policy_kills_in_kill_mode() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Probed::start(dir.path(), "1", &["--seccomp", "kill"]);
    let pid = daemon_pid_from_log(&p.log);
    let (status, text) = p.ended();
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "the supervisor passes on the daemon's death by SIGSYS: {status:?}\n{text}"
    );
    assert!(text.contains("calling personality"), "{text}");
    assert!(!text.contains("still alive"), "{text}");
    assert!(text.contains("Signal(31)"), "{text}");
    if let Some(record) = audit_record(pid) {
        assert!(record.contains("sig=31"), "{record}");
    }
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_syscall_outside_the_policy_is_logged_in_log_mode() {
    // Without auditd the kernel prints audit records rate-limited ("kauditd_printk_skb: N callbacks
    // suppressed"), so one record can be dropped when other tests log at the same moment: a few
    // daemons in turn, each a fresh pid, each given longer than the 5 s rate-limit window.
    for attempt in 1..=3 {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Probed::start(dir.path(), "1", &["--seccomp", "log"]);
        let pid = daemon_child(p.child.id() as i32);
        let deadline = Instant::now() + Duration::from_secs(7);
        let record = loop {
            if let Some(r) = audit_record(pid) {
                break Some(r);
            }
            assert!(
                p.child.try_wait().unwrap().is_none(),
                "the daemon died in log mode:\n{}",
                p.log_text()
            );
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The audit record is written during the call; the daemon logs its survival right after.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !p.log_text().contains("still alive") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = p.log_text();
        assert!(text.contains("still alive"), "{text}");
        assert!(p.child.try_wait().unwrap().is_none(), "still serving");
        p.stop();
        match record {
            Some(record) => {
                assert!(record.contains("sig=0"), "logged, not killed: {record}");
                return;
            }
            None => eprintln!("attempt {attempt}: no audit record for pid {pid} (rate-limited?)"),
        }
    }
    panic!("no seccomp audit record for the forbidden syscall in 3 attempts");
}

/// `clone` makes threads only: a fork, or a thread in a new namespace, kills the daemon. `clone3` keeps
/// its flags in memory the filter cannot read: it answers ENOSYS, and std threads still start (glibc
/// falls back to `clone`).
#[test]
#[ignore = "needs root: ci/test.sh"]
fn clone_makes_threads_only() {
    for probe in ["fork", "clone-namespace"] {
        killed_by_the_filter(probe, &[]);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut p = Probed::start(dir.path(), "clone3", &[]);
    let text = p.done();
    assert!(
        text.contains("clone3 returned -1 (Function not implemented (os error 38))"),
        "{text}"
    );
    assert!(
        text.contains("a std::thread ran and returned Ok(42)"),
        "{text}"
    );
    p.stop();
}

/// The value a probe logged for `what` ("... {what} returned N"), as a number.
fn returned(text: &str, what: &str) -> i64 {
    let key = format!("{what} returned ");
    text.lines()
        .find_map(|l| l.split(&key).nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.trim_end_matches(';').parse().ok())
        .unwrap_or_else(|| panic!("no {key:?} in:\n{text}"))
}

/// Sockets are AF_UNIX, AF_INET or AF_INET6: AF_VSOCK (a host daemon could reach every VM's vsock
/// services) kills; AF_NETLINK, which glibc's resolver tries when a name has several addresses, is
/// refused with EAFNOSUPPORT so the resolver carries on without it.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn sockets_are_unix_or_ip_only() {
    killed_by_the_filter("socket-vsock", &[]);
    let dir = tempfile::tempdir().unwrap();
    let mut p = Probed::start(dir.path(), "socket-netlink", &[]);
    let text = p.done();
    assert!(returned(&text, "socket(AF_UNIX)") >= 0, "{text}");
    assert!(returned(&text, "socket(AF_INET)") >= 0, "{text}");
    assert!(
        text.contains(
            "socket(AF_NETLINK) returned -1 (Address family not supported by protocol (os error 97))"
        ),
        "{text}"
    );
    p.stop();
}

/// The real resolver under the socket rule: a registry host with two addresses (glibc's getaddrinfo
/// then asks netlink for the interface addresses, gets EAFNOSUPPORT and carries on), looked up in a
/// private /etc/hosts, at the first read of the mount; the connection is refused and the daemon, in kill
/// mode, serves on.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn the_resolver_copes_with_the_socket_rule() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.1 rafsd-two\n::1 rafsd-two\n",
    )
    .unwrap();
    let (sock, apisock) = VirtiofsDaemon::sockets(dir.path());
    // In a mount namespace of its own, where that file is /etc/hosts.
    let mut args: Vec<std::ffi::OsString> = vec![
        "-m".into(),
        "--propagation".into(),
        "private".into(),
        "sh".into(),
        "-c".into(),
        format!(
            "mount --bind {} /etc/hosts && exec \"$0\" \"$@\"",
            hosts.display()
        )
        .into(),
        BIN.into(),
        "virtiofs".into(),
        "--sock".into(),
        sock.clone().into(),
        "--apisock".into(),
        apisock.clone().into(),
        "--allow-network".into(),
        "--seccomp".into(),
        "kill".into(),
    ];
    args.extend(daemon::sandbox_allow_args(dir.path()));
    let d = VirtiofsDaemon::start_at("unshare", sock, apisock, dir.path(), &args);
    let registry = serde_json::json!({"device": {"backend": {"type": "registry", "config":
        {"host": "rafsd-two:1", "repo": "x/y", "scheme": "http", "retry_limit": 0}}},
        "mode": "direct"});
    let body = serde_json::json!({"source": manifest::case_bootstrap("v6-zstd-blake3"),
        "fs_type": "rafs", "config": registry.to_string()});
    let (s, t) = d
        .api("POST", "/api/v1/mount?mountpoint=/r", &body.to_string())
        .unwrap();
    // The mount asks the registry nothing; the first read resolves the name and is refused.
    assert_eq!(s, 204, "{t}");
    let mut g = Guest::connect(&d.sock, Options::default()).expect("vhost-user handshake");
    let cold = g.lookup_path(ROOT, "r/etc/adduser.conf").unwrap();
    let err = g.read_file(cold.nodeid, 4096).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        d.log_text().contains("Connection refused"),
        "{}",
        d.log_text()
    );
    let (s, t) = d.api("GET", "/api/v1/daemon", "").unwrap();
    assert_eq!(s, 200, "{t}\n{}", d.log_text());
    assert_every_thread_confined(daemon_child(d.pid()));
    d.kill_and_check();
}

/// `tgkill` reaches the daemon's own threads only (what `abort()` and `raise()` do), in a pid namespace
/// (where the daemon is pid 1) and outside one: a signal to another process kills the daemon, even the
/// harmless signal 0 to this test.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn tgkill_reaches_the_daemons_own_threads_only() {
    let me = std::process::id();
    for sandbox in ["namespace", "chroot"] {
        let text = killed_by_the_filter(&format!("tgkill:{me}"), &["--sandbox", sandbox]);
        assert_eq!(returned(&text, "tgkill of our own thread"), 0, "{sandbox}");
        assert!(!text.contains("tgkill of pid"), "{sandbox}:\n{text}");
    }
}

/// A block device of this host (a loop device if there is one): "major:minor" names in /sys/dev/block.
fn a_block_device() -> (u32, u32) {
    let mut devs: Vec<(u32, u32)> = std::fs::read_dir("/sys/dev/block")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (major, minor) = name.split_once(':')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
        .collect();
    devs.sort_by_key(|&(major, minor)| (major != 7, major, minor));
    *devs.first().expect("no block device on this host")
}

fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string.
    let r = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
    assert_eq!(r, 0, "mknod {path:?}: {}", std::io::Error::last_os_error());
}

/// The per-mount options of the mount at `mountpoint` (the top one) in `pid`'s mount namespace.
fn mount_options(pid: i32, mountpoint: &Path) -> String {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let want = mountpoint.to_str().unwrap();
    info.lines()
        .rev()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(4) == Some(&want)).then(|| f[5].to_string())
        })
        .unwrap_or_else(|| panic!("{want} is not a mount point of {pid}:\n{info}"))
}

/// Writable paths are bound nosuid,nodev down the whole tree: a block device node in a share, or in a
/// mount beneath it, does not open as a device inside the sandbox, though it does on the host. The
/// sandbox's own /dev/null still opens.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn device_nodes_in_a_writable_share_do_not_open_as_devices() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    let sub = share.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    let mut host = HostDirs::default();
    host.tmpfs(&sub);
    let (major, minor) = a_block_device();
    let nodes = [share.join("blk"), sub.join("blk")];
    for node in &nodes {
        mknod(node, libc::S_IFBLK | 0o600, libc::makedev(major, minor));
        std::fs::File::open(node).expect("the node opens as a device on the host");
    }
    let paths: Vec<String> = nodes
        .iter()
        .map(|n| n.display().to_string())
        .chain(["/dev/null".to_string()])
        .collect();
    let mut p = Probed::start(dir.path(), &format!("open:{}", paths.join(",")), &[]);
    let text = p.done();
    for node in &nodes {
        assert!(
            text.contains(&format!(
                "open {} failed: Permission denied",
                node.display()
            )),
            "{text}"
        );
    }
    assert!(text.contains("open /dev/null succeeded"), "{text}");
    let pid = daemon_child(p.child.id() as i32);
    for mp in [&share, &sub] {
        let opts = mount_options(pid, mp);
        assert!(
            opts.split(',').any(|o| o == "nodev") && opts.split(',').any(|o| o == "nosuid"),
            "{mp:?}: {opts}"
        );
    }
    p.stop();
}

/// A guest may make fifos, sockets, regular files and overlayfs whiteouts (character device 0/0, which
/// the guest's overlay makes in Kata's upper layers) in a passthrough share, but no device node: the
/// filter answers EPERM, as the daemon keeps CAP_MKNOD (whiteouts, RENAME_WHITEOUT) and a compromised
/// daemon could otherwise make one in a share mounted after start (not nodev) and open it.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn guests_make_fifos_and_whiteouts_but_no_device_nodes_in_shares() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("hello"), b"hello\n").unwrap();
    let d = VirtiofsDaemon::start(BIN, dir.path(), &[]);
    let body = serde_json::json!({"source": share, "fs_type": "passthrough_fs"}).to_string();
    let (status, text) = d
        .api("POST", "/api/v1/mount?mountpoint=/share", &body)
        .unwrap();
    assert_eq!(status, 204, "{text}");
    let mut g = Guest::connect(&d.sock, Options::default()).expect("vhost-user handshake");
    g.fuse_init().unwrap();
    let s = g.lookup(ROOT, b"share").unwrap().nodeid;
    let (major, minor) = a_block_device();
    let dev = |major, minor| libc::makedev(major, minor) as u32;
    let allowed = [
        ("fifo", libc::S_IFIFO | 0o644, 0),
        ("sock", libc::S_IFSOCK | 0o644, 0),
        ("file", libc::S_IFREG | 0o644, 0),
        ("whiteout", libc::S_IFCHR, 0),
    ];
    for (name, mode, rdev) in allowed {
        let e = g.mknod(s, name.as_bytes(), mode, rdev).unwrap();
        assert_eq!(e.attr.mode & libc::S_IFMT, mode & libc::S_IFMT, "{name}");
        let meta = std::fs::symlink_metadata(share.join(name)).unwrap();
        assert_eq!(
            meta.mode() & libc::S_IFMT,
            mode & libc::S_IFMT,
            "{name} on the host"
        );
        assert_eq!(meta.rdev(), 0, "{name}");
    }
    let refused = [
        ("blk", libc::S_IFBLK | 0o600, dev(major, minor)),
        ("blk0", libc::S_IFBLK | 0o600, 0),
        ("null", libc::S_IFCHR | 0o666, dev(1, 3)),
    ];
    for (name, mode, rdev) in refused {
        let e = g.mknod(s, name.as_bytes(), mode, rdev).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{name}: {e}");
        assert!(!share.join(name).exists(), "{name} made on the host");
    }
    // The share still serves the guest, and the daemon is still the confined one.
    let hello = g.lookup(s, b"hello").unwrap();
    assert_eq!(g.read_file(hello.nodeid, 4096).unwrap(), b"hello\n");
    assert_every_thread_confined(daemon_child(d.pid()));
    d.kill_and_check();
}

/// The supervisor runs under its own allow-list: a syscall outside it kills the supervisor (and the
/// daemon with it, PDEATHSIG), and a daemon that fails passes its exit code on through the filtered
/// supervisor.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn the_supervisor_is_filtered_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Probed::start(dir.path(), "supervisor", &[]);
    let daemon = daemon_pid_from_log(&p.log);
    let (status, text) = p.ended();
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}\n{text}");
    assert!(
        text.contains("supervisor: seccomp filter installed"),
        "{text}"
    );
    assert!(text.contains("calling personality"), "{text}");
    assert!(!text.contains("still alive"), "{text}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{daemon}")).exists() {
        assert!(
            Instant::now() < deadline,
            "daemon {daemon} outlived its supervisor"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A bootstrap that is no image: the daemon fails after the fork, the supervisor exits 1 too.
    let bad = dir.path().join("bad.boot");
    std::fs::write(&bad, b"not a bootstrap").unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        daemon::v1_config(dir.path(), &dir.path().join("cache"), true, ""),
    )
    .unwrap();
    let sock = dir.path().join("exit.sock");
    let (code, out) = daemon::run_bounded(
        &[
            "virtiofs".as_ref(),
            "--sock".as_ref(),
            sock.as_os_str(),
            "--bootstrap".as_ref(),
            bad.as_os_str(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("supervisor: seccomp filter installed"),
        "{out}"
    );
    assert!(out.contains("ended: Code(1)"), "{out}");
    assert!(!sock.exists(), "socket removed");
}

/// Start-up paths relative to the working directory name the host's files, also for the sandboxed
/// daemon, whose working directory is the root of its own view.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn relative_startup_paths_name_host_paths() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("share")).unwrap();
    std::fs::write(dir.path().join("share/hello"), b"relative\n").unwrap();
    let log = dir.path().join("rafsd.log");
    let child = Command::new(BIN)
        .current_dir(dir.path())
        .args(["virtiofs", "--sock", "vhost.sock", "--shared-dir", "share"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::OpenOptions::new().append(true).open(&log).unwrap())
        .spawn()
        .unwrap();
    let mut p = Probed {
        child,
        log,
        probe: "none".into(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.log_text().contains("waiting for a VMM") {
        assert!(p.child.try_wait().unwrap().is_none(), "{}", p.log_text());
        assert!(Instant::now() < deadline, "{}", p.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut g = Guest::connect(&dir.path().join("vhost.sock"), Options::default()).unwrap();
    g.fuse_init().unwrap();
    let hello = g.lookup(ROOT, b"hello").unwrap();
    assert_eq!(g.read_file(hello.nodeid, 4096).unwrap(), b"relative\n");
    drop(g);
    p.stop();
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn api_mounts_outside_the_allowed_paths_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let d = VirtiofsDaemon::start(BIN, dir.path(), &[]);
    let case = "v6-zstd-blake3";
    let mount = |mp: &str, body: serde_json::Value| {
        d.api(
            "POST",
            &format!("/api/v1/mount?mountpoint={mp}"),
            &body.to_string(),
        )
        .unwrap()
    };
    let rafs = |bootstrap: &Path, blobs: &Path, cache: &Path| {
        serde_json::json!({"source": bootstrap, "fs_type": "rafs",
            "config": daemon::v1_config(blobs, cache, false, "")})
    };
    // Inside: fixtures read-only, cache under the test dir.
    let (s, t) = mount(
        "/ok",
        rafs(
            &manifest::case_bootstrap(case),
            &manifest::case_blob_dir(case),
            &dir.path().join("cache"),
        ),
    );
    assert_eq!(s, 204, "{t}");

    // A bootstrap copied outside, a cache outside, a share outside, a share reached through "..".
    let foreign = outside.path().join("bootstrap");
    std::fs::copy(manifest::case_bootstrap(case), &foreign).unwrap();
    let cases = [
        (
            "bootstrap",
            rafs(
                &foreign,
                &manifest::case_blob_dir(case),
                &dir.path().join("c2"),
            ),
        ),
        (
            "cache work_dir",
            rafs(
                &manifest::case_bootstrap(case),
                &manifest::case_blob_dir(case),
                &outside.path().join("cache"),
            ),
        ),
        (
            "blob directory",
            rafs(
                &manifest::case_bootstrap(case),
                outside.path(),
                &dir.path().join("c3"),
            ),
        ),
        (
            "shared directory",
            serde_json::json!({"source": outside.path(), "fs_type": "passthrough_fs"}),
        ),
        (
            "shared directory",
            serde_json::json!({"source": dir.path().join("..").join(outside.path().file_name().unwrap()), "fs_type": "passthrough_fs"}),
        ),
    ];
    for (i, (what, body)) in cases.into_iter().enumerate() {
        let (s, t) = mount(&format!("/bad{i}"), body);
        assert_eq!(s, 403, "{what}: {t}");
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["code"], "Forbidden", "{t}");
        let msg = v["message"].as_str().unwrap();
        assert!(
            msg.contains(what) && msg.contains("outside the sandbox's allowed paths"),
            "{msg}"
        );
    }
    // A network backend cannot work in the sandbox's empty network namespace: said up front.
    let registry = serde_json::json!({"device": {"backend": {"type": "registry", "config":
        {"host": "registry.example", "repo": "x/y", "scheme": "https"}}}, "mode": "direct"});
    let (s, t) = mount(
        "/net",
        serde_json::json!({"source": manifest::case_bootstrap(case), "fs_type": "rafs",
            "config": registry.to_string()}),
    );
    assert_eq!(s, 403, "{t}");
    assert!(t.contains("--allow-network"), "{t}");
    let (_, info) = d.api("GET", "/api/v1/daemon", "").unwrap();
    assert!(info.contains("\"/ok\"") && !info.contains("/bad") && !info.contains("/net"));
    d.kill_and_check();
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn symlinks_in_a_share_do_not_lead_out_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    let secret_dir = dir.path().join("secret");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::create_dir_all(&secret_dir).unwrap();
    // Beside the share, and readable by the daemon's user: only the share must be reachable.
    std::fs::write(secret_dir.join("key"), b"host secret\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", share.join("abs")).unwrap();
    std::os::unix::fs::symlink("../secret/key", share.join("rel")).unwrap();
    std::os::unix::fs::symlink("../secret", share.join("dirlink")).unwrap();
    std::os::unix::fs::symlink("/etc", share.join("etc")).unwrap();
    // Outside every allowed path.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("key"), b"host secret\n").unwrap();
    std::os::unix::fs::symlink(outside.path().join("key"), share.join("far")).unwrap();
    let d = VirtiofsDaemon::start(BIN, dir.path(), &[]);
    let body = serde_json::json!({"source": share, "fs_type": "passthrough_fs"}).to_string();
    let (status, text) = d.api("POST", "/api/v1/mount?mountpoint=/s", &body).unwrap();
    assert_eq!(status, 204, "{text}");
    let mut g = Guest::connect(&d.sock, Options::default()).expect("vhost-user handshake");
    g.fuse_init().unwrap();
    let s = g.lookup(ROOT, b"s").unwrap().nodeid;
    for name in ["abs", "rel", "far"] {
        let link = g.lookup(s, name.as_bytes()).unwrap();
        assert_eq!(
            link.attr.mode & libc::S_IFMT,
            libc::S_IFLNK,
            "{name} is a symlink"
        );
        // OPEN of the link's own inode must not follow it on the host.
        if let Ok(open) = g.open(link.nodeid) {
            let data = g.read(link.nodeid, open.fh, 0, 4096).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&data).contains("root:")
                    && !String::from_utf8_lossy(&data).contains("host secret"),
                "OPEN+READ of {name} reached the host: {data:?}"
            );
        }
    }
    // Directory symlinks are not entered on the host either: lookups beneath them fail.
    for (link, child) in [("dirlink", "key"), ("etc", "passwd")] {
        let l = g.lookup(s, link.as_bytes()).unwrap();
        assert_eq!(l.attr.mode & libc::S_IFMT, libc::S_IFLNK);
        assert!(
            g.lookup(l.nodeid, child.as_bytes()).is_err(),
            "LOOKUP {child} beneath the symlink {link} succeeded"
        );
    }
    // ".." from the share's root does not climb out.
    assert!(g
        .lookup(s, b"..")
        .map_or(true, |e| e.nodeid == ROOT || e.nodeid == s));
    let root_names: Vec<Vec<u8>> = g.list_dir(s).unwrap().into_iter().map(|e| e.name).collect();
    assert!(!root_names.contains(&b"key".to_vec()));
    // And the secret is not even in the daemon's view of the host.
    let pid = daemon_child(d.pid());
    let inside = PathBuf::from(format!("/proc/{pid}/root"))
        .join(secret_dir.strip_prefix("/").unwrap())
        .join("key");
    // The test dir is allowed read-write (so the secret beside the share is in the view; the passthrough
    // layer keeps the guest from it), but /etc/passwd and the other temp dir are not in the view at all.
    assert!(inside.exists());
    assert!(!PathBuf::from(format!("/proc/{pid}/root/etc/passwd")).exists());
    let far = PathBuf::from(format!("/proc/{pid}/root"))
        .join(outside.path().strip_prefix("/").unwrap())
        .join("key");
    assert!(!far.exists(), "{far:?} visible in the sandbox");
    d.kill_and_check();
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn fuse_daemon_threads_are_confined_and_the_supervisor_unmounts() {
    let dir = tempfile::tempdir().unwrap();
    let case = "v6-zstd-blake3";
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        daemon::v1_config(
            &manifest::case_blob_dir(case),
            &dir.path().join("cache"),
            true,
            "",
        ),
    )
    .unwrap();
    let d = daemon::Daemon::start(
        &[
            "--config",
            config.to_str().unwrap(),
            "--bootstrap",
            manifest::case_bootstrap(case).to_str().unwrap(),
            "--seccomp",
            "kill",
        ],
        &dir.path().join("mnt"),
        &dir.path().join("rafsd.log"),
    );
    // Reads through the mount work under the filter (and fill the cache in the allowed work dir).
    let data = std::fs::read(d.mountpoint.join("special/random-2m5")).unwrap();
    assert_eq!(data.len(), 2_621_440);
    assert!(std::fs::read_dir(dir.path().join("cache")).unwrap().count() > 0);
    let pid = daemon_child(d.pid());
    let threads = assert_every_thread_confined(pid);
    assert!(threads >= 5, "API and four FUSE workers: {threads}");
    // The supervisor keeps DAC_OVERRIDE and SYS_ADMIN, to unmount when the daemon ends.
    assert_supervisor_confined(d.pid(), (1 << 1) | (1 << 21));
    // No namespaces for the FUSE daemon: the host sees its mount.
    assert_eq!(ns(&pid.to_string(), "mnt"), ns("self", "mnt"));
    let log = d.log_text();
    // The daemon asks for Landlock ABI 5: a kernel with it must report full enforcement, an older one
    // at least partial; only a kernel without Landlock may leave it off.
    // SAFETY: the version query of landlock_create_ruleset takes no attributes and returns an integer.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    let want: &[&str] = match abi {
        5.. => &["landlock: fully enforced"],
        1..=4 => &["landlock: fully enforced", "landlock: partially"],
        _ => &["landlock: not enforced"],
    };
    assert!(
        want.iter().any(|w| log.contains(w)),
        "kernel Landlock ABI {abi}, want one of {want:?}:\n{log}"
    );
    // SIGTERM to the supervisor: the daemon stops and the supervisor unmounts (stop() checks the mount).
    let status = d.stop();
    assert!(status.success(), "{status:?}");
}

#[test]
fn fuse_refuses_namespace_sandbox_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = daemon::run_bounded(
        &[
            "fuse".as_ref(),
            "--mountpoint".as_ref(),
            dir.path().as_os_str(),
            "--sandbox".as_ref(),
            "namespace".as_ref(),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("supports --sandbox none only"), "{out}");
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn chroot_mode_and_allow_network_choose_the_namespaces() {
    // chroot: the minimal root in a private mount namespace, host pid and network namespaces, no
    // supervisor (the process we started is the daemon).
    let dir = tempfile::tempdir().unwrap();
    let d = VirtiofsDaemon::start(BIN, dir.path(), &["--sandbox", "chroot"]);
    let pid = d.pid().to_string();
    assert_ne!(ns(&pid, "mnt"), ns("self", "mnt"));
    assert_eq!(ns(&pid, "pid"), ns("self", "pid"));
    assert_eq!(ns(&pid, "net"), ns("self", "net"));
    assert_every_thread_confined(d.pid());
    assert!(!PathBuf::from(format!("/proc/{pid}/root/etc/passwd")).exists());
    drop(d);

    // namespace + --allow-network: new mount and pid namespaces, the host network, resolver files visible.
    let dir = tempfile::tempdir().unwrap();
    let d = VirtiofsDaemon::start(BIN, dir.path(), &["--allow-network"]);
    let pid = daemon_child(d.pid()).to_string();
    assert_ne!(ns(&pid, "mnt"), ns("self", "mnt"));
    assert_ne!(ns(&pid, "pid"), ns("self", "pid"));
    assert_eq!(ns(&pid, "net"), ns("self", "net"));
    if Path::new("/etc/resolv.conf").exists() {
        assert!(PathBuf::from(format!("/proc/{pid}/root/etc/resolv.conf")).exists());
    }
    assert!(!PathBuf::from(format!("/proc/{pid}/root/etc/passwd")).exists());
    // Nor the host's TLS directories, whose private/ holds its keys (the roots are built in).
    for tls in ["etc/ssl", "etc/pki"] {
        assert!(
            !PathBuf::from(format!("/proc/{pid}/root/{tls}")).exists(),
            "{tls}"
        );
    }
    assert_every_thread_confined(pid.parse().unwrap());
    // A network backend is let through the network check, but a CA file it names must be allowed too.
    let outside = tempfile::tempdir().unwrap();
    let registry = serde_json::json!({"device": {"backend": {"type": "registry", "config":
        {"host": "127.0.0.1:9", "repo": "x/y", "scheme": "https",
         "ca_cert_files": [outside.path().join("ca.pem")]}}}, "mode": "direct"});
    let body = serde_json::json!({"source": manifest::case_bootstrap("v6-zstd-blake3"),
        "fs_type": "rafs", "config": registry.to_string()});
    let (s, t) = d
        .api("POST", "/api/v1/mount?mountpoint=/net", &body.to_string())
        .unwrap();
    assert_eq!(s, 403, "{t}");
    assert!(t.contains("backend file") && t.contains("ca.pem"), "{t}");
    d.kill_and_check();
}

/// Directories a test makes under fixed host paths (Kata's and nydus-snapshotter's), removed on drop, also
/// when the test fails: its bind mounts first (last made, first gone), each tree whole, then the parents it
/// had to create, if they are empty by then.
#[derive(Default)]
struct HostDirs {
    mounts: Vec<PathBuf>,
    trees: Vec<PathBuf>,
    created_parents: Vec<PathBuf>,
}

impl HostDirs {
    fn make(&mut self, tree: &Path) -> PathBuf {
        assert!(!tree.exists(), "{tree:?} exists already");
        self.created_parents.extend(
            tree.ancestors()
                .skip(1)
                .take_while(|a| !a.exists())
                .map(Path::to_path_buf),
        );
        std::fs::create_dir_all(tree).unwrap();
        self.trees.push(tree.to_path_buf());
        tree.to_path_buf()
    }

    /// Mount a small tmpfs (device nodes allowed) on `target`.
    fn tmpfs(&mut self, target: &Path) {
        daemon::mount_tmpfs(target, c"size=1m");
        self.mounts.push(target.to_path_buf());
    }

    /// Bind-mount `src` on `target` with `propagation` (MS_SHARED...), as Kata's runtime does on the host.
    fn bind(&mut self, src: &Path, target: &Path, propagation: libc::c_ulong) {
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let (src_c, target_c) = (c(src), c(target));
        // SAFETY: valid C strings; null fstype and data are allowed for bind and propagation changes.
        let r = unsafe {
            libc::mount(
                src_c.as_ptr(),
                target_c.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        assert_eq!(
            r,
            0,
            "bind {src:?} on {target:?}: {}",
            std::io::Error::last_os_error()
        );
        self.mounts.push(target.to_path_buf());
        if propagation != 0 {
            // SAFETY: as above.
            let r = unsafe {
                libc::mount(
                    std::ptr::null(),
                    target_c.as_ptr(),
                    std::ptr::null(),
                    propagation,
                    std::ptr::null(),
                )
            };
            assert_eq!(
                r,
                0,
                "propagation of {target:?}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

impl Drop for HostDirs {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            daemon::lazy_unmount(m);
        }
        for t in &self.trees {
            let _ = std::fs::remove_dir_all(t);
        }
        // The daemon may have made a parent too (the snapshotter's cache dir): deepest first.
        self.created_parents
            .sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in &self.created_parents {
            let _ = std::fs::remove_dir(p);
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Kata's launch and API sequence, exactly (Go runtime with QEMU): `virtiofs --log-level info --apisock
/// /run/vc/vm/<sid>/nydusd-api.sock --sock /run/vc/vm/<sid>/vhost-fs.sock --thread-pool-size=1
/// --announce-submounts` with no paths allowed on the command line, the passthrough share
/// /run/kata-containers/shared/sandboxes/<sid>/shared and a RAFS image under the nydus-snapshotter root.
/// Another sandbox's share directory is neither mountable nor visible.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn kata_launch_works_with_the_default_roots_and_stays_confined() {
    let mut host = HostDirs::default();
    let tag = format!(
        "rafsd-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let sandboxes = Path::new(rafsd::sandbox::KATA_SANDBOXES_ROOT);
    let sandbox = host.make(&sandboxes.join(&tag));
    let share = sandbox.join("shared");
    std::fs::create_dir(&share).unwrap();
    // A co-tenant: another sandbox's share, there before our daemon starts.
    let other = host.make(&sandboxes.join(format!("{tag}-other")));
    std::fs::create_dir(other.join("shared")).unwrap();
    std::fs::write(other.join("shared/secret"), b"another sandbox's file\n").unwrap();
    // A shared mount, as /run is on a systemd host: Kata's later per-container bind mounts into the share
    // must reach the sandboxed daemon's view (its mounts are slaves of the host's).
    host.bind(&share, &share, libc::MS_SHARED);
    std::fs::write(share.join("hello"), b"from the host share\n").unwrap();
    let snapshot = host.make(&Path::new("/var/lib/containerd-nydus/snapshots").join(&tag));
    let case = "v6-zstd-blake3";
    let bootstrap = snapshot.join("fs/image/image.boot");
    std::fs::create_dir_all(bootstrap.parent().unwrap()).unwrap();
    std::fs::copy(manifest::case_bootstrap(case), &bootstrap).unwrap();
    let blobs = snapshot.join("blobs");
    copy_dir(&manifest::case_blob_dir(case), &blobs);
    let cache = host.make(&Path::new("/var/lib/containerd-nydus/cache").join(&tag));

    // Kata's sockets: <VMStorePath>/<sid>/ (VMStorePath is /run/vc/vm).
    let vm = host.make(&Path::new("/run/vc/vm").join(&tag));
    let (sock, apisock) = (vm.join("vhost-fs.sock"), vm.join("nydusd-api.sock"));
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<std::ffi::OsString> = vec![
        "virtiofs".into(),
        "--log-level".into(),
        "info".into(),
        "--apisock".into(),
        apisock.clone().into(),
        "--sock".into(),
        sock.clone().into(),
        "--thread-pool-size=1".into(),
        "--announce-submounts".into(),
    ];
    let mut d = VirtiofsDaemon::start_at(BIN, sock, apisock, dir.path(), &args);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, t) = d.api("GET", "/api/v1/daemon", "").unwrap();
        let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
        if s == 200 && v["state"] == "RUNNING" {
            break;
        }
        assert!(Instant::now() < deadline, "not RUNNING: {s} {t}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = d.log_text();
    assert!(log.contains("Kata/nydus-snapshotter defaults"), "{log}");
    assert!(
        log.contains(&format!("read-write [\"{}\"", sandbox.display())),
        "{log}"
    );

    let mount = |mp: &str, body: serde_json::Value| {
        d.api(
            "POST",
            &format!("/api/v1/mount?mountpoint={mp}"),
            &body.to_string(),
        )
        .unwrap()
    };
    let (s, t) = mount(
        "/containers",
        serde_json::json!({"fs_type": "passthrough_fs", "source": share, "config": ""}),
    );
    assert_eq!(s, 204, "{t}\n{}", d.log_text());
    let config = daemon::v1_config(&blobs, &cache, true, "");
    let lowerdir = format!("/rafs/{tag}/lowerdir");
    let (s, t) = mount(
        &lowerdir,
        serde_json::json!({"fs_type": "rafs", "source": bootstrap, "config": config}),
    );
    assert_eq!(s, 204, "{t}\n{}", d.log_text());

    // The guest reads both through the one share, as the Kata agent's overlay would.
    let mut g = Guest::connect(&d.sock, Options::default()).expect("vhost-user handshake");
    g.fuse_init().unwrap();
    let hello = g.lookup_path(ROOT, "containers/hello").unwrap();
    assert_eq!(
        g.read_file(hello.nodeid, 4096).unwrap(),
        b"from the host share\n"
    );
    // Per container, Kata bind-mounts the snapshotter's snapshot dir into the share after the daemon
    // started (the overlay's upper layer): it must appear in the guest through /containers.
    std::fs::create_dir_all(snapshot.join("fs")).unwrap();
    std::fs::write(snapshot.join("fs/upper-file"), b"from the snapshot dir\n").unwrap();
    let snapshotdir = share.join(&tag).join("snapshotdir");
    std::fs::create_dir_all(&snapshotdir).unwrap();
    host.bind(&snapshot, &snapshotdir, libc::MS_SLAVE);
    let upper = g
        .lookup_path(ROOT, &format!("containers/{tag}/snapshotdir/fs/upper-file"))
        .unwrap();
    assert_eq!(
        g.read_file(upper.nodeid, 4096).unwrap(),
        b"from the snapshot dir\n"
    );
    // That bind arrived after start, with the host's flags (not nodev): the filter still refuses device
    // nodes there, while the guest's overlay can make its whiteouts.
    let upper_dir = g
        .lookup_path(ROOT, &format!("containers/{tag}/snapshotdir/fs"))
        .unwrap()
        .nodeid;
    let (major, minor) = a_block_device();
    let e = g
        .mknod(
            upper_dir,
            b"blk",
            libc::S_IFBLK | 0o600,
            libc::makedev(major, minor) as u32,
        )
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    g.mknod(upper_dir, b"whiteout", libc::S_IFCHR, 0).unwrap();
    assert!(snapshot.join("fs/whiteout").exists() && !snapshot.join("fs/blk").exists());
    let rel = "special/random-2m5";
    let want = manifest::load_manifest()
        .into_iter()
        .find(|r| r["path"] == rel)
        .unwrap()["sha256"]
        .clone();
    let file = g
        .lookup_path(ROOT, &format!("rafs/{tag}/lowerdir/{rel}"))
        .unwrap();
    let data = g.read_file(file.nodeid, 128 * 1024).unwrap();
    let got: String = <sha2::Sha256 as sha2::Digest>::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(got, want, "{rel} through the share");
    assert!(
        std::fs::read_dir(&cache).unwrap().count() > 0,
        "blob cache written under the snapshotter's cache dir"
    );

    // The snapshotter's blob cache is writable by the daemon, but never a share: a guest could write
    // chunks other images trust. Neither the cache root nor the mounted image's work dir in it.
    for source in [cache.parent().unwrap(), cache.as_path()] {
        let (s, t) = mount(
            "/cache",
            serde_json::json!({"fs_type": "passthrough_fs", "source": source, "config": ""}),
        );
        assert_eq!(s, 403, "{source:?}: {t}");
        assert!(t.contains("overlaps the blob cache"), "{t}");
    }

    // Still confined: outside the roots is refused, every thread filtered, host network on purpose.
    let outside = tempfile::tempdir().unwrap();
    let (s, t) = mount(
        "/elsewhere",
        serde_json::json!({"fs_type": "passthrough_fs", "source": outside.path(), "config": ""}),
    );
    assert_eq!(s, 403, "{t}");
    // The other sandbox's share: refused, and not in the view, so a symlink in ours leads nowhere.
    let (s, t) = mount(
        "/other",
        serde_json::json!({"fs_type": "passthrough_fs", "source": other.join("shared"), "config": ""}),
    );
    assert_eq!(s, 403, "{t}");
    assert!(t.contains("outside the sandbox's allowed paths"), "{t}");
    std::os::unix::fs::symlink(&other, share.join("to-other")).unwrap();
    let (s, t) = mount(
        "/other",
        serde_json::json!({"fs_type": "passthrough_fs", "source": share.join("to-other/shared"),
            "config": ""}),
    );
    assert!(
        s >= 400 && t.contains("No such file or directory"),
        "{s} {t}"
    );
    let view = PathBuf::from(format!("/proc/{}/root", daemon_child(d.pid())));
    let inside = |p: &Path| view.join(p.strip_prefix("/").unwrap());
    assert!(inside(&share).join("hello").exists());
    assert!(!inside(&other).exists(), "{other:?} visible in the sandbox");
    assert!(
        std::fs::read_dir(inside(sandboxes)).unwrap().count() == 1,
        "only our sandbox's directory"
    );
    let opts = mount_options(daemon_child(d.pid()), &sandbox);
    assert!(opts.contains("nodev") && opts.contains("nosuid"), "{opts}");
    let (s, t) = mount(
        "/rafs/other/lowerdir",
        serde_json::json!({"fs_type": "rafs", "source": manifest::case_bootstrap(case),
            "config": daemon::v1_config(&blobs, &cache, true, "")}),
    );
    assert_eq!(s, 403, "{t}");
    // A registry backend (what nydus-snapshotter usually sends) is not refused for want of a network (the
    // mount itself asks the registry nothing).
    let registry = serde_json::json!({"device": {"backend": {"type": "registry", "config":
        {"host": "127.0.0.1:9", "repo": "x/y", "scheme": "http"}},
        "cache": {"type": "blobcache", "config": {"work_dir": cache}}}, "mode": "direct"});
    let (s, t) = mount(
        "/rafs/registry/lowerdir",
        serde_json::json!({"fs_type": "rafs", "source": bootstrap, "config": registry.to_string()}),
    );
    assert_eq!(s, 204, "{t}");
    // Its first read of an uncached file gets as far as the host's loopback (an empty network namespace
    // would say unreachable).
    let cold = g
        .lookup_path(ROOT, "rafs/registry/lowerdir/etc/adduser.conf")
        .unwrap();
    let err = g.read_file(cold.nodeid, 4096).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let log = d.log_text();
    assert!(log.contains("Connection refused"), "{log}");
    let pid = daemon_child(d.pid());
    assert_every_thread_confined(pid);
    assert_eq!(ns(&pid.to_string(), "net"), ns("self", "net"));
    assert_ne!(ns(&pid.to_string(), "mnt"), ns("self", "mnt"));
    assert!(!PathBuf::from(format!("/proc/{pid}/root/etc/passwd")).exists());

    let (s, t) = d
        .api(
            "DELETE",
            &format!("/api/v1/mount?mountpoint={lowerdir}"),
            "",
        )
        .unwrap();
    assert_eq!(s, 204, "{t}");
    drop(g);
    let log = sigterm_and_wait(&mut d);
    assert!(log.contains("rafsd virtiofs stopped"), "{log}");
    assert!(log.contains("ended: Code(0)"), "{log}");
}

/// Any `--allow-*` option means the user chose: the Kata defaults are not added to it.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn an_explicit_allow_option_switches_the_kata_defaults_off() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, apisock) = VirtiofsDaemon::sockets(dir.path());
    let args: Vec<std::ffi::OsString> = vec![
        "virtiofs".into(),
        "--apisock".into(),
        apisock.into(),
        "--sock".into(),
        sock.into(),
        "--allow-network".into(),
    ];
    let d = VirtiofsDaemon::start_with_args(BIN, dir.path(), &args);
    let log = d.log_text();
    assert!(!log.contains("Kata/nydus-snapshotter defaults"), "{log}");
    let body = serde_json::json!({"fs_type": "passthrough_fs", "config": "",
        "source": "/run/kata-containers/shared/sandboxes/x/rw"});
    let (s, t) = d
        .api(
            "POST",
            "/api/v1/mount?mountpoint=/containers",
            &body.to_string(),
        )
        .unwrap();
    assert_eq!(s, 403, "{t}");
    d.kill_and_check();
}
