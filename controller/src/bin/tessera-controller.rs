//! `tessera-controller`: the CSI controller plugin process.
//!
//! Discovers the replica daemons, loads the volume index from their records, then
//! serves CSI Identity + Controller + SnapshotMetadata on the `--endpoint` socket
//! until SIGINT/SIGTERM.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tessera_controller::controller_service::DEFAULT_COPY_WAIT;
use tessera_controller::endpoint::CsiEndpoint;
use tessera_controller::heal::{self, HealConfig};
use tessera_controller::k8s_snapshot_metadata::access::Access;
use tessera_controller::k8s_snapshot_metadata::{KubeSnapshotMetadata, DEFAULT_AUDIENCE};
use tessera_controller::kube_api::KubeApi;
use tessera_controller::metrics::Metrics;
use tessera_controller::{
    load_index, ControllerConfig, ControllerService, IdentityService, PoolConfig, ReplicaPool,
    SnapshotMetadataService,
};
use tessera_csi_proto::k8s_snapshot_metadata::snapshot_metadata_server::SnapshotMetadataServer as KubeSnapshotMetadataServer;
use tessera_csi_proto::v1::controller_server::ControllerServer;
use tessera_csi_proto::v1::identity_server::IdentityServer;
use tessera_csi_proto::v1::snapshot_metadata_server::SnapshotMetadataServer;
use tessera_replica_protocol::units::parse_duration;
use tessera_tls::{Identity, TlsArgs};
use tokio::sync::watch;

/// Tessera CSI controller plugin (Identity, Controller and SnapshotMetadata services).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// CSI endpoint: unix:///path/to/csi.sock (a stale socket file is removed first),
    /// or tcp://host:port for debugging.
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,

    #[command(flatten)]
    tls: TlsArgs,

    /// Control addresses of replica daemons, comma-separated host:port.
    #[arg(long, value_delimiter = ',')]
    replicas: Vec<String>,

    /// DNS name:port resolving to the replica daemons (e.g. a headless Service),
    /// re-resolved on every refresh.
    #[arg(long)]
    replicas_dns: Option<String>,

    /// Node ids volumes may be published to besides the replica daemons' nodes,
    /// comma-separated.
    #[arg(long, value_delimiter = ',')]
    extra_nodes: Vec<String>,

    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,

    /// Serve /healthz and /metrics over HTTP on this HOST:PORT.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,

    /// Deadline of every RPC to a replica daemon, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    rpc_timeout_ms: u64,

    /// How often daemons are re-discovered and asked for their info, in seconds.
    #[arg(long, default_value_t = 10)]
    refresh_interval_secs: u64,

    /// How long CreateVolume from a snapshot or volume waits for every replica to
    /// finish copying before answering ABORTED with the progress (the CO retries),
    /// e.g. `8s`, `500ms`, `1m` [default: 8s].
    #[arg(long, value_parser = parse_wait)]
    copy_wait: Option<Duration>,

    /// How long a replica daemon's node may be unreachable before its replicas are
    /// replaced on other nodes (and DeleteVolume stops waiting for it), e.g. `10m`,
    /// `30s` [default: 10m].
    #[arg(long, value_parser = parse_wait)]
    replacement_delay: Option<Duration>,

    /// How often the healing pass looks at every volume (replacements, rebuilds,
    /// missed creates and expansions, leftover copies), e.g. `10s` [default: 10s].
    #[arg(long, value_parser = parse_wait)]
    heal_interval: Option<Duration>,

    /// Serve the Kubernetes SnapshotMetadata API to backup applications on this
    /// HOST:PORT (TLS with --snapshot-metadata-tls-dir; every call's token is
    /// reviewed by the Kubernetes API server of this pod). Off unless given.
    #[arg(long)]
    snapshot_metadata_listen: Option<SocketAddr>,

    /// Directory with the SnapshotMetadata API's serving certificate and key
    /// (`tls.crt`, `tls.key`), for the name clients dial.
    #[arg(long, default_value = "/etc/tessera/snapshot-metadata-tls")]
    snapshot_metadata_tls_dir: PathBuf,

    /// The audience SnapshotMetadata tokens must be issued for (`kubectl create
    /// token SA --audience ...`).
    #[arg(long, default_value = DEFAULT_AUDIENCE)]
    snapshot_metadata_audience: String,
}

fn parse_wait(s: &str) -> Result<Duration, String> {
    parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration like 8s, 500ms or 1m"))
}

