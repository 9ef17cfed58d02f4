//! Mounts and loop devices a test left under its directory, and removing them.
//!
//! Tests that stage volumes make real mounts (filesystems on loop devices, bind
//! mounts, FUSE files) and loop devices below their cluster directory. Whatever
//! happens to the test, none of it may outlive it: [`cleanup_under`] is the safety
//! net the [`crate::Cluster`] runs on drop, and tests use [`mounts_under`] and
//! [`loop_devices_under`] to assert that an unstage left nothing behind.
//!
//! Only paths below the given root are ever touched, so concurrent tests (each with
//! a directory of its own) cannot disturb each other.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::mount::{umount2, MntFlags};

/// One mount from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Filesystem type (`ext4`, `xfs`, `fuse`, ...).
    pub fs_type: String,
    /// Mount source (a device path, or what the filesystem put there).
    pub source: String,
}

/// One bound loop device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopEntry {
    /// `/dev/loopN`.
    pub device: PathBuf,
    /// The file it reads and writes (without a ` (deleted)` suffix).
    pub backing_file: PathBuf,
}

/// What [`cleanup_under`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// Mountpoints that were (lazily) unmounted.
    pub unmounted: Vec<PathBuf>,
    /// Loop devices that were detached.
    pub detached: Vec<PathBuf>,
    /// What could not be removed, one line each.
    pub failures: Vec<String>,
}

impl CleanupReport {
    /// Whether nothing was left behind to clean up.
    pub fn is_empty(&self) -> bool {
        self.unmounted.is_empty() && self.detached.is_empty() && self.failures.is_empty()
    }
}

/// Decodes the octal escapes (`\040` for a space) mountinfo uses in paths.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(value) = u8::try_from(value) {
                    out.push(value);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of `/proc/self/mountinfo`. Malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        // id parent major:minor root mountpoint options [optional...] - fstype source super
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < 5 || dash + 2 >= fields.len() {
            continue;
        }
        mounts.push(MountEntry {
            mountpoint: PathBuf::from(unescape(fields[4])),
            fs_type: fields[dash + 1].to_owned(),
            source: unescape(fields[dash + 2]),
        });
    }
    mounts
}

/// Every mount of this process's mount namespace.
pub fn mounts() -> io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// Mounts at or below `root`, deepest first (the order to unmount them in).
pub fn mounts_under(root: &Path) -> io::Result<Vec<MountEntry>> {
    let root = canonical(root);
    let mut below: Vec<MountEntry> = mounts()?
        .into_iter()
        .filter(|m| m.mountpoint.starts_with(&root))
        .collect();
    below.sort_by_key(|m| std::cmp::Reverse(m.mountpoint.components().count()));
    Ok(below)
}

/// Every bound loop device, per `/sys/block/loop*/loop/backing_file`.
pub fn loop_devices() -> io::Result<Vec<LoopEntry>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block")? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            // Not bound (no `loop` directory or no backing file).
            continue;
        };
        let backing = backing.trim_end_matches('\n');
        let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
        if backing.is_empty() {
            continue;
        }
        found.push(LoopEntry {
            device: Path::new("/dev").join(&name),
            backing_file: PathBuf::from(backing),
        });
    }
    found.sort_by(|a, b| a.device.cmp(&b.device));
    Ok(found)
}

/// Loop devices whose backing file lies below `root`.
pub fn loop_devices_under(root: &Path) -> io::Result<Vec<LoopEntry>> {
    let root = canonical(root);
    Ok(loop_devices()?
        .into_iter()
        .filter(|l| l.backing_file.starts_with(&root))
        .collect())
}

/// Detaches a loop device with `losetup -d` (the kernel finishes on last close).
pub fn detach_loop(device: &Path) -> io::Result<()> {
    let out = Command::new("losetup")
        .arg("-d")
        .arg(device)
        .stdin(Stdio::null())
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "losetup -d {}: {}",
            device.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Lazily unmounts every mount below `root` that `select` accepts, deepest first.
pub fn unmount_under(
    root: &Path,
    select: impl Fn(&MountEntry) -> bool,
    report: &mut CleanupReport,
) {
    let mounts = match mounts_under(root) {
        Ok(m) => m,
        Err(e) => {
            report
                .failures
                .push(format!("reading /proc/self/mountinfo: {e}"));
            return;
        }
    };
    for m in mounts.into_iter().filter(|m| select(m)) {
        match umount2(&m.mountpoint, MntFlags::MNT_DETACH) {
            Ok(()) => report.unmounted.push(m.mountpoint),
            // Gone already (a parent's lazy unmount took it along).
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => report
                .failures
                .push(format!("unmounting {}: {e}", m.mountpoint.display())),
        }
    }
}

/// Removes every mount and loop device below `root`: mounts that are not FUSE files
/// first (filesystems on loop devices, bind mounts), then loop devices backed by
/// files below `root`, then the rest (FUSE mounts). Never fails; what could not be
/// removed is listed in the report.
pub fn cleanup_under(root: &Path) -> CleanupReport {
    let mut report = CleanupReport::default();
    unmount_under(root, |m| !m.fs_type.starts_with("fuse"), &mut report);
    match loop_devices_under(root) {
        Ok(loops) => {
            for l in loops {
                match detach_loop(&l.device) {
                    Ok(()) => report.detached.push(l.device),
                    Err(e) => report.failures.push(e.to_string()),
                }
            }
        }
        Err(e) => report.failures.push(format!("listing loop devices: {e}")),
    }
    unmount_under(root, |_| true, &mut report);
    report
}

fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let text = "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - ext4 /dev/loop3 rw\n\
                    37 35 0:50 / /tmp/x/fuse rw shared:2 master:3 - fuse.tessera tessera rw\n\
                    garbage\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mountpoint, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].fs_type, "ext4");
        assert_eq!(m[0].source, "/dev/loop3");
        assert_eq!(m[1].fs_type, "fuse.tessera");
    }

    #[test]
    fn unescape_leaves_plain_backslashes() {
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("a\\9"), "a\\9");
        assert_eq!(unescape("end\\"), "end\\");
    }
}
