//! A tiny HTTP/1.1 server for `GET /healthz` and `GET /metrics`.
//!
//! Kubernetes probes and Prometheus scrapes need nothing more than one request per
//! connection, so this is hand-rolled over a tokio `TcpListener` instead of pulling in
//! an HTTP framework: it reads one request head (at most [`MAX_HEAD`] bytes, within
//! [`REQUEST_TIMEOUT`]), answers, and closes. At most [`MAX_CONNECTIONS`] are served
//! at once; more are closed unanswered so a flood cannot exhaust the daemon.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// Largest request head accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client gets to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served concurrently.
pub const MAX_CONNECTIONS: usize = 32;

/// What the endpoints report; implemented by the daemon's services.
pub trait Probe: Send + Sync + 'static {
    /// `Ok` when the daemon can serve; the error text is returned with a 503.
    fn healthy(&self) -> Result<(), String>;
    /// Prometheus text exposition (format 0.0.4) of every metric.
    fn metrics(&self) -> String;
}

/// Serves `/healthz` and `/metrics` on an already-bound listener until `shutdown`
/// completes. Returns an error only if accepting fails persistently.
pub async fn serve<P, F>(listener: TcpListener, probe: Arc<P>, shutdown: F) -> io::Result<()>
where
    P: Probe,
    F: Future<Output = ()>,
{
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if is_transient(&e) => {
                    warn!(error = %e, "metrics listener accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(e),
            },
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            debug!(%peer, "too many metrics connections; closing");
            continue;
        };
        let probe = Arc::clone(&probe);
        tokio::spawn(async move {
            if let Err(e) = handle(stream, probe.as_ref()).await {
                debug!(%peer, error = %e, "metrics connection failed");
            }
            drop(permit);
        });
    }
}

/// Accept errors that say nothing about the listener itself (a peer that went away,
/// fd exhaustion that may pass).
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    ) || e.kind() == io::ErrorKind::ConnectionAborted
}

async fn handle<P: Probe + ?Sized>(mut stream: TcpStream, probe: &P) -> io::Result<()> {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "request timed out")),
    };
    let (status, content_type, body) = match parse_request_line(&head) {
        None => ("400 Bad Request", "text/plain", "bad request\n".to_string()),
        Some((method, _)) if method != "GET" && method != "HEAD" => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET is supported\n".to_string(),
        ),
        Some((_, "/healthz")) => match probe.healthy() {
            Ok(()) => ("200 OK", "text/plain", "ok\n".to_string()),
            Err(why) => (
                "503 Service Unavailable",
                "text/plain",
                format!("unhealthy: {why}\n"),
            ),
        },
        Some((_, "/metrics")) => ("200 OK", "text/plain; version=0.0.4", probe.metrics()),
        Some(_) => ("404 Not Found", "text/plain", "not found\n".to_string()),
    };
    let is_head = parse_request_line(&head).is_some_and(|(m, _)| m == "HEAD");
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !is_head {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads until the end of the request head, or fails if it exceeds [`MAX_HEAD`].
async fn read_head(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the request head ended",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Ok(buf);
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
}

/// Returns (method, path without query) of a request head.
fn parse_request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line_end = head.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?.trim_end();
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target);
    Some((method, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Fake {
        healthy: AtomicBool,
    }

    impl Probe for Fake {
        fn healthy(&self) -> Result<(), String> {
            if self.healthy.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("disk gone".into())
            }
        }
        fn metrics(&self) -> String {
            "fake_metric 1\n".into()
        }
    }

    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_health_and_metrics() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let probe = Arc::new(Fake {
            healthy: AtomicBool::new(true),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Arc::clone(&probe), async {
            let _ = stopped.await;
        }));

        let r = get(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nok\n"), "{r}");

        let r = get(addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
        assert!(r.ends_with("fake_metric 1\n"), "{r}");

        probe.healthy.store(false, Ordering::SeqCst);
        let r = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains("disk gone"), "{r}");

        assert!(get(addr, "GET /nope HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404"));
        assert!(get(addr, "POST /metrics HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 405"));
        assert!(get(addr, "garbage\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 400"));
        let r = get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("\r\n\r\n"),
            "{r}"
        );

        stop.send(()).expect("server still running");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server stops on shutdown")
            .expect("task")
            .expect("serve");
    }

    #[tokio::test]
    async fn oversized_head_is_dropped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let probe = Arc::new(Fake {
            healthy: AtomicBool::new(true),
        });
        let server = tokio::spawn(serve(listener, probe, std::future::pending()));
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let junk = vec![b'a'; MAX_HEAD + 2048];
        // The server may close while we are still writing; either way no response.
        let _ = s.write_all(&junk).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        assert!(out.is_empty(), "got a response to an oversized head");
        // Still serving afterwards.
        let r = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        server.abort();
    }
}
