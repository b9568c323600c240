//! nydus-snapshotter drives `rafsd` as its nydusd: `tests/snapshotter/` plays the snapshotter byte for
//! byte (argv, layout, HTTP requests, liveness monitor, supervisor) and every scenario reads the image
//! back against manifest.tsv. Needs root (FUSE mounts).

mod daemon;
mod manifest;
mod nydus_snapshotter;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nydus_snapshotter::{DaemonSpec, Liveness, Process, Recover, Snapshotter};

const CASE: &str = "v6-zstd-blake3";

/// Tests that use the snapshotter's real default root (shared daemons are allowed there without
/// options) take turns: they share `<root>/mnt`.
static DEFAULT_ROOT: Mutex<()> = Mutex::new(());

/// The default root for one test: created if missing and removed again afterwards if we created it.
struct DefaultRoot {
    path: PathBuf,
    created: bool,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl DefaultRoot {
    fn take() -> DefaultRoot {
        let turn = DEFAULT_ROOT.lock().unwrap_or_else(|e| e.into_inner());
        let path = PathBuf::from(nydus_snapshotter::DEFAULT_ROOT);
        let created = !path.exists();
        std::fs::create_dir_all(&path).unwrap();
        DefaultRoot {
            path,
            created,
            _turn: turn,
        }
    }
}

impl Drop for DefaultRoot {
    fn drop(&mut self) {
        let mnt = self.path.join("mnt");
        if daemon::is_mounted(&mnt) {
            daemon::lazy_unmount(&mnt);
        }
        if self.created {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn assert_image(root: &Path, what: &str, log: &Path) {
    let problems = manifest::compare_tree(root, manifest::allowances_for(CASE));
    assert!(
        problems.is_empty(),
        "{what}: {} mismatches, first: {:#?}\nlog:\n{}",
        problems.len(),
        &problems[..problems.len().min(10)],
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// The daemon's own log (`--log-file`), for failure messages.
fn log_of(s: &Snapshotter, spec: &DaemonSpec) -> PathBuf {
    spec.log_file(s)
}

/// `Terminate` (SIGTERM) then `Wait` (reap, then WaitUntilUnmounted): the daemon unmounts itself.
fn terminate(s: &Snapshotter, spec: &DaemonSpec, p: &mut Process) {
    p.signal(libc::SIGTERM);
    let status = p.wait(Duration::from_secs(20));
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(
        nydus_snapshotter::wait_until_unmounted(&spec.mountpoint(s)),
        "{} still mounted after the daemon exited",
        spec.mountpoint(s).display()
    );
}

/// What the snapshotter lays out before it starts a dedicated daemon for snapshot `sid`: the image,
/// the daemon's config file, the mountpoint and the socket folder.
fn prepare_dedicated(s: &Snapshotter, sid: &str) -> DaemonSpec {
    s.install_image(
        sid,
        &manifest::case_bootstrap(CASE),
        &manifest::case_blob_dir(CASE),
    );
    let spec = DaemonSpec::new(s, Some(sid));
    std::fs::create_dir_all(spec.config_file(s).parent().unwrap()).unwrap();
    std::fs::write(
        spec.config_file(s),
        s.instance_config(sid, &serde_json::json!({})),
    )
    .unwrap();
    std::fs::create_dir_all(spec.mountpoint(s)).unwrap();
    std::fs::create_dir_all(spec.apisock.parent().unwrap()).unwrap();
    spec
}

#[test]
fn version_has_the_git_commit_line_the_snapshotter_parses() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rafsd"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    // GetDaemonGitCommit: regexp `Git Commit:\s*(.+)`, trimmed.
    let commit = text
        .lines()
        .find_map(|l| l.strip_prefix("Git Commit:"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no `Git Commit:` line in {text:?}"));
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        Some(h) => assert_eq!(commit, h, "the commit this binary was built from"),
        None => assert_eq!(commit, "unknown"),
    }
    for key in ["Version:", "Build Time:", "Profile:", "Rustc:"] {
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {key} line in {text:?}"));
        assert!(!value.is_empty() && value != "unknown", "{key} {value:?}");
    }
    assert!(text.contains(&format!("Version: \t{}", env!("CARGO_PKG_VERSION"))));
    assert!(text.contains("Profile: \tdebug") || text.contains("Profile: \trelease"));
}

/// A dedicated daemon, started with the argv the snapshotter builds (every flag it passes: thread
/// count, config, bootstrap, log level, log rotation, log file, failover policy), reports RUNNING,
/// serves the image, keeps the snapshotter's idle liveness connection open, logs to its log file, and
/// unmounts on SIGTERM.
#[test]
fn dedicated_daemon_started_as_the_snapshotter_starts_it() {
    manifest::assert_root("FUSE mounts");
    let dir = tempfile::tempdir().unwrap();
    let s = Snapshotter::new(dir.path(), Recover::Restart);
    let spec = prepare_dedicated(&s, "17");
    let argv = spec.argv(&s, false);
    assert!(argv.contains(&"--log-rotation-size".to_string()));
    assert!(argv.ends_with(&["--failover-policy".into(), "resend".into()]));
    let mut p = Process::start(&s, &argv, &dir.path().join("stderr"));
    nydus_snapshotter::wait_until_socket_existed(&spec.apisock).unwrap();
    let live = Liveness::subscribe(&spec.apisock);
    let client = nydus_snapshotter::Client::new(&spec.apisock);
    client.wait_until_state("RUNNING").unwrap_or_else(|e| {
        panic!(
            "{e}\n{}",
            std::fs::read_to_string(log_of(&s, &spec)).unwrap_or_default()
        )
    });
    let info = client.daemon_info().unwrap();
    assert_eq!(
        info["version"]["git_commit"].as_str(),
        Some(rafsd::version::GIT_COMMIT)
    );
    // WaitUntilReady: blob cache metrics of the instance.
    let m = client
        .request("GET", "/api/v1/metrics/blobcache", &[], None)
        .unwrap();
    assert!(m.ok(), "{}", m.error());
    assert!(m.json()["underlying_files"].is_array());
    assert_image(&spec.mountpoint(&s), "dedicated", &log_of(&s, &spec));
    // The log went to --log-file, in a folder the daemon created.
    let log = std::fs::read_to_string(log_of(&s, &spec)).unwrap();
    assert!(log.contains("FUSE filesystem mounted"), "{log}");
    assert!(
        std::fs::read_to_string(dir.path().join("stderr"))
            .unwrap()
            .is_empty(),
        "with --log-file nothing goes to stderr"
    );
    // The idle liveness connection outlives the old 10 s idle limit.
    assert!(
        !live.died_within(Duration::from_secs(12)),
        "the liveness connection was hung up on a healthy daemon"
    );
    terminate(&s, &spec, &mut p);
    assert!(
        live.died_within(Duration::from_secs(5)),
        "the daemon's exit hangs up the liveness connection"
    );
}

/// The shared daemon: `fuse --mountpoint <root>/mnt` without config or bootstrap, then one API mount
/// per image beneath the snapshotter's root. Works with the snapshotter's argv alone (no --allow-path),
/// while paths outside the root stay refused.
#[test]
fn shared_daemon_mounts_images_through_the_api_out_of_the_box() {
    manifest::assert_root("FUSE mounts");
    let root = DefaultRoot::take();
    let s = Snapshotter::new(&root.path, Recover::Restart);
    let sids = [
        format!("t{}a", std::process::id()),
        format!("t{}b", std::process::id()),
    ];
    for sid in &sids {
        s.install_image(
            sid,
            &manifest::case_bootstrap(CASE),
            &manifest::case_blob_dir(CASE),
        );
    }
    let spec = DaemonSpec::new(&s, None);
    std::fs::create_dir_all(spec.mountpoint(&s)).unwrap();
    std::fs::create_dir_all(spec.apisock.parent().unwrap()).unwrap();
    let outside = tempfile::tempdir().unwrap();
    let mut p = Process::start(&s, &spec.argv(&s, false), &outside.path().join("stderr"));
    nydus_snapshotter::wait_until_socket_existed(&spec.apisock).unwrap();
    let _live = Liveness::subscribe(&spec.apisock);
    let client = nydus_snapshotter::Client::new(&spec.apisock);
    client.wait_until_state("RUNNING").unwrap();
    for sid in &sids {
        let r = client.mount(
            &format!("/{sid}"),
            &s.bootstrap(sid),
            &s.instance_config(sid, &serde_json::json!({})),
        );
        assert!(
            r.ok(),
            "mount {sid}: {}\n{}",
            r.error(),
            std::fs::read_to_string(log_of(&s, &spec)).unwrap_or_default()
        );
    }
    for sid in &sids {
        assert_image(&spec.mountpoint(&s).join(sid), sid, &log_of(&s, &spec));
        let m = client
            .request(
                "GET",
                "/api/v1/metrics/blobcache",
                &[("id", &format!("/{sid}"))],
                None,
            )
            .unwrap();
        assert!(m.ok(), "{}", m.error());
        let m = client
            .request(
                "GET",
                "/api/v1/metrics",
                &[("id", &format!("/{sid}"))],
                None,
            )
            .unwrap();
        assert!(
            m.ok() && m.json()["data_read"].as_u64().unwrap() > 0,
            "{}",
            m.body
        );
    }
    // The defaults are the snapshotter's roots, nothing else.
    let foreign = outside.path().join("image.boot");
    std::fs::copy(manifest::case_bootstrap(CASE), &foreign).unwrap();
    let r = client.mount(
        "/foreign",
        &foreign,
        &s.instance_config("foreign", &serde_json::json!({})),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    let log = std::fs::read_to_string(log_of(&s, &spec)).unwrap();
    assert!(
        log.contains("nydus-snapshotter defaults"),
        "the defaults are logged:\n{log}"
    );
    let r = client.umount(&format!("/{}", sids[0]));
    assert!(r.ok(), "{}", r.error());
    assert_image(
        &spec.mountpoint(&s).join(&sids[1]),
        "after the other unmount",
        &log_of(&s, &spec),
    );
    terminate(&s, &spec, &mut p);
    for sid in &sids {
        let _ = std::fs::remove_dir_all(s.snapshot_dir(sid));
    }
}

/// `--log-rotation-size` rotates the daemon's log inside the sandbox (Landlock lets it rename in the
/// log folder and nowhere else).
#[test]
fn the_log_rotates_at_the_given_size() {
    manifest::assert_root("FUSE mounts");
    let dir = tempfile::tempdir().unwrap();
    let mut s = Snapshotter::new(dir.path(), Recover::Restart);
    s.log_rotation_size = 1;
    s.log_level = "trace".into();
    let spec = prepare_dedicated(&s, "9");
    let mut p = Process::start(&s, &spec.argv(&s, false), &dir.path().join("stderr"));
    nydus_snapshotter::wait_until_socket_existed(&spec.apisock).unwrap();
    let client = nydus_snapshotter::Client::new(&spec.apisock);
    client.wait_until_state("RUNNING").unwrap();
    let log = log_of(&s, &spec);
    let first = PathBuf::from(format!("{}.1", log.display()));
    for round in 0..200 {
        if first.exists() {
            break;
        }
        assert!(
            round < 199,
            "no rotation after 200 rounds of requests; log is {:?} bytes, rotation failures: {:?}",
            std::fs::metadata(&log).map(|m| m.len()),
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("rotation"))
                .take(3)
                .collect::<Vec<_>>()
        );
        // Distinct names: each is one FUSE LOOKUP, traced.
        for i in 0..100 {
            let _ = std::fs::metadata(spec.mountpoint(&s).join(format!("nothing-{round}-{i}")));
        }
    }
    assert!(
        std::fs::metadata(&first).unwrap().len() <= 1 << 20,
        "{:?}",
        std::fs::read_dir(log.parent().unwrap())
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name(), e.metadata().unwrap().len())
            })
            .collect::<Vec<_>>()
    );
    assert!(std::fs::metadata(&log).unwrap().len() <= 1 << 20);
    // Still logging into the new file.
    let before = std::fs::metadata(&log).unwrap().len();
    let _ = std::fs::metadata(spec.mountpoint(&s).join("still-logging"));
    std::thread::sleep(Duration::from_millis(100));
    assert!(std::fs::metadata(&log).unwrap().len() > before);
    terminate(&s, &spec, &mut p);
}
