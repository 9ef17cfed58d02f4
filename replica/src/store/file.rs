//! The file I/O the store needs, as a trait, plus the synchronous std implementation.
//!
//! The store never touches `std::fs::File` for block data directly: it goes through
//! [`BlockFile`], opened by a [`BlockFileFactory`]. That keeps the io_uring scheduler
//! pluggable (it implements the same five operations) and lets tests inject faults,
//! such as a metadata write that never happens, to simulate a crash between two writes.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use nix::fcntl::{fallocate, FallocateFlags};

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
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
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

/// Opens [`StdBlockFile`]s (buffered I/O; see the module doc of `store` for O_DIRECT).
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
