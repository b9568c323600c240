//! Where chunk bytes come from: backends that read ranges of blobs by id, and the codecs and digests
//! that turn stored chunks back into verified file data.

pub mod compress;
pub mod credentials;
pub mod digest;
pub mod distribution;
pub mod events;
pub mod forward_proxy;
pub mod http;
pub mod http_proxy;
pub mod http_text;
pub mod localfs;
pub mod metrics;
pub mod object_store;
pub mod registry;
pub mod registry_auth;

use crate::error::{Error, Result};

/// A source of blob bytes. Implementations must be safe to call from many threads at once.
pub trait BlobBackend: Send + Sync {
    /// Backend type name, for metrics and logs.
    fn kind(&self) -> &'static str;
    /// Read up to `buf.len()` bytes of blob `blob_id` at `offset`; fewer only at the end of the blob.
    fn read_at(&self, blob_id: &str, offset: u64, buf: &mut [u8]) -> Result<usize>;
    fn blob_size(&self, blob_id: &str) -> Result<u64>;
    /// Reaching the blobs takes the network (not asked at mount time).
    fn is_remote(&self) -> bool {
        false
    }

    /// `len` bytes of blob `blob_id` from `offset` as a reader, for large fetches used piece by piece as
    /// they arrive (fewer bytes only at the end of the blob). The default reads the range whole.
    fn open_range(
        &self,
        blob_id: &str,
        offset: u64,
        len: usize,
    ) -> Result<Box<dyn std::io::Read + Send>> {
        let mut buf = vec![0u8; len];
        let n = self.read_at(blob_id, offset, &mut buf)?;
        buf.truncate(n);
        Ok(Box::new(std::io::Cursor::new(buf)))
    }

    /// Replace the registry credentials (base64 `user:pass`; `None` clears them) of a running backend:
    /// the next request or token fetch uses them (`PUT /api/v1/config` `registry_auth`).
    fn set_registry_auth(&self, auth: Option<&str>) -> Result<()> {
        let _ = auth;
        Err(Error::Unsupported(format!(
            "the {} backend has no registry credentials",
            self.kind()
        )))
    }

    /// Read exactly `len` bytes, or fail naming the short read.
    fn read_exact_at(&self, blob_id: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let n = self.read_at(blob_id, offset, &mut buf)?;
        if n != len {
            return Err(Error::Corrupt(format!(
                "blob {blob_id}: wanted {len} bytes at offset {offset}, the blob ends after {n}"
            )));
        }
        Ok(buf)
    }
}

/// The backend a daemon config names.
pub fn backend_from_config(
    config: &crate::config::BackendConfig,
) -> Result<std::sync::Arc<dyn BlobBackend>> {
    use crate::config::{BackendConfig, RemoteConfig};
    let (remote, http) = match config {
        BackendConfig::LocalFs(c) => {
            return Ok(std::sync::Arc::new(localfs::LocalFs::new(
                c.dir.clone(),
                c.alt_dirs.clone(),
                c.blob_file.clone(),
            )?))
        }
        BackendConfig::LocalDisk(_) => {
            return Err(Error::Unsupported(
                "storage backend type \"localdisk\" is not available in this build".into(),
            ))
        }
        BackendConfig::Network { remote, http } => (remote, http::HttpSettings::new(http)),
    };
    match remote {
        RemoteConfig::Registry(c) => over_http(registry::Registry::new(c)?, http),
        RemoteConfig::S3(c) => over_http(object_store::ObjectStore::s3(c)?, http),
        RemoteConfig::Oss(c) => over_http(object_store::ObjectStore::oss(c)?, http),
        RemoteConfig::HttpProxy(c) => over_http(http_proxy::HttpProxyBlobs::new(c)?, http),
    }
}

/// A network backend behind the shared HTTP client (retries, mirrors, proxy, range checks).
fn over_http(
    remote: impl http::Remote,
    settings: http::HttpSettings,
) -> Result<std::sync::Arc<dyn BlobBackend>> {
    Ok(std::sync::Arc::new(http::RemoteBackend::new(
        remote, settings,
    )?))
}
