//! The HTTP layer the network backends share: one blocking client (ureq + rustls) per backend, bounded
//! timeouts, retries with backoff, `mirrors` failover and a forward `proxy` with fallback, and the range
//! check that keeps wrong bytes away from readers.
//!
//! A backend ([`Remote`]) only knows how to address and authorize a blob; [`RemoteBackend`] turns it into a
//! [`BlobBackend`] by doing the retries and checking every response against the range it asked for.

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::forward_proxy::{self, ForwardProxy};
use super::BlobBackend;
use crate::config::HttpConfig;
use crate::error::{BackendErrorKind, Error, Result};

/// Longest pause a server's `Retry-After` may impose on one retry: reads stay bounded in time.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Largest body read for requests that are not blob ranges (token responses, errors, pings).
const SMALL_BODY_LIMIT: u64 = 1 << 20;
/// Idle connections kept per host: about the number of readers that fetch at once.
const MAX_IDLE_CONNECTIONS: usize = 32;

/// The settings every network backend shares (nydusd's names and defaults, seconds as integers).
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub timeout: Option<Duration>,
    pub connect_timeout: Option<Duration>,
    /// Retries after the first attempt of a read.
    pub retry_limit: u32,
    pub skip_verify: bool,
    /// PEM files whose certificates replace the bundled web PKI roots (a private registry's CA).
    pub ca_cert_files: Vec<std::path::PathBuf>,
    pub proxy: Option<ProxySettings>,
    pub mirrors: Vec<MirrorSettings>,
}

#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub url: String,
    pub ping_url: Option<String>,
    pub fallback: bool,
    pub check_interval: Duration,
    pub use_http: bool,
}

#[derive(Debug, Clone)]
pub struct MirrorSettings {
    /// `scheme://host[:port]` replacing the origin's.
    pub host: String,
    pub headers: Vec<(String, String)>,
    /// Send the origin's Authorization to the mirror too.
    pub auth_through: bool,
    pub health_check_interval: Duration,
    pub failure_limit: u32,
    pub ping_url: String,
}

fn seconds(n: u64) -> Option<Duration> {
    (n > 0).then(|| Duration::from_secs(n))
}

impl HttpSettings {
    /// The transport's settings from a backend's (checked) config: 0 s means no timeout, intervals are at
    /// least a second, a proxy without a URL is none.
    pub fn new(c: &HttpConfig) -> Self {
        let p = &c.proxy;
        HttpSettings {
            timeout: seconds(c.timeout),
            connect_timeout: seconds(c.connect_timeout),
            retry_limit: c.retry_limit.min(16) as u32,
            skip_verify: c.skip_verify,
            ca_cert_files: c.ca_cert_files.clone(),
            proxy: (!p.url.is_empty()).then(|| ProxySettings {
                url: p.url.clone(),
                ping_url: Some(p.ping_url.clone()).filter(|u| !u.is_empty()),
                fallback: p.fallback,
                check_interval: Duration::from_secs(p.check_interval.max(1)),
                use_http: p.use_http,
            }),
            mirrors: c
                .mirrors
                .iter()
                .map(|m| {
                    let host = m.host.trim_end_matches('/').to_string();
                    MirrorSettings {
                        ping_url: m.ping_url.clone().unwrap_or_else(|| format!("{host}/v2")),
                        host,
                        headers: m.headers.clone().into_iter().collect(),
                        auth_through: m.auth_through,
                        health_check_interval: Duration::from_secs(m.health_check_interval.max(1)),
                        failure_limit: m.failure_limit.clamp(1, u32::MAX as u64) as u32,
                    }
                })
                .collect(),
        }
    }
}

/// One HTTP response with its body read (bounded), or for a streamed range ([`BlobRange::stream`]) answered
/// with 206 on a ureq route, still to be read from `live`.
pub struct Response {
    pub status: u16,
    headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body ended early or failed mid-way (the bytes in `body` are what arrived).
    pub body_error: Option<String>,
    /// The unread body of a streamed range, limited to the range's length.
    pub live: Option<ureq::BodyReader<'static>>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .field("body_error", &self.body_error)
            .field("live", &self.live.is_some())
            .finish()
    }
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request got no usable HTTP answer: the kind of failure, for callers that branch on it, and the
/// sentence for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TransportError {
    pub kind: TransportErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportErrorKind {
    /// No connection: refused, unreachable, unknown host, a CONNECT tunnel refused.
    Connect,
    /// The connect or overall timeout passed, or the body stalled.
    Timeout,
    /// The TLS handshake or the server's certificate failed.
    Tls,
    /// The plain forward proxy broke the exchange (bad head, short or oversized body).
    Proxy,
    /// Anything else (protocol violations, I/O errors mid-request).
    Other,
}

impl TransportError {
    pub fn new(kind: TransportErrorKind, message: impl Into<String>) -> Self {
        TransportError {
            kind,
            message: message.into(),
        }
    }
}

