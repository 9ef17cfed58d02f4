//! Snapshots, restores and clones end to end (issue 6, tests a, b, c, e, f, g), with
//! real processes and real devices.
//!
//! Every test starts its own cluster of `tessera-replica` daemons, the controller and
//! node n1 (engine-host + node plugin). Volumes are raw block volumes: they go
//! through CreateVolume, ControllerPublishVolume, NodeStageVolume and
//! NodePublishVolume like a pod's, and the tests read and write the published device
//! with O_DIRECT, so every byte checked came through loop → FUSE → engine → replicas.
//! Restores and clones are CSI CreateVolume calls with a `volume_content_source`,
//! retried on ABORTED the way the external-provisioner retries them
//! ([`create_volume_waiting`]).
//!
//! * (a) [`a_snapshots_of_a_volume_under_writes_hold_exactly_the_acknowledged_writes`]
//! * (b) [`b_clone_on_other_daemons_equals_its_source`]
//! * (c) [`c_snapshot_outlives_its_deleted_source`]
//! * (e) [`e_restore_resumes_after_a_target_is_killed`],
//!   [`e_clone_survives_a_killed_holder`]
//! * (f) [`f_snapshot_metadata_lists_exactly_the_written_blocks`]
//! * (g) [`g_bad_sources_leave_nothing_behind`]
//! * [`h_control_calls_are_answered_while_a_snapshot_merges`]: what deleting a
//!   snapshot (also a clone's internal one) does to the daemons' control API.
//!
//! Test (d), expansion under writes, is in `expansion.rs`.
//!
//! Waiting is on observed state (write counters, copy progress in the replica
//! records, CreateVolume answers), polled with deadlines; the only timer is the
//! once-a-second cadence of the snapshots in (a), which is what the test is about,
//! not a synchronisation. Blocking I/O runs on blocking threads. Cleanup is the
//! [`Cluster`]'s drop (unmounts, engine-hosts stopped gracefully, the safety net for
//! mounts and loop devices), also when a test fails.
//!
//! Like the other data-path tests these need root, `/dev/fuse` and
//! `/dev/loop-control`; without root they fail, unless
//! `TESSERA_SKIP_PRIVILEGED_TESTS=1` is set. They run one at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_tests::privilege::privileged;

use sha2::{Digest, Sha256};
use tessera_csi_proto::v1::controller_service_capability::rpc::Type as RpcType;
use tessera_csi_proto::v1::controller_service_capability::Type as CapType;
use tessera_csi_proto::v1::plugin_capability::service::Type as ServiceType;
use tessera_csi_proto::v1::plugin_capability::Type as PluginCapType;
use tessera_csi_proto::v1::snapshot_metadata_client::SnapshotMetadataClient;
use tessera_csi_proto::v1::{
    BlockMetadata, BlockMetadataType, ControllerGetCapabilitiesRequest, CreateVolumeRequest,
    DeleteVolumeRequest, GetMetadataAllocatedRequest, GetMetadataAllocatedResponse,
    GetMetadataDeltaRequest, GetMetadataDeltaResponse, GetPluginCapabilitiesRequest,
    GetSnapshotRequest, Snapshot, Topology, TopologyRequirement, Volume,
};
use tessera_csi_proto::TOPOLOGY_ZONE_KEY;
use tessera_replica_protocol::control_proto::{
    CopyProgress, GetVolumeRequest, ListSnapshotsRequest as ReplicaListSnapshots, VolumeRecord,
};
use tessera_tests::csi::{connect_unix, ControllerClient};
use tessera_tests::direct_io::{pattern, sha256_of, DirectFile, ALIGN};
use tessera_tests::fixtures::{
    self, create_request_with, create_volume_waiting, delete_snapshot_request, from_snapshot,
    from_volume, list_all_snapshots, list_all_volumes, records_per_replica, snapshot_request,
    Created,
};
use tessera_tests::lifecycle::{self, attach, block_capability, Attachment};
use tessera_tests::{poll_until, Cluster, ClusterBuilder};
use tonic::Code;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Block size of every volume.
const BLOCK: u64 = ALIGN as u64;
/// Longest a restore or clone may take to complete (debug builds on two loaded cores).
const COPY_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest a test waits for a writer or a state it polls for.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// One test at a time: each runs up to nine daemons on two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---- shared helpers -------------------------------------------------------------------

/// Kubelet-style paths of block volume `name` on node n1: (staging dir, device file).
fn kubelet_paths(cluster: &Cluster, name: &str) -> (PathBuf, PathBuf) {
    let base = cluster.dir().join("kubelet").join("n1");
    (
        base.join("staging").join(name),
        base.join("pods").join(name).join("dev"),
    )
}

/// CreateVolume of a raw block volume `name` of `size` bytes (default parameters).
fn block_request(name: &str, size: u64) -> CreateVolumeRequest {
    let mut request = create_request_with(name, i64::try_from(size).expect("size fits i64"), &[]);
    request.volume_capabilities = vec![block_capability()];
    request
}

/// `request` restricted to the replica daemons of `zone`.
fn in_zone(mut request: CreateVolumeRequest, zone: &str) -> CreateVolumeRequest {
    let topology = Topology {
        segments: [(TOPOLOGY_ZONE_KEY.to_owned(), zone.to_owned())].into(),
    };
    request.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![topology.clone()],
        preferred: vec![topology],
    });
    request
}

/// CreateVolume without a source; panics on failure.
async fn create(controller: &mut ControllerClient, request: CreateVolumeRequest) -> Volume {
    let name = request.name.clone();
    controller
        .create_volume(request)
        .await
        .unwrap_or_else(|s| panic!("CreateVolume {name}: {s}"))
        .into_inner()
        .volume
        .expect("CreateVolume returns the volume")
}

/// A restore or clone, retried while ABORTED, up to [`COPY_TIMEOUT`]; panics on
/// failure. Checks what every such volume must say about itself.
async fn create_copy(controller: &mut ControllerClient, request: CreateVolumeRequest) -> Created {
    let name = request.name.clone();
    let source = request.volume_content_source.clone();
    let required = request
        .capacity_range
        .map(|r| r.required_bytes)
        .unwrap_or_default();
    let created = create_volume_waiting(controller, request, COPY_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        created.volume.content_source, source,
        "CreateVolume {name} must report the content source it was created from"
    );
    assert!(
        created.volume.capacity_bytes >= required,
        "CreateVolume {name}: capacity {} below the {required} asked for",
        created.volume.capacity_bytes
    );
    eprintln!(
        "{name}: ready after {:?} and {} ABORTED answers{}",
        created.took,
        created.aborted.len(),
        created
            .aborted
            .last()
            .map(|m| format!(" (last: {m})"))
            .unwrap_or_default()
    );
    created
}

/// ControllerPublish + NodeStage + NodePublish of block volume `volume` on n1 under
/// kubelet paths named `name`.
async fn attach_block(cluster: &Cluster, volume: &Volume, name: &str) -> Attachment {
    let mut controller = cluster.controller().await.expect("controller");
    let mut node = cluster.node_client("n1").await.expect("n1 plugin");
    let (staging, target) = kubelet_paths(cluster, name);
    attach(
        &mut controller,
        &mut node,
        volume,
        "n1",
        block_capability(),
        &staging,
        &target,
    )
    .await
    .unwrap_or_else(|e| panic!("attaching {name} ({}) on n1: {e:#}", volume.volume_id))
}

/// The way back from [`attach_block`].
async fn detach(cluster: &Cluster, a: &Attachment) {
    let mut controller = cluster.controller().await.expect("controller");
    let mut node = cluster.node_client("n1").await.expect("n1 plugin");
    lifecycle::detach(&mut controller, &mut node, a)
        .await
        .unwrap_or_else(|e| panic!("detaching {}: {e:#}", a.volume_id));
}

async fn delete_volume(controller: &mut ControllerClient, volume_id: &str) {
    controller
        .delete_volume(fixtures::delete_request(volume_id))
        .await
        .unwrap_or_else(|s| panic!("DeleteVolume {volume_id}: {s}"));
}

