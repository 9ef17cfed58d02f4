//! The replica I/O benchmark of issue 4 ("How it must be shown" (a), (b), (c)), in one
//! run, printed as a markdown table with the commands behind every figure.
//!
//! * (a) 4 KiB random write and read at QD32 through one real `tessera-replica` daemon
//!   (its data plane, driven by [`ReplicaDataClient`] with 32 requests in flight; fio
//!   cannot speak the protocol) against fio with io_uring on a raw file in the same
//!   directory (same filesystem).
//! * (b) fairness: two volumes on that daemon, one created with `maxIOPS=1000`, the
//!   other unlimited, both driven with 4 KiB random writes at QD32 at the same time.
//! * (c) a background-class stream next to a foreground QD1 4 KiB random-write workload:
//!   foreground latency alone and with the stream. Run in-process (this binary links
//!   the replica library: one [`Scheduler`], two [`LayeredStore`]s over
//!   [`ScheduledFileFactory`], exactly the daemon's I/O stack minus the network),
//!   because the data plane has no way to ask for background I/O: the foreground goes
//!   through the store's async path like the data plane's, the stream is 1 MiB
//!   sequential writes to a second volume (a rebuild's pattern) from blocking threads at
//!   `IoPriority::Background`; once with the scheduler's default background limits,
//!   once with them off (the behaviour before they existed), and once at foreground
//!   priority for contrast.
//! * (d) the layers underneath: 4 KiB random writes at QD32 through the scheduler
//!   submitted from async tasks and from 32 blocking threads, and through the whole
//!   store from 32 blocking threads and from 32 async tasks (reads too), the latter
//!   also on one thread with its own ring as a daemon's data-plane shard runs them.
//! * For (a), the CPU time and context switches per request of the daemon and of this
//!   client process (from /proc), which unlike IOPS hardly depend on what else runs.
//!
//! Run it through `bench/replica-io` (builds in release mode first). Arguments:
//! `--dir DIR` (default /var/tmp; needs ~3 GiB), `--secs N` (default 20 per run),
//! `--replica-bin PATH` (default: `tessera-replica` next to this example's directory),
//! `--fio PATH` (default `fio`), `--io-engine uring|sync`, `--parts abcd` (which parts
//! to run), `--skip-fio` (no baseline, for quick iterations), `--perf DIR` (`perf record`
//! and `perf stat` system-wide during each measured (a) phase), `--client-threads N`
//! (threads of the (a)/(b) load generator, default 1 as fio runs one job), `--daemon-arg
//! ARG` (repeatable; e.g. `--daemon-arg --data-plane-shards --daemon-arg 0`),
//! `--connections N` (default 2: extra (a) rows with the same QD32 spread over N
//! connections to the volume, which the daemon serves on N shards; 1 = no extra rows).
//!
//! The daemon runs with mutual TLS, as users get it: a CA made in the work directory,
//! the daemon with the replica certificate, this client with the controller's (to
//! create volumes) and a node's (the data plane, like an engine). `--daemon-arg
//! --insecure-plaintext` measures plain text instead (the client follows).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use tessera_replica::scheduler::{
    run_with_local_ring, AlignedBuf, BackgroundLimits, EngineKind, IoClass, IoRequest, Qos,
    Scheduler, SchedulerConfig, VolumeHandle, DEFAULT_QUEUE_DEPTH,
};
use tessera_replica::store::{BlockFileFactory, IoPriority, LayeredStore, ScheduledFileFactory};
use tessera_replica_protocol::control_proto::replica_control_client::ReplicaControlClient;
use tessera_replica_protocol::control_proto::CreateVolumeRequest;
use tessera_replica_protocol::data::client::ClientConfig;
use tessera_replica_protocol::data::{ClientError, ErrorCode, ReplicaDataClient};
use tessera_tls::generate::{identity_dir, ClusterCa, DEFAULT_VALIDITY};
use tessera_tls::{Identity, TlsContext, Transport};

const BLOCK: u64 = 4096;
const QD: usize = 32;
const VOLUME_BYTES: u64 = 1 << 30;
const STREAM_CHUNK: usize = 1 << 20;
const STREAM_THREADS: usize = 8;

/// xorshift64*: enough randomness for offsets, no dependency.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// Operations and per-operation latencies (µs) of one measured run.
#[derive(Debug, Default)]
struct Load {
    ops: u64,
    secs: f64,
    lat_us: Vec<u32>,
}

impl Load {
    fn merge(&mut self, other: Load) {
        self.ops += other.ops;
        self.lat_us.extend(other.lat_us);
    }

    fn iops(&self) -> f64 {
        self.ops as f64 / self.secs.max(1e-9)
    }

