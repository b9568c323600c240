//! Plain HTTP forward proxying: one absolute-form HTTP/1.1 request (`GET http://host/path HTTP/1.1`) per
//! TCP connection to the proxy, the form a caching P2P proxy (Dragonfly's dfdaemon) needs to see the blob
//! URL. ureq's proxy support always tunnels with CONNECT, which hides the request from the proxy.
//!
//! Each exchange uses `Connection: close`: no pool to keep consistent, and the connect costs tens of
//! microseconds against the milliseconds a blob range takes. Everything a hostile proxy can do (garbage
//! head, huge headers, wrong lengths, stalls) ends as an `Err` or a `body_error`, bounded in time by the
//! deadline and in memory by the header cap and the body limit.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use base64::Engine;

/// Largest response head (status line and headers) taken from a proxy.
const MAX_HEAD: usize = 64 << 10;
const MAX_HEADERS: usize = 64;

/// Where the proxy listens and how to authenticate to it, from `proxy.url` (`http://[user:pass@]host[:port]`).
#[derive(Clone)]
pub struct ForwardProxy {
    host: String,
    port: u16,
    authorization: Option<String>,
}

/// `http://[userinfo@]authority[/...]` → (userinfo, host, port); `None` for other schemes.
fn split_http_url(url: &str) -> Option<(Option<&str>, &str, u16, &str)> {
    let rest = url.strip_prefix("http://")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    // `[v6]:port`, `host:port` or a bare host.
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, p.parse().ok()?),
        _ => (hostport, 80),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then_some((user, host, port, path))
}

impl ForwardProxy {
    /// `None` when `url` is not a plain `http://` proxy (an `https://` proxy is left to ureq).
    pub fn from_url(url: &str) -> Option<Self> {
        let (user, host, port, _) = split_http_url(url)?;
        Some(ForwardProxy {
            host: host.to_string(),
            port,
            authorization: user.map(|u| {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(u)
                )
            }),
        })
    }
}

/// The credentials stay out of debug output.
impl std::fmt::Debug for ForwardProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardProxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("authorization", &self.authorization.as_ref().map(|_| "***"))
            .finish()
    }
}

/// What the exchange needs besides the URL: the caller's headers are sent as given (registry
/// Authorization included: the proxy forwards the request to the registry on our behalf).
pub struct Exchange<'a> {
    pub head_only: bool,
    pub url: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub connect_timeout: Option<Duration>,
    /// Whole-exchange deadline (the backend `timeout`).
    pub timeout: Option<Duration>,
    /// Largest body accepted; a longer one is a body error.
    pub limit: u64,
}

/// A response head and its body as read, with the reason the body is incomplete, if any.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub body_error: Option<String>,
}

/// A stream whose every read and write is cut short at a deadline.
struct Timed {
    stream: TcpStream,
    deadline: Option<Instant>,
}

impl Timed {
    fn arm(&self) -> std::io::Result<()> {
        let left = match self.deadline {
            None => None,
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Err(std::io::ErrorKind::TimedOut.into()),
            },
        };
        self.stream.set_read_timeout(left)?;
        self.stream.set_write_timeout(left)
    }
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.stream.read(buf)
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.stream.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn connect(proxy: &ForwardProxy, timeout: Option<Duration>) -> Result<TcpStream, String> {
    let addrs = (proxy.host.as_str(), proxy.port)
        .to_socket_addrs()
        .map_err(|e| format!("proxy {}: {e}", proxy.host))?;
    let mut last = format!("proxy {}: no address", proxy.host);
    for addr in addrs {
        let res = match timeout {
            Some(t) => TcpStream::connect_timeout(&addr, t),
            None => TcpStream::connect(addr),
        };
        match res {
            Ok(s) => {
                s.set_nodelay(true).ok();
                return Ok(s);
            }
            Err(e) => last = format!("proxy {addr}: {e}"),
        }
    }
    Err(last)
}

/// Send one request through `proxy` and read its answer.
pub fn exchange(proxy: &ForwardProxy, ex: &Exchange) -> Result<Answer, String> {
    let (_, host, port, path) =
        split_http_url(ex.url).ok_or_else(|| format!("not an http:// URL: {}", ex.url))?;
    let deadline = ex.timeout.map(|t| Instant::now() + t);
    let connect_timeout = match (ex.connect_timeout, ex.timeout) {
        (Some(c), Some(t)) => Some(c.min(t)),
        (c, t) => c.or(t),
    };
    let mut conn = Timed {
        stream: connect(proxy, connect_timeout)?,
        deadline,
    };

    let target = if path.is_empty() {
        format!("{}/", ex.url)
    } else {
        ex.url.to_string()
    };
    let method = if ex.head_only { "HEAD" } else { "GET" };
    let host_header = match (host.contains(':'), port) {
        (true, 80) => format!("[{host}]"),
        (true, p) => format!("[{host}]:{p}"),
        (false, 80) => host.to_string(),
        (false, p) => format!("{host}:{p}"),
    };
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: rafsd/0.1\r\nConnection: close\r\n"
    );
    if let Some(auth) = &proxy.authorization {
        head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    for (k, v) in ex.headers {
        // A header value with a line break would smuggle a second request to the proxy.
        if [k, v].iter().any(|s| s.contains(['\r', '\n'])) {
            return Err(format!("header {k:?} holds a line break"));
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())
        .map_err(|e| format!("proxy write: {e}"))?;

    let (status, headers, mut rest) = read_head(&mut conn)?;
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    };
    let mut body = Vec::new();
    let mut body_error = None;
    let no_body = ex.head_only || status == 204 || status == 304 || (100..200).contains(&status);
    if !no_body {
        let chunked = header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().ends_with("chunked"));
        let read = if chunked {
            read_chunked(&mut rest, &mut conn, ex.limit, &mut body)
        } else {
            match header("content-length") {
                Some(cl) => match cl.parse::<u64>() {
                    Ok(n) if n > ex.limit => Err(format!(
                        "Content-Length {n} is over the {}-byte limit",
                        ex.limit
                    )),
                    Ok(n) => read_exact_body(&mut rest, &mut conn, n, &mut body),
                    Err(_) => Err(format!("bad Content-Length {cl:?}")),
                },
                // No length: the body ends when the proxy closes.
                None => read_to_close(&mut rest, &mut conn, ex.limit, &mut body),
            }
        };
        body_error = read.err();
    }
    Ok(Answer {
        status,
        headers,
        body,
        body_error,
    })
}

