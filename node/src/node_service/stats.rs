//! NodeGetVolumeStats: usage of a staged or published volume and its condition.

use super::*;

impl NodeService {
    pub(super) async fn stats(
        &self,
        r: NodeGetVolumeStatsRequest,
    ) -> Result<NodeGetVolumeStatsResponse, NodeError> {
        let volume_id = required(&r.volume_id, "volume_id")?.to_owned();
        let path = PathBuf::from(required(&r.volume_path, "volume_path")?);
        let not_found = |where_: String| NodeError::NotFound {
            volume_id: volume_id.clone(),
            where_,
        };
        let Some(volume) = self.attached(&volume_id).await? else {
            return Err(not_found(" on this node".to_owned()));
        };
        if !path.is_absolute() {
            return Err(not_found(format!(" at relative path {}", path.display())));
        }
        let dev = device_number(&volume);
        let vid = volume_id.clone();
        let usage = blocking(move || {
            let mount_err = |source| NodeError::Mount {
                volume_id: vid.clone(),
                source,
            };
            let mut state = mount::path_state(&path).map_err(mount_err)?;
            let mut at = path.clone();
            // A block volume's staging directory holds the bound device file.
            if let PathState::Dir { dev: d } = state {
                if d != dev {
                    let file = path.join(BLOCK_STAGING_FILE);
                    if let Ok(s @ PathState::BlockDevice { .. }) = mount::path_state(&file) {
                        state = s;
                        at = file;
                    }
                }
            }
            match state {
                PathState::Dir { dev: d } if d == dev => {
                    let u = mount::fs_usage(&at).map_err(mount_err)?;
                    let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                    Ok(Some(vec![
                        VolumeUsage {
                            available: i(u.available_bytes),
                            total: i(u.total_bytes),
                            used: i(u.used_bytes),
                            unit: Unit::Bytes as i32,
                        },
                        VolumeUsage {
                            available: i(u.available_inodes),
                            total: i(u.total_inodes),
                            used: i(u.used_inodes),
                            unit: Unit::Inodes as i32,
                        },
                    ]))
                }
                PathState::BlockDevice { rdev } if rdev == dev => {
                    let size = mount::block_device_size(&at).map_err(mount_err)?;
                    Ok(Some(vec![VolumeUsage {
                        available: 0,
                        total: i64::try_from(size).unwrap_or(i64::MAX),
                        used: 0,
                        unit: Unit::Bytes as i32,
                    }]))
                }
                _ => Ok(None),
            }
        })
        .await?;
        let Some(usage) = usage else {
            return Err(not_found(format!(" at {}", r.volume_path)));
        };
        let condition = match self
            .engine_host
            .clone()
            .status(StatusRequest {
                volume_id: volume_id.clone(),
            })
            .await
        {
            Ok(s) => {
                let s = s.into_inner();
                VolumeCondition {
                    abnormal: s.abnormal,
                    message: s.condition_message,
                }
            }
            Err(s) => VolumeCondition {
                abnormal: true,
                message: format!("engine status unavailable: {}", s.message()),
            },
        };
        Ok(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        })
    }
}
