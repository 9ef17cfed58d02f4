//! Engine tests against three in-process replicas (the real data-plane server and
//! client over TCP on 127.0.0.1, with `CrcFileVolumes` as the block store; see
//! `engine_support`).

mod engine_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessera_replica_protocol::seq::Epoch;

use bytes::Bytes;
use engine_support::{pattern, wait_for, Cluster, Event, StoreReplica};
use tessera_node::engine::{
    Engine, EngineConfig, EngineError, EngineErrorKind, EngineTarget, ReplicaEndpoint, ReplicaState,
};
use tessera_node::frontend::{BlockTarget, TargetErrorKind};

const BS: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Bound for "must not hang" waits in tests; never used to wait for an event.
const NO_HANG: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_millis(500);

fn stale_reason(engine: &Engine, node: &str) -> Option<String> {
    engine
        .status()
        .replicas
        .into_iter()
        .find(|r| r.node_id == node)
        .and_then(|r| match r.state {
            ReplicaState::Stale { reason, .. } => Some(reason),
            ReplicaState::InSync | ReplicaState::Resyncing { .. } => None,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_with_three_replicas() {
    let cluster = Cluster::start(3, 16 * MIB).await;
    let engine = Engine::open(cluster.config(1, "node-1", NO_HANG))
        .await
        .unwrap();
    assert_eq!(engine.size(), 16 * MIB);

    // Unwritten blocks read as zeros.
    assert_eq!(engine.read(0, 8192).await.unwrap(), vec![0u8; 8192]);

    let mut expect = Vec::new();
    for i in 0..20u64 {
        let off = i * 3 * BS;
        let data = pattern(i, (BS * (1 + i % 3)) as usize);
        engine.write(off, Bytes::from(data.clone())).await.unwrap();
        expect.push((off, data));
    }
    let big = pattern(99, 4 * MIB as usize);
    engine
        .write(8 * MIB, Bytes::from(big.clone()))
        .await
        .unwrap();
    engine.flush().await.unwrap();
    for (off, data) in &expect {
        assert_eq!(&engine.read(*off, data.len() as u32).await.unwrap(), data);
    }
    assert_eq!(engine.read(8 * MIB, 4 * MIB as u32).await.unwrap(), big);

    // Trim zeroes on every replica.
    engine.trim(0, 3 * BS).await.unwrap();
    assert_eq!(
        engine.read(0, BS as u32).await.unwrap(),
        vec![0u8; BS as usize]
    );

    // Every replica holds every acknowledged write (all were healthy): wait for the
    // background acks, then compare the files.
    wait_for("background acks", NO_HANG, || {
        engine.status().inflight_ops == 0
    })
    .await;
    for b in &cluster.blocks {
        for (off, data) in expect.iter().skip(1) {
            for (i, chunk) in data.chunks(BS as usize).enumerate() {
                let (disk, ok) = b.block_on_disk(off / BS + i as u64);
                assert!(ok);
                assert_eq!(disk, chunk);
            }
        }
    }

    // seq = epoch << 40 | counter, counter from 1, increasing in issue order.
    let seqs: Vec<u64> = cluster.blocks[0]
        .log()
        .iter()
        .filter_map(|e| match e {
            Event::Write { offset, seq, .. } if *offset < 8 * MIB => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs.len(), 20);
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    assert_eq!(sorted.first(), Some(&((1u64 << 40) | 1)));
    assert!(sorted.windows(2).all(|w| w[0] < w[1]), "{sorted:?}");
    assert_eq!(cluster.blocks[0].seq_of(3), (1 << 40) | 2);

    let st = engine.status();
    assert_eq!(st.in_sync, 3);
    assert!(!st.below_quorum && !st.fenced);
    assert!(st.replicas[1].local && !st.replicas[0].local);
    assert_eq!(st.counters.writes, 21);
    assert_eq!(st.counters.trims, 1);
    assert_eq!(st.counters.flushes, 1);
    assert_eq!(st.counters.failed_ops, 0);
    assert_eq!(
        st.counters.bytes_written,
        4 * MIB + expect.iter().map(|(_, d)| d.len() as u64).sum::<u64>()
    );
    assert!(!st.condition().0);

    // Bad requests are refused by the engine itself.
    let e = engine.read(BS / 2, BS as u32).await.unwrap_err();
    assert_eq!(e.kind(), EngineErrorKind::InvalidRequest);
    let e = engine
        .write(16 * MIB, Bytes::from(vec![0u8; BS as usize]))
        .await
        .unwrap_err();
    assert!(matches!(e, EngineError::OutOfRange { .. }), "{e}");

    engine.close().await.unwrap();
    assert!(matches!(
        engine.read(0, 4096).await,
        Err(EngineError::Closed { .. })
    ));
    engine.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_prefer_the_local_replica() {
    let cluster = Cluster::start(3, 4 * MIB).await;
    let engine = Engine::open(cluster.config(1, "node-2", NO_HANG))
        .await
        .unwrap();
    engine
        .write(0, Bytes::from(pattern(1, BS as usize)))
        .await
        .unwrap();
    wait_for("background acks", NO_HANG, || {
        engine.status().inflight_ops == 0
    })
    .await;
    // Freeze the two remote replicas: reads must still be served (by the local one),
    // which they could not be if any read went elsewhere.
    cluster.blocks[0].freeze();
    cluster.blocks[1].freeze();
    for _ in 0..20 {
        assert_eq!(
            engine.read(0, BS as u32).await.unwrap(),
            pattern(1, BS as usize)
        );
    }
    assert_eq!(engine.status().in_sync, 3);
    cluster.blocks[0].thaw();
    cluster.blocks[1].thaw();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_killed_during_a_write_stream() {
    let mut cluster = Cluster::start(3, 8 * MIB).await;
    let engine = Engine::open(cluster.config(1, "node-0", Duration::from_secs(2)))
        .await
        .unwrap();
    let written = Arc::new(AtomicU64::new(0));
    // 8 writers, 500 writes in all; the replica dies after 100 of them.
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let engine = engine.clone();
        let written = Arc::clone(&written);
        tasks.push(tokio::spawn(async move {
            for i in (t..500).step_by(8) {
                engine
                    .write(i * BS, Bytes::from(pattern(i, BS as usize)))
                    .await
                    .unwrap_or_else(|e| panic!("write {i} failed: {e}"));
                written.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    wait_for("100 writes", NO_HANG, || {
        written.load(Ordering::SeqCst) >= 100
    })
    .await;
    cluster.replicas[2].kill().await;
    for t in tasks {
        t.await.unwrap();
    }
    engine.flush().await.unwrap();
    for i in 0..500 {
        assert_eq!(
            engine.read(i * BS, BS as u32).await.unwrap(),
            pattern(i, BS as usize),
            "block {i}"
        );
    }
    let reason = stale_reason(&engine, "node-2").expect("node-2 reported stale");
    assert!(!reason.is_empty());
    let st = engine.status();
    assert_eq!(st.in_sync, 2);
    assert!(!st.below_quorum);
    assert!(st.condition().0, "degraded volume is abnormal");
    assert_eq!(st.counters.writes, 500);
    assert_eq!(st.counters.failed_ops, 0);
    // The survivors hold every block.
    wait_for("background acks", NO_HANG, || {
        engine.status().inflight_ops == 0
    })
    .await;
    for b in &cluster.blocks[..2] {
        for i in 0..500 {
            assert_eq!(b.block_on_disk(i).0, pattern(i, BS as usize), "block {i}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_killed_fail_io_within_bounded_time() {
    let mut cluster = Cluster::start(3, 4 * MIB).await;
    let engine = Engine::open(cluster.config(1, "node-0", SHORT))
        .await
        .unwrap();
    engine
        .write(0, Bytes::from(pattern(1, BS as usize)))
        .await
        .unwrap();
    cluster.replicas[1].kill().await;
    cluster.replicas[2].kill().await;

    let t = Instant::now();
    let e = engine
        .write(BS, Bytes::from(pattern(2, BS as usize)))
        .await
        .unwrap_err();
    assert!(t.elapsed() < 2 * SHORT, "write took {:?}", t.elapsed());
    assert_eq!(e.kind(), EngineErrorKind::Io, "{e}");

    let t = Instant::now();
    let e = engine.read(0, BS as u32).await.unwrap_err();
    assert!(t.elapsed() < 2 * SHORT, "read took {:?}", t.elapsed());
    assert_eq!(e.kind(), EngineErrorKind::Io, "{e}");

    let t = Instant::now();
    let e = engine.flush().await.unwrap_err();
    assert!(t.elapsed() < 2 * SHORT, "flush took {:?}", t.elapsed());
    assert_eq!(e.kind(), EngineErrorKind::Io, "{e}");

    let st = engine.status();
    assert!(st.below_quorum);
    assert!(st.condition().0);
    assert!(st.condition().1.contains("below quorum"));
    assert!(stale_reason(&engine, "node-1").is_some());
    assert!(stale_reason(&engine, "node-2").is_some());
    assert!(st.counters.failed_ops >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresponsive_replicas_time_out() {
    let cluster = Cluster::start(3, 4 * MIB).await;
    let engine = Engine::open(cluster.config(1, "node-0", SHORT))
        .await
        .unwrap();
    // One replica stops answering: writes complete on the other two without waiting
    // for it, and it is marked stale after the timeout.
    cluster.blocks[2].freeze();
    let t = Instant::now();
    engine
        .write(0, Bytes::from(pattern(1, BS as usize)))
        .await
        .unwrap();
    assert!(t.elapsed() < SHORT, "write waited for the frozen replica");
    wait_for("node-2 stale", NO_HANG, || {
        stale_reason(&engine, "node-2").is_some()
    })
    .await;
    assert!(stale_reason(&engine, "node-2")
        .unwrap()
        .contains("no reply"));

    // A second one stops answering: the write fails within the bound, not hangs.
    cluster.blocks[1].freeze();
    let t = Instant::now();
    let e = engine
        .write(BS, Bytes::from(pattern(2, BS as usize)))
        .await
        .unwrap_err();
    assert!(t.elapsed() < 2 * SHORT, "write took {:?}", t.elapsed());
    assert_eq!(e.kind(), EngineErrorKind::Io);
    assert!(engine.status().below_quorum);
    cluster.blocks[1].thaw();
    cluster.blocks[2].thaw();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_needs_a_majority_and_takes_the_majority_size() {
    let mut cluster = Cluster::start(3, 4 * MIB).await;

    // Wrong expected size.
    let mut c = cluster.config(1, "node-0", SHORT);
    c.expected_size = Some(8 * MIB);
    let e = Engine::open(c).await.unwrap_err();
    assert!(matches!(e, EngineError::SizeMismatch { .. }), "{e}");

    // A replica larger than the other two (an expansion that reached a minority):
    // the volume keeps the size the majority holds, and the larger one stays in sync.
    let odd = engine_support::TestReplica::start("node-odd").await;
    odd.registry.create(&cluster.volume_id, 8 * MIB, 1);
    let mut c = cluster.config(1, "node-0", SHORT);
    c.expected_size = None;
    c.replicas[2].data_address = odd.addr.to_string();
    c.replicas[2].node_id = "node-odd".into();
    let engine = Engine::open(c).await.unwrap();
    assert_eq!(engine.size(), 4 * MIB);
    assert!(stale_reason(&engine, "node-odd").is_none());
    engine.close().await.unwrap();

    // Two replicas grew and one missed it (it was down): the volume has the new size
    // and the small one starts stale, saying why.
    let big = engine_support::TestReplica::start("node-big").await;
    big.registry.create(&cluster.volume_id, 8 * MIB, 1);
    let mut c = cluster.config(1, "node-0", SHORT);
    c.expected_size = Some(8 * MIB);
    c.replicas[1].data_address = big.addr.to_string();
    c.replicas[1].node_id = "node-big".into();
    c.replicas[2].data_address = odd.addr.to_string();
    c.replicas[2].node_id = "node-odd".into();
    let engine = Engine::open(c).await.unwrap();
    assert_eq!(engine.size(), 8 * MIB);
    assert!(stale_reason(&engine, "node-0")
        .unwrap()
        .contains("missed an expansion"));
    assert!(stale_reason(&engine, "node-big").is_none());
    engine
        .write(6 * MIB, Bytes::from(pattern(3, BS as usize)))
        .await
        .unwrap();
    engine.close().await.unwrap();

    // Two of three reachable: opens, the third starts stale.
    cluster.replicas[0].kill().await;
    let engine = Engine::open(cluster.config(1, "node-0", SHORT))
        .await
        .unwrap();
    assert!(stale_reason(&engine, "node-0")
        .unwrap()
        .contains("connecting failed"));
    engine
        .write(0, Bytes::from(pattern(1, BS as usize)))
        .await
        .unwrap();
    assert_eq!(
        engine.read(0, BS as u32).await.unwrap(),
        pattern(1, BS as usize)
    );

    // One of three: refused, quickly.
    cluster.replicas[1].kill().await;
    let t = Instant::now();
    let e = Engine::open(cluster.config(1, "node-0", SHORT))
        .await
        .unwrap_err();
    assert!(t.elapsed() < 2 * SHORT);
    assert!(
        matches!(
            e,
            EngineError::OpenQuorum {
                connected: 1,
                needed: 2,
                total: 3,
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_epoch_fences_the_old_engine() {
    let cluster = Cluster::start(3, 4 * MIB).await;
    let old = Engine::open(cluster.config(1, "node-0", SHORT))
        .await
        .unwrap();
    old.write(0, Bytes::from(pattern(1, BS as usize)))
        .await
        .unwrap();
    wait_for("background acks", NO_HANG, || {
        old.status().inflight_ops == 0
    })
    .await;

    // The new engine adopts epoch 2 on every replica at HELLO.
    let new = Engine::open(cluster.config(2, "node-1", SHORT))
        .await
        .unwrap();
    for r in &cluster.replicas {
        assert_eq!(r.registry.epoch(&cluster.volume_id), 2);
    }

    let e = old
        .write(BS, Bytes::from(pattern(2, BS as usize)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), EngineErrorKind::Fenced, "{e}");
    assert!(
        matches!(
            &e,
            EngineError::Fenced {
                epoch: 1,
                replica_epoch: 2,
                ..
            }
        ),
        "{e}"
    );
    // Every later operation fails the same way, reads included.
    assert_eq!(
        old.read(0, BS as u32).await.unwrap_err().kind(),
        EngineErrorKind::Fenced
    );
    assert_eq!(
        old.flush().await.unwrap_err().kind(),
        EngineErrorKind::Fenced
    );
    assert!(old.status().fenced);

    // The new engine works and sees the old engine's acknowledged write.
    assert_eq!(
        new.read(0, BS as u32).await.unwrap(),
        pattern(1, BS as usize)
    );
    new.write(BS, Bytes::from(pattern(3, BS as usize)))
        .await
        .unwrap();
    assert_eq!(
        new.read(BS, BS as u32).await.unwrap(),
        pattern(3, BS as usize)
    );
    for b in &cluster.blocks {
        assert_ne!(b.block_on_disk(1).0, pattern(2, BS as usize));
    }

    // An engine with the old epoch can no longer even open.
    let e = Engine::open(cluster.config(1, "node-0", SHORT))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), EngineErrorKind::Fenced, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_reaches_a_replica_only_after_its_earlier_writes() {
    let cluster = Cluster::start(3, 4 * MIB).await;
    let engine = Engine::open(cluster.config(1, "node-0", NO_HANG))
        .await
        .unwrap();
    // Opening flushed the replicas once (after reconciling): look only at what follows.
    let opened = cluster.blocks[2].log().len();
    assert!(cluster.blocks.iter().all(|b| b.log().len() == opened));
    // node-2 is slow: the write is acknowledged by the other two.
    cluster.blocks[2].hold_writes();
    engine
        .write(0, Bytes::from(pattern(1, BS as usize)))
        .await
        .unwrap();
    assert_eq!(engine.status().inflight_ops, 1);
    // The flush completes on the majority while node-2 still holds the write.
    engine.flush().await.unwrap();
    assert!(
        cluster.blocks[2].log()[opened..].is_empty(),
        "no flush overtook the write"
    );
    cluster.blocks[2].release_writes();
    wait_for("background acks", NO_HANG, || {
        engine.status().inflight_ops == 0
    })
    .await;
    engine.flush().await.unwrap();
    for b in &cluster.blocks[..2] {
        let log = &b.log()[opened..];
        assert_eq!(log.len(), 3, "{log:?}");
        assert!(matches!(log[0], Event::Write { .. }));
        assert_eq!(log[1..], [Event::Flush, Event::Flush]);
    }
    // node-2's flush (if it got one) came after its write.
    let log = &cluster.blocks[2].log()[opened..];
    assert!(matches!(log[0], Event::Write { .. }), "{log:?}");
    assert_eq!(engine.status().in_sync, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_writes_land_in_issue_order_on_every_replica() {
    let cluster = Cluster::start(3, 4 * MIB).await;
    // node-2 is local: reads would go there if it were eligible.
    let engine = Engine::open(cluster.config(1, "node-2", NO_HANG))
        .await
        .unwrap();
    // Hold node-2's writes so the second write is issued while the first is still
    // unfinished there; the second must not overtake it.
    cluster.blocks[2].hold_writes();
    engine
        .write(0, Bytes::from(pattern(1, 2 * BS as usize)))
        .await
        .unwrap();
    engine
        .write(BS, Bytes::from(pattern(2, BS as usize)))
        .await
        .unwrap();
    // node-2 has unfinished overlapping writes (it would answer zeros): reads must
    // avoid it.
    for _ in 0..10 {
        let got = engine.read(BS, BS as u32).await.unwrap();
        assert!(got == pattern(2, BS as usize), "read returned old data");
    }
    cluster.blocks[2].release_writes();
    wait_for("background acks", NO_HANG, || {
        engine.status().inflight_ops == 0
    })
    .await;
    for b in &cluster.blocks {
        assert_eq!(b.block_on_disk(1).0, pattern(2, BS as usize));
        let seqs: Vec<u64> = b
            .log()
            .iter()
            .filter_map(|e| match e {
                Event::Write { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, [(1 << 40) | 1, (1 << 40) | 2]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_copy_is_served_from_another_replica_and_repaired() {
    let cluster = Cluster::start(3, 4 * MIB).await;
    // node-0 is local, so reads try it first.
    let engine = Engine::open(cluster.config(1, "node-0", NO_HANG))
        .await
        .unwrap();
    let data = pattern(7, 4 * BS as usize);
    engine
        .write(8 * BS, Bytes::from(data.clone()))
        .await
        .unwrap();
    engine.flush().await.unwrap();
    wait_for("background acks", NO_HANG, || {
        engine.status().inflight_ops == 0
    })
    .await;
    cluster.blocks[0].corrupt_on_disk(10);
    assert!(!cluster.blocks[0].block_on_disk(10).1);

    assert_eq!(engine.read(8 * BS, 4 * BS as u32).await.unwrap(), data);
    wait_for("repair", NO_HANG, || engine.status().counters.repairs == 1).await;
    let (disk, ok) = cluster.blocks[0].block_on_disk(10);
    assert!(ok, "repaired block verifies");
    assert_eq!(disk, data[2 * BS as usize..3 * BS as usize]);
    // Blocks before the corrupt one were not rewritten; from it on they were.
    assert_eq!(cluster.blocks[0].seq_of(9), (1 << 40) | 1);
    assert!(cluster.blocks[0].seq_of(10) > (1 << 40) | 1);
    // The replica stays in sync, and now serves the read itself.
    let st = engine.status();
    assert_eq!(st.in_sync, 3);
    assert_eq!(st.counters.repair_failures, 0);
    cluster.blocks[1].freeze();
    cluster.blocks[2].freeze();
    assert_eq!(engine.read(8 * BS, 4 * BS as u32).await.unwrap(), data);
    cluster.blocks[1].thaw();
    cluster.blocks[2].thaw();
    assert_eq!(engine.status().counters.repairs, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_block_in_the_checksummed_store_is_repaired() {
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(StoreReplica::start(&format!("node-{i}"), "vol-store", 4 * MIB).await);
    }
    let eps = replicas
        .iter()
        .map(|r| ReplicaEndpoint {
            node_id: r.node_id.clone(),
            data_address: r.addr.to_string(),
        })
        .collect();
    // node-1 is local, so reads try its (corrupted) copy first.
    let mut config = EngineConfig::new("vol-store", Epoch::new(1).unwrap(), eps, "node-1");
    config.request_timeout = NO_HANG;
    let engine = Engine::open(config).await.unwrap();
    let data = pattern(42, 8 * BS as usize);
    engine
        .write(16 * BS, Bytes::from(data.clone()))
        .await
        .unwrap();
    engine.flush().await.unwrap();
    wait_for("background acks", NO_HANG, || {
        engine.status().inflight_ops == 0
    })
    .await;
    let bad = &replicas[1];
    bad.corrupt_on_disk(19);
    assert!(
        bad.store.read(19 * BS, BS).is_err(),
        "the store detects the damage"
    );

    assert!(engine.read(16 * BS, 8 * BS as u32).await.unwrap() == data);
    wait_for("repair", NO_HANG, || engine.status().counters.repairs == 1).await;
    let healed = bad
        .store
        .read(16 * BS, 8 * BS)
        .expect("repaired copy verifies");
    assert!(healed == data, "repaired copy holds the good data");
    assert!(bad.store.block_seq(19).unwrap() > Some((1 << 40) | 1));
    assert_eq!(bad.store.block_seq(18).unwrap(), Some((1 << 40) | 1));
    assert_eq!(engine.status().in_sync, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_on_every_replica_is_an_io_error() {
    let cluster = Cluster::start(3, 4 * MIB).await;
    let engine = Engine::open(cluster.config(1, "node-0", NO_HANG))
        .await
        .unwrap();
    engine
        .write(0, Bytes::from(pattern(1, 2 * BS as usize)))
        .await
        .unwrap();
    wait_for("background acks", NO_HANG, || {
        engine.status().inflight_ops == 0
    })
    .await;
    for b in &cluster.blocks {
        b.corrupt_on_disk(1);
    }
    let e = engine.read(0, 2 * BS as u32).await.unwrap_err();
    assert_eq!(e.kind(), EngineErrorKind::Io);
    assert!(
        matches!(e, EngineError::AllCopiesCorrupt { block: 1, .. }),
        "{e}"
    );
    // Still fine elsewhere, nobody marked stale for a media error.
    assert_eq!(
        engine.read(0, BS as u32).await.unwrap(),
        pattern(1, 2 * BS as usize)[..BS as usize]
    );
    assert_eq!(engine.status().in_sync, 3);
    // A write over the bad block heals it everywhere.
    engine
        .write(BS, Bytes::from(pattern(2, BS as usize)))
        .await
        .unwrap();
    assert_eq!(
        engine.read(BS, BS as u32).await.unwrap(),
        pattern(2, BS as usize)
    );
}

/// One block a read returned: (block, bytes, tick the read began, tick it ended).
type Observation = (u64, Vec<u8>, u64, u64);

/// What the model knows about one write to one block.
#[derive(Clone, Copy)]
struct WriteRec {
    stamp: u64,
    issued: u64,
    acked: u64,
}

/// Many tasks write and read overlapping ranges of a few blocks at once; every read
/// must return, per block, a value no older than the last write acknowledged before
/// the read started (and not a write issued after the read ended). `kill_one` kills
/// a replica halfway through.
async fn concurrent_model_check(kill_one: bool) {
    const BLOCKS: u64 = 16;
    let mut cluster = Cluster::start(3, BLOCKS * BS).await;
    let engine = Engine::open(cluster.config(1, "node-1", Duration::from_secs(2)))
        .await
        .unwrap();
    let clock = Arc::new(AtomicU64::new(1));
    // Per block: every write (stamp 0 = the initial zeros, acked at tick 0).
    let history: Arc<Mutex<Vec<Vec<WriteRec>>>> = Arc::new(Mutex::new(
        (0..BLOCKS)
            .map(|_| {
                vec![WriteRec {
                    stamp: 0,
                    issued: 0,
                    acked: 0,
                }]
            })
            .collect(),
    ));
    let block_value = |stamp: u64, b: u64| -> Vec<u8> {
        if stamp == 0 {
            vec![0u8; BS as usize]
        } else {
            pattern(stamp * 1000 + b, BS as usize)
        }
    };
    let observed: Arc<Mutex<Vec<Observation>>> = Arc::default();
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let engine = engine.clone();
        let clock = Arc::clone(&clock);
        let history = Arc::clone(&history);
        let done = Arc::clone(&done);
        let observed = Arc::clone(&observed);
        tasks.push(tokio::spawn(async move {
            let mut rng = 0x1234_5678_9abc_def1u64 ^ (t + 1).wrapping_mul(0x9e37_79b9);
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            for i in 0..150u64 {
                let start = next() % BLOCKS;
                let n = 1 + next() % 4.min(BLOCKS - start);
                if next() % 2 == 0 {
                    let stamp = (t << 32) | (i + 1);
                    let mut data = Vec::with_capacity((n * BS) as usize);
                    for b in start..start + n {
                        data.extend(block_value(stamp, b));
                    }
                    let issued = clock.fetch_add(1, Ordering::SeqCst);
                    engine
                        .write(start * BS, Bytes::from(data))
                        .await
                        .unwrap_or_else(|e| panic!("write failed: {e}"));
                    let acked = clock.fetch_add(1, Ordering::SeqCst);
                    let mut h = history.lock().unwrap();
                    for b in start..start + n {
                        h[b as usize].push(WriteRec {
                            stamp,
                            issued,
                            acked,
                        });
                    }
                } else {
                    let began = clock.fetch_add(1, Ordering::SeqCst);
                    let got = engine
                        .read(start * BS, (n * BS) as u32)
                        .await
                        .unwrap_or_else(|e| panic!("read failed: {e}"));
                    let ended = clock.fetch_add(1, Ordering::SeqCst);
                    let mut obs = observed.lock().unwrap();
                    for (k, b) in (start..start + n).enumerate() {
                        let chunk = got[k * BS as usize..(k + 1) * BS as usize].to_vec();
                        obs.push((b, chunk, began, ended));
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    if kill_one {
        wait_for("some reads", NO_HANG, || done.load(Ordering::SeqCst) >= 100).await;
        cluster.replicas[0].kill().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let history = history.lock().unwrap();
    let observed = std::mem::take(&mut *observed.lock().unwrap());
    assert!(observed.len() > 200, "only {} observations", observed.len());
    for (b, value, began, ended) in observed {
        let writes = &history[b as usize];
        // The value must be one of the writes to this block...
        let Some(w) = writes.iter().find(|w| block_value(w.stamp, b) == value) else {
            panic!("block {b}: read returned bytes no write produced");
        };
        // ...issued before the read ended...
        assert!(
            w.issued < ended,
            "block {b}: read saw a write issued after it"
        );
        // ...and not superseded by a write that started after it was acknowledged
        // and was itself acknowledged before the read began.
        let superseded = writes
            .iter()
            .any(|w2| w2.issued > w.acked && w2.acked < began);
        assert!(
            !superseded,
            "block {b}: read (ticks {began}..{ended}) returned stamp {:#x} (acked at {}) though a newer write was acknowledged before it",
            w.stamp, w.acked
        );
    }
    if kill_one {
        assert!(stale_reason(&engine, "node-0").is_some());
    }
    assert_eq!(engine.status().counters.failed_ops, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_overlapping_io_reads_what_was_acknowledged() {
    concurrent_model_check(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_overlapping_io_survives_a_replica_death() {
    concurrent_model_check(true).await;
}

#[test]
fn block_target_adapter_serves_plain_threads() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cluster = rt.block_on(Cluster::start(3, 4 * MIB));
    let engine = rt
        .block_on(Engine::open(cluster.config(1, "node-0", NO_HANG)))
        .unwrap();
    let target: Arc<dyn BlockTarget> =
        Arc::new(EngineTarget::new(engine.clone(), rt.handle().clone()));
    assert_eq!(target.size(), 4 * MIB);

    let t2 = Arc::clone(&target);
    let worker = std::thread::spawn(move || {
        let t = t2;
        // Aligned, several blocks.
        let data = pattern(5, 3 * BS as usize);
        t.write_at(BS, &data).unwrap();
        let mut buf = vec![0u8; 3 * BS as usize];
        t.read_at(BS, &mut buf).unwrap();
        assert_eq!(buf, data);
        // Unaligned write and read across a block boundary (read-modify-write).
        t.write_at(2 * BS - 100, &[0xAB; 300]).unwrap();
        let mut small = vec![0u8; 302];
        t.read_at(2 * BS - 101, &mut small).unwrap();
        assert_eq!(small[0], data[BS as usize - 101]);
        assert!(small[1..301].iter().all(|&b| b == 0xAB));
        assert_eq!(small[301], data[BS as usize + 200]);
        // Larger than one engine request: split.
        let big = pattern(6, 2 * (8 << 20).min(MIB as usize) + BS as usize);
        t.write_at(MIB, &big).unwrap();
        let mut back = vec![0u8; big.len()];
        t.read_at(MIB, &mut back).unwrap();
        assert_eq!(back, big);
        t.flush().unwrap();
        // Discard with unaligned edges: whole blocks trimmed, edges zeroed.
        t.discard(BS + 10, 2 * BS).unwrap();
        let mut after = vec![0u8; 3 * BS as usize];
        t.read_at(BS, &mut after).unwrap();
        assert_eq!(after[..10], data[..10]);
        assert!(after[10..2 * BS as usize + 10].iter().all(|&b| b == 0));
        // Out of range maps to the frontend's out-of-range kind.
        let e = t.write_at(4 * MIB, &[0u8; 4096]).unwrap_err();
        assert_eq!(e.kind, TargetErrorKind::OutOfRange);
    });
    worker.join().unwrap();
    assert!(engine.status().counters.trims >= 1);

    // Lost quorum is EIO through the adapter, and does not hang the thread.
    let mut cluster = cluster;
    rt.block_on(async {
        cluster.replicas[1].kill().await;
        cluster.replicas[2].kill().await;
    });
    let t = Arc::clone(&target);
    let e = std::thread::spawn(move || t.write_at(0, &[1u8; 4096]).unwrap_err())
        .join()
        .unwrap();
    assert_eq!(e.kind, TargetErrorKind::Io);
    assert_eq!(e.errno(), libc::EIO);
    drop(target);
    drop(cluster);
    drop(engine);
    rt.shutdown_timeout(Duration::from_secs(5));
}
