//! Registry authorization, shared by the `registry` blob backend and the push/pull client of `rafsd
//! convert`: the distribution token protocol. A request that gets 401 reads the `WWW-Authenticate`
//! challenge; `Basic` answers with the configured credentials, `Bearer` fetches a token from the
//! challenge's realm (service and scope passed on, the credentials as Basic auth when set). The resulting
//! header is cached for every request; an expiring token is refreshed before it runs out, and a 401 in the
//! middle of a run (revoked token, or a push needing a wider scope) fetches a new one. Refreshes are
//! serialized and a caller that finds the header already changed by another thread reuses it, so many
//! readers hitting 401 together fetch one token.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::http::{classify, Failure, HttpClient};
use super::http_text::percent_encode;
use crate::error::{BackendErrorKind, Error};

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

/// The Authorization state of one repository on one registry.
pub struct RegistryAuth {
    /// base64 `user:pass`; replaced at run time by `PUT /api/v1/config` ([`Self::set_credentials`]).
    credentials: Mutex<Option<String>>,
    state: Mutex<AuthState>,
    /// Serializes token fetches.
    refresh_gate: Mutex<()>,
    /// Token requests made (for tests and logs: a 401 storm would show here).
    pub token_fetches: AtomicU64,
    /// How the last token request failed, for the readers that waited on it (see [`Self::reauthorize`]).
    last_failure: Mutex<Option<SharedFailure>>,
}

/// A failed token request as the readers that waited for it get it: fatal (with its kind) or retryable.
#[derive(Clone)]
struct SharedFailure {
    fatal: Option<BackendErrorKind>,
    message: String,
    /// For a retryable one: the realm did not answer (see [`Failure::Retry`]).
    no_answer: bool,
}

impl SharedFailure {
    fn of(f: &Failure) -> Self {
        match f {
            Failure::Retry { why, no_answer, .. } => SharedFailure {
                fatal: None,
                message: why.clone(),
                no_answer: *no_answer,
            },
            Failure::Fatal(Error::Backend(b)) => SharedFailure {
                fatal: Some(b.kind),
                message: b.message.clone(),
                no_answer: false,
            },
            Failure::Fatal(e) => SharedFailure {
                fatal: Some(BackendErrorKind::Protocol),
                message: e.to_string(),
                no_answer: false,
            },
        }
    }

    fn failure(self) -> Failure {
        let message = format!("{} (the token request another reader made)", self.message);
        match self.fatal {
            None if self.no_answer => Failure::no_answer(message),
            None => Failure::retry(message),
            Some(kind) => Failure::Fatal(Error::backend(kind, message)),
        }
    }
}

impl RegistryAuth {
    /// `credentials`: base64 `user:pass`; `token`: a registry token to start with.
    pub fn new(credentials: Option<String>, token: Option<String>) -> Self {
        RegistryAuth {
            credentials: Mutex::new(credentials),
            state: Mutex::new(AuthState {
                header: token.map(|t| format!("Bearer {t}")),
                expires_at: None,
                bearer: None,
            }),
            refresh_gate: Mutex::new(()),
            token_fetches: Default::default(),
            last_failure: Mutex::new(None),
        }
    }

