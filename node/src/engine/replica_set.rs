//! Learning that the controller replaced a member of the replica set while the
//! engine serves (DESIGN.md "Recovery", issue 15 item 3).
//!
//! The engine gets its replica set from the publish context once; when a replica
//! daemon is lost for good, the controller picks another daemon, rewrites the set
//! in the volume record on a majority of the replicas (a compare-and-set) and has
//! the new daemon build its copy. Every `replica_set_poll` the engine asks its
//! in-sync replicas for the record's set (REPLICA_SET, data plane v4; older
//! replicas are not asked) and **adopts a set only when a majority of its slot
//! count answered with exactly that set**: a set only some replicas hold may be
//! half of a change the controller has not completed (or will retry differently),
//! and any two majorities meet, so two different sets can never both be adopted.
//!
//! On adoption:
//! * a member with the node id of a slot but another data address gives the slot
//!   its new address: a stale slot uses it at its next reconnection, a connected
//!   one keeps its connection until it fails;
//! * a slot whose node id the set no longer names is taken over by a member no slot
//!   holds: it is marked stale first, through the path every failing replica takes
//!   (declared out of the in-sync set; its writes in flight stop counting), its
//!   connection is dropped, and it becomes the new member with the flag that makes
//!   its catch-up compare the whole volume (the dirty maps only bound what a former
//!   member missed; see `resync`). The reconnector then brings it in like any
//!   stale replica, with its backoff: a new member still being populated answers
//!   UNKNOWN_VOLUME and is simply tried again.
//!
//! The slot count never changes (the replication factor is fixed): a set of
//! another size is logged and ignored.

use std::collections::HashMap;

use tessera_replica_protocol::publish_context::ReplicaEndpoint;

use super::*;

/// Starts the engine's replica-set poller (module doc); it ends with the engine.
pub(super) fn spawn_poller(inner: &Arc<Inner>) {
    let weak = Arc::downgrade(inner);
    let interval = inner.replica_set_poll;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let Some(inner) = weak.upgrade() else { return };
            if inner.check_usable().is_err() {
                return;
            }
            if let Some(set) = inner.agreed_replica_set().await {
                inner.adopt_replica_set(&set);
            }
        }
    });
}

/// A set's members in a canonical order (node id, address), for comparing answers.
type Canonical = Vec<(String, String)>;

/// `members` as a [`Canonical`] set.
fn canonical(members: &[ReplicaEndpoint]) -> Canonical {
    let mut v: Vec<(String, String)> = members
        .iter()
        .map(|m| (m.node_id.clone(), m.data_address.clone()))
        .collect();
    v.sort();
    v
}

impl Inner {
    /// Asks the in-sync replicas that speak v4 for the replica set and returns the
    /// one a majority of the slot count answered with, if any. A replica that fails
    /// to answer is not marked stale (the I/O paths judge replicas); one that
    /// reports a newer epoch fences the engine.
    async fn agreed_replica_set(&self) -> Option<Vec<ReplicaEndpoint>> {
        let asks = bits(self.in_sync_mask()).filter_map(|r| {
            let client = self.replicas[r]
                .live_client()
                .filter(ReplicaDataClient::supports_replica_set)?;
            Some(async move {
                match tokio::time::timeout(self.timeout, client.replica_set()).await {
                    Ok(Ok(set)) => {
                        Counters::add(&self.counters.replica_set_answers, 1);
                        // A record without a set (made without one, by tests or
                        // tools) says nothing about the engine's.
                        Some(set.members).filter(|m| !m.is_empty())
                    }
                    Ok(Err(e)) if e.code() == Some(ErrorCode::StaleEpoch) => {
                        self.fence(r, &e);
                        None
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(volume = %self.volume_id, node = %self.replicas[r].node(),
                            error = %error_chain(&e), "asking for the replica set failed");
                        None
                    }
                    Err(_) => None,
                }
            })
        });
        let answers: Vec<Vec<ReplicaEndpoint>> = futures_util::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect();
        let mut votes: HashMap<Canonical, (usize, Vec<ReplicaEndpoint>)> = HashMap::new();
        for members in answers {
            let vote = votes.entry(canonical(&members)).or_insert((0, members));
            vote.0 += 1;
        }
        votes
            .into_values()
            .find(|(count, _)| *count >= self.quorum)
            .map(|(_, members)| members)
    }

