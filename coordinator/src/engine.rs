//! The coordinator engine: sessions, planning, fan-out, charging and release, without any
//! network front end. The Flight SQL service and tests both drive it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fedq_common::{Catalog, NodeInfo, Policy};

use crate::budget::{BudgetLedger, BudgetStatus};
use crate::config::CoordinatorConfig;
use crate::error::CoordinatorError;
use crate::fanout::{MergedPartials, NodePool};
use crate::planner::{PlannedQuery, Planner};
use crate::release::{
    release, Released, META_EPSILON_REMAINING, META_EPSILON_SPENT, META_QUERY_ID,
    META_SITES_ANSWERED, META_SITES_ASKED,
};

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
    ledger: Arc<dyn BudgetLedger>,
    policy: Policy,
    catalog: Catalog,
    sessions: Mutex<HashMap<String, Session>>,
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
        ledger: Arc<dyn BudgetLedger>,
    ) -> Result<Coordinator, CoordinatorError> {
        Ok(Coordinator {
            planner: Planner::new(&config.catalog)?,
            pool: NodePool::new(&config.nodes, config.node_timeout)?,
            ledger,
            policy: config.policy.clone(),
            catalog: config.catalog.clone(),
            sessions: Mutex::new(HashMap::new()),
        })
    }

    /// The catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
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
        self.ledger.status(researcher)
    }

    /// Plan and check a query for this researcher's session ε. Costs nothing.
    pub async fn plan(
        &self,
        researcher: &str,
        sql: &str,
    ) -> Result<PlannedQuery, CoordinatorError> {
        let eps = self.session_epsilon(researcher);
        let qid = random_id();
        self.planner.plan(sql, eps, &qid).await
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

    /// Run a planned query end to end: fan out, charge, noise, post-process.
    ///
    /// Order matters: all nodes must answer before anything is charged (a node that is down
    /// costs nothing); the charge is made before any noise is sampled; if release fails
    /// after the charge, the charge is refunded since nothing was released.
    pub async fn execute(
        &self,
        researcher: &str,
        q: &PlannedQuery,
    ) -> Result<Released, CoordinatorError> {
        let started = std::time::Instant::now();
        let merged = self.gather(q).await?;
        let charge = self.ledger.charge(researcher, q.epsilon, &q.query_id)?;
        let status = self.ledger.status(researcher)?;
        let mut meta = HashMap::new();
        meta.insert(META_QUERY_ID.to_string(), q.query_id.clone());
        meta.insert(META_EPSILON_SPENT.to_string(), q.epsilon.to_string());
        meta.insert(
            META_EPSILON_REMAINING.to_string(),
            status.epsilon_remaining.to_string(),
        );
        meta.insert(
            META_SITES_ANSWERED.to_string(),
            merged.sites_answered.join(","),
        );
        meta.insert(META_SITES_ASKED.to_string(), self.pool.sites().join(","));
        match release(q, &merged, self.policy.min_reported_count, meta).await {
            Ok(r) => {
                self.ledger.released(charge)?;
                tracing::info!(query_id = %q.query_id, researcher, epsilon = q.epsilon,
                    sites = merged.sites_answered.len(), elapsed_ms = started.elapsed().as_millis() as u64,
                    "query released");
                Ok(r)
            }
            Err(e) => {
                self.ledger.refund(charge)?;
                Err(e)
            }
        }
    }

    /// Plan and execute one SQL statement for `researcher`.
    pub async fn run(&self, researcher: &str, sql: &str) -> Result<Released, CoordinatorError> {
        let q = self.plan(researcher, sql).await?;
        self.execute(researcher, &q).await
    }
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
