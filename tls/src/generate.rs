//! A cluster CA and the certificates it issues (`tessera certs`, `tessera up`, the
//! tests). ECDSA P-256 keys, each identity's DNS name as its only subjectAltName and
//! its CN, both TLS client and server usage (a replica is both; the others only
//! dial, but one profile keeps the files interchangeable with Helm's).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::OffsetDateTime;

use crate::identity::Identity;
use crate::material::{CA_FILE, CERT_FILE, KEY_FILE};

/// The CN of CAs this module makes.
pub const CA_NAME: &str = "Tessera cluster CA";

/// What a CA and its certificates are valid for unless asked otherwise: ten years,
/// since nothing renews them by itself (rotation is re-issuing and replacing the
/// files, which the processes pick up).
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(3650 * 24 * 3600);

/// Why a certificate could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("cannot {what}")]
    Rcgen {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("validity of {0:?} is out of range")]
    Validity(Duration),
    #[error("the CA certificate is not a CA (its basic constraints do not say so)")]
    NotACa,
}

fn rcgen(what: &'static str) -> impl FnOnce(rcgen::Error) -> GenerateError {
    move |source| GenerateError::Rcgen { what, source }
}

/// A certificate and its private key, in PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A CA that can issue identity certificates.
pub struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

/// Not-before a day back (clocks in a cluster drift), not-after `validity` ahead.
fn validity_window(
    params: &mut CertificateParams,
    validity: Duration,
) -> Result<(), GenerateError> {
    let now = OffsetDateTime::now_utc();
    let ahead =
        time::Duration::try_from(validity).map_err(|_| GenerateError::Validity(validity))?;
    params.not_before = now - time::Duration::days(1);
    params.not_after = now
        .checked_add(ahead)
        .ok_or(GenerateError::Validity(validity))?;
    Ok(())
}

impl ClusterCa {
    /// A new CA with a new key.
    pub fn generate(validity: Duration) -> Result<ClusterCa, GenerateError> {
        let key = KeyPair::generate().map_err(rcgen("generate the CA key"))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, CA_NAME);
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity_window(&mut params, validity)?;
        let cert = params.self_signed(&key).map_err(rcgen("sign the CA"))?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// An existing CA (this module's, Helm's or another), to issue more
    /// certificates that chain to it: for rotating a leaf without touching the CA.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, GenerateError> {
        let key = KeyPair::from_pem(key_pem).map_err(rcgen("parse the CA key"))?;
        // Verifiers accept any trust anchor as an issuer, so a leaf passed here by
        // mistake would mint certificates that verify: refuse it.
        let der = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|_| GenerateError::NotACa)?
            .1;
        let is_ca = der
            .parse_x509()
            .ok()
            .and_then(|c| c.basic_constraints().ok().flatten().map(|b| b.value.ca))
            .unwrap_or(false);
        if !is_ca {
            return Err(GenerateError::NotACa);
        }
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(rcgen("parse the CA certificate"))?;
        Ok(ClusterCa {
            issuer,
            cert_pem: cert_pem.to_string(),
        })
    }

    /// The CA certificate (what `ca.crt` holds).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key: whoever holds it can mint any identity.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A new key and a certificate for `identity`.
    pub fn issue(&self, identity: Identity, validity: Duration) -> Result<Issued, GenerateError> {
        self.sign(
            &[identity.dns_name().to_string()],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            validity,
        )
    }

    /// A new key and a TLS server certificate for `dns_names` (the first is its CN):
    /// for a service that clients outside Tessera dial by name, such as the
    /// SnapshotMetadata API behind its Kubernetes Service. Server usage only, so it
    /// can never pass as one of the identities.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        validity: Duration,
    ) -> Result<Issued, GenerateError> {
        self.sign(
            dns_names,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            validity,
        )
    }

    fn sign(
        &self,
        dns_names: &[String],
        usages: Vec<ExtendedKeyUsagePurpose>,
        validity: Duration,
    ) -> Result<Issued, GenerateError> {
        let key = KeyPair::generate().map_err(rcgen("generate a key"))?;
        let mut params =
            CertificateParams::new(dns_names.to_vec()).map_err(rcgen("name the certificate"))?;
        if let Some(first) = dns_names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        validity_window(&mut params, validity)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen("sign the certificate"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes a certificate directory for `identity` into `dir` (created if
    /// missing): `ca.crt`, and a newly issued `tls.crt` and `tls.key` (mode 0600).
    /// Each file is replaced whole (written aside, then renamed), so a running
    /// process reloading it never reads half a file.
    pub fn write_dir(
        &self,
        dir: &Path,
        identity: Identity,
        validity: Duration,
    ) -> Result<(), GenerateError> {
        let issued = self.issue(identity, validity)?;
        std::fs::create_dir_all(dir).map_err(|source| GenerateError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        write_file(&dir.join(CA_FILE), self.cert_pem.as_bytes(), 0o644)?;
        write_file(&dir.join(KEY_FILE), issued.key_pem.as_bytes(), 0o600)?;
        write_file(&dir.join(CERT_FILE), issued.cert_pem.as_bytes(), 0o644)
    }
}

/// Where [`ClusterCa::write_all`] puts the directory of `identity` under `root`.
pub fn identity_dir(root: &Path, identity: Identity) -> PathBuf {
    root.join(identity.as_str())
}

impl ClusterCa {
    /// Writes the CA (`root/ca.crt`, `root/ca.key`, mode 0600: keep it to issue
    /// rotated certificates later) and a certificate directory per identity
    /// ([`identity_dir`]: `root/controller`, `root/node`, `root/replica`).
    pub fn write_all(&self, root: &Path, validity: Duration) -> Result<(), GenerateError> {
        std::fs::create_dir_all(root).map_err(|source| GenerateError::Write {
            path: root.to_path_buf(),
            source,
        })?;
        write_file(&root.join(CA_FILE), self.cert_pem.as_bytes(), 0o644)?;
        write_file(&root.join(CA_KEY_FILE), self.key_pem().as_bytes(), 0o600)?;
        for identity in Identity::ALL {
            self.write_dir(&identity_dir(root, identity), identity, validity)?;
        }
        Ok(())
    }
}

/// The CA's private key next to its certificate in a [`ClusterCa::write_all`] root.
pub const CA_KEY_FILE: &str = "ca.key";

/// Writes `bytes` to `path` through a temporary file in the same directory, renamed
/// over it.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), GenerateError> {
    use std::os::unix::fs::OpenOptionsExt;
    let wrap = |source| GenerateError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(wrap)?;
    f.write_all(bytes).map_err(wrap)?;
    f.sync_all().map_err(wrap)?;
    std::fs::rename(&tmp, path).map_err(wrap)
}
