//! The engine's half of keeping replicas in sync (DESIGN.md "Recovery"):
//!
//! * **At open** ([`Inner::bring_in_sync`]): read every reached replica's in-sync
//!   record and dirty regions, take the newest record among them (records are
//!   written to a majority, the replicas reached are a majority, so the newest
//!   declaration is among them), reconcile the union of the dirty regions
//!   (`reconcile` module) onto every reached replica, flush them, and declare the
//!   reached replicas in sync under this engine's epoch on a majority. Replicas
//!   the record leaves out are copied to, never read from, until then; a replica
//!   not reached stays out.
//! * **Never declared in sync**: the dirty maps bound what a replica lacks only if
//!   it was a member and missed writes since (nothing is cleaned while a member is
//!   out). A reached replica whose own record does not name it while the newest
//!   record is a declaration (a rebuilt copy, a lost in-sync file, a replacement)
//!   may lack writes cleaned from every map before it joined. If the others reached
//!   are a majority without it, it takes part in reconciling the dirty regions as
//!   the newest record says (a source if named there: it may hold the only reached
//!   copy of a write), then is left stale and compared over the whole volume online
//!   (`resync`); otherwise the whole volume is reconciled at open, before the
//!   engine serves.
//! * **While serving**: a replica marked stale is declared out at once, in the
//!   background ([`Inner::declare_in_sync`]); writes do not wait for it, because
//!   the dirty regions of the replicas that took them already let the next engine
//!   find every block that replica lacks.
//! * **Cleaning** ([`Inner::clean_round`], every `clean_interval` while writes
//!   happen, and at close): once every replica of the set is in sync, the dirty
//!   regions whose writes every replica holds durably are cleared, so the next
//!   engine reconciles only what was written recently. While a replica is out,
//!   nothing is cleared: the others' maps are what it missed.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant as StdInstant;

use futures_util::stream::{self, StreamExt};
use tessera_replica_protocol::block::BlockVersion;
use tessera_replica_protocol::block::BLOCK_SIZE;
use tessera_replica_protocol::data::{ClientError, ErrorCode, ReplicaDataClient};
use tessera_replica_protocol::sync::{DirtyMap, Membership};

use super::reconcile::{plan_region, runs, Run};
use super::{bits, error_chain, sep, EngineError, Inner};

/// Regions reconciled at once.
const REGIONS_IN_FLIGHT: usize = 4;
/// Times a region is planned again when a fetched version is not the planned one
/// (a write of a fenced engine landing late).
const REGION_ATTEMPTS: usize = 3;

/// What reconciling at open did, for the log and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Dirty regions compared.
    pub regions: u64,
    /// Blocks copied (per block, not per target).
    pub blocks_fixed: u64,
    /// Bytes of data sent to targets.
    pub bytes_copied: u64,
    /// Blocks no source held intact (left as they are).
    pub blocks_lost: u64,
    /// Replicas the in-sync record had left out that were brought back.
    pub readmitted: Vec<String>,
    /// Replicas never declared in sync (their own in-sync record leaves them out)
    /// that were compared over the whole volume at open, because without them a
    /// majority was not in sync.
    pub compared_in_full: Vec<String>,
    /// Replicas never declared in sync that were left stale at open, to be compared
    /// over the whole volume online (the rest were a majority without them).
    pub left_for_full_resync: Vec<String>,
}

