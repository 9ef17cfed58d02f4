//! A node of the cluster: its engine-host and node plugin, and the controller's
//! CSI plugin process they share the shape of.

use super::*;

/// The controller or node plugin: a daemon serving CSI on a unix socket.
#[derive(Debug)]
pub(super) struct CsiPlugin {
    pub(super) daemon: Daemon,
    pub(super) socket: PathBuf,
}

impl CsiPlugin {
    pub(super) async fn connect(&self) -> anyhow::Result<tonic::transport::Channel> {
        connect_unix(&self.socket).await.with_context(|| {
            format!(
                "connecting to {} at {}",
                self.daemon.name(),
                self.socket.display()
            )
        })
    }

    /// Starts the daemon and waits until Probe answers ready.
    pub(super) async fn start(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.daemon.start()?;
        let socket = self.socket.clone();
        let daemon = &mut self.daemon;
        let last_problem = RefCell::new(String::from("socket not answering yet"));
        let problem = &last_problem;
        let outcome = poll_until(timeout, || {
            let exited = daemon.exit_status();
            let socket = socket.clone();
            async move {
                if let Some(status) = exited {
                    return Some(Err(ReadyError::Exited(status)));
                }
                match probe(&socket).await {
                    Ok(true) => Some(Ok(())),
                    Ok(false) => {
                        *problem.borrow_mut() = "Probe answered ready=false".to_owned();
                        None
                    }
                    Err(e) => {
                        *problem.borrow_mut() = format!("{e:#}");
                        None
                    }
                }
            }
        })
        .await;
        let result = match outcome {
            Ok(result) => result,
            Err(timed_out) => Err(ReadyError::TimedOut(format!(
                "{timed_out} (last: {})",
                last_problem.borrow()
            ))),
        };
        result.map_err(|e| {
            let _ = self.daemon.kill();
            anyhow!(
                "{} did not become ready: {e}\n{}",
                self.daemon.name(),
                self.daemon.log_tail(LOG_TAIL_LINES)
            )
        })
    }
}

/// One node: an engine-host and the node plugin that drives it, sharing a state
/// directory (the engine-host's socket is `<state dir>/engine-host.sock`).
#[derive(Debug)]
pub struct NodeHost {
    pub(super) node_id: String,
    pub(super) state_dir: PathBuf,
    pub(super) engine_host: Daemon,
    pub(super) plugin: CsiPlugin,
    /// Whether the engine-host serves /metrics (`--metrics-listen 127.0.0.1:0`).
    pub(super) metrics_enabled: bool,
}

impl NodeHost {
    /// Prepares the node's daemons without starting them. The first node uses the
    /// short file names (see the module docs).
    /// With `metrics`, the engine-host also serves /metrics on a free port
    /// ([`NodeHost::engine_host_metrics`]). `tls_args` are the engine-host's
    /// transport flags (the plugin dials no replica). With `host`, both daemons run in
    /// that host's network namespace and /metrics listens on its address.
    pub(super) fn new(
        root: &Path,
        bin: &Path,
        node_id: &str,
        first: bool,
        metrics: bool,
        tls_args: Vec<OsString>,
        host: Option<&NetHost>,
    ) -> anyhow::Result<Self> {
        let suffix = if first {
            String::new()
        } else {
            format!("-{node_id}")
        };
        let state_dir = root.join(format!("node{suffix}-state"));
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let state_dir = canonical(&state_dir);
        let mut engine_host_args: Vec<OsString> = vec![
            "engine-host".into(),
            "--state-dir".into(),
            state_dir.clone().into_os_string(),
        ];
        engine_host_args.extend(tls_args);
        if metrics {
            let ip = host.map_or(LOOPBACK, |h| IpAddr::V4(h.addr()));
            engine_host_args.extend([
                "--metrics-listen".into(),
                SocketAddr::new(ip, 0).to_string().into(),
            ]);
        }
        let in_host = |daemon: Daemon| match host {
            Some(h) => daemon.in_netns(h.netns_path()),
            None => daemon,
        };
        let engine_host = in_host(Daemon::new(
            format!("engine-host{suffix}"),
            bin,
            engine_host_args,
            root.join(format!("engine-host{suffix}.log")),
        ));
        let socket = root.join(format!("node{suffix}.sock"));
        let plugin = CsiPlugin {
            daemon: in_host(Daemon::new(
                format!("node{suffix}"),
                bin,
                vec![
                    "plugin".into(),
                    "--endpoint".into(),
                    endpoint_of(&socket).into(),
                    "--node-id".into(),
                    node_id.into(),
                    "--state-dir".into(),
                    state_dir.clone().into_os_string(),
                ],
                root.join(format!("node{suffix}.log")),
            )),
            socket,
        };
        Ok(NodeHost {
            node_id: node_id.to_owned(),
            state_dir,
            engine_host,
            plugin,
            metrics_enabled: metrics,
        })
    }

