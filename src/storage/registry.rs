//! The `registry` backend: blobs of an OCI distribution repository, `GET /v2/<repo>/blobs/sha256:<id>` with
//! ranges.
//!
//! Auth follows the distribution token protocol: a request that gets 401 reads the `WWW-Authenticate`
//! challenge; `Basic` answers with the configured `auth`, `Bearer` fetches a token from the challenge's
//! realm (service and scope passed on, `auth` as Basic credentials when set). The resulting header is
//! cached for every request; an expiring token is refreshed before it runs out, and a 401 in the middle
//! of a run (revoked token) refreshes once. Refreshes are serialized and a caller that finds the header
//! already changed by another thread reuses it, so many readers hitting 401 together fetch one token.
//!
//! Redirects (blob storage behind the registry) are followed by hand: the `Location` is rewritten with
//! `blob_url_scheme` / `blob_redirected_host`, fetched **without** the registry's Authorization, and
//! remembered per blob; a 401/403 from the remembered URL (expired pre-signed URL) forgets it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;

use super::http::{classify, net_error, Failure, HttpClient, Keys, Remote, Request, Response};
use crate::error::{Error, Result};

/// Refresh a Bearer token this long before the registry says it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(20);

struct AuthState {
    /// The `Authorization` value sent to the registry.
    header: Option<String>,
    expires_at: Option<Instant>,
    /// The last Bearer challenge, to refresh a token before it expires without waiting for a 401.
    bearer: Option<Challenge>,
}

#[derive(Clone, Debug, PartialEq)]
struct Challenge {
    realm: String,
    service: Option<String>,
    scope: Option<String>,
}

pub struct Registry {
    base: String,
    repo: String,
    /// base64 `user:pass`; replaced at run time by `PUT /api/v1/config`.
    auth: Mutex<Option<String>>,
    blob_url_scheme: Option<String>,
    blob_redirected_host: Option<String>,
    state: Mutex<AuthState>,
    /// Serializes token fetches.
    refresh_gate: Mutex<()>,
    redirects: Mutex<HashMap<String, String>>,
    /// Token requests made (for tests and logs: a 401 storm would show here).
    pub token_fetches: std::sync::atomic::AtomicU64,
}

impl Registry {
    pub fn from_keys(k: &Keys) -> Result<Self> {
        let scheme = match k.string("scheme")?.as_deref() {
            Some("http") => "http",
            _ => "https",
        };
        let host = k.required("host")?;
        let repo = k.required("repo")?;
        // IMAGE_PULL_AUTH overrides the file, as with nydusd.
        let auth = std::env::var("IMAGE_PULL_AUTH")
            .ok()
            .filter(|s| !s.is_empty())
            .or(k.string("auth")?.filter(|s| !s.is_empty()));
        if let Some(a) = &auth {
            check_auth(a)?;
        }
        let token = k.string("registry_token")?.filter(|s| !s.is_empty());
        Ok(Registry {
            base: format!("{scheme}://{host}"),
            repo,
            auth: Mutex::new(auth),
            blob_url_scheme: k.string("blob_url_scheme")?.filter(|s| !s.is_empty()),
            blob_redirected_host: k.string("blob_redirected_host")?.filter(|s| !s.is_empty()),
            state: Mutex::new(AuthState {
                header: token.map(|t| format!("Bearer {t}")),
                expires_at: None,
                bearer: None,
            }),
            refresh_gate: Mutex::new(()),
            redirects: Mutex::new(HashMap::new()),
            token_fetches: Default::default(),
        })
    }

    fn auth(&self) -> Option<String> {
        self.auth.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn blob_url(&self, blob_id: &str) -> String {
        format!("{}/v2/{}/blobs/sha256:{blob_id}", self.base, self.repo)
    }

    /// The header to send now, refreshing a token that is about to expire.
    fn current_header(&self, http: &HttpClient) -> Option<String> {
        {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let expired = st.expires_at.is_some_and(|t| Instant::now() >= t);
            if !expired {
                return st.header.clone();
            }
        }
        let _gate = self.refresh_gate.lock().unwrap_or_else(|e| e.into_inner());
        let challenge = {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.expires_at.is_none_or(|t| Instant::now() < t) {
                return st.header.clone();
            }
            st.bearer.clone()
        };
        match challenge.map(|c| self.fetch_token(http, &c)) {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                log::warn!("registry token refresh failed: {e:?}");
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                st.header = None;
                st.expires_at = None;
            }
            None => {}
        }
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .header
            .clone()
    }

