//! `tessera-node`: the CSI node plugin daemon.
//!
//! Serves CSI Identity and Node on a unix socket. The kubelet (or csi-sanity) is
//! the client.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Parser;
use tessera_node::node_service::DEFAULT_MAX_VOLUMES_PER_NODE;
use tessera_node::NodeConfig;
use tokio::net::UnixListener;
use tracing::info;

/// Tessera CSI node plugin.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// CSI endpoint to serve, `unix:///path/to/csi.sock` (a plain path is accepted too).
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,

    /// Id of the node this plugin runs on (the Kubernetes node name).
    #[arg(long, env = "NODE_ID")]
    node_id: String,

    /// Most volumes that may be published to this node at once.
    #[arg(long, default_value_t = DEFAULT_MAX_VOLUMES_PER_NODE)]
    max_volumes_per_node: i64,

    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,
}

/// Turns a CSI endpoint into a socket path.
fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let path = match endpoint.strip_prefix("unix://") {
        Some(rest) => rest,
        None if endpoint.contains("://") => {
            bail!("unsupported CSI endpoint {endpoint:?}: only unix:// sockets are served")
        }
        None => endpoint,
    };
    if path.is_empty() {
        bail!("CSI endpoint {endpoint:?} names no socket path");
    }
    Ok(PathBuf::from(path))
}

/// Binds the socket, replacing a stale one left by an earlier run.
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale socket {path:?}")),
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating socket directory {parent:?}"))?;
    }
    UnixListener::bind(path).with_context(|| format!("binding {path:?}"))
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the plugin");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    info!("shutting down");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if args.log_json {
        subscriber.json().init();
    } else {
        subscriber.init();
    }

    if args.node_id.is_empty() {
        bail!("--node-id must not be empty");
    }
    if args.max_volumes_per_node < 0 {
        bail!("--max-volumes-per-node must not be negative");
    }
    let path = socket_path(&args.endpoint)?;
    let listener = bind(&path)?;
    info!(socket = %path.display(), node_id = %args.node_id, "serving CSI Identity and Node");

    let config = NodeConfig {
        node_id: args.node_id,
        max_volumes_per_node: args.max_volumes_per_node,
    };
    tessera_node::serve(listener, config, shutdown_signal())
        .await
        .context("serving CSI")?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::socket_path;

    #[test]
    fn endpoint_forms() {
        assert_eq!(
            socket_path("unix:///run/csi/n.sock").expect("valid"),
            std::path::PathBuf::from("/run/csi/n.sock")
        );
        assert_eq!(
            socket_path("/tmp/x.sock").expect("valid"),
            std::path::PathBuf::from("/tmp/x.sock")
        );
        assert!(socket_path("tcp://127.0.0.1:1").is_err());
        assert!(socket_path("unix://").is_err());
    }
}
