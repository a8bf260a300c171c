//! Prometheus `/metrics` over plain HTTP (text exposition format), served by the
//! coordinator and by each node when their config sets `metrics_listen`.
//!
//! Each process keeps its own [`prometheus::Registry`] (several nodes and a coordinator can
//! share one process in tests and the demo). The server answers `GET /metrics` and nothing
//! else, one request per connection at a time, each connection closed after 30 s. Metric
//! values are counts, sums of ε and latencies: never data values.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use prometheus;

/// Latency buckets in seconds, from 5 ms to 10 min.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 600.0,
];

/// The registry's metrics in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::new();
    // Encoding into a Vec fails only for metrics that break the format, which the
    // registry's typed constructors do not create.
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A running `/metrics` server. Dropping it stops the server.
#[derive(Debug)]
pub struct MetricsServer {
    /// The bound address (the real port when the config asked for port 0).
    pub addr: SocketAddr,
    _stop: oneshot::Sender<()>,
    _task: JoinHandle<()>,
}

/// Bind `addr` and serve `GET /metrics` from `registry` in a background task.
pub async fn serve(addr: SocketAddr, registry: Registry) -> std::io::Result<MetricsServer> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "/metrics listens on a non-loopback address; it has no authentication");
    }
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let registry = registry.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req: Request<Incoming>| {
                            let r = respond(&req, &registry);
                            async move { Ok::<_, Infallible>(r) }
                        });
                        let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                        // A slow or idle client is dropped; errors only end its connection.
                        let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
                    });
                }
            }
        }
    });
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    Ok(MetricsServer {
        addr,
        _stop: stop,
        _task: task,
    })
}

fn respond(req: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let (status, content_type, body) =
        if req.method() == Method::GET && req.uri().path() == "/metrics" {
            (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                render(registry),
            )
        } else {
            (
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "only GET /metrics is served here\n".to_string(),
            )
        };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_the_registry_at_metrics_and_nothing_else() {
        let registry = Registry::new();
        let c = prometheus::IntCounterVec::new(
            prometheus::Opts::new("fedq_test_total", "a test counter"),
            &["outcome"],
        )
        .unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        c.with_label_values(&["ok"]).inc_by(3);
        let server = serve("127.0.0.1:0".parse().unwrap(), registry)
            .await
            .unwrap();
        let r = get(server.addr, "/metrics").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("text/plain; version=0.0.4"), "{r}");
        assert!(r.contains("fedq_test_total{outcome=\"ok\"} 3"), "{r}");
        let r = get(server.addr, "/other").await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    }
}
