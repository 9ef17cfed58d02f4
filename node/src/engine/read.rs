//! The read path: one replica in sync picked (the local one first), another tried
//! on failure, and a block that is corrupt on one replica repaired from a good copy.

use super::*;

/// How many more unanswered requests than the least loaded replica the local replica
/// may have and still serve a read (it saves a network round trip, not a queue).
const LOCAL_READ_SLACK: usize = 8;

impl Inner {
    /// Chooses among `eligible` replicas: the least loaded one (reads and writes it
    /// has not answered; ties broken round-robin), or the local one if it is eligible
    /// and not more than [`LOCAL_READ_SLACK`] requests busier than that.
    fn pick(&self, eligible: u32) -> usize {
        let load = |i: usize| {
            let rep = &self.replicas[i];
            rep.reads_in_flight.load(Ordering::Relaxed)
                + rep.writes_in_flight.load(Ordering::Relaxed)
        };
        let n = self.replicas.len();
        let start = self.round_robin.fetch_add(1, Ordering::Relaxed);
        let mut best = None;
        for k in 0..n {
            let i = (start + k) % n;
            if eligible & (1 << i) == 0 {
                continue;
            }
            let l = load(i);
            if best.is_none_or(|(_, b)| l < b) {
                best = Some((i, l));
            }
        }
        // `eligible` is nonzero whenever this is called.
        let (best, least) = best.unwrap_or((0, 0));
        match self.local().filter(|l| eligible & (1 << l) != 0) {
            Some(l) if load(l) <= least + LOCAL_READ_SLACK => l,
            _ => best,
        }
    }

    /// Reads the range from some in-sync replica not in `exclude` that has no
    /// unfinished overlapping write. Returns the data and the replicas that reported
    /// a corrupt block on the way (replica, block index).
    pub(super) async fn read_any(
        &self,
        offset: u64,
        len: u32,
        exclude: u32,
    ) -> Result<(Vec<u8>, Vec<(usize, u64)>), EngineError> {
        let op = IoOp::Read;
        let span = u64::from(len);
        let wait_deadline = Instant::now() + self.timeout;
        let mut tried = exclude;
        let mut corrupt = Vec::new();
        let mut failures = String::new();
        loop {
            self.check_usable()?;
            let in_sync = self.in_sync_mask();
            if (in_sync.count_ones() as usize) < self.quorum {
                let _ = write!(failures, "{}{}", sep(&failures), self.stale_summary());
                return Err(self.no_quorum(op, offset, span, 0, failures, false));
            }
            let candidates = in_sync & !tried;
            let (busy, blocker) = self.inflight.busy_replicas(offset, span, candidates);
            let eligible = candidates & !busy;
            if eligible == 0 {
                if let (Some(blocker), true) = (blocker, candidates != 0) {
                    // Every untried replica is still working on an overlapping write;
                    // wait until one of them finishes this one (bounded), then look
                    // again (it may have finished already: then at once).
                    let before = blocker.pending() & candidates;
                    let waited = tokio::time::timeout_at(
                        wait_deadline,
                        blocker.wait_until(|o| o.pending() & candidates != before || before == 0),
                    )
                    .await;
                    if waited.is_ok() {
                        continue;
                    }
                    let _ = write!(
                        failures,
                        "{}overlapping writes did not finish within {:?}",
                        sep(&failures),
                        self.timeout
                    );
                }
                if let Some(&(_, block)) = corrupt.first() {
                    tracing::error!(volume = %self.volume_id, block, offset, len, "no intact copy of the block on any replica tried");
                    return Err(EngineError::AllCopiesCorrupt {
                        volume_id: self.volume_id.clone(),
                        offset,
                        len: span,
                        block,
                        failures,
                    });
                }
                return Err(self.no_quorum(op, offset, span, 0, failures, false));
            }
            let r = self.pick(eligible);
            tried |= 1 << r;
            let rep = &self.replicas[r];
            let Some(client) = rep.client() else {
                continue;
            };
            let reading = InFlight::count(&rep.reads_in_flight);
            let result = tokio::time::timeout(self.timeout, client.read(offset, len)).await;
            drop(reading);
            let node = rep.node();
            match result {
                Ok(Ok(data)) => return Ok((data, corrupt)),
                Ok(Err(e)) if e.code() == Some(ErrorCode::StaleEpoch) => {
                    return Err(self.fence(r, &e));
                }
                Ok(Err(ClientError::Remote(e))) if e.code == ErrorCode::CorruptBlock => {
                    let _ = write!(
                        failures,
                        "{}{node}: corrupt block {}",
                        sep(&failures),
                        e.detail
                    );
                    corrupt.push((r, e.detail));
                }
                Ok(Err(e)) => {
                    let reason = error_chain(&e);
                    let _ = write!(failures, "{}{node}: {reason}", sep(&failures));
                    self.mark_stale(r, reason);
                }
                Err(_) => {
                    let reason = format!("no reply within {:?}", self.timeout);
                    let _ = write!(failures, "{}{node}: {reason}", sep(&failures));
                    self.mark_stale(r, reason);
                }
            }
        }
    }

