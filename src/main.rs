//! The `rafsd` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use rafsd::{check, inspect, unpack, ImageOptions, RafsImage};

#[derive(Parser)]
#[command(
    name = "rafsd",
    version,
    about = "Serve RAFS (Nydus) v5/v6 images to VMs and hosts"
)]
struct Cli {
    /// trace, debug, info, warn, error or off.
    #[arg(long, short = 'l', global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve images to a VM as a vhost-user-fs backend (what Kata runs as its nydusd).
    Virtiofs(VirtiofsArgs),
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
    /// Build a RAFS image from a directory, .tar or .tar.gz: a bootstrap plus one data blob.
    Build(BuildArgs),
    /// Convert an OCI image in a registry into a Nydus image in a registry (as `nydusify convert`).
    Convert(rafsd::convert::cli::ConvertArgs),
    /// Mount a Nydus image straight from its registry, read lazily through the registry backend.
    MountImage(rafsd::convert::cli::MountImageArgs),
    /// Merge layer bootstraps (lowest first) into one image, applying whiteouts.
    Merge {
        /// Layer bootstraps, lowest first.
        #[arg(required = true)]
        sources: Vec<PathBuf>,
        /// Output bootstrap.
        #[arg(long, short = 'B')]
        bootstrap: PathBuf,
        /// oci, overlayfs or none.
        #[arg(long, default_value = "oci")]
        whiteout_spec: rafsd::builder::WhiteoutSpec,
    },
    /// Turn an access trace (`/api/v1/metrics/pattern`) into a prefetch list for `rafsd build
    /// --prefetch-files`: the files read, as absolute paths, in the order they were first read.
    PrefetchList {
        /// The image the trace was recorded on.
        bootstrap: PathBuf,
        /// The trace (JSON); `-` for standard input.
        #[arg(default_value = "-")]
        trace: PathBuf,
        /// Write the list here instead of standard output.
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
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

/// Options of `rafsd build`, spelled as `nydus-image create` spells them.
#[derive(clap::Args)]
struct BuildArgs {
    /// A directory, a .tar or a .tar.gz (OCI layer).
    source: PathBuf,
    /// Output bootstrap (with --blob-inline-meta: an optional standalone copy).
    #[arg(long, short = 'B')]
    bootstrap: Option<PathBuf>,
    /// Where the data blob goes, named by its id (sha256 of the blob).
    #[arg(long, short = 'D')]
    blob_dir: PathBuf,
    #[arg(long, short = 'v', default_value_t = 6, value_parser = clap::value_parser!(u32).range(5..=6))]
    fs_version: u32,
    /// Hex (0x...) or decimal; a power of two from 0x1000 to 0x1000000.
    #[arg(long, default_value = "0x100000", value_parser = rafsd::builder::parse_chunk_size)]
    chunk_size: u32,
    /// none, lz4_block or zstd.
    #[arg(long, default_value = "zstd", value_parser = rafsd::builder::parse_compressor)]
    compressor: rafsd::format::Compressor,
    /// blake3 or sha256.
    #[arg(long, default_value = "blake3", value_parser = rafsd::builder::parse_digester)]
    digester: rafsd::format::Digester,
    /// Build an upper layer on this image (whiteouts applied, chunks deduplicated, blobs kept).
    #[arg(long)]
    parent_bootstrap: Option<PathBuf>,
    /// oci, overlayfs or none.
    #[arg(long, default_value = "oci")]
    whiteout_spec: rafsd::builder::WhiteoutSpec,
    /// File with absolute paths to put first in the blob and in the prefetch table, one per line.
    #[arg(long)]
    prefetch_files: Option<PathBuf>,
    /// Record no owners, for reproducible images.
    #[arg(long)]
    repeatable: bool,
    /// Put the bootstrap into the data blob (with a ToC).
    #[arg(long, alias = "inline-bootstrap")]
    blob_inline_meta: bool,
    /// Compression threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
}

/// Sandbox options of both daemons (see `src/sandbox.rs` and the README's "Sandbox" section).
#[derive(clap::Args)]
struct SandboxArgs {
    /// namespace, chroot or none [default: namespace for virtiofs; fuse supports none only].
    #[arg(long, value_enum)]
    sandbox: Option<rafsd::sandbox::SandboxMode>,
    /// What a syscall outside the policy does: kill, log, trap or none.
    #[arg(long, value_enum, default_value = "kill")]
    seccomp: rafsd::seccomp::SeccompMode,
    /// A directory (or file) the daemon may read: images and blobs of later API mounts. Repeatable.
    #[arg(long = "allow-path", value_name = "PATH")]
    allow_path: Vec<PathBuf>,
    /// A directory the daemon may write: cache work dirs and passthrough shares of later API mounts.
    /// Repeatable.
    #[arg(long = "allow-path-rw", value_name = "PATH")]
    allow_path_rw: Vec<PathBuf>,
    /// Keep the host network (no network namespace) so API mounts may use network backends.
    #[arg(long)]
    allow_network: bool,
}

impl SandboxArgs {
    /// Did the user say what the daemon may use (which switches the Kata defaults off)?
    fn paths_given(&self) -> bool {
        self.allow_network || !self.allow_path.is_empty() || !self.allow_path_rw.is_empty()
    }

    fn allowed_paths(&self) -> rafsd::Result<rafsd::sandbox::AllowedPaths> {
        let mut allowed = rafsd::sandbox::AllowedPaths {
            network: self.allow_network,
            ..Default::default()
        };
        for p in &self.allow_path {
            allowed.add_read_only(p)?;
        }
        for p in &self.allow_path_rw {
            allowed.add_read_write(p)?;
        }
        Ok(allowed)
    }
}

/// Landlock, capabilities and seccomp, in that order, on the (still single) calling thread; seccomp
/// also covers any other thread. Then the daemon refuses mounts outside `allowed`.
fn enter_sandbox(
    daemon: &rafsd::daemon::Daemon,
    allowed: rafsd::sandbox::AllowedPaths,
    extra_rw: &[&str],
    seccomp: rafsd::seccomp::SeccompMode,
) -> rafsd::Result<()> {
    rafsd::sandbox::restrict_filesystem(&allowed, extra_rw);
    rafsd::sandbox::drop_capabilities()?;
    rafsd::seccomp::install(seccomp)?;
    rafsd::sandbox::probe::daemon();
    daemon.confine(allowed);
    Ok(())
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
    #[command(flatten)]
    sandbox: SandboxArgs,
}

/// Options of the virtio-fs daemon. Kata runs `virtiofs --log-level info --apisock A --sock S` and
/// appends the virtiofsd options `--thread-pool-size=N --announce-submounts` by default.
#[derive(clap::Args)]
struct VirtiofsArgs {
    /// vhost-user socket the VMM connects to.
    #[arg(long)]
    sock: PathBuf,
    /// Admin API socket.
    #[arg(long, short = 'A')]
    apisock: Option<PathBuf>,
    /// An image to serve from the start (more can be mounted through the API).
    #[arg(long, short = 'B', requires = "config")]
    bootstrap: Option<PathBuf>,
    /// Daemon config for --bootstrap: nydusd v1 or v2 JSON.
    #[arg(long, short = 'C')]
    config: Option<PathBuf>,
    /// A host directory to share read-write (passthrough_fs).
    #[arg(long, short = 's', conflicts_with = "bootstrap")]
    shared_dir: Option<PathBuf>,
    /// Where in the share --bootstrap or --shared-dir appears.
    #[arg(long, short = 'm', default_value = "/")]
    virtual_mountpoint: String,
    /// Request queues offered to the VMM (its num-request-queues must not be larger).
    #[arg(long, default_value_t = rafsd::vhost_user::DEFAULT_REQUEST_QUEUES as u32, value_parser = clap::value_parser!(u32).range(1..=64))]
    thread_num: u32,
    /// File with absolute paths of --bootstrap to prefetch, one per line ("/" = everything).
    #[arg(long)]
    prefetch_files: Option<PathBuf>,
    /// Instance id.
    #[arg(long)]
    id: Option<String>,
    /// Raise RLIMIT_NOFILE to this (best effort; 0 leaves it alone).
    #[arg(long, default_value_t = 1_000_000)]
    rlimit_nofile: u64,
    /// Accepted for nydusd compatibility; every mount is already available.
    #[arg(long)]
    hybrid_mode: bool,
    /// virtiofsd option Kata appends; ignored (each queue has its own worker).
    #[arg(long)]
    thread_pool_size: Option<u32>,
    /// virtiofsd option Kata appends; ignored.
    #[arg(long)]
    announce_submounts: bool,
    /// Offer a DAX window of this size (e.g. 8G, 512M; a multiple of 2 MiB) through the vhost-user
    /// SHMEM protocol feature; off by default.
    #[arg(long, value_parser = rafsd::dax::parse_size)]
    dax_window: Option<u64>,
    #[command(flatten)]
    sandbox: SandboxArgs,
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
        Command::Virtiofs(args) => run_virtiofs(args),
        Command::Inspect { bootstrap, json } => {
            let image = RafsImage::open_local(&bootstrap, None, ImageOptions::default())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&inspect::to_json(&image)).unwrap_or_default()
                );
            } else {
                print!("{}", inspect::to_text(&image));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            bootstrap,
            blob_dir,
            max_errors,
        } => {
            let image = RafsImage::open_local(
                &bootstrap,
                blob_dir.as_deref(),
                ImageOptions {
                    validate: true,
                    ..Default::default()
                },
            )?;
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
            Ok(if report.errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Build(args) => run_build(args),
        Command::Convert(args) => rafsd::convert::cli::run_convert(args),
        Command::MountImage(args) => rafsd::convert::cli::run_mount_image(args),
        Command::Merge {
            sources,
            bootstrap,
            whiteout_spec,
        } => {
            let report = rafsd::builder::merge(&sources, &bootstrap, whiteout_spec)?;
            println!(
                "merged {} layers into {}: {} entries, {} blobs",
                report.layers,
                bootstrap.display(),
                report.entries,
                report.blobs
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::PrefetchList {
            bootstrap,
            trace,
            output,
        } => run_prefetch_list(&bootstrap, &trace, output.as_deref()),
        Command::Unpack {
            bootstrap,
            blob_dir,
            output,
            validate,
        } => {
            let image = RafsImage::open_local(
                &bootstrap,
                blob_dir.as_deref(),
                ImageOptions {
                    validate,
                    ..Default::default()
                },
            )?;
            let stats = unpack::unpack(&image, &output)?;
            println!(
                "unpacked {} entries, {} files, {} bytes into {}",
                stats.entries,
                stats.files,
                stats.bytes,
                output.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run_prefetch_list(
    bootstrap: &std::path::Path,
    trace: &std::path::Path,
    output: Option<&std::path::Path>,
) -> rafsd::Result<ExitCode> {
    use std::io::Read;
    let mut json = Vec::new();
    if trace == std::path::Path::new("-") {
        std::io::stdin()
            .read_to_end(&mut json)
            .map_err(|e| rafsd::Error::io("read the access trace from stdin", e))?;
    } else {
        json = std::fs::read(trace)
            .map_err(|e| rafsd::Error::io(format!("read {}", trace.display()), e))?;
    }
    let accesses = rafsd::prefetch_list::parse_pattern(&json)?;
    let image = RafsImage::open_local(bootstrap, None, ImageOptions::default())?;
    let list = rafsd::prefetch_list::prefetch_list(&image, &accesses)?;
    if !list.unknown.is_empty() {
        eprintln!(
            "rafsd: {} traced inodes are no listable regular file of {} (left out): {:?}",
            list.unknown.len(),
            bootstrap.display(),
            &list.unknown[..list.unknown.len().min(20)]
        );
    }
    let mut text = Vec::new();
    for p in &list.paths {
        text.extend_from_slice(p);
        text.push(b'\n');
    }
    match output {
        Some(path) => std::fs::write(path, &text)
            .map_err(|e| rafsd::Error::io(format!("write {}", path.display()), e))?,
        None => {
            use std::io::Write;
            std::io::stdout()
                .write_all(&text)
                .map_err(|e| rafsd::Error::io("write the prefetch list", e))?
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_build(args: BuildArgs) -> rafsd::Result<ExitCode> {
    use rafsd::builder::{build, read_prefetch_list, BuildOptions};
    let defaults = BuildOptions::default();
    let opts = BuildOptions {
        fs_version: args.fs_version,
        chunk_size: args.chunk_size,
        compressor: args.compressor,
        digester: args.digester,
        parent_bootstrap: args.parent_bootstrap,
        chunk_dict: Vec::new(),
        whiteout_spec: args.whiteout_spec,
        prefetch_files: args
            .prefetch_files
            .as_deref()
            .map(read_prefetch_list)
            .transpose()?
            .unwrap_or_default(),
        repeatable: args.repeatable,
        blob_inline_meta: args.blob_inline_meta,
        threads: args.threads.unwrap_or(defaults.threads).max(1),
    };
    let start = std::time::Instant::now();
    let report = build(
        &args.source,
        args.bootstrap.as_deref(),
        &args.blob_dir,
        &opts,
    )?;
    let secs = start.elapsed().as_secs_f64();
    if let Some(b) = &report.bootstrap {
        println!("bootstrap: {}", b.display());
    }
    match (&report.blob_id, &report.blob_path) {
        (Some(id), Some(path)) => println!(
            "blob: {id} ({} bytes, {})",
            report.blob_size,
            path.display()
        ),
        _ => println!("blob: none (the layer adds no file data)"),
    }
    let c = &report.chunks;
    println!(
        "{} entries; read {} bytes in {secs:.2}s ({:.1} MB/s); wrote {} chunks, {} bytes; deduplicated {} chunks, {} bytes",
        report.entries,
        c.bytes_read,
        c.bytes_read as f64 / 1e6 / secs.max(1e-9),
        c.chunks_written,
        c.bytes_written,
        c.chunks_deduped,
        c.bytes_deduped
    );
    for s in &report.skipped {
        eprintln!("skipped: {s}");
    }
    Ok(ExitCode::SUCCESS)
}

fn run_fuse(args: FuseArgs) -> rafsd::Result<ExitCode> {
    use fuse_backend_rs::api::{Vfs, VfsOptions};
    use rafsd::config::DaemonConfig;
    use rafsd::sandbox::{fork_supervised, Role, SandboxMode};
    use rafsd::service::{build_rafs, read_prefetch_list, RafsMount};
    // Before any thread exists, so every thread inherits the mask and signals reach our wait loop.
    let signals = rafsd::fusedev::block_shutdown_signals();
    rafsd::service::raise_nofile_limit(args.rlimit_nofile);
    if !matches!(args.sandbox.sandbox, None | Some(SandboxMode::None)) {
        // A private mount namespace would keep the FUSE mount from the host that wants to see it.
        return Err(rafsd::Error::Unsupported(
            "rafsd fuse supports --sandbox none only (Landlock, capabilities and seccomp still apply)"
                .into(),
        ));
    }
    let mut config = match (&args.config, &args.localfs_dir) {
        (Some(path), _) => DaemonConfig::from_file(path)?,
        (None, Some(dir)) => DaemonConfig::localfs(dir.clone(), Some(dir.clone())),
        (None, None) if args.bootstrap.is_some() => {
            return Err(rafsd::Error::Invalid(
                "--bootstrap needs --config or --localfs-dir".into(),
            ))
        }
        (None, None) => DaemonConfig::localfs(PathBuf::from("."), None),
    };
    if config.id.is_none() {
        config.id = args.id.clone();
    }
    let prefetch_files = args
        .prefetch_files
        .as_deref()
        .map(read_prefetch_list)
        .transpose()?
        .unwrap_or_default();
    let mut allowed = args.sandbox.allowed_paths()?;
    // No network namespace for the FUSE daemon: API mounts may use network backends.
    allowed.network = true;
    if let Some(bootstrap) = &args.bootstrap {
        allowed.add_read_only(bootstrap.parent().unwrap_or(bootstrap))?;
        allowed.add_config(&config)?;
    }
    let api_listener = args
        .apisock
        .as_deref()
        .map(rafsd::api::http::bind)
        .transpose()?;
    // The sandboxed daemon may not unmount; a supervisor outside the sandbox does it when the daemon ends.
    if let Role::Supervisor(exit) = fork_supervised(
        false,
        0,
        &signals,
        rafsd::sandbox::SUPERVISOR_CAPS_FUSE,
        args.sandbox.seccomp,
    )? {
        drop(api_listener);
        rafsd::sandbox::unmount_fuse(&args.mountpoint);
        if let Some(p) = &args.apisock {
            let _ = std::fs::remove_file(p);
        }
        exit.propagate();
    }
    let vfs = Arc::new(Vfs::new(VfsOptions {
        no_open: false,
        no_opendir: false,
        no_writeback: true,
        ..Default::default()
    }));
    let daemon = rafsd::daemon::Daemon::new(config.id.clone(), vfs.clone());
    let seccomp = args.sandbox.seccomp;
    let mut api = None;
    // Runs once the FUSE device is mounted and its channels are open, before any thread starts.
    let start = || -> rafsd::Result<()> {
        // The readahead knob of our mount lives in sysfs.
        enter_sandbox(&daemon, allowed, &["/sys/devices/virtual/bdi"], seccomp)?;
        if let Some(bootstrap) = &args.bootstrap {
            let id = config.id.clone();
            let fs = build_rafs(&RafsMount {
                bootstrap: bootstrap.clone(),
                config,
                prefetch_files,
            })?;
            daemon.attach(
                "/",
                rafsd::daemon::FsType::Rafs,
                bootstrap.clone(),
                Box::new(fs),
                id,
            )?;
        }
        api = api_listener
            .map(|l| rafsd::api::start_on(l, daemon.clone()))
            .transpose()?;
        Ok(())
    };
    rafsd::fusedev::serve(
        vfs.clone(),
        &args.mountpoint,
        args.thread_num as usize,
        &signals,
        &daemon,
        start,
    )?;
    Ok(ExitCode::SUCCESS)
}

fn run_virtiofs(args: VirtiofsArgs) -> rafsd::Result<ExitCode> {
    use fuse_backend_rs::api::{Vfs, VfsOptions};
    use rafsd::daemon::{Daemon, FsType, MountCmd};
    use rafsd::sandbox::{fork_supervised, Role, SandboxMode};
    let signals = rafsd::fusedev::block_shutdown_signals();
    rafsd::service::raise_nofile_limit(args.rlimit_nofile);
    if let Some(n) = args.thread_pool_size {
        log::warn!("--thread-pool-size={n} is a virtiofsd option; ignored (each virtqueue has its own worker)");
    }
    if args.announce_submounts {
        log::warn!("--announce-submounts is a virtiofsd option; ignored");
    }
    let vfs = Arc::new(Vfs::new(VfsOptions {
        no_open: false,
        no_opendir: false,
        no_writeback: true,
        ..Default::default()
    }));
    let daemon = Daemon::new(args.id.clone(), vfs.clone());
    let prefetch_files = args
        .prefetch_files
        .as_deref()
        .map(rafsd::service::read_prefetch_list)
        .transpose()?
        .unwrap_or_default();
    let mut allowed = args.sandbox.allowed_paths()?;
    let mut startup = None;
    // The sandboxed daemon mounts these from its own root: a relative path must name the host's file.
    let absolute = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
    if let (Some(bootstrap), Some(config)) = (&args.bootstrap, &args.config) {
        let text = std::fs::read_to_string(config)
            .map_err(|e| rafsd::Error::io(format!("read config {}", config.display()), e))?;
        allowed.add_read_only(bootstrap.parent().unwrap_or(bootstrap))?;
        allowed.add_config(&rafsd::config::DaemonConfig::from_slice(text.as_bytes())?)?;
        startup = Some(MountCmd {
            fs_type: FsType::Rafs,
            source: absolute(bootstrap),
            config: text,
            prefetch_files,
        });
    } else if let Some(dir) = &args.shared_dir {
        allowed.add_read_write(dir)?;
        startup = Some(MountCmd {
            fs_type: FsType::Passthrough,
            source: absolute(dir),
            config: String::new(),
            prefetch_files,
        });
    }
    // Kata starts nydusd with nothing to serve and no room for our options (only
    // virtio_fs_extra_args): without defaults every one of its API mounts would be refused.
    // Kata names the sandbox in the socket paths: only that sandbox's share is exposed.
    if startup.is_none() && !args.sandbox.paths_given() {
        let sockets: Vec<&std::path::Path> = [Some(args.sock.as_path()), args.apisock.as_deref()]
            .into_iter()
            .flatten()
            .collect();
        allowed = rafsd::sandbox::AllowedPaths::kata_defaults(
            rafsd::sandbox::kata_sandbox_dir(&sockets).as_deref(),
            rafsd::sandbox::SNAPSHOTTER_ROOTS,
        )?;
    }
    // Both sockets are bound on the host before the sandbox hides their paths.
    let listener = rafsd::vhost_user::bind(&args.sock)?;
    let api_listener = args
        .apisock
        .as_deref()
        .map(rafsd::api::http::bind)
        .transpose()?;
    match args.sandbox.sandbox.unwrap_or(SandboxMode::Namespace) {
        SandboxMode::Namespace => {
            // Registry/OSS/S3 backends need the host network: keep it when one may be used.
            let mut flags = libc::CLONE_NEWNS;
            if !allowed.network {
                flags |= libc::CLONE_NEWNET;
            }
            if let Role::Supervisor(exit) = fork_supervised(
                true,
                flags,
                &signals,
                rafsd::sandbox::SUPERVISOR_CAPS_VIRTIOFS,
                args.sandbox.seccomp,
            )? {
                drop(api_listener);
                drop(listener);
                for p in [Some(&args.sock), args.apisock.as_ref()]
                    .into_iter()
                    .flatten()
                {
                    let _ = std::fs::remove_file(p);
                }
                exit.propagate();
            }
            rafsd::sandbox::build_root(&allowed)?;
        }
        SandboxMode::Chroot => {
            // SAFETY: unshare of the mount namespace; single-threaded here.
            if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
                return Err(rafsd::Error::io(
                    "unshare the mount namespace (needs root)",
                    std::io::Error::last_os_error(),
                ));
            }
            rafsd::sandbox::build_root(&allowed)?;
        }
        SandboxMode::None => {}
    }
    enter_sandbox(&daemon, allowed, &[], args.sandbox.seccomp)?;
    if let Some(cmd) = startup {
        daemon.mount(&args.virtual_mountpoint, cmd)?;
    }
    let _api = api_listener
        .map(|l| rafsd::api::start_on(l, daemon.clone()))
        .transpose()?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sock, queues, stop2) = (args.sock.clone(), args.thread_num as usize, stop.clone());
    let dax_window = args.dax_window.unwrap_or(0);
    let server = std::thread::Builder::new()
        .name("vhost-user".into())
        .spawn(move || rafsd::vhost_user::serve(vfs, listener, &sock, queues, dax_window, stop2))
        .map_err(|e| rafsd::Error::io("start vhost-user thread", e))?;
    loop {
        if let Some(sig) =
            rafsd::fusedev::wait_for_signal(&signals, std::time::Duration::from_millis(200))
        {
            log::info!("signal {sig}: shutting down");
            break;
        }
        if daemon.exit_requested() {
            break;
        }
        if server.is_finished() {
            match server.join() {
                Ok(Err(e)) => return Err(e),
                _ => break,
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    // The vhost-user thread may sit in accept(); the process exits without waiting for it.
    for p in [Some(&args.sock), args.apisock.as_ref()]
        .into_iter()
        .flatten()
    {
        let _ = std::fs::remove_file(p);
    }
    log::info!("rafsd virtiofs stopped");
    Ok(ExitCode::SUCCESS)
}
