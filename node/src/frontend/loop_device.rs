//! [`LoopDevice`]: attach, resize, inspect and detach loop devices with ioctls.
//!
//! The node turns the FUSE volume file into a block device with a loop device. It talks
//! to the kernel directly (no `losetup` process), so errors carry the device, the file
//! and the operation, and so the retry when another process grabs the same free device
//! is ours to control.
//!
//! Direct I/O is requested on attach because the filesystem above the loop device has
//! its own page cache; a second cache in the loop device would double memory use and
//! delay flushes to the engine. Whether the kernel really enabled it is read back from
//! sysfs and reported in [`LoopDevice::direct_io`].
//!
//! Dropping a [`LoopDevice`] does not detach it. The node plugin that attaches a device
//! may restart while the filesystem on it stays mounted and in use, so only an explicit
//! [`LoopDevice::detach`] (or [`super::cleanup_stale`]) tears it down.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

// Request numbers from <linux/loop.h>. They predate the _IO* encoding, so they are
// plain constants.
const LOOP_SET_FD: u32 = 0x4C00;
const LOOP_CLR_FD: u32 = 0x4C01;
const LOOP_SET_STATUS64: u32 = 0x4C04;
const LOOP_GET_STATUS64: u32 = 0x4C05;
const LOOP_SET_CAPACITY: u32 = 0x4C07;
const LOOP_SET_DIRECT_IO: u32 = 0x4C08;
const LOOP_SET_BLOCK_SIZE: u32 = 0x4C09;
const LOOP_CONFIGURE: u32 = 0x4C0A;
const LOOP_CTL_GET_FREE: u32 = 0x4C82;

const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// Logical block size asked for: the volume block size, so the filesystem above never
/// issues I/O smaller than a replica block.
const BLOCK_SIZE: u32 = 4096;
/// How many free devices to try before giving up when other processes keep taking them.
const ATTACH_ATTEMPTS: usize = 32;
/// How long [`LoopDevice::detach`] waits for the kernel to release the device.
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);

const LOOP_CONTROL: &str = "/dev/loop-control";

/// `struct loop_info64` from <linux/loop.h>.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

impl LoopInfo64 {
    fn zeroed() -> Self {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }

    fn set_file_name(&mut self, path: &Path) {
        // The kernel keeps at most 63 bytes plus a NUL; sysfs has the full path.
        let bytes = path.as_os_str().as_bytes();
        let n = bytes.len().min(LO_NAME_SIZE - 1);
        self.lo_file_name[..n].copy_from_slice(&bytes[..n]);
    }
}

/// `struct loop_config` from <linux/loop.h> (LOOP_CONFIGURE, Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

