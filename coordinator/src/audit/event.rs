//! The audit log's schema, for officers and for independent verifiers.
//!
//! Every entry is an [`AuditEntry`]: `{"actor", "body", "kind", "seq", "ts"}`, stored as its
//! RFC 8785 (JCS) canonical JSON text. `kind` and `body` are one [`AuditEvent`]: the
//! variant's `rename` is the `kind`, and its body struct (documented field by field below) is
//! the `body`. Entries that change a budget, a charge, a stored answer or a user carry
//! the full state they leave behind ([`BudgetState`], [`ChargeState`], [`StoredAnswer`],
//! the user's role and password fingerprint), so `fedq audit verify` can recompute the
//! ledger's tables from the chain and name the first disagreement.
//!
//! Exact amounts are [`Units`]: integers of 10⁻⁹ ε or 10⁻¹⁸ δ written as decimal strings,
//! because JSON numbers are doubles and cannot hold every δ amount exactly. The `epsilon`
//! and `delta` numbers beside them are for people.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::auth::Role;
use crate::ledger::BudgetKind;

/// An exact ledger amount (ε in units of 10⁻⁹, δ in units of 10⁻¹⁸), written as a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Units(pub i64);

impl Serialize for Units {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for Units {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Units, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<i64>()
            .map(Units)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a whole number of units")))
    }
}

/// One row of the `budgets` table: a budget's whole state after an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetState {
    /// `researcher` or `dataset`.
    pub kind: BudgetKind,
    /// Researcher or dataset name.
    pub name: String,
    /// ε granted for the current period.
    pub epsilon_granted: Units,
    /// δ granted.
    pub delta_granted: Units,
    /// ε spent in the current period.
    pub epsilon_spent: Units,
    /// δ spent in the current period.
    pub delta_spent: Units,
    /// Renewal period in milliseconds, if the budget renews.
    pub renewal_ms: Option<i64>,
    /// Start of the current period, milliseconds since 1970.
    pub period_start_ms: i64,
    /// A revoked budget answers nothing.
    pub revoked: bool,
}

/// A charge's life: `charged`, then `released` or `refunded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeStatus {
    /// Spent; the query is under way (or the coordinator stopped during it).
    Charged,
    /// Final: something was released (an answer, an error after the noise, a failure
    /// after data was read).
    Released,
    /// Given back: nothing was released.
    Refunded,
}

impl ChargeStatus {
    /// The `state` column's text.
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeStatus::Charged => "charged",
            ChargeStatus::Released => "released",
            ChargeStatus::Refunded => "refunded",
        }
    }

    /// Parse the `state` column.
    pub fn parse(s: &str) -> Option<ChargeStatus> {
        match s {
            "charged" => Some(ChargeStatus::Charged),
            "released" => Some(ChargeStatus::Released),
            "refunded" => Some(ChargeStatus::Refunded),
            _ => None,
        }
    }
}

/// One row of the `charges` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChargeState {
    /// Query id.
    pub query_id: String,
    /// Researcher charged.
    pub researcher: String,
    /// Datasets charged.
    pub datasets: Vec<String>,
    /// Canonical plan hash.
    pub plan_hash: String,
    /// ε charged.
    pub epsilon: Units,
    /// δ charged.
    pub delta: Units,
    /// Where the charge stands.
    pub state: ChargeStatus,
    /// When it was charged, milliseconds since 1970.
    pub charged_at_ms: i64,
    /// When it was released or refunded.
    pub settled_at_ms: Option<i64>,
}

/// A stored answer (a row of the `replays` table, keyed by researcher and plan hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredAnswer {
    /// SHA3-256 of the stored bytes (the Arrow IPC answer, or the tagged error text).
    pub sha3: String,
    /// When it was stored, milliseconds since 1970.
    pub created_at_ms: i64,
}

