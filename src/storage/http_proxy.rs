//! The `http-proxy` backend: blobs served by a plain HTTP(S) server at `<addr><path>/<blob_id>` (HEAD for
//! the size, ranged GETs for data), e.g. a local blob cache or P2P peer in front of a registry.

use super::http::{BlobRange, Failure, HttpClient, Remote, Request, Response};
use crate::config::HttpProxyConfig;
use crate::error::{Error, Result};

pub struct HttpProxyBlobs {
    base: String,
}

impl HttpProxyBlobs {
    pub fn new(c: &HttpProxyConfig) -> Result<Self> {
        let addr = &c.addr;
        if !(addr.starts_with("http://") || addr.starts_with("https://")) {
            // nydusd also takes a Unix socket path here; this build speaks TCP only.
            return Err(Error::Unsupported(format!(
                "backend http-proxy: `addr` {addr:?} must be an http:// or https:// URL"
            )));
        }
        let path = c.path.as_deref().unwrap_or_default();
        Ok(HttpProxyBlobs {
            base: format!("{}/{}", addr.trim_end_matches('/'), path.trim_matches('/'))
                .trim_end_matches('/')
                .to_string(),
        })
    }
}

impl Remote for HttpProxyBlobs {
    fn kind(&self) -> &'static str {
        "http-proxy"
    }

    fn fetch(
        &self,
        http: &HttpClient,
        blob_id: &str,
        range: Option<BlobRange>,
    ) -> std::result::Result<Response, Failure> {
        let url = format!("{}/{blob_id}", self.base);
        let req = Request::blob(&url, &[], range);
        http.send_blob(&req, "http-proxy")
    }
}
