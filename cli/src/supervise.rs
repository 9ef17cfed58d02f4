//! Watching the daemons while `tessera up` runs: report every death, and restart
//! what [`crate::restart`] says to restart, until a stop signal.
//!
//! The daemons are checked every [`WATCH_INTERVAL`]. A death is reported at once
//! (which daemon, its pid, exit status or signal, and for a daemon that exited by
//! itself the end of its log, where it said why). A restart is due after its
//! backoff; an attempt that fails (the daemon exits or does not answer in time) is
//! reported and tried again later, with a longer pause. Only a death that the
//! policy calls fatal ends the watch with an error; a stop signal ends it with
//! `Ok`, also in the middle of a restart (the new process is then stopped by the
//! teardown like the others).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::daemon::describe_exit;
use crate::local_cluster::LocalCluster;
use crate::restart::{Backoff, Decision, RestartPolicy};
use crate::signals::Stop;
use crate::up::indent;

/// How often the daemons are checked.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// Log lines printed when a daemon exits by itself (a crash with a message).
const DEATH_TAIL_LINES: usize = 10;

/// Restart bookkeeping of one daemon, by name.
#[derive(Debug, Default)]
struct Tracked {
    backoff: Backoff,
    /// When the next start is due, while the daemon is dead and to be restarted.
    due: Option<Instant>,
    /// Attempts since it died.
    attempts: u32,
}

/// Watches a [`LocalCluster`] and restarts its daemons.
#[derive(Debug)]
pub struct Supervisor {
    policy: RestartPolicy,
    tracked: HashMap<String, Tracked>,
    restarts: BTreeMap<String, usize>,
}

impl Supervisor {
    /// A supervisor applying `policy`.
    pub fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            tracked: HashMap::new(),
            restarts: BTreeMap::new(),
        }
    }

    /// Successful restarts by daemon name, for the final summary.
    pub fn restarts(&self) -> &BTreeMap<String, usize> {
        &self.restarts
    }

    /// Watches until a stop is requested (`Ok`) or a daemon dies fatally (`Err`,
    /// with its log tail). `volume_staged` says whether the engine-host serves a
    /// staged volume.
    pub async fn run(
        &mut self,
        cluster: &mut LocalCluster,
        stop: &Stop,
        volume_staged: bool,
    ) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.wait() => return Ok(()),
                _ = tick.tick() => {}
            }
            self.notice_deaths(cluster, volume_staged)?;
            if !self.restart_due(cluster, stop).await {
                return Ok(());
            }
        }
    }

    /// Reports each daemon that died since the last check and schedules its
    /// restart; fails on a fatal death.
    fn notice_deaths(
        &mut self,
        cluster: &mut LocalCluster,
        volume_staged: bool,
    ) -> anyhow::Result<()> {
        for daemon in cluster.daemons_mut() {
            let Some(status) = daemon.exited() else {
                continue;
            };
            let name = daemon.name().to_owned();
            let how = describe_exit(status);
            println!("\ntessera up: {name} (pid {}) died: {how}", daemon.pid());
            // A killed process had no chance to say anything; one that exited did.
            if status.code().is_some() {
                println!(
                    "  ---- last lines of {} ----\n{}\n  ----",
                    daemon.log().display(),
                    indent(&daemon.log_tail(DEATH_TAIL_LINES))
                );
            }
            match self.policy.decide(daemon.spec().role, volume_staged) {
                Decision::Fatal(why) => {
                    return Err(daemon.failure(format_args!("died ({how}): {why}")));
                }
                Decision::LeaveDead => println!(
                    "tessera up: {name} is left dead (--no-restart); the rest keeps running"
                ),
                Decision::Restart => {
                    let tracked = self.tracked.entry(name.clone()).or_default();
                    let delay = tracked.backoff.after_death(daemon.uptime());
                    tracked.due = Some(Instant::now() + delay);
                    tracked.attempts = 0;
                    println!("tessera up: restarting {name} in {}", seconds(delay));
                }
            }
        }
        Ok(())
    }

    /// Restarts every daemon whose restart is due. Returns `false` if a stop was
    /// requested meanwhile.
    async fn restart_due(&mut self, cluster: &mut LocalCluster, stop: &Stop) -> bool {
        for index in 0..cluster.daemons().len() {
            let name = cluster.daemons()[index].name().to_owned();
            let Some(tracked) = self.tracked.get_mut(&name) else {
                continue;
            };
            if tracked.due.is_none_or(|due| due > Instant::now()) {
                continue;
            }
            tracked.due = None;
            tracked.attempts += 1;
            let Ok(result) = stop.interruptible(cluster.restart(index)).await else {
                return false;
            };
            match result {
                Ok(pid) => {
                    println!("tessera up: {name} restarted (pid {pid})");
                    *self.restarts.entry(name).or_default() += 1;
                }
                Err(e) => {
                    let delay = tracked.backoff.after_failed_start();
                    tracked.due = Some(Instant::now() + delay);
                    println!(
                        "tessera up: restarting {name} failed (attempt {}): {e:#}\n  \
                         next attempt in {}",
                        tracked.attempts,
                        seconds(delay)
                    );
                }
            }
        }
        true
    }
}

/// `0.5s`-style duration for messages.
fn seconds(d: Duration) -> String {
    format!("{}s", d.as_secs_f32())
}
