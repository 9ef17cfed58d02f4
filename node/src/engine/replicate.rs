//! The write path: a write, trim or flush sent to every replica in sync, each
//! replica's outcome settled (acked, stale, fenced) and the operation decided by a
//! majority of the whole set.

use super::*;

/// How one replica's part of a write, trim or flush ended.
enum Outcome {
    Acked,
    /// The replica answered with an error or the connection failed.
    Failed(ClientError),
    /// No answer within the request timeout.
    TimedOut,
    /// The replica was already stale (or disconnected) when its turn came.
    Skipped,
}

/// What a replicated operation carries to each replica.
#[derive(Clone)]
pub(super) enum Payload {
    Data(WritePayload),
    Trim,
}

/// Collects per-replica outcomes of a replicated operation and decides it.
struct Tally {
    acked: usize,
    outstanding: usize,
    failures: String,
    no_space: bool,
    fenced: Option<EngineError>,
}

impl Tally {
    fn new(outstanding: usize, failures: String) -> Self {
        Tally {
            acked: 0,
            outstanding,
            failures,
            no_space: false,
            fenced: None,
        }
    }
}

impl Inner {
    /// Turns one replica's outcome into tally updates, marking it stale or fencing
    /// the engine as needed. Returns whether the replica acknowledged (and counts).
    fn settle(&self, r: usize, outcome: Outcome, tally: &mut Tally) -> bool {
        tally.outstanding -= 1;
        let node = self.replicas[r].node();
        let acked = match outcome {
            Outcome::Acked if !self.replicas[r].is_stale() => true,
            // A resyncing replica takes the write but does not count yet.
            Outcome::Acked if self.replicas[r].takes_writes() => false,
            Outcome::Acked | Outcome::Skipped => {
                let _ = write!(tally.failures, "{}{node}: stale", sep(&tally.failures));
                false
            }
            Outcome::Failed(e) if e.code() == Some(ErrorCode::StaleEpoch) => {
                tally.fenced = Some(self.fence(r, &e));
                false
            }
            Outcome::Failed(e) => {
                tally.no_space |= e.code() == Some(ErrorCode::NoSpace);
                let reason = error_chain(&e);
                let _ = write!(tally.failures, "{}{node}: {reason}", sep(&tally.failures));
                self.mark_stale(r, reason);
                false
            }
            Outcome::TimedOut => {
                let reason = format!("no reply within {:?}", self.timeout);
                let _ = write!(tally.failures, "{}{node}: {reason}", sep(&tally.failures));
                self.mark_stale(r, reason);
                false
            }
        };
        if acked {
            tally.acked += 1;
        }
        acked
    }

    /// Decides a replicated operation once the tally allows: `Some` when fenced, a
    /// majority acknowledged, or a majority can no longer be reached.
    fn decide(
        &self,
        op: IoOp,
        offset: u64,
        len: u64,
        tally: &mut Tally,
    ) -> Option<Result<(), EngineError>> {
        if let Some(e) = tally.fenced.take() {
            return Some(Err(e));
        }
        if tally.acked >= self.quorum {
            return Some(Ok(()));
        }
        if tally.acked + tally.outstanding < self.quorum {
            return Some(Err(self.no_quorum(
                op,
                offset,
                len,
                tally.acked,
                std::mem::take(&mut tally.failures),
                tally.no_space,
            )));
        }
        None
    }

