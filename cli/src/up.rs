//! `tessera up`: the whole system on this machine, a demo through CSI, and a clean
//! teardown on Ctrl-C.
//!
//! Order of events: take the directory's lock, remove what a crashed earlier run left
//! (its daemons, mounts, loop devices, sockets; never replica data), make or check the
//! certificates of the mutual TLS between the daemons (`DIR/tls`), start the replica
//! daemons, controller, engine-host and node plugin one after the other (each must
//! answer before the next starts), print where they are, run the demo, then wait for a
//! signal while [`crate::supervise`] watches the daemons: a daemon that dies is
//! reported and restarted (see [`crate::restart`] for which and why), so killing a
//! replica daemon does not end the cluster. Whatever happened, teardown runs: the
//! demo's CSI steps are undone, the daemons stopped newest first, and the directory
//! checked for mounts and loop devices that should not be there. The exit code is
//! non-zero whenever anything went wrong on the way (a failed start or demo step, a
//! fatal daemon death, a failed teardown step, a daemon not running at teardown).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tessera_tls::{TlsContext, Transport};

use crate::binaries::{Binaries, NodeMode};
use crate::certs::{self, LocalCerts};
use crate::daemon::DaemonFailed;
use crate::demo::{self, DemoSetup, Outcome, Progress};
use crate::layout::Layout;
use crate::leftovers;
use crate::local_cluster::LocalCluster;
use crate::replica_tls::CLI_IDENTITY;
use crate::restart::RestartPolicy;
use crate::signals::{is_interrupted, Stop};
use crate::supervise::Supervisor;
use crate::teardown::{print_log_tail, teardown};

/// Options of `tessera up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Directory holding everything (created if missing).
    pub dir: PathBuf,
    /// Number of replica daemons.
    pub replicas: usize,
    /// `--capacity` of each replica daemon.
    pub capacity: String,
    /// Skip the demo.
    pub no_demo: bool,
    /// Keep the demo volume at teardown instead of deleting it.
    pub keep_volumes: bool,
    /// Where the daemon binaries are, if not next to `tessera`.
    pub bin_dir: Option<PathBuf>,
    /// Leave dead daemons dead instead of restarting them.
    pub no_restart: bool,
}

/// Endpoints of a running local cluster, written for `tessera volumes|replicas --dir`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Endpoints {
    /// `unix://` endpoint of the controller.
    pub controller: String,
    /// `unix://` endpoint of the node plugin.
    pub node: String,
    /// Control addresses of the replica daemons.
    pub replicas: Vec<String>,
}

impl Endpoints {
    /// Reads the endpoints file of a running `tessera up` on `dir`.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = Layout::new(absolute(dir)?).endpoints_file();
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (is `tessera up` running on that directory?)",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// `path` made absolute against the current directory (not resolving symlinks, so
/// mount paths compare the way they were given).
pub fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        Ok(path.to_path_buf())
    } else {
        Ok(std::env::current_dir()
            .context("reading the current directory")?
            .join(path))
    }
}

/// Node ids of the replica daemons: `node-a`, `node-b`, ...
fn replica_node_ids(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| match u8::try_from(i).ok().filter(|i| *i < 26) {
            Some(i) => format!("node-{}", char::from(b'a' + i)),
            None => format!("node-{}", i + 1),
        })
        .collect()
}

