//! Start-up of the two serving daemons, `rafsd fuse` and `rafsd virtiofs`, in one place. Both go
//! through the same steps, in this order, before the first thread starts:
//!
//! 1. block the shutdown signals ([`crate::signals`]) and raise the descriptor limit;
//! 2. read the start-up mount (`--bootstrap` with its config, or `--shared-dir`) and work out what the
//!    sandbox allows: the command line's `--allow-path*`, what that mount needs, or, when neither says
//!    anything, what the real clients need (Kata's share and nydus-snapshotter's roots), plus the log
//!    file's folder;
//! 3. bind the sockets the sandbox will hide (API, vhost-user);
//! 4. [`Sandbox::enter`] (namespaces and root, or the FUSE daemon's unmounting supervisor), then
//!    [`Sandbox::lock`] (Landlock, capabilities, seccomp) once the front end holds what it needs;
//! 5. mount the start-up image, start the API, serve until a shutdown signal or `PUT /daemon/exit`.
//!
//! The command-line options live here too (`src/main.rs` only parses and dispatches); another program
//! that wants a daemon without these steps uses [`crate::embed`].

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::FsOptions;
use fuse_backend_rs::api::{Vfs, VfsOptions};

use crate::config::DaemonConfig;
use crate::daemon::{Daemon, DaemonState, FsType, MountCmd};
use crate::error::{Error, Result};
use crate::sandbox::{self, AllowedPaths, Entered, Policy, Sandbox, SandboxMode};
use crate::seccomp::SeccompMode;
use crate::signals::{block_shutdown_signals, wait_for_signal};

/// Sandbox options of both daemons (see `src/sandbox.rs` and the README's "Sandbox" section).
#[derive(clap::Args)]
pub struct SandboxArgs {
    /// namespace, chroot or none [default: namespace for virtiofs; fuse supports none only].
    #[arg(long, value_enum)]
    pub sandbox: Option<SandboxMode>,
    /// What a syscall outside the policy does: kill, log, trap or none.
    #[arg(long, value_enum, default_value = "kill")]
    pub seccomp: SeccompMode,
    /// A directory (or file) the daemon may read: images and blobs of later API mounts. Repeatable.
    #[arg(long = "allow-path", value_name = "PATH")]
    pub allow_path: Vec<PathBuf>,
    /// A directory the daemon may write: cache work dirs and passthrough shares of later API mounts.
    /// Repeatable.
    #[arg(long = "allow-path-rw", value_name = "PATH")]
    pub allow_path_rw: Vec<PathBuf>,
    /// Keep the host network (no network namespace) so API mounts may use network backends.
    #[arg(long)]
    pub allow_network: bool,
}

impl SandboxArgs {
    /// Did the user say what the daemon may use (which switches the Kata defaults off)?
    fn paths_given(&self) -> bool {
        self.allow_network || !self.allow_path.is_empty() || !self.allow_path_rw.is_empty()
    }