    /// Runs one write or trim to completion on every target replica, answering the
    /// caller through `done` as soon as the outcome is decided.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn drive(
        self: Arc<Self>,
        entry: Arc<Op>,
        preds: Vec<Arc<Op>>,
        op: IoOp,
        offset: u64,
        len: u64,
        payload: Payload,
        seq: u64,
        done: impl FnOnce(Result<(), EngineError>) + Send + 'static,
    ) {
        let targets = entry.pending();
        let mut sends: FuturesUnordered<_> = bits(targets)
            .map(|r| {
                let this = &self;
                let preds = &preds;
                let payload = payload.clone();
                async move {
                    let outcome = this.send_one(r, preds, offset, len, payload, seq).await;
                    (r, outcome)
                }
            })
            .collect();
        let mut tally = Tally::new(targets.count_ones() as usize, String::new());
        let mut done = Some(done);
        // One timer bounds every replica's part (waiting for earlier overlapping
        // writes, then the request): the same bound as one timeout per replica, at a
        // third of the timer work on the hot path.
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        let mut unsettled = targets;
        loop {
            let (r, outcome) = tokio::select! {
                biased;
                next = sends.next() => match next {
                    Some(answer) => answer,
                    None => break,
                },
                () = &mut deadline => {
                    // Whoever has not answered timed out; their requests are dropped.
                    drop(sends);
                    for r in bits(unsettled) {
                        let acked = self.settle(r, Outcome::TimedOut, &mut tally);
                        entry.finish(r, acked);
                    }
                    if let Some(done) = done.take() {
                        if let Some(result) = self.decide(op, offset, len, &mut tally) {
                            done(result);
                        }
                    }
                    break;
                }
            };
            unsettled &= !(1 << r);
            let acked = self.settle(r, outcome, &mut tally);
            entry.finish(r, acked);
            if done.is_some() {
                if let Some(result) = self.decide(op, offset, len, &mut tally) {
                    if let Some(done) = done.take() {
                        done(result);
                    }
                }
            }
        }
        self.inflight.remove(&entry);
    }

    /// One replica's part of a write or trim: wait for earlier overlapping writes to
    /// finish on it, then send. The caller ([`Inner::drive`]) bounds it by the
    /// request timeout.
    async fn send_one(
        &self,
        r: usize,
        preds: &[Arc<Op>],
        offset: u64,
        len: u64,
        payload: Payload,
        seq: u64,
    ) -> Outcome {
        let rep = &self.replicas[r];
        // Counted until this future ends: answered, failed, or dropped at the timeout.
        let _pending = InFlight::count(&rep.writes_in_flight);
        let work = async {
            for p in preds {
                p.wait_done_on(r).await;
            }
            let Some(client) = rep.live_client() else {
                return Outcome::Skipped;
            };
            let sent = match payload {
                Payload::Data(data) => client.write_payload(offset, &data, seq).await,
                Payload::Trim => client.trim(offset, len, seq).await,
            };
            match sent {
                Ok(()) => Outcome::Acked,
                Err(e) => Outcome::Failed(e),
            }
        };
        work.await
    }

    pub(super) async fn flush(&self) -> Result<(), EngineError> {
        self.check_usable()?;
        let earlier = self.inflight.snapshot();
        let targets = self.in_sync_mask();
        if (targets.count_ones() as usize) < self.quorum {
            return Err(self.no_quorum(IoOp::Flush, 0, 0, 0, self.stale_summary(), false));
        }
        let mut flushes: FuturesUnordered<_> = bits(targets)
            .map(|r| {
                let earlier = &earlier;
                async move {
                    let rep = &self.replicas[r];
                    let work = async {
                        for op in earlier {
                            op.wait_done_on(r).await;
                        }
                        let Some(client) = rep.live_client() else {
                            return Outcome::Skipped;
                        };
                        match client.flush().await {
                            Ok(()) => Outcome::Acked,
                            Err(e) => Outcome::Failed(e),
                        }
                    };
                    let outcome = tokio::time::timeout(self.timeout, work)
                        .await
                        .unwrap_or(Outcome::TimedOut);
                    (r, outcome)
                }
            })
            .collect();
        let mut tally = Tally::new(targets.count_ones() as usize, String::new());
        while let Some((r, outcome)) = flushes.next().await {
            self.settle(r, outcome, &mut tally);
            if let Some(result) = self.decide(IoOp::Flush, 0, 0, &mut tally) {
                // Flushes still out on other replicas are dropped: their result no
                // longer changes the answer.
                return result;
            }
        }
        // Unreachable in practice (decide answers once nothing is outstanding), but
        // answer rather than assume.
        Err(self.no_quorum(
            IoOp::Flush,
            0,
            0,
            tally.acked,
            tally.failures,
            tally.no_space,
        ))
    }
}
