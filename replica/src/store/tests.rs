//! Unit tests of the layered store: checksums, torn writes, layers, reopen, and a
//! proptest against an in-memory model.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use proptest::prelude::*;

use super::format::{self, Entry, ENTRY_SIZE, META_HEADER_SIZE};
use super::locks::STRIPES;
use super::*;
use crate::block_io::{BlockIoError, VolumeBlocks};

const B: u64 = BLOCK_SIZE;

/// Content unique to (block, version): a reader can tell every version apart.
pub(super) fn pattern(block: u64, version: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BS);
    let mut x =
        block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.wrapping_mul(0xD1B5_4A32_D192_ED03);
    while v.len() < BS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v[..8].copy_from_slice(&block.to_le_bytes());
    v[8..16].copy_from_slice(&version.to_le_bytes());
    v
}

pub(super) fn new_store(blocks: u64) -> (tempfile::TempDir, LayeredStore) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = LayeredStore::create(&tmp.path().join("vol"), blocks * B).expect("create");
    (tmp, store)
}

pub(super) fn layer_file(store: &LayeredStore, layer: LayerId, name: &str) -> PathBuf {
    store
        .dir()
        .join("layers")
        .join(layer.to_string())
        .join(name)
}

pub(super) fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for poke");
    f.write_all_at(bytes, offset).expect("poke");
}

fn is_corrupt_at(r: Result<Vec<u8>, StoreError>, block: u64) -> bool {
    matches!(r, Err(StoreError::Corrupt { block: b, .. }) if b == block)
}

#[test]
fn unwritten_reads_zero_and_writes_round_trip() {
    let (_t, s) = new_store(8);
    assert_eq!(s.read(0, 8 * B).expect("read"), vec![0u8; 8 * BS]);
    s.write(2 * B, &[pattern(2, 1), pattern(3, 1)].concat(), 1)
        .expect("write");
    assert_eq!(s.read(2 * B, B).expect("read"), pattern(2, 1));
    assert_eq!(s.read(3 * B, B).expect("read"), pattern(3, 1));
    assert_eq!(s.read(4 * B, B).expect("read"), vec![0u8; BS]);
    assert_eq!(s.block_seq(2).expect("seq"), Some(1));
    assert_eq!(s.block_seq(4).expect("seq"), None);
}

#[test]
fn bad_ranges_are_rejected_and_change_nothing() {
    let (_t, s) = new_store(4);
    assert!(matches!(s.read(1, B), Err(StoreError::Unaligned { .. })));
    assert!(matches!(
        s.write(0, &[0u8; 100], 1),
        Err(StoreError::Unaligned { .. })
    ));
    assert!(matches!(
        s.read(3 * B, 2 * B),
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        s.write(4 * B, &pattern(4, 1), 1),
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        s.trim(u64::MAX - B + 1, B, 1),
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        s.snapshot(""),
        Err(StoreError::InvalidSnapshotId { .. })
    ));
    assert!(matches!(
        s.expand(3 * B),
        Err(StoreError::InvalidSize { .. })
    ));
    assert!(matches!(
        s.expand(5 * B + 1),
        Err(StoreError::InvalidSize { .. })
    ));
    assert_eq!(s.read(0, 4 * B).expect("read"), vec![0u8; 4 * BS]);
    assert_eq!(s.space_used().expect("space").layers[0].blocks, 0);
}

#[test]
fn flipped_data_byte_is_corrupt_for_exactly_that_block() {
    let (_t, s) = new_store(8);
    for b in 0..8 {
        s.write(b * B, &pattern(b, 1), 1).expect("write");
    }
    s.flush().expect("flush");
    let data = layer_file(&s, 1, "data");
    poke(&data, 5 * B + 100, &[pattern(5, 1)[100] ^ 0x01]);
    assert!(is_corrupt_at(s.read(5 * B, B), 5));
    assert!(
        is_corrupt_at(s.read(0, 8 * B), 5),
        "a range covering it fails too"
    );
    for b in (0..8).filter(|&b| b != 5) {
        assert_eq!(s.read(b * B, B).expect("read"), pattern(b, 1));
    }
    assert!(matches!(
        s.block_seq(5),
        Err(StoreError::Corrupt { block: 5, .. })
    ));
    let bad = s.verify().expect("verify");
    assert_eq!(
        bad,
        vec![CorruptBlock {
            layer: 1,
            snapshot_id: None,
            block: 5
        }]
    );
    // The data plane sees the distinct protocol error.
    let e: BlockIoError = StoreError::Corrupt { layer: 1, block: 5 }.into();
    assert!(matches!(e, BlockIoError::Corrupt { block: 5 }));
}

#[test]
fn damaged_entry_is_corrupt() {
    let (_t, s) = new_store(4);
    s.write(B, &pattern(1, 1), 7).expect("write");
    let meta = layer_file(&s, 1, "meta");
    // Flip a bit of the stored seq: the crc covers it.
    poke(&meta, META_HEADER_SIZE + ENTRY_SIZE + 8, &[6]);
    assert!(is_corrupt_at(s.read(B, B), 1));
    // Garbage flags.
    poke(&meta, META_HEADER_SIZE + ENTRY_SIZE + 4, &[9, 9, 9, 9]);
    assert!(is_corrupt_at(s.read(B, B), 1));
}

#[test]
fn torn_new_data_without_entry_is_detected_or_old() {
    let (_t, s) = new_store(4);
    s.write(0, &pattern(0, 1), 1).expect("write");
    s.write(B, &pattern(1, 1), 1).expect("write");
    s.snapshot("s").expect("snapshot");
    s.write(0, &pattern(0, 2), 2).expect("write");
    s.flush().expect("flush");
    drop(s);
    let dir = _t.path().join("vol");
    // Block 0 has an entry in the head: new bytes under it must read as corrupt.
    poke(&dir.join("layers/2/data"), 0, &pattern(0, 3));
    // Block 1 has no entry in the head: new bytes there must be ignored (old-valid).
    poke(&dir.join("layers/2/data"), B, &pattern(1, 3));
    let s = LayeredStore::open(&dir).expect("open");
    assert!(is_corrupt_at(s.read(0, B), 0));
    assert_eq!(s.read(B, B).expect("read"), pattern(1, 1));
}

#[test]
fn torn_new_entry_without_data_is_detected() {
    let (t, s) = new_store(4);
    s.write(0, &pattern(0, 1), 1).expect("write");
    s.flush().expect("flush");
    drop(s);
    let dir = t.path().join("vol");
    let entry = Entry::for_data(0, 2, &pattern(0, 2));
    poke(
        &dir.join("layers/1/meta"),
        META_HEADER_SIZE,
        &entry.encode(),
    );
    // Also an entry for a never-written block whose data never landed.
    let entry = Entry::for_data(3, 2, &pattern(3, 2));
    poke(
        &dir.join("layers/1/meta"),
        META_HEADER_SIZE + 3 * ENTRY_SIZE,
        &entry.encode(),
    );
    let s = LayeredStore::open(&dir).expect("open");
    assert!(is_corrupt_at(s.read(0, B), 0));
    assert!(is_corrupt_at(s.read(3 * B, B), 3));
    assert_eq!(s.read(B, 2 * B).expect("read"), vec![0u8; 2 * BS]);
}

/// Injects write failures into every file it opens, to simulate a crash between the
/// data write and the entry write, and can hold data writes at a gate (to catch an
/// operation in the middle).
#[derive(Debug, Default)]
struct Faults {
    fail_meta: AtomicBool,
    fail_data: AtomicBool,
    gate: WriteGate,
    /// Data-file syncs wait here while it is closed.
    sync_gate: WriteGate,
    /// Data-file reads wait here while it is closed.
    read_gate: WriteGate,
}

/// Data writes wait here while it is closed; `held` counts the writes waiting.
#[derive(Debug, Default)]
struct WriteGate {
    closed: std::sync::Mutex<bool>,
    changed: std::sync::Condvar,
    held: std::sync::atomic::AtomicUsize,
}

impl WriteGate {
    fn set(&self, closed: bool) {
        *self.closed.lock().expect("gate") = closed;
        self.changed.notify_all();
    }

    fn pass(&self) {
        let mut closed = self.closed.lock().expect("gate");
        if *closed {
            self.held.fetch_add(1, Ordering::SeqCst);
            self.changed.notify_all();
            while *closed {
                closed = self.changed.wait(closed).expect("gate");
            }
            self.held.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Blocks until some write waits at the (closed) gate.
    fn wait_for_a_held_write(&self) {
        let mut closed = self.closed.lock().expect("gate");
        while self.held.load(Ordering::SeqCst) == 0 {
            closed = self.changed.wait(closed).expect("gate");
        }
        drop(closed);
    }
}

#[derive(Debug)]
struct FaultyFactory(Arc<Faults>);

#[derive(Debug)]
struct FaultyFile {
    inner: Arc<dyn BlockFile>,
    is_meta: bool,
    faults: Arc<Faults>,
}

impl BlockFile for FaultyFile {
    fn read_at<'a>(&self, priority: IoPriority, buf: &'a mut [u8], offset: u64) -> FileIo<'a> {
        if !self.is_meta {
            self.faults.read_gate.pass();
        }
        self.inner.read_at(priority, buf, offset)
    }
    fn write_at(&self, priority: IoPriority, buf: &[u8], offset: u64) -> FileIo<'static> {
        let flag = if self.is_meta {
            &self.faults.fail_meta
        } else {
            &self.faults.fail_data
        };
        if flag.load(Ordering::SeqCst) {
            return FileIo::done(Err(io::Error::other("injected write failure")));
        }
        if !self.is_meta {
            self.faults.gate.pass();
        }
        self.inner.write_at(priority, buf, offset)
    }
    fn sync_data(&self, priority: IoPriority) -> FileIo<'static> {
        if !self.is_meta {
            self.faults.sync_gate.pass();
        }
        self.inner.sync_data(priority)
    }
    fn punch_hole(&self, priority: IoPriority, offset: u64, len: u64) -> FileIo<'static> {
        self.inner.punch_hole(priority, offset, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
}

