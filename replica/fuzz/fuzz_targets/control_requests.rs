//! Fuzzes the replica's control API as the daemon serves it: a sequence of arbitrary
//! protobuf messages, each decoded as one of the control requests and handed to the
//! real `ControlService` over a real catalog in a fresh temporary directory (std file
//! I/O, 64 MiB capacity). Whatever a caller sends, every request must end in a status
//! (never a panic), and the catalog must open again afterwards: hostile requests
//! cannot leave the data directory unreadable.
//!
//! Input: repeated `[kind u8][len u16 LE][len bytes of message]`.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tessera_replica::catalog::{Catalog, CatalogConfig};
use tessera_replica::control_service::{ControlService, NodeInfo};
use tessera_replica_protocol::control_proto as proto;
use tessera_replica_protocol::control_proto::replica_control_server::ReplicaControl;
use tokio_stream::StreamExt;
use tonic::Request;

const CAPACITY: u64 = 64 << 20;
/// Chunks of a snapshot stream read at most (a stream may be long).
const STREAM_ITEMS: usize = 4;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

fn open(dir: &std::path::Path) -> Catalog {
    Catalog::open(CatalogConfig {
        data_dir: dir.to_path_buf(),
        capacity_bytes: Some(CAPACITY),
    })
    .expect("the catalog opens")
}

/// Decodes `body` as `M` and calls `$call` with it, ignoring the status.
macro_rules! serve {
    ($svc:expr, $body:expr, $msg:ty, $method:ident) => {
        if let Ok(m) = <$msg>::decode($body) {
            let _ = $svc.$method(Request::new(m)).await;
        }
    };
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("a temp dir");
    let service = ControlService::new(
        Arc::new(open(dir.path())),
        NodeInfo {
            node_id: "n1".into(),
            zone: "z1".into(),
            data_address: "127.0.0.1:7401".into(),
        },
    );
    runtime().block_on(async {
        let mut rest = data;
        while let [kind, l0, l1, tail @ ..] = rest {
            let len = (u16::from_le_bytes([*l0, *l1]) as usize).min(tail.len());
            let (body, next) = tail.split_at(len);
            rest = next;
            match kind % 13 {
                0 => serve!(service, body, proto::GetInfoRequest, get_info),
                1 => serve!(service, body, proto::CreateVolumeRequest, create_volume),
                2 => serve!(service, body, proto::DeleteVolumeRequest, delete_volume),
                3 => serve!(service, body, proto::GetVolumeRequest, get_volume),
                4 => serve!(service, body, proto::ListVolumesRequest, list_volumes),
                5 => serve!(service, body, proto::UpdateVolumeRequest, update_volume),
                6 => serve!(service, body, proto::RaiseEpochRequest, raise_epoch),
                7 => serve!(service, body, proto::ExpandVolumeRequest, expand_volume),
                8 => serve!(service, body, proto::CreateSnapshotRequest, create_snapshot),
                9 => serve!(service, body, proto::DeleteSnapshotRequest, delete_snapshot),
                10 => serve!(service, body, proto::ListSnapshotsRequest, list_snapshots),
                11 => serve!(service, body, proto::SnapshotRangesRequest, snapshot_ranges),
                _ => {
                    if let Ok(m) = proto::ReadSnapshotBlocksRequest::decode(body) {
                        if let Ok(stream) = service.read_snapshot_blocks(Request::new(m)).await {
                            let mut stream = stream.into_inner();
                            for _ in 0..STREAM_ITEMS {
                                if stream.next().await.is_none() {
                                    break;
                                }
                            }
                        }
                    }
                }
            }
        }
    });
    drop(service);
    // What the requests left must still load.
    drop(open(dir.path()));
});
