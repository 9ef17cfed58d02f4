//! The REPLICA_SET reply (protocol version 4): the volume record's generation and
//! replica set as one replica holds it.
//!
//! An engine keeps its replica set from the publish context for as long as it
//! lives; when the controller replaces a lost replica it rewrites the set in the
//! records on a majority, and this reply is how an attached engine learns it.

use crate::publish_context::ReplicaEndpoint;
use crate::sync::{MAX_MEMBERS, MAX_MEMBER_LEN};

/// Longest data-plane address in a reply, in bytes (a `host:port`).
pub const MAX_ADDRESS_LEN: usize = 256;

/// Why bytes are not a valid REPLICA_SET reply, or a set cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid replica set: {0}")]
pub struct InvalidReplicaSet(pub &'static str);

/// A volume record's replica set, with the record's generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSet {
    /// The record's compare-and-set token. Each replica counts its own (the
    /// controller writes with each one's expected value), so it tells how recent one
    /// replica's answer is, not whether two replicas agree.
    pub generation: u64,
    /// The members in the record's order: node id and data-plane address.
    pub members: Vec<ReplicaEndpoint>,
}

impl ReplicaSet {
    /// Wire body: generation u64, count u16, then per member its node id and its
    /// data address, each a u16 length and UTF-8 bytes; all little endian. Fails
    /// rather than write what [`Self::decode`] refuses (more than [`MAX_MEMBERS`]
    /// members, an empty or overlong id or address).
    pub fn encode(&self) -> Result<Vec<u8>, InvalidReplicaSet> {
        if self.members.len() > MAX_MEMBERS {
            return Err(InvalidReplicaSet("too many members"));
        }
        let mut v = Vec::with_capacity(
            10 + self
                .members
                .iter()
                .map(|m| 4 + m.node_id.len() + m.data_address.len())
                .sum::<usize>(),
        );
        v.extend_from_slice(&self.generation.to_le_bytes());
        v.extend_from_slice(&(self.members.len() as u16).to_le_bytes());
        for m in &self.members {
            for (s, max) in [
                (&m.node_id, MAX_MEMBER_LEN),
                (&m.data_address, MAX_ADDRESS_LEN),
            ] {
                if s.is_empty() || s.len() > max {
                    return Err(InvalidReplicaSet(
                        "member id or address is empty or too long",
                    ));
                }
                // Cannot truncate: both limits are below u16::MAX.
                v.extend_from_slice(&(s.len() as u16).to_le_bytes());
                v.extend_from_slice(s.as_bytes());
            }
        }
        Ok(v)
    }

    /// Decodes [`Self::encode`]'s output, checking the limits.
    pub fn decode(b: &[u8]) -> Result<ReplicaSet, InvalidReplicaSet> {
        let bad = InvalidReplicaSet;
        let generation = b
            .get(0..8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| bad("truncated"))?;
        let mut at = 8;
        let u16_at = |at: &mut usize| -> Result<usize, InvalidReplicaSet> {
            let v = b
                .get(*at..*at + 2)
                .map(|s| usize::from(u16::from_le_bytes([s[0], s[1]])))
                .ok_or_else(|| bad("truncated"))?;
            *at += 2;
            Ok(v)
        };
        let count = u16_at(&mut at)?;
        if count > MAX_MEMBERS {
            return Err(bad("too many members"));
        }
        let text = |at: &mut usize, max: usize| -> Result<String, InvalidReplicaSet> {
            let len = u16_at(at)?;
            if len == 0 || len > max {
                return Err(bad("member id or address is empty or too long"));
            }
            let s = b.get(*at..*at + len).ok_or_else(|| bad("truncated"))?;
            *at += len;
            std::str::from_utf8(s)
                .map(str::to_owned)
                .map_err(|_| bad("member id or address is not UTF-8"))
        };
        let mut members = Vec::with_capacity(count);
        for _ in 0..count {
            let node_id = text(&mut at, MAX_MEMBER_LEN)?;
            let data_address = text(&mut at, MAX_ADDRESS_LEN)?;
            members.push(ReplicaEndpoint {
                node_id,
                data_address,
            });
        }
        if at != b.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(ReplicaSet {
            generation,
            members,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ep(node: &str, addr: &str) -> ReplicaEndpoint {
        ReplicaEndpoint {
            node_id: node.into(),
            data_address: addr.into(),
        }
    }

    #[test]
    fn round_trips_and_refuses_malformed_bodies() {
        let set = ReplicaSet {
            generation: 7,
            members: vec![ep("node-a", "10.0.0.1:7401"), ep("nöde-b", "[::1]:7402")],
        };
        let wire = set.encode().unwrap();
        assert_eq!(ReplicaSet::decode(&wire), Ok(set.clone()));
        // Every strict prefix is truncated; a byte more is trailing.
        for cut in 0..wire.len() {
            assert!(ReplicaSet::decode(&wire[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = wire.clone();
        trailing.push(0);
        assert_eq!(
            ReplicaSet::decode(&trailing),
            Err(InvalidReplicaSet("trailing bytes"))
        );
        // A count above the limit, an empty id, bytes that are not UTF-8.
        let mut many = wire.clone();
        many[8..10].copy_from_slice(&(MAX_MEMBERS as u16 + 1).to_le_bytes());
        assert!(ReplicaSet::decode(&many).is_err());
        let mut empty = ReplicaSet {
            generation: 1,
            members: vec![ep("x", "h:1")],
        }
        .encode()
        .unwrap();
        empty[10..12].copy_from_slice(&0u16.to_le_bytes());
        assert!(ReplicaSet::decode(&empty).is_err());
        let mut not_utf8 = wire.clone();
        not_utf8[12] = 0xff;
        assert!(ReplicaSet::decode(&not_utf8).is_err());
        // An overlong member is refused at encoding, not sent.
        let long = ReplicaSet {
            generation: 1,
            members: vec![ep(&"n".repeat(MAX_MEMBER_LEN + 1), "h:1")],
        };
        assert!(long.encode().is_err());
        let no_members = ReplicaSet {
            generation: 0,
            members: vec![],
        };
        assert_eq!(
            ReplicaSet::decode(&no_members.encode().unwrap()),
            Ok(no_members)
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics_and_re_encodes_what_it_accepts(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            if let Ok(set) = ReplicaSet::decode(&bytes) {
                prop_assert_eq!(set.encode().unwrap(), bytes);
            }
        }
    }
}
