//! `tessera-node`: the CSI node plugin and the node's engine-host, one binary.
//!
//! * `tessera-node plugin --endpoint ... --node-id ...` (also without the `plugin`
//!   word, as older scripts call it): serves CSI Identity and Node on a unix socket;
//!   the kubelet (or csi-sanity) is the client.
//! * `tessera-node engine-host --state-dir DIR`: the long-lived process that hosts
//!   every volume engine of the node and serves the engine-host API on
//!   `DIR/engine-host.sock`; the node plugin is its client.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use tessera_node::engine_host::metrics::HostProbe;
use tessera_node::engine_host::{self, EngineHost, SOCKET_NAME};
use tessera_node::frontend::FuseOptions;
use tessera_node::node_service::DEFAULT_MAX_VOLUMES_PER_NODE;
use tessera_node::plugin_registration::{self, PluginProbe, Registration, RegistrationState};
use tessera_node::NodeConfig;
use tessera_telemetry::prometheus_client::registry::Registry;
use tessera_telemetry::LogFormat;
use tessera_tls::metrics::TransportCollector;
use tessera_tls::{Identity, TlsArgs};
use tokio::net::UnixListener;
use tracing::{error, info, warn};

/// Default state directory of both the plugin and the engine-host.
const DEFAULT_STATE_DIR: &str = "/var/lib/tessera/node";

/// Tessera node: CSI node plugin (default) or engine-host.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Plugin flags, accepted without the `plugin` subcommand too.
    #[command(flatten)]
    plugin: PluginArgs,

    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the CSI Identity and Node services (the node plugin).
    Plugin(PluginArgs),
    /// Host the engines of every volume attached on this node.
    EngineHost(EngineHostArgs),
}

#[derive(Debug, Clone, Args)]
struct PluginArgs {
    /// CSI endpoint to serve, `unix:///path/to/csi.sock` (a plain path is accepted too).
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: Option<String>,

    /// Id of the node this plugin runs on (the Kubernetes node name).
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,

    /// Most volumes that may be published to this node at once.
    #[arg(long, default_value_t = DEFAULT_MAX_VOLUMES_PER_NODE)]
    max_volumes_per_node: i64,

    /// State directory shared with the engine-host; its socket is found there.
    #[arg(long, env = "TESSERA_NODE_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,

    /// Engine-host socket (default `<state-dir>/engine-host.sock`).
    #[arg(long)]
    engine_host_socket: Option<PathBuf>,

    /// Register with the kubelet by serving `pluginregistration.v1` on
    /// `<DIR>/tessera.csi.dev-reg.sock` (the kubelet's `plugins_registry` directory).
    #[arg(long, value_name = "DIR")]
    plugin_registration_dir: Option<PathBuf>,

    /// Serve `/healthz` and `/metrics` over HTTP on this address (e.g. `0.0.0.0:7420`).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Args)]
struct EngineHostArgs {
    /// State directory: FUSE mountpoints live under `<state-dir>/volumes`.
    #[arg(long, env = "TESSERA_NODE_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,

    /// Socket to serve the engine-host API on (default `<state-dir>/engine-host.sock`).
    #[arg(long)]
    socket: Option<PathBuf>,

    /// Serve `/healthz` and `/metrics` over HTTP on this address (e.g. `0.0.0.0:9810`).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,

    /// FUSE worker threads per volume.
    #[arg(long, default_value_t = FuseOptions::default().threads)]
    fuse_threads: usize,

    /// How often each engine asks its replicas for the volume's replica set, to
    /// learn that the controller replaced a lost replica (e.g. `10s`, `500ms`).
    #[arg(long, default_value = "10s", value_parser = parse_interval)]
    replica_set_poll: std::time::Duration,

    #[command(flatten)]
    tls: TlsArgs,
}

fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    tessera_replica_protocol::units::parse_duration(s)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{s:?} is not a nonzero duration like 10s, 500ms or 1m"))
}

