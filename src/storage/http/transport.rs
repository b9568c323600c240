//! One HTTP request on one route: requests and responses as the backends see them, the ureq agents
//! (timeouts, TLS roots, connection pool), sending on an agent or through the plain forward proxy with the
//! body read within a limit, and transport failures sorted by kind.

use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::guard::Origin;
use super::settings::HttpSettings;
use super::HttpClient;
use crate::error::{Error, Result};
use crate::storage::forward_proxy::{self, ForwardProxy};

/// Largest body read for requests that are not blob ranges (token responses, errors, pings).
const SMALL_BODY_LIMIT: u64 = 1 << 20;
/// Idle connections kept per host: about the number of readers that fetch at once.
const MAX_IDLE_CONNECTIONS: usize = 32;

/// One HTTP response with its body read (bounded), or for a streamed range ([`BlobRange::stream`]) answered
/// with 206 on a ureq route, still to be read from `live`.
pub struct Response {
    pub status: u16,
    pub(super) headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body ended early or failed mid-way (the bytes in `body` are what arrived).
    pub body_error: Option<String>,
    /// The body timed out before its first byte: the head came, then nothing (no answer, in effect).
    pub body_stalled: bool,
    /// The unread body of a streamed range, limited to the range's length, its first bytes in.
    pub live: Option<LiveBody>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .field("body_error", &self.body_error)
            .field("body_stalled", &self.body_stalled)
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

/// The body of a streamed range as it arrives, read ahead by at most [`FIRST_BYTES`] (its first bytes,
/// awaited with the request).
pub type LiveBody = BufReader<ureq::BodyReader<'static>>;

/// Bytes of a streamed body read before it is handed over: the first of them come with the request.
const FIRST_BYTES: usize = 4 << 10;

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
    /// A server sent us to an address it may not (`guard`): final, never retried.
    Refused,
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

/// Whether a body read failed for want of bytes within the timeout (ureq's own errors come wrapped).
pub fn is_timeout(e: std::io::Error) -> bool {
    TransportError::from(ureq::Error::from(e)).kind == TransportErrorKind::Timeout
}

impl From<ureq::Error> for TransportError {
    fn from(e: ureq::Error) -> Self {
        use std::io::ErrorKind as Io;
        use ureq::Error as U;
        let kind = match &e {
            e if super::guard::is_refusal(e) => TransportErrorKind::Refused,
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
    /// The URL came from a server's answer (a redirect, a token realm), not from the config: it may not
    /// lead to a link-local, unspecified or metadata address (`guard`).
    pub server_chosen: bool,
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
            server_chosen: false,
        }
    }
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

/// What the `timeout` bounds in an agent's exchanges.
#[derive(Clone, Copy, PartialEq)]
enum Deadline {
    /// The whole exchange, body included.
    Whole,
    /// Every read and write must make progress within it (long transfers).
    PerIo,
    /// As `PerIo`, and the response head must arrive within it too: blob ranges whose body is read as it
    /// arrives, its pace checked by its reader (`backend::ExactBody`).
    HeadAndPerIo,
}

/// How an agent resolves names.
#[derive(Clone, Copy)]
enum Names<'a> {
    /// As usual (the proxy's agent: it resolves the proxy).
    Plain,
    /// For URLs the config names: the registry's addresses shown to `origin` (`guard::ObservingResolver`).
    Observed(&'a Arc<Origin>),
    /// For URLs servers chose: the addresses `guard` forbids are refused (`guard::GuardedResolver`).
    Guarded(&'a Arc<Origin>),
}

/// The agent for URLs the config names (straight to them, or through `proxy`).
pub(super) fn agent(
    settings: &HttpSettings,
    proxy: Option<&str>,
    origin: &Arc<Origin>,
) -> Result<ureq::Agent> {
    let names = match proxy {
        Some(_) => Names::Plain,
        None => Names::Observed(origin),
    };
    agent_with(settings, proxy, Deadline::Whole, names)
}

/// An agent for URLs servers chose (`Request::server_chosen`) for a client whose config names
/// `origin`: its resolver refuses the addresses `guard` forbids.
pub(super) fn guarded_agent(
    settings: &HttpSettings,
    stream: bool,
    origin: &Arc<Origin>,
) -> Result<ureq::Agent> {
    let deadline = match stream {
        true => Deadline::HeadAndPerIo,
        false => Deadline::Whole,
    };
    agent_with(settings, None, deadline, Names::Guarded(origin))
}

/// An agent for long transfers (whole layers pulled or pushed by `rafsd convert`): no deadline for the
/// whole exchange, but every read and write must make progress within the `timeout`.
pub fn streaming_agent(settings: &HttpSettings, origin: &Arc<Origin>) -> Result<ureq::Agent> {
    agent_with(settings, None, Deadline::PerIo, Names::Observed(origin))
}

/// [`streaming_agent`] for URLs servers chose (a registry's redirect to blob storage or upload location on
/// another host) for a client whose config names `origin`: its resolver refuses the addresses `guard`
/// forbids.
pub fn guarded_streaming_agent(
    settings: &HttpSettings,
    origin: &Arc<Origin>,
) -> Result<ureq::Agent> {
    agent_with(settings, None, Deadline::PerIo, Names::Guarded(origin))
}

/// The agent for streamed blob ranges: the head within the `timeout`, then every read within it.
pub(super) fn range_stream_agent(
    settings: &HttpSettings,
    origin: &Arc<Origin>,
) -> Result<ureq::Agent> {
    agent_with(
        settings,
        None,
        Deadline::HeadAndPerIo,
        Names::Observed(origin),
    )
}

fn agent_with(
    settings: &HttpSettings,
    proxy: Option<&str>,
    deadline: Deadline,
    names: Names,
) -> Result<ureq::Agent> {
    let proxy = proxy
        .map(|p| {
            ureq::Proxy::new(p)
                .map_err(|e| Error::Invalid(format!("proxy url {:?}: {e}", crate::redact::text(p))))
        })
        .transpose()?;
    let (global, per_io) = match deadline {
        Deadline::Whole => (settings.timeout, None),
        Deadline::PerIo | Deadline::HeadAndPerIo => (None, settings.timeout),
    };
    // Without it a head dripped a byte per read would take hours to reach ureq's header size limit.
    let head = settings
        .timeout
        .filter(|_| deadline == Deadline::HeadAndPerIo);
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
        .timeout_send_request(head)
        .timeout_recv_response(head)
        .timeout_connect(settings.connect_timeout)
        .user_agent("rafsd/0.1")
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(tls_roots(settings)?)
                .disable_verification(settings.skip_verify)
                .build(),
        )
        .build();
    let connector = ureq::unversioned::transport::DefaultConnector::default;
    Ok(match names {
        Names::Plain => ureq::Agent::new_with_config(config),
        Names::Observed(origin) => ureq::Agent::with_parts(
            config,
            connector(),
            super::guard::ObservingResolver::new(origin.clone()),
        ),
        Names::Guarded(origin) => ureq::Agent::with_parts(
            config,
            connector(),
            super::guard::GuardedResolver::new(origin.clone()),
        ),
    })
}

impl HttpClient {
    /// The agent for `req` on a direct route (origin or mirror): streamed ranges have no overall deadline.
    pub(super) fn direct_for(&self, req: &Request) -> &ureq::Agent {
        match (req.server_chosen, req.stream) {
            (false, true) => &self.direct_stream,
            (false, false) => &self.direct,
            (true, true) => &self.guarded_stream,
            (true, false) => &self.guarded,
        }
    }

