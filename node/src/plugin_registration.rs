//! Kubelet plugin registration (`pluginregistration.v1`), so that no
//! node-driver-registrar sidecar is needed.
//!
//! The kubelet watches its `plugins_registry` directory (default
//! `/var/lib/kubelet/plugins_registry`). When a socket appears there it dials it, calls
//! `GetInfo` to learn the plugin's type, name, CSI socket and versions, validates them, and
//! reports the outcome with `NotifyRegistrationStatus`. It then talks CSI to the endpoint
//! from `GetInfo`, and deregisters the driver when the registration socket disappears.
//!
//! [`serve`] answers those two calls on `<dir>/<driver>-reg.sock` ([`socket_path`]);
//! [`Registration::status`] lets the caller see what the kubelet reported (the binary exits
//! when the kubelet refuses the registration, so the pod restarts and tries again, as
//! node-driver-registrar does).
//!
//! **The kubelet's `:authority`.** The kubelet dials the registration socket with grpc-go and
//! a bare path as the target (no `unix://` and no `WithAuthority`, unlike its CSI client), so
//! every request carries the socket path as `:authority`. The HTTP/2 stack under tonic (h2)
//! rejects that as a malformed authority and resets the stream (`RST_STREAM` with
//! `PROTOCOL_ERROR`; the kubelet logs "failed to get plugin info using RPC GetInfo"). Each
//! accepted connection is therefore wrapped in [`AuthorityFix`], which rewrites the value of
//! `:authority` in the client's HEADERS frames before h2 parses them (see there for why that
//! is safe with HPACK's dynamic table).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_util::TryStreamExt;
use tessera_telemetry::exposition::gauge;
use tessera_telemetry::prometheus_client::collector::Collector;
use tessera_telemetry::prometheus_client::encoding::DescriptorEncoder;
use tessera_telemetry::prometheus_client::registry::Registry;
use tessera_telemetry::{Endpoints, HealthCheck};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use tracing::{error, info};

/// Generated from `proto/pluginregistration.proto` (protobuf package `pluginregistration`).
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("pluginregistration");
}

use proto::registration_server::{Registration as RegistrationApi, RegistrationServer};
use proto::{InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse};

/// `PluginInfo.type` of a CSI driver.
pub const CSI_PLUGIN_TYPE: &str = "CSIPlugin";

/// CSI versions the driver serves, as the kubelet expects them in `supported_versions`.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0"];

/// The registration socket of `driver` in the kubelet's `plugins_registry` directory.
pub fn socket_path(registry_dir: &Path, driver: &str) -> PathBuf {
    registry_dir.join(format!("{driver}-reg.sock"))
}

/// What the kubelet said about the registration, as last reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationState {
    /// No `NotifyRegistrationStatus` yet.
    Pending,
    /// The kubelet registered the driver.
    Registered,
    /// The kubelet refused the registration, with its reason.
    Failed(String),
}

/// The registration service: what `GetInfo` answers and what the kubelet reported.
#[derive(Debug, Clone)]
pub struct Registration {
    info: Arc<PluginInfo>,
    state: Arc<watch::Sender<RegistrationState>>,
}

impl Registration {
    /// A CSI plugin called `driver` whose CSI socket the kubelet reaches at `endpoint`
    /// (a host path: the kubelet dials it itself, so it is the path as the kubelet sees it).
    pub fn csi(driver: &str, endpoint: &Path) -> Self {
        let info = PluginInfo {
            r#type: CSI_PLUGIN_TYPE.to_owned(),
            name: driver.to_owned(),
            endpoint: endpoint.to_string_lossy().into_owned(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| (*v).to_owned()).collect(),
        };
        let (state, _) = watch::channel(RegistrationState::Pending);
        Registration {
            info: Arc::new(info),
            state: Arc::new(state),
        }
    }

    /// What `GetInfo` answers.
    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    /// Follows what the kubelet reports.
    pub fn status(&self) -> watch::Receiver<RegistrationState> {
        self.state.subscribe()
    }

