//! Keeping credentials out of everything the daemon says: API answers (`GET /daemon`, error messages,
//! `/daemon/events`), log lines and command-line errors.
//!
//! Two kinds of secrets reach the daemon in configs: values of credential keys (`auth`, keys, tokens,
//! mirror headers), blanked wherever a config is shown; and the userinfo of URLs
//! (`http://user:password@proxy:3128`), replaced by `***` in any text or JSON string on its way out.

use std::borrow::Cow;

use serde_json::{json, Value};

/// Keys whose values are credentials: never echoed or logged.
const SECRET_KEYS: &[&str] = &[
    "auth",
    "registry_token",
    "access_key_id",
    "access_key_secret",
    "password",
    "token",
    "encryption_key",
    // Mirror headers of network backends often carry credentials of their own.
    "headers",
];

/// A config as it may be shown: credential keys blanked, URL userinfo masked in every string.
pub fn json(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        if SECRET_KEYS.contains(&k.as_str()) && !v.is_null() {
                            json!("")
                        } else {
                            json(v)
                        },
                    )
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(json).collect()),
        Value::String(s) => Value::String(text(s).into_owned()),
        other => other.clone(),
    }
}

/// Characters that end a URL in running text: RFC 3986 allows none of them unescaped (a `'` or `@` in a
/// password is allowed, so neither ends it).
fn ends_url(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '<' | '>' | '`' | '{' | '}' | '|' | '\\' | '^')
}

/// `text` with the userinfo of every `scheme://userinfo@host` replaced by `***`. Everything up to the
/// last `@` of the URL counts as userinfo, so a password holding `@`, `/` or `?` is masked whole.
pub fn text(s: &str) -> Cow<'_, str> {
    if !s.contains("://") || !s.contains('@') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail.find(ends_url).unwrap_or(tail.len());
        let url = &tail[..end];
        match url.rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&url[at..]);
            }
            None => out.push_str(url),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// env_logger's line format (`[LEVEL target] message`) with [`text`] applied to the message, so no log
/// line carries URL credentials whatever module wrote it.
pub fn log_format(
    buf: &mut env_logger::fmt::Formatter,
    record: &log::Record,
) -> std::io::Result<()> {
    use std::io::Write;
    let message = record.args().to_string();
    writeln!(
        buf,
        "[{} {:<5} {}] {}",
        buf.timestamp_millis(),
        record.level(),
        record.target(),
        text(&message)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_userinfo_is_masked_in_text() {
        for (raw, shown) in [
            ("http://u:pw@proxy:3128", "http://***@proxy:3128"),
            (
                "proxy url \"http://u:p@ss/w?rd@p:1/x\": invalid",
                "proxy url \"http://***@p:1/x\": invalid",
            ),
            (
                "a http://tok@h/ and https://x:y@h2 b",
                "a http://***@h/ and https://***@h2 b",
            ),
            ("http://u:it's@h", "http://***@h"),
            ("no url user@host here", "no url user@host here"),
            ("http://host/path", "http://host/path"),
        ] {
            assert_eq!(text(raw), shown, "{raw}");
        }
    }

    #[test]
    fn configs_lose_credential_keys_and_url_userinfo() {
        let c = serde_json::json!({
            "backend": {"type": "registry", "config": {
                "auth": "dXNlcjpwdw==", "host": "r:5000",
                "proxy": {"url": "http://user:hunter2@p:3128", "fallback": true},
                "mirrors": [{"host": "https://m:tok@mirror", "headers": {"X-Auth": "t"}}]
            }}
        });
        let shown = json(&c).to_string();
        for secret in ["dXNlcjpwdw==", "hunter2", "user:", "m:tok", "X-Auth"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("http://***@p:3128"), "{shown}");
    }
}
