//! Tests of the harness itself: daemons come up, restart on the same ports and data,
//! and nothing outlives a dropped cluster.

use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tessera_csi_proto::v1::{GetPluginInfoRequest, NodeGetInfoRequest};
use tessera_csi_proto::{DRIVER_NAME, TOPOLOGY_NODE_KEY};
use tessera_replica::control_proto::GetInfoRequest;
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
    assert_eq!(pids.len(), 3, "two replicas and the node plugin: {pids:?}");
    assert_ne!(pids, old_pids, "restarts run new processes");
    for pid in old_pids.iter().filter(|p| !pids.contains(p)) {
        assert!(!process_exists(*pid), "killed process {pid} still exists");
    }

    let dir = cluster.dir().to_path_buf();
    assert!(dir.join("node.sock").exists());
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
