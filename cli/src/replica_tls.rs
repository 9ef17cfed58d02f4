//! How the CLI dials replica daemons: `--tls-dir` and `--insecure-plaintext`.
//!
//! The CLI acts with the controller's identity: the replicas let only the controller
//! read volume records (and the data-plane reads of `tessera verify` need the
//! controller or a node). Unlike the daemons' [`tessera_tls::TlsArgs`], the
//! directory's default depends on `--dir`: the certificates `tessera up` keeps there
//! when there are some, else where a pod mounts the Secret. No reloader runs: a
//! command lives seconds, and `--watch` redraws with what it loaded.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tessera_tls::args::DEFAULT_TLS_DIR;
use tessera_tls::{Identity, TlsContext, Transport};

use crate::certs::secret_name;
use crate::layout::Layout;

/// The identity the CLI presents.
pub const CLI_IDENTITY: Identity = Identity::Controller;

/// `--tls-dir`, `--insecure-plaintext` of the commands that dial replica daemons.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplicaTlsArgs {
    /// Certificate directory of the controller identity (ca.crt, tls.crt, tls.key:
    /// DIR/controller of `tessera certs --out DIR`, or the Secret
    /// tessera-tls-controller). Default: DIR/tls/controller of `tessera up --dir DIR`
    /// when it exists, else /etc/tessera/tls.
    #[arg(long, env = "TESSERA_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Dial the replica daemons without TLS (for daemons started with
    /// --insecure-plaintext); --tls-dir is then ignored. INSECURE.
    #[arg(long, env = "TESSERA_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
}

impl ReplicaTlsArgs {
    /// The transport these flags ask for; `up_dir` is the command's `--dir`, for the
    /// default certificate directory.
    pub fn transport(&self, up_dir: &Path) -> anyhow::Result<Transport> {
        if self.insecure_plaintext {
            return Ok(Transport::plaintext());
        }
        let (dir, origin) = self.certificate_dir(up_dir)?;
        let context = TlsContext::load(&dir, CLI_IDENTITY).with_context(|| {
            format!(
                "no usable {CLI_IDENTITY} certificates in {} ({origin}); pass --tls-dir DIR \
                 with the {CLI_IDENTITY} identity's ca.crt, tls.crt and tls.key (`tessera certs \
                 --out D` writes D/{CLI_IDENTITY}; in a cluster: the Secret {}), or \
                 --insecure-plaintext for replica daemons running without TLS",
                dir.display(),
                secret_name(CLI_IDENTITY)
            )
        })?;
        Ok(Transport::tls(context))
    }

    /// The certificate directory to use and, for messages, why that one.
    fn certificate_dir(&self, up_dir: &Path) -> anyhow::Result<(PathBuf, String)> {
        if let Some(dir) = &self.tls_dir {
            return Ok((dir.clone(), "--tls-dir".to_owned()));
        }
        let local = Layout::new(crate::up::absolute(up_dir)?).tls_dir(CLI_IDENTITY);
        if local.is_dir() {
            let origin = format!(
                "the certificates of `tessera up --dir {}`",
                up_dir.display()
            );
            return Ok((local, origin));
        }
        let origin = format!(
            "the default: no `tessera up` certificates at {}",
            local.display()
        );
        Ok((PathBuf::from(DEFAULT_TLS_DIR), origin))
    }
}

/// What to add to "no answer" from replica daemons dialled through `transport`: a
/// daemon that requires TLS drops a plain-text call without saying why.
pub fn plaintext_hint(transport: &Transport) -> &'static str {
    if transport.is_plaintext() {
        " (with --insecure-plaintext: replica daemons that require TLS drop such calls)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(tls_dir: Option<&Path>, insecure_plaintext: bool) -> ReplicaTlsArgs {
        ReplicaTlsArgs {
            tls_dir: tls_dir.map(Path::to_path_buf),
            insecure_plaintext,
        }
    }

    #[test]
    fn the_directory_defaults_to_the_local_clusters_then_the_mounted_secret() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let up = tmp.path();
        let (dir, _) = args(None, false).certificate_dir(up).expect("resolve");
        assert_eq!(dir, PathBuf::from(DEFAULT_TLS_DIR));

        let layout = Layout::new(up.to_path_buf());
        crate::certs::ensure_local(&layout.tls()).expect("certificates");
        let (dir, _) = args(None, false).certificate_dir(up).expect("resolve");
        assert_eq!(dir, layout.tls_dir(Identity::Controller));
        let transport = args(None, false).transport(up).expect("loads");
        assert!(!transport.is_plaintext());

        let given = Path::new("/somewhere/else");
        let (dir, origin) = args(Some(given), false)
            .certificate_dir(up)
            .expect("resolve");
        assert_eq!((dir.as_path(), origin.as_str()), (given, "--tls-dir"));
    }

    #[test]
    fn missing_certificates_say_what_to_pass_and_plaintext_needs_none() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let missing = tmp.path().join("nothing");
        let e = args(Some(&missing), false)
            .transport(tmp.path())
            .expect_err("no certificates");
        let text = format!("{e:#}");
        assert!(
            text.contains("--tls-dir")
                && text.contains("--insecure-plaintext")
                && text.contains(&missing.display().to_string()),
            "{text}"
        );
        let plain = args(Some(&missing), true)
            .transport(tmp.path())
            .expect("plain text");
        assert!(plain.is_plaintext());
    }

    #[test]
    fn another_identitys_certificates_are_refused() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let layout = Layout::new(tmp.path().to_path_buf());
        crate::certs::ensure_local(&layout.tls()).expect("certificates");
        let node = layout.tls_dir(Identity::Node);
        let e = args(Some(&node), false)
            .transport(tmp.path())
            .expect_err("a node certificate is not the controller's");
        assert!(format!("{e:#}").contains("controller"), "{e:#}");
    }
}
