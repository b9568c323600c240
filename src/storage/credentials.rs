//! Registry credentials for the push/pull client: `IMAGE_PULL_AUTH` (base64 `user:pass`, as nydusd
//! reads it), else the `auths` of Docker's `config.json` (`$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`). Credential helpers (`credsStore`, `credHelpers`) are not run: a registry
//! that only has one gets a warning and no credentials.

use std::path::PathBuf;

use base64::Engine;

use crate::error::{Error, Result};

/// Docker Hub's names in `config.json` besides the host of its API.
const DOCKER_HUB_KEYS: [&str; 3] = [
    "https://index.docker.io/v1/",
    "index.docker.io",
    "docker.io",
];

/// The docker config file to read, if any.
fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// `https://host:port/v1/` → `host:port`, the form keys are compared in.
fn normalize(key: &str) -> &str {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    key.split('/').next().unwrap_or(key)
}

/// Check that `auth` is base64 of `user:password`.
pub fn check_basic(auth: &str, what: &str) -> Result<()> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| Error::Invalid(format!("{what}: the credentials are not base64")))?;
    if !raw.contains(&b':') {
        return Err(Error::Invalid(format!(
            "{what}: the credentials must encode user:password"
        )));
    }
    Ok(())
}

/// Credentials (base64 `user:pass`) for `registry` (the host of an image reference, `docker.io` for
/// Docker Hub).
pub fn lookup(registry: &str) -> Result<Option<String>> {
    if let Ok(auth) = std::env::var("IMAGE_PULL_AUTH") {
        if !auth.is_empty() {
            check_basic(&auth, "IMAGE_PULL_AUTH")?;
            return Ok(Some(auth.trim().to_string()));
        }
    }
    let Some(path) = docker_config_path() else {
        return Ok(None);
    };
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
    };
    let config: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Error::Invalid(format!("{}: not JSON: {e}", path.display())))?;
    from_docker_config(&config, registry, &path.display().to_string())
}

fn from_docker_config(
    config: &serde_json::Value,
    registry: &str,
    shown: &str,
) -> Result<Option<String>> {
    let hub = registry == "docker.io";
    let matches = |key: &str| {
        normalize(key) == registry
            || (hub
                && DOCKER_HUB_KEYS
                    .iter()
                    .any(|k| normalize(k) == normalize(key)))
    };
    let auths = config.get("auths").and_then(|a| a.as_object());
    let entry = auths.and_then(|a| a.iter().find(|(k, _)| matches(k)).map(|(_, v)| v));
    if let Some(entry) = entry {
        let field = |name: &str| {
            entry
                .get(name)
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
        };
        if let Some(auth) = field("auth") {
            check_basic(auth, &format!("{shown}: auths entry for {registry}"))?;
            return Ok(Some(auth.to_string()));
        }
        if let (Some(user), Some(pass)) = (field("username"), field("password")) {
            return Ok(Some(
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")),
            ));
        }
        if field("identitytoken").is_some() {
            log::warn!(
                "{shown}: the identity token for {registry} is not supported; no credentials used"
            );
        }
    }
    let helper = config
        .get("credHelpers")
        .and_then(|h| h.as_object())
        .is_some_and(|h| h.keys().any(|k| matches(k)))
        || config
            .get("credsStore")
            .is_some_and(|s| s.as_str().is_some_and(|s| !s.is_empty()));
    if helper && entry.is_none() {
        log::warn!("{shown}: credential helpers are not run; no credentials for {registry}");
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_entries_are_matched_by_host() {
        let c = serde_json::json!({"auths": {
            "https://index.docker.io/v1/": {"auth": "YTpi"},
            "http://127.0.0.1:5000": {"username": "u", "password": "p"},
            "reg.example:443": {"auth": "bm9jb2xvbg=="}
        }});
        assert_eq!(
            from_docker_config(&c, "docker.io", "c").unwrap().as_deref(),
            Some("YTpi")
        );
        assert_eq!(
            from_docker_config(&c, "127.0.0.1:5000", "c")
                .unwrap()
                .as_deref(),
            Some("dTpw")
        );
        assert_eq!(from_docker_config(&c, "other:1", "c").unwrap(), None);
        // An entry that does not encode user:password is an error naming the registry.
        let err = from_docker_config(&c, "reg.example:443", "c")
            .unwrap_err()
            .to_string();
        assert!(err.contains("reg.example:443"), "{err}");
    }
}
