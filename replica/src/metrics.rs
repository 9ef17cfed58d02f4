//! What the replica daemon's `/metrics` and `/healthz` report (every metric name
//! prefixed `tessera_replica_`), on `prometheus-client` and served by
//! `tessera_telemetry`.
//!
//! Counters that the daemon keeps anyway (scheduler statistics, copy progress, capacity)
//! are read at scrape time by collectors instead of being mirrored into gauges; what
//! only exists as a metric (control calls, data-plane latency) is registered once.
//!
//! Why these per-volume series: queued and in-flight show load, throttled time shows a
//! volume's own limits at work, deadline misses show the device (or its neighbours)
//! failing it, and the QoS gauges show what the scheduler enforces right now
//! (0 = unlimited), which is how a ControllerModifyVolume can be seen to have reached
//! this replica. The latency histograms (`tessera_replica_data_op_duration_seconds`,
//! per volume and op) time each data-plane request from its frame to its reply.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tessera_telemetry::exposition::{counters, gauge, gauges};
use tessera_telemetry::prometheus_client::collector::Collector;
use tessera_telemetry::prometheus_client::encoding::DescriptorEncoder;
use tessera_telemetry::prometheus_client::metrics::info::Info;
use tessera_telemetry::prometheus_client::registry::Registry;
use tessera_telemetry::{error_chain, GrpcRequests, HealthCheck, VolumeLatency};

use crate::catalog::{Catalog, VolumeIoReport};
use crate::copy::CopyManager;

/// The daemon's metrics: the registry `/metrics` renders, and the handles the data
/// plane observes through.
#[derive(Debug)]
pub struct DaemonMetrics {
    /// Everything `/metrics` shows.
    pub registry: Registry,
    /// Data-plane request latency per volume and op.
    pub data_latency: VolumeLatency,
}

impl DaemonMetrics {
    /// Registers the control calls counted in `control_requests`, the catalog's
    /// capacity and per-volume I/O, the copies of `copies` and the data-plane latency.
    pub fn new(
        catalog: Arc<Catalog>,
        node_id: &str,
        control_requests: &GrpcRequests,
        copies: Option<Arc<CopyManager>>,
    ) -> Self {
        let mut registry = Registry::default();
        registry.register(
            "tessera_replica_build",
            "Build version and node of this replica daemon.",
            Info::new([
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("node_id", node_id.to_owned()),
            ]),
        );
        control_requests.register(
            &mut registry,
            "tessera_replica_control_requests",
            "Control gRPC requests by method and status code.",
        );
        let data_latency = VolumeLatency::default();
        data_latency.register(
            &mut registry,
            "tessera_replica_data_op_duration_seconds",
            "Data-plane requests of a volume by op, from the request frame to its reply.",
        );
        registry.register_collector(Box::new(CatalogCollector(catalog)));
        if let Some(copies) = copies {
            registry.register_collector(Box::new(CopyCollector(copies)));
        }
        DaemonMetrics {
            registry,
            data_latency,
        }
    }
}

/// `/healthz` of the daemon: statvfs on the data directory, which fails when the
/// backing disk is gone.
#[derive(Clone)]
pub struct CatalogHealth(pub Arc<Catalog>);

impl HealthCheck for CatalogHealth {
    fn check(&self) -> Result<(), String> {
        self.0.capacity().map(|_| ()).map_err(|e| error_chain(&e))
    }
}

/// Capacity, allocation and per-volume I/O, read from the catalog per scrape.
struct CatalogCollector(Arc<Catalog>);

impl fmt::Debug for CatalogCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CatalogCollector")
    }
}

