//! Plays containerd's nydus-snapshotter against `rafsd` as its `nydusd_path`, the way the snapshotter's
//! source does it (containerd/nydus-snapshotter a7a1f07; file:line facts in
//! ../shared/docs/clients-contract.md):
//! - the daemon's argv, built field by field in the order of `DaemonCommand` (pkg/daemon/command);
//! - its file layout under the root (`socket/<id>/api.sock`, `logs/<id>/nydusd.log`, `supervisor/<id>.sock`,
//!   `snapshots/<sid>/fs/image/image.boot`, `snapshots/<sid>/mnt` or the shared mnt);
//! - its HTTP requests as Go's net/http writes them (Host "unix", User-Agent, `Content-Length: 0` on
//!   body-less PUT/POST, none on DELETE, `Accept-Encoding: gzip`, query values `url.Values`-encoded),
//!   on a kept-alive connection, and its decoding (200 or 204 is success, else `{code,message}`);
//! - its liveness monitor: one idle connection to the API socket watched for EPOLLHUP|EPOLLERR;
//! - its supervisor (pkg/supervisor): a Unix socket per daemon that receives the daemon's state bytes
//!   with 256 KiB reads until EOF plus the FUSE fd as SCM_RIGHTS, and sends them back to a new daemon;
//! - its waits: WaitUntilSocketExisted (100 x 100 ms), WaitUntilState (20 x 100 ms),
//!   WaitUntilUnmounted (20 x 50 ms).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The snapshotter's default root: its shared-mode daemons are allowed beneath it without options.
pub const DEFAULT_ROOT: &str = "/var/lib/containerd/io.containerd.snapshotter.v1.nydus";

/// A daemon id as the snapshotter makes them (xid: 20 lowercase base32 characters).
pub fn new_id() -> String {
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ (std::process::id() as u64) << 32;
    (0..20)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            b"0123456789abcdefghijklmnopqrstuv"[(seed % 32) as usize] as char
        })
        .collect()
}

/// `recover_policy` of the snapshotter's config.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Recover {
    None,
    Restart,
    /// The shipped misc/snapshotter/config.toml: daemons get `--id` and `--supervisor`.
    Failover,
}

/// The snapshotter's settings that shape a daemon's command line.
#[derive(Clone)]
pub struct Snapshotter {
    pub root: PathBuf,
    pub nydusd_path: PathBuf,
    /// `threads_number` (shipped: 4; 0 leaves --thread-num out).
    pub threads: u32,
    pub log_level: String,
    /// `log_rotation_size` (default 100).
    pub log_rotation_size: u32,
    pub log_to_stdout: bool,
    pub failover_policy: String,
    pub recover: Recover,
}

impl Snapshotter {
    pub fn new(root: &Path, recover: Recover) -> Self {
        Snapshotter {
            root: root.to_path_buf(),
            nydusd_path: crate::rafsd_bin().to_path_buf(),
            threads: 4,
            log_level: "info".into(),
            log_rotation_size: 100,
            log_to_stdout: false,
            failover_policy: "resend".into(),
            recover,
        }
    }

    pub fn shared_mountpoint(&self) -> PathBuf {
        self.root.join("mnt")
    }

    pub fn snapshot_dir(&self, sid: &str) -> PathBuf {
        self.root.join("snapshots").join(sid)
    }

    pub fn bootstrap(&self, sid: &str) -> PathBuf {
        self.snapshot_dir(sid).join("fs/image/image.boot")
    }

    /// Put a fixture image where the snapshotter keeps an unpacked layer: the bootstrap at
    /// `snapshots/<sid>/fs/image/image.boot`, its blobs under `<root>/blobs` (read through localfs).
    pub fn install_image(&self, sid: &str, case_bootstrap: &Path, case_blobs: &Path) {
        let boot = self.bootstrap(sid);
        std::fs::create_dir_all(boot.parent().unwrap()).unwrap();
        std::fs::copy(case_bootstrap, &boot).unwrap();
        let blobs = self.root.join("blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        for e in std::fs::read_dir(case_blobs).unwrap() {
            let e = e.unwrap();
            let to = blobs.join(e.file_name());
            if !to.exists() {
                std::fs::copy(e.path(), to).unwrap();
            }
        }
    }