type Head = (u16, Vec<(String, String)>, Vec<u8>);

/// Read up to the blank line that ends the head (at most [`MAX_HEAD`] bytes) and parse it; returns the
/// bytes read beyond it.
fn read_head(conn: &mut Timed) -> Result<Head, String> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn
            .read(&mut chunk)
            .map_err(|e| format!("proxy read: {e}"))?;
        if n == 0 {
            return Err(format!(
                "proxy closed the connection after {} bytes of head",
                buf.len()
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut slots);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = resp.code.ok_or("proxy answer without a status")?;
                let headers = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                return Ok((status, headers, buf[len..].to_vec()));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(format!("proxy answer head over {MAX_HEAD} bytes"))
            }
            Err(e) => return Err(format!("bad proxy answer: {e}")),
        }
    }
}

/// Read from the bytes left over from the head first, then from the connection.
fn read_some(rest: &mut Vec<u8>, conn: &mut Timed, buf: &mut [u8]) -> Result<usize, String> {
    if !rest.is_empty() {
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        rest.drain(..n);
        return Ok(n);
    }
    conn.read(buf).map_err(|e| format!("proxy body: {e}"))
}

fn read_exact_body(
    rest: &mut Vec<u8>,
    conn: &mut Timed,
    n: u64,
    body: &mut Vec<u8>,
) -> Result<(), String> {
    body.reserve(n.min(16 << 20) as usize);
    let mut chunk = [0u8; 64 << 10];
    while (body.len() as u64) < n {
        let want = (n - body.len() as u64).min(chunk.len() as u64) as usize;
        match read_some(rest, conn, &mut chunk[..want])? {
            0 => return Err(format!("body ended after {} of {n} bytes", body.len())),
            got => body.extend_from_slice(&chunk[..got]),
        }
    }
    Ok(())
}

fn read_to_close(
    rest: &mut Vec<u8>,
    conn: &mut Timed,
    limit: u64,
    body: &mut Vec<u8>,
) -> Result<(), String> {
    let mut chunk = [0u8; 64 << 10];
    loop {
        match read_some(rest, conn, &mut chunk)? {
            0 => return Ok(()),
            got if (body.len() + got) as u64 > limit => {
                return Err(format!("body over the {limit}-byte limit"))
            }
            got => body.extend_from_slice(&chunk[..got]),
        }
    }
}

/// One CRLF-terminated line (chunk sizes, trailers), at most 4 KiB.
fn read_line(rest: &mut Vec<u8>, conn: &mut Timed) -> Result<String, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        if line.len() > 4096 {
            return Err("chunk line over 4 KiB".into());
        }
        match read_some(rest, conn, &mut byte)? {
            0 => return Err("body ended inside a chunk line".into()),
            _ => line.push(byte[0]),
        }
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|_| "chunk line is not text".into())
}

fn read_chunked(
    rest: &mut Vec<u8>,
    conn: &mut Timed,
    limit: u64,
    body: &mut Vec<u8>,
) -> Result<(), String> {
    loop {
        let line = read_line(rest, conn)?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size, 16).map_err(|_| format!("bad chunk size {size:?}"))?;
        if size == 0 {
            // Trailers up to the blank line.
            while !read_line(rest, conn)?.is_empty() {}
            return Ok(());
        }
        // Compared without adding: a hostile chunk size near u64::MAX must not wrap past the limit.
        if size > limit.saturating_sub(body.len() as u64) {
            return Err(format!("body over the {limit}-byte limit"));
        }
        let mut part = Vec::new();
        read_exact_body(rest, conn, size, &mut part)?;
        body.extend_from_slice(&part);
        if !read_line(rest, conn)?.is_empty() {
            return Err("chunk not followed by CRLF".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_port_and_path() {
        assert_eq!(
            split_http_url("http://reg:5000/v2/x?y=1"),
            Some((None, "reg", 5000, "/v2/x?y=1"))
        );
        assert_eq!(
            split_http_url("http://u:p@[::1]/"),
            Some((Some("u:p"), "::1", 80, "/"))
        );
        assert_eq!(split_http_url("http://h"), Some((None, "h", 80, "")));
        assert_eq!(split_http_url("https://h/"), None);
        assert_eq!(split_http_url("http://h:x/"), None);
        let p = ForwardProxy::from_url("http://a:b@p:8001").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("p", 8001));
        assert_eq!(p.authorization.as_deref(), Some("Basic YTpi"));
    }
}
