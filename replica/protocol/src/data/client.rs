//! The engine's side of the data plane: one pipelined connection to one replica for
//! one volume.
//!
//! Calls from many tasks share the connection. Each call registers a oneshot under a
//! fresh request id and queues its frame to a writer task; one reader task routes
//! replies by id. When the connection breaks, every pending call fails at once with
//! [`ClientError::Disconnected`] and later calls fail immediately: nothing ever waits
//! for a reply that can no longer come. The client does not reconnect by itself;
//! the engine decides (new epoch? replica down?) and connects again.
//!
//! The writer sends frames in batches, one flush (one `send`) per batch. Before
//! flushing it yields to the runtime once and takes what was queued meanwhile: on
//! the loaded 2-core machines this project targets, a `send` on loopback TCP costs more
//! than the rest of a 4 KiB request's processing (the kernel delivers the segment to
//! the peer inside the call), and without the yield the writer, woken by the first
//! request of a burst, flushed after every one or two requests. The yield is a task
//! switch inside the runtime; at queue depth 1 it finds nothing and costs well under
//! a microsecond.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tessera_tls::transport::{ReadHalf, WriteHalf};
use tessera_tls::Transport;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::error::{ClientError, ErrorCode, RemoteError};
use super::frame::{Frame, Header, Opcode, MAX_PAYLOAD, RESPONSE_BIT};
use super::message::{
    decode_error_payload, decode_versions, Hello, HelloReply, CLAIM_PROTOCOL_VERSION,
    FLAG_IF_NEWER, FLAG_WITH_DATA, IF_NEWER_PROTOCOL_VERSION, MAX_VERSIONS_LEN,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, REPLICA_SET_PROTOCOL_VERSION, SYNC_PROTOCOL_VERSION,
};
use super::replica_set::ReplicaSet;
use super::stream::{read_frame, write_frame, write_frame_with_payload_crc, ReadError};
use crate::block::VersionedBlocks;
use crate::sync::{DirtyMap, Membership};

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Bound on TCP connect plus HELLO round trip.
    pub connect_timeout: Duration,
    /// Per-call bound on waiting for a reply; `None` waits until the reply or the
    /// connection's end (which always comes: a dead connection fails every call).
    pub request_timeout: Option<Duration>,
    /// Frames queued for the writer before callers wait (backpressure on callers).
    pub max_queued: usize,
    /// Highest protocol version offered at HELLO: [`PROTOCOL_VERSION`] unless a test
    /// plays an older engine.
    pub max_protocol_version: u16,
    /// TLS with the process's certificate, or plain text. The default is plain text,
    /// for servers a test runs in-process; every binary sets the transport its
    /// flags chose.
    pub transport: Transport,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(5),
            request_timeout: None,
            max_queued: 1024,
            max_protocol_version: PROTOCOL_VERSION,
            transport: Transport::plaintext(),
        }
    }
}

/// What the replica reported at handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Protocol version in use.
    pub protocol_version: u16,
    /// Volume size in bytes at handshake time.
    pub size: u64,
    /// Block size; offsets and lengths must be multiples of it.
    pub block_size: u32,
    /// The replica's epoch after the handshake (equal to the client's).
    pub epoch: u64,
}

type ReplyTx = oneshot::Sender<Result<Frame, ClientError>>;

struct Pending {
    calls: HashMap<u64, ReplyTx>,
    /// Set once the connection is dead; new calls fail with it.
    closed: Option<String>,
}

struct Shared {
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    epoch: u64,
    tx: mpsc::Sender<(Header, WritePayload)>,
    config: ClientConfig,
    info: VolumeInfo,
    /// Flipped to true by [`Shared::fail_all`]; stops the writer even if it is
    /// blocked on a socket nobody reads any more.
    closed_signal: watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A poisoned lock only means another caller panicked while holding it; the
        // map itself is still consistent (every operation on it is a single call).
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection dead and fails every pending call.
    fn fail_all(&self, reason: String) {
        let calls = {
            let mut p = self.lock();
            if p.closed.is_none() {
                p.closed = Some(reason.clone());
            }
            std::mem::take(&mut p.calls)
        };
        self.closed_signal.send_replace(true);
        for (_, tx) in calls {
            let _ = tx.send(Err(ClientError::Disconnected {
                reason: reason.clone(),
            }));
        }
    }
}

