//! [`FileTarget`]: a [`BlockTarget`] backed by one plain local file.
//!
//! It has no replication and no checksums. It exists so tests and benchmarks can run
//! the FUSE + loop transport against something simple whose contents can be checked
//! directly on disk, and so the transport's own cost can be measured apart from the
//! engine's.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{BlockTarget, TargetError, TargetErrorKind, TargetOp};

/// A volume stored in a single local file, read and written with `pread`/`pwrite`
/// through the page cache; `flush` is `fdatasync`, `discard` punches a hole.
#[derive(Debug)]
pub struct FileTarget {
    file: File,
    path: PathBuf,
    size: AtomicU64,
}

/// Why a [`FileTarget`] could not be opened, created or resized.
#[derive(Debug, thiserror::Error)]
pub enum FileTargetError {
    /// Opening or creating the file failed.
    #[error("cannot open volume file {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Changing or reading the file's length failed.
    #[error("cannot set or read the length of volume file {path}")]
    Length {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A resize would have shrunk the volume, which would drop data.
    #[error("volume file {path} is {current} bytes; refusing to shrink it to {requested}")]
    Shrink {
        /// The file.
        path: PathBuf,
        /// Its current size.
        current: u64,
        /// The size asked for.
        requested: u64,
    },
}

impl FileTarget {
    /// Creates (or truncates) `path` as a sparse file of `size` bytes.
    pub fn create(path: &Path, size: u64) -> Result<Self, FileTargetError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| FileTargetError::Open {
                path: path.to_owned(),
                source,
            })?;
        file.set_len(size)
            .map_err(|source| FileTargetError::Length {
                path: path.to_owned(),
                source,
            })?;
        Ok(FileTarget {
            file,
            path: path.to_owned(),
            size: AtomicU64::new(size),
        })
    }

    /// Opens an existing file; the volume size is the file's length.
    pub fn open(path: &Path) -> Result<Self, FileTargetError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| FileTargetError::Open {
                path: path.to_owned(),
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| FileTargetError::Length {
                path: path.to_owned(),
                source,
            })?
            .len();
        Ok(FileTarget {
            file,
            path: path.to_owned(),
            size: AtomicU64::new(size),
        })
    }

    /// Grows the file to `new_size` bytes (used to test volume expansion). Shrinking is
    /// refused, as it is for real volumes.
    pub fn grow(&self, new_size: u64) -> Result<(), FileTargetError> {
        let current = self.size.load(Ordering::Acquire);
        if new_size < current {
            return Err(FileTargetError::Shrink {
                path: self.path.clone(),
                current,
                requested: new_size,
            });
        }
        self.file
            .set_len(new_size)
            .map_err(|source| FileTargetError::Length {
                path: self.path.clone(),
                source,
            })?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// The file this target stores the volume in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_range(&self, op: TargetOp, offset: u64, len: u64) -> Result<(), TargetError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(TargetError::new(
                TargetErrorKind::OutOfRange,
                op,
                offset,
                len,
            )),
        }
    }
}

impl BlockTarget for FileTarget {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), TargetError> {
        let len = buf.len() as u64;
        self.check_range(TargetOp::Read, offset, len)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| TargetError::from_io(TargetOp::Read, offset, len, e))
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), TargetError> {
        let len = data.len() as u64;
        self.check_range(TargetOp::Write, offset, len)?;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| TargetError::from_io(TargetOp::Write, offset, len, e))
    }

    fn flush(&self) -> Result<(), TargetError> {
        self.file
            .sync_data()
            .map_err(|e| TargetError::from_io(TargetOp::Flush, 0, 0, e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), TargetError> {
        self.check_range(TargetOp::Discard, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(TargetError::new(
                TargetErrorKind::OutOfRange,
                TargetOp::Discard,
                offset,
                len,
            ));
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by
        // `self.file` and stays open for the duration of the call.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            // The filesystem under the file cannot punch holes; zeroes keep the
            // contract (the range reads back as zeroes) at the cost of space.
            return self.write_zeroes(offset, len);
        }
        Err(TargetError::from_io(TargetOp::Discard, offset, len, err))
    }
}

impl FileTarget {
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), TargetError> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK) as usize;
            self.file
                .write_all_at(&zeroes[..n], offset + done)
                .map_err(|e| TargetError::from_io(TargetOp::Discard, offset, len, e))?;
            done += n as u64;
        }
        Ok(())
    }
}
