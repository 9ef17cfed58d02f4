//! The file I/O the store needs, as a trait, plus its two implementations: std files
//! and the replica daemon's I/O scheduler.
//!
//! The store never touches `std::fs::File` for block data directly: it goes through
//! [`BlockFile`], opened by a [`BlockFileFactory`]. That keeps the I/O path pluggable
//! and lets tests inject faults, such as a metadata write that never happens, to
//! simulate a crash between two writes.
//!
//! * [`StdFileFactory`]: buffered `pread`/`pwrite`, the reference implementation, used
//!   by tests and tools that have no scheduler.
//! * [`ScheduledFileFactory`]: what the daemon uses. The **data** file is opened
//!   `O_DIRECT` and every read, write, hole punch and `fdatasync` of it is a request of
//!   the volume's [`VolumeHandle`], so the scheduler's token buckets, reservation and
//!   deadlines govern all block traffic. The **meta** file stays buffered: its entries
//!   are 16 bytes, and `O_DIRECT` would turn every entry write into a read-modify-write
//!   of a 4 KiB page (and need a page lock against concurrent writers of neighbouring
//!   entries). Its `pread`/`pwrite` hit the page cache and run inline on the calling
//!   thread; only its `fdatasync`, the one call that reaches the device, goes through
//!   the scheduler. So a 4 KiB write costs one scheduled request (and one IOPS token),
//!   and a flush two.
//!
//! *One path.* Every transfer returns a [`FileIo`], a future: finished at once for
//! inline I/O (std files, meta transfers), waiting for the scheduler otherwise. The
//! store's async methods await it in the caller's task; its blocking methods park the
//! thread on the same future (`crate::park`). `FileIo` is a concrete type, not a boxed
//! future, so a `dyn BlockFile` costs no allocation per I/O.
//!
//! *Priority.* Each transfer names its [`IoPriority`], which picks the scheduler class:
//! foreground reads as foreground reads, foreground writes, trims and flushes as
//! foreground writes, everything at background priority as background. Files without a
//! scheduler ignore it.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use nix::fcntl::{fallocate, FallocateFlags};

use crate::scheduler::{
    AlignedBuf, IoClass, IoCompletion, IoRequest, SchedulerError, Submission, VolumeHandle,
};

/// Positioned I/O on one file of a layer (its data file or its meta file).
///
/// All methods may be called concurrently from many threads; the store guarantees that
/// concurrent calls never overlap in byte range with a concurrent write. Transfers
/// return a [`FileIo`] (see the module doc): await it, or park on it off any thread
/// that reaps the I/O it waits for.
pub trait BlockFile: Send + Sync + Debug {
    /// Reads into `buf` from `offset` until `buf` is full or end of file; the
    /// [`FileIo`] yields the bytes read. A short count means end of file, and the store
    /// treats the rest as zeros (which a checksum then rejects if data was expected).
    fn read_at<'a>(&self, priority: IoPriority, buf: &'a mut [u8], offset: u64) -> FileIo<'a>;

    /// Writes all of `buf` at `offset` (taken before this returns: the operation does
    /// not borrow `buf`).
    fn write_at(&self, priority: IoPriority, buf: &[u8], offset: u64) -> FileIo<'static>;

    /// Makes completed writes (and the file size) durable, like `fdatasync`.
    fn sync_data(&self, priority: IoPriority) -> FileIo<'static>;

    /// Deallocates a byte range so it reads as zeros and stops using disk space; the
    /// file size is unchanged. Filesystems without hole punching may leave the space
    /// allocated (the store never relies on the bytes of a trimmed block).
    fn punch_hole(&self, priority: IoPriority, offset: u64, len: u64) -> FileIo<'static>;

    /// Sets the file length (used to create and grow sparse files).
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Bytes of disk space the file occupies (holes excluded), for capacity accounting.
    fn allocated_bytes(&self) -> io::Result<u64>;
}

/// A [`BlockFile`] transfer in progress, as a future of the bytes it moved (0 for syncs
/// and holes): finished already, or a scheduled request and what to do with its
/// completion. Dropping it before the scheduler dispatched the request cancels it.
#[must_use = "a file operation does nothing unless awaited"]
#[derive(Debug)]
pub struct FileIo<'a> {
    state: FileIoState<'a>,
}

#[derive(Debug)]
enum FileIoState<'a> {
    /// The outcome, handed out once.
    Done(Option<io::Result<usize>>),
    /// Waiting for the scheduler; `then` is taken when the request completes.
    Scheduled {
        submission: Submission,
        then: Option<Completion<'a>>,
    },
}

