//! [`EngineTarget`]: the engine behind the frontend's [`BlockTarget`].
//!
//! The frontend's hot path is the completion-based `submit_*` methods: an aligned
//! write (or trim) is checked, sequenced and ordered against overlapping writes on the
//! calling FUSE thread ([`Engine::start_write`]), and its completion is answered by
//! the engine task that collects the replicas' acknowledgements; a read or flush is
//! spawned as one task on the engine's runtime that answers when done. No FUSE thread
//! waits for the network, so the number of requests in flight is set by the kernel's
//! queue depth instead of the number of FUSE threads (it was capped at 4, which made
//! QD32 writes barely faster than QD1). Doing the write's registration on the FUSE
//! thread keeps overlapping writes in the order the kernel sent them.
//!
//! The synchronous methods (and the rare cases the `submit_*` methods hand to them:
//! unaligned requests, requests larger than one engine call) enter the runtime with
//! [`Handle::block_on`] and wait there on the calling thread; the engine's own tasks
//! run on the runtime's worker threads. The runtime must therefore be a
//! multi-threaded one (a current-thread runtime only makes progress inside its own
//! `block_on`), and no method may be called from inside an async task.
//!
//! The engine works in whole 4 KiB blocks of at most [`MAX_IO_BYTES`]. Aligned
//! requests (the loop device sets a 4096-byte logical block size) go straight
//! through, split into pieces of at most that size. Unaligned ones — a 512-byte
//! loop device on a kernel that refused the block size, or a program using the FUSE
//! file directly — are served by read-modify-write of the covering blocks.
//! Unaligned writes are serialised among themselves, but not against a concurrent
//! aligned write to the same block; the kernel does not issue overlapping writes
//! concurrently to a block device, so this only matters for direct users of the
//! FUSE file.

use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use tessera_replica_protocol::block::BLOCK_SIZE;
use tokio::runtime::Handle;

use super::{Engine, EngineError, EngineErrorKind, MAX_IO_BYTES};
use crate::frontend::{
    BlockTarget, Completion, ReadCompletion, TargetError, TargetErrorKind, TargetOp,
};

/// Largest piece one engine call carries (whole blocks, within the frame limit).
const CHUNK: u64 = (MAX_IO_BYTES as u64 / BLOCK_SIZE) * BLOCK_SIZE;

/// Serves an [`Engine`] to the frontend, which calls from non-runtime threads.
#[derive(Debug)]
pub struct EngineTarget {
    engine: Engine,
    handle: Handle,
    /// Serialises read-modify-write cycles of unaligned writes and discards.
    rmw: Mutex<()>,
}

impl EngineTarget {
    /// Wraps `engine`, whose tasks run on the multi-threaded runtime of `handle`.
    pub fn new(engine: Engine, handle: Handle) -> Self {
        EngineTarget {
            engine,
            handle,
            rmw: Mutex::new(()),
        }
    }

    /// The engine served.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn err(op: TargetOp, offset: u64, len: u64, e: EngineError) -> TargetError {
        let kind = match e.kind() {
            EngineErrorKind::NoSpace => TargetErrorKind::NoSpace,
            EngineErrorKind::InvalidRequest => TargetErrorKind::OutOfRange,
            // Fencing is EIO for the kernel; the source keeps it distinguishable.
            _ => TargetErrorKind::Io,
        };
        TargetError {
            kind,
            op,
            offset,
            len,
            source: Some(Box::new(e)),
        }
    }

    /// Reads whole blocks into `buf` (aligned offset and length).
    fn read_aligned(&self, offset: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let n = (buf.len() - pos).min(CHUNK as usize);
            // n <= CHUNK, which fits in u32.
            let n32 = u32::try_from(n).unwrap_or(u32::MAX);
            let data = self
                .handle
                .block_on(self.engine.read(offset + pos as u64, n32))?;
            buf[pos..pos + n].copy_from_slice(&data);
            pos += n;
        }
        Ok(())
    }

    /// Writes whole blocks (aligned offset and length).
    fn write_aligned(&self, offset: u64, data: &[u8]) -> Result<(), EngineError> {
        for (i, piece) in data.chunks(CHUNK as usize).enumerate() {
            // One copy out of the FUSE buffer, shared by every replica's send.
            let bytes = Bytes::copy_from_slice(piece);
            self.handle
                .block_on(self.engine.write(offset + i as u64 * CHUNK, bytes))?;
        }
        Ok(())
    }

    /// Read-modify-write of the blocks covering `[offset, offset + len)`: `patch`
    /// edits the covering buffer, given the range's position in it.
    fn rmw(
        &self,
        offset: u64,
        len: u64,
        patch: impl FnOnce(&mut [u8], usize),
    ) -> Result<(), EngineError> {
        let _serial = self.rmw.lock().unwrap_or_else(PoisonError::into_inner);
        let start = offset - offset % BLOCK_SIZE;
        let end = (offset + len).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        let mut cover = vec![0u8; (end - start) as usize];
        self.read_aligned(start, &mut cover)?;
        patch(&mut cover, (offset - start) as usize);
        self.write_aligned(start, &cover)
    }
}

