//! O_DIRECT reads and writes and reproducible data, for tests that check bytes on a
//! published Tessera device or file.
//!
//! O_DIRECT bypasses the page cache, so what a test reads back came from the replicas
//! through the whole data path, not from memory of what it just wrote.

use std::fs;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Direct I/O alignment (and the volumes' block size).
pub const ALIGN: usize = 4096;

/// Deterministic pseudo-random bytes (xorshift64*), different for every seed, so a
/// test can regenerate what it wrote instead of keeping it.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A heap buffer whose usable part starts on an [`ALIGN`] boundary, as O_DIRECT needs.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> AlignedBuf {
        assert_eq!(
            len % ALIGN,
            0,
            "direct I/O lengths are multiples of {ALIGN}"
        );
        let raw = vec![0u8; len + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        AlignedBuf { raw, start, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

fn open_direct(path: &Path, write: bool) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
}

/// Writes `data` at `offset` with O_DIRECT, then fdatasync, so it returns only once
/// the data path acknowledged the write as durable.
pub fn direct_write(path: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let file = open_direct(path, true)?;
    let mut buf = AlignedBuf::zeroed(data.len());
    buf.as_mut_slice().copy_from_slice(data);
    file.write_all_at(buf.as_slice(), offset)?;
    file.sync_data()
}

/// Reads `len` bytes at `offset` with O_DIRECT.
pub fn direct_read(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let file = open_direct(path, false)?;
    let mut buf = AlignedBuf::zeroed(len);
    file.read_exact_at(buf.as_mut_slice(), offset)?;
    Ok(buf.as_slice().to_vec())
}

/// A file or device opened once with O_DIRECT, for tests that do many small I/Os
/// (opening per I/O would dominate their cost).
#[derive(Debug)]
pub struct DirectFile {
    file: fs::File,
}

impl DirectFile {
    /// Opens `path` for O_DIRECT reads, and writes when `write`.
    pub fn open(path: &Path, write: bool) -> std::io::Result<DirectFile> {
        Ok(DirectFile {
            file: open_direct(path, write)?,
        })
    }

    /// Writes `data` (a multiple of [`ALIGN`]) at `offset`. Returns once the data
    /// path completed the write; no flush.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut buf = AlignedBuf::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        self.file.write_all_at(buf.as_slice(), offset)
    }

    /// Reads `len` bytes (a multiple of [`ALIGN`]) at `offset`.
    pub fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = AlignedBuf::zeroed(len);
        self.file.read_exact_at(buf.as_mut_slice(), offset)?;
        Ok(buf.as_slice().to_vec())
    }

    /// fdatasync.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Size of the file or block device (seek to the end).
    pub fn size(&self) -> std::io::Result<u64> {
        let mut file = &self.file;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))
    }
}

/// sha256 of `len` bytes of `path` read with O_DIRECT in 1 MiB pieces, as lowercase
/// hex: what a test compares two whole devices by.
pub fn sha256_of(path: &Path, len: u64) -> std::io::Result<String> {
    use sha2::Digest;
    const PIECE: u64 = 1 << 20;
    let file = DirectFile::open(path, false)?;
    let mut hasher = sha2::Sha256::new();
    let mut offset = 0;
    while offset < len {
        let n = PIECE.min(len - offset);
        let n = usize::try_from(n).map_err(std::io::Error::other)?;
        hasher.update(file.read_at(offset, n)?);
        offset += PIECE;
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
