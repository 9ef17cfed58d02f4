//! Quarantine: a volume whose record cannot be read, or whose block store cannot be
//! opened, at start is *quarantined*: logged at error level, left untouched on disk,
//! counted against capacity, not listed, not served on the data plane, and refused by
//! create until an operator (or an explicit delete) resolves it. A volume whose store
//! no longer opens after a failed delete is quarantined the same way.

use std::path::Path;

use tracing::{error, warn};

use super::{Catalog, CatalogError, RECORD_FILE, STORE_DIR};
use crate::record;
use crate::store::LayeredStore;

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

impl QuarantinedVolume {
    /// The volume in `dir` that cannot be loaded for `reason`: logged, and charged its
    /// size as far as it can be read.
    pub(super) fn unloadable(volume_id: String, reason: String, dir: &Path) -> Self {
        error!(volume_id = %volume_id, path = %dir.display(), %reason,
            "volume skipped: its directory cannot be loaded; left untouched for an operator");
        QuarantinedVolume {
            data_bytes: quarantined_size(dir),
            volume_id,
            reason,
        }
    }
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

impl Catalog {
    /// Volumes skipped at start because they could not be loaded.
    pub fn quarantined(&self) -> Vec<QuarantinedVolume> {
        self.read_quarantined().values().cloned().collect()
    }

    /// Takes a volume that is no longer served into quarantine.
    pub(super) fn quarantine(&self, volume: QuarantinedVolume) {
        self.write_quarantined()
            .insert(volume.volume_id.clone(), volume);
    }

    /// The error for a request naming a quarantined volume.
    pub(super) fn quarantined_error(&self, q: &QuarantinedVolume) -> CatalogError {
        CatalogError::Quarantined {
            volume_id: q.volume_id.clone(),
            reason: q.reason.clone(),
            path: self.volume_dir(&q.volume_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::catalog::test_support::{dir_names, new_volume, open, MIB};

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
}
