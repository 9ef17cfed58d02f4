//! Data-plane server and client over real TCP on 127.0.0.1.
//!
//! The backend is `FileBackedVolumes`: one plain sparse file per volume, read and
//! written with pread/pwrite. It is a real (if unchecksummed) store, not a protocol
//! mock; it adds hooks the tests need: a gate that holds reads of one offset until
//! released, injected corrupt blocks, and a high-water mark of concurrent operations.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_replica::block_io::{
    BlockIoError, OpenVolume, VolumeBlocks, VolumeRegistry, BLOCK_SIZE,
};
use tessera_replica::dataplane::shards::Shards;
use tessera_replica::dataplane::{serve, serve_with_config, ServerConfig};
use tessera_replica::sync_state::SyncState;
use tessera_replica_protocol::block::{BlockVersion, VersionedBlocks};
use tessera_replica_protocol::data::frame::{self, Header, Opcode, RESPONSE_BIT};
use tessera_replica_protocol::data::message::{
    decode_error_payload, Hello, HelloReply, FLAG_IF_NEWER, FLAG_WITH_DATA, PROTOCOL_VERSION,
};
use tessera_replica_protocol::data::stream::read_frame;
use tessera_replica_protocol::data::{ClientConfig, ClientError, ErrorCode, ReplicaDataClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

/// Bound for "must not hang" assertions; never used to wait for an event.
const NO_HANG: Duration = Duration::from_secs(10);

/// Holds reads at one offset until released, and says when one arrived.
struct Gate {
    offset: u64,
    entered: Arc<Notify>,
    release: Arc<Notify>,
}

struct FileBlocks {
    file: Arc<std::fs::File>,
    size: u64,
    gate: Mutex<Option<Gate>>,
    corrupt: Mutex<HashSet<u64>>,
    active: AtomicUsize,
    max_active: AtomicUsize,
}

/// Counts an operation as active for its lifetime.
struct Active<'a>(&'a FileBlocks);

impl<'a> Active<'a> {
    fn new(b: &'a FileBlocks) -> Self {
        let now = b.active.fetch_add(1, Ordering::SeqCst) + 1;
        b.max_active.fetch_max(now, Ordering::SeqCst);
        Active(b)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl FileBlocks {
    fn check(&self, offset: u64, len: u64) -> Result<(), BlockIoError> {
        if (offset | len) & (BLOCK_SIZE - 1) != 0 {
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

    /// A read or write at the gated offset waits here until released.
    async fn wait_at_gate(&self, offset: u64) {
        let gate = self
            .gate
            .lock()
            .unwrap()
            .as_ref()
            .filter(|g| g.offset == offset)
            .map(|g| (Arc::clone(&g.entered), Arc::clone(&g.release)));
        if let Some((entered, release)) = gate {
            entered.notify_one();
            release.notified().await;
        }
    }

    fn set_gate(&self, offset: u64) -> (Arc<Notify>, Arc<Notify>) {
        let entered = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        *self.gate.lock().unwrap() = Some(Gate {
            offset,
            entered: Arc::clone(&entered),
            release: Arc::clone(&release),
        });
        (entered, release)
    }
}

impl VolumeBlocks for FileBlocks {
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, BlockIoError> {
        let _a = Active::new(self);
        self.check(offset, u64::from(len))?;
        self.wait_at_gate(offset).await;
        let first = offset / BLOCK_SIZE;
        let last = first + u64::from(len) / BLOCK_SIZE;
        if let Some(b) = (first..last).find(|b| self.corrupt.lock().unwrap().contains(b)) {
            return Err(BlockIoError::Corrupt { block: b });
        }
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset).map(|()| buf)
        })
        .await
        .map_err(|e| BlockIoError::Io(std::io::Error::other(e)))?
        .map_err(BlockIoError::from)
    }

    async fn write(&self, offset: u64, data: Vec<u8>, _seq: u64) -> Result<(), BlockIoError> {
        let _a = Active::new(self);
        self.check(offset, data.len() as u64)?;
        self.wait_at_gate(offset).await;
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || file.write_all_at(&data, offset))
            .await
            .map_err(|e| BlockIoError::Io(std::io::Error::other(e)))?
            .map_err(BlockIoError::from)
    }

    async fn flush(&self) -> Result<(), BlockIoError> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(|e| BlockIoError::Io(std::io::Error::other(e)))?
            .map_err(BlockIoError::from)
    }

    async fn trim(&self, offset: u64, len: u64, _seq: u64) -> Result<(), BlockIoError> {
        self.check(offset, len)?;
        // Plain zero-fill; a real store punches holes.
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || {
            let zeros = vec![0u8; BLOCK_SIZE as usize];
            let mut at = offset;
            while at < offset + len {
                file.write_all_at(&zeros, at)?;
                at += BLOCK_SIZE;
            }
            Ok::<(), std::io::Error>(())
        })
        .await
        .map_err(|e| BlockIoError::Io(std::io::Error::other(e)))?
        .map_err(BlockIoError::from)
    }

    /// Keeps no versions, so every block counts as never written (seq 0): applied
    /// whole for any newer seq. The conditional rule is tested on the real store
    /// (`daemon_dataplane`).
    async fn write_if_newer(
        &self,
        offset: u64,
        data: Vec<u8>,
        seq: u64,
    ) -> Result<u64, BlockIoError> {
        let blocks = data.len() as u64 / BLOCK_SIZE;
        if seq == 0 {
            self.check(offset, data.len() as u64)?;
            return Ok(0);
        }
        self.write(offset, data, seq).await.map(|()| blocks)
    }

    /// As [`Self::write_if_newer`].
    async fn trim_if_newer(&self, offset: u64, len: u64, seq: u64) -> Result<u64, BlockIoError> {
        if seq == 0 {
            self.check(offset, len)?;
            return Ok(0);
        }
        self.trim(offset, len, seq).await.map(|()| len / BLOCK_SIZE)
    }

    /// Keeps no versions: every block reads as never written. The protocol tests of
    /// VERSIONS use the real store (`dataplane_sync` tests).
    async fn versions(
        &self,
        offset: u64,
        len: u64,
        _with_data: bool,
    ) -> Result<VersionedBlocks, BlockIoError> {
        self.check(offset, len)?;
        Ok(VersionedBlocks::versions_only(
            offset / BLOCK_SIZE,
            vec![BlockVersion::Unwritten; (len / BLOCK_SIZE) as usize],
        ))
    }

    fn size(&self) -> u64 {
        self.size
    }
}

