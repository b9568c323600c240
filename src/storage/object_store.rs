//! The `s3` and `oss` backends: a blob is the object `<object_prefix><blob_id>` of a bucket, read with
//! ranged GETs signed per request (AWS Signature V4 for S3, the OSS header signature for OSS). Both
//! signers are written from the providers' public specifications and checked against their worked
//! examples in the tests below.

use std::time::SystemTime;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::http::{BlobRange, Failure, HttpClient, Remote, Request, Response};
use super::http_text::{civil, percent_encode};
use crate::config::ObjectStoreConfig;
use crate::error::Result;
use crate::storage::digest::hex;

/// Hex SHA-256 of the empty body: every request here is a GET or HEAD.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Flavor {
    S3,
    Oss,
}

pub struct ObjectStore {
    flavor: Flavor,
    scheme: String,
    endpoint: String,
    bucket: String,
    prefix: String,
    region: String,
    key_id: String,
    key_secret: String,
}

impl ObjectStore {
    pub fn s3(c: &ObjectStoreConfig) -> Result<Self> {
        Ok(Self::new(Flavor::S3, c))
    }

    pub fn oss(c: &ObjectStoreConfig) -> Result<Self> {
        Ok(Self::new(Flavor::Oss, c))
    }

    /// From a checked config (S3 has a region, OSS an endpoint).
    fn new(flavor: Flavor, c: &ObjectStoreConfig) -> Self {
        let text = |v: &Option<String>| v.clone().unwrap_or_default();
        let endpoint = match (flavor, c.endpoint.as_deref()) {
            (Flavor::S3, None | Some("")) => "s3.amazonaws.com".into(),
            _ => text(&c.endpoint),
        };
        ObjectStore {
            flavor,
            scheme: c.scheme.clone().unwrap_or_else(|| "https".into()),
            endpoint,
            bucket: c.bucket_name.clone(),
            prefix: text(&c.object_prefix),
            region: match flavor {
                Flavor::S3 => text(&c.region),
                Flavor::Oss => String::new(),
            },
            key_id: text(&c.access_key_id),
            key_secret: text(&c.access_key_secret),
        }
    }

    /// (url, host, canonical path of the object).
    fn locate(&self, blob_id: &str) -> (String, String, String) {
        let key: String = format!("{}{blob_id}", self.prefix)
            .split('/')
            .map(percent_encode)
            .collect::<Vec<_>>()
            .join("/");
        match self.flavor {
            // Path style: works with any S3-compatible endpoint.
            Flavor::S3 => {
                let path = format!("/{}/{key}", self.bucket);
                (
                    format!("{}://{}{path}", self.scheme, self.endpoint),
                    self.endpoint.clone(),
                    path,
                )
            }
            // Virtual-hosted style; the signed resource still names the bucket.
            Flavor::Oss => {
                let host = format!("{}.{}", self.bucket, self.endpoint);
                (
                    format!("{}://{host}/{key}", self.scheme),
                    host,
                    format!("/{}/{key}", self.bucket),
                )
            }
        }
    }

    fn sign(&self, method: &str, host: &str, path: &str, now: SystemTime) -> Vec<(String, String)> {
        if self.key_id.is_empty() || self.key_secret.is_empty() {
            return Vec::new(); // anonymous
        }
        match self.flavor {
            Flavor::S3 => {
                let amz_date = amz_date(now);
                let headers = [
                    ("host", host.to_string()),
                    ("x-amz-content-sha256", EMPTY_SHA256.to_string()),
                    ("x-amz-date", amz_date.clone()),
                ];
                let auth = sigv4_authorization(
                    &self.key_id,
                    &self.key_secret,
                    &self.region,
                    method,
                    path,
                    &headers,
                    &amz_date,
                );
                vec![
                    ("x-amz-content-sha256".into(), EMPTY_SHA256.into()),
                    ("x-amz-date".into(), amz_date),
                    ("Authorization".into(), auth),
                ]
            }
            Flavor::Oss => {
                let date = super::http_text::http_date(now);
                let sts = oss_string_to_sign(method, "", "", &date, &[], path);
                vec![
                    ("Date".into(), date),
                    (
                        "Authorization".into(),
                        format!(
                            "OSS {}:{}",
                            self.key_id,
                            oss_signature(&self.key_secret, &sts)
                        ),
                    ),
                ]
            }
        }
    }
}

impl Remote for ObjectStore {
    fn kind(&self) -> &'static str {
        match self.flavor {
            Flavor::S3 => "s3",
            Flavor::Oss => "oss",
        }
    }

    fn fetch(
        &self,
        http: &HttpClient,
        blob_id: &str,
        range: Option<BlobRange>,
    ) -> std::result::Result<Response, Failure> {
        let (url, host, path) = self.locate(blob_id);
        let method = if range.is_some() { "GET" } else { "HEAD" };
        let headers = self.sign(method, &host, &path, SystemTime::now());
        let req = Request::blob(&url, &headers, range);
        http.send_blob(&req, self.kind())
    }
}

