//! Tests of the harness itself: daemons come up, restart on the same ports and data,
//! and nothing outlives a dropped cluster.

use std::time::Duration;
use tessera_tests::privilege::privileged;

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tessera_csi_proto::v1::{GetPluginInfoRequest, NodeGetInfoRequest};
use tessera_csi_proto::{DRIVER_NAME, TOPOLOGY_NODE_KEY};
use tessera_replica_protocol::control_proto::GetInfoRequest;
use tessera_tests::{wait_until, ClusterBuilder};

fn process_exists(pid: u32) -> bool {
    let pid = Pid::from_raw(i32::try_from(pid).expect("pid fits i32"));
    !matches!(kill(pid, None), Err(Errno::ESRCH))
}

#[tokio::test]
async fn replicas_and_node_start_restart_and_are_reaped() {
    let mut cluster = ClusterBuilder::new()
        .replicas(2)
        .controller(false)
        .node_id("n2")
        .start()
        .await
        .expect("cluster starts");

    for replica in cluster.replicas() {
        let info = replica
            .client()
            .await
            .expect("replica answers")
            .get_info(GetInfoRequest {})
            .await
            .expect("GetInfo")
            .into_inner();
        assert_eq!(info.node_id, replica.node_id());
        assert_eq!(info.zone, replica.zone());
        assert_eq!(info.data_address, replica.data_addr().to_string());
    }

    let plugin = cluster
        .node_identity()
        .await
        .expect("node answers")
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .expect("GetPluginInfo")
        .into_inner();
    assert_eq!(plugin.name, DRIVER_NAME);
    let info = cluster
        .node()
        .await
        .expect("node answers")
        .node_get_info(NodeGetInfoRequest {})
        .await
        .expect("NodeGetInfo")
        .into_inner();
    assert_eq!(info.node_id, "n2");
    assert_eq!(info.max_volumes_per_node, 64);
    let topology = info.accessible_topology.expect("topology reported");
    assert_eq!(topology.segments[TOPOLOGY_NODE_KEY], "n2");

    // kill -9 and restart: same ports, new process.
    let before = cluster.replica(1).control_addr();
    let old_pids = cluster.pids();
    cluster.restart_replica(1).await.expect("replica restarts");
    assert_eq!(cluster.replica(1).control_addr(), before);
    let info = cluster
        .replica(1)
        .client()
        .await
        .expect("restarted replica answers")
        .get_info(GetInfoRequest {})
        .await
        .expect("GetInfo after restart")
        .into_inner();
    assert_eq!(info.node_id, "n2");

    // The node plugin finds its stale socket and serves again.
    cluster.restart_node().await.expect("node plugin restarts");
    cluster
        .node()
        .await
        .expect("restarted node answers")
        .node_get_info(NodeGetInfoRequest {})
        .await
        .expect("NodeGetInfo after restart");

    let pids = cluster.pids();
    assert_eq!(
        pids.len(),
        4,
        "two replicas, the engine-host and the node plugin: {pids:?}"
    );
    assert_eq!(cluster.engine_host_pids().len(), 1);
    assert_ne!(pids, old_pids, "restarts run new processes");
    for pid in old_pids.iter().filter(|p| !pids.contains(p)) {
        assert!(!process_exists(*pid), "killed process {pid} still exists");
    }

    let dir = cluster.dir().to_path_buf();
    assert!(dir.join("node.sock").exists());
    assert!(dir.join("node-state").join("engine-host.sock").exists());
    drop(cluster);
    for pid in pids {
        wait_until(Duration::from_secs(5), || !process_exists(pid))
            .unwrap_or_else(|_| panic!("process {pid} outlived the cluster"));
    }
    if std::env::var_os(tessera_tests::cluster::KEEP_DIR_ENV).is_none() {
        assert!(!dir.exists(), "{} was not removed", dir.display());
    }
}

#[test]
fn missing_binary_is_a_clear_error() {
    let err =
        tessera_tests::binaries::locate("tessera-no-such-binary").expect_err("no such binary");
    let message = format!("{err:#}");
    assert!(message.contains("cargo build --workspace"), "{message}");
    assert!(message.contains("tessera-no-such-binary"), "{message}");
}

/// Two nodes, one of them without a replica daemon: both get an engine-host and a
/// plugin of their own, the controller accepts both as publish targets, and a mount
/// the test leaves behind is removed when the cluster is dropped.
#[tokio::test]
async fn two_nodes_and_leftover_mounts_are_cleaned_up() {
    use tessera_tests::fixtures::{create_request, publish_request, GIB};
    if !privileged("harness test") {
        return;
    }
    let mut cluster = ClusterBuilder::new()
        .nodes(["n1", "edge"])
        .start()
        .await
        .expect("cluster starts");
    assert_eq!(cluster.nodes().len(), 2);
    assert_eq!(cluster.engine_host_pids().len(), 2);
    let edge = cluster.node_host("edge").expect("node edge");
    assert_ne!(
        edge.state_dir(),
        cluster.node_host("n1").expect("n1").state_dir()
    );
    assert!(edge.engine_host_socket().exists());
    let info = cluster
        .node_client("edge")
        .await
        .expect("edge plugin answers")
        .node_get_info(NodeGetInfoRequest {})
        .await
        .expect("NodeGetInfo")
        .into_inner();
    assert_eq!(info.node_id, "edge");

    let mut controller = cluster.controller().await.expect("controller");
    let volume = controller
        .create_volume(create_request("harness-two-nodes", GIB))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume");
    controller
        .controller_publish_volume(publish_request(&volume.volume_id, "edge"))
        .await
        .expect("a node without a replica daemon is a publish target");

    // Plugin and engine-host restart independently.
    let old = cluster.node_host("edge").expect("edge").engine_host_pid();
    cluster.kill_node_plugin("edge").expect("kill plugin");
    assert!(cluster.stop_engine_host("edge").expect("stop engine-host"));
    cluster
        .start_engine_host("edge")
        .await
        .expect("engine-host restarts");
    cluster
        .start_node_plugin("edge")
        .await
        .expect("plugin restarts");
    assert_ne!(
        cluster.node_host("edge").expect("edge").engine_host_pid(),
        old
    );

    // A mount the test forgot: the drop must remove it before removing the directory.
    let dir = cluster.dir().to_path_buf();
    let forgotten = dir.join("forgotten");
    std::fs::create_dir_all(&forgotten).expect("mkdir");
    nix::mount::mount(
        Some("tmpfs"),
        &forgotten,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .expect("mount tmpfs");
    assert_eq!(
        tessera_tests::mounts::mounts_under(&dir)
            .expect("mountinfo")
            .len(),
        1
    );
    drop(cluster);
    assert!(tessera_tests::mounts::mounts_under(&dir)
        .expect("mountinfo")
        .is_empty());
    if std::env::var_os(tessera_tests::cluster::KEEP_DIR_ENV).is_none() {
        assert!(!dir.exists(), "{} was not removed", dir.display());
    }
}