impl BlockFileFactory for FaultyFactory {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn BlockFile>> {
        Ok(Arc::new(FaultyFile {
            inner: StdFileFactory.open(path, create)?,
            is_meta: path.file_name().is_some_and(|n| n == "meta"),
            faults: Arc::clone(&self.0),
        }))
    }
}

/// A versioned read of a long range (a copy stream's chunk, a resync's comparison)
/// holds its blocks' stripes a piece at a time: a foreground write to a block of
/// another piece goes ahead while the read waits for the disk. (Block b's stripe is
/// b mod STRIPES, so a 4 MiB range under one lock held every stripe, and every write
/// to the volume waited for the whole background read.)
#[test]
fn a_long_versioned_read_does_not_hold_every_stripe() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(Faults::default());
    let blocks = STRIPES as u64;
    let s = Arc::new(
        LayeredStore::create_with(
            &tmp.path().join("vol"),
            blocks * B,
            Arc::new(FaultyFactory(Arc::clone(&faults))),
        )
        .expect("create"),
    );
    for b in 0..blocks {
        s.write(b * B, &pattern(b, 1), 1).expect("write");
    }
    faults.read_gate.set(true);
    let versions = {
        let s = Arc::clone(&s);
        std::thread::spawn(move || s.read_current_versions(0, blocks * B))
    };
    faults.read_gate.wait_for_a_held_write();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let writer = {
        let s = Arc::clone(&s);
        std::thread::spawn(move || {
            let r = s.write((blocks / 2) * B, &pattern(7, 1), 2);
            let _ = done_tx.send(r.is_ok());
        })
    };
    let done = done_rx.recv_timeout(std::time::Duration::from_secs(20));
    faults.read_gate.set(false);
    assert_eq!(
        done,
        Ok(true),
        "a write to a block far from the read's current piece waited for the read"
    );
    writer.join().expect("writer");
    let read = versions.join().expect("reader").expect("versions");
    assert_eq!(read.versions().len() as u64, blocks);
    assert!(matches!(
        read.versions()[(blocks / 2) as usize],
        BlockVersion::Data { seq: 1 | 2 }
    ));
}

/// A flush that arrives while another flush's sync is still running must not return
/// before a sync covering its writes completed (it used to see the dirty flag the
/// first one had cleared and return at once).
#[test]
fn a_second_flush_waits_for_a_sync_that_covers_its_writes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(Faults::default());
    let s = Arc::new(
        LayeredStore::create_with(
            &tmp.path().join("vol"),
            4 * B,
            Arc::new(FaultyFactory(Arc::clone(&faults))),
        )
        .expect("create"),
    );
    s.write(0, &pattern(0, 1), 1).expect("write");
    faults.sync_gate.set(true);
    let first = {
        let s = Arc::clone(&s);
        std::thread::spawn(move || s.flush())
    };
    faults.sync_gate.wait_for_a_held_write();
    let second_done = Arc::new(AtomicBool::new(false));
    let second = {
        let (s, done, faults) = (
            Arc::clone(&s),
            Arc::clone(&second_done),
            Arc::clone(&faults),
        );
        std::thread::spawn(move || {
            let r = s.flush();
            done.store(true, Ordering::SeqCst);
            faults.sync_gate.set(true); // wake the waiter below
            r
        })
    };
    // Either the second flush returns, or it waits at the gate with the first.
    {
        let gate = &faults.sync_gate;
        let mut closed = gate.closed.lock().expect("gate");
        while gate.held.load(Ordering::SeqCst) < 2 && !second_done.load(Ordering::SeqCst) {
            closed = gate.changed.wait(closed).expect("gate");
        }
    }
    assert!(
        !second_done.load(Ordering::SeqCst),
        "the second flush returned while the first one's sync was still running"
    );
    faults.sync_gate.set(false);
    first.join().expect("first").expect("first flush");
    second.join().expect("second").expect("second flush");
    // Nothing written since: a third flush needs no sync.
    faults.sync_gate.set(true);
    s.flush().expect("a flush with nothing to sync");
    faults.sync_gate.set(false);
}

#[test]
fn failed_entry_write_leaves_old_or_detectably_torn() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("vol");
    let faults = Arc::new(Faults::default());
    let s = LayeredStore::create_with(&dir, 4 * B, Arc::new(FaultyFactory(Arc::clone(&faults))))
        .expect("create");
    s.write(0, &pattern(0, 1), 1).expect("write");
    faults.fail_meta.store(true, Ordering::SeqCst);
    assert!(matches!(
        s.write(0, &[pattern(0, 2), pattern(1, 2)].concat(), 2),
        Err(StoreError::Io { .. })
    ));
    drop(s);
    let s = LayeredStore::open(&dir).expect("reopen");
    // Block 0's old entry no longer matches its overwritten bytes; block 1 never got an
    // entry, so it is still unwritten. Neither returns the new bytes as if valid.
    assert!(is_corrupt_at(s.read(0, B), 0));
    assert_eq!(s.read(B, B).expect("read"), vec![0u8; BS]);
    // Rebuild repairs the torn block even with an older seq.
    assert_eq!(
        s.write_if_newer(0, &pattern(0, 1), 1).expect("repair"),
        vec![WriteOutcome::Applied]
    );
    assert_eq!(s.read(0, B).expect("read"), pattern(0, 1));
}

/// A snapshot deletion's merge copies blocks for as long as it takes without the
/// control lock: meanwhile the volume can be sealed and expanded, a second deletion is
/// refused at once (MergeInProgress), and every view is the same afterwards, also
/// after a reopen.
#[test]
fn control_operations_do_not_wait_for_a_merge() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("vol");
    let faults = Arc::new(Faults::default());
    let s = Arc::new(
        LayeredStore::create_with(&dir, 8 * B, Arc::new(FaultyFactory(Arc::clone(&faults))))
            .expect("create"),
    );
    let old = [pattern(0, 1), pattern(1, 1), pattern(2, 1)].concat();
    s.write(0, &old, 1).expect("write");
    s.snapshot("a").expect("snapshot a");
    s.write(4 * B, &pattern(4, 2), 2).expect("write");
    let mut image = old.clone();
    image.extend(vec![0u8; BS]);
    image.extend(pattern(4, 2));

    faults.gate.set(true);
    let merging = {
        let s = Arc::clone(&s);
        std::thread::spawn(move || s.delete_snapshot("a"))
    };
    faults.gate.wait_for_a_held_write();
    assert!(matches!(
        s.delete_snapshot("a"),
        Err(StoreError::MergeInProgress)
    ));
    s.snapshot("b").expect("a seal does not wait for the merge");
    s.expand(16 * B)
        .expect("an expansion does not wait for the merge");
    faults.gate.set(false);
    merging
        .join()
        .expect("merge thread")
        .expect("the merge completes");

    let check = |s: &LayeredStore| {
        let ids: Vec<String> = s.snapshots().into_iter().map(|i| i.id).collect();
        assert_eq!(ids, vec!["b".to_string()]);
        assert_eq!(s.read_snapshot("b", 0, 5 * B).expect("read b"), image);
        let mut now = image.clone();
        now.extend(vec![0u8; 11 * BS]);
        assert_eq!(s.read(0, 16 * B).expect("read"), now);
        assert!(s.verify().expect("verify").is_empty());
    };
    check(&s);
    drop(s);
    check(&LayeredStore::open(&dir).expect("reopen"));
}

#[test]
fn failed_data_write_changes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("vol");
    let faults = Arc::new(Faults::default());
    let s = LayeredStore::create_with(&dir, 4 * B, Arc::new(FaultyFactory(Arc::clone(&faults))))
        .expect("create");
    s.write(0, &pattern(0, 1), 1).expect("write");
    faults.fail_data.store(true, Ordering::SeqCst);
    assert!(s.write(0, &pattern(0, 2), 2).is_err());
    assert_eq!(s.read(0, B).expect("read"), pattern(0, 1));
    assert_eq!(s.block_seq(0).expect("seq"), Some(1));
}

