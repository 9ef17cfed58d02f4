//! A replica daemon of the cluster: started, killed and restarted on its data
//! directory and ports, and the ready file it reports them in.

use super::*;

/// Ports a replica daemon reports in its ready file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct ReplicaAddrs {
    /// Control gRPC listener.
    pub control: SocketAddr,
    /// Data-plane listener.
    pub data: SocketAddr,
}

/// The ready file as written by `tessera-replica --ready-file`.
#[derive(Debug, Deserialize)]
pub(super) struct ReadyFile {
    pub(super) control: SocketAddr,
    pub(super) data: SocketAddr,
    /// `host:port` of /metrics, or null when `--metrics-listen` was not given.
    pub(super) metrics: Option<String>,
}

/// One replica daemon of a [`Cluster`].
#[derive(Debug)]
pub struct Replica {
    pub(super) daemon: Daemon,
    pub(super) node_id: String,
    pub(super) zone: String,
    pub(super) data_dir: PathBuf,
    pub(super) ready_file: PathBuf,
    pub(super) capacity: String,
    /// Appended to the command line ([`ClusterBuilder::replica_args`]).
    pub(super) extra_args: Vec<String>,
    /// Whether `--metrics-listen` is passed.
    pub(super) metrics_enabled: bool,
    /// Address the daemon listens on: loopback, or its host's address on the test
    /// network ([`ClusterBuilder::isolated_hosts`]).
    pub(super) listen_ip: std::net::IpAddr,
    /// `--tls-dir` (and `--tls-reload-secs`), or `--insecure-plaintext`.
    pub(super) tls_args: Vec<OsString>,
    /// What [`Replica::client`] dials with: the controller's identity.
    pub(super) transport: Transport,
    /// Ports of the first start, reused by every restart.
    pub(super) addrs: Option<ReplicaAddrs>,
    /// /metrics address of the current run (a new port at every start).
    pub(super) metrics_addr: Option<SocketAddr>,
}

impl Replica {
    /// `--node-id` of this daemon.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Process id of the running daemon (also its process group id).
    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    /// `--zone` of this daemon.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// `--data-dir` of this daemon.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Control gRPC address (stable across restarts).
    pub fn control_addr(&self) -> SocketAddr {
        self.addrs
            .map(|a| a.control)
            .expect("a Replica is only handed out after its first start reported its ports")
    }

    /// Data-plane address (stable across restarts).
    pub fn data_addr(&self) -> SocketAddr {
        self.addrs
            .map(|a| a.data)
            .expect("a Replica is only handed out after its first start reported its ports")
    }

    /// A fresh control-API client, acting as the controller (the only identity
    /// allowed to read records and change anything).
    pub async fn client(&self) -> anyhow::Result<ReplicaClient> {
        let addr = self.control_addr();
        let channel = connect_tcp(addr, &self.transport)
            .await
            .with_context(|| format!("connecting to replica {} at {addr}", self.node_id))?;
        Ok(ReplicaClient::new(channel))
    }

