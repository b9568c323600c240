//! The `rafsd convert` and `rafsd mount-image` command lines (kept here so `src/main.rs` only names
//! them).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::oci::Platform;
use crate::builder::BuildOptions;
use crate::error::{Error, Result};
use crate::format::Compressor;
use crate::storage::distribution::{NetOptions, Reference};

/// How registries are reached (both commands).
#[derive(clap::Args, Debug)]
pub struct NetArgs {
    /// Talk plain HTTP to the registries.
    #[arg(long)]
    pub plain_http: bool,
    /// Accept any TLS certificate.
    #[arg(long)]
    pub insecure: bool,
    /// Seconds a request (or, in a transfer, one read or write, and the answer's head) may take; a
    /// blob upload's answer may take this again per GiB begun after its last byte.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// Retries after a failed request.
    #[arg(long, default_value_t = 3)]
    pub retry_limit: u32,
}

impl NetArgs {
    fn options(&self) -> NetOptions {
        NetOptions {
            plain_http: self.plain_http,
            insecure: self.insecure,
            timeout: Duration::from_secs(self.timeout.max(1)),
            retry_limit: self.retry_limit.min(16),
        }
    }
}

/// Options of `rafsd convert`, spelled as `nydusify convert` spells them.
#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// The OCI/Docker image: `REGISTRY/REPO[:TAG][@DIGEST]`.
    #[arg(long)]
    pub source: String,
    /// Where the Nydus image goes: `REGISTRY/REPO[:TAG]`.
    #[arg(long)]
    pub target: String,
    /// RAFS version of the image: 5 or 6.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(5..=6))]
    pub fs_version: u32,
    /// none, lz4_block or zstd.
    #[arg(long, default_value = "zstd", value_parser = crate::builder::parse_compressor)]
    pub compressor: Compressor,
    /// Hex (0x...) or decimal; a power of two from 0x1000 to 0x1000000.
    #[arg(long, default_value = "0x100000", value_parser = crate::builder::parse_chunk_size)]
    pub chunk_size: u32,
    /// Platforms to convert from an index, comma-separated os/arch[/variant] [default: this machine's].
    #[arg(long, value_delimiter = ',')]
    pub platform: Vec<String>,
    /// Push an index holding the source manifests beside the Nydus ones (marked with the
    /// `nydus.remoteimage.v1` os.feature).
    #[arg(long)]
    pub merge_platform: bool,
    /// File with absolute paths for the image's prefetch table, one per line (`-`: standard input).
    #[arg(long)]
    pub prefetch_files: Option<PathBuf>,
    /// Where layers are built [default: the system's temporary directory].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// The layer cache [default: $XDG_CACHE_HOME/rafsd/convert, else ~/.cache/rafsd/convert].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Convert every layer again, without reading or writing the cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Compression threads (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The most a source layer may decode to: bytes, or with a K, M, G or T suffix (powers of 1024).
    /// Docker Hub's largest layers decode to tens of GiB; past that, the blob's size and the build
    /// time are the source's to choose.
    #[arg(long, default_value = "64G", value_parser = parse_size)]
    pub max_layer_size: u64,
    /// For untrusted sources: a layer may decode to at most this many times its compressed size plus
    /// 64 MiB (0, the default: no such limit; genuine layers of zeros reach 30,000:1 with zstd).
    #[arg(long, default_value_t = 0)]
    pub max_layer_ratio: u64,
    #[command(flatten)]
    pub net: NetArgs,
}

/// `--max-layer-size`: a size from 1 byte, as [`crate::config::parse_binary_size`] reads it.
fn parse_size(text: &str) -> std::result::Result<u64, String> {
    crate::config::parse_binary_size(text)
        .filter(|&bytes| bytes > 0)
        .ok_or_else(|| {
            format!("{text}: not a size from 1 byte to 2^64 (bytes, or a number and K, M, G or T)")
        })
}

