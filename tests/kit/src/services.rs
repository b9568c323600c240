//! Servers the backend tests run: Debian's `docker-registry` (CNCF distribution) and `tinyproxy`, moto's
//! S3 server, and a fault-injecting blob server of our own. Each listens on a free loopback port, keeps
//! its files in a temp dir and is killed by pid when dropped.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::Digest;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A child process killed (SIGKILL, by pid) and reaped on drop.
pub struct Service {
    pub name: &'static str,
    child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
}

impl Service {
    /// Start `cmd` and wait (30 s at most) until it listens on `port`.
    pub fn spawn(name: &'static str, cmd: &mut Command, port: u16, log: &Path) -> Service {
        let child = crate::daemon::spawn_ready(cmd, log, Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .unwrap_or_else(|e| {
            panic!(
                "{name} {e} (listening on {port}):\n{}",
                crate::daemon::read_log(log)
            )
        });
        Service {
            name,
            child: Some(child),
            port,
            log: log.to_path_buf(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn basic_auth(user: &str, pass: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
}

pub enum RegistryAuth<'a> {
    None,
    Htpasswd(&'a str, &'a str),
    /// Token auth with tokens from `realm`, signed by the certificate in `cert`.
    Token {
        realm: String,
        cert: PathBuf,
    },
}

pub const TOKEN_SERVICE: &str = "rafsd-registry";

/// `docker-registry` on a free port with filesystem storage in `dir`.
pub fn start_registry(dir: &Path, auth: RegistryAuth) -> Service {
    start_registry_with(dir, auth, None)
}

/// A test CA and a server certificate for 127.0.0.1 signed by it, made with `openssl`:
/// (ca.pem, server-cert.pem, server-key.pem).
pub fn test_ca_and_server_cert(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |n: &str| dir.join(n);
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=rafsd test CA",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server-key.pem",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        p("server.ext"),
        "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server-cert.pem",
    ]);
    (p("ca.pem"), p("server-cert.pem"), p("server-key.pem"))
}

/// As [`start_registry`], serving HTTPS with `tls` = (cert, key) when given.
pub fn start_registry_with(
    dir: &Path,
    auth: RegistryAuth,
    tls: Option<(PathBuf, PathBuf)>,
) -> Service {
    crate::tier::require_full("docker-registry");
    let port = free_port();
    let auth = match auth {
        RegistryAuth::None => String::new(),
        RegistryAuth::Htpasswd(u, p) => {
            let out = Command::new("htpasswd")
                .args(["-Bbn", u, p])
                .output()
                .expect("htpasswd (apache2-utils)");
            assert!(out.status.success());
            std::fs::write(dir.join("htpasswd"), out.stdout).unwrap();
            format!(
                "auth:\n  htpasswd:\n    realm: rafsd-test\n    path: {}\n",
                dir.join("htpasswd").display()
            )
        }
        RegistryAuth::Token { realm, cert } => format!(
            "auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    issuer: rafsd-test-issuer\n    rootcertbundle: {}\n",
            cert.display()
        ),
    };
    let tls = match tls {
        Some((cert, key)) => format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            cert.display(),
            key.display()
        ),
        None => String::new(),
    };
    let config = format!(
        "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: rafsd-test-secret\n{tls}{auth}",
        dir.join("storage").display()
    );
    std::fs::write(dir.join("registry.yml"), config).unwrap();
    Service::spawn(
        "docker-registry",
        Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("registry.yml")),
        port,
        &dir.join("registry.log"),
    )
}

/// src/token_issuer.py (beside this module) on a free port: tokens for `user:pass`, valid `ttl` seconds, one log
/// line per token request in `dir/tokens.log`. Returns the service and the certificate path.
pub fn start_token_issuer(dir: &Path, user: &str, pass: &str, ttl: u64) -> (Service, PathBuf) {
    let port = free_port();
    let cert = dir.join("token-cert.pem");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/token_issuer.py");
    let svc = Service::spawn(
        "token issuer",
        Command::new("python3")
            .arg(script)
            .args(["--port", &port.to_string(), "--ttl", &ttl.to_string()])
            .args(["--user", user, "--password", pass])
            .arg("--cert")
            .arg(&cert)
            .arg("--log")
            .arg(dir.join("tokens.log")),
        port,
        &dir.join("token-issuer.out"),
    );
    (svc, cert)
}

