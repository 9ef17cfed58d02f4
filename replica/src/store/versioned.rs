//! Versioned reads of a snapshot: every block of a range with the seq that wrote it,
//! whether it is a trim tombstone, whether it failed its checksum, and the data of the
//! intact ones.
//!
//! Why this exists next to [`LayeredStore::read_snapshot`]: a plain read turns trims
//! and never-written blocks into zeros and fails the whole range on one bad block. A
//! replica that restores a snapshot merges the sealed copies of several replicas block
//! by block, keeping the highest seq (a trim with a higher seq beats older data), and
//! takes a block that is damaged here from another copy; for that it needs each
//! block's version, not just its bytes. The reads are background I/O: nobody's
//! application waits on a restore.
//!
//! [`LayeredStore::read_versions_only`] reads the metadata entries alone (no data
//! read, no data checksum): a restore whose volume already shares this replica's
//! sealed layers of the snapshot compares those claims with the other holders' and
//! fetches data only for the blocks where they differ.

use super::data_path::owner;
use super::format::{Entry, Verdict, FLAG_DATA};
use super::layer::Layer;
use super::{check_range, IoPriority, LayeredStore, StoreError, BS};
use super::{BlockVersion, VersionedBlocks};
use crate::park::block_on;

/// Versioned reads serve copies and reconciles: nobody's application waits on them.
const PRIORITY: IoPriority = IoPriority::Background;

/// Blocks a versioned read holds locked at once (256 KiB). Block b's stripe is
/// b mod [`super::locks::STRIPES`], so a whole range under one lock — a copy stream's
/// 1 MiB chunk, a resync's 4 MiB comparison — held a quarter or all of the stripes
/// for its background I/O, and every foreground write to *any* block of the volume
/// on those stripes waited behind it: the tail latency of writes during a rebuild.
/// A piece this size holds 1/16 of them.
const LOCKED_PIECE_BLOCKS: u64 = 64;

impl LayeredStore {
    /// Reads `len` bytes at `offset` of snapshot `snapshot_id` as versions: per block
    /// its seq, trim or damage, plus the data of intact blocks (see the module doc).
    /// Unlike [`Self::read_snapshot`], a damaged block does not fail the read: it is
    /// reported so the caller can take it from another replica. Background I/O.
    pub fn read_snapshot_versions(
        &self,
        snapshot_id: &str,
        offset: u64,
        len: u64,
    ) -> Result<VersionedBlocks, StoreError> {
        block_on(self.read_versions(Some(snapshot_id), offset, len, true))
    }

