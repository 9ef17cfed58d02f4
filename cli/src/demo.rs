//! The `tessera up` demo: a volume's whole life through CSI only, the calls the
//! kubelet and the external sidecars make, printed step by step.
//!
//! CreateVolume → ControllerPublishVolume → NodeStageVolume → NodePublishVolume, then
//! files with known sha256 are written, flushed, dropped from the page cache and read
//! back through the volume. The volume stays mounted until the user stops `tessera up`;
//! [`undo_node`] and [`undo_controller`] then reverse exactly the steps that were
//! attempted (every CSI undo call is idempotent, so undoing a half-done step is safe).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use tessera_csi_proto::v1::volume_capability::{access_mode, AccessMode, AccessType, MountVolume};
use tessera_csi_proto::v1::{
    CapacityRange, ControllerPublishVolumeRequest, ControllerUnpublishVolumeRequest,
    CreateVolumeRequest, DeleteVolumeRequest, NodePublishVolumeRequest, NodeStageVolumeRequest,
    NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, VolumeCapability,
};
use tessera_replica_protocol::control_proto::GetVolumeRequest;
use tessera_tls::Transport;
use tonic::Code;

use crate::csi_client::{self, ControllerClient, NodeClient};
use crate::demo_files::{verify_files, write_files, FILE_MIB};
use crate::local_cluster::{ReplicaEndpoint, LOCAL_NODE_ID};
use crate::signals::Stop;

/// Name of the demo volume; CreateVolume is idempotent by name, so a rerun on the
/// same directory finds the same volume.
pub const VOLUME_NAME: &str = "demo-volume";
/// Size of the demo volume.
const VOLUME_BYTES: i64 = 1 << 30;
/// Filesystem of the demo volume.
const FS_TYPE: &str = "ext4";
/// Replication factor of the demo volume (fewer with fewer replica daemons, so
/// `--replicas 1` still gets a demo).
const REPLICATION_FACTOR: usize = 3;
/// Deadline of one CSI call: staging formats a filesystem, so it is generous.
const RPC_TIMEOUT: Duration = Duration::from_secs(120);
/// Line printed when the files were read back and matched; tests wait for it.
pub const VERIFIED_MARKER: &str = "demo: verified";
/// Line printed when the demo stops early because the node has no data path.
pub const NO_DATA_PATH_MARKER: &str = "demo: stopped after ControllerPublishVolume";

/// Where the demo volume lives and who serves it.
#[derive(Debug, Clone)]
pub struct DemoSetup {
    /// Controller CSI socket.
    pub controller_socket: PathBuf,
    /// Node plugin CSI socket.
    pub node_socket: PathBuf,
    /// Staging path handed to NodeStageVolume.
    pub staging: PathBuf,
    /// Target path handed to NodePublishVolume.
    pub target: PathBuf,
    /// Replica daemons, to show the placement.
    pub replicas: Vec<ReplicaEndpoint>,
    /// How to dial them (the controller identity: only it may read volume records).
    pub transport: Transport,
}

/// Which steps were attempted, so [`undo`] reverses exactly those.
#[derive(Debug, Default)]
pub struct Progress {
    /// The demo began (so a failure is the demo's, not the startup's).
    pub started: bool,
    /// Set once CreateVolume returned a volume id.
    pub volume_id: Option<String>,
    /// ControllerPublishVolume was called.
    pub published: bool,
    /// NodeStageVolume was called (and is implemented).
    pub staged: bool,
    /// NodePublishVolume was called.
    pub mounted: bool,
    /// Whether the node side (staging, files) was reached: a failure from then on is
    /// best explained by the node plugin's and engine-host's logs, before by the
    /// controller's.
    pub node_side: bool,
}

impl Progress {
    /// Components whose logs explain a failure at the current step.
    pub fn relevant_logs(&self) -> &'static [&'static str] {
        if self.node_side {
            &["node-plugin", "engine-host"]
        } else {
            &["controller"]
        }
    }
}

