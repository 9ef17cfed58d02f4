//! `tessera-heal-bench`: issue 15's healing benchmarks in one run, each against a
//! baseline measured in the same run; `bench/healing` builds the release binaries and
//! runs it. Needs root (FUSE, loop devices, mounts) and fio.
//!
//! Part A, resync (three replica daemons, so a killed one is never replaced; the
//! controller's `--replacement-delay` is an hour):
//! 1. **Resync bytes vs bytes missed.** A 2 GiB RF=3 raw block volume attached on
//!    n1; per round one replica daemon is killed (SIGKILL), N MiB of random 4 KiB
//!    O_DIRECT writes go to the volume (the distinct blocks written are the bytes
//!    the daemon missed), the daemon is started again on its data, and the engine's
//!    counters (`tessera_engine_resync_bytes_total`,
//!    `tessera_engine_resync_compared_bytes_total` on the engine-host's /metrics)
//!    say what the resync copied and compared until the volume has every replica
//!    in sync again. Once per size in `--resync-mib`.
//! 2. **Return to in sync after 1 GiB written without it** (`--lag-mib`): the same
//!    round, timed from the daemon being ready again to the engine reporting every
//!    replica in sync, split into the wait for the engine's next reconnect attempt
//!    (it backs off while the daemon is down) and the resync itself.
//! 5. **Latency of a degraded volume** (the part of item 4 no rebuild causes): fio
//!    4k randwrite QD1 on the same volume with all three replicas in sync, then with
//!    n3 killed (nothing is rebuilt: the replacement delay is an hour).
//!
//! Part B, rebuild (four replica daemons, so one is spare; replacement delay 2 s, heal
//! pass every 300 ms):
//! 3. **Full rebuild vs the disk's sequential bandwidth.** A 4 GiB RF=3 volume
//!    (`--rebuild-mib`; smaller when the disk cannot hold it four times over, and
//!    the table says so), fully written through the data path, then detached; fio's
//!    sequential 1 MiB O_DIRECT write and read (QD8) on a file in the cluster's
//!    directory (same filesystem as the replicas' data) is the baseline. One member's
//!    daemon is killed; the rebuild is timed from the first ControllerGetVolume
//!    condition saying "rebuilding" to "all 3 replicas reachable and in sync".
//! 4. **Foreground 4 KiB QD1 write latency during a rebuild vs idle.** The killed
//!    daemon is started again (its copy, replaced, is collected, so it is the spare
//!    now); the volume is attached on n1, fio (io_uring, direct, 4k randwrite QD1,
//!    `--fio-runtime` seconds, no ramp) runs once idle, then another member is
//!    killed and the same fio starts as soon as the condition says "rebuilding".
//!    The table gives p50/p99 of both and how much of the fio run the rebuild (copy,
//!    then the engine's full comparison) lasted.
//!
//! Everything is polled with deadlines, nothing sleeps to synchronise. Every cluster
//! is a `tessera_tests::Cluster` in a fresh temp dir: dropping it (also on an error,
//! a panic, SIGINT or SIGTERM) detaches what is left, stops the daemons and removes
//! mounts, loop devices and the directory (`TESSERA_KEEP_TEST_DIR=1` keeps it).
//! Progress goes to stderr, the markdown table to stdout (and `--table`).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use clap::Parser;
use serde_json::Value;
use tessera_csi_proto::v1::{ControllerGetVolumeRequest, Volume};
use tessera_tests::csi::ControllerClient;
use tessera_tests::direct_io::{pattern, DirectFile, ALIGN};
use tessera_tests::fixtures::{create_request_with, holders_of};
use tessera_tests::lifecycle::{self, attach, block_capability, kubelet_paths, Attachment};
use tessera_tests::{Cluster, ClusterBuilder};
use tokio::signal::unix::{signal, SignalKind};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = ALIGN as u64;
const ALL_IN_SYNC: &str = "all 3 replicas reachable and in sync";
/// How often a condition is looked at while waiting for a step to start (nothing
/// runs yet that the polling could slow down).
const POLL_START: Duration = Duration::from_millis(50);
/// How often the engine's counters are scraped while a resync runs.
const POLL_RESYNC: Duration = Duration::from_millis(100);
/// How often ControllerGetVolume is called while a rebuild runs: each call reads
/// every replica's record, so less often than the others.
const POLL_REBUILD: Duration = Duration::from_millis(200);
/// Longest any one healing step may take before the run gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(900);
/// Room left free on the disk beyond what part B needs.
const DISK_MARGIN: u64 = 2 << 30;
/// Size of the file the sequential baseline writes and reads.
const BASELINE_FILE: u64 = 1 << 30;

