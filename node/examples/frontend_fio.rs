//! fio comparison of loop-on-FUSE-on-[`FileTarget`] against loop on the plain file.
//!
//! It takes minutes and needs root and fio. Run with
//! `cargo run --release -p tessera-node --example frontend_fio`.
//! `TESSERA_BENCH_SECONDS` sets the runtime per job (default 20) and
//! `TESSERA_BENCH_THREADS` the FUSE worker threads (default: [`FuseOptions`] default).
//! It prints a table and asserts only that every job ran and moved data.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::mount::{umount2, MntFlags};
use tessera_node::frontend::{BlockTarget, FileTarget, FuseOptions, FuseVolume, LoopDevice};

const SIZE: u64 = 1 << 30;

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = umount2(&self.0.join("fuse"), MntFlags::MNT_DETACH);
        let _ = fs::remove_dir_all(&self.0);
    }
}

struct LoopGuard(LoopDevice);

impl Drop for LoopGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.detach() {
            eprintln!("detach {}: {e}", self.0.path().display());
        }
    }
}

struct Job {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
}

const JOBS: &[Job] = &[
    Job {
        name: "4k randwrite QD1",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
    },
    Job {
        name: "4k randwrite QD32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
    },
    Job {
        name: "4k randread QD32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
    },
    Job {
        name: "1M write QD8",
        rw: "write",
        bs: "1M",
        iodepth: 8,
    },
];

/// Extracts `"iops" : N` and the mean total latency (ns) of the `read` or `write`
/// section from fio's JSON output, without a JSON dependency.
fn parse(json: &str, section: &str) -> Option<(f64, f64, f64)> {
    let start = json.find(&format!("\"{section}\" : {{"))?;
    let rest = &json[start..];
    let num_after = |key: &str, from: &str| -> Option<f64> {
        let i = from.find(key)? + key.len();
        let tail = from[i..].trim_start();
        let end = tail
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == '-' || c == '+'))
            .unwrap_or(tail.len());
        tail[..end].parse().ok()
    };
    let iops = num_after("\"iops\" :", rest)?;
    let bw_kib = num_after("\"bw\" :", rest)?;
    let lat = rest.find("\"lat_ns\" : {").map(|i| &rest[i..])?;
    let mean = num_after("\"mean\" :", lat)?;
    Some((iops, bw_kib, mean))
}

fn fio(device: &Path, job: &Job, seconds: u32) -> (f64, f64, f64) {
    let mut filename = PathBuf::from("--filename=").into_os_string();
    filename.push(device);
    let args: Vec<String> = vec![
        "--name=bench".into(),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        format!("--rw={}", job.rw),
        format!("--bs={}", job.bs),
        format!("--iodepth={}", job.iodepth),
        "--time_based".into(),
        format!("--runtime={seconds}"),
        "--size=1G".into(),
        "--randrepeat=0".into(),
        "--output-format=json".into(),
    ];
    let out = Command::new("fio")
        .arg(&filename)
        .args(args.iter().map(OsStr::new))
        .stdin(Stdio::null())
        .output()
        .expect("run fio (installed?)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let section = if job.rw.contains("read") {
        "read"
    } else {
        "write"
    };
    let (iops, bw, lat) = parse(&text, section).expect("parse fio output");
    assert!(iops > 0.0, "{} moved no data", job.name);
    (iops, bw, lat)
}

fn main() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let seconds: u32 = std::env::var("TESSERA_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut opts = FuseOptions::default();
    if let Some(t) = std::env::var("TESSERA_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        opts.threads = t;
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = Dir(std::env::temp_dir().join(format!(
        "tessera-frontend-bench-{}-{nanos}",
        std::process::id()
    )));
    fs::create_dir_all(dir.0.join("fuse")).expect("mkdir");
    let backing = dir.0.join("backing.img");
    let target = Arc::new(FileTarget::create(&backing, SIZE).expect("create"));
    // Allocate the whole file so neither path pays for block allocation.
    let mut of = PathBuf::from("of=").into_os_string();
    of.push(&backing);
    let st = Command::new("dd")
        .args([
            OsStr::new("if=/dev/zero"),
            &of,
            OsStr::new("bs=1M"),
            OsStr::new("count=1024"),
            OsStr::new("conv=notrunc,fsync"),
            OsStr::new("status=none"),
        ])
        .status()
        .expect("dd");
    assert!(st.success());

    let mut rows = Vec::new();
    {
        let plain = LoopGuard(LoopDevice::attach(&backing, true).expect("attach plain"));
        assert!(plain.0.direct_io());
        for job in JOBS {
            rows.push((
                "loop on plain file",
                job.name,
                fio(plain.0.path(), job, seconds),
            ));
        }
    }
    {
        let dyn_target: Arc<dyn BlockTarget> = target.clone();
        let threads = opts.threads;
        let fuse = FuseVolume::mount(dyn_target, &dir.0.join("fuse"), opts).expect("mount");
        let dev = LoopGuard(LoopDevice::attach(fuse.file_path(), true).expect("attach fuse"));
        assert!(dev.0.direct_io());
        let label: &'static str =
            Box::leak(format!("loop on FUSE ({threads} thr) on FileTarget").into_boxed_str());
        for job in JOBS {
            rows.push((label, job.name, fio(dev.0.path(), job, seconds)));
        }
        drop(dev);
        drop(fuse);
    }
    println!(
        "\n{:<40} {:<20} {:>10} {:>12} {:>12}",
        "path", "job", "IOPS", "MiB/s", "mean lat µs"
    );
    for (path, job, (iops, bw, lat)) in rows {
        println!(
            "{path:<40} {job:<20} {iops:>10.0} {:>12.1} {:>12.1}",
            bw / 1024.0,
            lat / 1000.0
        );
    }
}
