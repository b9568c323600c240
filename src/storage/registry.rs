//! The `registry` backend: blobs of an OCI distribution repository, `GET /v2/<repo>/blobs/sha256:<id>` with
//! ranges.
//!
//! Auth follows the distribution token protocol ([`super::registry_auth`]), with `auth` as the
//! credentials and `registry_token` as a token to start with.
//!
//! Redirects (blob storage behind the registry) are followed by hand: the `Location` is rewritten with
//! `blob_url_scheme` / `blob_redirected_host`, fetched **without** the registry's Authorization, and
//! remembered per blob; a 401/403 from the remembered URL (expired pre-signed URL) forgets it.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine;

use super::http::{BlobRange, Failure, HttpClient, Remote, Request, Response};
use super::registry_auth::RegistryAuth;
use crate::config::RegistryConfig;
use crate::error::{BackendErrorKind, Error, Result};

pub struct Registry {
    base: String,
    repo: String,
    pub auth: RegistryAuth,
    blob_url_scheme: Option<String>,
    blob_redirected_host: Option<String>,
    redirects: Mutex<HashMap<String, String>>,
}

impl Registry {
    pub fn new(c: &RegistryConfig) -> Result<Self> {
        let scheme = match c.scheme.as_deref() {
            Some("http") => "http",
            _ => "https",
        };
        let given = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
        // IMAGE_PULL_AUTH overrides the file, as with nydusd.
        let auth = std::env::var("IMAGE_PULL_AUTH")
            .ok()
            .filter(|s| !s.is_empty())
            .or(given(&c.auth));
        if let Some(a) = &auth {
            check_auth(a)?;
        }
        Ok(Registry {
            base: format!("{scheme}://{}", c.host),
            repo: c.repo.clone(),
            auth: RegistryAuth::new(auth, given(&c.registry_token)),
            blob_url_scheme: given(&c.blob_url_scheme),
            blob_redirected_host: given(&c.blob_redirected_host),
            redirects: Mutex::new(HashMap::new()),
        })
    }

    fn blob_url(&self, blob_id: &str) -> String {
        format!("{}/v2/{}/blobs/sha256:{blob_id}", self.base, self.repo)
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
        range: Option<BlobRange>,
    ) -> std::result::Result<Response, Failure> {
        // A redirected storage URL belongs to that one host: no mirror serves it. The registry chose it,
        // so it may not lead to a metadata service, unless the config names the host
        // (`blob_redirected_host`: the user's choice).
        let req = Request {
            mirrorable: false,
            server_chosen: self.blob_redirected_host.is_none(),
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

    fn origin(&self) -> Option<&str> {
        Some(&self.base)
    }

    /// New credentials for the next request or token fetch (see [`RegistryAuth::set_credentials`]).
    fn set_registry_auth(&self, auth: Option<&str>) -> Result<()> {
        let auth = auth.map(str::trim).filter(|a| !a.is_empty());
        if let Some(a) = auth {
            check_auth(a)?;
        }
        self.auth.set_credentials(auth);
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
        range: Option<BlobRange>,
    ) -> std::result::Result<Response, Failure> {
        let cached = self
            .redirects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(blob_id)
            .cloned();
        if let Some(url) = cached {
            // A storage URL that answers anything but data (an expired pre-signed URL, a host gone down,
            // a refusal, a body that stalled or broke) is forgotten: the registry is asked again.
            match self.get_storage(http, &url, range) {
                Ok(resp) if matches!(resp.status, 200 | 206) && resp.body_error.is_none() => {
                    return Ok(resp)
                }
                _ => {
                    self.redirects
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(blob_id);
                }
            }
        }
        let url = self.blob_url(blob_id);
        let mut sent = self.auth.current_header(http);
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
                let challenge = resp.header("www-authenticate").unwrap_or("");
                sent = Some(self.auth.reauthorize(http, sent.as_deref(), challenge)?);
                continue;
            }
            if resp.status == 401 {
                return Err(Failure::Fatal(Error::backend(
                    BackendErrorKind::Auth,
                    "registry refused the credentials (401 after a fresh token)",
                )));
            }
            if is_redirect(resp.status) {
                let location = resp.header("location").ok_or_else(|| {
                    Failure::retry(format!("redirect {} without a Location", resp.status))
                })?;
                let target = self.redirect_target(location);
                // Remembered once it answered with data: a target refused, unreachable or failing is
                // asked for again.
                let resp = self.get_storage(http, &target, range)?;
                if matches!(resp.status, 200 | 206) && resp.body_error.is_none() {
                    self.redirects
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(blob_id.to_string(), target);
                }
                return Ok(resp);
            }
            return Ok(resp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::registry_auth::parse_challenge;
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
        let r = Registry::new(&RegistryConfig {
            host: "reg:5000".into(),
            repo: "a/b".into(),
            scheme: Some("http".into()),
            blob_url_scheme: Some("http".into()),
            blob_redirected_host: Some("127.0.0.1:9".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            r.redirect_target("https://s3.example/bucket/x?sig=1"),
            "http://127.0.0.1:9/bucket/x?sig=1"
        );
        assert_eq!(r.blob_url("ab"), "http://reg:5000/v2/a/b/blobs/sha256:ab");
    }

    #[test]
    fn bad_auth_is_refused() {
        assert!(Registry::new(&RegistryConfig {
            host: "h".into(),
            repo: "r".into(),
            auth: Some("bm9jb2xvbg==".into()),
            ..Default::default()
        })
        .is_err());
    }
}
