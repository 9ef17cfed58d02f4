//! The data directory's lock: an exclusive `flock` on `<data-dir>/lock`, held for
//! the catalog's lifetime, keeps a second daemon (or tool) off a directory in use.
//! The file holds the holder's pid, for the error the second one reports.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tracing::warn;

use super::error::io_error;
use super::CatalogError;

/// Lock file (under the data dir) that keeps two daemons off one directory.
pub const LOCK_FILE: &str = "lock";

/// Takes the exclusive lock on `<data_dir>/lock` and writes our pid into it.
pub(super) fn lock_data_dir(data_dir: &Path) -> Result<Flock<File>, CatalogError> {
    let path = data_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_error("open lock file", &path))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let holder = match file.read_to_string(&mut pid) {
                Ok(_) if !pid.trim().is_empty() => format!(" (pid {})", pid.trim()),
                _ => String::new(),
            };
            return Err(CatalogError::Locked {
                path: data_dir.to_path_buf(),
                holder,
            });
        }
        Err((_, errno)) => return Err(io_error("lock", &path)(io::Error::from(errno))),
    };
    // The pid is only for the error message above; failing to write it is harmless
    // but worth knowing.
    let written = (|| {
        lock.set_len(0)?;
        lock.rewind()?;
        writeln!(lock, "{}", std::process::id())?;
        lock.sync_all()
    })();
    if let Err(e) = written {
        warn!(path = %path.display(), error = %e, "cannot record pid in lock file");
    }
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use crate::catalog::test_support::{open, MIB};
    use crate::catalog::{Catalog, CatalogConfig, CatalogError};

    #[test]
    fn second_open_of_a_locked_dir_fails_clearly() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let first = open(tmp.path(), Some(MIB));
        let err = Catalog::open(CatalogConfig {
            data_dir: tmp.path().to_path_buf(),
            capacity_bytes: Some(MIB),
        })
        .err()
        .expect("second open must fail");
        assert!(matches!(err, CatalogError::Locked { .. }));
        let msg = err.to_string();
        assert!(msg.contains("in use by another tessera-replica"), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        open(tmp.path(), Some(MIB));
    }
}
