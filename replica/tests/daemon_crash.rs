//! Crash test of the real `tessera-replica` daemon: `kill -9` in the middle of a
//! pipelined write stream, twenty times in a row on the same data directory.
//!
//! Each round a writer keeps [`QUEUE_DEPTH`] requests in flight on one data-plane
//! connection: writes of 1..=8 blocks whose bytes are derived from (block, seq), reads
//! of idle blocks (which must return exactly the last acknowledged version), and now
//! and then a FLUSH. After a number of acknowledged writes drawn at random per round
//! (progress, not time), the writer SIGKILLs the daemon's process group with the rest
//! of its requests still unanswered. The daemon is restarted on the same directory,
//! the engine reconnects with the next epoch (adopted at HELLO, so seqs keep growing),
//! and every block of the volume is read and judged against the model:
//!
//! * bytes must be exactly those some write with seq `s` put into *that* block
//!   (header = block, seq; the rest a PRNG stream seeded by both), or all zeros;
//! * `s` must be at least the block's *durable* seq: the highest seq acknowledged before
//!   a FLUSH was sent whose reply came back OK (also: a version read back after a
//!   restart counts as acknowledged for the next flush). Zeros are allowed only while
//!   nothing was durable;
//! * CORRUPT_BLOCK (naming that block) is allowed only if some write to the block was
//!   issued after its durable one. A block whose every write was flushed reads exactly
//!   its flushed version.
//!
//! At most one request touches a block at a time, so "the last acknowledged version"
//! is well defined. At the end, torn blocks are rewritten, flushed, the daemon stopped
//! cleanly and restarted, and every block must then read exactly the model.
//!
//! The seed is printed; set `TESSERA_CRASH_SEED` to replay a run's choices (blocks,
//! sizes, flush and kill points; the timing of replies still varies).
//! Harness in `daemon_support` (own process group, killed in Drop, deadline polls, no
//! fixed sleeps).

mod daemon_support;

use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use daemon_support::{create_req, get_req, pgid, wait_exit, workdir, Daemon, EXIT_TIMEOUT};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tessera_replica_protocol::data::{ClientError, ErrorCode, ReplicaDataClient};
use tokio::task::JoinSet;

const BS: u64 = 4096;
const VOLUME: &str = "crash-v1";
const VOLUME_SIZE: u64 = 64 << 20;
const BLOCKS: u64 = VOLUME_SIZE / BS;
const ROUNDS: u64 = 20;
/// Requests kept in flight by the writer.
const QUEUE_DEPTH: usize = 32;
/// Half the writes land in this many leading blocks, so most of them overwrite a
/// block that already has an entry (the case a torn write can damage).
const HOT_BLOCKS: u64 = 256;
const MAX_WRITE_BLOCKS: u64 = 8;
/// Acknowledged writes after which a round's kill is fired (drawn per round).
const KILL_AFTER: RangeInclusive<u64> = 100..=1200;
/// Acknowledged writes between two flushes (drawn per flush).
const FLUSH_GAP: RangeInclusive<u64> = 8..=160;
/// Rounds whose kill must leave writes unanswered.
const MIN_MID_STREAM_KILLS: u64 = 15;
const SEQ_BITS: u32 = 40;
const VERIFY_CHUNK_BLOCKS: u64 = 256;
const VERIFY_WINDOW: usize = 4;
/// Bound on one round's stream, one verification pass and draining after a kill.
const PHASE_TIMEOUT: Duration = Duration::from_secs(60);
const ARGS: &[&str] = &["--capacity", "1Gi"];

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 33)).wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x = (x ^ (x >> 33)).wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    x ^ (x >> 33)
}

/// The test's own choices (blocks, sizes, flush and kill points), from a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick(&mut self, r: RangeInclusive<u64>) -> u64 {
        r.start() + self.below(r.end() - r.start() + 1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

/// Fills `out` (one block) with the bytes a write with `seq` puts into `block`: block
/// and seq (LE), then an xorshift stream seeded by both.
fn fill_content(out: &mut [u8], block: u64, seq: u64) {
    out[..8].copy_from_slice(&block.to_le_bytes());
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    let mut x = mix(block.rotate_left(29) ^ seq) | 1;
    for word in out[16..].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
}

/// The payload of a write of `count` blocks from `first` with `seq`.
fn payload(first: u64, count: u64, seq: u64) -> Vec<u8> {
    let mut data = vec![0u8; (count * BS) as usize];
    for (i, block) in data.chunks_exact_mut(BS as usize).enumerate() {
        fill_content(block, first + i as u64, seq);
    }
    data
}

/// What one block reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Zeros,
    Seq(u64),
    Corrupt,
}

