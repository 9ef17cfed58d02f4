//! The generation compare-and-set mutations of a volume: its attachments,
//! parameters (QoS applied live) and replica set (when the controller replaces a lost
//! replica), and its size. `generation` is the controller's
//! token: each of these bumps it, and each is refused unless the caller names the
//! current one.

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::info;

use super::error::store_error;
use super::io_registration::requested_qos;
use super::validate::validate_size;
use super::{validate_volume_id, Catalog, CatalogError};
use crate::record::{Attachment, ReplicaRef, VolumeRecord};

/// The mutable part of a record an UpdateVolume replaces.
#[derive(Debug, Clone, Default)]
pub struct RecordUpdate {
    /// Nodes the volume is published to.
    pub attachments: Vec<Attachment>,
    /// Validated StorageClass parameters.
    pub parameters: BTreeMap<String, String>,
    /// A new replica set, or `None` to keep the stored one.
    pub replicas: Option<Vec<ReplicaRef>>,
}

impl Catalog {
    /// Replaces a volume's attachments, parameters and (if given) replica set if its
    /// generation equals `expected_generation`; returns the new record
    /// (generation + 1).
    pub fn update(
        &self,
        volume_id: &str,
        expected_generation: u64,
        change: RecordUpdate,
    ) -> Result<VolumeRecord, CatalogError> {
        let RecordUpdate {
            attachments,
            parameters,
            replicas,
        } = change;
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
        let qos = requested_qos(volume_id, &parameters)?;
        if let Some(replicas) = replicas {
            validate_replica_set(volume_id, record.replication_factor, &replicas)?;
            if replicas != record.replicas {
                info!(volume_id, from = ?node_ids(&record.replicas), to = ?node_ids(&replicas),
                    "replica set replaced");
            }
            record.replicas = replicas;
        }
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
}

/// A replica set a volume can have: `replication_factor` members on distinct nodes,
/// each with a node id and both addresses.
fn validate_replica_set(
    volume_id: &str,
    replication_factor: u32,
    replicas: &[ReplicaRef],
) -> Result<(), CatalogError> {
    let invalid = |reason: String| CatalogError::InvalidReplicaSet {
        volume_id: volume_id.to_string(),
        reason,
    };
    if replicas.len() != replication_factor as usize {
        return Err(invalid(format!(
            "{} members for a replication factor of {replication_factor}",
            replicas.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for r in replicas {
        if r.node_id.is_empty() || r.control_address.is_empty() || r.data_address.is_empty() {
            return Err(invalid(format!(
                "member {:?} lacks a node id, control address or data address",
                r.node_id
            )));
        }
        if !seen.insert(r.node_id.as_str()) {
            return Err(invalid(format!("node {} appears twice", r.node_id)));
        }
    }
    Ok(())
}

fn node_ids(replicas: &[ReplicaRef]) -> Vec<&str> {
    replicas.iter().map(|r| r.node_id.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::test_support::{new_volume, open, MIB};

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
            .update(
                "v1",
                1,
                RecordUpdate {
                    attachments: att.clone(),
                    parameters: params.clone(),
                    replicas: None,
                },
            )
            .expect("update");
        assert_eq!(rec.generation, 2);
        assert_eq!(rec.attachments, att);
        assert_eq!(rec.parameters, params);

        let err = cat
            .update(
                "v1",
                1,
                RecordUpdate {
                    attachments: Vec::new(),
                    parameters: BTreeMap::new(),
                    replicas: None,
                },
            )
            .expect_err("stale generation");
        assert!(matches!(
            err,
            CatalogError::GenerationMismatch { current: 2, .. }
        ));
        assert!(err.to_string().contains("current generation is 2"), "{err}");
        assert_eq!(cat.get("v1").expect("get"), rec);
        assert!(matches!(
            cat.update(
                "nope",
                1,
                RecordUpdate {
                    attachments: Vec::new(),
                    parameters: BTreeMap::new(),
                    replicas: None
                }
            ),
            Err(CatalogError::NotFound(_))
        ));
    }

    #[test]
    fn update_refuses_invalid_qos_and_changes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        let before = cat.create(new_volume("v1", MIB)).expect("create").record;
        let params: BTreeMap<_, _> = [("maxIOPS".to_string(), "lots".to_string())].into();
        assert!(matches!(
            cat.update(
                "v1",
                1,
                RecordUpdate {
                    attachments: Vec::new(),
                    parameters: params,
                    replicas: None
                }
            ),
            Err(CatalogError::InvalidQos { .. })
        ));
        assert_eq!(cat.get("v1").expect("get"), before);
    }

    fn member(node: &str) -> ReplicaRef {
        ReplicaRef {
            node_id: node.into(),
            zone: String::new(),
            control_address: format!("{node}:7400"),
            data_address: format!("{node}:7401"),
        }
    }

    fn replacing(replicas: Vec<ReplicaRef>) -> RecordUpdate {
        RecordUpdate {
            replicas: Some(replicas),
            ..RecordUpdate::default()
        }
    }

    #[test]
    fn update_replaces_the_replica_set_only_with_a_valid_one() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        let mut nv = new_volume("v1", MIB);
        nv.replication_factor = 3;
        nv.replicas = ["a", "b", "c"].map(member).to_vec();
        let before = cat.create(nv).expect("create").record;
        for (set, why) in [
            (
                ["a", "b"].map(member).to_vec(),
                "2 members for a replication factor of 3",
            ),
            (["a", "b", "b"].map(member).to_vec(), "node b appears twice"),
            (
                vec![member("a"), member("b"), member("")],
                "lacks a node id",
            ),
        ] {
            let err = cat.update("v1", 1, replacing(set)).expect_err(why);
            assert!(
                matches!(err, CatalogError::InvalidReplicaSet { .. }),
                "{err}"
            );
            assert!(err.to_string().contains(why), "{err}");
            assert_eq!(cat.get("v1").expect("get"), before, "nothing changed");
        }
        let mut no_data = member("d");
        no_data.data_address.clear();
        assert!(matches!(
            cat.update("v1", 1, replacing(vec![member("a"), member("b"), no_data])),
            Err(CatalogError::InvalidReplicaSet { .. })
        ));

        let new_set = ["a", "b", "d"].map(member).to_vec();
        let rec = cat
            .update("v1", 1, replacing(new_set.clone()))
            .expect("replace");
        assert_eq!((rec.generation, &rec.replicas), (2, &new_set));
        assert!(matches!(
            cat.update("v1", 1, replacing(before.replicas.clone())),
            Err(CatalogError::GenerationMismatch { current: 2, .. })
        ));
        // An update without a set keeps the stored one; the set survives a reopen.
        cat.update("v1", 2, RecordUpdate::default())
            .expect("update");
        drop(cat);
        let cat = open(tmp.path(), Some(100 * MIB));
        let reopened = cat.get("v1").expect("get");
        assert_eq!((reopened.generation, reopened.replicas), (3, new_set));
    }

    #[test]
    fn expand_grows_only_within_capacity_and_is_a_generation_cas() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(4 * MIB));
        cat.create(new_volume("v1", MIB)).expect("create");
        let (store, _) = cat.open_store("v1").expect("store");
        assert!(matches!(
            cat.expand("v1", 7, 2 * MIB),
            Err(CatalogError::GenerationMismatch { current: 1, .. })
        ));
        assert!(matches!(
            cat.expand("v1", 1, MIB / 2),
            Err(CatalogError::Shrink { .. })
        ));
        assert!(matches!(
            cat.expand("v1", 1, 5 * MIB),
            Err(CatalogError::NoCapacity { needed, .. }) if needed == 4 * MIB
        ));
        assert!(matches!(
            cat.expand("v1", 1, MIB + 1),
            Err(CatalogError::InvalidSize { .. })
        ));
        let grown = cat.expand("v1", 1, 3 * MIB).expect("expand");
        assert_eq!((grown.size_bytes, grown.generation), (3 * MIB, 2));
        assert_eq!(store.size(), 3 * MIB);
        // A retried expansion to the size it already has answers the record as is.
        assert_eq!(cat.expand("v1", 1, 3 * MIB).expect("retry"), grown);
        assert_eq!(cat.capacity().expect("capacity").used_bytes, 3 * MIB);
    }
}
