//! Whether this process may run the tests that mount filesystems and attach loop and
//! FUSE devices.
//!
//! CI runs as root, where these tests must run: without the privileges a test panics
//! rather than pass vacuously. A developer without root can set
//! `TESSERA_SKIP_PRIVILEGED_TESTS=1` to skip them, and each skip says so.

use std::path::Path;

/// True when the test may go on: root with `/dev/fuse` and `/dev/loop-control`. False
/// (after saying so) when they are missing and `TESSERA_SKIP_PRIVILEGED_TESTS` is set;
/// otherwise panics, naming `what` needs them.
pub fn privileged(what: &str) -> bool {
    let ok = nix::unistd::geteuid().is_root()
        && Path::new("/dev/fuse").exists()
        && Path::new("/dev/loop-control").exists();
    if ok {
        return true;
    }
    if std::env::var_os("TESSERA_SKIP_PRIVILEGED_TESTS").is_some() {
        eprintln!("skipping: {what} needs root, /dev/fuse and /dev/loop-control");
        return false;
    }
    panic!(
        "{what} needs root, /dev/fuse and /dev/loop-control \
         (set TESSERA_SKIP_PRIVILEGED_TESTS=1 to skip)"
    );
}
