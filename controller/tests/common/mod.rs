//! An in-memory replica daemon speaking the control API, for testing the controller
//! against the contract of `replica/proto/replica_control.proto` without the real
//! daemon, plus a helper building a controller over several of them.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_controller::metrics::Metrics;
use tessera_controller::{
    load_index, ControllerConfig, ControllerService, PoolConfig, ReplicaPool,
};
use tessera_replica::control_proto::replica_control_server::{
    ReplicaControl, ReplicaControlServer,
};
use tessera_replica::control_proto::*;
use tonic::{Request, Response, Status};

/// State of one fake daemon, shared with the test.
#[derive(Debug)]
pub struct FakeState {
    pub info: ReplicaInfo,
    pub volumes: BTreeMap<String, VolumeRecord>,
    /// When set, every RPC fails with UNAVAILABLE (a dead daemon).
    pub down: bool,
}

#[derive(Clone)]
struct Fake(Arc<Mutex<FakeState>>);

impl Fake {
    fn state(&self) -> Result<std::sync::MutexGuard<'_, FakeState>, Status> {
        let s = self.0.lock().map_err(|_| Status::internal("poisoned"))?;
        if s.down {
            return Err(Status::unavailable("daemon is down"));
        }
        Ok(s)
    }
}

fn used(s: &FakeState) -> u64 {
    s.volumes.values().map(|v| v.size_bytes).sum()
}

#[tonic::async_trait]
impl ReplicaControl for Fake {
    async fn get_info(&self, _: Request<GetInfoRequest>) -> Result<Response<ReplicaInfo>, Status> {
        let s = self.state()?;
        let mut info = s.info.clone();
        info.free_bytes = info.capacity_bytes.saturating_sub(used(&s));
        info.volume_count = s.volumes.len() as u32;
        Ok(Response::new(info))
    }

    async fn create_volume(
        &self,
        r: Request<CreateVolumeRequest>,
    ) -> Result<Response<VolumeRecord>, Status> {
        let r = r.into_inner();
        let mut s = self.state()?;
        if let Some(v) = s.volumes.get(&r.volume_id) {
            if v.size_bytes != r.size_bytes {
                return Err(Status::already_exists("different size"));
            }
            return Ok(Response::new(v.clone()));
        }
        if s.info.capacity_bytes.saturating_sub(used(&s)) < r.size_bytes {
            return Err(Status::resource_exhausted("no space"));
        }
        let rec = VolumeRecord {
            volume_id: r.volume_id.clone(),
            name: r.name,
            size_bytes: r.size_bytes,
            replication_factor: r.replication_factor,
            replicas: r.replicas,
            parameters: r.parameters,
            epoch: 0,
            generation: 1,
            created_unix_nanos: r.created_unix_nanos,
            attachments: vec![],
            access_type: r.access_type,
        };
        s.volumes.insert(r.volume_id, rec.clone());
        Ok(Response::new(rec))
    }

    async fn delete_volume(
        &self,
        r: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let mut s = self.state()?;
        let existed = s.volumes.remove(&r.into_inner().volume_id).is_some();
        Ok(Response::new(DeleteVolumeResponse { existed }))
    }

