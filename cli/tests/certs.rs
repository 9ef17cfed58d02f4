//! `tessera certs` the way an operator runs it: the directories it writes and the
//! Secrets it prints load the way the daemons load them (each as its own identity
//! only); re-issuing from the CA keeps `ca.crt` and replaces the certificates, and
//! certificates of two runs with one CA complete a mutual TLS handshake while those
//! of two CAs do not; bad input fails with a message saying what is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine;
use tessera_tls::generate::{identity_dir, CA_KEY_FILE};
use tessera_tls::material::{CA_FILE, CERT_FILE, KEY_FILE};
use tessera_tls::{Identity, PeerIdentity, TlsContext, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on one test handshake (a hang is a failure, not a wait).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("certs")
        .args(args)
        .env_remove("TESSERA_TLS_DIR")
        .env_remove("TESSERA_INSECURE_PLAINTEXT")
        .output()
        .expect("running tessera")
}

/// Runs `tessera certs ARGS`, which must succeed; returns stdout and stderr.
fn certs_ok(args: &[&str]) -> (String, String) {
    let out = tessera(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "tessera certs {args:?} failed ({}):\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

/// Runs `tessera certs ARGS`, which must fail; returns stderr (stdout must be empty:
/// nothing half-made is printed).
fn certs_err(args: &[&str]) -> String {
    let out = tessera(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "tessera certs {args:?} must fail; stderr:\n{stderr}"
    );
    assert!(
        out.stdout.is_empty() || !String::from_utf8_lossy(&out.stdout).contains("kind:"),
        "no Secret printed on failure"
    );
    stderr
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tessera-certs-test-")
        .tempdir()
        .expect("temp dir")
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creating a copy");
    for file in [CA_FILE, CERT_FILE, KEY_FILE] {
        std::fs::copy(from.join(file), to.join(file)).expect("copying a certificate file");
    }
}

/// A mutual TLS handshake between a replica daemon's transport from `replica_dir`
/// (server) and the controller's from `controller_dir` (client), and one byte
/// across; the identity the server saw, or why it failed.
async fn handshake(replica_dir: &Path, controller_dir: &Path) -> Result<PeerIdentity, String> {
    let server = Transport::tls(
        TlsContext::load(replica_dir, Identity::Replica).map_err(|e| e.to_string())?,
    );
    let client = Transport::tls(
        TlsContext::load(controller_dir, Identity::Controller).map_err(|e| e.to_string())?,
    );
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let accept = async {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let (mut stream, peer) = server
            .accept(tcp, "test")
            .await
            .map_err(|r| format!("server: {r}"))?;
        stream.write_all(b"!").await.map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer.identity)
    };
    let connect = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut stream = client
            .connect(tcp)
            .await
            .map_err(|e| format!("client: {e}"))?;
        let mut byte = [0u8];
        stream
            .read_exact(&mut byte)
            .await
            .map_err(|e| format!("client read: {e}"))?;
        Ok::<_, String>(byte)
    };
    let both = async { tokio::join!(accept, connect) };
    let (accepted, connected) = tokio::time::timeout(HANDSHAKE_TIMEOUT, both)
        .await
        .map_err(|_| format!("no handshake within {HANDSHAKE_TIMEOUT:?}"))?;
    let identity = accepted?;
    assert_eq!(connected?, *b"!", "the byte crossed");
    Ok(identity)
}

#[test]
fn out_writes_a_directory_per_identity_that_loads_as_that_identity_only() {
    let tmp = temp_dir();
    let out = tmp.path().join("certs");
    let (stdout, _) = certs_ok(&["--out", s(&out)]);
    assert!(
        stdout.contains("--tls-dir"),
        "says how to use them:\n{stdout}"
    );

    let ca = read(&out.join(CA_FILE));
    assert_eq!(mode(&out.join(CA_KEY_FILE)), 0o600, "the CA key is private");
    for identity in Identity::ALL {
        let dir = identity_dir(&out, identity);
        TlsContext::load(&dir, identity)
            .unwrap_or_else(|e| panic!("{identity} directory does not load: {e}"));
        assert_eq!(read(&dir.join(CA_FILE)), ca, "{identity} trusts the CA");
        assert_eq!(
            mode(&dir.join(KEY_FILE)),
            0o600,
            "{identity} key is private"
        );
        for other in Identity::ALL.into_iter().filter(|o| *o != identity) {
            assert!(
                TlsContext::load(&dir, other).is_err(),
                "the {identity} certificate must not load as {other}"
            );
        }
    }
}

