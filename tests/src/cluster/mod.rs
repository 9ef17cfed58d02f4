//! A throw-away Tessera cluster of real processes.
//!
//! [`ClusterBuilder::start`] creates a unique directory, starts the replica daemons
//! (each with its own data directory, listening on port 0 and reporting its ports
//! through a ready file), then the controller, then per node an engine-host
//! (`tessera-node engine-host`, real quorum engines) and a node plugin on unix
//! sockets in that directory, and returns once every daemon answers. Any daemon can
//! be killed with SIGKILL and started again on the same data directory and ports.
//!
//! Nodes: by default one, `n1`, the node of the first replica daemon.
//! [`ClusterBuilder::nodes`] asks for several (e.g. `["n1", "n2"]`), each with its
//! own engine-host, node plugin and state directory, so a volume can move from one
//! node to another. Node ids that are not replica daemons' node ids are passed to the
//! controller with `--extra-nodes`. The first node keeps the short names
//! (`node.sock`, `node-state/`, `node.log`, `engine-host.log`); further nodes add
//! `-<node id>` (`node-n2.sock`, `node-n2-state/`, ...).
//!
//! Transport security: every cluster gets a CA of its own under `<dir>/tls` and every
//! daemon the certificate of its identity (`--tls-dir`); tests' own clients use
//! [`Cluster::transport`]. [`ClusterBuilder::plaintext`] runs everything without TLS
//! instead (`--insecure-plaintext`), and [`ClusterBuilder::tls_reload_secs`] sets how
//! often the daemons look for rotated certificates ([`Cluster::rotate_certificate`]).
//! See [`tls`].
//!
//! Dropping the [`Cluster`] tears everything down in the order a drained node does:
//! mounts a test (the "kubelet") left outside the node state directories are lazily
//! unmounted, the engine-hosts get SIGTERM (they flush their engines and detach their
//! loop devices and FUSE mounts; SIGKILL after 30 s), then every other process group
//! is killed, and finally a safety net ([`crate::mounts::cleanup_under`]) removes any
//! mount or loop device still left under the directory, so a failing test never
//! leaks mounts. The directory is then removed (kept when `TESSERA_KEEP_TEST_DIR` is
//! set, and never removed while something is still mounted below it). When the drop
//! happens because a test panicked, the tail of every daemon's log is printed first,
//! so the test output shows what the daemons said.

use std::cell::RefCell;
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde::Deserialize;
use tessera_csi_proto::v1::ProbeRequest;
use tessera_tls::{Identity, Transport};

use crate::binaries;
use crate::csi::{
    connect_tcp, connect_unix, ControllerClient, IdentityClient, NodeClient, ReplicaClient,
};
use crate::mounts::{self, CleanupReport};
use crate::network::{NetHost, TestNetwork};
use crate::process::Daemon;
use crate::wait::poll_until;
use nix::sys::signal::Signal;

mod node;
mod replica;
pub mod tls;

use node::{canonical, CsiPlugin};
pub use node::{NodeHost, ENGINE_HOST_SOCKET_NAME};
pub use replica::{Replica, ReplicaAddrs};
pub use tls::ClusterTls;

/// Keeps the cluster directory after the test when set (to any value).
pub const KEEP_DIR_ENV: &str = "TESSERA_KEEP_TEST_DIR";

/// Default time a daemon gets to become ready.
const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Log lines printed per daemon when a test fails.
const LOG_TAIL_LINES: usize = 60;

/// How long an engine-host gets to flush and tear its volumes down after SIGTERM.
pub const ENGINE_HOST_STOP_GRACE: Duration = Duration::from_secs(30);

