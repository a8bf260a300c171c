//! The coordinator's one error type, and its single mapping to `tonic::Status`.
//!
//! Caller errors (refused or malformed queries, exhausted budgets, unknown researchers) carry
//! messages that depend only on the SQL text, the catalog and the budget, never on data.
//! Node and internal failures are logged in full and reach the researcher only as a generic
//! message with the query id.

use tonic::Status;

/// Everything that can go wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Bad configuration (startup only).
    #[error("configuration error: {0}")]
    Config(String),
    /// The SQL does not parse or names unknown tables or columns.
    #[error("{0}")]
    InvalidSql(String),
    /// The query is valid SQL but fedq will not answer it under the privacy model.
    #[error("query refused: {0}")]
    Refused(String),
    /// A session setting or request parameter is out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// The query would exceed the researcher's budget.
    #[error("privacy budget exhausted: this query needs ε = {requested}, but only ε = {remaining} remains of {total}; ask your privacy officer for more budget or lower `SET fedq.epsilon`")]
    BudgetExhausted {
        requested: f64,
        remaining: f64,
        total: f64,
    },
    /// The query spends δ (partition selection) and a δ budget (the researcher's, or a
    /// dataset's when `dataset` is set) cannot cover it.
    #[error("the δ budget{} cannot cover this query's δ = {requested:e} (GROUP BY a key without a public domain spends δ); nothing was charged. Ask your privacy officer for a δ budget, or group by columns with a public domain", .dataset.as_ref().map(|d| format!(" of dataset {d}")).unwrap_or_default())]
    DeltaBudgetExhausted {
        requested: f64,
        dataset: Option<String>,
    },
    /// A global dataset budget cannot cover the query. The remaining amount is not shown:
    /// it depends on other researchers' spending.
    #[error("the global privacy budget of dataset {dataset} cannot cover ε = {requested}; nothing was charged. Ask your privacy officer")]
    DatasetBudgetExhausted { dataset: String, requested: f64 },
    /// The researcher or dataset has no budget (never granted, or revoked).
    #[error("{0}")]
    NoBudget(String),
    /// The caller lacks the role the request needs (e.g. a grant by a non-officer).
    #[error("{0}")]
    Forbidden(String),
    /// The ledger file is locked by another process. Nothing was changed.
    #[error("{0}")]
    LedgerBusy(String),
    /// The ledger file is not a readable fedq ledger.
    #[error("{0}")]
    LedgerCorrupt(String),
    /// The ledger cannot be written (permissions, disk full, I/O).
    #[error("{0}")]
    LedgerUnavailable(String),
    /// No valid credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// A node could not be reached or did not answer in time. No budget was charged.
    #[error("site {site} is unavailable ({reason}); the query was not answered and no budget was charged")]
    NodeUnavailable { site: String, reason: String },
    /// A node answered with an error. No budget was charged.
    #[error("site {site} could not answer the query (query id {query_id}); no budget was charged. The site's log has the details")]
    NodeFailed { site: String, query_id: String },
    /// The researcher already has as many queries running as the policy allows. Checked
    /// before anything is charged; `UNAVAILABLE`, so a client may retry it safely.
    #[error(
        "you already have {0} queries running, the most allowed at once; nothing was charged. Retry shortly, when one has finished"
    )]
    TooManyQueries(usize),
    /// A node speaks another protocol version. No budget was charged.
    #[error("site {site} runs an incompatible fedq ({detail}); the query was not answered and no budget was charged. Upgrade the older side")]
    NodeIncompatible { site: String, detail: String },
    /// A node refused the request under its own policy (columns it does not share, a
    /// lower R cap, narrower clamps). The node's message depends only on the request and
    /// its policy. No budget was charged.
    #[error("site {site} refused the query under its own policy: {detail}; no budget was charged. Ask the site, or leave out what it does not share")]
    NodeRefused { site: String, detail: String },
    /// A node stopped the query at one of its resource limits (memory per query, busy).
    /// The node's message names only the limit. No budget was charged.
    #[error(
        "site {site} stopped the query at its resource limits: {detail}; no budget was charged"
    )]
    NodeOverLimit { site: String, detail: String },
    /// A site had the request and did not answer within a time-out: `limit` names it
    /// (the coordinator's `node_timeout_secs`, or the site's own `query_timeout_secs`),
    /// configuration only. Settled as a failure after data.
    #[error("site {site} did not answer in time ({limit})")]
    NodeTimedOut { site: String, limit: String },
    /// A site failed after it may have read data (a fault, a time-out, a malformed
    /// answer). Whether a query fails there could depend on a participant, so the failure
    /// is a release: ε stays charged. The node's details stay in its log; a time-out says
    /// so, with the limit (`timed_out`), which is configuration.
    #[error(
        "site {site} {} query {query_id}{}; ε = {epsilon} stays charged, because a failure after a site has read data could depend on that data. {}Retrying asks (and charges) again",
        if timed_out.is_some() { "timed out on" } else { "failed while answering" },
        timed_out.as_ref().map(|l| format!(" ({l})")).unwrap_or_default(),
        if timed_out.is_some() { "A query over fewer rows or groups answers faster. " } else { "The site's log has the details; " }
    )]
    NodeFailedAfterData {
        site: String,
        query_id: String,
        epsilon: f64,
        timed_out: Option<String>,
    },
    /// Post-processing of the noisy statistics failed (e.g. a division by a noisy zero).
    /// The message depends only on the query and the noisy values, so it is released like
    /// an answer: charged, and stored so the identical query returns it again for free.
    #[error("query {query_id}: computing the answer from the noisy statistics failed: {message}. {charge} Rewrite the expression so it cannot fail (e.g. NULLIF(x, 0) as a divisor)")]
    PostProcessing {
        query_id: String,
        message: String,
        /// What this outcome cost, said in words (charged now, or a free replay).
        charge: String,
    },
    /// A bug or an unexpected condition; details are only logged.
    #[error("internal error (query id {query_id}); the coordinator log has the details")]
    Internal { query_id: String, detail: String },
}