#[derive(Debug, Parser)]
#[command(about = "Issue 15's healing benchmarks: resync and rebuild vs their baselines")]
struct Args {
    /// Sizes N (MiB) of random 4 KiB writes missed by a killed daemon, one resync
    /// round each (item 1).
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    resync_mib: Vec<u64>,
    /// MiB written while the daemon is down in the timed round (item 2).
    #[arg(long, default_value_t = 1024)]
    lag_mib: u64,
    /// Size (MiB) of the volume of part A.
    #[arg(long, default_value_t = 2048)]
    resync_volume_mib: u64,
    /// Size (MiB) of the volume of part B; smaller if the disk cannot hold it.
    #[arg(long, default_value_t = 4096)]
    rebuild_mib: u64,
    /// Threads doing the random writes of part A (each one write at a time).
    #[arg(long, default_value_t = 4)]
    writer_threads: usize,
    /// Seconds per measured fio run.
    #[arg(long, default_value_t = 20)]
    fio_runtime: u64,
    /// Skip part A (items 1 and 2).
    #[arg(long)]
    skip_resync: bool,
    /// Skip part B (items 3 and 4).
    #[arg(long)]
    skip_rebuild: bool,
    /// Also write the markdown table (with its header lines) to this file.
    #[arg(long)]
    table: Option<PathBuf>,
    /// Item 4's rebuild target (the daemon lost in item 3, back as the spare) keeps
    /// its data on a tmpfs instead of the shared disk: separates the survivors' disk
    /// contention with the target's writes (which daemons on separate nodes do not
    /// have) from the rest of a rebuild's cost.
    #[arg(long)]
    spare_on_tmpfs: bool,
    /// The controller's `--heal-interval` in part B (its default is 10s; short makes
    /// the rebuild start sooner after the replacement delay).
    #[arg(long, default_value = "300ms")]
    heal_interval: String,
    /// Further flags for every replica daemon, one `--replica-arg` each (e.g.
    /// `--replica-arg=--copy-busy-share=1` to rebuild without pacing).
    #[arg(long = "replica-arg", allow_hyphen_values = true)]
    replica_args: Vec<String>,
}

fn say(msg: impl AsRef<str>) {
    eprintln!("heal-bench: {}", msg.as_ref());
}

/// One line of the table.
struct Row {
    what: String,
    result: String,
    baseline: String,
    ratio: String,
    goal: String,
    note: String,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "n/a".to_owned()
    }
}

// --- engine counters -----------------------------------------------------------------

/// One volume's engine counters and replica gauges from the engine-host's /metrics.
#[derive(Debug, Clone, Copy, Default)]
struct EngineSample {
    resync_bytes: u64,
    compared_bytes: u64,
    resyncs: u64,
    full_resyncs: u64,
    set_changes: u64,
    replicas: u64,
    in_sync: u64,
    resyncing: u64,
}

async fn engine_sample(cluster: &Cluster, volume_id: &str) -> anyhow::Result<EngineSample> {
    let page = cluster.node_host("n1")?.engine_host_metrics().await?;
    let labels = [("volume_id", volume_id)];
    let get = |name: &str| -> anyhow::Result<u64> {
        page.counter(name, &labels).ok_or_else(|| {
            anyhow!(
                "the engine-host's /metrics has no {name} for {volume_id}; engine series: {:?}",
                page.names_containing("tessera_engine")
            )
        })
    };
    Ok(EngineSample {
        resync_bytes: get("tessera_engine_resync_bytes")?,
        compared_bytes: get("tessera_engine_resync_compared_bytes")?,
        resyncs: get("tessera_engine_resyncs")?,
        full_resyncs: get("tessera_engine_full_resyncs")?,
        set_changes: get("tessera_engine_replica_set_changes")?,
        replicas: get("tessera_engine_replicas")?,
        in_sync: get("tessera_engine_replicas_in_sync")?,
        resyncing: get("tessera_engine_replicas_resyncing")?,
    })
}

/// Calls `probe` every `every` until it yields a value or `timeout` passes; `what`
/// names the condition in the error.
async fn poll<T, F, Fut>(
    what: &str,
    every: Duration,
    timeout: Duration,
    mut probe: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match probe().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            let last = last_error.map_or_else(String::new, |e| format!(" (last error: {e:#})"));
            bail!("{what}: not within {timeout:?}{last}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until the engine serves `volume_id` with every replica in sync.
async fn wait_engine_in_sync(cluster: &Cluster, volume_id: &str) -> anyhow::Result<EngineSample> {
    poll(
        "the engine reports every replica in sync",
        POLL_START,
        STEP_TIMEOUT,
        || async {
            let s = engine_sample(cluster, volume_id).await?;
            Ok((s.replicas == 3 && s.in_sync == 3).then_some(s))
        },
    )
    .await
}

/// ControllerGetVolume's condition message.
async fn condition(controller: &mut ControllerClient, volume_id: &str) -> anyhow::Result<String> {
    Ok(controller
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: volume_id.to_owned(),
        })
        .await
        .with_context(|| format!("ControllerGetVolume {volume_id}"))?
        .into_inner()
        .status
        .and_then(|s| s.volume_condition)
        .ok_or_else(|| anyhow!("ControllerGetVolume {volume_id}: no condition"))?
        .message)
}

// --- CPU -----------------------------------------------------------------------------

/// CPU time so far: the machine's (busy and all, `/proc/stat` ticks) and per daemon
/// of the cluster that matters here (replica daemons by node id, the engine-host),
/// keyed by pid so a restarted daemon is not compared with its former self.
struct CpuSnapshot {
    at: Instant,
    busy: u64,
    total: u64,
    daemons: Vec<(String, u32, u64)>,
}

fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is within user).
    let at = |i: usize| fields.get(i).copied().unwrap_or(0);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    Some((busy, busy + at(3) + at(4)))
}

/// utime + stime of every thread of `pid`, in ticks.
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces): state is field 3.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
}