/// Where daemons listen unless they run on [`ClusterBuilder::isolated_hosts`].
const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Configures and starts a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    replicas: usize,
    zones: usize,
    replica_capacity: String,
    replica_args: Vec<String>,
    replica_metrics: bool,
    engine_host_metrics: bool,
    controller: bool,
    controller_metrics: bool,
    node: bool,
    nodes: Vec<String>,
    extra_nodes: Vec<String>,
    extra_controller_args: Vec<String>,
    dir: Option<PathBuf>,
    startup_timeout: Duration,
    isolated_hosts: bool,
    small_disks: Vec<(String, u64)>,
    plaintext: bool,
    tls_reload_secs: Option<u64>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            replicas: 3,
            zones: 1,
            replica_capacity: "100Gi".to_owned(),
            replica_args: Vec::new(),
            replica_metrics: false,
            engine_host_metrics: false,
            controller: true,
            controller_metrics: false,
            node: true,
            nodes: vec!["n1".to_owned()],
            extra_nodes: Vec::new(),
            extra_controller_args: Vec::new(),
            dir: None,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            isolated_hosts: false,
            small_disks: Vec::new(),
            plaintext: false,
            tls_reload_secs: None,
        }
    }
}

impl ClusterBuilder {
    /// Three replica daemons, a controller, and node `n1` (engine-host + node plugin).
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of replica daemons; they get node ids `n1`, `n2`, ...
    pub fn replicas(mut self, count: usize) -> Self {
        self.replicas = count;
        self
    }

    /// Spreads the replica daemons round-robin over zones `z1`..`z<count>`.
    pub fn zones(mut self, count: usize) -> Self {
        self.zones = count.max(1);
        self
    }

    /// `--capacity` of every replica daemon (e.g. `100Gi`).
    pub fn replica_capacity(mut self, capacity: impl Into<String>) -> Self {
        self.replica_capacity = capacity.into();
        self
    }

    /// Further arguments appended to every replica daemon's command line (e.g.
    /// `["--copy-max-bandwidth", "4Mi"]`); kept across restarts.
    pub fn replica_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.replica_args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Whether the replica daemons serve /metrics (`--metrics-listen` on a free
    /// loopback port; default no). See [`Replica::metrics`].
    pub fn replica_metrics(mut self, enabled: bool) -> Self {
        self.replica_metrics = enabled;
        self
    }

    /// Whether the engine-hosts serve /metrics (`--metrics-listen` on a free loopback
    /// port; default no). See [`NodeHost::engine_host_metrics`].
    pub fn engine_host_metrics(mut self, enabled: bool) -> Self {
        self.engine_host_metrics = enabled;
        self
    }

    /// Whether to start the controller (default yes).
    pub fn controller(mut self, start: bool) -> Self {
        self.controller = start;
        self
    }

    /// Whether the controller serves /metrics (`--metrics-listen` on a free loopback
    /// port; default no). See [`Cluster::controller_metrics`].
    pub fn controller_metrics(mut self, enabled: bool) -> Self {
        self.controller_metrics = enabled;
        self
    }

    /// Runs every daemon without TLS (`--insecure-plaintext`) and gives the test's
    /// clients plain-text transports; no certificates are written. Default no: a CA
    /// of the cluster's own and mutual TLS everywhere (see [`tls`]).
    pub fn plaintext(mut self, plaintext: bool) -> Self {
        self.plaintext = plaintext;
        self
    }

    /// `--tls-reload-secs` of every daemon: how often it looks for rotated
    /// certificate files (the daemons' default, 10 s, when not given).
    pub fn tls_reload_secs(mut self, secs: u64) -> Self {
        self.tls_reload_secs = Some(secs);
        self
    }

    /// Whether to start the nodes' engine-hosts and node plugins (default yes).
    pub fn node(mut self, start: bool) -> Self {
        self.node = start;
        self
    }

    /// One node with this id (default `n1`, the node of the first replica).
    pub fn node_id(mut self, node_id: impl Into<String>) -> Self {
        self.nodes = vec![node_id.into()];
        self
    }

    /// Several nodes, each with an engine-host and a node plugin of its own; the
    /// first one is what [`Cluster::node`] and friends talk to. Ids must be
    /// distinct and usable in file names.
    pub fn nodes<I, S>(mut self, node_ids: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.nodes = node_ids.into_iter().map(Into::into).collect();
        self
    }

    /// Nodes without a replica daemon that the controller accepts as publish targets.
    pub fn extra_nodes<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_nodes = nodes.into_iter().map(Into::into).collect();
        self
    }

