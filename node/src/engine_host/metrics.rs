//! What the engine-host's `/healthz` and `/metrics` report (names prefixed
//! `tessera_engine_`): the attached volumes and, per volume, its engine's counters and
//! replica states, read at scrape time from [`EngineHost::engine_statuses`].
//!
//! The replica gauges are what an operator alerts on: a volume whose in-sync replicas
//! are fewer than its replicas is degraded (it keeps serving, with less redundancy,
//! while the engine reconnects and resyncs the others), one below quorum fails every
//! I/O.

use std::fmt;
use std::sync::Arc;

use tessera_telemetry::exposition::{counters, gauge, gauges};
use tessera_telemetry::prometheus_client::collector::Collector;
use tessera_telemetry::prometheus_client::encoding::DescriptorEncoder;
use tessera_telemetry::prometheus_client::registry::Registry;
use tessera_telemetry::{Endpoints, HealthCheck};

use super::EngineHost;
use crate::engine::{EngineCounters, EngineStatus, ReplicaState};

/// The engine-host's health (unhealthy once shutting down) and metrics.
#[derive(Clone)]
pub struct HostProbe(pub Arc<EngineHost>);

impl fmt::Debug for HostProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HostProbe")
    }
}

impl HostProbe {
    /// What `/healthz` and `/metrics` serve: `registry` (with what is registered
    /// elsewhere, the engines' latency histograms) plus this probe's collector.
    pub fn endpoints(&self, mut registry: Registry) -> Endpoints {
        registry.register_collector(Box::new(self.clone()));
        Endpoints::new(Arc::new(self.clone()), Arc::new(registry))
    }
}

impl HealthCheck for HostProbe {
    fn check(&self) -> Result<(), String> {
        if self.0.is_shutting_down() {
            Err("shutting down".to_owned())
        } else {
            Ok(())
        }
    }
}

impl Collector for HostProbe {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let statuses = self.0.engine_statuses();
        gauge(
            &mut encoder,
            "tessera_engine_host_volumes",
            "Volumes attached to this engine-host.",
            self.0.list().len(),
        )?;
        encode_engines(&statuses, &mut encoder)
    }
}

