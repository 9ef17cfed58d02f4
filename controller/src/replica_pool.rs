//! Discovery and liveness of replica daemons, and deadline-bounded calls to them.
//!
//! Daemons come from a static address list (`--replicas`) and/or a DNS name
//! (`--replicas-dns`, a headless Service) re-resolved on every refresh. A refresh asks
//! every daemon for GetInfo; a daemon that answers is *live* and its info (node, zone,
//! data address, free bytes) feeds placement and capacity. Every RPC carries a
//! deadline, so a dead daemon costs a CSI call at most that long, never a hang.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use tessera_replica_protocol::control_proto::replica_control_client::ReplicaControlClient;
use tessera_replica_protocol::control_proto::{
    CreateSnapshotRequest, CreateVolumeRequest, DeleteSnapshotRequest, DeleteVolumeRequest,
    ExpandVolumeRequest, GetInfoRequest, GetVolumeRequest, ListSnapshotsRequest,
    ListVolumesRequest, RaiseEpochRequest, ReplicaInfo, ReplicaRef, SnapshotRangesRequest,
    SnapshotRangesResponse, SnapshotRecord, UpdateVolumeRequest, VolumeRecord,
};
use tessera_tls::Transport;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Default deadline of one replica RPC.
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of GetInfo, the liveness probe.
pub const INFO_TIMEOUT: Duration = Duration::from_secs(1);

/// Where daemons are found and how long a call may take.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// `host:port` control addresses given on the command line.
    pub static_addresses: Vec<String>,
    /// `name:port` resolved to one address per A/AAAA record.
    pub dns: Option<String>,
    /// Deadline of every replica RPC.
    pub rpc_timeout: Duration,
    /// How daemons are dialled, on the control port here and on the data plane by
    /// whoever asks [`ReplicaPool::transport`].
    pub transport: Transport,
}

/// What the controller knows about one daemon.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonStatus {
    /// Control address (`host:port`).
    pub address: String,
    /// Last successful GetInfo answer; `None` if it never answered.
    pub info: Option<ReplicaInfo>,
    /// Whether the last contact succeeded.
    pub live: bool,
    /// Why the last contact failed.
    pub last_error: Option<String>,
}

/// The set of known replica daemons.
#[derive(Debug)]
pub struct ReplicaPool {
    cfg: PoolConfig,
    daemons: RwLock<BTreeMap<String, DaemonStatus>>,
    channels: Mutex<HashMap<String, Channel>>,
    /// When a daemon last answered, by node id: what "lost for longer than the
    /// replacement delay" is measured against (a node's daemon may come back under
    /// another address, and a pod gone from DNS leaves `daemons`).
    node_last_seen: Mutex<HashMap<String, Instant>>,
    /// Stands in for the last sighting of a node never seen since this start: a
    /// controller that restarts waits a whole delay before it declares anyone lost.
    started: Instant,
}

fn normalise(addr: &str) -> String {
    let a = addr.trim();
    a.strip_prefix("http://")
        .unwrap_or(a)
        .trim_end_matches('/')
        .to_string()
}

impl ReplicaPool {
    /// A pool with the static addresses registered (not yet contacted).
    pub fn new(cfg: PoolConfig) -> Self {
        let mut daemons = BTreeMap::new();
        for a in cfg
            .static_addresses
            .iter()
            .map(|a| normalise(a))
            .filter(|a| !a.is_empty())
        {
            daemons.insert(
                a.clone(),
                DaemonStatus {
                    address: a,
                    info: None,
                    live: false,
                    last_error: None,
                },
            );
        }
        Self {
            cfg,
            daemons: RwLock::new(daemons),
            channels: Mutex::new(HashMap::new()),
            node_last_seen: Mutex::new(HashMap::new()),
            started: Instant::now(),
        }
    }

    /// Deadline applied to every replica RPC.
    pub fn rpc_timeout(&self) -> Duration {
        self.cfg.rpc_timeout
    }

