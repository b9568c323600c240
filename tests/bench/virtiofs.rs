//! virtio-fs benchmark (not a timed test): the same image served by `rafsd virtiofs` to a vhost-user frontend
//! (`kit::frontend`: the guest's FUSE requests on split virtqueues, one request in flight per queue, like a
//! guest's synchronous O_DIRECT reader on each vCPU) and by a host FUSE mount (`rafsd --config C
//! --bootstrap B --mountpoint M`, read with O_DIRECT and statx so that every operation reaches the daemon),
//! in one run. Operations: FUSE_READ 1 MiB sequential over a large file, 4 KiB random reads, LOOKUP and
//! GETATTR ops/s. Each is measured with 1 request queue against 1 host thread, and with 4 request queues
//! (one driver thread each, the work split between them) against 4 host threads; the device once with its
//! worker pools (the default) and once answering in order (`--thread-pool-size 0`, the old way).
//! Each side's daemon counts the requests it served (admin API metrics), printed next to the rates.
//! With `--base BIN` another rafsd binary (e.g. a release build of main) is measured too, with its worker
//! pools, in the same rounds: a baseline for a change to the device.
//!
//!   cargo bench --bench virtiofs -- [--rounds N] [--size-mib M] [--random N] [--queues 1,4] [--pin-cpu N]
//!   [--base BIN]
//!   (ci/bench-virtiofs.sh)
//!
//! Needs root (FUSE mount). The image (a copy of /usr/include plus an M MiB random file) is built once with
//! `rafsd build` under the target dir and reused.

use kit::{bench::harness, bench::image, daemon, frontend};

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use frontend::{Guest, Options, Rng, VirtiofsDaemon, ROOT};
use harness::{daemon_extra_args, median, Watchdog};

const BIN: &str = env!("CARGO_BIN_EXE_rafsd");
const MIB: u64 = 1 << 20;

struct Args {
    rounds: usize,
    /// Run everything (this process and both daemons) on this CPU.
    pin_cpu: Option<usize>,
    /// Hard limit for the whole run: then the daemons are killed, the mount detached, and we exit 2.
    limit_secs: u64,
    size_mib: u64,
    random: usize,
    work: PathBuf,
    /// Request queues (and host threads) to measure with.
    queues: Vec<usize>,
    /// Another rafsd binary to measure with its worker pools, as a baseline.
    base: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        rounds: 5,
        pin_cpu: None,
        limit_secs: 1800,
        size_mib: 256,
        random: 20_000,
        work: Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-virtiofs"),
        queues: vec![1, 4],
        base: None,
    };
    harness::parse_flags(|flag, value| match flag {
        "--rounds" => a.rounds = value().parse().expect("--rounds N"),
        "--size-mib" => a.size_mib = value().parse().expect("--size-mib M"),
        "--random" => a.random = value().parse().expect("--random N"),
        "--work" => a.work = PathBuf::from(value()),
        "--limit-secs" => a.limit_secs = value().parse().expect("--limit-secs S"),
        "--pin-cpu" => a.pin_cpu = Some(value().parse().expect("--pin-cpu N")),
        "--base" => a.base = Some(value()),
        "--queues" => {
            a.queues = value()
                .split(',')
                .map(|q| q.parse().expect("--queues 1,4"))
                .collect()
        }
        other => panic!(
            "unknown argument {other}; use --rounds N --size-mib M --random N --queues 1,4 \
             --pin-cpu N --base BIN --work DIR --limit-secs S"
        ),
    });
    a.rounds = a.rounds.max(1);
    assert!(
        a.queues.iter().all(|&q| (1..=4).contains(&q)),
        "--queues: 1 to 4 each (the device offers 4 request queues)"
    );
    a
}

