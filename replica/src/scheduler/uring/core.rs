//! What every ring of the engine shares: the table of operations the kernel may hold,
//! turning requests into submission entries, and completions into results.
//!
//! [`RingCore`] never calls a completion callback itself: finished operations are
//! collected ([`RingCore::take_finished`]) and called by the owner once it holds no
//! borrow of the core, because a callback may submit the next request to the very
//! same ring (the scheduler dispatches from completion callbacks).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring, Probe};

use super::super::aligned_buf::AlignedBuf;
use super::super::engine::{
    fallocate_range, is_eof_after_partial_read, is_retryable, piece_limit, Completer, EngineOp,
    MAX_RETRIES,
};
use super::super::{IoCompletion, IoRequest};

/// A completion callback with the result to give it.
pub(super) type Finished = (Completer, io::Result<IoCompletion>);

/// Builds a ring with room for `depth` operations plus one spare entry (the ring
/// thread's eventfd read); the completion queue is twice that by default, so it
/// cannot overflow. Single issuer with deferred task work when the kernel has them
/// (6.1): completions are then processed only when the owning thread asks.
pub(super) fn build_ring(depth: u32) -> io::Result<IoUring> {
    let entries = (depth + 1).next_power_of_two();
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
        .or_else(|_| IoUring::builder().setup_coop_taskrun().build(entries))
        .or_else(|_| IoUring::new(entries))?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::Fallocate::CODE, "FALLOCATE"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring lacks IORING_OP_{name}"),
            ));
        }
    }
    Ok(ring)
}

/// One operation the kernel may hold, with everything it points at.
pub(super) enum OpState {
    Read {
        file: Arc<File>,
        offset: u64,
        buf: AlignedBuf,
        done: usize,
        /// Largest transfer per entry (`EngineOp::max_transfer`).
        piece: usize,
    },
    Write {
        file: Arc<File>,
        offset: u64,
        buf: AlignedBuf,
        done: usize,
        /// Largest transfer per entry (`EngineOp::max_transfer`).
        piece: usize,
    },
    Sync {
        file: Arc<File>,
        datasync: bool,
    },
    Punch {
        file: Arc<File>,
        offset: u64,
        len: u64,
    },
}

/// What a completion means for an operation.
enum Progress {
    /// Submit again for the remainder (or the same range after `EINTR`/`EAGAIN`).
    Again,
    /// Fully done (or a read reached end of file).
    Finished,
    /// Failed; report this error.
    Failed(io::Error),
}

impl OpState {
    /// The submission entry for what remains of this operation. The pointers in it
    /// stay valid as long as `self` is alive and not moved out of its slot's heap
    /// buffer (the `AlignedBuf` allocation does not move when `self` does).
    fn entry(&mut self) -> io_uring::squeue::Entry {
        fn len_u32(n: usize) -> u32 {
            // Requests are validated far below 4 GiB; if one were not, a clamped length
            // is just a short transfer that gets resubmitted.
            u32::try_from(n).unwrap_or(u32::MAX)
        }
        match self {
            OpState::Read {
                file,
                offset,
                buf,
                done,
                piece,
            } => {
                let remaining = len_u32((buf.len() - *done).min(*piece));
                let ptr = buf.as_mut_ptr().wrapping_add(*done);
                opcode::Read::new(types::Fd(file.as_raw_fd()), ptr, remaining)
                    .offset(*offset + *done as u64)
                    .build()
            }
            OpState::Write {
                file,
                offset,
                buf,
                done,
                piece,
            } => {
                let remaining = len_u32((buf.len() - *done).min(*piece));
                let ptr = buf.as_ptr().wrapping_add(*done);
                opcode::Write::new(types::Fd(file.as_raw_fd()), ptr, remaining)
                    .offset(*offset + *done as u64)
                    .build()
            }
            OpState::Sync { file, datasync } => {
                let flags = if *datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(types::Fd(file.as_raw_fd()))
                    .flags(flags)
                    .build()
            }
            OpState::Punch { file, offset, len } => {
                opcode::Fallocate::new(types::Fd(file.as_raw_fd()), *len)
                    .offset(*offset)
                    .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                    .build()
            }
        }
    }

