//! A random writer for fault tests: stamped 4 KiB blocks written with O_DIRECT to
//! random blocks of a device, fdatasync every few writes, recording which write of
//! each block was durable, and the read-back that sorts every block into current,
//! zeros, older or other. A block read back "older" is a lost acknowledged write.
//! While it runs, the writer also reads back a random block it wrote every few
//! writes: a read must return that block's last completed write (one writer, so
//! nothing newer can exist), so a stale replica serving a read fails it at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::direct_io::{pattern, DirectFile, ALIGN};
use crate::poll_until;

/// Longest the writer may take for one step a test waits for.
pub const WRITER_IO_TIMEOUT: Duration = Duration::from_secs(120);

/// First bytes of every block the random writer writes.
pub const STAMP_MAGIC: u64 = u64::from_le_bytes(*b"tss-g-v1");

/// Write number `write` (from 1) to block `block`: magic, block and write number
/// (u64 LE each), then pattern bytes of both, so any read names the write it saw.
pub fn stamped_block(block: u64, write: u64) -> Vec<u8> {
    let mut data = pattern(block.wrapping_mul(0x1_0000_0001) ^ (write << 24), ALIGN);
    data[..8].copy_from_slice(&STAMP_MAGIC.to_le_bytes());
    data[8..16].copy_from_slice(&block.to_le_bytes());
    data[16..24].copy_from_slice(&write.to_le_bytes());
    data
}

/// (block, write number) of a block [`stamped_block`] wrote, if it is one.
pub fn stamp_of(data: &[u8]) -> Option<(u64, u64)> {
    let word = |i: usize| u64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    (data.len() == ALIGN && word(0) == STAMP_MAGIC).then(|| (word(1), word(2)))
}

/// What the random writer did.
#[derive(Debug, Default)]
pub struct RandomWriteLog {
    /// Per block written, its last write number. Each of them completed and was
    /// followed by an fdatasync that returned, so it is durable.
    pub last_durable: BTreeMap<u64, u64>,
    /// Per block written, its first write number.
    pub first_write: BTreeMap<u64, u64>,
    /// Per block, its last write issued (completed or not): after a failure, a block
    /// may hold any write from its last durable one up to this one.
    pub last_issued: BTreeMap<u64, u64>,
    /// Why the writer stopped early (an I/O error, a stale read, its bounds), if it
    /// did; everything above is still true up to that point.
    pub failure: Option<String>,
    /// Writes done (all completed).
    pub writes: u64,
    /// Number of the last write done when the writer learnt of the kill: every later
    /// write was issued after it.
    pub seen_kill_at: u64,
    /// fdatasyncs done.
    pub syncs: u64,
    /// Reads done while writing (each checked).
    pub reads: u64,
    /// How long it ran.
    pub elapsed: Duration,
}

/// How long, and for how many writes at most, a [`RandomWriter`] may run.
#[derive(Debug, Clone, Copy)]
pub struct WriterBounds {
    /// Longest it may run; past it, it stops with an error.
    pub time: Duration,
    /// Most writes it may do; past them, it stops with an error.
    pub writes: u64,
    /// Writes it does after it was told of the kill ([`RandomWriter::kill_done`]),
    /// then it ends.
    pub after_kill: u64,
    /// An fdatasync after every this many writes.
    pub sync_every: u64,
    /// A checked read of a random written block after every this many writes (0:
    /// none).
    pub read_every: u64,
}

impl WriterBounds {
    /// Up to `time` and a million writes, `after_kill` writes after the kill, an
    /// fdatasync every 16 writes and a checked read every 8.
    pub fn for_faults(time: Duration, after_kill: u64) -> Self {
        WriterBounds {
            time,
            writes: 1_000_000,
            after_kill,
            sync_every: 16,
            read_every: 8,
        }
    }
}

/// A thread writing [`stamped_block`]s to random blocks of a device with O_DIRECT,
/// fdatasync every `sync_every` writes, until `after_kill` writes after it was told
/// of the kill (within its [`WriterBounds`]).
pub struct RandomWriter {
    bounds: WriterBounds,
    written: Arc<AtomicU64>,
    killed: Arc<AtomicBool>,
    finished: Arc<AtomicBool>,
    done: mpsc::Receiver<RandomWriteLog>,
}

impl RandomWriter {
    /// Starts writing to `device`, blocks chosen by a xorshift seeded with `seed`.
    pub fn start(device: PathBuf, seed: u64, bounds: WriterBounds) -> RandomWriter {
        Self::start_from(device, seed, bounds, 1)
    }

