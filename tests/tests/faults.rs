//! Issue 15's fault suite on separate test hosts: each replica daemon and each node
//! (engine-host + plugin) in a network namespace of its own on a bridge, the
//! controller in the root namespace. Every scenario runs a random writer of 4 KiB
//! O_DIRECT writes with fdatasync that fails on any I/O error or stale read, and
//! ends with every durable block read back current and `tessera verify` clean
//! (`tessera_tests::faults`). The figures each scenario measured are printed.
//!
//! The scenarios run one at a time (a mutex); the short soak runs rounds drawn at
//! random for at most [`SHORT_SOAK_BUDGET`]; `tessera-fault-soak` runs the long one.

use std::time::Duration;

use tessera_tests::faults::scenarios::{self, Report};
use tessera_tests::faults::soak::{soak, SoakConfig};
use tessera_tests::faults::{FaultRig, RigConfig};
use tessera_tests::privilege::privileged;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The short soak stops starting rounds after this long (the test command's budget).
const SHORT_SOAK_BUDGET: Duration = Duration::from_secs(150);

/// Starts a rig, runs `scenario` on it, then the final checks; prints the report.
macro_rules! run_scenario {
    ($config:expr, $name:expr, |$rig:ident| $body:expr) => {{
        if !privileged("fault suite") {
            return;
        }
        let _serial = SERIAL.lock().await;
        let mut $rig = FaultRig::start(&$config, $name)
            .await
            .expect("the rig starts");
        let report: Report = $body.await.unwrap_or_else(|e| panic!("{e:#}"));
        $rig.final_checks(&format!("after {}", report.scenario))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        eprintln!("{report}");
        report
    }};
}

fn figure(report: &Report, name: &str) -> f64 {
    report
        .get(name)
        .and_then(|v| v.trim_end_matches("ms").parse().ok())
        .unwrap_or_else(|| panic!("{report}: no figure {name}"))
}

/// (a) kill -9 and restart of each daemon in turn, moving on as soon as the volume is
/// in sync: no I/O error, no stale read, no lost write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_the_daemons_loses_nothing() {
    let report = run_scenario!(RigConfig::default(), "rolling", |rig| {
        scenarios::rolling_restart(&mut rig, 0xa1)
    });
    assert_eq!(
        report
            .figures
            .iter()
            .filter(|(n, _)| n.ends_with("_back_in_sync"))
            .count(),
        3,
        "{report}"
    );
}

/// (b) The engine cut off from one replica for 30 s: the resync copies at most 1.2×
/// the bytes written meanwhile. A volume of 1 GiB, so random writes rarely hit a
/// block twice and the bytes written are the bytes missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_a_partition_is_healed_by_a_resync_of_what_was_missed() {
    let config = RigConfig {
        volume_bytes: 1 << 30,
        ..RigConfig::default()
    };
    let report = run_scenario!(config, "partitioned", |rig| {
        scenarios::partition(&mut rig, 0xb2, Duration::from_secs(30))
    });
    let ratio = figure(&report, "resync_ratio");
    assert!(
        ratio > 0.0 && ratio <= 1.2,
        "resync copied {ratio}× the bytes written during the partition: {report}"
    );
}

/// (b), interrupted: the resynced replica's daemon killed and restarted mid-resync;
/// the second resync does not start over: both together copy at most 1.2× what was
/// missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_a_resync_killed_midway_goes_on_instead_of_starting_over() {
    let config = RigConfig {
        volume_bytes: 1 << 30,
        ..RigConfig::default()
    };
    let report = run_scenario!(config, "interrupted", |rig| {
        scenarios::interrupted_resync(&mut rig, 0xb3, Duration::from_secs(20))
    });
    let ratio = figure(&report, "resync_ratio");
    assert!(
        ratio > 0.0 && ratio <= 1.2,
        "the two resyncs copied {ratio}× the bytes missed: {report}"
    );
}

