//! Rings owned by data-plane shard threads: disk I/O submitted and completed on the
//! thread that serves the request, without handing it to the ring thread.
//!
//! *Why.* Through the ring thread a 4 KiB request crosses threads twice (the submitting
//! task wakes the ring thread, whose completion wakes the task again). On small or
//! virtualised machines each wake of a sleeping thread costs an inter-processor
//! interrupt and tens of microseconds of scheduling delay, far more than the I/O's own
//! CPU cost. A shard thread runs a single-threaded tokio runtime; a [`LocalRing`]
//! installed on it takes the I/O submitted from that thread, and its completions are
//! reaped on the same thread when the ring's eventfd becomes readable, so a request
//! is read from the socket, stored, and answered without leaving the thread.
//!
//! *How requests find it.* The scheduler's engine is a [`LocalFirstEngine`]: an
//! operation dispatched on a thread with an installed ring goes to that ring; on any
//! other thread (blocking callers, background copies, the scheduler's timer task) it
//! goes to the fallback engine, the ring thread. The scheduler itself (queues, token
//! buckets, deadlines, depth) is unchanged and still shared by every thread.
//!
//! *Rules.* Nothing may block the shard thread while it waits for its own ring: the
//! completions that would release it are reaped by that thread. The data plane only
//! uses the store's async path there. Completion callbacks are never called from
//! [`LocalRing::submit`] (the scheduler submits while holding its lock, and callbacks
//! take it): an operation that fails at once is reported by the next reap, which a
//! write to the eventfd triggers.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::super::engine::{EngineError, EngineOp, IoEngine, Rejected};
use super::core::{build_ring, RingCore};

/// `IORING_ENTER_GETEVENTS`: with deferred task work, completions are only processed
/// by an enter carrying it.
const ENTER_GETEVENTS: u32 = 1;

/// No `user_data` other than operation slots is used on a local ring.
const NO_TOKEN: u64 = u64::MAX;

thread_local! {
    static LOCAL: RefCell<Option<Rc<LocalRing>>> = const { RefCell::new(None) };
}

/// The io_uring of one shard thread. Created with [`LocalRing::install`] inside the
/// shard's single-threaded runtime, which must also drive [`LocalRing::run`]; outside
/// this module, [`run_with_local_ring`] does both.
pub(crate) struct LocalRing {
    core: RefCell<RingCore>,
    /// Operations that found the ring full; started as completions make room.
    backlog: RefCell<VecDeque<EngineOp>>,
    /// Registered with the ring: signalled when completions are ready to be reaped.
    eventfd: AsyncFd<OwnedFd>,
    /// Set when the ring failed; the thread then falls back to the ring thread.
    failed: Cell<bool>,
}

