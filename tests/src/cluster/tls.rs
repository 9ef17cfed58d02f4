//! The cluster's transport security: one CA per cluster, a certificate directory per
//! identity, the flags every daemon gets, and the transports of the test's own
//! clients.
//!
//! [`ClusterBuilder::start`](super::ClusterBuilder::start) writes the CA and the three identity directories under
//! `<cluster dir>/tls` ([`TLS_DIR_NAME`]; `ca.crt`, `ca.key`, and
//! `controller/`, `node/`, `replica/`, each with `ca.crt`, `tls.crt`, `tls.key`),
//! then starts the replica daemons with `--tls-dir <root>/replica`, the controller
//! with `<root>/controller` and every engine-host with `<root>/node` (the node plugin
//! never dials a replica). With
//! [`ClusterBuilder::plaintext`](super::ClusterBuilder::plaintext) nothing is written and
//! every daemon gets `--insecure-plaintext` instead.
//!
//! The test's clients act as the controller on the control port (only the controller
//! may read records or change anything there) and as the controller or a node on the
//! data plane; [`ClusterTls::transport`] hands out each identity's transport, loaded
//! once at start (so a test that breaks a directory on disk keeps working clients).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tessera_tls::generate::{identity_dir, ClusterCa, CA_KEY_FILE, DEFAULT_VALIDITY};
use tessera_tls::material::CA_FILE;
use tessera_tls::{Identity, TlsContext, Transport};

/// Where under the cluster directory the certificates are.
pub const TLS_DIR_NAME: &str = "tls";

/// The environment variables through which the Tessera binaries also take their
/// transport flags; removed from every process the harness starts, so what it passes
/// on the command line is all that counts.
pub const TRANSPORT_ENV: [&str; 2] = ["TESSERA_TLS_DIR", "TESSERA_INSECURE_PLAINTEXT"];

/// How a cluster's processes talk to the replica ports; see the module docs.
#[derive(Debug, Clone)]
pub struct ClusterTls {
    /// The certificate root; `None` for a plain-text cluster.
    root: Option<PathBuf>,
    /// `--tls-reload-secs` of every daemon (their default when `None`).
    reload_secs: Option<u64>,
    /// Each identity's transport for the test's clients.
    transports: BTreeMap<Identity, Transport>,
}

impl ClusterTls {
    /// No certificates: every daemon and client in plain text.
    pub(super) fn plaintext() -> ClusterTls {
        ClusterTls {
            root: None,
            reload_secs: None,
            transports: Identity::ALL
                .into_iter()
                .map(|identity| (identity, Transport::plaintext()))
                .collect(),
        }
    }

    /// A new CA and a certificate directory per identity under `root` (replacing
    /// whatever was there).
    pub(super) fn generate(root: PathBuf, reload_secs: Option<u64>) -> anyhow::Result<ClusterTls> {
        let ca = ClusterCa::generate(DEFAULT_VALIDITY).context("generating the cluster CA")?;
        ca.write_all(&root, DEFAULT_VALIDITY)
            .with_context(|| format!("writing the certificates under {}", root.display()))?;
        let mut transports = BTreeMap::new();
        for identity in Identity::ALL {
            let dir = identity_dir(&root, identity);
            let context = TlsContext::load(&dir, identity)
                .with_context(|| format!("loading {}", dir.display()))?;
            transports.insert(identity, Transport::tls(context));
        }
        Ok(ClusterTls {
            root: Some(root),
            reload_secs,
            transports,
        })
    }

    /// Whether the cluster runs without TLS
    /// ([`ClusterBuilder::plaintext`](super::ClusterBuilder::plaintext)).
    pub fn is_plaintext(&self) -> bool {
        self.root.is_none()
    }

    /// The certificate root (`ca.crt`, `ca.key` and a directory per identity), or
    /// `None` for a plain-text cluster.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The certificate directory of `identity`, or `None` for a plain-text cluster.
    pub fn dir(&self, identity: Identity) -> Option<PathBuf> {
        self.root
            .as_deref()
            .map(|root| identity_dir(root, identity))
    }

    /// The transport flags of a daemon presenting `identity`.
    pub fn daemon_args(&self, identity: Identity) -> Vec<OsString> {
        let Some(dir) = self.dir(identity) else {
            return vec!["--insecure-plaintext".into()];
        };
        let mut args = vec!["--tls-dir".into(), dir.into_os_string()];
        if let Some(secs) = self.reload_secs {
            args.extend(["--tls-reload-secs".into(), secs.to_string().into()]);
        }
        args
    }

    /// The transport flags of the `tessera` CLI, acting as the controller.
    pub fn cli_args(&self) -> Vec<OsString> {
        match self.dir(Identity::Controller) {
            Some(dir) => vec!["--tls-dir".into(), dir.into_os_string()],
            None => vec!["--insecure-plaintext".into()],
        }
    }

    /// The transport of a test client presenting `identity` (plain text in a
    /// plain-text cluster), with the certificates as they were at start.
    pub fn transport(&self, identity: Identity) -> Transport {
        self.transports
            .get(&identity)
            .cloned()
            .unwrap_or_else(Transport::plaintext)
    }

    /// The cluster CA, to issue more certificates that chain to it.
    pub fn ca(&self) -> anyhow::Result<ClusterCa> {
        let root = self.tls_root()?;
        let read = |name: &str| {
            let path = root.join(name);
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        ClusterCa::load(&read(CA_FILE)?, &read(CA_KEY_FILE)?).context("loading the cluster CA")
    }

    /// Rotates `identity`'s certificate: a new key and certificate from the same CA
    /// replace the files of its directory (each file written aside and renamed over
    /// the old one). The daemons take them at their next reload check; the test's
    /// transports keep the old ones (still valid: same CA).
    pub fn rotate(&self, identity: Identity) -> anyhow::Result<()> {
        let dir = identity_dir(self.tls_root()?, identity);
        self.ca()?
            .write_dir(&dir, identity, DEFAULT_VALIDITY)
            .with_context(|| format!("rotating the {identity} certificate in {}", dir.display()))
    }

    fn tls_root(&self) -> anyhow::Result<&Path> {
        self.root
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("this cluster runs in plain text: no certificates"))
    }
}