#[test]
fn write_if_newer_skips_older_and_equal_seqs() {
    let (_t, s) = new_store(4);
    s.write(0, &pattern(0, 10), 10).expect("write");
    let two = [pattern(0, 5), pattern(1, 5)].concat();
    assert_eq!(
        s.write_if_newer(0, &two, 5).expect("wif"),
        vec![WriteOutcome::Skipped, WriteOutcome::Applied]
    );
    assert_eq!(s.read(0, B).expect("read"), pattern(0, 10));
    assert_eq!(s.read(B, B).expect("read"), pattern(1, 5));
    assert_eq!(
        s.write_if_newer(0, &pattern(0, 99), 10).expect("wif"),
        vec![WriteOutcome::Skipped]
    );
    assert_eq!(
        s.write_if_newer(0, &pattern(0, 11), 11).expect("wif"),
        vec![WriteOutcome::Applied]
    );
    assert_eq!(s.read(0, B).expect("read"), pattern(0, 11));
    // A trim's seq also wins against older writes.
    s.trim(2 * B, B, 20).expect("trim");
    assert_eq!(
        s.write_if_newer(2 * B, &pattern(2, 15), 15).expect("wif"),
        vec![WriteOutcome::Skipped]
    );
    assert_eq!(s.read(2 * B, B).expect("read"), vec![0u8; BS]);
    assert_eq!(s.block_seq(2).expect("seq"), Some(20));
    // And it compares against the version in an older layer too.
    s.snapshot("s").expect("snapshot");
    assert_eq!(
        s.write_if_newer(0, &pattern(0, 3), 3).expect("wif"),
        vec![WriteOutcome::Skipped]
    );
}

#[test]
fn trim_reads_zeros_hides_older_layers_and_frees_space() {
    let (_t, s) = new_store(64);
    let all: Vec<u8> = (0..64).flat_map(|b| pattern(b, 1)).collect();
    s.write(0, &all, 1).expect("write");
    s.flush().expect("flush");
    s.snapshot("s1").expect("snap");
    s.write(0, &all[..32 * BS], 2).expect("write");
    s.flush().expect("flush");
    let before = s.space_used().expect("space").layers[1].allocated_bytes;
    s.trim(0, 64 * B, 3).expect("trim");
    s.flush().expect("flush");
    assert_eq!(s.read(0, 64 * B).expect("read"), vec![0u8; 64 * BS]);
    assert_eq!(s.read_snapshot("s1", 0, 64 * B).expect("read"), all);
    assert_eq!(s.allocated_ranges(None).expect("alloc"), vec![]);
    assert_eq!(
        s.allocated_ranges(Some("s1")).expect("alloc"),
        vec![0..64 * B]
    );
    let after = s.space_used().expect("space").layers[1].allocated_bytes;
    assert!(after < before, "trim freed nothing: {before} -> {after}");
    // Survives reopen.
    let dir = s.dir().to_path_buf();
    drop(s);
    let s = LayeredStore::open(&dir).expect("open");
    assert_eq!(s.read(0, 64 * B).expect("read"), vec![0u8; 64 * BS]);
    assert_eq!(s.allocated_ranges(None).expect("alloc"), vec![]);
}

#[test]
fn snapshot_keeps_old_data_and_head_gets_new() {
    let (_t, s) = new_store(16);
    for b in 0..16 {
        s.write(b * B, &pattern(b, 1), 1).expect("write");
    }
    let l1 = s.snapshot("a").expect("snap");
    assert_eq!(s.snapshot("a").expect("retry"), l1, "retry is idempotent");
    let usage = s.space_used().expect("space");
    assert_eq!(usage.layers.len(), 2);
    assert_eq!(usage.layers[1].blocks, 0, "the new head starts empty");
    for b in (0..16).step_by(2) {
        s.write(b * B, &pattern(b, 2), 2).expect("write");
    }
    for b in 0..16 {
        let v = if b & 1 == 0 { 2 } else { 1 };
        assert_eq!(s.read(b * B, B).expect("read"), pattern(b, v));
        assert_eq!(s.read_snapshot("a", b * B, B).expect("read"), pattern(b, 1));
    }
    let evens: Vec<_> = (0..16).step_by(2).map(|b| b * B..(b + 1) * B).collect();
    assert_eq!(s.changed_ranges("a", None).expect("changed"), evens);
    assert_eq!(
        s.snapshots(),
        vec![SnapshotInfo {
            id: "a".into(),
            layer: l1,
            size_bytes: 16 * B
        }]
    );
    assert!(matches!(
        s.read_snapshot("nope", 0, B),
        Err(StoreError::SnapshotNotFound(_))
    ));
}

#[test]
fn reopen_preserves_data_snapshots_and_seqs() {
    let (t, s) = new_store(8);
    s.write(0, &pattern(0, 1), 11).expect("write");
    s.snapshot("a").expect("snap");
    s.write(B, &pattern(1, 2), 12).expect("write");
    s.trim(0, B, 13).expect("trim");
    s.expand(12 * B).expect("expand");
    s.write(11 * B, &pattern(11, 3), 14).expect("write");
    s.flush().expect("flush");
    drop(s);
    let s = LayeredStore::open(&t.path().join("vol")).expect("open");
    assert_eq!(s.size(), 12 * B);
    assert_eq!(s.read(0, B).expect("read"), vec![0u8; BS]);
    assert_eq!(s.read(B, B).expect("read"), pattern(1, 2));
    assert_eq!(s.read(11 * B, B).expect("read"), pattern(11, 3));
    assert_eq!(s.read_snapshot("a", 0, B).expect("read"), pattern(0, 1));
    assert_eq!(s.block_seq(0).expect("seq"), Some(13));
    assert_eq!(s.block_seq(11).expect("seq"), Some(14));
    assert_eq!(s.snapshots().len(), 1);
    assert!(s.verify().expect("verify").is_empty());
}

#[test]
fn expansion_grows_head_and_snapshots_keep_their_size() {
    let (_t, s) = new_store(4);
    s.snapshot("small").expect("snap");
    s.expand(8 * B).expect("expand");
    s.expand(8 * B).expect("same size is a no-op");
    assert_eq!(s.size(), 8 * B);
    s.write(7 * B, &pattern(7, 1), 1).expect("write");
    assert_eq!(s.read(7 * B, B).expect("read"), pattern(7, 1));
    assert!(matches!(
        s.read_snapshot("small", 4 * B, B),
        Err(StoreError::OutOfRange { .. })
    ));
    assert_eq!(s.snapshots()[0].size_bytes, 4 * B);
    assert_eq!(
        s.changed_ranges("small", None).expect("changed"),
        vec![7 * B..8 * B]
    );
}

#[test]
fn snapshots_outlive_the_volume() {
    let (t, s) = new_store(4);
    s.write(0, &pattern(0, 1), 1).expect("write");
    s.snapshot("a").expect("snap");
    s.write(B, &pattern(1, 2), 2).expect("write");
    s.snapshot("b").expect("snap");
    s.write(0, &pattern(0, 3), 3).expect("write");
    assert_eq!(
        s.delete_volume().expect("delete"),
        VolumeRemoval::Retained { snapshots: 2 }
    );
    assert!(matches!(s.read(0, B), Err(StoreError::VolumeDeleted)));
    assert!(matches!(
        s.write(0, &pattern(0, 4), 4),
        Err(StoreError::VolumeDeleted)
    ));
    assert_eq!(
        s.read_snapshot("b", 0, 2 * B).expect("read"),
        [pattern(0, 1), pattern(1, 2)].concat()
    );
    drop(s);
    let dir = t.path().join("vol");
    let s = LayeredStore::open(&dir).expect("open");
    assert_eq!(
        s.delete_volume().expect("again"),
        VolumeRemoval::Retained { snapshots: 2 }
    );
    s.delete_snapshot("a").expect("delete a");
    assert_eq!(
        s.read_snapshot("b", 0, 2 * B).expect("read"),
        [pattern(0, 1), pattern(1, 2)].concat()
    );
    s.delete_snapshot("b").expect("delete b");
    assert!(!dir.exists(), "last user gone, space freed");
    assert_eq!(s.delete_volume().expect("after"), VolumeRemoval::Removed);
}

#[test]
fn deleting_a_volume_without_snapshots_removes_it() {
    let (t, s) = new_store(4);
    s.write(0, &pattern(0, 1), 1).expect("write");
    assert_eq!(s.delete_volume().expect("delete"), VolumeRemoval::Removed);
    assert!(!t.path().join("vol").exists());
}

