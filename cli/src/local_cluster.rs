//! The local cluster of `tessera up`: which daemons, with which command lines, in
//! which order; waiting until each one answers; starting a dead one again; stopping
//! them in reverse order.
//!
//! The processes themselves are [`crate::daemon`]'s job, the signs of readiness
//! [`crate::readiness`]'s, and deciding when to restart [`crate::supervise`]'s. The
//! pids are written to `DIR/run/pids` (rewritten on every start and restart), so a
//! run after a crash of `tessera` itself can find and stop the orphans.
//!
//! A restarted daemon must look exactly like the one it replaces: engines hold the
//! replica daemons' data-plane addresses (from the publish context) and the
//! controller their control addresses (`--replicas`). So a replica daemon's first
//! start picks free ports (`127.0.0.1:0`) and its spec is then rewritten with the
//! ports it got; every restart binds those again, on the same data directory.
//!
//! Every daemon that uses a replica port gets its identity's certificate directory
//! under `DIR/tls` (see [`crate::certs::ensure_local`]); the node plugin dials no
//! replica and takes none.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tessera_tls::{Identity, Transport};

use crate::binaries::{Binaries, NodeMode};
use crate::csi_client::endpoint_of;
use crate::daemon::{Daemon, DaemonSpec, Role, Stopped};
use crate::layout::Layout;
use crate::readiness::{Readiness, Ready, ReplicaAddresses};
use crate::wait::{poll_until, Poll, PollError};

/// How long a daemon gets to become ready.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon gets to exit after SIGTERM before it is SIGKILLed.
pub const STOP_GRACE: Duration = Duration::from_secs(15);
/// The controller's `--refresh-interval-secs`: how often it asks the replica
/// daemons whether they live.
const CONTROLLER_REFRESH_SECS: u64 = 2;
/// Log lines shown when a restart fails: enough for the error, short enough to
/// repeat on every attempt.
const RESTART_TAIL_LINES: usize = 3;

/// Node id the node plugin runs as; the controller is told about it with
/// `--extra-nodes`, since no replica daemon runs on it.
pub const LOCAL_NODE_ID: &str = "local";
/// Zone of every replica daemon: one machine is one failure domain.
pub const LOCAL_ZONE: &str = "local";

/// Addresses of one running replica daemon.
#[derive(Debug, Clone)]
pub struct ReplicaEndpoint {
    /// Its node id.
    pub node_id: String,
    /// Control gRPC address.
    pub control: SocketAddr,
}

/// The daemons of one `tessera up`, in start order.
#[derive(Debug)]
pub struct LocalCluster {
    layout: Layout,
    binaries: Binaries,
    /// How readiness checks dial the replica daemons (the controller identity).
    transport: Transport,
    daemons: Vec<Daemon>,
    replicas: Vec<ReplicaEndpoint>,
}

impl LocalCluster {
    /// A cluster with nothing started yet, whose certificates are in
    /// `layout.tls()` already; `transport` is the CLI's own (controller identity).
    pub fn new(layout: Layout, binaries: Binaries, transport: Transport) -> Self {
        Self {
            layout,
            binaries,
            transport,
            daemons: Vec::new(),
            replicas: Vec::new(),
        }
    }

    /// The daemons, in start order (a dead one stays listed until it is restarted
    /// or the cluster stops).
    pub fn daemons(&self) -> &[Daemon] {
        &self.daemons
    }

    /// The daemons, to check for exits.
    pub fn daemons_mut(&mut self) -> &mut [Daemon] {
        &mut self.daemons
    }

    /// The replica daemons started so far.
    pub fn replicas(&self) -> &[ReplicaEndpoint] {
        &self.replicas
    }

    /// Which node command line is in use.
    pub fn node_mode(&self) -> NodeMode {
        self.binaries.node_mode
    }

    /// Starts `spec` as a new daemon and waits until it serves (failing early, with
    /// the log tail, if it exits, and after [`STARTUP_TIMEOUT`]).
    async fn start(&mut self, spec: DaemonSpec) -> anyhow::Result<(usize, Ready)> {
        self.daemons.push(Daemon::spawn(spec)?);
        self.write_pid_file()?;
        let index = self.daemons.len() - 1;
        let what = self.daemons[index].spec().readiness.describe();
        match self.wait_ready(index).await {
            Ok(ready) => Ok((index, ready)),
            Err(e) => {
                Err(self.daemons[index].failure(format_args!("did not become ready ({what}): {e}")))
            }
        }
    }

