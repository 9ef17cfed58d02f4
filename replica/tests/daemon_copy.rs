//! Restore and clone between real `tessera-replica` daemons: a volume created with a
//! copy source is filled by merging the sealed copies of a snapshot from its holders
//! (highest seq per block), in the background, resumably.
//!
//! Covered: the merge of differing copies (newer data, a newer trim, a copy only one
//! holder has, a byte flipped on disk) onto a fourth daemon and onto a holder, byte for
//! byte and with seq 1; kill -9 of the copying daemon (resumes from its durable
//! progress); holders killed mid-copy (continues with a majority, stalls with
//! `last_error` below it, completes once one is back); bad requests; `SnapshotRanges`;
//! restore from a deleted volume's snapshot; DeleteVolume stopping a running copy.
//! Restores onto a daemon that holds the snapshot share its sealed layers and only
//! reconcile: versions-only streams, exactly the differing blocks fetched, a local
//! block the listed holders lack cleared, and the result independent of the source
//! after a kill -9 and the source's deletion.
//! Harness in `daemon_support` (own process group, killed in Drop, deadline polls, no
//! fixed sleeps) and `copy_support` (shared with `daemon_rebuild.rs`).

mod copy_support;
mod daemon_support;

use std::path::Path;
use std::time::Instant;

use copy_support::*;
use daemon_support::{create_req, entries, get_req, workdir, Daemon, POLL};
use tessera_replica::snapshot_read::chunk::ChunkKind;
use tessera_replica_protocol::block::BlockVersion;
use tessera_replica_protocol::control_proto as proto;
use tessera_replica_protocol::data::{ClientError, ErrorCode};
use tessera_tls::Identity;
use tonic::Code;

/// Three holders of `volume` with `blocks` identical blocks each, sealed as "snap".
async fn three_identical_holders(work: &Path, volume: &str, blocks: u64) -> [Node; 3] {
    let nodes = [
        Node::start(work, "a", ARGS).await,
        Node::start(work, "b", ARGS).await,
        Node::start(work, "c", ARGS).await,
    ];
    for n in &nodes {
        n.create(volume, blocks * BS).await;
        let c = n.data(volume).await;
        for first in (0..blocks).step_by(256) {
            let data: Vec<u8> = (first..(first + 256).min(blocks))
                .flat_map(|b| pattern(b, 3))
                .collect();
            c.write(first * BS, data, seq(5)).await.expect("write");
        }
        n.snapshot(volume, "snap").await;
    }
    nodes
}

fn identical_content(blocks: u64) -> Vec<u8> {
    (0..blocks).flat_map(|b| pattern(b, 3)).collect()
}

/// The `fetched_blocks=` and `fixed_blocks=` of a completed reconcile, from its log.
fn reconciled(node: &Node) -> (u64, u64) {
    let log = node.daemon.log();
    let marker = "copy complete from shared layers";
    match (
        logged_number(&log, marker, "fetched_blocks"),
        logged_number(&log, marker, "fixed_blocks"),
    ) {
        (Some(fetched), Some(fixed)) => (fetched, fixed),
        _ => panic!("no reconcile completion on {}:\n{log}", node.name),
    }
}

