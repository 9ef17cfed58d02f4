//! The real `tessera-replica` binary serving the data plane over its checksummed block
//! store: an engine-side `ReplicaDataClient` against a daemon whose volumes are made
//! through the control gRPC API.
//!
//! Covered: read/write/flush/trim round trips; fencing of a live connection by
//! RaiseEpoch; flushed data surviving kill -9; a flipped byte on disk reported as
//! CORRUPT_BLOCK for exactly that block; delete while connected; clean SIGTERM with a
//! connection open. Harness in `daemon_support` (own process group, killed in Drop,
//! deadline polls, no fixed sleeps).

mod daemon_support;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use daemon_support::{create_req, entries, get_req, workdir, Daemon};
use tessera_replica_protocol::block::BlockVersion;
use tessera_replica_protocol::control_proto as proto;
use tessera_replica_protocol::data::{ClientError, ErrorCode, ReplicaDataClient};

const BS: u64 = 4096;
const MIB: u64 = 1 << 20;
const ARGS: &[&str] = &["--capacity", "1Gi"];

/// A block whose bytes name it, so a misplaced block cannot pass for another.
fn pattern(block: u64, salt: u8) -> Vec<u8> {
    (0..BS)
        .map(|i| (i as u8) ^ (block as u8).wrapping_mul(31) ^ salt)
        .collect()
}

/// The replica's error code and detail, failing the test for any other error.
fn remote(e: &ClientError) -> (ErrorCode, u64) {
    match e {
        ClientError::Remote(r) => (r.code, r.detail),
        other => panic!("expected an error reply from the replica, got {other:?}"),
    }
}

async fn connect(daemon: &Daemon, volume: &str, epoch: u64) -> ReplicaDataClient {
    match daemon.data_client(volume, epoch).await {
        Ok(c) => c,
        Err(e) => panic!("data-plane connect failed: {e:?}\n{}", daemon.log()),
    }
}

async fn create(daemon: &Daemon, id: &str, size: u64) {
    daemon
        .client()
        .await
        .create_volume(create_req(id, size))
        .await
        .expect("create volume");
}

/// The data file of the (only) layer of a volume that has no snapshots: the head.
fn head_data_file(data_dir: &Path, volume: &str) -> PathBuf {
    let layers = data_dir.join("volumes").join(volume).join("store/layers");
    let names = entries(&layers);
    assert_eq!(names.len(), 1, "expected only the head layer: {names:?}");
    layers.join(&names[0]).join("data")
}

#[tokio::test]
async fn data_plane_round_trips_and_raise_epoch_fences_live_connections() {
    let work = workdir();
    let data_dir = work.path().join("data");
    let daemon = Daemon::start(work.path(), &data_dir, ARGS).await;
    create(&daemon, "v1", 4 * MIB).await;

    let err = daemon
        .data_client("nope", 1)
        .await
        .expect_err("unknown volume");
    assert_eq!(remote(&err).0, ErrorCode::UnknownVolume);

    let c = connect(&daemon, "v1", 1).await;
    assert_eq!(c.info().size, 4 * MIB);
    // The engine's higher epoch was adopted durably at HELLO.
    let mut ctl = daemon.client().await;
    let rec = ctl
        .get_volume(get_req("v1"))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(rec.epoch, 1);

    let seq = |n: u64| (1 << 40) | n;
    let mut data = pattern(3, 1);
    data.extend(pattern(4, 1));
    c.write(3 * BS, data.clone(), seq(1)).await.expect("write");
    assert_eq!(c.read(3 * BS, 2 * BS as u32).await.expect("read"), data);
    assert_eq!(
        c.read(0, BS as u32).await.expect("unwritten"),
        vec![0u8; BS as usize]
    );
    c.trim(4 * BS, BS, seq(2)).await.expect("trim");
    assert_eq!(
        c.read(4 * BS, BS as u32).await.expect("read trimmed"),
        vec![0u8; BS as usize]
    );
    assert_eq!(
        c.read(3 * BS, BS as u32).await.expect("read kept"),
        pattern(3, 1)
    );
    c.flush().await.expect("flush");
    let err = c.read(4 * MIB, BS as u32).await.expect_err("past the end");
    assert_eq!(remote(&err), (ErrorCode::OutOfRange, 4 * MIB));

    // The controller moves the volume: the open connection is fenced at once.
    let raised = ctl
        .raise_epoch(proto::RaiseEpochRequest {
            volume_id: "v1".into(),
            expected_epoch: 1,
            new_epoch: 2,
        })
        .await
        .expect("raise")
        .into_inner();
    assert_eq!(raised.epoch, 2);
    let err = c
        .write(3 * BS, pattern(3, 2), seq(3))
        .await
        .expect_err("fenced write");
    assert_eq!(remote(&err), (ErrorCode::StaleEpoch, 2));
    let err = c.read(3 * BS, BS as u32).await.expect_err("fenced read");
    assert_eq!(remote(&err), (ErrorCode::StaleEpoch, 2));
    let err = c.flush().await.expect_err("fenced flush");
    assert_eq!(remote(&err), (ErrorCode::StaleEpoch, 2));
    let err = daemon
        .data_client("v1", 1)
        .await
        .expect_err("old epoch cannot reconnect");
    assert_eq!(remote(&err), (ErrorCode::StaleEpoch, 2));

    // The new engine sees what the old one wrote before the raise, and nothing after.
    let c2 = connect(&daemon, "v1", 2).await;
    assert_eq!(
        c2.read(3 * BS, BS as u32).await.expect("read"),
        pattern(3, 1)
    );

    // A clean stop with a connection open exits promptly and successfully.
    drop(ctl);
    let status = daemon.terminate().await;
    assert!(status.success(), "unclean exit on SIGTERM: {status}");
    assert!(c2.read(0, BS as u32).await.is_err(), "daemon is gone");
}

