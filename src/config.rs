//! Daemon configuration in nydusd's formats: the legacy v1 JSON (`device`, `mode`, `digest_validate`,
//! `fs_prefetch`, ...) and the v2 JSON (`version: 2`, `backend`, `cache`, `rafs`), read into typed serde
//! structs and turned into one [`DaemonConfig`]. Key names and shapes follow nydusd's.
//!
//! - Every default is declared once, in the `Default` impl of the struct its key belongs to.
//! - A known key with a wrong type or value is an error naming its full path
//!   (`device.backend.config.timeout`), tracked by `serde_path_to_error`.
//! - Unknown keys are logged as warnings by full path (`device.backend.config.timout`), tracked by
//!   `serde_ignored`: configs written for newer or older nydusd still load. Names only, never values:
//!   values may hold credentials.
//! - Keys nydusd knows that this daemon accepts but does not act on are listed once, in [`NO_EFFECT`],
//!   and warned about when their value asks for something.
//! - JSON `null` is the same as an absent key (Go clients write nil fields as `null`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Configs larger than this are refused (nydusd's limit too).
const MAX_CONFIG_SIZE: usize = 1 << 20;
/// Largest I/O amplification and prefetch request nydusd accepts (256 MiB).
const MAX_IO_SIZE: u64 = 0x1000_0000;
/// Default I/O amplification and prefetch request size.
const DEFAULT_IO_SIZE: u64 = 1 << 20;

/// Keys nydusd knows that are accepted here but change nothing: (full path, the value that asks for
/// nothing or `None` when any value is worth a warning, why). Configs carrying them still load; a value
/// that asks for something is warned about, so nothing looks supported that is not.
pub const NO_EFFECT: &[(&str, Option<&str>, &str)] = &[
    ("mode", Some("\"direct\""), MODE),
    ("rafs.mode", Some("\"direct\""), MODE),
    ("device.cache.compressed", Some("false"), COMPRESSED),
    ("cache.compressed", Some("false"), COMPRESSED),
    (
        "device.cache.config.disable_indexed_map",
        Some("false"),
        INDEXED_MAP,
    ),
    (
        "cache.filecache.disable_indexed_map",
        Some("false"),
        INDEXED_MAP,
    ),
    ("device.backend.config.readahead", Some("false"), READAHEAD),
    ("device.backend.config.readahead_sec", None, READAHEAD),
    ("backend.localfs.readahead", Some("false"), READAHEAD),
    ("backend.localfs.readahead_sec", None, READAHEAD),
    ("fs_prefetch.stream_prefetch", Some("false"), STREAM),
    ("cache.prefetch.stream_prefetch", Some("false"), STREAM),
    ("rafs.prefetch.stream_prefetch", Some("false"), STREAM),
    ("device.external_backends", None, EXTERNAL),
    ("external_backends", None, EXTERNAL),
    ("overlay", None, "writable overlays are not implemented"),
    (
        "metadata_path",
        None,
        "the bootstrap comes from the mount request",
    ),
    (
        "cache.fscache",
        None,
        "fscache is served by the in-guest helper",
    ),
];
const MODE: &str =
    "inodes are always read from the mapped bootstrap (\"cached\" is \"direct\" here)";
const COMPRESSED: &str = "the blob cache always keeps chunks uncompressed";
const INDEXED_MAP: &str = "the blob cache always keeps one ready bit per chunk";
const READAHEAD: &str = "no access log is recorded to build a prefetch list";
const STREAM: &str = "prefetch always reads merged ranges";
const EXTERNAL: &str = "external blob backends are not implemented";

// ---------------------------------------------------------------------------------------------------
// What the daemon uses.

#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    pub id: Option<String>,
    pub backend: BackendConfig,
    pub cache: CacheConfig,
    pub rafs: RafsConfig,
}

// One per mount, built once: a box would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum BackendConfig {
    LocalFs(LocalFsConfig),
    /// A network backend: where its blobs are, and how to reach them over HTTP.
    Network {
        remote: RemoteConfig,
        http: HttpConfig,
    },
    /// `localdisk` (blobs on a block device): parsed so its device path is confined; not served by this
    /// build.
    LocalDisk(LocalDiskConfig),
}

/// The network backends (`registry`, `s3`, `oss`, `http-proxy`).
#[derive(Debug, Clone, PartialEq)]
pub enum RemoteConfig {
    Registry(RegistryConfig),
    S3(ObjectStoreConfig),
    Oss(ObjectStoreConfig),
    HttpProxy(HttpProxyConfig),
}

/// What a host path named by a backend is, for the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPath {
    /// A directory of blobs (read-only).
    BlobDir,
    /// One blob file (its directory is exposed read-only).
    BlobFile,
    /// A file a network or disk backend reads at run time (CA certificates, a block device).
    BackendFile,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LocalFsConfig {
    pub dir: Option<PathBuf>,
    pub alt_dirs: Vec<PathBuf>,
    pub blob_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LocalDiskConfig {
    pub device_path: Option<PathBuf>,
}

/// `registry`: blobs of an OCI distribution repository.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct RegistryConfig {
    /// `http` or (anything else, the default) `https`.
    pub scheme: Option<String>,
    pub host: String,
    pub repo: String,
    /// base64 `user:pass` (`IMAGE_PULL_AUTH` overrides it).
    pub auth: Option<String>,
    /// A bearer token to start with.
    pub registry_token: Option<String>,
    pub blob_url_scheme: Option<String>,
    pub blob_redirected_host: Option<String>,
}

/// `s3` and `oss`: blobs as objects `<object_prefix><blob id>` of a bucket.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ObjectStoreConfig {
    /// `https` when absent.
    pub scheme: Option<String>,
    /// Required for OSS; S3 uses `s3.amazonaws.com` when absent or empty.
    pub endpoint: Option<String>,
    /// Required for S3.
    pub region: Option<String>,
    pub bucket_name: String,
    pub object_prefix: Option<String>,
    pub access_key_id: Option<String>,
    pub access_key_secret: Option<String>,
}

/// `http-proxy`: blobs at `<addr><path>/<blob id>` of a plain HTTP(S) server.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct HttpProxyConfig {
    pub addr: String,
    pub path: Option<String>,
}

/// The keys every network backend shares (nydusd's names and defaults; seconds as integers, 0 = none).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct HttpConfig {
    pub timeout: u64,
    pub connect_timeout: u64,
    /// Retries after the first attempt of a read (at most 16 are made).
    pub retry_limit: u64,
    pub skip_verify: bool,
    /// PEM files whose certificates replace the bundled web PKI roots (a private registry's CA).
    pub ca_cert_files: Vec<PathBuf>,
    pub proxy: ProxyConfig,
    pub mirrors: Vec<MirrorConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            timeout: 5,
            connect_timeout: 5,
            // nydusd parses 0 by default; a read that never retries is too fragile.
            retry_limit: 3,
            skip_verify: false,
            ca_cert_files: Vec::new(),
            proxy: ProxyConfig::default(),
            mirrors: Vec::new(),
        }
    }
}

