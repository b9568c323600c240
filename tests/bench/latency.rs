//! Latency benchmark (not a timed test): how long small operations take while a cold read streams from a
//! slow registry. One reader streams `big.bin` (256 MiB, not cached) through a registry backend paced at
//! ~20 MB/s (the fault server of `kit::services`, pacing its blob answers like one link), while another
//! issues GETATTR, LOOKUP (of a name not in the image) and 4 KiB READs of cached small files in turn, one
//! every millisecond; p50/p99 of those small operations, without and then with the big reader.
//!
//! Both front ends: the virtio-fs device through the test frontend (one request queue, as Kata gives the
//! guest; the big reader keeps two 1 MiB READs in flight, as a guest's readahead does) and a host FUSE
//! mount (the kernel's readahead; statx forced to the daemon, O_DIRECT reads). Each with its worker pool
//! (the default) and with the old behaviour as the baseline of the same run: `--thread-pool-size 0` (one
//! request at a time, in order) for virtio-fs, `--thread-num 1` for FUSE. Every run starts a new daemon
//! with an empty cache. `--cold-readers N` has N FUSE readers stream their parts of the big file at once
//! (more cold READs than workers; `--depth N` is the virtio-fs reader's READs in flight); `--base BIN`
//! adds another rafsd binary's daemons with their default workers.
//!
//!   cargo bench --bench latency -- [--rounds N] [--size-mib M] [--rate-mb R] [--gap-us U] [--depth D]
//!                                   [--only virtiofs|fuse] [--cold-readers N] [--base BIN]
//!                                   (ci/bench-latency.sh; needs root)

use kit::{bench::harness, bench::image, daemon, frontend, rafsd_bin, services};

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use frontend::{read_in, Guest, Options, Posted, Rng, VirtiofsDaemon, ROOT};
use fuse_backend_rs::abi::fuse_abi::{AttrOut, EntryOut, GetattrIn, Opcode};
use harness::{median, percentile, Watchdog};
use services::FakeServer;
use vm_memory::ByteValued;

const BIN: &str = env!("CARGO_BIN_EXE_rafsd");
const MIB: u64 = 1 << 20;
const REPO: &str = "rafsd/bench";
/// Small files in `small/`, of 4 to 16 KiB.
const SMALL_FILES: usize = 64;

struct Args {
    rounds: usize,
    size_mib: u64,
    /// Registry pace, MB/s.
    rate_mb: f64,
    /// Pause between small operations.
    gap: Duration,
    /// virtio-fs: 1 MiB READs of the big reader in flight.
    depth: usize,
    /// Length of the phase without the big reader.
    idle: Duration,
    limit_secs: u64,
    work: PathBuf,
    virtiofs: bool,
    fuse: bool,
    /// FUSE: readers streaming cold at once, each its own part of the big file.
    cold_readers: usize,
    /// FUSE: another rafsd binary measured the same way (a release build of main, say).
    base: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut a = Args {
        rounds: 3,
        size_mib: 256,
        rate_mb: 20.0,
        gap: Duration::from_millis(1),
        depth: 2,
        idle: Duration::from_secs(5),
        limit_secs: 3600,
        work: Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-latency"),
        virtiofs: true,
        fuse: true,
        cold_readers: 1,
        base: None,
    };
    harness::parse_flags(|flag, value| match flag {
        "--rounds" => a.rounds = value().parse().expect("--rounds N"),
        "--size-mib" => a.size_mib = value().parse().expect("--size-mib M"),
        "--rate-mb" => a.rate_mb = value().parse().expect("--rate-mb R"),
        "--gap-us" => a.gap = Duration::from_micros(value().parse().expect("--gap-us U")),
        "--depth" => a.depth = value().parse().expect("--depth D"),
        "--idle-secs" => a.idle = Duration::from_secs_f64(value().parse().expect("--idle-secs S")),
        "--limit-secs" => a.limit_secs = value().parse().expect("--limit-secs S"),
        "--work" => a.work = PathBuf::from(value()),
        "--cold-readers" => a.cold_readers = value().parse().expect("--cold-readers N"),
        "--base" => a.base = Some(PathBuf::from(value())),
        "--only" => match value().as_str() {
            "virtiofs" => a.fuse = false,
            "fuse" => a.virtiofs = false,
            other => panic!("--only virtiofs|fuse, not {other}"),
        },
        other => panic!(
            "unknown argument {other}; use --rounds N --size-mib M --rate-mb R --gap-us U \
             --depth D --idle-secs S --only virtiofs|fuse --work DIR --limit-secs S \
             --cold-readers N --base BIN"
        ),
    });
    a.rounds = a.rounds.max(1);
    a.depth = a.depth.max(1);
    a.cold_readers = a.cold_readers.max(1);
    a
}

