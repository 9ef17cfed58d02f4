//! The generation compare-and-set mutations of a volume: its attachments and
//! parameters (QoS applied live), and its size. `generation` is the controller's
//! token: each of these bumps it, and each is refused unless the caller names the
//! current one.

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::info;

use super::error::store_error;
use super::io_registration::requested_qos;
use super::validate::validate_size;
use super::{validate_volume_id, Catalog, CatalogError};
use crate::record::{Attachment, VolumeRecord};

impl Catalog {
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
        let qos = requested_qos(volume_id, &parameters)?;
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
    fn update_refuses_invalid_qos_and_changes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        let before = cat.create(new_volume("v1", MIB)).expect("create").record;
        let params: BTreeMap<_, _> = [("maxIOPS".to_string(), "lots".to_string())].into();
        assert!(matches!(
            cat.update("v1", 1, Vec::new(), params),
            Err(CatalogError::InvalidQos { .. })
        ));
        assert_eq!(cat.get("v1").expect("get"), before);
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
