//! CSI Node service.
//!
//! The node plugin holds **no data-path state**. Attaching a volume (engine, FUSE file,
//! loop device) is done by the node's engine-host process ([`crate::engine_host`]),
//! reached over its unix socket; this service only formats and mounts the loop device
//! the engine-host returns, bind-mounts it for pods, and asks the engine-host to
//! detach at unstage. Everything it needs to know later is read back from the kernel
//! (mount table, device numbers) or from the engine-host's `List`, so a node plugin
//! killed at any moment is replaced by a new instance that carries on, and I/O on
//! mounted volumes never notices.
//!
//! Staging layout:
//! * mount access: the volume's filesystem is mounted at `staging_target_path` (xfs
//!   always with `nouuid`, so restores and clones, which carry their source's UUID,
//!   mount next to it: [`FsType::implied_mount_options`]);
//! * block access: the device node is bind-mounted onto the file
//!   `<staging_target_path>/`[`BLOCK_STAGING_FILE`], so staging is visible in the mount
//!   table like a mount volume, and publishing binds that file onto the target.
//!
//! `readonly` publishes are read-only bind mounts. For a filesystem that is enforced
//! by the kernel; for a block device node it is not (Linux lets a device node on a
//! read-only mount be opened for writing), so there the container runtime's device
//! permissions, which the kubelet sets from `readOnly`, do the enforcing.
//!
//! A path belongs to the volume when its device number matches the loop device's
//! (`st_dev` of a mounted directory, `st_rdev` of a device node); paths are never
//! compared as strings.
//!
//! Error codes follow the CSI spec: missing fields are INVALID_ARGUMENT; a capability
//! the volume cannot serve (another filesystem on the device, a multi-node access
//! mode, an unsupported fs type) is FAILED_PRECONDITION, as is publishing an unstaged
//! volume; an existing publish with other `readonly`/capability is ALREADY_EXISTS;
//! stats for an unknown volume or a path the volume is not at are NOT_FOUND; a
//! concurrent operation on the same volume is ABORTED; an unreachable engine-host is
//! UNAVAILABLE.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tessera_csi_proto::v1::node_server::Node;
use tessera_csi_proto::v1::node_service_capability::{rpc, Rpc, Type as CapType};
use tessera_csi_proto::v1::volume_capability::access_mode::Mode;
use tessera_csi_proto::v1::volume_capability::AccessType;
use tessera_csi_proto::v1::volume_usage::Unit;
use tessera_csi_proto::v1::{
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeServiceCapability, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, Topology, VolumeCapability,
    VolumeCondition, VolumeUsage,
};
use tessera_csi_proto::TOPOLOGY_NODE_KEY;
use tessera_telemetry::error_chain;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::engine::config::{CTX_EPOCH, CTX_REPLICAS};
use crate::engine_host::proto::engine_host_client::EngineHostClient;
use crate::engine_host::proto::{
    AttachRequest, AttachedVolume, DetachRequest, ListRequest, ResizeRequest, StatusRequest,
};
use crate::mkfs::{self, FsType, MkfsError, Probe};
use crate::mount::{self, MountError, MountOptions, PathState};

/// Default for [`NodeConfig::max_volumes_per_node`].
pub const DEFAULT_MAX_VOLUMES_PER_NODE: i64 = 64;

/// Name of the file inside a block volume's staging directory that the device node
/// is bind-mounted onto.
pub const BLOCK_STAGING_FILE: &str = "block";

/// The `volume_context` key holding the StorageClass `fsType` parameter.
pub const CTX_FS_TYPE: &str = "fsType";

/// What the node plugin knows about the node it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Node id reported to the CO; replica placement and topology use the same id.
    pub node_id: String,
    /// Most volumes the CO may publish to this node at once.
    pub max_volumes_per_node: i64,
    /// Unix socket of this node's engine-host.
    pub engine_host_socket: PathBuf,
}

