//! What every Tessera process shares to be observed: the `/healthz` + `/metrics` HTTP
//! server ([`http`]); Prometheus metrics on `prometheus-client` ([`exposition`] renders a
//! registry and helps per-scrape collectors, [`grpc`] counts calls by method and status
//! code, [`latency`] keeps per-volume operation latency); the one tracing setup
//! ([`logging`]); and the one way to print an error with its causes ([`error_chain`]).
//!
//! This crate depends on no other Tessera crate, so the replica daemon, the controller,
//! the node plugin and the engine-host can all use it.

mod chain;
pub mod exposition;
pub mod grpc;
pub mod http;
pub mod latency;
pub mod logging;

pub use chain::error_chain;
pub use grpc::GrpcRequests;
pub use http::{
    serve, serve_with_limits, AlwaysHealthy, Endpoints, HealthCheck, Limits, ServeError,
};
pub use latency::{Op, VolumeLatency, VolumeOpHistograms};
pub use logging::{init_tracing, LogFormat};
/// The metrics library every Tessera crate registers with (one version for all).
pub use prometheus_client;
