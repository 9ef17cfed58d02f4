//! The CSI Controller service: volume life cycle, publish/unpublish with fencing,
//! listing and capacity.
//!
//! Every mutating call takes the volume's keyed lock, then talks to the volume's
//! replicas (in parallel, each call under a deadline) and succeeds only when a
//! majority confirmed. The index is updated after the replicas, never before, so a
//! crash in between loses nothing: the next start rebuilds the index from the records.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tessera_csi_proto::v1::controller_server::Controller;
use tessera_csi_proto::v1::controller_service_capability::rpc::Type as RpcType;
use tessera_csi_proto::v1::controller_service_capability::{Rpc, Type as CapType};
use tessera_csi_proto::v1::{self as csi, Topology, TopologyRequirement, VolumeCondition};
use tessera_csi_proto::{TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY};
use tessera_replica_protocol::control_proto::{
    Attachment, CreateVolumeRequest, ExpandVolumeRequest, RaiseEpochRequest, ReplicaRef,
    UpdateVolumeRequest, VolumeRecord,
};
use tonic::{Code, Request, Response, Status};

use crate::capabilities::{self, RequestedAccess};
use crate::capacity::{self, BLOCK_SIZE};
use crate::error::ControllerError;
use crate::fs_type::MinVolumeSize;
use crate::locks::KeyedLocks;
use crate::metrics::Metrics;
use crate::parameters::{self, DataLocality, VolumeParameters};
use crate::placement::{self, Candidate, PlacementRequest};
use crate::publish::{self, majority, PublishDecision};
use crate::replica_pool::{join_all, ReplicaPool};
use crate::restore::{self, RequestedSource};
use crate::snapshots::{self, FoundSnapshot};
use crate::volume_index::{self, is_volume_id, newer, volume_id_for_name, VolumeIndex};
use tessera_replica_protocol::seq::Epoch;

/// Prefix of ListSnapshots tokens.
const SNAPSHOT_TOKEN_PREFIX: &str = "s1-";

pub use crate::snapshots::snapshot_id_for_name;

/// How often a compare-and-set round is retried after losing a race.
const CAS_ATTEMPTS: usize = 5;

/// How long a CreateVolume with a content source waits for the copy by default
/// before it answers ABORTED with the progress (the CO retries).
pub const DEFAULT_COPY_WAIT: Duration = Duration::from_secs(8);

/// Settings of the controller service that do not come from the replicas.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Node ids volumes may be published to besides the replica daemons' nodes
    /// (compute-only nodes).
    pub extra_nodes: BTreeSet<String>,
    /// How long CreateVolume waits for a restore or clone to be copied on every
    /// replica before answering ABORTED with the progress (`--copy-wait`).
    pub copy_wait: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            extra_nodes: BTreeSet::new(),
            copy_wait: DEFAULT_COPY_WAIT,
        }
    }
}

/// Implements `csi.v1.Controller` over a pool of replica daemons.
#[derive(Debug, Clone)]
pub struct ControllerService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: Arc<ReplicaPool>,
    index: Arc<VolumeIndex>,
    locks: KeyedLocks,
    cfg: ControllerConfig,
    metrics: Arc<Metrics>,
    /// Set while a background sweep of internal clone snapshots runs.
    sweeping: AtomicBool,
}

type Result<T, E = ControllerError> = std::result::Result<T, E>;

/// Loads every record from every live daemon into a fresh index (highest generation
/// wins); returns the index and how many daemons could not be listed.
pub async fn load_index(pool: &ReplicaPool) -> (VolumeIndex, usize) {
    let live = pool.live();
    let lists = join_all(live.iter().map(|(addr, _)| pool.list_volumes(addr))).await;
    let mut failed = 0;
    let index = VolumeIndex::default();
    for ((addr, _), r) in live.iter().zip(lists) {
        match r {
            Ok(records) => records.into_iter().for_each(|rec| index.merge(rec)),
            Err(e) => {
                failed += 1;
                tracing::warn!(address = %addr, error = %e.message(), "listing volumes of replica daemon failed");
            }
        }
    }
    (index, failed)
}

/// What the replicas of one volume answered to GetVolume.
pub(crate) struct Reads {
    /// Per replica in record order: its current reference and its answer.
    pub(crate) answers: Vec<(ReplicaRef, std::result::Result<VolumeRecord, Status>)>,
}

impl Reads {
    fn ok(&self) -> impl Iterator<Item = (&ReplicaRef, &VolumeRecord)> {
        self.answers
            .iter()
            .filter_map(|(r, a)| a.as_ref().ok().map(|rec| (r, rec)))
    }
    pub(crate) fn ok_count(&self) -> usize {
        self.ok().count()
    }
    pub(crate) fn freshest(&self) -> Option<VolumeRecord> {
        self.ok()
            .map(|(_, r)| r)
            .fold(None, |best: Option<&VolumeRecord>, r| match best {
                Some(b) if !newer(r, b) => Some(b),
                _ => Some(r),
            })
            .cloned()
    }
    fn max_epoch(&self) -> u64 {
        self.ok().map(|(_, r)| r.epoch).max().unwrap_or(0)
    }
    /// The epoch a restore sharing its source's layers must exceed (`epoch_floor`).
    fn max_epoch_floor(&self) -> u64 {
        self.ok()
            .filter_map(|(_, r)| r.copy.as_ref().map(|c| c.epoch_floor))
            .max()
            .unwrap_or(0)
    }
    fn not_found(&self) -> usize {
        self.answers
            .iter()
            .filter(|(_, a)| a.as_ref().is_err_and(|e| e.code() == Code::NotFound))
            .count()
    }
    fn failures(&self) -> String {
        let v: Vec<String> = self
            .answers
            .iter()
            .filter_map(|(r, a)| {
                a.as_ref()
                    .err()
                    .map(|e| format!("{} ({}): {}", r.node_id, r.control_address, e.message()))
            })
            .collect();
        v.join("; ")
    }
}

/// Topology constraints of a CreateVolume, reduced to what placement uses.
#[derive(Debug, Default)]
struct TopologyRequest {
    requisite: Vec<Topology>,
    allowed_zones: Option<BTreeSet<String>>,
    preferred_node: Option<String>,
}

impl TopologyRequest {
    fn from_csi(req: Option<&TopologyRequirement>) -> Self {
        let Some(req) = req else {
            return Self::default();
        };
        // Zones restrict placement only if every requisite segment names one; a segment
        // without a zone allows any zone.
        let zones: Option<BTreeSet<String>> = if req.requisite.is_empty() {
            None
        } else {
            req.requisite
                .iter()
                .map(|t| t.segments.get(TOPOLOGY_ZONE_KEY).cloned())
                .collect()
        };
        let preferred_node = req
            .preferred
            .iter()
            .find_map(|t| t.segments.get(TOPOLOGY_NODE_KEY).cloned());
        Self {
            requisite: req.requisite.clone(),
            allowed_zones: zones,
            preferred_node,
        }
    }
}

fn required(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(ControllerError::InvalidArgument(format!(
            "{field} is required"
        )));
    }
    Ok(())
}

/// Now, in nanoseconds since the Unix epoch (record timestamps).
pub(crate) fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn size_i64(size: u64) -> i64 {
    i64::try_from(size).unwrap_or(i64::MAX)
}

