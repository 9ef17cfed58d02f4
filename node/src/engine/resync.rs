//! Bringing a replica that dropped back while the engine serves (DESIGN.md
//! "Recovery"): reconnect it, catch it up on what it missed, readmit it.
//!
//! * **Reconnect** ([`spawn_reconnector`]): a replica whose connection closed is
//!   marked stale within a second, requests or not; a replica marked stale is tried again
//!   after `reconnect_interval`, then with a doubling wait up to
//!   [`MAX_RECONNECT_INTERVAL`], for as long as the engine lives. A HELLO that
//!   answers `STALE_EPOCH` fences the engine; a replica smaller than the volume
//!   (it missed an expansion) or one that cannot take conditional writes stays out
//!   (the next engine reconciles it at open).
//! * **Claim**: the new connection claims the volume on the replica first (data-plane
//!   CLAIM, `connect_claimed`): what the abandoned connection still carried — a write
//!   a healed partition retransmits, requests queued in the replica — is applied
//!   before the catch-up reads anything, or refused after, never lands behind it.
//! * **Switch** ([`Inner::resync`]): the new connection is installed and the replica
//!   becomes *resyncing* under the in-flight table's lock, so every write registered
//!   afterwards is sent to it too (its acknowledgements do not count toward the
//!   quorum and it serves no reads), and every write registered before is waited for,
//!   so none can land on the others only after the catch-up read them.
//! * **Catch up** ([`Inner::catch_up`]): nothing is cleaned while a replica is out,
//!   so the in-sync replicas' dirty regions cover everything it missed; the
//!   replica's own map adds what only it may hold (a write that never reached a
//!   majority). Per block, the highest intact seq among the in-sync replicas wins.
//! * **Full comparison** ([`Inner::resync_scope`]): that bound holds only for a
//!   replica that was a member and has missed writes since. A replica that was
//!   never declared in sync — a rebuilt copy that took over a lost member's slot
//!   (`replica_set` module), one whose in-sync file was lost, one the controller
//!   put in another's place — may lack writes that an engine whose set did not
//!   include it has since cleaned from every map. So a slot taken over by a new
//!   member, or a replica whose own in-sync record (GET_MEMBERSHIP on it) does not
//!   name it while the engine's declarations exist, is caught up over the whole
//!   volume: every range's versions are compared and only what differs is copied,
//!   by the same conditional writes and leftover rule, never blindly. The engine's
//!   status reports the progress (bytes compared of bytes planned) of either kind.
//!   Where the returning replica holds an older version, the winner is copied with a
//!   *conditional* write or trim (applied only where the replica still holds an older
//!   seq), so a live write that reached it first is never overwritten; the copies run
//!   at the replica's background I/O class. Where it holds a newer version than every
//!   in-sync copy (a leftover of a write that was never acknowledged), the range is
//!   registered exclusively in the in-flight table, looked at again, and overwritten
//!   only if the leftover is still there.
//! * **One in-sync source is enough.** An in-sync replica holds every acknowledged
//!   write (a write it failed made it stale; writes registered before the switch are
//!   waited for), so a catch-up needs one, not a majority. This is what brings an
//!   engine back from below quorum: two of three replicas restarted close together
//!   (a rolling update faster than the engine noticed the first) are caught up from
//!   the third one after the other, and I/O resumes with the first readmitted.
//! * **Readmit**: the replica is flushed, becomes in sync and the in-sync set is
//!   declared again (which also lets the dirty regions be cleaned once every replica
//!   is back).
//!
//! A catch-up that fails marks the replica stale again and is retried from the
//! start; blocks already copied compare equal then, so a retry moves only what is
//! still missing. An engine that crashes mid-resync leaves the replica out of the
//! in-sync record: the next engine copies to it at open (over the whole volume if
//! it was never declared in sync, `sync` module).

use std::time::Duration;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use tessera_replica_protocol::block::BlockVersion;
use tessera_replica_protocol::sync::DirtyMap;

use super::config::MAX_RECONNECT_INTERVAL;
use super::connect_claimed;
use super::reconcile::{plan_region, runs, Run};
use super::sync::{dirty_ranges, volume_ranges};
use super::*;

/// Ranges caught up at once: few, so a resync leaves the disks to the application.
const RANGES_IN_FLIGHT: usize = 2;
/// Times a range is planned again when a source's copy turned out corrupt.
const RANGE_ATTEMPTS: usize = 3;

