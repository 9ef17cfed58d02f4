//! The frontend: how a volume becomes a kernel block device on the node.
//!
//! The kernel path is `/dev/loopN → FUSE file → BlockTarget`. The engine serves the
//! volume as a single regular file named [`fuse::VOLUME_FILE_NAME`] in a FUSE
//! filesystem of its own ([`FuseVolume`]), and a loop device with direct I/O is attached
//! to that file ([`LoopDevice`]). This works on any Linux that has FUSE and loop, which
//! includes the test machines (no nbd, ublk, iSCSI or NVMe-oF there).
//!
//! Layout:
//! * [`BlockTarget`] and [`TargetError`] (this file): what the frontend serves. The
//!   engine implements the trait; the frontend never knows about replicas.
//! * [`completion`]: [`Completion`] and [`ReadCompletion`], how a target answers a
//!   request it serves asynchronously (the `submit_*` methods of [`BlockTarget`]).
//! * [`file_target`]: [`FileTarget`], a plain local file behind the trait, used by tests
//!   and benchmarks to measure the transport alone.
//! * [`fuse`]: [`FuseVolume`], the FUSE server with one file.
//! * [`loop_device`]: [`LoopDevice`], loop devices driven by ioctls (no `losetup`).
//! * [`cleanup`]: [`cleanup_stale`], which removes loop devices and FUSE mounts left
//!   behind by a crashed process.
//!
//! Only the FUSE + loop transport exists and is tested; `ublk` or `nbd` would be further
//! implementations that serve the same [`BlockTarget`].
//!
//! This module must not depend on the engine or on the replica protocol: the dependency
//! goes the other way.

pub mod cleanup;
pub mod completion;
pub mod file_target;
pub mod fuse;
pub mod loop_device;

use std::cell::RefCell;
use std::error::Error as StdError;
use std::fmt;

pub use cleanup::{cleanup_stale, cleanup_stale_except, CleanupError, CleanupReport};
pub use completion::{Completion, ReadCompletion};
pub use file_target::{FileTarget, FileTargetError};
pub use fuse::{FuseError, FuseOptions, FuseVolume};
pub use loop_device::{list_bound, LoopDevice, LoopError, LoopStatus};

/// The storage the frontend exposes as a block device: a byte-addressed range of
/// [`size`](BlockTarget::size) bytes.
///
/// # Synchronous and completion-based methods
///
/// The frontend calls the `submit_*` methods on its FUSE worker threads. They start
/// the request and may return before it is done; the target answers through the
/// [`Completion`] / [`ReadCompletion`] it was given, from any thread. A target whose
/// requests wait on the network (the engine) implements them by handing the request
/// to its runtime, so the FUSE threads never wait and the kernel can keep as many
/// requests in flight as its queues allow: with waiting worker threads, a 4-thread
/// server had at most 4 replicated writes in flight, and QD32 barely beat QD1.
///
/// The default `submit_*` implementations call the synchronous methods on the calling
/// thread and complete before returning, which is right for a target that does local
/// I/O ([`FileTarget`]): its thread would block in the kernel anyway. The synchronous
/// methods stay the simple interface for tests and for direct callers; they may block
/// and must not be called from inside an async task.
///
/// # Contract
///
/// * Offsets and lengths given by the frontend are always within `0..size()`; the
///   frontend clips reads at the end and refuses writes past it before calling.
/// * `write` returns once the data is acknowledged (for the engine: on a majority);
///   it need not be durable until a later [`flush`](BlockTarget::flush) returns.
/// * `discard` makes the range read back as zeroes afterwards; the target may free the
///   space. It is used for both hole punching and zeroing.
/// * Errors are reported as [`TargetError`]; the frontend turns them into `EIO`, or
///   `ENOSPC` for [`TargetErrorKind::NoSpace`]. A target must return an error rather
///   than block forever, because a hung request hangs every process doing I/O on the
///   block device.
pub trait BlockTarget: Send + Sync + 'static {
    /// Current size in bytes. The frontend reads it on every size check, so it must be
    /// cheap (an atomic load, not a network round trip).
    fn size(&self) -> u64;

    /// Fills all of `buf` with the bytes starting at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), TargetError>;

    /// Writes all of `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), TargetError>;

    /// Makes every write that returned before this call durable.
    fn flush(&self) -> Result<(), TargetError>;

    /// Makes `len` bytes from `offset` read back as zeroes; the space may be freed.
    fn discard(&self, offset: u64, len: u64) -> Result<(), TargetError>;

    /// Starts reading `len` bytes at `offset`; `done` gets them. Default: [`read_at`]
    /// into a per-thread buffer, completed before returning.
    ///
    /// [`read_at`]: BlockTarget::read_at
    fn submit_read(&self, offset: u64, len: usize, done: ReadCompletion) {
        READ_BUF.with_borrow_mut(|buf| {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let chunk = &mut buf[..len];
            match self.read_at(offset, chunk) {
                Ok(()) => done.complete(Ok(chunk)),
                Err(e) => done.complete(Err(e)),
            }
        })
    }

    /// Starts writing `data` at `offset` (the target copies what it keeps: `data` is
    /// only borrowed for the call); `done` is answered once [`write_at`] would have
    /// returned. Default: [`write_at`], completed before returning.
    ///
    /// [`write_at`]: BlockTarget::write_at
    fn submit_write(&self, offset: u64, data: &[u8], done: Completion) {
        done.complete(self.write_at(offset, data))
    }

    /// Starts a [`flush`](BlockTarget::flush): every write *completed* before this
    /// call is durable once `done` is answered with `Ok`. Default: `flush`, completed
    /// before returning.
    fn submit_flush(&self, done: Completion) {
        done.complete(self.flush())
    }

    /// Starts a [`discard`](BlockTarget::discard). Default: `discard`, completed before
    /// returning.
    fn submit_discard(&self, offset: u64, len: u64, done: Completion) {
        done.complete(self.discard(offset, len))
    }
}

