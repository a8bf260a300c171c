//! The coordinator engine: sessions, planning, fan-out, charging and release, without any
//! network front end. The Flight SQL service and tests both drive it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fedq_common::{Catalog, NodeInfo, Policy};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::Schema;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;
use serde_json::json;
use sha3::{Digest, Sha3_256};

use crate::audit::canonical_json;
use crate::audit::event::{AuditEvent, QueryFacts, QueryOutcome, QueryUncharged};
use crate::config::{CoordinatorConfig, DatasetConfig};
use crate::error::CoordinatorError;
use crate::fanout::{MergedPartials, NodePool};
use crate::ledger::group::ChargeQueue;
use crate::ledger::{BudgetKind, BudgetStatus, Ledger, QueryRecord, Replay, StoredOutcome};
use crate::metrics::PhaseClock;
use crate::planner::{PlannedQuery, Planner, TRUNCATION_LABEL};
use crate::release::{
    release, Released, META_EPSILON_REMAINING, META_EPSILON_SPENT, META_PLAN_HASH, META_QUERY_ID,
    META_REPLAY, META_REPLAY_OF, META_SITES_ANSWERED, META_SITES_ASKED,
};
use fedq_common::metrics::QueryPhase;
use tonic::Status;
use tracing::Instrument;

/// The smallest ε `SET fedq.epsilon` accepts. Below it the noise's scale is over a million
/// times the sensitivity, so nothing useful could be released, and amounts near the
/// ledger's resolution (10⁻⁹ ε) would round.
pub const MIN_EPSILON: f64 = 1e-6;
/// Schema metadata: sites that failed or timed out and were left out (`allow_partial`).
pub const META_SITES_FAILED: &str = "fedq.sites_failed";
/// Schema metadata: `answered/asked`, e.g. `37/38`.
pub const META_COVERAGE: &str = "fedq.coverage";

/// Per-researcher session settings (`SET fedq.epsilon = ...`).
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// ε for the next queries; `None` uses the policy default.
    pub epsilon: Option<f64>,
}

/// A session statement fedq understands.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionStatement {
    /// `SET fedq.epsilon = x` / `SET fedq.epsilon TO x`.
    SetEpsilon(f64),
    /// `RESET fedq.epsilon` / `SET fedq.epsilon = DEFAULT`.
    ResetEpsilon,
    /// `SHOW fedq.epsilon`.
    ShowEpsilon,
    /// `SHOW BUDGET` / `SHOW fedq.budget`.
    ShowBudget,
}

/// Recognise fedq's session statements; `Ok(None)` for anything else (a query).
pub fn parse_session_statement(sql: &str) -> Result<Option<SessionStatement>, CoordinatorError> {
    let s = sql.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = s.split_whitespace().collect();
    let lower: Vec<String> = words.iter().map(|w| w.to_ascii_lowercase()).collect();
    let is_eps = |w: &str| {
        let w = w.trim_matches('"').to_ascii_lowercase();
        w == "fedq.epsilon"
    };
    match lower.first().map(String::as_str) {
        Some("set") => {
            // Accept `SET fedq.epsilon = 0.5`, `SET fedq.epsilon TO 0.5`, `SET fedq.epsilon=0.5`.
            let rest = s[3..].trim();
            let (name, value) = match rest.split_once('=') {
                Some((n, v)) => (n.trim(), v.trim()),
                None => {
                    let mut it = rest.splitn(3, char::is_whitespace);
                    let n = it.next().unwrap_or("");
                    let to = it.next().unwrap_or("");
                    if !to.eq_ignore_ascii_case("to") {
                        return Err(CoordinatorError::InvalidSql(
                            "write `SET fedq.epsilon = 0.5`".into(),
                        ));
                    }
                    (n, it.next().unwrap_or("").trim())
                }
            };
            if !is_eps(name) {
                return Err(CoordinatorError::InvalidSql(format!(
                    "unknown setting `{name}`; fedq supports `SET fedq.epsilon = <number>`"
                )));
            }
            let value = value.trim_matches('\'').trim_matches('"');
            if value.eq_ignore_ascii_case("default") {
                return Ok(Some(SessionStatement::ResetEpsilon));
            }
            let eps: f64 = value.parse().map_err(|_| {
                CoordinatorError::InvalidArgument(format!(
                    "fedq.epsilon must be a positive number such as 0.5, got `{value}`"
                ))
            })?;
            Ok(Some(SessionStatement::SetEpsilon(eps)))
        }
        Some("reset") if words.len() == 2 && is_eps(words[1]) => {
            Ok(Some(SessionStatement::ResetEpsilon))
        }
        Some("show") if words.len() == 2 && is_eps(words[1]) => {
            Ok(Some(SessionStatement::ShowEpsilon))
        }
        Some("show") if words.len() == 2 && (lower[1] == "budget" || lower[1] == "fedq.budget") => {
            Ok(Some(SessionStatement::ShowBudget))
        }
        _ => Ok(None),
    }
}