/// How far the demo got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Files written and verified; the volume is mounted.
    Verified,
    /// The node plugin has no data path; the volume is created and published only.
    NoDataPath,
}

/// The mount capability of the demo volume.
fn capability() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: FS_TYPE.to_owned(),
            ..Default::default()
        })),
    }
}

async fn controller(setup: &DemoSetup) -> anyhow::Result<ControllerClient> {
    let channel = csi_client::connect_unix(&setup.controller_socket, RPC_TIMEOUT).await?;
    Ok(ControllerClient::new(channel))
}

async fn node(setup: &DemoSetup) -> anyhow::Result<NodeClient> {
    let channel = csi_client::connect_unix(&setup.node_socket, RPC_TIMEOUT).await?;
    Ok(NodeClient::new(channel))
}

/// Prints the start of a step line; the caller completes it.
fn step(n: usize, total: usize, what: impl std::fmt::Display) {
    print!("demo: [{n}/{total}] {what} ... ");
    let _ = std::io::stdout().flush();
}

/// Turns a CSI status into an error naming the call.
fn rpc_error(call: &str, status: tonic::Status) -> anyhow::Error {
    anyhow!("{call} failed: {:?}: {}", status.code(), status.message())
}

/// Runs the demo, recording progress as it goes. Returns early with an error on the
/// first failed step, or [`Interrupted`] on a stop request.
pub async fn run(
    setup: &DemoSetup,
    progress: &mut Progress,
    stop: &Stop,
) -> anyhow::Result<Outcome> {
    const TOTAL: usize = 7;
    progress.started = true;
    let mut ctl = controller(setup).await?;

    let rf = REPLICATION_FACTOR.min(setup.replicas.len()).max(1);
    step(
        1,
        TOTAL,
        format_args!("CreateVolume {VOLUME_NAME:?} (1 GiB, replicationFactor={rf}, {FS_TYPE})"),
    );
    let request = CreateVolumeRequest {
        name: VOLUME_NAME.to_owned(),
        capacity_range: Some(CapacityRange {
            required_bytes: VOLUME_BYTES,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![capability()],
        parameters: HashMap::from([
            ("replicationFactor".to_owned(), rf.to_string()),
            ("fsType".to_owned(), FS_TYPE.to_owned()),
        ]),
        ..Default::default()
    };
    let volume = stop
        .interruptible(ctl.create_volume(request))
        .await?
        .map_err(|s| rpc_error("CreateVolume", s))?
        .into_inner()
        .volume
        .ok_or_else(|| anyhow!("CreateVolume returned no volume"))?;
    progress.volume_id = Some(volume.volume_id.clone());
    let volume_id = volume.volume_id.clone();
    println!("ok: {volume_id}, {}", human_bytes(volume.capacity_bytes));

    step(
        2,
        TOTAL,
        format_args!("ControllerPublishVolume to node {LOCAL_NODE_ID:?}"),
    );
    progress.published = true;
    let published = stop
        .interruptible(
            ctl.controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: volume_id.clone(),
                node_id: LOCAL_NODE_ID.to_owned(),
                volume_capability: Some(capability()),
                readonly: false,
                volume_context: volume.volume_context.clone(),
                ..Default::default()
            }),
        )
        .await?
        .map_err(|s| rpc_error("ControllerPublishVolume", s))?
        .into_inner();
    let context = published.publish_context;
    println!(
        "ok: epoch {}, replicas {}",
        context.get("epoch").map_or("?", String::as_str),
        context.get("replicas").map_or("?", String::as_str)
    );

    step(
        3,
        TOTAL,
        format_args!("NodeStageVolume at {}", setup.staging.display()),
    );
    make_dir(&setup.staging)?;
    progress.node_side = true;
    let mut node = node(setup).await?;
    progress.staged = true;
    let staged = stop
        .interruptible(node.node_stage_volume(NodeStageVolumeRequest {
            volume_id: volume_id.clone(),
            publish_context: context.clone(),
            staging_target_path: path_string(&setup.staging)?,
            volume_capability: Some(capability()),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        }))
        .await?;
    match staged {
        Ok(_) => println!("ok: {FS_TYPE} mounted at the staging path"),
        Err(status) if status.code() == Code::Unimplemented => {
            progress.staged = false;
            println!("not implemented by this tessera-node");
            print_placement(setup, &volume_id).await;
            println!(
                "{NO_DATA_PATH_MARKER}: the node plugin has no data path yet \
                 (NodeStageVolume: {}); volume {volume_id} is created and published to \
                 node {LOCAL_NODE_ID:?}, nothing is mounted",
                status.message()
            );
            return Ok(Outcome::NoDataPath);
        }
        Err(status) => return Err(rpc_error("NodeStageVolume", status)),
    }

    step(
        4,
        TOTAL,
        format_args!("NodePublishVolume at {}", setup.target.display()),
    );
    make_dir(&setup.target)?;
    progress.mounted = true;
    stop.interruptible(node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: volume_id.clone(),
        publish_context: context,
        staging_target_path: path_string(&setup.staging)?,
        target_path: path_string(&setup.target)?,
        volume_capability: Some(capability()),
        readonly: false,
        volume_context: volume.volume_context,
        ..Default::default()
    }))
    .await?
    .map_err(|s| rpc_error("NodePublishVolume", s))?;
    println!("ok: bind-mounted");

    let sizes = FILE_MIB.map(|m| format!("{m} MiB")).join(", ");
    step(
        5,
        TOTAL,
        format_args!(
            "writing {} files of random bytes ({sizes}) and SHA256SUMS",
            FILE_MIB.len()
        ),
    );
    let target = setup.target.clone();
    let flag = stop.flag();
    let written = tokio::task::spawn_blocking(move || write_files(&target, &flag))
        .await
        .context("file writer panicked")??;
    println!("ok");

    step(
        6,
        TOTAL,
        "fsync, drop the files from the page cache, read back, compare sha256",
    );
    let target = setup.target.clone();
    let flag = stop.flag();
    let total = tokio::task::spawn_blocking(move || verify_files(&target, &written, &flag))
        .await
        .context("file reader panicked")??;
    println!("ok");
    println!(
        "{VERIFIED_MARKER} {} files ({}) read back through volume {volume_id}: all sha256 match",
        FILE_MIB.len(),
        human_bytes(i64::try_from(total).unwrap_or(i64::MAX))
    );

    step(7, TOTAL, "df -h and replica placement");
    println!();
    print_df(&setup.target).await;
    print_placement(setup, &volume_id).await;
    Ok(Outcome::Verified)
}