/// CreateSnapshot; panics unless it succeeds with a ready snapshot of `volume_id`.
async fn take_snapshot(controller: &mut ControllerClient, name: &str, volume_id: &str) -> Snapshot {
    let snapshot = controller
        .create_snapshot(snapshot_request(name, volume_id))
        .await
        .unwrap_or_else(|s| panic!("CreateSnapshot {name} of {volume_id}: {s}"))
        .into_inner()
        .snapshot
        .expect("CreateSnapshot returns the snapshot");
    assert!(snapshot.ready_to_use, "{name} is not ready: {snapshot:?}");
    assert_eq!(snapshot.source_volume_id, volume_id);
    snapshot
}

/// Runs blocking `f` on the blocking pool; a panic in it fails the test.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// sha256 (hex) of the first `size` bytes of the device at `path`.
async fn device_sha(path: &Path, size: u64) -> String {
    let path = path.to_owned();
    blocking(move || {
        sha256_of(&path, size).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    })
    .await
}

/// Writes each `(offset, seed, len)` extent of [`pattern`]`(seed)` with O_DIRECT in
/// pieces of at most 1 MiB, then fdatasync.
async fn write_extents(path: &Path, extents: &[(u64, u64, u64)]) {
    let path = path.to_owned();
    let extents = extents.to_vec();
    blocking(move || {
        let dev = DirectFile::open(&path, true)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        for (offset, seed, len) in extents {
            let data = pattern(seed, usize::try_from(len).expect("extent fits usize"));
            for (i, piece) in data.chunks(MIB as usize).enumerate() {
                let at = offset + i as u64 * MIB;
                dev.write_at(at, piece)
                    .unwrap_or_else(|e| panic!("O_DIRECT write at {at}: {e}"));
            }
        }
        dev.sync().expect("fdatasync");
    })
    .await;
}

/// Volume ids of every volume the controller lists, sorted.
async fn volume_ids(controller: &mut ControllerClient) -> Vec<String> {
    let mut ids: Vec<String> = list_all_volumes(controller)
        .await
        .expect("ListVolumes")
        .into_iter()
        .map(|v| v.volume_id)
        .collect();
    ids.sort();
    ids
}

/// Snapshot ids of every snapshot the controller lists, sorted.
async fn snapshot_ids(controller: &mut ControllerClient) -> Vec<String> {
    let mut ids: Vec<String> = list_all_snapshots(controller)
        .await
        .expect("ListSnapshots")
        .into_iter()
        .map(|s| s.snapshot_id)
        .collect();
    ids.sort();
    ids
}

/// The records named `name` (CSI name) on every replica daemon, as
/// `(daemon index, record)`.
async fn records_named(cluster: &Cluster, name: &str) -> Vec<(usize, VolumeRecord)> {
    records_per_replica(cluster)
        .await
        .expect("ListVolumes on every replica daemon")
        .into_iter()
        .enumerate()
        .flat_map(|(i, records)| {
            records
                .into_iter()
                .filter(|r| r.name == name)
                .map(move |r| (i, r))
        })
        .collect()
}

/// Node ids of the replica daemons holding a record of `volume_id`, sorted.
async fn placement_of(cluster: &Cluster, volume_id: &str) -> BTreeSet<String> {
    fixtures::holders_of(cluster, volume_id)
        .await
        .expect("ListVolumes on every replica daemon")
        .into_iter()
        .collect()
}

/// Ids of every snapshot any replica daemon holds (user and internal ones).
async fn replica_snapshot_ids(cluster: &Cluster) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for replica in cluster.replicas() {
        let listed = replica
            .client()
            .await
            .expect("replica client")
            .list_snapshots(ReplicaListSnapshots {})
            .await
            .expect("ListSnapshots on a replica")
            .into_inner()
            .snapshots;
        ids.extend(listed.into_iter().map(|s| s.snapshot_id));
    }
    ids
}

/// Waits until the replica daemons hold exactly the snapshots `want`: a clone's
/// internal snapshot of its source goes once the clone is complete.
async fn wait_replica_snapshots(cluster: &Cluster, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let held = replica_snapshot_ids(cluster).await;
        if held == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replica daemons hold snapshots {held:?}, expected only {want:?} (a clone's \
             internal snapshot left behind?)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---- (a) snapshots under writes ---------------------------------------------------------

/// Blocks test (a) writes: the first 4 MiB of the volume.
const A_BLOCKS: u64 = 1024;
/// Writer threads; thread `t` owns the blocks `b` with `b % A_THREADS == t`, so
/// neighbouring blocks are written concurrently and each block has one writer.
const A_THREADS: u64 = 4;
const A_SIZE: u64 = 64 * MIB;
const A_SNAPSHOTS: usize = 4;
/// First bytes of every block test (a) writes.
const A_MAGIC: &[u8; 8] = b"TSNAPV01";

/// One acknowledged write of test (a); times are since the test's base instant.
#[derive(Debug, Clone, Copy)]
struct WriteRecord {
    block: u64,
    generation: u64,
    /// Taken before the write was submitted.
    issued: Duration,
    /// Taken after the write completed.
    acked: Duration,
}

/// The 4 KiB test (a) writes to `block` in pass `generation` (≥ 1): magic, block
/// index, generation, sha256 of everything else, then a pattern of both.
fn a_block(block: u64, generation: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK as usize];
    data[..8].copy_from_slice(A_MAGIC);
    data[8..16].copy_from_slice(&block.to_le_bytes());
    data[16..24].copy_from_slice(&generation.to_le_bytes());
    data[56..].copy_from_slice(&pattern(
        block.wrapping_mul(1_000_003) ^ generation,
        BLOCK as usize - 56,
    ));
    let sha = a_block_sha(&data);
    data[24..56].copy_from_slice(&sha);
    data
}

fn a_block_sha(data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&data[..24]);
    h.update(&data[56..]);
    h.finalize().into()
}

/// The generation a block read back holds: 0 for never written (all zeros), else
/// checked against its header, checksum and pattern.
fn a_generation(block: u64, data: &[u8]) -> Result<u64, String> {
    if data.iter().all(|b| *b == 0) {
        return Ok(0);
    }
    if &data[..8] != A_MAGIC {
        return Err("no magic: not a block this test wrote".into());
    }
    let at = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
    let generation = u64::from_le_bytes(data[16..24].try_into().expect("8 bytes"));
    if at != block {
        return Err(format!("holds block {at}'s data"));
    }
    if a_block_sha(data)[..] != data[24..56] {
        return Err(format!(
            "generation {generation}: checksum mismatch (torn or corrupt)"
        ));
    }
    if data != a_block(block, generation).as_slice() {
        return Err(format!("generation {generation}: pattern differs"));
    }
    Ok(generation)
}

/// Sets the flag when dropped, so writer threads stop also when the test panics.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Writer thread `t` of test (a): passes over its blocks, generation = pass number,
/// until `stop`; returns every write with its times.
fn a_writer(
    device: PathBuf,
    t: u64,
    base: Instant,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) -> std::io::Result<Vec<WriteRecord>> {
    let dev = DirectFile::open(&device, true)?;
    let mut log = Vec::new();
    let mut generation = 0;
    while !stop.load(Ordering::SeqCst) {
        generation += 1;
        for block in (t..A_BLOCKS).step_by(A_THREADS as usize) {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let data = a_block(block, generation);
            let issued = base.elapsed();
            dev.write_at(block * BLOCK, &data)?;
            let acked_at = base.elapsed();
            log.push(WriteRecord {
                block,
                generation,
                issued,
                acked: acked_at,
            });
            acked.fetch_add(1, Ordering::SeqCst);
        }
    }
    Ok(log)
}

/// One CreateSnapshot call of test (a).
#[derive(Debug, Clone)]
struct TimedSnapshot {
    snapshot: Snapshot,
    /// Taken before the call was sent.
    started: Duration,
    /// Taken after the answer arrived.
    returned: Duration,
}

/// For `snapshot` and one block's writes (in generation order): the lowest and
/// highest generation it may hold. Every write acknowledged before the call started
/// must be in (so at least the last of them); no write issued after the call
/// returned may be.
fn a_allowed(writes: &[WriteRecord], snapshot: &TimedSnapshot) -> (u64, u64) {
    let low = writes
        .iter()
        .filter(|w| w.acked < snapshot.started)
        .map(|w| w.generation)
        .max()
        .unwrap_or(0);
    let high = writes
        .iter()
        .filter(|w| w.issued <= snapshot.returned)
        .map(|w| w.generation)
        .max()
        .unwrap_or(0);
    (low, high)
}