    /// Re-resolves DNS and asks every daemon for GetInfo (in parallel).
    pub async fn refresh(&self) {
        if let Some(dns) = &self.cfg.dns {
            match tokio::time::timeout(self.cfg.rpc_timeout, tokio::net::lookup_host(dns.as_str()))
                .await
            {
                Ok(Ok(addrs)) => {
                    let found: BTreeSet<String> = addrs.map(|a| a.to_string()).collect();
                    let statics: BTreeSet<String> = self
                        .cfg
                        .static_addresses
                        .iter()
                        .map(|a| normalise(a))
                        .collect();
                    let mut d = self.write();
                    for a in &found {
                        d.entry(a.clone()).or_insert_with(|| DaemonStatus {
                            address: a.clone(),
                            info: None,
                            live: false,
                            last_error: None,
                        });
                    }
                    // Addresses gone from DNS and not answering belong to removed pods.
                    d.retain(|a, s| found.contains(a) || statics.contains(a) || s.live);
                }
                Ok(Err(e)) => {
                    tracing::warn!(name = %dns, error = %e, "resolving replica daemons failed")
                }
                Err(_) => tracing::warn!(name = %dns, "resolving replica daemons timed out"),
            }
        }
        self.refresh_infos().await;
    }

    /// Asks every known daemon for GetInfo (in parallel), without re-resolving DNS.
    pub async fn refresh_infos(&self) {
        // Liveness before the calls: `call` updates it as answers arrive, and the
        // transitions are what is logged.
        let (addrs, was_live): (Vec<String>, Vec<bool>) = self
            .read()
            .values()
            .map(|s| (s.address.clone(), s.live))
            .unzip();
        let calls = addrs.iter().map(|a| self.get_info(a));
        let results = join_all(calls).await;
        let now = Instant::now();
        {
            let mut seen = self
                .node_last_seen
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for info in results.iter().flatten() {
                seen.insert(info.node_id.clone(), now);
            }
        }
        let mut d = self.write();
        for ((a, r), was_live) in addrs.into_iter().zip(results).zip(was_live) {
            let Some(s) = d.get_mut(&a) else { continue };
            match r {
                Ok(info) => {
                    if !was_live {
                        tracing::info!(address = %a, node = %info.node_id, "replica daemon is live");
                    }
                    s.info = Some(info);
                    s.live = true;
                    s.last_error = None;
                }
                Err(e) => {
                    if was_live {
                        tracing::warn!(address = %a, error = %e.message(), "replica daemon stopped answering");
                    }
                    s.live = false;
                    s.last_error = Some(e.message().to_string());
                }
            }
        }
    }

