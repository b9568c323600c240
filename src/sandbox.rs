//! The daemon's sandbox: what a bug reachable from guest requests could still do on the host.
//!
//! Layers, set up in this order before any thread starts (each is per thread; threads inherit them):
//! 1. `--sandbox namespace`: a supervisor forks; the child is pid 1 of new pid and mount namespaces (and a
//!    new network namespace when no network backend may be used). Its root becomes a small read-only
//!    tmpfs into which only the allowed paths are bind-mounted, **at their host paths**, so paths in API
//!    calls keep their meaning. `--sandbox chroot` builds the same view in a private mount namespace
//!    without new pid/network namespaces and without a supervisor (for runtimes that isolate those
//!    already). `--sandbox none` changes no namespace.
//! 2. Landlock (best effort, status logged): read-only access beneath the image/blob paths, read-write
//!    beneath cache work dirs and passthrough shares, nothing else.
//! 3. Capabilities: only [`KEPT_CAPS`] stay, dropped from every other set including the bounding set;
//!    NO_NEW_PRIVS is set.
//! 4. seccomp ([`crate::seccomp`]), on every thread.
//!
//! Mounts added through the API after start-up must lie beneath the allowed paths ([`AllowedPaths`]);
//! others are refused with an API error rather than failing later with EACCES. A daemon started as Kata
//! starts nydusd gets its own Kata sandbox's share and nydus-snapshotter's roots
//! ([`AllowedPaths::kata_defaults`], [`kata_sandbox_dir`]).
//!
//! Both front ends come in through [`Sandbox::enter`] (layer 1, and the FUSE daemon's supervisor that
//! unmounts) and finish with [`Sandbox::lock`] (layers 2-4) once they hold what they need; the start-up
//! sequence around them is [`crate::launch`]'s. The supervisor gets its own capabilities and seccomp
//! allow-list once it has forked the daemon ([`fork_supervised`]).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::config::{DaemonConfig, HostPath};
use crate::error::{Error, Result};
use crate::seccomp::SeccompMode;

pub mod probe;

/// `--sandbox`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    /// New mount, pid (and network) namespaces with a minimal root; a supervisor process waits outside.
    Namespace,
    /// The same minimal root in a private mount namespace, without pid/network namespaces or supervisor.
    Chroot,
    /// No namespaces (Landlock, capabilities and seccomp still apply).
    None,
}

/// Capabilities the daemon keeps, all for passthrough shares (Kata's `/containers`), where the daemon
/// acts for the guest's users on host files:
/// - CHOWN: chown/fchownat and creating files owned by the guest's uid/gid.
/// - DAC_OVERRIDE: root in the guest may read and write files whatever their mode.
/// - FOWNER: chmod, utimensat and xattrs on files the daemon's uid does not own.
/// - FSETID: keep setuid/setgid bits on write and chmod as the guest asked.
/// - SETUID / SETGID: switch the thread's fs credentials to the requesting guest user for create/mkdir.
/// - MKNOD: mknod of device nodes and FIFOs the guest creates.
/// - SETFCAP: set security.capability xattrs (file capabilities) the guest writes.
///
/// Not kept: SYS_ADMIN (mounts are done before dropping; the FUSE unmount is done by the supervisor),
/// DAC_READ_SEARCH (no file-handle lookups), NET_* (plain client sockets need none), and the rest.
pub const KEPT_CAPS: &[caps::Capability] = &[
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_FSETID,
    caps::Capability::CAP_SETUID,
    caps::Capability::CAP_SETGID,
    caps::Capability::CAP_MKNOD,
    caps::Capability::CAP_SETFCAP,
];

/// The virtio-fs supervisor removes the sockets when the daemon ends, in directories it may not own.
pub const SUPERVISOR_CAPS_VIRTIOFS: &[caps::Capability] = &[caps::Capability::CAP_DAC_OVERRIDE];
/// The FUSE supervisor also unmounts the daemon's mount.
pub const SUPERVISOR_CAPS_FUSE: &[caps::Capability] = &[
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_SYS_ADMIN,
];

/// Host files a network backend needs for name resolution, made visible (read-only) when the network
/// is allowed. No TLS directory: the trusted roots are built in and a backend's own `ca_cert_files`
/// are allowed one by one, while `/etc/ssl` and `/etc/pki` also hold the host's private keys.
const NETWORK_FILES: &[&str] = &[
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/host.conf",
];

/// Shared libraries (glibc loads NSS modules and libgcc_s with dlopen), always visible read-only.
const LIBRARY_PATHS: &[&str] = &[
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/etc/ld.so.cache",
];

/// Device nodes that libraries open by path.
const DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"];

/// Kata's host shared dirs, one per sandbox (`<root>/<sid>/shared` for the Go runtime, `<root>/<sid>/rw`
/// for runtime-rs): the passthrough share it mounts at `/containers`. A daemon gets its own sandbox's
/// directory read-write, never the root.
pub const KATA_SANDBOXES_ROOT: &str = "/run/kata-containers/shared/sandboxes";