/// What one online resync did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResyncReport {
    /// Whether the whole volume was compared (the replica was never declared in
    /// sync), not only the dirty regions.
    pub full: bool,
    /// Ranges (at most one VERSIONS request each) compared.
    pub ranges: u64,
    /// Bytes of the volume those ranges cover.
    pub compared_bytes: u64,
    /// Blocks copied to the returning replica.
    pub blocks_copied: u64,
    /// Bytes of data sent to it.
    pub bytes_copied: u64,
    /// Blocks where it held a version no in-sync replica had, overwritten.
    pub leftovers_overwritten: u64,
    /// Blocks no in-sync replica held intact (left as they are).
    pub blocks_lost: u64,
}

impl ResyncReport {
    fn add(mut self, o: ResyncReport) -> ResyncReport {
        self.ranges += o.ranges;
        self.compared_bytes += o.compared_bytes;
        self.blocks_copied += o.blocks_copied;
        self.bytes_copied += o.bytes_copied;
        self.leftovers_overwritten += o.leftovers_overwritten;
        self.blocks_lost += o.blocks_lost;
        self
    }
}

/// Starts the engine's reconnector (module doc); it ends with the engine.
pub(super) fn spawn_reconnector(inner: &Arc<Inner>) {
    let weak = Arc::downgrade(inner);
    let first = inner.reconnect_interval;
    let n = inner.replicas.len();
    tokio::spawn(async move {
        let mut wait = vec![first; n];
        let mut next_try: Vec<Option<Instant>> = vec![None; n];
        let mut generation = vec![0; n];
        loop {
            tokio::time::sleep(first.min(Duration::from_secs(1))).await;
            let Some(inner) = weak.upgrade() else { return };
            if inner.check_usable().is_err() {
                return;
            }
            for r in 0..n {
                // A slot given to a new member starts its backoff afresh: the
                // failures so far were the former member's.
                let current = inner.replicas[r].id().generation;
                if current != generation[r] {
                    generation[r] = current;
                    (wait[r], next_try[r]) = (first, None);
                }
                // A connection the replica closed (its daemon restarted) makes it
                // stale now, not at the next request: an idle volume must not count a
                // replica that is gone while another one restarts.
                let closed = lock(&inner.replicas[r].client)
                    .as_ref()
                    .is_some_and(|c| c.is_closed());
                if closed && inner.replicas[r].state.load(Ordering::SeqCst) == IN_SYNC {
                    inner.mark_stale(r, "its connection closed".into());
                }
                if inner.replicas[r].state.load(Ordering::SeqCst) != STALE {
                    (wait[r], next_try[r]) = (first, None);
                    continue;
                }
                let now = Instant::now();
                let due = *next_try[r].get_or_insert(now + wait[r]);
                if now < due {
                    continue;
                }
                if let Err(reason) = inner.resync(r).await {
                    tracing::debug!(volume = %inner.volume_id, node = %inner.replicas[r].node(),
                        %reason, retry_in_ms = wait[r].as_millis() as u64, "replica not brought back yet");
                    wait[r] = (wait[r] * 2).min(MAX_RECONNECT_INTERVAL);
                    next_try[r] = Some(Instant::now() + wait[r]);
                }
            }
        }
    });
}

