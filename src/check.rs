//! `rafsd check`: walk the whole tree, read every file through the verified data path, and report.

use std::path::Path;

use crate::error::{Error, Result};
use crate::image::{RafsImage, WalkEvent};

#[derive(Debug, Default, Clone)]
pub struct CheckReport {
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
    /// One line per problem, naming the path.
    pub errors: Vec<String>,
}

/// Read every regular file once (hard links once) and every symlink and xattr. Stops after
/// `max_errors` problems so a badly broken image still finishes quickly.
pub fn check(image: &RafsImage, max_errors: usize) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let mut seen = std::collections::HashSet::new();
    let mut buf = vec![0u8; 1 << 20];
    let walked = image.walk(&mut |rel, attr, event| {
        if event == WalkEvent::DirDone {
            return Ok(());
        }
        report.entries += 1;
        let shown = if rel.as_os_str().is_empty() { Path::new("/") } else { rel };
        let mut problem = |e: Error| -> Result<()> {
            report.errors.push(format!("{}: {e}", shown.display()));
            if report.errors.len() >= max_errors {
                return Err(Error::Invalid(format!("stopped after {max_errors} errors")));
            }
            Ok(())
        };
        if let Err(e) = image.xattrs(attr.ino) {
            problem(e)?;
        }
        if attr.is_symlink() {
            if let Err(e) = image.readlink(attr.ino) {
                problem(e)?;
            }
        }
        if attr.is_reg() && seen.insert(attr.ino) {
            let mut offset = 0;
            while offset < attr.size {
                match image.read(attr.ino, offset, &mut buf) {
                    Ok(0) => {
                        problem(Error::Corrupt(format!("data ends at {offset} of {}", attr.size)))?;
                        break;
                    }
                    Ok(n) => offset += n as u64,
                    Err(e) => {
                        problem(e)?;
                        break;
                    }
                }
            }
            report.files += 1;
            report.bytes += offset;
        }
        Ok(())
    });
    if let Err(e) = walked {
        report.errors.push(format!("walk: {e}"));
    }
    Ok(report)
}
