//! Participant sets at the node (`IN`/`EXISTS` subqueries, `INTERSECT`, `EXCEPT`, `UNION`,
//! `HAVING COUNT(*) >= k`), over the labs fixture (see `engine_tests`) and the patients
//! CSV: p1 F, p2 M, p3 F, p4 X, p5 NULL. Labs rows per participant: p1 3 (2 HbA1c, LDL),
//! p2 3 (HbA1c, 2 glucose), p3 2 (LDL, other), p4 1 (NULL test).

use fedq_common::{AggregateRequest, BinaryOp, GroupKey, Literal, ParticipantSet, Predicate};

use super::engine_tests::assert_refused;
use super::*;
use crate::{NodeEngine, NodeError};

async fn engine() -> (Fixture, NodeEngine) {
    let fx = Fixture::new();
    let e = NodeEngine::new(&fx.config()).await.unwrap();
    (fx, e)
}

fn eq(column: &str, value: &str) -> Predicate {
    bin(BinaryOp::Eq, col(column), lit(Literal::Utf8(value.into())))
}

fn set(table: &str, filter: Option<Predicate>, min_rows: u32) -> ParticipantSet {
    ParticipantSet::Rows {
        table: table.into(),
        filter,
        min_rows,
    }
}

fn in_set(s: ParticipantSet, negated: bool) -> Predicate {
    Predicate::InSet {
        side: Default::default(),
        set: Box::new(s),
        negated,
    }
}

/// Labs rows whose participant passes `filter`.
async fn labs_rows(e: &NodeEngine, filter: Predicate) -> i128 {
    let req = request(
        "labs",
        &[],
        vec![AggregateRequest::CountRows],
        100,
        Some(filter),
    );
    let out = e.execute(&req).await.unwrap();
    rows(&out, 0)[0].1[0]
}

fn hba1c(min_rows: u32) -> ParticipantSet {
    set("labs", Some(eq("test", "HbA1c")), min_rows)
}

fn women() -> ParticipantSet {
    set("patients", Some(eq("sex", "F")), 1)
}

#[tokio::test]
async fn a_set_keeps_exactly_the_rows_of_its_members() {
    let (_fx, e) = engine().await;
    // p1 and p3 are women: 3 + 2 rows; the others 3 + 1.
    assert_eq!(labs_rows(&e, in_set(women(), false)).await, 5);
    assert_eq!(labs_rows(&e, in_set(women(), true)).await, 4);
    // HbA1c at least twice: p1 only. At least once: p1 and p2.
    assert_eq!(labs_rows(&e, in_set(hba1c(2), false)).await, 3);
    assert_eq!(labs_rows(&e, in_set(hba1c(1), false)).await, 6);
    assert_eq!(labs_rows(&e, in_set(hba1c(3), false)).await, 0);
    // Combinations: {p1, p2} ∩ {p1, p3} = {p1}; {p1, p2} \ {p1, p3} = {p2};
    // {p3} ∪ {p2} = {p2, p3}.
    let both = ParticipantSet::Intersect {
        left: Box::new(hba1c(1)),
        right: Box::new(women()),
    };
    assert_eq!(labs_rows(&e, in_set(both, false)).await, 3);
    let but_not = ParticipantSet::Except {
        left: Box::new(hba1c(1)),
        right: Box::new(women()),
    };
    assert_eq!(labs_rows(&e, in_set(but_not, false)).await, 3);
    let either = ParticipantSet::Union {
        left: Box::new(set("labs", Some(eq("test", "other")), 1)),
        right: Box::new(set("patients", Some(eq("sex", "M")), 1)),
    };
    assert_eq!(labs_rows(&e, in_set(either, false)).await, 5);
    // Nested: LDL tests of women: p1 and p3.
    let nested = set(
        "labs",
        Some(bin(
            BinaryOp::And,
            eq("test", "LDL"),
            in_set(women(), false),
        )),
        1,
    );
    assert_eq!(labs_rows(&e, in_set(nested, false)).await, 5);
    // The same set twice, and a set ORed with a row condition.
    let twice = bin(
        BinaryOp::And,
        in_set(women(), false),
        in_set(women(), false),
    );
    assert_eq!(labs_rows(&e, twice).await, 5);
    let or = bin(BinaryOp::Or, in_set(women(), false), eq("test", "glucose"));
    assert_eq!(labs_rows(&e, or).await, 7);
}