fn cpu_snapshot(cluster: &Cluster) -> CpuSnapshot {
    let mut daemons: Vec<(String, Option<u32>)> = cluster
        .replicas()
        .iter()
        .map(|r| (r.node_id().to_owned(), r.pid()))
        .collect();
    daemons.extend(
        cluster
            .nodes()
            .iter()
            .map(|n| ("engine-host".to_owned(), n.engine_host_pid())),
    );
    let (busy, total) = machine_ticks().unwrap_or((0, 0));
    CpuSnapshot {
        at: Instant::now(),
        busy,
        total,
        daemons: daemons
            .into_iter()
            .filter_map(|(name, pid)| {
                let pid = pid?;
                Some((name, pid, process_ticks(pid)?))
            })
            .collect(),
    }
}

/// "CPU 190 % of 200 % (n1 45 %, ..., engine-host 30 %)" between two snapshots.
fn cpu_between(before: &CpuSnapshot, after: &CpuSnapshot) -> String {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let total = after.total.saturating_sub(before.total).max(1);
    let busy = after.busy.saturating_sub(before.busy);
    let machine = 100.0 * cpus as f64 * busy as f64 / total as f64;
    let tick = match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    };
    let wall = (after.at - before.at).as_secs_f64().max(1e-3);
    let daemons: Vec<String> = after
        .daemons
        .iter()
        .filter_map(|(name, pid, ticks)| {
            let (_, _, was) = before.daemons.iter().find(|(_, p, _)| p == pid)?;
            let share = 100.0 * ticks.saturating_sub(*was) as f64 / tick / wall;
            Some(format!("{name} {share:.0} %"))
        })
        .collect();
    format!(
        "CPU {machine:.0} % of {} % ({})",
        100 * cpus,
        daemons.join(", ")
    )
}

// --- volumes -------------------------------------------------------------------------

async fn create_block_volume(
    controller: &mut ControllerClient,
    name: &str,
    size: u64,
) -> anyhow::Result<Volume> {
    let mut request = create_request_with(
        name,
        i64::try_from(size).context("volume size")?,
        &[("replicationFactor", "3")],
    );
    request.volume_capabilities = vec![block_capability()];
    controller
        .create_volume(request)
        .await
        .with_context(|| format!("CreateVolume {name}"))?
        .into_inner()
        .volume
        .ok_or_else(|| anyhow!("CreateVolume {name} returned no volume"))
}

async fn attach_on_n1(
    cluster: &Cluster,
    volume: &Volume,
    name: &str,
) -> anyhow::Result<Attachment> {
    let mut controller = cluster.controller().await?;
    let mut node = cluster.node_client("n1").await?;
    let (staging, target) = kubelet_paths(cluster, "n1", name, true);
    attach(
        &mut controller,
        &mut node,
        volume,
        "n1",
        block_capability(),
        &staging,
        &target,
    )
    .await
}

async fn detach(cluster: &Cluster, a: &Attachment) -> anyhow::Result<()> {
    let mut controller = cluster.controller().await?;
    let mut node = cluster.node_client("n1").await?;
    lifecycle::detach(&mut controller, &mut node, a).await
}

// --- random writes -------------------------------------------------------------------

/// What [`random_writes`] did.
#[derive(Debug, Clone, Copy)]
struct Written {
    writes: u64,
    distinct_blocks: u64,
    elapsed: Duration,
}

/// Sets the flag when dropped: stops the writer threads if the run is abandoned.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// `bytes / 4 KiB` writes of 4 KiB to uniformly random blocks of `device`, O_DIRECT,
/// by `threads` threads (each one write at a time), then fdatasync; counts the
/// distinct blocks written.
async fn random_writes(
    device: &Path,
    bytes: u64,
    threads: usize,
    seed: u64,
) -> anyhow::Result<Written> {
    let stop = Arc::new(AtomicBool::new(false));
    let _guard = StopOnDrop(Arc::clone(&stop));
    let device = device.to_owned();
    tokio::task::spawn_blocking(move || {
        random_writes_blocking(&device, bytes, threads, seed, &stop)
    })
    .await
    .context("the writer task")?
}

fn random_writes_blocking(
    device: &Path,
    bytes: u64,
    threads: usize,
    seed: u64,
    stop: &AtomicBool,
) -> anyhow::Result<Written> {
    let threads = threads.max(1) as u64;
    let blocks = DirectFile::open(device, false)
        .and_then(|f| f.size())
        .with_context(|| format!("sizing {}", device.display()))?
        / BLOCK;
    ensure!(blocks > 0, "{} is empty", device.display());
    let total = bytes / BLOCK;
    let seen: Vec<AtomicU64> = (0..blocks.div_ceil(64))
        .map(|_| AtomicU64::new(0))
        .collect();
    let started = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let seen = &seen;
                let count = total / threads + u64::from(t < total % threads);
                scope.spawn(move || -> anyhow::Result<()> {
                    let file = DirectFile::open(device, true)
                        .with_context(|| format!("opening {}", device.display()))?;
                    let mut data = pattern(seed ^ (t + 1).wrapping_mul(0x9E37_79B9), ALIGN);
                    let mut state = (seed ^ (t + 1).wrapping_mul(0x2545_F491_4F6C_DD1D)) | 1;
                    for i in 0..count {
                        if stop.load(Ordering::Relaxed) {
                            bail!("stopped");
                        }
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        let block = state % blocks;
                        data[..8].copy_from_slice(&block.to_le_bytes());
                        data[8..16].copy_from_slice(&i.to_le_bytes());
                        file.write_at(block * BLOCK, &data)
                            .with_context(|| format!("writing block {block}"))?;
                        seen[(block / 64) as usize].fetch_or(1 << (block % 64), Ordering::Relaxed);
                    }
                    file.sync().context("fdatasync")
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().map_err(|_| anyhow!("a writer thread panicked"))?)
            .collect::<anyhow::Result<Vec<()>>>()
    })?;
    Ok(Written {
        writes: total,
        distinct_blocks: seen
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum(),
        elapsed: started.elapsed(),
    })
}