/// Source tree (a copy of /usr/include, or generated small files, plus `big.bin`) and its image.
fn build_image(a: &Args) -> (PathBuf, PathBuf, PathBuf) {
    let (src, bootstrap, blobs) = (
        a.work.join("src"),
        a.work.join(format!("bootstrap-{}m", a.size_mib)),
        a.work.join("blobs"),
    );
    if bootstrap.exists() {
        return (src, bootstrap, blobs);
    }
    let _ = std::fs::remove_dir_all(&a.work);
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&blobs).unwrap();
    if Path::new("/usr/include").is_dir() {
        let ok = Command::new("cp")
            .arg("-a")
            .arg("/usr/include")
            .arg(src.join("include"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "cp -a /usr/include");
    } else {
        for d in 0..64 {
            let dir = src.join("include").join(format!("d{d:02}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..128 {
                std::fs::write(
                    dir.join(format!("header-{f:03}.h")),
                    format!("/* {d} {f} */\n"),
                )
                .unwrap();
            }
        }
    }
    let mut rng = Rng(0x5eed_0fb1_6f11);
    image::write_random_file(&src.join("big.bin"), a.size_mib, || rng.next());
    let t = Instant::now();
    let out = image::rafsd_build(&src, &bootstrap, &blobs);
    eprintln!(
        "built the image in {:.1}s: {}",
        t.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("")
    );
    (src, bootstrap, blobs)
}

/// Every entry under `root`, parents before children (relative paths).
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(root.join(&rel))
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// fop_hits of the daemon behind `apisock` (nydusd order: getattr=0, read=4, lookup=9); None when the
/// daemon has no counters for `id`.
fn fops(apisock: &Path, id: &str) -> Option<Vec<u64>> {
    let mut s = std::os::unix::net::UnixStream::connect(apisock).ok()?;
    s.set_read_timeout(Some(frontend::WAIT)).ok()?;
    write!(
        s,
        "GET /api/v1/metrics?id={id} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    std::io::Read::read_to_string(&mut s, &mut resp).ok()?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["fop_hits"]
        .as_array()?
        .iter()
        .map(|x| x.as_u64())
        .collect()
}

const GETATTR: usize = 0;
const READ: usize = 4;
const LOOKUP: usize = 9;

/// The four operations, in table order: (name, unit, fop_hits index).
const OPS: [(&str, &str, usize); 4] = [
    ("READ 1 MiB sequential", "MB/s", READ),
    ("READ 4 KiB random", "op/s", READ),
    ("LOOKUP", "op/s", LOOKUP),
    ("GETATTR", "op/s", GETATTR),
];

/// One side measured: per operation, the rate of each round and the requests the daemon saw in the
/// last one.
#[derive(Default, Clone)]
struct Rates {
    rates: [Vec<f64>; 4],
    requests: [Option<u64>; 4],
}

impl Rates {
    /// Time `f` (which does `count` units of operation `op`), counting the daemon's requests meanwhile.
    fn measure(
        &mut self,
        op: usize,
        count: f64,
        metrics: &dyn Fn() -> Option<Vec<u64>>,
        f: impl FnOnce(),
    ) {
        let fop = OPS[op].2;
        let before = metrics().map(|m| m[fop]);
        let t = Instant::now();
        f();
        let secs = t.elapsed().as_secs_f64();
        self.requests[op] = before.zip(metrics().map(|m| m[fop])).map(|(b, a)| a - b);
        self.rates[op].push(count / secs);
    }
}

fn offsets(size: u64, n: usize) -> Vec<u64> {
    let mut rng = Rng(0x0ff5_e75e_ed00);
    (0..n)
        .map(|_| (rng.next() % (size / 4096)) * 4096)
        .collect()
}

/// Run `f` over `items` with one thread per worker, each taking a contiguous share.
fn split_run<W: Send, T: Sync>(workers: &mut [W], items: &[T], f: impl Fn(&mut W, &T) + Sync) {
    let per = items.len().div_ceil(workers.len());
    std::thread::scope(|s| {
        for (w, share) in workers.iter_mut().zip(items.chunks(per.max(1))) {
            let f = &f;
            s.spawn(move || share.iter().for_each(|item| f(w, item)));
        }
    });
}

/// The image and what the passes go through.
struct Bench {
    bootstrap: PathBuf,
    blobs: PathBuf,
    work: PathBuf,
    size: u64,
    meta_paths: Vec<PathBuf>,
    rand: Vec<u64>,
    watchdog: Watchdog,
}

/// A `rafsd virtiofs` device with the image at /bench and a guest driving it, one thread per request
/// queue; every entry resolved and the blob cache filled.
struct Device {
    dev: VirtiofsDaemon,
    /// Keeps the session (and the hiprio queue); `queues` drive the request queues.
    _session: Guest,
    queues: Vec<Guest>,
    /// (parent nodeid, name) for LOOKUP, nodeids for GETATTR.
    lookups: Vec<(u64, Vec<u8>)>,
    attrs: Vec<u64>,
    big: (u64, u64),
}

/// The host FUSE side: a config and a mountpoint, mounted afresh for each round.
struct Fuse {
    config: PathBuf,
    mnt: PathBuf,
    apisock: PathBuf,
    log: PathBuf,
}

impl Bench {
    /// `BIN virtiofs DEVICE_ARGS` in `run` with a guest of `nq` request queues.
    fn device(&self, bin: &str, run: &Path, device_args: &[&str], nq: usize) -> Device {
        std::fs::create_dir_all(run).unwrap();
        let extra = daemon_extra_args();
        let mut args = vec![
            "--log-level",
            "warn",
            "--allow-path",
            self.work.to_str().unwrap(),
        ];
        args.extend_from_slice(device_args);
        args.extend(extra.iter().map(String::as_str));
        let dev = VirtiofsDaemon::start(bin, run, &args);
        self.watchdog.watch(dev.pid(), None);
        dev.mount_rafs(
            "/bench",
            &self.bootstrap,
            &daemon::v1_config(&self.blobs, &run.join("cache"), false, ""),
        );
        let opts = Options {
            request_queues: nq,
            queue_size: 128,
            slots: 1,
            slot_len: MIB + (64 << 10),
            ..Default::default()
        };
        let mut g = Guest::connect(&dev.sock, opts).expect("vhost-user handshake");
        g.fuse_init().unwrap();
        let top = g.lookup(ROOT, b"bench").unwrap().nodeid;
        let mut nodeids: HashMap<&Path, u64> = HashMap::new();
        let mut lookups = Vec::new();
        for p in &self.meta_paths {
            let parent = p
                .parent()
                .filter(|q| !q.as_os_str().is_empty())
                .map(|q| nodeids[q])
                .unwrap_or(top);
            let name = p.file_name().unwrap().as_bytes().to_vec();
            let e = g
                .lookup(parent, &name)
                .unwrap_or_else(|e| panic!("LOOKUP {}: {e}", p.display()));
            nodeids.insert(p, e.nodeid);
            lookups.push((parent, name));
        }
        let attrs = self.meta_paths.iter().map(|p| nodeids[&**p]).collect();
        let big = g.lookup(top, b"big.bin").unwrap().nodeid;
        let fh = g.open(big).unwrap().fh;
        let queues = g.split_queues();
        let mut d = Device {
            dev,
            _session: g,
            queues,
            lookups,
            attrs,
            big: (big, fh),
        };
        self.read_seq(&mut d); // fills the device's blob cache
        d
    }

    fn read_seq(&self, d: &mut Device) {
        let (big, fh) = d.big;
        let seq: Vec<u64> = (0..self.size / MIB).map(|i| i * MIB).collect();
        split_run(&mut d.queues, &seq, |g, off| {
            assert_eq!(
                g.read_in_place(big, fh, *off, MIB as u32).unwrap() as u64,
                MIB
            );
        });
    }

    /// One round of the four operations through `d`.
    fn measure_device(&self, d: &mut Device, r: &mut Rates) {
        let apisock = d.dev.apisock.clone();
        let metrics = || fops(&apisock, "/bench");
        let (big, fh) = d.big;
        let n_meta = self.meta_paths.len() as f64;
        r.measure(0, self.size as f64 / 1e6, &metrics, || self.read_seq(d));
        r.measure(1, self.rand.len() as f64, &metrics, || {
            split_run(&mut d.queues, &self.rand, |g, &off| {
                assert_eq!(g.read_in_place(big, fh, off, 4096).unwrap(), 4096)
            })
        });
        r.measure(2, n_meta, &metrics, || {
            split_run(&mut d.queues, &d.lookups, |g, (parent, name)| {
                g.lookup(*parent, name).unwrap();
            })
        });
        r.measure(3, n_meta, &metrics, || {
            split_run(&mut d.queues, &d.attrs, |g, &n| {
                g.getattr(n).unwrap();
            })
        });
    }

    fn stop_device(&self, d: Device) {
        let Device {
            dev,
            _session,
            queues,
            ..
        } = d;
        drop(queues);
        drop(_session);
        self.watchdog.unwatch(dev.pid());
        dev.kill_and_check();
    }

    /// The host FUSE side in `run`: its own cache, filled once.
    fn fuse(&self, run: &Path) -> Fuse {
        std::fs::create_dir_all(run).unwrap();
        let f = Fuse {
            config: run.join("config.json"),
            mnt: run.join("mnt"),
            apisock: run.join("api.sock"),
            log: run.join("rafsd-fuse.log"),
        };
        std::fs::write(
            &f.config,
            daemon::v1_config(&self.blobs, &run.join("cache"), false, ""),
        )
        .unwrap();
        let h = self.mount(&f);
        std::io::copy(
            &mut File::open(f.mnt.join("big.bin")).unwrap(),
            &mut std::io::sink(),
        )
        .unwrap();
        self.unmount(h);
        f
    }

    fn mount(&self, f: &Fuse) -> daemon::Daemon {
        let extra = daemon_extra_args();
        let mut args = vec![
            "--config",
            f.config.to_str().unwrap(),
            "--bootstrap",
            self.bootstrap.to_str().unwrap(),
            "--apisock",
            f.apisock.to_str().unwrap(),
            "-l",
            "warn",
        ];
        args.extend(extra.iter().map(String::as_str));
        let d = daemon::Daemon::start(&args, &f.mnt, &f.log);
        self.watchdog.watch(d.pid(), Some(&f.mnt));
        d
    }

    fn unmount(&self, h: daemon::Daemon) {
        let pid = h.pid();
        assert!(h.stop().success());
        self.watchdog.unwatch(pid);
    }

    /// One round through a fresh mount (so LOOKUPs reach the daemon): statx and O_DIRECT reads from
    /// `nt` threads.
    fn measure_fuse(&self, f: &Fuse, nt: usize, r: &mut Rates) {
        let h = self.mount(f);
        let metrics = || fops(&f.apisock, "/");
        let cpaths: Vec<CString> = self
            .meta_paths
            .iter()
            .map(|p| CString::new(f.mnt.join(p).as_os_str().as_bytes()).unwrap())
            .collect();
        let statx = |c: &CString, flags: i32| {
            // SAFETY: statx is plain old data; valid path and buffer.
            let mut stx: libc::statx = unsafe { std::mem::zeroed() };
            let r = unsafe {
                libc::statx(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW | flags,
                    libc::STATX_BASIC_STATS,
                    &mut stx,
                )
            };
            assert_eq!(r, 0, "statx {c:?}: {}", std::io::Error::last_os_error());
        };
        let seq: Vec<u64> = (0..self.size / MIB).map(|i| i * MIB).collect();
        let n_meta = self.meta_paths.len() as f64;
        // One O_DIRECT-aligned 1 MiB buffer per thread.
        let mut bufs: Vec<(Vec<u8>, usize)> = (0..nt)
            .map(|_| {
                let raw = vec![0u8; (MIB + 4096) as usize];
                let skew = raw.as_ptr().align_offset(4096);
                (raw, skew)
            })
            .collect();
        let mut nothing = vec![(); nt];
        r.measure(2, n_meta, &metrics, || {
            split_run(&mut nothing, &cpaths, |_, c| statx(c, 0))
        });
        r.measure(3, n_meta, &metrics, || {
            split_run(&mut nothing, &cpaths, |_, c| {
                statx(c, libc::AT_STATX_FORCE_SYNC)
            })
        });
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(f.mnt.join("big.bin"))
            .unwrap();
        r.measure(0, self.size as f64 / 1e6, &metrics, || {
            split_run(&mut bufs, &seq, |(raw, skew), &off| {
                let buf = &mut raw[*skew..*skew + MIB as usize];
                assert_eq!(file.read_at(buf, off).unwrap() as u64, MIB);
            })
        });
        r.measure(1, self.rand.len() as f64, &metrics, || {
            split_run(&mut bufs, &self.rand, |(raw, skew), &off| {
                let buf = &mut raw[*skew..*skew + 4096];
                assert_eq!(file.read_at(buf, off).unwrap(), 4096);
            })
        });
        drop(file);
        self.unmount(h);
    }
}

fn main() {
    let a = parse_args();
    let watchdog = Watchdog::start(Duration::from_secs(a.limit_secs));
    if let Some(cpu) = a.pin_cpu {
        // SAFETY: cpu_set_t is plain old data; the daemons started later inherit the mask.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
                0,
                "pin to CPU {cpu}"
            );
        }
    }
    // SAFETY: plain getter.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the host FUSE side needs root"
    );
    let (src, bootstrap, blobs) = build_image(&a);
    let size = a.size_mib * MIB;
    let meta_paths: Vec<PathBuf> = walk(&src)
        .into_iter()
        .filter(|p| p.as_os_str() != "big.bin")
        .collect();
    let bench = Bench {
        bootstrap,
        blobs,
        work: a.work.clone(),
        size,
        rand: offsets(size, a.random),
        meta_paths,
        watchdog,
    };
    let run = tempfile::Builder::new()
        .prefix("rafsd-bench-virtiofs")
        .tempdir()
        .unwrap();
    let fuse = bench.fuse(&run.path().join("fuse"));
    // Per queue count: (worker pools, in order, host FUSE, base binary's pools), measured in turn in
    // each round so that the machine's other load falls on all of them alike.
    let mut results: Vec<[Rates; 4]> = Vec::new();
    for &nq in &a.queues {
        let dir = |side: &str| run.path().join(format!("{side}-{nq}"));
        let mut pool = bench.device(BIN, &dir("pool"), &[], nq);
        let mut in_order = bench.device(BIN, &dir("in-order"), &["--thread-pool-size", "0"], nq);
        let mut base = a
            .base
            .as_deref()
            .map(|b| bench.device(b, &dir("base"), &[], nq));
        let mut r: [Rates; 4] = Default::default();
        for round in 0..a.rounds {
            eprintln!("{nq} queue(s): round {}/{}", round + 1, a.rounds);
            bench.measure_device(&mut pool, &mut r[0]);
            bench.measure_device(&mut in_order, &mut r[1]);
            bench.measure_fuse(&fuse, nq, &mut r[2]);
            if let Some(base) = &mut base {
                bench.measure_device(base, &mut r[3]);
            }
        }
        for d in [Some(pool), Some(in_order), base].into_iter().flatten() {
            bench.stop_device(d);
        }
        results.push(r);
    }

    println!();
    println!("{}", harness::load_note());
    let cpus = a.pin_cpu.map_or("any CPU".to_string(), |c| {
        format!("all processes pinned to CPU {c}")
    });
    println!(
        "image: {} entries + big.bin of {} MiB; median of {} rounds; one request in flight per queue or \
         thread; {cpus}",
        bench.meta_paths.len(),
        a.size_mib,
        a.rounds
    );
    if let Some(b) = &a.base {
        println!("base: {b} with its worker pools");
    }
    let count = |n: Option<u64>| n.map_or("-".to_string(), |n| n.to_string());
    for (i, &nq) in a.queues.iter().enumerate() {
        println!();
        println!(
            "{nq} request queue(s) / {nq} host thread(s): virtio-fs (worker pools), virtio-fs in order \
             (--thread-pool-size 0), host FUSE"
        );
        let with_base = a.base.is_some();
        println!(
            "{:<22} {:>5} {:>10} {:>10} {:>10} {:>12} {:>14} {:>12}{}",
            "operation",
            "unit",
            "virtio-fs",
            "in order",
            "host FUSE",
            "virtio/FUSE",
            "pool/in order",
            "reqs v/h",
            if with_base {
                format!(" {:>10} {:>10}", "base", "pool/base")
            } else {
                String::new()
            }
        );
        let [pool, in_order, fuse, base] = &results[i];
        for (op, (name, unit, _)) in OPS.iter().enumerate() {
            let (p, o, f) = (
                median(&pool.rates[op]),
                median(&in_order.rates[op]),
                median(&fuse.rates[op]),
            );
            let b = median(&base.rates[op]);
            println!(
                "{name:<22} {unit:>5} {p:>10.0} {o:>10.0} {f:>10.0} {:>12.2} {:>14.2} {:>12}{}",
                p / f,
                p / o,
                format!("{}/{}", count(pool.requests[op]), count(fuse.requests[op])),
                if with_base {
                    format!(" {b:>10.0} {:>10.2}", p / b)
                } else {
                    String::new()
                }
            );
        }
    }
}
