//! Certificates for the mutual TLS between Tessera's processes: `tessera certs`, and
//! the ones `tessera up` keeps under its directory.
//!
//! `tessera certs` issues a certificate for each identity (controller, node, replica)
//! from one CA, as a directory tree (for daemons run by hand, or to build Secrets
//! from) or as the three Kubernetes TLS Secrets the manifests mount.
//!
//! Rotation keeps the CA: `--ca-cert/--ca-key` issue new certificates from the CA in
//! use, which every process already trusts, so the files (or Secrets) can be replaced
//! one at a time without a refused connection. A new CA cannot be rolled out that
//! way (until every process has reloaded, holders of the old and the new refuse each
//! other), which is why a directory's existing CA is never replaced by a different one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use base64::Engine;
use tessera_tls::generate::{
    identity_dir, write_file, ClusterCa, Issued, CA_KEY_FILE, DEFAULT_VALIDITY,
};
use tessera_tls::material::{CA_FILE, CERT_FILE, KEY_FILE};
use tessera_tls::{Identity, TlsContext, TlsError};

/// Seconds in a day, for `--validity-days`.
const DAY_SECS: u64 = 24 * 3600;
/// Namespace of the Secrets unless `--namespace` says otherwise (the manifests').
pub const DEFAULT_NAMESPACE: &str = "tessera-system";
/// The Secret of identity `x` is `tessera-tls-x`: the names the manifests mount.
pub const SECRET_PREFIX: &str = "tessera-tls-";
/// The Service in front of the controller's Kubernetes SnapshotMetadata API
/// (deploy/), whose names its serving certificate carries.
pub const SNAPSHOT_METADATA_SERVICE: &str = "tessera-snapshot-metadata";
/// The Secret with that serving certificate, mounted by the controller.
pub const SNAPSHOT_METADATA_SECRET: &str = "tessera-snapshot-metadata-tls";

/// `tessera certs`.
#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {
    /// Write the CA (DIR/ca.crt, DIR/ca.key) and a certificate directory per identity
    /// (DIR/controller, DIR/node, DIR/replica: ca.crt, tls.crt, tls.key) for the
    /// daemons' --tls-dir. Refuses to replace a different CA already in DIR.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "secrets_yaml",
        conflicts_with = "secrets_yaml"
    )]
    pub out: Option<PathBuf>,
    /// Print the Secrets tessera-tls-controller, tessera-tls-node and
    /// tessera-tls-replica (type kubernetes.io/tls, with ca.crt) as YAML on stdout,
    /// for `kubectl apply -f -`, and tessera-snapshot-metadata-tls, the serving
    /// certificate of the SnapshotMetadata API for the names of its Service in the
    /// namespace. The CA's key is in none of them: see --out-ca.
    #[arg(long)]
    pub secrets_yaml: bool,
    /// Namespace of the Secrets.
    // `conflicts_with = "out"` rather than `requires = "secrets_yaml"`: a flag is
    // always present to `requires` (as false); --out or --secrets-yaml is required.
    #[arg(long, default_value = DEFAULT_NAMESPACE, conflicts_with = "out")]
    pub namespace: String,
    /// With --secrets-yaml: also write the CA (ca.crt, ca.key) to this directory, to
    /// issue rotated certificates from later. Without it a new CA's key is discarded.
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    pub out_ca: Option<PathBuf>,
    /// Issue from this existing CA certificate (PEM; e.g. an earlier run's ca.crt, or
    /// Helm's) instead of a new CA: rotates the certificates and keeps the CA every
    /// process trusts.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The private key of --ca-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Days the certificates (and a new CA) are valid. Nothing renews them: rotate
    /// before they expire.
    #[arg(
        long,
        value_name = "N",
        default_value_t = DEFAULT_VALIDITY.as_secs() / DAY_SECS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub validity_days: u64,
}