#[tokio::test]
async fn flushed_data_survives_kill9_and_corruption_names_the_block() {
    let work = workdir();
    let data_dir = work.path().join("data");
    let daemon = Daemon::start(work.path(), &data_dir, ARGS).await;
    create(&daemon, "v1", MIB).await;
    let c = connect(&daemon, "v1", 1).await;
    for b in 0..8u64 {
        c.write(b * BS, pattern(b, 7), (1 << 40) | b)
            .await
            .expect("write");
    }
    c.flush().await.expect("flush");
    drop(c);
    daemon.kill9().await;

    let daemon = Daemon::start(work.path(), &data_dir, ARGS).await;
    let c = connect(&daemon, "v1", 1).await;
    for b in 0..8u64 {
        assert_eq!(
            c.read(b * BS, BS as u32).await.expect("read after restart"),
            pattern(b, 7),
            "block {b} after kill -9"
        );
    }

    // Flip one byte of block 5 behind the running daemon's back (the store keeps no
    // data in memory, so the next read sees it).
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(head_data_file(&data_dir, "v1"))
        .expect("open layer data file");
    let at = 5 * BS + 123;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at).expect("read byte");
    byte[0] ^= 0x40;
    file.write_all_at(&byte, at).expect("corrupt byte");
    file.sync_all().expect("sync");
    drop(file);

    let err = c.read(5 * BS, BS as u32).await.expect_err("corrupt block");
    assert_eq!(remote(&err), (ErrorCode::CorruptBlock, 5));
    let err = c
        .read(0, 8 * BS as u32)
        .await
        .expect_err("range with a corrupt block");
    assert_eq!(remote(&err), (ErrorCode::CorruptBlock, 5));
    for b in [0u64, 4, 6, 7] {
        assert_eq!(
            c.read(b * BS, BS as u32).await.expect("intact block"),
            pattern(b, 7),
            "block {b}"
        );
    }
    // The connection is still usable, and a rewrite (an engine's repair) heals it.
    c.write(5 * BS, pattern(5, 9), (1 << 40) | 100)
        .await
        .expect("repair");
    assert_eq!(
        c.read(5 * BS, BS as u32).await.expect("repaired"),
        pattern(5, 9)
    );

    // Corruption found with the daemon stopped is reported the same way after start.
    c.flush().await.expect("flush");
    drop(c);
    daemon.kill9().await;
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(head_data_file(&data_dir, "v1"))
        .expect("open layer data file");
    let at = 2 * BS;
    file.read_exact_at(&mut byte, at).expect("read byte");
    byte[0] ^= 0x01;
    file.write_all_at(&byte, at).expect("corrupt byte");
    file.sync_all().expect("sync");
    drop(file);
    let daemon = Daemon::start(work.path(), &data_dir, ARGS).await;
    let c = connect(&daemon, "v1", 1).await;
    let err = c.read(2 * BS, BS as u32).await.expect_err("corrupt block");
    assert_eq!(remote(&err), (ErrorCode::CorruptBlock, 2));
    assert_eq!(
        c.read(5 * BS, BS as u32).await.expect("repair survived"),
        pattern(5, 9)
    );
}