/// A forward proxy for blob reads; unused while `url` is empty.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ProxyConfig {
    pub url: String,
    pub ping_url: String,
    /// Read from the origin while the proxy is unhealthy.
    pub fallback: bool,
    pub check_interval: u64,
    pub use_http: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            url: String::new(),
            ping_url: String::new(),
            fallback: true,
            check_interval: 5,
            use_http: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct MirrorConfig {
    /// `scheme://host[:port]` replacing the origin's (required).
    pub host: String,
    /// `<host>/v2` when absent.
    pub ping_url: Option<String>,
    pub headers: BTreeMap<String, String>,
    /// Send the origin's Authorization to the mirror too.
    pub auth_through: bool,
    pub health_check_interval: u64,
    pub failure_limit: u64,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            host: String::new(),
            ping_url: None,
            headers: BTreeMap::new(),
            auth_through: false,
            health_check_interval: 5,
            failure_limit: 5,
        }
    }
}

impl BackendConfig {
    /// The backend's type name, as configs spell it.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::LocalFs(_) => "localfs",
            BackendConfig::LocalDisk(_) => "localdisk",
            BackendConfig::Network { remote, .. } => match remote {
                RemoteConfig::Registry(_) => "registry",
                RemoteConfig::S3(_) => "s3",
                RemoteConfig::Oss(_) => "oss",
                RemoteConfig::HttpProxy(_) => "http-proxy",
            },
        }
    }

    /// Reaching the blobs takes the network.
    pub fn needs_network(&self) -> bool {
        matches!(self, BackendConfig::Network { .. })
    }

    /// The host paths the backend reads, with what each is: what the sandbox exposes and confines
    /// (resolving them in place).
    pub fn host_paths_mut(&mut self) -> Vec<(HostPath, &mut PathBuf)> {
        match self {
            BackendConfig::LocalFs(c) => c
                .dir
                .iter_mut()
                .chain(c.alt_dirs.iter_mut())
                .map(|p| (HostPath::BlobDir, p))
                .chain(c.blob_file.iter_mut().map(|p| (HostPath::BlobFile, p)))
                .collect(),
            BackendConfig::LocalDisk(c) => c
                .device_path
                .iter_mut()
                .map(|p| (HostPath::BackendFile, p))
                .collect(),
            BackendConfig::Network { http, .. } => http
                .ca_cert_files
                .iter_mut()
                .map(|p| (HostPath::BackendFile, p))
                .collect(),
        }
    }

    /// Where the blobs come from, without credentials or tuning (hashed, never shown): the backend type
    /// and the settings that choose the location (directories, host and repository, bucket and prefix,
    /// address and path) or the route to it (redirect rewrites, mirrors, proxy, TLS trust). Part of the
    /// blob cache's key for images without chunk digests, whose bytes nothing else checks: a mount of the
    /// same bootstrap through another route (a mirror of its own) must not share their cache. The text
    /// must stay the same for the same config.
    pub fn location(&self) -> String {
        let (remote, http) = match self {
            BackendConfig::LocalFs(c) => {
                return format!(
                    "localfs dir={:?} alt_dirs={:?} blob_file={:?}",
                    c.dir, c.alt_dirs, c.blob_file
                )
            }
            BackendConfig::LocalDisk(c) => {
                return format!("localdisk device_path={:?}", c.device_path)
            }
            BackendConfig::Network { remote, http } => (remote, http),
        };
        let given = |v: &str| Some(v.to_string());
        let mut keys: Vec<(&str, Option<String>)> = match remote {
            RemoteConfig::Registry(c) => vec![
                ("scheme", c.scheme.clone()),
                ("host", given(&c.host)),
                ("repo", given(&c.repo)),
                ("blob_url_scheme", c.blob_url_scheme.clone()),
                ("blob_redirected_host", c.blob_redirected_host.clone()),
            ],
            RemoteConfig::S3(c) | RemoteConfig::Oss(c) => vec![
                ("scheme", c.scheme.clone()),
                ("endpoint", c.endpoint.clone()),
                ("region", c.region.clone()),
                ("bucket_name", given(&c.bucket_name)),
                ("object_prefix", c.object_prefix.clone()),
            ],
            RemoteConfig::HttpProxy(c) => vec![("addr", given(&c.addr)), ("path", c.path.clone())],
        };
        for m in &http.mirrors {
            keys.push(("mirror", Some(crate::redact::text(&m.host).into_owned())));
            // A mirror's headers may choose its upstream (Dragonfly's `X-Dragonfly-Registry`); its own
            // credential, which may be renewed, does not.
            for (name, value) in &m.headers {
                let value = match name.eq_ignore_ascii_case("authorization") {
                    true => "",
                    false => value.as_str(),
                };
                keys.push(("mirror_header", Some(format!("{name}: {value}"))));
            }
        }
        if !http.proxy.url.is_empty() {
            keys.push((
                "proxy",
                Some(crate::redact::text(&http.proxy.url).into_owned()),
            ));
            keys.push(("use_http", http.proxy.use_http.then(|| "true".into())));
        }
        keys.push(("skip_verify", http.skip_verify.then(|| "true".into())));
        for f in &http.ca_cert_files {
            keys.push(("ca_cert_file", Some(f.to_string_lossy().into_owned())));
        }
        let mut out = self.kind().to_string();
        for (k, v) in keys {
            if let Some(v) = v {
                out.push_str(&format!(" {k}={}", Value::String(v)));
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// `blobcache` / `filecache`: uncompressed chunks in local files with a ready bitmap.
    BlobCache,
    /// `""` / `dummycache`: every read goes to the backend.
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub kind: CacheKind,
    pub work_dir: Option<PathBuf>,
    pub validate: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            kind: CacheKind::None,
            work_dir: None,
            validate: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PrefetchConfig {
    pub enable: bool,
    pub threads: usize,
    /// Largest merged backend request, bytes.
    pub merging_size: u64,
    /// Bytes per second, 0 = unlimited.
    pub bandwidth_limit: u64,
    pub prefetch_all: bool,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            enable: false,
            threads: 8,
            merging_size: DEFAULT_IO_SIZE,
            bandwidth_limit: 0,
            prefetch_all: false,
        }
    }
}

/// `id_mapping: [internal, external, range]` (nydus-snapshotter, for pods in a user namespace): the
/// image's IDs `internal..internal+range` are reported to the kernel as `external..external+range`, so
/// the pod's root (mapped to `external` on the host) owns what the image's root owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMapping {
    pub internal: u32,
    pub external: u32,
    pub range: u32,
}

impl IdMapping {
    /// The host ID for an ID of the image (IDs outside the range are reported unchanged).
    pub fn to_external(&self, id: u32) -> u32 {
        if id >= self.internal && id - self.internal < self.range {
            id - self.internal + self.external
        } else {
            id
        }
    }

    /// The image's ID for a host ID (the inverse, for permission checks of callers).
    pub fn to_internal(&self, id: u32) -> u32 {
        if id >= self.external && id - self.external < self.range {
            id - self.external + self.internal
        } else {
            id
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RafsConfig {
    pub validate: bool,
    pub enable_xattr: bool,
    pub iostats_files: bool,
    pub access_pattern: bool,
    pub latest_read_files: bool,
    /// User I/O amplification: small reads are widened to this many bytes of backend data.
    pub amplify_io: u64,
    pub prefetch: PrefetchConfig,
    pub id_mapping: Option<IdMapping>,
}

impl Default for RafsConfig {
    fn default() -> Self {
        RafsConfig {
            validate: false,
            enable_xattr: false,
            iostats_files: false,
            access_pattern: false,
            latest_read_files: false,
            amplify_io: DEFAULT_IO_SIZE,
            prefetch: PrefetchConfig::default(),
            id_mapping: None,
        }
    }
}

impl DaemonConfig {
    /// A config for blobs in a local directory, cached in `work_dir` (nydusd's `--localfs-dir`).
    pub fn localfs(dir: PathBuf, work_dir: Option<PathBuf>) -> Self {
        DaemonConfig {
            id: None,
            backend: BackendConfig::LocalFs(LocalFsConfig {
                dir: Some(dir),
                ..Default::default()
            }),
            cache: CacheConfig {
                kind: if work_dir.is_some() {
                    CacheKind::BlobCache
                } else {
                    CacheKind::None
                },
                work_dir,
                validate: false,
            },
            rafs: RafsConfig::default(),
        }
    }

    /// Chunk digests are verified when either the fs-level or the cache-level switch asks for it.
    pub fn validate(&self) -> bool {
        self.rafs.validate || self.cache.validate
    }

    /// The config file at `path`: its text (kept whole for the mount request, which a successor daemon
    /// receives) and what it says; errors name the file.
    pub fn load(path: &std::path::Path) -> Result<(String, Self)> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("read config {}", path.display()), e))?;
        let config = Self::from_slice(text.as_bytes()).map_err(|e| match e {
            Error::Invalid(m) => Error::Invalid(format!("config {}: {m}", path.display())),
            other => other,
        })?;
        Ok((text, config))
    }

