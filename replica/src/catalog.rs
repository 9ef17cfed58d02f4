//! The volume catalog: every volume this replica stores, on disk and in memory.
//!
//! Layout under the data directory:
//!
//! ```text
//! <data-dir>/lock                         flock held by the running daemon (holds its pid)
//! <data-dir>/volumes/<volume_id>/record   volume record (see crate::record)
//! <data-dir>/volumes/<volume_id>/store/   the volume's blocks: a crate::store::LayeredStore
//! <data-dir>/volumes/.creating-<id>/      a create in progress (removed at start)
//! <data-dir>/volumes/.deleting-<id>/      a delete in progress (removed at start)
//! ```
//!
//! *Crash safety.* A volume is built inside `.creating-<id>` and renamed into place
//! only when its block store and record are durable, so a crash leaves either no
//! volume or a whole one. A delete first renames the directory to `.deleting-<id>`
//! (that rename is the commit point) and then removes it. Record updates are atomic
//! file replacements. Every mutation is durable (fsynced, directory included) before
//! the method returns.
//!
//! *Block stores.* Every healthy volume's store is opened when the catalog loads (so a
//! damaged store is found at start, not at an engine's first I/O) and stays open until
//! the volume is deleted; the data plane gets it through [`Catalog::open_store`]. A
//! delete first *retires* the open store ([`LayeredStore::retire`]): it waits for the
//! I/O in flight, and every later request of a connection still holding it fails, so
//! nothing is written into a deleted volume and no write is acknowledged after the
//! delete committed. Capacity stays thick (the sum of volume sizes); the space the
//! stores really allocate is reported separately ([`Catalog::allocated_bytes`]).
//!
//! *Local restores.* A restore or clone whose snapshot this daemon holds (its volume
//! is stored here and its record lists the snapshot) builds the new store on that
//! snapshot's sealed layers by hard links ([`LayeredStore::create_sharing`]): instant,
//! no block copied, `copy.shared_layers` set. Its epoch starts at 0 like any new
//! volume's (the controller reads a nonzero epoch as "published"), so its shared blocks
//! keep seqs of the source's epochs, which may be higher than its own engines' first
//! writes: nothing compares seqs across that line today (writes into the head are
//! unconditional, repairs replace damaged blocks whatever their seq); see NOTES.md.
//! Should sharing fail (another filesystem, the snapshot being deleted, ...), the
//! volume is created empty and copied over gRPC like any other. Capacity counts a
//! shared layer's space once.
//!
//! *I/O scheduling and QoS.* A catalog opened with a [`CatalogIo`] (the daemon's)
//! registers every healthy volume with the backing directory's I/O [`Scheduler`] when
//! it loads or creates the volume, with the [`Qos`] its record's parameters ask for
//! ([`qos_from_parameters`]), and opens the volume's store over that registration
//! ([`ScheduledFileFactory`]): all block I/O of the volume is then scheduled. An update
//! that changes the parameters applies the new QoS to the live registration right
//! after the record is durable, without closing the store; a delete releases the
//! registration once it committed. Invalid QoS parameters are refused by create and
//! update (INVALID_ARGUMENT, nothing changes). A record that already holds invalid
//! ones when it loads (written by hand, or by an older version) is not quarantined,
//! since its data is fine: the volume runs unlimited, the error is logged and shown on
//! `/metrics` until an update fixes the parameters. A catalog without a [`CatalogIo`]
//! (tests, tools) uses plain std file I/O and only validates.
//!
//! *Concurrency.* Mutations are serialised by one mutex held across their disk I/O.
//! Reads ([`Catalog::get`], [`Catalog::list`]) only take a read lock on the in-memory
//! map, which mutations hold for a pointer swap, so a slow fsync never delays them.
//!
//! *Epochs.* Each volume's fencing epoch also lives in an `Arc<AtomicU64>` that the
//! data plane shares ([`Catalog::epoch_handle`]); a raise stores it only after the
//! record holding it is durable.
//!
//! *Corruption.* A volume whose record cannot be read, or whose block store cannot be
//! opened, at start is *quarantined*: logged at error level, left untouched on disk,
//! counted against capacity, not listed, not served on the data plane, and refused by
//! create until an operator (or an explicit delete) resolves it.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tracing::{error, info, warn};

use crate::block_io::BLOCK_SIZE;
use crate::capacity;
use crate::control_proto as proto;
use crate::record::{self, Attachment, CopySource, ReplicaRef, SnapshotMeta, VolumeRecord};
use crate::scheduler::params::{qos_from_parameters, QosParamError};
use crate::scheduler::{Qos, Scheduler, SchedulerError, VolumeHandle, VolumeStats};
use crate::store::{BlockFileFactory, LayeredStore, ScheduledFileFactory, StoreError};

mod copy_state;

pub use copy_state::{majority, CopyTarget, SnapshotSource};

/// Name of the per-volume record file.
pub const RECORD_FILE: &str = "record";
/// Name of the per-volume block-store directory.
pub const STORE_DIR: &str = "store";
/// Directory (under the data dir) holding one directory per volume.
pub const VOLUMES_DIR: &str = "volumes";
/// Lock file (under the data dir) that keeps two daemons off one directory.
pub const LOCK_FILE: &str = "lock";
/// Prefix of a volume directory under construction.
pub const CREATING_PREFIX: &str = ".creating-";
/// Prefix of a volume directory being removed.
pub const DELETING_PREFIX: &str = ".deleting-";
/// Longest accepted volume id, keeping directory names well under NAME_MAX.
pub const MAX_VOLUME_ID_LEN: usize = 128;

/// Why a catalog operation failed. Each variant maps to one gRPC status code in the
/// control service, so callers can tell their own mistakes from the replica's state.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The volume id is empty, too long, starts with '.', or has a character outside
    /// `[A-Za-z0-9._-]`.
    #[error("invalid volume id {id:?}: {reason}")]
    InvalidVolumeId {
        /// The id as given.
        id: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The QoS parameters (maxIOPS, minIOPS, maxBandwidth, burstDuration) cannot be
    /// applied.
    #[error("volume {volume_id}: invalid QoS parameters")]
    InvalidQos {
        /// The volume.
        volume_id: String,
        /// Which key and value, and why.
        #[source]
        source: QosParamError,
    },
    /// The I/O scheduler refused to register the volume or to change its QoS.
    #[error("volume {volume_id}: the I/O scheduler refused to {op} it")]
    Scheduler {
        /// The volume.
        volume_id: String,
        /// What was being done.
        op: &'static str,
        /// The scheduler's error.
        #[source]
        source: SchedulerError,
    },
    /// The size is zero or not a multiple of the block size.
    #[error("size_bytes {size} must be a positive multiple of {BLOCK_SIZE}")]
    InvalidSize {
        /// The size as given.
        size: u64,
    },
    /// A fencing raise that does not increase the epoch.
    #[error("new_epoch {new} must be greater than expected_epoch {expected}")]
    EpochNotIncreasing {
        /// expected_epoch of the request.
        expected: u64,
        /// new_epoch of the request.
        new: u64,
    },
    /// An epoch a seq cannot carry (`crate::seq::MAX_EPOCH`).
    #[error(
        "epoch {epoch} exceeds the largest epoch a write sequence number can carry ({})",
        crate::seq::MAX_EPOCH
    )]
    EpochTooLarge {
        /// The epoch refused.
        epoch: u64,
    },
    /// A create for an existing id whose immutable fields differ.
    #[error("volume {volume_id} already exists with {difference}")]
    Conflict {
        /// The volume.
        volume_id: String,
        /// Which fields differ, stored value first.
        difference: String,
    },
    /// Thick accounting (or the filesystem's free space) leaves too little room.
    #[error("volume {volume_id} needs {needed} bytes, {free} free")]
    NoCapacity {
        /// The volume being created.
        volume_id: String,
        /// Bytes it needs.
        needed: u64,
        /// Bytes free on this replica.
        free: u64,
    },
    /// The backing filesystem ran out of space (ENOSPC/EDQUOT) during a mutation;
    /// nothing was changed.
    #[error("backing filesystem is full while trying to {op} volume {volume_id}")]
    DiskFull {
        /// The volume.
        volume_id: String,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// No volume with this id is stored here.
    #[error("volume {0} not found on this replica")]
    NotFound(String),
    /// The id belongs to a deleted volume whose snapshots still exist; it cannot be
    /// created again until they are deleted.
    #[error("volume id {0} is held by the snapshots of a deleted volume")]
    HeldBySnapshots(String),
    /// The copy source of a restore or clone is unusable (no holders, bad ids, a
    /// replication factor no holder list can reach a majority of, ...).
    #[error("volume {volume_id}: invalid copy source: {reason}")]
    InvalidCopySource {
        /// The volume being created.
        volume_id: String,
        /// What is wrong with the source.
        reason: String,
    },
    /// A restore or clone into a volume smaller than its source.
    #[error("volume {volume_id} of {size} bytes cannot hold its source of {source_size} bytes")]
    CopyTooSmall {
        /// The volume being created.
        volume_id: String,
        /// Its requested size.
        size: u64,
        /// The source snapshot's size.
        source_size: u64,
    },
    /// The volume is still being filled from its copy source; it is not served and
    /// cannot be snapshotted until the copy completes.
    #[error(
        "volume {volume_id} is still being populated from snapshot {snapshot_id} ({percent}%)"
    )]
    Populating {
        /// The volume.
        volume_id: String,
        /// The snapshot it is copied from.
        snapshot_id: String,
        /// Durable progress in whole percent.
        percent: u64,
    },
    /// ExpandVolume asked for less than the volume holds: volumes never shrink.
    #[error("volume {volume_id} holds {current} bytes; it cannot shrink to {requested}")]
    Shrink {
        /// The volume.
        volume_id: String,
        /// Its size now.
        current: u64,
        /// The size asked for.
        requested: u64,
    },
    /// UpdateVolume compare-and-set lost.
    #[error("volume {volume_id}: current generation is {current}, expected {expected}")]
    GenerationMismatch {
        /// The volume.
        volume_id: String,
        /// expected_generation of the request.
        expected: u64,
        /// Stored generation.
        current: u64,
    },
    /// RaiseEpoch compare-and-set lost.
    #[error("volume {volume_id}: current epoch is {current}, expected {expected}")]
    EpochMismatch {
        /// The volume.
        volume_id: String,
        /// expected_epoch of the request.
        expected: u64,
        /// Stored epoch.
        current: u64,
    },
    /// The volume's record was unreadable at start; it is left for an operator.
    #[error("volume {volume_id} is quarantined on this replica ({reason}); inspect {path}")]
    Quarantined {
        /// The volume.
        volume_id: String,
        /// Why it was quarantined.
        reason: String,
        /// Its directory.
        path: PathBuf,
    },
    /// The volume's block store failed (other than a full disk, which is
    /// [`CatalogError::DiskFull`]).
    #[error("cannot {op} the block store of volume {volume_id}")]
    Store {
        /// The volume.
        volume_id: String,
        /// What was being done.
        op: &'static str,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// Another process holds the data directory's lock.
    #[error("data directory {path} is in use by another tessera-replica{holder}")]
    Locked {
        /// The data directory.
        path: PathBuf,
        /// " (pid N)" when the holder's pid is known, else "".
        holder: String,
    },
    /// Any other filesystem failure.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Settings for [`Catalog::open`].
#[derive(Debug, Clone)]
pub struct CatalogConfig {
    /// The daemon's data directory; created if missing.
    pub data_dir: PathBuf,
    /// Bytes offered to volumes; `None` means the backing filesystem's size.
    pub capacity_bytes: Option<u64>,
}

/// The fields of a new volume, as the controller sends them in CreateVolume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewVolume {
    /// Volume id (validated by [`validate_volume_id`]).
    pub volume_id: String,
    /// CSI name.
    pub name: String,
    /// Size in bytes, a positive multiple of [`BLOCK_SIZE`].
    pub size_bytes: u64,
    /// Number of replicas.
    pub replication_factor: u32,
    /// Replica set chosen by the controller.
    pub replicas: Vec<ReplicaRef>,
    /// StorageClass parameters.
    pub parameters: BTreeMap<String, String>,
    /// Creation time; 0 means "now".
    pub created_unix_nanos: i64,
    /// "block", "mount" or "".
    pub access_type: String,
    /// Restore or clone: where the data is copied from in the background.
    pub copy_source: Option<CopySource>,
}

