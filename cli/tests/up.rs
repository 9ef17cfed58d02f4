//! `tessera up` end to end, with real processes and real mounts.
//!
//! The test runs the `tessera` binary the way a user does, reads its stdout until the
//! demo reports its files verified, looks at the mounted volume from outside, asks the
//! other subcommands about the running cluster, then sends SIGINT and checks the
//! teardown: exit 0, nothing mounted or attached under the directory, no daemon left.
//! The replica ports refuse a plain-text client (the daemons run with the
//! certificates `tessera up` made under the directory). A second test SIGKILLs
//! `tessera` itself and checks that the next run cleans up and keeps the CA.
//! The others kill one daemon under a running `tessera up`: a replica daemon is
//! restarted while a writer keeps writing to the volume; with `--no-restart` it
//! stays dead, the cluster runs on and the run ends with an error; the engine-host
//! under the mounted volume ends the run with an error and a clean teardown; and a
//! daemon that cannot start at all makes the run fail.
//!
//! Needs root (mounts, loop devices, FUSE) and the other binaries built next to
//! `tessera` (`cargo build --workspace`; scripts/test does it). Without root the
//! tests say so and pass without checking anything.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

/// How long startup plus demo may take on a slow, busy machine.
const DEMO_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the teardown may take.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a killed daemon may take to be noticed, restarted and seen by the CLI.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(90);

/// Line `tessera up` prints once the demo files were read back and matched.
const VERIFIED: &str = "demo: verified";
/// Line `tessera up` prints when the node has no data path (demo stops early).
const NO_DATA_PATH: &str = "demo: stopped after ControllerPublishVolume";
/// Line printed when `tessera up` waits for Ctrl-C.
const RUNNING: &str = "Press Ctrl-C to tear everything down";

fn tessera() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tessera"))
}

/// Whether the environment can run these tests; prints why not.
fn runnable() -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipping: `tessera up` mounts volumes and needs root");
        return false;
    }
    let dir = tessera()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    for bin in ["tessera-replica", "tessera-controller", "tessera-node"] {
        assert!(
            dir.join(bin).is_file(),
            "{bin} not found in {}: run `cargo build --workspace` first",
            dir.display()
        );
    }
    true
}

/// A running `tessera up`; killed (with its daemons) if the test fails.
struct Up {
    dir: PathBuf,
    child: Option<Child>,
    lines: Receiver<String>,
    output: Vec<String>,
}

impl Up {
    fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[])
    }

    /// `tessera up --dir DIR` with `extra` arguments.
    fn start_with(dir: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(tessera())
            .arg("up")
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("starting tessera up");
        let (tx, lines) = mpsc::channel();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self {
            dir: dir.to_path_buf(),
            child: Some(child),
            lines,
            output: Vec::new(),
        }
    }

    fn pid(&self) -> i32 {
        let id = self.child.as_ref().map_or(0, Child::id);
        i32::try_from(id).expect("pid fits i32")
    }

    /// Reads output until a line contains one of `needles`; returns that needle.
    fn wait_for(&mut self, needles: &[&'static str], timeout: Duration) -> &'static str {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = needles.iter().find(|n| line.contains(*n)).copied();
                    self.output.push(line);
                    if let Some(hit) = hit {
                        return hit;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no line with {needles:?} within {timeout:?}; output:\n{}",
                        self.text()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "tessera up exited before printing {needles:?}; output:\n{}",
                        self.text()
                    )
                }
            }
        }
    }

    fn text(&self) -> String {
        self.output.join("\n")
    }

    /// Checks `cond` until it yields a value, collecting output in between (the
    /// pause is a bounded wait for the next output line, not a fixed sleep); panics
    /// with `what` and the output after `timeout`, or if `tessera up` exits.
    fn eventually<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut cond: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = cond() {
                return v;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "tessera up exited ({status}) while waiting for {what}; output:\n{}",
                        self.text()
                    );
                }
            }
            if Instant::now() >= deadline {
                panic!("{what}: not within {timeout:?}; output:\n{}", self.text());
            }
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                self.output.push(line);
            }
        }
    }

    /// Whether `tessera up` is still running.
    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits for the exit (collecting the rest of the output).
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let mut child = self.child.take().expect("running");
        loop {
            while let Ok(line) = self.lines.try_recv() {
                self.output.push(line);
            }
            if let Some(status) = child.try_wait().expect("waiting for tessera") {
                // Output written just before the exit.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    self.output.push(line);
                }
                return status;
            }
            if Instant::now() >= deadline {
                self.child = Some(child);
                panic!(
                    "tessera up did not exit within {timeout:?}; output:\n{}",
                    self.text()
                );
            }
            // Bounded pause between exit checks; the condition is the exit itself.
            let _ = self
                .lines
                .recv_timeout(Duration::from_millis(100))
                .map(|l| self.output.push(l));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Best effort after a failure: let tessera tear down, then make sure.
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
        let _ = kill(pid, Signal::SIGINT);
        let deadline = Instant::now() + TEARDOWN_TIMEOUT;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            let _ = self.lines.recv_timeout(Duration::from_millis(200));
        }
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = child.wait();
        for (pid, _) in daemon_pids(&self.dir) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// The daemons listed in `DIR/run/pids`.