    /// [`RandomWriter::start`] numbering writes from `first` on (so writers run one
    /// after another on a device never reuse a write number).
    pub fn start_from(
        device: PathBuf,
        seed: u64,
        bounds: WriterBounds,
        first: u64,
    ) -> RandomWriter {
        let written = Arc::new(AtomicU64::new(0));
        let killed = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(AtomicBool::new(false));
        let (tx, done) = mpsc::channel();
        let job = Job {
            device,
            seed,
            bounds,
            first: first.max(1),
            written: Arc::clone(&written),
            killed: Arc::clone(&killed),
        };
        let f = Arc::clone(&finished);
        std::thread::spawn(move || {
            let out = job.run();
            f.store(true, Ordering::SeqCst);
            let _ = tx.send(out);
        });
        RandomWriter {
            bounds,
            written,
            killed,
            finished,
            done,
        }
    }

    /// Writes completed so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    /// Waits until `n` writes completed; panics if the writer ended or hung first.
    pub async fn wait_for(&self, n: u64) {
        let reached = poll_until(WRITER_IO_TIMEOUT, || {
            let finished = self.finished.load(Ordering::SeqCst);
            std::future::ready((self.written() >= n || finished).then_some(()))
        })
        .await;
        if reached.is_err() || self.written() < n {
            let why = match self.done.try_recv() {
                Ok(RandomWriteLog {
                    failure: Some(e), ..
                }) => e,
                Ok(log) => format!("it ended after {} writes", log.writes),
                Err(_) => format!("it hung within {WRITER_IO_TIMEOUT:?}"),
            };
            panic!(
                "the random writer did not reach {n} writes (at {}): {why}",
                self.written()
            );
        }
    }

    /// Tells the writer that the kill is done.
    pub fn kill_done(&self) {
        self.killed.store(true, Ordering::SeqCst);
    }

    /// The writer's outcome; panics if it did not end within its own bounds.
    pub async fn finish(self) -> Result<RandomWriteLog, String> {
        let log = self.finish_log().await;
        match log.failure {
            Some(e) => Err(e),
            None => Ok(log),
        }
    }

    /// What the writer did, also when it stopped early ([`RandomWriteLog::failure`]);
    /// panics if it did not end within its own bounds.
    pub async fn finish_log(self) -> RandomWriteLog {
        let wait = self.bounds.time + WRITER_IO_TIMEOUT;
        poll_until(wait, || std::future::ready(self.done.try_recv().ok()))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the random writer hung (at {} writes, waited {wait:?})",
                    self.written()
                )
            })
    }
}

/// The writer thread's work.
struct Job {
    device: PathBuf,
    seed: u64,
    bounds: WriterBounds,
    /// Number of its first write.
    first: u64,
    written: Arc<AtomicU64>,
    killed: Arc<AtomicBool>,
}

impl Job {
    fn run(&self) -> RandomWriteLog {
        let started = Instant::now();
        let mut log = RandomWriteLog::default();
        let mut kill_seen_at = None;
        if let Err(e) = self.write_until_done(&mut log, &mut kill_seen_at) {
            log.failure = Some(e);
        }
        // Never told of a kill: every write counts as before it.
        log.seen_kill_at = kill_seen_at.unwrap_or(self.first - 1 + log.writes);
        log.elapsed = started.elapsed();
        log
    }

    /// The writer's loop, filling `log` as it goes (and `kill_seen_at` with the number
    /// of the last write before it learnt of the kill); an error ends it.
    fn write_until_done(
        &self,
        log: &mut RandomWriteLog,
        kill_seen_at: &mut Option<u64>,
    ) -> Result<(), String> {
        let (device, seed, bounds, first) = (&self.device, self.seed, self.bounds, self.first);
        let (written, killed) = (&self.written, &self.killed);
        let started = Instant::now();
        let file = DirectFile::open(device, true)
            .map_err(|e| format!("opening {} for O_DIRECT: {e}", device.display()))?;
        let blocks = file.size().map_err(|e| format!("device size: {e}"))? / ALIGN as u64;
        if blocks == 0 {
            return Err("the device is empty".to_owned());
        }
        let mut rng = seed | 1;
        let mut unsynced: Vec<(u64, u64)> = Vec::with_capacity(bounds.sync_every as usize);
        // The blocks in first-write order, to pick one at random for a checked read.
        let mut touched = Vec::new();
        // `n` is the number of the last write; `done` counts this writer's writes.
        let (mut n, mut done, mut seen_kill_at) = (first - 1, 0u64, None);
        loop {
            if seen_kill_at.is_none() && killed.load(Ordering::SeqCst) {
                seen_kill_at = Some(done);
                *kill_seen_at = Some(n);
            }
            if seen_kill_at.is_some_and(|k| done >= k + bounds.after_kill) {
                return Ok(());
            }
            if done >= bounds.writes || started.elapsed() > bounds.time {
                return Err(format!(
                    "stopped after {done} writes in {:?}, {} writes after the kill not done \
                     (kill seen at {seen_kill_at:?})",
                    started.elapsed(),
                    bounds.after_kill
                ));
            }
            // xorshift64
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let block = rng % blocks;
            n += 1;
            done += 1;
            log.last_issued.insert(block, n);
            file.write_at(block * ALIGN as u64, &stamped_block(block, n))
                .map_err(|e| {
                    format!("write {n} (block {block}; kill seen at {seen_kill_at:?}) failed: {e}")
                })?;
            log.first_write.entry(block).or_insert_with(|| {
                touched.push(block);
                n
            });
            unsynced.push((block, n));
            log.writes = done;
            written.store(done, Ordering::SeqCst);
            if bounds.read_every > 0 && done % bounds.read_every == 0 {
                let pick = touched[(rng >> 32) as usize % touched.len()];
                // Every write issued so far completed (a failed one ended the loop).
                let want = log.last_issued[&pick];
                let got = file
                    .read_at(pick * ALIGN as u64, ALIGN)
                    .map_err(|e| format!("read of block {pick} after write {n} failed: {e}"))?;
                log.reads += 1;
                if got != stamped_block(pick, want) {
                    let seen = match stamp_of(&got) {
                        Some((b, w)) if b == pick => format!("write {w}"),
                        _ if got.iter().all(|b| *b == 0) => "zeros".to_owned(),
                        _ => "something else".to_owned(),
                    };
                    return Err(format!(
                        "stale read after write {n}: block {pick} returned {seen}, \
                         its last completed write is {want}"
                    ));
                }
            }
            if done % bounds.sync_every.max(1) == 0
                || seen_kill_at.is_some_and(|k| done >= k + bounds.after_kill)
            {
                file.sync()
                    .map_err(|e| format!("fdatasync after write {n} failed: {e}"))?;
                log.syncs += 1;
                log.last_durable.extend(unsynced.drain(..));
            }
        }
    }
}

