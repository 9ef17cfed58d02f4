//! One supervised daemon process: how it is started, its process group, its log,
//! and how it ends.
//!
//! Every daemon runs in a process group of its own, so the terminal's Ctrl-C reaches
//! only `tessera` (which then tears down in order instead of everything dying at
//! once), and stopping a daemon also stops anything it forked. Output goes to
//! `DIR/logs/<name>.log`, appended, so a restarted daemon's log follows its
//! predecessor's. Stopping is SIGTERM to the group, a grace period polled for exit,
//! then SIGKILL. If `tessera` unwinds without stopping (a bug, a panic), `Drop`
//! SIGKILLs the group.
//!
//! A [`Daemon`] keeps the [`DaemonSpec`] it was started from, so the supervisor can
//! start the same command line again after a crash.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::readiness::Readiness;
use crate::wait::{poll_until, Poll};

/// Log lines shown when a daemon fails.
pub const LOG_TAIL_LINES: usize = 30;

/// What a daemon is, which decides what its death means (see `crate::restart`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A replica daemon (`tessera-replica`).
    Replica,
    /// The CSI controller.
    Controller,
    /// The engine-host, which serves staged volumes' data path.
    EngineHost,
    /// The CSI node plugin.
    NodePlugin,
}

/// Everything needed to start a daemon, again if need be.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    /// Component name (`replica-node-a`, `controller`, ...).
    pub name: String,
    /// What it is.
    pub role: Role,
    /// Binary.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// What clients connect to (socket or addresses), for the component table.
    pub endpoint: String,
    /// Log file (stdout and stderr, appended).
    pub log: PathBuf,
    /// How to tell that it serves.
    pub readiness: Readiness,
}

/// One daemon process and its process group.
#[derive(Debug)]
pub struct Daemon {
    spec: DaemonSpec,
    pid: u32,
    started: Instant,
    child: Option<Child>,
    /// Exit status once reaped, kept for the teardown report.
    status: Option<ExitStatus>,
}

/// How a daemon ended when it was stopped.
#[derive(Debug)]
pub struct Stopped {
    /// Component name.
    pub name: String,
    /// Its exit status, if it could be reaped.
    pub status: Option<ExitStatus>,
    /// Whether it had to be SIGKILLed after the grace period.
    pub killed: bool,
    /// Whether it had already exited before it was asked to stop.
    pub exited_early: bool,
}

impl Daemon {
    /// Starts `spec` in a new process group, output appended to its log.
    pub fn spawn(spec: DaemonSpec) -> anyhow::Result<Self> {
        let log = &spec.log;
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let line = spec
            .args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        writeln!(
            file,
            "==== tessera up: starting {}: {} {line}",
            spec.name,
            spec.program.display()
        )
        .with_context(|| format!("writing log {}", log.display()))?;
        let stderr = file
            .try_clone()
            .with_context(|| format!("duplicating log {}", log.display()))?;
        let mut command = Command::new(&spec.program);
        command
            .args(&spec.args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .process_group(0)
            // Log files are read by people, not terminals.
            .env("NO_COLOR", "1")
            // The transport is the command line's (`--tls-dir`): a plain-text switch
            // inherited from the user's shell would leave the CLI and the daemons
            // speaking different protocols.
            .env_remove("TESSERA_INSECURE_PLAINTEXT")
            .env_remove("TESSERA_TLS_DIR");
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {} ({})", spec.name, spec.program.display()))?;
        Ok(Self {
            pid: child.id(),
            started: Instant::now(),
            child: Some(child),
            status: None,
            spec,
        })
    }

    /// How it was started.
    pub fn spec(&self) -> &DaemonSpec {
        &self.spec
    }

    /// Replaces the command line used for the next start (e.g. with the ports the
    /// first start picked).
    pub fn set_spec(&mut self, spec: DaemonSpec) {
        self.spec = spec;
    }

    /// Component name (`replica-node-a`, `controller`, ...).
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Process id, which is also the process group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How long ago this process was started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// What clients connect to (socket or address).
    pub fn endpoint(&self) -> &str {
        &self.spec.endpoint
    }

    /// Log file.
    pub fn log(&self) -> &Path {
        &self.spec.log
    }

    /// The exit status if the process has exited since the last call (it is reaped
    /// then, and whatever is left in its group is killed). Reports each exit once.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                self.status = Some(status);
                self.signal_group(Signal::SIGKILL);
                Some(status)
            }
            Ok(None) => None,
            Err(_) => {
                self.child = None;
                None
            }
        }
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(self.log(), lines)
    }

    /// An error saying this daemon failed, with the tail of its log.
    pub fn failure(&self, what: impl std::fmt::Display) -> anyhow::Error {
        DaemonFailed(format!(
            "{} {what}\n---- last lines of {} ----\n{}\n----",
            self.name(),
            self.log().display(),
            self.log_tail(LOG_TAIL_LINES)
        ))
        .into()
    }

    fn signal_group(&self, signal: Signal) {
        let Ok(pid) = i32::try_from(self.pid) else {
            return;
        };
        match killpg(Pid::from_raw(pid), signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => eprintln!("tessera: sending {signal} to {}: {e}", self.name()),
        }
    }

    /// SIGKILLs the group and reaps the process: for a start that never became
    /// ready, where a graceful stop has nothing to save.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.signal_group(Signal::SIGKILL);
            self.status = child.wait().ok();
        }
    }

    /// SIGTERM, wait up to `grace` for the exit, then SIGKILL. Whatever else is left
    /// in the process group is killed too.
    pub async fn stop(&mut self, grace: Duration) -> Stopped {
        let name = self.name().to_owned();
        if self.child.is_none() {
            return Stopped {
                name,
                status: self.status,
                killed: false,
                exited_early: true,
            };
        }
        if let Some(status) = self.exited() {
            return Stopped {
                name,
                status: Some(status),
                killed: false,
                exited_early: true,
            };
        }
        self.signal_group(Signal::SIGTERM);
        let exited = poll_until(grace, || {
            let s = self.exited();
            async move {
                match s {
                    Some(s) => Poll::Ready(s),
                    None => Poll::Pending,
                }
            }
        })
        .await;
        match exited {
            Ok(status) => Stopped {
                name,
                status: Some(status),
                killed: false,
                exited_early: false,
            },
            Err(_) => {
                self.signal_group(Signal::SIGKILL);
                let status = self.child.take().and_then(|mut c| c.wait().ok());
                Stopped {
                    name,
                    status,
                    killed: true,
                    exited_early: false,
                }
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.signal_group(Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// A daemon failed; the message already carries the tail of its log, so callers
/// need not print it again.
#[derive(Debug)]
pub struct DaemonFailed(String);

impl std::fmt::Display for DaemonFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DaemonFailed {}

/// The last `lines` lines of the file at `path`.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// How a process ended, in words: `exited with status 1`, `killed by signal 9
/// (SIGKILL)`. Signals are named because "signal 9" alone means little to most
/// readers, and a core dump is mentioned because it is where to look next.
pub fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    match status.signal() {
        Some(sig) => {
            let name = Signal::try_from(sig).map_or("unknown signal", Signal::as_str);
            let core = if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            };
            format!("killed by signal {sig} ({name}){core}")
        }
        None => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_described_by_code_or_named_signal() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(1 << 8)),
            "exited with status 1"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(0)),
            "exited with status 0"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(9)),
            "killed by signal 9 (SIGKILL)"
        );
        // SIGSEGV with the core-dump bit (0x80).
        assert_eq!(
            describe_exit(ExitStatus::from_raw(11 | 0x80)),
            "killed by signal 11 (SIGSEGV), core dumped"
        );
    }
}
