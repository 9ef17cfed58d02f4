//! In-process replicas for the engine tests: the real data-plane server
//! (`tessera_replica::dataplane::serve`) over a small file-backed block store.
//!
//! `CrcFileVolumes` keeps one sparse file per volume plus, in memory, the crc32c and
//! seq of every block, and verifies the crc on every read: a byte changed in the file
//! on disk is reported as `CORRUPT_BLOCK`, like the checksummed store does. It stands
//! in for the checksummed store where the tests need hooks that store does not have:
//! an event log, holding writes, and freezing all requests (an unresponsive replica).
//! Unlike the store it keeps checksums in memory only (nothing survives a restart, and
//! the tests never restart it).
//!
//! `StoreReplica` serves the real checksummed store (`tessera_replica::store`) instead,
//! for the self-healing test that corrupts a byte of a data file on disk.

#![allow(dead_code)] // each test binary uses a different subset

pub mod daemons;
pub mod holding_link;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tessera_replica_protocol::seq::Epoch;

use tessera_node::engine::{EngineConfig, ReplicaEndpoint};
use tessera_replica::block_io::{BlockIoError, OpenVolume, VolumeBlocks, VolumeRegistry};
use tessera_replica::dataplane::serve;
use tessera_replica::store::{LayeredStore, StoreHandle};
use tessera_replica::sync_state::SyncState;
use tessera_replica_protocol::block::{BlockVersion, VersionedBlocks, BLOCK_SIZE};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const BS: usize = BLOCK_SIZE as usize;

/// What a replica did, in completion order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A write finished.
    Write { offset: u64, len: u64, seq: u64 },
    /// A trim finished.
    Trim { offset: u64, len: u64, seq: u64 },
    /// A flush started (it covers the writes logged before it).
    Flush,
}

struct State {
    crcs: Vec<u32>,
    seqs: Vec<u64>,
}

/// One volume's blocks: a sparse file, per-block crc32c and seq in memory. Cheap to
/// clone (clones share the volume).
#[derive(Clone)]
pub struct CrcFileBlocks(Arc<BlocksInner>);

impl std::ops::Deref for CrcFileBlocks {
    type Target = BlocksInner;
    fn deref(&self) -> &BlocksInner {
        &self.0
    }
}

pub struct BlocksInner {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
    state: Mutex<State>,
    log: Mutex<Vec<Event>>,
    /// While true, writes wait before touching the file.
    hold_writes: watch::Sender<bool>,
    /// While true, every request waits (an unresponsive replica).
    frozen: watch::Sender<bool>,
}

fn io_err(e: impl std::fmt::Display) -> BlockIoError {
    BlockIoError::Io(std::io::Error::other(e.to_string()))
}

