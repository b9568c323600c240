//! virtio-fs benchmark (not a timed test): the same image served by `rafsd virtiofs` to a vhost-user frontend
//! (tests/frontend: the guest's FUSE requests on a split virtqueue, one request in flight, like a guest's
//! synchronous O_DIRECT reader) and by a host FUSE mount (`rafsd --config C --bootstrap B --mountpoint M`,
//! read with O_DIRECT and statx so that every operation reaches the daemon), in one run. Operations:
//! FUSE_READ 1 MiB sequential over a large file, 4 KiB random reads, LOOKUP and GETATTR ops/s.
//! Each side's daemon counts the requests it served (admin API metrics), printed next to the rates.
//!
//!   cargo bench --bench virtiofs -- [--rounds N] [--size-mib M] [--random N] [--pin-cpu N]  (ci/bench-virtiofs.sh)
//!
//! Needs root (FUSE mount). The image (a copy of /usr/include plus an M MiB random file) is built once with
//! `rafsd build` under the target dir and reused.

#[path = "../daemon/mod.rs"]
mod daemon;
#[path = "../frontend/mod.rs"]
mod frontend;
mod image;
#[path = "../manifest/mod.rs"]
mod manifest;

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use frontend::{Guest, Options, Rng, VirtiofsDaemon, ROOT};

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
}

