//! The checksummed, layered replica block store: one replica of one volume on local disk.
//!
//! # What it guarantees
//!
//! * Every 4 KiB block carries a crc32c and the `seq` of the write that produced it;
//!   every read verifies it. A block that fails is reported as
//!   [`StoreError::Corrupt`] (data plane: [`BlockIoError::Corrupt`]) and its bytes are
//!   never returned.
//! * A crash at any moment (kill -9, power loss) leaves each block old-valid,
//!   new-valid or detectably torn (reads as corrupt), never silently wrong. After
//!   [`LayeredStore::flush`] returns, every write completed before it survives.
//! * Snapshots cost O(1) in the volume size (redirect-on-write layers), can be deleted
//!   while I/O continues, and outlive the volume.
//!
//! # On-disk layout
//!
//! ```text
//! <dir>/MANIFEST                 the layer chain (below)
//! <dir>/layers/<id>/data         sparse; block b at byte b * 4096
//! <dir>/layers/<id>/meta         4096-byte header, then one 16-byte entry per block
//! ```
//!
//! **Metadata entry** (block b at meta offset `4096 + 16 * b`, little-endian):
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0..4 | `crc` | crc32c of `b` (u64), `seq` (u64), `flags` (u32), then the 4096 data bytes (data entries only) |
//! | 4..8 | `flags` | 1 = data in this layer, 2 = trimmed (tombstone) |
//! | 8..16 | `seq` | engine sequence number of the write or trim |
//!
//! All 16 bytes zero means "this layer has no version of the block": reads fall
//! through to older layers. Any other value whose flags are not exactly 1 or 2, or whose
//! crc does not match, is damage and reads as corrupt. Unlike a plain "seq 0 = trimmed",
//! a tombstone keeps the trim's seq, so a resync's `write_if_newer` with an older seq
//! cannot resurrect data the trim superseded.
//!
//! Covering block index and seq in the crc means an entry validates only the exact bytes
//! of the write that created it, at the position it was written to: old data under a new
//! entry (or new data under an old entry) mismatches even when a stale crc happens to
//! match other content, and a misdirected write is caught.
//!
//! **Meta header**: magic `TESSLAYR`, version u32 (1), reserved u32, layer id u64, crc32c
//! u32 of the preceding 24 bytes. It stops a layer's files from being mixed up.
//!
//! **Manifest**: magic `TESSMANI`, version u32, body length u32, crc32c u32 of version,
//! length and body, then a JSON body: `size_bytes`, `next_layer_id`, `volume_deleted`
//! and `layers` head first, each `{id, snapshot_id, size_bytes, deleting, shared}`
//! (`shared` only when true; a manifest without it means false). It is
//! replaced durably: written to `MANIFEST.tmp`, fsynced, renamed over `MANIFEST`, and the
//! directory fsynced. Layer directories the manifest does not name are leftovers of
//! an interrupted snapshot or deletion and are removed at open.
//!
//! # Write ordering and torn writes
//!
//! A write to block b goes to the head layer: data first (`pwrite` to `data`), then
//! the entry (`pwrite` to `meta`), then the in-memory index. Trim writes the tombstone
//! first, then punches the hole. Flush is `fdatasync(data)` then `fdatasync(meta)`.
//! What a crash can leave:
//!
//! * data landed, entry did not: if the head already had an entry for b, the old entry
//!   no longer matches the bytes → corrupt; if it had none, the block still falls
//!   through to its previous (valid) version.
//! * entry landed, data did not (writeback reordered before a flush): the new entry
//!   does not match the old bytes → corrupt.
//! * half a block landed: mismatch → corrupt.
//! * tombstone landed, hole not punched: reads zeros (tombstones do not look at
//!   data); hole punched, tombstone not: the old entry mismatches zeros → corrupt.
//! * [`LayeredStore::forget_async`] (a rebuild clearing blocks its sources never
//!   wrote) zeroes the entry before it punches the hole, with the same two outcomes:
//!   the block falls through (data left allocated) or, hole punched first, corrupt.
//!
//! So a torn overwrite loses the old version of that block too, but detectably; the
//! engine then reads another replica and repairs this one (`write_if_newer`).
//!
//! # Layers and snapshots
//!
//! The manifest lists a chain of layers; the newest is the *head* and takes all
//! writes. A block's current version lives in the newest layer with an entry for it.
//! [`LayeredStore::snapshot`] syncs the head, creates an empty new head and rewrites the
//! manifest so the old head is sealed under the snapshot id: no block is copied, so it
//! costs O(1) in the volume size. A snapshot's view is its own layer over all older
//! ones. Every layer keeps an in-memory index (a "has entry" and an "is tombstone"
//! bitmap) loaded at open, so a read checks bitmaps, not every layer's meta file.
//!
//! A trim in the head writes tombstones, which hide older layers' data, and punches
//! the head's data file.
//!
//! [`LayeredStore::delete_snapshot`] marks the layer `deleting` in the manifest, copies
//! each of its blocks that its child (the next newer layer) lacks into the child —
//! data then entry, under the block's lock, so foreground I/O continues and every read
//! sees the same bytes before and after — syncs the child, then drops the layer from
//! the manifest and deletes its files. Copying into a sealed child changes no
//! snapshot's view. An interrupted deletion resumes at open. Tombstones are copied
//! too, even out of the base layer, because they carry the trim's seq. A layer
//! without a child (the newest snapshot of a deleted volume) is simply freed.
//!
//! [`LayeredStore::delete_volume`] drops the head; the snapshots stay readable and the
//! directory is removed when the last of them is deleted. Space accounting
//! ([`LayeredStore::space_used`]) reports every layer's allocation. Changed-block
//! queries are bitmap unions: the blocks changed between snapshots A and B are those
//! with an entry in any layer newer than A's, up to B's. [`LayeredStore::expand`] grows
//! the head's files and the volume size; snapshots keep the size they were taken at.
//!
//! **Shared layers.** [`LayeredStore::create_sharing`] builds a volume whose base is
//! another volume's view of one of its snapshots: the source's layers from its base up
//! to that snapshot's layer are hard-linked under the same ids (marked `shared`, a
//! contiguous run at the base) and an empty head goes on top, so a local restore is
//! instant and costs no space. The source's control lock is held while its chain is
//! read and linked, so no merge or deletion of the source runs meanwhile. For the new
//! volume shared layers are read-only: never listed as its snapshots, never written,
//! merged or deleted (its merges go into the *newer* child, so deleting its own oldest
//! snapshot never touches a shared parent); deleting the volume or its last own
//! snapshot removes its directory, i.e. only its links. Space reports carry each
//! layer's file identity, so callers summing several stores count a shared one once.
//!
//! Why the source may keep working on the same inodes: it writes into a sealed layer
//! only when it deletes that layer's parent snapshot, and that merge only adds blocks
//! the layer lacked, with the bytes (and entries) the parent holds; the sharer still
//! links that parent, so whichever of the two it reads a block from (its in-memory
//! index of the shared layer predates the merge until it reopens), its view is
//! unchanged. The source's head is never shared, and an unlink in the source leaves
//! the sharer's links.
//!
//! # Concurrency
//!
//! Data operations hold the chain's *gate* shared for their duration, plus striped
//! per-block locks (block b → stripe b mod 1024, taken in stripe order): writes, trims
//! and merge copies exclusively, reads shared. Writes to different blocks run in
//! parallel; a read never sees half of a write. Every change of the layer chain
//! (sealing, merge removal, delete, retire) takes the gate exclusively first, which is
//! the barrier that seals the head. See the `locks` module. Control operations
//! (snapshot, delete, expand) are serialised among themselves, except the block copy of
//! a snapshot deletion, which can take minutes: deletions are serialised by a lock of
//! their own and copy without the control lock, taking it only to mark the layer and to
//! drop it. A seal meanwhile leaves the merge's target in place (the new head goes on
//! top) and copying into a sealed child changes no view; an expansion only grows the
//! head; a volume delete that drops the target leaves blocks nobody needs.
//!
//! One data path (module `data_path`): [`LayeredStore::read_async`] and friends are
//! the implementation, at the priority the caller passes; the blocking
//! [`LayeredStore::read`], [`LayeredStore::write`], ... park the calling thread on the
//! same futures at foreground priority. Background work (copies, merges, scrubs,
//! versioned reads) passes [`IoPriority::Background`].
//!
//! Modules: `data_path` (reads, writes, trims, flushes), `versioned` (blocks with their
//! versions), `snapshots` (seal, list, delete and merge), `inspect` (allocated and
//! changed ranges, verification, space), `layer` / `file` / `format` (one layer's files
//! and their on-disk format), `locks`, `handle` (the data plane's view).
//!
//! # Limitations
//!
//! * In the daemon, data files are `O_DIRECT` and go through the io_uring scheduler
//!   ([`ScheduledFileFactory`]); meta files stay buffered (16-byte entries), only their
//!   `fdatasync` is scheduled. [`StdFileFactory`] (tests, tools) is buffered throughout.
//!   The blocking methods park the calling thread while a scheduled request runs; the
//!   async ones (data plane, copies) await it. Both read and write meta entries
//!   inline (page cache). Control operations stay blocking.
//! * The index is a bitmap per layer (32 MiB per TiB per layer); opening scans every
//!   meta file.
//! * A snapshot deletion holds the control lock until its merge finishes, so a new
//!   snapshot waits for it (I/O does not).
//! * Trims of never-written blocks still write tombstones (16 bytes per block).
//! * A crash in the middle of a source's merge into a layer another volume shares can
//!   leave a torn entry there, which the sharer reads as a corrupt block: detected,
//!   and the engine's self-healing read rewrites it in the sharer's head from another
//!   replica. Sharing needs source and new volume on one filesystem (EXDEV otherwise).
//!
//! [`BlockIoError::Corrupt`]: crate::block_io::BlockIoError::Corrupt