impl BlocksInner {
    fn check(&self, offset: u64, len: u64) -> Result<(), BlockIoError> {
        if !(offset | len).is_multiple_of(BLOCK_SIZE) {
            return Err(BlockIoError::Unaligned { offset, len });
        }
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(BlockIoError::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Applies `put` (given the state, the block and its index in the range) to each
    /// block of the range whose seq is lower than `seq` or whose bytes fail their
    /// crc, sets its seq, and logs `event` per run of applied blocks. Returns how
    /// many were applied.
    fn apply_if_newer(
        &self,
        offset: u64,
        len: u64,
        seq: u64,
        mut put: impl FnMut(&mut State, u64, usize) -> std::io::Result<()>,
        event: impl Fn(u64, u64) -> Event,
    ) -> Result<u64, BlockIoError> {
        let mut st = self.state.lock().unwrap();
        let first = offset / BLOCK_SIZE;
        let mut applied = 0;
        let mut run: Option<(u64, u64)> = None;
        let mut buf = vec![0u8; BS];
        for (k, b) in (first..first + len / BLOCK_SIZE).enumerate() {
            self.file.read_exact_at(&mut buf, b * BLOCK_SIZE)?;
            let intact = crc32c::crc32c(&buf) == st.crcs[b as usize];
            let held = if intact { st.seqs[b as usize] } else { 0 };
            if held >= seq {
                continue;
            }
            put(&mut st, b, k)?;
            st.seqs[b as usize] = seq;
            applied += 1;
            run = match run {
                Some((f, n)) if f + n == b => Some((f, n + 1)),
                Some((f, n)) => {
                    self.log
                        .lock()
                        .unwrap()
                        .push(event(f * BLOCK_SIZE, n * BLOCK_SIZE));
                    Some((b, 1))
                }
                None => Some((b, 1)),
            };
        }
        if let Some((f, n)) = run {
            self.log
                .lock()
                .unwrap()
                .push(event(f * BLOCK_SIZE, n * BLOCK_SIZE));
        }
        Ok(applied)
    }

    async fn wait_unfrozen(&self) {
        let mut rx = self.frozen.subscribe();
        let _ = rx.wait_for(|f| !*f).await;
    }

    /// Makes writes wait until [`Self::release_writes`].
    pub fn hold_writes(&self) {
        self.hold_writes.send_replace(true);
    }

    /// Lets held writes proceed.
    pub fn release_writes(&self) {
        self.hold_writes.send_replace(false);
    }

    /// Makes every request wait until [`Self::thaw`] (the replica stops answering).
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Undoes [`Self::freeze`].
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// Events so far.
    pub fn log(&self) -> Vec<Event> {
        self.log.lock().unwrap().clone()
    }

    /// Seq that last wrote block `b` (0 if never written).
    pub fn seq_of(&self, b: u64) -> u64 {
        self.state.lock().unwrap().seqs[b as usize]
    }

    /// Flips one byte of block `b` in the data file on disk, behind the store's back.
    pub fn corrupt_on_disk(&self, b: u64) {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .unwrap();
        let at = b * BLOCK_SIZE + 17;
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, at).unwrap();
        byte[0] ^= 0x5a;
        f.write_all_at(&byte, at).unwrap();
    }

    /// Block `b` as stored in the file, and whether it matches its checksum.
    pub fn block_on_disk(&self, b: u64) -> (Vec<u8>, bool) {
        let st = self.state.lock().unwrap();
        let mut buf = vec![0u8; BS];
        self.file.read_exact_at(&mut buf, b * BLOCK_SIZE).unwrap();
        let ok = crc32c::crc32c(&buf) == st.crcs[b as usize];
        (buf, ok)
    }
}

impl VolumeBlocks for CrcFileBlocks {
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, BlockIoError> {
        self.wait_unfrozen().await;
        self.check(offset, u64::from(len))?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let st = me.state.lock().unwrap();
            let mut buf = vec![0u8; len as usize];
            me.file.read_exact_at(&mut buf, offset)?;
            let first = offset / BLOCK_SIZE;
            for (i, block) in buf.chunks(BS).enumerate() {
                if crc32c::crc32c(block) != st.crcs[first as usize + i] {
                    return Err(BlockIoError::Corrupt {
                        block: first + i as u64,
                    });
                }
            }
            Ok(buf)
        })
        .await
        .map_err(io_err)?
    }

    async fn write(&self, offset: u64, data: Vec<u8>, seq: u64) -> Result<(), BlockIoError> {
        self.wait_unfrozen().await;
        let mut held = self.hold_writes.subscribe();
        let _ = held.wait_for(|h| !*h).await;
        self.check(offset, data.len() as u64)?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut st = me.state.lock().unwrap();
            me.file.write_all_at(&data, offset)?;
            let first = (offset / BLOCK_SIZE) as usize;
            for (i, block) in data.chunks(BS).enumerate() {
                st.crcs[first + i] = crc32c::crc32c(block);
                st.seqs[first + i] = seq;
            }
            me.log.lock().unwrap().push(Event::Write {
                offset,
                len: data.len() as u64,
                seq,
            });
            Ok(())
        })
        .await
        .map_err(io_err)?
    }

    async fn flush(&self) -> Result<(), BlockIoError> {
        self.wait_unfrozen().await;
        self.log.lock().unwrap().push(Event::Flush);
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.file.sync_data().map_err(BlockIoError::from))
            .await
            .map_err(io_err)?
    }

    async fn trim(&self, offset: u64, len: u64, seq: u64) -> Result<(), BlockIoError> {
        self.wait_unfrozen().await;
        self.check(offset, len)?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut st = me.state.lock().unwrap();
            let zeros = vec![0u8; BS];
            let zero_crc = crc32c::crc32c(&zeros);
            for b in offset / BLOCK_SIZE..(offset + len) / BLOCK_SIZE {
                me.file.write_all_at(&zeros, b * BLOCK_SIZE)?;
                st.crcs[b as usize] = zero_crc;
                st.seqs[b as usize] = seq;
            }
            me.log
                .lock()
                .unwrap()
                .push(Event::Trim { offset, len, seq });
            Ok(())
        })
        .await
        .map_err(io_err)?
    }

    /// Per block as the store does: applied where the held seq is lower (a block
    /// failing its crc counts as 0). Held by [`Self::hold_writes`] like writes; logs
    /// one [`Event::Write`] per run of applied blocks.
    async fn write_if_newer(
        &self,
        offset: u64,
        data: Vec<u8>,
        seq: u64,
    ) -> Result<u64, BlockIoError> {
        self.wait_unfrozen().await;
        let mut held = self.hold_writes.subscribe();
        let _ = held.wait_for(|h| !*h).await;
        self.check(offset, data.len() as u64)?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            me.apply_if_newer(
                offset,
                data.len() as u64,
                seq,
                |st, b, k| {
                    let block = &data[k * BS..(k + 1) * BS];
                    me.file.write_all_at(block, b * BLOCK_SIZE)?;
                    st.crcs[b as usize] = crc32c::crc32c(block);
                    Ok(())
                },
                |offset, len| Event::Write { offset, len, seq },
            )
        })
        .await
        .map_err(io_err)?
    }

    /// As [`Self::write_if_newer`], for trims; logs [`Event::Trim`] per run.
    async fn trim_if_newer(&self, offset: u64, len: u64, seq: u64) -> Result<u64, BlockIoError> {
        self.wait_unfrozen().await;
        self.check(offset, len)?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let zeros = vec![0u8; BS];
            let zero_crc = crc32c::crc32c(&zeros);
            me.apply_if_newer(
                offset,
                len,
                seq,
                |st, b, _| {
                    me.file.write_all_at(&zeros, b * BLOCK_SIZE)?;
                    st.crcs[b as usize] = zero_crc;
                    Ok(())
                },
                |offset, len| Event::Trim { offset, len, seq },
            )
        })
        .await
        .map_err(io_err)?
    }

    async fn versions(
        &self,
        offset: u64,
        len: u64,
        with_data: bool,
    ) -> Result<VersionedBlocks, BlockIoError> {
        self.wait_unfrozen().await;
        self.check(offset, len)?;
        let st = self.state.lock().unwrap();
        let first = offset / BLOCK_SIZE;
        let mut versions = Vec::new();
        let mut data = Vec::new();
        for b in first..first + len / BLOCK_SIZE {
            let seq = st.seqs[b as usize];
            if seq == 0 {
                versions.push(BlockVersion::Unwritten);
                continue;
            }
            let mut buf = vec![0u8; BS];
            self.file.read_exact_at(&mut buf, b * BLOCK_SIZE)?;
            if crc32c::crc32c(&buf) != st.crcs[b as usize] {
                versions.push(BlockVersion::Corrupt { seq });
            } else {
                versions.push(BlockVersion::Data { seq });
                if with_data {
                    data.extend_from_slice(&buf);
                }
            }
        }
        Ok(if with_data {
            VersionedBlocks::new(first, versions, data).map_err(io_err)?
        } else {
            VersionedBlocks::versions_only(first, versions)
        })
    }

    fn size(&self) -> u64 {
        self.size
    }
}

