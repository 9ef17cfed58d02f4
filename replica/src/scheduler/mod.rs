//! The replica daemon's I/O scheduler: per-volume queues, token-bucket QoS, earliest
//! deadline first, and an io_uring engine underneath.
//!
//! One [`Scheduler`] serves one backing directory (one device). Every volume stored
//! there registers with it ([`Scheduler::register_volume`]) and submits all of its disk
//! I/O through the returned [`VolumeHandle`]:
//!
//! ```text
//!  tokio tasks ──submit()──► per-volume queues (one FIFO per IoClass)
//!                               │  token buckets: maxIOPS, maxBandwidth (burst)
//!                               │  reservation: minIOPS first under contention
//!                               ▼  earliest deadline first, ≤ queue_depth in flight
//!                            IoEngine ──► the shard thread's own ring, else the
//!                               │         io_uring thread ──► kernel
//!                               │         (or the sync reference engine)
//!  future resolves ◄──oneshot───┘ completion callback: counters, dispatch next
//! ```
//!
//! *Behaviour.*
//! * A request is queued when [`VolumeHandle::submit`] is called (its deadline counts
//!   from then), not when the returned future is first polled.
//! * Deadline = arrival + the budget of its [`IoClass`] ([`DeadlineBudgets`], default
//!   2 ms foreground read, 5 ms foreground write/flush, 100 ms background). Requests
//!   completing later count as deadline misses.
//! * A volume without limits never waits for tokens. Limits and reservation can be
//!   changed at any time ([`VolumeHandle::set_qos`]); queued requests stay queued.
//! * Dropping a submit future before the request was handed to the engine discards the
//!   request; after that it runs to completion and only the result is dropped.
//! * Dispatch happens inline in the submitting task and in the completion callback,
//!   under the same lock round that queued or completed a request; a small tokio task
//!   only wakes the queues when a throttled volume's tokens come due.
//! * While foreground I/O is active, at most [`BackgroundLimits::busy_depth`]
//!   background requests are in the engine, and background transfers go to the device
//!   in pieces of [`BackgroundLimits::max_transfer`] (the [`background`] module), so
//!   foreground requests do not wait behind megabytes in the device queue.
//!
//! *Limitations.* Requests of one volume may complete in any order, as with any
//! queue depth above one: a flush covers the writes that completed before it was
//! submitted, which is what the engine's write/flush protocol relies on. Picking costs
//! O(volumes) per dispatch (see the `edf` module).
//!
//! *Waiting.* [`VolumeHandle::submit`] returns a [`Submission`], a named future the
//! block store's files hand out without boxing. Async callers (the data plane, copies)
//! await it; a plain thread (the store's blocking API, tools through
//! [`VolumeHandle::submit_blocking`]) parks until the completion callback resolves it.
//! Never park that way on a tokio worker thread (a throttled request is released by the
//! timer task, which then may not run) nor on a thread that runs
//! [`run_with_local_ring`] (its completions are reaped by that very thread).
//!
//! Layout: [`aligned_buf`] (O_DIRECT buffers), [`clock`], [`token_bucket`], `edf`
//! (pure policy), [`background`] (the background cap), [`engine`] (the engine trait),
//! [`uring`] and [`sync_engine`] (the two engines; the io_uring one also gives each
//! data-plane shard thread a ring of its own through [`run_with_local_ring`]), [`stats`], [`params`] (QoS from
//! volume-record parameters).

pub mod aligned_buf;
pub mod background;
pub mod clock;
mod edf;
pub mod engine;
pub mod params;
pub mod stats;
pub mod sync_engine;
pub mod token_bucket;
pub mod uring;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};

pub use aligned_buf::{AlignedBuf, AlignedBufError, BUF_ALIGN};
pub use background::BackgroundLimits;
pub use clock::{Clock, ManualClock, MonotonicClock};
pub use engine::{EngineError, EngineOp, IoEngine, Rejected};
pub use stats::VolumeStats;
pub use sync_engine::SyncEngine;
pub use token_bucket::TokenBucket;
pub use uring::{run_with_local_ring, LocalFirstEngine, UringEngine};

use background::BackgroundGate;
use clock::duration_ns;
use edf::{Edf, Entry, Pick};
use stats::Counters;

/// Largest read or write accepted, in bytes. Far above what the data plane sends (it
/// caps frames at a few MiB), low enough that a bogus length cannot exhaust memory.
pub const MAX_IO_LEN: usize = 64 << 20;

