//! Issue 13, "a failure is a release": for each failure class the node used to have (a
//! `LIKE` pattern compiled only when a batch reached it, a cap on the groups partition
//! selection observes, a per-query memory limit), two tables that differ in one
//! participant, chosen to sit exactly on the old threshold, give the same outcome kind for
//! the same request: both answer, or both are refused with the same message.

use std::sync::Arc;

use arrow::array::{Int64Array, StringArray};
use arrow::compute::filter_record_batch;
use fedq_common::like::MAX_LIKE_PATTERN_CHARS;
use fedq_common::outcome::FailureStage;
use fedq_common::wire::{MAX_GROUPS, META_TRUNCATED_UNITS};
use fedq_common::{AggregateRequest, BinaryOp, Literal, Predicate};

use super::*;
use crate::{NodeEngine, NodeError};

/// The labs fixture and its neighbour without participant `p1` (3 rows, birth year 1980).
async fn labs_pair() -> [(Fixture, NodeEngine); 2] {
    let with = Fixture::new();
    let without = Fixture::new();
    let all = labs_batch(false, false);
    let pid = all
        .column_by_name("pid")
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    let keep: arrow::array::BooleanArray = pid.iter().map(|p| Some(p != Some("p1"))).collect();
    let fewer = filter_record_batch(&all, &keep).unwrap();
    assert_eq!(fewer.num_rows(), all.num_rows() - 3);
    write_parquet(&without.dir.path().join("labs.parquet"), &fewer);
    let a = NodeEngine::new(&with.config()).await.unwrap();
    let b = NodeEngine::new(&without.config()).await.unwrap();
    [(with, a), (without, b)]
}

fn text(s: &str) -> Predicate {
    lit(Literal::Utf8(s.into()))
}

fn and(l: Predicate, r: Predicate) -> Predicate {
    bin(BinaryOp::And, l, r)
}

fn like(pattern: String, case_insensitive: bool) -> Predicate {
    Predicate::Like {
        input: Box::new(col("pid")),
        pattern,
        negated: false,
        case_insensitive,
    }
}

/// `pid = 'p1' AND year < 1985 AND pid [I]LIKE pattern`, the attack of issue 13: the
/// `LIKE` is reached only when p1 exists with a year below 1985.
fn attack(pattern: String, case_insensitive: bool) -> PartialAggregateRequest {
    let left = and(
        bin(BinaryOp::Eq, col("pid"), text("p1")),
        bin(BinaryOp::Lt, col("year"), lit(Literal::Int64(1985))),
    );
    request(
        "labs",
        &[],
        vec![AggregateRequest::CountRows],
        100,
        Some(and(left, like(pattern, case_insensitive))),
    )
}

/// The outcome kind of a request: `Ok` or the error's status code, stage and message.
async fn outcome(e: &NodeEngine, req: &PartialAggregateRequest) -> Result<(), String> {
    match e.execute(req).await {
        Ok(_) => Ok(()),
        Err(err) => {
            let stage = err.stage();
            let status = tonic::Status::from(err);
            Err(format!(
                "{:?} {:?} {}",
                status.code(),
                stage,
                status.message()
            ))
        }
    }
}

#[tokio::test]
async fn a_like_pattern_that_cannot_compile_is_refused_in_validation_whether_or_not_a_row_reaches_it(
) {
    let pair = labs_pair().await;
    let long = "_".repeat(20_000);
    for ci in [false, true] {
        let req = attack(long.clone(), ci);
        let mut seen = Vec::new();
        for (_, e) in &pair {
            let m = match e.validate(&req) {
                Err(NodeError::InvalidRequest(m)) => m,
                other => panic!("expected a validation refusal, got {other:?}"),
            };
            assert!(m.contains(&MAX_LIKE_PATTERN_CHARS.to_string()), "{m}");
            seen.push(outcome(e, &req).await);
        }
        // Where p1 is and where it is not: the same refusal, before reading.
        assert_eq!(seen[0], seen[1]);
        let s = seen[0].clone().unwrap_err();
        assert!(s.starts_with("InvalidArgument BeforeData"), "{s}");
        // A left side that matches no row at all: the same refusal again.
        let mut none = attack(long.clone(), ci);
        none.filter = Some(and(
            bin(BinaryOp::Eq, col("pid"), text("nobody")),
            like(long.clone(), ci),
        ));
        assert_eq!(outcome(&pair[0].1, &none).await, seen[0]);
    }
}

#[tokio::test]
async fn like_patterns_at_the_length_limit_answer_and_one_character_more_is_refused_on_both_neighbours(
) {
    let pair = labs_pair().await;
    let at_limit = [
        "_".repeat(MAX_LIKE_PATTERN_CHARS),
        "%_".repeat(MAX_LIKE_PATTERN_CHARS / 2),
        "ǅ_".repeat(MAX_LIKE_PATTERN_CHARS / 2),
        "\\".repeat(MAX_LIKE_PATTERN_CHARS),
        "p1%".to_string(),
    ];
    for p in at_limit {
        for ci in [false, true] {
            for (_, e) in &pair {
                assert_eq!(outcome(e, &attack(p.clone(), ci)).await, Ok(()), "{p:?}");
            }
        }
    }
    let over = "a".repeat(MAX_LIKE_PATTERN_CHARS + 1);
    let a = outcome(&pair[0].1, &attack(over.clone(), true)).await;
    let b = outcome(&pair[1].1, &attack(over, true)).await;
    assert!(a.is_err());
    assert_eq!(a, b);
}

