//! [`FaultRig`]: one RF=3 raw block volume on a cluster of isolated hosts, a random
//! writer on it, and the checks every fault scenario ends with.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tessera_csi_proto::v1::Volume;
use tessera_replica_protocol::control_proto::GetVolumeRequest;

use crate::lifecycle::{
    self, attach, block_capability, controller_condition, create_volume, kubelet_paths,
    node_condition, Attachment,
};
use crate::random_writer::{read_back_issued, RandomWriteLog, RandomWriter, WriterBounds};
use crate::{poll_until, Cluster, ClusterBuilder};

/// What the controller says of a whole RF=3 volume.
pub const ALL_IN_SYNC: &str = "all 3 replicas reachable and in sync";
/// Longest any scenario waits for the volume to be whole again.
pub const IN_SYNC_WITHIN: Duration = Duration::from_secs(180);
/// Longest a writer of a scenario runs.
const WRITER_TIME: Duration = Duration::from_secs(600);
/// Writes a writer does once told to stop (then it flushes).
const WRITES_AFTER_STOP: u64 = 200;

/// How a [`FaultRig`] is built.
#[derive(Debug, Clone)]
pub struct RigConfig {
    /// Replica daemons n1..n`replicas` (each on its own host).
    pub replicas: usize,
    /// Nodes with an engine-host and a node plugin (hosts shared with the replica
    /// daemon of the same id); the volume is attached on the first.
    pub nodes: Vec<String>,
    /// Size of the volume.
    pub volume_bytes: u64,
    /// The controller's `--replacement-delay`.
    pub replacement_delay: String,
    /// Further replica daemon flags.
    pub replica_args: Vec<String>,
    /// Each daemon's data directory on a filesystem of this size of its own (so a
    /// test can fill it up); `None`: on the test directory's filesystem.
    pub disk_bytes: Option<u64>,
}

impl Default for RigConfig {
    fn default() -> Self {
        RigConfig {
            replicas: 3,
            nodes: vec!["n1".into(), "n2".into(), "n3".into()],
            volume_bytes: 64 << 20,
            replacement_delay: "10m".into(),
            replica_args: Vec::new(),
            disk_bytes: None,
        }
    }
}

/// The volume, where it is attached, and every block's last durable write so far.
pub struct FaultRig {
    pub cluster: Cluster,
    pub volume: Volume,
    name: String,
    attachment: Option<Attachment>,
    /// Per block, the write it must hold (the last durable one).
    expected: BTreeMap<u64, u64>,
    /// Per block, the last write issued by a writer that died (see
    /// [`read_back_issued`]); cleared once those blocks are written again durably.
    issued: BTreeMap<u64, u64>,
    /// The next writer's first write number.
    next_write: u64,
}

impl FaultRig {
    /// Starts the cluster (isolated hosts, /metrics everywhere, the controller healing
    /// every 300 ms), creates the RF=3 volume `name` and attaches it on the first node.
    pub async fn start(config: &RigConfig, name: &str) -> anyhow::Result<Self> {
        let mut builder = ClusterBuilder::new()
            .isolated_hosts(true)
            .replicas(config.replicas)
            .nodes(config.nodes.clone())
            .replica_metrics(true)
            .engine_host_metrics(true)
            .replica_args(config.replica_args.clone())
            .controller_args([
                "--replacement-delay",
                &config.replacement_delay,
                "--heal-interval",
                "300ms",
                "--refresh-interval-secs",
                "1",
            ]);
        if let Some(bytes) = config.disk_bytes {
            for i in 1..=config.replicas {
                builder = builder.replica_disk(format!("n{i}"), bytes);
            }
        }
        let cluster = builder.start().await?;
        let mut controller = cluster.controller().await?;
        let volume = create_volume(
            &mut controller,
            name,
            usize::try_from(config.volume_bytes).context("volume size")?,
            &[("replicationFactor", "3")],
            true,
        )
        .await;
        let mut rig = FaultRig {
            cluster,
            volume,
            name: name.to_owned(),
            attachment: None,
            expected: BTreeMap::new(),
            issued: BTreeMap::new(),
            next_write: 1,
        };
        rig.attach(&config.nodes[0]).await?;
        Ok(rig)
    }

    /// The volume id.
    pub fn id(&self) -> &str {
        &self.volume.volume_id
    }

    /// The node the volume is attached to.
    pub fn node(&self) -> anyhow::Result<&str> {
        Ok(&self.attached()?.node_id)
    }

    fn attached(&self) -> anyhow::Result<&Attachment> {
        self.attachment
            .as_ref()
            .ok_or_else(|| anyhow!("the volume is not attached"))
    }

