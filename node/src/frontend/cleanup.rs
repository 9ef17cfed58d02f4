//! [`cleanup_stale`]: remove loop devices and FUSE mounts a crashed process left under
//! a directory.
//!
//! The node plugin keeps every volume's FUSE mountpoint under one root directory. After
//! a crash, loop devices bound to files under that root and FUSE mounts below it
//! outlive the process. At start the plugin calls [`cleanup_stale`] on its root to
//! remove them before staging anything again. Loop devices go first, because a bound
//! loop device keeps its FUSE mount busy.
//!
//! Devices and mounts still in use are never touched: a loop device with a filesystem
//! mounted from it, and the FUSE mount such a device reads from, belong to a volume a pod
//! may be using, and are reported in [`CleanupReport::in_use`] instead.
//!
//! Limitations: a FUSE mount that was already lazily detached no longer shows in the
//! mount table, and a loop device on it shows a path outside the root, so neither is
//! found; the kernel frees both when the loop device is detached by other means.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno as NixErrno;
use nix::mount::{umount2, MntFlags};

use super::loop_device::{list_bound, LoopDevice, LoopError};

/// What [`cleanup_stale`] removed, and what it left alone.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// Loop devices that were detached (`/dev/loopN`).
    pub detached_loops: Vec<PathBuf>,
    /// Loop devices still open elsewhere after detaching; the kernel finishes on last close.
    pub deferred_loops: Vec<PathBuf>,
    /// FUSE mountpoints that were unmounted.
    pub unmounted: Vec<PathBuf>,
    /// FUSE mountpoints that were busy and lazily detached instead.
    pub lazily_detached: Vec<PathBuf>,
    /// Loop devices and FUSE mountpoints left alone because they are in use: a
    /// filesystem is mounted from the loop device, or a kept loop device reads the
    /// FUSE file. Removing those would pull a volume from under a running pod.
    pub in_use: Vec<PathBuf>,
    /// Loop backing files and FUSE mountpoints the caller asked to keep.
    pub kept: Vec<PathBuf>,
}

/// Why [`cleanup_stale`] could not finish. Everything before the failure was removed.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// Scanning or detaching loop devices failed.
    #[error("cannot clean up loop devices backed by files under {root}")]
    Loop {
        /// The root directory being cleaned.
        root: PathBuf,
        /// The cause.
        #[source]
        source: LoopError,
    },
    /// `/proc/self/mountinfo` could not be read.
    #[error("cannot read {path}")]
    MountInfo {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Unmounting a stale FUSE mount failed.
    #[error("cannot unmount stale FUSE mount {mountpoint}")]
    Unmount {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// The cause.
        #[source]
        source: NixErrno,
    },
}

/// One line of `/proc/self/mountinfo`, the fields cleanup needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Device number of the mounted filesystem (`major:minor` field), which tells a
    /// mount apart from a later one at the same path.
    pub dev: (u32, u32),
    /// Where it is mounted (escapes like `\040` decoded).
    pub mountpoint: PathBuf,
    /// Filesystem type, e.g. `fuse.tessera`.
    pub fs_type: String,
    /// Mount source, e.g. `tessera`.
    pub source: String,
}

impl MountEntry {
    /// Whether this is a FUSE mount (`fuse`, `fuseblk` or `fuse.<subtype>`).
    pub fn is_fuse(&self) -> bool {
        self.fs_type == "fuse" || self.fs_type == "fuseblk" || self.fs_type.starts_with("fuse.")
    }
}

/// Decodes the octal escapes (`\040` for space and so on) mountinfo uses in paths.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(b) = u8::try_from(value) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Reads and parses `/proc/self/mountinfo`.
pub fn read_mountinfo() -> io::Result<Vec<MountEntry>> {
    std::fs::read_to_string("/proc/self/mountinfo").map(|t| parse_mountinfo(&t))
}

/// Parses the text of `/proc/<pid>/mountinfo`; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let mut entries = Vec::new();
    for line in text.lines() {
        // id parent major:minor root mountpoint options [optional...] - fstype source superopts
        let mut halves = line.splitn(2, " - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let (Some(dev), Some(mountpoint)) = (fields.get(2), fields.get(4)) else {
            continue;
        };
        let Some((Ok(major), Ok(minor))) = dev
            .split_once(':')
            .map(|(a, b)| (a.parse::<u32>(), b.parse::<u32>()))
        else {
            continue;
        };
        let mut right = right.split(' ');
        let (Some(fs_type), Some(source)) = (right.next(), right.next()) else {
            continue;
        };
        entries.push(MountEntry {
            dev: (major, minor),
            mountpoint: unescape(mountpoint),
            fs_type: fs_type.to_owned(),
            source: unescape(source).to_string_lossy().into_owned(),
        });
    }
    entries
}

/// `major:minor` of `/dev/loop<number>` from sysfs.
fn block_dev_number(number: u32) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(format!("/sys/block/loop{number}/dev")).ok()?;
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Whether `path` is `root` or below it, comparing whole components.
fn is_under(path: &Path, root: &Path) -> bool {
    path.starts_with(root)
}

/// Detaches every loop device whose backing file is under `root_dir`, then unmounts
/// every FUSE mount at or below `root_dir` (deepest first, lazily if busy). Devices and
/// mounts that are in use are left alone (see [`CleanupReport::in_use`]).
///
/// `root_dir` is compared as given (made absolute, not resolved through symlinks), so
/// pass the same path the mounts were made under.
pub fn cleanup_stale(root_dir: &Path) -> Result<CleanupReport, CleanupError> {
    cleanup_stale_except(root_dir, &|_| false)
}

