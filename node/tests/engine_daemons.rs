//! The engine against three real `tessera-replica` processes (data plane over the
//! checksummed store), volumes created through the control gRPC API
//! (`engine_support::daemons`: build the daemon first).

mod engine_support;

use std::time::{Duration, Instant};
use tessera_replica_protocol::seq::Epoch;

use bytes::Bytes;
use engine_support::daemons::{poll, Daemon};
use tessera_node::engine::{Engine, EngineConfig, EngineErrorKind, ReplicaEndpoint, ReplicaState};

const BS: u64 = 4096;
const MIB: u64 = 1 << 20;
const NO_HANG: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_millis(500);

struct Cluster {
    _work: tempfile::TempDir,
    daemons: Vec<Daemon>,
    volume: String,
    size: u64,
}

impl Cluster {
    async fn start(size: u64) -> Cluster {
        let work = tempfile::Builder::new()
            .prefix("tessera-engine-daemons-")
            .tempdir()
            .unwrap();
        let mut daemons = Vec::new();
        for i in 0..3 {
            daemons.push(Daemon::start(work.path(), &format!("node-{i}")).await);
        }
        let volume = "vol-engine".to_owned();
        for d in &daemons {
            d.create_volume(&volume, size).await;
        }
        Cluster {
            _work: work,
            daemons,
            volume,
            size,
        }
    }

    fn config(&self, epoch: u64, local: &str, timeout: Duration) -> EngineConfig {
        let eps = self
            .daemons
            .iter()
            .map(|d| ReplicaEndpoint {
                node_id: d.node_id.clone(),
                data_address: d.data.clone(),
            })
            .collect();
        let mut c = EngineConfig::new(&self.volume, Epoch::new(epoch).expect("epoch"), eps, local);
        c.request_timeout = timeout;
        c.expected_size = Some(self.size);
        // A replica these tests kill stays out unless a test brings it back.
        c.reconnect_interval = Duration::from_secs(3600);
        c.transport = self.daemons[0].engine_transport();
        c
    }
}

fn pattern(i: u64) -> Vec<u8> {
    (0..BS)
        .map(|k| (k as u8) ^ (i as u8).wrapping_mul(37) ^ ((i >> 8) as u8))
        .collect()
}

fn is_stale(engine: &Engine, node: &str) -> bool {
    engine
        .status()
        .replicas
        .iter()
        .any(|r| r.node_id == node && matches!(r.state, ReplicaState::Stale { .. }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_one_daemon_during_a_write_stream_then_a_second() {
    let mut cluster = Cluster::start(64 * MIB).await;
    let engine = Engine::open(cluster.config(1, "node-0", Duration::from_secs(2)))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    for t in 0..8u64 {
        let engine = engine.clone();
        let written = written.clone();
        tasks.push(tokio::spawn(async move {
            for i in (t..500).step_by(8) {
                engine
                    .write(i * BS, Bytes::from(pattern(i)))
                    .await
                    .unwrap_or_else(|e| panic!("write {i}: {e}"));
                written.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }));
    }
    poll("100 writes", NO_HANG, || {
        (written.load(std::sync::atomic::Ordering::SeqCst) >= 100).then_some(())
    })
    .await;
    cluster.daemons[2].kill9().await;
    for t in tasks {
        t.await.unwrap();
    }
    engine.flush().await.unwrap();
    for i in 0..500 {
        let got = engine.read(i * BS, BS as u32).await.unwrap();
        assert!(got == pattern(i), "block {i} differs");
    }
    assert!(is_stale(&engine, "node-2"));
    let st = engine.status();
    assert_eq!((st.in_sync, st.below_quorum), (2, false));
    assert_eq!(st.counters.failed_ops, 0);

    // A second daemon dies: I/O fails with EIO-kind errors, promptly.
    cluster.daemons[1].kill9().await;
    let t = Instant::now();
    let e = engine
        .write(0, Bytes::from(pattern(9999)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), EngineErrorKind::Io, "{e}");
    let e = engine.read(0, BS as u32).await.unwrap_err();
    assert_eq!(e.kind(), EngineErrorKind::Io, "{e}");
    assert!(
        t.elapsed() < 2 * Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert!(engine.status().below_quorum);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_byte_on_disk_is_healed_through_the_engine() {
    let cluster = Cluster::start(16 * MIB).await;
    let engine = Engine::open(cluster.config(1, "node-1", NO_HANG))
        .await
        .unwrap();
    let data: Vec<u8> = (0..8).flat_map(|i| pattern(100 + i)).collect();
    engine
        .write(32 * BS, Bytes::from(data.clone()))
        .await
        .unwrap();
    engine.flush().await.unwrap();
    poll("background acks", NO_HANG, || {
        (engine.status().inflight_ops == 0).then_some(())
    })
    .await;
    let bad = &cluster.daemons[1];
    bad.corrupt_on_disk(&cluster.volume, 35);
    let direct = bad.data_client(&cluster.volume, 1).await.unwrap();
    assert!(
        direct.read(35 * BS, BS as u32).await.is_err(),
        "damage detected"
    );

    // node-1 is local, so the engine reads the damaged copy first.
    assert!(engine.read(32 * BS, 8 * BS as u32).await.unwrap() == data);
    poll("repair", NO_HANG, || {
        (engine.status().counters.repairs == 1).then_some(())
    })
    .await;
    let healed = direct.read(32 * BS, 8 * BS as u32).await.expect("repaired");
    assert!(healed == data, "repaired copy holds the good data");
    assert_eq!(engine.status().in_sync, 3);
    let log = std::fs::read_to_string(&bad.log).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_engine_fences_the_old_one_on_real_daemons() {
    let cluster = Cluster::start(16 * MIB).await;
    let old = Engine::open(cluster.config(1, "node-0", SHORT))
        .await
        .unwrap();
    old.write(0, Bytes::from(pattern(1))).await.unwrap();
    old.flush().await.unwrap();
    let new = Engine::open(cluster.config(2, "node-1", SHORT))
        .await
        .unwrap();
    let e = old.write(BS, Bytes::from(pattern(2))).await.unwrap_err();
    assert_eq!(e.kind(), EngineErrorKind::Fenced, "{e}");
    assert!(new.read(0, BS as u32).await.unwrap() == pattern(1));
    new.write(BS, Bytes::from(pattern(3))).await.unwrap();
    assert!(new.read(BS, BS as u32).await.unwrap() == pattern(3));
    assert_eq!(
        old.read(0, BS as u32).await.unwrap_err().kind(),
        EngineErrorKind::Fenced
    );
}