type HmacSha256 = Hmac<Sha256>;

fn hmac256(key: &[u8], data: &str) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data.as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// AWS SigV4 `Authorization` for a request without query string and an empty body. `headers` are the
/// signed headers, lower-case names, sorted by name.
fn sigv4_authorization(
    key_id: &str,
    secret: &str,
    region: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    amz_date: &str,
) -> String {
    let day = &amz_date[..8];
    let canonical_headers: String = headers
        .iter()
        .map(|(k, v)| format!("{k}:{}\n", v.trim()))
        .collect();
    let signed: Vec<&str> = headers.iter().map(|(k, _)| *k).collect();
    let signed = signed.join(";");
    let canonical_request =
        format!("{method}\n{path}\n\n{canonical_headers}\n{signed}\n{EMPTY_SHA256}");
    let scope = format!("{day}/{region}/s3/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let mut key = hmac256(format!("AWS4{secret}").as_bytes(), day);
    for part in [region, "s3", "aws4_request"] {
        key = hmac256(&key, part);
    }
    let signature = hex(&hmac256(&key, &string_to_sign));
    format!(
        "AWS4-HMAC-SHA256 Credential={key_id}/{scope},SignedHeaders={signed},Signature={signature}"
    )
}

/// OSS V1: VERB, Content-MD5, Content-Type, Date, the x-oss-* headers (lower-case, sorted) and the
/// resource, newline-separated.
fn oss_string_to_sign(
    method: &str,
    content_md5: &str,
    content_type: &str,
    date: &str,
    oss_headers: &[(&str, &str)],
    resource: &str,
) -> String {
    let mut h: Vec<(String, &str)> = oss_headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim()))
        .filter(|(k, _)| k.starts_with("x-oss-"))
        .collect();
    h.sort();
    let canonical: String = h.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    format!("{method}\n{content_md5}\n{content_type}\n{date}\n{canonical}{resource}")
}

fn oss_signature(secret: &str, string_to_sign: &str) -> String {
    let mut m = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("any key length");
    m.update(string_to_sign.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes())
}

/// `20130524T000000Z`
fn amz_date(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s, _) = civil(t);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    /// AWS's published SigV4 example for S3 (GET Object, first 10 bytes of test.txt in examplebucket).
    #[test]
    fn sigv4_matches_the_aws_example() {
        let headers = [
            ("host", "examplebucket.s3.amazonaws.com".to_string()),
            ("range", "bytes=0-9".to_string()),
            ("x-amz-content-sha256", EMPTY_SHA256.to_string()),
            ("x-amz-date", "20130524T000000Z".to_string()),
        ];
        let auth = sigv4_authorization(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "us-east-1",
            "GET",
            "/test.txt",
            &headers,
            "20130524T000000Z",
        );
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,\
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,\
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    /// The worked example of Alibaba Cloud's OSS V1 header-signature documentation.
    #[test]
    fn oss_signature_matches_the_documented_example() {
        let sts = oss_string_to_sign(
            "PUT",
            "ODBGOERFMDMzQTczRUY3NUE3NzA5QzdFNUYzMDQxNEM=",
            "text/html",
            "Thu, 17 Nov 2005 18:49:58 GMT",
            &[
                ("X-OSS-Meta-Author", "foo@bar.com"),
                ("X-OSS-Magic", "abracadabra"),
            ],
            "/oss-example/nelson",
        );
        assert_eq!(
            oss_signature("OtxrzxIsfpFjA7SwPzILwy8Bw21TLhquhboDYROV", &sts),
            "26NBxoKdsyly4EDv6inkoDft/yA="
        );
    }

    #[test]
    fn dates() {
        assert_eq!(
            amz_date(UNIX_EPOCH + Duration::from_secs(1_369_353_600)),
            "20130524T000000Z"
        );
    }

    #[test]
    fn urls() {
        let v = ObjectStoreConfig {
            endpoint: Some("127.0.0.1:9000".into()),
            scheme: Some("http".into()),
            region: Some("r".into()),
            bucket_name: "b".into(),
            object_prefix: Some("p/".into()),
            ..Default::default()
        };
        let s3 = ObjectStore::s3(&v).unwrap();
        assert_eq!(s3.locate("ab").0, "http://127.0.0.1:9000/b/p/ab");
        let oss = ObjectStore::oss(&v).unwrap();
        let (url, host, res) = oss.locate("ab");
        assert_eq!(
            (url.as_str(), host.as_str(), res.as_str()),
            (
                "http://b.127.0.0.1:9000/p/ab",
                "b.127.0.0.1:9000",
                "/b/p/ab"
            )
        );
        // No keys: anonymous, no Authorization.
        assert!(s3.sign("GET", "h", "/b/p/ab", SystemTime::now()).is_empty());
    }
}
