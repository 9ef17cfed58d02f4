//! The io_uring engine: one thread owning one ring, fed over a channel, plus the rings
//! of data-plane shard threads.
//!
//! Layout: `core` (the slot table and entry building every ring shares), this module
//! (the ring thread, [`UringEngine`]), `local` ([`run_with_local_ring`], a ring owned by a
//! shard thread, and [`LocalFirstEngine`], which sends I/O to the submitting thread's ring if
//! it has one and to the ring thread otherwise; the scheduler uses it).
//!
//! *Design of the ring thread.* Callers (the scheduler, usually from tokio tasks or from completion
//! callbacks) push [`EngineOp`]s into an unbounded channel and return at once. The ring
//! thread moves operations from the channel into the submission queue while fewer than
//! `depth` are in flight, submits, waits for completions, and calls each operation's
//! callback. Each wake-up submits every queued operation with one system call and
//! reaps every completion that is ready. When it is about to sleep, it keeps a read of
//! an `eventfd` outstanding in the ring and raises a "needs wake" flag; a submitter that
//! finds the flag raised writes the eventfd, so a busy ring costs no extra system call
//! per request. (Waking it only with few operations in flight, and waiting for several
//! completions per wake-up with `IORING_FEAT_MIN_TIMEOUT`, were tried: no measurable
//! gain on the 2-core test VM, and a new request could wait behind slow ones, so
//! neither is done.)
//!
//! *Pieces.* An operation with `max_transfer` (background I/O) is issued as
//! consecutive entries of at most that size, each after the previous completed, the
//! same way a short transfer continues.
//!
//! *Ownership.* Every in-flight operation lives in a slot of its ring's table,
//! holding its `Arc<File>` (so the fd cannot be closed and reused) and its
//! [`AlignedBuf`](super::AlignedBuf) (so the memory cannot be freed) until its completion arrives. The slot
//! index is the entry's `user_data`. Short transfers and `EINTR`/`EAGAIN` resubmit the
//! same slot for the remainder. If the ring ever fails or the thread unwinds, buffers
//! the kernel may still hold are leaked on purpose rather than freed.
//!
//! *Assumptions.* Linux 5.6 or newer (`IORING_OP_READ`/`WRITE`/`FALLOCATE`); checked
//! with a probe at start. `IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN` (6.1) are used
//! when the kernel has them. Files and buffers are not registered with the ring: files
//! come and go with volumes (one `io_uring_register` per open would cost what it saves),
//! and fixed buffers would force the store to allocate from a ring-owned pool.

mod core;
mod local;

use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle, ThreadId};

use io_uring::{opcode, types, IoUring};

use self::core::{build_ring, RingCore};
use super::engine::{EngineError, EngineOp, IoEngine, Rejected};

pub use local::{run_with_local_ring, LocalFirstEngine};

/// `user_data` of the eventfd read; operation slots use their index.
const WAKE_TOKEN: u64 = u64::MAX;

/// Largest in-flight depth accepted; deeper queues only add latency on one device.
pub const MAX_DEPTH: u32 = 4096;

/// Wakes the ring thread out of `io_uring_enter`.
struct Waker {
    /// An eventfd; the ring thread keeps a read of it in flight while it may sleep.
    eventfd: File,
    /// Raised by the ring thread before sleeping; a submitter that lowers it writes
    /// the eventfd.
    needs_wake: AtomicBool,
}

impl Waker {
    fn wake(&self) {
        if let Err(e) = (&self.eventfd).write_all(&1u64.to_ne_bytes()) {
            // Only an overflowing counter (2^64 - 2 pending wakes) can fail.
            tracing::error!(error = %e, "cannot wake the io_uring thread");
        }
    }
}

/// io_uring-backed [`IoEngine`]: one ring and one thread, at most `depth` operations in
/// flight. Why one thread per backing directory: a ring is single-issuer by design and
/// one device rarely needs more than one submitting core.
pub struct UringEngine {
    tx: Option<mpsc::Sender<EngineOp>>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
    thread_id: ThreadId,
}

