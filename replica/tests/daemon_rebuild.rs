//! Rebuilding a lost replica between real `tessera-replica` daemons: a CreateVolume
//! with a `rebuild` copy source (and the volume's epoch) fills a new replica from the
//! surviving replicas' *heads* (ReadSnapshotBlocks with no snapshot), merged per block
//! by highest intact seq, every block keeping the seq (and trims the tombstone) it
//! carries.
//!
//! Covered: the merge of holders that differ (an unacknowledged newer write, trims,
//! a block only one holder has, writes after a snapshot, a byte flipped on one
//! holder's disk) checked block by block through VERSIONS and READ, the new replica's
//! epoch fence and fresh sync state; kill -9 of the rebuilding daemon mid-copy
//! (resumes from its durable progress, ends identical to the merge); the rules of a
//! rebuild source and idempotent repeats; the head stream itself (the head, not a
//! snapshot; refused for volumes still populating or deleted).
//! Harness in `daemon_support` and `copy_support` (own process groups, killed in
//! Drop, deadline polls, no fixed sleeps).

mod copy_support;
mod daemon_support;

use copy_support::*;
use daemon_support::{create_req, entries, get_req, workdir, Daemon};
use tessera_replica::snapshot_read::chunk::ChunkKind;
use tessera_replica_protocol::block::BlockVersion;
use tessera_replica_protocol::control_proto as proto;
use tessera_replica_protocol::data::{ClientError, ErrorCode, ReplicaDataClient};
use tessera_replica_protocol::seq::MAX_EPOCH;
use tessera_tls::Identity;
use tonic::Code;

/// One block as VERSIONS (or a stream) reports it: its version, and its bytes when it
/// is intact data.
type Block = (BlockVersion, Option<Vec<u8>>);

/// Largest VERSIONS request of the data plane.
const VERSIONS_LEN: u64 = 4 * MIB;

/// Seq `n` of an engine of `epoch`.
fn at(epoch: u64, n: u64) -> u64 {
    (epoch << 40) | n
}

/// The replica set of a volume on `nodes`.
fn replica_set(nodes: &[&Node]) -> Vec<proto::ReplicaRef> {
    nodes.iter().map(|n| n.holder()).collect()
}

/// CreateVolume of `id` on `node` as a member of `set`.
async fn create_member(node: &Node, id: &str, size: u64, set: &[proto::ReplicaRef]) {
    node.daemon
        .client()
        .await
        .create_volume(proto::CreateVolumeRequest {
            replicas: set.to_vec(),
            ..create_req(id, size)
        })
        .await
        .unwrap_or_else(|e| panic!("create {id} on {}: {e}", node.name));
}

/// RaiseEpoch of `id` on `node` from 0 to `epoch`.
async fn raise(node: &Node, id: &str, epoch: u64) {
    node.daemon
        .client()
        .await
        .raise_epoch(proto::RaiseEpochRequest {
            volume_id: id.into(),
            expected_epoch: 0,
            new_epoch: epoch,
        })
        .await
        .unwrap_or_else(|e| panic!("raise {id} on {}: {e}", node.name));
}

/// A rebuild of `volume` from `holders`, a volume of replication factor `rf`.
fn rebuild_source(volume: &str, size: u64, holders: &[&Node], rf: u32) -> proto::CopySource {
    proto::CopySource {
        snapshot_id: String::new(),
        source_volume_id: volume.into(),
        source_replication_factor: rf,
        holders: holders.iter().map(|n| n.holder()).collect(),
        size_bytes: size,
        clone: false,
        rebuild: true,
        fence_epoch: 0,
    }
}

fn rebuild_req(
    id: &str,
    size: u64,
    set: &[proto::ReplicaRef],
    source: proto::CopySource,
    epoch: u64,
) -> proto::CreateVolumeRequest {
    proto::CreateVolumeRequest {
        replicas: set.to_vec(),
        copy_source: Some(source),
        epoch,
        ..create_req(id, size)
    }
}

async fn rebuild(node: &Node, req: proto::CreateVolumeRequest) -> proto::VolumeRecord {
    let id = req.volume_id.clone();
    node.daemon
        .client()
        .await
        .create_volume(req)
        .await
        .unwrap_or_else(|e| panic!("rebuild {id} on {}: {e}", node.name))
        .into_inner()
}

