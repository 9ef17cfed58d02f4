//! One layer: its data file, its meta file and the in-memory index loaded from it.
//!
//! The index is two bitmaps (block has an entry here; that entry is a valid tombstone).
//! Reads consult the bitmaps of every layer in the chain, which is memory-only, and
//! touch disk only in the one layer that owns each block. A bitmap costs 32 MiB per TiB
//! of volume per layer; a compressed index is future work.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::file::{BlockFile, BlockFileFactory, IoPriority};
use super::format::{self, Entry, ENTRY_SIZE, META_HEADER_SIZE};
use super::{io_error, LayerId, StoreError};
use crate::block_io::BLOCK_SIZE;
use crate::park::block_on;

/// A growable bitmap whose bits can be flipped concurrently.
///
/// Bits of different blocks share words, so single bits are updated with atomic
/// read-modify-write; the vector itself is only replaced (grown) under the write lock.
#[derive(Debug, Default)]
pub(crate) struct Bitmap {
    words: RwLock<Vec<AtomicU64>>,
}

impl Bitmap {
    fn read_words(&self) -> std::sync::RwLockReadGuard<'_, Vec<AtomicU64>> {
        self.words.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether bit `i` is set; bits past the end are clear.
    pub(crate) fn get(&self, i: u64) -> bool {
        let words = self.read_words();
        let w = usize::try_from(i / 64).unwrap_or(usize::MAX);
        words
            .get(w)
            .is_some_and(|word| word.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
    }

    /// Sets or clears bit `i`, growing the map when needed.
    pub(crate) fn put(&self, i: u64, value: bool) {
        let w = usize::try_from(i / 64).unwrap_or(usize::MAX);
        let mask = 1u64 << (i % 64);
        {
            let words = self.read_words();
            if let Some(word) = words.get(w) {
                if value {
                    word.fetch_or(mask, Ordering::AcqRel);
                } else {
                    word.fetch_and(!mask, Ordering::AcqRel);
                }
                return;
            }
        }
        if !value {
            return;
        }
        let mut words = self.words.write().unwrap_or_else(|p| p.into_inner());
        if words.len() <= w {
            words.resize_with(w + 1, AtomicU64::default);
        }
        words[w].fetch_or(mask, Ordering::AcqRel);
    }

    /// Word `w` (bits `64*w .. 64*w+64`); zero past the end.
    pub(crate) fn word(&self, w: usize) -> u64 {
        self.read_words()
            .get(w)
            .map_or(0, |word| word.load(Ordering::Acquire))
    }

    /// Number of set bits.
    pub(crate) fn count(&self) -> u64 {
        self.read_words()
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Indices of all set bits, in order.
    pub(crate) fn ones(&self) -> Vec<u64> {
        let words = self.read_words();
        let mut out = Vec::new();
        for (wi, word) in words.iter().enumerate() {
            let mut bits = word.load(Ordering::Acquire);
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                out.push(wi as u64 * 64 + b);
                bits &= bits - 1;
            }
        }
        out
    }
}

/// A layer of a volume: sealed (a snapshot's own blocks, immutable in content) or head.
#[derive(Debug)]
pub(crate) struct Layer {
    pub(crate) id: LayerId,
    dir: PathBuf,
    data: Arc<dyn BlockFile>,
    meta: Arc<dyn BlockFile>,
    /// Block has a (possibly damaged) entry in this layer.
    present: Bitmap,
    /// Block's entry is a valid tombstone.
    trimmed: Bitmap,
    /// Changes made to the files so far (counted after each completes) and the count
    /// the last completed sync covers: a flush is done once `synced` reaches what
    /// `changes` was when it started. Two counters, not a dirty flag, because a
    /// flush that clears a flag while an earlier flush's sync is still running would
    /// return before the writes it must cover are durable.
    changes: AtomicU64,
    synced: AtomicU64,
    /// Device and inode of the data file: the same for every hard link of the layer,
    /// so space accounting can tell a layer shared by several volumes from copies.
    file_id: (u64, u64),
}

fn meta_len(nblocks: u64) -> u64 {
    META_HEADER_SIZE + nblocks * ENTRY_SIZE
}

impl Layer {
    /// Directory of layer `id` under a volume directory.
    pub(crate) fn dir_of(volume_dir: &Path, id: LayerId) -> PathBuf {
        volume_dir.join("layers").join(id.to_string())
    }