/// The volumes of one in-process replica.
pub struct CrcFileVolumes {
    dir: tempfile::TempDir,
    volumes: Mutex<HashMap<String, OpenVolume<CrcFileBlocks>>>,
}

impl CrcFileVolumes {
    fn new() -> Arc<Self> {
        Arc::new(CrcFileVolumes {
            dir: tempfile::tempdir().unwrap(),
            volumes: Mutex::new(HashMap::new()),
        })
    }

    /// Creates an all-zero volume of `size` bytes at `epoch`.
    pub fn create(&self, id: &str, size: u64, epoch: u64) -> CrcFileBlocks {
        let path = self.dir.path().join(id);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(size).unwrap();
        let blocks = (size / BLOCK_SIZE) as usize;
        let blocks = CrcFileBlocks(Arc::new(BlocksInner {
            path,
            file,
            size,
            state: Mutex::new(State {
                crcs: vec![crc32c::crc32c(&[0u8; BS]); blocks],
                seqs: vec![0; blocks],
            }),
            log: Mutex::new(Vec::new()),
            hold_writes: watch::Sender::new(false),
            frozen: watch::Sender::new(false),
        }));
        let sync_dir = self.dir.path().join(format!("{id}.sync"));
        std::fs::create_dir(&sync_dir).unwrap();
        let v = OpenVolume {
            blocks: Arc::new(blocks.clone()),
            epoch: Arc::new(AtomicU64::new(epoch)),
            sync: Arc::new(SyncState::load(&sync_dir, size)),
        };
        self.volumes.lock().unwrap().insert(id.to_owned(), v);
        blocks
    }

