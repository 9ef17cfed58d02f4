//! The health/metrics server answering real HTTP requests over TCP.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tessera_telemetry::prometheus_client::metrics::counter::Counter;
use tessera_telemetry::prometheus_client::registry::Registry;
use tessera_telemetry::{serve, serve_with_limits, Endpoints, HealthCheck, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Bound on every wait in these tests, so a hang fails instead of blocking the run.
const WAIT: Duration = Duration::from_secs(10);

struct Switch(AtomicBool);

impl HealthCheck for Switch {
    fn check(&self) -> Result<(), String> {
        if self.0.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("disk gone".to_owned())
        }
    }
}

struct Server {
    addr: SocketAddr,
    health: Arc<Switch>,
    requests: Counter,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tessera_telemetry::ServeError>>,
}

async fn start(limits: Option<Limits>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let mut registry = Registry::default();
    let requests: Counter = Counter::default();
    registry.register("t_requests", "Requests served.", requests.clone());
    let health = Arc::new(Switch(AtomicBool::new(true)));
    let endpoints = Endpoints::new(health.clone(), Arc::new(registry));
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async {
        let _ = stopped.await;
    };
    let task = match limits {
        None => tokio::spawn(serve(listener, endpoints, shutdown)),
        Some(limits) => tokio::spawn(serve_with_limits(listener, endpoints, limits, shutdown)),
    };
    Server {
        addr,
        health,
        requests,
        stop: Some(stop),
        task,
    }
}

/// Sends `request` raw and reads the answer until the server closes the connection.
async fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("the server closes after one answer")
        .expect("read");
    String::from_utf8(answer).expect("utf-8 answer")
}

fn get(path: &str) -> String {
    // HTTP/1.1 without `Connection: close`: the server still closes after answering.
    format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n")
}

#[tokio::test]
async fn answers_health_metrics_and_errors() {
    let mut server = start(None).await;

    let ok = exchange(server.addr, &get("/healthz")).await;
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(
        ok.to_ascii_lowercase().contains("connection: close"),
        "{ok}"
    );
    assert!(ok.ends_with("\r\n\r\nok\n"), "{ok}");

    server.requests.inc_by(3);
    let page = exchange(server.addr, &get("/metrics?x=1")).await;
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    assert!(
        page.contains("content-type: text/plain; version=0.0.4"),
        "{page}"
    );
    assert!(page.contains("\nt_requests_total 3\n"), "{page}");

    server.health.0.store(false, Ordering::SeqCst);
    let sick = exchange(server.addr, &get("/healthz")).await;
    assert!(sick.starts_with("HTTP/1.1 503"), "{sick}");
    assert!(sick.ends_with("unhealthy: disk gone\n"), "{sick}");

    let missing = exchange(server.addr, &get("/nope")).await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");

    let post = exchange(
        server.addr,
        "POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    assert!(post.contains("allow: GET, HEAD"), "{post}");

    let head = exchange(server.addr, "HEAD /metrics HTTP/1.0\r\n\r\n").await;
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");

    let garbage = exchange(server.addr, "garbage\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");

    server
        .stop
        .take()
        .expect("running")
        .send(())
        .expect("server alive");
    tokio::time::timeout(WAIT, server.task)
        .await
        .expect("stops on shutdown")
        .expect("task")
        .expect("serve");
}

#[tokio::test]
async fn oversized_heads_and_silent_clients_are_cut_off() {
    let server = start(Some(Limits {
        request_timeout: Duration::from_millis(300),
        max_connections: 4,
    }))
    .await;

    // A head beyond the limit gets no 200, and the connection ends.
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nX-Junk: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let _ = stream.write_all(huge.as_bytes()).await; // the server may close mid-write
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("connection closed");
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // A client that connects and says nothing is dropped after the timeout.
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    let mut answer = Vec::new();
    // Well within the default 5 s: the configured timeout is what cut it off.
    let _ = tokio::time::timeout(Duration::from_secs(3), silent.read_to_end(&mut answer))
        .await
        .expect("silent client dropped within the request timeout");
    assert!(!answer.starts_with(b"HTTP/1.1 200"));

    // Still serving.
    let ok = exchange(server.addr, &get("/healthz")).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    server.task.abort();
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_unanswered() {
    let server = start(Some(Limits {
        request_timeout: Duration::from_secs(30),
        max_connections: 1,
    }))
    .await;
    // Hold the only slot with a request whose head never ends...
    let mut holder = TcpStream::connect(server.addr).await.expect("connect");
    holder
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .expect("send");
    // ...then a second client is closed without an answer, however long it waits.
    let turned_away = exchange(server.addr, &get("/healthz")).await;
    assert_eq!(turned_away, "", "over the limit: closed unanswered");
    // Finishing the first request frees the slot.
    holder
        .write_all(b"Host: t\r\n\r\n")
        .await
        .expect("send rest");
    let mut answer = String::new();
    tokio::time::timeout(WAIT, holder.read_to_string(&mut answer))
        .await
        .expect("answered")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut served = String::new();
    for _ in 0..100 {
        // The permit is released when the connection task ends, just after the answer.
        served = exchange(server.addr, &get("/healthz")).await;
        if !served.is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(served.starts_with("HTTP/1.1 200"), "{served:?}");
    server.task.abort();
}