/// A token for `repo` (pull and push) straight from the issuer, for pushing test blobs.
pub fn issue_token(issuer_port: u16, basic: &str, repo: &str) -> String {
    let url = format!(
        "http://127.0.0.1:{issuer_port}/token?service={TOKEN_SERVICE}&scope=repository:{repo}:pull,push"
    );
    let mut resp = ureq::get(&url)
        .header("Authorization", format!("Basic {basic}"))
        .call()
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&resp.body_mut().read_to_vec().unwrap()).unwrap();
    v["token"].as_str().unwrap().to_string()
}

/// Push `data` as a blob with the monolithic upload (POST, then PUT with the digest), sending
/// `authorization` as the Authorization header. Returns its id.
pub fn push_blob(port: u16, repo: &str, authorization: Option<&str>, data: &[u8]) -> String {
    push_blob_to(
        &format!("http://127.0.0.1:{port}"),
        repo,
        authorization,
        data,
    )
}

/// As [`push_blob`], to a registry at `base` (`http://` or `https://` with any certificate).
pub fn push_blob_to(base: &str, repo: &str, authorization: Option<&str>, data: &[u8]) -> String {
    let id = format!("{:x}", sha2::Sha256::digest(data));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .disable_verification(true)
                .build(),
        )
        .build()
        .into();
    let with_auth = |mut b: ureq::RequestBuilder<ureq::typestate::WithBody>| {
        if let Some(a) = authorization {
            b = b.header("Authorization", a);
        }
        b
    };
    let resp = with_auth(agent.post(format!("{base}/v2/{repo}/blobs/uploads/")))
        .send_empty()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202, "start upload");
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let location = if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let resp = with_auth(agent.put(format!("{location}{sep}digest=sha256:{id}")))
        .header("Content-Type", "application/octet-stream")
        .send(data)
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201, "finish upload of {id}");
    id
}

/// `tinyproxy` in the foreground on `port`, logging connections to `dir/tinyproxy.log`.
pub fn start_tinyproxy(dir: &Path, port: u16) -> Service {
    let log = dir.join("tinyproxy.log");
    let config = format!(
        "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{}\"\nLogLevel Connect\nMaxClients 50\nAllow 127.0.0.1\n",
        log.display()
    );
    std::fs::write(dir.join("tinyproxy.conf"), config).unwrap();
    Service::spawn(
        "tinyproxy",
        Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(dir.join("tinyproxy.conf")),
        port,
        &dir.join("tinyproxy.out"),
    )
}

/// moto's S3 server (`moto_server`, or `python3 -m moto.server`).
pub fn start_moto(dir: &Path, env: &[(&str, &str)]) -> Service {
    let port = free_port();
    let mut cmd = if have("moto_server") {
        Command::new("moto_server")
    } else {
        let mut c = Command::new("python3");
        c.args(["-m", "moto.server"]);
        c
    };
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Service::spawn("moto_server", &mut cmd, port, &dir.join("moto.log"))
}

// ---------------------------------------------------------------------------------------------------
// A blob server of our own that misbehaves on demand.

#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    Status(u16),
    /// 429 with `Retry-After: N`.
    TooMany(u64),
    /// Close the connection without answering.
    Reset,
    /// Promise the full length, send half, close.
    Truncate,
    /// A Content-Length that does not match the range (and a body of that wrong length).
    WrongLength,
    /// Headers, then nothing for this long.
    Stall(Duration),
    /// A correct answer, after this long (a slow backend).
    Slow(Duration),
    /// The wrong bytes with a plausible 206 (a cache gone bad): must be caught by digests, not here.
    Corrupt,
    /// Not HTTP at all.
    Garbage,
    /// A status line, then header lines without end.
    EndlessHead,
    /// A 206 whose Content-Range names another range than the one asked for.
    OtherRange,
    /// A Dragonfly proxy refusing: this status with `X-Dragonfly-Error-Type: proxy`.
    ProxyRefuses(u16),
    /// A correct 206 head, then the body one byte per this long (each read makes progress, the whole
    /// never ends in any useful time).
    Trickle(Duration),
    /// The response head one byte per this long (60 KB of header lines: hours).
    TrickleHead(Duration),
    /// 200 with the whole blob, whatever range was asked for (a server ignoring `Range`).
    WholeBlob,
}