    /// Applies a completion result (`res` as in a CQE: bytes or `-errno`).
    fn progress(&mut self, res: i32, retries: &mut u32) -> Progress {
        if res < 0 {
            let errno = -res;
            if let OpState::Read {
                offset, buf, done, ..
            } = self
            {
                if is_eof_after_partial_read(errno, *done, *offset + *done as u64) {
                    buf.set_len(*done);
                    return Progress::Finished;
                }
            }
            if is_retryable(errno) && *retries < MAX_RETRIES {
                *retries += 1;
                return Progress::Again;
            }
            return Progress::Failed(io::Error::from_raw_os_error(errno));
        }
        let n = usize::try_from(res).unwrap_or(0);
        match self {
            OpState::Read { buf, done, .. } => {
                if n == 0 {
                    buf.set_len(*done);
                    return Progress::Finished;
                }
                *done += n;
                if *done >= buf.len() {
                    Progress::Finished
                } else {
                    Progress::Again
                }
            }
            OpState::Write { buf, done, .. } => {
                *done += n;
                if *done >= buf.len() {
                    Progress::Finished
                } else if n == 0 {
                    Progress::Failed(io::ErrorKind::WriteZero.into())
                } else {
                    Progress::Again
                }
            }
            OpState::Sync { .. } | OpState::Punch { .. } => Progress::Finished,
        }
    }

    fn into_completion(self) -> IoCompletion {
        match self {
            OpState::Read { buf, .. } => IoCompletion {
                bytes: buf.len(),
                buf: Some(buf),
            },
            OpState::Write { buf, done, .. } => IoCompletion {
                bytes: done,
                buf: Some(buf),
            },
            OpState::Sync { .. } | OpState::Punch { .. } => IoCompletion::empty(),
        }
    }
}

pub(super) struct InFlight {
    state: OpState,
    done: Completer,
    retries: u32,
}

/// One ring and the operations in it. Owned by one thread (the ring thread, or a
/// data-plane shard through [`super::local::LocalRing`]).
pub(super) struct RingCore {
    pub(super) ring: IoUring,
    depth: usize,
    /// In-flight operations by `user_data`.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    cqes: Vec<(u64, i32)>,
    finished: Vec<Finished>,
}

impl RingCore {
    pub(super) fn new(ring: IoUring, depth: usize) -> Self {
        Self {
            ring,
            depth,
            slots: Vec::with_capacity(depth),
            free: Vec::with_capacity(depth),
            in_flight: 0,
            cqes: Vec::with_capacity(depth + 1),
            finished: Vec::new(),
        }
    }

