//! Daemon configuration in nydusd's formats: the legacy v1 JSON (`device`, `mode`, `digest_validate`,
//! `fs_prefetch`, ...) and the v2 JSON (`version: 2`, `backend`, `cache`, `rafs`). Both become one
//! [`DaemonConfig`].
//!
//! Unknown keys are logged as warnings (by name only: values may hold credentials) so configs written for
//! newer or older nydusd still load; a known key with a wrong type or value is an error naming its path.

use std::collections::HashSet;
use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Configs larger than this are refused (nydusd's limit too).
const MAX_CONFIG_SIZE: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq)]
pub enum BackendConfig {
    LocalFs {
        dir: Option<PathBuf>,
        alt_dirs: Vec<PathBuf>,
        blob_file: Option<PathBuf>,
    },
    /// A network backend (`registry`, `oss`, `s3`, `http-proxy`): its type and raw settings.
    Remote { kind: String, config: Value },
}

impl BackendConfig {
    /// Where the blobs come from, without credentials or tuning: the backend type and the settings that
    /// choose the location (directories, host and repository, bucket and prefix, address and path).
    pub fn location(&self) -> String {
        match self {
            BackendConfig::LocalFs {
                dir,
                alt_dirs,
                blob_file,
            } => format!("localfs dir={dir:?} alt_dirs={alt_dirs:?} blob_file={blob_file:?}"),
            BackendConfig::Remote { kind, config } => {
                let keys = [
                    "scheme",
                    "host",
                    "repo",
                    "endpoint",
                    "region",
                    "bucket_name",
                    "object_prefix",
                    "addr",
                    "path",
                ];
                let mut out = kind.clone();
                for k in keys {
                    if let Some(v) = config.get(k) {
                        out.push_str(&format!(" {k}={v}"));
                    }
                }
                out
            }
        }
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
            merging_size: 1 << 20,
            bandwidth_limit: 0,
            prefetch_all: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub kind: CacheKind,
    pub work_dir: Option<PathBuf>,
    pub validate: bool,
    pub compressed: bool,
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
    pub mode: String,
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
            mode: "direct".into(),
            validate: false,
            enable_xattr: false,
            iostats_files: false,
            access_pattern: false,
            latest_read_files: false,
            amplify_io: 1 << 20,
            prefetch: PrefetchConfig::default(),
            id_mapping: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    pub id: Option<String>,
    pub backend: BackendConfig,
    pub cache: CacheConfig,
    pub rafs: RafsConfig,
}

impl DaemonConfig {
    /// A config for blobs in a local directory, cached in `work_dir` (nydusd's `--localfs-dir`).
    pub fn localfs(dir: PathBuf, work_dir: Option<PathBuf>) -> Self {
        DaemonConfig {
            id: None,
            backend: BackendConfig::LocalFs {
                dir: Some(dir),
                alt_dirs: Vec::new(),
                blob_file: None,
            },
            cache: CacheConfig {
                kind: if work_dir.is_some() {
                    CacheKind::BlobCache
                } else {
                    CacheKind::None
                },
                work_dir,
                validate: false,
                compressed: false,
            },
            rafs: RafsConfig::default(),
        }
    }

    /// Chunk digests are verified when either the fs-level or the cache-level switch asks for it.
    pub fn validate(&self) -> bool {
        self.rafs.validate || self.cache.validate
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read(path)
            .map_err(|e| Error::io(format!("read config {}", path.display()), e))?;
        Self::from_slice(&text).map_err(|e| match e {
            Error::Invalid(m) => Error::Invalid(format!("config {}: {m}", path.display())),
            other => other,
        })
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
        let root = Obj::new(&value, "")?;
        let config = match root.value.get("version") {
            Some(Value::Number(n)) if n.as_u64() == Some(2) => parse_v2(&root)?,
            Some(v) => {
                return Err(Error::Invalid(format!(
                    "config key `version`: {v} (only 2 is known)"
                )))
            }
            None => parse_v1(&root)?,
        };
        root.finish();
        Ok(config)
    }
}

/// `text` (a v1 or v2 config whose backend is a registry) with its registry credentials replaced by
/// `auth` (removed when `None`): what a successor daemon must use after `PUT /api/v1/config`.
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

/// A JSON object being read: remembers which keys were consumed so the rest can be reported.
struct Obj<'a> {
    value: &'a Map<String, Value>,
    path: String,
    used: std::cell::RefCell<HashSet<&'a str>>,
}

