//! `tessera-test-cluster`: runs a local Tessera cluster until told to stop.
//!
//! Used by `scripts/csi-sanity` (and handy by hand): starts N replica daemons, the
//! controller and the node plugin in `--dir`, writes their endpoints as shell
//! variable assignments to the env file once every daemon answers, and keeps them
//! running until SIGTERM/SIGINT, when it kills every process group it started.
//!
//! The env file also lists `TESSERA_CLUSTER_PIDS` (each a process group id), so a
//! caller can still clean up should this process itself be killed with SIGKILL.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tessera_tests::ClusterBuilder;
use tokio::signal::unix::{signal, SignalKind};

/// Runs replica daemons, controller and node plugin until SIGTERM/SIGINT.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Directory for sockets, logs and replica data (created if missing, never removed).
    #[arg(long)]
    dir: PathBuf,

    /// Number of replica daemons.
    #[arg(long, default_value_t = 3)]
    replicas: usize,

    /// `--capacity` of each replica daemon.
    #[arg(long, default_value = "100Gi")]
    capacity: String,

    /// Node id of the node plugin.
    #[arg(long, default_value = "n1")]
    node_id: String,

    /// Where to write the endpoints once ready (default `<dir>/cluster.env`).
    #[arg(long)]
    env_file: Option<PathBuf>,
}

/// Quotes `value` for a POSIX shell.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Watch signals before starting anything, so an early SIGTERM still cleans up.
    let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;

    let start = ClusterBuilder::new()
        .replicas(args.replicas)
        .replica_capacity(&args.capacity)
        .node_id(&args.node_id)
        .dir(&args.dir)
        .start();
    let cluster = tokio::select! {
        cluster = start => cluster?,
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    };

    let mut env = String::new();
    let mut var = |name: &str, value: &str| {
        env.push_str(&format!("{name}={}\n", shell_quote(value)));
    };
    var("TESSERA_CLUSTER_DIR", &args.dir.display().to_string());
    var("CONTROLLER_ENDPOINT", &cluster.controller_endpoint()?);
    var("NODE_ENDPOINT", &cluster.node_endpoint()?);
    let replicas: Vec<String> = cluster
        .replica_control_addrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    var("REPLICA_CONTROL_ADDRS", &replicas.join(","));
    let pids: Vec<String> = cluster.pids().iter().map(ToString::to_string).collect();
    var("TESSERA_CLUSTER_PIDS", &pids.join(" "));

    let env_file = args
        .env_file
        .clone()
        .unwrap_or_else(|| args.dir.join("cluster.env"));
    let tmp = env_file.with_extension("env.tmp");
    {
        let mut file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(env.as_bytes())
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, &env_file)
        .with_context(|| format!("renaming {} to {}", tmp.display(), env_file.display()))?;
    print!("{env}");

    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    drop(cluster);
    Ok(())
}
