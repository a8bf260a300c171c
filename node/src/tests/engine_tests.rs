//! Engine tests: exact partial aggregates, filters, bounding, refusals, start-up checks.
//!
//! The labs fixture (R = 100, so nothing is truncated):
//!
//! | # | pid | test    | value  | code | measured_on | flag  | year | site_code |
//! |---|-----|---------|--------|------|-------------|-------|------|-----------|
//! | 1 | p1  | HbA1c   | 5.5    | 12   | 2024-01-10  | true  | 1980 | 1 |
//! | 2 | p1  | HbA1c   | 6.25   | abc  | 2024-02-10  | false | 1980 | 1 |
//! | 3 | p1  | LDL     | 150    | NULL | 2024-03-01  | NULL  | 1980 | 1 |
//! | 4 | p2  | HbA1c   | 9999   | 7    | 2023-12-31  | true  | 1975 | 2 |
//! | 5 | p2  | glucose | -1     | 15   | 2024-01-15  | true  | 1975 | 2 |
//! | 6 | p2  | glucose | NULL   | x9   | 2024-05-05  | false | 1975 | 2 |
//! | 7 | p3  | LDL     | 3.333  | NULL | 2024-06-01  | true  | 2001 | 1 |
//! | 8 | p3  | other   | 1      | 20   | 2024-06-02  | true  | 2001 | 1 |
//! | 9 | p4  | NULL    | 2      | 5    | 2024-07-01  | false | 1990 | 2 |

use fedq_common::{AggregateRequest, BinaryOp, ColumnType, Literal, Predicate};

use super::*;
use crate::{NodeEngine, NodeError};

async fn engine() -> (Fixture, NodeEngine) {
    let fx = Fixture::new();
    let e = NodeEngine::new(&fx.config()).await.unwrap();
    (fx, e)
}

/// CountRows over labs with a filter, no grouping.
async fn count(e: &NodeEngine, filter: Predicate) -> i128 {
    let req = request(
        "labs",
        &[],
        vec![AggregateRequest::CountRows],
        100,
        Some(filter),
    );
    let out = e.execute(&req).await.unwrap();
    let r = rows(&out, 0);
    assert_eq!(r.len(), 1);
    r[0].1[0]
}

#[tokio::test]
async fn grouped_counts_and_clamped_fixed_point_sums() {
    let (_fx, e) = engine().await;
    let req = request(
        "labs",
        &["test"],
        vec![
            AggregateRequest::CountRows,
            count_nn("value"),
            sum("value", 0.0, 100.0, 0.01),
            sum("value", 0.0, 50.0, 0.5),
        ],
        100,
        None,
    );
    let out = e.execute(&req).await.unwrap();
    assert_eq!(out.len(), 1);
    let schema = out[0].schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["test", "agg_0", "agg_1", "agg_2", "agg_3"]);
    assert_eq!(schema.field(0).data_type(), &DataType::Utf8);
    assert!(schema.field(0).is_nullable());
    assert_eq!(schema.field(1).data_type(), &DataType::Int64);
    assert_eq!(schema.field(3).data_type(), &DataType::Decimal128(38, 0));
    // HbA1c: 5.5 -> 550, 6.25 -> 625, sentinel 9999 -> clamped to 10000.
    //        [0, 50] step 0.5: 11 + 13 (12.5 rounds away from zero) + 100 (clamped).
    // LDL: 150 -> clamped to 10000, 3.333 -> 333; step 0.5: 100 + 7.
    // glucose: sentinel -1 -> clamped to 0, NULL skipped (counted as a row, not non-null).
    // "other" and NULL keys are outside the public domain and dropped.
    assert_eq!(
        rows(&out, 1),
        vec![
            keyed(&["HbA1c"], &[3, 3, 11175, 124]),
            keyed(&["LDL"], &[2, 2, 10333, 107]),
            keyed(&["glucose"], &[2, 1, 0, 0]),
        ]
    );
}

#[tokio::test]
async fn integer_sums_and_multi_key_groups() {
    let (_fx, e) = engine().await;
    // No grouping: all 9 rows; year clamped to [1985, 2030]: 1980 and 1975 become 1985.
    let req = request(
        "labs",
        &[],
        vec![
            AggregateRequest::CountRows,
            sum("year", 1900.0, 2030.0, 1.0),
            sum("year", 1985.0, 2030.0, 1.0),
        ],
        100,
        None,
    );
    let out = e.execute(&req).await.unwrap();
    assert_eq!(rows(&out, 0), vec![keyed(&[], &[9, 17857, 17902])]);

    // An int32 key.
    let req = request(
        "labs",
        &["year"],
        vec![AggregateRequest::CountRows],
        100,
        None,
    );
    let out = e.execute(&req).await.unwrap();
    assert_eq!(out[0].schema().field(0).data_type(), &DataType::Int32);
    assert_eq!(
        rows(&out, 1),
        vec![
            keyed(&["1975"], &[3]),
            keyed(&["1980"], &[3]),
            keyed(&["1990"], &[1]),
            keyed(&["2001"], &[2]),
        ]
    );

    // Boolean x int64 keys, in public-domain order; the NULL flag row is dropped.
    let req = request(
        "labs",
        &["flag", "site_code"],
        vec![AggregateRequest::CountRows, count_nn("code")],
        100,
        None,
    );
    let out = e.execute(&req).await.unwrap();
    assert_eq!(out[0].schema().field(0).data_type(), &DataType::Boolean);
    assert_eq!(out[0].schema().field(1).data_type(), &DataType::Int64);
    assert_eq!(
        rows(&out, 2),
        vec![
            keyed(&["true", "1"], &[3, 2]),
            keyed(&["true", "2"], &[2, 2]),
            keyed(&["false", "1"], &[1, 1]),
            keyed(&["false", "2"], &[2, 2]),
        ]
    );
}

#[tokio::test]
async fn no_match_gives_one_zero_row_or_no_groups() {
    let (_fx, e) = engine().await;
    let never = bin(
        BinaryOp::Eq,
        col("pid"),
        lit(Literal::Utf8("nobody".into())),
    );
    let req = request(
        "labs",
        &[],
        vec![AggregateRequest::CountRows, sum("value", 0.0, 100.0, 0.01)],
        100,
        Some(never.clone()),
    );
    assert_eq!(
        rows(&e.execute(&req).await.unwrap(), 0),
        vec![keyed(&[], &[0, 0])]
    );
    let req = request(
        "labs",
        &["test"],
        vec![AggregateRequest::CountRows],
        100,
        Some(never),
    );
    let out = e.execute(&req).await.unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].num_rows(), 0);
}

#[tokio::test]
async fn filters() {
    let (_fx, e) = engine().await;
    let s = |v: &str| lit(Literal::Utf8(v.into()));
    let i = |v: i64| lit(Literal::Int64(v));
    let f = |v: f64| lit(Literal::Float64(v));

    // AND + IN: rows 1, 4, 7.
    let p = bin(
        BinaryOp::And,
        Predicate::InList {
            input: Box::new(col("test")),
            list: vec![s("HbA1c"), s("LDL")],
            negated: false,
        },
        bin(BinaryOp::Eq, col("flag"), lit(Literal::Boolean(true))),
    );
    assert_eq!(count(&e, p).await, 3);

    // BETWEEN: 5.5, 6.25, 3.333.
    let p = Predicate::Between {
        input: Box::new(col("value")),
        low: Box::new(f(3.0)),
        high: Box::new(i(10)),
        negated: false,
    };
    assert_eq!(count(&e, p).await, 3);

    // LIKE / ILIKE / NOT LIKE (NULL codes match neither).
    let like = |pattern: &str, negated, case_insensitive| Predicate::Like {
        input: Box::new(col("code")),
        pattern: pattern.into(),
        negated,
        case_insensitive,
    };
    assert_eq!(count(&e, like("1%", false, false)).await, 2);
    assert_eq!(count(&e, like("X%", false, true)).await, 1);
    assert_eq!(count(&e, like("X%", false, false)).await, 0);
    assert_eq!(count(&e, like("1%", true, false)).await, 5);

    // IS NULL / IS NOT NULL.
    let p = Predicate::IsNull {
        input: Box::new(col("code")),
    };
    assert_eq!(count(&e, p).await, 2);
    let p = Predicate::IsNotNull {
        input: Box::new(col("value")),
    };
    assert_eq!(count(&e, p).await, 8);

    // Date comparison: on or after 2024-03-01: rows 3, 6, 7, 8, 9.
    let p = bin(
        BinaryOp::GtEq,
        col("measured_on"),
        lit(Literal::Date32(days(2024, 3, 1))),
    );
    assert_eq!(count(&e, p).await, 5);

    // TRY_CAST: "12", "15", "20" are > 10; "abc" and "x9" become NULL instead of failing.
    let p = bin(
        BinaryOp::Gt,
        Predicate::TryCast {
            input: Box::new(col("code")),
            to: ColumnType::Int64,
        },
        i(10),
    );
    assert_eq!(count(&e, p).await, 3);

    // NOT: flag false rows 2, 6, 9 (NULL stays NULL).
    let p = Predicate::Not {
        input: Box::new(col("flag")),
    };
    assert_eq!(count(&e, p).await, 3);

    // Arithmetic: year + 1 > 2000, and integer division by a literal.
    let p = bin(
        BinaryOp::Gt,
        bin(BinaryOp::Plus, col("year"), i(1)),
        i(2000),
    );
    assert_eq!(count(&e, p).await, 2);
    let p = bin(
        BinaryOp::GtEq,
        bin(BinaryOp::Divide, col("year"), i(2)),
        i(1000),
    );
    assert_eq!(count(&e, p).await, 2);
    let p = bin(
        BinaryOp::Gt,
        bin(BinaryOp::Divide, col("value"), f(2.0)),
        f(2.0),
    );
    assert_eq!(count(&e, p).await, 4);

    // OR with a negated IN list on an integer column.
    let p = bin(
        BinaryOp::Or,
        Predicate::InList {
            input: Box::new(col("site_code")),
            list: vec![i(1)],
            negated: true,
        },
        bin(BinaryOp::Eq, col("pid"), s("p1")),
    );
    assert_eq!(count(&e, p).await, 7);
}

