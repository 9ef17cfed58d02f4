//! Completion handles for the asynchronous side of [`BlockTarget`](super::BlockTarget).
//!
//! # Why
//!
//! With the synchronous methods, a FUSE worker thread waits for every request it
//! hands to the target, so the target never sees more requests at once than there are
//! worker threads (4), however deep the kernel's queue is. A replicated write spends
//! most of its life waiting for the network, so 4 in flight left the engine and the
//! replicas idle most of the time (QD1 and QD32 differed by less than 2x).
//!
//! The `submit_*` methods take a completion instead: the target starts the request,
//! returns at once, and answers through the completion whenever the request is
//! decided, from any thread. A FUSE worker thread is then back reading `/dev/fuse`
//! after a few microseconds, and the number of requests in flight is bounded by the
//! kernel (`max_background`, the loop device's queue), not by the thread count.
//!
//! A completion for a FUSE request wraps fuser's reply object directly (no boxing:
//! fuser's replies may be moved to another thread and answered there). A closure
//! variant exists for other callers and tests. Dropping a completion without
//! completing it answers `EIO` (fuser does this for its replies; the closure variant
//! is told [`super::TargetErrorKind::Io`]), so a request is never
//! left unanswered.

use fuser::{Errno, ReplyData, ReplyEmpty, ReplyWrite};

use super::{TargetError, TargetErrorKind, TargetOp};

type DoneFn = Box<dyn FnOnce(Result<(), TargetError>) + Send + 'static>;
type ReadFn = Box<dyn FnOnce(Result<&[u8], TargetError>) + Send + 'static>;

fn errno(e: &TargetError) -> Errno {
    Errno::from_i32(e.errno())
}

/// Answers one write, flush or discard.
#[must_use = "a request must be answered"]
pub struct Completion {
    kind: Option<DoneKind>,
}

enum DoneKind {
    /// A FUSE write of this many bytes.
    FuseWrite(ReplyWrite, u32),
    /// A FUSE request answered with an empty reply (fsync, flush, fallocate).
    FuseEmpty(ReplyEmpty),
    Callback(DoneFn),
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Completion")
    }
}

impl Completion {
    /// A completion that answers a FUSE write of `len` bytes.
    pub(crate) fn fuse_write(reply: ReplyWrite, len: u32) -> Self {
        Completion {
            kind: Some(DoneKind::FuseWrite(reply, len)),
        }
    }

    /// A completion that answers a FUSE request with an empty reply.
    pub(crate) fn fuse_empty(reply: ReplyEmpty) -> Self {
        Completion {
            kind: Some(DoneKind::FuseEmpty(reply)),
        }
    }

    /// A completion that calls `f` with the result.
    pub fn from_fn(f: impl FnOnce(Result<(), TargetError>) + Send + 'static) -> Self {
        Completion {
            kind: Some(DoneKind::Callback(Box::new(f))),
        }
    }

    /// Answers the request.
    pub fn complete(mut self, result: Result<(), TargetError>) {
        let Some(kind) = self.kind.take() else {
            return;
        };
        if let Err(e) = &result {
            tracing::debug!(error = %e, "volume request failed");
        }
        match (kind, result) {
            (DoneKind::FuseWrite(reply, len), Ok(())) => reply.written(len),
            (DoneKind::FuseWrite(reply, _), Err(e)) => reply.error(errno(&e)),
            (DoneKind::FuseEmpty(reply), Ok(())) => reply.ok(),
            (DoneKind::FuseEmpty(reply), Err(e)) => reply.error(errno(&e)),
            (DoneKind::Callback(f), r) => f(r),
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        // fuser's replies answer EIO when dropped; a callback is told the same.
        if let Some(DoneKind::Callback(f)) = self.kind.take() {
            f(Err(TargetError::new(
                TargetErrorKind::Io,
                TargetOp::Write,
                0,
                0,
            )));
        }
    }
}

/// Answers one read with its data.
#[must_use = "a request must be answered"]
pub struct ReadCompletion {
    kind: Option<ReadKind>,
}

enum ReadKind {
    Fuse(ReplyData),
    Callback(ReadFn),
}

impl std::fmt::Debug for ReadCompletion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadCompletion")
    }
}

impl ReadCompletion {
    /// A completion that answers a FUSE read.
    pub(crate) fn fuse(reply: ReplyData) -> Self {
        ReadCompletion {
            kind: Some(ReadKind::Fuse(reply)),
        }
    }

    /// A completion that calls `f` with the data read (borrowed for the call only).
    pub fn from_fn(f: impl FnOnce(Result<&[u8], TargetError>) + Send + 'static) -> Self {
        ReadCompletion {
            kind: Some(ReadKind::Callback(Box::new(f))),
        }
    }

    /// Answers the read with `result`; on success it holds exactly the bytes asked for.
    pub fn complete(mut self, result: Result<&[u8], TargetError>) {
        let Some(kind) = self.kind.take() else {
            return;
        };
        if let Err(e) = &result {
            tracing::debug!(error = %e, "volume read failed");
        }
        match (kind, result) {
            (ReadKind::Fuse(reply), Ok(data)) => reply.data(data),
            (ReadKind::Fuse(reply), Err(e)) => reply.error(errno(&e)),
            (ReadKind::Callback(f), r) => f(r),
        }
    }
}

impl Drop for ReadCompletion {
    fn drop(&mut self) {
        if let Some(ReadKind::Callback(f)) = self.kind.take() {
            f(Err(TargetError::new(
                TargetErrorKind::Io,
                TargetOp::Read,
                0,
                0,
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn callbacks_run_once_and_dropping_answers_eio() {
        let (tx, rx) = mpsc::channel();
        let t = tx.clone();
        Completion::from_fn(move |r| t.send(r.is_ok()).unwrap()).complete(Ok(()));
        assert!(rx.recv().unwrap());
        let t = tx.clone();
        drop(Completion::from_fn(move |r| t.send(r.is_ok()).unwrap()));
        assert!(!rx.recv().unwrap());

        let (tx, rx) = mpsc::channel();
        let t = tx.clone();
        ReadCompletion::from_fn(move |r| t.send(r.map(<[u8]>::to_vec).ok()).unwrap())
            .complete(Ok(&[1, 2, 3]));
        assert_eq!(rx.recv().unwrap(), Some(vec![1, 2, 3]));
        drop(ReadCompletion::from_fn(move |r| {
            tx.send(r.map(<[u8]>::to_vec).ok()).unwrap()
        }));
        assert_eq!(rx.recv().unwrap(), None);
    }
}