impl LocalRing {
    /// Creates this thread's ring (at most `depth` operations in flight) and routes
    /// every [`LocalFirstEngine`] submission made on this thread to it. Call inside a
    /// current-thread tokio runtime (the eventfd is registered with its reactor).
    pub(crate) fn install(depth: u32) -> Result<Rc<LocalRing>, EngineError> {
        let depth = depth.clamp(1, super::MAX_DEPTH);
        let ring = build_ring(depth).map_err(EngineError::Setup)?;
        // SAFETY: `eventfd` has no memory-safety preconditions; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(EngineError::Setup(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly created, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter()
            .register_eventfd(fd.as_raw_fd())
            .map_err(EngineError::Setup)?;
        // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which keeps it open and
        // unchanged until it is dropped.
        let eventfd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| EngineError::Setup(e.into()))?;
        let local = Rc::new(LocalRing {
            core: RefCell::new(RingCore::new(ring, depth as usize)),
            backlog: RefCell::new(VecDeque::new()),
            eventfd,
            failed: Cell::new(false),
        });
        LOCAL.with(|l| *l.borrow_mut() = Some(Rc::clone(&local)));
        Ok(local)
    }

    /// Reaps completions whenever the ring signals them, until the thread's ring is
    /// uninstalled or fails. Drive it on the shard's runtime for as long as I/O may be
    /// submitted there.
    pub(crate) async fn run(self: Rc<Self>) {
        while !self.failed.get() {
            let mut guard = match self.eventfd.readable().await {
                Ok(guard) => guard,
                Err(e) => {
                    self.fail(io::Error::other(format!("eventfd poll failed: {e}")));
                    return;
                }
            };
            let mut counter = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a local buffer from an eventfd this
            // ring owns; the result is only inspected for failure (EAGAIN: drained).
            let n = unsafe {
                libc::read(
                    self.eventfd.get_ref().as_raw_fd(),
                    counter.as_mut_ptr().cast(),
                    counter.len(),
                )
            };
            if n < 0 {
                guard.clear_ready();
            }
            drop(guard);
            self.reap();
        }
    }

    /// Removes this thread's ring (a shard stopping), so later submissions from the
    /// thread go to the fallback engine.
    pub(crate) fn uninstall() {
        LOCAL.with(|l| l.borrow_mut().take());
    }

    /// Number of operations the kernel holds.
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.core.borrow().in_flight()
    }

    fn submit(&self, op: EngineOp) {
        let mut core = self.core.borrow_mut();
        if !core.has_room() {
            self.backlog.borrow_mut().push_back(op);
            return;
        }
        core.start(op);
        // Submitted at once, one entry per call: batching the entries of the tasks
        // that are ready (one call, one doorbell) was measured and made 4 KiB random
        // reads slower, because the device then serves and completes them in
        // batches while the thread waits.
        if let Err(e) = submit_now(&mut core) {
            // Reported by the reaper, not here: the caller may hold the scheduler's
            // lock, which the callbacks take.
            self.mark_failed(&mut core, e);
        }
        // An operation refused before reaching the kernel, a completion posted during
        // the submission itself, or a failure, is delivered by the reaper: make it look.
        if core.has_finished() || !core.ring.completion().is_empty() {
            self.kick();
        }
    }

    /// Runs deferred completions, calls their callbacks, starts queued operations; on a
    /// failed ring, reports what it held and what waited for it.
    fn reap(&self) {
        loop {
            let finished = {
                let mut core = self.core.borrow_mut();
                if !self.failed.get() {
                    // SAFETY: a plain GETEVENTS enter without extra arguments.
                    let entered = unsafe {
                        core.ring
                            .submitter()
                            .enter::<libc::sigset_t>(0, 0, ENTER_GETEVENTS, None)
                    };
                    match entered {
                        Err(e) if !is_busy(&e) => self.mark_failed(&mut core, e),
                        _ => {
                            core.reap(NO_TOKEN);
                            let mut backlog = self.backlog.borrow_mut();
                            while core.has_room() {
                                match backlog.pop_front() {
                                    Some(op) => core.start(op),
                                    None => break,
                                }
                            }
                            drop(backlog);
                            if let Err(e) = submit_now(&mut core) {
                                self.mark_failed(&mut core, e);
                            }
                        }
                    }
                }
                core.take_finished()
            };
            if finished.is_empty() {
                break;
            }
            for (done, result) in finished {
                done(result);
            }
        }
        if self.failed.get() {
            self.drain_backlog();
        }
    }

    /// The ring failed: every operation it holds fails (reported by the next
    /// [`Self::reap`]), and the thread's later I/O goes to the fallback engine.
    fn mark_failed(&self, core: &mut RingCore, error: io::Error) {
        tracing::error!(error = %error, "shard io_uring failed; its thread falls back to the ring thread");
        self.failed.set(true);
        core.fail_all();
    }

    /// [`Self::mark_failed`] and report at once (only outside the scheduler's lock).
    fn fail(&self, error: io::Error) {
        self.mark_failed(&mut self.core.borrow_mut(), error);
        self.reap();
    }

    fn drain_backlog(&self) {
        let ops: Vec<EngineOp> = self.backlog.borrow_mut().drain(..).collect();
        for op in ops {
            (op.done)(Err(io::Error::other("the shard's io_uring failed")));
        }
    }

    fn kick(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a local buffer to an eventfd this ring owns. A
        // full counter (EAGAIN) already means "readable", which is all a kick wants.
        unsafe {
            libc::write(
                self.eventfd.get_ref().as_raw_fd(),
                one.as_ptr().cast(),
                one.len(),
            )
        };
    }
}

impl Drop for LocalRing {
    fn drop(&mut self) {
        // Unregistering is implicit: the ring closes with the core.
        if self.core.get_mut().in_flight() > 0 {
            tracing::warn!("a shard's io_uring closes with I/O in flight; its buffers are leaked");
        }
    }
}

