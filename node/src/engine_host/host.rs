//! [`EngineHost`]: the table of attached volumes and the attach/detach state machine.
//!
//! Each volume has a slot guarded by its own async mutex, so attaching one volume
//! never waits for another; the slot holds the opened engine, the FUSE mount and the
//! loop device. A second, plain-mutex table ([`EngineHost::list`]) holds what callers
//! may read without waiting for an attach in progress: the volume's public
//! description and a handle to ask its engine for status.
//!
//! The blocking frontend calls (FUSE mount, loop attach/detach, unmount) run inside
//! `block_in_place`, so the engine-host must run on a multi-threaded runtime: the
//! FUSE worker threads enter the engine's runtime to serve the kernel's reads during
//! those calls (a loop attach makes the kernel read the device).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tessera_telemetry::{error_chain, VolumeLatency};

use crate::engine::EngineConfig;
use crate::frontend::{
    cleanup_stale, CleanupReport, FuseError, FuseOptions, FuseVolume, LoopDevice, LoopError,
};
use crate::mount::{block_device_claimed, block_device_number};

use super::error::EngineHostError;
use super::target::{Opened, BACKEND};

/// Directory under the state dir holding one directory per attached volume.
pub const VOLUMES_DIR: &str = "volumes";
/// Name of the FUSE mountpoint inside a volume's directory.
pub const FUSE_DIR: &str = "fuse";

/// The public description of an attached volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// The volume.
    pub volume_id: String,
    /// `/dev/loopN`.
    pub device_path: PathBuf,
    /// `(major, minor)` of the loop device.
    pub device_number: (u32, u32),
    /// The FUSE file behind the loop device.
    pub fuse_file: PathBuf,
    /// Volume size in bytes.
    pub size_bytes: u64,
    /// Fencing epoch of the engine.
    pub epoch: u64,
    /// What serves the volume: always [`BACKEND`] (`engine`).
    pub backend: &'static str,
}

/// Health of one attached volume.
#[derive(Debug, Clone)]
pub struct VolumeHealth {
    /// The volume.
    pub info: VolumeInfo,
    /// The engine's status.
    pub engine: crate::engine::EngineStatus,
}

/// Everything one attached volume holds. Field order is teardown order.
struct Attached {
    info: VolumeInfo,
    loop_dev: LoopDevice,
    fuse: FuseVolume,
    opened: Opened,
}

#[derive(Default)]
struct Slot {
    attached: Option<Attached>,
}

/// What the listing table keeps per volume.
#[derive(Clone)]
struct Listed {
    info: VolumeInfo,
    opened: Opened,
}

/// Hosts the engines of every volume attached on this node.
pub struct EngineHost {
    state_dir: PathBuf,
    fuse_options: FuseOptions,
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
    listed: Mutex<BTreeMap<String, Listed>>,
    shutting_down: AtomicBool,
    /// Per volume and op latency of the engines' requests, for `/metrics`.
    op_latency: VolumeLatency,
    /// Given to every engine opened here ([`EngineConfig::replica_set_poll`]).
    replica_set_poll: std::time::Duration,
    /// Given to every engine opened here ([`EngineConfig::transport`]).
    transport: tessera_tls::Transport,
}