#[tokio::test]
async fn reissuing_from_the_ca_keeps_ca_crt_and_the_old_certificates_still_talk_to_the_new() {
    let tmp = temp_dir();
    let out = tmp.path().join("certs");
    certs_ok(&["--out", s(&out)]);
    let ca = read(&out.join(CA_FILE));
    let before: BTreeMap<Identity, Vec<u8>> = Identity::ALL
        .into_iter()
        .map(|id| (id, read(&identity_dir(&out, id).join(CERT_FILE))))
        .collect();
    let old_replica = tmp.path().join("old-replica");
    copy_dir(&identity_dir(&out, Identity::Replica), &old_replica);

    // Rotation in place, as the printed hint says.
    let ca_cert = out.join(CA_FILE);
    let ca_key = out.join(CA_KEY_FILE);
    certs_ok(&[
        "--out",
        s(&out),
        "--ca-cert",
        s(&ca_cert),
        "--ca-key",
        s(&ca_key),
        "--validity-days",
        "30",
    ]);
    assert_eq!(read(&out.join(CA_FILE)), ca, "ca.crt is byte-identical");
    for identity in Identity::ALL {
        let dir = identity_dir(&out, identity);
        assert_eq!(
            read(&dir.join(CA_FILE)),
            ca,
            "{identity}'s ca.crt unchanged"
        );
        assert_ne!(
            read(&dir.join(CERT_FILE)),
            before[&identity],
            "{identity}'s tls.crt is new"
        );
        TlsContext::load(&dir, identity)
            .unwrap_or_else(|e| panic!("re-issued {identity} directory does not load: {e}"));
    }

    // A replica still on the old certificate accepts the controller's new one.
    let new_controller = identity_dir(&out, Identity::Controller);
    assert_eq!(
        handshake(&old_replica, &new_controller).await,
        Ok(PeerIdentity::Verified(Identity::Controller))
    );
    // Certificates of another CA do not.
    let other = tmp.path().join("other");
    certs_ok(&["--out", s(&other)]);
    let foreign = identity_dir(&other, Identity::Controller);
    let refused = handshake(&old_replica, &foreign).await;
    assert!(refused.is_err(), "another CA's controller: {refused:?}");
}

#[test]
fn out_does_not_replace_a_different_ca_and_copies_a_given_one() {
    let tmp = temp_dir();
    let first = tmp.path().join("first");
    certs_ok(&["--out", s(&first)]);
    let ca = read(&first.join(CA_FILE));
    let key = read(&first.join(CA_KEY_FILE));

    let err = certs_err(&["--out", s(&first)]);
    assert!(
        err.contains("already holds a different CA") && err.contains("--ca-cert"),
        "{err}"
    );
    assert_eq!(read(&first.join(CA_FILE)), ca, "the CA stays");
    assert_eq!(read(&first.join(CA_KEY_FILE)), key, "its key stays");

    let second = tmp.path().join("second");
    certs_ok(&[
        "--out",
        s(&second),
        "--ca-cert",
        s(&first.join(CA_FILE)),
        "--ca-key",
        s(&first.join(CA_KEY_FILE)),
    ]);
    assert_eq!(read(&second.join(CA_FILE)), ca, "the given CA is written");
    assert!(second.join(CA_KEY_FILE).is_file(), "with its key");
    assert_eq!(mode(&second.join(CA_KEY_FILE)), 0o600);
}

/// A value of the YAML subset `tessera certs --secrets-yaml` prints.
#[derive(Debug)]
enum Yaml {
    Scalar(String),
    Map(BTreeMap<String, Yaml>),
}

impl Yaml {
    fn at(&self, path: &[&str]) -> &Yaml {
        path.iter().fold(self, |node, key| match node {
            Yaml::Map(map) => map
                .get(*key)
                .unwrap_or_else(|| panic!("no {key:?} in {node:?}")),
            Yaml::Scalar(v) => panic!("{v:?} has no {key:?}"),
        })
    }

