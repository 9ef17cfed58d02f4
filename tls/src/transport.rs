//! TLS (or, when the operator asked for it, plain text) on a TCP connection, in
//! either direction, and why an incoming connection was refused.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::context::TlsContext;
use crate::identity::{Identity, PeerIdentity};

/// How a process talks to replica daemons (and, on a replica, how it is talked to).
#[derive(Clone, Debug)]
pub struct Transport {
    mode: Mode,
    refusals: RefusalCounts,
}

#[derive(Clone, Debug)]
enum Mode {
    Tls(TlsContext),
    Plaintext,
}

impl Transport {
    /// Mutual TLS with the certificates of `context`.
    pub fn tls(context: TlsContext) -> Transport {
        Transport {
            mode: Mode::Tls(context),
            refusals: RefusalCounts::default(),
        }
    }

    /// No TLS: anyone who reaches a replica port may do anything there. Only for
    /// the operator's explicit `--insecure-plaintext`.
    pub fn plaintext() -> Transport {
        Transport {
            mode: Mode::Plaintext,
            refusals: RefusalCounts::default(),
        }
    }

    /// The certificates in use, if TLS.
    pub fn tls_context(&self) -> Option<&TlsContext> {
        match &self.mode {
            Mode::Tls(c) => Some(c),
            Mode::Plaintext => None,
        }
    }

    /// Whether this is the insecure plain-text transport.
    pub fn is_plaintext(&self) -> bool {
        matches!(self.mode, Mode::Plaintext)
    }

    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        match &self.mode {
            Mode::Tls(c) => format!(
                "mutual TLS as {} (certificates in {}, reloaded when they change)",
                c.identity(),
                c.dir().display()
            ),
            Mode::Plaintext => {
                "PLAIN TEXT: no authentication, no encryption (--insecure-plaintext); \
                 anyone who can reach a replica port can read, write and delete every volume"
                    .to_string()
            }
        }
    }

    /// Connections refused so far (counted by whoever refused them).
    pub fn refusals(&self) -> &RefusalCounts {
        &self.refusals
    }

    /// Opens the client side of a connection to a replica daemon on `tcp`.
    pub async fn connect(&self, tcp: TcpStream) -> io::Result<Stream> {
        tcp.set_nodelay(true)?;
        match &self.mode {
            Mode::Plaintext => Ok(Stream::Plain(tcp)),
            Mode::Tls(c) => {
                let connector = TlsConnector::from(c.client_config());
                let tls = connector
                    .connect(Identity::replica_server_name(), tcp)
                    .await?;
                Ok(Stream::Client(Box::new(tls)))
            }
        }
    }

    /// Accepts the server side of `tcp`: the TLS handshake, with the client's
    /// certificate verified against the CA, and the identity it names. A refusal is
    /// counted under `port` and logged at debug level here (the caller decides how
    /// loudly to report it).
    pub async fn accept(
        &self,
        tcp: TcpStream,
        port: &'static str,
    ) -> Result<(Stream, Peer), Refusal> {
        let addr = tcp
            .peer_addr()
            .map_err(|e| Refusal::handshake(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let accepted = match &self.mode {
            Mode::Plaintext => Ok((
                Stream::Plain(tcp),
                Peer {
                    addr,
                    identity: PeerIdentity::Unverified,
                },
            )),
            Mode::Tls(c) => {
                let acceptor = TlsAcceptor::from(c.server_config());
                match acceptor.accept(tcp).await {
                    Err(e) => Err(Refusal::of_handshake_error(&e)),
                    Ok(tls) => {
                        let named = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .and_then(Identity::of_certificate);
                        match named {
                            Some(identity) => Ok((
                                Stream::Server(Box::new(tls)),
                                Peer {
                                    addr,
                                    identity: PeerIdentity::Verified(identity),
                                },
                            )),
                            None => Err(Refusal {
                                reason: RefusalReason::UnknownIdentity,
                                detail: "the certificate names no Tessera identity".into(),
                            }),
                        }
                    }
                }
            }
        };
        if let Err(r) = &accepted {
            self.refused(port, addr, r);
        }
        accepted
    }

    /// Counts and logs a refusal on `port` (the transport's own, or an
    /// authorization the caller made).
    pub fn refused(&self, port: &'static str, addr: SocketAddr, refusal: &Refusal) {
        self.refusals.add(port, refusal.reason);
        tracing::warn!(%addr, port, reason = refusal.reason.as_str(), detail = %refusal.detail,
            "refused a connection or call");
    }
}

/// Who is on the other end of an accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    pub identity: PeerIdentity,
}

