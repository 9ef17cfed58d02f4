//! The scrubber between real `tessera-replica` daemons (issue 15 item 5, fault (g)):
//! one byte flipped in a sealed layer and one in the head of a detached volume on one
//! replica are found by the next scrub pass and repaired from the other replicas'
//! copies, and `/metrics` says so; the healthy replicas find nothing.
//! Harness in `daemon_support` and `copy_support` (own process groups, killed in
//! Drop, deadline polls, no fixed sleeps).

mod copy_support;
mod daemon_support;

use std::time::{Duration, Instant};

use copy_support::*;
use daemon_support::{create_req, entries, workdir, POLL};
use tessera_replica::snapshot_read::chunk::ChunkKind;
use tessera_replica_protocol::block::BlockVersion;
use tessera_replica_protocol::control_proto as proto;

/// A shortened scrub period, so one pass follows another within the test.
const SCRUB_ARGS: &[&str] = &[
    "--capacity",
    "1Gi",
    "--scrub-period",
    "1s",
    "--scrub-rate",
    "0",
    "--metrics-listen",
    "127.0.0.1:0",
];
const SCRUBBED_WITHIN: Duration = Duration::from_secs(60);

/// The value of the unlabelled counter `name` on `node`'s `/metrics`.
async fn counter(node: &Node, name: &str) -> u64 {
    let text = node.metrics().await;
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{name}_total ")))
        .unwrap_or_else(|| panic!("{name}_total missing from /metrics:\n{text}"));
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unparsable {line:?}"))
}

/// Flips a bit of `block`'s data in the newest layer (the head) of `volume`.
fn corrupt_head(node: &Node, volume: &str, block: u64) {
    use std::os::unix::fs::FileExt;
    let layers = node
        .data_dir
        .join("volumes")
        .join(volume)
        .join("store/layers");
    let newest = entries(&layers)
        .into_iter()
        .filter_map(|n| n.parse::<u64>().ok())
        .max()
        .expect("a layer");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(layers.join(newest.to_string()).join("data"))
        .expect("open head data");
    let mut byte = [0u8; 1];
    let at = block * BS + 77;
    file.read_exact_at(&mut byte, at).expect("read byte");
    byte[0] ^= 0x08;
    file.write_all_at(&byte, at).expect("flip byte");
    file.sync_all().expect("sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_repairs_rot_in_a_sealed_layer_and_in_the_head_from_the_peers() {
    let work = workdir();
    let a = Node::start(work.path(), "a", SCRUB_ARGS).await;
    let b = Node::start(work.path(), "b", SCRUB_ARGS).await;
    let c = Node::start(work.path(), "c", SCRUB_ARGS).await;
    let set: Vec<proto::ReplicaRef> = [&a, &b, &c].iter().map(|n| n.holder()).collect();
    let (id, size) = ("vol", MIB);
    for node in [&a, &b, &c] {
        node.daemon
            .client()
            .await
            .create_volume(proto::CreateVolumeRequest {
                replicas: set.clone(),
                ..create_req(id, size)
            })
            .await
            .unwrap_or_else(|e| panic!("create on {}: {e}", node.name));
    }
    for node in [&a, &b, &c] {
        let d = node.data(id).await;
        for block in 0..16 {
            d.write(block * BS, pattern(block, 1), seq(block + 1))
                .await
                .expect("write");
        }
        d.flush().await.expect("flush");
        node.snapshot(id, "s1").await;
        let d = node.data(id).await;
        for block in 8..12 {
            d.write(block * BS, pattern(block, 2), seq(100 + block))
                .await
                .expect("write head");
        }
        d.flush().await.expect("flush");
    }
    // Rot on a: block 3 of the sealed layer, block 9 of the head (the volume is
    // detached: nothing but the scrubber reads it).
    a.corrupt_sealed(id, 3);
    corrupt_head(&a, id, 9);

    let deadline = Instant::now() + SCRUBBED_WITHIN;
    loop {
        let repaired = counter(&a, "tessera_replica_scrub_repaired").await;
        if repaired >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "scrub repaired {repaired} of 2 blocks within {SCRUBBED_WITHIN:?}:\n{}",
            a.daemon.log()
        );
        tokio::time::sleep(POLL * 10).await;
    }
    assert_eq!(counter(&a, "tessera_replica_scrub_corrupt_found").await, 2);
    assert_eq!(counter(&a, "tessera_replica_scrub_unrepaired").await, 0);
    assert!(counter(&a, "tessera_replica_scrub_blocks_verified").await >= 20);
    for healthy in [&b, &c] {
        assert_eq!(
            counter(healthy, "tessera_replica_scrub_corrupt_found").await,
            0
        );
        assert!(counter(healthy, "tessera_replica_scrub_passes").await >= 1);
    }
    let text = a.metrics().await;
    assert!(
        text.lines().any(|l| {
            l.starts_with("tessera_replica_scrub_last_complete_pass_timestamp_seconds ")
                && !l.ends_with(" 0")
        }),
        "no finished pass reported:\n{text}"
    );

    // Both views read back whole, with the versions the peers hold.
    let (sealed, _) = stream_blocks(&a, id, "s1", size, ChunkKind::Data).await;
    assert_eq!(
        sealed[3],
        (BlockVersion::Data { seq: seq(4) }, Some(pattern(3, 1)))
    );
    let (head, _) = stream_blocks(&a, id, "", size, ChunkKind::Data).await;
    assert_eq!(
        head[9],
        (BlockVersion::Data { seq: seq(109) }, Some(pattern(9, 2)))
    );
    let read = a
        .data(id)
        .await
        .read(9 * BS, BS as u32)
        .await
        .expect("read");
    assert_eq!(read, pattern(9, 2));
}