/// nydus-snapshotter roots (the current default and the older containerd plugin path): bootstraps and
/// blobs beneath them are read; the blob cache, `<root>/cache` by default, is written.
pub const SNAPSHOTTER_ROOTS: &[&str] = &[
    "/var/lib/containerd-nydus",
    "/var/lib/containerd/io.containerd.snapshotter.v1.nydus",
];

/// The snapshotter's cache work dir, relative to its root.
const SNAPSHOTTER_CACHE: &str = "cache";

/// The host paths the daemon may use: read-only (images, blobs) and read-write (caches, shares).
#[derive(Debug, Clone, Default)]
pub struct AllowedPaths {
    pub read_only: Vec<PathBuf>,
    pub read_write: Vec<PathBuf>,
    /// A network backend may be used: no network namespace, resolver files visible.
    pub network: bool,
    /// The daemon's own files (the folder of its rotated log): visible and writable in the sandbox, but
    /// never offered to API mounts.
    pub private_rw: Vec<PathBuf>,
    /// The blob cache work dirs the daemon was started with (its config's, the snapshotter's `cache`):
    /// never part of a passthrough share, as other images trust what they hold.
    pub caches: Vec<PathBuf>,
}

/// An absolute path with "." and ".." resolved lexically, symlinks resolved for the part that exists.
pub fn normalize(p: &Path) -> Result<PathBuf> {
    let p = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io("current directory", e))?
            .join(p)
    };
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    // Resolve symlinks in the longest existing prefix, so a link cannot point a path elsewhere.
    let mut existing = out.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (
            existing.file_name().map(|n| n.to_owned()),
            existing.parent(),
        ) {
            (Some(n), Some(parent)) => {
                rest.push(n);
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut real = existing.canonicalize().unwrap_or(existing);
    for n in rest.into_iter().rev() {
        real.push(n);
    }
    Ok(real)
}

fn beneath(path: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| path.starts_with(r))
}

