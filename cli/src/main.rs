//! `tessera`: the operator CLI.
//!
//! * `tessera up`: runs the whole system on this machine (replica daemons,
//!   controller, engine-host, node plugin), demonstrates a volume's life through CSI
//!   and tears everything down on Ctrl-C. See [`up`].
//! * `tessera volumes`, `tessera replicas`: read-only views of a running cluster.
//! * `tessera verify VOLUME`: compares a volume's blocks on its in-sync replicas
//!   ([`verify`]).
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
mod commands;
mod csi_client;
mod daemon;
mod demo;
mod demo_files;
mod layout;
mod leftovers;
mod local_cluster;
mod readiness;
mod restart;
mod signals;
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
        /// Directory for data, sockets and logs (kept across runs; replica data survives).
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
    },
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
            if watch {
                commands::watch_volumes(&controller, &replicas, Duration::from_secs(1)).await?;
            } else {
                commands::volumes(&controller, &replicas).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            volume_id,
            mut replicas,
            versions_only,
            dir,
        } => {
            if replicas.is_empty() {
                replicas = up::Endpoints::read(&dir)?.replicas;
            }
            let verdict = verify::verify(&volume_id, &replicas, versions_only).await?;
            Ok(if verify::report(&volume_id, &verdict) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Replicas { mut replicas, dir } => {
            if replicas.is_empty() {
                replicas = up::Endpoints::read(&dir)?.replicas;
            }
            if replicas.is_empty() {
                bail!("no replica daemons given: pass --replicas host:port,...");
            }
            commands::replicas(&replicas).await?;
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
