//! NodePublishVolume and NodeUnpublishVolume: bind mounts from the staging path
//! onto pod targets.

use super::*;

impl NodeService {
    pub(super) async fn publish(&self, r: NodePublishVolumeRequest) -> Result<(), NodeError> {
        let volume_id = required(&r.volume_id, "volume_id")?.to_owned();
        let target = PathBuf::from(required(&r.target_path, "target_path")?);
        let cap = parse_capability(r.volume_capability.as_ref(), &r.volume_context)?;
        if r.staging_target_path.is_empty() {
            return Err(NodeError::NotStaged {
                volume_id,
                path: PathBuf::new(),
                reason: "staging_target_path is not set (this plugin stages volumes)".to_owned(),
            });
        }
        let staging = PathBuf::from(&r.staging_target_path);
        let read_only = r.readonly || cap.read_only_mode();
        let _guard = self.begin(&volume_id)?;
        let Some(volume) = self.attached(&volume_id).await? else {
            return Err(NodeError::NotStaged {
                volume_id,
                path: staging,
                reason: "the volume is not attached on this node".to_owned(),
            });
        };
        let dev = device_number(&volume);
        let vid = volume_id.clone();
        let single_writer = cap.mode == Mode::SingleNodeSingleWriter;
        let block = cap.access == Access::Block;
        blocking(move || {
            let mount_err = |source| NodeError::Mount {
                volume_id: vid.clone(),
                source,
            };
            let source = if block {
                staging.join(BLOCK_STAGING_FILE)
            } else {
                staging.clone()
            };
            let staged = match mount::path_state(&source).map_err(mount_err)? {
                PathState::BlockDevice { rdev } => block && rdev == dev,
                PathState::Dir { dev: d } => !block && d == dev,
                _ => false,
            };
            if !staged {
                return Err(NodeError::NotStaged {
                    volume_id: vid.clone(),
                    path: staging,
                    reason: format!(
                        "no {} of the volume's device there",
                        if block { "block staging file" } else { "filesystem mount" }
                    ),
                });
            }
            let mine = match mount::path_state(&target).map_err(mount_err)? {
                PathState::BlockDevice { rdev } => block && rdev == dev,
                PathState::Dir { dev: d } => !block && d == dev,
                _ => false,
            };
            if mine && mount::is_mountpoint(&target).map_err(mount_err)? {
                let ro = mount::is_read_only(&target).map_err(mount_err)?;
                return if ro == read_only {
                    Ok(())
                } else {
                    Err(NodeError::Incompatible {
                        volume_id: vid.clone(),
                        path: target,
                        reason: format!("published with readonly={ro}, requested {read_only}"),
                    })
                };
            }
            if mount::is_mountpoint(&target).map_err(mount_err)? {
                return Err(NodeError::PathConflict {
                    volume_id: vid.clone(),
                    path: target,
                    reason: "another filesystem is mounted there".to_owned(),
                });
            }
            if single_writer && !block && published_elsewhere(dev, &staging, &target)? {
                return Err(NodeError::Unsupported(format!(
                    "volume {vid} has access mode SINGLE_NODE_SINGLE_WRITER and is already published at another target path"
                )));
            }
            let create = if block {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&target)
                    .map(drop)
            } else {
                match std::fs::create_dir(&target) {
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                    other => other,
                }
            };
            create.map_err(|source| {
                mount_err(MountError::Io {
                    what: "create",
                    path: target.clone(),
                    source,
                })
            })?;
            mount::bind_mount(&source, &target, read_only).map_err(mount_err)?;
            tracing::info!(volume = %vid, target = %target.display(), read_only, "published volume");
            Ok(())
        })
        .await
    }

    pub(super) async fn unpublish(&self, r: NodeUnpublishVolumeRequest) -> Result<(), NodeError> {
        let volume_id = required(&r.volume_id, "volume_id")?.to_owned();
        let target = PathBuf::from(required(&r.target_path, "target_path")?);
        let _guard = self.begin(&volume_id)?;
        blocking(move || {
            let mount_err = |source| NodeError::Mount {
                volume_id: volume_id.clone(),
                source,
            };
            let removed = mount::unmount_all(&target).map_err(mount_err)?;
            remove_path(&target).map_err(mount_err)?;
            tracing::info!(volume = %volume_id, target = %target.display(), mounts_removed = removed, "unpublished volume");
            Ok(())
        })
        .await
    }
}

/// Whether the filesystem of device `dev` is mounted anywhere but `staging` and
/// `target`.
pub(super) fn published_elsewhere(
    dev: (u32, u32),
    staging: &Path,
    target: &Path,
) -> Result<bool, NodeError> {
    let staging = staging
        .canonicalize()
        .unwrap_or_else(|_| staging.to_owned());
    let target = target.canonicalize().unwrap_or_else(|_| target.to_owned());
    let mounts = crate::frontend::cleanup::read_mountinfo().map_err(|source| NodeError::Mount {
        volume_id: String::new(),
        source: MountError::Io {
            what: "read the mount table for",
            path: target.clone(),
            source,
        },
    })?;
    Ok(mounts
        .iter()
        .any(|m| m.dev == dev && m.mountpoint != staging && m.mountpoint != target))
}

/// Removes the file or (empty) directory the plugin created at a target path. A
/// non-empty directory is an error: it is not ours to delete.
pub(super) fn remove_path(path: &Path) -> Result<(), MountError> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(MountError::Io {
            what: "remove",
            path: path.to_owned(),
            source,
        }),
    }
}
