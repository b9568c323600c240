//! A one-line progress bar for layer transfers, drawn on standard error only when it is a terminal
//! (never into logs or pipes), at most five times a second.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// Layers smaller than this get no bar: they are done before one would be worth drawing.
const MIN_SIZE: u64 = 1 << 20;
const WIDTH: usize = 30;

/// Counts the bytes read through it and redraws the bar.
pub struct Progress<R> {
    inner: R,
    label: String,
    total: u64,
    done: u64,
    start: Instant,
    last_draw: Option<Instant>,
    enabled: bool,
}

/// Is standard error a terminal?
pub fn stderr_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(libc::STDERR_FILENO) == 1 }
}

impl<R: Read> Progress<R> {
    pub fn new(inner: R, label: String, total: u64) -> Self {
        Progress {
            inner,
            label,
            total,
            done: 0,
            start: Instant::now(),
            last_draw: None,
            enabled: total >= MIN_SIZE && stderr_is_tty(),
        }
    }

    fn draw(&mut self, last: bool) {
        let now = Instant::now();
        if !last
            && self
                .last_draw
                .is_some_and(|t| now - t < Duration::from_millis(200))
        {
            return;
        }
        self.last_draw = Some(now);
        let frac = (self.done as f64 / self.total.max(1) as f64).min(1.0);
        let filled = (frac * WIDTH as f64) as usize;
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let line = format!(
            "\r{} [{}{}] {:.1}/{:.1} MiB {:3.0}% {:.1} MB/s",
            self.label,
            "#".repeat(filled),
            " ".repeat(WIDTH - filled),
            self.done as f64 / 1048576.0,
            self.total as f64 / 1048576.0,
            frac * 100.0,
            self.done as f64 / 1e6 / secs
        );
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(line.as_bytes());
        if last {
            let _ = err.write_all(b"\n");
        }
        let _ = err.flush();
    }

    /// End the bar's line.
    pub fn finish(&mut self) {
        if self.enabled {
            self.draw(true);
            self.enabled = false;
        }
    }
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.enabled {
            self.draw(false);
        }
        Ok(n)
    }
}

impl<R> Drop for Progress<R> {
    fn drop(&mut self) {
        if self.enabled {
            // An interrupted transfer: leave the line ended so the error that follows starts clean.
            let _ = std::io::stderr().write_all(b"\n");
        }
    }
}
