//! Network storage backends against real servers the tests start and stop themselves: Debian's
//! `docker-registry` (htpasswd auth) and `tinyproxy`, moto's S3 server (SigV4 checked by the server), and a
//! fault-injecting blob server of our own (`kit::services`) for Bearer tokens, redirects, mirrors, 500s,
//! 429s, resets, truncated bodies, wrong lengths and stalls. Images are mounted with real FUSE daemons and
//! compared with manifest.tsv. Needs root (mounting) and the packages of ci/install-deps.sh.

use kit::{built, daemon, frontend, manifest, services};

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use built::pseudo_random;
use daemon::{run_bounded, Daemon};
use rafsd::config::{BackendConfig, DaemonConfig, RemoteConfig};
use rafsd::storage::http::{HttpSettings, RemoteBackend};
use rafsd::storage::registry::Registry;
use rafsd::storage::BlobBackend;
use serde_json::json;
use services::{FakeOptions, FakeServer, Fault, RegistryAuth};
use sha2::Digest;

const REPO: &str = "rafsd/test";

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("rafsd-backends-")
        .tempdir()
        .unwrap()
}

/// A registry backend with the settings block `cfg` (v2 `backend.registry`), read by the config parser.
fn registry_backend(cfg: serde_json::Value) -> RemoteBackend<Registry> {
    let text = json!({"version": 2, "backend": {"type": "registry", "registry": cfg}});
    let config = DaemonConfig::from_slice(text.to_string().as_bytes()).unwrap();
    let BackendConfig::Network {
        remote: RemoteConfig::Registry(registry),
        http,
    } = config.backend
    else {
        panic!("not a registry: {:?}", config.backend)
    };
    RemoteBackend::new(Registry::new(&registry).unwrap(), HttpSettings::new(&http)).unwrap()
}

/// A fault server holding one 3 MiB pseudo-random blob (from `seed`), and a registry backend on it with
/// 1 s timeouts and 3 retries.
fn fake_registry_blob(seed: u64) -> (FakeServer, Vec<u8>, String, RemoteBackend<Registry>) {
    let server = FakeServer::start(FakeOptions {
        repo: REPO.into(),
        bearer: None,
        token_basic: None,
        redirect_to: None,
        storage_head_403: false,
    });
    let data = pseudo_random(3 << 20, seed);
    let id = server.add_blob(data.clone());
    let backend = registry_backend(json!({
        "scheme": "http", "host": format!("127.0.0.1:{}", server.port), "repo": REPO,
        "timeout": 1, "connect_timeout": 1, "retry_limit": 3
    }));
    (server, data, id, backend)
}

/// Options of a plain fake registry: blobs under [`REPO`], no auth, no redirects.
fn plain() -> FakeOptions {
    FakeOptions::plain(REPO)
}

/// Two fake servers, started with `a` and `b`, serving the same 1 MiB blob (`seed`): an origin and a
/// route to it (a mirror, a proxy).
fn same_blob_on(
    a: FakeOptions,
    b: FakeOptions,
    seed: u64,
) -> (FakeServer, FakeServer, Vec<u8>, String) {
    let (first, second) = (FakeServer::start(a), FakeServer::start(b));
    let data = pseudo_random(1 << 20, seed);
    let id = first.add_blob(data.clone());
    assert_eq!(second.add_blob(data.clone()), id);
    (first, second, data, id)
}

/// Blob bytes the registry sent, from its access log (combined format: `"GET ..." status size`).
fn registry_bytes_served(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
        .filter_map(|l| {
            let after = l.split("HTTP/1.1\" ").nth(1)?;
            let mut f = after.split_whitespace();
            let status = f.next()?;
            let size = f.next()?.parse::<u64>().ok()?;
            matches!(status, "200" | "206").then_some(size)
        })
        .sum()
}

/// The data blobs of a fixture case (files named by a 64-hex blob id; anything else is not a blob).
fn case_blobs(case: &str) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(manifest::case_blob_dir(case))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
        })
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// Our fault-injecting registry (Bearer tokens valid `bearer` seconds, if any) serving the blobs of `case`.
fn fake_registry_with(case: &str, bearer: Option<u64>) -> FakeServer {
    let server = FakeServer::start(FakeOptions {
        repo: REPO.into(),
        bearer,
        token_basic: None,
        redirect_to: None,
        storage_head_403: false,
    });
    for (id, data) in case_blobs(case) {
        assert_eq!(server.add_blob(data), id);
    }
    server
}

