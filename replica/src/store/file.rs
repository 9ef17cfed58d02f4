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
//! *Blocking and async.* The [`BlockFile`] methods are synchronous: a scheduled file
//! submits its request and parks the calling thread until the completion
//! ([`VolumeHandle::submit_blocking`]); the store's blocking API (control operations,
//! resync, tools) runs on blocking threads this way. The data plane instead uses the
//! store's async path, which reaches the same file through [`BlockFile::scheduled`] and
//! awaits the request (`*_async` methods of [`ScheduledBlockFile`]) in its own task:
//! no blocking thread and two fewer thread switches per request.
//!
//! *Priority.* Which scheduler class a blocking request gets is decided per thread:
//! foreground by default (reads as foreground reads; writes, trims and flushes as
//! foreground writes), or background inside
//! [`with_io_priority`]`(IoPriority::Background, ..)`, which resync, rebuild, scrub and
//! snapshot merges use so they yield to applications. Async requests name their
//! priority explicitly.

use std::cell::Cell;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use nix::fcntl::{fallocate, FallocateFlags};

use crate::scheduler::{IoClass, IoCompletion, IoRequest, SchedulerError, VolumeHandle};

/// Positioned I/O on one file of a layer (its data file or its meta file).
///
/// All methods may be called concurrently from many threads; the store guarantees that
/// concurrent calls never overlap in byte range with a concurrent write.
pub trait BlockFile: Send + Sync + Debug {
    /// Reads into `buf` from `offset` until `buf` is full or end of file, returning the
    /// bytes read; a short count means end of file, and the store treats the rest as
    /// zeros (which a checksum then rejects if data was expected).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes completed writes (and the file size) durable, like `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;

    /// Deallocates a byte range so it reads as zeros and stops using disk space; the
    /// file size is unchanged. Filesystems without hole punching may leave the space
    /// allocated (the store never relies on the bytes of a trimmed block).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Sets the file length (used to create and grow sparse files).
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Bytes of disk space the file occupies (holes excluded), for capacity accounting.
    fn allocated_bytes(&self) -> io::Result<u64>;

    /// The scheduler route of this file, when it has one. The store's async data path
    /// then awaits the file's requests instead of calling the blocking methods above;
    /// with `None` (the default: std files, test wrappers) it calls those inline.
    fn scheduled(&self) -> Option<&ScheduledBlockFile> {
        None
    }
}

/// Opens the files of a layer. A daemon picks one factory per backing device (std
/// files now, the io_uring scheduler later); tests wrap it to inject faults.
pub trait BlockFileFactory: Send + Sync + Debug {
    /// Opens `path` for reading and writing, creating it (empty) when `create` is set.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn BlockFile>>;
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
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        read_full_at(&self.file, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "range exceeds off_t");
        let off = libc::off_t::try_from(offset).map_err(|_| too_big())?;
        let len = libc::off_t::try_from(len).map_err(|_| too_big())?;
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(&self.file, flags, off, len) {
            Ok(()) => Ok(()),
            // No hole punching here (e.g. some network filesystems): the trim is still
            // correct because the tombstone entry, not the bytes, makes it read as zeros.
            Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(io::Error::from(e)),
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }
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

/// Scheduling priority of the store I/O a thread issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoPriority {
    /// An application waits: data-plane reads, writes, trims and flushes.
    Foreground,
    /// Nobody waits on one request: resync, rebuild, scrub, snapshot merges.
    Background,
}

thread_local! {
    static PRIORITY: Cell<IoPriority> = const { Cell::new(IoPriority::Foreground) };
}

/// Restores the previous priority when a [`with_io_priority`] scope ends, also by
/// unwinding.
struct PriorityGuard(IoPriority);

impl Drop for PriorityGuard {
    fn drop(&mut self) {
        PRIORITY.with(|p| p.set(self.0));
    }
}

