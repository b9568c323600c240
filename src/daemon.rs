//! The running daemon's state, shared by its front end (FUSE or virtio-fs) and the admin API: the `Vfs`
//! whose pseudo mounts are the images and shares, a record of each mount, and the daemon state machine.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fuse_backend_rs::api::{BackFileSystem, Vfs};
use serde_json::{json, Value};

use crate::config::DaemonConfig;
use crate::error::{Error, Result};
use crate::fs::blob_view::BlobViewFs;
use crate::fs::RafsFs;
use crate::passthrough::ConfinedPassthrough;
use crate::service::{build_rafs, RafsMount};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Rafs,
    Passthrough,
    /// The bootstrap and uncompressed blobs of a RAFS v6 image, for the guest's EROFS driver.
    BlobView,
}

impl FsType {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "rafs" => Ok(FsType::Rafs),
            "passthrough" | "passthroughfs" | "passthrough_fs" => Ok(FsType::Passthrough),
            "blob_view" => Ok(FsType::BlobView),
            "" => Err(Error::Invalid(
                "fs_type is required (\"rafs\", \"passthrough_fs\" or \"blob_view\")".into(),
            )),
            other => Err(Error::Invalid(format!(
                "unknown fs_type {other:?} (\"rafs\", \"passthrough_fs\" or \"blob_view\")"
            ))),
        }
    }

    fn backend_type(self) -> &'static str {
        match self {
            FsType::Rafs => "Rafs",
            FsType::Passthrough => "PassthroughFs",
            FsType::BlobView => "BlobView",
        }
    }
}

/// A mount request, as the API and the command line give it.
#[derive(Debug, Clone)]
pub struct MountCmd {
    pub fs_type: FsType,
    pub source: PathBuf,
    /// The daemon config as JSON text (empty for passthrough).
    pub config: String,
    pub prefetch_files: Vec<String>,
}

struct MountRecord {
    fs_type: FsType,
    source: PathBuf,
    config_id: Option<String>,
    /// The mount's config with credentials blanked and URL userinfo masked, for `GET /daemon`.
    config: Value,
    mounted_time: String,
}

pub struct Daemon {
    pub id: Option<String>,
    pub vfs: Arc<Vfs>,
    mounts: Mutex<BTreeMap<String, MountRecord>>,
    /// Serialises mount changes so checks and the Vfs update happen as one step.
    mount_lock: Mutex<()>,
    shutdown: AtomicBool,
    /// Set once the sandbox is up: the paths mounts may use.
    allowed: std::sync::OnceLock<crate::sandbox::AllowedPaths>,
}

/// Mountpoints are absolute paths of plain components: no "." or "..", no empty or over-long parts.
pub fn check_mountpoint(mp: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::Invalid(format!("mountpoint {mp:?} {why}")));
    if !mp.starts_with('/') {
        return bad("must be an absolute path");
    }
    if mp.len() > 4096 || mp.contains('\0') {
        return bad("is too long or contains NUL");
    }
    if mp == "/" {
        return Ok(());
    }
    for part in mp[1..].split('/') {
        if part.is_empty() || part == "." || part == ".." || part.len() > 255 {
            return bad("must consist of plain names (no empty, \".\" or \"..\" components)");
        }
    }
    Ok(())
}

fn nested(a: &str, b: &str) -> bool {
    let under = |x: &str, y: &str| y == "/" || x == y || x.starts_with(&format!("{y}/"));
    under(a, b) || under(b, a)
}

fn now_string() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:09}", t.as_secs(), t.subsec_nanos())
}

impl Daemon {
    pub fn new(id: Option<String>, vfs: Arc<Vfs>) -> Arc<Self> {
        Arc::new(Daemon {
            id,
            vfs,
            mounts: Mutex::new(BTreeMap::new()),
            mount_lock: Mutex::new(()),
            shutdown: AtomicBool::new(false),
            allowed: std::sync::OnceLock::new(),
        })
    }

    pub fn request_exit(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }

    pub fn exit_requested(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    pub fn state(&self) -> &'static str {
        if self.exit_requested() {
            "STOPPED"
        } else {
            "RUNNING"
        }
    }