/// Default bound on requests in flight in the engine: deep enough to saturate NVMe and
/// virtio disks, shallow enough that EDF, not the device queue, decides latency.
pub const DEFAULT_QUEUE_DEPTH: u32 = 128;

/// Latency class of a request; it picks the deadline budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoClass {
    /// A read an application is waiting for.
    ForegroundRead,
    /// A write, flush or trim an application is waiting for.
    ForegroundWrite,
    /// Resync, rebuild, scrub, snapshot copy: nobody waits on one request.
    Background,
}

impl IoClass {
    pub(crate) const COUNT: usize = 3;

    pub(crate) fn index(self) -> usize {
        match self {
            IoClass::ForegroundRead => 0,
            IoClass::ForegroundWrite => 1,
            IoClass::Background => 2,
        }
    }
}

/// Deadline budget per [`IoClass`]: how long after arrival a request should complete.
/// Only the order matters for scheduling; the values also define what counts as a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlineBudgets {
    /// Budget of [`IoClass::ForegroundRead`].
    pub foreground_read: Duration,
    /// Budget of [`IoClass::ForegroundWrite`].
    pub foreground_write: Duration,
    /// Budget of [`IoClass::Background`].
    pub background: Duration,
}

impl Default for DeadlineBudgets {
    fn default() -> Self {
        Self {
            foreground_read: Duration::from_millis(2),
            foreground_write: Duration::from_millis(5),
            background: Duration::from_millis(100),
        }
    }
}

impl DeadlineBudgets {
    fn as_ns(&self) -> [u64; IoClass::COUNT] {
        [
            duration_ns(self.foreground_read),
            duration_ns(self.foreground_write),
            duration_ns(self.background),
        ]
    }
}

/// Which engine executes requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineKind {
    /// The io_uring ring thread (production).
    IoUring,
    /// Blocking system calls on `threads` worker threads (reference / fallback).
    Sync {
        /// Worker threads, each with one request in flight.
        threads: usize,
    },
}

/// Configuration of one scheduler (one backing directory).
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Names the engine threads (e.g. the backing directory's last component).
    pub name: String,
    /// Engine to run requests on.
    pub engine: EngineKind,
    /// Most requests in flight in the engine at once (1..=4096).
    pub queue_depth: u32,
    /// Deadline budget per class.
    pub deadlines: DeadlineBudgets,
    /// How much background I/O may be in the device while foreground is active.
    pub background: BackgroundLimits,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            name: "default".into(),
            engine: EngineKind::IoUring,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            deadlines: DeadlineBudgets::default(),
            background: BackgroundLimits::default(),
        }
    }
}

/// Quality of service of one volume, from its StorageClass parameters (`maxIOPS`,
/// `maxBandwidth`, `burstDuration`, `minIOPS`). `None` means "no limit" / "no
/// reservation".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qos {
    /// Operations per second the volume may sustain.
    pub max_iops: Option<u64>,
    /// Bytes per second the volume may read plus write.
    pub max_bandwidth: Option<u64>,
    /// How long an idle volume may then run above its limits: bucket capacity is
    /// rate × burst duration.
    pub burst_duration: Duration,
    /// Operations per second the volume gets ahead of others when the device is busy.
    pub min_iops: Option<u64>,
}

impl Default for Qos {
    fn default() -> Self {
        Self::unlimited()
    }
}

impl Qos {
    /// No limits, no reservation, a one-second burst should limits be added later.
    pub fn unlimited() -> Self {
        Self {
            max_iops: None,
            max_bandwidth: None,
            burst_duration: Duration::from_secs(1),
            min_iops: None,
        }
    }

    /// Rejects zero rates and a reservation above the limit, which could never be
    /// honoured.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        for (name, value) in [
            ("maxIOPS", self.max_iops),
            ("maxBandwidth", self.max_bandwidth),
            ("minIOPS", self.min_iops),
        ] {
            if value == Some(0) {
                return Err(SchedulerError::InvalidQos(format!(
                    "{name} must be positive"
                )));
            }
        }
        if let (Some(min), Some(max)) = (self.min_iops, self.max_iops) {
            if min > max {
                return Err(SchedulerError::InvalidQos(format!(
                    "minIOPS {min} exceeds maxIOPS {max}"
                )));
            }
        }
        Ok(())
    }
}

