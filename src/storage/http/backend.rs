//! A [`Remote`] (how a backend addresses and authorizes a blob) turned into a [`BlobBackend`]: every read
//! retried within the configured limit, blob sizes cached, and every response checked against the range
//! asked for (Content-Range, Content-Length, body length) before a byte of it reaches a reader.

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::retry::{classify, Failure};
use super::settings::HttpSettings;
use super::transport::{content_range, BlobRange, LiveBody, Response};
use super::HttpClient;
use crate::error::{BackendErrorKind, Error, Result};
use crate::storage::BlobBackend;

/// How a backend addresses, authorizes and fetches one blob. `range` is inclusive; `None` is a HEAD.
pub trait Remote: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    /// The server's `scheme://host[:port]` when it may send the client to URLs of its choosing
    /// (redirects, token realms), whose addresses are then checked against it (`guard`).
    fn origin(&self) -> Option<&str> {
        None
    }
    /// See [`BlobBackend::set_registry_auth`].
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

impl<R: Remote> RemoteBackend<R> {
    pub fn new(remote: R, settings: HttpSettings) -> Result<Self> {
        let http = HttpClient::new(settings, remote.origin())?;
        Ok(RemoteBackend {
            remote,
            http,
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
                    crate::storage::events::record(&e.to_string());
                    return Err(e);
                }
                Err(Failure::Retry {
                    why,
                    after,
                    no_answer,
                }) => {
                    if n >= limit {
                        let kind = match no_answer {
                            true => BackendErrorKind::Unavailable,
                            false => BackendErrorKind::Broken,
                        };
                        let e = Error::backend(
                            kind,
                            format!(
                                "{} {what}: giving up after {} attempts: {why}",
                                self.remote.kind(),
                                n + 1
                            ),
                        );
                        crate::storage::events::record(&e.to_string());
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
                            pace: self.http.settings.timeout.map(Pace::new),
                        }) as Box<dyn Read + Send>),
                        // Routes that read bodies whole (the forward proxy) hand the range over read;
                        // a body that failed before its first bytes comes here too.
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
    inner: LiveBody,
    left: u64,
    what: String,
    /// The pace the body must keep (none without a `timeout`).
    pace: Option<Pace>,
}

/// Bytes a streamed body must deliver per `timeout` of waiting on the server.
const PACE_BYTES: u64 = 1 << 20;

/// The least pace of a streamed body: the time spent waiting on the server may reach `timeout` for the
/// first [`PACE_BYTES`] and `timeout` more for each further [`PACE_BYTES`] delivered. Each read already
/// makes progress within the `timeout` (the agent's per-read limit), but a server dripping a byte per read
/// would otherwise hold the reader (a FUSE worker, or a background stream and the readers waiting on its
/// chunks) for days; now it holds it about one `timeout` per MiB of the range at most. Only the time
/// inside the server's reads counts: a consumer that is slow to ask for more is not the server's fault.
/// (The wait for the body's first bytes, with the request and within one `timeout`, is not counted.)
struct Pace {
    timeout: Duration,
    waited: Duration,
    got: u64,
}

impl Pace {
    fn new(timeout: Duration) -> Self {
        Pace {
            timeout,
            waited: Duration::ZERO,
            got: 0,
        }
    }

    /// A read that took `took` and gave `n` bytes; an error once the body is behind its pace.
    fn record(&mut self, took: Duration, n: usize, what: &str) -> std::io::Result<()> {
        self.waited += took;
        self.got += n as u64;
        let allowed = self.timeout.as_secs_f64() * (1.0 + self.got as f64 / PACE_BYTES as f64);
        if self.waited.as_secs_f64() > allowed {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "{what}: {} bytes in {:?} of waiting, less than 1 MiB per {:?}",
                    self.got, self.waited, self.timeout
                ),
            ));
        }
        Ok(())
    }
}

impl Read for ExactBody {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let max = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let started = Instant::now();
        let n = self.inner.read(&mut buf[..max])?;
        if let Some(pace) = &mut self.pace {
            pace.record(started.elapsed(), n, &self.what)?;
        }
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
        let why = format!("body failed after {} of {want} bytes: {e}", resp.body.len());
        // A head and then nothing within the timeout is no answer, as if the head had not come.
        return Err(match resp.body_stalled {
            true => Failure::no_answer(why),
            false => Failure::retry(why),
        });
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
    fn a_streamed_body_must_keep_a_mib_per_timeout_of_waiting() {
        let s = Duration::from_secs(1);
        let mut pace = Pace::new(s);
        // A MiB in 1.5 s of waiting, then another within the next 0.4 s: within the pace.
        pace.record(s.mul_f64(1.5), 1 << 20, "b").unwrap();
        pace.record(s.mul_f64(0.4), 1 << 20, "b").unwrap();
        // Then 1.2 s more for a byte: 3.1 s for 2 MiB is behind it.
        let e = pace.record(s.mul_f64(1.2), 1, "b").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        // A server dripping bytes is cut off after about one timeout.
        let mut drip = Pace::new(s);
        let reads = (0..100)
            .take_while(|_| drip.record(Duration::from_millis(200), 1, "b").is_ok())
            .count();
        assert_eq!(reads, 5);
    }
}
