//! Ledger and audit-chain tests: atomic charges under concurrency (threads and several
//! connections, like several processes), refund exactly once, dataset budgets, renewal,
//! replays, bad input, and every kind of tampering detected by `verify`.

use std::path::Path;
use std::sync::Arc;

use rusqlite::params;

use super::*;
use crate::audit;

fn grant(l: &Ledger, kind: BudgetKind, name: &str, eps: f64) {
    l.grant(
        "test",
        &Grant {
            kind,
            name: name.into(),
            epsilon: eps,
            delta: 0.0,
            renewal_days: None,
        },
    )
    .unwrap();
}

fn rec(researcher: &str, qid: &str, eps: f64, datasets: &[&str]) -> QueryRecord {
    QueryRecord {
        query_id: qid.into(),
        researcher: researcher.into(),
        sql: "SELECT COUNT(*) FROM t".into(),
        plan_hash: format!("hash-{qid}"),
        epsilon: eps,
        delta: 0.0,
        datasets: datasets.iter().map(|s| s.to_string()).collect(),
        sites_asked: vec!["s1".into(), "s2".into()],
        epsilon_split: vec![("COUNT(*)".into(), eps.to_string())],
    }
}

fn sites() -> Vec<String> {
    vec!["s1".into(), "s2".into()]
}

#[test]
fn charges_refunds_once_and_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
    grant(&l, BudgetKind::Researcher, "a", 1.0);
    let (c, st) = l.charge(&rec("a", "q1", 0.6, &[]), &sites()).unwrap();
    assert!((st.epsilon_remaining - 0.4).abs() < 1e-12);
    assert!(matches!(
        l.charge(&rec("a", "q2", 0.5, &[]), &sites()),
        Err(CoordinatorError::BudgetExhausted { .. })
    ));
    let again = Charge {
        query_id: c.query_id.clone(),
        researcher: c.researcher.clone(),
        plan_hash: c.plan_hash.clone(),
        epsilon: c.epsilon,
    };
    l.refund(c, "test").unwrap();
    // A second refund of the same charge changes nothing.
    l.refund(again, "test").unwrap();
    assert_eq!(
        l.status(BudgetKind::Researcher, "a").unwrap().epsilon_spent,
        0.0
    );
    // Ten charges of 0.1 spend exactly 1 (integer accounting), an eleventh is refused.
    for i in 0..10 {
        let (c, _) = l
            .charge(&rec("a", &format!("p{i}"), 0.1, &[]), &sites())
            .unwrap();
        l.released(c, &StoredOutcome::Answer(b"x".to_vec()))
            .unwrap();
    }
    assert!(l.charge(&rec("a", "p10", 0.1, &[]), &sites()).is_err());
    let st = l.status(BudgetKind::Researcher, "a").unwrap();
    assert_eq!(st.epsilon_remaining, 0.0);
    assert_eq!(st.epsilon_spent, 1.0);
    // A released charge is never refunded.
    let (c, _) = {
        grant(&l, BudgetKind::Researcher, "a", 0.5);
        l.charge(&rec("a", "r1", 0.5, &[]), &sites()).unwrap()
    };
    let copy = Charge {
        query_id: c.query_id.clone(),
        researcher: c.researcher.clone(),
        plan_hash: c.plan_hash.clone(),
        epsilon: c.epsilon,
    };
    l.released(c, &StoredOutcome::Answer(b"x".to_vec()))
        .unwrap();
    l.refund(copy, "too late").unwrap();
    assert_eq!(
        l.status(BudgetKind::Researcher, "a").unwrap().epsilon_spent,
        1.5
    );
    // Bad input: unknown researcher, NaN, negative ε.
    assert!(matches!(
        l.charge(&rec("nobody", "z1", 0.1, &[]), &sites()),
        Err(CoordinatorError::NoBudget(_))
    ));
    assert!(matches!(
        l.charge(&rec("a", "z2", f64::NAN, &[]), &sites()),
        Err(CoordinatorError::InvalidArgument(_))
    ));
    assert!(matches!(
        l.charge(&rec("a", "z3", -1.0, &[]), &sites()),
        Err(CoordinatorError::InvalidArgument(_))
    ));
    let bad_grant = Grant {
        kind: BudgetKind::Researcher,
        name: "a".into(),
        epsilon: f64::NAN,
        delta: 0.0,
        renewal_days: None,
    };
    assert!(l.grant("officer", &bad_grant).is_err());
    assert!(matches!(
        l.revoke("officer", BudgetKind::Researcher, "ghost", None),
        Err(CoordinatorError::NoBudget(_))
    ));
    // Every refusal was audited and the chain verifies.
    let report = l.verify().unwrap();
    assert!(report.ok(), "{report:?}");
    let rows = audit::read_rows(&l.conn.lock().unwrap(), l.path()).unwrap();
    let refused = rows
        .iter()
        .filter(|r| r.entry.contains("\"query.refused\""))
        .count();
    assert_eq!(refused, 3, "two exhausted + one unknown researcher");
    assert_eq!(
        rows.iter()
            .filter(|r| r.entry.contains("\"query.refunded\""))
            .count(),
        1
    );
}

