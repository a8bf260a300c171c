//! Recompute the ledger's tables from the audit chain, and compare them with the tables.
//!
//! Phases: [`replay`] walks the (already hash-checked) entries in order and rebuilds every
//! budget, charge, stored answer, user and the policy hash, checking that each entry's
//! stated after-state follows from the state before it (a charge adds exactly its units to
//! each budget's spent, a refund takes them back, a grant adds its units, a renewal starts
//! a later period with nothing spent); [`compare`] then reads the tables, in the same read
//! transaction as the chain, and names the first row that disagrees. An SQL edit that
//! lowers `epsilon_spent`, raises a grant, deletes a charge, rewrites a stored answer or
//! adds a user is caught here, though it leaves the chain itself intact.

use std::collections::BTreeMap;

use rusqlite::Connection;
use serde::Serialize;
use serde_json::Value;
use sha3::{Digest, Sha3_256};

use super::event::{
    AuditEntry, AuditEvent, BudgetState, ChargeState, ChargeStatus, StoredAnswer, Units,
};
use super::{AuditRow, BadEntry};
use crate::auth::Role;
use crate::ledger::BudgetKind;

/// A user as the chain says it is.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct UserState {
    role: Role,
    password_fingerprint: String,
    disabled: bool,
}

/// A stored answer as the chain says it is.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct ReplayState {
    query_id: String,
    #[serde(flatten)]
    stored: StoredAnswer,
}

/// Each value with the sequence number of the entry that last set it.
type Keyed<K, V> = BTreeMap<K, (V, i64)>;

/// The ledger's state, recomputed from the chain.
#[derive(Debug, Default)]
pub struct Replayed {
    budgets: Keyed<(String, String), BudgetState>,
    charges: Keyed<String, ChargeState>,
    replays: Keyed<(String, String), ReplayState>,
    users: Keyed<String, UserState>,
    policy_hash: Option<(String, i64)>,
}

/// Where the tables disagree with the chain.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Disagreement {
    /// The table and row, e.g. `budgets: researcher alice`.
    pub row: String,
    /// What differs, in words.
    pub reason: String,
}

/// SHA3-256, hex.
pub fn sha3_hex(bytes: &[u8]) -> String {
    hex::encode(Sha3_256::digest(bytes))
}

fn budget_key(b: &BudgetState) -> (String, String) {
    (b.kind.as_str().to_string(), b.name.clone())
}

fn bad(seq: i64, reason: String) -> BadEntry {
    BadEntry { seq, reason }
}

/// Rebuild the state from the entries, checking each transition.
pub fn replay(rows: &[AuditRow]) -> Result<Replayed, BadEntry> {
    let mut st = Replayed::default();
    for row in rows {
        let entry = AuditEntry::parse(&row.entry).map_err(|e| {
            bad(
                row.seq,
                format!(
                    "entry {} is not a valid audit event ({e}): it was modified",
                    row.seq
                ),
            )
        })?;
        st.apply(row.seq, entry.event)
            .map_err(|reason| bad(row.seq, format!("entry {}: {reason}", row.seq)))?;
    }
    Ok(st)
}

impl Replayed {
    fn budget(&self, b: &BudgetState) -> Option<&BudgetState> {
        self.budgets.get(&budget_key(b)).map(|(s, _)| s)
    }

    fn set_budget(&mut self, seq: i64, b: BudgetState) {
        self.budgets.insert(budget_key(&b), (b, seq));
    }

    fn charge_mut(&mut self, seq: i64, query_id: &str) -> Result<&mut ChargeState, String> {
        match self.charges.get_mut(query_id) {
            Some((c, s)) if c.state == ChargeStatus::Charged => {
                *s = seq;
                Ok(c)
            }
            Some(_) => Err(format!(
                "settles charge {query_id}, which was already settled"
            )),
            None => Err(format!(
                "settles charge {query_id}, which was never charged"
            )),
        }
    }

