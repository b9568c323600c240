//! The admin API, compatible with nydusd's `/api/v1` (what Kata and nydus-snapshotter call): daemon
//! info and exit, mounting and unmounting images and shares while the daemon serves, and metrics.

pub mod http;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::daemon::{Control, Daemon, DaemonState, FsType, MountCmd};
use crate::error::Error;
use http::{Request, Response};

/// Start serving the API for `daemon` on the Unix socket `path`.
pub fn start(path: &Path, daemon: Arc<Daemon>) -> crate::Result<std::thread::JoinHandle<()>> {
    start_on(http::bind(path)?, daemon)
}

/// Serve the API on a socket bound earlier with [`http::bind`] (bound before the sandbox hides its path).
pub fn start_on(
    listener: std::os::unix::net::UnixListener,
    daemon: Arc<Daemon>,
) -> crate::Result<std::thread::JoinHandle<()>> {
    http::serve_on(listener, Arc::new(move |req: &Request| route(&daemon, req)))
}

/// The status and nydusd error code of each kind of error.
fn status_of(e: &Error) -> (u16, &'static str) {
    match e {
        Error::NotFound(_) => (404, "NotFound"),
        Error::Conflict(_) => (409, "AlreadyExists"),
        Error::Forbidden(_) => (403, "Forbidden"),
        Error::Invalid(_) | Error::Corrupt(_) | Error::Integrity(_) => (400, "BadRequest"),
        Error::Unsupported(_) => (501, "Unsupported"),
        Error::Backend(_) => (502, "BackendError"),
        Error::Io { .. } => (500, "IoError"),
        Error::Internal(_) => (500, "InternalError"),
    }
}

fn error_response(e: &Error) -> Response {
    let (status, code) = status_of(e);
    Response::error(status, code, crate::redact::text(&e.to_string()))
}

fn method_not_allowed(req: &Request) -> Response {
    Response::error(
        405,
        "BadRequest",
        format!("{} is not allowed on {}", req.method, req.path),
    )
}

pub fn route(daemon: &Daemon, req: &Request) -> Response {
    let Some(path) = req.path.strip_prefix("/api/v1") else {
        return Response::error(404, "NoRoute", format!("no route for {}", req.path));
    };
    match (path, req.method.as_str()) {
        ("/daemon", "GET") => Response::json(200, &daemon.info()),
        ("/daemon", "PUT") => set_log_level(req),
        ("/daemon", _) => method_not_allowed(req),
        ("/daemon/events", "GET") => Response::json(200, &crate::storage::events::snapshot()),
        ("/daemon/backend", "GET") => backend_info(daemon, req),
        ("/daemon/start", "PUT") => control(daemon, Control::Start),
        ("/daemon/exit", "PUT") => {
            log::info!("exit requested through the API");
            daemon.request_exit();
            Response::no_content()
        }
        ("/daemon/fuse/sendfd", "PUT") => control(daemon, Control::SendFd),
        ("/daemon/upgrade", "PUT") => upgrade(daemon),
        ("/daemon/fuse/takeover", "PUT") => control(daemon, Control::Takeover),
        ("/config", "PUT") => update_config(daemon, req),
        ("/config", _) => method_not_allowed(req),
        ("/mount", "POST" | "PUT" | "DELETE") => mount(daemon, req),
        ("/mount", _) => method_not_allowed(req),
        ("/metrics", "GET") => metrics(daemon, req, |mp, fs| fs.metrics.to_json(mp)),
        ("/metrics/files", "GET") if req.query("latest") == Some("true") => {
            metrics(daemon, req, |_, fs| fs.metrics.take_latest_read_json())
        }
        ("/metrics/files", "GET") => metrics(daemon, req, |_, fs| fs.metrics.files_json()),
        ("/metrics/pattern", "GET") => metrics(daemon, req, |_, fs| fs.metrics.pattern_json()),
        ("/metrics/backend", "GET") => metrics(daemon, req, |_, fs| backend_metrics(fs)),
        ("/metrics/blobcache", "GET") => metrics(daemon, req, |_, fs| blobcache_metrics(fs)),
        // nydusd answers 204 when nothing is in flight.
        ("/metrics/inflight", "GET") => match daemon.inflight() {
            Some(ops) => Response::json(200, &ops),
            None => Response::no_content(),
        },
        (_, _) => Response::error(404, "NoRoute", format!("no route for {}", req.path)),
    }
}

