//! Mount-table queries and mount operations the node plugin and the engine-host use:
//! filesystem mounts with CSI `mount_flags`, bind mounts (read-only honoured), stacked
//! unmounts, `statvfs` and block-device size.
//!
//! Everything here is a thin, typed wrapper over syscalls (`mount(2)`, `umount2(2)`,
//! `statvfs(3)`, `ioctl(BLKGETSIZE64)`), so errors say which path and which call
//! failed. The functions block; async callers run them on a blocking thread.
//!
//! Identity checks use device numbers, not paths: a path is "mounted from device D"
//! when `stat(path).st_dev == D`, and "a bind of device D" when it is a block device
//! node with `st_rdev == D`. This stays true across symlinks, renames and mount
//! namespaces, where comparing path strings would not.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{umount2, MntFlags, MsFlags};

use crate::frontend::cleanup::read_mountinfo;

/// Most mounts stacked on one path that [`unmount_all`] removes before giving up.
const MAX_STACKED_MOUNTS: usize = 64;

/// Why a mount operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    /// A CSI mount flag is not acceptable (it would change what kind of mount is made).
    #[error("mount flag {flag:?} is not allowed")]
    InvalidFlag {
        /// The flag.
        flag: String,
    },
    /// `mount(2)` failed.
    #[error("cannot mount {source_path} at {target} ({what})")]
    Mount {
        /// What was mounted.
        source_path: PathBuf,
        /// Where.
        target: PathBuf,
        /// Which kind of mount.
        what: &'static str,
        /// The cause.
        #[source]
        errno: Errno,
    },
    /// `umount2(2)` failed (for example EBUSY while files are open).
    #[error("cannot unmount {target}")]
    Unmount {
        /// The mountpoint.
        target: PathBuf,
        /// The cause.
        #[source]
        errno: Errno,
    },
    /// More mounts are stacked on the path than [`unmount_all`] is willing to remove.
    #[error("more than {MAX_STACKED_MOUNTS} mounts are stacked on {target}")]
    TooManyMounts {
        /// The mountpoint.
        target: PathBuf,
    },
    /// A filesystem query failed.
    #[error("cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> MountError + 'a {
    move |source| MountError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Splits a device number into `(major, minor)`.
pub fn split_dev(dev: u64) -> (u32, u32) {
    (libc::major(dev), libc::minor(dev))
}

/// `(major, minor)` of the block device node at `path`.
pub fn block_device_number(path: &Path) -> Result<(u32, u32), MountError> {
    let meta = std::fs::metadata(path).map_err(io_err("stat", path))?;
    if !meta.file_type().is_block_device() {
        return Err(MountError::Io {
            what: "use as a block device",
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a block device"),
        });
    }
    Ok(split_dev(meta.rdev()))
}

/// What is at a path, as far as staging and publishing care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathState {
    /// Nothing there.
    Missing,
    /// A directory whose filesystem lives on this device (`st_dev`).
    Dir {
        /// `(major, minor)` of the filesystem holding it.
        dev: (u32, u32),
    },
    /// A block device node (`st_rdev`).
    BlockDevice {
        /// `(major, minor)` of the device it names.
        rdev: (u32, u32),
    },
    /// A regular file or anything else.
    Other,
}

/// Stats `path` (following symlinks). A path whose mount is dead (`ENOTCONN`, a
/// FUSE server that exited) or unreadable (`EIO`) reads as [`PathState::Other`] so
/// callers can still unmount it.
pub fn path_state(path: &Path) -> Result<PathState, MountError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(PathState::Dir {
            dev: split_dev(m.dev()),
        }),
        Ok(m) if m.file_type().is_block_device() => Ok(PathState::BlockDevice {
            rdev: split_dev(m.rdev()),
        }),
        Ok(_) => Ok(PathState::Other),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(PathState::Missing),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::EIO)) => {
            Ok(PathState::Other)
        }
        Err(e) => Err(io_err("stat", path)(e)),
    }
}

/// The absolute form of `path` as the mount table prints it: symlinks resolved when
/// the path exists, otherwise made absolute only.
fn table_form(path: &Path) -> PathBuf {
    match path.canonicalize() {
        Ok(p) => p,
        Err(_) if path.is_absolute() => path.to_owned(),
        Err(_) => std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_owned()),
    }
}

/// How many mounts are stacked exactly on `path` (0 when it is not a mountpoint).
pub fn mount_count(path: &Path) -> Result<usize, MountError> {
    let want = table_form(path);
    let mounts = read_mountinfo().map_err(io_err("read the mount table for", path))?;
    Ok(mounts.iter().filter(|m| m.mountpoint == want).count())
}

/// Whether `path` is a mountpoint.
pub fn is_mountpoint(path: &Path) -> Result<bool, MountError> {
    Ok(mount_count(path)? > 0)
}