    fn apply(&mut self, seq: i64, event: AuditEvent) -> Result<(), String> {
        match event {
            AuditEvent::BudgetGranted(g) => {
                let after = &g.after;
                let expected = match self.budget(after) {
                    Some(b) => BudgetState {
                        epsilon_granted: Units(
                            b.epsilon_granted.0.saturating_add(g.epsilon_units.0),
                        ),
                        delta_granted: Units(b.delta_granted.0.saturating_add(g.delta_units.0)),
                        renewal_ms: if g.renewal_days.is_some() {
                            after.renewal_ms
                        } else {
                            b.renewal_ms
                        },
                        revoked: false,
                        ..b.clone()
                    },
                    None => BudgetState {
                        epsilon_granted: g.epsilon_units,
                        delta_granted: g.delta_units,
                        epsilon_spent: Units(0),
                        delta_spent: Units(0),
                        revoked: false,
                        ..after.clone()
                    },
                };
                follows("budget.granted", &expected, after)?;
                self.set_budget(seq, g.after);
            }
            AuditEvent::BudgetRevoked(r) => {
                let before = self
                    .budget(&r.after)
                    .ok_or_else(|| never_created(&r.after))?;
                let mut expected = before.clone();
                match r.epsilon_units {
                    Some(u) => {
                        expected.epsilon_granted = Units((before.epsilon_granted.0 - u.0).max(0))
                    }
                    None => expected.revoked = true,
                }
                follows("budget.revoked", &expected, &r.after)?;
                self.set_budget(seq, r.after);
            }
            AuditEvent::BudgetRenewed(r) => {
                let before = self
                    .budget(&r.after)
                    .ok_or_else(|| never_created(&r.after))?;
                let p = before.renewal_ms.unwrap_or(0);
                let start = r.after.period_start_ms;
                let expected = BudgetState {
                    epsilon_spent: Units(0),
                    delta_spent: Units(0),
                    period_start_ms: start,
                    ..before.clone()
                };
                follows("budget.renewed", &expected, &r.after)?;
                if p <= 0
                    || start <= before.period_start_ms
                    || (start - before.period_start_ms) % p != 0
                {
                    return Err(format!(
                        "budget.renewed starts a period at {start} ms, which is not a later whole period of the budget's"
                    ));
                }
                self.set_budget(seq, r.after);
            }
            AuditEvent::QueryCharged(c) => {
                let charge = c.charge;
                if self.charges.contains_key(&charge.query_id) {
                    return Err(format!("charges query {} a second time", charge.query_id));
                }
                if charge.state != ChargeStatus::Charged {
                    return Err("query.charged records a charge that is not `charged`".into());
                }
                for after in c.budgets_after {
                    let before = self.budget(&after).ok_or_else(|| never_created(&after))?;
                    let expected = BudgetState {
                        epsilon_spent: Units(before.epsilon_spent.0 + charge.epsilon.0),
                        delta_spent: Units(before.delta_spent.0 + charge.delta.0),
                        ..before.clone()
                    };
                    follows("query.charged", &expected, &after)?;
                    self.set_budget(seq, after);
                }
                self.charges.insert(charge.query_id.clone(), (charge, seq));
            }
            AuditEvent::QueryReleased(r) => {
                let c = self.charge_mut(seq, &r.query_id)?;
                c.state = ChargeStatus::Released;
                c.settled_at_ms = Some(r.settled_at_ms);
                self.replays.entry((r.researcher, r.plan_hash)).or_insert((
                    ReplayState {
                        query_id: r.query_id,
                        stored: r.stored,
                    },
                    seq,
                ));
            }
            AuditEvent::QueryFailedAfterData(f) => {
                let c = self.charge_mut(seq, &f.query_id)?;
                c.state = ChargeStatus::Released;
                c.settled_at_ms = Some(f.settled_at_ms);
            }
            AuditEvent::QueryRefunded(r) => {
                let c = self.charge_mut(seq, &r.query_id)?;
                c.state = ChargeStatus::Refunded;
                c.settled_at_ms = Some(r.settled_at_ms);
                let (eps, delta) = (c.epsilon, c.delta);
                for after in r.budgets_after {
                    let before = self.budget(&after).ok_or_else(|| never_created(&after))?;
                    let expected = BudgetState {
                        epsilon_spent: Units((before.epsilon_spent.0 - eps.0).max(0)),
                        delta_spent: Units((before.delta_spent.0 - delta.0).max(0)),
                        ..before.clone()
                    };
                    follows("query.refunded", &expected, &after)?;
                    self.set_budget(seq, after);
                }
            }
            AuditEvent::UserAdded(u) => {
                if self.users.contains_key(&u.name) {
                    return Err(format!("adds user {} a second time", u.name));
                }
                let user = UserState {
                    role: u.role,
                    password_fingerprint: u.password_fingerprint,
                    disabled: false,
                };
                self.users.insert(u.name, (user, seq));
            }
            AuditEvent::UserDisabled(u) | AuditEvent::UserEnabled(u)
                if !self.users.contains_key(&u.name) =>
            {
                return Err(format!("changes user {}, who was never added", u.name));
            }
            AuditEvent::UserDisabled(u) => self.set_disabled(seq, &u.name, true),
            AuditEvent::UserEnabled(u) => self.set_disabled(seq, &u.name, false),
            AuditEvent::AnswersPruned(p) => {
                let before = self.replays.len();
                self.replays
                    .retain(|_, (r, _)| r.stored.created_at_ms >= p.older_than_ms);
                let removed = (before - self.replays.len()) as u64;
                if removed != p.count {
                    return Err(format!(
                        "answers.pruned says {} stored answers were deleted, but the entries before it stored {removed} that old",
                        p.count
                    ));
                }
            }
            AuditEvent::PolicyChanged(p) => {
                let last = self.policy_hash.as_ref().map(|(h, _)| h.clone());
                if p.previous_hash != last {
                    return Err("policy.changed does not follow the previous policy hash".into());
                }
                self.policy_hash = Some((p.hash, seq));
            }
            AuditEvent::QueryReplayed(_)
            | AuditEvent::QueryRefused(_)
            | AuditEvent::QueryFailed(_)
            | AuditEvent::QueryExplained(_)
            | AuditEvent::LoginFailed(_)
            | AuditEvent::LoginUnlocked(_)
            | AuditEvent::OfficerDenied(_)
            | AuditEvent::CoordinatorStarted(_) => {}
        }
        Ok(())
    }

