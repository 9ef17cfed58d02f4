//! Declaring a rebuilt copy of a detached volume in sync.
//!
//! In-sync records are the engines' (data-plane SET_MEMBERSHIP at their epoch). A
//! volume rebuilt while detached has no engine, yet its new copy must count: if
//! another member is lost before the next attach, the volume needs it for a majority.
//! The controller may declare it because it fenced the volume before the copy
//! began (`fence_epoch`) and the epoch has not moved since: no engine wrote while
//! the copy read the holders' heads, so it holds, per block, the highest version of
//! a majority of the set, which is every acknowledged write. The declaration is made
//! at the fence epoch, one version above the newest record, keeping the members that
//! record names (and that are still in the set) and adding the copy. The next engine
//! takes the epoch higher and declares again.

use tessera_replica_protocol::control_proto::VolumeRecord;
use tessera_replica_protocol::data::client::{ClientConfig, ReplicaDataClient};
use tessera_replica_protocol::sync::Membership;

use super::{HealError, Healer};
use crate::quorum::{majority, ReplicaFailure};
use crate::replica_pool::join_all;

impl Healer {
    /// Declares member `member` of `cur` in sync at the fence epoch `fence`
    /// (module doc).
    pub(super) async fn declare(
        &self,
        cur: &VolumeRecord,
        member: usize,
        fence: u64,
    ) -> Result<(), HealError> {
        let pool = self.volumes.pool();
        let set: Vec<_> = cur.replicas.iter().map(|r| pool.resolve_ref(r)).collect();
        let node = set[member].node_id.clone();
        let fail = |reason: String| HealError::Declare {
            volume: cur.volume_id.clone(),
            node: node.clone(),
            reason,
        };
        let clients = join_all(set.iter().map(|r| {
            ReplicaDataClient::connect_with(
                r.data_address.clone(),
                &cur.volume_id,
                fence,
                ClientConfig {
                    transport: pool.transport().clone(),
                    ..ClientConfig::default()
                },
            )
        }))
        .await;
        let connected: Vec<(&str, ReplicaDataClient)> = set
            .iter()
            .zip(clients)
            .filter_map(|(r, c)| match c {
                Ok(c) => Some((r.node_id.as_str(), c)),
                Err(e) => {
                    tracing::debug!(volume = %cur.volume_id, node = %r.node_id, error = %e,
                        "not reachable for the declaration");
                    None
                }
            })
            .collect();
        let held = join_all(connected.iter().map(|(_, c)| c.membership())).await;
        let newest = held
            .into_iter()
            .filter_map(Result::ok)
            .max_by_key(Membership::key)
            .ok_or_else(|| fail("no replica reported its in-sync record".into()))?;
        if newest.is_undeclared() {
            // Nothing declared yet: every replica counts as in sync already.
            return Ok(());
        }
        let mut members: Vec<String> = newest
            .members
            .iter()
            .filter(|m| set.iter().any(|r| &r.node_id == *m))
            .cloned()
            .chain(std::iter::once(node.clone()))
            .collect();
        members.sort();
        members.dedup();
        let next = Membership {
            epoch: fence,
            version: if newest.epoch == fence {
                newest.version + 1
            } else {
                1
            },
            members,
        };
        let stored = join_all(connected.iter().map(|(_, c)| c.set_membership(&next))).await;
        let confirmed = stored
            .iter()
            .filter(|s| s.as_ref().is_ok_and(|m| m.key() == next.key()))
            .count();
        if confirmed < majority(set.len()) {
            let why: Vec<String> = connected
                .iter()
                .zip(&stored)
                .filter_map(|((n, _), s)| match s {
                    Ok(m) if m.key() == next.key() => None,
                    Ok(m) => Some(format!("{n}: holds newer record {:?}", m.key())),
                    Err(e) => Some(format!(
                        "{n}: {}",
                        ReplicaFailure::Unreachable(e.to_string())
                    )),
                })
                .collect();
            return Err(fail(format!(
                "{confirmed} of {} replicas stored it: {}",
                set.len(),
                why.join("; ")
            )));
        }
        tracing::info!(volume = %cur.volume_id, node = %node, epoch = fence, version = next.version,
            members = ?next.members, "rebuilt replica declared in sync");
        self.metrics.count_rebuild_declared();
        Ok(())
    }
}
