//! Mutual TLS on a running cluster of real processes: certificate rotation without a
//! restart, a broken rotation refused, and the plain-text mode benchmarks compare
//! against.
//!
//! Every test starts its own cluster ([`ClusterBuilder`]: a CA of its own under the
//! cluster directory, three replica daemons, the controller, node n1's engine-host
//! and node plugin), attaches an RF=3 raw block volume on n1 the way Kubernetes does
//! and runs the random writer on it: 4 KiB O_DIRECT writes with an fdatasync every
//! 16 and a checked read every 8, failing on any I/O error or stale read. The daemons
//! look for rotated certificate files every second (`--tls-reload-secs 1`); the
//! tests wait for what the daemons report on /metrics, polling with deadlines.
//!
//! Which certificate a daemon presents is read off a TLS connection this file makes
//! itself with rustls (trusting the cluster CA, presenting a node's or the
//! controller's certificate), independently of `tessera-tls`' client.
//!
//! The tests run one at a time and need root, `/dev/fuse` and `/dev/loop-control`
//! (unless `TESSERA_SKIP_PRIVILEGED_TESTS=1` is set).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tessera_replica_protocol::control_proto::ListVolumesRequest;
use tessera_replica_protocol::data::{ClientConfig, ReplicaDataClient};
use tessera_tests::csi::{connect_tcp, ReplicaClient};
use tessera_tests::lifecycle::{
    attach, block_capability, create_volume, kubelet_paths, node_condition, Attachment,
};
use tessera_tests::privilege::privileged;
use tessera_tests::random_writer::{read_back, RandomWriteLog, RandomWriter, WriterBounds};
use tessera_tests::{poll_until, Cluster, ClusterBuilder};
use tessera_tls::generate::write_file;
use tessera_tls::material::{CA_FILE, CERT_FILE, KEY_FILE};
use tessera_tls::{Identity, TlsContext, Transport};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// One test at a time: each runs five daemons, FUSE and a loop device on shared cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MIB: usize = 1 << 20;
/// Longest a test waits for every daemon to notice changed certificate files (they
/// look every second).
const RELOAD_WITHIN: Duration = Duration::from_secs(30);
/// Longest a test waits for the volume to be whole again after a daemon restart.
const IN_SYNC_WITHIN: Duration = Duration::from_secs(120);
/// Longest the writer may run in one test.
const WRITER_TIME: Duration = Duration::from_secs(600);
/// Writes the writer does once told to stop (then it flushes).
const WRITES_AFTER_STOP: u64 = 200;
/// Writes that must complete at each point a test checks the writer goes on.
const WRITES_PER_STEP: u64 = 400;
/// How long one TLS connection of this file may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The cluster every test here runs: /metrics on every daemon, certificate files
/// checked every second; plain text when asked.
async fn start_cluster(plaintext: bool) -> Cluster {
    ClusterBuilder::new()
        .replica_metrics(true)
        .controller_metrics(true)
        .engine_host_metrics(true)
        .tls_reload_secs(1)
        .plaintext(plaintext)
        .start()
        .await
        .expect("cluster starts")
}

/// An RF=3 raw block volume of 64 MiB, attached on n1, with the writer running.
async fn attach_with_writer(
    cluster: &Cluster,
    name: &str,
    seed: u64,
) -> (Attachment, RandomWriter) {
    let mut controller = cluster.controller().await.expect("controller");
    let mut node = cluster.node_client("n1").await.expect("n1 plugin");
    let volume = create_volume(
        &mut controller,
        name,
        64 * MIB,
        &[("replicationFactor", "3")],
        true,
    )
    .await;
    let (staging, target) = kubelet_paths(cluster, "n1", name, true);
    let a = attach(
        &mut controller,
        &mut node,
        &volume,
        "n1",
        block_capability(),
        &staging,
        &target,
    )
    .await
    .unwrap_or_else(|e| panic!("attach {name} on n1: {e:#}"));
    let writer = RandomWriter::start(
        a.target.clone(),
        seed,
        WriterBounds::for_faults(WRITER_TIME, WRITES_AFTER_STOP),
    );
    writer.wait_for(WRITES_PER_STEP).await;
    (a, writer)
}

/// Waits for `more` writes beyond those done so far (panics if the writer failed).
async fn writer_goes_on(writer: &RandomWriter, more: u64) {
    let at = writer.written();
    writer.wait_for(at + more).await;
}

