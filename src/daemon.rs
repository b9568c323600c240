//! The running daemon's state, shared by its front end (FUSE or virtio-fs) and the admin API: the `Vfs`
//! whose pseudo mounts are the images and shares, a record of each mount, and the daemon state machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use fuse_backend_rs::abi::fuse_abi::{InHeader, ReadIn};
use fuse_backend_rs::api::{BackFileSystem, Vfs};
use fuse_backend_rs::transport::Reader;
use serde_json::{json, Value};

use crate::config::DaemonConfig;
use crate::error::{Error, Result};
use crate::fs::blob_view::BlobViewFs;
use crate::fs::epoch::Epoch;
use crate::fs::RafsFs;
use crate::passthrough::ConfinedPassthrough;
use crate::service::{build_rafs, RafsMount};
use crate::takeover::state::{Mount as SavedMount, PseudoDir};

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

    /// The name mount requests use.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Rafs => "rafs",
            FsType::Passthrough => "passthrough_fs",
            FsType::BlobView => "blob_view",
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

/// The lifecycle states nydusd reports in `GET /api/v1/daemon` and nydus-snapshotter waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonState {
    /// Started, not serving: a live upgrade or failover waits here for PUT /daemon/fuse/takeover.
    Init,
    /// The FUSE connection and mounts are in place (taken over), not yet serving: PUT /daemon/start.
    Ready,
    Running,
    /// Shutting down.
    Stopped,
}

impl DaemonState {
    pub fn as_str(self) -> &'static str {
        match self {
            DaemonState::Init => "INIT",
            DaemonState::Ready => "READY",
            DaemonState::Running => "RUNNING",
            DaemonState::Stopped => "STOPPED",
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
    /// The instance id when the config names none (the command line's `--id`).
    pub id: Option<String>,
}

impl MountCmd {
    /// The same filesystem from the same source with the same config (the id aside).
    fn same_as(&self, other: &MountCmd) -> bool {
        self.fs_type == other.fs_type
            && self.source == other.source
            && self.config == other.config
            && self.prefetch_files == other.prefetch_files
    }

    pub fn new(fs_type: FsType, source: PathBuf, config: String) -> Self {
        MountCmd {
            fs_type,
            source,
            config,
            prefetch_files: Vec::new(),
            id: None,
        }
    }
}

struct MountRecord {
    /// What was asked, kept to hand the mount over to a successor daemon.
    cmd: MountCmd,
    config_id: Option<String>,
    /// The mount's config with credentials blanked and URL userinfo masked, for `GET /daemon`.
    config: Value,
    mounted_time: String,
    /// What [`Built::dir`] says.
    dir: Option<PathBuf>,
}

/// A filesystem made for a mount, and what its record keeps.
struct Built {
    fs: BackFileSystem,
    config_id: Option<String>,
    /// The config as `GET /daemon` shows it.
    config: Value,
    /// The host directory kept apart from others' (resolved): an image's blob cache work dir, a
    /// share's directory. A share overlapping a cache would let a guest write what other images trust.
    dir: Option<PathBuf>,
}

/// Whether `a` and `b` (resolved) are one directory or one lies inside the other.
fn overlap(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// A request the admin API passes to the front end's main loop, answered there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// PUT /daemon/fuse/sendfd: hand state and connection to the supervisor.
    SendFd,
    /// PUT /daemon/fuse/takeover: fetch them from the supervisor.
    Takeover,
    /// PUT /daemon/start: start serving what was taken over.
    Start,
}

type ControlRequest = (Control, std::sync::mpsc::Sender<Result<()>>);

pub struct Daemon {
    pub id: Option<String>,
    pub vfs: Arc<Vfs>,
    mounts: Mutex<BTreeMap<String, MountRecord>>,
    /// Serialises mount changes so checks and the Vfs update happen as one step.
    mount_lock: Mutex<()>,
    /// Serialises credential updates (`PUT /api/v1/config`), which may wait on a backend.
    config_lock: Mutex<()>,
    shutdown: AtomicBool,
    state: Mutex<DaemonState>,
    /// Set once the sandbox is up: the paths mounts may use.
    allowed: std::sync::OnceLock<crate::sandbox::AllowedPaths>,
    /// Every path a filesystem was mounted at, in order of first use: the pseudo directories the Vfs
    /// created for them (it keeps them after unmounts) get their inode numbers in this order.
    pseudo_paths: Mutex<Vec<String>>,
    /// The front end's main loop, for [`Control`] requests (the FUSE daemon only).
    control: Mutex<Option<std::sync::mpsc::Sender<ControlRequest>>>,
    /// `--supervisor`, reported by `GET /daemon`.
    supervisor: std::sync::OnceLock<String>,
    /// The requests the front end is serving now (the FUSE daemon only).
    inflight: std::sync::OnceLock<Arc<crate::inflight::Inflight>>,
    /// Where `PUT /api/v1/daemon/upgrade` hands the new daemon's connection (the virtio-fs daemon only).
    upgrade: std::sync::OnceLock<UpgradeHook>,
    /// Told when the mounts change (the crash-restart keeper's copy of the state is then stale).
    on_change: std::sync::OnceLock<Arc<dyn Fn() + Send + Sync>>,
    /// With `on_change`: the filesystems as of the last mount or unmount, for the crash-restart
    /// checkpoints, which the device's thread sends without waiting for a mount in progress.
    saved: Mutex<Option<(Vec<PseudoDir>, Vec<SavedMount>)>>,
    /// The RAFS filesystems by their index in the Vfs, for requests a front end answers itself.
    rafs_index: Arc<RafsIndex>,
}

/// The RAFS filesystems by their index in the `Vfs` (the top byte of the inode numbers it gives out), for
/// what the front ends do with a request outside fuse-backend-rs's server: tell a READ that needs the
/// backend (see `crate::cold_slots`), and answer a READ with a spliced reply (FUSE).
#[derive(Default)]
pub struct RafsIndex {
    table: RwLock<Vec<Option<Arc<BackFileSystem>>>>,
    /// How many images the table holds.
    images: AtomicUsize,
}

impl RafsIndex {
    /// Where fuse-backend-rs puts a mount's index in an inode number.
    const SHIFT: u32 = 56;