/// Aborts the connection's tasks (closing the socket) when the last client clone drops.
struct Tasks {
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// A write's data with its crc32c, computed once: an engine sends the same payload to
/// every replica, and each frame's trailer is derived from this crc instead of
/// checksumming the payload again per replica. Cloning shares the buffer.
#[derive(Debug, Clone)]
pub struct WritePayload {
    data: Bytes,
    crc: u32,
}

impl WritePayload {
    /// Checksums `data` (the one pass over it on the sending side).
    pub fn new(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        let crc = crc32c::crc32c(&data);
        WritePayload { data, crc }
    }

    fn empty() -> Self {
        WritePayload {
            data: Bytes::new(),
            crc: 0,
        }
    }

    /// The data.
    pub fn data(&self) -> &Bytes {
        &self.data
    }
}

/// A pipelined data-plane connection to one replica of one volume.
///
/// Cheap to clone; clones share the connection. All methods may be called
/// concurrently from many tasks; replies are matched by request id, so a slow request
/// does not hold up others.
#[derive(Clone)]
pub struct ReplicaDataClient {
    shared: Arc<Shared>,
    _tasks: Arc<Tasks>,
}

impl std::fmt::Debug for ReplicaDataClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaDataClient")
            .field("info", &self.shared.info)
            .finish_non_exhaustive()
    }
}

/// Removes a call's pending entry if the call is abandoned (timeout, dropped future)
/// before its reply arrives, so the map cannot grow with dead entries.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
    armed: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.lock().calls.remove(&self.id);
        }
    }
}

impl ReplicaDataClient {
    /// Connects to the replica at `addr` for `volume_id` as an engine of `epoch`, with
    /// default settings. Fails with the replica's error code if it refuses (unknown
    /// volume, stale epoch, unsupported version).
    pub async fn connect(
        addr: impl ToSocketAddrs,
        volume_id: &str,
        epoch: u64,
    ) -> Result<Self, ClientError> {
        Self::connect_with(addr, volume_id, epoch, ClientConfig::default()).await
    }

    /// [`Self::connect`] with explicit settings.
    pub async fn connect_with(
        addr: impl ToSocketAddrs,
        volume_id: &str,
        epoch: u64,
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        tokio::time::timeout(config.connect_timeout, async {
            let socket = TcpStream::connect(addr)
                .await
                .map_err(ClientError::Connect)?;
            let stream = config
                .transport
                .connect(socket)
                .await
                .map_err(ClientError::Connect)?;
            let (rd, wr) = stream.split();
            let mut rd = BufReader::with_capacity(64 * 1024, rd);
            let mut wr = BufWriter::with_capacity(64 * 1024, wr);
            let info = handshake(
                &mut rd,
                &mut wr,
                volume_id,
                epoch,
                config.max_protocol_version,
            )
            .await?;
            Ok(Self::start(rd, wr, epoch, info, config.clone()))
        })
        .await
        .map_err(|_| ClientError::HandshakeTimeout)?
    }

