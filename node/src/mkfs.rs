//! Finding and creating filesystems on a volume's block device.
//!
//! The rule this module exists to keep: **a device that holds anything is never
//! formatted.** [`probe`] asks `blkid` in low-level probing mode (no cache, reads the
//! device itself) and only [`Probe::Empty`] lets the caller run [`make_filesystem`].
//! A partition table, an unknown signature, or a probe blkid calls ambivalent all
//! block formatting.
//!
//! The tools are the distribution's `blkid`, `mkfs.ext4` and `mkfs.xfs`; they run
//! with stdin closed (a tool that wants to ask a question gets EOF and aborts) and a
//! time limit.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// How long one `blkid` or `mkfs` run may take. mkfs of a large volume over a slow
/// quorum can take a while; a hang beyond this is reported instead of waited on.
const TOOL_TIMEOUT: Duration = Duration::from_secs(600);

pub use tessera_replica_protocol::volume_params::FsType;

/// Filesystem options the node plugin always mounts `fs` with, on top of the CO's
/// `mount_flags`.
///
/// xfs gets `nouuid`. A restored or cloned volume carries its source's filesystem
/// UUID with its blocks, and the kernel refuses to mount a second xfs with a UUID
/// already mounted ("Filesystem has duplicate UUID"), so without it a copy never
/// mounts on the node where its source is. Giving the copy a fresh UUID instead
/// (`xfs_admin -U generate`) needs a clean log, and a copy of a mounted volume has
/// a dirty one (snapshots are crash-consistent), so that route needs a mount anyway
/// to replay the log. What the UUID check guards against, one filesystem mounted
/// twice through two devices, cannot happen here: a volume has one device per node
/// and a single writer fenced by epochs. ext4 mounts duplicate UUIDs as they are.
pub fn implied_mount_options(fs: FsType) -> &'static [&'static str] {
    match fs {
        FsType::Ext4 => &[],
        FsType::Xfs => &["nouuid"],
    }
}

/// What [`probe`] found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No signature at all: safe to format.
    Empty,
    /// A filesystem of this type (`ext4`, `xfs`, `swap`, ...).
    Filesystem(String),
    /// Something that is not a filesystem but must not be overwritten, e.g. a
    /// partition table (`PTTYPE=gpt`) or a probe result blkid calls ambivalent.
    Other(String),
}

/// Why probing or formatting failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MkfsError {
    /// The tool could not be started (not installed?).
    #[error("cannot run {tool}")]
    Spawn {
        /// The program.
        tool: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The tool did not finish within its time limit and was killed.
    #[error("{tool} on {device} did not finish within {timeout:?}")]
    Timeout {
        /// The program.
        tool: &'static str,
        /// The device.
        device: PathBuf,
        /// The limit.
        timeout: Duration,
    },
    /// The tool failed.
    #[error("{tool} on {device} failed with {status}: {stderr}")]
    Failed {
        /// The program.
        tool: &'static str,
        /// The device.
        device: PathBuf,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
}

async fn run(
    tool: &'static str,
    args: &[&std::ffi::OsStr],
    device: &Path,
) -> Result<std::process::Output, MkfsError> {
    let child = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| MkfsError::Spawn { tool, source })?;
    match tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(source)) => Err(MkfsError::Spawn { tool, source }),
        Err(_) => Err(MkfsError::Timeout {
            tool,
            device: device.to_owned(),
            timeout: TOOL_TIMEOUT,
        }),
    }
}

/// Parses `blkid -o export` output into `(TYPE, PTTYPE)`.
fn parse_export(text: &str) -> (Option<String>, Option<String>) {
    let mut fs = None;
    let mut pt = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("TYPE=") {
            fs = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("PTTYPE=") {
            pt = Some(v.trim().to_owned());
        }
    }
    (fs, pt)
}

/// Looks for any signature on `device` with `blkid -p` (low-level probe, no cache).
pub async fn probe(device: &Path) -> Result<Probe, MkfsError> {
    let out = run(
        "blkid",
        &[
            "-p".as_ref(),
            "-o".as_ref(),
            "export".as_ref(),
            device.as_os_str(),
        ],
        device,
    )
    .await?;
    // blkid exit codes: 0 found something, 2 found nothing, 8 ambivalent result.
    match out.status.code() {
        Some(0) => {
            let (fs, pt) = parse_export(&String::from_utf8_lossy(&out.stdout));
            Ok(match (fs, pt) {
                (Some(fs), _) => Probe::Filesystem(fs),
                (None, Some(pt)) => Probe::Other(format!("partition table {pt}")),
                (None, None) => Probe::Other("an unnamed signature".to_owned()),
            })
        }
        Some(2) => Ok(Probe::Empty),
        Some(8) => Ok(Probe::Other(
            "several conflicting signatures (blkid: ambivalent probing result)".to_owned(),
        )),
        _ => Err(MkfsError::Failed {
            tool: "blkid",
            device: device.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }),
    }
}

/// Creates a filesystem of type `fs` on `device`. Call only after [`probe`] returned
/// [`Probe::Empty`].
///
/// Flags: no discard pass at mkfs time (a new volume already reads back as zeroes, and
/// discarding every block would only send a trim of the whole volume to every
/// replica); ext4 initialises its inode tables lazily for the same reason. `mkfs.xfs`
/// runs without `-f`, so it refuses by itself should a signature have appeared.
pub async fn make_filesystem(device: &Path, fs: FsType) -> Result<(), MkfsError> {
    let (tool, args): (&'static str, Vec<&std::ffi::OsStr>) = match fs {
        FsType::Ext4 => (
            "mkfs.ext4",
            vec![
                "-q".as_ref(),
                "-E".as_ref(),
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1".as_ref(),
                device.as_os_str(),
            ],
        ),
        FsType::Xfs => (
            "mkfs.xfs",
            vec!["-q".as_ref(), "-K".as_ref(), device.as_os_str()],
        ),
    };
    let out = run(tool, &args, device).await?;
    if !out.status.success() {
        return Err(MkfsError::Failed {
            tool,
            device: device.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    tracing::info!(device = %device.display(), fs = %fs, "created filesystem");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_type_names() {
        assert_eq!(FsType::parse("EXT4"), Some(FsType::Ext4));
        assert_eq!(FsType::parse("xfs"), Some(FsType::Xfs));
        assert_eq!(FsType::parse("btrfs"), None);
        assert_eq!(FsType::Xfs.to_string(), "xfs");
        assert_eq!(implied_mount_options(FsType::Xfs), ["nouuid"]);
        assert!(implied_mount_options(FsType::Ext4).is_empty());
    }

    #[test]
    fn export_output() {
        assert_eq!(
            parse_export("DEVNAME=/dev/loop0\nUUID=x\nTYPE=ext4\nUSAGE=filesystem\n"),
            (Some("ext4".to_owned()), None)
        );
        assert_eq!(
            parse_export("DEVNAME=/dev/loop0\nPTUUID=1\nPTTYPE=gpt\n"),
            (None, Some("gpt".to_owned()))
        );
    }

    #[tokio::test]
    async fn empty_and_formatted_files_probe_as_such() {
        // blkid -p works on regular files too; mkfs.ext4 formats a file without -F.
        let dir = tempfile::tempdir().expect("temp dir");
        let img = dir.path().join("img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(64 << 20))
            .expect("sparse file");
        assert_eq!(probe(&img).await.expect("probe"), Probe::Empty);
        make_filesystem(&img, FsType::Ext4)
            .await
            .expect("mkfs.ext4");
        assert_eq!(
            probe(&img).await.expect("probe"),
            Probe::Filesystem("ext4".to_owned())
        );
    }
}
