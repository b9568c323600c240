//! The HTTP layer the network backends share: one blocking client (ureq + rustls) per backend, bounded
//! timeouts, retries with backoff, `mirrors` failover and a forward `proxy` with fallback, and the range
//! check that keeps wrong bytes away from readers.
//!
//! A backend ([`Remote`]) only knows how to address and authorize a blob; [`RemoteBackend`] turns it into a
//! [`BlobBackend`](super::BlobBackend) by doing the retries and checking every response against the range
//! it asked for.
//!
//! This file holds the client ([`HttpClient`]) and its counters; the rest is one concern per file:
//! `settings` (the config's transport settings), `transport` (requests, responses, agents, one request
//! on one route), `routing` (mirrors, the proxy and their health), `retry` (what a failure means, how long
//! to wait), `guard` (the addresses a server may not send the client to) and `backend` (a [`Remote`] as a
//! blob backend: retries, sizes, range checks).

mod backend;
mod guard;
mod retry;
mod routing;
mod settings;
mod transport;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use super::forward_proxy::ForwardProxy;
use crate::error::Result;
pub use backend::{Remote, RemoteBackend};
pub use guard::Origin;
pub use retry::{classify, Failure};
pub use routing::rehost;
use routing::{now_down, Health};
pub use settings::{HttpSettings, MirrorSettings, ProxySettings};
use transport::{agent, guarded_agent, range_stream_agent};
pub use transport::{
    guarded_streaming_agent, streaming_agent, BlobRange, Method, Request, Response, TransportError,
    TransportErrorKind,
};

/// Counters a test or the metrics API can read.
#[derive(Default)]
pub struct HttpCounters {
    pub requests: AtomicU64,
    pub via_proxy: AtomicU64,
    pub via_mirror: AtomicU64,
    pub body_bytes: AtomicU64,
    pub retries: AtomicU64,
}

pub struct HttpClient {
    pub settings: HttpSettings,
    direct: ureq::Agent,
    /// Like `direct` for streamed ranges: no deadline for the whole exchange (a large range over a slow
    /// link may take longer than `timeout`), but the head and every read must come within it (the body's
    /// pace is its reader's to check).
    direct_stream: ureq::Agent,
    /// The registry the config names: whether its servers may send us to local addresses (`guard`).
    origin: Arc<Origin>,
    /// `direct` and `direct_stream` for URLs a server chose (redirect targets, token realms): they refuse
    /// link-local, unspecified and metadata addresses, and local ones unless the origin is local.
    guarded: ureq::Agent,
    guarded_stream: ureq::Agent,
    /// The names of server-chosen URLs sent through the proxy, checked here (see [`guard::ProxiedNames`]).
    proxied_names: guard::ProxiedNames,
    /// The proxy as ureq speaks to it: CONNECT tunnels, used for https:// targets.
    via_proxy: Option<ureq::Agent>,
    /// The proxy as a plain forward proxy, used for http:// targets (absolute-form requests).
    forward: Option<ForwardProxy>,
    proxy_health: Mutex<Health>,
    mirror_health: Vec<Mutex<Health>>,
    pub counters: HttpCounters,
}

impl HttpClient {
    /// A client of the server at `origin` (`scheme://host[:port]`; `None` for one that follows no URL a
    /// server chooses).
    pub fn new(settings: HttpSettings, origin: Option<&str>) -> Result<Self> {
        let unobserved = settings.proxy.is_some() || !settings.mirrors.is_empty();
        let origin = Origin::new(origin, unobserved);
        let direct = agent(&settings, None, &origin)?;
        let direct_stream = range_stream_agent(&settings, &origin)?;
        let (guarded, guarded_stream) = (
            guarded_agent(&settings, false, &origin)?,
            guarded_agent(&settings, true, &origin)?,
        );
        let via_proxy = match &settings.proxy {
            Some(p) => Some(agent(&settings, Some(&p.url), &origin)?),
            None => None,
        };
        let forward = settings
            .proxy
            .as_ref()
            .and_then(|p| ForwardProxy::from_url(&p.url));
        let mirror_health = settings
            .mirrors
            .iter()
            .map(|_| Mutex::new(now_down()))
            .collect();
        Ok(HttpClient {
            settings,
            direct,
            direct_stream,
            origin,
            guarded,
            guarded_stream,
            proxied_names: Default::default(),
            via_proxy,
            forward,
            proxy_health: Mutex::new(now_down()),
            mirror_health,
            counters: HttpCounters::default(),
        })
    }

    /// The agent for requests straight to the origin (no proxy), with the overall timeout.
    pub fn direct_agent(&self) -> &ureq::Agent {
        &self.direct
    }

    /// [`Self::direct_agent`] for URLs a server chose: it refuses link-local, unspecified and metadata
    /// addresses, and local ones unless the origin is local.
    pub fn server_chosen_agent(&self) -> &ureq::Agent {
        &self.guarded
    }

    /// The registry the config names, for other agents of its URLs and of server-chosen ones.
    pub fn origin(&self) -> &Arc<Origin> {
        &self.origin
    }
}