/// `PUT /daemon/upgrade`: a new virtio-fs daemon asks for the device (see
/// [`crate::vhost_user::upgrade`]); the connection leaves HTTP for the hand-over protocol.
fn upgrade(daemon: &Daemon) -> Response {
    match daemon.upgrade_hook() {
        Some(hook) => Response::switch(Box::new(move |peer| hook(peer))),
        None => error_response(&Error::Unsupported(
            "live upgrade through /daemon/upgrade is for the virtio-fs daemon \
             (the FUSE daemon uses /daemon/fuse/sendfd and takeover)"
                .into(),
        )),
    }
}

/// Failover and live upgrade requests, carried out by the front end's main loop. Like nydusd's state
/// machine, takeover is an event of state INIT and start one of READY.
fn control(daemon: &Daemon, c: Control) -> Response {
    let state = daemon.state();
    let valid_in = match c {
        Control::Takeover => Some(DaemonState::Init),
        Control::Start => Some(DaemonState::Ready),
        Control::SendFd => None,
    };
    if let Some(want) = valid_in.filter(|w| *w != state) {
        return Response::error(
            400,
            "UnexpectedEvent",
            format!(
                "{c:?} is only valid in state {}; the daemon is {}",
                want.as_str(),
                state.as_str()
            ),
        );
    }
    match daemon.control(c) {
        Ok(()) => Response::no_content(),
        Err(e) => error_response(&e),
    }
}

/// `PUT /config?id=<mountpoint>` with a JSON object of strings (nydus-snapshotter's credential renewal).
fn update_config(daemon: &Daemon, req: &Request) -> Response {
    let params =
        match serde_json::from_slice::<Value>(&req.body) {
            Ok(Value::Object(m)) => m,
            _ => return Response::error(
                400,
                "BadRequest",
                "body must be a JSON object such as {\"registry_auth\": \"<base64 user:pass>\"}",
            ),
        };
    match daemon.update_config(req.query("id"), &params) {
        Ok(()) => Response::no_content(),
        Err(e) => {
            log::warn!("PUT /api/v1/config: {e}");
            error_response(&e)
        }
    }
}

fn set_log_level(req: &Request) -> Response {
    let level = serde_json::from_slice::<Value>(&req.body)
        .ok()
        .and_then(|v| {
            v.get("log_level")
                .and_then(Value::as_str)
                .map(str::to_string)
        });
    match level.as_deref().map(str::parse::<log::LevelFilter>) {
        Some(Ok(l)) => {
            log::set_max_level(l);
            Response::no_content()
        }
        _ => Response::error(
            400,
            "BadRequest",
            "body must be {\"log_level\": \"trace|debug|info|warn|error|off\"}",
        ),
    }
}

fn mount(daemon: &Daemon, req: &Request) -> Response {
    let Some(mountpoint) = req.query("mountpoint") else {
        return Response::error(
            400,
            "BadRequest",
            "'mountpoint' should be specified in query string",
        );
    };
    let result = if req.method == "DELETE" {
        daemon.umount(mountpoint)
    } else {
        match parse_mount_body(&req.body) {
            Err(e) => Err(e),
            Ok(cmd) if req.method == "PUT" && daemon_has(daemon, mountpoint) => {
                daemon.remount(mountpoint, cmd)
            }
            Ok(cmd) => daemon.mount(mountpoint, cmd),
        }
    };
    match result {
        Ok(()) => Response::no_content(),
        Err(e) => {
            log::warn!("{} /api/v1/mount?mountpoint={mountpoint}: {e}", req.method);
            error_response(&e)
        }
    }
}

fn daemon_has(daemon: &Daemon, mountpoint: &str) -> bool {
    daemon.info()["backend_collection"]
        .get(mountpoint)
        .is_some()
}

