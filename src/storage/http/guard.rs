//! Where a server may not send the client: a URL taken from a server's answer (a registry's redirect to
//! blob storage, a token realm) must not lead to a link-local address (the cloud metadata services at
//! 169.254.169.254 and the like, whose answers a hostile image would then read as file data), to the
//! unspecified address (which reaches this host), or to a metadata service outside those ranges. URLs from
//! the config are not checked: the user chose them.
//!
//! Requests to such URLs resolve through [`GuardedResolver`], which checks every address a name resolves
//! to when the connection is made (so a name that resolved to a harmless address a moment before is
//! checked again: DNS rebinding gains nothing), and
//! [`refused_literal`] turns away a literal address before any route is taken (a proxy resolves names
//! itself: only the literal can be checked on that route).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// Alibaba Cloud's metadata service (outside the link-local range).
const ALIBABA_METADATA: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 200);
/// AWS's IPv6 metadata service (a unique local address).
const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// Whether a server-chosen URL may not lead to `ip`.
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_link_local() || v4.is_unspecified() || v4.is_broadcast() || v4 == ALIBABA_METADATA
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => forbidden(IpAddr::V4(v4)),
            None => {
                v6.is_unspecified()
                    || (v6.segments()[0] & 0xffc0) == 0xfe80
                    || v6 == AWS_METADATA_V6
            }
        },
    }
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
    let ip: IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()?;
    forbidden(ip).then(|| refusal(host, ip))
}

/// ureq's resolver, refusing a name any of whose addresses is forbidden.
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
        if let Some(bad) = addrs.iter().find(|a| forbidden(a.ip())) {
            let host = uri.host().unwrap_or_default();
            return Err(ureq::Error::Other(Box::new(Refused(refusal(
                host,
                bad.ip(),
            )))));
        }
        Ok(addrs)
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
    }
}