    fn pct(&mut self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return f64::NAN;
        }
        self.lat_us.sort_unstable();
        let i = ((self.lat_us.len() - 1) as f64 * p / 100.0).round() as usize;
        f64::from(self.lat_us[i.min(self.lat_us.len() - 1)])
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

struct Args {
    dir: PathBuf,
    secs: u64,
    replica_bin: PathBuf,
    fio: String,
    io_engine: String,
    /// Parts to run, e.g. "abcd" (all) or "a".
    parts: String,
    /// When set, `perf record -a -g` runs during each measured (a) phase and writes
    /// `<dir>/<phase>.data`, to see where the CPU goes.
    perf: Option<PathBuf>,
    /// Skip the fio baseline (quick iterations; ratios then print as NaN).
    skip_fio: bool,
    /// Threads of the load generator of (a) and (b).
    client_threads: usize,
    /// Extra arguments for the daemon (e.g. `--data-plane-shards 0`).
    daemon_args: Vec<String>,
    /// Connections of the extra (a) rows that spread the same QD32 over several
    /// connections to the one volume (each lands on its own daemon shard); 1 = none.
    connections: usize,
}

fn parse_args() -> Result<Args> {
    let exe = std::env::current_exe().context("locating this binary")?;
    // target/<profile>/examples/replica_io -> target/<profile>/tessera-replica
    let default_bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("tessera-replica"))
        .ok_or_else(|| anyhow!("cannot derive the replica binary's path from {exe:?}"))?;
    let mut args = Args {
        dir: PathBuf::from("/var/tmp"),
        secs: 20,
        replica_bin: default_bin,
        fio: "fio".into(),
        io_engine: "uring".into(),
        parts: "abcd".into(),
        perf: None,
        skip_fio: false,
        client_threads: 1,
        daemon_args: Vec::new(),
        connections: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => args.dir = PathBuf::from(value()?),
            "--secs" => args.secs = value()?.parse().context("--secs")?,
            "--replica-bin" => args.replica_bin = PathBuf::from(value()?),
            "--fio" => args.fio = value()?,
            "--io-engine" => args.io_engine = value()?,
            "--parts" => args.parts = value()?,
            "--perf" => args.perf = Some(PathBuf::from(value()?)),
            "--skip-fio" => args.skip_fio = true,
            "--client-threads" => {
                args.client_threads = value()?.parse().context("--client-threads")?;
                if args.client_threads == 0 {
                    bail!("--client-threads must be at least 1");
                }
            }
            "--daemon-arg" => args.daemon_args.push(value()?),
            "--connections" => {
                args.connections = value()?.parse().context("--connections")?;
                if args.connections == 0 || !QD.is_multiple_of(args.connections) {
                    bail!("--connections must divide {QD}");
                }
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(args)
}

/// One row of the output table.
struct Row {
    part: &'static str,
    what: String,
    iops: String,
    p50: String,
    p99: String,
    note: String,
}

fn row(
    part: &'static str,
    what: impl Into<String>,
    load: &mut Load,
    note: impl Into<String>,
) -> Row {
    Row {
        part,
        what: what.into(),
        iops: format!("{:.0}", load.iops()),
        p50: format!("{:.0}", load.pct(50.0)),
        p99: format!("{:.0}", load.pct(99.0)),
        note: note.into(),
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // The load generator of (a) and (b): one thread by default, as fio runs one job,
    // so the daemon under test gets the other core of a 2-core machine.
    let client_rt = match args.client_threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    let work = tempfile::Builder::new()
        .prefix("tessera-replica-io-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a work directory in {}", args.dir.display()))?;
    let dur = Duration::from_secs(args.secs);
    let mut rows = Vec::new();
    let mut commands = Vec::new();
    let load_at_start = load_average();

    let part = |p: char| args.parts.contains(p);
    // (a) baseline: fio on a raw file of the same filesystem, before and again after the
    // daemon's runs (the VM's disk moves by tens of percent between runs).
    let raw = work.path().join("raw.dat");
    let baseline = part('a') && !args.skip_fio;
    let mut fio_raw = HashMap::new();
    if baseline {
        let (first, first_rows) = fio_baseline(&args, &raw, None, &mut commands)?;
        fio_raw = first;
        rows.extend(first_rows);
    }

    // (a) and (b) through a real daemon.
    let mut metrics = String::new();
    let mut b_later = Vec::new();
    if part('a') || part('b') {
        let daemon = Daemon::start(&args, work.path())?;
        commands.push(daemon.command.clone());
        let (a_rows, b_rows, m) = client_rt.block_on(async {
            let a = match part('a') {
                true => daemon_part_a(&daemon, dur, &fio_raw, &args).await?,
                false => Vec::new(),
            };
            let b = match part('b') {
                true => daemon_part_b(&daemon, dur).await?,
                false => Vec::new(),
            };
            let metrics = scrape(&daemon.metrics).await.unwrap_or_default();
            anyhow::Ok((a, b, metrics))
        })?;
        rows.extend(a_rows);
        b_later = b_rows;
        metrics = m;
        daemon.stop();
    }
    if baseline {
        let (_, again) = fio_baseline(&args, &raw, Some(&fio_raw), &mut commands)?;
        rows.extend(again);
    }
    rows.extend(b_later);

    // (c) and (d) in-process.
    let inproc = work.path().join("inproc");
    std::fs::create_dir_all(&inproc)?;
    if part('c') {
        rows.extend(rt.block_on(part_c(&inproc, dur.min(Duration::from_secs(8)), &args))?);
    }
    if part('d') {
        rows.extend(rt.block_on(part_d(&inproc, Duration::from_secs(5), &args))?);
    }

    println!(
        "\n## Replica I/O benchmark ({} s per run, io engine {})\n",
        args.secs, args.io_engine
    );
    println!(
        "Machine load (1-minute average): {load_at_start} at the start, {} at the end.\n",
        load_average()
    );
    println!("| part | workload | IOPS | p50 µs | p99 µs | notes |");
    println!("|---|---|---:|---:|---:|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.part, r.what, r.iops, r.p50, r.p99, r.note
        );
    }
    println!("\nCommands:\n");
    for c in &commands {
        println!("* `{c}`");
    }
    println!(
        "* (a)/(b) load: `replica_io` with `ReplicaDataClient`, {QD} requests in flight per volume, 4 KiB, volumes of 1 GiB (read test after a sequential 1 MiB fill)"
    );
    let limits = BackgroundLimits::default();
    println!("* (c)/(d): in-process `Scheduler` ({} engine, depth {DEFAULT_QUEUE_DEPTH}, background limits: {} in flight while foreground is active, {} KiB pieces, {} ms linger) and `LayeredStore` over `ScheduledFileFactory` (O_DIRECT), stream = {STREAM_THREADS} threads x 1 MiB sequential writes", args.io_engine, limits.busy_depth, limits.max_transfer >> 10, limits.linger.as_millis());
    println!("\nScheduler counters of the daemon at the end of (b):\n");
    println!("```");
    for line in metrics.lines().filter(|l| {
        l.starts_with("tessera_replica_volume_io_")
            || l.starts_with("tessera_replica_volume_qos_max_iops")
    }) {
        println!("{line}");
    }
    println!("```");
    Ok(())
}

/// The 1-minute load average, as `uptime` shows it.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// fio randwrite and randread on `raw` (removed afterwards). With `first` (the
/// earlier baseline) the rows say how far this one moved from it; the commands are
/// recorded only the first time.
fn fio_baseline(
    args: &Args,
    raw: &Path,
    first: Option<&HashMap<&'static str, f64>>,
    commands: &mut Vec<String>,
) -> Result<(HashMap<&'static str, f64>, Vec<Row>)> {
    let mut iops_by_rw = HashMap::new();
    let mut rows = Vec::new();
    for rw in ["randwrite", "randread"] {
        let cmd = fio_command(&args.fio, raw, rw, args.secs);
        if first.is_none() {
            commands.push(cmd.join(" "));
        }
        eprintln!("running {}", cmd.join(" "));
        let (iops, p50, p99) = run_fio(&cmd).with_context(|| format!("fio {rw}"))?;
        iops_by_rw.insert(rw, iops);
        let (what, note) = match first.and_then(|f| f.get(rw)) {
            None => (
                format!("fio raw file, io_uring direct, 4k {rw} QD32"),
                "baseline".to_string(),
            ),
            Some(before) => (
                format!("fio raw file, io_uring direct, 4k {rw} QD32, again after the daemon"),
                format!(
                    "baseline again: {:.0} % of the first",
                    100.0 * iops / before
                ),
            ),
        };
        rows.push(Row {
            part: "a",
            what,
            iops: format!("{iops:.0}"),
            p50: format!("{p50:.0}"),
            p99: format!("{p99:.0}"),
            note,
        });
    }
    if raw.exists() {
        std::fs::remove_file(raw).context("removing the fio file")?;
    }
    Ok((iops_by_rw, rows))
}

fn fio_command(fio: &str, file: &Path, rw: &str, secs: u64) -> Vec<String> {
    [
        fio,
        "--name=raw",
        &format!("--filename={}", file.display()),
        "--ioengine=io_uring",
        "--direct=1",
        &format!("--rw={rw}"),
        "--bs=4k",
        "--iodepth=32",
        "--size=1G",
        &format!("--runtime={secs}"),
        "--time_based",
        "--output-format=json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs fio and returns (IOPS, p50 µs, p99 µs) of its only job.
fn run_fio(cmd: &[String]) -> Result<(f64, f64, f64)> {
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .output()
        .with_context(|| format!("running {}", cmd[0]))?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    let start = text
        .find('{')
        .ok_or_else(|| anyhow!("no JSON in fio output"))?;
    let v: serde_json::Value = serde_json::from_str(&text[start..]).context("fio JSON")?;
    let job = &v["jobs"][0];
    let side = if job["write"]["iops"].as_f64().unwrap_or(0.0) > 0.0 {
        &job["write"]
    } else {
        &job["read"]
    };
    let iops = side["iops"]
        .as_f64()
        .ok_or_else(|| anyhow!("fio JSON has no iops"))?;
    let pct = |p: &str| {
        side["clat_ns"]["percentile"][p]
            .as_f64()
            .unwrap_or(f64::NAN)
            / 1000.0
    };
    Ok((iops, pct("50.000000"), pct("99.000000")))
}

/// The daemon under test, in a process group of its own; stopped with SIGTERM.
struct Daemon {
    child: Option<Child>,
    control: String,
    data: String,
    metrics: String,
    command: String,
    /// How this client acts as the controller (creating volumes).
    control_transport: Transport,
    /// How this client acts as an engine (the data plane).
    data_transport: Transport,
}

/// The flag that turns TLS off on the daemon (and then on this client).
const PLAINTEXT: &str = "--insecure-plaintext";

/// TLS presenting `identity`, from the certificates [`ClusterCa::write_all`] put in
/// `root`.
fn tls_transport(root: &Path, identity: Identity) -> Result<Transport> {
    let dir = identity_dir(root, identity);
    let context = TlsContext::load(&dir, identity)
        .with_context(|| format!("loading the {identity} certificate from {}", dir.display()))?;
    Ok(Transport::tls(context))
}

impl Daemon {
    fn start(args: &Args, work: &Path) -> Result<Daemon> {
        if !args.replica_bin.exists() {
            bail!(
                "{} not found: build it with `cargo build --release -p tessera-replica`",
                args.replica_bin.display()
            );
        }
        let data = work.join("daemon");
        let ready = work.join("daemon.ready");
        let log = File::create(work.join("daemon.log"))?;
        let argv: Vec<String> = vec![
            "--data-dir".into(),
            data.display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-listen".into(),
            "127.0.0.1:0".into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--node-id".into(),
            "bench".into(),
            "--capacity".into(),
            "8Gi".into(),
            "--io-engine".into(),
            args.io_engine.clone(),
            "--ready-file".into(),
            ready.display().to_string(),
        ];
        let mut argv = argv;
        let (control_transport, data_transport) = if args.daemon_args.iter().any(|a| a == PLAINTEXT)
        {
            (Transport::plaintext(), Transport::plaintext())
        } else {
            let root = work.join("tls");
            ClusterCa::generate(DEFAULT_VALIDITY)
                .and_then(|ca| ca.write_all(&root, DEFAULT_VALIDITY))
                .context("making the benchmark's certificates")?;
            argv.push("--tls-dir".into());
            argv.push(identity_dir(&root, Identity::Replica).display().to_string());
            (
                tls_transport(&root, Identity::Controller)?,
                tls_transport(&root, Identity::Node)?,
            )
        };
        argv.extend(args.daemon_args.iter().cloned());
        let command = format!("{} {}", args.replica_bin.display(), argv.join(" "));
        let child = Command::new(&args.replica_bin)
            .args(&argv)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting tessera-replica")?;
        let mut daemon = Daemon {
            child: Some(child),
            control: String::new(),
            data: String::new(),
            metrics: String::new(),
            command,
            control_transport,
            data_transport,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = daemon.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!(
                        "tessera-replica exited with {status}; see {}",
                        work.join("daemon.log").display()
                    );
                }
            }
            if let Ok(text) = std::fs::read_to_string(&ready) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    let field = |k: &str| v[k].as_str().map(str::to_string);
                    if let (Some(c), Some(d), Some(m)) =
                        (field("control"), field("data"), field("metrics"))
                    {
                        daemon.control = c;
                        daemon.data = d;
                        daemon.metrics = m;
                        return Ok(daemon);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("tessera-replica not ready within 30 s");
            }
            // Polling a file written once; there is no event to wait on.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) {
        self.terminate();
    }

    /// CPU and context switches of the daemon so far.
    fn cost(&self) -> ProcCost {
        self.child
            .as_ref()
            .map(|c| ProcCost::of(c.id()))
            .unwrap_or_default()
    }

    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
    }
}

async fn create_volume(daemon: &Daemon, id: &str, params: &[(&str, &str)]) -> Result<()> {
    let endpoint = tessera_tls::grpc::endpoint(&daemon.control)?;
    let channel = tessera_tls::grpc::connect_channel(&endpoint, &daemon.control_transport).await?;
    let mut c = ReplicaControlClient::new(channel);
    c.create_volume(CreateVolumeRequest {
        volume_id: id.into(),
        name: id.into(),
        size_bytes: VOLUME_BYTES,
        replication_factor: 1,
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        access_type: "block".into(),
        ..Default::default()
    })
    .await
    .with_context(|| format!("creating volume {id}"))?;
    Ok(())
}

async fn connect(daemon: &Daemon, id: &str) -> Result<ReplicaDataClient> {
    let config = ClientConfig {
        transport: daemon.data_transport.clone(),
        ..ClientConfig::default()
    };
    ReplicaDataClient::connect_with(daemon.data.as_str(), id, 0, config)
        .await
        .map_err(|e| anyhow!("data-plane connect to {id}: {e:?}"))
}

/// CPU time and context switches of one process so far, from /proc: what a request
/// costs, which unlike IOPS hardly depends on what else runs on the machine.
#[derive(Debug, Clone, Copy, Default)]
struct ProcCost {
    cpu: Duration,
    switches: u64,
}

impl ProcCost {
    fn of(pid: u32) -> ProcCost {
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        // utime and stime (fields 14, 15) in clock ticks, after the ")" of the name.
        let ticks = std::fs::read_to_string(proc_dir.join("stat"))
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(')')?.1;
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
            .unwrap_or(100)
            .max(1);
        let mut switches = 0;
        if let Ok(tasks) = std::fs::read_dir(proc_dir.join("task")) {
            for task in tasks.flatten() {
                let status =
                    std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
                switches += status
                    .lines()
                    .filter(|l| l.contains("ctxt_switches"))
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum::<u64>();
            }
        }
        ProcCost {
            cpu: Duration::from_nanos(ticks * 1_000_000_000 / hz),
            switches,
        }
    }

