//! The harness shared by the tests that drive the real `tessera-replica` binary:
//! start a daemon on a temp data directory, wait for its ready file, talk to its
//! control API, kill it (SIGKILL or SIGTERM) and reap it.
//!
//! Every daemon runs in its own process group and is killed in `Drop`; waits poll with
//! a deadline, never a fixed sleep.

// Each test crate that includes this module uses a different part of it.
#![allow(dead_code)]

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tessera_replica_protocol::control_proto as proto;
use tessera_replica_protocol::control_proto::replica_control_client::ReplicaControlClient;
use tonic::transport::Channel;

pub const START_TIMEOUT: Duration = Duration::from_secs(30);
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
pub const POLL: Duration = Duration::from_millis(20);

static STARTS: AtomicUsize = AtomicUsize::new(0);

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
}

/// Starts the daemon, returning it and its log path; or the exit status and log if it
/// exits before becoming ready.
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
    let child = Command::new(env!("CARGO_BIN_EXE_tessera-replica"))
        .arg("--data-dir")
        .arg(data_dir)
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
        };
        assert!(
            ready.get("metrics").is_some(),
            "ready file lacks the metrics key"
        );
        daemon
    }

    pub async fn client(&self) -> ReplicaControlClient<Channel> {
        ReplicaControlClient::connect(format!("http://{}", self.control))
            .await
            .expect("connect to control API")
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
