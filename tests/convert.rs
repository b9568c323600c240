//! `rafsd convert` and `rafsd mount-image` against Debian's `docker-registry`, started by each test (with
//! htpasswd auth, in token mode, or open). Source images are built here, layer by layer (files, a deleted
//! file and an opaque directory in an upper layer, hard links, symlinks, xattrs; gzip, zstd and plain
//! tar layers), pushed with plain HTTP requests, converted, and the Nydus image is mounted with
//! `rafsd fuse` on the registry backend; the mount is compared with the flattened tree a model of the
//! layers predicts, entry by entry (type, mode, owner, size, link count, mtime, content hash, symlink
//! target, xattrs, hard links). Needs root (mounts, trusted.* xattrs) and ci/install-deps.sh's packages.

use kit::built::pseudo_random;
use kit::{daemon, manifest, services};

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use services::RegistryAuth;
use sha2::Digest;

const MTIME: u64 = 1_600_000_000;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const NYDUS_BLOB: &str = "application/vnd.oci.image.layer.nydus.blob.v1";

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("rafsd-convert-")
        .tempdir()
        .unwrap()
}

fn need(tools: &[&str]) {
    for t in tools {
        assert!(
            services::have(t),
            "`{t}` is missing: run ci/install-deps.sh"
        );
    }
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(data))
}

// ---------------------------------------------------------------------------------------------------
// Layers and the tree they flatten to.

#[derive(Clone)]
enum Entry {
    Dir(&'static str, u32, u32),
    /// path, mode, uid, content, xattrs
    File(
        &'static str,
        u32,
        u32,
        Vec<u8>,
        Vec<(&'static str, &'static [u8])>,
    ),
    /// A hard link to an earlier entry of the same layer.
    Link(&'static str, &'static str),
    Symlink(&'static str, &'static str),
}

fn header(kind: tar::EntryType, mode: u32, uid: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid as u64);
    h.set_gid(uid as u64);
    h.set_mtime(MTIME);
    h.set_size(size);
    h
}

fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            Entry::Dir(p, mode, uid) => {
                let mut h = header(tar::EntryType::Directory, *mode, *uid, 0);
                b.append_data(&mut h, format!("{p}/"), std::io::empty())
                    .unwrap();
            }
            Entry::File(p, mode, uid, data, xattrs) => {
                if !xattrs.is_empty() {
                    let keys: Vec<(String, &[u8])> = xattrs
                        .iter()
                        .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                        .collect();
                    b.append_pax_extensions(keys.iter().map(|(k, v)| (k.as_str(), *v)))
                        .unwrap();
                }
                let mut h = header(tar::EntryType::Regular, *mode, *uid, data.len() as u64);
                b.append_data(&mut h, p, data.as_slice()).unwrap();
            }
            Entry::Link(p, target) => {
                let mut h = header(tar::EntryType::Link, 0o644, 0, 0);
                b.append_link(&mut h, p, target).unwrap();
            }
            Entry::Symlink(p, target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0);
                b.append_link(&mut h, p, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

#[derive(Clone, Debug)]
struct Want {
    kind: &'static str,
    mode: u32,
    uid: u32,
    data: Vec<u8>,
    target: String,
    xattrs: Vec<(String, Vec<u8>)>,
    /// Paths sharing one inode share a group.
    group: Option<String>,
}

/// The tree a stack of layers shows, by OCI rules: a layer's `.wh.NAME` removes NAME below it, its
/// `.wh..wh..opq` empties its directory of everything below it; then its entries replace lower ones.
fn flatten(layers: &[Vec<Entry>]) -> BTreeMap<String, Want> {
    let mut tree: BTreeMap<String, Want> = BTreeMap::new();
    let remove_under = |tree: &mut BTreeMap<String, Want>, dir: &str| {
        tree.retain(|k, _| !k.starts_with(&format!("{dir}/")));
    };
    for layer in layers {
        for e in layer {
            let Entry::File(p, ..) = e else { continue };
            let (dir, name) = p.rsplit_once('/').unwrap_or(("", p));
            if name == ".wh..wh..opq" {
                remove_under(&mut tree, dir);
            } else if let Some(victim) = name.strip_prefix(".wh.") {
                let victim = if dir.is_empty() {
                    victim.to_string()
                } else {
                    format!("{dir}/{victim}")
                };
                tree.remove(&victim);
                remove_under(&mut tree, &victim);
            }
        }
        for e in layer {
            let (path, want) = match e {
                Entry::File(p, ..) if p.rsplit('/').next().unwrap().starts_with(".wh.") => continue,
                Entry::Dir(p, mode, uid) => (
                    p,
                    Want {
                        kind: "d",
                        mode: *mode,
                        uid: *uid,
                        data: vec![],
                        target: String::new(),
                        xattrs: vec![],
                        group: None,
                    },
                ),
                Entry::File(p, mode, uid, data, xattrs) => (
                    p,
                    Want {
                        kind: "f",
                        mode: *mode,
                        uid: *uid,
                        data: data.clone(),
                        target: String::new(),
                        xattrs: xattrs
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_vec()))
                            .collect(),
                        group: None,
                    },
                ),
                Entry::Symlink(p, target) => (
                    p,
                    Want {
                        kind: "l",
                        mode: 0o777,
                        uid: 0,
                        data: vec![],
                        target: target.to_string(),
                        xattrs: vec![],
                        group: None,
                    },
                ),
                Entry::Link(p, target) => {
                    let t = tree.get_mut(*target).expect("link target earlier");
                    let group = t.group.get_or_insert_with(|| target.to_string()).clone();
                    let mut w = t.clone();
                    w.group = Some(group);
                    (p, w)
                }
            };
            tree.insert(path.to_string(), want);
        }
    }
    tree
}