/// What a scheduled transfer's completion turns into.
#[derive(Debug)]
enum Completion<'a> {
    /// Copy the data read into the caller's buffer.
    ReadInto(&'a mut [u8]),
    /// The bytes written.
    Written,
    /// Nothing (a sync).
    Synced,
    /// Nothing, and EOPNOTSUPP is success (see [`punch_outcome`]).
    Punched,
}

impl Completion<'_> {
    fn finish(self, completed: io::Result<IoCompletion>) -> io::Result<usize> {
        match self {
            Completion::ReadInto(buf) => completed.map(|done| copy_read(done, buf)),
            Completion::Written => completed.map(|done| done.bytes),
            Completion::Synced => completed.map(|_| 0),
            Completion::Punched => punch_outcome(completed).map(|()| 0),
        }
    }
}

impl FileIo<'_> {
    /// An operation that already finished with `result` (inline I/O).
    pub fn done(result: io::Result<usize>) -> Self {
        FileIo {
            state: FileIoState::Done(Some(result)),
        }
    }
}

impl<'a> FileIo<'a> {
    fn scheduled(submission: Submission, then: Completion<'a>) -> Self {
        FileIo {
            state: FileIoState::Scheduled {
                submission,
                then: Some(then),
            },
        }
    }
}

fn polled_after_completion() -> io::Error {
    io::Error::other("a file operation was polled after it completed")
}

impl Future for FileIo<'_> {
    type Output = io::Result<usize>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().state {
            FileIoState::Done(result) => Poll::Ready(
                result
                    .take()
                    .unwrap_or_else(|| Err(polled_after_completion())),
            ),
            FileIoState::Scheduled { submission, then } => {
                if then.is_none() {
                    return Poll::Ready(Err(polled_after_completion()));
                }
                let completed = ready!(Pin::new(submission).poll(cx)).map_err(io::Error::from);
                Poll::Ready(
                    then.take()
                        .map_or_else(|| Err(polled_after_completion()), |t| t.finish(completed)),
                )
            }
        }
    }
}

/// Opens the files of a layer. A daemon picks one factory per backing device (std
/// files now, the io_uring scheduler later); tests wrap it to inject faults.
pub trait BlockFileFactory: Send + Sync + Debug {
    /// Opens `path` for reading and writing, creating it (empty) when `create` is set.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn BlockFile>>;

    /// Whether foreground I/O is active on the disk the files live on (see
    /// [`VolumeHandle::foreground_active`]); false where nothing schedules I/O.
    fn foreground_active(&self) -> bool {
        false
    }
}

/// [`BlockFile`] over a `std::fs::File` with `pread`/`pwrite`, `fdatasync` and
/// `fallocate(PUNCH_HOLE)`: the reference implementation the io_uring path must match.
#[derive(Debug)]
pub struct StdBlockFile {
    file: File,
}

impl StdBlockFile {
    /// Wraps an already opened file (read-write).
    pub fn new(file: File) -> Self {
        StdBlockFile { file }
    }
}

impl BlockFile for StdBlockFile {
    fn read_at<'a>(&self, _: IoPriority, buf: &'a mut [u8], offset: u64) -> FileIo<'a> {
        FileIo::done(read_full_at(&self.file, buf, offset))
    }

    fn write_at(&self, _: IoPriority, buf: &[u8], offset: u64) -> FileIo<'static> {
        FileIo::done(self.file.write_all_at(buf, offset).map(|()| buf.len()))
    }

    fn sync_data(&self, _: IoPriority) -> FileIo<'static> {
        FileIo::done(self.file.sync_data().map(|()| 0))
    }

    fn punch_hole(&self, _: IoPriority, offset: u64, len: u64) -> FileIo<'static> {
        FileIo::done(punch_hole_now(&self.file, offset, len).map(|()| 0))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }
}

/// `fallocate(PUNCH_HOLE)` on the calling thread.
fn punch_hole_now(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "range exceeds off_t");
    let off = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let len = libc::off_t::try_from(len).map_err(|_| too_big())?;
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    punch_outcome(fallocate(file, flags, off, len).map_err(io::Error::from))
}

/// Opens [`StdBlockFile`]s (buffered I/O, no scheduler).
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFileFactory;

impl BlockFileFactory for StdFileFactory {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn BlockFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create)
            .open(path)?;
        Ok(Arc::new(StdBlockFile::new(file)))
    }
}

/// Scheduling priority of a store operation, passed with every call that does I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoPriority {
    /// An application waits: data-plane reads, writes, trims and flushes, and the
    /// store's blocking API (control operations, tools).
    Foreground,
    /// Nobody waits on one request: copies, scrubs, snapshot merges, versioned reads.
    Background,
}