#[tokio::test]
async fn bounding_keeps_at_most_r_rows_per_participant() {
    let (_fx, e) = engine().await;
    let only = |pids: &[&str]| {
        Some(Predicate::InList {
            input: Box::new(col("pid")),
            list: pids
                .iter()
                .map(|p| lit(Literal::Utf8(p.to_string())))
                .collect(),
            negated: false,
        })
    };
    let total = |out: &[RecordBatch]| -> i128 { rows(out, 1).iter().map(|r| r.1[0]).sum() };

    // R large enough: everything (50 + 3 rows).
    let req = bulk_rows_by_grp(50, only(&["big", "s1"]));
    assert_eq!(total(&e.execute(&req).await.unwrap()), 53);

    // R = 5: `big` contributes exactly 5 rows, `s1` its 3.
    for _ in 0..20 {
        let req = request(
            "bulk",
            &["grp"],
            vec![AggregateRequest::CountRows, sum("x", 0.0, 10.0, 1.0)],
            5,
            only(&["big", "s1"]),
        );
        let out = e.execute(&req).await.unwrap();
        assert_eq!(total(&out), 8);
        let r = rows(&out, 1);
        // The x sum of the kept rows is bounded by 5 * 10 + 3 * 1.
        let xs: i128 = r.iter().map(|row| row.1[1]).sum();
        assert!((3..=53).contains(&xs), "{xs}");
    }

    // R = 1 without grouping.
    let req = request(
        "bulk",
        &[],
        vec![AggregateRequest::CountRows],
        1,
        only(&["big"]),
    );
    assert_eq!(
        rows(&e.execute(&req).await.unwrap(), 0),
        vec![keyed(&[], &[1])]
    );
}

#[tokio::test]
async fn bounding_samples_uniformly() {
    // 100 participants, each with 10 rows in A followed by 30 rows in B; R = 1, repeated 40
    // times: 4000 independent draws, each in A with probability 1/4. Keeping the first row
    // would give 1.0, keeping the last 0.0.
    //
    // Hoeffding: P(|p̂ - 1/4| >= t) <= 2 exp(-2 n t²); with n = 4000 and t = 0.052 this is
    // 2 exp(-21.6) < 1e-9, the false-failure probability of this test.
    let (_fx, e) = engine().await;
    let filter = Predicate::Like {
        input: Box::new(col("pid")),
        pattern: "u%".into(),
        negated: false,
        case_insensitive: false,
    };
    let (mut in_a, mut n) = (0i128, 0i128);
    for _ in 0..40 {
        let req = bulk_rows_by_grp(1, Some(filter.clone()));
        for (k, v) in rows(&e.execute(&req).await.unwrap(), 1) {
            if k[0] == "A" {
                in_a += v[0];
            }
            n += v[0];
        }
    }
    assert_eq!(n, 4000);
    let p = in_a as f64 / n as f64;
    assert!((p - 0.25).abs() < 0.052, "fraction in A = {p}");
}

/// A participant whose rows are split between two files: the first run is sampled on the
/// spot, the second reveals it, and the query is rerun with reservoirs, so the participant
/// still contributes exactly R rows (sampling both runs would have let it give 2R).
#[tokio::test]
async fn a_participant_split_across_files_still_gives_at_most_r_rows() {
    let fx = Fixture::new();
    let extra = batch(vec![
        ("pid", Arc::new(StringArray::from(vec!["u000"; 6]))),
        ("grp", Arc::new(StringArray::from(vec!["A"; 6]))),
        ("x", Arc::new(Int64Array::from(vec![1i64; 6]))),
    ]);
    write_parquet(&fx.dir.path().join("bulk").join("part-1.parquet"), &extra);
    let e = NodeEngine::new(&fx.config()).await.unwrap();
    let only = Predicate::InList {
        input: Box::new(col("pid")),
        list: ["s1", "u000", "u001"]
            .iter()
            .map(|p| lit(Literal::Utf8(p.to_string())))
            .collect(),
        negated: false,
    };
    for _ in 0..10 {
        let req = bulk_rows_by_grp(5, Some(only.clone()));
        let out = e.execute(&req).await.unwrap();
        let total: i128 = rows(&out, 1).iter().map(|r| r.1[0]).sum();
        // s1: its 3 rows; u000 (46 rows) and u001 (40): 5 each.
        assert_eq!(total, 3 + 5 + 5);
    }
}

/// `SELECT grp, COUNT(*) FROM bulk [WHERE filter] GROUP BY grp` with R = `r`.
fn bulk_rows_by_grp(r: u32, filter: Option<Predicate>) -> PartialAggregateRequest {
    request(
        "bulk",
        &["grp"],
        vec![AggregateRequest::CountRows],
        r,
        filter,
    )
}

pub(super) fn assert_refused(r: Result<(), NodeError>, needle: &str) {
    match r {
        Err(NodeError::Refused(m)) => assert!(m.contains(needle), "{needle:?} not in {m:?}"),
        other => panic!("expected a refusal containing {needle:?}, got {other:?}"),
    }
}