#[test]
fn delete_snapshot_merges_while_io_continues() {
    const N: u64 = 512;
    let (_t, s) = new_store(N);
    let v1: Vec<u8> = (0..N).flat_map(|b| pattern(b, 1)).collect();
    s.write(0, &v1, 1).expect("write");
    s.trim(11 * B, B, 2).expect("trim");
    s.snapshot("s1").expect("snap");
    for b in (0..N).step_by(2) {
        s.write(b * B, &pattern(b, 2), 3).expect("write");
    }
    s.snapshot("s2").expect("snap");
    for b in (0..N).step_by(4) {
        s.write(b * B, &pattern(b, 3), 4).expect("write");
    }
    let in_s2 = |b: u64| -> Vec<u8> {
        if b & 1 == 0 {
            pattern(b, 2)
        } else if b == 11 {
            vec![0; BS]
        } else {
            pattern(b, 1)
        }
    };
    let in_head = |b: u64| if b & 3 == 0 { pattern(b, 3) } else { in_s2(b) };
    let changed_before = s.changed_ranges("s1", None).expect("changed");
    let stop = AtomicBool::new(false);
    let s2_going = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    let writes = AtomicU64::new(0);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            // Readers of both views see the same bytes throughout the merges.
            while !stop.load(Ordering::SeqCst) {
                for b in (0..N / 2).step_by(7) {
                    match s.read_snapshot("s2", b * B, B) {
                        Ok(got) => assert_eq!(got, in_s2(b)),
                        Err(StoreError::SnapshotNotFound(_)) if s2_going.load(Ordering::SeqCst) => {
                        }
                        Err(e) => panic!("read s2: {e}"),
                    }
                    assert_eq!(s.read(b * B, B).expect("read head"), in_head(b));
                }
                reads.fetch_add(1, Ordering::SeqCst);
            }
        });
        let writer = scope.spawn(|| {
            // A writer keeps changing the upper half of the head.
            let mut v = 100;
            while !stop.load(Ordering::SeqCst) {
                for b in N / 2..N {
                    s.write(b * B, &pattern(b, v), v).expect("write");
                }
                writes.fetch_add(1, Ordering::SeqCst);
                v += 1;
            }
        });
        let running = || !reader.is_finished() && !writer.is_finished();
        // Wait until both threads are going, without sleeping blindly.
        while running() && (reads.load(Ordering::SeqCst) == 0 || writes.load(Ordering::SeqCst) == 0)
        {
            std::thread::yield_now();
        }
        s.delete_snapshot("s1").expect("delete s1");
        let r = reads.load(Ordering::SeqCst);
        while running() && reads.load(Ordering::SeqCst) < r + 2 {
            std::thread::yield_now();
        }
        s2_going.store(true, Ordering::SeqCst);
        s.delete_snapshot("s2").expect("delete s2");
        let r = reads.load(Ordering::SeqCst);
        while running() && reads.load(Ordering::SeqCst) < r + 2 {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::SeqCst);
    });
    assert!(s.snapshots().is_empty());
    assert_eq!(s.space_used().expect("space").layers.len(), 1);
    for b in 0..N / 2 {
        assert_eq!(s.read(b * B, B).expect("read"), in_head(b), "block {b}");
    }
    // The upper half holds one complete version per block from the writer.
    for b in N / 2..N {
        let got = s.read(b * B, B).expect("read");
        let mut ver = [0u8; 8];
        ver.copy_from_slice(&got[8..16]);
        assert_eq!(got, pattern(b, u64::from_le_bytes(ver)));
    }
    assert!(!changed_before.is_empty());
    assert!(s.verify().expect("verify").is_empty());
    // The trim merged down from s1 still reads as zeros and keeps its seq.
    assert!(s.read(11 * B, B).expect("read").iter().all(|&x| x == 0));
    assert_eq!(s.block_seq(11).expect("seq"), Some(2));
}

#[test]
fn deleting_a_middle_snapshot_keeps_other_views_and_deltas() {
    let (_t, s) = new_store(8);
    s.write(0, &pattern(0, 1), 1).expect("write");
    s.snapshot("a").expect("snap");
    s.write(B, &pattern(1, 2), 2).expect("write");
    s.trim(0, B, 3).expect("trim");
    s.snapshot("b").expect("snap");
    s.write(2 * B, &pattern(2, 4), 4).expect("write");
    s.snapshot("c").expect("snap");
    s.delete_snapshot("b").expect("delete b");
    assert_eq!(s.read_snapshot("a", 0, B).expect("read"), pattern(0, 1));
    assert_eq!(
        s.read_snapshot("c", 0, 3 * B).expect("read"),
        [vec![0u8; BS], pattern(1, 2), pattern(2, 4)].concat()
    );
    assert_eq!(
        s.changed_ranges("a", Some("c")).expect("changed"),
        vec![0..3 * B]
    );
    assert!(matches!(
        s.changed_ranges("c", Some("a")),
        Err(StoreError::SnapshotOrder { .. })
    ));
    assert!(matches!(
        s.delete_snapshot("b"),
        Err(StoreError::SnapshotNotFound(_))
    ));
}

#[test]
fn interrupted_deletion_resumes_at_open_and_orphans_go() {
    let (t, s) = new_store(4);
    s.write(0, &pattern(0, 1), 1).expect("write");
    s.snapshot("a").expect("snap");
    s.write(B, &pattern(1, 2), 2).expect("write");
    s.flush().expect("flush");
    drop(s);
    let dir = t.path().join("vol");
    // Crash after marking the deletion, before any merge.
    let raw = std::fs::read(dir.join("MANIFEST")).expect("manifest");
    let mut m = format::decode_manifest(&raw).expect("decode");
    m.layers[1].deleting = true;
    std::fs::write(
        dir.join("MANIFEST"),
        format::encode_manifest(&m).expect("encode"),
    )
    .expect("write manifest");
    // And a layer from a snapshot that never reached the manifest.
    std::fs::create_dir(dir.join("layers/77")).expect("orphan");
    let s = LayeredStore::open(&dir).expect("open");
    assert!(s.snapshots().is_empty());
    assert!(!dir.join("layers/1").exists());
    assert!(!dir.join("layers/77").exists());
    assert_eq!(
        s.read(0, 2 * B).expect("read"),
        [pattern(0, 1), pattern(1, 2)].concat()
    );
}

#[test]
fn damaged_manifest_is_refused() {
    let (t, s) = new_store(4);
    drop(s);
    let dir = t.path().join("vol");
    assert!(matches!(
        LayeredStore::create(&dir, 4 * B),
        Err(StoreError::AlreadyExists(_))
    ));
    poke(&dir.join("MANIFEST"), 30, b"X");
    assert!(matches!(
        LayeredStore::open(&dir),
        Err(StoreError::BadManifest { .. })
    ));
    assert!(matches!(
        LayeredStore::open(&t.path().join("none")),
        Err(StoreError::BadManifest { .. })
    ));
}

#[test]
fn concurrent_writes_and_reads_never_mix() {
    let (_t, s) = new_store(64);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let s = &s;
                scope.spawn(move || {
                    // One writer rewrites blocks 0..2 as one range; the other block 1
                    // alone and a moving block elsewhere.
                    for v in 1..300u64 {
                        let seq = v * 2 + w;
                        if w == 0 {
                            s.write(0, &[pattern(0, seq), pattern(1, seq)].concat(), seq)
                                .expect("write");
                        } else {
                            s.write(B, &pattern(1, seq), seq).expect("write");
                            let b = 2 + v % 60;
                            s.write(b * B, &pattern(b, seq), seq).expect("write");
                        }
                    }
                })
            })
            .collect();
        let reader = scope.spawn(|| {
            let mut rounds = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let got = s.read(0, 2 * B).expect("read");
                for (i, chunk) in got.chunks(BS).enumerate() {
                    if chunk.iter().all(|&x| x == 0) {
                        continue;
                    }
                    let mut ver = [0u8; 8];
                    ver.copy_from_slice(&chunk[8..16]);
                    assert_eq!(chunk, pattern(i as u64, u64::from_le_bytes(ver)).as_slice());
                }
                rounds += 1;
            }
            rounds
        });
        for w in writers {
            w.join().expect("writer");
        }
        stop.store(true, Ordering::SeqCst);
        assert!(reader.join().expect("reader") > 0);
    });
    assert_eq!(s.block_seq(0).expect("seq"), Some(598));
    assert!(s.verify().expect("verify").is_empty());
}

#[test]
fn handle_serves_the_data_plane() {
    let (_t, s) = new_store(4);
    let h = StoreHandle::new(Arc::new(s));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        h.write(B, pattern(1, 1), 1).await.expect("write");
        h.flush().await.expect("flush");
        assert_eq!(h.read(B, B as u32).await.expect("read"), pattern(1, 1));
        h.trim(B, B, 2).await.expect("trim");
        assert_eq!(h.read(B, B as u32).await.expect("read"), vec![0u8; BS]);
        assert!(matches!(
            h.read(4 * B, B as u32).await,
            Err(BlockIoError::OutOfRange { .. })
        ));
        assert_eq!(h.size(), 4 * B);
    });
}

// ---- model-based test ----

#[derive(Debug, Clone)]
enum Op {
    Write { block: u64, len: u64 },
    WriteIfNewer { block: u64, len: u64, back: u64 },
    Trim { block: u64, len: u64 },
    TrimIfNewer { block: u64, len: u64, back: u64 },
    Snapshot,
    DeleteSnapshot(usize),
    Expand(u64),
    Flush,
    Reopen,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u64..40, 1u64..4).prop_map(|(block, len)| Op::Write { block, len }),
        2 => (0u64..40, 1u64..4, 0u64..40)
            .prop_map(|(block, len, back)| Op::WriteIfNewer { block, len, back }),
        2 => (0u64..40, 1u64..6).prop_map(|(block, len)| Op::Trim { block, len }),
        2 => (0u64..40, 1u64..6, 0u64..40)
            .prop_map(|(block, len, back)| Op::TrimIfNewer { block, len, back }),
        2 => Just(Op::Snapshot),
        1 => (0usize..8).prop_map(Op::DeleteSnapshot),
        1 => (1u64..8).prop_map(Op::Expand),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

