//! The faults of issue 15's suite, each a function on a [`FaultRig`].
//!
//! Contract of every scenario: it starts with the volume attached and no writer
//! running, runs a writer through the fault (the writer fails on any I/O error or
//! stale read), and ends with the writer stopped, the volume attached again and every
//! replica in sync. The caller runs [`FaultRig::final_checks`] (the durable blocks
//! read back current, `tessera verify` clean). What it measured comes back as a
//! [`Report`].

use std::fmt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use super::FaultRig;
use crate::direct_io::ALIGN;
use crate::fixtures::snapshot_request;
use crate::random_writer::RandomWriter;

/// Longest a scenario waits for the engine to drop a replica it cannot reach.
pub const DROPPED_WITHIN: Duration = Duration::from_secs(60);

/// One scenario's figures, as `name: value` lines.
#[derive(Debug, Default)]
pub struct Report {
    pub scenario: String,
    pub figures: Vec<(String, String)>,
}

impl Report {
    fn new(scenario: &str) -> Self {
        Report {
            scenario: scenario.to_owned(),
            figures: Vec::new(),
        }
    }

    fn add(&mut self, name: impl Into<String>, value: impl fmt::Display) {
        self.figures.push((name.into(), value.to_string()));
    }

    /// The value of figure `name`, if reported.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.figures
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.scenario)?;
        for (name, value) in &self.figures {
            write!(f, " {name}={value}")?;
        }
        Ok(())
    }
}

/// Members of the volume's set other than the node the volume is attached to
/// (faults between hosts need two hosts).
pub(super) async fn remote_members(rig: &FaultRig) -> anyhow::Result<Vec<String>> {
    let here = rig.node()?.to_owned();
    Ok(rig
        .members()
        .await?
        .into_iter()
        .filter(|m| *m != here)
        .collect())
}

/// The first member off the attached node.
async fn a_remote_member(rig: &FaultRig) -> anyhow::Result<String> {
    remote_members(rig)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("every member is on the attached node"))
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// (a) Rolling restart: each member's daemon in turn is killed with SIGKILL and
/// started again on its data, moving on as soon as the engine reports every replica
/// in sync; figures: the time back to in sync per daemon.
pub async fn rolling_restart(rig: &mut FaultRig, seed: u64) -> anyhow::Result<Report> {
    let mut report = Report::new("rolling-restart");
    let writer = rig.start_writer(seed)?;
    writer.wait_for(300).await;
    for member in rig.members().await? {
        let index = rig.cluster.replica_index(&member)?;
        rig.cluster.restart_replica(index).await?;
        let took = rig.wait_in_sync(&format!("{member} was restarted")).await?;
        report.add(format!("{member}_back_in_sync"), ms(took));
        let n = writer.written();
        writer.wait_for(n + 100).await;
    }
    let log = rig.stop_writer(writer).await?;
    report.add("writes", log.writes);
    Ok(report)
}

/// A partition of the attached node from one remote member under a running writer,
/// healed after `duration` (at least until the engine dropped the member).
struct Partitioned {
    victim: String,
    /// Still running.
    writer: RandomWriter,
    /// The engine's resync bytes counter before the partition.
    resynced_before: u64,
    /// The writer's writes before the partition, and during it.
    writes_before: u64,
    writes_during: u64,
    /// How long it lasted, and when in it the engine dropped the member.
    lasted: Duration,
    dropped_after: Duration,
}

async fn partitioned_under_writes(
    rig: &mut FaultRig,
    seed: u64,
    duration: Duration,
) -> anyhow::Result<Partitioned> {
    let victim = a_remote_member(rig).await?;
    let here = rig.node()?.to_owned();
    let writer = rig.start_writer(seed)?;
    writer.wait_for(300).await;
    let resynced_before = rig.engine_counter("tessera_engine_resync_bytes").await?;
    let writes_before = writer.written();
    rig.cluster.network()?.partition(&here, &victim)?;
    let partitioned = Instant::now();
    let dropped = rig.wait_dropped(&victim, DROPPED_WITHIN).await;
    if let Some(rest) = duration.checked_sub(partitioned.elapsed()) {
        tokio::time::sleep(rest).await; // the fault's length, not a synchronisation
    }
    rig.cluster.network()?.heal(&here, &victim)?;
    Ok(Partitioned {
        writes_during: writer.written() - writes_before,
        writes_before,
        lasted: partitioned.elapsed(),
        dropped_after: dropped?,
        victim,
        writer,
        resynced_before,
    })
}

