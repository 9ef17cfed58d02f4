//! Micro benchmark of the I/O scheduler: 4 KiB random writes then reads at queue
//! depth 32 through the scheduler (io_uring and sync engines), against a plain
//! `pwrite`/`pread` loop at queue depth 1 as the floor.
//!
//! Run: `cargo run --release -p tessera-replica --example sched_bench -- [secs] [dir]`
//! (default 3 s per case, a temporary directory under /var/tmp). Numbers are only
//! comparable on the same machine.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_replica::scheduler::{
    AlignedBuf, EngineKind, IoClass, IoRequest, Qos, Scheduler, SchedulerConfig,
};

const BLOCK: usize = 4096;
const FILE_BLOCKS: u64 = 64 * 1024; // 256 MiB
const QD: usize = 32;

/// xorshift64*: enough randomness for offsets, no dependency.
struct Rng(u64);

impl Rng {
    fn next_block(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % FILE_BLOCKS
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3);
    let base = args.next().unwrap_or_else(|| "/var/tmp".into());
    let dir = tempfile::tempdir_in(base)?;
    let path = dir.path().join("bench.dat");
    let file = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)?,
    );
    prefill(&file)?;
    let dur = Duration::from_secs(secs);

    for write in [true, false] {
        let what = if write { "randwrite" } else { "randread" };
        let iops = direct_qd1(&file, write, dur)?;
        println!(
            "{what:9} direct p{}  QD1 : {iops:>9.0} IOPS",
            if write { "write" } else { "read " }
        );
        for (name, engine) in [
            ("io_uring", EngineKind::IoUring),
            ("sync x4 ", EngineKind::Sync { threads: 4 }),
        ] {
            let iops = scheduled_qd32(&file, engine, write, dur)?;
            println!("{what:9} scheduler {name} QD{QD}: {iops:>9.0} IOPS");
        }
    }
    Ok(())
}

fn prefill(file: &File) -> anyhow::Result<()> {
    let chunk = AlignedBuf::from_slice(&vec![0xa5; 1 << 20])?;
    for i in 0..(FILE_BLOCKS * BLOCK as u64) >> 20 {
        file.write_all_at(chunk.as_slice(), i << 20)?;
    }
    file.sync_all()?;
    Ok(())
}

fn direct_qd1(file: &File, write: bool, dur: Duration) -> anyhow::Result<f64> {
    let mut buf = AlignedBuf::from_slice(&[0x5a; BLOCK])?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < dur {
        let off = rng.next_block() * BLOCK as u64;
        if write {
            file.write_all_at(buf.as_slice(), off)?;
        } else {
            file.read_exact_at(buf.as_mut_slice(), off)?;
        }
        ops += 1;
    }
    Ok(ops as f64 / start.elapsed().as_secs_f64())
}

fn scheduled_qd32(
    file: &Arc<File>,
    engine: EngineKind,
    write: bool,
    dur: Duration,
) -> anyhow::Result<f64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let sched = Scheduler::new(SchedulerConfig {
            name: "bench".into(),
            engine,
            ..SchedulerConfig::default()
        })?;
        let vol = sched.register_volume("bench", Qos::unlimited())?;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..QD {
            let vol = vol.clone();
            let file = Arc::clone(file);
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1));
                let mut buf = Some(AlignedBuf::from_slice(&[0x5a; BLOCK])?);
                let mut ops = 0u64;
                while start.elapsed() < dur {
                    let offset = rng.next_block() * BLOCK as u64;
                    let file = Arc::clone(&file);
                    if write {
                        let Some(b) = buf.take() else { break };
                        let req = IoRequest::Write {
                            file,
                            offset,
                            buf: b,
                        };
                        buf = vol.submit(IoClass::ForegroundWrite, req).await?.buf;
                    } else {
                        let req = IoRequest::Read {
                            file,
                            offset,
                            len: BLOCK,
                        };
                        vol.submit(IoClass::ForegroundRead, req).await?;
                    }
                    ops += 1;
                }
                anyhow::Ok(ops)
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await??;
        }
        Ok(total as f64 / start.elapsed().as_secs_f64())
    })
}
