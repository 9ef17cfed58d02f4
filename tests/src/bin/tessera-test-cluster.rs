//! `tessera-test-cluster`: runs a local Tessera cluster until told to stop.
//!
//! Used by `scripts/csi-sanity`, `bench/data-path-fio` and `bench/snapshots` (and
//! handy by hand):
//! starts N replica daemons, the controller and, per node, an engine-host and a node
//! plugin in `--dir`, writes their endpoints as shell variable assignments to the env
//! file once every daemon answers, and keeps them running until SIGTERM/SIGINT. Then
//! it tears the cluster down like the test harness does: mounts outside the node
//! state directories are unmounted, the engine-hosts get SIGTERM (flush, detach loop
//! devices and FUSE mounts), every other process group is killed, and whatever is
//! still mounted or bound under `--dir` is removed.
//!
//! The env file also lists `TESSERA_CLUSTER_PIDS` (each a process group id) and,
//! among them, `ENGINE_HOST_PIDS`, so a caller can still clean up (engine-hosts
//! first, with SIGTERM) should this process itself be killed with SIGKILL.
//!
//! Transport: mutual TLS by default, with a CA of the cluster's own written under
//! `<dir>/tls` (each daemon gets its identity's directory). The env file says
//! `TRANSPORT` (`tls` or `plaintext`), `TLS_ROOT` (the certificate root: `ca.crt`,
//! `ca.key`, `controller/`, `node/`, `replica/`) and `CONTROLLER_TLS_DIR` (what a
//! client acting as the controller passes as `--tls-dir`, e.g. `tessera verify`);
//! both empty with `--plaintext`, which starts every daemon with
//! `--insecure-plaintext` (for benchmarks comparing TLS on and off).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tessera_tests::ClusterBuilder;
use tessera_tls::Identity;
use tokio::signal::unix::{signal, SignalKind};

/// Runs replica daemons, controller, engine-hosts and node plugins until SIGTERM/SIGINT.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Directory for sockets, logs and replica data (created if missing, never removed).
    #[arg(long)]
    dir: PathBuf,

    /// Number of replica daemons.
    #[arg(long, default_value_t = 3)]
    replicas: usize,

    /// Spread the replica daemons round-robin over this many zones (`z1`, `z2`, ...).
    #[arg(long, default_value_t = 1)]
    zones: usize,

    /// Extra arguments for every replica daemon (repeatable, e.g.
    /// `--replica-arg=--copy-max-bandwidth --replica-arg=100Mi`).
    #[arg(long = "replica-arg", allow_hyphen_values = true)]
    replica_args: Vec<String>,

    /// `--capacity` of each replica daemon.
    #[arg(long, default_value = "100Gi")]
    capacity: String,

    /// Node ids to run an engine-host and a node plugin for (comma-separated or
    /// repeated); ids without a replica daemon are passed to the controller as
    /// `--extra-nodes`. The first node's endpoint is `NODE_ENDPOINT`.
    #[arg(
        long = "nodes",
        alias = "node-id",
        value_delimiter = ',',
        default_value = "n1"
    )]
    nodes: Vec<String>,

    /// Extra arguments for the controller (repeatable, e.g. `--controller-arg=--foo`).
    #[arg(long = "controller-arg", allow_hyphen_values = true)]
    controller_args: Vec<String>,

    /// Where to write the endpoints once ready (default `<dir>/cluster.env`).
    #[arg(long)]
    env_file: Option<PathBuf>,

    /// Run every daemon without TLS (`--insecure-plaintext`): INSECURE, for
    /// comparing the data path with TLS on and off.
    #[arg(long)]
    plaintext: bool,

    /// How often the daemons look for rotated certificate files, in seconds
    /// (`--tls-reload-secs`; the daemons' default when not given).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    tls_reload_secs: Option<u64>,
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

    let mut builder = ClusterBuilder::new().plaintext(args.plaintext);
    if let Some(secs) = args.tls_reload_secs {
        builder = builder.tls_reload_secs(secs);
    }
    let start = builder
        .replicas(args.replicas)
        .zones(args.zones)
        .replica_args(args.replica_args.iter().cloned())
        .replica_capacity(&args.capacity)
        .nodes(args.nodes.iter().cloned())
        .controller_args(args.controller_args.iter().cloned())
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
    let first = cluster.nodes().first().context("the cluster has no node")?;
    var("NODE_ID", first.node_id());
    var("NODE_STATE_DIR", &first.state_dir().display().to_string());
    var(
        "ENGINE_HOST_SOCKET",
        &first.engine_host_socket().display().to_string(),
    );
    let node_ids: Vec<&str> = cluster.nodes().iter().map(|n| n.node_id()).collect();
    var("NODE_IDS", &node_ids.join(" "));
    let endpoints: Vec<String> = cluster.nodes().iter().map(|n| n.endpoint()).collect();
    var("NODE_ENDPOINTS", &endpoints.join(" "));
    let replicas: Vec<String> = cluster
        .replica_control_addrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    var("REPLICA_CONTROL_ADDRS", &replicas.join(","));
    let tls = cluster.tls();
    let path_or_empty = |p: Option<&std::path::Path>| p.map(|p| p.display().to_string());
    var(
        "TRANSPORT",
        if tls.is_plaintext() {
            "plaintext"
        } else {
            "tls"
        },
    );
    var("TLS_ROOT", &path_or_empty(tls.root()).unwrap_or_default());
    var(
        "CONTROLLER_TLS_DIR",
        &path_or_empty(tls.dir(Identity::Controller).as_deref()).unwrap_or_default(),
    );
    let pids: Vec<String> = cluster.pids().iter().map(ToString::to_string).collect();
    var("TESSERA_CLUSTER_PIDS", &pids.join(" "));
    let engine_hosts: Vec<String> = cluster
        .engine_host_pids()
        .iter()
        .map(ToString::to_string)
        .collect();
    var("ENGINE_HOST_PIDS", &engine_hosts.join(" "));

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
