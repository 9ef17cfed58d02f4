//! The data path end to end, with real processes and real mounts (issue 3, "How it
//! must be shown", items a–f; g is issue 15's "silent loss": a replica that missed
//! writes must not serve stale data after the volume moved to its node).
//!
//! Every test starts its own cluster: three `tessera-replica` daemons (nodes n1, n2,
//! n3), the controller, and two nodes, n1 and n2, each with an engine-host (real
//! quorum engines, FUSE files, loop devices) and a node plugin. Volumes go through
//! the CSI calls Kubernetes makes (CreateVolume, ControllerPublishVolume,
//! NodeStageVolume, NodePublishVolume and back); the tests then do I/O on the
//! published paths the way a pod would, and kill processes with SIGKILL where the
//! item asks for it. Waiting is on progress (counters, channels, polls with
//! timeouts), never on fixed sleeps.
//!
//! Blocking I/O that may fail or hang (the point of items d and e) runs on threads
//! the test times out on, so a broken data path fails the test instead of hanging
//! it. Cleanup never depends on the test passing: the [`Cluster`] drop unmounts what
//! the test mounted, stops the engine-hosts gracefully, kills the rest and removes
//! any mount or loop device left under its directory.
//!
//! The tests run one at a time (they share two cores with six daemons each, and the
//! engines' request timeouts must not fire because of CPU starvation). They need
//! root, `/dev/fuse`, `/dev/loop-control`, `mkfs.ext4` and `mkfs.xfs`; without root
//! they fail, unless `TESSERA_SKIP_PRIVILEGED_TESTS=1` is set.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tessera_tests::privilege::privileged;

use sha2::{Digest, Sha256};
use tessera_replica_protocol::data::{ClientConfig, ReplicaDataClient};
use tessera_replica_protocol::sync::Membership;
use tessera_tests::direct_io::{direct_read, direct_write, pattern};
use tessera_tests::lifecycle::{
    self, attach, block_capability, controller_condition, create_volume, filesystem_capability,
    kubelet_paths, node_condition, Attachment,
};
use tessera_tests::random_writer::{read_back, RandomWriter, WriterBounds};
use tessera_tests::{mounts, poll_until, wait_until, Cluster, ClusterBuilder};
use tessera_tls::Identity;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// Longest a test waits for a write stream or a single I/O.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// Item d: I/O below quorum must fail within this bound.
const BELOW_QUORUM_BOUND: Duration = Duration::from_secs(30);

/// One data-path test at a time, across the test threads of this binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Replica daemons n1..n3, the controller, nodes n1 and n2.
async fn two_node_cluster() -> Cluster {
    ClusterBuilder::new()
        .nodes(["n1", "n2"])
        .start()
        .await
        .expect("cluster starts")
}

/// Nothing of `a` is left on its node: no mount at or below its staging and target
/// paths, nothing mounted below the node's state dir, no loop device backed by a
/// file below it.
fn assert_node_clean(cluster: &Cluster, a: &Attachment) {
    let state = cluster
        .node_host(&a.node_id)
        .expect("node of the attachment")
        .state_dir()
        .to_path_buf();
    for dir in [&a.staging, &a.target, &state] {
        let left = mounts::mounts_under(dir).expect("mountinfo");
        assert!(
            left.is_empty(),
            "still mounted under {}: {left:?}",
            dir.display()
        );
    }
    let loops = mounts::loop_devices_under(&state).expect("loop devices");
    assert!(
        loops.is_empty(),
        "loop devices left on {}: {loops:?}",
        a.node_id
    );
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs `f` on a thread of its own and waits at most `timeout` for it. `None` means
/// it did not finish in time (the thread is left to finish or fail on its own; the
/// cluster's teardown unblocks it).
fn run_bounded<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<(T, Duration)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let started = Instant::now();
        let out = f();
        let _ = tx.send((out, started.elapsed()));
    });
    rx.recv_timeout(timeout).ok()
}

/// A writer thread streaming `chunks` MiB of [`pattern`]`(seed + i)` chunks into
/// one file, each chunk followed by fdatasync; `progress` counts finished chunks.
struct WriteStream {
    progress: Arc<AtomicU64>,
    done: mpsc::Receiver<std::io::Result<()>>,
    path: PathBuf,
    seed: u64,
    chunks: u64,
}