// --- fio -----------------------------------------------------------------------------

/// What the table uses of one fio run (one job).
#[derive(Debug, Clone, Copy)]
struct Fio {
    iops: f64,
    bytes_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Runs fio (io_uring, direct, JSON output to `out`) with `args`; killed if the run
/// is abandoned.
async fn fio(args: &[String], out: &Path) -> anyhow::Result<Fio> {
    let status = tokio::process::Command::new("fio")
        .args([
            "--ioengine=io_uring",
            "--direct=1",
            "--group_reporting",
            "--output-format=json",
        ])
        .args(args)
        .arg(format!("--output={}", out.display()))
        .kill_on_drop(true)
        .status()
        .await
        .context("running fio")?;
    ensure!(status.success(), "fio {args:?} failed: {status}");
    read_fio(out)
}

fn read_fio(path: &Path) -> anyhow::Result<Fio> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // Notices may precede the JSON document.
    let json = text
        .find('{')
        .map(|at| &text[at..])
        .ok_or_else(|| anyhow!("no JSON in {}", path.display()))?;
    let doc: Value =
        serde_json::from_str(json).with_context(|| format!("parsing {}", path.display()))?;
    let job = doc["jobs"]
        .get(0)
        .ok_or_else(|| anyhow!("no job in {}", path.display()))?;
    let side = ["write", "read"]
        .into_iter()
        .map(|d| &job[d])
        .find(|s| s["io_bytes"].as_f64().unwrap_or(0.0) > 0.0)
        .ok_or_else(|| anyhow!("no I/O in {}", path.display()))?;
    let pct = |p: &str| side["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(Fio {
        iops: side["iops"].as_f64().unwrap_or(0.0),
        bytes_per_sec: side["bw_bytes"].as_f64().unwrap_or(0.0),
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    })
}

fn qd1_randwrite(device: &Path, runtime: u64) -> Vec<String> {
    vec![
        "--name=qd1".into(),
        format!("--filename={}", device.display()),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=1".into(),
        "--norandommap".into(),
        "--randrepeat=0".into(),
        "--time_based".into(),
        format!("--runtime={runtime}"),
    ]
}

// --- part A: resync ------------------------------------------------------------------

/// One resync round.
struct Round {
    written: Written,
    /// Bytes the resync copied / compared (engine counters, deltas).
    copied: u64,
    compared: u64,
    /// start_replica until the daemon was ready.
    daemon_start: Duration,
    /// Ready until the engine was seen resyncing it (its reconnect backoff).
    reconnect_wait: Option<Duration>,
    /// Ready until every replica was in sync again.
    back_in_sync: Duration,
    /// CPU use while it resynced.
    cpu: String,
}

impl Round {
    fn missed(&self) -> u64 {
        self.written.distinct_blocks * BLOCK
    }

    fn resync_time(&self) -> Duration {
        self.back_in_sync - self.reconnect_wait.unwrap_or(self.back_in_sync)
    }
}

async fn resync_round(
    cluster: &mut Cluster,
    a: &Attachment,
    victim: usize,
    bytes: u64,
    args: &Args,
    seed: u64,
) -> anyhow::Result<Round> {
    let id = a.volume_id.as_str();
    let node = cluster.replica(victim).node_id().to_owned();
    let before = wait_engine_in_sync(cluster, id).await?;
    cluster.kill_replica(victim)?;
    say(format!(
        "killed replica daemon {node}; writing {} MiB of random 4 KiB blocks",
        bytes / MIB
    ));
    let written = random_writes(&a.target, bytes, args.writer_threads, seed).await?;
    let down = engine_sample(cluster, id).await?;
    ensure!(
        down.in_sync == 2,
        "the engine does not count {node} out after the writes: {down:?}"
    );
    say(format!(
        "{} writes ({} distinct blocks) in {}; starting {node} again",
        written.writes,
        written.distinct_blocks,
        secs(written.elapsed)
    ));
    let asked = Instant::now();
    cluster.start_replica(victim).await?;
    let ready = Instant::now();
    // When the engine was first seen resyncing, and the CPU time then.
    let resyncing_seen: RefCell<Option<CpuSnapshot>> = RefCell::new(None);
    let (shared, seen): (&Cluster, _) = (cluster, &resyncing_seen);
    let after = poll(
        &format!("{node} back in sync"),
        POLL_RESYNC,
        STEP_TIMEOUT,
        || async move {
            let s = engine_sample(shared, id).await?;
            if seen.borrow().is_none() && (s.resyncing > 0 || s.resyncs > before.resyncs) {
                *seen.borrow_mut() = Some(cpu_snapshot(shared));
            }
            Ok((s.in_sync == 3 && s.resyncs > before.resyncs).then_some(s))
        },
    )
    .await?;
    let back_in_sync = ready.elapsed();
    let end = cpu_snapshot(cluster);
    let resyncing_seen = resyncing_seen.into_inner();
    let cpu = resyncing_seen
        .as_ref()
        .map_or_else(String::new, |start| cpu_between(start, &end));
    let resyncing_seen = resyncing_seen.map(|snap| snap.at);
    let round = Round {
        written,
        copied: after.resync_bytes - before.resync_bytes,
        compared: after.compared_bytes - before.compared_bytes,
        daemon_start: ready - asked,
        // Seen only in the same poll that saw it in sync: shorter than one poll.
        reconnect_wait: resyncing_seen.map(|t| t - ready),
        back_in_sync,
        cpu,
    };
    say(format!(
        "{node} back in sync {} after it was ready: resync copied {:.1} MiB for {:.1} MiB missed ({}), compared {:.0} MiB",
        secs(back_in_sync),
        mib(round.copied),
        mib(round.missed()),
        ratio(round.copied as f64, round.missed() as f64),
        mib(round.compared)
    ));
    Ok(round)
}

