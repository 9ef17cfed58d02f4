//! The per-volume engine: the quorum coordinator between the kernel's block I/O and
//! the volume's replicas.
//!
//! One [`Engine`] serves one staged volume with one fencing epoch. It is the single
//! writer of the volume: every write gets a sequence number
//! `seq = epoch << 40 | counter` (counter from 1, strictly increasing) and goes to
//! every in-sync replica at once; it is acknowledged when a majority of the *whole*
//! replica set acknowledged it.
//!
//! Layout:
//! * [`config`]: [`EngineConfig`], also built from the controller's `publish_context`.
//! * [`error`]: [`EngineError`] and its [`EngineErrorKind`] (which errno).
//! * [`status`]: [`EngineStatus`], per-replica state and counters.
//! * [`target`]: [`EngineTarget`], the [`crate::frontend::BlockTarget`] adapter that
//!   lets FUSE worker threads hand requests to the async engine without waiting.
//! * `inflight`: the table of writes some replica has not finished, which orders
//!   overlapping writes, picks replicas for reads and scopes flushes.
//! * `sync`: bringing the replicas in sync at open, declaring the in-sync set on
//!   the replicas, cleaning their dirty regions; `reconcile`: which version of a
//!   block wins and where it goes (pure); `resync`: reconnecting a replica that
//!   dropped and catching it up online; `replica_set`: learning that the
//!   controller replaced a member and giving its slot to the new one.
//! * `replicate`: the write path; `read`: the read path and self-healing reads.
//!
//! # Behaviour
//!
//! * **Open** connects to every replica in parallel, each bounded by the request
//!   timeout, and needs a majority connected. Replicas that cannot be reached start
//!   out stale. The volume's size is the largest one a majority of the replica set
//!   reports (at least the size the controller recorded, when given); a connected
//!   replica below it missed an expansion and starts stale too. A
//!   replica that answers `STALE_EPOCH` at HELLO means the volume has already moved:
//!   open fails with [`EngineError::Fenced`]. Then, before any I/O is served, the
//!   reached replicas are **brought in sync** (`sync` module): every region any of
//!   them marked dirty is compared block by block, the highest intact seq among
//!   the replicas the last in-sync record names wins and is copied to every reached
//!   replica that holds something else (replicas the record left out are copied
//!   to, never from), and the reached replicas are declared in sync on a majority.
//!   So a replica that missed writes — down while they happened, or left behind by
//!   a crashed engine — never serves a read of them.
//! * **Writes and trims** are sent to every in-sync replica in parallel (one shared
//!   [`Bytes`] buffer, no copy per replica) and complete at a majority. The rest of
//!   the acknowledgements are collected in the background. A replica that errors or
//!   does not answer within the request timeout is marked stale: it gets no further
//!   reads or writes, the reason and time are kept for [`Engine::status`], and the
//!   rest are declared in sync without it in the background. An
//!   acknowledgement from a replica that is already stale does not count, because a
//!   stale replica may have missed earlier writes. If a majority cannot be reached the
//!   write fails, within one request timeout of being issued. Two overlapping writes
//!   in flight at once are sent to each replica in issue order (the later one waits
//!   for the earlier one to finish on that replica), so the copies cannot end up
//!   holding different data.
//! * **Flush** sends FLUSH to a replica only after that replica finished every write
//!   issued before the flush, so the replica's FLUSH covers them; it completes when a
//!   majority flushed. So after a flush, every write acknowledged before it is durable
//!   on a majority (DESIGN.md invariant 1).
//! * **Reads** go to one in-sync replica with no unfinished overlapping write,
//!   the least loaded (unanswered reads and writes: a replica behind on writes would
//!   answer only after them), or the one on this node unless it is more than a few
//!   requests busier. A replica that
//!   errors or times out is marked stale and another is tried. Reads also require a
//!   majority in sync: a minority could belong to an engine that has lost the volume
//!   to a newer one, and reading it could return data older than that engine's writes
//!   (invariant 2). A replica that reports `CORRUPT_BLOCK` is not marked stale; the
//!   read is served from another replica and the bad copy is rewritten in the
//!   background (*self-healing read*). The repair waits until no write overlaps the
//!   range, then registers itself in the in-flight table so new overlapping writes
//!   reach that replica only after the repair, re-reads a good copy and writes it with
//!   a fresh seq. If every copy is corrupt the read fails and the block index is
//!   logged.
//! * **Fencing**: `STALE_EPOCH` from any replica, on any request, means a newer
//!   engine owns the volume. This engine then fails that and every later operation
//!   with [`EngineError::Fenced`] (invariant 3 is enforced by the replicas; the engine
//!   just stops trying).
//!
//! * **Cleaning**: every `clean_interval` in which writes happened, and at close,
//!   once every replica of the set is in sync, the replicas flush and clear the
//!   dirty regions every one of them holds, so the next engine reconciles only what
//!   was written since.
//!
//! * **Resync** (`resync` module): a stale replica is reconnected with backoff,
//!   gets every new write while it is caught up on what it missed (its acks do not
//!   count and it serves no reads meanwhile), and is readmitted and declared in sync
//!   again, all while the engine serves; so a rolling restart of the replica daemons
//!   never takes the volume below quorum as long as one daemon is down at a time.
//!   A replica that was never declared in sync is compared over the whole volume.
//!
//! * **Replica-set changes** (`replica_set` module): a slot is a position in the
//!   set, its identity (node id, data address) can change. The set a majority of
//!   the replicas report replaces the engine's; a slot whose member left it is taken
//!   out, given to the new member and brought in by the resync above.
//!
//! # Expansion
//!
//! The size is learnt at open and grows only through [`Engine::resize`], which the
//! engine-host calls after the controller expanded the replicas: it re-reads the
//! replicas' sizes with a fresh HELLO each and adopts the largest size a majority
//! holds. Open applies the same rule (replicas may be larger than the size recorded at
//! publish time: the volume may have grown since).
//!
//! # Cost per I/O
//!
//! The engine shares two cores with three replica daemons in tests, so the hot path
//! avoids work: one task per write or trim (it outlives the caller to collect the last
//! acknowledgements) and one timer bounding all of its replicas, a short mutex section
//! on the in-flight table (never held across an await), relaxed atomic counters, no
//! logging. [`Engine::start_write`] / [`Engine::start_trim`] take a completion
//! callback instead of returning a future, so the frontend can issue a write from a
//! FUSE thread (sequenced and ordered there, in the kernel's order) without a task or
//! a waiting thread of its own; the async [`Engine::write`] / [`Engine::trim`] are
//! the same path with a oneshot as the callback.

