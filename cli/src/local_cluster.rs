//! Process supervision for `tessera up`: start the daemons, wait until each one
//! answers, watch them, and stop them in reverse order.
//!
//! Every daemon runs in a process group of its own, so the terminal's Ctrl-C reaches
//! only `tessera` (which then tears down in order instead of everything dying at
//! once), and stopping a daemon also stops anything it forked. Output goes to
//! `DIR/logs/<name>.log`. Stopping is SIGTERM to the group, a grace period polled for
//! exit, then SIGKILL. If `tessera` unwinds without stopping (a bug, a panic), `Drop`
//! SIGKILLs every group still running. The pids are also written to `DIR/run/pids`,
//! so a run after a crash of `tessera` itself can find and stop the orphans.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, Context};
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use tessera_replica::control_proto::GetInfoRequest;

use crate::binaries::{Binaries, NodeMode};
use crate::csi_client::{self, endpoint_of};
use crate::layout::Layout;
use crate::wait::{poll_until, Poll};

/// How long a daemon gets to become ready.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon gets to exit after SIGTERM before it is SIGKILLed.
pub const STOP_GRACE: Duration = Duration::from_secs(15);
/// Log lines shown when a daemon fails.
pub const LOG_TAIL_LINES: usize = 30;

/// Node id the node plugin runs as; the controller is told about it with
/// `--extra-nodes`, since no replica daemon runs on it.
pub const LOCAL_NODE_ID: &str = "local";
/// Zone of every replica daemon: one machine is one failure domain.
pub const LOCAL_ZONE: &str = "local";

/// One daemon process and its process group.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    endpoint: String,
    log: PathBuf,
    pid: u32,
    child: Option<Child>,
    /// Exit status once reaped, kept for the teardown report.
    status: Option<ExitStatus>,
}

/// How a daemon ended when it was stopped.
#[derive(Debug)]
pub struct Stopped {
    /// Component name.
    pub name: String,
    /// Its exit status, if it could be reaped.
    pub status: Option<ExitStatus>,
    /// Whether it had to be SIGKILLed after the grace period.
    pub killed: bool,
    /// Whether it had already exited before it was asked to stop.
    pub exited_early: bool,
}

