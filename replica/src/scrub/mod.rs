//! The scrubber (issue 15 item 5): every block of every layer of every volume on this
//! daemon, attached or not, head and snapshots, is read back and checked against its
//! checksum once per `--scrub-period`, at most `--scrub-rate` bytes per second at the
//! background I/O class; a damaged block is repaired from a copy another replica of
//! the volume holds (`repair`). Rot in a sealed layer or a detached volume is then
//! found while its other copies still exist, not when someone next reads it.
//!
//! A pass walks volumes, layers and blocks in order, in steps of [`STEP_BLOCKS`]
//! (`LayeredStore::scrub_step`), paced by a token bucket; the first starts one period
//! (at most an hour) after the daemon, each next one a period after the previous
//! one started (at once if a pass took longer). What it did is in
//! [`ScrubStats`] and on `/metrics` ([`ScrubCollector`]).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tessera_telemetry::exposition::{counters, gauge};
use tessera_telemetry::prometheus_client::collector::Collector;
use tessera_telemetry::prometheus_client::encoding::DescriptorEncoder;
use tokio::sync::watch;

use crate::catalog::Catalog;
use crate::copy::throttle::Bandwidth;
use crate::record::VolumeRecord;
use crate::store::{LayeredStore, ScrubLayer};
use tessera_replica_protocol::block::BLOCK_SIZE;

mod repair;

/// Blocks checked per step (1 MiB): small enough that a chain change waits little.
pub const STEP_BLOCKS: u64 = 256;
/// Default time between the starts of two passes.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest wait from the daemon's start to its first pass.
pub const FIRST_PASS_AFTER_AT_MOST: Duration = Duration::from_secs(3600);
/// Default read rate of a pass, bytes per second.
pub const DEFAULT_RATE: u64 = 32 << 20;

/// How the scrubber runs.
#[derive(Debug, Clone)]
pub struct ScrubConfig {
    /// Time between the starts of two passes (`--scrub-period`); zero disables.
    pub period: Duration,
    /// Bytes per second a pass reads at most (`--scrub-rate`; 0 = unlimited).
    pub rate: u64,
    /// This daemon's node id: the other members of a volume's set are its peers.
    pub node_id: String,
    /// Deadline of one request to a peer.
    pub peer_timeout: Duration,
    /// How peers are dialled (the daemon's transport).
    pub transport: tessera_tls::Transport,
}

/// What the scrubber did since the daemon started.
#[derive(Debug, Default)]
pub struct ScrubStats {
    /// Blocks read back and checked.
    pub blocks_verified: AtomicU64,
    /// Blocks that failed their check.
    pub corrupt_found: AtomicU64,
    /// Damaged blocks rewritten from a peer's copy.
    pub repaired: AtomicU64,
    /// Damaged blocks left as they are (no peer had an intact copy, a shared layer).
    pub unrepaired: AtomicU64,
    /// Passes finished.
    pub passes: AtomicU64,
    /// End of the last finished pass, seconds since the Unix epoch (0: none yet).
    pub last_pass_end_unix: AtomicU64,
}

