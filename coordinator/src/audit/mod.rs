//! The tamper-evident audit log: a SHA3-256 hash chain stored in the ledger's SQLite file.
//!
//! Entry `n` is stored as its RFC 8785 canonical JSON text (an [`event::AuditEntry`]:
//! `{"actor","body","kind","seq","ts"}`, whose `kind` and `body` are one
//! [`event::AuditEvent`]), the hash of entry `n-1` (`prev_hash`, 64 zeros for the first
//! entry), and its own hash `SHA3-256(prev_hash_hex || "\n" || entry)`. The ledger also keeps
//! the chain head and length in its `meta` table, updated in the same transaction as every
//! append, so truncating the end of the log is detected too.
//!
//! [`verify`] reads the chain and the tables in one read transaction (a consistent snapshot
//! while the coordinator writes), checks every link and names the first bad entry, then
//! recomputes budgets, charges, stored answers, users and the policy hash from the entries
//! ([`reconcile`]) and names the first table row that disagrees. [`export_jsonl`] writes the
//! log with its head so that the head can be anchored elsewhere (printed, e-mailed, put in
//! another system). Anyone who can write the file can rewrite the whole chain (and the
//! tables) consistently; only a head anchored outside the file (`fedq audit verify --anchor
//! HASH`) detects that.

use std::io::Write;
use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde_json::Value;
use sha3::{Digest, Sha3_256};

use crate::error::CoordinatorError;

pub mod event;
pub mod reconcile;

pub use event::{AuditEntry, AuditEvent};
pub use reconcile::Disagreement;

/// `prev_hash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// `meta` key holding the hash of the last entry.
pub(crate) const META_HEAD: &str = "audit_head";
/// `meta` key holding the number of entries.
pub(crate) const META_COUNT: &str = "audit_count";

/// RFC 8785 (JCS) canonical JSON text: keys sorted, numbers as ECMAScript prints them, no
/// insignificant whitespace.
pub fn canonical_json(v: &Value) -> String {
    // A `Value` holds no NaN or infinity, the only values JCS cannot write.
    serde_jcs::to_string(v).unwrap_or_else(|_| v.to_string())
}

/// Hash of an entry given the previous entry's hash.
pub fn chain_hash(prev_hash: &str, entry: &str) -> String {
    let mut h = Sha3_256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(entry.as_bytes());
    hex::encode(h.finalize())
}

/// One stored audit entry.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditRow {
    /// Position in the chain, from 1.
    pub seq: i64,
    /// Canonical JSON text of the entry.
    pub entry: String,
    /// Hash of the previous entry.
    pub prev_hash: String,
    /// Hash of this entry.
    pub hash: String,
}

/// The first entry that fails verification.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BadEntry {
    /// Sequence number of the first bad entry (or where one is missing).
    pub seq: i64,
    /// What is wrong, in words.
    pub reason: String,
}

/// Result of [`verify`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VerifyReport {
    /// Entries read.
    pub entries: i64,
    /// Hash of the last entry read (the chain head), or [`GENESIS`] for an empty log.
    pub head: String,
    /// `None` when the whole chain verifies.
    pub first_bad: Option<BadEntry>,
    /// The first table row that disagrees with the state recomputed from the chain (checked
    /// only when the chain itself verifies).
    pub disagreement: Option<Disagreement>,
}

impl VerifyReport {
    /// Whether the chain verified.
    pub fn ok(&self) -> bool {
        self.first_bad.is_none() && self.disagreement.is_none()
    }

    /// What is wrong, in words, or `None`.
    pub fn problem(&self) -> Option<String> {
        if let Some(b) = &self.first_bad {
            return Some(format!(
                "first bad entry is #{}: {} ({} entries verified before it)",
                b.seq, b.reason, self.entries
            ));
        }
        self.disagreement.as_ref().map(|d| {
            format!(
                "the chain verifies ({} entries), but the ledger's tables disagree with it: {}: {}",
                self.entries, d.row, d.reason
            )
        })
    }
}

