//! Where the daemon's log goes: stderr, or the file `--log-file` names (created with its folder), which
//! is rotated once it would grow past `--log-rotation-size` MiB: `F` becomes `F.1`, `F.1` becomes `F.2`,
//! and so on, keeping [`KEEP_ROTATED`] old files.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Rotated files kept beside the current one.
pub const KEEP_ROTATED: usize = 5;

/// Warnings and errors of one line of code kept per [`LIMIT_WINDOW`]; the rest are counted and the
/// count said once the window is over. A guest or an image can have the same warning logged at the
/// rate of its requests (a FORGET of an unmounted image's inode, a refused chain, a failed read), and
/// the log, not rotated by default, would grow without bound.
pub const LINES_PER_WINDOW: u32 = 20;
pub const LIMIT_WINDOW: Duration = Duration::from_secs(10);

/// A log file that rotates itself by size. Writes never fail for lack of rotation: if renaming or
/// reopening fails, logging continues in the current file.
///
/// Two processes write it (the daemon and its supervisor, which share the open file after fork), so
/// sizes come from the file, not from a private count, and a writer whose file was rotated away by the
/// other reopens the path.
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    /// Bytes after which the file is rotated; 0 never rotates.
    limit: u64,
    /// The size at which rotation last failed: the next try waits for another `limit` bytes.
    failed_at: Option<u64>,
}