    /// The latest report.
    pub fn current(&self) -> RegistrationState {
        self.state.borrow().clone()
    }
}

#[tonic::async_trait]
impl RegistrationApi for Registration {
    async fn get_info(
        &self,
        _request: Request<InfoRequest>,
    ) -> Result<Response<PluginInfo>, Status> {
        info!(name = %self.info.name, endpoint = %self.info.endpoint, "kubelet asked for plugin info");
        Ok(Response::new((*self.info).clone()))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        let state = if status.plugin_registered {
            info!(name = %self.info.name, "kubelet registered the plugin");
            RegistrationState::Registered
        } else {
            error!(name = %self.info.name, error = %status.error, "kubelet refused the plugin registration");
            RegistrationState::Failed(status.error)
        };
        self.state.send_replace(state);
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

/// Serves the registration API on an already-bound listener until `shutdown` completes.
///
/// The caller binds (and afterwards removes) the socket: the kubelet deregisters the plugin
/// when the socket file disappears, so removing it on shutdown is part of a clean stop.
pub async fn serve(
    listener: UnixListener,
    registration: Registration,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let incoming = UnixListenerStream::new(listener).map_ok(AuthorityFix::new);
    tonic::transport::Server::builder()
        .add_service(RegistrationServer::new(registration))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const FRAME_HEADERS: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// HPACK static table index of `:authority`.
const AUTHORITY_INDEX: u64 = 1;

/// A server-side connection that replaces the value of `:authority` in every HEADERS frame
/// the client sends with a valid host name (see the module doc). Everything else passes
/// through unchanged; writes are not touched.
///
/// HPACK: a literal `:authority` field keeps its representation (with or without indexing),
/// so both ends add an entry to their dynamic tables at the same time and later references
/// by index resolve to the rewritten value. The replacement is never longer than the
/// original value, so the server's table is never larger in bytes than the client's: the
/// server never evicts an entry before the client does, and every entry the client still
/// references sits at the same index on both sides.
pub struct AuthorityFix<S> {
    inner: S,
    /// Bytes read from `inner` and not yet turned into output.
    pending: Vec<u8>,
    /// Output ready for the reader.
    ready: Vec<u8>,
    ready_pos: usize,
    preface_done: bool,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    /// Wraps an accepted connection.
    pub fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            pending: Vec::new(),
            ready: Vec::new(),
            ready_pos: 0,
            preface_done: false,
            eof: false,
        }
    }

    /// Moves every complete unit (the preface, whole frames) from `pending` to `ready`.
    fn process(&mut self) {
        if !self.preface_done {
            if self.pending.len() < PREFACE.len() && PREFACE.starts_with(&self.pending) {
                return;
            }
            self.preface_done = true;
            if self.pending.starts_with(PREFACE) {
                self.ready.extend(self.pending.drain(..PREFACE.len()));
            } else {
                // Not HTTP/2 prior knowledge: pass everything through, let h2 reject it.
                self.ready.append(&mut self.pending);
                return;
            }
        }
        loop {
            if self.pending.len() < FRAME_HEADER_LEN {
                return;
            }
            let len = usize::from(self.pending[0]) << 16
                | usize::from(self.pending[1]) << 8
                | usize::from(self.pending[2]);
            if self.pending.len() < FRAME_HEADER_LEN + len {
                return;
            }
            let frame: Vec<u8> = self.pending.drain(..FRAME_HEADER_LEN + len).collect();
            match rewrite_headers_frame(&frame) {
                Some(rewritten) => self.ready.extend_from_slice(&rewritten),
                None => self.ready.extend_from_slice(&frame),
            }
        }
    }
}

/// The HEADERS frame with `:authority` replaced, or `None` to pass `frame` on unchanged
/// (not a HEADERS frame, split over CONTINUATION frames, or not parseable).
fn rewrite_headers_frame(frame: &[u8]) -> Option<Vec<u8>> {
    let (kind, flags) = (frame[3], frame[4]);
    if kind != FRAME_HEADERS || flags & FLAG_END_HEADERS == 0 {
        return None;
    }
    let payload = &frame[FRAME_HEADER_LEN..];
    let mut start = 0;
    let mut pad = 0;
    if flags & FLAG_PADDED != 0 {
        pad = usize::from(*payload.first()?);
        start = 1;
    }
    if flags & FLAG_PRIORITY != 0 {
        start += 5;
    }
    let end = payload.len().checked_sub(pad)?;
    let block = payload.get(start..end)?;
    let new_block = rewrite_authority(block)?;
    let mut new_payload = Vec::with_capacity(payload.len());
    new_payload.extend_from_slice(&payload[..start]);
    new_payload.extend_from_slice(&new_block);
    new_payload.extend_from_slice(&payload[end..]);
    let len = u32::try_from(new_payload.len()).ok()?;
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + new_payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&frame[3..FRAME_HEADER_LEN]);
    out.extend_from_slice(&new_payload);
    Some(out)
}