    fn allowed_paths(&self) -> Result<AllowedPaths> {
        let mut allowed = AllowedPaths {
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

/// Options of a FUSE daemon, spelled as nydusd spells them.
#[derive(clap::Args)]
pub struct FuseArgs {
    /// Where to mount.
    #[arg(long, short = 'M')]
    pub mountpoint: PathBuf,
    /// RAFS bootstrap (or inline-meta blob); without one an empty root waits for API mounts.
    #[arg(long, short = 'B')]
    pub bootstrap: Option<PathBuf>,
    /// Daemon config: nydusd v1 or v2 JSON.
    #[arg(long, short = 'C')]
    pub config: Option<PathBuf>,
    /// Blobs in DIR, cached in DIR (instead of --config).
    #[arg(long, short = 'D', conflicts_with = "config")]
    pub localfs_dir: Option<PathBuf>,
    /// FUSE worker threads: how many requests are answered at once (a read waiting on the network
    /// occupies one; the kernel queues the rest).
    #[arg(long, alias = "fuse-threads", default_value_t = crate::fusedev::DEFAULT_THREADS as u32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub thread_num: u32,
    /// Admin API socket.
    #[arg(long, short = 'A')]
    pub apisock: Option<PathBuf>,
    /// File with absolute paths to prefetch, one per line ("/" = everything).
    #[arg(long)]
    pub prefetch_files: Option<PathBuf>,
    /// Instance id (nydus-snapshotter's daemon id; names the state sent to --supervisor).
    #[arg(long)]
    pub id: Option<String>,
    /// Raise RLIMIT_NOFILE to this (best effort; 0 leaves it alone).
    #[arg(long, default_value_t = 1_000_000)]
    pub rlimit_nofile: u64,
    /// Unix socket of the supervisor (nydus-snapshotter) that keeps this daemon's state and FUSE
    /// connection for failover and live upgrade: PUT /api/v1/daemon/fuse/sendfd sends them there,
    /// PUT /api/v1/daemon/fuse/takeover fetches them.
    #[arg(long)]
    pub supervisor: Option<PathBuf>,
    /// Start as the new daemon of a live upgrade: mount nothing, wait in state INIT for
    /// PUT /api/v1/daemon/fuse/takeover.
    #[arg(long)]
    pub upgrade: bool,
    /// What happens at takeover to requests the previous daemon read but never answered: resend
    /// (the kernel sends them again), flush (they fail with EIO) or none (left alone).
    #[arg(long, value_enum, default_value = "resend")]
    pub failover_policy: crate::fusedev::FailoverPolicy,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

/// Options of the virtio-fs daemon. Kata runs `virtiofs --log-level info --apisock A --sock S` and
/// appends the virtiofsd options `--thread-pool-size=N --announce-submounts` by default.
#[derive(clap::Args)]
pub struct VirtiofsArgs {
    /// vhost-user socket the VMM connects to (with --upgrade-from: the predecessor's, handed over).
    #[arg(long, required_unless_present = "upgrade_from")]
    pub sock: Option<PathBuf>,
    /// Live upgrade: take the device, VMM connection and mounts over from the virtio-fs daemon whose
    /// API socket this is (`PUT /api/v1/daemon/upgrade` there), instead of serving a new socket.
    /// The predecessor exits once this daemon serves; if this one cannot read its state it carries on.
    #[arg(long, conflicts_with_all = ["bootstrap", "shared_dir", "sock"])]
    pub upgrade_from: Option<PathBuf>,
    /// Admin API socket.
    #[arg(long, short = 'A')]
    pub apisock: Option<PathBuf>,
    /// An image to serve from the start (more can be mounted through the API).
    #[arg(long, short = 'B', requires = "config")]
    pub bootstrap: Option<PathBuf>,
    /// Daemon config for --bootstrap: nydusd v1 or v2 JSON.
    #[arg(long, short = 'C')]
    pub config: Option<PathBuf>,
    /// A host directory to share read-write (passthrough_fs).
    #[arg(long, short = 's', conflicts_with = "bootstrap")]
    pub shared_dir: Option<PathBuf>,
    /// Where in the share --bootstrap or --shared-dir appears.
    #[arg(long, short = 'm', default_value = "/")]
    pub virtual_mountpoint: String,
    /// Request queues offered to the VMM (its num-request-queues must not be larger).
    #[arg(long, default_value_t = crate::vhost_user::DEFAULT_REQUEST_QUEUES as u32, value_parser = clap::value_parser!(u32).range(1..=crate::vhost_user::MAX_REQUEST_QUEUES as i64))]
    pub thread_num: u32,
    /// File with absolute paths of --bootstrap to prefetch, one per line ("/" = everything).
    #[arg(long)]
    pub prefetch_files: Option<PathBuf>,
    /// Instance id.
    #[arg(long)]
    pub id: Option<String>,
    /// Raise RLIMIT_NOFILE to this (best effort; 0 leaves it alone).
    #[arg(long, default_value_t = 1_000_000)]
    pub rlimit_nofile: u64,
    /// Accepted for nydusd compatibility; every mount is already available.
    #[arg(long)]
    pub hybrid_mode: bool,
    /// Workers answering each request queue, which is also how many of its requests may be in flight
    /// (default 16; Kata's `=1` gets the default too); 0 answers them one at a time, in order.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=1024))]
    pub thread_pool_size: Option<u32>,
    /// virtiofsd option Kata appends; ignored.
    #[arg(long)]
    pub announce_submounts: bool,
    /// Offer a DAX window of this size (e.g. 8G, 512M; a multiple of 2 MiB) through the vhost-user
    /// SHMEM protocol feature; off by default.
    #[arg(long, value_parser = crate::dax::parse_size)]
    pub dax_window: Option<u64>,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

/// The Vfs both front ends serve: opens and opendirs reach the filesystems (RAFS keeps per-handle state),
/// no writeback cache (passthrough shares see every write as it happens), and every READDIR is a
/// READDIRPLUS: without READDIRPLUS_AUTO the kernel asks for attributes with every batch of a directory,
/// not only the first, so a walk (`find -ls`, `ls -lR`) costs no LOOKUP per entry after the first batch.
pub fn new_vfs() -> Arc<Vfs> {
    let defaults = VfsOptions::default();
    Arc::new(Vfs::new(VfsOptions {
        no_open: false,
        no_opendir: false,
        no_writeback: true,
        out_opts: defaults.out_opts - FsOptions::READDIRPLUS_AUTO,
        ..defaults
    }))
}

/// Step 1, before any thread exists: every thread inherits the signal mask, so shutdown signals reach
/// the loop that waits for them.
fn begin(rlimit_nofile: u64) -> libc::sigset_t {
    let signals = block_shutdown_signals();
    crate::service::raise_nofile_limit(rlimit_nofile);
    signals
}

fn prefetch_list(file: Option<&Path>) -> Result<Vec<String>> {
    Ok(file
        .map(crate::service::read_prefetch_list)
        .transpose()?
        .unwrap_or_default())
}

/// The mount a daemon starts with, from its command line.
struct Startup {
    cmd: MountCmd,
    /// The parsed config of a RAFS mount: the sandbox allows its blob and cache paths.
    config: Option<DaemonConfig>,
}

impl Startup {
    fn rafs(
        bootstrap: &Path,
        text: String,
        config: DaemonConfig,
        prefetch_files: Vec<String>,
        id: Option<String>,
    ) -> Self {
        let mut cmd = MountCmd::new(FsType::Rafs, bootstrap.to_path_buf(), text);
        cmd.prefetch_files = prefetch_files;
        cmd.id = id;
        Startup {
            cmd,
            config: Some(config),
        }
    }
}

/// Step 2: what the sandbox lets the daemon use. `defaults` apply when neither the command line's
/// `--allow-path*` nor a start-up mount say anything (the real clients start the daemon with nothing
/// to serve and cannot pass our options).
fn allowed_paths(
    sandbox: &SandboxArgs,
    startup: Option<&Startup>,
    defaults: impl FnOnce() -> Result<AllowedPaths>,
    log_dir: Option<&Path>,
) -> Result<AllowedPaths> {
    let mut allowed = sandbox.allowed_paths()?;
    match startup {
        Some(Startup { cmd, .. }) if cmd.fs_type == FsType::Passthrough => {
            allowed.add_read_write(&cmd.source)?;
        }
        Some(Startup { cmd, config }) => {
            allowed.add_read_only(cmd.source.parent().unwrap_or(&cmd.source))?;
            if let Some(c) = config {
                allowed.add_config(c)?;
            }
        }
        None if !sandbox.paths_given() => allowed = defaults()?,
        None => {}
    }
    // The sandboxed daemon keeps writing (and rotating) its log there; resolved now, while it exists.
    if let Some(dir) = log_dir.and_then(|d| d.canonicalize().ok()) {
        allowed.private_rw.push(dir);
    }
    Ok(allowed)
}

/// Lock the sandbox and bound the daemon's later mounts to what it allows.
fn lock(sandbox: Sandbox, daemon: &Daemon) -> Result<()> {
    daemon.confine(sandbox.lock()?);
    Ok(())
}

/// `rafsd fuse`: serve on the host through /dev/fuse until a shutdown signal, `PUT /daemon/exit` or an
/// external unmount. Returns in the daemon process; the supervisor process exits as the daemon did.
/// `log_dir` is the log file's folder, which the sandboxed daemon may write.
pub fn fuse(args: FuseArgs, log_dir: Option<&Path>) -> Result<()> {
    let signals = begin(args.rlimit_nofile);
    if !matches!(args.sandbox.sandbox, None | Some(SandboxMode::None)) {
        // A private mount namespace would keep the FUSE mount from the host that wants to see it.
        return Err(Error::Unsupported(
            "rafsd fuse supports --sandbox none only (Landlock, capabilities and seccomp still apply)"
                .into(),
        ));
    }
    let (id, startup) = fuse_startup(&args)?;
    // nydus-snapshotter's shared daemon starts with nothing to serve and mounts every image through
    // the API, from its root; it cannot pass --allow-path.
    let snapshotter = || AllowedPaths::kata_defaults(None, sandbox::SNAPSHOTTER_ROOTS);
    let mut allowed = allowed_paths(&args.sandbox, startup.as_ref(), snapshotter, log_dir)?;
    // No network namespace for the FUSE daemon: API mounts may use network backends.
    allowed.network = true;
    let crashed = detach_crashed_predecessor(&args);
    let api_listener = args
        .apisock
        .as_deref()
        .map(crate::api::http::bind)
        .transpose()?;
    let (fate, fate_reader) = crate::takeover::mount_fate_pipe()?;
    // The sandboxed daemon may not unmount; a supervisor outside the sandbox does it when the daemon
    // ends, unless the daemon said the mount outlives it (a successor takes it over).
    let policy = Policy {
        allowed,
        seccomp: args.sandbox.seccomp,
        supervise: true,
        supervisor_caps: sandbox::SUPERVISOR_CAPS_FUSE,
        // The readahead knob of our mount lives in sysfs.
        extra_rw: &["/sys/devices/virtual/bdi"],
        signals,
    };
    let sandbox = match Sandbox::enter(SandboxMode::None, &policy)? {
        Entered::Supervisor(exit) => {
            drop((api_listener, fate));
            fuse_supervisor_ends(&args, fate_reader, exit)
        }
        Entered::Daemon(sandbox) => sandbox,
    };
    drop(fate_reader);
    let vfs = new_vfs();
    let daemon = Daemon::new(id, vfs.clone());
    let mut api = None;
    // Runs once the FUSE device is mounted (or, taking over, before waiting), before any worker starts.
    let start = |mount_image: bool| -> Result<()> {
        lock(sandbox, &daemon)?;
        if let (true, Some(startup)) = (mount_image, startup) {
            daemon.mount("/", startup.cmd)?;
        }
        api = api_listener
            .map(|l| crate::api::start_on(l, daemon.clone()))
            .transpose()?;
        Ok(())
    };
    let opts = crate::fusedev::FuseOptions {
        mountpoint: args.mountpoint.clone(),
        threads: args.thread_num as usize,
        failover_policy: args.failover_policy,
        supervisor: args.supervisor.clone(),
        take_over: args.upgrade || crashed,
        unmount_on_exit: false,
    };
    crate::fusedev::run(vfs, opts, &signals, &daemon, fate, start)
}

/// The FUSE daemon's supervisor, once the daemon ended: unmount unless the daemon left the mount to a
/// successor, remove the API socket, exit as the daemon did.
fn fuse_supervisor_ends(
    args: &FuseArgs,
    fate: crate::takeover::MountFateReader,
    exit: sandbox::Exit,
) -> ! {
    if fate.should_unmount() {
        crate::fusedev::unmount_fuse(&args.mountpoint);
    } else {
        log::info!(
            "supervisor: leaving the FUSE mount at {} to the next daemon",
            args.mountpoint.display()
        );
    }
    if let Some(p) = &args.apisock {
        let _ = std::fs::remove_file(p);
    }
    exit.propagate()
}

/// The FUSE daemon's instance id (the config's, else `--id`) and its start-up mount, if any.
fn fuse_startup(args: &FuseArgs) -> Result<(Option<String>, Option<Startup>)> {
    // The image given on the command line, as a mount request (kept whole for a successor daemon).
    let (config_text, config) = match (&args.config, &args.localfs_dir) {
        (Some(path), _) => {
            let (text, config) = DaemonConfig::load(path)?;
            (Some(text), Some(config))
        }
        (None, Some(dir)) => {
            let text = localfs_config(dir);
            let config = DaemonConfig::from_slice(text.as_bytes())?;
            (Some(text), Some(config))
        }
        (None, None) if args.bootstrap.is_some() => {
            return Err(Error::Invalid(
                "--bootstrap needs --config or --localfs-dir".into(),
            ))
        }
        (None, None) => (None, None),
    };
    let id = config
        .as_ref()
        .and_then(|c| c.id.clone())
        .or_else(|| args.id.clone());
    let prefetch_files = prefetch_list(args.prefetch_files.as_deref())?;
    let startup = match (&args.bootstrap, config_text, config) {
        (Some(bootstrap), Some(text), Some(config)) => Some(Startup::rafs(
            bootstrap,
            text,
            config,
            prefetch_files,
            args.id.clone(),
        )),
        _ => None,
    };
    Ok((id, startup))
}

/// A restarted daemon whose predecessor was killed finds that daemon's mount still there and its API
/// socket dead: with a `--supervisor` holding the connection it waits for the takeover (nydusd does the
/// same, and so does a live upgrade); returns whether it should. Without one, the dead mount only hides
/// the mountpoint: it is detached and a fresh mount replaces it.
fn detach_crashed_predecessor(args: &FuseArgs) -> bool {
    let crashed = !args.upgrade
        && args
            .apisock
            .as_deref()
            .is_some_and(|a| crate::fusedev::predecessor_crashed(&args.mountpoint, a));
    if crashed && args.supervisor.is_none() {
        // nydus-snapshotter's recover_policy "restart".
        log::warn!(
            "the previous daemon at {} died and no --supervisor can hand its connection over: detaching its mount",
            args.mountpoint.display()
        );
        crate::fusedev::unmount_fuse(&args.mountpoint);
    } else if crashed {
        log::warn!(
            "the previous daemon at {} died: waiting for PUT /api/v1/daemon/fuse/takeover",
            args.mountpoint.display()
        );
    }
    crashed && args.supervisor.is_some()
}

/// `--localfs-dir DIR` as the nydusd config it stands for: blobs in DIR, cached in DIR.
fn localfs_config(dir: &Path) -> String {
    serde_json::json!({
        "device": {
            "backend": {"type": "localfs", "config": {"dir": dir}},
            "cache": {"type": "blobcache", "config": {"work_dir": dir}},
        },
        "mode": "direct",
    })
    .to_string()
}

/// `rafsd virtiofs`: serve one VMM at a time on the vhost-user socket until a shutdown signal or
/// `PUT /daemon/exit`. Returns in the daemon process; a supervisor process exits as the daemon did.
pub fn virtiofs(args: VirtiofsArgs, log_dir: Option<&Path>) -> Result<()> {
    let signals = begin(args.rlimit_nofile);
    let pool_size = crate::vhost_user::pool_size(args.thread_pool_size);
    if args.announce_submounts {
        log::warn!("--announce-submounts is a virtiofsd option; ignored");
    }
    let vfs = new_vfs();
    let daemon = Daemon::new(args.id.clone(), vfs.clone());
    let startup = virtiofs_startup(&args)?;
    // Live upgrade: the running daemon's API socket is reached before the sandbox hides its path,
    // and a state this binary cannot read is refused here, before anything else happens.
    let mut successor = args
        .upgrade_from
        .as_deref()
        .map(crate::vhost_user::upgrade::Successor::connect)
        .transpose()?;
    let sock: PathBuf = match (&successor, &args.sock) {
        (Some(s), _) => s
            .offered
            .device
            .as_ref()
            .map(|d| d.socket_path.clone())
            .unwrap_or_default(),
        (None, Some(sock)) => sock.clone(),
        (None, None) => return Err(Error::Invalid("--sock is required".into())),
    };
    // Kata starts nydusd with nothing to serve and no room for our options (only
    // virtio_fs_extra_args): without defaults every one of its API mounts would be refused.
    // Kata names the sandbox in the socket paths: only that sandbox's share is exposed.
    let kata = || {
        let sockets: Vec<&Path> = [Some(sock.as_path()), args.apisock.as_deref()]
            .into_iter()
            .flatten()
            .collect();
        AllowedPaths::kata_defaults(
            sandbox::kata_sandbox_dir(&sockets).as_deref(),
            sandbox::SNAPSHOTTER_ROOTS,
        )
    };
    let allowed = allowed_paths(&args.sandbox, startup.as_ref(), kata, log_dir)?;
    // The sandboxed daemon mounts these from its own root: a relative path must name the host's file.
    let startup = startup.map(|mut s| {
        s.cmd.source = std::path::absolute(&s.cmd.source).unwrap_or(s.cmd.source);
        s.cmd
    });
    // Both sockets are bound on the host before the sandbox hides their paths (a successor gets the
    // vhost-user one from its predecessor).
    let listener = match successor {
        None => Some(crate::vhost_user::bind(&sock)?),
        Some(_) => None,
    };
    // A successor must not take the predecessor's API socket before the predecessor let go of the
    // device: it listens on a name of its own and renames it over --apisock once it serves.
    let api_path = match (&successor, &args.apisock) {
        (Some(_), Some(api)) => Some(PendingApiSocket::new(api)?),
        _ => None,
    };
    let api_listener = api_path
        .as_ref()
        .map(|p| p.temp.as_path())
        .or(args.apisock.as_deref())
        .map(crate::api::http::bind)
        .transpose()?;
    let sockets: Vec<&PathBuf> = [Some(&sock), args.apisock.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    // A daemon that handed its device over says so: its supervisor then leaves the sockets, which
    // now belong to the successor. A successor keeps them (they are its predecessor's) until it
    // serves the device.
    let (fate, fate_reader) = crate::takeover::mount_fate_pipe()?;
    let fate = Arc::new(fate);
    let served = Arc::new(AtomicBool::new(false));
    if successor.is_some() {
        fate.tell(crate::takeover::Fate::Keep);
    }
    let policy = Policy {
        allowed,
        seccomp: args.sandbox.seccomp,
        supervise: false,
        supervisor_caps: sandbox::SUPERVISOR_CAPS_VIRTIOFS,
        extra_rw: &[],
        signals,
    };
    let mode = args.sandbox.sandbox.unwrap_or(SandboxMode::Namespace);
    let worker = match Sandbox::enter(mode, &policy)? {
        Entered::Supervisor(exit) => {
            drop((api_listener, listener, successor, fate));
            if fate_reader.should_unmount() {
                remove_files(&sockets);
            }
            // Gone already if the successor renamed it over --apisock.
            if let Some(p) = &api_path {
                remove_files(&[&p.temp]);
            }
            match mode {
                SandboxMode::Namespace => exit.from_keeper().propagate(),
                _ => exit.propagate(),
            }
        }
        // The sandbox's first process keeps the state and restarts the daemon after a crash; only
        // the first daemon it forks may take a device over from a predecessor.
        Entered::Daemon(sandbox) if mode == SandboxMode::Namespace => {
            sandbox.confine()?;
            let worker = crate::takeover::keeper::keep(&signals, || drop(successor.take()))?;
            daemon.confine(sandbox.seal()?);
            Some(worker)
        }
        Entered::Daemon(sandbox) => {
            lock(sandbox, &daemon)?;
            None
        }
    };
    drop(fate_reader);
    let recovery = match worker.as_ref().and_then(|w| Some((w, w.restart.as_ref()?))) {
        Some((w, checkpoint)) => Some(recover_filesystems(
            &daemon,
            checkpoint,
            w.inflight.session(),
        )?),
        None => {
            if let Some(cmd) = startup {
                daemon.mount(&args.virtual_mountpoint, cmd)?;
            }
            None
        }
    };
    let (listener, carried) = match successor {
        None => (listener, recovery.map(crate::vhost_user::Carried::Crash)),
        Some(s) => {
            let (fate, served) = (fate.clone(), served.clone());
            let serving = Box::new(move || {
                served.store(true, Ordering::SeqCst);
                fate.tell(crate::takeover::Fate::Unmount);
                if let Some(p) = api_path {
                    p.commit();
                }
            });
            let (listener, restore) = take_over_device(&daemon, s, serving)?;
            (
                Some(listener),
                Some(crate::vhost_user::Carried::Upgrade(restore)),
            )
        }
    };
    let listener = listener.ok_or_else(|| Error::Internal("no vhost-user socket".into()))?;
    // Serving as soon as the API answers: Kata waits for RUNNING before it starts the VMM.
    daemon.set_state(DaemonState::Running);
    let _api = api_listener
        .map(|l| crate::api::start_on(l, daemon.clone()))
        .transpose()?;
    let mut device = crate::vhost_user::DeviceOptions {
        request_queues: args.thread_num as usize,
        pool_size,
        dax_window_size: args.dax_window.unwrap_or(0),
    };
    // A successor (or a restarted daemon) offers the device its predecessor offered (the VMM set
    // it up for that).
    let carried_device = carried.as_ref().and_then(|c| match c {
        crate::vhost_user::Carried::Upgrade(r) => r.handover.state.device.as_ref(),
        crate::vhost_user::Carried::Crash(r) => r.state.device.as_ref(),
    });
    if let Some(d) = carried_device {
        if !(1..=crate::vhost_user::MAX_REQUEST_QUEUES as u32).contains(&d.request_queues)
            || !d.dax_window.is_multiple_of(2 << 20)
        {
            return Err(Error::Invalid(format!(
                "the predecessor's device has {} request queues and a DAX window of {} bytes",
                d.request_queues, d.dax_window
            )));
        }
        device.request_queues = d.request_queues as usize;
        device.dax_window_size = d.dax_window;
    }
    let restoring = matches!(carried, Some(crate::vhost_user::Carried::Upgrade(_)));
    let crash = worker.map(|w| crate::vhost_user::CrashRestart {
        inflight: w.inflight,
        checkpoints: w.checkpoints,
    });
    let mut server = VhostUserServer::start(
        daemon.clone(),
        listener,
        &sock,
        device,
        carried,
        crash,
        true,
    )?;
    let result = serve_until_stopped(&mut server, &daemon, &signals);
    // Stopped by a signal or `PUT /daemon/exit` in the middle of a hand-over: once committed, the
    // socket files are the successor's.
    let result = match result {
        Ok(false) if server.handed_over() => Ok(true),
        r => r,
    };
    // The vhost-user thread may sit in accept(); the process exits without waiting for it.
    server.stop();
    if let Ok(true) = result {
        fate.tell(crate::takeover::Fate::Keep);
        log::info!("rafsd virtiofs handed its device over and stops");
        return Ok(());
    }
    if restoring && !served.load(Ordering::SeqCst) {
        // A successor that never served: the socket files are still its predecessor's.
        fate.tell(crate::takeover::Fate::Keep);
        return result.map(drop);
    }
    fate.tell(crate::takeover::Fate::Unmount);
    remove_files(&sockets);
    result?;
    log::info!("rafsd virtiofs stopped");
    Ok(())
}

/// The successor's side of a live upgrade, in the sandbox: mount the filesystems of the state
/// offered (the predecessor serves meanwhile), say yes, take the final state's lookup counts; the device
/// is carried on by the vhost-user thread ([`crate::vhost_user::Restore`]).
fn take_over_device(
    daemon: &Daemon,
    successor: crate::vhost_user::upgrade::Successor,
    serving: Box<dyn FnOnce() + Send>,
) -> Result<(std::os::unix::net::UnixListener, crate::vhost_user::Restore)> {
    let offered = &successor.offered;
    if let Err(e) = daemon.restore(&offered.pseudo_dirs, &offered.mounts, None) {
        successor.refuse(&e);
        return Err(e);
    }
    let offered = successor.offered.clone();
    let mut handover = successor.accept()?;
    let restored = (|| {
        let state = &handover.state;
        // The mounts must be those of the offer (one mounted or unmounted meanwhile: not handed over).
        if !state.same_mounts(&offered) {
            return Err(Error::Invalid(
                "the predecessor's mounts changed during the hand-over".into(),
            ));
        }
        daemon.set_lookups(&state.mounts, &mut handover.files)?;
        init_session(daemon, &state.fuse)?;
        let at = state
            .device
            .as_ref()
            .map_or(usize::MAX, |d| d.listener_fd as usize);
        handover
            .files
            .get_mut(at)
            .and_then(Option::take)
            .map(|f| std::os::unix::net::UnixListener::from(std::os::fd::OwnedFd::from(f)))
            .ok_or_else(|| Error::Invalid("no listening socket in the state".into()))
    })();
    match restored {
        Ok(listener) => {
            log::info!(
                "live upgrade: took over {} mounts from the predecessor",
                handover.state.mounts.len()
            );
            Ok((listener, crate::vhost_user::Restore { handover, serving }))
        }
        Err(e) => {
            handover.refuse(&Error::Internal(e.to_string()));
            Err(e)
        }
    }
}

/// Set the `Vfs` up for the FUSE session the guest negotiated with another process (it does not send
/// FUSE_INIT again).
fn init_session(daemon: &Daemon, fuse: &crate::takeover::state::FuseSession) -> Result<()> {
    fuse_backend_rs::api::filesystem::FileSystem::init(
        &*daemon.vfs,
        fuse_backend_rs::abi::fuse_abi::FsOptions::from_bits_truncate(fuse.flags),
    )
    .map(drop)
    .map_err(|e| Error::io("initialize the carried-on FUSE session", e))
}

/// A daemon restarted after a crash: mount the filesystems of the keeper's last checkpoint (a
/// passthrough share with the guest's numbers from its table: see [`Daemon::restore`]); the device
/// in it is carried on by the vhost-user thread. `session`: the guest's FUSE_INIT as the inflight
/// log has it (the checkpoint may predate it).
fn recover_filesystems(
    daemon: &Daemon,
    checkpoint: &crate::takeover::keeper::Checkpoint,
    session: Option<crate::takeover::state::FuseSession>,
) -> Result<crate::vhost_user::Recovery> {
    let mut state = crate::takeover::state::State::decode(&checkpoint.bytes, "virtiofs")?;
    if let Some(s) = session {
        state.fuse = s;
    }
    daemon.restore(&state.pseudo_dirs, &state.mounts, Some(&checkpoint.files))?;
    // Unless the checkpoint predates the guest's FUSE_INIT (which then comes to this daemon).
    if state.fuse.major != 0 {
        init_session(daemon, &state.fuse)?;
    }
    let files = checkpoint
        .files
        .iter()
        .map(|f| f.try_clone().map(Some))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::io("the checkpoint's descriptors", e))?;
    log::warn!(
        "crash restart: mounted the {} filesystems of the daemon that died",
        state.mounts.len()
    );
    Ok(crate::vhost_user::Recovery { state, files })
}

/// The virtio-fs daemon's start-up mount: `--bootstrap` with `--config`, or `--shared-dir`.
fn virtiofs_startup(args: &VirtiofsArgs) -> Result<Option<Startup>> {
    let prefetch_files = prefetch_list(args.prefetch_files.as_deref())?;
    Ok(
        if let (Some(bootstrap), Some(config)) = (&args.bootstrap, &args.config) {
            let (text, config) = DaemonConfig::load(config)?;
            Some(Startup::rafs(
                bootstrap,
                text,
                config,
                prefetch_files,
                args.id.clone(),
            ))
        } else {
            args.shared_dir.as_ref().map(|dir| {
                let mut cmd = MountCmd::new(FsType::Passthrough, dir.clone(), String::new());
                cmd.prefetch_files = prefetch_files;
                Startup { cmd, config: None }
            })
        },
    )
}

/// Until a shutdown signal, `PUT /daemon/exit`, or the vhost-user server's end (with its error).
/// `Ok(true)`: the device was handed over to a new daemon.
fn serve_until_stopped(
    server: &mut VhostUserServer,
    daemon: &Daemon,
    signals: &libc::sigset_t,
) -> Result<bool> {
    loop {
        if let Some(sig) = wait_for_signal(signals, Duration::from_millis(200)) {
            log::info!("signal {sig}: shutting down");
            return Ok(false);
        }
        if daemon.exit_requested() {
            return Ok(false);
        }
        if let Some(result) = server.finished() {
            return result;
        }
    }
}

/// A successor's API socket: bound under a name of its own beside `--apisock` (the predecessor still
/// listens there), renamed over it once the successor serves. The directory is opened before the
/// sandbox, which may hide its path.
struct PendingApiSocket {
    dir: std::fs::File,
    temp: PathBuf,
    name: std::ffi::OsString,
}

impl PendingApiSocket {
    fn new(api: &Path) -> Result<Self> {
        let name = api
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("--apisock {} names no file", api.display())))?
            .to_owned();
        let parent = api.parent().filter(|p| !p.as_os_str().is_empty());
        let parent = parent.unwrap_or(Path::new("."));
        let dir = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(parent)
            .map_err(|e| Error::io(format!("open {}", parent.display()), e))?;
        let mut temp_name = name.clone();
        temp_name.push(format!(".upgrade-{}", std::process::id()));
        Ok(PendingApiSocket {
            dir,
            temp: parent.join(&temp_name),
            name,
        })
    }

    /// Rename the socket over `--apisock` (the predecessor's file).
    fn commit(self) {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &std::ffi::OsStr| std::ffi::CString::new(p.as_bytes());
        let (Ok(from), Ok(to)) = (c(self.temp.file_name().unwrap_or_default()), c(&self.name))
        else {
            return;
        };
        let fd = self.dir.as_raw_fd();
        // SAFETY: two NUL-terminated names relative to a directory we hold open.
        if unsafe { libc::renameat(fd, from.as_ptr(), fd, to.as_ptr()) } != 0 {
            log::error!(
                "live upgrade: cannot move the admin API socket {} over {:?}: {}",
                self.temp.display(),
                self.name,
                std::io::Error::last_os_error()
            );
        }
    }
}

fn remove_files(paths: &[&PathBuf]) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

/// The vhost-user device served from a thread of its own ([`crate::vhost_user::serve`]).
pub(crate) struct VhostUserServer {
    thread: Option<std::thread::JoinHandle<Result<bool>>>,
    stop: Arc<AtomicBool>,
    upgrades: Arc<crate::vhost_user::Upgrades>,
}

impl VhostUserServer {
    /// Serve `daemon`'s share on `listener`; with `restore`, first carry on a predecessor's device.
    /// With `upgradable`, live-upgrade requests arrive through `daemon`'s upgrade hook, set here.
    /// With `crash`, the state is sent to the crash-restart keeper whenever it changes.
    pub(crate) fn start(
        daemon: Arc<Daemon>,
        listener: std::os::unix::net::UnixListener,
        sock: &Path,
        device: crate::vhost_user::DeviceOptions,
        carried: Option<crate::vhost_user::Carried>,
        crash: Option<crate::vhost_user::CrashRestart>,
        upgradable: bool,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (sock, stop2) = (sock.to_path_buf(), stop.clone());
        let upgrades =
            crate::vhost_user::Upgrades::new().map_err(|e| Error::io("live upgrade event", e))?;
        let upgrades_kept = upgrades.clone();
        if upgradable {
            let requests = upgrades.clone();
            daemon.set_upgrade_hook(Arc::new(move |peer| requests.request(peer)));
        }
        let restartable = crash.is_some();
        if restartable {
            let changes = upgrades.clone();
            daemon.on_mounts_changed(Arc::new(move || changes.state_changed()));
        }
        let thread = std::thread::Builder::new()
            .name("vhost-user".into())
            .spawn(move || {
                let serve = || {
                    crate::vhost_user::serve(
                        daemon, listener, &sock, device, stop2, upgrades, carried, crash,
                    )
                };
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(serve)) {
                    Ok(r) => r,
                    // The keeper starts a new daemon on the device.
                    Err(_) if restartable => {
                        log::error!(
                            "virtio-fs: the device's thread panicked; aborting to be restarted"
                        );
                        std::process::abort()
                    }
                    Err(_) => Err(Error::Internal("the device's thread panicked".into())),
                }
            })
            .map_err(|e| Error::io("start vhost-user thread", e))?;
        Ok(VhostUserServer {
            thread: Some(thread),
            stop,
            upgrades: upgrades_kept,
        })
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// The server's result once its thread ended by itself (an error, or a panic taken as an end).
    /// `Ok(true)`: the device was handed over to a new daemon (live upgrade).
    pub(crate) fn finished(&mut self) -> Option<Result<bool>> {
        if !self.thread.as_ref()?.is_finished() {
            return None;
        }
        match self.thread.take()?.join() {
            Ok(r) => Some(r),
            Err(_) => Some(Ok(false)),
        }
    }

    /// Ask the server to stop after the current VMM connection; returns its thread, if still running.
    pub(crate) fn stop(self) -> Option<std::thread::JoinHandle<Result<bool>>> {
        self.stop.store(true, Ordering::SeqCst);
        self.upgrades.stopping();
        self.thread
    }

    /// Stop any live upgrade from committing now; true if one did already.
    pub(crate) fn handed_over(&self) -> bool {
        self.upgrades.stopping()
    }
}