async fn shutdown_signal(mut rx: watch::Receiver<bool>) {
    // Either the sender flipped the flag or it is gone; both mean stop.
    let _ = rx.wait_for(|stop| *stop).await;
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    tessera_telemetry::init_tracing(tessera_telemetry::LogFormat::from_json_flag(args.log_json))?;
    let endpoint: CsiEndpoint = args.endpoint.parse()?;
    let statics: Vec<String> = args
        .replicas
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if statics.is_empty() && args.replicas_dns.is_none() {
        bail!("no replica daemons configured: pass --replicas and/or --replicas-dns");
    }
    let extra_nodes: BTreeSet<String> = args
        .extra_nodes
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();

    let transport = args
        .tls
        .start(Identity::Controller)
        .context("loading the controller's certificates")?;
    let pool = Arc::new(ReplicaPool::new(PoolConfig {
        static_addresses: statics,
        dns: args.replicas_dns.clone(),
        rpc_timeout: Duration::from_millis(args.rpc_timeout_ms.max(1)),
        transport: transport.clone(),
    }));
    pool.refresh().await;
    let live = pool.live().len();
    let (index, unlisted) = load_index(&pool).await;
    tracing::info!(
        daemons = pool.daemons().len(),
        live,
        unlisted,
        volumes = index.len(),
        "volume index loaded from replica daemons"
    );
    let index = Arc::new(index);
    let ready = Arc::new(AtomicBool::new(true));
    let metrics = Arc::new(Metrics::default());

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn({
        let pool = pool.clone();
        let stop = shutdown_signal(stop_rx.clone());
        let interval = Duration::from_secs(args.refresh_interval_secs.max(1));
        async move { pool.run_refresher(interval, stop).await }
    });
    if let Some(addr) = args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics listener {addr}"))?;
        tracing::info!(address = %listener.local_addr()?, "serving /metrics and /healthz");
        let endpoints = tessera_telemetry::Endpoints::new(
            Arc::new(tessera_telemetry::AlwaysHealthy),
            Arc::new(metrics.registry(pool.clone(), index.clone())),
        );
        let stopped = shutdown_signal(stop_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = tessera_telemetry::serve(listener, endpoints, stopped).await {
                tracing::error!(error = %tessera_telemetry::error_chain(&e), "metrics server failed");
            }
        });
    }
    let identity = IdentityService::new(ready.clone());
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        ready.store(false, Ordering::Release);
        let _ = stop_tx.send(true);
    });

    let snapshot_metadata = SnapshotMetadataService::new(pool.clone(), metrics.clone());
    let controller = ControllerService::new(
        pool,
        index,
        ControllerConfig {
            extra_nodes,
            copy_wait: args.copy_wait.unwrap_or(DEFAULT_COPY_WAIT),
            heal: HealConfig {
                replacement_delay: args
                    .replacement_delay
                    .unwrap_or(heal::DEFAULT_REPLACEMENT_DELAY),
                interval: args
                    .heal_interval
                    .unwrap_or(heal::DEFAULT_HEAL_INTERVAL)
                    .max(Duration::from_millis(100)),
            },
        },
        metrics,
    );
    // Internal clone snapshots left by a previous instance (clone done, or its
    // volume gone) are swept in the background.
    tokio::spawn({
        let controller = controller.clone();
        async move {
            let swept = controller.sweep_clone_snapshots().await;
            if swept > 0 {
                tracing::info!(swept, "internal clone snapshots swept at start");
            }
        }
    });
    tokio::spawn({
        let healer = controller.healer();
        let stop = shutdown_signal(stop_rx.clone());
        async move { healer.run(stop).await }
    });
    if let Some(addr) = args.snapshot_metadata_listen {
        let access = Access::new(
            KubeApi::in_cluster().context("--snapshot-metadata-listen needs the Kubernetes API")?,
            args.snapshot_metadata_audience.clone(),
        );
        let serving = tessera_tls::ServingCert::load(&args.snapshot_metadata_tls_dir)
            .context("loading the SnapshotMetadata API's serving certificate")?;
        // A rotated Secret is taken like the replica certificates: no restart.
        serving.spawn_reloader(args.tls.reload_period());
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --snapshot-metadata-listen {addr}"))?;
        tracing::info!(address = %listener.local_addr()?, audience = %args.snapshot_metadata_audience,
            "serving the Kubernetes SnapshotMetadata API");
        let service = KubeSnapshotMetadata::new(snapshot_metadata.clone(), access);
        let stop = shutdown_signal(stop_rx.clone());
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(KubeSnapshotMetadataServer::new(service))
                .serve_with_incoming_shutdown(
                    tessera_tls::grpc::incoming_without_client_auth(listener, serving),
                    stop,
                )
                .await;
            if let Err(e) = served {
                tracing::error!(error = %tessera_telemetry::error_chain(&e), "SnapshotMetadata API server failed");
            }
        });
    }
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(ControllerServer::new(controller))
        .add_service(SnapshotMetadataServer::new(snapshot_metadata));
    match endpoint {
        CsiEndpoint::Unix(path) => {
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(path = %path.display(), "removed stale socket"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("removing stale socket {}", path.display()))
                }
            }
            let listener = tokio::net::UnixListener::bind(&path)
                .with_context(|| format!("binding CSI socket {}", path.display()))?;
            tracing::info!(endpoint = %path.display(), "serving CSI Identity, Controller and SnapshotMetadata");
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    shutdown_signal(stop_rx),
                )
                .await?;
            let _ = std::fs::remove_file(&path);
        }
        CsiEndpoint::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("binding CSI endpoint {addr}"))?;
            tracing::info!(endpoint = %listener.local_addr()?, "serving CSI Identity, Controller and SnapshotMetadata over TCP");
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    shutdown_signal(stop_rx),
                )
                .await?;
        }
    }
    Ok(())
}

async fn wait_for_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
