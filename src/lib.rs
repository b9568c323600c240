//! rafsd: serve RAFS (Dragonfly Nydus) v5 and v6 container images.
//!
//! Layout, one module per concern:
//! - [`format`]: on-disk structures of bootstraps and blobs (parsing only).
//! - [`storage`]: blob backends, chunk codecs and digests.
//! - [`image`]: an opened image: metadata plus verified chunk reads.
//! - [`unpack`], [`check`], [`inspect`]: the offline tools built on [`image`].
//! - [`builder`]: `rafsd build` / `rafsd merge`, the RAFS v5/v6 image builder.

pub mod api;
pub mod builder;
pub mod cache;
pub mod check;
pub mod config;
pub mod daemon;
pub mod dax;
pub mod error;
pub mod format;
pub mod fs;
pub mod fusedev;
pub mod image;
pub mod inspect;
pub mod passthrough;
pub mod sandbox;
pub mod seccomp;
pub mod service;
pub mod storage;
pub mod unpack;
pub mod vhost_user;
pub mod worker_pool;

pub use error::{Error, Result};
pub use image::{ImageOptions, RafsImage};