/// The coordinator, minus its network front end.
pub struct Coordinator {
    planner: Planner,
    pool: NodePool,
    ledger: Arc<Ledger>,
    /// Charges waiting for the next group commit.
    charges: Arc<ChargeQueue>,
    policy: Policy,
    catalog: Catalog,
    datasets: Vec<DatasetConfig>,
    sessions: Mutex<HashMap<String, Session>>,
    max_concurrent_per_researcher: usize,
    metrics: crate::metrics::CoordinatorMetrics,
}

/// Fresh random id from OpenDP's (OpenSSL-backed) byte source.
pub fn random_id() -> String {
    let mut b = [0u8; 8];
    match opendp::traits::samplers::fill_bytes(&mut b) {
        Ok(()) => hex::encode(b),
        Err(_) => {
            // Ids need uniqueness, not secrecy; fall back to the clock.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!("{t:016x}")
        }
    }
}

impl Coordinator {
    /// Build the engine from a validated config and a ledger.
    pub fn new(
        config: &CoordinatorConfig,
        ledger: Arc<Ledger>,
    ) -> Result<Coordinator, CoordinatorError> {
        Ok(Coordinator {
            datasets: config.datasets.clone(),
            planner: Planner::new(&config.catalog)?
                .with_min_reported_count(config.policy.min_reported_count)
                .with_delta_per_query(config.policy.delta_per_query),
            pool: NodePool::new(&config.nodes, config.node_timeout, &config.node_transport)?
                .allow_partial(config.allow_partial),
            charges: ChargeQueue::new(Arc::clone(&ledger)),
            ledger,
            policy: config.policy.clone(),
            catalog: config.catalog.clone(),
            sessions: Mutex::new(HashMap::new()),
            max_concurrent_per_researcher: config.max_concurrent_queries_per_researcher,
            metrics: crate::metrics::CoordinatorMetrics::new(),
        })
    }

    /// The coordinator's metrics (served at `/metrics` when `metrics_listen` is set).
    pub fn metrics(&self) -> &crate::metrics::CoordinatorMetrics {
        &self.metrics
    }

    /// Queries one researcher may have running at once.
    pub fn max_concurrent_per_researcher(&self) -> usize {
        self.max_concurrent_per_researcher
    }