    fn str_at(&self, path: &[&str]) -> &str {
        match self.at(path) {
            Yaml::Scalar(v) => v,
            other => panic!("{path:?} is not a scalar: {other:?}"),
        }
    }

    fn keys_at(&self, path: &[&str]) -> BTreeSet<&str> {
        match self.at(path) {
            Yaml::Map(map) => map.keys().map(String::as_str).collect(),
            other => panic!("{path:?} is not a map: {other:?}"),
        }
    }
}

/// Parses one document of nested block mappings (`key: value` and `key:` lines,
/// two spaces per level); panics on anything else, so a malformed document fails.
fn parse_document(text: &str) -> Yaml {
    fn block(lines: &[(usize, &str)], at: &mut usize, indent: usize) -> BTreeMap<String, Yaml> {
        let mut map = BTreeMap::new();
        while let Some(&(depth, line)) = lines.get(*at) {
            if depth < indent {
                break;
            }
            assert_eq!(depth, indent, "unexpected indentation at {line:?}");
            let (key, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("not `key: value`: {line:?}"));
            assert!(!key.is_empty() && !key.contains(' '), "bad key in {line:?}");
            *at += 1;
            let value = value.trim();
            let node = if value.is_empty() {
                Yaml::Map(block(lines, at, indent + 2))
            } else {
                assert!(
                    !value.starts_with(['"', '\'', '|', '>', '&', '*', '[', '{']),
                    "unsupported value in {line:?}"
                );
                Yaml::Scalar(value.to_owned())
            };
            assert!(
                map.insert(key.to_owned(), node).is_none(),
                "duplicate {key}"
            );
        }
        map
    }
    let lines: Vec<(usize, &str)> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let trimmed = l.trim_start_matches(' ');
            (l.len() - trimmed.len(), trimmed)
        })
        .collect();
    let mut at = 0;
    let doc = block(&lines, &mut at, 0);
    assert_eq!(at, lines.len(), "trailing lines in:\n{text}");
    Yaml::Map(doc)
}

/// The documents of a `---`-separated stream.
fn parse_stream(text: &str) -> Vec<Yaml> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line == "---" {
            docs.push(String::new());
        } else if let Some(doc) = docs.last_mut() {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.retain(|d| !d.trim().is_empty());
    docs.iter().map(|d| parse_document(d)).collect()
}

/// The Secrets `--secrets-yaml` printed, each written out as it would be mounted.
struct Unpacked {
    /// `root/<identity>` per identity.
    identities: BTreeMap<Identity, PathBuf>,
    /// `root/snapshot-metadata`: the SnapshotMetadata API's serving certificate.
    serving: PathBuf,
}

/// Checks the four Secrets in `yaml` (names, type, namespace, labels, exactly the
/// three data keys) and writes each one's decoded data to `root/<identity>` (the
/// serving certificate's to `root/snapshot-metadata`), as a mounted Secret would
/// appear.
fn unpack_secrets(yaml: &str, namespace: &str, root: &Path) -> Unpacked {
    let docs = parse_stream(yaml);
    assert_eq!(docs.len(), 4, "four Secrets:\n{yaml}");
    let mut dirs = BTreeMap::new();
    let mut serving = None;
    for doc in &docs {
        assert_eq!(doc.str_at(&["apiVersion"]), "v1");
        assert_eq!(doc.str_at(&["kind"]), "Secret");
        assert_eq!(doc.str_at(&["type"]), "kubernetes.io/tls");
        assert_eq!(doc.str_at(&["metadata", "namespace"]), namespace);
        let labels = ["metadata", "labels"];
        assert_eq!(
            doc.str_at(&[labels[0], labels[1], "app.kubernetes.io/name"]),
            "tessera"
        );
        assert_eq!(
            doc.str_at(&[labels[0], labels[1], "app.kubernetes.io/component"]),
            "tls"
        );
        assert_eq!(
            doc.keys_at(&["data"]),
            BTreeSet::from([CA_FILE, CERT_FILE, KEY_FILE]),
            "exactly ca.crt, tls.crt, tls.key: never the CA key"
        );
        let name = doc.str_at(&["metadata", "name"]);
        let identity = if name == "tessera-snapshot-metadata-tls" {
            None
        } else {
            let identity: Identity = name
                .strip_prefix("tessera-tls-")
                .unwrap_or_else(|| panic!("unexpected Secret name {name}"))
                .parse()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            Some(identity)
        };
        let dir = root.join(identity.map_or("snapshot-metadata", |i| i.as_str()));
        std::fs::create_dir_all(&dir).expect("creating a Secret's directory");
        for file in [CA_FILE, CERT_FILE, KEY_FILE] {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(doc.str_at(&["data", file]))
                .unwrap_or_else(|e| panic!("{name} {file} is not base64: {e}"));
            std::fs::write(dir.join(file), bytes).expect("writing a decoded file");
        }
        match identity {
            Some(identity) => {
                assert!(dirs.insert(identity, dir).is_none(), "{name} printed twice")
            }
            None => assert!(serving.replace(dir).is_none(), "{name} printed twice"),
        }
    }
    assert_eq!(dirs.len(), 3, "one Secret per identity");
    Unpacked {
        identities: dirs,
        serving: serving.expect("the SnapshotMetadata API's serving certificate"),
    }
}