#[tokio::test]
async fn a_set_tested_in_a_case_key_splits_every_row_into_its_label() {
    let (_fx, e) = engine().await;
    let key = GroupKey::Case {
        branches: vec![fedq_common::group_key::CaseBranch {
            when: in_set(hba1c(1), false),
            then: Literal::Utf8("tested".into()),
        }],
        otherwise: Literal::Utf8("never tested".into()),
    };
    let mut req = request(
        "labs",
        &[],
        vec![AggregateRequest::CountRows, AggregateRequest::CountUnits],
        100,
        None,
    );
    req.group_by = vec![key];
    let out = e.execute(&req).await.unwrap();
    let mut got = rows(&out, 1);
    got.sort();
    assert_eq!(
        got,
        vec![
            keyed(&["never tested"], &[3, 2]),
            keyed(&["tested"], &[6, 2])
        ]
    );
}

#[tokio::test]
async fn sets_a_node_cannot_answer_are_refused_before_reading() {
    let (_fx, e) = engine().await;
    let v = |s: ParticipantSet| {
        e.validate(&request(
            "labs",
            &[],
            vec![AggregateRequest::CountRows],
            100,
            Some(in_set(s, false)),
        ))
    };
    assert_refused(v(set("elsewhere", None, 1)), "not served");
    assert_refused(v(set("nope", None, 1)), "not in the catalog");
    assert_refused(v(set("labs", None, 0)), "between 1");
    assert_refused(
        v(set("patients", Some(eq("test", "HbA1c")), 1)),
        "does not have",
    );
    let nine = (0..9).fold(None, |acc: Option<Predicate>, i| {
        let p = in_set(set("labs", Some(eq("test", &format!("t{i}"))), 1), false);
        Some(match acc {
            None => p,
            Some(a) => bin(BinaryOp::And, a, p),
        })
    });
    let req = request("labs", &[], vec![AggregateRequest::CountRows], 100, nine);
    match e.validate(&req) {
        Err(NodeError::InvalidRequest(m)) => assert!(m.contains("the limit is 8"), "{m}"),
        other => panic!("expected the leaf limit, got {other:?}"),
    }
}

/// `WHERE code IN ('12', '7', 'none') GROUP BY code` over labs, whose `code` has no public
/// domain: the listed values are the domain, so exactly they come back, the empty one too.
#[tokio::test]
async fn a_listed_key_answers_exactly_its_listed_groups() {
    let (_fx, e) = engine().await;
    let values: Vec<fedq_common::PublicValue> = ["12", "7", "none"]
        .iter()
        .map(|v| fedq_common::PublicValue::Text(v.to_string()))
        .collect();
    let mut req = request("labs", &[], vec![AggregateRequest::CountRows], 100, None);
    req.group_by = vec![GroupKey::Listed {
        column: "code".into(),
        values,
    }];
    let out = e.execute(&req).await.unwrap();
    let mut got = rows(&out, 1);
    got.sort();
    // Only the listed groups, and (as for any key) no row for an empty one: the coordinator
    // releases the empty ones as noise around zero.
    assert_eq!(got, vec![keyed(&["12"], &[1]), keyed(&["7"], &[1])]);
    // A listed value of another type than the column's is refused before reading.
    req.group_by = vec![GroupKey::Listed {
        column: "code".into(),
        values: vec![fedq_common::PublicValue::Int(12)],
    }];
    assert!(
        matches!(e.validate(&req), Err(NodeError::InvalidRequest(m)) if m.contains("not a value of"))
    );
}

/// `GROUP BY pid IN (SELECT …)`: a condition that is never NULL is a boolean key with the
/// domain {false, true}; one that can be NULL is refused before reading.
#[tokio::test]
async fn a_set_test_is_a_boolean_key_and_a_nullable_condition_is_not() {
    let (_fx, e) = engine().await;
    let mut req = request("labs", &[], vec![AggregateRequest::CountRows], 100, None);
    req.group_by = vec![GroupKey::Condition {
        when: in_set(women(), false),
    }];
    let out = e.execute(&req).await.unwrap();
    let mut got = rows(&out, 1);
    got.sort();
    assert_eq!(got, vec![keyed(&["false"], &[4]), keyed(&["true"], &[5])]);
    req.group_by = vec![GroupKey::Condition {
        when: eq("test", "HbA1c"),
    }];
    assert!(
        matches!(e.validate(&req), Err(NodeError::InvalidRequest(m)) if m.contains("may be NULL"))
    );
}

