//! Thin wrappers over the syscalls the helper makes: mount(2), loop devices, the kernel log, uname.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

pub fn mount(
    source: &Path,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let (src, tgt) = (cpath(source)?, cpath(target)?);
    let fstype = CString::new(fstype).expect("no NUL in a filesystem type");
    let data = CString::new(data)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mount options contain NUL"))?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub fn kernel_release() -> String {
    // SAFETY: utsname is plain old data filled by the kernel.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates release.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Whether the running kernel is at least `major.minor`.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = kernel_release();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

/// The kernel log lines holding `word` (empty when the log cannot be read).
pub fn kernel_log_lines(word: &str) -> Vec<String> {
    const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
    let mut buf = vec![0u8; 1 << 17];
    // SAFETY: the buffer is valid for its length.
    let n = unsafe {
        libc::klogctl(
            SYSLOG_ACTION_READ_ALL,
            buf.as_mut_ptr().cast(),
            buf.len() as i32,
        )
    };
    if n <= 0 {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&buf[..n as usize]);
    text.lines()
        .filter(|l| l.contains(word))
        .map(|l| l.trim().to_string())
        .collect()
}

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// The kernel's `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// The kernel's `struct loop_config` (LOOP_CONFIGURE, Linux ≥ 5.8).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// A read-only loop device over a file; it detaches itself (AUTOCLEAR) when the last user closes it.
pub struct LoopDevice {
    pub path: PathBuf,
    _dev: File,
}

impl LoopDevice {
    pub fn attach(file: &Path) -> Result<Self, String> {
        let backing = File::open(file).map_err(|e| format!("open {}: {e}", file.display()))?;
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .map_err(|e| format!("/dev/loop-control: {e} (is the loop driver loaded?)"))?;
        // SAFETY: ioctl without an argument on a descriptor we own.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(format!("LOOP_CTL_GET_FREE: {}", io::Error::last_os_error()));
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = OpenOptions::new()
            .read(true)
            .open(&path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        // SAFETY: both structs are plain old data; all-zero is valid.
        let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
        info.flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
        let name = file.as_os_str().as_bytes();
        let k = name.len().min(63);
        info.file_name[..k].copy_from_slice(&name[..k]);
        let config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: 0,
            info,
            reserved: [0; 8],
        };
        // SAFETY: the config is a valid loop_config that outlives the call.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &config) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOTTY) {
                return Err(format!("LOOP_CONFIGURE {}: {e}", path.display()));
            }
            // Kernels before 5.8: attach, then set the flags.
            // SAFETY: plain ioctls with a descriptor and a valid loop_info64.
            unsafe {
                if libc::ioctl(dev.as_raw_fd(), LOOP_SET_FD as _, backing.as_raw_fd()) != 0 {
                    return Err(format!(
                        "LOOP_SET_FD {}: {}",
                        path.display(),
                        io::Error::last_os_error()
                    ));
                }
                if libc::ioctl(dev.as_raw_fd(), LOOP_SET_STATUS64 as _, &config.info) != 0 {
                    return Err(format!(
                        "LOOP_SET_STATUS64 {}: {}",
                        path.display(),
                        io::Error::last_os_error()
                    ));
                }
            }
        }
        Ok(LoopDevice { path, _dev: dev })
    }
}
