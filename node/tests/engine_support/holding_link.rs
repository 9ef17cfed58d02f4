//! `HoldingLink`: a fake network link in front of one replica, for the one fault
//! real processes on loopback cannot produce on demand: bytes an engine sent on a
//! connection it has since given up reaching the replica *later*, after the engine's
//! new connection caught the replica up (what a partition's TCP retransmissions do
//! once it heals; the fault suite's real partitions hit it only by timing).
//!
//! Connections are relayed byte for byte. [`HoldingLink::cut`] makes the connections
//! open at that moment hold what the engine sends and drop what the replica answers
//! (the engine times out, as in a partition); connections opened afterwards pass.
//! [`HoldingLink::deliver`] hands the held bytes to the replica and waits until it
//! has answered every request it received on those connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Bound on waiting for the replica's answers to delivered requests (a hang is a
/// failure, not a wait).
const ANSWER_LIMIT: Duration = Duration::from_secs(20);

/// Counts the data-plane frames completed in a byte stream (each frame: a u32
/// little-endian length, then that many bytes), across reads that split them.
#[derive(Default)]
struct FrameCounter {
    prefix: Vec<u8>,
    remaining: usize,
    done: u64,
}

impl FrameCounter {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.remaining == 0 {
                let take = (4 - self.prefix.len()).min(bytes.len());
                self.prefix.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.prefix.len() == 4 {
                    let len = u32::from_le_bytes(self.prefix[..].try_into().unwrap());
                    self.remaining = len as usize;
                    self.prefix.clear();
                }
                continue;
            }
            let take = self.remaining.min(bytes.len());
            self.remaining -= take;
            bytes = &bytes[take..];
            if self.remaining == 0 {
                self.done += 1;
            }
        }
    }
}

/// One relayed connection.
struct Conn {
    /// Set by `cut`: hold the engine's bytes, drop the replica's.
    cut: AtomicBool,
    /// The engine's bytes held since the cut.
    held: Mutex<Vec<u8>>,
    /// Requests that reached the replica, answers that came back.
    sent: Mutex<FrameCounter>,
    answered: Mutex<FrameCounter>,
    upstream: tokio::sync::Mutex<OwnedWriteHalf>,
}

impl Conn {
    async fn forward(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut up = self.upstream.lock().await;
        up.write_all(bytes).await?;
        self.sent.lock().unwrap().feed(bytes);
        Ok(())
    }
}

/// A relay in front of one replica's data port (module doc). Aborted on drop.
pub struct HoldingLink {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<Conn>>>>,
    task: JoinHandle<()>,
}

impl HoldingLink {
    /// Relays connections to `addr` at [`Self::addr`].
    pub async fn start(replica: SocketAddr) -> HoldingLink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<Arc<Conn>>>> = Arc::default();
        let registry = Arc::clone(&conns);
        let task = tokio::spawn(async move {
            while let Ok((engine, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(replica).await else {
                    continue;
                };
                let _ = engine.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let (mut engine_rd, mut engine_wr) = engine.into_split();
                let (mut up_rd, up_wr) = upstream.into_split();
                let conn = Arc::new(Conn {
                    cut: AtomicBool::new(false),
                    held: Mutex::default(),
                    sent: Mutex::default(),
                    answered: Mutex::default(),
                    upstream: tokio::sync::Mutex::new(up_wr),
                });
                registry.lock().unwrap().push(Arc::clone(&conn));
                let c = Arc::clone(&conn);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match engine_rd.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if c.cut.load(Ordering::SeqCst) {
                            c.held.lock().unwrap().extend_from_slice(&buf[..n]);
                        } else if c.forward(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    // A cut connection stays open towards the replica until delivered.
                    if !c.cut.load(Ordering::SeqCst) {
                        let _ = c.upstream.lock().await.shutdown().await;
                    }
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match up_rd.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        conn.answered.lock().unwrap().feed(&buf[..n]);
                        if !conn.cut.load(Ordering::SeqCst)
                            && engine_wr.write_all(&buf[..n]).await.is_err()
                        {
                            break;
                        }
                    }
                    let _ = engine_wr.shutdown().await;
                });
            }
        });
        HoldingLink { addr, conns, task }
    }

    /// Where engines connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts the connections open now (module doc); later ones pass.
    pub fn cut(&self) {
        for c in self.conns.lock().unwrap().iter() {
            c.cut.store(true, Ordering::SeqCst);
        }
    }

    /// Bytes held so far on cut connections.
    pub fn held_bytes(&self) -> usize {
        self.cut_conns()
            .iter()
            .map(|c| c.held.lock().unwrap().len())
            .sum()
    }

    /// Sends every cut connection's held bytes to the replica, waits until it has
    /// answered every request those connections carried, then closes them. Returns
    /// the number of requests delivered late.
    pub async fn deliver(&self) -> u64 {
        let mut late = 0;
        for c in self.cut_conns() {
            let held = std::mem::take(&mut *c.held.lock().unwrap());
            let before = c.sent.lock().unwrap().done;
            c.forward(&held).await.expect("delivering held bytes");
            late += c.sent.lock().unwrap().done - before;
            let deadline = tokio::time::Instant::now() + ANSWER_LIMIT;
            while c.answered.lock().unwrap().done < c.sent.lock().unwrap().done {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the replica did not answer the delivered requests within {ANSWER_LIMIT:?}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = c.upstream.lock().await.shutdown().await;
        }
        late
    }

    fn cut_conns(&self) -> Vec<Arc<Conn>> {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.cut.load(Ordering::SeqCst))
            .cloned()
            .collect()
    }
}

impl Drop for HoldingLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