impl ScrubStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The daemon's scrubber.
pub struct Scrubber {
    catalog: Arc<Catalog>,
    cfg: ScrubConfig,
    stats: Arc<ScrubStats>,
    bandwidth: Option<Arc<Bandwidth>>,
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrubber")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Scrubber {
    /// A scrubber of `catalog`'s volumes.
    pub fn new(catalog: Arc<Catalog>, cfg: ScrubConfig) -> Scrubber {
        Scrubber {
            bandwidth: Bandwidth::limit(cfg.rate),
            catalog,
            cfg,
            stats: Arc::default(),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<ScrubStats> {
        Arc::clone(&self.stats)
    }

    /// The `/metrics` collector of its counters.
    pub fn collector(&self) -> ScrubCollector {
        ScrubCollector(self.stats())
    }

    /// Runs passes every period until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        if self.cfg.period.is_zero() {
            tracing::info!("scrubbing disabled (--scrub-period 0)");
            return;
        }
        // Not at once: a daemon restarted (a rolling update) would read all its data
        // again right away. One period, at most an hour, after the start.
        let first = Instant::now() + self.cfg.period.min(FIRST_PASS_AFTER_AT_MOST);
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep_until(first.into()) => {}
        }
        loop {
            let started = Instant::now();
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = self.pass() => {}
            }
            let next = started + self.cfg.period;
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep_until(next.into()) => {}
            }
        }
    }

    /// One pass over every volume.
    pub async fn pass(&self) {
        let started = Instant::now();
        let before = (
            self.stats.blocks_verified.load(Ordering::Relaxed),
            self.stats.corrupt_found.load(Ordering::Relaxed),
            self.stats.repaired.load(Ordering::Relaxed),
        );
        for rec in self.catalog.list() {
            // A volume still being populated is not served, nor scrubbed: its copy
            // writes every block anyway.
            let Ok((store, _)) = self.catalog.open_store(&rec.volume_id) else {
                continue;
            };
            for layer in store.scrub_layers() {
                self.scrub_layer(&rec, &store, &layer).await;
            }
        }
        ScrubStats::add(&self.stats.passes, 1);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.stats.last_pass_end_unix.store(now, Ordering::Relaxed);
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            blocks_verified = self.stats.blocks_verified.load(Ordering::Relaxed) - before.0,
            corrupt_found = self.stats.corrupt_found.load(Ordering::Relaxed) - before.1,
            repaired = self.stats.repaired.load(Ordering::Relaxed) - before.2,
            "scrub pass complete"
        );
    }

    async fn scrub_layer(&self, rec: &VolumeRecord, store: &Arc<LayeredStore>, layer: &ScrubLayer) {
        let mut at = Some(0);
        while let Some(from) = at {
            let step = {
                let (store, layer) = (Arc::clone(store), layer.clone());
                tokio::task::spawn_blocking(move || store.scrub_step(&layer, from, STEP_BLOCKS))
                    .await
            };
            let step = match step {
                Ok(Ok(step)) => step,
                Ok(Err(e)) => {
                    tracing::warn!(volume = %rec.volume_id, layer = layer.id,
                        error = %tessera_telemetry::error_chain(&e), "scrub step failed; layer skipped this pass");
                    return;
                }
                Err(e) => {
                    tracing::warn!(volume = %rec.volume_id, error = %e, "scrub step panicked");
                    return;
                }
            };
            ScrubStats::add(&self.stats.blocks_verified, step.verified);
            ScrubStats::add(&self.stats.corrupt_found, step.damaged.len() as u64);
            for damaged in &step.damaged {
                let outcome = self.repair(rec, store, damaged).await;
                match outcome {
                    Ok(()) => ScrubStats::add(&self.stats.repaired, 1),
                    Err(reason) => {
                        ScrubStats::add(&self.stats.unrepaired, 1);
                        tracing::error!(volume = %rec.volume_id, layer = layer.id,
                            snapshot = layer.snapshot_id.as_deref().unwrap_or("(head)"),
                            block = damaged.block, %reason, "damaged block found and not repaired");
                    }
                }
            }
            if let Some(bw) = &self.bandwidth {
                bw.take(step.verified * BLOCK_SIZE).await;
            }
            at = step.next;
        }
    }
}

/// `/metrics` view of [`ScrubStats`].
#[derive(Debug)]
pub struct ScrubCollector(Arc<ScrubStats>);

impl Collector for ScrubCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (name, help, value) in [
            (
                "tessera_replica_scrub_blocks_verified",
                "Blocks the scrubber read back and checked.",
                load(&s.blocks_verified),
            ),
            (
                "tessera_replica_scrub_corrupt_found",
                "Blocks the scrubber found failing their checksum.",
                load(&s.corrupt_found),
            ),
            (
                "tessera_replica_scrub_repaired",
                "Damaged blocks the scrubber rewrote from another replica's copy.",
                load(&s.repaired),
            ),
            (
                "tessera_replica_scrub_unrepaired",
                "Damaged blocks the scrubber could not repair (no intact copy found).",
                load(&s.unrepaired),
            ),
            (
                "tessera_replica_scrub_passes",
                "Scrub passes finished over every volume of this daemon.",
                load(&s.passes),
            ),
        ] {
            counters(
                &mut encoder,
                name,
                help,
                [(Vec::<(&str, &str)>::new(), value)],
            )?;
        }
        gauge(
            &mut encoder,
            "tessera_replica_scrub_last_complete_pass_timestamp_seconds",
            "End of the last finished scrub pass (Unix time; 0 before the first).",
            load(&s.last_pass_end_unix),
        )
    }
}