impl From<ureq::Error> for TransportError {
    fn from(e: ureq::Error) -> Self {
        use std::io::ErrorKind as Io;
        use ureq::Error as U;
        let kind = match &e {
            U::Timeout(_) | U::BodyStalled => TransportErrorKind::Timeout,
            U::HostNotFound | U::ConnectionFailed | U::ConnectProxyFailed(_) => {
                TransportErrorKind::Connect
            }
            U::Tls(_) | U::Pem(_) | U::Rustls(_) | U::TlsRequired => TransportErrorKind::Tls,
            U::Io(io) => match io.kind() {
                Io::TimedOut | Io::WouldBlock => TransportErrorKind::Timeout,
                Io::ConnectionRefused | Io::HostUnreachable | Io::NetworkUnreachable => {
                    TransportErrorKind::Connect
                }
                _ => TransportErrorKind::Other,
            },
            _ => TransportErrorKind::Other,
        };
        TransportError::new(kind, e.to_string())
    }
}

/// What a failed attempt means for the read.
#[derive(Debug)]
pub enum Failure {
    /// Worth another attempt (transport error, 5xx, 429, short body), maybe after `after`.
    Retry {
        why: String,
        after: Option<Duration>,
    },
    /// Retrying cannot help (404, 403, bad config): fail the read now.
    Fatal(Error),
}

impl Failure {
    pub fn retry(why: impl Into<String>) -> Self {
        Failure::Retry {
            why: why.into(),
            after: None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Method {
    Get,
    Head,
}

/// An inclusive byte range of a blob; `stream` asks for the body to be handed over unread
/// ([`Response::live`]), for ranges read front to back in pieces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobRange {
    pub first: u64,
    pub last: u64,
    pub stream: bool,
}

impl BlobRange {
    pub fn new(first: u64, last: u64) -> Self {
        BlobRange {
            first,
            last,
            stream: false,
        }
    }
}

/// A request as a backend describes it; the client decides the route (mirror, proxy, direct).
pub struct Request<'a> {
    pub method: Method,
    pub url: &'a str,
    pub headers: &'a [(String, String)],
    /// Inclusive byte range.
    pub range: Option<(u64, u64)>,
    /// Hand a 206 body over unread (see [`BlobRange::stream`]).
    pub stream: bool,
    /// May be served by a mirror (registry blob and ping URLs; not tokens or redirected storage URLs).
    pub mirrorable: bool,
    /// May go through the proxy (token requests never do).
    pub proxied: bool,
}

impl<'a> Request<'a> {
    /// A blob request: a ranged GET for data, or a HEAD for the size when `range` is `None`. Mirrors and
    /// the proxy may serve it; a caller that must reach one host only turns `mirrorable` off.
    pub fn blob(url: &'a str, headers: &'a [(String, String)], range: Option<BlobRange>) -> Self {
        Request {
            method: if range.is_some() {
                Method::Get
            } else {
                Method::Head
            },
            url,
            headers,
            range: range.map(|r| (r.first, r.last)),
            stream: range.is_some_and(|r| r.stream),
            mirrorable: true,
            proxied: true,
        }
    }
}

/// Up/down state of a proxy or mirror, re-probed lazily: no thread, no traffic while all is well.
struct Health {
    failures: u32,
    down_since: Option<Instant>,
}

/// Counters a test or the metrics API can read.
#[derive(Default)]
pub struct HttpCounters {
    pub requests: AtomicU64,
    pub via_proxy: AtomicU64,
    pub via_mirror: AtomicU64,
    pub body_bytes: AtomicU64,
    pub retries: AtomicU64,
}

pub struct HttpClient {
    pub settings: HttpSettings,
    direct: ureq::Agent,
    /// Like `direct` for streamed ranges: no deadline for the whole exchange (a large range over a slow
    /// link may take longer than `timeout`), but every read must make progress within it.
    direct_stream: ureq::Agent,
    /// The proxy as ureq speaks to it: CONNECT tunnels, used for https:// targets.
    via_proxy: Option<ureq::Agent>,
    /// The proxy as a plain forward proxy, used for http:// targets (absolute-form requests).
    forward: Option<ForwardProxy>,
    proxy_health: Mutex<Health>,
    mirror_health: Vec<Mutex<Health>>,
    pub counters: HttpCounters,
}

/// The TLS roots: the bundled web PKI roots (no system CA files are read), or the configured CA files.
fn tls_roots(settings: &HttpSettings) -> Result<ureq::tls::RootCerts> {
    if settings.ca_cert_files.is_empty() {
        return Ok(ureq::tls::RootCerts::WebPki);
    }
    let mut certs = Vec::new();
    for path in &settings.ca_cert_files {
        let pem = std::fs::read(path)
            .map_err(|e| Error::io(format!("read CA file {}", path.display()), e))?;
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
                Ok(_) => {}
                Err(e) => return Err(Error::Invalid(format!("CA file {}: {e}", path.display()))),
            }
        }
    }
    if certs.is_empty() {
        return Err(Error::Invalid("`ca_cert_files` hold no certificate".into()));
    }
    Ok(ureq::tls::RootCerts::new_with_certs(&certs))
}

