//! How `tessera up` tells that a daemon it started serves.
//!
//! A process that runs is not yet one that answers, and the next daemon (or the
//! demo) must not start before the previous one answers. Each kind of daemon has its
//! own sign, checked by polling: a replica daemon writes a ready file with its
//! addresses and answers GetInfo; CSI plugins answer Probe; the engine-host's socket
//! accepts connections. The same check serves the first start and every restart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use tessera_replica_protocol::control_proto::GetInfoRequest;
use tessera_tls::Transport;

use crate::csi_client;

/// The sign a daemon serves.
#[derive(Debug, Clone)]
pub enum Readiness {
    /// `tessera-replica --ready-file` wrote this file and GetInfo at its control
    /// address answers.
    ReplicaReadyFile(PathBuf),
    /// The CSI plugin on this socket answers Probe with ready.
    CsiProbe(PathBuf),
    /// This unix socket accepts connections.
    SocketAccepts(PathBuf),
}

/// The ready file `tessera-replica --ready-file` writes once it listens.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct ReplicaAddresses {
    /// Control gRPC address.
    pub control: SocketAddr,
    /// Data-plane address.
    pub data: SocketAddr,
}

/// What a ready daemon told about itself.
#[derive(Debug, Clone, Copy)]
pub enum Ready {
    /// A replica daemon and the addresses it listens on.
    Replica(ReplicaAddresses),
    /// Any other daemon.
    Serving,
}

impl Readiness {
    /// What is waited for, for messages.
    pub fn describe(&self) -> &'static str {
        match self {
            Readiness::ReplicaReadyFile(_) => "ready file and GetInfo",
            Readiness::CsiProbe(_) => "CSI Probe",
            Readiness::SocketAccepts(_) => "socket accepts connections",
        }
    }

    /// One check; `None` while not (yet) ready. Errors count as not ready: callers
    /// poll with a deadline. `transport` dials replica daemons (the CLI's identity).
    pub async fn check(&self, transport: &Transport) -> Option<Ready> {
        match self {
            Readiness::ReplicaReadyFile(path) => {
                let text = std::fs::read_to_string(path).ok()?;
                let ready: ReplicaAddresses = serde_json::from_str(&text).ok()?;
                let mut client = csi_client::replica(
                    &ready.control.to_string(),
                    transport,
                    Duration::from_secs(2),
                )
                .await
                .ok()?;
                client.get_info(GetInfoRequest {}).await.ok()?;
                Some(Ready::Replica(ready))
            }
            Readiness::CsiProbe(socket) => csi_client::probe_ready(socket)
                .await
                .then_some(Ready::Serving),
            Readiness::SocketAccepts(socket) => tokio::net::UnixStream::connect(socket)
                .await
                .ok()
                .map(|_| Ready::Serving),
        }
    }

    /// Removes a ready file a killed predecessor left, so a restart is judged by
    /// what the new process writes. (Sockets need no such care: each daemon removes
    /// a stale socket before binding, and a dead one refuses connections.)
    pub fn clear_stale(&self) -> anyhow::Result<()> {
        if let Readiness::ReplicaReadyFile(path) = self {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
        }
        Ok(())
    }
}
