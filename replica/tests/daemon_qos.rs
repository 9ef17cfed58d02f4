//! QoS end to end on the real `tessera-replica` binary: a volume's record parameters
//! reach its I/O scheduler registration at create, an UpdateVolume changes them on the
//! live volume (same data-plane connection, no detach), and the limits in force and the
//! scheduler's per-volume counters are visible on `/metrics`. Also: invalid QoS values
//! are INVALID_ARGUMENT and change nothing; the QoS survives a restart; a deleted
//! volume's registration is gone; both I/O engines serve the data plane.
//!
//! Harness in `daemon_support` (own process group, killed in Drop, deadline polls, no
//! fixed sleeps).

mod daemon_support;

use std::time::Instant;

use daemon_support::{create_req, http_get, workdir, Daemon};
use tessera_replica_protocol::control_proto as proto;
use tonic::Code;

const BS: u64 = 4096;

/// The value of `name{volume_id="<volume>"}` on the daemon's /metrics, if present.
async fn volume_metric(daemon: &Daemon, name: &str, volume: &str) -> Option<f64> {
    let addr = daemon.metrics.as_deref().expect("metrics listener");
    let text = http_get(addr, "/metrics").await;
    let prefix = format!("{name}{{volume_id=\"{volume}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.parse().expect("numeric sample"))
}

fn params(kv: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn start(work: &std::path::Path, data: &std::path::Path, extra: &[&str]) -> Daemon {
    let mut args = vec!["--capacity", "1Gi", "--metrics-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Daemon::start(work, data, &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_volume_changes_the_live_qos() {
    let work = workdir();
    let data_dir = work.path().join("data");
    let daemon = start(work.path(), &data_dir, &[]).await;
    let mut c = daemon.client().await;

    let mut req = create_req("q1", 16 << 20);
    req.parameters = params(&[
        ("maxIOPS", "1000"),
        ("burstDuration", "1000ms"),
        ("fsType", "ext4"),
    ]);
    c.create_volume(req).await.expect("create");
    assert_eq!(
        volume_metric(&daemon, "tessera_replica_volume_qos_max_iops", "q1").await,
        Some(1000.0)
    );
    assert_eq!(
        volume_metric(&daemon, "tessera_replica_volume_qos_burst_seconds", "q1").await,
        Some(1.0)
    );

    let data = match daemon.data_client("q1", 0).await {
        Ok(d) => d,
        Err(e) => panic!("connect: {e:?}\n{}", daemon.log()),
    };
    for b in 0..8u64 {
        data.write(b * BS, vec![b as u8; BS as usize], b + 1)
            .await
            .expect("write");
    }
    assert!(
        volume_metric(&daemon, "tessera_replica_volume_io_completed_total", "q1")
            .await
            .is_some_and(|n| n >= 8.0),
        "data-plane writes go through the scheduler"
    );

    // Tighten the limits: 50 IOPS with a 100 ms burst (5 tokens).
    let updated = c
        .update_volume(proto::UpdateVolumeRequest {
            volume_id: "q1".into(),
            expected_generation: 1,
            attachments: vec![],
            parameters: params(&[
                ("maxIOPS", "50"),
                ("minIOPS", "10"),
                ("burstDuration", "100ms"),
                ("fsType", "ext4"),
            ]),
            replicas: Vec::new(),
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.generation, 2);
    assert_eq!(
        volume_metric(&daemon, "tessera_replica_volume_qos_max_iops", "q1").await,
        Some(50.0)
    );
    assert_eq!(
        volume_metric(&daemon, "tessera_replica_volume_qos_min_iops", "q1").await,
        Some(10.0)
    );

    // The same connection keeps working, now throttled: 30 writes at 50/s after a
    // burst of at most 5 need at least 0.5 s.
    let began = Instant::now();
    let mut writes = tokio::task::JoinSet::new();
    for b in 0..30u64 {
        let data = data.clone();
        writes.spawn(async move { data.write(b * BS, vec![7u8; BS as usize], 100 + b).await });
    }
    while let Some(r) = writes.join_next().await {
        r.expect("write task").expect("throttled write");
    }
    assert!(
        began.elapsed().as_secs_f64() >= 0.4,
        "30 writes at 50 IOPS took only {:?}",
        began.elapsed()
    );
    assert!(
        volume_metric(
            &daemon,
            "tessera_replica_volume_io_throttled_seconds_total",
            "q1"
        )
        .await
        .is_some_and(|s| s > 0.0),
        "throttling is counted"
    );

    // Invalid values are refused, naming the key, and change nothing.
    let err = c
        .update_volume(proto::UpdateVolumeRequest {
            volume_id: "q1".into(),
            expected_generation: 2,
            attachments: vec![],
            parameters: params(&[("maxIOPS", "-5")]),
            replicas: Vec::new(),
        })
        .await
        .expect_err("negative maxIOPS");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("maxIOPS"), "{}", err.message());
    let err = c
        .update_volume(proto::UpdateVolumeRequest {
            volume_id: "q1".into(),
            expected_generation: 2,
            attachments: vec![],
            parameters: params(&[("maxIOPS", "10"), ("burstDuration", "0ms")]),
            replicas: Vec::new(),
        })
        .await
        .expect_err("zero burst with a limit");
    assert_eq!(err.code(), Code::InvalidArgument);
    let rec = c
        .get_volume(proto::GetVolumeRequest {
            volume_id: "q1".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(rec.generation, 2);
    assert_eq!(
        volume_metric(&daemon, "tessera_replica_volume_qos_max_iops", "q1").await,
        Some(50.0)
    );
    let mut bad = create_req("q2", 1 << 20);
    bad.parameters = params(&[("maxBandwidth", "1Mi")]);
    let err = c.create_volume(bad).await.expect_err("unnormalised value");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("maxBandwidth"), "{}", err.message());

    // The QoS comes back from the record after a restart.
    drop(data);
    drop(c);
    let status = daemon.terminate().await;
    assert!(status.success(), "clean exit");
    let daemon = start(work.path(), &data_dir, &[]).await;
    assert_eq!(
        volume_metric(&daemon, "tessera_replica_volume_qos_max_iops", "q1").await,
        Some(50.0)
    );

    // Delete drops the registration; the id can be created (and registered) again.
    let mut c = daemon.client().await;
    c.delete_volume(proto::DeleteVolumeRequest {
        volume_id: "q1".into(),
    })
    .await
    .expect("delete");
    assert_eq!(
        volume_metric(&daemon, "tessera_replica_volume_qos_max_iops", "q1").await,
        None
    );
    c.create_volume(create_req("q1", 1 << 20))
        .await
        .expect("re-create");
    assert_eq!(
        volume_metric(&daemon, "tessera_replica_volume_qos_max_iops", "q1").await,
        Some(0.0),
        "unlimited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_engine_serves_the_data_plane() {
    let work = workdir();
    let data_dir = work.path().join("data");
    let daemon = start(work.path(), &data_dir, &["--io-engine", "sync"]).await;
    daemon
        .client()
        .await
        .create_volume(create_req("s1", 1 << 20))
        .await
        .expect("create");
    let data = match daemon.data_client("s1", 0).await {
        Ok(d) => d,
        Err(e) => panic!("connect: {e:?}\n{}", daemon.log()),
    };
    data.write(BS, vec![5u8; 2 * BS as usize], 1)
        .await
        .expect("write");
    data.flush().await.expect("flush");
    assert_eq!(
        data.read(0, 3 * BS as u32).await.expect("read"),
        [vec![0u8; BS as usize], vec![5u8; 2 * BS as usize]].concat()
    );
    let addr = daemon.metrics.as_deref().expect("metrics");
    let page = http_get(addr, "/metrics").await;
    assert!(page.contains("tessera_replica_io_in_flight{engine=\"sync\"}"));
    // Each request was timed before its reply was sent, so the counts are exact.
    for (op, n) in [("read", 1), ("write", 1), ("flush", 1), ("trim", 0)] {
        let line = format!(
            "tessera_replica_data_op_duration_seconds_count{{volume_id=\"s1\",op=\"{op}\"}} {n}\n"
        );
        assert!(page.contains(&line), "{line:?} missing from\n{page}");
    }
}
