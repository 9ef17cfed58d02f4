//! Finding the daemon binaries `tessera up` starts.
//!
//! `cargo build --workspace` puts every binary in one directory, and an installed
//! Tessera puts them side by side too, so the first place to look is next to the
//! running `tessera`; then `PATH`. `--bin-dir` overrides both, for running a build
//! from somewhere else.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Name of the replica daemon binary.
pub const REPLICA: &str = "tessera-replica";
/// Name of the CSI controller binary.
pub const CONTROLLER: &str = "tessera-controller";
/// Name of the CSI node plugin / engine-host binary.
pub const NODE: &str = "tessera-node";

/// How the node side is run, which depends on the `tessera-node` build at hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeMode {
    /// `tessera-node engine-host` and `tessera-node plugin`: the data path exists.
    EngineHostAndPlugin,
    /// A `tessera-node` without subcommands: a node plugin without data path, which
    /// answers NodeStageVolume with UNIMPLEMENTED.
    PluginOnly,
}

/// The daemon binaries of one Tessera build.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `tessera-replica`.
    pub replica: PathBuf,
    /// `tessera-controller`.
    pub controller: PathBuf,
    /// `tessera-node`.
    pub node: PathBuf,
    /// Which command line `tessera-node` understands.
    pub node_mode: NodeMode,
}

impl Binaries {
    /// Finds all binaries: in `bin_dir` only if given, else next to the current
    /// executable, else on `PATH`.
    pub fn locate(bin_dir: Option<&Path>) -> anyhow::Result<Self> {
        let replica = locate(REPLICA, bin_dir)?;
        let controller = locate(CONTROLLER, bin_dir)?;
        let node = locate(NODE, bin_dir)?;
        let node_mode = node_mode(&node)?;
        Ok(Self {
            replica,
            controller,
            node,
            node_mode,
        })
    }
}

/// Path of binary `name`, or an error saying where it was looked for.
pub fn locate(name: &str, bin_dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let mut searched: Vec<PathBuf> = Vec::new();
    if let Some(dir) = bin_dir {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
        bail!(
            "{name} not found in --bin-dir {}: build it with `cargo build --workspace`",
            dir.display()
        );
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
        searched.push(dir);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let path = dir.join(name);
            if path.is_file() {
                return Ok(path);
            }
        }
        searched.push(PathBuf::from("$PATH"));
    }
    bail!(
        "{name} not found (looked in {}): build it with `cargo build --workspace` \
         or pass --bin-dir",
        searched
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Asks `tessera-node --help` whether it has the `engine-host` subcommand.
fn node_mode(node: &Path) -> anyhow::Result<NodeMode> {
    let out = Command::new(node)
        .arg("--help")
        .output()
        .with_context(|| format!("running {} --help", node.display()))?;
    let help = String::from_utf8_lossy(&out.stdout);
    let has = |sub: &str| help.lines().any(|l| l.trim_start().starts_with(sub));
    if has("engine-host") && has("plugin") {
        Ok(NodeMode::EngineHostAndPlugin)
    } else {
        Ok(NodeMode::PluginOnly)
    }
}