    /// The per-instance daemon config the snapshotter dumps (a v1 FUSE config; localfs here).
    pub fn instance_config(&self, sid: &str, extra: &serde_json::Value) -> String {
        let mut c = serde_json::json!({
            "device": {
                "id": format!("/{sid}"),
                "backend": {"type": "localfs", "config": {"dir": self.root.join("blobs")}},
                "cache": {"type": "blobcache", "config": {"work_dir": self.root.join("cache")}}
            },
            "mode": "direct",
            "digest_validate": false,
            "iostats_files": false,
            "enable_xattr": true,
            "fs_prefetch": {"enable": false}
        });
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                c.insert(k.clone(), v.clone());
            }
        }
        c.to_string()
    }
}

/// What the snapshotter knows about one daemon.
#[derive(Clone)]
pub struct DaemonSpec {
    pub id: String,
    /// `None`: shared daemon; `Some(sid)`: dedicated to that snapshot.
    pub dedicated: Option<String>,
    pub apisock: PathBuf,
}

impl DaemonSpec {
    pub fn new(s: &Snapshotter, dedicated: Option<&str>) -> Self {
        let id = new_id();
        let apisock = s.root.join("socket").join(&id).join("api.sock");
        DaemonSpec {
            id,
            dedicated: dedicated.map(String::from),
            apisock,
        }
    }

    pub fn mountpoint(&self, s: &Snapshotter) -> PathBuf {
        match &self.dedicated {
            Some(sid) => s.snapshot_dir(sid).join("mnt"),
            None => s.shared_mountpoint(),
        }
    }

    pub fn config_file(&self, s: &Snapshotter) -> PathBuf {
        s.root.join("config").join(&self.id).join("config.json")
    }

    pub fn log_file(&self, s: &Snapshotter) -> PathBuf {
        s.root.join("logs").join(&self.id).join("nydusd.log")
    }

    pub fn supervisor_sock(&self, s: &Snapshotter) -> PathBuf {
        s.root.join("supervisor").join(format!("{}.sock", self.id))
    }

    /// `BuildDaemonCommand`: the argv, in `DaemonCommand`'s field order.
    pub fn argv(&self, s: &Snapshotter, upgrade: bool) -> Vec<String> {
        let mut a = vec!["fuse".to_string()];
        let mut param = |k: &str, v: String| {
            a.push(format!("--{k}"));
            a.push(v);
        };
        let p = |p: PathBuf| p.to_string_lossy().into_owned();
        // Upgrade is a flag field that comes before ThreadNum.
        let mut head = Vec::new();
        if upgrade {
            head.push("--upgrade".to_string());
        }
        if s.threads != 0 {
            param("thread-num", s.threads.to_string());
        }
        if s.recover == Recover::Failover {
            param("id", self.id.clone());
        }
        if let Some(sid) = &self.dedicated {
            param("config", p(self.config_file(s)));
            param("bootstrap", p(s.bootstrap(sid)));
        }
        param("mountpoint", p(self.mountpoint(s)));
        param("apisock", p(self.apisock.clone()));
        param("log-level", s.log_level.clone());
        if s.log_rotation_size > 0 {
            param("log-rotation-size", s.log_rotation_size.to_string());
        }
        if s.recover == Recover::Failover {
            param("supervisor", p(self.supervisor_sock(s)));
        }
        if !s.log_to_stdout {
            param("log-file", p(self.log_file(s)));
        }
        param("failover-policy", s.failover_policy.clone());
        let mut argv = vec![a.remove(0)];
        argv.extend(head);
        argv.extend(a);
        argv
    }
}

/// One started daemon process (the pid the snapshotter waits on). Once reaped it is never signalled
/// again (its pid may belong to someone else by then).
pub struct Process {
    child: Option<Child>,
    status: Option<std::process::ExitStatus>,
    pub stderr: PathBuf,
}

impl Process {
    /// `cmd.Start()` with stdout/stderr going where the snapshotter's go (a file here).
    pub fn start(s: &Snapshotter, argv: &[String], stderr: &Path) -> Process {
        crate::tier::require_full("a daemon started as nydus-snapshotter starts it");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(stderr)
            .unwrap();
        let child = Command::new(&s.nydusd_path)
            .args(argv)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start the daemon");
        Process {
            child: Some(child),
            status: None,
            stderr: stderr.to_path_buf(),
        }
    }

