//! Issue 13, items 4 and 5, on a real node: a small mount volume is sized so mkfs
//! succeeds, and restored and cloned filesystems mount next to their source.
//!
//! Real processes from the `tessera-tests` harness: three `tessera-replica` daemons,
//! the controller and node n1 (engine-host + node plugin), real quorum engines, FUSE
//! files and loop devices with 4 KiB logical blocks. For each filesystem Tessera
//! offers (ext4 and xfs) the test creates a volume smaller than that filesystem's
//! minimum, stages it (the node plugin runs mkfs on a device of the size the
//! controller returned), writes a file, snapshots and clones the volume through the
//! controller, and stages the restore and the clone on n1 while the source is still
//! mounted. A restore or clone copies the filesystem UUID with the blocks (checked:
//! all three devices report the same UUID), which the kernel refuses for a second xfs
//! unless it is mounted with `nouuid`; and since the snapshot is of a mounted
//! filesystem, the copies also need their log replayed at mount.
//!
//! Needs root, `/dev/fuse`, `/dev/loop-control`, `blkid`, `mkfs.ext4`, `mkfs.xfs`,
//! `dumpe2fs` and the workspace binaries (`cargo build --workspace`). Cleanup
//! (unmounts, engine-host and daemons stopped, leftover loop devices) is the
//! [`Cluster`]'s drop, also when the test fails.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tessera_csi_proto::v1::Volume;
use tessera_tests::csi::{ControllerClient, NodeClient};
use tessera_tests::fixtures::{
    create_request_with, create_volume_waiting, from_snapshot, from_volume, snapshot_request,
};
use tessera_tests::lifecycle::{self, attach, filesystem_capability, Attachment};
use tessera_tests::mounts;
use tessera_tests::privilege::privileged;
use tessera_tests::{Cluster, ClusterBuilder};

const MIB: u64 = 1 << 20;
/// mkfs.xfs refuses filesystems below 300 MiB.
const XFS_MIN: u64 = 300 * MIB;
/// Below 8 MiB, mkfs.ext4 on a 4 KiB-sector device makes an ext4 without a journal.
const EXT4_MIN: u64 = 8 * MIB;
/// Longest a restore or clone may take (debug builds on two loaded cores).
const COPY_TIMEOUT: Duration = Duration::from_secs(300);

/// Kubelet-style paths of volume `name` on n1: (staging dir, publish target).
fn kubelet_paths(cluster: &Cluster, name: &str) -> (PathBuf, PathBuf) {
    let base = cluster.dir().join("kubelet").join("n1");
    (
        base.join("staging").join(name),
        base.join("pods").join(name).join("mount"),
    )
}

/// The topmost mount at exactly `path`.
fn mount_at(path: &Path) -> mounts::MountEntry {
    mounts::mounts()
        .expect("read mountinfo")
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == path)
        .unwrap_or_else(|| panic!("nothing is mounted at {}", path.display()))
}

/// Runs a tool to completion; its stdout, or a panic with its stderr.
fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A reproducible, seed-dependent byte pattern.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// ControllerPublish + NodeStage + NodePublish of `volume` on n1 as a filesystem
/// volume whose fsType comes from the volume context (as for a StorageClass
/// `fsType`); checks the staging mount is a `fs` filesystem on a device of the
/// volume's size and returns the attachment and that device.
async fn attach_fs(
    cluster: &Cluster,
    controller: &mut ControllerClient,
    node: &mut NodeClient,
    volume: &Volume,
    name: &str,
    fs: &str,
) -> (Attachment, String) {
    let (staging, target) = kubelet_paths(cluster, name);
    let a = attach(
        controller,
        node,
        volume,
        "n1",
        filesystem_capability(""),
        &staging,
        &target,
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "attaching {name} ({}) on n1: {e:#}\n{}",
            volume.volume_id,
            cluster.log_tails(20)
        )
    });
    let staged = mount_at(&staging);
    assert_eq!(staged.fs_type, fs, "{name}: {staged:?}");
    assert_eq!(mount_at(&target).fs_type, fs, "{name}: publish target");
    let size = run("blockdev", &["--getsize64", &staged.source]);
    assert_eq!(
        size,
        volume.capacity_bytes.to_string(),
        "{name}: the staged device is the volume's size"
    );
    (a, staged.source)
}