    /// The raw block device of the attachment (the pod's view).
    pub fn device(&self) -> anyhow::Result<PathBuf> {
        Ok(self.attached()?.target.clone())
    }

    /// ControllerPublish + NodeStage + NodePublish on `node`.
    pub async fn attach(&mut self, node: &str) -> anyhow::Result<()> {
        anyhow::ensure!(self.attachment.is_none(), "already attached");
        let mut controller = self.cluster.controller().await?;
        let mut plugin = self.cluster.node_client(node).await?;
        let (staging, target) = kubelet_paths(&self.cluster, node, &self.name, true);
        let a = attach(
            &mut controller,
            &mut plugin,
            &self.volume,
            node,
            block_capability(),
            &staging,
            &target,
        )
        .await?;
        self.attachment = Some(a);
        Ok(())
    }

    /// The orderly way back (node unpublish and unstage, ControllerUnpublish).
    pub async fn detach(&mut self) -> anyhow::Result<()> {
        let a = self.attached()?.clone();
        let mut controller = self.cluster.controller().await?;
        let mut plugin = self.cluster.node_client(&a.node_id).await?;
        lifecycle::detach(&mut controller, &mut plugin, &a).await?;
        self.attachment = None;
        Ok(())
    }

    /// What the CO does when a node died: ControllerUnpublish only (the node does
    /// not answer). Returns the attachment left on the node, for
    /// [`FaultRig::unstage_leftover`] once it is back.
    pub async fn force_detach_keeping(&mut self) -> anyhow::Result<Attachment> {
        let a = self.attached()?.clone();
        let mut controller = self.cluster.controller().await?;
        lifecycle::controller_unpublish(&mut controller, &a).await?;
        self.attachment = None;
        Ok(a)
    }

    /// What the kubelet of a node that came back does with a pod that moved away:
    /// NodeUnpublish and NodeUnstage of what it left.
    pub async fn unstage_leftover(&self, left: &Attachment) -> anyhow::Result<()> {
        let mut plugin = self.cluster.node_client(&left.node_id).await?;
        lifecycle::unpublish_and_unstage(&mut plugin, left).await
    }

    /// A writer on the attached device: random 4 KiB O_DIRECT writes, fdatasync every
    /// 16, a checked read every 8 (a stale read fails it).
    pub fn start_writer(&self, seed: u64) -> anyhow::Result<RandomWriter> {
        Ok(RandomWriter::start_from(
            self.device()?,
            seed,
            WriterBounds::for_faults(WRITER_TIME, WRITES_AFTER_STOP),
            self.next_write,
        ))
    }

    /// Stops `writer` (it writes a little more, then flushes) and records what it made
    /// durable; fails if it saw an I/O error or a stale read.
    pub async fn stop_writer(&mut self, writer: RandomWriter) -> anyhow::Result<RandomWriteLog> {
        writer.kill_done();
        let log = writer.finish_log().await;
        self.record(&log);
        match &log.failure {
            Some(e) => bail!("the writer failed: {e}"),
            None => Ok(log),
        }
    }

    /// Records what a writer that died with its node made durable (and what it had
    /// issued, which a block may also hold).
    pub async fn writer_died(&mut self, writer: RandomWriter) -> RandomWriteLog {
        let log = writer.finish_log().await;
        self.record(&log);
        log
    }

    fn record(&mut self, log: &RandomWriteLog) {
        for (&block, &write) in &log.last_durable {
            self.expected.insert(block, write);
            if self.issued.get(&block).is_some_and(|&i| i <= write) {
                self.issued.remove(&block);
            }
        }
        for (&block, &write) in &log.last_issued {
            if self.expected.get(&block) != Some(&write) {
                self.issued.insert(block, write);
            }
        }
        if let Some(&last) = log.last_issued.values().max() {
            self.next_write = self.next_write.max(last + 1);
        }
    }

