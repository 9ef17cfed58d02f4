//! Where `tessera up` keeps things under its directory.
//!
//! One place names every path, so the startup, the demo, the leftover cleanup and
//! the other subcommands (which read the endpoints file) agree on them.
//!
//! ```text
//! DIR/
//!   logs/<component>.log      stdout+stderr of each daemon (appended across runs)
//!   run/lock                  held (flock) while a `tessera up` runs on DIR
//!   run/pids                  "pid name" lines of the running daemons
//!   run/endpoints.json        what `tessera volumes|replicas --dir DIR` connect to
//!   run/*.sock, run/*.ready.json
//!   replicas/<node-id>/data   replica data (kept across runs)
//!   tls/ca.crt, tls/ca.key    the local cluster's CA (kept across runs)
//!   tls/<identity>/           ca.crt, tls.crt, tls.key of the controller, node
//!                             and replica identities (the daemons' --tls-dir)
//!   node/                     node plugin + engine-host state (engine-host.sock, FUSE)
//!   staging/demo, mnt/demo    the demo volume's staging and publish paths
//! ```

use std::path::{Path, PathBuf};

use tessera_tls::generate::identity_dir;
use tessera_tls::Identity;

/// Paths of one local cluster directory. `root` is absolute.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The directory given with `--dir`, made absolute.
    pub root: PathBuf,
}

impl Layout {
    /// Layout rooted at `root` (which must be absolute).
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// Log directory.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// Log file of component `name`.
    pub fn log_of(&self, name: &str) -> PathBuf {
        self.logs().join(format!("{name}.log"))
    }

    /// Runtime directory: sockets, ready files, pids, lock.
    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }

    /// Lock file held while `tessera up` runs.
    pub fn lock_file(&self) -> PathBuf {
        self.run().join("lock")
    }

    /// Pids of the daemons of the current (or a crashed) run.
    pub fn pid_file(&self) -> PathBuf {
        self.run().join("pids")
    }

    /// Endpoints of the running cluster, for the other subcommands.
    pub fn endpoints_file(&self) -> PathBuf {
        self.run().join("endpoints.json")
    }

    /// Ready file of the replica daemon on `node_id`.
    pub fn replica_ready_file(&self, node_id: &str) -> PathBuf {
        self.run().join(format!("replica-{node_id}.ready.json"))
    }

    /// Data directory of the replica daemon on `node_id`.
    pub fn replica_data(&self, node_id: &str) -> PathBuf {
        self.root.join("replicas").join(node_id).join("data")
    }

    /// Certificates of the local cluster: its CA and a directory per identity, kept
    /// across runs like the replica data so every run's daemons trust each other.
    pub fn tls(&self) -> PathBuf {
        self.root.join("tls")
    }

    /// Certificate directory of `identity` (a daemon's `--tls-dir`).
    pub fn tls_dir(&self, identity: Identity) -> PathBuf {
        identity_dir(&self.tls(), identity)
    }

    /// CSI socket of the controller.
    pub fn controller_socket(&self) -> PathBuf {
        self.run().join("controller.sock")
    }

    /// CSI socket of the node plugin.
    pub fn node_socket(&self) -> PathBuf {
        self.run().join("node.sock")
    }

    /// State directory shared by the node plugin and the engine-host.
    pub fn node_state(&self) -> PathBuf {
        self.root.join("node")
    }

    /// Socket the engine-host serves (its location is fixed by `tessera-node`).
    pub fn engine_host_socket(&self) -> PathBuf {
        self.node_state().join("engine-host.sock")
    }

    /// Staging path of the demo volume.
    pub fn demo_staging(&self) -> PathBuf {
        self.root.join("staging").join("demo")
    }

    /// Publish (target) path of the demo volume.
    pub fn demo_target(&self) -> PathBuf {
        self.root.join("mnt").join("demo")
    }

    /// Whether `path` lies inside this directory (whole components compared).
    pub fn contains(&self, path: &Path) -> bool {
        path.starts_with(&self.root)
    }
}