/// (b) The engine partitioned from one replica for `duration`, then healed: the
/// replica is dropped, resynced when reachable again, and the resync copies about
/// what was written meanwhile. Figures: bytes written during the partition, bytes
/// the resync copied, their ratio, time back in sync after the heal.
pub async fn partition(
    rig: &mut FaultRig,
    seed: u64,
    duration: Duration,
) -> anyhow::Result<Report> {
    let mut report = Report::new("partition");
    let p = partitioned_under_writes(rig, seed, duration).await?;
    let back = rig
        .wait_in_sync(&format!("the partition from {} healed", p.victim))
        .await?;
    let resynced = rig.engine_counter("tessera_engine_resync_bytes").await? - p.resynced_before;
    let log = rig.stop_writer(p.writer).await?;
    let written_bytes = p.writes_during * ALIGN as u64;
    report.add("victim", &p.victim);
    report.add("dropped_after", ms(p.dropped_after));
    report.add("partitioned_for", ms(p.lasted));
    report.add("written_during_partition_bytes", written_bytes);
    report.add("resync_bytes", resynced);
    report.add(
        "resync_ratio",
        format!("{:.3}", resynced as f64 / written_bytes.max(1) as f64),
    );
    report.add("back_in_sync_after_heal", ms(back));
    report.add("writes", log.writes);
    Ok(report)
}

/// (b), interrupted: the engine cut off from one replica for `duration` while a writer
/// runs, the writer stopped at the heal, and the replica's daemon killed (SIGKILL) and
/// restarted once its resync has copied some of what it missed. The second resync
/// goes on from where the first stopped: what both copied together stays about the
/// bytes missed (each compares versions and copies only blocks that still differ).
pub async fn interrupted_resync(
    rig: &mut FaultRig,
    seed: u64,
    duration: Duration,
) -> anyhow::Result<Report> {
    let mut report = Report::new("interrupted-resync");
    let p = partitioned_under_writes(rig, seed, duration).await?;
    let (victim, resynced_before) = (p.victim, p.resynced_before);
    let log = rig.stop_writer(p.writer).await?;
    // Everything written from the partition on: the writer stopped after the heal.
    let missed = (log.writes - p.writes_before) * ALIGN as u64;
    // Wait until the resync has copied a tenth of what was missed, then kill it.
    let copied_some = crate::poll_until(super::IN_SYNC_WITHIN, || async {
        let copied = rig
            .engine_counter("tessera_engine_resync_bytes")
            .await
            .ok()?
            - resynced_before;
        (copied >= missed / 10).then_some(copied)
    })
    .await
    .map_err(|_| anyhow!("the resync of {victim} never copied a tenth of {missed} bytes"))?;
    let index = rig.cluster.replica_index(&victim)?;
    rig.cluster.restart_replica(index).await?;
    let back = rig
        .wait_in_sync(&format!("{victim} was killed mid-resync and restarted"))
        .await?;
    let resynced = rig.engine_counter("tessera_engine_resync_bytes").await? - resynced_before;
    report.add("victim", &victim);
    report.add("missed_bytes", missed);
    report.add("copied_before_the_kill", copied_some);
    report.add("resync_bytes", resynced);
    report.add(
        "resync_ratio",
        format!("{:.3}", resynced as f64 / missed.max(1) as f64),
    );
    report.add("back_in_sync_after_restart", ms(back));
    report.add("writes", log.writes);
    Ok(report)
}

