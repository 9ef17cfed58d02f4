//! NodeStageVolume and NodeUnstageVolume: attach through the engine-host, format
//! if empty and mount (or bind the device node) at the staging path; undo it all.

use super::expand::mounted_fs_type;
use super::*;

impl NodeService {
    pub(super) async fn stage(&self, r: NodeStageVolumeRequest) -> Result<(), NodeError> {
        let volume_id = required(&r.volume_id, "volume_id")?.to_owned();
        let staging = PathBuf::from(required(&r.staging_target_path, "staging_target_path")?);
        let cap = parse_capability(r.volume_capability.as_ref(), &r.volume_context)?;
        for key in [KEY_EPOCH, KEY_REPLICAS] {
            if !r.publish_context.contains_key(key) {
                return Err(NodeError::Invalid {
                    field: "publish_context",
                    reason: format!("key {key:?} is required (set by ControllerPublishVolume)"),
                });
            }
        }
        let _guard = self.begin(&volume_id)?;
        // A failed stage undoes only an attachment it made itself: an attached volume
        // may already be staged and in use (as a raw block device nobody holds
        // exclusively, for instance).
        let was_attached = self.attached(&volume_id).await?.is_some();
        let volume = self
            .engine_host
            .clone()
            .attach(AttachRequest {
                volume_id: volume_id.clone(),
                publish_context: r.publish_context.clone(),
                local_node_id: self.config.node_id.clone(),
            })
            .await
            .map_err(NodeError::EngineHost)?
            .into_inner()
            .volume
            .ok_or_else(|| NodeError::Task("engine-host returned no volume".to_owned()))?;
        let result = match &cap.access {
            Access::Mount { fs, flags } => {
                self.stage_mount(&volume_id, &volume, &staging, *fs, flags)
                    .await
            }
            Access::Block => self.stage_block(&volume_id, &volume, &staging).await,
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                // Do not leave an engine running for a stage the CO will not undo
                // (Detach also refuses while a filesystem is mounted from the device).
                if !was_attached {
                    self.detach_quietly(&volume_id).await;
                }
                Err(e)
            }
        }
    }

    pub(super) async fn stage_mount(
        &self,
        volume_id: &str,
        volume: &AttachedVolume,
        staging: &Path,
        fs: FsType,
        flags: &[String],
    ) -> Result<(), NodeError> {
        let mut options = MountOptions::parse(flags).map_err(|source| NodeError::Mount {
            volume_id: volume_id.to_owned(),
            source,
        })?;
        // `nouuid` for xfs, so restores and clones mount next to their source.
        for option in mkfs::implied_mount_options(fs) {
            options.add_data_option(option);
        }
        let device = PathBuf::from(&volume.device_path);
        let dev = device_number(volume);
        let mount_err = |source| NodeError::Mount {
            volume_id: volume_id.to_owned(),
            source,
        };
        let block_file = staging.join(BLOCK_STAGING_FILE);
        if mount::path_state(&block_file).map_err(mount_err)?
            == (PathState::BlockDevice { rdev: dev })
        {
            return Err(NodeError::Incompatible {
                volume_id: volume_id.to_owned(),
                path: staging.to_owned(),
                reason: "staged as a block device, requested a filesystem".to_owned(),
            });
        }
        // Already staged here from this device?
        let state = mount::path_state(staging).map_err(mount_err)?;
        match state {
            PathState::Dir { dev: d } if d == dev => {
                let found = mounted_fs_type(staging).map_err(mount_err)?;
                return if found.as_deref() == Some(fs.as_str()) {
                    Ok(())
                } else {
                    Err(NodeError::Incompatible {
                        volume_id: volume_id.to_owned(),
                        path: staging.to_owned(),
                        reason: format!(
                            "staged with filesystem {}, requested {fs}",
                            found.unwrap_or_else(|| "unknown".to_owned())
                        ),
                    })
                };
            }
            PathState::Missing => {
                std::fs::create_dir_all(staging).map_err(|source| {
                    mount_err(MountError::Io {
                        what: "create",
                        path: staging.to_owned(),
                        source,
                    })
                })?;
            }
            PathState::Dir { .. } => {
                if mount::is_mountpoint(staging).map_err(mount_err)? {
                    return Err(NodeError::PathConflict {
                        volume_id: volume_id.to_owned(),
                        path: staging.to_owned(),
                        reason: "another filesystem is mounted there".to_owned(),
                    });
                }
            }
            PathState::BlockDevice { .. } | PathState::Other => {
                return Err(NodeError::PathConflict {
                    volume_id: volume_id.to_owned(),
                    path: staging.to_owned(),
                    reason: "not a directory".to_owned(),
                })
            }
        }
        let mkfs_err = |source| NodeError::Mkfs {
            volume_id: volume_id.to_owned(),
            source,
        };
        match mkfs::probe(&device).await.map_err(mkfs_err)? {
            Probe::Empty => mkfs::make_filesystem(&device, fs).await.map_err(mkfs_err)?,
            Probe::Filesystem(found) if found == fs.as_str() => {}
            Probe::Filesystem(found) => {
                return Err(NodeError::WrongContent {
                    volume_id: volume_id.to_owned(),
                    device,
                    found: format!("a {found} filesystem"),
                    wanted: fs,
                })
            }
            Probe::Other(found) => {
                return Err(NodeError::WrongContent {
                    volume_id: volume_id.to_owned(),
                    device,
                    found,
                    wanted: fs,
                })
            }
        }
        let (vid, staging) = (volume_id.to_owned(), staging.to_owned());
        blocking(move || {
            mount::mount_filesystem(&device, &staging, fs.as_str(), &options).map_err(|source| {
                NodeError::Mount {
                    volume_id: vid.clone(),
                    source,
                }
            })?;
            tracing::info!(volume = %vid, device = %device.display(), staging = %staging.display(), fs = %fs, "staged volume");
            Ok(())
        })
        .await
    }

    pub(super) async fn stage_block(
        &self,
        volume_id: &str,
        volume: &AttachedVolume,
        staging: &Path,
    ) -> Result<(), NodeError> {
        let device = PathBuf::from(&volume.device_path);
        let dev = device_number(volume);
        let (vid, staging) = (volume_id.to_owned(), staging.to_owned());
        blocking(move || {
            let mount_err = |source| NodeError::Mount {
                volume_id: vid.clone(),
                source,
            };
            if mount::path_state(&staging).map_err(mount_err)? == (PathState::Dir { dev }) {
                return Err(NodeError::Incompatible {
                    volume_id: vid.clone(),
                    path: staging,
                    reason: "staged as a filesystem, requested a block device".to_owned(),
                });
            }
            let file = staging.join(BLOCK_STAGING_FILE);
            match mount::path_state(&file).map_err(mount_err)? {
                PathState::BlockDevice { rdev } if rdev == dev => return Ok(()),
                PathState::Missing => {
                    std::fs::create_dir_all(&staging)
                        .and_then(|()| std::fs::File::create(&file).map(drop))
                        .map_err(|source| {
                            mount_err(MountError::Io {
                                what: "create",
                                path: file.clone(),
                                source,
                            })
                        })?;
                }
                PathState::Other => {}
                PathState::BlockDevice { .. } | PathState::Dir { .. } => {
                    return Err(NodeError::PathConflict {
                        volume_id: vid.clone(),
                        path: file,
                        reason: "holds another device or a directory".to_owned(),
                    })
                }
            }
            if mount::is_mountpoint(&file).map_err(mount_err)? {
                return Err(NodeError::PathConflict {
                    volume_id: vid.clone(),
                    path: file,
                    reason: "something else is mounted there".to_owned(),
                });
            }
            mount::bind_mount(&device, &file, false).map_err(mount_err)?;
            tracing::info!(volume = %vid, device = %device.display(), staging = %file.display(), "staged block volume");
            Ok(())
        })
        .await
    }

    pub(super) async fn unstage(&self, r: NodeUnstageVolumeRequest) -> Result<(), NodeError> {
        let volume_id = required(&r.volume_id, "volume_id")?.to_owned();
        let staging = PathBuf::from(required(&r.staging_target_path, "staging_target_path")?);
        let _guard = self.begin(&volume_id)?;
        let vid = volume_id.clone();
        blocking(move || {
            let mount_err = |source| NodeError::Mount {
                volume_id: vid.clone(),
                source,
            };
            let file = staging.join(BLOCK_STAGING_FILE);
            mount::unmount_all(&file).map_err(mount_err)?;
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // A directory of that name inside a mount volume, for instance.
                Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {}
                Err(e) if mount::is_mountpoint(&staging).unwrap_or(false) => {
                    tracing::debug!(error = %e, "not a block staging file");
                }
                Err(source) => {
                    return Err(mount_err(MountError::Io {
                        what: "remove",
                        path: file,
                        source,
                    }))
                }
            }
            mount::unmount_all(&staging).map_err(mount_err)?;
            Ok(())
        })
        .await?;
        let detached = self
            .engine_host
            .clone()
            .detach(DetachRequest {
                volume_id: volume_id.clone(),
            })
            .await
            .map_err(NodeError::EngineHost)?
            .into_inner();
        tracing::info!(volume = %volume_id, staging = %r.staging_target_path, was_attached = detached.was_attached, "unstaged volume");
        Ok(())
    }
}
