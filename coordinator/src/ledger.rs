//! The privacy ledger: budgets, charges, stored answers for free replays, and the audit
//! chain, in one SQLite file (WAL mode, `synchronous = FULL`).
//!
//! ## Rules
//! - **Atomic charge before release.** [`Ledger::charge`] runs in one `BEGIN IMMEDIATE`
//!   transaction: it checks the researcher's budget and the global budget of every dataset
//!   the query's table belongs to, updates them, records the charge and appends its audit
//!   entry, and commits before the caller samples any noise. SQLite serialises writers
//!   (across threads and processes), so concurrent charges never overspend.
//! - **Exact accounting.** ε is kept in integer units of 10⁻⁹ (δ: 10⁻¹⁸); a charge rounds up
//!   and a grant rounds down, so rounding never lets a researcher spend more than granted.
//! - **Refund exactly once, never after release.** A charge is `charged`, then either
//!   `released` or `refunded`; both transitions are conditional on `charged`, so a second
//!   refund or a refund after release changes nothing. A crash between charge and release
//!   leaves the charge in place (conservative: spent ≥ released).
//! - **Every change is audited in the same transaction** (charges, refusals, refunds,
//!   releases, replays, grants, revocations, renewals, policy changes); see [`crate::audit`].

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{
    params, Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior,
};
use serde_json::{json, Value};
use sha3::{Digest, Sha3_256};

use crate::audit::event::{
    AnswersPruned, AuditEntry, AuditEvent, BudgetGranted, BudgetRenewed, BudgetRevoked,
    BudgetState, ChargeState, ChargeStatus, CoordinatorStarted, EpsilonShare, PolicyChanged,
    QueryCharged, QueryFacts, QueryFailedAfterData, QueryOutcome, QueryRefunded, QueryReleased,
    QueryReplayed, QueryUncharged, StoredAnswer, Units, UserAdded, UserNamed,
};
use crate::audit::reconcile::sha3_hex;
use crate::audit::{self, canonical_json, chain_hash, VerifyReport, GENESIS};
use crate::auth::Role;
use crate::config::CoordinatorConfig;
use crate::error::CoordinatorError;

/// ε units per 1 ε.
const EPS_UNIT: f64 = 1e9;
/// δ units per 1 δ.
const DELTA_UNIT: f64 = 1e18;
/// Largest ε a budget or a grant may hold.
pub const MAX_EPSILON: f64 = 1e6;
/// Identifies the file as a fedq ledger, and its schema version. Version 2 writes typed,
/// RFC 8785 canonical audit entries that carry the state they leave behind.
const SCHEMA: &str = "fedq-ledger-2";
const MS_PER_DAY: f64 = 86_400_000.0;
/// Largest ledger file whose SQLite `quick_check` runs at every start (its time grows with
/// the file).
const QUICK_CHECK_MAX_BYTES: u64 = 256 << 20;

const DDL: &str = "
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS budgets(
  kind TEXT NOT NULL CHECK (kind IN ('researcher', 'dataset')),
  name TEXT NOT NULL,
  epsilon_granted INTEGER NOT NULL CHECK (epsilon_granted >= 0),
  delta_granted INTEGER NOT NULL CHECK (delta_granted >= 0),
  epsilon_spent INTEGER NOT NULL CHECK (epsilon_spent >= 0),
  delta_spent INTEGER NOT NULL CHECK (delta_spent >= 0),
  renewal_ms INTEGER,
  period_start INTEGER NOT NULL,
  revoked INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (kind, name)) STRICT;
CREATE TABLE IF NOT EXISTS charges(
  query_id TEXT PRIMARY KEY,
  researcher TEXT NOT NULL,
  datasets TEXT NOT NULL,
  plan_hash TEXT NOT NULL,
  epsilon INTEGER NOT NULL,
  delta INTEGER NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('charged', 'released', 'refunded')),
  charged_at INTEGER NOT NULL,
  settled_at INTEGER) STRICT;
CREATE TABLE IF NOT EXISTS replays(
  researcher TEXT NOT NULL,
  plan_hash TEXT NOT NULL,
  query_id TEXT NOT NULL,
  result BLOB NOT NULL,
  created_at INTEGER NOT NULL,
  PRIMARY KEY (researcher, plan_hash)) STRICT;
CREATE TABLE IF NOT EXISTS users(
  name TEXT PRIMARY KEY,
  role TEXT NOT NULL CHECK (role IN ('researcher', 'officer')),
  password_hash TEXT NOT NULL,
  disabled INTEGER NOT NULL DEFAULT 0,
  created_at INTEGER NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS audit(
  seq INTEGER PRIMARY KEY,
  entry TEXT NOT NULL,
  prev_hash TEXT NOT NULL,
  hash TEXT NOT NULL) STRICT;
";

/// Map a SQLite error to a clear coordinator error.
pub(crate) fn ledger_error(path: &Path, e: rusqlite::Error) -> CoordinatorError {
    ledger_error_ref(path, &e)
}

/// [`ledger_error`] of a borrowed error (one error reported to several callers).
pub(crate) fn ledger_error_ref(path: &Path, e: &rusqlite::Error) -> CoordinatorError {
    let p = path.display();
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => {
            CoordinatorError::LedgerBusy(format!(
                "the ledger {p} is locked by another process; nothing was charged or changed. Retry, or stop the other process"
            ))
        }
        Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt) => {
            CoordinatorError::LedgerCorrupt(format!(
                "the ledger {p} is not a readable fedq ledger ({e}); do not delete it: restore it from a backup and check it with `fedq audit verify --ledger {p}`"
            ))
        }
        Some(ErrorCode::CannotOpen) | Some(ErrorCode::PermissionDenied) | Some(ErrorCode::ReadOnly) => {
            CoordinatorError::LedgerUnavailable(format!(
                "cannot open the ledger {p} for writing ({e}); check the path and its permissions"
            ))
        }
        Some(ErrorCode::DiskFull) => CoordinatorError::LedgerUnavailable(format!(
            "the disk holding the ledger {p} is full; nothing was charged or changed"
        )),
        _ => CoordinatorError::LedgerUnavailable(format!("ledger {p}: {e}")),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

/// Check an ε or δ given by a person or a query: a finite number, not negative.
pub fn check_amount(what: &str, v: f64, max: f64) -> Result<(), CoordinatorError> {
    if !v.is_finite() || v < 0.0 {
        return Err(CoordinatorError::InvalidArgument(format!(
            "{what} must be a non-negative number, got {v}"
        )));
    }
    if v > max {
        return Err(CoordinatorError::InvalidArgument(format!(
            "{what} = {v} is above the largest accepted value {max}"
        )));
    }
    Ok(())
}

/// Units of a charge: rounded up, and at least one unit for any positive amount, so no
/// released answer is ever charged 0 (`SET fedq.epsilon = 1e-16` costs one unit, 10⁻⁹ ε).
/// Artefacts of binary floating point within 10⁻⁶ of a whole unit (0.1·10⁹ is
/// 100000000.00000001) are rounded to it: at most 10⁻¹⁵ ε, far below the noise's own
/// calibration error.
fn charge_units(v: f64, unit: f64) -> i64 {
    let x = v * unit;
    let r = x.round();
    let units = if (x - r).abs() < 1e-6 {
        r as i64
    } else {
        x.ceil() as i64
    };
    if v > 0.0 {
        units.max(1)
    } else {
        units
    }
}

/// Units of a grant: rounded down (with the same tolerance).
fn grant_units(v: f64, unit: f64) -> i64 {
    let x = v * unit;
    let r = x.round();
    if (x - r).abs() < 1e-6 {
        r as i64
    } else {
        x.floor() as i64
    }
}

/// Mark an outstanding charge final (state `released`: an answer, a post-processing error
/// or a failure after data was released), or say it was not outstanding.
fn settle(
    tx: &Transaction,
    charge: &Charge,
    now: i64,
) -> rusqlite::Result<Result<(), CoordinatorError>> {
    let n = tx.execute(
        "UPDATE charges SET state = 'released', settled_at = ?2 WHERE query_id = ?1 AND state = 'charged'",
        params![charge.query_id, now],
    )?;
    Ok(if n == 0 {
        Err(CoordinatorError::internal(
            &charge.query_id,
            "settling a charge that is not outstanding",
        ))
    } else {
        Ok(())
    })
}

/// Whose budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetKind {
    /// One researcher's own budget.
    Researcher,
    /// A global budget over a dataset (a named set of catalog tables), shared by everyone.
    Dataset,
}