fn agent(settings: &HttpSettings, proxy: Option<&str>) -> Result<ureq::Agent> {
    agent_with(settings, proxy, false)
}

/// An agent for long transfers (whole layers pulled or pushed by `rafsd convert`): no deadline for the
/// whole exchange, but every read and write must make progress within the `timeout`.
pub fn streaming_agent(settings: &HttpSettings) -> Result<ureq::Agent> {
    agent_with(settings, None, true)
}

fn agent_with(
    settings: &HttpSettings,
    proxy: Option<&str>,
    streaming: bool,
) -> Result<ureq::Agent> {
    let proxy = proxy
        .map(|p| {
            ureq::Proxy::new(p)
                .map_err(|e| Error::Invalid(format!("proxy url {:?}: {e}", crate::redact::text(p))))
        })
        .transpose()?;
    let (global, per_io) = match streaming {
        true => (None, settings.timeout),
        false => (settings.timeout, None),
    };
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        // Keep a connection per concurrent reader (FUSE workers, prefetch threads) instead of ureq's
        // 3 per host: a new connection costs a round trip before the request can even go out.
        .max_idle_connections(MAX_IDLE_CONNECTIONS)
        .max_idle_connections_per_host(MAX_IDLE_CONNECTIONS)
        // Environment proxies are ignored: only the config decides where blob traffic goes.
        .proxy(proxy)
        .timeout_global(global)
        .timeout_per_read(per_io)
        .timeout_per_write(per_io)
        .timeout_connect(settings.connect_timeout)
        .user_agent("rafsd/0.1")
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(tls_roots(settings)?)
                .disable_verification(settings.skip_verify)
                .build(),
        )
        .build();
    Ok(ureq::Agent::new_with_config(config))
}

fn now_down() -> Health {
    Health {
        failures: 0,
        down_since: None,
    }
}

impl HttpClient {
    pub fn new(settings: HttpSettings) -> Result<Self> {
        let direct = agent(&settings, None)?;
        let direct_stream = streaming_agent(&settings)?;
        let via_proxy = match &settings.proxy {
            Some(p) => Some(agent(&settings, Some(&p.url))?),
            None => None,
        };
        let forward = settings
            .proxy
            .as_ref()
            .and_then(|p| ForwardProxy::from_url(&p.url));
        let mirror_health = settings
            .mirrors
            .iter()
            .map(|_| Mutex::new(now_down()))
            .collect();
        Ok(HttpClient {
            settings,
            direct,
            direct_stream,
            via_proxy,
            forward,
            proxy_health: Mutex::new(now_down()),
            mirror_health,
            counters: HttpCounters::default(),
        })
    }

    /// The agent for requests straight to the origin (no proxy), with the overall timeout.
    pub fn direct_agent(&self) -> &ureq::Agent {
        &self.direct
    }

    /// The agent for `req` on a direct route (origin or mirror): streamed ranges have no overall deadline.
    fn direct_for(&self, req: &Request) -> &ureq::Agent {
        match req.stream {
            true => &self.direct_stream,
            false => &self.direct,
        }
    }