    fn start(
        rd: BufReader<ReadHalf>,
        wr: BufWriter<WriteHalf>,
        epoch: u64,
        info: VolumeInfo,
        config: ClientConfig,
    ) -> Self {
        let (tx, rx) = mpsc::channel(config.max_queued.max(1));
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                calls: HashMap::new(),
                closed: None,
            }),
            next_id: AtomicU64::new(1),
            epoch,
            tx,
            config,
            info,
            closed_signal: watch::Sender::new(false),
        });
        let reader = tokio::spawn(reader_task(rd, Arc::clone(&shared)));
        let writer = tokio::spawn(writer_task(wr, rx, Arc::clone(&shared)));
        ReplicaDataClient {
            shared,
            _tasks: Arc::new(Tasks { reader, writer }),
        }
    }

    /// What the replica reported at handshake.
    pub fn info(&self) -> VolumeInfo {
        self.shared.info
    }

    /// Whether the connection has ended; every call will fail if so.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed.is_some()
    }

    /// Reads `len` bytes at `offset` (both multiples of the block size).
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        if len as usize > MAX_PAYLOAD {
            return Err(ClientError::InvalidArgument(format!(
                "read of {len} bytes exceeds the {MAX_PAYLOAD}-byte frame limit"
            )));
        }
        let reply = self
            .call(
                Opcode::Read,
                0,
                offset,
                u64::from(len),
                0,
                WritePayload::empty(),
            )
            .await?;
        if reply.payload.len() != len as usize {
            return Err(ClientError::Protocol(format!(
                "{}-byte reply to a {len}-byte read",
                reply.payload.len()
            )));
        }
        Ok(reply.payload)
    }

    /// Writes `data` at `offset` tagged with `seq`. Takes [`Bytes`] so an engine can
    /// send one buffer to every replica without copying it.
    pub async fn write(
        &self,
        offset: u64,
        data: impl Into<Bytes>,
        seq: u64,
    ) -> Result<(), ClientError> {
        self.write_payload(offset, &WritePayload::new(data), seq)
            .await
    }

    /// [`Self::write`] of a payload checksummed once for all the replicas it goes to.
    pub async fn write_payload(
        &self,
        offset: u64,
        payload: &WritePayload,
        seq: u64,
    ) -> Result<(), ClientError> {
        let len = payload.data.len();
        if len > MAX_PAYLOAD {
            return Err(ClientError::InvalidArgument(format!(
                "write of {len} bytes exceeds the {MAX_PAYLOAD}-byte frame limit"
            )));
        }
        self.call(Opcode::Write, 0, offset, len as u64, seq, payload.clone())
            .await
            .map(drop)
    }

    /// Makes every write this replica acknowledged before the call durable.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.call(Opcode::Flush, 0, 0, 0, 0, WritePayload::empty())
            .await
            .map(drop)
    }

    /// Discards `len` bytes at `offset` (they read as zeros afterwards), tagged with `seq`.
    pub async fn trim(&self, offset: u64, len: u64, seq: u64) -> Result<(), ClientError> {
        self.call(Opcode::Trim, 0, offset, len, seq, WritePayload::empty())
            .await
            .map(drop)
    }

    /// Whether the replica speaks the sync requests (protocol version 2).
    pub fn supports_sync(&self) -> bool {
        self.shared.info.protocol_version >= SYNC_PROTOCOL_VERSION
    }

    /// Whether the replica takes conditional writes and trims
    /// ([`Self::write_if_newer`], [`Self::trim_if_newer`]; protocol version 3).
    pub fn supports_if_newer(&self) -> bool {
        self.shared.info.protocol_version >= IF_NEWER_PROTOCOL_VERSION
    }

    /// Writes each block of `data` at `offset` only where the replica's current
    /// version of that block has a lower seq than `seq` (a corrupt or unwritten block
    /// counts as 0; an equal seq is left alone): a resync copy that never overwrites
    /// a newer live write. Returns the number of blocks written. Needs
    /// [`Self::supports_if_newer`]; refused locally otherwise.
    pub async fn write_if_newer(
        &self,
        offset: u64,
        data: impl Into<Bytes>,
        seq: u64,
    ) -> Result<u64, ClientError> {
        self.require_if_newer()?;
        let payload = WritePayload::new(data);
        let len = payload.data.len();
        if len > MAX_PAYLOAD {
            return Err(ClientError::InvalidArgument(format!(
                "write of {len} bytes exceeds the {MAX_PAYLOAD}-byte frame limit"
            )));
        }
        let reply = self
            .call(
                Opcode::Write,
                FLAG_IF_NEWER,
                offset,
                len as u64,
                seq,
                payload,
            )
            .await?;
        u64_reply(&reply.payload)
    }

    /// Trims each block of `len` bytes at `offset` only where the replica's current
    /// version of that block has a lower seq than `seq` (as [`Self::write_if_newer`]);
    /// a trimmed block keeps `seq`. Returns the number of blocks trimmed.
    pub async fn trim_if_newer(&self, offset: u64, len: u64, seq: u64) -> Result<u64, ClientError> {
        self.require_if_newer()?;
        let reply = self
            .call(
                Opcode::Trim,
                FLAG_IF_NEWER,
                offset,
                len,
                seq,
                WritePayload::empty(),
            )
            .await?;
        u64_reply(&reply.payload)
    }

    /// Whether the replica answers [`Self::replica_set`] (protocol version 4).
    pub fn supports_replica_set(&self) -> bool {
        self.shared.info.protocol_version >= REPLICA_SET_PROTOCOL_VERSION
    }

    /// The replica set and generation of the volume record this replica holds.
    /// Needs [`Self::supports_replica_set`]; refused locally otherwise.
    pub async fn replica_set(&self) -> Result<ReplicaSet, ClientError> {
        if !self.supports_replica_set() {
            return Err(ClientError::InvalidArgument(format!(
                "the replica speaks protocol version {}; REPLICA_SET needs {REPLICA_SET_PROTOCOL_VERSION}",
                self.shared.info.protocol_version
            )));
        }
        let reply = self
            .call(Opcode::ReplicaSet, 0, 0, 0, 0, WritePayload::empty())
            .await?;
        ReplicaSet::decode(&reply.payload).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Whether the replica understands CLAIM (protocol version 5 or later).
    pub fn supports_claim(&self) -> bool {
        self.shared.info.protocol_version >= CLAIM_PROTOCOL_VERSION
    }

    /// Makes this connection the volume's writer on the replica: once this returns,
    /// every write and trim that arrived on the volume's earlier connections has
    /// been applied, and later ones from them are refused (`SUPERSEDED`). An engine
    /// claims each connection it opens before it reads or copies anything, so
    /// nothing left in an abandoned connection (a partition's retransmissions, a
    /// queue in the replica) can land after its catch-up. Needs
    /// [`Self::supports_claim`]; refused locally otherwise.
    pub async fn claim(&self) -> Result<(), ClientError> {
        if !self.supports_claim() {
            return Err(ClientError::InvalidArgument(format!(
                "the replica speaks protocol version {}; CLAIM needs {CLAIM_PROTOCOL_VERSION}",
                self.shared.info.protocol_version
            )));
        }
        self.call(Opcode::Claim, 0, 0, 0, 0, WritePayload::empty())
            .await?;
        Ok(())
    }

    fn require_if_newer(&self) -> Result<(), ClientError> {
        if self.supports_if_newer() {
            return Ok(());
        }
        Err(ClientError::InvalidArgument(format!(
            "the replica speaks protocol version {}; conditional writes need {IF_NEWER_PROTOCOL_VERSION}",
            self.shared.info.protocol_version
        )))
    }

    /// The versions of the blocks of `len` bytes at `offset` (at most
    /// [`MAX_VERSIONS_LEN`]), with the verified data of intact data blocks when
    /// `with_data`.
    pub async fn versions(
        &self,
        offset: u64,
        len: u64,
        with_data: bool,
    ) -> Result<VersionedBlocks, ClientError> {
        if len > MAX_VERSIONS_LEN {
            return Err(ClientError::InvalidArgument(format!(
                "versions of {len} bytes exceed the {MAX_VERSIONS_LEN}-byte limit"
            )));
        }
        let flags = if with_data { FLAG_WITH_DATA } else { 0 };
        let reply = self
            .call(
                Opcode::Versions,
                flags,
                offset,
                len,
                0,
                WritePayload::empty(),
            )
            .await?;
        decode_versions(offset, len, with_data, &reply.payload)
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// The replica's dirty-region map of the volume.
    pub async fn dirty_regions(&self) -> Result<DirtyMap, ClientError> {
        let reply = self
            .call(Opcode::DirtyRegions, 0, 0, 0, 0, WritePayload::empty())
            .await?;
        DirtyMap::decode(&reply.payload)
            .ok_or_else(|| ClientError::Protocol("malformed dirty-region map".into()))
    }

    /// The replica's in-sync record of the volume.
    pub async fn membership(&self) -> Result<Membership, ClientError> {
        let reply = self
            .call(Opcode::GetMembership, 0, 0, 0, 0, WritePayload::empty())
            .await?;
        Membership::decode(&reply.payload).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Stores `m` (whose epoch must be this connection's) if it is newer than the
    /// replica's record; returns the record the replica holds afterwards.
    pub async fn set_membership(&self, m: &Membership) -> Result<Membership, ClientError> {
        let reply = self
            .call(
                Opcode::SetMembership,
                0,
                0,
                0,
                0,
                WritePayload::new(m.encode()),
            )
            .await?;
        Membership::decode(&reply.payload).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Starts a cleaning of the dirty regions; the token covers every write the
    /// replica marked before it.
    pub async fn mark_clean(&self) -> Result<u64, ClientError> {
        let reply = self
            .call(Opcode::MarkClean, 0, 0, 0, 0, WritePayload::empty())
            .await?;
        u64_reply(&reply.payload)
    }

    /// Clears the dirty regions `token` covers; returns how many were cleared. Only
    /// once every replica holds the covered writes durably.
    pub async fn clean(&self, token: u64) -> Result<u64, ClientError> {
        let reply = self
            .call(Opcode::Clean, 0, 0, 0, token, WritePayload::empty())
            .await?;
        u64_reply(&reply.payload)
    }

    async fn call(
        &self,
        op: Opcode,
        flags: u8,
        offset: u64,
        length: u64,
        seq: u64,
        payload: WritePayload,
    ) -> Result<Frame, ClientError> {
        let shared = &*self.shared;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, mut reply_rx) = oneshot::channel();
        {
            let mut p = shared.lock();
            if let Some(reason) = &p.closed {
                return Err(ClientError::Disconnected {
                    reason: reason.clone(),
                });
            }
            p.calls.insert(id, reply_tx);
        }
        let mut guard = PendingGuard {
            shared,
            id,
            armed: true,
        };
        let header = Header {
            opcode: op as u8,
            flags,
            status: 0,
            request_id: id,
            epoch: shared.epoch,
            offset,
            length,
            seq,
        };
        // While waiting for queue space, also watch for the reply: if the connection
        // dies meanwhile, fail_all answers us and we must not keep waiting on the queue.
        tokio::select! {
            sent = shared.tx.send((header, payload)) => {
                if sent.is_err() {
                    return Err(ClientError::Disconnected {
                        reason: "writer task ended".into(),
                    });
                }
            }
            early = &mut reply_rx => {
                guard.armed = false;
                return match early {
                    Ok(r) => r.and(Err(ClientError::Protocol("reply before request was sent".into()))),
                    Err(_) => Err(ClientError::Disconnected { reason: "connection tasks ended".into() }),
                };
            }
        }
        let reply = match shared.config.request_timeout {
            Some(d) => tokio::time::timeout(d, reply_rx)
                .await
                .map_err(|_| ClientError::Timeout)?,
            None => reply_rx.await,
        };
        // The reader removed the entry when it answered (or fail_all took it).
        guard.armed = false;
        match reply {
            Ok(r) => r,
            Err(_) => Err(ClientError::Disconnected {
                reason: "connection tasks ended".into(),
            }),
        }
    }
}

fn u64_reply(p: &[u8]) -> Result<u64, ClientError> {
    p.try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| ClientError::Protocol(format!("{}-byte reply, expected 8", p.len())))
}

async fn handshake(
    rd: &mut BufReader<ReadHalf>,
    wr: &mut BufWriter<WriteHalf>,
    volume_id: &str,
    epoch: u64,
    max_version: u16,
) -> Result<VolumeInfo, ClientError> {
    let hello = Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version,
        volume_id: volume_id.to_owned(),
    };
    let header = Header {
        opcode: Opcode::Hello as u8,
        epoch,
        ..Header::default()
    };
    write_frame(wr, &header, &hello.encode())
        .await
        .map_err(ClientError::Connect)?;
    wr.flush().await.map_err(ClientError::Connect)?;
    let reply = match read_frame(rd).await {
        Ok(Some(f)) => f,
        Ok(None) => {
            return Err(ClientError::Disconnected {
                reason: "replica closed the connection during the handshake".into(),
            })
        }
        Err(ReadError::Io(e)) => return Err(ClientError::Connect(e)),
        Err(ReadError::Frame(e)) => return Err(ClientError::Frame(e)),
    };
    if reply.header.opcode != Opcode::Hello as u8 | RESPONSE_BIT {
        return Err(ClientError::Protocol(format!(
            "handshake answered with opcode {:#04x}",
            reply.header.opcode
        )));
    }
    if reply.header.status != 0 {
        return Err(remote_error(&reply).into_client_error());
    }
    let r = HelloReply::decode(&reply.payload)
        .ok_or_else(|| ClientError::Protocol("malformed HELLO reply".into()))?;
    Ok(VolumeInfo {
        protocol_version: r.version,
        size: r.volume_size,
        block_size: r.block_size,
        epoch: reply.header.epoch,
    })
}

/// An error reply decoded, or a protocol violation if its code is unknown.
enum Decoded {
    Remote(RemoteError),
    Unknown(u16),
}

impl Decoded {
    fn into_client_error(self) -> ClientError {
        match self {
            Decoded::Remote(r) => ClientError::Remote(r),
            Decoded::Unknown(c) => ClientError::Protocol(format!("unknown error code {c}")),
        }
    }
}

fn remote_error(f: &Frame) -> Decoded {
    let (detail, message) = decode_error_payload(&f.payload);
    match ErrorCode::from_u16(f.header.status) {
        Some(code) => Decoded::Remote(RemoteError {
            code,
            detail,
            message,
        }),
        None => Decoded::Unknown(f.header.status),
    }
}

async fn reader_task(mut rd: BufReader<ReadHalf>, shared: Arc<Shared>) {
    let reason = loop {
        let frame = match read_frame(&mut rd).await {
            Ok(Some(f)) => f,
            Ok(None) => break "replica closed the connection".to_owned(),
            Err(ReadError::Io(e)) => break format!("reading from the replica failed: {e}"),
            Err(ReadError::Frame(e)) => break format!("corrupt frame from the replica: {e}"),
        };
        let tx = shared.lock().calls.remove(&frame.header.request_id);
        let result = if frame.header.status == 0 {
            Ok(frame)
        } else {
            Err(remote_error(&frame).into_client_error())
        };
        match tx {
            Some(tx) => {
                let _ = tx.send(result);
            }
            None => {
                // A reply to a call that timed out or was dropped, or BAD_FRAME for a
                // request id we never sent (the server closes after it anyway).
                tracing::debug!(
                    request_id = frame_id(&result),
                    "data plane client: reply without a waiting call"
                );
            }
        }
    };
    shared.fail_all(reason);
}

fn frame_id(r: &Result<Frame, ClientError>) -> u64 {
    r.as_ref().map(|f| f.header.request_id).unwrap_or(0)
}

async fn writer_task(
    mut wr: BufWriter<WriteHalf>,
    mut rx: mpsc::Receiver<(Header, WritePayload)>,
    shared: Arc<Shared>,
) {
    let mut closed = shared.closed_signal.subscribe();
    let work = async {
        while let Some((h, p)) = rx.recv().await {
            write_frame_with_payload_crc(&mut wr, &h, &p.data, p.crc).await?;
            // Batch whatever else is ready into the same flush: drain the queue, yield
            // once so that tasks already runnable (other requests being issued right
            // now) can queue theirs, and drain again. See the module doc.
            for round in 0..2 {
                if round == 1 {
                    tokio::task::yield_now().await;
                }
                while let Ok((h, p)) = rx.try_recv() {
                    write_frame_with_payload_crc(&mut wr, &h, &p.data, p.crc).await?;
                }
            }
            wr.flush().await?;
        }
        std::io::Result::Ok(())
    };
    tokio::select! {
        r = work => {
            if let Err(e) = r {
                shared.fail_all(format!("writing to the replica failed: {e}"));
            }
        }
        _ = closed.wait_for(|c| *c) => {}
    }
    // Dropping `rx` makes queued and future sends fail instead of waiting; dropping
    // `wr` half-closes the socket (no flush: the peer may not be reading).
    drop(rx);
    drop(wr);
}
