//! The seam between the scheduler and whatever executes I/O.
//!
//! An [`IoEngine`] takes one [`EngineOp`] at a time and later calls its completion
//! callback exactly once, on a thread of its own. Two engines implement it: the io_uring
//! ring thread ([`super::uring::UringEngine`], the production path) and a plain
//! `pread`/`pwrite` worker pool ([`super::sync_engine::SyncEngine`], the reference the
//! io_uring path is tested against, and a fallback where io_uring is unavailable).
//!
//! *Ownership.* From `submit` until the callback runs, the engine owns the request's
//! file (`Arc<File>`) and buffer; a read's data and a write's buffer come back inside
//! the [`IoCompletion`]. Nothing the caller does (dropping its future, say) can free
//! memory the kernel is still writing.
//!
//! *Completion contract.* A read or write either transfers the whole range or fails;
//! short transfers, `EINTR` and `EAGAIN` are retried inside the engine. The single
//! exception is a read that reaches end of file: it completes with the bytes that exist
//! and the buffer truncated to them.

use std::fs::File;
use std::io;
use std::sync::Arc;

use super::aligned_buf::{AlignedBuf, BUF_ALIGN};
use super::{IoCompletion, IoRequest};

/// Retries of one operation after `EINTR`/`EAGAIN` before giving up with that error,
/// so a file that keeps refusing cannot spin an engine thread forever.
pub(crate) const MAX_RETRIES: u32 = 10_000;

/// What an engine calls when an operation finishes. Runs on the engine's thread: it must
/// not block.
pub type Completer = Box<dyn FnOnce(io::Result<IoCompletion>) + Send + 'static>;

/// An operation handed to an engine: the request and who to tell when it is done.
pub struct EngineOp {
    /// The I/O to perform.
    pub request: IoRequest,
    /// Largest single transfer to issue for a read or write: a longer one goes to the
    /// device in consecutive pieces of this size, one at a time, so it never occupies
    /// the device queue with more (the scheduler sets it for background requests).
    /// Rounded down to a multiple of [`BUF_ALIGN`]. `None`: the whole transfer at once.
    pub max_transfer: Option<usize>,
    /// Called exactly once with the outcome.
    pub done: Completer,
}

impl EngineOp {
    /// An operation issued whole.
    pub fn new(request: IoRequest, done: Completer) -> Self {
        EngineOp {
            request,
            max_transfer: None,
            done,
        }
    }
}

/// The largest piece of an operation with `max_transfer`: rounded down to a multiple
/// of [`BUF_ALIGN`] (pieces of an `O_DIRECT` transfer must stay aligned) and at least
/// one such unit, so a bogus value can neither stall nor break an operation.
pub(crate) fn piece_limit(max_transfer: Option<usize>) -> usize {
    max_transfer.map_or(usize::MAX, |m| (m - m % BUF_ALIGN).max(BUF_ALIGN))
}

impl std::fmt::Debug for EngineOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineOp")
            .field("request", &self.request)
            .field("max_transfer", &self.max_transfer)
            .finish_non_exhaustive()
    }
}

/// Why an engine refused an operation.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine's thread has exited (shutdown or a fatal ring error).
    #[error("the I/O engine has stopped")]
    Stopped,
    /// The engine could not be started.
    #[error("cannot start the I/O engine")]
    Setup(#[source] io::Error),
}

/// A refused operation, handed back whole so the caller can fail it, retry it or run
/// it elsewhere: its completion callback has not been called.
#[derive(Debug)]
pub struct Rejected {
    /// The operation, untouched.
    pub op: EngineOp,
    /// Why it was refused.
    pub error: EngineError,
}

impl Rejected {
    /// Hands `op` to an engine's worker thread over `queue`; refused as
    /// [`EngineError::Stopped`] once the engine is shutting down (no queue, or the
    /// worker gone).
    pub(crate) fn send_or_stopped(
        queue: Option<&std::sync::mpsc::Sender<EngineOp>>,
        op: EngineOp,
    ) -> Result<(), Rejected> {
        let stopped = |op| Rejected {
            op,
            error: EngineError::Stopped,
        };
        match queue {
            Some(tx) => tx
                .send(op)
                .map_err(|std::sync::mpsc::SendError(op)| stopped(op)),
            None => Err(stopped(op)),
        }
    }
}

