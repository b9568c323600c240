//! DAX benchmark (not a timed test): bytes/s reading one large RAFS file through the virtio-fs DAX window
//! vs. through FUSE_READ, in one run, against one `rafsd virtiofs --dax-window` process. The test frontend
//! (`kit::frontend`) plays the VMM and the guest driver; its window answers SHMEM_MAP by mmapping the fd.
//!
//! - FUSE_READ: 1 MiB reads, one in flight, the data landing in guest RAM (a guest's page cache).
//! - DAX: per 2 MiB range a SETUPMAPPING, then the guest copies the range out of the window into a 1 MiB
//!   buffer (its page faults included), and after the whole file one REMOVEMAPPING for every range: the
//!   cost of a guest that maps, reads once and lets the ranges go.
//! - DAX, mapped: reading the ranges again while they stay mapped (the steady state DAX is for).
//!
//! The blob cache is warmed first, so every method reads from the host page cache of the cache file.
//!
//!   cargo bench --bench dax -- [--rounds N] [--size-mib M]       (ci/bench-dax.sh)

use kit::{bench::image, daemon, frontend};

use std::path::{Path, PathBuf};
use std::time::Instant;

use frontend::window::{Window, WindowServer};
use frontend::{Guest, Options, Rng, VirtiofsDaemon, ROOT};
use vhost::vhost_user::VhostUserProtocolFeatures;

const BIN: &str = env!("CARGO_BIN_EXE_rafsd");
const MIB: u64 = 1 << 20;
const RANGE: u64 = 2 * MIB;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A directory holding one `size_mib` MiB random file, built into an image once and reused.
fn build_image(work: &Path, size_mib: u64) -> (PathBuf, PathBuf) {
    let (src, bootstrap, blobs) = (
        work.join(format!("src-{size_mib}m")),
        work.join(format!("bootstrap-{size_mib}m")),
        work.join(format!("blobs-{size_mib}m")),
    );
    if bootstrap.exists() {
        return (bootstrap, blobs);
    }
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&blobs);
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&blobs).unwrap();
    let mut rng = Rng(0xda7a_0fb1_6f11);
    image::write_random_file(&src.join("big.bin"), size_mib, || rng.next());
    image::rafsd_build(&src, &bootstrap, &blobs);
    (bootstrap, blobs)
}