    /// Further arguments appended to the controller's command line.
    pub fn controller_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_controller_args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Uses `dir` (created if missing, never removed) instead of a fresh temp dir.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Runs every node (its replica daemon, engine-host and node plugin, by node id)
    /// in a network namespace of its own on a bridge ([`crate::network`]), so tests
    /// can partition hosts and slow links down ([`Cluster::network`]). The controller
    /// and the test stay in the root namespace. Default no (everything on loopback).
    pub fn isolated_hosts(mut self, isolated: bool) -> Self {
        self.isolated_hosts = isolated;
        self
    }

    /// Gives the replica daemon on `node_id` a data directory on an ext4 filesystem
    /// of `bytes` of its own (a loop device below the cluster directory), so a test
    /// can fill it up.
    pub fn replica_disk(mut self, node_id: impl Into<String>, bytes: u64) -> Self {
        self.small_disks.push((node_id.into(), bytes));
        self
    }

    /// How long each daemon gets to become ready (default 30 s).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Starts the daemons and waits until all of them answer.
    ///
    /// On error everything started so far is killed again.
    pub async fn start(self) -> anyhow::Result<Cluster> {
        let replica_bin = binaries::locate(binaries::REPLICA)?;
        let controller_bin = if self.controller {
            Some(binaries::locate(binaries::CONTROLLER)?)
        } else {
            None
        };
        let node_bin = if self.node {
            anyhow::ensure!(!self.nodes.is_empty(), "no node ids given");
            for (i, id) in self.nodes.iter().enumerate() {
                anyhow::ensure!(
                    !id.is_empty()
                        && id
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'),
                    "node id {id:?} cannot name a file"
                );
                anyhow::ensure!(!self.nodes[..i].contains(id), "node id {id:?} given twice");
            }
            Some(binaries::locate(binaries::NODE)?)
        } else {
            None
        };

        let dir = match &self.dir {
            Some(path) => {
                std::fs::create_dir_all(path)
                    .with_context(|| format!("creating cluster dir {}", path.display()))?;
                ClusterDir::Given(path.clone())
            }
            None => ClusterDir::Temp(Some(
                tempfile::Builder::new()
                    .prefix("tessera-test-")
                    .tempdir()
                    .context("creating cluster temp dir")?,
            )),
        };
        let root = dir.path().to_path_buf();
        let tls = if self.plaintext {
            ClusterTls::plaintext()
        } else {
            ClusterTls::generate(root.join(tls::TLS_DIR_NAME), self.tls_reload_secs)?
        };
        let network = if self.isolated_hosts {
            Some(TestNetwork::new().context("creating the test network")?)
        } else {
            None
        };
        let mut cluster = Cluster {
            replicas: Vec::new(),
            controller: None,
            nodes: Vec::new(),
            startup_timeout: self.startup_timeout,
            network,
            tls,
            dir,
        };

        for index in 0..self.replicas {
            let node_id = format!("n{}", index + 1);
            let zone = format!("z{}", index % self.zones + 1);
            let home = root.join(format!("replica-{node_id}"));
            let data_dir = home.join("data");
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("creating {}", data_dir.display()))?;
            if let Some((_, bytes)) = self.small_disks.iter().find(|(n, _)| *n == node_id) {
                mount_small_disk(&home.join("disk.img"), &data_dir, *bytes)?;
            }
            let host = cluster.host(&node_id)?;
            let mut daemon = Daemon::new(
                format!("replica-{node_id}"),
                &replica_bin,
                Vec::new(),
                root.join(format!("replica-{node_id}.log")),
            );
            if let Some(h) = &host {
                daemon = daemon.in_netns(h.netns_path());
            }
            let mut replica = Replica {
                daemon,
                ready_file: home.join("ready.json"),
                node_id,
                zone,
                data_dir,
                capacity: self.replica_capacity.clone(),
                extra_args: self.replica_args.clone(),
                metrics_enabled: self.replica_metrics,
                listen_ip: host.map_or(LOOPBACK, |h| IpAddr::V4(h.addr())),
                tls_args: cluster.tls.daemon_args(Identity::Replica),
                transport: cluster.tls.transport(Identity::Controller),
                addrs: None,
                metrics_addr: None,
            };
            replica.start(self.startup_timeout).await?;
            cluster.replicas.push(replica);
        }

