//! The transport over real loopback TCP with certificates this crate generates: who
//! gets through, who is refused and why, and rotation.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use tessera_tls::generate::{ClusterCa, DEFAULT_VALIDITY};
use tessera_tls::transport::RefusalReason;
use tessera_tls::{Identity, PeerIdentity, ServingCert, TlsContext, TlsError, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn dir_for(ca: &ClusterCa, root: &Path, identity: Identity) -> std::path::PathBuf {
    let dir = root.join(identity.as_str());
    ca.write_dir(&dir, identity, DEFAULT_VALIDITY)
        .expect("write certificates");
    dir
}

fn transport(dir: &Path, identity: Identity) -> Transport {
    Transport::tls(TlsContext::load(dir, identity).expect("load certificates"))
}

/// Accepts one connection on a fresh listener with `server`; returns what
/// `accept` said and what the client side's `connect` said.
async fn one_connection(
    server: &Transport,
    client: &Transport,
) -> (Result<PeerIdentity, RefusalReason>, std::io::Result<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = server.clone();
    let accepting = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        match server.accept(tcp, "test").await {
            Ok((mut stream, peer)) => {
                let mut b = [0u8; 4];
                stream.read_exact(&mut b).await.expect("read ping");
                stream.write_all(b"pong").await.expect("write pong");
                stream.flush().await.expect("flush");
                Ok(peer.identity)
            }
            Err(r) => Err(r.reason),
        }
    });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let connected = async {
        let mut stream = client.connect(tcp).await?;
        stream.write_all(b"ping").await?;
        stream.flush().await?;
        let mut b = [0u8; 4];
        stream.read_exact(&mut b).await?;
        if &b != b"pong" {
            return Err(std::io::Error::other(format!("got {b:?}, not pong")));
        }
        Ok(())
    }
    .await;
    (accepting.await.expect("server task"), connected)
}

#[tokio::test]
async fn each_identity_is_recognised_by_a_replica() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = ClusterCa::generate(DEFAULT_VALIDITY).expect("CA");
    let replica = transport(
        &dir_for(&ca, tmp.path(), Identity::Replica),
        Identity::Replica,
    );
    for identity in Identity::ALL {
        let client = transport(&dir_for(&ca, tmp.path(), identity), identity);
        let (accepted, connected) = one_connection(&replica, &client).await;
        assert_eq!(accepted, Ok(PeerIdentity::Verified(identity)));
        connected.expect("client side");
    }
    assert!(replica.refusals().snapshot().is_empty());
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = ClusterCa::generate(DEFAULT_VALIDITY).expect("CA");
    let other = ClusterCa::generate(DEFAULT_VALIDITY).expect("other CA");
    let replica = transport(
        &dir_for(&ca, tmp.path(), Identity::Replica),
        Identity::Replica,
    );
    let stranger = transport(
        &dir_for(&other, &tmp.path().join("other"), Identity::Controller),
        Identity::Controller,
    );
    let (accepted, connected) = one_connection(&replica, &stranger).await;
    // The stranger does not trust the replica either, so either side may give up
    // first; the replica must not have let it in.
    assert!(accepted.is_err(), "{accepted:?}");
    assert!(connected.is_err());
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_as_such() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = ClusterCa::generate(DEFAULT_VALIDITY).expect("CA");
    let replica = transport(
        &dir_for(&ca, tmp.path(), Identity::Replica),
        Identity::Replica,
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = replica.clone();
    let accepting = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        server
            .accept(tcp, "test")
            .await
            .map(|_| ())
            .map_err(|r| r.reason)
    });
    // A client that trusts the CA but has no certificate of its own.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()) {
        roots.add(c.expect("CA PEM")).expect("root");
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("replica.tessera").expect("name");
    let client = tokio_rustls::TlsConnector::from(Arc::new(config));
    if let Ok(mut s) = client.connect(name, tcp).await {
        // TLS 1.3 finishes the client's side before the server has judged it.
        let _ = s.write_all(b"ping").await;
        let mut b = [0u8; 4];
        assert!(s.read_exact(&mut b).await.is_err());
    }
    assert_eq!(
        accepting.await.expect("server task"),
        Err(RefusalReason::NoCertificate)
    );
    assert_eq!(
        replica.refusals().snapshot(),
        vec![("test", RefusalReason::NoCertificate, 1)]
    );
}