/// One sparse file per volume plus an `<id>.epoch` file holding its durable epoch.
struct FileBackedVolumes {
    dir: tempfile::TempDir,
    volumes: Mutex<HashMap<String, OpenVolume<FileBlocks>>>,
}

impl FileBackedVolumes {
    fn new() -> Arc<Self> {
        Arc::new(FileBackedVolumes {
            dir: tempfile::tempdir().unwrap(),
            volumes: Mutex::new(HashMap::new()),
        })
    }

    fn create(&self, id: &str, blocks: u64, epoch: u64) -> OpenVolume<FileBlocks> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.dir.path().join(id))
            .unwrap();
        let size = blocks * BLOCK_SIZE;
        file.set_len(size).unwrap();
        std::fs::write(self.epoch_path(id), epoch.to_string()).unwrap();
        let sync_dir = self.dir.path().join(format!("{id}.sync"));
        std::fs::create_dir(&sync_dir).unwrap();
        let v = OpenVolume {
            sync: Arc::new(SyncState::load(&sync_dir, size)),
            blocks: Arc::new(FileBlocks {
                file: Arc::new(file),
                size,
                gate: Mutex::new(None),
                corrupt: Mutex::new(HashSet::new()),
                active: AtomicUsize::new(0),
                max_active: AtomicUsize::new(0),
            }),
            epoch: Arc::new(AtomicU64::new(epoch)),
        };
        self.volumes.lock().unwrap().insert(id.into(), v.clone());
        v
    }

    fn epoch_path(&self, id: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{id}.epoch"))
    }

    fn durable_epoch(&self, id: &str) -> u64 {
        std::fs::read_to_string(self.epoch_path(id))
            .unwrap()
            .parse()
            .unwrap()
    }
}

impl VolumeRegistry for FileBackedVolumes {
    type Blocks = FileBlocks;

    fn open(&self, volume_id: &str) -> Result<OpenVolume<FileBlocks>, BlockIoError> {
        self.volumes
            .lock()
            .unwrap()
            .get(volume_id)
            .cloned()
            .ok_or_else(|| BlockIoError::UnknownVolume(volume_id.into()))
    }

    fn adopt_epoch(&self, volume_id: &str, epoch: u64) -> Result<(), BlockIoError> {
        self.open(volume_id)?;
        let cur = self.durable_epoch(volume_id);
        if epoch > cur {
            let tmp = self.dir.path().join(format!("{volume_id}.epoch.tmp"));
            let f = std::fs::File::create(&tmp)?;
            f.write_all_at(epoch.to_string().as_bytes(), 0)?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.epoch_path(volume_id))?;
        }
        Ok(())
    }
}

struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
    stop: Option<oneshot::Sender<()>>,
}

async fn start(reg: &Arc<FileBackedVolumes>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, Arc::clone(reg), async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        task,
        stop: Some(stop),
    }
}

/// [`start`] with the connections served on two data-plane shards (threads with a
/// runtime and an io_uring of their own), as the daemon does.
async fn start_sharded(reg: &Arc<FileBackedVolumes>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let config = ServerConfig {
        shards: Some(Arc::new(Shards::start(2, 32).expect("io_uring available"))),
        ..ServerConfig::default()
    };
    let task = tokio::spawn(serve_with_config(
        listener,
        Arc::clone(reg),
        config,
        async {
            let _ = stopped.await;
        },
    ));
    Server {
        addr,
        task,
        stop: Some(stop),
    }
}

async fn start_either(reg: &Arc<FileBackedVolumes>, sharded: bool) -> Server {
    if sharded {
        start_sharded(reg).await
    } else {
        start(reg).await
    }
}

fn pattern(block: u64) -> Vec<u8> {
    (0..BLOCK_SIZE)
        .map(|i| (block.wrapping_mul(31).wrapping_add(i * 7) % 251) as u8)
        .collect()
}

fn remote_code(r: Result<impl std::fmt::Debug, ClientError>) -> (ErrorCode, u64) {
    match r {
        Err(ClientError::Remote(e)) => (e.code, e.detail),
        other => panic!("expected an error reply, got {other:?}"),
    }
}

async fn raw_connect(
    addr: SocketAddr,
    vol: &str,
    epoch: u64,
    versions: (u16, u16),
) -> (TcpStream, frame::Frame) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let hello = Hello {
        min_version: versions.0,
        max_version: versions.1,
        volume_id: vol.into(),
    };
    let h = Header {
        opcode: Opcode::Hello as u8,
        epoch,
        ..Header::default()
    };
    s.write_all(&frame::encode(&h, &hello.encode()).unwrap())
        .await
        .unwrap();
    let reply = read_frame(&mut s).await.unwrap().unwrap();
    (s, reply)
}

fn request(op: Opcode, id: u64, epoch: u64, offset: u64, length: u64) -> Header {
    Header {
        opcode: op as u8,
        request_id: id,
        epoch,
        offset,
        length,
        ..Header::default()
    }
}

/// Writes and trims mark their regions in the volume's dirty map before they land;
/// the in-sync record is replaced only by a newer one of the connection's own
/// epoch; CLEAN clears only what its MARK_CLEAN token covers.
#[tokio::test]
async fn sync_requests_mark_declare_and_clean() {
    use tessera_replica::sync_state::REGION_SIZE;
    use tessera_replica_protocol::sync::Membership;
    let reg = FileBackedVolumes::new();
    let blocks = 3 * REGION_SIZE / BLOCK_SIZE;
    let vol = reg.create("v", blocks, 4);
    let srv = start(&reg).await;
    let c = ReplicaDataClient::connect(srv.addr, "v", 4).await.unwrap();
    assert!(c.supports_sync());
    assert_eq!(c.dirty_regions().await.unwrap().count(), 0);
    c.write(REGION_SIZE + BLOCK_SIZE, pattern(1), 4 << 40 | 1)
        .await
        .unwrap();
    let token = c.mark_clean().await.unwrap();
    c.trim(2 * REGION_SIZE, BLOCK_SIZE, 4 << 40 | 2)
        .await
        .unwrap();
    let dirty: Vec<u64> = c.dirty_regions().await.unwrap().dirty().collect();
    assert_eq!(dirty, vec![1, 2]);
    assert_eq!(vol.sync.dirty.snapshot().dirty().collect::<Vec<_>>(), dirty);
    assert_eq!(c.clean(token).await.unwrap(), 1);
    let dirty: Vec<u64> = c.dirty_regions().await.unwrap().dirty().collect();
    assert_eq!(dirty, vec![2], "the trim came after the token");

    let mine = Membership {
        epoch: 4,
        version: 1,
        members: vec!["a".into(), "b".into()],
    };
    assert!(c.membership().await.unwrap().is_undeclared());
    assert_eq!(c.set_membership(&mine).await.unwrap(), mine);
    let older = Membership {
        version: 0,
        ..mine.clone()
    };
    assert_eq!(c.set_membership(&older).await.unwrap(), mine, "older loses");
    let forged = Membership {
        epoch: 9,
        ..mine.clone()
    };
    let e = c.set_membership(&forged).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");
    assert_eq!(c.membership().await.unwrap(), mine);
    assert_eq!(vol.sync.membership.get(), mine);
}