fn assert_invalid(r: Result<(), NodeError>, needle: &str) {
    match r {
        Err(NodeError::InvalidRequest(m)) => assert!(m.contains(needle), "{needle:?} not in {m:?}"),
        other => panic!("expected an invalid request containing {needle:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn refusals() {
    let (_fx, e) = engine().await;
    let count = || vec![AggregateRequest::CountRows];
    let v = |req| e.validate(&req);

    assert_refused(v(request("nope", &[], count(), 1, None)), "unknown table");
    assert_refused(v(request("elsewhere", &[], count(), 1, None)), "not served");
    assert_refused(
        v(request("labs", &[], vec![count_nn("weight")], 1, None)),
        "unknown column `weight`",
    );
    // The file's extra column is not queryable.
    assert_refused(
        v(request(
            "labs",
            &[],
            count(),
            1,
            Some(Predicate::IsNull {
                input: Box::new(col("secret")),
            }),
        )),
        "unknown column `secret`",
    );
    assert_refused(v(request("labs", &[], count(), 101, None)), "exceeds");
    assert_invalid(v(request("labs", &[], count(), 0, None)), "at least 1");
    assert_refused(
        v(request(
            "labs",
            &[],
            vec![sum("value", 0.0, 200.0, 0.01)],
            1,
            None,
        )),
        "wider",
    );
    assert_refused(
        v(request(
            "labs",
            &[],
            vec![sum("value", -1.0, 100.0, 0.01)],
            1,
            None,
        )),
        "wider",
    );
    assert_refused(
        v(request(
            "labs",
            &[],
            vec![sum("value", 0.0, 100.0, 0.001)],
            1,
            None,
        )),
        "finer",
    );
    assert_invalid(
        v(request(
            "labs",
            &[],
            vec![sum("value", 50.0, 10.0, 0.01)],
            1,
            None,
        )),
        "lower < upper",
    );
    assert_invalid(
        v(request(
            "labs",
            &[],
            vec![sum("code", 0.0, 1.0, 1.0)],
            1,
            None,
        )),
        "numeric",
    );
    assert_refused(
        v(request("labs", &["code"], count(), 1, None)),
        "public domain",
    );
    assert_refused(
        v(request("labs", &["pid"], count(), 1, None)),
        "privacy unit",
    );
    assert_invalid(
        v(request("labs", &["test", "test"], count(), 1, None)),
        "twice",
    );
    let div = |d: Literal| {
        Some(bin(
            BinaryOp::Gt,
            bin(BinaryOp::Divide, col("year"), lit(d)),
            lit(Literal::Int64(1)),
        ))
    };
    assert_invalid(
        v(request("labs", &[], count(), 1, div(Literal::Int64(0)))),
        "division",
    );
    assert_invalid(
        v(request("labs", &[], count(), 1, div(Literal::Int64(-1)))),
        "division",
    );
    assert_invalid(
        v(request("labs", &[], count(), 1, div(Literal::Float64(0.0)))),
        "division",
    );
    let by_col = Some(bin(
        BinaryOp::Gt,
        bin(BinaryOp::Divide, col("year"), col("year")),
        lit(Literal::Int64(1)),
    ));
    assert_invalid(v(request("labs", &[], count(), 1, by_col)), "division");
    // A text column compared with a number would need a cast that can fail on a row.
    let p = Some(bin(BinaryOp::Eq, col("code"), lit(Literal::Int64(12))));
    assert_invalid(v(request("labs", &[], count(), 1, p)), "TRY_CAST");
    let p = Some(Predicate::Like {
        input: Box::new(col("year")),
        pattern: "19%".into(),
        negated: false,
        case_insensitive: false,
    });
    assert_invalid(v(request("labs", &[], count(), 1, p)), "LIKE");
    // A non-boolean filter.
    assert_invalid(
        v(request("labs", &[], count(), 1, Some(col("year")))),
        "not boolean",
    );
    // A valid request passes.
    assert!(v(request(
        "labs",
        &["test"],
        vec![sum("value", 0.0, 100.0, 0.01)],
        100,
        None
    ))
    .is_ok());
}

#[tokio::test]
async fn csv_table() {
    let (_fx, e) = engine().await;
    // R = 1 (one row per patient). F: 1980 + 2100 clamped to 2030; M: 1850 clamped to 1900.
    // "X" and the empty sex are outside the public domain.
    let req = request(
        "patients",
        &["sex"],
        vec![
            AggregateRequest::CountRows,
            sum("birth_year", 1900.0, 2030.0, 1.0),
        ],
        1,
        None,
    );
    assert_eq!(
        rows(&e.execute(&req).await.unwrap(), 1),
        vec![keyed(&["F"], &[2, 4010]), keyed(&["M"], &[1, 1900])]
    );
    // The extra CSV column is not queryable.
    let req = request(
        "patients",
        &[],
        vec![AggregateRequest::CountRows],
        1,
        Some(Predicate::IsNull {
            input: Box::new(col("comment")),
        }),
    );
    assert_refused(e.validate(&req), "unknown column `comment`");
}

#[tokio::test]
async fn data_dependent_failure_is_an_execution_error() {
    let (fx, e) = engine().await;
    let req = request("broken", &[], vec![sum("n", 0.0, 10.0, 1.0)], 1, None);
    assert_eq!(
        rows(&e.execute(&req).await.unwrap(), 0),
        vec![keyed(&[], &[3])]
    );
    // The file changes under the running node and a value no longer parses.
    fx.break_csv();
    assert!(e.validate(&req).is_ok());
    match e.execute(&req).await {
        Err(err @ NodeError::Execution { .. }) => {
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), tonic::Code::Internal);
            assert_eq!(
                status.message(),
                "node site01 could not execute query q-test; details are in the node log"
            );
        }
        other => panic!("expected an execution error, got {other:?}"),
    }
}

#[tokio::test]
async fn info_lists_served_tables() {
    let (_fx, e) = engine().await;
    let info = e.info();
    assert_eq!(info.site, "site01");
    assert_eq!(info.protocol_version, fedq_common::PROTOCOL_VERSION);
    assert_eq!(
        info.tables,
        ["broken", "bulk", "encounters", "labs", "patients", "stays"]
    );
}

#[tokio::test]
async fn schema_mismatch_names_file_column_and_types() {
    let fx = Fixture::new();
    write_parquet(
        &fx.dir.path().join("labs.parquet"),
        &labs_batch(true, false),
    );
    let err = NodeEngine::new(&fx.config()).await.unwrap_err();
    assert!(matches!(err, NodeError::SchemaMismatch(_)), "{err:?}");
    let m = err.to_string();
    for needle in ["labs.parquet", "`value`", "Int64", "float64", "catalog"] {
        assert!(m.contains(needle), "{needle:?} not in {m:?}");
    }

    write_parquet(
        &fx.dir.path().join("labs.parquet"),
        &labs_batch(false, true),
    );
    let m = NodeEngine::new(&fx.config()).await.unwrap_err().to_string();
    for needle in ["labs.parquet", "`code`", "missing"] {
        assert!(m.contains(needle), "{needle:?} not in {m:?}");
    }

    // CSV: a header without a catalog column.
    let fx = Fixture::new();
    std::fs::write(
        fx.dir.path().join("patients.csv"),
        "pid,birth_year\np1,1980\n",
    )
    .unwrap();
    let m = NodeEngine::new(&fx.config()).await.unwrap_err().to_string();
    for needle in ["patients.csv", "`sex`", "missing"] {
        assert!(m.contains(needle), "{needle:?} not in {m:?}");
    }
}

#[test]
fn config_errors() {
    let fx = Fixture::new();
    let base = fx.dir.path();

    let text = NODE_TOML.replace("path = \"labs.parquet\"", "path = \"nope/labs.parquet\"");
    let err = NodeConfig::from_toml_str(&text, base).unwrap_err();
    assert!(matches!(err, NodeError::MissingFile { .. }), "{err:?}");
    let m = err.to_string();
    for needle in ["nope/labs.parquet", "labs", "fix `path`"] {
        assert!(m.contains(needle), "{needle:?} not in {m:?}");
    }

    let text = format!("{NODE_TOML}\n[tables.visits]\npath = \"labs.parquet\"\n");
    let m = NodeConfig::from_toml_str(&text, base)
        .unwrap_err()
        .to_string();
    assert!(
        m.contains("visits") && m.contains("not a table of the catalog"),
        "{m}"
    );

    let text = format!("colour = \"blue\"\n{NODE_TOML}");
    let m = NodeConfig::from_toml_str(&text, base)
        .unwrap_err()
        .to_string();
    assert!(m.contains("colour"), "{m}");

    let text = NODE_TOML.replace("127.0.0.1:0", "localhost");
    let m = NodeConfig::from_toml_str(&text, base)
        .unwrap_err()
        .to_string();
    assert!(m.contains("listen"), "{m}");

    let text = NODE_TOML.replace("catalog.toml", "missing-catalog.toml");
    let m = NodeConfig::from_toml_str(&text, base)
        .unwrap_err()
        .to_string();
    assert!(m.contains("missing-catalog.toml"), "{m}");

    // Defaults and resolution.
    let text = NODE_TOML.replace("listen = \"127.0.0.1:0\"\n", "");
    let cfg = NodeConfig::from_toml_str(&text, base).unwrap();
    assert_eq!(cfg.listen.to_string(), crate::DEFAULT_LISTEN);
    assert!(cfg.tables["labs"].path.is_absolute());
    assert_eq!(cfg.tables["labs"].format, crate::TableFormat::Parquet);
    assert_eq!(cfg.tables["patients"].format, crate::TableFormat::Csv);
    assert!(cfg.catalog_path.is_absolute());
}

