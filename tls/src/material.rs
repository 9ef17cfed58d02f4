//! A certificate directory and the rustls configurations built from it.
//!
//! The file names are those of a Kubernetes TLS Secret (`tls.crt`, `tls.key`) plus the
//! CA (`ca.crt`), so a Secret mounted as a volume is a certificate directory as it is.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::identity::Identity;

/// The cluster CA's certificate(s): whom to trust.
pub const CA_FILE: &str = "ca.crt";
/// This process's certificate chain (leaf first).
pub const CERT_FILE: &str = "tls.crt";
/// This process's private key (PKCS#8, PKCS#1 or SEC1 PEM).
pub const KEY_FILE: &str = "tls.key";

/// ALPN for gRPC; the data plane offers nothing (it is the only protocol on its port).
const H2: &[u8] = b"h2";

/// Why a certificate directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path} (give the certificate directory with --tls-dir, or run with --insecure-plaintext)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    Missing { path: PathBuf, what: &'static str },
    #[error("{path}: invalid PEM {what}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path}: CA certificate not usable")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{dir}: {what}")]
    Config {
        dir: PathBuf,
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("{dir}: cannot build the client-certificate verifier")]
    Verifier {
        dir: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("{path} is not a {expected} certificate from the CA in {ca}: {why}")]
    WrongIdentity {
        path: PathBuf,
        ca: PathBuf,
        expected: Identity,
        why: String,
    },
}

/// The bytes of a certificate directory, compared to notice a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Files {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// The bytes of file `name` in `dir`.
fn read_in(dir: &Path, name: &str) -> Result<Vec<u8>, TlsError> {
    let path = dir.join(name);
    std::fs::read(&path).map_err(|source| TlsError::Read { path, source })
}

impl Files {
    pub(crate) fn read(dir: &Path) -> Result<Files, TlsError> {
        Ok(Files {
            ca: read_in(dir, CA_FILE)?,
            cert: read_in(dir, CERT_FILE)?,
            key: read_in(dir, KEY_FILE)?,
        })
    }
}

/// What a process uses for the connections it accepts and makes.
#[derive(Debug, Clone)]
pub(crate) struct Configs {
    pub(crate) server: Arc<ServerConfig>,
    pub(crate) client: Arc<ClientConfig>,
}

