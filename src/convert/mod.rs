//! `rafsd convert`: turn an OCI/Docker image in a registry into a Nydus image in a registry, laid out
//! as nydus-snapshotter and Kata read it, the way `nydusify convert` does.
//!
//! For each selected platform: the source manifest and config are fetched, then every layer is
//! streamed from the registry (never held whole: a reader thread feeds 1 MiB buffers through a bounded
//! channel into the decompressor and the builder) and built into one standalone RAFS layer with its
//! whiteouts kept, its chunks deduplicated against the layers below (`chunk_dict`). The layer
//! bootstraps are merged into the image's bootstrap, which goes into a tar.gz holding
//! `image/image.boot`. Only when every platform has been built are the data blobs pushed (each skipped
//! when the target repository has it), then the bootstrap layer, the config (its `rootfs.diff_ids`
//! rewritten) and the manifest; a failure before that leaves the target repository untouched.
//!
//! Data blobs are named by their sha256, which is the blob id in the bootstrap, so the registry
//! backend of `rafsd fuse`/`virtiofs` finds them by digest in the target repository. Converted layers
//! are remembered in a local cache ([`cache`]), so converting the same source again pulls, builds and
//! pushes nothing it already did.

pub mod cache;
pub mod cli;
pub mod mount;
pub mod oci;
pub mod progress;

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use crate::builder::{self, BuildOptions, WhiteoutSpec};
use crate::error::{Error, Result};
use crate::storage::distribution::{
    sha256_digest, Client, Fetched, NetOptions, Payload, Reference,
};
use oci::{Descriptor, Document, LayerCompression, Manifest, Platform};

/// Largest image config accepted.
const CONFIG_LIMIT: u64 = 16 << 20;
/// Size of the buffers the layer reader thread hands over, and how many may wait.
const STREAM_BUFFER: usize = 1 << 20;
const STREAM_DEPTH: usize = 8;

/// With `--max-layer-ratio N`, a layer may decode to at most N times its compressed size plus this.
/// Off by default: genuine layers reach any ratio (zstd turns a 1 GiB file of zeros, a preallocated
/// disk or database file, into 33 KB; gzip reaches 1028:1), while a bomb of distinct blocks that the
/// builder cannot deduplicate reaches 11,000:1, so no ratio tells them apart; it bounds what an
/// untrusted source can make the build do per byte it sends.
const EXPANSION_SLACK: u64 = 64 << 20;

/// The most a layer of `compressed` bytes may decode to: `max`, and `ratio` times `compressed` plus
/// [`EXPANSION_SLACK`] when `ratio` is not 0.
pub(crate) fn decoded_limit(compressed: u64, max: u64, ratio: u64) -> u64 {
    match ratio {
        0 => max,
        r => compressed
            .saturating_mul(r)
            .saturating_add(EXPANSION_SLACK)
            .min(max),
    }
}

/// A decoded layer that fails once more than `limit` bytes came out of it.
pub(crate) struct DecodeLimit<R> {
    inner: R,
    left: u64,
    limit: u64,
    exceeded: bool,
}

impl<R: Read> DecodeLimit<R> {
    pub(crate) fn new(inner: R, limit: u64) -> Self {
        DecodeLimit {
            inner,
            left: limit,
            limit,
            exceeded: false,
        }
    }

    /// The error to report instead of whatever the reader's failure became, if the limit was the
    /// cause.
    pub(crate) fn refusal(&self, what: &str, compressed: u64) -> Option<Error> {
        self.exceeded.then(|| {
            Error::Invalid(format!(
                "{what}: decodes to more than {} bytes, the limit for a layer of {compressed} \
                 compressed bytes (--max-layer-size, and --max-layer-ratio when given)",
                self.limit
            ))
        })
    }
}