/// Compare the tree at `root` with `want`: every entry, every column, and hard links as one inode.
fn compare(root: &Path, want: &BTreeMap<String, Want>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p);
            }
            seen.insert(rel);
        }
    }
    for extra in seen.iter().filter(|p| !want.contains_key(*p)) {
        problems.push(format!("{extra}: unexpected entry"));
    }
    let mut inodes: BTreeMap<String, u64> = BTreeMap::new();
    for (path, w) in want {
        let got = match manifest::probe(root, path) {
            Ok(g) => g,
            Err(e) => {
                problems.push(format!("{path}: missing ({e})"));
                continue;
            }
        };
        let links = match &w.group {
            Some(g) => want
                .values()
                .filter(|o| o.group.as_ref() == Some(g))
                .count(),
            None => 1,
        };
        let size = match w.kind {
            "d" => String::new(),
            "l" => w.target.len().to_string(),
            _ => w.data.len().to_string(),
        };
        let expected = [
            ("type", w.kind.to_string()),
            ("mode", format!("{:o}", w.mode)),
            ("uid", w.uid.to_string()),
            ("gid", w.uid.to_string()),
            ("size", size),
            (
                "nlink",
                if w.kind == "d" {
                    String::new()
                } else {
                    links.to_string()
                },
            ),
            ("mtime", MTIME.to_string()),
            ("target", w.target.clone()),
            (
                "sha256",
                if w.kind == "f" {
                    format!("{:x}", sha2::Sha256::digest(&w.data))
                } else {
                    String::new()
                },
            ),
            (
                "xattrs",
                w.xattrs
                    .iter()
                    .map(|(k, v)| (k, v))
                    .collect::<BTreeMap<_, _>>()
                    .into_iter()
                    .map(|(k, v)| {
                        format!(
                            "{k}={}",
                            v.iter().map(|b| format!("{b:02x}")).collect::<String>()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ];
        for (col, value) in expected {
            if got[col] != value {
                problems.push(format!("{path}: {col}: want {value:?} got {:?}", got[col]));
            }
        }
        if let Some(g) = &w.group {
            let ino = std::fs::symlink_metadata(root.join(path)).unwrap().ino();
            if let Some(first) = inodes.insert(g.clone(), ino) {
                if first != ino {
                    problems.push(format!("{path}: hard link to {g} has another inode"));
                }
            }
        }
    }
    let root_row = manifest::probe(root, ".").unwrap();
    if (root_row["type"].as_str(), root_row["mode"].as_str()) != ("d", "755") {
        problems.push(format!("root: {root_row:?}"));
    }
    problems
}

fn big() -> Vec<u8> {
    pseudo_random(3 << 20, 1)
}

/// Three layers: gzip, zstd and plain tar.
fn sample_layers() -> Vec<Vec<Entry>> {
    let l1 = vec![
        Entry::Dir("etc", 0o755, 0),
        Entry::File("etc/hostname", 0o644, 0, b"base\n".to_vec(), vec![]),
        Entry::Symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
        Entry::Dir("data", 0o750, 1000),
        Entry::File("data/big", 0o600, 1000, big(), vec![]),
        Entry::Link("data/big-link", "data/big"),
        Entry::Dir("bin", 0o755, 0),
        Entry::File(
            "bin/tool",
            0o4755,
            0,
            b"#!/bin/sh\necho tool\n".to_vec(),
            vec![("user.rafsd", b"one"), ("trusted.rafsd", b"\x00\x01two")],
        ),
        Entry::Dir("opaque", 0o755, 0),
        Entry::File("opaque/old", 0o644, 0, b"old\n".to_vec(), vec![]),
        Entry::Dir("opaque/sub", 0o700, 0),
        Entry::File("opaque/sub/older", 0o644, 0, b"older\n".to_vec(), vec![]),
        Entry::File("to-delete", 0o644, 0, b"bye\n".to_vec(), vec![]),
        Entry::Dir("gone", 0o755, 0),
        Entry::File("gone/inside", 0o644, 0, b"x".to_vec(), vec![]),
        Entry::Dir("keep", 0o755, 0),
        Entry::File("keep/a", 0o644, 0, b"a\n".to_vec(), vec![]),
        Entry::File("empty", 0o640, 0, Vec::new(), vec![]),
    ];
    let l2 = vec![
        Entry::File(".wh.to-delete", 0, 0, Vec::new(), vec![]),
        Entry::File(".wh.gone", 0, 0, Vec::new(), vec![]),
        Entry::Dir("opaque", 0o711, 0),
        Entry::File("opaque/.wh..wh..opq", 0, 0, Vec::new(), vec![]),
        Entry::File("opaque/new", 0o644, 0, b"new\n".to_vec(), vec![]),
        Entry::Dir("etc", 0o755, 0),
        Entry::File("etc/hostname", 0o644, 0, b"upper\n".to_vec(), vec![]),
        Entry::Dir("data", 0o750, 1000),
        // The same bytes as the lower layer's data/big: stored once.
        Entry::File("data/copy", 0o644, 1000, big(), vec![]),
        Entry::Dir("keep", 0o755, 0),
        Entry::File("keep/b", 0o644, 0, b"b\n".to_vec(), vec![]),
    ];
    let l3 = vec![
        Entry::Dir("bin", 0o755, 0),
        Entry::File("bin/a", 0o755, 0, b"same inode\n".to_vec(), vec![]),
        Entry::Link("bin/b", "bin/a"),
        Entry::Dir("etc", 0o755, 0),
        Entry::File("etc/motd", 0o644, 0, pseudo_random(70_000, 3), vec![]),
    ];
    vec![l1, l2, l3]
}

// ---------------------------------------------------------------------------------------------------
// Pushing source images with plain requests (independent of the client under test).

struct Registry {
    svc: services::Service,
    /// `Basic ...` / `Bearer ...` for the test's own pushes.
    authorization: Option<String>,
}

impl Registry {
    /// Debian's docker-registry without authentication, its data in `dir`.
    fn open(dir: &Path) -> Self {
        Registry {
            svc: services::start_registry(dir, RegistryAuth::None),
            authorization: None,
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.svc.port)
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into()
    }

    fn push_blob(&self, repo: &str, data: &[u8]) -> Value {
        let id = services::push_blob(self.svc.port, repo, self.authorization.as_deref(), data);
        json!({"digest": format!("sha256:{id}"), "size": data.len()})
    }

    fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &Value) -> Value {
        let bytes = serde_json::to_vec(body).unwrap();
        let mut req = Self::agent()
            .put(format!(
                "http://{}/v2/{repo}/manifests/{reference}",
                self.host()
            ))
            .header("Content-Type", media_type);
        if let Some(a) = &self.authorization {
            req = req.header("Authorization", a);
        }
        let resp = req.send(&bytes[..]).unwrap();
        assert_eq!(
            resp.status().as_u16(),
            201,
            "put manifest {repo}:{reference}"
        );
        json!({"mediaType": media_type, "digest": sha256(&bytes), "size": bytes.len()})
    }

    fn get(&self, repo: &str, what: &str, accept: &str) -> (u16, Vec<u8>) {
        let mut req = Self::agent()
            .get(format!("http://{}/v2/{repo}/{what}", self.host()))
            .header("Accept", accept);
        if let Some(a) = &self.authorization {
            req = req.header("Authorization", a);
        }
        let mut resp = req.call().unwrap();
        let status = resp.status().as_u16();
        (
            status,
            resp.body_mut()
                .with_config()
                .limit(1 << 30)
                .read_to_vec()
                .unwrap(),
        )
    }

    fn manifest(&self, repo: &str, reference: &str) -> Value {
        let accept =
            "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
                      application/vnd.docker.distribution.manifest.v2+json";
        let (status, body) = self.get(repo, &format!("manifests/{reference}"), accept);
        assert_eq!(
            status,
            200,
            "{repo}:{reference}: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body).unwrap()
    }

    fn blob(&self, repo: &str, digest: &str) -> Vec<u8> {
        let (status, body) = self.get(repo, &format!("blobs/{digest}"), "*/*");
        assert_eq!(status, 200, "blob {digest}");
        assert_eq!(sha256(&body), digest);
        body
    }

    /// Requests in the access log so far matching `needle`.
    fn requests(&self, needle: &str) -> usize {
        self.svc
            .log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }
}

/// Push `layers` as one image (OCI or Docker schema 2 media types) to `repo:tag`; returns the
/// manifest's descriptor.
fn push_image(
    reg: &Registry,
    repo: &str,
    tag: &str,
    layers: &[Vec<Entry>],
    arch: &str,
    docker: bool,
) -> Value {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let tar = layer_tar(layer);
        diff_ids.push(sha256(&tar));
        let (media_type, bytes) = match (i % 3, docker) {
            (0, true) | (1, true) => (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                gzip(&tar),
            ),
            (0, false) => ("application/vnd.oci.image.layer.v1.tar+gzip", gzip(&tar)),
            (1, false) => (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                zstd::encode_all(&tar[..], 3).unwrap(),
            ),
            _ => ("application/vnd.oci.image.layer.v1.tar", tar),
        };
        let mut d = reg.push_blob(repo, &bytes);
        d["mediaType"] = media_type.into();
        descs.push(d);
    }
    let config = json!({
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/usr/bin"], "Cmd": ["/bin/tool"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "test"}]
    });
    let mut config_desc = reg.push_blob(repo, &serde_json::to_vec(&config).unwrap());
    let (mt, config_mt) = match docker {
        true => (
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.container.image.v1+json",
        ),
        false => (OCI_MANIFEST, "application/vnd.oci.image.config.v1+json"),
    };
    config_desc["mediaType"] = config_mt.into();
    let manifest =
        json!({"schemaVersion": 2, "mediaType": mt, "config": config_desc, "layers": descs});
    reg.put_manifest(repo, tag, mt, &manifest)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

// ---------------------------------------------------------------------------------------------------
// Running rafsd.

/// `rafsd ARGS` with extra environment, to its end within 120 s: (exit code, output).
fn rafsd(args: &[&str], env: &[(&str, &Path)]) -> (Option<i32>, String) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rafsd"));
    cmd.args(args)
        .env_remove("IMAGE_PULL_AUTH")
        .env("DOCKER_CONFIG", "/nonexistent")
        .stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(out.reopen().unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let status = daemon::wait_bounded(&mut child, Duration::from_secs(120));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    (
        status.and_then(|s| s.code()),
        std::fs::read_to_string(out.path()).unwrap_or_default(),
    )
}

/// `rafsd convert SOURCE TARGET` over plain HTTP with `extra` arguments and `env`: (exit code, output).
fn run_convert(
    source: &str,
    target: &str,
    extra: &[&str],
    env: &[(&str, &Path)],
) -> (Option<i32>, String) {
    let mut args = vec![
        "convert",
        "--source",
        source,
        "--target",
        target,
        "--plain-http",
    ];
    args.extend_from_slice(extra);
    rafsd(&args, env)
}

/// [`run_convert`] without the layer cache and without credentials.
fn convert_uncached(source: &str, target: &str, extra: &[&str]) -> (Option<i32>, String) {
    run_convert(source, target, &[&["--no-cache"][..], extra].concat(), &[])
}

/// A docker config.json holding credentials for `host`; returns its directory (DOCKER_CONFIG).
fn docker_config(dir: &Path, host: &str, user: &str, pass: &str) -> PathBuf {
    let d = dir.join("docker");
    std::fs::create_dir_all(&d).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let config = json!({"auths": {format!("http://{host}"): {"auth": auth}}});
    std::fs::write(d.join("config.json"), config.to_string()).unwrap();
    d
}

struct Converted {
    output: String,
}

fn convert(source: &str, target: &str, extra: &[&str], env: &[(&str, &Path)]) -> Converted {
    let (code, output) = run_convert(source, target, extra, env);
    assert_eq!(
        code,
        Some(0),
        "rafsd convert {source} -> {target}:\n{output}"
    );
    Converted { output }
}

/// A mount that is detached and its process killed on drop.
struct Mounted {
    child: Option<Child>,
    mountpoint: PathBuf,
    log: PathBuf,
}

impl Mounted {
    fn spawn(args: &[&str], env: &[(&str, &Path)], mountpoint: &Path, log: &Path) -> Mounted {
        std::fs::create_dir_all(mountpoint).unwrap();
        let mut cmd = daemon::rafsd();
        cmd.args(args)
            .env_remove("IMAGE_PULL_AUTH")
            .env("DOCKER_CONFIG", "/nonexistent");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = daemon::spawn_ready(&mut cmd, log, Duration::from_secs(60), || {
            daemon::is_mounted(mountpoint)
        })
        .unwrap_or_else(|e| panic!("rafsd {e} (mount):\n{}", daemon::read_log(log)));
        Mounted {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
            log: log.to_path_buf(),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            if daemon::wait_bounded(&mut c, Duration::from_secs(20)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if daemon::is_mounted(&self.mountpoint) {
            daemon::lazy_unmount(&self.mountpoint);
        }
    }
}

/// The bootstrap layer of a Nydus manifest: checks its layout and returns `image/image.boot`.
fn bootstrap_of(reg: &Registry, repo: &str, manifest: &Value) -> Vec<u8> {
    let layers = manifest["layers"].as_array().unwrap();
    let last = layers.last().unwrap();
    assert_eq!(
        last["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert_eq!(
        last["annotations"]["containerd.io/snapshot/nydus-bootstrap"],
        "true"
    );
    let gz = reg.blob(repo, last["digest"].as_str().unwrap());
    let mut tar_bytes = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut tar_bytes).unwrap();
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    let mut names = Vec::new();
    let mut boot = None;
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        if name == "image/image.boot" {
            assert_eq!(e.header().mode().unwrap(), 0o444);
            let mut b = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut b).unwrap();
            boot = Some(b);
        }
        names.push(name);
    }
    assert_eq!(names, ["image", "image/image.boot"]);
    let config: Value =
        serde_json::from_slice(&reg.blob(repo, manifest["config"]["digest"].as_str().unwrap()))
            .unwrap();
    // diff_ids: each data blob is its own uncompressed form; the bootstrap layer's is its tar's digest.
    let mut diff_ids: Vec<String> = layers[..layers.len() - 1]
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    diff_ids.push(sha256(&tar_bytes));
    assert_eq!(config["rootfs"]["diff_ids"], json!(diff_ids));
    boot.unwrap()
}

/// Check a Nydus manifest's data layers against its bootstrap's blob table, and return the total data
/// blob size.
fn check_nydus_manifest(
    reg: &Registry,
    repo: &str,
    manifest: &Value,
    fs_version: &str,
    dir: &Path,
) -> u64 {
    assert_eq!(manifest["mediaType"], OCI_MANIFEST);
    let layers = manifest["layers"].as_array().unwrap();
    let last = layers.last().unwrap();
    assert_eq!(
        last["annotations"]["containerd.io/snapshot/nydus-fs-version"],
        fs_version
    );
    let boot = bootstrap_of(reg, repo, manifest);
    let path = dir.join("check.boot");
    std::fs::write(&path, &boot).unwrap();
    let image =
        rafsd::RafsImage::open_local(&path, Some(dir), rafsd::ImageOptions::default()).unwrap();
    let ids: Vec<String> = image
        .info()
        .blobs
        .iter()
        .map(|b| format!("sha256:{}", b.id))
        .collect();
    let mut total = 0;
    for (l, id) in layers[..layers.len() - 1].iter().zip(&ids) {
        assert_eq!(l["mediaType"], NYDUS_BLOB);
        assert_eq!(
            l["annotations"]["containerd.io/snapshot/nydus-blob"],
            "true"
        );
        assert_eq!(
            &l["digest"],
            id.as_str(),
            "data layers in the bootstrap's blob order"
        );
        let blob = reg.blob(repo, id);
        assert_eq!(blob.len() as u64, l["size"].as_u64().unwrap());
        total += blob.len() as u64;
    }
    assert_eq!(
        layers.len() - 1,
        ids.len(),
        "one data layer per blob of the bootstrap"
    );
    total
}

/// Mount a Nydus image with `rafsd fuse` on the registry backend, from a bootstrap the test extracted.
fn mount_with_fuse(
    reg: &Registry,
    repo: &str,
    manifest: &Value,
    dir: &Path,
    auth: Option<&str>,
) -> Mounted {
    std::fs::create_dir_all(dir).unwrap();
    let boot = dir.join("image.boot");
    std::fs::write(&boot, bootstrap_of(reg, repo, manifest)).unwrap();
    let mut backend = json!({"scheme": "http", "host": reg.host(), "repo": repo, "timeout": 10});
    if let Some(a) = auth {
        backend["auth"] = a.into();
    }
    let config = json!({
        "device": {"backend": {"type": "registry", "config": backend},
                   "cache": {"type": "blobcache", "config": {"work_dir": dir.join("cache")}}},
        "mode": "direct", "digest_validate": true
    });
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, config.to_string()).unwrap();
    Mounted::spawn(
        &[
            "fuse",
            "--config",
            cfg.to_str().unwrap(),
            "--bootstrap",
            boot.to_str().unwrap(),
            "--mountpoint",
            dir.join("mnt").to_str().unwrap(),
        ],
        &[],
        &dir.join("mnt"),
        &dir.join("fuse.log"),
    )
}

fn assert_tree(m: &Mounted, want: &BTreeMap<String, Want>, what: &str) {
    let problems = compare(&m.mountpoint, want);
    assert!(
        problems.is_empty(),
        "{what}: {} mismatches: {:#?}\nlog:\n{}",
        problems.len(),
        &problems[..problems.len().min(20)],
        m.log_text()
    );
}

// ---------------------------------------------------------------------------------------------------

/// A three-layer OCI image (gzip, zstd, plain tar) behind htpasswd auth, converted with the credentials
/// of a docker config.json; the Nydus image is laid out as nydus-snapshotter reads it and mounts (through
/// `rafsd fuse` on the registry backend, and through `rafsd mount-image`) as the flattened tree. Converting
/// it again pulls no source layer and pushes no blob; without the cache it pulls the layers again and
/// still pushes no blob (the build is reproducible).
#[test]
#[ignore = "needs root, servers: ci/test.sh"]
fn a_multi_layer_image_converts_and_mounts_as_its_flattened_tree() {
    manifest::assert_root("convert and mount");
    need(&["docker-registry", "htpasswd"]);
    let dir = tmp();
    let svc = services::start_registry(dir.path(), RegistryAuth::Htpasswd("alice", "pa55word"));
    let basic = services::basic_auth("alice", "pa55word");
    let reg = Registry {
        svc,
        authorization: Some(format!("Basic {basic}")),
    };
    let layers = sample_layers();
    push_image(&reg, "src/app", "v1", &layers, "amd64", false);
    let want = flatten(&layers);

    let host = reg.host();
    let creds = docker_config(dir.path(), &host, "alice", "pa55word");
    let cache = dir.path().join("cache");
    let (source, target) = (format!("{host}/src/app:v1"), format!("{host}/nydus/app:v1"));
    let cache_args = ["--cache-dir", cache.to_str().unwrap()];
    let env = [("DOCKER_CONFIG", creds.as_path())];

    // Without credentials: refused, with a message naming the cause.
    let (code, out) = convert_uncached(&source, &target, &[]);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("credentials"), "{out}");

    let first = convert(&source, &target, &cache_args, &env);
    assert!(
        first.output.contains("3 layers built, 0 from the cache"),
        "{}",
        first.output
    );
    let manifest = reg.manifest("nydus/app", "v1");
    let data_bytes = check_nydus_manifest(&reg, "nydus/app", &manifest, "6", dir.path());
    // data/copy repeats data/big of the layer below: its chunks are stored once.
    assert!(
        data_bytes < 4 << 20,
        "{data_bytes} bytes of data blobs: no dedup across layers?"
    );
    let src_digests: BTreeSet<String> = reg.manifest("src/app", "v1")["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    for l in manifest["layers"].as_array().unwrap().iter().rev().skip(1) {
        let src = l["annotations"]["containerd.io/snapshot/nydus-source-digest"]
            .as_str()
            .unwrap();
        assert!(src_digests.contains(src), "{src}");
    }

    {
        let m = mount_with_fuse(
            &reg,
            "nydus/app",
            &manifest,
            &dir.path().join("fuse"),
            Some(&basic),
        );
        assert_tree(&m, &want, "rafsd fuse");
    }
    {
        let mnt = dir.path().join("mount-image/mnt");
        let work = dir.path().join("mount-image/work");
        let m = Mounted::spawn(
            &[
                "mount-image",
                &target,
                mnt.to_str().unwrap(),
                "--plain-http",
                "--work-dir",
                work.to_str().unwrap(),
            ],
            &env,
            &mnt,
            &dir.path().join("mount-image.log"),
        );
        assert_tree(&m, &want, "rafsd mount-image");
    }

    // Again: nothing pulled, nothing uploaded.
    let uploads = || reg.requests("\"POST /v2/nydus/app/blobs/uploads/");
    let layer_gets = || reg.requests("\"GET /v2/src/app/blobs/sha256:");
    let (u, g) = (uploads(), layer_gets());
    let second = convert(&source, &target, &cache_args, &env);
    assert!(
        second.output.contains("0 layers built, 3 from the cache"),
        "{}",
        second.output
    );
    assert_eq!(
        uploads(),
        u,
        "a second conversion uploaded blobs:\n{}",
        second.output
    );
    // Only the config is read again.
    assert_eq!(layer_gets(), g + 1, "{}", second.output);
    assert_eq!(reg.manifest("nydus/app", "v1"), manifest);

    // Without the cache: the layers are pulled and built again, into the same blobs.
    let third = convert(&source, &target, &["--no-cache"], &env);
    assert!(third.output.contains("3 layers built"), "{}", third.output);
    assert!(third.output.contains("pushed 0 blobs"), "{}", third.output);
    assert_eq!(uploads(), u);
    assert_eq!(
        reg.manifest("nydus/app", "v1"),
        manifest,
        "the conversion is reproducible"
    );
}

fn arch_layers(arch: &'static str) -> Vec<Vec<Entry>> {
    vec![
        vec![
            Entry::Dir("etc", 0o755, 0),
            Entry::File("etc/arch", 0o644, 0, arch.as_bytes().to_vec(), vec![]),
            Entry::File("etc/common", 0o644, 0, pseudo_random(200_000, 9), vec![]),
        ],
        vec![
            Entry::Dir("usr", 0o755, 0),
            Entry::File(
                "usr/only-on",
                0o755,
                0,
                format!("#!{arch}\n").into_bytes(),
                vec![],
            ),
        ],
    ]
}

/// A Docker manifest list with linux/amd64 and linux/arm64/v8 images: `--platform` picks one (Docker
/// schema 2 source, converted to one OCI manifest); `--merge-platform` pushes an index holding both
/// source manifests (mounted into the target repository) and both Nydus manifests (marked with the
/// `nydus.remoteimage.v1` os.feature), and `mount-image --platform` picks the Nydus one.
#[test]
#[ignore = "needs root, servers: ci/test.sh"]
fn an_index_of_two_platforms_converts_one_or_merges_both() {
    manifest::assert_root("convert and mount");
    need(&["docker-registry"]);
    let dir = tmp();
    let reg = Registry::open(dir.path());
    let mut amd = push_image(
        &reg,
        "src/multi",
        "amd64",
        &arch_layers("amd64"),
        "amd64",
        true,
    );
    let mut arm = push_image(
        &reg,
        "src/multi",
        "arm64",
        &arch_layers("arm64"),
        "arm64",
        true,
    );
    amd["platform"] = json!({"architecture": "amd64", "os": "linux"});
    arm["platform"] = json!({"architecture": "arm64", "os": "linux", "variant": "v8"});
    let list_type = "application/vnd.docker.distribution.manifest.list.v2+json";
    reg.put_manifest(
        "src/multi",
        "v1",
        list_type,
        &json!({"schemaVersion": 2, "mediaType": list_type, "manifests": [amd, arm]}),
    );
    let host = reg.host();
    let source = format!("{host}/src/multi:v1");
    let no_cache = ["--no-cache"];

    // One platform: a plain manifest.
    let target = format!("{host}/nydus/multi:arm");
    convert(
        &source,
        &target,
        &["--no-cache", "--platform", "linux/arm64"],
        &[],
    );
    let manifest = reg.manifest("nydus/multi", "arm");
    check_nydus_manifest(&reg, "nydus/multi", &manifest, "6", dir.path());
    let config: Value = serde_json::from_slice(&reg.blob(
        "nydus/multi",
        manifest["config"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    assert_eq!(config["architecture"], "arm64");
    {
        let m = mount_with_fuse(
            &reg,
            "nydus/multi",
            &manifest,
            &dir.path().join("arm"),
            None,
        );
        assert_tree(&m, &flatten(&arch_layers("arm64")), "linux/arm64");
    }

    // A platform the index does not have.
    let (code, out) = convert_uncached(&source, &target, &["--platform", "linux/s390x"]);
    assert_ne!(code, Some(0));
    assert!(
        out.contains("linux/s390x") && out.contains("linux/arm64/v8"),
        "{out}"
    );

    // Both, merged with the source manifests.
    let target = format!("{host}/nydus/multi:all");
    let mut args = vec!["--platform", "linux/amd64,linux/arm64", "--merge-platform"];
    args.extend_from_slice(&no_cache);
    convert(&source, &target, &args, &[]);
    let index = reg.manifest("nydus/multi", "all");
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 4, "{index:#}");
    for (src, arch) in [(&amd, "amd64"), (&arm, "arm64")] {
        let original = entries
            .iter()
            .find(|e| e["digest"] == src["digest"])
            .unwrap_or_else(|| panic!("no source {arch} manifest in {index:#}"));
        assert_eq!(original["platform"]["architecture"], arch);
        // The source manifest and its blobs are in the target repository.
        let (status, _) = reg.get(
            "nydus/multi",
            &format!("manifests/{}", src["digest"].as_str().unwrap()),
            "*/*",
        );
        assert_eq!(
            status, 200,
            "source {arch} manifest in the target repository"
        );
        let nydus = entries
            .iter()
            .find(|e| {
                e["platform"]["architecture"] == arch
                    && e["platform"]["os.features"] == json!(["nydus.remoteimage.v1"])
            })
            .unwrap_or_else(|| panic!("no Nydus {arch} manifest in {index:#}"));
        assert_eq!(nydus["mediaType"], OCI_MANIFEST);
        let m = reg.manifest("nydus/multi", nydus["digest"].as_str().unwrap());
        check_nydus_manifest(&reg, "nydus/multi", &m, "6", dir.path());
    }
    let source_layers = reg.manifest("src/multi", "amd64")["layers"].clone();
    for l in source_layers.as_array().unwrap() {
        reg.blob("nydus/multi", l["digest"].as_str().unwrap());
    }
    assert!(
        reg.requests("\"POST /v2/nydus/multi/blobs/uploads/?mount=") > 0,
        "the source blobs were mounted from src/multi"
    );
    let mnt = dir.path().join("mount-image/mnt");
    let m = Mounted::spawn(
        &[
            "mount-image",
            &target,
            "--mountpoint",
            mnt.to_str().unwrap(),
            "--plain-http",
            "--platform",
            "linux/amd64",
            "--work-dir",
            dir.path().join("mount-image/work").to_str().unwrap(),
        ],
        &[],
        &mnt,
        &dir.path().join("mount-image.log"),
    );
    assert_tree(
        &m,
        &flatten(&arch_layers("amd64")),
        "mount-image linux/amd64",
    );
}

/// docker-registry in token mode (tests/kit/src/token_issuer.py): the source is pulled with a pull
/// token, the target pushed with a token of the wider scope the push's challenge asks for; a RAFS v5
/// image, mounted with `rafsd fuse` on the registry backend with the same credentials.
#[test]
#[ignore = "needs root, servers: ci/test.sh"]
fn a_token_registry_converts_with_pull_and_push_tokens() {
    manifest::assert_root("convert and mount");
    need(&["docker-registry", "python3"]);
    let dir = tmp();
    let (issuer, cert) = services::start_token_issuer(dir.path(), "bob", "t0ken-pass", 60);
    let svc = services::start_registry(
        dir.path(),
        RegistryAuth::Token {
            realm: format!("http://127.0.0.1:{}/token", issuer.port),
            cert,
        },
    );
    let basic = services::basic_auth("bob", "t0ken-pass");
    let token = services::issue_token(issuer.port, &basic, "src/tok");
    let reg = Registry {
        svc,
        authorization: Some(format!("Bearer {token}")),
    };
    let layers = sample_layers();
    push_image(&reg, "src/tok", "v1", &layers, "amd64", false);
    let host = reg.host();
    let creds = docker_config(dir.path(), &host, "bob", "t0ken-pass");
    let env = [("DOCKER_CONFIG", creds.as_path())];
    let (source, target) = (format!("{host}/src/tok:v1"), format!("{host}/nydus/tok:v5"));
    let out = convert(&source, &target, &["--no-cache", "--fs-version", "5"], &env);
    assert!(out.output.contains("3 layers built"), "{}", out.output);
    let tokens = std::fs::read_to_string(dir.path().join("tokens.log")).unwrap();
    // The converter asked the realm for tokens for both repositories (the issuer grants push with any
    // scope, so the target's first token already allows the upload) and was never refused.
    assert!(
        tokens.contains("granted scope=['repository:src/tok:pull']"),
        "{tokens}"
    );
    assert!(
        tokens.contains("granted scope=['repository:nydus/tok:pull"),
        "{tokens}"
    );
    assert!(!tokens.contains("refused"), "{tokens}");

    let reg = Registry {
        authorization: Some(format!(
            "Bearer {}",
            services::issue_token(issuer.port, &basic, "nydus/tok")
        )),
        ..reg
    };
    let manifest = reg.manifest("nydus/tok", "v5");
    check_nydus_manifest(&reg, "nydus/tok", &manifest, "5", dir.path());
    let m = mount_with_fuse(
        &reg,
        "nydus/tok",
        &manifest,
        &dir.path().join("fuse"),
        Some(&basic),
    );
    assert_tree(&m, &flatten(&layers), "RAFS v5 through a token registry");
}

/// Push `layers` (bytes and media type) with an empty config as `repo:v1`; their digests.
fn push_layers(reg: &Registry, repo: &str, layers: &[(&Vec<u8>, &str)]) -> Vec<String> {
    let mut descs = Vec::new();
    for &(bytes, mt) in layers {
        let mut d = reg.push_blob(repo, bytes);
        d["mediaType"] = mt.into();
        descs.push(d);
    }
    let config = json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}});
    let mut config_desc = reg.push_blob(repo, &serde_json::to_vec(&config).unwrap());
    config_desc["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let digests = descs
        .iter()
        .map(|d| d["digest"].as_str().unwrap().to_string())
        .collect();
    reg.put_manifest(
        repo,
        "v1",
        OCI_MANIFEST,
        &json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc, "layers": descs}),
    );
    digests
}

