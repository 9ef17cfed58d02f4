//! Crash test of the layered block store with a real process and `kill -9`.
//!
//! The test binary re-executes itself as a writer child (selected by an environment
//! variable) that applies a deterministic stream of writes and trims (every other
//! step through the conditional, resync path), flushes, snapshots
//! and snapshot deletions to a store, printing `W <step>` after each step and `F <step>` after each flush returns.
//! The parent kills it with SIGKILL at a random step, reopens the
//! store and checks every block of the head and of every snapshot: it must be a
//! version some step actually wrote to that block (bytes derived from block and seq),
//! at or above the last flushed version, or be reported corrupt — never other bytes.
//! Twenty rounds run against the same store, each child continuing where the last died.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tessera_replica::store::{LayeredStore, StoreError};
use tessera_replica_protocol::block::BLOCK_SIZE;

const BLOCKS: u64 = 64;
const ROUNDS: u64 = 20;
const ENV_DIR: &str = "TESSERA_STORE_CRASH_DIR";
const ENV_EPOCH: &str = "TESSERA_STORE_CRASH_EPOCH";
/// The child stops by itself after this many steps, so it can never outlive a
/// parent that died without killing it.
const MAX_STEPS: u64 = 200_000;
const STEP_BITS: u32 = 40;

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// One step of the writer's deterministic stream.
struct Step {
    first: u64,
    count: u64,
    trim: bool,
}

fn step_op(epoch: u64, step: u64) -> Step {
    let h = mix(mix(epoch) ^ step);
    let first = h % BLOCKS;
    let count = (1 + (h >> 8) % 4).min(BLOCKS - first);
    Step {
        first,
        count,
        // One step in ten is a trim.
        trim: (h >> 16) % 10 == 3,
    }
}

fn seq_of(epoch: u64, step: u64) -> u64 {
    (epoch << STEP_BITS) | step
}

/// Bytes a write with `seq` puts into `block`.
fn content(block: u64, seq: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOCK_SIZE as usize);
    let mut x = mix(block ^ seq.rotate_left(17));
    while out.len() < BLOCK_SIZE as usize {
        x = mix(x);
        out.extend_from_slice(&x.to_le_bytes());
    }
    out[..8].copy_from_slice(&block.to_le_bytes());
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    out
}

/// The child: runs only when re-executed by the parent.
#[test]
fn crash_writer_child() {
    let (Ok(dir), Ok(epoch)) = (std::env::var(ENV_DIR), std::env::var(ENV_EPOCH)) else {
        return;
    };
    let epoch: u64 = epoch.parse().expect("epoch from the parent is a number");
    let dir = Path::new(&dir);
    let store = if epoch == 1 {
        LayeredStore::create(dir, BLOCKS * BLOCK_SIZE).expect("create")
    } else {
        LayeredStore::open(dir).expect("open")
    };
    let mut out = std::io::stdout().lock();
    for step in 1..=MAX_STEPS {
        let op = step_op(epoch, step);
        let seq = seq_of(epoch, step);
        // Every other step goes through the conditional (resync) path; seqs only
        // grow, so it applies every block, and a crash inside it must leave what a
        // crash inside the plain one leaves.
        let conditional = step % 2 == 0;
        if op.trim {
            let (offset, len) = (op.first * BLOCK_SIZE, op.count * BLOCK_SIZE);
            if conditional {
                store
                    .trim_if_newer(offset, len, seq)
                    .expect("trim_if_newer");
            } else {
                store.trim(offset, len, seq).expect("trim");
            }
        } else {
            let data: Vec<u8> = (op.first..op.first + op.count)
                .flat_map(|b| content(b, seq))
                .collect();
            if conditional {
                store
                    .write_if_newer(op.first * BLOCK_SIZE, &data, seq)
                    .expect("write_if_newer");
            } else {
                store
                    .write(op.first * BLOCK_SIZE, &data, seq)
                    .expect("write");
            }
        }
        writeln!(out, "W {step}").expect("stdout");
        out.flush().expect("stdout");
        if step % 8 == 0 {
            store.flush().expect("flush");
            writeln!(out, "F {step}").expect("stdout");
            out.flush().expect("stdout");
        }
        if step % 40 == 0 {
            store
                .snapshot(&format!("e{epoch}-s{step}"))
                .expect("snapshot");
        }
        if step % 40 == 20 {
            let snaps = store.snapshots();
            if snaps.len() > 2 {
                store
                    .delete_snapshot(&snaps[0].id)
                    .expect("delete snapshot");
            }
        }
    }
}

