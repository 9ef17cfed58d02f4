//! `tessera-bench`: the helper `bench/data-path-fio` and `bench/snapshots` use
//! (grpcurl is not needed).
//!
//! * `attach`: CreateVolume (a raw block volume by default), ControllerPublishVolume,
//!   NodeStageVolume and NodePublishVolume, as Kubernetes would; prints shell
//!   assignments: `VOLUME_ID`, `DEVICE` (the published device file, what a pod
//!   opens) and `LOOP_DEVICE` (the `/dev/loopN` behind it).
//! * `detach`: NodeUnpublish, NodeUnstage, ControllerUnpublish and (with `--delete`)
//!   DeleteVolume. Each step is tried even when an earlier one failed, so a teardown
//!   gets as far as it can.
//! * `fio-table`: turns pairs of fio JSON results (Tessera and the baseline) into a
//!   markdown table with both and their ratio.
//! * `fio-summary`: one fio JSON result as shell assignments (`IOPS`, `MIB_S`,
//!   `P50_US`, `P99_US`).
//! * `snapshot`: CreateSnapshot, timed; prints `SNAPSHOT_ID` and `SECONDS`.
//! * `copy`: CreateVolume restoring a snapshot or cloning a volume, retried while
//!   the controller answers ABORTED (copy still running), timed from the first call
//!   to the volume; prints `VOLUME_ID`, `SECONDS` and `ABORTED` (answers seen).
//! * `delete-volume`: DeleteVolume.
//! * `placement`: node ids of the replica daemons holding a volume (from their
//!   records), comma-separated. It reads records as the controller: `--tls-dir` the
//!   controller's certificate directory (`CONTROLLER_TLS_DIR` of
//!   `tessera-test-cluster`'s env file), or `--plaintext` for a cluster started with
//!   `tessera-test-cluster --plaintext`.

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::Value;
use tessera_csi_proto::v1::{
    CapacityRange, CreateVolumeRequest, DeleteVolumeRequest, NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest, Topology, TopologyRequirement,
};
use tessera_replica_protocol::control_proto::ListVolumesRequest as ReplicaListVolumes;
use tessera_tests::csi::{connect_tcp, connect_unix, ControllerClient, NodeClient, ReplicaClient};
use tessera_tests::fixtures::{
    create_volume_waiting, from_snapshot, from_volume, snapshot_request,
};
use tessera_tests::lifecycle::{attach, block_capability, filesystem_capability, Attachment};
use tessera_tls::{Identity, TlsContext, Transport};