/// Onto a fourth daemon (a full copy) and onto a holder (its own sealed copy shared,
/// then reconciled): both end up with the merge, and the holder fetches only what its
/// copy lacks.
#[tokio::test]
async fn restore_merges_differing_copies_by_highest_seq() {
    let work = workdir();
    let (a, b, c) = (
        Node::start(work.path(), "a", ARGS).await,
        Node::start(work.path(), "b", ARGS).await,
        Node::start(work.path(), "c", ARGS).await,
    );
    let d = Node::start(work.path(), "d", ARGS).await;
    const SIZE: u64 = 2 * MIB; // 512 blocks: two chunks
    for n in [&a, &b, &c] {
        n.create("src", SIZE).await;
    }
    let (ca, cb, cc) = (
        a.data("src").await,
        b.data("src").await,
        c.data("src").await,
    );
    let all = [&ca, &cb, &cc];
    let common: Vec<u8> = (0..40).flat_map(|blk| pattern(blk, 1)).collect();
    for cl in all {
        cl.write(0, common.clone(), seq(1)).await.expect("common");
        // Blocks 60 and 70: written then trimmed everywhere.
        for (blk, w, t) in [(60, 10, 11), (70, 19, 20)] {
            cl.write(blk * BS, pattern(blk, 1), seq(w))
                .await
                .expect("write");
            cl.trim(blk * BS, BS, seq(t)).await.expect("trim");
        }
        cl.write(300 * BS, pattern(300, 1), seq(300))
            .await
            .expect("w300");
    }
    // Block 50: B holds a newer write.
    ca.write(50 * BS, pattern(50, 2), seq(100))
        .await
        .expect("a50");
    cb.write(50 * BS, pattern(50, 3), seq(101))
        .await
        .expect("b50");
    cc.write(50 * BS, pattern(50, 2), seq(100))
        .await
        .expect("c50");
    // Block 51: B trimmed it after the write the others hold; block 54: A did.
    for cl in all {
        cl.write(51 * BS, pattern(51, 2), seq(200))
            .await
            .expect("w51");
        cl.write(54 * BS, pattern(54, 2), seq(220))
            .await
            .expect("w54");
    }
    cb.trim(51 * BS, BS, seq(210)).await.expect("b51 trim");
    ca.trim(54 * BS, BS, seq(230)).await.expect("a54 trim");
    // Block 52: A's trim is older than B's write; C never saw either.
    ca.trim(52 * BS, BS, seq(5)).await.expect("a52 trim");
    cb.write(52 * BS, pattern(52, 5), seq(6))
        .await
        .expect("b52");
    // Block 53 and the last block: only one holder has them.
    cc.write(53 * BS, pattern(53, 6), seq(7))
        .await
        .expect("c53");
    ca.write(511 * BS, pattern(511, 7), seq(9))
        .await
        .expect("a511");
    // Block 301: A's newest copy will be damaged; B and C hold an older one.
    ca.write(301 * BS, pattern(301, 9), seq(400))
        .await
        .expect("a301");
    cb.write(301 * BS, pattern(301, 8), seq(350))
        .await
        .expect("b301");
    cc.write(301 * BS, pattern(301, 8), seq(350))
        .await
        .expect("c301");
    for n in [&a, &b, &c] {
        n.snapshot("src", "snap").await;
    }
    // After the snapshot: must not reach the restored volume.
    for cl in all {
        cl.write(0, pattern(0, 99), seq(1000))
            .await
            .expect("later write");
        cl.trim(BS, BS, seq(1001)).await.expect("later trim");
    }
    a.corrupt_sealed("src", 300);
    a.corrupt_sealed("src", 301);
    // A tombstone checks without its data: damaged, it shows even versions-only.
    c.corrupt_sealed_entry("src", 70);

    let mut blocks: Vec<(u64, Vec<u8>)> = (0..40).map(|blk| (blk, pattern(blk, 1))).collect();
    blocks.extend([
        (50, pattern(50, 3)),
        (52, pattern(52, 5)),
        (53, pattern(53, 6)),
        (300, pattern(300, 1)),
        (301, pattern(301, 8)),
        (511, pattern(511, 7)),
    ]);
    let expected = content(SIZE, &blocks);
    let data_blocks: Vec<u64> = blocks.iter().map(|(blk, _)| *blk).collect();

    // The holder reports the damage instead of sending the bytes...
    let (versions, _) = stream_versions(&a, "src", "snap", SIZE).await;
    assert_eq!(versions[300], BlockVersion::Corrupt { seq: seq(300) });
    assert_eq!(versions[301], BlockVersion::Corrupt { seq: seq(400) });
    assert_eq!(versions[52], BlockVersion::Trimmed { seq: seq(5) });
    assert_eq!(versions[53], BlockVersion::Unwritten);
    // ...while versions-only it reports what the entries claim, unread.
    let (claims, _) = stream_as(&a, "src", "snap", SIZE, ChunkKind::VersionsOnly).await;
    assert_eq!(claims[300], BlockVersion::Data { seq: seq(300) });
    assert_eq!(claims[301], BlockVersion::Data { seq: seq(400) });
    assert_eq!(claims[52], BlockVersion::Trimmed { seq: seq(5) });
    let (claims, offsets) = stream_as(&c, "src", "snap", SIZE, ChunkKind::VersionsOnly).await;
    assert_eq!(claims[70], BlockVersion::Corrupt { seq: seq(20) });
    assert_eq!(claims[53], BlockVersion::Data { seq: seq(7) });
    assert_eq!(offsets, vec![0, MIB]);

    let source = copy_source("snap", "src", SIZE, &[&a, &b, &c], 3);
    // Onto a fourth daemon, into a larger volume; and onto one of the holders.
    let created = restore(&d, "restored", SIZE + MIB, source.clone()).await;
    assert_eq!(created.copy_source, Some(source.clone()));
    restore(&b, "restored-on-b", SIZE, source.clone()).await;

    for (node, id, size, shared) in [
        (&d, "restored", SIZE + MIB, false),
        (&b, "restored-on-b", SIZE, true),
    ] {
        let rec = node.wait_complete(id).await;
        let progress = rec.copy.expect("progress");
        assert_eq!(
            (
                progress.done_bytes,
                progress.total_bytes,
                progress.last_error.as_str(),
                progress.shared_layers
            ),
            (SIZE, SIZE, "", shared),
            "{id}"
        );
        let mut want = expected.clone();
        want.resize(size as usize, 0);
        assert_reads(node, id, &want, "restored").await;
    }
    // D fetched every data block of the merge. B fetched what its copy lacks (53,
    // 511) and 301, where A's damaged claim is newer than B's version (the data merge
    // then keeps B's); it trimmed 54, and 70 as C's tombstone is damaged.
    assert_eq!(
        logged_number(&d.daemon.log(), "copy complete", "fetched_blocks"),
        Some(data_blocks.len() as u64),
        "{}",
        d.daemon.log()
    );
    assert_eq!(reconciled(&b), (3, 5), "{}", b.daemon.log());

    // Every copied block carries seq 1; trimmed and never-written ones were not written.
    d.snapshot("restored", "verify").await;
    let (versions, offsets) = stream_versions(&d, "restored", "verify", SIZE + MIB).await;
    assert_eq!(offsets, vec![0, MIB], "empty chunks are not sent");
    for (blk, v) in versions.iter().enumerate() {
        let want = if data_blocks.contains(&(blk as u64)) {
            BlockVersion::Data { seq: 1 }
        } else {
            BlockVersion::Unwritten
        };
        assert_eq!(*v, want, "block {blk}");
    }
    // On B the shared base keeps the source's seqs, and fixes carry the winner's.
    b.snapshot("restored-on-b", "verify").await;
    let (versions, _) = stream_versions(&b, "restored-on-b", "verify", SIZE).await;
    for (blk, want) in [
        (0, BlockVersion::Data { seq: seq(1) }),
        (50, BlockVersion::Data { seq: seq(101) }),
        (51, BlockVersion::Trimmed { seq: seq(210) }),
        (53, BlockVersion::Data { seq: seq(7) }),
        (54, BlockVersion::Trimmed { seq: seq(230) }),
        (70, BlockVersion::Trimmed { seq: seq(20) }),
        (301, BlockVersion::Data { seq: seq(350) }),
        (511, BlockVersion::Data { seq: seq(9) }),
    ] {
        assert_eq!(versions[blk], want, "block {blk}");
    }
}

