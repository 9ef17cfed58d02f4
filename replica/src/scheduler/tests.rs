//! Scheduler tests: policy through the real dispatcher with a manual clock and an
//! engine that holds requests until the test completes them, plus end-to-end runs on
//! the io_uring engine with real files.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::*;

const BLOCK: usize = 4096;
const MS: Duration = Duration::from_millis(1);

/// An engine that records operations and completes them only when told to.
#[derive(Default)]
struct HeldEngine {
    ops: Mutex<Vec<EngineOp>>,
    refuse: AtomicBool,
}

#[derive(Clone, Default)]
struct Held(Arc<HeldEngine>);

impl IoEngine for Held {
    fn submit(&self, op: EngineOp) -> Result<(), Rejected> {
        if self.0.refuse.load(Ordering::SeqCst) {
            return Err(Rejected {
                op,
                error: EngineError::Stopped,
            });
        }
        self.0.ops.lock().expect("test lock").push(op);
        Ok(())
    }

    fn name(&self) -> &'static str {
        "held"
    }
}

impl Held {
    fn len(&self) -> usize {
        self.0.ops.lock().expect("test lock").len()
    }

    /// Offsets of the held requests, in dispatch order.
    fn offsets(&self) -> Vec<u64> {
        let ops = self.0.ops.lock().expect("test lock");
        ops.iter().map(|op| op.request.offset()).collect()
    }

    /// Completes the oldest held request successfully; returns its offset.
    fn complete_one(&self) -> Option<u64> {
        let op = {
            let mut ops = self.0.ops.lock().expect("test lock");
            if ops.is_empty() {
                return None;
            }
            ops.remove(0)
        };
        let offset = op.request.offset();
        let bytes = op.request.data_bytes() as usize;
        (op.done)(Ok(IoCompletion { bytes, buf: None }));
        Some(offset)
    }

    fn complete_all(&self) -> Vec<u64> {
        std::iter::from_fn(|| self.complete_one()).collect()
    }
}

fn dummy_file() -> Arc<File> {
    Arc::new(File::open("/dev/null").expect("/dev/null exists"))
}

fn read(offset: u64) -> IoRequest {
    IoRequest::Read {
        file: dummy_file(),
        offset,
        len: BLOCK,
    }
}

fn held_scheduler(depth: u32) -> (Scheduler, Held, Arc<ManualClock>) {
    let engine = Held::default();
    let clock = Arc::new(ManualClock::new(0));
    let config = SchedulerConfig {
        queue_depth: depth,
        ..SchedulerConfig::default()
    };
    let sched = Scheduler::with_engine(config, Box::new(engine.clone()), clock.clone())
        .expect("inside a runtime");
    (sched, engine, clock)
}

#[tokio::test]
async fn dispatch_order_is_earliest_deadline_first() {
    let (sched, engine, clock) = held_scheduler(1);
    let a = sched
        .register_volume("a", Qos::unlimited())
        .expect("register");
    let b = sched
        .register_volume("b", Qos::unlimited())
        .expect("register");
    // Occupies the single slot so the rest queue up.
    let first = a.submit(IoClass::Background, read(0));
    let bg = a.submit(IoClass::Background, read(1)); // due 100 ms
    clock.advance(MS);
    let write = b.submit(
        IoClass::ForegroundWrite,
        IoRequest::Fdatasync { file: dummy_file() },
    ); // due 6 ms
    let fg = a.submit(IoClass::ForegroundRead, read(3)); // due 3 ms
    let b_read = b.submit(IoClass::ForegroundRead, read(4)); // due 3 ms, later arrival
    assert_eq!(engine.offsets(), vec![0]);
    let mut order = Vec::new();
    while let Some(off) = engine.complete_one() {
        order.push(off);
    }
    assert_eq!(order, vec![0, 3, 4, 0, 1], "fsync has offset 0");
    for fut in [first, bg, fg, b_read] {
        fut.await.expect("completes");
    }
    write.await.expect("completes");
}