impl IoPriority {
    /// The scheduler class of a read (`read`) or of anything else at this priority.
    pub(crate) fn class(self, read: bool) -> IoClass {
        match (self, read) {
            (IoPriority::Background, _) => IoClass::Background,
            (IoPriority::Foreground, true) => IoClass::ForegroundRead,
            (IoPriority::Foreground, false) => IoClass::ForegroundWrite,
        }
    }
}

/// How a [`ScheduledBlockFile`] does its reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transfers {
    /// Through the scheduler (the data file).
    Scheduled,
    /// Inline `pread`/`pwrite` on the page cache (the meta file).
    Buffered,
}

/// A layer file whose device I/O goes through the volume's scheduler (see the module
/// doc for which calls do).
#[derive(Debug)]
struct ScheduledBlockFile {
    volume: VolumeHandle,
    file: Arc<File>,
    transfers: Transfers,
}

impl ScheduledBlockFile {
    fn submit<'a>(
        &self,
        priority: IoPriority,
        read: bool,
        request: IoRequest,
        then: Completion<'a>,
    ) -> FileIo<'a> {
        FileIo::scheduled(self.volume.submit(priority.class(read), request), then)
    }
}

/// Copies a completed read into the caller's buffer; returns the bytes copied.
fn copy_read(done: IoCompletion, buf: &mut [u8]) -> usize {
    let Some(data) = done.buf else {
        return 0;
    };
    // The engine returns at most `len` bytes; guard anyway rather than panic.
    let n = data.len().min(buf.len());
    buf[..n].copy_from_slice(&data.as_slice()[..n]);
    n
}

/// Without hole punching (some network filesystems) a trim is still correct, because
/// the tombstone, not the bytes, makes it read as zeros: EOPNOTSUPP is success.
fn punch_outcome<T>(r: io::Result<T>) -> io::Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        Err(e) => Err(e),
    }
}

impl BlockFile for ScheduledBlockFile {
    fn read_at<'a>(&self, priority: IoPriority, buf: &'a mut [u8], offset: u64) -> FileIo<'a> {
        if self.transfers == Transfers::Buffered {
            return FileIo::done(read_full_at(&self.file, buf, offset));
        }
        if buf.is_empty() {
            return FileIo::done(Ok(0));
        }
        let request = IoRequest::Read {
            file: Arc::clone(&self.file),
            offset,
            len: buf.len(),
        };
        self.submit(priority, true, request, Completion::ReadInto(buf))
    }

    fn write_at(&self, priority: IoPriority, buf: &[u8], offset: u64) -> FileIo<'static> {
        if self.transfers == Transfers::Buffered {
            return FileIo::done(self.file.write_all_at(buf, offset).map(|()| buf.len()));
        }
        if buf.is_empty() {
            return FileIo::done(Ok(0));
        }
        let aligned = match AlignedBuf::from_slice(buf) {
            Ok(aligned) => aligned,
            Err(e) => return FileIo::done(Err(io::Error::new(io::ErrorKind::InvalidInput, e))),
        };
        let request = IoRequest::Write {
            file: Arc::clone(&self.file),
            offset,
            buf: aligned,
        };
        self.submit(priority, false, request, Completion::Written)
    }

    fn sync_data(&self, priority: IoPriority) -> FileIo<'static> {
        let request = IoRequest::Fdatasync {
            file: Arc::clone(&self.file),
        };
        self.submit(priority, false, request, Completion::Synced)
    }

    fn punch_hole(&self, priority: IoPriority, offset: u64, len: u64) -> FileIo<'static> {
        let request = IoRequest::PunchHole {
            file: Arc::clone(&self.file),
            offset,
            len,
        };
        self.submit(priority, false, request, Completion::Punched)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // ftruncate changes no data blocks: nothing for the device queue to order.
        self.file.set_len(len)
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }
}

/// Opens a volume's layer files over its scheduler registration (see the module doc).
///
/// Holds the registration in a slot the catalog clears when the volume is deleted:
/// a retired store may outlive the deletion inside a data-plane connection, and must
/// not keep the volume id registered (a re-created volume of the same id registers
/// anew). Files already opened keep their own handle until they are dropped, which a
/// retire does.
#[derive(Debug)]
pub struct ScheduledFileFactory {
    volume: Mutex<Option<VolumeHandle>>,
    direct: bool,
    warned_no_direct: AtomicBool,
}