/// nydusd adds ".log" to a log file name without an extension; so do we.
pub fn log_file_path(path: &Path) -> PathBuf {
    if path.extension().is_some() {
        path.to_path_buf()
    } else {
        path.with_extension("log")
    }
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl RotatingFile {
    /// Open (or create, with its folder) `path` for appending; rotate at `limit_mib` MiB (0: never).
    pub fn open(path: &Path, limit_mib: u64) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("create log folder {}", dir.display()), e))?;
        }
        let file = open_append(path)
            .map_err(|e| Error::io(format!("open log file {}", path.display()), e))?;
        Ok(RotatingFile {
            path: path.to_path_buf(),
            file,
            limit: limit_mib.saturating_mul(1 << 20),
            failed_at: None,
        })
    }

    /// The current file's size, after switching to the file at `path` if another writer rotated ours.
    fn current_size(&mut self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let Ok(ours) = self.file.metadata() else {
            return 0;
        };
        if let Ok(at_path) = std::fs::metadata(&self.path) {
            if (at_path.dev(), at_path.ino()) != (ours.dev(), ours.ino()) {
                if let Ok(f) = open_append(&self.path) {
                    self.file = f;
                    return at_path.len();
                }
            }
        }
        ours.len()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        for n in (1..KEEP_ROTATED).rev() {
            let from = rotated(&self.path, n);
            if from.exists() {
                std::fs::rename(&from, rotated(&self.path, n + 1))?;
            }
        }
        std::fs::rename(&self.path, rotated(&self.path, 1))?;
        self.file = open_append(&self.path)?;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.limit > 0 {
            let size = self.current_size();
            let due = self.failed_at.map_or(self.limit, |f| f + self.limit);
            if size > 0 && size + buf.len() as u64 > due {
                self.failed_at = None;
                if let Err(e) = self.rotate() {
                    self.failed_at = Some(size);
                    // Keep logging where we are, saying why the file keeps growing.
                    let _ = writeln!(
                        self.file,
                        "log rotation of {} failed: {e}",
                        self.path.display()
                    );
                }
            }
        }
        self.file.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Install the process logger at `level`, writing to `file` (rotated at `rotation_mib` MiB) or stderr.
pub fn init(level: &str, file: Option<&Path>, rotation_mib: u64) -> Result<()> {
    let mut builder = env_logger::Builder::new();
    // Every line goes through the credential filter (`user:pass@` in URLs is masked).
    builder
        .parse_filters(level)
        .format(crate::redact::log_format);
    if let Some(path) = file {
        builder.target(env_logger::Target::Pipe(Box::new(RotatingFile::open(
            path,
            rotation_mib,
        )?)));
    }
    let logger = builder.build();
    let max = logger.filter();
    log::set_boxed_logger(Box::new(RateLimited::new(logger)))
        .map_err(|e| Error::Invalid(format!("logger: {e}")))?;
    log::set_max_level(max);
    Ok(())
}

/// A logger that keeps at most [`LINES_PER_WINDOW`] warnings and errors per line of code in each
/// [`LIMIT_WINDOW`] (information and debugging lines all pass).
pub struct RateLimited<L> {
    inner: L,
    sites: Mutex<HashMap<(&'static str, u32), Site>>,
}

struct Site {
    since: Instant,
    kept: u32,
    dropped: u64,
}

impl<L: log::Log> RateLimited<L> {
    pub fn new(inner: L) -> Self {
        RateLimited {
            inner,
            sites: Mutex::new(HashMap::new()),
        }
    }

    fn log_at(&self, record: &log::Record, now: Instant) {
        let site = match (record.level(), record.file_static(), record.line()) {
            (log::Level::Warn | log::Level::Error, Some(file), Some(line)) => (file, line),
            _ => return self.inner.log(record),
        };
        // The lines to write are decided under the lock and written after it, so a slow log file
        // holds up no other line of code's warnings.
        let (dropped, keep) = {
            let mut sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
            let s = sites.entry(site).or_insert(Site {
                since: now,
                kept: 0,
                dropped: 0,
            });
            let mut dropped = 0;
            if now.saturating_duration_since(s.since) >= LIMIT_WINDOW {
                dropped = s.dropped;
                *s = Site {
                    since: now,
                    kept: 0,
                    dropped: 0,
                };
            }
            let keep = s.kept < LINES_PER_WINDOW;
            match keep {
                true => s.kept += 1,
                false => s.dropped += 1,
            }
            (dropped, keep)
        };
        if dropped > 0 {
            self.inner.log(
                &log::Record::builder()
                    .args(format_args!(
                        "{dropped} more lines from {}:{} were not logged in {LIMIT_WINDOW:?}",
                        site.0, site.1
                    ))
                    .level(log::Level::Warn)
                    .target(record.target())
                    .file_static(Some(site.0))
                    .line(Some(site.1))
                    .build(),
            );
        }
        if keep {
            self.inner.log(record);
        }
    }
}

impl<L: log::Log> log::Log for RateLimited<L> {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if self.inner.enabled(record.metadata()) {
            self.log_at(record, Instant::now());
        }
    }

    fn flush(&self) {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the lines that reach it.
    #[derive(Default)]
    struct Lines(Mutex<Vec<String>>);

    impl log::Log for Lines {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, record: &log::Record) {
            self.0.lock().unwrap().push(record.args().to_string());
        }
        fn flush(&self) {}
    }

    fn line(level: log::Level, line: u32, logger: &RateLimited<Lines>, at: Instant) {
        logger.log_at(
            &log::Record::builder()
                .args(format_args!("x"))
                .level(level)
                .file_static(Some("src/x.rs"))
                .line(Some(line))
                .build(),
            at,
        );
    }

    #[test]
    fn warnings_of_one_line_are_kept_within_a_rate_and_the_rest_counted() {
        let logger = RateLimited::new(Lines::default());
        let t0 = Instant::now();
        for _ in 0..1000 {
            line(log::Level::Warn, 1, &logger, t0);
            line(log::Level::Info, 2, &logger, t0);
        }
        // Another line of code has a window of its own.
        line(log::Level::Error, 3, &logger, t0);
        let kept = logger.inner.0.lock().unwrap().len();
        assert_eq!(kept, LINES_PER_WINDOW as usize + 1000 + 1);
        // The next window says how many were left out, and keeps lines again.
        line(log::Level::Warn, 1, &logger, t0 + LIMIT_WINDOW);
        let lines = logger.inner.0.lock().unwrap();
        assert_eq!(lines.len(), kept + 2);
        assert!(
            lines[kept].starts_with(&format!(
                "{} more lines from src/x.rs:1",
                1000 - LINES_PER_WINDOW
            )),
            "{}",
            lines[kept]
        );
    }

    #[test]
    fn rotates_by_size_and_keeps_a_few_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/id/nydusd.log");
        let mut f = RotatingFile::open(&path, 1).unwrap();
        let line = vec![b'x'; 300 << 10];
        for _ in 0..40 {
            f.write_all(&line).unwrap();
        }
        assert!(std::fs::metadata(&path).unwrap().len() <= 1 << 20);
        for n in 1..=KEEP_ROTATED {
            let len = std::fs::metadata(rotated(&path, n)).unwrap().len();
            assert!(len > 0 && len <= 1 << 20, "{n}: {len}");
        }
        assert!(!rotated(&path, KEEP_ROTATED + 1).exists());
    }

    #[test]
    fn a_name_without_extension_gets_dot_log() {
        assert_eq!(
            log_file_path(Path::new("/x/nydusd")),
            Path::new("/x/nydusd.log")
        );
        assert_eq!(log_file_path(Path::new("/x/a.txt")), Path::new("/x/a.txt"));
    }
}