/// *ring*: it builds with just a C compiler, in seconds, on a fresh machine, where
/// aws-lc would add a long C build to every CI run. rustls deprecates it for lacking
/// post-quantum key exchange, which traffic inside one cluster does not need yet.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Configs {
    /// Builds both configurations from `files` (read from `dir`), checking that the
    /// certificate is one the CA issued for `identity`, so a mix-up of Secrets fails
    /// at start (or at reload, keeping the old files) rather than at the first call.
    pub(crate) fn build(
        dir: &Path,
        files: &Files,
        identity: Identity,
    ) -> Result<Configs, TlsError> {
        let ca_path = dir.join(CA_FILE);
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let cas = certificates(&ca_path, &files.ca, "CA certificate")?;
        let chain = certificates(&cert_path, &files.cert, "certificate")?;
        let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|source| match source {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::Missing {
                path: key_path.clone(),
                what: "private key",
            },
            source => TlsError::Pem {
                path: key_path.clone(),
                what: "private key",
                source,
            },
        })?;
        let mut roots = RootCertStore::empty();
        for ca in &cas {
            roots.add(ca.clone()).map_err(|source| TlsError::BadCa {
                path: ca_path.clone(),
                source,
            })?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider())
            .build()
            .map_err(|source| TlsError::Verifier {
                dir: dir.to_path_buf(),
                source,
            })?;
        check_own_identity(&chain, &roots, verifier.as_ref(), identity).map_err(|why| {
            TlsError::WrongIdentity {
                path: cert_path.clone(),
                ca: ca_path.clone(),
                expected: identity,
                why,
            }
        })?;
        let config_error = |what| {
            let dir = dir.to_path_buf();
            move |source| TlsError::Config { dir, what, source }
        };

        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error("protocol versions"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config_error("certificate and key do not match"))?;
        server.alpn_protocols = vec![H2.to_vec()];

        let mut client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error("protocol versions"))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(config_error("certificate and key do not match"))?;
        client.alpn_protocols = vec![H2.to_vec()];
        Ok(Configs {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

fn certificates(
    path: &Path,
    pem: &[u8],
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_path_buf(),
            what,
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(certs)
}

/// Checks that the leaf of `chain` verifies against `roots`, now, by the rules its
/// peers will apply: as a client certificate (every identity makes connections) and,
/// for a replica, also as the server certificate of the replica name; and that it
/// names `identity`.
fn check_own_identity(
    chain: &[CertificateDer<'static>],
    roots: &Arc<RootCertStore>,
    as_client: &dyn rustls::server::danger::ClientCertVerifier,
    identity: Identity,
) -> Result<(), String> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err("no certificate".into());
    };
    let now = rustls::pki_types::UnixTime::now();
    as_client
        .verify_client_cert(leaf, intermediates, now)
        .map_err(|e| format!("as a client certificate: {e}"))?;
    if identity == Identity::Replica {
        use rustls::client::danger::ServerCertVerifier;
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::clone(roots), provider())
            .build()
            .map_err(|e| e.to_string())?
            .verify_server_cert(
                leaf,
                intermediates,
                &Identity::replica_server_name(),
                &[],
                now,
            )
            .map_err(|e| format!("as a server certificate: {e}"))?;
    }
    match Identity::of_certificate(leaf) {
        Some(found) if found == identity => Ok(()),
        Some(found) => Err(format!("it names the {found} identity")),
        None => Err(format!(
            "it names none of {} (or more than one)",
            Identity::ALL.map(Identity::dns_name).join(", ")
        )),
    }
}

/// A server configuration presenting `tls.crt`/`tls.key` from `dir` to clients that
/// bring no certificate: for ports that authenticate callers otherwise (the
/// SnapshotMetadata API checks a Kubernetes token). [`crate::ServingCert`] keeps one
/// up to date with its files.
pub fn server_without_client_auth(dir: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let files = ServingFiles::read(dir)?;
    serving_config(dir, &files)
}

/// The certificate and key of a serving directory, as read.
#[derive(PartialEq, Eq)]
pub(crate) struct ServingFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl ServingFiles {
    pub(crate) fn read(dir: &Path) -> Result<ServingFiles, TlsError> {
        Ok(ServingFiles {
            cert: read_in(dir, CERT_FILE)?,
            key: read_in(dir, KEY_FILE)?,
        })
    }
}

/// [`server_without_client_auth`] from files already read from `dir`.
pub(crate) fn serving_config(
    dir: &Path,
    files: &ServingFiles,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(&dir.join(CERT_FILE), &files.cert, "certificate")?;
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|source| TlsError::Pem {
        path: dir.join(KEY_FILE),
        what: "private key",
        source,
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Config {
            dir: dir.to_path_buf(),
            what: "protocol versions",
            source,
        })?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Config {
            dir: dir.to_path_buf(),
            what: "certificate and key do not match",
            source,
        })?;
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration trusting the CA certificates in `ca_file` and presenting
/// none: for HTTPS to a server of another CA (the Kubernetes API server).
pub fn client_trusting(ca_file: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let pem = std::fs::read(ca_file).map_err(|source| TlsError::Read {
        path: ca_file.to_path_buf(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for ca in certificates(ca_file, &pem, "CA certificate")? {
        roots.add(ca).map_err(|source| TlsError::BadCa {
            path: ca_file.to_path_buf(),
            source,
        })?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Config {
            dir: ca_file.to_path_buf(),
            what: "protocol versions",
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
