//! `tessera up` end to end, with real processes and real mounts.
//!
//! The test runs the `tessera` binary the way a user does, reads its stdout until the
//! demo reports its files verified, looks at the mounted volume from outside, asks the
//! other subcommands about the running cluster, then sends SIGINT and checks the
//! teardown: exit 0, nothing mounted or attached under the directory, no daemon left.
//! A second test SIGKILLs `tessera` itself and checks that the next run cleans up.
//!
//! Needs root (mounts, loop devices, FUSE) and the other binaries built next to
//! `tessera` (`cargo build --workspace`; scripts/test does it). Without root the
//! tests say so and pass without checking anything.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

/// How long startup plus demo may take on a slow, busy machine.
const DEMO_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the teardown may take.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(120);

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
        let mut child = Command::new(tessera())
            .arg("up")
            .arg("--dir")
            .arg(dir)
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
