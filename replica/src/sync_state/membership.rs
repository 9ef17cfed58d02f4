//! The in-sync set an engine declared for a volume, as this replica last stored it.
//!
//! A declaration is ordered by (epoch, version): a replica replaces its record only
//! with a newer one ([`MembershipFile::store_if_newer`]). Within an epoch only one
//! engine writes (the data plane fences lower epochs), and it numbers its
//! declarations, so newer-wins is the compare-and-set it needs; a new engine reads
//! the records of a majority and takes the newest.
//!
//! File (`in-sync`): crc32c (u32 LE) of the body, then the body as
//! [`Membership::encode`] writes it; replaced atomically (temp file, fsync, rename,
//! directory fsync).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::SyncStateError;
use tessera_replica_protocol::sync::Membership;

/// The membership record of one volume replica, in memory and on disk.
#[derive(Debug)]
pub struct MembershipFile {
    path: PathBuf,
    current: Mutex<Membership>,
}

impl MembershipFile {
    /// Loads the record at `path`; a missing or damaged one reads as undeclared.
    pub fn load(path: &Path) -> MembershipFile {
        let current = match fs::read(path) {
            Ok(bytes) => decode_file(&bytes).unwrap_or_else(|| {
                tracing::warn!(path = %path.display(), "membership record is damaged; it reads as undeclared");
                Membership::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Membership::default(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "membership record is unreadable; it reads as undeclared");
                Membership::default()
            }
        };
        MembershipFile {
            path: path.to_path_buf(),
            current: Mutex::new(current),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Membership> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stored declaration.
    pub fn get(&self) -> Membership {
        self.lock().clone()
    }

    /// Stores `new` durably if it is newer than the stored one; returns the stored
    /// one afterwards (so the caller sees whether it won). Blocking: fsyncs.
    pub fn store_if_newer(&self, new: &Membership) -> Result<Membership, SyncStateError> {
        let mut current = self.lock();
        if new.key() <= current.key() {
            return Ok(current.clone());
        }
        write_file(&self.path, new)?;
        *current = new.clone();
        Ok(current.clone())
    }
}

pub(crate) fn decode_file(bytes: &[u8]) -> Option<Membership> {
    let (crc, body) = bytes.split_at_checked(4)?;
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return None;
    }
    Membership::decode(body).ok()
}

fn write_file(path: &Path, m: &Membership) -> Result<(), SyncStateError> {
    let body = m.encode();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)
            .map_err(SyncStateError::io("create", &tmp))?;
        f.write_all(&crc32c::crc32c(&body).to_le_bytes())
            .and_then(|()| f.write_all(&body))
            .and_then(|()| f.sync_all())
            .map_err(SyncStateError::io("write", &tmp))?;
        fs::rename(&tmp, path).map_err(SyncStateError::io("rename", path))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(SyncStateError::io("sync directory of", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decl(epoch: u64, version: u64, members: &[&str]) -> Membership {
        Membership {
            epoch,
            version,
            members: members.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn only_newer_declarations_replace_and_they_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in-sync");
        let f = MembershipFile::load(&path);
        assert!(f.get().is_undeclared());
        assert!(f.get().includes("anyone"));
        let a = decl(3, 1, &["a", "b"]);
        assert_eq!(f.store_if_newer(&a).unwrap(), a);
        assert_eq!(f.store_if_newer(&decl(2, 9, &["c"])).unwrap(), a);
        assert_eq!(f.store_if_newer(&decl(3, 1, &["c"])).unwrap(), a);
        let b = decl(3, 2, &["a"]);
        assert_eq!(f.store_if_newer(&b).unwrap(), b);
        assert!(!b.includes("b"));
        assert_eq!(MembershipFile::load(&path).get(), b);
        assert!(!dir.path().join("in-sync.tmp").exists());
    }

    #[test]
    fn damaged_records_read_as_undeclared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in-sync");
        let f = MembershipFile::load(&path);
        f.store_if_newer(&decl(1, 1, &["a"])).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(MembershipFile::load(&path).get().is_undeclared());
    }
}
