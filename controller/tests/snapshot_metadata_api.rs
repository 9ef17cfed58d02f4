//! The Kubernetes SnapshotMetadata API over real TLS on loopback: what is refused
//! before the Kubernetes API is asked (no token, names that are not object names, a
//! delta without its base), that a call is never answered without a review (the API
//! server unreachable: UNAVAILABLE), and that clients must trust the serving
//! certificate. Granting and denying by the real API server's reviews is the e2e's.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tessera_controller::k8s_snapshot_metadata::access::Access;
use tessera_controller::k8s_snapshot_metadata::KubeSnapshotMetadata;
use tessera_controller::kube_api::KubeApi;
use tessera_controller::metrics::Metrics;
use tessera_controller::replica_pool::{PoolConfig, ReplicaPool};
use tessera_controller::SnapshotMetadataService;
use tessera_csi_proto::k8s_snapshot_metadata::snapshot_metadata_client::SnapshotMetadataClient;
use tessera_csi_proto::k8s_snapshot_metadata::snapshot_metadata_server::SnapshotMetadataServer;
use tessera_csi_proto::k8s_snapshot_metadata::{
    GetMetadataAllocatedRequest, GetMetadataDeltaRequest,
};
use tessera_tls::generate::{ClusterCa, DEFAULT_VALIDITY};
use tessera_tls::Identity;
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Code;
use tower::service_fn;

/// A running API server on loopback; dropping it stops it.
struct Served {
    addr: std::net::SocketAddr,
    ca_file: std::path::PathBuf,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

/// Serves the API with a certificate of a fresh CA, reviewing against an "API
/// server" address where nothing listens.
async fn serve() -> Served {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ClusterCa::generate(DEFAULT_VALIDITY).expect("CA");
    // The serving certificate: the replica profile serves TLS for `replica.tessera`.
    let serving = dir.path().join("serving");
    ca.write_dir(&serving, Identity::Replica, DEFAULT_VALIDITY)
        .expect("serving certificate");
    let token = dir.path().join("token");
    std::fs::write(&token, "controller-token").expect("token");
    // Nothing listens on a port just released.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let api_port = closed.local_addr().expect("addr").port().to_string();
    drop(closed);
    let api =
        KubeApi::new("127.0.0.1", &api_port, &serving.join("ca.crt"), token).expect("api client");
    let pool = Arc::new(ReplicaPool::new(PoolConfig {
        static_addresses: vec![],
        dns: None,
        rpc_timeout: Duration::from_secs(1),
        transport: tessera_tls::Transport::plaintext(),
    }));
    let csi = SnapshotMetadataService::new(pool, Arc::new(Metrics::default()));
    let service = KubeSnapshotMetadata::new(csi, Access::new(api, "tessera-snapshot-metadata"));
    let tls = tessera_tls::ServingCert::load(&serving).expect("tls");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SnapshotMetadataServer::new(service))
            .serve_with_incoming_shutdown(
                tessera_tls::grpc::incoming_without_client_auth(listener, tls),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    Served {
        addr,
        ca_file: serving.join("ca.crt"),
        _stop: stop,
        _dir: dir,
    }
}

/// A client trusting `ca_file`, verifying the server as `replica.tessera`.
async fn client(
    addr: std::net::SocketAddr,
    ca_file: &std::path::Path,
) -> Result<SnapshotMetadataClient<Channel>, tonic::transport::Error> {
    let tls = tessera_tls::material::client_trusting(ca_file).expect("client config");
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(service_fn(move |_: Uri| {
            let tls = Arc::clone(&tls);
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let name = ServerName::try_from("replica.tessera").expect("name");
                let stream = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(SnapshotMetadataClient::new(channel))
}

fn allocated(token: &str, namespace: &str, snapshot: &str) -> GetMetadataAllocatedRequest {
    GetMetadataAllocatedRequest {
        security_token: token.into(),
        namespace: namespace.into(),
        snapshot_name: snapshot.into(),
        starting_offset: 0,
        max_results: 0,
    }
}

#[tokio::test]
async fn calls_are_checked_before_anything_is_read() {
    let served = serve().await;
    let mut c = client(served.addr, &served.ca_file).await.expect("connect");

    let no_token = c
        .get_metadata_allocated(allocated("", "default", "snap-1"))
        .await
        .expect_err("no token");
    assert_eq!(no_token.code(), Code::Unauthenticated, "{no_token:?}");

    for (ns, snap) in [
        ("../kube-system", "snap-1"),
        ("default", "a/b"),
        ("Default", "s"),
    ] {
        let bad = c
            .get_metadata_allocated(allocated("t", ns, snap))
            .await
            .expect_err("bad name");
        assert_eq!(bad.code(), Code::InvalidArgument, "{ns}/{snap}: {bad:?}");
    }

    let no_base = c
        .get_metadata_delta(GetMetadataDeltaRequest {
            security_token: "t".into(),
            namespace: "default".into(),
            base_snapshot_id: String::new(),
            target_snapshot_name: "snap-2".into(),
            starting_offset: 0,
            max_results: 0,
        })
        .await
        .expect_err("no base");
    assert_eq!(no_base.code(), Code::InvalidArgument, "{no_base:?}");

    // A well-formed call whose token cannot be reviewed is not answered.
    let unreviewed = c
        .get_metadata_allocated(allocated("some-token", "default", "snap-1"))
        .await
        .expect_err("no API server");
    assert_eq!(unreviewed.code(), Code::Unavailable, "{unreviewed:?}");
    assert!(
        unreviewed.message().contains("Kubernetes API"),
        "{unreviewed:?}"
    );
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_service_cannot_call_it() {
    let served = serve().await;
    let other = tempfile::tempdir().expect("tempdir");
    let stranger = ClusterCa::generate(DEFAULT_VALIDITY).expect("other CA");
    let other_ca = other.path().join("ca.crt");
    std::fs::write(&other_ca, stranger.cert_pem()).expect("write");
    assert!(client(served.addr, &other_ca).await.is_err());
    // The right CA still connects.
    assert!(client(served.addr, &served.ca_file).await.is_ok());
}