    /// Rewrites `len` bytes at `start` on replica `r`, whose copy failed its checksum,
    /// from a good copy. Runs in the background after the read was answered.
    pub(super) async fn repair(self: Arc<Self>, r: usize, start: u64, len: u64) {
        match self.try_repair(r, start, len).await {
            Ok(()) => {
                Counters::add(&self.counters.repairs, 1);
                tracing::info!(volume = %self.volume_id, node = %self.replicas[r].node(), offset = start, len, "repaired corrupt copy from another replica");
            }
            Err(reason) => {
                Counters::add(&self.counters.repair_failures, 1);
                tracing::warn!(volume = %self.volume_id, node = %self.replicas[r].node(), offset = start, len, %reason, "could not repair corrupt copy");
            }
        }
    }

    async fn try_repair(&self, r: usize, start: u64, len: u64) -> Result<(), String> {
        let deadline = Instant::now() + self.timeout;
        let span = u32::try_from(len).map_err(|_| "range too long".to_owned())?;
        // Hold off while any write overlaps: the good copy read now could be older
        // than that write, and the repair must never land after a newer write.
        let entry = loop {
            if self.replicas[r].is_stale() || self.fenced.load(Ordering::SeqCst) {
                return Err("replica became stale or engine fenced".into());
            }
            match self.inflight.register_exclusive(start, len, 1 << r) {
                Ok(entry) => break entry,
                Err(blocker) => tokio::time::timeout_at(deadline, blocker.wait_done())
                    .await
                    .map_err(|_| "overlapping writes kept the range busy".to_owned())?,
            }
        };
        // From here on, new overlapping writes reach replica r only after the repair
        // finished there; they may reach the others, so the copy read below is either
        // older than such a write (which then overwrites the repair) or includes it.
        let result = async {
            let (data, _) = self
                .read_any(start, span, 1 << r)
                .await
                .map_err(|e| format!("no good copy: {}", error_chain(&e)))?;
            let client = self.replicas[r]
                .client()
                .ok_or_else(|| "engine closed".to_owned())?;
            let counter = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
            let seq = self
                .epoch
                .seq(counter)
                .map(Seq::get)
                .ok_or_else(|| "sequence counter exhausted".to_owned())?;
            match tokio::time::timeout(self.timeout, client.write(start, data, seq)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) if e.code() == Some(ErrorCode::StaleEpoch) => {
                    Err(error_chain(&self.fence(r, &e)))
                }
                Ok(Err(e)) => {
                    let reason = format!("repair write failed: {}", error_chain(&e));
                    self.mark_stale(r, reason.clone());
                    Err(reason)
                }
                Err(_) => {
                    let reason = format!("repair write: no reply within {:?}", self.timeout);
                    self.mark_stale(r, reason.clone());
                    Err(reason)
                }
            }
        }
        .await;
        entry.finish(r, result.is_ok());
        self.inflight.remove(&entry);
        result
    }
}