    /// [`Self::read_snapshot_versions`] of the current view (the head included): what
    /// a new engine compares across replicas when it reconciles a dirty region.
    pub fn read_current_versions(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<VersionedBlocks, StoreError> {
        block_on(self.read_versions(None, offset, len, true))
    }

    /// The versions of `len` bytes at `offset` of the current view (`None`, the head
    /// included) or of a snapshot, read from the metadata entries alone: no data is
    /// read or checked, so a [`BlockVersion::Data`] is only what its entry claims.
    /// A tombstone needs no data to be verified and is [`BlockVersion::Corrupt`] when
    /// its own checksum fails, as is an entry with invalid flags or one the index
    /// expects but the meta file lacks. This is how a replica whose volume shares a
    /// snapshot's sealed layers compares them with other holders' copies cheaply.
    /// Background I/O.
    pub fn read_versions_only(
        &self,
        snapshot: Option<&str>,
        offset: u64,
        len: u64,
    ) -> Result<VersionedBlocks, StoreError> {
        block_on(self.read_versions(snapshot, offset, len, false))
    }

    /// The versioned read behind the methods above; the data-plane handle awaits it.
    pub(super) async fn read_versions(
        &self,
        snapshot: Option<&str>,
        offset: u64,
        len: u64,
        with_data: bool,
    ) -> Result<VersionedBlocks, StoreError> {
        let _gate = self.locks.gate_shared().await;
        let (layers, size) = self.view_layers(snapshot)?;
        let (first, n) = check_range(offset, len, size)?;
        let count = usize::try_from(n).map_err(|_| StoreError::OutOfRange { offset, len, size })?;
        let end = first + n;
        let mut versions = vec![BlockVersion::Unwritten; count];
        let mut data = Vec::new();
        let mut b = first;
        let mut piece_end = first;
        let mut _stripes = None;
        while b < end {
            if b >= piece_end {
                // Locked a piece at a time (see LOCKED_PIECE_BLOCKS); each block's entry
                // and data are still read under its stripe, which is all a version needs.
                _stripes = None;
                piece_end = (b + LOCKED_PIECE_BLOCKS).min(end);
                _stripes = Some(self.locks.shared(b, piece_end - b).await);
            }
            // Memory-only skip of whole bitmap words no layer of the view touches, so
            // a sparse snapshot is scanned at bitmap speed.
            let word = usize::try_from(b / 64).unwrap_or(usize::MAX);
            let touched = layers
                .iter()
                .fold(0u64, |acc, l| acc | l.present_bits().word(word));
            if touched == 0 {
                b = ((b / 64 + 1) * 64).min(piece_end);
                continue;
            }
            let here = owner(&layers, b);
            // An unowned run stops at the word's end so the next word can be skipped.
            let limit = match here {
                Some(_) => piece_end,
                None => ((b / 64 + 1) * 64).min(piece_end),
            };
            let mut run_end = b + 1;
            while run_end < limit && owner(&layers, run_end) == here {
                run_end += 1;
            }
            if let Some(i) = here {
                let layer = &layers[i];
                let count = (run_end - b) as usize;
                let entries = layer.read_entries(PRIORITY, b, count).await?;
                let out = &mut versions[(b - first) as usize..(run_end - first) as usize];
                if with_data {
                    verify_run(layer, b, &entries, out, &mut data).await?;
                } else {
                    for (k, (entry, v)) in entries.iter().zip(out.iter_mut()).enumerate() {
                        *v = claimed_version(entry.as_ref(), b + k as u64);
                    }
                }
            }
            b = run_end;
        }
        if !with_data {
            return Ok(VersionedBlocks::versions_only(first, versions));
        }
        // `verify_run` packs one block per intact data block, so this always fits.
        VersionedBlocks::new(first, versions, data).map_err(|e| StoreError::Io {
            op: "pack versioned blocks",
            path: self.dir.clone(),
            source: std::io::Error::other(e),
        })
    }

    /// Size in bytes of snapshot `snapshot_id` (the volume size when it was taken).
    pub fn snapshot_size(&self, snapshot_id: &str) -> Result<u64, StoreError> {
        let state = self.state_read();
        let i = state.find_snapshot(snapshot_id)?;
        Ok(state.layers[i].size)
    }
}

/// Versions of a run of blocks owned by `layer` from `first`, their data checked
/// against the entries; the bytes of intact data blocks are appended to `data`.
async fn verify_run(
    layer: &Layer,
    first: u64,
    entries: &[Option<Entry>],
    out: &mut [BlockVersion],
    data: &mut Vec<u8>,
) -> Result<(), StoreError> {
    let mut buf = vec![0u8; entries.len() * BS];
    let only_tombstones = entries
        .iter()
        .enumerate()
        .all(|(k, e)| matches!(e, Some(e) if e.is_valid_tombstone(first + k as u64)));
    if !only_tombstones {
        layer.read_data(PRIORITY, first, &mut buf).await?;
    }
    for (k, ((entry, bytes), v)) in entries
        .iter()
        .zip(buf.chunks_exact(BS))
        .zip(out.iter_mut())
        .enumerate()
    {
        let block = first + k as u64;
        *v = match entry {
            // The index says the layer has the block but its entry is gone.
            None => BlockVersion::Corrupt { seq: 0 },
            Some(e) => match e.verify(block, bytes) {
                Verdict::Data => {
                    data.extend_from_slice(bytes);
                    BlockVersion::Data { seq: e.seq }
                }
                Verdict::Trimmed => BlockVersion::Trimmed { seq: e.seq },
                Verdict::Corrupt => BlockVersion::Corrupt { seq: e.seq },
            },
        };
    }
    Ok(())
}

/// What `entry` of `block` claims, checked only as far as the entry alone allows.
fn claimed_version(entry: Option<&Entry>, block: u64) -> BlockVersion {
    match entry {
        // The index says the layer has the block but its entry is gone.
        None => BlockVersion::Corrupt { seq: 0 },
        Some(e) if e.flags == FLAG_DATA => BlockVersion::Data { seq: e.seq },
        Some(e) if e.is_valid_tombstone(block) => BlockVersion::Trimmed { seq: e.seq },
        Some(e) => BlockVersion::Corrupt { seq: e.seq },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_io::BLOCK_SIZE;
    use crate::store::StoreError;

    const B: u64 = BLOCK_SIZE;

    fn block(fill: u8) -> Vec<u8> {
        vec![fill; BS]
    }

    fn poke(path: &std::path::Path, offset: u64, byte: u8) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open layer file");
        let mut old = [0u8; 1];
        f.read_exact_at(&mut old, offset).expect("read byte");
        f.write_all_at(&[old[0] ^ byte], offset).expect("poke");
    }

    #[test]
    fn versions_report_seq_trim_corruption_and_data() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = LayeredStore::create(&tmp.path().join("v"), 300 * B).expect("create");
        // Layer 1 (snapshot "a"): blocks 0..4 data, block 2 trimmed later in layer 2.
        s.write(0, &[block(1), block(2), block(3), block(4)].concat(), 10)
            .expect("write");
        s.snapshot("a").expect("snapshot a");
        s.trim(2 * B, B, 20).expect("trim");
        s.write(B, &block(9), 21).expect("overwrite");
        s.write(299 * B, &block(7), 22).expect("far block");
        s.flush().expect("flush");
        s.snapshot("b").expect("snapshot b");
        // A flipped data byte of block 3 in layer 1 (owned by both views).
        poke(&tmp.path().join("v/layers/1/data"), 3 * B + 17, 0x20);

        let v = s.read_snapshot_versions("b", 0, 300 * B).expect("read b");
        assert_eq!(v.first_block(), 0);
        assert_eq!(v.len(), 300);
        assert_eq!(
            &v.versions()[..5],
            &[
                BlockVersion::Data { seq: 10 },
                BlockVersion::Data { seq: 21 },
                BlockVersion::Trimmed { seq: 20 },
                BlockVersion::Corrupt { seq: 10 },
                BlockVersion::Unwritten,
            ]
        );
        assert_eq!(v.versions()[299], BlockVersion::Data { seq: 22 });
        assert!(v.versions()[5..299]
            .iter()
            .all(|x| *x == BlockVersion::Unwritten));
        assert_eq!(v.data(), [block(1), block(9), block(7)].concat().as_slice());
        let listed: Vec<(u64, Option<u8>)> = v
            .iter()
            .filter(|(_, ver, _)| *ver != BlockVersion::Unwritten)
            .map(|(b, _, d)| (b, d.map(|d| d[0])))
            .collect();
        assert_eq!(
            listed,
            vec![
                (0, Some(1)),
                (1, Some(9)),
                (2, None),
                (3, None),
                (299, Some(7))
            ]
        );

        // The older snapshot's view is its own layer only.
        let a = s.read_snapshot_versions("a", B, 2 * B).expect("read a");
        assert_eq!(
            a.versions(),
            &[
                BlockVersion::Data { seq: 10 },
                BlockVersion::Data { seq: 10 }
            ]
        );
        assert_eq!(a.data(), [block(2), block(3)].concat().as_slice());
        assert_eq!(s.snapshot_size("a").expect("size"), 300 * B);
    }