/// Why a connection or call was refused: the reason is a metric label, the detail
/// goes to the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RefusalReason,
    pub detail: String,
}

/// The kinds of refusal, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefusalReason {
    /// The client presented no certificate.
    NoCertificate,
    /// The certificate does not chain to the cluster CA (or expired, or is malformed).
    UntrustedCertificate,
    /// A certificate from the CA that names no Tessera identity.
    UnknownIdentity,
    /// A valid identity asking for what that identity may not do.
    WrongIdentity,
    /// Anything else that broke the handshake (a plain-text client, a timeout, a
    /// protocol error).
    Handshake,
}

impl RefusalReason {
    /// Every reason, for metrics that list zeros too.
    pub const ALL: [RefusalReason; 5] = [
        RefusalReason::NoCertificate,
        RefusalReason::UntrustedCertificate,
        RefusalReason::UnknownIdentity,
        RefusalReason::WrongIdentity,
        RefusalReason::Handshake,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::NoCertificate => "no_certificate",
            RefusalReason::UntrustedCertificate => "untrusted_certificate",
            RefusalReason::UnknownIdentity => "unknown_identity",
            RefusalReason::WrongIdentity => "wrong_identity",
            RefusalReason::Handshake => "handshake",
        }
    }
}

impl Refusal {
    /// A caller whose identity may not do `what`.
    pub fn wrong_identity(identity: PeerIdentity, what: impl std::fmt::Display) -> Refusal {
        Refusal {
            reason: RefusalReason::WrongIdentity,
            detail: format!("the {identity} identity may not {what}"),
        }
    }

    /// A handshake that did not complete.
    pub fn handshake(detail: impl Into<String>) -> Refusal {
        Refusal {
            reason: RefusalReason::Handshake,
            detail: detail.into(),
        }
    }

    fn of_handshake_error(e: &io::Error) -> Refusal {
        let tls = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        let reason = match tls {
            Some(rustls::Error::NoCertificatesPresented) => RefusalReason::NoCertificate,
            Some(rustls::Error::InvalidCertificate(_)) => RefusalReason::UntrustedCertificate,
            _ => RefusalReason::Handshake,
        };
        Refusal {
            reason,
            detail: e.to_string(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.as_str(), self.detail)
    }
}

/// Refusals counted by port and reason; clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct RefusalCounts(Arc<Mutex<BTreeMap<(&'static str, RefusalReason), u64>>>);

impl RefusalCounts {
    fn add(&self, port: &'static str, reason: RefusalReason) {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((port, reason))
            .or_default() += 1;
    }

    /// Every (port, reason) counted so far and its count.
    pub fn snapshot(&self) -> Vec<(&'static str, RefusalReason, u64)> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(&(port, reason), &n)| (port, reason, n))
            .collect()
    }
}

/// A connection in either direction, with or without TLS.
pub enum Stream {
    Plain(TcpStream),
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// The reading half of a [`Stream`].
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The writing half of a [`Stream`].
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

impl Stream {
    /// Splits into halves a reader and a writer task can own. Plain TCP splits
    /// without a lock; a TLS session is one state machine, so its halves share it.
    pub fn split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Plain(tcp) => {
                let (rd, wr) = tcp.into_split();
                (Box::new(rd), Box::new(wr))
            }
            other => {
                let (rd, wr) = tokio::io::split(other);
                (Box::new(rd), Box::new(wr))
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Client(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Server(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Client(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Server(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Client(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Server(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Client(s) => s.is_write_vectored(),
            Stream::Server(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Client(s) => Pin::new(s).poll_flush(cx),
            Stream::Server(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Client(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Server(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