/// Blocks read back against what they must hold.
#[derive(Debug, Default)]
pub struct ReadBack {
    /// Blocks holding their last durable write.
    pub intact: u64,
    /// Blocks holding a later write that was issued but not known durable (the
    /// writer died before its fdatasync): allowed.
    pub undurable: u64,
    /// Blocks that read as zeros.
    pub zeros: Vec<u64>,
    /// Blocks holding an earlier write of the same block.
    pub older: Vec<u64>,
    /// Blocks holding anything else.
    pub other: Vec<u64>,
}

impl ReadBack {
    /// Whether every block held its last durable write.
    pub fn all_current(&self) -> bool {
        self.zeros.is_empty() && self.older.is_empty() && self.other.is_empty()
    }

    /// Ok when every block held its last durable write (or an allowed undurable one);
    /// otherwise the counts of each kind, naming the first few blocks; `when` says at
    /// what point of the test.
    pub fn check(&self, when: &str) -> Result<(), String> {
        const FIRST_FEW: usize = 8;
        if self.all_current() {
            return Ok(());
        }
        let few = |v: &[u64]| format!("{:?} ({})", &v[..v.len().min(FIRST_FEW)], v.len());
        Err(format!(
            "{when}: {} intact, {} undurable, zeros {}, older {}, other {}",
            self.intact,
            self.undurable,
            few(&self.zeros),
            few(&self.older),
            few(&self.other),
        ))
    }

    /// Panics with [`ReadBack::check`]'s message unless every block held its last
    /// durable write.
    pub fn assert_all_current(&self, when: &str) {
        if let Err(e) = self.check(when) {
            panic!("{e}");
        }
    }
}

/// Reads every block of `expected` with O_DIRECT and sorts it into a [`ReadBack`].
pub fn read_back(device: &Path, expected: &BTreeMap<u64, u64>) -> Result<ReadBack, String> {
    read_back_issued(device, expected, &BTreeMap::new())
}

/// [`read_back`], also accepting for a block any write after its expected one up to
/// its entry in `issued` (writes a writer issued before it died, whose fdatasync
/// never returned). Write numbers must be comparable: one writer, or writers started
/// with increasing numbers ([`RandomWriter::start_from`]).
pub fn read_back_issued(
    device: &Path,
    expected: &BTreeMap<u64, u64>,
    issued: &BTreeMap<u64, u64>,
) -> Result<ReadBack, String> {
    let file = DirectFile::open(device, false)
        .map_err(|e| format!("opening {} for O_DIRECT: {e}", device.display()))?;
    let mut out = ReadBack::default();
    for (&block, &write) in expected {
        let got = file
            .read_at(block * ALIGN as u64, ALIGN)
            .map_err(|e| format!("reading block {block}: {e}"))?;
        let stamp = stamp_of(&got).filter(|&(b, w)| b == block && got == stamped_block(b, w));
        match stamp {
            Some((_, w)) if w == write => out.intact += 1,
            Some((_, w)) if w > write && issued.get(&block).is_some_and(|&i| w <= i) => {
                out.undurable += 1
            }
            Some((_, w)) if w < write => out.older.push(block),
            _ if got.iter().all(|b| *b == 0) => out.zeros.push(block),
            _ => out.other.push(block),
        }
    }
    Ok(out)
}