    pub fn from_slice(text: &[u8]) -> Result<Self> {
        if text.len() > MAX_CONFIG_SIZE {
            return Err(Error::Invalid(format!(
                "config is {} bytes, larger than 1 MiB",
                text.len()
            )));
        }
        let value: Value = serde_json::from_slice(text)
            .map_err(|e| Error::Invalid(format!("config is not valid JSON: {e}")))?;
        let doc = without_nulls(&value);
        if !doc.is_object() {
            return Err(invalid(
                "",
                &format!("expected an object, found {}", kind_of(&doc)),
            ));
        }
        let (config, notes) = Self::parse(&doc)?;
        for note in notes {
            log::warn!("config: {note}");
        }
        Ok(config)
    }

    /// The config in `doc` (a JSON object without nulls), and what to warn about.
    fn parse(doc: &Value) -> Result<(Self, Vec<String>)> {
        let mut unknown = Vec::new();
        let config = match doc.get("version") {
            Some(Value::Number(n)) if n.as_u64() == Some(2) => {
                typed::<V2>(doc, "", &mut unknown)?.into_config(&mut unknown)?
            }
            Some(v) => {
                return Err(Error::Invalid(format!(
                    "config key `version`: {v} (only 2 is known)"
                )))
            }
            None => typed::<V1>(doc, "", &mut unknown)?.into_config(&mut unknown)?,
        };
        Ok((config, unused_notes(doc, &unknown)))
    }
}

/// `text` (a v1 or v2 config whose backend is a registry) with its registry credentials replaced by
/// `auth` (removed when `None`): what a successor daemon must use after `PUT /api/v1/config`. The text is
/// edited, not re-generated, so the successor gets every other key as the client wrote it.
pub fn with_registry_auth(text: &str, auth: Option<&str>) -> Result<String> {
    let mut v: Value = serde_json::from_str(text)
        .map_err(|e| Error::Invalid(format!("config is not valid JSON: {e}")))?;
    let backend = if v.get("version").is_some() {
        v.pointer_mut("/backend/registry")
    } else {
        v.pointer_mut("/device/backend/config")
    };
    let backend = backend
        .and_then(Value::as_object_mut)
        .ok_or_else(|| Error::Invalid("the config has no registry backend settings".into()))?;
    match auth {
        Some(a) => backend.insert("auth".into(), Value::String(a.to_string())),
        None => backend.remove("auth"),
    };
    Ok(v.to_string())
}

// ---------------------------------------------------------------------------------------------------
// The two file formats, as nydusd spells them.

/// The legacy (v1) format.
#[derive(Deserialize)]
#[serde(default)]
struct V1 {
    device: Option<V1Device>,
    /// Validated only (see [`NO_EFFECT`]).
    #[serde(rename = "mode")]
    _mode: Mode,
    digest_validate: bool,
    enable_xattr: bool,
    iostats_files: bool,
    access_pattern: bool,
    latest_read_files: bool,
    amplify_io: u64,
    fs_prefetch: Option<V1Prefetch>,
    id_mapping: Option<Value>,
}

