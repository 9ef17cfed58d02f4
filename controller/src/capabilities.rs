//! Which CSI volume capabilities Tessera supports.
//!
//! A Tessera volume is used by exactly one node at a time (one engine is the single
//! writer), so only the SINGLE_NODE_* access modes are supported, as a raw block
//! device or mounted with ext4 or XFS.

use tessera_csi_proto::v1::volume_capability::access_mode::Mode;
use tessera_csi_proto::v1::volume_capability::AccessType;
use tessera_csi_proto::v1::VolumeCapability;

use crate::parameters::FsType;

/// Record value of `access_type` for raw block volumes.
pub const ACCESS_BLOCK: &str = "block";
/// Record value of `access_type` for filesystem volumes.
pub const ACCESS_MOUNT: &str = "mount";

/// Why a capability is not supported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    /// The request has no capabilities where the RPC requires some.
    #[error("volume_capabilities is required")]
    Missing,
    /// access_mode is unset.
    #[error("volume capability has no access_mode")]
    NoAccessMode,
    /// access_type (block or mount) is unset.
    #[error("volume capability has neither block nor mount access type")]
    NoAccessType,
    /// A mode other than the single-node ones.
    #[error("access mode {0} is not supported (Tessera volumes are single-node)")]
    UnsupportedMode(String),
    /// A mount fs_type other than ext4 or xfs.
    #[error("filesystem {0:?} is not supported (ext4 or xfs)")]
    UnsupportedFsType(String),
    /// Two capabilities ask for different filesystems.
    #[error("volume capabilities ask for different filesystems ({0} and {1})")]
    ConflictingFsTypes(FsType, FsType),
}

/// What a list of capabilities asks for, after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestedAccess {
    /// Some capability asks for a raw block device.
    pub block: bool,
    /// Some capability asks for a mounted filesystem.
    pub mount: bool,
    /// The filesystem named by the mount capabilities, if any.
    pub fs_type: Option<FsType>,
}

impl RequestedAccess {
    /// The `access_type` stored in the record: `block` or `mount` when all capabilities
    /// agree, `""` (either) when both were asked for.
    pub fn record_access_type(&self) -> &'static str {
        match (self.block, self.mount) {
            (true, false) => ACCESS_BLOCK,
            (false, true) => ACCESS_MOUNT,
            _ => "",
        }
    }

    /// The filesystem a volume for these capabilities must have room for: `fs` (the
    /// effective fsType) when any capability mounts the volume, `None` for raw block
    /// only. A volume asked for as both may end up mounted, so it counts as mounted.
    pub fn filesystem(&self, fs: FsType) -> Option<FsType> {
        self.mount.then_some(fs)
    }

    /// Whether a volume whose record says `access_type` can serve this request.
    pub fn compatible_with(&self, access_type: &str) -> bool {
        match access_type {
            ACCESS_BLOCK => !self.mount,
            ACCESS_MOUNT => !self.block,
            _ => true,
        }
    }
}

/// Validates one capability; returns its access type and filesystem.
pub fn validate_one(cap: &VolumeCapability) -> Result<RequestedAccess, CapabilityError> {
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or(CapabilityError::NoAccessMode)?;
    match Mode::try_from(mode.mode) {
        Ok(
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter,
        ) => {}
        Ok(other) => {
            return Err(CapabilityError::UnsupportedMode(
                other.as_str_name().to_string(),
            ))
        }
        Err(_) => return Err(CapabilityError::UnsupportedMode(mode.mode.to_string())),
    }
    match cap
        .access_type
        .as_ref()
        .ok_or(CapabilityError::NoAccessType)?
    {
        AccessType::Block(_) => Ok(RequestedAccess {
            block: true,
            mount: false,
            fs_type: None,
        }),
        AccessType::Mount(m) => {
            let fs_type = if m.fs_type.is_empty() {
                None
            } else {
                Some(
                    FsType::parse(&m.fs_type)
                        .ok_or_else(|| CapabilityError::UnsupportedFsType(m.fs_type.clone()))?,
                )
            };
            Ok(RequestedAccess {
                block: false,
                mount: true,
                fs_type,
            })
        }
    }
}

