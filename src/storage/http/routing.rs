//! Which route a request takes: healthy mirrors in order, then the proxy, then the origin. A route that
//! fails is marked down and re-probed lazily once its interval has passed (no thread, no traffic while
//! all is well); a proxy's or mirror's answer is checked before it is used.

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::retry::Failure;
use super::transport::{content_range, Request, Response, TransportError, TransportErrorKind};
use super::HttpClient;

/// Up/down state of a proxy or mirror, re-probed lazily: no thread, no traffic while all is well.
pub(super) struct Health {
    failures: u32,
    down_since: Option<Instant>,
}

pub(super) fn now_down() -> Health {
    Health {
        failures: 0,
        down_since: None,
    }
}

impl HttpClient {
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
        // A proxy resolves names itself; a literal address is checked here, whatever the route.
        if let Some(why) = req
            .server_chosen
            .then(|| super::guard::refused_literal(req.url, &self.origin))
            .flatten()
        {
            return Err(TransportError::new(TransportErrorKind::Refused, why));
        }
        if req.mirrorable {
            if let Some(result) = self.send_via_mirrors(req, limit) {
                return result;
            }
        }
        // Through the proxy a name is resolved by the proxy: it is resolved and checked here first.
        if req.server_chosen && req.proxied && self.settings.proxy.is_some() {
            if let Some(why) = self.proxied_names.refusal(req.url, &self.origin) {
                return Err(TransportError::new(TransportErrorKind::Refused, why));
            }
        }
        if req.proxied {
            if let Some(result) = self.send_via_proxy(req, limit) {
                return result;
            }
        }
        self.send_on(self.direct_for(req), req, req.url, &[], false, limit)
    }

    /// The answer of the first healthy mirror that gave a usable one; `None` sends the request on.
    fn send_via_mirrors(
        &self,
        req: &Request,
        limit: u64,
    ) -> Option<std::result::Result<Response, TransportError>> {
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
            // A mirror not given the registry's credentials that asks for some is not a realm to log
            // in to (they would go to the token endpoint it names): the next route serves the request.
            let fault = Self::route_fault(req, &result).or_else(|| match &result {
                Ok(r) if !m.auth_through && matches!(r.status, 401 | 403) => Some(format!(
                    "status {} (the registry's credentials are not its)",
                    r.status
                )),
                _ => None,
            });
            match fault {
                None => {
                    self.mark(health, true, m.failure_limit, "mirror");
                    return Some(result);
                }
                Some(why) => {
                    log::warn!("mirror {}: {why}", m.host);
                    self.mark(health, false, m.failure_limit, "mirror");
                }
            }
        }
        None
    }

    /// The proxy's answer, when there is a healthy proxy and its answer is final; `None` sends the
    /// request direct (no proxy, a proxy down, or a failure or 429 with `fallback`).
    fn send_via_proxy(
        &self,
        req: &Request,
        limit: u64,
    ) -> Option<std::result::Result<Response, TransportError>> {
        let (Some(p), Some(agent)) = (&self.settings.proxy, &self.via_proxy) else {
            return None;
        };
        if !self.usable(&self.proxy_health, p.check_interval, p.ping_url.as_deref()) {
            return None;
        }
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
            Ok(r) if r.header("x-dragonfly-error-type") == Some("proxy") => Some(r.status),
            _ => None,
        };
        match (Self::route_fault(req, &result), refused) {
            // The proxy is rate limiting: this request goes direct, the proxy stays in use.
            (None, Some(429)) if p.fallback => {
                log::warn!("proxy is rate limiting (429), this request goes direct");
                None
            }
            // Anything else the proxy refuses (403) is final: no retry storm against it.
            (None, _) => {
                if let Some(status) = refused {
                    log::warn!("proxy refused the request with status {status}");
                }
                self.mark(&self.proxy_health, true, 1, "proxy");
                Some(result)
            }
            (Some(why), _) if !p.fallback => {
                log::warn!("proxy failed ({why}), no fallback configured");
                // A body the proxy broke must not reach the caller as a good answer.
                Some(result.and_then(|r| match r.body_error {
                    Some(_) => Ok(r),
                    None if r.status >= 500 => Ok(r),
                    None => Err(TransportError::new(
                        TransportErrorKind::Proxy,
                        format!("proxy: {why}"),
                    )),
                }))
            }
            (Some(why), _) => {
                log::warn!("proxy failed ({why}), falling back to direct");
                // One failure is enough: every read would otherwise pay for the dead proxy first.
                self.mark(&self.proxy_health, false, 1, "proxy");
                None
            }
        }
    }

    /// Send a blob request, reading no more body than its range asks for; a transport failure is worth a
    /// retry and its message starts with `who`.
    pub fn send_blob(&self, req: &Request, who: &str) -> std::result::Result<Response, Failure> {
        self.send(req, req.range.map_or(0, |(a, b)| b - a + 1))
            .map_err(|e| Failure::of_transport(e, who))
    }
}

/// Replace `scheme://host[:port]` of `url` with `base`.
pub fn rehost(url: &str, base: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let path = rest.find('/').map(|i| &rest[i..]).unwrap_or("/");
    Some(format!("{}{path}", base.trim_end_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rehost_keeps_the_path() {
        assert_eq!(
            rehost("https://reg:5000/v2/a/b/blobs/sha256:x", "http://m:1/"),
            Some("http://m:1/v2/a/b/blobs/sha256:x".into())
        );
    }
}