/// (a) Four writer threads keep writing 4 KiB blocks (block index, generation,
/// sha256) with O_DIRECT to an attached volume while a snapshot is taken every
/// second. Each snapshot, restored to a new volume and attached, holds every write
/// acknowledged before its CreateSnapshot started and none issued after it returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshots_of_a_volume_under_writes_hold_exactly_the_acknowledged_writes() {
    if !privileged("snapshot test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let cluster = ClusterBuilder::new().start().await.expect("cluster starts");
    let mut controller = cluster.controller().await.expect("controller");
    let volume = create(&mut controller, block_request("a-source", A_SIZE)).await;
    let source = attach_block(&cluster, &volume, "a-source").await;

    let base = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(Arc::clone(&stop));
    let acked = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..A_THREADS)
        .map(|t| {
            let (device, stop, acked) = (source.target.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || a_writer(device, t, base, stop, acked))
        })
        .collect();
    let acked_now = || acked.load(Ordering::SeqCst);
    let wait_for_writes = |n: u64| {
        let acked = Arc::clone(&acked);
        async move {
            poll_until(STEP_TIMEOUT, || {
                let ok = acked.load(Ordering::SeqCst) >= n;
                std::future::ready(ok.then_some(()))
            })
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the writers did not reach {n} writes within {STEP_TIMEOUT:?} (at {})",
                    acked.load(Ordering::SeqCst)
                )
            })
        }
    };

    // A full first pass, so every snapshot has data in every block.
    wait_for_writes(A_BLOCKS).await;
    let mut snapshots = Vec::new();
    let mut cadence = tokio::time::interval(Duration::from_secs(1));
    for k in 0..A_SNAPSHOTS {
        cadence.tick().await;
        // Writes between two snapshots, whatever the cadence.
        wait_for_writes(acked_now() + 64).await;
        let started = base.elapsed();
        let snapshot =
            take_snapshot(&mut controller, &format!("a-snap-{k}"), &volume.volume_id).await;
        let returned = base.elapsed();
        eprintln!(
            "a-snap-{k}: CreateSnapshot took {:?} with the writers at {} writes",
            returned - started,
            acked_now()
        );
        snapshots.push(TimedSnapshot {
            snapshot,
            started,
            returned,
        });
    }
    // Writes issued after the last snapshot returned, which none may contain.
    wait_for_writes(acked_now() + 2 * A_BLOCKS).await;
    stop.store(true, Ordering::SeqCst);
    let mut log: Vec<WriteRecord> = Vec::new();
    for (t, writer) in writers.into_iter().enumerate() {
        let writes = blocking(move || writer.join())
            .await
            .unwrap_or_else(|_| panic!("writer {t} panicked"))
            .unwrap_or_else(|e| panic!("writer {t} failed: {e}"));
        log.extend(writes);
    }
    detach(&cluster, &source).await;

    let mut per_block: Vec<Vec<WriteRecord>> = vec![Vec::new(); A_BLOCKS as usize];
    for w in &log {
        per_block[w.block as usize].push(*w);
    }
    for writes in &mut per_block {
        writes.sort_by_key(|w| w.generation);
    }
    eprintln!(
        "{} writes over {:?}, {} generations of the first block",
        log.len(),
        log.iter().map(|w| w.acked).max().unwrap_or_default(),
        per_block[0].len()
    );
    for s in &snapshots {
        let before = log.iter().filter(|w| w.acked < s.started).count();
        let after = log.iter().filter(|w| w.issued > s.returned).count();
        let in_flight = log.len() - before - after;
        eprintln!(
            "{}: {before} writes acknowledged before, {in_flight} in flight during, {after} issued after",
            s.snapshot.snapshot_id
        );
        assert!(
            before > 0 && after > 0,
            "{}: the writes do not straddle the snapshot",
            s.snapshot.snapshot_id
        );
    }

    for (k, s) in snapshots.iter().enumerate() {
        let name = format!("a-restore-{k}");
        let request = from_snapshot(block_request(&name, A_SIZE), &s.snapshot.snapshot_id);
        let restored = create_copy(&mut controller, request).await.volume;
        // Placed on the snapshot's own daemons, so every replica shares its sealed
        // layers and reconciles them with the other copies (writes were in flight
        // while each snapshot was taken): what follows checks that reconciliation.
        let records = records_named(&cluster, &name).await;
        assert_eq!(records.len(), 3, "{name}: {records:?}");
        for (i, r) in &records {
            assert!(
                r.copy
                    .as_ref()
                    .is_some_and(|c| c.shared_layers && c.complete),
                "{name} on daemon {i} shares its layers: {:?}",
                r.copy
            );
        }
        let a = attach_block(&cluster, &restored, &name).await;
        let device = a.target.clone();
        let content = blocking(move || {
            let dev = DirectFile::open(&device, false).expect("open the restored device");
            let size = dev.size().expect("device size");
            assert_eq!(size, A_SIZE, "restored device size");
            let mut generations = Vec::new();
            let mut stray = Vec::new();
            for piece in 0..A_SIZE / MIB {
                let data = dev
                    .read_at(piece * MIB, MIB as usize)
                    .unwrap_or_else(|e| panic!("reading MiB {piece} of the restore: {e}"));
                for (i, block) in data.chunks(BLOCK as usize).enumerate() {
                    let index = piece * (MIB / BLOCK) + i as u64;
                    if index < A_BLOCKS {
                        generations.push(a_generation(index, block));
                    } else if block.iter().any(|b| *b != 0) {
                        stray.push(index);
                    }
                }
            }
            (generations, stray)
        })
        .await;
        let (generations, stray) = content;
        assert!(
            stray.is_empty(),
            "{name}: blocks never written hold data: {stray:?}"
        );
        let mut violations = Vec::new();
        let mut exact = 0;
        for (block, found) in generations.iter().enumerate() {
            let (low, high) = a_allowed(&per_block[block], s);
            match found {
                Err(e) => violations.push(format!("block {block}: {e}")),
                Ok(g) if *g < low => violations.push(format!(
                    "block {block}: generation {g}, but generation {low} was acknowledged before the snapshot started"
                )),
                Ok(g) if *g > high => violations.push(format!(
                    "block {block}: generation {g}, issued after the snapshot returned (newest allowed {high})"
                )),
                Ok(_) => exact += usize::from(low == high),
            }
        }
        assert!(
            violations.is_empty(),
            "{name} (of {}) breaks the snapshot guarantee in {} of {A_BLOCKS} blocks; first: {:#?}",
            s.snapshot.snapshot_id,
            violations.len(),
            &violations[..violations.len().min(10)]
        );
        eprintln!(
            "{name}: all {A_BLOCKS} blocks as allowed ({exact} determined exactly, the rest written during the call)"
        );
        detach(&cluster, &a).await;
        delete_volume(&mut controller, &restored.volume_id).await;
    }
}

// ---- (b) clone on other daemons ------------------------------------------------------

/// Extents (offset, seed, len) written to the sources of (b), (c) and (e): the first
/// MiB, one straddling the middle, the last MiB and a lone block.
fn scattered_extents(size: u64, seed: u64) -> Vec<(u64, u64, u64)> {
    vec![
        (0, seed, MIB),
        (size / 2 - 2 * MIB, seed + 1, 4 * MIB),
        (size - MIB, seed + 2, MIB),
        (7 * MIB + 12 * KIB, seed + 3, BLOCK),
    ]
}