/// Stops the writer; every block it made durable reads back as its last write, and
/// `tessera verify` (as the controller) finds the in-sync replicas identical.
async fn final_checks(cluster: &Cluster, a: &Attachment, writer: RandomWriter) -> RandomWriteLog {
    writer.kill_done();
    let log = writer
        .finish()
        .await
        .unwrap_or_else(|e| panic!("the writer failed: {e}"));
    let device = a.target.clone();
    let expected = log.last_durable.clone();
    tokio::task::spawn_blocking(move || read_back(&device, &expected))
        .await
        .expect("reader task")
        .unwrap_or_else(|e| panic!("reading back: {e}"))
        .assert_all_current("at the end");
    cluster
        .verify(&a.volume_id)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    log
}

/// A daemon's transport counter, e.g. `tls_reloads` (`<prefix>_tls_reloads_total`).
#[derive(Debug)]
struct PerDaemon(Vec<(String, u64)>);

impl PerDaemon {
    fn all(&self, pred: impl Fn(u64) -> bool) -> bool {
        self.0.iter().all(|(_, v)| pred(*v))
    }
}

/// `name` (a counter every daemon's transport exports, without prefix and `_total`)
/// of every replica daemon, the controller and the engine-host; also checks the
/// plain-text gauge says what the cluster runs.
async fn per_daemon(cluster: &Cluster, name: &str) -> anyhow::Result<PerDaemon> {
    let plaintext = u64::from(cluster.tls().is_plaintext());
    let mut pages = Vec::new();
    for replica in cluster.replicas() {
        pages.push((
            format!("replica {}", replica.node_id()),
            "tessera_replica",
            replica.metrics().await?,
        ));
    }
    pages.push((
        "controller".to_owned(),
        "tessera_controller",
        cluster.controller_metrics().await?,
    ));
    for node in cluster.nodes() {
        pages.push((
            format!("engine-host {}", node.node_id()),
            "tessera_engine",
            node.engine_host_metrics().await?,
        ));
    }
    let mut values = Vec::new();
    for (daemon, prefix, page) in pages {
        let gauge = format!("{prefix}_transport_plaintext");
        anyhow::ensure!(
            page.counter(&gauge, &[]) == Some(plaintext),
            "{daemon}: {gauge} is {:?}, the cluster runs {}",
            page.counter(&gauge, &[]),
            if plaintext == 1 { "plain text" } else { "TLS" }
        );
        let counter = format!("{prefix}_{name}");
        let value = page.counter(&counter, &[]).ok_or_else(|| {
            anyhow::anyhow!(
                "{daemon} exports no {counter}: {:?}",
                page.names_containing("tls")
            )
        })?;
        values.push((daemon, value));
    }
    Ok(PerDaemon(values))
}

/// Waits until `name` is at least `min` on every daemon; returns the values.
async fn wait_every_daemon(cluster: &Cluster, name: &str, min: u64) -> PerDaemon {
    let last = std::cell::RefCell::new(None);
    let reached = poll_until(RELOAD_WITHIN, || async {
        let got = per_daemon(cluster, name).await;
        let done = matches!(&got, Ok(v) if v.all(|n| n >= min));
        *last.borrow_mut() = Some(got);
        done.then_some(())
    })
    .await;
    let last = last.into_inner();
    match (reached, last) {
        (Ok(()), Some(Ok(values))) => values,
        (_, last) => {
            panic!("not every daemon's {name} reached {min} within {RELOAD_WITHIN:?}: {last:?}")
        }
    }
}

/// Connections and calls the replica daemons refused, summed over port and reason.
async fn refused_by_replicas(cluster: &Cluster) -> u64 {
    let mut total = 0.0;
    for replica in cluster.replicas() {
        let page = replica.metrics().await.expect("replica /metrics");
        total += page
            .find("tessera_replica_refused_total", &[])
            .map(|s| s.value)
            .sum::<f64>();
    }
    total as u64
}

/// The files of a certificate directory, read at one moment (a test keeps them to
/// connect with after it broke the directory on disk).
#[derive(Clone)]
struct CertFiles {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl CertFiles {
    fn read(dir: &Path) -> CertFiles {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        };
        CertFiles {
            ca: read(CA_FILE),
            cert: read(CERT_FILE),
            key: read(KEY_FILE),
        }
    }