mod data_path;
mod error;
mod file;
pub(crate) mod format;
mod handle;
mod inspect;
mod layer;
mod locks;
mod scrub;
mod snapshots;
#[cfg(test)]
mod tests;
mod versioned;

use std::collections::HashSet;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};
use std::time::{Duration, Instant};

pub(crate) use error::io_error;
pub use error::StoreError;
pub use file::{
    BlockFile, BlockFileFactory, FileIo, IoPriority, ScheduledFileFactory, StdBlockFile,
    StdFileFactory,
};
pub use handle::StoreHandle;
pub use scrub::{DamagedBlock, Repair, ScrubLayer, ScrubStep};
pub use tessera_replica_protocol::block::{BlockVersion, DataLengthMismatch, VersionedBlocks};

use crate::block_io::BLOCK_SIZE;
use crate::park::block_on;
use crate::sync_state::SyncState;
use data_path::check_block;
use format::{Entry, ManifestLayer, ManifestV1, Verdict, FLAG_TRIMMED};
use layer::{is_not_found, sync_dir, Layer};
use locks::BlockLocks;

/// Identifies a layer within one volume; never reused, so a stale id cannot alias.
pub type LayerId = u64;

const MANIFEST: &str = "MANIFEST";
const MANIFEST_TMP: &str = "MANIFEST.tmp";
/// Longest snapshot id stored (CSI names are at most 128 bytes; ids derive from them).
const MAX_SNAPSHOT_ID: usize = 256;
const BS: usize = BLOCK_SIZE as usize;
/// How long `create_sharing` waits for the source's control lock (see there).
const SHARE_LOCK_WAIT: Duration = Duration::from_millis(500);