impl<R: Read> Read for DecodeLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            self.exceeded = true;
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("decodes to more than {} bytes", self.limit),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub source: Reference,
    pub target: Reference,
    /// fs version, chunk size, compressor, digester, prefetch files, threads.
    pub build: BuildOptions,
    /// Platforms to convert from an index; empty: this machine's.
    pub platforms: Vec<Platform>,
    /// Push an index holding the source manifests beside the Nydus ones.
    pub merge_platform: bool,
    pub net: NetOptions,
    /// Where layers are built (a temporary directory inside it, removed at the end).
    pub work_dir: PathBuf,
    /// The layer cache; `None` converts everything again.
    pub cache_dir: Option<PathBuf>,
    /// The most a source layer may decode to.
    pub max_layer_size: u64,
    /// With a value other than 0, the most a layer may decode to per compressed byte (plus 64 MiB).
    pub max_layer_ratio: u64,
}

#[derive(Debug, Default, Clone)]
pub struct ConvertReport {
    /// What the target tag points at (a manifest, or an index).
    pub target_digest: String,
    /// Platform and digest of each Nydus manifest pushed.
    pub manifests: Vec<(Platform, String)>,
    pub layers_built: usize,
    pub layers_cached: usize,
    /// Compressed size of the source layers of the converted images.
    pub source_bytes: u64,
    pub bytes_pulled: u64,
    pub blobs_pushed: u64,
    pub bytes_pushed: u64,
    /// Blobs the target already had.
    pub blobs_present: u64,
}

/// One platform's image, built and ready to push.
struct Built {
    platform: Platform,
    /// The source manifest as fetched, and its descriptor in the source (index entry or top level).
    source: Fetched,
    source_desc: Descriptor,
    source_manifest: Manifest,
    /// Data blobs in the bootstrap's order, with the local file when it has to be pushed.
    blobs: Vec<(Descriptor, Option<PathBuf>)>,
    bootstrap_layer: (Descriptor, PathBuf),
    config: (Descriptor, Vec<u8>),
    manifest: Vec<u8>,
    digest: String,
    /// Cache entries to record once the image is pushed.
    cache_entries: Vec<(String, cache::Record, PathBuf)>,
}

