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
    /// Network namespace to run in (`nsenter --net=`), see [`crate::network`].
    netns: Option<PathBuf>,
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
            netns: None,
        }
    }

    /// Runs the daemon in the network namespace bound at `netns` (through
    /// `nsenter --net`, which execs it: the pid is still the daemon's).
    pub fn in_netns(mut self, netns: impl Into<PathBuf>) -> Self {
        self.netns = Some(netns.into());
        self
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
        let mut command = match &self.netns {
            Some(netns) => crate::network::nsenter(netns, &self.program),
            None => Command::new(&self.program),
        };
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
        // The transport is what the command line says, never the caller's environment.
        for var in crate::cluster::tls::TRANSPORT_ENV {
            command.env_remove(var);
        }
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

/// The TCP addresses process `pid` listens on: its sockets (`/proc/<pid>/fd`) found
/// in LISTEN state in its network namespace's `/proc/<pid>/net/tcp` and `tcp6`. How
/// a test learns the port of a listener a daemon bound to port 0 without reporting it.
pub fn listening_tcp_addrs(pid: u32) -> std::io::Result<Vec<std::net::SocketAddr>> {
    let mut inodes = std::collections::HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        // An fd closed while listing is not one we want.
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok())
        {
            inodes.insert(inode);
        }
    }
    let mut addrs = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = match std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        addrs.extend(
            text.lines()
                .skip(1)
                .filter_map(parse_proc_net_tcp_listener)
                .filter(|(_, inode)| inodes.contains(inode))
                .map(|(addr, _)| addr),
        );
    }
    Ok(addrs)
}

/// (local address, socket inode) of a `/proc/net/tcp{,6}` line in LISTEN state.
fn parse_proc_net_tcp_listener(line: &str) -> Option<(std::net::SocketAddr, u64)> {
    const LISTEN: &str = "0A";
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
    if *state != LISTEN {
        return None;
    }
    let (ip_hex, port_hex) = local.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    // The kernel prints each 32-bit word of the address (network byte order in
    // memory) as a native-endian number.
    let mut bytes = Vec::with_capacity(16);
    for word in 0..ip_hex.len() / 8 {
        let w = u32::from_str_radix(ip_hex.get(word * 8..word * 8 + 8)?, 16).ok()?;
        bytes.extend_from_slice(&w.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some((std::net::SocketAddr::new(ip, port), inode.parse().ok()?))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("tessera-tests: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_listeners_parse() {
        let v4 = "   3: 0100007F:A1B2 00000000:0000 0A 00000000:00000000 00:00000000 \
                  00000000     0        0 123456 1 0000000000000000 100 0 0 10 0";
        let got = parse_proc_net_tcp_listener(v4).expect("a listener");
        let ip =
            std::net::Ipv4Addr::from(u32::from_str_radix("0100007F", 16).unwrap().to_ne_bytes());
        assert_eq!(got, (std::net::SocketAddr::new(ip.into(), 0xA1B2), 123456));
        if cfg!(target_endian = "little") {
            assert_eq!(got.0.to_string(), "127.0.0.1:41394");
        }
        let established = v4.replace(" 0A ", " 01 ");
        assert_eq!(parse_proc_net_tcp_listener(&established), None);
        let v6 =
            "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 \
                  0A 00000000:00000000 00:00000000 00000000     0        0 42 1 0 100 0 0 10 0";
        let got = parse_proc_net_tcp_listener(v6).expect("a v6 listener");
        assert_eq!(got.1, 42);
        assert_eq!(got.0.port(), 8080);
        if cfg!(target_endian = "little") {
            assert_eq!(got.0.ip().to_string(), "::1");
        }
    }

    #[test]
    fn this_process_listening_on_port_0_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let found = listening_tcp_addrs(std::process::id()).expect("/proc readable");
        assert!(found.contains(&addr), "{addr} not in {found:?}");
    }
}