/// A HELLO with an epoch no seq can carry is refused and adopts nothing: a peer
/// presenting `u64::MAX` used to leave the volume unpublishable.
#[tokio::test]
async fn an_epoch_beyond_the_seq_layout_is_refused_at_hello() {
    use tessera_replica_protocol::seq::MAX_EPOCH;
    let reg = FileBackedVolumes::new();
    reg.create("v", 16, 3);
    let srv = start(&reg).await;
    for epoch in [MAX_EPOCH + 1, u64::MAX] {
        let (_s, reply) = raw_connect(srv.addr, "v", epoch, (1, PROTOCOL_VERSION)).await;
        assert_eq!(reply.header.status, ErrorCode::InvalidRequest as u16);
        assert_eq!(decode_error_payload(&reply.payload).0, MAX_EPOCH);
    }
    assert_eq!(reg.durable_epoch("v"), 3);
    let c = ReplicaDataClient::connect(srv.addr, "v", MAX_EPOCH)
        .await
        .unwrap();
    assert_eq!(c.info().epoch, MAX_EPOCH);
}

/// A write or trim whose seq carries a later epoch than its connection's is refused
/// and changes nothing: it would outrank every write of the next engine.
#[tokio::test]
async fn a_seq_from_a_later_epoch_than_the_connection_is_refused() {
    use tessera_replica_protocol::seq::{Epoch, Seq};
    let reg = FileBackedVolumes::new();
    reg.create("v", 16, 3);
    let srv = start(&reg).await;
    let c = ReplicaDataClient::connect(srv.addr, "v", 3).await.unwrap();
    let own = Seq::of(Epoch::new(3).unwrap(), 1).unwrap().get();
    c.write(0, pattern(0), own).await.unwrap();
    let ahead = Seq::of(Epoch::new(4).unwrap(), 1).unwrap().get();
    let refused = [
        remote_code(c.write(0, vec![9u8; 4096], ahead).await),
        remote_code(c.trim(0, 4096, ahead).await),
        remote_code(c.write_if_newer(0, vec![9u8; 4096], ahead).await),
        remote_code(c.trim_if_newer(0, 4096, ahead).await),
        remote_code(c.write(0, vec![9u8; 4096], u64::MAX).await),
    ];
    for r in refused {
        assert_eq!(r, (ErrorCode::InvalidRequest, 3));
    }
    assert_eq!(c.read(0, 4096).await.unwrap(), pattern(0));
    // Older epochs' seqs are what resync and repair copy: still accepted.
    let older = Seq::of(Epoch::new(2).unwrap(), 7).unwrap().get();
    c.write(4096, pattern(1), older).await.unwrap();
    assert_eq!(c.read(4096, 4096).await.unwrap(), pattern(1));
}

/// Fails if `task` finishes within 300 ms: it must be waiting (for a held write).
async fn assert_still_waiting<T>(task: &mut JoinHandle<T>, what: &str) {
    assert!(
        tokio::time::timeout(Duration::from_millis(300), task)
            .await
            .is_err(),
        "{what}"
    );
}

/// A write of epoch 1 admitted (past its epoch and claim checks, holding the fence)
/// and held at the store's gate, for the tests of what must wait for it.
struct HeldWrite {
    _reg: Arc<FileBackedVolumes>,
    vol: OpenVolume<FileBlocks>,
    srv: Server,
    /// The connection that sent it.
    old: ReplicaDataClient,
    /// Where it writes (reads there wait at the gate too).
    held_at: u64,
    held: JoinHandle<Result<(), ClientError>>,
    release: Arc<Notify>,
}

async fn hold_a_write() -> HeldWrite {
    let reg = FileBackedVolumes::new();
    let vol = reg.create("v", 16, 1);
    let srv = start(&reg).await;
    let old = ReplicaDataClient::connect(srv.addr, "v", 1).await.unwrap();
    let held_at = 3 * BLOCK_SIZE;
    let (entered, release) = vol.blocks.set_gate(held_at);
    let held = {
        let old = old.clone();
        tokio::spawn(async move { old.write(held_at, pattern(1), 1 << 40 | 1).await })
    };
    entered.notified().await;
    HeldWrite {
        _reg: reg,
        vol,
        srv,
        old,
        held_at,
        held,
        release,
    }
}

/// After a CLAIM only the claiming connection may write or trim: connections opened
/// before it, and unclaimed ones opened after it, get SUPERSEDED and change nothing,
/// but still read; a later CLAIM passes the right on.
#[tokio::test]
async fn a_claim_shuts_out_writes_of_every_other_connection() {
    let reg = FileBackedVolumes::new();
    reg.create("v", 16, 1);
    let srv = start(&reg).await;
    let seq = |n: u64| 1 << 40 | n;
    let old = ReplicaDataClient::connect(srv.addr, "v", 1).await.unwrap();
    assert!(old.supports_claim());
    old.write(0, pattern(0), seq(1)).await.unwrap();
    let claimed = ReplicaDataClient::connect(srv.addr, "v", 1).await.unwrap();
    claimed.claim().await.unwrap();
    let late = ReplicaDataClient::connect(srv.addr, "v", 1).await.unwrap();
    for c in [&old, &late] {
        let refused = [
            remote_code(c.write(0, pattern(9), seq(2)).await),
            remote_code(c.trim(0, 4096, seq(3)).await),
            remote_code(c.write_if_newer(0, pattern(9), seq(4)).await),
            remote_code(c.trim_if_newer(0, 4096, seq(5)).await),
        ];
        for r in refused {
            assert_eq!(r, (ErrorCode::Superseded, 0));
        }
        assert_eq!(c.read(0, 4096).await.unwrap(), pattern(0), "still reads");
        c.flush().await.unwrap();
    }
    claimed.write(4096, pattern(1), seq(6)).await.unwrap();
    // The next claim moves the right on.
    late.claim().await.unwrap();
    assert_eq!(
        remote_code(claimed.write(4096, pattern(9), seq(7)).await),
        (ErrorCode::Superseded, 0)
    );
    late.write(4096, pattern(2), seq(8)).await.unwrap();
    assert_eq!(
        late.read(0, 8192).await.unwrap(),
        [pattern(0), pattern(2)].concat()
    );
}

