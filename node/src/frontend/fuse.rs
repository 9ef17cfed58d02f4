//! [`FuseVolume`]: a FUSE filesystem holding exactly one regular file, the volume.
//!
//! The filesystem's root directory contains one file, [`VOLUME_FILE_NAME`], whose size
//! is the volume size and whose reads, writes, fsyncs and hole punches go straight to a
//! [`BlockTarget`]. A loop device attached to that file turns it into a block device.
//!
//! Choices, from the measurements in DESIGN.md ("Measured on these machines"):
//! * `open` replies `FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES`: the kernel keeps no
//!   page cache for the file (the filesystem above the loop device has its own) and may
//!   send several writes to the file at once.
//! * `FUSE_ASYNC_DIO` is requested so that the loop device's asynchronous direct I/O
//!   reaches the server as concurrent requests instead of one at a time.
//! * Several worker threads, each with its own cloned `/dev/fuse` descriptor; a single
//!   thread halves 4 KiB QD32 throughput here.
//! * `max_write` 1 MiB and a raised `max_background`, so large and queued requests are
//!   not split or throttled by the kernel.
//! * Reads, writes, fsyncs and hole punches are handed to the target's `submit_*`
//!   methods with the reply object inside a [`Completion`]: a worker thread never
//!   waits for the target, so the requests in flight are bounded by the kernel's
//!   queues (`max_background`, the loop device's queue depth), not by `threads`. The
//!   worker threads only parse requests and copy write payloads out of their receive
//!   buffers; the replies are sent by whichever thread completes the request.
//!
//! The file cannot be truncated, renamed or removed. Its size changes only through
//! [`FuseVolume::set_size`], which only grows it (volume expansion).

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, Notifier, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, Session,
    SessionACL, TimeOrNow, WriteFlags,
};
use nix::errno::Errno as NixErrno;
use nix::mount::{umount2, MntFlags};

use super::cleanup::read_mountinfo;
use super::{BlockTarget, Completion, ReadCompletion};

/// Name of the one file in the filesystem; the loop device is attached to
/// `<mountpoint>/volume`.
pub const VOLUME_FILE_NAME: &str = "volume";

const ROOT_INO: INodeNo = INodeNo::ROOT;
const VOLUME_INO: INodeNo = INodeNo(2);
/// Block size reported by stat and statfs: the volume's block size.
const BLOCK_SIZE: u32 = 4096;
/// How long to wait for the worker threads to end after a successful unmount.
const THREAD_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Tuning of a [`FuseVolume`]. The defaults are the values DESIGN.md measured as best
/// on 2-core machines; tests and benchmarks change them to compare.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// Worker threads serving requests, each with its own cloned `/dev/fuse` fd. A
    /// target with synchronous `submit_*` methods sees at most this many requests at
    /// once; an asynchronous one (the engine) sees whatever the kernel queues.
    pub threads: usize,
    /// Largest read or write the kernel sends in one request, in bytes.
    pub max_write: u32,
    /// Requests the kernel may queue to the server in the background (asynchronous
    /// direct I/O from the loop device counts here).
    pub max_background: u16,
    /// How long the kernel may cache attributes (the size) without asking.
    pub attr_ttl: Duration,
    /// How long [`FuseVolume::mount`] waits for the mount to answer a `stat`.
    pub mount_timeout: Duration,
    /// Source name shown in `/proc/self/mountinfo`; [`super::cleanup_stale`] does not
    /// depend on it.
    pub fs_name: String,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            threads: 4,
            max_write: 1 << 20,
            max_background: 256,
            attr_ttl: Duration::from_secs(1),
            mount_timeout: Duration::from_secs(10),
            fs_name: "tessera".to_owned(),
        }
    }
}

