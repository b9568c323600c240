//! `rafsd mount-image`: find a Nydus image's bootstrap in a registry, fetch just that layer, and write
//! the daemon config that serves the image lazily through the `registry` backend from the same
//! repository (blob cache beside it, chunk digests verified). The command then runs `rafsd fuse`.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::oci::{self, Descriptor, Document, LayerCompression, Platform};
use super::{decoded_limit, DecodeLimit};
use crate::builder::tar_stream::TarStream;
use crate::error::{Error, Result};
use crate::storage::distribution::{check_digest, Client, NetOptions, Reference};

/// Largest bootstrap layer (compressed) and bootstrap (uncompressed) accepted.
const BOOTSTRAP_LIMIT: u64 = 1 << 30;
/// The most a bootstrap layer may decode to: the bootstrap, its directory and their headers.
const BOOTSTRAP_LAYER_LIMIT: u64 = BOOTSTRAP_LIMIT + (1 << 20);

pub struct Prepared {
    pub bootstrap: PathBuf,
    pub config: PathBuf,
    /// The Nydus manifest's digest.
    pub digest: String,
}

/// The Nydus manifest of `reference` for `platform` (an index entry marked with the Nydus os.feature,
/// or a manifest whose last layer is a Nydus bootstrap) and its digest.
fn nydus_manifest(
    client: &Client,
    reference: &Reference,
    platform: &Platform,
) -> Result<(oci::Manifest, String)> {
    let shown = reference.to_string();
    let top = client.manifest(reference.reference(), &oci::ACCEPT)?;
    let (manifest, digest) = match oci::parse_document(&top.media_type, &top.bytes, &shown)? {
        Document::Manifest(m) => (*m, top.digest),
        Document::Index(index) => {
            let entry = index
                .manifests
                .iter()
                .find(|d| {
                    d.platform
                        .as_ref()
                        .is_some_and(|p| p.is_nydus() && platform.matches(p))
                })
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "{shown}: the index has no Nydus manifest for {platform} (platform os.features {})",
                        oci::OS_FEATURE_NYDUS
                    ))
                })?;
            let m = client.manifest(&entry.digest, &oci::ACCEPT)?;
            match oci::parse_document(&m.media_type, &m.bytes, &shown)? {
                Document::Manifest(manifest) => (*manifest, m.digest),
                Document::Index(_) => return Err(Error::Invalid(format!("{shown}: nested index"))),
            }
        }
    };
    if !manifest
        .layers
        .last()
        .is_some_and(Descriptor::is_nydus_bootstrap)
    {
        return Err(Error::Invalid(format!(
            "{shown}: not a Nydus image (its last layer is not annotated {}); convert it with `rafsd convert`",
            oci::ANNOTATION_NYDUS_BOOTSTRAP
        )));
    }
    Ok((manifest, digest))
}

/// Stream the bootstrap layer and write its `image/image.boot` to `out` (through a temporary file).
/// The layer's digest is checked before `out` appears.
pub fn fetch_bootstrap(client: &Client, layer: &Descriptor, out: &Path) -> Result<()> {
    let what = format!("bootstrap layer {}", layer.digest);
    if layer.size > BOOTSTRAP_LIMIT {
        return Err(Error::Invalid(format!(
            "{what}: {} bytes is too large",
            layer.size
        )));
    }
    let mut stream = client.open_blob(&layer.digest, layer.size)?;
    let tmp = out.with_extension("boot.tmp");
    let found = {
        let decoded: Box<dyn Read + '_> = match oci::layer_compression(&layer.media_type)? {
            LayerCompression::None => Box::new(&mut stream),
            LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&mut stream)),
            LayerCompression::Zstd => Box::new(
                zstd::stream::read::Decoder::new(&mut stream)
                    .map_err(|e| Error::io(format!("{what}: zstd"), e))?,
            ),
        };
        let mut decoded =
            DecodeLimit::new(decoded, decoded_limit(layer.size, BOOTSTRAP_LAYER_LIMIT, 0));
        let found = extract_bootstrap(&mut decoded, &what, &tmp);
        if let Some(e) = decoded.refusal(&what, layer.size) {
            return Err(e);
        }
        found?
    };
    // The rest of the layer, so its digest is checked.
    std::io::copy(&mut stream, &mut std::io::sink())
        .map_err(|e| Error::io(format!("{what}: read"), e))?;
    if !found {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Invalid(format!(
            "{what}: no {} in the layer",
            oci::BOOTSTRAP_IN_LAYER
        )));
    }
    std::fs::rename(&tmp, out)
        .map_err(|e| Error::io(format!("rename {} to {}", tmp.display(), out.display()), e))
}

/// Write the `image/image.boot` of the decoded bootstrap layer to `tmp`; false if it has none.
fn extract_bootstrap(decoded: &mut dyn Read, what: &str, tmp: &Path) -> Result<bool> {
    let broken = |e: std::io::Error| Error::Invalid(format!("{what}: broken tar: {e}"));
    // The builder's reader: long name and pax records are capped there.
    let mut archive = TarStream::new(decoded);
    while let Some(entry) = archive.next_entry().map_err(broken)? {
        let path = entry.path.strip_prefix(b"./").unwrap_or(&entry.path);
        if path != oci::BOOTSTRAP_IN_LAYER.as_bytes() {
            continue;
        }
        if entry.size > BOOTSTRAP_LIMIT {
            return Err(Error::Invalid(format!(
                "{what}: the bootstrap is too large"
            )));
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(tmp)
            .map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
        std::io::copy(&mut (&mut archive).take(BOOTSTRAP_LIMIT), &mut file)
            .map_err(|e| Error::io(format!("{what}: write {}", tmp.display()), e))?;
        return Ok(true);
    }
    Ok(false)
}

/// Fetch the bootstrap of `reference` into `<work_root>/<manifest digest>/image.boot` and write the
/// daemon config beside it (mode 0600: it may hold credentials).
pub fn prepare(
    reference: &Reference,
    platform: &Platform,
    net: &NetOptions,
    work_root: &Path,
) -> Result<Prepared> {
    let client = Client::new(reference, net)?;
    let (manifest, digest) = nydus_manifest(&client, reference, platform)?;
    let dir = work_root.join(check_digest(&digest)?);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let bootstrap = dir.join("image.boot");
    let layer = manifest.layers.last().expect("checked by nydus_manifest");
    fetch_bootstrap(&client, layer, &bootstrap)?;

    let credentials = crate::storage::credentials::lookup(&reference.registry)?;
    let mut backend = serde_json::json!({
        "scheme": if net.plain_http { "http" } else { "https" },
        "host": reference.api_host(),
        "repo": reference.repo,
        "skip_verify": net.insecure,
        "timeout": net.timeout.as_secs().max(1),
        "retry_limit": net.retry_limit,
    });
    if let Some(auth) = credentials {
        backend["auth"] = auth.into();
    }
    let config = serde_json::json!({
        "device": {
            "backend": {"type": "registry", "config": backend},
            "cache": {"type": "blobcache", "config": {"work_dir": dir.join("cache")}}
        },
        "mode": "direct",
        "digest_validate": true
    });
    let config_path = dir.join("config.json");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&config_path)
        .map_err(|e| Error::io(format!("create {}", config_path.display()), e))?;
    file.write_all(config.to_string().as_bytes())
        .map_err(|e| Error::io(format!("write {}", config_path.display()), e))?;
    Ok(Prepared {
        bootstrap,
        config: config_path,
        digest,
    })
}