#[tokio::test]
async fn in_flight_never_exceeds_depth_and_everything_completes() {
    let (sched, engine, _clock) = held_scheduler(4);
    let vol = sched
        .register_volume("v", Qos::unlimited())
        .expect("register");
    let futs: Vec<_> = (0..50)
        .map(|i| vol.submit(IoClass::ForegroundWrite, read(i)))
        .collect();
    let mut completed = 0;
    loop {
        assert!(engine.len() <= 4);
        assert!(sched.in_flight() <= 4);
        if engine.complete_one().is_none() {
            break;
        }
        completed += 1;
    }
    assert_eq!(completed, 50);
    for f in futs {
        f.await.expect("completes");
    }
    let stats = vol.stats();
    assert_eq!(stats.completed_ops, 50);
    assert_eq!(stats.completed_bytes, 50 * BLOCK as u64);
    assert_eq!((stats.queued, stats.in_flight), (0, 0));
}

#[tokio::test]
async fn unlimited_volume_is_never_throttled() {
    let (sched, engine, clock) = held_scheduler(1024);
    let vol = sched
        .register_volume("v", Qos::unlimited())
        .expect("register");
    let futs: Vec<_> = (0..1000)
        .map(|i| vol.submit(IoClass::ForegroundRead, read(i)))
        .collect();
    assert_eq!(engine.len(), 1000, "all dispatched at once");
    clock.advance(Duration::from_secs(1));
    assert_eq!(vol.stats().throttled, Duration::ZERO);
    engine.complete_all();
    for f in futs {
        f.await.expect("completes");
    }
}

#[tokio::test]
async fn iops_limit_throttles_until_tokens_come_due() {
    let (sched, engine, clock) = held_scheduler(64);
    let qos = Qos {
        max_iops: Some(100),
        burst_duration: Duration::from_millis(20), // 2 tokens
        ..Qos::unlimited()
    };
    let vol = sched.register_volume("v", qos).expect("register");
    let futs: Vec<_> = (0..5)
        .map(|i| vol.submit(IoClass::ForegroundRead, read(i)))
        .collect();
    assert_eq!(engine.len(), 2, "burst of two");
    assert_eq!(vol.stats().queued, 3);
    clock.advance(9 * MS);
    sched.kick();
    assert_eq!(engine.len(), 2, "next token at 10 ms");
    clock.advance(MS);
    sched.kick();
    assert_eq!(engine.len(), 3);
    let stats = vol.stats();
    assert_eq!(stats.throttled, 10 * MS);
    assert_eq!(stats.queued, 2);
    clock.advance(20 * MS);
    sched.kick();
    assert_eq!(engine.len(), 5);
    engine.complete_all();
    for f in futs {
        f.await.expect("completes");
    }
}

#[tokio::test]
async fn set_qos_on_a_live_volume_keeps_queued_requests() {
    let (sched, engine, clock) = held_scheduler(64);
    let strict = Qos {
        max_iops: Some(1),
        burst_duration: Duration::from_secs(1),
        ..Qos::unlimited()
    };
    let vol = sched.register_volume("v", strict).expect("register");
    let futs: Vec<_> = (0..10)
        .map(|i| vol.submit(IoClass::ForegroundWrite, read(i)))
        .collect();
    assert_eq!(engine.len(), 1);
    assert_eq!(vol.stats().queued, 9);
    let relaxed = Qos {
        max_iops: Some(1_000_000),
        ..vol.qos()
    };
    vol.set_qos(relaxed.clone()).expect("valid QoS");
    assert_eq!(vol.qos(), relaxed);
    // What was earned before the change was earned at the old rate; the new rate
    // applies from now on, so 1 ms later the queue drains.
    assert_eq!(engine.len(), 1);
    clock.advance(MS);
    sched.kick();
    assert_eq!(engine.offsets(), (0..10).collect::<Vec<_>>(), "FIFO kept");
    engine.complete_all();
    for f in futs {
        f.await.expect("completes");
    }
    assert_eq!(vol.stats().completed_ops, 10);
    // Invalid QoS is refused and the old one stays.
    let bad = Qos {
        min_iops: Some(10),
        max_iops: Some(5),
        ..Qos::unlimited()
    };
    assert!(matches!(
        vol.set_qos(bad),
        Err(SchedulerError::InvalidQos(_))
    ));
    assert_eq!(vol.qos(), relaxed);
}