/// A per-participant derived table of labs: one row per participant with at least
/// `min_rows` rows (p1 and p2 have 3, p3 2, p4 1), R = 1 and nothing more.
#[tokio::test]
async fn a_derived_table_has_one_row_per_participant_and_r_one() {
    use fedq_common::derived::{DerivedColumn, PerParticipant, UnitAggregate};
    let (_fx, e) = engine().await;
    let derived = |min_rows| PerParticipant {
        table: "labs".into(),
        filter: None,
        min_rows,
        columns: vec![
            DerivedColumn {
                name: "lowest".into(),
                value: UnitAggregate::Min {
                    column: "value".into(),
                },
                filter: None,
            },
            DerivedColumn {
                name: "n".into(),
                value: UnitAggregate::CountRows,
                filter: None,
            },
        ],
    };
    let count = |min_rows, r| {
        let mut req = request("labs", &[], vec![AggregateRequest::CountRows], r, None);
        req.derived = Some(derived(min_rows));
        req
    };
    for (min_rows, want) in [(1, 4), (2, 3), (3, 2), (4, 0)] {
        let out = e.execute(&count(min_rows, 1)).await.unwrap();
        assert_eq!(rows(&out, 0)[0].1[0], want, "HAVING COUNT(*) >= {min_rows}");
    }
    // Its columns are the derived ones: `n >= 3` keeps p1 and p2.
    let mut req = count(1, 1);
    req.filter = Some(bin(BinaryOp::GtEq, col("n"), lit(Literal::Int64(3))));
    assert_eq!(rows(&e.execute(&req).await.unwrap(), 0)[0].1[0], 2);
    // R above 1 is refused, as is a column of the table that the derived table lacks.
    assert!(
        matches!(e.validate(&count(1, 2)), Err(NodeError::Refused(m)) if m.contains("exceeds the catalog's 1"))
    );
    let mut req = count(1, 1);
    req.filter = Some(eq("test", "HbA1c"));
    assert!(matches!(e.validate(&req), Err(NodeError::Refused(m)) if m.contains("test")));
}

/// A derived table joined to its own table (`labs l JOIN (… GROUP BY pid HAVING COUNT(*)
/// >= k) d USING (pid)`) keeps exactly the rows of the participants it has a row for, as
/// the same participants tested as a set do; and it must read the table it is joined as.
#[tokio::test]
async fn a_joined_derived_table_keeps_the_rows_of_its_participants_and_reads_its_own_table() {
    use fedq_common::derived::{DerivedColumn, PerParticipant, UnitAggregate};
    let (_fx, e) = engine().await;
    let derived = |table: &str, min_rows| PerParticipant {
        table: table.into(),
        filter: Some(eq("test", "HbA1c")),
        min_rows,
        columns: vec![DerivedColumn {
            name: "n".into(),
            value: UnitAggregate::CountRows,
            filter: None,
        }],
    };
    let joined = |d: PerParticipant| {
        let mut req = request("labs", &[], vec![AggregateRequest::CountRows], 100, None);
        req.joins = vec![fedq_common::JoinSpec {
            table: d.table.clone(),
            left_on: "pid".into(),
            right_on: "pid".into(),
            kind: Default::default(),
            on: None,
            derived: Some(d),
        }];
        req
    };
    for min_rows in 1..=3 {
        let out = e.execute(&joined(derived("labs", min_rows))).await.unwrap();
        assert_eq!(
            rows(&out, 0)[0].1[0],
            labs_rows(&e, in_set(hba1c(min_rows), false)).await,
            "HAVING COUNT(*) >= {min_rows}"
        );
    }
    let mut wrong = joined(derived("patients", 1));
    wrong.joins[0].table = "labs".into();
    assert!(
        matches!(e.validate(&wrong), Err(NodeError::InvalidRequest(m)) if m.contains("not the joined table"))
    );
}
