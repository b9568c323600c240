//! A QEMU (TCG) guest served by `rafsd virtiofs`, for the in-guest EROFS helper tests and benchmark: the
//! daemon started empty with an admin socket, images mounted through the API, a guest booted with
//! ci/guest/init that runs a script from the passthrough share (`rafs_run=`) and reports on the serial
//! console. Processes are ours, killed by pid when dropped (also on panic).

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::daemon;

pub const TAG: &str = "kataShared";

/// A process we started, stopped by pid when dropped.
pub struct Guard {
    pub name: &'static str,
    pub child: Option<Child>,
    /// QEMU's own pid (from -pidfile): `timeout` would not pass a SIGKILL on.
    pub inner_pidfile: Option<PathBuf>,
}

impl Guard {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, up to `grace` for an exit, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
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

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
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

/// Whether the admin API at `api` answers `GET /api/v1/daemon` with the state RUNNING.
pub fn api_says_running(api: &Path) -> bool {
    daemon::api_request(api, "GET", "/api/v1/daemon", "", Duration::from_secs(30))
        .is_ok_and(|(status, body)| status == 200 && body.contains("\"RUNNING\""))
}

/// Have the kernel send `sig` to the child if the test dies without running its guards (SIGKILL, abort).
pub fn die_with_parent(cmd: &mut Command, sig: libc::c_int) -> &mut Command {
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

/// A fresh work dir `<prefix>XXXXXX` under the temp dir; RAFSD_VM_KEEP=1 keeps it (serial log, daemon
/// log, sockets) for a look afterwards.
pub fn work_dir(prefix: &str) -> tempfile::TempDir {
    let mut tmp = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    tmp.disable_cleanup(std::env::var_os("RAFSD_VM_KEEP").is_some());
    tmp
}

pub fn root() -> &'static Path {
    crate::repo_root()
}

/// Run a ci/ script that prints `KEY=value` lines; the value of `key`.
pub fn ci_value(script: &str, args: &[&str], env: &[(&str, &str)], key: &str) -> PathBuf {
    let out = Command::new(root().join(script))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prefix = format!("{key}=");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{script} printed no {key}=: {stdout}"))
}

/// The Debian 6.12 guest kernel from ci/guest-kernel.sh's cache.
pub fn debian_kernel() -> PathBuf {
    kernel_from_env(
        "RAFSD_GUEST_DIR",
        "target/guest",
        "ci/guest-kernel.sh (ci/test.sh does)",
    )
}

/// `KERNEL=` of `<dir>/kernel.env`, where `dir` is `$var` or `default` under the worktree.
pub fn kernel_from_env(var: &str, default: &str, how: &str) -> PathBuf {
    let dir = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(default));
    let env = dir.join("kernel.env");
    let text = std::fs::read_to_string(&env)
        .unwrap_or_else(|e| panic!("no guest kernel ({}: {e}); run {how}", env.display()));
    match text
        .lines()
        .find_map(|l| l.strip_prefix("KERNEL="))
        .map(PathBuf::from)
    {
        Some(k) if k.is_file() => k,
        _ => panic!("{} names no existing KERNEL; rerun {how}", env.display()),
    }
}

pub fn require_tools() {
    for tool in ["qemu-system-x86_64", "timeout"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(found, "{tool} is missing; run ci/install-vm-deps.sh");
    }
}