    /// Starts daemon `index` again with the same spec (binary, flags, data
    /// directory, addresses) and waits until it serves. A start that fails is
    /// killed, so the caller can simply try again later. Returns the new pid.
    pub async fn restart(&mut self, index: usize) -> anyhow::Result<u32> {
        let spec = self
            .daemons
            .get(index)
            .ok_or_else(|| anyhow!("no daemon number {index}"))?
            .spec()
            .clone();
        spec.readiness.clear_stale()?;
        // The old process was reaped already; dropping its handle does nothing more.
        self.daemons[index] = Daemon::spawn(spec)?;
        self.write_pid_file()?;
        match self.wait_ready(index).await {
            Ok(_) => Ok(self.daemons[index].pid()),
            Err(e) => {
                let daemon = &mut self.daemons[index];
                daemon.kill();
                Err(anyhow!(
                    "did not become ready ({}): {e}; last lines of {}:\n{}",
                    daemon.spec().readiness.describe(),
                    daemon.log().display(),
                    daemon.log_tail(RESTART_TAIL_LINES)
                ))
            }
        }
    }

    /// Rewrites `DIR/run/pids` with the daemons now listed.
    fn write_pid_file(&self) -> anyhow::Result<()> {
        let text: String = self
            .daemons
            .iter()
            .map(|d| format!("{} {}\n", d.pid(), d.name()))
            .collect();
        let path = self.layout.pid_file();
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Polls daemon `index`'s readiness until it holds, the process exits, or
    /// [`STARTUP_TIMEOUT`] passes.
    async fn wait_ready(&mut self, index: usize) -> Result<Ready, PollError> {
        let daemon = &mut self.daemons[index];
        let readiness = daemon.spec().readiness.clone();
        let transport = &self.transport;
        poll_until(STARTUP_TIMEOUT, || {
            let exited = daemon.exited();
            let readiness = &readiness;
            async move {
                if let Some(status) = exited {
                    return Poll::Failed(anyhow!("exited ({status}) before it was ready"));
                }
                match readiness.check(transport).await {
                    Some(v) => Poll::Ready(v),
                    None => Poll::Pending,
                }
            }
        })
        .await
    }

    /// The spec of the replica daemon on `node_id`, listening on `addresses` (free
    /// ports when `None`).
    fn replica_spec(
        &self,
        node_id: &str,
        capacity: &str,
        addresses: Option<ReplicaAddresses>,
    ) -> DaemonSpec {
        let (control, data, endpoint) = match addresses {
            Some(a) => (
                a.control.to_string(),
                a.data.to_string(),
                format!("control {} data {}", a.control, a.data),
            ),
            None => (
                "127.0.0.1:0".to_owned(),
                "127.0.0.1:0".to_owned(),
                String::new(),
            ),
        };
        let ready_file = self.layout.replica_ready_file(node_id);
        let name = format!("replica-{node_id}");
        DaemonSpec {
            log: self.layout.log_of(&name),
            name,
            role: Role::Replica,
            program: self.binaries.replica.clone(),
            args: vec![
                "--data-dir".into(),
                self.layout.replica_data(node_id).into(),
                "--listen".into(),
                control.into(),
                "--data-listen".into(),
                data.into(),
                "--node-id".into(),
                node_id.into(),
                "--zone".into(),
                LOCAL_ZONE.into(),
                "--capacity".into(),
                capacity.into(),
                "--ready-file".into(),
                ready_file.clone().into(),
                "--tls-dir".into(),
                self.layout.tls_dir(Identity::Replica).into(),
            ],
            endpoint,
            readiness: Readiness::ReplicaReadyFile(ready_file),
        }
    }

    /// Starts the replica daemon on `node_id` and waits for its ready file and a
    /// GetInfo answer; from then on it is restarted on the ports it got.
    pub async fn start_replica(&mut self, node_id: &str, capacity: &str) -> anyhow::Result<()> {
        let data = self.layout.replica_data(node_id);
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let spec = self.replica_spec(node_id, capacity, None);
        spec.readiness.clear_stale()?;
        let (index, ready) = self.start(spec).await?;
        let Ready::Replica(addresses) = ready else {
            return Err(anyhow!("replica-{node_id} answered without its addresses"));
        };
        let pinned = self.replica_spec(node_id, capacity, Some(addresses));
        self.daemons[index].set_spec(pinned);
        self.replicas.push(ReplicaEndpoint {
            node_id: node_id.to_owned(),
            control: addresses.control,
        });
        Ok(())
    }

    /// Control addresses of the replica daemons, comma-separated.
    pub fn replica_list(&self) -> String {
        self.replicas
            .iter()
            .map(|r| r.control.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts the controller for the replica daemons started so far, accepting the
    /// local node plugin as a publish target, and waits for its Probe.
    pub async fn start_controller(&mut self) -> anyhow::Result<()> {
        let socket = self.layout.controller_socket();
        let spec = DaemonSpec {
            name: "controller".to_owned(),
            role: Role::Controller,
            program: self.binaries.controller.clone(),
            args: vec![
                "--endpoint".into(),
                endpoint_of(&socket).into(),
                "--replicas".into(),
                self.replica_list().into(),
                "--extra-nodes".into(),
                LOCAL_NODE_ID.into(),
                // A daemon that died or came back shows in `tessera volumes` (the
                // volume condition) within this many seconds, not the default 10.
                "--refresh-interval-secs".into(),
                CONTROLLER_REFRESH_SECS.to_string().into(),
                "--tls-dir".into(),
                self.layout.tls_dir(Identity::Controller).into(),
            ],
            endpoint: endpoint_of(&socket),
            log: self.layout.log_of("controller"),
            readiness: Readiness::CsiProbe(socket),
        };
        self.start(spec).await.map(drop)
    }

    /// Starts the engine-host (when this `tessera-node` has one) and waits until its
    /// socket accepts connections.
    pub async fn start_engine_host(&mut self) -> anyhow::Result<()> {
        if self.binaries.node_mode != NodeMode::EngineHostAndPlugin {
            return Ok(());
        }
        let state = self.layout.node_state();
        std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
        let socket = self.layout.engine_host_socket();
        let spec = DaemonSpec {
            name: "engine-host".to_owned(),
            role: Role::EngineHost,
            program: self.binaries.node.clone(),
            args: vec![
                "engine-host".into(),
                "--state-dir".into(),
                state.into(),
                "--tls-dir".into(),
                self.layout.tls_dir(Identity::Node).into(),
            ],
            endpoint: socket.display().to_string(),
            log: self.layout.log_of("engine-host"),
            readiness: Readiness::SocketAccepts(socket),
        };
        self.start(spec).await.map(drop)
    }

    /// Starts the CSI node plugin as node [`LOCAL_NODE_ID`] and waits for its Probe.
    pub async fn start_node_plugin(&mut self) -> anyhow::Result<()> {
        let socket = self.layout.node_socket();
        let mut args: Vec<OsString> = Vec::new();
        if self.binaries.node_mode == NodeMode::EngineHostAndPlugin {
            args.push("plugin".into());
        }
        args.extend([
            "--endpoint".into(),
            endpoint_of(&socket).into(),
            "--node-id".into(),
            LOCAL_NODE_ID.into(),
        ]);
        if self.binaries.node_mode == NodeMode::EngineHostAndPlugin {
            args.extend(["--state-dir".into(), self.layout.node_state().into()]);
        }
        let spec = DaemonSpec {
            name: "node-plugin".to_owned(),
            role: Role::NodePlugin,
            program: self.binaries.node.clone(),
            args,
            endpoint: endpoint_of(&socket),
            log: self.layout.log_of("node-plugin"),
            readiness: Readiness::CsiProbe(socket),
        };
        self.start(spec).await.map(drop)
    }

    /// The daemon named `name`, for log tails in error messages.
    pub fn daemon(&self, name: &str) -> Option<&Daemon> {
        self.daemons.iter().find(|d| d.name() == name)
    }

    /// Stops every daemon, last started first, and forgets them.
    pub async fn stop_all(&mut self) -> Vec<Stopped> {
        let mut stopped = Vec::new();
        while let Some(mut daemon) = self.daemons.pop() {
            stopped.push(daemon.stop(STOP_GRACE).await);
            if let Err(e) = self.write_pid_file() {
                eprintln!("tessera: {e:#}");
            }
        }
        let _ = std::fs::remove_file(self.layout.pid_file());
        stopped
    }
}