/// One I/O request on a caller-opened file. Files are `Arc<File>` so an in-flight
/// operation keeps its descriptor open even if the caller closes its copy; open them
/// with `O_DIRECT` to bypass the page cache (then offsets and lengths must be
/// block-aligned, and [`AlignedBuf`] takes care of memory alignment).
#[derive(Debug)]
pub enum IoRequest {
    /// Read `len` bytes at `offset`. Completes with a buffer of the bytes read: all of
    /// them, or fewer if the file ends first.
    Read {
        /// File to read.
        file: Arc<File>,
        /// Byte offset.
        offset: u64,
        /// Bytes to read, at most [`MAX_IO_LEN`].
        len: usize,
    },
    /// Write all of `buf` at `offset`; completes with the buffer handed back.
    Write {
        /// File to write.
        file: Arc<File>,
        /// Byte offset.
        offset: u64,
        /// Data, at most [`MAX_IO_LEN`] bytes.
        buf: AlignedBuf,
    },
    /// `fsync(2)`: data and metadata durable.
    Fsync {
        /// File to sync.
        file: Arc<File>,
    },
    /// `fdatasync(2)`: data (and the metadata needed to read it) durable.
    Fdatasync {
        /// File to sync.
        file: Arc<File>,
    },
    /// Deallocate a range, keeping the file size; it then reads as zeros.
    PunchHole {
        /// File to punch.
        file: Arc<File>,
        /// Byte offset.
        offset: u64,
        /// Bytes to deallocate.
        len: u64,
    },
}

/// Kind of a request, for errors and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// [`IoRequest::Read`].
    Read,
    /// [`IoRequest::Write`].
    Write,
    /// [`IoRequest::Fsync`].
    Fsync,
    /// [`IoRequest::Fdatasync`].
    Fdatasync,
    /// [`IoRequest::PunchHole`].
    PunchHole,
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Fsync => "fsync",
            OpKind::Fdatasync => "fdatasync",
            OpKind::PunchHole => "punch hole",
        })
    }
}

impl IoRequest {
    /// The request's kind.
    pub fn kind(&self) -> OpKind {
        match self {
            IoRequest::Read { .. } => OpKind::Read,
            IoRequest::Write { .. } => OpKind::Write,
            IoRequest::Fsync { .. } => OpKind::Fsync,
            IoRequest::Fdatasync { .. } => OpKind::Fdatasync,
            IoRequest::PunchHole { .. } => OpKind::PunchHole,
        }
    }

    /// Byte offset, 0 for syncs.
    pub fn offset(&self) -> u64 {
        match self {
            IoRequest::Read { offset, .. }
            | IoRequest::Write { offset, .. }
            | IoRequest::PunchHole { offset, .. } => *offset,
            IoRequest::Fsync { .. } | IoRequest::Fdatasync { .. } => 0,
        }
    }

    /// Bytes charged to the bandwidth limit: data moved, so 0 for syncs and holes.
    pub fn data_bytes(&self) -> u64 {
        match self {
            IoRequest::Read { len, .. } => *len as u64,
            IoRequest::Write { buf, .. } => buf.len() as u64,
            _ => 0,
        }
    }

    fn validate(&self) -> Result<(), SchedulerError> {
        let len = match self {
            IoRequest::Read { len, .. } => *len,
            IoRequest::Write { buf, .. } => buf.len(),
            IoRequest::PunchHole { offset, len, .. } => {
                engine::fallocate_range(*offset, *len)
                    .map_err(|_| SchedulerError::InvalidRequest("punch-hole range exceeds i64"))?;
                0
            }
            _ => 0,
        };
        if len > MAX_IO_LEN {
            return Err(SchedulerError::InvalidRequest(
                "transfer longer than MAX_IO_LEN",
            ));
        }
        Ok(())
    }
}

/// Outcome of a successful request.
#[derive(Debug)]
pub struct IoCompletion {
    /// Bytes transferred (0 for syncs and holes). Less than requested only for a read
    /// that reached end of file.
    pub bytes: usize,
    /// For a read, the data (length `bytes`); for a write, the caller's buffer back for
    /// reuse; `None` otherwise.
    pub buf: Option<AlignedBuf>,
}

impl IoCompletion {
    pub(crate) fn empty() -> Self {
        Self {
            bytes: 0,
            buf: None,
        }
    }
}

