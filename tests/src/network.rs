//! Test hosts on a network of their own: one network namespace per host, a veth pair
//! from each to a bridge the test creates, addresses the test assigns.
//!
//! Fault tests (issue 15) need faults a loopback cluster cannot have: a partition
//! between two hosts (iptables DROP inside a host's namespace) and a slow link (a
//! `tc tbf` rate limit on both ends of a host's veth; this kernel has no netem).
//! [`TestNetwork`] builds that world; [`nsenter`] (and [`crate::Daemon::in_netns`])
//! runs a program inside a host's namespace. `nsenter --net` is used, not `ip netns exec`,
//! because the latter also unshares the mount namespace, and the engine-host's FUSE
//! and loop mounts must be seen by the test and the node plugin.
//!
//! The root namespace gets the bridge's first address, so the test itself and the
//! controller (which runs there, like a control plane) reach every host. Nothing is
//! routed off the bridge. When `br_netfilter` is loaded (a Kubernetes node),
//! bridged frames cross the root namespace's FORWARD chain, so one ACCEPT rule for
//! the bridge is inserted there (and removed again).
//!
//! Names carry the creating process id, so what a killed test left behind (its
//! namespaces, bridge and FORWARD rule) is removed by the next [`TestNetwork::new`].
//! Dropping the network removes everything it created; the processes in its
//! namespaces must be gone first (the [`crate::Cluster`] owning it stops them).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{anyhow, bail, Context};

/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Prefix of every namespace this harness creates: `tessera-t-<pid hex>-<n>-<host>`.
const NETNS_PREFIX: &str = "tessera-t-";
/// Prefix of bridge names: `tsb<pid hex><n hex2>` (interface names have 15 bytes).
const BRIDGE_PREFIX: &str = "tsb";
/// Comment on the FORWARD rule: `tessera-test-<pid hex>-<n>`.
const RULE_COMMENT_PREFIX: &str = "tessera-test-";
/// Networks are /24s in 10.200.0.0/13 (clear of Kubernetes' usual 10.96/12 and
/// 10.244/16).
const SUBNETS_FIRST_OCTET: u8 = 10;
const SUBNETS_SECOND_OCTETS: std::ops::Range<u8> = 200..208;

static NETWORKS: AtomicU32 = AtomicU32::new(0);

/// One host: a network namespace with one interface on the test's bridge.
#[derive(Debug, Clone)]
pub struct NetHost {
    netns: String,
    addr: Ipv4Addr,
    /// The veth end on the bridge, in the root namespace.
    bridge_port: String,
}

impl NetHost {
    /// The host's address on the test network.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The namespace's bind mount, for `nsenter --net=`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }
}

/// A bridge and the hosts on it; see the module docs.
#[derive(Debug)]
pub struct TestNetwork {
    tag: String,
    bridge: String,
    prefix: [u8; 3],
    hosts: BTreeMap<String, NetHost>,
    forward_rule: Option<Vec<String>>,
}

