//! A push/pull client for the OCI distribution API, for `rafsd convert` and `rafsd mount-image`:
//! manifests by tag or digest, blobs streamed in (resumed with a `Range` after a broken connection, their
//! sha256 checked at the end) and out (monolithic upload from a file or memory, skipped when the
//! repository already has the blob), cross-repository mounts. Authorization is the registry backend's
//! ([`super::registry_auth`]): Basic or a Bearer token from the challenge's realm, re-fetched when a push
//! needs a wider scope than the pull before it.
//!
//! Small requests (manifests, HEADs, upload sessions) go through the backend's [`HttpClient`] settings
//! with an overall timeout; blob transfers use an agent with a per-read/write timeout instead, so a large
//! layer may take as long as it needs while a stalled connection still fails, and their answer's head
//! has a deadline of its own (`Call::answer_within`), so a head trickled in cannot hold them forever.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::http::{
    guarded_streaming_agent, streaming_agent, Failure, HttpClient, HttpSettings, TransportError,
    TransportErrorKind,
};
use super::registry_auth::RegistryAuth;
use crate::error::{BackendErrorKind, Error, Result};

/// Largest manifest or index accepted (distribution's own limit is 4 MiB).
pub const MANIFEST_LIMIT: u64 = 4 << 20;
/// How much of an error answer is read to explain it.
const ERROR_BODY_LIMIT: u64 = 16 << 10;
/// Redirects followed for one blob GET (blob storage behind the registry).
const MAX_REDIRECTS: u32 = 3;

/// `REGISTRY/REPO[:TAG][@sha256:HEX]`. A reference without a registry host is on Docker Hub
/// (`docker.io`, `library/` prepended to single-component names), as `docker pull` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]` as written (`docker.io` for Docker Hub).
    pub registry: String,
    pub repo: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Invalid(format!("image reference {s:?}: {why}"));
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                check_digest(d).map_err(|e| bad(&e.to_string()))?;
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), path.to_string())
            }
            _ => ("docker.io".to_string(), rest.to_string()),
        };
        // A tag follows the last ':' that is after the last '/'.
        let (repo, tag) = match path.rfind(':') {
            Some(i) if !path[i..].contains('/') => {
                (path[..i].to_string(), Some(path[i + 1..].to_string()))
            }
            _ => (path, None),
        };
        let repo = if registry == "docker.io" && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo
        };
        let repo_ok = !repo.is_empty()
            && repo.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes()
                        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
                    && c.as_bytes()[0].is_ascii_alphanumeric()
            });
        if !repo_ok {
            return Err(bad(
                "the repository must be lower-case path components of [a-z0-9._-]",
            ));
        }
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !ok {
                return Err(bad("the tag must be 1-128 characters of [A-Za-z0-9._-]"));
            }
        }
        if registry.is_empty()
            || registry
                .bytes()
                .any(|b| b == b'/' || b.is_ascii_whitespace())
        {
            return Err(bad("bad registry host"));
        }
        Ok(Reference {
            registry,
            repo,
            tag,
            digest,
        })
    }

    /// The host the API lives on.
    pub fn api_host(&self) -> &str {
        match self.registry.as_str() {
            "docker.io" => "registry-1.docker.io",
            other => other,
        }
    }

    /// What goes after `/manifests/`: the digest, else the tag, else `latest`.
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The same repository, another tag or digest.
    pub fn with_reference(&self, reference: &str) -> Reference {
        let mut r = self.clone();
        if reference.starts_with("sha256:") {
            r.digest = Some(reference.to_string());
        } else {
            r.tag = Some(reference.to_string());
            r.digest = None;
        }
        r
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repo)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// `sha256:<64 lower-case hex>`; anything else (other algorithms, path tricks) is refused, since
/// digests end up in URLs and file names.
pub fn check_digest(d: &str) -> Result<&str> {
    match d.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(hex)
        }
        _ => Err(Error::Invalid(format!(
            "digest {d:?} is not sha256:<64 lower-case hex digits>"
        ))),
    }
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", super::digest::hex(&Sha256::digest(bytes)))
}