async fn part_a(args: &Args, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    say("part A: resync (3 replica daemons, replacement delay 1h)");
    let mut cluster = ClusterBuilder::new()
        .replica_args(args.replica_args.clone())
        .replicas(3)
        .nodes(["n1"])
        .engine_host_metrics(true)
        .controller_args([
            "--replacement-delay",
            "1h",
            "--heal-interval",
            "300ms",
            "--refresh-interval-secs",
            "1",
        ])
        .start()
        .await?;
    say(format!("cluster in {}", cluster.dir().display()));
    let size = args.resync_volume_mib * MIB;
    let mut controller = cluster.controller().await?;
    let volume = create_block_volume(&mut controller, "heal-resync", size).await?;
    let a = attach_on_n1(&cluster, &volume, "heal-resync").await?;
    say(format!(
        "volume {} ({} MiB) attached at {}",
        a.volume_id,
        size / MIB,
        a.target.display()
    ));

    let victims = ["n2", "n3"];
    for (i, n) in args.resync_mib.iter().enumerate() {
        let victim = cluster.replica_index(victims[i % 2])?;
        let r = resync_round(&mut cluster, &a, victim, n * MIB, args, 0x1000 + i as u64).await?;
        rows.push(Row {
            what: format!("1. resync after {n} MiB of random 4 KiB writes missed"),
            result: format!("{:.1} MiB copied", mib(r.copied)),
            baseline: format!(
                "{:.1} MiB missed ({} distinct blocks of {} writes)",
                mib(r.missed()),
                r.written.distinct_blocks,
                r.written.writes
            ),
            ratio: ratio(r.copied as f64, r.missed() as f64),
            goal: "≤ 1.20×".into(),
            note: format!(
                "compared {:.0} MiB of the {} MiB volume; back in sync {} after the daemon was ready ({} of it resyncing; {})",
                mib(r.compared),
                size / MIB,
                secs(r.back_in_sync),
                secs(r.resync_time()),
                r.cpu
            ),
        });
    }

    let victim = cluster.replica_index(victims[args.resync_mib.len() % 2])?;
    let r = resync_round(&mut cluster, &a, victim, args.lag_mib * MIB, args, 0x2000).await?;
    let wait = r.reconnect_wait.map_or_else(|| "< 0.1 s".to_owned(), secs);
    rows.push(Row {
        what: format!(
            "2. daemon ready → every replica in sync, {} MiB written without it",
            args.lag_mib
        ),
        result: secs(r.back_in_sync),
        baseline: format!(
            "writing it took {} ({} writers)",
            secs(r.written.elapsed),
            args.writer_threads
        ),
        ratio: ratio(
            r.back_in_sync.as_secs_f64(),
            r.written.elapsed.as_secs_f64(),
        ),
        goal: String::new(),
        note: format!(
            "{wait} until the engine's next reconnect attempt (backoff while it was down), {} resyncing; copied {:.0} MiB for {:.0} MiB missed ({}), compared {:.0} MiB; the daemon took {} ms to start; while resyncing: {}",
            secs(r.resync_time()),
            mib(r.copied),
            mib(r.missed()),
            ratio(r.copied as f64, r.missed() as f64),
            mib(r.compared),
            r.daemon_start.as_millis(),
            r.cpu
        ),
    });

    // Item 5: the latency of a degraded volume alone (a member down, nothing rebuilt:
    // the replacement delay is an hour), the part of item 4's figure no rebuild causes.
    wait_engine_in_sync(&cluster, &a.volume_id).await?;
    let dir = cluster.dir().to_path_buf();
    let qd1 = |state: &'static str| {
        say(format!(
            "fio 4k randwrite QD1, {} s, {state}",
            args.fio_runtime
        ));
        let (fio_args, out) = (
            qd1_randwrite(&a.target, args.fio_runtime),
            dir.join(format!("qd1-{state}.json")),
        );
        async move { fio(&fio_args, &out).await }
    };
    let whole = qd1("whole").await?;
    let down = cluster.replica_index("n3")?;
    cluster.kill_replica(down)?;
    let degraded = qd1("degraded").await?;
    say(format!(
        "degraded: p50 {:.0} µs, p99 {:.0} µs (whole: {:.0} / {:.0} µs)",
        degraded.p50_us, degraded.p99_us, whole.p50_us, whole.p99_us
    ));
    rows.push(Row {
        what: "5. 4 KiB randwrite QD1 p99, one member down, no rebuild".into(),
        result: format!(
            "{:.0} µs (p50 {:.0} µs, {:.0} IOPS)",
            degraded.p99_us, degraded.p50_us, degraded.iops
        ),
        baseline: format!(
            "{:.0} µs all in sync (p50 {:.0} µs, {:.0} IOPS)",
            whole.p99_us, whole.p50_us, whole.iops
        ),
        ratio: ratio(degraded.p99_us, whole.p99_us),
        goal: String::new(),
        note: "n3 killed: every write waits for both survivors (2 of the 2 left) instead of \
               the faster 2 of 3"
            .into(),
    });
    cluster.start_replica(down).await?;
    wait_engine_in_sync(&cluster, &a.volume_id).await?;
    detach(&cluster, &a).await?;
    drop(cluster);
    Ok(())
}