/// Kata's sandbox ids are container ids: a letter or digit, then letters, digits, `_`, `.`, `-`.
fn plausible_sandbox_id(id: &str) -> bool {
    let mut chars = id.chars();
    id.len() <= 255
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// The Kata sandbox id in the daemon's socket paths, which Kata builds from it: the Go runtime puts both
/// sockets in `<VMStorePath>/<sid>/` (`vhost-fs.sock` or `virtiofsd.sock`, and `nydusd-api.sock`),
/// runtime-rs in `/run/kata/<sid>/root/`. `None` when the sockets disagree or name no plausible id.
pub fn kata_sandbox_id(sockets: &[&Path]) -> Option<String> {
    let mut id: Option<String> = None;
    for sock in sockets {
        let path = normalize(sock).ok()?;
        let mut dir = path.parent()?;
        if dir.file_name() == Some("root".as_ref()) {
            dir = dir.parent()?;
        }
        let this = dir.file_name()?.to_str()?;
        if id.as_ref().is_some_and(|id| id != this) {
            return None;
        }
        id = Some(this.to_string());
    }
    id.filter(|id| plausible_sandbox_id(id))
}

/// The Kata share directory of the sandbox named in `sockets` (`KATA_SANDBOXES_ROOT/<sid>`), or `None`,
/// with a warning, when the socket paths name no sandbox.
pub fn kata_sandbox_dir(sockets: &[&Path]) -> Option<PathBuf> {
    let dir = kata_sandbox_id(sockets).map(|id| Path::new(KATA_SANDBOXES_ROOT).join(id));
    if dir.is_none() {
        log::warn!(
            "sandbox: the socket paths {sockets:?} name no Kata sandbox (<dir>/<sid>/<socket> or \
             /run/kata/<sid>/root/<socket>): no Kata share is exposed; pass --allow-path-rw for it"
        );
    }
    dir
}

impl AllowedPaths {
    pub fn add_read_only(&mut self, p: &Path) -> Result<()> {
        let p = normalize(p)?;
        if !beneath(&p, &self.read_only) {
            self.read_only.push(p);
        }
        Ok(())
    }

    pub fn add_read_write(&mut self, p: &Path) -> Result<()> {
        let p = normalize(p)?;
        if !beneath(&p, &self.read_write) {
            self.read_write.push(p);
        }
        Ok(())
    }

    /// What a daemon started the way Kata starts nydusd (nothing to serve, no `--allow-*`) may use:
    /// its Kata sandbox's share directory `kata_share` (see [`kata_sandbox_dir`]) read-write,
    /// `snapshotter_roots` read-only with their `cache` read-write, and (when a snapshotter root exists)
    /// the host network: Kata already runs the daemon in the sandbox's network namespace, and registry
    /// backends only arrive with API mounts. Paths missing now are left out, with a warning: the namespace
    /// root can only bind what exists, and a guessed path is not worth creating on the host.
    pub fn kata_defaults(kata_share: Option<&Path>, snapshotter_roots: &[&str]) -> Result<Self> {
        let mut allowed = AllowedPaths::default();
        let mut missing = Vec::new();
        if let Some(share) = kata_share {
            if share.is_dir() {
                allowed.add_read_write(share)?;
            } else {
                missing.push(share);
            }
        }
        for root in snapshotter_roots.iter().map(Path::new) {
            if !root.is_dir() {
                missing.push(root);
                continue;
            }
            allowed.add_read_only(root)?;
            allowed.add_read_write(&root.join(SNAPSHOTTER_CACHE))?;
            allowed
                .caches
                .push(normalize(&root.join(SNAPSHOTTER_CACHE))?);
            // Registry configs come with RAFS mounts, whose bootstraps live here.
            allowed.network = true;
        }
        log::info!(
            "sandbox: nothing to serve and no --allow-path/--allow-path-rw/--allow-network given: \
             applying the Kata/nydus-snapshotter defaults: read-write {:?}, read-only {:?}, host \
             network kept: {}; give any --allow-path, --allow-path-rw or --allow-network to choose \
             instead",
            allowed.read_write,
            allowed.read_only,
            allowed.network
        );
        if !missing.is_empty() {
            log::warn!(
                "sandbox: default roots {missing:?} do not exist now and are not exposed: API mounts \
                 beneath them will be refused (create them before starting rafsd, or pass --allow-path*)"
            );
        }
        Ok(allowed)
    }

    /// The paths a RAFS config names: blob directories (a blob file's directory) and backend files
    /// read-only, the cache work dir read-write; the network when the backend needs it.
    pub fn add_config(&mut self, config: &DaemonConfig) -> Result<()> {
        let mut backend = config.backend.clone();
        self.network |= backend.needs_network();
        for (what, p) in backend.host_paths_mut() {
            match what {
                HostPath::BlobFile => {
                    if let Some(parent) = p.parent() {
                        self.add_read_only(parent)?;
                    }
                }
                HostPath::BlobDir | HostPath::BackendFile => self.add_read_only(p)?,
            }
        }
        if let Some(w) = &config.cache.work_dir {
            self.add_read_write(w)?;
            self.caches.push(normalize(w)?);
        }
        Ok(())
    }

    /// Resolve `p` the way the sandbox sees it ("." and ".." lexically, symlinks of the existing part),
    /// check it lies beneath an allowed path, and replace it by the resolved path: inside the mount
    /// namespace a path like `/a/b/../c` would not resolve when `/a/b` is not in the view.
    fn confine(&self, what: &str, p: &mut PathBuf, write: bool) -> Result<()> {
        let real = normalize(p)?;
        let ok = beneath(&real, &self.read_write) || (!write && beneath(&real, &self.read_only));
        if ok {
            *p = real;
            return Ok(());
        }
        Err(Error::Forbidden(format!(
            "{what} {} is outside the sandbox's allowed paths (read-only: {:?}, read-write: {:?}); \
             start rafsd with --allow-path{} for it",
            p.display(),
            self.read_only,
            self.read_write,
            if write { "-rw" } else { "" }
        )))
    }

    /// Refuse a RAFS mount whose files lie outside the allowed paths (or that needs a network the
    /// sandbox does not have); resolve its paths in place.
    pub fn confine_rafs(&self, bootstrap: &mut PathBuf, config: &mut DaemonConfig) -> Result<()> {
        self.confine("bootstrap", bootstrap, false)?;
        if config.backend.needs_network() && !self.network {
            return Err(Error::Forbidden(format!(
                "backend {:?} needs the network, but the sandbox has none: start rafsd \
                 with --allow-network or with a network backend in --config",
                config.backend.kind()
            )));
        }
        for (what, p) in config.backend.host_paths_mut() {
            let what = match what {
                HostPath::BlobDir => "blob directory",
                HostPath::BlobFile => "blob file",
                HostPath::BackendFile => "backend file",
            };
            self.confine(what, p, false)?;
        }
        if let Some(w) = &mut config.cache.work_dir {
            self.confine("cache work_dir", w, true)?;
        }
        Ok(())
    }

    /// Refuse a passthrough share outside the read-write paths; resolve it in place.
    pub fn confine_share(&self, dir: &mut PathBuf) -> Result<()> {
        self.confine("shared directory", dir, true)
    }
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("{} contains NUL", p.display())))
}