impl Inner {
    /// Reconnects stale replica `r`, catches it up and readmits it (module doc).
    pub(super) async fn resync(&self, r: usize) -> Result<ResyncReport, String> {
        let rep = &self.replicas[r];
        let id = rep.id();
        let config = self.client_config();
        let client = match connect_claimed(
            id.address.as_str(),
            &self.volume_id,
            self.epoch.get(),
            config,
        )
        .await
        {
            Ok(c) => c,
            Err(e) if e.code() == Some(ErrorCode::StaleEpoch) => {
                return Err(error_chain(&self.fence(r, &e)));
            }
            Err(e) => return Err(format!("connecting failed: {}", error_chain(&e))),
        };
        // Without CLAIM, writes the old connection still carried could land after
        // the catch-up compared their blocks.
        if !client.supports_if_newer() || !client.supports_claim() {
            return Err(format!(
                "replica speaks data-plane protocol {}, which cannot be resynced online; it is reconciled at the next open",
                client.info().protocol_version
            ));
        }
        let size = self.size.load(Ordering::Acquire);
        if client.info().size < size {
            return Err(format!(
                "holds {} bytes, the volume {size}: it missed an expansion",
                client.info().size
            ));
        }
        self.check_usable().map_err(|e| error_chain(&e))?;
        let started = Instant::now();
        let earlier = {
            // Under the identity's lock: a replica-set change either happened before
            // (the connection is to the former member: dropped) or comes after and
            // marks the slot stale again, which ends this resync.
            let current = lock(&rep.identity);
            if current.generation != id.generation {
                return Err(format!("the slot went to {} meanwhile", current.node_id));
            }
            *lock(&rep.client) = Some(client);
            *lock(&rep.resyncing_since) = Some(SystemTime::now());
            rep.resync_done.store(0, Ordering::Relaxed);
            rep.resync_total.store(0, Ordering::Relaxed);
            self.inflight
                .snapshot_after(|| rep.state.store(RESYNCING, Ordering::SeqCst))
        };
        tracing::info!(volume = %self.volume_id, node = %id.node_id, address = %id.address,
            "replica reconnected; resyncing");
        for op in earlier {
            op.wait_done().await;
        }
        let outcome = match self.resync_scope(r, &id).await {
            Ok(full) => {
                if full {
                    // Kept until a full comparison succeeds; the status shows it.
                    rep.flag_full_compare();
                }
                self.catch_up(r, full).await
            }
            Err(reason) => Err(reason),
        };
        let outcome = match outcome {
            Ok(report) => self
                .ask(r, "flushing after the resync", |c| async move {
                    c.flush().await
                })
                .await
                .map(|()| report)
                .ok_or_else(|| "flushing after the resync failed".to_owned()),
            Err(reason) => Err(reason),
        };
        let report = match outcome {
            Ok(report) => report,
            Err(reason) => {
                self.mark_stale(r, format!("resync failed: {reason}"));
                return Err(reason);
            }
        };
        if rep
            .state
            .compare_exchange(RESYNCING, IN_SYNC, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err("went stale again while resyncing".to_owned());
        }
        Counters::add(&self.counters.resyncs, 1);
        if report.full {
            Counters::add(&self.counters.full_resyncs, 1);
            let mut current = lock(&rep.identity);
            if current.generation == id.generation && current.full_compare {
                *current = Arc::new(Identity {
                    full_compare: false,
                    ..(**current).clone()
                });
            }
        }
        self.sync_changed.notify_one();
        tracing::info!(volume = %self.volume_id, node = %id.node_id, full = report.full,
            ranges = report.ranges, compared_bytes = report.compared_bytes,
            blocks_copied = report.blocks_copied, bytes_copied = report.bytes_copied,
            leftovers_overwritten = report.leftovers_overwritten, blocks_lost = report.blocks_lost,
            elapsed_ms = started.elapsed().as_millis() as u64, "replica resynced and back in sync");
        Ok(report)
    }

    /// Whether resyncing replica `r` (standing for `id`) must be compared over the
    /// whole volume (module doc): it took its slot over from another member, or its
    /// own in-sync record does not name it while the engine's declarations exist.
    async fn resync_scope(&self, r: usize, id: &Identity) -> Result<bool, String> {
        if id.full_compare {
            return Ok(true);
        }
        let own = self
            .ask(r, "reading its in-sync record", |c| async move {
                c.membership().await
            })
            .await
            .ok_or_else(|| "reading its in-sync record failed".to_owned())?;
        let declared = !self.declared.lock().await.is_undeclared();
        let named = own.members.contains(&id.node_id);
        if declared && !named {
            tracing::info!(volume = %self.volume_id, node = %id.node_id, epoch = own.epoch,
                version = own.version, members = ?own.members,
                "replica's own in-sync record does not name it: comparing the whole volume");
        }
        Ok(declared && !named)
    }

    /// Copies to resyncing replica `r` every block it lacks: in the dirty regions,
    /// or with `full` over the whole volume (module doc).
    async fn catch_up(&self, r: usize, full: bool) -> Result<ResyncReport, String> {
        let sources = self.in_sync_mask();
        if sources == 0 {
            return Err(self.stale_summary());
        }
        let size = self.size.load(Ordering::Acquire);
        let ranges = if full {
            volume_ranges(size)
        } else {
            match self.dirty_union(r, sources).await? {
                Some(dirty) => dirty_ranges(&dirty, size),
                None => return Ok(ResyncReport::default()),
            }
        };
        let rep = &self.replicas[r];
        rep.resync_total
            .store(ranges.iter().map(|(_, len)| len).sum(), Ordering::Relaxed);
        let report = stream::iter(ranges)
            .map(|(offset, len)| async move {
                let report = self.catch_up_range(r, offset, len).await?;
                rep.resync_done.fetch_add(len, Ordering::Relaxed);
                Counters::add(&self.counters.resync_compared_bytes, len);
                Ok::<_, String>(ResyncReport {
                    compared_bytes: len,
                    ..report
                })
            })
            .buffer_unordered(RANGES_IN_FLIGHT)
            .try_fold(ResyncReport::default(), |all, one| async move {
                Ok(all.add(one))
            })
            .await?;
        Ok(ResyncReport { full, ..report })
    }

