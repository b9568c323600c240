//! The `rafsd` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use rafsd::{check, inspect, unpack, ImageOptions, RafsImage};

#[derive(Parser)]
#[command(
    name = "rafsd",
    about = "Serve RAFS (Nydus) v5/v6 images to VMs and hosts",
    after_help = "rafsd --version (or -V) prints the version, git commit, build time, profile and compiler."
)]
struct Cli {
    /// trace, debug, info, warn, error or off.
    #[arg(long, short = 'l', global = true, default_value = "info")]
    log_level: String,
    /// Write the log to this file instead of stderr (created with its folder; ".log" is added to a
    /// name without an extension).
    #[arg(long, short = 'L', global = true)]
    log_file: Option<PathBuf>,
    /// Rotate the log file once it reaches this many MiB, keeping 5 older files; 0 never rotates.
    #[arg(long, global = true, default_value_t = 0)]
    log_rotation_size: u64,
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
    /// FUSE worker threads: how many requests are answered at once (a read waiting on the network
    /// occupies one; the kernel queues the rest).
    #[arg(long, alias = "fuse-threads", default_value_t = rafsd::fusedev::DEFAULT_THREADS as u32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    thread_num: u32,
    /// Admin API socket.
    #[arg(long, short = 'A')]
    apisock: Option<PathBuf>,
    /// File with absolute paths to prefetch, one per line ("/" = everything).
    #[arg(long)]
    prefetch_files: Option<PathBuf>,
    /// Instance id (nydus-snapshotter's daemon id; names the state sent to --supervisor).
    #[arg(long)]
    id: Option<String>,
    /// Raise RLIMIT_NOFILE to this (best effort; 0 leaves it alone).
    #[arg(long, default_value_t = 1_000_000)]
    rlimit_nofile: u64,
    /// Unix socket of the supervisor (nydus-snapshotter) that keeps this daemon's state and FUSE
    /// connection for failover and live upgrade: PUT /api/v1/daemon/fuse/sendfd sends them there,
    /// PUT /api/v1/daemon/fuse/takeover fetches them.
    #[arg(long)]
    supervisor: Option<PathBuf>,
    /// Start as the new daemon of a live upgrade: mount nothing, wait in state INIT for
    /// PUT /api/v1/daemon/fuse/takeover.
    #[arg(long)]
    upgrade: bool,
    /// What happens at takeover to requests the previous daemon read but never answered: resend
    /// (the kernel sends them again), flush (they fail with EIO) or none (left alone).
    #[arg(long, value_enum, default_value = "resend")]
    failover_policy: rafsd::fusedev::FailoverPolicy,
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
    /// Workers answering each request queue, which is also how many of its requests may be in flight
    /// (default 16; Kata's `=1` gets the default too); 0 answers them one at a time, in order.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=1024))]
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
    // nydusd's clients run `nydusd --version` and parse its `Git Commit:` line.
    let first = std::env::args_os().nth(1);
    if std::env::args_os().len() == 2
        && first
            .as_deref()
            .is_some_and(|a| a == "--version" || a == "-V")
    {
        print!("{}", rafsd::version::long_text());
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse_from(args_with_default_subcommand());
    let log_file = cli.log_file.as_deref().map(rafsd::logging::log_file_path);
    if let Err(e) = rafsd::logging::init(&cli.log_level, log_file.as_deref(), cli.log_rotation_size)
    {
        eprintln!("rafsd: {e}");
        return ExitCode::from(1);
    }
    match run(cli.command, log_file.as_deref()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rafsd: {}", rafsd::redact::text(&e.to_string()));
            ExitCode::from(1)
        }
    }
}