/// An HPACK integer with an `n`-bit prefix at `block[*pos]`; advances `pos`.
fn hpack_int(block: &[u8], pos: &mut usize, n: u32) -> Option<u64> {
    let mask = (1u16 << n) - 1;
    let first = u64::from(u16::from(*block.get(*pos)?) & mask);
    *pos += 1;
    if first < u64::from(mask) {
        return Some(first);
    }
    let mut value = first;
    let mut shift = 0u32;
    loop {
        let b = *block.get(*pos)?;
        *pos += 1;
        value = value.checked_add(u64::from(b & 0x7f).checked_shl(shift)?)?;
        if b & 0x80 == 0 {
            return Some(value);
        }
        shift += 7;
        if shift > 56 {
            return None;
        }
    }
}

/// Skips an HPACK string literal at `block[*pos]`; returns (huffman, length in bytes).
fn hpack_skip_string(block: &[u8], pos: &mut usize) -> Option<(bool, usize)> {
    let huffman = *block.get(*pos)? & 0x80 != 0;
    let len = usize::try_from(hpack_int(block, pos, 7)?).ok()?;
    let end = pos.checked_add(len)?;
    if end > block.len() {
        return None;
    }
    *pos = end;
    Some((huffman, len))
}

/// The header block with every literal `:authority` value replaced, or `None` when the
/// block cannot be parsed (it is then passed on as it was).
fn rewrite_authority(block: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(block.len());
    let mut pos = 0;
    while pos < block.len() {
        let start = pos;
        let b = block[pos];
        let name_index = if b & 0x80 != 0 {
            // Indexed field.
            hpack_int(block, &mut pos, 7)?;
            None
        } else if b & 0xc0 == 0x40 {
            // Literal with incremental indexing.
            Some(hpack_int(block, &mut pos, 6)?)
        } else if b & 0xe0 == 0x20 {
            // Dynamic table size update.
            hpack_int(block, &mut pos, 5)?;
            None
        } else {
            // Literal without indexing / never indexed.
            Some(hpack_int(block, &mut pos, 4)?)
        };
        let Some(index) = name_index else {
            out.extend_from_slice(&block[start..pos]);
            continue;
        };
        if index == 0 {
            hpack_skip_string(block, &mut pos)?;
        }
        let value_start = pos;
        let (huffman, len) = hpack_skip_string(block, &mut pos)?;
        out.extend_from_slice(&block[start..value_start]);
        if index == AUTHORITY_INDEX {
            // Huffman codes are 5 to 30 bits, so a Huffman string of `len` bytes decodes
            // to at least len * 8 / 30 characters; a raw one to exactly `len`.
            let shortest = if huffman { len * 8 / 30 } else { len };
            let host: &[u8] = if shortest >= 9 { b"localhost" } else { b"l" };
            if shortest == 0 && len == 0 {
                out.extend_from_slice(&block[value_start..pos]);
            } else {
                out.push(u8::try_from(host.len()).ok()?);
                out.extend_from_slice(host);
            }
        } else {
            out.extend_from_slice(&block[value_start..pos]);
        }
    }
    Some(out)
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready_pos < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.ready_pos);
                buf.put_slice(&this.ready[this.ready_pos..this.ready_pos + n]);
                this.ready_pos += n;
                if this.ready_pos == this.ready.len() {
                    this.ready.clear();
                    this.ready_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // The peer closed: hand on whatever incomplete bytes are left.
                this.eof = true;
                this.ready.append(&mut this.pending);
            } else {
                this.pending.extend_from_slice(read.filled());
                this.process();
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for AuthorityFix<UnixStream> {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// `/healthz` and `/metrics` of the node plugin: unhealthy once the kubelet refused the
/// registration (the plugin cannot be used on this node until it registers again).
#[derive(Debug, Clone)]
pub struct PluginProbe {
    registration: Option<Registration>,
}

impl PluginProbe {
    /// A probe that follows `registration` (`None`: the plugin does not register itself).
    pub fn new(registration: Option<Registration>) -> Self {
        PluginProbe { registration }
    }

    /// What `/healthz` and `/metrics` serve for this probe.
    pub fn endpoints(&self) -> Endpoints {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self.clone()));
        Endpoints::new(Arc::new(self.clone()), Arc::new(registry))
    }
}

