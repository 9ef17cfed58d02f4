//! Drives the real `tessera-replica` binary over gRPC: lifecycle of volumes, crash
//! (SIGKILL) and restart, the data-directory lock, and a full disk on a small tmpfs.
//!
//! Every daemon runs in its own process group and is killed in `Drop`; every test
//! works in its own temp directory; waits poll with a deadline, never a fixed sleep
//! (the harness is in `daemon_support`, shared with `daemon_dataplane.rs`).

mod daemon_support;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use daemon_support::{
    create_req, entries, get_req, http_get, pgid, spawn, wait_exit, workdir, Daemon, START_TIMEOUT,
};
use nix::sys::signal::{killpg, Signal};
use tessera_replica_protocol::control_proto as proto;
use tonic::Code;

#[tokio::test]
async fn volume_lifecycle_over_grpc() {
    let work = workdir();
    let data_dir = work.path().join("data");
    let daemon = Daemon::start(
        work.path(),
        &data_dir,
        &[
            "--capacity",
            "1Gi",
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-json",
        ],
    )
    .await;
    let mut c = daemon.client().await;

    let info = c
        .get_info(proto::GetInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.node_id, "test-node");
    assert_eq!(info.zone, "z1");
    assert_eq!(info.data_address, daemon.data);
    assert_eq!(info.capacity_bytes, 1 << 30);
    assert_eq!(info.volume_count, 0);
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    // The data-plane port is bound and accepting TCP connections.
    tokio::net::TcpStream::connect(&daemon.data)
        .await
        .expect("data listener is bound");

    let b = c
        .create_volume(create_req("vol-b", 8 << 20))
        .await
        .expect("create b")
        .into_inner();
    assert_eq!((b.size_bytes, b.generation, b.epoch), (8 << 20, 1, 0));
    c.create_volume(create_req("vol-a", 4 << 20))
        .await
        .expect("create a");
    let again = c
        .create_volume(create_req("vol-b", 8 << 20))
        .await
        .expect("idempotent")
        .into_inner();
    assert_eq!(again, b);

    let err = c
        .create_volume(create_req("vol-b", 16 << 20))
        .await
        .expect_err("conflict");
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    assert!(err.message().contains("size_bytes"), "{err}");
    let err = c
        .create_volume(create_req("vol/evil", 4096))
        .await
        .expect_err("bad id");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let err = c
        .create_volume(create_req("odd", 4095))
        .await
        .expect_err("bad size");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let err = c
        .create_volume(create_req("huge", 2 << 30))
        .await
        .expect_err("too big");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("needs 2147483648 bytes"), "{err}");

    let listed = c
        .list_volumes(proto::ListVolumesRequest {})
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<_> = listed
        .volumes
        .iter()
        .map(|v| v.volume_id.as_str())
        .collect();
    assert_eq!(ids, vec!["vol-a", "vol-b"]);
    let got = c
        .get_volume(get_req("vol-b"))
        .await
        .expect("get")
        .into_inner();
    // GetVolume adds the replica's in-sync record: none declared yet for a new volume.
    assert_eq!(got.in_sync, Some(proto::InSyncRecord::default()));
    assert_eq!(
        proto::VolumeRecord {
            in_sync: None,
            ..got
        },
        b
    );

    let info = c
        .get_info(proto::GetInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.volume_count, 2);
    assert!(
        info.free_bytes <= (1 << 30) - (12 << 20),
        "{}",
        info.free_bytes
    );

    let volumes = data_dir.join("volumes");
    assert_eq!(entries(&volumes), vec!["vol-a", "vol-b"]);
    assert_eq!(entries(&volumes.join("vol-b")), vec!["record", "store"]);
    assert!(
        volumes.join("vol-b/store/MANIFEST").is_file(),
        "the volume's block store is missing"
    );

    let del = c
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: "vol-a".into(),
        })
        .await
        .expect("delete")
        .into_inner();
    assert!(del.existed);
    let del = c
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: "vol-a".into(),
        })
        .await
        .expect("delete again")
        .into_inner();
    assert!(!del.existed);
    let err = c.get_volume(get_req("vol-a")).await.expect_err("gone");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(entries(&volumes), vec!["vol-b"]);

    let metrics_addr = daemon
        .metrics
        .clone()
        .expect("metrics address in ready file");
    let health = http_get(&metrics_addr, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let metrics = http_get(&metrics_addr, "/metrics").await;
    assert!(metrics.contains("tessera_replica_volumes 1\n"), "{metrics}");
    assert!(
        metrics.contains(
            "tessera_replica_control_requests_total{method=\"CreateVolume\",code=\"AlreadyExists\"} 1"
        ),
        "{metrics}"
    );

    // --log-json: every log line is a JSON object.
    let log = daemon.log();
    assert!(log.lines().count() > 0);
    for line in log.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }

    let ready_file = daemon.ready_file.clone();
    let status = daemon.terminate().await;
    assert!(status.success(), "unclean exit on SIGTERM: {status}");
    assert!(
        !ready_file.exists(),
        "ready file left behind after clean shutdown"
    );
}