/// One filesystem: small source staged, snapshot restored and volume cloned, both
/// staged on the same node while the source is mounted.
async fn copies_mount_next_to_their_source(cluster: &Cluster, fs: &str) {
    let mut controller = cluster.controller().await.expect("controller client");
    let mut node = cluster.node_client("n1").await.expect("n1 plugin");
    let (asked, minimum) = match fs {
        // The PVC: 64 MiB with `fsType: xfs`.
        "xfs" => (64 * MIB, XFS_MIN),
        _ => (MIB, EXT4_MIN),
    };
    let params = [("fsType", fs)];
    let request = |name: &str, size: u64| {
        create_request_with(name, i64::try_from(size).expect("fits i64"), &params)
    };

    // Item 4: the controller sizes the volume for its filesystem, and mkfs succeeds
    // at stage time on a device of exactly that size.
    let src_name = format!("{fs}-src");
    let source = controller
        .create_volume(request(&src_name, asked))
        .await
        .unwrap_or_else(|s| panic!("CreateVolume {src_name}: {s}"))
        .into_inner()
        .volume
        .expect("CreateVolume returns the volume");
    assert_eq!(
        source.capacity_bytes,
        i64::try_from(minimum).expect("fits i64"),
        "{fs}: {asked} bytes asked for, rounded up to the filesystem minimum"
    );
    let (src, src_dev) =
        attach_fs(cluster, &mut controller, &mut node, &source, &src_name, fs).await;
    if fs == "ext4" {
        // The point of ext4's minimum: the filesystem has a journal.
        let header = run("dumpe2fs", &["-h", &src_dev]);
        let features = header
            .lines()
            .find(|l| l.starts_with("Filesystem features:"))
            .unwrap_or_default();
        assert!(
            features.contains("has_journal"),
            "ext4 at the minimum size has a journal: {features}"
        );
    }
    let data = pattern(13, 2 * MIB as usize);
    write_synced(&src.target.join("data.bin"), &data);

    // The copies are taken while the source stays mounted, so their logs are dirty.
    let snapshot = controller
        .create_snapshot(snapshot_request(&format!("{fs}-snap"), &source.volume_id))
        .await
        .unwrap_or_else(|s| panic!("CreateSnapshot of {src_name}: {s}"))
        .into_inner()
        .snapshot
        .expect("CreateSnapshot returns the snapshot");
    assert!(snapshot.ready_to_use, "{snapshot:?}");
    let restore_name = format!("{fs}-restore");
    let clone_name = format!("{fs}-clone");
    let mut copies = Vec::new();
    for (name, req) in [
        (
            &restore_name,
            from_snapshot(request(&restore_name, minimum), &snapshot.snapshot_id),
        ),
        (
            &clone_name,
            from_volume(request(&clone_name, minimum), &source.volume_id),
        ),
    ] {
        let created = create_volume_waiting(&mut controller, req, COPY_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let volume = created.volume;
        assert_eq!(volume.capacity_bytes, source.capacity_bytes, "{name}");
        // Item 5: staged on the node where the source is mounted.
        let (a, dev) = attach_fs(cluster, &mut controller, &mut node, &volume, name, fs).await;
        copies.push((name.clone(), a, dev));
    }

    // The copies really carry the source's UUID (else this proves nothing)...
    let uuids: BTreeSet<String> = std::iter::once(&src_dev)
        .chain(copies.iter().map(|(_, _, dev)| dev))
        .map(|dev| run("blkid", &["-p", "-s", "UUID", "-o", "value", dev]))
        .collect();
    assert_eq!(uuids.len(), 1, "{fs}: source and copies share one UUID");
    assert!(!uuids.iter().any(String::is_empty), "{uuids:?}");
    // ... are all mounted at once, read the source's data, and are independent.
    assert_eq!(
        fs::read(src.target.join("data.bin")).expect("read source"),
        data
    );
    for (i, (name, a, _)) in copies.iter().enumerate() {
        assert!(
            fs::read(a.target.join("data.bin")).expect("read copy") == data,
            "{name}: the source's file differs"
        );
        let own = pattern(100 + i as u64, MIB as usize);
        write_synced(&a.target.join("own.bin"), &own);
        assert_eq!(fs::read(a.target.join("own.bin")).expect("read back"), own);
    }
    for mounted in std::iter::once(&src.target).chain(copies.iter().map(|(_, a, _)| &a.target)) {
        assert_eq!(mount_at(mounted).fs_type, fs, "{}", mounted.display());
    }
    assert!(
        !src.target.join("own.bin").exists(),
        "a copy's write must not reach its source"
    );

    // Teardown through CSI works for every one of them (unstage of a nouuid mount).
    for (name, a, _) in &copies {
        lifecycle::detach(&mut controller, &mut node, a)
            .await
            .unwrap_or_else(|e| panic!("detaching {name}: {e:#}"));
        assert!(mounts::mounts_under(&a.staging)
            .expect("mountinfo")
            .is_empty());
    }
    lifecycle::detach(&mut controller, &mut node, &src)
        .await
        .unwrap_or_else(|e| panic!("detaching {src_name}: {e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_and_clones_mount_next_to_their_source() {
    if !privileged("copied filesystem test") {
        return;
    }
    let cluster = ClusterBuilder::new()
        .start()
        .await
        .expect("start replicas, controller and node n1");
    for fs in ["xfs", "ext4"] {
        copies_mount_next_to_their_source(&cluster, fs).await;
    }
}
