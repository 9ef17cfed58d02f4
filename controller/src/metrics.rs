//! Prometheus metrics of the controller and the tiny HTTP server for `/metrics` and
//! `/healthz`.
//!
//! The server is hand-rolled over tokio (one request per connection, GET only): the
//! controller serves two fixed documents and a full HTTP stack is not worth its weight.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;

use crate::replica_pool::ReplicaPool;
use crate::volume_index::VolumeIndex;

/// Counters of the controller (all names prefixed `tessera_controller_`).
#[derive(Debug, Default)]
pub struct Metrics {
    rpcs: Mutex<BTreeMap<(&'static str, i32), u64>>,
}

impl Metrics {
    /// Counts one finished CSI call.
    pub fn observe_rpc(&self, method: &'static str, code: Code) {
        let mut m = self.rpcs.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((method, code as i32)).or_default() += 1;
    }

    /// The Prometheus text exposition of the counters plus gauges read from `pool` and
    /// `index`.
    pub fn render(&self, pool: &ReplicaPool, index: &VolumeIndex) -> String {
        let mut out = String::new();
        out.push_str("# HELP tessera_controller_csi_requests_total CSI calls answered, by method and gRPC code.\n");
        out.push_str("# TYPE tessera_controller_csi_requests_total counter\n");
        for ((method, code), n) in self.rpcs.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let code = format!("{:?}", Code::from_i32(*code));
            let _ = writeln!(
                out,
                "tessera_controller_csi_requests_total{{method=\"{method}\",code=\"{code}\"}} {n}"
            );
        }
        let daemons = pool.daemons();
        let live = daemons.iter().filter(|d| d.live).count();
        out.push_str(
            "# HELP tessera_controller_replica_daemons Known replica daemons, by liveness.\n",
        );
        out.push_str("# TYPE tessera_controller_replica_daemons gauge\n");
        let _ = writeln!(
            out,
            "tessera_controller_replica_daemons{{state=\"live\"}} {live}"
        );
        let _ = writeln!(
            out,
            "tessera_controller_replica_daemons{{state=\"down\"}} {}",
            daemons.len() - live
        );
        out.push_str("# HELP tessera_controller_replica_free_bytes Free bytes reported by each live replica daemon.\n");
        out.push_str("# TYPE tessera_controller_replica_free_bytes gauge\n");
        for d in daemons.iter().filter(|d| d.live) {
            if let Some(i) = &d.info {
                let _ = writeln!(
                    out,
                    "tessera_controller_replica_free_bytes{{node=\"{}\",address=\"{}\"}} {}",
                    escape(&i.node_id),
                    escape(&d.address),
                    i.free_bytes
                );
            }
        }
        out.push_str("# HELP tessera_controller_volumes Volumes in the controller's index.\n");
        out.push_str("# TYPE tessera_controller_volumes gauge\n");
        let _ = writeln!(out, "tessera_controller_volumes {}", index.len());
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` (the output of `metrics`) and `GET /healthz` on `listener`
/// until `shutdown` completes.
pub async fn serve_http<F>(listener: TcpListener, metrics: F, shutdown: impl Future<Output = ()>)
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let metrics = Arc::new(metrics);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, move || metrics()).await {
                            tracing::debug!(error = %e, "metrics connection failed");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "accepting a metrics connection failed"),
            },
        }
    }
}

async fn handle(mut stream: TcpStream, metrics: impl FnOnce() -> String) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // Read the request head (bounded in size and time); the body, if any, is ignored.
    let read_head = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(Duration::from_secs(5), read_head)
        .await
        .is_err()
    {
        return Ok(());
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics()),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_string(),
        ),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_healthz_and_metrics() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Arc::new(Metrics::default());
        m.observe_rpc("CreateVolume", Code::Ok);
        m.observe_rpc("CreateVolume", Code::Ok);
        let pool = Arc::new(ReplicaPool::new(crate::replica_pool::PoolConfig {
            static_addresses: vec![],
            dns: None,
            rpc_timeout: Duration::from_secs(1),
        }));
        let index = Arc::new(VolumeIndex::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let m2 = m.clone();
        let server = tokio::spawn(serve_http(
            listener,
            move || m2.render(&pool, &index),
            async {
                let _ = rx.await;
            },
        ));
        let h = get(addr, "/healthz").await;
        assert!(
            h.starts_with("HTTP/1.1 200 OK") && h.ends_with("ok\n"),
            "{h}"
        );
        let body = get(addr, "/metrics").await;
        assert!(
            body.contains(
                "tessera_controller_csi_requests_total{method=\"CreateVolume\",code=\"Ok\"} 2"
            ),
            "{body}"
        );
        assert!(body.contains("tessera_controller_volumes 0"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        tx.send(()).unwrap();
        server.await.unwrap();
    }
}
