//! NodeExpandVolume: the engine-host grows the device, then the mounted
//! filesystem is grown online.

use super::*;

impl NodeService {
    /// NodeExpandVolume: after ControllerExpandVolume grew the replicas, asks the
    /// engine-host to grow the engine, FUSE file and loop device, then grows a mounted
    /// filesystem online. `volume_path` may be the staging or a publish path (the CO
    /// sends either); it must be where this volume is, judged by device numbers. A
    /// block volume only grows its device. Repeating it is harmless: every step is a
    /// no-op at the size already reached.
    pub(super) async fn expand(
        &self,
        r: NodeExpandVolumeRequest,
    ) -> Result<NodeExpandVolumeResponse, NodeError> {
        let volume_id = required(&r.volume_id, "volume_id")?.to_owned();
        let path = PathBuf::from(required(&r.volume_path, "volume_path")?);
        let wanted = match r.capacity_range.as_ref().map(|c| c.required_bytes) {
            Some(n) if n < 0 => {
                return Err(NodeError::Invalid {
                    field: "capacity_range.required_bytes",
                    reason: format!("must not be negative (got {n})"),
                })
            }
            Some(n) => u64::try_from(n).unwrap_or(0),
            None => 0,
        };
        let not_found = |where_: String| NodeError::NotFound {
            volume_id: volume_id.clone(),
            where_,
        };
        if !path.is_absolute() {
            return Err(not_found(format!(" at relative path {}", path.display())));
        }
        let _guard = self.begin(&volume_id)?;
        let Some(volume) = self.attached(&volume_id).await? else {
            return Err(not_found(" on this node".to_owned()));
        };
        let dev = device_number(&volume);
        let vid = volume_id.clone();
        let probe_path = path.clone();
        // Some(true): a mounted filesystem of this volume; Some(false): its device node.
        let kind = blocking(move || {
            let mount_err = |source| NodeError::Mount {
                volume_id: vid.clone(),
                source,
            };
            let state = mount::path_state(&probe_path).map_err(mount_err)?;
            Ok(match state {
                PathState::Dir { dev: d } if d == dev => Some(true),
                PathState::BlockDevice { rdev } if rdev == dev => Some(false),
                PathState::Dir { .. } => {
                    match mount::path_state(&probe_path.join(BLOCK_STAGING_FILE)) {
                        Ok(PathState::BlockDevice { rdev }) if rdev == dev => Some(false),
                        _ => None,
                    }
                }
                _ => None,
            })
        })
        .await?;
        let Some(mounted) = kind else {
            return Err(not_found(format!(" at {}", path.display())));
        };
        let resized = self
            .engine_host
            .clone()
            .resize(ResizeRequest {
                volume_id: volume_id.clone(),
                new_size: wanted,
            })
            .await
            .map_err(NodeError::EngineHost)?
            .into_inner()
            .volume
            .ok_or_else(|| NodeError::Task("engine-host returned no volume".to_owned()))?;
        if mounted {
            let at = path.clone();
            let fs_name = blocking(move || {
                mounted_fs_type(&at).map_err(|source| NodeError::Mount {
                    volume_id: String::new(),
                    source,
                })
            })
            .await?;
            let fs = fs_name.as_deref().and_then(FsType::parse).ok_or_else(|| {
                NodeError::Unsupported(format!(
                    "volume {volume_id} at {} holds filesystem {fs_name:?}; only ext4 and xfs can be grown",
                    path.display()
                ))
            })?;
            let device = PathBuf::from(&resized.device_path);
            grow_filesystem(fs, &device, &path)
                .await
                .map_err(|source| NodeError::Mkfs {
                    volume_id: volume_id.clone(),
                    source,
                })?;
            tracing::info!(volume = %volume_id, size = resized.size_bytes, %fs, "filesystem grown online");
        }
        Ok(NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(resized.size_bytes).unwrap_or(i64::MAX),
        })
    }
}

/// How long `resize2fs` / `xfs_growfs` may run. Online growth only initialises the
/// new block groups' metadata, a few seconds even for large growths over a quorum.
pub(super) const GROW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Grows the filesystem mounted at `mountpoint` from `device` to fill the device,
/// online: `resize2fs <device>` for ext4 (it grows a mounted filesystem through the
/// kernel), `xfs_growfs <mountpoint>` for XFS (which only grows mounted ones).
pub(super) async fn grow_filesystem(
    fs: FsType,
    device: &Path,
    mountpoint: &Path,
) -> Result<(), MkfsError> {
    let (tool, arg): (&'static str, &Path) = match fs {
        FsType::Ext4 => ("resize2fs", device),
        FsType::Xfs => ("xfs_growfs", mountpoint),
    };
    let child = tokio::process::Command::new(tool)
        .arg(arg)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| MkfsError::Spawn { tool, source })?;
    let out = match tokio::time::timeout(GROW_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(source)) => return Err(MkfsError::Spawn { tool, source }),
        Err(_) => {
            return Err(MkfsError::Timeout {
                tool,
                device: device.to_owned(),
                timeout: GROW_TIMEOUT,
            })
        }
    };
    if out.status.success() {
        Ok(())
    } else {
        Err(MkfsError::Failed {
            tool,
            device: device.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// The filesystem type mounted at `path` (topmost mount), per the mount table.
pub(super) fn mounted_fs_type(path: &Path) -> Result<Option<String>, MountError> {
    let want = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let mounts = crate::frontend::cleanup::read_mountinfo().map_err(|source| MountError::Io {
        what: "read the mount table for",
        path: path.to_owned(),
        source,
    })?;
    Ok(mounts
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == want)
        .map(|m| m.fs_type))
}