    /// From now on, refuse mounts whose paths lie outside `allowed` (the sandbox could not reach them).
    pub fn confine(&self, allowed: crate::sandbox::AllowedPaths) {
        let _ = self.allowed.set(allowed);
    }

    fn build(&self, cmd: &MountCmd) -> Result<(BackFileSystem, Option<String>, Value)> {
        let allowed = self.allowed.get();
        match cmd.fs_type {
            FsType::Rafs | FsType::BlobView => {
                let mut config = DaemonConfig::from_slice(cmd.config.as_bytes())?;
                let mut bootstrap = cmd.source.clone();
                if let Some(allowed) = allowed {
                    allowed.confine_rafs(&mut bootstrap, &mut config)?;
                }
                let shown = crate::redact::json(
                    &serde_json::from_str::<Value>(&cmd.config).unwrap_or(Value::Null),
                );
                let id = config.id.clone();
                let mount = RafsMount {
                    bootstrap,
                    config,
                    prefetch_files: cmd.prefetch_files.clone(),
                };
                let fs: BackFileSystem = if cmd.fs_type == FsType::Rafs {
                    Box::new(build_rafs(&mount)?)
                } else {
                    Box::new(BlobViewFs::build(&mount)?)
                };
                Ok((fs, id, shown))
            }
            FsType::Passthrough => {
                let mut dir = cmd.source.clone();
                if let Some(allowed) = allowed {
                    allowed.confine_share(&mut dir)?;
                }
                Ok((Box::new(ConfinedPassthrough::new(&dir)?), None, Value::Null))
            }
        }
    }

