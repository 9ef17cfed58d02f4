//! Transport security of the real `tessera-replica` binary: who is refused on its
//! control and data ports, how, that a refusal changes nothing, and that every
//! refusal is counted on `/metrics` by port and reason.
//!
//! Each test starts a daemon with the replica certificate of a CA made in its work
//! directory (`daemon_support::cluster_tls`), creates a volume as the controller and
//! raises its epoch, remembers the volume's record and a fingerprint of the whole data
//! directory, and then tries what the port must refuse:
//! * clients tessera-tls would never make, built with rustls here: one without a
//!   certificate, and one with a controller certificate from another CA (it trusts the
//!   cluster's CA, which is public, so the daemon is the one judging it);
//! * certificates of the cluster naming an identity that may not do the thing (a node
//!   changing volumes, a replica creating one or sending HELLO);
//! * HELLO epochs no engine may hold;
//! * plain text against TLS.
//!
//! Afterwards the record, the volume list and the data directory are what they were.
//! A daemon started with `--insecure-plaintext` serves plain-text clients and says so
//! on `/metrics`. Harness in `daemon_support` (own process group, killed in Drop,
//! deadline polls, no fixed sleeps).

mod daemon_support;

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use daemon_support::{
    cluster_tls, control_client, create_req, entries, get_req, tls_transport, workdir, Daemon,
    PLAINTEXT, POLL,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tessera_replica_protocol::control_proto as proto;
use tessera_replica_protocol::control_proto::replica_control_client::ReplicaControlClient;
use tessera_replica_protocol::data::frame::{self, Frame, Header, Opcode, RESPONSE_BIT};
use tessera_replica_protocol::data::message::{
    decode_error_payload, Hello, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tessera_replica_protocol::data::stream::read_frame;
use tessera_replica_protocol::data::{
    ClientConfig, ClientError, ErrorCode, RemoteError, ReplicaDataClient,
};
use tessera_replica_protocol::seq::MAX_EPOCH;
use tessera_tls::generate::{ClusterCa, DEFAULT_VALIDITY};
use tessera_tls::{Identity, Transport};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Uri};
use tonic::Code;

const BS: u64 = 4096;
const MIB: u64 = 1 << 20;
/// The volume the controller made before anyone else tried anything.
const VOL: &str = "v";
/// Its epoch, raised by the controller: what every refused HELLO must leave.
const EPOCH: u64 = 7;
/// The volume intruders try to create.
const INTRUDER: &str = "intruder";
/// An epoch near the top of u64, far above any an engine may hold.
const FORGED_EPOCH: u64 = u64::MAX - 1;
/// Longest a refusal may take to show on /metrics.
const METRICS_DEADLINE: Duration = Duration::from_secs(15);

/// Refusal counters, by (port, reason).
type Refusals = BTreeMap<(String, String), u64>;

/// Every `tessera_replica_refused_total{port,reason}` sample on a /metrics page.
fn parse_refusals(page: &str) -> Refusals {
    const PREFIX: &str = "tessera_replica_refused_total{port=\"";
    page.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(PREFIX)?;
            let (port, rest) = rest.split_once("\",reason=\"")?;
            let (reason, value) = rest.split_once("\"} ")?;
            let n = value
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("{line}: {e}"));
            Some(((port.to_owned(), reason.to_owned()), n))
        })
        .collect()
}

fn key(port: &str, reason: &str) -> (String, String) {
    (port.to_owned(), reason.to_owned())
}

/// A daemon with TLS, a volume the controller made at [`EPOCH`], and what the test
/// must find unchanged.
struct Fixture {
    daemon: Daemon,
    data_dir: PathBuf,
    record: proto::VolumeRecord,
    disk: Fingerprint,
    /// Dropped last: the daemon's files and certificates.
    work: tempfile::TempDir,
}