    /// One request on one agent, body read up to `limit` bytes.
    pub(super) fn send_on(
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
        // `skip_auth` keeps the registry's Authorization from a route not trusted with it; the route's
        // own headers (`extra`: a mirror's, its own credential included) always go, in its place.
        let is_auth = |k: &String| k.eq_ignore_ascii_case("authorization");
        let replaced = skip_auth || extra.iter().any(|(k, _)| is_auth(k));
        let ours = req
            .headers
            .iter()
            .filter(|(k, _)| !(replaced && is_auth(k)));
        for (k, v) in ours.chain(extra) {
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
            // The caller reads it as it arrives; ureq's limit keeps it to the range's length. Its first
            // bytes are awaited here, so that a head followed by nothing is this route's failure (the
            // next mirror's turn) and no answer, like a body read whole that stalls.
            let reader = resp.into_body().into_with_config().limit(limit).reader();
            let mut live = BufReader::with_capacity(FIRST_BYTES, reader);
            let first = live.fill_buf().map(|b| b.len());
            let (body_error, body_stalled, live) = match first {
                Ok(0) => (
                    Some("the body ended before its first byte".into()),
                    false,
                    None,
                ),
                Ok(_) => (None, false, Some(live)),
                Err(e) => (Some(e.to_string()), is_timeout(e), None),
            };
            return Ok(Response {
                status,
                headers,
                body: Vec::new(),
                body_error,
                body_stalled,
                live,
            });
        }
        let mut body = Vec::with_capacity(limit.min(16 << 20) as usize);
        let mut body_error = None;
        let mut body_stalled = false;
        if req.method == Method::Get {
            // ureq's own limit (not `Read::take`) so the body is read to its end and the connection
            // goes back to the pool; a body longer than asked for is an error.
            let mut reader = resp.body_mut().with_config().limit(limit).reader();
            if let Err(e) = reader.read_to_end(&mut body) {
                body_error = Some(e.to_string());
                body_stalled = body.is_empty() && is_timeout(e);
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
            body_stalled,
            live: None,
        })
    }

    /// One absolute-form request through the plain forward proxy, with the headers Dragonfly's dfdaemon
    /// reads. The registry's Authorization goes along: the proxy fetches from the registry for us.
    pub(super) fn send_forward(
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
            // The proxy's own errors do not tell its stalls from the registry's.
            body_stalled: false,
            live: None,
        })
    }

    /// A small request straight to a URL a server named (token realms): no mirror, no proxy.
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
            server_chosen: true,
        };
        self.send(&req, SMALL_BODY_LIMIT)
    }
}

/// `Content-Range: bytes a-b/total` → (a, b, total).
pub(super) fn content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let v = v.trim().strip_prefix("bytes ")?;
    let (span, total) = v.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    Some((
        a.trim().parse().ok()?,
        b.trim().parse().ok()?,
        total.trim().parse().ok(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HttpConfig;

    #[test]
    fn content_range_parses() {
        assert_eq!(content_range("bytes 0-9/100"), Some((0, 9, Some(100))));
        assert_eq!(content_range("bytes 5-6/*"), Some((5, 6, None)));
        assert_eq!(content_range("items 0-1/2"), None);
    }

    #[test]
    fn transport_errors_say_what_failed() {
        let config = HttpConfig {
            timeout: 1,
            connect_timeout: 1,
            ..Default::default()
        };
        let client = HttpClient::new(HttpSettings::new(&config), None).unwrap();
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
}
