//! End-to-end tests of the CSI Node service and the engine-host, as real processes.
//!
//! Each test starts a cluster of three `tessera-replica` daemons and the controller
//! (`tessera_tests::ClusterBuilder`, without its node), then `tessera-node
//! engine-host` and `tessera-node plugin` in a directory of its own, and talks to
//! them over their unix sockets, the way the kubelet and the node plugin do. Volumes
//! are created and published through the controller, so every publish_context is a
//! real one and every attached volume is a quorum engine on the replicas. The replica
//! ports use mutual TLS with the cluster's own CA: the harness gives the replicas and
//! the controller their certificates, the engine-host here gets the node certificate
//! of the same cluster (`Cluster::tls`).
//!
//! They need root, `/dev/fuse`, `/dev/loop-control`, `blkid`, `mkfs.ext4`,
//! `mkfs.xfs` and the workspace's binaries (`cargo build --workspace`). Without root
//! they fail with a message saying so, unless `TESSERA_SKIP_PRIVILEGED_TESTS=1` is
//! set.
//!
//! Cleanup never depends on the test passing: [`Env`]'s drop unmounts everything
//! under the test directory, stops the engine-host (SIGTERM, then SIGKILL), kills
//! the plugin, detaches leftover loop devices and removes the directory; the
//! cluster's own drop then stops the replicas and the controller.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tessera_tests::csi::ControllerClient;
use tessera_tests::fixtures::{create_request, publish_request, unpublish_request};
use tessera_tests::privilege::privileged;

use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tessera_csi_proto::unix_channel;
use tessera_csi_proto::v1::node_client::NodeClient;
use tessera_csi_proto::v1::volume_capability::access_mode::Mode;
use tessera_csi_proto::v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tessera_csi_proto::v1::volume_usage::Unit;
use tessera_csi_proto::v1::{
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodeStageVolumeRequest, NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, VolumeCapability,
};
use tessera_node::engine_host::proto::engine_host_client::EngineHostClient;
use tessera_node::engine_host::proto::{AttachRequest, DetachRequest, ListRequest, StatusRequest};
use tessera_node::frontend::cleanup::{parse_mountinfo, read_mountinfo};
use tessera_node::frontend::{cleanup_stale, list_bound};
use tessera_replica_protocol::volume_params::KEY_FS_TYPE;
use tessera_tls::Identity;
use tonic::transport::Channel;
use tonic::Code;

const MIB: u64 = 1 << 20;
/// The smallest xfs volume (mkfs.xfs refuses less).
const XFS_VOLUME_SIZE: u64 = 300 * MIB;
/// Volumes whose size does not matter to the test: above ext4's minimum, small
/// enough that mkfs and teardown stay quick.
const SMALL_VOLUME_SIZE: u64 = 16 * MIB;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A child process in its own process group, killed (group-wide) on drop.
struct Proc {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, args: &[&str], log: PathBuf) -> Proc {
        let out = fs::File::create(&log).expect("create log file");
        let err = out.try_clone().expect("clone log fd");
        let child = Command::new(env!("CARGO_BIN_EXE_tessera-node"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            name,
            child: Some(child),
            log,
        }
    }

    fn pid(&self) -> Option<Pid> {
        self.child
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .map(Pid::from_raw)
    }

    /// Sends `signal` to the group and waits up to `timeout` for the process to end;
    /// kills it if it does not. Returns whether it exited by itself.
    fn stop(&mut self, signal: Signal, timeout: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        if let Some(pid) = i32::try_from(child.id()).ok().map(Pid::from_raw) {
            let _ = killpg(pid, signal);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return true,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => break,
            }
        }
        if let Some(pid) = i32::try_from(child.id()).ok().map(Pid::from_raw) {
            let _ = killpg(pid, Signal::SIGKILL);
        }
        let _ = child.wait();
        false
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(30);
        format!(
            "---- {} ({})\n{}",
            self.name,
            self.log.display(),
            lines[start..].join("\n")
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Signal::SIGKILL, STOP_TIMEOUT);
    }
}

async fn connect_unix(path: &Path) -> Result<Channel, tonic::transport::Error> {
    unix_channel::connect_unix(
        unix_channel::unix_endpoint().connect_timeout(Duration::from_secs(5)),
        path,
    )
    .await
}