impl UringEngine {
    /// Creates the ring (in its own thread, named after `name`) with room for `depth`
    /// operations in flight (clamped to `1..=MAX_DEPTH`). Fails if io_uring is
    /// unavailable or lacks an opcode the engine uses.
    pub fn new(name: &str, depth: u32) -> Result<Self, EngineError> {
        let depth = depth.clamp(1, MAX_DEPTH);
        // SAFETY: `eventfd` has no memory-safety preconditions; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(EngineError::Setup(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly created, valid descriptor that nothing else owns.
        let eventfd = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        let waker = Arc::new(Waker {
            eventfd,
            needs_wake: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let thread_waker = Arc::clone(&waker);
        let thread = thread::Builder::new()
            .name(format!("uring-{name}"))
            .spawn(move || {
                let ring = match build_ring(depth) {
                    Ok(ring) => ring,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                RingThread::new(ring, rx, thread_waker, depth as usize).run();
            })
            .map_err(EngineError::Setup)?;
        let thread_id = thread.thread().id();
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                tx: Some(tx),
                waker,
                thread: Some(thread),
                thread_id,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(EngineError::Setup(e))
            }
            Err(_) => Err(EngineError::Setup(io::Error::other(
                "the io_uring thread exited during setup",
            ))),
        }
    }
}

impl IoEngine for UringEngine {
    fn submit(&self, op: EngineOp) -> Result<(), Rejected> {
        Rejected::send_or_stopped(self.tx.as_ref(), op)?;
        if self.waker.needs_wake.swap(false, Ordering::SeqCst) {
            self.waker.wake();
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Closing the channel tells the thread to finish what is in flight and exit;
        // the wake gets it out of `io_uring_enter` if it sleeps.
        drop(self.tx.take());
        self.waker.wake();
        if thread::current().id() == self.thread_id {
            // Dropped from a completion callback on the ring thread itself.
            return;
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the io_uring thread panicked");
            }
        }
    }
}

/// State of the ring thread. Not `Send`: it is created and dropped on that thread.
struct RingThread {
    core: RingCore,
    rx: Option<mpsc::Receiver<EngineOp>>,
    waker: Arc<Waker>,
    /// Target of the eventfd read: from `Box::into_raw`, freed in `Drop` unless a read
    /// into it may still be in the kernel.
    wake_buf: *mut [u8; 8],
    wake_armed: bool,
}

impl RingThread {
    fn new(ring: IoUring, rx: mpsc::Receiver<EngineOp>, waker: Arc<Waker>, depth: usize) -> Self {
        Self {
            core: RingCore::new(ring, depth),
            rx: Some(rx),
            waker,
            wake_buf: Box::into_raw(Box::new([0u8; 8])),
            wake_armed: false,
        }
    }

    fn run(mut self) {
        let mut disconnected = false;
        loop {
            while !disconnected && self.core.has_room() {
                match self.try_recv() {
                    Some(Ok(op)) => self.core.start(op),
                    Some(Err(())) => disconnected = true,
                    None => break,
                }
            }
            self.call_finished();
            if disconnected && self.core.in_flight() == 0 {
                break;
            }
            if !self.wake_armed {
                if let Err(e) = self.arm_wake() {
                    self.fail_all(e);
                    return;
                }
            }
            if !disconnected && self.core.has_room() {
                // Announce the coming sleep, then look once more: a request sent
                // before the flag went up is seen here, one sent after writes the
                // eventfd.
                self.waker.needs_wake.store(true, Ordering::SeqCst);
                match self.try_recv() {
                    Some(Ok(op)) => {
                        self.waker.needs_wake.store(false, Ordering::SeqCst);
                        self.core.start(op);
                        continue;
                    }
                    Some(Err(())) => {
                        disconnected = true;
                        continue;
                    }
                    None => {}
                }
            }
            if let Err(e) = self.submit_and_wait() {
                self.fail_all(e);
                return;
            }
            self.waker.needs_wake.store(false, Ordering::SeqCst);
            self.reap();
        }
        self.shutdown();
    }