impl Collector for CatalogCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let catalog = &self.0;
        if let Ok(cap) = catalog.capacity() {
            let series: [(&str, &str, u64); 5] = [
                (
                    "tessera_replica_capacity_bytes",
                    "Bytes this daemon offers to volumes.",
                    cap.capacity_bytes,
                ),
                (
                    "tessera_replica_used_bytes",
                    "Sum of the sizes of the volumes stored here (thick accounting).",
                    cap.used_bytes,
                ),
                (
                    "tessera_replica_free_bytes",
                    "Bytes still available to new volumes.",
                    cap.free_bytes,
                ),
                (
                    "tessera_replica_volumes",
                    "Volumes stored on this daemon.",
                    u64::from(cap.volume_count),
                ),
                (
                    "tessera_replica_quarantined_volumes",
                    "Volumes skipped at start because their record is unreadable.",
                    u64::from(cap.quarantined_count),
                ),
            ];
            for (name, help, value) in series {
                gauge(&mut encoder, name, help, value)?;
            }
        }
        // Real use of the backing disk (thin), next to the thick figure above; it
        // stats every layer file, so it is computed per scrape, not kept.
        if let Ok(bytes) = catalog.allocated_bytes() {
            gauge(
                &mut encoder,
                "tessera_replica_allocated_bytes",
                "Disk space the volumes' block stores allocate (all layers).",
                bytes,
            )?;
        }
        encode_volume_io(catalog, &mut encoder)
    }
}

/// Per-volume QoS and I/O scheduler counters (only when the catalog schedules I/O).
fn encode_volume_io(catalog: &Catalog, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let Some(io) = catalog.io() else {
        return Ok(());
    };
    let scheduler = &io.scheduler;
    gauges(
        encoder,
        "tessera_replica_io_in_flight",
        "Requests in the I/O engine across all volumes.",
        [([("engine", scheduler.engine_name())], scheduler.in_flight())],
    )?;
    let reports = catalog.io_reports();
    let per_volume = |get: fn(&VolumeIoReport) -> u64| {
        reports
            .iter()
            .map(move |r| ([("volume_id", r.volume_id.as_str())], get(r)))
    };
    type Series = (&'static str, &'static str, fn(&VolumeIoReport) -> u64);
    let gauge_series: [Series; 6] = [
        (
            "tessera_replica_volume_io_queued",
            "Requests waiting in the volume's scheduler queues.",
            |r| r.stats.queued,
        ),
        (
            "tessera_replica_volume_io_in_flight",
            "Requests of the volume in the I/O engine.",
            |r| r.stats.in_flight,
        ),
        (
            "tessera_replica_volume_qos_max_iops",
            "IOPS limit in force (0 = unlimited).",
            |r| r.qos.max_iops.unwrap_or(0),
        ),
        (
            "tessera_replica_volume_qos_min_iops",
            "IOPS reservation in force (0 = none).",
            |r| r.qos.min_iops.unwrap_or(0),
        ),
        (
            "tessera_replica_volume_qos_max_bandwidth_bytes",
            "Bandwidth limit in force in bytes per second (0 = unlimited).",
            |r| r.qos.max_bandwidth.unwrap_or(0),
        ),
        (
            "tessera_replica_volume_qos_invalid",
            "1 when the record's QoS parameters are invalid and the volume runs unlimited.",
            |r| u64::from(r.qos_error.is_some()),
        ),
    ];
    for (name, help, get) in gauge_series {
        gauges(encoder, name, help, per_volume(get))?;
    }
    gauges(
        encoder,
        "tessera_replica_volume_qos_burst_seconds",
        "Burst allowance in force.",
        reports.iter().map(|r| {
            (
                [("volume_id", r.volume_id.as_str())],
                r.qos.burst_duration.as_secs_f64(),
            )
        }),
    )?;
    counters(
        encoder,
        "tessera_replica_volume_io_throttled_seconds",
        "Time the volume had queued requests its token buckets did not admit.",
        reports.iter().map(|r| {
            (
                [("volume_id", r.volume_id.as_str())],
                r.stats.throttled.as_secs_f64(),
            )
        }),
    )?;
    let counter_series: [Series; 5] = [
        (
            "tessera_replica_volume_io_deadline_misses",
            "Requests of the volume that completed after their class deadline.",
            |r| r.stats.deadline_misses,
        ),
        (
            "tessera_replica_volume_io_completed",
            "Requests of the volume completed successfully.",
            |r| r.stats.completed_ops,
        ),
        (
            "tessera_replica_volume_io_completed_bytes",
            "Bytes read or written by the volume's completed requests.",
            |r| r.stats.completed_bytes,
        ),
        (
            "tessera_replica_volume_io_failed",
            "Requests of the volume that failed.",
            |r| r.stats.failed_ops,
        ),
        (
            "tessera_replica_volume_io_cancelled",
            "Queued requests of the volume dropped before dispatch.",
            |r| r.stats.cancelled_ops,
        ),
    ];
    for (name, help, get) in counter_series {
        counters(encoder, name, help, per_volume(get))?;
    }
    Ok(())
}