/// Options of `rafsd mount-image`.
#[derive(clap::Args, Debug)]
pub struct MountImageArgs {
    /// The Nydus image: `REGISTRY/REPO[:TAG][@DIGEST]`.
    pub image: String,
    /// Where to mount it (or `--mountpoint`, as nydusd spells it).
    #[arg(
        required_unless_present = "mountpoint_flag",
        conflicts_with = "mountpoint_flag"
    )]
    pub mountpoint: Option<PathBuf>,
    #[arg(long = "mountpoint", value_name = "MOUNTPOINT")]
    pub mountpoint_flag: Option<PathBuf>,
    /// os/arch[/variant] to pick from an index [default: this machine's].
    #[arg(long)]
    pub platform: Option<String>,
    /// Where the bootstrap, the config and the blob cache go, per manifest digest
    /// [default: $XDG_CACHE_HOME/rafsd/images, else ~/.cache/rafsd/images].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    pub thread_num: u32,
    #[command(flatten)]
    pub net: NetArgs,
}

pub fn run_convert(args: ConvertArgs) -> Result<ExitCode> {
    let defaults = BuildOptions::default();
    let build = BuildOptions {
        fs_version: args.fs_version,
        chunk_size: args.chunk_size,
        compressor: args.compressor,
        prefetch_files: args
            .prefetch_files
            .as_deref()
            .map(crate::builder::read_prefetch_list)
            .transpose()?
            .unwrap_or_default(),
        threads: args.threads.unwrap_or(defaults.threads).max(1),
        ..defaults
    };
    let opts = super::ConvertOptions {
        source: Reference::parse(&args.source)?,
        target: Reference::parse(&args.target)?,
        build,
        platforms: args
            .platform
            .iter()
            .map(|p| Platform::parse(p))
            .collect::<Result<_>>()?,
        merge_platform: args.merge_platform,
        max_layer_size: args.max_layer_size,
        max_layer_ratio: args.max_layer_ratio,
        net: args.net.options(),
        work_dir: args.work_dir.unwrap_or_else(std::env::temp_dir),
        cache_dir: match args.no_cache {
            true => None,
            false => Some(
                args.cache_dir
                    .unwrap_or_else(|| super::cache::default_root().join("convert")),
            ),
        },
    };
    let start = std::time::Instant::now();
    let r = super::convert(&opts)?;
    for (platform, digest) in &r.manifests {
        println!("{platform}: {digest}");
    }
    println!(
        "{} -> {} ({}) in {:.2}s: {} layers built, {} from the cache; pulled {} of {} source bytes; pushed {} blobs, {} bytes; {} blobs already there",
        opts.source,
        opts.target,
        r.target_digest,
        start.elapsed().as_secs_f64(),
        r.layers_built,
        r.layers_cached,
        r.bytes_pulled,
        r.source_bytes,
        r.blobs_pushed,
        r.bytes_pushed,
        r.blobs_present
    );
    Ok(ExitCode::SUCCESS)
}

/// Fetch the bootstrap, write the config, then become `rafsd fuse` on it.
pub fn run_mount_image(args: MountImageArgs) -> Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let reference = Reference::parse(&args.image)?;
    let mountpoint = args
        .mountpoint
        .or(args.mountpoint_flag)
        .ok_or_else(|| Error::Invalid("a mountpoint is needed".into()))?;
    let platform = match &args.platform {
        Some(p) => Platform::parse(p)?,
        None => Platform::host(),
    };
    let root = args
        .work_dir
        .unwrap_or_else(|| super::cache::default_root().join("images"));
    let prepared = super::mount::prepare(&reference, &platform, &args.net.options(), &root)?;
    log::info!(
        "{reference}: Nydus manifest {}, bootstrap {}",
        prepared.digest,
        prepared.bootstrap.display()
    );
    let exe = std::env::current_exe().map_err(|e| Error::io("find the rafsd binary", e))?;
    let level = log::max_level().to_string().to_lowercase();
    let err = std::process::Command::new(exe)
        .arg("fuse")
        .args(["--log-level", &level])
        .arg("--config")
        .arg(&prepared.config)
        .arg("--bootstrap")
        .arg(&prepared.bootstrap)
        .arg("--mountpoint")
        .arg(&mountpoint)
        .args(["--thread-num", &args.thread_num.to_string()])
        .exec();
    Err(Error::io("run rafsd fuse", err))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(super::parse_size("123"), Ok(123));
        assert_eq!(super::parse_size("4K"), Ok(4096));
        assert_eq!(super::parse_size("64g"), Ok(64 << 30));
        assert_eq!(super::parse_size("2T"), Ok(2 << 40));
        for bad in ["", "0", "G", "1.5G", "4X", "-1", "99999999999T"] {
            assert!(super::parse_size(bad).is_err(), "{bad}");
        }
    }
}
