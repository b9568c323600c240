//! The transport settings every network backend shares, from its config block: nydusd's names and
//! defaults, with the bounds the client relies on (retry count, intervals of at least a second).

use std::time::Duration;

use crate::config::HttpConfig;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Result;

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
}
