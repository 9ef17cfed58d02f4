//! Real `tessera-replica` processes for the engine tests: volumes made through the
//! control gRPC API, the data plane over the checksummed store.
//!
//! The daemon binary is not built by this package's tests: build it first
//! (`cargo build -p tessera-replica`, or `cargo build --workspace`), or point
//! `TESSERA_BIN_DIR` at the directory holding it. Each daemon runs in its own process
//! group and is killed with SIGKILL in `Drop`; waits poll with deadlines.
//!
//! Mutual TLS as users get it: the work directory of a test holds one cluster CA
//! ([`cluster_tls`]); daemons get its replica certificate, the test acts as the
//! controller on the control port and as an engine (node identity) on the data
//! plane ([`Daemon::data_client`], [`Daemon::engine_transport`]).

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
use tessera_replica_protocol::data::client::ClientConfig;
use tessera_replica_protocol::data::{ClientError, ReplicaDataClient};
use tessera_tls::generate::{identity_dir, ClusterCa, DEFAULT_VALIDITY};
use tessera_tls::{Identity, TlsContext, Transport};

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

/// Serialises making a work directory's CA.
static CA_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The certificates of the test cluster in `work` (`work/tls`), made on first use:
/// one CA of this work directory's own and a certificate directory per identity.
pub fn cluster_tls(work: &Path) -> PathBuf {
    let root = work.join("tls");
    let _made = CA_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !root.exists() {
        // Written aside and renamed: the directory is there whole or not at all.
        let partial = work.join("tls.partial");
        let _ = std::fs::remove_dir_all(&partial);
        ClusterCa::generate(DEFAULT_VALIDITY)
            .expect("generate the test cluster's CA")
            .write_all(&partial, DEFAULT_VALIDITY)
            .expect("write the test cluster's certificates");
        std::fs::rename(&partial, &root).expect("move the certificates in place");
    }
    root
}

/// TLS presenting `identity`, with the certificates of the cluster in `work`.
pub fn cluster_transport(work: &Path, identity: Identity) -> Transport {
    let dir = identity_dir(&cluster_tls(work), identity);
    let context = TlsContext::load(&dir, identity)
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    Transport::tls(context)
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
        let tls = identity_dir(&cluster_tls(work), Identity::Replica);
        let mut child = Command::new(replica_binary())
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--tls-dir")
            .arg(&tls)
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

    /// How an engine dials this daemon's cluster: TLS with the node certificate.
    pub fn engine_transport(&self) -> Transport {
        cluster_transport(&self.work, Identity::Node)
    }

    /// A data-plane connection as an engine (node identity) of `epoch`.
    pub async fn data_client(
        &self,
        volume: &str,
        epoch: u64,
    ) -> Result<ReplicaDataClient, ClientError> {
        let config = ClientConfig {
            transport: self.engine_transport(),
            ..ClientConfig::default()
        };
        ReplicaDataClient::connect_with(self.data.as_str(), volume, epoch, config).await
    }

    /// A control-API client acting as the controller.
    pub async fn client(&self) -> ReplicaControlClient<tonic::transport::Channel> {
        let transport = cluster_transport(&self.work, Identity::Controller);
        let endpoint = tessera_tls::grpc::endpoint(&self.control).expect("control address");
        let channel = tessera_tls::grpc::connect_channel(&endpoint, &transport)
            .await
            .expect("control connect");
        ReplicaControlClient::new(channel)
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