impl BudgetKind {
    /// `researcher` or `dataset`, as stored.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            BudgetKind::Researcher => "researcher",
            BudgetKind::Dataset => "dataset",
        }
    }
}

/// A budget's state, as shown to its researcher or to a privacy officer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BudgetStatus {
    /// Researcher or dataset.
    pub kind: BudgetKind,
    /// Researcher or dataset name.
    pub name: String,
    /// Total ε granted for the current period.
    pub epsilon_budget: f64,
    /// ε spent in the current period.
    pub epsilon_spent: f64,
    /// ε remaining.
    pub epsilon_remaining: f64,
    /// Total δ granted.
    pub delta_budget: f64,
    /// δ spent.
    pub delta_spent: f64,
    /// δ remaining.
    pub delta_remaining: f64,
    /// Renewal period in days, if the budget renews.
    pub renewal_days: Option<f64>,
    /// When the current period ends (RFC 3339), if the budget renews.
    pub period_ends: Option<String>,
    /// A revoked budget answers nothing.
    pub revoked: bool,
}

#[derive(Debug, Clone)]
struct Row {
    kind: BudgetKind,
    name: String,
    eps_granted: i64,
    delta_granted: i64,
    eps_spent: i64,
    delta_spent: i64,
    renewal_ms: Option<i64>,
    period_start: i64,
    revoked: bool,
}

impl Row {
    /// The row as the audit log records it.
    fn state(&self) -> BudgetState {
        BudgetState {
            kind: self.kind,
            name: self.name.clone(),
            epsilon_granted: Units(self.eps_granted),
            delta_granted: Units(self.delta_granted),
            epsilon_spent: Units(self.eps_spent),
            delta_spent: Units(self.delta_spent),
            renewal_ms: self.renewal_ms,
            period_start_ms: self.period_start,
            revoked: self.revoked,
        }
    }

    /// Start a new period if the current one is over; true if it did.
    fn renew(&mut self, now: i64) -> bool {
        match self.renewal_ms {
            Some(p) if p > 0 && now >= self.period_start + p => {
                let k = (now - self.period_start) / p;
                self.period_start += k * p;
                self.eps_spent = 0;
                self.delta_spent = 0;
                true
            }
            _ => false,
        }
    }

    fn status(&self, now: i64) -> BudgetStatus {
        let mut r = self.clone();
        r.renew(now);
        let e = |u: i64| u as f64 / EPS_UNIT;
        let d = |u: i64| u as f64 / DELTA_UNIT;
        BudgetStatus {
            kind: r.kind,
            name: r.name.clone(),
            epsilon_budget: e(r.eps_granted),
            epsilon_spent: e(r.eps_spent),
            epsilon_remaining: e((r.eps_granted - r.eps_spent).max(0)),
            delta_budget: d(r.delta_granted),
            delta_spent: d(r.delta_spent),
            delta_remaining: d((r.delta_granted - r.delta_spent).max(0)),
            renewal_days: r.renewal_ms.map(|p| p as f64 / MS_PER_DAY),
            period_ends: r.renewal_ms.map(|p| rfc3339(r.period_start + p)),
            revoked: r.revoked,
        }
    }
}

fn load(tx: &Connection, kind: BudgetKind, name: &str) -> rusqlite::Result<Option<Row>> {
    tx.query_row(
        "SELECT epsilon_granted, delta_granted, epsilon_spent, delta_spent, renewal_ms, period_start, revoked
         FROM budgets WHERE kind = ?1 AND name = ?2",
        params![kind.as_str(), name],
        |r| {
            Ok(Row {
                kind,
                name: name.to_string(),
                eps_granted: r.get(0)?,
                delta_granted: r.get(1)?,
                eps_spent: r.get(2)?,
                delta_spent: r.get(3)?,
                renewal_ms: r.get(4)?,
                period_start: r.get(5)?,
                revoked: r.get::<_, i64>(6)? != 0,
            })
        },
    )
    .optional()
}

fn save(tx: &Transaction, r: &Row) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO budgets(kind, name, epsilon_granted, delta_granted, epsilon_spent, delta_spent, renewal_ms, period_start, revoked)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT(kind, name) DO UPDATE SET epsilon_granted = ?3, delta_granted = ?4,
           epsilon_spent = ?5, delta_spent = ?6, renewal_ms = ?7, period_start = ?8, revoked = ?9",
        params![
            r.kind.as_str(),
            r.name,
            r.eps_granted,
            r.delta_granted,
            r.eps_spent,
            r.delta_spent,
            r.renewal_ms,
            r.period_start,
            r.revoked as i64
        ],
    )?;
    Ok(())
}

fn get_meta(tx: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    tx.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

fn set_meta(tx: &Transaction, key: &str, value: &str) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
        params![key, value],
    )?;
    Ok(())
}

