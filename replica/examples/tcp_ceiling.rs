//! The ceiling of issue 4's benchmark (a) on this machine: what the leanest possible
//! replica could do, measured in the same run as its own baseline.
//!
//! A "replica" here is one thread with one io_uring that receives requests from a TCP
//! socket, reads or writes 4 KiB blocks of a file with O_DIRECT (one submission per
//! request, as fio does), and sends the answers back, with no checksums, no metadata,
//! no scheduler and no async runtime. The load generator is one blocking thread that
//! keeps 32 requests in flight over loopback TCP. Rows:
//!
//! * the same ring loop with no TCP at all (each completion starts the next request
//!   itself): the disk's own rate, as fio measures it;
//! * the loop serving requests over TCP;
//! * the loop over TCP with a fixed amount of extra CPU spent per request (`--extra-us`),
//!   which shows how much each microsecond of per-request work on the serving thread
//!   costs at QD32 on this machine.
//!
//! Why it exists: the daemon's rows of `bench/replica-io` (a) sit far below the issue's
//! goals, and this separates what the machine allows from what the daemon costs.
//! Usage: `target/release/examples/tcp_ceiling [--dir DIR] [--secs N] [--extra-us 2,5]`
//! (run by `bench/replica-io`).

use std::collections::VecDeque;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use io_uring::{opcode, types, IoUring};
use tessera_replica::scheduler::AlignedBuf;

const BLOCK: usize = 4096;
const QD: usize = 32;
const FILE_BYTES: u64 = 1 << 30;
/// Request: little-endian block offset, then 4 KiB of data for a write.
const OFFSET_LEN: usize = 8;
const RECV_TOKEN: u64 = u64::MAX;
const SEND_TOKEN: u64 = u64::MAX - 1;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Read => "randread",
            Kind::Write => "randwrite",
        }
    }

    fn request_len(self) -> usize {
        match self {
            Kind::Read => OFFSET_LEN,
            Kind::Write => OFFSET_LEN + BLOCK,
        }
    }

    fn reply_len(self) -> usize {
        match self {
            Kind::Read => OFFSET_LEN + BLOCK,
            Kind::Write => OFFSET_LEN,
        }
    }
}

/// xorshift64*: offsets spread over the file, no dependency.
struct Offsets(u64);

impl Offsets {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % (FILE_BYTES / BLOCK as u64) * BLOCK as u64
    }
}

/// Where requests come from: a TCP connection, or (no TCP) the loop itself until a
/// deadline.
enum Source {
    Tcp(TcpStream),
    Local(Instant),
}