#[tokio::test]
async fn sums_of_squares_are_validated_like_sums() {
    let (_fx, e) = engine().await;
    let sq = |lower: f64, upper: f64, precision: f64| AggregateRequest::SumSquaresFixed {
        column: "value".into(),
        lower,
        upper,
        precision,
    };
    let v = |a| e.validate(&request("labs", &[], vec![a], 1, None));
    assert_refused(v(sq(0.0, 200.0, 0.01)), "wider than the catalog");
    assert_refused(v(sq(0.0, 100.0, 0.001)), "finer than the catalog");
    assert_invalid(v(sq(5.0, 5.0, 0.01)), "lower < upper");
    let ok = e
        .execute(&request(
            "labs",
            &[],
            vec![sq(0.0, 100.0, 0.01), count_nn("value")],
            100,
            None,
        ))
        .await
        .unwrap();
    let r = rows(&ok, 0);
    assert_eq!(r.len(), 1);
    // Non-negative, and at most count · half-width² (half-width 5000 in 0.01 units).
    assert!(r[0].1[0] >= 0 && r[0].1[0] <= r[0].1[1] * 5000 * 5000);

    // Exact, on the integer column: years 1980×3, 1975×3, 2001×2, 1990.
    let ysq = |lower: f64, upper: f64| AggregateRequest::SumSquaresFixed {
        column: "year".into(),
        lower,
        upper,
        precision: 1.0,
    };
    let out = e
        .execute(&request(
            "labs",
            &[],
            vec![ysq(1900.0, 2030.0), ysq(1985.0, 2030.0)],
            100,
            None,
        ))
        .await
        .unwrap();
    // Mid 1965: 3·15² + 3·10² + 2·36² + 25² = 4192. Bounds [1985, 2030], mid 2007, with
    // 1980 and 1975 clamped to 1985: 6·22² + 2·6² + 17² = 3265.
    assert_eq!(rows(&out, 0), vec![keyed(&[], &[4192, 3265])]);
}

fn joined(mut req: PartialAggregateRequest, right: &str) -> PartialAggregateRequest {
    req.joins.push(fedq_common::JoinSpec {
        table: right.into(),
        left_on: "pid".into(),
        right_on: "pid".into(),
        kind: Default::default(),
        on: None,
        derived: None,
    });
    req
}

fn right_col(name: &str) -> Predicate {
    Predicate::Column {
        name: name.into(),
        side: fedq_common::Side::RIGHT,
    }
}

/// `bulk JOIN encounters USING (pid)`: `big` has 50 × 20 = 1000 joined rows, `s1` 3 × 2 = 6,
/// `u000`…`u009` 40 × 1 = 40 each, `nobody` none (no `bulk` rows). R is the driving table's
/// (bulk: 50), applied after the join, never per side and never through bulk's own
/// start-up counts (by which `big`, with 50 rows, would look safe to aggregate directly).
#[tokio::test]
async fn joins_bound_rows_per_participant_after_the_join() {
    let (_fx, e) = engine().await;
    let y = AggregateRequest::SumFixed {
        column: fedq_common::ColumnRef::right("y"),
        lower: 0.0,
        upper: 10.0,
        precision: 1.0,
    };
    for _ in 0..10 {
        let req = joined(
            request(
                "bulk",
                &[],
                vec![AggregateRequest::CountRows, y.clone()],
                50,
                None,
            ),
            "encounters",
        );
        // big 50 (of 1000), s1 6, u000…u009 40 each; y is 10, 1 and 2 for them.
        assert_eq!(
            rows(&e.execute(&req).await.unwrap(), 0),
            vec![keyed(&[], &[50 + 6 + 400, 500 + 6 + 800])]
        );
    }
    // A smaller R: 5 rows each for the 12 joined participants.
    let req = joined(
        request("bulk", &[], vec![AggregateRequest::CountRows], 5, None),
        "encounters",
    );
    assert_eq!(
        rows(&e.execute(&req).await.unwrap(), 0),
        vec![keyed(&[], &[12 * 5])]
    );
    // Group keys from the left side: big's 50 kept rows split randomly between A and B;
    // s1's 6 are in A; each u's 10 A rows and 30 B rows are all kept.
    let req = joined(
        request(
            "bulk",
            &["grp"],
            vec![AggregateRequest::CountRows],
            50,
            None,
        ),
        "encounters",
    );
    let r = rows(&e.execute(&req).await.unwrap(), 1);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].0, vec!["A".to_string()]);
    assert!((106..=156).contains(&r[0].1[0]), "{r:?}");
    assert_eq!(r[0].1[0] + r[1].1[0], 456);
    // Group key from the right side, filter on the right side: y > 1 drops s1.
    let mut req = joined(
        request("bulk", &[], vec![AggregateRequest::CountRows], 50, None),
        "encounters",
    );
    req.group_by = vec![fedq_common::ColumnRef::right("kind").into()];
    req.filter = Some(bin(BinaryOp::Gt, right_col("y"), lit(Literal::Int64(1))));
    let r = rows(&e.execute(&req).await.unwrap(), 1);
    let total: i128 = r.iter().map(|x| x.1[0]).sum();
    assert_eq!(total, 450, "{r:?}");
    // Both sides with the same column name: the left `pid` filter and the right `y`.
    let mut req = joined(
        request(
            "bulk",
            &[],
            vec![AggregateRequest::CountRows],
            50,
            Some(bin(
                BinaryOp::Eq,
                col("pid"),
                lit(Literal::Utf8("s1".into())),
            )),
        ),
        "encounters",
    );
    req.aggregates.push(count_nn("pid"));
    assert_eq!(
        rows(&e.execute(&req).await.unwrap(), 0),
        vec![keyed(&[], &[6, 6])]
    );
}

#[tokio::test]
async fn join_refusals() {
    let (_fx, e) = engine().await;
    let count = || vec![AggregateRequest::CountRows];
    let v = |req| e.validate(&req);
    let base = || joined(request("bulk", &[], count(), 50, None), "encounters");
    assert!(v(base()).is_ok());

    // R is the driving table's: bulk allows 50, encounters only 3.
    assert_refused(
        v(joined(
            request("bulk", &[], count(), 51, None),
            "encounters",
        )),
        "exceeds the catalog's 50",
    );
    assert_refused(
        v(joined(request("bulk", &[], count(), 1, None), "nope")),
        "unknown table",
    );
    assert_refused(
        v(joined(request("bulk", &[], count(), 1, None), "elsewhere")),
        "not served",
    );
    // A self-join pairs one participant's rows, so it validates (R still bounds them).
    assert!(v(joined(request("bulk", &[], count(), 1, None), "bulk")).is_ok());
    let mut off = base();
    if let Some(j) = off.joins.first_mut() {
        j.left_on = "grp".into();
        j.right_on = "kind".into();
    }
    assert_refused(v(off), "joins must be on the privacy units");
    // Columns resolve on their own side.
    let mut r = base();
    r.aggregates = vec![AggregateRequest::CountNonNull {
        column: fedq_common::ColumnRef::right("grp"),
    }];
    assert_refused(v(r), "unknown column `grp`");
    let mut r = base();
    r.group_by = vec![fedq_common::ColumnRef::right("pid").into()];
    assert_refused(v(r), "privacy unit");
    let mut r = base();
    r.aggregates = vec![AggregateRequest::SumFixed {
        column: fedq_common::ColumnRef::right("raw"),
        lower: 0.0,
        upper: 1.0,
        precision: 1.0,
    }];
    assert_refused(v(r), "no clamp bounds");
    // A right-side column without a join.
    let mut r = request("bulk", &[], count(), 1, None);
    r.filter = Some(bin(BinaryOp::Gt, right_col("y"), lit(Literal::Int64(1))));
    assert_invalid(v(r), "which joins 0");
    // A second joined table: its columns are side 2; a third side does not exist.
    let two = joined(base(), "bulk");
    assert!(v(two.clone()).is_ok());
    let mut r = two.clone();
    r.filter = Some(bin(
        BinaryOp::Gt,
        Predicate::Column {
            name: "y".into(),
            side: fedq_common::Side(3),
        },
        lit(Literal::Int64(1)),
    ));
    assert_invalid(v(r), "joined table 3 of the request, which joins 2");
    // The first join's ON condition cannot read the table joined after it.
    let mut r = two.clone();
    r.joins[0].kind = fedq_common::JoinKind::Left;
    r.joins[0].on = Some(Predicate::IsNotNull {
        input: Box::new(Predicate::Column {
            name: "grp".into(),
            side: fedq_common::Side(2),
        }),
    });
    assert_invalid(v(r), "reads a table joined after it");
    // At most MAX_JOINS joined tables.
    let mut r = base();
    r.joins = vec![r.joins[0].clone(); fedq_common::wire::MAX_JOINS + 1];
    assert_invalid(v(r), "joined tables; the limit is");
}

/// `labs` as the node shares it: `test` and `value` only, R at most 10, sums of `value`
/// clamped within [0, 50] at the widest (the catalog allows R = 100 and [0, 100]).
const POLICY_TOML: &str = r#"
[tables.labs]
path = "labs.parquet"
columns = ["test", "value"]
max_rows_per_unit = 10
[tables.labs.clamp]
value = { lower = 0.0, upper = 50.0 }