    /// The DER of the leaf certificate.
    fn leaf(&self) -> CertificateDer<'static> {
        CertificateDer::pem_slice_iter(&self.cert)
            .next()
            .expect("a certificate in tls.crt")
            .expect("tls.crt is PEM")
    }
}

/// The certificates of `identity` in `cluster` as they are on disk now.
fn cert_files(cluster: &Cluster, identity: Identity) -> CertFiles {
    CertFiles::read(&cluster.tls().dir(identity).expect("a TLS cluster"))
}

/// Opens a new TLS connection to `addr` as the holder of `client` (trusting its CA,
/// presenting its certificate), verifying the server as a replica daemon; returns
/// the certificate the server presented. The connection is then closed cleanly.
async fn presented_certificate(addr: SocketAddr, client: &CertFiles) -> CertificateDer<'static> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&client.ca) {
        roots.add(ca.expect("ca.crt is PEM")).expect("a usable CA");
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&client.cert)
        .collect::<Result<_, _>>()
        .expect("tls.crt is PEM");
    let key = PrivateKeyDer::from_pem_slice(&client.key).expect("tls.key is PEM");
    #[allow(deprecated)] // ring, as tessera-tls uses
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("certificate and key match");
    let name = ServerName::try_from(Identity::Replica.dns_name()).expect("a DNS name");
    let connect = async {
        let tcp = TcpStream::connect(addr).await?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
    };
    let mut tls = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .unwrap_or_else(|_| panic!("no TLS handshake with {addr} within {CONNECT_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server presented a certificate")
        .clone()
        .into_owned();
    // close_notify, so the daemon sees a clean end and counts nothing.
    let _ = tls.shutdown().await;
    presented
}

/// Every replica daemon presents `want` to new connections on both ports: to a
/// node's certificate on the data port, to the controller's on the control port.
async fn every_replica_presents(
    cluster: &Cluster,
    want: &CertificateDer<'_>,
    node: &CertFiles,
    controller: &CertFiles,
    when: &str,
) {
    for replica in cluster.replicas() {
        for (port, addr, client) in [
            ("data", replica.data_addr(), node),
            ("control", replica.control_addr(), controller),
        ] {
            let got = presented_certificate(addr, client).await;
            assert!(
                &got == want,
                "{when}: replica {} presented another certificate on its {port} port",
                replica.node_id()
            );
        }
    }
}

/// Every replica daemon takes `controller` on its control port (ListVolumes is the
/// controller's alone) and `node` on its data plane (HELLO and GET_MEMBERSHIP on
/// `a`'s volume at its epoch), each on a new connection.
async fn every_replica_accepts(
    cluster: &Cluster,
    a: &Attachment,
    controller: &Transport,
    node: &Transport,
    when: &str,
) {
    for replica in cluster.replicas() {
        let channel = connect_tcp(replica.control_addr(), controller)
            .await
            .unwrap_or_else(|e| panic!("{when}: control port of {}: {e}", replica.node_id()));
        let records = ReplicaClient::new(channel)
            .list_volumes(ListVolumesRequest {})
            .await
            .unwrap_or_else(|s| panic!("{when}: ListVolumes on {}: {s}", replica.node_id()))
            .into_inner()
            .volumes;
        assert!(
            records.iter().any(|r| r.volume_id == a.volume_id),
            "{when}: replica {} lists no record of {}",
            replica.node_id(),
            a.volume_id
        );
        let config = ClientConfig {
            transport: node.clone(),
            ..ClientConfig::default()
        };
        let client =
            ReplicaDataClient::connect_with(replica.data_addr(), &a.volume_id, a.epoch(), config)
                .await
                .unwrap_or_else(|e| panic!("{when}: data plane of {}: {e}", replica.node_id()));
        client
            .membership()
            .await
            .unwrap_or_else(|e| panic!("{when}: GET_MEMBERSHIP on {}: {e}", replica.node_id()));
    }
}

/// The transport of `identity` loaded from its directory as it is on disk now.
fn transport_from_disk(cluster: &Cluster, identity: Identity) -> Transport {
    let dir = cluster.tls().dir(identity).expect("a TLS cluster");
    Transport::tls(
        TlsContext::load(&dir, identity)
            .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display())),
    )
}