/// Every block of the volume through VERSIONS: its version and, for intact data, its
/// bytes.
async fn blocks_of(c: &ReplicaDataClient, size: u64) -> Vec<Block> {
    let mut out = Vec::with_capacity((size / BS) as usize);
    let mut offset = 0;
    while offset < size {
        let len = VERSIONS_LEN.min(size - offset);
        let part = c.versions(offset, len, true).await.expect("versions");
        out.extend(part.iter().map(|(_, v, d)| (v, d.map(<[u8]>::to_vec))));
        offset += len;
    }
    out
}

/// The whole volume through READ.
async fn read_all_at(c: &ReplicaDataClient, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(size as usize);
    let mut offset = 0;
    while offset < size {
        let len = MIB.min(size - offset);
        out.extend(c.read(offset, len as u32).await.expect("read"));
        offset += len;
    }
    out
}

/// What a volume of `blocks` reads as.
fn contents(blocks: &[Block]) -> Vec<u8> {
    blocks
        .iter()
        .flat_map(|(_, d)| d.clone().unwrap_or_else(|| vec![0u8; BS as usize]))
        .collect()
}

/// Per block, the version with the highest seq among intact copies (what a rebuild
/// from every one of `copies` must end with).
fn merge(copies: &[Vec<Block>]) -> Vec<Block> {
    (0..copies[0].len())
        .map(|b| {
            copies
                .iter()
                .map(|c| c[b].clone())
                .filter(|(v, _)| !matches!(v, BlockVersion::Corrupt { .. }))
                .max_by_key(|(v, _)| v.seq())
                .expect("an intact copy")
        })
        .collect()
}

/// Asserts `got` is `want` block by block, naming the first block that differs.
fn assert_blocks(got: &[Block], want: &[Block], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: block count");
    for (b, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.0, w.0, "{what}: version of block {b}");
        assert!(g.1 == w.1, "{what}: data of block {b} differs");
    }
}

/// The error a data-plane connection at `epoch` gets.
async fn refused(node: &Node, volume: &str, epoch: u64) -> (ErrorCode, String) {
    match node.daemon.data_client(volume, epoch).await {
        Err(ClientError::Remote(r)) => (r.code, r.message),
        Err(other) => panic!("expected an error reply, got {other:?}"),
        Ok(_) => panic!("{volume} on {} served a HELLO at epoch {epoch}", node.name),
    }
}