/// (c) A member lost for good (killed, its data directory deleted): after the
/// replacement delay a spare daemon holds the copy and all three are in sync; then a
/// second original member is killed and writes go on. The second daemon comes back
/// on its data, the first on an empty disk (the next spare).
pub async fn lost_for_good(rig: &mut FaultRig, seed: u64) -> anyhow::Result<Report> {
    let mut report = Report::new("lost-for-good");
    let remote = remote_members(rig).await?;
    let (lost, second) = match remote.as_slice() {
        [a, b, ..] => (a.clone(), b.clone()),
        _ => bail!("lost-for-good needs two members off the attached node: {remote:?}"),
    };
    let original = rig.members().await?;
    let spares: Vec<String> = rig
        .cluster
        .replicas()
        .iter()
        .map(|r| r.node_id().to_owned())
        .filter(|n| !original.contains(n))
        .collect();
    let writer = rig.start_writer(seed)?;
    writer.wait_for(300).await;
    let lost_index = rig.cluster.replica_index(&lost)?;
    rig.cluster.kill_replica(lost_index)?;
    wipe(rig.cluster.replica(lost_index).data_dir())?;
    let killed = Instant::now();
    let replaced = crate::poll_until(super::IN_SYNC_WITHIN, || async {
        rig.members()
            .await
            .ok()
            .filter(|m| !m.contains(&lost) && m.len() == original.len())
    })
    .await
    .map_err(|_| anyhow!("{lost} was not replaced"))?;
    rig.wait_in_sync(&format!("{lost} was replaced")).await?;
    let new = replaced.iter().find(|m| !original.contains(m));
    anyhow::ensure!(
        new.is_some_and(|n| spares.contains(n)),
        "{lost} was replaced by {new:?}, not by a spare ({spares:?})"
    );
    report.add("lost", &lost);
    report.add("replaced_by", new.map(String::as_str).unwrap_or_default());
    report.add("whole_again_after", ms(killed.elapsed()));

    let second_index = rig.cluster.replica_index(&second)?;
    rig.cluster.kill_replica(second_index)?;
    let n = writer.written();
    writer.wait_for(n + 500).await;
    let log = rig.stop_writer(writer).await?;
    rig.check_reads_back(&format!("with {lost} replaced and {second} down"))
        .await?;
    rig.cluster.start_replica(second_index).await?;
    rig.wait_in_sync(&format!("{second} came back")).await?;
    rig.cluster.start_replica(lost_index).await?;
    report.add("writes", log.writes);
    Ok(report)
}

/// Empties a daemon's data directory (its disk replaced by a new one).
fn wipe(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        }
        .with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// (d) SIGKILL of the engine-host mid-write: the writer dies with it; the CO
/// force-detaches the volume and stages it on `to`, where every durable write reads
/// back. The dead node's engine-host is started again and its kubelet unstages the
/// leftovers.
pub async fn engine_host_crash(rig: &mut FaultRig, seed: u64, to: &str) -> anyhow::Result<Report> {
    let mut report = Report::new("engine-host-crash");
    let from = rig.node()?.to_owned();
    anyhow::ensure!(from != to, "the volume is already on {to}");
    let writer = rig.start_writer(seed)?;
    writer.wait_for(500).await;
    rig.cluster.kill_engine_host(&from)?;
    let log = rig.writer_died(writer).await;
    anyhow::ensure!(
        log.failure.is_some(),
        "the writer on {from} went on after its engine-host was killed"
    );
    let old = rig.force_detach_keeping().await?;
    let moved = Instant::now();
    rig.attach(to).await?;
    report.add("from", &from);
    report.add("to", to);
    report.add("attached_after", ms(moved.elapsed()));
    rig.check_reads_back(&format!("on {to} after the engine-host on {from} died"))
        .await?;
    rig.wait_in_sync(&format!("the move to {to}")).await?;
    rig.cluster.start_engine_host(&from).await?;
    rig.unstage_leftover(&old).await?;
    report.add("writes", log.writes);
    Ok(report)
}

/// The link speed [`slow_replica`] limits a replica to in the suite and the soak:
/// well below the random writer's pace (4 KiB writes: 256 KiB/s is 64 writes a
/// second), so the replica falls behind and its requests time out. At 1 MB/s it did
/// not always: the writer of a debug build with TLS on every replica port, on two
/// busy cores, managed about that (285 writes a second in plain text).
pub const SLOW_LINK_BYTES_PER_SEC: u64 = 256 << 10;

/// (e) One remote replica's link limited to `bytes_per_sec`: writes go on at the
/// speed of the other two, the slow replica leaves the in-sync set, and once the
/// limit is lifted it is resynced. Figures: writes per second before and while slow,
/// time until it was dropped.
pub async fn slow_replica(
    rig: &mut FaultRig,
    seed: u64,
    bytes_per_sec: u64,
) -> anyhow::Result<Report> {
    const WINDOW: Duration = Duration::from_secs(3);
    let mut report = Report::new("slow-replica");
    let victim = a_remote_member(rig).await?;
    let writer = rig.start_writer(seed)?;
    writer.wait_for(300).await;
    let rate = |from: u64, since: Instant| {
        (writer.written() - from) as f64 / since.elapsed().as_secs_f64()
    };
    let (n0, t0) = (writer.written(), Instant::now());
    tokio::time::sleep(WINDOW).await; // a measurement window
    let before = rate(n0, t0);
    rig.cluster.network()?.rate_limit(&victim, bytes_per_sec)?;
    let dropped = rig.wait_dropped(&victim, DROPPED_WITHIN).await;
    let (n1, t1) = (writer.written(), Instant::now());
    tokio::time::sleep(WINDOW).await; // a measurement window
    let slow = rate(n1, t1);
    rig.cluster.network()?.clear_rate_limit(&victim)?;
    // Checked once the fault is undone, so a failure leaves no limit behind.
    let dropped = dropped?;
    let back = rig
        .wait_in_sync(&format!("the limit on {victim} was lifted"))
        .await?;
    let log = rig.stop_writer(writer).await?;
    report.add("victim", &victim);
    report.add("limit_bytes_per_sec", bytes_per_sec);
    report.add("dropped_after", ms(dropped));
    report.add("writes_per_sec_before", format!("{before:.0}"));
    report.add("writes_per_sec_while_slow", format!("{slow:.0}"));
    report.add("speed_ratio", format!("{:.2}", slow / before.max(1.0)));
    report.add("back_in_sync_after_lift", ms(back));
    report.add("writes", log.writes);
    anyhow::ensure!(slow > 0.0, "no write completed while {victim} was slow");
    Ok(report)
}