/// Result of [`LayeredStore::write_if_newer`] for one block, so resync can count what
/// it actually changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The block was written.
    Applied,
    /// The block already holds an intact version with the same or a newer seq.
    Skipped,
}

/// A snapshot as listed by [`LayeredStore::snapshots`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Snapshot id given to [`LayeredStore::snapshot`].
    pub id: String,
    /// The sealed layer that ends the snapshot.
    pub layer: LayerId,
    /// Volume size when the snapshot was taken.
    pub size_bytes: u64,
}

/// A block [`LayeredStore::verify`] found damaged, for the scrubber to repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptBlock {
    /// Layer holding the bad copy.
    pub layer: LayerId,
    /// Snapshot the layer belongs to; `None` for the head.
    pub snapshot_id: Option<String>,
    /// Block index.
    pub block: u64,
}

/// Space one layer uses, so capacity accounting can charge snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerUsage {
    /// The layer.
    pub layer: LayerId,
    /// Snapshot it belongs to; `None` for the head.
    pub snapshot_id: Option<String>,
    /// Blocks with an entry in this layer (data or tombstone).
    pub blocks: u64,
    /// Disk space of its data and meta files.
    pub allocated_bytes: u64,
    /// Device and inode of its data file. Hard links of one layer in several volumes
    /// ([`LayeredStore::create_sharing`]) have the same id, so a caller summing
    /// several stores counts their space once.
    pub file_id: (u64, u64),
    /// Another volume's sealed layer this volume reads through (never one of its own
    /// snapshots); its space is shared with that volume.
    pub shared: bool,
}

/// Space a volume and its snapshots use on the backing filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceUsage {
    /// Sum over all layers.
    pub allocated_bytes: u64,
    /// Per layer, oldest first.
    pub layers: Vec<LayerUsage>,
}

/// What [`LayeredStore::delete_volume`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeRemoval {
    /// Nothing remains; the directory is gone.
    Removed,
    /// The head is gone; this many snapshots keep their layers alive.
    Retained {
        /// Snapshots still stored.
        snapshots: usize,
    },
}

#[derive(Debug)]
struct Slot {
    layer: Arc<Layer>,
    /// `None` only for the head.
    snapshot_id: Option<String>,
    size: u64,
    deleting: bool,
    /// Another volume's sealed layer, read-only here (see `create_sharing`). Shared
    /// slots form a run at the base of the chain.
    shared: bool,
}

#[derive(Debug)]
struct State {
    size: u64,
    next_layer_id: u64,
    volume_deleted: bool,
    /// Everything was deleted, directory included.
    removed: bool,
    /// Base first, head (when the volume exists) last.
    layers: Vec<Slot>,
}

impl State {
    fn head(&self) -> Result<&Arc<Layer>, StoreError> {
        if self.volume_deleted {
            return Err(StoreError::VolumeDeleted);
        }
        self.layers
            .last()
            .map(|s| &s.layer)
            .ok_or(StoreError::VolumeDeleted)
    }