/// Three holders that differ the way replicas do after writes in flight, a fourth
/// daemon rebuilding from all of them: it ends with exactly the per-block winner, each
/// block with its own seq, serves the volume at its epoch only, and starts with a
/// clean sync state.
#[tokio::test]
async fn rebuild_copies_the_merge_of_the_heads_with_every_seq() {
    let work = workdir();
    let (a, b, c, d) = (
        Node::start(work.path(), "a", ARGS).await,
        Node::start(work.path(), "b", ARGS).await,
        Node::start(work.path(), "c", ARGS).await,
        Node::start(work.path(), "d", ARGS).await,
    );
    const SIZE: u64 = 2 * MIB; // 512 blocks: two chunks
    const EPOCH: u64 = 3;
    let e = |n| at(EPOCH, n);
    let set = replica_set(&[&a, &b, &c]);
    for n in [&a, &b, &c] {
        create_member(n, "v", SIZE, &set).await;
        raise(n, "v", EPOCH).await;
    }
    let (ca, cb, cc) = (
        a.data_at("v", EPOCH).await,
        b.data_at("v", EPOCH).await,
        c.data_at("v", EPOCH).await,
    );
    let all = [&ca, &cb, &cc];
    let common: Vec<u8> = (0..40).flat_map(|blk| pattern(blk, 1)).collect();
    for cl in all {
        cl.write(0, common.clone(), e(1)).await.expect("common");
        cl.write(60 * BS, pattern(60, 1), e(10)).await.expect("w60");
        cl.trim(60 * BS, BS, e(11)).await.expect("trim 60");
        cl.write(300 * BS, pattern(300, 1), e(300))
            .await
            .expect("w300");
        cl.write(301 * BS, pattern(301, 8), e(350))
            .await
            .expect("w301");
        cl.write(51 * BS, pattern(51, 2), e(200))
            .await
            .expect("w51");
    }
    // Block 50: B holds a newer write the others missed (never acknowledged).
    ca.write(50 * BS, pattern(50, 2), e(100))
        .await
        .expect("a50");
    cc.write(50 * BS, pattern(50, 2), e(100))
        .await
        .expect("c50");
    cb.write(50 * BS, pattern(50, 3), e(101))
        .await
        .expect("b50");
    // Block 51: B trimmed it after the write everyone holds.
    cb.trim(51 * BS, BS, e(210)).await.expect("b51 trim");
    // Block 52: A's trim is older than B's write; C never saw either.
    ca.trim(52 * BS, BS, e(5)).await.expect("a52 trim");
    cb.write(52 * BS, pattern(52, 5), e(6)).await.expect("b52");
    // Block 53 and the last block: only one holder has them.
    cc.write(53 * BS, pattern(53, 6), e(7)).await.expect("c53");
    ca.write(511 * BS, pattern(511, 7), e(9))
        .await
        .expect("a511");
    // Block 301: A's newest version will be damaged.
    ca.write(301 * BS, pattern(301, 9), e(400))
        .await
        .expect("a301");
    // A snapshot, then writes into the new head: a rebuild copies the head (every
    // layer), not the snapshot.
    for n in [&a, &b, &c] {
        n.snapshot("v", "s").await;
    }
    for cl in all {
        cl.write(0, pattern(0, 99), e(1000))
            .await
            .expect("later write");
        cl.trim(BS, BS, e(1001)).await.expect("later trim");
    }
    a.corrupt_sealed("v", 300);
    a.corrupt_sealed("v", 301);

    let mut want = vec![(BlockVersion::Unwritten, None); (SIZE / BS) as usize];
    let mut data = |blk: u64, seq: u64, bytes: Vec<u8>| {
        want[blk as usize] = (BlockVersion::Data { seq }, Some(bytes));
    };
    data(0, e(1000), pattern(0, 99));
    for blk in 2..40 {
        data(blk, e(1), pattern(blk, 1));
    }
    data(50, e(101), pattern(50, 3));
    data(52, e(6), pattern(52, 5));
    data(53, e(7), pattern(53, 6));
    data(300, e(300), pattern(300, 1));
    data(301, e(350), pattern(301, 8));
    data(511, e(9), pattern(511, 7));
    for (blk, seq) in [(1, e(1001)), (51, e(210)), (60, e(11))] {
        want[blk] = (BlockVersion::Trimmed { seq }, None);
    }

    // C is replaced by D while it still answers; the rebuild lists every holder.
    let new_set = replica_set(&[&a, &b, &d]);
    let source = rebuild_source("v", SIZE, &[&a, &b, &c], 3);
    let created = rebuild(&d, rebuild_req("v", SIZE, &new_set, source.clone(), EPOCH)).await;
    assert_eq!(created.epoch, EPOCH);
    assert_eq!(created.copy_source, Some(source));
    let rec = d.wait_complete("v").await;
    let progress = rec.copy.expect("progress");
    assert_eq!(
        (
            progress.done_bytes,
            progress.total_bytes,
            progress.last_error.as_str(),
            progress.shared_layers
        ),
        (SIZE, SIZE, "", false)
    );
    assert_eq!(rec.epoch, EPOCH);
    assert_eq!(rec.replicas, new_set);
    // Its sync state starts fresh: no declaration, nothing dirty.
    assert_eq!(
        rec.in_sync,
        Some(proto::InSyncRecord {
            epoch: 0,
            version: 0,
            members: vec![],
        })
    );
    let log = d.daemon.log();
    assert!(
        log.contains("it is rebuilt from its replicas") && log.contains("rebuild complete"),
        "{log}"
    );

    let cd = d.data_at("v", EPOCH).await;
    assert_blocks(&blocks_of(&cd, SIZE).await, &want, "rebuilt");
    assert!(read_all_at(&cd, SIZE).await == contents(&want));
    assert_eq!(cd.dirty_regions().await.expect("dirty").count(), 0);
    assert!(cd.membership().await.expect("membership").is_undeclared());
    // The fence: an engine of an older epoch is refused.
    let (code, message) = refused(&d, "v", EPOCH - 1).await;
    assert_eq!(code, ErrorCode::StaleEpoch, "{message}");
    // The holders still hold what they held (a damaged copy stays damaged there).
    assert_eq!(
        blocks_of(&ca, SIZE).await[300].0,
        BlockVersion::Corrupt { seq: e(300) }
    );
}