/// The serving loop. Returns the disk requests it completed. It returns only when
/// nothing it submitted is still in the kernel (the buffers are freed afterwards).
fn serve(file: &std::fs::File, kind: Kind, source: &Source, extra: Duration) -> Result<u64> {
    let mut ring = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .build(256)
        .context("io_uring")?;
    let mut slots: Vec<AlignedBuf> = (0..QD * 2)
        .map(|_| AlignedBuf::zeroed(BLOCK))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("buffers: {e}"))?;
    let mut free: Vec<usize> = (0..slots.len()).collect();
    let mut slot_offset = vec![0u64; slots.len()];
    // Requests not yet submitted: offset, and the slot already holding a write's data.
    let mut waiting: VecDeque<(u64, Option<usize>)> = VecDeque::new();
    let mut rng = Offsets(0x9e37_79b9);
    let mut inbox = vec![0u8; 64 * 1024];
    let mut parsed: Vec<u8> = Vec::new();
    let (mut outbox, mut sending) = (Vec::new(), Vec::new());
    let (mut in_kernel, mut completed, mut stopping) = (0usize, 0u64, false);
    let mut send_in_flight = false;
    let disk = types::Fd(file.as_raw_fd());
    let sock = match source {
        Source::Tcp(s) => Some(types::Fd(s.as_raw_fd())),
        Source::Local(_) => {
            waiting.extend((0..QD).map(|_| (rng.next(), None)));
            None
        }
    };
    if let Some(fd) = sock {
        let recv = opcode::Recv::new(fd, inbox.as_mut_ptr(), inbox.len() as u32);
        // SAFETY: `inbox` outlives the loop, which does not return while the receive
        // is in the kernel, and is not touched until its completion is reaped.
        unsafe { ring.submission().push(&recv.build().user_data(RECV_TOKEN)) }
            .map_err(|_| anyhow!("queue full"))?;
        in_kernel += 1;
    }
    loop {
        // One submission per disk request, as fio does by default.
        while let (false, Some(&(offset, data))) = (stopping, waiting.front()) {
            let Some(slot) = data.or_else(|| free.pop()) else {
                break;
            };
            waiting.pop_front();
            slot_offset[slot] = offset;
            let ptr = slots[slot].as_mut_slice().as_mut_ptr();
            let entry = match kind {
                Kind::Read => opcode::Read::new(disk, ptr, BLOCK as u32)
                    .offset(offset)
                    .build(),
                Kind::Write => opcode::Write::new(disk, ptr, BLOCK as u32)
                    .offset(offset)
                    .build(),
            };
            // SAFETY: the slot's buffer is not touched, freed or reused until the
            // completion for `slot` is reaped, and the loop outlives it.
            unsafe { ring.submission().push(&entry.user_data(slot as u64)) }
                .map_err(|_| anyhow!("queue full"))?;
            ring.submit().context("io_uring_enter")?;
            in_kernel += 1;
        }
        if let (Some(fd), false, false) = (sock, send_in_flight, stopping) {
            if !outbox.is_empty() || !sending.is_empty() {
                sending.append(&mut outbox);
                let send = opcode::Send::new(fd, sending.as_ptr(), sending.len() as u32);
                // SAFETY: `sending` is neither touched nor reallocated until the send's
                // completion is reaped (new answers go to `outbox` meanwhile).
                unsafe { ring.submission().push(&send.build().user_data(SEND_TOKEN)) }
                    .map_err(|_| anyhow!("queue full"))?;
                send_in_flight = true;
                in_kernel += 1;
            }
        }
        if stopping && in_kernel == 0 {
            break;
        }
        ring.submit_and_wait(1).context("io_uring_enter")?;
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c: io_uring::cqueue::Entry| (c.user_data(), c.result()))
            .collect();
        in_kernel -= done.len();
        for (token, res) in done {
            match token {
                RECV_TOKEN if res <= 0 => stopping = true, // the client is gone
                RECV_TOKEN => {
                    parsed.extend_from_slice(&inbox[..res as usize]);
                    let whole = parsed.len() / kind.request_len();
                    for req in parsed.chunks_exact(kind.request_len()) {
                        let offset = u64::from_le_bytes(req[..OFFSET_LEN].try_into()?);
                        let data = match kind {
                            Kind::Read => None,
                            Kind::Write => {
                                let slot = free.pop().ok_or_else(|| anyhow!("no buffer"))?;
                                slots[slot]
                                    .as_mut_slice()
                                    .copy_from_slice(&req[OFFSET_LEN..]);
                                Some(slot)
                            }
                        };
                        waiting.push_back((offset, data));
                    }
                    parsed.drain(..whole * kind.request_len());
                    if let Some(fd) = sock {
                        let recv = opcode::Recv::new(fd, inbox.as_mut_ptr(), inbox.len() as u32);
                        // SAFETY: as for the first receive.
                        unsafe { ring.submission().push(&recv.build().user_data(RECV_TOKEN)) }
                            .map_err(|_| anyhow!("queue full"))?;
                        in_kernel += 1;
                    }
                }
                SEND_TOKEN => {
                    send_in_flight = false;
                    if res < 0 {
                        // The client closing while an answer is on its way is the end.
                        stopping = true;
                        continue;
                    }
                    sending.drain(..res as usize);
                }
                slot => {
                    let slot = slot as usize;
                    if res != BLOCK as i32 {
                        bail!("disk request returned {res}");
                    }
                    completed += 1;
                    let spin = Instant::now();
                    while spin.elapsed() < extra {
                        std::hint::spin_loop();
                    }
                    match source {
                        Source::Local(until) if Instant::now() >= *until => stopping = true,
                        Source::Local(_) => waiting.push_back((rng.next(), None)),
                        Source::Tcp(_) => {
                            outbox.extend_from_slice(&slot_offset[slot].to_le_bytes());
                            if kind == Kind::Read {
                                outbox.extend_from_slice(slots[slot].as_slice());
                            }
                        }
                    }
                    free.push(slot);
                }
            }
        }
    }
    Ok(completed)
}