    /// The union of the dirty maps of the in-sync `sources` and of `r` itself
    /// (`None` if none could be read but `r`'s).
    async fn dirty_union(&self, r: usize, sources: u32) -> Result<Option<DirtyMap>, String> {
        let maps = futures_util::future::join_all(bits(sources | 1 << r).map(|i| async move {
            let map = self
                .ask(i, "reading the dirty regions", |c| async move {
                    c.dirty_regions().await
                })
                .await;
            (i, map)
        }))
        .await;
        let mut dirty: Option<DirtyMap> = None;
        for (i, map) in maps {
            match (map, i == r) {
                (Some(map), _) => match &mut dirty {
                    Some(all) => all.union(&map),
                    None => dirty = Some(map),
                },
                // A source that failed is stale now; the others' maps still cover
                // what `r` missed (every write reached a majority of them).
                (None, false) => {}
                (None, true) => return Err("reading its dirty regions failed".into()),
            }
        }
        Ok(dirty)
    }

    /// One range of [`Self::catch_up`] (at most one VERSIONS request long).
    async fn catch_up_range(
        &self,
        r: usize,
        offset: u64,
        len: u64,
    ) -> Result<ResyncReport, String> {
        let first_block = offset / BLOCK_SIZE;
        let mut found_corrupt: Vec<(usize, u64)> = Vec::new();
        for _ in 0..RANGE_ATTEMPTS {
            self.check_usable().map_err(|e| error_chain(&e))?;
            let sources = self.in_sync_mask();
            if sources == 0 {
                return Err(self.stale_summary());
            }
            let mut versions = self.versions_of(sources | 1 << r, offset, len).await;
            if versions[r].is_none() {
                return Err("reading its block versions failed".into());
            }
            for &(i, b) in &found_corrupt {
                if let Some(v) = versions[i]
                    .as_mut()
                    .and_then(|v| v.get_mut((b - first_block) as usize))
                {
                    *v = BlockVersion::Corrupt { seq: v.seq() };
                }
            }
            let plan = plan_region(first_block, &versions, sources);
            let mut report = ResyncReport {
                ranges: 1,
                blocks_lost: plan.lost.len() as u64,
                ..ResyncReport::default()
            };
            let held = |b: u64| versions[r].as_ref().map(|v| v[(b - first_block) as usize]);
            // Only `r` is caught up: the sources may differ among themselves only by
            // writes still in flight, which reach every replica on their own.
            let (mut older, mut newer) = (Vec::new(), Vec::new());
            for mut fix in plan.fixes.into_iter().filter(|f| f.targets & 1 << r != 0) {
                fix.targets = 1 << r;
                match held(fix.block) {
                    Some(v @ (BlockVersion::Data { .. } | BlockVersion::Trimmed { .. }))
                        if v.seq() > fix.version.seq() =>
                    {
                        newer.push(fix)
                    }
                    _ => older.push(fix),
                }
            }
            let mut retry = false;
            for run in runs(&older) {
                match self.copy_if_newer(r, &run).await? {
                    Copied::Done { blocks, bytes } => {
                        report.blocks_copied += blocks;
                        report.bytes_copied += bytes;
                    }
                    Copied::SourceCorrupt(blocks) => {
                        found_corrupt.extend(blocks.into_iter().map(|b| (run.source, b)));
                        retry = true;
                    }
                }
            }
            for fix in &newer {
                report.leftovers_overwritten += self.overwrite_leftover(r, fix.block).await?;
            }
            if !retry {
                Counters::add(&self.counters.resync_bytes, report.bytes_copied);
                return Ok(report);
            }
        }
        Err(format!(
            "blocks at {offset}+{len} kept failing their checksum on the in-sync replicas"
        ))
    }

    /// Block versions of the range on every replica of `mask` (`None` elsewhere and
    /// for replicas that failed, which are marked stale).
    async fn versions_of(
        &self,
        mask: u32,
        offset: u64,
        len: u64,
    ) -> Vec<Option<Vec<BlockVersion>>> {
        futures_util::future::join_all((0..self.replicas.len()).map(|i| async move {
            if mask & 1 << i == 0 {
                return None;
            }
            self.ask(i, "reading block versions", move |c| async move {
                c.versions(offset, len, false).await
            })
            .await
            .map(|v| v.versions().to_vec())
        }))
        .await
    }