/// A write admitted on a connection that is still on its way to the store when
/// another connection claims the volume lands before the CLAIM is answered, never
/// after; what that connection sends afterwards is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_admitted_before_a_claim_lands_before_the_claim_is_answered() {
    let HeldWrite {
        _reg,
        srv,
        old,
        held_at,
        held,
        release,
        ..
    } = hold_a_write().await;
    let new = ReplicaDataClient::connect(srv.addr, "v", 1).await.unwrap();
    let mut claim = {
        let new = new.clone();
        tokio::spawn(async move { new.claim().await })
    };
    assert_still_waiting(
        &mut claim,
        "the CLAIM was answered while a write of the older connection was still on its way",
    )
    .await;
    release.notify_one();
    held.await.unwrap().expect("the admitted write completes");
    claim.await.unwrap().expect("CLAIM");
    // (Reads at the gated offset itself would wait at the gate again.)
    let around = new.read(held_at - BLOCK_SIZE, 8192).await.unwrap();
    assert_eq!(&around[4096..], &pattern(1)[..]);
    let e = old.write(0, pattern(2), 1 << 40 | 2).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Superseded), "{e}");
}

/// A CLAIM that passed its epoch check but waited for an admitted write while a newer
/// engine raised the epoch is refused (STALE_EPOCH) and claims nothing: a fenced
/// engine never shuts out its successor's connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_overtaken_by_an_epoch_raise_claims_nothing() {
    let HeldWrite {
        _reg,
        vol,
        srv,
        old,
        held,
        release,
        ..
    } = hold_a_write().await;
    // The claim passes its epoch check now and waits behind the held write (were it
    // refused at dispatch, it would be answered at once).
    let mut late_claim = {
        let old = old.clone();
        tokio::spawn(async move { old.claim().await })
    };
    assert_still_waiting(
        &mut late_claim,
        "the CLAIM was answered while a write was still on its way",
    )
    .await;
    let deadline = tokio::time::Instant::now() + NO_HANG;
    let hello = tokio::spawn(ReplicaDataClient::connect(srv.addr, "v", 2));
    while vol.epoch.load(Ordering::SeqCst) != 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "epoch 2 never adopted"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    release.notify_one();
    held.await.unwrap().expect("the admitted write completes");
    let e = late_claim.await.unwrap().unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::StaleEpoch), "{e}");
    let new = hello.await.unwrap().expect("HELLO of epoch 2");
    new.claim().await.unwrap();
    new.write(0, pattern(2), 2 << 40 | 1).await.unwrap();
    assert_eq!(new.read(0, 4096).await.unwrap(), pattern(2));
}

/// A write admitted under epoch 1 that is still on its way to the store when an
/// engine of epoch 2 says HELLO (the replica adopts 2) lands before that HELLO is
/// answered, never after; a write of epoch 1 sent afterwards is refused. (Before,
/// the epoch was checked only at dispatch, so the held write landed after the raise.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_admitted_before_a_raise_lands_before_the_raise_is_answered() {
    let HeldWrite {
        _reg,
        vol,
        srv,
        old,
        held,
        release,
        ..
    } = hold_a_write().await;
    let mut hello = tokio::spawn(ReplicaDataClient::connect(srv.addr, "v", 2));
    let deadline = tokio::time::Instant::now() + NO_HANG;
    while vol.epoch.load(Ordering::SeqCst) != 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "epoch 2 never adopted"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The new engine's HELLO is not answered while the old write is still held.
    assert_still_waiting(
        &mut hello,
        "HELLO of epoch 2 was answered while a write of epoch 1 was still on its way",
    )
    .await;
    release.notify_one();
    held.await.unwrap().expect("the admitted write completes");
    let new = hello.await.unwrap().expect("HELLO of epoch 2");
    assert_eq!(new.info().epoch, 2);
    let e = old.write(0, pattern(2), 1 << 40 | 2).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::StaleEpoch), "{e}");
}