    /// The catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Datasets with global budgets.
    pub fn datasets(&self) -> &[DatasetConfig] {
        &self.datasets
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// ε the researcher's next query spends.
    pub fn session_epsilon(&self, researcher: &str) -> f64 {
        self.sessions()
            .get(researcher)
            .and_then(|s| s.epsilon)
            .unwrap_or(self.policy.default_epsilon)
    }

    /// Apply a session statement; returns a short human answer.
    pub fn apply_session(
        &self,
        researcher: &str,
        st: &SessionStatement,
    ) -> Result<String, CoordinatorError> {
        match st {
            SessionStatement::SetEpsilon(e) => {
                let e = *e;
                if !(e.is_finite() && e > 0.0) {
                    return Err(CoordinatorError::InvalidArgument(format!(
                        "fedq.epsilon must be a positive number, got {e}"
                    )));
                }
                if e < MIN_EPSILON {
                    return Err(CoordinatorError::InvalidArgument(format!(
                        "fedq.epsilon = {e} is below the smallest accepted value {MIN_EPSILON}: its noise would swamp any answer; choose a value of at least {MIN_EPSILON}"
                    )));
                }
                if e > self.policy.max_epsilon_per_query {
                    return Err(CoordinatorError::InvalidArgument(format!(
                        "fedq.epsilon = {e} is above the policy's max_epsilon_per_query = {}; choose a value up to {}",
                        self.policy.max_epsilon_per_query, self.policy.max_epsilon_per_query
                    )));
                }
                self.sessions()
                    .entry(researcher.to_string())
                    .or_default()
                    .epsilon = Some(e);
                Ok(format!("fedq.epsilon = {e}"))
            }
            SessionStatement::ResetEpsilon => {
                self.sessions()
                    .entry(researcher.to_string())
                    .or_default()
                    .epsilon = None;
                Ok(format!(
                    "fedq.epsilon = {} (policy default)",
                    self.policy.default_epsilon
                ))
            }
            SessionStatement::ShowEpsilon => Ok(format!(
                "fedq.epsilon = {}",
                self.session_epsilon(researcher)
            )),
            SessionStatement::ShowBudget => {
                let s = self.budget(researcher)?;
                Ok(format!(
                    "budget ε = {}, spent ε = {}, remaining ε = {}",
                    s.epsilon_budget, s.epsilon_spent, s.epsilon_remaining
                ))
            }
        }
    }

    /// A researcher's own budget.
    pub fn budget(&self, researcher: &str) -> Result<BudgetStatus, CoordinatorError> {
        self.ledger.status(BudgetKind::Researcher, researcher)
    }

    /// Plan and check a query for this researcher's session ε. Costs nothing.
    pub async fn plan(
        &self,
        researcher: &str,
        sql: &str,
    ) -> Result<PlannedQuery, CoordinatorError> {
        let eps = self.session_epsilon(researcher);
        let qid = random_id();
        // The caller's span (the Flight service's `query`) takes the id from here on.
        tracing::Span::current().record("query_id", tracing::field::display(&qid));
        let started = std::time::Instant::now();
        let planned = self.planner.plan(sql, eps, &qid).await;
        self.metrics.phase(QueryPhase::Plan, started.elapsed());
        if let Err(e) = &planned {
            self.metrics
                .query(crate::metrics::Outcome::of(e), started.elapsed());
            // A refusal is audited like a query; nothing was asked or charged.
            let event = AuditEvent::QueryRefused(QueryUncharged {
                query: QueryFacts {
                    query_id: qid.clone(),
                    researcher: researcher.to_string(),
                    sql: sql.to_string(),
                    plan_hash: None,
                    epsilon: eps,
                    delta: 0.0,
                    datasets: Vec::new(),
                    sites_asked: Vec::new(),
                    epsilon_split: Vec::new(),
                },
                epsilon_charged: 0.0,
                outcome: QueryOutcome::Refused,
                site_failed: None,
                reason: Some(e.to_string()),
            });
            if let Err(le) = self.ledger.record(researcher, event) {
                tracing::error!(error = %le, query_id = %qid, "could not audit a refusal");
            }
        }
        planned
    }

    fn query_record(&self, researcher: &str, q: &PlannedQuery) -> QueryRecord {
        QueryRecord {
            query_id: q.query_id.clone(),
            researcher: researcher.to_string(),
            sql: q.sql.clone(),
            plan_hash: plan_hash(q, self.policy.min_reported_count),
            epsilon: q.epsilon,
            // Only partition selection spends δ; every other mechanism is pure ε-DP.
            delta: q.delta,
            datasets: self
                .datasets
                .iter()
                // A joined query reads both tables, so it spends both tables' datasets.
                .filter(|d| q.tables().iter().any(|t| d.tables.iter().any(|x| x == t)))
                .map(|d| d.name.clone())
                .collect(),
            sites_asked: self.pool.sites(),
            epsilon_split: q
                .statistics
                .iter()
                .map(|s| (s.label.clone(), s.epsilon.to_string()))
                .chain(std::iter::once((
                    TRUNCATION_LABEL.to_string(),
                    q.truncation.epsilon.to_string(),
                )))
                .chain(q.selection.iter().map(|s| {
                    (
                        format!(
                            "{} (δ = {}, threshold T = {})",
                            crate::selection::SELECTION_LABEL,
                            s.delta,
                            s.threshold
                        ),
                        s.epsilon.to_string(),
                    )
                }))
                .collect(),
        }
    }

    /// The stored answer, with this query's id and a zero charge in its metadata.
    fn replayed(
        &self,
        researcher: &str,
        q: &PlannedQuery,
        r: Replay,
    ) -> Result<Released, CoordinatorError> {
        let ipc = match r.outcome {
            StoredOutcome::Answer(ipc) => ipc,
            StoredOutcome::PostProcessingError(message) => {
                tracing::info!(query_id = %q.query_id, researcher, replay_of = %r.original_query_id, "post-processing error replayed at no cost");
                return Err(CoordinatorError::PostProcessing {
                    query_id: q.query_id.clone(),
                    message,
                    charge: format!(
                        "This is the stored outcome of the identical query {}, returned at no cost.",
                        r.original_query_id
                    ),
                });
            }
        };
        let (schema, batches) = from_ipc(&ipc)
            .map_err(|e| CoordinatorError::internal(&q.query_id, format!("stored answer: {e}")))?;
        let status = self.budget(researcher)?;
        let mut meta = schema.metadata().clone();
        meta.insert(META_QUERY_ID.to_string(), q.query_id.clone());
        meta.insert(META_EPSILON_SPENT.to_string(), "0".to_string());
        meta.insert(
            META_EPSILON_REMAINING.to_string(),
            status.epsilon_remaining.to_string(),
        );
        meta.insert(META_REPLAY.to_string(), "true".to_string());
        meta.insert(META_REPLAY_OF.to_string(), r.original_query_id.clone());
        let schema = Arc::new(Schema::new_with_metadata(schema.fields().clone(), meta));
        let batches = batches
            .into_iter()
            .map(|b| RecordBatch::try_new(schema.clone(), b.columns().to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CoordinatorError::internal(&q.query_id, format!("stored answer: {e}")))?;
        tracing::info!(query_id = %q.query_id, researcher, replay_of = %r.original_query_id, "query replayed at no cost");
        Ok(Released { schema, batches })
    }

    /// Exact, pre-noise merged partials of a planned query. Library-only (tests, benches):
    /// no network path returns these.
    pub async fn gather(&self, q: &PlannedQuery) -> Result<MergedPartials, CoordinatorError> {
        self.pool.gather(&q.request, &q.groups).await
    }

    /// Health and version of each node.
    pub async fn node_info(&self) -> Vec<(String, Result<NodeInfo, String>)> {
        self.pool.info().await
    }

    /// Run a planned query end to end: replay, probe, charge, fan out, noise,
    /// post-process.
    ///
    /// Every outcome the researcher sees is either a function of public inputs or a charged
    /// release (ARCHITECTURE.md, "Observable outcomes"), hence the order:
    /// 1. an identical earlier query (same canonical plan, same researcher) gets its stored
    ///    outcome, an answer or a post-processing error, at no cost;
    /// 2. the sites are probed before the request is sent: an unreachable site fails the
    ///    query uncharged (or, with `allow_partial`, is left out), since nothing was read;
    /// 3. the query is charged before any node receives it (the budget check is the
    ///    charge's own, audited);
    /// 4. the nodes are asked. If every failing site proves it refused before reading data,
    ///    the charge is refunded; any other failure keeps it (`NodeFailedAfterData`);
    /// 5. noise and post-processing: the outcome, an answer or a post-processing error, is
    ///    stored with the charge marked released before it leaves.
    pub async fn execute(
        &self,
        researcher: &str,
        q: &PlannedQuery,
    ) -> Result<Released, CoordinatorError> {
        let started = std::time::Instant::now();
        // Log lines of the query carry its id: in the caller's span if it has one (the
        // Flight service's), else in a span of their own.
        let span = match tracing::Span::current() {
            s if s.is_none() => tracing::info_span!("query", query_id = %q.query_id),
            s => s,
        };
        let result = self
            .execute_counted(researcher, q, started)
            .instrument(span)
            .await;
        match &result {
            Ok(r) => {
                // What the ledger charged for this answer (0 for a replay).
                let eps = r
                    .schema
                    .metadata()
                    .get(META_EPSILON_SPENT)
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0);
                self.metrics.epsilon_spent(researcher, eps);
                self.metrics
                    .query(crate::metrics::Outcome::Ok, started.elapsed());
            }
            Err(e) => {
                if let CoordinatorError::NodeFailedAfterData { epsilon, .. } = e {
                    self.metrics.epsilon_spent(researcher, *epsilon);
                }
                self.metrics
                    .query(crate::metrics::Outcome::of(e), started.elapsed())
            }
        }
        result
    }

    /// Audit a query that failed before anything was charged (`query.failed`, ε 0).
    fn audit_uncharged_failure(&self, rec: &QueryRecord, e: &CoordinatorError) {
        if let Some(site) = e.site() {
            self.metrics.node_error(site);
        }
        let event = AuditEvent::QueryFailed(QueryUncharged {
            query: rec.facts(),
            epsilon_charged: 0.0,
            outcome: QueryOutcome::Failed,
            site_failed: e.site().map(str::to_string),
            reason: Some(e.to_string()),
        });
        if let Err(le) = self.ledger.record(&rec.researcher, event) {
            tracing::error!(error = %le, query_id = %rec.query_id, "could not audit a failed query");
        }
    }

    async fn execute_counted(
        &self,
        researcher: &str,
        q: &PlannedQuery,
        started: std::time::Instant,
    ) -> Result<Released, CoordinatorError> {
        let mut clock = PhaseClock::start(&self.metrics);
        let rec = self.query_record(researcher, q);
        let looked_up = rec.clone();
        if let Some(r) = self.on_ledger(move |l| l.replay(&looked_up)).await? {
            return self.replayed(researcher, q, r);
        }
        clock.done(QueryPhase::Replay);
        // Which sites the request goes to: decided before any of them has it.
        let dispatch = self.pool.probe().await;
        clock.done(QueryPhase::Probe);
        let unreachable: Vec<String> = dispatch
            .unreachable
            .iter()
            .map(|(s, _)| s.clone())
            .collect();
        if let Some((_, e)) = dispatch.unreachable.into_iter().next() {
            if !self.pool.allows_partial() || dispatch.reachable.is_empty() {
                self.audit_uncharged_failure(&rec, &e);
                return Err(e);
            }
        }
        // Charged before any node reads data (this is also the budget check).
        let (charge, status) = self
            .charges
            .charge(rec.clone(), self.sites_of(&dispatch.reachable))
            .await?;
        clock.done(QueryPhase::Charge);
        let mut merged = match self
            .pool
            .gather_from(&dispatch.reachable, &q.request, &q.groups)
            .await
        {
            Ok(m) => m,
            Err(f) => return Err(self.settle_failure(&rec, charge, f.failure)),
        };
        clock.done(QueryPhase::Gather);
        for site in &merged.sites_failed {
            self.metrics.node_error(site);
        }
        merged.sites_failed.splice(0..0, unreachable);
        let mut meta = HashMap::new();
        meta.insert(META_QUERY_ID.to_string(), q.query_id.clone());
        // What the ledger charged (whole units of 10⁻⁹ ε), not what was asked.
        meta.insert(META_EPSILON_SPENT.to_string(), charge.epsilon.to_string());
        meta.insert(
            META_EPSILON_REMAINING.to_string(),
            status.epsilon_remaining.to_string(),
        );
        meta.insert(
            META_SITES_ANSWERED.to_string(),
            merged.sites_answered.join(","),
        );
        meta.insert(META_SITES_ASKED.to_string(), self.pool.sites().join(","));
        meta.insert(META_SITES_FAILED.to_string(), merged.sites_failed.join(","));
        meta.insert(
            META_COVERAGE.to_string(),
            format!(
                "{}/{}",
                merged.sites_answered.len(),
                self.pool.sites().len()
            ),
        );
        meta.insert(META_REPLAY.to_string(), "false".to_string());
        meta.insert(META_PLAN_HASH.to_string(), rec.plan_hash.clone());
        let released = release(q, &merged, self.policy.min_reported_count, meta)
            .await
            .and_then(|r| {
                let ipc = to_ipc(&r).map_err(|e| {
                    CoordinatorError::internal(&q.query_id, format!("encoding the answer: {e}"))
                })?;
                Ok((r, ipc))
            });
        clock.done(QueryPhase::Release);
        match released {
            Ok((r, ipc)) => {
                // Committed before the answer leaves: after this it is never refunded.
                self.on_ledger(move |l| l.released(charge, &StoredOutcome::Answer(ipc)))
                    .await?;
                clock.done(QueryPhase::Store);
                tracing::info!(query_id = %q.query_id, researcher, epsilon = q.epsilon,
                    sites = merged.sites_answered.len(), elapsed_ms = started.elapsed().as_millis() as u64,
                    "query released");
                Ok(r)
            }
            Err(e) => {
                // The noise was drawn: the failure is a release of noisy values, charged
                // and stored so that asking again returns it, not a fresh draw.
                let message = match e {
                    CoordinatorError::PostProcessing { message, .. } => message,
                    other => {
                        tracing::error!(query_id = %q.query_id, error = ?other, "release failed after the noise was drawn");
                        Status::from(other).message().to_string()
                    }
                };
                self.ledger
                    .released(charge, &StoredOutcome::PostProcessingError(message.clone()))?;
                Err(CoordinatorError::PostProcessing {
                    query_id: q.query_id.clone(),
                    message,
                    charge: format!("ε = {} was charged, because the failure depends on the noisy values; asking the same query again returns this error at no cost.", q.epsilon),
                })
            }
        }
    }

    /// Run `f` on the ledger on a blocking thread, so that no async worker waits for the
    /// ledger's lock or its disk.
    async fn on_ledger<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Ledger) -> Result<T, CoordinatorError> + Send + 'static,
    ) -> Result<T, CoordinatorError> {
        let ledger = Arc::clone(&self.ledger);
        tokio::task::spawn_blocking(move || f(&ledger))
            .await
            .unwrap_or_else(|e| {
                Err(CoordinatorError::LedgerUnavailable(format!(
                    "a ledger operation did not finish ({e})"
                )))
            })
    }

    /// Site names of config indexes.
    fn sites_of(&self, idx: &[usize]) -> Vec<String> {
        let all = self.pool.sites();
        idx.iter().filter_map(|i| all.get(*i).cloned()).collect()
    }

    /// A gather that failed after the charge: refunded only if the deciding site proved it
    /// refused before reading data (then no site failed after data); otherwise the charge
    /// stays and the researcher learns only which site failed.
    fn settle_failure(
        &self,
        rec: &QueryRecord,
        charge: crate::ledger::Charge,
        f: crate::fanout::SiteFailure,
    ) -> CoordinatorError {
        self.metrics.node_error(&f.site);
        match f.stage {
            fedq_common::outcome::FailureStage::BeforeData => {
                if let Err(le) = self.ledger.refund(charge, &f.error.to_string()) {
                    tracing::error!(error = %le, query_id = %rec.query_id, "could not refund a query refused before data");
                    return le;
                }
                self.audit_uncharged_failure(rec, &f.error);
                f.error
            }
            fedq_common::outcome::FailureStage::AfterData => {
                let epsilon = charge.epsilon;
                if let Err(le) =
                    self.ledger
                        .failed_after_data(charge, &f.site, &f.error.to_string())
                {
                    tracing::error!(error = %le, query_id = %rec.query_id, "could not settle a failed query");
                    return le;
                }
                let timed_out = match f.error {
                    CoordinatorError::NodeTimedOut { limit, .. } => Some(limit),
                    _ => None,
                };
                CoordinatorError::NodeFailedAfterData {
                    site: f.site,
                    query_id: rec.query_id.clone(),
                    epsilon,
                    timed_out,
                }
            }
        }
    }

    /// `EXPLAIN` of `sql` (the query without the keyword): plan and check it exactly as it
    /// would run and describe its statistics, sensitivities, ε split, noise scales and
    /// expected errors. Asks no node and charges nothing; audited as `query.explained`.
    pub async fn explain(&self, researcher: &str, sql: &str) -> Result<Released, CoordinatorError> {
        let q = self.plan(researcher, sql).await?;
        let (schema, batches) = crate::explain::explain_batch(&q, self.policy.min_reported_count)?;
        let event = AuditEvent::QueryExplained(QueryUncharged {
            query: QueryFacts {
                query_id: q.query_id.clone(),
                researcher: researcher.to_string(),
                sql: sql.to_string(),
                plan_hash: Some(plan_hash(&q, self.policy.min_reported_count)),
                epsilon: q.epsilon,
                delta: 0.0,
                datasets: Vec::new(),
                sites_asked: Vec::new(),
                epsilon_split: Vec::new(),
            },
            epsilon_charged: 0.0,
            outcome: QueryOutcome::Explained,
            site_failed: None,
            reason: None,
        });
        self.ledger.record(researcher, event)?;
        let status = self.budget(researcher)?;
        let mut meta = schema.metadata().clone();
        meta.insert(META_QUERY_ID.to_string(), q.query_id.clone());
        meta.insert(META_EPSILON_SPENT.to_string(), "0".to_string());
        meta.insert(
            META_EPSILON_REMAINING.to_string(),
            status.epsilon_remaining.to_string(),
        );
        let schema = Arc::new(Schema::new_with_metadata(schema.fields().clone(), meta));
        let batches = batches
            .into_iter()
            .map(|b| RecordBatch::try_new(schema.clone(), b.columns().to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CoordinatorError::internal(&q.query_id, e.to_string()))?;
        Ok(Released { schema, batches })
    }

    /// Plan and execute one SQL statement for `researcher` (`EXPLAIN <query>` is explained,
    /// not run).
    pub async fn run(&self, researcher: &str, sql: &str) -> Result<Released, CoordinatorError> {
        if let Some(inner) = crate::explain::explain_target(sql)? {
            return self.explain(researcher, inner).await;
        }
        let q = self.plan(researcher, sql).await?;
        self.execute(researcher, &q).await
    }
}