/// A TLS handshake with the server config of the serving certificate in `serving`
/// and a client that trusts `ca_file` and dials `name`; Err says which side failed.
async fn serves_as(serving: &Path, ca_file: &Path, name: &str) -> Result<(), String> {
    let server = tessera_tls::material::server_without_client_auth(serving)
        .map_err(|e| format!("server config: {e}"))?;
    let client = tessera_tls::material::client_trusting(ca_file)
        .map_err(|e| format!("client config: {e}"))?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let accept = async {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut stream = tokio_rustls::TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| format!("server: {e}"))?;
        stream.write_all(b"!").await.map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())
    };
    let connect = async {
        let server_name =
            rustls::pki_types::ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut stream = tokio_rustls::TlsConnector::from(client)
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("client: {e}"))?;
        let mut byte = [0u8];
        stream
            .read_exact(&mut byte)
            .await
            .map_err(|e| format!("client read: {e}"))
    };
    let both = async { tokio::join!(accept, connect) };
    let (accepted, connected) = tokio::time::timeout(HANDSHAKE_TIMEOUT, both)
        .await
        .map_err(|_| format!("no handshake within {HANDSHAKE_TIMEOUT:?}"))?;
    // The client's verdict is the one that matters; the server then sees a closed
    // connection.
    connected?;
    accepted
}