fn check_errno(what: impl Into<String>, r: libc::c_int) -> Result<()> {
    if r < 0 {
        return Err(Error::io(what, std::io::Error::last_os_error()));
    }
    Ok(())
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<()> {
    let src_c = src.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype_c = fstype.map(|f| CString::new(f).unwrap_or_default());
    let data_c = data.map(|d| CString::new(d).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: NUL-terminated strings or null pointers, as mount(2) takes them.
    let r = unsafe {
        libc::mount(
            ptr(&src_c),
            target_c.as_ptr(),
            ptr(&fstype_c),
            flags,
            ptr(&data_c).cast(),
        )
    };
    check_errno(
        format!(
            "mount {} on {}",
            src.map_or("-".into(), |s| s.display().to_string()),
            target.display()
        ),
        r,
    )
}

/// How a front end's sandbox is built ([`Sandbox::enter`]).
pub struct Policy {
    /// What the daemon may use: paths, and whether the host network stays.
    pub allowed: AllowedPaths,
    /// What a syscall outside the daemon's allow-list does (`--seccomp`).
    pub seccomp: SeccompMode,
    /// Fork a supervisor outside the sandbox even without new namespaces (the FUSE daemon's, which
    /// unmounts when the daemon ends). `--sandbox namespace` always has one.
    pub supervise: bool,
    /// What the supervisor keeps ([`SUPERVISOR_CAPS_FUSE`], [`SUPERVISOR_CAPS_VIRTIOFS`]).
    pub supervisor_caps: &'static [caps::Capability],
    /// Paths beyond `allowed` the daemon may write (the FUSE mount's readahead knob in sysfs).
    pub extra_rw: &'static [&'static str],
    /// The shutdown signals (blocked by the caller) a supervisor forwards to the daemon.
    pub signals: libc::sigset_t,
}

/// Where [`Sandbox::enter`] leaves the calling process.
pub enum Entered {
    /// The daemon, isolated (namespaces, new root) as the mode asked; [`Sandbox::lock`] finishes.
    Daemon(Sandbox),
    /// The supervisor, after the daemon process ended: clean up, then [`Exit::propagate`].
    Supervisor(Exit),
}

/// A daemon process inside its namespaces and root, not yet restricted (Landlock, capabilities,
/// seccomp): the front end still mounts /dev/fuse or binds what it needs, then calls [`Sandbox::lock`].
pub struct Sandbox {
    allowed: AllowedPaths,
    seccomp: SeccompMode,
    extra_rw: &'static [&'static str],
}

impl Sandbox {
    /// The one way into the sandbox, for both front ends. Must be called while the process has a single
    /// thread.
    /// - `Namespace`: a supervisor forks; the daemon child gets new pid and mount namespaces (and a new
    ///   network namespace unless `policy.allowed.network`) and the minimal root ([`build_root`]).
    /// - `Chroot`: a private mount namespace and the same root, no supervisor.
    /// - `None`: no namespaces; a supervisor forks only if `policy.supervise`.
    pub fn enter(mode: SandboxMode, policy: &Policy) -> Result<Entered> {
        let supervised = |flags| {
            fork_supervised(
                mode == SandboxMode::Namespace,
                flags,
                &policy.signals,
                policy.supervisor_caps,
                policy.seccomp,
            )
        };
        match mode {
            SandboxMode::Namespace => {
                // Registry/OSS/S3 backends need the host network: keep it when one may be used.
                let mut flags = libc::CLONE_NEWNS;
                if !policy.allowed.network {
                    flags |= libc::CLONE_NEWNET;
                }
                if let Role::Supervisor(exit) = supervised(flags)? {
                    return Ok(Entered::Supervisor(exit));
                }
                build_root(&policy.allowed)?;
            }
            SandboxMode::Chroot => {
                // SAFETY: unshare of the mount namespace; single-threaded here.
                if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
                    return Err(Error::io(
                        "unshare the mount namespace (needs root)",
                        std::io::Error::last_os_error(),
                    ));
                }
                build_root(&policy.allowed)?;
            }
            SandboxMode::None if policy.supervise => {
                if let Role::Supervisor(exit) = supervised(0)? {
                    return Ok(Entered::Supervisor(exit));
                }
            }
            SandboxMode::None => {}
        }
        Ok(Entered::Daemon(Sandbox {
            allowed: policy.allowed.clone(),
            seccomp: policy.seccomp,
            extra_rw: policy.extra_rw,
        }))
    }

    /// Landlock, capabilities and seccomp, in that order, on the (still single) calling thread; seccomp
    /// also covers any later thread. Returns the paths the daemon must keep its mounts to
    /// ([`crate::daemon::Daemon::confine`]).
    pub fn lock(self) -> Result<AllowedPaths> {
        self.confine()?;
        self.seal()
    }

    /// Landlock and capabilities only: what the crash-restart keeper ([`crate::takeover::keeper`])
    /// takes on before it forks the daemon, which then calls [`Sandbox::seal`] (the seccomp filter
    /// forbids forking, so the keeper goes without it).
    pub fn confine(&self) -> Result<()> {
        restrict_filesystem(&self.allowed, self.extra_rw);
        drop_capabilities()
    }

    /// seccomp, after [`Sandbox::confine`].
    pub fn seal(self) -> Result<AllowedPaths> {
        crate::seccomp::install(self.seccomp)?;
        probe::daemon();
        Ok(self.allowed)
    }
}

/// What a supervised process turns out to be after [`fork_supervised`].
pub enum Role {
    /// The sandboxed daemon.
    Child,
    /// The supervisor, after the child ended: the exit status to pass on.
    Supervisor(Exit),
}

/// How the child ended.
#[derive(Debug, Clone, Copy)]
pub enum Exit {
    Code(u8),
    Signal(i32),
}

impl Exit {
    /// How the daemon under a crash-restart keeper ended, from the keeper's exit: a status above 128
    /// is the daemon's death by signal status - 128 (the keeper, pid 1 of its namespace, cannot
    /// die of a signal it raises).
    pub fn from_keeper(self) -> Exit {
        match self {
            Exit::Code(c) if c > 128 => Exit::Signal(i32::from(c - 128)),
            e => e,
        }
    }

