//! In-guest benchmark (not a timed test): one QEMU (TCG) guest reads the same RAFS v6 image through the
//! virtio-fs FUSE path (`rafsd`'s RAFS pseudo mount: every lookup, getattr, readdir and read is a FUSE
//! request to the host) and through the EROFS helper path (`rafs-guest mount` over the blob view: the
//! guest kernel parses the metadata itself and only reads bootstrap and blob blocks from the host), once
//! with EROFS's default buffered reads of the blob files and once mounted `-o directio` (no second copy
//! in the guest's page cache).
//! Per round and path, with the guest's caches dropped first: a metadata walk (`find -ls` over every
//! entry), a sequential read of one large file, and a read of every small file. Round 1 is cold on the
//! host too (each path has its own empty blob cache); later rounds are host-warm, guest-cold. Prints
//! both paths and the ratio EROFS/FUSE.
//!
//!   cargo bench --bench guest -- [--rounds N] [--size-mib M]        (ci/bench-guest.sh; needs root)
//!
//! The image (a copy of /usr/include plus an M MiB random file) is built once under target/tmp.

use kit::{bench::image, daemon, guestvm};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use guestvm::Vm;

struct Args {
    rounds: usize,
    size_mib: u64,
    work: PathBuf,
}

fn parse_args() -> Args {
    let mut a = Args {
        rounds: 4,
        size_mib: 64,
        work: guestvm::root().join("target/tmp/bench-guest"),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(w) = it.next() {
        let mut num = || -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{w} needs a number"))
        };
        match w.as_str() {
            "--rounds" => a.rounds = num().max(2) as usize,
            "--size-mib" => a.size_mib = num().max(1),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// (bootstrap, blob dir, bytes of small files, number of small files).
fn build_image(a: &Args) -> (PathBuf, PathBuf, u64, u64) {
    let (src, bootstrap, blobs) = (
        a.work.join("src"),
        a.work.join(format!("bootstrap-{}m", a.size_mib)),
        a.work.join(format!("blobs-{}m", a.size_mib)),
    );
    if !bootstrap.exists() {
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(src.join("include")).unwrap();
        let ok = Command::new("cp")
            .args(["-a", "/usr/include/."])
            .arg(src.join("include"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "cp -a /usr/include");
        // xorshift: incompressible, so the blob holds the full size.
        let mut x: u64 = 0x5eed_0fb1_6f11;
        image::write_random_file(&src.join("big.bin"), a.size_mib, || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        });
        std::fs::create_dir_all(&blobs).unwrap();
        image::rafsd_build(&src, &bootstrap, &blobs);
    }
    let (mut bytes, mut files) = (0, 0);
    let mut stack = vec![src.join("include")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                bytes += e.metadata().unwrap().len();
                files += 1;
            }
        }
    }
    (bootstrap, blobs, bytes, files)
}

/// Each round, for each path: drop the guest's caches, then time (from /proc/uptime) the walk (`ls -lR`:
/// readdir and lstat of every entry), the large read and the small-file reads.
fn guest_script(nonce: &str, rounds: usize) -> String {
    format!(
        r#"N={nonce}
G=/mnt/containers/rafs-guest
now() {{ cut -d' ' -f1 /proc/uptime; }}
mkdir -p /e
mkdir -p /e2
if ! $G mount --bootstrap /mnt/img/blobs/bootstrap --blob-dir /mnt/img/blobs /e 2>/tmp/err; then
    echo "BENCH-ERR $N $(tr '\n' ' ' </tmp/err)"
fi
$G mount -o directio --bootstrap /mnt/img/blobs/bootstrap --blob-dir /mnt/img/blobs /e2 ||
    echo "BENCH-ERR $N directio"
for r in $(seq 1 {rounds}); do
    for side in fuse erofs erofsdio; do
        if [ $side = fuse ]; then d=/mnt/img/fuse; elif [ $side = erofs ]; then d=/e; else d=/e2; fi
        sync
        echo 3 >/proc/sys/vm/drop_caches
        t0=$(now)
        n=$(ls -lR $d | wc -l)
        t1=$(now)
        cat $d/big.bin >/dev/null
        t2=$(now)
        find $d/include -type f -exec cat {{}} + >/dev/null
        t3=$(now)
        echo "BENCH $N $side $r $n $t0 $t1 $t2 $t3"
    done
done
umount /e
"#
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let a = parse_args();
    guestvm::require_tools();
    let kernel = guestvm::debian_kernel();
    let (bootstrap, blobs, small_bytes, small_files) = build_image(&a);
    let tmp = tempfile::Builder::new()
        .prefix("rafsd-bench-guest.")
        .tempdir()
        .unwrap();
    let vm = Vm::new(tmp.path());
    let (helper, initrd) = guestvm::guest_files(&vm.dir, "erofs");
    let shared = vm.helper_share(&helper, "bench.sh", &guest_script(&vm.nonce, a.rounds));
    // Validation off, as a production mount would run with CRC32C only.
    // The image lives in the target dir, outside the paths the test daemons allow by default.
    let image_dir = bootstrap.parent().unwrap().to_str().unwrap();
    let mut rafsd = vm.start_rafsd(&["--allow-path", image_dir]);
    for (mp, fs_type) in [("/img/fuse", "rafs"), ("/img/blobs", "blob_view")] {
        let (status, reply) = vm.mount_image(mp, fs_type, &bootstrap, &blobs, false);
        assert_eq!(status, 204, "mount {fs_type}: {reply}");
    }
    vm.share("/containers", &shared);
    let limit = 600 + 300 * a.rounds as u64;
    let mut qemu = vm.start_qemu(
        &kernel,
        &initrd,
        "rafs_run=/containers/bench.sh",
        1024,
        limit,
    );
    vm.wait_for(
        &format!("DONE {}", vm.nonce),
        Duration::from_secs(limit - 10),
        &mut qemu,
        &mut rafsd,
    );
    let serial = vm.serial_text();
    if let Some(l) = vm.line(&format!("BENCH-ERR {} ", vm.nonce)) {
        vm.fail(format!("the guest could not mount the blob view: {l}"));
    }
    // side → metric → per-round seconds; entries per side.
    let mut secs: BTreeMap<(String, &str), Vec<f64>> = BTreeMap::new();
    let mut entries = BTreeMap::new();
    let tag = format!("BENCH {} ", vm.nonce);
    for line in serial.lines() {
        let Some(i) = guestvm::marker_at(line, &tag) else {
            continue;
        };
        let f: Vec<&str> = line[i + tag.len()..].split_whitespace().collect();
        let t: Vec<f64> = f[3..7].iter().map(|v| v.parse().unwrap()).collect();
        entries.insert(f[0].to_string(), f[2].parse::<u64>().unwrap());
        for (k, metric) in ["walk", "big", "small"].into_iter().enumerate() {
            secs.entry((f[0].to_string(), metric))
                .or_default()
                .push((t[k + 1] - t[k]).max(0.005));
        }
    }
    let rounds = secs.get(&("fuse".into(), "walk")).map_or(0, Vec::len);
    if rounds < 2 || entries.len() != 3 {
        vm.fail(format!("expected {} rounds of both paths", a.rounds));
    }
    let (n_entries, big) = (entries["fuse"] as f64, (a.size_mib << 20) as f64);
    println!(
        "guest benchmark: QEMU TCG, 1 vCPU; image {} entries ({small_files} small files, {:.1} MiB; big.bin {} MiB); {rounds} rounds; EROFS entries {}",
        entries["fuse"],
        small_bytes as f64 / 1048576.0,
        a.size_mib,
        entries["erofs"]
    );
    println!(
        "{:<62} {:>14} {:>14} {:>8} {:>16} {:>8}",
        "", "virtio-fs FUSE", "EROFS helper", "ratio", "EROFS directio", "ratio"
    );
    for (phase, pick) in [
        ("cold host + guest", 0usize..1),
        ("warm host, cold guest (median)", 1..rounds),
    ] {
        for (metric, label, amount) in [
            ("walk", "metadata walk, entries/s", n_entries),
            ("big", "sequential read, MB/s", big / 1e6),
            ("small", "small files read, MB/s", small_bytes as f64 / 1e6),
        ] {
            let rate = |side: &str| {
                amount / median(secs[&(side.to_string(), metric)][pick.clone()].to_vec())
            };
            let (fuse, erofs, dio) = (rate("fuse"), rate("erofs"), rate("erofsdio"));
            println!(
                "{:<62} {fuse:>14.1} {erofs:>14.1} {:>7.2}x {dio:>16.1} {:>7.2}x",
                format!("{label} [{phase}]"),
                erofs / fuse,
                dio / fuse
            );
        }
    }
    let _ = daemon::wait_bounded(qemu.child.as_mut().unwrap(), Duration::from_secs(30));
    drop(rafsd);
}