/// Submits what the queue holds; a busy kernel (full completion queue, no memory)
/// leaves it queued for the next reap.
fn submit_now(core: &mut RingCore) -> io::Result<()> {
    if core.ring.submission().is_empty() {
        return Ok(());
    }
    match core.ring.submit() {
        Err(e) if !is_busy(&e) => Err(e),
        _ => Ok(()),
    }
}

/// Interrupted, or the kernel short of room (full completion queue, memory): try again
/// at the next reap.
fn is_busy(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

/// Runs `work` on this thread with an io_uring of the thread's own: every request the
/// scheduler dispatches on this thread goes to that ring and completes here, reaped
/// alongside `work`. The one way a thread gets a ring (data-plane shards, the
/// benchmark's stand-in for one). Call it inside a current-thread tokio runtime (the
/// ring's eventfd is registered with its reactor) and spawn `work`'s tasks on that
/// runtime. If the ring fails, `work` goes on with the thread's I/O on the ring thread;
/// when `work` ends (or this future is dropped) the ring is removed from the thread.
///
/// Nothing on this thread may park waiting for I/O (the store's blocking API, say):
/// only this thread reaps its ring.
pub async fn run_with_local_ring<F: Future>(depth: u32, work: F) -> Result<F::Output, EngineError> {
    let ring = LocalRing::install(depth)?;
    let _installed = Installed;
    let reaper = ring.run();
    tokio::pin!(reaper, work);
    tokio::select! {
        out = &mut work => Ok(out),
        () = &mut reaper => Ok(work.await),
    }
}

/// Removes the thread's ring when [`run_with_local_ring`] ends, also by unwinding or
/// when its future is dropped.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        LocalRing::uninstall();
    }
}

/// The scheduler's engine when shards may exist: operations go to the submitting
/// thread's [`LocalRing`] if it has one, else to `fallback` (the ring thread).
pub struct LocalFirstEngine {
    fallback: Box<dyn IoEngine>,
}

impl LocalFirstEngine {
    /// Wraps `fallback`, used by every thread without a ring of its own.
    pub fn new(fallback: Box<dyn IoEngine>) -> Self {
        Self { fallback }
    }
}

impl IoEngine for LocalFirstEngine {
    fn submit(&self, op: EngineOp) -> Result<(), Rejected> {
        let local = LOCAL.with(|l| l.borrow().as_ref().filter(|r| !r.failed.get()).cloned());
        match local {
            Some(ring) => {
                ring.submit(op);
                Ok(())
            }
            None => self.fallback.submit(op),
        }
    }