    /// After a 401 to a request sent with `sent`: work out a new header from the challenge. Returns
    /// the header to retry with.
    fn reauthorize(
        &self,
        http: &HttpClient,
        sent: Option<&str>,
        resp: &Response,
    ) -> std::result::Result<String, Failure> {
        let _gate = self.refresh_gate.lock().unwrap_or_else(|e| e.into_inner());
        {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(h) = &st.header {
                if Some(h.as_str()) != sent {
                    // Another reader already refreshed while we waited.
                    return Ok(h.clone());
                }
            }
        }
        let www = resp.header("www-authenticate").unwrap_or("");
        let (scheme, params) = parse_challenge(www);
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => {
                let auth = self.auth().ok_or_else(|| {
                    Failure::Fatal(net_error(
                        "registry asks for Basic auth and no `auth` is configured".into(),
                    ))
                })?;
                let header = format!("Basic {auth}");
                if sent == Some(header.as_str()) {
                    return Err(Failure::Fatal(net_error(
                        "registry refused the configured credentials".into(),
                    )));
                }
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                st.header = Some(header.clone());
                st.expires_at = None;
                Ok(header)
            }
            "bearer" => {
                let realm = params.get("realm").cloned().ok_or_else(|| {
                    Failure::Fatal(net_error(
                        "registry Bearer challenge without a realm".into(),
                    ))
                })?;
                let challenge = Challenge {
                    realm,
                    service: params.get("service").cloned(),
                    scope: params.get("scope").cloned(),
                };
                self.fetch_token(http, &challenge)?;
                let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                st.header
                    .clone()
                    .ok_or_else(|| Failure::retry("token fetch left no header"))
            }
            _ => Err(Failure::Fatal(net_error(format!(
                "registry answered 401 with an unsupported challenge {:?}",
                scheme
            )))),
        }
    }

    /// GET the realm for a token and cache it with its expiry.
    fn fetch_token(&self, http: &HttpClient, c: &Challenge) -> std::result::Result<(), Failure> {
        self.token_fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut url = c.realm.clone();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        for (k, v) in [("service", &c.service), ("scope", &c.scope)] {
            if let Some(v) = v {
                url.push(sep);
                url.push_str(k);
                url.push('=');
                url.push_str(&percent_encode(v));
                sep = '&';
            }
        }
        url.push(sep);
        url.push_str("client_id=rafsd");
        let headers: Vec<(String, String)> = self
            .auth()
            .iter()
            .map(|a| ("Authorization".to_string(), format!("Basic {a}")))
            .collect();
        let resp = http
            .send_small_direct(&url, &headers)
            .map_err(|e| Failure::retry(format!("token request: {e}")))?;
        if resp.status != 200 {
            return Err(match resp.status {
                401 | 403 => Failure::Fatal(net_error(format!(
                    "token realm refused the credentials (status {})",
                    resp.status
                ))),
                _ => classify(&resp, "token request"),
            });
        }
        let v: serde_json::Value = serde_json::from_slice(&resp.body)
            .map_err(|e| Failure::retry(format!("token response is not JSON: {e}")))?;
        let token = v
            .get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Failure::retry("token response without a token"))?;
        // The distribution spec's default lifetime is 60 s. A day at most: a server's huge value must not
        // overflow the Instant below.
        let ttl = Duration::from_secs(
            v.get("expires_in")
                .and_then(|e| e.as_u64())
                .unwrap_or(60)
                .min(86_400),
        );
        let margin = TOKEN_MARGIN.min(ttl / 4);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.header = Some(format!("Bearer {token}"));
        st.expires_at = Some(Instant::now() + ttl - margin);
        st.bearer = Some(c.clone());
        log::debug!("registry token fetched, valid for {ttl:?}");
        Ok(())
    }

    /// Where a redirect points, rewritten by `blob_url_scheme` / `blob_redirected_host`.
    fn redirect_target(&self, location: &str) -> String {
        let mut url = if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            location.to_string()
        };
        if let Some(scheme) = &self.blob_url_scheme {
            if let Some((_, rest)) = url.split_once("://") {
                url = format!("{scheme}://{rest}");
            }
        }
        if let Some(host) = &self.blob_redirected_host {
            if let Some((scheme, rest)) = url.split_once("://") {
                let path = rest.find('/').map(|i| &rest[i..]).unwrap_or("/");
                url = format!("{scheme}://{host}{path}");
            }
        }
        url
    }

    fn get_storage(
        &self,
        http: &HttpClient,
        url: &str,
        range: Option<(u64, u64)>,
    ) -> std::result::Result<Response, Failure> {
        // A redirected storage URL belongs to that one host: no mirror serves it.
        let req = Request {
            mirrorable: false,
            ..Request::blob(url, &[], range)
        };
        http.send_blob(&req, "blob storage")
    }
}