impl<'a> Obj<'a> {
    fn new(value: &'a Value, path: &str) -> Result<Self> {
        let map = value
            .as_object()
            .ok_or_else(|| type_error(path, "an object", value))?;
        Ok(Obj {
            value: map,
            path: path.to_string(),
            used: Default::default(),
        })
    }

    fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn get(&self, key: &'a str) -> Option<&'a Value> {
        let (k, v) = self.value.get_key_value(key)?;
        self.used.borrow_mut().insert(k.as_str());
        (!v.is_null()).then_some(v)
    }

    fn bool(&self, key: &'a str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(type_error(&self.key_path(key), "true or false", v)),
        }
    }

    fn u64(&self, key: &'a str, default: u64) -> Result<u64> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Number(n)) => n.as_u64().ok_or_else(|| {
                type_error(
                    &self.key_path(key),
                    "a non-negative integer",
                    &Value::Number(n.clone()),
                )
            }),
            Some(v) => Err(type_error(&self.key_path(key), "a non-negative integer", v)),
        }
    }

    fn string(&self, key: &'a str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(type_error(&self.key_path(key), "a string", v)),
        }
    }

    fn obj(&self, key: &'a str) -> Result<Option<Obj<'a>>> {
        self.get(key)
            .map(|v| Obj::new(v, &self.key_path(key)))
            .transpose()
    }

    fn paths(&self, key: &'a str) -> Result<Vec<PathBuf>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(PathBuf::from)
                        .ok_or_else(|| type_error(&self.key_path(key), "a list of strings", v))
                })
                .collect(),
            Some(v) => Err(type_error(&self.key_path(key), "a list of strings", v)),
        }
    }

    /// Warn about keys nobody read (names only).
    fn finish(&self) {
        let used = self.used.borrow();
        for key in self.value.keys().filter(|k| !used.contains(k.as_str())) {
            log::warn!("config: ignoring unknown key `{}`", self.key_path(key));
        }
    }
}

fn type_error(path: &str, want: &str, got: &Value) -> Error {
    let kind = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    let path = if path.is_empty() { "(top level)" } else { path };
    Error::Invalid(format!(
        "config key `{path}`: expected {want}, found {kind}"
    ))
}

fn invalid(path: String, msg: &str) -> Error {
    Error::Invalid(format!("config key `{path}`: {msg}"))
}

fn parse_backend(kind: &str, config: Option<Obj>, path: &str) -> Result<BackendConfig> {
    match kind {
        "localfs" => {
            let c = config
                .ok_or_else(|| invalid(path.to_string(), "localfs needs `dir` or `blob_file`"))?;
            let dir = c.string("dir")?.map(PathBuf::from);
            let blob_file = c.string("blob_file")?.map(PathBuf::from);
            let alt_dirs = c.paths("alt_dirs")?;
            // Keys nydusd's sample configs carry for localfs that mean nothing here.
            for ignored in ["readahead", "readahead_sec"] {
                c.get(ignored);
            }
            if dir.is_none() && blob_file.is_none() {
                return Err(invalid(
                    c.path.clone(),
                    "localfs needs `dir` or `blob_file`",
                ));
            }
            c.finish();
            Ok(BackendConfig::LocalFs {
                dir,
                alt_dirs,
                blob_file,
            })
        }
        "registry" | "oss" | "s3" | "http-proxy" | "localdisk" => {
            let raw = config
                .map(|c| Value::Object(c.value.clone()))
                .unwrap_or(Value::Null);
            Ok(BackendConfig::Remote {
                kind: kind.to_string(),
                config: raw,
            })
        }
        other => Err(invalid(
            format!("{path}.type"),
            &format!("unknown backend type {other:?}"),
        )),
    }
}