/// Unmounts every mount stacked on `path`, topmost first. Returns how many were
/// removed; a path that is not mounted (or does not exist) returns 0.
pub fn unmount_all(path: &Path) -> Result<usize, MountError> {
    let mut removed = 0;
    while mount_count(path)? > 0 {
        if removed >= MAX_STACKED_MOUNTS {
            return Err(MountError::TooManyMounts {
                target: path.to_owned(),
            });
        }
        match umount2(path, MntFlags::empty()) {
            Ok(()) => removed += 1,
            // Someone else unmounted it between the check and the call.
            Err(Errno::EINVAL | Errno::ENOENT) => {}
            Err(errno) => {
                return Err(MountError::Unmount {
                    target: path.to_owned(),
                    errno,
                })
            }
        }
    }
    Ok(removed)
}

/// CSI mount flags split into `mount(2)` flags and the filesystem's data string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Generic flags (`ro`, `noatime`, ...).
    pub flags: MsFlags,
    /// Filesystem-specific options, comma-separated, passed to the filesystem.
    pub data: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            flags: MsFlags::empty(),
            data: String::new(),
        }
    }
}

impl MountOptions {
    /// Parses CSI `mount_flags`. Each entry may itself be a comma-separated list.
    /// Flags that would change the kind of mount (`bind`, `remount`, `move`, ...) are
    /// refused.
    pub fn parse(mount_flags: &[String]) -> Result<MountOptions, MountError> {
        let mut out = MountOptions::default();
        let mut data: Vec<&str> = Vec::new();
        for opt in mount_flags.iter().flat_map(|f| f.split(',')) {
            let opt = opt.trim();
            let (set, clear) = match opt {
                "" | "defaults" | "rw" | "async" | "suid" | "dev" | "exec" | "atime"
                | "diratime" | "norelatime" | "auto" | "noauto" | "nouser" | "_netdev" => {
                    (MsFlags::empty(), MsFlags::empty())
                }
                "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
                "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
                "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
                "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
                "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
                "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
                "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
                "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
                "relatime" => (MsFlags::MS_RELATIME, MsFlags::MS_STRICTATIME),
                "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::MS_RELATIME),
                "lazytime" => (MsFlags::MS_LAZYTIME, MsFlags::empty()),
                "bind" | "rbind" | "remount" | "move" | "shared" | "rshared" | "private"
                | "rprivate" | "slave" | "rslave" | "unbindable" | "runbindable" | "loop" => {
                    return Err(MountError::InvalidFlag {
                        flag: opt.to_owned(),
                    })
                }
                other => {
                    data.push(other);
                    (MsFlags::empty(), MsFlags::empty())
                }
            };
            out.flags.remove(clear);
            out.flags.insert(set);
        }
        out.data = data.join(",");
        Ok(out)
    }

    /// Adds the filesystem option `option` to the data string unless it is there
    /// already (the CO may have passed it in `mount_flags` too).
    pub fn add_data_option(&mut self, option: &str) {
        if self.data.split(',').any(|o| o == option) {
            return;
        }
        if !self.data.is_empty() {
            self.data.push(',');
        }
        self.data.push_str(option);
    }
}

/// Mounts the filesystem of type `fs_type` on `device` at `target`.
pub fn mount_filesystem(
    device: &Path,
    target: &Path,
    fs_type: &str,
    options: &MountOptions,
) -> Result<(), MountError> {
    let data = (!options.data.is_empty()).then_some(options.data.as_str());
    nix::mount::mount(Some(device), target, Some(fs_type), options.flags, data).map_err(|errno| {
        MountError::Mount {
            source_path: device.to_owned(),
            target: target.to_owned(),
            what: "filesystem",
            errno,
        }
    })
}

/// Bind-mounts `source` onto `target` (both must exist and be of the same kind),
/// then remounts the bind read-only if asked: a bind mount ignores `MS_RDONLY` on
/// creation, so read-only takes the second call.
pub fn bind_mount(source: &Path, target: &Path, read_only: bool) -> Result<(), MountError> {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|errno| MountError::Mount {
        source_path: source.to_owned(),
        target: target.to_owned(),
        what: "bind",
        errno,
    })?;
    if read_only {
        let remount = nix::mount::mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        );
        if let Err(errno) = remount {
            // Do not leave a writable bind behind a failed read-only publish.
            let _ = umount2(target, MntFlags::empty());
            return Err(MountError::Mount {
                source_path: source.to_owned(),
                target: target.to_owned(),
                what: "read-only remount of bind",
                errno,
            });
        }
    }
    Ok(())
}