impl Inner {
    /// Runs one sync request on replica `r`, bounded by the request timeout; a
    /// failure marks it stale (STALE_EPOCH fences the engine).
    pub(super) async fn ask<T, F>(
        &self,
        r: usize,
        what: &str,
        f: impl FnOnce(ReplicaDataClient) -> F,
    ) -> Option<T>
    where
        F: std::future::Future<Output = Result<T, ClientError>>,
    {
        let client = self.replicas[r].live_client()?;
        match tokio::time::timeout(self.timeout, f(client)).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) if e.code() == Some(ErrorCode::StaleEpoch) => {
                self.fence(r, &e);
                None
            }
            Ok(Err(e)) => {
                self.mark_stale(r, format!("{what} failed: {}", error_chain(&e)));
                None
            }
            Err(_) => {
                self.mark_stale(r, format!("{what}: no reply within {:?}", self.timeout));
                None
            }
        }
    }

    /// The open-time sequence of the module doc. On success the replicas not
    /// stale are in sync and declared so.
    pub(super) async fn bring_in_sync(&self) -> Result<ReconcileReport, EngineError> {
        let n = self.replicas.len();
        for r in 0..n {
            if let Some(c) = self.replicas[r].live_client() {
                if !c.supports_sync() {
                    self.mark_stale(
                        r,
                        format!(
                            "replica speaks data-plane protocol {}, which cannot be reconciled; upgrade it",
                            c.info().protocol_version
                        ),
                    );
                }
            }
        }
        let states = futures_util::future::join_all((0..n).map(|r| async move {
            let m = self
                .ask(r, "reading the in-sync record", |c| async move {
                    c.membership().await
                })
                .await?;
            let d = self
                .ask(r, "reading the dirty regions", |c| async move {
                    c.dirty_regions().await
                })
                .await?;
            Some((m, d))
        }))
        .await;
        // The newest record is only known to be the last declaration when a majority
        // answered (declarations reach a majority; any two majorities meet).
        self.enough_in_sync()?;
        let newest = states
            .iter()
            .flatten()
            .map(|(m, _)| m)
            .max_by_key(|m| m.key())
            .cloned()
            .unwrap_or_default();
        let mut sources = 0u32;
        let mut out_of_sync = Vec::new();
        let mut never_declared = 0u32;
        let mut dirty: Option<DirtyMap> = None;
        for (r, state) in states.iter().enumerate() {
            let Some((own, map)) = state else { continue };
            let node_id = self.replicas[r].id().node_id.clone();
            if newest.includes(&node_id) {
                sources |= 1 << r;
            } else {
                out_of_sync.push(r);
            }
            if !newest.is_undeclared() && !own.members.contains(&node_id) {
                never_declared |= 1 << r;
            }
            match &mut dirty {
                Some(all) => all.union(map),
                None => dirty = Some(map.clone()),
            }
        }
        if sources == 0 {
            return Err(self.not_in_sync(
                format!(
                    "no replica reached is in sync by the newest in-sync record (epoch {}, version {}: {})",
                    newest.epoch,
                    newest.version,
                    newest.members.join(", ")
                ),
            ));
        }
        // Declarations of this epoch continue the newest one's numbering (an engine
        // reopened at the same epoch, e.g. after its engine-host restarted); no
        // members, so the first declaration below is always written.
        *self.declared.lock().await = Membership {
            members: Vec::new(),
            ..newest.clone()
        };
        let mut report = ReconcileReport::default();
        let size = self.size.load(Ordering::Acquire);
        // See the module doc: the dirty maps do not bound what these lack.
        let in_full = never_declared != 0
            && ((self.in_sync_mask() & !never_declared).count_ones() as usize) < self.quorum;
        let names = |mask: u32| -> Vec<String> {
            bits(mask)
                .map(|r| self.replicas[r].id().node_id.clone())
                .collect()
        };
        if in_full {
            report.compared_in_full = names(never_declared);
        }
        let started = StdInstant::now();
        let ranges = match (in_full, dirty) {
            (true, _) => volume_ranges(size),
            (false, Some(dirty)) => dirty_ranges(&dirty, size),
            (false, None) => Vec::new(),
        };
        if !ranges.is_empty() {
            self.reconcile_regions(ranges, sources, &mut report).await?;
        }
        // What was copied must be durable before anyone is declared in sync by it,
        // and before any region is cleared.
        self.flush_all("flushing after reconcile").await;
        if !in_full && never_declared != 0 {
            // Only now: one the newest record names was a source for the dirty
            // regions (it may be the only replica reached holding a write there).
            report.left_for_full_resync = names(never_declared);
            for r in bits(never_declared) {
                self.replicas[r].flag_full_compare();
                self.mark_stale(
                    r,
                    "its own in-sync record does not name it: compared over the whole volume once the engine serves"
                        .to_owned(),
                );
            }
        }
        self.check_usable()?;
        report.readmitted = out_of_sync
            .iter()
            .filter(|&&r| !self.replicas[r].is_stale())
            .map(|&r| self.replicas[r].id().node_id.clone())
            .collect();
        self.declare_in_sync().await?;
        // Nothing was written since the flush above.
        self.clean_round(false).await;
        if report.regions > 0 || !report.readmitted.is_empty() || never_declared != 0 {
            tracing::info!(volume = %self.volume_id, epoch = self.epoch.get(), regions = report.regions,
                blocks_fixed = report.blocks_fixed, bytes_copied = report.bytes_copied,
                blocks_lost = report.blocks_lost, readmitted = ?report.readmitted,
                compared_in_full = ?report.compared_in_full,
                left_for_full_resync = ?report.left_for_full_resync,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "replicas reconciled at open");
        }
        Ok(report)
    }

    fn not_in_sync(&self, why: String) -> EngineError {
        let mut failures = self.stale_summary();
        if !why.is_empty() {
            let _ = write!(failures, "{}{why}", sep(&failures));
        }
        EngineError::NotInSync {
            volume_id: self.volume_id.clone(),
            in_sync: self.in_sync_mask().count_ones() as usize,
            total: self.replicas.len(),
            needed: self.quorum,
            failures,
        }
    }

    fn enough_in_sync(&self) -> Result<(), EngineError> {
        self.check_usable()?;
        if (self.in_sync_mask().count_ones() as usize) < self.quorum {
            return Err(self.not_in_sync(String::new()));
        }
        Ok(())
    }

    async fn reconcile_regions(
        &self,
        ranges: Vec<(u64, u64)>,
        sources: u32,
        report: &mut ReconcileReport,
    ) -> Result<(), EngineError> {
        let results: Vec<Result<RegionOutcome, EngineError>> = stream::iter(ranges)
            .map(|(offset, len)| self.reconcile_region(offset, len, sources))
            .buffer_unordered(REGIONS_IN_FLIGHT)
            .collect()
            .await;
        for r in results {
            let o = r?;
            report.regions += 1;
            report.blocks_fixed += o.blocks_fixed;
            report.bytes_copied += o.bytes_copied;
            report.blocks_lost += o.blocks_lost;
        }
        self.enough_in_sync()
    }

    /// Reconciles one range (at most one VERSIONS request long). Replicas that fail
    /// are marked stale and left out; the range fails only when fewer than a
    /// majority remain.
    async fn reconcile_region(
        &self,
        offset: u64,
        len: u64,
        sources: u32,
    ) -> Result<RegionOutcome, EngineError> {
        let first_block = offset / BLOCK_SIZE;
        // Blocks a source claimed intact but whose data failed its checksum when
        // fetched: planned again as corrupt there, so another copy wins.
        let mut found_corrupt: Vec<(usize, u64)> = Vec::new();
        let mut moved = 0;
        while moved < REGION_ATTEMPTS {
            self.enough_in_sync()?;
            let versions = futures_util::future::join_all((0..self.replicas.len()).map(|r| {
                self.ask(r, "reading block versions", move |c| async move {
                    c.versions(offset, len, false).await
                })
            }))
            .await;
            let mut versions: Vec<Option<Vec<BlockVersion>>> = versions
                .into_iter()
                .map(|v| v.map(|v| v.versions().to_vec()))
                .collect();
            for &(r, b) in &found_corrupt {
                if let Some(v) = versions[r]
                    .as_mut()
                    .and_then(|v| v.get_mut((b - first_block) as usize))
                {
                    *v = BlockVersion::Corrupt { seq: v.seq() };
                }
            }
            let live_sources = sources & self.in_sync_mask();
            if live_sources == 0 {
                return Err(
                    self.not_in_sync("every in-sync replica failed during reconcile".into())
                );
            }
            let plan = plan_region(first_block, &versions, live_sources);
            let mut outcome = RegionOutcome {
                blocks_lost: plan.lost.len() as u64,
                ..RegionOutcome::default()
            };
            for b in &plan.lost {
                tracing::error!(volume = %self.volume_id, block = b, "no intact copy of the block on any in-sync replica; left as it is");
            }
            let mut replan = false;
            for run in runs(&plan.fixes) {
                match self.apply_run(&run).await {
                    RunResult::Done(bytes) => {
                        outcome.blocks_fixed += run.blocks;
                        outcome.bytes_copied += bytes;
                    }
                    RunResult::SourceChanged { corrupt } if corrupt.is_empty() => {
                        moved += 1;
                        replan = true;
                        break;
                    }
                    RunResult::SourceChanged { corrupt } => {
                        for b in corrupt {
                            tracing::warn!(volume = %self.volume_id, node = %self.replicas[run.source].node(), block = b,
                                "block failed its checksum while reconciling; taking another copy");
                            found_corrupt.push((run.source, b));
                        }
                        replan = true;
                        break;
                    }
                }
            }
            if !replan {
                return Ok(outcome);
            }
        }
        Err(self.not_in_sync(format!(
            "blocks at {offset}+{len} kept changing while reconciling"
        )))
    }

    /// Copies one run to its targets. Targets that fail are marked stale.
    async fn apply_run(&self, run: &Run) -> RunResult {
        let (offset, len) = (run.offset(), run.len());
        let data = match run.version {
            BlockVersion::Data { seq } => {
                let fetched = self
                    .ask(run.source, "reading a block to copy", |c| async move {
                        c.versions(offset, len, true).await
                    })
                    .await;
                let Some(fetched) = fetched else {
                    return RunResult::SourceChanged {
                        corrupt: Vec::new(),
                    };
                };
                let corrupt: Vec<u64> = fetched
                    .iter()
                    .filter(|(_, v, _)| *v == BlockVersion::Corrupt { seq })
                    .map(|(b, _, _)| b)
                    .collect();
                if !corrupt.is_empty() {
                    return RunResult::SourceChanged { corrupt };
                }
                if fetched
                    .versions()
                    .iter()
                    .any(|v| *v != BlockVersion::Data { seq })
                {
                    return RunResult::SourceChanged {
                        corrupt: Vec::new(),
                    };
                }
                let (_, _, data) = fetched.into_parts();
                Some(bytes::Bytes::from(data))
            }
            _ => None,
        };
        let seq = run.version.seq();
        let sends = bits(run.targets).map(|t| {
            let data = data.clone();
            async move { self.put(t, offset, len, seq, data).await.is_some() }
        });
        let copied = futures_util::future::join_all(sends)
            .await
            .into_iter()
            .filter(|ok| *ok)
            .count() as u64;
        RunResult::Done(if data.is_some() { copied * len } else { 0 })
    }

    /// Writes `data` at `offset` with `seq` on replica `t`, unconditionally, or
    /// without data trims `len` bytes there; a failure marks `t` stale.
    pub(super) async fn put(
        &self,
        t: usize,
        offset: u64,
        len: u64,
        seq: u64,
        data: Option<bytes::Bytes>,
    ) -> Option<()> {
        match data {
            Some(d) => {
                self.ask(t, "copying blocks", |c| async move {
                    c.write(offset, d, seq).await
                })
                .await
            }
            None => {
                self.ask(t, "copying a trim", |c| async move {
                    c.trim(offset, len, seq).await
                })
                .await
            }
        }
    }

    /// Flushes every replica in sync; one that fails is marked stale.
    async fn flush_all(&self, what: &str) -> bool {
        let flushes = bits(self.in_sync_mask()).map(|r| async move {
            self.ask(r, what, |c| async move { c.flush().await })
                .await
                .is_some()
        });
        futures_util::future::join_all(flushes)
            .await
            .into_iter()
            .all(|ok| ok)
    }

    /// Declares the replicas now in sync, under this engine's epoch, on every one of
    /// them; a majority of the set must store it. Declarations are numbered and
    /// serialised, so a later one always replaces an earlier one.
    pub(super) async fn declare_in_sync(&self) -> Result<(), EngineError> {
        let mut last = self.declared.lock().await;
        let mask = self.in_sync_mask();
        let mut members: Vec<String> = bits(mask)
            .map(|r| self.replicas[r].id().node_id.clone())
            .collect();
        members.sort();
        if last.epoch == self.epoch.get() && last.members == members {
            return Ok(());
        }
        let next = Membership {
            epoch: self.epoch.get(),
            version: if last.epoch == self.epoch.get() {
                last.version + 1
            } else {
                1
            },
            members,
        };
        let stores = bits(mask).map(|r| {
            let next = &next;
            async move {
                self.ask(r, "storing the in-sync record", |c| async move {
                    c.set_membership(next).await
                })
                .await
                .is_some_and(|stored| stored == *next)
            }
        });
        let stored = futures_util::future::join_all(stores)
            .await
            .into_iter()
            .filter(|ok| *ok)
            .count();
        if stored < self.quorum {
            self.check_usable()?;
            return Err(self.not_in_sync(format!(
                "the in-sync record reached {stored} replicas, {} needed",
                self.quorum
            )));
        }
        tracing::info!(volume = %self.volume_id, epoch = next.epoch, version = next.version,
            members = ?next.members, "declared replicas in sync");
        *last = next;
        Ok(())
    }

    /// Clears the dirty regions every replica holds durably (module doc). Does
    /// nothing unless every replica of the set is in sync; any failure leaves the
    /// regions dirty (which only costs the next engine a longer reconcile).
    pub(super) async fn clean_round(&self, flush: bool) {
        let all = (1u32 << self.replicas.len()) - 1;
        if self.in_sync_mask() != all || self.check_usable().is_err() {
            return;
        }
        let tokens = futures_util::future::join_all(bits(all).map(|r| async move {
            self.ask(
                r,
                "starting a cleaning",
                |c| async move { c.mark_clean().await },
            )
            .await
        }))
        .await;
        let Some(tokens) = tokens.into_iter().collect::<Option<Vec<u64>>>() else {
            return;
        };
        // Every write a replica marked before its token was registered before it was
        // sent, so it is in this snapshot or already finished everywhere.
        for op in self.inflight.snapshot() {
            for r in bits(all) {
                if tokio::time::timeout(self.timeout, op.wait_done_on(r))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        if flush && !self.flush_all("flushing before cleaning").await || self.in_sync_mask() != all
        {
            return;
        }
        let cleans = bits(all).zip(tokens).map(|(r, token)| async move {
            self.ask(r, "cleaning dirty regions", |c| async move {
                c.clean(token).await
            })
            .await
        });
        futures_util::future::join_all(cleans).await;
    }
}

/// Starts an engine's background work, both ending with the engine: the declarer
/// (a replica went stale: declare the rest in sync) and the cleaner (every
/// `clean_interval` in which writes were issued, one [`Inner::clean_round`]).
pub(super) fn spawn_background(inner: &Arc<Inner>) {
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let changed = Arc::clone(&inner.sync_changed);
    tokio::spawn(async move {
        loop {
            changed.notified().await;
            let Some(inner) = weak.upgrade() else { return };
            if inner.closed.load(Ordering::SeqCst) || inner.fenced.load(Ordering::SeqCst) {
                return;
            }
            if let Err(e) = inner.declare_in_sync().await {
                tracing::warn!(volume = %inner.volume_id, error = %error_chain(&e),
                    "could not declare the replicas still in sync; the next engine reconciles from the dirty regions");
            }
        }
    });
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let interval = inner.clean_interval;
    super::resync::spawn_reconnector(inner);
    super::replica_set::spawn_poller(inner);
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::time::sleep(interval).await;
            let Some(inner) = weak.upgrade() else { return };
            if inner.closed.load(Ordering::SeqCst) || inner.fenced.load(Ordering::SeqCst) {
                return;
            }
            let issued = inner.counter.load(Ordering::Relaxed);
            if issued != seen {
                seen = issued;
                inner.clean_round(true).await;
            }
        }
    });
}