impl ControllerService {
    /// A service over `pool` with an already loaded `index` (see [`load_index`]).
    pub fn new(
        pool: Arc<ReplicaPool>,
        index: Arc<VolumeIndex>,
        cfg: ControllerConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                index,
                locks: KeyedLocks::default(),
                cfg,
                metrics,
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    fn finish<T>(
        &self,
        method: &'static str,
        r: Result<T>,
    ) -> std::result::Result<Response<T>, Status> {
        let code = r.as_ref().map(|_| Code::Ok).unwrap_or_else(|e| e.code());
        self.inner.metrics.observe_rpc(method, code);
        match r {
            Ok(v) => Ok(Response::new(v)),
            Err(e) => {
                // Replica trouble and lost races need an operator's eye; bad requests
                // are the caller's business.
                let operator = matches!(code, Code::Unavailable | Code::Internal | Code::Aborted)
                    && !matches!(e, ControllerError::InvalidToken(_));
                if operator {
                    tracing::warn!(method, error = %e, "CSI call failed");
                } else {
                    tracing::debug!(method, error = %e, "CSI call rejected");
                }
                Err(e.into())
            }
        }
    }

    pub(crate) fn pool(&self) -> &ReplicaPool {
        &self.inner.pool
    }

    pub(crate) fn index(&self) -> &VolumeIndex {
        &self.inner.index
    }

    /// Per-volume locks; every call that changes a volume holds its key.
    pub(crate) fn locks(&self) -> &KeyedLocks {
        &self.inner.locks
    }

    /// How long CreateVolume waits for a copy (`--copy-wait`).
    pub(crate) fn copy_wait(&self) -> Duration {
        self.inner.cfg.copy_wait
    }

    /// Node ids a volume may be published to.
    fn known_nodes(&self) -> BTreeSet<String> {
        let mut n = self.pool().known_node_ids();
        n.extend(self.inner.cfg.extra_nodes.iter().cloned());
        n
    }

    /// The record of `volume_id`: from the index, else from any live daemon (lazy
    /// refresh after another controller instance or a daemon that was down at start).
    pub(crate) async fn lookup(&self, volume_id: &str) -> Option<VolumeRecord> {
        if let Some(r) = self.index().get(volume_id) {
            return Some(r);
        }
        if !is_volume_id(volume_id) {
            return None;
        }
        let live = self.pool().live();
        let answers = join_all(
            live.iter()
                .map(|(addr, _)| self.pool().get_volume(addr, volume_id)),
        )
        .await;
        let found = answers
            .into_iter()
            .filter_map(|a| a.ok())
            .filter(|r| r.volume_id == volume_id)
            .fold(None, |best: Option<VolumeRecord>, r| match best {
                Some(b) if !newer(&r, &b) => Some(b),
                _ => Some(r),
            })?;
        self.index().merge(found.clone());
        Some(found)
    }

    /// GetVolume on every replica of `rec`, in parallel.
    pub(crate) async fn read_replicas(&self, rec: &VolumeRecord) -> Reads {
        let refs: Vec<ReplicaRef> = rec
            .replicas
            .iter()
            .map(|r| self.pool().resolve_ref(r))
            .collect();
        let answers = join_all(
            refs.iter()
                .map(|r| self.pool().get_volume(&r.control_address, &rec.volume_id)),
        )
        .await;
        Reads {
            answers: refs.into_iter().zip(answers).collect(),
        }
    }

    fn volume(&self, rec: &VolumeRecord, requisite: &[Topology]) -> csi::Volume {
        let accessible_topology = if requisite.is_empty() {
            self.known_nodes()
                .into_iter()
                .map(|n| Topology {
                    segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_string(), n)]),
                })
                .collect()
        } else {
            requisite.to_vec()
        };
        csi::Volume {
            capacity_bytes: size_i64(rec.size_bytes),
            volume_id: rec.volume_id.clone(),
            volume_context: rec.parameters.clone(),
            content_source: rec.copy_source.as_ref().map(restore::content_source),
            accessible_topology,
        }
    }

    /// Volume condition judged from the pool's liveness view (no RPCs).
    fn condition_from_liveness(&self, rec: &VolumeRecord) -> VolumeCondition {
        let live = rec
            .replicas
            .iter()
            .filter(|r| self.pool().is_live(r))
            .count();
        condition(live, rec.replicas.len(), "reachable")
    }

    async fn do_create(&self, req: csi::CreateVolumeRequest) -> Result<csi::CreateVolumeResponse> {
        required("name", &req.name)?;
        let access = capabilities::validate_all(&req.volume_capabilities)?;
        let source = RequestedSource::from_csi(req.volume_content_source.as_ref())?;
        // A VolumeAttributesClass's parameters arrive as mutable_parameters and win over
        // the StorageClass's for the keys they name.
        let params = if req.mutable_parameters.is_empty() {
            VolumeParameters::parse(&req.parameters)?
        } else {
            parameters::check_mutable(&req.mutable_parameters)?;
            let mut merged = req.parameters.clone();
            merged.extend(req.mutable_parameters.clone());
            VolumeParameters::parse(&merged)?
        };
        let fs_type = match (params.fs_type, access.fs_type) {
            (Some(p), Some(c)) if p != c => {
                return Err(ControllerError::InvalidArgument(format!(
                    "parameter fsType={p} conflicts with the mount capability's fs_type {c}"
                )))
            }
            (p, c) => p.or(c).unwrap_or_default(),
        };
        // A volume that may be mounted is never smaller than its filesystem's minimum
        // (rounded up if the limit allows, else OUT_OF_RANGE), so mkfs never fails at
        // stage time. A restore or clone takes its size from the source (checked, with
        // the same minimum, once the source is found); the range is validated here
        // either way, before anything is created.
        let filesystem = access.filesystem(fs_type);
        let size = match source {
            None => capacity::resolve_size_for(req.capacity_range.as_ref(), filesystem)?,
            Some(_) => capacity::resolve_size(req.capacity_range.as_ref())?,
        };
        let topo = TopologyRequest::from_csi(req.accessibility_requirements.as_ref());
        let param_map = params.to_map(fs_type);
        let volume_id = self
            .index()
            .get_by_name(&req.name)
            .map(|r| r.volume_id)
            .unwrap_or_else(|| volume_id_for_name(&req.name));

        let _guard = self.inner.locks.lock(&volume_id).await;
        if let Some(existing) = self.lookup(&volume_id).await {
            self.check_compatible(&existing, &req, &access, &param_map, &topo)?;
            if !restore::same_source(source.as_ref(), existing.copy_source.as_ref()) {
                return Err(ControllerError::AlreadyExists(format!(
                    "volume {:?} exists with another content source",
                    req.name
                )));
            }
            let rec = self.complete_create(existing).await?;
            let rec = self.finish_copy(rec).await?;
            return Ok(csi::CreateVolumeResponse {
                volume: Some(self.volume(&rec, &topo.requisite)),
            });
        }
        let (size, copy_source, source_guards, holder_daemons) = match &source {
            None => (size, None, Vec::new(), Vec::new()),
            Some(s) => {
                let p = self
                    .prepare_copy(s, &volume_id, req.capacity_range.as_ref(), filesystem)
                    .await?;
                (p.size, Some(p.copy), p.guards, p.holder_daemons)
            }
        };
        let preferred = match params.data_locality {
            DataLocality::BestEffort => topo.preferred_node.as_deref(),
            DataLocality::Disabled => None,
        };
        let create = CreateVolumeRequest {
            volume_id: volume_id.clone(),
            name: req.name.clone(),
            size_bytes: size,
            replication_factor: params.replication_factor,
            replicas: Vec::new(),
            parameters: param_map,
            created_unix_nanos: now_nanos(),
            access_type: access.record_access_type().to_string(),
            copy_source: copy_source.clone(),
        };
        let created = self
            .place_and_create(
                create,
                topo.allowed_zones.as_ref(),
                preferred,
                &holder_daemons,
            )
            .await;
        // The new volume is in the index (or nothing was created): the source may
        // change again while the copy runs.
        drop(source_guards);
        let rec = match created {
            Ok(rec) => rec,
            Err(e) => {
                if let Some(copy) = copy_source.filter(|c| c.clone) {
                    self.drop_internal_snapshot(&copy.snapshot_id).await;
                }
                return Err(e);
            }
        };
        let rec = self.finish_copy(rec).await?;
        Ok(csi::CreateVolumeResponse {
            volume: Some(self.volume(&rec, &topo.requisite)),
        })
    }

    /// Places the replicas of the new volume `create` describes (its `replicas` are
    /// filled in here; `preferred_daemons` first where zones allow) and creates them:
    /// a majority must succeed, a failed attempt is rolled back.
    async fn place_and_create(
        &self,
        mut create: CreateVolumeRequest,
        allowed_zones: Option<&BTreeSet<String>>,
        preferred_node: Option<&str>,
        preferred_daemons: &[String],
    ) -> Result<VolumeRecord> {
        self.pool().refresh_infos().await;
        let live = self.pool().live();
        let candidates: Vec<Candidate> = live
            .iter()
            .map(|(addr, info)| Candidate {
                daemon_id: placement::daemon_id(&info.node_id, addr),
                node_id: info.node_id.clone(),
                zone: info.zone.clone(),
                free_bytes: info.free_bytes,
            })
            .collect();
        let chosen = placement::place(
            &candidates,
            &PlacementRequest {
                volume_id: &create.volume_id,
                size_bytes: create.size_bytes,
                replication_factor: create.replication_factor as usize,
                allowed_zones,
                preferred_node,
                preferred_daemons,
            },
        )?;
        let replicas: Vec<ReplicaRef> = chosen
            .iter()
            .map(|&i| {
                let (addr, info) = &live[i];
                ReplicaRef {
                    node_id: info.node_id.clone(),
                    zone: info.zone.clone(),
                    control_address: addr.clone(),
                    data_address: info.data_address.clone(),
                }
            })
            .collect();
        create.replicas = replicas;
        let rec = self.create_on_replicas(&create, true).await?;
        tracing::info!(
            volume = %create.volume_id,
            name = %create.name,
            size = create.size_bytes,
            nodes = ?create.replicas.iter().map(|r| &r.node_id).collect::<Vec<_>>(),
            source = ?create.copy_source.as_ref().map(restore::describe),
            "volume created"
        );
        Ok(rec)
    }

    fn check_compatible(
        &self,
        existing: &VolumeRecord,
        req: &csi::CreateVolumeRequest,
        access: &RequestedAccess,
        param_map: &HashMap<String, String>,
        topo: &TopologyRequest,
    ) -> Result<()> {
        let name = &req.name;
        if existing.name != *name {
            return Err(ControllerError::Internal(format!(
                "volume id {} of name {name:?} is held by volume {:?}",
                existing.volume_id, existing.name
            )));
        }
        if !capacity::satisfies(existing.size_bytes, req.capacity_range.as_ref())? {
            return Err(ControllerError::AlreadyExists(format!(
                "volume {name:?} exists with {} bytes, outside the requested capacity range",
                existing.size_bytes
            )));
        }
        if existing.parameters != *param_map {
            return Err(ControllerError::AlreadyExists(format!(
                "volume {name:?} exists with different parameters"
            )));
        }
        if !access.compatible_with(&existing.access_type) {
            return Err(ControllerError::AlreadyExists(format!(
                "volume {name:?} exists with access type {:?}, incompatible with the requested capabilities",
                existing.access_type
            )));
        }
        if let Some(zones) = &topo.allowed_zones {
            if existing.replicas.iter().any(|r| !zones.contains(&r.zone)) {
                return Err(ControllerError::AlreadyExists(format!(
                    "volume {name:?} exists with replicas outside the requested zones"
                )));
            }
        }
        Ok(())
    }

    /// Finishes a creation a crashed controller left on some replicas: re-sends the
    /// idempotent CreateVolume to every replica of a volume that was never published
    /// (once published, a missing replica holds no data and is a rebuild's job).
    async fn complete_create(&self, rec: VolumeRecord) -> Result<VolumeRecord> {
        if rec.epoch != 0 || !rec.attachments.is_empty() {
            return Ok(rec);
        }
        let create = CreateVolumeRequest {
            volume_id: rec.volume_id.clone(),
            name: rec.name.clone(),
            size_bytes: rec.size_bytes,
            replication_factor: rec.replication_factor,
            replicas: rec.replicas.clone(),
            parameters: rec.parameters.clone(),
            created_unix_nanos: rec.created_unix_nanos,
            access_type: rec.access_type.clone(),
            // The same source again: a replica that missed the first create starts
            // its copy, the others answer with their record.
            copy_source: rec.copy_source.clone(),
        };
        let created = self.create_on_replicas(&create, false).await?;
        Ok(if newer(&rec, &created) { rec } else { created })
    }

    /// CreateVolume on every replica in parallel; a majority must succeed. With
    /// `rollback`, a failed attempt deletes what it created.
    async fn create_on_replicas(
        &self,
        create: &CreateVolumeRequest,
        rollback: bool,
    ) -> Result<VolumeRecord> {
        let refs: Vec<ReplicaRef> = create
            .replicas
            .iter()
            .map(|r| self.pool().resolve_ref(r))
            .collect();
        let results = join_all(refs.iter().map(|r| {
            self.pool()
                .create_volume(&r.control_address, create.clone())
        }))
        .await;
        let need = majority(refs.len());
        let ok: Vec<&VolumeRecord> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        let failures: Vec<(&ReplicaRef, &Status)> = refs
            .iter()
            .zip(&results)
            .filter_map(|(r, res)| res.as_ref().err().map(|e| (r, e)))
            .collect();
        let describe = || {
            failures
                .iter()
                .map(|(r, e)| format!("{}: {}", r.node_id, e.message()))
                .collect::<Vec<_>>()
                .join("; ")
        };
        if ok.len() >= need {
            if !failures.is_empty() {
                tracing::warn!(volume = %create.volume_id, failed = %describe(), "volume created on a majority only");
            }
            let best = ok
                .into_iter()
                .fold(None, |b: Option<&VolumeRecord>, r| match b {
                    Some(b) if !newer(r, b) => Some(b),
                    _ => Some(r),
                });
            let rec = best.cloned().ok_or_else(|| {
                ControllerError::Internal("no replica record after create".into())
            })?;
            self.index().upsert(rec.clone());
            return Ok(rec);
        }
        if rollback {
            let created: Vec<&ReplicaRef> = refs
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_ok())
                .map(|(r, _)| r)
                .collect();
            let undo = join_all(created.iter().map(|r| {
                self.pool()
                    .delete_volume(&r.control_address, &create.volume_id)
            }))
            .await;
            for (r, u) in created.iter().zip(undo) {
                if let Err(e) = u {
                    tracing::warn!(volume = %create.volume_id, node = %r.node_id, error = %e.message(), "rolling back a replica failed");
                }
            }
        }
        let msg = format!(
            "volume {} created on {} of {} replicas, a majority ({need}) is needed: {}",
            create.volume_id,
            results.len() - failures.len(),
            refs.len(),
            describe()
        );
        if failures
            .iter()
            .any(|(_, e)| e.code() == Code::ResourceExhausted)
        {
            Err(ControllerError::ResourceExhausted(msg))
        } else if failures
            .iter()
            .any(|(_, e)| e.code() == Code::AlreadyExists)
        {
            Err(ControllerError::AlreadyExists(msg))
        } else {
            Err(ControllerError::Unavailable(msg))
        }
    }

    async fn do_delete(&self, req: csi::DeleteVolumeRequest) -> Result<csi::DeleteVolumeResponse> {
        required("volume_id", &req.volume_id)?;
        let _guard = self.inner.locks.lock(&req.volume_id).await;
        let Some(rec) = self.lookup(&req.volume_id).await else {
            return Ok(csi::DeleteVolumeResponse {});
        };
        if let Some(a) = rec.attachments.first() {
            return Err(ControllerError::FailedPrecondition(format!(
                "volume {} is published to node {}; unpublish it first",
                rec.volume_id, a.node_id
            )));
        }
        let refs: Vec<ReplicaRef> = rec
            .replicas
            .iter()
            .map(|r| self.pool().resolve_ref(r))
            .collect();
        let results = join_all(refs.iter().map(|r| {
            self.pool()
                .delete_volume(&r.control_address, &rec.volume_id)
        }))
        .await;
        let failed: Vec<String> = refs
            .iter()
            .zip(&results)
            .filter_map(|(r, res)| {
                res.as_ref()
                    .err()
                    .map(|e| format!("{}: {}", r.node_id, e.message()))
            })
            .collect();
        if !failed.is_empty() {
            return Err(ControllerError::Unavailable(format!(
                "volume {} not yet deleted on every replica: {}",
                rec.volume_id,
                failed.join("; ")
            )));
        }
        self.index().remove(&rec.volume_id);
        tracing::info!(volume = %rec.volume_id, name = %rec.name, "volume deleted");
        if let Some(copy) = rec.copy_source.as_ref().filter(|c| c.clone) {
            // A clone deleted before its copy finished leaves its internal snapshot.
            self.drop_internal_snapshot(&copy.snapshot_id).await;
        }
        Ok(csi::DeleteVolumeResponse {})
    }

    async fn do_publish(
        &self,
        req: csi::ControllerPublishVolumeRequest,
    ) -> Result<csi::ControllerPublishVolumeResponse> {
        required("volume_id", &req.volume_id)?;
        required("node_id", &req.node_id)?;
        let cap = req.volume_capability.as_ref().ok_or_else(|| {
            ControllerError::InvalidArgument("volume_capability is required".into())
        })?;
        let access = capabilities::validate_one(cap)?;
        let _guard = self.inner.locks.lock(&req.volume_id).await;
        let rec = self
            .lookup(&req.volume_id)
            .await
            .ok_or_else(|| ControllerError::VolumeNotFound(req.volume_id.clone()))?;
        if !access.compatible_with(&rec.access_type) {
            return Err(ControllerError::InvalidArgument(format!(
                "volume {} was created with access type {:?}; the capability asks for another",
                rec.volume_id, rec.access_type
            )));
        }
        if !self.known_nodes().contains(&req.node_id) {
            return Err(ControllerError::NodeNotFound(req.node_id.clone()));
        }
        let reads = self.read_replicas(&rec).await;
        let cur = self.quorum_record(&rec, &reads)?;
        let (epoch, rec) = match publish::decide_publish(
            &cur.attachments,
            &req.node_id,
            req.readonly,
        ) {
            PublishDecision::AlreadyPublished => {
                let epoch = reads.max_epoch();
                // Make sure the attachment is on a majority (a previous attempt may have
                // recorded it on fewer).
                let rec = self.update_attachments(&rec, |_| None).await?;
                (epoch.max(rec.epoch), rec)
            }
            PublishDecision::IncompatibleRepublish => {
                return Err(ControllerError::AlreadyExists(format!(
                    "volume {} is already published to node {} with readonly={}",
                    rec.volume_id, req.node_id, !req.readonly
                )))
            }
            PublishDecision::PublishedElsewhere(node) => {
                return Err(ControllerError::FailedPrecondition(format!(
                    "volume {} is published to node {node}; Tessera volumes are single-node",
                    rec.volume_id
                )))
            }
            PublishDecision::Attach => {
                // Epoch first, attachment second: a crash in between leaves no
                // attachment, so the retry raises again and no two engines ever share
                // an epoch.
                let epoch = self.raise_epoch(&rec).await?;
                let node = req.node_id.clone();
                let readonly = req.readonly;
                let rec = self
                    .update_attachments(&rec, move |att| {
                        let mut v = att.to_vec();
                        v.push(Attachment {
                            node_id: node.clone(),
                            readonly,
                        });
                        Some(v)
                    })
                    .await?;
                tracing::info!(volume = %rec.volume_id, node = %req.node_id, epoch, readonly, "volume published");
                (epoch, rec)
            }
        };
        let replicas: Vec<ReplicaRef> = rec
            .replicas
            .iter()
            .map(|r| self.pool().resolve_ref(r))
            .collect();
        // Every epoch a replica holds fits the seq layout: replicas refuse others.
        let epoch = Epoch::new(epoch)
            .map_err(|e| ControllerError::Internal(format!("volume {}: {e}", rec.volume_id)))?;
        Ok(csi::ControllerPublishVolumeResponse {
            publish_context: publish::publish_context(epoch, &replicas, rec.size_bytes),
        })
    }

    async fn do_unpublish(
        &self,
        req: csi::ControllerUnpublishVolumeRequest,
    ) -> Result<csi::ControllerUnpublishVolumeResponse> {
        required("volume_id", &req.volume_id)?;
        let _guard = self.inner.locks.lock(&req.volume_id).await;
        let Some(rec) = self.lookup(&req.volume_id).await else {
            return Ok(csi::ControllerUnpublishVolumeResponse {});
        };
        let node = req.node_id.clone();
        let updated = self
            .update_attachments(&rec, move |att| publish::after_unpublish(att, &node))
            .await?;
        if rec.attachments != updated.attachments {
            tracing::info!(volume = %rec.volume_id, node = %req.node_id, "volume unpublished");
        }
        Ok(csi::ControllerUnpublishVolumeResponse {})
    }

    /// The current record as a majority of replicas see it.
    fn quorum_record(&self, rec: &VolumeRecord, reads: &Reads) -> Result<VolumeRecord> {
        let need = majority(rec.replicas.len());
        if reads.not_found() >= need {
            self.index().remove(&rec.volume_id);
            return Err(ControllerError::VolumeNotFound(rec.volume_id.clone()));
        }
        match reads.freshest() {
            Some(cur) if reads.ok_count() >= need => Ok(cur),
            _ => Err(ControllerError::Unavailable(format!(
                "only {} of {} replicas of volume {} answered, a majority ({need}) is needed: {}",
                reads.ok_count(),
                rec.replicas.len(),
                rec.volume_id,
                reads.failures()
            ))),
        }
    }

    /// Sets the attachments to `change(current)` on a majority of replicas with
    /// compare-and-set on each replica's generation. `change` returning `None` means
    /// "keep", which still repairs replicas that lag behind the majority view.
    async fn update_attachments<F>(&self, rec: &VolumeRecord, change: F) -> Result<VolumeRecord>
    where
        F: Fn(&[Attachment]) -> Option<Vec<Attachment>>,
    {
        self.update_record(rec, |cur| {
            Ok(change(&cur.attachments).map(|att| (att, cur.parameters.clone())))
        })
        .await
    }

    /// Sets a volume's attachments and parameters to `change(current record)` on a
    /// majority of replicas with compare-and-set on each replica's generation.
    /// `change` returning `Ok(None)` means "keep", which still repairs replicas that
    /// lag behind the majority view; an error aborts before anything is written.
    async fn update_record<F>(&self, rec: &VolumeRecord, change: F) -> Result<VolumeRecord>
    where
        F: Fn(&VolumeRecord) -> Result<Option<(Vec<Attachment>, HashMap<String, String>)>>,
    {
        let need = majority(rec.replicas.len());
        for _ in 0..CAS_ATTEMPTS {
            let reads = self.read_replicas(rec).await;
            let cur = self.quorum_record(rec, &reads)?;
            let target = change(&cur)?;
            let changing = target.is_some();
            let (target, target_params) =
                target.unwrap_or_else(|| (cur.attachments.clone(), cur.parameters.clone()));
            let matches =
                |r: &VolumeRecord| r.attachments == target && r.parameters == target_params;
            let in_sync = reads.ok().filter(|(_, r)| matches(r)).count();
            if !changing && in_sync >= need {
                self.index().upsert(cur.clone());
                return Ok(cur);
            }
            let writes: Vec<(&ReplicaRef, UpdateVolumeRequest)> = reads
                .ok()
                .filter(|(_, r)| changing || !matches(r))
                .map(|(rr, r)| {
                    (
                        rr,
                        UpdateVolumeRequest {
                            volume_id: rec.volume_id.clone(),
                            expected_generation: r.generation,
                            attachments: target.clone(),
                            parameters: target_params.clone(),
                        },
                    )
                })
                .collect();
            let results = join_all(
                writes
                    .iter()
                    .map(|(rr, w)| self.pool().update_volume(&rr.control_address, w.clone())),
            )
            .await;
            let written: Vec<&VolumeRecord> =
                results.iter().filter_map(|r| r.as_ref().ok()).collect();
            let confirmed = written.len() + if changing { 0 } else { in_sync };
            if confirmed >= need {
                let best =
                    written
                        .into_iter()
                        .fold(cur.clone(), |b, r| if newer(r, &b) { r.clone() } else { b });
                self.index().upsert(best.clone());
                return Ok(best);
            }
            if let Some(e) = missed_majority(
                &results,
                &format!("updating volume {}", rec.volume_id),
                confirmed,
                rec.replicas.len(),
            ) {
                return Err(e);
            }
        }
        Err(ControllerError::Aborted(format!(
            "volume {} kept changing under concurrent updates; retry",
            rec.volume_id
        )))
    }

    /// Raises the volume's fencing epoch to one above any replica's on a majority.
    async fn raise_epoch(&self, rec: &VolumeRecord) -> Result<u64> {
        let need = majority(rec.replicas.len());
        for _ in 0..CAS_ATTEMPTS {
            let reads = self.read_replicas(rec).await;
            self.quorum_record(rec, &reads)?;
            // Above any epoch whose seqs a shared base layer holds, so this volume's
            // writes outrank them when its copies are reconciled.
            let Some(new_epoch) = tessera_replica_protocol::seq::next_epoch(
                reads.max_epoch().max(reads.max_epoch_floor()),
            ) else {
                return Err(ControllerError::FailedPrecondition(format!(
                    "volume {}: its replicas hold epoch {}, the largest a write sequence number can carry; it cannot be published again",
                    rec.volume_id,
                    reads.max_epoch()
                )));
            };
            let targets: Vec<(&ReplicaRef, RaiseEpochRequest)> = reads
                .ok()
                .map(|(rr, r)| {
                    (
                        rr,
                        RaiseEpochRequest {
                            volume_id: rec.volume_id.clone(),
                            expected_epoch: r.epoch,
                            new_epoch,
                        },
                    )
                })
                .collect();
            let results = join_all(
                targets
                    .iter()
                    .map(|(rr, r)| self.pool().raise_epoch(&rr.control_address, r.clone())),
            )
            .await;
            let ok = results
                .iter()
                .filter(|r| r.as_ref().is_ok_and(|&e| e == new_epoch))
                .count();
            if ok >= need {
                return Ok(new_epoch);
            }
            if let Some(e) = missed_majority(
                &results,
                &format!("raising the epoch of volume {}", rec.volume_id),
                ok,
                rec.replicas.len(),
            ) {
                return Err(e);
            }
        }
        Err(ControllerError::Aborted(format!(
            "raising the epoch of volume {} kept losing races; retry",
            rec.volume_id
        )))
    }

    /// ControllerModifyVolume: changes the mutable QoS parameters of a volume, live.
    /// The new record reaches a majority of replicas through the same generation
    /// compare-and-set as publish; each replica daemon applies the new QoS to the
    /// volume's I/O scheduler registration when it stores the record, so an attached
    /// engine keeps its connections. Keys absent from the request keep their values
    /// (as the spec demands); `0` removes a limit.
    async fn do_modify(
        &self,
        req: csi::ControllerModifyVolumeRequest,
    ) -> Result<csi::ControllerModifyVolumeResponse> {
        required("volume_id", &req.volume_id)?;
        // An empty map asks for no change: the spec forbids modifying anything based on
        // absent keys, so it is a no-op on an existing volume (and NOT_FOUND otherwise),
        // which is also what the conformance suite expects.
        // Keys and values are checked before the volume is looked at, so a bad request
        // is INVALID_ARGUMENT whatever the volume's state.
        parameters::check_mutable(&req.mutable_parameters)?;
        let _guard = self.inner.locks.lock(&req.volume_id).await;
        let rec = self
            .lookup(&req.volume_id)
            .await
            .ok_or_else(|| ControllerError::VolumeNotFound(req.volume_id.clone()))?;
        let changes = req.mutable_parameters;
        if changes.is_empty() {
            return Ok(csi::ControllerModifyVolumeResponse {});
        }
        let updated = self
            .update_record(&rec, |cur| {
                let target = parameters::apply_mutable(&cur.parameters, &changes)?;
                Ok((target != cur.parameters).then(|| (cur.attachments.clone(), target)))
            })
            .await?;
        if updated.parameters != rec.parameters {
            tracing::info!(volume = %rec.volume_id, changes = ?changes, "volume parameters modified");
        }
        Ok(csi::ControllerModifyVolumeResponse {})
    }

    /// Every user snapshot the live daemons hold, by id; internal clone snapshots are
    /// left out, since no CSI call may see them. Fails when no daemon answers at all.
    pub(crate) async fn user_snapshots(&self) -> Result<BTreeMap<String, FoundSnapshot>> {
        let mut all = snapshots::scan(self.pool()).await?;
        let before = all.len();
        all.retain(|id, _| !snapshots::is_internal(id));
        if all.len() != before {
            self.sweep_in_background();
        }
        Ok(all)
    }

    /// Starts a sweep of internal clone snapshots unless one is running: seeing one
    /// is the opportunity to drop those whose clone is done.
    fn sweep_in_background(&self) {
        if self.inner.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let svc = self.clone();
        tokio::spawn(async move {
            svc.sweep_clone_snapshots().await;
            svc.inner.sweeping.store(false, Ordering::Release);
        });
    }

    /// CreateSnapshot: the controller seals the source's head on every replica (the
    /// same call whether the volume is attached or not); see [`snapshots::seal`] for
    /// why a majority sealed holds every acknowledged write.
    async fn do_create_snapshot(
        &self,
        req: csi::CreateSnapshotRequest,
    ) -> Result<csi::CreateSnapshotResponse> {
        required("name", &req.name)?;
        required("source_volume_id", &req.source_volume_id)?;
        let id = snapshot_id_for_name(&req.name);
        let _guard = self.inner.locks.lock(&req.source_volume_id).await;
        // Same name again while a DeleteSnapshot of it runs: one after the other.
        let _snapshot_guard = self.inner.locks.lock(&id).await;
        let existing = self.user_snapshots().await?.remove(&id);
        if let Some(found) = &existing {
            if found.record.source_volume_id != req.source_volume_id {
                return Err(ControllerError::AlreadyExists(format!(
                    "snapshot {:?} exists of volume {}, not {}",
                    req.name, found.record.source_volume_id, req.source_volume_id
                )));
            }
            if found.ready() {
                return Ok(csi::CreateSnapshotResponse {
                    snapshot: Some(found.to_csi()),
                });
            }
        }
        let rec = self
            .lookup(&req.source_volume_id)
            .await
            .ok_or_else(|| ControllerError::VolumeNotFound(req.source_volume_id.clone()))?;
        self.check_copy_done(&rec).await?;
        let created = existing
            .as_ref()
            .map_or_else(now_nanos, |f| f.record.created_unix_nanos);
        let found = snapshots::seal(self.pool(), &rec, &id, &req.name, created).await?;
        tracing::info!(snapshot = %id, name = %req.name, volume = %rec.volume_id, sealed = found.holders.len(), "snapshot created");
        Ok(csi::CreateSnapshotResponse {
            snapshot: Some(found.to_csi()),
        })
    }

    /// DeleteSnapshot on every daemon holding it; unknown ids succeed. A snapshot a
    /// restore is still copying from is in use (FAILED_PRECONDITION naming the volume).
    async fn do_delete_snapshot(
        &self,
        req: csi::DeleteSnapshotRequest,
    ) -> Result<csi::DeleteSnapshotResponse> {
        required("snapshot_id", &req.snapshot_id)?;
        let Some(found) = self.user_snapshots().await?.remove(&req.snapshot_id) else {
            return Ok(csi::DeleteSnapshotResponse {});
        };
        let volume_id = found.record.source_volume_id.clone();
        // The snapshot's lock, not the volume's: the daemons may merge for longer than
        // the call waits, and snapshots of the volume need not wait for that. A restore
        // holds this lock from its checks until its replicas exist.
        let _guard = self.inner.locks.lock(&req.snapshot_id).await;
        if let Some(user) = self.restore_in_progress(&req.snapshot_id).await {
            return Err(ControllerError::FailedPrecondition(format!(
                "snapshot {} is in use: {user} is still being restored from it",
                req.snapshot_id
            )));
        }
        snapshots::delete(self.pool(), &found).await?;
        tracing::info!(snapshot = %req.snapshot_id, volume = %volume_id, "snapshot deleted");
        Ok(csi::DeleteSnapshotResponse {})
    }

    /// ListSnapshots: in snapshot id order, filtered by id and source volume, paged
    /// with tokens that name the id to resume at.
    async fn do_list_snapshots(
        &self,
        req: csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse> {
        let max = usize::try_from(req.max_entries).map_err(|_| {
            ControllerError::InvalidArgument(format!(
                "max_entries must not be negative (got {})",
                req.max_entries
            ))
        })?;
        let start = if req.starting_token.is_empty() {
            None
        } else {
            let bad = || {
                ControllerError::Aborted(format!(
                    "starting_token {:?} was not issued by this driver",
                    req.starting_token
                ))
            };
            let hexed = req
                .starting_token
                .strip_prefix(SNAPSHOT_TOKEN_PREFIX)
                .ok_or_else(bad)?;
            let bytes = hex::decode(hexed).map_err(|_| bad())?;
            Some(String::from_utf8(bytes).map_err(|_| bad())?)
        };
        let all = self.user_snapshots().await?;
        let matching: Vec<&FoundSnapshot> = all
            .iter()
            .filter(|(id, _)| req.snapshot_id.is_empty() || **id == req.snapshot_id)
            .filter(|(_, f)| {
                req.source_volume_id.is_empty() || f.record.source_volume_id == req.source_volume_id
            })
            .filter(|(id, _)| start.as_ref().is_none_or(|s| id.as_str() >= s.as_str()))
            .map(|(_, f)| f)
            .collect();
        let limit = if max == 0 { usize::MAX } else { max };
        let next_token = matching.get(limit).map(|f| {
            format!(
                "{SNAPSHOT_TOKEN_PREFIX}{}",
                hex::encode(f.record.snapshot_id.as_bytes())
            )
        });
        let entries = matching
            .into_iter()
            .take(limit)
            .map(|f| csi::list_snapshots_response::Entry {
                snapshot: Some(f.to_csi()),
            })
            .collect();
        Ok(csi::ListSnapshotsResponse {
            entries,
            next_token: next_token.unwrap_or_default(),
        })
    }

    async fn do_get_snapshot(
        &self,
        req: csi::GetSnapshotRequest,
    ) -> Result<csi::GetSnapshotResponse> {
        required("snapshot_id", &req.snapshot_id)?;
        let found = self
            .user_snapshots()
            .await?
            .remove(&req.snapshot_id)
            .ok_or_else(|| ControllerError::SnapshotNotFound(req.snapshot_id.clone()))?;
        Ok(csi::GetSnapshotResponse {
            snapshot: Some(found.to_csi()),
        })
    }

    /// ControllerExpandVolume: grows every replica of the volume to the requested size
    /// (rounded up to whole blocks) with compare-and-set on each replica's generation;
    /// done once a majority holds the new size. Attached or not makes no difference
    /// here: the replicas serve the larger store at once, and an attached engine learns
    /// the size at NodeExpandVolume (which is why node expansion is always required,
    /// for block volumes too, whose device has to grow). A size the volume already has
    /// succeeds without change (retries); a smaller one is OUT_OF_RANGE.
    async fn do_expand(
        &self,
        req: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse> {
        required("volume_id", &req.volume_id)?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| ControllerError::InvalidArgument("capacity_range is required".into()))?;
        if range.required_bytes <= 0 {
            return Err(ControllerError::InvalidArgument(format!(
                "capacity_range.required_bytes must be positive (got {})",
                range.required_bytes
            )));
        }
        // Validates the range (negative or required > limit) the same way as create.
        let wanted = capacity::resolve_size(Some(range))?;
        if let Some(cap) = req.volume_capability.as_ref() {
            capabilities::validate_one(cap)?;
        }
        let _guard = self.inner.locks.lock(&req.volume_id).await;
        let rec = self
            .lookup(&req.volume_id)
            .await
            .ok_or_else(|| ControllerError::VolumeNotFound(req.volume_id.clone()))?;
        let need = majority(rec.replicas.len());
        for _ in 0..CAS_ATTEMPTS {
            let reads = self.read_replicas(&rec).await;
            let cur = self.quorum_record(&rec, &reads)?;
            if wanted < cur.size_bytes {
                return Err(ControllerError::OutOfRange(format!(
                    "volume {} holds {} bytes; volumes cannot shrink to {wanted}",
                    rec.volume_id, cur.size_bytes
                )));
            }
            let limit = u64::try_from(range.limit_bytes).unwrap_or(0);
            if limit != 0 && limit < cur.size_bytes {
                return Err(ControllerError::OutOfRange(format!(
                    "volume {} holds {} bytes, more than limit_bytes {limit}",
                    rec.volume_id, cur.size_bytes
                )));
            }
            let at_size = reads.ok().filter(|(_, r)| r.size_bytes == wanted).count();
            let writes: Vec<(&ReplicaRef, ExpandVolumeRequest)> = reads
                .ok()
                .filter(|(_, r)| r.size_bytes < wanted)
                .map(|(rr, r)| {
                    (
                        rr,
                        ExpandVolumeRequest {
                            volume_id: rec.volume_id.clone(),
                            expected_generation: r.generation,
                            new_size: wanted,
                        },
                    )
                })
                .collect();
            let results = join_all(
                writes
                    .iter()
                    .map(|(rr, w)| self.pool().expand_volume(&rr.control_address, w.clone())),
            )
            .await;
            let written: Vec<&VolumeRecord> =
                results.iter().filter_map(|r| r.as_ref().ok()).collect();
            let confirmed = at_size + written.len();
            if confirmed >= need {
                let best =
                    written
                        .into_iter()
                        .fold(cur.clone(), |b, r| if newer(r, &b) { r.clone() } else { b });
                self.index().upsert(best.clone());
                if best.size_bytes != cur.size_bytes {
                    tracing::info!(volume = %rec.volume_id, from = cur.size_bytes, to = wanted, "volume expanded");
                }
                return Ok(csi::ControllerExpandVolumeResponse {
                    capacity_bytes: size_i64(wanted),
                    node_expansion_required: true,
                });
            }
            let errs = || {
                results
                    .iter()
                    .filter_map(|r| r.as_ref().err().map(|e| e.message().to_string()))
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            if let Some(e) = results.iter().find_map(|r| {
                r.as_ref()
                    .err()
                    .filter(|e| matches!(e.code(), Code::ResourceExhausted | Code::OutOfRange))
            }) {
                let msg = format!(
                    "expanding volume {} to {wanted} bytes: {}",
                    rec.volume_id,
                    e.message()
                );
                return Err(if e.code() == Code::OutOfRange {
                    ControllerError::OutOfRange(msg)
                } else {
                    ControllerError::ResourceExhausted(msg)
                });
            }
            if !results
                .iter()
                .any(|r| r.as_ref().is_err_and(|e| e.code() == Code::Aborted))
            {
                return Err(ControllerError::Unavailable(format!(
                    "expanding volume {} reached {confirmed} of {} replicas, a majority ({need}) is needed: {}",
                    rec.volume_id,
                    rec.replicas.len(),
                    errs()
                )));
            }
        }
        Err(ControllerError::Aborted(format!(
            "volume {} kept changing under concurrent updates; retry",
            rec.volume_id
        )))
    }

    async fn do_validate(
        &self,
        req: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse> {
        required("volume_id", &req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(ControllerError::InvalidArgument(
                "volume_capabilities is required".into(),
            ));
        }
        let rec = self
            .lookup(&req.volume_id)
            .await
            .ok_or_else(|| ControllerError::VolumeNotFound(req.volume_id.clone()))?;
        let unconfirmed = |message: String| csi::ValidateVolumeCapabilitiesResponse {
            confirmed: None,
            message,
        };
        let access = match capabilities::validate_all(&req.volume_capabilities) {
            Ok(a) => a,
            Err(e) => return Ok(unconfirmed(e.to_string())),
        };
        if !access.compatible_with(&rec.access_type) {
            return Ok(unconfirmed(format!(
                "volume was created with access type {:?}",
                rec.access_type
            )));
        }
        if let (Some(fs), Some(stored)) = (
            access.fs_type,
            rec.parameters.get(crate::parameters::KEY_FS_TYPE),
        ) {
            if fs.as_str() != stored {
                return Ok(unconfirmed(format!(
                    "volume is formatted {stored}, not {fs}"
                )));
            }
        }
        if !req.parameters.is_empty() {
            match VolumeParameters::parse(&req.parameters) {
                Ok(p) => {
                    let fs = p.fs_type.or(access.fs_type).unwrap_or_default();
                    if p.to_map(fs) != rec.parameters {
                        return Ok(unconfirmed("parameters differ from the volume's".into()));
                    }
                }
                Err(e) => return Ok(unconfirmed(e.to_string())),
            }
        }
        Ok(csi::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: HashMap::new(),
            }),
            message: String::new(),
        })
    }

    async fn do_list(&self, req: csi::ListVolumesRequest) -> Result<csi::ListVolumesResponse> {
        let max = usize::try_from(req.max_entries).map_err(|_| {
            ControllerError::InvalidArgument(format!(
                "max_entries must not be negative (got {})",
                req.max_entries
            ))
        })?;
        let start = if req.starting_token.is_empty() {
            None
        } else {
            Some(volume_index::decode_token(&req.starting_token)?)
        };
        let page = self.index().page(start.as_deref(), max);
        let entries = page
            .records
            .iter()
            .map(|rec| csi::list_volumes_response::Entry {
                volume: Some(self.volume(rec, &[])),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: rec.attachments.iter().map(|a| a.node_id.clone()).collect(),
                    volume_condition: Some(self.condition_from_liveness(rec)),
                }),
            })
            .collect();
        Ok(csi::ListVolumesResponse {
            entries,
            next_token: page.next_token.unwrap_or_default(),
        })
    }

    async fn do_get_volume(
        &self,
        req: csi::ControllerGetVolumeRequest,
    ) -> Result<csi::ControllerGetVolumeResponse> {
        required("volume_id", &req.volume_id)?;
        let rec = self
            .lookup(&req.volume_id)
            .await
            .ok_or_else(|| ControllerError::VolumeNotFound(req.volume_id.clone()))?;
        let reads = self.read_replicas(&rec).await;
        let rec = match reads.freshest() {
            Some(cur) => {
                self.index().merge(cur.clone());
                if newer(&cur, &rec) {
                    cur
                } else {
                    rec
                }
            }
            None => rec,
        };
        let mut cond = condition(
            reads.ok_count(),
            rec.replicas.len(),
            "hold the volume record",
        );
        let failures = reads.failures();
        if !failures.is_empty() {
            cond.message = format!("{}: {failures}", cond.message);
        }
        Ok(csi::ControllerGetVolumeResponse {
            volume: Some(self.volume(&rec, &[])),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: rec.attachments.iter().map(|a| a.node_id.clone()).collect(),
                volume_condition: Some(cond),
            }),
        })
    }

    async fn do_get_capacity(
        &self,
        req: csi::GetCapacityRequest,
    ) -> Result<csi::GetCapacityResponse> {
        let params = VolumeParameters::parse(&req.parameters)?;
        // The smallest limit_bytes a CreateVolume with these parameters accepts: the
        // filesystem's minimum when the volume may be mounted. Without capabilities the
        // volume is taken to be a mount volume, the common case (a block-only one would
        // accept less, so the answer is one that always works).
        let filesystem = if req.volume_capabilities.is_empty() {
            Some(params.fs_type.unwrap_or_default())
        } else {
            match capabilities::validate_all(&req.volume_capabilities) {
                Ok(access) => {
                    access.filesystem(params.fs_type.or(access.fs_type).unwrap_or_default())
                }
                // No capacity at all for volumes Tessera cannot create.
                Err(_) => {
                    return Ok(csi::GetCapacityResponse {
                        available_capacity: 0,
                        maximum_volume_size: Some(0),
                        minimum_volume_size: None,
                    })
                }
            }
        };
        let minimum = filesystem.map_or(BLOCK_SIZE, |fs| fs.min_volume_bytes().max(BLOCK_SIZE));
        self.pool().refresh_infos().await;
        let live = self.pool().live();
        let segments = req
            .accessible_topology
            .map(|t| t.segments)
            .unwrap_or_default();
        let known_keys = segments
            .keys()
            .all(|k| k == TOPOLOGY_NODE_KEY || k == TOPOLOGY_ZONE_KEY);
        let zone = segments.get(TOPOLOGY_ZONE_KEY);
        let node = segments.get(TOPOLOGY_NODE_KEY);
        let available: u64 = live
            .iter()
            .filter(|(_, i)| {
                known_keys
                    && zone.is_none_or(|z| *z == i.zone)
                    && node.is_none_or(|n| *n == i.node_id)
            })
            .map(|(_, i)| i.free_bytes)
            .fold(0u64, u64::saturating_add);
        // A volume is network-attached: the node segment does not restrict where its
        // replicas go, a zone segment does.
        let candidates: Vec<Candidate> = live
            .iter()
            .filter(|_| known_keys)
            .map(|(addr, i)| Candidate {
                daemon_id: addr.clone(),
                node_id: i.node_id.clone(),
                zone: i.zone.clone(),
                free_bytes: i.free_bytes,
            })
            .collect();
        let zones = zone.map(|z| BTreeSet::from([z.clone()]));
        let max = placement::max_placeable_size(
            &candidates,
            params.replication_factor as usize,
            zones.as_ref(),
            BLOCK_SIZE,
        );
        Ok(csi::GetCapacityResponse {
            available_capacity: size_i64(available),
            maximum_volume_size: Some(size_i64(max)),
            minimum_volume_size: Some(size_i64(minimum)),
        })
    }
}