/// (b) A clone placed on other daemons than its source (six replica daemons in two
/// zones; source in z1, clone in z2) reads back equal to the source by sha256 of
/// the whole device, and is independent of it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_clone_on_other_daemons_equals_its_source() {
    if !privileged("snapshot test") {
        return;
    }
    const SIZE: u64 = 96 * MIB;
    let _serial = SERIAL.lock().await;
    let cluster = ClusterBuilder::new()
        .replicas(6)
        .zones(2)
        .start()
        .await
        .expect("cluster starts");
    let mut controller = cluster.controller().await.expect("controller");
    let volume = create(
        &mut controller,
        in_zone(block_request("b-source", SIZE), "z1"),
    )
    .await;
    let source = attach_block(&cluster, &volume, "b-source").await;
    write_extents(&source.target, &scattered_extents(SIZE, 100)).await;
    // A snapshot in between: the clone must merge the source's layers.
    let between = take_snapshot(&mut controller, "b-between", &volume.volume_id).await;
    write_extents(
        &source.target,
        &[(MIB / 2, 110, 2 * MIB), (40 * MIB, 111, 3 * MIB)],
    )
    .await;
    let source_sha = device_sha(&source.target, SIZE).await;

    // Cloned while the source is attached, as a PVC dataSource may be.
    let request = in_zone(
        from_volume(block_request("b-clone", SIZE), &volume.volume_id),
        "z2",
    );
    let clone = create_copy(&mut controller, request).await.volume;
    assert_ne!(clone.volume_id, volume.volume_id);

    let source_daemons = placement_of(&cluster, &volume.volume_id).await;
    let clone_daemons = placement_of(&cluster, &clone.volume_id).await;
    eprintln!("source on {source_daemons:?}, clone on {clone_daemons:?}");
    assert_eq!(source_daemons.len(), 3, "RF 3 source");
    assert_eq!(clone_daemons.len(), 3, "RF 3 clone");
    assert!(
        source_daemons.is_disjoint(&clone_daemons),
        "the clone shares daemons with its source: {source_daemons:?} vs {clone_daemons:?}"
    );
    for (_, record) in records_named(&cluster, "b-clone").await {
        let source = record
            .copy_source
            .as_ref()
            .expect("a clone's record names its source");
        assert!(source.clone, "{source:?}");
        assert_eq!(source.source_volume_id, volume.volume_id);
        let copy = record
            .copy
            .as_ref()
            .expect("a clone's record has copy progress");
        assert!(
            copy.complete,
            "CreateVolume answered before the copy completed: {copy:?}"
        );
        assert_eq!(copy.done_bytes, copy.total_bytes, "{copy:?}");
    }
    wait_replica_snapshots(&cluster, &[&between.snapshot_id]).await;

    let a = attach_block(&cluster, &clone, "b-clone").await;
    let clone_sha = device_sha(&a.target, SIZE).await;
    assert_eq!(clone_sha, source_sha, "sha256 of the clone vs its source");

    // Independent afterwards: writing one changes nothing in the other.
    write_extents(&a.target, &[(0, 120, MIB)]).await;
    assert_eq!(device_sha(&source.target, SIZE).await, source_sha);
    assert_ne!(device_sha(&a.target, SIZE).await, source_sha);
    detach(&cluster, &a).await;
    detach(&cluster, &source).await;
}

// ---- (c) restore after the source is gone ----------------------------------------------

/// (c) Delete a volume, then restore its snapshot: the data is what it was when the
/// snapshot was taken (sha256), not what was written after it. The restored volume
/// does not need the snapshot once it exists, and deleting both leaves nothing on
/// any daemon's disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_snapshot_outlives_its_deleted_source() {
    if !privileged("snapshot test") {
        return;
    }
    const SIZE: u64 = 64 * MIB;
    let _serial = SERIAL.lock().await;
    let cluster = ClusterBuilder::new().start().await.expect("cluster starts");
    let mut controller = cluster.controller().await.expect("controller");
    let volume = create(&mut controller, block_request("c-source", SIZE)).await;
    let source = attach_block(&cluster, &volume, "c-source").await;
    write_extents(&source.target, &scattered_extents(SIZE, 200)).await;
    let at_snapshot = device_sha(&source.target, SIZE).await;
    let snapshot = take_snapshot(&mut controller, "c-snap", &volume.volume_id).await;
    write_extents(&source.target, &[(0, 210, 2 * MIB), (30 * MIB, 211, MIB)]).await;
    assert_ne!(device_sha(&source.target, SIZE).await, at_snapshot);
    detach(&cluster, &source).await;

    delete_volume(&mut controller, &volume.volume_id).await;
    assert!(
        !volume_ids(&mut controller)
            .await
            .contains(&volume.volume_id),
        "the deleted volume is still listed"
    );
    let listed = controller
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: snapshot.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("GetSnapshot of a deleted volume's snapshot")
        .into_inner()
        .snapshot
        .expect("GetSnapshot returns the snapshot");
    assert!(listed.ready_to_use, "{listed:?}");

    let request = from_snapshot(block_request("c-restore", SIZE), &snapshot.snapshot_id);
    let restored = create_copy(&mut controller, request).await.volume;
    controller
        .delete_snapshot(delete_snapshot_request(&snapshot.snapshot_id))
        .await
        .expect("DeleteSnapshot");
    let a = attach_block(&cluster, &restored, "c-restore").await;
    assert_eq!(
        device_sha(&a.target, SIZE).await,
        at_snapshot,
        "sha256 of the restore vs the source when the snapshot was taken"
    );
    detach(&cluster, &a).await;
    delete_volume(&mut controller, &restored.volume_id).await;
    for replica in cluster.replicas() {
        let left = replica.volume_dirs_on_disk().expect("list volume dirs");
        assert!(
            left.is_empty(),
            "replica {} keeps {left:?} after every volume and snapshot was deleted",
            replica.node_id()
        );
    }
}

// ---- (e) kill -9 during a copy -------------------------------------------------------------

/// `--copy-max-bandwidth` of every replica daemon in (e): slow enough that a copy of
/// [`E_DATA`] takes several seconds, so the kill lands mid-copy.
const E_COPY_BANDWIDTH: &str = "4Mi";
/// Controller `--copy-wait`: how long CreateVolume waits for a copy before ABORTED.
const E_COPY_WAIT: &str = "1s";
const E_SIZE: u64 = 64 * MIB;
/// Written (densely) to the source of (e).
const E_DATA: u64 = 48 * MIB;

/// Six replica daemons in two zones with slow copies and /metrics, the controller,
/// node n1.
async fn e_cluster() -> Cluster {
    ClusterBuilder::new()
        .replicas(6)
        .zones(2)
        .replica_args(["--copy-max-bandwidth", E_COPY_BANDWIDTH])
        .replica_metrics(true)
        .controller_args(["--copy-wait", E_COPY_WAIT])
        .start()
        .await
        .expect("cluster starts")
}

/// A source volume in z1 with [`E_DATA`] written; returns it and its sha256.
async fn e_source(cluster: &Cluster, name: &str) -> (Volume, String) {
    let mut controller = cluster.controller().await.expect("controller");
    let volume = create(&mut controller, in_zone(block_request(name, E_SIZE), "z1")).await;
    let a = attach_block(cluster, &volume, name).await;
    let extents: Vec<(u64, u64, u64)> = (0..E_DATA / (4 * MIB))
        .map(|i| (i * 4 * MIB, 300 + i, 4 * MIB))
        .collect();
    write_extents(&a.target, &extents).await;
    let sha = device_sha(&a.target, E_SIZE).await;
    detach(cluster, &a).await;
    (volume, sha)
}

/// Copy progress of `volume_id` on each daemon of `targets` (None: no answer).
async fn copy_progress(
    cluster: &Cluster,
    volume_id: &str,
    targets: &[usize],
) -> Vec<Option<CopyProgress>> {
    let mut out = Vec::new();
    for &i in targets {
        let answer = match cluster.replica(i).client().await {
            Ok(mut client) => client
                .get_volume(GetVolumeRequest {
                    volume_id: volume_id.to_owned(),
                })
                .await
                .ok()
                .map(|r| r.into_inner()),
            Err(_) => None,
        };
        out.push(answer.and_then(|r| r.copy));
    }
    out
}

/// Watches the copy of one new volume on its targets and checks that no target's
/// progress ever goes backwards; a restarted target's first answer is checked
/// against what it reported before it died (reported progress is durable).
struct CopyWatch {
    volume_id: String,
    targets: Vec<usize>,
    /// Node ids of the holders the copy reads (its record's copy_source).
    holders: Vec<String>,
    /// Highest done_bytes each target reported.
    done: BTreeMap<usize, u64>,
    total: u64,
}