    /// "X µs CPU, Y switches per op" between two readings.
    fn per_op(before: ProcCost, after: ProcCost, ops: u64) -> String {
        let ops = ops.max(1);
        format!(
            "{:.1} µs CPU + {:.1} switches/op",
            (after.cpu.saturating_sub(before.cpu)).as_secs_f64() * 1e6 / ops as f64,
            after.switches.saturating_sub(before.switches) as f64 / ops as f64
        )
    }
}

/// What [`drive`] sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    /// 4 KiB writes just past the volume's end: the daemon reads the whole frame,
    /// checks it and answers OUT_OF_RANGE before the store, so what is measured is
    /// the protocol and TCP alone for a write-sized request.
    RefusedWrite,
}

/// 4 KiB random writes (`write`) or reads at `qd` requests in flight for `dur`.
async fn drive(
    client: &ReplicaDataClient,
    write: bool,
    qd: usize,
    dur: Duration,
    seed: u64,
) -> Result<Load> {
    let op = if write { Op::Write } else { Op::Read };
    drive_lanes(std::slice::from_ref(client), op, qd, dur, seed).await
}

/// [`drive`] with any [`Op`], the `qd` requests spread round robin over `clients`.
async fn drive_lanes(
    clients: &[ReplicaDataClient],
    op: Op,
    qd: usize,
    dur: Duration,
    seed: u64,
) -> Result<Load> {
    let seq = Arc::new(AtomicU64::new(1 << 20));
    let payload = Bytes::from(vec![0x5au8; BLOCK as usize]);
    let blocks = VOLUME_BYTES / BLOCK;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..qd {
        let client = clients[t % clients.len()].clone();
        let seq = Arc::clone(&seq);
        let payload = payload.clone();
        tasks.spawn(async move {
            let mut rng = Rng::new(seed ^ (t as u64 + 1));
            let mut load = Load::default();
            while start.elapsed() < dur {
                let off = rng.below(blocks) * BLOCK;
                let t0 = Instant::now();
                match op {
                    Op::Write => {
                        let s = seq.fetch_add(1, Ordering::Relaxed);
                        client.write(off, payload.clone(), s).await?;
                    }
                    Op::Read => {
                        client.read(off, BLOCK as u32).await?;
                    }
                    Op::RefusedWrite => {
                        let s = seq.fetch_add(1, Ordering::Relaxed);
                        match client.write(VOLUME_BYTES, payload.clone(), s).await {
                            Err(ClientError::Remote(e)) if e.code == ErrorCode::OutOfRange => {}
                            other => bail!("a write past the end answered {other:?}"),
                        }
                    }
                }
                load.lat_us.push(micros(t0.elapsed()));
                load.ops += 1;
            }
            anyhow::Ok(load)
        });
    }
    let mut total = Load::default();
    while let Some(r) = tasks.join_next().await {
        total.merge(
            r.map_err(|e| anyhow!("load task: {e}"))?
                .map_err(|e| anyhow!("I/O: {e:?}"))?,
        );
    }
    total.secs = start.elapsed().as_secs_f64();
    Ok(total)
}

