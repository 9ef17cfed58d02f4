//! Finding the Tessera binaries a test starts.
//!
//! Integration tests run the real daemons, which cargo does not build for another
//! package's tests; `scripts/test` runs `cargo build --workspace` first. A test that
//! finds no binary fails with a message saying how to build it.

use std::path::{Path, PathBuf};

/// Overrides where the binaries are looked up.
pub const BIN_DIR_ENV: &str = "TESSERA_BIN_DIR";

/// Name of the replica daemon binary.
pub const REPLICA: &str = "tessera-replica";
/// Name of the CSI controller binary.
pub const CONTROLLER: &str = "tessera-controller";
/// Name of the CSI node plugin binary.
pub const NODE: &str = "tessera-node";
/// Name of the operator CLI (`tessera verify`, ...).
pub const CLI: &str = "tessera";

/// The directory holding the binaries: `$TESSERA_BIN_DIR`, else
/// `$CARGO_TARGET_DIR/debug`, else `<workspace>/target/debug`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        let dir = if dir.is_relative() {
            workspace_root().join(dir)
        } else {
            dir
        };
        return dir.join("debug");
    }
    workspace_root().join("target").join("debug")
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Path of binary `name`, or an error telling how to build it.
pub fn locate(name: &str) -> anyhow::Result<PathBuf> {
    let dir = bin_dir();
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        anyhow::bail!(
            "binary {name} not found at {}: run `cargo build --workspace` first \
             (scripts/test does), or point {BIN_DIR_ENV} at the directory holding it",
            path.display()
        )
    }
}