/// Why a scheduler call or request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchedulerError {
    /// The operation reached the disk and failed there.
    #[error("{op} at offset {offset} failed")]
    Io {
        /// What was attempted.
        op: OpKind,
        /// Where.
        offset: u64,
        /// The OS error (ENOSPC, EIO, ...).
        #[source]
        source: io::Error,
    },
    /// The request itself is malformed; nothing was done.
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    /// QoS values that cannot be applied; the previous QoS stays in force.
    #[error("invalid QoS: {0}")]
    InvalidQos(String),
    /// A volume with this id is registered (or still draining after its handles were
    /// dropped).
    #[error("volume {0} is already registered with this scheduler")]
    VolumeExists(String),
    /// The engine refused the request because it has stopped.
    #[error("the I/O engine has stopped")]
    EngineStopped,
    /// The scheduler went away before the request completed.
    #[error("the I/O scheduler has shut down")]
    ShutDown,
    /// The engine could not be started.
    #[error("cannot start the I/O engine")]
    EngineSetup(#[source] EngineError),
    /// [`Scheduler::new`] was called outside a tokio runtime.
    #[error("the I/O scheduler must be created inside a tokio runtime")]
    NoRuntime,
}

impl From<SchedulerError> for io::Error {
    /// Lets code written against `std::io` (the block store's file trait) use the
    /// scheduler: disk errors keep their OS error code (so ENOSPC stays ENOSPC).
    fn from(e: SchedulerError) -> Self {
        match e {
            SchedulerError::Io { source, .. } => source,
            SchedulerError::InvalidRequest(_) | SchedulerError::InvalidQos(_) => {
                io::Error::new(io::ErrorKind::InvalidInput, e)
            }
            other => io::Error::other(other),
        }
    }
}

/// Marker error inside the completion of a request the engine refused.
#[derive(Debug, thiserror::Error)]
#[error("refused by the engine")]
struct Refused;

type Waiter = oneshot::Sender<Result<IoCompletion, SchedulerError>>;

/// A queued request.
struct Pending {
    request: IoRequest,
    class: IoClass,
    waiter: Waiter,
}

/// Per-volume data the scheduler keeps next to the queues.
struct VolumeMeta {
    id: String,
    qos: Qos,
    counters: Counters,
    /// False once every [`VolumeHandle`] is gone; the volume is removed when idle.
    attached: bool,
}

struct State {
    edf: Edf<Pending, VolumeMeta>,
    in_flight: usize,
    /// When the timer task should next run the queues (a throttled volume's tokens).
    timer_at: Option<u64>,
    by_id: HashMap<String, usize>,
    /// Background in-flight cap while foreground is active.
    background: BackgroundGate,
}

impl State {
    /// Removes a volume whose handles are gone once nothing of it is queued or running.
    fn reap_if_detached(&mut self, slot: usize) {
        let idle = self.edf.queued(slot) == 0
            && self
                .edf
                .meta(slot)
                .is_some_and(|m| !m.attached && m.counters.in_flight == 0);
        if idle {
            if let Some(id) = self.edf.meta(slot).map(|m| m.id.clone()) {
                self.by_id.remove(&id);
            }
            self.edf.remove_volume(slot);
        }
    }
}

struct Inner {
    state: Mutex<State>,
    engine: Box<dyn IoEngine>,
    clock: Arc<dyn Clock>,
    depth: usize,
    budgets: [u64; IoClass::COUNT],
    /// The configured background limits (the piece size is read without the lock).
    background: BackgroundLimits,
    timer: Arc<Notify>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Let the timer task notice it has nothing left to serve.
        self.timer.notify_one();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug, but the queues themselves stay
        // consistent between statements; keep serving rather than fail every volume.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves as many requests as the depth allows from the queues to the engine.
    fn pump(self: &Arc<Self>) {
        loop {
            let picked = {
                let mut st = self.lock();
                self.pick_dispatchable(&mut st)
            };
            if !self.hand_over(picked) {
                return;
            }
            // Refused requests freed their depth slots; dispatch (and so fail) the rest
            // iteratively rather than recursing from each completion.
        }
    }