    fn set_disabled(&mut self, seq: i64, name: &str, disabled: bool) {
        if let Some((u, s)) = self.users.get_mut(name) {
            u.disabled = disabled;
            *s = seq;
        }
    }
}

fn never_created(b: &BudgetState) -> String {
    format!(
        "changes the {} budget {}, which no earlier entry created",
        b.kind.as_str(),
        b.name
    )
}

/// Check an entry's stated after-state against the one computed from the state before.
fn follows(kind: &str, expected: &BudgetState, stated: &BudgetState) -> Result<(), String> {
    match first_difference(expected, stated) {
        None => Ok(()),
        Some((field, want, got)) => Err(format!(
            "{kind} leaves {} budget {} with {field} = {got}, but the entries before it give {want}: the chain was forged",
            stated.kind.as_str(),
            stated.name
        )),
    }
}

/// The first field (in the struct's serialised order) where two values differ.
fn first_difference<T: Serialize>(a: &T, b: &T) -> Option<(String, String, String)> {
    let (Ok(Value::Object(a)), Ok(Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return Some(("(state)".into(), "?".into(), "?".into()));
    };
    for (k, va) in &a {
        let vb = b.get(k).unwrap_or(&Value::Null);
        if va != vb {
            return Some((k.clone(), va.to_string(), vb.to_string()));
        }
    }
    None
}

/// Compare one table (as `key → value` read from it) with the chain's version of it.
fn compare_table<K: Ord + std::fmt::Debug, V: Serialize + PartialEq>(
    table: &str,
    describe: impl Fn(&K) -> String,
    chain: &Keyed<K, V>,
    rows: BTreeMap<K, V>,
) -> Option<Disagreement> {
    for (k, v) in &rows {
        let Some((want, seq)) = chain.get(k) else {
            return Some(Disagreement {
                row: format!("{table}: {}", describe(k)),
                reason:
                    "the row is in the table, but no audit entry wrote it: it was added by hand"
                        .into(),
            });
        };
        if let Some((field, chain_value, table_value)) = first_difference(want, v) {
            return Some(Disagreement {
                row: format!("{table}: {}", describe(k)),
                reason: format!(
                    "{field} is {table_value} in the table, but {chain_value} by the audit log (last set by entry {seq}): the table was edited"
                ),
            });
        }
    }
    chain
        .iter()
        .find(|(k, _)| !rows.contains_key(k))
        .map(|(k, (_, seq))| Disagreement {
            row: format!("{table}: {}", describe(k)),
            reason: format!(
                "entry {seq} wrote the row, but it is not in the table: it was deleted"
            ),
        })
}

/// Read the tables and compare them with the replayed state. Call inside the same read
/// transaction as the chain was read in.
pub fn compare(conn: &Connection, st: &Replayed) -> rusqlite::Result<Option<Disagreement>> {
    let budgets = read_budgets(conn)?;
    if let Some(d) = compare_table("budgets", |(k, n)| format!("{k} {n}"), &st.budgets, budgets) {
        return Ok(Some(d));
    }
    let charges = read_charges(conn)?;
    if let Some(d) = compare_table("charges", |q| format!("query {q}"), &st.charges, charges) {
        return Ok(Some(d));
    }
    let replays = read_replays(conn)?;
    if let Some(d) = compare_table(
        "replays",
        |(r, p)| format!("researcher {r}, plan {p}"),
        &st.replays,
        replays,
    ) {
        return Ok(Some(d));
    }
    let users = read_users(conn)?;
    if let Some(d) = compare_table("users", |n| format!("user {n}"), &st.users, users) {
        return Ok(Some(d));
    }
    let policy: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'policy_hash'",
            [],
            |r| r.get(0),
        )
        .ok();
    let chain_policy = st.policy_hash.as_ref().map(|(h, _)| h.clone());
    if policy != chain_policy {
        return Ok(Some(Disagreement {
            row: "meta: policy_hash".into(),
            reason: format!(
                "the ledger records policy hash {policy:?}, but the audit log's last policy.changed gives {chain_policy:?}: it was edited"
            ),
        }));
    }
    Ok(None)
}