impl From<proto::CreateVolumeRequest> for NewVolume {
    fn from(r: proto::CreateVolumeRequest) -> Self {
        NewVolume {
            volume_id: r.volume_id,
            name: r.name,
            size_bytes: r.size_bytes,
            replication_factor: r.replication_factor,
            replicas: r.replicas.into_iter().map(Into::into).collect(),
            parameters: r.parameters.into_iter().collect(),
            created_unix_nanos: r.created_unix_nanos,
            access_type: r.access_type,
            copy_source: r.copy_source.map(Into::into),
        }
    }
}

/// Result of [`Catalog::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOutcome {
    /// The stored record (new, or the existing one for an idempotent repeat).
    pub record: VolumeRecord,
    /// False when the volume already existed with the same parameters.
    pub created: bool,
}

/// Capacity figures reported by GetInfo and /metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityReport {
    /// Bytes offered to volumes.
    pub capacity_bytes: u64,
    /// Sum of the sizes of all volumes (quarantined ones by their recorded size, or
    /// their store's size when the record is unreadable).
    pub used_bytes: u64,
    /// `capacity - used`, capped by the backing filesystem's free space.
    pub free_bytes: u64,
    /// Number of (healthy) volumes.
    pub volume_count: u32,
    /// Number of quarantined volumes.
    pub quarantined_count: u32,
}

/// A volume skipped at start because its directory could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedVolume {
    /// Directory name (the volume id).
    pub volume_id: String,
    /// Why it was skipped.
    pub reason: String,
    /// Its size as far as it can be read, counted against capacity.
    pub data_bytes: u64,
}

/// The I/O scheduler a catalog registers its volumes with (one per backing
/// directory), and how their data files are opened.
#[derive(Clone)]
pub struct CatalogIo {
    /// The backing directory's scheduler.
    pub scheduler: Arc<Scheduler>,
    /// Open data files `O_DIRECT` (the default in the daemon).
    pub direct: bool,
}

impl std::fmt::Debug for CatalogIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogIo")
            .field("engine", &self.scheduler.engine_name())
            .field("direct", &self.direct)
            .finish()
    }
}

/// One volume's scheduler registration and the factory its store opens files with.
struct VolumeIo {
    handle: VolumeHandle,
    factory: Arc<ScheduledFileFactory>,
    /// Why the record's QoS parameters could not be applied (the volume then runs
    /// unlimited); `None` when they were.
    qos_error: Option<String>,
}

impl VolumeIo {
    /// Registers `volume_id` with `qos`; the returned factory opens its store's files.
    fn register(
        io: &CatalogIo,
        volume_id: &str,
        qos: Qos,
        qos_error: Option<String>,
    ) -> Result<VolumeIo, CatalogError> {
        let handle = io
            .scheduler
            .register_volume(volume_id, qos)
            .map_err(|source| CatalogError::Scheduler {
                volume_id: volume_id.to_string(),
                op: "register",
                source,
            })?;
        Ok(VolumeIo {
            factory: Arc::new(ScheduledFileFactory::new(handle.clone(), io.direct)),
            handle,
            qos_error,
        })
    }

    fn open_store(&self, dir: &Path) -> Result<LayeredStore, StoreError> {
        let factory: Arc<dyn BlockFileFactory> = Arc::clone(&self.factory) as _;
        LayeredStore::open_with(dir, factory)
    }
}

/// A volume's QoS and scheduler counters, for `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeIoReport {
    /// The volume.
    pub volume_id: String,
    /// The QoS in force in the scheduler.
    pub qos: Qos,
    /// The scheduler's counters of the volume.
    pub stats: VolumeStats,
    /// Set when the record's QoS parameters are invalid and the volume runs unlimited.
    pub qos_error: Option<String>,
}

struct Entry {
    record: VolumeRecord,
    epoch: Arc<AtomicU64>,
    /// Open for the volume's whole life in this process; shared with data-plane
    /// connections, retired on delete.
    store: Arc<LayeredStore>,
    /// The scheduler registration; `None` for a catalog with std file I/O.
    io: Option<VolumeIo>,
}

impl Entry {
    fn snapshot(&self) -> VolumeRecord {
        self.record.clone()
    }
}

/// All volumes of one data directory. Cheap to share behind an `Arc`; every method
/// takes `&self`. Blocking: mutations do synchronous disk I/O (call them from
/// `spawn_blocking` in async code); reads are in-memory.
pub struct Catalog {
    data_dir: PathBuf,
    volumes_dir: PathBuf,
    capacity_bytes: u64,
    /// Held for the catalog's lifetime; dropping it releases the directory.
    _lock: Flock<File>,
    /// Serialises mutations, held across their disk I/O.
    mutation: Mutex<()>,
    volumes: RwLock<BTreeMap<String, Entry>>,
    quarantined: RwLock<BTreeMap<String, QuarantinedVolume>>,
    io: Option<CatalogIo>,
}

/// Checks a volume id against the rules in the control API: 1..=128 characters of
/// `[A-Za-z0-9._-]`, not starting with '.'. Ids become directory names, so this is
/// also what keeps `..`, `/` and the catalog's own hidden entries out.
pub fn validate_volume_id(id: &str) -> Result<(), CatalogError> {
    let bad = |reason| {
        Err(CatalogError::InvalidVolumeId {
            id: id.to_string(),
            reason,
        })
    };
    if id.is_empty() {
        return bad("must not be empty");
    }
    if id.len() > MAX_VOLUME_ID_LEN {
        return bad("must be at most 128 characters");
    }
    if id.starts_with('.') {
        return bad("must not start with '.'");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("may only contain A-Z, a-z, 0-9, '.', '_' and '-'");
    }
    Ok(())
}

// `u64::is_multiple_of` needs Rust 1.87; the workspace declares 1.85.
#[allow(clippy::manual_is_multiple_of)]
/// Disk space of a store's sealed (snapshot) layers that `seen` does not hold yet; 0
/// when it cannot be measured (a retired store), so capacity reports never fail on one
/// odd volume. Every layer counted goes into `seen` (by file identity), so a layer
/// hard-linked into several stores ([`LayeredStore::create_sharing`]) counts once.
fn sealed_bytes(store: &LayeredStore, seen: &mut HashSet<(u64, u64)>) -> u64 {
    store.space_used().map_or(0, |u| {
        u.layers
            .iter()
            .filter(|l| l.snapshot_id.is_some() && seen.insert(l.file_id))
            .map(|l| l.allocated_bytes)
            .fold(0u64, u64::saturating_add)
    })
}

fn validate_size(size: u64) -> Result<(), CatalogError> {
    if size == 0 || !size.is_multiple_of(BLOCK_SIZE) {
        return Err(CatalogError::InvalidSize { size });
    }
    Ok(())
}

fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Maps an I/O error of a mutation, turning a full disk into [`CatalogError::DiskFull`].
fn mutation_error(
    volume_id: &str,
    op: &'static str,
    path: &Path,
) -> impl FnOnce(io::Error) -> CatalogError {
    let volume_id = volume_id.to_string();
    let path = path.to_path_buf();
    move |source| {
        if is_disk_full(&source) {
            CatalogError::DiskFull {
                volume_id,
                op,
                source,
            }
        } else {
            CatalogError::Io { op, path, source }
        }
    }
}

/// Maps a store error of a mutation, turning a full disk into [`CatalogError::DiskFull`]
/// so the controller sees RESOURCE_EXHAUSTED whether the record or the store hit it.
fn store_error(volume_id: &str, op: &'static str) -> impl FnOnce(StoreError) -> CatalogError {
    let volume_id = volume_id.to_string();
    move |source| match source {
        StoreError::NoSpace => CatalogError::DiskFull {
            volume_id,
            op,
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        },
        StoreError::Io { source, .. } if is_disk_full(&source) => CatalogError::DiskFull {
            volume_id,
            op,
            source,
        },
        source => CatalogError::Store {
            volume_id,
            op,
            source,
        },
    }
}

use crate::error_chain;

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CatalogError {
    let path = path.to_path_buf();
    move |source| CatalogError::Io { op, path, source }
}