[tables.patients]
path = "patients.csv"
"#;

fn policy_config(fx: &Fixture, tables: &str) -> Result<crate::NodeConfig, NodeError> {
    let head = "site = \"site01\"\nlisten = \"127.0.0.1:0\"\ninsecure_dev = true\ncatalog = \"catalog.toml\"\n";
    crate::NodeConfig::from_toml_str(&format!("{head}{tables}"), fx.dir.path())
}

#[tokio::test]
async fn the_node_policy_narrows_the_catalog() {
    let fx = Fixture::new();
    let cfg = policy_config(&fx, POLICY_TOML).unwrap();
    let e = NodeEngine::new(&cfg).await.unwrap();
    let v = |req| e.validate(&req);
    let count = || vec![AggregateRequest::CountRows];
    // Columns the catalog declares but the node does not share, in every role.
    assert_refused(
        v(request("labs", &[], vec![count_nn("code")], 10, None)),
        "column `code` of table `labs` (in COUNT) is not shared by this node",
    );
    assert_refused(
        v(request("labs", &["flag"], count(), 10, None)),
        "`flag` of table `labs` (in GROUP BY) is not shared",
    );
    let by_year = bin(BinaryOp::Gt, col("year"), lit(Literal::Int64(1980)));
    assert_refused(
        v(request("labs", &[], count(), 10, Some(by_year))),
        "`year` of table `labs`",
    );
    // R above the node's cap (but within the catalog's 100).
    assert_refused(
        v(request("labs", &[], count(), 11, None)),
        "exceeds this node's cap of 10",
    );
    // A clamp within the catalog's [0, 100] but wider than the node's [0, 50].
    assert_refused(
        v(request(
            "labs",
            &[],
            vec![sum("value", 0.0, 100.0, 0.01)],
            10,
            None,
        )),
        "wider than this node accepts, [0, 50]",
    );
    assert_refused(
        v(request(
            "labs",
            &[],
            vec![sum("value", 0.0, 50.5, 0.01)],
            10,
            None,
        )),
        "wider than this node accepts",
    );
    // Within the policy: answered, with the privacy unit used for bounding.
    let ok = request(
        "labs",
        &["test"],
        vec![AggregateRequest::CountRows, sum("value", 0.0, 50.0, 0.01)],
        10,
        Some(bin(BinaryOp::Gt, col("value"), lit(Literal::Float64(0.0)))),
    );
    assert!(e.execute(&ok).await.is_ok());
    assert!(v(request(
        "labs",
        &[],
        vec![sum("value", 10.0, 40.0, 0.01)],
        3,
        None
    ))
    .is_ok());
    // A table without policy keys shares what the catalog declares.
    assert!(v(request("patients", &["sex"], count(), 1, None)).is_ok());
}

#[test]
fn node_policy_config_errors_name_the_key_and_the_fix() {
    let fx = Fixture::new();
    let cases = [
        (
            "[tables.labs]\npath = \"labs.parquet\"\ncolumns = [\"value\", \"weight\"]\n",
            "columns lists `weight`, which the catalog does not declare",
        ),
        (
            "[tables.labs]\npath = \"labs.parquet\"\nmax_rows_per_unit = 101\n",
            "max_rows_per_unit = 101 must be between 1 and the catalog's 100",
        ),
        (
            "[tables.labs]\npath = \"labs.parquet\"\nmax_rows_per_unit = 0\n",
            "max_rows_per_unit = 0",
        ),
        (
            "[tables.labs]\npath = \"labs.parquet\"\n[tables.labs.clamp]\nvalue = { lower = -1.0, upper = 50.0 }\n",
            "is wider than the catalog's [0, 100]",
        ),
        (
            "[tables.labs]\npath = \"labs.parquet\"\ncolumns = [\"test\"]\n[tables.labs.clamp]\nvalue = { lower = 0.0, upper = 50.0 }\n",
            "`value` is not in this table's `columns`",
        ),
        (
            "[tables.labs]\npath = \"labs.parquet\"\n[tables.labs.clamp]\ncode = { lower = 0.0, upper = 1.0 }\n",
            "declares no bounds",
        ),
        (
            "[tables.labs]\npath = \"labs.parquet\"\n[tables.labs.clamp]\nvalue = { lower = 5.0, upper = 5.0 }\n",
            "lower < upper",
        ),
        (
            "max_query_memory_mb = 0\n",
            "max_query_memory_mb = 0 must be between 1",
        ),
    ];
    for (tables, needle) in cases {
        // Top-level keys go before the first table.
        let text = if tables.starts_with('[') {
            tables.to_string()
        } else {
            format!("{tables}[tables.labs]\npath = \"labs.parquet\"\n")
        };
        let e = policy_config(&fx, &text).unwrap_err().to_string();
        assert!(e.contains(needle), "{needle:?} not in {e}");
    }
    let cfg = policy_config(
        &fx,
        "max_query_memory_mb = 64\n[tables.labs]\npath = \"labs.parquet\"\n",
    )
    .unwrap();
    assert_eq!(cfg.limits.max_query_memory, 64 * 1024 * 1024);
    let cfg = policy_config(&fx, "[tables.labs]\npath = \"labs.parquet\"\n").unwrap();
    assert_eq!(
        cfg.limits.max_query_memory,
        crate::DEFAULT_MAX_QUERY_MEMORY_MB * 1024 * 1024
    );
}

