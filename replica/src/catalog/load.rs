//! Opening a data directory: its lock, the leftovers of interrupted creates, deletes
//! and record updates removed, every volume's record loaded and its store opened (a
//! volume that fails either is quarantined, not fatal).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use tessera_telemetry::error_chain;
use tracing::{info, warn};

use super::error::io_error;
use super::io_registration::{self, VolumeIo};
use super::lock::lock_data_dir;
use super::{
    validate_volume_id, Catalog, CatalogError, CatalogIo, Entry, QuarantinedVolume,
    CREATING_PREFIX, DELETING_PREFIX, RECORD_FILE, STORE_DIR, VOLUMES_DIR,
};
use crate::capacity;
use crate::record::{self, VolumeRecord};
use crate::store::LayeredStore;

/// Settings for [`Catalog::open`].
#[derive(Debug, Clone)]
pub struct CatalogConfig {
    /// The daemon's data directory; created if missing.
    pub data_dir: PathBuf,
    /// Bytes offered to volumes; `None` means the backing filesystem's size.
    pub capacity_bytes: Option<u64>,
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
    /// its blocks through it (see [`CatalogIo`]); `None` uses std file I/O.
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
                let volume = QuarantinedVolume::unloadable(name.clone(), reason, &path);
                quarantined.insert(name, volume);
            }
        }
    }
    if cleaned {
        record::sync_dir(volumes_dir).map_err(io_error("sync", volumes_dir))?;
    }
    Ok((volumes, quarantined))
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
    let volume_io = io
        .map(|io| VolumeIo::register_loaded(io, name, &record.parameters))
        .transpose()
        .map_err(|e| error_chain(&e))?;
    let store = io_registration::open_store(volume_io.as_ref(), &dir.join(STORE_DIR))
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
    use crate::catalog::RecordUpdate;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::catalog::test_support::{dir_names, new_volume, open, MIB};
    use crate::record::Attachment;

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
                RecordUpdate {
                    attachments: vec![Attachment {
                        node_id: "n".into(),
                        readonly: true,
                    }],
                    parameters: BTreeMap::new(),
                    replicas: None,
                },
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
}