    /// One request on one agent, body read up to `limit` bytes.
    fn send_on(
        &self,
        agent: &ureq::Agent,
        req: &Request,
        url: &str,
        extra: &[(String, String)],
        skip_auth: bool,
        limit: u64,
    ) -> std::result::Result<Response, TransportError> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut builder = match req.method {
            Method::Get => agent.get(url),
            Method::Head => agent.head(url),
        };
        for (k, v) in req.headers.iter().chain(extra) {
            if skip_auth && k.eq_ignore_ascii_case("authorization") {
                continue;
            }
            builder = builder.header(k.as_str(), v.as_str());
        }
        if let Some((a, b)) = req.range {
            builder = builder.header("Range", format!("bytes={a}-{b}"));
        }
        let mut resp = builder.call().map_err(TransportError::from)?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        if req.stream && status == 206 {
            // The caller reads it as it arrives; ureq's limit keeps it to the range's length.
            let live = resp.into_body().into_with_config().limit(limit).reader();
            return Ok(Response {
                status,
                headers,
                body: Vec::new(),
                body_error: None,
                live: Some(live),
            });
        }
        let mut body = Vec::with_capacity(limit.min(16 << 20) as usize);
        let mut body_error = None;
        if req.method == Method::Get {
            // ureq's own limit (not `Read::take`) so the body is read to its end and the connection
            // goes back to the pool; a body longer than asked for is an error.
            let mut reader = resp.body_mut().with_config().limit(limit).reader();
            if let Err(e) = reader.read_to_end(&mut body) {
                body_error = Some(e.to_string());
            }
        }
        self.counters
            .body_bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        Ok(Response {
            status,
            headers,
            body,
            body_error,
            live: None,
        })
    }

    /// One absolute-form request through the plain forward proxy, with the headers Dragonfly's dfdaemon
    /// reads. The registry's Authorization goes along: the proxy fetches from the registry for us.
    fn send_forward(
        &self,
        proxy: &ForwardProxy,
        req: &Request,
        url: &str,
        limit: u64,
    ) -> std::result::Result<Response, TransportError> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let range = req.range.map(|(a, b)| format!("bytes={a}-{b}"));
        let mut headers: Vec<(&str, &str)> = req
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if let Some(r) = &range {
            headers.push(("Range", r));
        }
        // Every read here is on demand (priority 6); prefetch (3) is not told apart yet.
        headers.push(("X-Dragonfly-Priority", "6"));
        headers.push(("X-Dragonfly-Use-P2P", "true"));
        let answer = forward_proxy::exchange(
            proxy,
            &forward_proxy::Exchange {
                head_only: req.method == Method::Head,
                url,
                headers: &headers,
                connect_timeout: self.settings.connect_timeout,
                timeout: self.settings.timeout,
                limit,
            },
        )
        .map_err(|e| TransportError::new(TransportErrorKind::Proxy, e))?;
        self.counters
            .body_bytes
            .fetch_add(answer.body.len() as u64, Ordering::Relaxed);
        Ok(Response {
            status: answer.status,
            headers: answer.headers,
            body: answer.body,
            body_error: answer.body_error,
            live: None,
        })
    }

    /// Why a mirror's or proxy's answer should not be used, if it should not: the route is the suspect
    /// for transport failures, 5xx, broken bodies and ranges other than the one asked for.
    fn route_fault(
        req: &Request,
        result: &std::result::Result<Response, TransportError>,
    ) -> Option<String> {
        let r = match result {
            Err(e) => return Some(e.to_string()),
            Ok(r) => r,
        };
        if r.status >= 500 {
            return Some(format!("status {}", r.status));
        }
        if let Some(e) = &r.body_error {
            return Some(format!("body: {e}"));
        }
        if let (206, Some((a, b))) = (r.status, req.range) {
            let got = r.header("content-range").and_then(content_range);
            // A streamed body is checked by its reader as it arrives.
            let body_len = match &r.live {
                Some(_) => b - a + 1,
                None => r.body.len() as u64,
            };
            if got.is_none_or(|(x, y, _)| (x, y) != (a, b)) || body_len != b - a + 1 {
                return Some(format!(
                    "asked for bytes {a}-{b}, got {:?} with {} bytes",
                    r.header("content-range"),
                    r.body.len()
                ));
            }
        }
        None
    }

    /// Whether a proxy or mirror should be tried now. A down one is tried again (pinged first if it
    /// has a ping URL) once `interval` has passed; only one caller re-probes, the others go elsewhere.
    fn usable(&self, health: &Mutex<Health>, interval: Duration, ping: Option<&str>) -> bool {
        let mut h = health.lock().unwrap_or_else(|e| e.into_inner());
        let Some(since) = h.down_since else {
            return true;
        };
        if since.elapsed() < interval {
            return false;
        }
        // Restart the clock so concurrent readers do not all probe.
        h.down_since = Some(Instant::now());
        drop(h);
        let up = match ping {
            None => true,
            Some(url) => self
                .direct
                .get(url)
                .call()
                .map(|r| r.status().as_u16() < 500)
                .unwrap_or(false),
        };
        if up {
            let mut h = health.lock().unwrap_or_else(|e| e.into_inner());
            h.down_since = None;
            h.failures = 0;
            log::info!("network route is back up, using it again");
        }
        up
    }

    fn mark(&self, health: &Mutex<Health>, ok: bool, limit: u32, what: &str) {
        let mut h = health.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            h.failures = 0;
            return;
        }
        h.failures += 1;
        if h.failures >= limit && h.down_since.is_none() {
            log::warn!("{what} failed {} times, bypassing it for now", h.failures);
            h.down_since = Some(Instant::now());
        }
    }

    /// Send `req` by the best route: healthy mirrors in order, then the proxy, then the origin.
    /// A route that fails at the transport level or answers >= 500 is skipped for the next.
    pub fn send(&self, req: &Request, limit: u64) -> std::result::Result<Response, TransportError> {
        if req.mirrorable {
            for (i, m) in self.settings.mirrors.iter().enumerate() {
                let health = &self.mirror_health[i];
                if !self.usable(health, m.health_check_interval, Some(&m.ping_url)) {
                    continue;
                }
                let Some(url) = rehost(req.url, &m.host) else {
                    continue;
                };
                self.counters.via_mirror.fetch_add(1, Ordering::Relaxed);
                let result = self.send_on(
                    self.direct_for(req),
                    req,
                    &url,
                    &m.headers,
                    !m.auth_through,
                    limit,
                );
                match Self::route_fault(req, &result) {
                    None => {
                        self.mark(health, true, m.failure_limit, "mirror");
                        return result;
                    }
                    Some(why) => {
                        log::warn!("mirror {}: {why}", m.host);
                        self.mark(health, false, m.failure_limit, "mirror");
                    }
                }
            }
        }
        if req.proxied {
            if let (Some(p), Some(agent)) = (&self.settings.proxy, &self.via_proxy) {
                if self.usable(&self.proxy_health, p.check_interval, p.ping_url.as_deref()) {
                    let url = match p.use_http {
                        true => req.url.replacen("https://", "http://", 1),
                        false => req.url.to_string(),
                    };
                    self.counters.via_proxy.fetch_add(1, Ordering::Relaxed);
                    // http:// targets go as absolute-form requests the proxy can see and cache; an
                    // https:// target (no `use_http`) keeps ureq's CONNECT tunnel, opaque to the proxy.
                    let result = match (&self.forward, url.starts_with("http://")) {
                        (Some(fp), true) => self.send_forward(fp, req, &url, limit),
                        _ => self.send_on(agent, req, &url, &[], false, limit),
                    };
                    let refused = match &result {
                        Ok(r) if r.header("x-dragonfly-error-type") == Some("proxy") => {
                            Some(r.status)
                        }
                        _ => None,
                    };
                    match (Self::route_fault(req, &result), refused) {
                        // The proxy is rate limiting: this request goes direct, the proxy stays in use.
                        (None, Some(429)) if p.fallback => {
                            log::warn!("proxy is rate limiting (429), this request goes direct");
                        }
                        // Anything else the proxy refuses (403) is final: no retry storm against it.
                        (None, _) => {
                            if let Some(status) = refused {
                                log::warn!("proxy refused the request with status {status}");
                            }
                            self.mark(&self.proxy_health, true, 1, "proxy");
                            return result;
                        }
                        (Some(why), _) if !p.fallback => {
                            log::warn!("proxy failed ({why}), no fallback configured");
                            // A body the proxy broke must not reach the caller as a good answer.
                            return result.and_then(|r| match r.body_error {
                                Some(_) => Ok(r),
                                None if r.status >= 500 => Ok(r),
                                None => Err(TransportError::new(
                                    TransportErrorKind::Proxy,
                                    format!("proxy: {why}"),
                                )),
                            });
                        }
                        (Some(why), _) => {
                            log::warn!("proxy failed ({why}), falling back to direct");
                            // One failure is enough: every read would otherwise pay for the dead proxy first.
                            self.mark(&self.proxy_health, false, 1, "proxy");
                        }
                    }
                }
            }
        }
        self.send_on(self.direct_for(req), req, req.url, &[], false, limit)
    }

    /// Send a blob request, reading no more body than its range asks for; a transport failure is worth a
    /// retry and its message starts with `who`.
    pub fn send_blob(&self, req: &Request, who: &str) -> std::result::Result<Response, Failure> {
        self.send(req, req.range.map_or(0, |(a, b)| b - a + 1))
            .map_err(|e| Failure::retry(format!("{who}: {e}")))
    }

    /// A small request straight to the origin (token endpoints): no mirror, no proxy.
    pub fn send_small_direct(
        &self,
        url: &str,
        headers: &[(String, String)],
    ) -> std::result::Result<Response, TransportError> {
        let req = Request {
            method: Method::Get,
            url,
            headers,
            range: None,
            stream: false,
            mirrorable: false,
            proxied: false,
        };
        self.send_on(&self.direct, &req, url, &[], false, SMALL_BODY_LIMIT)
    }

    /// Backoff before retry `n` (1-based): 100 ms doubling, at most 2 s.
    fn backoff(n: u32) -> Duration {
        Duration::from_millis(100u64 << n.min(5).saturating_sub(1)).min(Duration::from_secs(2))
    }
}

