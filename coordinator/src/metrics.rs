//! The coordinator's Prometheus metrics: queries by outcome, query latency, ε spent per
//! researcher, refusals, node errors per site. Counts, ε and durations only, never data
//! values.

use std::time::Duration;

use fedq_common::metrics::prometheus::core::Collector;
use fedq_common::metrics::prometheus::{
    CounterVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};
use fedq_common::metrics::{QueryPhase, LATENCY_BUCKETS, PHASE_BUCKETS, QUERY_PHASE_METRIC};

use crate::error::CoordinatorError;

/// How a query ended, the `outcome` label of `fedq_queries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered (including free replays).
    Ok,
    /// Refused by the planner or by a node's policy.
    Refused,
    /// A researcher or dataset budget could not cover it.
    BudgetExhausted,
    /// Anything else: invalid SQL, nodes down or failing, limits, internal errors.
    Error,
}

impl Outcome {
    /// The outcome of a query that failed with `e`.
    pub fn of(e: &CoordinatorError) -> Outcome {
        match e {
            CoordinatorError::Refused(_) | CoordinatorError::NodeRefused { .. } => Outcome::Refused,
            CoordinatorError::BudgetExhausted { .. }
            | CoordinatorError::DatasetBudgetExhausted { .. }
            | CoordinatorError::NoBudget(_) => Outcome::BudgetExhausted,
            _ => Outcome::Error,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::BudgetExhausted => "budget_exhausted",
            Outcome::Error => "error",
        }
    }
}

/// Metrics of one coordinator (its own registry).
#[derive(Debug, Clone)]
pub struct CoordinatorMetrics {
    /// The registry served at `/metrics`.
    pub registry: Registry,
    queries: IntCounterVec,
    latency: Histogram,
    epsilon: CounterVec,
    refusals: IntCounter,
    node_errors: IntCounterVec,
    phases: HistogramVec,
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CoordinatorMetrics {
    /// Fresh metrics in a new registry.
    pub fn new() -> CoordinatorMetrics {
        // Metric and label names are fixed, valid constants, so these constructors
        // cannot fail.
        let queries = IntCounterVec::new(
            Opts::new(
                "fedq_queries_total",
                "queries by outcome: ok, refused, budget_exhausted, error",
            ),
            &["outcome"],
        )
        .expect("static metric definition");
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "fedq_query_duration_seconds",
                "time to run a query (replay, fan-out, charge, noise, post-processing)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("static metric definition");
        let epsilon = CounterVec::new(
            Opts::new(
                "fedq_epsilon_spent_total",
                "privacy budget ε charged for released answers, per researcher",
            ),
            &["researcher"],
        )
        .expect("static metric definition");
        let refusals = IntCounter::new(
            "fedq_refusals_total",
            "queries refused by the planner or by a node's own policy",
        )
        .expect("static metric definition");
        let node_errors = IntCounterVec::new(
            Opts::new(
                "fedq_node_errors_total",
                "sites that failed, timed out, refused or were unreachable for a query, per site",
            ),
            &["site"],
        )
        .expect("static metric definition");
        let phases = HistogramVec::new(
            HistogramOpts::new(
                QUERY_PHASE_METRIC,
                "time a query spends in each phase: plan, replay, probe, charge, gather, release, store",
            )
            .buckets(PHASE_BUCKETS.to_vec()),
            &["phase"],
        )
        .expect("static metric definition");
        let registry = Registry::new();
        let collectors: [Box<dyn Collector>; 6] = [
            Box::new(queries.clone()),
            Box::new(latency.clone()),
            Box::new(epsilon.clone()),
            Box::new(refusals.clone()),
            Box::new(node_errors.clone()),
            Box::new(phases.clone()),
        ];
        for c in collectors {
            if let Err(e) = registry.register(c) {
                tracing::error!(error = %e, "could not register a coordinator metric");
            }
        }
        CoordinatorMetrics {
            registry,
            queries,
            latency,
            epsilon,
            refusals,
            node_errors,
            phases,
        }
    }

    /// One query spent `elapsed` in `phase`.
    pub fn phase(&self, phase: QueryPhase, elapsed: Duration) {
        self.phases
            .with_label_values(&[phase.as_str()])
            .observe(elapsed.as_secs_f64());
    }

    /// One query ended with `outcome` after `elapsed`.
    pub fn query(&self, outcome: Outcome, elapsed: Duration) {
        self.queries.with_label_values(&[outcome.label()]).inc();
        if outcome == Outcome::Refused {
            self.refusals.inc();
        }
        self.latency.observe(elapsed.as_secs_f64());
    }

    /// `researcher` was charged `epsilon` for a released answer.
    pub fn epsilon_spent(&self, researcher: &str, epsilon: f64) {
        if epsilon > 0.0 {
            self.epsilon
                .with_label_values(&[researcher])
                .inc_by(epsilon);
        }
    }

    /// `site` failed for a query.
    pub fn node_error(&self, site: &str) {
        self.node_errors.with_label_values(&[site]).inc();
    }
}

/// Times consecutive phases of one query: each [`PhaseClock::done`] records the time since
/// the previous one (or the start).
#[derive(Debug)]
pub struct PhaseClock<'a> {
    metrics: &'a CoordinatorMetrics,
    last: std::time::Instant,
}

impl<'a> PhaseClock<'a> {
    /// Start timing now.
    pub fn start(metrics: &'a CoordinatorMetrics) -> PhaseClock<'a> {
        PhaseClock {
            metrics,
            last: std::time::Instant::now(),
        }
    }

    /// The phase that just ended was `phase`.
    pub fn done(&mut self, phase: QueryPhase) {
        let now = std::time::Instant::now();
        self.metrics.phase(phase, now - self.last);
        self.last = now;
    }
}