pub mod config;
pub mod error;
mod inflight;
mod read;
mod reconcile;
mod replica_set;
mod replicate;
mod resync;
pub mod status;
mod sync;
pub mod target;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tessera_tls::Transport;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tessera_replica_protocol::block::BLOCK_SIZE;
use tessera_replica_protocol::data::frame::MAX_PAYLOAD;
use tessera_replica_protocol::data::{
    ClientConfig, ClientError, ErrorCode, ReplicaDataClient, WritePayload,
};
use tessera_replica_protocol::seq::{Epoch, Seq};
use tessera_replica_protocol::sync::Membership;
use tessera_telemetry::{latency, VolumeOpHistograms};
use tokio::sync::oneshot;
use tokio::time::Instant;

pub use config::{ConfigError, EngineConfig, ReplicaEndpoint};
pub use error::{EngineError, EngineErrorKind, IoOp};
pub use status::{EngineCounters, EngineStatus, ReplicaState, ReplicaStatus};
pub use sync::ReconcileReport;
pub use target::EngineTarget;

use inflight::{Inflight, Op};
use replicate::Payload;
use status::Counters;

/// Largest single read, write or trim payload the engine accepts (the data-plane
/// frame limit); [`EngineTarget`] splits larger requests.
pub const MAX_IO_BYTES: usize = MAX_PAYLOAD;

/// Which member of the replica set a slot stands for. Replaced as a whole (never
/// edited in place) when the controller replaces the member (`replica_set`
/// module), so a reader always sees a node id with its own address.
#[derive(Debug, Clone)]
struct Identity {
    node_id: String,
    address: String,
    /// Bumped when the slot is given to another member, so a resync started for
    /// the former member never installs its connection for the new one.
    generation: u64,
    /// The member was never declared in sync through this slot (it took over from
    /// another one): its next catch-up compares the whole volume, because the
    /// dirty maps only cover what a former member missed (`resync` module).
    full_compare: bool,
}

/// One slot of the replica set from the engine's point of view: a connection to
/// the member it currently stands for, and that connection's state.
struct Replica {
    /// Who the slot is; see [`Identity`]. Lock order: `stale_info`, then this, then
    /// `client`.
    identity: Mutex<Arc<Identity>>,
    /// `None` once the engine is closed, or if it never connected.
    client: Mutex<Option<ReplicaDataClient>>,
    /// [`IN_SYNC`], [`STALE`] or [`RESYNCING`]: a fast check on the hot path;
    /// [`Replica::stale_info`] has the details of the last time it went stale.
    state: AtomicU8,
    stale_info: Mutex<Option<(String, SystemTime)>>,
    /// When [`Replica::state`] last became [`RESYNCING`].
    resyncing_since: Mutex<Option<SystemTime>>,
    /// Reads in flight, for least-loaded replica choice.
    reads_in_flight: AtomicUsize,
    /// Writes and trims sent (or waiting for an earlier overlapping one) to it that it
    /// has not answered: a replica behind on writes answers a read only after them,
    /// so reads avoid it (a slow replica must not slow the reader down to its pace).
    writes_in_flight: AtomicUsize,
    /// Progress of the catch-up under way: bytes compared so far, of the bytes
    /// planned (0 until planned).
    resync_done: AtomicU64,
    resync_total: AtomicU64,
}