    /// Attach a filesystem at `mountpoint`. A used path, or one nested in or around another mount, is refused.
    pub fn mount(&self, mountpoint: &str, cmd: MountCmd) -> Result<()> {
        check_mountpoint(mountpoint)?;
        let _serial = self.mount_lock.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
            if mounts.contains_key(mountpoint) {
                return Err(Error::Invalid(format!("{mountpoint} is already mounted")));
            }
            if let Some(other) = mounts.keys().find(|m| nested(m, mountpoint)) {
                return Err(Error::Invalid(format!(
                    "{mountpoint} would overlap the mount at {other}"
                )));
            }
        }
        let (fs, config_id, config) = self.build(&cmd)?;
        self.vfs
            .mount(fs, mountpoint)
            .map_err(|e| Error::Invalid(format!("attach {mountpoint}: {e:?}")))?;
        log::info!(
            "mounted {:?} {} at {mountpoint}",
            cmd.fs_type,
            cmd.source.display()
        );
        self.record(mountpoint, cmd.fs_type, cmd.source, config_id, config);
        Ok(())
    }

    fn record(
        &self,
        mountpoint: &str,
        fs_type: FsType,
        source: PathBuf,
        config_id: Option<String>,
        config: Value,
    ) {
        let record = MountRecord {
            fs_type,
            source,
            config_id,
            config,
            mounted_time: now_string(),
        };
        self.mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(mountpoint.to_string(), record);
    }

    /// Attach a filesystem built by the caller (the command line's `--bootstrap`), recorded like API mounts.
    pub fn attach(
        &self,
        mountpoint: &str,
        fs_type: FsType,
        source: PathBuf,
        fs: BackFileSystem,
        config_id: Option<String>,
    ) -> Result<()> {
        check_mountpoint(mountpoint)?;
        let _serial = self.mount_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.vfs
            .mount(fs, mountpoint)
            .map_err(|e| Error::Invalid(format!("attach {mountpoint}: {e:?}")))?;
        self.record(mountpoint, fs_type, source, config_id, Value::Null);
        Ok(())
    }

    /// Replace the image at `mountpoint` with a new bootstrap/config (RAFS only). The new image is built
    /// first, so a bad request leaves the old one in place.
    pub fn remount(&self, mountpoint: &str, cmd: MountCmd) -> Result<()> {
        check_mountpoint(mountpoint)?;
        if cmd.fs_type != FsType::Rafs {
            return Err(Error::Unsupported(
                "only rafs mounts can be remounted".into(),
            ));
        }
        let _serial = self.mount_lock.lock().unwrap_or_else(|e| e.into_inner());
        match self
            .mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(mountpoint)
        {
            None => {
                return Err(Error::NotFound(format!(
                    "nothing is mounted at {mountpoint}"
                )))
            }
            Some(r) if r.fs_type != FsType::Rafs => {
                return Err(Error::Unsupported(format!(
                    "{mountpoint} is not a rafs mount"
                )))
            }
            Some(_) => {}
        }
        let (fs, config_id, config) = self.build(&cmd)?;
        self.vfs
            .umount(mountpoint)
            .map_err(|e| Error::Invalid(format!("detach {mountpoint}: {e:?}")))?;
        self.vfs
            .mount(fs, mountpoint)
            .map_err(|e| Error::Invalid(format!("attach {mountpoint}: {e:?}")))?;
        log::info!("remounted {} at {mountpoint}", cmd.source.display());
        self.record(mountpoint, cmd.fs_type, cmd.source, config_id, config);
        Ok(())
    }

    pub fn umount(&self, mountpoint: &str) -> Result<()> {
        check_mountpoint(mountpoint)?;
        let _serial = self.mount_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !self
            .mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(mountpoint)
        {
            return Err(Error::NotFound(format!(
                "nothing is mounted at {mountpoint}"
            )));
        }
        self.vfs
            .umount(mountpoint)
            .map_err(|e| Error::Invalid(format!("detach {mountpoint}: {e:?}")))?;
        self.mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(mountpoint);
        log::info!("unmounted {mountpoint}");
        Ok(())
    }

    /// nydusd's DaemonInfo.
    pub fn info(&self) -> Value {
        let mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        let collection: serde_json::Map<String, Value> = mounts
            .iter()
            .map(|(mp, r)| {
                (
                    mp.clone(),
                    json!({
                        "backend_type": r.fs_type.backend_type(),
                        "mountpoint": mp,
                        "source": r.source,
                        "mounted_time": r.mounted_time,
                        "config": r.config,
                    }),
                )
            })
            .collect();
        json!({
            "version": {
                "package_ver": env!("CARGO_PKG_VERSION"),
                "git_commit": option_env!("RAFSD_GIT_COMMIT").unwrap_or("unknown"),
                "build_time": option_env!("RAFSD_BUILD_TIME").unwrap_or("unknown"),
                "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
                "rustc": option_env!("RAFSD_RUSTC").unwrap_or("unknown"),
            },
            "id": self.id,
            "supervisor": null,
            "state": self.state(),
            "backend_collection": collection,
        })
    }

    /// The RAFS filesystem named by a mountpoint or config id; with no id, the only one there is.
    pub fn rafs(&self, id: Option<&str>) -> Result<(String, Arc<BackFileSystem>)> {
        let mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        let rafs: Vec<(&String, &MountRecord)> = mounts
            .iter()
            .filter(|(_, r)| r.fs_type == FsType::Rafs)
            .collect();
        let found = match id {
            None if rafs.len() == 1 => Some(rafs[0].0.clone()),
            None => None,
            Some(id) => rafs
                .iter()
                .find(|(mp, r)| {
                    mp.as_str() == id
                        || r.config_id.as_deref() == Some(id)
                        || mp.trim_start_matches('/') == id
                })
                .map(|(mp, _)| (*mp).clone()),
        };
        let mp = found.ok_or_else(|| {
            Error::NotFound(format!(
                "no rafs instance {}",
                id.unwrap_or("(none given, and not exactly one mounted)")
            ))
        })?;
        let fs = self
            .vfs
            .get_rootfs(&mp)
            .ok()
            .flatten()
            .ok_or_else(|| Error::NotFound(format!("rafs instance at {mp} is gone")))?
            .0;
        Ok((mp, fs))
    }

    /// Run `f` on the RafsFs named by `id`.
    pub fn with_rafs<T>(&self, id: Option<&str>, f: impl FnOnce(&str, &RafsFs) -> T) -> Result<T> {
        let (mp, fs) = self.rafs(id)?;
        let rafs = fs
            .as_any()
            .downcast_ref::<RafsFs>()
            .ok_or_else(|| Error::NotFound(format!("{mp} is not rafs")))?;
        Ok(f(&mp, rafs))
    }
}