/// Kills replica daemon n3 and starts it again: the engine connects to it anew (as
/// its counters on the new daemon show) and brings it back in sync while the writer
/// goes on.
async fn restart_and_resync(cluster: &mut Cluster, a: &Attachment, writer: &RandomWriter) {
    let index = cluster.replica_index("n3").expect("a replica daemon on n3");
    cluster
        .restart_replica(index)
        .await
        .expect("n3's daemon restarts");
    let served = poll_until(IN_SYNC_WITHIN, || async {
        let page = cluster.replica(index).metrics().await.ok()?;
        let done = page
            .counter(
                "tessera_replica_volume_io_completed",
                &[("volume_id", a.volume_id.as_str())],
            )
            .unwrap_or(0);
        (done > 0).then_some(())
    })
    .await;
    assert!(
        served.is_ok(),
        "the engine did not reach the restarted n3 within {IN_SYNC_WITHIN:?}"
    );
    let plugin = cluster.node_client("n1").await.expect("n1 plugin");
    let whole = poll_until(IN_SYNC_WITHIN, || {
        let mut plugin = plugin.clone();
        async move { (!node_condition(&mut plugin, a).await.abnormal).then_some(()) }
    })
    .await;
    if whole.is_err() {
        let mut plugin = plugin.clone();
        panic!(
            "the volume is not whole {IN_SYNC_WITHIN:?} after n3's restart: {:?}",
            node_condition(&mut plugin, a).await
        );
    }
    writer_goes_on(writer, WRITES_PER_STEP).await;
}