#[test]
fn revoke_and_dataset_budgets() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
    grant(&l, BudgetKind::Researcher, "a", 10.0);
    grant(&l, BudgetKind::Researcher, "b", 10.0);
    grant(&l, BudgetKind::Dataset, "bio", 3.0);
    // Together a and b cannot spend more than the dataset's 3.
    let mut ok = 0;
    for i in 0..4 {
        for r in ["a", "b"] {
            if let Ok((c, _)) = l.charge(&rec(r, &format!("{r}{i}"), 1.0, &["bio"]), &sites()) {
                l.released(c, &StoredOutcome::Answer(b"x".to_vec()))
                    .unwrap();
                ok += 1;
            }
        }
    }
    assert_eq!(ok, 3);
    assert!(matches!(
        l.charge(&rec("a", "x", 1.0, &["bio"]), &sites()),
        Err(CoordinatorError::DatasetBudgetExhausted { .. })
    ));
    // A refused dataset charge did not touch the researcher's budget.
    let a = l.status(BudgetKind::Researcher, "a").unwrap();
    let b = l.status(BudgetKind::Researcher, "b").unwrap();
    assert_eq!(a.epsilon_spent + b.epsilon_spent, 3.0);
    // Revoke: nothing more is answered; a grant restores it.
    l.revoke("o", BudgetKind::Researcher, "a", None).unwrap();
    assert!(matches!(
        l.charge(&rec("a", "y", 0.1, &[]), &sites()),
        Err(CoordinatorError::NoBudget(_))
    ));
    grant(&l, BudgetKind::Researcher, "a", 1.0);
    let (c, _) = l.charge(&rec("a", "y2", 0.1, &[]), &sites()).unwrap();
    l.released(c, &StoredOutcome::Answer(b"x".to_vec()))
        .unwrap();
    // Partial revoke lowers the total but never gives back what was spent.
    let st = l
        .revoke("o", BudgetKind::Researcher, "b", Some(100.0))
        .unwrap();
    assert_eq!(st.epsilon_budget, 0.0);
    assert!(l.list().unwrap().len() >= 3);
    assert!(l.verify().unwrap().ok());
}

#[test]
fn renewal_starts_a_new_period() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
    l.grant(
        "o",
        &Grant {
            kind: BudgetKind::Researcher,
            name: "a".into(),
            epsilon: 1.0,
            delta: 0.0,
            renewal_days: Some(1.0),
        },
    )
    .unwrap();
    let (c, _) = l.charge(&rec("a", "q1", 1.0, &[]), &sites()).unwrap();
    l.released(c, &StoredOutcome::Answer(b"x".to_vec()))
        .unwrap();
    assert!(l.charge(&rec("a", "q2", 1.0, &[]), &sites()).is_err());
    // Two days pass: the budget renews at the next charge, audited.
    l.advance_clock(2 * 86_400_000);
    assert_eq!(
        l.status(BudgetKind::Researcher, "a").unwrap().epsilon_spent,
        0.0
    );
    let (c, _) = l.charge(&rec("a", "q3", 1.0, &[]), &sites()).unwrap();
    l.released(c, &StoredOutcome::Answer(b"x".to_vec()))
        .unwrap();
    assert!(l.verify().unwrap().ok());
}