impl WriteStream {
    fn start(path: PathBuf, seed: u64, chunks: u64) -> WriteStream {
        let progress = Arc::new(AtomicU64::new(0));
        let (tx, done) = mpsc::channel();
        let (counter, file_path) = (Arc::clone(&progress), path.clone());
        std::thread::spawn(move || {
            let run = || -> std::io::Result<()> {
                let mut f = fs::File::create(&file_path)?;
                for i in 0..chunks {
                    f.write_all(&pattern(seed + i, MIB))?;
                    f.sync_data()?;
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                f.sync_all()
            };
            let _ = tx.send(run());
        });
        WriteStream {
            progress,
            done,
            path,
            seed,
            chunks,
        }
    }

    fn written(&self) -> u64 {
        self.progress.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` chunks are written (fails if the stream ends first).
    fn wait_for(&self, n: u64) {
        wait_until(IO_TIMEOUT, || self.written() >= n).unwrap_or_else(|_| {
            panic!(
                "the write stream did not reach {n} MiB within {IO_TIMEOUT:?} (at {})",
                self.written()
            )
        });
    }

    fn finish(self) -> (std::io::Result<()>, PathBuf, u64, u64) {
        let result = self
            .done
            .recv_timeout(IO_TIMEOUT)
            .unwrap_or_else(|_| panic!("the write stream hung (at {} MiB)", self.written()));
        (result, self.path, self.seed, self.chunks)
    }
}

/// Reads a stream's file back with O_DIRECT (so it comes from the replicas, not the
/// page cache) and compares every chunk.
fn verify_stream_file(path: &Path, seed: u64, chunks: u64) {
    let len = fs::metadata(path).expect("stat stream file").len();
    assert_eq!(len, chunks * MIB as u64, "stream file size");
    for i in 0..chunks {
        let got = direct_read(path, i * MIB as u64, MIB)
            .unwrap_or_else(|e| panic!("reading chunk {i} of {}: {e}", path.display()));
        assert!(
            got == pattern(seed + i, MIB),
            "chunk {i} of {} differs",
            path.display()
        );
    }
}

/// Item (a), one filesystem: 200 MiB of files with known sha256 written on n1,
/// unstaged and ControllerUnpublished, published to n2 with a new epoch, staged
/// through n2's node plugin, every file verified.
async fn files_survive_a_move(cluster: &Cluster, fs_type: &str) {
    const FILES: usize = 50;
    const FILE_SIZE: usize = 4 * MIB;
    let mut controller = cluster.controller().await.expect("controller");
    let mut n1 = cluster.node_client("n1").await.expect("n1 plugin");
    let mut n2 = cluster.node_client("n2").await.expect("n2 plugin");
    let name = format!("files-{fs_type}");
    let volume = create_volume(
        &mut controller,
        &name,
        512 * MIB,
        &[("fsType", fs_type)],
        false,
    )
    .await;

    let (staging, target) = kubelet_paths(cluster, "n1", &name, false);
    let on_n1 = attach(
        &mut controller,
        &mut n1,
        &volume,
        "n1",
        filesystem_capability(fs_type),
        &staging,
        &target,
    )
    .await
    .unwrap_or_else(|e| panic!("attach on n1: {e:#}"));
    let mounted = mounts::mounts_under(&target).expect("mountinfo");
    assert!(
        mounted.iter().any(|m| m.fs_type == fs_type),
        "{} is not an {fs_type} mount: {mounted:?}",
        target.display()
    );

    let dir = target.clone();
    let seed_base = if fs_type == "xfs" { 1_000 } else { 2_000 };
    let written: Vec<(String, String)> = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for i in 0..FILES {
            let name = format!("file-{i:03}.bin");
            let data = pattern(seed_base + i as u64, FILE_SIZE);
            let mut f = fs::File::create(dir.join(&name)).expect("create file");
            f.write_all(&data).expect("write file");
            f.sync_all().expect("fsync file");
            out.push((name, sha256_hex(&data)));
        }
        out
    })
    .await
    .expect("writer task");
    let total: usize = written.len() * FILE_SIZE;
    assert_eq!(total, 200 * MIB);

    lifecycle::detach(&mut controller, &mut n1, &on_n1)
        .await
        .unwrap_or_else(|e| panic!("detach from n1: {e:#}"));
    assert_node_clean(cluster, &on_n1);

    let (staging2, target2) = kubelet_paths(cluster, "n2", &name, false);
    let on_n2 = attach(
        &mut controller,
        &mut n2,
        &volume,
        "n2",
        filesystem_capability(fs_type),
        &staging2,
        &target2,
    )
    .await
    .unwrap_or_else(|e| panic!("attach on n2: {e:#}"));
    assert!(
        on_n2.epoch() > on_n1.epoch(),
        "the move raised no epoch: {} -> {}",
        on_n1.epoch(),
        on_n2.epoch()
    );

    let dir = target2.clone();
    let expected = written.clone();
    tokio::task::spawn_blocking(move || {
        let mut names: Vec<String> = fs::read_dir(&dir)
            .expect("list files on n2")
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|n| n != "lost+found")
            .collect();
        names.sort();
        let want: Vec<String> = expected.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(names, want, "file names on n2");
        for (name, sha) in &expected {
            let mut data = Vec::with_capacity(FILE_SIZE);
            fs::File::open(dir.join(name))
                .and_then(|mut f| f.read_to_end(&mut data))
                .unwrap_or_else(|e| panic!("reading {name} on n2: {e}"));
            assert_eq!(data.len(), FILE_SIZE, "size of {name}");
            assert_eq!(&sha256_hex(&data), sha, "sha256 of {name} on n2");
        }
    })
    .await
    .expect("verifier task");

    let cond = node_condition(&mut n2, &on_n2).await;
    assert!(!cond.abnormal, "{cond:?}");
    lifecycle::detach(&mut controller, &mut n2, &on_n2)
        .await
        .unwrap_or_else(|e| panic!("detach from n2: {e:#}"));
    assert_node_clean(cluster, &on_n2);
}

/// (a) ext4 and xfs: files written on one node read back intact on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_files_verify_after_moving_to_another_node() {
    if !privileged("data-path test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let cluster = two_node_cluster().await;
    files_survive_a_move(&cluster, "ext4").await;
    files_survive_a_move(&cluster, "xfs").await;
}

/// (b) Raw block: a pattern written with O_DIRECT through the device published on
/// n1 reads back through the device published on n2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_raw_block_pattern_reads_back_on_the_other_node() {
    if !privileged("data-path test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let cluster = two_node_cluster().await;
    let mut controller = cluster.controller().await.expect("controller");
    let mut n1 = cluster.node_client("n1").await.expect("n1 plugin");
    let mut n2 = cluster.node_client("n2").await.expect("n2 plugin");
    const SIZE: usize = 256 * MIB;
    let volume = create_volume(&mut controller, "raw-block", SIZE, &[], true).await;
    let (staging, target) = kubelet_paths(&cluster, "n1", "raw-block", true);
    let on_n1 = attach(
        &mut controller,
        &mut n1,
        &volume,
        "n1",
        block_capability(),
        &staging,
        &target,
    )
    .await
    .unwrap_or_else(|e| panic!("attach on n1: {e:#}"));

    // 4 MiB at the start, 4 MiB straddling the middle, the last 4 MiB, and one
    // lone 4 KiB block: (offset, seed, len).
    let extents: Vec<(u64, u64, usize)> = vec![
        (0, 1, 4 * MIB),
        ((SIZE / 2 - 2 * MIB) as u64, 2, 4 * MIB),
        ((SIZE - 4 * MIB) as u64, 3, 4 * MIB),
        ((100 * MIB + 12 * KIB) as u64, 4, 4 * KIB),
    ];
    let device = target.clone();
    let to_write = extents.clone();
    tokio::task::spawn_blocking(move || {
        let size = fs::File::open(&device)
            .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
            .expect("device size");
        assert_eq!(size, SIZE as u64, "published device size");
        for (offset, seed, len) in to_write {
            direct_write(&device, offset, &pattern(seed, len))
                .unwrap_or_else(|e| panic!("O_DIRECT write at {offset}: {e}"));
        }
    })
    .await
    .expect("writer task");

    lifecycle::detach(&mut controller, &mut n1, &on_n1)
        .await
        .unwrap_or_else(|e| panic!("detach from n1: {e:#}"));
    assert_node_clean(&cluster, &on_n1);

    let (staging2, target2) = kubelet_paths(&cluster, "n2", "raw-block", true);
    let on_n2 = attach(
        &mut controller,
        &mut n2,
        &volume,
        "n2",
        block_capability(),
        &staging2,
        &target2,
    )
    .await
    .unwrap_or_else(|e| panic!("attach on n2: {e:#}"));
    assert!(on_n2.epoch() > on_n1.epoch());
    let device = target2.clone();
    tokio::task::spawn_blocking(move || {
        for (offset, seed, len) in extents {
            let got = direct_read(&device, offset, len)
                .unwrap_or_else(|e| panic!("O_DIRECT read at {offset} on n2: {e}"));
            assert!(got == pattern(seed, len), "data at {offset} differs on n2");
        }
        // Never written: reads as zeros.
        let hole = direct_read(&device, (50 * MIB) as u64, 64 * KIB).expect("read a hole");
        assert!(
            hole.iter().all(|b| *b == 0),
            "unwritten blocks are not zero"
        );
    })
    .await
    .expect("verifier task");

    lifecycle::detach(&mut controller, &mut n2, &on_n2)
        .await
        .unwrap_or_else(|e| panic!("detach from n2: {e:#}"));
    assert_node_clean(&cluster, &on_n2);
}

/// (c) kill -9 one of three replica daemons (the one local to the writer's node,
/// so reads must fall back too) halfway through a 64 MiB fsynced write stream: the
/// stream completes, the data verifies, and the killed replica is reported stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_one_replica_killed_during_writes() {
    if !privileged("data-path test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = two_node_cluster().await;
    let mut controller = cluster.controller().await.expect("controller");
    let mut n1 = cluster.node_client("n1").await.expect("n1 plugin");
    let volume = create_volume(&mut controller, "kill-one", 256 * MIB, &[], false).await;
    let (staging, target) = kubelet_paths(&cluster, "n1", "kill-one", false);
    let a = attach(
        &mut controller,
        &mut n1,
        &volume,
        "n1",
        filesystem_capability("ext4"),
        &staging,
        &target,
    )
    .await
    .unwrap_or_else(|e| panic!("attach: {e:#}"));
    let before = node_condition(&mut n1, &a).await;
    assert!(!before.abnormal, "{before:?}");

    const CHUNKS: u64 = 64;
    let stream = WriteStream::start(target.join("stream.bin"), 7_000, CHUNKS);
    stream.wait_for(CHUNKS / 2);
    let victim = cluster.replica(0).node_id().to_owned();
    assert_eq!(victim, "n1", "the killed replica is the writer's local one");
    cluster.kill_replica(0).expect("kill -9 replica n1");
    let at_kill = stream.written();
    let (result, path, seed, chunks) = stream.finish();
    result.unwrap_or_else(|e| {
        panic!("the write stream failed after the kill (at {at_kill} MiB): {e}")
    });
    assert!(
        at_kill < CHUNKS,
        "the kill came after the stream had finished"
    );

    let file = path.clone();
    tokio::task::spawn_blocking(move || verify_stream_file(&file, seed, chunks))
        .await
        .expect("verifier task");

    let after = node_condition(&mut n1, &a).await;
    assert!(
        after.abnormal,
        "the killed replica is not reported: {after:?}"
    );
    assert!(
        after.message.contains(&victim) && after.message.contains("stale"),
        "the condition does not name the stale replica {victim}: {after:?}"
    );
    assert!(
        !after.message.contains("below quorum"),
        "one replica down must not be below quorum: {after:?}"
    );

    // Two of three replicas still make a quorum: unstaging flushes and detaches.
    lifecycle::detach(&mut controller, &mut n1, &a)
        .await
        .unwrap_or_else(|e| panic!("detach: {e:#}"));
    assert_node_clean(&cluster, &a);
}

/// (d) kill -9 two of three replica daemons: a direct write and a direct read on
/// the block device fail within a bound instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_two_replicas_killed_io_fails_in_bounded_time() {
    if !privileged("data-path test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = two_node_cluster().await;
    let mut controller = cluster.controller().await.expect("controller");
    let mut n1 = cluster.node_client("n1").await.expect("n1 plugin");
    let volume = create_volume(&mut controller, "kill-two", 64 * MIB, &[], true).await;
    let (staging, target) = kubelet_paths(&cluster, "n1", "kill-two", true);
    let a = attach(
        &mut controller,
        &mut n1,
        &volume,
        "n1",
        block_capability(),
        &staging,
        &target,
    )
    .await
    .unwrap_or_else(|e| panic!("attach: {e:#}"));
    let device = target.clone();
    let (first, _) = run_bounded(IO_TIMEOUT, move || {
        direct_write(&device, 0, &pattern(1, MIB))
    })
    .expect("a write with all replicas up finishes");
    first.expect("a write with all replicas up succeeds");

    cluster.kill_replica(1).expect("kill -9 replica n2");
    cluster.kill_replica(2).expect("kill -9 replica n3");

    let device = target.clone();
    let (write, took) = run_bounded(BELOW_QUORUM_BOUND * 2, move || {
        direct_write(&device, MIB as u64, &pattern(2, MIB))
    })
    .expect("the write below quorum hung");
    let err = write.expect_err("a write with one of three replicas up succeeded");
    assert!(
        took <= BELOW_QUORUM_BOUND,
        "the failing write took {took:?}"
    );
    eprintln!("write below quorum failed after {took:?}: {err}");
    assert_eq!(err.raw_os_error(), Some(nix::libc::EIO), "{err}");

    let device = target.clone();
    let (read, took) = run_bounded(BELOW_QUORUM_BOUND * 2, move || direct_read(&device, 0, MIB))
        .expect("the read below quorum hung");
    let err = read.expect_err("a read with one of three replicas up succeeded");
    assert!(took <= BELOW_QUORUM_BOUND, "the failing read took {took:?}");
    assert_eq!(err.raw_os_error(), Some(nix::libc::EIO), "{err}");

    let cond = node_condition(&mut n1, &a).await;
    assert!(
        cond.abnormal && cond.message.contains("below quorum"),
        "{cond:?}"
    );
    // Below quorum the volume can never flush again; unstaging must still succeed
    // (the kubelet would otherwise retry forever) and leave nothing behind.
    // (ControllerUnpublish needs a majority of the records, so only the node side.)
    lifecycle::unpublish_and_unstage(&mut n1, &a)
        .await
        .unwrap_or_else(|e| panic!("unstage below quorum: {e:#}"));
    assert_node_clean(&cluster, &a);
}

/// (e) An engine whose epoch is old gets its writes refused once the volume was
/// published elsewhere; what the new owner wrote stays intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_old_epoch_writes_are_refused_after_a_move() {
    if !privileged("data-path test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let cluster = two_node_cluster().await;
    let mut controller = cluster.controller().await.expect("controller");
    let mut n1 = cluster.node_client("n1").await.expect("n1 plugin");
    let mut n2 = cluster.node_client("n2").await.expect("n2 plugin");
    let volume = create_volume(&mut controller, "fenced", 64 * MIB, &[], true).await;
    let (staging, target) = kubelet_paths(&cluster, "n1", "fenced", true);
    let on_n1 = attach(
        &mut controller,
        &mut n1,
        &volume,
        "n1",
        block_capability(),
        &staging,
        &target,
    )
    .await
    .unwrap_or_else(|e| panic!("attach on n1: {e:#}"));
    const A: u64 = 0;
    const B: u64 = 8 * MIB as u64;
    let dev1 = target.clone();
    tokio::task::spawn_blocking(move || {
        direct_write(&dev1, A, &pattern(10, MIB)).expect("n1 writes A before the move");
        direct_write(&dev1, B, &pattern(11, MIB)).expect("n1 writes B before the move");
    })
    .await
    .expect("writer task");

    // The node never unstages (it is unreachable, say): the CO force-detaches and
    // publishes the volume to n2, which raises the epoch.
    lifecycle::controller_unpublish(&mut controller, &on_n1)
        .await
        .unwrap_or_else(|e| panic!("ControllerUnpublish from n1: {e:#}"));
    let (staging2, target2) = kubelet_paths(&cluster, "n2", "fenced", true);
    let on_n2 = attach(
        &mut controller,
        &mut n2,
        &volume,
        "n2",
        block_capability(),
        &staging2,
        &target2,
    )
    .await
    .unwrap_or_else(|e| panic!("attach on n2: {e:#}"));
    assert!(on_n2.epoch() > on_n1.epoch());
    let dev2 = target2.clone();
    tokio::task::spawn_blocking(move || {
        direct_write(&dev2, A, &pattern(20, MIB)).expect("n2 writes A");
    })
    .await
    .expect("writer task");

    // n1 still has the device and tries to write both regions.
    for (offset, seed) in [(A, 30), (B, 31)] {
        let dev1 = target.clone();
        let (result, took) = run_bounded(IO_TIMEOUT, move || {
            direct_write(&dev1, offset, &pattern(seed, MIB))
        })
        .expect("the fenced write hung");
        let err = result.expect_err("a write with the old epoch succeeded");
        assert_eq!(
            err.raw_os_error(),
            Some(nix::libc::EIO),
            "{err} after {took:?}"
        );
    }
    let cond = node_condition(&mut n1, &on_n1).await;
    assert!(cond.abnormal && cond.message.contains("fenced"), "{cond:?}");

    let dev2 = target2.clone();
    tokio::task::spawn_blocking(move || {
        let a = direct_read(&dev2, A, MIB).expect("n2 reads A");
        assert!(a == pattern(20, MIB), "n2's data at A was overwritten");
        let b = direct_read(&dev2, B, MIB).expect("n2 reads B");
        assert!(
            b == pattern(11, MIB),
            "the data n1 wrote before the move is lost"
        );
    })
    .await
    .expect("verifier task");

    // The fenced node can still clean up (nothing of it is durable any more anyway).
    lifecycle::unpublish_and_unstage(&mut n1, &on_n1)
        .await
        .unwrap_or_else(|e| panic!("unstage on the fenced node: {e:#}"));
    assert_node_clean(&cluster, &on_n1);
    lifecycle::detach(&mut controller, &mut n2, &on_n2)
        .await
        .unwrap_or_else(|e| panic!("detach from n2: {e:#}"));
    assert_node_clean(&cluster, &on_n2);
}

/// (f) kill -9 the node plugin during a write stream: the stream sees no error, a
/// new plugin instance adopts the running engine, and unpublish + unstage through it
/// leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_node_plugin_killed_during_writes() {
    if !privileged("data-path test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = two_node_cluster().await;
    let mut controller = cluster.controller().await.expect("controller");
    let mut n1 = cluster.node_client("n1").await.expect("n1 plugin");
    let volume = create_volume(&mut controller, "plugin-kill", 256 * MIB, &[], false).await;
    let (staging, target) = kubelet_paths(&cluster, "n1", "plugin-kill", false);
    let a = attach(
        &mut controller,
        &mut n1,
        &volume,
        "n1",
        filesystem_capability("ext4"),
        &staging,
        &target,
    )
    .await
    .unwrap_or_else(|e| panic!("attach: {e:#}"));
    drop(n1);
    let host = cluster.node_host("n1").expect("n1");
    let (engine_host_pid, old_plugin) = (host.engine_host_pid(), host.plugin_pid());

    const CHUNKS: u64 = 64;
    let stream = WriteStream::start(target.join("stream.bin"), 9_000, CHUNKS);
    stream.wait_for(CHUNKS / 2);
    cluster
        .kill_node_plugin("n1")
        .expect("kill -9 the node plugin");
    let at_kill = stream.written();
    // Writes go on while no plugin runs at all.
    stream.wait_for((at_kill + 4).min(CHUNKS));
    cluster
        .start_node_plugin("n1")
        .await
        .expect("a new node plugin starts");
    let host = cluster.node_host("n1").expect("n1");
    assert_ne!(host.plugin_pid(), old_plugin, "a new plugin process");
    assert_eq!(
        host.engine_host_pid(),
        engine_host_pid,
        "the engine-host kept running"
    );

    let (result, path, seed, chunks) = stream.finish();
    result
        .unwrap_or_else(|e| panic!("the write stream saw an error (killed at {at_kill} MiB): {e}"));
    let file = path.clone();
    tokio::task::spawn_blocking(move || verify_stream_file(&file, seed, chunks))
        .await
        .expect("verifier task");

    let mut n1 = cluster.node_client("n1").await.expect("new n1 plugin");
    let cond = node_condition(&mut n1, &a).await;
    assert!(
        !cond.abnormal,
        "the adopted engine is not healthy: {cond:?}"
    );
    lifecycle::detach(&mut controller, &mut n1, &a)
        .await
        .unwrap_or_else(|e| panic!("detach through the new plugin: {e:#}"));
    assert_node_clean(&cluster, &a);
    assert!(!a.target.exists(), "NodeUnpublish left the target path");
}

/// Item g: random writes before the kill of n2's replica daemon.
const G_BEFORE_KILL: u64 = 1_000;
/// Item g: random writes after it (all of them missed by n2's replica).
const G_AFTER_KILL: u64 = 4_000;
/// Item g: the writer's fdatasync cadence.
const G_SYNC_EVERY: u64 = 16;
/// Item g: the writer gives up (an error) after this long or this many writes.
const G_WRITER_LIMIT: Duration = Duration::from_secs(90);
const G_MAX_WRITES: u64 = 50_000;
/// The bounds of test (g).
const G_BOUNDS: WriterBounds = WriterBounds {
    time: G_WRITER_LIMIT,
    writes: G_MAX_WRITES,
    after_kill: G_AFTER_KILL,
    sync_every: G_SYNC_EVERY,
    read_every: 0,
};
/// Block numbers named in a failure message, per kind.
const FIRST_FEW: usize = 8;

/// Replica `index`'s in-sync record of `volume_id`, asked over the data plane as a
/// client of `epoch` (the volume's current one, so nothing is raised or fenced),
/// with the controller's certificate.
async fn in_sync_record(
    cluster: &Cluster,
    index: usize,
    volume_id: &str,
    epoch: u64,
) -> Result<Membership, String> {
    let replica = cluster.replica(index);
    let ask = async {
        let config = ClientConfig {
            transport: cluster.transport(Identity::Controller),
            ..ClientConfig::default()
        };
        let client = ReplicaDataClient::connect_with(replica.data_addr(), volume_id, epoch, config)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        client
            .membership()
            .await
            .map_err(|e| format!("GET_MEMBERSHIP: {e}"))
    };
    tokio::time::timeout(IO_TIMEOUT, ask)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {IO_TIMEOUT:?}")))
        .map_err(|e| format!("in-sync record on replica {}: {e}", replica.node_id()))
}

/// (g) Issue 15, "silent loss", as reported: RF=3 raw block volume on n1, random
/// 4 KiB O_DIRECT writes with fdatasync every 16; kill -9 n2's replica daemon and
/// write thousands more (no error: two of three are a quorum); restart it on its
/// data, move the volume to n2, where that replica is the local, read-preferred one.
/// Every block must read back as its last durable write: the new engine must bring
/// the replica in sync before serving, and declare it in sync again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_replica_that_missed_writes_serves_none_stale_after_the_move() {
    if !privileged("data-path test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = two_node_cluster().await;
    let mut controller = cluster.controller().await.expect("controller");
    let mut n1 = cluster.node_client("n1").await.expect("n1 plugin");
    let mut n2 = cluster.node_client("n2").await.expect("n2 plugin");
    let name = "missed-writes";
    let volume = create_volume(
        &mut controller,
        name,
        64 * MIB,
        &[("replicationFactor", "3")],
        true,
    )
    .await;
    let victim = cluster.replica_index("n2").expect("a replica daemon on n2");
    let (staging, target) = kubelet_paths(&cluster, "n1", name, true);
    let on_n1 = attach(
        &mut controller,
        &mut n1,
        &volume,
        "n1",
        block_capability(),
        &staging,
        &target,
    )
    .await
    .unwrap_or_else(|e| panic!("attach on n1: {e:#}"));
    let replicas = on_n1
        .publish_context
        .get("replicas")
        .cloned()
        .unwrap_or_default();
    assert!(
        replicas.split(',').any(|r| r.starts_with("n2=")),
        "n2's replica is not in the volume's replica set: {replicas:?}"
    );

    let writer = RandomWriter::start(target.clone(), 0x15_15_15, G_BOUNDS);
    writer.wait_for(G_BEFORE_KILL).await;
    cluster.kill_replica(victim).expect("kill -9 replica n2");
    let at_kill = writer.written();
    writer.kill_done();
    let log = writer
        .finish()
        .await
        .unwrap_or_else(|e| panic!("the random writer failed (n2 killed at write {at_kill}): {e}"));
    let expected = log.last_durable;
    let missed = expected.values().filter(|&&w| w > log.seen_kill_at).count();
    // Blocks n2's replica holds an older write of (the rest of `missed` it lacks).
    let rewritten = expected
        .iter()
        .filter(|(b, &w)| w > log.seen_kill_at && log.first_write[*b] <= log.seen_kill_at)
        .count();
    eprintln!(
        "random writer: {} writes ({} syncs) in {:?}, n2 killed at write {at_kill} (seen at {}), \
         {} blocks touched, {missed} of them last written after the kill ({rewritten} of \
         those also before it)",
        log.writes,
        log.syncs,
        log.elapsed,
        log.seen_kill_at,
        expected.len(),
    );
    assert!(
        missed as u64 >= G_AFTER_KILL / 2,
        "only {missed} blocks were last written after the kill: the scenario tests nothing"
    );
    let cond = node_condition(&mut n1, &on_n1).await;
    assert!(
        cond.abnormal && cond.message.contains("n2") && !cond.message.contains("below quorum"),
        "n1's engine does not report n2's replica stale after the kill: {cond:?}"
    );

    cluster
        .start_replica(victim)
        .await
        .expect("n2's replica daemon restarts on its data");
    lifecycle::detach(&mut controller, &mut n1, &on_n1)
        .await
        .unwrap_or_else(|e| panic!("detach from n1: {e:#}"));
    assert_node_clean(&cluster, &on_n1);
    for i in 0..cluster.replicas().len() {
        let record = in_sync_record(&cluster, i, &volume.volume_id, on_n1.epoch()).await;
        eprintln!(
            "before the move, replica {}: {record:?}",
            cluster.replica(i).node_id()
        );
    }

    let (staging2, target2) = kubelet_paths(&cluster, "n2", name, true);
    let on_n2 = attach(
        &mut controller,
        &mut n2,
        &volume,
        "n2",
        block_capability(),
        &staging2,
        &target2,
    )
    .await
    .unwrap_or_else(|e| panic!("attach on n2: {e:#}"));
    assert!(
        on_n2.epoch() > on_n1.epoch(),
        "the move raised no epoch: {} -> {}",
        on_n1.epoch(),
        on_n2.epoch()
    );

    let device = target2.clone();
    let want = expected.clone();
    let (got, took) = run_bounded(IO_TIMEOUT, move || read_back(&device, &want))
        .unwrap_or_else(|| panic!("reading the blocks back on n2 hung ({IO_TIMEOUT:?})"));
    let got = got.unwrap_or_else(|e| panic!("reading back on n2: {e}"));
    eprintln!(
        "read back on n2 in {took:?}: {} intact, {} zeros, {} older, {} other",
        got.intact,
        got.zeros.len(),
        got.older.len(),
        got.other.len()
    );
    let first = |v: &[u64]| v.iter().take(FIRST_FEW).copied().collect::<Vec<_>>();
    assert!(
        got.zeros.is_empty() && got.older.is_empty() && got.other.is_empty(),
        "{} of {} blocks do not hold their last durable write on n2: {} read as zeros \
         (first: {:?}), {} hold an older write (first: {:?}), {} hold something else \
         (first: {:?}); {missed} blocks were last written after n2's replica was killed",
        got.zeros.len() + got.older.len() + got.other.len(),
        expected.len(),
        got.zeros.len(),
        first(&got.zeros),
        got.older.len(),
        first(&got.older),
        got.other.len(),
        first(&got.other),
    );
    assert_eq!(got.intact, expected.len() as u64, "blocks read back intact");

    // The restarted replica is in sync again: n2's engine reports no stale replica,
    // and every replica holds an in-sync record of the new epoch naming all three.
    let cond = node_condition(&mut n2, &on_n2).await;
    assert!(
        !cond.abnormal,
        "n2's engine does not have every replica in sync: {cond:?}"
    );
    let all: Vec<String> = cluster
        .replicas()
        .iter()
        .map(|r| r.node_id().to_owned())
        .collect();
    for i in 0..cluster.replicas().len() {
        let node = cluster.replica(i).node_id().to_owned();
        let record = in_sync_record(&cluster, i, &volume.volume_id, on_n2.epoch())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            record.epoch == on_n2.epoch() && record.members == all,
            "replica {node}'s in-sync record is not n2's engine's declaration of every \
             replica (epoch {}, members {all:?}): {record:?}",
            on_n2.epoch()
        );
    }

    lifecycle::detach(&mut controller, &mut n2, &on_n2)
        .await
        .unwrap_or_else(|e| panic!("detach from n2: {e:#}"));
    assert_node_clean(&cluster, &on_n2);
}

/// How long a restarted replica daemon may take to be caught up and readmitted.
const H_BACK_IN_SYNC: Duration = Duration::from_secs(60);

/// (h) A rolling restart: each of the three replica daemons in turn is killed with
/// SIGKILL under a random writer (fdatasync every 16 writes) and started again on
/// its data; the next one goes down only once the volume reports every replica in
/// sync again. The engine reconnects and resyncs each one online, so the writer sees
/// no error although two of the three daemons have been down by the end, and every
/// durable block reads back current on the same engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_rolling_restart_of_every_replica_daemon_under_writes() {
    if !privileged("data-path test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = two_node_cluster().await;
    let mut controller = cluster.controller().await.expect("controller");
    let mut n1 = cluster.node_client("n1").await.expect("n1 plugin");
    let name = "rolling-restart";
    let volume = create_volume(
        &mut controller,
        name,
        64 * MIB,
        &[("replicationFactor", "3")],
        true,
    )
    .await;
    let (staging, target) = kubelet_paths(&cluster, "n1", name, true);
    let a = attach(
        &mut controller,
        &mut n1,
        &volume,
        "n1",
        block_capability(),
        &staging,
        &target,
    )
    .await
    .unwrap_or_else(|e| panic!("attach on n1: {e:#}"));
    let bounds = WriterBounds {
        time: Duration::from_secs(300),
        writes: 2_000_000,
        ..G_BOUNDS
    };
    let writer = RandomWriter::start(target.clone(), 0x4_4_4, bounds);
    writer.wait_for(500).await;
    for victim in 0..cluster.replicas().len() {
        let node = cluster.replica(victim).node_id().to_owned();
        cluster
            .kill_replica(victim)
            .expect("kill -9 a replica daemon");
        let killed_at = writer.written();
        // The writer goes on with two of three; the volume reports the dead one.
        writer.wait_for(killed_at + 200).await;
        let down = node_condition(&mut n1, &a).await;
        assert!(
            down.abnormal && down.message.contains(&node),
            "replica {node} killed, the condition does not say so: {down:?}"
        );
        let ctl = controller_condition(&mut controller, &volume.volume_id).await;
        assert!(
            !ctl.abnormal && ctl.message.starts_with("degraded: 2 of 3"),
            "replica {node} killed, the controller's condition does not say so: {ctl:?}"
        );
        let restarted = Instant::now();
        cluster
            .start_replica(victim)
            .await
            .expect("the replica daemon restarts on its data");
        let back = poll_until(H_BACK_IN_SYNC, || {
            let (mut node, a) = (n1.clone(), &a);
            async move { (!node_condition(&mut node, a).await.abnormal).then_some(()) }
        })
        .await;
        let last = node_condition(&mut n1, &a).await;
        assert!(
            back.is_ok(),
            "replica {node} not back in sync within {H_BACK_IN_SYNC:?} of its restart: {last:?}"
        );
        eprintln!(
            "replica {node}: killed at write {killed_at}, back in sync {:?} after its restart \
             (writer at {})",
            restarted.elapsed(),
            writer.written()
        );
        // The controller sees it too, from the in-sync record the engine declares.
        let all_in_sync = "all 3 replicas reachable and in sync";
        let seen = poll_until(H_BACK_IN_SYNC, || {
            let (mut ctl, id) = (controller.clone(), volume.volume_id.clone());
            async move {
                let c = controller_condition(&mut ctl, &id).await;
                (c.message == all_in_sync).then_some(())
            }
        })
        .await;
        let last = controller_condition(&mut controller, &volume.volume_id).await;
        assert!(
            seen.is_ok(),
            "the controller does not report every replica in sync after {node}'s resync: {last:?}"
        );
    }
    writer.kill_done();
    let log = writer
        .finish()
        .await
        .unwrap_or_else(|e| panic!("the random writer failed during the rolling restart: {e}"));
    eprintln!(
        "random writer: {} writes ({} syncs) in {:?}, {} blocks durable",
        log.writes,
        log.syncs,
        log.elapsed,
        log.last_durable.len()
    );
    let expected = log.last_durable;
    let device = target.clone();
    let read = tokio::task::spawn_blocking(move || read_back(&device, &expected))
        .await
        .expect("reader task")
        .unwrap_or_else(|e| panic!("reading back: {e}"));
    read.assert_all_current("after the rolling restart");
    lifecycle::detach(&mut controller, &mut n1, &a)
        .await
        .unwrap_or_else(|e| panic!("detach: {e:#}"));
    assert_node_clean(&cluster, &a);
}