#[derive(Default)]
pub struct FaultState {
    /// Applied to the next GETs of blob data, one each.
    pub queue: Vec<Fault>,
    /// Applied to every GET of blob data while set.
    pub always: Option<Fault>,
    /// Applied to every GET of one blob's data (by blob id) while set, before the others.
    pub per_blob: HashMap<String, Fault>,
    /// Applied to every token request while set (`Stall` and `Status` mean something there).
    pub token: Option<Fault>,
    /// The realm Bearer challenges name instead of this server's own `/token`.
    pub realm: Option<String>,
    /// The `expires_in` token answers say instead of the tokens' true lifetime (`FakeOptions::bearer`).
    pub token_expires_in: Option<u64>,
    /// The token every token answer hands out (and the registry takes), instead of a fresh one.
    pub token_text: Option<String>,
    /// Where blob GETs are redirected instead of `FakeOptions::redirect_to`'s host (a whole URL).
    pub redirect_url: Option<String>,
}

#[derive(Default)]
pub struct Counters {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub data_requests: AtomicU64,
    pub bytes: AtomicU64,
    pub token_requests: AtomicU64,
    pub unauthorized: AtomicU64,
    /// Requests at the storage path that carried an Authorization header (must stay 0).
    pub storage_auth_leaks: AtomicU64,
    pub storage_requests: AtomicU64,
    /// Blob data GETs received and not fully answered yet, and the most there were at once.
    pub data_in_flight: AtomicU64,
    pub data_in_flight_peak: AtomicU64,
}

/// Counts one blob data GET as in flight until dropped (its answer written, or the connection given up).
struct InFlight<'a>(&'a Counters);

impl<'a> InFlight<'a> {
    fn enter(c: &'a Counters) -> Self {
        let now = c.data_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        c.data_in_flight_peak.fetch_max(now, Ordering::SeqCst);
        InFlight(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.data_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct FakeOptions {
    /// Serve under `/v2/<repo>/blobs/sha256:<id>`; also plain `/<anything>/<id>`.
    pub repo: String,
    /// Require Bearer tokens from `/token` (issued with `expires_in` seconds).
    pub bearer: Option<u64>,
    /// Require this Basic credential (base64 user:pass) at the token endpoint.
    pub token_basic: Option<String>,
    /// Answer blob GETs with a 307 to `/storage/<id>` on this host:port (which this server also serves).
    pub redirect_to: Option<String>,
    /// Refuse HEAD at `/storage/` with 403 (pre-signed URLs valid for GET only).
    pub storage_head_403: bool,
}

impl FakeOptions {
    /// Blobs under `/v2/<repo>/blobs/` (and any path), no auth, no redirects.
    pub fn plain(repo: &str) -> FakeOptions {
        FakeOptions {
            repo: repo.into(),
            bearer: None,
            token_basic: None,
            redirect_to: None,
            storage_head_403: false,
        }
    }
}

/// Blob data answers wait here while the gate is closed ([`FakeServer::hold_data`]).
#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
    opened: Condvar,
}

#[derive(Default)]
struct GateState {
    closed: bool,
    /// Answers waiting now.
    waiting: usize,
    /// Answers that came to the gate since it closed.
    arrived: usize,
    /// How long each answer waits at most (60 s when unset, so a test that forgets to open it still
    /// ends).
    hold: Option<Duration>,
}

impl Gate {
    /// Wait while closed, at most the gate's hold.
    fn pass(&self) {
        let mut st = self.state.lock().unwrap();
        if !st.closed {
            return;
        }
        st.waiting += 1;
        st.arrived += 1;
        let deadline = Instant::now() + st.hold.unwrap_or(Duration::from_secs(60));
        while st.closed && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            st = self
                .opened
                .wait_timeout(st, left.min(Duration::from_millis(100)))
                .unwrap()
                .0;
        }
        st.waiting -= 1;
    }

    fn close(&self, hold: Option<Duration>) {
        let mut st = self.state.lock().unwrap();
        st.closed = true;
        st.arrived = 0;
        st.hold = hold;
    }
}

/// Paces blob data answers, all connections together, like one link of a given rate.
#[derive(Default)]
pub struct Pacer {
    /// (bytes per second, when the link is free again)
    state: Mutex<(Option<u64>, Option<Instant>)>,
}

impl Pacer {
    /// Write `body` in 64 KiB pieces, each sent once the link has carried the ones before it.
    fn write(&self, conn: &mut TcpStream, body: &[u8]) -> bool {
        for piece in body.chunks(64 << 10) {
            let start = {
                let mut st = self.state.lock().unwrap();
                let Some(rate) = st.0 else {
                    drop(st);
                    return conn.write_all(body).is_ok();
                };
                let now = Instant::now();
                let start = st.1.map_or(now, |free| free.max(now));
                st.1 = Some(start + Duration::from_secs_f64(piece.len() as f64 / rate as f64));
                start
            };
            if let Some(wait) = start.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if conn.write_all(piece).is_err() {
                return false;
            }
        }
        true
    }
}

/// From [`FakeServer::hold_data`]: opens the gate when dropped.
pub struct HeldData<'a>(&'a Gate);

