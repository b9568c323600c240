//! Where a server may not send the client: a URL taken from a server's answer (a registry's redirect to
//! blob storage, a token realm) must not lead to a link-local address (the cloud metadata services at
//! 169.254.169.254 and the like, whose answers a hostile image would then read as file data), to the
//! unspecified address (which reaches this host), or to a metadata service outside those ranges; nor,
//! unless the registry the config names is itself local (see [`Origin`]), to a loopback or private
//! address (this host's own services, the cloud network's internal ones: a remote registry's redirect
//! there would have the daemon read them for the guest). A registry on this host or a private network
//! may send it to storage beside it, as such registries do. URLs from the config are not checked: the
//! user chose them.
//!
//! Requests to such URLs resolve through [`GuardedResolver`], which drops the forbidden addresses a name
//! resolves to when the connection is made (so a name that resolved to a harmless address a moment before
//! is checked again: DNS rebinding gains nothing); [`refused_literal`] turns away a literal address in any
//! form before any route is taken; and on the proxy route, where the proxy resolves names out of the
//! resolver's sight, [`ProxiedNames`] resolves and checks them here first.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
        IpAddr::V6(v6) => match embedded_v4(v6) {
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

/// Whether `ip` is on this host or a private network: loopback, the RFC 1918 ranges, the shared address
/// space 100.64.0.0/10 (carrier and cloud internal networks) and IPv6 unique local addresses, in any of
/// the IPv6 forms that reach them.
pub fn local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback() || v4.is_private() || (a == 100 && (b & 0xc0) == 64)
        }
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => local(IpAddr::V4(v4)),
            None => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
        },
    }
}

/// The registry a client's config names, and whether it is local: whether its servers may send the
/// client to local addresses. It is local when it is `localhost` or a local address, or a name every
/// address of which the client has connected to so far was local (`ObservingResolver` sees each of
/// its resolutions, before the connection it is for): a registry whose name resolved to a remote
/// address even once (a hostile registry adding a private record beside its own, or answering with a
/// local address first and its own later: DNS rebinding) stays remote, as the answer that led the
/// client to its server came after. Link-local and other forbidden addresses count for neither (mDNS
/// answers carry them). A client that also reaches the registry through a proxy or mirrors does not see
/// the addresses behind them, and judges as before this check: its servers may send it to local
/// addresses (the metadata and link-local ones stay forbidden).
#[derive(Debug)]
pub struct Origin {
    /// The host as the config names it: lowercase, without brackets or port ("" for none).
    host: String,
    /// `localhost` or a local address literal.
    named_local: bool,
    /// Reached through a proxy or mirrors too.
    unobserved: bool,
    /// Its name resolved to a local address / to a remote one, at least once.
    seen_local: AtomicBool,
    seen_remote: AtomicBool,
}

impl Origin {
    /// The registry at `url` (`scheme://host[:port]...` or `host[:port]`; `None`: a client whose servers
    /// choose no URL), reached also through a proxy or mirrors (`unobserved`) or not.
    pub fn new(url: Option<&str>, unobserved: bool) -> Arc<Self> {
        let host = url.map(host_of).unwrap_or_default();
        let named_local = host == "localhost"
            || host.ends_with(".localhost")
            || host
                .parse::<IpAddr>()
                .ok()
                .or_else(|| inet_aton(&host).map(IpAddr::V4))
                .is_some_and(local);
        Arc::new(Origin {
            host,
            named_local,
            unobserved,
            seen_local: AtomicBool::new(false),
            seen_remote: AtomicBool::new(false),
        })
    }

    /// Whether the registry is local: its servers may send the client to local addresses.
    pub fn is_local(&self) -> bool {
        if self.unobserved || self.named_local {
            return true;
        }
        self.seen_local.load(Ordering::Acquire) && !self.seen_remote.load(Ordering::Acquire)
    }

    /// The registry's name resolved to `addrs` (for a connection about to be made).
    fn observe(&self, addrs: impl Iterator<Item = IpAddr>) {
        for ip in addrs.filter(|ip| !forbidden(*ip)) {
            match local(ip) {
                true => self.seen_local.store(true, Ordering::Release),
                false => self.seen_remote.store(true, Ordering::Release),
            }
        }
    }
}

/// A URL's host, lowercase, without userinfo, brackets or port.
fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None if host.matches(':').count() > 1 => host, // a bare IPv6 address
        None => host.split(':').next().unwrap_or_default(),
    }
    .trim_end_matches('.')
    .to_ascii_lowercase()
}