/// One undo step and how it went.
pub type UndoResult = (String, anyhow::Result<()>);

/// Reverses the node-side steps that were attempted (NodeUnpublish, NodeUnstage).
/// Returns one entry per step (or per failed connection) with its result.
pub async fn undo_node(setup: &DemoSetup, progress: &Progress) -> Vec<UndoResult> {
    let mut results = Vec::new();
    let Some(volume_id) = progress.volume_id.clone() else {
        return results;
    };
    if progress.mounted || progress.staged {
        let node = node(setup).await;
        let mut node = match node {
            Ok(n) => Some(n),
            Err(e) => {
                results.push(("connect to the node plugin".to_owned(), Err(e)));
                None
            }
        };
        if let (true, Some(node)) = (progress.mounted, node.as_mut()) {
            let target = path_string(&setup.target);
            let r = async {
                node.node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    target_path: target?,
                })
                .await
                .map_err(|s| rpc_error("NodeUnpublishVolume", s))?;
                Ok(())
            }
            .await;
            results.push((format!("NodeUnpublishVolume {}", setup.target.display()), r));
        }
        if let (true, Some(node)) = (progress.staged, node.as_mut()) {
            let staging = path_string(&setup.staging);
            let r = async {
                node.node_unstage_volume(NodeUnstageVolumeRequest {
                    volume_id: volume_id.clone(),
                    staging_target_path: staging?,
                })
                .await
                .map_err(|s| rpc_error("NodeUnstageVolume", s))?;
                Ok(())
            }
            .await;
            results.push((format!("NodeUnstageVolume {}", setup.staging.display()), r));
        }
    }
    results
}