/// (f) The filesystem under `victim`'s data directory fills up (a file takes every
/// free block): the replica fails writes and drops out, I/O goes on, and once the
/// file is deleted it is resynced. The volume is discarded first: a replica whose
/// files already hold every block rewrites them in place and needs no space, so a
/// full disk would not touch it (rightly).
pub async fn full_filesystem(
    rig: &mut FaultRig,
    seed: u64,
    victim: &str,
) -> anyhow::Result<Report> {
    let mut report = Report::new("full-filesystem");
    anyhow::ensure!(rig.node()? != victim, "fill a remote member, not {victim}");
    let index = rig.cluster.replica_index(victim)?;
    let filler = rig.cluster.replica(index).data_dir().join("filler");
    rig.discard_all().await?;
    let writer = rig.start_writer(seed)?;
    writer.wait_for(300).await;
    let filled = fill(&filler)?;
    let dropped = rig.wait_dropped(victim, DROPPED_WITHIN).await;
    let n = writer.written();
    writer.wait_for(n + 500).await;
    std::fs::remove_file(&filler).with_context(|| format!("removing {}", filler.display()))?;
    // Checked once the fault is undone, so a failure leaves no full disk behind.
    let dropped = dropped?;
    let back = rig
        .wait_in_sync(&format!("space was freed on {victim}"))
        .await?;
    let log = rig.stop_writer(writer).await?;
    report.add("victim", victim);
    report.add("filled_bytes", filled);
    report.add("dropped_after", ms(dropped));
    report.add("back_in_sync_after_freeing", ms(back));
    report.add("writes", log.writes);
    Ok(report)
}

/// Writes `path` until its filesystem is full; returns the bytes it took.
fn fill(path: &Path) -> anyhow::Result<u64> {
    use std::io::Write;
    let mut file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let chunk = vec![0xa5u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => return Err(e).with_context(|| format!("filling {}", path.display())),
        }
    }
    // Blocks the page cache still holds must reach the disk to count as used.
    match file.sync_all() {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => {}
        Err(e) => return Err(e).with_context(|| format!("syncing {}", path.display())),
    }
    Ok(total)
}