/// New leaf certificates for all three identities, from the same CA, while the
/// volume is written: every daemon takes its new files without a restart, the writer
/// never sees an error, new connections to the replicas get the new replica
/// certificate and are accepted with the new node and controller certificates, the
/// engine reconnects to a restarted replica with them, nobody is refused along the
/// way, and nothing written is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_are_taken_without_a_restart_or_an_io_error() {
    if !privileged("TLS rotation test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = start_cluster(false).await;
    let (a, writer) = attach_with_writer(&cluster, "rotated", 0x7151).await;

    let before = per_daemon(&cluster, "tls_reloads")
        .await
        .expect("transport metrics");
    assert!(
        before.all(|n| n == 0),
        "reloads before any rotation: {before:?}"
    );
    let old = cert_files(&cluster, Identity::Replica).leaf();
    let (node, controller) = (
        cert_files(&cluster, Identity::Node),
        cert_files(&cluster, Identity::Controller),
    );
    every_replica_presents(&cluster, &old, &node, &controller, "before the rotation").await;

    for identity in Identity::ALL {
        cluster
            .rotate_certificate(identity)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    let new = cert_files(&cluster, Identity::Replica).leaf();
    assert!(new != old, "the rotation issued the same certificate");
    let reloads = wait_every_daemon(&cluster, "tls_reloads", 1).await;
    eprintln!("reloads: {reloads:?}");
    writer_goes_on(&writer, WRITES_PER_STEP).await;

    // New connections, with the new node and controller certificates.
    let (node, controller) = (
        cert_files(&cluster, Identity::Node),
        cert_files(&cluster, Identity::Controller),
    );
    every_replica_presents(&cluster, &new, &node, &controller, "after the rotation").await;
    every_replica_accepts(
        &cluster,
        &a,
        &transport_from_disk(&cluster, Identity::Controller),
        &transport_from_disk(&cluster, Identity::Node),
        "after the rotation",
    )
    .await;
    // The engine's own new connections: to a daemon that just started.
    restart_and_resync(&mut cluster, &a, &writer).await;

    assert_eq!(
        refused_by_replicas(&cluster).await,
        0,
        "a replica daemon refused a connection or call during the rotation"
    );
    let log = final_checks(&cluster, &a, writer).await;
    eprintln!(
        "rotation: {} writes, {} syncs, {} checked reads in {:?}",
        log.writes, log.syncs, log.reads, log.elapsed
    );
}

/// A rotation to a garbage key is refused by every daemon (counted as a reload
/// failure) while they keep serving with the certificates they had: the writer goes
/// on, new connections still get the old replica certificate and are accepted with
/// the old client certificates. A good rotation after it is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_to_a_broken_key_is_refused_and_the_old_certificates_stay() {
    if !privileged("TLS rotation test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let cluster = start_cluster(false).await;
    let (a, writer) = attach_with_writer(&cluster, "broken", 0xb10c).await;

    let old = cert_files(&cluster, Identity::Replica).leaf();
    let (node, controller) = (
        cert_files(&cluster, Identity::Node),
        cert_files(&cluster, Identity::Controller),
    );
    for identity in Identity::ALL {
        let key = cluster
            .tls()
            .dir(identity)
            .expect("a TLS cluster")
            .join(KEY_FILE);
        write_file(&key, b"not a private key\n", 0o600)
            .unwrap_or_else(|e| panic!("breaking {}: {e}", key.display()));
    }
    let failures = wait_every_daemon(&cluster, "tls_reload_failures", 1).await;
    eprintln!("reload failures: {failures:?}");
    let reloads = per_daemon(&cluster, "tls_reloads")
        .await
        .expect("transport metrics");
    assert!(
        reloads.all(|n| n == 0),
        "a daemon took a broken key: {reloads:?}"
    );
    writer_goes_on(&writer, WRITES_PER_STEP).await;

    // Still serving, with what they had: the old replica certificate, and the old
    // client certificates accepted (the test's transports were loaded at start).
    every_replica_presents(
        &cluster,
        &old,
        &node,
        &controller,
        "after the broken rotation",
    )
    .await;
    every_replica_accepts(
        &cluster,
        &a,
        &cluster.transport(Identity::Controller),
        &cluster.transport(Identity::Node),
        "after the broken rotation",
    )
    .await;
    assert_eq!(
        refused_by_replicas(&cluster).await,
        0,
        "a replica daemon refused a connection or call after the broken rotation"
    );

    // A good rotation afterwards is taken.
    for identity in Identity::ALL {
        cluster
            .rotate_certificate(identity)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    wait_every_daemon(&cluster, "tls_reloads", 1).await;
    let new = cert_files(&cluster, Identity::Replica).leaf();
    let (node, controller) = (
        cert_files(&cluster, Identity::Node),
        cert_files(&cluster, Identity::Controller),
    );
    every_replica_presents(&cluster, &new, &node, &controller, "after the repair").await;
    writer_goes_on(&writer, WRITES_PER_STEP).await;
    final_checks(&cluster, &a, writer).await;
}

/// `ClusterBuilder::plaintext`: no certificates anywhere, every daemon reports plain
/// text, and the data path, the harness's clients and `tessera verify`
/// (`--insecure-plaintext`) work as with TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_cluster_runs_without_certificates() {
    if !privileged("plain-text cluster test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let cluster = start_cluster(true).await;
    assert!(cluster.tls_root().is_none());
    assert!(
        !cluster.dir().join("tls").exists(),
        "a plain-text cluster wrote certificates"
    );
    let (a, writer) = attach_with_writer(&cluster, "plain", 0x91a1).await;
    // per_daemon checks every daemon's *_transport_plaintext is 1.
    let reloads = per_daemon(&cluster, "tls_reloads")
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(reloads.all(|n| n == 0), "{reloads:?}");
    every_replica_accepts(
        &cluster,
        &a,
        &cluster.transport(Identity::Controller),
        &cluster.transport(Identity::Node),
        "in plain text",
    )
    .await;
    // A TLS client gets nowhere with a plain-text daemon.
    let root = tempfile::tempdir().expect("temp dir");
    tessera_tls::generate::ClusterCa::generate(tessera_tls::generate::DEFAULT_VALIDITY)
        .and_then(|ca| ca.write_all(root.path(), tessera_tls::generate::DEFAULT_VALIDITY))
        .expect("certificates");
    let tls = Transport::tls(
        TlsContext::load(&root.path().join("controller"), Identity::Controller)
            .expect("controller certificate"),
    );
    let control = cluster.replica(0).control_addr();
    let refused = async {
        let channel = connect_tcp(control, &tls).await?;
        ReplicaClient::new(channel)
            .list_volumes(ListVolumesRequest {})
            .await
            .map_err(anyhow::Error::from)?;
        anyhow::Ok(())
    };
    assert!(
        tokio::time::timeout(CONNECT_TIMEOUT, refused)
            .await
            .map_or(true, |r| r.is_err()),
        "a TLS client listed the volumes of a plain-text daemon"
    );
    final_checks(&cluster, &a, writer).await;
}