/// Runs `tessera certs`.
pub fn run(args: &CertsArgs) -> anyhow::Result<()> {
    let validity = Duration::from_secs(
        args.validity_days
            .checked_mul(DAY_SECS)
            .ok_or_else(|| anyhow!("--validity-days {} is too large", args.validity_days))?,
    );
    let (ca, origin) = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => {
            let ca = load_ca(cert, key)?;
            // Before anything is written: a key that is not the certificate's, or a
            // certificate that is no CA, signs certificates nothing accepts.
            let probe = ca
                .issue(Identity::Controller, validity)
                .context("issuing a certificate")?;
            check_issued(&ca, &probe, Identity::Controller).with_context(|| {
                format!("using {} and {} as the CA", cert.display(), key.display())
            })?;
            (ca, CaOrigin::Given(cert.clone()))
        }
        (None, None) => (
            ClusterCa::generate(validity).context("generating a CA")?,
            CaOrigin::New,
        ),
        // clap's `requires` makes these a usage error already.
        _ => bail!("--ca-cert and --ca-key go together"),
    };
    if args.secrets_yaml {
        print_secrets(args, &ca, &origin, validity)
    } else {
        let out = args
            .out
            .as_deref()
            .ok_or_else(|| anyhow!("pass --out DIR or --secrets-yaml"))?;
        write_tree(out, &ca, validity)
    }
}

/// Where the CA being issued from came from.
enum CaOrigin {
    /// Made by this run.
    New,
    /// `--ca-cert` (with its `--ca-key`).
    Given(PathBuf),
}

/// The CA in the PEM files `cert` and `key`.
fn load_ca(cert: &Path, key: &Path) -> anyhow::Result<ClusterCa> {
    let cert_pem = std::fs::read_to_string(cert)
        .with_context(|| format!("reading the CA certificate {}", cert.display()))?;
    let key_pem = std::fs::read_to_string(key)
        .with_context(|| format!("reading the CA key {}", key.display()))?;
    ClusterCa::load(&cert_pem, &key_pem)
        .with_context(|| format!("using {} and {} as the CA", cert.display(), key.display()))
}

/// Fails if `dir` holds a CA other than `ca` (or a CA key without its certificate):
/// replacing it would lose the key every certificate in use was issued with.
fn guard_ca_dir(dir: &Path, ca: &ClusterCa) -> anyhow::Result<()> {
    let cert = dir.join(CA_FILE);
    let key = dir.join(CA_KEY_FILE);
    let existing = match std::fs::read(&cert) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", cert.display())),
    };
    let key_exists = key
        .try_exists()
        .with_context(|| format!("checking {}", key.display()))?;
    match existing {
        Some(bytes) if bytes == ca.cert_pem().as_bytes() => Ok(()),
        None if !key_exists => Ok(()),
        _ => bail!(
            "{} already holds a different CA ({}, {}): to issue new certificates from it \
             pass --ca-cert {} --ca-key {}; to start over with a new CA remove them first \
             (every process then needs the new files before they trust each other again)",
            dir.display(),
            CA_FILE,
            CA_KEY_FILE,
            cert.display(),
            key.display()
        ),
    }
}

/// `--out DIR`: the CA and every identity's directory, each checked the way the
/// daemons will load it.
fn write_tree(out: &Path, ca: &ClusterCa, validity: Duration) -> anyhow::Result<()> {
    guard_ca_dir(out, ca)?;
    ca.write_all(out, validity)
        .with_context(|| format!("writing certificates to {}", out.display()))?;
    for identity in Identity::ALL {
        let dir = identity_dir(out, identity);
        TlsContext::load(&dir, identity).with_context(|| {
            format!(
                "the {identity} certificate written to {} does not verify against its CA \
                 (is the CA key the key of the CA certificate, and is it a CA?)",
                dir.display()
            )
        })?;
    }
    let d = out.display();
    println!("wrote the CA ({d}/{CA_FILE}, and {d}/{CA_KEY_FILE}: keep it secret, it issues any identity)");
    for identity in Identity::ALL {
        println!(
            "wrote the {identity} certificate directory {}",
            identity_dir(out, identity).display()
        );
    }
    println!(
        "use: tessera-replica --tls-dir {d}/replica, tessera-controller --tls-dir {d}/controller, \
         tessera-node engine-host --tls-dir {d}/node; tessera volumes|replicas|verify --tls-dir {d}/controller"
    );
    println!("rotate: tessera certs --out {d} --ca-cert {d}/{CA_FILE} --ca-key {d}/{CA_KEY_FILE}");
    Ok(())
}