/// Runs 2 s of a saturated device (depth 1, each op takes 1 ms of simulated time, so
/// 1000 IOPS) where `fg` is overloaded (two new foreground reads per completion) and
/// `bg` keeps 8 background requests queued; returns bg's completed ops.
async fn saturated_background_ops(bg_qos: Qos) -> u64 {
    let (sched, engine, clock) = held_scheduler(1);
    let fg = sched
        .register_volume("fg", Qos::unlimited())
        .expect("register");
    let bg = sched.register_volume("bg", bg_qos).expect("register");
    const FG: u64 = 0;
    const BG: u64 = 1 << 40;
    let mut futs = Vec::new();
    for i in 0..8 {
        futs.push(fg.submit(IoClass::ForegroundRead, read(FG + i)));
        futs.push(bg.submit(IoClass::Background, read(BG + i)));
    }
    let mut bg_done = 0u64;
    for _ in 0..2000 {
        clock.advance(MS);
        let off = engine.complete_one().expect("device busy");
        if off >= BG {
            bg_done += 1;
            futs.push(bg.submit(IoClass::Background, read(BG)));
        } else {
            futs.push(fg.submit(IoClass::ForegroundRead, read(FG)));
            futs.push(fg.submit(IoClass::ForegroundRead, read(FG)));
        }
    }
    engine.complete_all();
    drop(futs);
    bg_done
}

#[tokio::test]
async fn reservation_is_honoured_when_the_device_is_saturated() {
    let reserved = Qos {
        min_iops: Some(100),
        ..Qos::unlimited()
    };
    let with = saturated_background_ops(reserved).await;
    let without = saturated_background_ops(Qos::unlimited()).await;
    // 100 IOPS for 2 s, plus at most the 100 ms accumulation window.
    assert!((200..=215).contains(&with), "with minIOPS 100: {with} ops");
    assert!(without < 200, "without a reservation: {without} ops");
}

#[tokio::test]
async fn deadline_misses_are_counted() {
    let (sched, engine, clock) = held_scheduler(8);
    let vol = sched
        .register_volume("v", Qos::unlimited())
        .expect("register");
    let on_time = vol.submit(IoClass::ForegroundRead, read(0));
    clock.advance(MS);
    engine.complete_one();
    on_time.await.expect("completes");
    let late = vol.submit(IoClass::ForegroundRead, read(0));
    clock.advance(3 * MS);
    engine.complete_one();
    late.await.expect("completes");
    assert_eq!(vol.stats().deadline_misses, 1);
}

#[tokio::test]
async fn dropped_future_before_dispatch_cancels_the_request() {
    let (sched, engine, _clock) = held_scheduler(1);
    let vol = sched
        .register_volume("v", Qos::unlimited())
        .expect("register");
    let first = vol.submit(IoClass::ForegroundWrite, read(1));
    let second = vol.submit(IoClass::ForegroundWrite, read(2));
    let third = vol.submit(IoClass::ForegroundWrite, read(3));
    drop(second);
    assert_eq!(engine.complete_one(), Some(1));
    assert_eq!(engine.offsets(), vec![3], "the dropped request never ran");
    engine.complete_all();
    first.await.expect("completes");
    third.await.expect("completes");
    let stats = vol.stats();
    assert_eq!((stats.completed_ops, stats.cancelled_ops), (2, 1));
}

#[tokio::test]
async fn refused_requests_fail_with_engine_stopped() {
    let (sched, engine, _clock) = held_scheduler(2);
    let vol = sched
        .register_volume("v", Qos::unlimited())
        .expect("register");
    engine.0.refuse.store(true, Ordering::SeqCst);
    let futs: Vec<_> = (0..5)
        .map(|i| vol.submit(IoClass::ForegroundRead, read(i)))
        .collect();
    for f in futs {
        assert!(matches!(f.await, Err(SchedulerError::EngineStopped)));
    }
    assert_eq!(sched.in_flight(), 0);
    assert_eq!(vol.stats().failed_ops, 5);
}

#[tokio::test]
async fn registration_rules() {
    let (sched, _engine, _clock) = held_scheduler(2);
    let v = sched
        .register_volume("v", Qos::unlimited())
        .expect("register");
    assert!(matches!(
        sched.register_volume("v", Qos::unlimited()),
        Err(SchedulerError::VolumeExists(_))
    ));
    let zero = Qos {
        max_bandwidth: Some(0),
        ..Qos::unlimited()
    };
    assert!(matches!(
        sched.register_volume("w", zero),
        Err(SchedulerError::InvalidQos(_))
    ));
    let clone = v.clone();
    drop(v);
    assert!(
        sched.register_volume("v", Qos::unlimited()).is_err(),
        "a clone lives"
    );
    drop(clone);
    let again = sched
        .register_volume("v", Qos::unlimited())
        .expect("re-register");
    assert_eq!(again.id(), "v");
    let too_long = IoRequest::Read {
        file: dummy_file(),
        offset: 0,
        len: MAX_IO_LEN + 1,
    };
    assert!(matches!(
        again.submit(IoClass::ForegroundRead, too_long).await,
        Err(SchedulerError::InvalidRequest(_))
    ));
}