pub fn nonce() -> String {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One guest run: work dir, logs, the daemon's API.
pub struct Vm {
    pub dir: PathBuf,
    pub api: PathBuf,
    pub sock: PathBuf,
    pub serial: PathBuf,
    pub daemon_log: PathBuf,
    pub nonce: String,
    pub started: Instant,
}

impl Vm {
    pub fn new(dir: &Path) -> Self {
        crate::tier::require_full("a QEMU guest");
        Vm {
            dir: dir.to_path_buf(),
            api: dir.join("api.sock"),
            sock: dir.join("vhost-fs.sock"),
            serial: dir.join("serial.log"),
            daemon_log: dir.join("rafsd.log"),
            nonce: nonce(),
            started: Instant::now(),
        }
    }

    pub fn serial_text(&self) -> String {
        let raw = std::fs::read(&self.serial).unwrap_or_default();
        String::from_utf8_lossy(&raw).replace('\r', "")
    }

    pub fn daemon_text(&self) -> String {
        std::fs::read_to_string(&self.daemon_log).unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        let tail = |t: String, n: usize| {
            let v: Vec<String> = t.lines().rev().take(n).map(String::from).collect();
            v.into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        format!(
            "\n--- serial log tail ({}) ---\n{}\n--- rafsd log tail ({}) ---\n{}\n--- {:.1} s into the run",
            self.serial.display(),
            tail(self.serial_text(), 50),
            self.daemon_log.display(),
            tail(self.daemon_text(), 40),
            self.started.elapsed().as_secs_f64()
        )
    }

    pub fn fail(&self, what: impl std::fmt::Display) -> ! {
        panic!("{what}{}", self.logs())
    }

    pub fn api(&self, method: &str, target: &str, body: &str) -> (u16, String) {
        daemon::api_request(&self.api, method, target, body, Duration::from_secs(30))
            .unwrap_or_else(|e| self.fail(format!("{method} {target}: {e}")))
    }

    pub fn expect_api(&self, method: &str, target: &str, body: &str, want: u16) {
        let (status, reply) = self.api(method, target, body);
        if status != want {
            self.fail(format!(
                "{method} {target}: status {status}, want {want}; reply {reply:?}"
            ));
        }
    }

    /// Mount `fs_type` ("rafs" or "blob_view") of a bootstrap at `mountpoint` through the API.
    pub fn mount_image(
        &self,
        mountpoint: &str,
        fs_type: &str,
        bootstrap: &Path,
        blob_dir: &Path,
        validate: bool,
    ) -> (u16, String) {
        let cache = self
            .dir
            .join(format!("cache{}", mountpoint.replace('/', "-")));
        let config = daemon::v1_config(blob_dir, &cache, validate, "");
        let body = serde_json::json!({"source": bootstrap, "fs_type": fs_type, "config": config})
            .to_string();
        self.api(
            "POST",
            &format!("/api/v1/mount?mountpoint={mountpoint}"),
            &body,
        )
    }

    /// The host side of the guest's `/containers` share: a fresh directory holding the static
    /// `rafs-guest` helper and the script the guest's `/init` runs.
    pub fn helper_share(&self, helper: &Path, script_name: &str, script: &str) -> PathBuf {
        let shared = self.dir.join("containers");
        std::fs::create_dir(&shared).unwrap();
        std::fs::copy(helper, shared.join("rafs-guest")).unwrap();
        std::fs::write(shared.join(script_name), script).unwrap();
        shared
    }

    pub fn share(&self, mountpoint: &str, dir: &Path) {
        let body = serde_json::json!({"source": dir, "fs_type": "passthrough_fs", "config": ""})
            .to_string();
        self.expect_api(
            "POST",
            &format!("/api/v1/mount?mountpoint={mountpoint}"),
            &body,
            204,
        );
    }

    /// `rafsd virtiofs` started empty, as Kata starts it; returns once the API says RUNNING and the
    /// vhost-user socket exists.
    pub fn start_rafsd(&self, extra: &[&str]) -> Guard {
        let mut cmd = daemon::rafsd();
        die_with_parent(&mut cmd, libc::SIGKILL)
            .args(["virtiofs", "--log-level", "info", "--sock"])
            .arg(&self.sock)
            .arg("--apisock")
            .arg(&self.api)
            .args(daemon::sandbox_allow_args(&self.dir))
            .args(extra);
        let child =
            daemon::spawn_ready(&mut cmd, &self.daemon_log, Duration::from_secs(20), || {
                self.sock.exists() && api_says_running(&self.api)
            })
            .unwrap_or_else(|e| self.fail(format!("rafsd {e}")));
        Guard {
            name: "rafsd",
            child: Some(child),
            inner_pidfile: None,
        }
    }

    /// Boot QEMU (TCG, 1 vCPU, `mem_mib` MiB) with the virtio-fs device on our socket; `append` is added
    /// to the kernel command line after the console and nonce settings.
    pub fn start_qemu(
        &self,
        kernel: &Path,
        initrd: &Path,
        append: &str,
        mem_mib: u32,
        limit_secs: u64,
    ) -> Guard {
        // no_timer_check: under TCG on a loaded host the kernel's check that the timer interrupt
        // arrives can time out, and it then panics ("IO-APIC + timer doesn't work!").
        let append = format!(
            "console=ttyS0 panic=-1 no_timer_check loglevel=4 rafs_tag={TAG} rafs_nonce={} {append}",
            self.nonce
        );
        let pidfile = self.dir.join("qemu.pid");
        let qemu_log = self.dir.join("qemu.log");
        let mem = format!("{mem_mib}M");
        let child = die_with_parent(&mut Command::new("timeout"), libc::SIGTERM)
            .args(["-k", "5", &limit_secs.to_string(), "qemu-system-x86_64"])
            .args([
                "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", &mem,
            ])
            .arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
            .args(["-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=char0,path={}", self.sock.display()))
            .arg("-device")
            .arg(format!("vhost-user-fs-pci,chardev=char0,tag={TAG}"))
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
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
            .arg(format!("file:{}", self.serial.display()))
            .arg("-pidfile")
            .arg(&pidfile)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&qemu_log).unwrap())
            .stderr(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&qemu_log)
                    .unwrap(),
            )
            .spawn()
            .expect("spawn timeout qemu-system-x86_64");
        Guard {
            name: "qemu",
            child: Some(child),
            inner_pidfile: Some(pidfile),
        }
    }

    /// Poll the serial log until `marker` shows up as a word of its own.
    pub fn wait_for(&self, marker: &str, limit: Duration, qemu: &mut Guard, rafsd: &mut Guard) {
        let deadline = Instant::now() + limit;
        loop {
            if marker_at(&self.serial_text(), marker).is_some() {
                return;
            }
            if let Some(status) = rafsd.exited() {
                self.fail(format!(
                    "rafsd exited ({status}) while waiting for {marker:?}"
                ));
            }
            if let Some(status) = qemu.exited() {
                if marker_at(&self.serial_text(), marker).is_some() {
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

    /// The rest of the first serial line holding `marker` (from the marker on).
    pub fn line(&self, marker: &str) -> Option<String> {
        self.serial_text()
            .lines()
            .find_map(|l| marker_at(l, marker).map(|i| l[i..].to_string()))
    }
}

/// Where `marker` starts as a word of its own ("DONE x" does not match "PHASE1-DONE x").
pub fn marker_at(text: &str, marker: &str) -> Option<usize> {
    text.match_indices(marker)
        .map(|(i, _)| i)
        .find(|&i| !text[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '-'))
}

/// The guest helper (static) and an initramfs with `modules` (ci/guest-initramfs.sh) in `dir`.
pub fn guest_files(dir: &Path, modules: &str) -> (PathBuf, PathBuf) {
    let helper = ci_value("ci/guest-helper.sh", &[], &[], "RAFS_GUEST");
    let initrd = dir.join("initramfs.cpio");
    ci_value(
        "ci/guest-initramfs.sh",
        &[initrd.to_str().unwrap()],
        &[("RAFSD_GUEST_MODULES", modules)],
        "INITRD",
    );
    (helper, initrd)
}

/// `HASH <image> <sha256> <path>` lines, `HASHERR <image> ...` lines and the `LIST <image> N` count that
/// a guest script printed for one image.
pub struct GuestHashes {
    pub hashes: BTreeMap<String, String>,
    pub problems: Vec<String>,
    pub listed: Option<i64>,
}

pub fn parse_hashes(serial: &str, image: &str) -> GuestHashes {
    let mut g = GuestHashes {
        hashes: BTreeMap::new(),
        problems: Vec::new(),
        listed: None,
    };
    let (hash_tag, err_tag, list_tag) = (
        format!("HASH {image} "),
        format!("HASHERR {image} "),
        format!("LIST {image} "),
    );
    for line in serial.lines() {
        if let Some(i) = marker_at(line, &hash_tag) {
            match line[i + hash_tag.len()..].split_once(' ') {
                Some((sha, path)) => {
                    if g.hashes.insert(path.to_string(), sha.to_string()).is_some() {
                        g.problems.push(format!("{path}: listed twice"));
                    }
                }
                None => g.problems.push(format!("malformed: {line}")),
            }
        } else if let Some(i) = marker_at(line, &err_tag) {
            g.problems
                .push(format!("guest error: {}", &line[i + err_tag.len()..]));
        } else if let Some(i) = marker_at(line, &list_tag) {
            g.listed = line[i + list_tag.len()..]
                .split(' ')
                .next()
                .and_then(|n| n.parse().ok());
        }
    }
    g
}

/// Every regular file of the manifest with the right sha256, and nothing else.
pub fn compare_with_manifest(g: &GuestHashes, want: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems = g.problems.clone();
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
    if g.listed != Some(want.len() as i64) {
        problems.push(format!("LIST count {:?}, want {}", g.listed, want.len()));
    }
    problems
}

/// The shell function guest scripts use to print one image's hashes: `hash_tree DIR IMAGE`.
pub const HASH_TREE_SH: &str = r#"
hash_tree() {
    cd "$1" || { echo "LIST $2 -1"; return; }
    find . -type f -exec sha256sum {} + >/tmp/sums 2>/tmp/sums.err
    cd /
    sed "s|^\([0-9a-f]\{64\}\)  \./|HASH $2 \1 |" /tmp/sums
    sed "s|^|HASHERR $2 |" /tmp/sums.err
    echo "LIST $2 $(cat /tmp/sums /tmp/sums.err | wc -l)"
}
"#;

/// Guest shell lines that read `path` (a file of a damaged image) and say how it went: `BADREAD $N OK
/// <sha256>`, `BADREAD $N EIO` or `BADREAD $N ERR <message>`.
pub fn badread_sh(path: &str) -> String {
    format!(
        r#"if sum=$(sha256sum {path} 2>/tmp/bad.err); then
    echo "BADREAD $N OK ${{sum%% *}}"
elif grep -qE 'I/O error|Input/output error' /tmp/bad.err; then
    echo "BADREAD $N EIO"
else
    echo "BADREAD $N ERR $(tr '\n' ' ' </tmp/bad.err)"
fi"#
    )
}

/// Copy `case`'s blobs to `dest` and flip one byte in every chunk of `file`.
pub fn corrupt_copy(case: &str, file: &str, dest: &Path) -> usize {
    std::fs::create_dir_all(dest).unwrap();
    for e in std::fs::read_dir(crate::manifest::case_blob_dir(case)).unwrap() {
        let e = e.unwrap();
        let to = dest.join(e.file_name());
        std::fs::copy(e.path(), &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let image = rafsd::RafsImage::open_local(
        &crate::manifest::case_bootstrap(case),
        Some(dest),
        rafsd::ImageOptions::default(),
    )
    .unwrap();
    let ino = rafsd::service::resolve_path(&image, &format!("/{file}"))
        .unwrap()
        .unwrap_or_else(|| panic!("{case} has no {file}"));
    let chunks = image.file_chunks(ino).unwrap();
    assert!(!chunks.is_empty());
    for c in &chunks {
        let blob = dest.join(&image.info().blobs[c.blob_index as usize].id);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(blob)
            .unwrap();
        let at = c.compressed_offset + u64::from(c.compressed_size) / 2;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        b[0] ^= 0x5a;
        f.write_all_at(&b, at).unwrap();
    }
    chunks.len()
}
