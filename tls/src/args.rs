//! The transport flags every Tessera binary that talks to replica daemons shares.

use std::path::PathBuf;
use std::time::Duration;

use crate::context::TlsContext;
use crate::identity::Identity;
use crate::material::TlsError;
use crate::transport::Transport;

/// Where the default certificate directory is (where the Helm chart and the
/// kustomize base mount the Secret).
pub const DEFAULT_TLS_DIR: &str = "/etc/tessera/tls";

/// `--tls-dir`, `--tls-reload-secs`, `--insecure-plaintext`.
#[derive(clap::Args, Debug, Clone)]
pub struct TlsArgs {
    /// Directory with this process's certificate and key (`tls.crt`, `tls.key`) and
    /// the cluster CA (`ca.crt`): a mounted Kubernetes TLS Secret, or what `tessera
    /// certs` writes. Checked for changes every --tls-reload-secs.
    #[arg(long, env = "TESSERA_TLS_DIR", default_value = DEFAULT_TLS_DIR)]
    pub tls_dir: PathBuf,
    /// Seconds between checks of the certificate files for a rotation.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub tls_reload_secs: u64,
    /// Talk to (or, on a replica, serve) the replica ports without TLS. INSECURE:
    /// anyone who can reach a replica port can read, write and delete every volume.
    /// For debugging only; logged at start and exported as a metric.
    #[arg(long, env = "TESSERA_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
}

impl TlsArgs {
    /// The transport these flags ask for, presenting `identity`; with TLS its
    /// reloader runs on the current tokio runtime. Logs what it chose (loudly for
    /// plain text).
    pub fn start(&self, identity: Identity) -> Result<Transport, TlsError> {
        let transport = if self.insecure_plaintext {
            Transport::plaintext()
        } else {
            let context = TlsContext::load(&self.tls_dir, identity)?;
            context.spawn_reloader(self.reload_period());
            Transport::tls(context)
        };
        if transport.is_plaintext() {
            tracing::warn!("INSECURE: {}", transport.describe());
        } else {
            tracing::info!("replica ports: {}", transport.describe());
        }
        Ok(transport)
    }

    /// `--tls-reload-secs`: how often certificate files are checked for a rotation.
    pub fn reload_period(&self) -> Duration {
        Duration::from_secs(self.tls_reload_secs)
    }
}
