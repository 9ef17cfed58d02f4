//! The [`Transport`] under tonic: a server's incoming connections and a client's
//! channel.
//!
//! The server side hands tonic connections that carry their [`Peer`] as connect
//! info, which tonic copies into every request's extensions: a layer or handler reads
//! who is calling with [`peer_of`]. Handshakes run in tasks of their own, so a client
//! that stalls mid-handshake holds up only itself, and each has a deadline.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

use crate::identity::PeerIdentity;
use crate::serving::ServingCert;
use crate::transport::{Peer, Refusal, Stream, Transport};

/// The metric label of refusals on a control (gRPC) port.
pub const CONTROL_PORT: &str = "control";

/// How long a client has to complete the TLS handshake on a gRPC port.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An accepted connection, as tonic serves it.
pub struct ServerConn {
    stream: Stream,
    peer: Peer,
}

impl Connected for ServerConn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer
    }
}

/// Who made `request`, as [`incoming`] recorded it; `None` for a request that did
/// not come through it (a server started otherwise: refuse those).
pub fn peer_of<B>(request: &tonic::codegen::http::Request<B>) -> Option<Peer> {
    request.extensions().get::<Peer>().copied()
}

/// The connections of `listener`, each through `transport`'s handshake (refused
/// ones are counted and dropped), for `Server::serve_with_incoming`. Accepting stops
/// when the server drops the stream.
pub fn incoming(
    listener: TcpListener,
    transport: Transport,
) -> ReceiverStream<io::Result<ServerConn>> {
    accept_loop(listener, move |tcp, addr| {
        let transport = transport.clone();
        async move {
            let handshake = transport.accept(tcp, CONTROL_PORT);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok((stream, peer))) => Some(ServerConn { stream, peer }),
                Ok(Err(_counted)) => None,
                Err(_) => {
                    transport.refused(
                        CONTROL_PORT,
                        addr,
                        &Refusal::handshake(format!(
                            "no TLS handshake within {HANDSHAKE_TIMEOUT:?}"
                        )),
                    );
                    None
                }
            }
        }
    })
}

/// The connections of `listener` through a TLS handshake that asks clients for no
/// certificate and presents `serving`'s current one: for a port whose callers prove
/// who they are otherwise (the SnapshotMetadata API's Kubernetes tokens). Their peer
/// identity is [`PeerIdentity::Unverified`].
pub fn incoming_without_client_auth(
    listener: TcpListener,
    serving: ServingCert,
) -> ReceiverStream<io::Result<ServerConn>> {
    accept_loop(listener, move |tcp, addr| {
        let acceptor = tokio_rustls::TlsAcceptor::from(serving.server_config());
        async move {
            let _ = tcp.set_nodelay(true);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => Some(ServerConn {
                    stream: Stream::Server(Box::new(tls)),
                    peer: Peer {
                        addr,
                        identity: PeerIdentity::Unverified,
                    },
                }),
                Ok(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => None,
            }
        }
    })
}

/// Accepts on `listener` until the returned stream is dropped; each connection's
/// `handshake` runs in a task of its own and yields the connection or nothing.
fn accept_loop<C, F, Fut>(listener: TcpListener, handshake: F) -> ReceiverStream<io::Result<C>>
where
    C: Send + 'static,
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<C>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "gRPC port: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let tx = tx.clone();
            let handshake = handshake(tcp, addr);
            tokio::spawn(async move {
                if let Some(conn) = handshake.await {
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The endpoint of the replica daemon at `address` (`host:port`, an `http://`
/// prefix allowed), to configure (timeouts, windows) and pass to [`lazy_channel`] or
/// [`connect_channel`]: they dial its authority through a [`Transport`].
pub fn endpoint(address: &str) -> Result<Endpoint, tonic::transport::Error> {
    let address = address
        .strip_prefix("http://")
        .or_else(|| address.strip_prefix("https://"))
        .unwrap_or(address);
    Endpoint::from_shared(format!("http://{address}"))
}

/// A channel to `endpoint` that connects on first use through `transport`, and again
/// after the connection breaks.
pub fn lazy_channel(endpoint: &Endpoint, transport: &Transport) -> Channel {
    endpoint.connect_with_connector_lazy(connector(transport))
}

/// [`lazy_channel`], connected now: an error means the daemon cannot be reached or
/// the handshake failed.
pub async fn connect_channel(
    endpoint: &Endpoint,
    transport: &Transport,
) -> Result<Channel, tonic::transport::Error> {
    endpoint.connect_with_connector(connector(transport)).await
}

type Connecting = Pin<Box<dyn std::future::Future<Output = io::Result<TokioIo<Stream>>> + Send>>;

/// Dials the URI's authority (the address of [`endpoint`]) and runs the transport's
/// handshake on it.
fn connector(
    transport: &Transport,
) -> impl tower::Service<Uri, Response = TokioIo<Stream>, Error = io::Error, Future = Connecting>
       + Send
       + Clone
       + 'static {
    let transport = transport.clone();
    service_fn(move |uri: Uri| -> Connecting {
        let transport = transport.clone();
        Box::pin(async move {
            let address = uri
                .authority()
                .map(|a| a.to_string())
                .ok_or_else(|| io::Error::other(format!("{uri} names no host and port")))?;
            let tcp = TcpStream::connect(address).await?;
            Ok(TokioIo::new(transport.connect(tcp).await?))
        })
    })
}

impl AsyncRead for ServerConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServerConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
