//! End-to-end tests of the FUSE + loop frontend on the real kernel.
//!
//! They need root, `/dev/fuse`, `/dev/loop-control`, `mkfs.ext4`, `e2fsck`, `blockdev`,
//! `dd` and `sha256sum`, as CI has. Without root they fail with a message saying so,
//! unless `TESSERA_SKIP_PRIVILEGED_TESTS=1` is set.
//!
//! Every mount and loop device is owned by a guard that removes it on drop, also when
//! an assertion fails; guards are declared in the order that makes them drop in the
//! right order (filesystem mount, then loop device, then FUSE mount, then temp dir).

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tessera_tests::privilege::privileged;

use nix::mount::{umount2, MntFlags, MsFlags};
use tessera_node::frontend::cleanup::parse_mountinfo;
use tessera_node::frontend::{
    cleanup_stale, BlockTarget, FileTarget, FuseError, FuseOptions, FuseVolume, LoopDevice,
    TargetError, TargetErrorKind, TargetOp,
};

const MIB: u64 = 1 << 20;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// A unique directory under the system temp dir, removed on drop after anything still
/// mounted below it has been detached (so removal never walks into a live mount).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "tessera-frontend-{tag}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    fn subdir(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        fs::create_dir_all(&p).expect("create subdir");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut below: Vec<PathBuf> = parse_mountinfo(&text)
            .into_iter()
            .map(|m| m.mountpoint)
            .filter(|m| m.starts_with(&self.0))
            .collect();
        below.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for m in below {
            let _ = umount2(&m, MntFlags::MNT_DETACH);
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Detaches its loop device on drop.
struct LoopGuard(LoopDevice);

impl Drop for LoopGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.detach() {
            eprintln!("guard: detaching {}: {e}", self.0.path().display());
        }
    }
}

/// Unmounts a kernel filesystem mount on drop.
struct MountGuard(Option<PathBuf>);

impl MountGuard {
    fn mount(device: &Path, at: &Path, fstype: &str) -> MountGuard {
        nix::mount::mount(
            Some(device),
            at,
            Some(fstype),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount {} at {}: {e}", device.display(), at.display()));
        MountGuard(Some(at.to_owned()))
    }

    fn unmount(&mut self) {
        if let Some(p) = self.0.take() {
            umount2(&p, MntFlags::empty())
                .unwrap_or_else(|e| panic!("umount {}: {e}", p.display()));
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            if umount2(&p, MntFlags::empty()).is_err() {
                let _ = umount2(&p, MntFlags::MNT_DETACH);
            }
        }
    }
}

/// Runs a command with a timeout (polling, killing it if it overruns).
fn run(cmd: &str, args: &[&OsStr]) -> Output {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd}: {e} (is it installed?)"));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{cmd} {args:?} did not finish within {COMMAND_TIMEOUT:?}");
            }
            Err(e) => panic!("wait for {cmd}: {e}"),
        }
    }
    child.wait_with_output().expect("collect output")
}