/// Nothing reached `repo`: no upload, no `v1` manifest.
fn assert_nothing_pushed(reg: &Registry, repo: &str) {
    assert_eq!(
        reg.requests(&format!("/v2/{repo}/blobs/uploads/")),
        0,
        "something was pushed to {repo}"
    );
    let (status, _) = reg.get(repo, "manifests/v1", OCI_MANIFEST);
    assert_eq!(status, 404);
}

/// A layer that is not a tar (after a good one) fails the conversion with an error naming the layer, and
/// nothing reaches the target: no upload, no manifest.
#[test]
#[ignore = "needs servers: ci/test.sh"]
fn a_layer_that_is_not_a_tar_fails_and_pushes_nothing() {
    need(&["docker-registry"]);
    let dir = tmp();
    let reg = Registry::open(dir.path());
    let good = gzip(&layer_tar(&sample_layers()[0]));
    let garbage = pseudo_random(100_000, 5);
    let digests = push_layers(
        &reg,
        "src/bad",
        &[
            (&good, "application/vnd.oci.image.layer.v1.tar+gzip"),
            (&garbage, "application/vnd.oci.image.layer.v1.tar"),
        ],
    );
    let bad_digest = &digests[1];
    let host = reg.host();
    let start = Instant::now();
    let (code, out) = convert_uncached(
        &format!("{host}/src/bad:v1"),
        &format!("{host}/nydus/bad:v1"),
        &[],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(start.elapsed() < Duration::from_secs(60));
    assert!(
        out.contains(bad_digest.as_str()) && out.contains("tar"),
        "{out}"
    );
    assert!(out.contains("layer 2/2"), "{out}");
    assert_nothing_pushed(&reg, "nydus/bad");
}

/// A zstd layer decoding to far more than 1000 times its size (a tar of one file of zeros) is refused
/// with `--max-layer-ratio 1000`, naming the layer; `--max-layer-size` refuses a genuine layer past it.
/// Nothing is pushed either time. Without either, the same image converts: genuine layers of zeros
/// reach such ratios (a review found the ratio, first on by default, refusing them).
#[test]
#[ignore = "needs servers: ci/test.sh"]
fn a_layer_decoding_past_its_limit_fails_and_pushes_nothing() {
    need(&["docker-registry"]);
    let dir = tmp();
    let reg = Registry::open(dir.path());
    let good = gzip(&layer_tar(&sample_layers()[0]));
    // 192 MiB of zeros, streamed into zstd: a few KiB, whose cap is 1000 times that plus 64 MiB.
    let zeros: u64 = 192 << 20;
    let bomb = {
        let mut z = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_path("zeros").unwrap();
        h.set_mode(0o644);
        h.set_size(zeros);
        h.set_cksum();
        z.write_all(h.as_bytes()).unwrap();
        let block = vec![0u8; 1 << 20];
        for _ in 0..zeros >> 20 {
            z.write_all(&block).unwrap();
        }
        z.write_all(&[0; 1024]).unwrap();
        z.finish().unwrap()
    };
    assert!((bomb.len() as u64) * 1000 + (64 << 20) < zeros);
    let digests = push_layers(
        &reg,
        "src/bomb",
        &[
            (&good, "application/vnd.oci.image.layer.v1.tar+gzip"),
            (&bomb, "application/vnd.oci.image.layer.v1.tar+zstd"),
        ],
    );
    let host = reg.host();
    let (source, target) = (
        format!("{host}/src/bomb:v1"),
        format!("{host}/nydus/bomb:v1"),
    );
    for (extra, layer, digest) in [
        (&["--max-layer-ratio", "1000"][..], "layer 2/2", &digests[1]),
        (&["--max-layer-size", "4K"][..], "layer 1/2", &digests[0]),
    ] {
        let start = Instant::now();
        let (code, out) = convert_uncached(&source, &target, extra);
        assert_eq!(code, Some(1), "{extra:?}: {out}");
        assert!(start.elapsed() < Duration::from_secs(60));
        assert!(
            out.contains(digest.as_str()) && out.contains(layer) && out.contains("decodes to more"),
            "{extra:?}: {out}"
        );
        assert_nothing_pushed(&reg, "nydus/bomb");
    }
    // By default the layer of zeros is a layer like any other.
    let (code, out) = convert_uncached(&source, &target, &[]);
    assert_eq!(code, Some(0), "{out}");
    let (status, _) = reg.get("nydus/bomb", "manifests/v1", OCI_MANIFEST);
    assert_eq!(status, 200);
}

/// What the hostile proxy does to GETs of one blob.
#[derive(Clone, Copy, PartialEq)]
enum Harm {
    /// Cut the first answer in the middle of the body (later ones pass).
    CutOnce,
    /// Flip one byte of every answer.
    Corrupt,
}

/// A loopback proxy in front of the registry that harms the GETs of `digest`: one request per
/// connection, answered and closed. Returns its port and the number of harmed answers so far.
fn hostile_proxy(
    upstream: u16,
    digest: String,
    harm: Harm,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::io::{BufRead, BufReader, Read};
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let harmed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = harmed.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let (digest, count) = (digest.clone(), count.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(client.try_clone().unwrap());
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if !line.to_ascii_lowercase().starts_with("connection:") {
                        head.push(line);
                    }
                }
                let target = head[0].starts_with("GET ") && head[0].contains(&digest);
                let mut up = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                let request = head.concat() + "Connection: close\r\n\r\n";
                up.write_all(request.as_bytes()).unwrap();
                let mut answer = Vec::new();
                up.read_to_end(&mut answer).unwrap();
                let body_at = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                if target && answer.len() > body_at + 1000 {
                    match harm {
                        Harm::CutOnce if count.load(std::sync::atomic::Ordering::SeqCst) == 0 => {
                            let cut = body_at + (answer.len() - body_at) / 2;
                            answer.truncate(cut);
                            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Harm::Corrupt => {
                            answer[body_at + 500] ^= 0x40;
                            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        _ => {}
                    }
                }
                let _ = client.write_all(&answer);
            });
        }
    });
    (port, harmed)
}