/// Replace `scheme://host[:port]` of `url` with `base`.
pub fn rehost(url: &str, base: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let path = rest.find('/').map(|i| &rest[i..]).unwrap_or("/");
    Some(format!("{}{path}", base.trim_end_matches('/')))
}

/// `Retry-After` in seconds (the HTTP-date form is treated as "soon").
fn retry_after(resp: &Response) -> Option<Duration> {
    let v = resp.header("retry-after")?;
    let d = v
        .trim()
        .parse::<u64>()
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1));
    Some(d.min(MAX_RETRY_AFTER))
}

/// Status classes shared by all backends, for a response that is not what was asked for.
pub fn classify(resp: &Response, what: &str) -> Failure {
    match resp.status {
        408 | 429 | 500..=599 => Failure::Retry {
            why: format!("{what}: status {}", resp.status),
            after: retry_after(resp),
        },
        s => Failure::Fatal(Error::backend(
            BackendErrorKind::Status(s),
            format!("{what}: status {s}"),
        )),
    }
}

/// How a backend addresses, authorizes and fetches one blob. `range` is inclusive; `None` is a HEAD.
pub trait Remote: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    /// See [`super::BlobBackend::set_registry_auth`].
    fn set_registry_auth(&self, auth: Option<&str>) -> Result<()> {
        let _ = auth;
        Err(Error::Unsupported(format!(
            "the {} backend has no registry credentials",
            self.kind()
        )))
    }
    fn fetch(
        &self,
        http: &HttpClient,
        blob_id: &str,
        range: Option<BlobRange>,
    ) -> std::result::Result<Response, Failure>;
}