/// More daemon options for both sides, from `RAFSD_BENCH_DAEMON_ARGS` (whitespace separated), e.g.
/// `--seccomp none --sandbox none` to measure what the sandbox costs (`ci/bench-sandbox.sh`).
fn daemon_extra_args() -> Vec<String> {
    std::env::var("RAFSD_BENCH_DAEMON_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn parse_args() -> Args {
    let mut a = Args {
        rounds: 5,
        pin_cpu: None,
        limit_secs: 1800,
        size_mib: 256,
        random: 20_000,
        work: Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-virtiofs"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--rounds" => a.rounds = value().parse().expect("--rounds N"),
            "--size-mib" => a.size_mib = value().parse().expect("--size-mib M"),
            "--random" => a.random = value().parse().expect("--random N"),
            "--work" => a.work = PathBuf::from(value()),
            "--limit-secs" => a.limit_secs = value().parse().expect("--limit-secs S"),
            "--pin-cpu" => a.pin_cpu = Some(value().parse().expect("--pin-cpu N")),
            "--bench" => {}
            other => panic!("unknown argument {other}; use --rounds N --size-mib M --random N --pin-cpu N --work DIR --limit-secs S"),
        }
    }
    a.rounds = a.rounds.max(1);
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

#[derive(Default, Clone)]
struct Sample {
    /// ops (or bytes) per second of each round.
    rates: Vec<f64>,
    /// Requests the daemon served for the last round's pass (when it reports counters).
    requests: Option<u64>,
}

#[derive(Default)]
struct Results {
    seq: [Sample; 2],
    rand: [Sample; 2],
    lookup: [Sample; 2],
    getattr: [Sample; 2],
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Time `f`, and count the requests of kind `fop` the daemon saw meanwhile.
fn measure(
    count: f64,
    fop: usize,
    metrics: &dyn Fn() -> Option<Vec<u64>>,
    sample: &mut Sample,
    f: &mut dyn FnMut(),
) {
    let before = metrics().map(|m| m[fop]);
    let t = Instant::now();
    f();
    let secs = t.elapsed().as_secs_f64();
    sample.requests = before.zip(metrics().map(|m| m[fop])).map(|(b, a)| a - b);
    sample.rates.push(count / secs);
}

fn offsets(size: u64, n: usize) -> Vec<u64> {
    let mut rng = Rng(0x0ff5_e75e_ed00);
    (0..n)
        .map(|_| (rng.next() % (size / 4096)) * 4096)
        .collect()
}

/// Pids to kill and a mount to detach if the run overstays `--limit-secs` (a hung FUSE request would
/// otherwise block this process for good).
#[derive(Clone, Default)]
struct Watchdog(Arc<Mutex<(Vec<i32>, Option<PathBuf>)>>);

impl Watchdog {
    fn start(limit: Duration) -> Self {
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
                daemon::lazy_unmount(m);
            }
            std::process::exit(2);
        });
        w
    }

    fn unwatch(&self, pid: i32) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .retain(|&p| p != pid);
    }

    fn watch(&self, pid: i32, mnt: Option<&Path>) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.0.push(pid);
        if let Some(m) = mnt {
            s.1 = Some(m.to_path_buf());
        }
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
    let paths = walk(&src);
    let meta_paths: Vec<&PathBuf> = paths
        .iter()
        .filter(|p| p.as_os_str() != "big.bin")
        .collect();
    let rand = offsets(size, a.random);
    let run = tempfile::Builder::new()
        .prefix("rafsd-bench-virtiofs")
        .tempdir()
        .unwrap();
    let run = run.path();

    // --- virtio-fs: the device process, the image mounted through the API, one guest. ---
    let vdir = run.join("virtiofs");
    std::fs::create_dir_all(&vdir).unwrap();
    // The sandboxed device sees only allowed paths: the image lives in the work dir.
    let extra = daemon_extra_args();
    let mut dev_args = vec![
        "--log-level",
        "warn",
        "--allow-path",
        a.work.to_str().unwrap(),
    ];
    dev_args.extend(extra.iter().map(String::as_str));
    let dev = VirtiofsDaemon::start(BIN, &vdir, &dev_args);
    watchdog.watch(dev.pid(), None);
    dev.mount_rafs(
        "/bench",
        &bootstrap,
        &daemon::v1_config(&blobs, &vdir.join("cache"), false, ""),
    );
    let opts = Options {
        request_queues: 1,
        queue_size: 128,
        slots: 1,
        slot_len: MIB + (64 << 10),
        ..Default::default()
    };
    let mut g = Guest::connect(&dev.sock, opts).expect("vhost-user handshake");
    g.fuse_init().unwrap();
    let top = g.lookup(ROOT, b"bench").unwrap().nodeid;
    // Resolve every entry once: (parent nodeid, name) for LOOKUP, nodeid for GETATTR.
    let mut nodeids: HashMap<PathBuf, u64> = HashMap::new();
    let mut lookups = Vec::new();
    for p in &meta_paths {
        let parent = p
            .parent()
            .filter(|q| !q.as_os_str().is_empty())
            .map(|q| nodeids[q])
            .unwrap_or(top);
        let name = p.file_name().unwrap().as_bytes().to_vec();
        let e = g
            .lookup(parent, &name)
            .unwrap_or_else(|e| panic!("LOOKUP {}: {e}", p.display()));
        nodeids.insert((*p).clone(), e.nodeid);
        lookups.push((parent, name));
    }
    let attrs: Vec<u64> = meta_paths.iter().map(|p| nodeids[*p]).collect();
    let big = g.lookup(top, b"big.bin").unwrap().nodeid;
    let fh = g.open(big).unwrap().fh;
    let vread_all = |g: &mut Guest| {
        let mut off = 0;
        while off < size {
            let n = g.read_in_place(big, fh, off, MIB as u32).unwrap() as u64;
            assert!(n > 0);
            off += n;
        }
    };
    vread_all(&mut g); // warm the device's blob cache
    let vmetrics = || fops(&dev.apisock, "/bench");

    // --- host FUSE: the same image, its own cache; warmed once. ---
    let hdir = run.join("fuse");
    std::fs::create_dir_all(&hdir).unwrap();
    let config = hdir.join("config.json");
    std::fs::write(
        &config,
        daemon::v1_config(&blobs, &hdir.join("cache"), false, ""),
    )
    .unwrap();
    let mnt = hdir.join("mnt");
    let apisock = hdir.join("api.sock");
    let start_fuse = || {
        let d = daemon::Daemon::start(
            &[
                "--config",
                config.to_str().unwrap(),
                "--bootstrap",
                bootstrap.to_str().unwrap(),
                "--apisock",
                apisock.to_str().unwrap(),
                "--thread-num",
                "4",
                "-l",
                "warn",
            ]
            .into_iter()
            .chain(extra.iter().map(String::as_str))
            .collect::<Vec<_>>(),
            &mnt,
            &hdir.join("rafsd-fuse.log"),
        );
        watchdog.watch(d.pid(), Some(&mnt));
        d
    };
    let h = start_fuse();
    std::io::copy(
        &mut File::open(mnt.join("big.bin")).unwrap(),
        &mut std::io::sink(),
    )
    .unwrap();
    let stop_fuse = |h: daemon::Daemon| {
        let pid = h.pid();
        assert!(h.stop().success());
        watchdog.unwatch(pid);
    };
    stop_fuse(h);
    let hmetrics = || fops(&apisock, "/");
    let cpaths: Vec<CString> = meta_paths
        .iter()
        .map(|p| CString::new(mnt.join(p).as_os_str().as_bytes()).unwrap())
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
    // O_DIRECT needs an aligned buffer.
    let mut raw = vec![0u8; (MIB + 4096) as usize];
    let skew = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[skew..skew + MIB as usize];

    let mut r = Results::default();
    let n_meta = meta_paths.len() as f64;
    for round in 0..a.rounds {
        eprintln!("round {}/{}", round + 1, a.rounds);
        // virtio-fs
        measure(n_meta, LOOKUP, &vmetrics, &mut r.lookup[0], &mut || {
            for (parent, name) in &lookups {
                g.lookup(*parent, name).unwrap();
            }
        });
        measure(n_meta, GETATTR, &vmetrics, &mut r.getattr[0], &mut || {
            for &n in &attrs {
                g.getattr(n).unwrap();
            }
        });
        measure(
            size as f64 / 1e6,
            READ,
            &vmetrics,
            &mut r.seq[0],
            &mut || vread_all(&mut g),
        );
        measure(
            rand.len() as f64,
            READ,
            &vmetrics,
            &mut r.rand[0],
            &mut || {
                for &off in &rand {
                    assert_eq!(g.read_in_place(big, fh, off, 4096).unwrap(), 4096);
                }
            },
        );

        // host FUSE: a fresh mount per round, so the kernel's dentry cache is cold for the LOOKUP pass.
        let h = start_fuse();
        measure(n_meta, LOOKUP, &hmetrics, &mut r.lookup[1], &mut || {
            cpaths.iter().for_each(|c| statx(c, 0))
        });
        measure(n_meta, GETATTR, &hmetrics, &mut r.getattr[1], &mut || {
            cpaths
                .iter()
                .for_each(|c| statx(c, libc::AT_STATX_FORCE_SYNC))
        });
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(mnt.join("big.bin"))
            .unwrap();
        measure(
            size as f64 / 1e6,
            READ,
            &hmetrics,
            &mut r.seq[1],
            &mut || {
                let mut off = 0;
                while off < size {
                    let n = f.read_at(buf, off).unwrap() as u64;
                    assert!(n > 0);
                    off += n;
                }
            },
        );
        measure(
            rand.len() as f64,
            READ,
            &hmetrics,
            &mut r.rand[1],
            &mut || {
                for &off in &rand {
                    assert_eq!(f.read_at(&mut buf[..4096], off).unwrap(), 4096);
                }
            },
        );
        drop(f);
        stop_fuse(h);
    }
    g.release(big, fh, false).unwrap();
    drop(g);
    watchdog.unwatch(dev.pid());
    dev.kill_and_check();

    println!();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split(' ').take(3).collect();
    println!(
        "load average at the end: {} (2+ means other work competed for the CPUs)",
        load.join(" ")
    );
    let cpus = a.pin_cpu.map_or("any CPU".to_string(), |c| {
        format!("all processes pinned to CPU {c}")
    });
    println!("image: {} entries + big.bin of {} MiB; {} rounds; one request in flight on each side; {cpus}", meta_paths.len(), a.size_mib, a.rounds);
    println!(
        "{:<22} {:>5} {:>21} {:>21} {:>14} {:>16}",
        "operation",
        "unit",
        "virtio-fs med/best",
        "host FUSE med/best",
        "ratio med/best",
        "daemon reqs v/h"
    );
    let count = |n: Option<u64>| n.map_or("-".to_string(), |n| n.to_string());
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let row = |name: &str, unit: &str, s: &[Sample; 2]| {
        let (vm, hm, vb, hb) = (
            median(&s[0].rates),
            median(&s[1].rates),
            best(&s[0].rates),
            best(&s[1].rates),
        );
        println!(
            "{name:<22} {unit:>5} {:>21} {:>21} {:>14} {:>16}",
            format!("{vm:.0} / {vb:.0}"),
            format!("{hm:.0} / {hb:.0}"),
            format!("{:.2} / {:.2}", vm / hm, vb / hb),
            format!("{}/{}", count(s[0].requests), count(s[1].requests))
        );
    };
    row("READ 1 MiB sequential", "MB/s", &r.seq);
    row("READ 4 KiB random", "op/s", &r.rand);
    row("LOOKUP", "op/s", &r.lookup);
    row("GETATTR", "op/s", &r.getattr);
}