#[test]
fn many_threads_and_connections_never_overspend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.sqlite");
    let first = Ledger::open(&path).unwrap();
    grant(&first, BudgetKind::Researcher, "a", 1.0);
    grant(&first, BudgetKind::Dataset, "bio", 5.0);
    for i in 0..64 {
        grant(&first, BudgetKind::Researcher, &format!("r{i}"), 1.0);
    }
    // Four connections (as if four coordinator processes shared the file), 64 threads.
    let ledgers: Vec<Arc<Ledger>> = std::iter::once(Arc::new(first))
        .chain((0..3).map(|_| Arc::new(Ledger::open(&path).unwrap())))
        .collect();
    let (ok_a, ok_ds): (usize, usize) = std::thread::scope(|s| {
        let hs: Vec<_> = (0..64)
            .map(|i| {
                let l = ledgers[i % ledgers.len()].clone();
                s.spawn(move || {
                    // One charge against researcher a's budget of 1 (0.1 each)...
                    let a = match l.charge(&rec("a", &format!("a{i}"), 0.1, &[]), &sites()) {
                        Ok((c, _)) => l
                            .released(c, &StoredOutcome::Answer(b"x".to_vec()))
                            .map(|_| 1)
                            .unwrap_or(0),
                        Err(_) => 0,
                    };
                    // ...and one by researcher i against the shared dataset budget of 5.
                    let d = match l.charge(
                        &rec(&format!("r{i}"), &format!("d{i}"), 0.5, &["bio"]),
                        &sites(),
                    ) {
                        Ok((c, _)) => l
                            .released(c, &StoredOutcome::Answer(b"x".to_vec()))
                            .map(|_| 1)
                            .unwrap_or(0),
                        Err(_) => 0,
                    };
                    (a, d)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or((0, 0)))
            .fold((0, 0), |x, y| (x.0 + y.0, x.1 + y.1))
    });
    assert_eq!(ok_a, 10);
    assert_eq!(ok_ds, 10);
    let l = &ledgers[0];
    assert_eq!(
        l.status(BudgetKind::Researcher, "a").unwrap().epsilon_spent,
        1.0
    );
    assert_eq!(
        l.status(BudgetKind::Dataset, "bio").unwrap().epsilon_spent,
        5.0
    );
    // Releases match charges exactly.
    let charges = l.charges().unwrap();
    assert_eq!(charges.len(), 20);
    assert!(charges.iter().all(|c| c.state == "released"));
    let report = l.verify().unwrap();
    assert!(report.ok(), "{report:?}");
}

#[test]
fn replays_are_stored_per_researcher_and_plan() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
    grant(&l, BudgetKind::Researcher, "a", 1.0);
    grant(&l, BudgetKind::Researcher, "b", 1.0);
    let q = rec("a", "q1", 1.0, &[]);
    assert!(l.replay(&q).unwrap().is_none());
    let (c, _) = l.charge(&q, &sites()).unwrap();
    l.released(c, &StoredOutcome::Answer(b"answer".to_vec()))
        .unwrap();
    let mut again = q.clone();
    again.query_id = "q2".into();
    let r = l.replay(&again).unwrap().unwrap();
    assert_eq!(r.outcome, StoredOutcome::Answer(b"answer".to_vec()));
    assert_eq!(r.original_query_id, "q1");
    // Another researcher's identical plan is not a replay for them.
    let mut other = again.clone();
    other.researcher = "b".into();
    assert!(l.replay(&other).unwrap().is_none());
    assert!(l.verify().unwrap().ok());
}

#[test]
fn a_post_processing_error_is_charged_and_replayed_like_an_answer() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
    grant(&l, BudgetKind::Researcher, "a", 1.0);
    let q = rec("a", "q1", 0.25, &[]);
    let (c, _) = l.charge(&q, &sites()).unwrap();
    let err = StoredOutcome::PostProcessingError("Divide by zero error".into());
    l.released(c, &err).unwrap();
    let mut again = q.clone();
    again.query_id = "q2".into();
    let r = l.replay(&again).unwrap().unwrap();
    assert_eq!(r.outcome, err);
    // Charged once, never refunded, and the replay is free.
    let st = l.status(BudgetKind::Researcher, "a").unwrap();
    assert_eq!(st.epsilon_spent, 0.25);
    assert!(l.verify().unwrap().ok());
}

#[test]
fn a_failure_after_data_was_read_keeps_its_charge_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
    grant(&l, BudgetKind::Researcher, "a", 1.0);
    let q = rec("a", "q1", 0.5, &[]);
    let (c, _) = l.charge(&q, &sites()).unwrap();
    let copy = Charge {
        query_id: c.query_id.clone(),
        researcher: c.researcher.clone(),
        plan_hash: c.plan_hash.clone(),
        epsilon: c.epsilon,
    };
    l.failed_after_data(c, "s1", "timed out").unwrap();
    // A later refund of the same charge changes nothing: it is settled.
    l.refund(copy, "too late").unwrap();
    assert_eq!(
        l.status(BudgetKind::Researcher, "a").unwrap().epsilon_spent,
        0.5
    );
    assert!(l.replay(&q).unwrap().is_none(), "nothing to replay");
    assert!(l.verify().unwrap().ok());
}

#[test]
fn any_positive_charge_costs_at_least_one_ledger_unit() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
    grant(&l, BudgetKind::Researcher, "a", 1.0);
    assert_eq!(charge_units(1e-16, 1e9), 1);
    assert_eq!(charge_units(1e-30, 1e18), 1);
    assert_eq!(charge_units(0.0, 1e9), 0);
    // Rounded up, with binary artefacts of whole units forgiven.
    assert_eq!(charge_units(0.1, 1e9), 100_000_000);
    assert_eq!(charge_units(1.0000000001, 1e9), 1_000_000_001);
    assert_eq!(charge_units(1.00000000001, 1e9), 1_000_000_001);
    let (c, st) = l.charge(&rec("a", "tiny", 1e-16, &[]), &sites()).unwrap();
    assert_eq!(st.epsilon_spent, 1e-9, "one unit, not zero");
    l.released(c, &StoredOutcome::Answer(b"x".to_vec()))
        .unwrap();
}