/// Append one entry to the audit chain, inside the caller's transaction.
fn append(tx: &Transaction, now: i64, actor: &str, event: AuditEvent) -> rusqlite::Result<i64> {
    let count: i64 = get_meta(tx, audit::META_COUNT)?
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let head = get_meta(tx, audit::META_HEAD)?.unwrap_or_else(|| GENESIS.to_string());
    let seq = count + 1;
    let entry = AuditEntry {
        seq,
        ts: rfc3339(now),
        actor: actor.to_string(),
        event,
    }
    .to_canonical()
    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))?;
    let hash = chain_hash(&head, &entry);
    tx.execute(
        "INSERT INTO audit(seq, entry, prev_hash, hash) VALUES (?1, ?2, ?3, ?4)",
        params![seq, entry, head, hash],
    )?;
    set_meta(tx, audit::META_COUNT, &seq.to_string())?;
    set_meta(tx, audit::META_HEAD, &hash)?;
    Ok(seq)
}

/// Append a `budget.renewed` entry if `row` starts a new period now.
fn renew_audited(tx: &Transaction, row: &mut Row, now: i64) -> rusqlite::Result<()> {
    if row.renew(now) {
        save(tx, row)?;
        append(
            tx,
            now,
            "ledger",
            AuditEvent::BudgetRenewed(BudgetRenewed {
                period_start: rfc3339(row.period_start),
                after: row.state(),
            }),
        )?;
    }
    Ok(())
}

/// What the ledger records about a query.
#[derive(Debug, Clone)]
pub struct QueryRecord {
    /// Query id shared with the nodes' logs.
    pub query_id: String,
    /// Who asked.
    pub researcher: String,
    /// SQL text as received.
    pub sql: String,
    /// Canonical plan hash (see [`crate::engine::plan_hash`]).
    pub plan_hash: String,
    /// ε the query spends.
    pub epsilon: f64,
    /// δ the query spends.
    pub delta: f64,
    /// Datasets whose global budgets the query draws on.
    pub datasets: Vec<String>,
    /// Sites the query is sent to.
    pub sites_asked: Vec<String>,
    /// How ε is split: one (statistic, exact ε share as a rational) per noisy statistic.
    pub epsilon_split: Vec<(String, String)>,
}

impl QueryRecord {
    /// What the audit log says about the query.
    pub fn facts(&self) -> QueryFacts {
        QueryFacts {
            query_id: self.query_id.clone(),
            researcher: self.researcher.clone(),
            sql: self.sql.clone(),
            plan_hash: Some(self.plan_hash.clone()),
            epsilon: self.epsilon,
            delta: self.delta,
            datasets: self.datasets.clone(),
            sites_asked: self.sites_asked.clone(),
            epsilon_split: self
                .epsilon_split
                .iter()
                .map(|(statistic, epsilon)| EpsilonShare {
                    statistic: statistic.clone(),
                    epsilon: epsilon.clone(),
                })
                .collect(),
        }
    }
}

/// Proof of a charge: give it to [`Ledger::released`], [`Ledger::failed_after_data`] or
/// [`Ledger::refund`].
#[derive(Debug, PartialEq)]
#[must_use = "a charge must be released or refunded"]
pub struct Charge {
    /// Query id the charge belongs to.
    pub query_id: String,
    /// Researcher charged.
    pub researcher: String,
    /// Plan hash, the key of the stored answer.
    pub plan_hash: String,
    /// ε charged: the query's ε rounded up to whole ledger units.
    pub epsilon: f64,
}

/// One charge as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ChargeRow {
    /// Query id.
    pub query_id: String,
    /// Researcher.
    pub researcher: String,
    /// Datasets charged.
    pub datasets: Vec<String>,
    /// ε charged.
    pub epsilon: f64,
    /// `charged`, `released` or `refunded`.
    pub state: String,
}

/// A stored answer returned for free.
#[derive(Debug, Clone)]
pub struct Replay {
    /// Query id of the charged original.
    pub original_query_id: String,
    /// What the charged original released.
    pub outcome: StoredOutcome,
}

/// What a charged query released, stored so that the identical query (same researcher,
/// same canonical plan) gets the same outcome again at no cost, instead of a fresh draw of
/// the noise.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredOutcome {
    /// The answer, Arrow IPC stream bytes.
    Answer(Vec<u8>),
    /// Post-processing of the noisy statistics failed (e.g. a division by a noisy zero):
    /// the error, a function of the noisy values and the query only, is itself a charged
    /// release.
    PostProcessingError(String),
}

/// Stored error outcomes start with this tag; an Arrow IPC stream never does (it starts
/// with the 0xFFFFFFFF continuation marker or a message length), so ledgers written before
/// error outcomes existed read unchanged.
const STORED_ERROR_TAG: &[u8] = b"fedq.post_processing_error\n";

impl StoredOutcome {
    fn to_blob(&self) -> Vec<u8> {
        match self {
            StoredOutcome::Answer(ipc) => ipc.clone(),
            StoredOutcome::PostProcessingError(m) => {
                let mut b = STORED_ERROR_TAG.to_vec();
                b.extend_from_slice(m.as_bytes());
                b
            }
        }
    }

    fn from_blob(b: Vec<u8>) -> StoredOutcome {
        match b.strip_prefix(STORED_ERROR_TAG) {
            Some(m) => StoredOutcome::PostProcessingError(String::from_utf8_lossy(m).into_owned()),
            None => StoredOutcome::Answer(b),
        }
    }

    fn audit_outcome(&self) -> QueryOutcome {
        match self {
            StoredOutcome::Answer(_) => QueryOutcome::Released,
            StoredOutcome::PostProcessingError(_) => QueryOutcome::PostProcessingError,
        }
    }
}

/// An officer's grant, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// Researcher or dataset.
    pub kind: BudgetKind,
    /// Its name.
    pub name: String,
    /// ε added to the budget.
    pub epsilon: f64,
    /// δ added to the budget.
    pub delta: f64,
    /// New renewal period in days; `None` keeps the current one.
    pub renewal_days: Option<f64>,
}

impl Grant {
    /// Check the amounts.
    pub fn validate(&self) -> Result<(), CoordinatorError> {
        if self.name.trim().is_empty() {
            return Err(CoordinatorError::InvalidArgument(
                "a grant needs a researcher or dataset name".into(),
            ));
        }
        check_amount("ε", self.epsilon, MAX_EPSILON)?;
        check_amount("δ", self.delta, 1.0)?;
        if let Some(d) = self.renewal_days {
            if !(d.is_finite() && d > 0.0 && d <= 36_500.0) {
                return Err(CoordinatorError::InvalidArgument(format!(
                    "renewal period must be a positive number of days, got {d}"
                )));
            }
        }
        Ok(())
    }
}

/// A user as stored in the ledger.
#[derive(Clone)]
pub struct UserRow {
    /// User name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Argon2 PHC hash of the password.
    pub password_hash: String,
    /// A disabled user cannot log in.
    pub disabled: bool,
}

impl std::fmt::Debug for UserRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRow")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("disabled", &self.disabled)
            .finish_non_exhaustive()
    }
}

