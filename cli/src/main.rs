//! `tessera`: the operator CLI.
//!
//! * `tessera up`: runs the whole system on this machine (replica daemons,
//!   controller, engine-host, node plugin), demonstrates a volume's life through CSI
//!   and tears everything down on Ctrl-C. See [`up`].
//! * `tessera volumes`, `tessera replicas`: read-only views of a running cluster.
//! * `tessera verify VOLUME`: compares a volume's blocks on its in-sync replicas
//!   ([`verify`]).
//! * `tessera certs`: a CA and the certificates of the controller, node and replica
//!   identities, as files or Kubernetes Secrets ([`certs`]).
//!
//! The replica daemons speak mutual TLS; the commands that dial them present the
//! controller identity, from the directory [`replica_tls`] picks.
//!
//! Modules: [`up`] orchestrates and [`teardown`] undoes it, [`local_cluster`]
//! starts and stops the daemons (found by [`binaries`], placed by [`layout`], each a
//! [`daemon`] process whose [`readiness`] is polled), [`supervise`] watches them and
//! restarts the dead ones as [`restart`] decides, [`demo`] is the
//! CSI walk-through with [`demo_files`] its file I/O, [`leftovers`] finds and removes
//! what a crashed run left, [`csi_client`] dials the daemons, [`signals`] turns Ctrl-C
//! into an orderly stop, [`wait`] polls with deadlines, [`commands`] holds the small
//! read-only subcommands.

mod binaries;
mod certs;
mod commands;
mod csi_client;
mod daemon;
mod demo;
mod demo_files;
mod layout;
mod leftovers;
mod local_cluster;
mod readiness;
mod replica_tls;
mod restart;
mod signals;
mod snapshot_metadata;
mod supervise;
mod teardown;
mod up;
mod verify;
mod wait;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::{Parser, Subcommand};
use tessera_tls::Transport;

use crate::replica_tls::ReplicaTlsArgs;

/// Default directory of `tessera up`, relative to the current directory.
const DEFAULT_DIR: &str = ".tessera-local";

/// Tessera operator CLI.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run replica daemons, controller, engine-host and node plugin on this machine,
    /// demo a volume through CSI, and tear down on Ctrl-C.
    Up {
        /// Directory for data, sockets, logs and certificates (kept across runs; replica
        /// data and the CA in DIR/tls survive).
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Number of replica daemons.
        #[arg(long, default_value_t = 3)]
        replicas: usize,
        /// Capacity of each replica daemon (e.g. 20Gi).
        #[arg(long, default_value = "20Gi")]
        capacity: String,
        /// Start the daemons but skip the demo volume.
        #[arg(long)]
        no_demo: bool,
        /// Do not delete the demo volume at teardown.
        #[arg(long)]
        keep_volumes: bool,
        /// Directory holding tessera-replica, tessera-controller and tessera-node
        /// (default: next to this binary, then PATH).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Do not restart a daemon that dies: report it and keep the rest running
        /// (by default it is started again, with backoff).
        #[arg(long)]
        no_restart: bool,
    },
    /// List volumes through the controller (CSI ListVolumes).
    Volumes {
        /// Controller CSI endpoint (unix:///path); default: the one of `tessera up --dir`.
        #[arg(long)]
        controller: Option<String>,
        /// Replica control addresses to read volume names from (comma-separated).
        #[arg(long, value_delimiter = ',')]
        replicas: Vec<String>,
        /// Directory of a running `tessera up`, for the defaults.
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Redraw the table every second (resyncs and rebuilds as they progress)
        /// until Ctrl-C.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        tls: ReplicaTlsArgs,
    },
    /// Compare every block of a volume on its in-sync replicas (versions, and data
    /// checksums unless --versions-only); exits 1 on any divergence.
    Verify {
        /// The volume id.
        volume_id: String,
        /// Replica control addresses (comma-separated host:port); default: those of
        /// `tessera up --dir`.
        #[arg(long, value_delimiter = ',')]
        replicas: Vec<String>,
        /// Compare the recorded versions only (no data read, no checksum verified).
        #[arg(long)]
        versions_only: bool,
        /// Directory of a running `tessera up`, for the defaults.
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        #[command(flatten)]
        tls: ReplicaTlsArgs,
    },
    /// Show each replica daemon's node, zone, capacity and volumes (GetInfo).
    Replicas {
        /// Replica control addresses (comma-separated host:port); default: those of
        /// `tessera up --dir`.
        #[arg(long, value_delimiter = ',')]
        replicas: Vec<String>,
        /// Directory of a running `tessera up`, for the defaults.
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        #[command(flatten)]
        tls: ReplicaTlsArgs,
    },
    /// Issue the certificates of the mutual TLS between Tessera's processes: a CA and
    /// one certificate each for the controller, node and replica identities, written
    /// to a directory (--out) or printed as Kubernetes Secrets (--secrets-yaml).
    Certs(certs::CertsArgs),
    /// Call the controller's Kubernetes SnapshotMetadata API as a backup application
    /// does (TLS, a service-account token for its audience): allocated or changed
    /// ranges of VolumeSnapshots, one `offset length` line each.
    SnapshotMetadata(snapshot_metadata::SnapshotMetadataArgs),
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Up {
            dir,
            replicas,
            capacity,
            no_demo,
            keep_volumes,
            bin_dir,
            no_restart,
        } => {
            up::run(up::UpOptions {
                dir,
                replicas,
                capacity,
                no_demo,
                keep_volumes,
                bin_dir,
                no_restart,
            })
            .await
        }
        Command::Volumes {
            controller,
            mut replicas,
            dir,
            watch,
            tls,
        } => {
            let controller = match controller {
                Some(c) => c,
                None => {
                    let endpoints = up::Endpoints::read(&dir)?;
                    if replicas.is_empty() {
                        replicas = endpoints.replicas;
                    }
                    endpoints.controller
                }
            };
            // Without replica daemons to ask there is nothing to dial, and no
            // certificate needed.
            let transport = if replicas.is_empty() {
                Transport::plaintext()
            } else {
                tls.transport(&dir)?
            };
            if watch {
                let every = Duration::from_secs(1);
                commands::watch_volumes(&controller, &replicas, &transport, every).await?;
            } else {
                commands::volumes(&controller, &replicas, &transport).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            volume_id,
            mut replicas,
            versions_only,
            dir,
            tls,
        } => {
            if replicas.is_empty() {
                replicas = up::Endpoints::read(&dir)?.replicas;
            }
            let transport = tls.transport(&dir)?;
            let verdict = verify::verify(&volume_id, &replicas, &transport, versions_only).await?;
            Ok(if verify::report(&volume_id, &verdict) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Replicas {
            mut replicas,
            dir,
            tls,
        } => {
            if replicas.is_empty() {
                replicas = up::Endpoints::read(&dir)?.replicas;
            }
            if replicas.is_empty() {
                bail!("no replica daemons given: pass --replicas host:port,...");
            }
            commands::replicas(&replicas, &tls.transport(&dir)?).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(args) => {
            certs::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::SnapshotMetadata(args) => {
            snapshot_metadata::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tessera: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