#[test]
fn corrupt_foreign_and_locked_files_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.sqlite");
    std::fs::write(&junk, vec![7u8; 8192]).unwrap();
    match Ledger::open(&junk) {
        Err(CoordinatorError::LedgerCorrupt(m)) => assert!(m.contains("backup"), "{m}"),
        other => panic!("{other:?}"),
    }
    let foreign = dir.path().join("other.sqlite");
    {
        let c = rusqlite::Connection::open(&foreign).unwrap();
        c.execute_batch("CREATE TABLE t(x)").unwrap();
    }
    match Ledger::open(&foreign) {
        Err(CoordinatorError::LedgerCorrupt(m)) => assert!(m.contains("not a fedq ledger"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Locked: another connection holds the write lock longer than the busy timeout.
    let path = dir.path().join("l.sqlite");
    let l = Ledger::open(&path).unwrap();
    grant(&l, BudgetKind::Researcher, "a", 1.0);
    {
        let conn = l.conn.lock().unwrap();
        conn.busy_timeout(std::time::Duration::from_millis(50))
            .unwrap();
    }
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    match l.charge(&rec("a", "q", 0.1, &[]), &sites()) {
        Err(CoordinatorError::LedgerBusy(m)) => assert!(m.contains("locked"), "{m}"),
        other => panic!("{other:?}"),
    }
    other.execute_batch("ROLLBACK").unwrap();
    // Nothing was lost or charged; the chain still verifies.
    assert_eq!(
        l.status(BudgetKind::Researcher, "a").unwrap().epsilon_spent,
        0.0
    );
    let (c, _) = l.charge(&rec("a", "q", 0.1, &[]), &sites()).unwrap();
    l.released(c, &StoredOutcome::Answer(b"x".to_vec()))
        .unwrap();
    assert!(l.verify().unwrap().ok());
}

/// A ledger with a few audit entries, closed.
fn sample(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("l.sqlite");
    let l = Ledger::open(&path).unwrap();
    grant(&l, BudgetKind::Researcher, "a", 10.0);
    for i in 0..4 {
        let (c, _) = l
            .charge(&rec("a", &format!("q{i}"), 1.0, &[]), &sites())
            .unwrap();
        l.released(c, &StoredOutcome::Answer(b"x".to_vec()))
            .unwrap();
    }
    // 1 grant + 4 × (charged, released) = 9 entries.
    assert_eq!(audit::verify(&path, None).unwrap().entries, 9);
    path
}

/// Rewrite every entry with `edit` and rebuild the chain and its recorded head around the
/// result, as someone who can write the file could.
fn rechain(path: &Path, mut edit: impl FnMut(&str) -> String) {
    let c = rusqlite::Connection::open(path).unwrap();
    let mut prev = audit::GENESIS.to_string();
    for row in audit::read_rows(&c, path).unwrap() {
        let entry = edit(&row.entry);
        let hash = audit::chain_hash(&prev, &entry);
        c.execute(
            "UPDATE audit SET entry = ?1, prev_hash = ?2, hash = ?3 WHERE seq = ?4",
            params![entry, prev, hash, row.seq],
        )
        .unwrap();
        prev = hash;
    }
    c.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'audit_head'",
        [&prev],
    )
    .unwrap();
}

fn tamper(path: &Path, sql: &str) -> audit::VerifyReport {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(sql).unwrap();
    drop(c);
    audit::verify(path, None).unwrap()
}

fn bad_at(r: &audit::VerifyReport) -> i64 {
    r.first_bad.as_ref().map(|b| b.seq).unwrap_or(0)
}

#[test]
fn verify_detects_every_kind_of_tampering() {
    // Modified body.
    let d = tempfile::tempdir().unwrap();
    let p = sample(d.path());
    let r = tamper(
        &p,
        "UPDATE audit SET entry = replace(entry, '\"epsilon\":1,', '\"epsilon\":0.1,') WHERE seq = 4",
    );
    assert_eq!(bad_at(&r), 4, "{r:?}");
    assert!(r.first_bad.unwrap().reason.contains("modified"));

    // Modified and re-hashed: the next entry no longer follows it.
    let d = tempfile::tempdir().unwrap();
    let p = sample(d.path());
    {
        let c = rusqlite::Connection::open(&p).unwrap();
        let (entry, prev): (String, String) = c
            .query_row(
                "SELECT entry, prev_hash FROM audit WHERE seq = 3",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        let entry = entry.replace("\"researcher\":\"a\"", "\"researcher\":\"z\"");
        let hash = audit::chain_hash(&prev, &entry);
        c.execute(
            "UPDATE audit SET entry = ?1, hash = ?2 WHERE seq = 3",
            params![entry, hash],
        )
        .unwrap();
    }
    let r = audit::verify(&p, None).unwrap();
    assert_eq!(bad_at(&r), 4, "{r:?}");

    // Deleted from the middle.
    let d = tempfile::tempdir().unwrap();
    let p = sample(d.path());
    let r = tamper(&p, "DELETE FROM audit WHERE seq = 5");
    assert_eq!(bad_at(&r), 5, "{r:?}");
    assert!(r.first_bad.unwrap().reason.contains("missing"));

    // Deleted at the end.
    let d = tempfile::tempdir().unwrap();
    let p = sample(d.path());
    let r = tamper(&p, "DELETE FROM audit WHERE seq >= 8");
    assert_eq!(bad_at(&r), 8, "{r:?}");

    // Deleted from the middle and renumbered: the chain breaks there.
    let d = tempfile::tempdir().unwrap();
    let p = sample(d.path());
    let r = tamper(
        &p,
        "DELETE FROM audit WHERE seq = 5; UPDATE audit SET seq = seq - 1 WHERE seq > 5;",
    );
    assert_eq!(bad_at(&r), 5, "{r:?}");

    // Reordered: two entries swap places.
    let d = tempfile::tempdir().unwrap();
    let p = sample(d.path());
    let r = tamper(
        &p,
        "UPDATE audit SET seq = -1 WHERE seq = 3; UPDATE audit SET seq = 3 WHERE seq = 6; UPDATE audit SET seq = 6 WHERE seq = -1;",
    );
    assert_eq!(bad_at(&r), 3, "{r:?}");

    // Inserted: a forged entry chained onto entry 2, later entries shifted.
    let d = tempfile::tempdir().unwrap();
    let p = sample(d.path());
    {
        let c = rusqlite::Connection::open(&p).unwrap();
        let prev: String = c
            .query_row("SELECT hash FROM audit WHERE seq = 2", [], |r| r.get(0))
            .unwrap();
        c.execute_batch("UPDATE audit SET seq = seq + 100 WHERE seq > 2; UPDATE audit SET seq = seq - 99 WHERE seq > 100;")
            .unwrap();
        let entry = canonical_json(&json!({"seq": 3, "ts": "2020-01-01T00:00:00.000Z",
            "kind": "budget.granted", "actor": "mallory", "body": {"name": "a", "epsilon": 100.0}}));
        let hash = audit::chain_hash(&prev, &entry);
        c.execute(
            "INSERT INTO audit(seq, entry, prev_hash, hash) VALUES (3, ?1, ?2, ?3)",
            params![entry, prev, hash],
        )
        .unwrap();
    }
    let r = audit::verify(&p, None).unwrap();
    assert_eq!(bad_at(&r), 4, "{r:?}");

    // Rewritten consistently (chain and meta recomputed): only an anchored head detects it.
    let d = tempfile::tempdir().unwrap();
    let p = sample(d.path());
    let anchor = audit::verify(&p, None).unwrap().head;
    rechain(&p, |entry| {
        entry.replace("\"epsilon\":1,", "\"epsilon\":0.5,")
    });
    assert!(audit::verify(&p, None).unwrap().ok());
    let r = audit::verify(&p, Some(&anchor)).unwrap();
    assert!(!r.ok());

    // An untouched ledger verifies, with and without its anchor, and exports its head.
    let d = tempfile::tempdir().unwrap();
    let p = sample(d.path());
    let r = audit::verify(&p, None).unwrap();
    assert!(r.ok());
    assert!(audit::verify(&p, Some(&r.head)).unwrap().ok());
    let mut out = Vec::new();
    audit::export_jsonl(&p, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["chain_head"].as_str(), Some(r.head.as_str()));
    assert_eq!(last["verified"], true);
    assert_eq!(text.lines().count(), 10);
}

#[test]
fn delta_is_charged_and_its_own_refusal_names_delta() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
    l.grant(
        "test",
        &Grant {
            kind: BudgetKind::Researcher,
            name: "a".into(),
            epsilon: 10.0,
            delta: 2e-7,
            renewal_days: None,
        },
    )
    .unwrap();
    let with_delta = |qid: &str| QueryRecord {
        delta: 1e-7,
        ..rec("a", qid, 1.0, &[])
    };
    let (c1, st) = l.charge(&with_delta("q1"), &sites()).unwrap();
    assert!((st.delta_spent - 1e-7).abs() < 1e-18);
    let (c2, _) = l.charge(&with_delta("q2"), &sites()).unwrap();
    // ε remains, δ does not: the refusal says δ, and nothing is charged.
    let e = l.charge(&with_delta("q3"), &sites()).unwrap_err();
    assert!(
        matches!(
            e,
            CoordinatorError::DeltaBudgetExhausted { dataset: None, .. }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("δ budget"), "{e}");
    let st = l.status(BudgetKind::Researcher, "a").unwrap();
    assert!((st.epsilon_spent - 2.0).abs() < 1e-12);
    // A pure ε-DP query (δ = 0) still runs.
    let (c4, _) = l.charge(&rec("a", "q4", 1.0, &[]), &sites()).unwrap();
    for c in [c1, c2, c4] {
        l.released(c, &StoredOutcome::Answer(b"answer".to_vec()))
            .unwrap();
    }
}

/// A ledger with every kind of row: two researchers (one renewing, one revoked), a dataset,
/// released, refunded and outstanding charges, stored answers, users, a disabled user and
/// a policy. Closed.
fn rich_sample(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("rich.sqlite");
    let l = Ledger::open(&path).unwrap();
    grant(&l, BudgetKind::Researcher, "a", 10.0);
    grant(&l, BudgetKind::Researcher, "b", 5.0);
    grant(&l, BudgetKind::Dataset, "biobank", 100.0);
    l.revoke("olivia", BudgetKind::Researcher, "b", Some(1.0))
        .unwrap();
    l.revoke("olivia", BudgetKind::Researcher, "b", None)
        .unwrap();
    for i in 0..3 {
        let (c, _) = l
            .charge(&rec("a", &format!("q{i}"), 1.0, &["biobank"]), &sites())
            .unwrap();
        l.released(
            c,
            &StoredOutcome::Answer(format!("answer {i}").into_bytes()),
        )
        .unwrap();
    }
    let (c, _) = l
        .charge(&rec("a", "q3", 0.5, &["biobank"]), &sites())
        .unwrap();
    l.refund(c, "every site refused").unwrap();
    let (c, _) = l.charge(&rec("a", "q4", 0.5, &[]), &sites()).unwrap();
    l.failed_after_data(c, "s1", "timed out").unwrap();
    let (c, _) = l.charge(&rec("a", "q5", 0.25, &[]), &sites()).unwrap();
    // q5 stays outstanding, as a crash would leave it.
    std::mem::forget(c);
    let hash = crate::auth::hash_password("correct horse battery staple").unwrap();
    l.add_user("olivia", "alice", Role::Researcher, &hash)
        .unwrap();
    l.add_user("olivia", "olivia", Role::Officer, &hash)
        .unwrap();
    l.set_user_disabled("olivia", "alice", true).unwrap();
    l.record(
        "coordinator.toml",
        AuditEvent::PolicyChanged(PolicyChanged {
            previous_hash: None,
            hash: "p1".into(),
            policy: json!({"policy": {"max_epsilon": 1}}),
        }),
    )
    .unwrap();
    l.write(|tx, _| set_meta(tx, "policy_hash", "p1").map(Ok))
        .unwrap();
    path
}

/// The Python verifier shipped in docs/: `None` if it says ok, else its reason.
fn python_verdict(path: &Path) -> Option<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/verify_audit.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(path)
        .output()
        .expect("python3 runs docs/verify_audit.py (CI installs python3)");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        text == "ok" || (text.starts_with("BAD ") && out.status.code() == Some(1)),
        "the Python verifier crashed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (!out.status.success()).then_some(text)
}

#[test]
fn verify_recomputes_every_table_from_the_chain_and_the_python_verifier_agrees() {
    let d = tempfile::tempdir().unwrap();
    let p = rich_sample(d.path());
    let clean = audit::verify(&p, None).unwrap();
    assert!(clean.ok(), "{clean:?}");
    assert_eq!(python_verdict(&p), None);

    // (SQL edit, the row `fedq audit verify` must name, a word its reason must contain)
    let cases: &[(&str, &str, &str)] = &[
        ("UPDATE budgets SET epsilon_spent = 0 WHERE name = 'a'", "budgets: researcher a", "epsilon_spent"),
        ("UPDATE budgets SET epsilon_granted = epsilon_granted * 10 WHERE name = 'a'", "budgets: researcher a", "epsilon_granted"),
        ("UPDATE budgets SET delta_granted = 1000 WHERE name = 'biobank'", "budgets: dataset biobank", "delta_granted"),
        ("UPDATE budgets SET revoked = 0 WHERE name = 'b'", "budgets: researcher b", "revoked"),
        ("UPDATE budgets SET period_start = period_start - 1 WHERE name = 'a'", "budgets: researcher a", "period_start"),
        ("DELETE FROM budgets WHERE name = 'biobank'", "budgets: dataset biobank", "deleted"),
        ("INSERT INTO budgets VALUES ('researcher', 'mallory', 1000000000000, 0, 0, 0, NULL, 0, 0)", "budgets: researcher mallory", "added by hand"),
        ("DELETE FROM charges WHERE query_id = 'q1'", "charges: query q1", "deleted"),
        ("UPDATE charges SET state = 'refunded' WHERE query_id = 'q2'", "charges: query q2", "state"),
        ("UPDATE charges SET epsilon = 1 WHERE query_id = 'q0'", "charges: query q0", "epsilon"),
        ("INSERT INTO charges VALUES ('qx', 'a', '[]', 'h', 5, 0, 'refunded', 0, 1)", "charges: query qx", "added by hand"),
        ("UPDATE replays SET result = x'00' WHERE query_id = 'q0'", "replays: researcher a, plan hash-q0", "sha3"),
        ("DELETE FROM replays WHERE query_id = 'q1'", "replays: researcher a, plan hash-q1", "deleted"),
        ("UPDATE users SET role = 'officer' WHERE name = 'alice'", "users: user alice", "role"),
        ("UPDATE users SET disabled = 0 WHERE name = 'alice'", "users: user alice", "disabled"),
        ("UPDATE users SET password_hash = 'x' WHERE name = 'olivia'", "users: user olivia", "password_fingerprint"),
        ("INSERT INTO users VALUES ('mallory', 'officer', 'x', 0, 0)", "users: user mallory", "added by hand"),
        ("UPDATE meta SET value = 'p2' WHERE key = 'policy_hash'", "meta: policy_hash", "edited"),
    ];
    for (sql, row, word) in cases {
        let d = tempfile::tempdir().unwrap();
        let p = rich_sample(d.path());
        let r = tamper(&p, sql);
        assert_eq!(r.first_bad, None, "{sql}: the chain itself is intact");
        let got = r
            .disagreement
            .clone()
            .unwrap_or_else(|| panic!("{sql}: not caught"));
        assert_eq!(got.row, *row, "{sql}: {got:?}");
        assert!(got.reason.contains(word), "{sql}: {got:?}");
        assert!(r.problem().unwrap().contains(row), "{sql}");
        let py = python_verdict(&p);
        assert!(py.is_some(), "{sql}: the Python verifier missed it");
    }
    // Edits of the chain itself: both verifiers name them.
    for sql in [
        "UPDATE audit SET entry = replace(entry, '\"name\":\"a\"', '\"name\":\"z\"') WHERE seq = 1",
        "DELETE FROM audit WHERE seq = 5",
        "DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)",
    ] {
        let d = tempfile::tempdir().unwrap();
        let p = rich_sample(d.path());
        let r = tamper(&p, sql);
        assert!(r.first_bad.is_some(), "{sql}: {r:?}");
        assert!(
            python_verdict(&p).is_some(),
            "{sql}: the Python verifier missed it"
        );
    }
}

#[test]
fn a_forged_entry_whose_state_does_not_follow_is_named_even_when_rechained() {
    let d = tempfile::tempdir().unwrap();
    let p = rich_sample(d.path());
    // Rewrite the first charge to spend nothing, and rechain everything after it: the hash
    // chain is consistent again, but the charge's after-state no longer follows.
    let mut forged = false;
    rechain(&p, |entry| {
        if forged || !entry.contains("\"kind\":\"query.charged\"") {
            return entry.to_string();
        }
        forged = true;
        let mut e: Value = serde_json::from_str(entry).unwrap();
        e["body"]["budgets_after"][0]["epsilon_spent"] = json!("0");
        canonical_json(&e)
    });
    let r = audit::verify(&p, None).unwrap();
    let bad = r.first_bad.expect("the forged charge is named");
    assert!(bad.reason.contains("query.charged"), "{bad:?}");
    assert!(bad.reason.contains("epsilon_spent"), "{bad:?}");
}

#[test]
fn verify_reads_one_snapshot_while_the_coordinator_writes() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("busy.sqlite");
    let l = Arc::new(Ledger::open(&path).unwrap());
    grant(&l, BudgetKind::Researcher, "a", 1e5);
    grant(&l, BudgetKind::Dataset, "biobank", 1e5);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (l, stop) = (l.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (c, _) = l
                    .charge(&rec("a", &format!("w{i}"), 0.01, &["biobank"]), &sites())
                    .unwrap();
                if i % 3 == 0 {
                    l.refund(c, "refused").unwrap();
                } else {
                    l.released(c, &StoredOutcome::Answer(vec![i as u8]))
                        .unwrap();
                }
                i += 1;
            }
            i
        })
    };
    let mut verified = 0;
    while verified < 30 {
        let r = audit::verify(&path, None).unwrap();
        assert!(
            r.ok(),
            "a verification during writes reported {:?}",
            r.problem()
        );
        verified += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written > 0, "the writer wrote while verify ran");
    assert!(audit::verify(&path, None).unwrap().ok());
}

