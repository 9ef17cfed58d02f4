//! Engine overhead measurement: IOPS and CPU per op of the engine plus the protocol,
//! against in-process replicas that store nothing.
//!
//! Three in-process data-plane servers over `NullVolumes` (writes are dropped, reads
//! return zeros), so the figures are the engine plus the protocol on both sides, with
//! no disk. Run with:
//!
//! ```text
//! cargo run --release -p tessera-node --example engine_overhead
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_replica_protocol::seq::Epoch;

use bytes::Bytes;
use tessera_node::engine::{Engine, EngineConfig, ReplicaEndpoint};
use tessera_replica::block_io::{BlockIoError, OpenVolume, VolumeBlocks, VolumeRegistry};
use tessera_replica::dataplane::serve;
use tessera_replica::sync_state::SyncState;
use tessera_replica_protocol::block::{BlockVersion, VersionedBlocks};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const SIZE: u64 = 1 << 30;
const BS: u64 = 4096;

/// A volume that stores nothing: writes succeed, reads return zeros.
struct NullBlocks;

impl VolumeBlocks for NullBlocks {
    async fn read(&self, _offset: u64, len: u32) -> Result<Vec<u8>, BlockIoError> {
        Ok(vec![0u8; len as usize])
    }
    async fn write(&self, _offset: u64, _data: Vec<u8>, _seq: u64) -> Result<(), BlockIoError> {
        Ok(())
    }
    async fn flush(&self) -> Result<(), BlockIoError> {
        Ok(())
    }
    async fn trim(&self, _offset: u64, _len: u64, _seq: u64) -> Result<(), BlockIoError> {
        Ok(())
    }
    async fn write_if_newer(
        &self,
        _offset: u64,
        data: Vec<u8>,
        _seq: u64,
    ) -> Result<u64, BlockIoError> {
        Ok(data.len() as u64 / BS)
    }
    async fn trim_if_newer(&self, _offset: u64, len: u64, _seq: u64) -> Result<u64, BlockIoError> {
        Ok(len / BS)
    }
    async fn versions(
        &self,
        offset: u64,
        len: u64,
        _with_data: bool,
    ) -> Result<VersionedBlocks, BlockIoError> {
        Ok(VersionedBlocks::versions_only(
            offset / BS,
            vec![BlockVersion::Unwritten; (len / BS) as usize],
        ))
    }
    fn size(&self) -> u64 {
        SIZE
    }
}

struct NullVolumes(OpenVolume<NullBlocks>);

impl VolumeRegistry for NullVolumes {
    type Blocks = NullBlocks;
    fn open(&self, _volume_id: &str) -> Result<OpenVolume<NullBlocks>, BlockIoError> {
        Ok(self.0.clone())
    }
    fn adopt_epoch(&self, _volume_id: &str, epoch: u64) -> Result<(), BlockIoError> {
        self.0.epoch.fetch_max(epoch, Ordering::SeqCst);
        Ok(())
    }
}

/// Aborts the server tasks when the test ends; holds their sync-state directory.
struct Servers(Vec<JoinHandle<()>>, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Servers {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

async fn start() -> (Servers, Vec<SocketAddr>) {
    let mut tasks = Vec::new();
    let mut addrs = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3 {
        let sync_dir = dir.path().join(i.to_string());
        std::fs::create_dir(&sync_dir).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        let reg = Arc::new(NullVolumes(OpenVolume {
            blocks: Arc::new(NullBlocks),
            epoch: Arc::new(AtomicU64::new(1)),
            sync: Arc::new(SyncState::load(&sync_dir, SIZE)),
        }));
        tasks.push(tokio::spawn(serve(listener, reg, std::future::pending())));
    }
    (Servers(tasks, dir), addrs)
}

fn cpu_seconds() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `u` is a valid, writable rusage buffer; getrusage fills it.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) };
    assert_eq!(rc, 0);
    // SAFETY: getrusage returned 0, so it initialised the struct.
    let u = unsafe { u.assume_init() };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

async fn run(engine: &Engine, qd: u64, write: bool, dur: Duration) -> (f64, f64) {
    let ops = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + dur;
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for q in 0..qd {
        let engine = engine.clone();
        let ops = Arc::clone(&ops);
        tasks.push(tokio::spawn(async move {
            let buf = Bytes::from(vec![0xA5u8; BS as usize]);
            let mut x = q.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            while Instant::now() < deadline {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % (SIZE / BS)) * BS;
                if write {
                    engine.write(off, buf.clone()).await.unwrap();
                } else {
                    engine.read(off, BS as u32).await.unwrap();
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = ops.load(Ordering::Relaxed) as f64;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    (n / secs, cpu / n * 1e6)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (_servers, addrs) = start().await;
    let eps = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| ReplicaEndpoint {
            node_id: format!("n{i}"),
            data_address: a.to_string(),
        })
        .collect();
    let engine = Engine::open(EngineConfig::new(
        "bench",
        Epoch::new(1).expect("epoch"),
        eps,
        "n0",
    ))
    .await
    .unwrap();
    let dur = Duration::from_secs(3);
    for (name, qd, write) in [
        ("4k randwrite QD1", 1, true),
        ("4k randwrite QD32", 32, true),
        ("4k randread QD1", 1, false),
        ("4k randread QD32", 32, false),
    ] {
        let (iops, cpu_us) = run(&engine, qd, write, dur).await;
        println!("{name}: {iops:.0} IOPS, {cpu_us:.1} µs CPU per op (engine + 3 null replicas)");
    }
}