fn now_unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Catalog {
    /// Opens (creating if needed) a data directory: takes its lock, removes leftovers
    /// of interrupted creates and deletes, loads every volume record and opens every
    /// volume's block store (finishing any interrupted snapshot deletion in it). A
    /// volume whose record or store fails is quarantined, not fatal.
    ///
    /// Fails with [`CatalogError::Locked`] if another process holds the directory.
    pub fn open(config: CatalogConfig) -> Result<Catalog, CatalogError> {
        Self::open_with_io(config, None)
    }

    /// [`Catalog::open`], registering every volume with `io`'s scheduler and serving
    /// its blocks through it (see the module doc); `None` uses std file I/O.
    pub fn open_with_io(
        config: CatalogConfig,
        io: Option<CatalogIo>,
    ) -> Result<Catalog, CatalogError> {
        let data_dir = config.data_dir;
        fs::create_dir_all(&data_dir).map_err(io_error("create data directory", &data_dir))?;
        let lock = lock_data_dir(&data_dir)?;

        let volumes_dir = data_dir.join(VOLUMES_DIR);
        fs::create_dir_all(&volumes_dir)
            .map_err(io_error("create volumes directory", &volumes_dir))?;
        record::sync_dir(&data_dir).map_err(io_error("sync", &data_dir))?;

        let capacity_bytes = match config.capacity_bytes {
            Some(c) => c,
            None => {
                capacity::fs_space(&data_dir)
                    .map_err(io_error("measure filesystem of", &data_dir))?
                    .total_bytes
            }
        };

        let (volumes, quarantined) = scan_volumes(&volumes_dir, io.as_ref())?;
        info!(
            data_dir = %data_dir.display(),
            volumes = volumes.len(),
            quarantined = quarantined.len(),
            capacity_bytes,
            "volume catalog loaded"
        );
        Ok(Catalog {
            data_dir,
            volumes_dir,
            capacity_bytes,
            _lock: lock,
            mutation: Mutex::new(()),
            volumes: RwLock::new(volumes),
            quarantined: RwLock::new(quarantined),
            io,
        })
    }

    /// The scheduler volumes are registered with; `None` with std file I/O.
    pub fn io(&self) -> Option<&CatalogIo> {
        self.io.as_ref()
    }

    /// QoS and scheduler counters of every healthy volume (empty with std file I/O),
    /// ordered by volume id.
    pub fn io_reports(&self) -> Vec<VolumeIoReport> {
        self.read_volumes()
            .iter()
            .filter_map(|(id, e)| {
                e.io.as_ref().map(|io| VolumeIoReport {
                    volume_id: id.clone(),
                    qos: io.handle.qos(),
                    stats: io.handle.stats(),
                    qos_error: io.qos_error.clone(),
                })
            })
            .collect()
    }

    /// The scheduler registration of a stored volume, for tools and benchmarks that
    /// drive its I/O in-process; `None` if unknown or with std file I/O.
    pub fn volume_handle(&self, volume_id: &str) -> Option<VolumeHandle> {
        self.read_volumes()
            .get(volume_id)
            .and_then(|e| e.io.as_ref().map(|io| io.handle.clone()))
    }

    /// The data directory this catalog owns.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Directory of a volume (whether or not it exists).
    pub fn volume_dir(&self, volume_id: &str) -> PathBuf {
        self.volumes_dir.join(volume_id)
    }

    /// Directory of a stored volume's block store; `None` if unknown.
    pub fn store_dir(&self, volume_id: &str) -> Option<PathBuf> {
        self.read_volumes()
            .contains_key(volume_id)
            .then(|| self.volume_dir(volume_id).join(STORE_DIR))
    }

    /// The open block store and live epoch of a stored volume, for a data-plane
    /// connection. Both are looked up together so a connection never pairs one
    /// incarnation's store with another's epoch. The store stays usable until the
    /// volume is deleted (then every call on it fails).
    pub fn open_store(
        &self,
        volume_id: &str,
    ) -> Result<(Arc<LayeredStore>, Arc<AtomicU64>), CatalogError> {
        validate_volume_id(volume_id)?;
        if let Some(e) = self.read_volumes().get(volume_id) {
            if e.record.deleted {
                return Err(CatalogError::NotFound(volume_id.to_string()));
            }
            copy_state::refuse_while_copying(&e.record)?;
            return Ok((Arc::clone(&e.store), Arc::clone(&e.epoch)));
        }
        match self.read_quarantined().get(volume_id) {
            Some(q) => Err(self.quarantined_error(q)),
            None => Err(CatalogError::NotFound(volume_id.to_string())),
        }
    }

    /// Makes every write to every open store durable (clean shutdown). Tries all of
    /// them; returns the first failure after logging each.
    pub fn flush_all(&self) -> Result<(), CatalogError> {
        let stores: Vec<(String, Arc<LayeredStore>)> = self
            .read_volumes()
            .iter()
            .map(|(id, e)| (id.clone(), Arc::clone(&e.store)))
            .collect();
        let mut first = None;
        for (id, store) in stores {
            match store.flush() {
                Ok(()) => {}
                // Deleted since the list was taken: nothing left to make durable.
                Err(StoreError::VolumeDeleted) => {}
                Err(e) => {
                    error!(volume_id = %id, error = %error_chain(&e), "flushing volume failed");
                    first.get_or_insert(CatalogError::Store {
                        volume_id: id,
                        op: "flush",
                        source: e,
                    });
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Disk space the stores of all healthy volumes really allocate (sparse files, all
    /// layers), as opposed to the thick accounting of [`Catalog::capacity`]. A layer
    /// shared by several stores (hard links, same file) is counted once.
    pub fn allocated_bytes(&self) -> Result<u64, CatalogError> {
        let stores: Vec<(String, Arc<LayeredStore>)> = self
            .read_volumes()
            .iter()
            .map(|(id, e)| (id.clone(), Arc::clone(&e.store)))
            .collect();
        let mut total = 0u64;
        let mut seen = HashSet::new();
        for (id, store) in stores {
            match store.space_used() {
                Ok(u) => {
                    for l in u.layers.iter().filter(|l| seen.insert(l.file_id)) {
                        total = total.saturating_add(l.allocated_bytes);
                    }
                }
                Err(StoreError::VolumeDeleted) => {}
                Err(source) => {
                    return Err(CatalogError::Store {
                        volume_id: id,
                        op: "measure",
                        source,
                    })
                }
            }
        }
        Ok(total)
    }

    /// The live epoch of a stored volume, shared with the data plane; `None` if unknown.
    /// The same `Arc` is returned for the volume's whole life in this process.
    pub fn epoch_handle(&self, volume_id: &str) -> Option<Arc<AtomicU64>> {
        self.read_volumes()
            .get(volume_id)
            .map(|e| Arc::clone(&e.epoch))
    }

    /// The record of a stored volume.
    pub fn get(&self, volume_id: &str) -> Result<VolumeRecord, CatalogError> {
        validate_volume_id(volume_id)?;
        self.read_volumes()
            .get(volume_id)
            .filter(|e| !e.record.deleted)
            .map(Entry::snapshot)
            .ok_or_else(|| CatalogError::NotFound(volume_id.to_string()))
    }

    /// All stored records of live volumes, ordered by volume id.
    pub fn list(&self) -> Vec<VolumeRecord> {
        self.read_volumes()
            .values()
            .filter(|e| !e.record.deleted)
            .map(Entry::snapshot)
            .collect()
    }

    /// Every snapshot stored here with the record of its volume (live or deleted),
    /// ordered by volume id, then oldest first.
    pub fn list_snapshots(&self) -> Vec<(VolumeRecord, SnapshotMeta)> {
        self.read_volumes()
            .values()
            .flat_map(|e| {
                e.record
                    .snapshots
                    .iter()
                    .map(|s| (e.record.clone(), s.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Seals the volume's head under `snapshot_id` and records the snapshot. The
    /// store's seal is the atomic step (see [`LayeredStore::snapshot`]); the record
    /// follows. A crash between the two leaves a sealed layer the record does not
    /// name; the retried call finds the layer (sealing is idempotent per id) and
    /// records it. Repeating a recorded id returns the stored snapshot.
    pub fn create_snapshot(
        &self,
        volume_id: &str,
        snapshot_id: &str,
        name: &str,
        created_unix_nanos: i64,
    ) -> Result<(VolumeRecord, SnapshotMeta), CatalogError> {
        validate_volume_id(volume_id)?;
        validate_volume_id(snapshot_id)?;
        let recorded = |record: &VolumeRecord| {
            record
                .snapshots
                .iter()
                .find(|s| s.snapshot_id == snapshot_id)
                .cloned()
        };
        let store = {
            let _guard = self.lock_mutations();
            let record = self.get(volume_id)?;
            if let Some(s) = recorded(&record) {
                return Ok((record, s));
            }
            // A snapshot now would seal a half-copied volume.
            copy_state::refuse_while_copying(&record)?;
            self.store_of(volume_id)?
        };
        // Sealing flushes the head and waits for the store's other control operations:
        // outside the daemon-wide lock, so other volumes' control calls never wait for
        // it. Sealing is idempotent per id and the record is re-read below.
        store
            .snapshot(snapshot_id)
            .map_err(store_error(volume_id, "snapshot"))?;
        let _guard = self.lock_mutations();
        let mut record = self.get(volume_id)?;
        if let Some(s) = recorded(&record) {
            return Ok((record, s));
        }
        // Deleted again meanwhile by a concurrent DeleteSnapshot of the same id (the
        // controller serialises those; a direct caller may not): nothing to record.
        let Some(sealed) = store.snapshots().into_iter().find(|i| i.id == snapshot_id) else {
            return Err(CatalogError::Store {
                volume_id: volume_id.to_string(),
                op: "snapshot",
                source: StoreError::SnapshotNotFound(snapshot_id.to_string()),
            });
        };
        let meta = SnapshotMeta {
            snapshot_id: snapshot_id.to_string(),
            name: name.to_string(),
            size_bytes: sealed.size_bytes,
            created_unix_nanos: if created_unix_nanos == 0 {
                now_unix_nanos()
            } else {
                created_unix_nanos
            },
        };
        record.snapshots.push(meta.clone());
        record.generation += 1;
        self.persist(&record, "snapshot")?;
        self.replace_record(record.clone());
        info!(volume_id, snapshot_id, "snapshot created");
        Ok((record, meta))
    }

    /// Deletes a snapshot: merges its layer away (I/O continues), then drops it from
    /// the record. Returns whether it existed. The last snapshot of a deleted volume
    /// removes what is left of the volume.
    pub fn delete_snapshot(
        &self,
        volume_id: &str,
        snapshot_id: &str,
    ) -> Result<bool, CatalogError> {
        validate_volume_id(volume_id)?;
        validate_volume_id(snapshot_id)?;
        let (store, sealed) = {
            let _guard = self.lock_mutations();
            let Some(record) = self.read_volumes().get(volume_id).map(Entry::snapshot) else {
                return Ok(false);
            };
            let store = self.store_of(volume_id)?;
            let sealed = store.snapshots().iter().any(|s| s.id == snapshot_id);
            let recorded = record
                .snapshots
                .iter()
                .any(|s| s.snapshot_id == snapshot_id);
            if !sealed && !recorded {
                return Ok(false);
            }
            (store, sealed)
        };
        // The merge reads and rewrites the snapshot's blocks, which takes time in
        // proportion to them: it runs outside the catalog-wide mutation lock (the store
        // serialises its own snapshot operations), so other volumes' control calls
        // never wait for it. The layer is marked deleting first, so a crash mid-merge
        // resumes it at the next open; a concurrent delete of the same snapshot finds
        // it gone once this merge is done.
        if sealed {
            match store.delete_snapshot(snapshot_id) {
                Ok(()) | Err(StoreError::SnapshotNotFound(_)) => {}
                Err(e) => return Err(store_error(volume_id, "delete snapshot")(e)),
            }
        }
        let guard = self.lock_mutations();
        let Some(mut record) = self.read_volumes().get(volume_id).map(Entry::snapshot) else {
            return Ok(sealed);
        };
        if !record
            .snapshots
            .iter()
            .any(|s| s.snapshot_id == snapshot_id)
        {
            return Ok(sealed);
        }
        record.snapshots.retain(|s| s.snapshot_id != snapshot_id);
        record.generation += 1;
        if record.deleted && record.snapshots.is_empty() {
            drop(guard);
            self.remove_volume_dir(volume_id)?;
        } else {
            self.persist(&record, "delete snapshot")?;
            self.replace_record(record);
        }
        info!(volume_id, snapshot_id, "snapshot deleted");
        Ok(true)
    }

    /// The open store of a known volume (live or deleted).
    fn store_of(&self, volume_id: &str) -> Result<Arc<LayeredStore>, CatalogError> {
        self.read_volumes()
            .get(volume_id)
            .map(|e| Arc::clone(&e.store))
            .ok_or_else(|| CatalogError::NotFound(volume_id.to_string()))
    }

    /// Volumes skipped at start because they could not be loaded.
    pub fn quarantined(&self) -> Vec<QuarantinedVolume> {
        self.read_quarantined().values().cloned().collect()
    }

    /// Capacity, use and free space (free is capped by the backing filesystem).
    pub fn capacity(&self) -> Result<CapacityReport, CatalogError> {
        // Thick for the head (a volume may fill its whole size), plus the disk space
        // its sealed layers hold: a snapshot pins the blocks it references, so a volume
        // with snapshots can use up to (snapshots + 1) × its size. A deleted volume
        // kept for its snapshots counts only their layers. A sealed layer shared by
        // several volumes (a local restore's base: hard links of one file) is one
        // file on disk and counts once, whichever volumes still link it.
        let (used_bytes, volume_count) = {
            let volumes = self.read_volumes();
            let mut seen = HashSet::new();
            let used: u64 = volumes
                .values()
                .map(|e| {
                    let head = if e.record.deleted {
                        0
                    } else {
                        e.record.size_bytes
                    };
                    head.saturating_add(sealed_bytes(&e.store, &mut seen))
                })
                .fold(0u64, u64::saturating_add);
            let live = volumes.values().filter(|e| !e.record.deleted).count();
            (used, live)
        };
        let (q_bytes, quarantined_count) = {
            let q = self.read_quarantined();
            (q.values().map(|v| v.data_bytes).sum::<u64>(), q.len())
        };
        let used_bytes = used_bytes.saturating_add(q_bytes);
        let fs = capacity::fs_space(&self.data_dir)
            .map_err(io_error("measure filesystem of", &self.data_dir))?;
        Ok(CapacityReport {
            capacity_bytes: self.capacity_bytes,
            used_bytes,
            free_bytes: self
                .capacity_bytes
                .saturating_sub(used_bytes)
                .min(fs.available_bytes),
            volume_count: u32::try_from(volume_count).unwrap_or(u32::MAX),
            quarantined_count: u32::try_from(quarantined_count).unwrap_or(u32::MAX),
        })
    }

    /// Creates a volume: an empty block store of `size_bytes` and its record, durable
    /// before this returns. Repeating a create with the same name, size and
    /// replication factor returns the stored record; any difference is
    /// [`CatalogError::Conflict`]. On failure nothing is left on disk.
    pub fn create(&self, new: NewVolume) -> Result<CreateOutcome, CatalogError> {
        validate_volume_id(&new.volume_id)?;
        validate_size(new.size_bytes)?;
        copy_state::validate_copy_source(&new)?;
        let qos =
            qos_from_parameters(&new.parameters).map_err(|source| CatalogError::InvalidQos {
                volume_id: new.volume_id.clone(),
                source,
            })?;
        let _guard = self.lock_mutations();
        let id = new.volume_id.clone();

        if let Some(q) = self.read_quarantined().get(&id) {
            return Err(self.quarantined_error(q));
        }
        let existing = self.read_volumes().get(&id).map(Entry::snapshot);
        if let Some(stored) = existing {
            if stored.deleted {
                return Err(CatalogError::HeldBySnapshots(id));
            }
            compare_existing(&stored, &new)?;
            return self
                .refresh_copy_holders(stored, &new)
                .map(|record| CreateOutcome {
                    record,
                    created: false,
                });
        }
        let free = self.capacity()?.free_bytes;
        if new.size_bytes > free {
            return Err(CatalogError::NoCapacity {
                volume_id: id,
                needed: new.size_bytes,
                free,
            });
        }

        let record = VolumeRecord {
            volume_id: id.clone(),
            name: new.name,
            size_bytes: new.size_bytes,
            replication_factor: new.replication_factor,
            replicas: new.replicas,
            parameters: new.parameters,
            epoch: 0,
            generation: 1,
            created_unix_nanos: if new.created_unix_nanos == 0 {
                now_unix_nanos()
            } else {
                new.created_unix_nanos
            },
            attachments: Vec::new(),
            access_type: new.access_type,
            snapshots: Vec::new(),
            deleted: false,
            copy: new
                .copy_source
                .as_ref()
                .map(|src| copy_state::initial_progress(src, false)),
            copy_source: new.copy_source,
        };
        let base = record
            .copy_source
            .as_ref()
            .and_then(|src| self.local_base(src));
        let io = match &self.io {
            Some(io) => Some(VolumeIo::register(io, &id, qos, None)?),
            None => None,
        };
        let mut record = record;
        let store = self.build_volume_dir(&mut record, io.as_ref(), base.as_ref())?;
        match &record.copy_source {
            Some(src) => info!(volume_id = %id, size_bytes = record.size_bytes,
                snapshot_id = %src.snapshot_id, source_volume_id = %src.source_volume_id,
                clone = src.clone,
                shared_layers = record.copy.as_ref().is_some_and(|c| c.shared_layers),
                "volume created; its data is copied from a snapshot"),
            None => info!(volume_id = %id, size_bytes = record.size_bytes, "volume created"),
        }
        self.write_volumes().insert(
            id,
            Entry {
                epoch: Arc::new(AtomicU64::new(record.epoch)),
                record: record.clone(),
                store: Arc::new(store),
                io,
            },
        );
        Ok(CreateOutcome {
            record,
            created: true,
        })
    }

    /// Writes the volume's directory under its staging name, renames it into place and
    /// opens its store there. With a `base` (a restore or clone of a snapshot this
    /// daemon holds), the store shares the snapshot's layers and `record` is marked
    /// so (see [`Self::share_base`]).
    fn build_volume_dir(
        &self,
        record: &mut VolumeRecord,
        io: Option<&VolumeIo>,
        base: Option<&copy_state::LocalBase>,
    ) -> Result<LayeredStore, CatalogError> {
        let volume_id = record.volume_id.clone();
        let id = volume_id.as_str();
        let staging = self.volumes_dir.join(format!("{CREATING_PREFIX}{id}"));
        let target = self.volume_dir(id);
        if staging.exists() {
            // Only possible if an earlier cleanup in this process failed.
            fs::remove_dir_all(&staging).map_err(io_error("remove stale", &staging))?;
        }
        let staged = (|| {
            fs::create_dir(&staging).map_err(mutation_error(id, "create", &staging))?;
            // The store is durable (manifest and its directory fsynced) when create
            // returns. It is closed again at once: it remembers the staging path, and
            // is reopened below under the final one (the manifest names layers by id
            // only, and hard links do not care about paths).
            let store_dir = staging.join(STORE_DIR);
            let shared = match base {
                Some(base) => Self::share_base(record, &store_dir, base)?,
                None => false,
            };
            if !shared {
                drop(
                    LayeredStore::create(&store_dir, record.size_bytes)
                        .map_err(store_error(id, "create"))?,
                );
            }
            let rec = staging.join(RECORD_FILE);
            // write_file also fsyncs `staging`, covering the store directory's entry.
            record::write_file(&rec, record).map_err(mutation_error(id, "create", &rec))?;
            fs::rename(&staging, &target).map_err(mutation_error(id, "create", &target))
        })();
        if let Err(e) = staged {
            if let Err(cleanup) = fs::remove_dir_all(&staging) {
                if cleanup.kind() != io::ErrorKind::NotFound {
                    warn!(path = %staging.display(), error = %cleanup,
                        "cannot remove staging directory of a failed create; it is removed at next start");
                }
            }
            return Err(e);
        }
        let opened = record::sync_dir(&self.volumes_dir)
            .map_err(mutation_error(id, "create", &self.volumes_dir))
            .and_then(|()| {
                let dir = target.join(STORE_DIR);
                match io {
                    Some(io) => io.open_store(&dir),
                    None => LayeredStore::open(&dir),
                }
                .map_err(store_error(id, "open"))
            });
        if opened.is_err() {
            // Not durable or not servable: undo rather than answer success. Should the
            // removal not happen, the next start loads (or quarantines) the volume, and
            // the controller's retried create finds it.
            if let Err(e) = fs::remove_dir_all(&target) {
                warn!(path = %target.display(), error = %e,
                    "cannot remove volume directory of a failed create");
            }
        }
        opened
    }

    /// Creates the store at `store_dir` on `base`'s sealed layers (hard links, no
    /// copy) and marks `record`: `copy.shared_layers` tells the copy task to reconcile
    /// instead of copying. Returns false when sharing is not possible for a reason
    /// of the source (another filesystem, the snapshot being deleted, the source busy
    /// with a merge, ...): logged, and the caller creates an empty store, which the
    /// copy fills over gRPC as for any restore. The new volume's own bad size is an
    /// error.
    fn share_base(
        record: &mut VolumeRecord,
        store_dir: &Path,
        base: &copy_state::LocalBase,
    ) -> Result<bool, CatalogError> {
        let id = record.volume_id.as_str();
        match LayeredStore::create_sharing(
            store_dir,
            &base.store,
            &base.snapshot_id,
            record.size_bytes,
        ) {
            Ok(store) => {
                drop(store);
                if let Some(copy) = record.copy.as_mut() {
                    copy.shared_layers = true;
                    copy.epoch_floor = base.epoch;
                }
                Ok(true)
            }
            Err(e @ StoreError::InvalidSize { .. }) => Err(store_error(id, "create")(e)),
            Err(e) => {
                warn!(volume_id = id, snapshot_id = %base.snapshot_id, error = %error_chain(&e),
                    "cannot share the local snapshot's layers; copying it from its holders instead");
                Ok(false)
            }
        }
    }

    /// Deletes a volume's record and data. Returns whether it existed; an unknown id
    /// is not an error. A quarantined volume is deleted too (the caller asked for it).
    pub fn delete(&self, volume_id: &str) -> Result<bool, CatalogError> {
        validate_volume_id(volume_id)?;
        let guard = self.lock_mutations();
        let retained = self
            .read_volumes()
            .get(volume_id)
            .map(|e| (e.record.clone(), Arc::clone(&e.store)));
        if let Some((mut record, store)) = retained {
            if record.deleted {
                return Ok(false);
            }
            if !record.snapshots.is_empty() {
                // Snapshots outlive their volume: drop the head (open data-plane
                // connections fail from now on), keep the sealed layers and the
                // record, marked deleted.
                store
                    .delete_volume()
                    .map_err(store_error(volume_id, "delete"))?;
                record.deleted = true;
                record.attachments.clear();
                record.generation += 1;
                self.persist(&record, "delete")?;
                self.replace_record(record);
                info!(volume_id, "volume deleted; its snapshots are kept");
                return Ok(true);
            }
        }
        drop(guard);
        self.remove_volume_dir(volume_id)
    }

    /// Removes a volume's directory and forgets it (the whole volume, snapshots
    /// included). Returns whether it existed.
    fn remove_volume_dir(&self, volume_id: &str) -> Result<bool, CatalogError> {
        let _guard = self.lock_mutations();
        let store = self
            .read_volumes()
            .get(volume_id)
            .map(|e| Arc::clone(&e.store));
        let known = store.is_some() || self.read_quarantined().contains_key(volume_id);
        if !known {
            return Ok(false);
        }
        let dir = self.volume_dir(volume_id);
        let doomed = self
            .volumes_dir
            .join(format!("{DELETING_PREFIX}{volume_id}"));
        if doomed.exists() {
            fs::remove_dir_all(&doomed).map_err(io_error("remove stale", &doomed))?;
        }
        // Fence the data plane before the directory moves: requests in flight finish,
        // later ones on open connections fail.
        if let Some(store) = &store {
            store.retire();
        }
        if let Err(e) = fs::rename(&dir, &doomed) {
            self.reopen_after_failed_delete(volume_id);
            return Err(io_error("rename for deletion", &dir)(e));
        }
        if let Err(e) = record::sync_dir(&self.volumes_dir) {
            // Not durable: put it back so memory and disk agree, and report.
            if let Err(back) = fs::rename(&doomed, &dir) {
                error!(volume_id, error = %back,
                    "cannot restore volume directory after a failed delete; it is removed at next start");
                if let Some(io) = self.forget(volume_id) {
                    io.factory.release();
                }
            } else {
                self.reopen_after_failed_delete(volume_id);
            }
            return Err(io_error("sync", &self.volumes_dir)(e));
        }
        // Committed: the .deleting- directory is removed at start if we crash now.
        // Forgetting the entry drops its scheduler handle; the store was retired (its
        // files are closed), so releasing the factory's handle ends the registration
        // even while a connection still holds the retired store.
        if let Some(io) = self.forget(volume_id) {
            io.factory.release();
        }
        if let Err(e) = fs::remove_dir_all(&doomed) {
            warn!(volume_id, path = %doomed.display(), error = %e,
                "cannot remove deleted volume's files; they are removed at next start");
        }
        info!(volume_id, "volume deleted");
        Ok(true)
    }

    /// A delete retired the volume's store but did not happen: serve the volume again
    /// from a freshly opened store, or quarantine it if the store no longer opens.
    /// Caller holds the mutation lock.
    fn reopen_after_failed_delete(&self, volume_id: &str) {
        let mut volumes = self.write_volumes();
        let Some(entry) = volumes.get_mut(volume_id) else {
            return; // quarantined: there was no store to retire
        };
        let dir = self.volume_dir(volume_id).join(STORE_DIR);
        let reopened = match &entry.io {
            Some(io) => io.open_store(&dir),
            None => LayeredStore::open(&dir),
        };
        match reopened {
            Ok(store) => entry.store = Arc::new(store),
            Err(e) => {
                let reason = format!("block store cannot be reopened: {}", error_chain(&e));
                error!(volume_id, %reason, "volume quarantined after a failed delete");
                let data_bytes = entry.record.size_bytes;
                if let Some(io) = volumes.remove(volume_id).and_then(|e| e.io) {
                    io.factory.release();
                }
                drop(volumes);
                self.quarantined
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(
                        volume_id.to_string(),
                        QuarantinedVolume {
                            volume_id: volume_id.to_string(),
                            reason,
                            data_bytes,
                        },
                    );
            }
        }
    }

    /// Drops a volume from memory; returns its scheduler registration, if any.
    fn forget(&self, volume_id: &str) -> Option<VolumeIo> {
        let entry = self.write_volumes().remove(volume_id);
        self.quarantined
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(volume_id);
        entry.and_then(|e| e.io)
    }

    /// Replaces a volume's attachments and parameters if its generation equals
    /// `expected_generation`; returns the new record (generation + 1).
    pub fn update(
        &self,
        volume_id: &str,
        expected_generation: u64,
        attachments: Vec<Attachment>,
        parameters: BTreeMap<String, String>,
    ) -> Result<VolumeRecord, CatalogError> {
        validate_volume_id(volume_id)?;
        let _guard = self.lock_mutations();
        let mut record = self.get(volume_id)?;
        if record.generation != expected_generation {
            return Err(CatalogError::GenerationMismatch {
                volume_id: volume_id.to_string(),
                expected: expected_generation,
                current: record.generation,
            });
        }
        // Checked before anything is written: a record whose QoS cannot be applied is
        // refused rather than stored and then ignored.
        let qos = qos_from_parameters(&parameters).map_err(|source| CatalogError::InvalidQos {
            volume_id: volume_id.to_string(),
            source,
        })?;
        let qos_changed = record.parameters != parameters;
        record.attachments = attachments;
        record.parameters = parameters;
        record.generation += 1;
        self.persist(&record, "update")?;
        self.replace_record(record.clone());
        if qos_changed {
            self.apply_qos(volume_id, qos);
        }
        info!(volume_id, generation = record.generation, "volume updated");
        Ok(record)
    }

    /// Applies a new QoS to the live registration of a volume whose record now asks
    /// for it. Cannot fail in practice (the values were validated); should the
    /// scheduler refuse, the record is durable already, so the error is logged and
    /// shown on `/metrics` rather than failing the update.
    fn apply_qos(&self, volume_id: &str, qos: Qos) {
        let mut volumes = self.write_volumes();
        let Some(io) = volumes.get_mut(volume_id).and_then(|e| e.io.as_mut()) else {
            return;
        };
        match io.handle.set_qos(qos.clone()) {
            Ok(()) => {
                io.qos_error = None;
                info!(volume_id, ?qos, "volume QoS applied");
            }
            Err(e) => {
                let reason = error_chain(&e);
                error!(volume_id, %reason, "cannot apply the volume's new QoS; the previous one stays in force");
                io.qos_error = Some(reason);
            }
        }
    }

    /// Grows a volume to `new_size` bytes if its generation equals
    /// `expected_generation`; returns the new record (generation + 1). A volume
    /// already at `new_size` returns its record as it is (a retried expansion). The
    /// store grows first and the record second: a crash in between leaves a store
    /// larger than the record, which [`Catalog::open`] accepts and the retried
    /// expansion completes (growing a store to its own size is a no-op). Capacity is
    /// thick, so the growth must fit in the free capacity.
    pub fn expand(
        &self,
        volume_id: &str,
        expected_generation: u64,
        new_size: u64,
    ) -> Result<VolumeRecord, CatalogError> {
        validate_volume_id(volume_id)?;
        validate_size(new_size)?;
        let _guard = self.lock_mutations();
        let mut record = self.get(volume_id)?;
        if record.size_bytes == new_size {
            return Ok(record);
        }
        if new_size < record.size_bytes {
            return Err(CatalogError::Shrink {
                volume_id: volume_id.to_string(),
                current: record.size_bytes,
                requested: new_size,
            });
        }
        if record.generation != expected_generation {
            return Err(CatalogError::GenerationMismatch {
                volume_id: volume_id.to_string(),
                expected: expected_generation,
                current: record.generation,
            });
        }
        let growth = new_size - record.size_bytes;
        let free = self.capacity()?.free_bytes;
        if growth > free {
            return Err(CatalogError::NoCapacity {
                volume_id: volume_id.to_string(),
                needed: growth,
                free,
            });
        }
        let store = self
            .read_volumes()
            .get(volume_id)
            .map(|e| Arc::clone(&e.store))
            .ok_or_else(|| CatalogError::NotFound(volume_id.to_string()))?;
        store
            .expand(new_size)
            .map_err(store_error(volume_id, "expand"))?;
        record.size_bytes = new_size;
        record.generation += 1;
        self.persist(&record, "expand")?;
        self.replace_record(record.clone());
        info!(
            volume_id,
            size_bytes = new_size,
            generation = record.generation,
            "volume expanded"
        );
        Ok(record)
    }

    /// Fencing compare-and-set: sets the epoch to `new_epoch` if it equals
    /// `expected_epoch` (and `new_epoch > expected_epoch`). Returns the new epoch.
    pub fn raise_epoch(
        &self,
        volume_id: &str,
        expected_epoch: u64,
        new_epoch: u64,
    ) -> Result<u64, CatalogError> {
        validate_volume_id(volume_id)?;
        if new_epoch <= expected_epoch {
            return Err(CatalogError::EpochNotIncreasing {
                expected: expected_epoch,
                new: new_epoch,
            });
        }
        if new_epoch > crate::seq::MAX_EPOCH {
            return Err(CatalogError::EpochTooLarge { epoch: new_epoch });
        }
        let _guard = self.lock_mutations();
        let record = self.get(volume_id)?;
        if record.epoch != expected_epoch {
            return Err(CatalogError::EpochMismatch {
                volume_id: volume_id.to_string(),
                expected: expected_epoch,
                current: record.epoch,
            });
        }
        self.set_epoch(record, new_epoch)?;
        // Writes of older epochs already admitted by the data plane finish before the
        // raise is answered; later ones see the new epoch and are refused. (An epoch
        // adopted at HELLO is drained by the data plane's handshake itself.)
        if let Ok((store, _)) = self.open_store(volume_id) {
            store.sync_state().drain_older_epochs_blocking();
        }
        info!(volume_id, epoch = new_epoch, "volume epoch raised");
        Ok(new_epoch)
    }

    /// Stores a higher epoch presented by an engine (the data plane's
    /// `VolumeRegistry::adopt_epoch`). Never lowers the epoch; returns the stored one.
    pub fn adopt_epoch(&self, volume_id: &str, epoch: u64) -> Result<u64, CatalogError> {
        validate_volume_id(volume_id)?;
        if epoch > crate::seq::MAX_EPOCH {
            return Err(CatalogError::EpochTooLarge { epoch });
        }
        let _guard = self.lock_mutations();
        let record = self.get(volume_id)?;
        if epoch <= record.epoch {
            return Ok(record.epoch);
        }
        self.set_epoch(record, epoch)?;
        info!(volume_id, epoch, "volume epoch adopted from an engine");
        Ok(epoch)
    }

    /// Persists `record` with `epoch`, then publishes it to memory and the data plane.
    /// Caller holds the mutation lock.
    fn set_epoch(&self, mut record: VolumeRecord, epoch: u64) -> Result<(), CatalogError> {
        record.epoch = epoch;
        self.persist(&record, "raise the epoch of")?;
        let mut volumes = self.write_volumes();
        if let Some(entry) = volumes.get_mut(&record.volume_id) {
            entry.epoch.store(epoch, Ordering::SeqCst);
            entry.record = record;
        }
        Ok(())
    }

    fn persist(&self, record: &VolumeRecord, op: &'static str) -> Result<(), CatalogError> {
        let path = self.volume_dir(&record.volume_id).join(RECORD_FILE);
        record::write_file(&path, record).map_err(mutation_error(&record.volume_id, op, &path))
    }

    fn replace_record(&self, record: VolumeRecord) {
        if let Some(entry) = self.write_volumes().get_mut(&record.volume_id) {
            entry.record = record;
        }
    }

    fn quarantined_error(&self, q: &QuarantinedVolume) -> CatalogError {
        CatalogError::Quarantined {
            volume_id: q.volume_id.clone(),
            reason: q.reason.clone(),
            path: self.volume_dir(&q.volume_id),
        }
    }

    fn lock_mutations(&self) -> MutexGuard<'_, ()> {
        // A panic while holding the lock cannot leave memory inconsistent with disk:
        // memory is only updated after the disk write succeeded.
        self.mutation.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_volumes(&self) -> RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        self.volumes.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_volumes(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Entry>> {
        self.volumes.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_quarantined(&self) -> RwLockReadGuard<'_, BTreeMap<String, QuarantinedVolume>> {
        self.quarantined
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Returns `Ok(())` if a repeated create matches the stored volume, else the conflict.
fn compare_existing(stored: &VolumeRecord, new: &NewVolume) -> Result<(), CatalogError> {
    let mut diffs = Vec::new();
    if stored.size_bytes != new.size_bytes {
        diffs.push(format!(
            "size_bytes {} (requested {})",
            stored.size_bytes, new.size_bytes
        ));
    }
    if stored.name != new.name {
        diffs.push(format!("name {:?} (requested {:?})", stored.name, new.name));
    }
    if stored.replication_factor != new.replication_factor {
        diffs.push(format!(
            "replication_factor {} (requested {})",
            stored.replication_factor, new.replication_factor
        ));
    }
    if let Some(diff) = copy_state::copy_source_difference(&stored.copy_source, &new.copy_source) {
        diffs.push(diff);
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(CatalogError::Conflict {
            volume_id: stored.volume_id.clone(),
            difference: diffs.join(", "),
        })
    }
}

/// Takes the exclusive lock on `<data_dir>/lock` and writes our pid into it.
fn lock_data_dir(data_dir: &Path) -> Result<Flock<File>, CatalogError> {
    let path = data_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_error("open lock file", &path))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let holder = match file.read_to_string(&mut pid) {
                Ok(_) if !pid.trim().is_empty() => format!(" (pid {})", pid.trim()),
                _ => String::new(),
            };
            return Err(CatalogError::Locked {
                path: data_dir.to_path_buf(),
                holder,
            });
        }
        Err((_, errno)) => return Err(io_error("lock", &path)(io::Error::from(errno))),
    };
    // The pid is only for the error message above; failing to write it is harmless
    // but worth knowing.
    let written = (|| {
        lock.set_len(0)?;
        lock.rewind()?;
        writeln!(lock, "{}", std::process::id())?;
        lock.sync_all()
    })();
    if let Err(e) = written {
        warn!(path = %path.display(), error = %e, "cannot record pid in lock file");
    }
    Ok(lock)
}

type Scanned = (BTreeMap<String, Entry>, BTreeMap<String, QuarantinedVolume>);

/// Loads every volume directory, cleaning leftovers of interrupted operations.
fn scan_volumes(volumes_dir: &Path, io: Option<&CatalogIo>) -> Result<Scanned, CatalogError> {
    let mut volumes = BTreeMap::new();
    let mut quarantined = BTreeMap::new();
    let entries = fs::read_dir(volumes_dir).map_err(io_error("read", volumes_dir))?;
    let mut cleaned = false;
    for entry in entries {
        let entry = entry.map_err(io_error("read", volumes_dir))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            warn!(path = %path.display(), "ignoring entry with a non-UTF-8 name in volumes directory");
            continue;
        };
        if name.starts_with(CREATING_PREFIX) || name.starts_with(DELETING_PREFIX) {
            fs::remove_dir_all(&path).map_err(io_error("remove leftover", &path))?;
            warn!(path = %path.display(), "removed leftover of an interrupted create or delete");
            cleaned = true;
            continue;
        }
        if validate_volume_id(&name).is_err() || !path.is_dir() {
            warn!(path = %path.display(), "ignoring unexpected entry in volumes directory");
            continue;
        }
        match load_volume(&path, &name, io) {
            Ok((record, store, io)) => {
                let epoch = Arc::new(AtomicU64::new(record.epoch));
                volumes.insert(
                    name,
                    Entry {
                        record,
                        epoch,
                        store: Arc::new(store),
                        io,
                    },
                );
            }
            Err(reason) => {
                error!(volume_id = %name, path = %path.display(), %reason,
                    "volume skipped: its directory cannot be loaded; left untouched for an operator");
                let data_bytes = quarantined_size(&path);
                quarantined.insert(
                    name.clone(),
                    QuarantinedVolume {
                        volume_id: name,
                        reason,
                        data_bytes,
                    },
                );
            }
        }
    }
    if cleaned {
        record::sync_dir(volumes_dir).map_err(io_error("sync", volumes_dir))?;
    }
    Ok((volumes, quarantined))
}

/// What a quarantined volume is charged against capacity: its recorded size, else the
/// size its store reports, else nothing (logged, since capacity is then overstated).
fn quarantined_size(dir: &Path) -> u64 {
    if let Ok(record) = record::read_file(&dir.join(RECORD_FILE)) {
        return record.size_bytes;
    }
    match LayeredStore::open(&dir.join(STORE_DIR)) {
        Ok(store) => store.size(),
        Err(_) => {
            warn!(path = %dir.display(),
                "size of quarantined volume unknown; it is not counted against capacity");
            0
        }
    }
}

/// Loads one volume directory, registers it with the scheduler (if any) and opens its
/// store; the error is a human-readable reason.
fn load_volume(
    dir: &Path,
    name: &str,
    io: Option<&CatalogIo>,
) -> Result<(VolumeRecord, LayeredStore, Option<VolumeIo>), String> {
    let mut tmp = dir.join(RECORD_FILE).into_os_string();
    tmp.push(record::TEMP_SUFFIX);
    let tmp = PathBuf::from(tmp);
    if tmp.exists() {
        // An interrupted record update: the rename never happened, so `record` still
        // holds the previous, complete version.
        match fs::remove_file(&tmp) {
            Ok(()) => warn!(path = %tmp.display(), "removed leftover temp record"),
            Err(e) => warn!(path = %tmp.display(), error = %e, "cannot remove temp record"),
        }
    }
    let record = record::read_file(&dir.join(RECORD_FILE)).map_err(|e| error_chain(&e))?;
    if record.volume_id != name {
        return Err(format!(
            "record names volume {:?}, not its directory",
            record.volume_id
        ));
    }
    let volume_io = match io {
        Some(io) => {
            let (qos, qos_error) = match qos_from_parameters(&record.parameters) {
                Ok(qos) => (qos, None),
                Err(e) => {
                    let reason = e.to_string();
                    error!(volume_id = name, %reason,
                        "volume record has invalid QoS parameters; serving the volume without limits until an update fixes them");
                    (Qos::unlimited(), Some(reason))
                }
            };
            Some(VolumeIo::register(io, name, qos, qos_error).map_err(|e| error_chain(&e))?)
        }
        None => None,
    };
    let store_dir = dir.join(STORE_DIR);
    let store = match &volume_io {
        Some(vio) => vio.open_store(&store_dir),
        None => LayeredStore::open(&store_dir),
    }
    .map_err(|e| format!("block store cannot be opened: {}", error_chain(&e)))?;
    if record.deleted {
        // Only sealed layers are left; there is no head whose size could disagree.
    } else if store.size() > record.size_bytes {
        // An expansion grew the store and crashed before the record: the data is
        // whole, and the controller's retried ExpandVolume records the size.
        warn!(
            volume_id = name,
            store_bytes = store.size(),
            record_bytes = record.size_bytes,
            "block store is larger than its record (interrupted expansion)"
        );
    } else if store.size() != record.size_bytes {
        return Err(format!(
            "block store holds {} bytes but the record says {}",
            store.size(),
            record.size_bytes
        ));
    }
    Ok((record, store, volume_io))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn open(dir: &Path, capacity: Option<u64>) -> Catalog {
        Catalog::open(CatalogConfig {
            data_dir: dir.to_path_buf(),
            capacity_bytes: capacity,
        })
        .expect("open catalog")
    }

    fn new_volume(id: &str, size: u64) -> NewVolume {
        NewVolume {
            volume_id: id.to_string(),
            name: format!("pv-{id}"),
            size_bytes: size,
            replication_factor: 3,
            parameters: [("fsType".to_string(), "ext4".to_string())].into(),
            ..NewVolume::default()
        }
    }

    fn dir_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn volume_ids_are_validated() {
        for ok in ["a", "pvc-1234", "A.b_c-9", &"x".repeat(128)] {
            assert!(validate_volume_id(ok).is_ok(), "{ok:?} rejected");
        }
        for bad in [
            "",
            ".hidden",
            "..",
            "a/b",
            "a b",
            "é",
            &"x".repeat(129),
            "a\0",
        ] {
            assert!(
                matches!(
                    validate_volume_id(bad),
                    Err(CatalogError::InvalidVolumeId { .. })
                ),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn create_makes_an_empty_store_and_record() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        let out = cat.create(new_volume("v1", 8 * MIB)).expect("create");
        assert!(out.created);
        assert_eq!(out.record.generation, 1);
        assert_eq!(out.record.epoch, 0);
        assert!(out.record.created_unix_nanos > 0);
        let dir = tmp.path().join("volumes/v1");
        assert_eq!(dir_names(&dir), vec!["record", "store"]);
        assert_eq!(
            record::read_file(&dir.join("record")).expect("record"),
            out.record
        );
        assert_eq!(dir_names(&tmp.path().join("volumes")), vec!["v1"]);
        assert_eq!(cat.store_dir("v1"), Some(dir.join("store")));

        let (store, epoch) = cat.open_store("v1").expect("store");
        assert_eq!(store.size(), 8 * MIB);
        assert_eq!(store.dir(), dir.join("store"));
        assert!(Arc::ptr_eq(&epoch, &cat.epoch_handle("v1").expect("epoch")));
        assert!(
            cat.allocated_bytes().expect("allocated") < MIB,
            "a new store must be sparse"
        );
        // The store is the one a reopen finds.
        store.write(4096, &[7u8; 4096], 1).expect("write");
        cat.flush_all().expect("flush");
        drop((store, epoch));
        drop(cat);
        let cat = open(tmp.path(), Some(100 * MIB));
        let (store, _) = cat.open_store("v1").expect("store");
        assert_eq!(store.read(4096, 4096).expect("read"), vec![7u8; 4096]);
        assert!(matches!(
            cat.open_store("nope"),
            Err(CatalogError::NotFound(_))
        ));
    }

    #[test]
    fn delete_retires_the_open_store() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        cat.create(new_volume("v1", MIB)).expect("create");
        let (store, _) = cat.open_store("v1").expect("store");
        store.write(0, &[1u8; 4096], 1).expect("write");
        assert!(cat.delete("v1").expect("delete"));
        assert!(matches!(
            store.write(0, &[2u8; 4096], 2),
            Err(StoreError::VolumeDeleted)
        ));
        assert!(matches!(
            store.read(0, 4096),
            Err(StoreError::VolumeDeleted)
        ));
        assert!(matches!(store.flush(), Err(StoreError::VolumeDeleted)));
        assert!(dir_names(&tmp.path().join("volumes")).is_empty());
        assert!(matches!(
            cat.open_store("v1"),
            Err(CatalogError::NotFound(_))
        ));
        // A new volume under the same id gets a new store; the old handle stays dead.
        cat.create(new_volume("v1", MIB)).expect("recreate");
        let (fresh, _) = cat.open_store("v1").expect("store");
        assert_eq!(fresh.read(0, 4096).expect("read"), vec![0u8; 4096]);
        assert!(store.read(0, 4096).is_err());
        cat.flush_all().expect("flush");
    }

    #[test]
    fn unopenable_store_is_quarantined() {
        let tmp = tempfile::tempdir().expect("tempdir");
        {
            let cat = open(tmp.path(), Some(100 * MIB));
            cat.create(new_volume("good", MIB)).expect("create");
            cat.create(new_volume("bad", 2 * MIB)).expect("create");
        }
        let manifest = tmp.path().join("volumes/bad/store/MANIFEST");
        let mut bytes = fs::read(&manifest).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&manifest, &bytes).expect("corrupt");

        let cat = open(tmp.path(), Some(100 * MIB));
        let ids: Vec<_> = cat.list().into_iter().map(|r| r.volume_id).collect();
        assert_eq!(ids, vec!["good"]);
        let q = cat.quarantined();
        assert_eq!(q.len(), 1);
        assert!(q[0].reason.contains("block store"), "{}", q[0].reason);
        assert_eq!(q[0].data_bytes, 2 * MIB);
        assert!(matches!(
            cat.open_store("bad"),
            Err(CatalogError::Quarantined { .. })
        ));
        assert_eq!(fs::read(&manifest).expect("kept"), bytes);
        assert!(cat.delete("bad").expect("delete"));
        assert_eq!(dir_names(&tmp.path().join("volumes")), vec!["good"]);
    }

    #[test]
    fn create_rejects_bad_sizes_and_ids() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        for size in [0, 1, 4095, 4097] {
            assert!(matches!(
                cat.create(new_volume("v", size)),
                Err(CatalogError::InvalidSize { .. })
            ));
        }
        assert!(matches!(
            cat.create(new_volume(".creating-x", 4096)),
            Err(CatalogError::InvalidVolumeId { .. })
        ));
        assert!(dir_names(&tmp.path().join("volumes")).is_empty());
    }

    #[test]
    fn create_is_idempotent_and_conflicts_name_the_difference() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        let first = cat.create(new_volume("v1", MIB)).expect("create");
        let again = cat.create(new_volume("v1", MIB)).expect("repeat");
        assert!(!again.created);
        assert_eq!(again.record, first.record);

        let err = cat.create(new_volume("v1", 2 * MIB)).expect_err("conflict");
        assert!(matches!(err, CatalogError::Conflict { .. }));
        assert!(err.to_string().contains("size_bytes 1048576"), "{err}");

        let mut other = new_volume("v1", MIB);
        other.name = "someone-else".into();
        other.replication_factor = 2;
        let msg = cat.create(other).expect_err("conflict").to_string();
        assert!(
            msg.contains("name") && msg.contains("replication_factor"),
            "{msg}"
        );
        assert_eq!(cat.list().len(), 1);
    }

    #[test]
    fn delete_removes_everything_and_is_idempotent() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        cat.create(new_volume("v1", MIB)).expect("create");
        assert!(cat.delete("v1").expect("delete"));
        assert!(!cat.delete("v1").expect("delete again"));
        assert!(!cat.delete("never").expect("delete unknown"));
        assert!(matches!(cat.get("v1"), Err(CatalogError::NotFound(_))));
        assert!(dir_names(&tmp.path().join("volumes")).is_empty());
        // The id can be reused.
        cat.create(new_volume("v1", 2 * MIB)).expect("recreate");
    }

    #[test]
    fn update_is_a_generation_cas() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        cat.create(new_volume("v1", MIB)).expect("create");
        let att = vec![Attachment {
            node_id: "n1".into(),
            readonly: false,
        }];
        let params: BTreeMap<_, _> = [("maxIOPS".to_string(), "100".to_string())].into();
        let rec = cat
            .update("v1", 1, att.clone(), params.clone())
            .expect("update");
        assert_eq!(rec.generation, 2);
        assert_eq!(rec.attachments, att);
        assert_eq!(rec.parameters, params);

        let err = cat
            .update("v1", 1, Vec::new(), BTreeMap::new())
            .expect_err("stale generation");
        assert!(matches!(
            err,
            CatalogError::GenerationMismatch { current: 2, .. }
        ));
        assert!(err.to_string().contains("current generation is 2"), "{err}");
        assert_eq!(cat.get("v1").expect("get"), rec);
        assert!(matches!(
            cat.update("nope", 1, Vec::new(), BTreeMap::new()),
            Err(CatalogError::NotFound(_))
        ));
    }

    #[test]
    fn raise_epoch_is_answered_only_after_writes_admitted_under_the_old_epoch() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = Arc::new(open(tmp.path(), Some(100 * MIB)));
        cat.create(new_volume("v1", MIB)).expect("create");
        let (store, _) = cat.open_store("v1").expect("store");
        // A data-plane write admitted under epoch 0 and not yet applied.
        let admitted = store.sync_state().epoch_fence.try_read().expect("fence");
        let (tx, rx) = std::sync::mpsc::channel();
        let raiser = {
            let cat = Arc::clone(&cat);
            std::thread::spawn(move || tx.send(cat.raise_epoch("v1", 0, 1)))
        };
        let handle = cat.epoch_handle("v1").expect("handle");
        while handle.load(Ordering::SeqCst) != 1 {
            std::thread::yield_now();
        }
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "the raise returned while a write of the old epoch was still on its way"
        );
        drop(admitted);
        assert_eq!(rx.recv().expect("answer").expect("raise"), 1);
        raiser.join().expect("raiser").expect("answer channel");
    }

    #[test]
    fn raise_epoch_is_a_cas_shared_with_the_data_plane() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        cat.create(new_volume("v1", MIB)).expect("create");
        let handle = cat.epoch_handle("v1").expect("handle");
        assert_eq!(cat.raise_epoch("v1", 0, 3).expect("raise"), 3);
        assert_eq!(handle.load(Ordering::SeqCst), 3);
        assert_eq!(cat.get("v1").expect("get").epoch, 3);

        let err = cat.raise_epoch("v1", 0, 4).expect_err("stale");
        assert!(err.to_string().contains("current epoch is 3"), "{err}");
        assert!(matches!(
            cat.raise_epoch("v1", 3, 3),
            Err(CatalogError::EpochNotIncreasing { .. })
        ));
        // Epochs a seq cannot carry are refused by both paths, and change nothing.
        assert!(matches!(
            cat.raise_epoch("v1", 3, u64::MAX),
            Err(CatalogError::EpochTooLarge { .. })
        ));
        assert!(matches!(
            cat.adopt_epoch("v1", crate::seq::MAX_EPOCH + 1),
            Err(CatalogError::EpochTooLarge { .. })
        ));
        assert_eq!(cat.get("v1").expect("get").epoch, 3);
        assert!(matches!(
            cat.raise_epoch("v1", 5, 2),
            Err(CatalogError::EpochNotIncreasing { .. })
        ));
        assert!(matches!(
            cat.raise_epoch("nope", 0, 1),
            Err(CatalogError::NotFound(_))
        ));

        // Adopting never lowers, and raises durably.
        assert_eq!(cat.adopt_epoch("v1", 2).expect("adopt lower"), 3);
        assert_eq!(cat.adopt_epoch("v1", 9).expect("adopt higher"), 9);
        assert_eq!(handle.load(Ordering::SeqCst), 9);
        // A raise does not touch the update CAS token.
        assert_eq!(cat.get("v1").expect("get").generation, 1);
        // The handle is the same Arc after an update.
        cat.update("v1", 1, Vec::new(), BTreeMap::new())
            .expect("update");
        assert!(Arc::ptr_eq(&handle, &cat.epoch_handle("v1").expect("h")));
    }

    #[test]
    fn state_survives_reopen() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let expected = {
            let cat = open(tmp.path(), Some(100 * MIB));
            cat.create(new_volume("b", MIB)).expect("create b");
            cat.create(new_volume("a", MIB)).expect("create a");
            cat.create(new_volume("c", MIB)).expect("create c");
            cat.delete("c").expect("delete c");
            cat.raise_epoch("a", 0, 5).expect("raise");
            cat.update(
                "b",
                1,
                vec![Attachment {
                    node_id: "n".into(),
                    readonly: true,
                }],
                BTreeMap::new(),
            )
            .expect("update");
            cat.list()
        };
        let cat = open(tmp.path(), Some(100 * MIB));
        let listed = cat.list();
        assert_eq!(listed, expected);
        let ids: Vec<_> = listed.iter().map(|r| r.volume_id.as_str()).collect();
        assert_eq!(ids, vec!["a", "b"]);
        assert_eq!(cat.epoch_handle("a").expect("a").load(Ordering::SeqCst), 5);
    }

    #[test]
    fn second_open_of_a_locked_dir_fails_clearly() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let first = open(tmp.path(), Some(MIB));
        let err = Catalog::open(CatalogConfig {
            data_dir: tmp.path().to_path_buf(),
            capacity_bytes: Some(MIB),
        })
        .err()
        .expect("second open must fail");
        assert!(matches!(err, CatalogError::Locked { .. }));
        let msg = err.to_string();
        assert!(msg.contains("in use by another tessera-replica"), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        open(tmp.path(), Some(MIB));
    }

    #[test]
    fn leftovers_of_interrupted_operations_are_removed_at_open() {
        let tmp = tempfile::tempdir().expect("tempdir");
        {
            let cat = open(tmp.path(), Some(100 * MIB));
            cat.create(new_volume("keep", MIB)).expect("create");
        }
        let vols = tmp.path().join("volumes");
        fs::create_dir_all(vols.join(".creating-half/sub")).expect("mkdir");
        fs::write(vols.join(".creating-half/data"), b"x").expect("write");
        fs::create_dir_all(vols.join(".deleting-gone")).expect("mkdir");
        fs::write(vols.join("keep/record.tmp"), b"partial").expect("write");

        let cat = open(tmp.path(), Some(100 * MIB));
        assert_eq!(dir_names(&vols), vec!["keep"]);
        assert_eq!(dir_names(&vols.join("keep")), vec!["record", "store"]);
        assert_eq!(cat.list().len(), 1);
    }

    #[test]
    fn corrupt_record_is_quarantined_not_deleted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        {
            let cat = open(tmp.path(), Some(100 * MIB));
            cat.create(new_volume("good", MIB)).expect("create");
            cat.create(new_volume("bad", 2 * MIB)).expect("create");
        }
        let rec = tmp.path().join("volumes/bad/record");
        let mut bytes = fs::read(&rec).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&rec, &bytes).expect("corrupt");

        let cat = open(tmp.path(), Some(100 * MIB));
        assert_eq!(cat.list().len(), 1);
        let q = cat.quarantined();
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].volume_id, "bad");
        assert!(q[0].reason.contains("checksum"), "{}", q[0].reason);
        assert_eq!(fs::read(&rec).expect("still there"), bytes);
        assert!(matches!(cat.get("bad"), Err(CatalogError::NotFound(_))));
        assert!(matches!(
            cat.create(new_volume("bad", 2 * MIB)),
            Err(CatalogError::Quarantined { .. })
        ));
        let report = cat.capacity().expect("capacity");
        assert_eq!(report.used_bytes, 3 * MIB);
        assert_eq!(report.quarantined_count, 1);

        // An explicit delete resolves it.
        assert!(cat.delete("bad").expect("delete"));
        assert!(cat.quarantined().is_empty());
        assert_eq!(dir_names(&tmp.path().join("volumes")), vec!["good"]);
    }

    #[test]
    fn truncated_record_or_missing_store_is_quarantined() {
        let tmp = tempfile::tempdir().expect("tempdir");
        {
            let cat = open(tmp.path(), Some(100 * MIB));
            cat.create(new_volume("short", MIB)).expect("create");
            cat.create(new_volume("nodata", MIB)).expect("create");
        }
        let rec = tmp.path().join("volumes/short/record");
        let bytes = fs::read(&rec).expect("read");
        fs::write(&rec, &bytes[..bytes.len() / 2]).expect("truncate");
        fs::remove_dir_all(tmp.path().join("volumes/nodata/store")).expect("rm");

        let cat = open(tmp.path(), Some(100 * MIB));
        assert!(cat.list().is_empty());
        let q: Vec<_> = cat.quarantined().into_iter().map(|q| q.volume_id).collect();
        assert_eq!(q, vec!["nodata", "short"]);
    }

    #[test]
    fn capacity_is_thick_accounted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(4 * MIB));
        let fs_free = capacity::fs_space(tmp.path())
            .expect("statvfs")
            .available_bytes;
        assert!(fs_free > 4 * MIB, "test needs more than 4 MiB free");

        let r = cat.capacity().expect("capacity");
        assert_eq!(
            (r.capacity_bytes, r.used_bytes, r.free_bytes, r.volume_count),
            (4 * MIB, 0, 4 * MIB, 0)
        );
        cat.create(new_volume("a", 3 * MIB)).expect("create");
        let err = cat.create(new_volume("b", 2 * MIB)).expect_err("full");
        assert!(matches!(err, CatalogError::NoCapacity { .. }));
        assert_eq!(
            err.to_string(),
            format!("volume b needs {} bytes, {} free", 2 * MIB, MIB)
        );
        assert!(!tmp.path().join("volumes/b").exists());
        // Exactly the remaining space fits; a repeat of an existing create needs none.
        cat.create(new_volume("b", MIB)).expect("fits exactly");
        cat.create(new_volume("a", 3 * MIB))
            .expect("idempotent when full");
        assert_eq!(cat.capacity().expect("capacity").free_bytes, 0);
        cat.delete("a").expect("delete");
        let r = cat.capacity().expect("capacity");
        assert_eq!(
            (r.used_bytes, r.free_bytes, r.volume_count),
            (MIB, 3 * MIB, 1)
        );
    }

    #[test]
    fn capacity_counts_snapshot_layers() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        cat.create(new_volume("v", 4 * MIB)).expect("create");
        let store = cat.store_of("v").expect("store");
        store.write(0, &vec![7u8; MIB as usize], 1).expect("write");
        store.flush().expect("flush");
        cat.create_snapshot("v", "s1", "snap", 1).expect("snapshot");
        // The head is still reserved in full; the sealed layer adds its blocks.
        let used = cat.capacity().expect("capacity").used_bytes;
        assert!(
            (5 * MIB..6 * MIB).contains(&used),
            "used {used} after a snapshot of 1 MiB of data"
        );
        // Deleted, the volume keeps only its snapshot's space.
        cat.delete("v").expect("delete");
        let r = cat.capacity().expect("capacity");
        assert!((MIB..2 * MIB).contains(&r.used_bytes), "{}", r.used_bytes);
        assert_eq!(r.volume_count, 0);
        cat.delete_snapshot("v", "s1").expect("delete snapshot");
        assert_eq!(cat.capacity().expect("capacity").used_bytes, 0);
    }

    #[test]
    fn default_capacity_is_the_filesystem_size() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), None);
        let fs = capacity::fs_space(tmp.path()).expect("statvfs");
        let r = cat.capacity().expect("capacity");
        assert_eq!(r.capacity_bytes, fs.total_bytes);
        assert!(r.free_bytes <= r.capacity_bytes);
    }

    #[test]
    fn concurrent_creates_of_one_id_create_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = Arc::new(open(tmp.path(), Some(100 * MIB)));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let cat = Arc::clone(&cat);
                std::thread::spawn(move || cat.create(new_volume("same", MIB)))
            })
            .collect();
        let created = handles
            .into_iter()
            .map(|h| h.join().expect("thread").expect("create"))
            .filter(|o| o.created)
            .count();
        assert_eq!(created, 1);
        assert_eq!(cat.capacity().expect("capacity").used_bytes, MIB);
    }
}