/// A block's version in the model: `None` unwritten; `(seq, true)` data written at
/// seq (content `pattern(block, seq)`); `(seq, false)` trimmed at seq.
type Version = Option<(u64, bool)>;

#[derive(Debug)]
struct ModelSnap {
    id: String,
    blocks: Vec<Version>,
    /// Epoch (number of snapshots taken before it).
    epoch: u64,
}

fn expected(blocks: &[Version]) -> Vec<u8> {
    blocks
        .iter()
        .enumerate()
        .flat_map(|(b, v)| match v {
            Some((seq, true)) => pattern(b as u64, *seq),
            _ => vec![0u8; BS],
        })
        .collect()
}

fn to_ranges(set: &[bool]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (b, _) in set.iter().enumerate().filter(|(_, &x)| x) {
        let start = b as u64 * B;
        match out.last_mut() {
            Some(r) if r.end == start => r.end += B,
            _ => out.push(start..start + B),
        }
    }
    out
}

fn check_against_model(
    s: &LayeredStore,
    head: &[Version],
    snaps: &[ModelSnap],
    changes: &BTreeMap<u64, Vec<u64>>,
    epoch: u64,
) {
    assert_eq!(s.size(), head.len() as u64 * B);
    assert_eq!(
        s.read(0, head.len() as u64 * B).expect("read head"),
        expected(head)
    );
    let alloc: Vec<bool> = head.iter().map(|v| matches!(v, Some((_, true)))).collect();
    assert_eq!(s.allocated_ranges(None).expect("alloc"), to_ranges(&alloc));
    for (b, v) in head.iter().enumerate() {
        assert_eq!(s.block_seq(b as u64).expect("seq"), v.map(|(q, _)| q));
    }
    let listed: Vec<String> = s.snapshots().into_iter().map(|i| i.id).collect();
    let model_ids: Vec<String> = snaps.iter().map(|m| m.id.clone()).collect();
    assert_eq!(listed, model_ids);
    let changed_between = |from: u64, to: u64, n: usize| -> Vec<Range<u64>> {
        let mut set = vec![false; n];
        for (_, blocks) in changes.range(from + 1..=to) {
            for &b in blocks {
                if (b as usize) < n {
                    set[b as usize] = true;
                }
            }
        }
        to_ranges(&set)
    };
    for (i, m) in snaps.iter().enumerate() {
        let n = m.blocks.len();
        assert_eq!(
            s.read_snapshot(&m.id, 0, n as u64 * B).expect("read snap"),
            expected(&m.blocks),
            "snapshot {}",
            m.id
        );
        let alloc: Vec<bool> = m
            .blocks
            .iter()
            .map(|v| matches!(v, Some((_, true))))
            .collect();
        assert_eq!(
            s.allocated_ranges(Some(&m.id)).expect("alloc"),
            to_ranges(&alloc)
        );
        assert_eq!(
            s.changed_ranges(&m.id, None).expect("changed to head"),
            changed_between(m.epoch, epoch, head.len())
        );
        if let Some(next) = snaps.get(i + 1) {
            assert_eq!(
                s.changed_ranges(&m.id, Some(&next.id)).expect("changed"),
                changed_between(m.epoch, next.epoch, next.blocks.len())
            );
        }
    }
}

fn run_model(ops: Vec<Op>) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("vol");
    let mut s = LayeredStore::create(&dir, 16 * B).expect("create");
    let mut head: Vec<Version> = vec![None; 16];
    let mut snaps: Vec<ModelSnap> = Vec::new();
    // Mutated blocks per epoch; epoch e's changes live in the layer sealed by the
    // snapshot taken at epoch e (or the head).
    let mut changes: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut epoch = 0u64;
    let mut seq = 1000u64;
    let mut next_snap = 0;
    for op in ops {
        seq += 10;
        let n = head.len() as u64;
        match op {
            Op::Write { block, len } | Op::WriteIfNewer { block, len, .. } if block + len > n => {}
            Op::Trim { block, len } | Op::TrimIfNewer { block, len, .. } if block + len > n => {}
            Op::Write { block, len } => {
                let data: Vec<u8> = (block..block + len).flat_map(|b| pattern(b, seq)).collect();
                s.write(block * B, &data, seq).expect("write");
                for b in block..block + len {
                    head[b as usize] = Some((seq, true));
                    changes.entry(epoch).or_default().push(b);
                }
            }
            Op::WriteIfNewer { block, len, back } => {
                let q = seq - back * 5;
                let data: Vec<u8> = (block..block + len).flat_map(|b| pattern(b, q)).collect();
                let got = s.write_if_newer(block * B, &data, q).expect("wif");
                for (k, b) in (block..block + len).enumerate() {
                    let apply = head[b as usize].is_none_or(|(cur, _)| cur < q);
                    let want = if apply {
                        WriteOutcome::Applied
                    } else {
                        WriteOutcome::Skipped
                    };
                    assert_eq!(got[k], want, "block {b} seq {q}");
                    if apply {
                        head[b as usize] = Some((q, true));
                        changes.entry(epoch).or_default().push(b);
                    }
                }
            }
            Op::Trim { block, len } => {
                s.trim(block * B, len * B, seq).expect("trim");
                for b in block..block + len {
                    head[b as usize] = Some((seq, false));
                    changes.entry(epoch).or_default().push(b);
                }
            }
            Op::TrimIfNewer { block, len, back } => {
                let q = seq - back * 5;
                let got = s.trim_if_newer(block * B, len * B, q).expect("tif");
                for (k, b) in (block..block + len).enumerate() {
                    let apply = head[b as usize].is_none_or(|(cur, _)| cur < q);
                    let want = if apply {
                        WriteOutcome::Applied
                    } else {
                        WriteOutcome::Skipped
                    };
                    assert_eq!(got[k], want, "block {b} seq {q}");
                    if apply {
                        head[b as usize] = Some((q, false));
                        changes.entry(epoch).or_default().push(b);
                    }
                }
            }
            Op::Snapshot => {
                let id = format!("snap-{next_snap}");
                next_snap += 1;
                s.snapshot(&id).expect("snapshot");
                snaps.push(ModelSnap {
                    id,
                    blocks: head.clone(),
                    epoch,
                });
                epoch += 1;
            }
            Op::DeleteSnapshot(i) => {
                if !snaps.is_empty() {
                    let m = snaps.remove(i % snaps.len());
                    s.delete_snapshot(&m.id).expect("delete snapshot");
                }
            }
            Op::Expand(more) => {
                s.expand((n + more) * B).expect("expand");
                head.resize((n + more) as usize, None);
            }
            Op::Flush => s.flush().expect("flush"),
            Op::Reopen => {
                s.flush().expect("flush");
                drop(s);
                s = LayeredStore::open(&dir).expect("reopen");
            }
        }
        check_against_model(&s, &head, &snaps, &changes, epoch);
    }
    assert!(s.verify().expect("verify").is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op_strategy(), 1..40)) {
        run_model(ops);
    }
}

// ---- Layer sharing (`create_sharing`) ----

/// The whole view of `s` (head or snapshot) as bytes.
fn view(s: &LayeredStore, snapshot: Option<&str>, blocks: u64) -> Vec<u8> {
    match snapshot {
        Some(id) => s.read_snapshot(id, 0, blocks * B).expect("read snapshot"),
        None => s.read(0, blocks * B).expect("read head"),
    }
}

/// Seqs of the current version of every block of the head.
fn seqs(s: &LayeredStore, blocks: u64) -> Vec<Option<u64>> {
    (0..blocks)
        .map(|b| s.block_seq(b).expect("block seq"))
        .collect()
}

/// A 16-block source with three snapshots over data, trims and never-written blocks:
/// `a` (blocks 0..8 v1, 2 trimmed), `b` (4..12 v2, 5 trimmed), `c` (0..16 odd v3),
/// then a head with more writes.
fn shared_source(t: &tempfile::TempDir) -> LayeredStore {
    let s = LayeredStore::create(&t.path().join("src"), 16 * B).expect("create source");
    s.write(
        0,
        &(0..8).flat_map(|b| pattern(b, 1)).collect::<Vec<_>>(),
        1,
    )
    .expect("write");
    s.trim(2 * B, B, 2).expect("trim");
    s.snapshot("a").expect("snapshot a");
    s.write(
        4 * B,
        &(4..12).flat_map(|b| pattern(b, 2)).collect::<Vec<_>>(),
        1 << 40,
    )
    .expect("write");
    s.trim(5 * B, B, (1 << 40) + 1).expect("trim");
    s.snapshot("b").expect("snapshot b");
    for b in (1..16).step_by(2) {
        s.write(b * B, &pattern(b, 3), 2 << 40).expect("write");
    }
    s.snapshot("c").expect("snapshot c");
    s.write(0, &pattern(0, 4), 3 << 40).expect("write");
    s.trim(4 * B, B, (3 << 40) + 1).expect("trim");
    s.flush().expect("flush");
    s
}

