//! What a failed attempt means for a read (retry, maybe after the server's `Retry-After`, or fail now)
//! and the backoff between attempts: the same status classes for every backend, and bounded pauses.

use std::time::Duration;

use super::transport::{Response, TransportError, TransportErrorKind};
use super::HttpClient;
use crate::error::{BackendErrorKind, Error};

/// Longest pause a server's `Retry-After` may impose on one retry: reads stay bounded in time.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);

/// What a failed attempt means for the read.
#[derive(Debug)]
pub enum Failure {
    /// Worth another attempt (transport error, 5xx, 429, short body), maybe after `after`.
    Retry {
        why: String,
        after: Option<Duration>,
        /// The server did not answer (a transport error, or a head and then no body byte within the
        /// timeout), or answered that it cannot now (408, 429, 5xx); else it answered with something
        /// other than the data (a body cut short or stalled after its first bytes, a range that does not
        /// match): only the first says the blob is not being served (`image::failures`).
        no_answer: bool,
    },
    /// Retrying cannot help (404, 403, bad config): fail the read now.
    Fatal(Error),
}

impl Failure {
    /// An answer that is not the data asked for.
    pub fn retry(why: impl Into<String>) -> Self {
        Failure::Retry {
            why: why.into(),
            after: None,
            no_answer: false,
        }
    }

    /// No answer: worth a retry.
    pub fn no_answer(why: impl Into<String>) -> Self {
        Failure::Retry {
            why: why.into(),
            after: None,
            no_answer: true,
        }
    }

    /// A request that got no answer (its message starting with `who`): worth a retry, unless a server
    /// sent us where it may not (`guard`), which no retry changes. (An exchange a plain forward proxy
    /// broke counts as no answer too: its errors do not tell a dead proxy from a wrong range.)
    pub fn of_transport(e: TransportError, who: &str) -> Self {
        match e.kind {
            TransportErrorKind::Refused => Failure::Fatal(Error::backend(
                BackendErrorKind::Protocol,
                format!("{who}: {e}"),
            )),
            _ => Failure::no_answer(format!("{who}: {e}")),
        }
    }
}

/// `Retry-After` in seconds (the HTTP-date form is treated as "soon").
fn retry_after(resp: &Response) -> Option<Duration> {
    let v = resp.header("retry-after")?;
    let d = v
        .trim()
        .parse::<u64>()
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1));
    Some(d.min(MAX_RETRY_AFTER))
}

/// Status classes shared by all backends, for a response that is not what was asked for.
pub fn classify(resp: &Response, what: &str) -> Failure {
    match resp.status {
        408 | 429 | 500..=599 => Failure::Retry {
            why: format!("{what}: status {}", resp.status),
            after: retry_after(resp),
            no_answer: true,
        },
        s => Failure::Fatal(Error::backend(
            BackendErrorKind::Status(s),
            format!("{what}: status {s}"),
        )),
    }
}

impl HttpClient {
    /// Backoff before retry `n` (1-based): 100 ms doubling, at most 2 s.
    pub(super) fn backoff(n: u32) -> Duration {
        Duration::from_millis(100u64 << n.min(5).saturating_sub(1)).min(Duration::from_secs(2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_statuses_are_typed_backend_errors() {
        let resp = |status| Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            body_error: None,
            body_stalled: false,
            live: None,
        };
        match classify(&resp(404), "blob x") {
            Failure::Fatal(Error::Backend(b)) => {
                assert_eq!(b.kind, BackendErrorKind::Status(404));
                assert_eq!(b.message, "blob x: status 404");
            }
            other => panic!("{other:?}"),
        }
        for status in [408, 429, 503] {
            assert!(matches!(
                classify(&resp(status), "b"),
                Failure::Retry {
                    no_answer: true,
                    ..
                }
            ));
        }
        // A body cut short is an answer, if not the data (a blob that answers is not "failing").
        assert!(matches!(
            Failure::retry("body failed"),
            Failure::Retry {
                no_answer: false,
                ..
            }
        ));
        let e = Error::backend(BackendErrorKind::Unavailable, "gone");
        assert_eq!((e.errno(), e.to_string()), (libc::EIO, "gone".to_string()));
    }

    #[test]
    fn backoff_is_bounded() {
        assert_eq!(HttpClient::backoff(1), Duration::from_millis(100));
        assert_eq!(HttpClient::backoff(2), Duration::from_millis(200));
        assert!(HttpClient::backoff(30) <= Duration::from_secs(2));
    }
}