/// Executes I/O requests asynchronously and reports each completion through a callback.
///
/// Why callbacks rather than futures: completions are produced on a non-tokio thread,
/// and the scheduler must update its counters and dispatch the next request right there,
/// before any task is woken.
pub trait IoEngine: Send + Sync + 'static {
    /// Starts `op`. On success `op.done` will be called exactly once; on error the
    /// operation is returned untouched and `done` is never called.
    fn submit(&self, op: EngineOp) -> Result<(), Rejected>;

    /// Short name for logs and metrics ("io_uring", "sync").
    fn name(&self) -> &'static str;
}

/// Whether an error after `done > 0` bytes of a read is really end of file.
///
/// With `O_DIRECT`, a file whose size is not a multiple of the block size returns a short
/// count at its end; asking for the remainder then starts at an unaligned offset, which
/// the kernel refuses with `EINVAL` before looking at the size. That `EINVAL` means "end
/// of file", not a failure. Only an unaligned continuation qualifies; an `EINVAL` at an
/// aligned position or on the first attempt is passed up.
pub(crate) fn is_eof_after_partial_read(errno: i32, done: usize, pos: u64) -> bool {
    errno == libc::EINVAL && done > 0 && pos & 511 != 0
}

/// Whether an errno asks for the same operation to be tried again.
pub(crate) fn is_retryable(errno: i32) -> bool {
    errno == libc::EINTR || errno == libc::EAGAIN
}

/// Executes one request with blocking system calls, transferring at most
/// `max_transfer` bytes per call. The reference semantics every engine must match;
/// used by [`super::sync_engine::SyncEngine`].
pub(crate) fn execute_blocking(
    request: IoRequest,
    max_transfer: Option<usize>,
) -> io::Result<IoCompletion> {
    use std::os::unix::fs::FileExt;
    let piece = piece_limit(max_transfer);
    match request {
        IoRequest::Read { file, offset, len } => {
            let mut buf = AlignedBuf::zeroed(len)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let mut done = 0usize;
            let mut retries = 0u32;
            while done < len {
                let pos = offset + done as u64;
                let end = len.min(done.saturating_add(piece));
                match file.read_at(&mut buf.as_mut_slice()[done..end], pos) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) => {
                        let errno = e.raw_os_error().unwrap_or(0);
                        if is_eof_after_partial_read(errno, done, pos) {
                            break;
                        }
                        retries += 1;
                        if !is_retryable(errno) || retries > MAX_RETRIES {
                            return Err(e);
                        }
                    }
                }
            }
            buf.set_len(done);
            Ok(IoCompletion {
                bytes: done,
                buf: Some(buf),
            })
        }
        IoRequest::Write { file, offset, buf } => {
            let mut done = 0usize;
            let mut retries = 0u32;
            while done < buf.len() {
                let end = buf.len().min(done.saturating_add(piece));
                match file.write_at(&buf.as_slice()[done..end], offset + done as u64) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => done += n,
                    Err(e) => {
                        retries += 1;
                        let errno = e.raw_os_error().unwrap_or(0);
                        if !is_retryable(errno) || retries > MAX_RETRIES {
                            return Err(e);
                        }
                    }
                }
            }
            Ok(IoCompletion {
                bytes: done,
                buf: Some(buf),
            })
        }
        IoRequest::Fsync { file } => {
            file.sync_all()?;
            Ok(IoCompletion::empty())
        }
        IoRequest::Fdatasync { file } => {
            file.sync_data()?;
            Ok(IoCompletion::empty())
        }
        IoRequest::PunchHole { file, offset, len } => {
            punch_hole_blocking(&file, offset, len)?;
            Ok(IoCompletion::empty())
        }
    }
}

fn punch_hole_blocking(file: &Arc<File>, offset: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let (offset, len) = fallocate_range(offset, len)?;
    fallocate(
        file.as_ref(),
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
    .map_err(io::Error::from)
}

/// Converts a punch-hole range to the signed values `fallocate(2)` takes.
pub(crate) fn fallocate_range(offset: u64, len: u64) -> io::Result<(i64, i64)> {
    let invalid = || io::Error::new(io::ErrorKind::InvalidInput, "range exceeds i64");
    let off = i64::try_from(offset).map_err(|_| invalid())?;
    let len = i64::try_from(len).map_err(|_| invalid())?;
    off.checked_add(len).ok_or_else(invalid)?;
    Ok((off, len))
}
