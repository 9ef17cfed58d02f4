//! Finding and removing what a crashed run left under the directory.
//!
//! A `tessera up` that was SIGKILLed (or a machine that lost power) leaves daemons
//! running, the demo volume mounted (bind mount, ext4 on a loop device, the FUSE file
//! under it) and sockets on disk. The next run on the same directory removes those
//! first, and the teardown of every run checks that none of them is left. Replica data
//! is never touched: it is what makes the next run find its volume again.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tessera_node::frontend::cleanup::{cleanup_stale, read_mountinfo};
use tessera_node::frontend::loop_device::list_bound;

use crate::layout::Layout;
use crate::wait::{poll_until, Poll};

/// What is mounted or attached under the directory right now.
#[derive(Debug, Default)]
pub struct Remains {
    /// Mountpoints under the directory, most recent mount first.
    pub mounts: Vec<(PathBuf, String)>,
    /// Loop devices (`/dev/loopN`) whose backing file is under the directory.
    pub loops: Vec<(PathBuf, PathBuf)>,
}

impl Remains {
    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.mounts.is_empty() && self.loops.is_empty()
    }

    /// One line per leftover, for messages.
    pub fn describe(&self) -> String {
        let mut out = Vec::new();
        for (path, fs) in &self.mounts {
            out.push(format!("mount {} ({fs})", path.display()));
        }
        for (dev, file) in &self.loops {
            out.push(format!(
                "loop device {} -> {}",
                dev.display(),
                file.display()
            ));
        }
        out.join("\n")
    }
}

/// Lists the mounts and loop devices under the layout's directory.
pub fn scan(layout: &Layout) -> anyhow::Result<Remains> {
    let mut mounts: Vec<(PathBuf, String)> = read_mountinfo()
        .context("reading /proc/self/mountinfo")?
        .into_iter()
        .filter(|m| layout.contains(&m.mountpoint))
        .map(|m| (m.mountpoint, m.fs_type))
        .collect();
    // mountinfo lists in mount order; undo the newest first.
    mounts.reverse();
    let loops = list_bound()
        .context("listing loop devices")?
        .into_iter()
        .filter(|(_, file)| layout.contains(file))
        .map(|(n, file)| (PathBuf::from(format!("/dev/loop{n}")), file))
        .collect();
    Ok(Remains { mounts, loops })
}

/// Removes every mount and loop device under the directory: the non-FUSE mounts
/// (bind and filesystem mounts) newest first, so the loop devices under them are
/// free, then loop devices and FUSE mounts through the node crate's cleanup. Returns
/// what was found before.
pub fn unmount_all(layout: &Layout) -> anyhow::Result<Remains> {
    let before = scan(layout)?;
    unmount_filesystems(layout)?;
    cleanup_stale(&layout.root).with_context(|| {
        format!(
            "cleaning loop devices and FUSE mounts under {}",
            layout.root.display()
        )
    })?;
    // Anything still there (e.g. a FUSE mount kept busy) goes lazily.
    for (path, _) in scan(layout)?.mounts {
        unmount(&path)?;
    }
    Ok(before)
}

/// Unmounts the bind and filesystem mounts under the directory, newest first, and
/// leaves FUSE mounts and loop devices alone. This is what NodeUnpublish and
/// NodeUnstage would have done, for when the node plugin cannot: with the engine-host
/// still running, the filesystem is flushed to the replicas on the way. Returns the
/// mounts it removed.
pub fn unmount_filesystems(layout: &Layout) -> anyhow::Result<Remains> {
    let mut unmounted = Remains::default();
    for (path, fs) in scan(layout)?.mounts {
        if fs == "fuse" || fs == "fuseblk" || fs.starts_with("fuse.") {
            continue;
        }
        unmount(&path)?;
        unmounted.mounts.push((path, fs));
    }
    Ok(unmounted)
}

/// Unmounts `path`, lazily if it is busy; a path that is no longer mounted is fine.
fn unmount(path: &Path) -> anyhow::Result<()> {
    match umount2(path, MntFlags::empty()) {
        Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => Ok(()),
        Err(Errno::EBUSY) => match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("lazily unmounting {}", path.display())),
        },
        Err(e) => Err(e).with_context(|| format!("unmounting {}", path.display())),
    }
}

/// Stops the daemons a crashed run left, as listed in `DIR/run/pids`. A pid is only
/// signalled while its command line still mentions the directory, so a recycled pid
/// of an unrelated process is never touched. Returns the names of the stopped ones.
pub async fn stop_orphans(layout: &Layout) -> anyhow::Result<Vec<String>> {
    let path = layout.pid_file();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut stopped = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(pid), Some(name)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        let own = i32::try_from(std::process::id()).unwrap_or(0);
        if pid <= 1 || pid == own || !is_ours(pid, &layout.root) {
            continue;
        }
        let group = Pid::from_raw(pid);
        let _ = killpg(group, Signal::SIGTERM);
        let gone = poll_until(Duration::from_secs(10), || async move {
            if is_ours(pid, &layout.root) {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        if gone.is_err() {
            let _ = killpg(group, Signal::SIGKILL);
            let _ = kill(group, Signal::SIGKILL);
        }
        stopped.push(format!("{name} (pid {pid})"));
    }
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok(stopped)
}

/// Whether process `pid` exists, is not a zombie, and its command line names `root`.
fn is_ours(pid: i32, root: &Path) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Field 3 (after the parenthesised name) is the state; Z is a zombie.
    if let Some(rest) = status.rsplit_once(')').map(|(_, r)| r.trim_start()) {
        if rest.starts_with('Z') {
            return false;
        }
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = root.as_os_str().as_bytes();
    !needle.is_empty() && cmdline.windows(needle.len()).any(|w| w == needle)
}

/// Removes sockets and ready files of an earlier run, so nothing can mistake them for
/// the new daemons'.
pub fn remove_stale_files(layout: &Layout) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for dir in [layout.run(), layout.node_state()] {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        for entry in entries {
            let path = entry
                .with_context(|| format!("reading {}", dir.display()))?
                .path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let stale = name.is_some_and(|n| {
                n.ends_with(".sock") || n.ends_with(".ready.json") || n == "endpoints.json"
            });
            if stale {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
                removed.push(path);
            }
        }
    }
    Ok(removed)
}