    /// Index of this volume's own live snapshot `id`. Shared layers are never found:
    /// their snapshot ids are the source volume's, not snapshots of this one.
    fn find_snapshot(&self, id: &str) -> Result<usize, StoreError> {
        self.layers
            .iter()
            .position(|s| !s.deleting && !s.shared && s.snapshot_id.as_deref() == Some(id))
            .ok_or_else(|| StoreError::SnapshotNotFound(id.to_string()))
    }

    /// Number of layers that are this volume's own (not shared).
    fn own_layers(&self) -> usize {
        self.layers.iter().filter(|s| !s.shared).count()
    }

    /// Topmost layer index and size of the head (`None`) or a snapshot's view.
    fn view(&self, snapshot: Option<&str>) -> Result<(usize, u64), StoreError> {
        match snapshot {
            None => {
                self.head()?;
                Ok((self.layers.len() - 1, self.size))
            }
            Some(id) => {
                let i = self.find_snapshot(id)?;
                Ok((i, self.layers[i].size))
            }
        }
    }

    fn manifest(&self) -> ManifestV1 {
        ManifestV1 {
            size_bytes: self.size,
            next_layer_id: self.next_layer_id,
            volume_deleted: self.volume_deleted,
            layers: self
                .layers
                .iter()
                .rev()
                .map(|s| ManifestLayer {
                    id: s.layer.id,
                    snapshot_id: s.snapshot_id.clone(),
                    size_bytes: s.size,
                    deleting: s.deleting,
                    shared: s.shared,
                })
                .collect(),
        }
    }
}

/// One replica of one volume: a chain of checksummed layers (see the module doc).
#[derive(Debug)]
pub struct LayeredStore {
    dir: PathBuf,
    factory: Arc<dyn BlockFileFactory>,
    state: RwLock<State>,
    /// Stripes and the async gate (`locks` module).
    locks: BlockLocks,
    /// Serialises control operations (seal, expand, delete, retire, chain changes).
    control: Mutex<()>,
    /// Held for a whole snapshot deletion: merges run one at a time, but their long
    /// block copy runs without `control`, so sealing, expanding or deleting the
    /// volume does not wait minutes for a merge (see `delete_snapshot`).
    merging: Mutex<()>,
    size: AtomicU64,
    /// The replica's dirty regions and in-sync record, kept next to the layers so
    /// they share the volume's life (`sync_state` module).
    sync: Arc<SyncState>,
}

/// A new volume's size must be a positive multiple of the block size.
fn check_new_size(size_bytes: u64) -> Result<(), StoreError> {
    if size_bytes == 0 || !aligned(size_bytes) {
        return Err(StoreError::InvalidSize {
            current: 0,
            requested: size_bytes,
            reason: "a volume size must be a positive multiple of 4096",
        });
    }
    Ok(())
}

/// Whether a byte value is a whole number of blocks.
// `u64::is_multiple_of` needs Rust 1.87; the workspace declares 1.85.
#[allow(clippy::manual_is_multiple_of)]
fn aligned(bytes: u64) -> bool {
    bytes % BLOCK_SIZE == 0
}

/// Checks alignment and bounds; returns first block and block count.
fn check_range(offset: u64, len: u64, size: u64) -> Result<(u64, u64), StoreError> {
    if !aligned(offset) || !aligned(len) {
        return Err(StoreError::Unaligned { offset, len });
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok((offset / BLOCK_SIZE, len / BLOCK_SIZE)),
        _ => Err(StoreError::OutOfRange { offset, len, size }),
    }
}

fn validate_snapshot_id(id: &str) -> Result<(), StoreError> {
    let reason = if id.is_empty() {
        "it is empty"
    } else if id.len() > MAX_SNAPSHOT_ID {
        "it is longer than 256 bytes"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidSnapshotId {
        id: id.to_string(),
        reason,
    })
}

/// Byte ranges of the set bits among the first `nblocks` bits of `words`.
fn ranges_from_words(words: &[u64], nblocks: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (wi, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let block = wi as u64 * 64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            if block >= nblocks {
                break;
            }
            let start = block * BLOCK_SIZE;
            match out.last_mut() {
                Some(r) if r.end == start => r.end = start + BLOCK_SIZE,
                _ => out.push(start..start + BLOCK_SIZE),
            }
        }
    }
    out
}