/// Why mounting, resizing or unmounting a [`FuseVolume`] failed.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// The options cannot work (for example zero threads).
    #[error("invalid FUSE options: {reason}")]
    InvalidOptions {
        /// What is wrong.
        reason: String,
    },
    /// Opening `/dev/fuse`, the mount syscall or the FUSE handshake failed.
    #[error("cannot mount the FUSE volume at {mountpoint}")]
    Mount {
        /// Where the mount was attempted.
        mountpoint: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The mount was made but `stat` of the volume file failed or did not answer in
    /// time; the mount was detached again.
    #[error("FUSE volume at {mountpoint} did not answer stat of {file} within {timeout:?}")]
    NotLive {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// The file that was stat'ed.
        file: PathBuf,
        /// How long was waited.
        timeout: Duration,
        /// The stat error, if stat returned at all.
        #[source]
        source: Option<io::Error>,
    },
    /// Starting the server thread failed.
    #[error("cannot start the FUSE server thread for {mountpoint}")]
    Spawn {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `umount2` failed for a reason other than the mount being busy.
    #[error("cannot unmount the FUSE volume at {mountpoint}")]
    Unmount {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// The cause.
        #[source]
        source: NixErrno,
    },
    /// The mount was busy (typically a loop device still attached to the file), so it
    /// was lazily detached: it is gone from the mount table, but the server keeps
    /// serving the open file until its last user closes it.
    #[error(
        "FUSE volume at {mountpoint} was busy and was lazily detached; \
         it is served until its last user (a loop device?) lets go"
    )]
    LazilyDetached {
        /// The mountpoint.
        mountpoint: PathBuf,
    },
    /// A resize asked for less than the current size or more than the target holds.
    #[error(
        "cannot resize FUSE volume at {mountpoint} from {current} to {requested} bytes \
         (target holds {target} bytes; volumes only grow)"
    )]
    Resize {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// Current size exposed by the file.
        current: u64,
        /// Size asked for.
        requested: u64,
        /// Size of the target.
        target: u64,
    },
    /// Telling the kernel about the new size failed.
    #[error("cannot publish the new size of FUSE volume at {mountpoint} to the kernel")]
    Notify {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Mounted,
    LazilyDetached,
    Unmounted,
}

/// A mounted FUSE filesystem serving one [`BlockTarget`] as the file
/// `<mountpoint>/volume`.
///
/// Dropping it unmounts (lazily if busy); the serving threads end when the kernel
/// closes the connection.
pub struct FuseVolume {
    mountpoint: PathBuf,
    file: PathBuf,
    size: Arc<AtomicU64>,
    target: Arc<dyn BlockTarget>,
    notifier: Notifier,
    /// A duplicate of the server's `/dev/fuse` fd, used only to ask whether the
    /// connection is still alive.
    conn: OwnedFd,
    /// Device number of this mount, so that unmount never touches a newer mount that
    /// reuses the path after ours went away.
    dev: Option<(u32, u32)>,
    thread: Option<JoinHandle<io::Result<()>>>,
    state: State,
}