/// The bytes of every file of a layer directory, to prove it was not written.
fn layer_bytes(dir: &Path) -> Vec<Vec<u8>> {
    ["data", "meta"]
        .iter()
        .map(|n| std::fs::read(dir.join(n)).expect("read layer file"))
        .collect()
}

#[test]
fn a_sharer_reads_exactly_the_snapshot_view() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = shared_source(&t);
    let snap_b = view(&src, Some("b"), 16);
    let head_before = view(&src, None, 16);
    // "b" is not the source's newest snapshot; the sharer is larger than it.
    let s = LayeredStore::create_sharing(&t.path().join("sh"), &src, "b", 24 * B).expect("share b");
    assert_eq!(s.size(), 24 * B);
    assert_eq!(view(&s, None, 16), snap_b);
    assert_eq!(s.read(16 * B, 8 * B).expect("past"), vec![0u8; 8 * BS]);
    assert_eq!(s.read(5 * B, B).expect("trimmed"), vec![0u8; BS]);
    assert_eq!(s.read(2 * B, B).expect("trimmed"), vec![0u8; BS]);
    assert_eq!(s.read(13 * B, B).expect("unwritten"), vec![0u8; BS]);
    assert_eq!(
        s.allocated_ranges(None).expect("alloc"),
        src.allocated_ranges(Some("b")).expect("alloc")
    );
    // Seqs are the source's: a resync compares against them.
    assert_eq!(s.block_seq(4).expect("seq"), Some(1 << 40));
    assert_eq!(s.block_seq(5).expect("seq"), Some((1 << 40) + 1));
    assert_eq!(s.block_seq(0).expect("seq"), Some(1));
    assert_eq!(s.block_seq(2).expect("seq"), Some(2));
    assert_eq!(s.block_seq(13).expect("seq"), None);
    // Shared layers are no snapshots of the sharer.
    assert!(s.snapshots().is_empty());
    assert!(matches!(
        s.read_snapshot("b", 0, B),
        Err(StoreError::SnapshotNotFound(_))
    ));
    // Same ids and files as the source's layers; the head is new.
    let src_usage = src.space_used().expect("space");
    let usage = s.space_used().expect("space");
    assert_eq!(usage.layers.len(), 3);
    for (mine, theirs) in usage.layers[..2].iter().zip(&src_usage.layers[..2]) {
        assert!(mine.shared && !theirs.shared);
        assert_eq!(
            (mine.layer, mine.file_id, mine.blocks),
            (theirs.layer, theirs.file_id, theirs.blocks)
        );
    }
    let head = &usage.layers[2];
    assert!(!head.shared && head.snapshot_id.is_none() && head.blocks == 0);
    assert!(src_usage.layers.iter().all(|l| l.layer < head.layer));
    assert!(src_usage.layers.iter().all(|l| l.file_id != head.file_id));
    assert!(s.verify().expect("verify").is_empty());
    // The source did not change.
    assert_eq!(view(&src, None, 16), head_before);
    assert_eq!(view(&src, Some("b"), 16), snap_b);

    // The oldest snapshot, at exactly its size, is shared the same way.
    let a = LayeredStore::create_sharing(&t.path().join("sa"), &src, "a", 16 * B).expect("share a");
    assert_eq!(view(&a, None, 16), view(&src, Some("a"), 16));
    assert_eq!(a.space_used().expect("space").layers.len(), 2);
}

#[test]
fn sharer_and_source_write_independently() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = shared_source(&t);
    let s = LayeredStore::create_sharing(&t.path().join("sh"), &src, "b", 20 * B).expect("share");
    let snap_b = view(&src, Some("b"), 16);
    let src_head = view(&src, None, 16);
    let shared_dirs: Vec<PathBuf> = (1..=2)
        .map(|l| s.dir().join("layers").join(l.to_string()))
        .collect();
    let shared_before: Vec<_> = shared_dirs.iter().map(|d| layer_bytes(d)).collect();

    // Writes, trims and resync writes of the sharer go to its own head only.
    s.write(4 * B, &pattern(4, 9), 5 << 40).expect("write");
    s.trim(6 * B, B, (5 << 40) + 1).expect("trim");
    s.write(16 * B, &pattern(16, 9), 5 << 40)
        .expect("write past the snapshot's size");
    assert_eq!(
        s.write_if_newer(7 * B, &[pattern(7, 8), pattern(8, 8)].concat(), 3)
            .expect("resync"),
        vec![WriteOutcome::Skipped, WriteOutcome::Skipped],
        "the shared versions are newer"
    );
    assert_eq!(
        s.write_if_newer(13 * B, &pattern(13, 8), 3)
            .expect("resync"),
        vec![WriteOutcome::Applied]
    );
    s.flush().expect("flush");
    assert_eq!(s.read(4 * B, B).expect("read"), pattern(4, 9));
    assert_eq!(s.read(6 * B, B).expect("read"), vec![0u8; BS]);
    assert_eq!(s.read(13 * B, B).expect("read"), pattern(13, 8));
    assert_eq!(s.read(16 * B, B).expect("read"), pattern(16, 9));
    assert_eq!(view(&src, Some("b"), 16), snap_b);
    assert_eq!(view(&src, None, 16), src_head);
    let shared_after: Vec<_> = shared_dirs.iter().map(|d| layer_bytes(d)).collect();
    assert!(shared_before == shared_after, "a shared layer was written");

    // And the source's writes never reach the sharer.
    let mine = view(&s, None, 16);
    src.write(8 * B, &pattern(8, 7), 6 << 40).expect("write");
    src.trim(9 * B, B, (6 << 40) + 1).expect("trim");
    src.flush().expect("flush");
    assert_eq!(view(&s, None, 16), mine);
}

#[test]
fn source_merges_and_deletion_leave_the_sharer_intact() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = shared_source(&t);
    let sharer_dir = t.path().join("sh");
    let s = LayeredStore::create_sharing(&sharer_dir, &src, "b", 20 * B).expect("share");
    s.write(15 * B, &pattern(15, 9), 9 << 40)
        .expect("own write");
    s.flush().expect("flush");
    let expected = view(&s, None, 20);
    let expected_seqs = seqs(&s, 20);

    // Deleting the older snapshot merges its layer into "b"'s, a shared layer.
    src.delete_snapshot("a").expect("delete a");
    assert_eq!(view(&s, None, 20), expected);
    // Deleting "b" merges it into "c" and unlinks it in the source only.
    src.delete_snapshot("b").expect("delete b");
    assert_eq!(view(&s, None, 20), expected);
    // The source goes entirely.
    assert_eq!(
        src.delete_volume().expect("delete volume"),
        VolumeRemoval::Retained { snapshots: 1 }
    );
    src.delete_snapshot("c").expect("delete c");
    assert!(!t.path().join("src").exists(), "source directory removed");
    assert_eq!(view(&s, None, 20), expected);
    assert_eq!(seqs(&s, 20), expected_seqs);
    assert!(s.verify().expect("verify").is_empty());

    // Reopened, the sharer loads the merged-into shared layer from disk: same view.
    drop(s);
    let s = LayeredStore::open(&sharer_dir).expect("reopen sharer");
    assert_eq!(view(&s, None, 20), expected);
    assert_eq!(seqs(&s, 20), expected_seqs);
    assert!(s.verify().expect("verify").is_empty());
    let usage = s.space_used().expect("space");
    assert_eq!(
        usage.layers.iter().map(|l| l.shared).collect::<Vec<_>>(),
        vec![true, true, false]
    );
    // "a"'s blocks 0..4 were merged into the shared layer of "b" (4..12 before).
    assert_eq!(usage.layers[1].blocks, 12);
}