/// A source registry whose answer for a layer breaks off half-way: the stream resumes with a Range
/// request where it stopped and the image is right. One that sends wrong bytes: the layer's digest
/// does not match, the conversion fails naming it, and nothing is pushed.
#[test]
#[ignore = "needs root, servers: ci/test.sh"]
fn a_broken_layer_stream_is_resumed_and_wrong_bytes_are_refused() {
    manifest::assert_root("convert and mount");
    need(&["docker-registry"]);
    let dir = tmp();
    let reg = Registry::open(dir.path());
    let layers = sample_layers();
    push_image(&reg, "src/app", "v1", &layers, "amd64", false);
    let big_layer = reg.manifest("src/app", "v1")["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let host = reg.host();

    let (port, harmed) = hostile_proxy(reg.svc.port, big_layer.clone(), Harm::CutOnce);
    let source = format!("127.0.0.1:{port}/src/app:v1");
    let out = convert(
        &source,
        &format!("{host}/nydus/cut:v1"),
        &["--no-cache"],
        &[],
    );
    assert_eq!(harmed.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(out.output.contains("resuming at byte"), "{}", out.output);
    assert!(reg.requests("\"GET /v2/src/app/blobs/") > 0);
    let manifest = reg.manifest("nydus/cut", "v1");
    let m = mount_with_fuse(&reg, "nydus/cut", &manifest, &dir.path().join("cut"), None);
    assert_tree(&m, &flatten(&layers), "after a resumed layer");
    drop(m);

    let (port, harmed) = hostile_proxy(reg.svc.port, big_layer.clone(), Harm::Corrupt);
    let (code, out) = convert_uncached(
        &format!("127.0.0.1:{port}/src/app:v1"),
        &format!("{host}/nydus/corrupt:v1"),
        &[],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(harmed.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert!(
        out.contains(&big_layer) && out.contains("arrived with digest"),
        "{out}"
    );
    assert_eq!(
        reg.requests("/v2/nydus/corrupt/blobs/uploads/"),
        0,
        "something was pushed"
    );
}

/// `rafsd convert`'s registry client follows a source registry's redirects to blob storage, but not to a
/// link-local, unspecified or metadata address (a final error, no connection tried): before, a redirect to
/// `0:<port>` (0.0.0.0, this host) was followed and the blob read from there.
#[test]
fn a_source_registry_cannot_send_the_pull_to_a_metadata_address() {
    use rafsd::storage::distribution::{Client, NetOptions, Reference};
    let server = services::FakeServer::start(services::FakeOptions::plain("src/app"));
    let data = pseudo_random(100_000, 41);
    let id = server.add_blob(data.clone());
    let source = Reference::parse(&format!("127.0.0.1:{}/src/app:v1", server.port)).unwrap();
    let net = NetOptions {
        plain_http: true,
        timeout: Duration::from_secs(2),
        retry_limit: 2,
        ..Default::default()
    };
    let client = Client::with_credentials(&source, &net, None).unwrap();
    let digest = format!("sha256:{id}");
    let size = data.len() as u64;
    assert!(client.fetch_blob(&digest, size, size).unwrap() == data);
    for target in [
        format!("http://0:{}/storage/{id}", server.port),
        "http://169.254.169.254/latest/meta-data/".to_string(),
    ] {
        server.set_redirect(Some(target.clone()));
        let start = Instant::now();
        let err = client
            .fetch_blob(&digest, size, size)
            .map(|got| got == data)
            .expect_err(&target)
            .to_string();
        assert!(err.contains("may not send us to"), "{target}: {err}");
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{target}: retried"
        );
    }
    assert_eq!(
        server
            .counters
            .storage_requests
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// How [`upload_registry`] answers a blob upload once it has read the body.
#[derive(Clone, Copy)]
enum UploadAnswer {
    /// Not at all (the connection stays open).
    Never,
    /// A head, one byte per this long, without end.
    Trickled(Duration),
    /// 201, after this long.
    After(Duration),
}

/// A registry for pushes only: HEADs of blobs are 404, a POST opens an upload session, a PUT's body is
/// read to its end and answered as `answer` says. Returns its port and the number of upload bodies
/// it took in full.
fn upload_registry(
    repo: &'static str,
    answer: UploadAnswer,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::io::{BufRead, BufReader, Read};
    use std::net::TcpListener;
    use std::sync::atomic::Ordering::SeqCst;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let uploads = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = uploads.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let count = count.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                loop {
                    let mut head = Vec::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push(line.to_ascii_lowercase());
                    }
                    let value = |name: &str| {
                        head.iter()
                            .find_map(|h| h.strip_prefix(&format!("{name}:")))
                            .map(|v| v.trim().to_string())
                    };
                    if value("expect").as_deref() == Some("100-continue") {
                        conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
                    }
                    let answer = match head[0].split(' ').next().unwrap() {
                        "head" => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string(),
                        "post" => format!(
                            "HTTP/1.1 202 Accepted\r\nLocation: /v2/{repo}/blobs/uploads/u1\r\n\
                             Content-Length: 0\r\n\r\n"
                        ),
                        "put" => {
                            // The whole body, plain or chunked.
                            if let Some(n) = value("content-length") {
                                let n: u64 = n.parse().unwrap();
                                std::io::copy(&mut (&mut reader).take(n), &mut std::io::sink())
                                    .unwrap();
                            } else {
                                loop {
                                    let mut size = String::new();
                                    reader.read_line(&mut size).unwrap();
                                    let n = u64::from_str_radix(size.trim(), 16).unwrap();
                                    std::io::copy(
                                        &mut (&mut reader).take(n + 2),
                                        &mut std::io::sink(),
                                    )
                                    .unwrap();
                                    if n == 0 {
                                        break;
                                    }
                                }
                            }
                            count.fetch_add(1, SeqCst);
                            match answer {
                                UploadAnswer::Never => {
                                    // Until the client leaves.
                                    let _ = reader.read(&mut [0u8; 1]);
                                    return;
                                }
                                UploadAnswer::Trickled(each) => {
                                    let mut bytes = b"HTTP/1.1 201 Created\r\nX-Wait: "
                                        .iter()
                                        .copied()
                                        .chain(std::iter::repeat(b'a'));
                                    while conn.write_all(&[bytes.next().unwrap()]).is_ok() {
                                        std::thread::sleep(each);
                                    }
                                    return;
                                }
                                UploadAnswer::After(wait) => {
                                    std::thread::sleep(wait);
                                    "HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n".into()
                                }
                            }
                        }
                        _ => "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n".into(),
                    };
                    conn.write_all(answer.as_bytes()).unwrap();
                }
            });
        }
    });
    (port, uploads)
}