/// How to reach registries: the options `rafsd convert` and `mount-image` share.
#[derive(Debug, Clone)]
pub struct NetOptions {
    /// `http://` instead of `https://`.
    pub plain_http: bool,
    /// Accept any TLS certificate.
    pub insecure: bool,
    /// Per request for small exchanges; per read/write for blob transfers, and for their answer's
    /// head ([`answer_deadline`] for uploads).
    pub timeout: Duration,
    pub retry_limit: u32,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            plain_http: false,
            insecure: false,
            timeout: Duration::from_secs(30),
            retry_limit: 3,
        }
    }
}

/// What to send as a request body; files are reopened for every attempt.
#[derive(Clone, Copy)]
pub enum Payload<'a> {
    Empty,
    Bytes(&'a [u8]),
    File(&'a Path),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Method {
    Get,
    Head,
    Post,
    Put,
}

struct Call<'a> {
    method: Method,
    url: String,
    headers: Vec<(&'static str, String)>,
    payload: Payload<'a>,
    /// Send the registry's Authorization (never to redirected storage URLs).
    auth: bool,
    /// A blob transfer: per-read/write timeouts instead of an overall one.
    long: bool,
    /// A streamed exchange's answer: its head must have arrived whole this long after the request
    /// (an upload: after the body's last byte), however it trickles; else each read within the
    /// timeout is all that is asked.
    answer_within: Option<Duration>,
}

type HttpResponse = ureq::http::Response<ureq::Body>;

/// A manifest or index as fetched.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// `Content-Type`, else the `mediaType` field.
    pub media_type: String,
    pub bytes: Vec<u8>,
    /// sha256 of `bytes`.
    pub digest: String,
}

/// Transfer counters of one client.
#[derive(Default, Debug)]
pub struct TransferCounters {
    pub blobs_pushed: AtomicU64,
    pub bytes_pushed: AtomicU64,
    /// Blobs not pushed because the repository had them already.
    pub blobs_present: AtomicU64,
    pub blobs_mounted: AtomicU64,
    pub bytes_pulled: AtomicU64,
}

/// One repository on one registry.
pub struct Client {
    base: String,
    pub repo: String,
    http: HttpClient,
    stream: ureq::Agent,
    /// `stream` for URLs the registry chose on other hosts (calls without `auth`).
    guarded_stream: ureq::Agent,
    auth: RegistryAuth,
    retry_limit: u32,
    /// `NetOptions::timeout`.
    timeout: Duration,
    pub counters: TransferCounters,
}