/// Restore, clone and rebuild copies running on this daemon and their live progress.
struct CopyCollector(Arc<CopyManager>);

impl fmt::Debug for CopyCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CopyCollector")
    }
}

impl Collector for CopyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let running = self.0.running();
        gauge(
            &mut encoder,
            "tessera_replica_copies_active",
            "Restore, clone and rebuild copies running on this daemon.",
            running.len(),
        )?;
        let per_copy = |field: fn(&crate::copy::LiveProgress) -> &std::sync::atomic::AtomicU64| {
            running.iter().map(move |(id, p)| {
                (
                    [("volume_id", id.as_str())],
                    field(p).load(Ordering::Relaxed),
                )
            })
        };
        gauges(
            &mut encoder,
            "tessera_replica_copy_done_bytes",
            "Bytes of the source a running copy has merged and written.",
            per_copy(|p| &p.done),
        )?;
        gauges(
            &mut encoder,
            "tessera_replica_copy_total_bytes",
            "Bytes a running copy has to copy (the source size).",
            per_copy(|p| &p.total),
        )?;
        counters(
            &mut encoder,
            "tessera_replica_copy_retries",
            "Failed attempts of a running copy (holders unreachable, damage, ...).",
            per_copy(|p| &p.retries),
        )?;
        counters(
            &mut encoder,
            "tessera_replica_copy_fetched_bytes",
            "Bytes of block data a running copy fetched from holders and wrote \
             (over shared layers: only the blocks that differed).",
            per_copy(|p| &p.fetched),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::CatalogConfig;
    use crate::control_proto as proto;
    use crate::control_proto::replica_control_server::ReplicaControl;
    use crate::control_service::{ControlService, NodeInfo};
    use tessera_telemetry::exposition::render;
    use tonic::Request;

    #[tokio::test]
    async fn renders_capacity_calls_and_build_info() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let catalog = Arc::new(
            Catalog::open(CatalogConfig {
                data_dir: tmp.path().to_path_buf(),
                capacity_bytes: Some(1 << 30),
            })
            .expect("open"),
        );
        let svc = ControlService::new(
            Arc::clone(&catalog),
            NodeInfo {
                node_id: "n\"1".into(),
                ..NodeInfo::default()
            },
        );
        let create = |size| {
            Request::new(proto::CreateVolumeRequest {
                volume_id: "a".into(),
                name: "a".into(),
                size_bytes: size,
                replication_factor: 3,
                ..Default::default()
            })
        };
        svc.create_volume(create(4096)).await.expect("create");
        svc.create_volume(create(8192))
            .await
            .expect_err("other size");
        let metrics = DaemonMetrics::new(Arc::clone(&catalog), "n\"1", svc.requests(), None);
        let volume = metrics.data_latency.volume("a");
        volume.observe(
            tessera_telemetry::Op::Read,
            std::time::Duration::from_micros(70),
        );

        let page = render(&metrics.registry).expect("render");
        for line in [
            format!(
                "tessera_replica_build_info{{version=\"{}\",node_id=\"n\\\"1\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            ),
            "\ntessera_replica_volumes 1\n".to_owned(),
            "\ntessera_replica_capacity_bytes 1073741824\n".to_owned(),
            "# TYPE tessera_replica_allocated_bytes gauge\ntessera_replica_allocated_bytes ".to_owned(),
            "tessera_replica_control_requests_total{method=\"CreateVolume\",code=\"Ok\"} 1\n".to_owned(),
            "tessera_replica_control_requests_total{method=\"CreateVolume\",code=\"AlreadyExists\"} 1\n"
                .to_owned(),
            "tessera_replica_data_op_duration_seconds_count{volume_id=\"a\",op=\"read\"} 1\n"
                .to_owned(),
        ] {
            assert!(page.contains(&line), "{line:?} missing from\n{page}");
        }
        assert!(CatalogHealth(catalog).check().is_ok());
    }
}