impl Default for V1 {
    fn default() -> Self {
        V1 {
            device: None,
            _mode: Mode::Direct,
            digest_validate: false,
            enable_xattr: false,
            iostats_files: false,
            access_pattern: false,
            latest_read_files: false,
            amplify_io: DEFAULT_IO_SIZE,
            fs_prefetch: None,
            id_mapping: None,
        }
    }
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Mode {
    #[default]
    Direct,
    Cached,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct V1Device {
    id: Option<String>,
    backend: Option<V1Backend>,
    cache: Option<V1Cache>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct V1Backend {
    #[serde(rename = "type")]
    kind: Option<String>,
    /// Typed by `kind` (see [`parse_backend`]).
    config: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct V1Cache {
    #[serde(rename = "type")]
    kind: Option<String>,
    config: Option<WorkDir>,
    validate: bool,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct WorkDir {
    work_dir: Option<PathBuf>,
}

/// `fs_prefetch` (v1): v1 spells some keys differently and defaults `prefetch_all` to true.
#[derive(Deserialize)]
#[serde(default)]
struct V1Prefetch {
    enable: bool,
    threads_count: u64,
    merging_size: u64,
    bandwidth_rate: u64,
    prefetch_all: bool,
}

impl Default for V1Prefetch {
    fn default() -> Self {
        let d = PrefetchConfig::default();
        V1Prefetch {
            enable: d.enable,
            threads_count: d.threads as u64,
            merging_size: d.merging_size,
            bandwidth_rate: d.bandwidth_limit,
            prefetch_all: true,
        }
    }
}

/// The v2 format.
#[derive(Deserialize, Default)]
#[serde(default)]
struct V2 {
    /// Checked before (only 2 is known).
    #[serde(rename = "version")]
    _version: Option<Value>,
    id: Option<String>,
    backend: Option<V2Backend>,
    cache: Option<V2Cache>,
    rafs: Option<V2Rafs>,
}

/// `backend`: the type and one settings block per type, named after it.
#[derive(Deserialize, Default)]
#[serde(default)]
struct V2Backend {
    #[serde(rename = "type")]
    kind: Option<String>,
    localfs: Option<Value>,
    registry: Option<Value>,
    oss: Option<Value>,
    s3: Option<Value>,
    #[serde(rename = "http-proxy")]
    http_proxy: Option<Value>,
    localdisk: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct V2Cache {
    #[serde(rename = "type")]
    kind: Option<String>,
    validate: bool,
    filecache: Option<V2FileCache>,
    prefetch: Option<V2Prefetch>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct V2FileCache {
    work_dir: Option<PathBuf>,
    enable_encryption: bool,
}

#[derive(Deserialize)]
#[serde(default)]
struct V2Rafs {
    /// Validated only (see [`NO_EFFECT`]).
    #[serde(rename = "mode")]
    _mode: Mode,
    validate: bool,
    enable_xattr: bool,
    iostats_files: bool,
    access_pattern: bool,
    latest_read_files: bool,
    batch_size: u64,
    prefetch: Option<V2Prefetch>,
    id_mapping: Option<Value>,
}

impl Default for V2Rafs {
    fn default() -> Self {
        let d = RafsConfig::default();
        V2Rafs {
            _mode: Mode::Direct,
            validate: d.validate,
            enable_xattr: d.enable_xattr,
            iostats_files: d.iostats_files,
            access_pattern: d.access_pattern,
            latest_read_files: d.latest_read_files,
            batch_size: d.amplify_io,
            prefetch: None,
            id_mapping: None,
        }
    }
}

/// `prefetch` (v2, under `cache` or `rafs`).
#[derive(Deserialize)]
#[serde(default)]
struct V2Prefetch {
    enable: bool,
    threads: u64,
    batch_size: u64,
    bandwidth_limit: u64,
    prefetch_all: bool,
}

impl Default for V2Prefetch {
    fn default() -> Self {
        let d = PrefetchConfig::default();
        V2Prefetch {
            enable: d.enable,
            threads: d.threads as u64,
            batch_size: d.merging_size,
            bandwidth_limit: d.bandwidth_limit,
            prefetch_all: d.prefetch_all,
        }
    }
}

impl V1 {
    fn into_config(self, unknown: &mut Vec<String>) -> Result<DaemonConfig> {
        let device = self
            .device
            .ok_or_else(|| invalid("device", "missing (a v1 config needs `device.backend`)"))?;
        let backend = device
            .backend
            .ok_or_else(|| invalid("device.backend", "missing"))?;
        let kind = backend
            .kind
            .ok_or_else(|| invalid("device.backend.type", "missing"))?;
        let backend = parse_backend(
            &kind,
            backend.config.as_ref(),
            "device.backend",
            "device.backend.config",
            unknown,
        )?;
        let cache = match device.cache {
            Some(c) => CacheConfig {
                kind: parse_cache_kind(c.kind, "device.cache.type")?,
                work_dir: c.config.and_then(|w| w.work_dir),
                validate: c.validate,
            },
            None => CacheConfig::default(),
        };
        let prefetch = self.fs_prefetch.unwrap_or_default();
        let rafs = RafsConfig {
            validate: self.digest_validate,
            enable_xattr: self.enable_xattr,
            iostats_files: self.iostats_files,
            access_pattern: self.access_pattern,
            latest_read_files: self.latest_read_files,
            amplify_io: checked_io_size(self.amplify_io, "amplify_io")?,
            prefetch: prefetch_config(
                prefetch.enable,
                (prefetch.threads_count, "fs_prefetch.threads_count"),
                (prefetch.merging_size, "fs_prefetch.merging_size"),
                prefetch.bandwidth_rate,
                prefetch.prefetch_all,
            )?,
            id_mapping: parse_id_mapping(self.id_mapping.as_ref(), "id_mapping")?,
        };
        let config = DaemonConfig {
            id: device.id,
            backend,
            cache,
            rafs,
        };
        check_cache(&config, "device.cache.config.work_dir")?;
        Ok(config)
    }
}

impl V2Prefetch {
    fn into_config(self, path: &str) -> Result<PrefetchConfig> {
        prefetch_config(
            self.enable,
            (self.threads, &format!("{path}.threads")),
            (self.batch_size, &format!("{path}.batch_size")),
            self.bandwidth_limit,
            self.prefetch_all,
        )
    }
}

impl V2 {
    fn into_config(self, unknown: &mut Vec<String>) -> Result<DaemonConfig> {
        let b = self.backend.ok_or_else(|| invalid("backend", "missing"))?;
        let kind = b.kind.ok_or_else(|| invalid("backend.type", "missing"))?;
        let blocks = [
            ("localfs", &b.localfs),
            ("registry", &b.registry),
            ("oss", &b.oss),
            ("s3", &b.s3),
            ("http-proxy", &b.http_proxy),
            ("localdisk", &b.localdisk),
        ];
        let Some((key, block)) = blocks.iter().find(|(key, _)| *key == kind) else {
            return Err(invalid(
                "backend.type",
                &format!("unknown backend type {kind:?}"),
            ));
        };
        for (other, _) in blocks.iter().filter(|(k, v)| k != key && v.is_some()) {
            unknown.push(format!("backend.{other}"));
        }
        let path = format!("backend.{key}");
        let backend = parse_backend(&kind, block.as_ref(), "backend", &path, unknown)?;
        let (cache, cache_prefetch) = match self.cache {
            Some(c) => {
                let filecache = c.filecache.unwrap_or_default();
                if filecache.enable_encryption {
                    return Err(Error::Unsupported(
                        "encrypted blob cache (cache.filecache.enable_encryption)".into(),
                    ));
                }
                let cache = CacheConfig {
                    kind: parse_cache_kind(c.kind, "cache.type")?,
                    work_dir: filecache.work_dir,
                    validate: c.validate,
                };
                let prefetch = c.prefetch.map(|p| p.into_config("cache.prefetch"));
                (cache, prefetch.transpose()?)
            }
            None => (CacheConfig::default(), None),
        };
        let r = self.rafs.unwrap_or_default();
        let mut rafs = RafsConfig {
            validate: r.validate,
            enable_xattr: r.enable_xattr,
            iostats_files: r.iostats_files,
            access_pattern: r.access_pattern,
            latest_read_files: r.latest_read_files,
            amplify_io: checked_io_size(r.batch_size, "rafs.batch_size")?,
            prefetch: match r.prefetch {
                Some(p) => p.into_config("rafs.prefetch")?,
                None => PrefetchConfig::default(),
            },
            id_mapping: parse_id_mapping(r.id_mapping.as_ref(), "rafs.id_mapping")?,
        };
        // Either prefetch block turns prefetch on; the fs-level one wins where both are given.
        if !rafs.prefetch.enable {
            if let Some(p) = cache_prefetch {
                rafs.prefetch = p;
            }
        }
        let config = DaemonConfig {
            id: self.id,
            backend,
            cache,
            rafs,
        };
        check_cache(&config, "cache.filecache.work_dir")?;
        Ok(config)
    }
}

// ---------------------------------------------------------------------------------------------------
// Backends.

/// The backend of type `kind` from its settings block `value` (at `path`; `parent` holds `type`).
fn parse_backend(
    kind: &str,
    value: Option<&Value>,
    parent: &str,
    path: &str,
    unknown: &mut Vec<String>,
) -> Result<BackendConfig> {
    let empty = Value::Object(Map::new());
    let value = value.unwrap_or(&empty);
    // The network backends' blocks hold two sets of keys, read in two passes: a key is unknown when
    // neither pass knows it (or the value that holds it).
    let (mut own, mut shared) = (Vec::new(), Vec::new());
    let remote = match kind {
        "localfs" => {
            let c: LocalFsConfig = typed(value, path, unknown)?;
            if c.dir.is_none() && c.blob_file.is_none() {
                return Err(invalid(path, "localfs needs `dir` or `blob_file`"));
            }
            return Ok(BackendConfig::LocalFs(c));
        }
        "localdisk" => return Ok(BackendConfig::LocalDisk(typed(value, path, unknown)?)),
        "registry" => {
            let c: RegistryConfig = typed(value, path, &mut own)?;
            required(&c.host, path, "host")?;
            required(&c.repo, path, "repo")?;
            RemoteConfig::Registry(c)
        }
        "s3" | "oss" => {
            let c: ObjectStoreConfig = typed(value, path, &mut own)?;
            required(&c.bucket_name, path, "bucket_name")?;
            if kind == "s3" {
                required(c.region.as_deref().unwrap_or(""), path, "region")?;
                RemoteConfig::S3(c)
            } else {
                required(c.endpoint.as_deref().unwrap_or(""), path, "endpoint")?;
                RemoteConfig::Oss(c)
            }
        }
        "http-proxy" => {
            let c: HttpProxyConfig = typed(value, path, &mut own)?;
            required(&c.addr, path, "addr")?;
            RemoteConfig::HttpProxy(c)
        }
        other => {
            return Err(invalid(
                &format!("{parent}.type"),
                &format!("unknown backend type {other:?}"),
            ))
        }
    };
    let http: HttpConfig = typed(value, path, &mut shared)?;
    for (i, m) in http.mirrors.iter().enumerate() {
        required(&m.host, &format!("{path}.mirrors[{i}]"), "host")?;
    }
    let covered = |p: &String, by: &[String]| by.iter().any(|a| p == a || is_beneath(p, a));
    unknown.extend(own.iter().filter(|p| covered(p, &shared)).cloned());
    unknown.extend(
        shared
            .iter()
            .filter(|p| covered(p, &own) && !own.contains(p))
            .cloned(),
    );
    Ok(BackendConfig::Network { remote, http })
}

fn required(value: &str, path: &str, key: &str) -> Result<()> {
    if value.is_empty() {
        return Err(invalid(
            &format!("{path}.{key}"),
            "missing (this backend needs it)",
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Checks.

fn parse_cache_kind(kind: Option<String>, path: &str) -> Result<CacheKind> {
    match kind.as_deref() {
        None | Some("") | Some("dummycache") => Ok(CacheKind::None),
        Some("blobcache") | Some("filecache") => Ok(CacheKind::BlobCache),
        Some("fscache") => Err(invalid(
            path,
            "fscache is served by the in-guest helper, not by a FUSE/virtio-fs mount",
        )),
        Some(other) => Err(invalid(path, &format!("unknown cache type {other:?}"))),
    }
}

/// A prefetch block's values, checked: `threads` and `merging` are (value, key path).
fn prefetch_config(
    enable: bool,
    threads: (u64, &str),
    merging: (u64, &str),
    bandwidth_limit: u64,
    prefetch_all: bool,
) -> Result<PrefetchConfig> {
    if enable && !(1..=1024).contains(&threads.0) {
        return Err(invalid(threads.1, "must be 1..1024"));
    }
    Ok(PrefetchConfig {
        enable,
        threads: threads.0 as usize,
        merging_size: checked_io_size(merging.0, merging.1)?,
        bandwidth_limit,
        prefetch_all,
    })
}

/// `[internal, external, range]`, three IDs whose ranges stay below 2^32; a zero range maps nothing.
fn parse_id_mapping(v: Option<&Value>, key: &str) -> Result<Option<IdMapping>> {
    let Some(v) = v else {
        return Ok(None);
    };
    let ids: Option<[u32; 3]> = v
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                .collect::<Option<Vec<u32>>>()
        })
        .and_then(|ids| ids.try_into().ok());
    let Some([internal, external, range]) = ids else {
        return Err(invalid(
            key,
            &format!(
                "expected [internal, external, range] (three 32-bit IDs), found {}",
                kind_of(v)
            ),
        ));
    };
    if range == 0 {
        return Ok(None);
    }
    if internal.checked_add(range).is_none() || external.checked_add(range).is_none() {
        return Err(invalid(
            key,
            "internal + range and external + range must stay below 2^32",
        ));
    }
    Ok(Some(IdMapping {
        internal,
        external,
        range,
    }))
}

fn checked_io_size(v: u64, key: &str) -> Result<u64> {
    if v > MAX_IO_SIZE {
        return Err(invalid(key, "must be at most 256 MiB"));
    }
    Ok(v)
}

fn check_cache(config: &DaemonConfig, work_dir_key: &str) -> Result<()> {
    if config.cache.kind == CacheKind::BlobCache && config.cache.work_dir.is_none() {
        return Err(invalid(work_dir_key, "a blobcache needs a work_dir"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Typed reading with full key paths.

fn invalid(path: &str, msg: &str) -> Error {
    let path = if path.is_empty() { "(top level)" } else { path };
    Error::Invalid(format!("config key `{path}`: {msg}"))
}

/// `prefix.key`, or `key` at the top level.
fn join(prefix: &str, rest: &str) -> String {
    match (prefix.is_empty(), rest.is_empty() || rest.starts_with('[')) {
        (true, _) => rest.to_string(),
        (false, true) => format!("{prefix}{rest}"),
        (false, false) => format!("{prefix}.{rest}"),
    }
}

/// `path` lies inside the value at `ancestor` (`a.b` inside `a`, `a[0]` inside `a`).
fn is_beneath(path: &str, ancestor: &str) -> bool {
    path.strip_prefix(ancestor)
        .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

/// Read `value` (found at `path`) as a `T`: a type error names the full path of the key; the full paths
/// of keys `T` does not know are added to `unknown`.
fn typed<T: DeserializeOwned>(value: &Value, path: &str, unknown: &mut Vec<String>) -> Result<T> {
    let mut note = |p: serde_ignored::Path| unknown.push(join(path, &ignored_path(&p)));
    let ignored = serde_ignored::Deserializer::new(value, &mut note);
    serde_path_to_error::deserialize(ignored).map_err(|e| {
        let mut at = value;
        let mut rel = String::new();
        for seg in e.path().iter() {
            use serde_path_to_error::Segment;
            match seg {
                Segment::Seq { index } => {
                    at = at.get(index).unwrap_or(&Value::Null);
                    rel.push_str(&format!("[{index}]"));
                }
                Segment::Map { key } => {
                    at = at.get(key).unwrap_or(&Value::Null);
                    rel = join(&rel, key);
                }
                Segment::Enum { .. } | Segment::Unknown => {}
            }
        }
        invalid(
            &join(path, &rel),
            &serde_message(&e.inner().to_string(), at),
        )
    })
}

fn ignored_path(p: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match p {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        Path::Map { parent, key } => join(&ignored_path(parent), key),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent),
    }
}

/// serde's "invalid type: <value>, expected <what>" in this module's words, naming the kind of the
/// value found (`found`) but never the value: it may be a credential in the wrong place.
fn serde_message(msg: &str, found: &Value) -> String {
    let want = match msg.split_once(", expected ") {
        Some((head, want))
            if head.starts_with("invalid type") || head.starts_with("invalid value") =>
        {
            want
        }
        _ => return msg.to_string(),
    };
    let want = match want {
        "a boolean" => "true or false",
        "u8" | "u16" | "u32" | "u64" | "usize" => "a non-negative integer",
        "a string" | "path string" => "a string",
        "a sequence" => "a list",
        w if w == "a map" || w.starts_with("struct ") => "an object",
        w => w,
    };
    format!("expected {want}, found {}", kind_of(found))
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.as_i64().is_some_and(|n| n < 0) => "a negative number",
        Value::Number(n) if n.is_f64() => "a fractional number",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// `v` with every `null` object member removed: null means "not given", as for nydusd's Go clients.
fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// Warnings about unknown keys (by path) and about [`NO_EFFECT`] keys whose value asks for something.
fn unused_notes(doc: &Value, unknown: &[String]) -> Vec<String> {
    let mut notes = Vec::new();
    for (path, inert, why) in NO_EFFECT {
        let pointer = format!("/{}", path.replace('.', "/"));
        let Some(v) = doc.pointer(&pointer) else {
            continue;
        };
        let asks = inert.is_none_or(|i| serde_json::from_str::<Value>(i).ok().as_ref() != Some(v));
        if asks {
            notes.push(format!(
                "`{path}` is accepted but has no effect here: {why}"
            ));
        }
    }
    for path in unknown {
        if !NO_EFFECT.iter().any(|(p, _, _)| p == path) {
            notes.push(format!("ignoring unknown key `{path}`"));
        }
    }
    notes
}

/// A size given as bytes, or a number with a binary suffix K, M, G or T (powers of 1024; `8G`, `512m`,
/// `512MiB`); none if it is not one or does not fit 64 bits.
pub fn parse_binary_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_v1_config() {
        let c = DaemonConfig::from_slice(
            br#"{"device":{"backend":{"type":"localfs","config":{"dir":"/b","readahead":true}},
                "cache":{"type":"blobcache","config":{"work_dir":"/c"}}},
                "mode":"direct","digest_validate":true,"iostats_files":true,"enable_xattr":true,"amplify_io":131072,
                "fs_prefetch":{"enable":true,"threads_count":4,"merging_size":262144,"bandwidth_rate":1000}}"#,
        )
        .unwrap();
        assert_eq!(
            c.backend,
            BackendConfig::LocalFs(LocalFsConfig {
                dir: Some("/b".into()),
                alt_dirs: vec![],
                blob_file: None
            })
        );
        assert_eq!(c.cache.kind, CacheKind::BlobCache);
        assert_eq!(
            c.cache.work_dir.as_deref(),
            Some(std::path::Path::new("/c"))
        );
        assert!(c.validate() && c.rafs.iostats_files && c.rafs.enable_xattr);
        assert_eq!(c.rafs.amplify_io, 131072);
        let p = &c.rafs.prefetch;
        assert!(
            p.enable && p.prefetch_all,
            "legacy prefetch_all defaults to true"
        );
        assert_eq!(
            (p.threads, p.merging_size, p.bandwidth_limit),
            (4, 262144, 1000)
        );
    }

    #[test]
    fn v2_config() {
        let c = DaemonConfig::from_slice(
            br#"{"version":2,"id":"img1","backend":{"type":"localfs","localfs":{"dir":"/b","alt_dirs":["/x"]}},
                "cache":{"type":"filecache","validate":true,"filecache":{"work_dir":"/c"},
                         "prefetch":{"enable":true,"threads":2,"batch_size":65536}},
                "rafs":{"mode":"direct","batch_size":0}}"#,
        )
        .unwrap();
        assert_eq!(c.id.as_deref(), Some("img1"));
        assert!(c.validate());
        assert_eq!(c.rafs.amplify_io, 0);
        assert!(
            c.rafs.prefetch.enable && !c.rafs.prefetch.prefetch_all,
            "v2 prefetch_all defaults to false"
        );
        assert_eq!(c.rafs.prefetch.threads, 2);
        match c.backend {
            BackendConfig::LocalFs(LocalFsConfig { alt_dirs, .. }) => {
                assert_eq!(alt_dirs, vec![PathBuf::from("/x")])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wrong_types_and_values_name_the_key() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"device":{"backend":{"type":"localfs","config":{"dir":"/b"}}},"digest_validate":"yes"}"#, "`digest_validate`: expected true or false, found a string"),
            (br#"{"device":{"backend":{"type":"localfs","config":{"dir":3}}}}"#, "`device.backend.config.dir`: expected a string"),
            (br#"{"device":{"backend":{"type":"ftp","config":{}}}}"#, "unknown backend type \"ftp\""),
            (br#"{"version":2,"backend":{"type":"localfs","localfs":{"dir":"/b"}},"cache":{"type":"blobcache"}}"#, "`cache.filecache.work_dir`: a blobcache needs a work_dir"),
            (br#"{"version":2,"backend":{"type":"localfs","localfs":{"dir":"/b"}},"rafs":{"prefetch":{"enable":true,"threads":0}}}"#, "`rafs.prefetch.threads`: must be 1..1024"),
            (br#"{"version":3}"#, "`version`"),
            (br#"{"mode":"direct"}"#, "`device`: missing"),
            (b"not json", "not valid JSON"),
            (br#"[1,2]"#, "(top level)"),
            (br#"{"device":{"backend":{"type":"localfs","config":{"dir":"/b"}}},"mode":"fast"}"#, "`mode`"),
        ];
        for (text, want) in cases {
            let err = DaemonConfig::from_slice(text).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{} -> {err:?} lacks {want:?}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn network_backends_are_kept_for_their_module() {
        let c = DaemonConfig::from_slice(
            br#"{"version":2,"backend":{"type":"registry","registry":{"host":"h:5000","repo":"r","auth":"c2VjcmV0"}}}"#,
        )
        .unwrap();
        assert_eq!(c.backend.kind(), "registry");
        match c.backend {
            BackendConfig::Network {
                remote: RemoteConfig::Registry(config),
                ..
            } => {
                assert_eq!(config.host, "h:5000");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn id_mapping_is_parsed_and_checked() {
        let v1 = |m: &str| {
            DaemonConfig::from_slice(format!(
            r#"{{"device":{{"backend":{{"type":"localfs","config":{{"dir":"/b"}}}}}},"id_mapping":{m}}}"#
        ).as_bytes())
        };
        let m = v1("[0, 100000, 65536]").unwrap().rafs.id_mapping.unwrap();
        assert_eq!(
            (m.to_external(0), m.to_external(65535), m.to_external(65536)),
            (100000, 165535, 65536)
        );
        assert_eq!((m.to_internal(100001), m.to_internal(5)), (1, 5));
        assert_eq!(v1("[1, 2, 0]").unwrap().rafs.id_mapping, None);
        for bad in [
            "[1, 2]",
            "[1, 2, 3, 4]",
            "\"0:1:2\"",
            "[-1, 2, 3]",
            "[0, 4294967295, 2]",
            "[4294967296, 0, 1]",
        ] {
            let e = v1(bad).unwrap_err().to_string();
            assert!(e.contains("id_mapping"), "{bad}: {e}");
        }
        let v2 = DaemonConfig::from_slice(
            br#"{"version":2,"backend":{"type":"localfs","localfs":{"dir":"/b"}},"rafs":{"id_mapping":[0,1000,10]}}"#,
        )
        .unwrap();
        assert_eq!(v2.rafs.id_mapping.unwrap().external, 1000);
    }

    #[test]
    fn registry_credentials_are_replaced_in_v1_and_v2() {
        let v1 = r#"{"device":{"backend":{"type":"registry","config":{"host":"h","repo":"r","auth":"b2xk"}}}}"#;
        let out = with_registry_auth(v1, Some("bmV3OnB3")).unwrap();
        let c = DaemonConfig::from_slice(out.as_bytes()).unwrap();
        let BackendConfig::Network {
            remote: RemoteConfig::Registry(config),
            ..
        } = c.backend
        else {
            panic!("remote")
        };
        assert_eq!(config.auth.as_deref(), Some("bmV3OnB3"));
        let v2 =
            r#"{"version":2,"backend":{"type":"registry","registry":{"host":"h","repo":"r"}}}"#;
        let out = with_registry_auth(v2, Some("bmV3OnB3")).unwrap();
        assert!(out.contains("\"auth\":\"bmV3OnB3\""), "{out}");
        let cleared = with_registry_auth(&out, None).unwrap();
        assert!(!cleared.contains("auth"), "{cleared}");
        let local = r#"{"device":{"backend":{"type":"localfs"}}}"#;
        assert!(with_registry_auth(local, Some("x")).is_err());
    }

    #[test]
    fn oversized_config_is_refused() {
        let big = vec![b' '; MAX_CONFIG_SIZE + 1];
        assert!(DaemonConfig::from_slice(&big)
            .unwrap_err()
            .to_string()
            .contains("larger than 1 MiB"));
    }

    /// The config and its warnings.
    fn parse(v: Value) -> Result<(DaemonConfig, Vec<String>)> {
        DaemonConfig::parse(&without_nulls(&v))
    }

    fn unknown(path: &str) -> String {
        format!("ignoring unknown key `{path}`")
    }

    #[test]
    fn unknown_keys_are_reported_by_full_path() {
        let (_, notes) = parse(serde_json::json!({"device": {
            "backend": {"type": "registry", "config": {"host": "h", "repo": "r", "timeout": 3,
                "timout": 3, "proxy": {"url": "http://p", "urll": 1},
                "mirrors": [{"host": "http://m"}, {"host": "http://n", "hots": "x"}]}},
            "cache": {"type": "blobcache", "config": {"work_dir": "/c", "wrk_dir": "/d"}}},
            "fs_prefetch": {"enable": true, "thread": 2}, "id_mapping": [0, 1, 1], "nope": {"a": 1}}))
        .unwrap();
        let mut want = [
            "device.backend.config.timout",
            "device.backend.config.proxy.urll",
            "device.backend.config.mirrors[1].hots",
            "device.cache.config.wrk_dir",
            "fs_prefetch.thread",
            "nope",
        ]
        .map(unknown);
        let mut notes = notes;
        notes.sort();
        want.sort();
        assert_eq!(notes, want);
        let (_, notes) = parse(serde_json::json!({"version": 2, "idd": "x",
            "backend": {"type": "s3", "s3": {"bucket_name": "b", "region": "r", "retry_limt": 1}},
            "cache": {"type": "", "prefetch": {"enable": false, "batchsize": 1}},
            "rafs": {"iostat_files": true}}))
        .unwrap();
        let mut want = [
            "idd",
            "backend.s3.retry_limt",
            "cache.prefetch.batchsize",
            "rafs.iostat_files",
        ]
        .map(unknown);
        let mut notes = notes;
        notes.sort();
        want.sort();
        assert_eq!(notes, want);
    }

    #[test]
    fn every_known_key_loads_without_warnings() {
        let http = serde_json::json!({"timeout": 5, "connect_timeout": 5, "retry_limit": 2,
            "skip_verify": false, "ca_cert_files": ["/ca.pem"],
            "proxy": {"url": "http://p", "ping_url": "http://p/ping", "fallback": true,
                      "check_interval": 5, "use_http": false},
            "mirrors": [{"host": "http://m", "ping_url": "http://m/v2", "headers": {"X": "y"},
                         "auth_through": false, "health_check_interval": 5, "failure_limit": 5}]});
        let with_http = |mut v: Value| {
            v.as_object_mut()
                .unwrap()
                .extend(http.as_object().unwrap().clone());
            v
        };
        let backends = [
            (
                "localfs",
                serde_json::json!({"dir": "/b", "alt_dirs": ["/a"], "blob_file": "/b/x",
                "readahead": false}),
            ),
            (
                "registry",
                with_http(
                    serde_json::json!({"scheme": "https", "host": "h", "repo": "r",
                "auth": "dTpw", "registry_token": "t", "blob_url_scheme": "http",
                "blob_redirected_host": "c"}),
                ),
            ),
            (
                "s3",
                with_http(
                    serde_json::json!({"scheme": "https", "endpoint": "e", "region": "r",
                "bucket_name": "b", "object_prefix": "p/", "access_key_id": "i",
                "access_key_secret": "s"}),
                ),
            ),
            (
                "oss",
                with_http(serde_json::json!({"endpoint": "e", "bucket_name": "b"})),
            ),
            (
                "http-proxy",
                with_http(serde_json::json!({"addr": "http://a", "path": "/x"})),
            ),
            ("localdisk", serde_json::json!({"device_path": "/dev/vdb"})),
        ];
        for (kind, block) in backends {
            let v1 = serde_json::json!({"device": {"id": "i", "backend": {"type": kind, "config": block},
                    "cache": {"type": "blobcache", "compressed": false, "validate": true,
                              "config": {"work_dir": "/c", "disable_indexed_map": false}}},
                "mode": "direct", "digest_validate": true, "enable_xattr": true, "iostats_files": true,
                "access_pattern": true, "latest_read_files": true, "amplify_io": 4096,
                "id_mapping": [0, 1000, 10],
                "fs_prefetch": {"enable": true, "threads_count": 2, "merging_size": 4096,
                                "bandwidth_rate": 0, "prefetch_all": true, "stream_prefetch": false}});
            let (c, notes) = parse(v1).unwrap();
            assert_eq!((c.backend.kind(), notes), (kind, vec![]));
            let prefetch = serde_json::json!({"enable": true, "threads": 2, "batch_size": 4096,
                "bandwidth_limit": 0, "prefetch_all": false, "stream_prefetch": false});
            let v2 = serde_json::json!({"version": 2, "id": "i", "backend": {"type": kind, kind: block},
                "cache": {"type": "filecache", "compressed": false, "validate": false,
                          "filecache": {"work_dir": "/c", "disable_indexed_map": false,
                                        "enable_encryption": false},
                          "prefetch": prefetch},
                "rafs": {"mode": "direct", "validate": true, "enable_xattr": true, "iostats_files": true,
                         "access_pattern": true, "latest_read_files": true, "batch_size": 4096,
                         "id_mapping": [0, 1000, 10], "prefetch": prefetch}});
            let (c, notes) = parse(v2).unwrap();
            assert_eq!((c.backend.kind(), notes), (kind, vec![]));
        }
    }

    #[test]
    fn keys_without_effect_are_warned_about_when_they_ask_for_something() {
        let (_, notes) = parse(serde_json::json!({"device": {
            "backend": {"type": "localfs", "config": {"dir": "/b", "readahead": true}},
            "cache": {"type": "", "compressed": true}, "external_backends": []}, "mode": "cached"}))
        .unwrap();
        let paths: Vec<&str> = notes.iter().map(|n| n.split('`').nth(1).unwrap()).collect();
        assert_eq!(
            paths,
            [
                "mode",
                "device.cache.compressed",
                "device.backend.config.readahead",
                "device.external_backends"
            ]
        );
        assert!(
            notes.iter().all(|n| n.contains("has no effect")),
            "{notes:?}"
        );
        let (_, notes) = parse(serde_json::json!({"version": 2,
            "backend": {"type": "localfs", "localfs": {"dir": "/b"}},
            "cache": {"compressed": false}, "rafs": {"mode": "direct"}}))
        .unwrap();
        assert_eq!(notes, Vec::<String>::new());
        // Still checked: a mode that nydusd would refuse is refused.
        let e = parse(serde_json::json!({"version": 2,
            "backend": {"type": "localfs", "localfs": {"dir": "/b"}}, "rafs": {"mode": 1}}))
        .unwrap_err();
        assert!(e.to_string().contains("`rafs.mode`"), "{e}");
    }

    #[test]
    fn nested_type_errors_name_the_full_path_but_not_the_value() {
        let v1 = |config: Value| serde_json::json!({"device": {"backend": {"type": "registry", "config": config}}});
        let cases = [
            (
                v1(serde_json::json!({"host": "h", "repo": "r",
                    "mirrors": [{"host": "http://m"}, {"host": "http://n", "failure_limit": "s3cr3t"}]})),
                "config key `device.backend.config.mirrors[1].failure_limit`: expected a \
                 non-negative integer, found a string",
            ),
            (
                v1(serde_json::json!({"host": "h", "repo": "r", "proxy": {"fallback": 1}})),
                "config key `device.backend.config.proxy.fallback`: expected true or false, found a number",
            ),
            (
                v1(serde_json::json!({"host": "h", "repo": "r", "retry_limit": -1})),
                "config key `device.backend.config.retry_limit`: expected a non-negative integer, \
                 found a negative number",
            ),
            (
                v1(serde_json::json!({"host": "h", "repo": "r", "mirrors": [{"host": "m",
                    "headers": {"Authorization": ["s3cr3t"]}}]})),
                "config key `device.backend.config.mirrors[0].headers.Authorization`: expected a \
                 string, found a list",
            ),
            (
                serde_json::json!({"version": 2, "backend": {"type": "localfs", "localfs": "/b"}}),
                "config key `backend.localfs`: expected an object, found a string",
            ),
            (
                serde_json::json!({"version": 2, "backend": {"type": "localfs",
                    "localfs": {"dir": "/b"}}, "cache": {"prefetch": {"threads": 1.5}}}),
                "config key `cache.prefetch.threads`: expected a non-negative integer, found a \
                 fractional number",
            ),
        ];
        for (config, want) in cases {
            let e = parse(config.clone()).unwrap_err().to_string();
            assert_eq!(e, want, "{config}");
            assert!(!e.contains("s3cr3t"));
        }
    }

    #[test]
    fn backends_name_their_missing_keys() {
        for (kind, block, key) in [
            ("registry", serde_json::json!({"host": "h"}), "repo"),
            (
                "registry",
                serde_json::json!({"repo": "r", "host": ""}),
                "host",
            ),
            ("s3", serde_json::json!({"bucket_name": "b"}), "region"),
            ("s3", serde_json::json!({"region": "r"}), "bucket_name"),
            ("oss", serde_json::json!({"bucket_name": "b"}), "endpoint"),
            ("http-proxy", serde_json::json!({}), "addr"),
            ("localfs", serde_json::json!({"alt_dirs": ["/a"]}), ""),
        ] {
            let v2 = serde_json::json!({"version": 2, "backend": {"type": kind, kind: block}});
            let e = parse(v2).unwrap_err().to_string();
            let path = format!("backend.{kind}.{key}");
            assert!(
                e.contains(&format!("`{}`", path.trim_end_matches('.'))),
                "{kind}: {e}"
            );
        }
        let mirror = serde_json::json!({"device": {"backend": {"type": "registry", "config":
            {"host": "h", "repo": "r", "mirrors": [{"ping_url": "http://m/v2"}]}}}});
        let e = parse(mirror).unwrap_err().to_string();
        assert!(
            e.contains("`device.backend.config.mirrors[0].host`: missing"),
            "{e}"
        );
    }

    #[test]
    fn null_is_the_same_as_absent() {
        let (c, notes) = parse(serde_json::json!({"device": {"id": null,
            "backend": {"type": "registry", "config": {"host": "h", "repo": "r", "auth": null,
                "mirrors": null, "proxy": null, "timeout": null}},
            "cache": null}, "fs_prefetch": null, "id_mapping": null, "mode": null}))
        .unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        let BackendConfig::Network { http, .. } = c.backend else {
            panic!()
        };
        assert_eq!(http, HttpConfig::default());
        assert!(c.rafs.prefetch.prefetch_all && c.id.is_none());
    }

    #[test]
    fn location_text_is_that_of_the_config_keys() {
        let location = |kind: &str, block: Value| {
            let v2 = serde_json::json!({"version": 2, "backend": {"type": kind, kind: block}});
            parse(v2).unwrap().0.backend.location()
        };
        assert_eq!(
            location(
                "registry",
                serde_json::json!({"host": "h:5000", "repo": "a/b", "auth": "dTpw"})
            ),
            r#"registry host="h:5000" repo="a/b""#
        );
        assert_eq!(
            location(
                "s3",
                serde_json::json!({"scheme": "http", "endpoint": "e:9000", "region": "r",
                "bucket_name": "b", "object_prefix": "p/", "access_key_secret": "k"})
            ),
            r#"s3 scheme="http" endpoint="e:9000" region="r" bucket_name="b" object_prefix="p/""#
        );
        assert_eq!(
            location(
                "http-proxy",
                serde_json::json!({"addr": "http://a:1", "path": "/x"})
            ),
            r#"http-proxy addr="http://a:1" path="/x""#
        );
        // The route is part of it: the same bootstrap through a mirror, a proxy or a redirect rewrite of
        // its own must not share an unverified cache with the plain one.
        let plain = serde_json::json!({"host": "h:5000", "repo": "a/b"});
        let routed = |key: &str, value: Value| {
            let mut c = plain.clone();
            c[key] = value;
            location("registry", c)
        };
        assert_eq!(
            routed("mirrors", serde_json::json!([{"host": "http://m:1"}])),
            r#"registry host="h:5000" repo="a/b" mirror="http://m:1""#
        );
        assert_eq!(
            routed(
                "mirrors",
                serde_json::json!([{"host": "http://m:1", "headers":
                    {"X-Dragonfly-Registry": "https://other", "Authorization": "Bearer t"}}])
            ),
            r#"registry host="h:5000" repo="a/b" mirror="http://m:1" mirror_header="Authorization: " mirror_header="X-Dragonfly-Registry: https://other""#
        );
        assert_eq!(
            routed(
                "proxy",
                serde_json::json!({"url": "http://u:p@x:1", "use_http": true})
            ),
            r#"registry host="h:5000" repo="a/b" proxy="http://***@x:1" use_http="true""#
        );
        for (key, value) in [
            ("blob_redirected_host", serde_json::json!("evil")),
            ("blob_url_scheme", serde_json::json!("http")),
            ("skip_verify", serde_json::json!(true)),
            ("ca_cert_files", serde_json::json!(["/ca.pem"])),
        ] {
            assert_ne!(
                routed(key, value),
                location("registry", plain.clone()),
                "{key}"
            );
        }
        assert_eq!(
            location("localfs", serde_json::json!({"dir": "/b"})),
            r#"localfs dir=Some("/b") alt_dirs=[] blob_file=None"#
        );
    }

    #[test]
    fn host_paths_are_what_the_backend_reads() {
        let paths = |v: Value| {
            let mut c = parse(v).unwrap().0;
            let out: Vec<(HostPath, PathBuf)> = c
                .backend
                .host_paths_mut()
                .into_iter()
                .map(|(k, p)| (k, p.clone()))
                .collect();
            out
        };
        assert_eq!(
            paths(
                serde_json::json!({"device": {"backend": {"type": "localfs", "config":
                {"dir": "/b", "alt_dirs": ["/a"], "blob_file": "/f/blob"}}}})
            ),
            [
                (HostPath::BlobDir, "/b".into()),
                (HostPath::BlobDir, "/a".into()),
                (HostPath::BlobFile, "/f/blob".into())
            ]
        );
        assert_eq!(
            paths(
                serde_json::json!({"version": 2, "backend": {"type": "registry", "registry":
                {"host": "h", "repo": "r", "ca_cert_files": ["/ca.pem"]}}})
            ),
            [(HostPath::BackendFile, "/ca.pem".into())]
        );
        assert_eq!(
            paths(
                serde_json::json!({"version": 2, "backend": {"type": "localdisk", "localdisk":
                {"device_path": "/dev/vdb"}}})
            ),
            [(HostPath::BackendFile, "/dev/vdb".into())]
        );
    }
}
