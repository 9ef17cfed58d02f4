//! Real processes for the controller's integration tests.
//!
//! A [`Cluster`] is a unique temp directory holding N real `tessera-replica` daemons on
//! loopback (each with its own node id, zone, capacity and data directory) and the
//! real `tessera-controller` binary serving CSI on a unix socket in that directory.
//! Tests talk to the controller over CSI gRPC, the way external-provisioner and
//! external-attacher do, and check what landed on the daemons through their control
//! gRPC.
//!
//! Faults are real process states, not flags:
//! * a *down* daemon is killed with SIGKILL ([`RealReplica::kill`]) and can be started
//!   again on the same data directory and ports ([`RealReplica::restart`]);
//! * a *silent* daemon is stopped with SIGSTOP ([`RealReplica::freeze`]): the kernel
//!   still accepts its connections, nobody answers; SIGCONT resumes it.
//!
//! Every process runs in a process group of its own ([`tessera_tests::Daemon`]) and is
//! killed when its owner is dropped, also while a test panics; a panicking test
//! prints the tail of every daemon's log.
//!
//! The replica ports use mutual TLS, as users get them: the cluster's directory
//! holds one CA of its own ([`cluster_tls`]); every daemon gets the replica
//! certificate, the controller the controller certificate, and the tests' own clients
//! act as the controller on the control port ([`RealReplica::client`]) and as an
//! engine (node identity) on the data plane ([`RealReplica::data_client`]).
//!
//! The replica binary is found by [`tessera_tests::binaries::locate`]; a missing
//! binary fails the test with a message saying how to build it. The controller binary
//! is built by cargo for this package's integration tests.

// Shared by several test crates, each of which uses only part of it.
#![allow(dead_code)]

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use tessera_csi_proto::v1::ProbeRequest;
use tessera_replica_protocol::control_proto::{
    GetVolumeRequest, ListVolumesRequest, ReplicaRef, VolumeRecord,
};
use tessera_replica_protocol::data::client::ClientConfig;
use tessera_replica_protocol::data::{ClientError, ReplicaDataClient};
use tessera_tests::binaries;
use tessera_tests::cluster::KEEP_DIR_ENV;
use tessera_tests::csi::{connect_unix, ControllerClient, IdentityClient};
use tessera_tests::{poll_until, Daemon};
use tessera_tls::generate::{identity_dir, ClusterCa, DEFAULT_VALIDITY};
use tessera_tls::{Identity, TlsContext, Transport};
use tonic::Code;

pub use tessera_tests::csi::ReplicaClient;

/// CSI SnapshotMetadata client.
pub type SnapshotMetadataClient =
    tessera_csi_proto::v1::snapshot_metadata_client::SnapshotMetadataClient<
        tonic::transport::Channel,
    >;

/// One GiB in bytes.
pub const GIB: u64 = 1 << 30;

/// How long a daemon gets to become ready.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Log lines printed per daemon when a test fails.
const LOG_TAIL_LINES: usize = 40;

/// Deadline of the controller's replica RPCs unless a test asks for another.
pub const DEFAULT_RPC_TIMEOUT_MS: &str = "2000";

/// One replica daemon to start: node id, zone, `--capacity` in bytes.
pub type NodeSpec<'a> = (&'a str, &'a str, u64);

/// Serialises making a cluster directory's CA.
static CA_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The certificates of the test cluster in `root` (`root/tls`), made on first use:
/// one CA of this directory's own and a certificate directory per identity.
pub fn cluster_tls(root: &Path) -> PathBuf {
    let tls = root.join("tls");
    let _made = CA_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !tls.exists() {
        // Written aside and renamed: the directory is there whole or not at all.
        let partial = root.join("tls.partial");
        let _ = std::fs::remove_dir_all(&partial);
        ClusterCa::generate(DEFAULT_VALIDITY)
            .expect("generate the test cluster's CA")
            .write_all(&partial, DEFAULT_VALIDITY)
            .expect("write the test cluster's certificates");
        std::fs::rename(&partial, &tls).expect("move the certificates in place");
    }
    tls
}

/// The certificate directory of `identity` in the test cluster in `root`.
pub fn cluster_tls_dir(root: &Path, identity: Identity) -> PathBuf {
    identity_dir(&cluster_tls(root), identity)
}