    #[test]
    fn missing_entry_is_corrupt_and_bad_requests_fail() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = LayeredStore::create(&tmp.path().join("v"), 8 * B).expect("create");
        s.write(0, &block(5), 3).expect("write");
        s.snapshot("a").expect("snapshot");
        let v = s.read_snapshot_versions("a", 0, 8 * B).expect("read");
        assert!(!v.is_unwritten());
        // Zero the entry on disk behind the index's back: damage, never "unwritten".
        zero_entry(&tmp.path().join("v/layers/1/meta"), 0);
        let v = s.read_snapshot_versions("a", 0, B).expect("read");
        assert_eq!(v.versions(), &[BlockVersion::Corrupt { seq: 0 }]);
        assert!(v.data().is_empty());

        let empty = s.read_snapshot_versions("a", 4 * B, 4 * B).expect("read");
        assert!(empty.is_unwritten());
        assert!(matches!(
            s.read_snapshot_versions("nope", 0, B),
            Err(StoreError::SnapshotNotFound(_))
        ));
        assert!(matches!(
            s.read_snapshot_versions("a", 1, B),
            Err(StoreError::Unaligned { .. })
        ));
        assert!(matches!(
            s.read_snapshot_versions("a", 4 * B, 8 * B),
            Err(StoreError::OutOfRange { .. })
        ));
    }

    #[test]
    fn snapshots_of_a_deleted_volume_stay_readable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = LayeredStore::create(&tmp.path().join("v"), 4 * B).expect("create");
        s.write(B, &block(8), 4).expect("write");
        s.snapshot("a").expect("snapshot");
        s.delete_volume().expect("delete volume");
        let v = s.read_snapshot_versions("a", 0, 4 * B).expect("read");
        assert_eq!(v.versions()[1], BlockVersion::Data { seq: 4 });
        assert_eq!(v.data(), block(8).as_slice());
    }

    /// Zeroes the meta entry of `block` (the on-disk "no entry" value).
    fn zero_entry(meta: &std::path::Path, block: u64) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(meta)
            .expect("open meta");
        f.write_all_at(&[0u8; 16], 4096 + block * 16)
            .expect("zero entry");
    }

    /// XORs `byte` into the meta entry of `block` at `field` (0 crc, 4 flags, 8 seq).
    fn poke_entry(meta: &std::path::Path, block: u64, field: u64, byte: u8) {
        poke(meta, 4096 + block * 16 + field, byte);
    }

    #[test]
    fn versions_only_reads_claims_from_entries_alone() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = LayeredStore::create(&tmp.path().join("v"), 300 * B).expect("create");
        // Layer 1 (snapshot "a"): data 0..5, tombstones 5..7.
        s.write(
            0,
            &[block(1), block(2), block(3), block(4), block(5)].concat(),
            10,
        )
        .expect("write");
        s.trim(5 * B, 2 * B, 11).expect("trim");
        s.snapshot("a").expect("snapshot a");
        // Head: block 1 overwritten, block 2 trimmed, block 250 written.
        s.write(B, &block(9), 21).expect("overwrite");
        s.trim(2 * B, B, 22).expect("trim head");
        s.write(250 * B, &block(7), 23).expect("far block");
        s.flush().expect("flush");
        let meta = tmp.path().join("v/layers/1/meta");
        // Block 0: flipped data, intact entry: only a full read can tell.
        poke(&tmp.path().join("v/layers/1/data"), 17, 0x20);
        // Block 3: flags no valid entry has (1 | 2).
        poke_entry(&meta, 3, 4, 0x02);
        // Block 4: entry gone behind the index's back.
        zero_entry(&meta, 4);
        // Block 6: a tombstone whose own checksum fails.
        poke_entry(&meta, 6, 0, 0x01);

        let a = s.read_versions_only(Some("a"), 0, 8 * B).expect("read a");
        assert!(a.is_versions_only());
        assert_eq!(a.first_block(), 0);
        assert_eq!(
            a.versions(),
            &[
                BlockVersion::Data { seq: 10 },
                BlockVersion::Data { seq: 10 },
                BlockVersion::Data { seq: 10 },
                BlockVersion::Corrupt { seq: 10 },
                BlockVersion::Corrupt { seq: 0 },
                BlockVersion::Trimmed { seq: 11 },
                BlockVersion::Corrupt { seq: 11 },
                BlockVersion::Unwritten,
            ]
        );
        assert!(a.data().is_empty());
        assert!(a.iter().all(|(_, _, bytes)| bytes.is_none()));
        // The full read checks the data the entries-only read trusted.
        let full = s.read_snapshot_versions("a", 0, B).expect("full read");
        assert_eq!(full.versions(), &[BlockVersion::Corrupt { seq: 10 }]);
        assert!(!full.is_versions_only());

        // The current view: the head's entries over the snapshot's.
        let now = s.read_versions_only(None, 0, 300 * B).expect("read head");
        assert_eq!(now.len(), 300);
        assert_eq!(
            &now.versions()[..3],
            &[
                BlockVersion::Data { seq: 10 },
                BlockVersion::Data { seq: 21 },
                BlockVersion::Trimmed { seq: 22 },
            ]
        );
        assert_eq!(now.versions()[250], BlockVersion::Data { seq: 23 });
        assert!(now.versions()[7..250]
            .iter()
            .chain(&now.versions()[251..])
            .all(|v| *v == BlockVersion::Unwritten));
        let tail = s.read_versions_only(None, 256 * B, 44 * B).expect("tail");
        assert_eq!(tail.first_block(), 256);
        assert!(tail.is_unwritten());
    }

    #[test]
    fn versions_only_refuses_what_a_full_read_refuses() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = LayeredStore::create(&tmp.path().join("v"), 8 * B).expect("create");
        s.write(B, &block(8), 4).expect("write");
        s.snapshot("a").expect("snapshot");
        assert!(matches!(
            s.read_versions_only(None, 1, B),
            Err(StoreError::Unaligned { .. })
        ));
        assert!(matches!(
            s.read_versions_only(None, 4 * B, 8 * B),
            Err(StoreError::OutOfRange { .. })
        ));
        assert!(matches!(
            s.read_versions_only(Some("nope"), 0, B),
            Err(StoreError::SnapshotNotFound(_))
        ));
        s.delete_volume().expect("delete volume");
        assert!(matches!(
            s.read_versions_only(None, 0, B),
            Err(StoreError::VolumeDeleted)
        ));
        // The snapshot of a deleted volume is still there to compare against.
        let v = s.read_versions_only(Some("a"), 0, 2 * B).expect("read a");
        assert_eq!(
            v.versions(),
            &[BlockVersion::Unwritten, BlockVersion::Data { seq: 4 }]
        );
    }

    #[test]
    fn parts_must_agree() {
        assert!(VersionedBlocks::new(0, vec![BlockVersion::Data { seq: 1 }], vec![]).is_err());
        assert!(VersionedBlocks::new(
            0,
            vec![BlockVersion::Trimmed { seq: 1 }, BlockVersion::Unwritten],
            vec![]
        )
        .is_ok());
        let v = VersionedBlocks::new(7, vec![BlockVersion::Data { seq: 1 }], block(3))
            .expect("one data block");
        assert_eq!(
            v.iter().next(),
            Some((7, BlockVersion::Data { seq: 1 }, Some(&block(3)[..])))
        );
        let claims = VersionedBlocks::versions_only(7, vec![BlockVersion::Data { seq: 1 }]);
        assert!(claims.is_versions_only() && claims.data().is_empty());
        assert_eq!(
            claims.iter().next(),
            Some((7, BlockVersion::Data { seq: 1 }, None))
        );
        // Same versions, but one of them vouches for nothing: not the same range.
        let trims = vec![BlockVersion::Trimmed { seq: 1 }];
        assert_ne!(
            VersionedBlocks::versions_only(7, trims.clone()),
            VersionedBlocks::new(7, trims, vec![]).expect("no data")
        );
    }
}