impl std::fmt::Debug for FuseVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseVolume")
            .field("mountpoint", &self.mountpoint)
            .field("size", &self.size.load(Ordering::Relaxed))
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl FuseVolume {
    /// Mounts a filesystem serving `target` at `mountpoint` (an existing directory) and
    /// returns once `stat` of the volume file answers with the right size.
    pub fn mount(
        target: Arc<dyn BlockTarget>,
        mountpoint: &Path,
        opts: FuseOptions,
    ) -> Result<FuseVolume, FuseError> {
        if opts.threads == 0 {
            return Err(FuseError::InvalidOptions {
                reason: "threads must be at least 1".to_owned(),
            });
        }
        let mountpoint = mountpoint
            .canonicalize()
            .map_err(|source| FuseError::Mount {
                mountpoint: mountpoint.to_owned(),
                source,
            })?;
        let size = Arc::new(AtomicU64::new(target.size()));
        let fs = VolumeFs {
            target: Arc::clone(&target),
            size: Arc::clone(&size),
            attr_ttl: opts.attr_ttl,
            max_write: opts.max_write,
            max_background: opts.max_background,
            created: SystemTime::now(),
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(opts.fs_name.clone()),
            MountOption::Subtype("tessera".to_owned()),
            MountOption::DefaultPermissions,
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::NoExec,
            MountOption::NoAtime,
        ];
        config.acl = SessionACL::Owner;
        config.n_threads = Some(opts.threads);
        config.clone_fd = true;

        // Session::new mounts and completes the INIT handshake before returning.
        let session =
            Session::new(fs, &mountpoint, &config).map_err(|source| FuseError::Mount {
                mountpoint: mountpoint.clone(),
                source,
            })?;
        let conn = session
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| FuseError::Mount {
                mountpoint: mountpoint.clone(),
                source,
            })?;
        let notifier = session.notifier();
        // The mount is the last FUSE entry at this path in the mount table.
        let dev = read_mountinfo().ok().and_then(|entries| {
            entries
                .into_iter()
                .rev()
                .find(|m| m.mountpoint == mountpoint && m.is_fuse())
                .map(|m| m.dev)
        });
        let thread = std::thread::Builder::new()
            .name("tessera-fuse".to_owned())
            .spawn(move || session.run());
        let file = mountpoint.join(VOLUME_FILE_NAME);
        let mut volume = FuseVolume {
            mountpoint: mountpoint.clone(),
            file,
            size,
            target,
            notifier,
            conn,
            dev,
            thread: None,
            state: State::Mounted,
        };
        match thread {
            Ok(handle) => volume.thread = Some(handle),
            Err(source) => {
                // Nobody serves the mount: detach it so nothing blocks on it.
                let _ = umount2(&volume.mountpoint, MntFlags::MNT_DETACH);
                volume.state = State::Unmounted;
                return Err(FuseError::Spawn { mountpoint, source });
            }
        }
        if let Err(e) = volume.verify_live(opts.mount_timeout) {
            if let Err(unmount_err) = volume.unmount() {
                tracing::warn!(error = %unmount_err, "cleanup after a failed FUSE mount");
            }
            return Err(e);
        }
        tracing::debug!(mountpoint = %volume.mountpoint.display(), "FUSE volume mounted");
        Ok(volume)
    }

    /// Stats the volume file from a helper thread so a server that does not answer
    /// cannot hang the caller.
    fn verify_live(&self, timeout: Duration) -> Result<(), FuseError> {
        let (tx, rx) = mpsc::channel();
        let file = self.file.clone();
        let spawned = std::thread::Builder::new()
            .name("tessera-fuse-stat".to_owned())
            .spawn(move || {
                let _ = tx.send(std::fs::metadata(&file));
            });
        let not_live = |source| FuseError::NotLive {
            mountpoint: self.mountpoint.clone(),
            file: self.file.clone(),
            timeout,
            source,
        };
        if let Err(e) = spawned {
            return Err(not_live(Some(e)));
        }
        match rx.recv_timeout(timeout) {
            Ok(Ok(meta)) if meta.is_file() && meta.len() == self.size() => Ok(()),
            Ok(Ok(meta)) => Err(not_live(Some(io::Error::other(format!(
                "volume file has length {} (expected {}), is_file={}",
                meta.len(),
                self.size(),
                meta.is_file()
            ))))),
            Ok(Err(e)) => Err(not_live(Some(e))),
            Err(_) => Err(not_live(None)),
        }
    }

    /// The directory the filesystem is mounted on.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Path of the volume file, the one to attach a loop device to.
    pub fn file_path(&self) -> &Path {
        &self.file
    }

    /// Size the volume file currently has, in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The target this volume serves.
    pub fn target(&self) -> &Arc<dyn BlockTarget> {
        &self.target
    }

    /// Whether the kernel connection is still open, i.e. the server still serves the
    /// file to someone (true after a lazy detach until the last user lets go).
    pub fn is_serving(&self) -> bool {
        connection_alive(&self.conn)
    }

    /// Grows the volume file to `new_size` bytes (volume expansion). The target must
    /// already hold at least `new_size` bytes. The kernel learns the new size before
    /// this returns; a loop device on the file then needs
    /// [`LoopDevice::set_capacity`](super::LoopDevice::set_capacity).
    pub fn set_size(&self, new_size: u64) -> Result<(), FuseError> {
        let current = self.size();
        let target = self.target.size();
        if new_size < current || new_size > target {
            return Err(FuseError::Resize {
                mountpoint: self.mountpoint.clone(),
                current,
                requested: new_size,
                target,
            });
        }
        self.size.store(new_size, Ordering::Release);
        // Drop the kernel's cached attributes (offset -1: keep the page cache, there is
        // none with direct I/O), then stat so the kernel's inode size is refreshed now;
        // LOOP_SET_CAPACITY reads that cached size without asking the server.
        self.notifier
            .inval_inode(VOLUME_INO, -1, 0)
            .map_err(|source| FuseError::Notify {
                mountpoint: self.mountpoint.clone(),
                source,
            })?;
        let meta = std::fs::metadata(&self.file).map_err(|source| FuseError::Notify {
            mountpoint: self.mountpoint.clone(),
            source,
        })?;
        if meta.len() != new_size {
            return Err(FuseError::Notify {
                mountpoint: self.mountpoint.clone(),
                source: io::Error::other(format!(
                    "kernel still reports {} bytes after resize to {new_size}",
                    meta.len()
                )),
            });
        }
        Ok(())
    }

    /// Unmounts the filesystem. Idempotent: later calls return `Ok`.
    ///
    /// If the mount is busy (a loop device is still attached, a process has the file
    /// open), it is lazily detached and [`FuseError::LazilyDetached`] is returned: the
    /// mount is gone from the mount table, but the server keeps serving the open file
    /// until its users close it, so no I/O in flight fails.
    pub fn unmount(&mut self) -> Result<(), FuseError> {
        match self.state {
            State::Unmounted => return Ok(()),
            State::LazilyDetached => {
                self.reap_thread(Duration::ZERO);
                return Ok(());
            }
            State::Mounted => {}
        }
        if !self.still_in_mount_table() {
            // Someone else unmounted it; the path may by now belong to another mount,
            // so it is not touched.
            self.state = State::Unmounted;
            self.reap_thread(THREAD_EXIT_TIMEOUT);
            return Ok(());
        }
        match umount2(&self.mountpoint, MntFlags::empty()) {
            Ok(()) => {
                self.state = State::Unmounted;
                self.reap_thread(THREAD_EXIT_TIMEOUT);
                Ok(())
            }
            Err(NixErrno::EBUSY) => {
                umount2(&self.mountpoint, MntFlags::MNT_DETACH).map_err(|source| {
                    FuseError::Unmount {
                        mountpoint: self.mountpoint.clone(),
                        source,
                    }
                })?;
                self.state = State::LazilyDetached;
                Err(FuseError::LazilyDetached {
                    mountpoint: self.mountpoint.clone(),
                })
            }
            Err(NixErrno::EINVAL) if !self.still_in_mount_table() => {
                self.state = State::Unmounted;
                self.reap_thread(THREAD_EXIT_TIMEOUT);
                Ok(())
            }
            Err(source) => Err(FuseError::Unmount {
                mountpoint: self.mountpoint.clone(),
                source,
            }),
        }
    }

    /// Whether our mount (same path and device number) is still in the mount table.
    /// If the table cannot be read, assume it is, so unmount is still attempted.
    fn still_in_mount_table(&self) -> bool {
        match (read_mountinfo(), self.dev) {
            (Ok(entries), Some(dev)) => entries
                .iter()
                .any(|m| m.mountpoint == self.mountpoint && m.dev == dev),
            (Ok(entries), None) => entries
                .iter()
                .any(|m| m.mountpoint == self.mountpoint && m.is_fuse()),
            (Err(_), _) => true,
        }
    }

    /// Joins the server thread if it ends within `timeout`; otherwise leaves it running
    /// detached (it ends by itself when the kernel closes the connection).
    fn reap_thread(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let Some(handle) = self.thread.take() else {
            return;
        };
        while !handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if !handle.is_finished() {
            if timeout > Duration::ZERO {
                tracing::warn!(
                    mountpoint = %self.mountpoint.display(),
                    "FUSE server threads still running after unmount; leaving them detached"
                );
            }
            self.thread = Some(handle);
            return;
        }
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                mountpoint = %self.mountpoint.display(),
                error = %e,
                "FUSE server ended with an error"
            ),
            Err(_) => tracing::error!(
                mountpoint = %self.mountpoint.display(),
                "FUSE server thread panicked"
            ),
        }
    }
}