        if let Some(bin) = controller_bin {
            let socket = root.join("controller.sock");
            let mut args: Vec<OsString> = vec![
                "--endpoint".into(),
                endpoint_of(&socket).into(),
                "--replicas".into(),
                cluster
                    .replica_control_addrs()
                    .iter()
                    .map(SocketAddr::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
                    .into(),
            ];
            // Node plugins on nodes without a replica daemon must be publish targets.
            let mut extra_nodes = self.extra_nodes.clone();
            if self.node {
                for id in &self.nodes {
                    let has_replica = cluster.replicas.iter().any(|r| &r.node_id == id);
                    if !has_replica && !extra_nodes.contains(id) {
                        extra_nodes.push(id.clone());
                    }
                }
            }
            if !extra_nodes.is_empty() {
                args.push("--extra-nodes".into());
                args.push(extra_nodes.join(",").into());
            }
            args.extend(cluster.tls.daemon_args(Identity::Controller));
            if self.controller_metrics {
                args.push("--metrics-listen".into());
                args.push(SocketAddr::new(LOOPBACK, 0).to_string().into());
            }
            args.extend(self.extra_controller_args.iter().map(OsString::from));
            let daemon = Daemon::new("controller", bin, args, root.join("controller.log"));
            let plugin = cluster.controller.insert(CsiPlugin { daemon, socket });
            plugin.start(self.startup_timeout).await?;
        }

        if let Some(bin) = node_bin {
            for (index, node_id) in self.nodes.iter().enumerate() {
                let host = cluster.host(node_id)?;
                let mut node = NodeHost::new(
                    &root,
                    &bin,
                    node_id,
                    index == 0,
                    self.engine_host_metrics,
                    cluster.tls.daemon_args(Identity::Node),
                    host.as_ref(),
                )?;
                node.start_engine_host(self.startup_timeout).await?;
                // Pushed before the plugin starts, so a failing start still tears the
                // engine-host down gracefully in Drop.
                cluster.nodes.push(node);
                let timeout = self.startup_timeout;
                if let Some(node) = cluster.nodes.last_mut() {
                    node.plugin.start(timeout).await?;
                }
            }
        }

        Ok(cluster)
    }
}

/// `unix://` endpoint URL of a socket path.
pub fn endpoint_of(socket: &Path) -> String {
    format!("unix://{}", socket.display())
}

/// Where the cluster lives on disk.
#[derive(Debug)]
enum ClusterDir {
    /// Ours: removed on drop unless [`KEEP_DIR_ENV`] is set.
    Temp(Option<tempfile::TempDir>),
    /// The caller's: left in place.
    Given(PathBuf),
}

impl ClusterDir {
    fn path(&self) -> &Path {
        match self {
            ClusterDir::Temp(Some(dir)) => dir.path(),
            ClusterDir::Temp(None) => Path::new(""),
            ClusterDir::Given(path) => path,
        }
    }
}

/// A running set of Tessera daemons; see the module docs.
#[derive(Debug)]
pub struct Cluster {
    replicas: Vec<Replica>,
    controller: Option<CsiPlugin>,
    nodes: Vec<NodeHost>,
    startup_timeout: Duration,
    /// The hosts' namespaces and bridge ([`ClusterBuilder::isolated_hosts`]); dropped
    /// after every process in them stopped.
    network: Option<TestNetwork>,
    /// The CA and certificates, or plain text.
    tls: ClusterTls,
    dir: ClusterDir,
}

impl Cluster {
    /// With [`ClusterBuilder::isolated_hosts`], host `node_id` (created at first use);
    /// otherwise `None`.
    fn host(&mut self, node_id: &str) -> anyhow::Result<Option<NetHost>> {
        self.network
            .as_mut()
            .map(|net| net.add_host(node_id))
            .transpose()
    }

    /// The test network of a cluster built with [`ClusterBuilder::isolated_hosts`]:
    /// partitions and rate limits between its hosts (named by node id).
    pub fn network(&self) -> anyhow::Result<&TestNetwork> {
        self.network
            .as_ref()
            .ok_or_else(|| anyhow!("this cluster was built without isolated hosts"))
    }