impl TestNetwork {
    /// Creates the bridge, with the root namespace at `<subnet>.1`, after removing
    /// what killed test processes left behind.
    pub fn new() -> anyhow::Result<Self> {
        sweep_leftovers();
        let pid = std::process::id();
        let n = NETWORKS.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{pid:x}-{n}");
        let bridge = format!("{BRIDGE_PREFIX}{pid:x}{:02x}", n % 256);
        let prefix = free_subnet(pid, n)?;
        let mut net = TestNetwork {
            tag,
            bridge: bridge.clone(),
            prefix,
            hosts: BTreeMap::new(),
            forward_rule: None,
        };
        run(ip(["link", "add", &bridge, "type", "bridge"]))?;
        run(ip([
            "addr",
            "add",
            &format!("{}/24", net.addr_of(1)),
            "dev",
            &bridge,
        ]))?;
        run(ip(["link", "set", &bridge, "up"]))?;
        if bridge_netfilter_on() {
            let rule: Vec<String> = [
                "FORWARD",
                "-i",
                &bridge,
                "-o",
                &bridge,
                "-m",
                "comment",
                "--comment",
                &format!("{RULE_COMMENT_PREFIX}{}", net.tag),
                "-j",
                "ACCEPT",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut insert = Command::new("iptables");
            insert.arg("-I").args(&rule);
            run(insert)?;
            net.forward_rule = Some(rule);
        }
        Ok(net)
    }

    fn addr_of(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], host)
    }

    /// Adds host `name` (a namespace with loopback up and `eth0` on the bridge at the
    /// next free address). Adding an existing host returns it.
    pub fn add_host(&mut self, name: &str) -> anyhow::Result<NetHost> {
        if let Some(host) = self.hosts.get(name) {
            return Ok(host.clone());
        }
        let index = self.hosts.len();
        anyhow::ensure!(index < 200, "a test network holds at most 200 hosts");
        let netns = format!("{NETNS_PREFIX}{}-{name}", self.tag);
        let bridge_port = format!(
            "{}h{index:x}",
            self.bridge.replacen(BRIDGE_PREFIX, "tsv", 1)
        );
        let inner = format!(
            "{}n{index:x}",
            self.bridge.replacen(BRIDGE_PREFIX, "tsv", 1)
        );
        let addr = self.addr_of(2 + index as u8);
        run(ip(["netns", "add", &netns]))?;
        let host = NetHost {
            netns: netns.clone(),
            addr,
            bridge_port: bridge_port.clone(),
        };
        // Recorded now, so a failure below still deletes the namespace.
        self.hosts.insert(name.to_owned(), host.clone());
        run(ip([
            "link",
            "add",
            &bridge_port,
            "type",
            "veth",
            "peer",
            "name",
            &inner,
        ]))?;
        run(ip(["link", "set", &inner, "netns", &netns]))?;
        run(ip(["link", "set", &bridge_port, "master", &self.bridge]))?;
        run(ip(["link", "set", &bridge_port, "up"]))?;
        run(Self::in_host(
            &host,
            ip(["link", "set", &inner, "name", "eth0"]),
        ))?;
        run(Self::in_host(
            &host,
            ip(["addr", "add", &format!("{addr}/24"), "dev", "eth0"]),
        ))?;
        run(Self::in_host(&host, ip(["link", "set", "eth0", "up"])))?;
        run(Self::in_host(&host, ip(["link", "set", "lo", "up"])))?;
        Ok(host)
    }

    /// Host `name`.
    pub fn host(&self, name: &str) -> anyhow::Result<&NetHost> {
        self.hosts
            .get(name)
            .ok_or_else(|| anyhow!("the test network has no host {name:?}"))
    }

    /// `command` wrapped to run in `host`'s network namespace.
    fn in_host(host: &NetHost, command: Command) -> Command {
        let mut wrapped = nsenter(&host.netns_path(), command.get_program());
        wrapped.args(command.get_args());
        wrapped
    }

    /// Drops every packet between hosts `a` and `b` (both directions, in `a`'s
    /// namespace), established connections included.
    pub fn partition(&self, a: &str, b: &str) -> anyhow::Result<()> {
        self.drop_rules(a, b, "-I")
    }

    /// Undoes [`TestNetwork::partition`] of `a` and `b`.
    pub fn heal(&self, a: &str, b: &str) -> anyhow::Result<()> {
        self.drop_rules(a, b, "-D")
    }

    /// Inserts (`-I`) or deletes (`-D`) the DROP rules of a partition of `a` and `b`.
    fn drop_rules(&self, a: &str, b: &str, action: &str) -> anyhow::Result<()> {
        let (ha, hb) = (self.host(a)?, self.host(b)?);
        let peer = hb.addr.to_string();
        for (chain, dir) in [("INPUT", "-s"), ("OUTPUT", "-d")] {
            let mut cmd = Command::new("iptables");
            cmd.args([action, chain, dir, &peer, "-j", "DROP"]);
            run(Self::in_host(ha, cmd))?;
        }
        Ok(())
    }

    /// Limits `host`'s link to `bytes_per_sec` in each direction (`tc tbf` on its
    /// `eth0` and on its bridge port), replacing any earlier limit.
    pub fn rate_limit(&self, host: &str, bytes_per_sec: u64) -> anyhow::Result<()> {
        let h = self.host(host)?;
        let rate = format!("{}bit", bytes_per_sec * 8);
        // A bucket of 32 KiB and a queue of 200 ms at that rate: enough for one
        // frame burst, short enough that the link is as slow as it says.
        let tbf = |dev: &str| {
            let mut cmd = Command::new("tc");
            cmd.args([
                "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", "32kb",
                "latency", "200ms",
            ]);
            cmd
        };
        run(Self::in_host(h, tbf("eth0")))?;
        run(tbf(&h.bridge_port))?;
        Ok(())
    }

    /// Removes [`TestNetwork::rate_limit`] from `host`.
    pub fn clear_rate_limit(&self, host: &str) -> anyhow::Result<()> {
        let h = self.host(host)?;
        let del = |dev: &str| {
            let mut cmd = Command::new("tc");
            cmd.args(["qdisc", "del", "dev", dev, "root"]);
            cmd
        };
        run(Self::in_host(h, del("eth0")))?;
        run(del(&h.bridge_port))?;
        Ok(())
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        for host in self.hosts.values() {
            // Deleting the namespace destroys its veth end, and with it the pair.
            if let Err(e) = run(ip(["netns", "del", &host.netns])) {
                eprintln!("tessera-tests: {e:#}");
            }
        }
        if let Err(e) = run(ip(["link", "del", &self.bridge])) {
            eprintln!("tessera-tests: {e:#}");
        }
        if let Some(rule) = &self.forward_rule {
            let mut delete = Command::new("iptables");
            delete.arg("-D").args(rule);
            if let Err(e) = run(delete) {
                eprintln!("tessera-tests: {e:#}");
            }
        }
    }
}