/// Per-volume engine counters and replica gauges.
fn encode_engines(statuses: &[EngineStatus], encoder: &mut DescriptorEncoder) -> fmt::Result {
    type Counter = (&'static str, &'static str, fn(&EngineCounters) -> u64);
    let counter_series: [Counter; 14] = [
        (
            "tessera_engine_writes",
            "Writes acknowledged by a majority.",
            |c| c.writes,
        ),
        ("tessera_engine_reads", "Reads answered.", |c| c.reads),
        (
            "tessera_engine_flushes",
            "Flushes completed on a majority.",
            |c| c.flushes,
        ),
        ("tessera_engine_trims", "Trims acknowledged.", |c| c.trims),
        (
            "tessera_engine_written_bytes",
            "Bytes of acknowledged writes.",
            |c| c.bytes_written,
        ),
        (
            "tessera_engine_read_bytes",
            "Bytes of answered reads.",
            |c| c.bytes_read,
        ),
        (
            "tessera_engine_failed_ops",
            "Operations that returned an error.",
            |c| c.failed_ops,
        ),
        (
            "tessera_engine_repairs",
            "Corrupt copies repaired from another replica.",
            |c| c.repairs,
        ),
        (
            "tessera_engine_repair_failures",
            "Corrupt copies found that could not be repaired yet.",
            |c| c.repair_failures,
        ),
        (
            "tessera_engine_resyncs",
            "Replicas caught up online and readmitted.",
            |c| c.resyncs,
        ),
        (
            "tessera_engine_resync_bytes",
            "Bytes of data copied to resyncing replicas.",
            |c| c.resync_bytes,
        ),
        (
            "tessera_engine_resync_compared_bytes",
            "Bytes of the volume compared by resync catch-ups.",
            |c| c.resync_compared_bytes,
        ),
        (
            "tessera_engine_full_resyncs",
            "Replicas never declared in sync, compared over the whole volume and readmitted.",
            |c| c.full_resyncs,
        ),
        (
            "tessera_engine_replica_set_changes",
            "Replicas replaced by a new member of the volume's replica set.",
            |c| c.replica_set_changes,
        ),
    ];
    for (name, help, get) in counter_series {
        counters(
            encoder,
            name,
            help,
            statuses
                .iter()
                .map(|s| ([("volume_id", s.volume_id.as_str())], get(&s.counters))),
        )?;
    }
    type Gauge = (&'static str, &'static str, fn(&EngineStatus) -> u64);
    let gauge_series: [Gauge; 6] = [
        (
            "tessera_engine_replicas",
            "Replicas of the volume.",
            |s| s.replicas.len() as u64,
        ),
        (
            "tessera_engine_replicas_in_sync",
            "Replicas the engine still sends every write to; fewer than the replicas means the volume is degraded.",
            |s| s.in_sync as u64,
        ),
        (
            "tessera_engine_replicas_resyncing",
            "Replicas being caught up online (they get new writes, not yet reads or the quorum).",
            |s| {
                s.replicas
                    .iter()
                    .filter(|r| matches!(r.state, ReplicaState::Resyncing { .. }))
                    .count() as u64
            },
        ),
        (
            "tessera_engine_write_quorum",
            "Replicas a write needs.",
            |s| s.quorum as u64,
        ),
        (
            "tessera_engine_below_quorum",
            "Whether the volume has fewer in-sync replicas than a write needs (every I/O fails).",
            |s| u64::from(s.below_quorum),
        ),
        (
            "tessera_engine_fenced",
            "Whether a newer engine took the volume over (every I/O fails).",
            |s| u64::from(s.fenced),
        ),
    ];
    for (name, help, get) in gauge_series {
        gauges(
            encoder,
            name,
            help,
            statuses
                .iter()
                .map(|s| ([("volume_id", s.volume_id.as_str())], get(s))),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ReplicaStatus;
    use tessera_telemetry::exposition::render;

    #[derive(Debug)]
    struct Fixed(Vec<EngineStatus>);

    impl Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
            encode_engines(&self.0, &mut encoder)
        }
    }

    fn replica(node: &str, state: ReplicaState) -> ReplicaStatus {
        ReplicaStatus {
            node_id: node.to_owned(),
            address: format!("{node}:7401"),
            local: false,
            state,
        }
    }

    #[test]
    fn replica_gauges_show_a_degraded_volume() {
        let status = EngineStatus {
            volume_id: "tv-1".to_owned(),
            epoch: 3,
            size: 1 << 20,
            replicas: vec![
                replica("a", ReplicaState::InSync),
                replica(
                    "b",
                    ReplicaState::Resyncing {
                        since: std::time::SystemTime::UNIX_EPOCH,
                        done_bytes: 1 << 19,
                        total_bytes: 1 << 20,
                        full: true,
                    },
                ),
                replica(
                    "c",
                    ReplicaState::Stale {
                        reason: "timed out".to_owned(),
                        since: std::time::SystemTime::UNIX_EPOCH,
                    },
                ),
            ],
            quorum: 2,
            in_sync: 1,
            below_quorum: true,
            fenced: false,
            closed: false,
            reconciled_at_open: Default::default(),
            inflight_ops: 0,
            counters: EngineCounters {
                writes: 7,
                failed_ops: 1,
                replica_set_changes: 1,
                ..EngineCounters::default()
            },
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Fixed(vec![status])));
        let page = render(&registry).expect("render");
        for line in [
            "tessera_engine_writes_total{volume_id=\"tv-1\"} 7\n",
            "tessera_engine_failed_ops_total{volume_id=\"tv-1\"} 1\n",
            "tessera_engine_replica_set_changes_total{volume_id=\"tv-1\"} 1\n",
            "tessera_engine_replicas{volume_id=\"tv-1\"} 3\n",
            "tessera_engine_replicas_in_sync{volume_id=\"tv-1\"} 1\n",
            "tessera_engine_replicas_resyncing{volume_id=\"tv-1\"} 1\n",
            "tessera_engine_write_quorum{volume_id=\"tv-1\"} 2\n",
            "tessera_engine_below_quorum{volume_id=\"tv-1\"} 1\n",
        ] {
            assert!(page.contains(line), "{line:?} missing from\n{page}");
        }
    }
}
