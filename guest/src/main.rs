//! `rafs-guest`: the in-guest helper that mounts RAFS v6 images with the guest kernel's EROFS driver, so
//! the host stays out of every metadata operation. Statically linked; runs in a busybox initramfs.
//!
//! - `rafs-guest mount --bootstrap P --blob-dir D [--file|--loop] [-o OPTIONS] TARGET`: EROFS from the bootstrap, each
//!   blob of its device table (`D/<blob id>`, uncompressed, as rafsd's blob view serves them) a device.
//! - `rafs-guest fscache --dir CACHE --bootstrap P --blob-dir D --fsid F [--mount TARGET]`: the
//!   EROFS-over-fscache on-demand daemon (kernels with CONFIG_EROFS_FS_ONDEMAND).

mod erofs;
mod fscache;
mod mount;
mod sys;

use std::path::PathBuf;

const USAGE: &str = "usage:
  rafs-guest mount --bootstrap BOOTSTRAP --blob-dir DIR [--file | --loop] [-o OPTIONS] TARGET
  rafs-guest fscache --dir CACHE_DIR --bootstrap BOOTSTRAP --blob-dir DIR --fsid FSID [--mount TARGET]
  rafs-guest devices BOOTSTRAP";

/// `--name value` options and positional words.
struct Args {
    opts: Vec<(String, Option<String>)>,
    words: Vec<String>,
}

impl Args {
    fn parse(raw: &[String], flags: &[&str]) -> Result<Self, String> {
        let mut a = Args {
            opts: Vec::new(),
            words: Vec::new(),
        };
        let mut it = raw.iter();
        while let Some(w) = it.next() {
            if flags.contains(&w.as_str()) {
                a.opts.push((w.clone(), None));
            } else if w.starts_with("--") || w == "-o" {
                let v = it.next().ok_or_else(|| format!("{w} needs a value"))?;
                a.opts.push((w.clone(), Some(v.clone())));
            } else {
                a.words.push(w.clone());
            }
        }
        Ok(a)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.opts
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn need(&self, name: &str) -> Result<PathBuf, String> {
        self.get(name)
            .map(PathBuf::from)
            .ok_or_else(|| format!("{name} is required"))
    }

    fn has(&self, name: &str) -> bool {
        self.opts.iter().any(|(n, _)| n == name)
    }

    fn check_known(&self, known: &[&str]) -> Result<(), String> {
        match self.opts.iter().find(|(n, _)| !known.contains(&n.as_str())) {
            Some((n, _)) => Err(format!("unknown option {n}")),
            None => Ok(()),
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let result = match argv.first().map(String::as_str) {
        Some("mount") => cmd_mount(&argv[1..]),
        Some("fscache") => cmd_fscache(&argv[1..]),
        Some("devices") => cmd_devices(&argv[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(format!("expected a command\n{USAGE}")),
    };
    if let Err(e) = result {
        eprintln!("rafs-guest: error: {e}");
        std::process::exit(1);
    }
}

fn cmd_mount(raw: &[String]) -> Result<(), String> {
    let a = Args::parse(raw, &["--file", "--loop"])?;
    a.check_known(&["--bootstrap", "--blob-dir", "--file", "--loop", "-o"])?;
    let [target] = a.words.as_slice() else {
        return Err(format!("mount takes one TARGET\n{USAGE}"));
    };
    let backing = match (a.has("--file"), a.has("--loop")) {
        (true, true) => return Err("--file and --loop exclude each other".into()),
        (true, false) => mount::Backing::File,
        (false, true) => mount::Backing::Loop,
        (false, false) => mount::Backing::Auto,
    };
    mount::run(&mount::MountArgs {
        bootstrap: a.need("--bootstrap")?,
        blob_dir: a.need("--blob-dir")?,
        target: PathBuf::from(target),
        backing,
        options: a.get("-o").map(String::from),
    })
}

fn cmd_fscache(raw: &[String]) -> Result<(), String> {
    let a = Args::parse(raw, &[])?;
    a.check_known(&["--dir", "--bootstrap", "--blob-dir", "--fsid", "--mount"])?;
    fscache::run(&fscache::FscacheArgs {
        cache_dir: a.need("--dir")?,
        bootstrap: a.need("--bootstrap")?,
        blob_dir: a.need("--blob-dir")?,
        fsid: a.get("--fsid").ok_or("--fsid is required")?.to_string(),
        mount: a.get("--mount").map(PathBuf::from),
    })
}

/// Print the blob ids of a bootstrap's device table, one a line (for scripts).
fn cmd_devices(raw: &[String]) -> Result<(), String> {
    let [path] = raw else {
        return Err(format!("devices takes one BOOTSTRAP\n{USAGE}"));
    };
    let b = erofs::read_bootstrap(std::path::Path::new(path))?;
    for d in b.devices {
        println!("{} {}", d.tag, d.blocks * b.block_size);
    }
    Ok(())
}