#[tokio::test]
async fn write_then_read_back_flush_and_trim() {
    let reg = FileBackedVolumes::new();
    let vol = reg.create("v1", 16, 1);
    let srv = start(&reg).await;
    let c = ReplicaDataClient::connect(srv.addr, "v1", 1).await.unwrap();
    let info = c.info();
    assert_eq!(
        (
            info.size,
            info.block_size,
            info.epoch,
            info.protocol_version
        ),
        (16 * BLOCK_SIZE, 4096, 1, PROTOCOL_VERSION)
    );

    let mut data = pattern(1);
    data.extend(pattern(2));
    c.write(BLOCK_SIZE, data.clone(), 1 << 40).await.unwrap();
    c.flush().await.unwrap();
    let back = c.read(0, 3 * BLOCK_SIZE as u32).await.unwrap();
    assert_eq!(&back[..4096], &[0u8; 4096][..]);
    assert_eq!(&back[4096..], &data[..]);

    // The bytes really are in the backing file.
    let mut on_disk = vec![0u8; 8192];
    vol.blocks
        .file
        .read_exact_at(&mut on_disk, BLOCK_SIZE)
        .unwrap();
    assert_eq!(on_disk, data);

    c.trim(BLOCK_SIZE, BLOCK_SIZE, (1 << 40) + 1).await.unwrap();
    let back = c.read(BLOCK_SIZE, 2 * BLOCK_SIZE as u32).await.unwrap();
    assert_eq!(&back[..4096], &[0u8; 4096][..]);
    assert_eq!(&back[4096..], &pattern(2)[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_pipelined_requests_on_one_connection() {
    thousand_pipelined_requests_on_one_connection_on(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_pipelined_requests_on_one_connection_on_shards() {
    thousand_pipelined_requests_on_one_connection_on(true).await;
}

async fn thousand_pipelined_requests_on_one_connection_on(sharded: bool) {
    let reg = FileBackedVolumes::new();
    let vol = reg.create("v", 1000, 1);
    let srv = start_either(&reg, sharded).await;
    let c = ReplicaDataClient::connect(srv.addr, "v", 1).await.unwrap();

    let writes: Vec<_> = (0..1000u64)
        .map(|b| {
            let c = c.clone();
            tokio::spawn(async move { c.write(b * BLOCK_SIZE, pattern(b), b).await })
        })
        .collect();
    for w in writes {
        w.await.unwrap().unwrap();
    }
    let reads: Vec<_> = (0..1000u64)
        .map(|b| {
            let c = c.clone();
            tokio::spawn(async move { (b, c.read(b * BLOCK_SIZE, BLOCK_SIZE as u32).await) })
        })
        .collect();
    for r in reads {
        let (b, data) = r.await.unwrap();
        assert_eq!(data.unwrap(), pattern(b), "block {b}");
    }
    let max = vol.blocks.max_active.load(Ordering::SeqCst);
    eprintln!("max concurrent store operations: {max}");
    assert!(max <= 256, "server exceeded its in-flight bound: {max}");
    assert!(!c.is_closed());
}

#[tokio::test]
async fn slow_request_is_overtaken_on_the_wire() {
    let reg = FileBackedVolumes::new();
    let vol = reg.create("v", 16, 2);
    vol.blocks
        .file
        .write_all_at(&pattern(6), 6 * BLOCK_SIZE)
        .unwrap();
    let (entered, release) = vol.blocks.set_gate(5 * BLOCK_SIZE);
    let srv = start(&reg).await;
    let (mut s, reply) = raw_connect(srv.addr, "v", 2, (1, 1)).await;
    assert_eq!(reply.header.status, 0);

    let mut batch = frame::encode(
        &request(Opcode::Read, 1, 2, 5 * BLOCK_SIZE, BLOCK_SIZE),
        &[],
    )
    .unwrap();
    batch.extend(
        frame::encode(
            &request(Opcode::Read, 2, 2, 6 * BLOCK_SIZE, BLOCK_SIZE),
            &[],
        )
        .unwrap(),
    );
    s.write_all(&batch).await.unwrap();
    entered.notified().await;

    // Request 1 is parked in the store, so request 2's reply must come first.
    let first = read_frame(&mut s).await.unwrap().unwrap();
    assert_eq!(first.header.request_id, 2);
    assert_eq!(first.header.opcode, Opcode::Read as u8 | RESPONSE_BIT);
    assert_eq!(first.payload, pattern(6));
    release.notify_one();
    let second = read_frame(&mut s).await.unwrap().unwrap();
    assert_eq!(second.header.request_id, 1);
    assert_eq!(second.header.status, 0);
    assert_eq!(second.payload, vec![0u8; 4096]);
}

#[tokio::test]
async fn client_completes_calls_out_of_order() {
    let reg = FileBackedVolumes::new();
    let vol = reg.create("v", 16, 1);
    let (entered, release) = vol.blocks.set_gate(5 * BLOCK_SIZE);
    let srv = start(&reg).await;
    let c = ReplicaDataClient::connect(srv.addr, "v", 1).await.unwrap();

    let c2 = c.clone();
    let slow = tokio::spawn(async move { c2.read(5 * BLOCK_SIZE, 4096).await });
    entered.notified().await;
    c.write(6 * BLOCK_SIZE, pattern(6), 1).await.unwrap();
    assert_eq!(c.read(6 * BLOCK_SIZE, 4096).await.unwrap(), pattern(6));
    assert!(!slow.is_finished(), "the gated read cannot have completed");
    release.notify_one();
    assert_eq!(slow.await.unwrap().unwrap(), vec![0u8; 4096]);
}

#[tokio::test]
async fn raised_epoch_fences_a_live_connection() {
    let reg = FileBackedVolumes::new();
    let vol = reg.create("v", 16, 5);
    let srv = start(&reg).await;
    let c = ReplicaDataClient::connect(srv.addr, "v", 5).await.unwrap();
    c.write(0, pattern(0), 5 << 40).await.unwrap();

    // The control plane raises the epoch while the connection stays open.
    vol.epoch.fetch_max(6, Ordering::SeqCst);
    assert_eq!(
        remote_code(c.write(0, pattern(9), (5 << 40) + 1).await),
        (ErrorCode::StaleEpoch, 6)
    );
    assert_eq!(remote_code(c.read(0, 4096).await).0, ErrorCode::StaleEpoch);
    assert_eq!(remote_code(c.flush().await).0, ErrorCode::StaleEpoch);
    assert!(!c.is_closed(), "STALE_EPOCH keeps the connection");

    // The fenced write changed nothing.
    let new = ReplicaDataClient::connect(srv.addr, "v", 6).await.unwrap();
    assert_eq!(new.read(0, 4096).await.unwrap(), pattern(0));
}

#[tokio::test]
async fn higher_epoch_at_hello_is_adopted_durably() {
    let reg = FileBackedVolumes::new();
    let vol = reg.create("v", 16, 3);
    let srv = start(&reg).await;
    let old = ReplicaDataClient::connect(srv.addr, "v", 3).await.unwrap();
    old.write(0, pattern(0), 3 << 40).await.unwrap();

    let new = ReplicaDataClient::connect(srv.addr, "v", 7).await.unwrap();
    assert_eq!(new.info().epoch, 7);
    assert_eq!(vol.epoch.load(Ordering::SeqCst), 7);
    assert_eq!(reg.durable_epoch("v"), 7);

    assert_eq!(
        remote_code(old.write(0, pattern(1), (3 << 40) + 1).await),
        (ErrorCode::StaleEpoch, 7)
    );
    match ReplicaDataClient::connect(srv.addr, "v", 3).await {
        Err(ClientError::Remote(e)) => assert_eq!((e.code, e.detail), (ErrorCode::StaleEpoch, 7)),
        other => panic!("expected STALE_EPOCH at HELLO, got {other:?}"),
    }
    new.write(0, pattern(2), 7 << 40).await.unwrap();
    assert_eq!(new.read(0, 4096).await.unwrap(), pattern(2));
}

#[tokio::test]
async fn range_and_alignment_errors_keep_the_connection() {
    let reg = FileBackedVolumes::new();
    reg.create("v", 16, 1);
    let srv = start(&reg).await;
    let c = ReplicaDataClient::connect(srv.addr, "v", 1).await.unwrap();
    let size = 16 * BLOCK_SIZE;

    assert_eq!(
        remote_code(c.read(size, 4096).await),
        (ErrorCode::OutOfRange, size)
    );
    assert_eq!(
        remote_code(c.write(size - 4096, vec![1u8; 8192], 1).await).0,
        ErrorCode::OutOfRange
    );
    assert_eq!(
        remote_code(c.trim(u64::MAX - 4095, 8192, 1).await).0,
        ErrorCode::OutOfRange,
        "offset + length overflowing u64 is out of range, not a wrap"
    );
    assert_eq!(remote_code(c.read(100, 4096).await).0, ErrorCode::Unaligned);
    assert_eq!(remote_code(c.read(0, 100).await).0, ErrorCode::Unaligned);
    assert_eq!(
        remote_code(c.write(4096, vec![1u8; 512], 1).await).0,
        ErrorCode::Unaligned
    );
    assert_eq!(remote_code(c.read(0, 0).await).0, ErrorCode::InvalidRequest);
    // Still usable afterwards.
    c.write(size - 4096, pattern(15), 2).await.unwrap();
    assert_eq!(c.read(size - 4096, 4096).await.unwrap(), pattern(15));
}

#[tokio::test]
async fn corrupt_block_is_reported_with_its_index() {
    let reg = FileBackedVolumes::new();
    let vol = reg.create("v", 16, 1);
    vol.blocks.corrupt.lock().unwrap().insert(9);
    let srv = start(&reg).await;
    let c = ReplicaDataClient::connect(srv.addr, "v", 1).await.unwrap();
    assert_eq!(
        remote_code(c.read(8 * BLOCK_SIZE, 4 * 4096).await),
        (ErrorCode::CorruptBlock, 9)
    );
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![0u8; 4096]);
}

#[tokio::test]
async fn unknown_volume_and_unsupported_version_are_refused() {
    let reg = FileBackedVolumes::new();
    reg.create("v", 16, 1);
    let srv = start(&reg).await;
    match ReplicaDataClient::connect(srv.addr, "nope", 1).await {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::UnknownVolume)),
        Ok(_) => panic!("connected to an unknown volume"),
    }

    let (mut s, reply) = raw_connect(srv.addr, "v", 1, (7, 9)).await;
    assert_eq!(reply.header.status, ErrorCode::UnsupportedVersion as u16);
    assert_eq!(
        decode_error_payload(&reply.payload).0,
        u64::from(PROTOCOL_VERSION),
        "detail is the replica's max version"
    );
    let mut rest = Vec::new();
    let n = tokio::time::timeout(NO_HANG, s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "connection closed after a refused HELLO");

    // A version range that includes ours is accepted at the highest both speak, and
    // an engine of version 1 still gets version 1.
    let (_s, ok) = raw_connect(srv.addr, "v", 1, (1, 9)).await;
    let r = HelloReply::decode(&ok.payload).unwrap();
    assert_eq!(
        (r.version, r.volume_size),
        (PROTOCOL_VERSION, 16 * BLOCK_SIZE)
    );
    let (_s, ok) = raw_connect(srv.addr, "v", 1, (1, 1)).await;
    assert_eq!(HelloReply::decode(&ok.payload).unwrap().version, 1);
}

#[tokio::test]
async fn corrupt_frame_gets_bad_frame_and_close_while_others_continue() {
    let reg = FileBackedVolumes::new();
    reg.create("v", 16, 1);
    let srv = start(&reg).await;
    let bystander = ReplicaDataClient::connect(srv.addr, "v", 1).await.unwrap();

    let (mut s, reply) = raw_connect(srv.addr, "v", 1, (1, 1)).await;
    assert_eq!(reply.header.status, 0);
    let mut h = request(Opcode::Write, 42, 1, 0, BLOCK_SIZE);
    h.seq = 1;
    let mut bytes = frame::encode(&h, &pattern(0)).unwrap();
    bytes[100] ^= 0x01; // one payload bit
    s.write_all(&bytes).await.unwrap();

    let answer = read_frame(&mut s).await.unwrap().unwrap();
    assert_eq!(answer.header.request_id, 42);
    assert_eq!(answer.header.status, ErrorCode::BadFrame as u16);
    let mut rest = Vec::new();
    let n = tokio::time::timeout(NO_HANG, s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "server closes after BAD_FRAME");

    // The corrupt write was not applied; other connections are unaffected.
    assert_eq!(bystander.read(0, 4096).await.unwrap(), vec![0u8; 4096]);
    let fresh = ReplicaDataClient::connect(srv.addr, "v", 1).await.unwrap();
    fresh.write(0, pattern(3), 2).await.unwrap();
    assert_eq!(bystander.read(0, 4096).await.unwrap(), pattern(3));
}

#[tokio::test]
async fn oversized_frame_is_refused_without_allocating() {
    let reg = FileBackedVolumes::new();
    reg.create("v", 16, 1);
    let srv = start(&reg).await;
    let (mut s, _) = raw_connect(srv.addr, "v", 1, (1, 1)).await;
    // Claims a 4 GiB frame; the server must answer from the prefix alone.
    let mut bytes = u32::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0u8; 44]);
    s.write_all(&bytes).await.unwrap();
    let answer = read_frame(&mut s).await.unwrap().unwrap();
    assert_eq!(answer.header.status, ErrorCode::BadFrame as u16);
    assert_eq!(answer.header.request_id, 0);
    let mut rest = Vec::new();
    assert_eq!(
        tokio::time::timeout(NO_HANG, s.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn server_dropped_mid_request_fails_calls_promptly() {
    server_dropped_mid_request_fails_calls_promptly_on(false).await;
}

#[tokio::test]
async fn server_dropped_mid_request_fails_calls_promptly_on_shards() {
    server_dropped_mid_request_fails_calls_promptly_on(true).await;
}

async fn server_dropped_mid_request_fails_calls_promptly_on(sharded: bool) {
    let reg = FileBackedVolumes::new();
    let vol = reg.create("v", 16, 1);
    let (entered, _release) = vol.blocks.set_gate(0);
    let srv = start_either(&reg, sharded).await;
    let c = ReplicaDataClient::connect(srv.addr, "v", 1).await.unwrap();
    let c2 = c.clone();
    let pending = tokio::spawn(async move { c2.read(0, 4096).await });
    entered.notified().await;

    srv.task.abort();
    let r = tokio::time::timeout(NO_HANG, pending)
        .await
        .expect("call hung")
        .unwrap();
    assert!(
        matches!(r, Err(ClientError::Disconnected { .. })),
        "got {r:?}"
    );
    assert!(c.is_closed());
    let later = tokio::time::timeout(NO_HANG, c.write(4096, pattern(1), 1))
        .await
        .expect("call after close hung");
    assert!(matches!(later, Err(ClientError::Disconnected { .. })));
}

#[tokio::test]
async fn shutdown_answers_in_flight_requests_then_returns() {
    shutdown_answers_in_flight_requests_then_returns_on(false).await;
}

#[tokio::test]
async fn shutdown_answers_in_flight_requests_then_returns_on_shards() {
    shutdown_answers_in_flight_requests_then_returns_on(true).await;
}

async fn shutdown_answers_in_flight_requests_then_returns_on(sharded: bool) {
    let reg = FileBackedVolumes::new();
    let vol = reg.create("v", 16, 1);
    vol.blocks
        .file
        .write_all_at(&pattern(2), 2 * BLOCK_SIZE)
        .unwrap();
    let (entered, release) = vol.blocks.set_gate(2 * BLOCK_SIZE);
    let mut srv = start_either(&reg, sharded).await;
    let c = ReplicaDataClient::connect(srv.addr, "v", 1).await.unwrap();
    let c2 = c.clone();
    let pending = tokio::spawn(async move { c2.read(2 * BLOCK_SIZE, 4096).await });
    entered.notified().await;

    srv.stop.take().unwrap().send(()).unwrap();
    release.notify_one();
    assert_eq!(pending.await.unwrap().unwrap(), pattern(2));
    tokio::time::timeout(NO_HANG, srv.task)
        .await
        .expect("serve did not return after shutdown")
        .unwrap();
    let after = tokio::time::timeout(NO_HANG, c.read(0, 4096))
        .await
        .unwrap();
    assert!(matches!(after, Err(ClientError::Disconnected { .. })));
}

#[tokio::test]
async fn request_timeout_fails_only_that_call() {
    let reg = FileBackedVolumes::new();
    let vol = reg.create("v", 16, 1);
    let (entered, release) = vol.blocks.set_gate(0);
    let srv = start(&reg).await;
    let cfg = tessera_replica_protocol::data::ClientConfig {
        request_timeout: Some(Duration::from_millis(200)),
        ..Default::default()
    };
    let c = ReplicaDataClient::connect_with(srv.addr, "v", 1, cfg)
        .await
        .unwrap();
    let r = c.read(0, 4096).await;
    assert!(matches!(r, Err(ClientError::Timeout)), "got {r:?}");
    entered.notified().await;
    release.notify_one();
    // The late reply is discarded; the connection keeps working.
    assert_eq!(c.read(4096, 4096).await.unwrap(), vec![0u8; 4096]);
    assert!(!c.is_closed());
}

/// Sends one request frame on a raw connection and reads the reply.
async fn raw_call(s: &mut TcpStream, h: Header, payload: &[u8]) -> frame::Frame {
    s.write_all(&frame::encode(&h, payload).unwrap())
        .await
        .unwrap();
    tokio::time::timeout(NO_HANG, read_frame(s))
        .await
        .expect("a reply")
        .unwrap()
        .expect("the connection stays open")
}

/// IF_NEWER (flags bit 1) is a version-3 flag of WRITE and TRIM only: on a
/// connection that negotiated version 2, and on every other opcode, it is refused
/// with INVALID_REQUEST before anything is marked or written, and the connection
/// keeps working; on version 3 a conditional WRITE or TRIM answers OK with the
/// number of blocks applied (u64).
#[tokio::test]
async fn if_newer_is_refused_where_undefined_and_answers_blocks_applied() {
    let reg = FileBackedVolumes::new();
    let vol = reg.create("v", 16, 1);
    let srv = start(&reg).await;
    let seq = |n: u64| 1 << 40 | n;
    let invalid = ErrorCode::InvalidRequest as u16;

    let (mut v2, ok) = raw_connect(srv.addr, "v", 1, (1, 2)).await;
    assert_eq!(HelloReply::decode(&ok.payload).unwrap().version, 2);
    let w = Header {
        flags: FLAG_IF_NEWER,
        seq: seq(1),
        ..request(Opcode::Write, 1, 1, 0, BLOCK_SIZE)
    };
    let r = raw_call(&mut v2, w, &pattern(0)).await;
    assert_eq!((r.header.request_id, r.header.status), (1, invalid));
    let t = Header {
        flags: FLAG_IF_NEWER,
        seq: seq(2),
        ..request(Opcode::Trim, 2, 1, 0, BLOCK_SIZE)
    };
    let r = raw_call(&mut v2, t, &[]).await;
    assert_eq!((r.header.request_id, r.header.status), (2, invalid));
    assert_eq!(
        vol.sync.dirty.snapshot().count(),
        0,
        "a refusal marks nothing"
    );
    let r = raw_call(&mut v2, request(Opcode::Read, 3, 1, 0, BLOCK_SIZE), &[]).await;
    assert_eq!((r.header.status, r.payload), (0, vec![0u8; 4096]));
    let plain = Header {
        seq: seq(3),
        ..request(Opcode::Write, 4, 1, 0, BLOCK_SIZE)
    };
    let r = raw_call(&mut v2, plain, &pattern(0)).await;
    assert_eq!((r.header.status, r.payload.len()), (0, 0));
    let r = raw_call(&mut v2, request(Opcode::Read, 5, 1, 0, BLOCK_SIZE), &[]).await;
    assert_eq!((r.header.status, r.payload), (0, pattern(0)));
    let r = raw_call(&mut v2, request(Opcode::DirtyRegions, 6, 1, 0, 0), &[]).await;
    assert_eq!(r.header.status, 0);

    let (mut v3, ok) = raw_connect(srv.addr, "v", 1, (1, 3)).await;
    assert_eq!(HelloReply::decode(&ok.payload).unwrap().version, 3);
    for (i, (op, len)) in [
        (Opcode::Read, BLOCK_SIZE),
        (Opcode::Flush, 0),
        (Opcode::Versions, BLOCK_SIZE),
        (Opcode::DirtyRegions, 0),
        (Opcode::GetMembership, 0),
        (Opcode::SetMembership, 0),
        (Opcode::MarkClean, 0),
        (Opcode::Clean, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let h = Header {
            flags: FLAG_IF_NEWER,
            ..request(op, 10 + i as u64, 1, 0, len)
        };
        let r = raw_call(&mut v3, h, &[]).await;
        assert_eq!(r.header.status, invalid, "{op:?} with IF_NEWER");
    }
    let both = Header {
        flags: FLAG_IF_NEWER | FLAG_WITH_DATA,
        ..w
    };
    assert_eq!(
        raw_call(&mut v3, both, &pattern(0)).await.header.status,
        invalid
    );
    // Defined on version 3: OK, and the payload counts the blocks applied (this
    // backend keeps no versions, so every block is applied).
    let r = raw_call(&mut v3, Header { seq: seq(7), ..w }, &pattern(5)).await;
    assert_eq!(
        (r.header.status, r.payload),
        (0, 1u64.to_le_bytes().to_vec())
    );
    assert_eq!(r.header.opcode, Opcode::Write as u8 | RESPONSE_BIT);
    let t3 = Header {
        length: 3 * BLOCK_SIZE,
        seq: seq(8),
        ..t
    };
    let r = raw_call(&mut v3, t3, &[]).await;
    assert_eq!(
        (r.header.status, r.payload),
        (0, 3u64.to_le_bytes().to_vec())
    );
    let r = raw_call(&mut v3, request(Opcode::Read, 20, 1, 0, BLOCK_SIZE), &[]).await;
    assert_eq!(r.payload, vec![0u8; 4096]);
    assert_eq!(
        vol.sync.dirty.snapshot().count(),
        1,
        "marked before applied"
    );

    // The client: a version-2 engine is never offered the flag, a version-3 one is.
    let old = ReplicaDataClient::connect_with(
        srv.addr,
        "v",
        1,
        ClientConfig {
            max_protocol_version: 2,
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(old.info().protocol_version, 2);
    assert!(old.supports_sync() && !old.supports_if_newer());
    assert!(matches!(
        old.write_if_newer(0, pattern(0), seq(9)).await,
        Err(ClientError::InvalidArgument(_))
    ));
    assert!(matches!(
        old.trim_if_newer(0, BLOCK_SIZE, seq(9)).await,
        Err(ClientError::InvalidArgument(_))
    ));
    old.write(BLOCK_SIZE, pattern(1), seq(10)).await.unwrap();
    assert_eq!(old.read(BLOCK_SIZE, 4096).await.unwrap(), pattern(1));
    let c = ReplicaDataClient::connect(srv.addr, "v", 1).await.unwrap();
    assert!(c.supports_if_newer());
    let two = [pattern(2), pattern(3)].concat();
    assert_eq!(
        c.write_if_newer(2 * BLOCK_SIZE, two.clone(), seq(11))
            .await
            .unwrap(),
        2
    );
    assert_eq!(c.read(2 * BLOCK_SIZE, 8192).await.unwrap(), two);
    assert_eq!(
        c.trim_if_newer(2 * BLOCK_SIZE, BLOCK_SIZE, seq(12))
            .await
            .unwrap(),
        1
    );
    let e = c.write_if_newer(1, pattern(0), seq(13)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unaligned), "{e}");
}

/// REPLICA_SET is a version-4 request: on a connection that negotiated 3 it is
/// INVALID_REQUEST and the connection goes on; a registry that keeps no volume
/// records (this one) answers INVALID_REQUEST on version 4 too, which the client
/// reports as the replica's error, not as a broken connection.
#[tokio::test]
async fn replica_set_is_refused_before_version_4_and_where_no_record_is_kept() {
    let reg = FileBackedVolumes::new();
    reg.create("v", 16, 1);
    let srv = start(&reg).await;
    let invalid = ErrorCode::InvalidRequest as u16;
    let (mut v3, _) = raw_connect(srv.addr, "v", 1, (1, 3)).await;
    let r = raw_call(&mut v3, request(Opcode::ReplicaSet, 1, 1, 0, 0), &[]).await;
    assert_eq!((r.header.request_id, r.header.status), (1, invalid));
    let r = raw_call(&mut v3, request(Opcode::Read, 2, 1, 0, BLOCK_SIZE), &[]).await;
    assert_eq!(r.header.status, 0, "the connection keeps working");

    let c = ReplicaDataClient::connect(srv.addr, "v", 1).await.unwrap();
    assert_eq!(c.info().protocol_version, PROTOCOL_VERSION);
    assert!(c.supports_replica_set());
    assert_eq!(
        c.replica_set().await.unwrap_err().code(),
        Some(ErrorCode::InvalidRequest)
    );
    assert!(!c.is_closed());
}

/// A replica that answers REPLICA_SET with a body that does not decode (here: one
/// byte short) is a protocol error for that call, never a set the engine acts on.
#[tokio::test]
async fn a_malformed_replica_set_reply_is_a_protocol_error() {
    use tessera_replica_protocol::data::ReplicaSet;
    use tessera_replica_protocol::publish_context::ReplicaEndpoint;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let good = ReplicaSet {
        generation: 3,
        members: vec![ReplicaEndpoint {
            node_id: "a".into(),
            data_address: "h:1".into(),
        }],
    }
    .encode()
    .unwrap();
    let bodies = vec![good.clone(), good[..good.len() - 1].to_vec()];
    let fake = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let hello = read_frame(&mut s).await.unwrap().unwrap();
        let reply = HelloReply {
            version: PROTOCOL_VERSION,
            block_size: BLOCK_SIZE as u32,
            volume_size: 16 * BLOCK_SIZE,
        };
        let h = Header {
            opcode: Opcode::Hello as u8 | RESPONSE_BIT,
            epoch: hello.header.epoch,
            ..Header::default()
        };
        s.write_all(&frame::encode(&h, &reply.encode()).unwrap())
            .await
            .unwrap();
        for body in bodies {
            let req = read_frame(&mut s).await.unwrap().unwrap();
            assert_eq!(req.header.opcode, Opcode::ReplicaSet as u8);
            let h = Header {
                opcode: req.header.opcode | RESPONSE_BIT,
                length: body.len() as u64,
                ..req.header
            };
            s.write_all(&frame::encode(&h, &body).unwrap())
                .await
                .unwrap();
        }
        s
    });
    let c = ReplicaDataClient::connect(addr, "v", 1).await.unwrap();
    let set = c.replica_set().await.unwrap();
    assert_eq!((set.generation, set.members.len()), (3, 1));
    match c.replica_set().await {
        Err(ClientError::Protocol(m)) => assert!(m.contains("truncated"), "{m}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    drop(tokio::time::timeout(NO_HANG, fake).await.unwrap().unwrap());
}