#[tokio::test]
async fn a_plain_text_client_is_refused_by_a_tls_replica() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = ClusterCa::generate(DEFAULT_VALIDITY).expect("CA");
    let replica = transport(
        &dir_for(&ca, tmp.path(), Identity::Replica),
        Identity::Replica,
    );
    let (accepted, connected) = one_connection(&replica, &Transport::plaintext()).await;
    assert_eq!(accepted, Err(RefusalReason::Handshake));
    assert!(connected.is_err());
}

#[test]
fn a_directory_of_another_identity_is_refused_at_load() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = ClusterCa::generate(DEFAULT_VALIDITY).expect("CA");
    let node = dir_for(&ca, tmp.path(), Identity::Node);
    match TlsContext::load(&node, Identity::Replica) {
        Err(TlsError::WrongIdentity { expected, why, .. }) => {
            assert_eq!(expected, Identity::Replica);
            assert!(why.contains("node") || why.contains("server"), "{why}");
        }
        other => panic!("expected WrongIdentity, got {other:?}"),
    }
    match TlsContext::load(&tmp.path().join("missing"), Identity::Node) {
        Err(TlsError::Read { path, .. }) => assert!(path.ends_with("missing/ca.crt")),
        other => panic!("expected Read, got {other:?}"),
    }
}

#[tokio::test]
async fn rotated_files_are_taken_and_broken_ones_are_not() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = ClusterCa::generate(DEFAULT_VALIDITY).expect("CA");
    let dir = dir_for(&ca, tmp.path(), Identity::Replica);
    let context = TlsContext::load(&dir, Identity::Replica).expect("load");
    assert!(!context.reload().expect("unchanged"));
    let before = context.server_config();

    // A new CA and certificate: taken whole, old connections' config untouched.
    let next = ClusterCa::generate(DEFAULT_VALIDITY).expect("next CA");
    next.write_dir(&dir, Identity::Replica, DEFAULT_VALIDITY)
        .expect("rotate");
    assert!(context.reload().expect("rotated"));
    assert!(!Arc::ptr_eq(&before, &context.server_config()));
    assert_eq!(context.reloads(), 1);

    // A new client of the new CA gets through; one of the old CA no longer does.
    let server = Transport::tls(context.clone());
    let new_client = transport(
        &dir_for(&next, &tmp.path().join("n"), Identity::Node),
        Identity::Node,
    );
    let old_client = transport(
        &dir_for(&ca, &tmp.path().join("o"), Identity::Node),
        Identity::Node,
    );
    assert_eq!(
        one_connection(&server, &new_client).await.0,
        Ok(PeerIdentity::Verified(Identity::Node))
    );
    assert!(one_connection(&server, &old_client).await.0.is_err());

    // A half-written key: refused, the rotated configuration stays in use.
    std::fs::write(dir.join("tls.key"), b"-----BEGIN PRIVATE KEY-----\ngarbage").expect("break");
    let current = context.server_config();
    assert!(context.reload().is_err());
    assert_eq!(context.reload_failures(), 1);
    assert!(Arc::ptr_eq(&current, &context.server_config()));
    tokio::time::timeout(Duration::from_secs(10), async {
        assert_eq!(
            one_connection(&server, &new_client).await.0,
            Ok(PeerIdentity::Verified(Identity::Node))
        );
    })
    .await
    .expect("still serving");
}

