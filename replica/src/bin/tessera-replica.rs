//! `tessera-replica`: the replica daemon. Stores the replicas of volumes in a data
//! directory and serves the control gRPC API and the data plane (block I/O for
//! engines) over the volumes' checksummed block stores.
//!
//! Start-up order matters to supervisors and tests: the data directory is locked and
//! loaded first (so a second daemon on the same directory fails before binding any
//! port), then every listener is bound, then `--ready-file` is written. Its JSON is
//! `{"control":"host:port","data":"host:port","metrics":"host:port"|null}` with
//! dialable (advertised) addresses.
//!
//! Disk I/O: one I/O scheduler serves the data directory (one backing device), on
//! io_uring by default (`--io-engine sync` selects the thread-pool reference engine).
//! Every volume registers with it at load or create, with the QoS of its record, and
//! its data files are opened `O_DIRECT` (see `tessera_replica::store` for the meta
//! files). Data-plane connections are served on `--data-plane-shards` threads, each
//! with its own io_uring: a request is read, stored and answered on one thread (the
//! scheduler's queues and limits still apply); while they are active, background I/O
//! is held to
//! `--background-busy-depth` requests in the device, in pieces of
//! `--background-max-transfer`.
//!
//! Restore/clone copies (`tessera_replica::copy`): volumes created with a copy source
//! are filled in the background; copies left incomplete by the previous run resume at
//! start, and `--copy-max-bandwidth` caps their traffic.
//!
//! Shutdown (SIGTERM/SIGINT, or the control server failing): every listener stops
//! accepting, the data plane answers the requests it has already read, copies stop
//! (they resume from their last checkpoint), then every open block store is flushed,
//! so writes acknowledged before the signal survive even without the engine's own
//! FLUSH. A kill -9 loses only unflushed writes, as the protocol allows.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tessera_replica::catalog::{Catalog, CatalogConfig, CatalogIo};
use tessera_replica::control_auth::AuthorizeLayer;
use tessera_replica::control_service::{ControlService, NodeInfo};
use tessera_replica::copy::{CopyConfig, CopyManager};
use tessera_replica::dataplane;
use tessera_replica::dataplane::server::ServerConfig;
use tessera_replica::dataplane::shards::Shards;
use tessera_replica::metrics::{CatalogHealth, DaemonMetrics};
use tessera_replica::scheduler::{
    BackgroundLimits, DeadlineBudgets, EngineKind, Scheduler, SchedulerConfig, DEFAULT_QUEUE_DEPTH,
};
use tessera_replica::scrub::{ScrubConfig, Scrubber};
use tessera_replica::snapshot_read::StreamPacing;
use tessera_replica::volume_registry::CatalogRegistry;
use tessera_replica_protocol::control_proto::replica_control_server::ReplicaControlServer;
use tessera_replica_protocol::units::{parse_duration, parse_size};
use tessera_telemetry::{Endpoints, LogFormat};
use tessera_tls::metrics::TransportCollector;
use tessera_tls::{Identity, TlsArgs};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Longest a clean shutdown waits for data-plane requests in flight.
const DATA_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Tessera replica daemon: keeps replicas of block volumes on local disk and serves
/// them to the controller (control gRPC) and to engines (data plane).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Directory for volume records and data; created if missing. Only one daemon may
    /// use a directory at a time.
    #[arg(long, env = "TESSERA_DATA_DIR")]
    data_dir: PathBuf,

    #[command(flatten)]
    tls: TlsArgs,

    /// HOST:PORT for the control gRPC API.
    #[arg(long, default_value = "0.0.0.0:7400")]
    listen: String,

    /// HOST:PORT for the data plane (block I/O protocol).
    #[arg(long, default_value = "0.0.0.0:7401")]
    data_listen: String,

    /// Node id reported to the controller [default: the hostname].
    #[arg(long, env = "TESSERA_NODE_ID")]
    node_id: Option<String>,

    /// Topology zone of this node ("" when the cluster has none).
    #[arg(long, default_value = "")]
    zone: String,

    /// Bytes offered to volumes, e.g. 500Gi or 2T (Ki/Mi/Gi/Ti = 1024^n,
    /// K/M/G/T = 1000^n) [default: size of the data directory's filesystem].
    #[arg(long, value_parser = parse_capacity)]
    capacity: Option<u64>,

    /// Bytes per second all restore/clone copies of this daemon may pull from the
    /// holders of their snapshots together, e.g. 100Mi (suffixes as for --capacity);
    /// 0 = unlimited.
    #[arg(long, value_parser = parse_capacity, default_value = "0")]
    copy_max_bandwidth: u64,

    /// Share of the time (0 < share <= 1) a copy stream this daemon serves to a
    /// rebuilding, restoring or cloning replica may work while this daemon's disk has
    /// foreground I/O; it pauses between chunks for the rest, so application I/O keeps
    /// its latency. 1 = never pause.
    #[arg(long, default_value_t = StreamPacing::default(), value_parser = parse_share)]
    copy_busy_share: StreamPacing,

    /// Time between the starts of two scrub passes, which read back and check every
    /// block of every volume and snapshot here and repair damaged ones from another
    /// replica, e.g. 168h, 30m, 2s; 0 disables scrubbing.
    #[arg(long, value_parser = parse_period, default_value = "168h")]
    scrub_period: Duration,

    /// Bytes per second a scrub pass reads at most (background I/O), e.g. 32Mi;
    /// 0 = unlimited.
    #[arg(long, value_parser = parse_capacity, default_value = "32Mi")]
    scrub_rate: u64,

    /// HOST:PORT for HTTP /healthz and /metrics; disabled when unset.
    #[arg(long)]
    metrics_listen: Option<String>,

    /// Host (name or IP) peers use to reach this daemon, when listening on a wildcard
    /// address [default: the bound IP, or 127.0.0.1 for 0.0.0.0 / ::].
    #[arg(long, env = "TESSERA_ADVERTISE_HOST")]
    advertise_host: Option<String>,

    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,

    /// Once every listener is bound, atomically write their dialable addresses here as
    /// JSON: {"control":..,"data":..,"metrics":..|null}. Removed at clean shutdown.
    #[arg(long)]
    ready_file: Option<PathBuf>,

    /// Engine executing disk I/O: `uring` (io_uring, one ring thread) or `sync`
    /// (blocking system calls on a thread pool; the reference, and a fallback where
    /// io_uring is unavailable).
    #[arg(long, value_enum, default_value_t = IoEngineArg::Uring)]
    io_engine: IoEngineArg,

    /// Most disk requests in flight at once across all volumes (1..=4096); deep enough
    /// to keep the device busy, shallow enough that deadlines, not the device queue,
    /// order requests.
    #[arg(long, default_value_t = DEFAULT_QUEUE_DEPTH, value_parser = clap::value_parser!(u32).range(1..=4096))]
    queue_depth: u32,

    /// Data-plane threads with an io_uring of their own (io_uring engine only): each
    /// connection is served, disk I/O included, on one of them, with no hand-off
    /// between threads per request. Default: one per CPU the process may use (at most
    /// 16). 0 serves connections on the main runtime and sends their I/O through the
    /// scheduler's ring thread.
    #[arg(long, value_parser = clap::value_parser!(u16).range(0..=256))]
    data_plane_shards: Option<u16>,

    /// Worker threads of `--io-engine sync` (each runs one request at a time).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    sync_io_threads: u16,

    /// Deadline budget of foreground reads, in milliseconds after arrival.
    #[arg(long, default_value_t = default_budgets().foreground_read.as_millis() as u64)]
    deadline_read_ms: u64,

    /// Deadline budget of foreground writes, flushes and trims, in milliseconds.
    #[arg(long, default_value_t = default_budgets().foreground_write.as_millis() as u64)]
    deadline_write_ms: u64,

    /// Deadline budget of background I/O (resync, rebuild, scrub), in milliseconds.
    #[arg(long, default_value_t = default_budgets().background.as_millis() as u64)]
    deadline_background_ms: u64,

    /// Most background requests (resync, rebuild, scrub, snapshot copies) in the
    /// device while foreground I/O is active (1..=4096); the rest wait in the
    /// scheduler, so foreground requests do not queue behind them in the device.
    #[arg(long, default_value_t = BackgroundLimits::default().busy_depth, value_parser = clap::value_parser!(u32).range(1..=4096))]
    background_busy_depth: u32,

    /// Background reads and writes larger than this go to the device in pieces of
    /// this size, one after the other (e.g. 128Ki; 0 = never split).
    #[arg(long, default_value = "128Ki", value_parser = parse_transfer)]
    background_max_transfer: usize,

    /// How long foreground I/O counts as active after its last request, in
    /// milliseconds (the background cap applies meanwhile).
    #[arg(long, default_value_t = BackgroundLimits::default().linger.as_millis() as u64)]
    foreground_linger_ms: u64,

    /// Open data files with buffered I/O instead of O_DIRECT (for filesystems without
    /// O_DIRECT, and for comparisons; the page cache then holds volume data).
    #[arg(long, hide = true)]
    buffered_io: bool,
}