    /// How many images are mounted.
    pub fn images(&self) -> usize {
        self.images.load(Ordering::Relaxed)
    }

    /// The Vfs mount (image) the Vfs inode `nodeid` belongs to.
    pub fn image_of(nodeid: u64) -> u8 {
        (nodeid >> Self::SHIFT) as u8
    }

    /// The RAFS filesystem serving the Vfs inode `nodeid`, and the inode's number within it.
    pub fn get(&self, nodeid: u64) -> Option<(Arc<BackFileSystem>, u64)> {
        let index = usize::from(Self::image_of(nodeid));
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let fs = table.get(index)?.clone()?;
        Some((fs, nodeid & ((1 << Self::SHIFT) - 1)))
    }
}

/// The epoch of an image's or blob view's inode numbers (none for other filesystems).
fn epoch_of(fs: &BackFileSystem) -> Epoch {
    let any = fs.as_any();
    if let Some(rafs) = any.downcast_ref::<RafsFs>() {
        rafs.epoch()
    } else if let Some(view) = any.downcast_ref::<BlobViewFs>() {
        view.epoch()
    } else {
        Epoch::NONE
    }
}

/// A READ of a file of a RAFS image: what both the cold-read classification (of both front ends) and the
/// FUSE front end's spliced reply need, looked up once per request.
pub struct RafsRead {
    fs: Arc<BackFileSystem>,
    /// The inode's number within the image.
    pub ino: u64,
    pub read_in: ReadIn,
}

impl RafsRead {
    /// The READ `reader` holds (`header` already read from it), when it names a file of a RAFS image.
    pub fn of(index: &RafsIndex, header: &InHeader, reader: &Reader<'_>) -> Option<Self> {
        let (fs, number) = index.get(header.nodeid)?;
        // A number another mount of this index gave is left to the server, which refuses it.
        let ino = fs
            .as_any()
            .downcast_ref::<RafsFs>()?
            .epoch()
            .inner(number)
            .ok()?;
        let mut r = reader.clone();
        r.read_obj::<InHeader>().ok()?;
        let read_in = r.read_obj::<ReadIn>().ok()?;
        Some(RafsRead { fs, ino, read_in })
    }

    pub fn rafs(&self) -> &RafsFs {
        self.fs
            .as_any()
            .downcast_ref::<RafsFs>()
            .expect("checked when made")
    }