/// Runs `load` and describes what it cost per request: "daemon X µs CPU + Y
/// switches/op; client ..." (from /proc, before and after).
async fn with_cost(
    daemon: &Daemon,
    load: impl std::future::Future<Output = Result<Load>>,
) -> Result<(Load, String)> {
    let (daemon_before, client_before) = (daemon.cost(), ProcCost::of(std::process::id()));
    let load = load.await?;
    let (daemon_after, client_after) = (daemon.cost(), ProcCost::of(std::process::id()));
    let cost = format!(
        "daemon {}; client {}",
        ProcCost::per_op(daemon_before, daemon_after, load.ops),
        ProcCost::per_op(client_before, client_after, load.ops)
    );
    Ok((load, cost))
}

/// Writes the whole volume once with 1 MiB writes, so random reads find data.
async fn fill(client: &ReplicaDataClient) -> Result<()> {
    let chunk = Bytes::from(vec![0xa5u8; 1 << 20]);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (client, chunk, next) = (client.clone(), chunk.clone(), Arc::clone(&next));
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= VOLUME_BYTES >> 20 {
                    return anyhow::Ok(());
                }
                client
                    .write(i << 20, chunk.clone(), 1)
                    .await
                    .map_err(|e| anyhow!("{e:?}"))?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    client.flush().await.map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

async fn daemon_part_a(
    daemon: &Daemon,
    dur: Duration,
    raw: &HashMap<&str, f64>,
    args: &Args,
) -> Result<Vec<Row>> {
    create_volume(daemon, "bench-a", &[]).await?;
    let client = connect(daemon, "bench-a").await?;
    // Connected first, while no other connection exists: the daemon gives each new
    // connection to its least-loaded shard, so these end up on different threads.
    let mut lanes = vec![client.clone()];
    for _ in 1..args.connections {
        lanes.push(connect(daemon, "bench-a").await?);
    }
    eprintln!("(a) filling the volume");
    fill(&client).await?;
    let mut rows = Vec::new();
    // Reads of never-written blocks touch no disk (the store answers zeros from its
    // index): the ceiling of the protocol, TCP and blocking-pool path on this machine.
    create_volume(daemon, "bench-null", &[]).await?;
    let null = connect(daemon, "bench-null").await?;
    eprintln!("(a) daemon 4k read of never-written blocks QD{QD}");
    let (mut load, cost) = with_cost(
        daemon,
        drive(&null, false, QD, dur.min(Duration::from_secs(10)), 5),
    )
    .await?;
    let note = format!("no disk I/O: protocol + TCP + store ceiling; {cost}");
    rows.push(row(
        "a",
        format!("tessera-replica data plane, 4k randread of unwritten blocks QD{QD}"),
        &mut load,
        note,
    ));
    eprintln!("(a) daemon 4k writes refused past the volume's end QD{QD}");
    let refused = drive_lanes(
        std::slice::from_ref(&null),
        Op::RefusedWrite,
        QD,
        dur.min(Duration::from_secs(10)),
        6,
    );
    let (mut load, cost) = with_cost(daemon, refused).await?;
    let ratio = 100.0 * load.iops() / raw.get("randwrite").copied().unwrap_or(f64::NAN);
    let note = format!(
        "no disk I/O: a 4 KiB write frame read, checked and refused (OUT_OF_RANGE) before the store: protocol + TCP ceiling for writes, {ratio:.0} % of raw writes; {cost}"
    );
    rows.push(row(
        "a",
        format!("tessera-replica data plane, 4k writes refused past the end QD{QD}"),
        &mut load,
        note,
    ));
    rows.extend(measure_rw(daemon, &[client], dur, raw, args.perf.as_deref()).await?);
    if lanes.len() > 1 {
        rows.extend(measure_rw(daemon, &lanes, dur, raw, None).await?);
    }
    Ok(rows)
}

/// The randwrite and randread rows of (a): QD32 spread evenly over `clients`
/// (connections to the same volume).
async fn measure_rw(
    daemon: &Daemon,
    clients: &[ReplicaDataClient],
    dur: Duration,
    raw: &HashMap<&str, f64>,
    perf: Option<&Path>,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let over = match clients.len() {
        1 => String::new(),
        n => format!(" over {n} connections"),
    };
    for (op, rw, goal) in [(Op::Write, "randwrite", 60.0), (Op::Read, "randread", 85.0)] {
        eprintln!("(a) daemon 4k {rw} QD{QD}{over}");
        let profile = perf.map(|dir| Profile::start(dir, rw, dur)).transpose()?;
        let (mut load, cost) = with_cost(daemon, drive_lanes(clients, op, QD, dur, 7)).await?;
        if let Some(p) = profile {
            p.finish()?;
        }
        if op == Op::Write {
            // As fio's `--end_fsync`: the write phase's metadata reaches the disk now,
            // not as background writeback during the read phase.
            clients[0]
                .flush()
                .await
                .map_err(|e| anyhow!("flush: {e:?}"))?;
        }
        let ratio = 100.0 * load.iops() / raw.get(rw).copied().unwrap_or(f64::NAN);
        let note = format!("{ratio:.0} % of raw (goal ≥ {goal:.0} %); {cost}");
        rows.push(row(
            "a",
            format!("tessera-replica data plane, 4k {rw} QD{QD}{over}"),
            &mut load,
            note,
        ));
    }
    Ok(rows)
}

/// A system-wide `perf record` and `perf stat` (context switches, system calls) over
/// most of one measured phase.
struct Profile(Vec<Child>);

impl Profile {
    fn start(dir: &Path, phase: &str, dur: Duration) -> Result<Profile> {
        std::fs::create_dir_all(dir)?;
        let secs = dur.as_secs().saturating_sub(2).max(1).to_string();
        let spawn = |args: &[&str], out: PathBuf| {
            Command::new("perf")
                .args(args)
                .arg(out)
                .args(["--", "sleep", &secs])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting perf")
        };
        let record = spawn(
            &["record", "-a", "-F", "1999", "-g", "-o"],
            dir.join(format!("{phase}.data")),
        )?;
        let stat = spawn(
            &[
                "stat",
                "-a",
                "-e",
                "context-switches,raw_syscalls:sys_enter,task-clock",
                "-o",
            ],
            dir.join(format!("{phase}.stat")),
        )?;
        Ok(Profile(vec![record, stat]))
    }

    fn finish(self) -> Result<()> {
        for mut child in self.0 {
            child.wait().context("waiting for perf")?;
        }
        Ok(())
    }
}

async fn daemon_part_b(daemon: &Daemon, dur: Duration) -> Result<Vec<Row>> {
    create_volume(daemon, "fair-capped", &[("maxIOPS", "1000")]).await?;
    create_volume(daemon, "fair-free", &[]).await?;
    let capped = connect(daemon, "fair-capped").await?;
    let free = connect(daemon, "fair-free").await?;
    // Filled first, as in (a): random O_DIRECT writes into holes allocate blocks, which
    // ext4 serialises per file, and that would measure the filesystem, not the
    // scheduler. (The capped volume's fill is throttled too: a 1 MiB write is one
    // operation, so 1024 of them take about a second.)
    eprintln!("(b) filling both volumes");
    fill(&capped).await?;
    fill(&free).await?;
    eprintln!("(b) two volumes, QD{QD} each");
    let (c, f) = tokio::join!(
        drive(&capped, true, QD, dur, 11),
        drive(&free, true, QD, dur, 13)
    );
    let (mut c, mut f) = (c?, f?);
    let dev = 100.0 * (c.iops() - 1000.0) / 1000.0;
    Ok(vec![
        row(
            "b",
            format!("volume maxIOPS=1000, 4k randwrite QD{QD}"),
            &mut c,
            format!("{dev:+.1} % from 1000 (goal ±10 %)"),
        ),
        row(
            "b",
            format!("volume unlimited, same time, 4k randwrite QD{QD}"),
            &mut f,
            "gets the rest",
        ),
    ])
}

async fn scrape(addr: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

fn engine_kind(name: &str) -> Result<EngineKind> {
    match name {
        "uring" => Ok(EngineKind::IoUring),
        "sync" => Ok(EngineKind::Sync { threads: 16 }),
        other => bail!("unknown io engine {other}"),
    }
}

fn open_store(dir: &Path, volume: &VolumeHandle) -> Result<LayeredStore> {
    let factory: Arc<dyn BlockFileFactory> =
        Arc::new(ScheduledFileFactory::new(volume.clone(), true));
    Ok(LayeredStore::create_with(dir, VOLUME_BYTES, factory)?)
}

/// Opens an existing store over another scheduler registration.
fn reopen_store(dir: &Path, volume: &VolumeHandle) -> Result<LayeredStore> {
    let factory: Arc<dyn BlockFileFactory> =
        Arc::new(ScheduledFileFactory::new(volume.clone(), true));
    Ok(LayeredStore::open_with(dir, factory)?)
}

/// Writes every block of `store` once (1 MiB writes from 4 threads), so later random
/// writes overwrite allocated blocks as in a long-lived volume.
fn fill_store(store: &Arc<LayeredStore>) -> Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (store, next) = (Arc::clone(store), Arc::clone(&next));
            std::thread::spawn(move || {
                let chunk = vec![0xa5u8; STREAM_CHUNK];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= VOLUME_BYTES / STREAM_CHUNK as u64 {
                        return anyhow::Ok(());
                    }
                    store.write(i * STREAM_CHUNK as u64, &chunk, 1)?;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| anyhow!("fill thread panicked"))??;
    }
    store.flush()?;
    Ok(())
}

/// Foreground QD1 4 KiB random writes on `store` for `dur`, through the store's async
/// path (as the daemon's data plane runs them).
async fn foreground_qd1(store: Arc<LayeredStore>, dur: Duration) -> Result<Load> {
    let data = vec![0x3cu8; BLOCK as usize];
    let mut rng = Rng::new(99);
    let mut load = Load::default();
    let start = Instant::now();
    let mut seq = 1u64;
    while start.elapsed() < dur {
        let off = rng.below(VOLUME_BYTES / BLOCK) * BLOCK;
        let t0 = Instant::now();
        store
            .write_async(IoPriority::Foreground, off, data.clone(), seq)
            .await?;
        load.lat_us.push(micros(t0.elapsed()));
        load.ops += 1;
        seq += 1;
    }
    load.secs = start.elapsed().as_secs_f64();
    Ok(load)
}

/// A stream of 1 MiB sequential writes to `store` from several threads at `priority`
/// until `stop`; returns the bytes written. Each thread waits for its write as the
/// store's blocking API does (the write runs on the thread, its I/O on the ring thread).
fn stream(
    store: Arc<LayeredStore>,
    priority: IoPriority,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Result<u64>>> {
    let next = Arc::new(AtomicU64::new(0));
    let runtime = tokio::runtime::Handle::current();
    (0..STREAM_THREADS)
        .map(|_| {
            let (store, stop, next) = (Arc::clone(&store), Arc::clone(&stop), Arc::clone(&next));
            let runtime = runtime.clone();
            std::thread::spawn(move || {
                let chunk = vec![0x77u8; STREAM_CHUNK];
                let mut bytes = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let i =
                        next.fetch_add(1, Ordering::Relaxed) % (VOLUME_BYTES / STREAM_CHUNK as u64);
                    // Outside a runtime context the write runs where it is awaited.
                    let write =
                        store.write_async(priority, i * STREAM_CHUNK as u64, chunk.clone(), 1);
                    runtime.block_on(write)?;
                    bytes += STREAM_CHUNK as u64;
                }
                anyhow::Ok(bytes)
            })
        })
        .collect()
}

async fn part_c(dir: &Path, dur: Duration, args: &Args) -> Result<Vec<Row>> {
    let capped = BackgroundLimits::default();
    let uncapped = BackgroundLimits {
        busy_depth: DEFAULT_QUEUE_DEPTH,
        max_transfer: 0,
        ..capped
    };
    let runs = [
        (capped, None),
        (capped, Some(IoPriority::Background)),
        (uncapped, Some(IoPriority::Background)),
        (capped, Some(IoPriority::Foreground)),
    ];
    std::fs::create_dir_all(dir)?;
    let mut rows = Vec::new();
    for (i, (limits, stream_priority)) in runs.into_iter().enumerate() {
        // A scheduler per run (the limits are its config); the stores are created and
        // filled once and reopened over each new one.
        let sched = Scheduler::new(SchedulerConfig {
            name: "bench".into(),
            engine: engine_kind(&args.io_engine)?,
            background: limits,
            ..SchedulerConfig::default()
        })?;
        let fg_vol = sched.register_volume("fg", Qos::unlimited())?;
        let bg_vol = sched.register_volume("bg", Qos::unlimited())?;
        let (fg, bg) = if i == 0 {
            let fg = Arc::new(open_store(&dir.join("fg"), &fg_vol)?);
            let bg = Arc::new(open_store(&dir.join("bg"), &bg_vol)?);
            let (f, b) = (Arc::clone(&fg), Arc::clone(&bg));
            tokio::task::spawn_blocking(move || fill_store(&f).and_then(|()| fill_store(&b)))
                .await??;
            (fg, bg)
        } else {
            (
                Arc::new(reopen_store(&dir.join("fg"), &fg_vol)?),
                Arc::new(reopen_store(&dir.join("bg"), &bg_vol)?),
            )
        };
        eprintln!("(c) foreground QD1, stream: {stream_priority:?}, {limits:?}");
        let stop = Arc::new(AtomicBool::new(false));
        let streams = match stream_priority {
            Some(p) => stream(Arc::clone(&bg), p, Arc::clone(&stop)),
            None => Vec::new(),
        };
        // On a runtime worker, as the data plane's request tasks run.
        let result = tokio::spawn(foreground_qd1(Arc::clone(&fg), dur)).await?;
        stop.store(true, Ordering::Relaxed);
        let mut bytes = 0u64;
        for s in streams {
            let s = tokio::task::spawn_blocking(move || s.join()).await?;
            bytes += s.map_err(|_| anyhow!("stream thread panicked"))??;
        }
        let mut load = result?;
        let caps = if limits == capped {
            format!(
                "background capped at {} in flight, {} KiB pieces",
                limits.busy_depth,
                limits.max_transfer >> 10
            )
        } else {
            "no background cap (as before)".to_string()
        };
        let (what, note) = match stream_priority {
            None => (String::new(), "no stream".to_string()),
            Some(p) => (
                format!(" + 1 MiB seq write stream ({p:?} class)"),
                format!("stream {:.0} MB/s; {caps}", bytes as f64 / load.secs / 1e6),
            ),
        };
        rows.push(row(
            "c",
            format!("fg 4k randwrite QD1{what}"),
            &mut load,
            note,
        ));
    }
    Ok(rows)
}

async fn part_d(dir: &Path, dur: Duration, args: &Args) -> Result<Vec<Row>> {
    let sched = Scheduler::new(SchedulerConfig {
        name: "bench-d".into(),
        engine: engine_kind(&args.io_engine)?,
        ..SchedulerConfig::default()
    })?;
    let vol = sched.register_volume("d", Qos::unlimited())?;
    let path = dir.join("d.dat");
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)?,
    );
    {
        // Allocate every block (see `fill_store`).
        use std::os::unix::fs::FileExt;
        let chunk = AlignedBuf::from_slice(&vec![0xa5u8; STREAM_CHUNK])?;
        for i in 0..VOLUME_BYTES / STREAM_CHUNK as u64 {
            file.write_all_at(chunk.as_slice(), i * STREAM_CHUNK as u64)?;
        }
        file.sync_all()?;
    }
    let blocks = VOLUME_BYTES / BLOCK;
    let mut rows = Vec::new();

    eprintln!("(d) scheduler, async submit");
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..QD {
        let (vol, file) = (vol.clone(), Arc::clone(&file));
        tasks.spawn(async move {
            let mut rng = Rng::new(t as u64 + 1);
            let mut buf = Some(AlignedBuf::from_slice(&[0x5a; BLOCK as usize])?);
            let mut load = Load::default();
            while start.elapsed() < dur {
                let Some(b) = buf.take() else { break };
                let t0 = Instant::now();
                let req = IoRequest::Write {
                    file: Arc::clone(&file),
                    offset: rng.below(blocks) * BLOCK,
                    buf: b,
                };
                buf = vol.submit(IoClass::ForegroundWrite, req).await?.buf;
                load.lat_us.push(micros(t0.elapsed()));
                load.ops += 1;
            }
            anyhow::Ok(load)
        });
    }
    let mut load = Load::default();
    while let Some(r) = tasks.join_next().await {
        load.merge(r??);
    }
    load.secs = start.elapsed().as_secs_f64();
    rows.push(row(
        "d",
        format!("scheduler only, async submit, 4k randwrite QD{QD}"),
        &mut load,
        "tokio tasks await the completion",
    ));

    eprintln!("(d) scheduler, blocking submit");
    let start = Instant::now();
    let threads: Vec<_> = (0..QD)
        .map(|t| {
            let (vol, file) = (vol.clone(), Arc::clone(&file));
            std::thread::spawn(move || {
                let mut rng = Rng::new(t as u64 + 1);
                let mut buf = Some(AlignedBuf::from_slice(&[0x5a; BLOCK as usize])?);
                let mut load = Load::default();
                while start.elapsed() < dur {
                    let Some(b) = buf.take() else { break };
                    let t0 = Instant::now();
                    let req = IoRequest::Write {
                        file: Arc::clone(&file),
                        offset: rng.below(blocks) * BLOCK,
                        buf: b,
                    };
                    buf = vol.submit_blocking(IoClass::ForegroundWrite, req)?.buf;
                    load.lat_us.push(micros(t0.elapsed()));
                    load.ops += 1;
                }
                anyhow::Ok(load)
            })
        })
        .collect();
    let mut load = Load::default();
    for t in threads {
        load.merge(t.join().map_err(|_| anyhow!("thread panicked"))??);
    }
    load.secs = start.elapsed().as_secs_f64();
    rows.push(row(
        "d",
        format!("scheduler only, blocking submit, 4k randwrite QD{QD}"),
        &mut load,
        "32 threads park on the completion",
    ));

    eprintln!("(d) store over the scheduler");
    let store = Arc::new(open_store(&dir.join("d-store"), &vol)?);
    {
        let store = Arc::clone(&store);
        tokio::task::spawn_blocking(move || fill_store(&store)).await??;
    }
    let start = Instant::now();
    let threads: Vec<_> = (0..QD)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let mut rng = Rng::new(t as u64 + 1);
                let data = vec![0x5au8; BLOCK as usize];
                let mut load = Load::default();
                while start.elapsed() < dur {
                    let t0 = Instant::now();
                    store.write(rng.below(blocks) * BLOCK, &data, 1)?;
                    load.lat_us.push(micros(t0.elapsed()));
                    load.ops += 1;
                }
                anyhow::Ok(load)
            })
        })
        .collect();
    let mut load = Load::default();
    for t in threads {
        load.merge(t.join().map_err(|_| anyhow!("thread panicked"))??);
    }
    load.secs = start.elapsed().as_secs_f64();
    rows.push(row(
        "d",
        format!("LayeredStore blocking API, 4k randwrite QD{QD}"),
        &mut load,
        "32 threads: crc + data (scheduled) + meta entry (buffered)",
    ));

    for write in [true, false] {
        let rw = if write { "randwrite" } else { "randread" };
        eprintln!("(d) store's async path, {rw}");
        let mut load = store_async_load(&store, write, dur).await?;
        rows.push(row(
            "d",
            format!("LayeredStore async path, 4k {rw} QD{QD}"),
            &mut load,
            "32 tasks, as the data plane: no blocking thread",
        ));
    }
    if args.io_engine == "uring" {
        for write in [true, false] {
            let rw = if write { "randwrite" } else { "randread" };
            eprintln!("(d) store's async path on a shard thread, {rw}");
            let mut load = store_load_on_shard(&store, write, dur).await?;
            rows.push(row(
                "d",
                format!("LayeredStore async path on a data-plane shard, 4k {rw} QD{QD}"),
                &mut load,
                "32 tasks on one thread with its own ring, as a daemon shard runs them, without the protocol",
            ));
        }
    }
    Ok(rows)
}