#[test]
fn audit_entries_are_rfc8785_canonical_and_typed() {
    let d = tempfile::tempdir().unwrap();
    let p = rich_sample(d.path());
    let c = rusqlite::Connection::open(&p).unwrap();
    for row in audit::read_rows(&c, &p).unwrap() {
        let v: Value = serde_json::from_str(&row.entry).unwrap();
        assert_eq!(serde_jcs::to_string(&v).unwrap(), row.entry);
        let e = audit::AuditEntry::parse(&row.entry).unwrap();
        assert_eq!(e.to_canonical().unwrap(), row.entry, "typed round trip");
        assert_eq!(e.seq, row.seq);
    }
}

#[test]
fn a_ledger_from_before_the_typed_audit_log_is_refused_untouched() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("old.sqlite");
    drop(Ledger::open(&p).unwrap());
    let c = rusqlite::Connection::open(&p).unwrap();
    c.execute(
        "UPDATE meta SET value = 'fedq-ledger-1' WHERE key = 'schema'",
        [],
    )
    .unwrap();
    drop(c);
    let before = std::fs::read(&p).unwrap();
    let e = Ledger::open(&p).unwrap_err().to_string();
    assert!(
        e.contains("fedq-ledger-1") && e.contains("new `ledger` path"),
        "{e}"
    );
    assert_eq!(std::fs::read(&p).unwrap(), before, "nothing was changed");
}