#[test]
fn a_sharers_own_snapshots_never_touch_shared_layers() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = shared_source(&t);
    let dir = t.path().join("sh");
    let s = LayeredStore::create_sharing(&dir, &src, "b", 16 * B).expect("share");
    let shared_dirs: Vec<PathBuf> = (1..=2)
        .map(|l| dir.join("layers").join(l.to_string()))
        .collect();
    let shared_before: Vec<_> = shared_dirs.iter().map(|d| layer_bytes(d)).collect();

    s.write(0, &pattern(0, 5), 5 << 40).expect("write");
    let x_view = view(&s, None, 16);
    s.snapshot("x").expect("own snapshot x");
    // An own snapshot may reuse the id of a shared layer: it is another volume's.
    s.write(4 * B, &pattern(4, 6), 6 << 40).expect("write");
    let b_layer = s.snapshot("b").expect("own snapshot b");
    assert!(b_layer > 3, "a new layer, not the shared one");
    assert_eq!(s.snapshot("b").expect("retry"), b_layer);
    let b_view = view(&s, None, 16);
    s.write(8 * B, &pattern(8, 7), 7 << 40).expect("write");
    let head = view(&s, None, 16);
    assert_eq!(
        s.snapshots()
            .iter()
            .map(|i| i.id.as_str())
            .collect::<Vec<_>>(),
        vec!["x", "b"]
    );
    assert_eq!(view(&s, Some("x"), 16), x_view);
    assert_eq!(
        s.changed_ranges("x", Some("b")).expect("changed"),
        vec![4 * B..5 * B]
    );

    // Deleting the oldest own snapshot merges it into its newer child, never into
    // the shared parent.
    s.delete_snapshot("x").expect("delete x");
    assert_eq!(view(&s, Some("b"), 16), b_view);
    assert_eq!(view(&s, None, 16), head);
    s.flush().expect("flush");
    drop(s);
    let s = LayeredStore::open(&dir).expect("reopen");
    assert_eq!(view(&s, Some("b"), 16), b_view);
    assert_eq!(view(&s, None, 16), head);
    let shared_after: Vec<_> = shared_dirs.iter().map(|d| layer_bytes(d)).collect();
    assert!(shared_before == shared_after, "a shared layer was written");

    // Deleted with an own snapshot left, the volume keeps it (shared layers are
    // not counted); its deletion removes the directory, i.e. only the links.
    assert_eq!(
        s.delete_volume().expect("delete volume"),
        VolumeRemoval::Retained { snapshots: 1 }
    );
    assert_eq!(view(&s, Some("b"), 16), b_view);
    drop(s);
    let s = LayeredStore::open(&dir).expect("reopen deleted");
    assert_eq!(view(&s, Some("b"), 16), b_view);
    s.delete_snapshot("b").expect("delete b");
    assert!(!dir.exists());
    // The source lost nothing.
    assert_eq!(view(&src, Some("b"), 16), {
        let t2 = tempfile::tempdir().expect("tempdir");
        view(&shared_source(&t2), Some("b"), 16)
    });
    assert!(src.verify().expect("verify").is_empty());
}

#[test]
fn a_sharer_reopens_under_another_path_and_deletes_only_its_links() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = shared_source(&t);
    let staging = t.path().join(".creating-x");
    let s = LayeredStore::create_sharing(&staging.join("store"), &src, "c", 16 * B).expect("share");
    s.write(B, &pattern(1, 9), 9 << 40).expect("write");
    s.flush().expect("flush");
    let expected = view(&s, None, 16);
    drop(s);
    // What the catalog does: build under a staging name, rename into place.
    let dir = t.path().join("x");
    std::fs::rename(&staging, &dir).expect("rename");
    let s = LayeredStore::open(&dir.join("store")).expect("open after rename");
    assert_eq!(view(&s, None, 16), expected);
    assert_eq!(s.delete_volume().expect("delete"), VolumeRemoval::Removed);
    assert!(!dir.join("store").exists());
    assert_eq!(view(&src, Some("c"), 16), {
        let t2 = tempfile::tempdir().expect("tempdir");
        view(&shared_source(&t2), Some("c"), 16)
    });
}

#[test]
fn a_sharer_can_be_shared_again() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = shared_source(&t);
    let y = LayeredStore::create_sharing(&t.path().join("y"), &src, "b", 16 * B).expect("y");
    y.write(3 * B, &pattern(3, 8), 8 << 40).expect("write");
    y.snapshot("y1").expect("snapshot");
    let y1 = view(&y, Some("y1"), 16);
    // Sharing "y1" of y links y's shared layers too; a shared layer's id is not a
    // snapshot of y.
    assert!(matches!(
        LayeredStore::create_sharing(&t.path().join("no"), &y, "b", 16 * B),
        Err(StoreError::SnapshotNotFound(_))
    ));
    assert!(!t.path().join("no").exists());
    let z = LayeredStore::create_sharing(&t.path().join("z"), &y, "y1", 16 * B).expect("z");
    assert_eq!(view(&z, None, 16), y1);
    let ids: Vec<LayerId> = z
        .space_used()
        .expect("space")
        .layers
        .iter()
        .map(|l| l.layer)
        .collect();
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len());
    drop(z);
    let z = LayeredStore::open(&t.path().join("z")).expect("reopen z");
    assert_eq!(view(&z, None, 16), y1);
}

