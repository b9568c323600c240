//! `rafsd prefetch-list`: turn an access trace into the prefetch list `rafsd build --prefetch-files` takes.
//!
//! The trace is what `/api/v1/metrics/pattern` returns with `access_pattern` on (nydusd's format: one
//! `{"ino", "nr_read", "first_access_time_secs", "first_access_time_nanos"}` per file read). The list is
//! those files as absolute paths inside the image, in the order they were first read, so a rebuilt image
//! lays out the data a start-up needs contiguously and in the order it is needed.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::image::{RafsImage, WalkEvent};

/// One file of an access trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub ino: u64,
    /// First read, as (seconds, nanoseconds) since the epoch.
    pub first_read: (u64, u64),
}

/// Parse `/api/v1/metrics/pattern` output.
pub fn parse_pattern(json: &[u8]) -> Result<Vec<Access>> {
    let v: Value = serde_json::from_slice(json)
        .map_err(|e| Error::Invalid(format!("access trace is not JSON: {e}")))?;
    let list = v
        .as_array()
        .ok_or_else(|| Error::Invalid("access trace: expected a JSON array".into()))?;
    list.iter()
        .enumerate()
        .map(|(i, entry)| {
            let field = |key: &str| {
                entry[key].as_u64().ok_or_else(|| {
                    Error::Invalid(format!(
                        "access trace entry {i}: `{key}` must be a non-negative integer"
                    ))
                })
            };
            Ok(Access {
                ino: field("ino")?,
                first_read: (
                    field("first_access_time_secs")?,
                    field("first_access_time_nanos").unwrap_or(0),
                ),
            })
        })
        .collect()
}

/// What a trace turned into: the list, and the trace's inodes that are no regular file of the image (a
/// trace of another image, or of another build of it).
pub struct PrefetchList {
    pub paths: Vec<Vec<u8>>,
    pub unknown: Vec<u64>,
}

/// The files of `trace`, in first-read order, as absolute paths in `image` (a file with several hard links
/// appears once, under the first path the walk finds). Paths holding a newline cannot be listed one per
/// line and are left out like unknown inodes.
pub fn prefetch_list(image: &RafsImage, trace: &[Access]) -> Result<PrefetchList> {
    let mut order: Vec<Access> = trace.to_vec();
    order.sort_by_key(|a| (a.first_read, a.ino));
    let mut paths: HashMap<u64, Option<Vec<u8>>> = order.iter().map(|a| (a.ino, None)).collect();
    image.walk(&mut |path: &Path, attr, event| {
        if event == WalkEvent::Node && attr.is_reg() {
            if let Some(slot @ None) = paths.get_mut(&attr.ino) {
                let mut abs = b"/".to_vec();
                abs.extend_from_slice(path.as_os_str().as_encoded_bytes());
                *slot = Some(abs);
            }
        }
        Ok(())
    })?;
    let mut out = PrefetchList {
        paths: Vec::new(),
        unknown: Vec::new(),
    };
    for a in order {
        match paths.get_mut(&a.ino).and_then(Option::take) {
            Some(p) if !p.contains(&b'\n') => out.paths.push(p),
            _ => out.unknown.push(a.ino),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_parses_and_names_bad_fields() {
        let t = parse_pattern(
            br#"[{"ino":7,"nr_read":2,"first_access_time_secs":5,"first_access_time_nanos":9},
                 {"ino":3,"nr_read":1,"first_access_time_secs":4,"first_access_time_nanos":0}]"#,
        )
        .unwrap();
        assert_eq!(
            t,
            vec![
                Access {
                    ino: 7,
                    first_read: (5, 9)
                },
                Access {
                    ino: 3,
                    first_read: (4, 0)
                }
            ]
        );
        assert!(parse_pattern(b"[]").unwrap().is_empty());
        let e = parse_pattern(br#"[{"ino":-1,"first_access_time_secs":1}]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("entry 0") && e.contains("`ino`"), "{e}");
        assert!(parse_pattern(b"{}").is_err());
        assert!(parse_pattern(b"not json").is_err());
    }
}