/// A [`Remote`] with retries, size caching and range checks: a [`BlobBackend`].
pub struct RemoteBackend<R: Remote> {
    pub remote: R,
    pub http: HttpClient,
    sizes: Mutex<HashMap<String, u64>>,
}

/// `Content-Range: bytes a-b/total` → (a, b, total).
fn content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let v = v.trim().strip_prefix("bytes ")?;
    let (span, total) = v.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    Some((
        a.trim().parse().ok()?,
        b.trim().parse().ok()?,
        total.trim().parse().ok(),
    ))
}

impl<R: Remote> RemoteBackend<R> {
    pub fn new(remote: R, settings: HttpSettings) -> Result<Self> {
        Ok(RemoteBackend {
            remote,
            http: HttpClient::new(settings)?,
            sizes: Mutex::new(HashMap::new()),
        })
    }

    /// Run `attempt` up to 1 + retry_limit times with backoff; the last failure becomes EIO.
    fn with_retries<T>(
        &self,
        what: &str,
        mut attempt: impl FnMut() -> std::result::Result<T, Failure>,
    ) -> Result<T> {
        let limit = self.http.settings.retry_limit;
        let mut n = 0;
        loop {
            match attempt() {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => {
                    super::events::record(&e.to_string());
                    return Err(e);
                }
                Err(Failure::Retry { why, after }) => {
                    if n >= limit {
                        let e = Error::backend(
                            BackendErrorKind::Unavailable,
                            format!(
                                "{} {what}: giving up after {} attempts: {why}",
                                self.remote.kind(),
                                n + 1
                            ),
                        );
                        super::events::record(&e.to_string());
                        return Err(e);
                    }
                    n += 1;
                    self.http.counters.retries.fetch_add(1, Ordering::Relaxed);
                    let pause = after.unwrap_or_else(|| HttpClient::backoff(n));
                    log::warn!(
                        "{} {what}: {why}; retry {n}/{limit} in {pause:?}",
                        self.remote.kind()
                    );
                    std::thread::sleep(pause);
                }
            }
        }
    }

    fn fetch_range(&self, blob_id: &str, start: u64, end: u64, blob_size: u64) -> Result<Vec<u8>> {
        let want = (end - start + 1) as usize;
        let what = format!("blob {blob_id} bytes {start}-{end}");
        self.with_retries(&what, || {
            let resp = self
                .remote
                .fetch(&self.http, blob_id, Some(BlobRange::new(start, end)))?;
            match resp.status {
                206 => {
                    check_range(&resp, start, end, blob_size)?;
                    check_body(resp, want)
                }
                // A server that ignores Range sends the whole blob; take our slice of it.
                200 => {
                    let whole = check_body(resp, blob_size as usize)?;
                    Ok(whole[start as usize..=end as usize].to_vec())
                }
                _ => Err(classify(&resp, &format!("{} {what}", self.remote.kind()))),
            }
        })
    }
}

impl<R: Remote> RemoteBackend<R> {
    /// `start..=end` as a reader over the response body as it arrives; the reader fails if the body ends
    /// early. Retries cover everything up to the response head; a body that breaks later is the reader's
    /// error, for the caller to handle (it has used what arrived).
    fn stream_range(
        &self,
        blob_id: &str,
        start: u64,
        end: u64,
        blob_size: u64,
    ) -> Result<Box<dyn Read + Send>> {
        let want = end - start + 1;
        let what = format!("blob {blob_id} bytes {start}-{end}");
        let range = BlobRange {
            first: start,
            last: end,
            stream: true,
        };
        self.with_retries(&what, || {
            let mut resp = self.remote.fetch(&self.http, blob_id, Some(range))?;
            match resp.status {
                206 => {
                    check_range(&resp, start, end, blob_size)?;
                    match resp.live.take() {
                        Some(live) => Ok(Box::new(ExactBody {
                            inner: live,
                            left: want,
                            what: what.clone(),
                        }) as Box<dyn Read + Send>),
                        // Routes that read bodies whole (the forward proxy) hand the range over read.
                        None => check_body(resp, want as usize)
                            .map(|b| Box::new(std::io::Cursor::new(b)) as Box<dyn Read + Send>),
                    }
                }
                200 => {
                    let whole = check_body(resp, blob_size as usize)?;
                    Ok(Box::new(std::io::Cursor::new(
                        whole[start as usize..=end as usize].to_vec(),
                    )) as Box<dyn Read + Send>)
                }
                _ => Err(classify(&resp, &format!("{} {what}", self.remote.kind()))),
            }
        })
    }
}