fn validate_manifest(m: &ManifestV1) -> Result<(), String> {
    if m.size_bytes == 0 || !aligned(m.size_bytes) {
        return Err(format!(
            "size {} is not a positive block multiple",
            m.size_bytes
        ));
    }
    if !m.volume_deleted {
        match m.layers.first() {
            Some(h)
                if h.snapshot_id.is_none()
                    && !h.deleting
                    && !h.shared
                    && h.size_bytes == m.size_bytes => {}
            _ => return Err("the head layer is missing or malformed".to_string()),
        }
    }
    let sealed = if m.volume_deleted {
        &m.layers[..]
    } else {
        &m.layers[1..]
    };
    let mut ids = HashSet::new();
    // Own and shared snapshot ids are separate namespaces: a shared layer carries the
    // source volume's id, which this volume may reuse for a snapshot of its own.
    let mut own_snaps = HashSet::new();
    let mut shared_snaps = HashSet::new();
    let mut in_shared_run = false;
    let mut newer_size = m.size_bytes;
    for l in &m.layers {
        if !ids.insert(l.id) || l.id >= m.next_layer_id {
            return Err(format!(
                "layer id {} is duplicated or not yet allocated",
                l.id
            ));
        }
    }
    for l in sealed {
        let Some(s) = &l.snapshot_id else {
            return Err(format!("sealed layer {} has no snapshot id", l.id));
        };
        if l.shared {
            if l.deleting {
                return Err(format!("shared layer {} is marked deleting", l.id));
            }
            in_shared_run = true;
        } else if in_shared_run {
            return Err(format!(
                "layer {} is older than a shared layer (shared layers must be the base)",
                l.id
            ));
        }
        let snaps = if l.shared {
            &mut shared_snaps
        } else {
            &mut own_snaps
        };
        if !snaps.insert(s.as_str()) {
            return Err(format!("snapshot id {s:?} is duplicated"));
        }
        if l.size_bytes == 0 || !aligned(l.size_bytes) || l.size_bytes > newer_size {
            return Err(format!("layer {} has an invalid size", l.id));
        }
        newer_size = l.size_bytes;
    }
    // The last own layer's removal removes the directory (`merge_out`), so a deleted
    // volume never keeps other volumes' layers alone.
    if m.volume_deleted && !m.layers.is_empty() && m.layers.iter().all(|l| l.shared) {
        return Err("a deleted volume holds only shared layers".to_string());
    }
    Ok(())
}

impl LayeredStore {
    /// Creates a new, empty volume of `size_bytes` in `dir` with std file I/O.
    pub fn create(dir: &Path, size_bytes: u64) -> Result<LayeredStore, StoreError> {
        Self::create_with(dir, size_bytes, Arc::new(StdFileFactory))
    }

    /// Creates a new volume whose layer files are opened by `factory` (io_uring
    /// scheduler, fault injection).
    pub fn create_with(
        dir: &Path,
        size_bytes: u64,
        factory: Arc<dyn BlockFileFactory>,
    ) -> Result<LayeredStore, StoreError> {
        check_new_size(size_bytes)?;
        prepare_volume_dir(dir)?;
        let head = Layer::create(factory.as_ref(), dir, 1, size_bytes / BLOCK_SIZE)?;
        let state = State {
            size: size_bytes,
            next_layer_id: 2,
            volume_deleted: false,
            removed: false,
            layers: vec![Slot {
                layer: Arc::new(head),
                snapshot_id: None,
                size: size_bytes,
                deleting: false,
                shared: false,
            }],
        };
        let store = Self::from_state(dir, factory, state);
        store.write_manifest(&store.state_read().manifest())?;
        Ok(store)
    }

    /// Creates a volume at `dir` whose base is `source`'s view of `snapshot_id`: the
    /// source's layers from its base up to and including that snapshot's layer are
    /// hard-linked (same layer ids), and an empty head of `size_bytes` goes on top.
    /// Std file I/O; see [`Self::create_sharing_with`].
    pub fn create_sharing(
        dir: &Path,
        source: &LayeredStore,
        snapshot_id: &str,
        size_bytes: u64,
    ) -> Result<LayeredStore, StoreError> {
        Self::create_sharing_with(
            dir,
            source,
            snapshot_id,
            size_bytes,
            Arc::new(StdFileFactory),
        )
    }