/// How a query ended, as the entry's `outcome` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryOutcome {
    /// Charged, before any hospital had the request.
    Charged,
    /// An answer was stored and released.
    Released,
    /// Post-processing of the noisy statistics failed; the error is the release.
    PostProcessingError,
    /// Every failing hospital refused before reading data; the charge was given back.
    Refunded,
    /// The stored answer of an identical query, at no cost.
    Replayed,
    /// Refused before any charge.
    Refused,
    /// A hospital failed before anything was charged.
    Failed,
    /// A hospital failed after it may have read data; the charge stands.
    FailedAfterData,
    /// `EXPLAIN`: planned, nothing asked or charged.
    Explained,
}

/// One statistic's exact share of a query's ε.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpsilonShare {
    /// The statistic.
    pub statistic: String,
    /// Its ε share, an exact rational.
    pub epsilon: String,
}

/// What the log says about a planned query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryFacts {
    /// Query id, shared with the hospitals' logs.
    pub query_id: String,
    /// Who asked.
    pub researcher: String,
    /// The SQL text as received.
    pub sql: String,
    /// Canonical plan hash; absent when the query was refused before it had a plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_hash: Option<String>,
    /// ε the query spends (0 for a replay).
    pub epsilon: f64,
    /// δ the query spends.
    #[serde(default)]
    pub delta: f64,
    /// Datasets whose global budgets it draws on.
    #[serde(default)]
    pub datasets: Vec<String>,
    /// Sites it is sent to.
    #[serde(default)]
    pub sites_asked: Vec<String>,
    /// How ε is split over its noisy statistics.
    #[serde(default)]
    pub epsilon_split: Vec<EpsilonShare>,
}

/// `query.charged`: the query's budgets were charged, in the same transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryCharged {
    /// The query.
    #[serde(flatten)]
    pub query: QueryFacts,
    /// Sites the request went to.
    pub sites_dispatched: Vec<String>,
    /// Always `charged`.
    pub outcome: QueryOutcome,
    /// The charge as stored.
    pub charge: ChargeState,
    /// Every budget charged (the researcher's first, then each dataset's), after the charge.
    pub budgets_after: Vec<BudgetState>,
}

/// `query.released`: the outcome was stored and marked released.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryReleased {
    /// Query id.
    pub query_id: String,
    /// Researcher.
    pub researcher: String,
    /// Plan hash, the key of the stored answer.
    pub plan_hash: String,
    /// ε charged for it.
    pub epsilon: f64,
    /// `released` or `post_processing_error`.
    pub outcome: QueryOutcome,
    /// The post-processing error, when that is the outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the charge was settled.
    pub settled_at_ms: i64,
    /// The stored answer (ignored when the same researcher and plan already had one).
    pub stored: StoredAnswer,
}

/// `query.failed_after_data`: a hospital failed after it may have read data. The charge
/// stands (settled as released) and nothing is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryFailedAfterData {
    /// Query id.
    pub query_id: String,
    /// Researcher.
    pub researcher: String,
    /// Plan hash.
    pub plan_hash: String,
    /// ε charged and kept.
    pub epsilon_charged: f64,
    /// The site that failed.
    pub site_failed: String,
    /// Always `failed_after_data`.
    pub outcome: QueryOutcome,
    /// Why, in words.
    pub reason: String,
    /// When the charge was settled.
    pub settled_at_ms: i64,
}

/// `query.refunded`: every failing hospital refused before reading data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRefunded {
    /// Query id.
    pub query_id: String,
    /// Researcher.
    pub researcher: String,
    /// ε given back.
    pub epsilon: f64,
    /// Always `refunded`.
    pub outcome: QueryOutcome,
    /// Why, in words.
    pub reason: String,
    /// When.
    pub settled_at_ms: i64,
    /// The budgets given back to, after the refund (a budget renewed since the charge is
    /// not given back to, and is not listed).
    pub budgets_after: Vec<BudgetState>,
}

/// `query.replayed`: an identical query got the stored answer, at no cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryReplayed {
    /// The query (ε and δ 0).
    #[serde(flatten)]
    pub query: QueryFacts,
    /// Query id of the charged original.
    pub replay_of: String,
    /// Always `replayed`.
    pub outcome: QueryOutcome,
}