#[tokio::test]
async fn delete_while_connected_fails_further_requests() {
    let work = workdir();
    let data_dir = work.path().join("data");
    let daemon = Daemon::start(work.path(), &data_dir, ARGS).await;
    create(&daemon, "v1", MIB).await;
    let c = connect(&daemon, "v1", 1).await;
    c.write(0, pattern(0, 3), (1 << 40) | 1)
        .await
        .expect("write");
    c.flush().await.expect("flush");

    let mut ctl = daemon.client().await;
    let del = ctl
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: "v1".into(),
        })
        .await
        .expect("delete")
        .into_inner();
    assert!(del.existed);
    let volumes = data_dir.join("volumes");
    assert!(entries(&volumes).is_empty(), "{:?}", entries(&volumes));

    let err = c
        .write(BS, pattern(1, 3), (1 << 40) | 2)
        .await
        .expect_err("write after delete");
    assert_eq!(remote(&err).0, ErrorCode::IoError, "{err}");
    let err = c.read(0, BS as u32).await.expect_err("read after delete");
    assert_eq!(remote(&err).0, ErrorCode::IoError, "{err}");
    let err = c.trim(0, BS, (1 << 40) | 3).await.expect_err("trim");
    assert_eq!(remote(&err).0, ErrorCode::IoError, "{err}");
    let err = c.flush().await.expect_err("flush after delete");
    assert_eq!(remote(&err).0, ErrorCode::IoError, "{err}");
    assert!(
        entries(&volumes).is_empty(),
        "requests after delete recreated {:?}",
        entries(&volumes)
    );
    let err = daemon
        .data_client("v1", 1)
        .await
        .expect_err("deleted volume");
    assert_eq!(remote(&err).0, ErrorCode::UnknownVolume);

    // A new volume under the same id starts empty; the old connection stays dead.
    create(&daemon, "v1", MIB).await;
    let fresh = connect(&daemon, "v1", 1).await;
    assert_eq!(
        fresh.read(0, BS as u32).await.expect("read new volume"),
        vec![0u8; BS as usize]
    );
    assert!(c.read(0, BS as u32).await.is_err());
    assert_eq!(
        fresh
            .read(0, BS as u32)
            .await
            .expect("untouched by the old one"),
        vec![0u8; BS as usize]
    );
}

/// Flips one byte of block `b` in the volume's head data file.
fn flip_byte(data_dir: &Path, volume: &str, b: u64) {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(head_data_file(data_dir, volume))
        .expect("open layer data file");
    let at = b * BS + 77;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at).expect("read byte");
    byte[0] ^= 0x10;
    file.write_all_at(&byte, at).expect("corrupt byte");
    file.sync_all().expect("sync");
}