    /// `Some(Ok)` an op, `Some(Err)` the channel closed, `None` nothing waiting.
    fn try_recv(&self) -> Option<Result<EngineOp, ()>> {
        let rx = self.rx.as_ref()?;
        match rx.try_recv() {
            Ok(op) => Some(Ok(op)),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => Some(Err(())),
        }
    }

    fn call_finished(&mut self) {
        for (done, result) in self.core.take_finished() {
            done(result);
        }
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let entry = opcode::Read::new(
            types::Fd(self.waker.eventfd.as_raw_fd()),
            self.wake_buf.cast::<u8>(),
            8,
        )
        .build()
        .user_data(WAKE_TOKEN);
        self.core.push_entry(&entry)?;
        self.wake_armed = true;
        Ok(())
    }

    fn submit_and_wait(&mut self) -> io::Result<()> {
        loop {
            match self.core.ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Completion queue full or kernel short of memory: reap, then retry.
                    Some(libc::EBUSY) | Some(libc::EAGAIN) => return Ok(()),
                    _ => return Err(e),
                },
            }
        }
    }

    fn reap(&mut self) {
        if self.core.reap(WAKE_TOKEN) {
            self.wake_armed = false;
        }
        self.call_finished();
    }

    /// The ring failed: no operation can be trusted to complete. Tell every waiter,
    /// leak what the kernel may still touch, refuse new work.
    fn fail_all(&mut self, error: io::Error) {
        tracing::error!(error = %error, "io_uring failed; the engine stops");
        let rx = self.rx.take();
        self.core.fail_all();
        self.call_finished();
        if let Some(rx) = rx {
            while let Ok(op) = rx.try_recv() {
                (op.done)(Err(io::Error::other("the io_uring engine failed")));
            }
        }
        // `wake_armed` stays as it is, so `Drop` leaks the wake buffer if needed.
    }

    /// Normal exit: nothing in flight but possibly the eventfd read; complete it so
    /// its buffer can be freed.
    fn shutdown(&mut self) {
        if self.wake_armed {
            self.waker.wake();
            for _ in 0..1000 {
                if !self.wake_armed {
                    break;
                }
                if self.submit_and_wait().is_err() {
                    break;
                }
                self.reap();
            }
        }
    }
}