#[tokio::test]
async fn killed_target_resumes_from_its_durable_progress() {
    let work = workdir();
    const BLOCKS: u64 = 2048; // 8 MiB
    let holders = three_identical_holders(work.path(), "big", BLOCKS).await;
    let throttled = ["--capacity", "1Gi", "--copy-max-bandwidth", "4Mi"];
    let mut args = throttled.to_vec();
    args.extend(["--metrics-listen", "127.0.0.1:0"]);
    let d = Node::start(work.path(), "d", &args).await;
    let source = copy_source("snap", "big", BLOCKS * BS, &holders.each_ref(), 3);
    restore(&d, "r", BLOCKS * BS, source).await;

    let rec = d
        .wait_copy("r", "some progress", |p| {
            p.done_bytes > 0 && p.done_bytes < p.total_bytes
        })
        .await;
    let before = rec.copy.expect("progress").done_bytes;
    // Not served while incomplete, and says why.
    let err = d
        .daemon
        .data_client("r", 1)
        .await
        .expect_err("a volume being populated is not served");
    match &err {
        ClientError::Remote(r) => {
            assert_eq!(r.code, ErrorCode::UnknownVolume);
            assert!(
                r.message
                    .contains("still being populated from snapshot snap"),
                "{}",
                r.message
            );
        }
        other => panic!("expected an error reply, got {other:?}"),
    }
    let metrics = d.metrics().await;
    assert!(
        metrics.contains("tessera_replica_copies_active 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "tessera_replica_copy_total_bytes{{volume_id=\"r\"}} {}",
            BLOCKS * BS
        )),
        "{metrics}"
    );

    let d_dir = d.data_dir.clone();
    d.daemon.kill9().await;
    let d = Node {
        daemon: Daemon::start(work.path(), &d_dir, &throttled).await,
        data_dir: d_dir,
        name: "d",
    };
    let after = d.record("r").await.copy.expect("progress");
    assert!(
        after.done_bytes >= before && after.done_bytes > 0,
        "durable progress lost: {} before the kill, {after:?} after",
        before
    );
    d.wait_complete("r").await;
    let resumed_at = logged_done(&d.daemon.log(), "copy resumed");
    assert!(
        resumed_at.is_some_and(|at| at >= before),
        "no resume from {before}:\n{}",
        d.daemon.log()
    );
    assert!(d.read_all("r", BLOCKS * BS).await == identical_content(BLOCKS));
}

#[tokio::test]
async fn copy_survives_one_lost_holder_and_waits_out_two() {
    let work = workdir();
    const BLOCKS: u64 = 4096; // 16 MiB
    let [a, b, c] = three_identical_holders(work.path(), "big", BLOCKS).await;
    // Slow enough that what a dead holder had already sent cannot finish the copy.
    let d = Node::start(
        work.path(),
        "d",
        &["--capacity", "1Gi", "--copy-max-bandwidth", "2Mi"],
    )
    .await;
    let source = copy_source("snap", "big", BLOCKS * BS, &[&a, &b, &c], 3);
    restore(&d, "r", BLOCKS * BS, source).await;
    d.wait_copy("r", "some progress", |p| p.done_bytes > 0)
        .await;

    // One holder dies: the copy goes on with the other two.
    let (a_dir, a_control) = (a.data_dir.clone(), a.daemon.control.clone());
    a.daemon.kill9().await;
    let deadline = Instant::now() + COPY_TIMEOUT;
    let dropped_at = loop {
        if let Some(at) = logged_done(&d.daemon.log(), "holder dropped from the copy") {
            break at;
        }
        assert!(
            Instant::now() < deadline,
            "A never dropped:\n{}",
            d.daemon.log()
        );
        tokio::time::sleep(POLL * 5).await;
    };
    let rec = d
        .wait_copy("r", "progress without A", |p| {
            p.done_bytes > dropped_at || p.complete
        })
        .await;
    assert!(
        !rec.copy.expect("progress").complete,
        "copy finished before the second holder could be killed; slow it down"
    );

    // A second one dies: no majority, the copy waits and says why.
    b.daemon.kill9().await;
    let stalled = d
        .wait_copy("r", "a recorded error", |p| !p.last_error.is_empty())
        .await
        .copy
        .expect("progress");
    assert!(!stalled.complete);
    assert!(
        stalled.last_error.contains("holders answered"),
        "{}",
        stalled.last_error
    );

    // The first one comes back (same address): the copy completes.
    let _a = Node::restart(work.path(), a_dir, "a", &a_control).await;
    let done = d.wait_complete("r").await.copy.expect("progress");
    assert_eq!(done.last_error, "");
    assert!(d.read_all("r", BLOCKS * BS).await == identical_content(BLOCKS));
    drop(c);
}

#[tokio::test]
async fn bad_requests_are_refused_and_leave_nothing() {
    let work = workdir();
    let h = Node::start(work.path(), "h", ARGS).await;
    h.create("v", MIB).await;
    h.data("v")
        .await
        .write(0, pattern(0, 1), seq(1))
        .await
        .expect("write");
    h.snapshot("v", "s1").await;
    h.snapshot("v", "s2").await;
    let mut ctl = h.daemon.client().await;
    // Snapshot blocks are read by replicas (copies and repairs) only.
    let mut peer = h.daemon.client_as(Identity::Replica).await;

    let read = |volume: &str, snapshot: &str, offset, length| proto::ReadSnapshotBlocksRequest {
        volume_id: volume.into(),
        snapshot_id: snapshot.into(),
        offset,
        length,
        seqs_only: false,
    };
    for (req, code) in [
        (read("v", "nope", 0, MIB), Code::NotFound),
        (read("nope", "s1", 0, MIB), Code::NotFound),
        (read("v", "s1", 1, BS), Code::InvalidArgument),
        (read("v", "s1", 0, 100), Code::InvalidArgument),
        (read("v", "s1", 0, 2 * MIB), Code::OutOfRange),
        (read("v", "s1", MIB, BS), Code::OutOfRange),
    ] {
        let what = format!("{req:?}");
        let err = peer.read_snapshot_blocks(req).await.expect_err(&what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
    }
    let ranges = |snapshot: &str, base: &str| proto::SnapshotRangesRequest {
        volume_id: "v".into(),
        snapshot_id: snapshot.into(),
        base_snapshot_id: base.into(),
    };
    for (req, code) in [
        (ranges("s1", "s2"), Code::FailedPrecondition),
        (ranges("s2", "nope"), Code::NotFound),
        (ranges("nope", ""), Code::NotFound),
    ] {
        let what = format!("{req:?}");
        let err = ctl.snapshot_ranges(req).await.expect_err(&what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
    }

    let good = copy_source("s1", "v", MIB, &[&h], 1);
    let mut no_holders = good.clone();
    no_holders.holders.clear();
    let mut no_majority = good.clone();
    no_majority.source_replication_factor = 3;
    let mut no_snapshot = good.clone();
    no_snapshot.snapshot_id.clear();
    for (size, source, code) in [
        (MIB, no_holders, Code::InvalidArgument),
        (MIB, no_majority, Code::InvalidArgument),
        (MIB, no_snapshot, Code::InvalidArgument),
        (MIB / 2, good.clone(), Code::OutOfRange),
    ] {
        let what = format!("{source:?} into {size}");
        let err = ctl
            .create_volume(restore_req("r", size, source))
            .await
            .expect_err(&what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert_eq!(entries(&h.data_dir.join("volumes")), vec!["v"], "{what}");
    }

    // Idempotent with the same source; another source is ALREADY_EXISTS.
    let first = restore(&h, "r", MIB, good.clone()).await;
    let again = restore(&h, "r", MIB, good.clone()).await;
    assert_eq!(
        (
            &again.volume_id,
            &again.copy_source,
            again.created_unix_nanos
        ),
        (
            &first.volume_id,
            &first.copy_source,
            first.created_unix_nanos
        )
    );
    let mut other = good.clone();
    other.snapshot_id = "s2".into();
    let err = ctl
        .create_volume(restore_req("r", MIB, other))
        .await
        .expect_err("another source");
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
    let plain = ctl
        .create_volume(create_req("r", MIB))
        .await
        .expect_err("no source");
    assert_eq!(plain.code(), Code::AlreadyExists, "{}", plain.message());
    h.wait_complete("r").await;
    assert_eq!(h.read_all("r", MIB).await[..BS as usize], pattern(0, 1));
}

#[tokio::test]
async fn snapshot_ranges_are_exactly_what_was_written() {
    let work = workdir();
    let h = Node::start(work.path(), "h", ARGS).await;
    h.create("v", 4 * MIB).await;
    let c = h.data("v").await;
    let write = |blk: u64, n: u64, s: u64| {
        let data: Vec<u8> = (blk..blk + n).flat_map(|b| pattern(b, 1)).collect();
        let c = &c;
        async move { c.write(blk * BS, data, seq(s)).await.expect("write") }
    };
    write(0, 4, 1).await;
    write(100, 1, 2).await;
    h.snapshot("v", "s1").await;
    write(2, 1, 3).await;
    write(200, 2, 4).await;
    write(300, 1, 5).await;
    c.trim(300 * BS, BS, seq(6)).await.expect("trim");
    h.snapshot("v", "s2").await;
    write(400, 1, 7).await; // head only

    let ctl = h.daemon.client().await;
    let ask = |snapshot: &'static str, base: &'static str| {
        let req = proto::SnapshotRangesRequest {
            volume_id: "v".into(),
            snapshot_id: snapshot.into(),
            base_snapshot_id: base.into(),
        };
        let mut ctl = ctl.clone();
        async move {
            let r = ctl.snapshot_ranges(req).await.expect("ranges").into_inner();
            assert_eq!(r.size_bytes, 4 * MIB);
            r.ranges
                .iter()
                .map(|r| (r.offset / BS, r.length / BS))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(ask("s1", "").await, vec![(0, 4), (100, 1)]);
    assert_eq!(ask("s2", "").await, vec![(0, 4), (100, 1), (200, 2)]);
    assert_eq!(ask("s2", "s1").await, vec![(2, 1), (200, 2), (300, 1)]);
    assert_eq!(ask("s2", "s2").await, vec![]);
}

#[tokio::test]
async fn deleted_volumes_snapshots_restore_and_delete_stops_a_copy() {
    let work = workdir();
    let h = Node::start(work.path(), "h", ARGS).await;
    const BLOCKS: u64 = 1024; // 4 MiB
    h.create("v", BLOCKS * BS).await;
    let c = h.data("v").await;
    for first in (0..BLOCKS).step_by(256) {
        let data: Vec<u8> = (first..first + 256).flat_map(|b| pattern(b, 4)).collect();
        c.write(first * BS, data, seq(2)).await.expect("write");
    }
    drop(c);
    h.snapshot("v", "s").await;
    let mut ctl = h.daemon.client().await;
    ctl.delete_volume(proto::DeleteVolumeRequest {
        volume_id: "v".into(),
    })
    .await
    .expect("delete source volume");
    let source = copy_source("s", "v", BLOCKS * BS, &[&h], 1);

    // The deleted volume's snapshot still restores, here onto its own holder.
    restore(&h, "r", BLOCKS * BS, source.clone()).await;
    h.wait_complete("r").await;
    let want: Vec<u8> = (0..BLOCKS).flat_map(|b| pattern(b, 4)).collect();
    assert!(h.read_all("r", BLOCKS * BS).await == want);

    // A throttled copy elsewhere, deleted mid-way: its task stops with the delete.
    let t = Node::start(
        work.path(),
        "t",
        &[
            "--capacity",
            "1Gi",
            "--copy-max-bandwidth",
            "1Mi",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    )
    .await;
    restore(&t, "doomed", BLOCKS * BS, source).await;
    t.wait_copy("doomed", "some progress", |p| p.done_bytes > 0)
        .await;
    assert!(t
        .metrics()
        .await
        .contains("tessera_replica_copies_active 1"));
    let existed = t
        .daemon
        .client()
        .await
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: "doomed".into(),
        })
        .await
        .expect("delete copying volume")
        .into_inner()
        .existed;
    assert!(existed);
    assert!(
        t.daemon.log().contains("copy task stopped"),
        "{}",
        t.daemon.log()
    );
    let metrics = t.metrics().await;
    assert!(
        metrics.contains("tessera_replica_copies_active 0"),
        "{metrics}"
    );
    assert!(!metrics.contains("volume_id=\"doomed\""), "{metrics}");
    let err = t
        .daemon
        .client()
        .await
        .get_volume(get_req("doomed"))
        .await
        .expect_err("deleted");
    assert_eq!(err.code(), Code::NotFound);
    assert!(entries(&t.data_dir.join("volumes")).is_empty());
}

#[tokio::test]
async fn a_holder_outside_the_listed_majority_drops_its_unacknowledged_writes() {
    let work = workdir();
    let (a, b, c) = (
        Node::start(work.path(), "a", ARGS).await,
        Node::start(work.path(), "b", ARGS).await,
        Node::start(work.path(), "c", ARGS).await,
    );
    const SIZE: u64 = MIB;
    for n in [&a, &b, &c] {
        n.create("src", SIZE).await;
        let cl = n.data("src").await;
        let common: Vec<u8> = (0..8).flat_map(|blk| pattern(blk, 1)).collect();
        cl.write(0, common, seq(1)).await.expect("common");
        cl.write(82 * BS, pattern(82, 1), seq(40))
            .await
            .expect("w82");
    }
    // In flight during the snapshot: A alone got a new block and an overwrite (never
    // acknowledged); B and C got a write A missed (acknowledged by them).
    let ca = a.data("src").await;
    ca.write(80 * BS, pattern(80, 5), seq(50))
        .await
        .expect("a80");
    ca.write(82 * BS, pattern(82, 2), seq(61))
        .await
        .expect("a82");
    for n in [&b, &c] {
        n.data("src")
            .await
            .write(81 * BS, pattern(81, 5), seq(51))
            .await
            .expect("w81");
    }
    for n in [&a, &b, &c] {
        n.snapshot("src", "snap").await;
    }
    let mut blocks: Vec<(u64, Vec<u8>)> = (0..8).map(|blk| (blk, pattern(blk, 1))).collect();
    blocks.extend([(81, pattern(81, 5)), (82, pattern(82, 1))]);
    let expected = content(SIZE, &blocks);

    // The controller's fixed majority is B and C; A holds the snapshot all the same.
    let source = copy_source("snap", "src", SIZE, &[&b, &c], 3);
    restore(&a, "r", SIZE, source).await;
    let progress = a.wait_complete("r").await.copy.expect("progress");
    assert!(progress.shared_layers, "{progress:?}");
    assert_reads(&a, "r", &expected, "restored").await;
    // Fetched 81 and 82; trimmed 80.
    assert_eq!(reconciled(&a), (2, 3), "{}", a.daemon.log());

    // kill -9 after completion: the restored volume is durable as it was.
    let (dir, control) = (a.data_dir.clone(), a.daemon.control.clone());
    a.daemon.kill9().await;
    let a = Node::restart(work.path(), dir, "a", &control).await;
    assert!(a.record("r").await.copy.expect("progress").complete);
    assert_reads(&a, "r", &expected, "after a restart").await;

    // The source goes entirely: the restored volume does not depend on it.
    let mut ctl = a.daemon.client().await;
    let existed = ctl
        .delete_snapshot(proto::DeleteSnapshotRequest {
            volume_id: "src".into(),
            snapshot_id: "snap".into(),
        })
        .await
        .expect("delete source snapshot")
        .into_inner()
        .existed;
    assert!(existed);
    assert!(
        ctl.delete_volume(proto::DeleteVolumeRequest {
            volume_id: "src".into(),
        })
        .await
        .expect("delete source volume")
        .into_inner()
        .existed
    );
    let err = ctl
        .get_volume(get_req("src"))
        .await
        .expect_err("source deleted");
    assert_eq!(err.code(), Code::NotFound);
    assert_reads(&a, "r", &expected, "after deleting the source").await;
    let (dir, control) = (a.data_dir.clone(), a.daemon.control.clone());
    a.daemon.kill9().await;
    let a = Node::restart(work.path(), dir, "a", &control).await;
    assert_reads(
        &a,
        "r",
        &expected,
        "after the source's deletion and a restart",
    )
    .await;
}