/// Resync copies over the daemon's checksummed store: a conditional write or trim
/// applies a block only where the held seq is lower (an equal one stays; damaged,
/// never-written and older-trimmed blocks are replaced), answers how many blocks it
/// applied, marks its regions dirty, leaves trims' seqs in place against older
/// copies, survives kill -9 once flushed, and is fenced by an epoch raise.
#[tokio::test]
async fn conditional_writes_and_trims_apply_only_over_older_versions() {
    let work = workdir();
    let data_dir = work.path().join("data");
    let daemon = Daemon::start(work.path(), &data_dir, ARGS).await;
    create(&daemon, "v1", 16 * MIB).await;
    let c = connect(&daemon, "v1", 1).await;
    assert!(c.supports_if_newer());
    let seq = |n: u64| (1 << 40) | n;
    // The live writes: block 0 newer than the copy (seq 20), 1 equal (10), 2 older
    // (5), 3 never written, 4 trimmed older (5), 5 trimmed newer (30), 6 damaged
    // (40, a byte flipped on disk), 7 never written.
    c.write(0, pattern(0, 1), seq(20)).await.expect("write");
    c.write(BS, pattern(1, 1), seq(10)).await.expect("write");
    c.write(2 * BS, pattern(2, 1), seq(5)).await.expect("write");
    c.trim(4 * BS, BS, seq(5)).await.expect("trim");
    c.trim(5 * BS, BS, seq(30)).await.expect("trim");
    c.write(6 * BS, pattern(6, 1), seq(40))
        .await
        .expect("write");
    c.flush().await.expect("flush");
    flip_byte(&data_dir, "v1", 6);
    let err = c.read(6 * BS, BS as u32).await.expect_err("damaged");
    assert_eq!(remote(&err), (ErrorCode::CorruptBlock, 6));
    let token = c.mark_clean().await.expect("mark");
    assert_eq!(c.clean(token).await.expect("clean"), 1);
    assert_eq!(c.dirty_regions().await.expect("dirty").count(), 0);

    // The copy at seq 10 of blocks 0..7.
    let copy: Vec<u8> = (0..7).flat_map(|b| pattern(b, 2)).collect();
    assert_eq!(
        c.write_if_newer(0, copy.clone(), seq(10))
            .await
            .expect("wif"),
        4,
        "blocks 2, 3, 4 and 6"
    );
    let zeros = vec![0u8; BS as usize];
    let want = [
        pattern(0, 1),
        pattern(1, 1),
        pattern(2, 2),
        pattern(3, 2),
        pattern(4, 2),
        zeros.clone(),
        pattern(6, 2),
    ]
    .concat();
    assert_eq!(c.read(0, 7 * BS as u32).await.expect("read"), want);
    assert_eq!(
        c.dirty_regions()
            .await
            .expect("dirty")
            .dirty()
            .collect::<Vec<_>>(),
        vec![0],
        "the copy marked its region"
    );
    assert_eq!(
        c.write_if_newer(0, copy, seq(10)).await.expect("again"),
        0,
        "nothing older is left"
    );

    // A conditional trim at seq 15 of blocks 0..8: all but 0 (20) and 5 (30).
    assert_eq!(c.trim_if_newer(0, 8 * BS, seq(15)).await.expect("tif"), 6);
    let mut want = vec![0u8; 8 * BS as usize];
    want[..BS as usize].copy_from_slice(&pattern(0, 1));
    assert_eq!(c.read(0, 8 * BS as u32).await.expect("read"), want);
    let versions = c.versions(0, 8 * BS, false).await.expect("versions");
    let trimmed = |n| BlockVersion::Trimmed { seq: seq(n) };
    assert_eq!(
        versions.versions(),
        &[
            BlockVersion::Data { seq: seq(20) },
            trimmed(15),
            trimmed(15),
            trimmed(15),
            trimmed(15),
            trimmed(30),
            trimmed(15),
            trimmed(15),
        ]
    );
    // A trim's seq stays: an older copy does not resurrect data, a newer one lands.
    assert_eq!(
        c.write_if_newer(BS, pattern(1, 3), seq(12))
            .await
            .expect("wif"),
        0
    );
    assert_eq!(
        c.write_if_newer(BS, pattern(1, 4), seq(16))
            .await
            .expect("wif"),
        1
    );
    assert_eq!(c.trim_if_newer(0, BS, seq(20)).await.expect("equal seq"), 0);
    let err = c
        .write_if_newer(16 * MIB, pattern(0, 5), seq(50))
        .await
        .expect_err("past the end");
    assert_eq!(remote(&err), (ErrorCode::OutOfRange, 16 * MIB));

    // What was flushed survives kill -9, seqs included.
    c.flush().await.expect("flush");
    drop(c);
    daemon.kill9().await;
    let daemon = Daemon::start(work.path(), &data_dir, ARGS).await;
    let c = connect(&daemon, "v1", 1).await;
    let mut want = vec![0u8; 8 * BS as usize];
    want[..BS as usize].copy_from_slice(&pattern(0, 1));
    want[BS as usize..2 * BS as usize].copy_from_slice(&pattern(1, 4));
    assert_eq!(c.read(0, 8 * BS as u32).await.expect("read"), want);
    assert_eq!(
        c.write_if_newer(2 * BS, pattern(2, 5), seq(14))
            .await
            .expect("wif"),
        0,
        "the trim at seq 15 survived the restart"
    );

    // A raise fences conditional requests like any other mutation.
    let mut ctl = daemon.client().await;
    ctl.raise_epoch(proto::RaiseEpochRequest {
        volume_id: "v1".into(),
        expected_epoch: 1,
        new_epoch: 2,
    })
    .await
    .expect("raise");
    let err = c
        .write_if_newer(3 * BS, pattern(3, 6), seq(60))
        .await
        .expect_err("fenced");
    assert_eq!(remote(&err), (ErrorCode::StaleEpoch, 2));
    let err = c.trim_if_newer(0, BS, seq(60)).await.expect_err("fenced");
    assert_eq!(remote(&err), (ErrorCode::StaleEpoch, 2));
    let c2 = connect(&daemon, "v1", 2).await;
    assert_eq!(
        c2.read(0, BS as u32).await.expect("read"),
        pattern(0, 1),
        "the fenced trim changed nothing"
    );
}

