//! Prometheus metrics of the controller (every name prefixed `tessera_controller_`):
//! CSI calls by method and gRPC code, counted as they finish, and gauges read from the
//! replica pool and the volume index at scrape time. Served by `tessera_telemetry`'s
//! `/metrics` endpoint.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tessera_tls::metrics::TransportCollector;

use tessera_telemetry::exposition::{counters, gauge, gauges};
use tessera_telemetry::prometheus_client::collector::Collector;
use tessera_telemetry::prometheus_client::encoding::DescriptorEncoder;
use tessera_telemetry::prometheus_client::registry::Registry;
use tessera_telemetry::GrpcRequests;
use tonic::Code;

use crate::replica_pool::ReplicaPool;
use crate::volume_index::VolumeIndex;

/// The controller's counters. Cheap to share; register once with [`Metrics::registry`].
#[derive(Debug, Default)]
pub struct Metrics {
    csi_requests: GrpcRequests,
    heal: Arc<HealCounters>,
}

/// Steps the healing pass took (`crate::heal`).
#[derive(Debug, Default)]
struct HealCounters {
    replaced: AtomicU64,
    declared: AtomicU64,
    leftovers: AtomicU64,
}

impl Metrics {
    /// Counts a lost replica replaced.
    pub fn count_replacement(&self) {
        self.heal.replaced.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a rebuilt replica the controller declared in sync.
    pub fn count_rebuild_declared(&self) {
        self.heal.declared.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a leftover copy deleted.
    pub fn count_leftover_collected(&self) {
        self.heal.leftovers.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one finished CSI call.
    pub fn observe_rpc(&self, method: &'static str, code: Code) {
        self.csi_requests.observe(method, code);
    }

    /// How many `method` calls ended with `code`.
    pub fn count(&self, method: &'static str, code: Code) -> u64 {
        self.csi_requests.count(method, code)
    }

    /// A registry with the counters and the gauges of `pool` and `index`.
    pub fn registry(&self, pool: Arc<ReplicaPool>, index: Arc<VolumeIndex>) -> Registry {
        let mut registry = Registry::default();
        self.csi_requests.register(
            &mut registry,
            "tessera_controller_csi_requests",
            "CSI calls answered, by method and gRPC code.",
        );
        registry.register_collector(Box::new(TransportCollector::new(
            "tessera_controller",
            pool.transport().clone(),
        )));
        registry.register_collector(Box::new(PoolAndIndex {
            pool,
            index,
            heal: self.heal.clone(),
        }));
        registry
    }
}

/// The replica daemons the pool knows and the volumes the index holds, read per
/// scrape, and the healing counters.
#[derive(Debug)]
struct PoolAndIndex {
    pool: Arc<ReplicaPool>,
    index: Arc<VolumeIndex>,
    heal: Arc<HealCounters>,
}

impl Collector for PoolAndIndex {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let daemons = self.pool.daemons();
        let live = daemons.iter().filter(|d| d.live).count();
        gauges(
            &mut encoder,
            "tessera_controller_replica_daemons",
            "Known replica daemons, by liveness.",
            [
                ([("state", "live")], live),
                ([("state", "down")], daemons.len() - live),
            ],
        )?;
        gauges(
            &mut encoder,
            "tessera_controller_replica_free_bytes",
            "Free bytes reported by each live replica daemon.",
            daemons.iter().filter(|d| d.live).filter_map(|d| {
                let info = d.info.as_ref()?;
                Some((
                    [
                        ("node", info.node_id.as_str()),
                        ("address", d.address.as_str()),
                    ],
                    info.free_bytes,
                ))
            }),
        )?;
        counters(
            &mut encoder,
            "tessera_controller_heal_steps",
            "Steps the healing pass took: lost replicas replaced, rebuilt replicas of \
             detached volumes declared in sync, leftover copies deleted.",
            [
                (
                    [("step", "replace")],
                    self.heal.replaced.load(Ordering::Relaxed),
                ),
                (
                    [("step", "declare")],
                    self.heal.declared.load(Ordering::Relaxed),
                ),
                (
                    [("step", "collect_leftover")],
                    self.heal.leftovers.load(Ordering::Relaxed),
                ),
            ],
        )?;
        gauge(
            &mut encoder,
            "tessera_controller_volumes",
            "Volumes in the controller's index.",
            self.index.len(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use tessera_telemetry::{AlwaysHealthy, Endpoints};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("send");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .expect("answered and closed")
            .expect("read");
        out
    }

    #[tokio::test]
    async fn serves_healthz_and_metrics() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let m = Arc::new(Metrics::default());
        m.observe_rpc("CreateVolume", Code::Ok);
        m.observe_rpc("CreateVolume", Code::Ok);
        m.observe_rpc("DeleteVolume", Code::Unavailable);
        let pool = Arc::new(ReplicaPool::new(crate::replica_pool::PoolConfig {
            static_addresses: vec!["127.0.0.1:1".into()],
            dns: None,
            rpc_timeout: Duration::from_secs(1),
            transport: tessera_tls::Transport::plaintext(),
        }));
        pool.refresh().await;
        let index = Arc::new(VolumeIndex::default());
        let endpoints = Endpoints::new(Arc::new(AlwaysHealthy), Arc::new(m.registry(pool, index)));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tessera_telemetry::serve(listener, endpoints, async {
            let _ = rx.await;
        }));
        let h = get(addr, "/healthz").await;
        assert!(
            h.starts_with("HTTP/1.1 200 OK") && h.ends_with("ok\n"),
            "{h}"
        );
        let body = get(addr, "/metrics").await;
        for line in [
            "tessera_controller_csi_requests_total{method=\"CreateVolume\",code=\"Ok\"} 2\n",
            "tessera_controller_csi_requests_total{method=\"DeleteVolume\",code=\"Unavailable\"} 1\n",
            "tessera_controller_replica_daemons{state=\"live\"} 0\n",
            "tessera_controller_replica_daemons{state=\"down\"} 1\n",
            "tessera_controller_volumes 0\n",
            "tessera_controller_heal_steps_total{step=\"replace\"} 0\n",
        ] {
            assert!(body.contains(line), "{line:?} missing from\n{body}");
        }
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        tx.send(()).expect("server running");
        server.await.expect("join").expect("serve");
    }
}
