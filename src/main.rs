//! The `rafsd` command line.

use std::path::PathBuf;
use std::process::ExitCode;

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
    Virtiofs(rafsd::launch::VirtiofsArgs),
    /// Serve an image on the host through /dev/fuse (also the default when no subcommand is given).
    Fuse(rafsd::launch::FuseArgs),
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
        Command::Fuse(args) => rafsd::launch::fuse(args, log_dir).map(|()| ExitCode::SUCCESS),
        Command::Virtiofs(args) => {
            rafsd::launch::virtiofs(args, log_dir).map(|()| ExitCode::SUCCESS)
        }
        Command::Inspect { bootstrap, json } => run_inspect(&bootstrap, json),
        Command::Check {
            bootstrap,
            blob_dir,
            max_errors,
        } => run_check(&bootstrap, blob_dir.as_deref(), max_errors),
        Command::Build(args) => run_build(args),
        Command::Convert(args) => rafsd::convert::cli::run_convert(args),
        Command::MountImage(args) => rafsd::convert::cli::run_mount_image(args),
        Command::Merge {
            sources,
            bootstrap,
            whiteout_spec,
        } => run_merge(&sources, &bootstrap, whiteout_spec),
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
        } => run_unpack(&bootstrap, blob_dir.as_deref(), &output, validate),
    }
}

fn run_inspect(bootstrap: &std::path::Path, json: bool) -> rafsd::Result<ExitCode> {
    let image = RafsImage::open_local(bootstrap, None, ImageOptions::default())?;
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

fn run_check(
    bootstrap: &std::path::Path,
    blob_dir: Option<&std::path::Path>,
    max_errors: usize,
) -> rafsd::Result<ExitCode> {
    let image = RafsImage::open_local(
        bootstrap,
        blob_dir,
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

fn run_merge(
    sources: &[PathBuf],
    bootstrap: &std::path::Path,
    whiteout_spec: rafsd::builder::WhiteoutSpec,
) -> rafsd::Result<ExitCode> {
    let report = rafsd::builder::merge(sources, bootstrap, whiteout_spec)?;
    println!(
        "merged {} layers into {}: {} entries, {} blobs",
        report.layers,
        bootstrap.display(),
        report.entries,
        report.blobs
    );
    Ok(ExitCode::SUCCESS)
}

fn run_unpack(
    bootstrap: &std::path::Path,
    blob_dir: Option<&std::path::Path>,
    output: &std::path::Path,
    validate: bool,
) -> rafsd::Result<ExitCode> {
    let image = RafsImage::open_local(
        bootstrap,
        blob_dir,
        ImageOptions {
            validate,
            ..Default::default()
        },
    )?;
    let stats = unpack::unpack(&image, output)?;
    println!(
        "unpacked {} entries, {} files, {} bytes into {}",
        stats.entries,
        stats.files,
        stats.bytes,
        output.display()
    );
    Ok(ExitCode::SUCCESS)
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