/// One unit of a per-replica in-flight counter, given back when dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn count(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a single assignment or clone, so a panic while
    // holding the lock cannot leave the value half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A replica that holds every acknowledged write: it takes writes (its acks count
/// toward the quorum) and serves reads.
const IN_SYNC: u8 = 0;
/// A replica that failed, timed out or could not be reached: it gets no requests
/// until the reconnector brings it back.
const STALE: u8 = 1;
/// A replica being caught up online (`resync` module): it takes every new write, but
/// its acks do not count and it serves no reads until it is readmitted.
const RESYNCING: u8 = 2;

impl Replica {
    fn new(
        node_id: &str,
        address: &str,
        client: Option<ReplicaDataClient>,
        stale: Option<(String, SystemTime)>,
    ) -> Replica {
        Replica {
            identity: Mutex::new(Arc::new(Identity {
                node_id: node_id.to_owned(),
                address: address.to_owned(),
                generation: 0,
                full_compare: false,
            })),
            client: Mutex::new(client),
            state: AtomicU8::new(if stale.is_some() { STALE } else { IN_SYNC }),
            stale_info: Mutex::new(stale),
            resyncing_since: Mutex::new(None),
            reads_in_flight: AtomicUsize::new(0),
            writes_in_flight: AtomicUsize::new(0),
            resync_done: AtomicU64::new(0),
            resync_total: AtomicU64::new(0),
        }
    }

    /// Who the slot is now.
    fn id(&self) -> Arc<Identity> {
        Arc::clone(&lock(&self.identity))
    }

    /// The slot's current node id, looked up only when formatted (error paths).
    fn node(&self) -> NodeOf<'_> {
        NodeOf(self)
    }

    /// Makes the slot's next catch-up compare the whole volume.
    fn flag_full_compare(&self) {
        let mut id = lock(&self.identity);
        if !id.full_compare {
            *id = Arc::new(Identity {
                full_compare: true,
                ..(**id).clone()
            });
        }
    }

    /// Whether the replica is not in sync (stale or still resyncing).
    fn is_stale(&self) -> bool {
        self.state.load(Ordering::SeqCst) != IN_SYNC
    }

    /// Whether the replica gets requests (in sync or resyncing).
    fn takes_writes(&self) -> bool {
        self.state.load(Ordering::SeqCst) != STALE
    }

    fn client(&self) -> Option<ReplicaDataClient> {
        lock(&self.client).clone()
    }

    /// The connection, unless the replica is stale (then it gets no more requests).
    fn live_client(&self) -> Option<ReplicaDataClient> {
        self.client().filter(|_| self.takes_writes())
    }
}

/// Formats a slot's current node id.
struct NodeOf<'a>(&'a Replica);

impl std::fmt::Display for NodeOf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.id().node_id)
    }
}

/// No replica of the set is on this engine's node.
const NO_LOCAL: usize = usize::MAX;

/// Who fenced the engine.
#[derive(Clone)]
struct FenceInfo {
    replica_epoch: u64,
    node_id: String,
}

struct Inner {
    volume_id: String,
    epoch: Epoch,
    /// Grows only, through [`Engine::resize`]; read on every I/O's range check.
    size: AtomicU64,
    quorum: usize,
    /// The slot on this node ([`NO_LOCAL`] if none); follows replica-set changes.
    local: AtomicUsize,
    local_node_id: String,
    replicas: Vec<Replica>,
    timeout: Duration,
    /// How replicas are (re)connected.
    transport: Transport,
    counter: AtomicU64,
    inflight: Inflight,
    fenced: AtomicBool,
    fence_info: Mutex<Option<FenceInfo>>,
    closed: AtomicBool,
    round_robin: AtomicUsize,
    counters: Counters,
    /// The last in-sync record this engine stored on a majority (`sync` module);
    /// the lock serialises declarations.
    declared: tokio::sync::Mutex<Membership>,
    /// Woken when a replica goes stale, so the background declarer records it.
    sync_changed: Arc<tokio::sync::Notify>,
    /// How often the dirty regions are cleaned while writes happen.
    clean_interval: Duration,
    /// First wait before reconnecting a dropped replica (`resync` module).
    reconnect_interval: Duration,
    /// How often the in-sync replicas are asked for the replica set
    /// (`replica_set` module).
    replica_set_poll: Duration,
    /// The last agreed set that could not be adopted (logged once).
    rejected_set: Mutex<Vec<(String, String)>>,
    /// What reconciling at open did.
    reconciled: Mutex<ReconcileReport>,
    /// Where the latency of reads, writes, trims and flushes is recorded, once the
    /// engine-host set it ([`Engine::record_latency`]).
    op_latency: OnceLock<Arc<VolumeOpHistograms>>,
}

