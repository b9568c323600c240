//! The `rafsd` command line.

use std::path::PathBuf;
use std::process::ExitCode;

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

fn main() -> ExitCode {
    let cli = Cli::parse();
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
            let image = RafsImage::open_local(&bootstrap, blob_dir.as_deref(), ImageOptions { validate: true })?;
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
            let image = RafsImage::open_local(&bootstrap, blob_dir.as_deref(), ImageOptions { validate })?;
            let stats = unpack::unpack(&image, &output)?;
            println!("unpacked {} entries, {} files, {} bytes into {}", stats.entries, stats.files, stats.bytes, output.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}