/// A streamed body that must deliver exactly `left` more bytes: ending early is an error, not EOF.
struct ExactBody {
    inner: ureq::BodyReader<'static>,
    left: u64,
    what: String,
}

impl Read for ExactBody {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let max = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{}: the body ended {} bytes early", self.what, self.left),
            ));
        }
        self.left -= n as u64;
        if self.left == 0 {
            // Let ureq see the body's end now: only then does the connection go back to the pool (the
            // caller, reading exact pieces, may never ask again).
            let _ = self.inner.read(&mut [0u8; 1]);
        }
        Ok(n)
    }
}

/// A 206 must carry exactly the range asked for, of a blob of the size we know.
fn check_range(
    resp: &Response,
    start: u64,
    end: u64,
    blob_size: u64,
) -> std::result::Result<(), Failure> {
    let Some((a, b, total)) = resp.header("content-range").and_then(content_range) else {
        return Err(Failure::retry("206 without a valid Content-Range"));
    };
    if a != start || b != end || total.is_some_and(|t| t != blob_size) {
        return Err(Failure::retry(format!(
            "asked for {start}-{end}/{blob_size}, got Content-Range {a}-{b}/{total:?}"
        )));
    }
    Ok(())
}

/// The body must be complete and exactly `want` bytes, whatever Content-Length said.
fn check_body(resp: Response, want: usize) -> std::result::Result<Vec<u8>, Failure> {
    if let Some(e) = resp.body_error {
        return Err(Failure::retry(format!(
            "body failed after {} of {want} bytes: {e}",
            resp.body.len()
        )));
    }
    if let Some(cl) = resp.header("content-length") {
        if cl.trim().parse::<u64>().ok() != Some(want as u64) {
            return Err(Failure::retry(format!(
                "Content-Length {cl} for a {want}-byte range"
            )));
        }
    }
    if resp.body.len() != want {
        return Err(Failure::retry(format!(
            "body has {} bytes, wanted {want}",
            resp.body.len()
        )));
    }
    Ok(resp.body)
}

impl<R: Remote> BlobBackend for RemoteBackend<R> {
    fn kind(&self) -> &'static str {
        self.remote.kind()
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn set_registry_auth(&self, auth: Option<&str>) -> Result<()> {
        self.remote.set_registry_auth(auth)
    }