// --- part B: rebuild -----------------------------------------------------------------

/// Bytes available in the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> anyhow::Result<u64> {
    let st =
        nix::sys::statvfs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// When a rebuild was seen to start, to finish its copy, and the volume whole.
struct RebuildTimes {
    rebuilding_seen: Instant,
    first_message: String,
    copied: Option<Instant>,
    whole: Instant,
}

/// Polls ControllerGetVolume until its condition says "rebuilding"; when, and the
/// message.
async fn wait_rebuilding(
    controller: &ControllerClient,
    id: &str,
) -> anyhow::Result<(Instant, String)> {
    poll(
        "a replacement copy rebuilding",
        POLL_START,
        STEP_TIMEOUT,
        || {
            let mut c = controller.clone();
            async move {
                let m = condition(&mut c, id).await?;
                Ok(m.contains("rebuilding").then(|| {
                    let out_of_sync = m
                        .split_once("out of sync: ")
                        .map_or(m.as_str(), |(_, rest)| rest.trim_end_matches(')'));
                    (Instant::now(), out_of_sync.to_owned())
                }))
            }
        },
    )
    .await
}

/// From "rebuilding" seen, polls until the volume is whole; notes when the copy ended.
async fn wait_whole(
    controller: &ControllerClient,
    id: &str,
    rebuilding_seen: Instant,
    first_message: String,
) -> anyhow::Result<RebuildTimes> {
    let copied: Cell<Option<Instant>> = Cell::new(None);
    let copied_ref = &copied;
    let whole = poll("the volume whole again", POLL_REBUILD, STEP_TIMEOUT, || {
        let mut c = controller.clone();
        async move {
            let m = condition(&mut c, id).await?;
            if copied_ref.get().is_none() && !m.contains("rebuilding") {
                copied_ref.set(Some(Instant::now()));
            }
            Ok((m == ALL_IN_SYNC).then(Instant::now))
        }
    })
    .await?;
    Ok(RebuildTimes {
        rebuilding_seen,
        first_message,
        copied: copied.get(),
        whole,
    })
}

