//! The `rafsd` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use rafsd::{check, inspect, unpack, ImageOptions, RafsImage};

#[derive(Parser)]
#[command(name = "rafsd", version, about = "Serve RAFS (Nydus) v5/v6 images to VMs and hosts")]
struct Cli {
    /// trace, debug, info, warn, error or off.
    #[arg(long, short = 'l', global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve an image on the host through /dev/fuse (also the default when no subcommand is given).
    Fuse(FuseArgs),
    /// Show an image's format version, flags, algorithms, counts and blob table.
    Inspect {
        /// Bootstrap, or a data blob with inlined metadata.
        bootstrap: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Read every file and verify every chunk; exit 1 on any error.
    Check {
        bootstrap: PathBuf,
        /// Directory holding the data blobs, named by blob id.
        #[arg(long, short = 'D')]
        blob_dir: Option<PathBuf>,
        /// Stop after this many errors.
        #[arg(long, default_value_t = 100)]
        max_errors: usize,
    },
    /// Write the image's tree to a directory (owners, modes, mtimes, xattrs, links, devices).
    Unpack {
        bootstrap: PathBuf,
        #[arg(long, short = 'D')]
        blob_dir: Option<PathBuf>,
        /// Output directory; must be empty or absent.
        #[arg(long, short = 'o')]
        output: PathBuf,
        /// Verify chunk digests while unpacking.
        #[arg(long)]
        validate: bool,
    },
}

/// Options of a FUSE daemon, spelled as nydusd spells them.
#[derive(clap::Args)]
struct FuseArgs {
    /// Where to mount.
    #[arg(long, short = 'M')]
    mountpoint: PathBuf,
    /// RAFS bootstrap (or inline-meta blob); without one an empty root waits for API mounts.
    #[arg(long, short = 'B')]
    bootstrap: Option<PathBuf>,
    /// Daemon config: nydusd v1 or v2 JSON.
    #[arg(long, short = 'C')]
    config: Option<PathBuf>,
    /// Blobs in DIR, cached in DIR (instead of --config).
    #[arg(long, short = 'D', conflicts_with = "config")]
    localfs_dir: Option<PathBuf>,
    /// FUSE worker threads.
    #[arg(long, alias = "fuse-threads", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    thread_num: u32,
    /// Admin API socket.
    #[arg(long, short = 'A')]
    apisock: Option<PathBuf>,
    /// File with absolute paths to prefetch, one per line ("/" = everything).
    #[arg(long)]
    prefetch_files: Option<PathBuf>,
    /// Instance id.
    #[arg(long)]
    id: Option<String>,
    /// Raise RLIMIT_NOFILE to this (best effort; 0 leaves it alone).
    #[arg(long, default_value_t = 1_000_000)]
    rlimit_nofile: u64,
}

/// nydusd runs its FUSE daemon when called with options only; so do we.
fn args_with_default_subcommand() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    let global_only = ["-h", "--help", "-V", "--version"].contains(&first);
    if first.starts_with('-') && !global_only {
        args.insert(1, "fuse".into());
    }
    args
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(args_with_default_subcommand());
    env_logger::Builder::new()
        .parse_filters(&cli.log_level)
        .format_timestamp_millis()
        .init();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rafsd: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(command: Command) -> rafsd::Result<ExitCode> {
    match command {
        Command::Fuse(args) => run_fuse(args),
        Command::Inspect { bootstrap, json } => {
            let image = RafsImage::open_local(&bootstrap, None, ImageOptions::default())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&inspect::to_json(&image)).unwrap_or_default());
            } else {
                print!("{}", inspect::to_text(&image));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { bootstrap, blob_dir, max_errors } => {
            let image = RafsImage::open_local(&bootstrap, blob_dir.as_deref(), ImageOptions { validate: true, ..Default::default() })?;
            let start = std::time::Instant::now();
            let report = check::check(&image, max_errors.max(1))?;
            for e in &report.errors {
                eprintln!("error: {e}");
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "checked {} entries, {} files, {} bytes in {:.2}s ({:.1} MB/s): {} errors",
                report.entries,
                report.files,
                report.bytes,
                secs,
                report.bytes as f64 / 1e6 / secs.max(1e-9),
                report.errors.len()
            );
            Ok(if report.errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Unpack { bootstrap, blob_dir, output, validate } => {
            let image = RafsImage::open_local(&bootstrap, blob_dir.as_deref(), ImageOptions { validate, ..Default::default() })?;
            let stats = unpack::unpack(&image, &output)?;
            println!("unpacked {} entries, {} files, {} bytes into {}", stats.entries, stats.files, stats.bytes, output.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run_fuse(args: FuseArgs) -> rafsd::Result<ExitCode> {
    use fuse_backend_rs::api::{Vfs, VfsOptions};
    use rafsd::config::DaemonConfig;
    use rafsd::service::{build_rafs, read_prefetch_list, RafsMount};
    // Before any thread exists, so every thread inherits the mask and signals reach our wait loop.
    let signals = rafsd::fusedev::block_shutdown_signals();
    rafsd::service::raise_nofile_limit(args.rlimit_nofile);
    if args.apisock.is_some() {
        log::warn!("--apisock: the admin API is not served by the FUSE daemon yet; ignoring it");
    }
    let mut config = match (&args.config, &args.localfs_dir) {
        (Some(path), _) => DaemonConfig::from_file(path)?,
        (None, Some(dir)) => DaemonConfig::localfs(dir.clone(), Some(dir.clone())),
        (None, None) if args.bootstrap.is_some() => {
            return Err(rafsd::Error::Invalid("--bootstrap needs --config or --localfs-dir".into()))
        }
        (None, None) => DaemonConfig::localfs(PathBuf::from("."), None),
    };
    if config.id.is_none() {
        config.id = args.id.clone();
    }
    let vfs = Arc::new(Vfs::new(VfsOptions { no_open: false, no_opendir: false, no_writeback: true, ..Default::default() }));
    if let Some(bootstrap) = &args.bootstrap {
        let prefetch_files = args.prefetch_files.as_deref().map(read_prefetch_list).transpose()?.unwrap_or_default();
        let fs = build_rafs(&RafsMount { bootstrap: bootstrap.clone(), config, prefetch_files })?;
        vfs.mount(Box::new(fs), "/").map_err(|e| rafsd::Error::Invalid(format!("mount image: {e:?}")))?;
    }
    rafsd::fusedev::serve(vfs, &args.mountpoint, args.thread_num as usize, &signals)?;
    Ok(ExitCode::SUCCESS)
}
