//! rafsd: serve RAFS (Dragonfly Nydus) v5 and v6 container images.
//!
//! Layout, one module per concern:
//! - [`layout`]: every on-disk record, defined once (the `rafs-layout` crate, shared with the builder
//!   and the in-guest helper); [`mod@format`]: parsing whole bootstraps and blob sections over those records.
//! - [`storage`]: blob backends, chunk codecs and digests.
//! - [`image`]: an opened image: metadata plus verified chunk reads.
//! - [`unpack`], [`check`], [`inspect`], [`prefetch_list`]: the offline tools built on [`image`].
//! - [`builder`]: `rafsd build` / `rafsd merge`, the RAFS v5/v6 image builder.
//! - [`convert`]: `rafsd convert` / `rafsd mount-image`, OCI images in registries to Nydus images.
//! - [`daemon`], [`api`]: the serving daemon's mounts and state, and its nydusd-compatible admin API;
//!   [`fusedev`] and [`vhost_user`]: its two front ends (FUSE on the host, vhost-user-fs for a VMM).
//! - [`launch`]: how `rafsd fuse` and `rafsd virtiofs` start (sandbox via [`sandbox`], [`signals`]).
//! - [`embed`]: the same daemon inside another Rust program: build it, add mounts, serve it over FUSE
//!   or vhost-user, optionally with the admin API, shut it down.

pub mod api;
pub mod builder;
pub mod cache;
pub mod check;
pub mod cold_slots;
pub mod config;
pub mod convert;
pub mod daemon;
pub mod dax;
pub mod embed;
pub mod error;
pub mod format;
pub mod fs;
pub mod fusedev;
pub mod image;
pub mod inflight;
pub mod inspect;
pub mod launch;
pub mod logging;
pub mod passthrough;
pub mod prefetch_list;
pub mod redact;
pub mod sandbox;
pub mod seccomp;
pub mod service;
pub mod signals;
pub mod storage;
pub mod takeover;
pub mod unpack;
pub mod version;
pub mod vhost_user;
pub mod worker_pool;

pub use error::{Error, Result};
pub use image::{ImageOptions, RafsImage};
pub use rafs_layout as layout;
