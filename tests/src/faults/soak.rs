//! The randomized soak: rounds of faults drawn from (a)–(f) and (h), each followed by
//! the suite's checks (durable blocks read back current, `tessera verify` clean). It
//! stops at the first failure, naming the round, the fault and the seed that replays
//! the same draw.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::scenarios::{self, Report};
use super::{FaultRig, RigConfig};

/// A fault a round can draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// (a) Every member's daemon killed and restarted in turn.
    RollingRestart,
    /// (b) The engine partitioned from one replica for 6–12 s.
    Partition,
    /// (c) A member lost for good, replaced; then a second one down for a while.
    LostForGood,
    /// (d) The engine-host killed mid-write, the volume moved to another node.
    EngineHostCrash,
    /// (e) One replica's link at 1 MB/s.
    SlowReplica,
    /// (f) One replica's filesystem full.
    FullFilesystem,
    /// (h) A replica down while written, then the volume moved to its node.
    StaleReplicaThenMove,
}

impl Fault {
    /// Every fault, in the order a seed indexes them.
    pub const ALL: [Fault; 7] = [
        Fault::RollingRestart,
        Fault::Partition,
        Fault::LostForGood,
        Fault::EngineHostCrash,
        Fault::SlowReplica,
        Fault::FullFilesystem,
        Fault::StaleReplicaThenMove,
    ];
}

/// How a soak runs.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// Rounds to run at most.
    pub rounds: u64,
    /// Stop starting rounds after this long (the short soak of the test command).
    pub time_budget: Option<Duration>,
    /// Seeds the draw of faults, victims and writers.
    pub seed: u64,
}

/// What a soak did.
#[derive(Debug, Default)]
pub struct SoakSummary {
    /// Rounds completed, per fault.
    pub rounds: BTreeMap<String, u64>,
    /// Total rounds completed.
    pub total: u64,
    /// Longest round.
    pub longest_round: Duration,
    /// Sum of round times.
    pub elapsed: Duration,
    /// Writes done by all writers.
    pub writes: u64,
}

/// The rig the soak runs on: four daemons (one spare for (c)), nodes n1–n3 with
/// engines, every data directory on a 384 MiB filesystem of its own (for (f)), a
/// replacement delay of 10 s (longer than any other fault keeps a daemon away).
pub fn soak_rig_config() -> RigConfig {
    RigConfig {
        replicas: 4,
        replacement_delay: "10s".into(),
        disk_bytes: Some(384 << 20),
        ..RigConfig::default()
    }
}

/// xorshift64: the soak's only source of randomness, so a seed replays a run.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// One of `items`, or an error naming `what` when there is none.
    fn pick<T: Clone>(&mut self, items: &[T], what: &str) -> anyhow::Result<T> {
        let i = self.below(items.len() as u64) as usize;
        items
            .get(i)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no {what} to pick from"))
    }
}

/// Runs the soak on a fresh rig; `progress` gets each round's report.
pub async fn soak(
    config: &SoakConfig,
    mut progress: impl FnMut(u64, &Report),
) -> anyhow::Result<SoakSummary> {
    let mut rig = FaultRig::start(&soak_rig_config(), "soak").await?;
    let mut draw = Draw(config.seed | 1);
    let mut summary = SoakSummary::default();
    let started = Instant::now();
    for round in 1..=config.rounds {
        if config
            .time_budget
            .is_some_and(|budget| started.elapsed() >= budget)
        {
            break;
        }
        let fault = draw.pick(&Fault::ALL, "fault")?;
        let seed = draw.next();
        let t = Instant::now();
        let outcome = async {
            let report = run_round(&mut rig, fault, seed, &mut draw).await?;
            rig.final_checks(&format!("after round {round} ({fault:?})"))
                .await?;
            anyhow::Ok(report)
        }
        .await;
        let report = match outcome {
            Ok(report) => report,
            Err(e) => {
                return Err(e.context(format!(
                    "soak round {round} ({fault:?}) failed (seed {:#x}; condition: {})",
                    config.seed,
                    rig.condition().await
                )))
            }
        };
        let took = t.elapsed();
        summary.longest_round = summary.longest_round.max(took);
        summary.elapsed += took;
        summary.total += 1;
        *summary.rounds.entry(format!("{fault:?}")).or_default() += 1;
        summary.writes += report
            .get("writes")
            .and_then(|w| w.parse::<u64>().ok())
            .unwrap_or(0);
        progress(round, &report);
    }
    Ok(summary)
}

async fn run_round(
    rig: &mut FaultRig,
    fault: Fault,
    seed: u64,
    draw: &mut Draw,
) -> anyhow::Result<Report> {
    match fault {
        Fault::RollingRestart => scenarios::rolling_restart(rig, seed).await,
        Fault::Partition => {
            let secs = 6 + draw.below(7);
            scenarios::partition(rig, seed, Duration::from_secs(secs)).await
        }
        Fault::LostForGood => scenarios::lost_for_good(rig, seed).await,
        Fault::EngineHostCrash => {
            let here = rig.node()?.to_owned();
            let others: Vec<String> = rig
                .cluster
                .nodes()
                .iter()
                .map(|n| n.node_id().to_owned())
                .filter(|n| *n != here)
                .collect();
            let to = draw.pick(&others, "other node")?;
            scenarios::engine_host_crash(rig, seed, &to).await
        }
        Fault::SlowReplica => {
            scenarios::slow_replica(rig, seed, scenarios::SLOW_LINK_BYTES_PER_SEC).await
        }
        Fault::FullFilesystem => {
            let victim = draw.pick(&scenarios::remote_members(rig).await?, "remote member")?;
            scenarios::full_filesystem(rig, seed, &victim).await
        }
        Fault::StaleReplicaThenMove => scenarios::stale_replica_then_move(rig, seed).await,
    }
}