/// Runs `tessera up` to the end; the exit code says whether everything went well.
pub async fn run(opts: UpOptions) -> anyhow::Result<ExitCode> {
    if opts.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    let stop = Stop::install()?;
    let binaries = Binaries::locate(opts.bin_dir.as_deref())?;
    let layout = Layout::new(absolute(&opts.dir)?);
    for dir in [layout.root.clone(), layout.logs(), layout.run()] {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _lock = lock(&layout)?;
    println!("tessera up: directory {}", layout.root.display());
    clean_leftovers(&layout).await?;
    let transport = prepare_tls(&layout)?;

    let mut cluster = LocalCluster::new(layout.clone(), binaries, transport.clone());
    let mut supervisor = Supervisor::new(RestartPolicy {
        enabled: !opts.no_restart,
    });
    let mut progress = Progress::default();
    let mut setup = DemoSetup {
        controller_socket: layout.controller_socket(),
        node_socket: layout.node_socket(),
        staging: layout.demo_staging(),
        target: layout.demo_target(),
        replicas: Vec::new(),
        transport,
    };
    let result = async {
        start(&mut cluster, &opts, &stop).await?;
        print_endpoints(&cluster, &layout)?;
        setup.replicas = cluster.replicas().to_vec();
        if !opts.no_demo {
            println!();
            match demo::run(&setup, &mut progress, &stop).await? {
                Outcome::Verified => {
                    let target = layout.demo_target();
                    let t = target.display();
                    println!(
                        "\ndemo: volume {:?} stays mounted at {t}; try:",
                        demo::VOLUME_NAME
                    );
                    println!("  ls -l {t}\n  (cd {t} && sha256sum -c SHA256SUMS)");
                }
                Outcome::NoDataPath => {}
            }
        }
        println!("\nRunning. Press Ctrl-C to tear everything down.");
        supervisor.run(&mut cluster, &stop, progress.staged).await
    }
    .await;

    let mut failed = false;
    match &result {
        Ok(()) => {}
        Err(e) if is_interrupted(e) => println!("tessera up: stopped before it was fully up"),
        Err(e) => {
            failed = true;
            println!("\ntessera up: FAILED: {e:#}");
            // A daemon failure carries its log already; a failed demo step does not.
            let has_log = e.chain().any(|c| c.is::<DaemonFailed>());
            if progress.started && !has_log {
                for name in progress.relevant_logs() {
                    print_log_tail(&cluster, name);
                }
            }
        }
    }
    println!("\nteardown:");
    let summary = teardown(&mut cluster, &layout, &setup, &progress, opts.keep_volumes).await;
    failed |= !summary.clean();
    println!("\nsummary: {}", summary.line());
    if !supervisor.restarts().is_empty() {
        let restarts: Vec<String> = supervisor
            .restarts()
            .iter()
            .map(|(name, n)| format!("{name} ({n}x)"))
            .collect();
        println!("restarted during the run: {}", restarts.join(", "));
    }
    println!("logs: {}", layout.logs().display());
    if failed {
        println!("tessera up: finished with errors (see above)");
        Ok(ExitCode::FAILURE)
    } else {
        println!("tessera up: everything stopped cleanly");
        Ok(ExitCode::SUCCESS)
    }
}

/// Holds an exclusive lock on the directory, so two runs never fight over it.
fn lock(layout: &Layout) -> anyhow::Result<Flock<std::fs::File>> {
    let path = layout.lock_file();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another `tessera up` is running on {} ({}: {e})",
            layout.root.display(),
            path.display()
        )
    })
}

/// Removes what a crashed run left, reporting each kind of leftover.
async fn clean_leftovers(layout: &Layout) -> anyhow::Result<()> {
    let orphans = leftovers::stop_orphans(layout).await?;
    if !orphans.is_empty() {
        println!(
            "cleanup: stopped daemons of an earlier run: {}",
            orphans.join(", ")
        );
    }
    let found = leftovers::unmount_all(layout)?;
    if !found.is_empty() {
        println!(
            "cleanup: removed leftovers of an earlier run:\n{}",
            indent(&found.describe())
        );
    }
    let remains = leftovers::scan(layout)?;
    if !remains.is_empty() {
        bail!(
            "cannot remove leftovers under {}:\n{}",
            layout.root.display(),
            indent(&remains.describe())
        );
    }
    let files = leftovers::remove_stale_files(layout)?;
    if !files.is_empty() {
        println!(
            "cleanup: removed {} stale socket/ready file(s)",
            files.len()
        );
    }
    Ok(())
}