    /// [`Self::create_sharing`] with layer files opened by `factory`. Why it exists: a
    /// restore of a snapshot this replica holds is then instant and costs no space,
    /// instead of copying every block (see "Layers and snapshots" in the module doc
    /// for why both volumes may keep working on the same inodes).
    ///
    /// Refusals touch nothing on disk: an unknown snapshot is
    /// [`StoreError::SnapshotNotFound`], one being deleted
    /// [`StoreError::SnapshotDeleting`], a size that is not a positive multiple of
    /// 4096 or is smaller than the snapshot [`StoreError::InvalidSize`], a source
    /// whose control operations stay busy for more than half a second
    /// [`StoreError::SourceBusy`] (this may run under a caller's lock, so it must not
    /// wait out a long merge). Linking across filesystems fails with the OS error
    /// (EXDEV); a failure after the directory was prepared removes what it made.
    pub fn create_sharing_with(
        dir: &Path,
        source: &LayeredStore,
        snapshot_id: &str,
        size_bytes: u64,
        factory: Arc<dyn BlockFileFactory>,
    ) -> Result<LayeredStore, StoreError> {
        check_new_size(size_bytes)?;
        // Held until the new manifest is durable: no merge, deletion or retire of the
        // source changes the chain (or writes into a layer) while it is linked.
        let _source_control = source
            .control_within(SHARE_LOCK_WAIT)
            .ok_or(StoreError::SourceBusy)?;
        let (chain, next_layer_id) = {
            let state = source.state_read();
            let Some(top) = state
                .layers
                .iter()
                .position(|s| !s.shared && s.snapshot_id.as_deref() == Some(snapshot_id))
            else {
                return Err(StoreError::SnapshotNotFound(snapshot_id.to_string()));
            };
            if state.layers[top].deleting {
                return Err(StoreError::SnapshotDeleting(snapshot_id.to_string()));
            }
            if size_bytes < state.layers[top].size {
                return Err(StoreError::InvalidSize {
                    current: state.layers[top].size,
                    requested: size_bytes,
                    reason: "a volume cannot be smaller than the snapshot it shares",
                });
            }
            let chain: Vec<(Arc<Layer>, Option<String>, u64)> = state.layers[..=top]
                .iter()
                .map(|s| (Arc::clone(&s.layer), s.snapshot_id.clone(), s.size))
                .collect();
            (chain, state.next_layer_id)
        };
        // Sealed layers are synced when sealed and after every merge into them; this is
        // a no-op then, and makes a merge that failed before its sync durable.
        for (layer, _, _) in &chain {
            block_on(layer.sync(IoPriority::Foreground))?;
        }
        prepare_volume_dir(dir)?;
        let built = Self::link_and_build(dir, &chain, next_layer_id, size_bytes, factory);
        if built.is_err() {
            // No volume without a manifest; drop the links now rather than keeping the
            // source's space pinned until the next create in `dir`.
            for leftover in [MANIFEST, MANIFEST_TMP] {
                let _ = fs::remove_file(dir.join(leftover));
            }
            let _ = fs::remove_dir_all(dir.join("layers"));
        }
        built
    }

    /// The part of [`Self::create_sharing_with`] that writes: links `chain` (base
    /// first) into the prepared `dir`, creates the head and writes the manifest last.
    fn link_and_build(
        dir: &Path,
        chain: &[(Arc<Layer>, Option<String>, u64)],
        next_layer_id: LayerId,
        size_bytes: u64,
        factory: Arc<dyn BlockFileFactory>,
    ) -> Result<LayeredStore, StoreError> {
        for (layer, _, _) in chain {
            Layer::link(layer.dir(), dir, layer.id)?;
        }
        sync_dir(&dir.join("layers"))?;
        let mut layers = Vec::with_capacity(chain.len() + 1);
        for (layer, snapshot_id, size) in chain {
            layers.push(Slot {
                layer: Arc::new(Layer::open(factory.as_ref(), dir, layer.id)?),
                snapshot_id: snapshot_id.clone(),
                size: *size,
                deleting: false,
                shared: true,
            });
        }
        // Ids stay unique in both volumes' histories: nothing the source allocated
        // so far is reused by the new head.
        let head_id = chain
            .iter()
            .map(|(l, _, _)| l.id + 1)
            .fold(next_layer_id, LayerId::max);
        let head = Layer::create(factory.as_ref(), dir, head_id, size_bytes / BLOCK_SIZE)?;
        layers.push(Slot {
            layer: Arc::new(head),
            snapshot_id: None,
            size: size_bytes,
            deleting: false,
            shared: false,
        });
        let state = State {
            size: size_bytes,
            next_layer_id: head_id + 1,
            volume_deleted: false,
            removed: false,
            layers,
        };
        let store = Self::from_state(dir, factory, state);
        store.write_manifest(&store.state_read().manifest())?;
        Ok(store)
    }

    /// Opens an existing volume with std file I/O, finishing any interrupted snapshot
    /// deletion.
    pub fn open(dir: &Path) -> Result<LayeredStore, StoreError> {
        Self::open_with(dir, Arc::new(StdFileFactory))
    }

    /// Opens an existing volume whose layer files are opened by `factory`.
    pub fn open_with(
        dir: &Path,
        factory: Arc<dyn BlockFileFactory>,
    ) -> Result<LayeredStore, StoreError> {
        let path = dir.join(MANIFEST);
        let raw = fs::read(&path).map_err(|e| {
            if is_not_found(&e) {
                StoreError::BadManifest {
                    path: path.clone(),
                    reason: "missing (not a volume, or its creation did not finish)".into(),
                }
            } else {
                io_error("read manifest", &path)(e)
            }
        })?;
        let bad = |reason| StoreError::BadManifest {
            path: path.clone(),
            reason,
        };
        let m = format::decode_manifest(&raw).map_err(bad)?;
        validate_manifest(&m).map_err(bad)?;

        let mut layers = Vec::with_capacity(m.layers.len());
        for ml in m.layers.iter().rev() {
            layers.push(Slot {
                layer: Arc::new(Layer::open(factory.as_ref(), dir, ml.id)?),
                snapshot_id: ml.snapshot_id.clone(),
                size: ml.size_bytes,
                deleting: ml.deleting,
                shared: ml.shared,
            });
        }
        remove_orphans(dir, &layers)?;
        // Never a shared layer (validated): merges only ever touch own layers.
        let pending: Vec<LayerId> = layers
            .iter()
            .filter(|s| s.deleting && !s.shared)
            .map(|s| s.layer.id)
            .collect();
        let state = State {
            size: m.size_bytes,
            next_layer_id: m.next_layer_id,
            volume_deleted: m.volume_deleted,
            removed: false,
            layers,
        };
        let store = Self::from_state(dir, factory, state);
        {
            let _control = store.control();
            for id in pending {
                store.merge_out(id)?;
            }
        }
        Ok(store)
    }