/// Reverses the controller-side steps: ControllerUnpublish if it was attempted, then
/// DeleteVolume if `delete`. Call after [`undo_node`].
pub async fn undo_controller(
    setup: &DemoSetup,
    progress: &Progress,
    delete: bool,
) -> Vec<UndoResult> {
    let mut results = Vec::new();
    let Some(volume_id) = progress.volume_id.clone() else {
        return results;
    };
    let mut ctl = match controller(setup).await {
        Ok(c) => c,
        Err(e) => {
            results.push(("connect to the controller".to_owned(), Err(e)));
            return results;
        }
    };
    if progress.published {
        let r = ctl
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: volume_id.clone(),
                node_id: LOCAL_NODE_ID.to_owned(),
                ..Default::default()
            })
            .await
            .map(drop)
            .map_err(|s| rpc_error("ControllerUnpublishVolume", s));
        results.push((
            format!("ControllerUnpublishVolume from {LOCAL_NODE_ID:?}"),
            r,
        ));
    }
    if delete {
        let r = ctl
            .delete_volume(DeleteVolumeRequest {
                volume_id: volume_id.clone(),
                ..Default::default()
            })
            .await
            .map(drop)
            .map_err(|s| rpc_error("DeleteVolume", s));
        results.push((format!("DeleteVolume {volume_id}"), r));
    }
    results
}

fn make_dir(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

fn path_string(path: &Path) -> anyhow::Result<String> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("path {} is not UTF-8", path.display()))
}

/// `1.00 GiB`-style size.
pub fn human_bytes(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// Prints `df -h` of the mount, indented.
async fn print_df(target: &Path) {
    match tokio::process::Command::new("df")
        .arg("-h")
        .arg(target)
        .output()
        .await
    {
        Ok(out) => {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                println!("      {line}");
            }
        }
        Err(e) => println!("      (df failed: {e})"),
    }
}

/// Prints which replica daemons hold the volume, with epoch and attachments, as the
/// daemons themselves report it.
async fn print_placement(setup: &DemoSetup, volume_id: &str) {
    println!("      placement of {volume_id}:");
    println!(
        "      {:<10} {:<22} {:<6} {:<6} attached to",
        "replica", "control", "holds", "epoch"
    );
    for r in &setup.replicas {
        let record = async {
            let mut client = csi_client::replica(
                &r.control.to_string(),
                &setup.transport,
                Duration::from_secs(5),
            )
            .await?;
            let rec = client
                .get_volume(GetVolumeRequest {
                    volume_id: volume_id.to_owned(),
                })
                .await;
            match rec {
                Ok(rec) => Ok(Some(rec.into_inner())),
                Err(s) if s.code() == Code::NotFound => Ok(None),
                Err(s) => Err(anyhow!("GetVolume: {s}")),
            }
        }
        .await;
        let (holds, epoch, attached) = match record {
            Ok(Some(rec)) => {
                let nodes: Vec<String> =
                    rec.attachments.iter().map(|a| a.node_id.clone()).collect();
                ("yes".to_owned(), rec.epoch.to_string(), nodes.join(","))
            }
            Ok(None) => ("no".to_owned(), "-".to_owned(), String::new()),
            Err(e) => (format!("? ({e:#})"), "-".to_owned(), String::new()),
        };
        println!(
            "      {:<10} {:<22} {:<6} {:<6} {attached}",
            r.node_id,
            r.control.to_string(),
            holds,
            epoch
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1 << 30), "1.00 GiB");
        assert_eq!(human_bytes(21 << 20), "21.00 MiB");
    }
}
