//! Where a server may not send the client: a URL taken from a server's answer (a registry's redirect to
//! blob storage, a token realm) must not lead to a link-local address (the cloud metadata services at
//! 169.254.169.254 and the like, whose answers a hostile image would then read as file data), to the
//! unspecified address (which reaches this host), or to a metadata service outside those ranges. URLs from
//! the config are not checked: the user chose them.
//!
//! Requests to such URLs resolve through [`GuardedResolver`], which drops the forbidden addresses a name
//! resolves to when the connection is made (so a name that resolved to a harmless address a moment before
//! is checked again: DNS rebinding gains nothing); [`refused_literal`] turns away a literal address in any
//! form before any route is taken; and on the proxy route, where the proxy resolves names out of the
//! resolver's sight, [`ProxiedNames`] resolves and checks them here first.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// Alibaba Cloud's metadata service (outside the link-local range).
const ALIBABA_METADATA: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 200);
/// AWS's IPv6 metadata service (a unique local address).
const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
/// Google Cloud's IPv6 metadata service.
const GCP_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254);

/// Whether a server-chosen URL may not lead to `ip`.
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_link_local() || v4.is_unspecified() || v4.is_broadcast() || v4 == ALIBABA_METADATA
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped().or_else(|| nat64_embedded(v6)) {
            Some(v4) => forbidden(IpAddr::V4(v4)),
            None => {
                v6.is_unspecified()
                    || (v6.segments()[0] & 0xffc0) == 0xfe80
                    || v6 == AWS_METADATA_V6
                    || v6 == GCP_METADATA_V6
            }
        },
    }
}

/// The IPv4 address a NAT64 translator would reach for `v6` (the well-known prefix 64:ff9b::/96 and the
/// local-use 64:ff9b:1::/48 with the address in the last 32 bits).
fn nat64_embedded(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let well_known = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    let local_use = s[..3] == [0x64, 0xff9b, 1];
    (well_known || local_use).then(|| Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32))
}

/// An IPv4 address in any form `inet_aton` takes (what a resolver or proxy makes of a host name): one to
/// four parts, each decimal, octal (leading 0) or hex (0x), the last filling the remaining bytes
/// (`2852039166`, `0251.0376.0251.0376` and `0xa9fea9fe` are all 169.254.169.254).
fn inet_aton(host: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = host.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(4);
    for p in &parts {
        let (digits, radix) = match p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
            Some(hex) => (hex, 16),
            None if p.len() > 1 && p.starts_with('0') => (&p[1..], 8),
            None => (*p, 10),
        };
        if digits.is_empty() && radix != 16 {
            return None;
        }
        let v = if digits.is_empty() {
            0
        } else {
            u32::from_str_radix(digits, radix).ok()?
        };
        values.push(v);
    }
    let (last, head) = values.split_last()?;
    if head.iter().any(|&v| v > 255) || (*last as u64) >= 1u64 << (8 * (5 - values.len())) {
        return None;
    }
    let high = head
        .iter()
        .enumerate()
        .fold(0u32, |acc, (i, &v)| acc | (v << (24 - 8 * i)));
    Some(Ipv4Addr::from(high | last))
}

/// The refusal, as the resolver reports it (found again by [`is_refusal`]).
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn refusal(host: &str, ip: IpAddr) -> String {
    format!(
        "{host} is {ip}, a link-local, unspecified or metadata address a server may not send us to"
    )
}

/// Whether a ureq error is this module's refusal.
pub fn is_refusal(e: &ureq::Error) -> bool {
    matches!(e, ureq::Error::Other(inner) if inner.is::<Refused>())
}

/// The refusal of `url` when its host is a literal forbidden address.
pub fn refused_literal(url: &str) -> Option<String> {
    let uri: Uri = url.parse().ok()?;
    let host = uri.host()?;
    let bare = unbracketed(host);
    let ip = match bare.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => IpAddr::V4(inet_aton(bare)?),
    };
    forbidden(ip).then(|| refusal(host, ip))
}