#[test]
fn new_outside_a_runtime_is_an_error() {
    let config = SchedulerConfig {
        engine: EngineKind::Sync { threads: 1 },
        ..SchedulerConfig::default()
    };
    assert!(matches!(
        Scheduler::new(config),
        Err(SchedulerError::NoRuntime)
    ));
}

/// Opens `path` read-write with `O_DIRECT`, as the store opens data files (the test
/// temp dirs are on ext4 here; a filesystem without it fails the test loudly).
pub(super) fn open_direct(path: &Path) -> Arc<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("temp dir supports O_DIRECT");
    Arc::new(file)
}

fn block(seed: u8) -> Vec<u8> {
    (0..BLOCK).map(|i| (i as u8) ^ seed).collect()
}

/// Every request kind through a volume handle on the io_uring engine, many of them
/// concurrently from several tasks, as the block store's files submit them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_kind_round_trips_on_io_uring() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sched = Scheduler::new(SchedulerConfig {
        name: "e2e".into(),
        queue_depth: 8,
        ..SchedulerConfig::default()
    })
    .expect("io_uring available");
    assert_eq!(sched.engine_name(), "io_uring");
    let vol = sched
        .register_volume("v", Qos::unlimited())
        .expect("register");
    let file = open_direct(&dir.path().join("data"));
    let read = |offset: u64, len: usize| IoRequest::Read {
        file: Arc::clone(&file),
        offset,
        len,
    };
    let mut tasks = Vec::new();
    for i in 0..256u64 {
        let write = IoRequest::Write {
            file: Arc::clone(&file),
            offset: i * BLOCK as u64,
            buf: AlignedBuf::from_slice(&block(i as u8)).expect("buffer"),
        };
        tasks.push(tokio::spawn(vol.submit(IoClass::ForegroundWrite, write)));
    }
    for t in tasks {
        let done = t.await.expect("task").expect("write");
        assert_eq!(done.bytes, BLOCK);
    }
    let fdatasync = IoRequest::Fdatasync {
        file: Arc::clone(&file),
    };
    vol.submit(IoClass::ForegroundWrite, fdatasync)
        .await
        .expect("fdatasync");
    let fsync = IoRequest::Fsync {
        file: Arc::clone(&file),
    };
    vol.submit(IoClass::Background, fsync).await.expect("fsync");
    for i in [0u64, 17, 255] {
        let done = vol
            .submit(IoClass::ForegroundRead, read(i * BLOCK as u64, BLOCK))
            .await
            .expect("read");
        assert_eq!(done.buf.expect("data").to_vec(), block(i as u8));
    }
    let punch = IoRequest::PunchHole {
        file: Arc::clone(&file),
        offset: 0,
        len: BLOCK as u64,
    };
    vol.submit(IoClass::ForegroundWrite, punch)
        .await
        .expect("punch");
    let done = vol
        .submit(IoClass::ForegroundRead, read(0, 2 * BLOCK))
        .await
        .expect("read");
    let buf = done.buf.expect("data");
    assert!(buf.as_slice()[..BLOCK].iter().all(|&b| b == 0));
    assert_eq!(&buf.as_slice()[BLOCK..], block(1).as_slice());
    let past_end = vol
        .submit(IoClass::ForegroundRead, read(256 * BLOCK as u64, BLOCK))
        .await
        .expect("read");
    assert_eq!(past_end.bytes, 0);
    let stats = vol.stats();
    assert_eq!(stats.completed_ops, 256 + 2 + 3 + 1 + 2);
    assert_eq!((stats.in_flight, stats.queued, stats.failed_ops), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_futures_on_io_uring_neither_crash_nor_leak() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sched = Scheduler::new(SchedulerConfig {
        name: "drop".into(),
        queue_depth: 1,
        ..SchedulerConfig::default()
    })
    .expect("io_uring available");
    let vol = sched
        .register_volume("v", Qos::unlimited())
        .expect("register");
    let file = open_direct(&dir.path().join("data"));
    let write = IoRequest::Write {
        file: Arc::clone(&file),
        offset: 0,
        buf: AlignedBuf::from_slice(&block(9)).expect("buffer"),
    };
    // Submitted, then dropped at once: the first is in flight, the rest queued.
    for _ in 0..100 {
        drop(vol.submit(IoClass::ForegroundWrite, write_clone(&file)));
    }
    drop(vol.submit(IoClass::ForegroundWrite, write));
    // With depth 1 and one FIFO class, this completes only after all the above were
    // either run or discarded.
    let read = IoRequest::Read {
        file: Arc::clone(&file),
        offset: 0,
        len: BLOCK,
    };
    let done = vol
        .submit(IoClass::ForegroundWrite, read)
        .await
        .expect("read");
    let stats = vol.stats();
    assert_eq!(stats.completed_ops + stats.cancelled_ops, 102);
    assert!(stats.completed_ops >= 2, "the in-flight write ran");
    assert_eq!(stats.in_flight, 0);
    assert_eq!(Arc::strong_count(&file), 1, "no request kept the file");
    // Whatever ran wrote the same bytes, or nothing at all if the write was discarded.
    let data = done.buf.expect("buf").to_vec();
    assert!(data == block(9) || data.iter().all(|&b| b == 0));
}