fn run(command: Command, log_file: Option<&std::path::Path>) -> rafsd::Result<ExitCode> {
    // The sandboxed daemon keeps writing (and rotating) its log in the log file's folder.
    let log_dir = log_file.and_then(std::path::Path::parent);
    match command {
        Command::Fuse(args) => run_fuse(args, log_dir),
        Command::Virtiofs(args) => run_virtiofs(args, log_dir),
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

/// The sandbox may write the log file's folder (it rotates files there); resolved now, while it exists.
fn allow_log_dir(allowed: &mut rafsd::sandbox::AllowedPaths, log_dir: Option<&std::path::Path>) {
    if let Some(dir) = log_dir.and_then(|d| d.canonicalize().ok()) {
        allowed.private_rw.push(dir);
    }
}

fn run_fuse(args: FuseArgs, log_dir: Option<&std::path::Path>) -> rafsd::Result<ExitCode> {
    use fuse_backend_rs::api::{Vfs, VfsOptions};
    use rafsd::config::DaemonConfig;
    use rafsd::daemon::{FsType, MountCmd};
    use rafsd::sandbox::{fork_supervised, Role, SandboxMode};
    use rafsd::service::read_prefetch_list;
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
    // The image given on the command line, as a mount request (kept whole for a successor daemon).
    let config_text = match (&args.config, &args.localfs_dir) {
        (Some(path), _) => {
            DaemonConfig::from_file(path)?;
            Some(
                std::fs::read_to_string(path)
                    .map_err(|e| rafsd::Error::io(format!("read config {}", path.display()), e))?,
            )
        }
        (None, Some(dir)) => Some(localfs_config(dir)),
        (None, None) if args.bootstrap.is_some() => {
            return Err(rafsd::Error::Invalid(
                "--bootstrap needs --config or --localfs-dir".into(),
            ))
        }
        (None, None) => None,
    };
    let config = config_text
        .as_deref()
        .map(|t| DaemonConfig::from_slice(t.as_bytes()))
        .transpose()?;
    let prefetch_files = args
        .prefetch_files
        .as_deref()
        .map(read_prefetch_list)
        .transpose()?
        .unwrap_or_default();
    let mut allowed = args.sandbox.allowed_paths()?;
    if let Some(bootstrap) = &args.bootstrap {
        allowed.add_read_only(bootstrap.parent().unwrap_or(bootstrap))?;
        if let Some(c) = &config {
            allowed.add_config(c)?;
        }
    } else if !args.sandbox.paths_given() {
        // nydus-snapshotter's shared daemon starts with nothing to serve and mounts every image
        // through the API, from its root; it cannot pass --allow-path.
        allowed =
            rafsd::sandbox::AllowedPaths::kata_defaults(None, rafsd::sandbox::SNAPSHOTTER_ROOTS)?;
    }
    // No network namespace for the FUSE daemon: API mounts may use network backends.
    allowed.network = true;
    allow_log_dir(&mut allowed, log_dir);
    // A restarted daemon whose predecessor was killed finds that daemon's mount still there and its
    // API socket dead: it waits for the takeover (nydusd does the same), as a live upgrade does.
    let crashed = !args.upgrade
        && args
            .apisock
            .as_deref()
            .is_some_and(|a| rafsd::fusedev::predecessor_crashed(&args.mountpoint, a));
    if crashed && args.supervisor.is_none() {
        // Nobody holds its connection for a takeover (nydus-snapshotter's recover_policy "restart"):
        // the dead mount only hides the mountpoint, and a fresh mount replaces it.
        log::warn!(
            "the previous daemon at {} died and no --supervisor can hand its connection over: detaching its mount",
            args.mountpoint.display()
        );
        rafsd::sandbox::unmount_fuse(&args.mountpoint);
    } else if crashed {
        log::warn!(
            "the previous daemon at {} died: waiting for PUT /api/v1/daemon/fuse/takeover",
            args.mountpoint.display()
        );
    }
    let crashed = crashed && args.supervisor.is_some();
    let api_listener = args
        .apisock
        .as_deref()
        .map(rafsd::api::http::bind)
        .transpose()?;
    let (fate, fate_reader) = rafsd::takeover::mount_fate_pipe()?;
    // The sandboxed daemon may not unmount; a supervisor outside the sandbox does it when the daemon
    // ends, unless the daemon said the mount outlives it (a successor takes it over).
    if let Role::Supervisor(exit) = fork_supervised(
        false,
        0,
        &signals,
        rafsd::sandbox::SUPERVISOR_CAPS_FUSE,
        args.sandbox.seccomp,
    )? {
        drop(api_listener);
        drop(fate);
        if fate_reader.should_unmount() {
            rafsd::sandbox::unmount_fuse(&args.mountpoint);
        } else {
            log::info!(
                "supervisor: leaving the FUSE mount at {} to the next daemon",
                args.mountpoint.display()
            );
        }
        if let Some(p) = &args.apisock {
            let _ = std::fs::remove_file(p);
        }
        exit.propagate();
    }
    drop(fate_reader);
    let vfs = Arc::new(Vfs::new(VfsOptions {
        no_open: false,
        no_opendir: false,
        no_writeback: true,
        ..Default::default()
    }));
    let id = config
        .as_ref()
        .and_then(|c| c.id.clone())
        .or_else(|| args.id.clone());
    let daemon = rafsd::daemon::Daemon::new(id, vfs.clone());
    let seccomp = args.sandbox.seccomp;
    let mut api = None;
    // Runs once the FUSE device is mounted (or, taking over, before waiting), before any worker starts.
    let start = |mount_image: bool| -> rafsd::Result<()> {
        // The readahead knob of our mount lives in sysfs.
        enter_sandbox(&daemon, allowed, &["/sys/devices/virtual/bdi"], seccomp)?;
        if let (true, Some(bootstrap), Some(text)) = (mount_image, &args.bootstrap, config_text) {
            let mut cmd = MountCmd::new(FsType::Rafs, bootstrap.clone(), text);
            cmd.prefetch_files = prefetch_files;
            cmd.id = args.id.clone();
            daemon.mount("/", cmd)?;
        }
        api = api_listener
            .map(|l| rafsd::api::start_on(l, daemon.clone()))
            .transpose()?;
        Ok(())
    };
    let opts = rafsd::fusedev::FuseOptions {
        mountpoint: args.mountpoint.clone(),
        threads: args.thread_num as usize,
        failover_policy: args.failover_policy,
        supervisor: args.supervisor.clone(),
        take_over: args.upgrade || crashed,
    };
    rafsd::fusedev::run(vfs, opts, &signals, &daemon, fate, start)?;
    Ok(ExitCode::SUCCESS)
}

/// `--localfs-dir DIR` as the nydusd config it stands for: blobs in DIR, cached in DIR.
fn localfs_config(dir: &std::path::Path) -> String {
    serde_json::json!({
        "device": {
            "backend": {"type": "localfs", "config": {"dir": dir}},
            "cache": {"type": "blobcache", "config": {"work_dir": dir}},
        },
        "mode": "direct",
    })
    .to_string()
}

fn run_virtiofs(args: VirtiofsArgs, log_dir: Option<&std::path::Path>) -> rafsd::Result<ExitCode> {
    use fuse_backend_rs::api::{Vfs, VfsOptions};
    use rafsd::daemon::{Daemon, FsType, MountCmd};
    use rafsd::sandbox::{fork_supervised, Role, SandboxMode};
    let signals = rafsd::fusedev::block_shutdown_signals();
    rafsd::service::raise_nofile_limit(args.rlimit_nofile);
    let pool_size = rafsd::vhost_user::pool_size(args.thread_pool_size);
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
            id: args.id.clone(),
        });
    } else if let Some(dir) = &args.shared_dir {
        allowed.add_read_write(dir)?;
        startup = Some(MountCmd {
            fs_type: FsType::Passthrough,
            source: absolute(dir),
            config: String::new(),
            prefetch_files,
            id: None,
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
    allow_log_dir(&mut allowed, log_dir);
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
    // Serving as soon as the API answers: Kata waits for RUNNING before it starts the VMM.
    daemon.set_state(rafsd::daemon::DaemonState::Running);
    let _api = api_listener
        .map(|l| rafsd::api::start_on(l, daemon.clone()))
        .transpose()?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sock, stop2) = (args.sock.clone(), stop.clone());
    let device = rafsd::vhost_user::DeviceOptions {
        request_queues: args.thread_num as usize,
        pool_size,
        dax_window_size: args.dax_window.unwrap_or(0),
    };
    let server = std::thread::Builder::new()
        .name("vhost-user".into())
        .spawn(move || rafsd::vhost_user::serve(vfs, listener, &sock, device, stop2))
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