async fn part_b(args: &Args, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    say("part B: rebuild (4 replica daemons, replacement delay 2 s)");
    let mut cluster = ClusterBuilder::new()
        .replicas(4)
        .replica_args(args.replica_args.clone())
        .nodes(["n1"])
        .engine_host_metrics(true)
        .controller_args([
            "--replacement-delay",
            "2s",
            "--heal-interval",
            &args.heal_interval,
            "--refresh-interval-secs",
            "1",
        ])
        .start()
        .await?;
    let dir = cluster.dir().to_path_buf();
    say(format!("cluster in {}", dir.display()));

    // Four copies at the peak (three members and the rebuilt one; the killed
    // member's copy stays until its daemon returns), the baseline file, a margin.
    let free = free_bytes(&dir)?;
    let fits = free.saturating_sub(BASELINE_FILE + DISK_MARGIN) / 4 / (256 * MIB) * (256 * MIB);
    let size = (args.rebuild_mib * MIB).min(fits);
    ensure!(
        size >= 256 * MIB,
        "{} GiB free in {}: too little for part B",
        free >> 30,
        dir.display()
    );
    let size_note = if size < args.rebuild_mib * MIB {
        say(format!(
            "only {:.1} GiB free: the rebuilt volume is {} MiB instead of {}",
            free as f64 / (1u64 << 30) as f64,
            size / MIB,
            args.rebuild_mib
        ));
        format!(
            "; {} MiB instead of {} MiB: the disk had {:.1} GiB free",
            size / MIB,
            args.rebuild_mib,
            free as f64 / (1u64 << 30) as f64
        )
    } else {
        String::new()
    };

    let mut controller = cluster.controller().await?;
    let name = "heal-rebuild";
    let volume = create_block_volume(&mut controller, name, size).await?;
    let id = volume.volume_id.clone();
    let a = attach_on_n1(&cluster, &volume, name).await?;
    say(format!(
        "volume {id} ({} MiB): writing all of it",
        size / MIB
    ));
    let prefill = fio(
        &[
            "--name=prefill".into(),
            format!("--filename={}", a.target.display()),
            "--rw=write".into(),
            "--bs=1M".into(),
            "--iodepth=8".into(),
            "--size=100%".into(),
            "--end_fsync=1".into(),
        ],
        &dir.join("prefill.json"),
    )
    .await?;
    say(format!(
        "written at {:.0} MiB/s; detaching",
        prefill.bytes_per_sec / MIB as f64
    ));
    detach(&cluster, &a).await?;

    // Baseline: the disk's sequential bandwidth on the replicas' filesystem.
    let raw = dir.join("seq-baseline.img");
    let seq = |rw: &str| {
        vec![
            format!("--name=seq-{rw}"),
            format!("--filename={}", raw.display()),
            format!("--rw={rw}"),
            "--bs=1M".into(),
            "--iodepth=8".into(),
            format!("--size={BASELINE_FILE}"),
            "--time_based".into(),
            "--ramp_time=2".into(),
            format!("--runtime={}", args.fio_runtime),
        ]
    };
    say("baseline: fio sequential 1 MiB write, then read, QD8, on a file in the cluster dir");
    let seq_write = fio(&seq("write"), &dir.join("seq-write.json")).await?;
    let seq_read = fio(&seq("read"), &dir.join("seq-read.json")).await?;
    std::fs::remove_file(&raw).with_context(|| format!("removing {}", raw.display()))?;
    say(format!(
        "sequential write {:.0} MiB/s, read {:.0} MiB/s",
        seq_write.bytes_per_sec / MIB as f64,
        seq_read.bytes_per_sec / MIB as f64
    ));

    // Item 3: a detached volume's member lost; rebuilt on the spare.
    let members = holders_of(&cluster, &id).await?;
    ensure!(members.len() == 3, "RF=3 volume on {members:?}");
    let lost = members[0].clone();
    let lost_index = cluster.replica_index(&lost)?;
    cluster.kill_replica(lost_index)?;
    let killed = Instant::now();
    say(format!(
        "killed replica daemon {lost}; waiting for the rebuild"
    ));
    let (seen, first) = wait_rebuilding(&controller, &id).await?;
    say(format!("{} after the kill: {first}", secs(seen - killed)));
    let cpu_start = cpu_snapshot(&cluster);
    let t = wait_whole(&controller, &id, seen, first).await?;
    let cpu = cpu_between(&cpu_start, &cpu_snapshot(&cluster));
    let took = t.whole - t.rebuilding_seen;
    let rate = size as f64 / took.as_secs_f64();
    say(format!(
        "whole again {} after the rebuild started: {:.0} MiB/s",
        secs(took),
        rate / MIB as f64
    ));
    rows.push(Row {
        what: format!(
            "3. rebuild of a detached, fully written {} MiB RF=3 volume",
            size / MIB
        ),
        result: format!("{:.0} MiB/s ({})", rate / MIB as f64, secs(took)),
        baseline: format!(
            "{:.0} MiB/s fio seq write 1M QD8 (read: {:.0} MiB/s)",
            seq_write.bytes_per_sec / MIB as f64,
            seq_read.bytes_per_sec / MIB as f64
        ),
        ratio: ratio(rate, seq_write.bytes_per_sec),
        goal: String::new(),
        note: format!(
            "timed from the condition's first \"{}\" ({} after the kill; delay 2 s) to \"{ALL_IN_SYNC}\"; the copy ended after {}, then the controller declared it in sync; {cpu}{size_note}",
            t.first_message,
            secs(t.rebuilding_seen - killed),
            t.copied.map_or_else(|| "?".to_owned(), |c| secs(c - t.rebuilding_seen)),
        ),
    });

    // Item 4: the killed daemon returns as the spare; latency idle, then during a
    // rebuild of the attached volume.
    if args.spare_on_tmpfs {
        let data = cluster.replica(lost_index).data_dir().to_path_buf();
        std::fs::remove_dir_all(&data).with_context(|| format!("emptying {}", data.display()))?;
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8g", "tessera-bench-spare"])
            .arg(&data)
            .output()
            .context("running mount")?;
        ensure!(
            out.status.success(),
            "mounting a tmpfs on {}: {}",
            data.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        say(format!(
            "{lost}'s data is on a tmpfs now (--spare-on-tmpfs)"
        ));
    }
    cluster.start_replica(lost_index).await?;
    poll(
        &format!("{lost}'s replaced copy collected"),
        POLL_REBUILD,
        STEP_TIMEOUT,
        || {
            let dirs = cluster.replica(lost_index).volume_dirs_on_disk();
            let id = &id;
            async move { Ok(dirs.ok().filter(|d| !d.contains(id)).map(|_| ())) }
        },
    )
    .await?;
    say(format!("{lost} is back and holds no copy: it is the spare"));
    let a = attach_on_n1(&cluster, &volume, name).await?;
    wait_engine_in_sync(&cluster, &id).await?;
    say(format!(
        "fio 4k randwrite QD1, {} s, idle",
        args.fio_runtime
    ));
    let cpu_start = cpu_snapshot(&cluster);
    let idle = fio(
        &qd1_randwrite(&a.target, args.fio_runtime),
        &dir.join("qd1-idle.json"),
    )
    .await?;
    let idle_cpu = cpu_between(&cpu_start, &cpu_snapshot(&cluster));
    say(format!(
        "idle: {:.0} IOPS, p50 {:.0} µs, p99 {:.0} µs",
        idle.iops, idle.p50_us, idle.p99_us
    ));
    let members = holders_of(&cluster, &id).await?;
    ensure!(
        members.len() == 3 && !members.contains(&lost),
        "the volume is on {members:?}, with {lost} as the spare"
    );
    let victim = members[0].clone();
    let victim_index = cluster.replica_index(&victim)?;
    let before = engine_sample(&cluster, &id).await?;
    cluster.kill_replica(victim_index)?;
    let killed = Instant::now();
    say(format!(
        "killed replica daemon {victim}; fio starts when the rebuild does"
    ));
    let (seen, first) = wait_rebuilding(&controller, &id).await?;
    let fio_started = Instant::now();
    let busy_args = qd1_randwrite(&a.target, args.fio_runtime);
    let busy_out = dir.join("qd1-rebuild.json");
    let cpu_start = cpu_snapshot(&cluster);
    let busy_run = async {
        let result = fio(&busy_args, &busy_out).await?;
        let cpu = cpu_between(&cpu_start, &cpu_snapshot(&cluster));
        Ok::<_, anyhow::Error>((result, Instant::now(), cpu))
    };
    let ((busy, busy_ended, busy_cpu), t) =
        tokio::try_join!(busy_run, wait_whole(&controller, &id, seen, first))?;
    let after = engine_sample(&cluster, &id).await?;
    let run = busy_ended - fio_started;
    let overlap = t
        .whole
        .min(busy_ended)
        .saturating_duration_since(fio_started);
    let copy_overlap = t
        .copied
        .unwrap_or(t.whole)
        .min(busy_ended)
        .saturating_duration_since(fio_started);
    say(format!(
        "during the rebuild: {:.0} IOPS, p50 {:.0} µs, p99 {:.0} µs; whole {} after fio started",
        busy.iops,
        busy.p50_us,
        busy.p99_us,
        secs(t.whole.saturating_duration_since(fio_started))
    ));
    let during = format!(
        "rebuild started {} after the kill; its copy lasted {} and the volume was whole {} after fio started, \
         so the rebuild covered {:.0} % of the {} fio run (the copy {:.0} %); the engine compared {:.0} MiB and copied {:.1} MiB to the new member ({} full comparison(s), {} set change(s)); during the fio run {busy_cpu}, during the idle one {idle_cpu}{size_note}",
        secs(t.rebuilding_seen - killed),
        t.copied.map_or_else(|| "?".to_owned(), |c| secs(c - t.rebuilding_seen)),
        secs(t.whole.saturating_duration_since(fio_started)),
        100.0 * overlap.as_secs_f64() / run.as_secs_f64(),
        secs(run),
        100.0 * copy_overlap.as_secs_f64() / run.as_secs_f64(),
        mib(after.compared_bytes - before.compared_bytes),
        mib(after.resync_bytes - before.resync_bytes),
        after.full_resyncs - before.full_resyncs,
        after.set_changes - before.set_changes,
    );
    rows.push(Row {
        what: "4. 4 KiB randwrite QD1 p50, during a rebuild".into(),
        result: format!("{:.0} µs", busy.p50_us),
        baseline: format!("{:.0} µs idle", idle.p50_us),
        ratio: ratio(busy.p50_us, idle.p50_us),
        goal: String::new(),
        note: String::new(),
    });
    rows.push(Row {
        what: "4. 4 KiB randwrite QD1 p99, during a rebuild".into(),
        result: format!("{:.0} µs", busy.p99_us),
        baseline: format!("{:.0} µs idle", idle.p99_us),
        ratio: ratio(busy.p99_us, idle.p99_us),
        goal: "≤ 2×".into(),
        note: during,
    });
    rows.push(Row {
        what: "4. 4 KiB randwrite QD1 IOPS, during a rebuild".into(),
        result: format!("{:.0} IOPS", busy.iops),
        baseline: format!("{:.0} IOPS idle", idle.iops),
        ratio: ratio(busy.iops, idle.iops),
        goal: String::new(),
        note: String::new(),
    });
    detach(&cluster, &a).await?;
    drop(cluster);
    Ok(())
}

// --- the run -------------------------------------------------------------------------

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".to_owned())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let started = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let load_before = loadavg();
    say(format!("load average before: {load_before}"));
    let mut rows = Vec::new();
    if !args.skip_resync {
        part_a(&args, &mut rows).await?;
    }
    if !args.skip_rebuild {
        part_b(&args, &mut rows).await?;
    }
    let load_after = loadavg();
    let ended = command_output("date", &["-u", "+%H:%M UTC"]);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut out = String::new();
    out.push_str(&format!(
        "{started} – {ended}; {cpus} CPUs, kernel {}, {}; load average before {load_before}, after {load_after}\n",
        command_output("uname", &["-r"]),
        command_output("fio", &["--version"]),
    ));
    out.push_str(&format!(
        "part A: 3 replica daemons, {} MiB volume, random writes by {} threads; part B: 4 replica daemons (one spare), replacement delay 2 s, fio io_uring direct=1, {} s per run\n\n",
        args.resync_volume_mib, args.writer_threads, args.fio_runtime
    ));
    out.push_str("| measurement | result | baseline (same run) | ratio | issue's goal | note |\n");
    out.push_str("|---|---:|---:|---:|---:|---|\n");
    for r in &rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.what, r.result, r.baseline, r.ratio, r.goal, r.note
        ));
    }
    print!("{out}");
    if let Some(path) = &args.table {
        std::fs::write(path, &out).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        nix::unistd::geteuid().is_root()
            && Path::new("/dev/fuse").exists()
            && Path::new("/dev/loop-control").exists(),
        "needs root, /dev/fuse and /dev/loop-control"
    );
    ensure!(
        command_output("fio", &["--version"]) != "?",
        "fio not found: run scripts/setup"
    );
    // Watched before anything starts: a signal drops the run, and with it the
    // clusters, which tear themselves down.
    let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    tokio::select! {
        result = run(args) => result,
        _ = term.recv() => Err(anyhow!("stopped by SIGTERM (cleaned up)")),
        _ = int.recv() => Err(anyhow!("stopped by SIGINT (cleaned up)")),
    }
}