/// `--io-engine` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum IoEngineArg {
    /// io_uring.
    Uring,
    /// Blocking system calls on worker threads.
    Sync,
}

fn default_budgets() -> DeadlineBudgets {
    DeadlineBudgets::default()
}

/// The scheduler configuration the flags ask for.
fn scheduler_config(args: &Args) -> Result<SchedulerConfig> {
    let budgets = DeadlineBudgets {
        foreground_read: Duration::from_millis(args.deadline_read_ms),
        foreground_write: Duration::from_millis(args.deadline_write_ms),
        background: Duration::from_millis(args.deadline_background_ms),
    };
    if budgets.foreground_read > budgets.foreground_write
        || budgets.foreground_write > budgets.background
    {
        anyhow::bail!(
            "deadline budgets must satisfy --deadline-read-ms <= --deadline-write-ms <= --deadline-background-ms"
        );
    }
    let name = args
        .data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    Ok(SchedulerConfig {
        name,
        engine: match args.io_engine {
            IoEngineArg::Uring => EngineKind::IoUring,
            IoEngineArg::Sync => EngineKind::Sync {
                threads: usize::from(args.sync_io_threads),
            },
        },
        queue_depth: args.queue_depth,
        deadlines: budgets,
        background: BackgroundLimits {
            busy_depth: args.background_busy_depth,
            max_transfer: args.background_max_transfer,
            linger: Duration::from_millis(args.foreground_linger_ms),
        },
    })
}