/// A URL's host without the brackets of an IPv6 literal.
fn unbracketed(host: &str) -> &str {
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Names of server-chosen URLs sent through a proxy, checked here by resolving them as the proxy would
/// (the proxy resolves them out of the resolver's sight). A name that does not resolve here passes (a
/// node may reach names only through its proxy). Answers are kept for [`NAME_TTL`], at most
/// [`NAMES_KEPT`] names, so a redirected blob's reads do not each pay a lookup.
#[derive(Default)]
pub struct ProxiedNames(Mutex<HashMap<String, (Instant, Option<String>)>>);

const NAME_TTL: Duration = Duration::from_secs(30);
const NAMES_KEPT: usize = 64;

impl ProxiedNames {
    /// The refusal of `url` when its host resolves to a forbidden address.
    pub fn refusal(&self, url: &str) -> Option<String> {
        let uri: Uri = url.parse().ok()?;
        let host = uri.host()?.to_string();
        let now = Instant::now();
        if let Some((at, why)) = self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&host) {
            if now.duration_since(*at) < NAME_TTL {
                return why.clone();
            }
        }
        let port = uri.port_u16().unwrap_or(0);
        let why = (unbracketed(&host), port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.find(|a| forbidden(a.ip())))
            .map(|a| refusal(&host, a.ip()));
        let mut names = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if names.len() >= NAMES_KEPT {
            names.clear();
        }
        names.insert(host, (now, why.clone()));
        why
    }
}

/// ureq's resolver without the forbidden addresses: a name left with none is refused (a dual-stack name
/// with a link-local address beside a usable one, as mDNS gives, still connects to the usable one).
#[derive(Debug, Default)]
pub struct GuardedResolver(DefaultResolver);

impl Resolver for GuardedResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let addrs = self.0.resolve(uri, config, timeout)?;
        let mut allowed = self.0.empty();
        for a in addrs.iter().filter(|a| !forbidden(a.ip())) {
            let _ = allowed.try_push(*a);
        }
        if allowed.is_empty() {
            let host = uri.host().unwrap_or_default();
            let ip = addrs.iter().next().map(|a| a.ip());
            let why = match ip {
                Some(ip) => refusal(host, ip),
                None => format!("{host} resolved to no address"),
            };
            return Err(ureq::Error::Other(Box::new(Refused(why))));
        }
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_link_local_and_unspecified_addresses_are_forbidden() {
        for bad in [
            "169.254.169.254",
            "169.254.170.2",
            "0.0.0.0",
            "100.100.100.200",
            "fe80::1",
            "fd00:ec2::254",
            "::",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a9fe:a9fe",
            "fd20:ce::254",
        ] {
            assert!(forbidden(bad.parse().unwrap()), "{bad}");
        }
        for good in [
            "127.0.0.1",
            "10.0.0.5",
            "192.168.1.1",
            "8.8.8.8",
            "::1",
            "fd00::1",
        ] {
            assert!(!forbidden(good.parse().unwrap()), "{good}");
        }
        assert!(refused_literal("http://169.254.169.254/latest/meta-data/").is_some());
        assert!(refused_literal("https://[fe80::1]:8443/x").is_some());
        assert!(refused_literal("http://127.0.0.1:5000/v2/").is_none());
        assert!(refused_literal("http://metadata.example/x").is_none());
        // The forms a resolver or proxy takes for 169.254.169.254, and some it must not misread.
        for bad in [
            "http://2852039166/latest/",
            "http://0251.0376.0251.0376/",
            "http://0xa9fea9fe/",
            "http://0xa9.0xfe.43518/",
            "http://169.254.43518/",
            "http://0/",
            "http://0x0/",
        ] {
            assert!(refused_literal(bad).is_some(), "{bad}");
        }
        for good in [
            "http://2130706433/",
            "http://10.1/",
            "http://256.1.1.1/",
            "http://1.2.3.4.5/",
            "http://08.1.1.1/",
            "http://registry.local/",
        ] {
            assert!(refused_literal(good).is_none(), "{good}");
        }
        assert_eq!(inet_aton("0x7f.1"), Some(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(inet_aton("1.2.65535"), Some(Ipv4Addr::new(1, 2, 255, 255)));
        assert_eq!(inet_aton("1.2.65536"), None);
    }

    #[test]
    fn names_sent_through_a_proxy_are_resolved_and_checked_here() {
        let names = ProxiedNames::default();
        assert!(names.refusal("http://localhost:5000/v2/").is_none());
        // glibc takes the inet_aton forms as names too; either way they are refused.
        assert!(names.refusal("http://2852039166/latest/").is_some());
        assert!(names.refusal("http://no-such-host.invalid/x").is_none());
        assert!(names.0.lock().unwrap().len() <= NAMES_KEPT);
    }
}