impl Drop for FuseVolume {
    fn drop(&mut self) {
        match self.unmount() {
            Ok(()) => {}
            Err(e @ FuseError::LazilyDetached { .. }) => {
                tracing::warn!(error = %e, "FUSE volume dropped while busy")
            }
            Err(e) => tracing::error!(error = %e, "cannot unmount FUSE volume on drop"),
        }
    }
}

/// Whether the FUSE connection behind `fd` is still open. The kernel reports `POLLERR`
/// on every fd of a connection once it is aborted or unmounted.
fn connection_alive(fd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is a valid pollfd for the duration of the call, nfds is 1 and
        // the fd stays open because `fd` is borrowed for the whole call.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        if rc >= 0 {
            return rc == 0 || pfd.revents & libc::POLLERR == 0;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // poll on a valid fd only fails for EINTR or ENOMEM; assume alive so that a
            // caller still tries to unmount.
            return true;
        }
    }
}

/// The filesystem served on the FUSE worker threads.
struct VolumeFs {
    target: Arc<dyn BlockTarget>,
    size: Arc<AtomicU64>,
    attr_ttl: Duration,
    max_write: u32,
    max_background: u16,
    created: SystemTime,
}

fn errno(code: i32) -> Errno {
    Errno::from_i32(code)
}