/// A piece size: a size like `128Ki`, 0 to 64 MiB (the largest transfer accepted).
fn parse_transfer(s: &str) -> Result<usize, String> {
    let bytes = parse_size(s.trim()).map_err(|e| e.to_string())?;
    match usize::try_from(bytes) {
        Ok(n) if n <= tessera_replica::scheduler::MAX_IO_LEN => Ok(n),
        _ => Err(format!(
            "{s} exceeds the largest transfer ({} bytes)",
            tessera_replica::scheduler::MAX_IO_LEN
        )),
    }
}

fn parse_period(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration like 168h, 30m or 2s"))
}

fn parse_share(s: &str) -> Result<StreamPacing, String> {
    let share: f64 = s.parse().map_err(|e| format!("not a number: {e}"))?;
    StreamPacing::new(share).map_err(|e| e.to_string())
}

fn parse_capacity(s: &str) -> Result<u64, String> {
    parse_size(s.trim()).map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = tessera_telemetry::init_tracing(LogFormat::from_json_flag(args.log_json)) {
        eprintln!("tessera-replica: {e}");
        return ExitCode::FAILURE;
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "tessera-replica failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    if let Some(path) = &args.ready_file {
        // A stale file from an earlier run must not be mistaken for this one.
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
        }
    }
    let node_id = match args.node_id.clone() {
        Some(id) => id,
        None => nix::unistd::gethostname()
            .context("reading the hostname for --node-id")?
            .to_string_lossy()
            .into_owned(),
    };

    let sched_config = scheduler_config(&args)?;
    let scheduler = Scheduler::new(sched_config.clone())
        .with_context(|| format!("starting the {:?} I/O engine", args.io_engine))?;
    info!(
        engine = scheduler.engine_name(),
        queue_depth = sched_config.queue_depth,
        deadlines = ?sched_config.deadlines,
        background = ?sched_config.background,
        direct = !args.buffered_io,
        "I/O scheduler started"
    );
    let io = CatalogIo {
        scheduler: Arc::new(scheduler),
        direct: !args.buffered_io,
    };
    let config = CatalogConfig {
        data_dir: args.data_dir.clone(),
        capacity_bytes: args.capacity,
    };
    // Blocking pool: opening the stores does scheduled I/O, which parks its thread.
    let catalog = tokio::task::spawn_blocking(move || Catalog::open_with_io(config, Some(io)))
        .await
        .context("catalog loader panicked")??;
    let catalog = Arc::new(catalog);

    let control_listener = bind(&args.listen, "--listen").await?;
    let data_listener = bind(&args.data_listen, "--data-listen").await?;
    let metrics_listener = match &args.metrics_listen {
        Some(addr) => Some(bind(addr, "--metrics-listen").await?),
        None => None,
    };

    let host = args.advertise_host.as_deref();
    let control_addr = advertised(control_listener.local_addr()?, host);
    let data_addr = advertised(data_listener.local_addr()?, host);
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(advertised(l.local_addr()?, host)),
        None => None,
    };
    if host.is_none() && data_listener.local_addr()?.ip().is_unspecified() {
        warn!(
            data_address = %data_addr,
            "listening on a wildcard address without --advertise-host; other nodes cannot dial the advertised address"
        );
    }

    let transport = args
        .tls
        .start(Identity::Replica)
        .context("loading the replica's certificates")?;
    let copies = CopyManager::new(
        Arc::clone(&catalog),
        CopyConfig {
            max_bandwidth: args.copy_max_bandwidth,
            transport: transport.clone(),
            ..CopyConfig::default()
        },
    );
    let service = ControlService::new(
        Arc::clone(&catalog),
        NodeInfo {
            node_id: node_id.clone(),
            zone: args.zone.clone(),
            data_address: data_addr.clone(),
        },
    )
    .with_copies(Arc::clone(&copies))
    .with_stream_pacing(args.copy_busy_share);

    // Shared so that both a signal and a failing control server can stop the rest.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    {
        let stop_tx = Arc::clone(&stop_tx);
        tokio::spawn(async move {
            match wait_for_signal().await {
                Ok(name) => info!(signal = name, "shutting down"),
                Err(e) => error!(error = %e, "cannot listen for signals; shutting down"),
            }
            let _ = stop_tx.send(true);
        });
    }

    let scrubber = Arc::new(Scrubber::new(
        Arc::clone(&catalog),
        ScrubConfig {
            period: args.scrub_period,
            rate: args.scrub_rate,
            node_id: node_id.clone(),
            peer_timeout: Duration::from_secs(10),
            transport: transport.clone(),
        },
    ));
    let mut metrics = DaemonMetrics::new(
        Arc::clone(&catalog),
        &node_id,
        service.requests(),
        Some(Arc::clone(&copies)),
    );
    metrics
        .registry
        .register_collector(Box::new(scrubber.collector()));
    metrics
        .registry
        .register_collector(Box::new(TransportCollector::new(
            "tessera_replica",
            transport.clone(),
        )));
    let metrics_task = metrics_listener.map(|listener| {
        let endpoints = Endpoints::new(
            Arc::new(CatalogHealth(Arc::clone(&catalog))),
            Arc::new(metrics.registry),
        );
        tokio::spawn(tessera_telemetry::serve(
            listener,
            endpoints,
            stopped(stop_rx.clone()),
        ))
    });

    let registry = Arc::new(CatalogRegistry::new(Arc::clone(&catalog)));
    let shard_count = args.data_plane_shards.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get().min(16)),
        usize::from,
    );
    let shards = match args.io_engine {
        IoEngineArg::Uring if shard_count > 0 => Some(Arc::new(
            Shards::start(shard_count, args.queue_depth)
                .context("starting the data-plane shards (--data-plane-shards)")?,
        )),
        _ => None,
    };
    info!(
        shards = shards.as_ref().map_or(0, |s| s.len()),
        "data-plane shards started"
    );
    let data_config = ServerConfig {
        shards,
        op_latency: Some(metrics.data_latency.clone()),
        transport: transport.clone(),
        ..ServerConfig::default()
    };
    let data_task = tokio::spawn(dataplane::server::serve_with_config(
        data_listener,
        registry,
        data_config,
        stopped(stop_rx.clone()),
    ));

    if let Some(path) = &args.ready_file {
        let ready = serde_json::json!({
            "control": control_addr,
            "data": data_addr,
            "metrics": metrics_addr,
        });
        write_atomically(path, ready.to_string().as_bytes())
            .with_context(|| format!("writing ready file {}", path.display()))?;
    }
    // After the ready file: a copy may read from this very daemon, whose control
    // server starts below; its first attempt retries until then.
    copies.resume_all();
    tokio::spawn(Arc::clone(&scrubber).run(stop_rx.clone()));
    info!(
        node_id = %node_id,
        control = %control_addr,
        copy_max_bandwidth = args.copy_max_bandwidth,
        scrub_period = ?args.scrub_period,
        scrub_rate = args.scrub_rate,
        data = %data_addr,
        metrics = metrics_addr.as_deref().unwrap_or("disabled"),
        version = env!("CARGO_PKG_VERSION"),
        "tessera-replica ready"
    );

    let served = tonic::transport::Server::builder()
        .layer(AuthorizeLayer::new(transport.clone()))
        .add_service(ReplicaControlServer::new(service))
        .serve_with_incoming_shutdown(
            tessera_tls::grpc::incoming(control_listener, transport.clone()),
            stopped(stop_rx.clone()),
        )
        .await;
    // Whatever ended the control server ends the daemon.
    let _ = stop_tx.send(true);
    // The data plane drains: requests already read are answered. An engine that keeps
    // its connection open without sending does not hold shutdown up (the server stops
    // reading at shutdown); the bound is for a disk that stopped answering.
    let data_abort = data_task.abort_handle();
    match tokio::time::timeout(DATA_DRAIN_TIMEOUT, data_task).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "data-plane server task failed"),
        Err(_) => {
            warn!(timeout = ?DATA_DRAIN_TIMEOUT, "data plane did not drain in time; closing its connections");
            data_abort.abort();
        }
    }
    // Copies stop before the final flush; they resume from their last checkpoint.
    copies.stop_all().await;
    let flushed = {
        let catalog = Arc::clone(&catalog);
        tokio::task::spawn_blocking(move || catalog.flush_all()).await
    };
    let flushed = match flushed {
        Ok(r) => r.context("flushing volumes at shutdown"),
        Err(e) => Err(anyhow::anyhow!("flush task failed: {e}")),
    };
    if let Some(task) = metrics_task {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => warn!(error = %e, "metrics server failed"),
            Ok(Err(e)) => warn!(error = %e, "metrics server task failed"),
            Err(_) => warn!("metrics server did not stop in time"),
        }
    }
    if let Some(path) = &args.ready_file {
        let _ = std::fs::remove_file(path);
    }
    served.context("control gRPC server failed")?;
    flushed?;
    info!("stopped");
    Ok(())
}

async fn bind(addr: &str, flag: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {flag} {addr}"))
}

/// The address peers should dial for a listener bound at `bound`.
fn advertised(bound: SocketAddr, host: Option<&str>) -> String {
    match host {
        Some(h) if h.contains(':') && !h.starts_with('[') => format!("[{h}]:{}", bound.port()),
        Some(h) => format!("{h}:{}", bound.port()),
        None if bound.ip().is_unspecified() => format!("127.0.0.1:{}", bound.port()),
        None => bound.to_string(),
    }
}

/// Completes once shutdown has been requested (or the sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn wait_for_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Writes `bytes` to `path` via a temp file and rename, so readers never see a
/// partial file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