#[test]
fn stored_answers_past_their_retention_are_pruned_audited_and_charged_afresh() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("l.sqlite");
    let l = Ledger::open(&path).unwrap();
    grant(&l, BudgetKind::Researcher, "a", 10.0);
    for q in ["old1", "old2"] {
        let (c, _) = l.charge(&rec("a", q, 1.0, &[]), &sites()).unwrap();
        l.released(c, &StoredOutcome::Answer(q.as_bytes().to_vec()))
            .unwrap();
    }
    l.advance_clock(10 * 86_400_000);
    let (c, _) = l.charge(&rec("a", "new", 1.0, &[]), &sites()).unwrap();
    l.released(c, &StoredOutcome::Answer(b"new".to_vec()))
        .unwrap();

    assert_eq!(l.prune_stored_answers(5.0).unwrap(), 2);
    assert_eq!(
        l.prune_stored_answers(5.0).unwrap(),
        0,
        "nothing left to prune"
    );
    assert!(
        l.replay(&rec("a", "old1", 1.0, &[])).unwrap().is_none(),
        "charged afresh"
    );
    assert!(l.replay(&rec("a", "new", 1.0, &[])).unwrap().is_some());
    let r = l.verify().unwrap();
    assert!(r.ok(), "{:?}", r.problem());
    assert_eq!(python_verdict(&path), None);
    // Deleting a stored answer by hand is still caught.
    l.write(|tx, _| tx.execute("DELETE FROM replays", []).map(|_| Ok(())))
        .unwrap();
    let r = l.verify().unwrap();
    assert_eq!(
        r.disagreement.unwrap().row,
        "replays: researcher a, plan hash-new"
    );
    assert!(python_verdict(&path).is_some());
}

