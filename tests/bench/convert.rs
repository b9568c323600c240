//! `ci/bench-convert.sh`: convert a Debian rootfs image (layer tarballs made by the script) from a local
//! `docker-registry` with `rafsd convert`, and compare with a baseline measured in the same run: `curl`
//! pulling the same layers plus `rafsd build` of each downloaded layer (the pull-then-build a converter
//! cannot avoid; no push). Prints medians of the rounds, their ratio, and the bytes pushed against the
//! source size.
//!
//! cargo bench --bench convert -- --registry HOST:PORT --rafsd BIN --work DIR [--rounds N] LAYER.tar.gz...

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use rafsd::storage::distribution::{sha256_digest, Client, NetOptions, Payload, Reference};
use sha2::Digest;

fn file_digest(path: &Path, gunzip: bool) -> String {
    let file = std::fs::File::open(path).unwrap();
    let mut reader: Box<dyn Read> = match gunzip {
        true => Box::new(flate2::read::GzDecoder::new(file)),
        false => Box::new(file),
    };
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("sha256:{:x}", h.finalize())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?}:\n{text}");
    text
}

/// "pushed N blobs, M bytes" from rafsd convert's summary.
fn pushed(summary: &str) -> (u64, u64) {
    let tail = summary.split("pushed ").nth(1).unwrap_or("");
    let nums: Vec<u64> = tail
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(2)
        .map(|s| s.parse().unwrap())
        .collect();
    (nums[0], nums[1])
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut registry, mut rafsd, mut work, mut rounds, mut layers) = (
        String::new(),
        PathBuf::new(),
        PathBuf::new(),
        3usize,
        Vec::<PathBuf>::new(),
    );
    while let Some(a) = args.next() {
        match a.as_str() {
            "--registry" => registry = args.next().unwrap(),
            "--rafsd" => rafsd = args.next().unwrap().into(),
            "--work" => work = args.next().unwrap().into(),
            "--rounds" => rounds = args.next().unwrap().parse().unwrap(),
            "--bench" => {}
            other => layers.push(other.into()),
        }
    }
    assert!(
        !registry.is_empty() && !layers.is_empty(),
        "see the header of tests/bench/convert.rs"
    );
    let net = NetOptions {
        plain_http: true,
        ..Default::default()
    };

    // The source image, pushed with our own client.
    let source = Reference::parse(&format!("{registry}/bench/debian:src")).unwrap();
    let client = Client::with_credentials(&source, &net, None).unwrap();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut source_bytes = 0;
    for l in &layers {
        let size = std::fs::metadata(l).unwrap().len();
        let digest = file_digest(l, false);
        client.push_blob(&digest, size, Payload::File(l)).unwrap();
        diff_ids.push(file_digest(l, true));
        source_bytes += size;
        descs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .unwrap();
    let config_digest = sha256_digest(&config);
    client
        .push_blob(&config_digest, config.len() as u64, Payload::Bytes(&config))
        .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descs
    }))
    .unwrap();
    client
        .put_manifest(
            "src",
            "application/vnd.oci.image.manifest.v1+json",
            &manifest,
        )
        .unwrap();
    println!(
        "source: {} layers, {source_bytes} bytes compressed",
        layers.len()
    );

    let convert = |target: &str, extra: &[&str]| -> (f64, String) {
        let start = Instant::now();
        let out = run(Command::new(&rafsd)
            .args([
                "convert",
                "-l",
                "warn",
                "--source",
                &source.to_string(),
                "--target",
                target,
                "--plain-http",
            ])
            .args(["--work-dir", work.to_str().unwrap()])
            .args(extra));
        (start.elapsed().as_secs_f64(), out)
    };
    let cache = work.join("cache");
    let cache_args = ["--cache-dir", cache.to_str().unwrap()];
    let (mut cold, mut warm, mut base) = (Vec::new(), Vec::new(), Vec::new());
    let mut cold_pushed = (0, 0);
    // Fill the cache once (not timed as warm).
    convert(&format!("{registry}/bench/nydus-warm:v1"), &cache_args);
    for round in 0..rounds {
        // Cold: an empty target repository, no cache.
        let (secs, out) = convert(
            &format!("{registry}/bench/nydus-{round}:v1"),
            &["--no-cache"],
        );
        cold_pushed = pushed(&out);
        cold.push(secs);
        // Warm: the same target, the layer cache filled.
        let (secs, out) = convert(&format!("{registry}/bench/nydus-warm:v1"), &cache_args);
        assert_eq!(pushed(&out).0, 0, "a warm conversion pushed blobs:\n{out}");
        warm.push(secs);
        // Baseline: curl the layers, then rafsd build each one.
        let dir = work.join(format!("baseline-{round}"));
        std::fs::create_dir_all(&dir).unwrap();
        let start = Instant::now();
        for (i, d) in descs.iter().enumerate() {
            let digest = d["digest"].as_str().unwrap();
            let file = dir.join(format!("layer-{i}.tar.gz"));
            run(Command::new("curl")
                .args(["-sfo", file.to_str().unwrap()])
                .arg(format!("http://{registry}/v2/bench/debian/blobs/{digest}")));
            run(Command::new(&rafsd)
                .args(["build", "-l", "warn"])
                .arg(&file)
                .args([
                    "--bootstrap",
                    dir.join(format!("boot-{i}")).to_str().unwrap(),
                    "--blob-dir",
                    dir.join("blobs").to_str().unwrap(),
                ]));
        }
        base.push(start.elapsed().as_secs_f64());
        let _ = std::fs::remove_dir_all(&dir);
        println!(
            "round {}: convert cold {:.2}s, warm {:.2}s; baseline (curl + rafsd build) {:.2}s",
            round + 1,
            cold[round],
            warm[round],
            base[round]
        );
    }
    let (c, w, b) = (median(&mut cold), median(&mut warm), median(&mut base));
    println!("median of {rounds} rounds:");
    println!("  rafsd convert (cold, empty target): {c:.2}s");
    println!("  rafsd convert (warm, layer cache):  {w:.2}s");
    println!("  baseline curl pull + rafsd build:   {b:.2}s");
    println!("  cold convert / baseline:            {:.2}", c / b);
    println!(
        "  pushed {} blobs, {} bytes = {:.2} x the source's {source_bytes} compressed bytes",
        cold_pushed.0,
        cold_pushed.1,
        cold_pushed.1 as f64 / source_bytes as f64
    );
}