fn run_ok(cmd: &str, args: &[&OsStr]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed with {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Deterministic pseudo-random bytes (xorshift), so failures are reproducible.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn is_mounted(path: &Path) -> bool {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    parse_mountinfo(&text).iter().any(|m| m.mountpoint == path)
}

fn mount_file_target(dir: &TempDir, size: u64, opts: FuseOptions) -> (Arc<FileTarget>, FuseVolume) {
    let target = Arc::new(FileTarget::create(&dir.0.join("backing.img"), size).expect("create"));
    let dyn_target: Arc<dyn BlockTarget> = target.clone();
    let fuse = FuseVolume::mount(dyn_target, &dir.subdir("fuse"), opts).expect("mount FUSE");
    (target, fuse)
}

fn sha256_of(files: &[PathBuf]) -> Vec<String> {
    let args: Vec<&OsStr> = files.iter().map(|p| p.as_os_str()).collect();
    run_ok("sha256sum", &args)
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn frontend_ext4_on_loop_on_fuse_survives_remount() {
    if !privileged("frontend test") {
        return;
    }
    let dir = TempDir::new("ext4");
    let mnt = dir.subdir("mnt");
    let (target, mut fuse) = mount_file_target(&dir, 256 * MIB, FuseOptions::default());
    let backing = target.path().to_owned();
    assert_eq!(
        fs::metadata(fuse.file_path()).expect("stat").len(),
        256 * MIB
    );

    let mut dev = LoopGuard(LoopDevice::attach(fuse.file_path(), true).expect("attach"));
    assert!(
        dev.0.direct_io(),
        "direct I/O not enabled on {}",
        dev.0.path().display()
    );
    assert_eq!(dev.0.block_size(), 4096);
    assert_eq!(dev.0.size_bytes().expect("size"), 256 * MIB);
    let status = dev.0.status().expect("LOOP_GET_STATUS64");
    assert!(status.direct_io);
    assert_eq!(
        status.backing_inode,
        fs::metadata(fuse.file_path()).expect("stat").ino()
    );
    // Cross-check with util-linux.
    let losetup = run_ok(
        "losetup",
        &[
            os("-n"),
            os("-O"),
            os("BACK-FILE,DIO"),
            dev.0.path().as_os_str(),
        ],
    );
    assert!(
        losetup.contains(&*fuse.file_path().to_string_lossy()) && losetup.trim_end().ends_with('1'),
        "losetup says: {losetup}"
    );

    run_ok("mkfs.ext4", &[os("-q"), os("-F"), dev.0.path().as_os_str()]);
    let mut fsmount = MountGuard::mount(dev.0.path(), &mnt, "ext4");
    let mut files = Vec::new();
    for (i, len) in [(1u64, 3 * MIB as usize), (2, 12345), (3, 5 * MIB as usize)] {
        let p = mnt.join(format!("file-{i}"));
        fs::write(&p, pattern(i, len)).expect("write file");
        files.push(p);
    }
    run_ok("sync", &[os("-f"), mnt.as_os_str()]);
    let before = sha256_of(&files);
    assert_eq!(before.len(), 3);
    fsmount.unmount();
    dev.0.detach().expect("detach");
    fuse.unmount().expect("unmount FUSE");

    // The plain file behind the FUSE volume now holds a consistent ext4.
    run_ok("e2fsck", &[os("-fn"), backing.as_os_str()]);

    // Serve the same file again and check the data.
    let target: Arc<dyn BlockTarget> = Arc::new(FileTarget::open(&backing).expect("reopen"));
    let fuse2 = FuseVolume::mount(target, &dir.subdir("fuse2"), FuseOptions::default())
        .expect("mount FUSE again");
    let dev2 = LoopGuard(LoopDevice::attach(fuse2.file_path(), true).expect("attach again"));
    let _fsmount2 = MountGuard::mount(dev2.0.path(), &mnt, "ext4");
    assert_eq!(sha256_of(&files), before);
    assert_eq!(fs::read(&files[1]).expect("read back"), pattern(2, 12345));
}

#[test]
fn frontend_direct_dd_through_loop_lands_in_file() {
    if !privileged("frontend test") {
        return;
    }
    let dir = TempDir::new("dd");
    let (target, fuse) = mount_file_target(&dir, 64 * MIB, FuseOptions::default());
    let dev = LoopGuard(LoopDevice::attach(fuse.file_path(), true).expect("attach"));
    assert!(dev.0.direct_io());

    let data = pattern(42, 4 * MIB as usize);
    let src = dir.0.join("pattern.bin");
    fs::write(&src, &data).expect("write pattern");
    let mut of = PathBuf::from("of=").into_os_string();
    of.push(dev.0.path());
    let mut inf = PathBuf::from("if=").into_os_string();
    inf.push(&src);
    run_ok(
        "dd",
        &[
            &inf,
            &of,
            os("bs=1M"),
            os("seek=3"),
            os("oflag=direct"),
            os("conv=fsync,notrunc"),
            os("status=none"),
        ],
    );

    // Read straight from the plain file behind the FileTarget.
    let plain = fs::File::open(target.path()).expect("open backing");
    let mut got = vec![0u8; data.len()];
    plain
        .read_exact_at(&mut got, 3 * MIB)
        .expect("read backing");
    assert!(
        got == data,
        "data written through the loop device differs in the backing file"
    );
    let mut before = vec![0xffu8; 4096];
    plain
        .read_exact_at(&mut before, 3 * MIB - 4096)
        .expect("read backing");
    assert!(
        before.iter().all(|&b| b == 0),
        "bytes before the write changed"
    );

    // And back through loop + FUSE with direct I/O.
    let out = dir.0.join("readback.bin");
    let mut of = PathBuf::from("of=").into_os_string();
    of.push(&out);
    let mut inf = PathBuf::from("if=").into_os_string();
    inf.push(dev.0.path());
    run_ok(
        "dd",
        &[
            &inf,
            &of,
            os("bs=1M"),
            os("skip=3"),
            os("count=4"),
            os("iflag=direct"),
            os("status=none"),
        ],
    );
    assert!(fs::read(&out).expect("read readback") == data);

    // Discard through the loop device punches the range in the backing file.
    let before_blocks = fs::metadata(target.path()).expect("stat").blocks();
    run_ok(
        "blkdiscard",
        &[
            os("-o"),
            os("4194304"),
            os("-l"),
            os("1048576"),
            dev.0.path().as_os_str(),
        ],
    );
    let mut hole = vec![0xffu8; MIB as usize];
    plain
        .read_exact_at(&mut hole, 4 * MIB)
        .expect("read backing");
    assert!(
        hole.iter().all(|&b| b == 0),
        "discarded range does not read as zeroes"
    );
    assert!(fs::metadata(target.path()).expect("stat").blocks() < before_blocks);
    plain
        .read_exact_at(&mut got, 3 * MIB)
        .expect("read backing");
    assert!(
        got[..MIB as usize] == data[..MIB as usize],
        "data before the discard changed"
    );
    assert!(
        got[2 * MIB as usize..] == data[2 * MIB as usize..],
        "data after the discard changed"
    );
}

#[test]
fn frontend_grow_volume() {
    if !privileged("frontend test") {
        return;
    }
    let dir = TempDir::new("grow");
    let (target, fuse) = mount_file_target(&dir, 64 * MIB, FuseOptions::default());
    let dev = LoopGuard(LoopDevice::attach(fuse.file_path(), true).expect("attach"));
    let getsize = || run_ok("blockdev", &[os("--getsize64"), dev.0.path().as_os_str()]);
    assert_eq!(getsize().trim(), (64 * MIB).to_string());

    // Growing past what the target holds, and shrinking, are refused.
    assert!(matches!(
        fuse.set_size(128 * MIB),
        Err(FuseError::Resize { .. })
    ));
    assert!(matches!(
        fuse.set_size(32 * MIB),
        Err(FuseError::Resize { .. })
    ));
    // Truncating the file from outside is refused too.
    let f = OpenOptions::new()
        .write(true)
        .open(fuse.file_path())
        .expect("open volume file");
    let err = f.set_len(32 * MIB).expect_err("truncate must be refused");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    drop(f);

    target.grow(128 * MIB).expect("grow target");
    fuse.set_size(128 * MIB).expect("set_size");
    assert_eq!(
        fs::metadata(fuse.file_path()).expect("stat").len(),
        128 * MIB
    );
    assert_eq!(dev.0.set_capacity().expect("set_capacity"), 128 * MIB);
    assert_eq!(getsize().trim(), (128 * MIB).to_string());

    // The new tail is usable.
    let mut of = PathBuf::from("of=").into_os_string();
    of.push(dev.0.path());
    run_ok(
        "dd",
        &[
            os("if=/dev/urandom"),
            &of,
            os("bs=1M"),
            os("seek=127"),
            os("count=1"),
            os("oflag=direct"),
            os("status=none"),
        ],
    );
}

#[test]
fn frontend_detach_and_unmount_are_idempotent() {
    if !privileged("frontend test") {
        return;
    }
    let dir = TempDir::new("idem");
    let (_target, mut fuse) = mount_file_target(&dir, 16 * MIB, FuseOptions::default());
    let mountpoint = fuse.mountpoint().to_owned();
    let mut dev = LoopGuard(LoopDevice::attach(fuse.file_path(), true).expect("attach"));
    let number = dev.0.number();
    let sys = PathBuf::from(format!("/sys/block/loop{number}/loop/backing_file"));
    assert!(sys.exists());
    dev.0.detach().expect("first detach");
    assert!(dev.0.is_detached());
    assert!(
        !sys.exists()
            || fs::read_to_string(&sys).is_ok_and(|s| !s.contains("tessera-frontend-idem"))
    );
    dev.0.detach().expect("second detach");
    assert!(
        dev.0.set_capacity().is_err(),
        "a detached handle must refuse ioctls"
    );

    assert!(is_mounted(&mountpoint));
    fuse.unmount().expect("first unmount");
    assert!(!is_mounted(&mountpoint));
    assert!(!fuse.is_serving());
    fuse.unmount().expect("second unmount");
}

#[test]
fn frontend_busy_unmount_detaches_lazily_and_keeps_serving() {
    if !privileged("frontend test") {
        return;
    }
    let dir = TempDir::new("lazy");
    let (target, mut fuse) = mount_file_target(&dir, 16 * MIB, FuseOptions::default());
    target.write_at(0, &pattern(7, 4096)).expect("seed data");
    let mountpoint = fuse.mountpoint().to_owned();
    let mut dev = LoopGuard(LoopDevice::attach(fuse.file_path(), true).expect("attach"));

    let err = fuse
        .unmount()
        .expect_err("busy mount must not unmount cleanly");
    assert!(matches!(err, FuseError::LazilyDetached { .. }), "{err}");
    assert!(!is_mounted(&mountpoint));
    assert!(fuse.is_serving());
    // I/O through the loop device still works.
    let mut inf = PathBuf::from("if=").into_os_string();
    inf.push(dev.0.path());
    let out = dir.0.join("first-block");
    let mut of = PathBuf::from("of=").into_os_string();
    of.push(&out);
    run_ok(
        "dd",
        &[
            &inf,
            &of,
            os("bs=4096"),
            os("count=1"),
            os("iflag=direct"),
            os("status=none"),
        ],
    );
    assert_eq!(fs::read(&out).expect("read"), pattern(7, 4096));

    dev.0.detach().expect("detach");
    wait_until(
        "the FUSE connection to close",
        Duration::from_secs(10),
        || !fuse.is_serving(),
    );
    fuse.unmount().expect("unmount after lazy detach");
}

/// Detaches whatever loop device is bound to the file and lazily unmounts the
/// mountpoint on drop: the guard for deliberately leaked pairs.
struct Leak(PathBuf, PathBuf);

impl Drop for Leak {
    fn drop(&mut self) {
        if let Ok(Some(mut d)) = LoopDevice::find_by_backing_file(&self.1) {
            let _ = d.detach();
        }
        let _ = umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

/// Mounts a FileTarget at `mountpoint`, attaches a loop device, and "crashes": the
/// loop handle is dropped (which does not detach) and the FUSE volume is leaked with its
/// server threads still running, as an engine that outlived its node plugin would be.
fn leak_pair(dir: &TempDir, mountpoint: &Path, name: &str) -> (PathBuf, PathBuf, Leak) {
    let target: Arc<dyn BlockTarget> =
        Arc::new(FileTarget::create(&dir.0.join(format!("{name}.img")), 16 * MIB).expect("create"));
    fs::create_dir_all(mountpoint).expect("mkdir");
    let fuse = FuseVolume::mount(target, mountpoint, FuseOptions::default()).expect("mount");
    let mountpoint = fuse.mountpoint().to_owned();
    let file = fuse.file_path().to_owned();
    let dev = LoopDevice::attach(&file, true).expect("attach");
    let dev_path = dev.path().to_owned();
    drop(dev);
    std::mem::forget(fuse);
    (dev_path, mountpoint.clone(), Leak(mountpoint, file))
}

#[test]
fn frontend_cleanup_stale_removes_leaked_pair() {
    if !privileged("frontend test") {
        return;
    }
    let dir = TempDir::new("stale");
    let root = dir.subdir("root");
    let (dev_a, mnt_a, leak_a) = leak_pair(&dir, &root.join("vol-a"), "a");
    let (dev_b, mnt_b, _leak_b) = leak_pair(&dir, &root.join("vol-b"), "b");
    let (_dev_c, mnt_c, leak_c) = leak_pair(&dir, &root.join("vol-c"), "c");
    // vol-b is in use: a filesystem is mounted from its loop device.
    run_ok("mkfs.ext4", &[os("-q"), os("-F"), dev_b.as_os_str()]);
    let _fs_b = MountGuard::mount(&dev_b, &dir.subdir("mnt-b"), "ext4");

    let found = LoopDevice::find_by_backing_file(&leak_a.1)
        .expect("scan")
        .expect("leaked loop device found");
    assert_eq!(found.path(), dev_a);
    drop(found);

    // vol-c is kept by the caller.
    let keep_c = mnt_c.clone();
    let report = tessera_node::frontend::cleanup_stale_except(&root, &|p| p.starts_with(&keep_c))
        .expect("cleanup");
    assert_eq!(report.detached_loops, vec![dev_a.clone()]);
    assert_eq!(report.unmounted, vec![mnt_a.clone()]);
    assert_eq!(report.in_use, vec![dev_b.clone(), mnt_b.clone()]);
    assert_eq!(report.kept, vec![leak_c.1.clone(), mnt_c.clone()]);
    assert!(report.deferred_loops.is_empty() && report.lazily_detached.is_empty());
    assert!(!is_mounted(&mnt_a));
    assert!(LoopDevice::find_by_backing_file(&leak_a.1)
        .expect("scan")
        .is_none());
    // The others still work.
    assert!(is_mounted(&mnt_b) && is_mounted(&mnt_c));
    assert!(LoopDevice::find_by_backing_file(&leak_c.1)
        .expect("scan")
        .is_some());

    // Nothing stale left: a second run removes nothing.
    let again = tessera_node::frontend::cleanup_stale_except(&root, &|p| p.starts_with(&keep_c))
        .expect("cleanup again");
    assert!(again.detached_loops.is_empty() && again.unmounted.is_empty());

    // Without the keep list, vol-c goes too; vol-b stays because it is in use.
    let last = cleanup_stale(&root).expect("cleanup without keep list");
    assert_eq!(last.unmounted, vec![mnt_c.clone()]);
    assert_eq!(last.detached_loops.len(), 1);
    assert_eq!(last.in_use, vec![dev_b.clone(), mnt_b.clone()]);
    assert!(!is_mounted(&mnt_c));
    assert!(is_mounted(&mnt_b));
}

/// A target whose reads fail with EIO and writes with ENOSPC while `failing` is set.
struct FailingTarget {
    size: u64,
    failing: AtomicBool,
}

impl BlockTarget for FailingTarget {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), TargetError> {
        if self.failing.load(Ordering::Acquire) {
            return Err(TargetError::new(
                TargetErrorKind::Io,
                TargetOp::Read,
                offset,
                buf.len() as u64,
            ));
        }
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), TargetError> {
        if self.failing.load(Ordering::Acquire) {
            return Err(TargetError::new(
                TargetErrorKind::NoSpace,
                TargetOp::Write,
                offset,
                data.len() as u64,
            ));
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), TargetError> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<(), TargetError> {
        Ok(())
    }
}

#[test]
fn frontend_target_errors_reach_the_reader() {
    if !privileged("frontend test") {
        return;
    }
    let dir = TempDir::new("eio");
    let target = Arc::new(FailingTarget {
        size: 16 * MIB,
        failing: AtomicBool::new(false),
    });
    let dyn_target: Arc<dyn BlockTarget> = target.clone();
    let fuse =
        FuseVolume::mount(dyn_target, &dir.subdir("fuse"), FuseOptions::default()).expect("mount");
    let mut dev = LoopGuard(LoopDevice::attach(fuse.file_path(), true).expect("attach"));
    target.failing.store(true, Ordering::Release);

    let mut inf = PathBuf::from("if=").into_os_string();
    inf.push(dev.0.path());
    let out = run(
        "dd",
        &[
            &inf,
            os("of=/dev/null"),
            os("bs=4096"),
            os("count=1"),
            os("iflag=direct"),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "read of a failing target succeeded");
    assert!(stderr.contains("Input/output error"), "dd said: {stderr}");

    let mut of = PathBuf::from("of=").into_os_string();
    of.push(dev.0.path());
    let out = run(
        "dd",
        &[
            os("if=/dev/zero"),
            &of,
            os("bs=4096"),
            os("count=1"),
            os("oflag=direct"),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "write to a full target succeeded");
    assert!(
        stderr.contains("No space left on device"),
        "dd said: {stderr}"
    );

    // Once the target recovers, I/O works again and the device detaches cleanly.
    target.failing.store(false, Ordering::Release);
    run_ok(
        "dd",
        &[
            &inf,
            os("of=/dev/null"),
            os("bs=4096"),
            os("count=1"),
            os("iflag=direct"),
            os("status=none"),
        ],
    );
    dev.0.detach().expect("detach");
}

/// Guard for a fusectl mount made by the test (only if it was not mounted before).
struct FusectlGuard(bool);

impl Drop for FusectlGuard {
    fn drop(&mut self) {
        if self.0 {
            let _ = umount2("/sys/fs/fuse/connections", MntFlags::MNT_DETACH);
        }
    }
}

#[test]
fn frontend_detach_after_fuse_server_is_gone_does_not_hang() {
    if !privileged("frontend test") {
        return;
    }
    let conns = Path::new("/sys/fs/fuse/connections");
    let _fusectl = if is_mounted(conns) {
        FusectlGuard(false)
    } else {
        nix::mount::mount(
            Some("fusectl"),
            conns,
            Some("fusectl"),
            MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount fusectl");
        FusectlGuard(true)
    };
    let dir = TempDir::new("gone");
    let (_target, mut fuse) = mount_file_target(&dir, 16 * MIB, FuseOptions::default());
    let minor = nix::sys::stat::minor(fs::metadata(fuse.mountpoint()).expect("stat").dev());
    let mut dev = LoopGuard(LoopDevice::attach(fuse.file_path(), true).expect("attach"));

    // The INIT reply raised max_background (see FuseOptions).
    let max_bg = fs::read_to_string(conns.join(minor.to_string()).join("max_background"))
        .expect("read max_background");
    assert_eq!(
        max_bg.trim(),
        FuseOptions::default().max_background.to_string()
    );

    // Kill the connection as if the serving process had died.
    fs::write(conns.join(minor.to_string()).join("abort"), "1").expect("abort connection");
    wait_until("the connection to die", Duration::from_secs(10), || {
        !fuse.is_serving()
    });

    let mut inf = PathBuf::from("if=").into_os_string();
    inf.push(dev.0.path());
    let out = run(
        "dd",
        &[
            &inf,
            os("of=/dev/null"),
            os("bs=4096"),
            os("count=1"),
            os("iflag=direct"),
        ],
    );
    assert!(
        !out.status.success(),
        "read from a dead FUSE file succeeded"
    );

    let started = Instant::now();
    dev.0.detach().expect("detach");
    assert!(started.elapsed() < Duration::from_secs(10));
    fuse.unmount().expect("unmount dead FUSE mount");
    assert!(!is_mounted(fuse.mountpoint()));
}