/// TLS presenting `identity`, with the certificates of the cluster in `root`.
pub fn cluster_transport(root: &Path, identity: Identity) -> Transport {
    let dir = cluster_tls_dir(root, identity);
    let context = TlsContext::load(&dir, identity)
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    Transport::tls(context)
}

/// The ready file written by `tessera-replica --ready-file`.
#[derive(Debug, Deserialize)]
struct ReadyFile {
    control: SocketAddr,
    data: SocketAddr,
}

/// Control and data-plane addresses a daemon reported at its first start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Addrs {
    control: SocketAddr,
    data: SocketAddr,
}

/// A real `tessera-replica` process.
#[derive(Debug)]
pub struct RealReplica {
    daemon: Daemon,
    node_id: String,
    zone: String,
    capacity_bytes: u64,
    data_dir: PathBuf,
    ready_file: PathBuf,
    /// Ports of the first start, reused by every restart.
    addrs: Option<Addrs>,
    /// Whether the process is stopped with SIGSTOP.
    frozen: bool,
    /// Further command-line arguments (e.g. `--copy-max-bandwidth`).
    extra_args: Vec<OsString>,
    /// The cluster's directory, which holds its certificates ([`cluster_tls`]).
    root: PathBuf,
}

/// Why a daemon did not become ready.
enum NotReady {
    Exited(std::process::ExitStatus),
    TimedOut(String),
}

impl RealReplica {
    /// Starts a daemon with its files under `root` and waits for its ready file.
    pub async fn start(root: &Path, node_id: &str, zone: &str, capacity_bytes: u64) -> Self {
        Self::start_with(root, node_id, zone, capacity_bytes, &[]).await
    }

    /// [`start`](Self::start) with further command-line arguments.
    pub async fn start_with(
        root: &Path,
        node_id: &str,
        zone: &str,
        capacity_bytes: u64,
        extra_args: &[&str],
    ) -> Self {
        let bin = binaries::locate(binaries::REPLICA).unwrap_or_else(|e| panic!("{e:#}"));
        let home = root.join(format!("replica-{node_id}"));
        let data_dir = home.join("data");
        std::fs::create_dir_all(&data_dir)
            .unwrap_or_else(|e| panic!("creating {}: {e}", data_dir.display()));
        let mut replica = Self {
            daemon: Daemon::new(
                format!("replica-{node_id}"),
                bin,
                Vec::new(),
                root.join(format!("replica-{node_id}.log")),
            ),
            node_id: node_id.to_owned(),
            zone: zone.to_owned(),
            capacity_bytes,
            data_dir,
            ready_file: home.join("ready.json"),
            addrs: None,
            frozen: false,
            extra_args: extra_args.iter().map(OsString::from).collect(),
            root: root.to_path_buf(),
        };
        replica
            .run()
            .await
            .unwrap_or_else(|e| panic!("starting replica {node_id}: {e:#}"));
        replica
    }

    /// `--node-id` of this daemon.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// `--zone` of this daemon.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// Control gRPC address (stable across restarts).
    pub fn control_addr(&self) -> SocketAddr {
        self.addrs().control
    }

    /// Data-plane address (stable across restarts).
    pub fn data_addr(&self) -> SocketAddr {
        self.addrs().data
    }

    /// How a volume record refers to this daemon.
    pub fn replica_ref(&self) -> ReplicaRef {
        ReplicaRef {
            node_id: self.node_id.clone(),
            zone: self.zone.clone(),
            control_address: self.control_addr().to_string(),
            data_address: self.data_addr().to_string(),
        }
    }

    fn addrs(&self) -> Addrs {
        self.addrs
            .expect("a RealReplica is only handed out after its first start")
    }

    /// Down: SIGKILL (the data directory stays).
    pub fn kill(&mut self) {
        self.frozen = false;
        self.daemon
            .kill()
            .unwrap_or_else(|e| panic!("killing replica {}: {e:#}", self.node_id));
    }

    /// Starts a killed daemon again on the same data directory and ports.
    pub async fn restart(&mut self) {
        assert!(
            !self.daemon.is_running(),
            "replica {} is still running",
            self.node_id
        );
        self.run()
            .await
            .unwrap_or_else(|e| panic!("restarting replica {}: {e:#}", self.node_id));
    }

    /// Silent: SIGSTOP. Connections are still accepted by the kernel, never answered.
    pub fn freeze(&mut self) {
        self.signal(Signal::SIGSTOP);
        self.frozen = true;
    }