/// Why a loop device operation failed, with the device or file and the operation.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// Opening `/dev/loop-control`, a `/dev/loopN` node or the backing file failed.
    #[error("cannot open {path}")]
    Open {
        /// What was opened.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An ioctl failed.
    #[error("{op} on {device} failed")]
    Ioctl {
        /// The ioctl, by name.
        op: &'static str,
        /// The device it was issued on.
        device: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Every free device found was taken by another process before it could be bound.
    #[error("no free loop device for {file} after {attempts} attempts (others took them)")]
    NoFreeDevice {
        /// The file to attach.
        file: PathBuf,
        /// Attempts made.
        attempts: usize,
    },
    /// Reading loop state from sysfs failed.
    #[error("cannot read {path}")]
    Sysfs {
        /// The sysfs file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The device is still open elsewhere (a mounted filesystem, another process); the
    /// kernel marked it to detach itself when the last user closes it.
    #[error("{device} is still in use; it detaches when its last user closes it")]
    DetachDeferred {
        /// The device.
        device: PathBuf,
    },
}

/// What `LOOP_GET_STATUS64` reports about a bound device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopStatus {
    /// Device number (`st_dev`) of the filesystem holding the backing file.
    pub backing_dev: u64,
    /// Inode number of the backing file.
    pub backing_inode: u64,
    /// The name given at attach time, cut to 63 bytes by the kernel.
    pub file_name: PathBuf,
    /// `LO_FLAGS_*` bits.
    pub flags: u32,
    /// Whether `LO_FLAGS_DIRECT_IO` is among the flags.
    pub direct_io: bool,
}

/// A loop device bound to a file, held open by this handle.
#[derive(Debug)]
pub struct LoopDevice {
    number: u32,
    path: PathBuf,
    backing_file: PathBuf,
    /// `None` once detached.
    device: Option<File>,
    direct_io: bool,
    block_size: u32,
}

/// Runs an ioctl whose argument is an integer (or unused).
fn ioctl_int(fd: &File, request: u32, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: the caller passes a loop request whose argument is a plain integer, so the
    // kernel reads no memory through `arg`; `fd` is open for the whole call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn device_path(number: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{number}"))
}

fn sysfs_dir(number: u32) -> PathBuf {
    PathBuf::from(format!("/sys/block/loop{number}"))
}

fn read_sysfs(path: &Path) -> io::Result<String> {
    std::fs::read_to_string(path).map(|s| s.trim_end_matches('\n').to_owned())
}

/// The file a bound device reads from, per sysfs; `None` if the device is unbound.
fn sysfs_backing_file(number: u32) -> Result<Option<PathBuf>, LoopError> {
    let path = sysfs_dir(number).join("loop/backing_file");
    match std::fs::read(&path) {
        Ok(mut bytes) => {
            if bytes.last() == Some(&b'\n') {
                bytes.pop();
            }
            Ok(Some(PathBuf::from(OsStr::from_bytes(&bytes))))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        // The device disappeared while being read (removed with LOOP_CTL_REMOVE).
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(source) => Err(LoopError::Sysfs { path, source }),
    }
}

/// Removes `.` and `..` without touching the filesystem (a FUSE path may not answer).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Strips the " (deleted)" suffix the kernel appends to the path of an unlinked file.
fn strip_deleted(path: &Path) -> PathBuf {
    let bytes = path.as_os_str().as_bytes();
    let trimmed = bytes.strip_suffix(b" (deleted)").unwrap_or(bytes);
    PathBuf::from(OsStr::from_bytes(trimmed))
}

/// Every bound loop device and the file behind it, per `/sys/block/loop*/loop/backing_file`.
pub fn list_bound() -> Result<Vec<(u32, PathBuf)>, LoopError> {
    let dir = Path::new("/sys/block");
    let entries = std::fs::read_dir(dir).map_err(|source| LoopError::Sysfs {
        path: dir.to_owned(),
        source,
    })?;
    let mut bound = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| LoopError::Sysfs {
            path: dir.to_owned(),
            source,
        })?;
        let name = entry.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_prefix("loop"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(file) = sysfs_backing_file(number)? {
            bound.push((number, strip_deleted(&file)));
        }
    }
    bound.sort();
    Ok(bound)
}

impl LoopDevice {
    /// Binds a free loop device to `file` with a 4 KiB logical block size and, if
    /// `direct_io`, direct I/O. Uses `LOOP_CONFIGURE`, or `LOOP_SET_FD` plus
    /// `LOOP_SET_BLOCK_SIZE`/`LOOP_SET_DIRECT_IO` on kernels without it. If another
    /// process binds the free device first, the next free one is tried.
    pub fn attach(file: &Path, direct_io: bool) -> Result<LoopDevice, LoopError> {
        let backing = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(file)
            .map_err(|source| LoopError::Open {
                path: file.to_owned(),
                source,
            })?;
        let backing_path = if file.is_absolute() {
            normalize(file)
        } else {
            std::env::current_dir()
                .map(|d| normalize(&d.join(file)))
                .unwrap_or_else(|_| file.to_owned())
        };
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(LOOP_CONTROL)
            .map_err(|source| LoopError::Open {
                path: PathBuf::from(LOOP_CONTROL),
                source,
            })?;
        for _ in 0..ATTACH_ATTEMPTS {
            let number =
                ioctl_int(&control, LOOP_CTL_GET_FREE, 0).map_err(|source| LoopError::Ioctl {
                    op: "LOOP_CTL_GET_FREE",
                    device: PathBuf::from(LOOP_CONTROL),
                    source,
                })?;
            let number = number as u32;
            let path = device_path(number);
            let device = match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
            {
                Ok(f) => f,
                // Removed by someone else between GET_FREE and open: try again.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENXIO)) => continue,
                Err(source) => return Err(LoopError::Open { path, source }),
            };
            match bind(&device, &path, &backing, &backing_path, direct_io) {
                Ok(()) => {}
                Err(LoopError::Ioctl { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) =>
                {
                    tracing::debug!(device = %path.display(), "loop device taken by another process, retrying");
                    continue;
                }
                Err(e) => return Err(e),
            }
            let mut dev = LoopDevice {
                number,
                path,
                backing_file: backing_path,
                device: Some(device),
                direct_io: false,
                block_size: 512,
            };
            dev.refresh_sysfs_state();
            if direct_io && !dev.direct_io {
                tracing::warn!(
                    device = %dev.path.display(),
                    file = %file.display(),
                    "direct I/O requested but not enabled by the kernel"
                );
            }
            return Ok(dev);
        }
        Err(LoopError::NoFreeDevice {
            file: file.to_owned(),
            attempts: ATTACH_ATTEMPTS,
        })
    }

    /// Opens an already bound `/dev/loop<number>` (for example one left by a crashed
    /// process) so it can be inspected or detached.
    pub fn open_existing(number: u32) -> Result<Option<LoopDevice>, LoopError> {
        let Some(backing_file) = sysfs_backing_file(number)? else {
            return Ok(None);
        };
        let path = device_path(number);
        let device = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENXIO)) => {
                return Ok(None)
            }
            Err(source) => return Err(LoopError::Open { path, source }),
        };
        let mut dev = LoopDevice {
            number,
            path,
            backing_file: strip_deleted(&backing_file),
            device: Some(device),
            direct_io: false,
            block_size: 512,
        };
        dev.refresh_sysfs_state();
        Ok(Some(dev))
    }

    /// Finds a loop device bound to `file` (an absolute path, compared as the kernel
    /// prints it in sysfs, without resolving symlinks so a dead FUSE mount on the way
    /// cannot block the scan). Used to clean up after a crashed node plugin.
    pub fn find_by_backing_file(file: &Path) -> Result<Option<LoopDevice>, LoopError> {
        let wanted = normalize(file);
        for (number, backing) in list_bound()? {
            if backing == wanted {
                if let Some(dev) = LoopDevice::open_existing(number)? {
                    return Ok(Some(dev));
                }
            }
        }
        Ok(None)
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The N in `/dev/loopN`.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The file the device was bound to.
    pub fn backing_file(&self) -> &Path {
        &self.backing_file
    }

    /// Whether the kernel actually does direct I/O to the file
    /// (`/sys/block/loopN/loop/dio`), which may differ from what was asked for.
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// Logical block size of the device in bytes (4096 unless the kernel refused it).
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Whether [`detach`](Self::detach) has completed on this handle.
    pub fn is_detached(&self) -> bool {
        self.device.is_none()
    }

    fn refresh_sysfs_state(&mut self) {
        let dir = sysfs_dir(self.number);
        self.direct_io = read_sysfs(&dir.join("loop/dio")).is_ok_and(|v| v == "1");
        self.block_size = read_sysfs(&dir.join("queue/logical_block_size"))
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(512);
    }

    fn open_device(&self, op: &'static str) -> Result<&File, LoopError> {
        self.device.as_ref().ok_or_else(|| LoopError::Ioctl {
            op,
            device: self.path.clone(),
            source: io::Error::from_raw_os_error(libc::ENXIO),
        })
    }

    /// Reads `LOOP_GET_STATUS64`: which file (device and inode) the device reads from.
    pub fn status(&self) -> Result<LoopStatus, LoopError> {
        let device = self.open_device("LOOP_GET_STATUS64")?;
        let mut info = LoopInfo64::zeroed();
        // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64` through the pointer;
        // `info` is a live, properly sized and aligned #[repr(C)] value of that layout.
        let rc = unsafe {
            libc::ioctl(
                device.as_raw_fd(),
                LOOP_GET_STATUS64 as libc::Ioctl,
                &mut info as *mut LoopInfo64,
            )
        };
        if rc < 0 {
            return Err(LoopError::Ioctl {
                op: "LOOP_GET_STATUS64",
                device: self.path.clone(),
                source: io::Error::last_os_error(),
            });
        }
        let name_len = info
            .lo_file_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(LO_NAME_SIZE);
        Ok(LoopStatus {
            backing_dev: info.lo_device,
            backing_inode: info.lo_inode,
            file_name: PathBuf::from(OsStr::from_bytes(&info.lo_file_name[..name_len])),
            flags: info.lo_flags,
            direct_io: info.lo_flags & LO_FLAGS_DIRECT_IO != 0,
        })
    }

    /// Re-reads the backing file's size after it grew (volume expansion) and returns
    /// the device's new size in bytes.
    pub fn set_capacity(&self) -> Result<u64, LoopError> {
        let device = self.open_device("LOOP_SET_CAPACITY")?;
        ioctl_int(device, LOOP_SET_CAPACITY, 0).map_err(|source| LoopError::Ioctl {
            op: "LOOP_SET_CAPACITY",
            device: self.path.clone(),
            source,
        })?;
        self.size_bytes()
    }

    /// The device's current size in bytes, per sysfs.
    pub fn size_bytes(&self) -> Result<u64, LoopError> {
        let path = sysfs_dir(self.number).join("size");
        let sectors = read_sysfs(&path)
            .and_then(|v| {
                v.parse::<u64>()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
            })
            .map_err(|source| LoopError::Sysfs {
                path: path.clone(),
                source,
            })?;
        Ok(sectors * 512)
    }

    /// Unbinds the device from its file. Idempotent: a detached handle, or a device
    /// someone else already unbound, returns `Ok`.
    ///
    /// The kernel tears the device down when its last opener closes it. If the device
    /// is still open elsewhere (a mounted filesystem) after `DETACH_TIMEOUT`, the
    /// kernel finishes later on its own and [`LoopError::DetachDeferred`] is returned.
    /// This never waits on the backing file itself: if its FUSE server is gone the
    /// kernel fails the outstanding I/O instead of blocking.
    pub fn detach(&mut self) -> Result<(), LoopError> {
        let Some(device) = self.device.take() else {
            return Ok(());
        };
        match ioctl_int(&device, LOOP_CLR_FD, 0) {
            Ok(_) => {}
            // Not bound any more: someone else detached it.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(()),
            Err(source) => {
                self.device = Some(device);
                return Err(LoopError::Ioctl {
                    op: "LOOP_CLR_FD",
                    device: self.path.clone(),
                    source,
                });
            }
        }
        // Our fd is one of the openers; closing it lets the kernel finish the teardown.
        drop(device);
        let deadline = Instant::now() + DETACH_TIMEOUT;
        loop {
            match sysfs_backing_file(self.number)? {
                None => return Ok(()),
                // Someone else bound the number to another file right after us.
                Some(f) if strip_deleted(&f) != self.backing_file => return Ok(()),
                Some(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(LoopError::DetachDeferred {
                    device: self.path.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Binds `device` to `backing`, preferring LOOP_CONFIGURE.
fn bind(
    device: &File,
    path: &Path,
    backing: &File,
    backing_path: &Path,
    direct_io: bool,
) -> Result<(), LoopError> {
    let ioctl_err = |op, source| LoopError::Ioctl {
        op,
        device: path.to_owned(),
        source,
    };
    let mut info = LoopInfo64::zeroed();
    info.set_file_name(backing_path);
    let mut config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: BLOCK_SIZE,
        info,
        reserved: [0; 8],
    };
    if direct_io {
        config.info.lo_flags |= LO_FLAGS_DIRECT_IO;
    }
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config` through the pointer; `config`
    // is a live #[repr(C)] value of that exact layout (size checked at compile time) and
    // the fd in it is open for the whole call.
    let rc = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            LOOP_CONFIGURE as libc::Ioctl,
            &config as *const LoopConfig,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // Older kernels answer unknown loop ioctls with EINVAL (or ENOTTY); some
        // refuse LO_FLAGS_DIRECT_IO in LOOP_CONFIGURE. Fall back to the step-by-step
        // ioctls, where a refused block size or direct I/O is not fatal.
        Some(libc::EINVAL | libc::ENOTTY) => {}
        _ => return Err(ioctl_err("LOOP_CONFIGURE", err)),
    }
    tracing::debug!(device = %path.display(), "LOOP_CONFIGURE unavailable, using LOOP_SET_FD");
    ioctl_int(device, LOOP_SET_FD, backing.as_raw_fd() as libc::c_ulong)
        .map_err(|e| ioctl_err("LOOP_SET_FD", e))?;
    let mut info = LoopInfo64::zeroed();
    info.set_file_name(backing_path);
    // SAFETY: LOOP_SET_STATUS64 reads one `struct loop_info64` through the pointer;
    // `info` is a live #[repr(C)] value of that layout.
    let rc = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            LOOP_SET_STATUS64 as libc::Ioctl,
            &info as *const LoopInfo64,
        )
    };
    if rc < 0 {
        tracing::debug!(device = %path.display(), error = %io::Error::last_os_error(), "LOOP_SET_STATUS64 failed; name not recorded");
    }
    if let Err(e) = ioctl_int(device, LOOP_SET_BLOCK_SIZE, libc::c_ulong::from(BLOCK_SIZE)) {
        tracing::warn!(device = %path.display(), error = %e, "cannot set 4 KiB logical block size");
    }
    if direct_io {
        if let Err(e) = ioctl_int(device, LOOP_SET_DIRECT_IO, 1) {
            tracing::warn!(device = %path.display(), error = %e, "cannot enable direct I/O");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_is_lexical() {
        assert_eq!(
            normalize(Path::new("/a/./b/../c/volume")),
            PathBuf::from("/a/c/volume")
        );
        assert_eq!(
            strip_deleted(Path::new("/x/volume (deleted)")),
            PathBuf::from("/x/volume")
        );
        assert_eq!(
            strip_deleted(Path::new("/x/volume")),
            PathBuf::from("/x/volume")
        );
    }

    #[test]
    fn file_name_is_cut_to_63_bytes() {
        let mut info = LoopInfo64::zeroed();
        let long = "/".to_owned() + &"x".repeat(100);
        info.set_file_name(Path::new(&long));
        assert_eq!(info.lo_file_name[62], b'x');
        assert_eq!(info.lo_file_name[63], 0);
    }
}