fn aligned(offset: u64, len: u64) -> bool {
    (offset | len).is_multiple_of(BLOCK_SIZE)
}

impl BlockTarget for EngineTarget {
    fn size(&self) -> u64 {
        self.engine.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), TargetError> {
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let result = if aligned(offset, len) {
            self.read_aligned(offset, buf)
        } else {
            let start = offset - offset % BLOCK_SIZE;
            let end = (offset + len).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
            let mut cover = vec![0u8; (end - start) as usize];
            self.read_aligned(start, &mut cover).map(|()| {
                let at = (offset - start) as usize;
                buf.copy_from_slice(&cover[at..at + buf.len()]);
            })
        };
        result.map_err(|e| Self::err(TargetOp::Read, offset, len, e))
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), TargetError> {
        let len = data.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let result = if aligned(offset, len) {
            self.write_aligned(offset, data)
        } else {
            self.rmw(offset, len, |cover, at| {
                cover[at..at + data.len()].copy_from_slice(data)
            })
        };
        result.map_err(|e| Self::err(TargetOp::Write, offset, len, e))
    }

    fn flush(&self) -> Result<(), TargetError> {
        self.handle
            .block_on(self.engine.flush())
            .map_err(|e| Self::err(TargetOp::Flush, 0, 0, e))
    }

    fn submit_read(&self, offset: u64, len: usize, done: ReadCompletion) {
        let span = len as u64;
        if span == 0 || !aligned(offset, span) || span > CHUNK {
            let mut buf = vec![0u8; len];
            return match self.read_at(offset, &mut buf) {
                Ok(()) => done.complete(Ok(&buf)),
                Err(e) => done.complete(Err(e)),
            };
        }
        let engine = self.engine.clone();
        // span <= CHUNK, which fits in u32.
        let len32 = u32::try_from(span).unwrap_or(u32::MAX);
        self.handle.spawn(async move {
            match engine.read(offset, len32).await {
                Ok(data) => done.complete(Ok(&data)),
                Err(e) => done.complete(Err(Self::err(TargetOp::Read, offset, span, e))),
            }
        });
    }

    fn submit_write(&self, offset: u64, data: &[u8], done: Completion) {
        let len = data.len() as u64;
        if len == 0 || !aligned(offset, len) || len > CHUNK {
            return done.complete(self.write_at(offset, data));
        }
        // One copy out of the FUSE buffer, shared by every replica's send.
        let bytes = Bytes::copy_from_slice(data);
        let _runtime = self.handle.enter();
        self.engine.start_write(offset, bytes, move |r| {
            done.complete(r.map_err(|e| Self::err(TargetOp::Write, offset, len, e)))
        });
    }

    fn submit_flush(&self, done: Completion) {
        let engine = self.engine.clone();
        self.handle.spawn(async move {
            let r = engine.flush().await;
            done.complete(r.map_err(|e| Self::err(TargetOp::Flush, 0, 0, e)))
        });
    }

    fn submit_discard(&self, offset: u64, len: u64, done: Completion) {
        if len == 0 || !aligned(offset, len) || len > 1 << 30 {
            return done.complete(self.discard(offset, len));
        }
        let _runtime = self.handle.enter();
        self.engine.start_trim(offset, len, move |r| {
            done.complete(r.map_err(|e| Self::err(TargetOp::Discard, offset, len, e)))
        });
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), TargetError> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        // Whole blocks inside the range are trimmed; partial blocks at either edge
        // are zeroed by read-modify-write.
        let inner_start = offset.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        let inner_end = end - end % BLOCK_SIZE;
        let result = (|| {
            if inner_start >= inner_end {
                return self.rmw(offset, len, |c, at| c[at..at + len as usize].fill(0));
            }
            if offset < inner_start {
                let n = inner_start - offset;
                self.rmw(offset, n, |c, at| c[at..at + n as usize].fill(0))?;
            }
            let mut pos = inner_start;
            while pos < inner_end {
                let n = (inner_end - pos).min(1 << 30);
                self.handle.block_on(self.engine.trim(pos, n))?;
                pos += n;
            }
            if inner_end < end {
                let n = end - inner_end;
                self.rmw(inner_end, n, |c, at| c[at..at + n as usize].fill(0))?;
            }
            Ok(())
        })();
        result.map_err(|e| Self::err(TargetOp::Discard, offset, len, e))
    }
}
