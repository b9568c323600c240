//! The daemon's ring buffer of backend errors (`GET /api/v1/daemon/events`): reads that failed for good,
//! newest last, bounded in count and bytes like nydusd's.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

pub const MAX_ERRORS: usize = 500;
pub const MAX_SIZE: usize = 51200;

struct Ring {
    errors: VecDeque<String>,
    size: usize,
    total_errors: u64,
    total_size: u64,
}

static RING: Mutex<Ring> = Mutex::new(Ring {
    errors: VecDeque::new(),
    size: 0,
    total_errors: 0,
    total_size: 0,
});

/// Remember one failure as `<HTTP-date> - <msg>` (URL credentials in `msg` are masked).
pub fn record(msg: &str) {
    let line = format!(
        "{} - {}",
        super::object_store::http_date(SystemTime::now()),
        crate::redact::text(msg)
    );
    let mut r = RING.lock().unwrap_or_else(|e| e.into_inner());
    r.total_errors += 1;
    r.total_size += line.len() as u64;
    r.size += line.len();
    r.errors.push_back(line);
    while r.errors.len() > MAX_ERRORS || (r.size > MAX_SIZE && r.errors.len() > 1) {
        if let Some(old) = r.errors.pop_front() {
            r.size -= old.len();
        }
    }
}

/// The API's JSON view.
pub fn snapshot() -> serde_json::Value {
    let r = RING.lock().unwrap_or_else(|e| e.into_inner());
    serde_json::json!({
        "max_errors": MAX_ERRORS,
        "total_errors": r.total_errors,
        "max_size": MAX_SIZE,
        "total_size": r.total_size,
        "errors": r.errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_is_bounded() {
        for i in 0..600 {
            record(&format!("failure {i}"));
        }
        let v = snapshot();
        let errors = v["errors"].as_array().unwrap();
        assert!(errors.len() <= MAX_ERRORS);
        assert!(errors
            .last()
            .unwrap()
            .as_str()
            .unwrap()
            .ends_with(" - failure 599"));
        assert!(v["total_errors"].as_u64().unwrap() >= 600);
    }
}