/// The replicated volume served by one engine. Cheap to clone (clones share the
/// engine); all methods may be called concurrently from many tasks.
///
/// Methods must be called from within a tokio runtime (they spawn tasks); from plain
/// threads, use [`EngineTarget`].
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("volume_id", &self.inner.volume_id)
            .field("epoch", &self.inner.epoch)
            .field("size", &self.inner.size.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

use tessera_telemetry::error_chain;

fn bits(mask: u32) -> impl Iterator<Item = usize> {
    (0..32).filter(move |i| mask & (1 << i) != 0)
}

/// Connects to a replica and claims the volume on the new connection (protocol
/// version 5; an older replica is used unclaimed): whatever an earlier connection of
/// this engine, or of an engine at the same epoch that died, still carries to it is
/// applied before this returns or refused after, so it cannot land behind what the
/// engine compares and copies next.
async fn connect_claimed(
    address: &str,
    volume_id: &str,
    epoch: u64,
    config: ClientConfig,
) -> Result<ReplicaDataClient, ClientError> {
    let client = ReplicaDataClient::connect_with(address, volume_id, epoch, config).await?;
    if client.supports_claim() {
        client.claim().await?;
    }
    Ok(client)
}

impl Engine {
    /// Connects to the volume's replicas and returns a ready engine, or fails if a
    /// majority cannot be reached, a replica holds a newer epoch, or no majority holds
    /// the size the controller recorded. Takes at most about one request timeout.
    pub async fn open(config: EngineConfig) -> Result<Engine, EngineError> {
        config.validate()?;
        let client_config = ClientConfig {
            connect_timeout: config.request_timeout,
            // The engine bounds every request itself (including time spent waiting for
            // an earlier overlapping write), so the client waits for the reply.
            request_timeout: None,
            transport: config.transport.clone(),
            ..ClientConfig::default()
        };
        let connects = config.replicas.iter().map(|r| {
            connect_claimed(
                r.data_address.as_str(),
                &config.volume_id,
                config.epoch.get(),
                client_config.clone(),
            )
        });
        let results = futures_util::future::join_all(connects).await;

        let now = SystemTime::now();
        let mut replicas = Vec::with_capacity(results.len());
        let mut failures = String::new();
        let mut sizes = Vec::new();
        for (ep, result) in config.replicas.iter().zip(results) {
            let (client, stale) = match result {
                Ok(c) if u64::from(c.info().block_size) != BLOCK_SIZE => (
                    None,
                    Some(format!(
                        "replica uses {}-byte blocks, the engine {BLOCK_SIZE}",
                        c.info().block_size
                    )),
                ),
                Ok(c) => {
                    sizes.push((ep.node_id.clone(), c.info().size));
                    (Some(c), None)
                }
                Err(e) if e.code() == Some(ErrorCode::StaleEpoch) => {
                    let replica_epoch = match &e {
                        ClientError::Remote(r) => r.detail,
                        _ => 0,
                    };
                    return Err(EngineError::Fenced {
                        volume_id: config.volume_id.clone(),
                        epoch: config.epoch.get(),
                        replica_epoch,
                        node_id: ep.node_id.clone(),
                    });
                }
                Err(e) => (
                    None,
                    Some(format!("connecting failed: {}", error_chain(&e))),
                ),
            };
            if let Some(reason) = &stale {
                let _ = write!(failures, "{}{}: {reason}", sep(&failures), ep.node_id);
            }
            replicas.push(Replica::new(
                &ep.node_id,
                &ep.data_address,
                client,
                stale.map(|r| (r, now)),
            ));
        }
        let total = replicas.len();
        let quorum = tessera_replica_protocol::quorum::majority(total);
        if sizes.len() < quorum {
            return Err(EngineError::OpenQuorum {
                volume_id: config.volume_id,
                connected: sizes.len(),
                total,
                needed: quorum,
                failures,
            });
        }
        // The volume's size is the largest one a majority holds (sizes only grow, and
        // an expansion needs a majority). A connected replica below it missed an
        // expansion while it was down: it cannot take writes past its end, so it starts
        // stale like an unreachable one. A replica above it (an expansion that reached
        // only a minority so far) serves the smaller volume unharmed.
        let mut by_size: Vec<u64> = sizes.iter().map(|(_, s)| *s).collect();
        by_size.sort_unstable_by(|a, b| b.cmp(a));
        let size = by_size[quorum - 1];
        // The recorded size is the one at publish time; the volume may have been
        // expanded since (the publish_context is not refreshed), so larger is fine.
        if config.expected_size.is_some_and(|e| e > size) {
            let mut list: Vec<String> = sizes.iter().map(|(n, s)| format!("{n}={s}")).collect();
            if let Some(e) = config.expected_size {
                list.push(format!("expected={e}"));
            }
            return Err(EngineError::SizeMismatch {
                volume_id: config.volume_id,
                sizes: list.join(", "),
            });
        }
        for (node, replica_size) in sizes.iter().filter(|(_, s)| *s < size) {
            let reason =
                format!("holds {replica_size} bytes, the volume {size}: it missed an expansion");
            if let Some(r) = replicas.iter().find(|r| &r.id().node_id == node) {
                r.state.store(STALE, Ordering::Release);
                *lock(&r.stale_info) = Some((reason, now));
            }
        }
        for r in replicas.iter().filter(|r| r.is_stale()) {
            if let Some((reason, _)) = &*lock(&r.stale_info) {
                let id = r.id();
                tracing::warn!(volume = %config.volume_id, node = %id.node_id, address = %id.address, %reason, "replica stale at open");
            }
        }
        let local = replicas
            .iter()
            .position(|r| r.id().node_id == config.local_node_id)
            .unwrap_or(NO_LOCAL);
        let engine = Engine {
            inner: Arc::new(Inner {
                volume_id: config.volume_id,
                epoch: config.epoch,
                size: AtomicU64::new(size),
                quorum,
                local: AtomicUsize::new(local),
                local_node_id: config.local_node_id,
                replicas,
                timeout: config.request_timeout,
                transport: config.transport,
                counter: AtomicU64::new(0),
                inflight: Inflight::default(),
                fenced: AtomicBool::new(false),
                fence_info: Mutex::new(None),
                closed: AtomicBool::new(false),
                round_robin: AtomicUsize::new(0),
                counters: Counters::default(),
                declared: tokio::sync::Mutex::new(Membership::default()),
                sync_changed: Arc::new(tokio::sync::Notify::new()),
                clean_interval: config.clean_interval,
                reconnect_interval: config.reconnect_interval,
                replica_set_poll: config.replica_set_poll,
                rejected_set: Mutex::new(Vec::new()),
                reconciled: Mutex::new(ReconcileReport::default()),
                op_latency: OnceLock::new(),
            }),
        };
        let report = engine.inner.bring_in_sync().await?;
        *lock(&engine.inner.reconciled) = report;
        sync::spawn_background(&engine.inner);
        Ok(engine)
    }

    /// Volume size in bytes: the size at open, or the last [`Engine::resize`].
    pub fn size(&self) -> u64 {
        self.inner.size.load(Ordering::Acquire)
    }

    /// Learns the volume's new size after the controller expanded its replicas, and
    /// returns it. Each in-sync replica is asked for its size with a fresh HELLO (the
    /// reply carries the store's current size; the open connections keep serving I/O
    /// meanwhile). The new size is the largest one a majority of the whole replica set
    /// holds, so every later write in the new range can still reach a majority. With
    /// `wanted`, fewer than a majority holding at least that many bytes is
    /// [`EngineError::NotExpanded`]. The size never shrinks: a majority reporting less
    /// than the engine serves is the same error.
    pub async fn resize(&self, wanted: Option<u64>) -> Result<u64, EngineError> {
        let inner = &*self.inner;
        inner.check_usable()?;
        let client_config = inner.client_config();
        let asks = inner.replicas.iter().map(|r| {
            let cfg = client_config.clone();
            let id = r.id();
            async move {
                if r.is_stale() {
                    return Err(format!("{}: stale", id.node_id));
                }
                ReplicaDataClient::connect_with(
                    id.address.as_str(),
                    &inner.volume_id,
                    inner.epoch.get(),
                    cfg,
                )
                .await
                .map(|c| c.info().size)
                .map_err(|e| format!("{}: {}", id.node_id, error_chain(&e)))
            }
        });
        let answers = futures_util::future::join_all(asks).await;
        let mut sizes: Vec<u64> = answers
            .iter()
            .filter_map(|a| a.as_ref().ok())
            .copied()
            .collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let current = self.size();
        let majority_size = sizes.get(inner.quorum - 1).copied();
        let describe_all = || {
            answers
                .iter()
                .zip(&inner.replicas)
                .map(|(a, r)| match a {
                    Ok(s) => format!("{}={s}", r.node()),
                    Err(e) => e.clone(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let size = match majority_size {
            Some(s) if s >= current && wanted.is_none_or(|w| s >= w) => s,
            _ => {
                return Err(EngineError::NotExpanded {
                    volume_id: inner.volume_id.clone(),
                    wanted: wanted.unwrap_or(current),
                    sizes: describe_all(),
                })
            }
        };
        inner.size.fetch_max(size, Ordering::AcqRel);
        if size != current {
            tracing::info!(volume = %inner.volume_id, from = current, to = size, "engine resized");
        }
        Ok(self.size())
    }

    /// The volume id.
    pub fn volume_id(&self) -> &str {
        &self.inner.volume_id
    }

    /// The engine's fencing epoch.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch.get()
    }

    /// Records the latency of every later read, write, trim and flush, from the call
    /// to its answer, in `histograms` (resolved once per volume by the engine-host).
    /// Only the first call has an effect.
    pub fn record_latency(&self, histograms: Arc<VolumeOpHistograms>) {
        let _ = self.inner.op_latency.set(histograms);
    }

    /// Reads `len` bytes at `offset` (multiples of 4096, `len` ≤ [`MAX_IO_BYTES`]).
    /// Never returns data older than the last write acknowledged before the call.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, EngineError> {
        let inner = &self.inner;
        let started = Instant::now();
        let result = async {
            inner.check(IoOp::Read, offset, u64::from(len))?;
            let (data, corrupt) = inner.read_any(offset, len, 0).await?;
            for (r, block) in corrupt {
                // Repair from the first corrupt block to the end of the read; blocks
                // before it were verified by the replica. A detail outside the range
                // (a confused replica) repairs the whole range.
                let end = offset + u64::from(len);
                let start = block
                    .checked_mul(BLOCK_SIZE)
                    .filter(|s| (offset..end).contains(s))
                    .unwrap_or(offset);
                tokio::spawn(Inner::repair(Arc::clone(inner), r, start, end - start));
            }
            Ok(data)
        }
        .await;
        match &result {
            Ok(_) => {
                Counters::add(&inner.counters.reads, 1);
                Counters::add(&inner.counters.bytes_read, u64::from(len));
            }
            Err(_) => Counters::add(&inner.counters.failed_ops, 1),
        }
        inner.observe(latency::Op::Read, started);
        result
    }

    /// Writes `data` at `offset` (multiples of 4096, at most [`MAX_IO_BYTES`]);
    /// returns once a majority of the replica set acknowledged it.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), EngineError> {
        let (tx, rx) = oneshot::channel();
        let len = data.len() as u64;
        self.start_write(offset, data, move |r| {
            let _ = tx.send(r);
        });
        self.answer(rx, IoOp::Write, offset, len).await
    }

    /// [`Engine::write`] without a future: the write is checked, given its seq and
    /// ordered against earlier overlapping writes before this returns, and `done` is
    /// called once it is decided (on a runtime thread, or at once on this thread if
    /// it fails before reaching any replica). Must be called with the engine's runtime
    /// entered ([`tokio::runtime::Handle::enter`]). This is what lets the frontend
    /// keep many writes in flight without a task or a waiting thread per write: the
    /// only task is the one that collects the replicas' answers.
    pub fn start_write(
        &self,
        offset: u64,
        data: Bytes,
        done: impl FnOnce(Result<(), EngineError>) + Send + 'static,
    ) {
        let len = data.len() as u64;
        let done = self.counted(IoOp::Write, len, done);
        match self.inner.check(IoOp::Write, offset, len) {
            Ok(()) => self.start_replicate(
                IoOp::Write,
                offset,
                len,
                Payload::Data(WritePayload::new(data)),
                done,
            ),
            Err(e) => done(Err(e)),
        }
    }

    /// Discards `len` bytes at `offset` (multiples of 4096) on every replica; they
    /// read back as zeros. Replicated and acknowledged like a write.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        let (tx, rx) = oneshot::channel();
        self.start_trim(offset, len, move |r| {
            let _ = tx.send(r);
        });
        self.answer(rx, IoOp::Trim, offset, len).await
    }

    /// [`Engine::trim`] without a future, like [`Engine::start_write`].
    pub fn start_trim(
        &self,
        offset: u64,
        len: u64,
        done: impl FnOnce(Result<(), EngineError>) + Send + 'static,
    ) {
        let done = self.counted(IoOp::Trim, 0, done);
        match self.inner.check_range(IoOp::Trim, offset, len) {
            Ok(()) => self.start_replicate(IoOp::Trim, offset, len, Payload::Trim, done),
            Err(e) => done(Err(e)),
        }
    }

    /// Wraps `done` so the outcome is counted (writes with `bytes`, trims) and timed
    /// first.
    fn counted(
        &self,
        op: IoOp,
        bytes: u64,
        done: impl FnOnce(Result<(), EngineError>) + Send + 'static,
    ) -> impl FnOnce(Result<(), EngineError>) + Send + 'static {
        let inner = Arc::clone(&self.inner);
        let started = Instant::now();
        move |result| {
            inner.observe(
                if op == IoOp::Trim {
                    latency::Op::Trim
                } else {
                    latency::Op::Write
                },
                started,
            );
            let c = &inner.counters;
            match &result {
                Ok(()) => {
                    Counters::add(
                        if op == IoOp::Trim {
                            &c.trims
                        } else {
                            &c.writes
                        },
                        1,
                    );
                    if bytes > 0 {
                        Counters::add(&c.bytes_written, bytes);
                    }
                }
                Err(_) => Counters::add(&c.failed_ops, 1),
            }
            done(result)
        }
    }

    /// Waits for the answer of a started write or trim.
    async fn answer(
        &self,
        rx: oneshot::Receiver<Result<(), EngineError>>,
        op: IoOp,
        offset: u64,
        len: u64,
    ) -> Result<(), EngineError> {
        match rx.await {
            Ok(r) => r,
            // The task always answers before it ends; this only happens if the
            // runtime is shutting down and dropped it.
            Err(_) => {
                Err(self
                    .inner
                    .no_quorum(op, offset, len, 0, "engine task ended".into(), false))
            }
        }
    }

    /// Makes every write acknowledged before the call durable on a majority.
    pub async fn flush(&self) -> Result<(), EngineError> {
        let started = Instant::now();
        let result = self.inner.flush().await;
        self.count(&result, &self.inner.counters.flushes, 0);
        self.inner.observe(latency::Op::Flush, started);
        result
    }

    /// The engine's state: replicas, quorum, fencing, counters.
    pub fn status(&self) -> EngineStatus {
        let inner = &self.inner;
        let replicas: Vec<ReplicaStatus> = inner
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let id = r.id();
                ReplicaStatus {
                    node_id: id.node_id.clone(),
                    address: id.address.clone(),
                    local: inner.local() == Some(i),
                    state: match (r.state.load(Ordering::SeqCst), &*lock(&r.stale_info)) {
                        (STALE, Some((reason, since))) => ReplicaState::Stale {
                            reason: reason.clone(),
                            since: *since,
                        },
                        (RESYNCING, _) => ReplicaState::Resyncing {
                            since: lock(&r.resyncing_since).unwrap_or(UNIX_EPOCH),
                            done_bytes: r.resync_done.load(Ordering::Relaxed),
                            total_bytes: r.resync_total.load(Ordering::Relaxed),
                            full: id.full_compare,
                        },
                        _ => ReplicaState::InSync,
                    },
                }
            })
            .collect();
        let in_sync = replicas
            .iter()
            .filter(|r| r.state == ReplicaState::InSync)
            .count();
        EngineStatus {
            volume_id: inner.volume_id.clone(),
            epoch: inner.epoch.get(),
            size: inner.size.load(Ordering::Acquire),
            quorum: inner.quorum,
            in_sync,
            below_quorum: in_sync < inner.quorum,
            fenced: inner.fenced.load(Ordering::SeqCst),
            closed: inner.closed.load(Ordering::SeqCst),
            inflight_ops: inner.inflight.len(),
            counters: inner.counters.snapshot(),
            reconciled_at_open: lock(&inner.reconciled).clone(),
            replicas,
        }
    }

    /// Flushes, then stops serving and drops the replica connections (they close
    /// once background work holding them finishes). Later calls fail with
    /// [`EngineError::Closed`]; closing again returns `Ok`. Returns the flush's error
    /// if it failed: the connections are dropped either way.
    pub async fn close(&self) -> Result<(), EngineError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let flushed = if inner.fenced.load(Ordering::SeqCst) {
            Ok(())
        } else {
            self.flush().await
        };
        if flushed.is_ok() {
            // A clean close leaves nothing for the next engine to reconcile.
            inner.clean_round(true).await;
        }
        inner.closed.store(true, Ordering::SeqCst);
        for r in &inner.replicas {
            lock(&r.client).take();
        }
        flushed
    }

    fn count(&self, result: &Result<(), EngineError>, ok: &AtomicU64, bytes: u64) {
        let c = &self.inner.counters;
        match result {
            Ok(()) => {
                Counters::add(ok, 1);
                if bytes > 0 {
                    Counters::add(&c.bytes_written, bytes);
                }
            }
            Err(_) => Counters::add(&c.failed_ops, 1),
        }
    }

    /// Sends a write or trim to every in-sync replica; `done` learns the outcome once
    /// a majority decided it. The seq and the place in the in-flight table (which
    /// orders overlapping writes) are taken before this returns.
    fn start_replicate(
        &self,
        op: IoOp,
        offset: u64,
        len: u64,
        payload: Payload,
        done: impl FnOnce(Result<(), EngineError>) + Send + 'static,
    ) {
        let inner = &self.inner;
        let counter = inner.counter.fetch_add(1, Ordering::Relaxed) + 1;
        let Some(seq) = inner.epoch.seq(counter).map(Seq::get) else {
            return done(Err(inner.no_quorum(
                op,
                offset,
                len,
                0,
                "sequence counter exhausted; reopen the volume with a new epoch".into(),
                false,
            )));
        };
        if (inner.in_sync_mask().count_ones() as usize) < inner.quorum {
            return done(Err(inner.no_quorum(
                op,
                offset,
                len,
                0,
                inner.stale_summary(),
                false,
            )));
        }
        let mut preds = Vec::new();
        // The targets are read under the table's lock, so a replica that starts
        // resyncing either gets this write or sees it in the resync's snapshot.
        let entry = inner
            .inflight
            .register_with(offset, len, || inner.write_mask(), &mut preds);
        tokio::spawn(Inner::drive(
            Arc::clone(inner),
            entry,
            preds,
            op,
            offset,
            len,
            payload,
            seq,
            done,
        ));
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Lets the background declarer (which holds only a weak reference) see the
        // engine is gone and end, instead of waiting for a change forever.
        self.sync_changed.notify_one();
    }
}

