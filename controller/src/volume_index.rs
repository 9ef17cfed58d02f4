//! The controller's in-memory index of volume records, and the ListVolumes page token.
//!
//! The records on the replicas are the source of truth; this index is a cache rebuilt
//! from every daemon's ListVolumes at start (per volume the highest generation wins)
//! and refreshed lazily on a miss, so the controller can restart at any moment without
//! losing a volume.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use sha2::{Digest, Sha256};
use tessera_replica_protocol::control_proto::VolumeRecord;

/// Prefix of every Tessera volume id.
pub const VOLUME_ID_PREFIX: &str = "tv-";
const TOKEN_PREFIX: &str = "lv1.";

/// The volume id for a CSI volume name: deterministic, so a CreateVolume retried after
/// a controller crash finds (and completes) the volume the first attempt started.
pub fn volume_id_for_name(name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    let mut id = String::from(VOLUME_ID_PREFIX);
    id.push_str(&hex::encode(&digest[..16]));
    id
}

/// Whether `id` has the shape of a Tessera volume id (anything else cannot exist).
pub fn is_volume_id(id: &str) -> bool {
    id.strip_prefix(VOLUME_ID_PREFIX).is_some_and(|h| {
        h.len() == 32
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Error of a ListVolumes starting token that this controller never issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("starting_token {0:?} is not a token issued by ListVolumes")]
pub struct InvalidToken(pub String);

/// Encodes the page token that resumes a listing at `volume_id` (inclusive).
pub fn encode_token(volume_id: &str) -> String {
    format!("{TOKEN_PREFIX}{}", hex::encode(volume_id.as_bytes()))
}

/// Decodes a page token into the volume id to resume at. Tokens stay valid when that
/// volume is deleted between pages: the listing resumes at the next id.
pub fn decode_token(token: &str) -> Result<String, InvalidToken> {
    let bad = || InvalidToken(token.to_string());
    let hexed = token.strip_prefix(TOKEN_PREFIX).ok_or_else(bad)?;
    let bytes = hex::decode(hexed).map_err(|_| bad())?;
    let id = String::from_utf8(bytes).map_err(|_| bad())?;
    if !is_volume_id(&id) {
        return Err(bad());
    }
    Ok(id)
}

/// Id → record and name → id, behind one lock.
#[derive(Debug, Default)]
pub struct VolumeIndex {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_id: BTreeMap<String, VolumeRecord>,
    by_name: HashMap<String, String>,
}

impl Inner {
    fn put(&mut self, rec: VolumeRecord) {
        if let Some(old) = self.by_id.get(&rec.volume_id) {
            if old.name != rec.name {
                self.by_name.remove(&old.name);
            }
        }
        self.by_name.insert(rec.name.clone(), rec.volume_id.clone());
        self.by_id.insert(rec.volume_id.clone(), rec);
    }
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Records in volume id order.
    pub records: Vec<VolumeRecord>,
    /// Token for the next page, when more records follow.
    pub next_token: Option<String>,
}

impl VolumeIndex {
    /// Builds an index from the records of all daemons: per volume id the record with
    /// the highest generation wins.
    pub fn from_records(records: impl IntoIterator<Item = VolumeRecord>) -> Self {
        let idx = Self::default();
        for r in records {
            idx.merge(r);
        }
        idx
    }

    /// Inserts `rec` unless the index holds a record of that volume with a higher
    /// generation (a stale replica must never roll the cache back).
    pub fn merge(&self, rec: VolumeRecord) {
        let mut g = self.write();
        if g.by_id
            .get(&rec.volume_id)
            .is_some_and(|cur| newer(cur, &rec))
        {
            return;
        }
        g.put(rec);
    }

    /// Replaces the record unconditionally (after this controller updated it).
    pub fn upsert(&self, rec: VolumeRecord) {
        self.write().put(rec);
    }

    /// Forgets a volume (after every replica confirmed its deletion).
    pub fn remove(&self, volume_id: &str) {
        let mut g = self.write();
        if let Some(rec) = g.by_id.remove(volume_id) {
            if g.by_name.get(&rec.name).is_some_and(|id| id == volume_id) {
                g.by_name.remove(&rec.name);
            }
        }
    }

    /// The cached record of `volume_id`.
    pub fn get(&self, volume_id: &str) -> Option<VolumeRecord> {
        self.read().by_id.get(volume_id).cloned()
    }

    /// The cached record of the volume named `name`.
    pub fn get_by_name(&self, name: &str) -> Option<VolumeRecord> {
        let g = self.read();
        g.by_name.get(name).and_then(|id| g.by_id.get(id)).cloned()
    }

    /// Number of volumes known.
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    /// Whether no volume is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All records, ordered by volume id.
    pub fn all(&self) -> Vec<VolumeRecord> {
        self.read().by_id.values().cloned().collect()
    }

    /// A page of at most `max_entries` records (0 = all) starting at `start` (inclusive).
    pub fn page(&self, start: Option<&str>, max_entries: usize) -> Page {
        let g = self.read();
        let iter: Box<dyn Iterator<Item = (&String, &VolumeRecord)>> = match start {
            Some(s) => Box::new(
                g.by_id
                    .range::<str, _>((std::ops::Bound::Included(s), std::ops::Bound::Unbounded)),
            ),
            None => Box::new(g.by_id.iter()),
        };
        let limit = if max_entries == 0 {
            usize::MAX
        } else {
            max_entries
        };
        let mut records = Vec::new();
        let mut next_token = None;
        for (id, rec) in iter {
            if records.len() == limit {
                next_token = Some(encode_token(id));
                break;
            }
            records.push(rec.clone());
        }
        Page {
            records,
            next_token,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated (each
        // mutation is a single insert/remove), so a poisoned lock is still usable.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether `a` is strictly newer than `b` (generation, then epoch as a tie-break).
pub fn newer(a: &VolumeRecord, b: &VolumeRecord) -> bool {
    (a.generation, a.epoch) > (b.generation, b.epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, generation: u64) -> VolumeRecord {
        VolumeRecord {
            volume_id: volume_id_for_name(name),
            name: name.into(),
            generation,
            ..Default::default()
        }
    }

    #[test]
    fn ids_are_deterministic_and_well_formed() {
        let a = volume_id_for_name("pvc-1");
        assert_eq!(a, volume_id_for_name("pvc-1"));
        assert_ne!(a, volume_id_for_name("pvc-2"));
        assert_eq!(a.len(), 3 + 32);
        assert!(is_volume_id(&a));
        assert!(!is_volume_id("tv-XYZ"));
        assert!(!is_volume_id("vol-1"));
        assert!(!is_volume_id(&format!("{a}0")));
    }

    #[test]
    fn rebuild_keeps_highest_generation() {
        let mut old = rec("a", 3);
        old.size_bytes = 1;
        let mut new = rec("a", 5);
        new.size_bytes = 2;
        let idx = VolumeIndex::from_records([old.clone(), new.clone(), old]);
        assert_eq!(idx.len(), 1);
        assert_eq!(idx.get(&new.volume_id).map(|r| r.size_bytes), Some(2));
        assert_eq!(idx.get_by_name("a").map(|r| r.generation), Some(5));
    }

    #[test]
    fn remove_clears_both_maps() {
        let idx = VolumeIndex::from_records([rec("a", 1), rec("b", 1)]);
        idx.remove(&volume_id_for_name("a"));
        assert!(idx.get_by_name("a").is_none());
        assert!(idx.get(&volume_id_for_name("a")).is_none());
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn pagination_walks_everything_once() {
        let idx = VolumeIndex::from_records((0..10).map(|i| rec(&format!("v{i}"), 1)));
        let mut seen = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let start = token.as_deref().map(|t| decode_token(t).unwrap());
            let page = idx.page(start.as_deref(), 3);
            assert!(page.records.len() <= 3);
            seen.extend(page.records.iter().map(|r| r.volume_id.clone()));
            match page.next_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(seen, sorted);
        assert_eq!(seen.len(), 10);
        // Unlimited page returns everything without a token.
        let all = idx.page(None, 0);
        assert_eq!(all.records.len(), 10);
        assert!(all.next_token.is_none());
        // A page that ends exactly at the last record needs no token.
        assert!(idx.page(None, 10).next_token.is_none());
    }

    #[test]
    fn token_survives_deletion_of_its_volume() {
        let idx = VolumeIndex::from_records((0..4).map(|i| rec(&format!("v{i}"), 1)));
        let first = idx.page(None, 2);
        let token = first.next_token.unwrap();
        let resume = decode_token(&token).unwrap();
        idx.remove(&resume);
        let second = idx.page(Some(&resume), 0);
        assert_eq!(second.records.len(), 1);
        assert!(second.records[0].volume_id > first.records[1].volume_id);
    }

    #[test]
    fn garbage_tokens_are_rejected() {
        for t in [
            "invalid-token",
            "lv1.zz",
            "lv1.",
            "lv1.00ff",
            &encode_token("not-a-volume"),
            "tv-0",
        ] {
            assert!(decode_token(t).is_err(), "{t}");
        }
        let id = volume_id_for_name("x");
        assert_eq!(decode_token(&encode_token(&id)), Ok(id));
    }
}