/// `stays` rows: participant `u{i}` with one row in group `g{i}`, for `n` participants.
fn stays_with_groups(n: usize) -> RecordBatch {
    let pid: Vec<String> = (0..n).map(|i| format!("u{i:06}")).collect();
    let code: Vec<String> = (0..n).map(|i| format!("g{i:06}")).collect();
    let schema = stays_batch().schema();
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(pid)),
            Arc::new(StringArray::from(code)),
            Arc::new(Int64Array::from(vec![1i64; n])),
            Arc::new(Int64Array::from(vec![1i64; n])),
        ],
    )
    .unwrap()
}

/// Partition selection used to fail a query observing more than `MAX_GROUPS` groups: a
/// table with exactly `MAX_GROUPS` observed groups answered and its neighbour with one more
/// participant in a new group failed. Both answer now, with every observed group, in
/// batches of at most `MAX_GROUPS` rows that each carry the bounding report.
#[tokio::test]
async fn partition_selection_answers_every_observed_group_on_both_sides_of_the_old_cap() {
    let req = {
        let mut r = request(
            "stays",
            &["code"],
            vec![AggregateRequest::CountRows],
            10,
            None,
        );
        r.max_groups_per_unit = Some(2);
        r
    };
    for n in [MAX_GROUPS, MAX_GROUPS + 1] {
        let fx = Fixture::new();
        write_parquet(&fx.dir.path().join("stays.parquet"), &stays_with_groups(n));
        let e = NodeEngine::new(&fx.config()).await.unwrap();
        let out = e.execute(&req).await.unwrap();
        assert_eq!(out.len(), n.div_ceil(MAX_GROUPS), "batches for {n} groups");
        let total: usize = out.iter().map(|b| b.num_rows()).sum();
        assert_eq!(total, n);
        for b in &out {
            assert!(b.num_rows() <= MAX_GROUPS);
            assert_eq!(b.schema().metadata()[META_TRUNCATED_UNITS], "0");
        }
        let got = rows(&out, 1);
        assert_eq!(got.first(), Some(&keyed(&["g000000"], &[1])));
        assert_eq!(
            got.last(),
            Some(&keyed(&[format!("g{:06}", n - 1).as_str()], &[1]))
        );
    }
}

/// `bulk` plus `extra` participants of 40 rows each (10 in A, 30 in B).
fn bulk_plus(fx: &Fixture, extra: usize) {
    let base = {
        let f = std::fs::File::open(fx.dir.path().join("bulk").join("part-0.parquet")).unwrap();
        let r =
            datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
                .unwrap()
                .build()
                .unwrap();
        let batches: Vec<RecordBatch> = r.map(|b| b.unwrap()).collect();
        arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
    };
    let mut pid = Vec::new();
    let mut grp = Vec::new();
    for u in 0..extra {
        for i in 0..40 {
            pid.push(format!("v{u:03}"));
            grp.push(if i < 10 { "A" } else { "B" });
        }
    }
    let n = pid.len();
    let more = RecordBatch::try_new(
        base.schema(),
        vec![
            Arc::new(StringArray::from(pid)),
            Arc::new(StringArray::from(grp)),
            Arc::new(Int64Array::from(vec![1i64; n])),
        ],
    )
    .unwrap();
    let all = arrow::compute::concat_batches(&base.schema(), &[base, more]).unwrap();
    write_parquet(&fx.dir.path().join("bulk").join("part-0.parquet"), &all);
}

/// The per-query memory limit used to stop a query whose reservoirs crossed it, so a
/// participant's 40 more rows at the threshold flipped the outcome. No query is stopped on
/// memory now: with the limit set exactly to the worst case of the larger neighbour, the
/// same requests (every participant through a reservoir; a join) answer on both. What the
/// limit decides is only whether the node starts (a condition of its tables and
/// configuration that no query can probe): at the smaller neighbour's worst case, the
/// larger one refuses to start, naming the table and the fix.
#[tokio::test]
async fn neighbours_around_the_old_memory_threshold_answer_the_same_requests() {
    let small = Fixture::new();
    let large = Fixture::new();
    bulk_plus(&large, 1);
    let worst = |fx: &Fixture| {
        let cfg = fx.config();
        async move { NodeEngine::new(&cfg).await.unwrap().worst_query_bytes() }
    };
    let (ws, wl) = (worst(&small).await, worst(&large).await);
    assert!(wl > ws, "one more participant grows the estimate");
    let mut engines = Vec::new();
    for fx in [&small, &large] {
        let mut cfg = fx.config();
        cfg.limits.max_query_memory = wl as usize;
        engines.push(NodeEngine::new(&cfg).await.unwrap());
    }
    let reservoirs = request("bulk", &["grp"], vec![AggregateRequest::CountRows], 5, None);
    let mut join = request("bulk", &[], vec![AggregateRequest::CountRows], 50, None);
    join.joins = vec![fedq_common::JoinSpec {
        table: "encounters".into(),
        left_on: "pid".into(),
        right_on: "pid".into(),
        kind: Default::default(),
        on: None,
        derived: None,
    }];
    for req in [reservoirs, join] {
        for e in &engines {
            assert_eq!(outcome(e, &req).await, Ok(()));
        }
    }
    let mut cfg = large.config();
    cfg.limits.max_query_memory = ws as usize;
    let err = NodeEngine::new(&cfg).await.unwrap_err();
    assert_eq!(err.stage(), FailureStage::AfterData);
    assert!(
        err.to_string().contains("raise max_query_memory_mb"),
        "{err}"
    );
}