/// `query.refused`, `query.failed` (before any charge) and `query.explained`: a query that
/// changed no budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryUncharged {
    /// The query.
    #[serde(flatten)]
    pub query: QueryFacts,
    /// Always 0.
    pub epsilon_charged: f64,
    /// `refused`, `failed` or `explained`.
    pub outcome: QueryOutcome,
    /// The site that failed, for `query.failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_failed: Option<String>,
    /// Why, in words (absent for `explained`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `budget.granted`: ε (and δ) added, a budget created, or a revocation lifted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetGranted {
    /// ε added.
    pub epsilon: f64,
    /// δ added.
    pub delta: f64,
    /// ε added, exactly.
    pub epsilon_units: Units,
    /// δ added, exactly.
    pub delta_units: Units,
    /// The renewal period set by this grant, in days (`None` keeps the current one).
    pub renewal_days: Option<f64>,
    /// The budget after the grant.
    pub after: BudgetState,
}

/// `budget.revoked`: ε taken back, or the whole budget revoked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetRevoked {
    /// ε taken back; `None` revokes the budget.
    pub epsilon: Option<f64>,
    /// ε taken back, exactly.
    pub epsilon_units: Option<Units>,
    /// The budget after.
    pub after: BudgetState,
}

/// `budget.renewed`: a renewing budget started a new period (spent back to 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetRenewed {
    /// Start of the new period (RFC 3339).
    pub period_start: String,
    /// The budget after.
    pub after: BudgetState,
}

/// `user.added`: an account was created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserAdded {
    /// User name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// SHA3-256 of the stored Argon2 hash (never the hash or the password): shows that the
    /// stored credential is the one that was added.
    pub password_fingerprint: String,
}

/// `user.disabled` and `user.enabled`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserNamed {
    /// User name.
    pub name: String,
}

/// `policy.changed`: the catalog, policy or datasets differ from the last ones recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyChanged {
    /// Hash recorded before.
    pub previous_hash: Option<String>,
    /// SHA3-256 of the new policy's canonical JSON.
    pub hash: String,
    /// The new catalog, policy and datasets.
    pub policy: Value,
}

/// `answers.pruned`: stored answers older than the retention period were deleted (the
/// same queries are then answered, and charged, afresh).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswersPruned {
    /// `stored_answer_retention_days` in force.
    pub retention_days: f64,
    /// Every stored answer created before this (milliseconds since 1970) was deleted.
    pub older_than_ms: i64,
    /// How many.
    pub count: u64,
}

/// `coordinator.started`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorStarted {
    /// fedq version.
    pub version: String,
    /// Hash of the policy in force.
    pub policy_hash: String,
    /// Charges a crash left `charged` (kept: spent is never below what was released).
    pub unsettled_charges_kept: i64,
}

/// `officer.denied`: a user without the officer role tried an officer action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfficerDenied {
    /// The Flight action.
    pub action: String,
    /// Always `denied`.
    pub outcome: String,
}

/// `login.failed`: a wrong password or an unknown user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginFailed {
    /// The user name given, escaped (control characters written out, at most 64 characters).
    pub user: String,
    /// The client's IP address.
    pub client: String,
    /// Failures in a row for this user name, this one included.
    pub failures: u32,
    /// How long the next attempt for this name or from this address is held back, if it is.
    pub held_back_secs: Option<u64>,
    /// The user name is now locked until an officer runs `fedq user unlock`.
    pub locked: bool,
}

/// `login.unlocked`: an officer lifted a user's login lockout and back-off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginUnlocked {
    /// User name.
    pub name: String,
    /// Whether there was a lockout or back-off to lift.
    pub lifted: bool,
}