    /// Copies one run to `r` with conditional writes (or a conditional trim). Blocks
    /// the source no longer holds at the planned version got a newer write meanwhile,
    /// which reaches `r` on its own: they are skipped.
    async fn copy_if_newer(&self, r: usize, run: &Run) -> Result<Copied, String> {
        let (offset, len, seq) = (run.offset(), run.len(), run.version.seq());
        let BlockVersion::Data { .. } = run.version else {
            let applied = self
                .ask(r, "copying a trim", |c| async move {
                    c.trim_if_newer(offset, len, seq).await
                })
                .await
                .ok_or_else(|| "copying a trim failed".to_owned())?;
            return Ok(Copied::Done {
                blocks: applied,
                bytes: 0,
            });
        };
        let fetched = self
            .ask(run.source, "reading blocks to copy", |c| async move {
                c.versions(offset, len, true).await
            })
            .await
            .ok_or_else(|| "reading blocks to copy failed".to_owned())?;
        let corrupt: Vec<u64> = fetched
            .iter()
            .filter(|(_, v, _)| *v == BlockVersion::Corrupt { seq })
            .map(|(b, _, _)| b)
            .collect();
        if !corrupt.is_empty() {
            return Ok(Copied::SourceCorrupt(corrupt));
        }
        // Segments of consecutive blocks still at the planned version, with data.
        let mut segments: Vec<(u64, Vec<u8>)> = Vec::new();
        for (b, v, data) in fetched.iter() {
            let (BlockVersion::Data { seq: s }, Some(d)) = (v, data) else {
                continue;
            };
            if s != seq {
                continue;
            }
            match segments.last_mut() {
                Some((start, buf)) if *start + buf.len() as u64 / BLOCK_SIZE == b => {
                    buf.extend_from_slice(d)
                }
                _ => segments.push((b, d.to_vec())),
            }
        }
        let (mut blocks, mut bytes) = (0, 0);
        for (start, data) in segments {
            bytes += data.len() as u64;
            blocks += self
                .ask(r, "copying blocks", |c| async move {
                    c.write_if_newer(start * BLOCK_SIZE, data, seq).await
                })
                .await
                .ok_or_else(|| "copying blocks failed".to_owned())?;
        }
        Ok(Copied::Done { blocks, bytes })
    }

    /// Overwrites block `block` on `r`, where `r` held a version newer than every
    /// in-sync copy, once nothing overlapping is in flight and if that is still so.
    /// Returns the blocks overwritten (0 or 1).
    async fn overwrite_leftover(&self, r: usize, block: u64) -> Result<u64, String> {
        let (offset, len) = (block * BLOCK_SIZE, BLOCK_SIZE);
        let deadline = Instant::now() + self.timeout * 4;
        let entry = loop {
            match self.inflight.register_exclusive(offset, len, 1 << r) {
                Ok(entry) => break entry,
                Err(blocker) => {
                    if tokio::time::timeout_at(deadline, blocker.wait_done())
                        .await
                        .is_err()
                    {
                        return Err(format!("block {block} stayed busy"));
                    }
                }
            }
        };
        let result = async {
            let sources = self.in_sync_mask();
            let versions = self.versions_of(sources | 1 << r, offset, len).await;
            let plan = plan_region(block, &versions, sources);
            let Some(fix) = plan.fixes.iter().find(|f| f.targets & 1 << r != 0) else {
                return Ok(0);
            };
            let seq = fix.version.seq();
            let data = match fix.version {
                BlockVersion::Data { .. } => {
                    let fetched = self
                        .ask(fix.source, "reading a block to copy", |c| async move {
                            c.versions(offset, len, true).await
                        })
                        .await
                        .ok_or_else(|| "reading a block to copy failed".to_owned())?;
                    if fetched.versions() != [fix.version] {
                        // The source changed under us: leave it to the next attempt.
                        return Err(format!("block {block} changed while being resynced"));
                    }
                    Some(bytes::Bytes::from(fetched.into_parts().2))
                }
                _ => None,
            };
            let copied = self.put(r, offset, len, seq, data).await;
            copied
                .map(|()| 1)
                .ok_or_else(|| format!("overwriting block {block} failed"))
        }
        .await;
        entry.finish(r, result.is_ok());
        self.inflight.remove(&entry);
        result
    }
}

/// How [`Inner::copy_if_newer`] ended.
enum Copied {
    /// Blocks the replica applied, and bytes of data sent.
    Done { blocks: u64, bytes: u64 },
    /// The source's copy of these blocks failed its checksum.
    SourceCorrupt(Vec<u64>),
}