    /// Starts the default cluster: 3 replica daemons, controller, node `n1`.
    pub async fn start_default() -> anyhow::Result<Self> {
        ClusterBuilder::new().start().await
    }

    /// The cluster's directory (sockets, logs, replica data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cluster's transport security: its certificate directories, the daemons'
    /// flags, the test's transports.
    pub fn tls(&self) -> &ClusterTls {
        &self.tls
    }

    /// The certificate root (`<dir>/tls`: `ca.crt`, `ca.key`, and `controller/`,
    /// `node/`, `replica/`), or `None` for a [`ClusterBuilder::plaintext`] cluster.
    pub fn tls_root(&self) -> Option<&Path> {
        self.tls.root()
    }

    /// The transport for a test's own client presenting `identity` (the
    /// certificates as of the start; plain text in a plain-text cluster). Control
    /// calls other than GetInfo need [`Identity::Controller`]; the data plane takes
    /// the controller or a node.
    pub fn transport(&self, identity: Identity) -> Transport {
        self.tls.transport(identity)
    }

    /// Issues `identity` a new certificate and key from the cluster's CA and replaces
    /// its directory's files; every daemon of that identity takes them at its next
    /// reload check ([`ClusterBuilder::tls_reload_secs`]).
    pub fn rotate_certificate(&self, identity: Identity) -> anyhow::Result<()> {
        self.tls.rotate(identity)
    }