impl CopyWatch {
    /// Waits until a majority of the new volume's replica records (CSI name `name`)
    /// exist, i.e. the controller started the copy.
    async fn find(cluster: &Cluster, name: &str) -> CopyWatch {
        let found = poll_until(STEP_TIMEOUT, || async {
            let records = records_named(cluster, name).await;
            let first = records.first()?.1.clone();
            let n = usize::try_from(first.replication_factor).ok()?;
            (records.len() == n).then(|| (first, records.into_iter().map(|(i, _)| i).collect()))
        })
        .await
        .unwrap_or_else(|_| panic!("no replica records of {name} within {STEP_TIMEOUT:?}"));
        let (record, targets): (VolumeRecord, Vec<usize>) = found;
        let copy_source = record
            .copy_source
            .as_ref()
            .unwrap_or_else(|| panic!("{name}'s record has no copy_source: {record:?}"));
        eprintln!(
            "{name}: volume {} on daemons {:?} copying {} (clone: {}) from {:?}",
            record.volume_id,
            targets,
            copy_source.snapshot_id,
            copy_source.clone,
            copy_source
                .holders
                .iter()
                .map(|h| h.node_id.as_str())
                .collect::<Vec<_>>()
        );
        let holders = copy_source
            .holders
            .iter()
            .map(|h| h.node_id.clone())
            .collect();
        CopyWatch {
            volume_id: record.volume_id,
            targets,
            holders,
            done: BTreeMap::new(),
            total: 0,
        }
    }

    /// One look at every target; panics if a target's progress went backwards.
    /// Returns the progress of each target that answered.
    async fn observe(&mut self, cluster: &Cluster) -> BTreeMap<usize, CopyProgress> {
        let seen = copy_progress(cluster, &self.volume_id, &self.targets).await;
        let mut out = BTreeMap::new();
        for (&i, p) in self.targets.iter().zip(seen) {
            let Some(p) = p else { continue };
            let before = self.done.get(&i).copied().unwrap_or(0);
            assert!(
                p.done_bytes >= before,
                "replica {} went back from {before} to {} bytes copied ({p:?})",
                cluster.replica(i).node_id(),
                p.done_bytes
            );
            assert!(p.done_bytes <= p.total_bytes, "{p:?}");
            assert!(!p.complete || p.done_bytes == p.total_bytes, "{p:?}");
            self.done.insert(i, p.done_bytes);
            self.total = p.total_bytes;
            out.insert(i, p);
        }
        out
    }