/// Validates a non-empty list of capabilities and merges what they ask for.
pub fn validate_all(caps: &[VolumeCapability]) -> Result<RequestedAccess, CapabilityError> {
    if caps.is_empty() {
        return Err(CapabilityError::Missing);
    }
    let mut acc = RequestedAccess {
        block: false,
        mount: false,
        fs_type: None,
    };
    for cap in caps {
        let one = validate_one(cap)?;
        acc.block |= one.block;
        acc.mount |= one.mount;
        match (acc.fs_type, one.fs_type) {
            (Some(a), Some(b)) if a != b => return Err(CapabilityError::ConflictingFsTypes(a, b)),
            (None, Some(b)) => acc.fs_type = Some(b),
            _ => {}
        }
    }
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_csi_proto::v1::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn cap(mode: Mode, access: Option<AccessType>) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: access,
        }
    }
    fn mount(fs: &str) -> Option<AccessType> {
        Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        }))
    }
    fn block() -> Option<AccessType> {
        Some(AccessType::Block(BlockVolume {}))
    }

    #[test]
    fn single_node_modes_are_supported() {
        for m in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ] {
            assert!(validate_one(&cap(m, block())).is_ok(), "{m:?}");
        }
        for m in [
            Mode::Unknown,
            Mode::MultiNodeReaderOnly,
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeMultiWriter,
        ] {
            assert!(
                matches!(
                    validate_one(&cap(m, block())),
                    Err(CapabilityError::UnsupportedMode(_))
                ),
                "{m:?}"
            );
        }
        let mut bogus = cap(Mode::SingleNodeWriter, block());
        bogus.access_mode = Some(AccessMode { mode: 42 });
        assert!(matches!(
            validate_one(&bogus),
            Err(CapabilityError::UnsupportedMode(_))
        ));
    }

    #[test]
    fn fs_types() {
        assert_eq!(
            validate_one(&cap(Mode::SingleNodeWriter, mount("")))
                .unwrap()
                .fs_type,
            None
        );
        assert_eq!(
            validate_one(&cap(Mode::SingleNodeWriter, mount("xfs")))
                .unwrap()
                .fs_type,
            Some(FsType::Xfs)
        );
        assert!(matches!(
            validate_one(&cap(Mode::SingleNodeWriter, mount("nfs"))),
            Err(CapabilityError::UnsupportedFsType(_))
        ));
        let err = validate_all(&[
            cap(Mode::SingleNodeWriter, mount("xfs")),
            cap(Mode::SingleNodeWriter, mount("ext4")),
        ])
        .unwrap_err();
        assert!(matches!(err, CapabilityError::ConflictingFsTypes(..)));
    }

    #[test]
    fn missing_parts() {
        assert_eq!(validate_all(&[]), Err(CapabilityError::Missing));
        assert_eq!(
            validate_one(&cap(Mode::SingleNodeWriter, None)),
            Err(CapabilityError::NoAccessType)
        );
        let no_mode = VolumeCapability {
            access_mode: None,
            access_type: block(),
        };
        assert_eq!(validate_one(&no_mode), Err(CapabilityError::NoAccessMode));
    }

    #[test]
    fn access_type_compatibility() {
        let b = validate_all(&[cap(Mode::SingleNodeWriter, block())]).unwrap();
        let m = validate_all(&[cap(Mode::SingleNodeWriter, mount(""))]).unwrap();
        let both = validate_all(&[
            cap(Mode::SingleNodeWriter, block()),
            cap(Mode::SingleNodeWriter, mount("")),
        ])
        .unwrap();
        assert_eq!(b.record_access_type(), ACCESS_BLOCK);
        assert_eq!(m.record_access_type(), ACCESS_MOUNT);
        assert_eq!(both.record_access_type(), "");
        // Only a volume that may be mounted needs room for a filesystem.
        assert_eq!(b.filesystem(FsType::Xfs), None);
        assert_eq!(m.filesystem(FsType::Xfs), Some(FsType::Xfs));
        assert_eq!(both.filesystem(FsType::Ext4), Some(FsType::Ext4));
        assert!(
            b.compatible_with(ACCESS_BLOCK)
                && !b.compatible_with(ACCESS_MOUNT)
                && b.compatible_with("")
        );
        assert!(!m.compatible_with(ACCESS_BLOCK) && m.compatible_with(ACCESS_MOUNT));
        assert!(!both.compatible_with(ACCESS_BLOCK) && both.compatible_with(""));
    }
}