/// Runs `f` with the store I/O of this thread scheduled at `priority`. Why a
/// thread-local and not a parameter: the store's calls are synchronous and run on the
/// caller's thread from start to end, so the scope covers exactly the I/O `f` causes
/// without threading a class through every store and layer method.
pub fn with_io_priority<T>(priority: IoPriority, f: impl FnOnce() -> T) -> T {
    let previous = PRIORITY.with(|p| p.replace(priority));
    let _restore = PriorityGuard(previous);
    f()
}

/// The priority in force on this thread.
pub fn current_io_priority() -> IoPriority {
    PRIORITY.with(Cell::get)
}

fn class_for(read: bool) -> IoClass {
    class_of(current_io_priority(), read)
}

/// The scheduler class of a read (`read`) or of anything else at `priority`.
pub(crate) fn class_of(priority: IoPriority, read: bool) -> IoClass {
    match (priority, read) {
        (IoPriority::Background, _) => IoClass::Background,
        (IoPriority::Foreground, true) => IoClass::ForegroundRead,
        (IoPriority::Foreground, false) => IoClass::ForegroundWrite,
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
pub struct ScheduledBlockFile {
    volume: VolumeHandle,
    file: Arc<File>,
    transfers: Transfers,
}

impl ScheduledBlockFile {
    fn submit(&self, read: bool, request: IoRequest) -> io::Result<IoCompletion> {
        self.volume
            .submit_blocking(class_for(read), request)
            .map_err(io::Error::from)
    }

    async fn submit_async(
        &self,
        priority: IoPriority,
        read: bool,
        request: IoRequest,
    ) -> io::Result<IoCompletion> {
        self.volume
            .submit(class_of(priority, read), request)
            .await
            .map_err(io::Error::from)
    }

    fn read_request(&self, offset: u64, len: usize) -> IoRequest {
        IoRequest::Read {
            file: Arc::clone(&self.file),
            offset,
            len,
        }
    }

    fn write_request(&self, buf: &[u8], offset: u64) -> io::Result<IoRequest> {
        let aligned = crate::scheduler::AlignedBuf::from_slice(buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(IoRequest::Write {
            file: Arc::clone(&self.file),
            offset,
            buf: aligned,
        })
    }

    fn sync_request(&self) -> IoRequest {
        IoRequest::Fdatasync {
            file: Arc::clone(&self.file),
        }
    }

    fn punch_request(&self, offset: u64, len: u64) -> IoRequest {
        IoRequest::PunchHole {
            file: Arc::clone(&self.file),
            offset,
            len,
        }
    }

    /// [`BlockFile::read_at`] for async callers: the thread is not blocked while the
    /// request waits (meta files still read the page cache inline).
    pub async fn read_at_async(
        &self,
        priority: IoPriority,
        buf: &mut [u8],
        offset: u64,
    ) -> io::Result<usize> {
        if self.transfers == Transfers::Buffered {
            return read_full_at(&self.file, buf, offset);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let done = self
            .submit_async(priority, true, self.read_request(offset, buf.len()))
            .await?;
        Ok(copy_read(done, buf))
    }

    /// [`BlockFile::write_at`] for async callers (meta files still write the page
    /// cache inline).
    pub async fn write_at_async(
        &self,
        priority: IoPriority,
        buf: &[u8],
        offset: u64,
    ) -> io::Result<()> {
        if self.transfers == Transfers::Buffered {
            return self.file.write_all_at(buf, offset);
        }
        if buf.is_empty() {
            return Ok(());
        }
        let request = self.write_request(buf, offset)?;
        self.submit_async(priority, false, request).await.map(drop)
    }

    /// [`BlockFile::sync_data`] for async callers.
    pub async fn sync_data_async(&self, priority: IoPriority) -> io::Result<()> {
        self.submit_async(priority, false, self.sync_request())
            .await
            .map(drop)
    }

    /// [`BlockFile::punch_hole`] for async callers.
    pub async fn punch_hole_async(
        &self,
        priority: IoPriority,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let r = self
            .submit_async(priority, false, self.punch_request(offset, len))
            .await;
        punch_outcome(r)
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

/// As in [`StdBlockFile`]: without hole punching the tombstone, not the bytes, makes a
/// trim read zeros, so EOPNOTSUPP is success.
fn punch_outcome<T>(r: io::Result<T>) -> io::Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        Err(e) => Err(e),
    }
}

impl BlockFile for ScheduledBlockFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if self.transfers == Transfers::Buffered {
            return read_full_at(&self.file, buf, offset);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let done = self.submit(true, self.read_request(offset, buf.len()))?;
        Ok(copy_read(done, buf))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.transfers == Transfers::Buffered {
            return self.file.write_all_at(buf, offset);
        }
        if buf.is_empty() {
            return Ok(());
        }
        let request = self.write_request(buf, offset)?;
        self.submit(false, request).map(drop)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.submit(false, self.sync_request()).map(drop)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        punch_outcome(self.submit(false, self.punch_request(offset, len)))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // ftruncate changes no data blocks: nothing for the device queue to order.
        self.file.set_len(len)
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }

    fn scheduled(&self) -> Option<&ScheduledBlockFile> {
        Some(self)
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

    #[test]
    fn punch_hole_zeroes_and_frees() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = StdFileFactory
            .open(&dir.path().join("f"), true)
            .expect("create");
        f.write_at(&[7u8; 65536], 0).expect("write");
        f.sync_data().expect("sync");
        let before = f.allocated_bytes().expect("stat");
        f.punch_hole(0, 32768).expect("punch");
        let mut buf = vec![1u8; 65536];
        assert_eq!(f.read_at(&mut buf, 0).expect("read"), 65536);
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
        f.write_at(&[7u8; 100], 0).expect("write");
        let mut buf = [0u8; 200];
        assert_eq!(f.read_at(&mut buf, 50).expect("read"), 50);
    }
}

#[cfg(test)]
mod scheduled_tests {
    use super::*;
    use crate::scheduler::{EngineKind, Qos, Scheduler, SchedulerConfig};
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
            f.write_at(&[7u8; 8192], 4096).expect("write");
            f.sync_data().expect("sync");
            f.punch_hole(4096, 4096).expect("punch");
            let mut buf = vec![1u8; 12288];
            let n = f.read_at(&mut buf, 0).expect("read");
            assert_eq!(n, 12288);
            let mut tail = vec![0u8; 8192];
            // Short read at end of file.
            assert_eq!(f.read_at(&mut tail, (1 << 20) - 4096).expect("eof"), 4096);
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
    async fn meta_transfers_stay_inline_and_priority_is_scoped() {
        let sched = scheduler(EngineKind::Sync { threads: 2 });
        let vol = sched
            .register_volume("v", Qos::unlimited())
            .expect("register");
        let dir = tempfile::tempdir().expect("tempdir");
        let factory = ScheduledFileFactory::new(vol.clone(), true);
        let meta = factory.open(&dir.path().join("meta"), true).expect("meta");
        blocking(move || {
            meta.write_at(&[1u8; 16], 4096 + 16).expect("entry");
            let mut e = [0u8; 16];
            assert_eq!(meta.read_at(&mut e, 4096 + 16).expect("read"), 16);
            assert_eq!(e, [1u8; 16]);
        })
        .await;
        assert_eq!(
            vol.stats().completed_ops,
            0,
            "meta entries are not scheduled"
        );

        assert_eq!(current_io_priority(), IoPriority::Foreground);
        let inner = with_io_priority(IoPriority::Background, || {
            let nested = with_io_priority(IoPriority::Foreground, current_io_priority);
            (nested, current_io_priority(), class_for(true))
        });
        assert_eq!(
            inner,
            (
                IoPriority::Foreground,
                IoPriority::Background,
                IoClass::Background
            )
        );
        assert_eq!(current_io_priority(), IoPriority::Foreground);
        assert_eq!(class_for(true), IoClass::ForegroundRead);
        assert_eq!(class_for(false), IoClass::ForegroundWrite);
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