#[test]
fn sharing_refusals_create_nothing() {
    let t = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(Faults::default());
    let src = LayeredStore::create_with(
        &t.path().join("src"),
        4 * B,
        Arc::new(FaultyFactory(Arc::clone(&faults))),
    )
    .expect("create");
    src.write(0, &pattern(0, 1), 1).expect("write");
    src.snapshot("a").expect("snapshot");
    src.write(B, &pattern(1, 1), 2).expect("write");
    src.snapshot("b").expect("snapshot");
    // A deletion whose merge fails leaves "b" marked deleting.
    faults.fail_data.store(true, Ordering::SeqCst);
    assert!(src.delete_snapshot("b").is_err());
    faults.fail_data.store(false, Ordering::SeqCst);
    let target = t.path().join("new");
    let share = |snap: &str, size: u64| LayeredStore::create_sharing(&target, &src, snap, size);

    assert!(matches!(
        share("nope", 4 * B),
        Err(StoreError::SnapshotNotFound(_))
    ));
    assert!(matches!(
        share("b", 4 * B),
        Err(StoreError::SnapshotDeleting(id)) if id == "b"
    ));
    assert!(matches!(
        share("a", 3 * B),
        Err(StoreError::InvalidSize { current, .. }) if current == 4 * B
    ));
    for size in [0, 4 * B + 1] {
        assert!(matches!(
            share("a", size),
            Err(StoreError::InvalidSize { .. })
        ));
    }
    {
        let _busy = src.control();
        assert!(matches!(share("a", 4 * B), Err(StoreError::SourceBusy)));
    }
    assert!(!target.exists(), "a refusal created something");

    // Once refusals are done, "a" shares; an existing volume is never overwritten.
    let s = share("a", 4 * B).expect("share a");
    assert_eq!(s.read(0, B).expect("read"), pattern(0, 1));
    assert!(matches!(
        share("a", 4 * B),
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(s.read(0, B).expect("still there"), pattern(0, 1));
}

#[test]
fn an_old_manifest_without_shared_still_opens() {
    let (t, s) = new_store(4);
    s.write(0, &pattern(0, 1), 1).expect("write");
    s.snapshot("a").expect("snapshot");
    s.write(B, &pattern(1, 2), 2).expect("write");
    s.flush().expect("flush");
    drop(s);
    let dir = t.path().join("vol");
    let old = br#"{"size_bytes":16384,"next_layer_id":3,"volume_deleted":false,"layers":[{"id":2,"snapshot_id":null,"size_bytes":16384,"deleting":false},{"id":1,"snapshot_id":"a","size_bytes":16384,"deleting":false}]}"#;
    std::fs::write(
        dir.join("MANIFEST"),
        format::frame_manifest(old).expect("frame"),
    )
    .expect("write old manifest");
    let s = LayeredStore::open(&dir).expect("open old manifest");
    assert_eq!(
        s.read(0, 2 * B).expect("read"),
        [pattern(0, 1), pattern(1, 2)].concat()
    );
    assert_eq!(s.snapshots().len(), 1);
    assert!(s
        .space_used()
        .expect("space")
        .layers
        .iter()
        .all(|l| !l.shared));
}

#[test]
fn manifests_keep_shared_layers_sealed_and_at_the_base() {
    let layer = |id: u64, snap: Option<&str>, shared: bool| ManifestLayer {
        id,
        snapshot_id: snap.map(str::to_string),
        size_bytes: 4 * B,
        deleting: false,
        shared,
    };
    let manifest = |layers: Vec<ManifestLayer>, deleted: bool| ManifestV1 {
        size_bytes: 4 * B,
        next_layer_id: 10,
        volume_deleted: deleted,
        layers,
    };
    let good = manifest(
        vec![
            layer(5, None, false),
            layer(4, Some("own"), false),
            layer(2, Some("s2"), true),
            layer(1, Some("s1"), true),
        ],
        false,
    );
    assert_eq!(validate_manifest(&good), Ok(()));
    // Own and shared snapshot ids are separate namespaces.
    let mut reused = good.clone();
    reused.layers[1].snapshot_id = Some("s2".into());
    assert_eq!(validate_manifest(&reused), Ok(()));

    let mut shared_head = good.clone();
    shared_head.layers[0].shared = true;
    let mut deleting = good.clone();
    deleting.layers[2].deleting = true;
    let mut not_base = good.clone();
    not_base.layers[3].shared = false;
    let mut dup = good.clone();
    dup.layers[3].snapshot_id = Some("s2".into());
    let only_shared = manifest(vec![layer(2, Some("s2"), true)], true);
    for (what, m) in [
        ("shared head", shared_head),
        ("shared deleting", deleting),
        ("own below shared", not_base),
        ("duplicate shared id", dup),
        ("deleted with only shared", only_shared),
    ] {
        assert!(validate_manifest(&m).is_err(), "{what} accepted");
    }
}

// ---- Conditional trims (`trim_if_newer`) and the handle's conditional ops ----

/// Per block, a conditional trim applies only where the held version's seq is lower
/// (an equal one stays, damage and never-written count as 0), also against a sealed
/// layer's version; what it trims reads as zeros, keeps its seq against later copies,
/// frees its space and survives a reopen.
#[test]
fn trim_if_newer_trims_only_where_the_held_seq_is_lower() {
    use WriteOutcome::{Applied, Skipped};
    let (_t, s) = new_store(9);
    // Block 7 at seq 1 and block 8 at seq 40 in a sealed layer, the rest in the head.
    s.write(7 * B, &pattern(7, 1), 1).expect("write");
    s.write(8 * B, &pattern(8, 40), 40).expect("write");
    s.snapshot("s").expect("snapshot");
    s.write(0, &pattern(0, 25), 25).expect("write"); // newer
    s.write(B, &pattern(1, 20), 20).expect("write"); // equal
    s.write(2 * B, &pattern(2, 3), 3).expect("write"); // older
    s.trim(4 * B, B, 2).expect("trim"); // trimmed older
    s.trim(5 * B, B, 30).expect("trim"); // trimmed newer
    s.write(6 * B, &pattern(6, 50), 50).expect("write"); // newer, but damaged
    s.flush().expect("flush");
    let head = s.space_used().expect("space").layers[1].layer;
    poke(
        &layer_file(&s, head, "data"),
        6 * B + 9,
        &[pattern(6, 50)[9] ^ 0x40],
    );
    assert!(is_corrupt_at(s.read(6 * B, B), 6));
    let before = s.space_used().expect("space").layers[1].allocated_bytes;

    let got = s.trim_if_newer(0, 9 * B, 20).expect("trim_if_newer");
    assert_eq!(
        got,
        vec![Skipped, Skipped, Applied, Applied, Applied, Skipped, Applied, Applied, Skipped]
    );
    let zeros = vec![0u8; BS];
    let want_seqs = [
        Some(25),
        Some(20),
        Some(20),
        Some(20),
        Some(20),
        Some(30),
        Some(20),
        Some(20),
        Some(40),
    ];
    let check = |s: &LayeredStore| {
        assert_eq!(s.read(0, B).expect("read"), pattern(0, 25));
        assert_eq!(s.read(B, B).expect("read"), pattern(1, 20));
        for b in [2, 3, 4, 5, 6, 7] {
            assert_eq!(s.read(b * B, B).expect("read"), zeros, "block {b}");
        }
        assert_eq!(s.read(8 * B, B).expect("read"), pattern(8, 40));
        let seqs: Vec<_> = (0..9).map(|b| s.block_seq(b).expect("seq")).collect();
        assert_eq!(seqs, want_seqs);
        // The snapshot still has its own versions.
        assert_eq!(s.read_snapshot("s", 7 * B, B).expect("snap"), pattern(7, 1));
        assert!(
            s.verify().expect("verify").is_empty(),
            "the damage was trimmed"
        );
    };
    check(&s);
    s.flush().expect("flush");
    let after = s.space_used().expect("space").layers[1].allocated_bytes;
    assert!(
        after < before,
        "the trim freed nothing: {before} -> {after}"
    );
    // The tombstones keep their seq: an older copy cannot bring the data back, a
    // newer one can, and a second identical trim changes nothing.
    assert_eq!(
        s.write_if_newer(2 * B, &pattern(2, 19), 19).expect("wif"),
        vec![Skipped]
    );
    assert_eq!(
        s.trim_if_newer(0, 9 * B, 20).expect("again"),
        vec![Skipped; 9]
    );
    let dir = s.dir().to_path_buf();
    drop(s);
    let s = LayeredStore::open(&dir).expect("reopen");
    check(&s);
    assert_eq!(
        s.write_if_newer(3 * B, &pattern(3, 21), 21).expect("wif"),
        vec![Applied]
    );
    assert_eq!(s.read(3 * B, B).expect("read"), pattern(3, 21));
    // Range errors are the trim's.
    assert!(matches!(
        s.trim_if_newer(B, 9 * B, 99),
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        s.trim_if_newer(1, B, 99),
        Err(StoreError::Unaligned { .. })
    ));
}

/// As a trim: the tombstones are written before anything else changes, so a failed
/// tombstone write leaves the old versions, and one that landed reads as trimmed
/// whether or not the hole was punched.
#[test]
fn a_failed_conditional_trim_leaves_the_old_versions() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("vol");
    let faults = Arc::new(Faults::default());
    let s = LayeredStore::create_with(&dir, 4 * B, Arc::new(FaultyFactory(Arc::clone(&faults))))
        .expect("create");
    s.write(0, &[pattern(0, 1), pattern(1, 1)].concat(), 1)
        .expect("write");
    s.flush().expect("flush");
    faults.fail_meta.store(true, Ordering::SeqCst);
    assert!(matches!(
        s.trim_if_newer(0, 2 * B, 2),
        Err(StoreError::Io { .. })
    ));
    faults.fail_meta.store(false, Ordering::SeqCst);
    assert_eq!(
        s.read(0, 2 * B).expect("read"),
        [pattern(0, 1), pattern(1, 1)].concat()
    );
    assert_eq!(s.block_seq(0).expect("seq"), Some(1));
    drop(s);
    let s = LayeredStore::open(&dir).expect("reopen");
    assert_eq!(
        s.read(0, 2 * B).expect("read"),
        [pattern(0, 1), pattern(1, 1)].concat()
    );
    // A tombstone that landed without its hole: zeros at the trim's seq.
    drop(s);
    let meta = dir.join("layers/1/meta");
    poke(
        &meta,
        META_HEADER_SIZE + ENTRY_SIZE,
        &Entry::tombstone(1, 2).encode(),
    );
    let s = LayeredStore::open(&dir).expect("reopen");
    assert_eq!(s.read(B, B).expect("read"), vec![0u8; BS]);
    assert_eq!(s.block_seq(1).expect("seq"), Some(2));
    assert_eq!(
        s.trim_if_newer(0, 2 * B, 2).expect("trim_if_newer"),
        vec![WriteOutcome::Applied, WriteOutcome::Skipped]
    );
    assert!(s.verify().expect("verify").is_empty());
}

/// Records the priority of every data-file I/O.
#[derive(Debug, Default)]
struct PriorityLog(std::sync::Mutex<Vec<IoPriority>>);

#[derive(Debug)]
struct LoggedFile {
    inner: Arc<dyn BlockFile>,
    log: Option<Arc<PriorityLog>>,
}

impl LoggedFile {
    fn note(&self, priority: IoPriority) {
        if let Some(log) = &self.log {
            log.0.lock().expect("log").push(priority);
        }
    }
}

impl BlockFile for LoggedFile {
    fn read_at<'a>(&self, priority: IoPriority, buf: &'a mut [u8], offset: u64) -> FileIo<'a> {
        self.note(priority);
        self.inner.read_at(priority, buf, offset)
    }
    fn write_at(&self, priority: IoPriority, buf: &[u8], offset: u64) -> FileIo<'static> {
        self.note(priority);
        self.inner.write_at(priority, buf, offset)
    }
    fn sync_data(&self, priority: IoPriority) -> FileIo<'static> {
        self.inner.sync_data(priority)
    }
    fn punch_hole(&self, priority: IoPriority, offset: u64, len: u64) -> FileIo<'static> {
        self.note(priority);
        self.inner.punch_hole(priority, offset, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
}

#[derive(Debug)]
struct LoggedFactory(Arc<PriorityLog>);

impl BlockFileFactory for LoggedFactory {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn BlockFile>> {
        let is_data = path.file_name().is_some_and(|n| n == "data");
        Ok(Arc::new(LoggedFile {
            inner: StdFileFactory.open(path, create)?,
            log: is_data.then(|| Arc::clone(&self.0)),
        }))
    }
}

/// The data plane's conditional writes and trims count the blocks they applied and
/// do all their data I/O at background priority (resync yields to applications);
/// plain writes stay foreground.
#[test]
fn handle_runs_conditional_ops_at_background_priority() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let log = Arc::new(PriorityLog::default());
    let store = LayeredStore::create_with(
        &tmp.path().join("vol"),
        4 * B,
        Arc::new(LoggedFactory(Arc::clone(&log))),
    )
    .expect("create");
    let h = StoreHandle::new(Arc::new(store));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let taken = || std::mem::take(&mut *log.0.lock().expect("log"));
    rt.block_on(async {
        h.write(0, pattern(0, 10), 10).await.expect("write");
        let fg = taken();
        assert!(!fg.is_empty() && fg.iter().all(|p| *p == IoPriority::Foreground));
        let data = [pattern(0, 5), pattern(1, 5), pattern(2, 5)].concat();
        assert_eq!(h.write_if_newer(0, data, 5).await.expect("wif"), 2);
        assert_eq!(h.trim_if_newer(0, 4 * B, 7).await.expect("tif"), 3);
        assert_eq!(h.trim_if_newer(0, 4 * B, 7).await.expect("tif"), 0);
        let bg = taken();
        assert!(!bg.is_empty());
        assert!(
            bg.iter().all(|p| *p == IoPriority::Background),
            "conditional ops did foreground I/O: {bg:?}"
        );
        assert_eq!(h.read(0, B as u32).await.expect("read"), pattern(0, 10));
        assert_eq!(
            h.read(B, 3 * B as u32).await.expect("read"),
            vec![0u8; 3 * BS]
        );
        assert!(matches!(
            h.write_if_newer(4 * B, pattern(4, 1), 99).await,
            Err(BlockIoError::OutOfRange { .. })
        ));
    });
}