/// `big.bin` and `small/fNN`, built into an image once and reused: (bootstrap, blob file).
fn build_image(a: &Args) -> (PathBuf, PathBuf) {
    let (src, bootstrap, blobs) = (
        a.work.join(format!("src-{}m", a.size_mib)),
        a.work.join(format!("bootstrap-{}m", a.size_mib)),
        a.work.join(format!("blobs-{}m", a.size_mib)),
    );
    if !bootstrap.exists() {
        let _ = std::fs::remove_dir_all(&src);
        let _ = std::fs::remove_dir_all(&blobs);
        std::fs::create_dir_all(src.join("small")).unwrap();
        std::fs::create_dir_all(&blobs).unwrap();
        let mut rng = Rng(0x1a7e_0c75_0fb1);
        image::write_random_file(&src.join("big.bin"), a.size_mib, || rng.next());
        for i in 0..SMALL_FILES {
            let len = 4096 + (rng.next() % (12 << 10)) as usize;
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            std::fs::write(src.join("small").join(format!("f{i:02}")), data).unwrap();
        }
        image::rafsd_build(&src, &bootstrap, &blobs);
    }
    let blob = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .next()
        .expect("the image's blob");
    (bootstrap, blob)
}

/// Latencies (µs) of the small operations without and with the big reader, and the big read's rate.
#[derive(Default)]
struct Sample {
    idle: Vec<f64>,
    loaded: Vec<f64>,
    big_mb_s: f64,
}

/// What every run shares: the image, the registry serving its blob, the run's limits.
struct Bench {
    bootstrap: PathBuf,
    work: PathBuf,
    server: FakeServer,
    size: u64,
    rate: u64,
    gap: Duration,
    depth: usize,
    idle: Duration,
    cold_readers: usize,
    watchdog: Watchdog,
}

/// The n-th small operation: 0 GETATTR, 1 LOOKUP of a name not in the image, 2 READ 4 KiB (cached).
fn kind(n: usize) -> usize {
    n % 3
}

impl Bench {
    /// A nydusd v1 config: the registry, a blob cache in `cache`.
    fn config(&self, cache: &Path) -> String {
        serde_json::json!({
            "device": {
                "backend": {"type": "registry", "config": {
                    "scheme": "http", "host": format!("127.0.0.1:{}", self.server.port),
                    "repo": REPO, "timeout": 60
                }},
                "cache": {"type": "blobcache", "config": {"work_dir": cache}}
            },
            "mode": "direct", "digest_validate": true
        })
        .to_string()
    }