fn read_budgets(conn: &Connection) -> rusqlite::Result<BTreeMap<(String, String), BudgetState>> {
    let mut st = conn.prepare(
        "SELECT kind, name, epsilon_granted, delta_granted, epsilon_spent, delta_spent, renewal_ms, period_start, revoked FROM budgets",
    )?;
    let rows = st.query_map([], |r| {
        let kind: String = r.get(0)?;
        Ok(BudgetState {
            kind: if kind == "dataset" {
                BudgetKind::Dataset
            } else {
                BudgetKind::Researcher
            },
            name: r.get(1)?,
            epsilon_granted: Units(r.get(2)?),
            delta_granted: Units(r.get(3)?),
            epsilon_spent: Units(r.get(4)?),
            delta_spent: Units(r.get(5)?),
            renewal_ms: r.get(6)?,
            period_start_ms: r.get(7)?,
            revoked: r.get::<_, i64>(8)? != 0,
        })
    })?;
    rows.map(|b| b.map(|b| (budget_key(&b), b))).collect()
}

fn read_charges(conn: &Connection) -> rusqlite::Result<BTreeMap<String, ChargeState>> {
    let mut st = conn.prepare(
        "SELECT query_id, researcher, datasets, plan_hash, epsilon, delta, state, charged_at, settled_at FROM charges",
    )?;
    let rows = st.query_map([], |r| {
        let datasets: String = r.get(2)?;
        let state: String = r.get(6)?;
        Ok(ChargeState {
            query_id: r.get(0)?,
            researcher: r.get(1)?,
            // An unreadable list compares unequal to the chain's.
            datasets: serde_json::from_str(&datasets).unwrap_or_else(|_| vec![datasets]),
            plan_hash: r.get(3)?,
            epsilon: Units(r.get(4)?),
            delta: Units(r.get(5)?),
            // The table's CHECK admits only the three states.
            state: ChargeStatus::parse(&state).unwrap_or(ChargeStatus::Charged),
            charged_at_ms: r.get(7)?,
            settled_at_ms: r.get(8)?,
        })
    })?;
    rows.map(|c| c.map(|c| (c.query_id.clone(), c))).collect()
}

fn read_replays(conn: &Connection) -> rusqlite::Result<BTreeMap<(String, String), ReplayState>> {
    let mut st =
        conn.prepare("SELECT researcher, plan_hash, query_id, result, created_at FROM replays")?;
    let rows = st.query_map([], |r| {
        let result: Vec<u8> = r.get(3)?;
        Ok((
            (r.get(0)?, r.get(1)?),
            ReplayState {
                query_id: r.get(2)?,
                stored: StoredAnswer {
                    sha3: sha3_hex(&result),
                    created_at_ms: r.get(4)?,
                },
            },
        ))
    })?;
    rows.collect()
}

fn read_users(conn: &Connection) -> rusqlite::Result<BTreeMap<String, UserState>> {
    let mut st = conn.prepare("SELECT name, role, password_hash, disabled FROM users")?;
    let rows = st.query_map([], |r| {
        let role: String = r.get(1)?;
        let hash: String = r.get(2)?;
        Ok((
            r.get(0)?,
            UserState {
                // The table's CHECK admits only the two roles.
                role: Role::parse(&role).unwrap_or(Role::Researcher),
                password_fingerprint: sha3_hex(hash.as_bytes()),
                disabled: r.get::<_, i64>(3)? != 0,
            },
        ))
    })?;
    rows.collect()
}