/// `--secrets-yaml`: the three Secrets on stdout (nothing printed unless all of them
/// are good), the CA where `--out-ca` says, and on stderr where the CA key went.
fn print_secrets(
    args: &CertsArgs,
    ca: &ClusterCa,
    origin: &CaOrigin,
    validity: Duration,
) -> anyhow::Result<()> {
    let namespace = args.namespace.as_str();
    check_namespace(namespace)?;
    let mut docs = Vec::new();
    for identity in Identity::ALL {
        let issued = ca
            .issue(identity, validity)
            .with_context(|| format!("issuing the {identity} certificate"))?;
        check_issued(ca, &issued, identity)?;
        docs.push(secret_yaml(
            &secret_name(identity),
            namespace,
            ca.cert_pem(),
            &issued,
        ));
    }
    let serving = ca
        .issue_server(&snapshot_metadata_names(namespace), validity)
        .context("issuing the SnapshotMetadata API's serving certificate")?;
    docs.push(secret_yaml(
        SNAPSHOT_METADATA_SECRET,
        namespace,
        ca.cert_pem(),
        &serving,
    ));
    if let Some(dir) = &args.out_ca {
        write_ca(dir, ca)?;
    }
    std::io::stdout()
        .lock()
        .write_all(docs.join("---\n").as_bytes())
        .context("writing the Secrets to stdout")?;
    match (&args.out_ca, origin) {
        (Some(dir), _) => {
            let d = dir.display();
            eprintln!(
                "tessera certs: the CA is in {d} ({CA_FILE}, and {CA_KEY_FILE}: keep it secret); \
                 rotate with: tessera certs --secrets-yaml --ca-cert {d}/{CA_FILE} --ca-key {d}/{CA_KEY_FILE}"
            );
        }
        (None, CaOrigin::New) => eprintln!(
            "tessera certs: the new CA's key was discarded (pass --out-ca DIR to keep it); \
             rotating these certificates will need a new CA"
        ),
        (None, CaOrigin::Given(cert)) => eprintln!(
            "tessera certs: issued from the CA in {}; its key stays where it is",
            cert.display()
        ),
    }
    Ok(())
}

/// Writes `ca`'s certificate and key to `dir` (the key readable by the owner only).
fn write_ca(dir: &Path, ca: &ClusterCa) -> anyhow::Result<()> {
    guard_ca_dir(dir, ca)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_file(&dir.join(CA_FILE), ca.cert_pem().as_bytes(), 0o644)?;
    write_file(&dir.join(CA_KEY_FILE), ca.key_pem().as_bytes(), 0o600)?;
    Ok(())
}

/// Checks `issued` the way the daemons will load it (chain to the CA, validity now,
/// the identity named), through a private scratch directory: a `--ca-key` that is not
/// the key of `--ca-cert` signs certificates that verify against nothing.
fn check_issued(ca: &ClusterCa, issued: &Issued, identity: Identity) -> anyhow::Result<()> {
    let scratch = ScratchDir::new()?;
    let dir = scratch.path();
    write_file(&dir.join(CA_FILE), ca.cert_pem().as_bytes(), 0o644)?;
    write_file(&dir.join(CERT_FILE), issued.cert_pem.as_bytes(), 0o644)?;
    write_file(&dir.join(KEY_FILE), issued.key_pem.as_bytes(), 0o600)?;
    TlsContext::load(dir, identity).with_context(|| {
        format!(
            "the {identity} certificate issued does not verify against the CA \
             (is the CA key the key of the CA certificate, and is it a CA?)"
        )
    })?;
    Ok(())
}

/// A directory only this user can read, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> anyhow::Result<ScratchDir> {
        let template = std::env::temp_dir().join("tessera-certs-XXXXXX");
        // mkdtemp creates it with mode 0700.
        let path = nix::unistd::mkdtemp(&template)
            .with_context(|| format!("creating a directory like {}", template.display()))?;
        Ok(ScratchDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fails unless `ns` is a Kubernetes namespace name (an RFC 1123 label), which also
/// keeps it from breaking the YAML it is printed into.
fn check_namespace(ns: &str) -> anyhow::Result<()> {
    let valid = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !ns.starts_with('-')
        && !ns.ends_with('-');
    if !valid {
        bail!(
            "--namespace {ns:?} is not a namespace name (lowercase letters, digits and '-', \
             at most 63, starting and ending with a letter or digit)"
        );
    }
    Ok(())
}

/// The name of identity `identity`'s Secret.
pub fn secret_name(identity: Identity) -> String {
    format!("{SECRET_PREFIX}{identity}")
}

/// The names clients in the cluster dial the SnapshotMetadata API's Service by.
pub fn snapshot_metadata_names(namespace: &str) -> Vec<String> {
    let service = SNAPSHOT_METADATA_SERVICE;
    vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
        service.to_string(),
    ]
}