    /// The replica's current epoch for a volume.
    pub fn epoch(&self, id: &str) -> u64 {
        self.volumes.lock().unwrap()[id]
            .epoch
            .load(Ordering::SeqCst)
    }
}

impl VolumeRegistry for CrcFileVolumes {
    type Blocks = CrcFileBlocks;

    fn open(&self, volume_id: &str) -> Result<OpenVolume<Self::Blocks>, BlockIoError> {
        self.volumes
            .lock()
            .unwrap()
            .get(volume_id)
            .cloned()
            .ok_or_else(|| BlockIoError::UnknownVolume(volume_id.into()))
    }

    fn adopt_epoch(&self, volume_id: &str, epoch: u64) -> Result<(), BlockIoError> {
        // In memory only: these replicas never restart.
        self.open(volume_id)?
            .epoch
            .fetch_max(epoch, Ordering::SeqCst);
        Ok(())
    }
}

/// One in-process replica: a data-plane server task over its own `CrcFileVolumes`.
/// The task is aborted on drop.
pub struct TestReplica {
    pub node_id: String,
    pub addr: SocketAddr,
    pub registry: Arc<CrcFileVolumes>,
    task: Option<JoinHandle<()>>,
}

impl TestReplica {
    pub async fn start(node_id: &str) -> TestReplica {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let registry = CrcFileVolumes::new();
        let task = tokio::spawn(serve(
            listener,
            Arc::clone(&registry),
            std::future::pending(),
        ));
        TestReplica {
            node_id: node_id.to_owned(),
            addr,
            registry,
            task: Some(task),
        }
    }