fn daemon_pids(dir: &Path) -> Vec<(i32, String)> {
    std::fs::read_to_string(dir.join("run/pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (pid, name) = l.split_once(' ')?;
            Some((pid.parse().ok()?, name.to_owned()))
        })
        .collect()
}

/// The pid of daemon `name` as `DIR/run/pids` lists it now.
fn pid_of(dir: &Path, name: &str) -> i32 {
    daemon_pids(dir)
        .into_iter()
        .find(|(_, n)| n == name)
        .map(|(pid, _)| pid)
        .unwrap_or_else(|| panic!("{name} not in {}/run/pids", dir.display()))
}

/// Whether process `pid` still runs with `dir` on its command line (a recycled pid
/// of something else does not count).
fn alive_in(pid: i32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    let needle = dir.as_os_str().as_encoded_bytes();
    !zombie && cmdline.windows(needle.len()).any(|w| w == needle)
}

/// Mountpoints under `dir`.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    tessera_node::frontend::cleanup::read_mountinfo()
        .expect("reading mountinfo")
        .into_iter()
        .map(|m| m.mountpoint)
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Loop devices whose backing file is under `dir`.
fn loops_under(dir: &Path) -> Vec<PathBuf> {
    tessera_node::frontend::list_bound()
        .expect("listing loop devices")
        .into_iter()
        .map(|(_, file)| file)
        .filter(|f| f.starts_with(dir))
        .collect()
}

/// Checks the demo files against `SHA256SUMS`, from outside `tessera`.
fn check_demo_files(mnt: &Path) {
    let sums = std::fs::read_to_string(mnt.join("SHA256SUMS")).expect("SHA256SUMS on the volume");
    let mut files = 0;
    for line in sums.lines() {
        let (want, name) = line.split_once("  ").expect("sha256sum line format");
        let data = std::fs::read(mnt.join(name)).expect("demo file readable");
        assert_eq!(hex::encode(Sha256::digest(&data)), want, "{name} content");
        files += 1;
    }
    assert_eq!(files, 3, "three demo files listed");
}