    /// End the supervisor the way the child ended (same exit code, or the same fatal signal).
    pub fn propagate(self) -> ! {
        match self {
            Exit::Code(c) => std::process::exit(c.into()),
            Exit::Signal(sig) => {
                // SAFETY: plain libc calls; no core file for a signal the child already took.
                unsafe {
                    let none = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    libc::setrlimit(libc::RLIMIT_CORE, &none);
                    libc::signal(sig, libc::SIG_DFL);
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, sig);
                    libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                    libc::raise(sig);
                }
                std::process::exit(128 + sig)
            }
        }
    }
}

/// Fork a supervisor and a daemon child; the child dies with the supervisor (PDEATHSIG). With
/// `new_pid_ns` the child is pid 1 of a new pid namespace; it then unshares `child_flags` (mount, network)
/// itself, so the supervisor stays in the host's namespaces and can clean up there. The supervisor
/// forwards the shutdown signals in `signals` (blocked by the caller) to the child and waits for it.
/// The supervisor keeps only `supervisor_caps` (what its clean-up needs) and runs under its own seccomp
/// allow-list (`seccomp`: the daemon's `--seccomp`), which lets it signal and wait for the child only.
/// Must be called while the process has a single thread.
pub fn fork_supervised(
    new_pid_ns: bool,
    child_flags: libc::c_int,
    signals: &libc::sigset_t,
    supervisor_caps: &[caps::Capability],
    seccomp: SeccompMode,
) -> Result<Role> {
    if new_pid_ns {
        // SAFETY: unshare of the pid namespace only affects the children we fork next.
        check_errno("unshare the pid namespace (needs root)", unsafe {
            libc::unshare(libc::CLONE_NEWPID)
        })?;
    }
    // SAFETY: getpid has no preconditions.
    let supervisor = unsafe { libc::getpid() };
    // The supervisor holds the write end for its whole life: the child sees it hang up if the
    // supervisor died before the child asked for PDEATHSIG (in a new pid namespace getppid() cannot
    // tell: it is 0 there).
    let mut alive = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    check_errno("pipe", unsafe {
        libc::pipe2(alive.as_mut_ptr(), libc::O_CLOEXEC)
    })?;
    // SAFETY: single-threaded here (documented precondition), so the child may run normal Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::io("fork", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: prctl, close and poll on our own descriptors have no memory preconditions.
        unsafe {
            libc::close(alive[1]);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            let mut hup = libc::pollfd {
                fd: alive[0],
                events: 0,
                revents: 0,
            };
            if libc::poll(&mut hup, 1, 0) > 0 || (!new_pid_ns && libc::getppid() != supervisor) {
                libc::_exit(1);
            }
            libc::close(alive[0]);
        }
        if child_flags != 0 {
            // SAFETY: unshare with namespace flags; this process is single-threaded.
            check_errno("unshare namespaces (needs root)", unsafe {
                libc::unshare(child_flags)
            })?;
        }
        return Ok(Role::Child);
    }
    // SAFETY: closing our copy of the child's end; the write end stays open until we exit.
    unsafe { libc::close(alive[0]) };
    log::info!("sandbox: supervisor {supervisor} started the daemon as pid {pid}");
    // The supervisor reads no guest input, but it need not stay all-powerful either.
    if let Err(e) = drop_capabilities_to(supervisor_caps, "supervisor") {
        log::warn!("supervisor: {e}");
    }
    crate::seccomp::install_supervisor(seccomp, pid)?;
    probe::supervisor();
    loop {
        if let Some(sig) =
            crate::signals::wait_for_signal(signals, std::time::Duration::from_millis(100))
        {
            log::info!("supervisor: forwarding signal {sig} to {pid}");
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, sig) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            let exit = if libc::WIFSIGNALED(status) {
                Exit::Signal(libc::WTERMSIG(status))
            } else {
                Exit::Code(libc::WEXITSTATUS(status) as u8)
            };
            log::info!("supervisor: daemon {pid} ended: {exit:?}");
            return Ok(Role::Supervisor(exit));
        }
        if r < 0 {
            return Err(Error::io("waitpid", std::io::Error::last_os_error()));
        }
    }
}

/// Create `path` (and its parents) in the new root as a directory or an empty file, like `like`.
fn make_mount_point(path: &Path, like: &Path) -> Result<()> {
    let is_dir = like.is_dir();
    let dir = if is_dir { Some(path) } else { path.parent() };
    if let Some(d) = dir {
        std::fs::create_dir_all(d).map_err(|e| Error::io(format!("mkdir {}", d.display()), e))?;
    }
    if !is_dir && !path.exists() {
        std::fs::File::create(path)
            .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
    }
    Ok(())
}

/// How a path is mounted in the new root. Every kind is nosuid (the daemon never executes anything);
/// all but the device nodes are nodev, down the whole bound tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Images, blobs, libraries, resolver files: read-only.
    ReadOnly,
    /// Caches and shares: writable, but a device node in them (the daemon keeps CAP_MKNOD for the
    /// guest) never opens as a device.
    ReadWrite,
    /// One of [`DEVICES`].
    Device,
}