impl ScheduledFileFactory {
    /// A factory over `volume`; with `direct`, data files are opened `O_DIRECT` (falling
    /// back to buffered I/O, with a warning, on filesystems that refuse it).
    pub fn new(volume: VolumeHandle, direct: bool) -> Self {
        ScheduledFileFactory {
            volume: Mutex::new(Some(volume)),
            direct,
            warned_no_direct: AtomicBool::new(false),
        }
    }

    /// The registration files are opened with, until [`Self::release`].
    pub fn volume(&self) -> Option<VolumeHandle> {
        self.volume
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Drops the factory's registration; later opens fail. Called by the catalog
    /// once a delete committed.
    pub fn release(&self) -> Option<VolumeHandle> {
        self.volume
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn open_file(&self, path: &Path, create: bool, direct: bool) -> io::Result<File> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create_new(create);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        opts.open(path)
    }
}

impl BlockFileFactory for ScheduledFileFactory {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn BlockFile>> {
        let volume = self.volume().ok_or_else(|| {
            io::Error::other(SchedulerError::InvalidRequest(
                "the volume is no longer registered with the I/O scheduler",
            ))
        })?;
        // The store names a layer's files `data` and `meta` (its on-disk format).
        let is_meta = path.file_name().is_some_and(|n| n == "meta");
        let transfers = if is_meta {
            Transfers::Buffered
        } else {
            Transfers::Scheduled
        };
        let file = if is_meta || !self.direct {
            self.open_file(path, create, false)?
        } else {
            match self.open_file(path, create, true) {
                Ok(f) => f,
                // tmpfs and some FUSE filesystems refuse O_DIRECT.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    if !self.warned_no_direct.swap(true, Ordering::Relaxed) {
                        tracing::warn!(path = %path.display(),
                            "filesystem refuses O_DIRECT; using buffered I/O for this volume");
                    }
                    // `create_new` may or may not have created it before failing.
                    let exists = path.exists();
                    self.open_file(path, create && !exists, false)?
                }
                Err(e) => return Err(e),
            }
        };
        Ok(Arc::new(ScheduledBlockFile {
            volume,
            file: Arc::new(file),
            transfers,
        }))
    }

    fn foreground_active(&self) -> bool {
        self.volume().is_some_and(|v| v.foreground_active())
    }
}

/// `pread` until `buf` is full or end of file; returns the bytes read.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::park::block_on;

    const FG: IoPriority = IoPriority::Foreground;

    #[test]
    fn punch_hole_zeroes_and_frees() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = StdFileFactory
            .open(&dir.path().join("f"), true)
            .expect("create");
        assert_eq!(
            block_on(f.write_at(FG, &[7u8; 65536], 0)).expect("write"),
            65536
        );
        block_on(f.sync_data(FG)).expect("sync");
        let before = f.allocated_bytes().expect("stat");
        block_on(f.punch_hole(FG, 0, 32768)).expect("punch");
        let mut buf = vec![1u8; 65536];
        assert_eq!(block_on(f.read_at(FG, &mut buf, 0)).expect("read"), 65536);
        assert!(buf[..32768].iter().all(|&b| b == 0));
        assert!(buf[32768..].iter().all(|&b| b == 7));
        assert!(f.allocated_bytes().expect("stat") < before);
    }

    #[test]
    fn read_past_end_is_short() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = StdFileFactory
            .open(&dir.path().join("f"), true)
            .expect("create");
        block_on(f.write_at(FG, &[7u8; 100], 0)).expect("write");
        let mut buf = [0u8; 200];
        assert_eq!(block_on(f.read_at(FG, &mut buf, 50)).expect("read"), 50);
    }

    #[test]
    fn a_finished_operation_polled_again_is_an_error_not_a_panic() {
        let mut io = FileIo::done(Ok(3));
        assert_eq!(block_on(&mut io).expect("first poll"), 3);
        assert!(block_on(&mut io).is_err());
    }
}

#[cfg(test)]
mod scheduled_tests {
    use super::*;
    use crate::park::block_on;
    use crate::scheduler::{EngineKind, Qos, Scheduler, SchedulerConfig};

    const FG: IoPriority = IoPriority::Foreground;
    use crate::store::LayeredStore;