thread_local! {
    /// Per-thread read buffer of the default [`BlockTarget::submit_read`], reused so a
    /// synchronous read costs no allocation.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Which [`BlockTarget`] operation failed; part of every [`TargetError`] so a log line
/// says what the kernel asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetOp {
    /// [`BlockTarget::read_at`].
    Read,
    /// [`BlockTarget::write_at`].
    Write,
    /// [`BlockTarget::flush`].
    Flush,
    /// [`BlockTarget::discard`].
    Discard,
}

impl fmt::Display for TargetOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetOp::Read => "read",
            TargetOp::Write => "write",
            TargetOp::Flush => "flush",
            TargetOp::Discard => "discard",
        })
    }
}

/// The class of a [`TargetError`], which decides the errno the kernel sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TargetErrorKind {
    /// The data could not be read or written (lost quorum, local I/O error, fenced).
    /// Reported as `EIO`.
    Io,
    /// The backing storage is full. Reported as `ENOSPC`, which the block layer passes
    /// on as `BLK_STS_NOSPC` so filesystems can tell it from media errors.
    NoSpace,
    /// The request lies outside the target (a bug in the caller). Reported as `EIO`
    /// because a block device has no better code for it.
    OutOfRange,
}

/// Why a [`BlockTarget`] operation failed, with the operation and range it was for.
#[derive(Debug, thiserror::Error)]
#[error("volume {op} of {len} bytes at offset {offset} failed ({kind:?})")]
pub struct TargetError {
    /// What kind of failure; decides the errno.
    pub kind: TargetErrorKind,
    /// The operation that failed.
    pub op: TargetOp,
    /// Byte offset of the request (0 for flush).
    pub offset: u64,
    /// Byte length of the request (0 for flush).
    pub len: u64,
    /// The underlying cause, if any.
    #[source]
    pub source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

impl TargetError {
    /// Builds an error without a cause; implementations use it for checks of their own.
    pub fn new(kind: TargetErrorKind, op: TargetOp, offset: u64, len: u64) -> Self {
        TargetError {
            kind,
            op,
            offset,
            len,
            source: None,
        }
    }

    /// Wraps an I/O error, classifying `ENOSPC`/`EDQUOT` as [`TargetErrorKind::NoSpace`]
    /// and everything else as [`TargetErrorKind::Io`].
    pub fn from_io(op: TargetOp, offset: u64, len: u64, err: std::io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => TargetErrorKind::NoSpace,
            _ => TargetErrorKind::Io,
        };
        TargetError {
            kind,
            op,
            offset,
            len,
            source: Some(Box::new(err)),
        }
    }

    /// The errno the FUSE server replies with for this error.
    pub fn errno(&self) -> i32 {
        match self.kind {
            TargetErrorKind::NoSpace => libc::ENOSPC,
            TargetErrorKind::Io | TargetErrorKind::OutOfRange => libc::EIO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        let nospc = TargetError::from_io(
            TargetOp::Write,
            0,
            4096,
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert_eq!(nospc.kind, TargetErrorKind::NoSpace);
        assert_eq!(nospc.errno(), libc::ENOSPC);
        let eio = TargetError::from_io(
            TargetOp::Read,
            8192,
            4096,
            std::io::Error::from_raw_os_error(libc::EBADF),
        );
        assert_eq!(eio.errno(), libc::EIO);
        let msg = eio.to_string();
        assert!(msg.contains("read") && msg.contains("8192"), "{msg}");
        assert_eq!(
            TargetError::new(TargetErrorKind::OutOfRange, TargetOp::Discard, 0, 1).errno(),
            libc::EIO
        );
    }
}