/// Kills the child on every exit path of the parent, panics included.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Checks one block's bytes against the versions the stream could have produced.
/// Returns false for a corrupt block.
fn check_block(
    view: &str,
    block: u64,
    got: Result<Vec<u8>, StoreError>,
    seq: Option<u64>,
    floor: Option<u64>,
    max_epoch: u64,
) -> bool {
    let data = match got {
        Err(StoreError::Corrupt { block: b, .. }) => {
            assert_eq!(b, block, "{view}: corrupt report names another block");
            return false;
        }
        Err(e) => panic!("{view}: block {block} read failed: {e}"),
        Ok(d) => d,
    };
    let Some(seq) = seq else {
        assert!(
            data.iter().all(|&x| x == 0),
            "{view}: block {block} has no version but is not zero"
        );
        assert!(
            floor.is_none(),
            "{view}: block {block} lost its flushed version {floor:?}"
        );
        return true;
    };
    if let Some(f) = floor {
        assert!(
            seq >= f,
            "{view}: block {block} went back to seq {seq:#x} below flushed {f:#x}"
        );
    }
    let (epoch, step) = (seq >> STEP_BITS, seq & ((1 << STEP_BITS) - 1));
    assert!(
        (1..=max_epoch).contains(&epoch) && step >= 1,
        "{view}: block {block} has impossible seq {seq:#x}"
    );
    let op = step_op(epoch, step);
    assert!(
        (op.first..op.first + op.count).contains(&block),
        "{view}: block {block} claims seq {seq:#x}, which never wrote it"
    );
    if op.trim {
        assert!(
            data.iter().all(|&x| x == 0),
            "{view}: trimmed block {block} is not zero"
        );
    } else {
        assert!(
            data == content(block, seq),
            "{view}: block {block} holds bytes that seq {seq:#x} did not write"
        );
    }
    true
}

/// Reopens the store after a kill and checks the head and every snapshot. Returns
/// the corrupt blocks seen and the head blocks holding a version newer than the last
/// flush (evidence the kill landed mid-stream).
fn check_store(dir: &Path, floor: &[Option<u64>], max_epoch: u64) -> (u64, u64) {
    let store = LayeredStore::open(dir).expect("reopen after kill -9");
    let mut corrupt = 0;
    let mut unflushed = 0;
    for b in 0..BLOCKS {
        let got = store.read(b * BLOCK_SIZE, BLOCK_SIZE);
        let seq = match &got {
            Ok(_) => store.block_seq(b).expect("seq of a readable block"),
            Err(_) => None,
        };
        if !check_block("head", b, got, seq, floor[b as usize], max_epoch) {
            corrupt += 1;
        }
        if seq > floor[b as usize] {
            unflushed += 1;
        }
    }
    for snap in store.snapshots() {
        for b in 0..snap.size_bytes / BLOCK_SIZE {
            let got = store.read_snapshot(&snap.id, b * BLOCK_SIZE, BLOCK_SIZE);
            // A snapshot's version of a block is bounded by the head's floor only
            // loosely, so here only "a real version or corrupt" is checked; the seq
            // is recovered from the bytes, which embed it.
            let seq = match &got {
                Ok(d) if d.iter().any(|&x| x != 0) => {
                    let mut s = [0u8; 8];
                    s.copy_from_slice(&d[8..16]);
                    Some(u64::from_le_bytes(s))
                }
                _ => None,
            };
            let got = match (got, seq) {
                // Zeros: a trim or never written; both are valid snapshot contents.
                (Ok(d), None) => {
                    assert!(d.iter().all(|&x| x == 0));
                    continue;
                }
                (g, _) => g,
            };
            if !check_block(&snap.id, b, got, seq, None, max_epoch) {
                corrupt += 1;
            }
        }
    }
    let scrubbed = store.verify().expect("scrub").len() as u64;
    assert!(
        scrubbed >= corrupt.min(1),
        "reads saw damage the scrub missed"
    );
    (corrupt, unflushed)
}

#[test]
fn kill_9_during_writes_never_yields_wrong_data() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("vol");
    let exe = std::env::current_exe().expect("test binary path");
    let mut floor: Vec<Option<u64>> = vec![None; BLOCKS as usize];
    let mut rng = 0x5EED_u64;
    let mut total_corrupt = 0;
    let mut total_unflushed = 0;
    for epoch in 1..=ROUNDS {
        rng = mix(rng);
        // Kill once the child reports this step: anywhere in the stream, including
        // between flushes, inside snapshots and during snapshot merges.
        let kill_at = 1 + rng % 300;
        let mut child = KillOnDrop(
            Command::new(&exe)
                .args([
                    "crash_writer_child",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(ENV_DIR, &dir)
                .env(ENV_EPOCH, epoch.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn writer child"),
        );
        let stdout = child.0.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut flushed_step = 0;
        let mut step = 0;
        while step < kill_at {
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok(line) => {
                    if let Some(n) = line.strip_prefix("F ") {
                        flushed_step = n.trim().parse().expect("flush line");
                    } else if let Some(n) = line.strip_prefix("W ") {
                        step = n.trim().parse().expect("step line");
                    }
                }
                Err(e) => panic!("writer child stopped reporting in round {epoch}: {e}"),
            }
        }
        child.0.kill().expect("kill -9");
        child.0.wait().expect("reap");
        reader.join().expect("stdout reader");
        for step in 1..=flushed_step {
            let op = step_op(epoch, step);
            for b in op.first..op.first + op.count {
                floor[b as usize] = Some(seq_of(epoch, step));
            }
        }
        let (corrupt, unflushed) = check_store(&dir, &floor, epoch);
        total_corrupt += corrupt;
        total_unflushed += unflushed;
    }
    // Torn blocks need a kill between a data and an entry write of an overwrite; they
    // are allowed, but a store that reports everything corrupt is broken.
    assert!(
        total_corrupt < ROUNDS * BLOCKS / 4,
        "{total_corrupt} corrupt blocks over {ROUNDS} rounds"
    );
    assert!(
        total_unflushed > 0,
        "no kill ever landed after unflushed writes; the test checked nothing new"
    );
    eprintln!(
        "kill -9 rounds: {ROUNDS}, corrupt blocks seen: {total_corrupt}, \
         blocks newer than their last flush: {total_unflushed}"
    );
}
