//! One error type for the whole daemon. Parsers never panic on bad input: they return `Corrupt` with a
//! sentence naming what is wrong, so a user can tell a broken image from a broken daemon.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error, with what we were doing when it happened.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The image (bootstrap, blob, blob meta) violates the format.
    #[error("corrupt image: {0}")]
    Corrupt(String),
    /// A valid image that uses a feature this build does not implement.
    #[error("unsupported image feature: {0}")]
    Unsupported(String),
    /// Chunk data failed its digest, CRC or size check.
    #[error("integrity check failed: {0}")]
    Integrity(String),
    /// A request or argument that cannot be served (bad config value, missing file, bad blob id...).
    #[error("{0}")]
    Invalid(String),
    /// The named inode, entry or attribute does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// Refused by the sandbox: a path outside the allowed ones, or the network where there is none.
    #[error("{0}")]
    Forbidden(String),
    /// The place is taken: a mountpoint already mounted, or one that would overlap another mount.
    #[error("{0}")]
    Conflict(String),
    /// A storage backend could not deliver (network, server, credentials): EIO to readers.
    #[error("{0}")]
    Backend(BackendError),
    /// The daemon itself failed (a thread or channel gone, a library refusing what we checked before):
    /// not the caller's input.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A storage backend's failure: what went wrong, for callers that branch on it, and the sentence for
/// people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    pub kind: BackendErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendErrorKind {
    /// Unreachable or failing after every retry (transport errors, timeouts before an answer, 5xx, 429).
    Unavailable,
    /// Answers that were not the data asked for, after every retry (a body cut short or timed out, a
    /// range or length that does not match).
    Broken,
    /// A final answer that is not the data (404, 400, a redirect without a target, ...): the status.
    Status(u16),
    /// Credentials missing or refused (401/403 from a registry or its token realm).
    Auth,
    /// An answer that breaks the protocol (an unsupported challenge, a malformed redirect).
    Protocol,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A backend failure of `kind`, described by `message`.
    pub fn backend(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        Error::Backend(BackendError {
            kind,
            message: message.into(),
        })
    }

    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The same error again (a remembered failure handed to a later caller): same variant and message.
    pub fn replay(&self) -> Error {
        match self {
            Error::Io { context, source } => Error::Io {
                context: context.clone(),
                source: match source.raw_os_error() {
                    Some(errno) => io::Error::from_raw_os_error(errno),
                    None => io::Error::new(source.kind(), source.to_string()),
                },
            },
            Error::Corrupt(m) => Error::Corrupt(m.clone()),
            Error::Unsupported(m) => Error::Unsupported(m.clone()),
            Error::Integrity(m) => Error::Integrity(m.clone()),
            Error::Invalid(m) => Error::Invalid(m.clone()),
            Error::NotFound(m) => Error::NotFound(m.clone()),
            Error::Forbidden(m) => Error::Forbidden(m.clone()),
            Error::Conflict(m) => Error::Conflict(m.clone()),
            Error::Backend(b) => Error::Backend(b.clone()),
            Error::Internal(m) => Error::Internal(m.clone()),
        }
    }

    /// The errno a filesystem front end answers with. Damaged or unverifiable data is EIO, never bytes.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Corrupt(_) | Error::Integrity(_) => libc::EIO,
            Error::Unsupported(_) => libc::EOPNOTSUPP,
            Error::Invalid(_) => libc::EINVAL,
            Error::NotFound(_) => libc::ENOENT,
            Error::Forbidden(_) => libc::EACCES,
            Error::Conflict(_) => libc::EEXIST,
            Error::Backend(_) | Error::Internal(_) => libc::EIO,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        let errno = e.errno();
        io::Error::new(io::Error::from_raw_os_error(errno).kind(), e)
    }
}

/// Shorthand for `Err(Error::Corrupt(format!(...)))`.
#[macro_export]
macro_rules! corrupt {
    ($($arg:tt)*) => { $crate::error::Error::Corrupt(format!($($arg)*)) };
}