    /// Discards the whole device (`blkdiscard`: the engine trims every block, the
    /// replicas punch their files' holes), so the next writes need disk space again;
    /// the volume reads zeros afterwards and nothing is expected of it any more.
    pub async fn discard_all(&mut self) -> anyhow::Result<()> {
        let device = self.device()?;
        let out = tokio::process::Command::new("blkdiscard")
            .arg(&device)
            .output()
            .await
            .context("running blkdiscard")?;
        anyhow::ensure!(
            out.status.success(),
            "blkdiscard {} failed: {}",
            device.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        self.expected.clear();
        self.issued.clear();
        Ok(())
    }

    /// Every durable block, read through the attachment, holds its last durable write
    /// (or a later one a dead writer issued).
    pub async fn check_reads_back(&self, when: &str) -> anyhow::Result<()> {
        let device = self.device()?;
        let (expected, issued) = (self.expected.clone(), self.issued.clone());
        let read =
            tokio::task::spawn_blocking(move || read_back_issued(&device, &expected, &issued))
                .await
                .context("reader task")?
                .map_err(|e| anyhow!("reading back {when}: {e}"))?;
        read.check(when).map_err(|e| anyhow!(e))?;
        Ok(())
    }

    /// Waits until the engine (attached) or the controller (detached) reports every
    /// replica in sync; returns how long that took.
    pub async fn wait_in_sync(&self, after: &str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let whole = match &self.attachment {
            Some(a) => {
                let plugin = self.cluster.node_client(&a.node_id).await?;
                poll_until(IN_SYNC_WITHIN, || {
                    let (mut plugin, a) = (plugin.clone(), a.clone());
                    async move { (!node_condition(&mut plugin, &a).await.abnormal).then_some(()) }
                })
                .await
            }
            None => {
                let controller = self.cluster.controller().await?;
                poll_until(IN_SYNC_WITHIN, || {
                    let (mut ctl, id) = (controller.clone(), self.id().to_owned());
                    async move {
                        (controller_condition(&mut ctl, &id).await.message == ALL_IN_SYNC)
                            .then_some(())
                    }
                })
                .await
            }
        };
        if whole.is_err() {
            bail!(
                "not every replica in sync {IN_SYNC_WITHIN:?} after {after}: {}",
                self.condition().await
            );
        }
        Ok(started.elapsed())
    }

    /// The current condition message (the engine's when attached).
    pub async fn condition(&self) -> String {
        match &self.attachment {
            Some(a) => match self.cluster.node_client(&a.node_id).await {
                Ok(mut plugin) => node_condition(&mut plugin, a).await.message,
                Err(e) => format!("node plugin unreachable: {e:#}"),
            },
            None => match self.cluster.controller().await {
                Ok(mut ctl) => controller_condition(&mut ctl, self.id()).await.message,
                Err(e) => format!("controller unreachable: {e:#}"),
            },
        }
    }

    /// Waits until the engine's condition names `node` as not in sync (a replica it
    /// dropped); returns how long that took.
    pub async fn wait_dropped(&self, node: &str, within: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let a = self.attached()?.clone();
        let plugin = self.cluster.node_client(&a.node_id).await?;
        let dropped = poll_until(within, || {
            let (mut plugin, a) = (plugin.clone(), a.clone());
            async move {
                let c = node_condition(&mut plugin, &a).await;
                (c.abnormal && c.message.contains(node)).then_some(())
            }
        })
        .await;
        if dropped.is_err() {
            bail!(
                "the engine did not drop {node} within {within:?}: {}",
                self.condition().await
            );
        }
        Ok(started.elapsed())
    }

    /// The replica set of the volume as a running daemon records it (node ids,
    /// sorted).
    pub async fn members(&self) -> anyhow::Result<Vec<String>> {
        for replica in self.cluster.replicas() {
            if replica.pid().is_none() {
                continue;
            }
            let Ok(mut client) = replica.client().await else {
                continue;
            };
            let Ok(rec) = client
                .get_volume(GetVolumeRequest {
                    volume_id: self.id().to_owned(),
                })
                .await
            else {
                continue;
            };
            let mut set: Vec<String> = rec
                .into_inner()
                .replicas
                .into_iter()
                .map(|r| r.node_id)
                .collect();
            set.sort();
            return Ok(set);
        }
        bail!("no running daemon knows {}", self.id())
    }

    /// `tessera verify` of the volume against every running daemon, as the
    /// controller ([`Cluster::verify`]): exits 0 when the in-sync replicas hold the
    /// same version and intact data of every block.
    pub async fn verify(&self) -> anyhow::Result<()> {
        self.cluster.verify(self.id()).await
    }

    /// A counter of the engine-host serving the volume, for this volume.
    pub async fn engine_counter(&self, name: &str) -> anyhow::Result<u64> {
        let node = self.node()?;
        let page = self.cluster.node_host(node)?.engine_host_metrics().await?;
        let labels = [("volume_id", self.id())];
        page.counter(name, &labels)
            .ok_or_else(|| anyhow!("the engine-host on {node} has no {name} for {}", self.id()))
    }

    /// The end of every scenario: the writer's blocks read back current through the
    /// attachment, and `tessera verify` finds the in-sync replicas identical.
    pub async fn final_checks(&self, when: &str) -> anyhow::Result<()> {
        self.check_reads_back(when).await?;
        self.verify().await
    }
}