    /// Resumes a frozen daemon (SIGCONT).
    pub fn thaw(&mut self) {
        self.signal(Signal::SIGCONT);
        self.frozen = false;
    }

    fn signal(&self, signal: Signal) {
        let pid = self
            .daemon
            .pid()
            .unwrap_or_else(|| panic!("replica {} is not running", self.node_id));
        let pid = i32::try_from(pid).expect("pid fits in i32");
        // The daemon leads a process group of its own.
        killpg(Pid::from_raw(pid), signal)
            .unwrap_or_else(|e| panic!("sending {signal} to replica {}: {e}", self.node_id));
    }

    /// A fresh control-API client acting as the controller.
    pub async fn client(&self) -> ReplicaClient {
        let addr = self.control_addr();
        let transport = cluster_transport(&self.root, Identity::Controller);
        let endpoint = tessera_tls::grpc::endpoint(&addr.to_string()).expect("control address");
        let channel = tessera_tls::grpc::connect_channel(&endpoint, &transport)
            .await
            .unwrap_or_else(|e| panic!("connecting to replica {} at {addr}: {e}", self.node_id));
        ReplicaClient::new(channel)
    }

    /// A data-plane connection to `volume_id` as an engine (node identity) of `epoch`.
    pub async fn data_client(
        &self,
        volume_id: &str,
        epoch: u64,
    ) -> Result<ReplicaDataClient, ClientError> {
        let config = ClientConfig {
            transport: cluster_transport(&self.root, Identity::Node),
            ..ClientConfig::default()
        };
        ReplicaDataClient::connect_with(self.data_addr(), volume_id, epoch, config).await
    }

    /// The record of `volume_id` on this daemon, `None` when it has none.
    pub async fn volume(&self, volume_id: &str) -> Option<VolumeRecord> {
        match self
            .client()
            .await
            .get_volume(GetVolumeRequest {
                volume_id: volume_id.to_owned(),
            })
            .await
        {
            Ok(r) => Some(r.into_inner()),
            Err(s) if s.code() == Code::NotFound => None,
            Err(s) => panic!("GetVolume {volume_id} on replica {}: {s:?}", self.node_id),
        }
    }

    /// Every record on this daemon.
    pub async fn volumes(&self) -> Vec<VolumeRecord> {
        self.client()
            .await
            .list_volumes(ListVolumesRequest {})
            .await
            .unwrap_or_else(|s| panic!("ListVolumes on replica {}: {s:?}", self.node_id))
            .into_inner()
            .volumes
    }

    /// Number of records on this daemon.
    pub async fn volume_count(&self) -> usize {
        self.volumes().await.len()
    }

    fn args(&self) -> Vec<OsString> {
        let any = "127.0.0.1:0".to_owned();
        let (listen, data_listen) = match self.addrs {
            Some(a) => (a.control.to_string(), a.data.to_string()),
            None => (any.clone(), any),
        };
        let mut args: Vec<OsString> = vec![
            "--data-dir".into(),
            self.data_dir.clone().into_os_string(),
            "--listen".into(),
            listen.into(),
            "--data-listen".into(),
            data_listen.into(),
            "--node-id".into(),
            self.node_id.clone().into(),
            "--zone".into(),
            self.zone.clone().into(),
            "--capacity".into(),
            self.capacity_bytes.to_string().into(),
            "--ready-file".into(),
            self.ready_file.clone().into_os_string(),
            "--tls-dir".into(),
            cluster_tls_dir(&self.root, Identity::Replica).into_os_string(),
        ];
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Starts the process and waits for its ready file. A restart asks for the ports
    /// of the first start; if the process exits before it is ready (the port may
    /// still be held for a moment), it is started again until the timeout.
    async fn run(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            match std::fs::remove_file(&self.ready_file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("removing {}", self.ready_file.display()))
                }
            }
            self.daemon.set_args(self.args());
            self.daemon.start()?;
            let outcome = self.wait_ready(deadline).await;
            match outcome {
                Ok(addrs) => {
                    if let Some(first) = self.addrs {
                        anyhow::ensure!(
                            first == addrs,
                            "came back on {addrs:?} instead of {first:?}"
                        );
                    }
                    self.addrs = Some(addrs);
                    return Ok(());
                }
                Err(NotReady::Exited(_)) if self.addrs.is_some() && Instant::now() < deadline => {}
                Err(e) => {
                    let _ = self.daemon.kill();
                    let why = match e {
                        NotReady::Exited(status) => format!("the process exited with {status}"),
                        NotReady::TimedOut(t) => t,
                    };
                    return Err(anyhow!(
                        "not ready: {why}\n{}",
                        self.daemon.log_tail(LOG_TAIL_LINES)
                    ));
                }
            }
        }
    }

    async fn wait_ready(&mut self, deadline: Instant) -> Result<Addrs, NotReady> {
        let ready_file = self.ready_file.clone();
        let daemon = &mut self.daemon;
        let timeout = deadline.saturating_duration_since(Instant::now());
        let outcome = poll_until(timeout, || {
            let result = if let Some(status) = daemon.exit_status() {
                Some(Err(NotReady::Exited(status)))
            } else {
                std::fs::read(&ready_file)
                    .ok()
                    .and_then(|bytes| serde_json::from_slice::<ReadyFile>(&bytes).ok())
                    .map(|r| {
                        Ok(Addrs {
                            control: r.control,
                            data: r.data,
                        })
                    })
            };
            std::future::ready(result)
        })
        .await;
        outcome.unwrap_or_else(|t| Err(NotReady::TimedOut(format!("no ready file: {t}"))))
    }
}