    /// Whether another operation may start (fewer than `depth` in flight).
    pub(super) fn has_room(&self) -> bool {
        self.in_flight < self.depth
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether callbacks are waiting for [`Self::take_finished`].
    pub(super) fn has_finished(&self) -> bool {
        !self.finished.is_empty()
    }

    /// Callbacks of the operations that finished since the last call, to be called by
    /// the owner with no borrow of `self` held.
    pub(super) fn take_finished(&mut self) -> Vec<Finished> {
        std::mem::take(&mut self.finished)
    }

    /// Queues `op`'s first entry (submitted by the owner's next `submit`).
    pub(super) fn start(&mut self, op: EngineOp) {
        let EngineOp {
            request,
            max_transfer,
            done,
        } = op;
        let piece = piece_limit(max_transfer);
        let state = match request {
            IoRequest::Read { file, offset, len } => match AlignedBuf::zeroed(len) {
                Ok(buf) => OpState::Read {
                    file,
                    offset,
                    buf,
                    done: 0,
                    piece,
                },
                Err(e) => {
                    self.finished
                        .push((done, Err(io::Error::new(io::ErrorKind::InvalidInput, e))));
                    return;
                }
            },
            IoRequest::Write { file, offset, buf } => OpState::Write {
                file,
                offset,
                buf,
                done: 0,
                piece,
            },
            IoRequest::Fsync { file } => OpState::Sync {
                file,
                datasync: false,
            },
            IoRequest::Fdatasync { file } => OpState::Sync {
                file,
                datasync: true,
            },
            IoRequest::PunchHole { file, offset, len } => {
                if let Err(e) = fallocate_range(offset, len) {
                    self.finished.push((done, Err(e)));
                    return;
                }
                OpState::Punch { file, offset, len }
            }
        };
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[slot] = Some(InFlight {
            state,
            done,
            retries: 0,
        });
        self.in_flight += 1;
        self.push(slot);
    }

    /// Queues the entry for what remains of the operation in `slot`.
    fn push(&mut self, slot: usize) {
        let Some(op) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let entry = op.state.entry().user_data(slot as u64);
        if self.push_entry(&entry).is_ok() {
            return;
        }
        // The queue has room for `depth + 1` entries and at most that many operations
        // exist, so this is unreachable; fail the operation rather than lose it.
        if let Some(op) = self.slots[slot].take() {
            self.free.push(slot);
            self.in_flight -= 1;
            self.finished.push((
                op.done,
                Err(io::Error::other("io_uring submission queue is full")),
            ));
        }
    }

    /// Puts `entry` in the submission queue, submitting once to make room if it is full.
    pub(super) fn push_entry(&mut self, entry: &io_uring::squeue::Entry) -> io::Result<()> {
        for _ in 0..2 {
            // SAFETY: every pointer in `entry` refers to memory owned by a slot of
            // `self.slots` (buffer, and the `Arc<File>` keeping the fd open) or to a
            // buffer the owner keeps alive until its completion (the ring thread's
            // eventfd read); slots are only emptied after their CQE arrives, and on a
            // ring failure or unwind their state is leaked instead of freed
            // (`fail_all`, `Drop`), so the memory outlives the kernel's use of it.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
        Err(io::Error::other("io_uring submission queue is full"))
    }

    /// Takes every completion the ring holds; returns the `user_data` values that
    /// belong to the owner (not to an operation slot), such as a wake token.
    pub(super) fn reap(&mut self, foreign: u64) -> bool {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        let mut saw_foreign = false;
        for &(user_data, res) in &cqes {
            if user_data == foreign {
                saw_foreign = true;
            } else {
                self.complete(user_data, res);
            }
        }
        cqes.clear();
        self.cqes = cqes;
        saw_foreign
    }

    fn complete(&mut self, user_data: u64, res: i32) {
        let Ok(slot) = usize::try_from(user_data) else {
            return;
        };
        let Some(op) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            tracing::error!(user_data, "io_uring completion for an empty slot");
            return;
        };
        match op.state.progress(res, &mut op.retries) {
            Progress::Again => self.push(slot),
            Progress::Finished => self.finish(slot, None),
            Progress::Failed(e) => self.finish(slot, Some(e)),
        }
    }

    fn finish(&mut self, slot: usize, error: Option<io::Error>) {
        let Some(InFlight { state, done, .. }) = self.slots.get_mut(slot).and_then(Option::take)
        else {
            return;
        };
        self.free.push(slot);
        self.in_flight -= 1;
        match error {
            None => self.finished.push((done, Ok(state.into_completion()))),
            Some(e) => {
                drop(state);
                self.finished.push((done, Err(e)));
            }
        }
    }

    /// The ring failed: no operation can be trusted to complete. Every waiter gets an
    /// error; what the kernel may still touch is leaked.
    pub(super) fn fail_all(&mut self) {
        for slot in self.slots.iter_mut() {
            if let Some(InFlight { state, done, .. }) = slot.take() {
                std::mem::forget(state);
                self.finished
                    .push((done, Err(io::Error::other("the io_uring engine failed"))));
            }
        }
        self.in_flight = 0;
    }
}

impl Drop for RingCore {
    fn drop(&mut self) {
        // Reached with operations still in flight only when a callback panicked or the
        // ring failed: the kernel may still write their buffers, so leak them. Their
        // waiters see the completion callback dropped.
        for slot in self.slots.iter_mut() {
            if let Some(InFlight { state, done, .. }) = slot.take() {
                std::mem::forget(state);
                drop(done);
            }
        }
    }
}