/// Open a ledger file read-only, with clear errors for a missing, locked or foreign file.
pub fn open_read_only(path: &Path) -> Result<Connection, CoordinatorError> {
    if !path.is_file() {
        return Err(CoordinatorError::LedgerCorrupt(format!(
            "ledger file {} does not exist; pass the `ledger` file named in coordinator.toml",
            path.display()
        )));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| crate::ledger::ledger_error(path, e))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(|e| crate::ledger::ledger_error(path, e))?;
    Ok(conn)
}

/// Read the whole log in chain order.
pub fn read_rows(conn: &Connection, path: &Path) -> Result<Vec<AuditRow>, CoordinatorError> {
    let err = |e| crate::ledger::ledger_error(path, e);
    let mut st = conn
        .prepare("SELECT seq, entry, prev_hash, hash FROM audit ORDER BY seq")
        .map_err(err)?;
    let rows = st
        .query_map([], |r| {
            Ok(AuditRow {
                seq: r.get(0)?,
                entry: r.get(1)?,
                prev_hash: r.get(2)?,
                hash: r.get(3)?,
            })
        })
        .map_err(err)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(err)
}

fn meta(conn: &Connection, key: &str, path: &Path) -> Result<Option<String>, CoordinatorError> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
        .map_err(|e| crate::ledger::ledger_error(path, e))
}

/// Check a sequence of rows against the chain rules; `recorded` is the (count, head) the
/// ledger's meta table holds, if any.
pub fn verify_rows(
    rows: &[AuditRow],
    recorded: Option<(i64, String)>,
    anchor: Option<&str>,
) -> VerifyReport {
    let mut head = GENESIS.to_string();
    let mut expected = 1i64;
    let mut anchor_seen = anchor.is_none() || anchor == Some(GENESIS);
    let bad = |seq: i64, reason: String, entries: i64, head: &str| VerifyReport {
        entries,
        head: head.to_string(),
        first_bad: Some(BadEntry { seq, reason }),
        disagreement: None,
    };
    for row in rows {
        let n = expected - 1;
        if row.seq != expected {
            return bad(
                expected,
                format!(
                    "entry {expected} is missing (the next stored entry is {}): entries were deleted",
                    row.seq
                ),
                n,
                &head,
            );
        }
        let parsed: Result<Value, _> = serde_json::from_str(&row.entry);
        let Ok(parsed) = parsed else {
            return bad(
                row.seq,
                format!("entry {} is not valid JSON: it was modified", row.seq),
                n,
                &head,
            );
        };
        if parsed.get("seq").and_then(Value::as_i64) != Some(row.seq) {
            return bad(
                row.seq,
                format!(
                    "entry {} carries sequence number {}: entries were reordered, inserted or modified",
                    row.seq,
                    parsed.get("seq").map(|v| v.to_string()).unwrap_or_else(|| "none".into())
                ),
                n,
                &head,
            );
        }
        if row.prev_hash != head {
            return bad(
                row.seq,
                format!(
                    "entry {} does not follow entry {} (its previous-hash does not match): an entry before it was deleted, inserted, reordered or rewritten",
                    row.seq,
                    row.seq - 1
                ),
                n,
                &head,
            );
        }
        if canonical_json(&parsed) != row.entry
            || chain_hash(&row.prev_hash, &row.entry) != row.hash
        {
            return bad(
                row.seq,
                format!("entry {} does not match its hash: it was modified", row.seq),
                n,
                &head,
            );
        }
        head = row.hash.clone();
        if anchor == Some(head.as_str()) {
            anchor_seen = true;
        }
        expected += 1;
    }
    let entries = expected - 1;
    if let Some((count, rec_head)) = recorded {
        if count != entries || rec_head != head {
            return bad(
                entries + 1,
                format!(
                    "the ledger recorded {count} entries ending in {rec_head}, but the log has {entries} ending in {head}: entries at the end were deleted or the log was rewritten"
                ),
                entries,
                &head,
            );
        }
    }
    if !anchor_seen {
        return bad(
            entries + 1,
            "the anchored head is not in this chain: the log was rewritten since it was anchored"
                .into(),
            entries,
            &head,
        );
    }
    VerifyReport {
        entries,
        head,
        first_bad: None,
        disagreement: None,
    }
}