/// One Secret as a YAML document: what a mounted TLS Secret must hold to be a
/// certificate directory (`ca.crt`, `tls.crt`, `tls.key`).
fn secret_yaml(name: &str, namespace: &str, ca_pem: &str, issued: &Issued) -> String {
    let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    format!(
        "apiVersion: v1\n\
         kind: Secret\n\
         metadata:\n\
         \x20 name: {name}\n\
         \x20 namespace: {namespace}\n\
         \x20 labels:\n\
         \x20   app.kubernetes.io/name: tessera\n\
         \x20   app.kubernetes.io/component: tls\n\
         type: kubernetes.io/tls\n\
         data:\n\
         \x20 {CA_FILE}: {ca}\n\
         \x20 {CERT_FILE}: {cert}\n\
         \x20 {KEY_FILE}: {key}\n",
        ca = b64(ca_pem),
        cert = b64(&issued.cert_pem),
        key = b64(&issued.key_pem),
    )
}

/// What [`ensure_local`] found and did.
#[derive(Debug, PartialEq, Eq)]
pub enum LocalCerts {
    /// There was no CA: made one and every identity's directory.
    Created,
    /// Every identity's directory loaded as it was.
    Kept,
    /// These identities' directories did not load (why) and were issued again from
    /// the stored CA.
    Reissued(Vec<(Identity, String)>),
}

/// The certificates of a `tessera up` directory under `root` (`DIR/tls`): made with a
/// new CA the first time and then kept, like the replica data, so every run's
/// daemons trust each other. A directory that does not load (deleted, edited,
/// expired, or holding another CA's certificate) is issued again from the CA kept
/// in `root`.
pub fn ensure_local(root: &Path) -> anyhow::Result<LocalCerts> {
    let ca_path = root.join(CA_FILE);
    let fresh = !ca_path
        .try_exists()
        .with_context(|| format!("checking {}", ca_path.display()))?;
    if fresh {
        ClusterCa::generate(DEFAULT_VALIDITY)
            .context("generating a CA")?
            .write_all(root, DEFAULT_VALIDITY)
            .with_context(|| format!("writing certificates to {}", root.display()))?;
    }
    let ca_pem =
        std::fs::read(&ca_path).with_context(|| format!("reading {}", ca_path.display()))?;
    let broken: Vec<(Identity, String)> = Identity::ALL
        .into_iter()
        .filter_map(|id| unusable(&identity_dir(root, id), id, &ca_pem).map(|why| (id, why)))
        .collect();
    let start_over = || format!("remove {} to start over with a new CA", root.display());
    if fresh {
        return match broken.first() {
            None => Ok(LocalCerts::Created),
            Some((id, why)) => Err(anyhow!("the new {id} certificate does not load: {why}")),
        };
    }
    if broken.is_empty() {
        return Ok(LocalCerts::Kept);
    }
    let ca = load_ca(&ca_path, &root.join(CA_KEY_FILE))
        .with_context(|| format!("re-issuing unusable certificates ({})", start_over()))?;
    for (id, _) in &broken {
        let dir = identity_dir(root, *id);
        ca.write_dir(&dir, *id, DEFAULT_VALIDITY)
            .with_context(|| format!("re-issuing the {id} certificate in {}", dir.display()))?;
        if let Some(why) = unusable(&dir, *id, &ca_pem) {
            bail!(
                "the {id} certificate re-issued from the CA in {} does not load: {why} ({})",
                root.display(),
                start_over()
            );
        }
    }
    Ok(LocalCerts::Reissued(broken))
}

