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

/// Buckets of the per-phase histograms, in seconds, from 50 µs to 10 s.
pub const PHASE_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// Coordinator histogram `fedq_query_phase_seconds{phase}`: where a query's time goes.
pub const QUERY_PHASE_METRIC: &str = "fedq_query_phase_seconds";
/// Node histogram `fedq_node_phase_seconds{site, phase}`: where a request's time goes.
pub const NODE_PHASE_METRIC: &str = "fedq_node_phase_seconds";

/// A phase of a query at the coordinator, in the order they run (the `phase` label of
/// [`QUERY_PHASE_METRIC`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QueryPhase {
    /// SQL to a checked plan: parse, DataFusion planning, statistics, ε split, node request.
    Plan,
    /// Looking up an identical earlier answer (a free replay).
    Replay,
    /// Asking every site whether it is reachable, before the request is sent.
    Probe,
    /// The durable charge (one ledger transaction, group-committed with concurrent ones).
    Charge,
    /// Sending the request to the sites and merging their partials, until the last answers.
    Gather,
    /// Noise, post-processing and encoding the answer.
    Release,
    /// Storing the answer for replays and settling the charge (one ledger transaction).
    Store,
}

impl QueryPhase {
    /// Every phase, in order.
    pub const ALL: [QueryPhase; 7] = [
        QueryPhase::Plan,
        QueryPhase::Replay,
        QueryPhase::Probe,
        QueryPhase::Charge,
        QueryPhase::Gather,
        QueryPhase::Release,
        QueryPhase::Store,
    ];

    /// The `phase` label.
    pub fn as_str(self) -> &'static str {
        match self {
            QueryPhase::Plan => "plan",
            QueryPhase::Replay => "replay",
            QueryPhase::Probe => "probe",
            QueryPhase::Charge => "charge",
            QueryPhase::Gather => "gather",
            QueryPhase::Release => "release",
            QueryPhase::Store => "store",
        }
    }
}

/// A phase of one request at a node (the `phase` label of [`NODE_PHASE_METRIC`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NodePhase {
    /// Decoding the ticket and validating the request against the catalog and policy.
    Validate,
    /// Waiting for one of the node's query slots.
    Queue,
    /// The request to an optimised DataFusion logical plan and a bounding plan (or the
    /// plan of an earlier request of the same shape, reused).
    Plan,
    /// The logical plan to a physical plan.
    Physical,
    /// Reading, filtering, bounding per participant and aggregating.
    Execute,
}

impl NodePhase {
    /// Every phase, in order.
    pub const ALL: [NodePhase; 5] = [
        NodePhase::Validate,
        NodePhase::Queue,
        NodePhase::Plan,
        NodePhase::Physical,
        NodePhase::Execute,
    ];

    /// The `phase` label.
    pub fn as_str(self) -> &'static str {
        match self {
            NodePhase::Validate => "validate",
            NodePhase::Queue => "queue",
            NodePhase::Plan => "plan",
            NodePhase::Physical => "physical",
            NodePhase::Execute => "execute",
        }
    }
}

/// The total seconds and count of each `phase` of the histogram `metric` in `registry`
/// (summed over its other labels, such as `site`).
pub fn phase_totals(
    registry: &Registry,
    metric: &str,
) -> std::collections::BTreeMap<String, (f64, u64)> {
    let mut out = std::collections::BTreeMap::new();
    for family in registry.gather() {
        if family.name() != metric {
            continue;
        }
        for m in family.get_metric() {
            let Some(phase) = m
                .get_label()
                .iter()
                .find(|l| l.name() == "phase")
                .map(|l| l.value().to_string())
            else {
                continue;
            };
            let h = m.get_histogram();
            let e = out.entry(phase).or_insert((0.0, 0));
            e.0 += h.get_sample_sum();
            e.1 += h.get_sample_count();
        }
    }
    out
}

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