/// A node whose worst query (its two largest tables joined, see `MemoryBound`) exceeds
/// `max_query_memory_mb` refuses to start, naming the tables, the estimate and the value to
/// set; at exactly the worst case it starts, and the queries that the old per-query limit
/// stopped (a join's hash table, every participant through a reservoir) answer, with the
/// same answers as under the default limit: no query is stopped on memory.
#[tokio::test]
async fn a_node_whose_worst_query_exceeds_its_memory_limit_refuses_to_start() {
    let fx = Fixture::new();
    let worst = NodeEngine::new(&fx.config())
        .await
        .unwrap()
        .worst_query_bytes();
    assert!(worst > crate::engine::ACCUMULATOR_BYTES);
    let mut cfg = fx.config();
    cfg.limits.max_query_memory = 4 * 1024;
    let err = NodeEngine::new(&cfg).await.unwrap_err().to_string();
    for needle in [
        "can need up to",
        "more than max_query_memory_mb = 1",
        "raise max_query_memory_mb to at least",
        "table `",
        "joined with table `",
    ] {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
    cfg.limits.max_query_memory = worst as usize - 1;
    assert!(NodeEngine::new(&cfg).await.is_err(), "one byte short");
    cfg.limits.max_query_memory = worst as usize;
    let e = NodeEngine::new(&cfg).await.unwrap();
    let reference = NodeEngine::new(&fx.config()).await.unwrap();
    let join = joined(
        request("bulk", &[], vec![AggregateRequest::CountRows], 50, None),
        "encounters",
    );
    // Every bulk participant through a reservoir of 5 rows: the arena and the id index.
    let reservoirs = bulk_rows_by_grp(5, None);
    for req in [join, reservoirs] {
        let got = rows(&e.execute(&req).await.unwrap(), req.group_by.len());
        let want = rows(&reference.execute(&req).await.unwrap(), req.group_by.len());
        assert_eq!(got.len(), want.len());
        // Reservoirs sample, so compare the row counts of the joined query only.
        if !req.joins.is_empty() {
            assert_eq!(got, want);
        }
    }
}

/// A table whose files grow past the memory limit while the node runs: the query that
/// notices (and recounts) still answers, since it must not fail on its data, and every
/// later request on the table, alone or joined, is refused in validation, before reading,
/// with one message that names only the table, the limit and the site.
#[tokio::test]
async fn a_table_grown_past_the_memory_limit_is_refused_before_reading() {
    let fx = Fixture::new();
    let worst = NodeEngine::new(&fx.config())
        .await
        .unwrap()
        .worst_query_bytes();
    let mut cfg = fx.config();
    cfg.limits.max_query_memory = worst as usize;
    let e = NodeEngine::new(&cfg).await.unwrap();
    let count = request("labs", &[], vec![AggregateRequest::CountRows], 100, None);
    assert!(e.validate(&count).is_ok());
    // labs.parquet is rewritten 20 000 times larger (a new file: another stamp).
    let one = labs_batch(false, false);
    let many: Vec<_> = (0..20_000).map(|_| one.clone()).collect();
    let big = arrow::compute::concat_batches(&one.schema(), &many).unwrap();
    let tmp = fx.dir.path().join("labs.parquet.new");
    write_parquet(&tmp, &big);
    std::fs::rename(&tmp, fx.dir.path().join("labs.parquet")).unwrap();
    // The query that finds the file changed recounts and answers.
    assert!(e.execute(&count).await.is_ok());
    let msg = |r: Result<(), NodeError>| match r {
        Err(err @ NodeError::Refused(_)) => {
            assert_eq!(err.stage(), fedq_common::outcome::FailureStage::BeforeData);
            err.to_string()
        }
        other => panic!("expected a refusal, got {other:?}"),
    };
    let a = msg(e.validate(&count));
    let b = msg(e.validate(&request(
        "labs",
        &["test"],
        vec![sum("value", 0.0, 100.0, 0.01)],
        1,
        None,
    )));
    let c = msg(e.validate(&joined(
        request("patients", &[], vec![AggregateRequest::CountRows], 1, None),
        "labs",
    )));
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert!(a.contains("table `labs` no longer fits"), "{a}");
    assert!(a.contains("raise max_query_memory_mb"), "{a}");
    assert!(matches!(
        e.execute(&count).await,
        Err(NodeError::Refused(_))
    ));
    // Other tables still answer.
    let small = request("patients", &[], vec![AggregateRequest::CountRows], 1, None);
    assert!(e.execute(&small).await.is_ok());
}

#[tokio::test]
async fn percentile_histograms_are_validated_like_sums_and_exact() {
    use arrow::array::AsArray;
    let (_fx, e) = engine().await;
    let h = |lower: f64, upper: f64, candidates: u32| AggregateRequest::QuantileHistogram {
        column: "year".into(),
        lower,
        upper,
        precision: 1.0,
        candidates,
    };
    let v = |a| e.validate(&request("labs", &[], vec![a], 1, None));
    assert_refused(v(h(1800.0, 2030.0, 10)), "wider than the catalog");
    assert_invalid(v(h(1900.0, 2030.0, 1)), "at least 2 candidates");
    assert_invalid(v(h(1900.0, 2030.0, 5000)), "at most 1024");
    assert_invalid(v(h(1990.0, 1995.0, 10)), "do not fit");
    assert!(v(h(1900.0, 2030.0, 131)).is_ok());

    // Years 1980×3, 1975×3, 2001×2, 1990 on a grid of every year in [1970, 2010]: bin 2i
    // holds year 1970 + i. Grouped by year, each group has its own histogram.
    let out = e
        .execute(&request(
            "labs",
            &[],
            vec![h(1970.0, 2010.0, 41)],
            100,
            None,
        ))
        .await
        .unwrap();
    let list = out[0].column(0).as_list::<i32>().value(0);
    let bins = list
        .as_primitive::<arrow::datatypes::Int64Type>()
        .values()
        .to_vec();
    let mut want = vec![0i64; 81];
    want[10] = 3;
    want[20] = 3;
    want[40] = 1;
    want[62] = 2;
    assert_eq!(bins, want);
    // A coarser grid (1970, 1980, …, 2010): 1975 and 2001 fall between candidates.
    let out = e
        .execute(&request("labs", &[], vec![h(1970.0, 2010.0, 5)], 100, None))
        .await
        .unwrap();
    let list = out[0].column(0).as_list::<i32>().value(0);
    let bins = list
        .as_primitive::<arrow::datatypes::Int64Type>()
        .values()
        .to_vec();
    assert_eq!(bins, vec![0, 3, 3, 0, 1, 0, 0, 2, 0]);
}

fn open(mut req: PartialAggregateRequest, g: u32) -> PartialAggregateRequest {
    req.max_groups_per_unit = Some(g);
    req
}

#[tokio::test]
async fn open_keys_keep_each_participant_in_at_most_g_groups() {
    let (_fx, e) = engine().await;
    let aggs = vec![
        AggregateRequest::CountRows,
        AggregateRequest::CountUnits,
        sum("days", 0.0, 30.0, 1.0),
    ];
    let out = e
        .execute(&open(
            request("stays", &["code"], aggs.clone(), 10, None),
            2,
        ))
        .await
        .unwrap();
    let schema = out[0].schema();
    assert_eq!(schema.field(0).name(), "code");
    assert_eq!(schema.field(0).data_type(), &DataType::Utf8);
    // a keeps X (3 rows) and Y (2, tied with Z, smaller key); b keeps Y and Z (its NULL
    // codes are dropped); c keeps U and V (all tied). W is nobody's choice, so it is not
    // even observed. days 40 of c's U clamps to 30.
    assert_eq!(
        rows(&out, 1),
        vec![
            keyed(&["U"], &[1, 1, 30]),
            keyed(&["V"], &[1, 1, 14]),
            keyed(&["X"], &[3, 1, 13]),
            keyed(&["Y"], &[3, 2, 22]),
            keyed(&["Z"], &[1, 1, 10]),
        ]
    );
    // G = 1: a keeps X, b keeps Y (tie, smaller key), c keeps U.
    let out = e
        .execute(&open(
            request("stays", &["code"], aggs.clone(), 10, None),
            1,
        ))
        .await
        .unwrap();
    assert_eq!(
        rows(&out, 1),
        vec![
            keyed(&["U"], &[1, 1, 30]),
            keyed(&["X"], &[3, 1, 13]),
            keyed(&["Y"], &[1, 1, 11]),
        ]
    );
    // The filter applies before the choice: without X, a keeps Y and Z (2 rows each).
    let not_x = bin(BinaryOp::NotEq, col("code"), lit(Literal::Utf8("X".into())));
    let out = e
        .execute(&open(
            request("stays", &["code"], aggs.clone(), 10, Some(not_x)),
            2,
        ))
        .await
        .unwrap();
    assert_eq!(
        rows(&out, 1),
        vec![
            keyed(&["U"], &[1, 1, 30]),
            keyed(&["V"], &[1, 1, 14]),
            keyed(&["Y"], &[3, 2, 22]),
            keyed(&["Z"], &[3, 2, 17]),
        ]
    );
    // Two open keys, one of them an integer: groups are (code, ward) pairs. a: (X,1) 2 rows,
    // then (Y,2) 2 rows beats (Z,1) 2 rows by key; b: (Y,1), (Z,1); c: (U,3), (V,3).
    let out = e
        .execute(&open(
            request(
                "stays",
                &["code", "ward"],
                vec![AggregateRequest::CountRows],
                10,
                None,
            ),
            2,
        ))
        .await
        .unwrap();
    assert_eq!(out[0].schema().field(1).data_type(), &DataType::Int64);
    assert_eq!(
        rows(&out, 2),
        vec![
            keyed(&["U", "3"], &[1]),
            keyed(&["V", "3"], &[1]),
            keyed(&["X", "1"], &[2]),
            keyed(&["Y", "1"], &[1]),
            keyed(&["Y", "2"], &[2]),
            keyed(&["Z", "1"], &[1]),
        ]
    );
}

#[tokio::test]
async fn open_keys_bound_rows_to_r_after_the_groups() {
    let (_fx, e) = engine().await;
    // R = 2 after G = 2: a keeps 2 of its 5 rows in X and Y, b and c keep both of theirs.
    for _ in 0..20 {
        let out = e
            .execute(&open(
                request(
                    "stays",
                    &["code"],
                    vec![AggregateRequest::CountRows],
                    2,
                    None,
                ),
                2,
            ))
            .await
            .unwrap();
        let r = rows(&out, 1);
        let total: i128 = r.iter().map(|(_, v)| v[0]).sum();
        assert_eq!(total, 6, "{r:?}");
        assert!(
            r.iter()
                .all(|(k, _)| ["U", "V", "X", "Y", "Z"].contains(&k[0].as_str())),
            "{r:?}"
        );
        let xy: i128 = r
            .iter()
            .filter(|(k, _)| k[0] == "X" || k[0] == "Y")
            .map(|(_, v)| v[0])
            .sum();
        // a's 2 rows, plus b's Y.
        assert_eq!(xy, 3, "{r:?}");
    }
}

#[tokio::test]
async fn open_key_refusals() {
    let (_fx, e) = engine().await;
    let count = || vec![AggregateRequest::CountRows];
    let v = |req| e.validate(&req);
    // Without G, a key without a public domain is refused, as before.
    assert_refused(
        v(request("stays", &["code"], count(), 1, None)),
        "no public domain",
    );
    // labs declares no G.
    assert_refused(
        v(open(request("labs", &["code"], count(), 1, None), 1)),
        "declares no max_groups_per_unit",
    );
    assert_refused(
        v(open(request("stays", &["code"], count(), 1, None), 3)),
        "exceeds the catalog's 2",
    );
    assert_invalid(
        v(open(request("stays", &["code"], count(), 1, None), 0)),
        "at least 1",
    );
    assert_invalid(
        v(open(request("stays", &[], count(), 1, None), 1)),
        "only meaningful with GROUP BY",
    );
    assert_refused(
        v(open(request("stays", &["pid"], count(), 1, None), 1)),
        "privacy unit",
    );
    assert!(v(open(
        request("stays", &["code", "ward"], count(), 10, None),
        2
    ))
    .is_ok());
}

fn keyed_by(
    mut req: PartialAggregateRequest,
    keys: Vec<fedq_common::GroupKey>,
) -> PartialAggregateRequest {
    req.group_by = keys;
    req
}

fn bucket(column: &str, divisor: i64, multiplier: i64) -> fedq_common::GroupKey {
    fedq_common::GroupKey::IntBucket {
        column: column.into(),
        divisor,
        multiplier,
    }
}

#[tokio::test]
async fn bucketed_keys_group_exactly_and_clamp_to_the_bounds() {
    use fedq_common::group_key::{CaseBranch, DateField};
    let (_fx, e) = engine().await;

    // Decades of birth_year over its bounds [1900, 2030]: 1850 clamps into the 1900s and
    // 2100 into the 2030s, as sums clamp them; nothing is dropped.
    let req = keyed_by(
        request(
            "patients",
            &[],
            vec![
                AggregateRequest::CountRows,
                sum("birth_year", 1900.0, 2030.0, 1.0),
            ],
            1,
            None,
        ),
        vec![bucket("birth_year", 10, 10)],
    );
    let out = e.execute(&req).await.unwrap();
    assert_eq!(out[0].schema().field(0).data_type(), &DataType::Int64);
    assert_eq!(
        rows(&out, 1),
        vec![
            keyed(&["1900"], &[1, 1900]),
            keyed(&["1970"], &[1, 1970]),
            keyed(&["1980"], &[1, 1980]),
            keyed(&["1990"], &[1, 1990]),
            keyed(&["2030"], &[1, 2030]),
        ]
    );

    // CASE: the first true condition wins; a NULL condition is not true.
    let case = fedq_common::GroupKey::Case {
        branches: vec![
            CaseBranch {
                when: bin(BinaryOp::GtEq, col("value"), lit(Literal::Float64(100.0))),
                then: Literal::Utf8("high".into()),
            },
            CaseBranch {
                when: bin(
                    BinaryOp::Eq,
                    col("test"),
                    lit(Literal::Utf8("HbA1c".into())),
                ),
                then: Literal::Utf8("a1c".into()),
            },
        ],
        otherwise: Literal::Utf8("other".into()),
    };
    let out = e
        .execute(&keyed_by(
            request("labs", &[], vec![AggregateRequest::CountRows], 100, None),
            vec![case.clone(), "site_code".into()],
        ))
        .await
        .unwrap();
    assert_eq!(
        rows(&out, 2),
        vec![
            // In domain order: the labels as the CASE lists them.
            keyed(&["high", "1"], &[1]),
            keyed(&["high", "2"], &[1]),
            keyed(&["a1c", "1"], &[2]),
            keyed(&["other", "1"], &[2]),
            keyed(&["other", "2"], &[3]),
        ]
    );

    // Months and quarters of measured_on.
    let part = |field| fedq_common::GroupKey::DatePart {
        field,
        column: "measured_on".into(),
    };
    let out = e
        .execute(&keyed_by(
            request("labs", &[], vec![AggregateRequest::CountRows], 100, None),
            vec![part(DateField::Quarter)],
        ))
        .await
        .unwrap();
    assert_eq!(
        rows(&out, 1),
        vec![
            keyed(&["1"], &[4]),
            keyed(&["2"], &[3]),
            keyed(&["3"], &[1]),
            keyed(&["4"], &[1]),
        ]
    );
    let out = e
        .execute(&keyed_by(
            request("labs", &[], vec![AggregateRequest::CountRows], 100, None),
            vec![part(DateField::Month)],
        ))
        .await
        .unwrap();
    let months: Vec<_> = rows(&out, 1)
        .into_iter()
        .map(|(k, v)| (k[0].clone(), v[0]))
        .collect();
    let want: Vec<(String, i128)> = [(1, 2), (2, 1), (3, 1), (5, 1), (6, 2), (7, 1), (12, 1)]
        .into_iter()
        .map(|(m, n)| (m.to_string(), n))
        .collect();
    assert_eq!(months, want);

    // A bucket of a column without bounds has no public domain: with G, it is an open key
    // bounded like any other (`stays`: ward / 2, every participant in at most 2 groups).
    let out = e
        .execute(&open(
            keyed_by(
                request(
                    "stays",
                    &[],
                    vec![
                        AggregateRequest::CountRows,
                        AggregateRequest::CountUnits,
                        sum("days", 0.0, 30.0, 1.0),
                    ],
                    10,
                    None,
                ),
                vec![bucket("ward", 2, 1)],
            ),
            2,
        ))
        .await
        .unwrap();
    assert_eq!(
        rows(&out, 1),
        vec![keyed(&["0"], &[8, 2, 55]), keyed(&["1"], &[7, 2, 80])]
    );
}

#[tokio::test]
async fn malformed_bucketed_keys_are_refused() {
    let (_fx, e) = engine().await;
    let count = || vec![AggregateRequest::CountRows];
    let v = |keys: Vec<fedq_common::GroupKey>, table: &str| {
        e.validate(&keyed_by(request(table, &[], count(), 1, None), keys))
    };
    // Divisor and multiplier: positive, multiplier at most the divisor (so no overflow).
    assert_invalid(v(vec![bucket("birth_year", 0, 1)], "patients"), "divisor");
    assert_invalid(
        v(vec![bucket("birth_year", 10, 11)], "patients"),
        "multiplier",
    );
    // Wrong column types.
    assert_invalid(v(vec![bucket("sex", 10, 1)], "patients"), "integer column");
    assert_invalid(
        v(
            vec![fedq_common::GroupKey::DatePart {
                field: fedq_common::group_key::DateField::Month,
                column: "value".into(),
            }],
            "labs",
        ),
        "date32",
    );
    // The privacy unit, even bucketed.
    assert_refused(v(vec![bucket("pid", 10, 1)], "patients"), "privacy unit");
    // No public domain and no G: refused, not released.
    assert_refused(v(vec![bucket("ward", 2, 1)], "stays"), "no public domain");
    assert_refused(
        v(
            vec![fedq_common::GroupKey::DatePart {
                field: fedq_common::group_key::DateField::Year,
                column: "measured_on".into(),
            }],
            "labs",
        ),
        "no public domain",
    );
    // CASE: a NULL label, mixed label types, a condition on an unknown column.
    let case = |then: Literal, otherwise: Literal, when: Predicate| {
        vec![fedq_common::GroupKey::Case {
            branches: vec![fedq_common::group_key::CaseBranch { when, then }],
            otherwise,
        }]
    };
    let cond = || bin(BinaryOp::Eq, col("test"), lit(Literal::Utf8("LDL".into())));
    assert_invalid(
        v(
            case(Literal::Utf8("a".into()), Literal::Null, cond()),
            "labs",
        ),
        "ELSE",
    );
    assert_invalid(
        v(
            case(Literal::Utf8("a".into()), Literal::Int64(1), cond()),
            "labs",
        ),
        "all be text or all be integers",
    );
    assert_refused(
        v(
            case(
                Literal::Utf8("a".into()),
                Literal::Utf8("b".into()),
                bin(BinaryOp::Eq, col("secret"), lit(Literal::Utf8("s".into()))),
            ),
            "labs",
        ),
        "unknown column",
    );
    // A CASE condition must be boolean.
    assert_invalid(
        v(
            case(
                Literal::Utf8("a".into()),
                Literal::Utf8("b".into()),
                col("value"),
            ),
            "labs",
        ),
        "not boolean",
    );
    // The same key twice.
    assert_invalid(
        v(
            vec![bucket("birth_year", 10, 1), bucket("birth_year", 10, 1)],
            "patients",
        ),
        "twice",
    );
}

#[tokio::test]
async fn years_of_a_date_range_are_public_and_dates_clamp_into_it() {
    let fx = Fixture::new();
    // The labs dates run from 2023-12-31 to 2024-07-01; declare 2024 only.
    std::fs::write(
        fx.dir.path().join("catalog.toml"),
        CATALOG.replace(
            r#"{ name = "measured_on", type = "date32" }"#,
            r#"{ name = "measured_on", type = "date32", earliest = "2024-01-01", latest = "2024-12-31" }"#,
        ),
    )
    .unwrap();
    let e = NodeEngine::new(&fx.config()).await.unwrap();
    let year = fedq_common::GroupKey::DatePart {
        field: fedq_common::group_key::DateField::Year,
        column: "measured_on".into(),
    };
    let out = e
        .execute(&keyed_by(
            request("labs", &[], vec![AggregateRequest::CountRows], 100, None),
            vec![year],
        ))
        .await
        .unwrap();
    // 2023-12-31 is counted in 2024, the range's first year: nothing is dropped.
    assert_eq!(rows(&out, 1), vec![keyed(&["2024"], &[9])]);
}

/// A table that is one Parquet file is read by row position (the counts know each row's
/// owner); a directory of files keeps reading participant ids.
#[tokio::test]
async fn single_file_tables_are_read_by_row_position() {
    let (_fx, e) = engine().await;
    assert_eq!(e.counted("labs"), (true, true, 4));
    assert!(!e.counted("bulk").0);
    assert!(!e.counted("bulk").1);
    let req = request(
        "labs",
        &["test"],
        vec![AggregateRequest::CountRows],
        100,
        None,
    );
    assert!(e.plans_by_position(&req));
    // The participant id as an aggregate input: read as it is.
    let req = request("labs", &[], vec![count_nn("pid")], 100, None);
    assert!(!e.plans_by_position(&req));
}

/// The owners of a file's rows are used only while the file is the one counted: a file
/// rewritten under a running node, with other participants in the same rows, is recounted
/// before its rows are attributed, so no participant contributes more than R rows.
#[tokio::test]
async fn a_rewritten_file_is_recounted_before_its_rows_are_attributed() {
    let (fx, e) = engine().await;
    let one_each = request("labs", &[], vec![AggregateRequest::CountRows], 1, None);
    // p1, p2, p3, p4: one row each at R = 1.
    let out = e.execute(&one_each).await.unwrap();
    assert_eq!(rows(&out, 0)[0].1[0], 4);
    // The same rows, all of one participant.
    let b = labs_batch(false, false);
    let mut cols = b.columns().to_vec();
    cols[0] = Arc::new(StringArray::from(vec!["p9"; b.num_rows()]));
    let rewritten = RecordBatch::try_new(b.schema(), cols).unwrap();
    write_parquet(&fx.dir.path().join("labs.parquet"), &rewritten);
    let out = e.execute(&one_each).await.unwrap();
    assert_eq!(rows(&out, 0)[0].1[0], 1);
    assert_eq!(e.counted("labs"), (true, true, 1));
}

/// Row positions stay right when the scan skips row groups and pages: the same lab rows,
/// 60 copies of the fixture with their own participants and `year` set to the copy number,
/// written as row groups of 25 rows and pages of 4 rows with statistics, so that a filter
/// on `year` lets the Parquet reader skip most of the file. Served as one file (read by
/// row position) and as a directory holding that file (read by participant id), every
/// request gives the same partials. With R = 1, COUNT(*) is the number of participants
/// with a row that passes the filter, so a row attributed to the wrong participant would
/// change it.
#[tokio::test]
async fn row_positions_survive_row_group_and_page_pruning() {
    use datafusion::parquet::arrow::ArrowWriter;
    use datafusion::parquet::file::properties::{EnabledStatistics, WriterProperties};

    let fx = Fixture::new();
    let base = labs_batch(false, false);
    let copies: Vec<RecordBatch> = (0..60)
        .map(|c| {
            let mut cols = base.columns().to_vec();
            let pids: Vec<String> = (0..base.num_rows())
                .map(|i| {
                    let pid = array_value_to_string(base.column(0).as_ref(), i).unwrap();
                    format!("c{c}-{pid}")
                })
                .collect();
            cols[0] = Arc::new(StringArray::from(pids));
            let year = base.schema().index_of("year").unwrap();
            cols[year] = Arc::new(Int32Array::from(vec![c; base.num_rows()]));
            RecordBatch::try_new(base.schema(), cols).unwrap()
        })
        .collect();
    let all = arrow::compute::concat_batches(&base.schema(), &copies).unwrap();
    let file = fx.dir.path().join("pruned.parquet");
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(25))
        .set_data_page_row_count_limit(4)
        .set_write_batch_size(4)
        .set_statistics_enabled(EnabledStatistics::Page)
        .build();
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(&file).unwrap(),
        all.schema(),
        Some(props),
    )
    .unwrap();
    w.write(&all).unwrap();
    w.close().unwrap();
    let dir = fx.dir.path().join("pruned");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(&file, dir.join("part-0.parquet")).unwrap();

    let engine_over = |path: std::path::PathBuf| {
        let mut cfg = fx.config();
        cfg.tables.get_mut("labs").unwrap().path = path;
        async move { NodeEngine::new(&cfg).await.unwrap() }
    };
    let by_position = engine_over(file).await;
    let by_id = engine_over(dir).await;
    assert_eq!(by_position.counted("labs"), (true, true, 240));
    assert!(!by_id.counted("labs").1);

    let i = |v: i64| lit(Literal::Int64(v));
    let late = || bin(BinaryOp::GtEq, col("year"), i(47));
    let middle = || {
        bin(
            BinaryOp::And,
            bin(BinaryOp::GtEq, col("year"), i(20)),
            bin(BinaryOp::Lt, col("year"), i(23)),
        )
    };
    let hba1c = || {
        bin(
            BinaryOp::And,
            late(),
            bin(
                BinaryOp::Eq,
                col("test"),
                lit(Literal::Utf8("HbA1c".into())),
            ),
        )
    };
    let requests = [
        request(
            "labs",
            &[],
            vec![AggregateRequest::CountRows],
            1,
            Some(late()),
        ),
        request(
            "labs",
            &[],
            vec![AggregateRequest::CountRows],
            1,
            Some(middle()),
        ),
        request(
            "labs",
            &[],
            vec![AggregateRequest::CountRows],
            1,
            Some(hba1c()),
        ),
        request(
            "labs",
            &["test"],
            vec![
                AggregateRequest::CountRows,
                AggregateRequest::CountUnits,
                sum("value", 0.0, 100.0, 0.01),
            ],
            100,
            Some(middle()),
        ),
    ];
    for req in &requests {
        assert!(by_position.plans_by_position(req));
        let a = rows(&by_position.execute(req).await.unwrap(), req.group_by.len());
        let b = rows(&by_id.execute(req).await.unwrap(), req.group_by.len());
        assert_eq!(a, b, "{:?}", req.filter);
    }
    // Copies 47..59 have 4 participants each; copies 20..22 too; HbA1c rows belong to p1
    // and p2 of each copy.
    let count = |out: &[RecordBatch]| rows(out, 0)[0].1[0];
    assert_eq!(
        count(&by_position.execute(&requests[0]).await.unwrap()),
        13 * 4
    );
    assert_eq!(
        count(&by_position.execute(&requests[1]).await.unwrap()),
        3 * 4
    );
    assert_eq!(
        count(&by_position.execute(&requests[2]).await.unwrap()),
        13 * 2
    );
}