/// A command running `program` in the network namespace bound at `netns` (and in
/// every other namespace of the caller). `nsenter` execs it, so the child's pid is the
/// program's.
pub fn nsenter(netns: &Path, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(program);
    cmd
}

fn ip<const N: usize>(args: [&str; N]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    cmd
}

/// Runs `cmd`; an error names it and carries its stderr.
fn run(mut cmd: Command) -> anyhow::Result<String> {
    let shown = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd.output().with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn bridge_netfilter_on() -> bool {
    std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
        .is_ok_and(|v| v.trim() == "1")
}

/// A /24 in the test range that no interface of the root namespace uses, starting
/// from one derived from the process id (so parallel test processes rarely collide).
fn free_subnet(pid: u32, n: u32) -> anyhow::Result<[u8; 3]> {
    let used = run(ip(["-4", "-o", "addr", "show"]))?;
    let span = u32::from(SUBNETS_SECOND_OCTETS.end - SUBNETS_SECOND_OCTETS.start) * 256;
    let start = pid.wrapping_mul(31).wrapping_add(n.wrapping_mul(7)) % span;
    for i in 0..span {
        let k = (start + i) % span;
        let prefix = [
            SUBNETS_FIRST_OCTET,
            SUBNETS_SECOND_OCTETS.start + (k / 256) as u8,
            (k % 256) as u8,
        ];
        let needle = format!(" {}.{}.{}.", prefix[0], prefix[1], prefix[2]);
        if !used.contains(&needle) {
            return Ok(prefix);
        }
    }
    bail!("no free /24 in 10.200.0.0/13 for a test network")
}

/// Whether process `pid_hex` (as written in a name) is gone.
fn dead(pid_hex: &str) -> bool {
    u32::from_str_radix(pid_hex, 16)
        .is_ok_and(|pid| !Path::new("/proc").join(pid.to_string()).exists())
}

/// Removes namespaces, bridges and FORWARD rules of test processes that no longer run.
fn sweep_leftovers() {
    if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix(NETNS_PREFIX) {
                if rest.split('-').next().is_some_and(dead) {
                    let _ = run(ip(["netns", "del", &name]));
                }
            }
        }
    }
    if let Ok(links) = run(ip(["-o", "link", "show", "type", "bridge"])) {
        for line in links.lines() {
            let Some(name) = line.split(':').nth(1).map(str::trim) else {
                continue;
            };
            if let Some(rest) = name.strip_prefix(BRIDGE_PREFIX) {
                // The last two hex digits count networks; the rest is the pid.
                if rest.len() > 2 && dead(&rest[..rest.len() - 2]) {
                    let _ = run(ip(["link", "del", name]));
                }
            }
        }
    }
    if let Ok(rules) = run({
        let mut cmd = Command::new("iptables");
        cmd.args(["-S", "FORWARD"]);
        cmd
    }) {
        for rule in rules.lines() {
            let Some(at) = rule.find(RULE_COMMENT_PREFIX) else {
                continue;
            };
            let pid_hex = rule[at + RULE_COMMENT_PREFIX.len()..]
                .split('-')
                .next()
                .unwrap_or_default();
            if dead(pid_hex) {
                if let Some(spec) = rule.strip_prefix("-A ") {
                    let mut delete = Command::new("iptables");
                    delete.arg("-D").args(spec.split_whitespace());
                    let _ = run(delete);
                }
            }
        }
    }
}