fn header(resp: &HttpResponse, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn is_redirect(status: u16) -> bool {
    matches!(status, 301 | 302 | 303 | 307 | 308)
}

/// How long a registry may take to answer a blob upload of `size` bytes once it has the last byte:
/// the timeout, and the timeout again per GiB begun (a registry may check or copy a large blob before
/// it answers), so a registry that never answers, or trickles its answer, cannot hold a push forever.
pub fn answer_deadline(timeout: Duration, size: u64) -> Duration {
    let gib = size.div_ceil(1 << 30).min(1 << 16) as u32;
    timeout.saturating_mul(1 + gib)
}

/// Backoff before retry `n` (1-based): 200 ms doubling, at most 5 s.
fn backoff(n: u32) -> Duration {
    Duration::from_millis(200u64 << n.min(5).saturating_sub(1)).min(Duration::from_secs(5))
}

/// The registry's explanation of an error answer: the first `errors[].message` of its JSON body, or
/// the start of the body.
fn explain(resp: &mut HttpResponse) -> String {
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(ERROR_BODY_LIMIT)
        .read_to_vec()
        .unwrap_or_default();
    let v: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let message = v
        .as_ref()
        .and_then(|v| v.get("errors")?.get(0).cloned())
        .map(|e| {
            let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
            let msg = e.get("message").and_then(|c| c.as_str()).unwrap_or("");
            format!("{code} {msg}").trim().to_string()
        })
        .unwrap_or_else(|| {
            String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_string()
        });
    match message.is_empty() {
        true => format!("status {status}"),
        false => format!("status {status}: {message}"),
    }
}

/// A failed answer: worth a retry for 408, 429 and 5xx, final otherwise.
fn failed(resp: &mut HttpResponse, what: &str) -> Failure {
    let status = resp.status().as_u16();
    let why = format!("{what}: {}", explain(resp));
    match status {
        408 | 429 | 500..=599 => Failure::no_answer(why),
        s => Failure::Fatal(Error::backend(BackendErrorKind::Status(s), why)),
    }
}

impl Client {
    /// A client for `reference`'s repository, with credentials from `IMAGE_PULL_AUTH` or Docker's
    /// config.json.
    pub fn new(reference: &Reference, net: &NetOptions) -> Result<Self> {
        let credentials = super::credentials::lookup(&reference.registry)?;
        Self::with_credentials(reference, net, credentials)
    }

    /// `credentials`: base64 `user:pass`.
    pub fn with_credentials(
        reference: &Reference,
        net: &NetOptions,
        credentials: Option<String>,
    ) -> Result<Self> {
        let scheme = if net.plain_http { "http" } else { "https" };
        let settings = HttpSettings {
            timeout: Some(net.timeout),
            connect_timeout: Some(net.timeout.min(Duration::from_secs(10))),
            retry_limit: net.retry_limit,
            skip_verify: net.insecure,
            ca_cert_files: Vec::new(),
            proxy: None,
            mirrors: Vec::new(),
        };
        let base = format!("{scheme}://{}", reference.api_host());
        let http = HttpClient::new(settings, Some(&base))?;
        Ok(Client {
            repo: reference.repo.clone(),
            stream: streaming_agent(&http.settings, http.origin())?,
            guarded_stream: guarded_streaming_agent(&http.settings, http.origin())?,
            base,
            http,
            auth: RegistryAuth::new(credentials, None),
            retry_limit: net.retry_limit,
            timeout: net.timeout,
            counters: TransferCounters::default(),
        })
    }

    /// The registry's base URL (`scheme://host[:port]`).
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.repo)
    }

    /// A URL the registry returned (`Location`), made absolute.
    fn absolute(&self, location: &str) -> String {
        match location.starts_with('/') {
            true => format!("{}{location}", self.base),
            false => location.to_string(),
        }
    }

    fn send_once(
        &self,
        call: &Call,
        authorization: Option<&str>,
    ) -> std::result::Result<HttpResponse, TransportError> {
        // A call without the registry's Authorization goes where the registry sent it: guarded.
        let agent = match (call.long, call.auth) {
            (true, true) => &self.stream,
            (true, false) => &self.guarded_stream,
            (false, true) => self.http.direct_agent(),
            (false, false) => self.http.server_chosen_agent(),
        };
        let headers = call
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .chain(authorization.map(|a| ("Authorization", a)));
        let result = match call.method {
            Method::Get | Method::Head => {
                let mut b = match call.method {
                    Method::Get => agent.get(&call.url),
                    _ => agent.head(&call.url),
                };
                for (k, v) in headers {
                    b = b.header(k, v);
                }
                if let Some(within) = call.answer_within {
                    b = b.config().timeout_recv_response(Some(within)).build();
                }
                b.call()
            }
            Method::Post | Method::Put => {
                let mut b = match call.method {
                    Method::Post => agent.post(&call.url),
                    _ => agent.put(&call.url),
                };
                for (k, v) in headers {
                    b = b.header(k, v);
                }
                if let Some(within) = call.answer_within {
                    // Writes keep the agent's per-write timeout; the head gets one deadline of its
                    // own, which may be longer than the timeout (see `answer_deadline`).
                    b = b
                        .config()
                        .timeout_per_read(None)
                        .timeout_recv_response(Some(within))
                        .timeout_recv_body(Some(self.timeout))
                        .build();
                }
                match call.payload {
                    Payload::Empty => b.send_empty(),
                    Payload::Bytes(bytes) => b.send(bytes),
                    Payload::File(path) => {
                        let file = std::fs::File::open(path).map_err(|e| {
                            TransportError::new(
                                TransportErrorKind::Other,
                                format!("open {}: {e}", path.display()),
                            )
                        })?;
                        b.send(&file)
                    }
                }
            }
        };
        result.map_err(|e| match (e, call.answer_within) {
            (ureq::Error::Timeout(ureq::Timeout::RecvResponse), Some(within)) => {
                let s = within.as_secs();
                TransportError::new(
                    TransportErrorKind::Timeout,
                    match call.method {
                        Method::Put | Method::Post => format!(
                            "the registry took the upload but gave no answer within {s}s of its \
                             last byte"
                        ),
                        _ => format!("no whole answer head within {s}s"),
                    },
                )
            }
            (e, _) => TransportError::from(e),
        })
    }

    /// One exchange, authorizing after a 401 once (a new token for a wider scope, or Basic auth).
    fn exchange(&self, call: &Call) -> std::result::Result<HttpResponse, Failure> {
        let mut sent = match call.auth {
            true => self.auth.current_header(&self.http),
            false => None,
        };
        let mut reauthorized = false;
        loop {
            let resp = self
                .send_once(call, sent.as_deref())
                .map_err(|e| Failure::of_transport(e, &self.base))?;
            if resp.status().as_u16() != 401 || !call.auth {
                return Ok(resp);
            }
            if reauthorized {
                return Err(Failure::Fatal(Error::backend(
                    BackendErrorKind::Auth,
                    format!(
                        "{}: the registry refused the credentials for {} (401 after authorizing)",
                        self.base, self.repo
                    ),
                )));
            }
            reauthorized = true;
            let challenge = header(&resp, "www-authenticate").unwrap_or_default();
            sent = Some(
                self.auth
                    .reauthorize(&self.http, sent.as_deref(), &challenge)?,
            );
        }
    }

    /// Run `attempt` up to 1 + retry_limit times with backoff.
    fn retrying<T>(
        &self,
        what: &str,
        mut attempt: impl FnMut() -> std::result::Result<T, Failure>,
    ) -> Result<T> {
        let mut n = 0;
        loop {
            match attempt() {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry { why, after, .. }) => {
                    if n >= self.retry_limit {
                        return Err(Error::backend(
                            BackendErrorKind::Unavailable,
                            format!("{what}: giving up after {} attempts: {why}", n + 1),
                        ));
                    }
                    n += 1;
                    let pause = after.unwrap_or_else(|| backoff(n));
                    log::warn!("{what}: {why}; retry {n}/{} in {pause:?}", self.retry_limit);
                    std::thread::sleep(pause);
                }
            }
        }
    }

    fn call(
        &self,
        method: Method,
        url: String,
        headers: Vec<(&'static str, String)>,
    ) -> Call<'static> {
        Call {
            method,
            url,
            headers,
            payload: Payload::Empty,
            auth: true,
            long: false,
            answer_within: None,
        }
    }

    /// GET a manifest or index by tag or digest. A digest reference must match the bytes.
    pub fn manifest(&self, reference: &str, accept: &[&str]) -> Result<Fetched> {
        let what = format!("manifest {}/{}:{reference}", self.base, self.repo);
        let fetched = self.retrying(&what, || {
            let call = self.call(
                Method::Get,
                self.url(&format!("manifests/{reference}")),
                vec![("Accept", accept.join(", "))],
            );
            let mut resp = self.exchange(&call)?;
            match resp.status().as_u16() {
                200 => {}
                404 => {
                    return Err(Failure::Fatal(Error::NotFound(format!(
                        "{what}: the registry has no such manifest"
                    ))))
                }
                _ => return Err(failed(&mut resp, &what)),
            }
            let content_type = header(&resp, "content-type");
            let bytes = resp
                .body_mut()
                .with_config()
                .limit(MANIFEST_LIMIT)
                .read_to_vec()
                .map_err(|e| {
                    Failure::retry(format!("{what}: body: {e} (limit {MANIFEST_LIMIT} bytes)"))
                })?;
            Ok((content_type, bytes))
        })?;
        let (content_type, bytes) = fetched;
        let digest = sha256_digest(&bytes);
        if reference.starts_with("sha256:") && digest != reference {
            return Err(Error::Integrity(format!(
                "{what}: the registry sent bytes with digest {digest}"
            )));
        }
        let media_type = content_type
            .map(|c| c.split(';').next().unwrap_or("").trim().to_string())
            .filter(|c| !c.is_empty() && c != "application/json" && c != "text/plain")
            .or_else(|| {
                serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()?
                    .get("mediaType")?
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_default();
        Ok(Fetched {
            media_type,
            bytes,
            digest,
        })
    }

    /// PUT a manifest or index under a tag or its digest.
    pub fn put_manifest(&self, reference: &str, media_type: &str, bytes: &[u8]) -> Result<()> {
        let what = format!("push manifest {}/{}:{reference}", self.base, self.repo);
        self.retrying(&what, || {
            let call = Call {
                payload: Payload::Bytes(bytes),
                ..self.call(
                    Method::Put,
                    self.url(&format!("manifests/{reference}")),
                    vec![("Content-Type", media_type.to_string())],
                )
            };
            let mut resp = self.exchange(&call)?;
            match resp.status().as_u16() {
                200..=202 => Ok(()),
                _ => Err(failed(&mut resp, &what)),
            }
        })
    }

    /// The size of a blob in this repository, or `None` when it has no such blob.
    pub fn blob_size(&self, digest: &str) -> Result<Option<u64>> {
        check_digest(digest)?;
        let what = format!("blob {}/{}@{digest}", self.base, self.repo);
        self.retrying(&what, || {
            let call = self.call(Method::Head, self.url(&format!("blobs/{digest}")), vec![]);
            let mut resp = self.exchange(&call)?;
            let status = resp.status().as_u16();
            match status {
                200 => Ok(header(&resp, "content-length").and_then(|l| l.trim().parse().ok())),
                // Blob storage behind the registry: the registry has the blob.
                s if is_redirect(s) => Ok(Some(0)),
                404 => Ok(None),
                _ => Err(failed(&mut resp, &what)),
            }
        })
    }

    /// Stream a blob of `size` bytes; its sha256 is checked when the last byte has been read.
    pub fn open_blob(&self, digest: &str, size: u64) -> Result<BlobStream<'_>> {
        check_digest(digest)?;
        Ok(BlobStream {
            client: self,
            digest: digest.to_string(),
            size,
            pos: 0,
            body: None,
            hasher: Sha256::new(),
            failures: 0,
            verified: false,
        })
    }

    /// A whole blob of at most `limit` bytes in memory (configs), digest checked.
    pub fn fetch_blob(&self, digest: &str, size: u64, limit: u64) -> Result<Vec<u8>> {
        if size > limit {
            return Err(Error::Invalid(format!(
                "blob {digest} is {size} bytes, more than the {limit} allowed here"
            )));
        }
        let mut out = Vec::with_capacity(size as usize);
        self.open_blob(digest, size)?
            .read_to_end(&mut out)
            .map_err(|e| {
                Error::backend(BackendErrorKind::Unavailable, format!("blob {digest}: {e}"))
            })?;
        Ok(out)
    }

    /// Open the GET of a blob at byte `pos`, following redirects to blob storage (without the
    /// registry's Authorization). Returns the body positioned at `pos`.
    fn open_at(
        &self,
        digest: &str,
        pos: u64,
        size: u64,
    ) -> std::result::Result<ureq::BodyReader<'static>, Failure> {
        let what = format!("blob {}/{}@{digest}", self.base, self.repo);
        let range = (pos > 0).then(|| ("Range", format!("bytes={pos}-")));
        let mut call = Call {
            long: true,
            // Each read within the timeout bounds a silent server only, not a head trickled in.
            answer_within: Some(self.timeout),
            ..self.call(
                Method::Get,
                self.url(&format!("blobs/{digest}")),
                range.into_iter().collect(),
            )
        };
        let mut resp = self.exchange(&call)?;
        let mut hops = 0;
        while is_redirect(resp.status().as_u16()) {
            hops += 1;
            let location = header(&resp, "location")
                .ok_or_else(|| Failure::retry(format!("{what}: redirect without a Location")))?;
            if hops > MAX_REDIRECTS {
                return Err(Failure::Fatal(Error::backend(
                    BackendErrorKind::Protocol,
                    format!("{what}: too many redirects"),
                )));
            }
            call.url = self.absolute(&location);
            call.auth = false;
            resp = self.exchange(&call)?;
        }
        let skip = match resp.status().as_u16() {
            200 => pos,
            206 => {
                let start = header(&resp, "content-range").and_then(|v| {
                    v.trim()
                        .strip_prefix("bytes ")?
                        .split('-')
                        .next()?
                        .parse::<u64>()
                        .ok()
                });
                if start != Some(pos) {
                    return Err(Failure::retry(format!(
                        "{what}: asked for bytes from {pos}, got Content-Range {:?}",
                        header(&resp, "content-range")
                    )));
                }
                0
            }
            404 => {
                return Err(Failure::Fatal(Error::NotFound(format!(
                    "{what}: the registry has no such blob"
                ))))
            }
            _ => return Err(failed(&mut resp, &what)),
        };
        let mut reader = resp
            .into_body()
            .into_with_config()
            .limit(size - pos + skip)
            .reader();
        if skip > 0 {
            // A server that ignores ranges starts again from the beginning.
            let skipped = std::io::copy(&mut (&mut reader).take(skip), &mut std::io::sink())
                .map_err(|e| Failure::retry(format!("{what}: {e}")))?;
            if skipped != skip {
                return Err(Failure::retry(format!("{what}: body ended early")));
            }
        }
        Ok(reader)
    }

    /// Push a blob unless the repository has it: a monolithic upload (POST for a session, PUT of the
    /// bytes with their digest). Returns whether bytes were sent.
    pub fn push_blob(&self, digest: &str, size: u64, payload: Payload) -> Result<bool> {
        if self.blob_size(digest)?.is_some() {
            self.counters.blobs_present.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        let what = format!("push blob {digest} to {}/{}", self.base, self.repo);
        self.retrying(&what, || {
            let location = self.start_upload(&what, None)?.ok_or_else(|| {
                Failure::Fatal(Error::backend(
                    BackendErrorKind::Protocol,
                    format!("{what}: the registry mounted an unasked blob"),
                ))
            })?;
            let sep = if location.contains('?') { '&' } else { '?' };
            let call = Call {
                payload,
                long: true,
                answer_within: Some(answer_deadline(self.timeout, size)),
                // The registry's credentials go to the registry only, wherever the session lives.
                auth: location.starts_with(&format!("{}/", self.base)),
                ..self.call(
                    Method::Put,
                    format!("{location}{sep}digest={digest}"),
                    vec![("Content-Type", "application/octet-stream".to_string())],
                )
            };
            let mut resp = self.exchange(&call)?;
            match resp.status().as_u16() {
                201 | 204 => Ok(()),
                _ => Err(failed(&mut resp, &what)),
            }
        })?;
        self.counters.blobs_pushed.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_pushed
            .fetch_add(size, Ordering::Relaxed);
        Ok(true)
    }

    /// POST an upload session (with `mount` = (digest, from repo), a cross-repository mount first).
    /// `Ok(None)`: the registry mounted the blob; `Ok(Some(location))`: upload there.
    fn start_upload(
        &self,
        what: &str,
        mount: Option<(&str, &str)>,
    ) -> std::result::Result<Option<String>, Failure> {
        let query = match mount {
            Some((digest, from)) => format!("?mount={digest}&from={from}"),
            None => String::new(),
        };
        let call = self.call(
            Method::Post,
            self.url(&format!("blobs/uploads/{query}")),
            vec![],
        );
        let mut resp = self.exchange(&call)?;
        match resp.status().as_u16() {
            201 if mount.is_some() => Ok(None),
            202 => header(&resp, "location")
                .map(|l| Some(self.absolute(&l)))
                .ok_or_else(|| {
                    Failure::retry(format!("{what}: upload session without a Location"))
                }),
            _ => Err(failed(&mut resp, what)),
        }
    }

    /// Ask the registry to link a blob from another repository of the same registry. Returns whether
    /// it did (or already had it).
    pub fn mount_blob(&self, digest: &str, from_repo: &str) -> Result<bool> {
        check_digest(digest)?;
        if self.blob_size(digest)?.is_some() {
            self.counters.blobs_present.fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
        let what = format!("mount blob {digest} from {from_repo} into {}", self.repo);
        let mounted = self.retrying(&what, || {
            self.start_upload(&what, Some((digest, from_repo)))
        })?;
        if mounted.is_none() {
            self.counters.blobs_mounted.fetch_add(1, Ordering::Relaxed);
        }
        Ok(mounted.is_none())
    }
}

/// A blob read as a stream: broken connections are resumed where they stopped (up to the retry
/// limit); at the end the bytes' sha256 must be the digest asked for.
pub struct BlobStream<'c> {
    client: &'c Client,
    digest: String,
    size: u64,
    pos: u64,
    body: Option<ureq::BodyReader<'static>>,
    hasher: Sha256,
    failures: u32,
    verified: bool,
}

