//! The virtio-fs column of `ci/bench-startup.sh` (not a timed test): one QEMU (TCG) guest starts the
//! benchmark's program (`chroot ROOT CMD...`) from RAFS images that `rafsd virtiofs` serves lazily from a
//! registry through the registry backend. Each round of each image is a pseudo mount of its own with an
//! empty blob cache (the guest's caches are dropped before each run), so every round is cold on both sides
//! without rebooting the guest. A last run repeats the first round's mount warm (everything cached in the
//! guest), which shows what the program costs under TCG without any I/O.
//!
//!   cargo bench --bench startup -- --registry HOST:PORT --repo REPO --rounds N
//!       --image LABEL:PREFETCH:BOOTSTRAP... -- CMD...
//!
//! PREFETCH is 1 to prefetch the image's prefetch table. Prints one line per run:
//! `STARTUP LABEL ROUND SECONDS FETCHED NEEDED` (bytes fetched from the registry and compressed bytes of
//! the chunks the program read, from the mount's backend metrics), `STARTUP warm 0 SECONDS 0 0` last.
//! Run it inside the benchmark's network namespace (the registry address is a loopback one there).

use kit::{daemon, guestvm};

use std::path::PathBuf;
use std::time::Duration;

use guestvm::Vm;

struct Image {
    label: String,
    prefetch: bool,
    bootstrap: PathBuf,
}

struct Args {
    registry: String,
    repo: String,
    rounds: usize,
    images: Vec<Image>,
    cmd: Vec<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        registry: String::new(),
        repo: String::new(),
        rounds: 3,
        images: Vec::new(),
        cmd: Vec::new(),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.into_iter();
    while let Some(w) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{w} needs a value"));
        match w.as_str() {
            "--registry" => a.registry = value(),
            "--repo" => a.repo = value(),
            "--rounds" => a.rounds = value().parse().expect("--rounds N"),
            "--image" => {
                let v = value();
                let mut parts = v.splitn(3, ':');
                let (Some(label), Some(prefetch), Some(path)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    panic!("--image LABEL:PREFETCH:BOOTSTRAP, got {v}");
                };
                a.images.push(Image {
                    label: label.into(),
                    prefetch: prefetch == "1",
                    bootstrap: path.into(),
                });
            }
            "--bench" => {}
            "--" => {
                a.cmd = it.by_ref().collect();
                break;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        !a.registry.is_empty() && !a.images.is_empty() && !a.cmd.is_empty(),
        "usage: --registry HOST:PORT --repo REPO --image LABEL:PREFETCH:BOOTSTRAP -- CMD..."
    );
    a
}

/// Single-quote `s` for the guest's shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn main() {
    let a = parse_args();
    guestvm::require_tools();
    let kernel = guestvm::debian_kernel();
    let tmp = guestvm::work_dir("rafsd-bench-startup.");
    let vm = Vm::new(tmp.path());
    let (helper, initrd) = guestvm::guest_files(&vm.dir, "");
    let cmd: Vec<String> = a.cmd.iter().map(|c| quote(c)).collect();
    let cmd = cmd.join(" ");
    let mut runs = Vec::new();
    for image in &a.images {
        for round in 1..=a.rounds {
            runs.push(format!("{}-{round}", image.label));
        }
    }
    let script = format!(
        r#"N={nonce}
now() {{ cut -d' ' -f1 /proc/uptime; }}
for m in {mounts}; do
    sync
    echo 3 >/proc/sys/vm/drop_caches
    t0=$(now)
    chroot /mnt/$m {cmd} >/tmp/out 2>&1 || echo "STARTUP-ERR $N $m $(head -c 300 /tmp/out | tr '\n' ' ')"
    t1=$(now)
    echo "RUN $N $m $t0 $t1"
done
t0=$(now)
chroot /mnt/{first} {cmd} >/dev/null 2>&1
t1=$(now)
echo "RUN $N warm $t0 $t1"
"#,
        nonce = vm.nonce,
        mounts = runs.join(" "),
        first = runs[0],
    );
    let shared = vm.helper_share(&helper, "startup.sh", &script);
    let mut allow: Vec<String> = vec!["--allow-network".into()];
    for image in &a.images {
        allow.push("--allow-path".into());
        allow.push(image.bootstrap.parent().unwrap().display().to_string());
    }
    let allow: Vec<&str> = allow.iter().map(String::as_str).collect();
    let mut rafsd = vm.start_rafsd(&allow);
    for image in &a.images {
        for round in 1..=a.rounds {
            let mp = format!("/{}-{round}", image.label);
            let cache = vm.dir.join(format!("cache-{}-{round}", image.label));
            let prefetch = if image.prefetch {
                r#","fs_prefetch":{"enable":true,"threads_count":4}"#
            } else {
                ""
            };
            let config = format!(
                r#"{{"device":{{"backend":{{"type":"registry","config":{{"scheme":"http","host":"{}","repo":"{}","timeout":30}}}},
                     "cache":{{"type":"blobcache","config":{{"work_dir":"{}"}}}}}},
                    "mode":"direct","digest_validate":false,"access_pattern":true{prefetch}}}"#,
                a.registry,
                a.repo,
                cache.display()
            );
            let body =
                serde_json::json!({"source": image.bootstrap, "fs_type": "rafs", "config": config})
                    .to_string();
            vm.expect_api(
                "POST",
                &format!("/api/v1/mount?mountpoint={mp}"),
                &body,
                204,
            );
        }
    }
    vm.share("/containers", &shared);
    let limit = 300 + 120 * runs.len() as u64;
    let mut qemu = vm.start_qemu(
        &kernel,
        &initrd,
        "rafs_run=/containers/startup.sh",
        1024,
        limit,
    );
    vm.wait_for(
        &format!("DONE {}", vm.nonce),
        Duration::from_secs(limit - 10),
        &mut qemu,
        &mut rafsd,
    );
    if let Some(l) = vm.line(&format!("STARTUP-ERR {} ", vm.nonce)) {
        vm.fail(format!("the program failed in the guest: {l}"));
    }
    let serial = vm.serial_text();
    let tag = format!("RUN {} ", vm.nonce);
    for line in serial.lines() {
        let Some(i) = guestvm::marker_at(line, &tag) else {
            continue;
        };
        let f: Vec<&str> = line[i + tag.len()..].split_whitespace().collect();
        let secs = f[2].parse::<f64>().unwrap() - f[1].parse::<f64>().unwrap();
        let (fetched, needed) = if f[0] == "warm" {
            (0, 0)
        } else {
            let (status, body) =
                vm.api("GET", &format!("/api/v1/metrics/backend?id=/{}", f[0]), "");
            assert_eq!(status, 200, "backend metrics of /{}: {body}", f[0]);
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            (
                v["read_amount_total"].as_u64().unwrap_or(0),
                v["demand_compressed_bytes"].as_u64().unwrap_or(0),
            )
        };
        let (label, round) = f[0].rsplit_once('-').unwrap_or((f[0], "0"));
        println!("STARTUP {label} {round} {secs:.3} {fetched} {needed}");
    }
    let _ = daemon::wait_bounded(qemu.child.as_mut().unwrap(), Duration::from_secs(30));
    drop(rafsd);
}