    /// `tessera verify` of `volume_id` against every running replica daemon, as the
    /// controller (`--tls-dir <root>/controller`, or `--insecure-plaintext`): Ok when
    /// it exits 0 (the in-sync replicas hold the same version and intact data of
    /// every block); otherwise its output.
    pub async fn verify(&self, volume_id: &str) -> anyhow::Result<()> {
        let cli = binaries::locate(binaries::CLI)?;
        let addrs: Vec<String> = self
            .replicas
            .iter()
            .filter(|r| r.pid().is_some())
            .map(|r| r.control_addr().to_string())
            .collect();
        let mut command = tokio::process::Command::new(&cli);
        command
            .args(["verify", volume_id, "--replicas", &addrs.join(",")])
            .args(self.tls.cli_args());
        for var in tls::TRANSPORT_ENV {
            command.env_remove(var);
        }
        let out = command
            .output()
            .await
            .with_context(|| format!("running {}", cli.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "tessera verify {volume_id} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// All replica daemons, in start order (`n1` first).
    pub fn replicas(&self) -> &[Replica] {
        &self.replicas
    }

    /// Replica daemon `index` (0-based). Panics if there is no such daemon.
    pub fn replica(&self, index: usize) -> &Replica {
        &self.replicas[index]
    }

    /// Control addresses of all replica daemons, in start order.
    pub fn replica_control_addrs(&self) -> Vec<SocketAddr> {
        self.replicas.iter().map(Replica::control_addr).collect()
    }

    /// Index (in [`Cluster::replicas`]) of the replica daemon with node id `node_id`.
    pub fn replica_index(&self, node_id: &str) -> anyhow::Result<usize> {
        self.replicas
            .iter()
            .position(|r| r.node_id == node_id)
            .ok_or_else(|| anyhow!("this cluster has no replica daemon on node {node_id:?}"))
    }

    /// SIGKILLs replica daemon `index` (its data stays).
    pub fn kill_replica(&mut self, index: usize) -> anyhow::Result<()> {
        self.replicas[index].daemon.kill()
    }

    /// Starts a killed replica daemon again on the same data dir and ports.
    pub async fn start_replica(&mut self, index: usize) -> anyhow::Result<()> {
        let timeout = self.startup_timeout;
        self.replicas[index].start(timeout).await
    }

    /// SIGKILLs replica daemon `index` and starts it again on the same data dir and
    /// ports; returns once it is ready.
    pub async fn restart_replica(&mut self, index: usize) -> anyhow::Result<()> {
        self.kill_replica(index)?;
        self.start_replica(index).await
    }

    /// The controller's CSI endpoint (`unix://...`).
    pub fn controller_endpoint(&self) -> anyhow::Result<String> {
        Ok(endpoint_of(&self.controller_plugin()?.socket))
    }

    /// The first node plugin's CSI endpoint (`unix://...`).
    pub fn node_endpoint(&self) -> anyhow::Result<String> {
        Ok(self.first_node()?.endpoint())
    }

    /// A fresh CSI Controller client (a new connection, so it works after restarts).
    pub async fn controller(&self) -> anyhow::Result<ControllerClient> {
        let channel = self.controller_plugin()?.connect().await?;
        Ok(ControllerClient::new(channel))
    }

    /// A fresh CSI Identity client for the controller.
    pub async fn controller_identity(&self) -> anyhow::Result<IdentityClient> {
        let channel = self.controller_plugin()?.connect().await?;
        Ok(IdentityClient::new(channel))
    }

    /// A fresh CSI Node client of the first node plugin.
    pub async fn node(&self) -> anyhow::Result<NodeClient> {
        self.first_node()?.client().await
    }

    /// A fresh CSI Identity client for the first node plugin.
    pub async fn node_identity(&self) -> anyhow::Result<IdentityClient> {
        let channel = self.first_node()?.plugin.connect().await?;
        Ok(IdentityClient::new(channel))
    }

    /// Every node (engine-host + node plugin), in the order given to the builder.
    pub fn nodes(&self) -> &[NodeHost] {
        &self.nodes
    }

    /// Node `node_id`.
    pub fn node_host(&self, node_id: &str) -> anyhow::Result<&NodeHost> {
        self.nodes
            .iter()
            .find(|n| n.node_id == node_id)
            .ok_or_else(|| anyhow!("this cluster has no node {node_id:?}"))
    }

    fn node_host_mut(&mut self, node_id: &str) -> anyhow::Result<&mut NodeHost> {
        self.nodes
            .iter_mut()
            .find(|n| n.node_id == node_id)
            .ok_or_else(|| anyhow!("this cluster has no node {node_id:?}"))
    }

    /// A fresh CSI Node client of the node plugin on `node_id`.
    pub async fn node_client(&self, node_id: &str) -> anyhow::Result<NodeClient> {
        self.node_host(node_id)?.client().await
    }

    /// SIGKILLs the node plugin on `node_id` (its engine-host keeps running).
    pub fn kill_node_plugin(&mut self, node_id: &str) -> anyhow::Result<()> {
        self.node_host_mut(node_id)?.plugin.daemon.kill()
    }

    /// Starts the (killed) node plugin on `node_id` again; returns once its Probe
    /// says ready.
    pub async fn start_node_plugin(&mut self, node_id: &str) -> anyhow::Result<()> {
        let timeout = self.startup_timeout;
        self.node_host_mut(node_id)?.plugin.start(timeout).await
    }

    /// SIGKILLs the engine-host on `node_id`: its FUSE files die with it, so I/O
    /// on the node's volumes fails until they are staged again.
    pub fn kill_engine_host(&mut self, node_id: &str) -> anyhow::Result<()> {
        self.node_host_mut(node_id)?.engine_host.kill()
    }

    /// Stops the engine-host on `node_id` gracefully (SIGTERM: flush and tear down
    /// every volume), SIGKILL after [`ENGINE_HOST_STOP_GRACE`]. Returns whether it
    /// exited by itself.
    pub fn stop_engine_host(&mut self, node_id: &str) -> anyhow::Result<bool> {
        self.node_host_mut(node_id)?
            .engine_host
            .terminate(ENGINE_HOST_STOP_GRACE)
    }

    /// Starts the (stopped) engine-host on `node_id` again; returns once its socket
    /// accepts connections.
    pub async fn start_engine_host(&mut self, node_id: &str) -> anyhow::Result<()> {
        let timeout = self.startup_timeout;
        self.node_host_mut(node_id)?
            .start_engine_host(timeout)
            .await
    }

    /// Process ids of the engine-hosts that run (each also its process group id).
    pub fn engine_host_pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.engine_host.pid())
            .collect()
    }

    /// The controller's /metrics page, parsed (see [`crate::metrics`]); the cluster
    /// must be built with [`ClusterBuilder::controller_metrics`]. Like the
    /// engine-host's, its port is found in `/proc`
    /// ([`crate::process::listening_tcp_addrs`]).
    pub async fn controller_metrics(&self) -> anyhow::Result<crate::metrics::Metrics> {
        let pid = self
            .controller_plugin()?
            .daemon
            .pid()
            .ok_or_else(|| anyhow!("the controller is not running"))?;
        let addr = only_tcp_listener(pid, "the controller's /metrics").await?;
        crate::metrics::scrape(addr)
            .await
            .context("scraping the controller's /metrics")
    }

    /// SIGKILLs the controller.
    pub fn kill_controller(&mut self) -> anyhow::Result<()> {
        self.controller_plugin_mut()?.daemon.kill()
    }

    /// Starts the (killed) controller again; returns once its Probe says ready.
    pub async fn start_controller(&mut self) -> anyhow::Result<()> {
        let timeout = self.startup_timeout;
        self.controller_plugin_mut()?.start(timeout).await
    }

    /// SIGKILLs the controller and starts it again.
    pub async fn restart_controller(&mut self) -> anyhow::Result<()> {
        self.kill_controller()?;
        self.start_controller().await
    }

    /// SIGKILLs the first node plugin.
    pub fn kill_node(&mut self) -> anyhow::Result<()> {
        let id = self.first_node()?.node_id.clone();
        self.kill_node_plugin(&id)
    }

    /// Starts the (killed) first node plugin again; returns once its Probe says ready.
    pub async fn start_node(&mut self) -> anyhow::Result<()> {
        let id = self.first_node()?.node_id.clone();
        self.start_node_plugin(&id).await
    }

    /// SIGKILLs the first node plugin and starts it again.
    pub async fn restart_node(&mut self) -> anyhow::Result<()> {
        self.kill_node()?;
        self.start_node().await
    }

    /// Process ids (= process group ids) of every running daemon.
    pub fn pids(&self) -> Vec<u32> {
        self.daemons().filter_map(Daemon::pid).collect()
    }

    /// Log files of all daemons, labelled.
    pub fn log_files(&self) -> Vec<(String, PathBuf)> {
        self.daemons()
            .map(|d| (d.name().to_owned(), d.log_path().to_path_buf()))
            .collect()
    }

    /// The last `lines` log lines of every daemon, one block per daemon.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for daemon in self.daemons() {
            out.push_str(&format!(
                "==== {} (last {lines} lines of {})\n{}\n",
                daemon.name(),
                daemon.log_path().display(),
                daemon.log_tail(lines)
            ));
        }
        out
    }

    fn daemons(&self) -> impl Iterator<Item = &Daemon> {
        self.replicas
            .iter()
            .map(|r| &r.daemon)
            .chain(self.controller.iter().map(|p| &p.daemon))
            .chain(
                self.nodes
                    .iter()
                    .flat_map(|n| [&n.engine_host, &n.plugin.daemon]),
            )
    }

    fn controller_plugin(&self) -> anyhow::Result<&CsiPlugin> {
        self.controller
            .as_ref()
            .ok_or_else(|| anyhow!("this cluster was built without a controller"))
    }

    fn controller_plugin_mut(&mut self) -> anyhow::Result<&mut CsiPlugin> {
        self.controller
            .as_mut()
            .ok_or_else(|| anyhow!("this cluster was built without a controller"))
    }

    fn first_node(&self) -> anyhow::Result<&NodeHost> {
        self.nodes
            .first()
            .ok_or_else(|| anyhow!("this cluster was built without a node plugin"))
    }

    /// The teardown described in the module docs; returns whether the directory
    /// may be removed (nothing is mounted below it any more).
    fn teardown(&mut self) -> bool {
        let root = self.dir().to_path_buf();
        if root.as_os_str().is_empty() {
            self.nodes.clear();
            self.controller = None;
            self.replicas.clear();
            return true;
        }
        // 1. What the "kubelet" (the test) mounted: staging and target paths.
        let state_dirs: Vec<PathBuf> = self.nodes.iter().map(|n| canonical(&n.state_dir)).collect();
        let mut report = CleanupReport::default();
        mounts::unmount_under(
            &root,
            |m| !state_dirs.iter().any(|s| m.mountpoint.starts_with(s)),
            &mut report,
        );
        // 2. Engine-hosts flush and detach, all at once.
        for node in &self.nodes {
            node.engine_host.signal(Signal::SIGTERM);
        }
        for node in &mut self.nodes {
            if let Err(e) = node.engine_host.terminate(ENGINE_HOST_STOP_GRACE) {
                eprintln!("tessera-tests: stopping {}: {e:#}", node.engine_host.name());
            }
        }
        // 3. Everything else.
        self.nodes.clear();
        self.controller = None;
        self.replicas.clear();
        // 4. The hosts' namespaces, now that nothing runs in them.
        self.network = None;
        // 5. Safety net.
        let net = mounts::cleanup_under(&root);
        if !net.is_empty() {
            eprintln!(
                "tessera-tests: left under {} after the engine-hosts stopped: unmounted {:?}, \
                 detached {:?}, failures {:?}",
                root.display(),
                net.unmounted,
                net.detached,
                net.failures
            );
        }
        match mounts::mounts_under(&root) {
            Ok(left) if left.is_empty() => true,
            Ok(left) => {
                eprintln!(
                    "tessera-tests: still mounted under {}, not removing it: {:?}",
                    root.display(),
                    left.iter().map(|m| &m.mountpoint).collect::<Vec<_>>()
                );
                false
            }
            Err(e) => {
                eprintln!(
                    "tessera-tests: cannot read the mount table, not removing {}: {e}",
                    root.display()
                );
                false
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "tessera-tests: test failed; daemon logs (cluster dir {}):\n{}",
                self.dir().display(),
                self.log_tails(LOG_TAIL_LINES)
            );
        }
        // Stop everything before the directory goes away.
        let removable = self.teardown();
        if let ClusterDir::Temp(dir) = &mut self.dir {
            let keep = std::env::var_os(KEEP_DIR_ENV).is_some();
            if keep || !removable {
                if let Some(dir) = dir.take() {
                    eprintln!("tessera-tests: keeping {}", dir.keep().display());
                }
            }
        }
    }
}