fn sep(s: &str) -> &'static str {
    if s.is_empty() {
        ""
    } else {
        "; "
    }
}

impl Inner {
    /// How the engine connects to a replica after open (resync, resize): every
    /// request bounded by the engine's timeout.
    fn client_config(&self) -> ClientConfig {
        ClientConfig {
            connect_timeout: self.timeout,
            request_timeout: Some(self.timeout),
            transport: self.transport.clone(),
            ..ClientConfig::default()
        }
    }
}

impl Inner {
    /// Records that a `op` started at `started` has been answered (when measured).
    /// The slot on this node, if any.
    fn local(&self) -> Option<usize> {
        Some(self.local.load(Ordering::Relaxed)).filter(|&l| l != NO_LOCAL)
    }

    fn observe(&self, op: latency::Op, started: Instant) {
        if let Some(histograms) = self.op_latency.get() {
            histograms.observe(op, started.elapsed());
        }
    }

    fn check(&self, op: IoOp, offset: u64, len: u64) -> Result<(), EngineError> {
        if len > MAX_IO_BYTES as u64 {
            return Err(EngineError::Unaligned {
                volume_id: self.volume_id.clone(),
                op,
                offset,
                len,
            });
        }
        self.check_range(op, offset, len)
    }

    fn check_range(&self, op: IoOp, offset: u64, len: u64) -> Result<(), EngineError> {
        self.check_usable()?;
        if len == 0 || !(offset | len).is_multiple_of(BLOCK_SIZE) {
            return Err(EngineError::Unaligned {
                volume_id: self.volume_id.clone(),
                op,
                offset,
                len,
            });
        }
        let size = self.size.load(Ordering::Acquire);
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(EngineError::OutOfRange {
                volume_id: self.volume_id.clone(),
                op,
                offset,
                len,
                size,
            });
        }
        Ok(())
    }

    fn check_usable(&self) -> Result<(), EngineError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(EngineError::Closed {
                volume_id: self.volume_id.clone(),
            });
        }
        if self.fenced.load(Ordering::SeqCst) {
            return Err(self.fenced_error());
        }
        Ok(())
    }

    fn fenced_error(&self) -> EngineError {
        let info = lock(&self.fence_info).clone();
        let (replica_epoch, node_id) =
            info.map_or((0, String::new()), |i| (i.replica_epoch, i.node_id));
        EngineError::Fenced {
            volume_id: self.volume_id.clone(),
            epoch: self.epoch.get(),
            replica_epoch,
            node_id,
        }
    }

    /// Records that replica `r` reported a newer epoch; returns the error to fail with.
    fn fence(&self, r: usize, err: &ClientError) -> EngineError {
        let replica_epoch = match err {
            ClientError::Remote(e) => e.detail,
            _ => 0,
        };
        {
            let mut info = lock(&self.fence_info);
            if info.is_none() {
                let node_id = self.replicas[r].id().node_id.clone();
                tracing::error!(volume = %self.volume_id, epoch = self.epoch.get(), replica_epoch, node = %node_id, "engine fenced: the volume has a newer epoch; failing all I/O");
                *info = Some(FenceInfo {
                    replica_epoch,
                    node_id,
                });
            }
        }
        self.fenced.store(true, Ordering::SeqCst);
        self.fenced_error()
    }

    /// Marks replica `r` stale (once; later reasons are dropped) and wakes the
    /// declarer, which records it out of sync on the others.
    fn mark_stale(&self, r: usize, reason: String) {
        let rep = &self.replicas[r];
        let mut info = lock(&rep.stale_info);
        if rep.state.swap(STALE, Ordering::SeqCst) != STALE {
            let id = rep.id();
            tracing::warn!(volume = %self.volume_id, node = %id.node_id, address = %id.address, %reason, "replica marked stale");
            *info = Some((reason, SystemTime::now()));
            self.sync_changed.notify_one();
        }
    }

    fn in_sync_mask(&self) -> u32 {
        self.mask(|r| !r.is_stale())
    }

    /// Replicas that get writes: in sync or resyncing.
    fn write_mask(&self) -> u32 {
        self.mask(Replica::takes_writes)
    }

    fn mask(&self, pred: impl Fn(&Replica) -> bool) -> u32 {
        self.replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| pred(r))
            .fold(0, |m, (i, _)| m | 1 << i)
    }

    fn stale_summary(&self) -> String {
        let mut s = String::new();
        for r in self.replicas.iter().filter(|r| r.is_stale()) {
            if r.takes_writes() {
                let _ = write!(s, "{}{}: resyncing", sep(&s), r.node());
                continue;
            }
            let reason = lock(&r.stale_info)
                .as_ref()
                .map_or_else(String::new, |(reason, _)| reason.clone());
            let _ = write!(s, "{}{}: stale ({reason})", sep(&s), r.node());
        }
        s
    }

    fn no_quorum(
        &self,
        op: IoOp,
        offset: u64,
        len: u64,
        acked: usize,
        failures: String,
        no_space: bool,
    ) -> EngineError {
        EngineError::NoQuorum {
            volume_id: self.volume_id.clone(),
            op,
            offset,
            len,
            acked,
            needed: if op == IoOp::Read { 1 } else { self.quorum },
            failures,
            no_space,
        }
    }
}