/// `mount_setattr(2)` (Linux 5.12) attributes and flag, from linux/mount.h (not in the libc crate).
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const AT_RECURSIVE: libc::c_int = 0x8000;

/// `struct mount_attr`, version 0.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Set `attrs` (MOUNT_ATTR_*) on the mount at `path` and on every mount beneath it, leaving their other
/// flags as they are. Kernels before 5.12 lack `mount_setattr`: there the top mount is remounted with
/// its current flags plus `attrs` (mounts beneath it keep theirs).
fn restrict_mounts(path: &Path, attrs: u64) -> Result<()> {
    let c = cstr(path)?;
    let attr = MountAttr {
        attr_set: attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: a valid C string and a mount_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    let e = std::io::Error::last_os_error();
    if r == 0 || e.raw_os_error() != Some(libc::ENOSYS) {
        return check_errno(
            format!("mount_setattr {}", path.display()),
            r as libc::c_int,
        );
    }
    // SAFETY: statvfs is plain data; all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a statvfs to fill.
    check_errno(format!("statvfs {}", path.display()), unsafe {
        libc::statvfs(c.as_ptr(), &mut st)
    })?;
    let keep = [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    let want = [
        (MOUNT_ATTR_RDONLY, libc::MS_RDONLY),
        (MOUNT_ATTR_NOSUID, libc::MS_NOSUID),
        (MOUNT_ATTR_NODEV, libc::MS_NODEV),
    ];
    let flags = keep
        .iter()
        .filter(|(st_flag, _)| st.f_flag & st_flag != 0)
        .chain(want.iter().filter(|(attr, _)| attrs & attr != 0))
        .fold(libc::MS_BIND | libc::MS_REMOUNT, |f, (_, ms)| f | ms);
    mount(None, path, None, flags, None)
}

/// Make `path` (a host path) visible in the new root at the same path; `old` is where the old root is.
/// System paths that are symlinks (`/lib` -> `usr/lib`) are recreated as symlinks.
fn expose(old: &Path, path: &Path, access: Access) -> Result<()> {
    let src = old.join(path.strip_prefix("/").unwrap_or(path));
    if access == Access::ReadWrite && !src.exists() {
        // A cache work dir the daemon would create later: create it now, while it can.
        let _ = std::fs::create_dir_all(&src);
    }
    let Ok(meta) = std::fs::symlink_metadata(&src) else {
        log::debug!("sandbox: {} does not exist; not exposed", path.display());
        return Ok(());
    };
    if meta.file_type().is_symlink() {
        if let Ok(target) = std::fs::read_link(&src) {
            if let Some(parent) = path.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let _ = std::os::unix::fs::symlink(&target, path);
            // Expose what the link points at too.
            let resolved = path.parent().unwrap_or(Path::new("/")).join(&target);
            if let Ok(resolved) = normalize(&resolved) {
                if !resolved.exists() {
                    return expose(old, &resolved, access);
                }
            }
        }
        return Ok(());
    }
    if path.exists() && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Ok(());
    }
    make_mount_point(path, &src)?;
    mount(Some(&src), path, None, libc::MS_BIND | libc::MS_REC, None)?;
    let attrs = match access {
        Access::ReadOnly => MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        Access::ReadWrite => MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        Access::Device => MOUNT_ATTR_NOSUID,
    };
    match restrict_mounts(path, attrs) {
        Ok(()) => Ok(()),
        // The guarantee for writable paths; elsewhere Landlock still keeps writes out.
        Err(e) if access == Access::ReadWrite => Err(e),
        Err(e) => {
            log::debug!("sandbox: restricting the mount at {}: {e}", path.display());
            Ok(())
        }
    }
}

/// In a fresh mount namespace: make a tmpfs the root, with only the allowed paths, libraries, a few
/// device nodes and a new /proc visible, each at its host path. Needs CAP_SYS_ADMIN.
pub fn build_root(paths: &AllowedPaths) -> Result<()> {
    let staging = Path::new("/tmp");
    // Keep our mount changes out of the host, but still see host mounts appearing beneath shares.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_SLAVE | libc::MS_REC,
        None,
    )?;
    mount(
        Some(Path::new("tmpfs")),
        staging,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("mode=0755,size=4m"),
    )?;
    std::fs::create_dir(staging.join("oldroot")).map_err(|e| Error::io("mkdir oldroot", e))?;
    std::env::set_current_dir(staging).map_err(|e| Error::io("chdir to the new root", e))?;
    let dot = cstr(Path::new("."))?;
    let put_old = cstr(Path::new("oldroot"))?;
    // SAFETY: valid C strings.
    check_errno("pivot_root", unsafe {
        libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), put_old.as_ptr()) as libc::c_int
    })?;
    std::env::set_current_dir("/").map_err(|e| Error::io("chdir /", e))?;
    let old = Path::new("/oldroot");

    let mut exposed: Vec<(PathBuf, Access)> = Vec::new();
    exposed.extend(LIBRARY_PATHS.iter().map(|p| (p.into(), Access::ReadOnly)));
    exposed.extend(DEVICES.iter().map(|p| (p.into(), Access::Device)));
    if paths.network {
        exposed.extend(NETWORK_FILES.iter().map(|p| (p.into(), Access::ReadOnly)));
    }
    exposed.extend(
        paths
            .read_only
            .iter()
            .map(|p| (p.clone(), Access::ReadOnly)),
    );
    exposed.extend(
        paths
            .read_write
            .iter()
            .map(|p| (p.clone(), Access::ReadWrite)),
    );
    exposed.extend(
        paths
            .private_rw
            .iter()
            .map(|p| (p.clone(), Access::ReadWrite)),
    );
    // Parents before children, so a bind beneath another bind is not hidden by it.
    exposed.sort_by_key(|(p, _)| p.components().count());
    for (p, access) in &exposed {
        expose(old, p, *access)?;
    }
    std::fs::create_dir_all("/proc").map_err(|e| Error::io("mkdir /proc", e))?;
    mount(
        Some(Path::new("proc")),
        Path::new("/proc"),
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    let old_c = cstr(old)?;
    // SAFETY: valid C string.
    check_errno("detach the old root", unsafe {
        libc::umount2(old_c.as_ptr(), libc::MNT_DETACH)
    })?;
    let _ = std::fs::remove_dir(old);
    // Nothing may create files in the new root itself.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )?;
    log::info!(
        "sandbox: new root with {} paths exposed (read-only {:?}, read-write {:?}, network: {})",
        exposed.len(),
        paths.read_only,
        paths.read_write,
        paths.network
    );
    Ok(())
}