    fn virtiofs(&self, run: &Path, bin: &str, device_args: &[&str]) -> Sample {
        let mut args = vec![
            "--allow-network",
            "--log-level",
            "warn",
            "--allow-path",
            self.work.to_str().unwrap(),
        ];
        args.extend_from_slice(device_args);
        let extra = harness::daemon_extra_args();
        args.extend(extra.iter().map(String::as_str));
        self.server.set_rate(None);
        let dev = VirtiofsDaemon::start(bin, run, &args);
        self.watchdog.watch(dev.pid(), None);
        dev.mount_rafs("/bench", &self.bootstrap, &self.config(&run.join("cache")));
        let opts = Options {
            request_queues: 1,
            queue_size: 128,
            slots: self.depth + 2,
            slot_len: MIB + (64 << 10),
            ..Default::default()
        };
        let mut g = Guest::connect(&dev.sock, opts).expect("vhost-user handshake");
        g.fuse_init().unwrap();
        let top = g.lookup(ROOT, b"bench").unwrap().nodeid;
        let small_dir = g.lookup(top, b"small").unwrap().nodeid;
        // The small files, read once so the cache holds them: (nodeid, fh).
        let small: Vec<(u64, u64)> = (0..SMALL_FILES)
            .map(|i| {
                let n = g
                    .lookup(small_dir, format!("f{i:02}").as_bytes())
                    .unwrap()
                    .nodeid;
                g.read_file(n, 64 << 10).unwrap();
                (n, g.open(n).unwrap().fh)
            })
            .collect();
        let big = g.lookup(top, b"big.bin").unwrap().nodeid;
        let big_fh = g.open(big).unwrap().fh;
        self.server.set_rate(Some(self.rate));
        let mut s = Sample::default();
        let mut drive = |big_reader: bool, lat: &mut Vec<f64>| -> Option<f64> {
            self.drive_virtiofs(&mut g, small_dir, &small, (big, big_fh), big_reader, lat)
        };
        drive(false, &mut s.idle);
        s.big_mb_s = drive(true, &mut s.loaded).unwrap();
        drop(g);
        self.watchdog.unwatch(dev.pid());
        dev.kill_and_check();
        s
    }