/// `tessera verify` finds the three copies of the live demo volume identical, then,
/// after one byte of block 0 (written by mkfs) rots in node-b's copy on disk, names
/// that block and exits 1.
fn verify_finds_rot_on_one_replica(dir: &Path, volume: &str) {
    let dir_arg = dir.to_str().expect("utf-8 temp dir");
    let clean = run_subcommand(&["verify", volume, "--dir", dir_arg]);
    assert!(
        clean.contains("identical on the in-sync replicas"),
        "verify of the live demo volume:\n{clean}"
    );
    let layers = dir.join(format!(
        "replicas/node-b/data/volumes/{volume}/store/layers"
    ));
    let heads: Vec<PathBuf> = std::fs::read_dir(&layers)
        .unwrap_or_else(|e| panic!("{}: {e}", layers.display()))
        .map(|e| e.expect("layer entry").path().join("data"))
        .collect();
    assert_eq!(heads.len(), 1, "one layer: {heads:?}");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&heads[0])
        .expect("node-b's data file");
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, 2000)
        .expect("read a byte of block 0");
    file.write_all_at(&[byte[0] ^ 0x55], 2000).expect("flip it");
    let out = Command::new(tessera())
        .args(["verify", volume, "--dir", dir_arg])
        .output()
        .expect("running tessera verify");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "verify after rot:\n{text}");
    assert!(
        text.contains("block 0: ") && text.contains("node-b=Corrupt"),
        "verify names the rotten block:\n{text}"
    );
    // Put the byte back so the rest of the test sees an intact volume.
    file.write_all_at(&byte, 2000).expect("restore the byte");
}

fn run_subcommand(args: &[&str]) -> String {
    let out = Command::new(tessera())
        .args(args)
        .output()
        .expect("running tessera");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tessera {args:?} failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The volume id CreateVolume reported in `tessera up` output.
fn volume_id(output: &str) -> String {
    output
        .lines()
        .find(|l| l.contains("CreateVolume"))
        .and_then(|l| l.split("ok: ").nth(1))
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no CreateVolume result in output:\n{output}"))
        .to_owned()
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("temp dir")
}

/// Size of one chunk the [`Writer`] writes.
const CHUNK: usize = 64 << 10;
/// Chunk slots in the writer's file: it cycles over 32 MiB, so it never fills the
/// volume however long a test runs.
const SLOTS: u64 = 512;
/// The writer fsyncs after this many chunks (1 MiB).
const SYNC_EVERY: u64 = 16;

/// Content of chunk number `i`: its number, then a byte derived from it.
fn chunk(i: u64) -> Vec<u8> {
    let mut buf = vec![u8::try_from(i % 251).unwrap_or(0); CHUNK];
    buf[..8].copy_from_slice(&i.to_le_bytes());
    buf
}

/// A thread writing numbered chunks to a file on the mounted volume, as an
/// application would while a daemon dies under it; every write and fsync must
/// succeed. Stopped (and its file closed, so the volume can be unmounted) when
/// finished or dropped.
struct Writer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// Chunks written and fsynced so far.
    durable: Arc<AtomicU64>,
    thread: Option<JoinHandle<std::io::Result<u64>>>,
}

impl Writer {
    fn start(path: PathBuf) -> Self {
        let file = File::create(&path).expect("creating the writer's file on the volume");
        let stop = Arc::new(AtomicBool::new(false));
        let durable = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let (stop, durable) = (Arc::clone(&stop), Arc::clone(&durable));
            move || {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let offset = (n % SLOTS) * CHUNK as u64;
                    file.write_all_at(&chunk(n), offset)?;
                    n += 1;
                    if n.is_multiple_of(SYNC_EVERY) {
                        file.sync_data()?;
                        durable.store(n, Ordering::SeqCst);
                    }
                }
                file.sync_all()?;
                Ok(n)
            }
        });
        Self {
            path,
            stop,
            durable,
            thread: Some(thread),
        }
    }

    /// Chunks written and fsynced so far.
    fn durable(&self) -> u64 {
        self.durable.load(Ordering::SeqCst)
    }

    /// Stops the writer and returns how many chunks it wrote, or its first error.
    fn finish(mut self) -> Result<u64, String> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Ok(n))) => Ok(n),
            Some(Ok(Err(e))) => Err(format!("writing {}: {e}", self.path.display())),
            Some(Err(_)) => Err("writer thread panicked".to_owned()),
            None => Err("writer already finished".to_owned()),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads the writer's file back from the device (its pages dropped from the cache