/// Decodes one block's bytes; `Err` means bytes no write produced for this block.
fn classify(block: u64, data: &[u8]) -> Result<Seen, String> {
    const ZEROS: [u8; BS as usize] = [0; BS as usize];
    if data == ZEROS {
        return Ok(Seen::Zeros);
    }
    let word = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().expect("8 bytes"));
    let (named, seq) = (word(0), word(8));
    if named != block {
        return Err(format!(
            "block {block} holds bytes naming block {named} seq {seq:#x}"
        ));
    }
    let mut want = [0u8; BS as usize];
    fill_content(&mut want, block, seq);
    if data != want {
        let i = want.iter().zip(data).position(|(a, b)| a != b);
        return Err(format!(
            "block {block} names seq {seq:#x} but differs from that write's bytes \
             (first difference at byte {i:?})"
        ));
    }
    Ok(Seen::Seq(seq))
}

#[derive(Debug)]
struct Block {
    /// Every seq ever sent to this block, ascending.
    issued: Vec<u64>,
    /// Highest acknowledged seq (0: none), informational.
    acked: u64,
    /// Highest seq known durable (0: none).
    durable: u64,
    /// Exact content while no request touches the block and the daemon lives.
    state: Seen,
    /// A request touching this block is in flight.
    busy: bool,
}

struct Model {
    blocks: Vec<Block>,
    /// (first block, count, seq) of every acknowledgement since the round began.
    acks: Vec<(u64, u64, u64)>,
    /// Prefix of `acks` already made durable by a flush.
    durable_upto: usize,
    counter: u64,
}

impl Model {
    fn new() -> Model {
        Model {
            blocks: (0..BLOCKS)
                .map(|_| Block {
                    issued: Vec::new(),
                    acked: 0,
                    durable: 0,
                    state: Seen::Zeros,
                    busy: false,
                })
                .collect(),
            acks: Vec::new(),
            durable_upto: 0,
            counter: 0,
        }
    }

    fn block(&mut self, b: u64) -> &mut Block {
        &mut self.blocks[b as usize]
    }

    fn next_seq(&mut self, epoch: u64) -> u64 {
        self.counter += 1;
        (epoch << SEQ_BITS) | self.counter
    }

    fn ack(&mut self, first: u64, count: u64, seq: u64) {
        for b in first..first + count {
            let blk = self.block(b);
            blk.acked = blk.acked.max(seq);
            blk.state = Seen::Seq(seq);
        }
        self.acks.push((first, count, seq));
    }

    /// A flush sent when `acks` had `mark` entries was answered OK.
    fn flushed(&mut self, mark: usize) {
        for i in self.durable_upto..mark {
            let (first, count, seq) = self.acks[i];
            for b in first..first + count {
                let blk = self.block(b);
                blk.durable = blk.durable.max(seq);
            }
        }
        self.durable_upto = self.durable_upto.max(mark);
    }

