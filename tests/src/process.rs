//! One daemon process a test owns.
//!
//! Every daemon runs in a process group of its own, with stdout and stderr appended
//! to a log file. Killing (on request or in `Drop`, also while a test panics) sends
//! SIGKILL to the whole group and reaps the child, so nothing a test started
//! outlives it. Restarting runs the same program with the current arguments and
//! appends to the same log.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// A daemon started by a test; killed with its process group when dropped.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    log_path: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Daemon {
    /// Prepares a daemon without starting it. `name` labels its log lines.
    pub fn new(
        name: impl Into<String>,
        program: impl Into<PathBuf>,
        args: Vec<OsString>,
        log_path: impl Into<PathBuf>,
    ) -> Self {
        Self {
            name: name.into(),
            program: program.into(),
            args,
            log_path: log_path.into(),
            child: None,
            starts: 0,
        }
    }

    /// Label used in logs and error messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// File collecting the daemon's stdout and stderr over all its runs.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Replaces the arguments used by the next [`start`](Self::start).
    pub fn set_args(&mut self, args: Vec<OsString>) {
        self.args = args;
    }

    /// Process id (also the process group id) of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process. Fails if it is already running.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            anyhow::bail!("{} is already running", self.name);
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening log {}", self.log_path.display()))?;
        self.starts += 1;
        writeln!(
            log,
            "==== tessera-tests: start #{} of {}: {} {}",
            self.starts,
            self.name,
            self.program.display(),
            self.args
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        )
        .with_context(|| format!("writing log {}", self.log_path.display()))?;
        let stdout: File = log
            .try_clone()
            .with_context(|| format!("duplicating log {}", self.log_path.display()))?;
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            // A group of its own: killing the group also kills anything it forked.
            .process_group(0);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        // Logs are files people read, not terminals.
        command.env("NO_COLOR", "1");
        let child = command
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Whether the process was started and has not exited. Reaps it if it has.
    pub fn is_running(&mut self) -> bool {
        let _ = self.exit_status();
        self.child.is_some()
    }

    /// The exit status if the process has exited. The process is then reaped and
    /// forgotten, and whatever is left of its group is killed.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let pid = child.id();
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                self.kill_group_of(pid);
                Some(status)
            }
            Ok(None) => None,
            // The child can no longer be waited for: treat it as gone.
            Err(_) => {
                self.child = None;
                self.kill_group_of(pid);
                None
            }
        }
    }

    /// SIGKILLs the process group and reaps the process. A no-op when not running.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        self.kill_group_of(child.id());
        child
            .wait()
            .with_context(|| format!("reaping {}", self.name))?;
        Ok(())
    }

    /// Sends `signal` to the process group without waiting. A no-op when not running.
    pub fn signal(&self, signal: Signal) {
        let Some(pid) = self.pid().and_then(|p| i32::try_from(p).ok()) else {
            return;
        };
        if pid <= 0 {
            return;
        }
        match killpg(Pid::from_raw(pid), signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => eprintln!("tessera-tests: sending {signal} to {}: {e}", self.name),
        }
    }

    /// Waits up to `timeout` for the process to exit by itself and reaps it. Returns
    /// its exit status, or `None` if it is still running (or was not started).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.child.as_ref()?;
        let mut status = None;
        let _ = crate::wait::wait_until(timeout, || {
            status = self.exit_status();
            status.is_some() || self.child.is_none()
        });
        status
    }

    /// Stops the process gracefully: SIGTERM to its group, up to `grace` to exit,
    /// then SIGKILL. Returns whether it exited within the grace period. A no-op
    /// (returning true) when not running.
    pub fn terminate(&mut self, grace: Duration) -> anyhow::Result<bool> {
        if !self.is_running() {
            return Ok(true);
        }
        self.signal(Signal::SIGTERM);
        if self.wait_exit(grace).is_some() || self.child.is_none() {
            return Ok(true);
        }
        eprintln!(
            "tessera-tests: {} did not exit within {grace:?} of SIGTERM; killing it",
            self.name
        );
        self.kill()?;
        Ok(false)
    }

    fn kill_group_of(&self, pid: u32) {
        let Ok(pid) = i32::try_from(pid) else {
            return;
        };
        if pid <= 0 {
            return;
        }
        match killpg(Pid::from_raw(pid), Signal::SIGKILL) {
            // ESRCH: the whole group is already gone.
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => eprintln!("tessera-tests: killing process group of {}: {e}", self.name),
        }
    }

    /// The last `lines` lines of the daemon's log.
    pub fn log_tail(&self, lines: usize) -> String {
        match std::fs::read(&self.log_path) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let all: Vec<&str> = text.lines().collect();
                let start = all.len().saturating_sub(lines);
                all[start..].join("\n")
            }
            Err(e) => format!("(cannot read {}: {e})", self.log_path.display()),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("tessera-tests: {e:#}");
        }
    }
}