/// A request shaped like an earlier one (another query id) reuses its plan and answers
/// exactly the same; another shape is planned on its own; and the query id is still
/// checked on a reused plan.
#[tokio::test]
async fn a_request_shaped_like_an_earlier_one_reuses_its_plan_and_answers_the_same() {
    let (_fx, e) = engine().await;
    let before = |y: i64| Some(bin(BinaryOp::Lt, col("year"), lit(Literal::Int64(y))));
    let mut req = request(
        "labs",
        &["test"],
        vec![AggregateRequest::CountRows, sum("value", 0.0, 100.0, 0.01)],
        100,
        before(1990),
    );
    let first = rows(&e.execute(&req).await.unwrap(), 1);
    let planned = e.cached_plans();
    assert!(planned >= 1, "the first request's plan is kept");
    req.query_id = "q-another".into();
    assert_eq!(rows(&e.execute(&req).await.unwrap(), 1), first);
    assert_eq!(
        e.cached_plans(),
        planned,
        "the same shape is not planned again"
    );
    let mut other = req.clone();
    other.filter = before(1976);
    let narrower = rows(&e.execute(&other).await.unwrap(), 1);
    assert_ne!(
        narrower, first,
        "another shape gets its own plan and answer"
    );
    assert!(e.cached_plans() > planned);
    req.query_id = String::new();
    assert!(matches!(
        e.execute(&req).await,
        Err(NodeError::InvalidRequest(_))
    ));
}