/// Verify the audit chain of a ledger file. `anchor` is a head exported earlier; the chain
/// must contain it.
pub fn verify(path: &Path, anchor: Option<&str>) -> Result<VerifyReport, CoordinatorError> {
    let conn = open_read_only(path)?;
    verify_conn(&conn, path, anchor)
}

pub(crate) fn verify_conn(
    conn: &Connection,
    path: &Path,
    anchor: Option<&str>,
) -> Result<VerifyReport, CoordinatorError> {
    // One read transaction: the chain, its recorded head and the tables are one snapshot,
    // however much the coordinator writes meanwhile (WAL readers never block the writer).
    conn.execute_batch("BEGIN DEFERRED")
        .map_err(|e| crate::ledger::ledger_error(path, e))?;
    let report = verify_snapshot(conn, path, anchor);
    // Ending a read transaction cannot lose anything; a failure here is not the report's.
    let _ = conn.execute_batch("COMMIT");
    report
}

fn verify_snapshot(
    conn: &Connection,
    path: &Path,
    anchor: Option<&str>,
) -> Result<VerifyReport, CoordinatorError> {
    let rows = read_rows(conn, path)?;
    let count = meta(conn, META_COUNT, path)?;
    let head = meta(conn, META_HEAD, path)?;
    let recorded = match (count, head) {
        (Some(c), Some(h)) => Some((c.parse::<i64>().unwrap_or(-1), h)),
        (None, None) => Some((0, GENESIS.to_string())),
        (c, h) => Some((
            c.and_then(|c| c.parse().ok()).unwrap_or(-1),
            h.unwrap_or_default(),
        )),
    };
    let mut report = verify_rows(&rows, recorded, anchor);
    if !report.ok() {
        return Ok(report);
    }
    match reconcile::replay(&rows) {
        Err(bad) => report.first_bad = Some(bad),
        Ok(state) => {
            report.disagreement = reconcile::compare(conn, &state)
                .map_err(|e| crate::ledger::ledger_error(path, e))?;
        }
    }
    Ok(report)
}

/// Write the log as JSON lines (one object per entry: `seq`, `prev_hash`, `hash`, `entry`),
/// then a last line `{"chain_head": …, "entries": …, "verified": …}`. Returns the report.
pub fn export_jsonl(path: &Path, out: &mut dyn Write) -> Result<VerifyReport, CoordinatorError> {
    let conn = open_read_only(path)?;
    conn.execute_batch("BEGIN DEFERRED")
        .map_err(|e| crate::ledger::ledger_error(path, e))?;
    let rows = read_rows(&conn, path);
    let report = rows.and_then(|rows| Ok((verify_snapshot(&conn, path, None)?, rows)));
    let _ = conn.execute_batch("COMMIT");
    let (report, rows) = report?;
    let io = |e: std::io::Error| CoordinatorError::Config(format!("cannot write the export: {e}"));
    for r in &rows {
        let entry: Value = serde_json::from_str(&r.entry).unwrap_or(Value::String(r.entry.clone()));
        let line = serde_json::json!({
            "seq": r.seq, "prev_hash": r.prev_hash, "hash": r.hash, "entry": entry,
        });
        writeln!(out, "{}", canonical_json(&line)).map_err(io)?;
    }
    let tail = serde_json::json!({
        "chain_head": report.head,
        "entries": report.entries,
        "verified": report.ok(),
        "first_bad": report.first_bad,
        "disagreement": report.disagreement,
    });
    writeln!(out, "{}", canonical_json(&tail)).map_err(io)?;
    Ok(report)
}