/// Abnormal when fewer than a majority of `total` replicas are `good`.
fn condition(good: usize, total: usize, what: &str) -> VolumeCondition {
    let need = majority(total);
    if good < need {
        VolumeCondition {
            abnormal: true,
            message: format!(
                "only {good} of {total} replicas {what}; a majority ({need}) is needed for I/O"
            ),
        }
    } else if good < total {
        VolumeCondition {
            abnormal: false,
            message: format!("degraded: {good} of {total} replicas {what}"),
        }
    } else {
        VolumeCondition {
            abnormal: false,
            message: format!("all {total} replicas {what}"),
        }
    }
}

/// Judges a compare-and-set round that reached fewer than a majority of `total` replicas:
/// when some replica lost a race (ABORTED) the caller retries (`None`); otherwise retrying
/// cannot help and the round is UNAVAILABLE, naming what each replica said.
fn missed_majority<T>(
    results: &[std::result::Result<T, Status>],
    what: &str,
    reached: usize,
    total: usize,
) -> Option<ControllerError> {
    if results
        .iter()
        .any(|r| r.as_ref().is_err_and(|e| e.code() == Code::Aborted))
    {
        return None;
    }
    let errs: Vec<&str> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.message()))
        .collect();
    Some(ControllerError::Unavailable(format!(
        "{what} reached {reached} of {total} replicas, a majority ({}) is needed: {}",
        majority(total),
        errs.join("; ")
    )))
}