    /// Kills the server like a crashed process: the listener and every connection
    /// close at once, requests in flight are never answered.
    pub async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for TestReplica {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// `n` replicas holding one volume.
pub struct Cluster {
    pub volume_id: String,
    pub size: u64,
    pub replicas: Vec<TestReplica>,
    pub blocks: Vec<CrcFileBlocks>,
}

impl Cluster {
    pub async fn start(n: usize, size: u64) -> Cluster {
        let volume_id = "vol-test".to_owned();
        let mut replicas = Vec::new();
        let mut blocks = Vec::new();
        for i in 0..n {
            let r = TestReplica::start(&format!("node-{i}")).await;
            blocks.push(r.registry.create(&volume_id, size, 1));
            replicas.push(r);
        }
        Cluster {
            volume_id,
            size,
            replicas,
            blocks,
        }
    }

    /// An engine configuration for this cluster with a short request timeout.
    pub fn config(&self, epoch: u64, local: &str, timeout: Duration) -> EngineConfig {
        let eps = self
            .replicas
            .iter()
            .map(|r| ReplicaEndpoint {
                node_id: r.node_id.clone(),
                data_address: r.addr.to_string(),
            })
            .collect();
        let mut c = EngineConfig::new(
            &self.volume_id,
            Epoch::new(epoch).expect("epoch"),
            eps,
            local,
        );
        c.request_timeout = timeout;
        c.expected_size = Some(self.size);
        // A replica these tests make fail stays out unless a test brings it back.
        c.reconnect_interval = Duration::from_secs(3600);
        c
    }
}

/// Polls `cond` every few milliseconds until it holds; panics after `limit`.
pub async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A block filled with a pattern derived from `stamp`, so every write is distinct.
pub fn pattern(stamp: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut x = stamp.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// One volume in the real checksummed store, served by the data-plane server.
struct StoreVolumes {
    volume_id: String,
    volume: OpenVolume<StoreHandle>,
}

impl VolumeRegistry for StoreVolumes {
    type Blocks = StoreHandle;

    fn open(&self, volume_id: &str) -> Result<OpenVolume<StoreHandle>, BlockIoError> {
        if volume_id == self.volume_id {
            Ok(self.volume.clone())
        } else {
            Err(BlockIoError::UnknownVolume(volume_id.into()))
        }
    }

    fn adopt_epoch(&self, volume_id: &str, epoch: u64) -> Result<(), BlockIoError> {
        // In memory only: these replicas never restart.
        self.open(volume_id)?
            .epoch
            .fetch_max(epoch, Ordering::SeqCst);
        Ok(())
    }
}

/// An in-process replica over the checksummed layered store. Aborted on drop.
pub struct StoreReplica {
    pub node_id: String,
    pub addr: SocketAddr,
    pub store: Arc<LayeredStore>,
    dir: tempfile::TempDir,
    task: JoinHandle<()>,
    registry: Arc<StoreVolumes>,
}

impl StoreReplica {
    pub async fn start(node_id: &str, volume_id: &str, size: u64) -> StoreReplica {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LayeredStore::create(&dir.path().join("vol"), size).unwrap());
        let registry = Arc::new(StoreVolumes {
            volume_id: volume_id.to_owned(),
            volume: OpenVolume {
                blocks: Arc::new(StoreHandle::new(Arc::clone(&store))),
                epoch: Arc::new(AtomicU64::new(1)),
                sync: Arc::clone(store.sync_state()),
            },
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(serve(
            listener,
            Arc::clone(&registry),
            std::future::pending(),
        ));
        StoreReplica {
            node_id: node_id.to_owned(),
            addr,
            store,
            dir,
            task,
            registry,
        }
    }

    /// Stops serving (the server and its connections are dropped, like a killed
    /// daemon's); the store and its sync state stay.
    pub async fn stop(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    /// Serves the same store again on a new port (`addr` changes).
    pub async fn restart(&mut self) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.addr = listener.local_addr().unwrap();
        self.task = tokio::spawn(serve(
            listener,
            Arc::clone(&self.registry),
            std::future::pending(),
        ));
    }

    /// Serves the same store again on the same address, as a restarted daemon
    /// does (an engine reconnects to it).
    pub async fn resume(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.task = tokio::spawn(serve(
            listener,
            Arc::clone(&self.registry),
            std::future::pending(),
        ));
    }

    /// The replica's endpoint for an engine configuration.
    pub fn endpoint(&self) -> ReplicaEndpoint {
        ReplicaEndpoint {
            node_id: self.node_id.clone(),
            data_address: self.addr.to_string(),
        }
    }

    /// Flips one byte of block `b` in the head layer's data file on disk.
    pub fn corrupt_on_disk(&self, b: u64) {
        let layers = self.dir.path().join("vol").join("layers");
        let mut heads: Vec<PathBuf> = std::fs::read_dir(&layers)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(heads.len(), 1, "a fresh volume has one layer");
        let data = heads.remove(0).join("data");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data)
            .unwrap();
        let at = b * BLOCK_SIZE + 100;
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, at).unwrap();
        byte[0] ^= 0xff;
        f.write_all_at(&byte, at).unwrap();
        f.sync_all().unwrap();
    }
}

impl Drop for StoreReplica {
    fn drop(&mut self) {
        self.task.abort();
    }
}