    /// Directory names under `<data dir>/volumes` (one per volume), sorted. A
    /// missing `volumes` directory counts as empty.
    pub fn volume_dirs_on_disk(&self) -> anyhow::Result<Vec<String>> {
        let volumes = self.data_dir.join("volumes");
        let entries = match std::fs::read_dir(&volumes) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", volumes.display())),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", volumes.display()))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    /// /metrics address of the running daemon, when the cluster was built with
    /// [`ClusterBuilder::replica_metrics`].
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The daemon's /metrics page, parsed (see [`crate::metrics`]). Fails when the
    /// cluster was built without [`ClusterBuilder::replica_metrics`] or the daemon does
    /// not answer.
    pub async fn metrics(&self) -> anyhow::Result<crate::metrics::Metrics> {
        let addr = self.metrics_addr.ok_or_else(|| {
            anyhow!(
                "replica {} serves no /metrics (ClusterBuilder::replica_metrics)",
                self.node_id
            )
        })?;
        crate::metrics::scrape(addr)
            .await
            .with_context(|| format!("scraping /metrics of replica {}", self.node_id))
    }

    /// Directory holding the record and data of `volume_id` on this daemon.
    pub fn volume_dir(&self, volume_id: &str) -> PathBuf {
        self.data_dir.join("volumes").join(volume_id)
    }

    pub(super) fn args(&self) -> Vec<OsString> {
        let any_port = SocketAddr::new(self.listen_ip, 0).to_string();
        let (listen, data_listen) = match self.addrs {
            Some(a) => (a.control.to_string(), a.data.to_string()),
            None => (any_port.clone(), any_port.clone()),
        };
        [
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
            self.capacity.clone().into(),
            "--ready-file".into(),
            self.ready_file.clone().into_os_string(),
        ]
        .into_iter()
        .chain(
            self.metrics_enabled
                .then(|| ["--metrics-listen".into(), any_port.into()])
                .into_iter()
                .flatten(),
        )
        .chain(self.tls_args.iter().cloned())
        .chain(self.extra_args.iter().map(OsString::from))
        .collect()
    }

    /// Starts the daemon and waits for its ready file.
    ///
    /// A restart asks for the ports of the first start. If the daemon exits before
    /// it is ready (the old port may still be held for a moment), it is started
    /// again until `timeout` runs out.
    pub(super) async fn start(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
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
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.wait_ready(remaining).await {
                Ok((addrs, metrics)) => {
                    if let Some(expected) = self.addrs {
                        anyhow::ensure!(
                            expected == addrs,
                            "{} came back on {addrs:?} instead of {expected:?}",
                            self.daemon.name()
                        );
                    }
                    self.addrs = Some(addrs);
                    self.metrics_addr = metrics;
                    return Ok(());
                }
                Err(ReadyError::Exited(status))
                    if self.addrs.is_some() && Instant::now() < deadline =>
                {
                    eprintln!(
                        "tessera-tests: {} exited ({status}) while restarting; retrying",
                        self.daemon.name()
                    );
                    // Back off briefly before asking for the same ports again.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    let _ = self.daemon.kill();
                    return Err(anyhow!(
                        "{} did not become ready: {e}\n{}",
                        self.daemon.name(),
                        self.daemon.log_tail(LOG_TAIL_LINES)
                    ));
                }
            }
        }
    }

    /// Waits for the ready file; returns the listeners' addresses and /metrics'.
    pub(super) async fn wait_ready(
        &mut self,
        timeout: Duration,
    ) -> Result<(ReplicaAddrs, Option<SocketAddr>), ReadyError> {
        let ready_file = self.ready_file.clone();
        let daemon = &mut self.daemon;
        let last_problem = RefCell::new(String::from("no ready file yet"));
        let outcome = poll_until(timeout, || {
            let result = if let Some(status) = daemon.exit_status() {
                Some(Err(ReadyError::Exited(status)))
            } else {
                match std::fs::read(&ready_file) {
                    Ok(bytes) => match serde_json::from_slice::<ReadyFile>(&bytes) {
                        Ok(ready) => match ready.metrics.as_deref().map(str::parse) {
                            Some(Err(e)) => {
                                *last_problem.borrow_mut() =
                                    format!("unparsable metrics address in the ready file: {e}");
                                None
                            }
                            metrics => Some(Ok((
                                ReplicaAddrs {
                                    control: ready.control,
                                    data: ready.data,
                                },
                                metrics.and_then(Result::ok),
                            ))),
                        },
                        Err(e) => {
                            *last_problem.borrow_mut() = format!("unparsable ready file: {e}");
                            None
                        }
                    },
                    Err(_) => None,
                }
            };
            std::future::ready(result)
        })
        .await;
        match outcome {
            Ok(result) => result,
            Err(timed_out) => Err(ReadyError::TimedOut(format!(
                "{timed_out} ({})",
                last_problem.borrow()
            ))),
        }
    }
}