/// Whether the filesystem holding `path` is mounted read-only.
pub fn is_read_only(path: &Path) -> Result<bool, MountError> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| io_err("statvfs", path)(io::Error::from(e)))?;
    Ok(st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
}

/// Byte and inode usage of a mounted filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    /// Size of the filesystem in bytes.
    pub total_bytes: u64,
    /// Bytes available to unprivileged users.
    pub available_bytes: u64,
    /// Bytes in use.
    pub used_bytes: u64,
    /// Inodes the filesystem has.
    pub total_inodes: u64,
    /// Inodes free for unprivileged users.
    pub available_inodes: u64,
    /// Inodes in use.
    pub used_inodes: u64,
}

/// `statvfs` of the filesystem holding `path`.
pub fn fs_usage(path: &Path) -> Result<FsUsage, MountError> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| io_err("statvfs", path)(io::Error::from(e)))?;
    let frag = st.fragment_size() as u64;
    let total_bytes = (st.blocks() as u64).saturating_mul(frag);
    let free_bytes = (st.blocks_free() as u64).saturating_mul(frag);
    let available_bytes = (st.blocks_available() as u64).saturating_mul(frag);
    let total_inodes = st.files() as u64;
    let free_inodes = st.files_free() as u64;
    Ok(FsUsage {
        total_bytes,
        available_bytes,
        used_bytes: total_bytes.saturating_sub(free_bytes),
        total_inodes,
        available_inodes: st.files_available() as u64,
        used_inodes: total_inodes.saturating_sub(free_inodes),
    })
}

/// Size in bytes of the block device at `path` (`BLKGETSIZE64`).
pub fn block_device_size(path: &Path) -> Result<u64, MountError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("open", path))?;
    // _IOR(0x12, 114, size_t) from <linux/fs.h>.
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live
    // u64 for the whole call; the fd stays open because `file` is borrowed.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            BLKGETSIZE64 as libc::Ioctl,
            &mut size as *mut u64,
        )
    };
    if rc < 0 {
        return Err(io_err("read the size (BLKGETSIZE64) of", path)(
            io::Error::last_os_error(),
        ));
    }
    Ok(size)
}

/// Whether a block device is held exclusively, which is what a mounted filesystem
/// does: `open(O_EXCL)` fails with `EBUSY` then. Plain opens (a loop device's own
/// handle, a bind mount of the device node) do not count.
pub fn block_device_claimed(path: &Path) -> Result<bool, MountError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| MountError::Io {
        what: "open",
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"),
    })?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_EXCL | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EBUSY) => Ok(true),
            _ => Err(io_err("open exclusively", path)(e)),
        };
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    unsafe { libc::close(fd) };
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_flags_split_into_flags_and_data() {
        let o = MountOptions::parse(&["noatime,ro".into(), "discard".into(), "nouuid".into()])
            .expect("valid flags");
        assert!(o.flags.contains(MsFlags::MS_RDONLY));
        assert!(o.flags.contains(MsFlags::MS_NOATIME));
        assert_eq!(o.data, "discard,nouuid");
        let o = MountOptions::parse(&["strictatime".into(), "relatime".into()]).expect("valid");
        assert!(o.flags.contains(MsFlags::MS_RELATIME));
        assert!(!o.flags.contains(MsFlags::MS_STRICTATIME));
        assert_eq!(
            MountOptions::parse(&[]).expect("empty is fine"),
            MountOptions::default()
        );
        let mut o = MountOptions::parse(&["noatime".into()]).expect("valid");
        o.add_data_option("nouuid");
        assert_eq!(o.data, "nouuid");
        let mut o = MountOptions::parse(&["discard,nouuid".into()]).expect("valid");
        o.add_data_option("nouuid");
        assert_eq!(o.data, "discard,nouuid", "not added twice");
        o.add_data_option("inode64");
        assert_eq!(o.data, "discard,nouuid,inode64");
        for bad in ["bind", "remount", "rshared"] {
            assert!(matches!(
                MountOptions::parse(&[bad.to_owned()]),
                Err(MountError::InvalidFlag { .. })
            ));
        }
    }

    #[test]
    fn missing_paths_are_not_mounted() {
        let p = Path::new("/nonexistent/tessera/mount/test");
        assert_eq!(path_state(p).expect("stat"), PathState::Missing);
        assert_eq!(mount_count(p).expect("mountinfo"), 0);
        assert_eq!(unmount_all(p).expect("nothing to do"), 0);
    }

    #[test]
    fn root_is_a_mountpoint_and_dev_null_is_not_a_block_device() {
        assert!(is_mountpoint(Path::new("/")).expect("mountinfo"));
        assert!(block_device_number(Path::new("/dev/null")).is_err());
        assert!(fs_usage(Path::new("/")).expect("statvfs").total_bytes > 0);
    }
}
