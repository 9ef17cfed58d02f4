//! The harness shared by the tests that drive the real `tessera-replica` binary:
//! start a daemon on a temp data directory, wait for its ready file, talk to its
//! control API, kill it (SIGKILL or SIGTERM) and reap it.
//!
//! Daemons run with mutual TLS, as users get them: each test's work directory holds
//! one cluster CA and a certificate directory per identity ([`cluster_tls`]), every
//! daemon started there gets the replica certificate, and the test's own clients
//! present the identity of whom they play: the controller on the control port
//! ([`Daemon::client`]), an engine (node) on the data plane ([`Daemon::data_client`]).
//! Only a daemon started with `--insecure-plaintext` is talked to in plain text.
//!
//! Every daemon runs in its own process group and is killed in `Drop`; waits poll with
//! a deadline, never a fixed sleep.

// Each test crate that includes this module uses a different part of it.
#![allow(dead_code)]

use std::ffi::OsString;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tessera_replica_protocol::control_proto as proto;
use tessera_replica_protocol::control_proto::replica_control_client::ReplicaControlClient;
use tessera_replica_protocol::data::client::ClientConfig;
use tessera_replica_protocol::data::{ClientError, ReplicaDataClient};
use tessera_tls::generate::{identity_dir, ClusterCa, DEFAULT_VALIDITY};
use tessera_tls::{Identity, TlsContext, Transport};
use tonic::transport::Channel;

pub const START_TIMEOUT: Duration = Duration::from_secs(30);
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
pub const POLL: Duration = Duration::from_millis(20);

static STARTS: AtomicUsize = AtomicUsize::new(0);

/// Where in a test's work directory its cluster CA and certificates live.
pub const TLS_DIR: &str = "tls";

/// The flag that turns TLS off on a daemon (and on the clients of [`Daemon`]).
pub const PLAINTEXT: &str = "--insecure-plaintext";

/// Serialises making a work directory's CA (two daemons of one test may start at once).
static CA_LOCK: Mutex<()> = Mutex::new(());

/// The certificates of the test cluster in `work`, made on first use: `ca.crt`,
/// `ca.key` and one directory per identity ([`identity_dir`]), all from one CA of
/// this work directory's own.
pub fn cluster_tls(work: &Path) -> PathBuf {
    let root = work.join(TLS_DIR);
    let _made = CA_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !root.exists() {
        // Written aside and renamed: the directory is there whole or not at all.
        let partial = work.join(format!("{TLS_DIR}.partial"));
        let _ = fs::remove_dir_all(&partial);
        ClusterCa::generate(DEFAULT_VALIDITY)
            .expect("generate the test cluster's CA")
            .write_all(&partial, DEFAULT_VALIDITY)
            .expect("write the test cluster's certificates");
        fs::rename(&partial, &root).expect("move the certificates in place");
    }
    root
}

/// TLS presenting `identity`, with the certificates of the cluster in `tls_root`.
pub fn tls_transport(tls_root: &Path, identity: Identity) -> Transport {
    let dir = identity_dir(tls_root, identity);
    let context = TlsContext::load(&dir, identity)
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    Transport::tls(context)
}

/// A control-API client of the daemon at `control` through `transport`; an error
/// when it cannot connect (or the TLS handshake fails).
pub async fn control_client(
    control: &str,
    transport: &Transport,
) -> Result<ReplicaControlClient<Channel>, tonic::transport::Error> {
    let endpoint = tessera_tls::grpc::endpoint(control)?;
    let channel = tessera_tls::grpc::connect_channel(&endpoint, transport).await?;
    Ok(ReplicaControlClient::new(channel))
}

/// Polls `f` until it returns `Some`, or gives up after `timeout`.
pub async fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A running daemon; killed (whole process group) and reaped on drop.
pub struct Daemon {
    pub child: Child,
    pub control: String,
    pub data: String,
    pub metrics: Option<String>,
    pub log: PathBuf,
    pub ready_file: PathBuf,
    /// The cluster's certificates ([`cluster_tls`]); `None` for a daemon started
    /// with [`PLAINTEXT`].
    pub tls: Option<PathBuf>,
}

/// The cluster certificates a daemon started in `work` with `extra` uses: none when
/// `extra` turns TLS off.
fn tls_of(work: &Path, extra: &[&str]) -> Option<PathBuf> {
    (!extra.contains(&PLAINTEXT)).then(|| cluster_tls(work))
}