fn main() {
    let (mut rounds, mut size_mib) = (5usize, 256u64);
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--rounds" => rounds = value().parse().expect("--rounds N"),
            "--size-mib" => size_mib = value().parse().expect("--size-mib M"),
            "--bench" => {}
            other => panic!("unknown argument {other}; use --rounds N --size-mib M"),
        }
    }
    let rounds = rounds.max(1);
    let size = size_mib * MIB;
    let window_size = size.div_ceil(RANGE) * RANGE;
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-dax");
    let (bootstrap, blobs) = build_image(&work, size_mib);
    let run = tempfile::Builder::new()
        .prefix("rafsd-bench-dax")
        .tempdir()
        .unwrap();
    let run = run.path();
    let window_arg = format!("{}M", window_size / MIB);
    let dev = VirtiofsDaemon::start(
        BIN,
        run,
        &[
            "--log-level",
            "warn",
            "--dax-window",
            &window_arg,
            // The image lives in the target dir, outside the paths the test daemons allow by default.
            "--allow-path",
            work.to_str().unwrap(),
        ],
    );
    dev.mount_rafs(
        "/img",
        &bootstrap,
        &daemon::v1_config(&blobs, &run.join("cache"), false, ""),
    );

    let window = Window::new(window_size).unwrap();
    let server = WindowServer::start(window.clone()).unwrap();
    let opts = Options {
        extra_protocol: VhostUserProtocolFeatures::SHMEM
            | VhostUserProtocolFeatures::BACKEND_SEND_FD,
        backend_req_fd: Some(server.device_fd),
        request_queues: 1,
        ..Options::default()
    };
    let mut g = Guest::connect(&dev.sock, opts).expect("vhost-user handshake");
    g.fuse_init().unwrap();
    let img = g.lookup(ROOT, b"img").unwrap().nodeid;
    let big = g.lookup(img, b"big.bin").unwrap().nodeid;
    let fh = g.open(big).unwrap().fh;

    let fuse_read = |g: &mut Guest| {
        let mut off = 0;
        while off < size {
            let n = g.read_in_place(big, fh, off, MIB as u32).unwrap() as u64;
            assert!(n > 0);
            off += n;
        }
    };
    // Warm the blob cache (and the host page cache of its file): every method then reads the same pages.
    fuse_read(&mut g);

    let mut buf = vec![0u8; MIB as usize];
    let mut copy_out = |w: &Window, from: u64, len: u64| {
        let mut at = 0;
        while at < len {
            let n = (len - at).min(MIB);
            buf[..n as usize].copy_from_slice(w.bytes(from + at, n));
            at += n;
        }
        std::hint::black_box(&buf);
    };
    let ranges: Vec<u64> = (0..size).step_by(RANGE as usize).collect();
    let (mut read_rates, mut dax_rates, mut mapped_rates) = (Vec::new(), Vec::new(), Vec::new());
    let mut setup_secs = Vec::new();
    let mut direct = None;
    for _ in 0..rounds {
        let t = Instant::now();
        fuse_read(&mut g);
        read_rates.push(size as f64 / t.elapsed().as_secs_f64());

        let t = Instant::now();
        let mut in_setup = 0.0;
        for &off in &ranges {
            let s = Instant::now();
            g.setupmapping(big, fh, off, RANGE, 2, off).unwrap();
            in_setup += s.elapsed().as_secs_f64();
            copy_out(&window, off, (size - off).min(RANGE));
        }
        let mapped_at = Instant::now();
        if direct.is_none() {
            // Which share of the file the window shows straight from the blob cache file.
            let from_cache: u64 = window
                .backing()
                .iter()
                .filter(|(_, _, name)| name.contains(".blob.data"))
                .map(|(_, len, _)| len)
                .sum();
            direct = Some(from_cache as f64 / size as f64);
        }
        for &off in &ranges {
            copy_out(&window, off, (size - off).min(RANGE));
        }
        let mapped_time = mapped_at.elapsed();
        mapped_rates.push(size as f64 / mapped_time.as_secs_f64());
        let list: Vec<(u64, u64)> = ranges.iter().map(|&o| (o, RANGE)).collect();
        // Up to 128 ranges per REMOVEMAPPING, as a request slot holds.
        for part in list.chunks(128) {
            g.removemapping(big, part).unwrap();
        }
        dax_rates.push(size as f64 / (t.elapsed() - mapped_time).as_secs_f64());
        setup_secs.push(in_setup);
        assert!(!window.is_mapped(0));
    }
    g.release(big, fh, false).unwrap();
    let mibs = |r: f64| r / MIB as f64;
    let (fr, dr, mr) = (
        median(&read_rates),
        median(&dax_rates),
        median(&mapped_rates),
    );
    println!(
        "DAX vs FUSE_READ, one {size_mib} MiB file from a warm blob cache, {rounds} rounds (medians), {} SETUPMAPPINGs of 2 MiB per pass",
        ranges.len()
    );
    println!("{:<44} {:>12} {:>10}", "method", "MiB/s", "ratio");
    println!(
        "{:<44} {:>12.0} {:>10.2}",
        "FUSE_READ 1 MiB (baseline)",
        mibs(fr),
        1.0
    );
    println!(
        "{:<44} {:>12.0} {:>10.2}",
        "DAX: map + read + unmap",
        mibs(dr),
        dr / fr
    );
    println!(
        "{:<44} {:>12.0} {:>10.2}",
        "DAX: read while mapped",
        mibs(mr),
        mr / fr
    );
    println!(
        "mapped straight from the blob cache file: {:.1}% of the file (the rest from copies)",
        direct.unwrap_or(0.0) * 100.0
    );
    println!(
        "SETUPMAPPING time per 2 MiB range: {:.1} us (median over rounds)",
        median(&setup_secs) * 1e6 / ranges.len() as f64
    );
    drop(g);
    drop(server);
    dev.kill_and_check();
}