impl CoordinatorError {
    /// The site a node error names, if any.
    pub fn site(&self) -> Option<&str> {
        match self {
            CoordinatorError::NodeUnavailable { site, .. }
            | CoordinatorError::NodeFailed { site, .. }
            | CoordinatorError::NodeIncompatible { site, .. }
            | CoordinatorError::NodeRefused { site, .. }
            | CoordinatorError::NodeOverLimit { site, .. }
            | CoordinatorError::NodeTimedOut { site, .. }
            | CoordinatorError::NodeFailedAfterData { site, .. } => Some(site),
            _ => None,
        }
    }

    /// An internal error with a detail that is only logged.
    pub fn internal(query_id: &str, detail: impl Into<String>) -> Self {
        CoordinatorError::Internal {
            query_id: query_id.to_string(),
            detail: detail.into(),
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        match &e {
            CoordinatorError::Config(m) => Status::failed_precondition(m.clone()),
            CoordinatorError::InvalidSql(_) | CoordinatorError::InvalidArgument(_) => {
                Status::invalid_argument(e.to_string())
            }
            CoordinatorError::Refused(_) => Status::permission_denied(e.to_string()),
            CoordinatorError::BudgetExhausted { .. } => Status::resource_exhausted(e.to_string()),
            CoordinatorError::DatasetBudgetExhausted { .. }
            | CoordinatorError::DeltaBudgetExhausted { .. } => {
                Status::resource_exhausted(e.to_string())
            }
            CoordinatorError::NoBudget(_) | CoordinatorError::Forbidden(_) => {
                Status::permission_denied(e.to_string())
            }
            CoordinatorError::LedgerBusy(detail) => {
                tracing::warn!(detail = %detail, "ledger busy");
                Status::unavailable(
                    "the privacy ledger is busy; nothing was charged or released. Retry in a moment",
                )
            }
            CoordinatorError::LedgerCorrupt(detail)
            | CoordinatorError::LedgerUnavailable(detail) => {
                tracing::error!(detail = %detail, "ledger unavailable");
                Status::unavailable(
                    "the privacy ledger is unavailable; nothing was released. The coordinator log has the details",
                )
            }
            CoordinatorError::Unauthenticated(_) => Status::unauthenticated(e.to_string()),
            CoordinatorError::NodeUnavailable { .. } => Status::unavailable(e.to_string()),
            CoordinatorError::NodeFailed { .. } => Status::unavailable(e.to_string()),
            // Not UNAVAILABLE: a client that retries it automatically would pay again.
            CoordinatorError::NodeFailedAfterData {
                timed_out: Some(_), ..
            }
            | CoordinatorError::NodeTimedOut { .. } => Status::deadline_exceeded(e.to_string()),
            CoordinatorError::NodeFailedAfterData { .. } => Status::aborted(e.to_string()),
            CoordinatorError::PostProcessing { .. } => Status::invalid_argument(e.to_string()),
            // Not RESOURCE_EXHAUSTED, which means a spent budget: this passes in seconds.
            CoordinatorError::TooManyQueries(_) => Status::unavailable(e.to_string()),
            CoordinatorError::NodeIncompatible { .. } => Status::failed_precondition(e.to_string()),
            CoordinatorError::NodeRefused { .. } => Status::permission_denied(e.to_string()),
            CoordinatorError::NodeOverLimit { .. } => Status::resource_exhausted(e.to_string()),
            CoordinatorError::Internal { query_id, detail } => {
                tracing::error!(query_id = %query_id, detail = %detail, "internal error");
                Status::internal(e.to_string())
            }
        }
    }
}

/// Result alias.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