#[derive(Debug, Parser)]
#[command(about = "CSI and fio helpers for bench/data-path-fio")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct Endpoints {
    /// Controller CSI endpoint (`unix:///...`).
    #[arg(long)]
    controller: String,
    /// Node plugin CSI endpoint (`unix:///...`).
    #[arg(long)]
    node: String,
    /// Node id the node plugin runs as.
    #[arg(long, default_value = "n1")]
    node_id: String,
    /// NodeStageVolume staging path.
    #[arg(long)]
    staging: PathBuf,
    /// NodePublishVolume target path.
    #[arg(long)]
    target: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a volume and make it usable on the node; prints VOLUME_ID, DEVICE, LOOP_DEVICE.
    Attach {
        #[command(flatten)]
        endpoints: Endpoints,
        /// Volume name (CreateVolume is idempotent by name).
        #[arg(long)]
        name: String,
        /// Size in bytes.
        #[arg(long)]
        size: u64,
        /// Mount a filesystem of this type instead of publishing a raw block device.
        #[arg(long)]
        fs_type: Option<String>,
        /// StorageClass parameters, `key=value` (repeatable).
        #[arg(long = "param")]
        params: Vec<String>,
        /// Place the volume on the replica daemons of this zone.
        #[arg(long)]
        zone: Option<String>,
    },
    /// Undo `attach`.
    Detach {
        #[command(flatten)]
        endpoints: Endpoints,
        /// The volume.
        #[arg(long)]
        volume_id: String,
        /// Also DeleteVolume.
        #[arg(long)]
        delete: bool,
    },
    /// One fio JSON result as shell assignments.
    FioSummary {
        /// The fio JSON output file.
        file: PathBuf,
    },
    /// CreateSnapshot, timed.
    Snapshot {
        /// Controller CSI endpoint (`unix:///...`).
        #[arg(long)]
        controller: String,
        /// Snapshot name.
        #[arg(long)]
        name: String,
        /// The source volume.
        #[arg(long)]
        volume_id: String,
    },
    /// CreateVolume from a snapshot or a volume, retried while ABORTED, timed.
    Copy {
        /// Controller CSI endpoint (`unix:///...`).
        #[arg(long)]
        controller: String,
        /// Volume name.
        #[arg(long)]
        name: String,
        /// Size in bytes.
        #[arg(long)]
        size: u64,
        /// Restore this snapshot.
        #[arg(
            long,
            conflicts_with = "volume_id",
            required_unless_present = "volume_id"
        )]
        snapshot_id: Option<String>,
        /// Clone this volume.
        #[arg(long)]
        volume_id: Option<String>,
        /// Place the new volume on the replica daemons of this zone.
        #[arg(long)]
        zone: Option<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 1800)]
        timeout_secs: u64,
    },
    /// DeleteVolume.
    DeleteVolume {
        /// Controller CSI endpoint (`unix:///...`).
        #[arg(long)]
        controller: String,
        /// The volume.
        #[arg(long)]
        volume_id: String,
    },
    /// Node ids of the replica daemons holding a volume.
    Placement {
        /// Control addresses of every replica daemon, comma-separated.
        #[arg(long, value_delimiter = ',')]
        replicas: Vec<std::net::SocketAddr>,
        /// The volume.
        #[arg(long)]
        volume_id: String,
        #[command(flatten)]
        transport: TransportArgs,
    },
    /// Markdown table from fio JSON results.
    FioTable {
        /// `LABEL=TESSERA_JSON,BASELINE_JSON` (repeatable, in table order).
        #[arg(long = "pair", required = true)]
        pairs: Vec<String>,
        /// Labels whose completion-latency percentiles (p50, p99) get rows too.
        #[arg(long = "latency")]
        latency: Vec<String>,
        /// Column heading of the first result of each pair.
        #[arg(long, default_value = "Tessera RF=3")]
        first: String,
        /// Column heading of the second result of each pair.
        #[arg(long, default_value = "loop on local file")]
        second: String,
    },
}

/// How to reach the replica daemons' control ports, acting as the controller.
#[derive(Debug, clap::Args)]
struct TransportArgs {
    /// The controller's certificate directory (`ca.crt`, `tls.crt`, `tls.key`).
    #[arg(long, required_unless_present = "plaintext")]
    tls_dir: Option<PathBuf>,
    /// The daemons run with `--insecure-plaintext` (`tessera-test-cluster --plaintext`).
    #[arg(long, conflicts_with = "tls_dir")]
    plaintext: bool,
}

impl TransportArgs {
    fn transport(&self) -> anyhow::Result<Transport> {
        match &self.tls_dir {
            Some(dir) if !self.plaintext => {
                let context = TlsContext::load(dir, Identity::Controller).with_context(|| {
                    format!("loading the controller certificate in {}", dir.display())
                })?;
                Ok(Transport::tls(context))
            }
            _ => Ok(Transport::plaintext()),
        }
    }
}

fn socket_of(endpoint: &str) -> anyhow::Result<PathBuf> {
    Ok(tessera_csi_proto::endpoint::unix_socket_path(endpoint)?)
}

async fn clients(e: &Endpoints) -> anyhow::Result<(ControllerClient, NodeClient)> {
    let controller = connect_unix(&socket_of(&e.controller)?)
        .await
        .with_context(|| format!("connecting to the controller at {}", e.controller))?;
    let node = connect_unix(&socket_of(&e.node)?)
        .await
        .with_context(|| format!("connecting to the node plugin at {}", e.node))?;
    Ok((ControllerClient::new(controller), NodeClient::new(node)))
}