/// Everything the audit log records. `kind` is the variant's name below; `body` its struct.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body")]
pub enum AuditEvent {
    /// A query was charged, before any hospital received it.
    #[serde(rename = "query.charged")]
    QueryCharged(QueryCharged),
    /// Its outcome was stored and released.
    #[serde(rename = "query.released")]
    QueryReleased(QueryReleased),
    /// A hospital failed after it may have read data; the charge stands.
    #[serde(rename = "query.failed_after_data")]
    QueryFailedAfterData(QueryFailedAfterData),
    /// The charge was given back.
    #[serde(rename = "query.refunded")]
    QueryRefunded(QueryRefunded),
    /// An identical query got the stored answer.
    #[serde(rename = "query.replayed")]
    QueryReplayed(QueryReplayed),
    /// Refused (planning, budget exhausted, no budget); nothing charged.
    #[serde(rename = "query.refused")]
    QueryRefused(QueryUncharged),
    /// A hospital was unreachable or refused before anything was charged.
    #[serde(rename = "query.failed")]
    QueryFailed(QueryUncharged),
    /// `EXPLAIN`: free, no hospital asked.
    #[serde(rename = "query.explained")]
    QueryExplained(QueryUncharged),
    /// A budget was granted to.
    #[serde(rename = "budget.granted")]
    BudgetGranted(BudgetGranted),
    /// A budget was reduced or revoked.
    #[serde(rename = "budget.revoked")]
    BudgetRevoked(BudgetRevoked),
    /// A budget started a new period.
    #[serde(rename = "budget.renewed")]
    BudgetRenewed(BudgetRenewed),
    /// An account was created.
    #[serde(rename = "user.added")]
    UserAdded(UserAdded),
    /// An account was disabled.
    #[serde(rename = "user.disabled")]
    UserDisabled(UserNamed),
    /// An account was enabled again.
    #[serde(rename = "user.enabled")]
    UserEnabled(UserNamed),
    /// A failed login.
    #[serde(rename = "login.failed")]
    LoginFailed(LoginFailed),
    /// An officer lifted a lockout.
    #[serde(rename = "login.unlocked")]
    LoginUnlocked(LoginUnlocked),
    /// A non-officer tried an officer action.
    #[serde(rename = "officer.denied")]
    OfficerDenied(OfficerDenied),
    /// The catalog, policy or datasets changed.
    #[serde(rename = "policy.changed")]
    PolicyChanged(PolicyChanged),
    /// Stored answers past their retention were deleted.
    #[serde(rename = "answers.pruned")]
    AnswersPruned(AnswersPruned),
    /// The coordinator started.
    #[serde(rename = "coordinator.started")]
    CoordinatorStarted(CoordinatorStarted),
}

/// One entry of the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// Position in the chain, from 1.
    pub seq: i64,
    /// When (RFC 3339, milliseconds, UTC).
    pub ts: String,
    /// Who: a user, `coordinator.toml`, `coordinator` or `ledger`.
    pub actor: String,
    /// What happened.
    pub event: AuditEvent,
}

impl AuditEntry {
    /// The stored text: RFC 8785 canonical JSON.
    pub fn to_canonical(&self) -> Result<String, String> {
        let mut v = serde_json::to_value(&self.event).map_err(|e| e.to_string())?;
        let Value::Object(m) = &mut v else {
            return Err("an audit event is not a JSON object".into());
        };
        m.insert("seq".into(), Value::from(self.seq));
        m.insert("ts".into(), Value::from(self.ts.clone()));
        m.insert("actor".into(), Value::from(self.actor.clone()));
        serde_jcs::to_string(&v).map_err(|e| e.to_string())
    }

    /// Parse a stored entry.
    pub fn parse(text: &str) -> Result<AuditEntry, String> {
        let mut v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let Value::Object(m) = &mut v else {
            return Err("not a JSON object".into());
        };
        let seq = m
            .remove("seq")
            .and_then(|s| s.as_i64())
            .ok_or("no sequence number")?;
        let ts = match m.remove("ts") {
            Some(Value::String(s)) => s,
            _ => return Err("no timestamp".into()),
        };
        let actor = match m.remove("actor") {
            Some(Value::String(s)) => s,
            _ => return Err("no actor".into()),
        };
        if m.len() != 2 || !m.contains_key("kind") || !m.contains_key("body") {
            return Err("an entry has exactly actor, body, kind, seq and ts".into());
        }
        let event = serde_json::from_value(v).map_err(|e| e.to_string())?;
        Ok(AuditEntry {
            seq,
            ts,
            actor,
            event,
        })
    }
}