/// Why `dir` is not a usable directory of `identity` from the CA `ca_pem`, if it is not.
fn unusable(dir: &Path, identity: Identity, ca_pem: &[u8]) -> Option<String> {
    let ca_path = dir.join(CA_FILE);
    match std::fs::read(&ca_path) {
        Ok(bytes) if bytes == ca_pem => {}
        Ok(_) => return Some(format!("{} is another CA", ca_path.display())),
        Err(e) => return Some(format!("cannot read {}: {e}", ca_path.display())),
    }
    match TlsContext::load(dir, identity) {
        Ok(_) => None,
        // Without the flag advice its message carries: `tessera up` sets the flags.
        Err(TlsError::Read { path, source }) => {
            Some(format!("cannot read {}: {source}", path.display()))
        }
        Err(e) => Some(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_must_be_dns_labels() {
        for good in ["tessera-system", "a", "ns1", &"x".repeat(63)] {
            assert!(check_namespace(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a b",
            "a\nb: c",
            &"x".repeat(64),
        ] {
            assert!(check_namespace(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_local_tree_is_created_kept_and_repaired_from_its_ca() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let root = tmp.path().join("tls");
        assert_eq!(ensure_local(&root).expect("create"), LocalCerts::Created);
        let ca = std::fs::read(root.join(CA_FILE)).expect("ca.crt");
        assert_eq!(ensure_local(&root).expect("keep"), LocalCerts::Kept);

        let node = identity_dir(&root, Identity::Node);
        let node_cert = std::fs::read(node.join(CERT_FILE)).expect("node tls.crt");
        std::fs::write(node.join(KEY_FILE), "not a key").expect("break the node key");
        match ensure_local(&root).expect("repair") {
            LocalCerts::Reissued(ids) => {
                assert_eq!(ids.len(), 1, "{ids:?}");
                assert_eq!(ids[0].0, Identity::Node);
            }
            other => panic!("expected the node re-issued, got {other:?}"),
        }
        assert_eq!(std::fs::read(root.join(CA_FILE)).expect("ca.crt"), ca);
        assert_ne!(
            std::fs::read(node.join(CERT_FILE)).expect("node tls.crt"),
            node_cert
        );
        TlsContext::load(&node, Identity::Node).expect("the re-issued node directory loads");

        // A certificate from another CA is re-issued too.
        let other = tempfile::tempdir().expect("temp dir");
        ClusterCa::generate(DEFAULT_VALIDITY)
            .expect("CA")
            .write_dir(other.path(), Identity::Replica, DEFAULT_VALIDITY)
            .expect("other CA's replica directory");
        let replica = identity_dir(&root, Identity::Replica);
        for file in [CA_FILE, CERT_FILE, KEY_FILE] {
            std::fs::copy(other.path().join(file), replica.join(file)).expect("copy");
        }
        assert!(matches!(
            ensure_local(&root).expect("repair"),
            LocalCerts::Reissued(ids) if ids.iter().map(|i| i.0).eq([Identity::Replica])
        ));
        assert_eq!(std::fs::read(replica.join(CA_FILE)).expect("ca.crt"), ca);
    }

    #[test]
    fn a_broken_tree_without_the_ca_key_is_an_error_naming_the_way_out() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let root = tmp.path().join("tls");
        ensure_local(&root).expect("create");
        std::fs::remove_file(root.join(CA_KEY_FILE)).expect("remove ca.key");
        // Without the key an intact tree is still usable.
        assert_eq!(ensure_local(&root).expect("keep"), LocalCerts::Kept);
        std::fs::remove_file(identity_dir(&root, Identity::Controller).join(CERT_FILE))
            .expect("remove the controller certificate");
        let e = format!("{:#}", ensure_local(&root).expect_err("cannot re-issue"));
        assert!(e.contains("ca.key") && e.contains("start over"), "{e}");
    }

    #[test]
    fn a_different_ca_is_never_overwritten() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let ca = ClusterCa::generate(DEFAULT_VALIDITY).expect("CA");
        guard_ca_dir(tmp.path(), &ca).expect("an empty directory takes any CA");
        write_ca(tmp.path(), &ca).expect("write");
        guard_ca_dir(tmp.path(), &ca).expect("the same CA again");
        let other = ClusterCa::generate(DEFAULT_VALIDITY).expect("CA");
        let e = format!(
            "{:#}",
            guard_ca_dir(tmp.path(), &other).expect_err("another CA")
        );
        assert!(e.contains("--ca-cert"), "{e}");
        std::fs::remove_file(tmp.path().join(CA_FILE)).expect("remove ca.crt");
        assert!(
            guard_ca_dir(tmp.path(), &ca).is_err(),
            "a lone ca.key is kept too"
        );
    }
}