/// A throttled rebuild killed with -9 mid-way resumes from its durable progress and
/// ends identical to the merge of its holders.
#[tokio::test]
async fn a_killed_rebuild_resumes_and_ends_identical() {
    let work = workdir();
    let (a, b) = (
        Node::start(work.path(), "a", ARGS).await,
        Node::start(work.path(), "b", ARGS).await,
    );
    const BLOCKS: u64 = 2048; // 8 MiB
    const SIZE: u64 = BLOCKS * BS;
    const EPOCH: u64 = 2;
    let set = replica_set(&[&a, &b]);
    for n in [&a, &b] {
        create_member(n, "v", SIZE, &set).await;
        raise(n, "v", EPOCH).await;
    }
    let (ca, cb) = (a.data_at("v", EPOCH).await, b.data_at("v", EPOCH).await);
    for cl in [&ca, &cb] {
        for chunk in 0..BLOCKS / 256 {
            let first = chunk * 256;
            let bytes: Vec<u8> = (first..first + 256)
                .flat_map(|blk| pattern(blk, chunk as u8))
                .collect();
            cl.write(first * BS, bytes, at(EPOCH, 10 + chunk))
                .await
                .expect("write");
        }
    }
    // Scattered differences: newer single-block writes on A, newer trims on B.
    for blk in (0..BLOCKS).step_by(7) {
        ca.write(blk * BS, pattern(blk, 50), at(EPOCH, 5000 + blk))
            .await
            .expect("a write");
    }
    for blk in (3..BLOCKS).step_by(11) {
        cb.trim(blk * BS, BS, at(EPOCH, 9000 + blk))
            .await
            .expect("b trim");
    }
    let want = merge(&[blocks_of(&ca, SIZE).await, blocks_of(&cb, SIZE).await]);
    assert!(
        want.iter()
            .any(|(v, _)| matches!(v, BlockVersion::Trimmed { .. })),
        "the merge keeps trims"
    );

    let throttled = ["--capacity", "1Gi", "--copy-max-bandwidth", "4Mi"];
    let mut args = throttled.to_vec();
    args.extend(["--metrics-listen", "127.0.0.1:0"]);
    let d = Node::start(work.path(), "d", &args).await;
    let source = rebuild_source("v", SIZE, &[&a, &b], 3);
    rebuild(
        &d,
        rebuild_req("v", SIZE, &replica_set(&[&a, &d]), source, EPOCH),
    )
    .await;
    let rec = d
        .wait_copy("v", "some progress", |p| {
            p.done_bytes > 0 && p.done_bytes < p.total_bytes
        })
        .await;
    let before = rec.copy.expect("progress").done_bytes;
    // Not served while incomplete, and says why.
    let (code, message) = refused(&d, "v", EPOCH).await;
    assert_eq!(code, ErrorCode::UnknownVolume, "{message}");
    assert!(
        message.contains("volume v is being rebuilt from its replicas ("),
        "{message}"
    );
    let metrics = d.metrics().await;
    assert!(
        metrics.contains("tessera_replica_copies_active 1")
            && metrics.contains(&format!(
                "tessera_replica_copy_total_bytes{{volume_id=\"v\"}} {SIZE}"
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
    let after = d.record("v").await.copy.expect("progress");
    assert!(
        after.done_bytes >= before && !after.complete,
        "durable progress lost: {before} before the kill, {after:?} after"
    );
    d.wait_complete("v").await;
    let resumed_at = logged_done(&d.daemon.log(), "rebuild resumed");
    assert!(
        resumed_at.is_some_and(|at| at >= before),
        "no resume from {before}:\n{}",
        d.daemon.log()
    );
    let cd = d.data_at("v", EPOCH).await;
    assert_blocks(&blocks_of(&cd, SIZE).await, &want, "resumed rebuild");
    assert!(read_all_at(&cd, SIZE).await == contents(&want));
}

#[tokio::test]
async fn rebuild_requests_are_validated_and_repeat_idempotently() {
    let work = workdir();
    let (h, t) = (
        Node::start(work.path(), "h", ARGS).await,
        Node::start(work.path(), "t", ARGS).await,
    );
    let set = replica_set(&[&h]);
    create_member(&h, "v", MIB, &set).await;
    h.data("v")
        .await
        .write(0, pattern(0, 1), seq(1))
        .await
        .expect("write");
    let new_set = replica_set(&[&t]);
    let good = rebuild_source("v", MIB, &[&h], 1);
    let mut ctl = t.daemon.client().await;

    let mut with_snapshot = good.clone();
    with_snapshot.snapshot_id = "s".into();
    let mut other_volume = good.clone();
    other_volume.source_volume_id = "w".into();
    let mut smaller = good.clone();
    smaller.size_bytes = MIB / 2;
    let mut no_holders = good.clone();
    no_holders.holders.clear();
    for (what, req) in [
        (
            "a snapshot",
            rebuild_req("v", MIB, &new_set, with_snapshot, 2),
        ),
        (
            "another volume",
            rebuild_req("v", MIB, &new_set, other_volume, 2),
        ),
        ("another size", rebuild_req("v", MIB, &new_set, smaller, 2)),
        (
            "a larger volume",
            rebuild_req("v", 2 * MIB, &new_set, good.clone(), 2),
        ),
        ("no holders", rebuild_req("v", MIB, &new_set, no_holders, 2)),
        (
            "an epoch no seq carries",
            rebuild_req("v", MIB, &new_set, good.clone(), MAX_EPOCH + 1),
        ),
    ] {
        let err = ctl.create_volume(req).await.expect_err(what);
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{what}: {}",
            err.message()
        );
        assert!(
            entries(&t.data_dir.join("volumes")).is_empty(),
            "{what} left something"
        );
    }

    let mut fenced = good.clone();
    fenced.fence_epoch = 2;
    let first = rebuild(&t, rebuild_req("v", MIB, &new_set, fenced.clone(), 2)).await;
    assert_eq!(first.epoch, 2);
    assert_eq!(first.copy_source, Some(fenced.clone()));
    let again = rebuild(&t, rebuild_req("v", MIB, &new_set, fenced.clone(), 2)).await;
    assert_eq!(
        (&again.copy_source, again.created_unix_nanos, again.epoch),
        (&first.copy_source, first.created_unix_nanos, 2)
    );
    // Raised since (an engine of the volume presented a newer epoch): the same
    // request still returns the record, epoch and all.
    ctl.raise_epoch(proto::RaiseEpochRequest {
        volume_id: "v".into(),
        expected_epoch: 2,
        new_epoch: 5,
    })
    .await
    .expect("raise");
    let raised = rebuild(&t, rebuild_req("v", MIB, &new_set, fenced.clone(), 2)).await;
    assert_eq!(raised.epoch, 5);
    // The fence epoch the copy began under is kept (a later one would vouch for
    // writes the copy may have missed).
    let mut refenced = fenced.clone();
    refenced.fence_epoch = 4;
    let kept = rebuild(&t, rebuild_req("v", MIB, &new_set, refenced, 2)).await;
    assert_eq!(kept.copy_source.expect("source").fence_epoch, 2);

    let restore_source = copy_source("s", "v", MIB, &[&h], 1);
    for (what, req) in [
        (
            "a restore",
            proto::CreateVolumeRequest {
                copy_source: Some(restore_source),
                ..create_req("v", MIB)
            },
        ),
        ("no source", create_req("v", MIB)),
    ] {
        let err = ctl.create_volume(req).await.expect_err(what);
        assert_eq!(err.code(), Code::AlreadyExists, "{what}: {}", err.message());
    }

    t.wait_complete("v").await;
    let c = t.data_at("v", 5).await;
    assert_eq!(
        c.versions(0, BS, false).await.expect("versions").versions(),
        &[BlockVersion::Data { seq: seq(1) }]
    );
    assert_eq!(c.read(0, BS as u32).await.expect("read"), pattern(0, 1));
}

/// ReadSnapshotBlocks without a snapshot id: the head of a live volume (writes after
/// its last snapshot included), refused for a volume still populating or deleted.
#[tokio::test]
async fn head_reads_serve_the_head_of_live_volumes_only() {
    let work = workdir();
    let h = Node::start(work.path(), "h", ARGS).await;
    const SIZE: u64 = 2 * MIB;
    h.create("v", SIZE).await;
    let c = h.data("v").await;
    let four: Vec<u8> = (0..4).flat_map(|blk| pattern(blk, 1)).collect();
    c.write(0, four, seq(1)).await.expect("write");
    c.write(300 * BS, pattern(300, 1), seq(2))
        .await
        .expect("w300");
    h.snapshot("v", "s").await;
    c.write(0, pattern(0, 2), seq(10)).await.expect("overwrite");
    c.trim(BS, BS, seq(11)).await.expect("trim");
    c.write(5 * BS, pattern(5, 2), seq(12)).await.expect("w5");

    let mut want = vec![(BlockVersion::Unwritten, None); (SIZE / BS) as usize];
    want[0] = (BlockVersion::Data { seq: seq(10) }, Some(pattern(0, 2)));
    want[1] = (BlockVersion::Trimmed { seq: seq(11) }, None);
    for blk in 2u64..4 {
        want[blk as usize] = (BlockVersion::Data { seq: seq(1) }, Some(pattern(blk, 1)));
    }
    want[5] = (BlockVersion::Data { seq: seq(12) }, Some(pattern(5, 2)));
    want[300] = (BlockVersion::Data { seq: seq(2) }, Some(pattern(300, 1)));
    let (head, offsets) = stream_blocks(&h, "v", "", SIZE, ChunkKind::Data).await;
    assert_blocks(&head, &want, "head");
    assert_eq!(offsets, vec![0, MIB]);
    let (claims, _) = stream_as(&h, "v", "", SIZE, ChunkKind::VersionsOnly).await;
    let versions: Vec<BlockVersion> = want.iter().map(|(v, _)| *v).collect();
    assert_eq!(claims, versions);
    // The snapshot is another view.
    let (sealed, _) = stream_versions(&h, "v", "s", SIZE).await;
    assert_eq!(
        &sealed[..2],
        &[
            BlockVersion::Data { seq: seq(1) },
            BlockVersion::Data { seq: seq(1) }
        ]
    );

    let mut ctl = h.daemon.client().await;
    // Snapshot blocks (and heads) are read by replicas (rebuilds and repairs) only.
    let mut peer = h.daemon.client_as(Identity::Replica).await;
    let read = |volume: &str, offset, length| proto::ReadSnapshotBlocksRequest {
        volume_id: volume.into(),
        snapshot_id: String::new(),
        offset,
        length,
        seqs_only: false,
    };
    for (req, code) in [
        (read("nope", 0, BS), Code::NotFound),
        (read("v", 1, BS), Code::InvalidArgument),
        (read("v", 0, SIZE + BS), Code::OutOfRange),
    ] {
        let what = format!("{req:?}");
        let err = peer.read_snapshot_blocks(req).await.expect_err(&what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
    }

    // A replica still being rebuilt (its only holder never answers) has no head to
    // give yet.
    let t = Node::start(work.path(), "t", ARGS).await;
    let mut nowhere = rebuild_source("p", SIZE, &[&h], 1);
    nowhere.holders[0].control_address = "127.0.0.1:1".into();
    rebuild(&t, rebuild_req("p", SIZE, &replica_set(&[&t]), nowhere, 1)).await;
    t.wait_copy("p", "a recorded error", |p| !p.last_error.is_empty())
        .await;
    let err = t
        .daemon
        .client_as(Identity::Replica)
        .await
        .read_snapshot_blocks(read("p", 0, SIZE))
        .await
        .expect_err("populating");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains("is being rebuilt from its replicas"),
        "{}",
        err.message()
    );

    // A deleted volume has no head; its snapshot is still read.
    ctl.delete_volume(proto::DeleteVolumeRequest {
        volume_id: "v".into(),
    })
    .await
    .expect("delete");
    let err = peer
        .read_snapshot_blocks(read("v", 0, SIZE))
        .await
        .expect_err("deleted");
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    let (sealed_after, _) = stream_versions(&h, "v", "s", SIZE).await;
    assert_eq!(sealed_after, sealed);
    let err = ctl.get_volume(get_req("v")).await.expect_err("deleted");
    assert_eq!(err.code(), Code::NotFound);
}