    fn blob_size(&self, blob_id: &str) -> Result<u64> {
        crate::format::check_blob_id(blob_id)?;
        if let Some(s) = self
            .sizes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(blob_id)
        {
            return Ok(*s);
        }
        let what = format!("{} blob {blob_id} size", self.remote.kind());
        let size = self.with_retries(&what, || {
            let resp = self.remote.fetch(&self.http, blob_id, None)?;
            match resp.status {
                200 => resp
                    .header("content-length")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| Failure::retry("HEAD without Content-Length")),
                // Pre-signed storage URLs are often valid for GET only: ask for one byte instead.
                403 | 405 => {
                    let resp =
                        self.remote
                            .fetch(&self.http, blob_id, Some(BlobRange::new(0, 0)))?;
                    match resp.status {
                        206 => resp
                            .header("content-range")
                            .and_then(content_range)
                            .and_then(|(_, _, total)| total)
                            .ok_or_else(|| Failure::retry("206 without a blob size")),
                        _ => Err(classify(&resp, &what)),
                    }
                }
                _ => Err(classify(&resp, &what)),
            }
        })?;
        self.sizes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(blob_id.to_string(), size);
        Ok(size)
    }

    fn read_at(&self, blob_id: &str, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let size = self.blob_size(blob_id)?;
        if buf.is_empty() || offset >= size {
            return Ok(0);
        }
        let end = (offset + buf.len() as u64).min(size) - 1;
        let data = self.fetch_range(blob_id, offset, end, size)?;
        buf[..data.len()].copy_from_slice(&data);
        Ok(data.len())
    }

    fn open_range(&self, blob_id: &str, offset: u64, len: usize) -> Result<Box<dyn Read + Send>> {
        let size = self.blob_size(blob_id)?;
        if len == 0 || offset >= size {
            return Ok(Box::new(std::io::empty()));
        }
        let end = (offset + len as u64).min(size) - 1;
        self.stream_range(blob_id, offset, end, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses() {
        assert_eq!(content_range("bytes 0-9/100"), Some((0, 9, Some(100))));
        assert_eq!(content_range("bytes 5-6/*"), Some((5, 6, None)));
        assert_eq!(content_range("items 0-1/2"), None);
    }

    #[test]
    fn rehost_keeps_the_path() {
        assert_eq!(
            rehost("https://reg:5000/v2/a/b/blobs/sha256:x", "http://m:1/"),
            Some("http://m:1/v2/a/b/blobs/sha256:x".into())
        );
    }

    /// The transport settings of a registry backend whose block holds `keys` (besides host and repo).
    fn settings(keys: serde_json::Value) -> Result<HttpSettings> {
        let mut block = serde_json::json!({"host": "h", "repo": "r"});
        block
            .as_object_mut()
            .unwrap()
            .extend(keys.as_object().unwrap().clone());
        let text =
            serde_json::json!({"version": 2, "backend": {"type": "registry", "registry": block}});
        match crate::config::DaemonConfig::from_slice(text.to_string().as_bytes())?.backend {
            crate::config::BackendConfig::Network { http, .. } => Ok(HttpSettings::new(&http)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn settings_parse_with_defaults_and_named_errors() {
        let v = serde_json::json!({"timeout": 0, "retry_limit": 1,
            "proxy": {"url": "http://p:1", "fallback": false},
            "mirrors": [{"host": "http://m:2/", "headers": {"X-A": "b"}}]});
        let s = settings(v).unwrap();
        assert_eq!(s.timeout, None);
        assert_eq!(s.connect_timeout, Some(Duration::from_secs(5)));
        assert_eq!(s.retry_limit, 1);
        let p = s.proxy.unwrap();
        assert!(!p.fallback && p.check_interval == Duration::from_secs(5));
        assert_eq!(s.mirrors[0].host, "http://m:2");
        assert_eq!(s.mirrors[0].ping_url, "http://m:2/v2");
        assert_eq!(s.mirrors[0].failure_limit, 5);
        assert_eq!(
            s.mirrors[0].headers,
            vec![("X-A".to_string(), "b".to_string())]
        );
        // Errors name the key by its full path.
        for (bad, key) in [
            (
                serde_json::json!({"timeout": "5"}),
                "`backend.registry.timeout`",
            ),
            (
                serde_json::json!({"mirrors": {}}),
                "`backend.registry.mirrors`",
            ),
            (
                serde_json::json!({"mirrors": [{}]}),
                "`backend.registry.mirrors[0].host`",
            ),
            (
                serde_json::json!({"skip_verify": 1}),
                "`backend.registry.skip_verify`",
            ),
            (
                serde_json::json!({"ca_cert_files": [1]}),
                "`backend.registry.ca_cert_files[0]`",
            ),
        ] {
            let err = settings(bad.clone()).unwrap_err().to_string();
            assert!(err.contains(key), "{bad} -> {err}");
        }
    }

    #[test]
    fn transport_errors_say_what_failed() {
        let config = HttpConfig {
            timeout: 1,
            connect_timeout: 1,
            ..Default::default()
        };
        let client = HttpClient::new(HttpSettings::new(&config)).unwrap();
        let send = |url: &str| {
            client
                .send(&Request::blob(url, &[], Some(BlobRange::new(0, 9))), 10)
                .unwrap_err()
        };
        // Nothing listens on a port just released.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/b", closed.local_addr().unwrap());
        drop(closed);
        let e = send(&url);
        assert_eq!(e.kind, TransportErrorKind::Connect, "{e}");
        // A server that takes the connection (kernel backlog) and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let e = send(&format!("http://{}/b", silent.local_addr().unwrap()));
        assert_eq!(e.kind, TransportErrorKind::Timeout, "{e}");
    }

    #[test]
    fn final_statuses_are_typed_backend_errors() {
        let resp = |status| Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            body_error: None,
            live: None,
        };
        match classify(&resp(404), "blob x") {
            Failure::Fatal(Error::Backend(b)) => {
                assert_eq!(b.kind, BackendErrorKind::Status(404));
                assert_eq!(b.message, "blob x: status 404");
            }
            other => panic!("{other:?}"),
        }
        for status in [408, 429, 503] {
            assert!(matches!(
                classify(&resp(status), "b"),
                Failure::Retry { .. }
            ));
        }
        let e = Error::backend(BackendErrorKind::Unavailable, "gone");
        assert_eq!((e.errno(), e.to_string()), (libc::EIO, "gone".to_string()));
    }

    #[test]
    fn backoff_is_bounded() {
        assert_eq!(HttpClient::backoff(1), Duration::from_millis(100));
        assert_eq!(HttpClient::backoff(2), Duration::from_millis(200));
        assert!(HttpClient::backoff(30) <= Duration::from_secs(2));
    }
}