/// Push a 1 MiB blob to a registry that answers uploads as `answer` says, with a timeout of 1 s and
/// one retry: (the result, how long it took, the upload bodies the registry took). The push runs on
/// its own thread so a push that never ends fails the test after 60 s instead of hanging it.
fn push_to(answer: UploadAnswer) -> (Result<bool, String>, Duration, u64) {
    use rafsd::storage::distribution::{Client, NetOptions, Payload, Reference};
    let (port, uploads) = upload_registry("nydus/app", answer);
    let target = Reference::parse(&format!("127.0.0.1:{port}/nydus/app:v1")).unwrap();
    let net = NetOptions {
        plain_http: true,
        timeout: Duration::from_secs(1),
        retry_limit: 1,
        ..Default::default()
    };
    let blob = pseudo_random(1 << 20, 7);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &blob).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let path = file.path().to_path_buf();
    let start = Instant::now();
    std::thread::spawn(move || {
        let client = Client::with_credentials(&target, &net, None).unwrap();
        let pushed = client.push_blob(&sha256(&blob), blob.len() as u64, Payload::File(&path));
        let _ = tx.send(pushed.map_err(|e| e.to_string()));
    });
    let result = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the push still waits for the registry's answer after 60 s");
    let took = start.elapsed();
    (
        result,
        took,
        uploads.load(std::sync::atomic::Ordering::SeqCst),
    )
}