impl Drop for HeldData<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap();
        st.closed = false;
        st.hold = None;
        self.0.opened.notify_all();
    }
}

pub struct FakeServer {
    pub port: u16,
    pub faults: Arc<Mutex<FaultState>>,
    pub counters: Arc<Counters>,
    gate: Arc<Gate>,
    pacer: Arc<Pacer>,
    blobs: Arc<Mutex<HashMap<String, Arc<Vec<u8>>>>>,
    /// Valid tokens and their expiry.
    tokens: Arc<Mutex<HashMap<String, Instant>>>,
    stop: Arc<AtomicBool>,
    /// Every request's line and headers (names lowercased), in arrival order.
    pub seen: Arc<Mutex<Vec<SeenRequest>>>,
}

#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub line: String,
    pub headers: HashMap<String, String>,
}

struct Shared {
    opts: FakeOptions,
    port: u16,
    faults: Arc<Mutex<FaultState>>,
    counters: Arc<Counters>,
    gate: Arc<Gate>,
    pacer: Arc<Pacer>,
    blobs: Arc<Mutex<HashMap<String, Arc<Vec<u8>>>>>,
    tokens: Arc<Mutex<HashMap<String, Instant>>>,
    next_token: AtomicU64,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
}

impl FakeServer {
    pub fn start(opts: FakeOptions) -> FakeServer {
        Self::start_on(opts, std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// [`FakeServer::start`] listening on `ip` (`0.0.0.0`: every address of the network namespace).
    pub fn start_on(opts: FakeOptions, ip: std::net::IpAddr) -> FakeServer {
        Self::start_at(opts, (ip, 0).into())
    }

    /// [`FakeServer::start`] listening at `addr`.
    pub fn start_at(opts: FakeOptions, addr: std::net::SocketAddr) -> FakeServer {
        let listener = TcpListener::bind(addr).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            opts,
            port,
            faults: Default::default(),
            counters: Default::default(),
            gate: Default::default(),
            pacer: Default::default(),
            blobs: Default::default(),
            tokens: Default::default(),
            next_token: AtomicU64::new(1),
            stop: Default::default(),
            seen: Default::default(),
        });
        let server = FakeServer {
            port,
            faults: shared.faults.clone(),
            counters: shared.counters.clone(),
            gate: shared.gate.clone(),
            pacer: shared.pacer.clone(),
            blobs: shared.blobs.clone(),
            tokens: shared.tokens.clone(),
            stop: shared.stop.clone(),
            seen: shared.seen.clone(),
        };
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !shared.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        shared.counters.connections.fetch_add(1, Ordering::Relaxed);
                        let shared = shared.clone();
                        std::thread::spawn(move || serve_conn(&shared, conn));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        server
    }

    pub fn add_blob(&self, data: Vec<u8>) -> String {
        let id = format!("{:x}", sha2::Sha256::digest(&data));
        self.blobs
            .lock()
            .unwrap()
            .insert(id.clone(), Arc::new(data));
        id
    }