    fn name(&self) -> &'static str {
        self.fallback.name()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc};
    use std::thread::{self, ThreadId};
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::super::super::sync_engine::SyncEngine;
    use super::super::super::{AlignedBuf, IoCompletion, IoRequest};
    use super::*;
    use crate::scheduler::tests::open_direct;

    const BLOCK: usize = 4096;

    /// The ring thread's stand-in for these tests: the reference engine, counting what
    /// reaches it, so a test can tell which path an operation took.
    struct CountingFallback {
        inner: SyncEngine,
        submitted: Arc<AtomicUsize>,
    }

    impl IoEngine for CountingFallback {
        fn submit(&self, op: EngineOp) -> Result<(), Rejected> {
            self.submitted.fetch_add(1, Ordering::SeqCst);
            self.inner.submit(op)
        }
        fn name(&self) -> &'static str {
            "counting"
        }
    }

    fn engine() -> (Arc<LocalFirstEngine>, Arc<AtomicUsize>) {
        let submitted = Arc::new(AtomicUsize::new(0));
        let fallback = CountingFallback {
            inner: SyncEngine::new("fallback", 2).expect("threads"),
            submitted: Arc::clone(&submitted),
        };
        (
            Arc::new(LocalFirstEngine::new(Box::new(fallback))),
            submitted,
        )
    }

    type Outcome = (io::Result<IoCompletion>, ThreadId);

    /// Submits `request` and returns a receiver of its outcome and the thread that
    /// ran its callback.
    fn submit(engine: &dyn IoEngine, request: IoRequest) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        let op = EngineOp::new(
            request,
            Box::new(move |r| {
                let _ = tx.send((r, thread::current().id()));
            }),
        );
        assert!(engine.submit(op).is_ok(), "engine accepts the operation");
        rx
    }

    fn block(seed: u8) -> AlignedBuf {
        AlignedBuf::from_slice(&[seed; BLOCK]).expect("one block")
    }

    /// Runs `f` on a fresh thread with a current-thread runtime and a ring of `depth`
    /// installed, as a data-plane shard does, and returns what `f` returns.
    fn on_shard<T: Send + 'static>(
        depth: u32,
        f: impl FnOnce(Rc<LocalRing>) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
            + Send
            + 'static,
    ) -> T {
        thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let local = tokio::task::LocalSet::new();
            let out = rt.block_on(local.run_until(async move {
                let ring = LocalRing::install(depth).expect("io_uring available");
                let reaper = tokio::task::spawn_local(Rc::clone(&ring).run());
                let out = tokio::time::timeout(Duration::from_secs(30), f(Rc::clone(&ring)))
                    .await
                    .expect("operations complete");
                assert_eq!(ring.in_flight(), 0, "nothing left in the ring");
                reaper.abort();
                out
            }));
            LocalRing::uninstall();
            out
        })
        .join()
        .expect("shard thread")
    }

    #[test]
    fn a_shard_runs_its_io_on_its_own_ring_and_thread_beyond_its_depth() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = open_direct(&dir.path().join("f"));
        let (engine, fallback) = engine();
        let (e, f) = (Arc::clone(&engine), Arc::clone(&file));
        let (shard, data) = on_shard(2, move |_ring| {
            Box::pin(async move {
                let me = thread::current().id();
                // 16 writes in flight on a ring of depth 2: 14 wait in the backlog.
                let writes: Vec<_> = (0..16u8)
                    .map(|i| {
                        submit(
                            e.as_ref(),
                            IoRequest::Write {
                                file: Arc::clone(&f),
                                offset: u64::from(i) * BLOCK as u64,
                                buf: block(i + 1),
                            },
                        )
                    })
                    .collect();
                for w in writes {
                    let (r, t) = w.await.expect("callback called");
                    assert_eq!(r.expect("write").bytes, BLOCK);
                    assert_eq!(t, me, "completed on the submitting thread");
                }
                let mut data = Vec::new();
                for i in 0..16u64 {
                    let (r, t) = submit(
                        e.as_ref(),
                        IoRequest::Read {
                            file: Arc::clone(&f),
                            offset: i * BLOCK as u64,
                            len: BLOCK,
                        },
                    )
                    .await
                    .expect("callback called");
                    assert_eq!(t, me);
                    data.push(r.expect("read").buf.expect("buffer").to_vec());
                }
                (me, data)
            })
        });
        for (i, d) in data.iter().enumerate() {
            assert!(d.iter().all(|&b| b == i as u8 + 1), "block {i} reads back");
        }
        assert_eq!(fallback.load(Ordering::SeqCst), 0, "no operation fell back");

        // A thread without a ring goes to the fallback engine.
        let (tx, rx) = mpsc::channel();
        let op = EngineOp::new(
            IoRequest::Fdatasync {
                file: Arc::clone(&file),
            },
            Box::new(move |r| {
                let _ = tx.send((r.is_ok(), thread::current().id()));
            }),
        );
        assert!(engine.submit(op).is_ok());
        let (ok, t) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("fallback runs it");
        assert!(ok);
        assert_ne!(t, shard);
        assert_eq!(fallback.load(Ordering::SeqCst), 1);
        assert_eq!(
            Arc::strong_count(&file),
            1,
            "every engine released the file"
        );
    }

    #[test]
    fn callbacks_may_submit_to_the_same_ring_and_early_failures_are_reported() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = open_direct(&dir.path().join("f"));
        let (engine, fallback) = engine();
        let (e, f) = (Arc::clone(&engine), Arc::clone(&file));
        let (chained, refused) = on_shard(1, move |_ring| {
            Box::pin(async move {
                // The scheduler dispatches the next request from a completion callback.
                let (tx, rx) = oneshot::channel();
                let (e2, f2) = (Arc::clone(&e), Arc::clone(&f));
                let first = EngineOp::new(
                    IoRequest::Write {
                        file: Arc::clone(&f),
                        offset: 0,
                        buf: block(9),
                    },
                    Box::new(move |r| {
                        assert!(r.is_ok(), "first write");
                        let next = EngineOp::new(
                            IoRequest::Read {
                                file: f2,
                                offset: 0,
                                len: BLOCK,
                            },
                            Box::new(move |r| {
                                let _ = tx.send(r);
                            }),
                        );
                        assert!(e2.submit(next).is_ok());
                    }),
                );
                assert!(e.submit(first).is_ok());
                let chained = rx.await.expect("chained read completes");
                // Refused before reaching the kernel: reported, not lost.
                let (refused, _) = submit(
                    e.as_ref(),
                    IoRequest::PunchHole {
                        file: Arc::clone(&f),
                        offset: u64::MAX - 1,
                        len: 4096,
                    },
                )
                .await
                .expect("callback called");
                (chained, refused)
            })
        });
        let data = chained.expect("read").buf.expect("buffer").to_vec();
        assert!(data.iter().all(|&b| b == 9));
        assert!(refused.is_err(), "an invalid range fails");
        assert_eq!(fallback.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_failed_ring_reports_what_it_held_and_its_thread_falls_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = open_direct(&dir.path().join("f"));
        let (engine, fallback) = engine();
        let (e, f) = (Arc::clone(&engine), Arc::clone(&file));
        let (before, at_failure, after, shard, after_thread) = on_shard(4, move |ring| {
            Box::pin(async move {
                let write = |seed: u8| IoRequest::Write {
                    file: Arc::clone(&f),
                    offset: 0,
                    buf: block(seed),
                };
                let (before, _) = submit(e.as_ref(), write(1)).await.expect("callback");
                // A real failure of `io_uring_enter`, not a stand-in: the ring's
                // descriptor now names /dev/null (the mappings keep the ring itself
                // alive), so every later enter fails with EOPNOTSUPP.
                let null = std::fs::File::open("/dev/null").expect("/dev/null");
                let ring_fd = ring.core.borrow().ring.as_raw_fd();
                // SAFETY: replaces a descriptor this ring owns with another open one;
                // the ring closes it (now /dev/null) when dropped.
                assert!(unsafe { libc::dup2(null.as_raw_fd(), ring_fd) } >= 0);
                // Started on the ring, then its submission fails: reported as failed
                // (by the reaper, not inside `submit`), never lost.
                let (at_failure, _) = submit(e.as_ref(), write(2)).await.expect("callback");
                // The thread's later I/O goes to the fallback engine and succeeds.
                let (after, t) = submit(e.as_ref(), write(3)).await.expect("callback");
                (before, at_failure, after, thread::current().id(), t)
            })
        });
        assert!(before.is_ok(), "the ring worked before the fault");
        let err = at_failure.expect_err("the operation held by the failed ring fails");
        assert!(err.to_string().contains("io_uring"), "{err}");
        assert_eq!(after.expect("fallback write").bytes, BLOCK);
        assert_ne!(after_thread, shard, "completed by the fallback engine");
        assert_eq!(fallback.load(Ordering::SeqCst), 1);
        let back = std::fs::read(dir.path().join("f")).expect("read back");
        assert!(
            back[..BLOCK].iter().all(|&b| b == 3),
            "the fallback's write landed"
        );
    }

    #[test]
    fn run_with_local_ring_routes_the_threads_io_while_work_runs_and_removes_the_ring_after() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = open_direct(&dir.path().join("f"));
        let (engine, fallback) = engine();
        let (e, f) = (Arc::clone(&engine), Arc::clone(&file));
        let (inside, completed_on, shard, after) = thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let write = |seed: u8| IoRequest::Write {
                file: Arc::clone(&f),
                offset: 0,
                buf: block(seed),
            };
            let work = async {
                // A spawned task, as a shard runs each connection.
                let task = tokio::spawn(submit(e.as_ref(), write(1)));
                task.await.expect("task").expect("callback called")
            };
            let served = rt.block_on(run_with_local_ring(4, work));
            let (inside, completed_on) = served.expect("io_uring available");
            let inside = inside.map(|c| c.bytes);
            // The ring is gone with `work`: the thread's I/O now takes the fallback.
            // (A ring left installed would hold it forever: nothing reaps it now.)
            let after = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(30), submit(e.as_ref(), write(2))).await
            });
            let (after, _) = after
                .expect("the write completes")
                .expect("callback called");
            (
                inside,
                completed_on,
                thread::current().id(),
                after.map(|c| c.bytes),
            )
        })
        .join()
        .expect("shard thread");
        assert_eq!(inside.expect("write on the thread's ring"), BLOCK);
        assert_eq!(after.expect("write on the fallback"), BLOCK);
        assert_eq!(
            completed_on, shard,
            "completed on the thread that ran `work`"
        );
        assert_eq!(
            fallback.load(Ordering::SeqCst),
            1,
            "only the write after `work` ended fell back"
        );
    }
}