impl Daemon {
    /// Starts `program args` as `name` in a new process group, output appended to `log`.
    fn spawn(
        name: &str,
        program: &Path,
        args: Vec<OsString>,
        log: PathBuf,
        endpoint: String,
    ) -> anyhow::Result<Self> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let line = args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        writeln!(
            file,
            "==== tessera up: starting {name}: {} {line}",
            program.display()
        )
        .with_context(|| format!("writing log {}", log.display()))?;
        let stderr = file
            .try_clone()
            .with_context(|| format!("duplicating log {}", log.display()))?;
        let mut command = Command::new(program);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .process_group(0)
            // Log files are read by people, not terminals.
            .env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        Ok(Self {
            name: name.to_owned(),
            endpoint,
            log,
            pid: child.id(),
            child: Some(child),
            status: None,
        })
    }

    /// Component name (`replica-node-a`, `controller`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Process id, which is also the process group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What clients connect to (socket or address).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The exit status if the process has exited (it is reaped then).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                self.status = Some(status);
                self.signal_group(Signal::SIGKILL);
                Some(status)
            }
            Ok(None) => None,
            Err(_) => {
                self.child = None;
                None
            }
        }
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// An error saying this daemon failed, with the tail of its log.
    pub fn failure(&self, what: impl std::fmt::Display) -> anyhow::Error {
        DaemonFailed(format!(
            "{} {what}\n---- last lines of {} ----\n{}\n----",
            self.name,
            self.log.display(),
            self.log_tail(LOG_TAIL_LINES)
        ))
        .into()
    }

    fn signal_group(&self, signal: Signal) {
        let Ok(pid) = i32::try_from(self.pid) else {
            return;
        };
        match killpg(Pid::from_raw(pid), signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => eprintln!("tessera: sending {signal} to {}: {e}", self.name),
        }
    }

    /// SIGTERM, wait up to `grace` for the exit, then SIGKILL. Whatever else is left
    /// in the process group is killed too.
    pub async fn stop(&mut self, grace: Duration) -> Stopped {
        let name = self.name.clone();
        if self.child.is_none() {
            return Stopped {
                name,
                status: self.status,
                killed: false,
                exited_early: true,
            };
        }
        if let Some(status) = self.exited() {
            return Stopped {
                name,
                status: Some(status),
                killed: false,
                exited_early: true,
            };
        }
        self.signal_group(Signal::SIGTERM);
        let exited = poll_until(grace, || {
            let s = self.exited();
            async move {
                match s {
                    Some(s) => Poll::Ready(s),
                    None => Poll::Pending,
                }
            }
        })
        .await;
        match exited {
            Ok(status) => Stopped {
                name,
                status: Some(status),
                killed: false,
                exited_early: false,
            },
            Err(_) => {
                self.signal_group(Signal::SIGKILL);
                let status = self.child.take().and_then(|mut c| c.wait().ok());
                Stopped {
                    name,
                    status,
                    killed: true,
                    exited_early: false,
                }
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.signal_group(Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// A daemon failed; the message already carries the tail of its log, so callers
/// need not print it again.
#[derive(Debug)]
pub struct DaemonFailed(String);

impl std::fmt::Display for DaemonFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DaemonFailed {}

/// The last `lines` lines of the file at `path`.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// The ready file `tessera-replica --ready-file` writes once it listens.
#[derive(Debug, Deserialize)]
struct ReadyFile {
    control: SocketAddr,
    data: SocketAddr,
}

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
    daemons: Vec<Daemon>,
    replicas: Vec<ReplicaEndpoint>,
}

impl LocalCluster {
    /// A cluster with nothing started yet.
    pub fn new(layout: Layout, binaries: Binaries) -> Self {
        Self {
            layout,
            binaries,
            daemons: Vec::new(),
            replicas: Vec::new(),
        }
    }

    /// The running daemons, in start order.
    pub fn daemons(&self) -> &[Daemon] {
        &self.daemons
    }

    /// The replica daemons started so far.
    pub fn replicas(&self) -> &[ReplicaEndpoint] {
        &self.replicas
    }

    /// Which node command line is in use.
    pub fn node_mode(&self) -> NodeMode {
        self.binaries.node_mode
    }

    fn spawn(
        &mut self,
        name: &str,
        program: PathBuf,
        args: Vec<OsString>,
        endpoint: String,
    ) -> anyhow::Result<usize> {
        let daemon = Daemon::spawn(name, &program, args, self.layout.log_of(name), endpoint)?;
        self.daemons.push(daemon);
        self.write_pid_file()?;
        Ok(self.daemons.len() - 1)
    }

    /// Rewrites `DIR/run/pids` with the daemons now running.
    fn write_pid_file(&self) -> anyhow::Result<()> {
        let text: String = self
            .daemons
            .iter()
            .map(|d| format!("{} {}\n", d.pid, d.name))
            .collect();
        let path = self.layout.pid_file();
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Polls `ready` until it yields a value, failing early (with the log tail) if
    /// daemon `index` exits, and after [`STARTUP_TIMEOUT`].
    async fn wait_ready<T, F, Fut>(
        &mut self,
        index: usize,
        what: &str,
        mut ready: F,
    ) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let daemon = &mut self.daemons[index];
        let result = poll_until(STARTUP_TIMEOUT, || {
            let exited = daemon.exited();
            let fut = ready();
            async move {
                if let Some(status) = exited {
                    return Poll::Failed(anyhow!("exited ({status}) before it was ready"));
                }
                match fut.await {
                    Some(v) => Poll::Ready(v),
                    None => Poll::Pending,
                }
            }
        })
        .await;
        result.map_err(|e| daemon.failure(format_args!("did not become ready ({what}): {e}")))
    }

    /// Starts the replica daemon on `node_id` and waits for its ready file and a
    /// GetInfo answer.
    pub async fn start_replica(&mut self, node_id: &str, capacity: &str) -> anyhow::Result<()> {
        let data = self.layout.replica_data(node_id);
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let ready_file = self.layout.replica_ready_file(node_id);
        let args: Vec<OsString> = vec![
            "--data-dir".into(),
            data.into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-listen".into(),
            "127.0.0.1:0".into(),
            "--node-id".into(),
            node_id.into(),
            "--zone".into(),
            LOCAL_ZONE.into(),
            "--capacity".into(),
            capacity.into(),
            "--ready-file".into(),
            ready_file.clone().into(),
        ];
        let name = format!("replica-{node_id}");
        let program = self.binaries.replica.clone();
        let index = self.spawn(&name, program, args, String::new())?;
        let ready: ReadyFile = self
            .wait_ready(index, "ready file and GetInfo", || {
                let path = ready_file.clone();
                async move {
                    let text = std::fs::read_to_string(&path).ok()?;
                    let ready: ReadyFile = serde_json::from_str(&text).ok()?;
                    let mut client =
                        csi_client::replica(&ready.control.to_string(), Duration::from_secs(2))
                            .await
                            .ok()?;
                    client.get_info(GetInfoRequest {}).await.ok()?;
                    Some(ready)
                }
            })
            .await?;
        self.daemons[index].endpoint = format!("control {} data {}", ready.control, ready.data);
        self.replicas.push(ReplicaEndpoint {
            node_id: node_id.to_owned(),
            control: ready.control,
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
        let args: Vec<OsString> = vec![
            "--endpoint".into(),
            endpoint_of(&socket).into(),
            "--replicas".into(),
            self.replica_list().into(),
            "--extra-nodes".into(),
            LOCAL_NODE_ID.into(),
        ];
        let program = self.binaries.controller.clone();
        let index = self.spawn("controller", program, args, endpoint_of(&socket))?;
        self.wait_ready(index, "CSI Probe", || {
            let socket = socket.clone();
            async move { csi_client::probe_ready(&socket).await.then_some(()) }
        })
        .await
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
        let args: Vec<OsString> = vec!["engine-host".into(), "--state-dir".into(), state.into()];
        let program = self.binaries.node.clone();
        let index = self.spawn("engine-host", program, args, socket.display().to_string())?;
        self.wait_ready(index, "socket accepts connections", || {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(&socket)
                    .await
                    .ok()
                    .map(drop)
            }
        })
        .await
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
        let program = self.binaries.node.clone();
        let index = self.spawn("node-plugin", program, args, endpoint_of(&socket))?;
        self.wait_ready(index, "CSI Probe", || {
            let socket = socket.clone();
            async move { csi_client::probe_ready(&socket).await.then_some(()) }
        })
        .await
    }

    /// An error for the first daemon that exited on its own, if any.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for daemon in &mut self.daemons {
            if let Some(status) = daemon.exited() {
                return Err(daemon.failure(format_args!("exited unexpectedly ({status})")));
            }
        }
        Ok(())
    }

    /// The daemon named `name`, for log tails in error messages.
    pub fn daemon(&self, name: &str) -> Option<&Daemon> {
        self.daemons.iter().find(|d| d.name == name)
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