    /// Judges what block `b` reads as after a crash; records it as the block's state.
    fn judge(&mut self, b: u64, seen: Seen, stats: &mut Stats) -> Result<(), String> {
        let blk = &mut self.blocks[b as usize];
        let last = blk.issued.last().copied().unwrap_or(0);
        let durable = blk.durable;
        match seen {
            Seen::Corrupt => {
                if last <= durable {
                    return Err(format!(
                        "block {b} reads CORRUPT_BLOCK although its last write \
                         (seq {last:#x}) was flushed"
                    ));
                }
                if blk.state == Seen::Corrupt {
                    stats.still_torn += 1;
                } else {
                    stats.torn += 1;
                    if durable != 0 {
                        stats.torn_over_flushed += 1;
                    }
                }
            }
            Seen::Zeros => {
                if durable != 0 {
                    return Err(format!(
                        "LOST FLUSHED WRITE: block {b} reads zeros, flushed seq {durable:#x}"
                    ));
                }
                if blk.acked != 0 {
                    stats.acked_unflushed_lost += 1;
                }
            }
            Seen::Seq(s) => {
                if blk.issued.binary_search(&s).is_err() {
                    return Err(format!(
                        "WRONG BYTES: block {b} holds seq {s:#x}, never written to it \
                         (flushed {durable:#x}, last issued {last:#x})"
                    ));
                }
                if s < durable {
                    return Err(format!(
                        "LOST FLUSHED WRITE: block {b} went back to seq {s:#x} below \
                         flushed seq {durable:#x}"
                    ));
                }
                if s > durable {
                    stats.newer_than_durable += 1;
                }
                if s < blk.acked {
                    stats.acked_unflushed_lost += 1;
                }
            }
        }
        blk.state = seen;
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Stats {
    acked_writes: u64,
    flushes: u64,
    stream_reads: u64,
    /// Kills that left at least one write unanswered.
    mid_stream_kills: u64,
    /// Requests (writes, reads, flushes) issued but not yet answered at the kills.
    in_flight_at_kills: u64,
    /// Writes that never got a reply because of the kills.
    unanswered_writes: u64,
    /// Kills that left a flush unanswered.
    kills_during_flush: u64,
    /// Blocks newly read as CORRUPT_BLOCK after a restart (torn by that round's kill).
    torn: u64,
    /// Of `torn`, blocks whose flushed version was overwritten by the torn write (this
    /// replica lost it, detectably; the engine repairs it from another replica).
    torn_over_flushed: u64,
    /// Blocks still CORRUPT_BLOCK from an earlier round (not rewritten since).
    still_torn: u64,
    /// Blocks read at a version newer than their durable one (summed over rounds).
    newer_than_durable: u64,
    /// Blocks read older than their last acknowledged (but unflushed) write.
    acked_unflushed_lost: u64,
}

enum Done {
    Write {
        first: u64,
        count: u64,
        seq: u64,
        res: Result<(), ClientError>,
    },
    Read {
        block: u64,
        res: Result<Vec<u8>, ClientError>,
    },
    Flush {
        mark: usize,
        res: Result<(), ClientError>,
    },
}

fn is_disconnect(e: &ClientError) -> bool {
    matches!(e, ClientError::Disconnected { .. })
}

/// Picks a free range for a write: half in the hot blocks, half anywhere.
fn pick_range(rng: &mut Rng, model: &Model) -> Option<(u64, u64)> {
    for _ in 0..16 {
        let first = if rng.percent(50) {
            rng.below(HOT_BLOCKS)
        } else {
            rng.below(BLOCKS)
        };
        let count = if rng.percent(70) {
            1
        } else {
            rng.pick(2..=MAX_WRITE_BLOCKS)
        };
        let count = count.min(BLOCKS - first);
        if (first..first + count).all(|b| !model.blocks[b as usize].busy) {
            return Some((first, count));
        }
    }
    None
}

/// One round: streams requests until `kill_after` writes are acknowledged, SIGKILLs
/// the daemon's process group with the rest unanswered, and collects every reply.
async fn stream_and_kill(
    client: &ReplicaDataClient,
    daemon_group: Pid,
    model: &mut Model,
    rng: &mut Rng,
    epoch: u64,
    kill_after: u64,
    stats: &mut Stats,
) -> Result<(), String> {
    let mut ops: JoinSet<Done> = JoinSet::new();
    let mut writes_in_flight = 0u64;
    let mut flush_in_flight = false;
    let mut acks_since_flush = 0u64;
    let mut flush_gap = rng.pick(FLUSH_GAP);
    let mut acked = 0u64;
    let mut killed = false;
    let mut unanswered = 0u64;
    loop {
        while !killed && ops.len() < QUEUE_DEPTH {
            if !flush_in_flight && acks_since_flush >= flush_gap {
                let mark = model.acks.len();
                let c = client.clone();
                ops.spawn(async move {
                    let res = c.flush().await;
                    Done::Flush { mark, res }
                });
                flush_in_flight = true;
                acks_since_flush = 0;
                flush_gap = rng.pick(FLUSH_GAP);
                continue;
            }
            if rng.percent(10) {
                let block = if rng.percent(50) {
                    rng.below(HOT_BLOCKS)
                } else {
                    rng.below(BLOCKS)
                };
                if !model.block(block).busy {
                    model.block(block).busy = true;
                    let c = client.clone();
                    ops.spawn(async move {
                        let res = c.read(block * BS, BS as u32).await;
                        Done::Read { block, res }
                    });
                    continue;
                }
            }
            let Some((first, count)) = pick_range(rng, model) else {
                break;
            };
            let seq = model.next_seq(epoch);
            for b in first..first + count {
                let blk = model.block(b);
                blk.busy = true;
                blk.issued.push(seq);
            }
            let data = payload(first, count, seq);
            let c = client.clone();
            ops.spawn(async move {
                let res = c.write(first * BS, data, seq).await;
                Done::Write {
                    first,
                    count,
                    seq,
                    res,
                }
            });
            writes_in_flight += 1;
        }
        let Some(joined) = ops.join_next().await else {
            break;
        };
        match joined.map_err(|e| format!("request task failed: {e}"))? {
            Done::Write {
                first,
                count,
                seq,
                res,
            } => {
                writes_in_flight -= 1;
                for b in first..first + count {
                    model.block(b).busy = false;
                }
                match res {
                    Ok(()) => {
                        model.ack(first, count, seq);
                        stats.acked_writes += 1;
                        acked += 1;
                        acks_since_flush += 1;
                    }
                    Err(e) if killed && is_disconnect(&e) => unanswered += 1,
                    Err(e) => return Err(format!("write of blocks {first}+{count} failed: {e}")),
                }
            }
            Done::Read { block, res } => {
                model.block(block).busy = false;
                let want = model.block(block).state;
                let got = match res {
                    Ok(data) => classify(block, &data)?,
                    Err(ClientError::Remote(r))
                        if r.code == ErrorCode::CorruptBlock && r.detail == block =>
                    {
                        Seen::Corrupt
                    }
                    Err(e) if killed && is_disconnect(&e) => continue,
                    Err(e) => return Err(format!("read of block {block} failed: {e}")),
                };
                stats.stream_reads += 1;
                if got != want {
                    return Err(format!(
                        "read of idle block {block} during the stream returned {got:?}, \
                         expected {want:?}"
                    ));
                }
            }
            Done::Flush { mark, res } => {
                flush_in_flight = false;
                match res {
                    Ok(()) => {
                        model.flushed(mark);
                        stats.flushes += 1;
                    }
                    Err(e) if killed && is_disconnect(&e) => stats.kills_during_flush += 1,
                    Err(e) => return Err(format!("flush failed: {e}")),
                }
            }
        }
        if !killed && acked >= kill_after {
            stats.in_flight_at_kills += ops.len() as u64;
            killpg(daemon_group, Signal::SIGKILL).map_err(|e| format!("kill -9: {e}"))?;
            killed = true;
        }
    }
    if !killed {
        return Err(format!(
            "the stream ran dry after {acked} acked writes, before the kill"
        ));
    }
    assert_eq!(writes_in_flight, 0);
    if unanswered > 0 {
        stats.mid_stream_kills += 1;
    }
    stats.unanswered_writes += unanswered;
    Ok(())
}

/// Reads every block of the volume once and returns what each reads as; a range that
/// reports CORRUPT_BLOCK is re-read block by block. `Err` for bytes no write produced.
async fn read_all(client: &ReplicaDataClient) -> Result<Vec<Seen>, String> {
    let chunks = BLOCKS / VERIFY_CHUNK_BLOCKS;
    let mut results: Vec<Option<Result<Vec<u8>, ClientError>>> =
        (0..chunks).map(|_| None).collect();
    let mut reads = JoinSet::new();
    let mut next = 0u64;
    loop {
        while next < chunks && reads.len() < VERIFY_WINDOW {
            let c = client.clone();
            let chunk = next;
            reads.spawn(async move {
                let off = chunk * VERIFY_CHUNK_BLOCKS * BS;
                (chunk, c.read(off, (VERIFY_CHUNK_BLOCKS * BS) as u32).await)
            });
            next += 1;
        }
        let Some(joined) = reads.join_next().await else {
            break;
        };
        let (chunk, res) = joined.map_err(|e| format!("read task failed: {e}"))?;
        results[chunk as usize] = Some(res);
    }
    let mut seen = Vec::with_capacity(BLOCKS as usize);
    for (chunk, res) in results.into_iter().enumerate() {
        let first = chunk as u64 * VERIFY_CHUNK_BLOCKS;
        let end = first + VERIFY_CHUNK_BLOCKS;
        match res.expect("every chunk was read") {
            Ok(data) => {
                for (i, bytes) in data.chunks_exact(BS as usize).enumerate() {
                    seen.push(classify(first + i as u64, bytes)?);
                }
            }
            Err(ClientError::Remote(r)) if r.code == ErrorCode::CorruptBlock => {
                read_around_corrupt(client, first, end, r.detail, &mut seen).await?;
            }
            Err(e) => return Err(format!("read of blocks {first}..{end}: {e}")),
        }
    }
    Ok(seen)
}

/// Classifies blocks `lo..end` into `seen`, given that reading them reported
/// CORRUPT_BLOCK for block `bad`: the blocks before `bad` are re-read as one range,
/// `bad` alone (it must report itself corrupt), and the rest as a range, repeatedly.
async fn read_around_corrupt(
    client: &ReplicaDataClient,
    mut lo: u64,
    end: u64,
    mut bad: u64,
    seen: &mut Vec<Seen>,
) -> Result<(), String> {
    loop {
        if !(lo..end).contains(&bad) {
            return Err(format!(
                "CORRUPT_BLOCK for blocks {lo}..{end} names block {bad}"
            ));
        }
        if bad > lo {
            match client.read(lo * BS, ((bad - lo) * BS) as u32).await {
                Ok(data) => {
                    for (i, bytes) in data.chunks_exact(BS as usize).enumerate() {
                        seen.push(classify(lo + i as u64, bytes)?);
                    }
                }
                Err(e) => {
                    return Err(format!(
                        "blocks {lo}..{bad}, before the first corrupt one, failed: {e}"
                    ))
                }
            }
        }
        match client.read(bad * BS, BS as u32).await {
            Err(ClientError::Remote(r)) if r.code == ErrorCode::CorruptBlock && r.detail == bad => {
                seen.push(Seen::Corrupt)
            }
            other => {
                return Err(format!(
                    "block {bad}, reported corrupt in a range, read alone gives {:?}",
                    other.map(|d| classify(bad, &d))
                ))
            }
        }
        lo = bad + 1;
        if lo == end {
            return Ok(());
        }
        match client.read(lo * BS, ((end - lo) * BS) as u32).await {
            Ok(data) => {
                for (i, bytes) in data.chunks_exact(BS as usize).enumerate() {
                    seen.push(classify(lo + i as u64, bytes)?);
                }
                return Ok(());
            }
            Err(ClientError::Remote(r)) if r.code == ErrorCode::CorruptBlock => bad = r.detail,
            Err(e) => return Err(format!("read of blocks {lo}..{end}: {e}")),
        }
    }
}

async fn connect(daemon: &Daemon, epoch: u64) -> ReplicaDataClient {
    let client = match daemon.data_client(VOLUME, epoch).await {
        Ok(c) => c,
        Err(e) => panic!("data-plane connect failed: {e}\n{}", daemon.log()),
    };
    assert_eq!(client.info().size, VOLUME_SIZE);
    assert_eq!(client.info().epoch, epoch, "HELLO epoch not adopted");
    client
}

/// Restarts the daemon on `data_dir` and checks the epoch adopted before the crash
/// survived it.
async fn restart(work: &std::path::Path, data_dir: &std::path::Path, epoch: u64) -> Daemon {
    let daemon = Daemon::start(work, data_dir, ARGS).await;
    let record = daemon
        .client()
        .await
        .get_volume(get_req(VOLUME))
        .await
        .expect("volume record after restart")
        .into_inner();
    assert_eq!(
        record.epoch, epoch,
        "the epoch adopted at HELLO did not survive the crash"
    );
    daemon
}

fn seed() -> u64 {
    match std::env::var("TESSERA_CRASH_SEED") {
        Ok(s) => s.parse().expect("TESSERA_CRASH_SEED is a u64"),
        Err(_) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970");
            mix(now.as_nanos() as u64 ^ u64::from(std::process::id()))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_write_stream_twenty_times_loses_no_flushed_write() {
    let started = Instant::now();
    let seed = seed();
    println!("daemon_crash: seed {seed} (replay with TESSERA_CRASH_SEED={seed})");
    let mut rng = Rng(seed);
    let work = workdir();
    let data_dir = work.path().join("data");
    let mut daemon = Daemon::start(work.path(), &data_dir, ARGS).await;
    daemon
        .client()
        .await
        .create_volume(create_req(VOLUME, VOLUME_SIZE))
        .await
        .expect("create volume");
    let mut epoch = 1;
    let mut client = connect(&daemon, epoch).await;
    let mut model = Model::new();
    let mut stats = Stats::default();

    for round in 1..=ROUNDS {
        let kill_after = rng.pick(KILL_AFTER);
        let before = (
            stats.torn,
            stats.newer_than_durable,
            stats.unanswered_writes,
            stats.still_torn,
        );
        let streamed = tokio::time::timeout(
            PHASE_TIMEOUT,
            stream_and_kill(
                &client,
                pgid(&daemon.child),
                &mut model,
                &mut rng,
                epoch,
                kill_after,
                &mut stats,
            ),
        )
        .await;
        match streamed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("round {round}: {e}\n{}", daemon.log()),
            Err(_) => panic!("round {round}: stream stuck\n{}", daemon.log()),
        }
        let status = wait_exit(&mut daemon.child, EXIT_TIMEOUT).await;
        assert!(status.is_some(), "round {round}: daemon survived SIGKILL");
        drop(client);
        drop(daemon);

        daemon = restart(work.path(), &data_dir, epoch).await;
        epoch += 1;
        client = connect(&daemon, epoch).await;
        // A new round: only flushes sent from now on make anything durable, and what
        // the restarted daemon returns counts as acknowledged for them.
        model.acks.clear();
        model.durable_upto = 0;
        let seen = match tokio::time::timeout(PHASE_TIMEOUT, read_all(&client)).await {
            Ok(Ok(seen)) => seen,
            Ok(Err(e)) => panic!("round {round}: {e}\n{}", daemon.log()),
            Err(_) => panic!("round {round}: verification stuck\n{}", daemon.log()),
        };
        for (b, s) in seen.into_iter().enumerate() {
            let b = b as u64;
            if let Err(e) = model.judge(b, s, &mut stats) {
                panic!("round {round} (seed {seed}): {e}\n{}", daemon.log());
            }
            if let Seen::Seq(seq) = s {
                model.acks.push((b, 1, seq));
            }
        }
        println!(
            "daemon_crash: round {round}: kill after {kill_after} acked writes, \
             {} writes unanswered, {} blocks torn ({} still torn from before), \
             {} newer than durable",
            stats.unanswered_writes - before.2,
            stats.torn - before.0,
            stats.still_torn - before.3,
            stats.newer_than_durable - before.1,
        );
    }

    // Heal: rewrite every torn block, flush, stop cleanly; then the volume must read
    // exactly as the model says, with nothing corrupt.
    let torn: Vec<u64> = (0..BLOCKS)
        .filter(|&b| model.blocks[b as usize].state == Seen::Corrupt)
        .collect();
    for &b in &torn {
        let seq = model.next_seq(epoch);
        model.block(b).issued.push(seq);
        client
            .write(b * BS, payload(b, 1, seq), seq)
            .await
            .expect("rewrite torn block");
        model.ack(b, 1, seq);
    }
    client.flush().await.expect("final flush");
    model.flushed(model.acks.len());
    drop(client);
    let status = daemon.terminate().await;
    assert!(status.success(), "unclean exit on SIGTERM: {status}");
    let daemon = restart(work.path(), &data_dir, epoch).await;
    let client = connect(&daemon, epoch).await;
    let seen = match tokio::time::timeout(PHASE_TIMEOUT, read_all(&client)).await {
        Ok(Ok(seen)) => seen,
        Ok(Err(e)) => panic!("final check: {e}\n{}", daemon.log()),
        Err(_) => panic!("final check stuck\n{}", daemon.log()),
    };
    let mut written = 0u64;
    for (b, s) in seen.into_iter().enumerate() {
        let blk = &model.blocks[b];
        let want = match blk.durable {
            0 => Seen::Zeros,
            d => Seen::Seq(d),
        };
        assert_eq!(
            (s, blk.state),
            (want, want),
            "final check: block {b} (seed {seed})"
        );
        written += u64::from(want != Seen::Zeros);
    }

    println!(
        "daemon_crash: seed {seed}: {ROUNDS} kills, {} with writes in flight \
         ({} requests in flight at the kills, {} writes unanswered, {} kills during a flush); \
         {} blocks torn ({} over a flushed version), {} read newer than durable, \
         {} acked-but-unflushed versions lost; \
         {} writes acked, {} flushes, {} stream reads checked, {} torn blocks healed, \
         {written} blocks written; {:.1}s",
        stats.mid_stream_kills,
        stats.in_flight_at_kills,
        stats.unanswered_writes,
        stats.kills_during_flush,
        stats.torn,
        stats.torn_over_flushed,
        stats.newer_than_durable,
        stats.acked_unflushed_lost,
        stats.acked_writes,
        stats.flushes,
        stats.stream_reads,
        torn.len(),
        started.elapsed().as_secs_f64(),
    );
    assert!(
        stats.mid_stream_kills >= MIN_MID_STREAM_KILLS,
        "only {} of {ROUNDS} kills left writes unanswered",
        stats.mid_stream_kills
    );
}