/// The one TCP socket process `pid` listens on (a daemon that binds port 0 for
/// /metrics and reports it nowhere), found in `/proc`
/// ([`crate::process::listening_tcp_addrs`]); waits up to 10 s for it to be bound.
pub(crate) async fn only_tcp_listener(pid: u32, what: &str) -> anyhow::Result<SocketAddr> {
    let last = RefCell::new(Ok(Vec::new()));
    let found = poll_until(Duration::from_secs(10), || {
        let listening = crate::process::listening_tcp_addrs(pid);
        let one = match &listening {
            Ok(addrs) if addrs.len() == 1 => Some(addrs[0]),
            _ => None,
        };
        *last.borrow_mut() = listening;
        std::future::ready(one)
    })
    .await;
    found.map_err(|timed_out| {
        anyhow!(
            "no single listener for {what} (pid {pid}) {timed_out}: {:?}",
            last.borrow()
        )
    })
}

/// Makes an ext4 filesystem of `bytes` in the file `image` and mounts it on
/// `mountpoint` through a loop device (the cluster's teardown safety net unmounts
/// and detaches it).
fn mount_small_disk(image: &Path, mountpoint: &Path, bytes: u64) -> anyhow::Result<()> {
    let file = std::fs::File::create(image)
        .with_context(|| format!("creating disk image {}", image.display()))?;
    file.set_len(bytes)
        .with_context(|| format!("sizing disk image {}", image.display()))?;
    let run = |cmd: &mut std::process::Command| -> anyhow::Result<()> {
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        anyhow::ensure!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    };
    run(std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0"])
        .arg(image))?;
    run(std::process::Command::new("mount")
        .args(["-o", "loop"])
        .arg(image)
        .arg(mountpoint))
}

/// Why a daemon did not become ready.
#[derive(Debug, thiserror::Error)]
enum ReadyError {
    #[error("the process exited with {0}")]
    Exited(std::process::ExitStatus),
    #[error("{0}")]
    TimedOut(String),
}
