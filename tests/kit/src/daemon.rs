//! Run `rafsd` as a real daemon in tests: start it, wait for its FUSE mount, stop it by pid, and never
//! leave a mount or a process behind (cleanup on drop, also when a test fails). [`spawn_ready`] is the
//! start-up wait every daemon and server of the kit goes through.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct Daemon {
    child: Option<Child>,
    pub mountpoint: PathBuf,
    pub log: PathBuf,
}

pub fn is_mounted(mountpoint: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = mountpoint.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&*want))
}

/// Mount a tmpfs with `options` (e.g. `size=1m`) on `target`.
pub fn mount_tmpfs(target: &Path, options: &std::ffi::CStr) {
    let c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid C strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            c.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    assert_eq!(
        rc,
        0,
        "tmpfs on {target:?}: {}",
        std::io::Error::last_os_error()
    );
}

pub fn lazy_unmount(mountpoint: &Path) {
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

impl Daemon {
    /// Start `rafsd ARGS --mountpoint MOUNTPOINT` and wait until the mount is up.
    pub fn start(args: &[&str], mountpoint: &Path, log: &Path) -> Daemon {
        Self::start_bin(crate::rafsd_bin(), args, mountpoint, log)
    }

    /// `rafsd fuse` serving `bootstrap` with `config`, its mount, log and admin socket (returned) in
    /// `dir`.
    pub fn start_with_api(config: &Path, bootstrap: &Path, dir: &Path) -> (Daemon, PathBuf) {
        let sock = dir.join("api.sock");
        let d = Self::start(
            &[
                "fuse",
                "--config",
                config.to_str().unwrap(),
                "--bootstrap",
                bootstrap.to_str().unwrap(),
                "--apisock",
                sock.to_str().unwrap(),
            ],
            &dir.join("mnt"),
            &dir.join("rafsd.log"),
        );
        (d, sock)
    }

    /// [`Daemon::start`] with another rafsd binary (a benchmark's baseline).
    pub fn start_bin(bin: &Path, args: &[&str], mountpoint: &Path, log: &Path) -> Daemon {
        std::fs::create_dir_all(mountpoint).unwrap();
        let mut cmd = Command::new(bin);
        cmd.args(args).arg("--mountpoint").arg(mountpoint);
        let child = spawn_ready(&mut cmd, log, Duration::from_secs(30), || {
            is_mounted(mountpoint)
        })
        .unwrap_or_else(|e| panic!("rafsd {e} (mounted):\n{}", read_log(log)));
        Daemon {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn log_text(&self) -> String {
        read_log(&self.log)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGTERM, then wait (bounded) for a clean exit; the mount must be gone.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = wait_bounded(&mut child, Duration::from_secs(20)).unwrap_or_else(|| {
            let _ = child.kill();
            panic!(
                "rafsd did not exit within 20 s of SIGTERM:\n{}",
                self.log_text()
            )
        });
        assert!(
            !is_mounted(&self.mountpoint),
            "rafsd exited but left {} mounted",
            self.mountpoint.display()
        );
        status
    }

    /// kill -9: the daemon gets no chance to clean up; the dead mount is detached by us.
    pub fn kill9(mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        lazy_unmount(&self.mountpoint);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.mountpoint) {
            lazy_unmount(&self.mountpoint);
        }
    }
}

/// A `Command` for the `rafsd` binary under test.
pub fn rafsd() -> Command {
    Command::new(crate::rafsd_bin())
}

/// The text of a log file, empty when there is none yet.
pub fn read_log(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Start `cmd` (stdin from /dev/null, stdout and stderr to a new file `log`) and poll `ready` every 20 ms
/// until it holds: the one start-up wait of every daemon the tests run. When the process ends first or
/// `limit` passes, it is killed and reaped, and the error says which ("exited with .. before it was
/// ready", "was not ready within ..").
pub fn spawn_ready(
    cmd: &mut Command,
    log: &Path,
    limit: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<Child, String> {
    crate::tier::require_full("starting a daemon or server");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(std::fs::OpenOptions::new().append(true).open(log).unwrap())
        .spawn()
        .map_err(|e| format!("could not be started: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("exited with {status} before it was ready"));
        }
        if ready() {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("was not ready within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run `rafsd ARGS` to completion within `limit`; returns (exit code, combined output).
pub fn run_bounded(args: &[&std::ffi::OsStr], limit: Duration) -> (Option<i32>, String) {
    let out_path = std::env::temp_dir().join(format!(
        "rafsd-run-{}-{:?}.log",
        std::process::id(),
        std::thread::current().id()
    ));
    let mut child = rafsd()
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&out_path)
                .unwrap(),
        )
        .spawn()
        .unwrap();
    let status = wait_bounded(&mut child, limit);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    (status.and_then(|s| s.code()), text)
}

/// `rafsd virtiofs` runs sandboxed (a mount namespace showing only allowed paths): let its API mounts use
/// the fixtures (read-only) and anything under the test's `dir` (read-write).
pub fn sandbox_allow_args(dir: &Path) -> Vec<std::ffi::OsString> {
    let fixtures = super::manifest::fixtures_dir();
    vec![
        "--allow-path".into(),
        fixtures.into(),
        "--allow-path-rw".into(),
        dir.into(),
    ]
}

/// A nydusd v1 config for a localfs blob dir with a blob cache.
pub fn v1_config(blob_dir: &Path, work_dir: &Path, validate: bool, extra: &str) -> String {
    format!(
        r#"{{"device":{{"backend":{{"type":"localfs","config":{{"dir":"{}"}}}},
             "cache":{{"type":"blobcache","config":{{"work_dir":"{}"}}}}}},
            "mode":"direct","digest_validate":{validate}{extra}}}"#,
        blob_dir.display(),
        work_dir.display()
    )
}

/// One request to an admin API socket on a fresh connection; returns (status, body), status 0 when the
/// reply is not HTTP.
pub fn api_request(
    sock: &Path,
    method: &str,
    target: &str,
    body: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    Ok(read_http_response(&mut s))
}

/// Read a whole HTTP response. The server may close right after an error reply while request bytes are
/// unread, which resets the connection: keep whatever arrived before that.
pub fn read_http_response(s: &mut std::os::unix::net::UnixStream) -> (u16, String) {
    use std::io::Read;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The pids of `pid`'s children.
pub fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The process that serves, under the supervisor `supervisor` of a sandboxed daemon: the
/// supervisor's only child, or under `rafsd virtiofs --sandbox namespace` that child's (the crash-restart
/// keeper's) only child. `None` while there is not exactly one at each level (a daemon being restarted).
pub fn serving_process(supervisor: i32) -> Option<i32> {
    let [child] = children(supervisor)[..] else {
        return None;
    };
    match children(child)[..] {
        [] => Some(child),
        [worker] => Some(worker),
        _ => None,
    }
}

/// The daemon a crash-restart keeper serves with (`rafsd virtiofs --sandbox namespace`): the only
/// child of the supervisor's only child, or `None` while there is none (between a death and a restart).
pub fn keeper_worker(supervisor: i32) -> Option<i32> {
    let [keeper] = children(supervisor)[..] else {
        return None;
    };
    let [worker] = children(keeper)[..] else {
        return None;
    };
    Some(worker)
}

/// Kill the serving process of the crash-restarting daemon under `supervisor` with SIGKILL and wait
/// (at most `limit`) for its successor: (killed, successor), or `None` for the successor if none came.
pub fn kill_worker(supervisor: i32, limit: Duration) -> (i32, Option<i32>) {
    let until = std::time::Instant::now() + limit;
    let victim = loop {
        if let Some(p) = keeper_worker(supervisor) {
            break p;
        }
        assert!(
            std::time::Instant::now() < until,
            "no serving daemon under {supervisor}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    // SAFETY: a process of the daemon the test started.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    while std::time::Instant::now() < until {
        match keeper_worker(supervisor) {
            Some(p) if p != victim => return (victim, Some(p)),
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    (victim, None)
}