/// A target registry that takes a blob's upload and then answers with a head that never ends, a byte
/// at a time within the timeout: the push fails within its deadline (the timeout again per GiB begun,
/// so 2 s here, twice), saying the registry gave no answer. Before, each byte restarted the per-read
/// timeout and the push waited for hours (ureq's 64 KiB head limit), and a registry silent after the
/// upload failed with a bare "timeout: per read".
#[test]
fn a_push_the_registry_never_answers_fails_in_bounded_time() {
    for answer in [
        UploadAnswer::Trickled(Duration::from_millis(300)),
        UploadAnswer::Never,
    ] {
        let (result, took, uploads) = push_to(answer);
        let err = result.expect_err("the push succeeded");
        assert!(
            err.contains("the registry took the upload but gave no answer within 2s"),
            "{err}"
        );
        assert!(
            took >= Duration::from_secs(4) && took < Duration::from_secs(15),
            "{took:?}: {err}"
        );
        assert_eq!(uploads, 2, "{err}");
    }
}

/// A registry may take longer than the timeout to answer an upload (checking or copying the blob): within
/// the answer's deadline the push succeeds. Before, the per-read timeout (1 s) failed it.
#[test]
fn a_push_answered_after_the_timeout_but_within_its_deadline_succeeds() {
    let (result, _, uploads) = push_to(UploadAnswer::After(Duration::from_millis(1500)));
    assert_eq!(result, Ok(true));
    assert_eq!(uploads, 1);
}