impl Drop for RingThread {
    fn drop(&mut self) {
        if !self.wake_armed {
            // SAFETY: `wake_buf` came from `Box::into_raw` in `new`, is freed only here,
            // and no eventfd read into it is outstanding (`wake_armed` is false).
            drop(unsafe { Box::from_raw(self.wake_buf) });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::super::sync_engine::SyncEngine;
    use super::super::{AlignedBuf, IoCompletion, IoRequest};
    use super::*;
    use crate::scheduler::tests::open_direct;

    const BLOCK: usize = 4096;

    /// Runs one request to completion on `engine`, waiting on a channel (bounded by a
    /// generous timeout so a bug shows as a failure, not a hung test run).
    fn run(engine: &dyn IoEngine, request: IoRequest) -> io::Result<IoCompletion> {
        run_in_pieces(engine, request, None)
    }

    /// [`run`] with a piece size (`EngineOp::max_transfer`).
    fn run_in_pieces(
        engine: &dyn IoEngine,
        request: IoRequest,
        max_transfer: Option<usize>,
    ) -> io::Result<IoCompletion> {
        let (tx, rx) = mpsc::channel();
        let op = EngineOp {
            max_transfer,
            request,
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        };
        if let Err(rejected) = engine.submit(op) {
            return Err(io::Error::other(rejected.error));
        }
        rx.recv_timeout(Duration::from_secs(30))
            .expect("operation completes")
    }

    fn pattern(len: usize, seed: u8) -> AlignedBuf {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        AlignedBuf::from_slice(&data).expect("small buffer")
    }

    fn engines(name: &str, depth: u32) -> Vec<Box<dyn IoEngine>> {
        vec![
            Box::new(UringEngine::new(name, depth).expect("io_uring available")),
            Box::new(SyncEngine::new(name, 2).expect("threads")),
        ]
    }

    #[test]
    fn write_read_sync_punch_round_trip() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (i, engine) in engines("rt", 8).iter().enumerate() {
            let file = open_direct(&dir.path().join(format!("f{i}")));
            let data = pattern(3 * BLOCK, 7);
            let expected = data.to_vec();
            let done = run(
                engine.as_ref(),
                IoRequest::Write {
                    file: Arc::clone(&file),
                    offset: BLOCK as u64,
                    buf: data,
                },
            )
            .expect("write");
            assert_eq!(done.bytes, 3 * BLOCK);
            let sync = IoRequest::Fdatasync {
                file: Arc::clone(&file),
            };
            run(engine.as_ref(), sync).expect("fdatasync");
            run(
                engine.as_ref(),
                IoRequest::Fsync {
                    file: Arc::clone(&file),
                },
            )
            .expect("fsync");
            let read = |offset: u64, len: usize| {
                run(
                    engine.as_ref(),
                    IoRequest::Read {
                        file: Arc::clone(&file),
                        offset,
                        len,
                    },
                )
                .expect("read")
                .buf
                .expect("read returns a buffer")
                .to_vec()
            };
            assert_eq!(read(BLOCK as u64, 3 * BLOCK), expected);
            let punch = IoRequest::PunchHole {
                file: Arc::clone(&file),
                offset: 2 * BLOCK as u64,
                len: BLOCK as u64,
            };
            run(engine.as_ref(), punch).expect("punch hole");
            let after = read(BLOCK as u64, 3 * BLOCK);
            assert_eq!(&after[..BLOCK], &expected[..BLOCK]);
            assert!(after[BLOCK..2 * BLOCK].iter().all(|&b| b == 0));
            assert_eq!(&after[2 * BLOCK..], &expected[2 * BLOCK..]);
            assert_eq!(
                file.metadata().expect("stat").len(),
                4 * BLOCK as u64,
                "punching keeps the size ({})",
                engine.name()
            );
            assert_eq!(Arc::strong_count(&file), 1, "engine released the file");
        }
    }

    #[test]
    fn reads_past_end_of_file_are_short_not_errors() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (i, engine) in engines("eof", 8).iter().enumerate() {
            let file = open_direct(&dir.path().join(format!("f{i}")));
            let write = IoRequest::Write {
                file: Arc::clone(&file),
                offset: 0,
                buf: pattern(2 * BLOCK, 1),
            };
            run(engine.as_ref(), write).expect("write");
            let read = |offset: u64, len: usize| {
                run(
                    engine.as_ref(),
                    IoRequest::Read {
                        file: Arc::clone(&file),
                        offset,
                        len,
                    },
                )
                .expect("read past EOF is not an error")
            };
            // Straddling EOF: only the existing block comes back.
            let done = read(BLOCK as u64, 4 * BLOCK);
            assert_eq!(done.bytes, BLOCK, "{}", engine.name());
            let buf = done.buf.expect("buffer");
            assert_eq!(buf.len(), BLOCK);
            assert_eq!(
                buf.to_vec(),
                pattern(2 * BLOCK, 1).as_slice()[BLOCK..].to_vec()
            );
            // Entirely past EOF: nothing.
            assert_eq!(read(8 * BLOCK as u64, BLOCK).bytes, 0);
            // EOF at an unaligned size: the O_DIRECT remainder read is refused with
            // EINVAL by the kernel, which the engine must treat as end of file.
            file.set_len(BLOCK as u64 + 100).expect("truncate");
            let done = read(0, 4 * BLOCK);
            assert_eq!(done.bytes, BLOCK + 100, "{}", engine.name());
        }
    }