/// User names: 1–64 characters, letters, digits, `_`, `-`, `.`, `@`.
pub fn check_user_name(name: &str) -> Result<(), CoordinatorError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(CoordinatorError::InvalidArgument(format!(
            "user name {name:?} must be 1-64 letters, digits, '_', '-', '.' or '@'"
        )))
    }
}

/// The SQLite ledger.
pub struct Ledger {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// Added to the clock: 0, except where a test lets time pass.
    skew_ms: std::sync::atomic::AtomicI64,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("path", &self.path).finish()
    }
}

impl Ledger {
    /// Open (or create) the ledger file. Fails with a clear error on a file that is not a
    /// fedq ledger, is corrupt, or stays locked.
    pub fn open(path: &Path) -> Result<Ledger, CoordinatorError> {
        let err = |e| ledger_error(path, e);
        let mut conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(CoordinatorError::LedgerUnavailable(format!(
                "the ledger {} cannot use WAL mode (got {mode}); put it on a local file system",
                path.display()
            )));
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
            .map_err(err)?;
        // SQLite's check reads the whole file; above a size it would make start-up grow with
        // history, so it is left to an offline check (`fedq audit verify` reads every entry).
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let check: String = if size <= QUICK_CHECK_MAX_BYTES {
            conn.query_row("PRAGMA quick_check", [], |r| r.get(0))
                .map_err(err)?
        } else {
            tracing::info!(ledger = %path.display(), bytes = size, "ledger larger than 256 MiB: SQLite's quick_check skipped at start; run `fedq audit verify` offline");
            "ok".to_string()
        };
        if check != "ok" {
            return Err(CoordinatorError::LedgerCorrupt(format!(
                "the ledger {} failed SQLite's integrity check ({check}); do not delete it: restore it from a backup",
                path.display()
            )));
        }
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let tables: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'",
                [],
                |r| r.get(0),
            )
            .map_err(err)?;
        let has_meta: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
                [],
                |r| r.get(0),
            )
            .map_err(err)?;
        if tables > 0 && has_meta == 0 {
            return Err(CoordinatorError::LedgerCorrupt(format!(
                "{} is an SQLite file but not a fedq ledger; name a new file or the ledger in coordinator.toml",
                path.display()
            )));
        }
        tx.execute_batch(DDL).map_err(err)?;
        match get_meta(&tx, "schema").map_err(err)? {
            None => set_meta(&tx, "schema", SCHEMA).map_err(err)?,
            Some(s) if s == SCHEMA => {}
            Some(s) if s == "fedq-ledger-1" => {
                return Err(CoordinatorError::LedgerCorrupt(format!(
                    "the ledger {} was written by fedq 0.1 before the typed audit log (schema fedq-ledger-1); this fedq reads {SCHEMA:?} and has no upgrade for it. Nothing was changed: keep the file, verify it with the fedq that wrote it, and start this coordinator with a new `ledger` path",
                    path.display()
                )))
            }
            Some(s) => {
                return Err(CoordinatorError::LedgerCorrupt(format!(
                    "the ledger {} has schema {s:?}; this fedq reads {SCHEMA:?}",
                    path.display()
                )))
            }
        }
        tx.commit().map_err(err)?;
        Ok(Ledger {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
            skew_ms: std::sync::atomic::AtomicI64::new(0),
        })
    }

    /// The ledger's clock, milliseconds since 1970.
    fn now(&self) -> i64 {
        now_ms() + self.skew_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Let `ms` milliseconds pass on the ledger's clock (tests of renewal).
    #[cfg(test)]
    pub(crate) fn advance_clock(&self, ms: i64) {
        self.skew_ms
            .fetch_add(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db(&self) -> impl Fn(rusqlite::Error) -> CoordinatorError + '_ {
        move |e| ledger_error(&self.path, e)
    }

    /// Run `f` in one `BEGIN IMMEDIATE` transaction and commit. `f` returns the outcome to
    /// report (an `Err` outcome, such as a refusal, is still committed with its audit
    /// entry); a database error rolls everything back.
    fn write<T>(
        &self,
        f: impl FnOnce(&Transaction, i64) -> rusqlite::Result<Result<T, CoordinatorError>>,
    ) -> Result<T, CoordinatorError> {
        self.write_with(true, f)
    }

    /// A write transaction. `durable = false` commits without waiting for the disk
    /// (`synchronous = NORMAL`): the commit survives a crash of the process, and is made
    /// durable by the next durable commit, but a power loss before that may undo it. Use it
    /// only where losing the write errs on the safe side.
    fn write_with<T>(
        &self,
        durable: bool,
        f: impl FnOnce(&Transaction, i64) -> rusqlite::Result<Result<T, CoordinatorError>>,
    ) -> Result<T, CoordinatorError> {
        // A poisoned lock only means another thread panicked while holding the connection;
        // any transaction it had open was rolled back when it was dropped.
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if !durable {
            conn.execute_batch("PRAGMA synchronous = NORMAL")
                .map_err(self.db())?;
        }
        let result = (|| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(self.db())?;
            let out = f(&tx, self.now()).map_err(self.db())?;
            tx.commit().map_err(self.db())?;
            out
        })();
        if !durable {
            conn.execute_batch("PRAGMA synchronous = FULL")
                .map_err(self.db())?;
        }
        result
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, CoordinatorError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(self.db())
    }

    /// Seed budgets declared in the config that the ledger does not hold yet (the ledger is
    /// authoritative afterwards: officers change budgets with grant and revoke), record a
    /// `policy.changed` entry if the catalog, policy or datasets differ from the last ones
    /// recorded, and a `coordinator.started` entry.
    pub fn sync_config(&self, config: &CoordinatorConfig) -> Result<(), CoordinatorError> {
        let policy = json!({
            "catalog": serde_json::to_value(&config.catalog).unwrap_or(Value::Null),
            "policy": serde_json::to_value(&config.policy).unwrap_or(Value::Null),
            "datasets": serde_json::to_value(&config.datasets).unwrap_or(Value::Null),
        });
        let policy_text = canonical_json(&policy);
        let policy_hash = hex::encode(Sha3_256::digest(policy_text.as_bytes()));
        self.write(|tx, now| {
            let seeds = config
                .researchers
                .iter()
                .map(|r| {
                    (
                        BudgetKind::Researcher,
                        &r.name,
                        r.epsilon_budget,
                        r.delta_budget,
                        r.renewal_days,
                    )
                })
                .chain(config.datasets.iter().map(|d| {
                    (
                        BudgetKind::Dataset,
                        &d.name,
                        d.epsilon_budget,
                        d.delta_budget,
                        d.renewal_days,
                    )
                }));
            for (kind, name, eps, delta, renewal) in seeds {
                if let Some(existing) = load(tx, kind, name)? {
                    let want = grant_units(eps, EPS_UNIT);
                    if existing.eps_granted != want {
                        tracing::warn!(kind = kind.as_str(), name = %name,
                            ledger_epsilon = existing.eps_granted as f64 / EPS_UNIT, config_epsilon = eps,
                            "the ledger's budget differs from coordinator.toml; the ledger is authoritative (use `fedq budget grant|revoke`)");
                    }
                    continue;
                }
                let row = Row {
                    kind,
                    name: name.clone(),
                    eps_granted: grant_units(eps, EPS_UNIT),
                    delta_granted: grant_units(delta, DELTA_UNIT),
                    eps_spent: 0,
                    delta_spent: 0,
                    renewal_ms: renewal.map(|d| (d * MS_PER_DAY) as i64),
                    period_start: now,
                    revoked: false,
                };
                save(tx, &row)?;
                append(
                    tx,
                    now,
                    "coordinator.toml",
                    AuditEvent::BudgetGranted(BudgetGranted {
                        epsilon: eps,
                        delta,
                        epsilon_units: Units(row.eps_granted),
                        delta_units: Units(row.delta_granted),
                        renewal_days: renewal,
                        after: row.state(),
                    }),
                )?;
            }
            let users = config
                .researchers
                .iter()
                .filter_map(|r| Some((&r.name, Role::Researcher, r.password_argon2.as_ref()?)))
                .chain(
                    config
                        .officers
                        .iter()
                        .map(|o| (&o.name, Role::Officer, &o.password_argon2)),
                );
            for (name, role, hash) in users {
                let exists: Option<String> = tx
                    .query_row("SELECT role FROM users WHERE name = ?1", [name], |r| r.get(0))
                    .optional()?;
                if exists.is_some() {
                    continue;
                }
                insert_user(tx, now, "coordinator.toml", name, role, hash)?;
            }
            let previous = get_meta(tx, "policy_hash")?;
            if previous.as_deref() != Some(policy_hash.as_str()) {
                append(
                    tx,
                    now,
                    "coordinator.toml",
                    AuditEvent::PolicyChanged(PolicyChanged {
                        previous_hash: previous,
                        hash: policy_hash.clone(),
                        policy: policy.clone(),
                    }),
                )?;
                set_meta(tx, "policy_hash", &policy_hash)?;
            }
            if let Some(days) = config.stored_answer_retention_days {
                prune_answers(tx, now, days)?;
            }
            let in_flight: i64 = tx.query_row(
                "SELECT COUNT(*) FROM charges WHERE state = 'charged'",
                [],
                |r| r.get(0),
            )?;
            append(
                tx,
                now,
                "coordinator",
                AuditEvent::CoordinatorStarted(CoordinatorStarted {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    policy_hash: policy_hash.clone(),
                    unsettled_charges_kept: in_flight,
                }),
            )?;
            Ok(Ok(()))
        })
    }

    /// Delete stored answers older than `days` (audited as `answers.pruned`); returns how
    /// many. The coordinator does this at start-up when `stored_answer_retention_days` is set.
    pub fn prune_stored_answers(&self, days: f64) -> Result<u64, CoordinatorError> {
        self.write(|tx, now| prune_answers(tx, now, days).map(Ok))
    }

    /// Hash of the catalog, policy and datasets last recorded.
    pub fn policy_hash(&self) -> Result<Option<String>, CoordinatorError> {
        self.read(|c| get_meta(c, "policy_hash"))
    }

    /// A budget's state.
    pub fn status(&self, kind: BudgetKind, name: &str) -> Result<BudgetStatus, CoordinatorError> {
        let row = self.read(|c| load(c, kind, name))?;
        match row {
            Some(r) => Ok(r.status(self.now())),
            None => Err(no_budget(kind, name)),
        }
    }

    /// Every budget, researchers first.
    pub fn list(&self) -> Result<Vec<BudgetStatus>, CoordinatorError> {
        let now = self.now();
        self.read(|c| {
            let mut st = c.prepare("SELECT kind, name FROM budgets ORDER BY kind DESC, name")?;
            let keys = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            let mut out = Vec::new();
            for (k, n) in keys {
                let kind = if k == "dataset" {
                    BudgetKind::Dataset
                } else {
                    BudgetKind::Researcher
                };
                if let Some(r) = load(c, kind, &n)? {
                    out.push(r.status(now));
                }
            }
            Ok(out)
        })
    }

    /// Add ε (and δ) to a budget, creating it if needed, and lift a revocation. Audited.
    pub fn grant(&self, actor: &str, g: &Grant) -> Result<BudgetStatus, CoordinatorError> {
        g.validate()?;
        self.write(|tx, now| {
            let mut row = match load(tx, g.kind, &g.name)? {
                Some(mut r) => {
                    renew_audited(tx, &mut r, now)?;
                    r
                }
                None => Row {
                    kind: g.kind,
                    name: g.name.clone(),
                    eps_granted: 0,
                    delta_granted: 0,
                    eps_spent: 0,
                    delta_spent: 0,
                    renewal_ms: None,
                    period_start: now,
                    revoked: false,
                },
            };
            let eps = grant_units(g.epsilon, EPS_UNIT);
            let delta = grant_units(g.delta, DELTA_UNIT);
            row.eps_granted = row.eps_granted.saturating_add(eps);
            row.delta_granted = row.delta_granted.saturating_add(delta);
            if let Some(d) = g.renewal_days {
                row.renewal_ms = Some((d * MS_PER_DAY) as i64);
            }
            row.revoked = false;
            save(tx, &row)?;
            append(
                tx,
                now,
                actor,
                AuditEvent::BudgetGranted(BudgetGranted {
                    epsilon: g.epsilon,
                    delta: g.delta,
                    epsilon_units: Units(eps),
                    delta_units: Units(delta),
                    renewal_days: g.renewal_days,
                    after: row.state(),
                }),
            )?;
            Ok(Ok(row.status(now)))
        })
    }

    /// Take back ε from a budget (`Some`), or revoke it entirely (`None`: nothing more is
    /// answered until a new grant). Spent ε is never given back. Audited.
    pub fn revoke(
        &self,
        actor: &str,
        kind: BudgetKind,
        name: &str,
        epsilon: Option<f64>,
    ) -> Result<BudgetStatus, CoordinatorError> {
        if let Some(e) = epsilon {
            check_amount("ε", e, MAX_EPSILON)?;
        }
        self.write(|tx, now| {
            let Some(mut row) = load(tx, kind, name)? else {
                return Ok(Err(no_budget(kind, name)));
            };
            let units = epsilon.map(|e| charge_units(e, EPS_UNIT));
            match units {
                Some(u) => row.eps_granted = (row.eps_granted - u).max(0),
                None => row.revoked = true,
            }
            save(tx, &row)?;
            append(
                tx,
                now,
                actor,
                AuditEvent::BudgetRevoked(BudgetRevoked {
                    epsilon,
                    epsilon_units: units.map(Units),
                    after: row.state(),
                }),
            )?;
            Ok(Ok(row.status(now)))
        })
    }

    /// A user's role, password hash and whether they are disabled.
    pub fn user(&self, name: &str) -> Result<Option<UserRow>, CoordinatorError> {
        self.read(|c| {
            c.query_row(
                "SELECT role, password_hash, disabled FROM users WHERE name = ?1",
                [name],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                },
            )
            .optional()
        })
        .map(|o| {
            o.and_then(|(role, password_hash, disabled)| {
                Some(UserRow {
                    name: name.to_string(),
                    role: Role::parse(&role)?,
                    password_hash,
                    disabled: disabled != 0,
                })
            })
        })
    }

    /// Add a user with an Argon2 password hash. Audited (without the hash).
    pub fn add_user(
        &self,
        actor: &str,
        name: &str,
        role: Role,
        password_hash: &str,
    ) -> Result<(), CoordinatorError> {
        check_user_name(name)?;
        crate::auth::check_password_hash(password_hash)
            .map_err(CoordinatorError::InvalidArgument)?;
        self.write(|tx, now| {
            let exists: Option<String> = tx
                .query_row("SELECT role FROM users WHERE name = ?1", [name], |r| r.get(0))
                .optional()?;
            if exists.is_some() {
                return Ok(Err(CoordinatorError::InvalidArgument(format!(
                    "user {name} already exists; disable it with `fedq user disable` or choose another name"
                ))));
            }
            insert_user(tx, now, actor, name, role, password_hash)?;
            Ok(Ok(()))
        })
    }

    /// Disable (or re-enable) a user: a disabled user cannot log in. Audited.
    pub fn set_user_disabled(
        &self,
        actor: &str,
        name: &str,
        disabled: bool,
    ) -> Result<(), CoordinatorError> {
        self.write(|tx, now| {
            let n = tx.execute(
                "UPDATE users SET disabled = ?2 WHERE name = ?1",
                params![name, disabled as i64],
            )?;
            if n == 0 {
                return Ok(Err(CoordinatorError::InvalidArgument(format!(
                    "no user {name}; `fedq user list` shows the users"
                ))));
            }
            let user = UserNamed {
                name: name.to_string(),
            };
            let event = if disabled {
                AuditEvent::UserDisabled(user)
            } else {
                AuditEvent::UserEnabled(user)
            };
            append(tx, now, actor, event)?;
            Ok(Ok(()))
        })
    }

    /// Every user: name, role, disabled (never the hashes).
    pub fn users(&self) -> Result<Vec<Value>, CoordinatorError> {
        self.read(|c| {
            let mut st =
                c.prepare("SELECT name, role, disabled, created_at FROM users ORDER BY name")?;
            let rows = st
                .query_map([], |r| {
                    Ok(json!({"name": r.get::<_, String>(0)?, "role": r.get::<_, String>(1)?,
                              "disabled": r.get::<_, i64>(2)? != 0, "created_at_ms": r.get::<_, i64>(3)?}))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    /// Append an entry that changes no budget (a refusal at planning, a node failure, a
    /// denied officer action, a failed login).
    pub fn record(&self, actor: &str, event: AuditEvent) -> Result<(), CoordinatorError> {
        self.write(|tx, now| {
            append(tx, now, actor, event)?;
            Ok(Ok(()))
        })
    }

    /// Check both budgets could cover the query, without charging. A refusal is audited.
    pub fn precheck(&self, q: &QueryRecord) -> Result<(), CoordinatorError> {
        // A read first: the common case (enough budget) takes no write lock.
        let now = self.now();
        let fine = self.read(|c| {
            let Some(r) = load(c, BudgetKind::Researcher, &q.researcher)? else {
                return Ok(false);
            };
            let mut ok = covers(&r, now, q).is_none();
            for d in &q.datasets {
                match load(c, BudgetKind::Dataset, d)? {
                    Some(r) => ok &= covers(&r, now, q).is_none(),
                    None => ok = false,
                }
            }
            Ok(ok)
        })?;
        if fine {
            return Ok(());
        }
        self.write(|tx, now| match check_all(tx, now, q)? {
            Ok(_) => Ok(Ok(())),
            Err(e) => {
                refuse(tx, now, q, &e)?;
                Ok(Err(e))
            }
        })
    }

    /// Charge the query to the researcher's budget and to every dataset budget, in one
    /// transaction with its audit entry, or refuse (audited) and charge nothing. Returns
    /// the charge and the researcher's budget after it. The coordinator charges before any
    /// node has the request; `sites_dispatched` are the sites it goes to.
    pub fn charge(
        &self,
        q: &QueryRecord,
        sites_dispatched: &[String],
    ) -> Result<(Charge, BudgetStatus), CoordinatorError> {
        let mut out = self.charge_many(&[(q, sites_dispatched)]);
        out.pop().unwrap_or_else(|| {
            Err(CoordinatorError::LedgerUnavailable(
                "the ledger answered no charge".into(),
            ))
        })
    }

    /// [`Ledger::charge`] for several queries in one transaction and one durable commit
    /// (group commit, see [`group::ChargeQueue`]). Each is checked against the budgets as
    /// the ones before it left them, so together they never overspend; each gets its own
    /// outcome, a charge or a refusal, in order. If the transaction fails, none is charged
    /// and each gets the error.
    pub fn charge_many(
        &self,
        queries: &[(&QueryRecord, &[String])],
    ) -> Vec<Result<(Charge, BudgetStatus), CoordinatorError>> {
        // Amounts are checked first: an invalid one is refused without a write.
        let amounts: Vec<Result<(i64, i64), CoordinatorError>> = queries
            .iter()
            .map(|(q, _)| {
                check_amount("ε", q.epsilon, MAX_EPSILON)?;
                check_amount("δ", q.delta, 1.0)?;
                if q.epsilon <= 0.0 {
                    return Err(CoordinatorError::InvalidArgument(
                        "ε of a query must be positive".into(),
                    ));
                }
                Ok((
                    charge_units(q.epsilon, EPS_UNIT),
                    charge_units(q.delta, DELTA_UNIT),
                ))
            })
            .collect();
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let written = (|| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = self.now();
            let mut out = Vec::with_capacity(queries.len());
            for ((q, sites), amount) in queries.iter().zip(amounts) {
                out.push(match amount {
                    Ok((eps, delta)) => charge_in(&tx, now, q, sites, eps, delta)?,
                    Err(e) => Err(e),
                });
            }
            tx.commit()?;
            Ok::<_, rusqlite::Error>(out)
        })();
        match written {
            Ok(out) => out,
            Err(e) => queries
                .iter()
                .map(|_| Err(ledger_error_ref(&self.path, &e)))
                .collect(),
        }
    }

    /// Mark a charge released and store its answer for free replays. Call this before the
    /// answer leaves the coordinator; after it, the charge is never refunded.
    ///
    /// This commit does not wait for the disk (the charge itself did): if a power loss undoes
    /// it, the charge stays `charged` (spent, never refunded) and the replay is lost, so the
    /// researcher pays again for the same query. Both err on the safe side.
    pub fn released(
        &self,
        charge: Charge,
        outcome: &StoredOutcome,
    ) -> Result<(), CoordinatorError> {
        self.write_with(false, |tx, now| {
            if let Err(e) = settle(tx, &charge, now)? {
                return Ok(Err(e));
            }
            let blob = outcome.to_blob();
            tx.execute(
                "INSERT OR IGNORE INTO replays(researcher, plan_hash, query_id, result, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    charge.researcher,
                    charge.plan_hash,
                    charge.query_id,
                    blob,
                    now
                ],
            )?;
            let event = AuditEvent::QueryReleased(QueryReleased {
                query_id: charge.query_id.clone(),
                researcher: charge.researcher.clone(),
                plan_hash: charge.plan_hash.clone(),
                epsilon: charge.epsilon,
                outcome: outcome.audit_outcome(),
                error: match outcome {
                    StoredOutcome::PostProcessingError(m) => Some(m.clone()),
                    StoredOutcome::Answer(_) => None,
                },
                settled_at_ms: now,
                stored: StoredAnswer {
                    sha3: sha3_hex(&blob),
                    created_at_ms: now,
                },
            });
            append(tx, now, &charge.researcher, event)?;
            Ok(Ok(()))
        })
    }

    /// Keep a charge whose query failed after a node may have read data: the failure
    /// itself could depend on a participant, so it is a release and is never refunded. The
    /// charge is settled (state `released`, with no stored answer: the same query asks the
    /// nodes again, and is charged again) and audited as `query.failed` with the ε charged.
    pub fn failed_after_data(
        &self,
        charge: Charge,
        site: &str,
        reason: &str,
    ) -> Result<(), CoordinatorError> {
        self.write(|tx, now| {
            if let Err(e) = settle(tx, &charge, now)? {
                return Ok(Err(e));
            }
            let event = AuditEvent::QueryFailedAfterData(QueryFailedAfterData {
                query_id: charge.query_id.clone(),
                researcher: charge.researcher.clone(),
                plan_hash: charge.plan_hash.clone(),
                epsilon_charged: charge.epsilon,
                site_failed: site.to_string(),
                outcome: QueryOutcome::FailedAfterData,
                reason: reason.to_string(),
                settled_at_ms: now,
            });
            append(tx, now, &charge.researcher, event)?;
            Ok(Ok(()))
        })
    }

    /// Give back a charge whose query released nothing. Only an outstanding charge is
    /// refunded, so calling this twice, or after release, changes nothing.
    pub fn refund(&self, charge: Charge, reason: &str) -> Result<(), CoordinatorError> {
        self.write(|tx, now| {
            let row: Option<(String, i64, i64, i64)> = tx
                .query_row(
                    "SELECT datasets, epsilon, delta, charged_at FROM charges WHERE query_id = ?1 AND state = 'charged'",
                    [&charge.query_id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()?;
            let Some((datasets, eps, delta, charged_at)) = row else {
                return Ok(Ok(()));
            };
            tx.execute(
                "UPDATE charges SET state = 'refunded', settled_at = ?2 WHERE query_id = ?1",
                params![charge.query_id, now],
            )?;
            let datasets: Vec<String> = serde_json::from_str(&datasets).unwrap_or_default();
            let keys = std::iter::once((BudgetKind::Researcher, charge.researcher.clone()))
                .chain(datasets.into_iter().map(|d| (BudgetKind::Dataset, d)));
            let mut budgets_after = Vec::new();
            for (kind, name) in keys {
                if let Some(mut r) = load(tx, kind, &name)? {
                    // A charge from an earlier period was already wiped by the renewal.
                    if r.period_start <= charged_at {
                        r.eps_spent = (r.eps_spent - eps).max(0);
                        r.delta_spent = (r.delta_spent - delta).max(0);
                        save(tx, &r)?;
                        budgets_after.push(r.state());
                    }
                }
            }
            let event = AuditEvent::QueryRefunded(QueryRefunded {
                query_id: charge.query_id.clone(),
                researcher: charge.researcher.clone(),
                epsilon: charge.epsilon,
                outcome: QueryOutcome::Refunded,
                reason: reason.to_string(),
                settled_at_ms: now,
                budgets_after,
            });
            append(tx, now, &charge.researcher, event)?;
            Ok(Ok(()))
        })
    }

    /// The stored answer to the same canonical plan from the same researcher, if any; a
    /// hit is audited as `query.replayed` (ε = 0).
    pub fn replay(&self, q: &QueryRecord) -> Result<Option<Replay>, CoordinatorError> {
        let hit: Option<(String, Vec<u8>)> = self.read(|c| {
            c.query_row(
                "SELECT query_id, result FROM replays WHERE researcher = ?1 AND plan_hash = ?2",
                params![q.researcher, q.plan_hash],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })?;
        let Some((original, ipc)) = hit else {
            return Ok(None);
        };
        self.write(|tx, now| {
            match load(tx, BudgetKind::Researcher, &q.researcher)? {
                Some(r) if !r.revoked => {}
                _ => {
                    let e = no_budget(BudgetKind::Researcher, &q.researcher);
                    refuse(tx, now, q, &e)?;
                    return Ok(Err(e));
                }
            }
            let event = AuditEvent::QueryReplayed(QueryReplayed {
                query: QueryFacts {
                    epsilon: 0.0,
                    delta: 0.0,
                    ..q.facts()
                },
                replay_of: original.clone(),
                outcome: QueryOutcome::Replayed,
            });
            append(tx, now, &q.researcher, event)?;
            Ok(Ok(()))
        })?;
        Ok(Some(Replay {
            original_query_id: original,
            outcome: StoredOutcome::from_blob(ipc),
        }))
    }

    /// Every charge, oldest first (for officers and tests).
    pub fn charges(&self) -> Result<Vec<ChargeRow>, CoordinatorError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT query_id, researcher, datasets, epsilon, state FROM charges ORDER BY charged_at, query_id",
            )?;
            let rows = st.query_map([], |r| {
                let ds: String = r.get(2)?;
                Ok(ChargeRow {
                    query_id: r.get(0)?,
                    researcher: r.get(1)?,
                    datasets: serde_json::from_str(&ds).unwrap_or_default(),
                    epsilon: r.get::<_, i64>(3)? as f64 / EPS_UNIT,
                    state: r.get(4)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Verify the audit chain.
    pub fn verify(&self) -> Result<VerifyReport, CoordinatorError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        audit::verify_conn(&conn, &self.path, None)
    }
}

/// One charge inside a write transaction: the budget check, the updated budgets, the
/// charge row and its audit entry; or the refusal, audited.
fn charge_in(
    tx: &Transaction,
    now: i64,
    q: &QueryRecord,
    sites_dispatched: &[String],
    eps: i64,
    delta: i64,
) -> rusqlite::Result<Result<(Charge, BudgetStatus), CoordinatorError>> {
    let mut rows = match check_all(tx, now, q)? {
        Ok(rows) => rows,
        Err(e) => {
            refuse(tx, now, q, &e)?;
            return Ok(Err(e));
        }
    };
    for r in rows.iter_mut() {
        r.eps_spent += eps;
        r.delta_spent += delta;
        save(tx, r)?;
    }
    let charge = ChargeState {
        query_id: q.query_id.clone(),
        researcher: q.researcher.clone(),
        datasets: q.datasets.clone(),
        plan_hash: q.plan_hash.clone(),
        epsilon: Units(eps),
        delta: Units(delta),
        state: ChargeStatus::Charged,
        charged_at_ms: now,
        settled_at_ms: None,
    };
    tx.execute(
        "INSERT INTO charges(query_id, researcher, datasets, plan_hash, epsilon, delta, state, charged_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'charged', ?7)",
        params![q.query_id, q.researcher, serde_json::to_string(&q.datasets).unwrap_or_default(),
                q.plan_hash, eps, delta, now],
    )?;
    let event = AuditEvent::QueryCharged(QueryCharged {
        query: q.facts(),
        sites_dispatched: sites_dispatched.to_vec(),
        outcome: QueryOutcome::Charged,
        charge,
        budgets_after: rows.iter().map(Row::state).collect(),
    });
    append(tx, now, &q.researcher, event)?;
    let status = rows[0].status(now);
    Ok(Ok((
        Charge {
            query_id: q.query_id.clone(),
            researcher: q.researcher.clone(),
            plan_hash: q.plan_hash.clone(),
            epsilon: eps as f64 / EPS_UNIT,
        },
        status,
    )))
}

/// Delete the stored answers older than `days`, with an `answers.pruned` entry (none if
/// there were none).
fn prune_answers(tx: &Transaction, now: i64, days: f64) -> rusqlite::Result<u64> {
    let older_than_ms = now - (days * MS_PER_DAY) as i64;
    let count = tx.execute(
        "DELETE FROM replays WHERE created_at < ?1",
        params![older_than_ms],
    )? as u64;
    if count > 0 {
        let event = AuditEvent::AnswersPruned(AnswersPruned {
            retention_days: days,
            older_than_ms,
            count,
        });
        append(tx, now, "coordinator.toml", event)?;
    }
    Ok(count)
}

/// Insert a user and its `user.added` entry (with the fingerprint of its hash, never the
/// hash).
fn insert_user(
    tx: &Transaction,
    now: i64,
    actor: &str,
    name: &str,
    role: Role,
    password_hash: &str,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO users(name, role, password_hash, disabled, created_at) VALUES (?1, ?2, ?3, 0, ?4)",
        params![name, role.as_str(), password_hash, now],
    )?;
    let event = AuditEvent::UserAdded(UserAdded {
        name: name.to_string(),
        role,
        password_fingerprint: sha3_hex(password_hash.as_bytes()),
    });
    append(tx, now, actor, event)?;
    Ok(())
}

fn no_budget(kind: BudgetKind, name: &str) -> CoordinatorError {
    match kind {
        BudgetKind::Researcher => CoordinatorError::NoBudget(format!(
            "researcher {name} has no privacy budget (none granted, or it was revoked); ask your privacy officer to grant one"
        )),
        BudgetKind::Dataset => CoordinatorError::NoBudget(format!(
            "dataset {name} has no global budget (none granted, or it was revoked); ask your privacy officer"
        )),
    }
}

/// Why `row` cannot cover `q`, if it cannot (after renewal).
fn covers(row: &Row, now: i64, q: &QueryRecord) -> Option<CoordinatorError> {
    let mut r = row.clone();
    r.renew(now);
    if r.revoked {
        return Some(no_budget(r.kind, &r.name));
    }
    let eps = charge_units(q.epsilon, EPS_UNIT);
    let delta = charge_units(q.delta, DELTA_UNIT);
    let st = r.status(now);
    if r.eps_spent.saturating_add(eps) <= r.eps_granted
        && r.delta_spent.saturating_add(delta) > r.delta_granted
    {
        // ε would do; only δ (partition selection) is missing.
        return Some(CoordinatorError::DeltaBudgetExhausted {
            requested: q.delta,
            dataset: (r.kind == BudgetKind::Dataset).then(|| r.name.clone()),
        });
    }
    if r.eps_spent.saturating_add(eps) > r.eps_granted
        || r.delta_spent.saturating_add(delta) > r.delta_granted
    {
        return Some(match r.kind {
            BudgetKind::Researcher => CoordinatorError::BudgetExhausted {
                requested: q.epsilon,
                remaining: st.epsilon_remaining,
                total: st.epsilon_budget,
            },
            BudgetKind::Dataset => CoordinatorError::DatasetBudgetExhausted {
                dataset: r.name.clone(),
                requested: q.epsilon,
            },
        });
    }
    None
}

/// Load, renew and check every budget the query draws on (researcher first).
fn check_all(
    tx: &Transaction,
    now: i64,
    q: &QueryRecord,
) -> rusqlite::Result<Result<Vec<Row>, CoordinatorError>> {
    let mut rows = Vec::new();
    let keys = std::iter::once((BudgetKind::Researcher, q.researcher.as_str()))
        .chain(q.datasets.iter().map(|d| (BudgetKind::Dataset, d.as_str())));
    for (kind, name) in keys {
        let Some(mut r) = load(tx, kind, name)? else {
            return Ok(Err(no_budget(kind, name)));
        };
        renew_audited(tx, &mut r, now)?;
        if let Some(e) = covers(&r, now, q) {
            return Ok(Err(e));
        }
        rows.push(r);
    }
    Ok(Ok(rows))
}

fn refuse(
    tx: &Transaction,
    now: i64,
    q: &QueryRecord,
    e: &CoordinatorError,
) -> rusqlite::Result<()> {
    let event = AuditEvent::QueryRefused(QueryUncharged {
        query: q.facts(),
        epsilon_charged: 0.0,
        outcome: QueryOutcome::Refused,
        site_failed: None,
        reason: Some(e.to_string()),
    });
    append(tx, now, &q.researcher, event)?;
    Ok(())
}

pub mod group;

#[cfg(test)]
mod tests;