    fn from_state(dir: &Path, factory: Arc<dyn BlockFileFactory>, state: State) -> LayeredStore {
        LayeredStore {
            dir: dir.to_path_buf(),
            factory,
            sync: Arc::new(SyncState::load(dir, state.size)),
            size: AtomicU64::new(state.size),
            state: RwLock::new(state),
            locks: BlockLocks::default(),
            control: Mutex::new(()),
            merging: Mutex::new(()),
        }
    }

    /// The replica's sync state (dirty regions, in-sync record) for the data plane.
    pub fn sync_state(&self) -> &Arc<SyncState> {
        &self.sync
    }

    /// Whether foreground I/O is active on this store's disk
    /// ([`BlockFileFactory::foreground_active`]).
    pub fn foreground_active(&self) -> bool {
        self.factory.foreground_active()
    }

    /// Directory holding the volume.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Current volume size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    // Lock poisoning only means another thread panicked; every state change is
    // committed in one step after its disk work succeeded, so the data stays coherent.
    fn state_read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn state_write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn control(&self) -> MutexGuard<'_, ()> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The control lock if it can be had within `wait` (polling: std mutexes have no
    /// timed lock, and this is only used by the rare `create_sharing`).
    fn control_within(&self, wait: Duration) -> Option<MutexGuard<'_, ()>> {
        let deadline = Instant::now() + wait;
        loop {
            match self.control.try_lock() {
                Ok(guard) => return Some(guard),
                Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => {}
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn write_manifest(&self, m: &ManifestV1) -> Result<(), StoreError> {
        let tmp = self.dir.join(MANIFEST_TMP);
        let path = self.dir.join(MANIFEST);
        let raw = format::encode_manifest(m).map_err(|reason| StoreError::BadManifest {
            path: path.clone(),
            reason,
        })?;
        {
            use std::io::Write;
            let mut f = fs::File::create(&tmp).map_err(io_error("create manifest", &tmp))?;
            f.write_all(&raw)
                .map_err(io_error("write manifest", &tmp))?;
            f.sync_all().map_err(io_error("sync manifest", &tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io_error("rename manifest", &path))?;
        sync_dir(&self.dir)
    }

    /// Removes the whole volume directory (manifest first, so a crash part-way leaves
    /// no half volume that would open). Caller holds the control lock.
    fn remove_all(&self, state: &mut State) -> Result<(), StoreError> {
        let manifest = self.dir.join(MANIFEST);
        fs::remove_file(&manifest).map_err(io_error("remove manifest", &manifest))?;
        state.layers.clear();
        state.volume_deleted = true;
        state.removed = true;
        sync_dir(&self.dir)?;
        fs::remove_dir_all(&self.dir).map_err(io_error("remove volume directory", &self.dir))
    }

    /// Closes this store for good without touching disk: waits for the data and control
    /// operations in flight, drops every layer (closing its files), and from then on
    /// every read, write, trim and flush through this value fails with
    /// [`StoreError::VolumeDeleted`].
    ///
    /// The replica catalog calls it before it removes (or moves) the directory, so a
    /// data-plane connection still holding the store can neither write into a deleted
    /// volume nor report success for I/O the deletion discarded. The files are left
    /// as they are; [`Self::open`] on the directory serves them again.
    pub fn retire(&self) {
        let _control = self.control();
        // The chain changes: wait for the data operations running (`locks` module).
        let _gate = self.locks.gate_exclusive_blocking();
        let mut state = self.state_write();
        state.layers.clear();
        state.volume_deleted = true;
        state.removed = true;
    }

    /// Deletes the volume itself. Its snapshots stay readable and deletable; the last
    /// snapshot's deletion frees the rest. Repeating the call is harmless.
    pub fn delete_volume(&self) -> Result<VolumeRemoval, StoreError> {
        let _control = self.control();
        // The chain changes: wait for the data operations running (`locks` module).
        let _gate = self.locks.gate_exclusive_blocking();
        let mut state = self.state_write();
        if state.removed {
            return Ok(VolumeRemoval::Removed);
        }
        let snapshots = state
            .layers
            .iter()
            .filter(|s| !s.shared && s.snapshot_id.is_some())
            .count();
        if state.volume_deleted {
            return Ok(VolumeRemoval::Retained { snapshots });
        }
        if snapshots == 0 {
            self.remove_all(&mut state)?;
            return Ok(VolumeRemoval::Removed);
        }
        let mut m = state.manifest();
        m.volume_deleted = true;
        m.layers.remove(0);
        self.write_manifest(&m)?;
        state.volume_deleted = true;
        let head = state.layers.pop();
        drop(state);
        if let Some(head) = head {
            remove_layer_dir(head.layer.dir())?;
        }
        Ok(VolumeRemoval::Retained { snapshots })
    }

    /// Grows the volume to `new_size` bytes (a multiple of 4096, not smaller than now).
    pub fn expand(&self, new_size: u64) -> Result<(), StoreError> {
        let _control = self.control();
        let (head, current) = {
            let state = self.state_read();
            (Arc::clone(state.head()?), state.size)
        };
        let invalid = |reason| StoreError::InvalidSize {
            current,
            requested: new_size,
            reason,
        };
        if !aligned(new_size) {
            return Err(invalid("the size must be a multiple of 4096"));
        }
        if new_size < current {
            return Err(invalid("volumes cannot shrink"));
        }
        if new_size == current {
            return Ok(());
        }
        head.grow(new_size / BLOCK_SIZE)?;
        block_on(head.sync(IoPriority::Foreground))?;
        let mut state = self.state_write();
        let mut m = state.manifest();
        m.size_bytes = new_size;
        if let Some(h) = m.layers.first_mut() {
            h.size_bytes = new_size;
        }
        self.write_manifest(&m)?;
        state.size = new_size;
        if let Some(h) = state.layers.last_mut() {
            h.size = new_size;
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}

/// Copies one block's entry (and data, unless a tombstone) verbatim from `from` to
/// `to`: data first, then entry, then index. Damaged blocks stay detectably damaged.
async fn copy_block(
    from: &Layer,
    to: &Layer,
    priority: IoPriority,
    block: u64,
) -> Result<(), StoreError> {
    let entry = from
        .read_entries(priority, block, 1)
        .await?
        .into_iter()
        .next()
        .flatten()
        .unwrap_or_else(Entry::poisoned);
    if entry.flags != FLAG_TRIMMED && entry != Entry::poisoned() {
        let mut buf = vec![0u8; BS];
        from.read_data(priority, block, &mut buf).await?;
        to.write_data(priority, block, &buf).await?;
    }
    to.write_entries(priority, block, &[entry]).await?;
    to.mark(block, &entry);
    Ok(())
}

/// Removes a layer directory; a missing one is fine (already removed).
fn remove_layer_dir(dir: &Path) -> Result<(), StoreError> {
    match fs::remove_dir_all(dir) {
        Err(e) if !is_not_found(&e) => Err(io_error("remove layer directory", dir)(e)),
        _ => Ok(()),
    }
}

/// Prepares `dir` for a new volume: refuses one that holds a volume, removes leftovers
/// of a create that crashed before its manifest, and makes an empty `layers`.
fn prepare_volume_dir(dir: &Path) -> Result<(), StoreError> {
    fs::create_dir_all(dir).map_err(io_error("create volume directory", dir))?;
    let manifest = dir.join(MANIFEST);
    if manifest.exists() {
        return Err(StoreError::AlreadyExists(dir.to_path_buf()));
    }
    // Without a manifest there is no volume: anything here is from a create that
    // crashed before finishing.
    let layers_dir = dir.join("layers");
    match fs::remove_dir_all(&layers_dir) {
        Err(e) if !is_not_found(&e) => {
            return Err(io_error("remove leftover layers", &layers_dir)(e))
        }
        _ => {}
    }
    fs::create_dir(&layers_dir).map_err(io_error("create layers directory", &layers_dir))
}

/// Removes layer directories the manifest does not name (interrupted snapshot or
/// deletion) and a stale temporary manifest. Shared layers are named, so kept.
fn remove_orphans(dir: &Path, layers: &[Slot]) -> Result<(), StoreError> {
    let known: HashSet<LayerId> = layers.iter().map(|s| s.layer.id).collect();
    let layers_dir = dir.join("layers");
    let entries = fs::read_dir(&layers_dir).map_err(io_error("list layers", &layers_dir))?;
    for entry in entries {
        let entry = entry.map_err(io_error("list layers", &layers_dir))?;
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| n.parse::<LayerId>().ok()) else {
            continue;
        };
        if !known.contains(&id) {
            tracing::info!(layer = id, dir = %dir.display(), "removing unreferenced layer");
            remove_layer_dir(&entry.path())?;
        }
    }
    let tmp = dir.join(MANIFEST_TMP);
    match fs::remove_file(&tmp) {
        Err(e) if !is_not_found(&e) => Err(io_error("remove temporary manifest", &tmp)(e)),
        _ => Ok(()),
    }
}
