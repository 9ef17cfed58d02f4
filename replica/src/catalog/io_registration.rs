//! I/O scheduling and QoS. A catalog opened with a [`CatalogIo`] (the daemon's)
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

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use tessera_telemetry::error_chain;
use tracing::{error, info};

use super::{Catalog, CatalogError};
use crate::scheduler::params::qos_from_parameters;
use crate::scheduler::{Qos, Scheduler, VolumeHandle, VolumeStats};
use crate::store::{BlockFileFactory, LayeredStore, ScheduledFileFactory, StoreError};

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
pub(super) struct VolumeIo {
    handle: VolumeHandle,
    factory: Arc<ScheduledFileFactory>,
    /// Why the record's QoS parameters could not be applied (the volume then runs
    /// unlimited); `None` when they were.
    qos_error: Option<String>,
}

impl VolumeIo {
    /// Registers a volume loaded from disk with the QoS its record asks for, or
    /// unlimited (the reason kept for `/metrics`) if its parameters are invalid.
    pub(super) fn register_loaded(
        io: &CatalogIo,
        volume_id: &str,
        parameters: &BTreeMap<String, String>,
    ) -> Result<VolumeIo, CatalogError> {
        let (qos, qos_error) = match qos_from_parameters(parameters) {
            Ok(qos) => (qos, None),
            Err(e) => {
                let reason = e.to_string();
                error!(volume_id, %reason,
                    "volume record has invalid QoS parameters; serving the volume without limits until an update fixes them");
                (Qos::unlimited(), Some(reason))
            }
        };
        Self::register(io, volume_id, qos, qos_error)
    }

    /// Registers `volume_id` with `qos`; the returned factory opens its store's files.
    pub(super) fn register(
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

    /// Ends the registration once a delete committed, even while a connection still
    /// holds the volume's retired store (its files are closed; the factory's handle
    /// is the last one).
    pub(super) fn release(self) {
        self.factory.release();
    }
}

/// The QoS `parameters` ask for; invalid ones are the caller's mistake
/// ([`CatalogError::InvalidQos`]).
pub(super) fn requested_qos(
    volume_id: &str,
    parameters: &BTreeMap<String, String>,
) -> Result<Qos, CatalogError> {
    qos_from_parameters(parameters).map_err(|source| CatalogError::InvalidQos {
        volume_id: volume_id.to_string(),
        source,
    })
}

/// Opens a volume's store through its scheduler registration, or with std file I/O
/// without one.
pub(super) fn open_store(io: Option<&VolumeIo>, dir: &Path) -> Result<LayeredStore, StoreError> {
    match io {
        Some(io) => io.open_store(dir),
        None => LayeredStore::open(dir),
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

impl Catalog {
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

    /// Applies a new QoS to the live registration of a volume whose record now asks
    /// for it. Cannot fail in practice (the values were validated); should the
    /// scheduler refuse, the record is durable already, so the error is logged and
    /// shown on `/metrics` rather than failing the update.
    pub(super) fn apply_qos(&self, volume_id: &str, qos: Qos) {
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
}

#[cfg(test)]
mod tests {
    use crate::catalog::RecordUpdate;
    use std::path::Path;

    use super::*;
    use crate::catalog::test_support::{new_volume, MIB};
    use crate::catalog::{CatalogConfig, RECORD_FILE};
    use crate::record;
    use crate::scheduler::{EngineKind, SchedulerConfig};

    /// A catalog whose volumes are registered with a scheduler of its own. Needs a
    /// tokio runtime (the scheduler's timer task).
    fn open_scheduled(dir: &Path) -> Catalog {
        let scheduler = Scheduler::new(SchedulerConfig {
            name: "catalog-test".into(),
            engine: EngineKind::Sync { threads: 1 },
            ..SchedulerConfig::default()
        })
        .expect("scheduler");
        Catalog::open_with_io(
            CatalogConfig {
                data_dir: dir.to_path_buf(),
                capacity_bytes: Some(100 * MIB),
            },
            Some(CatalogIo {
                scheduler: Arc::new(scheduler),
                direct: false,
            }),
        )
        .expect("open catalog")
    }

    fn max_iops(value: &str) -> BTreeMap<String, String> {
        [("maxIOPS".to_string(), value.to_string())].into()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn volumes_run_with_their_records_qos_and_updates_apply_live() {
        tokio::task::spawn_blocking(|| {
            let tmp = tempfile::tempdir().expect("tempdir");
            let cat = open_scheduled(tmp.path());
            let mut new = new_volume("v1", MIB);
            new.parameters = max_iops("100");
            cat.create(new).expect("create");
            let reports = cat.io_reports();
            assert_eq!(reports.len(), 1);
            assert_eq!(
                (reports[0].qos.max_iops, reports[0].qos_error.clone()),
                (Some(100), None)
            );
            let handle = cat.volume_handle("v1").expect("registration");
            cat.update(
                "v1",
                1,
                RecordUpdate {
                    attachments: Vec::new(),
                    parameters: max_iops("200"),
                    replicas: None,
                },
            )
            .expect("update");
            assert_eq!(handle.qos().max_iops, Some(200));
            // The store's I/O goes through the registration.
            let (store, _) = cat.open_store("v1").expect("store");
            let before = handle.stats().completed_ops;
            store.write(0, &[1u8; 4096], 1).expect("write");
            assert!(handle.stats().completed_ops > before);
            drop((store, handle));

            // A record holding invalid QoS loads unlimited, with the reason, and is
            // served until an update fixes it.
            let path = tmp.path().join("volumes/v1").join(RECORD_FILE);
            let mut rec = record::read_file(&path).expect("record");
            rec.parameters = max_iops("lots");
            record::write_file(&path, &rec).expect("write record");
            drop(cat);
            let cat = open_scheduled(tmp.path());
            let report = cat.io_reports().remove(0);
            assert_eq!(report.qos, Qos::unlimited());
            assert!(
                report
                    .qos_error
                    .as_deref()
                    .is_some_and(|e| e.contains("maxIOPS")),
                "{report:?}"
            );
            assert!(cat.open_store("v1").is_ok());
            cat.update(
                "v1",
                rec.generation,
                RecordUpdate {
                    attachments: Vec::new(),
                    parameters: max_iops("50"),
                    replicas: None,
                },
            )
            .expect("fix");
            let report = cat.io_reports().remove(0);
            assert_eq!((report.qos.max_iops, report.qos_error), (Some(50), None));

            // A delete ends the registration.
            assert!(cat.delete("v1").expect("delete"));
            assert!(cat.io_reports().is_empty());
            assert!(cat.volume_handle("v1").is_none());
        })
        .await
        .expect("blocking task");
    }
}