    async fn get_volume(
        &self,
        r: Request<GetVolumeRequest>,
    ) -> Result<Response<VolumeRecord>, Status> {
        let s = self.state()?;
        s.volumes
            .get(&r.into_inner().volume_id)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found("no such volume"))
    }

    async fn list_volumes(
        &self,
        _: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let s = self.state()?;
        Ok(Response::new(ListVolumesResponse {
            volumes: s.volumes.values().cloned().collect(),
        }))
    }

    async fn update_volume(
        &self,
        r: Request<UpdateVolumeRequest>,
    ) -> Result<Response<VolumeRecord>, Status> {
        let r = r.into_inner();
        let mut s = self.state()?;
        let v = s
            .volumes
            .get_mut(&r.volume_id)
            .ok_or_else(|| Status::not_found("no such volume"))?;
        if v.generation != r.expected_generation {
            return Err(Status::aborted(format!("generation is {}", v.generation)));
        }
        v.attachments = r.attachments;
        v.parameters = r.parameters;
        v.generation += 1;
        Ok(Response::new(v.clone()))
    }

    async fn raise_epoch(
        &self,
        r: Request<RaiseEpochRequest>,
    ) -> Result<Response<RaiseEpochResponse>, Status> {
        let r = r.into_inner();
        let mut s = self.state()?;
        let v = s
            .volumes
            .get_mut(&r.volume_id)
            .ok_or_else(|| Status::not_found("no such volume"))?;
        if v.epoch != r.expected_epoch || r.new_epoch <= r.expected_epoch {
            return Err(Status::aborted(format!("epoch is {}", v.epoch)));
        }
        v.epoch = r.new_epoch;
        Ok(Response::new(RaiseEpochResponse { epoch: v.epoch }))
    }
}

/// A running fake daemon.
pub struct FakeDaemon {
    pub address: String,
    pub state: Arc<Mutex<FakeState>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl FakeDaemon {
    pub async fn start(node_id: &str, zone: &str, capacity: u64) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let state = Arc::new(Mutex::new(FakeState {
            info: ReplicaInfo {
                node_id: node_id.into(),
                zone: zone.into(),
                data_address: format!("data-{node_id}:7001"),
                capacity_bytes: capacity,
                free_bytes: capacity,
                volume_count: 0,
                version: "fake".into(),
            },
            volumes: BTreeMap::new(),
            down: false,
        }));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let svc = ReplicaControlServer::new(Fake(state.clone()));
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = rx.await;
                    },
                )
                .await;
        });
        Self {
            address,
            state,
            _stop: tx,
        }
    }

    pub fn set_down(&self, down: bool) {
        self.state.lock().expect("lock").down = down;
    }

    pub fn volume(&self, id: &str) -> Option<VolumeRecord> {
        self.state.lock().expect("lock").volumes.get(id).cloned()
    }

    pub fn volume_count(&self) -> usize {
        self.state.lock().expect("lock").volumes.len()
    }
}

/// Fake daemons plus a controller over them.
pub struct Cluster {
    pub daemons: Vec<FakeDaemon>,
    pub controller: ControllerService,
    pub pool: Arc<ReplicaPool>,
}

pub const GIB: u64 = 1 << 30;

impl Cluster {
    /// `nodes`: (node_id, zone, capacity) per daemon.
    pub async fn start(nodes: &[(&str, &str, u64)], extra_nodes: &[&str]) -> Self {
        let mut daemons = Vec::new();
        for (n, z, c) in nodes {
            daemons.push(FakeDaemon::start(n, z, *c).await);
        }
        let (controller, pool) = controller_over(&daemons, extra_nodes).await;
        Self {
            daemons,
            controller,
            pool,
        }
    }

    /// A new controller over the same daemons (a controller restart).
    pub async fn restart_controller(&mut self) {
        let (controller, pool) = controller_over(&self.daemons, &[]).await;
        self.controller = controller;
        self.pool = pool;
    }

    pub fn daemon(&self, node: &str) -> &FakeDaemon {
        self.daemons
            .iter()
            .find(|d| d.state.lock().expect("lock").info.node_id == node)
            .expect("no such node")
    }
}

async fn controller_over(
    daemons: &[FakeDaemon],
    extra_nodes: &[&str],
) -> (ControllerService, Arc<ReplicaPool>) {
    let pool = Arc::new(ReplicaPool::new(PoolConfig {
        static_addresses: daemons.iter().map(|d| d.address.clone()).collect(),
        dns: None,
        rpc_timeout: Duration::from_secs(2),
    }));
    pool.refresh().await;
    let (index, _) = load_index(&pool).await;
    let cfg = ControllerConfig {
        extra_nodes: extra_nodes
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>(),
    };
    (
        ControllerService::new(
            pool.clone(),
            Arc::new(index),
            cfg,
            Arc::new(Metrics::default()),
        ),
        pool,
    )
}
