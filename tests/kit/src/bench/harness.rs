//! What the benchmarks share besides images: statistics, a watchdog for the whole run, daemon options
//! from the environment.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// The `p`th percentile (nearest rank) of `v`; NaN for an empty `v`.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Walk the benchmark's command line: `on(flag, value)` for each flag, where `value()` takes the word
/// after it. The `--bench` cargo adds is skipped.
pub fn parse_flags(mut on: impl FnMut(&str, &mut dyn FnMut() -> String)) {
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--bench" {
            continue;
        }
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        on(&flag, &mut value);
    }
}

/// More daemon options for every daemon a benchmark starts, from `RAFSD_BENCH_DAEMON_ARGS` (whitespace
/// separated), e.g. `--seccomp none --sandbox none` to measure what the sandbox costs
/// (`ci/bench-sandbox.sh`).
pub fn daemon_extra_args() -> Vec<String> {
    std::env::var("RAFSD_BENCH_DAEMON_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// The load average now, with a word on what it means for the figures.
pub fn load_note() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split(' ').take(3).collect();
    format!(
        "load average at the end: {} (2+ means other work competed for the CPUs)",
        load.join(" ")
    )
}

/// Pids to kill and a mount to detach if the run overstays its limit (a hung FUSE request would
/// otherwise block the benchmark for good); then the process exits with 2.
#[derive(Clone, Default)]
pub struct Watchdog(Arc<Mutex<(Vec<i32>, Option<PathBuf>)>>);

impl Watchdog {
    pub fn start(limit: Duration) -> Self {
        let w = Watchdog::default();
        let state = w.0.clone();
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            let (pids, mnt) = &*state.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!("benchmark exceeded {limit:?}: killing {pids:?}");
            for &pid in pids {
                // SAFETY: signalling our own children by pid.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if let Some(m) = mnt {
                crate::daemon::lazy_unmount(m);
            }
            std::process::exit(2);
        });
        w
    }

    pub fn unwatch(&self, pid: i32) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .retain(|&p| p != pid);
    }

    pub fn watch(&self, pid: i32, mnt: Option<&Path>) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.0.push(pid);
        if let Some(m) = mnt {
            s.1 = Some(m.to_path_buf());
        }
    }
}