    /// One phase on the guest's queue: small operations one at a time (`gap` apart), and with
    /// `big_reader` the big file's 1 MiB READs, `depth` in flight, until it is read (else for `idle`).
    /// Returns the big read's MB/s.
    fn drive_virtiofs(
        &self,
        g: &mut Guest,
        small_dir: u64,
        small: &[(u64, u64)],
        (big, big_fh): (u64, u64),
        big_reader: bool,
        lat: &mut Vec<f64>,
    ) -> Option<f64> {
        let start = Instant::now();
        let mut in_flight: Vec<Posted> = Vec::new();
        let mut small_op: Option<(Posted, Instant)> = None;
        let (mut big_off, mut big_reads) = (0u64, 0usize);
        let mut next_small = start;
        let mut n = 0usize;
        loop {
            while big_reader && big_reads < self.depth && big_off < self.size {
                let a = read_in(big_fh, big_off, MIB as u32);
                let p = g
                    .post(Opcode::Read, big, &[a.as_slice()], MIB as u32, Some(16))
                    .unwrap();
                in_flight.push(p);
                big_off += MIB;
                big_reads += 1;
            }
            let done = if big_reader {
                big_off >= self.size && big_reads == 0
            } else {
                start.elapsed() >= self.idle
            };
            if done && small_op.is_none() {
                break;
            }
            let now = Instant::now();
            if small_op.is_none() && now >= next_small && !done {
                let (node, fh) = small[n % small.len()];
                let p = match kind(n) {
                    0 => g.post(
                        Opcode::Getattr,
                        node,
                        &[GetattrIn::default().as_slice()],
                        std::mem::size_of::<AttrOut>() as u32,
                        None,
                    ),
                    1 => g.post(
                        Opcode::Lookup,
                        small_dir,
                        &[format!("missing-{n}\0").as_bytes()],
                        std::mem::size_of::<EntryOut>() as u32,
                        None,
                    ),
                    _ => g.post(
                        Opcode::Read,
                        node,
                        &[read_in(fh, 0, 4096).as_slice()],
                        4096,
                        None,
                    ),
                }
                .unwrap();
                in_flight.push(p);
                small_op = Some((p, now));
                n += 1;
            }
            let wait = match small_op {
                None if !done => next_small.saturating_duration_since(Instant::now()),
                _ => frontend::WAIT,
            };
            let replies = match g.reap(&in_flight, wait.max(Duration::from_millis(1))) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut && wait < frontend::WAIT => {
                    continue
                }
                Err(e) => panic!("virtio-fs: {e}"),
            };
            let now = Instant::now();
            for (p, r) in replies {
                in_flight.retain(|q| q.head != p.head);
                match small_op {
                    Some((q, at)) if q.head == p.head => {
                        // GETATTR and READ succeed; the LOOKUP finds nothing (ENOENT or a negative entry).
                        assert!(
                            r.header.error == 0 || r.header.error == -libc::ENOENT,
                            "{:?}: error {}",
                            p.opcode,
                            r.header.error
                        );
                        lat.push((now - at).as_secs_f64() * 1e6);
                        small_op = None;
                        next_small = now + self.gap;
                    }
                    _ => {
                        assert_eq!(r.header.error, 0, "big READ");
                        big_reads -= 1;
                    }
                }
            }
        }
        big_reader.then(|| self.size as f64 / 1e6 / start.elapsed().as_secs_f64())
    }

    fn fuse(&self, run: &Path, bin: &Path, fuse_args: &[&str]) -> Sample {
        let config = run.join("config.json");
        std::fs::write(&config, self.config(&run.join("cache"))).unwrap();
        let mnt = run.join("mnt");
        let mut args = vec![
            "--config",
            config.to_str().unwrap(),
            "--bootstrap",
            self.bootstrap.to_str().unwrap(),
            "-l",
            "warn",
        ];
        args.extend_from_slice(fuse_args);
        let extra = harness::daemon_extra_args();
        args.extend(extra.iter().map(String::as_str));
        self.server.set_rate(None);
        let d = daemon::Daemon::start_bin(bin, &args, &mnt, &run.join("rafsd-fuse.log"));
        self.watchdog.watch(d.pid(), Some(&mnt));
        let small: Vec<(CString, std::fs::File)> = (0..SMALL_FILES)
            .map(|i| {
                let path = mnt.join("small").join(format!("f{i:02}"));
                std::fs::read(&path).unwrap();
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&path)
                    .unwrap();
                (CString::new(path.as_os_str().as_bytes()).unwrap(), f)
            })
            .collect();
        self.server.set_rate(Some(self.rate));
        let mut raw = vec![0u8; 8192];
        let skew = raw.as_ptr().align_offset(4096);
        let buf = &mut raw[skew..skew + 4096];
        let mut n = 0usize;
        let mut small_op = |lat: &mut Vec<f64>| {
            let (path, file) = &small[n % small.len()];
            let t = Instant::now();
            match kind(n) {
                0 => assert_eq!(statx(path, libc::AT_STATX_FORCE_SYNC), 0),
                1 => {
                    let missing = mnt.join("small").join(format!("missing-{n}"));
                    let c = CString::new(missing.as_os_str().as_bytes()).unwrap();
                    assert_eq!(statx(&c, 0), libc::ENOENT);
                }
                _ => assert_eq!(file.read_at(buf, 0).unwrap(), 4096),
            }
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            n += 1;
            std::thread::sleep(self.gap);
        };
        let mut s = Sample::default();
        let t = Instant::now();
        while t.elapsed() < self.idle {
            small_op(&mut s.idle);
        }
        let finished = AtomicBool::new(false);
        let secs = std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let t = Instant::now();
                let mut f = std::fs::File::open(mnt.join("big.bin")).unwrap();
                if self.cold_readers == 1 {
                    let n = std::io::copy(&mut f, &mut std::io::sink()).unwrap();
                    assert_eq!(n, self.size);
                } else {
                    // Each reader its own part of the file, 1 MiB at a time.
                    let part = self.size.div_ceil(self.cold_readers as u64);
                    std::thread::scope(|readers| {
                        for r in 0..self.cold_readers as u64 {
                            let f = &f;
                            readers.spawn(move || {
                                let mut buf = vec![0u8; MIB as usize];
                                let end = ((r + 1) * part).min(self.size);
                                let mut at = r * part;
                                while at < end {
                                    let want = ((end - at) as usize).min(buf.len());
                                    let n = f.read_at(&mut buf[..want], at).unwrap();
                                    assert!(n > 0, "short read at {at}");
                                    at += n as u64;
                                }
                            });
                        }
                    });
                }
                finished.store(true, Ordering::SeqCst);
                t.elapsed().as_secs_f64()
            });
            while !finished.load(Ordering::SeqCst) {
                small_op(&mut s.loaded);
            }
            reader.join().unwrap()
        });
        s.big_mb_s = self.size as f64 / 1e6 / secs;
        let pid = d.pid();
        drop(small);
        assert!(d.stop().success());
        self.watchdog.unwatch(pid);
        s
    }
}

