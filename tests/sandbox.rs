//! The sandbox, checked on the running daemon: seccomp mode, NO_NEW_PRIVS and capabilities of every
//! thread (from /proc), namespaces and the minimal root, a syscall outside the policy (kill and log
//! modes), API mounts outside the allowed paths, and symlinks in a passthrough share that point out of it.

mod daemon;
mod frontend;
mod manifest;

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
        let children =
            std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
                .unwrap_or_default();
        let pids: Vec<i32> = children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if let [pid] = pids[..] {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "supervisor {supervisor} has children {pids:?}, expected one daemon"
        );
        std::thread::sleep(Duration::from_millis(20));
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

/// The supervisor (not filtered: it reads no guest input) keeps `caps` only, in every set.
fn assert_supervisor_caps(pid: i32, caps: u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        let v = u64::from_str_radix(&status_field(&status, set), 16).unwrap();
        assert_eq!(v, caps, "supervisor {set}: {v:#x}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

#[test]
fn virtiofs_daemon_threads_are_confined_in_their_own_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("hello"), b"hello from the share\n").unwrap();
    let d = VirtiofsDaemon::start(BIN, dir.path(), &["--seccomp", "kill"]);
    let config = daemon::v1_config(
        &manifest::case_blob_dir("v6-zstd-blake3"),
        &dir.path().join("cache"),
        true,
        "",
    );
    d.mount_rafs("/img", &manifest::case_bootstrap("v6-zstd-blake3"), &config);
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
    // Pid 1 of its own pid namespace, with its own mount and network namespaces.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status_field(&status, "NSpid").ends_with("\t1")
            || status_field(&status, "NSpid").ends_with(" 1"),
        "NSpid: {}",
        status_field(&status, "NSpid")
    );
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
    assert_supervisor_caps(d.pid(), 1 << 1);
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
fn sigterm_to_the_supervisor_stops_the_sandboxed_daemon_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = VirtiofsDaemon::start(BIN, dir.path(), &[]);
    let pid = daemon_child(d.pid());
    let log = sigterm_and_wait(&mut d);
    assert!(log.contains("rafsd virtiofs stopped"), "{log}");
    assert!(
        log.contains(&format!("daemon {pid} ended: Code(0)")),
        "{log}"
    );
    assert!(!d.sock.exists() && !d.apisock.exists(), "sockets removed");
}

/// `rafsd virtiofs` with a share, the test hook's environment and `extra` options.
fn spawn_with_forbidden_syscall(dir: &Path, extra: &[&str]) -> (Child, PathBuf) {
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
        .env("RAFSD_TEST_FORBIDDEN_SYSCALL", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::OpenOptions::new().append(true).open(&log).unwrap())
        .spawn()
        .unwrap();
    (child, log)
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
fn a_syscall_outside_the_policy_kills_in_kill_mode() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, log) = spawn_with_forbidden_syscall(dir.path(), &["--seccomp", "kill"]);
    let pid = daemon_pid_from_log(&log);
    let status = daemon::wait_bounded(&mut child, Duration::from_secs(20))
        .expect("the daemon was not killed");
    let text = std::fs::read_to_string(&log).unwrap();
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
fn a_syscall_outside_the_policy_is_logged_in_log_mode() {
    // Without auditd the kernel prints audit records rate-limited ("kauditd_printk_skb: N callbacks
    // suppressed"), so one record can be dropped when other tests log at the same moment: a few
    // daemons in turn, each a fresh pid, each given longer than the 5 s rate-limit window.
    for attempt in 1..=3 {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, log) = spawn_with_forbidden_syscall(dir.path(), &["--seccomp", "log"]);
        let pid = daemon_pid_from_log(&log);
        let deadline = Instant::now() + Duration::from_secs(7);
        let record = loop {
            if let Some(r) = audit_record(pid) {
                break Some(r);
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "the daemon died in log mode:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("still alive"), "{text}");
        assert!(child.try_wait().unwrap().is_none(), "still serving");
        // SAFETY: signalling the process we started.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = daemon::wait_bounded(&mut child, Duration::from_secs(10)).expect("exit");
        assert_eq!(status.code(), Some(0));
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

#[test]
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
    assert_supervisor_caps(d.pid(), (1 << 1) | (1 << 21));
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

/// Kata's launch and API sequence, exactly: `virtiofs --log-level info --apisock A --sock S
/// --thread-pool-size=1 --announce-submounts` with no paths allowed on the command line, a passthrough
/// share under /run/kata-containers/shared and a RAFS image under the nydus-snapshotter root.
#[test]
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
    let sandbox = host.make(&Path::new("/run/kata-containers/shared/sandboxes").join(&tag));
    let share = sandbox.join("rw");
    std::fs::create_dir(&share).unwrap();
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

    let dir = tempfile::tempdir().unwrap();
    let (sock, apisock) = VirtiofsDaemon::sockets(dir.path());
    let args: Vec<std::ffi::OsString> = vec![
        "virtiofs".into(),
        "--log-level".into(),
        "info".into(),
        "--apisock".into(),
        apisock.into(),
        "--sock".into(),
        sock.into(),
        "--thread-pool-size=1".into(),
        "--announce-submounts".into(),
    ];
    let mut d = VirtiofsDaemon::start_with_args(BIN, dir.path(), &args);
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

    // Still confined: outside the roots is refused, every thread filtered, host network on purpose.
    let outside = tempfile::tempdir().unwrap();
    let (s, t) = mount(
        "/elsewhere",
        serde_json::json!({"fs_type": "passthrough_fs", "source": outside.path(), "config": ""}),
    );
    assert_eq!(s, 403, "{t}");
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