/// Why a server may not send a client whose config names `origin` to `ip` (reached as `host`), if it may
/// not.
fn refusal_of(host: &str, ip: IpAddr, origin: &Origin) -> Option<String> {
    if forbidden(ip) {
        return Some(refusal(host, ip));
    }
    (local(ip) && !origin.is_local()).then(|| {
        format!(
            "{host} is {ip}, a loopback or private address, which a server may not send us to \
             unless the registry is on one"
        )
    })
}

/// The IPv4 address an IPv6 address stands for: IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible
/// (::a.b.c.d, but not :: or ::1), what a NAT64 translator would reach (the well-known prefix
/// 64:ff9b::/96 and the local-use 64:ff9b:1::/48 with the address in the last 32 bits), and a 6to4 relay
/// (2002:aabb:ccdd::/48).
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let last32 = Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let compatible = s[..6] == [0; 6] && !v6.is_unspecified() && !v6.is_loopback();
    let well_known = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    let local_use = s[..3] == [0x64, 0xff9b, 1];
    if compatible || well_known || local_use {
        return Some(last32);
    }
    (s[0] == 0x2002).then(|| Ipv4Addr::from(((s[1] as u32) << 16) | s[2] as u32))
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

/// The refusal of `url`, chosen by a server for a client whose config names `origin`, when its host is
/// a literal address the server may not send it to.
pub fn refused_literal(url: &str, origin: &Origin) -> Option<String> {
    let uri: Uri = url.parse().ok()?;
    let host = uri.host()?;
    let bare = unbracketed(host);
    if bare.contains('%') {
        // An IPv6 address with a zone: neither parsed nor resolved here, but a proxy may dial it.
        return Some(format!(
            "{host} is an address with a zone, which a server may not send us to"
        ));
    }
    let ip = match bare.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => IpAddr::V4(inet_aton(bare)?),
    };
    refusal_of(host, ip, origin)
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
    /// The refusal of `url` when its host resolves to an address a server may not send a client whose
    /// config names `origin` to.
    pub fn refusal(&self, url: &str, origin: &Origin) -> Option<String> {
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
            .and_then(|mut addrs| addrs.find_map(|a| refusal_of(&host, a.ip(), origin)));
        let mut names = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if names.len() >= NAMES_KEPT {
            names.clear();
        }
        names.insert(host, (now, why.clone()));
        why
    }
}

/// ureq's resolver without the addresses a server may not send a client whose config names `origin` to:
/// a name left with none is refused (a dual-stack name with a link-local address beside a usable one, as
/// mDNS gives, still connects to the usable one).
#[derive(Debug)]
pub struct GuardedResolver {
    resolver: DefaultResolver,
    origin: Arc<Origin>,
}

impl GuardedResolver {
    pub fn new(origin: Arc<Origin>) -> Self {
        GuardedResolver {
            resolver: DefaultResolver::default(),
            origin,
        }
    }
}

impl Resolver for GuardedResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let addrs = self.resolver.resolve(uri, config, timeout)?;
        let host = uri.host().unwrap_or_default();
        let mut allowed = self.resolver.empty();
        let mut why = None;
        for a in addrs.iter() {
            match refusal_of(host, a.ip(), &self.origin) {
                Some(w) => why = why.or(Some(w)),
                None => {
                    let _ = allowed.try_push(*a);
                }
            }
        }
        if allowed.is_empty() {
            let why = why.unwrap_or_else(|| format!("{host} resolved to no address"));
            return Err(ureq::Error::Other(Box::new(Refused(why))));
        }
        Ok(allowed)
    }
}

/// ureq's resolver for the URLs the config names: it shows [`Origin`] what the registry's name
/// resolves to, each time (ureq resolves for every request, before it looks for a pooled connection).
#[derive(Debug)]
pub struct ObservingResolver {
    resolver: DefaultResolver,
    origin: Arc<Origin>,
}

impl ObservingResolver {
    pub fn new(origin: Arc<Origin>) -> Self {
        ObservingResolver {
            resolver: DefaultResolver::default(),
            origin,
        }
    }
}