/// Turns a CSI endpoint into a socket path.
fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    Ok(tessera_csi_proto::endpoint::unix_socket_path(endpoint)?)
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
            warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the process");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    info!("shutting down");
}

async fn run_plugin(args: PluginArgs) -> anyhow::Result<()> {
    let Some(endpoint) = args.endpoint else {
        bail!("--endpoint is required");
    };
    let node_id = args.node_id.unwrap_or_default();
    if node_id.is_empty() {
        bail!("--node-id is required and must not be empty");
    }
    if args.max_volumes_per_node < 0 {
        bail!("--max-volumes-per-node must not be negative");
    }
    let path = socket_path(&endpoint)?;
    let listener = bind(&path)?;
    let engine_host_socket = args
        .engine_host_socket
        .unwrap_or_else(|| args.state_dir.join(SOCKET_NAME));
    info!(socket = %path.display(), node_id = %node_id, engine_host = %engine_host_socket.display(), "serving CSI Identity and Node");

    let config = NodeConfig {
        node_id,
        max_volumes_per_node: args.max_volumes_per_node,
        engine_host_socket,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let registration = match &args.plugin_registration_dir {
        Some(dir) => {
            let reg = Registration::csi(tessera_csi_proto::DRIVER_NAME, &path);
            let reg_path = plugin_registration::socket_path(dir, tessera_csi_proto::DRIVER_NAME);
            let reg_listener = bind(&reg_path)?;
            info!(socket = %reg_path.display(), "serving kubelet plugin registration");
            let task = tokio::spawn(plugin_registration::serve(
                reg_listener,
                reg.clone(),
                stopped(stop_rx.clone()),
            ));
            Some((reg, reg_path, task))
        }
        None => None,
    };
    let probe = PluginProbe::new(registration.as_ref().map(|r| r.0.clone()));
    let metrics_task = match args.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --metrics-listen {addr}"))?;
            let done = stopped(stop_rx.clone());
            Some(tokio::spawn(tessera_telemetry::serve(
                listener,
                probe.endpoints(),
                done,
            )))
        }
        None => None,
    };
    // Stop on a signal, or when the kubelet refuses the registration (the pod restarts and
    // registers again, as with node-driver-registrar).
    let mut status = registration.as_ref().map(|r| r.0.status());
    let refused = async move {
        match status.as_mut() {
            Some(rx) => {
                let _ = rx
                    .wait_for(|s| matches!(s, RegistrationState::Failed(_)))
                    .await;
            }
            None => std::future::pending().await,
        }
    };
    let (refused_tx, refused_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        tokio::select! {
            () = shutdown_signal() => {}
            () = refused => { let _ = refused_tx.send(()); }
        }
    };
    let served = tessera_node::serve(listener, config, shutdown).await;
    let _ = stop_tx.send(true);
    if let Some((_, reg_path, task)) = registration {
        if let Ok(Err(e)) = task.await {
            warn!(error = %e, "plugin registration server failed");
        }
        let _ = std::fs::remove_file(&reg_path);
    }
    if let Some(task) = metrics_task {
        if let Ok(Err(e)) = task.await {
            warn!(error = %e, "metrics server failed");
        }
    }
    let _ = std::fs::remove_file(&path);
    served.context("serving CSI")?;
    if refused_rx.await.is_ok() {
        bail!("the kubelet refused the plugin registration");
    }
    Ok(())
}

