//! The data-plane server: accepts engine connections and executes their requests
//! against a [`VolumeRegistry`].
//!
//! Per connection: one reader loop that parses frames and spawns one task per request,
//! and one writer that sends responses in completion order, batching whatever is ready
//! into one flush. Memory is bounded per connection by two semaphores (requests in
//! flight, payload bytes in flight) whose permits are held until the response has been
//! written, so a client that sends without reading stalls only itself.
//!
//! Dropping the [`serve`] future aborts every connection and request task and closes
//! every socket (they live in `JoinSet`s it owns); resolving the shutdown future instead
//! stops accepting, lets each connection finish the requests it has read, and returns
//! once all are answered.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_telemetry::{Op, VolumeLatency};
use tessera_tls::transport::{ReadHalf, WriteHalf};
use tessera_tls::{Identity, Refusal, Transport};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::block_io::{BlockIoError, OpenVolume, VolumeBlocks, VolumeRegistry, BLOCK_SIZE};

use tessera_replica_protocol::seq::{Epoch, Seq, MAX_EPOCH};

use super::reply::remote_error;
use super::shards::Shards;
use tessera_replica_protocol::data::error::{ErrorCode, RemoteError};
use tessera_replica_protocol::data::frame::{FrameError, Header, Opcode, MAX_PAYLOAD};
use tessera_replica_protocol::data::message::{
    self, encode_error, encode_versions, response_header, Hello, HelloReply, Request,
};
use tessera_replica_protocol::data::stream::{
    read_body, read_frame, read_head, write_frame, ReadError,
};

/// Limits of a data-plane server. The defaults suit one replica daemon serving a few
/// hundred engine connections.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once; further connections wait in the listen backlog.
    pub max_connections: usize,
    /// Requests in flight per connection (read but not yet answered).
    pub max_in_flight_requests: usize,
    /// Payload bytes in flight per connection (write payloads held plus read replies
    /// pending). Raised to at least one maximum frame payload.
    pub max_in_flight_bytes: usize,
    /// Time a new connection has to complete HELLO before it is dropped.
    pub handshake_timeout: Duration,
    /// Threads to serve connections on, each with its own io_uring (see
    /// [`Shards`]); `None` serves them on the caller's runtime.
    pub shards: Option<Arc<Shards>>,
    /// Where the latency of foreground reads, writes, trims and flushes is recorded,
    /// per volume (the daemon's `/metrics`); `None` records nothing.
    pub op_latency: Option<VolumeLatency>,
    /// TLS with the daemon's certificate, or plain text. The default is plain text,
    /// for servers a test runs in-process; the daemon sets what its flags chose.
    pub transport: Transport,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 1024,
            max_in_flight_requests: 256,
            max_in_flight_bytes: 64 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            shards: None,
            op_latency: None,
            transport: Transport::plaintext(),
        }
    }
}

/// The metric label of refusals on the data port.
const DATA_PORT: &str = "data";

/// Who may send HELLO: engines (nodes), and the controller, which declares rebuilt
/// copies in sync and verifies volumes. Replicas copy over the control port.
const DATA_PLANE_IDENTITIES: &[Identity] = &[Identity::Node, Identity::Controller];