/// The load generator: QD32 requests over one connection for `dur`; returns IOPS.
fn drive(addr: std::net::SocketAddr, kind: Kind, dur: Duration) -> Result<f64> {
    let stream = TcpStream::connect(addr).context("connect")?;
    stream.set_nodelay(true)?;
    let mut rd = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
    let mut wr = BufWriter::with_capacity(64 * 1024, stream);
    let mut rng = Offsets(0x5eed);
    let payload = [0x5au8; BLOCK];
    let send = |wr: &mut BufWriter<TcpStream>, rng: &mut Offsets| -> Result<()> {
        wr.write_all(&rng.next().to_le_bytes())?;
        if kind == Kind::Write {
            wr.write_all(&payload)?;
        }
        Ok(())
    };
    for _ in 0..QD {
        send(&mut wr, &mut rng)?;
    }
    wr.flush()?;
    let mut reply = vec![0u8; kind.reply_len()];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        rd.read_exact(&mut reply)?;
        n += 1;
        send(&mut wr, &mut rng)?;
        // Send when nothing more has arrived to answer in the same batch.
        if rd.buffer().is_empty() {
            wr.flush()?;
        }
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn over_tcp(file: &std::fs::File, kind: Kind, extra: Duration, dur: Duration) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::scope(|s| {
        let server = s.spawn(|| -> Result<u64> {
            let (sock, _) = listener.accept()?;
            sock.set_nodelay(true)?;
            serve(file, kind, &Source::Tcp(sock), extra)
        });
        let iops = drive(addr, kind, dur);
        if iops.is_err() {
            // The client may have failed before connecting: a connection that closes
            // at once releases the server from `accept`.
            let _ = TcpStream::connect(addr);
        }
        // The client's socket is closed: the server sees the end and returns.
        let served = server.join().map_err(|_| anyhow!("server panicked"))?;
        served?;
        iops
    })
}

fn fill(path: &Path) -> Result<std::fs::File> {
    let mut f = std::fs::File::create(path).with_context(|| format!("{}", path.display()))?;
    let chunk = vec![0xa5u8; 1 << 20];
    for _ in 0..FILE_BYTES / chunk.len() as u64 {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .context("O_DIRECT open")
}

fn main() -> Result<()> {
    let mut dir = PathBuf::from("/var/tmp");
    let mut secs = 10u64;
    let mut extras = vec![2u64, 5];
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => dir = PathBuf::from(value()?),
            "--secs" => secs = value()?.parse().context("--secs")?,
            "--extra-us" => {
                extras = value()?
                    .split(',')
                    .map(|v| v.parse().context("--extra-us"))
                    .collect::<Result<_>>()?
            }
            other => bail!("unknown argument {other}"),
        }
    }
    let dur = Duration::from_secs(secs);
    let work = tempfile::Builder::new()
        .prefix("tessera-tcp-ceiling-")
        .tempdir_in(&dir)?;
    let file = fill(&work.path().join("blocks"))?;
    println!("\n## Leanest-replica ceiling ({secs} s per run)\n");
    println!("| workload | IOPS | note |\n|---|---:|---|");
    for kind in [Kind::Write, Kind::Read] {
        let start = Instant::now();
        let done = serve(&file, kind, &Source::Local(start + dur), Duration::ZERO)?;
        let baseline = done as f64 / start.elapsed().as_secs_f64();
        let name = kind.name();
        println!(
            "| ring loop, no TCP, 4k {name} QD{QD} | {baseline:.0} | baseline (the disk, as fio) |"
        );
        for extra_us in std::iter::once(0).chain(extras.iter().copied()) {
            let extra = Duration::from_micros(extra_us);
            let iops = over_tcp(&file, kind, extra, dur)?;
            let what = match extra_us {
                0 => format!("ring loop over loopback TCP, 4k {name} QD{QD}"),
                us => format!("… + {us} µs of CPU per request on the serving thread"),
            };
            println!(
                "| {what} | {iops:.0} | {:.0} % of the baseline |",
                100.0 * iops / baseline
            );
        }
    }
    Ok(())
}