/// (c) A daemon lost for good: after the replacement delay the spare holds the copy
/// and RF is 3 again; a second original daemon lost then loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_daemon_lost_for_good_is_replaced_and_a_second_loss_loses_nothing() {
    let config = RigConfig {
        replicas: 4,
        replacement_delay: "2s".into(),
        ..RigConfig::default()
    };
    let report = run_scenario!(config, "lost", |rig| {
        scenarios::lost_for_good(&mut rig, 0xc3)
    });
    assert!(
        report.get("replaced_by").is_some_and(|n| !n.is_empty()),
        "{report}"
    );
}

/// (d) kill -9 of the engine-host mid-write, the volume staged on another node:
/// every durable write is there and the replicas are identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_an_engine_host_killed_mid_write_loses_no_durable_write() {
    run_scenario!(RigConfig::default(), "crashed", |rig| {
        scenarios::engine_host_crash(&mut rig, 0xd4, "n2")
    });
}

/// (e) One replica's link limited to 256 KiB/s, below the writer's pace
/// ([`scenarios::SLOW_LINK_BYTES_PER_SEC`]): writes go on, the slow replica leaves
/// the in-sync set, and it is resynced once the limit is lifted. The volume is
/// attached on a node without a replica of its own, so reads are spread over all
/// three: a reader sent to the slow one would wait behind its backlog of writes, and
/// its checked reads would hold the writer to the slow replica's pace (found by the
/// soak).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_a_slow_replica_leaves_the_in_sync_set_and_comes_back() {
    let config = RigConfig {
        nodes: vec!["n4".into()],
        ..RigConfig::default()
    };
    let report = run_scenario!(config, "slow", |rig| {
        scenarios::slow_replica(&mut rig, 0xe5, scenarios::SLOW_LINK_BYTES_PER_SEC)
    });
    assert!(
        figure(&report, "writes_per_sec_while_slow") > 0.0,
        "{report}"
    );
}

/// (f) One replica's filesystem full: it drops out, I/O goes on, it returns once
/// space is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_a_full_filesystem_drops_a_replica_until_space_is_freed() {
    let config = RigConfig {
        disk_bytes: Some(256 << 20),
        ..RigConfig::default()
    };
    run_scenario!(config, "full", |rig| {
        scenarios::full_filesystem(&mut rig, 0xf6, "n2")
    });
}

/// (g) A flipped byte in a sealed layer and one in the head of a detached volume:
/// the scrub finds and repairs both within a (shortened) period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_the_scrub_repairs_rot_in_a_sealed_layer_and_in_the_head() {
    let config = RigConfig {
        replica_args: vec!["--scrub-period".into(), "3s".into()],
        ..RigConfig::default()
    };
    let report = run_scenario!(config, "scrubbed", |rig| {
        scenarios::scrub_repairs(&mut rig, 0x97)
    });
    assert_eq!(report.get("repaired"), Some("2"), "{report}");
}

/// (h) One replica down while the volume is written, back, then the volume moved to
/// the node where that replica is local: every durable block reads current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_a_volume_moved_to_a_stale_replicas_node_reads_current_data() {
    run_scenario!(RigConfig::default(), "moved", |rig| {
        scenarios::stale_replica_then_move(&mut rig, 0x48)
    });
}

/// (i), short: rounds of faults drawn at random for at most [`SHORT_SOAK_BUDGET`],
/// each checked. `tessera-fault-soak` runs the long soak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i_a_short_randomized_soak_loses_nothing() {
    if !privileged("fault soak") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let config = SoakConfig {
        rounds: 1_000,
        time_budget: Some(SHORT_SOAK_BUDGET),
        seed: 0x5eed_f00d,
    };
    let summary = soak(&config, |round, report| {
        eprintln!("round {round}: {report}")
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{summary:?}");
    assert!(summary.total >= 3, "the short soak ran {summary:?}");
}