/// Charges committed together are checked in order against the budgets the ones before
/// them left: the group never overspends, each query gets its own outcome (an invalid
/// amount its own refusal), and the chain verifies.
#[test]
fn a_group_of_charges_commits_together_and_never_overspends() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
    grant(&l, BudgetKind::Researcher, "a", 2.5);
    grant(&l, BudgetKind::Researcher, "b", 10.0);
    let recs: Vec<QueryRecord> = (0..5)
        .map(|i| rec("a", &format!("a{i}"), 1.0, &[]))
        .chain([rec("b", "b0", -1.0, &[]), rec("b", "b1", 1.0, &[])])
        .collect();
    let s = sites();
    let items: Vec<(&QueryRecord, &[String])> = recs.iter().map(|r| (r, s.as_slice())).collect();
    let out = l.charge_many(&items);
    assert_eq!(out.len(), 7);
    assert!(out[0].is_ok() && out[1].is_ok());
    for o in &out[2..5] {
        assert!(
            matches!(o, Err(CoordinatorError::BudgetExhausted { .. })),
            "{o:?}"
        );
    }
    assert!(matches!(out[5], Err(CoordinatorError::InvalidArgument(_))));
    assert!(out[6].is_ok());
    assert_eq!(
        l.status(BudgetKind::Researcher, "a").unwrap().epsilon_spent,
        2.0
    );
    assert_eq!(
        l.status(BudgetKind::Researcher, "b").unwrap().epsilon_spent,
        1.0
    );
    assert!(l.verify().unwrap().problem().is_none());
}

/// Sixty queries charged at once through the group-commit queue, from many tasks: exactly
/// the budget is spent, every query gets its answer, and the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_charges_through_the_queue_spend_exactly_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let l = Arc::new(Ledger::open(&dir.path().join("l.sqlite")).unwrap());
    grant(&l, BudgetKind::Researcher, "a", 25.0);
    let queue = group::ChargeQueue::new(Arc::clone(&l));
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move {
                queue
                    .charge(rec("a", &format!("q{i}"), 1.0, &[]), sites())
                    .await
            })
        })
        .collect();
    let mut charged = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => charged += 1,
            Err(CoordinatorError::BudgetExhausted { .. }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(charged, 25);
    assert_eq!(
        l.status(BudgetKind::Researcher, "a").unwrap().epsilon_spent,
        25.0
    );
    assert_eq!(l.charges().unwrap().len(), 25);
    assert!(l.verify().unwrap().problem().is_none());
}