fn parse_cache_kind(kind: Option<String>, path: String) -> Result<CacheKind> {
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

/// `fs_prefetch` (v1) or `prefetch` (v2) block; v1 and v2 spell some keys differently.
fn parse_prefetch(p: &Obj, legacy: bool) -> Result<PrefetchConfig> {
    let d = PrefetchConfig::default();
    let threads = p.u64(
        if legacy { "threads_count" } else { "threads" },
        d.threads as u64,
    )?;
    let enable = p.bool("enable", false)?;
    if enable && !(1..=1024).contains(&threads) {
        return Err(invalid(
            p.key_path(if legacy { "threads_count" } else { "threads" }),
            "must be 1..1024",
        ));
    }
    let merging_size = p.u64(
        if legacy { "merging_size" } else { "batch_size" },
        d.merging_size,
    )?;
    if merging_size > 0x1000_0000 {
        return Err(invalid(
            p.key_path(if legacy { "merging_size" } else { "batch_size" }),
            "must be at most 256 MiB",
        ));
    }
    let cfg = PrefetchConfig {
        enable,
        threads: threads as usize,
        merging_size,
        bandwidth_limit: p.u64(
            if legacy {
                "bandwidth_rate"
            } else {
                "bandwidth_limit"
            },
            0,
        )?,
        // nydusd's legacy format defaults prefetch_all to true, v2 to false.
        prefetch_all: p.bool("prefetch_all", legacy)?,
    };
    p.get("stream_prefetch");
    p.finish();
    Ok(cfg)
}

fn parse_v1(root: &Obj) -> Result<DaemonConfig> {
    let device = root.obj("device")?.ok_or_else(|| {
        invalid(
            "device".into(),
            "missing (a v1 config needs `device.backend`)",
        )
    })?;
    let id = device.string("id")?;
    let backend_obj = device
        .obj("backend")?
        .ok_or_else(|| invalid("device.backend".into(), "missing"))?;
    let kind = backend_obj
        .string("type")?
        .ok_or_else(|| invalid("device.backend.type".into(), "missing"))?;
    let backend = parse_backend(&kind, backend_obj.obj("config")?, "device.backend.config")?;
    backend_obj.finish();
    let cache = match device.obj("cache")? {
        Some(c) => {
            let kind = parse_cache_kind(c.string("type")?, c.key_path("type"))?;
            let work_dir = match c.obj("config")? {
                Some(cc) => {
                    let w = cc.string("work_dir")?.map(PathBuf::from);
                    cc.get("disable_indexed_map");
                    cc.finish();
                    w
                }
                None => None,
            };
            let cache = CacheConfig {
                kind,
                work_dir,
                validate: c.bool("validate", false)?,
                compressed: c.bool("compressed", false)?,
            };
            c.finish();
            cache
        }
        None => CacheConfig {
            kind: CacheKind::None,
            work_dir: None,
            validate: false,
            compressed: false,
        },
    };
    device.get("external_backends");
    device.finish();
    let mode = root.string("mode")?.unwrap_or_else(|| "direct".into());
    if mode != "direct" && mode != "cached" {
        return Err(invalid(
            "mode".into(),
            &format!("{mode:?} (expected \"direct\" or \"cached\")"),
        ));
    }
    let prefetch = match root.obj("fs_prefetch")? {
        Some(p) => parse_prefetch(&p, true)?,
        None => PrefetchConfig {
            prefetch_all: true,
            ..Default::default()
        },
    };
    let rafs = RafsConfig {
        mode,
        validate: root.bool("digest_validate", false)?,
        enable_xattr: root.bool("enable_xattr", false)?,
        iostats_files: root.bool("iostats_files", false)?,
        access_pattern: root.bool("access_pattern", false)?,
        latest_read_files: root.bool("latest_read_files", false)?,
        amplify_io: checked_amplify(root.u64("amplify_io", 1 << 20)?, "amplify_io")?,
        prefetch,
        id_mapping: parse_id_mapping(root.get("id_mapping"), "id_mapping")?,
    };
    let config = DaemonConfig {
        id,
        backend,
        cache,
        rafs,
    };
    check_cache(&config, "device.cache.config.work_dir")?;
    Ok(config)
}

fn parse_v2(root: &Obj) -> Result<DaemonConfig> {
    let id = root.string("id")?;
    let backend_obj = root
        .obj("backend")?
        .ok_or_else(|| invalid("backend".into(), "missing"))?;
    let kind = backend_obj
        .string("type")?
        .ok_or_else(|| invalid("backend.type".into(), "missing"))?;
    let sub_key: &'static str = match kind.as_str() {
        "localfs" => "localfs",
        "registry" => "registry",
        "oss" => "oss",
        "s3" => "s3",
        "http-proxy" => "http-proxy",
        "localdisk" => "localdisk",
        other => {
            return Err(invalid(
                "backend.type".into(),
                &format!("unknown backend type {other:?}"),
            ))
        }
    };
    let backend = parse_backend(
        &kind,
        backend_obj.obj(sub_key)?,
        &format!("backend.{sub_key}"),
    )?;
    backend_obj.finish();
    let (cache, cache_prefetch) = match root.obj("cache")? {
        Some(c) => {
            let kind = parse_cache_kind(c.string("type")?, c.key_path("type"))?;
            let work_dir = match c.obj("filecache")? {
                Some(f) => {
                    let w = f.string("work_dir")?.map(PathBuf::from);
                    f.get("disable_indexed_map");
                    if f.bool("enable_encryption", false)? {
                        return Err(Error::Unsupported(
                            "encrypted blob cache (cache.filecache.enable_encryption)".into(),
                        ));
                    }
                    f.finish();
                    w
                }
                None => None,
            };
            c.get("fscache");
            let prefetch = c
                .obj("prefetch")?
                .map(|p| parse_prefetch(&p, false))
                .transpose()?;
            let cache = CacheConfig {
                kind,
                work_dir,
                validate: c.bool("validate", false)?,
                compressed: c.bool("compressed", false)?,
            };
            c.finish();
            (cache, prefetch)
        }
        None => (
            CacheConfig {
                kind: CacheKind::None,
                work_dir: None,
                validate: false,
                compressed: false,
            },
            None,
        ),
    };
    let mut rafs = RafsConfig::default();
    if let Some(r) = root.obj("rafs")? {
        rafs.mode = r.string("mode")?.unwrap_or_else(|| "direct".into());
        if rafs.mode != "direct" && rafs.mode != "cached" {
            return Err(invalid(
                "rafs.mode".into(),
                &format!("{:?} (expected \"direct\" or \"cached\")", rafs.mode),
            ));
        }
        rafs.validate = r.bool("validate", false)?;
        rafs.enable_xattr = r.bool("enable_xattr", false)?;
        rafs.iostats_files = r.bool("iostats_files", false)?;
        rafs.access_pattern = r.bool("access_pattern", false)?;
        rafs.latest_read_files = r.bool("latest_read_files", false)?;
        rafs.amplify_io = checked_amplify(r.u64("batch_size", 1 << 20)?, "rafs.batch_size")?;
        if let Some(p) = r.obj("prefetch")? {
            rafs.prefetch = parse_prefetch(&p, false)?;
        }
        rafs.id_mapping = parse_id_mapping(r.get("id_mapping"), "rafs.id_mapping")?;
        r.finish();
    }
    // Either prefetch block turns prefetch on; the fs-level one wins where both are given.
    if !rafs.prefetch.enable {
        if let Some(p) = cache_prefetch {
            rafs.prefetch = p;
        }
    }
    root.get("version");
    root.get("external_backends");
    root.get("overlay");
    root.get("metadata_path");
    let config = DaemonConfig {
        id,
        backend,
        cache,
        rafs,
    };
    check_cache(&config, "cache.filecache.work_dir")?;
    Ok(config)
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
        return Err(type_error(
            key,
            "[internal, external, range] (three 32-bit IDs)",
            v,
        ));
    };
    if range == 0 {
        return Ok(None);
    }
    if internal.checked_add(range).is_none() || external.checked_add(range).is_none() {
        return Err(invalid(
            key.into(),
            "internal + range and external + range must stay below 2^32",
        ));
    }
    Ok(Some(IdMapping {
        internal,
        external,
        range,
    }))
}

fn checked_amplify(v: u64, key: &str) -> Result<u64> {
    if v > 0x1000_0000 {
        return Err(invalid(key.into(), "must be at most 256 MiB"));
    }
    Ok(v)
}

fn check_cache(config: &DaemonConfig, work_dir_key: &str) -> Result<()> {
    if config.cache.kind == CacheKind::BlobCache && config.cache.work_dir.is_none() {
        return Err(invalid(work_dir_key.into(), "a blobcache needs a work_dir"));
    }
    Ok(())
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
            BackendConfig::LocalFs {
                dir: Some("/b".into()),
                alt_dirs: vec![],
                blob_file: None
            }
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
            BackendConfig::LocalFs { alt_dirs, .. } => {
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
        match c.backend {
            BackendConfig::Remote { kind, config } => {
                assert_eq!(kind, "registry");
                assert_eq!(config["host"], "h:5000");
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
        let BackendConfig::Remote { config, .. } = c.backend else {
            panic!("remote")
        };
        assert_eq!(config["auth"], "bmV3OnB3");
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
}