    /// Refreshes every `interval` until `shutdown` completes.
    pub async fn run_refresher(&self, interval: Duration, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => self.refresh().await,
            }
        }
    }

    /// All known daemons, ordered by address.
    pub fn daemons(&self) -> Vec<DaemonStatus> {
        self.read().values().cloned().collect()
    }

    /// Live daemons with their info.
    pub fn live(&self) -> Vec<(String, ReplicaInfo)> {
        self.read()
            .values()
            .filter(|s| s.live)
            .filter_map(|s| s.info.clone().map(|i| (s.address.clone(), i)))
            .collect()
    }

    /// Node ids of every daemon that ever answered (live or not): nodes a volume may
    /// be published to.
    pub fn known_node_ids(&self) -> BTreeSet<String> {
        self.read()
            .values()
            .filter_map(|s| s.info.as_ref().map(|i| i.node_id.clone()))
            .collect()
    }

    /// The current version of a stored replica reference: a daemon keeps its node id
    /// when its pod restarts with a new IP, so when the recorded address is unknown but
    /// exactly one daemon runs on that node, its current addresses are used.
    pub fn resolve_ref(&self, r: &ReplicaRef) -> ReplicaRef {
        let d = self.read();
        if let Some(info) = d
            .get(&normalise(&r.control_address))
            .and_then(|s| s.info.as_ref())
        {
            if info.node_id == r.node_id {
                return ReplicaRef {
                    data_address: info.data_address.clone(),
                    ..r.clone()
                };
            }
        }
        let on_node: Vec<&DaemonStatus> = d
            .values()
            .filter(|s| s.info.as_ref().is_some_and(|i| i.node_id == r.node_id))
            .collect();
        match on_node.as_slice() {
            [only] => ReplicaRef {
                control_address: only.address.clone(),
                data_address: only
                    .info
                    .as_ref()
                    .map(|i| i.data_address.clone())
                    .unwrap_or_default(),
                ..r.clone()
            },
            _ => r.clone(),
        }
    }

    /// How long no daemon of `node_id` has answered; `None` while one is live. A node
    /// not seen since this controller started counts from the start.
    pub fn unreachable_for(&self, node_id: &str) -> Option<Duration> {
        let live = self
            .read()
            .values()
            .any(|s| s.live && s.info.as_ref().is_some_and(|i| i.node_id == node_id));
        if live {
            return None;
        }
        let seen = self
            .node_last_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Some(seen.get(node_id).copied().unwrap_or(self.started).elapsed())
    }

    /// Whether replica `r`'s node has been unreachable for longer than `delay`.
    pub fn is_lost(&self, r: &ReplicaRef, delay: Duration) -> bool {
        self.unreachable_for(&r.node_id).is_some_and(|d| d > delay)
    }

    /// Whether the daemon holding replica `r` answered its last contact.
    pub fn is_live(&self, r: &ReplicaRef) -> bool {
        let addr = normalise(&self.resolve_ref(r).control_address);
        self.read().get(&addr).is_some_and(|s| s.live)
    }

    /// GetInfo of one daemon.
    ///
    /// Bounded by [`INFO_TIMEOUT`] (or the RPC deadline if shorter): GetInfo is
    /// trivial, and placement refreshes infos on every CreateVolume, so an unreachable
    /// daemon must not cost each create the full RPC deadline.
    pub async fn get_info(&self, address: &str) -> Result<ReplicaInfo, Status> {
        let timeout = self.cfg.rpc_timeout.min(INFO_TIMEOUT);
        self.call_within(address, timeout, |mut c| async move {
            c.get_info(GetInfoRequest {}).await
        })
        .await
    }

    /// CreateVolume on one daemon.
    pub async fn create_volume(
        &self,
        address: &str,
        req: CreateVolumeRequest,
    ) -> Result<VolumeRecord, Status> {
        self.call(address, |mut c| async move { c.create_volume(req).await })
            .await
    }

    /// DeleteVolume on one daemon; returns whether the replica existed.
    pub async fn delete_volume(&self, address: &str, volume_id: &str) -> Result<bool, Status> {
        let req = DeleteVolumeRequest {
            volume_id: volume_id.to_string(),
        };
        self.call(address, |mut c| async move { c.delete_volume(req).await })
            .await
            .map(|r| r.existed)
    }

    /// GetVolume on one daemon.
    pub async fn get_volume(&self, address: &str, volume_id: &str) -> Result<VolumeRecord, Status> {
        let req = GetVolumeRequest {
            volume_id: volume_id.to_string(),
        };
        self.call(address, |mut c| async move { c.get_volume(req).await })
            .await
    }

    /// ListVolumes on one daemon.
    pub async fn list_volumes(&self, address: &str) -> Result<Vec<VolumeRecord>, Status> {
        self.call(address, |mut c| async move {
            c.list_volumes(ListVolumesRequest {}).await
        })
        .await
        .map(|r| r.volumes)
    }

    /// UpdateVolume (compare-and-set on generation) on one daemon.
    pub async fn update_volume(
        &self,
        address: &str,
        req: UpdateVolumeRequest,
    ) -> Result<VolumeRecord, Status> {
        self.call(address, |mut c| async move { c.update_volume(req).await })
            .await
    }

    /// ExpandVolume (compare-and-set on generation) on one daemon.
    pub async fn expand_volume(
        &self,
        address: &str,
        req: ExpandVolumeRequest,
    ) -> Result<VolumeRecord, Status> {
        self.call(address, |mut c| async move { c.expand_volume(req).await })
            .await
    }

    /// CreateSnapshot (seal the head under the id) on one daemon.
    pub async fn create_snapshot(
        &self,
        address: &str,
        req: CreateSnapshotRequest,
    ) -> Result<SnapshotRecord, Status> {
        self.call(address, |mut c| async move { c.create_snapshot(req).await })
            .await
    }

    /// DeleteSnapshot on one daemon; returns whether it existed there.
    pub async fn delete_snapshot(
        &self,
        address: &str,
        req: DeleteSnapshotRequest,
    ) -> Result<bool, Status> {
        self.call(address, |mut c| async move { c.delete_snapshot(req).await })
            .await
            .map(|r| r.existed)
    }

    /// Every snapshot one daemon holds.
    pub async fn list_snapshots(&self, address: &str) -> Result<Vec<SnapshotRecord>, Status> {
        self.call(address, |mut c| async move {
            c.list_snapshots(ListSnapshotsRequest {}).await
        })
        .await
        .map(|r| r.snapshots)
    }

    /// SnapshotRanges on one daemon: allocated ranges of its sealed copy of a snapshot,
    /// or the ranges changed since an older one.
    pub async fn snapshot_ranges(
        &self,
        address: &str,
        req: SnapshotRangesRequest,
    ) -> Result<SnapshotRangesResponse, Status> {
        self.call(address, |mut c| async move { c.snapshot_ranges(req).await })
            .await
    }

    /// RaiseEpoch (compare-and-set on epoch) on one daemon; returns the new epoch.
    pub async fn raise_epoch(&self, address: &str, req: RaiseEpochRequest) -> Result<u64, Status> {
        self.call(address, |mut c| async move { c.raise_epoch(req).await })
            .await
            .map(|r| r.epoch)
    }

    /// Runs one RPC against `address` under the pool's deadline, and records liveness
    /// when the transport fails.
    async fn call<T, F, Fut>(&self, address: &str, f: F) -> Result<T, Status>
    where
        F: FnOnce(ReplicaControlClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_within(address, self.cfg.rpc_timeout, f).await
    }

    async fn call_within<T, F, Fut>(
        &self,
        address: &str,
        timeout: Duration,
        f: F,
    ) -> Result<T, Status>
    where
        F: FnOnce(ReplicaControlClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let address = normalise(address);
        let channel = self.channel(&address)?;
        let result =
            match tokio::time::timeout(timeout, f(ReplicaControlClient::new(channel))).await {
                Ok(r) => r.map(tonic::Response::into_inner),
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "replica daemon {address} did not answer within {timeout:?}"
                ))),
            };
        // Only transport failures say something about the daemon's health; an
        // application error (NOT_FOUND, ABORTED, ...) comes from a live daemon, and so
        // may a missed deadline: a snapshot deletion's merge can outlast any deadline.
        // Marking every daemon down after such calls made snapshot listings come back
        // empty (DeleteSnapshot "succeeded", restores said NOT_FOUND). A daemon that
        // really hangs is found by the liveness probe, whose own deadline counts.
        let transport_failure = result
            .as_ref()
            .err()
            .filter(|e| matches!(e.code(), Code::Unavailable | Code::Cancelled));
        if let Some(s) = self.write().get_mut(&address) {
            match transport_failure {
                Some(e) => {
                    s.live = false;
                    s.last_error = Some(e.message().to_string());
                }
                None if s.info.is_some() => s.live = true,
                None => {}
            }
        }
        result
    }

    /// How daemons are dialled (for data-plane clients the controller opens).
    pub fn transport(&self) -> &Transport {
        &self.cfg.transport
    }

    fn channel(&self, address: &str) -> Result<Channel, Status> {
        let mut ch = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = ch.get(address) {
            return Ok(c.clone());
        }
        let endpoint = tessera_tls::grpc::endpoint(address)
            .map_err(|e| {
                Status::unavailable(format!("invalid replica daemon address {address:?}: {e}"))
            })?
            .connect_timeout(self.cfg.rpc_timeout);
        let c = tessera_tls::grpc::lazy_channel(&endpoint, &self.cfg.transport);
        ch.insert(address.to_string(), c.clone());
        Ok(c)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, DaemonStatus>> {
        // Every mutation is a whole-field assignment, so a poisoned map is consistent.
        self.daemons.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, DaemonStatus>> {
        self.daemons.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Awaits all futures concurrently (on this task) and returns their outputs in order.
pub async fn join_all<F: Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn join_all_keeps_order() {
        let futs = (0..5u64).map(|i| async move {
            for _ in 0..(5 - i) {
                tokio::task::yield_now().await;
            }
            i
        });
        assert_eq!(join_all(futs).await, vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn unreachable_daemon_fails_within_deadline_and_is_not_live() {
        // Port 9 on localhost: nothing listens, the connect is refused.
        let pool = ReplicaPool::new(PoolConfig {
            static_addresses: vec!["127.0.0.1:9".into(), "http://127.0.0.1:9/".into()],
            dns: None,
            rpc_timeout: Duration::from_millis(500),
            transport: tessera_tls::Transport::plaintext(),
        });
        assert_eq!(pool.daemons().len(), 1, "addresses are normalised");
        pool.refresh().await;
        assert!(pool.live().is_empty());
        let d = &pool.daemons()[0];
        assert!(!d.live && d.last_error.is_some());
        assert!(pool.get_volume("127.0.0.1:9", "tv-x").await.is_err());
    }

    #[tokio::test]
    async fn a_silent_daemon_costs_at_most_the_deadline() {
        // The kernel accepts the TCP connection into the backlog, nobody ever answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let pool = ReplicaPool::new(PoolConfig {
            static_addresses: vec![addr.clone()],
            dns: None,
            rpc_timeout: Duration::from_millis(300),
            transport: tessera_tls::Transport::plaintext(),
        });
        let start = std::time::Instant::now();
        let err = pool.get_volume(&addr, "tv-x").await.unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
        pool.refresh().await;
        assert!(pool.live().is_empty());
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "took {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn resolve_ref_follows_the_node() {
        let pool = ReplicaPool::new(PoolConfig {
            static_addresses: vec!["10.0.0.9:7000".into()],
            dns: None,
            rpc_timeout: DEFAULT_RPC_TIMEOUT,
            transport: tessera_tls::Transport::plaintext(),
        });
        {
            let mut d = pool.write();
            let s = d.get_mut("10.0.0.9:7000").unwrap();
            s.info = Some(ReplicaInfo {
                node_id: "n1".into(),
                data_address: "10.0.0.9:7001".into(),
                ..Default::default()
            });
            s.live = true;
        }
        let old = ReplicaRef {
            node_id: "n1".into(),
            zone: "".into(),
            control_address: "10.0.0.1:7000".into(),
            data_address: "10.0.0.1:7001".into(),
        };
        let cur = pool.resolve_ref(&old);
        assert_eq!(cur.control_address, "10.0.0.9:7000");
        assert_eq!(cur.data_address, "10.0.0.9:7001");
        assert!(pool.is_live(&old));
        let other = ReplicaRef {
            node_id: "n2".into(),
            ..old.clone()
        };
        assert_eq!(pool.resolve_ref(&other), other);
        assert!(!pool.is_live(&other));
        assert_eq!(pool.known_node_ids(), ["n1".to_string()].into());
    }
}