#[tokio::test]
async fn kill9_and_restart_keeps_records_and_epochs() {
    let work = workdir();
    let data_dir = work.path().join("data");
    let daemon = Daemon::start(work.path(), &data_dir, &["--capacity", "1Gi"]).await;
    let mut c = daemon.client().await;
    c.create_volume(create_req("v1", 1 << 20))
        .await
        .expect("create v1");
    c.create_volume(create_req("v2", 1 << 20))
        .await
        .expect("create v2");
    let raised = c
        .raise_epoch(proto::RaiseEpochRequest {
            volume_id: "v1".into(),
            expected_epoch: 0,
            new_epoch: 4,
        })
        .await
        .expect("raise")
        .into_inner();
    assert_eq!(raised.epoch, 4);
    let updated = c
        .update_volume(proto::UpdateVolumeRequest {
            volume_id: "v1".into(),
            expected_generation: 1,
            attachments: vec![proto::Attachment {
                node_id: "node-7".into(),
                readonly: false,
            }],
            parameters: [("maxIOPS".to_string(), "500".to_string())].into(),
            replicas: Vec::new(),
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.generation, 2);
    let before = c
        .list_volumes(proto::ListVolumesRequest {})
        .await
        .expect("list")
        .into_inner();
    drop(c);
    daemon.kill9().await;

    let daemon = Daemon::start(work.path(), &data_dir, &["--capacity", "1Gi"]).await;
    let mut c = daemon.client().await;
    let after = c
        .list_volumes(proto::ListVolumesRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(after, before);
    let v1 = c.get_volume(get_req("v1")).await.expect("get").into_inner();
    assert_eq!((v1.epoch, v1.generation), (4, 2));
    assert_eq!(v1.attachments.len(), 1);

    let err = c
        .raise_epoch(proto::RaiseEpochRequest {
            volume_id: "v1".into(),
            expected_epoch: 0,
            new_epoch: 5,
        })
        .await
        .expect_err("stale epoch");
    assert_eq!(err.code(), Code::Aborted);
    assert!(err.message().contains("current epoch is 4"), "{err}");
    let err = c
        .update_volume(proto::UpdateVolumeRequest {
            volume_id: "v1".into(),
            expected_generation: 1,
            ..Default::default()
        })
        .await
        .expect_err("stale generation");
    assert_eq!(err.code(), Code::Aborted);
    assert!(err.message().contains("current generation is 2"), "{err}");
    let err = c
        .raise_epoch(proto::RaiseEpochRequest {
            volume_id: "v1".into(),
            expected_epoch: 4,
            new_epoch: 4,
        })
        .await
        .expect_err("not increasing");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .raise_epoch(proto::RaiseEpochRequest {
            volume_id: "nope".into(),
            expected_epoch: 0,
            new_epoch: 1,
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    c.raise_epoch(proto::RaiseEpochRequest {
        volume_id: "v1".into(),
        expected_epoch: 4,
        new_epoch: 5,
    })
    .await
    .expect("raise after restart");
}

#[tokio::test]
async fn crash_leftovers_are_cleaned_and_corrupt_records_skipped() {
    let work = workdir();
    let data_dir = work.path().join("data");
    let daemon = Daemon::start(work.path(), &data_dir, &["--capacity", "1Gi"]).await;
    let mut c = daemon.client().await;
    c.create_volume(create_req("good", 1 << 20))
        .await
        .expect("create");
    c.create_volume(create_req("bad", 1 << 20))
        .await
        .expect("create");
    drop(c);
    daemon.kill9().await;

    let volumes = data_dir.join("volumes");
    fs::create_dir(volumes.join(".creating-half")).expect("fake interrupted create");
    fs::create_dir(volumes.join(".deleting-old")).expect("fake interrupted delete");
    let record = volumes.join("bad/record");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(&record)
        .expect("open");
    f.write_all(b"junk").expect("corrupt");
    drop(f);

    let daemon = Daemon::start(work.path(), &data_dir, &["--capacity", "1Gi"]).await;
    let mut c = daemon.client().await;
    let listed = c
        .list_volumes(proto::ListVolumesRequest {})
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<_> = listed
        .volumes
        .iter()
        .map(|v| v.volume_id.as_str())
        .collect();
    assert_eq!(ids, vec!["good"]);
    assert_eq!(
        entries(&volumes),
        vec!["bad", "good"],
        "corrupt volume must be kept"
    );
    let err = c
        .create_volume(create_req("bad", 1 << 20))
        .await
        .expect_err("quarantined");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    let log = daemon.log();
    assert!(log.contains("volume skipped"), "{log}");
    assert!(log.contains("removed leftover"), "{log}");
}

#[tokio::test]
async fn second_daemon_on_the_same_data_dir_fails_clearly() {
    let work = workdir();
    let data_dir = work.path().join("data");
    let first = Daemon::start(work.path(), &data_dir, &[]).await;

    let (mut second, log, _ready) = spawn(work.path(), &data_dir, &[]);
    let status = wait_exit(&mut second, START_TIMEOUT).await;
    let log = fs::read_to_string(&log).unwrap_or_default();
    let Some(status) = status else {
        let _ = killpg(pgid(&second), Signal::SIGKILL);
        let _ = second.wait();
        panic!("second daemon kept running:\n{log}");
    };
    assert!(!status.success());
    assert!(
        log.contains("is in use by another tessera-replica"),
        "{log}"
    );
    assert!(log.contains(&format!("pid {}", first.child.id())), "{log}");

    // The first one is unaffected.
    let mut c = first.client().await;
    c.get_info(proto::GetInfoRequest {})
        .await
        .expect("first still serves");
}

/// A tmpfs mounted for one test; unmounted on drop, also when the test panics.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> nix::Result<Tmpfs> {
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(format!("size={size},mode=0700").as_str()),
        )?;
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if nix::mount::umount(&self.path).is_err() {
            let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Writes into `path` until the filesystem is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = fs::File::create(path).expect("create filler");
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling tmpfs: {e}"),
        }
    }
    f.metadata().expect("stat filler").len()
}

#[tokio::test]
async fn full_disk_is_resource_exhausted_and_leaves_nothing() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIPPED full_disk_is_resource_exhausted_and_leaves_nothing: needs root to mount tmpfs"
        );
        return;
    }
    let work = workdir();
    let mnt = work.path().join("mnt");
    fs::create_dir(&mnt).expect("mkdir mnt");
    let _tmpfs = Tmpfs::mount(&mnt, "2m").expect("mount tmpfs");
    let data_dir = mnt.join("data");
    // Declared after the mount so it is killed before the unmount.
    let daemon = Daemon::start(work.path(), &data_dir, &["--capacity", "1Gi"]).await;
    let mut c = daemon.client().await;
    let volumes = data_dir.join("volumes");

    let info = c
        .get_info(proto::GetInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert!(
        info.free_bytes <= 2 << 20,
        "free {} above the tmpfs size",
        info.free_bytes
    );

    // Completely full: even one block is refused up front.
    let filler = mnt.join("filler");
    let filled = fill(&filler);
    assert!(filled > 0);
    let err = c
        .create_volume(create_req("v1", 4096))
        .await
        .expect_err("full");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("needs 4096 bytes, 0 free"), "{err}");
    assert!(entries(&volumes).is_empty());

    // A few pages free: the capacity check passes for one block, but the record (made
    // large by its parameters) hits ENOSPC while being written.
    fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .expect("open filler")
        .set_len(filled - 3 * 4096)
        .expect("shrink filler");
    let info = c
        .get_info(proto::GetInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert!(
        (4096..=64 * 1024).contains(&info.free_bytes),
        "free {}",
        info.free_bytes
    );
    let mut big = create_req("v1", 4096);
    big.parameters.insert("note".into(), "x".repeat(256 * 1024));
    let err = c.create_volume(big).await.expect_err("ENOSPC");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("full"), "{err}");
    assert!(
        entries(&volumes).is_empty(),
        "left behind: {:?}",
        entries(&volumes)
    );
    let err = c.get_volume(get_req("v1")).await.expect_err("not created");
    assert_eq!(err.code(), Code::NotFound);

    // Space comes back: the same create now succeeds.
    fs::remove_file(&filler).expect("remove filler");
    c.create_volume(create_req("v1", 4096))
        .await
        .expect("create after freeing space");
    assert_eq!(entries(&volumes), vec!["v1"]);
    drop(c);
    let status = daemon.terminate().await;
    assert!(status.success(), "{status}");
}
