//! OCI and Docker image documents as `rafsd convert` reads and writes them, and the names nydus-snapshotter
//! looks for in a Nydus image (media types, annotations, the bootstrap's place in its layer).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// What `Accept` asks for: both manifest kinds and both index kinds (schema 1 is not accepted).
pub const ACCEPT: [&str; 4] = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

// Nydus names, from nydus-snapshotter pkg/converter/constant.go:10-25 (the same values as
// contrib/nydusify/pkg/utils/constant.go).
/// A Nydus data blob layer.
pub const NYDUS_BLOB: &str = "application/vnd.oci.image.layer.nydus.blob.v1";
pub const ANNOTATION_NYDUS_BLOB: &str = "containerd.io/snapshot/nydus-blob";
pub const ANNOTATION_NYDUS_BOOTSTRAP: &str = "containerd.io/snapshot/nydus-bootstrap";
pub const ANNOTATION_FS_VERSION: &str = "containerd.io/snapshot/nydus-fs-version";
pub const ANNOTATION_SOURCE_DIGEST: &str = "containerd.io/snapshot/nydus-source-digest";
/// The platform `os.features` entry marking the Nydus manifest in an index (convert_unix.go
/// convertIndex appends it to each converted manifest).
pub const OS_FEATURE_NYDUS: &str = "nydus.remoteimage.v1";
/// The bootstrap's path inside the bootstrap layer (constant.go `BootstrapFileNameInLayer`), under a
/// 0755 `image` directory, mode 0444 (convert_unix.go packToTar).
pub const BOOTSTRAP_DIR_IN_LAYER: &str = "image";
pub const BOOTSTRAP_IN_LAYER: &str = "image/image.boot";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    #[serde(rename = "os.features", default, skip_serializing_if = "Vec::is_empty")]
    pub os_features: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = (2..=3).contains(&parts.len()) && parts.iter().all(|p| !p.is_empty());
        if !ok {
            return Err(Error::Invalid(format!(
                "platform {s:?}: expected os/arch[/variant], e.g. linux/amd64"
            )));
        }
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
            ..Default::default()
        })
    }

    /// The platform of this machine (`linux/amd64`, `linux/arm64`, ...).
    pub fn host() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: arch.into(),
            ..Default::default()
        }
    }

    /// Does an index entry's platform satisfy this requested one? A requested variant must match
    /// (arm64's `v8` is the default one); none requested matches any.
    pub fn matches(&self, other: &Platform) -> bool {
        let norm = |p: &Platform| match (p.architecture.as_str(), p.variant.as_deref()) {
            ("arm64", Some("v8")) => None,
            (_, v) => v.map(str::to_string),
        };
        self.os == other.os
            && self.architecture == other.architecture
            && (self.variant.is_none() || norm(self) == norm(other))
    }

    pub fn is_nydus(&self) -> bool {
        self.os_features.iter().any(|f| f == OS_FEATURE_NYDUS)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

impl Descriptor {
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }

    pub fn is_nydus_bootstrap(&self) -> bool {
        self.annotation(ANNOTATION_NYDUS_BOOTSTRAP) == Some("true")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A fetched top-level document.
#[derive(Debug)]
pub enum Document {
    Manifest(Box<Manifest>),
    Index(Index),
}

/// Parse a manifest or index; `media_type` is what the registry said it is.
pub fn parse_document(media_type: &str, bytes: &[u8], shown: &str) -> Result<Document> {
    let bad = |e: String| Error::Invalid(format!("{shown}: {e}"));
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    if v.get("schemaVersion").and_then(|s| s.as_u64()) == Some(1) {
        return Err(Error::Unsupported(format!(
            "{shown}: Docker schema 1 manifests are not supported; push the image again with a current client"
        )));
    }
    let is_index = match media_type {
        OCI_INDEX | DOCKER_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        _ => v.get("manifests").is_some(),
    };
    let doc = if is_index {
        Document::Index(
            serde_json::from_value(v).map_err(|e| bad(format!("not an image index: {e}")))?,
        )
    } else {
        Document::Manifest(Box::new(
            serde_json::from_value(v).map_err(|e| bad(format!("not an image manifest: {e}")))?,
        ))
    };
    let descriptors: Vec<&Descriptor> = match &doc {
        Document::Index(i) => i.manifests.iter().collect(),
        Document::Manifest(m) => std::iter::once(&m.config).chain(&m.layers).collect(),
    };
    for d in descriptors {
        crate::storage::distribution::check_digest(&d.digest)
            .map_err(|e| bad(format!("descriptor: {e}")))?;
    }
    Ok(doc)
}

/// How a source layer's bytes are compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

pub fn layer_compression(media_type: &str) -> Result<LayerCompression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Ok(LayerCompression::None),
        OCI_LAYER_GZIP | "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            Ok(LayerCompression::Gzip)
        }
        "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(LayerCompression::Zstd),
        NYDUS_BLOB => Err(Error::Invalid(
            "the source is already a Nydus image (it has Nydus blob layers)".into(),
        )),
        other if other.contains("nondistributable") || other.contains("foreign") => {
            Err(Error::Unsupported(format!(
                "layer media type {other}: non-distributable layers are not converted"
            )))
        }
        other => Err(Error::Unsupported(format!(
            "layer media type {other:?} is not a tar layer (tar, tar+gzip or tar+zstd)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_match_with_and_without_variants() {
        let want = Platform::parse("linux/arm64").unwrap();
        let mut got = Platform::parse("linux/arm64/v8").unwrap();
        assert!(want.matches(&got));
        assert!(Platform::parse("linux/arm64/v8")
            .unwrap()
            .matches(&Platform::parse("linux/arm64").unwrap()));
        got.architecture = "amd64".into();
        assert!(!want.matches(&got));
        assert!(!Platform::parse("linux/arm/v7")
            .unwrap()
            .matches(&Platform::parse("linux/arm/v6").unwrap()));
        assert!(Platform::parse("linux").is_err() && Platform::parse("linux//x").is_err());
    }

    #[test]
    fn documents_are_told_apart_and_their_digests_checked() {
        let d = format!("sha256:{}", "1".repeat(64));
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{d}","size":1}},"layers":[]}}"#
        );
        assert!(matches!(
            parse_document("", m.as_bytes(), "m").unwrap(),
            Document::Manifest(_)
        ));
        let i = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"x","digest":"{d}","size":1}}]}}"#
        );
        assert!(matches!(
            parse_document("", i.as_bytes(), "i").unwrap(),
            Document::Index(_)
        ));
        let bad = r#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"sha256:../x","size":1}]}"#;
        assert!(parse_document(OCI_INDEX, bad.as_bytes(), "i").is_err());
        let v1 = r#"{"schemaVersion":1,"fsLayers":[]}"#;
        assert!(parse_document("", v1.as_bytes(), "v1")
            .unwrap_err()
            .to_string()
            .contains("schema 1"));
    }
}
