//! nydus-snapshotter drives `rafsd` as its nydusd: `tests/snapshotter/` plays the snapshotter byte for
//! byte (argv, layout, HTTP requests, liveness monitor, supervisor) and every scenario reads the image
//! back against manifest.tsv. Needs root (FUSE mounts).

use kit::{daemon, manifest, nydus_snapshotter, services};

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nydus_snapshotter::{DaemonSpec, Liveness, Process, Recover, Snapshotter};

const CASE: &str = "v6-zstd-blake3";

/// Tests that use the snapshotter's real default root (shared daemons are allowed there without
/// options) take turns: they share `<root>/mnt`.
static DEFAULT_ROOT: Mutex<()> = Mutex::new(());

/// The default root for one test: created if missing and removed again afterwards (with the parents
/// it had to create) if we created it.
struct DefaultRoot {
    path: PathBuf,
    /// The outermost directory this test created, if any.
    created: Option<PathBuf>,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl DefaultRoot {
    /// Remove what one test put under a root that existed before it (a root the test created goes
    /// as a whole): the daemon's socket, log, config and supervisor files, and each snapshot and cache.
    fn forget(&self, s: &Snapshotter, daemons: &[&str], sids: &[String]) {
        for id in daemons {
            for d in ["socket", "logs", "config"] {
                let _ = std::fs::remove_dir_all(self.path.join(d).join(id));
            }
            let _ = std::fs::remove_file(self.path.join("supervisor").join(format!("{id}.sock")));
        }
        for sid in sids {
            let _ = std::fs::remove_dir_all(s.snapshot_dir(sid));
            let _ = std::fs::remove_dir_all(self.path.join("cache").join(sid));
        }
    }

    fn take() -> DefaultRoot {
        let turn = DEFAULT_ROOT.lock().unwrap_or_else(|e| e.into_inner());
        let path = PathBuf::from(nydus_snapshotter::DEFAULT_ROOT);
        let created = path
            .ancestors()
            .take_while(|a| !a.exists())
            .last()
            .map(Path::to_path_buf);
        std::fs::create_dir_all(&path).unwrap();
        // A mount some earlier run left there would make our daemon take it for a crashed
        // predecessor's and wait for a takeover in state INIT.
        let mnt = path.join("mnt");
        if daemon::is_mounted(&mnt) {
            eprintln!("detaching a stale mount at {}", mnt.display());
            daemon::lazy_unmount(&mnt);
        }
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
        if let Some(created) = &self.created {
            let _ = std::fs::remove_dir_all(created);
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
#[ignore = "needs root: ci/test.sh"]
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
#[ignore = "needs root: ci/test.sh"]
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
    // GetInflightMetrics: nothing in flight is a 204 (the snapshotter decodes only other answers).
    let r = client
        .request("GET", "/api/v1/metrics/inflight", &[], None)
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.body);
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
#[ignore = "needs root: ci/test.sh"]
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
    root.forget(&s, &[&spec.id], &sids);
}

/// `--log-rotation-size` rotates the daemon's log inside the sandbox (Landlock lets it rename in the
/// log folder and nowhere else).
#[test]
#[ignore = "needs root: ci/test.sh"]
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
    // Still logging into the new file: wait (bounded) for the lines of one more LOOKUP, in this file
    // or, should they have rotated it again, in the next one.
    use std::os::unix::fs::MetadataExt;
    let before = std::fs::metadata(&log).unwrap();
    let _ = std::fs::metadata(spec.mountpoint(&s).join("still-logging"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&log).is_ok_and(|m| m.ino() == before.ino() && m.len() <= before.len())
        || !log.exists()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing logged into {} after a rotation",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    terminate(&s, &spec, &mut p);
}

/// Hash of each regular file of the fixture, keyed by path relative to the image root.
fn manifest_hashes() -> Vec<(String, String, u64)> {
    manifest::load_manifest()
        .into_iter()
        .filter(|r| r["type"] == "f")
        .map(|r| {
            (
                r["path"].clone(),
                r["sha256"].clone(),
                r["size"].parse().unwrap_or(0),
            )
        })
        .collect()
}

/// Not a test: the body of the reader processes (see `nydus_snapshotter::Reader`).
#[test]
fn reader_process() {
    nydus_snapshotter::reader_main();
}

/// recover_policy = "failover" with a dedicated daemon: kill -9, and the snapshotter's failover brings
/// a new daemon onto the same mount; a file opened before the crash (by another process) reads on
/// through it, the tree still matches the manifest, and the mount never went away.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn failover_after_kill_9_keeps_the_mount_and_open_files() {
    manifest::assert_root("FUSE mounts");
    let dir = tempfile::tempdir().unwrap();
    let s = Snapshotter::new(dir.path(), Recover::Failover);
    let spec = prepare_dedicated(&s, "31");
    let mnt = spec.mountpoint(&s);
    let (path, sha, size) = manifest_hashes()
        .into_iter()
        .max_by_key(|(_, _, size)| *size)
        .unwrap();
    let mut m = nydus_snapshotter::Managed::start(&s, spec, &dir.path().join("stderr"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        m.supervisor.as_ref().unwrap().has_fd(),
        "SendStates after RUNNING"
    );
    let info = m.client.daemon_info().unwrap();
    assert_eq!(
        info["supervisor"].as_str().map(PathBuf::from),
        Some(m.spec.supervisor_sock(&s))
    );
    // Another process opens the largest file, reads half, and holds it open across both crashes.
    let (mut holder, go) = nydus_snapshotter::Reader::hold_open(
        "reader_process",
        (mnt.join(&path), sha, size),
        dir.path(),
        "holder",
    );
    for victim in ["daemon", "supervisor process"] {
        kill_9(&m, victim);
        assert!(
            m.live.as_ref().unwrap().died_within(Duration::from_secs(5)),
            "the liveness monitor sees the death of the {victim}"
        );
        let died = std::time::Instant::now();
        assert!(daemon::is_mounted(&mnt), "the mount outlives the {victim}");
        let r = m
            .failover(died)
            .unwrap_or_else(|e| panic!("failover after killing the {victim}: {e}\n{}", m.log()));
        eprintln!("failover after killing the {victim}: {r:?}");
        assert!(daemon::is_mounted(&mnt));
    }
    // The handle opened before both crashes reads on, with the right bytes.
    std::fs::write(&go, b"").unwrap();
    let held = holder
        .finish(Duration::from_secs(30))
        .expect("the holder finishes");
    assert!(held.errors.is_empty() && held.files_ok == 1, "{held:?}");
    assert_image(&mnt, "after two failovers", &m.spec.log_file(&s));
    m.destroy(&[]).unwrap_or_else(|e| panic!("{e}"));
    // Its supervisor's descriptor closed, the mount is gone for good.
    assert!(!daemon::is_mounted(&mnt));
}

/// kill -9 the process the snapshotter started ("supervisor process"), or the sandboxed daemon under
/// it ("daemon").
fn kill_9(m: &nydus_snapshotter::Managed, victim: &str) {
    let pid = if victim == "daemon" {
        child_of(m.process.pid())
    } else {
        m.process.pid()
    };
    // SAFETY: killing a process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// The sandboxed daemon under the process the snapshotter started (our sandbox supervisor).
fn child_of(pid: i32) -> i32 {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    children
        .split_whitespace()
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{pid} has no child"))
}

/// The load the failover rounds run under: a blob server that answers every read after `delay`
/// (a slow registry), and per round a new image instance with a cold cache of its own.
struct SlowImages {
    server: services::FakeServer,
}

impl SlowImages {
    fn new(delay: Duration) -> SlowImages {
        let server = services::FakeServer::start(services::FakeOptions {
            repo: "library/fixture".into(),
            bearer: None,
            token_basic: None,
            redirect_to: None,
            storage_head_403: false,
        });
        for blob in std::fs::read_dir(manifest::case_blob_dir(CASE)).unwrap() {
            let blob = blob.unwrap();
            let id = server.add_blob(std::fs::read(blob.path()).unwrap());
            assert_eq!(
                id,
                blob.file_name().to_string_lossy(),
                "blob ids are sha256"
            );
        }
        server.set_always(Some(services::Fault::Slow(delay)));
        SlowImages { server }
    }

    /// The snapshotter's per-instance config: the blobs from the slow server, a cache of its own.
    fn config(&self, s: &Snapshotter, sid: &str) -> String {
        serde_json::json!({
            "device": {
                "id": format!("/{sid}"),
                "backend": {"type": "http-proxy", "config": {
                    "addr": format!("http://127.0.0.1:{}", self.server.port), "path": "/blobs"}},
                "cache": {"type": "blobcache", "config": {"work_dir": s.root.join("cache").join(sid)}}
            },
            "mode": "direct",
            "digest_validate": true
        })
        .to_string()
    }
}

/// 8 readers streaming `files` (every 4th of the image, the largest first) from `root`.
fn start_readers(
    root: &Path,
    files: &[(String, String, u64)],
    out_dir: &Path,
    tag: &str,
) -> Vec<nydus_snapshotter::Reader> {
    (0..8)
        .map(|i| {
            let mine = files
                .iter()
                .skip(i)
                .step_by(8)
                .map(|(p, sha, size)| (root.join(p), sha.clone(), *size))
                .collect();
            nydus_snapshotter::Reader::spawn(
                "reader_process",
                nydus_snapshotter::ReaderJob {
                    files: mine,
                    chunk: 128 << 10,
                    out: out_dir.join(format!("{tag}-{i}.json")),
                    hold_until: None,
                },
            )
        })
        .collect()
}

/// Every reader finished in time, read every file, and got the right bytes; the slowest read (ms).
fn check_readers(
    mut readers: Vec<nydus_snapshotter::Reader>,
    what: &str,
    log: &dyn Fn() -> String,
) -> f64 {
    let mut slowest = 0f64;
    for (i, r) in readers.iter_mut().enumerate() {
        let result = r
            .finish(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{what}: reader {i} hangs or died\n{}", log()));
        assert!(
            result.errors.is_empty() && result.files_ok == r.job.files.len(),
            "{what}: reader {i}: {} of {} files, errors {:?}\n{}",
            result.files_ok,
            r.job.files.len(),
            &result.errors[..result.errors.len().min(5)],
            log()
        );
        slowest = slowest.max(result.max_read_ms);
    }
    slowest
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Failover under load, 20 times, then a live upgrade under the same load, 20 times: the shared daemon
/// (no options beyond the snapshotter's) serves a new image instance each round, read cold through a
/// slow backend by 8 reader processes; kill -9 lands while reads are in flight, and with
/// `--failover-policy resend` every reader finishes with the right bytes, nothing hangs. Between rounds
/// the previous instance is unmounted, so mount indexes and pseudo directories have gaps the successor
/// must reproduce.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn failover_and_upgrade_under_load_lose_no_request() {
    manifest::assert_root("FUSE mounts");
    let root = DefaultRoot::take();
    let s = Snapshotter::new(&root.path, Recover::Failover);
    let work = tempfile::tempdir().unwrap();
    let images = SlowImages::new(Duration::from_millis(150));
    let mut files = manifest_hashes();
    files.sort_by_key(|(_, _, size)| std::cmp::Reverse(*size));
    let files: Vec<_> = files.into_iter().step_by(4).collect();
    let spec = DaemonSpec::new(&s, None);
    let mut m = nydus_snapshotter::Managed::start(&s, spec, &work.path().join("stderr"))
        .unwrap_or_else(|e| panic!("{e}"));
    let mnt = m.spec.mountpoint(&s);
    let rounds = 20;
    let tag = format!("t{}", std::process::id());
    let mut instances: Vec<(String, String)> = Vec::new();
    let (mut daemon_ms, mut total_ms, mut read_ms) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..2 * rounds {
        let upgrade = round >= rounds;
        let sid = format!("{tag}r{round}");
        s.install_image(
            &sid,
            &manifest::case_bootstrap(CASE),
            &manifest::case_blob_dir(CASE),
        );
        let config = images.config(&s, &sid);
        m.shared_mount(&sid, &config)
            .unwrap_or_else(|e| panic!("round {round}: mount: {e}\n{}", m.log()));
        instances.push((sid.clone(), config));
        let readers = start_readers(&mnt.join(&sid), &files, work.path(), &sid);
        // Let the readers get going: cold reads are now waiting on the slow backend.
        std::thread::sleep(Duration::from_millis(300));
        let r = if upgrade {
            m.upgrade(&instances)
                .unwrap_or_else(|e| panic!("round {round}: upgrade: {e}\n{}", m.log()))
        } else {
            kill_9(
                &m,
                if round % 2 == 0 {
                    "daemon"
                } else {
                    "supervisor process"
                },
            );
            assert!(m.live.as_ref().unwrap().died_within(Duration::from_secs(5)));
            let died = std::time::Instant::now();
            m.failover(died)
                .unwrap_or_else(|e| panic!("round {round}: failover: {e}\n{}", m.log()))
        };
        let slowest = check_readers(readers, &format!("round {round}"), &|| m.log());
        assert!(
            daemon::is_mounted(&mnt),
            "round {round}: the mount went away"
        );
        eprintln!(
            "round {round} ({}): daemon {:.0} ms, snapshotter waits {:.0} ms, total {:.0} ms, slowest read {slowest:.0} ms",
            if upgrade { "upgrade" } else { "kill -9" },
            r.daemon.as_secs_f64() * 1e3,
            r.snapshotter_wait.as_secs_f64() * 1e3,
            r.total.as_secs_f64() * 1e3
        );
        daemon_ms.push(r.daemon.as_secs_f64() * 1e3);
        total_ms.push(r.total.as_secs_f64() * 1e3);
        read_ms.push(slowest);
        // Unmount the previous instance: indexes and pseudo directories get gaps.
        if instances.len() > 1 {
            let (old, _) = instances.remove(0);
            let r = m.client.umount(&format!("/{old}"));
            assert!(r.ok(), "{}", r.error());
            m.send_states().unwrap();
        }
        if round + 1 == rounds || round + 1 == 2 * rounds {
            let kind = if upgrade { "upgrade" } else { "failover" };
            eprintln!(
                "{kind} x{rounds}: daemon gap median {:.0} ms max {:.0} ms; snapshotter-observed gap median {:.0} ms max {:.0} ms; slowest read median {:.0} ms max {:.0} ms",
                median(&mut daemon_ms.clone()),
                daemon_ms.iter().cloned().fold(0f64, f64::max),
                median(&mut total_ms.clone()),
                total_ms.iter().cloned().fold(0f64, f64::max),
                median(&mut read_ms.clone()),
                read_ms.iter().cloned().fold(0f64, f64::max),
            );
            daemon_ms.clear();
            total_ms.clear();
            read_ms.clear();
        }
    }
    assert_image(
        &mnt.join(&instances[0].0),
        "after the rounds",
        &m.spec.log_file(&s),
    );
    let sids: Vec<String> = instances.iter().map(|(sid, _)| sid.clone()).collect();
    m.destroy(&sids).unwrap_or_else(|e| panic!("{e}"));
    let every: Vec<String> = (0..2 * rounds).map(|r| format!("{tag}r{r}")).collect();
    root.forget(&s, &[&m.spec.id], &every);
}

/// `--failover-policy`, with reads certainly in flight when the daemon dies (the backend answers after
/// 2 s; the kill waits until `GET /metrics/inflight` shows FUSE_READs): `resend` serves them again and
/// the readers get the right bytes, `flush` fails them with EIO at once, `none` leaves them blocked
/// (until the mount goes away).
#[test]
#[ignore = "needs root: ci/test.sh"]
fn failover_policies_decide_what_happens_to_requests_in_flight() {
    manifest::assert_root("FUSE mounts");
    let images = SlowImages::new(Duration::from_secs(2));
    let mut files = manifest_hashes();
    files.sort_by_key(|(_, _, size)| std::cmp::Reverse(*size));
    for policy in ["resend", "flush", "none"] {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Snapshotter::new(dir.path(), Recover::Failover);
        s.failover_policy = policy.into();
        let sid = "44";
        s.install_image(
            sid,
            &manifest::case_bootstrap(CASE),
            &manifest::case_blob_dir(CASE),
        );
        let spec = DaemonSpec::new(&s, Some(sid));
        std::fs::create_dir_all(spec.config_file(&s).parent().unwrap()).unwrap();
        std::fs::write(spec.config_file(&s), images.config(&s, sid)).unwrap();
        let mut m = nydus_snapshotter::Managed::start(&s, spec, &dir.path().join("stderr"))
            .unwrap_or_else(|e| panic!("{policy}: {e}"));
        let mnt = m.spec.mountpoint(&s);
        let readers = start_readers(&mnt, &files[..8], dir.path(), policy);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let in_flight = loop {
            let r = m
                .client
                .request("GET", "/api/v1/metrics/inflight", &[], None)
                .unwrap();
            if r.status == 200 {
                let ops = r.json();
                // FUSE_READ is opcode 15.
                if ops.as_array().unwrap().iter().any(|o| o["opcode"] == 15) {
                    break ops;
                }
            } else {
                assert_eq!(r.status, 204, "{}", r.body);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{policy}: no read ever in flight"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        kill_9(&m, "daemon");
        assert!(m.live.as_ref().unwrap().died_within(Duration::from_secs(5)));
        m.failover(std::time::Instant::now())
            .unwrap_or_else(|e| panic!("{policy}: {e}\n{}", m.log()));
        // The new daemon's workers log each request the kernel sends again as they read it, which can
        // be after the failover is over: wait (bounded) for the lines.
        let log_file = m.spec.log_file(&s);
        let resent = |log: &str| log.matches("sent again by the kernel").count();
        let flushed = |log: &str| {
            log.matches("failed with EIO (--failover-policy flush)")
                .count()
        };
        match policy {
            "resend" => {
                let log = log_when(&log_file, |log| resent(log) > 0);
                let resent = resent(&log);
                assert!(
                    resent > 0,
                    "{policy}: nothing was resent; in flight: {in_flight}\n{log}"
                );
                check_readers(readers, policy, &|| m.log());
            }
            "flush" => {
                let log = log_when(&log_file, |log| {
                    resent(log) > 0 && flushed(log) == resent(log)
                });
                let resent = resent(&log);
                assert!(
                    resent > 0,
                    "{policy}: nothing was resent; in flight: {in_flight}\n{log}"
                );
                assert_eq!(flushed(&log), resent, "{log}");
                // Nobody hangs. A reader may still get its bytes: the kernel reads a page again when
                // the request that failed was readahead rather than the reader's own read.
                for mut r in readers {
                    let res = r
                        .finish(Duration::from_secs(30))
                        .unwrap_or_else(|| panic!("{policy}: a reader hangs\n{}", m.log()));
                    assert!(
                        res.errors.iter().all(|e| e.contains("Input/output error")),
                        "{policy}: {:?}",
                        res.errors
                    );
                }
            }
            _ => {
                let mut blocked = 0;
                let mut readers = readers;
                std::thread::sleep(Duration::from_secs(8));
                let log = std::fs::read_to_string(&log_file).unwrap();
                assert_eq!(resent(&log), 0, "{policy}: {log}");
                for r in &mut readers {
                    if r.finish(Duration::ZERO).is_none() {
                        blocked += 1;
                    }
                }
                assert!(
                    blocked > 0,
                    "{policy}: the reads in flight ({in_flight}) should stay blocked"
                );
                // Closing the supervisor's descriptor and unmounting ends them (with an error).
                drop(m);
                for mut r in readers {
                    assert!(
                        r.finish(Duration::from_secs(20)).is_some(),
                        "{policy}: still blocked after the mount went away"
                    );
                }
                continue;
            }
        }
        m.destroy(&[]).unwrap_or_else(|e| panic!("{policy}: {e}"));
    }
}

/// The text of the log at `path` once `done` holds for it, or after 20 s (the caller's assertion then
/// says what is missing).
fn log_when(path: &Path, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if done(&log) || std::time::Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// recover_policy = "restart" with the shared daemon: after kill -9 of the daemon the snapshotter
/// starts a fresh one (no supervisor, no takeover) and mounts every instance again. A dead mount left
/// by the killed daemon does not make the new one wait for a takeover that cannot come.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn restart_policy_gets_a_fresh_shared_daemon_with_every_instance() {
    manifest::assert_root("FUSE mounts");
    let root = DefaultRoot::take();
    let s = Snapshotter::new(&root.path, Recover::Restart);
    let work = tempfile::tempdir().unwrap();
    let sids = [
        format!("t{}x", std::process::id()),
        format!("t{}y", std::process::id()),
    ];
    let mut instances = Vec::new();
    for sid in &sids {
        s.install_image(
            sid,
            &manifest::case_bootstrap(CASE),
            &manifest::case_blob_dir(CASE),
        );
        instances.push((sid.clone(), s.instance_config(sid, &serde_json::json!({}))));
    }
    let spec = DaemonSpec::new(&s, None);
    let mut m = nydus_snapshotter::Managed::start(&s, spec, &work.path().join("stderr"))
        .unwrap_or_else(|e| panic!("{e}"));
    for (sid, config) in &instances {
        m.shared_mount(sid, config).unwrap();
    }
    let mnt = m.spec.mountpoint(&s);
    let (path, sha, size) = manifest_hashes().into_iter().next().unwrap();
    for victim in ["daemon", "supervisor process"] {
        // A container still has a file open: the snapshotter's plain umount of the dead mount fails
        // (EBUSY), and the dead mount is still there when the new daemon starts.
        let (mut holder, go) = nydus_snapshotter::Reader::hold_open(
            "reader_process",
            (mnt.join(&sids[0]).join(&path), sha.clone(), size),
            work.path(),
            &format!("holder-{}", victim.len()),
        );
        kill_9(&m, victim);
        assert!(m.live.as_ref().unwrap().died_within(Duration::from_secs(5)));
        let r = m
            .restart(std::time::Instant::now(), &instances)
            .unwrap_or_else(|e| panic!("restart after killing the {victim}: {e}\n{}", m.log()));
        eprintln!("restart after killing the {victim}: {r:?}");
        // The holder's file belonged to the dead connection; it ends with an error, not a hang.
        std::fs::write(&go, b"").unwrap();
        assert!(
            holder.finish(Duration::from_secs(20)).is_some(),
            "the holder hangs"
        );
        for sid in &sids {
            assert_image(&mnt.join(sid), victim, &m.spec.log_file(&s));
        }
    }
    m.destroy(&sids).unwrap_or_else(|e| panic!("{e}"));
    root.forget(&s, &[&m.spec.id], &sids);
}

/// What must not hang the snapshotter or break a daemon: a sendfd that cannot hand over (a passthrough
/// share's inodes cannot move) still connects and hangs up, so the supervisor's receiver returns; a
/// supervisor with foreign or broken state gets a clear error and the daemon stays in INIT; events in
/// the wrong state are refused; and without a supervisor, PUT /daemon/exit unmounts (nobody could take
/// over).
#[test]
#[ignore = "needs root: ci/test.sh"]
fn failed_handovers_are_clear_errors_and_hang_nobody() {
    use std::os::fd::OwnedFd;
    manifest::assert_root("FUSE mounts");
    let dir = tempfile::tempdir().unwrap();
    let s = Snapshotter::new(dir.path(), Recover::Failover);
    let share = dir.path().join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("f"), b"x").unwrap();
    let spec = DaemonSpec::new(&s, None);
    std::fs::create_dir_all(spec.mountpoint(&s)).unwrap();
    std::fs::create_dir_all(spec.apisock.parent().unwrap()).unwrap();
    let sup = nydus_snapshotter::Supervisor::new(&spec.supervisor_sock(&s));
    let mut argv = spec.argv(&s, false);
    argv.extend([
        "--allow-path-rw".into(),
        dir.path().to_string_lossy().into_owned(),
    ]);
    let mut p = Process::start(&s, &argv, &dir.path().join("stderr"));
    nydus_snapshotter::wait_until_socket_existed(&spec.apisock).unwrap();
    let client = nydus_snapshotter::Client::new(&spec.apisock);
    client.wait_until_state("RUNNING").unwrap();
    // Events of other states.
    for (path, want) in [
        ("/api/v1/daemon/fuse/takeover", "only valid in state INIT"),
        ("/api/v1/daemon/start", "only valid in state READY"),
    ] {
        let r = client.put(path);
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        assert!(
            r.body.contains(want) && r.body.contains("UnexpectedEvent"),
            "{}",
            r.body
        );
    }
    let body =
        serde_json::json!({"fs_type": "passthrough_fs", "source": share, "config": ""}).to_string();
    let r = client
        .request(
            "POST",
            "/api/v1/mount",
            &[("mountpoint", "/share")],
            Some(&body),
        )
        .unwrap();
    assert!(r.ok(), "{}", r.error());
    let started = std::time::Instant::now();
    let e = sup
        .fetch_daemon_states(Duration::from_secs(20), || {
            client.put("/api/v1/daemon/fuse/sendfd")
        })
        .unwrap_err();
    assert!(
        e.contains("passthrough") && e.contains("received no control file descriptor"),
        "{e}"
    );
    // Refused, not left to the receiver's 20 s timeout (with room for a loaded machine).
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the receiver waited {:?}",
        started.elapsed()
    );
    assert!(client
        .request("DELETE", "/api/v1/mount", &[("mountpoint", "/share")], None)
        .unwrap()
        .ok());
    // Now it can hand over.
    sup.fetch_daemon_states(Duration::from_secs(20), || {
        client.put("/api/v1/daemon/fuse/sendfd")
    })
    .unwrap();

    // A successor with --upgrade meets a supervisor holding foreign state, then a foreign descriptor.
    let mut next = spec.clone();
    next.apisock = nydus_snapshotter::next_api_socket(&spec.apisock);
    let mut q = Process::start(&s, &next.argv(&s, true), &dir.path().join("stderr2"));
    nydus_snapshotter::wait_until_socket_existed(&next.apisock).unwrap();
    let next_client = nydus_snapshotter::Client::new(&next.apisock);
    next_client.wait_until_state("INIT").unwrap();
    let null = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    let cases: [(Vec<u8>, &str); 3] = [
        (b"\x01\x02 versionize".to_vec(), "not written by rafsd"),
        (b"rafsd-state\n{\"version\":9}".to_vec(), "version 9"),
        (
            format!(
                "rafsd-state\n{}",
                serde_json::json!({"version": 2, "front_end": "fusedev", "daemon_id": null,
                "fuse": {"major": 7, "minor": 45, "max_readahead": 0, "flags": 0},
                "pseudo_dirs": [], "mounts": [], "device": null})
            )
            .into_bytes(),
            "not a /dev/fuse connection",
        ),
    ];
    for (data, want) in cases {
        sup.store(data, null());
        let sender = sup.send_states_timeout(Duration::from_secs(10));
        let r = next_client.put("/api/v1/daemon/fuse/takeover");
        sender.join().unwrap().unwrap();
        assert!(
            !r.ok() && r.body.contains(want),
            "{want}: {} {}",
            r.status,
            r.body
        );
        assert_eq!(next_client.state().as_deref(), Some("INIT"));
    }
    // SIGTERM in INIT: nothing of its own to unmount, and the other daemon's mount stays.
    q.signal(libc::SIGTERM);
    assert!(q.wait(Duration::from_secs(20)).success());
    assert!(daemon::is_mounted(&spec.mountpoint(&s)));
    assert_eq!(client.state().as_deref(), Some("RUNNING"));
    drop(sup);

    // Without --supervisor nobody can take over: PUT /daemon/exit unmounts.
    let mut s2 = s.clone();
    s2.recover = Recover::Restart;
    let dedicated = prepare_dedicated(&s2, "55");
    let mut d = Process::start(
        &s2,
        &dedicated.argv(&s2, false),
        &dir.path().join("stderr3"),
    );
    nydus_snapshotter::wait_until_socket_existed(&dedicated.apisock).unwrap();
    let dc = nydus_snapshotter::Client::new(&dedicated.apisock);
    dc.wait_until_state("RUNNING").unwrap();
    let r = dc.put("/api/v1/daemon/fuse/sendfd");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("without --supervisor"), "{}", r.body);
    assert!(dc.put("/api/v1/daemon/exit").ok());
    assert!(d.wait(Duration::from_secs(20)).success());
    assert!(nydus_snapshotter::wait_until_unmounted(
        &dedicated.mountpoint(&s2)
    ));
    // And the first daemon unmounts on SIGTERM even though the supervisor held its connection.
    p.signal(libc::SIGTERM);
    assert!(p.wait(Duration::from_secs(20)).success());
    assert!(nydus_snapshotter::wait_until_unmounted(
        &spec.mountpoint(&s)
    ));
}

/// Regular files of the image read through `root`: how many have the manifest's bytes, and the first
/// errors (a file the daemon cannot fetch reads as an error).
fn read_files(root: &Path, files: &[(String, String, u64)]) -> (usize, Vec<String>) {
    use sha2::Digest;
    let (mut ok, mut errors) = (0, Vec::new());
    for (path, sha, _) in files {
        match std::fs::read(root.join(path)) {
            Ok(data) if format!("{:x}", sha2::Sha256::digest(&data)) == *sha => ok += 1,
            Ok(_) => errors.push(format!("{path}: wrong bytes")),
            Err(e) => errors.push(format!("{path}: {e}")),
        }
    }
    (ok, errors)
}

/// Credential renewal: the registry's password is rotated under a running shared daemon; reads of data
/// not yet cached fail with the old credentials, and after the snapshotter's
/// `PUT /api/v1/config?id=/<sid>` `{"registry_auth": ...}` they succeed, with no remount. The renewed
/// credentials also travel with the state to a successor after kill -9.
#[test]
#[ignore = "needs root, servers: ci/test.sh"]
fn registry_credentials_are_renewed_without_a_remount() {
    manifest::assert_root("FUSE mounts");
    for tool in ["docker-registry", "htpasswd"] {
        assert!(
            services::have(tool),
            "`{tool}` is missing: run ci/install-deps.sh"
        );
    }
    let root = DefaultRoot::take();
    let s = Snapshotter::new(&root.path, Recover::Failover);
    let work = tempfile::tempdir().unwrap();
    let repo = "rafsd/renewal";
    let reg_dir = work.path().join("registry");
    std::fs::create_dir_all(&reg_dir).unwrap();
    let mut reg = services::start_registry(
        &reg_dir,
        services::RegistryAuth::Htpasswd("alice", "old-pass"),
    );
    let old = services::basic_auth("alice", "old-pass");
    for blob in std::fs::read_dir(manifest::case_blob_dir(CASE)).unwrap() {
        let data = std::fs::read(blob.unwrap().path()).unwrap();
        services::push_blob(reg.port, repo, Some(&format!("Basic {old}")), &data);
    }
    let sid = format!("t{}cred", std::process::id());
    s.install_image(
        &sid,
        &manifest::case_bootstrap(CASE),
        &manifest::case_blob_dir(CASE),
    );
    let config = |auth: &str| {
        serde_json::json!({
            "device": {
                "id": format!("/{sid}"),
                "backend": {"type": "registry", "config": {
                    "scheme": "http", "host": format!("127.0.0.1:{}", reg.port), "repo": repo,
                    "auth": auth, "timeout": 5, "retry_limit": 1}},
                "cache": {"type": "blobcache", "config": {"work_dir": s.root.join("cache").join(&sid)}}
            },
            "mode": "direct",
            "digest_validate": true,
            "amplify_io": 0
        })
        .to_string()
    };
    let spec = DaemonSpec::new(&s, None);
    let mut m = nydus_snapshotter::Managed::start(&s, spec, &work.path().join("stderr"))
        .unwrap_or_else(|e| panic!("{e}"));
    m.shared_mount(&sid, &config(&old))
        .unwrap_or_else(|e| panic!("{e}"));
    let mnt = m.spec.mountpoint(&s).join(&sid);
    let mut files = manifest_hashes();
    files.retain(|(_, _, size)| *size > 64 << 10);
    files.sort();
    let third = files.len() / 3;
    let (ok, errors) = read_files(&mnt, &files[..third]);
    assert!(
        errors.is_empty() && ok == third,
        "before the rotation: {errors:?}"
    );

    // Rotate the password: the registry now knows only the new one.
    let port = reg.port;
    reg.kill();
    let out = std::process::Command::new("htpasswd")
        .args(["-Bbn", "alice", "new-pass"])
        .output()
        .unwrap();
    std::fs::write(reg_dir.join("htpasswd"), out.stdout).unwrap();
    let _reg = services::Service::spawn(
        "docker-registry",
        std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(reg_dir.join("registry.yml")),
        port,
        &reg_dir.join("registry-rotated.log"),
    );
    let (_, errors) = read_files(&mnt, &files[third..third + 1]);
    assert!(
        !errors.is_empty(),
        "the old password still works: the rotation did not happen"
    );

    // The snapshotter's UpdateAuthConfig: a Basic credential goes to the running daemon.
    let new = services::basic_auth("alice", "new-pass");
    let body = serde_json::json!({"registry_auth": new}).to_string();
    let r = m
        .client
        .request(
            "PUT",
            "/api/v1/config",
            &[("id", &format!("/{sid}"))],
            Some(&body),
        )
        .unwrap();
    assert!(r.ok(), "{}", r.error());
    let (ok, errors) = read_files(&mnt, &files[third..2 * third]);
    assert!(
        errors.is_empty() && ok == third,
        "after the renewal: {:?}",
        &errors[..errors.len().min(5)]
    );
    // A bad value or an unknown key is refused; an unknown instance is 404.
    for (query, body, status) in [
        (
            format!("/{sid}"),
            r#"{"registry_auth":"not base64!"}"#.to_string(),
            400,
        ),
        (
            format!("/{sid}"),
            r#"{"log_level":"debug"}"#.to_string(),
            400,
        ),
        ("/nothing".to_string(), body.clone(), 404),
    ] {
        let r = m
            .client
            .request("PUT", "/api/v1/config", &[("id", &query)], Some(&body))
            .unwrap();
        assert_eq!(r.status, status, "{query} {body}: {}", r.body);
    }

    // The next handover carries the new credentials: after kill -9 the successor reads the rest.
    m.send_states().unwrap();
    kill_9(&m, "daemon");
    assert!(m.live.as_ref().unwrap().died_within(Duration::from_secs(5)));
    m.failover(std::time::Instant::now())
        .unwrap_or_else(|e| panic!("{e}\n{}", m.log()));
    let (ok, errors) = read_files(&mnt, &files[2 * third..]);
    assert!(
        errors.is_empty() && ok == files.len() - 2 * third,
        "after the failover: {errors:?}"
    );
    let log = m.log();
    assert!(
        !log.contains(&new) && !log.contains(&old),
        "credentials in the daemon log"
    );
    m.destroy(std::slice::from_ref(&sid))
        .unwrap_or_else(|e| panic!("{e}"));
    root.forget(&s, &[&m.spec.id], &[sid]);
}

/// `id_mapping` in a mount's config (nydus-snapshotter, for pods with a user namespace): owners in the
/// mapped range are reported shifted to the host range, others unchanged; a mount without it reports
/// the image's owners.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn id_mapping_reports_owners_in_the_host_range() {
    use std::os::unix::fs::MetadataExt;
    manifest::assert_root("FUSE mounts");
    let root = DefaultRoot::take();
    let s = Snapshotter::new(&root.path, Recover::Restart);
    let work = tempfile::tempdir().unwrap();
    let (plain, mapped) = (
        format!("t{}plain", std::process::id()),
        format!("t{}userns-100000", std::process::id()),
    );
    let spec = DaemonSpec::new(&s, None);
    let mut m = nydus_snapshotter::Managed::start(&s, spec, &work.path().join("stderr"))
        .unwrap_or_else(|e| panic!("{e}"));
    for (sid, extra) in [
        (&plain, serde_json::json!({})),
        // Only IDs 0..1000 are in the range: others (65534, nobody) stay as they are.
        (
            &mapped,
            serde_json::json!({"id_mapping": [0, 100000, 1000]}),
        ),
    ] {
        s.install_image(
            sid,
            &manifest::case_bootstrap(CASE),
            &manifest::case_blob_dir(CASE),
        );
        m.shared_mount(sid, &s.instance_config(sid, &extra))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let log = std::fs::read_to_string(m.spec.log_file(&s)).unwrap();
    assert!(!log.contains("unknown key `id_mapping`"), "{log}");
    let mnt = m.spec.mountpoint(&s);
    let (mut shifted, mut kept) = (0, 0);
    for row in manifest::load_manifest() {
        let rel = &row["path"];
        let (want_uid, want_gid): (u32, u32) =
            (row["uid"].parse().unwrap(), row["gid"].parse().unwrap());
        let p = std::fs::symlink_metadata(mnt.join(&plain).join(rel)).unwrap();
        let q = std::fs::symlink_metadata(mnt.join(&mapped).join(rel)).unwrap();
        assert_eq!(
            (p.uid(), p.gid()),
            (want_uid, want_gid),
            "{rel} without mapping"
        );
        let map = |id: u32| if id < 1000 { id + 100000 } else { id };
        assert_eq!(
            (q.uid(), q.gid()),
            (map(want_uid), map(want_gid)),
            "{rel} with the mapping"
        );
        if want_uid < 1000 {
            shifted += 1;
        } else {
            kept += 1;
        }
    }
    assert!(shifted > 0, "no owner in the mapped range");
    let _ = kept;
    let sids = vec![plain, mapped];
    m.destroy(&sids).unwrap_or_else(|e| panic!("{e}"));
    root.forget(&s, &[&m.spec.id], &sids);
}
