//! Assembling a mountable RAFS filesystem from a bootstrap and a daemon config: backend, image, blob
//! cache, prefetch. Shared by the FUSE and virtio-fs front ends and by the admin API's mount calls.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cache::prefetch::{PrefetchTarget, Prefetcher};
use crate::config::{CacheKind, DaemonConfig};
use crate::error::{Error, Result};
use crate::fs::RafsFs;
use crate::image::{ImageOptions, RafsImage};
use crate::storage::backend_from_config;

/// What a mount needs: nydusd's `FsBackendMountCmd` for RAFS.
#[derive(Debug, Clone)]
pub struct RafsMount {
    pub bootstrap: PathBuf,
    pub config: DaemonConfig,
    /// Absolute paths inside the image to prefetch (overrides the image's prefetch table); "/" = all.
    pub prefetch_files: Vec<String>,
}

/// Open the image with the mount's backend and cache (and check that local blobs are there).
pub fn open_image(mount: &RafsMount) -> Result<Arc<RafsImage>> {
    let config = &mount.config;
    let backend = backend_from_config(&config.backend)?;
    let cache_dir = match config.cache.kind {
        CacheKind::BlobCache => config.cache.work_dir.clone(),
        CacheKind::None => None,
    };
    let opts = ImageOptions {
        validate: config.validate(),
        cache_dir,
        amplify_io: config.rafs.amplify_io,
        backend_location: config.backend.location(),
        record_demand: config.rafs.access_pattern,
    };
    let image = Arc::new(RafsImage::open(&mount.bootstrap, backend.clone(), opts)?);
    // A missing local blob fails the mount, not the first read. Network backends are not asked: a mount
    // must not need the network (an unreachable registry or an expired token would fail container start
    // even with every chunk in the cache); a missing blob is an error at the first read that needs it.
    if !backend.is_remote() {
        for blob in &image.info().blobs {
            backend.blob_size(&blob.id).map_err(|e| match e {
                Error::NotFound(m) => Error::NotFound(format!(
                    "data {m} (needed by {})",
                    mount.bootstrap.display()
                )),
                other => other,
            })?;
        }
    }
    Ok(image)
}

/// Open the image and start prefetch if configured.
pub fn build_rafs(mount: &RafsMount) -> Result<RafsFs> {
    let config = &mount.config;
    let image = open_image(mount)?;
    let fs = RafsFs::new(image.clone(), config.rafs.enable_xattr)
        .with_id_mapping(config.rafs.id_mapping)
        .with_file_metrics(crate::fs::metrics::FileMetricsOptions {
            iostats_files: config.rafs.iostats_files,
            access_pattern: config.rafs.access_pattern,
            latest_read_files: config.rafs.latest_read_files,
        });
    if config.rafs.prefetch.enable {
        if image.cache().is_none() {
            log::warn!("prefetch is enabled but there is no blob cache to fill; not prefetching");
        } else if let Some(target) =
            prefetch_target(&image, mount, config.rafs.prefetch.prefetch_all)?
        {
            log::info!(
                "prefetch: starting {:?} with {} threads",
                target_summary(&target),
                config.rafs.prefetch.threads
            );
            fs.set_prefetcher(Prefetcher::start(image, &config.rafs.prefetch, target));
        }
    }
    Ok(fs)
}

fn target_summary(t: &PrefetchTarget) -> String {
    match t {
        PrefetchTarget::All => "everything".into(),
        PrefetchTarget::Inodes(v) => format!("{} files/dirs", v.len()),
    }
}

/// Which files to prefetch: the mount's list, else the image's prefetch table, else all when asked.
fn prefetch_target(
    image: &RafsImage,
    mount: &RafsMount,
    prefetch_all: bool,
) -> Result<Option<PrefetchTarget>> {
    if !mount.prefetch_files.is_empty() {
        if mount.prefetch_files.iter().any(|p| p == "/") {
            return Ok(Some(PrefetchTarget::All));
        }
        let mut inos = Vec::new();
        for path in &mount.prefetch_files {
            match resolve_path(image, path)? {
                Some(ino) => inos.push(ino),
                None => log::warn!("prefetch: {path} is not in the image"),
            }
        }
        return Ok(Some(PrefetchTarget::Inodes(inos)));
    }
    let table = &image.info().prefetch;
    if table.len() == 1 && table[0] == image.root_ino() {
        return Ok(Some(PrefetchTarget::All));
    }
    if !table.is_empty() {
        return Ok(Some(PrefetchTarget::Inodes(table.clone())));
    }
    Ok(prefetch_all.then_some(PrefetchTarget::All))
}

/// Inode of an absolute path inside the image.
pub fn resolve_path(image: &RafsImage, path: &str) -> Result<Option<u64>> {
    if !path.starts_with('/') {
        return Err(Error::Invalid(format!(
            "prefetch path {path:?} is not absolute"
        )));
    }
    let mut ino = image.root_ino();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        match image.lookup(ino, part.as_bytes())? {
            Some(next) => ino = next,
            None => return Ok(None),
        }
    }
    Ok(Some(ino))
}

/// `--prefetch-files FILE`: one absolute path per line.
pub fn read_prefetch_list(file: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::io(format!("read prefetch list {}", file.display()), e))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// Raise RLIMIT_NOFILE as far as allowed; failure (EPERM in some sandboxes) is only a warning.
pub fn raise_nofile_limit(want: u64) {
    if want == 0 {
        return;
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur >= want {
        return;
    }
    let new = libc::rlimit {
        rlim_cur: want,
        rlim_max: want.max(lim.rlim_max),
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        let e = std::io::Error::last_os_error();
        let capped = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) };
        log::warn!(
            "cannot raise RLIMIT_NOFILE to {want} ({e}); continuing with {}",
            lim.rlim_max
        );
    }
}