fn write_clone(file: &Arc<File>) -> IoRequest {
    IoRequest::Write {
        file: Arc::clone(file),
        offset: 0,
        buf: AlignedBuf::from_slice(&block(9)).expect("buffer"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timer_releases_throttled_requests_with_the_real_clock() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sched = Scheduler::new(SchedulerConfig {
        name: "timer".into(),
        engine: EngineKind::Sync { threads: 1 },
        ..SchedulerConfig::default()
    })
    .expect("threads");
    let qos = Qos {
        max_iops: Some(200),
        burst_duration: Duration::from_millis(5), // one token
        ..Qos::unlimited()
    };
    let vol = sched.register_volume("v", qos).expect("register");
    let file = open_direct(&dir.path().join("data"));
    let start = Instant::now();
    // `submit` queues at once, so all five wait on the bucket together.
    let futs: Vec<_> = (0..5)
        .map(|_| {
            let sync = IoRequest::Fdatasync {
                file: Arc::clone(&file),
            };
            vol.submit(IoClass::ForegroundWrite, sync)
        })
        .collect();
    for f in futs {
        f.await.expect("fdatasync");
    }
    // One op from the burst, then one every 5 ms: at least 20 ms for five.
    assert!(
        start.elapsed() >= Duration::from_millis(20),
        "{:?}",
        start.elapsed()
    );
    assert!(vol.stats().throttled >= Duration::from_millis(15));
}

#[tokio::test]
async fn background_is_capped_and_split_while_foreground_is_active() {
    let (sched, engine, clock) = held_scheduler(16);
    let vol = sched
        .register_volume("v", Qos::unlimited())
        .expect("register");
    let limits = BackgroundLimits::default();
    let fg = vol.submit(IoClass::ForegroundRead, read(0));
    let bg: Vec<_> = (1..=5)
        .map(|i| vol.submit(IoClass::Background, read(i)))
        .collect();
    // The foreground read and `busy_depth` background requests, no more.
    assert_eq!(engine.offsets(), vec![0, 1, 2]);
    {
        let ops = engine.0.ops.lock().expect("test lock");
        assert_eq!(ops[0].max_transfer, None, "foreground is issued whole");
        assert_eq!(ops[1].max_transfer, Some(limits.max_transfer));
    }
    // Completing the foreground read frees no background slot; completing a background
    // request lets exactly one more in.
    engine.complete_one();
    fg.await.expect("foreground read");
    assert_eq!(engine.offsets(), vec![1, 2]);
    engine.complete_one();
    assert_eq!(engine.offsets(), vec![2, 3]);
    // Once foreground has been quiet for the linger time, the cap lifts.
    clock.advance(limits.linger);
    engine.complete_one();
    assert_eq!(engine.offsets(), vec![3, 4, 5]);
    engine.complete_all();
    for f in bg {
        f.await.expect("background read");
    }
}