    /// Polls until `cond` holds for the progress seen, checking every observation.
    async fn until(
        &mut self,
        cluster: &Cluster,
        what: &str,
        cond: impl Fn(&BTreeMap<usize, CopyProgress>) -> bool,
    ) -> BTreeMap<usize, CopyProgress> {
        let deadline = Instant::now() + COPY_TIMEOUT;
        loop {
            let seen = self.observe(cluster).await;
            if cond(&seen) {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {COPY_TIMEOUT:?}; last progress {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Starts a restore or clone in the background, retried while ABORTED.
fn spawn_create(
    mut controller: ControllerClient,
    request: CreateVolumeRequest,
) -> tokio::task::JoinHandle<Created> {
    tokio::spawn(async move { create_copy(&mut controller, request).await })
}

/// After a copy's CreateVolume succeeded: it did answer ABORTED while copying, a
/// repeated call answers the same volume, and the volume reads back as `sha`.
async fn e_finish(cluster: &Cluster, request: CreateVolumeRequest, created: Created, sha: &str) {
    assert!(
        !created.aborted.is_empty(),
        "CreateVolume never answered ABORTED during a copy of several seconds"
    );
    assert!(
        created.aborted.iter().any(|m| m.contains('%')),
        "no ABORTED answer reports the copy's progress: {:?}",
        created.aborted
    );
    let mut controller = cluster.controller().await.expect("controller");
    let name = request.name.clone();
    let again = create(&mut controller, request).await;
    assert_eq!(again, created.volume, "a repeated CreateVolume {name}");
    let a = attach_block(cluster, &created.volume, &name).await;
    assert_eq!(
        device_sha(&a.target, E_SIZE).await,
        sha,
        "sha256 of {name} vs its source"
    );
    detach(cluster, &a).await;
}

/// The copy of `volume_id` as daemon `index` exports it on /metrics while it runs:
/// (done, total) bytes.
async fn e_copy_metrics(cluster: &Cluster, index: usize, volume_id: &str) -> (u64, u64) {
    let metrics = cluster
        .replica(index)
        .metrics()
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let get = |name: &str| {
        metrics
            .value(name, &[("volume_id", volume_id)])
            .unwrap_or_else(|| {
                panic!(
                    "replica {} exports no {name} of {volume_id}; copy metrics on the page: {:?}",
                    cluster.replica(index).node_id(),
                    metrics.names_containing("copy")
                )
            }) as u64
    };
    (
        get("tessera_replica_copy_done_bytes"),
        get("tessera_replica_copy_total_bytes"),
    )
}

/// (e) kill -9 one target daemon of a cross-daemon restore when a quarter is
/// copied, start it again: its progress resumes from at least what it reported
/// before (never from 0), CreateVolume answers ABORTED meanwhile and the same volume
/// at the end, and the restore verifies by sha256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_restore_resumes_after_a_target_is_killed() {
    if !privileged("snapshot test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = e_cluster().await;
    let (volume, sha) = e_source(&cluster, "e-source").await;
    let mut controller = cluster.controller().await.expect("controller");
    let snapshot = take_snapshot(&mut controller, "e-snap", &volume.volume_id).await;
    let request = in_zone(
        from_snapshot(block_request("e-restore", E_SIZE), &snapshot.snapshot_id),
        "z2",
    );
    let create_task = spawn_create(controller.clone(), request.clone());

    let mut watch = CopyWatch::find(&cluster, "e-restore").await;
    let holders = placement_of(&cluster, &volume.volume_id).await;
    for &t in &watch.targets {
        assert!(
            !holders.contains(cluster.replica(t).node_id()),
            "target {} also holds the source: not a cross-daemon copy",
            cluster.replica(t).node_id()
        );
    }
    let victim = watch.targets[0];
    let seen = watch
        .until(&cluster, "a quarter copied on the victim", |seen| {
            seen.get(&victim)
                .is_some_and(|p| p.complete || p.done_bytes * 4 >= p.total_bytes)
        })
        .await;
    let at_kill = seen[&victim].clone();
    assert!(
        !at_kill.complete,
        "the copy finished before the kill ({at_kill:?}); lower E_COPY_BANDWIDTH"
    );
    let (done, total) = e_copy_metrics(&cluster, victim, &watch.volume_id).await;
    assert_eq!(
        total, at_kill.total_bytes,
        "copy total on /metrics vs the record"
    );
    assert!(
        done >= at_kill.done_bytes,
        "copy progress on /metrics behind the record: {done} < {at_kill:?}"
    );
    cluster.kill_replica(victim).expect("kill -9 the target");
    eprintln!(
        "killed target {} at {} of {} bytes",
        cluster.replica(victim).node_id(),
        at_kill.done_bytes,
        at_kill.total_bytes
    );
    // The others go on without it.
    let others: Vec<usize> = watch
        .targets
        .iter()
        .copied()
        .filter(|&t| t != victim)
        .collect();
    let others_at_kill: Vec<u64> = others.iter().map(|t| watch.done[t]).collect();
    watch
        .until(&cluster, "the other targets progress", |seen| {
            others.iter().zip(&others_at_kill).all(|(t, before)| {
                seen.get(t)
                    .is_some_and(|p| p.complete || p.done_bytes > *before)
            })
        })
        .await;
    assert!(
        !create_task.is_finished(),
        "CreateVolume finished with a target down"
    );

    cluster
        .start_replica(victim)
        .await
        .expect("restart the target");
    let first = watch
        .until(&cluster, "the restarted target answers", |seen| {
            seen.contains_key(&victim)
        })
        .await[&victim]
        .clone();
    eprintln!("restarted target reports {first:?}");
    let (done, total) = e_copy_metrics(&cluster, victim, &watch.volume_id).await;
    assert_eq!(
        total, first.total_bytes,
        "copy total on /metrics after the restart"
    );
    assert!(
        done >= at_kill.done_bytes,
        "the restarted target's /metrics shows the copy from {done}, below the {} it had reported",
        at_kill.done_bytes
    );
    assert!(
        first.done_bytes >= at_kill.done_bytes && first.done_bytes > 0,
        "the restarted target's copy restarted: {} bytes before the kill, {} after",
        at_kill.done_bytes,
        first.done_bytes
    );
    watch
        .until(&cluster, "every target completes", |seen| {
            seen.len() == 3 && seen.values().all(|p| p.complete)
        })
        .await;
    let created = create_task.await.expect("CreateVolume task");
    assert_eq!(created.volume.volume_id, watch.volume_id);
    e_finish(&cluster, request, created, &sha).await;
}

/// (e) kill -9 one holder the copy reads from (a daemon of the cloned volume) in the
/// middle of a cross-daemon clone: the targets report the trouble in their records'
/// `last_error`, their progress never goes back, the copy completes after the holder
/// is restarted, CreateVolume answers ABORTED meanwhile and the same volume at the
/// end, and the clone verifies by sha256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_clone_survives_a_killed_holder() {
    if !privileged("snapshot test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = e_cluster().await;
    let (volume, sha) = e_source(&cluster, "e-source").await;
    let controller = cluster.controller().await.expect("controller");
    let request = in_zone(
        from_volume(block_request("e-clone", E_SIZE), &volume.volume_id),
        "z2",
    );
    let create_task = spawn_create(controller, request.clone());

    let mut watch = CopyWatch::find(&cluster, "e-clone").await;
    let placement = placement_of(&cluster, &volume.volume_id).await;
    assert!(
        !watch.holders.is_empty() && watch.holders.iter().all(|h| placement.contains(h)),
        "the copy reads {:?}, not daemons of its source {placement:?}",
        watch.holders
    );
    let victim = cluster
        .replica_index(&watch.holders[0])
        .expect("holder index");
    assert!(!watch.targets.contains(&victim));
    let seen = watch
        .until(&cluster, "a quarter copied everywhere", |seen| {
            seen.len() == 3
                && seen
                    .values()
                    .all(|p| p.complete || p.done_bytes * 4 >= p.total_bytes)
        })
        .await;
    assert!(
        seen.values().all(|p| !p.complete),
        "the copy finished before the kill ({seen:?}); lower E_COPY_BANDWIDTH"
    );
    cluster.kill_replica(victim).expect("kill -9 the holder");
    let at_kill: u64 = watch.done.values().sum();
    eprintln!(
        "killed holder {} with {at_kill} bytes copied over all targets",
        cluster.replica(victim).node_id()
    );
    // The copy goes on from another majority of copies or waits for the holder;
    // either way the targets say what they are retrying past.
    let seen = watch
        .until(&cluster, "a target reports the lost holder", |seen| {
            seen.values().any(|p| !p.last_error.is_empty()) || seen.values().all(|p| p.complete)
        })
        .await;
    eprintln!(
        "with holder {} down: {:?}",
        cluster.replica(victim).node_id(),
        seen.values()
            .map(|p| (p.done_bytes, p.last_error.as_str()))
            .collect::<Vec<_>>()
    );
    assert!(
        !create_task.is_finished(),
        "CreateVolume finished with a holder down"
    );
    cluster
        .start_replica(victim)
        .await
        .expect("restart the holder");
    watch
        .until(&cluster, "every target completes", |seen| {
            seen.len() == 3 && seen.values().all(|p| p.complete)
        })
        .await;
    let created = create_task.await.expect("CreateVolume task");
    assert_eq!(created.volume.volume_id, watch.volume_id);
    wait_replica_snapshots(&cluster, &[]).await;
    e_finish(&cluster, request, created, &sha).await;
}

// ---- (f) SnapshotMetadata --------------------------------------------------------------

/// Sorted, merged byte ranges `[start, end)`.
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

/// The part of `ranges` at or after `from`.
fn clip(ranges: &[(u64, u64)], from: u64) -> Vec<(u64, u64)> {
    ranges
        .iter()
        .filter(|(_, end)| *end > from)
        .map(|&(start, end)| (start.max(from), end))
        .collect()
}

/// One SnapshotMetadata stream, checked against the spec: one block-metadata type
/// (not UNKNOWN) and the volume's capacity in every message, at most `max_results`
/// tuples per message, tuples of positive size in strictly increasing,
/// non-overlapping order across messages (constant size when FIXED_LENGTH), none
/// ending before `starting_offset`. Returns the tuples as merged ranges.
fn check_stream(
    what: &str,
    messages: &[MetadataMessage],
    capacity: u64,
    max_results: i32,
    starting_offset: u64,
) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    let mut kind = None;
    let mut fixed = None;
    let mut last_end = 0;
    for (t, cap, tuples) in messages {
        let t = BlockMetadataType::try_from(*t).unwrap_or(BlockMetadataType::Unknown);
        assert_ne!(t, BlockMetadataType::Unknown, "{what}: block_metadata_type");
        assert!(
            kind.is_none_or(|k| k == t),
            "{what}: the type changed mid-stream"
        );
        kind = Some(t);
        assert_eq!(*cap, capacity as i64, "{what}: volume_capacity_bytes");
        if max_results > 0 {
            assert!(
                tuples.len() <= max_results as usize,
                "{what}: {} tuples in a message, max_results {max_results}",
                tuples.len()
            );
        }
        for m in tuples {
            assert!(
                m.size_bytes > 0 && m.byte_offset >= 0,
                "{what}: tuple {m:?}"
            );
            let (start, size) = (m.byte_offset as u64, m.size_bytes as u64);
            assert!(
                ranges.is_empty() || start >= last_end,
                "{what}: tuple {m:?} overlaps or precedes the one before (ending at {last_end})"
            );
            assert!(
                start + size > starting_offset,
                "{what}: tuple {m:?} ends before starting_offset {starting_offset}"
            );
            if t == BlockMetadataType::FixedLength {
                assert!(
                    fixed.is_none_or(|f| f == size),
                    "{what}: FIXED_LENGTH with sizes {fixed:?} and {size}"
                );
                fixed = Some(size);
            }
            last_end = start + size;
            ranges.push((start, start + size));
        }
    }
    merge(ranges)
}

/// One SnapshotMetadata message as the checks read it: type, capacity, entries.
type MetadataMessage = (i32, i64, Vec<BlockMetadata>);

/// The fields both SnapshotMetadata responses carry, so one collector reads either
/// stream.
trait MetadataResponse {
    fn into_message(self) -> MetadataMessage;
}

impl MetadataResponse for GetMetadataAllocatedResponse {
    fn into_message(self) -> MetadataMessage {
        (
            self.block_metadata_type,
            self.volume_capacity_bytes,
            self.block_metadata,
        )
    }
}

impl MetadataResponse for GetMetadataDeltaResponse {
    fn into_message(self) -> MetadataMessage {
        (
            self.block_metadata_type,
            self.volume_capacity_bytes,
            self.block_metadata,
        )
    }
}

/// Every message of a SnapshotMetadata stream, in order.
async fn collect<R: MetadataResponse>(
    stream: Result<tonic::Response<tonic::Streaming<R>>, tonic::Status>,
) -> Result<Vec<MetadataMessage>, tonic::Status> {
    let mut stream = stream?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        out.push(m.into_message());
    }
    Ok(out)
}

/// GetMetadataAllocated of `snapshot_id`, all messages.
async fn allocated(
    client: &mut SnapshotMetadataClient<tonic::transport::Channel>,
    snapshot_id: &str,
    starting_offset: i64,
    max_results: i32,
) -> Result<Vec<MetadataMessage>, tonic::Status> {
    let req = GetMetadataAllocatedRequest {
        snapshot_id: snapshot_id.to_owned(),
        starting_offset,
        max_results,
        ..Default::default()
    };
    collect(client.get_metadata_allocated(req).await).await
}

/// GetMetadataDelta from `base` to `target`, all messages.
async fn delta(
    client: &mut SnapshotMetadataClient<tonic::transport::Channel>,
    base: &str,
    target: &str,
    starting_offset: i64,
    max_results: i32,
) -> Result<Vec<MetadataMessage>, tonic::Status> {
    let req = GetMetadataDeltaRequest {
        base_snapshot_id: base.to_owned(),
        target_snapshot_id: target.to_owned(),
        starting_offset,
        max_results,
        ..Default::default()
    };
    collect(client.get_metadata_delta(req).await).await
}

/// (f) GetMetadataAllocated of a snapshot lists exactly the blocks written before
/// it, GetMetadataDelta between two snapshots exactly the blocks written in between
/// (as merged byte ranges), also when paged with max_results = 1 and resumed from a
/// starting_offset; unknown snapshots are NOT_FOUND, offsets past the end
/// OUT_OF_RANGE. The service is advertised (SNAPSHOT_METADATA_SERVICE) and served
/// on the controller's socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_snapshot_metadata_lists_exactly_the_written_blocks() {
    if !privileged("snapshot test") {
        return;
    }
    const SIZE: u64 = 64 * MIB;
    let _serial = SERIAL.lock().await;
    let cluster = ClusterBuilder::new().start().await.expect("cluster starts");
    let mut identity = cluster
        .controller_identity()
        .await
        .expect("controller identity");
    let capabilities = identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .expect("GetPluginCapabilities")
        .into_inner()
        .capabilities;
    assert!(
        capabilities.iter().any(|c| matches!(
            &c.r#type,
            Some(PluginCapType::Service(s)) if s.r#type == ServiceType::SnapshotMetadataService as i32
        )),
        "SNAPSHOT_METADATA_SERVICE is not advertised: {capabilities:?}"
    );

    let mut controller = cluster.controller().await.expect("controller");
    let volume = create(&mut controller, block_request("f-volume", SIZE)).await;
    let a = attach_block(&cluster, &volume, "f-volume").await;
    // (offset, len): neighbours that merge, a lone block, a MiB, the last block.
    let first: Vec<(u64, u64)> = vec![
        (0, 4 * BLOCK),
        (10 * BLOCK, BLOCK),
        (11 * BLOCK, BLOCK),
        (100 * BLOCK, BLOCK),
        (8 * MIB, MIB),
        (SIZE - BLOCK, BLOCK),
    ];
    // Overlapping, extending and rewriting the first set, plus new ranges.
    let second: Vec<(u64, u64)> = vec![
        (2 * BLOCK, 4 * BLOCK),
        (100 * BLOCK, BLOCK),
        (8 * MIB + 256 * KIB, 64 * KIB),
        (32 * MIB, 256 * KIB),
        (SIZE - BLOCK, BLOCK),
        (SIZE - 3 * BLOCK, BLOCK),
    ];
    let as_extents = |set: &[(u64, u64)], seed: u64| -> Vec<(u64, u64, u64)> {
        set.iter()
            .enumerate()
            .map(|(i, &(o, l))| (o, seed + i as u64, l))
            .collect()
    };
    let as_ranges = |set: &[(u64, u64)]| merge(set.iter().map(|&(o, l)| (o, o + l)).collect());
    write_extents(&a.target, &as_extents(&first, 400)).await;
    let s1 = take_snapshot(&mut controller, "f-s1", &volume.volume_id).await;
    write_extents(&a.target, &as_extents(&second, 500)).await;
    let s2 = take_snapshot(&mut controller, "f-s2", &volume.volume_id).await;
    let (s1, s2) = (s1.snapshot_id, s2.snapshot_id);

    let channel = connect_unix(Path::new(
        cluster
            .controller_endpoint()
            .expect("endpoint")
            .trim_start_matches("unix://"),
    ))
    .await
    .expect("connect to the controller socket");
    let mut meta = SnapshotMetadataClient::new(channel);

    let want_s1 = as_ranges(&first);
    let want_delta = as_ranges(&second);
    let want_s2 = as_ranges(&[first.clone(), second.clone()].concat());
    for max in [0, 1] {
        let got = allocated(&mut meta, &s1, 0, max)
            .await
            .expect("GetMetadataAllocated s1");
        let got = check_stream("allocated s1", &got, SIZE, max, 0);
        assert_eq!(
            got, want_s1,
            "GetMetadataAllocated of s1 (max_results {max})"
        );
        let got = allocated(&mut meta, &s2, 0, max)
            .await
            .expect("GetMetadataAllocated s2");
        let got = check_stream("allocated s2", &got, SIZE, max, 0);
        assert_eq!(
            got, want_s2,
            "GetMetadataAllocated of s2 (max_results {max})"
        );
        let got = delta(&mut meta, &s1, &s2, 0, max)
            .await
            .expect("GetMetadataDelta");
        let got = check_stream("delta s1..s2", &got, SIZE, max, 0);
        assert_eq!(
            got, want_delta,
            "GetMetadataDelta s1..s2 (max_results {max})"
        );
    }
    // Resuming mid-range: the first tuple may start before the offset, none ends
    // before it, and from there on it is the same list.
    let from = 8 * MIB + 300 * KIB;
    let got = delta(&mut meta, &s1, &s2, from as i64, 0)
        .await
        .expect("GetMetadataDelta resumed");
    let got = check_stream("delta resumed", &got, SIZE, 0, from);
    assert_eq!(
        clip(&got, from),
        clip(&want_delta, from),
        "GetMetadataDelta from {from}"
    );
    let got = allocated(&mut meta, &s1, from as i64, 0)
        .await
        .expect("GetMetadataAllocated resumed");
    let got = check_stream("allocated resumed", &got, SIZE, 0, from);
    assert_eq!(
        clip(&got, from),
        clip(&want_s1, from),
        "GetMetadataAllocated from {from}"
    );

    let unknown = "ts-00000000000000000000000000000000";
    let code = |r: Result<Vec<(i32, i64, Vec<BlockMetadata>)>, tonic::Status>| {
        r.expect_err("the call must fail").code()
    };
    assert_eq!(
        code(allocated(&mut meta, unknown, 0, 0).await),
        Code::NotFound
    );
    assert_eq!(
        code(delta(&mut meta, unknown, &s2, 0, 0).await),
        Code::NotFound
    );
    assert_eq!(
        code(delta(&mut meta, &s1, unknown, 0, 0).await),
        Code::NotFound
    );
    assert_eq!(
        code(allocated(&mut meta, &s1, -1, 0).await),
        Code::OutOfRange
    );
    assert_eq!(
        code(allocated(&mut meta, &s1, SIZE as i64 + MIB as i64, 0).await),
        Code::OutOfRange
    );
    assert_eq!(
        code(delta(&mut meta, &s1, &s2, SIZE as i64 + MIB as i64, 0).await),
        Code::OutOfRange
    );
    detach(&cluster, &a).await;
}

// ---- (g) bad input ---------------------------------------------------------------------

/// Everything that could be left behind: per daemon the volume directories on disk
/// and the snapshots it lists, and the controller's volume and snapshot lists.
#[derive(Debug, PartialEq, Eq)]
struct Footprint {
    dirs: Vec<Vec<String>>,
    replica_snapshots: Vec<Vec<String>>,
    volumes: Vec<String>,
    snapshots: Vec<String>,
}

async fn footprint(cluster: &Cluster, controller: &mut ControllerClient) -> Footprint {
    let mut dirs = Vec::new();
    let mut replica_snapshots = Vec::new();
    for replica in cluster.replicas() {
        dirs.push(replica.volume_dirs_on_disk().expect("list volume dirs"));
        let mut ids: Vec<String> = replica
            .client()
            .await
            .expect("replica client")
            .list_snapshots(ReplicaListSnapshots {})
            .await
            .expect("ListSnapshots on a replica")
            .into_inner()
            .snapshots
            .into_iter()
            .map(|s| s.snapshot_id)
            .collect();
        ids.sort();
        replica_snapshots.push(ids);
    }
    Footprint {
        dirs,
        replica_snapshots,
        volumes: volume_ids(controller).await,
        snapshots: snapshot_ids(controller).await,
    }
}

/// (g) Restoring an unknown snapshot and cloning an unknown volume are NOT_FOUND,
/// so is a snapshot of an unknown volume; restoring or cloning into a volume smaller
/// than the source is OUT_OF_RANGE. None of them leaves anything behind (no replica
/// volume on any daemon's disk, no snapshot on any daemon, ListVolumes and
/// ListSnapshots unchanged), and the names stay usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_bad_sources_leave_nothing_behind() {
    const SIZE: u64 = 64 * MIB;
    let _serial = SERIAL.lock().await;
    let cluster = ClusterBuilder::new()
        .node(false)
        .start()
        .await
        .expect("cluster starts");
    let mut controller = cluster.controller().await.expect("controller");
    let volume = create(&mut controller, block_request("g-source", SIZE)).await;
    let snapshot = take_snapshot(&mut controller, "g-snap", &volume.volume_id).await;
    let before = footprint(&cluster, &mut controller).await;
    assert_eq!(before.volumes, vec![volume.volume_id.clone()]);
    assert_eq!(before.snapshots, vec![snapshot.snapshot_id.clone()]);

    let unknown_snapshot = "ts-00000000000000000000000000000000";
    let unknown_volume = "tv-00000000000000000000000000000000";
    let smaller = SIZE / 2;
    let cases: Vec<(&str, Code, CreateVolumeRequest)> = vec![
        (
            "restore of an unknown snapshot",
            Code::NotFound,
            from_snapshot(block_request("g-bad-1", SIZE), unknown_snapshot),
        ),
        (
            "clone of an unknown volume",
            Code::NotFound,
            from_volume(block_request("g-bad-2", SIZE), unknown_volume),
        ),
        (
            "restore smaller than the snapshot",
            Code::OutOfRange,
            from_snapshot(block_request("g-bad-3", smaller), &snapshot.snapshot_id),
        ),
        (
            "clone smaller than the source",
            Code::OutOfRange,
            from_volume(block_request("g-bad-4", smaller), &volume.volume_id),
        ),
    ];
    for (what, code, request) in &cases {
        let status = controller
            .create_volume(request.clone())
            .await
            .expect_err(what);
        assert_eq!(status.code(), *code, "{what}: {status:?}");
        assert_eq!(
            footprint(&cluster, &mut controller).await,
            before,
            "{what} left something behind"
        );
    }
    let status = controller
        .create_snapshot(snapshot_request("g-bad-snap", unknown_volume))
        .await
        .expect_err("snapshot of an unknown volume");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(
        footprint(&cluster, &mut controller).await,
        before,
        "a snapshot of an unknown volume left something behind"
    );

    // The names that failed are free: the same name with a good request works.
    let (_, _, bad_size) = &cases[2];
    let mut fixed = bad_size.clone();
    fixed.capacity_range = block_request("g-bad-3", SIZE).capacity_range;
    let restored = create_copy(&mut controller, fixed).await.volume;
    assert_eq!(restored.capacity_bytes, SIZE as i64);
    controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: restored.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteVolume of the restore");
    assert_eq!(footprint(&cluster, &mut controller).await, before);
}

/// The controller advertises what issue 6 built: snapshots (create/delete, list,
/// get) and clones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_clone_capabilities_are_advertised() {
    let _serial = SERIAL.lock().await;
    let cluster = ClusterBuilder::new()
        .node(false)
        .start()
        .await
        .expect("cluster starts");
    let mut controller = cluster.controller().await.expect("controller");
    let advertised: Vec<i32> = controller
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .expect("ControllerGetCapabilities")
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| c.r#type.map(|CapType::Rpc(rpc)| rpc.r#type))
        .collect();
    for wanted in [
        RpcType::CreateDeleteSnapshot,
        RpcType::ListSnapshots,
        RpcType::GetSnapshot,
        RpcType::CloneVolume,
    ] {
        assert!(
            advertised.contains(&(wanted as i32)),
            "{wanted:?} is not advertised: {advertised:?}"
        );
    }
}

