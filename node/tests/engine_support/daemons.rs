//! Real `tessera-replica` processes for the engine tests: volumes made through the
//! control gRPC API, the data plane over the checksummed store.
//!
//! The daemon binary is not built by this package's tests: build it first
//! (`cargo build -p tessera-replica`, or `cargo build --workspace`), or point
//! `TESSERA_BIN_DIR` at the directory holding it. Each daemon runs in its own process
//! group and is killed with SIGKILL in `Drop`; waits poll with deadlines.

use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tessera_node::engine::ReplicaEndpoint;
use tessera_replica_protocol::control_proto as proto;
use tessera_replica_protocol::control_proto::replica_control_client::ReplicaControlClient;

const BS: u64 = 4096;
const START_TIMEOUT: Duration = Duration::from_secs(30);
const NO_HANG: Duration = Duration::from_secs(20);

fn replica_binary() -> PathBuf {
    let dir = if let Some(d) = std::env::var_os("TESSERA_BIN_DIR") {
        PathBuf::from(d)
    } else {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("node crate has a parent")
            .to_path_buf();
        match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
            Some(t) if t.is_absolute() => t.join("debug"),
            Some(t) => root.join(t).join("debug"),
            None => root.join("target/debug"),
        }
    };
    let bin = dir.join("tessera-replica");
    assert!(
        bin.is_file(),
        "{} not found: run `cargo build -p tessera-replica` first or set TESSERA_BIN_DIR",
        bin.display()
    );
    bin
}

/// Polls `f` until it returns `Some`; panics with `what` after `limit`.
pub async fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One replica daemon process; SIGKILLed (whole group) and reaped on drop.
pub struct Daemon {
    pub node_id: String,
    child: Child,
    pub control: String,
    pub data: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    work: PathBuf,
}

impl Daemon {
    /// Starts a daemon for `node_id` with its data under `work`, on free ports.
    pub async fn start(work: &Path, node_id: &str) -> Daemon {
        Self::spawn(work, node_id, "127.0.0.1:0", "127.0.0.1:0").await
    }

    async fn spawn(work: &Path, node_id: &str, control: &str, data: &str) -> Daemon {
        let data_dir = work.join(node_id);
        let ready = work.join(format!("{node_id}.ready.json"));
        let _ = std::fs::remove_file(&ready);
        let log = work.join(format!("{node_id}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let err = out.try_clone().unwrap();
        let mut child = Command::new(replica_binary())
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", control, "--data-listen", data])
            .args(["--node-id", node_id, "--zone", "z1", "--capacity", "1Gi"])
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .expect("spawn tessera-replica");
        let json: serde_json::Value = poll("ready file", START_TIMEOUT, || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "daemon exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            serde_json::from_str(&std::fs::read_to_string(&ready).ok()?).ok()
        })
        .await;
        let field = |k: &str| json[k].as_str().expect("ready file field").to_owned();
        Daemon {
            node_id: node_id.to_owned(),
            control: field("control"),
            data: field("data"),
            child,
            data_dir,
            log,
            work: work.to_owned(),
        }
    }

    /// Starts the daemon again (after [`Self::kill9`]) on the same data directory
    /// and addresses, as a restarted pod with a stable address does.
    pub async fn restart(&mut self) {
        assert!(
            matches!(self.child.try_wait(), Ok(Some(_))),
            "restart a dead daemon only"
        );
        let mut again = Self::spawn(&self.work, &self.node_id, &self.control, &self.data).await;
        // `again` leaves with the dead child, which its drop only finds reaped.
        std::mem::swap(&mut self.child, &mut again.child);
    }

    /// This daemon as a member of a volume's replica set.
    pub fn member(&self) -> proto::ReplicaRef {
        proto::ReplicaRef {
            node_id: self.node_id.clone(),
            zone: "z1".into(),
            control_address: self.control.clone(),
            data_address: self.data.clone(),
        }
    }

    /// This daemon as an engine's replica endpoint.
    pub fn endpoint(&self) -> ReplicaEndpoint {
        ReplicaEndpoint {
            node_id: self.node_id.clone(),
            data_address: self.data.clone(),
        }
    }

    pub async fn client(&self) -> ReplicaControlClient<tonic::transport::Channel> {
        ReplicaControlClient::connect(format!("http://{}", self.control))
            .await
            .expect("control connect")
    }

    /// Creates a plain (empty) volume with no recorded replica set.
    pub async fn create_volume(&self, id: &str, size: u64) {
        self.create_volume_in(id, size, Vec::new(), 0).await;
    }

    /// Creates a plain (empty) volume recording `replicas`, starting at `epoch`.
    pub async fn create_volume_in(
        &self,
        id: &str,
        size: u64,
        replicas: Vec<proto::ReplicaRef>,
        epoch: u64,
    ) {
        self.client()
            .await
            .create_volume(proto::CreateVolumeRequest {
                volume_id: id.into(),
                name: format!("pv-{id}"),
                size_bytes: size,
                replication_factor: 3,
                access_type: "block".into(),
                replicas,
                epoch,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("create volume on {}: {e}", self.node_id));
    }

    /// The volume's record on this daemon.
    pub async fn record(&self, id: &str) -> proto::VolumeRecord {
        self.client()
            .await
            .get_volume(proto::GetVolumeRequest {
                volume_id: id.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("get volume on {}: {e}", self.node_id))
            .into_inner()
    }

    /// Replaces the volume's replica set on this daemon, as the controller's
    /// compare-and-set does (expected generation read first; attachments and
    /// parameters kept).
    pub async fn set_replicas(&self, id: &str, replicas: Vec<proto::ReplicaRef>) {
        let rec = self.record(id).await;
        self.client()
            .await
            .update_volume(proto::UpdateVolumeRequest {
                volume_id: id.into(),
                expected_generation: rec.generation,
                attachments: rec.attachments,
                parameters: rec.parameters,
                replicas,
            })
            .await
            .unwrap_or_else(|e| panic!("update volume on {}: {e}", self.node_id));
    }

    /// SIGKILL and reap.
    pub async fn kill9(&mut self) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        killpg(pid, Signal::SIGKILL).expect("kill -9");
        let child = &mut self.child;
        poll("exit after SIGKILL", NO_HANG, || {
            child.try_wait().ok().flatten()
        })
        .await;
    }

    /// The volume's directory in the data directory.
    pub fn volume_dir(&self, volume: &str) -> PathBuf {
        self.data_dir.join("volumes").join(volume)
    }

    /// Flips one byte of block `b` in the volume's head-layer data file.
    pub fn corrupt_on_disk(&self, volume: &str, b: u64) {
        let layers = self.volume_dir(volume).join("store/layers");
        let heads: Vec<PathBuf> = std::fs::read_dir(&layers)
            .unwrap_or_else(|e| panic!("{}: {e}", layers.display()))
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(heads.len(), 1, "only the head layer: {heads:?}");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(heads[0].join("data"))
            .unwrap();
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, b * BS + 9).unwrap();
        byte[0] ^= 0xff;
        f.write_all_at(&byte, b * BS + 9).unwrap();
        f.sync_all().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let _ = self.child.wait();
    }
}
