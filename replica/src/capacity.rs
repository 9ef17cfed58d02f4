//! Capacity: measuring the backing filesystem.
//!
//! The daemon accounts capacity thickly (every volume counts its full size even though
//! its data file is sparse), so a node never promises more than it has; the backing
//! filesystem's free space is a second bound, because other files can fill it.

use std::io;
use std::path::Path;

/// Size and free space of a filesystem, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSpace {
    /// Total size of the filesystem.
    pub total_bytes: u64,
    /// Space an unprivileged writer can still use (statvfs `f_bavail`), which is what
    /// volume data files will get.
    pub available_bytes: u64,
}

/// Measures the filesystem holding `path` (statvfs).
// The statvfs field types are u64 on 64-bit Linux but narrower elsewhere; the casts
// only ever widen.
#[allow(clippy::unnecessary_cast)]
pub fn fs_space(path: &Path) -> io::Result<FsSpace> {
    let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    let frag = st.fragment_size() as u64;
    Ok(FsSpace {
        total_bytes: (st.blocks() as u64).saturating_mul(frag),
        available_bytes: (st.blocks_available() as u64).saturating_mul(frag),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_real_filesystem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let space = fs_space(dir.path()).expect("statvfs");
        assert!(space.total_bytes > 0);
        assert!(space.available_bytes <= space.total_bytes);
        assert!(fs_space(&dir.path().join("missing")).is_err());
    }
}
