//! Helpers shared by the catalog's unit tests.

use std::fs;
use std::path::Path;

use super::{Catalog, CatalogConfig, NewVolume};
use crate::record::{CopySource, ReplicaRef};

pub const MIB: u64 = 1 << 20;

/// Opens (creating) a catalog on `dir` with std file I/O.
pub fn open(dir: &Path, capacity: Option<u64>) -> Catalog {
    Catalog::open(CatalogConfig {
        data_dir: dir.to_path_buf(),
        capacity_bytes: capacity,
    })
    .expect("open catalog")
}

/// A plain volume of `size` bytes, replication factor 3.
pub fn new_volume(id: &str, size: u64) -> NewVolume {
    NewVolume {
        volume_id: id.to_string(),
        name: format!("pv-{id}"),
        size_bytes: size,
        replication_factor: 3,
        parameters: [("fsType".to_string(), "ext4".to_string())].into(),
        ..NewVolume::default()
    }
}

/// The names in `dir`, sorted.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Snapshot `snapshot` (1 MiB) of volume "src", held by three replicas.
pub fn source(snapshot: &str) -> CopySource {
    CopySource {
        snapshot_id: snapshot.into(),
        source_volume_id: "src".into(),
        source_replication_factor: 3,
        holders: ["a", "b", "c"]
            .iter()
            .map(|n| ReplicaRef {
                node_id: (*n).into(),
                control_address: format!("{n}:7400"),
                ..ReplicaRef::default()
            })
            .collect(),
        size_bytes: MIB,
        clone: false,
        ..CopySource::default()
    }
}

/// A restore of `src` into a new volume `id` of `size` bytes.
pub fn restore(id: &str, size: u64, src: CopySource) -> NewVolume {
    NewVolume {
        volume_id: id.into(),
        name: id.into(),
        size_bytes: size,
        replication_factor: 3,
        copy_source: Some(src),
        ..NewVolume::default()
    }
}