async fn wait_for_socket(path: &Path) -> Channel {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if path.exists() {
            if let Ok(c) = connect_unix(path).await {
                return c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} did not answer within {STARTUP_TIMEOUT:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One test's world: replica daemons and a controller, and a directory with an
/// engine-host and a node plugin on the node of the first replica daemon.
struct Env {
    dir: PathBuf,
    node_id: String,
    plugin: Option<Proc>,
    engine_host: Option<Proc>,
    plugin_socket: PathBuf,
    host_socket: PathBuf,
    /// Dropped after [`Env`]'s own drop: the engine-host flushes its engines to
    /// these replicas when it stops.
    cluster: tessera_tests::Cluster,
}

impl Env {
    async fn start(tag: &str) -> Env {
        let cluster = tessera_tests::ClusterBuilder::new()
            .node(false)
            .start()
            .await
            .expect("start replicas and controller");
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "tessera-node-{tag}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(dir.join("kubelet")).expect("create test dir");
        let mut env = Env {
            plugin_socket: dir.join("csi.sock"),
            host_socket: dir.join("state").join("engine-host.sock"),
            dir,
            node_id: cluster.replica(0).node_id().to_owned(),
            plugin: None,
            engine_host: None,
            cluster,
        };
        env.start_engine_host().await;
        env.start_plugin().await;
        env
    }

    async fn start_engine_host(&mut self) {
        let state = self.dir.join("state");
        let log = self.dir.join(format!(
            "engine-host-{}.log",
            COUNTER_LOGS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_file(&self.host_socket);
        // The node certificate of the cluster's CA (the flags a harness engine-host
        // gets).
        let tls: Vec<String> = self
            .cluster
            .tls()
            .daemon_args(Identity::Node)
            .into_iter()
            .map(|a| a.into_string().expect("test paths are UTF-8"))
            .collect();
        let mut args = vec!["engine-host", "--state-dir", path_str(&state)];
        args.extend(tls.iter().map(String::as_str));
        self.engine_host = Some(Proc::spawn("engine-host", &args, log));
        wait_for_socket(&self.host_socket).await;
    }

    async fn start_plugin(&mut self) {
        let log = self.dir.join(format!(
            "plugin-{}.log",
            COUNTER_LOGS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_file(&self.plugin_socket);
        let endpoint = format!("unix://{}", self.plugin_socket.display());
        self.plugin = Some(Proc::spawn(
            "plugin",
            &[
                "plugin",
                "--endpoint",
                &endpoint,
                "--node-id",
                &self.node_id,
                "--state-dir",
                path_str(&self.dir.join("state")),
            ],
            log,
        ));
        wait_for_socket(&self.plugin_socket).await;
    }

    async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(wait_for_socket(&self.plugin_socket).await)
    }

    async fn host(&self) -> EngineHostClient<Channel> {
        EngineHostClient::new(wait_for_socket(&self.host_socket).await)
    }

    async fn controller(&self) -> ControllerClient {
        self.cluster.controller().await.expect("controller client")
    }

    /// Creates volume `name` through the controller with `cap` (which decides its
    /// filesystem, or raw block) and publishes it to this node.
    async fn volume(&self, name: &str, size: u64, cap: VolumeCapability) -> Vol {
        let mut controller = self.controller().await;
        let mut req = create_request(name, size as i64);
        req.volume_capabilities = vec![cap.clone()];
        let created = controller
            .create_volume(req)
            .await
            .unwrap_or_else(|s| panic!("create volume {name}: {s}"))
            .into_inner()
            .volume
            .expect("volume");
        let mut publish = publish_request(&created.volume_id, &self.node_id);
        publish.volume_capability = Some(cap.clone());
        let publish_context = controller
            .controller_publish_volume(publish)
            .await
            .unwrap_or_else(|s| panic!("controller publish {name}: {s}"))
            .into_inner()
            .publish_context;
        assert_eq!(created.capacity_bytes, size as i64, "{created:?}");
        Vol {
            id: created.volume_id,
            size,
            cap,
            publish_context,
            volume_context: created.volume_context,
        }
    }

    /// Moves `vol` to a new epoch the way a CO does: ControllerUnpublish, then
    /// ControllerPublish to the same node again.
    async fn new_epoch(&self, vol: &mut Vol) {
        let mut controller = self.controller().await;
        controller
            .controller_unpublish_volume(unpublish_request(&vol.id, &self.node_id))
            .await
            .expect("controller unpublish");
        let mut publish = publish_request(&vol.id, &self.node_id);
        publish.volume_capability = Some(vol.cap.clone());
        let ctx = controller
            .controller_publish_volume(publish)
            .await
            .expect("controller publish again")
            .into_inner()
            .publish_context;
        assert!(
            epoch_of(&ctx) > epoch_of(&vol.publish_context),
            "{:?} -> {ctx:?}",
            vol.publish_context
        );
        vol.publish_context = ctx;
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join("kubelet").join(rel)
    }

    fn logs(&self) -> String {
        [&self.engine_host, &self.plugin]
            .into_iter()
            .flatten()
            .map(Proc::log_tail)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

static COUNTER_LOGS: AtomicU64 = AtomicU64::new(0);

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Every mountpoint at or below `dir`, deepest first.
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut below: Vec<PathBuf> = parse_mountinfo(&text)
        .into_iter()
        .map(|m| m.mountpoint)
        .filter(|m| m.starts_with(dir))
        .collect();
    below.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    below
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        // Kubelet-side mounts first, so the engine-host can detach its devices.
        for m in mounts_below(&self.dir.join("kubelet")) {
            let _ = umount2(&m, MntFlags::MNT_DETACH);
        }
        if let Some(mut p) = self.engine_host.take() {
            p.stop(Signal::SIGTERM, STOP_TIMEOUT);
        }
        if let Some(mut p) = self.plugin.take() {
            p.stop(Signal::SIGKILL, STOP_TIMEOUT);
        }
        for m in mounts_below(&self.dir) {
            let _ = umount2(&m, MntFlags::MNT_DETACH);
        }
        if let Err(e) = cleanup_stale(&self.dir) {
            eprintln!("cleanup of {}: {e}", self.dir.display());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn mount_cap(fs: &str, flags: &[&str]) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.to_owned(),
            mount_flags: flags.iter().map(|s| (*s).to_owned()).collect(),
            volume_mount_group: String::new(),
        })),
    }
}

fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

/// A volume created through the controller and published to the test's node.
struct Vol {
    id: String,
    size: u64,
    /// The capability it was created and published with.
    cap: VolumeCapability,
    /// What ControllerPublishVolume returned: epoch, replicas, sizeBytes.
    publish_context: HashMap<String, String>,
    /// The volume's normalised parameters, which the CO passes on to the node.
    volume_context: HashMap<String, String>,
}

fn epoch_of(publish_context: &HashMap<String, String>) -> u64 {
    publish_context
        .get("epoch")
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("no epoch in {publish_context:?}"))
}

fn stage_req(vol: &Vol, staging: &Path, cap: VolumeCapability) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: vol.id.clone(),
        publish_context: vol.publish_context.clone(),
        staging_target_path: path_str(staging).to_owned(),
        volume_capability: Some(cap),
        secrets: HashMap::new(),
        volume_context: vol.volume_context.clone(),
    }
}

fn publish_req(
    vol: &Vol,
    staging: &Path,
    target: &Path,
    cap: VolumeCapability,
    readonly: bool,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: vol.id.clone(),
        publish_context: vol.publish_context.clone(),
        staging_target_path: path_str(staging).to_owned(),
        target_path: path_str(target).to_owned(),
        volume_capability: Some(cap),
        readonly,
        secrets: HashMap::new(),
        volume_context: vol.volume_context.clone(),
    }
}