/// Canonical plan hash: SHA3-256 (hex) of a canonical serialization of what determines the
/// answer: the node request without its query id, ε, the noisy statistics with their
/// sensitivities and ε shares, the post-processing plan (DataFusion's normalised logical
/// plan, so whitespace and keyword case of the SQL do not matter), and the suppression
/// threshold.
pub fn plan_hash(q: &PlannedQuery, min_reported_count: u64) -> String {
    let mut request = q.request.clone();
    request.query_id.clear();
    let stats: Vec<serde_json::Value> = q
        .statistics
        .iter()
        .map(|s| {
            json!({"kind": format!("{:?}", s.kind), "sensitivity": s.sensitivity.to_string(),
                   "epsilon": s.epsilon.to_string(), "label": s.label})
        })
        .collect();
    let v = json!({
        "format": 1,
        "request": serde_json::to_value(&request).unwrap_or(serde_json::Value::Null),
        "epsilon": q.epsilon.to_string(),
        "statistics": stats,
        "plan": q.plan.display_indent().to_string(),
        "min_reported_count": min_reported_count,
    });
    hex::encode(Sha3_256::digest(canonical_json(&v).as_bytes()))
}

/// Arrow IPC stream bytes of a released answer.
pub fn to_ipc(r: &Released) -> Result<Vec<u8>, datafusion::arrow::error::ArrowError> {
    let mut w = StreamWriter::try_new(Vec::new(), &r.schema)?;
    for b in &r.batches {
        w.write(b)?;
    }
    w.finish()?;
    w.into_inner()
}