#[tokio::test]
async fn secrets_yaml_prints_tls_secrets_that_mount_as_working_directories() {
    let tmp = temp_dir();
    let ca_dir = tmp.path().join("ca");
    let (yaml, stderr) = certs_ok(&[
        "--secrets-yaml",
        "--namespace",
        "storage-test",
        "--out-ca",
        s(&ca_dir),
    ]);
    assert!(
        stderr.contains(s(&ca_dir)),
        "says where the CA went:\n{stderr}"
    );
    let unpacked = unpack_secrets(&yaml, "storage-test", &tmp.path().join("mounted"));
    let dirs = &unpacked.identities;
    let ca = read(&ca_dir.join(CA_FILE));
    assert_eq!(mode(&ca_dir.join(CA_KEY_FILE)), 0o600);
    let ca_key = read(&ca_dir.join(CA_KEY_FILE));
    for (identity, dir) in dirs {
        TlsContext::load(dir, *identity)
            .unwrap_or_else(|e| panic!("Secret of {identity} does not load: {e}"));
        assert_eq!(read(&dir.join(CA_FILE)), ca, "{identity} carries the CA");
        assert_ne!(read(&dir.join(KEY_FILE)), ca_key, "not the CA's key");
    }
    assert_eq!(
        handshake(&dirs[&Identity::Replica], &dirs[&Identity::Controller]).await,
        Ok(PeerIdentity::Verified(Identity::Controller))
    );

    // The SnapshotMetadata API's certificate: from the same CA, valid for its
    // Service's names in the namespace and nothing else, and no identity.
    let serving = &unpacked.serving;
    assert_eq!(
        read(&serving.join(CA_FILE)),
        ca,
        "serving Secret carries the CA"
    );
    for name in [
        "tessera-snapshot-metadata.storage-test.svc",
        "tessera-snapshot-metadata.storage-test.svc.cluster.local",
        "tessera-snapshot-metadata.storage-test",
        "tessera-snapshot-metadata",
    ] {
        serves_as(serving, &ca_dir.join(CA_FILE), name)
            .await
            .unwrap_or_else(|e| panic!("serving certificate for {name}: {e}"));
    }
    let wrong = serves_as(
        serving,
        &ca_dir.join(CA_FILE),
        "tessera-snapshot-metadata.tessera-system.svc",
    )
    .await
    .expect_err("another namespace's name");
    assert!(wrong.contains("client"), "the client refuses: {wrong}");
    for identity in Identity::ALL {
        assert!(
            TlsContext::load(serving, identity).is_err(),
            "the serving certificate loads as the {identity} identity"
        );
    }

    // The kept CA issues a rotation: same ca.crt in every Secret.
    let ca_cert = ca_dir.join(CA_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let (rotated, stderr) = certs_ok(&[
        "--secrets-yaml",
        "--ca-cert",
        s(&ca_cert),
        "--ca-key",
        s(&ca_key_path),
    ]);
    assert!(stderr.contains(s(&ca_cert)), "names the CA used:\n{stderr}");
    let again = unpack_secrets(&rotated, "tessera-system", &tmp.path().join("rotated")).identities;
    for (identity, dir) in &again {
        assert_eq!(read(&dir.join(CA_FILE)), ca, "{identity} keeps the CA");
        assert_ne!(
            read(&dir.join(CERT_FILE)),
            read(&dirs[identity].join(CERT_FILE)),
            "{identity} has a new certificate"
        );
    }
    assert_eq!(
        handshake(&dirs[&Identity::Replica], &again[&Identity::Controller]).await,
        Ok(PeerIdentity::Verified(Identity::Controller)),
        "old replica, rotated controller"
    );
}

#[test]
fn secrets_yaml_without_out_ca_says_the_key_was_discarded() {
    let tmp = temp_dir();
    let (yaml, stderr) = certs_ok(&["--secrets-yaml"]);
    assert!(stderr.contains("discarded"), "{stderr}");
    let dirs = unpack_secrets(&yaml, "tessera-system", tmp.path()).identities;
    TlsContext::load(&dirs[&Identity::Node], Identity::Node).expect("node Secret loads");
}

#[test]
fn bad_input_fails_with_a_message_naming_the_problem() {
    let tmp = temp_dir();
    let missing = tmp.path().join("missing.crt");
    let out = tmp.path().join("out");
    let err = certs_err(&[
        "--out",
        s(&out),
        "--ca-cert",
        s(&missing),
        "--ca-key",
        s(&missing),
    ]);
    assert!(
        err.contains("reading the CA certificate") && err.contains(s(&missing)),
        "{err}"
    );
    assert!(!out.exists(), "nothing written");

    // A CA certificate with another CA's key: refused before anything is written.
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    certs_ok(&["--out", s(&a)]);
    certs_ok(&["--out", s(&b)]);
    let err = certs_err(&[
        "--out",
        s(&out),
        "--ca-cert",
        s(&a.join(CA_FILE)),
        "--ca-key",
        s(&b.join(CA_KEY_FILE)),
    ]);
    assert!(err.contains("as the CA"), "{err}");
    assert!(!out.exists(), "nothing written");
    let err = certs_err(&[
        "--secrets-yaml",
        "--ca-cert",
        s(&a.join(CA_FILE)),
        "--ca-key",
        s(&a.join(CA_FILE)),
    ]);
    assert!(err.contains("as the CA"), "a certificate is no key: {err}");

    let err = certs_err(&["--secrets-yaml", "--namespace", "Not_A_Namespace"]);
    assert!(err.contains("namespace"), "{err}");
    let err = certs_err(&["--out", s(&out), "--ca-cert", s(&a.join(CA_FILE))]);
    assert!(err.contains("--ca-key"), "{err}");
    let err = certs_err(&[]);
    assert!(err.contains("--out"), "{err}");
    let err = certs_err(&["--out", s(&out), "--secrets-yaml"]);
    assert!(err.contains("cannot be used with"), "{err}");
    let err = certs_err(&["--out", s(&out), "--validity-days", "0"]);
    assert!(err.contains("validity-days"), "{err}");
    assert!(!out.exists(), "nothing written");
}