/// Reads `len` bytes at `offset` of `path` with O_DIRECT, so they come from the
/// device (and so from the replicas), not from the page cache.
fn read_direct(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} with O_DIRECT: {e}", path.display()));
    let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
    let mut buf = AlignedBuf::new(layout);
    f.read_exact_at(buf.as_mut(), offset)
        .unwrap_or_else(|e| panic!("direct read of {}: {e}", path.display()));
    buf.as_mut().to_vec()
}

async fn unpublish(node: &mut NodeClient<Channel>, volume_id: &str, target: &Path) {
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        target_path: path_str(target).to_owned(),
    })
    .await
    .unwrap_or_else(|s| panic!("unpublish {}: {s}", target.display()));
}

async fn unstage(node: &mut NodeClient<Channel>, volume_id: &str, staging: &Path) {
    node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: volume_id.to_owned(),
        staging_target_path: path_str(staging).to_owned(),
    })
    .await
    .unwrap_or_else(|s| panic!("unstage {}: {s}", staging.display()));
}

async fn stats(
    node: &mut NodeClient<Channel>,
    volume_id: &str,
    path: &Path,
) -> Result<NodeGetVolumeStatsResponse, tonic::Status> {
    node.node_get_volume_stats(NodeGetVolumeStatsRequest {
        volume_id: volume_id.to_owned(),
        volume_path: path_str(path).to_owned(),
        staging_target_path: String::new(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Filesystem type mounted at `path` (topmost), per the mount table.
fn fs_type_at(path: &Path) -> Option<String> {
    read_mountinfo()
        .expect("read mountinfo")
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == path)
        .map(|m| m.fs_type)
}

fn mount_count(path: &Path) -> usize {
    read_mountinfo()
        .expect("read mountinfo")
        .into_iter()
        .filter(|m| m.mountpoint == path)
        .count()
}

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

/// Stage, publish rw and ro, write, stats, idempotent teardown, restage without
/// reformat at a new epoch, and refusal to stage as another filesystem — for one
/// filesystem.
async fn filesystem_lifecycle(fs_name: &str, size: u64) {
    let env = Env::start(fs_name).await;
    let mut node = env.node().await;
    let cap = mount_cap(fs_name, &["noatime"]);
    let mut vol = env
        .volume(&format!("lifecycle-{fs_name}"), size, cap.clone())
        .await;
    let staging = env.path("staging");
    let rw = env.path("pod-rw");
    let ro = env.path("pod-ro");
    fs::create_dir_all(&staging).expect("staging dir");

    for attempt in 0..2 {
        node.node_stage_volume(stage_req(&vol, &staging, cap.clone()))
            .await
            .unwrap_or_else(|s| panic!("stage attempt {attempt}: {s}\n{}", env.logs()));
    }
    assert_eq!(fs_type_at(&staging).as_deref(), Some(fs_name));
    assert_eq!(
        mount_count(&staging),
        1,
        "a repeated stage must not stack mounts"
    );

    for _ in 0..2 {
        node.node_publish_volume(publish_req(&vol, &staging, &rw, cap.clone(), false))
            .await
            .expect("publish rw");
    }
    assert_eq!(mount_count(&rw), 1);
    let st = node
        .node_publish_volume(publish_req(&vol, &staging, &rw, cap.clone(), true))
        .await
        .expect_err("same target, other readonly");
    assert_eq!(st.code(), Code::AlreadyExists, "{}", st.message());
    node.node_publish_volume(publish_req(&vol, &staging, &ro, cap.clone(), true))
        .await
        .expect("publish ro");

    let data = pattern(7, 8 * MIB as usize);
    {
        let mut f = fs::File::create(rw.join("data.bin")).expect("create file on rw target");
        f.write_all(&data).expect("write");
        f.sync_all().expect("fsync");
    }
    assert_eq!(fs::read(ro.join("data.bin")).expect("read via ro"), data);
    let e = fs::File::create(ro.join("nope")).expect_err("ro target refuses writes");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));

    let s = stats(&mut node, &vol.id, &rw).await.expect("stats");
    let bytes = s
        .usage
        .iter()
        .find(|u| u.unit == Unit::Bytes as i32)
        .expect("bytes usage");
    assert!(
        bytes.total > (vol.size / 2) as i64 && bytes.total <= vol.size as i64,
        "{bytes:?}"
    );
    assert!(bytes.used >= data.len() as i64, "{bytes:?}");
    let inodes = s
        .usage
        .iter()
        .find(|u| u.unit == Unit::Inodes as i32)
        .expect("inode usage");
    assert!(inodes.total > 0 && inodes.used > 0, "{inodes:?}");
    let cond = s.volume_condition.expect("condition");
    assert!(!cond.abnormal, "{cond:?}");
    for (id, path) in [
        (vol.id.as_str(), Path::new("/nonexistent/x")),
        ("tv-unknown", rw.as_path()),
    ] {
        let st = stats(&mut node, id, path).await.expect_err("not found");
        assert_eq!(
            st.code(),
            Code::NotFound,
            "{id} {}: {}",
            path.display(),
            st.message()
        );
    }

    for target in [&rw, &ro] {
        unpublish(&mut node, &vol.id, target).await;
        unpublish(&mut node, &vol.id, target).await;
        assert!(!target.exists(), "{} must be removed", target.display());
    }
    unstage(&mut node, &vol.id, &staging).await;
    unstage(&mut node, &vol.id, &staging).await;
    assert_eq!(mount_count(&staging), 0);
    let listed = env.host().await.list(ListRequest {}).await.expect("list");
    assert!(listed.into_inner().volumes.is_empty(), "unstage detaches");

    // Staging as another filesystem than the device holds is refused and formats
    // nothing. (The request names no fsType parameter: one that disagrees with the
    // capability is refused before the device is looked at.)
    env.new_epoch(&mut vol).await;
    let other = if fs_name == "ext4" { "xfs" } else { "ext4" };
    let mut req = stage_req(&vol, &staging, mount_cap(other, &[]));
    req.volume_context.remove(KEY_FS_TYPE);
    let st = node
        .node_stage_volume(req)
        .await
        .expect_err("other filesystem on the device");
    assert_eq!(st.code(), Code::FailedPrecondition, "{}", st.message());
    assert_eq!(mount_count(&staging), 0);

    // A new epoch finds the filesystem and the file, read from the replicas through
    // a new engine and loop device: no reformat.
    env.new_epoch(&mut vol).await;
    node.node_stage_volume(stage_req(&vol, &staging, cap.clone()))
        .await
        .expect("restage");
    node.node_publish_volume(publish_req(&vol, &staging, &rw, cap.clone(), false))
        .await
        .expect("republish");
    assert_eq!(
        fs::read(rw.join("data.bin")).expect("read after restage"),
        data
    );
    unpublish(&mut node, &vol.id, &rw).await;
    unstage(&mut node, &vol.id, &staging).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_lifecycle() {
    if !privileged("node service test") {
        return;
    }
    filesystem_lifecycle("ext4", 64 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_lifecycle() {
    if !privileged("node service test") {
        return;
    }
    filesystem_lifecycle("xfs", XFS_VOLUME_SIZE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_volume_publish_and_stats() {
    if !privileged("node service test") {
        return;
    }
    let env = Env::start("block").await;
    let mut node = env.node().await;
    let mut vol = env.volume("block", SMALL_VOLUME_SIZE, block_cap()).await;
    let staging = env.path("staging");
    let target = env.path("pod-dev");
    let target_ro = env.path("pod-dev-ro");
    fs::create_dir_all(&staging).expect("staging dir");
    for _ in 0..2 {
        node.node_stage_volume(stage_req(&vol, &staging, block_cap()))
            .await
            .unwrap_or_else(|s| panic!("stage block: {s}\n{}", env.logs()));
    }
    for _ in 0..2 {
        node.node_publish_volume(publish_req(&vol, &staging, &target, block_cap(), false))
            .await
            .expect("publish block");
    }
    node.node_publish_volume(publish_req(&vol, &staging, &target_ro, block_cap(), true))
        .await
        .expect("publish block ro");

    // Direct I/O through the published device node, at an offset past the first MiB.
    let offset = 3 * MIB;
    let data = pattern(11, MIB as usize);
    {
        let dev = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&target)
            .expect("open published device");
        // O_DIRECT wants an aligned buffer: copy into a 4 KiB-aligned allocation.
        let layout = std::alloc::Layout::from_size_align(data.len(), 4096).expect("layout");
        let mut aligned = AlignedBuf::new(layout);
        aligned.as_mut().copy_from_slice(&data);
        dev.write_all_at(aligned.as_mut(), offset)
            .expect("direct write");
        dev.sync_all().expect("fsync device");
    }
    let mut back = vec![0u8; data.len()];
    fs::File::open(&target_ro)
        .and_then(|f| f.read_exact_at(&mut back, offset))
        .expect("read via ro device");
    assert_eq!(back, data);
    // The read-only bind is what a block publish can do; the kernel still lets a
    // device node on a read-only mount be opened for writing, so enforcement is the
    // container runtime's device permissions (kubelet passes readOnly to it).
    assert!(tessera_node::mount::is_read_only(&target_ro).expect("statvfs"));
    assert!(!tessera_node::mount::is_read_only(&target).expect("statvfs"));

    // Staging the block-staged volume as a filesystem is refused; nothing is
    // formatted and the volume stays attached.
    let st = node
        .node_stage_volume(stage_req(&vol, &staging, mount_cap("ext4", &[])))
        .await
        .expect_err("staged as block");
    assert_eq!(st.code(), Code::AlreadyExists, "{}", st.message());
    let blkid = Command::new("blkid")
        .args(["-p", path_str(&target)])
        .stdin(Stdio::null())
        .output()
        .expect("run blkid");
    assert_eq!(blkid.status.code(), Some(2), "no filesystem was created");
    let listed = env.host().await.list(ListRequest {}).await.expect("list");
    assert_eq!(listed.into_inner().volumes.len(), 1, "still attached");

    let s = stats(&mut node, &vol.id, &target)
        .await
        .expect("block stats");
    assert_eq!(s.usage.len(), 1);
    assert_eq!(s.usage[0].unit, Unit::Bytes as i32);
    assert_eq!(s.usage[0].total, vol.size as i64);

    for t in [&target, &target_ro] {
        unpublish(&mut node, &vol.id, t).await;
        unpublish(&mut node, &vol.id, t).await;
        assert!(!t.exists());
    }
    unstage(&mut node, &vol.id, &staging).await;
    unstage(&mut node, &vol.id, &staging).await;
    assert!(!staging.join("block").exists());

    // The bytes reached the replicas: staged again at a new epoch (a new engine and
    // loop device), the device reads them back.
    env.new_epoch(&mut vol).await;
    node.node_stage_volume(stage_req(&vol, &staging, block_cap()))
        .await
        .expect("restage block");
    assert_eq!(
        read_direct(&staging.join("block"), offset, data.len()),
        data
    );
    unstage(&mut node, &vol.id, &staging).await;
    assert!(!staging.join("block").exists());
}

/// A heap buffer with the alignment O_DIRECT needs, freed on drop.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(layout: std::alloc::Layout) -> AlignedBuf {
        // SAFETY: the layout has a non-zero size (callers pass MiB-sized buffers).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        AlignedBuf { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised (zeroed) bytes owned by
        // this value, and the borrow of self keeps them exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated with exactly this layout and is freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_host_epochs_detach_and_errors() {
    if !privileged("node service test") {
        return;
    }
    let env = Env::start("epochs").await;
    let mut host = env.host().await;
    let vol = env
        .volume("epochs", SMALL_VOLUME_SIZE, mount_cap("ext4", &[]))
        .await;
    // Attaches at epochs above the controller's: a replica adopts a higher epoch at
    // HELLO (and refuses a lower one), so each attach below is a real engine.
    let base = epoch_of(&vol.publish_context);
    let attach = |volume_id: &str, epoch: u64| {
        let mut publish_context = vol.publish_context.clone();
        publish_context.insert("epoch".to_owned(), epoch.to_string());
        AttachRequest {
            volume_id: volume_id.to_owned(),
            publish_context,
            local_node_id: env.node_id.clone(),
        }
    };
    let first = host
        .attach(attach(&vol.id, base + 1))
        .await
        .unwrap_or_else(|s| panic!("attach: {s}\n{}", env.logs()))
        .into_inner()
        .volume
        .expect("volume");
    assert!(first.device_path.starts_with("/dev/loop"), "{first:?}");
    assert_eq!((first.epoch, first.size_bytes), (base + 1, vol.size));
    assert_eq!(first.backend, "engine");
    let again = host
        .attach(attach(&vol.id, base + 1))
        .await
        .expect("same epoch");
    assert_eq!(again.into_inner().volume.as_ref(), Some(&first));
    let st = host
        .attach(attach(&vol.id, base))
        .await
        .expect_err("older epoch");
    assert_eq!(st.code(), Code::FailedPrecondition, "{}", st.message());
    let newer = host
        .attach(attach(&vol.id, base + 2))
        .await
        .expect("newer epoch replaces")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(newer.epoch, base + 2);
    let listed = host.list(ListRequest {}).await.expect("list").into_inner();
    assert_eq!(listed.volumes, vec![newer.clone()]);
    let status = host
        .status(StatusRequest {
            volume_id: vol.id.clone(),
        })
        .await
        .expect("status")
        .into_inner();
    assert!(!status.abnormal, "{status:?}");
    assert_eq!(
        (status.replicas.len(), status.in_sync, status.fenced),
        (3, 3, false),
        "{status:?}"
    );
    let st = host
        .status(StatusRequest {
            volume_id: "tv-none".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(st.code(), Code::NotFound);

    // Bad input changes nothing.
    let mut no_size = attach("tv-x", base + 1);
    no_size.publish_context.remove("sizeBytes");
    for req in [no_size, attach("a/b", base + 1), attach("", base + 1)] {
        let st = host.attach(req).await.expect_err("invalid");
        assert_eq!(st.code(), Code::InvalidArgument, "{}", st.message());
    }
    assert_eq!(
        host.list(ListRequest {})
            .await
            .expect("list")
            .into_inner()
            .volumes
            .len(),
        1
    );

    // Detach refuses while a filesystem is mounted from the device.
    let mnt = env.path("manual");
    fs::create_dir_all(&mnt).expect("dir");
    let ok = Command::new("mkfs.ext4")
        .args(["-q", &newer.device_path])
        .stdin(Stdio::null())
        .status()
        .expect("run mkfs");
    assert!(ok.success());
    nix::mount::mount(
        Some(Path::new(&newer.device_path)),
        &mnt,
        Some("ext4"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount by hand");
    let st = host
        .detach(DetachRequest {
            volume_id: vol.id.clone(),
        })
        .await
        .expect_err("in use");
    assert_eq!(st.code(), Code::FailedPrecondition, "{}", st.message());
    umount2(&mnt, MntFlags::empty()).expect("umount");

    let d = host
        .detach(DetachRequest {
            volume_id: vol.id.clone(),
        })
        .await
        .expect("detach")
        .into_inner();
    assert!(d.was_attached);
    let d = host
        .detach(DetachRequest {
            volume_id: vol.id.clone(),
        })
        .await
        .expect("detach again")
        .into_inner();
    assert!(!d.was_attached);
    assert!(host
        .list(ListRequest {})
        .await
        .expect("list")
        .into_inner()
        .volumes
        .is_empty());
    let state = env.dir.join("state");
    assert!(mounts_below(&state).is_empty(), "no FUSE mount left");
    let bound = list_bound().expect("loop list");
    assert!(
        bound.iter().all(|(_, f)| !f.starts_with(&state)),
        "no loop device left: {bound:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_host_restart_cleans_up_dead_attachments() {
    if !privileged("node service test") {
        return;
    }
    let mut env = Env::start("restart").await;
    let vol = env
        .volume("restart", SMALL_VOLUME_SIZE, mount_cap("ext4", &[]))
        .await;
    let attach = AttachRequest {
        volume_id: vol.id.clone(),
        publish_context: vol.publish_context.clone(),
        local_node_id: env.node_id.clone(),
    };
    let mut host = env.host().await;
    host.attach(attach.clone())
        .await
        .unwrap_or_else(|s| panic!("attach: {s}\n{}", env.logs()));
    let state = env.dir.join("state");
    assert_eq!(mounts_below(&state).len(), 1, "one FUSE mount");
    if let Some(mut p) = env.engine_host.take() {
        p.stop(Signal::SIGKILL, STOP_TIMEOUT);
    }
    env.start_engine_host().await;
    let mut host = env.host().await;
    assert!(host
        .list(ListRequest {})
        .await
        .expect("list")
        .into_inner()
        .volumes
        .is_empty());
    assert!(
        mounts_below(&state).is_empty(),
        "dead FUSE mount removed at start"
    );
    let bound = list_bound().expect("loop list");
    assert!(
        bound.iter().all(|(_, f)| !f.starts_with(&state)),
        "{bound:?}"
    );
    // The volume attaches again on the new engine-host, with the same publish.
    let again = host
        .attach(attach)
        .await
        .expect("attach after restart")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(again.epoch, epoch_of(&vol.publish_context));
    let status = host
        .status(StatusRequest {
            volume_id: vol.id.clone(),
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!((status.in_sync, status.abnormal), (3, false), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_kill9_during_writes_does_not_disturb_io() {
    if !privileged("node service test") {
        return;
    }
    let mut env = Env::start("kill9").await;
    let mut node = env.node().await;
    let cap = mount_cap("ext4", &[]);
    let vol = env.volume("kill9", 128 * MIB, cap.clone()).await;
    let staging = env.path("staging");
    let target = env.path("pod");
    fs::create_dir_all(&staging).expect("staging dir");
    node.node_stage_volume(stage_req(&vol, &staging, cap.clone()))
        .await
        .unwrap_or_else(|s| panic!("stage: {s}\n{}", env.logs()));
    node.node_publish_volume(publish_req(&vol, &staging, &target, cap.clone(), false))
        .await
        .expect("publish");

    // A writer streams 64 MiB in 1 MiB fsynced chunks through one open file. After
    // chunk 8 it waits until the plugin has been killed, so writes are issued both
    // before and after the kill, and while no plugin runs at all.
    let file = target.join("stream.bin");
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let (killed_tx, killed_rx) = std::sync::mpsc::channel::<()>();
    let writer_file = file.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut f = fs::File::create(&writer_file)?;
        for i in 0..64u64 {
            f.write_all(&pattern(i, MIB as usize))?;
            f.sync_data()?;
            if i == 8 {
                let _ = started_tx.send(());
                if killed_rx.recv_timeout(Duration::from_secs(60)).is_err() {
                    return Err(std::io::Error::other("the test never killed the plugin"));
                }
            }
        }
        Ok(())
    });
    started_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("writer under way");
    let old_pid = env.plugin.as_ref().and_then(Proc::pid);
    if let Some(mut p) = env.plugin.take() {
        p.stop(Signal::SIGKILL, STOP_TIMEOUT);
    }
    killed_tx.send(()).expect("writer waits for the kill");
    env.start_plugin().await;
    assert_ne!(env.plugin.as_ref().and_then(Proc::pid), old_pid);
    writer
        .join()
        .expect("writer thread")
        .expect("the write stream sees no error");
    // Read back with O_DIRECT: from the device, not from the page cache.
    let len = fs::metadata(&file).expect("stat").len();
    assert_eq!(len, 64 * MIB);
    for i in 0..64u64 {
        assert!(
            read_direct(&file, i * MIB, MIB as usize) == pattern(i, MIB as usize),
            "chunk {i} differs"
        );
    }

    // The new plugin instance finds the volume and tears it down cleanly.
    let mut node = env.node().await;
    let s = stats(&mut node, &vol.id, &target)
        .await
        .expect("stats via new plugin");
    assert!(!s.usage.is_empty());
    unpublish(&mut node, &vol.id, &target).await;
    unstage(&mut node, &vol.id, &staging).await;
    assert_eq!(mount_count(&staging), 0);
    let listed = env.host().await.list(ListRequest {}).await.expect("list");
    assert!(listed.into_inner().volumes.is_empty());
}

/// Writes files on ext4, unstages, moves the volume to a new epoch (ControllerUnpublish
/// + Publish), stages it again through a new plugin instance and verifies every file
/// and the engine's view of its replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_engine_ext4_restage_with_new_epoch() {
    if !privileged("node service test") {
        return;
    }
    let mut env = Env::start("real").await;
    let mut node = env.node().await;
    let cap = mount_cap("ext4", &[]);
    let mut vol = env.volume("real-engine-ext4", 64 * MIB, cap.clone()).await;
    let staging = env.path("staging");
    let target = env.path("pod");
    fs::create_dir_all(&staging).expect("staging dir");
    node.node_stage_volume(stage_req(&vol, &staging, cap.clone()))
        .await
        .unwrap_or_else(|s| panic!("stage: {s}\n{}", env.logs()));
    node.node_publish_volume(publish_req(&vol, &staging, &target, cap.clone(), false))
        .await
        .expect("publish");
    let files: Vec<(PathBuf, Vec<u8>)> = (0..8u64)
        .map(|i| {
            (
                target.join(format!("f{i}")),
                pattern(100 + i, 2 * MIB as usize),
            )
        })
        .collect();
    for (path, data) in &files {
        let mut f = fs::File::create(path).expect("create");
        f.write_all(data).expect("write");
        f.sync_all().expect("fsync");
    }
    let s = stats(&mut node, &vol.id, &target).await.expect("stats");
    let cond = s.volume_condition.expect("condition");
    assert!(!cond.abnormal, "{cond:?}");
    let status = env
        .host()
        .await
        .status(StatusRequest {
            volume_id: vol.id.clone(),
        })
        .await
        .expect("engine status")
        .into_inner();
    assert_eq!(
        (status.replicas.len(), status.in_sync),
        (3, 3),
        "{status:?}"
    );
    assert!(status.counters.expect("counters").writes > 0);
    unpublish(&mut node, &vol.id, &target).await;
    unstage(&mut node, &vol.id, &staging).await;

    env.new_epoch(&mut vol).await;
    if let Some(mut p) = env.plugin.take() {
        p.stop(Signal::SIGKILL, STOP_TIMEOUT);
    }
    env.start_plugin().await;
    let mut node = env.node().await;
    node.node_stage_volume(stage_req(&vol, &staging, cap.clone()))
        .await
        .expect("restage with the new epoch");
    node.node_publish_volume(publish_req(&vol, &staging, &target, cap.clone(), false))
        .await
        .expect("republish");
    for (path, data) in &files {
        assert!(
            fs::read(path).expect("read back") == *data,
            "{} differs",
            path.display()
        );
    }
    unpublish(&mut node, &vol.id, &target).await;
    unstage(&mut node, &vol.id, &staging).await;
}