    /// A plain server of `repo` holding every data blob of `dir` (files named by their sha256, as image
    /// builders name them).
    pub fn with_blobs_of(repo: &str, dir: &Path) -> FakeServer {
        let server = FakeServer::start(FakeOptions::plain(repo));
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let id = server.add_blob(std::fs::read(&path).unwrap());
            assert_eq!(
                path.file_name().unwrap().to_string_lossy(),
                id,
                "blob named by its sha256"
            );
        }
        server
    }

    /// Until the guard is dropped, blob data answers (GETs of a range) wait before they are sent: a
    /// backend read stalls until the test lets it go on (also when the test fails), then gets the right
    /// bytes.
    pub fn hold_data(&self) -> HeldData<'_> {
        self.gate.close(None);
        HeldData(&self.gate)
    }

    /// Until the guard is dropped, each blob data answer waits `each` before it is sent (a registry
    /// that answers, slowly), or until the guard is dropped.
    pub fn hold_data_for(&self, each: Duration) -> HeldData<'_> {
        self.gate.close(Some(each));
        HeldData(&self.gate)
    }

    /// Blob data answers waiting at the gate now.
    pub fn held(&self) -> usize {
        self.gate.state.lock().unwrap().waiting
    }

    /// Blob data answers that came to the gate since it was closed (held or let go since).
    pub fn held_in_all(&self) -> usize {
        self.gate.state.lock().unwrap().arrived
    }

    /// Wait (bounded) until at least `n` answers wait at the gate.
    pub fn wait_held(&self, n: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.held() < n {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Send blob data at `bytes_per_sec` at most, all connections together (None: as fast as possible).
    pub fn set_rate(&self, bytes_per_sec: Option<u64>) {
        *self.pacer.state.lock().unwrap() = (bytes_per_sec, None);
    }

    pub fn revoke_tokens(&self) {
        self.tokens.lock().unwrap().clear();
    }

    pub fn set_always(&self, f: Option<Fault>) {
        self.faults.lock().unwrap().always = f;
    }

    /// Every GET of blob `id`'s data meets `f` (None: served normally again).
    pub fn set_blob_fault(&self, id: &str, f: Option<Fault>) {
        let mut faults = self.faults.lock().unwrap();
        match f {
            Some(f) => faults.per_blob.insert(id.to_string(), f),
            None => faults.per_blob.remove(id),
        };
    }

    /// Token answers hand out `token` (None: a fresh one each).
    pub fn set_token_text(&self, token: Option<String>) {
        self.faults.lock().unwrap().token_text = token;
    }

    /// Token answers say their tokens expire in `secs` (None: their true lifetime).
    pub fn set_token_expires_in(&self, secs: Option<u64>) {
        self.faults.lock().unwrap().token_expires_in = secs;
    }

    /// Every token request meets `f` (`Stall`: no answer for that long; `Status`: that status; `Slow`:
    /// the answer after that long).
    pub fn set_token_fault(&self, f: Option<Fault>) {
        self.faults.lock().unwrap().token = f;
    }

    /// Bearer challenges name `realm` as the token endpoint (None: this server's `/token`).
    pub fn set_realm(&self, realm: Option<String>) {
        self.faults.lock().unwrap().realm = realm;
    }

    /// Blob GETs are answered with a 307 to `url` (None: served, or redirected as the options say).
    pub fn set_redirect(&self, url: Option<String>) {
        self.faults.lock().unwrap().redirect_url = url;
    }

    pub fn queue(&self, faults: &[Fault]) {
        self.faults.lock().unwrap().queue.extend_from_slice(faults);
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn respond(conn: &mut TcpStream, status: u16, headers: &[(&str, String)], body: &[u8]) -> bool {
    let mut head = format!("HTTP/1.1 {status} X\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).is_ok() && conn.write_all(body).is_ok()
}

/// Write `bytes` one byte per `every` until done, the peer leaves or the server stops; false unless all
/// went out.
fn drip(s: &Shared, conn: &mut TcpStream, bytes: &[u8], every: Duration) -> bool {
    for b in bytes {
        if s.stop.load(Ordering::Relaxed) || conn.write_all(&[*b]).is_err() {
            return false;
        }
        std::thread::sleep(every);
    }
    true
}

fn serve_conn(s: &Shared, mut conn: TcpStream) {
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        if let Some(n) = headers
            .get("content-length")
            .and_then(|v| v.parse::<u64>().ok())
        {
            let mut sink = vec![0u8; n as usize];
            if reader.read_exact(&mut sink).is_err() {
                return;
            }
        }
        s.counters.requests.fetch_add(1, Ordering::Relaxed);
        s.seen.lock().unwrap().push(SeenRequest {
            line: line.trim_end().to_string(),
            headers: headers.clone(),
        });
        if !handle(s, &mut conn, &method, &target, &headers) {
            return;
        }
    }
}

/// Answer one request; false closes the connection.
fn handle(
    s: &Shared,
    conn: &mut TcpStream,
    method: &str,
    target: &str,
    headers: &HashMap<String, String>,
) -> bool {
    // An absolute-form target (the server playing a forward proxy that serves from its own store).
    let target = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let path = target.split('?').next().unwrap_or("");
    if path == "/token" {
        s.counters.token_requests.fetch_add(1, Ordering::Relaxed);
        let fault = s.faults.lock().unwrap().token.clone();
        match fault {
            Some(Fault::Stall(d)) => {
                std::thread::sleep(d);
                return false;
            }
            Some(Fault::Status(code)) => {
                respond(conn, code, &[], b"fault");
                return false;
            }
            Some(Fault::Slow(d)) => std::thread::sleep(d),
            _ => {}
        }
        if let Some(want) = &s.opts.token_basic {
            if headers.get("authorization") != Some(&format!("Basic {want}")) {
                return respond(conn, 401, &[], b"{}");
            }
        }
        let ttl = s.opts.bearer.unwrap_or(60);
        let given = s.faults.lock().unwrap().token_text.clone();
        let token =
            given.unwrap_or_else(|| format!("tok{}", s.next_token.fetch_add(1, Ordering::Relaxed)));
        s.tokens
            .lock()
            .unwrap()
            .insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
        let said = s.faults.lock().unwrap().token_expires_in.unwrap_or(ttl);
        let body = serde_json::json!({"token": token, "expires_in": said}).to_string();
        return respond(
            conn,
            200,
            &[("Content-Type", "application/json".into())],
            body.as_bytes(),
        );
    }
    if path == "/v2" || path == "/v2/" {
        return respond(conn, 200, &[], b"{}");
    }
    let id = path.rsplit('/').next().unwrap_or("");
    let id = id.strip_prefix("sha256:").unwrap_or(id).to_string();
    let at_storage = path.starts_with("/storage/");
    if at_storage {
        s.counters.storage_requests.fetch_add(1, Ordering::Relaxed);
        if headers.contains_key("authorization") {
            s.counters
                .storage_auth_leaks
                .fetch_add(1, Ordering::Relaxed);
        }
    } else if let Some(_ttl) = s.opts.bearer {
        let ok = headers
            .get("authorization")
            .and_then(|h| h.strip_prefix("Bearer "))
            .is_some_and(|t| {
                s.tokens
                    .lock()
                    .unwrap()
                    .get(t)
                    .is_some_and(|exp| Instant::now() < *exp)
            });
        if !ok {
            s.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
            let realm = s.faults.lock().unwrap().realm.clone();
            let realm = realm.unwrap_or_else(|| format!("http://127.0.0.1:{}/token", s.port));
            let www = format!(
                r#"Bearer realm="{realm}",service="fake",scope="repository:{}:pull""#,
                s.opts.repo
            );
            return respond(conn, 401, &[("WWW-Authenticate", www)], b"");
        }
    }
    let Some(blob) = s.blobs.lock().unwrap().get(&id).cloned() else {
        return respond(conn, 404, &[], b"");
    };
    let redirect_url = s.faults.lock().unwrap().redirect_url.clone();
    if let Some(url) = redirect_url.filter(|_| !at_storage) {
        return respond(conn, 307, &[("Location", url)], b"");
    }
    if !at_storage {
        if let Some(host) = &s.opts.redirect_to {
            return respond(
                conn,
                307,
                &[("Location", format!("https://{host}/storage/{id}?sig=x"))],
                b"",
            );
        }
    }
    if method == "HEAD" && at_storage && s.opts.storage_head_403 {
        return respond(conn, 403, &[], b"");
    }
    if method == "HEAD" {
        return respond(
            conn,
            200,
            &[("Content-Length", blob.len().to_string())],
            b"",
        ) && conn.flush().is_ok();
    }
    // GET with a range.
    let (a, b) = headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
        .unwrap_or((0, blob.len().saturating_sub(1)));
    let b = b.min(blob.len().saturating_sub(1));
    s.counters.data_requests.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight::enter(&s.counters);
    let fault = {
        let mut f = s.faults.lock().unwrap();
        if let Some(fault) = f.per_blob.get(&id) {
            Some(fault.clone())
        } else if f.queue.is_empty() {
            f.always.clone()
        } else {
            Some(f.queue.remove(0))
        }
    };
    let body = &blob[a..=b];
    let range = format!("bytes {a}-{b}/{}", blob.len());
    s.gate.pass();
    if let Some(Fault::Slow(d)) = fault {
        std::thread::sleep(d);
    }
    match fault {
        None | Some(Fault::Slow(_)) => {
            s.counters
                .bytes
                .fetch_add(body.len() as u64, Ordering::Relaxed);
            let head = format!(
                "HTTP/1.1 206 X\r\nContent-Range: {range}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            conn.write_all(head.as_bytes()).is_ok() && s.pacer.write(conn, body)
        }
        // Error answers close the connection, as many servers do.
        Some(Fault::Status(code)) => {
            respond(conn, code, &[], b"fault");
            false
        }
        Some(Fault::TooMany(secs)) => {
            respond(conn, 429, &[("Retry-After", secs.to_string())], b"");
            false
        }
        Some(Fault::Reset) => {
            let _ = conn.shutdown(std::net::Shutdown::Both);
            false
        }
        Some(Fault::Truncate) => {
            let head = format!(
                "HTTP/1.1 206 X\r\nContent-Range: {range}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&body[..body.len() / 2]);
            let _ = conn.shutdown(std::net::Shutdown::Both);
            false
        }
        Some(Fault::WrongLength) => {
            let short = &body[..body.len().saturating_sub(1).max(1).min(body.len())];
            respond(
                conn,
                206,
                &[
                    ("Content-Range", range),
                    ("Content-Length", short.len().to_string()),
                ],
                short,
            );
            false
        }
        Some(Fault::Stall(d)) => {
            let head = format!(
                "HTTP/1.1 206 X\r\nContent-Range: {range}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes());
            std::thread::sleep(d);
            false
        }
        Some(Fault::Corrupt) => {
            let bad: Vec<u8> = body.iter().map(|b| b ^ 0x5a).collect();
            respond(conn, 206, &[("Content-Range", range)], &bad)
        }
        Some(Fault::Garbage) => {
            let _ = conn.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\x00\x01\x02 not http at all\r\n\r\n");
            false
        }
        Some(Fault::EndlessHead) => {
            let _ = conn.write_all(b"HTTP/1.1 206 X\r\n");
            let line = format!("X-Filler: {}\r\n", "a".repeat(1000));
            for _ in 0..10_000 {
                if conn.write_all(line.as_bytes()).is_err() {
                    break;
                }
            }
            false
        }
        Some(Fault::OtherRange) => {
            let other = format!("bytes {}-{}/{}", a + 1, b + 1, blob.len());
            respond(conn, 206, &[("Content-Range", other)], body);
            false
        }
        Some(Fault::Trickle(every)) => {
            let head = format!(
                "HTTP/1.1 206 X\r\nContent-Range: {range}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            conn.write_all(head.as_bytes()).is_ok() && drip(s, conn, body, every)
        }
        Some(Fault::TrickleHead(every)) => {
            let line = format!("X-Filler: {}\r\n", "a".repeat(1000));
            let head = format!("HTTP/1.1 206 X\r\n{}", line.repeat(60));
            drip(s, conn, head.as_bytes(), every);
            false
        }
        Some(Fault::WholeBlob) => {
            respond(conn, 200, &[], &blob);
            false
        }
        Some(Fault::ProxyRefuses(code)) => {
            respond(
                conn,
                code,
                &[("X-Dragonfly-Error-Type", "proxy".into())],
                b"refused",
            );
            false
        }
    }
}