/// Starts the daemon, returning it and its log path; or the exit status and log if it
/// exits before becoming ready. It gets the replica certificate of the cluster in
/// `work` unless `extra` holds [`PLAINTEXT`].
pub fn spawn(work: &Path, data_dir: &Path, extra: &[&str]) -> (Child, PathBuf, PathBuf) {
    let n = STARTS.fetch_add(1, Ordering::SeqCst);
    let log = work.join(format!("daemon-{n}.log"));
    let ready = work.join(format!("ready-{n}.json"));
    let log_file = fs::File::create(&log).expect("create log file");
    let log_err = log_file.try_clone().expect("clone log fd");
    // A test that restarts a daemon on its old control port passes its own --listen.
    let listen: &[&str] = if extra.contains(&"--listen") {
        &[]
    } else {
        &["--listen", "127.0.0.1:0"]
    };
    let tls: Vec<OsString> = match tls_of(work, extra) {
        Some(root) => vec![
            "--tls-dir".into(),
            identity_dir(&root, Identity::Replica).into(),
        ],
        None => Vec::new(),
    };
    let child = Command::new(env!("CARGO_BIN_EXE_tessera-replica"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(tls)
        .args(listen)
        .args(["--data-listen", "127.0.0.1:0"])
        .args(["--node-id", "test-node", "--zone", "z1"])
        .arg("--ready-file")
        .arg(&ready)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .process_group(0)
        .spawn()
        .expect("spawn tessera-replica");
    (child, log, ready)
}

pub fn pgid(child: &Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"))
}

pub async fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    wait_for(timeout, || child.try_wait().ok().flatten()).await
}

impl Daemon {
    pub async fn start(work: &Path, data_dir: &Path, extra: &[&str]) -> Daemon {
        let (mut child, log, ready_file) = spawn(work, data_dir, extra);
        let ready = wait_for(START_TIMEOUT, || {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(status));
            }
            let text = fs::read_to_string(&ready_file).ok()?;
            serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .map(Ok)
        })
        .await;
        let ready = match ready {
            Some(Ok(v)) => v,
            Some(Err(status)) => panic!(
                "daemon exited with {status} before ready:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            ),
            None => {
                let _ = killpg(pgid(&child), Signal::SIGKILL);
                let _ = child.wait();
                panic!(
                    "daemon not ready within {START_TIMEOUT:?}:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                )
            }
        };
        let field = |k: &str| ready[k].as_str().map(str::to_string);
        let daemon = Daemon {
            control: field("control").expect("ready file has control"),
            data: field("data").expect("ready file has data"),
            metrics: field("metrics"),
            child,
            log,
            ready_file,
            tls: tls_of(work, extra),
        };
        assert!(
            ready.get("metrics").is_some(),
            "ready file lacks the metrics key"
        );
        daemon
    }

    /// How a client presenting `identity` talks to this daemon: TLS with that
    /// identity's certificate of the cluster, or plain text to a plain-text daemon.
    pub fn transport(&self, identity: Identity) -> Transport {
        match &self.tls {
            Some(root) => tls_transport(root, identity),
            None => Transport::plaintext(),
        }
    }

    /// A control-API client acting as the controller (who may call everything but
    /// ReadSnapshotBlocks).
    pub async fn client(&self) -> ReplicaControlClient<Channel> {
        self.client_as(Identity::Controller).await
    }

    /// A control-API client presenting `identity` (a replica reads snapshot blocks).
    pub async fn client_as(&self, identity: Identity) -> ReplicaControlClient<Channel> {
        control_client(&self.control, &self.transport(identity))
            .await
            .unwrap_or_else(|e| panic!("connect to control API as {identity}: {e:?}"))
    }

    /// How an engine (the node identity) connects to this daemon's data plane.
    pub fn data_config(&self) -> ClientConfig {
        ClientConfig {
            transport: self.transport(Identity::Node),
            ..ClientConfig::default()
        }
    }

    /// A data-plane connection as an engine (node identity) of `epoch`.
    pub async fn data_client(
        &self,
        volume: &str,
        epoch: u64,
    ) -> Result<ReplicaDataClient, ClientError> {
        ReplicaDataClient::connect_with(self.data.as_str(), volume, epoch, self.data_config()).await
    }

    /// The daemon's `/metrics` page (started with `--metrics-listen`).
    pub async fn metrics_page(&self) -> String {
        let addr = self.metrics.as_deref().expect("a metrics listener");
        http_get(addr, "/metrics").await
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, like a crash or the OOM killer; waits until reaped.
    pub async fn kill9(mut self) {
        killpg(pgid(&self.child), Signal::SIGKILL).expect("kill -9");
        let status = wait_exit(&mut self.child, EXIT_TIMEOUT).await;
        assert!(status.is_some(), "daemon survived SIGKILL");
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn terminate(mut self) -> ExitStatus {
        killpg(pgid(&self.child), Signal::SIGTERM).expect("SIGTERM");
        match wait_exit(&mut self.child, EXIT_TIMEOUT).await {
            Some(status) => status,
            None => panic!("daemon ignored SIGTERM:\n{}", self.log()),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = killpg(pgid(&self.child), Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// One plain HTTP/1.1 GET (the daemon's /metrics and /healthz); the whole answer.
pub async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

pub fn workdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tessera-daemon-test-")
        .tempdir()
        .expect("create temp dir")
}

pub fn create_req(id: &str, size: u64) -> proto::CreateVolumeRequest {
    proto::CreateVolumeRequest {
        volume_id: id.into(),
        name: format!("pv-{id}"),
        size_bytes: size,
        replication_factor: 3,
        access_type: "mount".into(),
        ..Default::default()
    }
}

pub fn get_req(id: &str) -> proto::GetVolumeRequest {
    proto::GetVolumeRequest {
        volume_id: id.into(),
    }
}

pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