    fn scheduler(engine: EngineKind) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            name: "test".into(),
            engine,
            ..SchedulerConfig::default()
        })
        .expect("scheduler")
    }

    /// Runs `f` on the blocking pool, where the store runs in the daemon.
    async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        tokio::task::spawn_blocking(f).await.expect("blocking task")
    }

    async fn round_trip(engine: EngineKind) {
        let sched = scheduler(engine);
        let vol = sched
            .register_volume("v", Qos::unlimited())
            .expect("register");
        let dir = tempfile::tempdir().expect("tempdir");
        let factory = Arc::new(ScheduledFileFactory::new(vol.clone(), true));
        let path = dir.path().join("data");
        let f = factory.open(&path, true).expect("create");
        let stats_before = vol.stats().completed_ops;
        let data = blocking(move || {
            f.set_len(1 << 20).expect("size");
            assert_eq!(
                block_on(f.write_at(FG, &[7u8; 8192], 4096)).expect("write"),
                8192
            );
            block_on(f.sync_data(FG)).expect("sync");
            block_on(f.punch_hole(FG, 4096, 4096)).expect("punch");
            let mut buf = vec![1u8; 12288];
            let n = block_on(f.read_at(FG, &mut buf, 0)).expect("read");
            assert_eq!(n, 12288);
            let mut tail = vec![0u8; 8192];
            // Short read at end of file.
            let eof = block_on(f.read_at(IoPriority::Background, &mut tail, (1 << 20) - 4096));
            assert_eq!(eof.expect("eof"), 4096);
            buf
        })
        .await;
        assert!(data[..8192].iter().all(|&b| b == 0));
        assert!(data[8192..].iter().all(|&b| b == 7));
        // write, sync, punch, two reads: all went through the scheduler.
        assert_eq!(vol.stats().completed_ops - stats_before, 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn data_file_round_trip_on_both_engines() {
        round_trip(EngineKind::IoUring).await;
        round_trip(EngineKind::Sync { threads: 2 }).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn meta_transfers_stay_inline() {
        let sched = scheduler(EngineKind::Sync { threads: 2 });
        let vol = sched
            .register_volume("v", Qos::unlimited())
            .expect("register");
        let dir = tempfile::tempdir().expect("tempdir");
        let factory = ScheduledFileFactory::new(vol.clone(), true);
        let meta = factory.open(&dir.path().join("meta"), true).expect("meta");
        meta.write_at(FG, &[1u8; 16], 4096 + 16)
            .await
            .expect("entry");
        let mut e = [0u8; 16];
        assert_eq!(meta.read_at(FG, &mut e, 4096 + 16).await.expect("read"), 16);
        assert_eq!(e, [1u8; 16]);
        assert_eq!(
            vol.stats().completed_ops,
            0,
            "meta entries are not scheduled"
        );
    }

    #[test]
    fn priority_picks_the_scheduler_class() {
        assert_eq!(IoPriority::Foreground.class(true), IoClass::ForegroundRead);
        assert_eq!(
            IoPriority::Foreground.class(false),
            IoClass::ForegroundWrite
        );
        assert_eq!(IoPriority::Background.class(true), IoClass::Background);
        assert_eq!(IoPriority::Background.class(false), IoClass::Background);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn store_over_the_scheduler_matches_std() {
        let sched = scheduler(EngineKind::IoUring);
        let vol = sched
            .register_volume("v", Qos::unlimited())
            .expect("register");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let factory: Arc<dyn BlockFileFactory> =
            Arc::new(ScheduledFileFactory::new(vol.clone(), true));
        let p = path.clone();
        blocking(move || {
            let store = LayeredStore::create_with(&p, 1 << 20, factory).expect("create");
            store.write(8192, &[9u8; 8192], 5).expect("write");
            store.trim(12288, 4096, 6).expect("trim");
            store.flush().expect("flush");
            assert_eq!(store.read(8192, 4096).expect("read"), vec![9u8; 4096]);
            assert_eq!(store.read(12288, 4096).expect("read"), vec![0u8; 4096]);
        })
        .await;
        assert!(vol.stats().completed_ops >= 4);
        // What went to disk O_DIRECT reads back the same through plain std files.
        let store = LayeredStore::open(&path).expect("reopen with std files");
        assert_eq!(store.read(8192, 8192).expect("read"), {
            let mut v = vec![9u8; 4096];
            v.extend_from_slice(&[0u8; 4096]);
            v
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn released_factory_refuses_to_open() {
        let sched = scheduler(EngineKind::Sync { threads: 1 });
        let vol = sched
            .register_volume("v", Qos::unlimited())
            .expect("register");
        let factory = ScheduledFileFactory::new(vol, true);
        assert!(factory.release().is_some());
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(factory.open(&dir.path().join("data"), true).is_err());
        // The registration is gone once the last handle is: the id is free again.
        sched
            .register_volume("v", Qos::unlimited())
            .expect("re-register after release");
    }
}