impl VolumeFs {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, nlink, size) = if ino == ROOT_INO {
            (FileType::Directory, 0o755, 2, 0)
        } else if ino == VOLUME_INO {
            (FileType::RegularFile, 0o600, 1, self.size())
        } else {
            return None;
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLOCK_SIZE,
            flags: 0,
        })
    }
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(nearest) = config.set_max_write(self.max_write) {
            let _ = config.set_max_write(nearest);
        }
        if let Err(nearest) = config.set_max_background(self.max_background) {
            let _ = config.set_max_background(nearest);
        }
        if let Err(unsupported) = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO) {
            tracing::warn!(
                ?unsupported,
                "kernel lacks FUSE_ASYNC_DIO; direct I/O is serialised"
            );
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != ROOT_INO || name != VOLUME_FILE_NAME {
            return reply.error(Errno::ENOENT);
        }
        match self.attr(VOLUME_INO) {
            Some(attr) => reply.entry(&self.attr_ttl, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&self.attr_ttl, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // Truncation would drop or invent volume data; growth goes through set_size.
        // Mode, owner and time changes are accepted and ignored.
        if let Some(size) = size {
            if ino != VOLUME_INO || size != attr.size {
                return reply.error(Errno::EPERM);
            }
        }
        reply.attr(&self.attr_ttl, &attr)
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != VOLUME_INO {
            return reply.error(Errno::EISDIR);
        }
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        )
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != VOLUME_INO {
            return reply.error(Errno::EISDIR);
        }
        let end = self.size();
        if offset >= end {
            return reply.data(&[]);
        }
        let len = u64::from(size).min(end - offset) as usize;
        self.target
            .submit_read(offset, len, ReadCompletion::fuse(reply))
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != VOLUME_INO {
            return reply.error(Errno::EISDIR);
        }
        let Ok(len) = u32::try_from(data.len()) else {
            return reply.error(Errno::EINVAL);
        };
        match offset.checked_add(u64::from(len)) {
            Some(end) if end <= self.size() => {}
            // The file never grows by writing past its end: the volume is fixed-size.
            _ => return reply.error(Errno::ENOSPC),
        }
        self.target
            .submit_write(offset, data, Completion::fuse_write(reply, len))
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Sent on close(2): make what was written durable so a writer that closes
        // without fsync (dd without conv=fsync) does not lose data on an engine crash.
        if ino != VOLUME_INO {
            return reply.ok();
        }
        self.target.submit_flush(Completion::fuse_empty(reply))
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino != VOLUME_INO {
            return reply.ok();
        }
        self.target.submit_flush(Completion::fuse_empty(reply))
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT_INO, FileType::Directory, "."),
            (ROOT_INO, FileType::Directory, ".."),
            (VOLUME_INO, FileType::RegularFile, VOLUME_FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.size() / u64::from(BLOCK_SIZE);
        reply.statfs(blocks, 0, 0, 1, 0, BLOCK_SIZE, 255, BLOCK_SIZE)
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // default_permissions makes the kernel check modes itself.
        reply.ok()
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != VOLUME_INO {
            return reply.error(Errno::EISDIR);
        }
        let size = self.size();
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let op = mode & !libc::FALLOC_FL_KEEP_SIZE;
        let Some(end) = offset.checked_add(length) else {
            return reply.error(Errno::EINVAL);
        };
        if end > size && !keep_size {
            // Would grow the file; the size only changes through set_size.
            return reply.error(errno(libc::EOPNOTSUPP));
        }
        let discard_end = end.min(size);
        match op {
            // Plain allocation inside the file: the space is the target's business.
            0 => reply.ok(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE => {
                if offset >= discard_end {
                    return reply.ok();
                }
                self.target.submit_discard(
                    offset,
                    discard_end - offset,
                    Completion::fuse_empty(reply),
                )
            }
            _ => reply.error(errno(libc::EOPNOTSUPP)),
        }
    }
}