impl Drop for RealReplica {
    fn drop(&mut self) {
        if self.frozen {
            // SIGKILL (in Daemon's drop) ends a stopped process too; resuming first
            // just leaves nothing stopped behind if that kill fails.
            if let Some(pid) = self.daemon.pid().and_then(|p| i32::try_from(p).ok()) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGCONT);
            }
        }
    }
}

/// The real `tessera-controller` binary serving CSI on a unix socket.
#[derive(Debug)]
pub struct RealController {
    daemon: Daemon,
    socket: PathBuf,
}

impl RealController {
    /// Prepares (does not start) a controller over `replicas` with its socket and log
    /// in `root`. `args` are appended to the command line.
    pub fn new(root: &Path, replicas: &[SocketAddr], extra_nodes: &[&str], args: &[&str]) -> Self {
        let socket = root.join("controller.sock");
        let mut argv: Vec<OsString> = vec![
            "--endpoint".into(),
            format!("unix://{}", socket.display()).into(),
            "--replicas".into(),
            replicas
                .iter()
                .map(SocketAddr::to_string)
                .collect::<Vec<_>>()
                .join(",")
                .into(),
        ];
        if !extra_nodes.is_empty() {
            argv.push("--extra-nodes".into());
            argv.push(extra_nodes.join(",").into());
        }
        if !args.contains(&"--rpc-timeout-ms") {
            argv.push("--rpc-timeout-ms".into());
            argv.push(DEFAULT_RPC_TIMEOUT_MS.into());
        }
        argv.push("--tls-dir".into());
        argv.push(cluster_tls_dir(root, Identity::Controller).into_os_string());
        argv.extend(args.iter().map(OsString::from));
        Self {
            daemon: Daemon::new(
                "controller",
                env!("CARGO_BIN_EXE_tessera-controller"),
                argv,
                root.join("controller.log"),
            ),
            socket,
        }
    }

    /// The CSI socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Starts the process; returns once Probe answers ready over the socket.
    pub async fn start(&mut self) {
        self.daemon.start().expect("starting tessera-controller");
        let socket = self.socket.clone();
        let daemon = &mut self.daemon;
        let outcome = poll_until(STARTUP_TIMEOUT, || {
            let exited = daemon.exit_status();
            let socket = socket.clone();
            async move {
                if let Some(status) = exited {
                    return Some(Err(format!("the process exited with {status}")));
                }
                let channel = connect_unix(&socket).await.ok()?;
                let probe = IdentityClient::new(channel)
                    .probe(ProbeRequest {})
                    .await
                    .ok()?
                    .into_inner();
                probe.ready.unwrap_or(true).then_some(Ok(()))
            }
        })
        .await;
        let result = outcome.unwrap_or_else(|t| Err(format!("Probe never answered ready: {t}")));
        if let Err(why) = result {
            let _ = self.daemon.kill();
            panic!(
                "tessera-controller did not become ready: {why}\n{}",
                self.daemon.log_tail(LOG_TAIL_LINES)
            );
        }
    }

    /// SIGKILLs the process.
    pub fn kill(&mut self) {
        self.daemon.kill().expect("killing tessera-controller");
    }