    /// The node id the plugin reports (`--node-id`).
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The state directory shared by the engine-host and the plugin.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The engine-host API socket.
    pub fn engine_host_socket(&self) -> PathBuf {
        self.state_dir.join(ENGINE_HOST_SOCKET_NAME)
    }

    /// The node plugin's CSI endpoint (`unix://...`).
    pub fn endpoint(&self) -> String {
        endpoint_of(&self.plugin.socket)
    }

    /// Process id of the running engine-host.
    pub fn engine_host_pid(&self) -> Option<u32> {
        self.engine_host.pid()
    }

    /// The /metrics address of the running engine-host, when the cluster was built
    /// with [`ClusterBuilder::engine_host_metrics`]. The engine-host binds port 0 and
    /// does not report it, so this is its one listening TCP socket, found in `/proc`
    /// ([`crate::process::listening_tcp_addrs`]); waits up to 10 s for it to be
    /// bound (it is bound just after the API socket the start waits for). A restart
    /// gets a new port.
    pub async fn engine_host_metrics_addr(&self) -> anyhow::Result<SocketAddr> {
        anyhow::ensure!(
            self.metrics_enabled,
            "the engine-host on {} serves no /metrics (ClusterBuilder::engine_host_metrics)",
            self.node_id
        );
        let pid = self
            .engine_host
            .pid()
            .ok_or_else(|| anyhow!("the engine-host on {} is not running", self.node_id))?;
        only_tcp_listener(
            pid,
            &format!("/metrics of the engine-host on {}", self.node_id),
        )
        .await
    }

    /// The engine-host's /metrics page, parsed (see [`crate::metrics`]); the cluster
    /// must be built with [`ClusterBuilder::engine_host_metrics`].
    pub async fn engine_host_metrics(&self) -> anyhow::Result<crate::metrics::Metrics> {
        let addr = self.engine_host_metrics_addr().await?;
        crate::metrics::scrape(addr)
            .await
            .with_context(|| format!("scraping /metrics of the engine-host on {}", self.node_id))
    }

    /// Process id of the running node plugin.
    pub fn plugin_pid(&self) -> Option<u32> {
        self.plugin.daemon.pid()
    }

    /// A fresh CSI Node client (a new connection, so it works after restarts).
    pub async fn client(&self) -> anyhow::Result<NodeClient> {
        Ok(NodeClient::new(self.plugin.connect().await?))
    }

    /// Starts the engine-host and waits until its socket accepts connections (it
    /// binds only after cleaning up what an earlier instance left behind).
    pub(super) async fn start_engine_host(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let socket = self.engine_host_socket();
        // A socket file left by a killed instance must not count as ready.
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", socket.display())),
        }
        self.engine_host.start()?;
        let daemon = &mut self.engine_host;
        let outcome = poll_until(timeout, || {
            let exited = daemon.exit_status();
            let socket = socket.clone();
            async move {
                if let Some(status) = exited {
                    return Some(Err(ReadyError::Exited(status)));
                }
                tokio::net::UnixStream::connect(&socket)
                    .await
                    .ok()
                    .map(|_| Ok(()))
            }
        })
        .await;
        let result = match outcome {
            Ok(result) => result,
            Err(timed_out) => Err(ReadyError::TimedOut(format!(
                "{timed_out} (socket {} not accepting connections)",
                socket.display()
            ))),
        };
        result.map_err(|e| {
            let _ = self.engine_host.kill();
            anyhow!(
                "{} did not become ready: {e}\n{}",
                self.engine_host.name(),
                self.engine_host.log_tail(LOG_TAIL_LINES)
            )
        })
    }
}

/// File name of the engine-host socket inside a node's state directory.
pub const ENGINE_HOST_SOCKET_NAME: &str = "engine-host.sock";

pub(super) fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_owned())
}

/// Whether the CSI plugin at `socket` answers Probe with ready (unset means ready).
pub(super) async fn probe(socket: &Path) -> anyhow::Result<bool> {
    let channel = connect_unix(socket).await?;
    let response = IdentityClient::new(channel)
        .probe(ProbeRequest {})
        .await?
        .into_inner();
    Ok(response.ready.unwrap_or(true))
}