    fn credentials(&self) -> Option<String> {
        self.credentials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// New credentials (base64 `user:pass`, `None` clears them): a Basic header in use switches to them
    /// now; a Bearer token in use stays until it expires or is refused, and the next token request
    /// presents them.
    pub fn set_credentials(&self, credentials: Option<&str>) {
        let _gate = self.refresh_gate.lock().unwrap_or_else(|e| e.into_inner());
        *self.credentials.lock().unwrap_or_else(|e| e.into_inner()) = credentials.map(String::from);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st
            .header
            .as_deref()
            .is_some_and(|h| h.starts_with("Basic "))
        {
            st.header = credentials.map(|a| format!("Basic {a}"));
        }
    }

    /// The header to send now, refreshing a token that is about to expire. A reader that waited while
    /// another refreshed takes what that refresh left, even a token already said to be expired (a realm
    /// answering `expires_in: 0` would otherwise have every waiting reader fetch one in turn).
    pub fn current_header(&self, http: &HttpClient) -> Option<String> {
        let fetches_before = {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let expired = st.expires_at.is_some_and(|t| Instant::now() >= t);
            if !expired {
                return st.header.clone();
            }
            self.token_fetches.load(Ordering::Acquire)
        };
        let _gate = self.refresh_gate.lock().unwrap_or_else(|e| e.into_inner());
        let challenge = {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let fetched_meanwhile = self.token_fetches.load(Ordering::Acquire) != fetches_before;
            if fetched_meanwhile || st.expires_at.is_none_or(|t| Instant::now() < t) {
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

    /// After a 401 to a request sent with `sent`: work out a new header from the response's
    /// `WWW-Authenticate` challenge. Returns the header to retry with.
    ///
    /// A reader that waited while another fetched a token takes that fetch's outcome: its header, or its
    /// failure. Fetching again in turn would keep the last of N readers waiting N token timeouts (a hung
    /// realm), holding a worker all that time.
    pub fn reauthorize(
        &self,
        http: &HttpClient,
        sent: Option<&str>,
        www_authenticate: &str,
    ) -> std::result::Result<String, Failure> {
        let fetches_before = self.token_fetches.load(Ordering::Acquire);
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
        if self.token_fetches.load(Ordering::Acquire) != fetches_before {
            // A token request ran while we waited and left no new header: it failed.
            let failed = self
                .last_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(f) = failed {
                return Err(f.failure());
            }
        }
        let (scheme, params) = parse_challenge(www_authenticate);
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => {
                let auth = self.credentials().ok_or_else(|| {
                    Failure::Fatal(Error::backend(
                        BackendErrorKind::Auth,
                        "registry asks for Basic auth and no credentials are configured",
                    ))
                })?;
                let header = format!("Basic {auth}");
                if sent == Some(header.as_str()) {
                    return Err(Failure::Fatal(Error::backend(
                        BackendErrorKind::Auth,
                        "registry refused the configured credentials",
                    )));
                }
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                st.header = Some(header.clone());
                st.expires_at = None;
                Ok(header)
            }
            "bearer" => {
                let realm = params.get("realm").cloned().ok_or_else(|| {
                    Failure::Fatal(Error::backend(
                        BackendErrorKind::Protocol,
                        "registry Bearer challenge without a realm",
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
            _ => Err(Failure::Fatal(Error::backend(
                BackendErrorKind::Protocol,
                format!("registry answered 401 with an unsupported challenge {scheme:?}"),
            ))),
        }
    }

    /// GET the realm for a token and cache it with its expiry; a failure is kept for the readers waiting
    /// on this request (called with `refresh_gate` held).
    fn fetch_token(&self, http: &HttpClient, c: &Challenge) -> std::result::Result<(), Failure> {
        let result = self.request_token(http, c);
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) =
            result.as_ref().err().map(SharedFailure::of);
        self.token_fetches.fetch_add(1, Ordering::AcqRel);
        result
    }

    fn request_token(&self, http: &HttpClient, c: &Challenge) -> std::result::Result<(), Failure> {
        let mut url = c.realm.clone();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        // A challenge may ask for several scopes at once (a cross-repository mount), separated by
        // spaces; each goes as its own `scope` parameter.
        let scopes = c.scope.iter().flat_map(|s| s.split_whitespace());
        let params = c.service.iter().map(|v| ("service", v.as_str()));
        for (k, v) in params.chain(scopes.map(|v| ("scope", v))) {
            url.push(sep);
            url.push_str(k);
            url.push('=');
            url.push_str(&percent_encode(v));
            sep = '&';
        }
        url.push(sep);
        url.push_str("client_id=rafsd");
        let headers: Vec<(String, String)> = self
            .credentials()
            .iter()
            .map(|a| ("Authorization".to_string(), format!("Basic {a}")))
            .collect();
        let resp = http
            .send_small_direct(&url, &headers)
            .map_err(|e| Failure::of_transport(e, "token request"))?;
        if resp.status != 200 {
            return Err(match resp.status {
                401 | 403 => Failure::Fatal(Error::backend(
                    BackendErrorKind::Auth,
                    format!(
                        "token realm refused the credentials (status {})",
                        resp.status
                    ),
                )),
                _ => classify(&resp, "token request"),
            });
        }
        let v: serde_json::Value = serde_json::from_slice(&resp.body)
            .map_err(|e| Failure::retry(format!("token response is not JSON: {e}")))?;
        let token = v
            .get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Failure::retry("token response without a token"))?;
        // It goes into every request's Authorization header: a line break there would add headers of the
        // realm's choosing (or a second request through a forward proxy). Tokens are visible ASCII.
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Failure::Fatal(Error::backend(
                BackendErrorKind::Protocol,
                "token response: the token holds characters a header cannot carry",
            )));
        }
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
}

/// `Bearer realm="x",service="y",scope="a:b:pull"` → ("Bearer", {realm: x, ...}).
pub fn parse_challenge(v: &str) -> (String, HashMap<String, String>) {
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
