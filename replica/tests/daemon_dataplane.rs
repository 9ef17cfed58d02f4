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
    match ReplicaDataClient::connect(&daemon.data, volume, epoch).await {
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

    let err = ReplicaDataClient::connect(&daemon.data, "nope", 1)
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
    let err = ReplicaDataClient::connect(&daemon.data, "v1", 1)
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
    let err = ReplicaDataClient::connect(&daemon.data, "v1", 1)
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
