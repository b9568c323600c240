//! Data requests of a blob that found no answer, remembered per blob: after one fails for want of an
//! answer (unreachable, timed out, 5xx or 429 after every retry), reads of that blob get the same error at
//! once for [`FAILED_LOAD_RETRY_AFTER`]; then one request at a time tries again until one is answered,
//! the others waiting for its outcome until [`RETRY_WAIT`] after it started (a registry back up
//! answers within it) and else getting the error. A registry that is down, or that sends no answer,
//! then gets one request per blob at a time, each bounded by the backend's timeout and retries, instead
//! of one per read waiting in line for it, and the image's own readers fail within a second, not in a
//! round of timeouts each. A head followed by no body byte within the timeout counts as no answer; an
//! answer that is not the data (a body cut short, or stalled after its first bytes) is not remembered.
//! Per image: another image's failing backend never fails this one's reads of the same blob.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::chunk_info::FAILED_LOAD_RETRY_AFTER;
use crate::error::{BackendErrorKind, Error, Result};

/// How long a request waits for another one trying a failed blob again before it gets the error.
pub const RETRY_WAIT: Duration = Duration::from_secs(1);

/// One slot per blob of an image.
pub(super) struct BlobFailures {
    blobs: Vec<Slot>,
}

#[derive(Default)]
struct Slot {
    health: Mutex<Health>,
    /// A retry ended.
    retried: Condvar,
}

#[derive(Default)]
enum Health {
    #[default]
    Answering,
    Failed {
        at: Instant,
        error: Error,
        /// When a request started trying the blob again, if one does: the others wait for it until
        /// [`RETRY_WAIT`] after that, then get the error.
        retry_since: Option<Instant>,
    },
}

/// A request let through: reports its outcome (a panic while it runs counts as none, and lets the next
/// request try).
pub(super) struct Attempt<'a> {
    slot: Option<&'a Slot>,
    retry: bool,
}

impl BlobFailures {
    pub fn new(blobs: usize) -> Self {
        BlobFailures {
            blobs: (0..blobs).map(|_| Slot::default()).collect(),
        }
    }

    /// Run `request` (a data request of blob `index` to the backend) unless a remembered failure
    /// answers it first.
    pub fn request<T>(&self, index: u32, request: impl FnOnce() -> Result<T>) -> Result<T> {
        let attempt = self.admit(index, Instant::now(), RETRY_WAIT)?;
        let result = request();
        attempt.finish(result.as_ref().err(), Instant::now());
        result
    }

    /// Whether blob `index`'s last data request found no answer (its requests may fail at once).
    pub fn is_failing(&self, index: u32) -> bool {
        self.blobs.get(index as usize).is_some_and(|slot| {
            matches!(
                *slot.health.lock().unwrap_or_else(|e| e.into_inner()),
                Health::Failed { .. }
            )
        })
    }

    /// When a request of blob `index` may go to the backend without failing at once (None: now): the
    /// end of the pause after a failure, or a moment later while another request tries again.
    pub fn retry_at(&self, index: u32) -> Option<Instant> {
        let slot = self.blobs.get(index as usize)?;
        match &*slot.health.lock().unwrap_or_else(|e| e.into_inner()) {
            Health::Answering => None,
            Health::Failed {
                retry_since: Some(_),
                ..
            } => Some(Instant::now() + Duration::from_millis(100)),
            Health::Failed { at, .. } => {
                Some(*at + FAILED_LOAD_RETRY_AFTER).filter(|t| *t > Instant::now())
            }
        }
    }

    /// Whether a request of blob `index` may go to the backend at `now`, waiting for a retry in flight up
    /// to `wait` after it started: the remembered error if not.
    fn admit(&self, index: u32, now: Instant, wait: Duration) -> Result<Attempt<'_>> {
        let Some(slot) = self.blobs.get(index as usize) else {
            return Ok(Attempt {
                slot: None,
                retry: false,
            });
        };
        let mut health = slot.health.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let retry = match &mut *health {
                Health::Answering => false,
                Health::Failed {
                    error,
                    retry_since: Some(since),
                    ..
                } => {
                    let left = (*since + wait).saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(error.replay());
                    }
                    health = (slot.retried.wait_timeout(health, left))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    continue;
                }
                Health::Failed {
                    at,
                    error,
                    retry_since,
                } => {
                    if now.saturating_duration_since(*at) < FAILED_LOAD_RETRY_AFTER {
                        return Err(error.replay());
                    }
                    *retry_since = Some(Instant::now());
                    true
                }
            };
            return Ok(Attempt {
                slot: Some(slot),
                retry,
            });
        }
    }
}