    /// Whether it needs the backend (see [`RafsFs::read_is_cached`]).
    pub fn is_cold(&self) -> bool {
        !self
            .rafs()
            .read_is_cached(self.ino, self.read_in.offset, self.read_in.size as usize)
    }
}

/// Takes the API connection of a new daemon asking for a live upgrade.
pub type UpgradeHook = Arc<dyn Fn(std::os::unix::net::UnixStream) + Send + Sync>;

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

/// Passthrough shares one daemon serves at most: each adds its table to the descriptors of the
/// daemon's state (see [`crate::vhost_user::upgrade::MAX_STATE_FDS`]).
pub const MAX_SHARES: usize = 32;

/// Give a passthrough share the guest's numbers of a predecessor (see [`ConfinedPassthrough::adopt`]).
fn adopt_share(share: &ConfinedPassthrough, mountpoint: &str, table: std::fs::File) -> Result<()> {
    let got = share.adopt(table)?;
    log::info!(
        "took over the guest's {} inodes and {} open files of the share at {mountpoint}",
        got.inodes,
        got.handles
    );
    if got.stale_inodes + got.stale_handles > 0 {
        log::warn!(
            "share at {mountpoint}: {} inodes and {} open files could not be found again (gone or \
             replaced on the host, or unlinked while open): they answer ESTALE / EBADF",
            got.stale_inodes,
            got.stale_handles
        );
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
            config_lock: Mutex::new(()),
            shutdown: AtomicBool::new(false),
            state: Mutex::new(DaemonState::Init),
            allowed: std::sync::OnceLock::new(),
            pseudo_paths: Mutex::new(Vec::new()),
            control: Mutex::new(None),
            supervisor: std::sync::OnceLock::new(),
            inflight: std::sync::OnceLock::new(),
            upgrade: std::sync::OnceLock::new(),
            on_change: std::sync::OnceLock::new(),
            saved: Mutex::new(None),
            rafs_index: Arc::default(),
        })
    }

    pub fn set_inflight(&self, inflight: Arc<crate::inflight::Inflight>) {
        let _ = self.inflight.set(inflight);
    }

    /// The requests being served now, as nydusd lists them; `None` when there are none.
    pub fn inflight(&self) -> Option<Value> {
        let ops = self.inflight.get()?.to_json();
        (!ops.as_array().is_some_and(Vec::is_empty)).then_some(ops)
    }

    pub fn set_upgrade_hook(&self, hook: UpgradeHook) {
        let _ = self.upgrade.set(hook);
    }

    /// Call `hook` whenever a filesystem is mounted or unmounted, and keep the filesystems as they
    /// are then for [`Daemon::saved_filesystems`].
    pub fn on_mounts_changed(&self, hook: Arc<dyn Fn() + Send + Sync>) {
        let _serial = self.mount_lock.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.on_change.set(hook);
        self.mounts_changed();
    }

    /// The RAFS filesystems by their index in the Vfs, kept up to date with the mounts.
    pub fn rafs_index(&self) -> Arc<RafsIndex> {
        self.rafs_index.clone()
    }

    /// Rebuild the RAFS index from the mounts, leaving out `leaving` (about to be detached from the Vfs,
    /// so that nothing answers for it once the Vfs does not). Called with the mount lock held.
    fn index_rafs(&self, leaving: Option<&str>) {
        let mut table: Vec<Option<Arc<BackFileSystem>>> = Vec::new();
        let mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        for (mp, r) in mounts.iter() {
            if r.cmd.fs_type != FsType::Rafs || Some(mp.as_str()) == leaving {
                continue;
            }
            if let Ok(Some((fs, index))) = self.vfs.get_rootfs(mp) {
                let index = index as usize;
                if table.len() <= index {
                    table.resize(index + 1, None);
                }
                table[index] = Some(fs);
            }
        }
        let images = table.iter().flatten().count();
        *self
            .rafs_index
            .table
            .write()
            .unwrap_or_else(|e| e.into_inner()) = table;
        self.rafs_index.images.store(images, Ordering::Relaxed);
    }

    /// Called with the mount lock held.
    fn mounts_changed(&self) {
        self.index_rafs(None);
        if let Some(f) = self.on_change.get() {
            let saved = self.export_locked(true).ok();
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = saved;
            f();
        }
    }

    /// The filesystems as of the last mount or unmount (see [`Daemon::on_mounts_changed`]), without
    /// waiting for a mount in progress; the lookup counts are those of then.
    pub fn saved_filesystems(&self) -> Result<(Vec<PseudoDir>, Vec<SavedMount>)> {
        match &*self.saved.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(saved) => Ok(saved.clone()),
            None => Err(Error::Internal(
                "the filesystems could not be saved at the last change".into(),
            )),
        }
    }

    /// Where a live upgrade's connection goes, if this daemon can be upgraded live.
    pub fn upgrade_hook(&self) -> Option<UpgradeHook> {
        self.upgrade.get().cloned()
    }

    pub fn set_supervisor(&self, path: &std::path::Path) {
        let _ = self.supervisor.set(path.to_string_lossy().into_owned());
    }

    /// Receive the admin API's [`Control`] requests from now on.
    pub fn control_channel(&self) -> std::sync::mpsc::Receiver<ControlRequest> {
        let (tx, rx) = std::sync::mpsc::channel();
        *self.control.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }

    /// Ask the front end's main loop to carry out `c` and wait for its answer.
    pub fn control(&self, c: Control) -> Result<()> {
        let tx = self
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "{c:?} is only supported by the FUSE daemon (live upgrade of virtio-fs is not implemented)"
                ))
            })?;
        let (reply, answer) = std::sync::mpsc::channel();
        tx.send((c, reply))
            .map_err(|_| Error::Internal("the daemon is shutting down".into()))?;
        answer
            .recv_timeout(std::time::Duration::from_secs(120))
            .map_err(|_| Error::Internal(format!("{c:?} got no answer from the daemon")))?
    }

    pub fn request_exit(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }

    pub fn exit_requested(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    pub fn state(&self) -> DaemonState {
        if self.exit_requested() {
            return DaemonState::Stopped;
        }
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_state(&self, state: DaemonState) {
        log::info!("daemon state: {}", state.as_str());
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    /// From now on, refuse mounts whose paths lie outside `allowed` (the sandbox could not reach them).
    pub fn confine(&self, allowed: crate::sandbox::AllowedPaths) {
        let _ = self.allowed.set(allowed);
    }

    /// Make the filesystem `cmd` asks for; an image or blob view gives its inode numbers with `epoch`.
    /// `fresh`: asked for now, not handed over by a predecessor (whose mounts are taken as they
    /// were), so it must keep its directory apart from the caches and shares mounted before it.
    fn build(&self, cmd: &MountCmd, fresh: bool, epoch: Epoch) -> Result<Built> {
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
                if config.id.is_none() {
                    config.id = cmd.id.clone();
                }
                let id = config.id.clone();
                let dir = match &config.cache.work_dir {
                    Some(w) => Some(crate::sandbox::normalize(w)?),
                    None => None,
                };
                if let (Some(dir), true) = (&dir, fresh) {
                    self.keep_apart(dir, FsType::Passthrough, |share| {
                        format!(
                            "the blob cache work_dir {} overlaps the passthrough share {}: a guest \
                             could write what this image trusts",
                            dir.display(),
                            share.display()
                        )
                    })?;
                }
                let mount = RafsMount {
                    bootstrap,
                    config,
                    prefetch_files: cmd.prefetch_files.clone(),
                };
                let fs: BackFileSystem = if cmd.fs_type == FsType::Rafs {
                    Box::new(build_rafs(&mount)?.with_epoch(epoch))
                } else {
                    Box::new(BlobViewFs::build(&mount)?.with_epoch(epoch))
                };
                Ok(Built {
                    fs,
                    config_id: id,
                    config: shown,
                    dir,
                })
            }
            FsType::Passthrough => {
                let mut dir = cmd.source.clone();
                if let Some(allowed) = allowed {
                    allowed.confine_share(&mut dir)?;
                }
                let real = crate::sandbox::normalize(&dir)?;
                if fresh {
                    let refuse = |cache: &Path| {
                        format!(
                            "the shared directory {} overlaps the blob cache {}: a guest could \
                             write what other images trust; share a directory outside the caches",
                            real.display(),
                            cache.display()
                        )
                    };
                    for cache in allowed.iter().flat_map(|a| &a.caches) {
                        if overlap(&real, cache) {
                            return Err(Error::Forbidden(refuse(cache)));
                        }
                    }
                    self.keep_apart(&real, FsType::Rafs, refuse)?;
                    self.keep_apart(&real, FsType::BlobView, refuse)?;
                }
                Ok(Built {
                    fs: Box::new(ConfinedPassthrough::new(&dir)?),
                    config_id: None,
                    config: Value::Null,
                    dir: Some(real),
                })
            }
        }
    }

    /// Refuse (403) when `dir` overlaps the directory of a mount of type `of`; `why` says which.
    fn keep_apart(&self, dir: &Path, of: FsType, why: impl Fn(&Path) -> String) -> Result<()> {
        let mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        let clash = mounts
            .values()
            .filter(|r| r.cmd.fs_type == of)
            .filter_map(|r| r.dir.as_deref())
            .find(|other| overlap(dir, other));
        match clash {
            Some(other) => Err(Error::Forbidden(why(other))),
            None => Ok(()),
        }
    }

    /// Attach a filesystem at `mountpoint`. A used path, or one nested in or around another mount, is refused.
    pub fn mount(&self, mountpoint: &str, cmd: MountCmd) -> Result<()> {
        check_mountpoint(mountpoint)?;
        let _serial = self.mount_lock.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(r) = mounts.get(mountpoint) {
                // nydus-snapshotter mounts every instance again on a daemon it has just upgraded,
                // which already serves them all: the very same request is a success, not a conflict.
                if r.cmd.same_as(&cmd) {
                    log::info!("{mountpoint} is already mounted from the same source and config");
                    return Ok(());
                }
                return Err(Error::Conflict(format!("{mountpoint} is already mounted")));
            }
            if let Some(other) = mounts.keys().find(|m| nested(m, mountpoint)) {
                return Err(Error::Conflict(format!(
                    "{mountpoint} would overlap the mount at {other}"
                )));
            }
            let shares = mounts
                .values()
                .filter(|r| r.cmd.fs_type == FsType::Passthrough)
                .count();
            if cmd.fs_type == FsType::Passthrough && shares >= MAX_SHARES {
                return Err(Error::Invalid(format!(
                    "at most {MAX_SHARES} passthrough shares per daemon (each one's table travels \
                     with the daemon's state, whose descriptors are limited)"
                )));
            }
        }
        let built = self.build(&cmd, true, Epoch::next())?;
        let attached = self.vfs.mount(built.fs, mountpoint);
        self.note_pseudo_path(mountpoint);
        attached.map_err(|e| Error::Internal(format!("attach {mountpoint}: {e:?}")))?;
        log::info!(
            "mounted {:?} {} at {mountpoint}",
            cmd.fs_type,
            cmd.source.display()
        );
        self.record(mountpoint, cmd, built.config_id, built.config, built.dir);
        Ok(())
    }

    /// Remember `mountpoint` if the Vfs now has a pseudo directory for it (also after a failed mount,
    /// which may have created it).
    fn note_pseudo_path(&self, mountpoint: &str) {
        let exists = self
            .vfs
            .get_root_pseudofs()
            .path_walk(mountpoint)
            .is_ok_and(|i| i.is_some());
        let mut paths = self.pseudo_paths.lock().unwrap_or_else(|e| e.into_inner());
        if exists && !paths.iter().any(|p| p == mountpoint) {
            paths.push(mountpoint.to_string());
        }
    }

    fn record(
        &self,
        mountpoint: &str,
        cmd: MountCmd,
        config_id: Option<String>,
        config: Value,
        dir: Option<PathBuf>,
    ) {
        let record = MountRecord {
            cmd,
            config_id,
            config,
            mounted_time: now_string(),
            dir,
        };
        self.mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(mountpoint.to_string(), record);
        self.mounts_changed();
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
            Some(r) if r.cmd.fs_type != FsType::Rafs => {
                return Err(Error::Unsupported(format!(
                    "{mountpoint} is not a rafs mount"
                )))
            }
            Some(_) => {}
        }
        // The kernel's numbers of the old image stay good for the new one, as the index does (below).
        let epoch = self
            .vfs
            .get_rootfs(mountpoint)
            .ok()
            .flatten()
            .map_or(Epoch::NONE, |(fs, _)| epoch_of(&fs));
        let built = self.build(&cmd, true, epoch)?;
        let fs = built.fs;
        self.index_rafs(Some(mountpoint));
        let index_of = |mp: &str| self.vfs.get_rootfs(mp).ok().flatten().map(|(_, i)| i);
        let old_index = index_of(mountpoint);
        let in_use: Vec<u8> = {
            let mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
            mounts
                .keys()
                .filter(|mp| mp.as_str() != mountpoint)
                .filter_map(|mp| index_of(mp))
                .collect()
        };
        self.vfs
            .umount(mountpoint)
            .map_err(|e| Error::Internal(format!("detach {mountpoint}: {e:?}")))?;
        // The kernel holds the mount's root, and the files under it, by inode numbers whose top byte
        // is the mount index, and keeps the path to it cached: the new image takes the same index
        // (as nydusd's update in place keeps it), or the path leads nowhere until the kernel lets go.
        if let Some(want) = old_index {
            if let Err(e) =
                crate::takeover::vfs_index::walk_counter_to(&self.vfs, mountpoint, want, &in_use)
            {
                // A placeholder left there would hold an index of its own (with every index in use,
                // the one the image needs): take it away, and mount where the counter is.
                log::warn!("remount of {mountpoint} under another index than {want}: {e}");
                let _ = self.vfs.umount(mountpoint);
            }
        }
        if let Err(e) = self.vfs.mount(fs, mountpoint) {
            // The old image is gone: so is its record.
            let _ = self.vfs.umount(mountpoint);
            self.mounts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(mountpoint);
            self.mounts_changed();
            return Err(Error::Internal(format!("attach {mountpoint}: {e:?}")));
        }
        if index_of(mountpoint) != old_index {
            log::warn!(
                "{mountpoint} remounted under a new index: paths the kernel cached lead nowhere"
            );
        }
        log::info!("remounted {} at {mountpoint}", cmd.source.display());
        self.record(mountpoint, cmd, built.config_id, built.config, built.dir);
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
        self.index_rafs(Some(mountpoint));
        self.vfs
            .umount(mountpoint)
            .map_err(|e| Error::Internal(format!("detach {mountpoint}: {e:?}")))?;
        self.mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(mountpoint);
        self.mounts_changed();
        log::info!("unmounted {mountpoint}");
        Ok(())
    }

    /// The pseudo directories and mounts a successor needs to serve the same kernel connection with
    /// the same inode numbers (see [`crate::takeover`]). A passthrough share is refused unless
    /// `with_shares` (virtio-fs, whose state carries each share's table: [`Daemon::attach_share_tables`]).
    pub fn export(&self, with_shares: bool) -> Result<(Vec<PseudoDir>, Vec<SavedMount>)> {
        let _serial = self.mount_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.export_locked(with_shares)
    }

    /// [`Daemon::export`] with the mount lock held.
    fn export_locked(&self, with_shares: bool) -> Result<(Vec<PseudoDir>, Vec<SavedMount>)> {
        let root = self.vfs.get_root_pseudofs();
        let mut dirs = Vec::new();
        for path in self
            .pseudo_paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            if let Ok(Some(ino)) = root.path_walk(path) {
                dirs.push(PseudoDir {
                    path: path.clone(),
                    ino,
                });
            }
        }
        let mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        let mut saved = Vec::new();
        for (mp, r) in mounts.iter() {
            if r.cmd.fs_type == FsType::Passthrough && !with_shares {
                return Err(Error::Unsupported(format!(
                    "{mp} is a passthrough share, whose inodes cannot be handed to another daemon"
                )));
            }
            let (fs, fs_index) = self
                .vfs
                .get_rootfs(mp)
                .ok()
                .flatten()
                .ok_or_else(|| Error::NotFound(format!("mount {mp} is gone")))?;
            let (lookups, parents) = fs
                .as_any()
                .downcast_ref::<RafsFs>()
                .map(RafsFs::export_lookups)
                .unwrap_or_default();
            saved.push(SavedMount {
                mountpoint: mp.clone(),
                fs_index,
                fs_type: r.cmd.fs_type.as_str().into(),
                source: r.cmd.source.clone(),
                config: r.cmd.config.clone(),
                id: r.cmd.id.clone(),
                prefetch_files: r.cmd.prefetch_files.clone(),
                lookups,
                parents,
                share_table: None,
                epoch: epoch_of(&fs).value(),
            });
        }
        Ok((dirs, saved))
    }

    /// Add the table of each passthrough share in `saved` to `files`, naming it in the mount.
    pub fn attach_share_tables(
        &self,
        saved: &mut [SavedMount],
        files: &mut Vec<std::fs::File>,
    ) -> Result<()> {
        for m in saved {
            if let Some(table) = self.with_share(&m.mountpoint, ConfinedPassthrough::table_file) {
                let table =
                    table.map_err(|e| Error::io(format!("the table of {}", m.mountpoint), e))?;
                files.push(table);
                m.share_table = Some(files.len() as u32 - 1);
            }
        }
        Ok(())
    }

    /// `f` of the passthrough share at `mountpoint`, if one is mounted there.
    fn with_share<R>(
        &self,
        mountpoint: &str,
        f: impl FnOnce(&ConfinedPassthrough) -> R,
    ) -> Option<R> {
        let (fs, _) = self.vfs.get_rootfs(mountpoint).ok().flatten()?;
        fs.as_any().downcast_ref::<ConfinedPassthrough>().map(f)
    }

    /// A filesystem of a predecessor's state, with the kernel's lookups (RAFS) or, in a crash
    /// restart, the guest's numbers from the share's table among `crash_files`.
    fn build_restored(
        &self,
        cmd: &MountCmd,
        m: &SavedMount,
        crash_files: Option<&[std::fs::File]>,
    ) -> Result<Built> {
        let built = self.build(cmd, false, Epoch::saved(m.epoch))?;
        if let Some(rafs) = built.fs.as_any().downcast_ref::<RafsFs>() {
            rafs.import_lookups(&m.lookups, &m.parents);
        }
        if let (Some(share), Some(files)) = (
            built.fs.as_any().downcast_ref::<ConfinedPassthrough>(),
            crash_files,
        ) {
            let table = m
                .share_table
                .and_then(|i| files.get(i as usize))
                .ok_or_else(|| Error::Invalid("the checkpoint has no table of its inodes".into()))?
                .try_clone()
                .map_err(|e| Error::io("the share's table", e))?;
            adopt_share(share, &m.mountpoint, table)?;
        }
        Ok(built)
    }

    /// Rebuild what a predecessor exported, into this daemon's still empty Vfs. A passthrough share
    /// takes the guest's numbers from its table: from `crash_files` (a crash restart: the keeper's
    /// checkpoint descriptors) now, or with the final state of a live upgrade
    /// ([`Daemon::set_lookups`]). A crash checkpoint without a share's table (none could be attached)
    /// leaves the share at its mount index answering nothing: mounting it afresh would be wrong, as
    /// the guest's numbers would name other files.
    pub fn restore(
        &self,
        dirs: &[PseudoDir],
        saved: &[SavedMount],
        crash_files: Option<&[std::fs::File]>,
    ) -> Result<()> {
        let _serial = self.mount_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !self
            .mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            return Err(Error::Invalid(
                "cannot take over into a daemon that already has mounts".into(),
            ));
        }
        for d in dirs {
            check_mountpoint(&d.path)?;
        }
        crate::takeover::vfs_index::replay_pseudo_dirs(&self.vfs, dirs)?;
        *self.pseudo_paths.lock().unwrap_or_else(|e| e.into_inner()) =
            dirs.iter().map(|d| d.path.clone()).collect();
        let mut order: Vec<&SavedMount> = saved.iter().collect();
        order.sort_by_key(|m| m.fs_index);
        let mut indexes = crate::takeover::vfs_index::IndexReplay::default();
        for m in order {
            check_mountpoint(&m.mountpoint)?;
            let cmd = MountCmd {
                fs_type: FsType::parse(&m.fs_type)?,
                source: m.source.clone(),
                config: m.config.clone(),
                prefetch_files: m.prefetch_files.clone(),
                id: m.id.clone(),
            };
            let built = match self.build_restored(&cmd, m, crash_files) {
                Ok(built) => built,
                // A crash restart carries the device on whatever becomes of one share.
                Err(e) if cmd.fs_type == FsType::Passthrough && crash_files.is_some() => {
                    indexes.mount_at(
                        &self.vfs,
                        crate::takeover::vfs_index::placeholder(),
                        &m.mountpoint,
                        m.fs_index,
                    )?;
                    log::error!(
                        "crash restart: the passthrough share {} at {} is lost to the guest ({e}); \
                         unmount and mount it again through the API",
                        m.source.display(),
                        m.mountpoint
                    );
                    self.record(&m.mountpoint, cmd, None, Value::Null, None);
                    continue;
                }
                Err(e) => return Err(e),
            };
            indexes.mount_at(&self.vfs, built.fs, &m.mountpoint, m.fs_index)?;
            log::info!(
                "took over {} {} at {} (mount index {}, {} inodes the kernel holds)",
                m.fs_type,
                m.source.display(),
                m.mountpoint,
                m.fs_index,
                m.lookups.len()
            );
            self.record(&m.mountpoint, cmd, built.config_id, built.config, built.dir);
        }
        Ok(())
    }

    /// The kernel's references into each mount as `saved` gives them, replacing those [`Daemon::restore`]
    /// imported (a live upgrade mounts from an earlier state, then takes the final counts), and each
    /// passthrough share's table from `files` (the final state's descriptors).
    pub fn set_lookups(
        &self,
        saved: &[SavedMount],
        files: &mut [Option<std::fs::File>],
    ) -> Result<()> {
        let _serial = self.mount_lock.lock().unwrap_or_else(|e| e.into_inner());
        for m in saved {
            let (fs, _) = self
                .vfs
                .get_rootfs(&m.mountpoint)
                .ok()
                .flatten()
                .ok_or_else(|| Error::NotFound(format!("mount {} is gone", m.mountpoint)))?;
            if let Some(rafs) = fs.as_any().downcast_ref::<RafsFs>() {
                rafs.replace_lookups(&m.lookups, &m.parents);
            }
            if let Some(share) = fs.as_any().downcast_ref::<ConfinedPassthrough>() {
                let table = m
                    .share_table
                    .and_then(|i| files.get_mut(i as usize))
                    .and_then(Option::take)
                    .ok_or_else(|| {
                        Error::Invalid(format!("no table for the share at {}", m.mountpoint))
                    })?;
                adopt_share(share, &m.mountpoint, table)?;
            }
        }
        Ok(())
    }

    /// `PUT /api/v1/config?id=`: settings of a running RAFS instance. Only `registry_auth` (base64
    /// `user:pass`, empty to clear) is known: the backend switches to the new credentials without a
    /// remount, and the mount's record (what a successor daemon is handed) carries them too.
    pub fn update_config(
        &self,
        id: Option<&str>,
        params: &serde_json::Map<String, Value>,
    ) -> Result<()> {
        for key in params.keys() {
            if key != "registry_auth" {
                return Err(Error::Invalid(format!(
                    "unknown config key {key:?} (only \"registry_auth\" can be changed)"
                )));
            }
        }
        let Some(value) = params.get("registry_auth") else {
            return Ok(());
        };
        let auth = value
            .as_str()
            .ok_or_else(|| Error::Invalid("`registry_auth` must be a string".into()))?;
        let auth = Some(auth.trim()).filter(|a| !a.is_empty());
        // Updates of credentials go one at a time, but not under the mount lock: the backend takes
        // them once no token fetch is in progress, which a registry's token realm may draw out, and
        // every mount, unmount and `GET /daemon` of the daemon would wait meanwhile.
        let _one_update = self.config_lock.lock().unwrap_or_else(|e| e.into_inner());
        let (mp, fs, config) = {
            let _serial = self.mount_lock.lock().unwrap_or_else(|e| e.into_inner());
            let (mp, fs) = self.rafs(id)?;
            let mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
            let record = mounts
                .get(&mp)
                .ok_or_else(|| Error::NotFound(format!("nothing is mounted at {mp}")))?;
            let config = crate::config::with_registry_auth(&record.cmd.config, auth)?;
            (mp, fs, config)
        };
        let rafs = fs
            .as_any()
            .downcast_ref::<RafsFs>()
            .ok_or_else(|| Error::NotFound(format!("{mp} is not rafs")))?;
        rafs.image().backend().set_registry_auth(auth)?;
        // The record, unless the mount was replaced meanwhile (the new one has its own config).
        let _serial = self.mount_lock.lock().unwrap_or_else(|e| e.into_inner());
        let still_mounted = self
            .vfs
            .get_rootfs(&mp)
            .ok()
            .flatten()
            .is_some_and(|(now, _)| Arc::ptr_eq(&now, &fs));
        let mut mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        match mounts.get_mut(&mp).filter(|_| still_mounted) {
            Some(record) => record.cmd.config = config,
            None => {
                return Err(Error::Conflict(format!(
                    "{mp} was replaced or unmounted while its credentials were renewed; the mount \
                     there now has its own"
                )))
            }
        }
        log::info!("registry credentials of {mp} updated");
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
                        "backend_type": r.cmd.fs_type.backend_type(),
                        "mountpoint": mp,
                        "source": r.cmd.source,
                        "mounted_time": r.mounted_time,
                        "config": r.config,
                    }),
                )
            })
            .collect();
        json!({
            "version": crate::version::to_json(),
            "id": self.id,
            "supervisor": self.supervisor.get(),
            "state": self.state().as_str(),
            "backend_collection": collection,
        })
    }

    /// The RAFS filesystem named by a mountpoint or config id; with no id, the only one there is.
    pub fn rafs(&self, id: Option<&str>) -> Result<(String, Arc<BackFileSystem>)> {
        let mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        let rafs: Vec<(&String, &MountRecord)> = mounts
            .iter()
            .filter(|(_, r)| r.cmd.fs_type == FsType::Rafs)
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