    /// The pid of the running process.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("the process was reaped").id() as i32
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        if let Some(c) = &mut self.child {
            if let Some(status) = c.try_wait().unwrap() {
                self.status = Some(status);
                self.child = None;
            }
        }
        self.status
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own, not yet reaped, child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// `p.Wait()`, bounded so a test cannot hang.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.exited() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "daemon {} did not exit within {limit:?}",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `WaitUntilSocketExisted`: 100 tries, 100 ms apart, until the path is a socket.
pub fn wait_until_socket_existed(sock: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    for _ in 0..100 {
        if std::fs::metadata(sock).is_ok_and(|m| m.file_type().is_socket()) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("{} never became a socket", sock.display()))
}

/// Is `path` a mount point (a different st_dev than its parent), as the snapshotter's IsMountpoint.
pub fn is_mountpoint(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(m), Some(Ok(p))) = (
        std::fs::metadata(path),
        path.parent().map(std::fs::metadata),
    ) else {
        return false;
    };
    m.dev() != p.dev()
}

/// `WaitUntilUnmounted`: 20 tries, 50 ms apart (+ jitter).
pub fn wait_until_unmounted(path: &Path) -> bool {
    for _ in 0..20 {
        if !is_mountpoint(path) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The API client: Go's net/http on a kept-alive Unix connection.
pub struct Client {
    sock: PathBuf,
    conn: Mutex<Option<UnixStream>>,
}

/// An HTTP reply: status and body.
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    /// `succeeded()`: 200 or 204.
    pub fn ok(&self) -> bool {
        self.status == 200 || self.status == 204
    }

    /// The error as `parseErrorMessage` words it.
    pub fn error(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body).unwrap_or_default();
        format!(
            "http response: {}, error code: {}, error message: {}",
            self.status,
            v["code"].as_str().unwrap_or(""),
            v["message"].as_str().unwrap_or("")
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// `url.Values.Encode()` for one key: unreserved bytes kept, the rest %XX.
pub fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b' ' => "+".into(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn read_reply(s: &mut UnixStream) -> std::io::Result<Reply> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body)?;
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

impl Client {
    pub fn new(sock: &Path) -> Self {
        Client {
            sock: sock.to_path_buf(),
            conn: Mutex::new(None),
        }
    }

    /// One request; the connection is reused, and redialed once when the server closed it.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&str>,
    ) -> std::io::Result<Reply> {
        let mut target = path.to_string();
        if !query.is_empty() {
            let q: Vec<String> = query
                .iter()
                .map(|(k, v)| format!("{}={}", query_escape(k), query_escape(v)))
                .collect();
            target = format!("{target}?{}", q.join("&"));
        }
        let mut req = format!(
            "{method} {target} HTTP/1.1\r\nHost: unix\r\nUser-Agent: Go-http-client/1.1\r\n"
        );
        match body {
            Some(b) => req.push_str(&format!(
                "Content-Length: {}\r\nContent-Type: application/json\r\n",
                b.len()
            )),
            None if matches!(method, "POST" | "PUT" | "PATCH") => {
                req.push_str("Content-Length: 0\r\n")
            }
            None => {}
        }
        req.push_str("Accept-Encoding: gzip\r\n\r\n");
        req.push_str(body.unwrap_or(""));
        let mut conn = self.conn.lock().unwrap();
        for attempt in 0..2 {
            if conn.is_none() {
                let s = UnixStream::connect(&self.sock)?;
                // defaultHTTPClientTimeout
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                *conn = Some(s);
            }
            let s = conn.as_mut().unwrap();
            let r = s.write_all(req.as_bytes()).and_then(|_| read_reply(s));
            match r {
                Ok(reply) => return Ok(reply),
                Err(e) if attempt == 0 => {
                    *conn = None;
                    let _ = e;
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!()
    }

    pub fn daemon_info(&self) -> std::io::Result<serde_json::Value> {
        let r = self.request("GET", "/api/v1/daemon", &[], None)?;
        if !r.ok() {
            return Err(std::io::Error::other(r.error()));
        }
        Ok(r.json())
    }

    pub fn state(&self) -> Option<String> {
        self.daemon_info()
            .ok()
            .and_then(|v| v["state"].as_str().map(String::from))
    }

    /// `WaitUntilState`: 20 tries, 100 ms apart.
    pub fn wait_until_state(&self, want: &str) -> Result<(), String> {
        let mut last = None;
        for _ in 0..20 {
            last = self.state();
            if last.as_deref() == Some(want) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("daemon is not {want} yet, current state {last:?}"))
    }

    /// `Mount(mountpoint, bootstrap, config)`: POST with `{"fs_type":"rafs","source","config"}`.
    pub fn mount(&self, mp: &str, bootstrap: &Path, config: &str) -> Reply {
        let body = serde_json::json!({
            "fs_type": "rafs",
            "source": bootstrap,
            "config": config,
        })
        .to_string();
        self.request("POST", "/api/v1/mount", &[("mountpoint", mp)], Some(&body))
            .unwrap()
    }

    pub fn umount(&self, mp: &str) -> Reply {
        self.request("DELETE", "/api/v1/mount", &[("mountpoint", mp)], None)
            .unwrap()
    }

    pub fn put(&self, path: &str) -> Reply {
        self.request("PUT", path, &[], None).unwrap()
    }
}

/// The liveness monitor: one idle connection, EPOLLHUP|EPOLLERR edge-triggered.
pub struct Liveness {
    _conn: UnixStream,
    epfd: OwnedFd,
}

impl Liveness {
    /// `Subscribe`: dial (20 tries, 100 ms apart), then watch the connection.
    pub fn subscribe(sock: &Path) -> Liveness {
        let mut conn = None;
        for _ in 0..20 {
            if let Ok(c) = UnixStream::connect(sock) {
                conn = Some(c);
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let conn = conn.unwrap_or_else(|| panic!("cannot subscribe to {}", sock.display()));
        conn.set_nonblocking(true).unwrap();
        // SAFETY: plain syscalls on valid descriptors.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epfd >= 0);
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLHUP | libc::EPOLLERR | libc::EPOLLET) as u32,
            u64: 0,
        };
        // SAFETY: valid epoll and socket descriptors.
        assert_eq!(
            unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, conn.as_raw_fd(), &mut ev) },
            0
        );
        Liveness {
            _conn: conn,
            // SAFETY: epfd was just created and is owned by nothing else.
            epfd: unsafe { OwnedFd::from_raw_fd(epfd) },
        }
    }

    /// Did the daemon die (hang-up) within `timeout`?
    pub fn died_within(&self, timeout: Duration) -> bool {
        let mut ev = [libc::epoll_event { events: 0, u64: 0 }];
        // SAFETY: a valid epoll fd and one event slot.
        let n = unsafe {
            libc::epoll_wait(
                self.epfd.as_raw_fd(),
                ev.as_mut_ptr(),
                1,
                timeout.as_millis() as i32,
            )
        };
        n > 0 && ev[0].events & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
    }
}

/// The supervisor of one daemon: the state bytes and FUSE fd it last received.
pub struct Supervisor {
    pub path: PathBuf,
    stored: Arc<Mutex<(Vec<u8>, Option<OwnedFd>)>>,
}

/// `recv`: 256 KiB reads until EOF, control messages with room for 64 fds; the first fd is kept.
fn recv_states(conn: &UnixStream) -> Result<(Vec<u8>, OwnedFd), String> {
    let mut data = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    loop {
        let mut buf = vec![0u8; 256 << 10];
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(4) } as usize * 64;
        let mut cbuf = vec![0u8; space];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; all pointers below point into live buffers.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: valid socket and msghdr.
        let n = unsafe { libc::recvmsg(conn.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(format!(
                "receive message: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: walking the control messages the kernel wrote into cbuf.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                    let p = libc::CMSG_DATA(c) as *const RawFd;
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n as usize]);
    }
    if fds.is_empty() {
        return Err("received no control file descriptor".into());
    }
    Ok((data, fds.remove(0)))
}

fn send_states(conn: &UnixStream, data: &[u8], fd: RawFd) -> std::io::Result<()> {
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(4) } as usize;
    let mut cbuf = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; pointers point into live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: filling the one control message we made room for.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as _;
        (libc::CMSG_DATA(c) as *mut RawFd).write_unaligned(fd);
    }
    // SAFETY: valid socket and msghdr.
    let n = unsafe { libc::sendmsg(conn.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut rest = &data[n as usize..];
    let mut conn = conn;
    while !rest.is_empty() {
        let k = conn.write(rest)?;
        rest = &rest[k..];
    }
    Ok(())
}

/// Accept one connection on a non-blocking listener within `limit` (the real supervisor closes its
/// listener from a timer); the connection is returned blocking.
fn accept_within(listener: &UnixListener, limit: Duration) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((c, _)) => {
                c.set_nonblocking(false)?;
                return Ok(c);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}

impl Supervisor {
    pub fn new(path: &Path) -> Supervisor {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        Supervisor {
            path: path.to_path_buf(),
            stored: Arc::new(Mutex::new((Vec::new(), None))),
        }
    }

    fn listen(&self) -> UnixListener {
        let _ = std::fs::remove_file(&self.path);
        UnixListener::bind(&self.path).unwrap()
    }

    /// `FetchDaemonStates(trigger)`: listen, run `trigger` (the sendfd request) while one receiver
    /// accepts and reads; both must finish. (The real one waits forever; here a stuck receiver fails
    /// the test after `limit`.)
    pub fn fetch_daemon_states(
        &self,
        limit: Duration,
        trigger: impl FnOnce() -> Reply,
    ) -> Result<(), String> {
        let listener = self.listen();
        listener.set_nonblocking(true).unwrap();
        let stored = self.stored.clone();
        let receiver = std::thread::spawn(move || -> Result<usize, String> {
            let conn = accept_within(&listener, limit).map_err(|e| {
                format!(
                    "{e}: no daemon connected to the supervisor (the snapshotter would hang here)"
                )
            })?;
            conn.set_read_timeout(Some(limit)).unwrap();
            let (data, fd) = recv_states(&conn)?;
            let n = data.len();
            *stored.lock().unwrap() = (data, Some(fd));
            Ok(n)
        });
        let reply = trigger();
        let received = receiver.join().unwrap();
        if !reply.ok() {
            return Err(format!(
                "trigger: {}; receiver: {received:?}",
                reply.error()
            ));
        }
        received.map(|_| ())
    }

    /// `SendStatesTimeout(to)`: listen, and hand the stored states to the first daemon that connects
    /// within `to`.
    pub fn send_states_timeout(&self, to: Duration) -> std::thread::JoinHandle<Result<(), String>> {
        let listener = self.listen();
        listener.set_nonblocking(true).unwrap();
        let stored = self.stored.clone();
        std::thread::spawn(move || {
            let conn =
                accept_within(&listener, to).map_err(|e| format!("Sending state timeouts: {e}"))?;
            let guard = stored.lock().unwrap();
            let fd = guard.1.as_ref().map_or(-1, |f| f.as_raw_fd());
            send_states(&conn, &guard.0, fd).map_err(|e| format!("send message: {e}"))
        })
    }

    /// Replace what the supervisor holds (to play a supervisor with foreign or broken state).
    pub fn store(&self, data: Vec<u8>, fd: OwnedFd) {
        *self.stored.lock().unwrap() = (data, Some(fd));
    }

    pub fn has_fd(&self) -> bool {
        self.stored.lock().unwrap().1.is_some()
    }

    pub fn state_len(&self) -> usize {
        self.stored.lock().unwrap().0.len()
    }

    /// `DestroySupervisor`: close the held fd.
    pub fn destroy(&self) {
        self.stored.lock().unwrap().1 = None;
    }
}

/// `buildNextAPISocket`: api.sock -> api1.sock -> api2.sock ...
pub fn next_api_socket(cur: &Path) -> PathBuf {
    let name = cur.file_name().unwrap().to_string_lossy().into_owned();
    let stem = name.split('.').next().unwrap();
    let digits: String = stem.chars().filter(|c| c.is_ascii_digit()).collect();
    let n = digits.parse::<u32>().map_or(1, |n| n + 1);
    cur.with_file_name(format!("api{n}.sock"))
}

/// Times of one recovery, from the event that started it.
#[derive(Debug, Clone, Copy)]
pub struct Recovery {
    /// The snapshotter's own waits (reaping the process, WaitUntilUnmounted) before it starts the
    /// new daemon.
    pub snapshotter_wait: Duration,
    /// New process started -> RUNNING (INIT, takeover, start).
    pub daemon: Duration,
    /// Death (or exit request) -> RUNNING.
    pub total: Duration,
}

/// One daemon as the snapshotter's manager drives it (pkg/manager).
pub struct Managed {
    pub s: Snapshotter,
    pub spec: DaemonSpec,
    pub process: Process,
    pub client: Client,
    pub live: Option<Liveness>,
    pub supervisor: Option<Arc<Supervisor>>,
    pub stderr: PathBuf,
}

impl Drop for Managed {
    /// A failed test must not leave a mount behind, nor readers blocked on a connection nobody serves:
    /// kill the daemon, close the supervisor's descriptor (the kernel then aborts the connection) and
    /// detach the mount.
    fn drop(&mut self) {
        if let Some(mut c) = self.process.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(sup) = &self.supervisor {
            sup.destroy();
        }
        let mp = self.spec.mountpoint(&self.s);
        let c = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid path; detaching a mount of our own test.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

impl Managed {
    /// `StartDaemon` and its goroutine: start, WaitUntilSocketExisted, subscribe, RUNNING, SendStates.
    pub fn start(s: &Snapshotter, spec: DaemonSpec, stderr: &Path) -> Result<Managed, String> {
        std::fs::create_dir_all(spec.mountpoint(s)).unwrap();
        std::fs::create_dir_all(spec.apisock.parent().unwrap()).unwrap();
        let supervisor = (s.recover == Recover::Failover)
            .then(|| Arc::new(Supervisor::new(&spec.supervisor_sock(s))));
        let process = Process::start(s, &spec.argv(s, false), stderr);
        let mut m = Managed {
            s: s.clone(),
            client: Client::new(&spec.apisock),
            spec,
            process,
            live: None,
            supervisor,
            stderr: stderr.to_path_buf(),
        };
        m.after_start()?;
        Ok(m)
    }

    /// What the StartDaemon goroutine does once the process runs.
    fn after_start(&mut self) -> Result<(), String> {
        wait_until_socket_existed(&self.spec.apisock)?;
        self.live = Some(Liveness::subscribe(&self.spec.apisock));
        self.client
            .wait_until_state("RUNNING")
            .map_err(|e| format!("{e}\n{}", self.log()))?;
        self.send_states()
    }

    /// `SendStates`: FetchDaemonStates around PUT /api/v1/daemon/fuse/sendfd (failover only).
    pub fn send_states(&self) -> Result<(), String> {
        let Some(sup) = &self.supervisor else {
            return Ok(());
        };
        sup.fetch_daemon_states(Duration::from_secs(20), || {
            self.client.put("/api/v1/daemon/fuse/sendfd")
        })
    }

    /// `SharedMount`: `POST /api/v1/mount?mountpoint=/<sid>`, then SendStates.
    pub fn shared_mount(&self, sid: &str, config: &str) -> Result<(), String> {
        let r = self
            .client
            .mount(&format!("/{sid}"), &self.s.bootstrap(sid), config);
        let sent = self.send_states();
        if !r.ok() {
            return Err(r.error());
        }
        sent
    }

    pub fn log(&self) -> String {
        let daemon_log = std::fs::read_to_string(self.spec.log_file(&self.s)).unwrap_or_default();
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("{daemon_log}\n--- stderr ---\n{stderr}")
    }

    /// `doDaemonFailover`, after the liveness monitor reported the death at `died`: Wait (reap, then
    /// WaitUntilUnmounted, which fails: the mount stays), SendStatesTimeout(10 s), StartDaemon,
    /// WaitUntilState(INIT), TakeOver, Start; then the StartDaemon goroutine.
    pub fn failover(&mut self, died: Instant) -> Result<Recovery, String> {
        self.process.wait(Duration::from_secs(20));
        let _ = wait_until_unmounted(&self.spec.mountpoint(&self.s));
        self.live = None;
        let sup = self
            .supervisor
            .clone()
            .ok_or("failover needs a supervisor")?;
        let sender = sup.send_states_timeout(Duration::from_secs(10));
        let started = Instant::now();
        let snapshotter_wait = started - died;
        self.process = Process::start(&self.s, &self.spec.argv(&self.s, false), &self.stderr);
        self.client = Client::new(&self.spec.apisock);
        // StartDaemon's goroutine runs alongside; here its steps come after Start.
        wait_until_socket_existed(&self.spec.apisock).map_err(|e| {
            let pid = self.process.pid();
            format!(
                "{e}; the new daemon {pid}: {:?} {:?}",
                std::fs::read_to_string(format!("/proc/{pid}/stack")),
                std::fs::read_to_string(format!("/proc/{pid}/stat")),
            )
        })?;
        self.client.wait_until_state("INIT")?;
        let r = self.client.put("/api/v1/daemon/fuse/takeover");
        if !r.ok() {
            return Err(format!("takeover: {}", r.error()));
        }
        sender.join().unwrap()?;
        let r = self.client.put("/api/v1/daemon/start");
        if !r.ok() {
            return Err(format!("start: {}", r.error()));
        }
        self.live = Some(Liveness::subscribe(&self.spec.apisock));
        self.client.wait_until_state("RUNNING")?;
        let running = Instant::now();
        self.send_states()?;
        Ok(Recovery {
            snapshotter_wait,
            daemon: running - started,
            total: running - died,
        })
    }

    /// `doDaemonRestart` (recover_policy "restart"): Wait (reap, WaitUntilUnmounted), ClearVestige
    /// (unmount if IsMountpoint says so, remove the API socket), StartDaemon, then SharedMount of every
    /// instance of a shared daemon.
    pub fn restart(
        &mut self,
        died: Instant,
        shared_instances: &[(String, String)],
    ) -> Result<Recovery, String> {
        self.process.wait(Duration::from_secs(20));
        let mp = self.spec.mountpoint(&self.s);
        let _ = wait_until_unmounted(&mp);
        self.live = None;
        if is_mountpoint(&mp) {
            let c = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a valid path (syscall.Unmount(target, 0)).
            unsafe { libc::umount2(c.as_ptr(), 0) };
        }
        let _ = std::fs::remove_file(&self.spec.apisock);
        let started = Instant::now();
        self.process = Process::start(&self.s, &self.spec.argv(&self.s, false), &self.stderr);
        self.client = Client::new(&self.spec.apisock);
        self.after_start()?;
        for (sid, config) in shared_instances {
            self.shared_mount(sid, config)?;
        }
        let running = Instant::now();
        Ok(Recovery {
            snapshotter_wait: started - died,
            daemon: running - started,
            total: running - died,
        })
    }

    /// `DoDaemonUpgrade` to the same binary: new API socket, `--upgrade`, SendStatesTimeout, INIT,
    /// TakeOver, READY, exit of the old daemon (which must leave the mount), Start, RUNNING, then
    /// RecoverRafsInstances (SharedMount of each known instance) for a shared daemon.
    pub fn upgrade(&mut self, shared_instances: &[(String, String)]) -> Result<Recovery, String> {
        let sup = self
            .supervisor
            .clone()
            .ok_or("upgrade needs a supervisor")?;
        let mut next = self.spec.clone();
        next.apisock = next_api_socket(&self.spec.apisock);
        let sender = sup.send_states_timeout(Duration::from_secs(10));
        let began = Instant::now();
        let mut process = Process::start(&self.s, &next.argv(&self.s, true), &self.stderr);
        let client = Client::new(&next.apisock);
        wait_until_socket_existed(&next.apisock)?;
        client.wait_until_state("INIT")?;
        let r = client.put("/api/v1/daemon/fuse/takeover");
        if !r.ok() {
            return Err(format!("takeover: {}", r.error()));
        }
        sender.join().unwrap()?;
        client.wait_until_state("READY")?;
        self.live = None;
        let exit_at = Instant::now();
        let r = self.client.put("/api/v1/daemon/exit");
        if !r.ok() {
            return Err(format!("exit: {}", r.error()));
        }
        self.process.wait(Duration::from_secs(30));
        let r = client.put("/api/v1/daemon/start");
        if !r.ok() {
            return Err(format!("start: {}", r.error()));
        }
        let live = Liveness::subscribe(&next.apisock);
        client.wait_until_state("RUNNING")?;
        let running = Instant::now();
        std::mem::swap(&mut self.process, &mut process);
        drop(process);
        self.client = client;
        self.spec = next;
        self.live = Some(live);
        for (sid, config) in shared_instances {
            self.shared_mount(sid, config)?;
        }
        Ok(Recovery {
            snapshotter_wait: exit_at - began,
            daemon: running - exit_at,
            total: running - began,
        })
    }

    /// `DestroyDaemon` for the shared or dedicated daemon: unmount instances, destroy the supervisor
    /// (closing the held fd), SIGTERM, Wait (reap, WaitUntilUnmounted).
    pub fn destroy(&mut self, shared_instances: &[String]) -> Result<(), String> {
        for sid in shared_instances {
            let r = self.client.umount(&format!("/{sid}"));
            if !r.ok() {
                return Err(format!("umount {sid}: {}", r.error()));
            }
        }
        if let Some(sup) = &self.supervisor {
            sup.destroy();
        }
        self.live = None;
        self.process.signal(libc::SIGTERM);
        let status = self.process.wait(Duration::from_secs(20));
        if !status.success() {
            return Err(format!("exit after SIGTERM: {status}"));
        }
        if !wait_until_unmounted(&self.spec.mountpoint(&self.s)) {
            return Err("still mounted after the daemon exited".into());
        }
        Ok(())
    }
}

/// Readers of the mount run in processes of their own (this test binary, re-executed with
/// `RAFSD_TEST_READER` set): a process that holds a file of a FUSE mount open cannot start a daemon
/// for that mount while nobody serves it, because exec closes the file and the close waits for the
/// daemon to answer FLUSH. The test process itself therefore holds no such file while it fails over.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
pub struct ReaderJob {
    /// Files to read whole: (path, sha256, size).
    pub files: Vec<(PathBuf, String, u64)>,
    /// Read size.
    pub chunk: usize,
    /// Where the result goes (JSON [`ReaderResult`]).
    pub out: PathBuf,
    /// Hold the first file half read until this file appears (an open handle across a failover).
    pub hold_until: Option<PathBuf>,
}

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, Default)]
pub struct ReaderResult {
    pub files_ok: usize,
    pub errors: Vec<String>,
    pub reads: u64,
    /// The slowest single read(), in ms.
    pub max_read_ms: f64,
}

pub const READER_ENV: &str = "RAFSD_TEST_READER";

/// The reader process's body.
pub fn run_reader(job: &ReaderJob) -> ReaderResult {
    use sha2::Digest;
    let mut r = ReaderResult::default();
    for (i, (path, want, size)) in job.files.iter().enumerate() {
        let mut f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                r.errors.push(format!("open {}: {e}", path.display()));
                continue;
            }
        };
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; job.chunk];
        let mut got = 0u64;
        let mut failed = false;
        loop {
            if i == 0 && got >= size / 2 {
                if let Some(go) = &job.hold_until {
                    let _ = std::fs::write(job.out.with_extension("holding"), b"");
                    while !go.exists() {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            let t = Instant::now();
            let n = match f.read(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    r.errors
                        .push(format!("read {} at {got}: {e}", path.display()));
                    failed = true;
                    break;
                }
            };
            r.max_read_ms = r.max_read_ms.max(t.elapsed().as_secs_f64() * 1e3);
            r.reads += 1;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            got += n as u64;
        }
        if failed {
            continue;
        }
        let sha = format!("{:x}", h.finalize());
        if got != *size || sha != *want {
            r.errors.push(format!(
                "{}: {got} bytes, sha256 {sha}, want {size} {want}",
                path.display()
            ));
        } else {
            r.files_ok += 1;
        }
    }
    r
}

/// A reader process.
pub struct Reader {
    child: Child,
    pub job: ReaderJob,
}

impl Reader {
    /// Start `job` in a new process running the test named `test` of this binary.
    pub fn spawn(test: &str, job: ReaderJob) -> Reader {
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(READER_ENV, serde_json::to_string(&job).unwrap())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Reader { child, job }
    }

    /// A process that opens `file`, reads half of it and keeps it open until the returned path exists;
    /// returns once the file is open.
    pub fn hold_open(
        test: &str,
        file: (PathBuf, String, u64),
        dir: &Path,
        tag: &str,
    ) -> (Reader, PathBuf) {
        let go = dir.join(format!("{tag}.go"));
        let r = Reader::spawn(
            test,
            ReaderJob {
                files: vec![file],
                chunk: 4096,
                out: dir.join(format!("{tag}.json")),
                hold_until: Some(go.clone()),
            },
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !r.holding() {
            assert!(
                Instant::now() < deadline,
                "the holder never got its file open"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        (r, go)
    }

    pub fn holding(&self) -> bool {
        self.job.out.with_extension("holding").exists()
    }

    /// Wait (bounded) for the reader to finish; `None` if it did not.
    pub fn finish(&mut self, limit: Duration) -> Option<ReaderResult> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(_status) = self.child.try_wait().unwrap() {
                let text = std::fs::read_to_string(&self.job.out).ok()?;
                return serde_json::from_str(&text).ok();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The body of the reader test: does nothing unless started by [`Reader::spawn`].
pub fn reader_main() {
    let Some(job) = std::env::var_os(READER_ENV) else {
        return;
    };
    let job: ReaderJob = serde_json::from_str(&job.to_string_lossy()).unwrap();
    let result = run_reader(&job);
    std::fs::write(&job.out, serde_json::to_string(&result).unwrap()).unwrap();
    std::process::exit(0);
}