    /// Takes from the queues what may go to the engine now (depth, tokens, the
    /// background cap), counting it as in flight. Called with the lock held by whoever
    /// just changed the queues, so a request costs one lock round per event.
    fn pick_dispatchable(&self, st: &mut State) -> Picked {
        let mut picked = Picked::default();
        let now = self.clock.now_ns();
        let mut dropped = Vec::new();
        while st.in_flight < self.depth {
            let background = st.background.admits_background(now);
            match st
                .edf
                .pick(now, background, |p| !p.waiter.is_closed(), &mut dropped)
            {
                Pick::Dispatch { volume, entry } => {
                    st.in_flight += 1;
                    st.background.dispatched(entry.payload.class);
                    if let Some(meta) = st.edf.meta_mut(volume) {
                        meta.counters.in_flight += 1;
                    }
                    picked.batch.push((volume, entry));
                }
                Pick::WaitUntil(at) => {
                    if st.timer_at.is_none_or(|t| at < t) {
                        st.timer_at = Some(at);
                        picked.arm_timer = true;
                    }
                    break;
                }
                Pick::Idle => break,
            }
        }
        for (volume, _) in dropped {
            if let Some(meta) = st.edf.meta_mut(volume) {
                meta.counters.cancelled_ops += 1;
            }
            st.reap_if_detached(volume);
        }
        picked
    }

    /// Hands picked requests to the engine, outside the lock. Returns whether the
    /// engine refused any (their slots are free again and the queues need a pump).
    fn hand_over(self: &Arc<Self>, picked: Picked) -> bool {
        if picked.arm_timer {
            self.timer.notify_one();
        }
        let mut refused = false;
        for (volume, entry) in picked.batch {
            let Pending {
                request,
                class,
                waiter,
            } = entry.payload;
            let (op, offset) = (request.kind(), request.offset());
            let done_info = Done {
                volume,
                class,
                deadline: entry.deadline_ns,
                op,
                offset,
            };
            let inner = Arc::clone(self);
            let done: engine::Completer = Box::new(move |res| {
                inner.on_complete(done_info, waiter, res);
            });
            let op = EngineOp {
                request,
                max_transfer: self.background.max_transfer_for(class),
                done,
            };
            if let Err(rejected) = self.engine.submit(op) {
                refused = true;
                (rejected.op.done)(Err(io::Error::other(Refused)));
            }
        }
        refused
    }

    fn on_complete(self: &Arc<Self>, info: Done, waiter: Waiter, res: io::Result<IoCompletion>) {
        let now = self.clock.now_ns();
        let refused = matches!(&res, Err(e) if e.get_ref().is_some_and(|i| i.is::<Refused>()));
        let result = match res {
            Ok(c) => Ok(c),
            Err(_) if refused => Err(SchedulerError::EngineStopped),
            Err(source) => Err(SchedulerError::Io {
                op: info.op,
                offset: info.offset,
                source,
            }),
        };
        let picked = {
            let mut st = self.lock();
            st.in_flight = st.in_flight.saturating_sub(1);
            st.background.completed(info.class, now);
            let ok_bytes = result.as_ref().ok().map(|c| c.bytes as u64);
            if let Some(meta) = st.edf.meta_mut(info.volume) {
                meta.counters
                    .record_completion(ok_bytes, info.deadline, now);
            }
            st.reap_if_detached(info.volume);
            if refused {
                Picked::default()
            } else {
                self.pick_dispatchable(&mut st)
            }
        };
        // The waiter may be gone (future dropped); the result is then discarded. It is
        // told before the next requests are handed over, so it can run meanwhile.
        let _ = waiter.send(result);
        if self.hand_over(picked) {
            self.pump();
        }
    }
}

/// Requests taken from the queues under the lock, to hand to the engine after it.
#[derive(Default)]
struct Picked {
    batch: Vec<(usize, Entry<Pending>)>,
    /// The earliest throttled volume's wake time moved: tell the timer task.
    arm_timer: bool,
}

/// What a completion needs to know about its request.
#[derive(Clone, Copy)]
struct Done {
    volume: usize,
    class: IoClass,
    deadline: u64,
    op: OpKind,
    offset: u64,
}

/// Wakes the queues when a throttled volume's tokens come due. Holds only a weak
/// reference, so it ends when the scheduler and all handles are gone.
async fn run_timer(weak: Weak<Inner>, notify: Arc<Notify>) {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let wait = {
            let Some(inner) = weak.upgrade() else { return };
            let st = inner.lock();
            st.timer_at
                .map(|at| at.saturating_sub(inner.clock.now_ns()))
        };
        match wait {
            None => notified.await,
            Some(0) => {}
            Some(ns) => {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_nanos(ns)) => {}
                    () = &mut notified => {}
                }
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        inner.lock().timer_at = None;
        inner.pump();
    }
}