/// Decode [`to_ipc`]'s bytes.
pub fn from_ipc(
    bytes: &[u8],
) -> Result<
    (datafusion::arrow::datatypes::SchemaRef, Vec<RecordBatch>),
    datafusion::arrow::error::ArrowError,
> {
    let reader = StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_statements() {
        let p = |s| parse_session_statement(s).unwrap();
        assert_eq!(
            p("SET fedq.epsilon = 0.5"),
            Some(SessionStatement::SetEpsilon(0.5))
        );
        assert_eq!(
            p("set FEDQ.EPSILON to 2;"),
            Some(SessionStatement::SetEpsilon(2.0))
        );
        assert_eq!(
            p("SET fedq.epsilon='0.25'"),
            Some(SessionStatement::SetEpsilon(0.25))
        );
        assert_eq!(
            p("RESET fedq.epsilon"),
            Some(SessionStatement::ResetEpsilon)
        );
        assert_eq!(p("SHOW fedq.epsilon"), Some(SessionStatement::ShowEpsilon));
        assert_eq!(p("show budget"), Some(SessionStatement::ShowBudget));
        assert_eq!(p("SELECT 1"), None);
        assert!(parse_session_statement("SET foo = 1").is_err());
        assert!(parse_session_statement("SET fedq.epsilon = abc").is_err());
    }
}