/// first) and checks that every slot holds the last chunk written to it.
fn verify_written(path: &Path, chunks: u64) {
    let file = File::open(path).expect("opening the writer's file");
    nix::fcntl::posix_fadvise(
        &file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .expect("dropping cached pages");
    let mut buf = vec![0u8; CHUNK];
    for slot in 0..chunks.min(SLOTS) {
        let last = slot + (chunks - 1 - slot) / SLOTS * SLOTS;
        file.read_exact_at(&mut buf, slot * CHUNK as u64)
            .expect("reading the writer's file back");
        assert!(
            buf == chunk(last),
            "slot {slot} of {} does not hold chunk {last} (holds chunk {:?})",
            path.display(),
            buf.get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        );
    }
}

/// The line `tessera volumes --dir DIR` prints for the demo volume.
fn demo_volume_line(dir: &Path) -> String {
    let dir_arg = dir.to_str().expect("utf-8 temp dir");
    let volumes = run_subcommand(&["volumes", "--dir", dir_arg]);
    volumes
        .lines()
        .find(|l| l.contains("demo-volume"))
        .unwrap_or_else(|| panic!("no demo-volume in `tessera volumes`:\n{volumes}"))
        .to_owned()
}

/// Asserts that nothing is mounted or attached under `dir` and that none of
/// `pids` still runs.
fn assert_all_gone(dir: &Path, pids: &[(i32, String)], output: &str) {
    assert_eq!(
        mounts_under(dir),
        Vec::<PathBuf>::new(),
        "mounts left; output:\n{output}"
    );
    assert_eq!(
        loops_under(dir),
        Vec::<PathBuf>::new(),
        "loop devices left; output:\n{output}"
    );
    for (pid, name) in pids {
        assert!(
            !alive_in(*pid, dir),
            "{name} (pid {pid}) survived the teardown"
        );
    }
}

#[test]
fn up_runs_the_demo_and_tears_down_on_sigint() {
    if !runnable() {
        return;
    }
    let tmp = temp_dir("tessera-up-");
    let dir = tmp.path().to_path_buf();
    let mut up = Up::start(&dir);
    let reached = up.wait_for(&[VERIFIED, NO_DATA_PATH], DEMO_TIMEOUT);
    up.wait_for(&[RUNNING], DEMO_TIMEOUT);

    let dir_arg = dir.to_str().expect("utf-8 temp dir");
    let volumes = run_subcommand(&["volumes", "--dir", dir_arg]);
    assert!(
        volumes.contains("demo-volume"),
        "volumes lists the demo:\n{volumes}"
    );
    assert!(
        volumes.contains("local"),
        "published to node local:\n{volumes}"
    );
    let replicas = run_subcommand(&["replicas", "--dir", dir_arg]);
    for node in ["node-a", "node-b", "node-c"] {
        assert!(
            replicas.contains(node),
            "replicas lists {node}:\n{replicas}"
        );
    }
    // The replica ports speak mutual TLS only: a plain-text client gets no answer.
    let plain = Command::new(tessera())
        .args(["replicas", "--dir", dir_arg, "--insecure-plaintext"])
        .output()
        .expect("running tessera replicas");
    assert!(
        !plain.status.success(),
        "a plain-text GetInfo must be refused:\n{}",
        String::from_utf8_lossy(&plain.stdout)
    );

    let mnt = dir.join("mnt/demo");
    if reached == VERIFIED {
        assert!(
            mounts_under(&dir).contains(&mnt),
            "demo volume mounted at {}",
            mnt.display()
        );
        assert!(
            !loops_under(&dir).is_empty(),
            "a loop device backs the volume"
        );
        check_demo_files(&mnt);
        verify_finds_rot_on_one_replica(&dir, &volume_id(&up.text()));
    } else {
        eprintln!("node data path not available: checked create/publish only");
    }

    let daemons = daemon_pids(&dir);
    assert_eq!(daemons.len(), 6, "six daemons listed: {daemons:?}");
    kill(Pid::from_raw(up.pid()), Signal::SIGINT).expect("sending SIGINT");
    let status = up.wait_exit(TEARDOWN_TIMEOUT);
    let text = up.text();
    assert!(
        status.success(),
        "tessera up exited with {status}; output:\n{text}"
    );
    assert!(
        text.contains("tessera up: everything stopped cleanly"),
        "output:\n{text}"
    );
    assert_eq!(
        mounts_under(&dir),
        Vec::<PathBuf>::new(),
        "mounts left; output:\n{text}"
    );
    assert_eq!(
        loops_under(&dir),
        Vec::<PathBuf>::new(),
        "loop devices left"
    );
    for (pid, name) in daemons {
        assert!(
            !alive_in(pid, &dir),
            "{name} (pid {pid}) survived the teardown"
        );
    }
}

#[test]
fn rerun_after_a_crash_cleans_leftovers_and_keeps_data() {
    if !runnable() {
        return;
    }
    let tmp = temp_dir("tessera-rerun-");
    let dir = tmp.path().to_path_buf();

    let mut first = Up::start(&dir);
    let reached = first.wait_for(&[VERIFIED, NO_DATA_PATH], DEMO_TIMEOUT);
    first.wait_for(&[RUNNING], DEMO_TIMEOUT);
    let orphans = daemon_pids(&dir);
    let ca = std::fs::read(dir.join("tls/ca.crt")).expect("the first run made a CA");
    // A crash of tessera itself: no teardown at all.
    killpg(Pid::from_raw(first.pid()), Signal::SIGKILL).expect("killing tessera up");
    let status = first.wait_exit(TEARDOWN_TIMEOUT);
    assert!(!status.success());
    if reached == VERIFIED {
        assert!(
            !mounts_under(&dir).is_empty(),
            "the crash left the volume mounted"
        );
    }

    let mut second = Up::start(&dir);
    second.wait_for(
        &["cleanup: stopped daemons of an earlier run"],
        DEMO_TIMEOUT,
    );
    let again = second.wait_for(&[VERIFIED, NO_DATA_PATH], DEMO_TIMEOUT);
    assert_eq!(again, reached, "the rerun gets as far as the first run");
    assert_eq!(
        std::fs::read(dir.join("tls/ca.crt")).expect("the CA"),
        ca,
        "the rerun keeps the CA"
    );
    assert!(
        second.text().contains("tls: certificates in"),
        "the rerun uses the certificates it found; output:\n{}",
        second.text()
    );
    let first_id = volume_id(&first.text());
    assert_eq!(
        volume_id(&second.text()),
        first_id,
        "CreateVolume found the same volume"
    );
    second.wait_for(&[RUNNING], DEMO_TIMEOUT);
    for (pid, name) in &orphans {
        assert!(
            !alive_in(*pid, &dir),
            "orphan {name} (pid {pid}) still runs"
        );
    }
    kill(Pid::from_raw(second.pid()), Signal::SIGINT).expect("sending SIGINT");
    let status = second.wait_exit(TEARDOWN_TIMEOUT);
    let text = second.text();
    assert!(
        status.success(),
        "rerun exited with {status}; output:\n{text}"
    );
    if reached == VERIFIED {
        assert!(
            text.contains("cleanup: removed leftovers of an earlier run"),
            "output:\n{text}"
        );
    }
    assert_eq!(
        mounts_under(&dir),
        Vec::<PathBuf>::new(),
        "mounts left; output:\n{text}"
    );
    assert_eq!(
        loops_under(&dir),
        Vec::<PathBuf>::new(),
        "loop devices left"
    );
}

#[test]
fn a_killed_replica_daemon_is_restarted_while_a_writer_keeps_writing() {
    if !runnable() {
        return;
    }
    let tmp = temp_dir("tessera-restart-");
    let dir = tmp.path().to_path_buf();
    let mut up = Up::start(&dir);
    let reached = up.wait_for(&[VERIFIED, NO_DATA_PATH], DEMO_TIMEOUT);
    up.wait_for(&[RUNNING], DEMO_TIMEOUT);
    let mut pids = daemon_pids(&dir);
    // Declared after `up`, so a failing test stops it (and closes its file) before
    // `up` is torn down.
    let writer = (reached == VERIFIED).then(|| Writer::start(dir.join("mnt/demo/writer.bin")));
    if let Some(w) = &writer {
        up.eventually(RECOVERY_TIMEOUT, "the writer's first fsync", || {
            (w.durable() > 0).then_some(())
        });
    } else {
        eprintln!("node data path not available: checked the restart only");
    }

    let old = pid_of(&dir, "replica-node-b");
    kill(Pid::from_raw(old), Signal::SIGKILL).expect("killing replica-node-b");
    let at_kill = writer.as_ref().map_or(0, Writer::durable);
    up.wait_for(&["replica-node-b restarted"], RECOVERY_TIMEOUT);
    let text = up.text();
    assert!(
        text.contains(&format!(
            "replica-node-b (pid {old}) died: killed by signal 9 (SIGKILL)"
        )),
        "the death is reported with pid and signal; output:\n{text}"
    );
    let new = pid_of(&dir, "replica-node-b");
    assert_ne!(new, old, "run/pids lists the new process");
    assert!(alive_in(new, &dir), "the restarted replica-node-b runs");
    assert!(!alive_in(old, &dir), "the killed replica-node-b is gone");
    pids.push((new, "replica-node-b (restarted)".to_owned()));

    // Same address and data directory: it holds the demo volume again, and the
    // controller sees all three daemons.
    let line = up.eventually(RECOVERY_TIMEOUT, "node-b back in `tessera volumes`", || {
        let line = demo_volume_line(&dir);
        (line.contains("node-a,node-b,node-c") && line.contains("all 3 replicas reachable"))
            .then_some(line)
    });
    assert!(!line.contains("down:"), "no replica down: {line}");

    if let Some(w) = writer {
        up.eventually(
            RECOVERY_TIMEOUT,
            "the writer going on after the kill",
            || (w.durable() >= at_kill + 8 * SYNC_EVERY).then_some(()),
        );
        let chunks = w.finish().expect("every write and fsync succeeded");
        assert!(
            chunks > at_kill,
            "wrote {chunks} chunks, {at_kill} at the kill"
        );
        verify_written(&dir.join("mnt/demo/writer.bin"), chunks);
    }

    kill(Pid::from_raw(up.pid()), Signal::SIGINT).expect("sending SIGINT");
    let status = up.wait_exit(TEARDOWN_TIMEOUT);
    let text = up.text();
    assert!(
        status.success(),
        "tessera up exited with {status}; output:\n{text}"
    );
    assert!(
        text.contains("restarted during the run: replica-node-b (1x)"),
        "output:\n{text}"
    );
    assert_all_gone(&dir, &pids, &text);
}

#[test]
fn with_no_restart_a_dead_replica_stays_dead_and_the_run_ends_with_an_error() {
    if !runnable() {
        return;
    }
    let tmp = temp_dir("tessera-norestart-");
    let dir = tmp.path().to_path_buf();
    let mut up = Up::start_with(&dir, &["--no-restart"]);
    let reached = up.wait_for(&[VERIFIED, NO_DATA_PATH], DEMO_TIMEOUT);
    up.wait_for(&[RUNNING], DEMO_TIMEOUT);
    let pids = daemon_pids(&dir);

    let old = pid_of(&dir, "replica-node-b");
    kill(Pid::from_raw(old), Signal::SIGKILL).expect("killing replica-node-b");
    up.wait_for(&["replica-node-b is left dead"], RECOVERY_TIMEOUT);
    let line = up.eventually(RECOVERY_TIMEOUT, "node-b down in `tessera volumes`", || {
        let line = demo_volume_line(&dir);
        (line.contains("node-a,node-c (down: node-b)")
            && line.contains("degraded: 2 of 3 replicas reachable"))
        .then_some(line)
    });
    assert_eq!(pid_of(&dir, "replica-node-b"), old, "not restarted: {line}");
    assert!(!alive_in(old, &dir), "replica-node-b stays dead");

    // The cluster keeps running and the volume keeps serving on two replicas.
    if reached == VERIFIED {
        let writer = Writer::start(dir.join("mnt/demo/degraded.bin"));
        up.eventually(RECOVERY_TIMEOUT, "writes on two replicas", || {
            (writer.durable() >= 4 * SYNC_EVERY).then_some(())
        });
        let chunks = writer.finish().expect("writes with one replica dead");
        verify_written(&dir.join("mnt/demo/degraded.bin"), chunks);
    }
    assert!(
        up.running(),
        "tessera up keeps running; output:\n{}",
        up.text()
    );

    // The teardown cannot delete the volume on the dead daemon: an error exit.
    kill(Pid::from_raw(up.pid()), Signal::SIGINT).expect("sending SIGINT");
    let status = up.wait_exit(TEARDOWN_TIMEOUT);
    let text = up.text();
    assert!(
        !status.success(),
        "tessera up must fail with a daemon down; output:\n{text}"
    );
    assert!(
        text.contains("replica-node-b: had already exited"),
        "output:\n{text}"
    );
    assert!(
        text.contains("tessera up: finished with errors"),
        "output:\n{text}"
    );
    assert_all_gone(&dir, &pids, &text);
}

#[test]
fn an_engine_host_death_under_the_mounted_volume_ends_the_run_with_an_error() {
    if !runnable() {
        return;
    }
    let tmp = temp_dir("tessera-enginehost-");
    let dir = tmp.path().to_path_buf();
    let mut up = Up::start(&dir);
    if up.wait_for(&[VERIFIED, NO_DATA_PATH], DEMO_TIMEOUT) != VERIFIED {
        eprintln!("node data path not available: no engine-host to kill");
        return;
    }
    up.wait_for(&[RUNNING], DEMO_TIMEOUT);
    let pids = daemon_pids(&dir);
    let engine_host = pid_of(&dir, "engine-host");
    kill(Pid::from_raw(engine_host), Signal::SIGKILL).expect("killing the engine-host");

    // No signal from us: `tessera up` tears down by itself.
    let status = up.wait_exit(TEARDOWN_TIMEOUT);
    let text = up.text();
    assert!(
        !status.success(),
        "tessera up must fail when the engine-host dies; output:\n{text}"
    );
    assert!(
        text.contains(&format!(
            "engine-host (pid {engine_host}) died: killed by signal 9 (SIGKILL)"
        )),
        "output:\n{text}"
    );
    assert!(text.contains("tessera up: FAILED"), "output:\n{text}");
    assert!(
        !text.contains("engine-host restarted"),
        "not restarted; output:\n{text}"
    );
    assert_all_gone(&dir, &pids, &text);
}

#[test]
fn a_daemon_that_cannot_start_fails_the_run() {
    if !runnable() {
        return;
    }
    let tmp = temp_dir("tessera-nostart-");
    let dir = tmp.path().to_path_buf();
    // A capacity no replica daemon accepts: the first one exits at once.
    let mut up = Up::start_with(&dir, &["--no-demo", "--capacity", "lots"]);
    let status = up.wait_exit(DEMO_TIMEOUT);
    let text = up.text();
    assert!(!status.success(), "tessera up must fail; output:\n{text}");
    assert!(
        text.contains("replica-node-a did not become ready"),
        "output:\n{text}"
    );
    assert!(
        text.contains("tessera up: finished with errors"),
        "output:\n{text}"
    );
    assert!(
        daemon_pids(&dir).is_empty(),
        "no daemon listed after the run"
    );
    assert_all_gone(&dir, &[], &text);
}