impl Fixture {
    async fn start() -> Fixture {
        let work = workdir();
        let data_dir = work.path().join("data");
        let daemon = Daemon::start(
            work.path(),
            &data_dir,
            &["--capacity", "1Gi", "--metrics-listen", "127.0.0.1:0"],
        )
        .await;
        let mut ctl = daemon.client().await;
        ctl.create_volume(create_req(VOL, MIB))
            .await
            .expect("the controller creates a volume");
        ctl.raise_epoch(proto::RaiseEpochRequest {
            volume_id: VOL.into(),
            expected_epoch: 0,
            new_epoch: EPOCH,
        })
        .await
        .expect("the controller raises its epoch");
        let record = ctl
            .get_volume(get_req(VOL))
            .await
            .expect("get volume")
            .into_inner();
        assert_eq!(record.epoch, EPOCH);
        let disk = Fingerprint::of(&data_dir);
        let page = daemon.metrics_page().await;
        assert!(
            page.contains("\ntessera_replica_transport_plaintext 0\n"),
            "{page}"
        );
        assert_eq!(parse_refusals(&page), Refusals::new(), "{page}");
        Fixture {
            daemon,
            data_dir,
            record,
            disk,
            work,
        }
    }

    /// The certificates of the daemon's cluster.
    fn tls(&self) -> PathBuf {
        cluster_tls(self.work.path())
    }

    /// The rustls client configuration of `stranger` for this daemon's cluster.
    fn stranger(&self, stranger: Stranger) -> Arc<rustls::ClientConfig> {
        let ca = std::fs::read(self.tls().join("ca.crt")).expect("the cluster's ca.crt");
        match stranger {
            Stranger::NoCertificate => rustls_client(&ca, None),
            Stranger::OtherCa => {
                let other = ClusterCa::generate(DEFAULT_VALIDITY).expect("another CA");
                let issued = other
                    .issue(Identity::Controller, DEFAULT_VALIDITY)
                    .expect("a controller certificate from the other CA");
                rustls_client(&ca, Some((&issued.cert_pem, &issued.key_pem)))
            }
        }
    }

    /// The daemon's refusal counters now.
    async fn refusals(&self) -> Refusals {
        parse_refusals(&self.daemon.metrics_page().await)
    }

    /// Polls /metrics until the count of (`port`, `reason`) is above its value in
    /// `before`; returns the counters then.
    async fn refused_since(&self, before: &Refusals, port: &str, reason: &str) -> Refusals {
        let k = key(port, reason);
        let was = before.get(&k).copied().unwrap_or(0);
        self.counts_until(&format!("{port}/{reason} above {was}"), |now| {
            now.get(&k).copied().unwrap_or(0) > was
        })
        .await
    }

    /// Polls /metrics until the count of (`port`, `reason`) is exactly `n`.
    async fn refused_exactly(&self, port: &str, reason: &str, n: u64) -> Refusals {
        let k = key(port, reason);
        self.counts_until(&format!("{port}/{reason} at {n}"), |now| {
            now.get(&k).copied().unwrap_or(0) == n
        })
        .await
    }

