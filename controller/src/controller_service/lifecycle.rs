//! CreateVolume and DeleteVolume: placement, creation on a majority of the chosen
//! replicas (rolled back otherwise), completing a create a crashed controller left
//! half done, and restores and clones through the [`crate::restore::Restorer`].

use std::collections::{BTreeSet, HashMap};

use tessera_csi_proto::v1::{self as csi, Topology, TopologyRequirement};
use tessera_csi_proto::{TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY};
use tessera_replica_protocol::control_proto::{CreateVolumeRequest, ReplicaRef, VolumeRecord};

use super::{ControllerService, Result};
use crate::capabilities::{self, RequestedAccess};
use crate::capacity;
use crate::error::{required, ControllerError, Difference};
use crate::parameters::{self, DataLocality, VolumeParameters};
use crate::placement::{self, Candidate, PlacementRequest};
use crate::quorum::{self, majority};
use crate::restore::{self, RequestedSource};
use crate::volume_index::{newer, volume_id_for_name};
use crate::volumes::{member_create_request, now_nanos};

/// Topology constraints of a CreateVolume, reduced to what placement uses.
#[derive(Debug, Default)]
pub(super) struct TopologyRequest {
    pub(super) requisite: Vec<Topology>,
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

impl ControllerService {
    pub(super) async fn do_create(
        &self,
        req: csi::CreateVolumeRequest,
    ) -> Result<csi::CreateVolumeResponse> {
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
            (Some(parameter), Some(capability)) if parameter != capability => {
                return Err(ControllerError::FsTypeConflict {
                    parameter,
                    capability,
                })
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

        let _guard = self.locks().lock(&volume_id).await;
        if let Some(existing) = self.volumes().lookup(&volume_id).await {
            check_compatible(&existing, &req, &access, &param_map, &topo)?;
            if !restore::same_source(source.as_ref(), existing.copy_source.as_ref()) {
                return Err(ControllerError::ExistsWithOtherSource { name: req.name });
            }
            let rec = self.complete_create(existing).await?;
            let rec = self.restorer().finish_copy(rec).await?;
            return Ok(csi::CreateVolumeResponse {
                volume: Some(self.volume(&rec, &topo.requisite)),
            });
        }
        let restorer = self.restorer();
        let (size, copy_source, source_guards, holder_daemons) = match &source {
            None => (size, None, Vec::new(), Vec::new()),
            Some(s) => {
                let p = restorer
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
            epoch: 0,
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
                    restorer.drop_internal_snapshot(&copy.snapshot_id).await;
                }
                return Err(e);
            }
        };
        let rec = restorer.finish_copy(rec).await?;
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

    /// Finishes a creation a crashed controller left on some replicas: re-sends the
    /// idempotent CreateVolume to every replica of a volume that was never published
    /// (once published, a missing replica holds no data and is a rebuild's job).
    async fn complete_create(&self, rec: VolumeRecord) -> Result<VolumeRecord> {
        if rec.epoch != 0 || !rec.attachments.is_empty() {
            return Ok(rec);
        }
        // The same source again: a replica that missed the first create starts its
        // copy, the others answer with their record.
        let create = member_create_request(&rec, rec.copy_source.clone(), 0);
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
        let answers = quorum::ask(&refs, |r| {
            self.pool()
                .create_volume(&r.control_address, create.clone())
        })
        .await;
        let need = majority(refs.len());
        let failures = answers.failures();
        match quorum::newest(answers.ok().map(|(_, rec)| rec)) {
            Some(rec) if answers.ok_count() >= need => {
                if !failures.is_empty() {
                    tracing::warn!(volume = %create.volume_id, failed = %failures, "volume created on a majority only");
                }
                self.index().upsert(rec.clone());
                return Ok(rec.clone());
            }
            _ => {}
        }
        if rollback {
            let created: Vec<ReplicaRef> = answers.ok().map(|(r, _)| r.clone()).collect();
            let undo = quorum::ask(&created, |r| {
                self.pool()
                    .delete_volume(&r.control_address, &create.volume_id)
            })
            .await;
            for e in undo.failures().0 {
                tracing::warn!(volume = %create.volume_id, node = %e.replica.node_id, error = %e.failure, "rolling back a replica failed");
            }
        }
        Err(ControllerError::CreateFailed {
            volume: create.volume_id.clone(),
            shortfall: answers.shortfall(need),
        })
    }

    pub(super) async fn do_delete(
        &self,
        req: csi::DeleteVolumeRequest,
    ) -> Result<csi::DeleteVolumeResponse> {
        required("volume_id", &req.volume_id)?;
        let _guard = self.locks().lock(&req.volume_id).await;
        let Some(rec) = self.volumes().lookup(&req.volume_id).await else {
            return Ok(csi::DeleteVolumeResponse {});
        };
        if let Some(a) = rec.attachments.first() {
            return Err(ControllerError::StillPublished {
                volume: rec.volume_id.clone(),
                node: a.node_id.clone(),
            });
        }
        let refs = self.volumes().replicas(&rec);
        let answers = quorum::ask(&refs, |r| {
            self.pool()
                .delete_volume(&r.control_address, &rec.volume_id)
        })
        .await;
        let failures = answers.failures();
        for f in &failures.0 {
            // Whatever this member still holds is garbage once a majority deleted.
            self.volumes().forsake(&rec.volume_id, &f.replica.node_id);
        }
        // A member whose node is lost (unreachable past the replacement delay) is not
        // waited for once a majority deleted: its copy is collected when it returns.
        let delay = self.inner.cfg.heal.replacement_delay;
        let only_lost = failures
            .0
            .iter()
            .all(|f| self.pool().is_lost(&f.replica, delay));
        if !failures.is_empty() && (!only_lost || answers.ok_count() < majority(refs.len())) {
            return Err(ControllerError::NotDeletedEverywhere {
                volume: rec.volume_id.clone(),
                failures,
            });
        }
        if !failures.is_empty() {
            tracing::warn!(volume = %rec.volume_id, lost = %failures,
                "volume deleted without its lost replicas; their copies are deleted when they return");
        }
        self.index().remove(&rec.volume_id);
        tracing::info!(volume = %rec.volume_id, name = %rec.name, "volume deleted");
        if let Some(copy) = rec.copy_source.as_ref().filter(|c| c.clone) {
            // A clone deleted before its copy finished leaves its internal snapshot.
            self.restorer()
                .drop_internal_snapshot(&copy.snapshot_id)
                .await;
        }
        Ok(csi::DeleteVolumeResponse {})
    }
}

/// Whether the existing volume satisfies a repeated CreateVolume (ALREADY_EXISTS
/// naming the difference otherwise).
fn check_compatible(
    existing: &VolumeRecord,
    req: &csi::CreateVolumeRequest,
    access: &RequestedAccess,
    param_map: &HashMap<String, String>,
    topo: &TopologyRequest,
) -> Result<()> {
    let name = &req.name;
    if existing.name != *name {
        return Err(ControllerError::IdHeldByOtherName {
            volume: existing.volume_id.clone(),
            name: name.clone(),
            holder: existing.name.clone(),
        });
    }
    let incompatible = |difference| {
        Err(ControllerError::ExistsIncompatible {
            name: name.clone(),
            difference,
        })
    };
    if !capacity::satisfies(existing.size_bytes, req.capacity_range.as_ref())? {
        return incompatible(Difference::Size(existing.size_bytes));
    }
    if existing.parameters != *param_map {
        return incompatible(Difference::Parameters);
    }
    if !access.compatible_with(&existing.access_type) {
        return incompatible(Difference::AccessType(existing.access_type.clone()));
    }
    if let Some(zones) = &topo.allowed_zones {
        if existing.replicas.iter().any(|r| !zones.contains(&r.zone)) {
            return incompatible(Difference::Zones);
        }
    }
    Ok(())
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
}