/// Landlock, best effort: reads beneath the read-only paths, libraries and /proc; everything beneath
/// the read-write paths; nothing else. `extra_rw` adds front-end specific paths.
pub fn restrict_filesystem(paths: &AllowedPaths, extra_rw: &[&str]) {
    use landlock::{
        path_beneath_rules, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, ABI,
    };
    // The newest ABI this code was tested with; older kernels get what they support.
    let abi = ABI::V5;
    let mut read: Vec<PathBuf> = LIBRARY_PATHS.iter().map(PathBuf::from).collect();
    read.push("/proc".into());
    if paths.network {
        read.extend(NETWORK_FILES.iter().map(PathBuf::from));
    }
    read.extend(paths.read_only.iter().cloned());
    // Rules only attach to existing paths: create read-write dirs (cache work dirs) now, as the daemon
    // would anyway, so they are not silently left out.
    for p in &paths.read_write {
        if !p.exists() {
            if let Err(e) = std::fs::create_dir_all(p) {
                log::warn!("landlock: cannot create {}: {e}", p.display());
            }
        }
    }
    let mut write: Vec<PathBuf> = DEVICES.iter().map(PathBuf::from).collect();
    write.extend(extra_rw.iter().map(PathBuf::from));
    write.extend(paths.read_write.iter().cloned());
    write.extend(paths.private_rw.iter().cloned());
    let result = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(&read, AccessFs::from_read(abi))))
        .and_then(|r| r.add_rules(path_beneath_rules(&write, AccessFs::from_all(abi))))
        .and_then(|r| r.restrict_self());
    match result {
        Ok(status) => match status.ruleset {
            RulesetStatus::FullyEnforced => log::info!("landlock: fully enforced"),
            RulesetStatus::PartiallyEnforced => {
                log::warn!("landlock: partially enforced (older kernel ABI)")
            }
            RulesetStatus::NotEnforced => {
                log::warn!("landlock: not enforced (not supported by this kernel)")
            }
        },
        Err(e) => log::warn!("landlock: not enforced: {e}"),
    }
}

/// Keep only [`KEPT_CAPS`] (none of them inheritable or ambient), drop the bounding set, set
/// NO_NEW_PRIVS. Covers the calling thread and the threads it starts afterwards.
pub fn drop_capabilities() -> Result<()> {
    drop_capabilities_to(KEPT_CAPS, "daemon")
}