    /// Makes the slots stand for `set` (module doc).
    fn adopt_replica_set(&self, set: &[ReplicaEndpoint]) {
        let current: Vec<Arc<Identity>> = self.replicas.iter().map(Replica::id).collect();
        let held = |node: &str| current.iter().any(|id| id.node_id == node);
        let distinct = set
            .iter()
            .enumerate()
            .all(|(i, m)| set[..i].iter().all(|o| o.node_id != m.node_id));
        if set.len() != self.replicas.len() || !distinct {
            // Once per such set, not at every poll.
            let mut rejected = lock(&self.rejected_set);
            if *rejected != canonical(set) {
                *rejected = canonical(set);
                tracing::warn!(volume = %self.volume_id, slots = self.replicas.len(),
                    members = ?set.iter().map(|m| &m.node_id).collect::<Vec<_>>(),
                    "replica set agreed on by a majority does not fit the engine's slots; ignored");
            }
            return;
        }
        for (r, id) in current.iter().enumerate() {
            let Some(m) = set.iter().find(|m| m.node_id == id.node_id) else {
                continue;
            };
            if m.data_address != id.address {
                let mut slot = lock(&self.replicas[r].identity);
                tracing::info!(volume = %self.volume_id, node = %slot.node_id,
                    from = %slot.address, to = %m.data_address, "replica moved to a new data address");
                *slot = Arc::new(Identity {
                    address: m.data_address.clone(),
                    ..(**slot).clone()
                });
            }
        }
        let newcomers = set.iter().filter(|m| !held(&m.node_id));
        let leaving =
            (0..current.len()).filter(|&r| !set.iter().any(|m| m.node_id == current[r].node_id));
        let mut taken = 0;
        for (r, member) in leaving.zip(newcomers) {
            self.take_over(r, member);
            taken += 1;
        }
        if taken > 0 {
            let local = self
                .replicas
                .iter()
                .position(|rep| rep.id().node_id == self.local_node_id)
                .unwrap_or(NO_LOCAL);
            self.local.store(local, Ordering::Relaxed);
            tracing::info!(volume = %self.volume_id,
                from = ?current.iter().map(|id| id.node_id.as_str()).collect::<Vec<_>>(),
                to = ?self.replicas.iter().map(|rep| rep.id().node_id.clone()).collect::<Vec<_>>(),
                "replica set changed");
        }
    }

    /// Gives slot `r` to `member`: out of sync first, then a new identity whose
    /// catch-up compares the whole volume.
    fn take_over(&self, r: usize, member: &ReplicaEndpoint) {
        let rep = &self.replicas[r];
        let old = rep.id();
        let reason = format!(
            "replaced {} in the volume's replica set; not caught up yet",
            old.node_id
        );
        self.mark_stale(r, reason.clone());
        // The former member's failure is not the new one's.
        *lock(&rep.stale_info) = Some((reason, SystemTime::now()));
        {
            let mut id = lock(&rep.identity);
            // A resync of the former member may have made it resyncing or in sync
            // again since: under this lock it is stale for good.
            rep.state.store(STALE, Ordering::SeqCst);
            lock(&rep.client).take();
            *id = Arc::new(Identity {
                node_id: member.node_id.clone(),
                address: member.data_address.clone(),
                generation: id.generation + 1,
                full_compare: true,
            });
        }
        Counters::add(&self.counters.replica_set_changes, 1);
        self.sync_changed.notify_one();
        tracing::warn!(volume = %self.volume_id, from = %old.node_id, to = %member.node_id,
            address = %member.data_address,
            "replica replaced: its slot goes to the new member, caught up over the whole volume");
    }
}