    #[test]
    fn more_ops_than_depth_all_complete() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = open_direct(&dir.path().join("f"));
        let engine = UringEngine::new("deep", 4).expect("io_uring available");
        let ops = 512u64;
        let (tx, rx) = mpsc::channel();
        for i in 0..ops {
            let tx = tx.clone();
            let op = EngineOp {
                max_transfer: None,
                request: IoRequest::Write {
                    file: Arc::clone(&file),
                    offset: i * BLOCK as u64,
                    buf: pattern(BLOCK, i as u8),
                },
                done: Box::new(move |r| {
                    let _ = tx.send((i, r.map(|c| c.bytes)));
                }),
            };
            engine.submit(op).expect("engine running");
        }
        drop(tx);
        let mut seen = vec![false; ops as usize];
        for _ in 0..ops {
            let (i, r) = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("every op completes");
            assert_eq!(r.expect("write succeeds"), BLOCK);
            seen[i as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        for i in [0, 1, 255, 511] {
            let done = run(
                &engine,
                IoRequest::Read {
                    file: Arc::clone(&file),
                    offset: i * BLOCK as u64,
                    len: BLOCK,
                },
            )
            .expect("read");
            assert_eq!(done.buf.expect("buf"), pattern(BLOCK, i as u8));
        }
    }

    #[test]
    fn dropping_the_engine_completes_in_flight_ops() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = open_direct(&dir.path().join("f"));
        let engine = UringEngine::new("drop", 8).expect("io_uring available");
        let (tx, rx) = mpsc::channel();
        for i in 0..64u64 {
            let tx = tx.clone();
            let op = EngineOp {
                max_transfer: None,
                request: IoRequest::Write {
                    file: Arc::clone(&file),
                    offset: i * BLOCK as u64,
                    buf: pattern(BLOCK, 3),
                },
                done: Box::new(move |r| {
                    let _ = tx.send(r.is_ok());
                }),
            };
            engine.submit(op).expect("engine running");
        }
        drop(tx);
        drop(engine); // joins the ring thread after everything completed
        let results: Vec<bool> = rx.iter().collect();
        assert_eq!(results.len(), 64);
        assert!(results.iter().all(|&ok| ok));
        assert_eq!(Arc::strong_count(&file), 1);
    }

