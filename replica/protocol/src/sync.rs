//! What a replica tells an engine about how in sync its copy is: its dirty regions
//! (the activity log) and the in-sync set an engine last declared.
//!
//! Both are values on the wire (DIRTY_REGIONS, GET/SET_MEMBERSHIP) and in the
//! replica's files; the replica owns how they are kept durable, the engine how they
//! are reconciled.

use crate::block::BLOCK_SIZE;

/// Most replicas a declaration may name (the engine's replica-set limit).
pub const MAX_MEMBERS: usize = 32;
/// Longest node id in a declaration, in bytes.
pub const MAX_MEMBER_LEN: usize = 256;

/// Why bytes are not a valid in-sync record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid membership: {0}")]
pub struct InvalidMembership(pub &'static str);

/// A copy of a replica's dirty regions, as sent to an engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMap {
    /// Bytes per region.
    pub region_size: u64,
    /// Number of regions the bitmap covers.
    pub regions: u64,
    /// One bit per region (bit r % 8 of byte r / 8).
    pub bits: Vec<u8>,
}

impl DirtyMap {
    /// A map of `regions` regions, none dirty.
    pub fn clean(region_size: u64, regions: u64) -> DirtyMap {
        DirtyMap {
            region_size,
            regions,
            bits: vec![0; bytes_for(regions)],
        }
    }

    /// Whether region `r` is dirty (regions past the map are clean).
    pub fn is_dirty(&self, r: u64) -> bool {
        r < self.regions
            && self
                .bits
                .get((r / 8) as usize)
                .is_some_and(|b| b & (1 << (r % 8)) != 0)
    }

    /// Marks region `r` dirty, growing the map if needed.
    pub fn set(&mut self, r: u64) {
        if r >= self.regions {
            self.regions = r + 1;
            self.bits.resize(bytes_for(self.regions), 0);
        }
        self.bits[(r / 8) as usize] |= 1 << (r % 8);
    }

    /// The dirty regions in ascending order.
    pub fn dirty(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.regions).filter(|&r| self.is_dirty(r))
    }

    /// How many regions are dirty.
    pub fn count(&self) -> u64 {
        self.dirty().count() as u64
    }

    /// Adds every dirty region of `other` (same region size) to this map.
    pub fn union(&mut self, other: &DirtyMap) {
        for r in other.dirty() {
            self.set(r);
        }
    }

    /// The wire and file body: region size, region count, bits.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.bits.len());
        v.extend_from_slice(&self.region_size.to_le_bytes());
        v.extend_from_slice(&self.regions.to_le_bytes());
        v.extend_from_slice(&self.bits);
        v
    }

    /// Decodes [`Self::encode`]'s output; `None` if it is malformed.
    pub fn decode(b: &[u8]) -> Option<DirtyMap> {
        let region_size = u64::from_le_bytes(b.get(0..8)?.try_into().ok()?);
        let regions = u64::from_le_bytes(b.get(8..16)?.try_into().ok()?);
        let bits = b.get(16..)?;
        if region_size == 0
            || region_size % BLOCK_SIZE != 0
            || bits.len() as u64 != regions.div_ceil(8)
        {
            return None;
        }
        Some(DirtyMap {
            region_size,
            regions,
            bits: bits.to_vec(),
        })
    }
}

fn bytes_for(regions: u64) -> usize {
    usize::try_from(regions.div_ceil(8)).unwrap_or(usize::MAX)
}

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
    pub fn decode(b: &[u8]) -> Result<Membership, InvalidMembership> {
        let bad = InvalidMembership;
        let u64_at = |at: usize| -> Result<u64, InvalidMembership> {
            b.get(at..at + 8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| bad("truncated"))
        };
        let u16_at = |at: usize| -> Result<usize, InvalidMembership> {
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

#[cfg(test)]
mod tests {
    use super::*;

    const REGION_SIZE: u64 = 4 << 20;

    #[test]
    fn a_map_grows_past_its_end_and_round_trips() {
        let mut m = DirtyMap::clean(REGION_SIZE, 2);
        m.set(9);
        assert_eq!(m.regions, 10);
        assert!(m.is_dirty(9) && !m.is_dirty(8) && !m.is_dirty(100));
        assert_eq!(DirtyMap::decode(&m.encode()), Some(m.clone()));
        assert_eq!(DirtyMap::decode(&m.encode()[..17]), None);
        let unaligned = DirtyMap {
            region_size: 1000,
            ..m.clone()
        };
        assert_eq!(DirtyMap::decode(&unaligned.encode()), None);
        let mut other = DirtyMap::clean(REGION_SIZE, 1);
        other.set(0);
        m.union(&other);
        assert_eq!(m.dirty().collect::<Vec<_>>(), vec![0, 9]);
    }

    #[test]
    fn bad_membership_bodies_are_refused() {
        let decl = |epoch, version, members: &[&str]| Membership {
            epoch,
            version,
            members: members.iter().map(|s| s.to_string()).collect(),
        };
        let good = decl(1, 2, &["node-a", "node-b"]).encode();
        assert_eq!(
            Membership::decode(&good),
            Ok(decl(1, 2, &["node-a", "node-b"]))
        );
        assert!(Membership::decode(&good[..good.len() - 1]).is_err());
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(Membership::decode(&trailing).is_err());
        let mut many = decl(1, 1, &[]).encode();
        many[16..18].copy_from_slice(&(MAX_MEMBERS as u16 + 1).to_le_bytes());
        assert!(Membership::decode(&many).is_err());
    }
}
