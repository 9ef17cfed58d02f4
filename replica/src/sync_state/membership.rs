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

/// Most replicas a declaration may name (the engine's replica-set limit).
pub const MAX_MEMBERS: usize = 32;
/// Longest node id in a declaration, in bytes.
pub const MAX_MEMBER_LEN: usize = 256;

/// One declaration of which replicas (by node id) hold every acknowledged write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// Epoch of the engine that declared it; 0 with version 0 means "never declared"
    /// (a new volume: every replica of the set is in sync).
    pub epoch: u64,
    /// Declaration number within the epoch, from 1.
    pub version: u64,
    /// Node ids of the replicas in sync, sorted.
    pub members: Vec<String>,
}

impl Membership {
    /// Whether nothing was ever declared.
    pub fn is_undeclared(&self) -> bool {
        self.epoch == 0 && self.version == 0
    }

    /// The order in which declarations replace each other.
    pub fn key(&self) -> (u64, u64) {
        (self.epoch, self.version)
    }

    /// Whether `node_id` is in sync by this declaration (everyone is, if none).
    pub fn includes(&self, node_id: &str) -> bool {
        self.is_undeclared() || self.members.iter().any(|m| m == node_id)
    }

    /// Wire and file body: epoch, version, count (u16), then per member a u16
    /// length and its UTF-8 bytes; all little endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut v =
            Vec::with_capacity(18 + self.members.iter().map(|m| m.len() + 2).sum::<usize>());
        v.extend_from_slice(&self.epoch.to_le_bytes());
        v.extend_from_slice(&self.version.to_le_bytes());
        v.extend_from_slice(&(self.members.len() as u16).to_le_bytes());
        for m in &self.members {
            v.extend_from_slice(&(m.len() as u16).to_le_bytes());
            v.extend_from_slice(m.as_bytes());
        }
        v
    }

    /// Decodes [`Self::encode`]'s output, checking the limits.
    pub fn decode(b: &[u8]) -> Result<Membership, SyncStateError> {
        let bad = |why: &str| SyncStateError::InvalidMembership(why.to_owned());
        let u64_at = |at: usize| -> Result<u64, SyncStateError> {
            b.get(at..at + 8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| bad("truncated"))
        };
        let u16_at = |at: usize| -> Result<usize, SyncStateError> {
            b.get(at..at + 2)
                .map(|s| usize::from(u16::from_le_bytes([s[0], s[1]])))
                .ok_or_else(|| bad("truncated"))
        };
        let epoch = u64_at(0)?;
        let version = u64_at(8)?;
        let count = u16_at(16)?;
        if count > MAX_MEMBERS {
            return Err(bad("too many members"));
        }
        let mut at = 18;
        let mut members = Vec::with_capacity(count);
        for _ in 0..count {
            let len = u16_at(at)?;
            at += 2;
            if len == 0 || len > MAX_MEMBER_LEN {
                return Err(bad("member id is empty or too long"));
            }
            let id = b.get(at..at + len).ok_or_else(|| bad("truncated"))?;
            let id = std::str::from_utf8(id).map_err(|_| bad("member id is not UTF-8"))?;
            members.push(id.to_owned());
            at += len;
        }
        if at != b.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(Membership {
            epoch,
            version,
            members,
        })
    }
}

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

fn decode_file(bytes: &[u8]) -> Option<Membership> {
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
    fn damaged_records_read_as_undeclared_and_bad_bodies_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in-sync");
        let f = MembershipFile::load(&path);
        f.store_if_newer(&decl(1, 1, &["a"])).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(MembershipFile::load(&path).get().is_undeclared());

        let good = decl(1, 2, &["node-a", "node-b"]).encode();
        assert!(Membership::decode(&good).is_ok());
        assert!(Membership::decode(&good[..good.len() - 1]).is_err());
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(Membership::decode(&trailing).is_err());
        let mut many = decl(1, 1, &[]).encode();
        many[16..18].copy_from_slice(&(MAX_MEMBERS as u16 + 1).to_le_bytes());
        assert!(Membership::decode(&many).is_err());
    }
}