/// The I/O scheduler of one backing directory. Cheap to share behind an `Arc`; volume
/// handles keep it alive on their own.
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl Scheduler {
    /// Starts the configured engine and the timer task on the current tokio runtime.
    pub fn new(config: SchedulerConfig) -> Result<Self, SchedulerError> {
        let depth = config.queue_depth.clamp(1, uring::MAX_DEPTH);
        let engine: Box<dyn IoEngine> = match config.engine {
            // Threads with a ring of their own (data-plane shards) use it; every other
            // thread goes through the ring thread.
            EngineKind::IoUring => Box::new(LocalFirstEngine::new(Box::new(
                UringEngine::new(&config.name, depth).map_err(SchedulerError::EngineSetup)?,
            ))),
            EngineKind::Sync { threads } => Box::new(
                SyncEngine::new(&config.name, threads).map_err(SchedulerError::EngineSetup)?,
            ),
        };
        Self::with_engine(config, engine, Arc::new(MonotonicClock::new()))
    }

    /// Builds a scheduler over any engine and clock: for tests (a manual clock, an
    /// engine that holds requests) and for engines defined elsewhere.
    pub fn with_engine(
        config: SchedulerConfig,
        engine: Box<dyn IoEngine>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, SchedulerError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| SchedulerError::NoRuntime)?;
        let timer = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                edf: Edf::default(),
                in_flight: 0,
                timer_at: None,
                by_id: HashMap::new(),
                background: BackgroundGate::new(config.background),
            }),
            engine,
            clock,
            depth: config.queue_depth.clamp(1, uring::MAX_DEPTH) as usize,
            budgets: config.deadlines.as_ns(),
            background: config.background,
            timer: Arc::clone(&timer),
        });
        runtime.spawn(run_timer(Arc::downgrade(&inner), timer));
        Ok(Self { inner })
    }

    /// Registers a volume; all its I/O then goes through the returned handle. The
    /// volume stays registered while any clone of the handle lives (and until its
    /// last request finished after that).
    pub fn register_volume(
        &self,
        id: impl Into<String>,
        qos: Qos,
    ) -> Result<VolumeHandle, SchedulerError> {
        qos.validate()?;
        let id = id.into();
        let mut st = self.inner.lock();
        if st.by_id.contains_key(&id) {
            return Err(SchedulerError::VolumeExists(id));
        }
        let now = self.inner.clock.now_ns();
        let meta = VolumeMeta {
            id: id.clone(),
            qos: qos.clone(),
            counters: Counters::default(),
            attached: true,
        };
        let slot = st.edf.add_volume(&qos, meta, now);
        st.by_id.insert(id.clone(), slot);
        Ok(VolumeHandle {
            shared: Arc::new(VolumeShared {
                inner: Arc::clone(&self.inner),
                slot,
                id,
            }),
        })
    }

    /// Requests in flight in the engine across all volumes (at most the queue depth).
    pub fn in_flight(&self) -> usize {
        self.inner.lock().in_flight
    }

    /// Name of the engine in use, for logs and metrics.
    pub fn engine_name(&self) -> &'static str {
        self.inner.engine.name()
    }

    /// Runs the queues now, as the timer would; lets tests with a manual clock apply
    /// an advance without waiting for the timer.
    pub fn kick(&self) {
        self.inner.pump();
    }
}

struct VolumeShared {
    inner: Arc<Inner>,
    slot: usize,
    id: String,
}

impl Drop for VolumeShared {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        if let Some(meta) = st.edf.meta_mut(self.slot) {
            meta.attached = false;
        }
        st.reap_if_detached(self.slot);
    }
}

/// A registered volume: submits its I/O, changes its QoS, reads its counters.
/// Clones share the registration.
#[derive(Clone)]
pub struct VolumeHandle {
    shared: Arc<VolumeShared>,
}

impl fmt::Debug for VolumeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VolumeHandle")
            .field("id", &self.shared.id)
            .finish()
    }
}