/// The byte ranges of `dirty`'s regions inside a volume of `size` bytes, cut into
/// requests the protocol allows (a replica's region may be larger than one VERSIONS
/// request).
pub(super) fn dirty_ranges(dirty: &DirtyMap, size: u64) -> Vec<(u64, u64)> {
    let region = dirty.region_size.clamp(
        BLOCK_SIZE,
        tessera_replica_protocol::data::message::MAX_VERSIONS_LEN,
    );
    dirty
        .dirty()
        .filter_map(|r| {
            let start = r.checked_mul(dirty.region_size)?;
            (start < size).then(|| (start, (start + dirty.region_size).min(size)))
        })
        .flat_map(|(start, end)| {
            (start..end)
                .step_by(region as usize)
                .map(move |s| (s, (s + region).min(end) - s))
        })
        .collect()
}

/// The whole volume of `size` bytes, cut into requests the protocol allows: what a
/// full comparison covers.
pub(super) fn volume_ranges(size: u64) -> Vec<(u64, u64)> {
    let step = tessera_replica_protocol::data::message::MAX_VERSIONS_LEN;
    (0..size)
        .step_by(step as usize)
        .map(|s| (s, (s + step).min(size) - s))
        .collect()
}

#[derive(Debug, Default)]
struct RegionOutcome {
    blocks_fixed: u64,
    bytes_copied: u64,
    blocks_lost: u64,
}

enum RunResult {
    /// Copied; bytes of data sent.
    Done(u64),
    /// The source no longer holds the planned version, failed, or (`corrupt`) its
    /// data of these blocks failed the checksum: plan the region again.
    SourceChanged {
        /// Blocks whose claimed version turned out corrupt on the source.
        corrupt: Vec<u64>,
    },
}