    #[test]
    fn errors_are_reported_with_the_os_code() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = open_direct(&dir.path().join("f"));
        let engine = UringEngine::new("err", 8).expect("io_uring available");
        let write = IoRequest::Write {
            file: Arc::clone(&file),
            offset: 0,
            buf: pattern(2 * BLOCK, 0),
        };
        run(&engine, write).expect("write");
        // O_DIRECT read at an unaligned offset on the first attempt: EINVAL, passed up.
        let err = run(
            &engine,
            IoRequest::Read {
                file: Arc::clone(&file),
                offset: 1,
                len: BLOCK,
            },
        )
        .expect_err("unaligned O_DIRECT read fails");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        // A read-only descriptor refuses writes with EBADF.
        let ro = Arc::new(File::open(dir.path().join("f")).expect("open"));
        let err = run(
            &engine,
            IoRequest::Write {
                file: ro,
                offset: 0,
                buf: pattern(BLOCK, 0),
            },
        )
        .expect_err("write to a read-only fd fails");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }

    #[derive(Debug, Clone)]
    enum TestOp {
        Write {
            block: u64,
            blocks: usize,
            seed: u8,
        },
        Read {
            block: u64,
            blocks: usize,
        },
        Punch {
            block: u64,
            blocks: u64,
        },
        Fdatasync,
        Fsync,
        /// Changes the size directly (not through an engine), to get reads that meet
        /// end of file at unaligned sizes.
        SetLen {
            bytes: u64,
        },
    }

    fn test_op() -> impl Strategy<Value = TestOp> {
        prop_oneof![
            4 => (0u64..32, 1usize..5, any::<u8>())
                .prop_map(|(block, blocks, seed)| TestOp::Write { block, blocks, seed }),
            4 => (0u64..40, 1usize..6).prop_map(|(block, blocks)| TestOp::Read { block, blocks }),
            1 => (0u64..36, 1u64..4).prop_map(|(block, blocks)| TestOp::Punch { block, blocks }),
            1 => Just(TestOp::Fdatasync),
            1 => Just(TestOp::Fsync),
            1 => (0u64..(36 * BLOCK as u64)).prop_map(|bytes| TestOp::SetLen { bytes }),
        ]
    }

    /// Piece sizes to issue transfers in: whole, aligned pieces, and an unaligned
    /// value the engine must round down.
    fn piece() -> impl Strategy<Value = Option<usize>> {
        prop_oneof![
            2 => Just(None),
            1 => Just(Some(BLOCK)),
            1 => Just(Some(2 * BLOCK)),
            1 => Just(Some(BLOCK + 904)),
        ]
    }

    /// Applies `op` (transfers in pieces of `piece`) and returns what a caller would
    /// observe.
    fn apply(
        engine: &dyn IoEngine,
        file: &Arc<File>,
        op: &TestOp,
        piece: Option<usize>,
    ) -> Result<Vec<u8>, i32> {
        let request = match *op {
            TestOp::Write {
                block,
                blocks,
                seed,
            } => IoRequest::Write {
                file: Arc::clone(file),
                offset: block * BLOCK as u64,
                buf: pattern(blocks * BLOCK, seed),
            },
            TestOp::Read { block, blocks } => IoRequest::Read {
                file: Arc::clone(file),
                offset: block * BLOCK as u64,
                len: blocks * BLOCK,
            },
            TestOp::Punch { block, blocks } => IoRequest::PunchHole {
                file: Arc::clone(file),
                offset: block * BLOCK as u64,
                len: blocks * BLOCK as u64,
            },
            TestOp::Fdatasync => IoRequest::Fdatasync {
                file: Arc::clone(file),
            },
            TestOp::Fsync => IoRequest::Fsync {
                file: Arc::clone(file),
            },
            TestOp::SetLen { bytes } => {
                return file
                    .set_len(bytes)
                    .map(|()| Vec::new())
                    .map_err(|e| e.raw_os_error().unwrap_or(-1))
            }
        };
        let is_write = matches!(op, TestOp::Write { .. });
        match run_in_pieces(engine, request, piece) {
            // A write hands back the caller's buffer; compare only the count.
            Ok(done) if is_write => Ok(done.bytes.to_le_bytes().to_vec()),
            Ok(done) => Ok(done.buf.map(|b| b.to_vec()).unwrap_or_default()),
            Err(e) => Err(e.raw_os_error().unwrap_or(-1)),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// The io_uring engine behaves exactly like the blocking reference engine on
        /// random sequences of writes, reads, holes, syncs and resizes, whole or in
        /// pieces.
        #[test]
        fn uring_matches_sync_engine(
            ops in proptest::collection::vec((test_op(), piece()), 1..40),
        ) {
            let dir = tempfile::tempdir().expect("temp dir");
            let uring_file = open_direct(&dir.path().join("uring"));
            let sync_file = open_direct(&dir.path().join("sync"));
            let uring = UringEngine::new("prop", 4).expect("io_uring available");
            let sync = SyncEngine::new("prop", 1).expect("threads");
            for (i, (op, piece)) in ops.iter().enumerate() {
                // The reference runs whole on even steps and in pieces on odd ones.
                let a = apply(&uring, &uring_file, op, *piece);
                let b = apply(&sync, &sync_file, op, piece.filter(|_| i % 2 == 1));
                prop_assert_eq!(a, b, "op {} {:?} in pieces of {:?}", i, op, piece);
            }
            let size = sync_file.metadata().expect("stat").len();
            prop_assert_eq!(uring_file.metadata().expect("stat").len(), size);
            let whole = TestOp::Read { block: 0, blocks: 40 };
            prop_assert_eq!(
                apply(&uring, &uring_file, &whole, Some(3 * BLOCK)),
                apply(&sync, &sync_file, &whole, None)
            );
        }
    }
}