impl BlobStream<'_> {
    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn fail(&mut self, why: String) -> std::io::Result<()> {
        self.body = None;
        self.failures += 1;
        if self.failures > self.client.retry_limit {
            return Err(std::io::Error::other(format!(
                "blob {}: giving up after {} attempts at byte {}: {why}",
                self.digest, self.failures, self.pos
            )));
        }
        let pause = backoff(self.failures);
        log::warn!(
            "blob {}: {why}; resuming at byte {} in {pause:?}",
            self.digest,
            self.pos
        );
        std::thread::sleep(pause);
        Ok(())
    }
}

impl Read for BlobStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.pos == self.size {
                if !self.verified {
                    let got = format!(
                        "sha256:{}",
                        super::digest::hex(&std::mem::take(&mut self.hasher).finalize())
                    );
                    if got != self.digest {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("blob {} arrived with digest {got}", self.digest),
                        ));
                    }
                    self.verified = true;
                    self.body = None;
                }
                return Ok(0);
            }
            if buf.is_empty() {
                return Ok(0);
            }
            let body = match &mut self.body {
                Some(b) => b,
                None => match self.client.open_at(&self.digest, self.pos, self.size) {
                    Ok(b) => self.body.insert(b),
                    Err(Failure::Fatal(e)) => return Err(std::io::Error::other(e.to_string())),
                    Err(Failure::Retry { why, .. }) => {
                        self.fail(why)?;
                        continue;
                    }
                },
            };
            let want = buf
                .len()
                .min((self.size - self.pos).min(usize::MAX as u64) as usize);
            match body.read(&mut buf[..want]) {
                Ok(0) => self.fail("the body ended early".into())?,
                Ok(n) => {
                    self.hasher.update(&buf[..n]);
                    self.pos += n as u64;
                    self.client
                        .counters
                        .bytes_pulled
                        .fetch_add(n as u64, Ordering::Relaxed);
                    return Ok(n);
                }
                Err(e) => self.fail(e.to_string())?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_docker_reads_them() {
        let r = Reference::parse("127.0.0.1:5000/a/b:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repo.as_str()),
            ("127.0.0.1:5000", "a/b")
        );
        assert_eq!(r.reference(), "v1");
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(
            (r.api_host(), r.repo.as_str(), r.reference()),
            ("registry-1.docker.io", "library/busybox", "latest")
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("localhost/x:t@{d}")).unwrap();
        assert_eq!((r.tag.as_deref(), r.reference()), (Some("t"), d.as_str()));
        assert_eq!(r.to_string(), format!("localhost/x:t@{d}"));
        for bad in [
            "reg.io/A/b",
            "reg.io/a/../b",
            "reg.io/a:b/c:",
            "reg.io/a@sha256:xyz",
            "reg.io/a:t@md5:00",
            "reg.io/a:bad tag",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digests_are_checked_before_use_in_urls() {
        assert!(check_digest(&format!("sha256:{}", "0".repeat(64))).is_ok());
        assert!(check_digest("sha256:../../etc").is_err());
        assert!(check_digest(&format!("sha512:{}", "0".repeat(128))).is_err());
    }
}