    async fn counts_until(&self, what: &str, done: impl Fn(&Refusals) -> bool) -> Refusals {
        let deadline = Instant::now() + METRICS_DEADLINE;
        loop {
            let page = self.daemon.metrics_page().await;
            let now = parse_refusals(&page);
            if done(&now) {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "refusal counters never reached {what}:\n{page}\n{}",
                self.daemon.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Asserts that the only refusals counted are `expected` (by port and reason).
    async fn assert_refused_only(&self, expected: &[(&str, &str)]) {
        let got: BTreeSet<(String, String)> = self
            .refusals()
            .await
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, _)| k)
            .collect();
        let want: BTreeSet<(String, String)> = expected.iter().map(|(p, r)| key(p, r)).collect();
        assert_eq!(got, want, "refusals counted by port and reason");
    }

    /// Asserts that nothing the refused clients tried left a trace: the volume is
    /// there with the same record (epoch included), no other volume exists, and the
    /// data directory holds the same files with the same bytes.
    async fn assert_unchanged(&self) {
        let mut ctl = self.daemon.client().await;
        let record = ctl
            .get_volume(get_req(VOL))
            .await
            .expect("the volume is still there")
            .into_inner();
        assert_eq!(record, self.record, "the volume's record changed");
        let listed: Vec<String> = ctl
            .list_volumes(proto::ListVolumesRequest {})
            .await
            .expect("list volumes")
            .into_inner()
            .volumes
            .into_iter()
            .map(|v| v.volume_id)
            .collect();
        assert_eq!(listed, [VOL], "volumes on the daemon");
        let err = ctl
            .get_volume(get_req(INTRUDER))
            .await
            .expect_err("no intruder volume");
        assert_eq!(err.code(), Code::NotFound, "{err}");
        assert_eq!(entries(&self.data_dir.join("volumes")), [VOL]);
        self.disk.assert_same(&Fingerprint::of(&self.data_dir));
    }
}

/// Every path under a directory, with its kind, size and a hash of its bytes.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint(BTreeMap<PathBuf, (&'static str, u64, u64)>);

impl Fingerprint {
    fn of(dir: &Path) -> Fingerprint {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (&'static str, u64, u64)>) {
            for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            {
                let path = entry.expect("directory entry").path();
                let rel = path.strip_prefix(root).expect("under root").to_path_buf();
                let meta = std::fs::symlink_metadata(&path).expect("stat");
                if meta.is_dir() {
                    out.insert(rel, ("dir", 0, 0));
                    walk(root, &path, out);
                } else {
                    let bytes =
                        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    let mut h = DefaultHasher::new();
                    h.write(&bytes);
                    out.insert(rel, ("file", meta.len(), h.finish()));
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(dir, dir, &mut out);
        assert!(
            out.keys().any(|p| p.ends_with("record")),
            "no volume record under {}: {out:?}",
            dir.display()
        );
        Fingerprint(out)
    }

    fn assert_same(&self, now: &Fingerprint) {
        for (path, was) in &self.0 {
            assert_eq!(now.0.get(path), Some(was), "{} changed", path.display());
        }
        let added: Vec<&PathBuf> = now.0.keys().filter(|p| !self.0.contains_key(*p)).collect();
        assert!(added.is_empty(), "new in the data directory: {added:?}");
    }
}

/// Clients tessera-tls would not make.
#[derive(Debug, Clone, Copy)]
enum Stranger {
    /// Trusts the cluster's CA, presents no certificate.
    NoCertificate,
    /// Trusts the cluster's CA, presents a controller certificate of another CA.
    OtherCa,
}

/// A rustls client trusting `ca_pem`, presenting `cert` (certificate and key PEM).
fn rustls_client(ca_pem: &[u8], cert: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.expect("CA PEM")).expect("a root");
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let config = match cert {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("certificate PEM");
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key PEM");
            builder
                .with_client_auth_cert(chain, key)
                .expect("a client certificate")
        }
    };
    Arc::new(config)
}

/// TLS with `config` to `addr`, verifying the daemon as every Tessera client does.
async fn rustls_connect(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(Identity::Replica.dns_name())
        .expect("a DNS name")
        .to_owned();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// A control-API client over rustls connections made with `config`.
async fn stranger_control(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<ReplicaControlClient<Channel>, tonic::transport::Error> {
    let endpoint = tessera_tls::grpc::endpoint(addr)?;
    let connector = tower::service_fn(move |uri: Uri| {
        let config = Arc::clone(&config);
        async move {
            let authority = uri
                .authority()
                .map(|a| a.to_string())
                .ok_or_else(|| io::Error::other(format!("{uri} names no address")))?;
            let tls = rustls_connect(&authority, config).await?;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let channel = endpoint.connect_with_connector(connector).await?;
    Ok(ReplicaControlClient::new(channel))
}

/// CreateVolume of [`INTRUDER`] over `client` (or what connecting it gave): it must
/// fail in the transport, never reach the service or the authorization layer behind
/// it. Returns how it failed.
async fn create_must_not_get_through(
    client: Result<ReplicaControlClient<Channel>, tonic::transport::Error>,
) -> String {
    let mut client = match client {
        Err(e) => return format!("connecting failed: {e:?}"),
        Ok(c) => c,
    };
    match client.create_volume(create_req(INTRUDER, MIB)).await {
        Ok(r) => panic!("the daemon created a volume for a refused client: {r:?}"),
        Err(s) => {
            // The connection broke under the call; an answer of the service (or of
            // the authorization layer) would mean it had been accepted.
            let broke =
                std::error::Error::source(&s).is_some_and(|e| e.is::<tonic::transport::Error>());
            assert!(broke, "expected a transport failure, got {s:?}");
            format!("the call failed: {s:?}")
        }
    }
}

/// The HELLO frame an engine of `epoch` sends for `volume`.
fn hello_frame(volume: &str, epoch: u64) -> Vec<u8> {
    let hello = Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        volume_id: volume.to_owned(),
    };
    let header = Header {
        opcode: Opcode::Hello as u8,
        request_id: 1,
        epoch,
        ..Header::default()
    };
    frame::encode(&header, &hello.encode()).expect("a HELLO frame")
}

/// Sends HELLO on `stream` and reads the answer: `Ok(None)` when the daemon closed
/// the connection instead, an error when the stream broke.
async fn hello_on<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    volume: &str,
    epoch: u64,
) -> Result<Option<Frame>, String> {
    stream
        .write_all(&hello_frame(volume, epoch))
        .await
        .map_err(|e| format!("writing HELLO: {e}"))?;
    stream
        .flush()
        .await
        .map_err(|e| format!("flushing HELLO: {e}"))?;
    read_frame(stream)
        .await
        .map_err(|e| format!("reading the answer: {e:?}"))
}

/// HELLO at `epoch` over a rustls connection made with `config`: it must get no
/// answer at all (the handshake fails before any frame is read). Returns how it
/// failed.
async fn stranger_hello(addr: &str, config: Arc<rustls::ClientConfig>, epoch: u64) -> String {
    let mut tls = match rustls_connect(addr, config).await {
        Err(e) => return format!("handshake failed: {e}"),
        Ok(s) => s,
    };
    // TLS 1.3 finishes the client's side before the daemon has judged it.
    match hello_on(&mut tls, VOL, epoch).await {
        Ok(Some(f)) => panic!("a refused client's HELLO was answered: {f:?}"),
        Ok(None) => "closed without an answer".to_owned(),
        Err(e) => e,
    }
}

/// The error reply of a refused data-plane connect.
fn remote(result: Result<ReplicaDataClient, ClientError>) -> RemoteError {
    match result {
        Err(ClientError::Remote(r)) => r,
        Err(other) => panic!("expected an error reply, got {other:?}"),
        Ok(c) => panic!("HELLO accepted: {:?}", c.info()),
    }
}

#[tokio::test]
async fn control_port_refuses_strangers_and_other_identities_and_nothing_changes() {
    let f = Fixture::start().await;
    let d = &f.daemon;

    // Without a certificate, and with one from another CA: no TLS session, so no
    // call reaches the daemon.
    let how = create_must_not_get_through(
        stranger_control(&d.control, f.stranger(Stranger::NoCertificate)).await,
    )
    .await;
    eprintln!("no certificate: {how}");
    let seen = f
        .refused_since(&Refusals::new(), "control", "no_certificate")
        .await;
    let how = create_must_not_get_through(
        stranger_control(&d.control, f.stranger(Stranger::OtherCa)).await,
    )
    .await;
    eprintln!("another CA: {how}");
    f.refused_since(&seen, "control", "untrusted_certificate")
        .await;

    // A node may ask what the daemon is, and nothing else.
    let mut node = d.client_as(Identity::Node).await;
    let info = node
        .get_info(proto::GetInfoRequest {})
        .await
        .expect("any identity may GetInfo")
        .into_inner();
    assert_eq!(info.volume_count, 1);
    let denied = [
        node.delete_volume(proto::DeleteVolumeRequest {
            volume_id: VOL.into(),
        })
        .await
        .map(|_| ())
        .expect_err("a node deletes a volume"),
        node.create_volume(create_req(INTRUDER, MIB))
            .await
            .map(|_| ())
            .expect_err("a node creates a volume"),
        node.list_volumes(proto::ListVolumesRequest {})
            .await
            .map(|_| ())
            .expect_err("a node lists the records"),
        // A replica reads blocks from its peers, it does not make volumes.
        d.client_as(Identity::Replica)
            .await
            .create_volume(create_req(INTRUDER, MIB))
            .await
            .map(|_| ())
            .expect_err("a replica creates a volume"),
    ];
    for status in &denied {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("controller identity"),
            "says whose call it is: {status:?}"
        );
    }
    f.refused_exactly("control", "wrong_identity", denied.len() as u64)
        .await;

    f.assert_unchanged().await;
    f.assert_refused_only(&[
        ("control", "no_certificate"),
        ("control", "untrusted_certificate"),
        ("control", "wrong_identity"),
    ])
    .await;
}

#[tokio::test]
async fn data_port_refuses_strangers_and_replicas_and_no_epoch_moves() {
    let f = Fixture::start().await;
    let d = &f.daemon;

    // Without a certificate, and with one from another CA: a HELLO forging an epoch
    // near u64::MAX gets no answer, the handshake fails first.
    let how = stranger_hello(&d.data, f.stranger(Stranger::NoCertificate), FORGED_EPOCH).await;
    eprintln!("no certificate: {how}");
    let seen = f
        .refused_since(&Refusals::new(), "data", "no_certificate")
        .await;
    let how = stranger_hello(&d.data, f.stranger(Stranger::OtherCa), FORGED_EPOCH).await;
    eprintln!("another CA: {how}");
    f.refused_since(&seen, "data", "untrusted_certificate")
        .await;

    // The replica identity may not HELLO: PERMISSION_DENIED, then the connection is
    // closed.
    let tcp = TcpStream::connect(&d.data).await.expect("connect");
    let mut as_replica = d
        .transport(Identity::Replica)
        .connect(tcp)
        .await
        .expect("TLS as a replica");
    let reply = hello_on(&mut as_replica, VOL, EPOCH)
        .await
        .expect("an answer")
        .expect("an error reply before the close");
    assert_eq!(reply.header.opcode, Opcode::Hello as u8 | RESPONSE_BIT);
    assert_eq!(
        ErrorCode::from_u16(reply.header.status),
        Some(ErrorCode::PermissionDenied),
        "{reply:?}"
    );
    let (_, message) = decode_error_payload(&reply.payload);
    assert!(message.contains("replica"), "{message}");
    match read_frame(&mut as_replica).await {
        Ok(None) | Err(_) => {}
        Ok(Some(f)) => panic!("the connection stayed open: {f:?}"),
    }
    // Nor with a forged epoch.
    let forged = remote(
        ReplicaDataClient::connect_with(
            d.data.as_str(),
            VOL,
            FORGED_EPOCH,
            ClientConfig {
                transport: d.transport(Identity::Replica),
                ..ClientConfig::default()
            },
        )
        .await,
    );
    assert_eq!(forged.code, ErrorCode::PermissionDenied, "{forged:?}");
    f.refused_exactly("data", "wrong_identity", 2).await;

    // Identities that may HELLO still cannot take an epoch beyond the seq layout.
    for (identity, epoch) in [
        (Identity::Node, MAX_EPOCH + 1),
        (Identity::Node, FORGED_EPOCH),
        (Identity::Controller, FORGED_EPOCH),
    ] {
        let r = remote(
            ReplicaDataClient::connect_with(
                d.data.as_str(),
                VOL,
                epoch,
                ClientConfig {
                    transport: d.transport(identity),
                    ..ClientConfig::default()
                },
            )
            .await,
        );
        assert_eq!(
            (r.code, r.detail),
            (ErrorCode::InvalidRequest, MAX_EPOCH),
            "{identity} at {epoch}: {r:?}"
        );
    }

    f.assert_unchanged().await;
    f.assert_refused_only(&[
        ("data", "no_certificate"),
        ("data", "untrusted_certificate"),
        ("data", "wrong_identity"),
    ])
    .await;

    // And an engine at the volume's epoch is served, as before.
    let c = d.data_client(VOL, EPOCH).await.expect("an engine's HELLO");
    assert_eq!(c.info().epoch, EPOCH);
    assert_eq!(
        c.read(0, BS as u32).await.expect("read"),
        vec![0u8; BS as usize]
    );
}

#[tokio::test]
async fn plain_text_clients_are_refused_on_both_ports() {
    let f = Fixture::start().await;
    let d = &f.daemon;
    let plain = Transport::plaintext();

    let how = create_must_not_get_through(control_client(&d.control, &plain).await).await;
    eprintln!("plain text on the control port: {how}");
    let seen = f
        .refused_since(&Refusals::new(), "control", "handshake")
        .await;

    let refused = ReplicaDataClient::connect_with(
        d.data.as_str(),
        VOL,
        FORGED_EPOCH,
        ClientConfig {
            transport: plain,
            ..ClientConfig::default()
        },
    )
    .await;
    match refused {
        Err(ClientError::Remote(r)) => panic!("a plain-text HELLO was answered: {r:?}"),
        Err(e) => eprintln!("plain text on the data port: {e:?}"),
        Ok(c) => panic!("a plain-text HELLO was accepted: {:?}", c.info()),
    }
    f.refused_since(&seen, "data", "handshake").await;

    f.assert_unchanged().await;
    f.assert_refused_only(&[("control", "handshake"), ("data", "handshake")])
        .await;
}

#[tokio::test]
async fn an_insecure_plaintext_daemon_serves_plain_text_and_says_so() {
    let work = workdir();
    let data_dir = work.path().join("data");
    let d = Daemon::start(
        work.path(),
        &data_dir,
        &[
            "--capacity",
            "1Gi",
            "--metrics-listen",
            "127.0.0.1:0",
            PLAINTEXT,
        ],
    )
    .await;
    assert!(d.tls.is_none(), "the harness talks plain text to it");

    // Plain-text clients do everything.
    d.client()
        .await
        .create_volume(create_req(VOL, MIB))
        .await
        .expect("create over plain text");
    let c = d.data_client(VOL, 1).await.expect("HELLO over plain text");
    c.write(0, vec![0x5a; BS as usize], (1 << 40) | 1)
        .await
        .expect("write over plain text");
    assert_eq!(
        c.read(0, BS as u32).await.expect("read"),
        vec![0x5a; BS as usize]
    );

    let page = d.metrics_page().await;
    assert!(
        page.contains("\ntessera_replica_transport_plaintext 1\n"),
        "{page}"
    );
    assert!(d.log().contains("INSECURE"), "{}", d.log());

    // A TLS client gets nowhere: the daemon does not speak TLS.
    let tls = tls_transport(&cluster_tls(work.path()), Identity::Controller);
    let how = create_must_not_get_through(control_client(&d.control, &tls).await).await;
    eprintln!("TLS against plain text: {how}");
    let listed = d
        .client()
        .await
        .list_volumes(proto::ListVolumesRequest {})
        .await
        .expect("list")
        .into_inner()
        .volumes;
    assert_eq!(listed.len(), 1);
}
