//! The demo's file I/O: files of random bytes with known sha256 written onto the
//! mounted volume, then read back through the block device and compared.
//!
//! Runs on a blocking thread; the stop flag is checked between 1 MiB chunks so a
//! Ctrl-C during the writes is honoured quickly and the files are closed before the
//! teardown unmounts the volume.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

use crate::signals::Interrupted;

/// Sizes of the demo files, in MiB.
pub const FILE_MIB: [usize; 3] = [1, 4, 16];

/// One demo file: name and sha256.
#[derive(Debug, Clone)]
pub struct Written {
    name: String,
    sha256: String,
    len: u64,
}

/// Chunk size of the demo file I/O; the stop flag is checked between chunks.
const CHUNK: usize = 1 << 20;

fn check_stop(flag: &AtomicBool) -> anyhow::Result<()> {
    if flag.load(Ordering::SeqCst) {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// Writes the demo files with random bytes and fsyncs them, plus `SHA256SUMS` in
/// `sha256sum -c` format.
pub fn write_files(dir: &Path, stop: &Arc<AtomicBool>) -> anyhow::Result<Vec<Written>> {
    let mut random = File::open("/dev/urandom").context("opening /dev/urandom")?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = Vec::new();
    for (i, mib) in FILE_MIB.iter().enumerate() {
        let name = format!("demo-{}.bin", i + 1);
        let path = dir.join(&name);
        let mut file =
            File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut hash = Sha256::new();
        for _ in 0..*mib {
            check_stop(stop)?;
            random
                .read_exact(&mut buf)
                .context("reading /dev/urandom")?;
            file.write_all(&buf)
                .with_context(|| format!("writing {}", path.display()))?;
            hash.update(&buf);
        }
        file.sync_all()
            .with_context(|| format!("fsync {}", path.display()))?;
        written.push(Written {
            name,
            sha256: hex::encode(hash.finalize()),
            len: (*mib as u64) << 20,
        });
    }
    let sums: String = written
        .iter()
        .map(|w| format!("{}  {}\n", w.sha256, w.name))
        .collect();
    let path = dir.join("SHA256SUMS");
    let mut file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(sums.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync {}", dir.display()))?;
    Ok(written)
}

/// Drops each file's (clean, fsynced) pages from the page cache, so the read comes
/// from the block device, then reads it back and compares the sha256. Returns the
/// bytes verified.
pub fn verify_files(
    dir: &Path,
    written: &[Written],
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    for w in written {
        let path = dir.join(&w.name);
        let mut file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        nix::fcntl::posix_fadvise(
            &file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .with_context(|| format!("dropping cached pages of {}", path.display()))?;
        let mut hash = Sha256::new();
        let mut len = 0u64;
        loop {
            check_stop(stop)?;
            let n = file
                .read(&mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            len += n as u64;
        }
        let got = hex::encode(hash.finalize());
        if len != w.len || got != w.sha256 {
            bail!(
                "{} read back wrong: {len} bytes with sha256 {got}, wrote {} bytes with sha256 {}",
                path.display(),
                w.len,
                w.sha256
            );
        }
        total += len;
    }
    Ok(total)
}