/// `/dev/loopN` for the block device file `path` (found by device number).
fn loop_device_of(path: &Path) -> anyhow::Result<PathBuf> {
    let meta = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    if !meta.file_type().is_block_device() {
        bail!("{} is not a block device", path.display());
    }
    let rdev = meta.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let link = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}"))
        .with_context(|| format!("resolving device {major}:{minor}"))?;
    let name = link
        .file_name()
        .context("device link without a name")?
        .to_owned();
    Ok(Path::new("/dev").join(name))
}

/// Requisite and preferred topology of one zone.
fn zone_requirement(zone: Option<String>) -> Option<TopologyRequirement> {
    zone.map(|zone| {
        let topology = Topology {
            segments: HashMap::from([(tessera_csi_proto::TOPOLOGY_ZONE_KEY.to_owned(), zone)]),
        };
        TopologyRequirement {
            requisite: vec![topology.clone()],
            preferred: vec![topology],
        }
    })
}

async fn controller_client(endpoint: &str) -> anyhow::Result<ControllerClient> {
    let channel = connect_unix(&socket_of(endpoint)?)
        .await
        .with_context(|| format!("connecting to the controller at {endpoint}"))?;
    Ok(ControllerClient::new(channel))
}

async fn run_attach(
    e: Endpoints,
    name: String,
    size: u64,
    fs_type: Option<String>,
    params: Vec<String>,
    zone: Option<String>,
) -> anyhow::Result<()> {
    let (mut controller, mut node) = clients(&e).await?;
    let parameters: HashMap<String, String> = params
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--param {p:?} is not key=value"))
        })
        .collect::<anyhow::Result<_>>()?;
    let capability = match &fs_type {
        Some(fs) => filesystem_capability(fs),
        None => block_capability(),
    };
    let volume = controller
        .create_volume(CreateVolumeRequest {
            name: name.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: i64::try_from(size).context("size")?,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![capability.clone()],
            parameters,
            accessibility_requirements: zone_requirement(zone),
            ..Default::default()
        })
        .await
        .with_context(|| format!("CreateVolume {name}"))?
        .into_inner()
        .volume
        .context("CreateVolume returned no volume")?;
    let a: Attachment = attach(
        &mut controller,
        &mut node,
        &volume,
        &e.node_id,
        capability,
        &e.staging,
        &e.target,
    )
    .await?;
    println!("VOLUME_ID={}", a.volume_id);
    println!("EPOCH={}", a.epoch());
    println!("DEVICE={}", a.target.display());
    if fs_type.is_none() {
        println!("LOOP_DEVICE={}", loop_device_of(&a.target)?.display());
    }
    Ok(())
}

async fn run_detach(e: Endpoints, volume_id: String, delete: bool) -> anyhow::Result<()> {
    let (mut controller, mut node) = clients(&e).await?;
    let mut failures = Vec::new();
    if let Err(s) = node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: volume_id.clone(),
            target_path: e.target.to_string_lossy().into_owned(),
        })
        .await
    {
        failures.push(format!("NodeUnpublishVolume: {s}"));
    }
    if let Err(s) = node
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: volume_id.clone(),
            staging_target_path: e.staging.to_string_lossy().into_owned(),
        })
        .await
    {
        failures.push(format!("NodeUnstageVolume: {s}"));
    }
    if let Err(s) = controller
        .controller_unpublish_volume(tessera_csi_proto::v1::ControllerUnpublishVolumeRequest {
            volume_id: volume_id.clone(),
            node_id: e.node_id.clone(),
            secrets: HashMap::new(),
        })
        .await
    {
        failures.push(format!("ControllerUnpublishVolume: {s}"));
    }
    if delete && failures.is_empty() {
        if let Err(s) = controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: volume_id.clone(),
                secrets: HashMap::new(),
            })
            .await
        {
            failures.push(format!("DeleteVolume: {s}"));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        bail!("detaching {volume_id}: {}", failures.join("; "))
    }
}