/// REPLICA_SET (v4) answers the record's generation and replica set, and follows an
/// UpdateVolume that replaces a member on the same open connection; an engine that
/// negotiated version 3 is refused it locally and still works.
#[tokio::test]
async fn replica_set_reports_the_record_and_follows_an_update() {
    let work = workdir();
    let daemon = Daemon::start(work.path(), &work.path().join("data"), ARGS).await;
    let member = |n: &str| proto::ReplicaRef {
        node_id: n.into(),
        zone: "z1".into(),
        control_address: format!("{n}.ctl:7400"),
        data_address: format!("{n}.data:7401"),
    };
    let mut ctl = daemon.client().await;
    ctl.create_volume(proto::CreateVolumeRequest {
        replicas: vec![member("a"), member("b"), member("c")],
        ..create_req("v1", 4 * MIB)
    })
    .await
    .expect("create");
    let c = connect(&daemon, "v1", 1).await;
    assert!(c.supports_replica_set());
    let set = c.replica_set().await.expect("replica set");
    let generation = ctl
        .get_volume(get_req("v1"))
        .await
        .expect("get")
        .into_inner()
        .generation;
    assert_eq!(set.generation, generation);
    let nodes = |s: &tessera_replica_protocol::data::ReplicaSet| -> Vec<(String, String)> {
        s.members
            .iter()
            .map(|m| (m.node_id.clone(), m.data_address.clone()))
            .collect()
    };
    assert_eq!(
        nodes(&set),
        [
            ("a", "a.data:7401"),
            ("b", "b.data:7401"),
            ("c", "c.data:7401")
        ]
        .map(|(n, a)| (n.to_owned(), a.to_owned()))
    );

    ctl.update_volume(proto::UpdateVolumeRequest {
        volume_id: "v1".into(),
        expected_generation: generation,
        replicas: vec![member("a"), member("b"), member("d")],
        ..Default::default()
    })
    .await
    .expect("update");
    let set = c.replica_set().await.expect("replica set after update");
    assert_eq!(set.generation, generation + 1);
    assert_eq!(
        nodes(&set),
        [
            ("a", "a.data:7401"),
            ("b", "b.data:7401"),
            ("d", "d.data:7401")
        ]
        .map(|(n, a)| (n.to_owned(), a.to_owned()))
    );

    let v3 = ReplicaDataClient::connect_with(
        &daemon.data,
        "v1",
        1,
        tessera_replica_protocol::data::ClientConfig {
            max_protocol_version: 3,
            ..daemon.data_config()
        },
    )
    .await
    .expect("v3 connect");
    assert_eq!(v3.info().protocol_version, 3);
    assert!(!v3.supports_replica_set());
    assert!(matches!(
        v3.replica_set().await,
        Err(ClientError::InvalidArgument(_))
    ));
    v3.write(0, pattern(0, 1), 1 << 40 | 1)
        .await
        .expect("v3 write");
    assert_eq!(c.read(0, BS as u32).await.expect("read"), pattern(0, 1));
}