/// `rafsd convert` to a target registry that takes each upload and answers with a head that never
/// ends: the conversion fails within a bound with the error saying so, instead of waiting for hours.
#[test]
#[ignore = "needs servers: ci/test.sh"]
fn a_convert_whose_target_never_answers_an_upload_fails_in_bounded_time() {
    need(&["docker-registry"]);
    let dir = tmp();
    let reg = Registry::open(dir.path());
    push_image(&reg, "src/app", "v1", &sample_layers(), "amd64", false);
    let (port, uploads) = upload_registry(
        "nydus/app",
        UploadAnswer::Trickled(Duration::from_millis(300)),
    );
    let start = Instant::now();
    let (code, out) = convert_uncached(
        &format!("{}/src/app:v1", reg.host()),
        &format!("127.0.0.1:{port}/nydus/app:v1"),
        &["--timeout", "1", "--retry-limit", "1"],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(start.elapsed() < Duration::from_secs(60), "{out}");
    assert!(
        out.contains("the registry took the upload but gave no answer within 2s"),
        "{out}"
    );
    assert_eq!(uploads.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// A source registry that answers a blob GET with a head trickled in a byte at a time within the
/// timeout (60 KB of header lines: hours): the pull fails after the head's deadline (the timeout), each
/// attempt, instead of waiting for the whole head.
#[test]
fn a_pull_whose_answer_head_trickles_fails_in_bounded_time() {
    use rafsd::storage::distribution::{Client, NetOptions, Reference};
    let server = services::FakeServer::start(services::FakeOptions::plain("src/app"));
    let data = pseudo_random(100_000, 43);
    let id = server.add_blob(data.clone());
    server.set_always(Some(services::Fault::TrickleHead(Duration::from_millis(
        300,
    ))));
    let source = Reference::parse(&format!("127.0.0.1:{}/src/app:v1", server.port)).unwrap();
    let net = NetOptions {
        plain_http: true,
        timeout: Duration::from_secs(1),
        retry_limit: 1,
        ..Default::default()
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let client = Client::with_credentials(&source, &net, None).unwrap();
        let size = data.len() as u64;
        let got = client.fetch_blob(&format!("sha256:{id}"), size, size);
        let _ = tx.send(got.map(|_| ()).map_err(|e| e.to_string()));
    });
    let result = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the pull still waits for the answer's head after 60 s");
    let err = result.expect_err("the pull succeeded");
    assert!(err.contains("no whole answer head within 1s"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(15), "{err}");
}