    /// Creates an empty layer sized for `nblocks`, durably (files, header, directory).
    pub(crate) fn create(
        factory: &dyn BlockFileFactory,
        volume_dir: &Path,
        id: LayerId,
        nblocks: u64,
    ) -> Result<Layer, StoreError> {
        let dir = Self::dir_of(volume_dir, id);
        fs::create_dir(&dir).map_err(io_error("create layer directory", &dir))?;
        let data_path = dir.join("data");
        let meta_path = dir.join("meta");
        let data = factory
            .open(&data_path, true)
            .map_err(io_error("create data file", &data_path))?;
        let meta = factory
            .open(&meta_path, true)
            .map_err(io_error("create meta file", &meta_path))?;
        data.set_len(nblocks * BLOCK_SIZE)
            .map_err(io_error("size data file", &data_path))?;
        // A control operation on a blocking thread (snapshot, create).
        let priority = IoPriority::Foreground;
        block_on(meta.write_at(priority, &format::encode_layer_header(id), 0))
            .map_err(io_error("write layer header", &meta_path))?;
        meta.set_len(meta_len(nblocks))
            .map_err(io_error("size meta file", &meta_path))?;
        block_on(data.sync_data(priority)).map_err(io_error("sync", &data_path))?;
        block_on(meta.sync_data(priority)).map_err(io_error("sync", &meta_path))?;
        sync_dir(&dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(Layer {
            id,
            file_id: file_id(&data_path)?,
            dir,
            data,
            meta,
            present: Bitmap::default(),
            trimmed: Bitmap::default(),
            changes: AtomicU64::new(0),
            synced: AtomicU64::new(0),
        })
    }

    /// Hard-links the files of the layer in `from` (a layer directory of another
    /// volume) as layer `id` of the volume at `volume_dir`, durably (directory entries
    /// fsynced). No byte is copied: both volumes then read the same inodes. Fails with
    /// the OS error (EXDEV across filesystems) and leaves the new layer directory for
    /// the caller's cleanup.
    pub(crate) fn link(from: &Path, volume_dir: &Path, id: LayerId) -> Result<(), StoreError> {
        let dir = Self::dir_of(volume_dir, id);
        fs::create_dir(&dir).map_err(io_error("create layer directory", &dir))?;
        for name in ["data", "meta"] {
            let target = dir.join(name);
            fs::hard_link(from.join(name), &target)
                .map_err(io_error("hard-link shared layer file", &target))?;
        }
        sync_dir(&dir)
    }

    /// Opens an existing layer, checks its header and loads its index.
    pub(crate) fn open(
        factory: &dyn BlockFileFactory,
        volume_dir: &Path,
        id: LayerId,
    ) -> Result<Layer, StoreError> {
        let dir = Self::dir_of(volume_dir, id);
        let data_path = dir.join("data");
        let meta_path = dir.join("meta");
        let data = factory
            .open(&data_path, false)
            .map_err(io_error("open data file", &data_path))?;
        let meta = factory
            .open(&meta_path, false)
            .map_err(io_error("open meta file", &meta_path))?;
        let mut header = vec![0u8; META_HEADER_SIZE as usize];
        let n = block_on(meta.read_at(IoPriority::Foreground, &mut header, 0))
            .map_err(io_error("read layer header", &meta_path))?;
        let found =
            format::decode_layer_header(&header[..n]).map_err(|reason| StoreError::BadLayer {
                path: meta_path.clone(),
                reason,
            })?;
        if found != id {
            return Err(StoreError::BadLayer {
                path: meta_path,
                reason: format!("header names layer {found}, expected {id}"),
            });
        }
        let layer = Layer {
            id,
            file_id: file_id(&data_path)?,
            dir,
            data,
            meta,
            present: Bitmap::default(),
            trimmed: Bitmap::default(),
            changes: AtomicU64::new(0),
            synced: AtomicU64::new(0),
        };
        layer.load_index()?;
        Ok(layer)
    }

    /// Scans the meta file and fills the bitmaps: every non-zero entry marks its block
    /// present (even a damaged one, so that it reads as corrupt instead of falling
    /// through to older data); valid tombstones are also marked trimmed.
    fn load_index(&self) -> Result<(), StoreError> {
        const CHUNK_ENTRIES: u64 = 16384;
        let mut buf = vec![0u8; (CHUNK_ENTRIES * ENTRY_SIZE) as usize];
        let mut first = 0u64;
        loop {
            let at = META_HEADER_SIZE + first * ENTRY_SIZE;
            let n = block_on(self.meta.read_at(IoPriority::Foreground, &mut buf, at))
                .map_err(io_error("read meta file", &self.meta_path()))?;
            let whole = n / ENTRY_SIZE as usize;
            for (i, raw) in buf[..whole * ENTRY_SIZE as usize]
                .chunks_exact(ENTRY_SIZE as usize)
                .enumerate()
            {
                let mut e = [0u8; ENTRY_SIZE as usize];
                e.copy_from_slice(raw);
                if let Some(entry) = Entry::decode(&e) {
                    let block = first + i as u64;
                    if entry.is_valid_tombstone(block) {
                        self.trimmed.put(block, true);
                    }
                    self.present.put(block, true);
                }
            }
            if n < buf.len() {
                return Ok(());
            }
            first += CHUNK_ENTRIES;
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn meta_path(&self) -> PathBuf {
        self.dir.join("meta")
    }

    fn data_path(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Device and inode of the data file (see the field).
    pub(crate) fn file_id(&self) -> (u64, u64) {
        self.file_id
    }

    /// Whether this layer has an entry for `block`.
    pub(crate) fn has(&self, block: u64) -> bool {
        self.present.get(block)
    }

    pub(crate) fn present_bits(&self) -> &Bitmap {
        &self.present
    }

    pub(crate) fn trimmed_bits(&self) -> &Bitmap {
        &self.trimmed
    }

    /// Records in the index that `block` now has `entry` (call after it is on disk).
    /// The trimmed bit changes first, so a lock-free scan never sees a tombstone as data.
    pub(crate) fn mark(&self, block: u64, entry: &Entry) {
        let tomb = entry.is_valid_tombstone(block);
        if tomb {
            self.trimmed.put(block, true);
            self.present.put(block, true);
        } else {
            self.present.put(block, true);
            self.trimmed.put(block, false);
        }
    }

    /// Records in the index that `block` has no entry any more (call after the zeroed
    /// entry is on disk). The present bit goes first, so a lock-free scan never sees a
    /// forgotten tombstone as data.
    pub(crate) fn unmark(&self, block: u64) {
        self.present.put(block, false);
        self.trimmed.put(block, false);
    }

    /// Reads the entries of `count` blocks from `first`; missing ones are `None`.
    pub(crate) async fn read_entries(
        &self,
        priority: IoPriority,
        first: u64,
        count: usize,
    ) -> Result<Vec<Option<Entry>>, StoreError> {
        let mut buf = vec![0u8; count * ENTRY_SIZE as usize];
        let n = self
            .meta
            .read_at(priority, &mut buf, META_HEADER_SIZE + first * ENTRY_SIZE)
            .await
            .map_err(io_error("read meta file", &self.meta_path()))?;
        buf[n..].fill(0);
        Ok(buf
            .chunks_exact(ENTRY_SIZE as usize)
            .map(|raw| {
                let mut e = [0u8; ENTRY_SIZE as usize];
                e.copy_from_slice(raw);
                Entry::decode(&e)
            })
            .collect())
    }

    /// Writes entries for consecutive blocks from `first`.
    pub(crate) async fn write_entries(
        &self,
        priority: IoPriority,
        first: u64,
        entries: &[Entry],
    ) -> Result<(), StoreError> {
        let mut buf = Vec::with_capacity(entries.len() * ENTRY_SIZE as usize);
        for e in entries {
            buf.extend_from_slice(&e.encode());
        }
        let r = self
            .meta
            .write_at(priority, &buf, META_HEADER_SIZE + first * ENTRY_SIZE)
            .await
            .map(drop)
            .map_err(io_error("write meta file", &self.meta_path()));
        self.mark_dirty();
        r
    }

    /// Zeroes the entries of `count` blocks from `first`: the on-disk "no entry in this
    /// layer" value.
    pub(crate) async fn clear_entries(
        &self,
        priority: IoPriority,
        first: u64,
        count: usize,
    ) -> Result<(), StoreError> {
        let zeros = vec![0u8; count * ENTRY_SIZE as usize];
        let r = self
            .meta
            .write_at(priority, &zeros, META_HEADER_SIZE + first * ENTRY_SIZE)
            .await
            .map(drop)
            .map_err(io_error("write meta file", &self.meta_path()));
        self.mark_dirty();
        r
    }

    /// Reads the data of consecutive blocks from `first` into `buf`; bytes past the end
    /// of the file read as zeros.
    pub(crate) async fn read_data(
        &self,
        priority: IoPriority,
        first: u64,
        buf: &mut [u8],
    ) -> Result<(), StoreError> {
        let n = self
            .data
            .read_at(priority, buf, first * BLOCK_SIZE)
            .await
            .map_err(io_error("read data file", &self.data_path()))?;
        buf[n..].fill(0);
        Ok(())
    }

    /// Writes the data of consecutive blocks from `first`.
    pub(crate) async fn write_data(
        &self,
        priority: IoPriority,
        first: u64,
        buf: &[u8],
    ) -> Result<(), StoreError> {
        let r = self
            .data
            .write_at(priority, buf, first * BLOCK_SIZE)
            .await
            .map(drop)
            .map_err(io_error("write data file", &self.data_path()));
        self.mark_dirty();
        r
    }

    /// Deallocates the data of `count` blocks from `first`.
    pub(crate) async fn punch(
        &self,
        priority: IoPriority,
        first: u64,
        count: u64,
    ) -> Result<(), StoreError> {
        let r = self
            .data
            .punch_hole(priority, first * BLOCK_SIZE, count * BLOCK_SIZE)
            .await
            .map(drop)
            .map_err(io_error("punch hole in data file", &self.data_path()));
        self.mark_dirty();
        r
    }

    /// Grows both files for a volume of `nblocks` blocks.
    pub(crate) fn grow(&self, nblocks: u64) -> Result<(), StoreError> {
        let r = self
            .data
            .set_len(nblocks * BLOCK_SIZE)
            .map_err(io_error("grow data file", &self.data_path()))
            .and_then(|()| {
                self.meta
                    .set_len(meta_len(nblocks))
                    .map_err(io_error("grow meta file", &self.meta_path()))
            });
        self.mark_dirty();
        r
    }

    /// Records that the files changed since the last sync. Called after (never before)
    /// each change completes: a flush that clears the flag first and syncs second then
    /// either covers the change or leaves the flag set for the next flush.
    fn mark_dirty(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// The change count a sync starting now must cover, or `None` when a completed
    /// sync already covers it.
    fn sync_target(&self) -> Option<u64> {
        let target = self.changes.load(Ordering::Acquire);
        (self.synced.load(Ordering::Acquire) < target).then_some(target)
    }

    /// Makes everything written so far durable: data file first, then meta file, so a
    /// durable entry never points at data that is not. Syncs still running for other
    /// callers do not count: only one that started after this call's changes did. If
    /// the future is dropped before it finished, nothing counts as synced, so the next
    /// sync runs again instead of trusting one that may never have happened.
    pub(crate) async fn sync(&self, priority: IoPriority) -> Result<(), StoreError> {
        let Some(target) = self.sync_target() else {
            return Ok(());
        };
        self.data
            .sync_data(priority)
            .await
            .map_err(io_error("sync data file", &self.data_path()))?;
        self.meta
            .sync_data(priority)
            .await
            .map_err(io_error("sync meta file", &self.meta_path()))?;
        self.synced.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }

    /// Disk space of both files.
    pub(crate) fn allocated_bytes(&self) -> Result<u64, StoreError> {
        let d = self
            .data
            .allocated_bytes()
            .map_err(io_error("stat data file", &self.data_path()))?;
        let m = self
            .meta
            .allocated_bytes()
            .map_err(io_error("stat meta file", &self.meta_path()))?;
        Ok(d + m)
    }
}

/// fsyncs a directory so entries created or renamed in it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync directory", dir))
}

/// Device and inode of a file.
fn file_id(path: &Path) -> Result<(u64, u64), StoreError> {
    let meta = fs::metadata(path).map_err(io_error("stat", path))?;
    Ok((meta.dev(), meta.ino()))
}

/// Whether an I/O error means "not found" (used when cleaning up leftovers).
pub(crate) fn is_not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}
