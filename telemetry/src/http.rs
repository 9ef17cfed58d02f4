//! The `/healthz` and `/metrics` HTTP server of every Tessera process, on hyper.
//!
//! Kubernetes probes and Prometheus scrapes send one small GET at a time, so this serves
//! HTTP/1.1 with one request per connection (every answer says `Connection: close`). A
//! client gets [`REQUEST_TIMEOUT`] for its whole exchange, a request head may be at most
//! [`MAX_HEAD`] bytes, and at most [`MAX_CONNECTIONS`] connections are served at once
//! (defaults, see [`Limits`]): more are closed unanswered, so a flood cannot exhaust the
//! process it observes.
//!
//! * `GET /healthz`: 200 `ok`, or 503 with the reason the [`HealthCheck`] gave.
//! * `GET /metrics`: the registry in the Prometheus text format (0.0.4).
//! * other paths 404, other methods 405 (`HEAD` is answered like `GET`, without body).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::exposition;

/// Time a client gets for its whole exchange: sending the request and reading the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read (hyper's smallest buffer limit).
pub const MAX_HEAD: usize = 8 * 1024;
/// Connections served concurrently.
pub const MAX_CONNECTIONS: usize = 32;

/// What `/healthz` reports.
pub trait HealthCheck: Send + Sync + 'static {
    /// `Ok` when the process can do its job; otherwise why not (sent with a 503).
    fn check(&self) -> Result<(), String>;
}

/// A process that is healthy whenever it answers at all.
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysHealthy;

impl HealthCheck for AlwaysHealthy {
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// What the server answers with: a health check and a metrics registry.
#[derive(Clone)]
pub struct Endpoints {
    health: Arc<dyn HealthCheck>,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints").finish_non_exhaustive()
    }
}

impl Endpoints {
    /// `/healthz` asks `health`; `/metrics` renders `registry` (its collectors run per
    /// scrape).
    pub fn new(health: Arc<dyn HealthCheck>, registry: Arc<Registry>) -> Self {
        Endpoints { health, registry }
    }

    /// The answer to one request. Health checks and collectors may touch the disk
    /// (statvfs, file sizes), so they run on the blocking pool.
    async fn answer(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match request.uri().path() {
            "/healthz" => {
                let health = Arc::clone(&self.health);
                match tokio::task::spawn_blocking(move || health.check()).await {
                    Ok(Ok(())) => text(StatusCode::OK, "ok\n"),
                    Ok(Err(why)) => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("unhealthy: {why}\n"),
                    ),
                    Err(e) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("health check failed: {e}\n"),
                    ),
                }
            }
            "/metrics" => {
                let registry = Arc::clone(&self.registry);
                match tokio::task::spawn_blocking(move || exposition::render(&registry)).await {
                    Ok(Ok(page)) => {
                        let mut response = Response::new(Full::new(Bytes::from(page)));
                        response.headers_mut().insert(
                            CONTENT_TYPE,
                            HeaderValue::from_static(exposition::CONTENT_TYPE),
                        );
                        response
                    }
                    Ok(Err(e)) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("encoding the metrics failed: {e}\n"),
                    ),
                    Err(e) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("collecting the metrics failed: {e}\n"),
                    ),
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Why [`serve`] stopped before its shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listener itself failed (not one connection).
    #[error("accepting a health/metrics connection: {0}")]
    Accept(#[source] io::Error),
}

/// The protections of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time a client gets for its whole exchange.
    pub request_timeout: Duration,
    /// Connections served at once; more are closed unanswered.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_timeout: REQUEST_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// Serves [`Endpoints`] on an already-bound listener until `shutdown` completes, with
/// the default [`Limits`]. Connections being answered then finish on their own (within
/// the request timeout).
pub async fn serve<F>(
    listener: TcpListener,
    endpoints: Endpoints,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()>,
{
    serve_with_limits(listener, endpoints, Limits::default(), shutdown).await
}

/// [`serve`] with other [`Limits`].
pub async fn serve_with_limits<F>(
    listener: TcpListener,
    endpoints: Endpoints,
    limits: Limits,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()>,
{
    let limit = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if is_transient(&e) => {
                    warn!(error = %e, "health/metrics listener accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(ServeError::Accept(e)),
            },
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            debug!(%peer, "too many health/metrics connections; closing");
            continue;
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let endpoints = endpoints.clone();
                async move { Ok::<_, Infallible>(endpoints.answer(&request).await) }
            });
            let connection = http1::Builder::new()
                .keep_alive(false)
                .max_buf_size(MAX_HEAD)
                .timer(TokioTimer::new())
                .header_read_timeout(limits.request_timeout)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(limits.request_timeout, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "health/metrics connection failed"),
                Err(_) => debug!(%peer, "health/metrics connection timed out"),
            }
            drop(permit);
        });
    }
}

/// Accept errors that say nothing about the listener itself (a peer that went away,
/// descriptor or memory exhaustion that may pass).
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    ) || e.kind() == io::ErrorKind::ConnectionAborted
}