/// A v1 daemon config for a network backend, with a blob cache and digest validation.
fn net_config(dir: &Path, kind: &str, backend: serde_json::Value) -> PathBuf {
    let cfg = json!({
        "device": {
            "backend": {"type": kind, "config": backend},
            "cache": {"type": "blobcache", "config": {"work_dir": dir.join("cache")}}
        },
        "mode": "direct",
        "digest_validate": true
    });
    let path = dir.join("config.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

fn mount(dir: &Path, config: &Path, bootstrap: &Path) -> Daemon {
    Daemon::start(
        &[
            "fuse",
            "--config",
            config.to_str().unwrap(),
            "--bootstrap",
            bootstrap.to_str().unwrap(),
            "--thread-num",
            "4",
        ],
        &dir.join("mnt"),
        &dir.join("rafsd.log"),
    )
}

fn assert_matches_manifest(d: &Daemon, case: &str) {
    let problems = manifest::compare_tree(&d.mountpoint, manifest::allowances_for(case));
    assert!(
        problems.is_empty(),
        "{case}: {} mismatches, first: {:#?}\nlog:\n{}",
        problems.len(),
        &problems[..problems.len().min(10)],
        d.log_text()
    );
}

/// The largest regular file of the manifest: (path, sha256).
fn largest_file() -> (String, String) {
    let rows = manifest::load_manifest();
    let row = rows
        .iter()
        .filter(|r| r["type"] == "f")
        .max_by_key(|r| r["size"].parse::<u64>().unwrap_or(0))
        .unwrap();
    (row["path"].clone(), row["sha256"].clone())
}

/// Drop the host's page cache for one file so the next read goes to the daemon again.
fn drop_cache(path: &Path) {
    if let Ok(f) = std::fs::File::open(path) {
        use std::os::fd::AsRawFd;
        // SAFETY: valid fd.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

// ---------------------------------------------------------------------------------------------------
// Fault injection (library level: exact counts and timings).

#[test]
fn faults_are_retried_and_never_return_wrong_bytes() {
    let (server, data, id, backend) = fake_registry_blob(7);
    assert_eq!(backend.blob_size(&id).unwrap(), data.len() as u64);
    // Healthy reads reuse one pooled connection.
    let conns = server.counters.connections.load(Ordering::Relaxed);
    for i in 0..10 {
        assert!(
            backend.read_exact_at(&id, i * 1000, 1000).unwrap()
                == data[i as usize * 1000..(i as usize + 1) * 1000]
        );
    }
    assert_eq!(
        server.counters.connections.load(Ordering::Relaxed),
        conns,
        "a connection per request"
    );
    let faults = [
        Fault::Status(500),
        Fault::Status(503),
        Fault::TooMany(1),
        Fault::Reset,
        Fault::Truncate,
        Fault::WrongLength,
        Fault::Stall(Duration::from_secs(3)),
    ];
    for (i, fault) in faults.iter().enumerate() {
        server.queue(&[fault.clone(), fault.clone()]);
        let offset = (i as u64 * 300_000) % (2 << 20);
        let before = backend.http.counters.retries.load(Ordering::Relaxed);
        let start = Instant::now();
        let got = backend
            .read_exact_at(&id, offset, 1 << 20)
            .unwrap_or_else(|e| panic!("{fault:?}: {e}"));
        assert!(
            got == data[offset as usize..offset as usize + (1 << 20)],
            "{fault:?}: wrong bytes"
        );
        assert_eq!(
            backend.http.counters.retries.load(Ordering::Relaxed) - before,
            2,
            "{fault:?}: two failed attempts, then success"
        );
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "{fault:?}: {:?}",
            start.elapsed()
        );
    }
    // The whole blob in one read, through two faults.
    server.queue(&[Fault::Truncate, Fault::Status(500)]);
    let before = backend.http.counters.requests.load(Ordering::Relaxed);
    assert!(
        backend.read_exact_at(&id, 0, data.len()).unwrap() == data,
        "whole blob"
    );
    assert_eq!(
        backend.http.counters.requests.load(Ordering::Relaxed) - before,
        3
    );
    // A read at the very end of the blob is clamped, not an error.
    let mut tail = vec![0u8; 100];
    assert_eq!(
        backend
            .read_at(&id, data.len() as u64 - 10, &mut tail)
            .unwrap(),
        10
    );
    assert_eq!(&tail[..10], &data[data.len() - 10..]);

    // Persistent faults: EIO within a bound set by timeout, retry_limit and the backoff.
    for fault in [
        Fault::Status(500),
        Fault::Reset,
        Fault::Stall(Duration::from_secs(10)),
        Fault::EndlessHead,
        Fault::Garbage,
        Fault::Status(404),
    ] {
        server.set_always(Some(fault.clone()));
        let before = backend.http.counters.retries.load(Ordering::Relaxed);
        let start = Instant::now();
        let err = backend.read_exact_at(&id, 0, 4096).unwrap_err();
        let took = start.elapsed();
        assert_eq!(err.errno(), libc::EIO, "{fault:?}: {err}");
        // retry_limit 3: 4 attempts, or 1 for a 404 (not retried), counted rather than timed.
        let retries = backend.http.counters.retries.load(Ordering::Relaxed) - before;
        let want = if fault == Fault::Status(404) { 0 } else { 3 };
        assert_eq!(retries, want, "{fault:?}: retries");
        // Each attempt is cut at its 1 s timeout (4 s plus 0.7 s of backoff): well within one 10 s
        // stall, with room for a loaded machine.
        assert!(took < Duration::from_secs(9), "{fault:?} took {took:?}");
    }
    server.set_always(None);
    assert_eq!(backend.read_exact_at(&id, 5, 5).unwrap(), data[5..10]);
}

/// A server that ignores `Range` and answers 200 with the whole blob: taken when the read asked for the
/// whole blob; for a part of it, the body is read no further than the part's length (never the whole
/// blob into memory) and the read is retried, then fails, like any wrong answer.
#[test]
fn a_whole_blob_answer_to_a_ranged_get_is_never_read_past_the_range() {
    use std::io::Read;
    let (server, data, id, backend) = fake_registry_blob(31);
    assert_eq!(backend.blob_size(&id).unwrap(), data.len() as u64);
    server.set_always(Some(Fault::WholeBlob));
    assert!(backend.read_exact_at(&id, 0, data.len()).unwrap() == data);
    let received = backend.http.counters.body_bytes.load(Ordering::Relaxed);
    let err = backend.read_exact_at(&id, 4096, 4096).unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    let more = backend.http.counters.body_bytes.load(Ordering::Relaxed) - received;
    // 4 attempts, each stopped once the body passed 4 KiB.
    assert!(
        more <= 4 * 4096,
        "{more} bytes kept in memory for a 4 KiB read"
    );
    let mut stream = backend.open_range(&id, 4096, 4096);
    let streamed = stream
        .as_mut()
        .map_err(|e| e.to_string())
        .and_then(|r| r.read_to_end(&mut Vec::new()).map_err(|e| e.to_string()));
    streamed.expect_err("a streamed part answered with the whole blob");
    server.set_always(None);
    assert_eq!(backend.read_exact_at(&id, 5, 5).unwrap(), data[5..10]);
}

/// The result of `f` on a thread of its own, or `None` if it is still running after `limit` (the thread is
/// left behind: the point is that it should not have been).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

/// A server that drips its answer (every read makes progress, so no per-read timeout fires) holds no
/// reader past the `timeout`: a ranged GET read whole fails within its attempts' deadlines, and so does a
/// streamed range, whose head must come within the `timeout` and whose body must keep up at least a MiB
/// per `timeout`. Before, a streamed range had no deadline at all: a FUSE worker (or a background stream
/// and every reader waiting on the chunks it claimed) stayed with the dripping server for days, and a
/// daemon's workers are every mount's.
#[test]
fn a_server_dripping_its_answer_holds_no_reader_past_the_timeout() {
    use std::io::Read;
    let (server, data, id, backend) = fake_registry_blob(13);
    let backend = Arc::new(backend);
    assert_eq!(backend.blob_size(&id).unwrap(), data.len() as u64);
    let every = Duration::from_millis(200);
    for fault in [Fault::Trickle(every), Fault::TrickleHead(every)] {
        server.set_always(Some(fault.clone()));
        let (b, blob) = (backend.clone(), id.clone());
        let start = Instant::now();
        let whole = within(Duration::from_secs(20), move || {
            b.read_exact_at(&blob, 0, 64 << 10).map(|_| ())
        })
        .unwrap_or_else(|| panic!("{fault:?}: a ranged GET still read after 20 s"));
        let err = whole.expect_err("dripped bytes are no answer");
        assert_eq!(err.errno(), libc::EIO, "{fault:?}: {err}");
        // 4 attempts of at most 1 s each plus 0.7 s of backoff.
        assert!(start.elapsed() < Duration::from_secs(7), "{fault:?}");

        let (b, blob) = (backend.clone(), id.clone());
        let start = Instant::now();
        let streamed = within(Duration::from_secs(20), move || {
            let mut got = Vec::new();
            b.open_range(&blob, 0, 1 << 20)
                .map_err(|e| e.to_string())?
                .read_to_end(&mut got)
                .map_err(|e| e.to_string())
        })
        .unwrap_or_else(|| panic!("{fault:?}: a streamed range still read after 20 s"));
        let err = streamed.expect_err("a dripped stream must fail");
        // The head: 4 attempts of 1 s; the body: 1 s for its first MiB (and one read's 200 ms).
        let took = start.elapsed();
        assert!(took < Duration::from_secs(7), "{fault:?}: {took:?}: {err}");
    }
    server.set_always(None);
    assert_eq!(backend.read_exact_at(&id, 5, 5).unwrap(), data[5..10]);
}

/// A registry that sends the head of its answer and then nothing has not answered: a range read whole
/// and a streamed range both end, after every retry, as `Unavailable`, the kind the daemon remembers
/// per blob (`image::failures`), so its readers stop queueing up behind one timeout each. A body cut short
/// is an answer, if not the data (`Broken`: not remembered). Before, a stalled body was an answer too, and
/// a streamed range opened on the head alone and failed later, unretried.
#[test]
fn a_head_followed_by_nothing_is_no_answer() {
    use rafsd::error::{BackendErrorKind, Error};
    use std::io::Read;
    let (server, data, id, backend) = fake_registry_blob(17);
    assert_eq!(backend.blob_size(&id).unwrap(), data.len() as u64);
    let kind = |r: rafsd::error::Result<()>| match r {
        Err(Error::Backend(b)) => b.kind,
        other => panic!("{other:?}"),
    };
    for (fault, want) in [
        (
            Fault::Stall(Duration::from_secs(10)),
            BackendErrorKind::Unavailable,
        ),
        (Fault::Truncate, BackendErrorKind::Broken),
    ] {
        server.set_always(Some(fault.clone()));
        let retries = || backend.http.counters.retries.load(Ordering::Relaxed);
        let before = retries();
        let whole = backend.read_exact_at(&id, 0, 64 << 10).map(|_| ());
        assert_eq!(kind(whole), want, "{fault:?}: a range read whole");
        let opened = backend.open_range(&id, 0, 1 << 20);
        match fault {
            // The first byte is awaited with the request, within its retries.
            Fault::Stall(_) => assert_eq!(kind(opened.map(|_| ())), want, "{fault:?}: streamed"),
            // A body that ends early is the stream reader's error, as before.
            _ => {
                let mut reader = opened.unwrap_or_else(|e| panic!("{fault:?}: {e}"));
                reader
                    .read_to_end(&mut Vec::new())
                    .expect_err("a streamed range cut short");
            }
        }
        // retry_limit 3: 4 attempts of the range read whole (and, stalled, of the streamed one).
        assert!(
            retries() - before >= 3,
            "{fault:?}: {} retries",
            retries() - before
        );
    }
    server.set_always(None);
    let mut got = Vec::new();
    backend
        .open_range(&id, 4096, 4096)
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(got == data[4096..8192]);
}

#[test]
fn bearer_tokens_are_cached_refreshed_and_fetched_once_under_load() {
    let server = FakeServer::start(FakeOptions {
        repo: REPO.into(),
        bearer: Some(2),
        token_basic: Some(services::basic_auth("alice", "s3cret")),
        redirect_to: None,
        storage_head_403: false,
    });
    let data = pseudo_random(1 << 20, 3);
    let id = server.add_blob(data.clone());
    let backend = Arc::new(registry_backend(json!({
        "scheme": "http", "host": format!("127.0.0.1:{}", server.port), "repo": REPO,
        "auth": services::basic_auth("alice", "s3cret"), "timeout": 5
    })));
    // 4 readers for ~4.5 s across two token lifetimes.
    let deadline = Instant::now() + Duration::from_millis(4500);
    let readers: Vec<_> = (0..4)
        .map(|t| {
            let (b, id, data) = (backend.clone(), id.clone(), data.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while Instant::now() < deadline {
                    let off = (t * 4096 + n * 8192) % (data.len() - 4096);
                    let got = b.read_exact_at(&id, off as u64, 4096).unwrap();
                    assert!(got == data[off..off + 4096]);
                    n += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                n
            })
        })
        .collect();
    let reads: usize = readers.into_iter().map(|r| r.join().unwrap()).sum();
    let tokens = server.counters.token_requests.load(Ordering::Relaxed);
    assert!(reads > 100, "{reads} reads");
    // One token to start, then proactive refreshes every ~1.5 s: no token per request.
    assert!(
        (2..=6).contains(&tokens),
        "{tokens} token requests for {reads} reads"
    );

    // Revoked mid-run: 8 concurrent readers hit 401 together and share one new token.
    server.revoke_tokens();
    let before = server.counters.token_requests.load(Ordering::Relaxed);
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (b, id, data, bar) = (backend.clone(), id.clone(), data.clone(), barrier.clone());
            std::thread::spawn(move || {
                bar.wait();
                let off = t * 65536;
                assert!(b.read_exact_at(&id, off as u64, 65536).unwrap() == data[off..off + 65536]);
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let fetched = server.counters.token_requests.load(Ordering::Relaxed) - before;
    assert!(
        fetched <= 2,
        "{fetched} token requests after a revocation (a storm)"
    );

    // Wrong credentials at the realm: a clear error, not a retry loop.
    let bad = registry_backend(json!({
        "scheme": "http", "host": format!("127.0.0.1:{}", server.port), "repo": REPO,
        "auth": services::basic_auth("alice", "wrong")
    }));
    let tokens = server.counters.token_requests.load(Ordering::Relaxed);
    let err = bad.blob_size(&id).unwrap_err().to_string();
    assert!(err.contains("refused"), "{err}");
    assert_eq!(
        bad.http.counters.retries.load(Ordering::Relaxed),
        0,
        "wrong credentials were retried"
    );
    let asked = server.counters.token_requests.load(Ordering::Relaxed) - tokens;
    assert!(asked <= 1, "{asked} token requests with wrong credentials");
}

/// A fault server asking for Bearer tokens (valid 60 s) holding one 1 MiB blob from `seed`, and a registry
/// backend on it with the settings `keys` (besides scheme, host and repo).
fn bearer_registry_blob(
    seed: u64,
    keys: serde_json::Value,
) -> (FakeServer, Vec<u8>, String, Arc<RemoteBackend<Registry>>) {
    let server = FakeServer::start(FakeOptions {
        repo: REPO.into(),
        bearer: Some(60),
        token_basic: None,
        redirect_to: None,
        storage_head_403: false,
    });
    let data = pseudo_random(1 << 20, seed);
    let id = server.add_blob(data.clone());
    let mut cfg =
        json!({"scheme": "http", "host": format!("127.0.0.1:{}", server.port), "repo": REPO});
    cfg.as_object_mut()
        .unwrap()
        .extend(keys.as_object().unwrap().clone());
    (server, data, id, Arc::new(registry_backend(cfg)))
}

/// `readers` threads each reading 4 KiB (reader `t` at `t * 4096`) at once: what each read and how long
/// after the start it ended.
fn read_together(
    backend: &Arc<RemoteBackend<Registry>>,
    id: &str,
    readers: usize,
) -> Vec<(rafsd::Result<Vec<u8>>, Duration)> {
    let barrier = Arc::new(std::sync::Barrier::new(readers));
    let start = Instant::now();
    let threads: Vec<_> = (0..readers)
        .map(|t| {
            let (b, id, bar) = (backend.clone(), id.to_string(), barrier.clone());
            std::thread::spawn(move || {
                bar.wait();
                (b.read_exact_at(&id, t as u64 * 4096, 4096), start.elapsed())
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Readers that meet a 401 together while the token realm hangs share the one token request under way
/// and its failure: each fails after about one `timeout`, where they used to take their turns at the realm,
/// the last waiting one `timeout` per reader before it (a worker each, all that time).
#[test]
fn readers_share_a_failed_token_request_instead_of_queueing_at_a_hung_realm() {
    let (server, data, id, backend) = bearer_registry_blob(
        17,
        json!({"timeout": 1, "connect_timeout": 1, "retry_limit": 0}),
    );
    server.set_token_fault(Some(Fault::Stall(Duration::from_secs(30))));
    let readers = 8;
    for (r, took) in read_together(&backend, &id, readers) {
        let err = r.expect_err("no token, no data");
        assert_eq!(err.errno(), libc::EIO, "{err}");
        assert!(
            took < Duration::from_secs(4),
            "a reader took {took:?}: {err}"
        );
    }
    let asked = server.counters.token_requests.load(Ordering::Relaxed);
    assert!(asked <= 3, "{asked} token requests for {readers} readers");
    // The realm answers again: the next read gets a token and its bytes.
    server.set_token_fault(None);
    assert!(backend.read_exact_at(&id, 0, 4096).unwrap() == data[..4096]);
}

/// A token that says it expires at once (`expires_in: 0`) from a slow realm: readers that waited while
/// another refreshed it take that token instead of each fetching one in turn (the last of 8 waited for 8
/// token answers, a worker held all that time).
#[test]
fn readers_share_a_token_refresh_even_when_the_token_expires_at_once() {
    let (server, data, id, backend) =
        bearer_registry_blob(23, json!({"timeout": 2, "connect_timeout": 1}));
    assert!(backend.read_exact_at(&id, 0, 4096).unwrap() == data[..4096]);
    server.set_token_expires_in(Some(0));
    server.set_token_fault(Some(Fault::Slow(Duration::from_millis(300))));
    // A revoked token: the new one says 0 s, so every reader after it refreshes.
    server.revoke_tokens();
    assert!(backend.read_exact_at(&id, 0, 4096).unwrap() == data[..4096]);
    let readers = 8;
    let before = server.counters.token_requests.load(Ordering::Relaxed);
    let mut slowest = Duration::ZERO;
    for (t, (r, took)) in read_together(&backend, &id, readers)
        .into_iter()
        .enumerate()
    {
        assert!(r.unwrap() == data[t * 4096..(t + 1) * 4096]);
        slowest = slowest.max(took);
    }
    let asked = server.counters.token_requests.load(Ordering::Relaxed) - before;
    assert!(asked <= 3, "{asked} token requests for {readers} readers");
    assert!(
        slowest < Duration::from_millis(1200),
        "the slowest reader took {slowest:?}"
    );
}

/// A token that an HTTP header cannot carry (a line break and a header of the realm's choosing after it,
/// or a control character) is refused when it arrives, with an error that says so, and never sent: not
/// straight to the registry, not through a forward proxy (where a line break would smuggle a header or
/// a second request). Before, it was kept for its lifetime and every read failed with ureq's "invalid
/// HTTP header" after its retries.
#[test]
fn a_token_no_header_can_carry_is_refused_and_never_sent() {
    let opts = |bearer| FakeOptions {
        repo: REPO.into(),
        bearer,
        token_basic: None,
        redirect_to: None,
        storage_head_403: false,
    };
    // The proxy plays the registry too (it serves from its own store and asks for its own tokens).
    let (registry, proxy, data, id) = same_blob_on(opts(Some(60)), opts(Some(60)), 29);
    let base = json!({
        "scheme": "http", "host": format!("127.0.0.1:{}", registry.port), "repo": REPO,
        "timeout": 1, "connect_timeout": 1
    });
    let mut via_proxy = base.clone();
    via_proxy["proxy"] =
        json!({"url": format!("http://127.0.0.1:{}", proxy.port), "fallback": false});
    for token in ["tok\r\nX-Injected: 1", "tok\u{7f}x", "tok x"] {
        registry.set_token_text(Some(token.to_string()));
        proxy.set_token_text(Some(token.to_string()));
        let tokens = || {
            [&registry, &proxy]
                .map(|s| s.counters.token_requests.load(Ordering::Relaxed))
                .iter()
                .sum::<u64>()
        };
        for cfg in [&base, &via_proxy] {
            let backend = registry_backend(cfg.clone());
            let before = tokens();
            let err = backend.read_exact_at(&id, 0, 4096).map(|_| ()).unwrap_err();
            assert!(
                err.to_string().contains("a header cannot carry"),
                "{token:?}: {err}"
            );
            let asked = tokens() - before;
            assert_eq!(
                asked, 1,
                "{token:?}: a refused token is not asked for again"
            );
        }
    }
    for s in [&registry, &proxy] {
        let seen = s.seen.lock().unwrap().clone();
        assert!(
            seen.iter().all(|r| !r.headers.contains_key("x-injected")
                && !r
                    .headers
                    .get("authorization")
                    .is_some_and(|a| a.starts_with("Bearer tok"))),
            "a bad token went out: {seen:#?}"
        );
    }
    registry.set_token_text(None);
    let backend = registry_backend(base);
    assert!(backend.read_exact_at(&id, 0, 4096).unwrap() == data[..4096]);
}

#[test]
fn redirects_to_blob_storage_carry_no_registry_credentials() {
    let server = FakeServer::start(FakeOptions {
        repo: REPO.into(),
        bearer: Some(60),
        token_basic: None,
        redirect_to: Some("storage.invalid:1".into()),
        storage_head_403: true,
    });
    let data = pseudo_random(2 << 20, 11);
    let id = server.add_blob(data.clone());
    let backend = registry_backend(json!({
        "scheme": "http", "host": format!("127.0.0.1:{}", server.port), "repo": REPO,
        "blob_url_scheme": "http", "blob_redirected_host": format!("127.0.0.1:{}", server.port)
    }));
    for off in [0usize, 4096, 1 << 20] {
        assert!(backend.read_exact_at(&id, off as u64, 8192).unwrap() == data[off..off + 8192]);
    }
    // The size came from a one-byte GET: the storage refuses HEAD, as pre-signed GET URLs do.
    assert_eq!(backend.blob_size(&id).unwrap(), data.len() as u64);
    let c = &server.counters;
    assert!(c.storage_requests.load(Ordering::Relaxed) >= 3);
    assert_eq!(
        c.storage_auth_leaks.load(Ordering::Relaxed),
        0,
        "Authorization leaked to storage"
    );
    assert_eq!(c.token_requests.load(Ordering::Relaxed), 1);
}

/// A registry may send the daemon elsewhere (a redirect to blob storage, a token realm), but not to a
/// link-local, unspecified or metadata address: a hostile image's registry redirecting its blob to the
/// cloud's metadata service (169.254.169.254) would have the daemon fetch the host's credentials and serve
/// them to the guest as file data. Such a target is a final error, with no connection tried, whether the
/// address is written out or behind a name (`2852039166` and `0` resolve to 169.254.169.254 and 0.0.0.0,
/// which reaches this host: before, the daemon fetched the blob and the token from there).
#[test]
fn a_registry_cannot_send_the_daemon_to_a_metadata_address() {
    let (server, data, id, backend) = fake_registry_blob(19);
    assert_eq!(backend.blob_size(&id).unwrap(), data.len() as u64);
    let port = server.port;
    for target in [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/role".to_string(),
        "http://[fe80::1]/x".to_string(),
        "http://2852039166/latest/meta-data/".to_string(),
        format!("http://0:{port}/storage/{id}"),
    ] {
        server.set_redirect(Some(target.clone()));
        let before = server.counters.storage_requests.load(Ordering::Relaxed);
        let retries_before = backend.http.counters.retries.load(Ordering::Relaxed);
        let err = backend
            .read_exact_at(&id, 4096, 4096)
            .map(|got| got == data[4096..8192])
            .expect_err(&target);
        assert_eq!(err.errno(), libc::EIO, "{target}: {err}");
        assert!(
            err.to_string().contains("may not send us to"),
            "{target}: {err}"
        );
        assert_eq!(
            backend.http.counters.retries.load(Ordering::Relaxed),
            retries_before,
            "{target}: retried"
        );
        assert_eq!(
            server.counters.storage_requests.load(Ordering::Relaxed),
            before,
            "{target}: the storage was asked"
        );
    }
    server.set_redirect(None);
    assert!(backend.read_exact_at(&id, 0, 4096).unwrap() == data[..4096]);

    // A token realm is held to the same rule.
    let (server, data, id, backend) =
        bearer_registry_blob(19, json!({"timeout": 1, "connect_timeout": 1}));
    server.set_realm(Some(format!("http://0:{}/token", server.port)));
    let err = backend.read_exact_at(&id, 0, 4096).map(|_| ()).unwrap_err();
    assert!(err.to_string().contains("may not send us to"), "{err}");
    assert_eq!(server.counters.token_requests.load(Ordering::Relaxed), 0);
    server.set_realm(None);
    assert!(backend.read_exact_at(&id, 0, 4096).unwrap() == data[..4096]);
}

/// Through a proxy the proxy resolves names, so a redirect's host is checked before the request goes
/// there: the forms of 169.254.169.254 and 0.0.0.0 a proxy's resolver takes never reach it.
#[test]
fn a_registry_cannot_send_the_daemon_to_a_metadata_address_through_a_proxy() {
    let (registry, proxy, data, id) = same_blob_on(plain(), plain(), 23);
    let backend = registry_backend(json!({
        "scheme": "http", "host": format!("127.0.0.1:{}", registry.port), "repo": REPO,
        "timeout": 1, "connect_timeout": 1, "retry_limit": 0,
        "proxy": {"url": format!("http://127.0.0.1:{}", proxy.port), "fallback": false}
    }));
    let port = registry.port;
    for target in [
        format!("http://2852039166:{port}/storage/{id}"),
        format!("http://0251.0376.0251.0376:{port}/storage/{id}"),
        format!("http://0xa9fea9fe:{port}/storage/{id}"),
        format!("http://0:{port}/storage/{id}"),
    ] {
        // The proxy passes the registry's redirect back, as a forward proxy does.
        proxy.set_redirect(Some(target.clone()));
        let err = backend
            .read_exact_at(&id, 4096, 4096)
            .map(|_| ())
            .expect_err(&target);
        assert!(
            err.to_string().contains("may not send us to"),
            "{target}: {err}"
        );
    }
    let seen = proxy.seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|r| !r.line.contains("/storage/")),
        "a refused redirect reached the proxy: {seen:#?}"
    );
    // A redirect to a name the proxy may resolve still goes through it.
    proxy.set_redirect(Some(format!("http://localhost:{port}/storage/{id}")));
    assert!(backend.read_exact_at(&id, 0, 4096).unwrap() == data[..4096]);
}

/// Nor may a registry out on the internet send the daemon to this host's own services or a private
/// network's: a hostile image's registry redirecting its blob to a local HTTP service, or naming one as
/// its token realm, would have the daemon read that service's answers for the guest. Loopback and
/// private targets are refused when no host the config names is local (a local proxy does not count: it
/// only passes the registry's answers on). The registry stands at 192.0.2.10 (the documentation range,
/// not local) in a network namespace of the test's own; a second server on 127.0.0.1 plays the local
/// service and holds the same blob, so that a redirect followed there would be answered with the right
/// bytes. (`redirects_to_blob_storage_carry_no_registry_credentials` and the rest: a local registry may
/// still send the daemon to local storage.)
#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_remote_registry_cannot_send_the_daemon_to_a_local_address() {
    in_own_network(REMOTE_IP, |hosts| {
        let remote: std::net::IpAddr = REMOTE_IP.parse().unwrap();
        let registry = FakeServer::start_on(FakeOptions::plain(REPO), remote);
        let service = FakeServer::start(FakeOptions::plain(REPO));
        let data = pseudo_random(1 << 20, 29);
        let id = registry.add_blob(data.clone());
        service.add_blob(data.clone());
        let config = json!({
            "scheme": "http", "host": format!("{REMOTE_IP}:{}", registry.port), "repo": REPO,
            "timeout": 1, "connect_timeout": 1, "retry_limit": 0
        });
        let backend = registry_backend(config.clone());
        assert!(backend.read_exact_at(&id, 0, 4096).unwrap() == data[..4096]);
        let port = service.port;
        let local_targets = [
            format!("http://127.0.0.1:{port}/storage/{id}"),
            format!("http://localhost:{port}/storage/{id}"),
            format!("http://2130706433:{port}/storage/{id}"),
            format!("http://[::ffff:127.0.0.1]:{port}/storage/{id}"),
        ];
        let refused = |backend: &RemoteBackend<Registry>, target: &str| {
            let err = backend
                .read_exact_at(&id, 4096, 4096)
                .map(|_| ())
                .expect_err(target);
            assert!(
                err.to_string().contains("may not send us to"),
                "{target}: {err}"
            );
        };
        for target in &local_targets {
            registry.set_redirect(Some(target.clone()));
            refused(&backend, target);
        }
        assert_eq!(
            service.counters.storage_requests.load(Ordering::Relaxed),
            0,
            "the local service was asked"
        );
        // Storage out on the internet is fine.
        registry.set_redirect(Some(format!(
            "http://{REMOTE_IP}:{}/storage/{id}",
            registry.port
        )));
        assert!(backend.read_exact_at(&id, 8192, 4096).unwrap() == data[8192..12288]);

        // A token realm on this host likewise.
        let bearer = FakeServer::start_on(
            FakeOptions {
                bearer: Some(60),
                ..FakeOptions::plain(REPO)
            },
            remote,
        );
        let id = bearer.add_blob(data.clone());
        let tokens = FakeServer::start(FakeOptions {
            bearer: Some(60),
            ..FakeOptions::plain(REPO)
        });
        bearer.set_realm(Some(format!("http://127.0.0.1:{}/token", tokens.port)));
        let backend = registry_backend(json!({
            "scheme": "http", "host": format!("{REMOTE_IP}:{}", bearer.port), "repo": REPO,
            "timeout": 1, "connect_timeout": 1, "retry_limit": 0
        }));
        let err = backend.read_exact_at(&id, 0, 4096).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("may not send us to"), "{err}");
        assert_eq!(tokens.counters.token_requests.load(Ordering::Relaxed), 0);
        bearer.set_realm(None);
        // Its own realm, at its remote address, then serves.
        bearer.set_realm(Some(format!("http://{REMOTE_IP}:{}/token", bearer.port)));
        assert!(backend.read_exact_at(&id, 0, 4096).unwrap() == data[..4096]);

        // A registry named by a name with a private address beside its own (its owner controls its
        // names) is still remote: its redirect to a name of this host is refused.
        let names = |text: &str| {
            let base = "127.0.0.1 localhost\n::1 localhost\n127.0.0.1 internal.test\n";
            std::fs::write(hosts, format!("{base}{text}")).unwrap();
        };
        names(&format!("{REMOTE_IP} evil.test\n10.9.9.9 evil.test\n"));
        let named = registry_backend(json!({
            "scheme": "http", "host": format!("evil.test:{}", registry.port), "repo": REPO,
            "timeout": 1, "connect_timeout": 1, "retry_limit": 0
        }));
        let internal = format!("http://internal.test:{port}/storage/{id}");
        registry.set_redirect(Some(internal.clone()));
        refused(&named, &internal);
        assert_eq!(service.counters.storage_requests.load(Ordering::Relaxed), 0);

        // A registry on this host named by a name (a private Harbor with its storage beside it) may
        // send us to local storage...
        names("127.0.0.1 harbor.test\n");
        let harbor = FakeServer::start(FakeOptions::plain(REPO));
        let id = harbor.add_blob(data.clone());
        harbor.set_redirect(Some(format!("http://127.0.0.1:{port}/storage/{id}")));
        service.add_blob(data.clone());
        let harbor_backend = registry_backend(json!({
            "scheme": "http", "host": format!("harbor.test:{}", harbor.port), "repo": REPO,
            "timeout": 1, "connect_timeout": 1, "retry_limit": 2
        }));
        assert!(harbor_backend.read_exact_at(&id, 0, 4096).unwrap() == data[..4096]);
        assert!(service.counters.storage_requests.load(Ordering::Relaxed) > 0);
        // ... but once its name has pointed to a remote server (DNS rebinding), that server's redirect
        // to this host is refused. (A blob not read yet: the registry is asked, on a new connection
        // once the one it has is reset.)
        let rebound = FakeServer::start_at(FakeOptions::plain(REPO), (remote, harbor.port).into());
        let other = pseudo_random(1 << 20, 31);
        let id = harbor.add_blob(other.clone());
        rebound.add_blob(other.clone());
        service.add_blob(other);
        rebound.set_redirect(Some(format!("http://127.0.0.1:{port}/storage/{id}")));
        names(&format!("{REMOTE_IP} harbor.test\n"));
        harbor.set_redirect(None);
        harbor.queue(&[Fault::Reset]);
        let asked = service.counters.storage_requests.load(Ordering::Relaxed);
        let err = harbor_backend
            .read_exact_at(&id, 0, 4096)
            .map(|_| ())
            .unwrap_err();
        assert!(err.to_string().contains("may not send us to"), "{err}");
        assert!(rebound.counters.connections.load(Ordering::Relaxed) > 0);
        assert_eq!(
            service.counters.storage_requests.load(Ordering::Relaxed),
            asked,
            "the local service was asked"
        );
    });
}

/// The address a test's remote registry stands at (TEST-NET-1: neither loopback nor private).
const REMOTE_IP: &str = "192.0.2.10";

/// Run `test` on a thread in network and mount namespaces of its own (the servers it starts and the
/// connections it makes stay in them), whose loopback is up and also holds `addr`, and whose /etc/hosts
/// is a file of the test's, at the path `test` gets (written with localhost only; the test may write
/// names of its own).
fn in_own_network(addr: &str, test: impl FnOnce(&Path) + Send) {
    use std::ffi::CString;
    let dir = tmp();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n::1 localhost\n").unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unsharing namespaces affects this thread and what it starts only; the mounts are
            // made in the new mount namespace, private first so that none reaches the host's.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) };
            assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
            let (root, etc_hosts) = (
                CString::new("/").unwrap(),
                CString::new("/etc/hosts").unwrap(),
            );
            let ours = CString::new(hosts.as_os_str().as_encoded_bytes()).unwrap();
            let null = std::ptr::null();
            let private = libc::MS_REC | libc::MS_PRIVATE;
            let rc = unsafe { libc::mount(null, root.as_ptr(), null, private, null as _) };
            assert_eq!(
                rc,
                0,
                "mount --make-rprivate /: {}",
                std::io::Error::last_os_error()
            );
            let rc = unsafe {
                libc::mount(
                    ours.as_ptr(),
                    etc_hosts.as_ptr(),
                    null,
                    libc::MS_BIND,
                    null as _,
                )
            };
            assert_eq!(
                rc,
                0,
                "bind mount of /etc/hosts: {}",
                std::io::Error::last_os_error()
            );
            let cidr = format!("{addr}/32");
            for args in [
                &["link", "set", "lo", "up"][..],
                &["addr", "add", &cidr, "dev", "lo"],
            ] {
                let status = std::process::Command::new("ip")
                    .args(args)
                    .status()
                    .unwrap();
                assert!(status.success(), "ip {args:?}: {status}");
            }
            test(&hosts);
        });
    });
}

/// A storage URL a redirect gave is kept for the blob only once it answered with data: a failing one
/// (its host down, a 5xx) is not asked again and again; the registry is, and its next redirect is taken.
#[test]
fn a_failing_redirect_target_is_not_kept_for_the_blob() {
    let [registry, down, up] = [(); 3].map(|_| FakeServer::start(FakeOptions::plain(REPO)));
    let data = pseudo_random(1 << 20, 31);
    let id = registry.add_blob(data.clone());
    down.add_blob(data.clone());
    up.add_blob(data.clone());
    down.set_always(Some(Fault::Status(503)));
    let backend = registry_backend(json!({
        "scheme": "http", "host": format!("127.0.0.1:{}", registry.port), "repo": REPO,
        "timeout": 1, "connect_timeout": 1, "retry_limit": 0
    }));
    registry.set_redirect(Some(format!("http://127.0.0.1:{}/storage/{id}", down.port)));
    assert!(backend.read_exact_at(&id, 0, 4096).is_err());
    let down_asked = down.counters.storage_requests.load(Ordering::Relaxed);
    assert!(down_asked > 0);
    registry.set_redirect(Some(format!("http://127.0.0.1:{}/storage/{id}", up.port)));
    assert!(backend.read_exact_at(&id, 0, 4096).unwrap() == data[..4096]);
    // Kept once it answered: the next read goes straight to it.
    let (asked, up_asked) = (
        registry.counters.requests.load(Ordering::Relaxed),
        up.counters.storage_requests.load(Ordering::Relaxed),
    );
    assert!(backend.read_exact_at(&id, 8192, 4096).unwrap() == data[8192..12288]);
    assert_eq!(registry.counters.requests.load(Ordering::Relaxed), asked);
    assert_eq!(
        up.counters.storage_requests.load(Ordering::Relaxed),
        up_asked + 1
    );
    assert_eq!(
        down.counters.storage_requests.load(Ordering::Relaxed),
        down_asked,
        "the failing target was asked again"
    );
}

#[test]
fn mirrors_fail_over_to_the_origin_and_recover() {
    const RECHECK: Duration = Duration::from_secs(5);
    let opts = || FakeOptions {
        repo: REPO.into(),
        bearer: None,
        token_basic: None,
        redirect_to: None,
        storage_head_403: false,
    };
    let (origin, mirror, data, id) = same_blob_on(opts(), opts(), 5);
    let backend = registry_backend(json!({
        "scheme": "http", "host": format!("127.0.0.1:{}", origin.port), "repo": REPO, "retry_limit": 0,
        "mirrors": [{"host": format!("http://127.0.0.1:{}", mirror.port), "failure_limit": 2,
                     "health_check_interval": RECHECK.as_secs(), "headers": {"X-Mirror": "yes"}}]
    }));
    let read = |off: usize| {
        assert!(backend.read_exact_at(&id, off as u64, 4096).unwrap() == data[off..off + 4096])
    };
    read(0);
    assert_eq!(mirror.counters.data_requests.load(Ordering::Relaxed), 1);
    assert_eq!(origin.counters.data_requests.load(Ordering::Relaxed), 0);

    mirror.set_always(Some(Fault::Status(502)));
    for i in 1..6 {
        read(i * 4096);
    }
    // Two failures disable the mirror; the rest go straight to the origin (as long as they come within
    // the mirror's health-check interval, which is why it is not shorter: a loaded machine took more
    // than 1 s for these reads, and the mirror was tried again among them).
    assert_eq!(mirror.counters.data_requests.load(Ordering::Relaxed), 3);
    assert_eq!(origin.counters.data_requests.load(Ordering::Relaxed), 5);

    mirror.set_always(None);
    std::thread::sleep(RECHECK + Duration::from_millis(200));
    read(100_000);
    assert_eq!(
        mirror.counters.data_requests.load(Ordering::Relaxed),
        4,
        "mirror back in use"
    );
    assert_eq!(origin.counters.data_requests.load(Ordering::Relaxed), 5);
}

/// A mirror that sends the head of a streamed range and then nothing is a failed route, like one whose
/// body read whole stalls: the same request goes on to the origin and the range comes (the blob is
/// not "not answering"). With the first bytes awaited after the route was chosen, every retry went to
/// the stalling mirror and the read failed as no answer.
#[test]
fn a_mirror_whose_streamed_answer_stalls_gives_way_to_the_origin() {
    use std::io::Read;
    let (origin, mirror, data, id) = same_blob_on(plain(), plain(), 9);
    let backend = registry_backend(json!({
        "scheme": "http", "host": format!("127.0.0.1:{}", origin.port), "repo": REPO,
        "timeout": 1, "retry_limit": 0,
        "mirrors": [{"host": format!("http://127.0.0.1:{}", mirror.port), "failure_limit": 1,
                     "health_check_interval": 60}]
    }));
    mirror.set_always(Some(Fault::Stall(Duration::from_secs(10))));
    let mut got = Vec::new();
    backend
        .open_range(&id, 4096, 64 << 10)
        .unwrap_or_else(|e| panic!("{e}"))
        .read_to_end(&mut got)
        .unwrap();
    assert!(got == data[4096..4096 + (64 << 10)]);
    assert_eq!(mirror.counters.data_requests.load(Ordering::Relaxed), 1);
    assert_eq!(origin.counters.data_requests.load(Ordering::Relaxed), 1);
}

/// A mirror not given the registry's credentials (`auth_through` off, the default) that answers with a
/// challenge of its own is a failed route, not a realm to log in to: the registry's credentials never
/// reach the token endpoint it names, and the origin serves the read. Before, the daemon answered the
/// mirror's challenge with the configured `user:pass`, and the read then failed as refused.
#[test]
fn a_mirror_asking_for_credentials_never_gets_the_registrys() {
    let bearer = FakeOptions {
        bearer: Some(60),
        ..plain()
    };
    let (origin, mirror, data, id) = same_blob_on(plain(), bearer, 11);
    let backend = registry_backend(json!({
        "scheme": "http", "host": format!("127.0.0.1:{}", origin.port), "repo": REPO,
        "auth": "dTpw", "retry_limit": 0,
        "mirrors": [{"host": format!("http://127.0.0.1:{}", mirror.port)}]
    }));
    assert_eq!(backend.blob_size(&id).unwrap(), data.len() as u64);
    assert!(backend.read_exact_at(&id, 4096, 4096).unwrap() == data[4096..8192]);
    assert_eq!(
        mirror.counters.token_requests.load(Ordering::Relaxed),
        0,
        "the registry's credentials went to the mirror's token endpoint"
    );
    assert!(origin.counters.data_requests.load(Ordering::Relaxed) >= 1);
}

/// A mirror's own credential, in its `headers`, goes to it whether or not the registry's does
/// (`auth_through`): the mirror serves the read. Before, the filter that keeps the registry's
/// Authorization from the mirror removed the mirror's own too, and the mirror, refusing, was passed by.
#[test]
fn a_mirrors_own_authorization_header_reaches_it() {
    use std::io::{Read, Write};
    let bearer = FakeOptions {
        bearer: Some(600),
        ..plain()
    };
    let (origin, mirror, data, id) = same_blob_on(plain(), bearer, 12);
    // The mirror's credential, issued out of band.
    mirror.set_token_text(Some("mirror-own".into()));
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", mirror.port)).unwrap();
    write!(
        conn,
        "GET /token HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("mirror-own") {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    for auth_through in [false, true] {
        let backend = registry_backend(json!({
            "scheme": "http", "host": format!("127.0.0.1:{}", origin.port), "repo": REPO,
            "auth": "dTpw", "retry_limit": 0,
            "mirrors": [{"host": format!("http://127.0.0.1:{}", mirror.port),
                         "auth_through": auth_through,
                         "headers": {"Authorization": "Bearer mirror-own"}}]
        }));
        assert!(backend.read_exact_at(&id, 0, 4096).unwrap() == data[..4096]);
    }
    assert_eq!(origin.counters.data_requests.load(Ordering::Relaxed), 0);
    assert_eq!(mirror.counters.data_requests.load(Ordering::Relaxed), 2);
    assert_eq!(mirror.counters.token_requests.load(Ordering::Relaxed), 1);
}

/// A remembered storage URL (the registry's redirect) whose answer stalls after its head is forgotten,
/// like one that refuses: the registry is asked for a fresh redirect within the same attempt and the
/// read succeeds. Before, a stalled answer counted as data: the URL was kept, and with no retry left the
/// read failed.
#[test]
fn a_storage_url_whose_answer_stalls_is_asked_for_again() {
    let server = FakeServer::start(FakeOptions::plain(REPO));
    let data = pseudo_random(1 << 20, 14);
    let id = server.add_blob(data.clone());
    server.set_redirect(Some(format!(
        "http://127.0.0.1:{}/storage/{id}",
        server.port
    )));
    let backend = registry_backend(json!({
        "scheme": "http", "host": format!("127.0.0.1:{}", server.port), "repo": REPO,
        "timeout": 1, "retry_limit": 0
    }));
    assert!(backend.read_exact_at(&id, 0, 4096).unwrap() == data[..4096]);
    let at_storage = || server.counters.storage_requests.load(Ordering::Relaxed);
    assert_eq!(at_storage(), 2, "the size, then the range");
    server.queue(&[Fault::Stall(Duration::from_secs(5))]);
    let got = backend
        .read_exact_at(&id, 4096, 4096)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(got == data[4096..8192]);
    assert_eq!(at_storage(), 4, "the remembered URL, then the fresh one");
}

/// The `http-proxy` backend (`addr` + `path` + `/<blob id>`) through the daemon's own config parser.
#[test]
fn http_proxy_backend_reads_ranges() {
    let server = FakeServer::start(FakeOptions {
        repo: REPO.into(),
        bearer: None,
        token_basic: None,
        redirect_to: None,
        storage_head_403: false,
    });
    let data = pseudo_random(600_000, 13);
    let id = server.add_blob(data.clone());
    let config = rafsd::config::DaemonConfig::from_slice(
        json!({"version": 2, "backend": {"type": "http-proxy", "http-proxy": {
            "addr": format!("http://127.0.0.1:{}", server.port), "path": "/namespace/x/blobs"}}})
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let backend = rafsd::storage::backend_from_config(&config.backend).unwrap();
    assert_eq!(backend.kind(), "http-proxy");
    assert_eq!(backend.blob_size(&id).unwrap(), data.len() as u64);
    assert!(backend.read_exact_at(&id, 599_000, 1000).unwrap() == data[599_000..]);
    // Past the end: a short read, then nothing.
    let mut buf = vec![0u8; 4096];
    assert_eq!(backend.read_at(&id, 599_990, &mut buf).unwrap(), 10);
    assert_eq!(backend.read_at(&id, 600_000, &mut buf).unwrap(), 0);
    // Ids that are not blob ids never reach a URL.
    assert!(backend.blob_size("../../etc/passwd").is_err());
}

// ---------------------------------------------------------------------------------------------------
// Real servers.

fn need(tools: &[&str]) {
    for t in tools {
        assert!(
            services::have(t),
            "`{t}` is missing: run ci/install-deps.sh (docker-registry, tinyproxy, apache2-utils, moto)"
        );
    }
}

#[test]
#[ignore = "needs root, servers: ci/test.sh"]
fn registry_with_htpasswd_serves_images_that_match_the_manifest() {
    manifest::assert_root("registry mounts");
    need(&["docker-registry", "htpasswd"]);
    let dir = tmp();
    let reg = services::start_registry(dir.path(), RegistryAuth::Htpasswd("alice", "pa55word"));
    let auth = services::basic_auth("alice", "pa55word");
    let basic = format!("Basic {auth}");
    for case in ["v6-zstd-blake3", "v5-zstd-sha256-128k"] {
        for (id, data) in case_blobs(case) {
            assert_eq!(services::push_blob(reg.port, REPO, Some(&basic), &data), id);
        }
        let cdir = dir.path().join(case);
        std::fs::create_dir_all(&cdir).unwrap();
        let config = net_config(
            &cdir,
            "registry",
            json!({"scheme": "http", "host": format!("127.0.0.1:{}", reg.port), "repo": REPO,
                   "auth": auth, "timeout": 10, "retry_limit": 2}),
        );
        let d = mount(&cdir, &config, &manifest::case_bootstrap(case));
        assert_matches_manifest(&d, case);
        let log = d.log_text();
        assert!(!log.contains(&auth), "credentials in the daemon log");
        d.stop();
    }
    let access = reg.log_text();
    assert!(
        access.contains("\"GET /v2/rafsd/test/blobs/sha256:") && access.contains(" 206 "),
        "the registry served ranged blob reads:\n{}",
        &access[access.len().saturating_sub(2000)..]
    );

    // A wrong password: the mount does not ask the registry, the first read is refused with a clear message.
    let cdir = dir.path().join("bad");
    std::fs::create_dir_all(&cdir).unwrap();
    let config = net_config(
        &cdir,
        "registry",
        json!({"scheme": "http", "host": format!("127.0.0.1:{}", reg.port), "repo": REPO,
               "auth": services::basic_auth("alice", "nope")}),
    );
    let out = mount_and_fail_first_read(&cdir, &config, "refused the credentials");
    assert!(!out.contains("nope") && !out.contains(&services::basic_auth("alice", "nope")));
}

/// Mount `v6-zstd-blake3` with a backend that refuses us: the mount succeeds (it needs no network), the
/// first read fails with EIO in bounded time, and the log says `why`. Returns the log.
fn mount_and_fail_first_read(dir: &Path, config: &Path, why: &str) -> String {
    let mut d = mount(dir, config, &manifest::case_bootstrap("v6-zstd-blake3"));
    let (r, took) = timed_read(&d.mountpoint.join("etc/adduser.conf"));
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(
        took < Duration::from_secs(20),
        "the refused read took {took:?}"
    );
    let log = d.log_text();
    assert!(log.contains(why), "the log does not say {why:?}:\n{log}");
    assert!(d.is_running());
    d.stop();
    log
}

/// docker-registry in token mode with tokens from tests/kit/src/token_issuer.py (RS256 JWTs): the 401
/// challenge is followed to the realm, short-lived tokens are refreshed, and the image matches.
#[test]
#[ignore = "needs root, servers: ci/test.sh"]
fn registry_with_bearer_tokens_from_a_real_token_flow() {
    manifest::assert_root("registry mounts");
    need(&["docker-registry", "python3"]);
    let case = "v6-none-blake3-4k";
    let dir = tmp();
    let auth = services::basic_auth("bob", "t0ken-pass");
    let (issuer, cert) = services::start_token_issuer(dir.path(), "bob", "t0ken-pass", 3);
    let reg = services::start_registry(
        dir.path(),
        RegistryAuth::Token {
            realm: format!("http://127.0.0.1:{}/token", issuer.port),
            cert,
        },
    );
    let push = format!("Bearer {}", services::issue_token(issuer.port, &auth, REPO));
    for (id, data) in case_blobs(case) {
        assert_eq!(services::push_blob(reg.port, REPO, Some(&push), &data), id);
    }
    let tokens = || {
        std::fs::read_to_string(dir.path().join("tokens.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("granted"))
            .count()
    };
    let pushed = tokens();

    // Library level: concurrent readers across three token lifetimes.
    let data = case_blobs(case).pop().unwrap().1;
    let id = format!("{:x}", sha2::Sha256::digest(&data));
    let backend = Arc::new(registry_backend(json!({
        "scheme": "http", "host": format!("127.0.0.1:{}", reg.port), "repo": REPO, "auth": auth
    })));
    let deadline = Instant::now() + Duration::from_secs(7);
    let readers: Vec<_> = (0..4)
        .map(|t| {
            let (b, id, data) = (backend.clone(), id.clone(), data.clone());
            std::thread::spawn(move || {
                let mut n = 0usize;
                while Instant::now() < deadline {
                    let off = (t * 7919 + n * 65536) % (data.len() - 4096);
                    assert!(
                        b.read_exact_at(&id, off as u64, 4096).unwrap() == data[off..off + 4096]
                    );
                    n += 1;
                    std::thread::sleep(Duration::from_millis(25));
                }
                n
            })
        })
        .collect();
    let reads: usize = readers.into_iter().map(|r| r.join().unwrap()).sum();
    let fetched = tokens() - pushed;
    assert!(reads > 100, "{reads} reads");
    assert!(
        (2..=8).contains(&fetched),
        "{fetched} tokens for {reads} reads over 7 s with a 3 s ttl"
    );

    // Daemon level: the whole image through a FUSE mount.
    let config = net_config(
        dir.path(),
        "registry",
        json!({"scheme": "http", "host": format!("127.0.0.1:{}", reg.port), "repo": REPO, "auth": auth}),
    );
    let d = mount(dir.path(), &config, &manifest::case_bootstrap(case));
    assert_matches_manifest(&d, case);
    d.stop();
}

/// docker-registry over HTTPS with a certificate from a private CA: refused by default, accepted with
/// `skip_verify`, and verified against `ca_cert_files`.
#[test]
#[ignore = "needs servers: ci/test.sh"]
fn tls_registry_needs_skip_verify_or_its_ca() {
    need(&["docker-registry", "openssl"]);
    let dir = tmp();
    let (ca, cert, key) = services::test_ca_and_server_cert(dir.path());
    let reg = services::start_registry_with(dir.path(), RegistryAuth::None, Some((cert, key)));
    let data = pseudo_random(1 << 20, 21);
    let id = services::push_blob_to(
        &format!("https://127.0.0.1:{}", reg.port),
        REPO,
        None,
        &data,
    );
    let with = |extra: serde_json::Value| {
        let mut cfg =
            json!({"host": format!("127.0.0.1:{}", reg.port), "repo": REPO, "retry_limit": 1});
        cfg.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        registry_backend(cfg)
    };
    let start = Instant::now();
    let err = with(json!({})).blob_size(&id).unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
    for extra in [json!({"skip_verify": true}), json!({"ca_cert_files": [ca]})] {
        let b = with(extra.clone());
        assert!(
            b.read_exact_at(&id, 1000, 50_000).unwrap() == data[1000..51_000],
            "{extra}"
        );
    }
}

/// A credential renewal that waits on a token fetch in progress (the image's realm stalls) holds back
/// no other API request: `PUT /api/v1/config` waited for the fetch holding the daemon's mount lock, and
/// every mount, unmount and `GET /api/v1/daemon` (which nydus-snapshotter polls) waited behind it.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_renewal_waiting_on_a_stalled_token_realm_holds_back_no_other_api_request() {
    manifest::assert_root("FUSE mounts");
    let case = "v6-zstd-blake3";
    let dir = tmp();
    let server = fake_registry_with(case, Some(60));
    server.set_token_fault(Some(Fault::Stall(Duration::from_secs(8))));
    let config = net_config(
        dir.path(),
        "registry",
        json!({"scheme": "http", "host": format!("127.0.0.1:{}", server.port), "repo": REPO,
               "timeout": 10, "connect_timeout": 1, "retry_limit": 0}),
    );
    let (d, sock) = Daemon::start_with_api(&config, &manifest::case_bootstrap(case), dir.path());
    let api = |method: &str, target: &str, body: &str| {
        daemon::api_request(&sock, method, target, body, Duration::from_secs(30)).unwrap()
    };
    // A cold read asks for a token, whose realm sends nothing for 8 s.
    let file = d.mountpoint.join(largest_file().0);
    let reader = std::thread::spawn(move || manifest::sha256_file(&file));
    let waited = Instant::now();
    while server.counters.token_requests.load(Ordering::Relaxed) == 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "no token request"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let renewal = {
        let body = json!({"registry_auth": "YWxpY2U6bmV3"}).to_string();
        let sock = sock.clone();
        std::thread::spawn(move || {
            daemon::api_request(
                &sock,
                "PUT",
                "/api/v1/config",
                &body,
                Duration::from_secs(30),
            )
            .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    let (status, info) = api("GET", "/api/v1/daemon", "");
    assert_eq!(status, 200, "{info}");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "GET /api/v1/daemon took {:?} behind the renewal",
        asked.elapsed()
    );
    // The renewal itself goes through once the fetch is over.
    assert_eq!(renewal.join().unwrap().0, 204);
    let _ = reader.join().unwrap();
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn daemon_returns_eio_on_backend_faults_and_serves_again_after_recovery() {
    manifest::assert_root("FUSE mounts");
    let case = "v6-zstd-blake3";
    let dir = tmp();
    let server = fake_registry_with(case, Some(60));
    let config = net_config(
        dir.path(),
        "registry",
        json!({"scheme": "http", "host": format!("127.0.0.1:{}", server.port), "repo": REPO,
               "timeout": 1, "connect_timeout": 1, "retry_limit": 2}),
    );
    let (mut d, sock) =
        Daemon::start_with_api(&config, &manifest::case_bootstrap(case), dir.path());
    let (rel, want) = largest_file();
    let path = d.mountpoint.join(&rel);
    // One read first, so that the faults meet chunk reads rather than the blob's chunk-info array (whose
    // failed load would be remembered for a few seconds).
    assert!(manifest::sha256_file(&d.mountpoint.join("etc/adduser.conf")).is_ok());
    let requests = || server.counters.data_requests.load(Ordering::Relaxed);
    for fault in [
        Fault::Status(500),
        Fault::Stall(Duration::from_secs(5)),
        Fault::Corrupt,
    ] {
        server.set_always(Some(fault.clone()));
        drop_cache(&path);
        let start = Instant::now();
        let asked = requests();
        let err =
            manifest::sha256_file(&path).expect_err("a read through a broken backend must fail");
        assert!(
            requests() > asked,
            "{fault:?}: the read failed without reaching the server"
        );
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{fault:?}: {err}");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{fault:?}: {:?}",
            start.elapsed()
        );
        assert!(d.is_running(), "daemon died on {fault:?}");
        // A blob that did not answer is not asked again for a few seconds (its readers get the error
        // at once). Once the requests still out end (the kernel may have had several READs in
        // flight, retrying), that pause passes: the next fault meets the next request.
        let mut seen = requests();
        let settled_by = Instant::now() + Duration::from_secs(60);
        loop {
            std::thread::sleep(Duration::from_secs(2));
            if requests() == seen {
                break;
            }
            assert!(
                Instant::now() < settled_by,
                "{fault:?}: requests never stopped"
            );
            seen = requests();
        }
        std::thread::sleep(FAILED_LOAD_RETRY_AFTER + Duration::from_millis(200));
    }
    // The failures are in the daemon's event ring, as nydusd's API shows them.
    let (status, body) = daemon::api_request(
        &sock,
        "GET",
        "/api/v1/daemon/events",
        "",
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let events: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(events["total_errors"].as_u64().unwrap() >= 2, "{body}");
    assert!(
        body.contains("giving up after 3 attempts") && body.contains("status 500"),
        "{body}"
    );

    server.set_always(None);
    drop_cache(&path);
    assert_eq!(
        manifest::sha256_file(&path).unwrap(),
        want,
        "after recovery"
    );
    assert_matches_manifest(&d, case);
    d.stop();
}

#[test]
#[ignore = "needs servers: ci/test.sh"]
fn proxy_down_falls_back_to_direct_and_traffic_returns_when_it_is_back() {
    need(&["docker-registry", "tinyproxy"]);
    let dir = tmp();
    let reg = services::start_registry(dir.path(), RegistryAuth::None);
    let data = pseudo_random(2 << 20, 9);
    let id = services::push_blob(reg.port, REPO, None, &data);
    let pport = services::free_port();
    let blob_gets = format!(
        "): GET http://127.0.0.1:{}/v2/{REPO}/blobs/sha256:{id} ",
        reg.port
    );
    let connects = |dir: &Path| {
        let log = std::fs::read_to_string(dir.join("tinyproxy.log")).unwrap_or_default();
        assert!(!log.contains("): CONNECT "), "a CONNECT tunnel:\n{log}");
        log.lines().filter(|l| l.contains(&blob_gets)).count()
    };
    let mut proxy = services::start_tinyproxy(dir.path(), pport);
    let backend = registry_backend(json!({
        "scheme": "http", "host": format!("127.0.0.1:{}", reg.port), "repo": REPO, "timeout": 5,
        "proxy": {"url": format!("http://127.0.0.1:{pport}"), "fallback": true, "check_interval": 1}
    }));
    let read = |off: usize| {
        assert!(backend.read_exact_at(&id, off as u64, 65536).unwrap() == data[off..off + 65536])
    };
    read(0);
    let via = |b: &RemoteBackend<Registry>| b.http.counters.via_proxy.load(Ordering::Relaxed);
    assert!(via(&backend) >= 1);
    let seen = connects(dir.path());
    assert!(
        seen >= 1,
        "tinyproxy saw no absolute-form blob GET:\n{}",
        std::fs::read_to_string(dir.path().join("tinyproxy.log")).unwrap_or_default()
    );

    proxy.kill();
    for i in 1..5 {
        read(i * 65536);
    }
    let via_down = via(&backend);

    let _proxy = services::start_tinyproxy(dir.path(), pport);
    std::thread::sleep(Duration::from_millis(1200));
    for i in 5..8 {
        read(i * 65536);
    }
    assert!(
        via(&backend) > via_down,
        "traffic did not return to the proxy"
    );
    assert!(
        connects(dir.path()) > seen,
        "tinyproxy saw no new blob GET after its restart"
    );
}

/// Request lines tinyproxy logged (`Request (file descriptor N): GET http://... HTTP/1.1`).
fn tinyproxy_requests(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("tinyproxy.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once("): ").filter(|_| l.contains("Request (")))
        .map(|(_, r)| r.to_string())
        .collect()
}

/// An image mounted through tinyproxy (no fallback, so every byte comes through it) from a registry with
/// htpasswd auth: plain absolute-form requests reach the proxy, the Authorization goes through it to the
/// registry, and the tree matches the manifest.
#[test]
#[ignore = "needs root, servers: ci/test.sh"]
fn registry_through_tinyproxy_gets_absolute_form_requests_and_the_image_matches() {
    manifest::assert_root("registry mounts");
    need(&["docker-registry", "tinyproxy", "htpasswd"]);
    let dir = tmp();
    let reg = services::start_registry(dir.path(), RegistryAuth::Htpasswd("alice", "pa55word"));
    let auth = services::basic_auth("alice", "pa55word");
    let case = "v6-zstd-blake3";
    for (id, data) in case_blobs(case) {
        assert_eq!(
            services::push_blob(reg.port, REPO, Some(&format!("Basic {auth}")), &data),
            id
        );
    }
    let pport = services::free_port();
    let _proxy = services::start_tinyproxy(dir.path(), pport);
    let config = net_config(
        dir.path(),
        "registry",
        json!({"scheme": "http", "host": format!("127.0.0.1:{}", reg.port), "repo": REPO,
               "auth": auth, "timeout": 10, "retry_limit": 2,
               "proxy": {"url": format!("http://127.0.0.1:{pport}"), "fallback": false}}),
    );
    let d = mount(dir.path(), &config, &manifest::case_bootstrap(case));
    assert_matches_manifest(&d, case);
    d.stop();
    let requests = tinyproxy_requests(dir.path());
    let blob_prefix = format!("GET http://127.0.0.1:{}/v2/{REPO}/blobs/sha256:", reg.port);
    assert!(
        requests.iter().any(|r| r.starts_with(&blob_prefix)),
        "no absolute-form blob GET: {requests:#?}"
    );
    assert!(
        requests.iter().all(|r| !r.starts_with("CONNECT ")),
        "a CONNECT tunnel: {requests:#?}"
    );
    let access = reg.log_text();
    assert!(
        access.contains("\"GET /v2/rafsd/test/blobs/sha256:") && access.contains(" 206 "),
        "the registry served ranged reads through the proxy:\n{}",
        &access[access.len().saturating_sub(2000)..]
    );
}

/// Bearer tokens with the proxy in the way: the token request goes straight to the issuer, the blob
/// requests go through tinyproxy (which adds `Via`) and carry the token on to the registry.
#[test]
#[ignore = "needs servers: ci/test.sh"]
fn token_fetches_bypass_the_proxy_and_tokens_reach_the_registry_through_it() {
    need(&["tinyproxy"]);
    let dir = tmp();
    let origin = FakeServer::start(FakeOptions {
        repo: REPO.into(),
        bearer: Some(60),
        token_basic: None,
        redirect_to: None,
        storage_head_403: false,
    });
    let data = pseudo_random(1 << 20, 21);
    let id = origin.add_blob(data.clone());
    let pport = services::free_port();
    let _proxy = services::start_tinyproxy(dir.path(), pport);
    let backend = registry_backend(json!({
        "scheme": "http", "host": format!("127.0.0.1:{}", origin.port), "repo": REPO,
        "proxy": {"url": format!("http://127.0.0.1:{pport}"), "fallback": false}
    }));
    for off in [0usize, 300_000, 700_000] {
        assert!(backend.read_exact_at(&id, off as u64, 4096).unwrap() == data[off..off + 4096]);
    }
    let seen = origin.seen.lock().unwrap().clone();
    let tokens: Vec<_> = seen.iter().filter(|r| r.line.contains(" /token")).collect();
    assert!(!tokens.is_empty(), "no token request: {seen:#?}");
    assert!(
        tokens.iter().all(|r| !r.headers.contains_key("via")),
        "a token request went through the proxy: {tokens:#?}"
    );
    let authorized: Vec<_> = seen
        .iter()
        .filter(|r| r.line.starts_with("GET /v2/") && r.headers.contains_key("authorization"))
        .collect();
    assert!(authorized.len() >= 3, "{seen:#?}");
    assert!(
        authorized.iter().all(|r| r
            .headers
            .get("via")
            .is_some_and(|v| v.contains("tinyproxy"))),
        "blob reads that bypassed the proxy: {authorized:#?}"
    );
    assert!(
        tinyproxy_requests(dir.path())
            .iter()
            .all(|r| !r.contains("/token")),
        "the proxy saw a token request"
    );
}

/// Our fault server playing a Dragonfly-style proxy (serving from its own copy of the blob): it sees
/// absolute-form requests with the Dragonfly headers; hostile answers fall back to the origin with the
/// right bytes; a proxy 429 sends one request direct and keeps the proxy, a proxy 403 is final.
#[test]
fn a_hostile_forward_proxy_falls_back_to_direct_with_the_right_bytes() {
    let opts = || FakeOptions {
        repo: REPO.into(),
        bearer: None,
        token_basic: None,
        redirect_to: None,
        storage_head_403: false,
    };
    let (origin, proxy, data, id) = same_blob_on(opts(), opts(), 33);
    let backend = || {
        registry_backend(json!({
            "scheme": "http", "host": format!("127.0.0.1:{}", origin.port), "repo": REPO,
            "timeout": 2, "connect_timeout": 1, "retry_limit": 2,
            "proxy": {"url": format!("http://127.0.0.1:{}", proxy.port), "fallback": true,
                      "check_interval": 60}
        }))
    };
    let data_at = |s: &FakeServer| s.counters.data_requests.load(Ordering::Relaxed);

    let b = backend();
    assert!(b.read_exact_at(&id, 1000, 5000).unwrap() == data[1000..6000]);
    assert_eq!(data_at(&origin), 0, "the healthy proxy was bypassed");
    let seen = proxy.seen.lock().unwrap().clone();
    let url = format!(
        "http://127.0.0.1:{}/v2/{REPO}/blobs/sha256:{id}",
        origin.port
    );
    assert!(seen
        .iter()
        .any(|r| r.line == format!("HEAD {url} HTTP/1.1")));
    let get = seen
        .iter()
        .find(|r| r.line == format!("GET {url} HTTP/1.1"))
        .unwrap_or_else(|| panic!("no absolute-form GET: {seen:#?}"));
    let h = |k: &str| get.headers.get(k).map(String::as_str);
    assert_eq!(
        h("host"),
        Some(format!("127.0.0.1:{}", origin.port).as_str())
    );
    assert_eq!(h("range"), Some("bytes=1000-5999"));
    assert_eq!(h("x-dragonfly-priority"), Some("6"));
    assert_eq!(h("x-dragonfly-use-p2p"), Some("true"));

    for fault in [
        Fault::Garbage,
        Fault::EndlessHead,
        Fault::Reset,
        Fault::Truncate,
        Fault::WrongLength,
        Fault::OtherRange,
        Fault::Status(502),
        Fault::Stall(Duration::from_secs(4)),
    ] {
        proxy.set_always(Some(fault.clone()));
        let b = backend();
        let (before, start) = (data_at(&origin), Instant::now());
        for off in [0usize, 400_000, 900_000] {
            let got = b.read_exact_at(&id, off as u64, 65536);
            assert!(
                got.as_ref().is_ok_and(|g| *g == data[off..off + 65536]),
                "{fault:?}: {:?}",
                got.map(|g| g.len())
            );
        }
        assert!(b.http.counters.via_proxy.load(Ordering::Relaxed) >= 1);
        assert_eq!(data_at(&origin), before + 3, "{fault:?}: not served direct");
        assert!(start.elapsed() < Duration::from_secs(6), "{fault:?}: slow");
    }

    // Rate limited by the proxy: that request goes direct, the next one uses the proxy again.
    let b = backend();
    proxy.set_always(None);
    proxy.queue(&[Fault::ProxyRefuses(429)]);
    let (o, p) = (data_at(&origin), data_at(&proxy));
    assert!(b.read_exact_at(&id, 0, 4096).unwrap() == data[..4096]);
    assert!(b.read_exact_at(&id, 8192, 4096).unwrap() == data[8192..12288]);
    assert_eq!((data_at(&origin), data_at(&proxy)), (o + 1, p + 2));

    // Forbidden by the proxy: one request, no retries against it, no detour.
    proxy.set_always(Some(Fault::ProxyRefuses(403)));
    let (o, p) = (data_at(&origin), data_at(&proxy));
    let err = b.read_exact_at(&id, 0, 4096).unwrap_err().to_string();
    assert!(err.contains("403"), "{err}");
    assert_eq!((data_at(&origin), data_at(&proxy)), (o, p + 1));
    proxy.set_always(None);
}

/// moto's S3 server with IAM auth on: our SigV4 signatures are checked by the server.
#[test]
#[ignore = "needs root, servers: ci/test.sh"]
fn s3_backend_with_sigv4_serves_an_image_from_moto() {
    manifest::assert_root("FUSE mounts");
    need(&["python3"]);
    let case = "v6-lz4-sha256-64k";
    let dir = tmp();
    let moto = services::start_moto(dir.path(), &[("INITIAL_NO_AUTH_ACTION_COUNT", "3")]);
    let blob_dir = manifest::case_blob_dir(case);
    let setup = format!(
        r#"
import boto3, os, sys
ep = "http://127.0.0.1:{port}"
iam = boto3.client("iam", endpoint_url=ep, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
iam.create_user(UserName="rafsd")
iam.put_user_policy(UserName="rafsd", PolicyName="all", PolicyDocument='{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"*","Resource":"*"}}]}}')
k = iam.create_access_key(UserName="rafsd")["AccessKey"]
s3 = boto3.client("s3", endpoint_url=ep, region_name="us-east-1", aws_access_key_id=k["AccessKeyId"], aws_secret_access_key=k["SecretAccessKey"])
s3.create_bucket(Bucket="blobs")
for name in os.listdir("{blobs}"):
    with open(os.path.join("{blobs}", name), "rb") as f:
        s3.put_object(Bucket="blobs", Key="layers/" + name, Body=f.read())
print(k["AccessKeyId"], k["SecretAccessKey"])
"#,
        port = moto.port,
        blobs = blob_dir.display()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &setup])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "moto setup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut keys = text.split_whitespace();
    let (key_id, secret) = (
        keys.next().unwrap().to_string(),
        keys.next().unwrap().to_string(),
    );

    let s3 = |secret: &str| {
        json!({"scheme": "http", "endpoint": format!("127.0.0.1:{}", moto.port), "region": "us-east-1",
               "bucket_name": "blobs", "object_prefix": "layers/", "access_key_id": key_id,
               "access_key_secret": secret, "retry_limit": 1})
    };
    let config = net_config(dir.path(), "s3", s3(&secret));
    let d = mount(dir.path(), &config, &manifest::case_bootstrap(case));
    assert_matches_manifest(&d, case);
    assert!(!d.log_text().contains(&secret), "secret in the daemon log");
    d.stop();

    // The server rejects a wrong secret: the first read fails with a clear error.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let config = net_config(&bad, "s3", s3("not-the-secret"));
    let log = mount_and_fail_first_read(&bad, &config, "status 403");
    assert!(!log.contains("not-the-secret"), "secret in the daemon log");
}

/// Lazy pull, measured at the server: a ~120 MiB image in the real registry, a few files read, the blob
/// bytes the registry sent summed from its access log.
#[test]
#[ignore = "needs root, servers: ci/test.sh"]
fn lazy_pull_fetches_only_what_is_read() {
    manifest::assert_root("FUSE mounts");
    need(&["docker-registry"]);
    let dir = tmp();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("data")).unwrap();
    // 120 files of 1 MiB of incompressible bytes and a few small text files.
    for i in 0..120 {
        std::fs::write(
            src.join(format!("data/f{i:03}")),
            pseudo_random(1 << 20, i + 100),
        )
        .unwrap();
    }
    for name in ["hostname", "os-release", "motd"] {
        std::fs::write(
            src.join(name),
            format!("{name} of the lazy-pull test\n").repeat(20),
        )
        .unwrap();
    }
    let blobs = dir.path().join("blobs");
    let bootstrap = dir.path().join("bootstrap");
    let (code, out) = run_bounded(
        &[
            "build".as_ref(),
            "--blob-dir".as_ref(),
            blobs.as_os_str(),
            "--bootstrap".as_ref(),
            bootstrap.as_os_str(),
            src.as_os_str(),
        ],
        Duration::from_secs(300),
    );
    assert_eq!(code, Some(0), "build: {out}");
    let blob = std::fs::read_dir(&blobs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let image_size = std::fs::metadata(&blob).unwrap().len();
    assert!(image_size > 100 << 20, "image of {image_size} bytes");

    let reg = services::start_registry(dir.path(), RegistryAuth::None);
    services::push_blob(reg.port, REPO, None, &std::fs::read(&blob).unwrap());
    let before = registry_bytes_served(&reg.log_text());
    let config = net_config(
        dir.path(),
        "registry",
        json!({"scheme": "http", "host": format!("127.0.0.1:{}", reg.port), "repo": REPO}),
    );
    let d = mount(dir.path(), &config, &bootstrap);
    let mut read_bytes = 0;
    for name in ["hostname", "os-release", "data/f007", "data/f100"] {
        let got = std::fs::read(d.mountpoint.join(name)).unwrap();
        let want = std::fs::read(src.join(name)).unwrap();
        assert!(got == want, "{name}");
        read_bytes += got.len() as u64;
    }
    d.stop();
    // The access log is written as requests finish; give it a moment.
    std::thread::sleep(Duration::from_millis(300));
    let fetched = registry_bytes_served(&reg.log_text()) - before;
    println!(
        "lazy pull: read {read_bytes} bytes of files, the registry sent {fetched} of {image_size} blob bytes ({:.2}%)",
        fetched as f64 * 100.0 / image_size as f64
    );
    assert!(
        fetched >= read_bytes / 2,
        "fetched {fetched} for {read_bytes} read:\n{}",
        reg.log_text()
    );
    // Two 1 MiB files plus metadata and read amplification: well under a tenth of the image.
    assert!(
        fetched < image_size / 10,
        "fetched {fetched} of {image_size}"
    );
}

// ---------------------------------------------------------------------------------------------------
// Blob metadata loads and mounting without the network.

/// How long a failed chunk-info load, or a blob's data request that found no answer, is remembered:
/// readers of that blob fail fast for this long (`image::FAILED_LOAD_RETRY_AFTER`).
const FAILED_LOAD_RETRY_AFTER: Duration = Duration::from_secs(5);

/// The backend's timeout in the stalled-layer test: long enough that a loaded machine serves the other
/// layers while the stalled read still waits for it.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Read a file of a FUSE mount past the host's page cache; the outcome and how long it took.
fn timed_read(path: &Path) -> (std::io::Result<Vec<u8>>, Duration) {
    drop_cache(path);
    let start = Instant::now();
    let r = std::fs::read(path);
    (r, start.elapsed())
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn a_stalled_layer_stalls_neither_other_layers_nor_cached_data_and_its_failure_is_remembered() {
    manifest::assert_root("FUSE mounts");
    let dir = tmp();
    let file = |name: &str, seed| (name.to_string(), pseudo_random(100_000, seed));
    let base = built::build_tree(
        dir.path(),
        "base",
        vec![file("a1", 1), file("a2", 2)],
        None,
        &[],
    );
    let upper = built::build_tree(
        dir.path(),
        "upper",
        vec![file("b1", 3), file("b2", 4)],
        Some(&base),
        &[],
    );
    let server = FakeServer::start(FakeOptions::plain(REPO));
    for id in [&base.blob_id, &upper.blob_id] {
        assert_eq!(
            &server.add_blob(std::fs::read(base.blob_dir.join(id)).unwrap()),
            id
        );
    }
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        json!({
            "device": {
                "backend": {"type": "http-proxy", "config": {
                    "addr": format!("http://127.0.0.1:{}", server.port), "path": "/blobs",
                    "timeout": STALL_TIMEOUT.as_secs(), "connect_timeout": 2, "retry_limit": 0}},
                "cache": {"type": "blobcache", "config": {"work_dir": dir.path().join("cache")}}
            },
            "mode": "direct", "digest_validate": false, "amplify_io": 0
        })
        .to_string(),
    )
    .unwrap();
    let content = |name: &str| {
        let files = base.files.iter().chain(&upper.files);
        files
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .clone()
    };

    // A first daemon caches b1 (upper layer), then goes away.
    let d = mount(dir.path(), &config, &upper.bootstrap);
    assert!(std::fs::read(d.mountpoint.join("b1")).unwrap() == content("b1"));
    d.stop();

    // The upper layer's blob now stalls (headers, then nothing) for every request.
    server.set_blob_fault(&upper.blob_id, Some(Fault::Stall(Duration::from_secs(30))));
    let mut d = mount(dir.path(), &config, &upper.bootstrap);
    let b2 = d.mountpoint.join("b2");
    let stalled = std::thread::spawn(move || timed_read(&b2));
    std::thread::sleep(Duration::from_millis(500));
    // Meanwhile: cached data of the stalled layer, and a layer whose metadata was never loaded, are
    // served while the stalled read still waits (it ends only at its timeout).
    for name in ["b1", "a1"] {
        let (r, took) = timed_read(&d.mountpoint.join(name));
        let data = r.unwrap_or_else(|e| panic!("{name}: {e}\n{}", d.log_text()));
        assert!(data == content(name), "{name}: wrong bytes");
        assert!(
            !stalled.is_finished(),
            "{name} took {took:?}: it was answered only after the other layer's stalled read ended"
        );
    }
    let (r, took) = stalled.join().unwrap();
    assert_eq!(
        r.expect_err("a read of the stalled layer fails")
            .raw_os_error(),
        Some(libc::EIO)
    );
    // Cut at the backend's timeout, not at the end of the server's 30 s stall.
    assert!(
        took < STALL_TIMEOUT + Duration::from_secs(10),
        "the stalled read took {took:?}"
    );

    // The failure is remembered: the next reader fails at once, without asking the server again.
    let asked = server.counters.data_requests.load(Ordering::Relaxed);
    let (r, took) = timed_read(&d.mountpoint.join("b2"));
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    // Asking the server (still stalling) again would take the whole timeout.
    assert!(
        took < STALL_TIMEOUT / 2,
        "a remembered failure took {took:?}"
    );
    assert_eq!(
        server.counters.data_requests.load(Ordering::Relaxed),
        asked,
        "a remembered failure asked the server again"
    );

    // Once the server answers again, the load is retried after the documented time.
    server.set_blob_fault(&upper.blob_id, None);
    std::thread::sleep(FAILED_LOAD_RETRY_AFTER + Duration::from_millis(200));
    let (r, _) = timed_read(&d.mountpoint.join("b2"));
    assert!(
        r.unwrap_or_else(|e| panic!("b2 after recovery: {e}\n{}", d.log_text())) == content("b2")
    );
    assert!(d.is_running());
    d.stop();
}

#[test]
#[ignore = "needs root, servers: ci/test.sh"]
fn a_warm_cache_mounts_and_serves_with_the_registry_gone() {
    manifest::assert_root("registry mounts");
    need(&["docker-registry"]);
    let case = "v6-zstd-blake3";
    let dir = tmp();
    let mut reg = services::start_registry(dir.path(), RegistryAuth::None);
    for (id, data) in case_blobs(case) {
        assert_eq!(services::push_blob(reg.port, REPO, None, &data), id);
    }
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        json!({
            "device": {
                "backend": {"type": "registry", "config": {
                    "scheme": "http", "host": format!("127.0.0.1:{}", reg.port), "repo": REPO,
                    "timeout": 2, "connect_timeout": 2, "retry_limit": 1}},
                "cache": {"type": "blobcache", "config": {"work_dir": dir.path().join("cache")}}
            },
            "mode": "direct", "digest_validate": false, "amplify_io": 0
        })
        .to_string(),
    )
    .unwrap();
    // One file stays cold: the first non-empty one of at most one chunk whose content no other file has.
    let rows: Vec<manifest::Row> = manifest::load_manifest()
        .into_iter()
        .filter(|r| r["type"] == "f")
        .collect();
    let cold = rows
        .iter()
        .find(|r| {
            let size: u64 = r["size"].parse().unwrap();
            size > 0
                && size <= 1 << 20
                && rows.iter().filter(|o| o["sha256"] == r["sha256"]).count() == 1
        })
        .unwrap()
        .clone();
    let warm: Vec<&manifest::Row> = rows.iter().filter(|r| r["path"] != cold["path"]).collect();

    let d = mount(dir.path(), &config, &manifest::case_bootstrap(case));
    for r in &warm {
        let got = manifest::sha256_file(&d.mountpoint.join(&r["path"])).unwrap();
        assert_eq!(got, r["sha256"], "{}", r["path"]);
    }
    d.stop();

    reg.kill();
    let d = mount(dir.path(), &config, &manifest::case_bootstrap(case));
    for r in &warm {
        let got = manifest::sha256_file(&d.mountpoint.join(&r["path"])).unwrap_or_else(|e| {
            panic!(
                "{} with the registry gone: {e}\n{}",
                r["path"],
                d.log_text()
            )
        });
        assert_eq!(got, r["sha256"], "{} with the registry gone", r["path"]);
    }
    let (r, took) = timed_read(&d.mountpoint.join(&cold["path"]));
    assert_eq!(
        r.expect_err("an uncached file needs the registry")
            .raw_os_error(),
        Some(libc::EIO),
        "{}",
        cold["path"]
    );
    assert!(
        took < Duration::from_secs(10),
        "the failed read took {took:?}"
    );
    d.stop();
}

// Metrics of the backend, per mount.

/// `/api/v1/metrics/backend?id=MP` of a running virtio-fs daemon.
fn backend_metrics(d: &frontend::VirtiofsDaemon, id: Option<&str>) -> (u16, serde_json::Value) {
    let target = match id {
        Some(id) => format!("/api/v1/metrics/backend?id={id}"),
        None => "/api/v1/metrics/backend".into(),
    };
    let (status, body) = d.api("GET", &target, "").unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// `/api/v1/metrics/backend?id=` reports each mount's own backend, as nydusd's BackendMetrics: the
/// registry mount says "registry" and counts the reads that failed (a server answering 500), the localfs
/// mount says "localfs" with no errors; every count is in the size distribution.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn backend_metrics_report_each_mounts_backend_type_and_failed_reads() {
    use frontend::{Guest, Options, VirtiofsDaemon, ROOT};
    let case = "v6-zstd-blake3";
    let dir = tmp();
    let server = fake_registry_with(case, Some(60));
    let d = VirtiofsDaemon::start(
        env!("CARGO_BIN_EXE_rafsd"),
        dir.path(),
        &["--allow-network"],
    );
    let registry = json!({
        "device": {
            "backend": {"type": "registry", "config": {"scheme": "http",
                "host": format!("127.0.0.1:{}", server.port), "repo": REPO,
                "timeout": 1, "connect_timeout": 1, "retry_limit": 1}},
            "cache": {"type": "blobcache", "config": {"work_dir": dir.path().join("cache-reg")}}
        },
        "mode": "direct",
        "digest_validate": true
    });
    d.mount_rafs(
        "/reg",
        &manifest::case_bootstrap(case),
        &registry.to_string(),
    );
    let local = daemon::v1_config(
        &manifest::case_blob_dir(case),
        &dir.path().join("cache-local"),
        true,
        "",
    );
    d.mount_rafs("/local", &manifest::case_bootstrap(case), &local);
    let mut g = Guest::connect(&d.sock, Options::default()).unwrap();
    g.fuse_init().unwrap();
    let (rel, want) = largest_file();
    let file = |g: &mut Guest, mp: &str| {
        let root = g.lookup(ROOT, mp.as_bytes()).unwrap().nodeid;
        g.lookup_path(root, &rel).unwrap().nodeid
    };
    // A first read loads the blob's chunk-info array (a failed load would be remembered for a few
    // seconds, `image::FAILED_LOAD_RETRY_AFTER`); then the registry fails every data request: EIO.
    let reg = g.lookup(ROOT, b"reg").unwrap().nodeid;
    let small = g.lookup_path(reg, "etc/adduser.conf").unwrap().nodeid;
    g.read_file(small, 4096).unwrap();
    server.set_always(Some(Fault::Status(500)));
    let f = file(&mut g, "reg");
    let e = g.read_file(f, 128 << 10).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let (status, failed) = backend_metrics(&d, Some("/reg"));
    assert_eq!(status, 200, "{failed}");
    assert_eq!(failed["backend_type"], "registry", "{failed}");
    assert!(failed["read_errors"].as_u64().unwrap() >= 1, "{failed}");
    // Back up: both mounts serve the file (once the failure is no longer remembered).
    server.set_always(None);
    std::thread::sleep(FAILED_LOAD_RETRY_AFTER + Duration::from_millis(200));
    for mp in ["reg", "local"] {
        let f = file(&mut g, mp);
        let data = g.read_file(f, 128 << 10).unwrap();
        assert_eq!(hex(&sha2::Sha256::digest(&data)), want, "/{mp}");
    }
    for (mp, kind) in [("/reg", "registry"), ("/local", "localfs")] {
        let (status, m) = backend_metrics(&d, Some(mp));
        assert_eq!(status, 200, "{m}");
        assert_eq!(m["backend_type"], kind, "{mp}: {m}");
        let count = m["read_count"].as_u64().unwrap();
        let errors = m["read_errors"].as_u64().unwrap();
        let by_size: u64 = m["read_count_block_size_dist"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(by_size, count, "{mp}: {m}");
        assert!(count > errors, "{mp}: {m}");
        assert!(m["read_amount_total"].as_u64().unwrap() > 0, "{mp}: {m}");
        if kind == "localfs" {
            assert_eq!(errors, 0, "{mp}: {m}");
        } else {
            assert!(errors >= failed["read_errors"].as_u64().unwrap(), "{m}");
        }
    }
    // Two RAFS mounts: without `id` there is no single answer.
    assert_eq!(backend_metrics(&d, None).0, 404);
    drop(g);
    d.kill_and_check();
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Credentials in URLs of a mount config (a proxy `user:password@`, a mirror's) never leave the daemon:
/// not in `GET /api/v1/daemon` (which shows `***@host`), not in error answers or `/daemon/events`, not
/// in any log line, even at debug level, while the dead proxy and mirror make it log their failures.
#[test]
#[ignore = "needs root: ci/test.sh"]
fn url_credentials_never_appear_in_api_answers_or_logs() {
    use frontend::{Guest, Options, VirtiofsDaemon, ROOT};
    const PASSWORD: &str = "Pr0xyS3cretPw";
    let case = "v6-zstd-blake3";
    let dir = tmp();
    let server = fake_registry_with(case, None);
    let (dead_proxy, dead_mirror) = (services::free_port(), services::free_port());
    let d = VirtiofsDaemon::start(
        env!("CARGO_BIN_EXE_rafsd"),
        dir.path(),
        &["--allow-network", "--log-level", "debug"],
    );
    let config = |proxy: &str, fallback: bool, cache: &str| {
        json!({
            "device": {
                "backend": {"type": "registry", "config": {"scheme": "http",
                    "host": format!("127.0.0.1:{}", server.port), "repo": REPO,
                    "timeout": 2, "connect_timeout": 1, "retry_limit": 1,
                    "proxy": {"url": proxy, "fallback": fallback},
                    "mirrors": [{"host": format!("http://mirror:{PASSWORD}@127.0.0.1:{dead_mirror}")}]}},
                "cache": {"type": "blobcache", "config": {"work_dir": dir.path().join(cache)}}
            },
            "mode": "direct"
        })
        .to_string()
    };
    let proxy = format!("http://user:{PASSWORD}@127.0.0.1:{dead_proxy}");
    d.mount_rafs(
        "/fallback",
        &manifest::case_bootstrap(case),
        &config(&proxy, true, "c1"),
    );
    // Without fallback the dead proxy fails the first read (a mount asks the network nothing): a log
    // line and an event.
    let strict = json!({"source": manifest::case_bootstrap(case), "fs_type": "rafs",
        "config": config(&proxy, false, "c2")});
    let (status, mounted) = d
        .api(
            "POST",
            "/api/v1/mount?mountpoint=/strict",
            &strict.to_string(),
        )
        .unwrap();
    assert_eq!(status, 204, "{mounted}");
    // A proxy URL the HTTP client refuses: the error names it, masked.
    let bad = json!({"source": manifest::case_bootstrap(case), "fs_type": "rafs",
        "config": config(&format!("ftp://user:{PASSWORD}@127.0.0.1:1"), true, "c3")});
    let (status, refused) = d
        .api("POST", "/api/v1/mount?mountpoint=/bad", &bad.to_string())
        .unwrap();
    assert!((400..500).contains(&status), "{status} {refused}");
    assert!(refused.contains("proxy url"), "{refused}");
    // Mirror and proxy are down: reads go direct.
    let mut g = Guest::connect(&d.sock, Options::default()).unwrap();
    g.fuse_init().unwrap();
    let (rel, want) = largest_file();
    let strict_root = g.lookup(ROOT, b"strict").unwrap().nodeid;
    let f = g.lookup_path(strict_root, &rel).unwrap().nodeid;
    let e = g.read_file(f, 128 << 10).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let root = g.lookup(ROOT, b"fallback").unwrap().nodeid;
    let f = g.lookup_path(root, &rel).unwrap().nodeid;
    let got = g.read_file(f, 128 << 10).unwrap();
    assert_eq!(hex(&sha2::Sha256::digest(got)), want);
    let (_, info) = d.api("GET", "/api/v1/daemon", "").unwrap();
    assert!(
        info.contains(&format!("http://***@127.0.0.1:{dead_proxy}")),
        "GET /daemon shows the proxy without its credentials: {info}"
    );
    let (_, events) = d.api("GET", "/api/v1/daemon/events", "").unwrap();
    assert!(events.contains("giving up"), "{events}");
    let log = d.log_text();
    assert!(log.contains("mirror") && log.contains("proxy"), "{log}");
    for (what, text) in [
        ("GET /api/v1/daemon", &info),
        ("the refused mount's answer", &refused),
        ("GET /api/v1/daemon/events", &events),
        ("the log", &log),
    ] {
        let leak = text.lines().find(|l| l.contains(PASSWORD));
        assert!(leak.is_none(), "{what} holds the password: {leak:?}");
    }
    drop(g);
    d.kill_and_check();
}

#[test]
fn streamed_ranges_reuse_connections_and_a_broken_body_is_an_error_never_short_data() {
    use std::io::Read;
    let (server, data, id, backend) = fake_registry_blob(11);
    let read_all = |offset: u64, len: usize| -> std::io::Result<Vec<u8>> {
        let mut r = backend.open_range(&id, offset, len).unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got)?;
        Ok(got)
    };
    assert!(read_all(0, 1 << 20).unwrap() == data[..1 << 20]);
    // A stream read to its end gives its connection back: the next ranges use it.
    let conns = server.counters.connections.load(Ordering::Relaxed);
    for i in 1..6u64 {
        let at = i * 300_000;
        assert!(read_all(at, 200_000).unwrap() == data[at as usize..at as usize + 200_000]);
    }
    assert_eq!(
        server.counters.connections.load(Ordering::Relaxed),
        conns,
        "a connection per streamed range"
    );
    // Past the end: clamped to the blob.
    assert_eq!(read_all(data.len() as u64 - 10, 100).unwrap().len(), 10);
    // A body cut short fails the reader; it never ends early as if the range were shorter.
    server.queue(&[Fault::Truncate]);
    read_all(1000, 1 << 20).expect_err("a truncated body must fail the stream");
}

/// Local blobs whose streamed ranges break after their first 16 bytes.
struct CutStreams {
    inner: rafsd::storage::localfs::LocalFs,
    opened: std::sync::atomic::AtomicUsize,
}

struct CutAfter<R>(R, usize);

impl<R: std::io::Read> std::io::Read for CutAfter<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.1 == 0 {
            return Err(std::io::Error::other("connection reset"));
        }
        let n = buf.len().min(self.1);
        let got = self.0.read(&mut buf[..n])?;
        self.1 -= got;
        Ok(got)
    }
}

impl BlobBackend for CutStreams {
    fn kind(&self) -> &'static str {
        "localfs"
    }
    fn read_at(&self, blob_id: &str, offset: u64, buf: &mut [u8]) -> rafsd::Result<usize> {
        self.inner.read_at(blob_id, offset, buf)
    }
    fn blob_size(&self, blob_id: &str) -> rafsd::Result<u64> {
        self.inner.blob_size(blob_id)
    }
    fn open_range(
        &self,
        blob_id: &str,
        offset: u64,
        len: usize,
    ) -> rafsd::Result<Box<dyn std::io::Read + Send>> {
        self.opened.fetch_add(1, Ordering::Relaxed);
        let r = self.inner.open_range(blob_id, offset, len)?;
        Ok(Box::new(CutAfter(r, 16)))
    }
}

#[test]
fn a_streamed_run_cut_before_the_readers_chunk_falls_back_to_that_chunk_alone() {
    let case = "v6-zstd-blake3";
    let dir = tmp();
    let backend = Arc::new(CutStreams {
        inner: rafsd::storage::localfs::LocalFs::with_dir(manifest::case_blob_dir(case)),
        opened: Default::default(),
    });
    let image = rafsd::RafsImage::open(
        &manifest::case_bootstrap(case),
        backend.clone(),
        rafsd::ImageOptions {
            cache_dir: Some(dir.path().join("cache")),
            amplify_io: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    // The largest file read front to back: after its first chunk, misses stream the chunks after them.
    let (rel, want) = largest_file();
    let mut ino = image.root_ino();
    for name in rel.split('/') {
        ino = image.lookup(ino, name.as_bytes()).unwrap().unwrap();
    }
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 128 << 10];
    let mut at = 0;
    loop {
        let n = image
            .read(ino, at, &mut buf)
            .unwrap_or_else(|e| panic!("read at {at}: {e}"));
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        at += n as u64;
    }
    assert!(
        backend.opened.load(Ordering::Relaxed) > 0,
        "no run was streamed: the test proves nothing"
    );
    assert_eq!(format!("{:x}", hash.finalize()), want);
}