/// Like [`cleanup_stale`], but leaves alone every loop device whose backing file, and
/// every FUSE mount whose mountpoint, `keep` returns true for. A restarted node plugin
/// passes the volumes it still has staged, so only real leftovers are removed.
pub fn cleanup_stale_except(
    root_dir: &Path,
    keep: &dyn Fn(&Path) -> bool,
) -> Result<CleanupReport, CleanupError> {
    let root = if root_dir.is_absolute() {
        root_dir.to_owned()
    } else {
        std::env::current_dir()
            .map(|d| d.join(root_dir))
            .unwrap_or_else(|_| root_dir.to_owned())
    };
    let loop_err = |source| CleanupError::Loop {
        root: root.clone(),
        source,
    };
    let mut report = CleanupReport::default();
    let mountinfo = Path::new("/proc/self/mountinfo");
    let mounts = read_mountinfo().map_err(|source| CleanupError::MountInfo {
        path: mountinfo.to_owned(),
        source,
    })?;
    // Backing files of loop devices that stay, so their FUSE mounts stay too.
    let mut kept_files: Vec<PathBuf> = Vec::new();

    for (number, backing) in list_bound().map_err(loop_err)? {
        if !is_under(&backing, &root) {
            continue;
        }
        if keep(&backing) {
            report.kept.push(backing.clone());
            kept_files.push(backing);
            continue;
        }
        let Some(mut dev) = LoopDevice::open_existing(number).map_err(loop_err)? else {
            continue;
        };
        if let Some(dev_no) = block_dev_number(number) {
            if mounts.iter().any(|m| m.dev == dev_no) {
                report.in_use.push(dev.path().to_owned());
                kept_files.push(backing);
                continue;
            }
        }
        match dev.detach() {
            Ok(()) => report.detached_loops.push(dev.path().to_owned()),
            Err(LoopError::DetachDeferred { device }) => report.deferred_loops.push(device),
            Err(e) => return Err(loop_err(e)),
        }
        tracing::info!(device = %dev.path().display(), file = %backing.display(), "detached stale loop device");
    }

    let mut stale: Vec<PathBuf> = Vec::new();
    for m in mounts {
        if !m.is_fuse() || !is_under(&m.mountpoint, &root) {
            continue;
        }
        if keep(&m.mountpoint) {
            report.kept.push(m.mountpoint);
        } else if kept_files.iter().any(|f| f.starts_with(&m.mountpoint)) {
            report.in_use.push(m.mountpoint);
        } else {
            stale.push(m.mountpoint);
        }
    }
    // Deepest first, so a mount on top of another comes off before the one below.
    stale.sort_by(|a, b| {
        let (a, b) = (a.as_os_str().as_bytes(), b.as_os_str().as_bytes());
        b.len().cmp(&a.len()).then_with(|| a.cmp(b))
    });
    stale.dedup();
    for mountpoint in stale {
        match umount2(&mountpoint, MntFlags::empty()) {
            Ok(()) => report.unmounted.push(mountpoint.clone()),
            Err(NixErrno::EBUSY) => {
                umount2(&mountpoint, MntFlags::MNT_DETACH).map_err(|source| {
                    CleanupError::Unmount {
                        mountpoint: mountpoint.clone(),
                        source,
                    }
                })?;
                report.lazily_detached.push(mountpoint.clone());
            }
            // Already gone (stacked mounts listed twice, or someone else was faster).
            Err(NixErrno::EINVAL | NixErrno::ENOENT) => continue,
            Err(source) => return Err(CleanupError::Unmount { mountpoint, source }),
        }
        tracing::info!(mountpoint = %mountpoint.display(), "removed stale FUSE mount");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let text = "\
36 35 98:0 /mnt1 /mnt/parent\\040dir rw,noatime master:1 - ext3 /dev/root rw,errors=continue
412 30 0:77 / /var/lib/tessera/vol-1 rw,nosuid,nodev,noexec,noatime - fuse.tessera tessera rw,user_id=0,group_id=0
garbage line without separator
413 30 0:78 / /var/lib/tessera/vol-2 rw shared:5 - fuse tessera rw
";
        let entries = parse_mountinfo(text);
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].mountpoint, PathBuf::from("/mnt/parent dir"));
        assert!(!entries[0].is_fuse());
        assert_eq!(entries[1].fs_type, "fuse.tessera");
        assert!(entries[1].is_fuse());
        assert_eq!(entries[1].source, "tessera");
        assert_eq!(entries[1].dev, (0, 77));
        assert_eq!(
            entries[2].mountpoint,
            PathBuf::from("/var/lib/tessera/vol-2")
        );
        assert!(entries[2].is_fuse());
    }

    #[test]
    fn under_compares_components() {
        assert!(is_under(Path::new("/a/b/c"), Path::new("/a/b")));
        assert!(is_under(Path::new("/a/b"), Path::new("/a/b")));
        assert!(!is_under(Path::new("/a/bc"), Path::new("/a/b")));
    }

    #[test]
    fn unescape_keeps_lone_backslashes() {
        assert_eq!(unescape("a\\134b"), PathBuf::from("a\\b"));
        assert_eq!(unescape("a\\9"), PathBuf::from("a\\9"));
        assert_eq!(unescape("end\\"), PathBuf::from("end\\"));
    }
}
