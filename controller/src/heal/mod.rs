//! Healing: every volume back to its full replica set without an operator
//! (DESIGN.md "Recovery"; issue 15 items 3 and 4).
//!
//! A pass every `interval` looks at each volume in the index under its keyed lock,
//! reads its members' records and takes the one step [`plan::decide`] names:
//!
//! * a member whose node has been unreachable for longer than the replacement delay
//!   is **replaced** ([`replace`]): a daemon on another node is chosen with the
//!   placement rules (capacity, zones the set already uses, never a node holding a
//!   copy), the new set is written with compare-and-set on a majority, and the new
//!   daemon is created with a *rebuild* copy source: it copies the surviving
//!   replicas' heads, replica to replica, with every block's own seq. A detached
//!   volume is fenced first (its epoch raised), so no engine can write while the copy
//!   runs; an attached volume's engine learns the new set from its replicas and
//!   resyncs the copy once it is complete;
//! * a member whose daemon answers without the volume is **made again** there (its
//!   data was lost, or a create or replacement stopped before reaching it), or, after
//!   [`MAX_CREATE_FAILURES`] failed attempts, replaced; one that missed an expansion is
//!   **expanded**;
//! * a rebuilt copy of a fenced, still detached volume is **declared** in sync
//!   ([`declare`]): nothing was written since its copy began, so it holds every write;
//! * daemons are swept for **leftovers** ([`leftovers`]): copies of volumes deleted
//!   while they were away, or of which they are no longer a member, are deleted.
//!
//! Every step is idempotent and re-derived from the records at the next pass, so a
//! controller that crashes anywhere in one leaves nothing a later pass cannot finish.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_replica_protocol::control_proto::VolumeRecord;

use crate::locks::KeyedLocks;
use crate::metrics::Metrics;
use crate::volumes::Volumes;

mod declare;
mod error;
mod leftovers;
pub mod plan;
mod replace;

pub use error::HealError;
pub use plan::{Action, InSyncView};

/// How long a node may be unreachable before its replicas are replaced.
pub const DEFAULT_REPLACEMENT_DELAY: Duration = Duration::from_secs(600);
/// How often the healing pass runs.
pub const DEFAULT_HEAL_INTERVAL: Duration = Duration::from_secs(10);
/// Failed attempts at making a member's copy on its daemon after which the member is
/// replaced by one on another daemon (a full disk, a daemon refusing the create).
pub const MAX_CREATE_FAILURES: u32 = 3;

/// Settings of the healing pass.
#[derive(Debug, Clone, Copy)]
pub struct HealConfig {
    /// A member's node unreachable for longer than this is replaced, and a
    /// DeleteVolume no longer waits for it (`--replacement-delay`).
    pub replacement_delay: Duration,
    /// Time between passes (`--heal-interval`).
    pub interval: Duration,
}

impl Default for HealConfig {
    fn default() -> Self {
        Self {
            replacement_delay: DEFAULT_REPLACEMENT_DELAY,
            interval: DEFAULT_HEAL_INTERVAL,
        }
    }
}

/// Runs the healing passes (module doc).
#[derive(Debug, Clone)]
pub struct Healer {
    volumes: Volumes,
    locks: Arc<KeyedLocks>,
    cfg: HealConfig,
    metrics: Arc<Metrics>,
    /// Failed creates in a row, by (volume, node) ([`MAX_CREATE_FAILURES`]).
    create_failures: Arc<Mutex<HashMap<(String, String), u32>>>,
}

impl Healer {
    /// A healer over the controller's volumes, taking the same per-volume locks as
    /// the CSI calls.
    pub fn new(
        volumes: Volumes,
        locks: Arc<KeyedLocks>,
        cfg: HealConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            volumes,
            locks,
            cfg,
            metrics,
            create_failures: Arc::default(),
        }
    }

    /// Passes every `interval` until `shutdown` completes.
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(self.cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => self.pass().await,
            }
        }
    }

    /// One pass over every volume, then the leftover sweep.
    pub async fn pass(&self) {
        self.volumes.pool().refresh_infos().await;
        for rec in self.volumes.index().all() {
            if let Err(e) = self.heal(&rec).await {
                tracing::warn!(volume = %rec.volume_id, error = %tessera_telemetry::error_chain(&e),
                    "healing step failed; the next pass retries");
            }
        }
        self.collect_leftovers().await;
    }

    /// Takes the next step for one volume.
    async fn heal(&self, indexed: &VolumeRecord) -> Result<Action, HealError> {
        let _guard = self.locks.lock(&indexed.volume_id).await;
        let mut reads = self.volumes.read(indexed).await;
        let mut cur = self.volumes.current(indexed, &reads)?;
        if cur.replicas != indexed.replicas {
            reads = self.volumes.read(&cur).await;
            cur = self.volumes.current(&cur, &reads)?;
        }
        self.volumes.index().merge(cur.clone());
        let delay = self.cfg.replacement_delay;
        let pool = self.volumes.pool();
        let action = plan::decide(&cur, &reads, |r| {
            pool.is_lost(r, delay)
                || self.create_failures(&cur.volume_id, &r.node_id) >= MAX_CREATE_FAILURES
        });
        let step = match action {
            Action::Nothing => Ok(()),
            Action::Expand { member } => self.expand(&cur, &reads, member).await,
            Action::Recreate { member } => self.recreate(&cur, &reads, member).await,
            Action::Replace { member } => self.replace(&cur, &reads, member).await,
            Action::Declare { member, epoch } => self.declare(&cur, member, epoch).await,
        };
        match &step {
            Err(HealError::Replica {
                call: "CreateVolume",
                node,
                ..
            }) => self.note_create(&cur.volume_id, node, false),
            Ok(()) if matches!(action, Action::Recreate { .. } | Action::Replace { .. }) => {
                for r in &cur.replicas {
                    self.note_create(&cur.volume_id, &r.node_id, true);
                }
            }
            _ => {}
        }
        step.map(|()| action)
    }

    fn create_failures(&self, volume: &str, node: &str) -> u32 {
        let failures = self
            .create_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        failures
            .get(&(volume.to_string(), node.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Counts a failed create of `volume` on `node`, or forgets the count.
    fn note_create(&self, volume: &str, node: &str, succeeded: bool) {
        let mut failures = self
            .create_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = (volume.to_string(), node.to_string());
        if succeeded {
            failures.remove(&key);
        } else {
            *failures.entry(key).or_default() += 1;
        }
    }
}