impl Resolver for ObservingResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let addrs = self.resolver.resolve(uri, config, timeout)?;
        let host = uri.host().unwrap_or_default();
        if !self.origin.host.is_empty() && host_of(host) == self.origin.host {
            self.origin.observe(addrs.iter().map(|a| a.ip()));
        }
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_link_local_and_unspecified_addresses_are_forbidden() {
        // Whatever the origin: a local one here.
        let origin = Origin::new(Some("http://127.0.0.1:5000"), false);
        let refused_literal = |url| refused_literal(url, &origin);
        for bad in [
            "169.254.169.254",
            "169.254.170.2",
            "0.0.0.0",
            "100.100.100.200",
            "fe80::1",
            "fd00:ec2::254",
            "::",
            "::ffff:169.254.169.254",
            "::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
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
        let origin = Origin::new(Some("localhost:5000"), true);
        assert!(names
            .refusal("http://localhost:5000/v2/", &origin)
            .is_none());
        // glibc takes the inet_aton forms as names too; either way they are refused.
        assert!(names
            .refusal("http://2852039166/latest/", &origin)
            .is_some());
        assert!(names
            .refusal("http://no-such-host.invalid/x", &origin)
            .is_none());
        assert!(names.0.lock().unwrap().len() <= NAMES_KEPT);
        // Through a proxy a remote registry's server still may (as before the check: the proxy's
        // connections are out of sight).
        let remote = Origin::new(Some("https://198.51.100.7"), true);
        assert!(names
            .refusal("http://localhost:5000/v2/", &remote)
            .is_none());
    }

    #[test]
    fn loopback_and_private_addresses_are_local_in_every_form() {
        for l in [
            "127.0.0.1",
            "127.9.9.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "::1",
            "fd12::1",
            "fc00::1",
            "::ffff:10.0.0.1",
            "64:ff9b::7f00:1",
            "::7f00:1",
            "2002:7f00:1::1",
            "2002:c0a8:101::",
        ] {
            assert!(local(l.parse().unwrap()), "{l}");
        }
        for remote in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "192.0.2.1",
            "2001:db8::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(!local(remote.parse().unwrap()), "{remote}");
        }
    }

    #[test]
    fn only_a_local_registry_may_send_us_to_local_addresses() {
        for (url, is_local) in [
            ("http://127.0.0.1:5000", true),
            ("https://[::1]:5000", true),
            ("localhost:5000", true),
            ("http://registry.localhost", true),
            ("http://LOCALHOST.:5000", true),
            ("https://user:p@ss@10.0.0.8:443/v2/", true),
            ("http://2130706433", true),
            ("fd00::1", true),
            ("https://198.51.100.7", false),
            ("https://[2001:db8::7]:443", false),
            // A name is known once connected to (below).
            ("https://registry.example", false),
        ] {
            assert_eq!(Origin::new(Some(url), false).is_local(), is_local, "{url}");
        }
        assert!(!Origin::new(None, false).is_local());
        let remote = Origin::new(Some("https://198.51.100.7"), false);
        for url in [
            "http://127.0.0.1:8080/",
            "http://[::1]/",
            "http://10.0.0.1/",
            "http://100.64.1.1/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://[::ffff:192.168.0.1]/",
            "http://[fd12::1]/",
        ] {
            let why = refused_literal(url, &remote);
            assert!(
                why.as_deref()
                    .is_some_and(|w| w.contains("may not send us to")),
                "{url}: {why:?}"
            );
        }
        assert!(refused_literal("http://198.51.100.8/", &remote).is_none());
        let local = Origin::new(Some("http://127.0.0.1:5000"), false);
        assert!(refused_literal("http://10.0.0.1/", &local).is_none());
        for zoned in ["http://[fe80::1%25eth0]/", "http://[::1%25lo]:5000/"] {
            assert!(refused_literal(zoned, &local).is_some(), "{zoned}");
        }
        // A name is local while every address it resolved to was (link-local ones count for neither).
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let named = Origin::new(Some("https://registry.corp:5000"), false);
        named.observe([ip("192.168.1.5"), ip("fe80::1")].into_iter());
        assert!(named.is_local());
        named.observe([ip("10.0.0.5")].into_iter());
        assert!(named.is_local());
        // Once remote, for good: the server it led to may have sent the answer being judged.
        named.observe([ip("198.51.100.7")].into_iter());
        assert!(!named.is_local());
        named.observe([ip("10.0.0.5")].into_iter());
        assert!(!named.is_local());
        let mixed = Origin::new(Some("https://registry.corp:5000"), false);
        mixed.observe([ip("10.0.0.5"), ip("2001:db8::5")].into_iter());
        assert!(!mixed.is_local());
        // Through a proxy or mirrors, as before the check.
        assert!(Origin::new(Some("https://198.51.100.7"), true).is_local());
    }
}
