//! The read-only calls: ValidateVolumeCapabilities, ListVolumes, ControllerGetVolume
//! and GetCapacity.

use std::collections::{BTreeSet, HashMap};

use tessera_csi_proto::v1 as csi;
use tessera_csi_proto::{TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY};
use tessera_replica_protocol::control_proto::VolumeRecord;

use super::{condition, size_i64, ControllerService, Result};
use crate::capabilities;
use crate::capacity::BLOCK_SIZE;
use crate::error::{required, ControllerError};
use crate::fs_type::MinVolumeSize;
use crate::heal::InSyncView;
use crate::parameters::{self, VolumeParameters};
use crate::placement::{self, Candidate};
use crate::quorum::Reads;
use crate::volume_index::{self, newer};

impl ControllerService {
    pub(super) async fn do_validate(
        &self,
        req: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse> {
        required("volume_id", &req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(ControllerError::Missing {
                field: "volume_capabilities",
            });
        }
        let rec = self.volumes().require(&req.volume_id).await?;
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
        if let (Some(fs), Some(stored)) =
            (access.fs_type, rec.parameters.get(parameters::KEY_FS_TYPE))
        {
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

    pub(super) async fn do_list(
        &self,
        req: csi::ListVolumesRequest,
    ) -> Result<csi::ListVolumesResponse> {
        let max = usize::try_from(req.max_entries).map_err(|_| ControllerError::Negative {
            field: "max_entries",
            value: i64::from(req.max_entries),
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

    pub(super) async fn do_get_volume(
        &self,
        req: csi::ControllerGetVolumeRequest,
    ) -> Result<csi::ControllerGetVolumeResponse> {
        required("volume_id", &req.volume_id)?;
        let rec = self.volumes().require(&req.volume_id).await?;
        let reads = self.volumes().read(&rec).await;
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
        if !cond.abnormal {
            if let Some(in_sync) = in_sync_condition(&reads) {
                cond = in_sync;
            }
        }
        let failures = reads.failures();
        if !failures.is_empty() {
            cond.message = format!("{}: {failures}", cond.message);
        }
        let delay = self.inner.cfg.heal.replacement_delay;
        let lost: Vec<&str> = failures
            .0
            .iter()
            .filter(|f| self.pool().is_lost(&f.replica, delay))
            .map(|f| f.replica.node_id.as_str())
            .collect();
        if !lost.is_empty() {
            cond.message = format!(
                "{} (lost, unreachable for over {delay:?}: {}; being replaced where a node is free)",
                cond.message,
                lost.join(", ")
            );
        }
        Ok(csi::ControllerGetVolumeResponse {
            volume: Some(self.volume(&rec, &[])),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: rec.attachments.iter().map(|a| a.node_id.clone()).collect(),
                volume_condition: Some(cond),
            }),
        })
    }

    pub(super) async fn do_get_capacity(
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

/// The volume's condition by the newest in-sync record its reachable replicas hold
/// (the engines' declarations): replicas that answered and are named in it count.
/// Those out of sync are named, with how far a rebuild of theirs got. `None` when no
/// replica reports a record (daemons older than the records).
fn in_sync_condition(reads: &Reads) -> Option<csi::VolumeCondition> {
    let view = InSyncView::of(reads);
    view.newest.as_ref()?;
    let good = reads
        .ok()
        .filter(|(r, rec)| view.in_sync(&r.node_id, rec))
        .count();
    let mut cond = condition(good, reads.total(), "reachable and in sync");
    let out: Vec<String> = reads
        .ok()
        .filter(|(r, rec)| !view.in_sync(&r.node_id, rec))
        .map(|(r, rec)| match rebuild_progress(rec) {
            Some(progress) => format!("{} {progress}", r.node_id),
            None => r.node_id.clone(),
        })
        .collect();
    if !out.is_empty() {
        cond.message = format!("{} (out of sync: {})", cond.message, out.join(", "));
    }
    Some(cond)
}

/// How far the rebuild of a replacement copy got ("rebuilding 43 %", "rebuilt,
/// waiting for its resync"); `None` for a copy that is not a rebuild.
fn rebuild_progress(rec: &VolumeRecord) -> Option<String> {
    rec.copy_source.as_ref().filter(|c| c.rebuild)?;
    let copy = rec.copy.as_ref()?;
    if copy.complete {
        return Some("rebuilt, waiting for its resync".into());
    }
    let percent = (copy.done_bytes as u128 * 100)
        .checked_div(copy.total_bytes as u128)
        .unwrap_or(0);
    let mut s = format!("rebuilding {percent} %");
    if !copy.last_error.is_empty() {
        s.push_str(&format!(" (retrying: {})", copy.last_error));
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quorum::{Answers, ReplicaFailure};
    use tessera_replica_protocol::control_proto::{
        CopyProgress, CopySource, InSyncRecord, ReplicaRef,
    };

    fn answer(
        node: &str,
        in_sync: Option<(u64, &[&str])>,
    ) -> (ReplicaRef, Result<VolumeRecord, ReplicaFailure>) {
        let record = VolumeRecord {
            in_sync: in_sync.map(|(epoch, members)| InSyncRecord {
                epoch,
                version: u64::from(epoch != 0),
                members: members.iter().map(|m| m.to_string()).collect(),
            }),
            ..Default::default()
        };
        let r = ReplicaRef {
            node_id: node.into(),
            ..Default::default()
        };
        (r, Ok(record))
    }

    #[test]
    fn the_newest_in_sync_record_decides_which_reachable_replicas_count() {
        // a's record is older; b and c hold the newest, which leaves c out.
        let reads = Answers(vec![
            answer("a", Some((1, &["a", "b", "c"]))),
            answer("b", Some((2, &["a", "b"]))),
            answer("c", Some((2, &["a", "b"]))),
        ]);
        let cond = in_sync_condition(&reads).unwrap();
        assert!(!cond.abnormal);
        assert_eq!(
            cond.message,
            "degraded: 2 of 3 replicas reachable and in sync (out of sync: c)"
        );
        // One reachable and in sync is below the majority.
        let reads = Answers(vec![
            answer("a", Some((3, &["a"]))),
            answer("b", Some((3, &["a"]))),
            (
                ReplicaRef::default(),
                Err(ReplicaFailure::Unreachable("down".into())),
            ),
        ]);
        assert!(in_sync_condition(&reads).unwrap().abnormal);
        // No declaration yet: every reachable replica counts.
        let reads = Answers(vec![
            answer("a", Some((0, &[]))),
            answer("b", Some((0, &[]))),
        ]);
        let cond = in_sync_condition(&reads).unwrap();
        assert_eq!(cond.message, "all 2 replicas reachable and in sync");
        // Daemons that report no record leave the condition to reachability.
        assert!(in_sync_condition(&Answers(vec![answer("a", None)])).is_none());
    }

    #[test]
    fn a_rebuilding_replica_shows_its_progress() {
        let mut d = answer("d", Some((0, &[])));
        if let (_, Ok(rec)) = &mut d {
            rec.copy_source = Some(CopySource {
                rebuild: true,
                ..Default::default()
            });
            rec.copy = Some(CopyProgress {
                done_bytes: 43,
                total_bytes: 100,
                ..Default::default()
            });
        }
        let reads = Answers(vec![
            answer("a", Some((2, &["a", "b"]))),
            answer("b", Some((2, &["a", "b"]))),
            d,
        ]);
        let cond = in_sync_condition(&reads).unwrap();
        assert_eq!(
            cond.message,
            "degraded: 2 of 3 replicas reachable and in sync (out of sync: d rebuilding 43 %)"
        );
    }
}