/// Why a Node RPC failed; [`NodeError::code`] picks the CSI status code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A required field is empty.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A field holds a value that cannot be used.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The capability asks for something this volume cannot do.
    #[error("unsupported capability: {0}")]
    Unsupported(String),
    /// The volume is not staged where the request says.
    #[error("volume {volume_id} is not staged at {path}: {reason}")]
    NotStaged {
        /// The volume.
        volume_id: String,
        /// The staging path.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// Something else occupies a path the request wants to use.
    #[error("{path} is in use by something other than volume {volume_id}: {reason}")]
    PathConflict {
        /// The volume.
        volume_id: String,
        /// The path.
        path: PathBuf,
        /// What is there.
        reason: String,
    },
    /// The volume is already staged or published at the path with other options.
    #[error("volume {volume_id} is already at {path} with different options: {reason}")]
    Incompatible {
        /// The volume.
        volume_id: String,
        /// The path.
        path: PathBuf,
        /// How it differs.
        reason: String,
    },
    /// The device holds data of another kind than requested; it is never reformatted.
    #[error(
        "volume {volume_id}: device {device} holds {found}, not {wanted}; refusing to format it"
    )]
    WrongContent {
        /// The volume.
        volume_id: String,
        /// The device.
        device: PathBuf,
        /// What blkid found.
        found: String,
        /// The filesystem asked for.
        wanted: FsType,
    },
    /// The volume is unknown here, or not at the given path.
    #[error("volume {volume_id} not found{where_}")]
    NotFound {
        /// The volume.
        volume_id: String,
        /// ` at <path>` or empty.
        where_: String,
    },
    /// Another operation on the same volume is in progress.
    #[error("an operation on volume {0} is already in progress")]
    Busy(String),
    /// The engine-host answered with an error (its code is kept).
    #[error("engine-host: {0}")]
    EngineHost(Status),
    /// A mount operation failed.
    #[error("volume {volume_id}")]
    Mount {
        /// The volume.
        volume_id: String,
        /// The cause.
        #[source]
        source: MountError,
    },
    /// Probing or formatting the device failed.
    #[error("volume {volume_id}")]
    Mkfs {
        /// The volume.
        volume_id: String,
        /// The cause.
        #[source]
        source: MkfsError,
    },
    /// A blocking task panicked or was cancelled.
    #[error("internal task failed: {0}")]
    Task(String),
}

impl NodeError {
    /// The gRPC code for this error.
    pub fn code(&self) -> Code {
        match self {
            NodeError::Missing(_) | NodeError::Invalid { .. } => Code::InvalidArgument,
            NodeError::Unsupported(_)
            | NodeError::NotStaged { .. }
            | NodeError::PathConflict { .. }
            | NodeError::WrongContent { .. } => Code::FailedPrecondition,
            NodeError::Incompatible { .. } => Code::AlreadyExists,
            NodeError::NotFound { .. } => Code::NotFound,
            NodeError::Busy(_) => Code::Aborted,
            NodeError::EngineHost(s) => s.code(),
            NodeError::Mount {
                source: MountError::InvalidFlag { .. },
                ..
            } => Code::InvalidArgument,
            NodeError::Mount { .. } | NodeError::Mkfs { .. } | NodeError::Task(_) => Code::Internal,
        }
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        let message = match &e {
            NodeError::EngineHost(s) => format!("engine-host: {}", s.message()),
            other => error_chain(other),
        };
        Status::new(e.code(), message)
    }
}

/// What a capability asks of the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Access {
    Mount { fs: FsType, flags: Vec<String> },
    Block,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Capability {
    access: Access,
    mode: Mode,
}

impl Capability {
    /// Whether the access mode only allows reading.
    fn read_only_mode(&self) -> bool {
        matches!(self.mode, Mode::SingleNodeReaderOnly)
    }
}