async fn run_snapshot(controller: String, name: String, volume_id: String) -> anyhow::Result<()> {
    let mut client = controller_client(&controller).await?;
    let started = Instant::now();
    let snapshot = client
        .create_snapshot(snapshot_request(&name, &volume_id))
        .await
        .with_context(|| format!("CreateSnapshot {name} of {volume_id}"))?
        .into_inner()
        .snapshot
        .context("CreateSnapshot returned no snapshot")?;
    let took = started.elapsed();
    if !snapshot.ready_to_use {
        bail!("snapshot {} is not ready to use", snapshot.snapshot_id);
    }
    println!("SNAPSHOT_ID={}", snapshot.snapshot_id);
    println!("SECONDS={:.6}", took.as_secs_f64());
    Ok(())
}

/// Arguments of `copy`.
struct CopyArgs {
    controller: String,
    name: String,
    size: u64,
    snapshot_id: Option<String>,
    volume_id: Option<String>,
    zone: Option<String>,
    timeout: Duration,
}

async fn run_copy(a: CopyArgs) -> anyhow::Result<()> {
    let mut client = controller_client(&a.controller).await?;
    let request = CreateVolumeRequest {
        name: a.name.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: i64::try_from(a.size).context("size")?,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![block_capability()],
        accessibility_requirements: zone_requirement(a.zone),
        ..Default::default()
    };
    let request = match (&a.snapshot_id, &a.volume_id) {
        (Some(snapshot), None) => from_snapshot(request, snapshot),
        (None, Some(volume)) => from_volume(request, volume),
        _ => bail!("give exactly one of --snapshot-id and --volume-id"),
    };
    let created = create_volume_waiting(&mut client, request, a.timeout).await?;
    println!("VOLUME_ID={}", created.volume.volume_id);
    println!("SECONDS={:.3}", created.took.as_secs_f64());
    println!("ABORTED={}", created.aborted.len());
    Ok(())
}

async fn run_delete_volume(controller: String, volume_id: String) -> anyhow::Result<()> {
    controller_client(&controller)
        .await?
        .delete_volume(DeleteVolumeRequest {
            volume_id: volume_id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .with_context(|| format!("DeleteVolume {volume_id}"))?;
    Ok(())
}

async fn run_placement(
    replicas: Vec<std::net::SocketAddr>,
    volume_id: String,
    transport: Transport,
) -> anyhow::Result<()> {
    let mut holders = Vec::new();
    for addr in replicas {
        let channel = connect_tcp(addr, &transport)
            .await
            .with_context(|| format!("connecting to the replica daemon at {addr}"))?;
        let mut client = ReplicaClient::new(channel);
        let info = client
            .get_info(tessera_replica_protocol::control_proto::GetInfoRequest {})
            .await
            .with_context(|| format!("GetInfo on {addr}"))?
            .into_inner();
        let records = client
            .list_volumes(ReplicaListVolumes {})
            .await
            .with_context(|| format!("ListVolumes on {addr}"))?
            .into_inner()
            .volumes;
        if records.iter().any(|r| r.volume_id == volume_id) {
            holders.push(info.node_id);
        }
    }
    holders.sort();
    println!("{}", holders.join(","));
    Ok(())
}

fn run_fio_summary(file: &Path) -> anyhow::Result<()> {
    let n = read_fio(file)?;
    println!("IOPS={:.0}", n.iops);
    println!("MIB_S={:.1}", n.bytes_per_sec / f64::from(1u32 << 20));
    println!("P50_US={:.0}", n.p50_us.unwrap_or(0.0));
    println!("P99_US={:.0}", n.p99_us.unwrap_or(0.0));
    Ok(())
}

/// What the table shows of one fio run (its only job).
#[derive(Debug, Clone, Copy)]
struct FioNumbers {
    iops: f64,
    bytes_per_sec: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
}

fn read_fio(path: &Path) -> anyhow::Result<FioNumbers> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // fio may print notices before the JSON document.
    let start = text
        .find('{')
        .with_context(|| format!("no JSON in {}", path.display()))?;
    let doc: Value = serde_json::from_str(&text[start..])
        .with_context(|| format!("parsing {}", path.display()))?;
    let job = doc["jobs"]
        .get(0)
        .with_context(|| format!("no job in {}", path.display()))?;
    // The direction that did the I/O.
    let side = ["write", "read"]
        .into_iter()
        .map(|d| &job[d])
        .find(|s| s["io_bytes"].as_f64().unwrap_or(0.0) > 0.0)
        .with_context(|| format!("no I/O in {}", path.display()))?;
    let pct = |p: &str| {
        side["clat_ns"]["percentile"][p]
            .as_f64()
            .map(|ns| ns / 1000.0)
    };
    Ok(FioNumbers {
        iops: side["iops"].as_f64().unwrap_or(0.0),
        bytes_per_sec: side["bw_bytes"].as_f64().unwrap_or(0.0),
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    })
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "n/a".to_owned()
    }
}