impl VolumeHandle {
    /// The volume id it was registered with.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Whether the scheduler (the whole disk, any volume) has foreground I/O in flight
    /// or had some within the background limits' linger: background work that is not
    /// disk I/O (a copy stream's checksums and encoding) uses it to stay out of the
    /// CPU's way too.
    pub fn foreground_active(&self) -> bool {
        let inner = &self.shared.inner;
        let now = inner.clock.now_ns();
        inner.lock().background.foreground_active(now)
    }

    /// Queues `request` now and returns a future of its outcome. Dropping the future
    /// before dispatch cancels the request; after dispatch it only detaches.
    pub fn submit(&self, class: IoClass, request: IoRequest) -> Submission {
        Submission {
            state: match self.enqueue(class, request) {
                Ok(rx) => SubmissionState::Queued(rx),
                Err(e) => SubmissionState::Refused(Some(e)),
            },
        }
    }

    /// Queues `request` and waits for its outcome on the calling thread, for code that
    /// runs on plain threads (tools, benchmarks). The thread parks until the
    /// completion callback resolves the request, so it costs one wake-up, no polling.
    /// Must not run on a tokio worker thread, nor on a thread with a ring of its own
    /// (see the module doc).
    pub fn submit_blocking(
        &self,
        class: IoClass,
        request: IoRequest,
    ) -> Result<IoCompletion, SchedulerError> {
        crate::park::block_on(self.submit(class, request))
    }

    fn enqueue(
        &self,
        class: IoClass,
        request: IoRequest,
    ) -> Result<oneshot::Receiver<Result<IoCompletion, SchedulerError>>, SchedulerError> {
        request.validate()?;
        let inner = &self.shared.inner;
        let (tx, rx) = oneshot::channel();
        let bytes = request.data_bytes();
        let picked = {
            let mut st = inner.lock();
            let now = inner.clock.now_ns();
            let pending = Pending {
                request,
                class,
                waiter: tx,
            };
            st.edf
                .push(
                    self.shared.slot,
                    class,
                    bytes,
                    inner.budgets[class.index()],
                    pending,
                    now,
                )
                .map_err(|_| SchedulerError::ShutDown)?;
            st.background.queued(class, now);
            inner.pick_dispatchable(&mut st)
        };
        if inner.hand_over(picked) {
            inner.pump();
        }
        Ok(rx)
    }

    /// Replaces the volume's QoS. Queued requests stay queued in order; tokens earned
    /// so far carry over (clamped to the new burst).
    pub fn set_qos(&self, qos: Qos) -> Result<(), SchedulerError> {
        qos.validate()?;
        let inner = &self.shared.inner;
        {
            let mut st = inner.lock();
            let now = inner.clock.now_ns();
            st.edf.set_qos(self.shared.slot, &qos, now);
            if let Some(meta) = st.edf.meta_mut(self.shared.slot) {
                meta.qos = qos;
            }
        }
        // Lifted limits may let queued requests run now.
        inner.pump();
        Ok(())
    }

    /// The QoS in force.
    pub fn qos(&self) -> Qos {
        let st = self.shared.inner.lock();
        st.edf
            .meta(self.shared.slot)
            .map(|m| m.qos.clone())
            .unwrap_or_default()
    }

    /// A snapshot of the volume's counters.
    pub fn stats(&self) -> VolumeStats {
        let inner = &self.shared.inner;
        let st = inner.lock();
        let now = inner.clock.now_ns();
        let slot = self.shared.slot;
        st.edf.meta(slot).map_or_else(VolumeStats::default, |m| {
            m.counters
                .snapshot(st.edf.queued(slot), st.edf.throttled(slot, now))
        })
    }
}

/// The outcome of a request queued by [`VolumeHandle::submit`], as a future. A named
/// type (not `impl Future`) so the block store's file trait can return it without
/// boxing a future per I/O.
#[must_use = "dropping a submission before dispatch cancels its request"]
#[derive(Debug)]
pub struct Submission {
    state: SubmissionState,
}

#[derive(Debug)]
enum SubmissionState {
    Queued(oneshot::Receiver<Result<IoCompletion, SchedulerError>>),
    /// Refused before it was queued; the error is handed out once.
    Refused(Option<SchedulerError>),
}

impl Future for Submission {
    type Output = Result<IoCompletion, SchedulerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().state {
            SubmissionState::Queued(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(SchedulerError::ShutDown))),
            SubmissionState::Refused(e) => {
                Poll::Ready(Err(e.take().unwrap_or(SchedulerError::ShutDown)))
            }
        }
    }
}