/// (g) Rot at rest: the volume is written, snapshotted and written again, then
/// detached; one byte is flipped in a block of the sealed layer and one in the head
/// on one remote member; that daemon's scrub (the rig must run with a short
/// `--scrub-period`) finds and repairs both from its peers. Then the volume is
/// attached again on the same node.
pub async fn scrub_repairs(rig: &mut FaultRig, seed: u64) -> anyhow::Result<Report> {
    let mut report = Report::new("scrub");
    let victim = a_remote_member(rig).await?;
    let node = rig.node()?.to_owned();
    let writer = rig.start_writer(seed)?;
    writer.wait_for(1_000).await;
    let first = rig.stop_writer(writer).await?;
    let mut controller = rig.cluster.controller().await?;
    let snapshot = controller
        .create_snapshot(snapshot_request("scrubbed", rig.id()))
        .await
        .map_err(|s| anyhow!("CreateSnapshot: {s}"))?
        .into_inner();
    anyhow::ensure!(
        snapshot.snapshot.is_some(),
        "CreateSnapshot returned nothing"
    );
    let writer = rig.start_writer(seed ^ 0x5c)?;
    writer.wait_for(1_000).await;
    let second = rig.stop_writer(writer).await?;
    rig.detach().await?;

    let index = rig.cluster.replica_index(&victim)?;
    let replica = rig.cluster.replica(index);
    let layers = replica.volume_dir(rig.id()).join("store/layers");
    let sealed_block = *first
        .last_durable
        .keys()
        .next()
        .ok_or_else(|| anyhow!("nothing written before the snapshot"))?;
    let head_block = *second
        .last_durable
        .keys()
        .next()
        .ok_or_else(|| anyhow!("nothing written after the snapshot"))?;
    let found_before = scrub_counter(rig, index, "tessera_replica_scrub_corrupt_found").await?;
    let repaired_before = scrub_counter(rig, index, "tessera_replica_scrub_repaired").await?;
    flip_byte(&layer_file(&layers, Layer::Oldest)?, sealed_block)?;
    flip_byte(&layer_file(&layers, Layer::Newest)?, head_block)?;
    let flipped = Instant::now();
    let repaired = crate::poll_until(super::IN_SYNC_WITHIN, || async {
        let found = scrub_counter(rig, index, "tessera_replica_scrub_corrupt_found")
            .await
            .ok()?;
        let fixed = scrub_counter(rig, index, "tessera_replica_scrub_repaired")
            .await
            .ok()?;
        (found >= found_before + 2 && fixed >= repaired_before + 2).then_some((found, fixed))
    })
    .await
    .map_err(|_| anyhow!("the scrub on {victim} did not find and repair both flipped bytes"))?;
    report.add("victim", &victim);
    report.add("corrupt_found", repaired.0 - found_before);
    report.add("repaired", repaired.1 - repaired_before);
    report.add("repaired_within", ms(flipped.elapsed()));
    rig.verify().await?;
    rig.attach(&node).await?;
    rig.wait_in_sync("the scrubbed volume was attached again")
        .await?;
    Ok(report)
}

async fn scrub_counter(rig: &FaultRig, index: usize, name: &str) -> anyhow::Result<u64> {
    let page = rig.cluster.replica(index).metrics().await?;
    page.counter(name, &[])
        .ok_or_else(|| anyhow!("no {name} on /metrics"))
}

enum Layer {
    Oldest,
    Newest,
}

/// The data file of the oldest (sealed) or newest (head) layer.
fn layer_file(layers: &Path, which: Layer) -> anyhow::Result<std::path::PathBuf> {
    let numbers = std::fs::read_dir(layers)
        .with_context(|| format!("listing {}", layers.display()))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok());
    let n = match which {
        Layer::Oldest => numbers.min(),
        Layer::Newest => numbers.max(),
    }
    .ok_or_else(|| anyhow!("no layer in {}", layers.display()))?;
    Ok(layers.join(n.to_string()).join("data"))
}

/// Flips one bit of `block` in a layer's data file.
fn flip_byte(data: &Path, block: u64) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(data)
        .with_context(|| format!("opening {}", data.display()))?;
    let at = block * ALIGN as u64 + 99;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at)
        .with_context(|| format!("reading {}", data.display()))?;
    byte[0] ^= 0x10;
    file.write_all_at(&byte, at)
        .with_context(|| format!("writing {}", data.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", data.display()))
}

/// (h) The silent-loss case: a remote member is down while the volume is written,
/// comes back, and the volume moves to that member's node, where its replica is
/// local: every durable block must read back current there.
pub async fn stale_replica_then_move(rig: &mut FaultRig, seed: u64) -> anyhow::Result<Report> {
    let mut report = Report::new("stale-replica-then-move");
    let nodes: Vec<String> = rig
        .cluster
        .nodes()
        .iter()
        .map(|n| n.node_id().to_owned())
        .collect();
    let victim = remote_members(rig)
        .await?
        .into_iter()
        .find(|m| nodes.contains(m))
        .ok_or_else(|| anyhow!("no remote member on a node with a node plugin"))?;
    let index = rig.cluster.replica_index(&victim)?;
    let writer = rig.start_writer(seed)?;
    writer.wait_for(300).await;
    rig.cluster.kill_replica(index)?;
    let n = writer.written();
    writer.wait_for(n + 2_000).await;
    let log = rig.stop_writer(writer).await?;
    rig.cluster.start_replica(index).await?;
    rig.detach().await?;
    rig.attach(&victim).await?;
    rig.check_reads_back(&format!("on {victim}, whose replica missed writes"))
        .await?;
    let back = rig.wait_in_sync(&format!("the move to {victim}")).await?;
    report.add("victim", &victim);
    report.add("missed_writes", log.writes.saturating_sub(300));
    report.add("in_sync_after_move", ms(back));
    Ok(report)
}