/// A temporary directory removed when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new(parent: &Path) -> Result<Self> {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("create work dir {}", parent.display()), e))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = parent.join(format!("rafsd-convert-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir)
            .map_err(|e| Error::io(format!("create work dir {}", dir.display()), e))?;
        Ok(WorkDir(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn convert(opts: &ConvertOptions) -> Result<ConvertReport> {
    if opts.target.digest.is_some() {
        return Err(Error::Invalid(format!(
            "target {}: give a tag, not a digest (the manifest's digest is only known once it is built)",
            opts.target
        )));
    }
    let src = Client::new(&opts.source, &opts.net)?;
    let dst = Client::new(&opts.target, &opts.net)?;
    let work = WorkDir::new(&opts.work_dir)?;
    let cache = opts
        .cache_dir
        .as_deref()
        .map(cache::LayerCache::open)
        .transpose()?;
    let selected = select_images(&src, opts)?;

    let mut report = ConvertReport::default();
    // Build every platform before pushing anything: a bad layer leaves the target untouched.
    let mut built = Vec::new();
    for (i, (desc, fetched)) in selected.into_iter().enumerate() {
        let dir = work.0.join(format!("image-{i}"));
        built.push(build_image(
            &src,
            &dst,
            cache.as_ref(),
            &dir,
            desc,
            fetched,
            opts,
            &mut report,
        )?);
    }

    for b in &built {
        push_image(&dst, b)?;
    }
    report.target_digest = push_manifests(&src, &dst, opts, &built, &work.0)?;
    for b in &built {
        report
            .manifests
            .push((b.platform.clone(), b.digest.clone()));
        if let Some(cache) = &cache {
            for (key, record, bootstrap) in &b.cache_entries {
                if let Err(e) = cache.put(key, record, bootstrap) {
                    log::warn!("layer cache: {e}");
                }
            }
        }
    }
    report.bytes_pulled = src.counters.bytes_pulled.load(Ordering::Relaxed)
        + dst.counters.bytes_pulled.load(Ordering::Relaxed);
    report.blobs_pushed = dst.counters.blobs_pushed.load(Ordering::Relaxed);
    report.bytes_pushed = dst.counters.bytes_pushed.load(Ordering::Relaxed);
    report.blobs_present = dst.counters.blobs_present.load(Ordering::Relaxed);
    Ok(report)
}

/// The source images to convert: the index entries of the requested platforms (this machine's when none
/// is), or the one image the source reference names, with its manifest already fetched.
fn select_images(
    src: &Client,
    opts: &ConvertOptions,
) -> Result<Vec<(Descriptor, Option<Fetched>)>> {
    let top = src.manifest(opts.source.reference(), &oci::ACCEPT)?;
    let shown = opts.source.to_string();
    let platforms = match opts.platforms.is_empty() {
        true => vec![Platform::host()],
        false => opts.platforms.clone(),
    };
    Ok(
        match oci::parse_document(&top.media_type, &top.bytes, &shown)? {
            Document::Index(index) => select_platforms(&index, &platforms, &shown)?
                .into_iter()
                .map(|d| (d, None))
                .collect(),
            Document::Manifest(_) => {
                let desc = Descriptor {
                    media_type: top.media_type.clone(),
                    digest: top.digest.clone(),
                    size: top.bytes.len() as u64,
                    ..Default::default()
                };
                vec![(desc, Some(top))]
            }
        },
    )
}

/// Put the built images' manifests into the target: under the target tag when there is one image (and
/// no `merge_platform`), else by digest with an index under the tag (listing the source manifests too
/// with `merge_platform`). Returns what the tag points at.
fn push_manifests(
    src: &Client,
    dst: &Client,
    opts: &ConvertOptions,
    built: &[Built],
    work: &Path,
) -> Result<String> {
    let target_ref = opts.target.reference();
    if built.len() == 1 && !opts.merge_platform {
        let b = &built[0];
        dst.put_manifest(target_ref, oci::OCI_MANIFEST, &b.manifest)?;
        return Ok(b.digest.clone());
    }
    let mut entries = Vec::new();
    for b in built {
        dst.put_manifest(&b.digest, oci::OCI_MANIFEST, &b.manifest)?;
        if opts.merge_platform {
            copy_source_image(src, dst, opts, b, work)?;
            entries.push(Descriptor {
                platform: Some(b.platform.clone()),
                ..b.source_desc.clone()
            });
        }
        let mut platform = b.platform.clone();
        platform.os_features.push(oci::OS_FEATURE_NYDUS.into());
        entries.push(Descriptor {
            media_type: oci::OCI_MANIFEST.into(),
            digest: b.digest.clone(),
            size: b.manifest.len() as u64,
            platform: Some(platform),
            ..Default::default()
        });
    }
    let index = oci::Index {
        schema_version: 2,
        media_type: oci::OCI_INDEX.into(),
        manifests: entries,
        annotations: Default::default(),
    };
    let bytes = serde_json::to_vec(&index).map_err(|e| Error::Invalid(e.to_string()))?;
    dst.put_manifest(target_ref, oci::OCI_INDEX, &bytes)?;
    Ok(sha256_digest(&bytes))
}

/// The index entries for the requested platforms, each found once.
fn select_platforms(
    index: &oci::Index,
    platforms: &[Platform],
    shown: &str,
) -> Result<Vec<Descriptor>> {
    let mut out: Vec<Descriptor> = Vec::new();
    for want in platforms {
        let found = index.manifests.iter().find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| want.matches(p) && !p.is_nydus())
                && matches!(
                    d.media_type.as_str(),
                    oci::OCI_MANIFEST | oci::DOCKER_MANIFEST
                )
        });
        match found {
            Some(d) if !out.iter().any(|o| o.digest == d.digest) => out.push(d.clone()),
            Some(_) => {}
            None => {
                let have: Vec<String> = index
                    .manifests
                    .iter()
                    .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                    .collect();
                return Err(Error::NotFound(format!(
                    "{shown}: no image for platform {want} in the index (it has: {})",
                    have.join(", ")
                )));
            }
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn build_image(
    src: &Client,
    dst: &Client,
    cache: Option<&cache::LayerCache>,
    dir: &Path,
    source_desc: Descriptor,
    fetched: Option<Fetched>,
    opts: &ConvertOptions,
    report: &mut ConvertReport,
) -> Result<Built> {
    let shown = format!("{}@{}", opts.source.repo, source_desc.digest);
    let (fetched, manifest) = source_manifest(src, &source_desc, fetched, &shown)?;
    let mut config = source_config(src, &manifest, &shown)?;
    let platform = source_desc.platform.clone().unwrap_or_else(|| {
        let field = |k: &str| config.get(k).and_then(|v| v.as_str()).map(str::to_string);
        Platform {
            os: field("os").unwrap_or_else(|| "linux".into()),
            architecture: field("architecture").unwrap_or_default(),
            variant: field("variant"),
            ..Default::default()
        }
    });
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let layers = build_layers(src, dst, cache, dir, &manifest, &shown, opts, report)?;

    let merged = dir.join("image.boot");
    builder::merge_with_prefetch(
        &layers.bootstraps,
        &merged,
        WhiteoutSpec::Oci,
        &opts.build.prefetch_files,
    )?;
    let blob_layers = merged_blob_layers(&merged, dir, &layers.blobs)?;

    let layer_path = dir.join("bootstrap-layer.tar.gz");
    let (digest, size, diff_id) = write_bootstrap_layer(&merged, &layer_path)?;
    let bootstrap_desc = Descriptor {
        media_type: oci::OCI_LAYER_GZIP.into(),
        digest,
        size,
        annotations: BTreeMap::from([
            (oci::ANNOTATION_NYDUS_BOOTSTRAP.into(), "true".into()),
            (
                oci::ANNOTATION_FS_VERSION.into(),
                opts.build.fs_version.to_string(),
            ),
        ]),
        ..Default::default()
    };
    let (config_desc, config_bytes) = nydus_config(&mut config, &blob_layers, diff_id)?;
    let nydus = Manifest {
        schema_version: 2,
        media_type: oci::OCI_MANIFEST.into(),
        config: config_desc.clone(),
        layers: blob_layers
            .iter()
            .map(|(d, _)| d.clone())
            .chain(std::iter::once(bootstrap_desc.clone()))
            .collect(),
        annotations: Default::default(),
    };
    let manifest_bytes = serde_json::to_vec(&nydus).map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(Built {
        platform,
        source_desc: Descriptor {
            media_type: fetched.media_type.clone(),
            ..source_desc
        },
        source: fetched,
        source_manifest: manifest,
        blobs: blob_layers,
        bootstrap_layer: (bootstrap_desc, layer_path),
        config: (config_desc, config_bytes),
        digest: sha256_digest(&manifest_bytes),
        manifest: manifest_bytes,
        cache_entries: layers.cache_entries,
    })
}

/// The source image's manifest (fetched unless the caller has it): one image with layers, not an index
/// and not a Nydus image already.
fn source_manifest(
    src: &Client,
    source_desc: &Descriptor,
    fetched: Option<Fetched>,
    shown: &str,
) -> Result<(Fetched, Manifest)> {
    let fetched = match fetched {
        Some(f) => f,
        None => src.manifest(&source_desc.digest, &oci::ACCEPT)?,
    };
    let manifest = match oci::parse_document(&fetched.media_type, &fetched.bytes, shown)? {
        Document::Manifest(m) => *m,
        Document::Index(_) => {
            return Err(Error::Invalid(format!(
                "{shown}: an index inside an index is not supported"
            )))
        }
    };
    if manifest
        .layers
        .last()
        .is_some_and(|l| l.is_nydus_bootstrap())
    {
        return Err(Error::Invalid(format!(
            "{shown}: the source is already a Nydus image"
        )));
    }
    if manifest.layers.is_empty() {
        return Err(Error::Invalid(format!("{shown}: the image has no layers")));
    }
    Ok((fetched, manifest))
}

/// The source image's config, a JSON object of at most [`CONFIG_LIMIT`] bytes.
fn source_config(src: &Client, manifest: &Manifest, shown: &str) -> Result<serde_json::Value> {
    let config_bytes =
        src.fetch_blob(&manifest.config.digest, manifest.config.size, CONFIG_LIMIT)?;
    let config: serde_json::Value = serde_json::from_slice(&config_bytes)
        .map_err(|e| Error::Invalid(format!("{shown}: image config: {e}")))?;
    if !config.is_object() {
        return Err(Error::Invalid(format!(
            "{shown}: the image config is not a JSON object"
        )));
    }
    Ok(config)
}

/// The layers of one image, converted (or found in the layer cache) lowest first.
#[derive(Default)]
struct Layers {
    bootstraps: Vec<PathBuf>,
    /// Blob id → (size, source layer digest, local file to push).
    blobs: BTreeMap<String, (u64, String, Option<PathBuf>)>,
    /// Cache entries to record once the image is pushed.
    cache_entries: Vec<(String, cache::Record, PathBuf)>,
}

/// Convert every layer of `manifest` into a standalone RAFS layer in `dir`, deduplicated against the
/// layers below it; a layer the cache has (and whose blob the target has) is taken from the cache.
#[allow(clippy::too_many_arguments)]
fn build_layers(
    src: &Client,
    dst: &Client,
    cache: Option<&cache::LayerCache>,
    dir: &Path,
    manifest: &Manifest,
    shown: &str,
    opts: &ConvertOptions,
    report: &mut ConvertReport,
) -> Result<Layers> {
    let bopts = layer_build_options(&opts.build);
    let mut chain: Vec<String> = Vec::new();
    let mut layers = Layers::default();
    let count = manifest.layers.len();
    for (i, layer) in manifest.layers.iter().enumerate() {
        let what = format!("{shown}: layer {}/{count} {}", i + 1, layer.digest);
        let compression = oci::layer_compression(&layer.media_type)
            .map_err(|e| Error::Invalid(format!("{what}: {e}")))?;
        report.source_bytes += layer.size;
        chain.push(layer.digest.clone());
        let key = cache::layer_key(&chain, &bopts);
        if layers.reuse_cached(dst, cache, &key, layer, &what)? {
            report.layers_cached += 1;
            continue;
        }
        let layer_dir = dir.join(format!("layer-{i}"));
        let bootstrap = layer_dir.join("bootstrap");
        let layer_opts = BuildOptions {
            chunk_dict: layers.bootstraps.clone(),
            ..bopts.clone()
        };
        log::info!("{what}: pulling and building ({} bytes)", layer.size);
        let label = format!("layer {}/{count}", i + 1);
        let built = pull_and_build(
            src,
            layer,
            compression,
            &label,
            &bootstrap,
            &layer_dir.join("blobs"),
            &layer_opts,
            (opts.max_layer_size, opts.max_layer_ratio),
        )
        .map_err(|e| match e {
            Error::Invalid(m) if !m.contains(&layer.digest) => {
                Error::Invalid(format!("{what}: {m}"))
            }
            e => e,
        })?;
        let c = &built.chunks;
        log::info!(
            "{what}: {} chunks, {} bytes written; {} chunks deduplicated",
            c.chunks_written,
            c.bytes_written,
            c.chunks_deduped
        );
        let blob = match (&built.blob_id, &built.blob_path) {
            (Some(id), Some(path)) => {
                layers.blobs.insert(
                    id.clone(),
                    (built.blob_size, layer.digest.clone(), Some(path.clone())),
                );
                Some(cache::BlobRecord {
                    digest: format!("sha256:{id}"),
                    size: built.blob_size,
                })
            }
            _ => None,
        };
        layers.cache_entries.push((
            key,
            cache::Record {
                source_digest: layer.digest.clone(),
                blob,
            },
            bootstrap.clone(),
        ));
        layers.bootstraps.push(bootstrap);
        report.layers_built += 1;
    }
    Ok(layers)
}

/// What every layer is built with: the image's options, as standalone layers (no parent, no inline
/// metadata).
fn layer_build_options(build: &BuildOptions) -> BuildOptions {
    BuildOptions {
        parent_bootstrap: None,
        chunk_dict: Vec::new(),
        // Whiteouts stay entries of their layer; the merge applies them.
        whiteout_spec: WhiteoutSpec::Oci,
        repeatable: false,
        blob_inline_meta: false,
        ..build.clone()
    }
}

impl Layers {
    /// Take `layer` from the layer cache when it was converted before from the same source and the
    /// target still has its blob; false when it has to be built.
    fn reuse_cached(
        &mut self,
        dst: &Client,
        cache: Option<&cache::LayerCache>,
        key: &str,
        layer: &Descriptor,
        what: &str,
    ) -> Result<bool> {
        let Some((record, bootstrap)) = cache.and_then(|c| c.get(key)) else {
            return Ok(false);
        };
        let present = match &record.blob {
            None => true,
            Some(b) => dst.blob_size(&b.digest)?.is_some(),
        };
        if !(present && record.source_digest == layer.digest) {
            return Ok(false);
        }
        log::info!("{what}: converted before (cache), skipped");
        if let Some(b) = &record.blob {
            let id = crate::storage::distribution::check_digest(&b.digest)?.to_string();
            self.blobs.insert(id, (b.size, layer.digest.clone(), None));
        }
        self.bootstraps.push(bootstrap);
        Ok(true)
    }
}

/// The data layers of the merged bootstrap `merged`, in its blob table's order (which names them), with
/// the local file of each blob that has to be pushed.
fn merged_blob_layers(
    merged: &Path,
    dir: &Path,
    blobs: &BTreeMap<String, (u64, String, Option<PathBuf>)>,
) -> Result<Vec<(Descriptor, Option<PathBuf>)>> {
    let image = crate::RafsImage::open(
        merged,
        Arc::new(crate::storage::localfs::LocalFs::with_dir(
            dir.to_path_buf(),
        )),
        crate::ImageOptions::default(),
    )?;
    let mut blob_layers = Vec::new();
    for info in &image.info().blobs {
        let (size, source, path) = blobs.get(&info.id).cloned().ok_or_else(|| {
            Error::Invalid(format!(
                "internal error: the merged bootstrap names blob {} that no layer produced",
                info.id
            ))
        })?;
        let desc = Descriptor {
            media_type: oci::NYDUS_BLOB.into(),
            digest: format!("sha256:{}", info.id),
            size,
            annotations: BTreeMap::from([
                (oci::ANNOTATION_NYDUS_BLOB.into(), "true".into()),
                (oci::ANNOTATION_SOURCE_DIGEST.into(), source),
            ]),
            ..Default::default()
        };
        blob_layers.push((desc, path));
    }
    drop(image);
    Ok(blob_layers)
}

/// The Nydus image's config: the source's, its `rootfs.diff_ids` following the new layers and a
/// history entry for the bootstrap layer. Returns its descriptor and bytes.
fn nydus_config(
    config: &mut serde_json::Value,
    blob_layers: &[(Descriptor, Option<PathBuf>)],
    diff_id: String,
) -> Result<(Descriptor, Vec<u8>)> {
    // The config's diff_ids follow the new layers: a data blob is its own uncompressed form.
    let diff_ids: Vec<serde_json::Value> = blob_layers
        .iter()
        .map(|(d, _)| d.digest.clone().into())
        .chain(std::iter::once(diff_id.into()))
        .collect();
    let obj = config.as_object_mut().expect("checked above");
    obj.insert(
        "rootfs".into(),
        serde_json::json!({"type": "layers", "diff_ids": diff_ids}),
    );
    let mut history = match obj.remove("history") {
        Some(serde_json::Value::Array(h)) => h,
        _ => Vec::new(),
    };
    history.push(serde_json::json!({
        "created_by": "rafsd convert",
        "comment": "Nydus Bootstrap Layer"
    }));
    obj.insert("history".into(), history.into());
    let config_bytes = serde_json::to_vec(&config).map_err(|e| Error::Invalid(e.to_string()))?;
    let config_desc = Descriptor {
        media_type: oci::OCI_CONFIG.into(),
        digest: sha256_digest(&config_bytes),
        size: config_bytes.len() as u64,
        ..Default::default()
    };
    Ok((config_desc, config_bytes))
}

/// Reads the buffers a reader thread sends.
struct ChannelReader {
    rx: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(Ok(buf)) => {
                    self.buf = buf;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                // The sender is done: the end of the blob.
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Read until `buf` is full or the stream ends.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Stream one source layer from the registry into the builder. The download runs on its own thread
/// ahead of the decompression and the tar parsing, by at most `STREAM_DEPTH` buffers.
#[allow(clippy::too_many_arguments)]
fn pull_and_build(
    src: &Client,
    layer: &Descriptor,
    compression: LayerCompression,
    label: &str,
    bootstrap: &Path,
    blob_dir: &Path,
    opts: &BuildOptions,
    (max_layer_size, max_layer_ratio): (u64, u64),
) -> Result<builder::BuildReport> {
    let stream = src.open_blob(&layer.digest, layer.size)?;
    let name = PathBuf::from(format!("layer {}", layer.digest));
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::sync_channel(STREAM_DEPTH);
        let mut progress = progress::Progress::new(stream, label.to_string(), layer.size);
        s.spawn(move || loop {
            let mut buf = vec![0u8; STREAM_BUFFER];
            match read_full(&mut progress, &mut buf) {
                Ok(0) => {
                    progress.finish();
                    return;
                }
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send(Ok(buf)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        });
        let mut reader = ChannelReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        };
        let report = {
            let decoded: Box<dyn Read + '_> = match compression {
                LayerCompression::None => Box::new(&mut reader),
                LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(
                    BufReader::with_capacity(1 << 16, &mut reader),
                )),
                LayerCompression::Zstd => Box::new(
                    zstd::stream::read::Decoder::new(&mut reader)
                        .map_err(|e| Error::io(format!("{}: zstd", name.display()), e))?,
                ),
            };
            let mut decoded = DecodeLimit::new(
                decoded,
                decoded_limit(layer.size, max_layer_size, max_layer_ratio),
            );
            let built =
                builder::build_tar_stream(&mut decoded, &name, Some(bootstrap), blob_dir, opts);
            if let Some(e) = decoded.refusal(&name.display().to_string(), layer.size) {
                return Err(e);
            }
            built?
        };
        // The tar ends before the blob does (padding, the compressor's trailer): read the rest, so the
        // blob's digest is checked.
        std::io::copy(&mut reader, &mut std::io::sink())
            .map_err(|e| Error::Invalid(format!("{}: {e}", name.display())))?;
        Ok(report)
    })
}

/// Hashes what passes through.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The bootstrap layer as nydus-snapshotter unpacks it: a gzip tar of a 0755 `image` directory and
/// `image/image.boot` (0444), every header with mtime 0 and owner 0, so the same bootstrap always gives
/// the same layer. Returns (digest, size, diff id).
fn write_bootstrap_layer(bootstrap: &Path, out: &Path) -> Result<(String, u64, String)> {
    let io = |what: &str, e| Error::io(format!("{what} {}", out.display()), e);
    let file = std::fs::File::create(out).map_err(|e| io("create", e))?;
    let compressed = Hashing {
        inner: std::io::BufWriter::new(file),
        hash: Sha256::new(),
    };
    let gz = flate2::write::GzEncoder::new(compressed, flate2::Compression::default());
    let mut tar = ::tar::Builder::new(Hashing {
        inner: gz,
        hash: Sha256::new(),
    });
    let mut source = std::fs::File::open(bootstrap)
        .map_err(|e| Error::io(format!("open {}", bootstrap.display()), e))?;
    let size = source
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", bootstrap.display()), e))?
        .len();
    let header = |path: &str, kind: ::tar::EntryType, mode: u32, size: u64| {
        let mut h = ::tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        (h, path.to_string())
    };
    let (mut h, p) = header(
        oci::BOOTSTRAP_DIR_IN_LAYER,
        ::tar::EntryType::Directory,
        0o755,
        0,
    );
    tar.append_data(&mut h, p, std::io::empty())
        .map_err(|e| io("write", e))?;
    let (mut h, p) = header(
        oci::BOOTSTRAP_IN_LAYER,
        ::tar::EntryType::Regular,
        0o444,
        size,
    );
    tar.append_data(&mut h, p, &mut source)
        .map_err(|e| io("write", e))?;
    let tar_out = tar.into_inner().map_err(|e| io("write", e))?;
    let diff_id = format!(
        "sha256:{}",
        crate::storage::digest::hex(&tar_out.hash.finalize())
    );
    let mut compressed = tar_out.inner.finish().map_err(|e| io("write", e))?;
    compressed.flush().map_err(|e| io("write", e))?;
    let digest = format!(
        "sha256:{}",
        crate::storage::digest::hex(&compressed.hash.finalize())
    );
    let size = std::fs::metadata(out).map_err(|e| io("stat", e))?.len();
    Ok((digest, size, diff_id))
}

/// Push the data blobs, the bootstrap layer and the config (the manifest goes last, by the caller).
fn push_image(dst: &Client, b: &Built) -> Result<()> {
    for (desc, path) in &b.blobs {
        match path {
            Some(p) => {
                dst.push_blob(&desc.digest, desc.size, Payload::File(p))?;
            }
            // A cached layer: the target had its blob when the cache was consulted.
            None => {
                if dst.blob_size(&desc.digest)?.is_none() {
                    return Err(Error::NotFound(format!(
                        "blob {} left the target repository during the conversion; convert again",
                        desc.digest
                    )));
                }
                dst.counters.blobs_present.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let (desc, path) = &b.bootstrap_layer;
    dst.push_blob(&desc.digest, desc.size, Payload::File(path))?;
    let (desc, bytes) = &b.config;
    dst.push_blob(&desc.digest, desc.size, Payload::Bytes(bytes))?;
    Ok(())
}

/// Put the source image (config, layers, manifest) into the target repository for `--merge-platform`:
/// nothing to do in the same repository, a cross-repository mount on the same registry, else a copy
/// through a temporary file.
fn copy_source_image(
    src: &Client,
    dst: &Client,
    opts: &ConvertOptions,
    b: &Built,
    work: &Path,
) -> Result<()> {
    let same_registry = src.base() == dst.base();
    if same_registry && opts.source.repo == opts.target.repo {
        return Ok(());
    }
    let m = &b.source_manifest;
    for desc in std::iter::once(&m.config).chain(&m.layers) {
        if dst.blob_size(&desc.digest)?.is_some() {
            continue;
        }
        if same_registry && dst.mount_blob(&desc.digest, &opts.source.repo)? {
            continue;
        }
        let tmp = work.join("copy.blob");
        let mut file = std::fs::File::create(&tmp)
            .map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
        let stream = src.open_blob(&desc.digest, desc.size)?;
        let mut progress = progress::Progress::new(stream, "copy".into(), desc.size);
        std::io::copy(&mut progress, &mut file)
            .map_err(|e| Error::io(format!("copy blob {}", desc.digest), e))?;
        progress.finish();
        dst.push_blob(&desc.digest, desc.size, Payload::File(&tmp))?;
        let _ = std::fs::remove_file(&tmp);
    }
    dst.put_manifest(&b.source.digest, &b.source.media_type, &b.source.bytes)
}