/// `auth` must be base64 of `user:password`.
fn check_auth(auth: &str) -> Result<()> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| Error::Invalid("backend registry: `auth` is not base64".into()))?;
    if !raw.contains(&b':') {
        return Err(Error::Invalid(
            "backend registry: `auth` must encode user:password".into(),
        ));
    }
    Ok(())
}

fn is_redirect(status: u16) -> bool {
    matches!(status, 301 | 302 | 303 | 307 | 308)
}

impl Remote for Registry {
    fn kind(&self) -> &'static str {
        "registry"
    }

    /// New credentials: a Basic header in use switches to them now; a Bearer token in use stays until
    /// it expires or is refused, and the next token request presents them.
    fn set_registry_auth(&self, auth: Option<&str>) -> Result<()> {
        let auth = auth.map(str::trim).filter(|a| !a.is_empty());
        if let Some(a) = auth {
            check_auth(a)?;
        }
        let _gate = self.refresh_gate.lock().unwrap_or_else(|e| e.into_inner());
        *self.auth.lock().unwrap_or_else(|e| e.into_inner()) = auth.map(String::from);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st
            .header
            .as_deref()
            .is_some_and(|h| h.starts_with("Basic "))
        {
            st.header = auth.map(|a| format!("Basic {a}"));
        }
        log::info!(
            "registry credentials of {}/{} replaced{}",
            self.base,
            self.repo,
            if auth.is_none() { " (cleared)" } else { "" }
        );
        Ok(())
    }

    fn fetch(
        &self,
        http: &HttpClient,
        blob_id: &str,
        range: Option<(u64, u64)>,
    ) -> std::result::Result<Response, Failure> {
        let cached = self
            .redirects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(blob_id)
            .cloned();
        if let Some(url) = cached {
            let resp = self.get_storage(http, &url, range)?;
            if !matches!(resp.status, 401 | 403) && !is_redirect(resp.status) {
                return Ok(resp);
            }
            // An expired pre-signed URL: ask the registry again.
            self.redirects
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(blob_id);
        }
        let url = self.blob_url(blob_id);
        let mut sent = self.current_header(http);
        let mut reauthorized = false;
        loop {
            let headers: Vec<(String, String)> = sent
                .iter()
                .map(|h| ("Authorization".to_string(), h.clone()))
                .collect();
            let req = Request::blob(&url, &headers, range);
            let resp = http.send_blob(&req, "registry")?;
            if resp.status == 401 && !reauthorized {
                reauthorized = true;
                sent = Some(self.reauthorize(http, sent.as_deref(), &resp)?);
                continue;
            }
            if resp.status == 401 {
                return Err(Failure::Fatal(net_error(
                    "registry refused the credentials (401 after a fresh token)".into(),
                )));
            }
            if is_redirect(resp.status) {
                let location = resp.header("location").ok_or_else(|| {
                    Failure::retry(format!("redirect {} without a Location", resp.status))
                })?;
                let target = self.redirect_target(location);
                self.redirects
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(blob_id.to_string(), target.clone());
                return self.get_storage(http, &target, range);
            }
            return Ok(resp);
        }
    }
}

/// `Bearer realm="x",service="y",scope="a:b:pull"` → ("Bearer", {realm: x, ...}).
fn parse_challenge(v: &str) -> (String, HashMap<String, String>) {
    let v = v.trim();
    let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        params.insert(key, value.to_string());
        rest = tail.trim_start_matches(',').trim();
    }
    (scheme.to_string(), params)
}

/// RFC 3986 unreserved characters pass; everything else is %XX.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_parsing() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="http://127.0.0.1:1/token",service="reg",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(p["realm"], "http://127.0.0.1:1/token");
        assert_eq!(p["service"], "reg");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(
            (s.as_str(), p["realm"].as_str()),
            ("Basic", "Registry Realm")
        );
    }

    #[test]
    fn redirect_rewrite() {
        let v = serde_json::json!({"host": "reg:5000", "repo": "a/b", "scheme": "http",
            "blob_url_scheme": "http", "blob_redirected_host": "127.0.0.1:9"});
        let r = Registry::from_keys(&Keys::new("registry", &v).unwrap()).unwrap();
        assert_eq!(
            r.redirect_target("https://s3.example/bucket/x?sig=1"),
            "http://127.0.0.1:9/bucket/x?sig=1"
        );
        assert_eq!(r.blob_url("ab"), "http://reg:5000/v2/a/b/blobs/sha256:ab");
    }

    #[test]
    fn bad_auth_is_refused() {
        let v = serde_json::json!({"host": "h", "repo": "r", "auth": "bm9jb2xvbg=="});
        assert!(Registry::from_keys(&Keys::new("registry", &v).unwrap()).is_err());
    }
}