impl Attempt<'_> {
    /// The request ended at `now` with `error` (None: answered). Only a backend that did not answer is
    /// remembered; any other outcome (data, a 404, an answer that is not the data) shows the blob is
    /// served. A request that started before a retry does not end it: only the retry does.
    fn finish(mut self, error: Option<&Error>, now: Instant) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        let mut health = slot.health.lock().unwrap_or_else(|e| e.into_inner());
        let retry_since = match (&*health, self.retry) {
            (Health::Failed { retry_since, .. }, false) => *retry_since,
            _ => None,
        };
        *health = match error {
            Some(e @ Error::Backend(b)) if b.kind == BackendErrorKind::Unavailable => {
                Health::Failed {
                    at: now,
                    error: e.replay(),
                    retry_since,
                }
            }
            _ if retry_since.is_some() => return, // the retry in flight decides
            _ => Health::Answering,
        };
        drop(health);
        slot.retried.notify_all();
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        // Unwound without an outcome: the next request tries again.
        if let (Some(slot), true) = (self.slot, self.retry) {
            let mut health = slot.health.lock().unwrap_or_else(|e| e.into_inner());
            if let Health::Failed { retry_since, .. } = &mut *health {
                *retry_since = None;
            }
            drop(health);
            slot.retried.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn down() -> Error {
        Error::backend(BackendErrorKind::Unavailable, "blob b: timed out")
    }

    /// A request of blob `index` let through at `at` ended then with `error` (None: answered).
    fn ended(f: &BlobFailures, index: u32, at: Instant, error: Option<&Error>) {
        f.admit(index, at, Duration::ZERO)
            .unwrap()
            .finish(error, at);
    }

    #[test]
    fn a_blob_that_did_not_answer_fails_at_once_then_one_request_tries_again() {
        let f = BlobFailures::new(2);
        let t0 = Instant::now();
        ended(&f, 0, t0, Some(&down()));
        let later = t0 + Duration::from_secs(1);
        let err = f.admit(0, later, Duration::ZERO).err().expect("remembered");
        assert_eq!(err.to_string(), "blob b: timed out");
        // Blob 1 is not blob 0.
        ended(&f, 1, later, None);
        // After the pause one request goes; the others get the error when they may not wait for it.
        let after = t0 + FAILED_LOAD_RETRY_AFTER;
        let retry = f.admit(0, after, Duration::ZERO).unwrap();
        assert!(
            f.admit(0, after, Duration::ZERO).is_err(),
            "a second request went too"
        );
        retry.finish(None, after);
        ended(&f, 0, after, None);
    }

    #[test]
    fn only_the_retry_ends_a_retry_and_its_waiters_wait_from_its_start() {
        let f = BlobFailures::new(1);
        let t0 = Instant::now();
        let older = f.admit(0, t0, Duration::ZERO).unwrap();
        ended(&f, 0, t0, Some(&down()));
        let after = t0 + FAILED_LOAD_RETRY_AFTER;
        let retry = f.admit(0, after, Duration::ZERO).unwrap();
        // A request admitted before the failure ends: the retry goes on, and no second one starts.
        older.finish(None, after);
        assert!(f.admit(0, after, Duration::ZERO).is_err(), "a second retry");
        // A request coming `wait` after the retry started gets the error at once.
        let wait = Duration::from_secs(2);
        std::thread::sleep(wait + Duration::from_millis(100));
        let asked = Instant::now();
        assert!(f.admit(0, after, wait).is_err());
        assert!(asked.elapsed() < Duration::from_secs(1), "it waited anew");
        retry.finish(None, after);
        assert!(f.admit(0, after, Duration::ZERO).is_ok());
    }

    #[test]
    fn requests_waiting_for_a_retry_follow_its_outcome() {
        let f = BlobFailures::new(1);
        let t0 = Instant::now();
        ended(&f, 0, t0, Some(&down()));
        let mut at = t0;
        for answered in [true, false] {
            at += FAILED_LOAD_RETRY_AFTER;
            let retry = f.admit(0, at, Duration::ZERO).unwrap();
            std::thread::scope(|s| {
                let waiter = s.spawn(|| f.admit(0, at, Duration::from_secs(30)).map(|_| ()));
                std::thread::sleep(Duration::from_millis(50));
                assert!(!waiter.is_finished(), "it did not wait for the retry");
                match answered {
                    true => retry.finish(None, at),
                    false => retry.finish(Some(&down()), at),
                }
                assert_eq!(waiter.join().unwrap().is_ok(), answered);
            });
            if answered {
                ended(&f, 0, at, Some(&down()));
            }
        }
    }

    #[test]
    fn only_a_backend_that_did_not_answer_is_remembered() {
        let f = BlobFailures::new(1);
        let t0 = Instant::now();
        for answered in [
            Error::backend(BackendErrorKind::Status(404), "404"),
            Error::backend(BackendErrorKind::Auth, "401"),
            Error::backend(BackendErrorKind::Broken, "body cut short"),
            Error::Integrity("digest".into()),
        ] {
            ended(&f, 0, t0, Some(&answered));
            assert!(
                f.admit(0, t0, Duration::ZERO).is_ok(),
                "{answered} was remembered"
            );
        }
        // A failed retry starts the pause again; one that unwinds lets the next request try.
        ended(&f, 0, t0, Some(&down()));
        let after = t0 + FAILED_LOAD_RETRY_AFTER;
        ended(&f, 0, after, Some(&down()));
        let err = f.admit(0, after + Duration::from_secs(1), Duration::ZERO);
        assert!(err.is_err());
        let again = after + FAILED_LOAD_RETRY_AFTER;
        drop(f.admit(0, again, Duration::ZERO).unwrap());
        assert!(
            f.admit(0, again, Duration::ZERO).is_ok(),
            "an unwound retry blocked the blob"
        );
        // Out-of-range blob indexes are not this module's to refuse.
        assert!(f.admit(7, t0, Duration::ZERO).is_ok());
    }
}