/// Keep only `keep` of the capabilities `who` has, in every set (see [`drop_capabilities`]).
pub fn drop_capabilities_to(keep: &[caps::Capability], who: &str) -> Result<()> {
    use caps::{CapSet, CapsHashSet};
    let keep: CapsHashSet = keep.iter().copied().collect();
    let err = |what: &str, e: caps::errors::CapsError| Error::Invalid(format!("{what}: {e}"));
    // Bounding first: dropping from it needs CAP_SETPCAP, which goes next.
    for c in caps::all() {
        if !keep.contains(&c) && caps::has_cap(None, CapSet::Bounding, c).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, c)
                .map_err(|e| err("drop bounding capability", e))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| err("clear ambient capabilities", e))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| err("clear inheritable capabilities", e))?;
    let have = caps::read(None, CapSet::Permitted).map_err(|e| err("read capabilities", e))?;
    let kept: CapsHashSet = keep.intersection(&have).copied().collect();
    caps::set(None, CapSet::Effective, &kept).map_err(|e| err("set effective capabilities", e))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(|e| err("set permitted capabilities", e))?;
    // SAFETY: prctl with plain integer arguments.
    check_errno("set NO_NEW_PRIVS", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    let mut names: Vec<String> = kept.iter().map(|c| c.to_string()).collect();
    names.sort();
    log::info!("capabilities of the {who}: kept {}", names.join(","));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start-up config's blob cache is one of the daemon's caches, which no share may overlap.
    #[test]
    fn the_start_up_configs_cache_is_kept_apart() {
        let config = DaemonConfig::from_slice(
            br#"{"device":{"backend":{"type":"localfs","config":{"dir":"/nonexistent-b"}},
                "cache":{"type":"blobcache","config":{"work_dir":"/nonexistent-c/../w"}}}}"#,
        )
        .unwrap();
        let mut allowed = AllowedPaths::default();
        allowed.add_config(&config).unwrap();
        assert_eq!(allowed.caches, [PathBuf::from("/w")]);
    }

    #[test]
    fn kata_defaults_take_existing_roots_only() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let (shared, snapshotter) = (base.join("sandboxes/sid"), base.join("snapshotter"));
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::create_dir_all(base.join("sandboxes/other")).unwrap();
        std::fs::create_dir(&snapshotter).unwrap();
        let s = |p: &Path| p.to_str().unwrap().to_string();
        let snap_s = s(&snapshotter);
        let (gone_shared, gone_snap) = (base.join("sandboxes/gone"), s(&base.join("no-snap")));
        let allowed =
            AllowedPaths::kata_defaults(Some(&shared), &[snap_s.as_str(), gone_snap.as_str()])
                .unwrap();
        assert!(allowed.network);
        assert_eq!(
            allowed.read_write,
            [shared.clone(), snapshotter.join("cache")]
        );
        assert_eq!(allowed.read_only, std::slice::from_ref(&snapshotter));
        assert_eq!(allowed.caches, [snapshotter.join("cache")]);
        // Bootstraps under the snapshotter root are readable, not writable; the sandbox's share is
        // writable, another sandbox's is not allowed at all.
        let mut share = shared.join("rw");
        allowed.confine_share(&mut share).unwrap();
        assert!(allowed
            .confine_share(&mut base.join("sandboxes/other/rw"))
            .is_err());
        assert!(allowed
            .confine("bootstrap", &mut base.join("sandboxes/other/x"), false)
            .is_err());
        assert!(allowed
            .confine_share(&mut snapshotter.join("snapshots"))
            .is_err());
        let mut cache = snapshotter.join("cache/x");
        allowed.confine("cache work_dir", &mut cache, true).unwrap();
        let mut boot = snapshotter.join("snapshots/1/fs/image/image.boot");
        allowed.confine("bootstrap", &mut boot, false).unwrap();
        // Nothing exists: nothing is allowed, so every API mount is refused (403), none half-works.
        for share in [Some(gone_shared.as_path()), None] {
            let none = AllowedPaths::kata_defaults(share, &[gone_snap.as_str()]).unwrap();
            assert!(none.read_only.is_empty() && none.read_write.is_empty() && !none.network);
            assert!(none.confine_share(&mut gone_shared.join("x")).is_err());
        }
    }

    #[test]
    fn the_kata_sandbox_id_comes_from_the_socket_paths() {
        let id = |socks: &[&str]| {
            let paths: Vec<&Path> = socks.iter().map(Path::new).collect();
            kata_sandbox_id(&paths)
        };
        let sid = "3c0b9d0e5b8f4a7a9e0f1d2c3b4a5968";
        // Go runtime (QEMU, Cloud Hypervisor) and runtime-rs.
        let go = [
            format!("/run/vc/vm/{sid}/vhost-fs.sock"),
            format!("/run/vc/vm/{sid}/nydusd-api.sock"),
        ];
        assert_eq!(id(&[&go[0], &go[1]]).as_deref(), Some(sid));
        assert_eq!(
            id(&[&format!("/run/vc/vm/{sid}/virtiofsd.sock")]).as_deref(),
            Some(sid)
        );
        let rs = [
            format!("/run/kata/{sid}/root/virtiofsd.sock"),
            format!("/run/kata/{sid}/root/nydusd-api.sock"),
        ];
        assert_eq!(id(&[&rs[0], &rs[1]]).as_deref(), Some(sid));
        // Sockets in different sandboxes' dirs, or dirs that are no id: none.
        assert_eq!(id(&[&go[0], "/run/vc/vm/other/nydusd-api.sock"]), None);
        assert_eq!(id(&["/tmp/.tmpAbC/vhost.sock"]), None);
        assert_eq!(id(&["/vhost.sock"]), None);
        assert_eq!(
            id(&["/run/vc/vm/a b/vhost-fs.sock"]),
            None,
            "not a container id"
        );
        // "..": resolved before the id is taken.
        assert_eq!(
            id(&[&format!("/run/vc/vm/{sid}/x/../vhost-fs.sock")]).as_deref(),
            Some(sid)
        );
        assert_eq!(
            kata_sandbox_dir(&[Path::new(&rs[0])]),
            Some(Path::new(KATA_SANDBOXES_ROOT).join(sid))
        );
    }
}