/// `{"source", "fs_type", "config", "prefetch_files"}`; `config` is the daemon config as a JSON string.
fn parse_mount_body(body: &[u8]) -> crate::Result<MountCmd> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Error::Invalid(format!("mount body is not valid JSON: {e}")))?;
    let field = |k: &str| -> crate::Result<String> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(Error::Invalid(format!(
                "mount body: `{k}` must be a string"
            ))),
        }
    };
    let fs_type = FsType::parse(&field("fs_type")?)?;
    let source = field("source")?;
    if source.is_empty() || !source.starts_with('/') {
        return Err(Error::Invalid(
            "mount body: `source` must be an absolute path".into(),
        ));
    }
    let prefetch_files = match v.get("prefetch_files") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().filter(|s| s.starts_with('/')).map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                Error::Invalid("mount body: `prefetch_files` must be absolute paths".into())
            })?,
        Some(_) => {
            return Err(Error::Invalid(
                "mount body: `prefetch_files` must be a list".into(),
            ))
        }
    };
    let config = field("config")?;
    if matches!(fs_type, FsType::Rafs | FsType::BlobView) && config.is_empty() {
        return Err(Error::Invalid(
            "mount body: a rafs or blob_view mount needs `config`".into(),
        ));
    }
    Ok(MountCmd {
        fs_type,
        source: source.into(),
        config,
        prefetch_files,
        id: None,
    })
}

fn metrics(
    daemon: &Daemon,
    req: &Request,
    f: impl FnOnce(&str, &crate::fs::RafsFs) -> Value,
) -> Response {
    match daemon.with_rafs(req.query("id"), |mp, fs| f(mp, fs)) {
        Ok(v) => Response::json(200, &v),
        Err(e) => Response::error(404, "NoCounter", e.to_string()),
    }
}

fn backend_metrics(fs: &crate::fs::RafsFs) -> Value {
    let image = fs.image();
    let (metrics, kind) = image.backend_metrics();
    let mut v = metrics.to_json(kind);
    // With `access_pattern`: what user reads asked for, to set against `read_amount_total`.
    if let Some(d) = image.demand() {
        v["demand_chunks"] = json!(d.chunks);
        v["demand_compressed_bytes"] = json!(d.compressed_bytes);
    }
    let (missed, speculative) = image.speculation();
    v["missed_compressed_bytes"] = json!(missed);
    v["speculative_compressed_bytes"] = json!(speculative);
    v
}

fn blobcache_metrics(fs: &crate::fs::RafsFs) -> Value {
    let Some(cache) = fs.image().cache() else {
        return json!({"underlying_files": [], "store_path": null});
    };
    let m = &cache.metrics;
    let (ready, total) = cache.ready_counts();
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    json!({
        "underlying_files": cache.files(),
        "store_path": cache.work_dir(),
        "partial_hits": get(&m.partial_hits),
        "whole_hits": get(&m.whole_hits),
        "total": get(&m.total),
        "entries_count": ready,
        "prefetch_data_amount": get(&m.prefetch_data_amount),
        "prefetch_requests_count": get(&m.prefetch_requests_count),
        "prefetch_unmerged_chunks": get(&m.prefetch_unmerged_chunks),
        "data_all_ready": ready == total && total > 0,
    })
}

fn backend_info(daemon: &Daemon, req: &Request) -> Response {
    let Some(mp) = req.query("mountpoint") else {
        return Response::error(
            400,
            "BadRequest",
            "'mountpoint' should be specified in query string",
        );
    };
    metrics(
        daemon,
        &Request {
            method: req.method.clone(),
            path: req.path.clone(),
            query: vec![("id".into(), mp.into())],
            body: Vec::new(),
        },
        |_, fs| {
            let info = fs.image().info();
            json!({
                "version": if info.version == 6 { 0x600 } else { 0x500 },
                "chunk_size": info.chunk_size,
                "inodes_count": info.inode_count,
                "root_inode": info.root_ino,
                "flags": {"bits": info.flags},
                "blob_count": info.blobs.len(),
            })
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_kind_of_error_not_its_words() {
        use crate::error::BackendErrorKind;
        let cases = [
            (
                Error::Conflict("/a would overlap the mount at /a/b".into()),
                409,
            ),
            (
                Error::Invalid("already mounted, overlap: words only".into()),
                400,
            ),
            (Error::NotFound("x".into()), 404),
            (Error::Forbidden("x".into()), 403),
            (Error::Corrupt("x".into()), 400),
            (Error::Integrity("x".into()), 400),
            (Error::Unsupported("x".into()), 501),
            (Error::backend(BackendErrorKind::Auth, "x"), 502),
            (Error::Internal("x".into()), 500),
            (
                Error::io("x", std::io::Error::from_raw_os_error(libc::EIO)),
                500,
            ),
        ];
        for (e, status) in cases {
            assert_eq!(status_of(&e).0, status, "{e:?}");
        }
    }
}