// ---- (h) control calls during a snapshot merge ------------------------------------------

/// Bytes allocated on disk below `dir` (st_blocks of every file).
fn allocated_below(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated_below(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Deleting a snapshot merges its layer into the next one while I/O continues (and
/// every clone deletes its internal snapshot of the source once the copy is done).
/// During such a merge the daemons must still answer control calls: CreateVolume
/// of another volume on the same daemons succeeds, long before the merge ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_control_calls_are_answered_while_a_snapshot_merges() {
    if !privileged("snapshot test") {
        return;
    }
    const SIZE: u64 = 256 * MIB;
    const DATA: u64 = 192 * MIB;
    let _serial = SERIAL.lock().await;
    let cluster = ClusterBuilder::new().start().await.expect("cluster starts");
    let mut controller = cluster.controller().await.expect("controller");
    let volume = create(&mut controller, block_request("h-source", SIZE)).await;
    let a = attach_block(&cluster, &volume, "h-source").await;
    let extents: Vec<(u64, u64, u64)> = (0..DATA / (4 * MIB))
        .map(|i| (i * 4 * MIB, 600 + i, 4 * MIB))
        .collect();
    write_extents(&a.target, &extents).await;
    let snapshot = take_snapshot(&mut controller, "h-snap", &volume.volume_id).await;
    let source_sha = device_sha(&a.target, SIZE).await;
    detach(&cluster, &a).await;

    // The merge copies the snapshot's blocks into the (empty) head: it has begun
    // once the volume's files on a daemon grow.
    let dirs: Vec<PathBuf> = cluster
        .replicas()
        .iter()
        .map(|r| r.volume_dir(&volume.volume_id))
        .collect();
    let before: Vec<u64> = dirs.iter().map(|d| allocated_below(d)).collect();
    let started = Instant::now();
    let delete = {
        let mut controller = controller.clone();
        let id = snapshot.snapshot_id.clone();
        tokio::spawn(async move {
            let r = controller
                .delete_snapshot(delete_snapshot_request(&id))
                .await;
            (r, started.elapsed())
        })
    };
    poll_until(STEP_TIMEOUT, || {
        let grew = dirs
            .iter()
            .zip(&before)
            .any(|(d, b)| allocated_below(d) > b + 4 * MIB);
        std::future::ready(grew.then_some(()))
    })
    .await
    .expect("the merge of the deleted snapshot never started writing");
    let merging_after = started.elapsed();

    let asked = Instant::now();
    let other = controller
        .create_volume(block_request("h-other", 16 * MIB))
        .await;
    let other_took = asked.elapsed();
    // A snapshot of the very volume whose older snapshot is merging: sealing does not
    // wait for the merge (it used to, holding the daemon's mutation lock meanwhile).
    let asked = Instant::now();
    let during = controller
        .create_snapshot(snapshot_request("h-snap-during", &volume.volume_id))
        .await;
    let during_took = asked.elapsed();
    let delete_running = !delete.is_finished();
    let (deleted, delete_took) = delete.await.expect("DeleteSnapshot task");
    eprintln!(
        "merge writing after {merging_after:?}; CreateVolume of another volume took \
         {other_took:?}; DeleteSnapshot took {delete_took:?} ({deleted:?})"
    );
    let other = other.unwrap_or_else(|s| {
        panic!(
            "CreateVolume of another volume failed while a snapshot merged (after \
             {other_took:?}): {s}"
        )
    });
    assert!(
        delete_running || other_took < Duration::from_secs(1),
        "CreateVolume of another volume waited {other_took:?}, until the merge of the \
         deleted snapshot was over (DeleteSnapshot took {delete_took:?}): the daemons' \
         control API is blocked while a snapshot merges"
    );
    assert!(other.into_inner().volume.is_some());
    let during = during
        .unwrap_or_else(|s| {
            panic!("CreateSnapshot of the merging volume failed (after {during_took:?}): {s}")
        })
        .into_inner()
        .snapshot
        .expect("CreateSnapshot returns the snapshot");
    assert!(
        delete_running || during_took < Duration::from_secs(1),
        "CreateSnapshot of the merging volume waited {during_took:?}, until the merge \
         was over (DeleteSnapshot took {delete_took:?})"
    );
    // Whatever the first answer, a retried DeleteSnapshot ends with the snapshot gone.
    if let Err(status) = deleted {
        eprintln!("DeleteSnapshot answered {status:?}; retrying as a CO would");
        poll_until(STEP_TIMEOUT, || {
            let mut controller = controller.clone();
            let id = snapshot.snapshot_id.clone();
            async move {
                controller
                    .delete_snapshot(delete_snapshot_request(&id))
                    .await
                    .ok()
            }
        })
        .await
        .expect("DeleteSnapshot never succeeded");
    }
    assert!(!snapshot_ids(&mut controller)
        .await
        .contains(&snapshot.snapshot_id));
    // A success is a deletion: no daemon holds it any more (the controller once took
    // daemons that missed a deadline for down and answered success without deleting).
    assert!(
        !replica_snapshot_ids(&cluster)
            .await
            .contains(&snapshot.snapshot_id),
        "DeleteSnapshot answered success while a daemon still holds the snapshot"
    );
    // The snapshot sealed in the middle of the merge holds the volume as written.
    let request = from_snapshot(block_request("h-restore", SIZE), &during.snapshot_id);
    let restored = create_copy(&mut controller, request).await.volume;
    let r = attach_block(&cluster, &restored, "h-restore").await;
    assert_eq!(
        device_sha(&r.target, SIZE).await,
        source_sha,
        "a snapshot sealed during a merge restores to the volume's content"
    );
    detach(&cluster, &r).await;
}