/// Why a connection ended abnormally (logged by the accept loop, never sent).
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("socket I/O failed")]
    Io(#[from] std::io::Error),
    #[error("reading a frame failed")]
    Read(#[from] ReadError),
    #[error("no HELLO within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("handshake rejected: {0}")]
    Rejected(RemoteError),
    #[error("client sent a corrupt frame")]
    BadFrame(#[source] FrameError),
    #[error("refused: {0}")]
    Refused(Refusal),
}

/// Serves the data plane on `listener` with [`ServerConfig::default`] until `shutdown`
/// resolves. See [`serve_with_config`].
pub async fn serve<R: VolumeRegistry>(
    listener: TcpListener,
    registry: Arc<R>,
    shutdown: impl Future<Output = ()>,
) {
    serve_with_config(listener, registry, ServerConfig::default(), shutdown).await
}

/// Serves the data plane on an already-bound `listener` until `shutdown` resolves,
/// then drains: no new connections or requests, in-flight requests are answered, and
/// the function returns when every connection is closed. Taking a bound listener lets
/// tests use port 0 and the daemon own address choice and socket options.
pub async fn serve_with_config<R: VolumeRegistry>(
    listener: TcpListener,
    registry: Arc<R>,
    mut config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) {
    config.max_in_flight_bytes = config.max_in_flight_bytes.max(MAX_PAYLOAD);
    config.max_in_flight_requests = config.max_in_flight_requests.max(1);
    let config = Arc::new(config);
    let (stop_tx, stop_rx) = watch::channel(false);
    let conn_limit = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let mut conns = JoinSet::new();
    let mut backoff = Duration::from_millis(5);
    tokio::pin!(shutdown);
    loop {
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = Arc::clone(&conn_limit).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (socket, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                // Usually EMFILE/ENFILE: back off instead of spinning; shutdown still wins.
                tracing::warn!(error = %e, "data plane: accept failed");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let registry = Arc::clone(&registry);
        let config = Arc::clone(&config);
        let stop = stop_rx.clone();
        conns.spawn(async move {
            let _permit = permit;
            let served = match config.shards.clone() {
                Some(shards) => serve_on_shard(&shards, socket, registry, config, stop).await,
                None => handle_connection(socket, registry, config, stop).await,
            };
            match served {
                Ok(()) => tracing::debug!(%peer, "data plane: connection closed"),
                Err(e) => tracing::info!(%peer, error = %e, "data plane: connection ended"),
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
}

/// Runs one connection on the next shard and waits for it to end. Dropping this
/// future (the server being dropped) ends the connection on the shard too.
async fn serve_on_shard<R: VolumeRegistry>(
    shards: &Shards,
    socket: TcpStream,
    registry: Arc<R>,
    config: Arc<ServerConfig>,
    stop: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    // Deregistered from this runtime; the shard registers it with its own.
    let socket = socket.into_std()?;
    let (done_tx, done_rx) = oneshot::channel();
    // Never sent: dropping it (with this future) is the cancellation.
    let (_cancel, cancelled) = oneshot::channel::<()>();
    let spawned = shards.spawn(move || {
        Box::pin(async move {
            let result = match TcpStream::from_std(socket) {
                Ok(socket) => tokio::select! {
                    r = handle_connection(socket, registry, config, stop) => r,
                    _ = cancelled => Ok(()),
                },
                Err(e) => Err(e.into()),
            };
            let _ = done_tx.send(result);
        })
    });
    if !spawned {
        return Err(ConnectionError::Io(std::io::Error::other(
            "the data-plane shard has stopped",
        )));
    }
    done_rx.await.unwrap_or_else(|_| {
        Err(ConnectionError::Io(std::io::Error::other(
            "the data-plane shard dropped the connection",
        )))
    })
}

/// A response on its way to the writer, with the permits it keeps until written.
struct Outgoing {
    header: Header,
    payload: Vec<u8>,
    _permits: Option<InFlight>,
}

/// Budget held by one request from the moment its frame is read until its response
/// is written.
struct InFlight {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

fn error_reply(req: &Header, e: &RemoteError, permits: Option<InFlight>) -> Outgoing {
    let payload = encode_error(e);
    Outgoing {
        header: response_header(req, e.code as u16, payload.len()),
        payload,
        _permits: permits,
    }
}

async fn handle_connection<R: VolumeRegistry>(
    socket: TcpStream,
    registry: Arc<R>,
    config: Arc<ServerConfig>,
    stop: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    let addr = socket.peer_addr()?;
    let accepted = tokio::time::timeout(
        config.handshake_timeout,
        config.transport.accept(socket, DATA_PORT),
    )
    .await;
    let (stream, peer) = match accepted {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(counted)) => return Err(ConnectionError::Refused(counted)),
        Err(_) => {
            let r = Refusal::handshake(format!(
                "no TLS handshake within {:?}",
                config.handshake_timeout
            ));
            config.transport.refused(DATA_PORT, addr, &r);
            return Err(ConnectionError::Refused(r));
        }
    };
    let (rd, wr) = stream.split();
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let mut wr = BufWriter::with_capacity(64 * 1024, wr);

    let hello = match tokio::time::timeout(config.handshake_timeout, read_frame(&mut rd)).await {
        Err(_) => return Err(ConnectionError::HandshakeTimeout(config.handshake_timeout)),
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(f))) => f,
        Ok(Err(ReadError::Frame(e))) => {
            let id_hdr = match &e {
                FrameError::BadCrc { header, .. } => *header,
                _ => Header::default(),
            };
            let r = RemoteError::new(ErrorCode::BadFrame, 0, e.to_string());
            let out = error_reply(&id_hdr, &r, None);
            write_frame(&mut wr, &out.header, &out.payload).await?;
            wr.shutdown().await?;
            return Err(ConnectionError::BadFrame(e));
        }
        Ok(Err(e)) => return Err(e.into()),
    };
    if !peer.identity.is_one_of(DATA_PLANE_IDENTITIES) {
        let refusal = Refusal::wrong_identity(peer.identity, "use the data plane");
        config.transport.refused(DATA_PORT, addr, &refusal);
        let r = RemoteError::new(ErrorCode::PermissionDenied, 0, refusal.detail.clone());
        let out = error_reply(&hello.header, &r, None);
        write_frame(&mut wr, &out.header, &out.payload).await?;
        wr.shutdown().await?;
        return Err(ConnectionError::Refused(refusal));
    }
    let session = match handshake(&registry, &hello.header, &hello.payload).await {
        Ok((session, reply)) => {
            let payload = reply.encode();
            let mut h = response_header(&hello.header, 0, payload.len());
            h.epoch = session.epoch;
            write_frame(&mut wr, &h, &payload).await?;
            wr.flush().await?;
            session
        }
        Err(r) => {
            let out = error_reply(&hello.header, &r, None);
            write_frame(&mut wr, &out.header, &out.payload).await?;
            wr.shutdown().await?;
            return Err(ConnectionError::Rejected(r));
        }
    };
    tracing::debug!(volume = %session.volume_id, epoch = session.epoch, "data plane: handshake done");

    let (tx, rx) = mpsc::unbounded_channel();
    let (read_result, write_result) = tokio::join!(
        read_loop(rd, session, registry, tx, config, stop),
        write_loop(wr, rx)
    );
    read_result?;
    write_result?;
    Ok(())
}

/// What a connection is bound to after HELLO.
struct Session<V> {
    volume_id: String,
    volume: OpenVolume<V>,
    /// The epoch the client presented (after adoption, never below the replica's at
    /// handshake time). Every request must carry it.
    epoch: u64,
    /// The protocol version negotiated at HELLO; requests are parsed as it defines
    /// them.
    version: u16,
    /// The CLAIM this connection holds (0: none); shared with its request tasks.
    claim: Arc<AtomicU64>,
}

async fn handshake<R: VolumeRegistry>(
    registry: &Arc<R>,
    h: &Header,
    payload: &[u8],
) -> Result<(Session<R::Blocks>, HelloReply), RemoteError> {
    let invalid =
        |e: message::InvalidMessage| RemoteError::new(ErrorCode::InvalidRequest, 0, e.to_string());
    if Opcode::from_u8(h.opcode) != Some(Opcode::Hello) {
        return Err(invalid(message::InvalidMessage::HandshakeOrder));
    }
    let hello = Hello::decode(payload).map_err(invalid)?;
    let version = hello.negotiate().ok_or_else(|| {
        RemoteError::new(
            ErrorCode::UnsupportedVersion,
            u64::from(message::PROTOCOL_VERSION),
            format!(
                "client speaks {}..={}, replica speaks {}..={}",
                hello.min_version,
                hello.max_version,
                message::MIN_PROTOCOL_VERSION,
                message::PROTOCOL_VERSION
            ),
        )
    })?;
    let volume = registry
        .open(&hello.volume_id)
        .map_err(|e| remote_error(&e))?;
    // Adopting an epoch beyond the seq layout would leave the volume with no epoch
    // anyone could publish at.
    let wanted = Epoch::new(h.epoch)
        .map_err(|e| RemoteError::new(ErrorCode::InvalidRequest, MAX_EPOCH, e.to_string()))?
        .get();
    let current = volume.epoch.load(std::sync::atomic::Ordering::Acquire);
    if wanted > current {
        // Persist first, then publish: a crash between the two leaves the durable
        // epoch ahead of memory, which is safe (memory is reloaded from disk).
        let reg = Arc::clone(registry);
        let id = hello.volume_id.clone();
        tokio::task::spawn_blocking(move || reg.adopt_epoch(&id, wanted))
            .await
            .map_err(|e| RemoteError::new(ErrorCode::IoError, 0, format!("adopting epoch: {e}")))?
            .map_err(|e| remote_error(&e))?;
        volume
            .epoch
            .fetch_max(wanted, std::sync::atomic::Ordering::AcqRel);
        // Older engines' writes already admitted land before this engine starts.
        volume.sync.drain_older_epochs().await;
    }
    // Re-read: the control plane may have raised it while we adopted.
    let current = volume.epoch.load(std::sync::atomic::Ordering::Acquire);
    if wanted < current {
        return Err(stale(wanted, current));
    }
    let reply = HelloReply {
        version,
        block_size: BLOCK_SIZE as u32,
        volume_size: volume.blocks.size(),
    };
    Ok((
        Session {
            volume_id: hello.volume_id,
            volume,
            epoch: wanted,
            version,
            claim: Arc::new(AtomicU64::new(0)),
        },
        reply,
    ))
}

fn stale(wanted: u64, current: u64) -> RemoteError {
    RemoteError::new(
        ErrorCode::StaleEpoch,
        current,
        format!("epoch {wanted} is older than the replica's epoch {current}"),
    )
}

/// Checks done before a request reaches the block store, in this order: fencing
/// epoch, handshake epoch, the seq's epoch, alignment, bounds.
fn precheck<V: VolumeBlocks>(
    session: &Session<V>,
    h: &Header,
    req: &Request,
) -> Result<(), RemoteError> {
    let current = session
        .volume
        .epoch
        .load(std::sync::atomic::Ordering::Acquire);
    if h.epoch < current {
        return Err(stale(h.epoch, current));
    }
    if h.epoch != session.epoch {
        return Err(RemoteError::new(
            ErrorCode::InvalidRequest,
            session.epoch,
            format!(
                "request epoch {} differs from the handshake epoch {}",
                h.epoch, session.epoch
            ),
        ));
    }
    // A seq from a later epoch than the connection's would outrank every write the
    // next engine makes (resync and repair keep the higher seq): nothing legitimate
    // sends one, since an engine writes with its own epoch and copies older seqs.
    if let Some(seq) = req.seq() {
        let seq_epoch = Seq::from_raw(seq).epoch().get();
        if seq_epoch > session.epoch {
            return Err(RemoteError::new(
                ErrorCode::InvalidRequest,
                session.epoch,
                format!(
                    "seq {seq:#x} is of epoch {seq_epoch}, above the connection's epoch {}",
                    session.epoch
                ),
            ));
        }
    }
    if let Some((offset, len)) = req.range() {
        // BLOCK_SIZE is a power of two; written with a mask to stay within the MSRV.
        if (offset | len) & (BLOCK_SIZE - 1) != 0 {
            return Err(RemoteError::new(
                ErrorCode::Unaligned,
                0,
                format!("range {offset}+{len} is not aligned to {BLOCK_SIZE} bytes"),
            ));
        }
        let size = session.volume.blocks.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(RemoteError::new(
                ErrorCode::OutOfRange,
                size,
                format!("range {offset}+{len} is outside the volume of {size} bytes"),
            ));
        }
    }
    Ok(())
}

/// Runs one request of a connection at `epoch` holding `claim`. Writes and trims
/// (reconcile and resync copies included) first mark their regions dirty durably
/// (`sync_state`): nothing lands on this replica that a new engine could not find by
/// the dirty-region maps. Conditional ones (IF_NEWER) run at background priority (the
/// store handle's choice) and answer the number of blocks they applied. Writes and
/// trims of a connection another one has claimed the volume from are refused.
async fn execute<V: VolumeBlocks>(
    volume: &OpenVolume<V>,
    epoch: u64,
    claim: &AtomicU64,
    req: Request,
) -> Result<Vec<u8>, RemoteError> {
    let blocks = &*volume.blocks;
    let sync = &volume.sync;
    let io = |e: BlockIoError| remote_error(&e);
    // Mutations hold the fence from their epoch check until applied (see
    // `SyncState::epoch_fence`); the check at dispatch alone let a write queued before
    // a raise land after it.
    let _fence = if req.mutates() {
        let fence = sync.epoch_fence.read().await;
        let current = volume.epoch.load(std::sync::atomic::Ordering::Acquire);
        if epoch < current {
            return Err(stale(epoch, current));
        }
        if req.writes_blocks() && sync.superseded(claim.load(Ordering::SeqCst)) {
            return Err(RemoteError::new(
                ErrorCode::Superseded,
                0,
                "another connection claimed the volume since this one was opened or claimed",
            ));
        }
        if let (
            Request::Write { .. }
            | Request::WriteIfNewer { .. }
            | Request::Trim { .. }
            | Request::TrimIfNewer { .. },
            Some((offset, len)),
        ) = (&req, req.range())
        {
            sync.dirty
                .mark(offset, len)
                .await
                .map_err(|e| io(e.into()))?;
        }
        Some(fence)
    } else {
        None
    };
    let r = match req {
        Request::Read { offset, len } => {
            let data = blocks.read(offset, len).await;
            return match data {
                Ok(d) if d.len() == len as usize => Ok(d),
                Ok(d) => Err(RemoteError::new(
                    ErrorCode::IoError,
                    0,
                    format!("store returned {} bytes for a {len}-byte read", d.len()),
                )),
                Err(e) => Err(remote_error(&e)),
            };
        }
        Request::Write { offset, data, seq } => blocks.write(offset, data, seq).await,
        Request::Flush => blocks.flush().await,
        Request::Trim { offset, len, seq } => blocks.trim(offset, len, seq).await,
        Request::WriteIfNewer { offset, data, seq } => {
            return blocks
                .write_if_newer(offset, data, seq)
                .await
                .map(|applied| applied.to_le_bytes().to_vec())
                .map_err(io)
        }
        Request::TrimIfNewer { offset, len, seq } => {
            return blocks
                .trim_if_newer(offset, len, seq)
                .await
                .map(|applied| applied.to_le_bytes().to_vec())
                .map_err(io)
        }
        Request::Versions {
            offset,
            len,
            with_data,
        } => {
            return blocks
                .versions(offset, len, with_data)
                .await
                .map(|v| encode_versions(&v))
                .map_err(io)
        }
        Request::Claim => {
            let epoch_now = || volume.epoch.load(Ordering::Acquire);
            return match sync.claim(|| epoch_now() <= epoch).await {
                Some(n) => {
                    claim.store(n, Ordering::SeqCst);
                    Ok(Vec::new())
                }
                None => Err(stale(epoch, epoch_now())),
            };
        }
        Request::DirtyRegions => return Ok(sync.dirty.snapshot().encode()),
        Request::GetMembership => return Ok(sync.membership.get().encode()),
        Request::SetMembership(m) => {
            if m.epoch != epoch {
                return Err(RemoteError::new(
                    ErrorCode::InvalidRequest,
                    epoch,
                    format!(
                        "an in-sync record of epoch {} from an engine of epoch {epoch}",
                        m.epoch
                    ),
                ));
            }
            let sync = Arc::clone(sync);
            return tokio::task::spawn_blocking(move || sync.membership.store_if_newer(&m))
                .await
                .map_err(|e| {
                    RemoteError::new(
                        ErrorCode::IoError,
                        0,
                        format!("storing in-sync record: {e}"),
                    )
                })?
                .map(|stored| stored.encode())
                .map_err(|e| io(e.into()));
        }
        Request::MarkClean => return Ok(sync.dirty.mark_generation().to_le_bytes().to_vec()),
        Request::Clean { token } => {
            return sync
                .dirty
                .clean(token)
                .await
                .map(|n| n.to_le_bytes().to_vec())
                .map_err(|e| io(e.into()))
        }
        // Needs the registry, so the read loop answers it (`replica_set_reply`).
        Request::ReplicaSet => {
            return Err(RemoteError::new(
                ErrorCode::InvalidRequest,
                0,
                "REPLICA_SET is answered by the connection, not executed".to_owned(),
            ))
        }
    };
    r.map(|()| Vec::new()).map_err(|e| remote_error(&e))
}

/// The answer to REPLICA_SET: the record's generation and replica set.
fn replica_set_reply<R: VolumeRegistry>(
    registry: &R,
    volume_id: &str,
    h: &Header,
    permits: InFlight,
) -> Outgoing {
    let encoded = registry
        .replica_set(volume_id)
        .map_err(|e| remote_error(&e))
        .and_then(|set| {
            set.encode()
                .map_err(|e| RemoteError::new(ErrorCode::IoError, 0, e.to_string()))
        });
    match encoded {
        Ok(payload) => Outgoing {
            header: response_header(h, 0, payload.len()),
            payload,
            _permits: Some(permits),
        },
        Err(r) => error_reply(h, &r, Some(permits)),
    }
}

/// Stops when the connection should stop reading: server shutdown or writer gone.
async fn stopped(stop: &mut watch::Receiver<bool>, tx: &mpsc::UnboundedSender<Outgoing>) {
    tokio::select! {
        _ = stop.wait_for(|s| *s) => {}
        _ = tx.closed() => {}
    }
}

/// The latency histogram a request is timed in: the foreground block operations. The
/// conditional writes and trims of a resync or copy run at background priority and
/// would blur what the application sees, so they are not timed.
fn timed_op(req: &Request) -> Option<Op> {
    match req {
        Request::Read { .. } => Some(Op::Read),
        Request::Write { .. } => Some(Op::Write),
        Request::Trim { .. } => Some(Op::Trim),
        Request::Flush => Some(Op::Flush),
        _ => None,
    }
}

async fn read_loop<R: VolumeRegistry>(
    mut rd: BufReader<ReadHalf>,
    session: Session<R::Blocks>,
    registry: Arc<R>,
    tx: mpsc::UnboundedSender<Outgoing>,
    config: Arc<ServerConfig>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    let requests = Arc::new(Semaphore::new(config.max_in_flight_requests));
    let bytes = Arc::new(Semaphore::new(config.max_in_flight_bytes));
    // Resolved once per connection: a request only clones the handle.
    let latency = config
        .op_latency
        .as_ref()
        .map(|l| l.volume(&session.volume_id));
    let mut tasks = JoinSet::new();
    let result = loop {
        while tasks.try_join_next().is_some() {}
        // Take a request slot before reading, so a full pipeline pushes back on TCP.
        let request_permit = tokio::select! {
            _ = stopped(&mut stop, &tx) => break Ok(()),
            p = Arc::clone(&requests).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break Ok(()),
            },
        };
        let head = tokio::select! {
            _ = stopped(&mut stop, &tx) => break Ok(()),
            h = read_head(&mut rd) => h,
        };
        let head = match head {
            Ok(Some(h)) => h,
            Ok(None) => break Ok(()),
            Err(ReadError::Frame(e)) => {
                // Oversized or undersized: the length can't be trusted, so neither can
                // the request id; answer id 0 and close.
                let r = RemoteError::new(ErrorCode::BadFrame, 0, e.to_string());
                let _ = tx.send(error_reply(&Header::default(), &r, None));
                break Err(ConnectionError::BadFrame(e));
            }
            Err(e) => break Err(e.into()),
        };
        // Budget for the payload we are about to allocate and for the data a READ will
        // return, both already capped at MAX_PAYLOAD <= max_in_flight_bytes.
        let read_len = match Opcode::from_u8(head.header.opcode) {
            Some(Opcode::Read) | Some(Opcode::Versions) => {
                head.header.length.min(MAX_PAYLOAD as u64) as usize
            }
            _ => 0,
        };
        let cost = head.payload_len.max(read_len);
        let bytes_permit = if cost > 0 {
            // Cannot truncate: cost <= MAX_PAYLOAD < u32::MAX.
            let p = tokio::select! {
                _ = stopped(&mut stop, &tx) => break Ok(()),
                p = Arc::clone(&bytes).acquire_many_owned(cost as u32) => p,
            };
            match p {
                Ok(p) => Some(p),
                Err(_) => break Ok(()),
            }
        } else {
            None
        };
        let permits = InFlight {
            _request: request_permit,
            _bytes: bytes_permit,
        };
        let body = tokio::select! {
            _ = stopped(&mut stop, &tx) => break Ok(()),
            b = read_body(&mut rd, &head) => b,
        };
        let payload = match body {
            Ok(p) => p,
            Err(ReadError::Frame(e)) => {
                // The header parsed but the crc failed: answer BAD_FRAME to the id it
                // claims (best effort) and stop reading; requests already read finish.
                let id_hdr = match &e {
                    FrameError::BadCrc { header, .. } => *header,
                    _ => Header::default(),
                };
                let r = RemoteError::new(ErrorCode::BadFrame, 0, e.to_string());
                let _ = tx.send(error_reply(&id_hdr, &r, Some(permits)));
                break Err(ConnectionError::BadFrame(e));
            }
            Err(e) => break Err(e.into()),
        };
        let h = head.header;
        let req = match Request::parse_at(session.version, &h, payload) {
            Ok(r) => r,
            Err(e) => {
                let r = RemoteError::new(ErrorCode::InvalidRequest, 0, e.to_string());
                let _ = tx.send(error_reply(&h, &r, Some(permits)));
                continue;
            }
        };
        if let Err(r) = precheck(&session, &h, &req) {
            let _ = tx.send(error_reply(&h, &r, Some(permits)));
            continue;
        }
        if req == Request::ReplicaSet {
            // A lookup in the catalog's memory: answered here, no task.
            let _ = tx.send(replica_set_reply(
                &*registry,
                &session.volume_id,
                &h,
                permits,
            ));
            continue;
        }
        let volume = session.volume.clone();
        let epoch = session.epoch;
        let claim = Arc::clone(&session.claim);
        let tx = tx.clone();
        let timed = latency
            .as_ref()
            .zip(timed_op(&req))
            .map(|(histograms, op)| (Arc::clone(histograms), op, Instant::now()));
        tasks.spawn(async move {
            let out = match execute(&volume, epoch, &claim, req).await {
                Ok(payload) => Outgoing {
                    header: response_header(&h, 0, payload.len()),
                    payload,
                    _permits: Some(permits),
                },
                Err(r) => error_reply(&h, &r, Some(permits)),
            };
            if let Some((histograms, op, started)) = timed {
                histograms.observe(op, started.elapsed());
            }
            // Fails only if the writer is gone, i.e. the connection is dead anyway.
            let _ = tx.send(out);
        });
    };
    // Answer everything already read before the writer is allowed to finish.
    drop(tx);
    while tasks.join_next().await.is_some() {}
    result
}

async fn write_loop(
    mut wr: BufWriter<WriteHalf>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) -> Result<(), ConnectionError> {
    while let Some(out) = rx.recv().await {
        write_frame(&mut wr, &out.header, &out.payload).await?;
        drop(out);
        // Batch whatever else is ready into the same flush, yielding once in between
        // so responses finishing right now join it (one `send` per batch; see the
        // client's module doc for why that matters here).
        for round in 0..2 {
            if round == 1 {
                tokio::task::yield_now().await;
            }
            while let Ok(out) = rx.try_recv() {
                write_frame(&mut wr, &out.header, &out.payload).await?;
            }
        }
        wr.flush().await?;
    }
    wr.shutdown().await?;
    Ok(())
}