fn run_fio_table(
    pairs: Vec<String>,
    latency: Vec<String>,
    first: String,
    second: String,
) -> anyhow::Result<()> {
    println!("| test | {first} | {second} | ratio (first / second) |");
    println!("|---|---:|---:|---:|");
    for pair in pairs {
        let (label, files) = pair
            .split_once('=')
            .with_context(|| format!("--pair {pair:?} is not LABEL=A,B"))?;
        let (a, b) = files
            .split_once(',')
            .with_context(|| format!("--pair {pair:?} is not LABEL=A,B"))?;
        let (a, b) = (read_fio(Path::new(a))?, read_fio(Path::new(b))?);
        let mib = |n: &FioNumbers| n.bytes_per_sec / f64::from(1u32 << 20);
        if label.contains("1M") || label.contains("seq") {
            println!(
                "| {label} | {:.0} MiB/s | {:.0} MiB/s | {} |",
                mib(&a),
                mib(&b),
                ratio(a.bytes_per_sec, b.bytes_per_sec)
            );
        } else {
            println!(
                "| {label} | {:.0} IOPS | {:.0} IOPS | {} |",
                a.iops,
                b.iops,
                ratio(a.iops, b.iops)
            );
        }
        if latency.iter().any(|l| l == label) {
            for (name, x, y) in [("p50", a.p50_us, b.p50_us), ("p99", a.p99_us, b.p99_us)] {
                if let (Some(x), Some(y)) = (x, y) {
                    println!(
                        "| {label} {name} latency | {x:.0} µs | {y:.0} µs | {} |",
                        ratio(x, y)
                    );
                }
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Attach {
            endpoints,
            name,
            size,
            fs_type,
            params,
            zone,
        } => run_attach(endpoints, name, size, fs_type, params, zone).await,
        Command::Detach {
            endpoints,
            volume_id,
            delete,
        } => run_detach(endpoints, volume_id, delete).await,
        Command::FioSummary { file } => run_fio_summary(&file),
        Command::Snapshot {
            controller,
            name,
            volume_id,
        } => run_snapshot(controller, name, volume_id).await,
        Command::Copy {
            controller,
            name,
            size,
            snapshot_id,
            volume_id,
            zone,
            timeout_secs,
        } => {
            run_copy(CopyArgs {
                controller,
                name,
                size,
                snapshot_id,
                volume_id,
                zone,
                timeout: Duration::from_secs(timeout_secs),
            })
            .await
        }
        Command::DeleteVolume {
            controller,
            volume_id,
        } => run_delete_volume(controller, volume_id).await,
        Command::Placement {
            replicas,
            volume_id,
            transport,
        } => run_placement(replicas, volume_id, transport.transport()?).await,
        Command::FioTable {
            pairs,
            latency,
            first,
            second,
        } => run_fio_table(pairs, latency, first, second),
    }
}
