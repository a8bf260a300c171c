//! The node's Prometheus metrics: requests by outcome, refusals, request latency.
//! Counts and durations only, never data values.

use std::time::Duration;

use fedq_common::metrics::prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};
use fedq_common::metrics::{NodePhase, LATENCY_BUCKETS, NODE_PHASE_METRIC, PHASE_BUCKETS};

/// Metrics of one node (its own registry; several nodes may share a process).
#[derive(Debug, Clone)]
pub struct NodeMetrics {
    /// The registry served at `/metrics`.
    pub registry: Registry,
    requests: IntCounterVec,
    refusals: IntCounter,
    latency: Histogram,
    phases: HistogramVec,
}

impl NodeMetrics {
    /// Fresh metrics, labelled with the site name.
    pub fn new(site: &str) -> NodeMetrics {
        let registry = Registry::new();
        let konst = |o: Opts| o.const_label("site", site);
        // Metric and label names are fixed, valid constants (label values such as the site
        // name are not validated by prometheus), so these constructors cannot fail.
        let requests = IntCounterVec::new(
            konst(Opts::new(
                "fedq_node_requests_total",
                "partial-aggregate requests (DoGet) by outcome: ok, refused, over_limit (busy or over the memory limit), timed_out, failed",
            )),
            &["outcome"],
        )
        .expect("static metric definition");
        let refusals = IntCounter::with_opts(konst(Opts::new(
            "fedq_node_refusals_total",
            "requests refused by the node's catalog, its own policy, its limits on request structure, or its caller allow-list",
        )))
        .expect("static metric definition");
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "fedq_node_request_duration_seconds",
                "time from receiving a request to its answer or error",
            )
            .const_label("site", site)
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("static metric definition");
        let phases = HistogramVec::new(
            HistogramOpts::new(
                NODE_PHASE_METRIC,
                "time a request spends in each phase: validate, queue, plan, physical, execute",
            )
            .const_label("site", site)
            .buckets(PHASE_BUCKETS.to_vec()),
            &["phase"],
        )
        .expect("static metric definition");
        for c in [
            Box::new(requests.clone())
                as Box<dyn fedq_common::metrics::prometheus::core::Collector>,
            Box::new(refusals.clone()),
            Box::new(latency.clone()),
            Box::new(phases.clone()),
        ] {
            if let Err(e) = registry.register(c) {
                tracing::error!(error = %e, "could not register a node metric");
            }
        }
        NodeMetrics {
            registry,
            requests,
            refusals,
            latency,
            phases,
        }
    }

    /// One request spent `elapsed` in `phase`.
    pub fn phase(&self, phase: NodePhase, elapsed: Duration) {
        self.phases
            .with_label_values(&[phase.as_str()])
            .observe(elapsed.as_secs_f64());
    }

    /// Record one request's outcome (from the status it ends with) and duration.
    pub fn record(&self, result: Result<(), tonic::Code>, elapsed: Duration) {
        let outcome = match result {
            Ok(()) => "ok",
            Err(tonic::Code::PermissionDenied | tonic::Code::InvalidArgument) => "refused",
            Err(tonic::Code::ResourceExhausted) => "over_limit",
            Err(tonic::Code::DeadlineExceeded) => "timed_out",
            Err(_) => "failed",
        };
        if outcome == "refused" {
            self.refusals.inc();
        }
        self.requests.with_label_values(&[outcome]).inc();
        self.latency.observe(elapsed.as_secs_f64());
    }
}