impl std::fmt::Debug for EngineHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHost")
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections only insert, remove or clone map entries.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Checks that a volume id can name a directory: not empty, not `.`/`..`, no `/` or
/// NUL, at most 255 bytes.
pub fn validate_volume_id(volume_id: &str) -> Result<(), EngineHostError> {
    let reason = if volume_id.is_empty() {
        Some("it is empty")
    } else if volume_id == "." || volume_id == ".." {
        Some("it is a relative path component")
    } else if volume_id.contains('/') || volume_id.contains('\0') {
        Some("it contains '/' or NUL")
    } else if volume_id.len() > 255 {
        Some("it is longer than 255 bytes")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(EngineHostError::InvalidVolumeId {
            volume_id: volume_id.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

impl EngineHost {
    /// Creates the host and removes what an earlier engine-host on the same state dir
    /// left behind: its FUSE servers died with it, so its loop devices and FUSE mounts
    /// can serve nothing. Devices still held by a mounted filesystem are left alone
    /// (the node plugin's unstage unmounts them; [`EngineHost::detach`] then removes
    /// them).
    pub fn new(
        state_dir: &Path,
        fuse_options: FuseOptions,
    ) -> Result<(EngineHost, CleanupReport), EngineHostError> {
        let volumes = state_dir.join(VOLUMES_DIR);
        std::fs::create_dir_all(&volumes).map_err(|source| EngineHostError::Io {
            volume_id: String::new(),
            what: "create",
            path: volumes.clone(),
            source,
        })?;
        let state_dir = volumes
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| state_dir.to_owned());
        let state_dir = state_dir.canonicalize().unwrap_or(state_dir);
        let report =
            cleanup_stale(&state_dir.join(VOLUMES_DIR)).map_err(|e| EngineHostError::Io {
                volume_id: String::new(),
                what: "clean up leftovers under",
                path: state_dir.join(VOLUMES_DIR),
                source: std::io::Error::other(error_chain(&e)),
            })?;
        Ok((
            EngineHost {
                state_dir,
                fuse_options,
                slots: Mutex::new(HashMap::new()),
                listed: Mutex::new(BTreeMap::new()),
                shutting_down: AtomicBool::new(false),
                op_latency: VolumeLatency::default(),
                replica_set_poll: crate::engine::config::DEFAULT_REPLICA_SET_POLL,
                transport: tessera_tls::Transport::plaintext(),
            },
            report,
        ))
    }

    /// Sets how often the engines opened from now on ask their replicas for the
    /// replica set (default [`crate::engine::config::DEFAULT_REPLICA_SET_POLL`]).
    pub fn with_replica_set_poll(mut self, every: std::time::Duration) -> Self {
        self.replica_set_poll = every;
        self
    }

    /// Sets how the engines opened from now on dial their replicas (default: plain
    /// text, for in-process tests; the binary passes what its flags chose).
    pub fn with_transport(mut self, transport: tessera_tls::Transport) -> Self {
        self.transport = transport;
        self
    }

    /// How engines dial their replicas.
    pub fn transport(&self) -> &tessera_tls::Transport {
        &self.transport
    }

    /// The state directory (absolute).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The engines' request latency per volume and op (registered by the caller).
    pub fn op_latency(&self) -> &VolumeLatency {
        &self.op_latency
    }

    fn volume_dir(&self, volume_id: &str) -> PathBuf {
        self.state_dir.join(VOLUMES_DIR).join(volume_id)
    }

    fn slot(&self, volume_id: &str) -> Arc<tokio::sync::Mutex<Slot>> {
        Arc::clone(lock(&self.slots).entry(volume_id.to_owned()).or_default())
    }

    /// Attaches the volume: engine, FUSE file, loop device. Idempotent for the same
    /// epoch; a higher epoch tears the running engine down first; a lower one is
    /// refused.
    pub async fn attach(
        &self,
        volume_id: &str,
        publish_context: &HashMap<String, String>,
        local_node_id: &str,
    ) -> Result<VolumeInfo, EngineHostError> {
        validate_volume_id(volume_id)?;
        let mut config =
            EngineConfig::from_publish_context(volume_id, publish_context, local_node_id).map_err(
                |source| EngineHostError::PublishContext {
                    volume_id: volume_id.to_owned(),
                    source,
                },
            )?;
        config.replica_set_poll = self.replica_set_poll;
        config.transport = self.transport.clone();
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(EngineHostError::ShuttingDown);
        }
        let slot = self.slot(volume_id);
        let mut slot = slot.lock().await;
        if let Some(current) = &slot.attached {
            let attached = current.info.epoch;
            let requested = config.epoch.get();
            if requested == attached {
                return Ok(current.info.clone());
            }
            if requested < attached {
                return Err(EngineHostError::StaleEpoch {
                    volume_id: volume_id.to_owned(),
                    requested,
                    attached,
                });
            }
            tracing::warn!(volume = %volume_id, old_epoch = attached, new_epoch = requested, "newer epoch: replacing the running engine");
            if let Some(old) = slot.attached.take() {
                lock(&self.listed).remove(volume_id);
                self.teardown(old, true).await?;
            }
        }
        let attached = self.open_and_attach(volume_id, config).await?;
        let info = attached.info.clone();
        lock(&self.listed).insert(
            volume_id.to_owned(),
            Listed {
                info: info.clone(),
                opened: attached.opened.clone(),
            },
        );
        slot.attached = Some(attached);
        tracing::info!(volume = %volume_id, device = %info.device_path.display(), epoch = info.epoch, size = info.size_bytes, "attached volume");
        Ok(info)
    }

    async fn open_and_attach(
        &self,
        volume_id: &str,
        config: EngineConfig,
    ) -> Result<Attached, EngineHostError> {
        let epoch = config.epoch.get();
        let mountpoint = self.volume_dir(volume_id).join(FUSE_DIR);
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| EngineHostError::Io {
                volume_id: volume_id.to_owned(),
                what,
                path,
                source,
            }
        };
        // Leftovers of an earlier engine-host for this volume (a dead FUSE mount, a
        // loop device on it) would shadow the new mount.
        if let Err(e) = tokio::task::block_in_place(|| cleanup_stale(&self.volume_dir(volume_id))) {
            tracing::warn!(volume = %volume_id, error = %error_chain(&e), "cleaning up leftovers before attach");
        }
        std::fs::create_dir_all(&mountpoint).map_err(io("create", &mountpoint))?;

        let opened = Opened::open(config).await?;
        opened.record_latency(self.op_latency.volume(volume_id));
        let options = self.fuse_options.clone();
        let target = opened.block_target();
        let fuse =
            match tokio::task::block_in_place(|| FuseVolume::mount(target, &mountpoint, options)) {
                Ok(f) => f,
                Err(source) => {
                    opened.close(volume_id).await;
                    return Err(EngineHostError::Fuse {
                        volume_id: volume_id.to_owned(),
                        source,
                    });
                }
            };
        let fuse_file = fuse.file_path().to_owned();
        let loop_dev = match tokio::task::block_in_place(|| LoopDevice::attach(&fuse_file, true)) {
            Ok(l) => l,
            Err(source) => {
                let mut fuse = fuse;
                if let Err(e) = tokio::task::block_in_place(|| fuse.unmount()) {
                    tracing::warn!(volume = %volume_id, error = %error_chain(&e), "unmounting FUSE after failed loop attach");
                }
                opened.close(volume_id).await;
                return Err(EngineHostError::Loop {
                    volume_id: volume_id.to_owned(),
                    source,
                });
            }
        };
        if !loop_dev.direct_io() {
            tracing::warn!(volume = %volume_id, device = %loop_dev.path().display(), "kernel did not enable direct I/O on the loop device; flushes still reach the engine, but pages are cached twice");
        }
        let device_number = match block_device_number(loop_dev.path()) {
            Ok(n) => n,
            Err(e) => {
                let mut attached = Attached {
                    info: VolumeInfo {
                        volume_id: volume_id.to_owned(),
                        device_path: loop_dev.path().to_owned(),
                        device_number: (0, 0),
                        fuse_file,
                        size_bytes: opened.size(),
                        epoch,
                        backend: BACKEND,
                    },
                    loop_dev,
                    fuse,
                    opened,
                };
                let _ = tokio::task::block_in_place(|| attached.loop_dev.detach());
                let _ = self.teardown(attached, true).await;
                return Err(EngineHostError::Io {
                    volume_id: volume_id.to_owned(),
                    what: "stat",
                    path: PathBuf::from("loop device"),
                    source: std::io::Error::other(error_chain(&e)),
                });
            }
        };
        Ok(Attached {
            info: VolumeInfo {
                volume_id: volume_id.to_owned(),
                device_path: loop_dev.path().to_owned(),
                device_number,
                fuse_file,
                size_bytes: opened.size(),
                epoch,
                backend: BACKEND,
            },
            loop_dev,
            fuse,
            opened,
        })
    }

    /// Detaches the volume: loop device, flush, FUSE unmount, engine close. Idempotent;
    /// returns whether it was attached. Refuses while a filesystem is mounted from the
    /// loop device. If the flush fails the volume stays attached (minus its loop
    /// device) so a retry flushes again.
    pub async fn detach(&self, volume_id: &str) -> Result<bool, EngineHostError> {
        validate_volume_id(volume_id)?;
        let slot = self.slot(volume_id);
        let mut guard = slot.lock().await;
        let Some(attached) = guard.attached.as_mut() else {
            drop(guard);
            self.remove_leftovers(volume_id);
            return Ok(false);
        };
        let device = attached.info.device_path.clone();
        if !attached.loop_dev.is_detached() {
            match block_device_claimed(&device) {
                Ok(true) => {
                    return Err(EngineHostError::InUse {
                        volume_id: volume_id.to_owned(),
                        device,
                    })
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(volume = %volume_id, error = %error_chain(&e), "cannot check whether the loop device is in use; detaching anyway")
                }
            }
            detach_loop(volume_id, &mut attached.loop_dev)?;
        }
        if let Err(source) = attached.opened.flush().await {
            // An engine below quorum can never flush again (stale replicas are not
            // reconnected), so refusing would make NodeUnstage fail forever. Its
            // acknowledged writes reached a majority before they were acknowledged;
            // only their durability on those replicas is unconfirmed. Any other
            // failure keeps the volume so a retry flushes again.
            if !attached.opened.engine_status().below_quorum {
                return Err(EngineHostError::Flush {
                    volume_id: volume_id.to_owned(),
                    source,
                });
            }
            tracing::error!(volume = %volume_id, error = %error_chain(&source), "volume is below quorum and cannot be flushed; detaching anyway: acknowledged writes are on a majority of replicas, their durability there is unconfirmed");
        }
        if let Some(attached) = guard.attached.take() {
            lock(&self.listed).remove(volume_id);
            self.teardown(attached, false).await?;
        }
        drop(guard);
        lock(&self.slots).remove(volume_id);
        self.remove_leftovers(volume_id);
        tracing::info!(volume = %volume_id, "detached volume");
        Ok(true)
    }

    /// Grows an attached volume: the engine first, then the FUSE file,
    /// then the loop device, each step only once the one below it holds the bytes.
    /// Idempotent: repeating it finds every layer at the size already. Returns the
    /// volume with the loop device's new size.
    pub async fn resize(
        &self,
        volume_id: &str,
        wanted: Option<u64>,
    ) -> Result<VolumeInfo, EngineHostError> {
        validate_volume_id(volume_id)?;
        let slot = self.slot(volume_id);
        let mut guard = slot.lock().await;
        let Some(attached) = guard.attached.as_mut() else {
            return Err(EngineHostError::NotAttached {
                volume_id: volume_id.to_owned(),
            });
        };
        let size = attached.opened.resize(volume_id, wanted).await?;
        if attached.fuse.size() < size {
            tokio::task::block_in_place(|| attached.fuse.set_size(size)).map_err(|source| {
                EngineHostError::Fuse {
                    volume_id: volume_id.to_owned(),
                    source,
                }
            })?;
        }
        let device_size = tokio::task::block_in_place(|| attached.loop_dev.set_capacity())
            .map_err(|source| EngineHostError::Loop {
                volume_id: volume_id.to_owned(),
                source,
            })?;
        if device_size != size {
            tracing::warn!(volume = %volume_id, size, device_size, "loop device size differs from the volume size after resize");
        }
        attached.info.size_bytes = size;
        let info = attached.info.clone();
        if let Some(listed) = lock(&self.listed).get_mut(volume_id) {
            listed.info.size_bytes = size;
        }
        tracing::info!(volume = %volume_id, size, "volume resized");
        Ok(info)
    }

    /// Tears down a volume whose loop device is detached already, unless `force`, in
    /// which case the loop device is detached whatever uses it. Flush failures are
    /// logged (by now the kernel can no longer reach the volume anyway).
    async fn teardown(&self, mut attached: Attached, force: bool) -> Result<(), EngineHostError> {
        let volume_id = attached.info.volume_id.clone();
        if force && !attached.loop_dev.is_detached() {
            if let Ok(true) = block_device_claimed(&attached.info.device_path) {
                tracing::error!(volume = %volume_id, device = %attached.info.device_path.display(), "tearing down a volume whose device is still mounted: I/O on that mount will fail");
            }
            if let Err(e) = detach_loop(&volume_id, &mut attached.loop_dev) {
                tracing::error!(volume = %volume_id, error = %error_chain(&e), "detaching the loop device");
            }
            if let Err(e) = attached.opened.flush().await {
                tracing::error!(volume = %volume_id, error = %error_chain(&e), "flush before teardown failed");
            }
        }
        match tokio::task::block_in_place(|| attached.fuse.unmount()) {
            Ok(()) => {}
            Err(FuseError::LazilyDetached { mountpoint }) => {
                tracing::warn!(volume = %volume_id, mountpoint = %mountpoint.display(), "FUSE mount was busy and was detached lazily")
            }
            Err(source) => {
                attached.opened.close(&volume_id).await;
                return Err(EngineHostError::Fuse { volume_id, source });
            }
        }
        attached.opened.close(&volume_id).await;
        Ok(())
    }

    /// Removes the volume's directory and anything an earlier engine-host left there
    /// that is not in use any more.
    fn remove_leftovers(&self, volume_id: &str) {
        let dir = self.volume_dir(volume_id);
        if !dir.exists() {
            return;
        }
        match tokio::task::block_in_place(|| cleanup_stale(&dir)) {
            Ok(report) if !report.in_use.is_empty() => {
                tracing::warn!(volume = %volume_id, in_use = ?report.in_use, "leftovers of an earlier engine-host are still in use");
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(volume = %volume_id, error = %error_chain(&e), "cleaning up leftovers");
                return;
            }
        }
        let fuse = dir.join(FUSE_DIR);
        for path in [fuse.as_path(), dir.as_path()] {
            match std::fs::remove_dir(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove volume directory")
                }
            }
        }
    }

    /// Every attached volume, by volume id.
    pub fn list(&self) -> Vec<VolumeInfo> {
        lock(&self.listed)
            .values()
            .map(|l| l.info.clone())
            .collect()
    }

    /// Health of one attached volume.
    pub fn status(&self, volume_id: &str) -> Result<VolumeHealth, EngineHostError> {
        let listed = lock(&self.listed).get(volume_id).cloned();
        let listed = listed.ok_or_else(|| EngineHostError::NotAttached {
            volume_id: volume_id.to_owned(),
        })?;
        Ok(VolumeHealth {
            info: listed.info,
            engine: listed.opened.engine_status(),
        })
    }

    /// The status of every attached volume's engine, ordered by volume id, for
    /// `/metrics`.
    pub fn engine_statuses(&self) -> Vec<crate::engine::EngineStatus> {
        let listed: Vec<Listed> = lock(&self.listed).values().cloned().collect();
        listed.iter().map(|l| l.opened.engine_status()).collect()
    }

    /// Whether [`EngineHost::shutdown`] has started.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Tears down every attached volume: flushes each engine, detaches loop devices
    /// and unmounts FUSE files even when a filesystem is still mounted from them. A
    /// process that exits leaves its FUSE files dead anyway; doing it here at least
    /// makes every acknowledged write durable first and closes the replica sessions
    /// cleanly. Each volume still in use is logged at error level.
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let slots: Vec<(String, Arc<tokio::sync::Mutex<Slot>>)> = lock(&self.slots)
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        for (volume_id, slot) in slots {
            let mut guard = slot.lock().await;
            let Some(attached) = guard.attached.take() else {
                continue;
            };
            lock(&self.listed).remove(&volume_id);
            if let Err(e) = self.teardown(attached, true).await {
                tracing::error!(volume = %volume_id, error = %error_chain(&e), "tearing down at shutdown");
            }
        }
    }
}

fn detach_loop(volume_id: &str, dev: &mut LoopDevice) -> Result<(), EngineHostError> {
    match tokio::task::block_in_place(|| dev.detach()) {
        Ok(()) => Ok(()),
        Err(LoopError::DetachDeferred { device }) => {
            tracing::warn!(volume = %volume_id, device = %device.display(), "loop device still open elsewhere; the kernel finishes detaching on last close");
            Ok(())
        }
        Err(source) => Err(EngineHostError::Loop {
            volume_id: volume_id.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_must_be_path_components() {
        for ok in ["tv-0123", "a.b", "x_y-z"] {
            validate_volume_id(ok).expect("valid id");
        }
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            let e = validate_volume_id(bad).expect_err("invalid id");
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
        assert!(validate_volume_id(&"x".repeat(256)).is_err());
    }
}