/// The controller capabilities Tessera implements.
pub fn controller_capabilities() -> Vec<csi::ControllerServiceCapability> {
    [
        RpcType::CreateDeleteVolume,
        RpcType::PublishUnpublishVolume,
        RpcType::ListVolumes,
        RpcType::GetCapacity,
        RpcType::ListVolumesPublishedNodes,
        RpcType::PublishReadonly,
        RpcType::GetVolume,
        RpcType::VolumeCondition,
        RpcType::SingleNodeMultiWriter,
        RpcType::ModifyVolume,
        RpcType::ExpandVolume,
        RpcType::CreateDeleteSnapshot,
        RpcType::ListSnapshots,
        RpcType::GetSnapshot,
        RpcType::CloneVolume,
    ]
    .into_iter()
    .map(|t| csi::ControllerServiceCapability {
        r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
    })
    .collect()
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> std::result::Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = self.do_create(request.into_inner()).await;
        self.finish("CreateVolume", r)
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> std::result::Result<Response<csi::DeleteVolumeResponse>, Status> {
        let r = self.do_delete(request.into_inner()).await;
        self.finish("DeleteVolume", r)
    }

    async fn controller_publish_volume(
        &self,
        request: Request<csi::ControllerPublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let r = self.do_publish(request.into_inner()).await;
        self.finish("ControllerPublishVolume", r)
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let r = self.do_unpublish(request.into_inner()).await;
        self.finish("ControllerUnpublishVolume", r)
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = self.do_validate(request.into_inner()).await;
        self.finish("ValidateVolumeCapabilities", r)
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> std::result::Result<Response<csi::ListVolumesResponse>, Status> {
        let r = self.do_list(request.into_inner()).await;
        self.finish("ListVolumes", r)
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> std::result::Result<Response<csi::GetCapacityResponse>, Status> {
        let r = self.do_get_capacity(request.into_inner()).await;
        self.finish("GetCapacity", r)
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        self.finish(
            "ControllerGetCapabilities",
            Ok(csi::ControllerGetCapabilitiesResponse {
                capabilities: controller_capabilities(),
            }),
        )
    }

    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> std::result::Result<Response<csi::CreateSnapshotResponse>, Status> {
        let r = self.do_create_snapshot(request.into_inner()).await;
        self.finish("CreateSnapshot", r)
    }

    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> std::result::Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let r = self.do_delete_snapshot(request.into_inner()).await;
        self.finish("DeleteSnapshot", r)
    }

    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> std::result::Result<Response<csi::ListSnapshotsResponse>, Status> {
        let r = self.do_list_snapshots(request.into_inner()).await;
        self.finish("ListSnapshots", r)
    }

    async fn get_snapshot(
        &self,
        request: Request<csi::GetSnapshotRequest>,
    ) -> std::result::Result<Response<csi::GetSnapshotResponse>, Status> {
        let r = self.do_get_snapshot(request.into_inner()).await;
        self.finish("GetSnapshot", r)
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let r = self.do_expand(request.into_inner()).await;
        self.finish("ControllerExpandVolume", r)
    }

    async fn controller_get_volume(
        &self,
        request: Request<csi::ControllerGetVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let r = self.do_get_volume(request.into_inner()).await;
        self.finish("ControllerGetVolume", r)
    }

    async fn controller_modify_volume(
        &self,
        request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        let r = self.do_modify(request.into_inner()).await;
        self.finish("ControllerModifyVolume", r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(kv: &[(&str, &str)]) -> Topology {
        Topology {
            segments: kv
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn zones_restrict_only_when_every_requisite_names_one() {
        let req = TopologyRequirement {
            requisite: vec![
                topo(&[(TOPOLOGY_ZONE_KEY, "a")]),
                topo(&[(TOPOLOGY_ZONE_KEY, "b"), (TOPOLOGY_NODE_KEY, "n1")]),
            ],
            preferred: vec![
                topo(&[(TOPOLOGY_ZONE_KEY, "b")]),
                topo(&[(TOPOLOGY_NODE_KEY, "n7")]),
            ],
        };
        let t = TopologyRequest::from_csi(Some(&req));
        assert_eq!(
            t.allowed_zones,
            Some(BTreeSet::from(["a".to_string(), "b".to_string()]))
        );
        assert_eq!(t.preferred_node.as_deref(), Some("n7"));
        let loose = TopologyRequirement {
            requisite: vec![
                topo(&[(TOPOLOGY_ZONE_KEY, "a")]),
                topo(&[(TOPOLOGY_NODE_KEY, "n1")]),
            ],
            preferred: vec![],
        };
        assert_eq!(TopologyRequest::from_csi(Some(&loose)).allowed_zones, None);
        assert_eq!(TopologyRequest::from_csi(None).allowed_zones, None);
    }

    #[test]
    fn condition_thresholds() {
        assert!(condition(1, 3, "x").abnormal);
        assert!(!condition(2, 3, "x").abnormal);
        assert!(condition(2, 3, "x").message.contains("degraded"));
        assert!(!condition(3, 3, "x").abnormal);
        assert!(condition(0, 1, "x").abnormal);
    }

    #[test]
    fn capabilities_advertise_modify_expand_snapshots_and_clone() {
        let caps = controller_capabilities();
        let types: Vec<i32> = caps
            .iter()
            .filter_map(|c| c.r#type.map(|CapType::Rpc(r)| r.r#type))
            .collect();
        for t in [
            RpcType::CreateDeleteVolume,
            RpcType::ModifyVolume,
            RpcType::ExpandVolume,
            RpcType::CreateDeleteSnapshot,
            RpcType::ListSnapshots,
            RpcType::GetSnapshot,
            RpcType::CloneVolume,
        ] {
            assert!(types.contains(&(t as i32)), "{t:?} is advertised");
        }
    }
}