    /// A fresh CSI Controller client (a new connection).
    pub async fn client(&self) -> ControllerClient {
        let channel = connect_unix(&self.socket)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.socket.display()));
        ControllerClient::new(channel)
    }

    /// A fresh CSI SnapshotMetadata client (served on the controller's socket).
    pub async fn snapshot_metadata(&self) -> SnapshotMetadataClient {
        let channel = connect_unix(&self.socket)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.socket.display()));
        SnapshotMetadataClient::new(channel)
    }

    /// A fresh CSI Identity client.
    pub async fn identity(&self) -> IdentityClient {
        let channel = connect_unix(&self.socket)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.socket.display()));
        IdentityClient::new(channel)
    }
}

/// Replica daemons plus a controller over them, in a directory of their own.
pub struct Cluster {
    // Dropped in this order: processes before the directory they use.
    pub replicas: Vec<RealReplica>,
    pub controller: RealController,
    /// `None` only once kept for inspection ([`KEEP_DIR_ENV`]).
    dir: Option<tempfile::TempDir>,
}

impl Cluster {
    /// One daemon per `nodes` entry, then a controller that also accepts
    /// `extra_nodes` as publish targets.
    pub async fn start(nodes: &[NodeSpec<'_>], extra_nodes: &[&str]) -> Self {
        Self::start_with(nodes, extra_nodes, &[]).await
    }

    /// [`start`](Self::start) with further controller arguments.
    pub async fn start_with(
        nodes: &[NodeSpec<'_>],
        extra_nodes: &[&str],
        controller_args: &[&str],
    ) -> Self {
        Self::start_configured(nodes, extra_nodes, controller_args, &[]).await
    }

    /// [`start_with`](Self::start_with) with further arguments for every replica
    /// daemon too.
    pub async fn start_configured(
        nodes: &[NodeSpec<'_>],
        extra_nodes: &[&str],
        controller_args: &[&str],
        replica_args: &[&str],
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tessera-controller-test-")
            .tempdir()
            .expect("creating the cluster's temp dir");
        let mut replicas = Vec::new();
        for (node, zone, capacity) in nodes {
            replicas.push(
                RealReplica::start_with(dir.path(), node, zone, *capacity, replica_args).await,
            );
        }
        let addrs: Vec<SocketAddr> = replicas.iter().map(RealReplica::control_addr).collect();
        let mut controller = RealController::new(dir.path(), &addrs, extra_nodes, controller_args);
        controller.start().await;
        Self {
            replicas,
            controller,
            dir: Some(dir),
        }
    }

    /// The cluster's directory (sockets, logs, data directories).
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or(Path::new(""), tempfile::TempDir::path)
    }

    /// A fresh CSI Controller client.
    pub async fn ctl(&self) -> ControllerClient {
        self.controller.client().await
    }

    /// The daemon of `node`.
    pub fn replica(&self, node: &str) -> &RealReplica {
        self.replicas
            .iter()
            .find(|r| r.node_id == node)
            .unwrap_or_else(|| panic!("no replica daemon on node {node}"))
    }

    /// The daemon of `node`, mutably (to kill, restart, freeze it).
    pub fn replica_mut(&mut self, node: &str) -> &mut RealReplica {
        self.replicas
            .iter_mut()
            .find(|r| r.node_id == node)
            .unwrap_or_else(|| panic!("no replica daemon on node {node}"))
    }

    /// SIGKILLs the controller and starts it again over the same daemons.
    pub async fn restart_controller(&mut self) {
        self.controller.kill();
        self.controller.start().await;
    }

    /// Node ids of the daemons holding a record of `volume_id`, in start order.
    pub async fn holders(&self, volume_id: &str) -> Vec<String> {
        let mut holders = Vec::new();
        for r in &self.replicas {
            if r.volume(volume_id).await.is_some() {
                holders.push(r.node_id.clone());
            }
        }
        holders
    }

    fn log_tails(&self) -> String {
        let daemons = self
            .replicas
            .iter()
            .map(|r| &r.daemon)
            .chain(std::iter::once(&self.controller.daemon));
        let mut out = String::new();
        for d in daemons {
            out.push_str(&format!(
                "==== {} ({})\n{}\n",
                d.name(),
                d.log_path().display(),
                d.log_tail(LOG_TAIL_LINES)
            ));
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "test failed; daemon logs of {}:\n{}",
                self.dir().display(),
                self.log_tails()
            );
        }
        if std::env::var_os(KEEP_DIR_ENV).is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("keeping {}", dir.keep().display());
            }
        }
    }
}