impl HealthCheck for PluginProbe {
    fn check(&self) -> Result<(), String> {
        match self.registration.as_ref().map(Registration::current) {
            Some(RegistrationState::Failed(e)) => {
                Err(format!("kubelet refused the registration: {e}"))
            }
            _ => Ok(()),
        }
    }
}

impl Collector for PluginProbe {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let registered = matches!(
            self.registration.as_ref().map(Registration::current),
            Some(RegistrationState::Registered)
        );
        gauge(
            &mut encoder,
            "tessera_node_kubelet_registered",
            "1 when the kubelet reported the plugin registered.",
            u32::from(registered),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::proto::registration_client::RegistrationClient;
    use super::*;

    use tessera_telemetry::exposition::render;

    /// The kubelet's side: dial the registration socket, ask for the info, report back.
    #[tokio::test]
    async fn kubelet_client_over_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let csi = Path::new("/var/lib/kubelet/plugins/tessera.csi.dev/csi.sock");
        let reg = Registration::csi("tessera.csi.dev", csi);
        let path = socket_path(dir.path(), "tessera.csi.dev");
        assert_eq!(path, dir.path().join("tessera.csi.dev-reg.sock"));
        let listener = UnixListener::bind(&path).expect("bind");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, reg.clone(), async {
            let _ = stop_rx.await;
        }));

        let channel = tessera_csi_proto::unix_channel::connect_unix(
            tessera_csi_proto::unix_channel::unix_endpoint(),
            &path,
        )
        .await
        .expect("connect");
        let mut client = RegistrationClient::new(channel);

        let info = client
            .get_info(InfoRequest {})
            .await
            .expect("GetInfo")
            .into_inner();
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(info.name, "tessera.csi.dev");
        assert_eq!(info.endpoint, csi.to_str().expect("utf-8"));
        assert_eq!(info.supported_versions, vec!["1.0.0".to_owned()]);

        let mut status = reg.status();
        assert_eq!(*status.borrow(), RegistrationState::Pending);
        let probe = PluginProbe::new(Some(reg.clone()));
        let registry = {
            let mut r = tessera_telemetry::prometheus_client::registry::Registry::default();
            r.register_collector(Box::new(probe.clone()));
            r
        };
        let metrics = || render(&registry).expect("render");
        assert!(probe.check().is_ok());
        assert!(metrics().contains("\ntessera_node_kubelet_registered 0\n"));

        client
            .notify_registration_status(RegistrationStatus {
                plugin_registered: true,
                error: String::new(),
            })
            .await
            .expect("notify registered");
        status.changed().await.expect("state change");
        assert_eq!(*status.borrow(), RegistrationState::Registered);
        assert!(metrics().contains("\ntessera_node_kubelet_registered 1\n"));

        client
            .notify_registration_status(RegistrationStatus {
                plugin_registered: false,
                error: "unsupported version".to_owned(),
            })
            .await
            .expect("notify refused");
        status.changed().await.expect("state change");
        assert_eq!(
            *status.borrow(),
            RegistrationState::Failed("unsupported version".to_owned())
        );
        let unhealthy = probe
            .check()
            .expect_err("refused registration is unhealthy");
        assert!(unhealthy.contains("unsupported version"), "{unhealthy}");

        stop_tx.send(()).expect("server still running");
        server.await.expect("join").expect("serve");
    }

    /// What grpc-go sends when dialled with a bare socket path: `:authority` is the path.
    #[test]
    fn authority_path_is_rewritten() {
        let path = b"/var/lib/kubelet/plugins_registry/tessera.csi.dev-reg.sock";
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http (indexed)
        block.push(0x41); // :authority, literal with incremental indexing
        block.push(u8::try_from(path.len()).expect("short"));
        block.extend_from_slice(path);
        block.extend_from_slice(&[0x44, 0x04]); // :path "/a/b", literal
        block.extend_from_slice(b"/a/b");
        block.extend_from_slice(&[0x3f, 0xe1, 0x1f]); // table size update 4096
        block.push(0xbe); // indexed field 62 (the :authority entry above)
        let got = rewrite_authority(&block).expect("parses");
        let mut want = vec![0x83, 0x86, 0x41, 0x09];
        want.extend_from_slice(b"localhost");
        want.extend_from_slice(&[0x44, 0x04]);
        want.extend_from_slice(b"/a/b");
        want.extend_from_slice(&[0x3f, 0xe1, 0x1f, 0xbe]);
        assert_eq!(got, want);

        // In a frame: the length is rewritten, type/flags/stream kept.
        let mut frame = vec![
            0,
            0,
            u8::try_from(block.len()).expect("short"),
            0x1,
            0x5,
            0,
            0,
            0,
            1,
        ];
        frame.extend_from_slice(&block);
        let out = rewrite_headers_frame(&frame).expect("HEADERS frame");
        assert_eq!(
            &out[..9],
            &[
                0,
                0,
                u8::try_from(want.len()).expect("short"),
                0x1,
                0x5,
                0,
                0,
                0,
                1
            ]
        );
        assert_eq!(&out[9..], &want[..]);
        // DATA frames are left alone.
        frame[3] = 0x0;
        assert!(rewrite_headers_frame(&frame).is_none());
        // A short Huffman value gets the one-character host (never a longer entry).
        assert_eq!(
            rewrite_authority(&[0x41, 0x83, 1, 2, 3]).expect("parses"),
            vec![0x41, 1, b'l']
        );
    }

    /// The wrapper passes a whole connection through byte by byte when nothing matches.
    #[tokio::test]
    async fn passthrough_in_small_reads() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(7);
        let mut sent = PREFACE.to_vec();
        sent.extend_from_slice(&[0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]); // SETTINGS
        sent.extend_from_slice(&[0, 0, 2, 0x0, 0x1, 0, 0, 0, 1, 7, 7]); // DATA
        let expect = sent.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("write");
            client.shutdown().await.expect("shutdown");
        });
        let mut fixed = AuthorityFix::new(server);
        let mut got = Vec::new();
        fixed.read_to_end(&mut got).await.expect("read");
        writer.await.expect("join");
        assert_eq!(got, expect);
    }

    /// The gRPC method paths are the kubelet's, not a `v1`-qualified package.
    #[test]
    fn service_name_matches_the_kubelet() {
        use tonic::server::NamedService;
        assert_eq!(
            <RegistrationServer<Registration> as NamedService>::NAME,
            "pluginregistration.Registration"
        );
    }
}