#[test]
fn a_leaf_certificate_is_not_taken_for_a_ca() {
    let ca = ClusterCa::generate(DEFAULT_VALIDITY).expect("CA");
    let leaf = ca.issue(Identity::Replica, DEFAULT_VALIDITY).expect("leaf");
    assert!(matches!(
        ClusterCa::load(&leaf.cert_pem, &leaf.key_pem),
        Err(tessera_tls::generate::GenerateError::NotACa)
    ));
    // The CA itself, loaded back, issues certificates that chain to it.
    let again = ClusterCa::load(ca.cert_pem(), &ca.key_pem()).expect("the CA loads");
    let tmp = tempfile::tempdir().expect("tempdir");
    again
        .write_dir(tmp.path(), Identity::Node, DEFAULT_VALIDITY)
        .expect("write");
    TlsContext::load(tmp.path(), Identity::Node).expect("issued by the reloaded CA");
}

/// The certificate a client sees from a server presenting `serving`'s current one,
/// dialled as `name` with `ca_file` trusted (DER), or why the handshake failed.
async fn presented(serving: &ServingCert, ca_file: &Path, name: &str) -> Result<Vec<u8>, String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(serving.server_config());
    let accept = async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut s = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        s.write_all(b"!").await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())
    };
    let client = tessera_tls::material::client_trusting(ca_file).map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
    let connect = async move {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut s = tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut byte = [0u8];
        s.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        let der = s.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec();
        Ok::<_, String>(der)
    };
    let (accepted, connected) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(accept, connect)
    })
    .await
    .expect("no hang");
    let der = connected?;
    accepted?;
    Ok(der)
}

fn der_of(pem: &str) -> Vec<u8> {
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}

/// The SnapshotMetadata API's serving certificate: a rotation is taken without a
/// restart (new connections see the new certificate), a broken key is refused and
/// the rotated certificate stays in use.
#[tokio::test]
async fn a_serving_certificate_is_reloaded_and_a_broken_one_is_not() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = ClusterCa::generate(DEFAULT_VALIDITY).expect("CA");
    let ca_file = tmp.path().join("ca.crt");
    std::fs::write(&ca_file, ca.cert_pem()).expect("ca");
    let dir = tmp.path().join("serving");
    std::fs::create_dir(&dir).expect("dir");
    let names = ["svc.ns.svc".to_string()];
    let write = |issued: &tessera_tls::generate::Issued| {
        std::fs::write(dir.join("tls.crt"), &issued.cert_pem).expect("cert");
        std::fs::write(dir.join("tls.key"), &issued.key_pem).expect("key");
    };
    let first = ca.issue_server(&names, DEFAULT_VALIDITY).expect("first");
    write(&first);
    let serving = ServingCert::load(&dir).expect("load");
    assert!(!serving.reload().expect("unchanged"));
    assert_eq!(
        presented(&serving, &ca_file, "svc.ns.svc").await,
        Ok(der_of(&first.cert_pem))
    );
    assert!(
        presented(&serving, &ca_file, "other.ns.svc").await.is_err(),
        "valid for its names only"
    );

    let second = ca.issue_server(&names, DEFAULT_VALIDITY).expect("second");
    write(&second);
    assert!(serving.reload().expect("rotated"));
    assert_eq!(
        presented(&serving, &ca_file, "svc.ns.svc").await,
        Ok(der_of(&second.cert_pem))
    );

    std::fs::write(dir.join("tls.key"), b"-----BEGIN PRIVATE KEY-----\ngarbage").expect("break");
    assert!(serving.reload().is_err());
    // A key of another certificate: the pair does not match.
    std::fs::write(dir.join("tls.key"), &first.key_pem).expect("mismatch");
    assert!(serving.reload().is_err());
    assert_eq!(
        presented(&serving, &ca_file, "svc.ns.svc").await,
        Ok(der_of(&second.cert_pem)),
        "the rotated certificate stays in use"
    );
}