async fn run_engine_host(args: EngineHostArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        warn!("not running as root: mounting FUSE files and attaching loop devices will fail");
    }
    let fuse = FuseOptions {
        threads: args.fuse_threads,
        ..FuseOptions::default()
    };
    let state_dir = args.state_dir.clone();
    let (host, report) = tokio::task::block_in_place(|| EngineHost::new(&state_dir, fuse))
        .context("starting the engine-host")?;
    let transport = args
        .tls
        .start(Identity::Node)
        .context("loading the node's certificates")?;
    let host = host
        .with_replica_set_poll(args.replica_set_poll)
        .with_transport(transport.clone());
    info!(
        ?report,
        "cleaned up what an earlier engine-host left behind"
    );
    let host = Arc::new(host);

    let socket = args
        .socket
        .unwrap_or_else(|| host.state_dir().join(SOCKET_NAME));
    let listener = bind(&socket)?;
    // Only root (the node plugin) may attach and detach volumes.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {socket:?}"))?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let metrics_task = match args.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --metrics-listen {addr}"))?;
            let mut registry = Registry::default();
            host.op_latency().register(
                &mut registry,
                "tessera_engine_op_duration_seconds",
                "Requests of a volume's engine by op, from the frontend's call to its answer \
                 (a write: acknowledged by a majority).",
            );
            registry.register_collector(Box::new(TransportCollector::new(
                "tessera_engine",
                transport.clone(),
            )));
            let endpoints = HostProbe(Arc::clone(&host)).endpoints(registry);
            let mut rx = stop_rx.clone();
            Some(tokio::spawn(tessera_telemetry::serve(
                listener,
                endpoints,
                async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                },
            )))
        }
        None => None,
    };
    info!(socket = %socket.display(), state_dir = %host.state_dir().display(), "engine-host ready");

    let served = engine_host::serve(listener, Arc::clone(&host), shutdown_signal()).await;
    let attached = host.list();
    if !attached.is_empty() {
        error!(volumes = ?attached.iter().map(|v| v.volume_id.as_str()).collect::<Vec<_>>(), "engine-host stopping with volumes attached: flushing and tearing them down; I/O on their mounts will fail until they are staged again");
    }
    host.shutdown().await;
    let _ = stop_tx.send(true);
    if let Some(task) = metrics_task {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "metrics server failed"),
            Err(e) => warn!(error = %e, "metrics server task failed"),
        }
    }
    let _ = std::fs::remove_file(&socket);
    served.context("serving the engine-host API")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tessera_telemetry::init_tracing(LogFormat::from_json_flag(cli.log_json))?;
    match cli.command {
        Some(Command::EngineHost(args)) => run_engine_host(args).await,
        Some(Command::Plugin(args)) => run_plugin(args).await,
        None => run_plugin(cli.plugin).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn plugin_flags_work_with_and_without_the_subcommand() {
        let bare = Cli::try_parse_from(["tessera-node", "--endpoint", "/s", "--node-id", "n1"])
            .expect("legacy form");
        assert!(bare.command.is_none());
        assert_eq!(bare.plugin.node_id.as_deref(), Some("n1"));
        let sub = Cli::try_parse_from([
            "tessera-node",
            "plugin",
            "--endpoint",
            "/s",
            "--node-id",
            "n1",
            "--state-dir",
            "/x",
        ])
        .expect("subcommand form");
        assert!(
            matches!(sub.command, Some(Command::Plugin(ref p)) if p.state_dir == Path::new("/x"))
        );
        let eh = Cli::try_parse_from(["tessera-node", "engine-host", "--state-dir", "/x"])
            .expect("engine-host");
        assert!(
            matches!(eh.command, Some(Command::EngineHost(ref a)) if a.state_dir == Path::new("/x")
                && a.replica_set_poll == std::time::Duration::from_secs(10))
        );
        let eh =
            Cli::try_parse_from(["tessera-node", "engine-host", "--replica-set-poll", "250ms"])
                .expect("engine-host with a poll");
        assert!(matches!(eh.command, Some(Command::EngineHost(ref a))
                if a.replica_set_poll == std::time::Duration::from_millis(250)));
        for bad in ["0s", "often"] {
            assert!(
                Cli::try_parse_from(["tessera-node", "engine-host", "--replica-set-poll", bad])
                    .is_err(),
                "{bad}"
            );
        }
    }
}
