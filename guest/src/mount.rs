//! `rafs-guest mount`: mount a RAFS v6 bootstrap with the kernel's EROFS driver, each blob of the device
//! table as an extra device. Files are passed straight to the kernel where it takes file-backed mounts
//! (Linux ≥ 6.12, CONFIG_EROFS_FS_BACKED_BY_FILE); older kernels get read-only loop devices.

use std::path::{Path, PathBuf};

use crate::erofs::read_bootstrap;
use crate::sys;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// File-backed on ≥ 6.12, loop devices before.
    Auto,
    File,
    Loop,
}

pub struct MountArgs {
    pub bootstrap: PathBuf,
    pub blob_dir: PathBuf,
    pub target: PathBuf,
    pub backing: Backing,
    /// Extra EROFS mount options (e.g. `directio`), appended to the `device=` list.
    pub options: Option<String>,
}

pub fn run(args: &MountArgs) -> Result<(), String> {
    let image = read_bootstrap(&args.bootstrap)?;
    let mut blobs = Vec::new();
    for dev in &image.devices {
        let path = args.blob_dir.join(&dev.tag);
        let meta = std::fs::metadata(&path).map_err(|e| {
            format!(
                "blob {} named by the bootstrap's device table: {}: {e}",
                dev.tag,
                path.display()
            )
        })?;
        let need = dev.blocks * image.block_size;
        if !meta.is_file() || meta.len() < need {
            return Err(format!(
                "blob {}: {} is {} bytes, the bootstrap addresses {need} (an uncompressed blob view is needed, e.g. rafsd's blob_view mount)",
                dev.tag,
                path.display(),
                meta.len()
            ));
        }
        blobs.push(path);
    }
    ensure_erofs()?;
    let backing = match args.backing {
        Backing::Auto if sys::kernel_at_least(6, 12) => Backing::File,
        Backing::Auto => Backing::Loop,
        other => other,
    };
    match backing {
        Backing::File => mount_erofs(&args.bootstrap, &blobs, &args.target, &args.options),
        _ => {
            // The loop devices detach themselves (AUTOCLEAR) once the mount is gone and our fds are closed.
            let main = sys::LoopDevice::attach(&args.bootstrap)?;
            let mut devs = Vec::new();
            for b in &blobs {
                devs.push(sys::LoopDevice::attach(b)?);
            }
            let dev_paths: Vec<PathBuf> = devs.iter().map(|d| d.path.clone()).collect();
            mount_erofs(&main.path, &dev_paths, &args.target, &args.options)
        }
    }
}

fn mount_erofs(
    source: &Path,
    devices: &[PathBuf],
    target: &Path,
    extra: &Option<String>,
) -> Result<(), String> {
    let mut opts = extra.clone().unwrap_or_default();
    for d in devices {
        if !opts.is_empty() {
            opts.push(',');
        }
        let d = d
            .to_str()
            .ok_or_else(|| format!("{}: not UTF-8", d.display()))?;
        if d.contains(',') {
            return Err(format!(
                "{d}: a device path cannot hold ',' (mount option separator)"
            ));
        }
        opts.push_str("device=");
        opts.push_str(d);
    }
    // The kernel copies one page of mount data.
    if opts.len() >= 4096 {
        return Err(format!(
            "{} devices need {} bytes of mount options, more than the kernel's 4095",
            devices.len(),
            opts.len()
        ));
    }
    // Only what the driver logs for this mount goes into the error.
    let logged_before = sys::kernel_log_lines("erofs:").len();
    sys::mount(source, target, "erofs", libc::MS_RDONLY, &opts).map_err(|e| {
        let hint = match e.raw_os_error() {
            Some(libc::EINVAL) => "the kernel refused the bootstrap or a device (not an EROFS image it can mount)",
            Some(libc::ENOTBLK) => "the kernel wants block devices here (no file-backed EROFS mounts before 6.12): try --loop",
            Some(libc::EOPNOTSUPP) => "the kernel lacks an EROFS feature this image uses",
            Some(libc::EIO) => "reading the bootstrap or a blob failed (the host daemon logs why)",
            _ => "mount failed",
        };
        let log = sys::kernel_log_lines("erofs:");
        let log = log.get(logged_before..).unwrap_or_default();
        format!(
            "mount -t erofs {} on {} ({opts}): {e}: {hint}{}{}",
            source.display(),
            target.display(),
            if log.is_empty() { "" } else { "; kernel log:\n  " },
            log.join("\n  ")
        )
    })
}

/// The EROFS driver must be registered: built in, loaded, or loadable with modprobe.
fn ensure_erofs() -> Result<(), String> {
    let registered = || {
        std::fs::read_to_string("/proc/filesystems")
            .map(|t| {
                t.lines()
                    .any(|l| l.split_whitespace().last() == Some("erofs"))
            })
            .unwrap_or(false)
    };
    if registered() {
        return Ok(());
    }
    let tried = std::process::Command::new("modprobe").arg("erofs").output();
    if registered() {
        return Ok(());
    }
    let why = match tried {
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => format!("modprobe: {e}"),
    };
    Err(format!(
        "this kernel ({}) has no EROFS driver: erofs is not in /proc/filesystems and `modprobe erofs` did not load it ({why}); a kernel with CONFIG_EROFS_FS is needed",
        sys::kernel_release()
    ))
}