/// Validates a capability and resolves the filesystem: the capability's `fs_type`,
/// else the volume's `fsType` parameter, else ext4.
fn parse_capability(
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
                .get(CTX_FS_TYPE)
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
                (None, None) => "ext4",
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

fn required<'a>(value: &'a str, field: &'static str) -> Result<&'a str, NodeError> {
    if value.is_empty() {
        Err(NodeError::Missing(field))
    } else {
        Ok(value)
    }
}

/// Marks a volume busy for the life of the guard.
struct OpGuard {
    busy: Arc<Mutex<HashSet<String>>>,
    volume_id: String,
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.volume_id);
    }
}

/// Runs blocking mount work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NodeError::Task(e.to_string()))?
}

fn device_number(v: &AttachedVolume) -> (u32, u32) {
    (v.device_major, v.device_minor)
}

/// Node service for one node.
#[derive(Debug, Clone)]
pub struct NodeService {
    config: NodeConfig,
    engine_host: EngineHostClient<Channel>,
    busy: Arc<Mutex<HashSet<String>>>,
}

impl NodeService {
    /// Creates the service for the node described by `config`. The engine-host is
    /// connected lazily, so it may start after the plugin. Must be called within a
    /// tokio runtime.
    pub fn new(config: NodeConfig) -> Self {
        let engine_host = crate::engine_host::connect_lazy(&config.engine_host_socket);
        Self {
            config,
            engine_host,
            busy: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    fn begin(&self, volume_id: &str) -> Result<OpGuard, NodeError> {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        if !busy.insert(volume_id.to_owned()) {
            return Err(NodeError::Busy(volume_id.to_owned()));
        }
        Ok(OpGuard {
            busy: Arc::clone(&self.busy),
            volume_id: volume_id.to_owned(),
        })
    }

    /// The volume as the engine-host has it attached, if it is.
    async fn attached(&self, volume_id: &str) -> Result<Option<AttachedVolume>, NodeError> {
        let list = self
            .engine_host
            .clone()
            .list(ListRequest {})
            .await
            .map_err(NodeError::EngineHost)?
            .into_inner();
        Ok(list.volumes.into_iter().find(|v| v.volume_id == volume_id))
    }

    async fn detach_quietly(&self, volume_id: &str) {
        let r = self
            .engine_host
            .clone()
            .detach(DetachRequest {
                volume_id: volume_id.to_owned(),
            })
            .await;
        if let Err(s) = r {
            tracing::warn!(volume = %volume_id, error = %s.message(), "detaching after a failed stage");
        }
    }

    async fn stage(&self, r: NodeStageVolumeRequest) -> Result<(), NodeError> {
        let volume_id = required(&r.volume_id, "volume_id")?.to_owned();
        let staging = PathBuf::from(required(&r.staging_target_path, "staging_target_path")?);
        let cap = parse_capability(r.volume_capability.as_ref(), &r.volume_context)?;
        for key in [CTX_EPOCH, CTX_REPLICAS] {
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

    async fn stage_mount(
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
        for option in fs.implied_mount_options() {
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

    async fn stage_block(
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

    async fn publish(&self, r: NodePublishVolumeRequest) -> Result<(), NodeError> {
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

    async fn unpublish(&self, r: NodeUnpublishVolumeRequest) -> Result<(), NodeError> {
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

    async fn unstage(&self, r: NodeUnstageVolumeRequest) -> Result<(), NodeError> {
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

    /// NodeExpandVolume: after ControllerExpandVolume grew the replicas, asks the
    /// engine-host to grow the engine, FUSE file and loop device, then grows a mounted
    /// filesystem online. `volume_path` may be the staging or a publish path (the CO
    /// sends either); it must be where this volume is, judged by device numbers. A
    /// block volume only grows its device. Repeating it is harmless: every step is a
    /// no-op at the size already reached.
    async fn expand(
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

    async fn stats(
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

/// How long `resize2fs` / `xfs_growfs` may run. Online growth only initialises the
/// new block groups' metadata, a few seconds even for large growths over a quorum.
const GROW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Grows the filesystem mounted at `mountpoint` from `device` to fill the device,
/// online: `resize2fs <device>` for ext4 (it grows a mounted filesystem through the
/// kernel), `xfs_growfs <mountpoint>` for XFS (which only grows mounted ones).
async fn grow_filesystem(fs: FsType, device: &Path, mountpoint: &Path) -> Result<(), MkfsError> {
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
fn mounted_fs_type(path: &Path) -> Result<Option<String>, MountError> {
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

/// Whether the filesystem of device `dev` is mounted anywhere but `staging` and
/// `target`.
fn published_elsewhere(dev: (u32, u32), staging: &Path, target: &Path) -> Result<bool, NodeError> {
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
fn remove_path(path: &Path) -> Result<(), MountError> {
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

fn log_failure(rpc: &str, volume_id: &str, e: &NodeError) {
    match e.code() {
        Code::InvalidArgument | Code::NotFound | Code::AlreadyExists | Code::Aborted => {
            tracing::debug!(rpc, volume = %volume_id, error = %error_chain(e), "request refused")
        }
        _ => tracing::warn!(rpc, volume = %volume_id, error = %error_chain(e), "request failed"),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = r.volume_id.clone();
        self.stage(r)
            .await
            .inspect_err(|e| log_failure("NodeStageVolume", &volume_id, e))?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = r.volume_id.clone();
        self.unstage(r)
            .await
            .inspect_err(|e| log_failure("NodeUnstageVolume", &volume_id, e))?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = r.volume_id.clone();
        self.publish(r)
            .await
            .inspect_err(|e| log_failure("NodePublishVolume", &volume_id, e))?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = r.volume_id.clone();
        self.unpublish(r)
            .await
            .inspect_err(|e| log_failure("NodeUnpublishVolume", &volume_id, e))?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        let volume_id = r.volume_id.clone();
        let out = self
            .stats(r)
            .await
            .inspect_err(|e| log_failure("NodeGetVolumeStats", &volume_id, e))?;
        Ok(Response::new(out))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = r.volume_id.clone();
        let out = self
            .expand(r)
            .await
            .inspect_err(|e| log_failure("NodeExpandVolume", &volume_id, e))?;
        Ok(Response::new(out))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let cap = |t: rpc::Type| NodeServiceCapability {
            r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
        };
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![
                cap(rpc::Type::StageUnstageVolume),
                cap(rpc::Type::GetVolumeStats),
                cap(rpc::Type::VolumeCondition),
                cap(rpc::Type::ExpandVolume),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let segments = HashMap::from([(TOPOLOGY_NODE_KEY.to_owned(), self.config.node_id.clone())]);
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.config.node_id.clone(),
            max_volumes_per_node: self.config.max_volumes_per_node,
            accessible_topology: Some(Topology { segments }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_csi_proto::v1::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn service() -> NodeService {
        NodeService::new(NodeConfig {
            node_id: "n7".to_owned(),
            max_volumes_per_node: 12,
            engine_host_socket: PathBuf::from("/nonexistent/tessera/engine-host.sock"),
        })
    }

    fn mount_cap(mode: Mode, fs: &str) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.to_owned(),
                mount_flags: vec!["noatime".to_owned()],
                volume_mount_group: String::new(),
            })),
        }
    }

    #[tokio::test]
    async fn node_get_info_reports_id_limit_and_topology() {
        let info = service()
            .node_get_info(Request::new(NodeGetInfoRequest {}))
            .await
            .expect("NodeGetInfo never fails")
            .into_inner();
        assert_eq!(info.node_id, "n7");
        assert_eq!(info.max_volumes_per_node, 12);
        let topology = info.accessible_topology.expect("topology is always set");
        assert_eq!(
            topology.segments.get(TOPOLOGY_NODE_KEY).map(String::as_str),
            Some("n7")
        );
    }

    #[tokio::test]
    async fn capabilities_are_stage_stats_and_condition() {
        let caps = service()
            .node_get_capabilities(Request::new(NodeGetCapabilitiesRequest {}))
            .await
            .expect("never fails")
            .into_inner()
            .capabilities;
        let types: Vec<i32> = caps
            .iter()
            .filter_map(|c| c.r#type.map(|CapType::Rpc(r)| r.r#type))
            .collect();
        assert_eq!(
            types,
            vec![
                rpc::Type::StageUnstageVolume as i32,
                rpc::Type::GetVolumeStats as i32,
                rpc::Type::VolumeCondition as i32,
                rpc::Type::ExpandVolume as i32
            ]
        );
    }

    #[test]
    fn capability_resolution() {
        let none = HashMap::new();
        let xfs_ctx = HashMap::from([(CTX_FS_TYPE.to_owned(), "xfs".to_owned())]);
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

    #[tokio::test]
    async fn required_fields_are_invalid_argument_before_any_io() {
        let s = service();
        let cap = Some(mount_cap(Mode::SingleNodeWriter, "ext4"));
        let ctx = HashMap::from([
            (CTX_EPOCH.to_owned(), "1".to_owned()),
            (CTX_REPLICAS.to_owned(), "a=h:1".to_owned()),
        ]);
        let stage =
            |id: &str, path: &str, cap: Option<VolumeCapability>, ctx: &HashMap<String, String>| {
                NodeStageVolumeRequest {
                    volume_id: id.to_owned(),
                    staging_target_path: path.to_owned(),
                    volume_capability: cap,
                    publish_context: ctx.clone(),
                    ..Default::default()
                }
            };
        for req in [
            stage("", "/s", cap.clone(), &ctx),
            stage("v", "", cap.clone(), &ctx),
            stage("v", "/s", None, &ctx),
            stage("v", "/s", cap.clone(), &HashMap::new()),
        ] {
            let st = s
                .node_stage_volume(Request::new(req))
                .await
                .expect_err("invalid");
            assert_eq!(st.code(), Code::InvalidArgument, "{}", st.message());
        }
        let st = s
            .node_publish_volume(Request::new(NodePublishVolumeRequest {
                volume_id: "v".into(),
                target_path: "/t".into(),
                volume_capability: cap.clone(),
                ..Default::default()
            }))
            .await
            .expect_err("no staging path");
        assert_eq!(st.code(), Code::FailedPrecondition);
        for (id, path) in [("", "/t"), ("v", "")] {
            let st = s
                .node_unpublish_volume(Request::new(NodeUnpublishVolumeRequest {
                    volume_id: id.into(),
                    target_path: path.into(),
                }))
                .await
                .expect_err("invalid");
            assert_eq!(st.code(), Code::InvalidArgument);
            let st = s
                .node_get_volume_stats(Request::new(NodeGetVolumeStatsRequest {
                    volume_id: id.into(),
                    volume_path: path.into(),
                    staging_target_path: String::new(),
                }))
                .await
                .expect_err("invalid");
            assert_eq!(st.code(), Code::InvalidArgument);
            let st = s
                .node_expand_volume(Request::new(NodeExpandVolumeRequest {
                    volume_id: id.into(),
                    volume_path: path.into(),
                    ..Default::default()
                }))
                .await
                .expect_err("invalid");
            assert_eq!(st.code(), Code::InvalidArgument);
        }
    }

    #[tokio::test]
    async fn unreachable_engine_host_is_unavailable() {
        let st = service()
            .node_get_volume_stats(Request::new(NodeGetVolumeStatsRequest {
                volume_id: "v".into(),
                volume_path: "/x".into(),
                staging_target_path: String::new(),
            }))
            .await
            .expect_err("no engine-host");
        assert_eq!(st.code(), Code::Unavailable, "{}", st.message());
    }

    #[tokio::test]
    async fn unpublish_of_a_missing_path_succeeds() {
        service()
            .node_unpublish_volume(Request::new(NodeUnpublishVolumeRequest {
                volume_id: "v".into(),
                target_path: "/nonexistent/tessera/target".into(),
            }))
            .await
            .expect("nothing to undo");
    }
}