/// Found by the fuzz property: with this filter the planner kept `file_row_index()` in a
/// projection above the Parquet scan, which fails on its first non-empty batch (so the
/// query failed only when rows passed the filter). The node now plans such a request with
/// the participant id instead, and answers whatever the data.
#[tokio::test]
async fn a_filter_that_keeps_row_positions_out_of_the_scan_still_answers() {
    let (_fx, e) = {
        let fx = Fixture::new();
        let e = NodeEngine::new(&fx.config()).await.unwrap();
        (fx, e)
    };
    let cast = |c: &str, to| Predicate::TryCast {
        input: Box::new(col(c)),
        to,
    };
    let filter = Predicate::Between {
        input: Box::new(cast("code", fedq_common::ColumnType::Int32)),
        low: Box::new(cast("measured_on", fedq_common::ColumnType::Int32)),
        high: Box::new(col("site_code")),
        negated: false,
    };
    let wide = Predicate::Between {
        input: Box::new(cast("code", fedq_common::ColumnType::Int32)),
        low: Box::new(lit(Literal::Int64(i64::MIN))),
        high: Box::new(col("site_code")),
        negated: false,
    };
    for f in [filter, wide] {
        let req = request("labs", &[], vec![AggregateRequest::CountRows], 1, Some(f));
        assert!(e.execute(&req).await.is_ok());
    }
}

/// Found by reading Arrow's cast kernels: `TRY_CAST(date AS utf8)` fails, even in safe
/// mode, on a date chrono cannot write, so a crafted file made it fail on some rows only.
/// Such dates now become NULL; casts Arrow has no kernel for are refused in validation.
#[tokio::test]
async fn try_cast_is_total_on_extreme_dates_and_unsupported_casts_are_refused() {
    let fx = Fixture::new();
    let mut labs = labs_batch(false, false);
    let mut cols = labs.columns().to_vec();
    let idx = labs.schema().index_of("measured_on").unwrap();
    cols[idx] = Arc::new(arrow::array::Date32Array::from(vec![
        i32::MIN,
        i32::MAX,
        0,
        -1,
        1,
        2,
        3,
        4,
        5,
    ]));
    labs = RecordBatch::try_new(labs.schema(), cols).unwrap();
    write_parquet(&fx.dir.path().join("labs.parquet"), &labs);
    let e = NodeEngine::new(&fx.config()).await.unwrap();
    let as_text = Predicate::IsNull {
        input: Box::new(Predicate::TryCast {
            input: Box::new(col("measured_on")),
            to: fedq_common::ColumnType::Utf8,
        }),
    };
    let req = request(
        "labs",
        &[],
        vec![AggregateRequest::CountRows],
        100,
        Some(as_text),
    );
    assert_eq!(
        rows(&e.execute(&req).await.unwrap(), 0),
        vec![keyed(&[], &[2])]
    );
    let unsupported = Predicate::TryCast {
        input: Box::new(col("flag")),
        to: fedq_common::ColumnType::Date32,
    };
    let req = request(
        "labs",
        &[],
        vec![AggregateRequest::CountRows],
        100,
        Some(Predicate::IsNull {
            input: Box::new(unsupported),
        }),
    );
    match e.validate(&req) {
        Err(NodeError::InvalidRequest(m)) => {
            assert!(m.contains("TRY_CAST from boolean to date32"), "{m}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn the_shared_try_cast_table_agrees_with_arrow_for_every_pair_of_catalog_types() {
    use arrow::datatypes::DataType;
    use fedq_common::ColumnType as T;
    let all = [
        T::Utf8,
        T::Boolean,
        T::Int32,
        T::Int64,
        T::Float64,
        T::Date32,
    ];
    for from in all {
        let sources = match from {
            T::Utf8 => vec![DataType::Utf8, DataType::Utf8View],
            other => vec![other.arrow_type()],
        };
        for to in all {
            let arrow = sources
                .iter()
                .all(|s| arrow::compute::can_cast_types(s, &to.arrow_type()));
            assert_eq!(from.try_cast_supported(to), arrow, "{from} -> {to}");
        }
    }
}