/// [`store_async_load`] on a thread of its own with a single-threaded runtime and a
/// ring of its own ([`run_with_local_ring`]), as a data-plane shard of the daemon runs a
/// connection.
async fn store_load_on_shard(
    store: &Arc<LayeredStore>,
    write: bool,
    dur: Duration,
) -> Result<Load> {
    let store = Arc::clone(store);
    let thread = std::thread::spawn(move || -> Result<Load> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let local = tokio::task::LocalSet::new();
        rt.block_on(local.run_until(async move {
            run_with_local_ring(DEFAULT_QUEUE_DEPTH, store_async_load(&store, write, dur)).await?
        }))
    });
    tokio::task::spawn_blocking(move || thread.join())
        .await?
        .map_err(|_| anyhow!("the shard thread panicked"))?
}

/// QD32 4 KiB random writes or reads on the (filled) `store` for `dur` through its async
/// path, as the data plane runs them, without the protocol.
async fn store_async_load(store: &Arc<LayeredStore>, write: bool, dur: Duration) -> Result<Load> {
    let blocks = VOLUME_BYTES / BLOCK;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..QD {
        let store = Arc::clone(store);
        tasks.spawn(async move {
            let mut rng = Rng::new(t as u64 + 1);
            let data = vec![0x5au8; BLOCK as usize];
            let mut load = Load::default();
            while start.elapsed() < dur {
                let t0 = Instant::now();
                let offset = rng.below(blocks) * BLOCK;
                if write {
                    store
                        .write_async(IoPriority::Foreground, offset, data.clone(), 1)
                        .await?;
                } else {
                    store
                        .read_async(IoPriority::Foreground, offset, BLOCK)
                        .await?;
                }
                load.lat_us.push(micros(t0.elapsed()));
                load.ops += 1;
            }
            anyhow::Ok(load)
        });
    }
    let mut load = Load::default();
    while let Some(r) = tasks.join_next().await {
        load.merge(r??);
    }
    load.secs = start.elapsed().as_secs_f64();
    Ok(load)
}
