//! What a request's volume capability asks of the volume (filesystem or block,
//! access mode), checked against the volume's stored fsType.

use super::*;

/// What a capability asks of the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Access {
    Mount { fs: FsType, flags: Vec<String> },
    Block,
}

/// A validated capability: how the volume is accessed and in which mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Capability {
    pub(super) access: Access,
    pub(super) mode: Mode,
}

impl Capability {
    /// Whether the access mode only allows reading.
    pub(super) fn read_only_mode(&self) -> bool {
        matches!(self.mode, Mode::SingleNodeReaderOnly)
    }
}

/// Validates a capability and resolves the filesystem: the capability's `fs_type`,
/// else the volume's `fsType` parameter, else ext4.
pub(super) fn parse_capability(
    cap: Option<&VolumeCapability>,
    volume_context: &HashMap<String, String>,
) -> Result<Capability, NodeError> {
    let cap = cap.ok_or(NodeError::Missing("volume_capability"))?;
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or(NodeError::Missing("volume_capability.access_mode"))?;
    let mode = Mode::try_from(mode.mode).map_err(|_| NodeError::Invalid {
        field: "volume_capability.access_mode",
        reason: format!("unknown mode {}", mode.mode),
    })?;
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => {}
        other => {
            return Err(NodeError::Unsupported(format!(
                "access mode {} (Tessera volumes attach to one node at a time)",
                other.as_str_name()
            )))
        }
    }
    let access = match cap
        .access_type
        .as_ref()
        .ok_or(NodeError::Missing("volume_capability.access_type"))?
    {
        AccessType::Block(_) => Access::Block,
        AccessType::Mount(m) => {
            let from_cap = (!m.fs_type.is_empty()).then_some(m.fs_type.as_str());
            let from_ctx = volume_context
                .get(KEY_FS_TYPE)
                .map(String::as_str)
                .filter(|s| !s.is_empty());
            let name = match (from_cap, from_ctx) {
                (Some(a), Some(b)) if !a.eq_ignore_ascii_case(b) => {
                    return Err(NodeError::Invalid {
                        field: "volume_capability.mount.fs_type",
                        reason: format!("{a:?} conflicts with the volume's fsType {b:?}"),
                    })
                }
                (Some(a), _) => a,
                (None, Some(b)) => b,
                (None, None) => FsType::default().as_str(),
            };
            let fs = FsType::parse(name).ok_or_else(|| {
                NodeError::Unsupported(format!("filesystem {name:?} (ext4 or xfs)"))
            })?;
            Access::Mount {
                fs,
                flags: m.mount_flags.clone(),
            }
        }
    };
    Ok(Capability { access, mode })
}

pub(super) fn required<'a>(value: &'a str, field: &'static str) -> Result<&'a str, NodeError> {
    if value.is_empty() {
        Err(NodeError::Missing(field))
    } else {
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_service::tests::mount_cap;
    use tessera_csi_proto::v1::volume_capability::{AccessMode, BlockVolume};

    #[test]
    fn capability_resolution() {
        let none = HashMap::new();
        let xfs_ctx = HashMap::from([(KEY_FS_TYPE.to_owned(), "xfs".to_owned())]);
        let c =
            parse_capability(Some(&mount_cap(Mode::SingleNodeWriter, "")), &none).expect("default");
        assert_eq!(
            c.access,
            Access::Mount {
                fs: FsType::Ext4,
                flags: vec!["noatime".to_owned()]
            }
        );
        let c = parse_capability(Some(&mount_cap(Mode::SingleNodeWriter, "")), &xfs_ctx)
            .expect("from context");
        assert!(matches!(
            c.access,
            Access::Mount {
                fs: FsType::Xfs,
                ..
            }
        ));
        let e = parse_capability(Some(&mount_cap(Mode::SingleNodeWriter, "ext4")), &xfs_ctx)
            .expect_err("conflict");
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = parse_capability(Some(&mount_cap(Mode::SingleNodeWriter, "btrfs")), &none)
            .expect_err("unsupported fs");
        assert_eq!(e.code(), Code::FailedPrecondition);
        let e = parse_capability(Some(&mount_cap(Mode::MultiNodeMultiWriter, "")), &none)
            .expect_err("multi-node");
        assert_eq!(e.code(), Code::FailedPrecondition);
        let block = VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeReaderOnly as i32,
            }),
            access_type: Some(AccessType::Block(BlockVolume {})),
        };
        let c = parse_capability(Some(&block), &none).expect("block");
        assert_eq!(c.access, Access::Block);
        assert!(c.read_only_mode());
        let e = parse_capability(None, &none).expect_err("missing");
        assert_eq!(e.code(), Code::InvalidArgument);
    }
}