/// statx(2) of `path`: 0 or the errno.
fn statx(path: &CString, flags: i32) -> i32 {
    // SAFETY: statx is plain old data; valid path and buffer.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | flags,
            libc::STATX_BASIC_STATS,
            &mut stx,
        )
    };
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// One row of the report: a front end with one worker setting, its samples over the rounds.
struct Row {
    side: &'static str,
    workers: &'static str,
    samples: Vec<Sample>,
}

impl Row {
    /// Median over the rounds of a per-round statistic.
    fn med(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        median(&self.samples.iter().map(f).collect::<Vec<_>>())
    }
}

fn main() {
    let a = parse_args();
    // SAFETY: plain getter.
    assert_eq!(unsafe { libc::geteuid() }, 0, "FUSE mounts need root");
    let watchdog = Watchdog::start(Duration::from_secs(a.limit_secs));
    let (bootstrap, blob) = build_image(&a);
    let server = FakeServer::with_blobs_of(REPO, blob.parent().unwrap());
    let bench = Bench {
        bootstrap,
        work: a.work.clone(),
        server,
        size: a.size_mib * MIB,
        rate: (a.rate_mb * 1e6) as u64,
        gap: a.gap,
        depth: a.depth,
        idle: a.idle,
        cold_readers: a.cold_readers,
        watchdog,
    };
    let mut rows: Vec<Row> = Vec::new();
    if a.virtiofs {
        rows.push(Row {
            side: "virtio-fs",
            workers: "pool (16 per queue)",
            samples: Vec::new(),
        });
        rows.push(Row {
            side: "virtio-fs",
            workers: "in order (pool 0)",
            samples: Vec::new(),
        });
        if a.base.is_some() {
            rows.push(Row {
                side: "virtio-fs",
                workers: "pool, base",
                samples: Vec::new(),
            });
        }
    }
    if a.fuse {
        rows.push(Row {
            side: "host FUSE",
            workers: "16 threads",
            samples: Vec::new(),
        });
        rows.push(Row {
            side: "host FUSE",
            workers: "1 thread",
            samples: Vec::new(),
        });
        if a.base.is_some() {
            rows.push(Row {
                side: "host FUSE",
                workers: "16 threads, base",
                samples: Vec::new(),
            });
        }
    }
    let run = tempfile::Builder::new()
        .prefix("rafsd-bench-latency")
        .tempdir()
        .unwrap();
    for round in 0..a.rounds {
        for (i, row) in rows.iter_mut().enumerate() {
            eprintln!(
                "round {}/{}: {} {}",
                round + 1,
                a.rounds,
                row.side,
                row.workers
            );
            let dir = run.path().join(format!("r{round}-{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let baseline = row.workers.starts_with("in order") || row.workers == "1 thread";
            let base = a
                .base
                .as_deref()
                .filter(|_| row.workers.ends_with(", base"));
            let s = if let (Some(base), "virtio-fs") = (base, row.side) {
                bench.virtiofs(&dir, base.to_str().unwrap(), &[])
            } else if let Some(base) = base {
                bench.fuse(&dir, base, &[])
            } else if row.side == "virtio-fs" {
                bench.virtiofs(
                    &dir,
                    BIN,
                    if baseline {
                        &["--thread-pool-size", "0"]
                    } else {
                        &[]
                    },
                )
            } else {
                bench.fuse(
                    &dir,
                    rafsd_bin(),
                    if baseline {
                        &["--thread-num", "1"]
                    } else {
                        &[]
                    },
                )
            };
            eprintln!(
                "  idle p99 {:.0} µs, loaded p99 {:.0} µs, big read {:.1} MB/s",
                percentile(&s.idle, 99.0),
                percentile(&s.loaded, 99.0),
                s.big_mb_s
            );
            row.samples.push(s);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    println!();
    println!("{}", harness::load_note());
    println!(
        "small operations (GETATTR, LOOKUP of a missing name, 4 KiB cached READ, in turn, {} µs apart) \
         while one reader streams {} MiB cold from a registry paced at {} MB/s (virtio-fs: {} 1 MiB \
         READs in flight on one request queue; FUSE: the kernel's readahead, {} reader(s) each \
         streaming its part of the file); median of {} rounds, latencies in ms",
        a.gap.as_micros(),
        a.size_mib,
        a.rate_mb,
        a.depth,
        a.cold_readers,
        a.rounds
    );
    println!(
        "{:<10} {:<20} {:>9} {:>9} {:>10} {:>10} {:>9}",
        "front end", "workers", "idle p50", "idle p99", "read p50", "read p99", "big MB/s"
    );
    let ms = |us: f64| us / 1000.0;
    for row in &rows {
        let (ip50, ip99) = (
            row.med(|s| percentile(&s.idle, 50.0)),
            row.med(|s| percentile(&s.idle, 99.0)),
        );
        let (lp50, lp99) = (
            row.med(|s| percentile(&s.loaded, 50.0)),
            row.med(|s| percentile(&s.loaded, 99.0)),
        );
        println!(
            "{:<10} {:<20} {:>9.3} {:>9.3} {:>10.3} {:>10.3} {:>9.1}",
            row.side,
            row.workers,
            ms(ip50),
            ms(ip99),
            ms(lp50),
            ms(lp99),
            row.med(|s| s.big_mb_s)
        );
    }
    println!("(idle: without the big reader; read: while it runs; big MB/s: its rate)");
    let (ours, theirs): (Vec<&Row>, Vec<&Row>) =
        rows.iter().partition(|r| !r.workers.ends_with(", base"));
    for pair in ours.chunks(2) {
        let [pool, base] = pair else { continue };
        let loaded = |r: &Row, p: f64| r.med(|s| percentile(&s.loaded, p));
        let idle = |r: &Row, p: f64| r.med(|s| percentile(&s.idle, p));
        println!(
            "{}: while the big read runs, {} / {}: p50 {:.1}x, p99 {:.1}x; without it: p50 {:.2}x, \
             p99 {:.2}x; target (p99 < 5 ms while the big read runs): {}",
            pool.side,
            base.workers,
            pool.workers,
            loaded(base, 50.0) / loaded(pool, 50.0),
            loaded(base, 99.0) / loaded(pool, 99.0),
            idle(base, 50.0) / idle(pool, 50.0),
            idle(base, 99.0) / idle(pool, 99.0),
            if loaded(pool, 99.0) < 5000.0 {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    for base in theirs {
        let Some(pool) = ours.iter().find(|r| r.side == base.side) else {
            continue;
        };
        let loaded = |r: &Row, p: f64| r.med(|s| percentile(&s.loaded, p));
        println!(
            "{}, {}: while the big read runs, base / this build: p50 {:.1}x, p99 {:.1}x; \
             big read {:.1} against {:.1} MB/s",
            pool.side,
            pool.workers,
            loaded(base, 50.0) / loaded(pool, 50.0),
            loaded(base, 99.0) / loaded(pool, 99.0),
            pool.med(|s| s.big_mb_s),
            base.med(|s| s.big_mb_s),
        );
    }
}
