//! The engine's per-volume latency histograms, against three in-process replicas (the
//! real data-plane server and client over TCP on 127.0.0.1; see `engine_support`).

mod engine_support;

use std::time::Duration;

use bytes::Bytes;
use engine_support::Cluster;
use tessera_node::engine::Engine;
use tessera_telemetry::exposition::render;
use tessera_telemetry::prometheus_client::registry::Registry;
use tessera_telemetry::VolumeLatency;

const BS: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Bound for "must not hang" waits in tests; never used to wait for an event.
const NO_HANG: Duration = Duration::from_secs(20);

fn count(page: &str, volume: &str, op: &str) -> Option<u64> {
    let prefix = format!("t_engine_seconds_count{{volume_id=\"{volume}\",op=\"{op}\"}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.parse().expect("a count"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answered_request_is_timed_once_per_op() {
    let cluster = Cluster::start(3, 16 * MIB).await;
    let engine = Engine::open(cluster.config(1, "node-1", NO_HANG))
        .await
        .expect("open");
    let mut registry = Registry::default();
    let latency = VolumeLatency::default();
    latency.register(&mut registry, "t_engine_seconds", "Engine requests.");
    engine.record_latency(latency.volume(&cluster.volume_id));

    engine
        .write(0, Bytes::from(vec![7u8; 2 * BS as usize]))
        .await
        .expect("write");
    engine
        .write(BS * 8, Bytes::from(vec![1u8; BS as usize]))
        .await
        .expect("write");
    engine.read(0, 2 * BS as u32).await.expect("read");
    engine.trim(BS * 8, BS).await.expect("trim");
    engine.flush().await.expect("flush");
    // A request refused before reaching a replica is answered, and timed, too.
    engine.read(1, BS as u32).await.expect_err("unaligned");

    let page = render(&registry).expect("render");
    let v = cluster.volume_id.as_str();
    assert_eq!(count(&page, v, "write"), Some(2), "{page}");
    assert_eq!(count(&page, v, "read"), Some(2), "{page}");
    assert_eq!(count(&page, v, "trim"), Some(1), "{page}");
    assert_eq!(count(&page, v, "flush"), Some(1), "{page}");
}