/// `text` with every line indented by two spaces.
pub fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Makes (first run) or checks and repairs the certificates under `DIR/tls`, and
/// returns the CLI's transport from them: the daemons refuse anything else.
fn prepare_tls(layout: &Layout) -> anyhow::Result<Transport> {
    let root = layout.tls();
    let shown = root.display();
    match certs::ensure_local(&root)? {
        LocalCerts::Created => {
            println!(
                "tls: created a CA and the controller, node and replica certificates in {shown}"
            )
        }
        LocalCerts::Kept => println!("tls: certificates in {shown}"),
        LocalCerts::Reissued(ids) => {
            for (id, why) in ids {
                println!("tls: re-issued the {id} certificate from the CA in {shown} ({why})");
            }
        }
    }
    let dir = layout.tls_dir(CLI_IDENTITY);
    let context = TlsContext::load(&dir, CLI_IDENTITY).with_context(|| {
        format!(
            "loading the {CLI_IDENTITY} certificate in {}",
            dir.display()
        )
    })?;
    Ok(Transport::tls(context))
}

/// Starts every daemon in dependency order, each interruptible by a stop request.
async fn start(cluster: &mut LocalCluster, opts: &UpOptions, stop: &Stop) -> anyhow::Result<()> {
    for node_id in replica_node_ids(opts.replicas) {
        println!("starting replica daemon {node_id} ...");
        stop.interruptible(cluster.start_replica(&node_id, &opts.capacity))
            .await??;
    }
    println!("starting controller ...");
    stop.interruptible(cluster.start_controller()).await??;
    if cluster.node_mode() == NodeMode::EngineHostAndPlugin {
        println!("starting engine-host ...");
        stop.interruptible(cluster.start_engine_host()).await??;
    } else {
        println!(
            "note: this tessera-node has no `engine-host` subcommand: \
             starting a node plugin without data path"
        );
    }
    println!("starting node plugin ...");
    stop.interruptible(cluster.start_node_plugin()).await??;
    Ok(())
}

/// Prints the component table and how to talk to the cluster, and writes the
/// endpoints file.
fn print_endpoints(cluster: &LocalCluster, layout: &Layout) -> anyhow::Result<()> {
    let rows: Vec<[String; 4]> = cluster
        .daemons()
        .iter()
        .map(|d| {
            [
                d.name().to_owned(),
                d.pid().to_string(),
                d.endpoint().to_owned(),
                d.log().display().to_string(),
            ]
        })
        .collect();
    let header = ["component", "pid", "endpoint", "log"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    println!();
    for row in std::iter::once(&header).chain(&rows) {
        println!(
            "  {:<w0$}  {:>w1$}  {:<w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    let endpoints = Endpoints {
        controller: crate::csi_client::endpoint_of(&layout.controller_socket()),
        node: crate::csi_client::endpoint_of(&layout.node_socket()),
        replicas: cluster
            .replicas()
            .iter()
            .map(|r| r.control.to_string())
            .collect(),
    };
    let path = layout.endpoints_file();
    std::fs::write(&path, serde_json::to_vec_pretty(&endpoints)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let me = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "tessera".to_owned());
    let root = layout.root.display();
    println!("\nTalk to it:");
    println!("  {me} volumes --dir {root}");
    println!("  {me} replicas --dir {root}");
    println!(
        "  {me} replicas --replicas {} --tls-dir {}",
        endpoints.replicas.join(","),
        layout.tls_dir(CLI_IDENTITY).display()
    );
    println!(
        "  CSI_ENDPOINT={} (controller), {} (node)",
        endpoints.controller, endpoints.node
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids() {
        assert_eq!(replica_node_ids(3), ["node-a", "node-b", "node-c"]);
        assert_eq!(replica_node_ids(27)[26], "node-27");
    }
}
