//! End to end: an in-process federation of 3 nodes and a coordinator on loopback.
//!
//! - For each supported query shape, the exact pre-noise merged aggregates equal DataFusion
//!   over the union of the sites' files (with the same clamping and fixed-point rounding).
//! - The noisy answers fall within bounds whose false-failure probability is below 1e-9 for
//!   the whole test: each checked cell uses a per-cell tail probability of 1e-12 and fewer
//!   than 1000 cells are checked (union bound: < 1e-9).
//! - Bounding: with R below some participants' row counts, the merged row count equals
//!   sum over sites and participants of min(rows, R), exactly.

use std::collections::HashMap;

use datafusion::prelude::SessionContext;
use fedq::client::FedqClient;
use fedq::exact::union_context;
use fedq::CliError;
use fedq_common::AggregateRequest;
use fedq_coordinator::noise::discrete_laplace_half_width;
use fedq_coordinator::planner::{AggregateOutput, StatisticKind};
use fedq_coordinator::release::{
    META_CI95, META_EPSILON_SPENT, META_NOISE_SCALE, META_SITES_ANSWERED,
};
use fedq_tests::{cell, key, set_rows_per_unit, start, synth};

/// Per-cell failure probability; see the module docs.
const ALPHA: f64 = 1e-12;

/// (researcher SQL, table, WHERE or "", group columns)
const SHAPES: &[(&str, &str, &str, &[&str])] = &[
    ("SELECT COUNT(*) FROM participants", "participants", "", &[]),
    (
        "SELECT sex, COUNT(*) AS n FROM participants GROUP BY sex",
        "participants",
        "",
        &["sex"],
    ),
    (
        "SELECT participant_type, sex, COUNT(*), AVG(birth_year) FROM participants WHERE birth_year >= 1950 GROUP BY participant_type, sex",
        "participants",
        "birth_year >= 1950",
        &["participant_type", "sex"],
    ),
    (
        "SELECT test, COUNT(value), SUM(value), AVG(value) FROM labs WHERE measured_on >= DATE '2018-01-01' AND test IN ('HbA1c', 'LDL', 'glucose') GROUP BY test",
        "labs",
        "measured_on >= DATE '2018-01-01' AND test IN ('HbA1c', 'LDL', 'glucose')",
        &["test"],
    ),
    (
        "SELECT kind, SUM(volume_ml) total FROM specimens WHERE status = 'stored' GROUP BY kind HAVING SUM(volume_ml) > -1e9 ORDER BY kind LIMIT 10",
        "specimens",
        "status = 'stored'",
        &["kind"],
    ),
    (
        "SELECT COUNT(*) FROM diagnoses WHERE code LIKE 'E1%' OR code = 'I10'",
        "diagnoses",
        "code LIKE 'E1%' OR code = 'I10'",
        &[],
    ),
    (
        "SELECT gene, zygosity, COUNT(*) FROM variants WHERE variant IS NOT NULL GROUP BY gene, zygosity",
        "variants",
        "variant IS NOT NULL",
        &["gene", "zygosity"],
    ),
];

fn expected_sql(table: &str, filter: &str, groups: &[&str], aggs: &[AggregateRequest]) -> String {
    let mut sel: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    for a in aggs {
        sel.push(match a {
            AggregateRequest::CountRows => "CAST(COUNT(*) AS DOUBLE)".into(),
            AggregateRequest::CountNonNull { column } => format!("CAST(COUNT({column}) AS DOUBLE)"),
            AggregateRequest::SumFixed {
                column,
                lower,
                upper,
                precision,
            } => {
                let lo = (lower / precision).ceil();
                let hi = (upper / precision).floor();
                format!(
                    "COALESCE(SUM(LEAST(GREATEST(ROUND(CAST({column} AS DOUBLE) / {precision:?}), {lo:?}), {hi:?})), 0.0)"
                )
            }
        });
    }
    let mut sql = format!("SELECT {} FROM {table}", sel.join(", "));
    if !filter.is_empty() {
        sql.push_str(&format!(" WHERE {filter}"));
    }
    if !groups.is_empty() {
        sql.push_str(&format!(" GROUP BY {}", groups.join(", ")));
    }
    sql
}

async fn exact_rows(
    ctx: &SessionContext,
    sql: &str,
    n_groups: usize,
) -> HashMap<Vec<String>, Vec<f64>> {
    let batches = ctx.sql(sql).await.expect(sql).collect().await.expect(sql);
    let mut out = HashMap::new();
    for b in &batches {
        for r in 0..b.num_rows() {
            let k: Vec<String> = (0..n_groups).map(|c| key(b, c, r)).collect();
            let v: Vec<f64> = (n_groups..b.num_columns())
                .map(|c| cell(b, c, r).unwrap_or(0.0))
                .collect();
            out.insert(k, v);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pre_noise_aggregates_are_exact_and_noise_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 3000, 11);
    // R larger than anyone's row count: no truncation, so exact answers are comparable.
    set_rows_per_unit(dir, 1000);
    let fed = start(dir).await;
    assert_eq!(fed.nodes.len(), 3);
    let ctx = union_context(dir).await.unwrap();
    let mut client = fed.client("alice").await.unwrap();
    let engine = fed.coordinator.engine.clone();
    let mut checked = 0usize;

    for (sql, table, filter, groups) in SHAPES {
        // 1. Exact pre-noise partials equal DataFusion over the union of the files.
        let q = engine.plan("alice", sql).await.unwrap();
        let merged = engine.gather(&q).await.unwrap();
        assert_eq!(merged.sites_answered.len(), 3);
        let exp = exact_rows(
            &ctx,
            &expected_sql(table, filter, groups, &q.request.aggregates),
            groups.len(),
        )
        .await;
        let mut n_nonzero = 0;
        for (k, partials) in &merged.groups {
            let ks: Vec<String> = k.iter().map(|v| v.to_string()).collect();
            let e = exp
                .get(&ks)
                .unwrap_or_else(|| panic!("{sql}: group {ks:?} not in exact answer"));
            let got: Vec<f64> = partials.iter().map(|&x| x as f64).collect();
            assert_eq!(&got, e, "{sql}: group {ks:?}");
            n_nonzero += 1;
        }
        assert_eq!(n_nonzero, exp.len(), "{sql}: group sets differ");

        // 2. The released answer, through Flight SQL, is within the noise bounds.
        let r = client.query(sql).await.unwrap();
        let md = r.schema.metadata();
        assert_eq!(md.get(META_EPSILON_SPENT).map(String::as_str), Some("1"));
        assert_eq!(md.get(META_SITES_ANSWERED).unwrap().split(',').count(), 3);
        let nk = groups.len();
        let mut rows = 0;
        for b in &r.batches {
            for row in 0..b.num_rows() {
                rows += 1;
                let ks: Vec<String> = (0..nk).map(|c| key(b, c, row)).collect();
                let kv: Vec<fedq_common::PublicValue> = q
                    .groups
                    .iter()
                    .zip(&ks)
                    .map(|(g, s)| {
                        g.domain
                            .iter()
                            .find(|v| v.to_string() == *s)
                            .unwrap()
                            .clone()
                    })
                    .collect();
                let p = merged.get(&kv, q.request.aggregates.len());
                for (j, out) in q.outputs.iter().enumerate() {
                    let col = nk + j;
                    let field = r.schema.field(col);
                    let got = cell(b, col, row);
                    let stat_b = |s: usize| {
                        let st = &q.statistics[s];
                        st.sensitivity as f64 / st.epsilon.to_f64().value()
                    };
                    match out {
                        AggregateOutput::Count { stat } => {
                            let exact = match q.statistics[*stat].kind {
                                StatisticKind::Count { partial } => p[partial] as f64,
                                _ => unreachable!(),
                            };
                            let b_ = stat_b(*stat);
                            let meta_b: f64 = field.metadata()[META_NOISE_SCALE].parse().unwrap();
                            assert!(
                                (meta_b - b_).abs() < 1e-9 * b_,
                                "{sql}: scale {meta_b} vs {b_}"
                            );
                            assert!(field.metadata().contains_key(META_CI95));
                            let t = discrete_laplace_half_width(b_, ALPHA);
                            let got = got.expect("count not suppressed");
                            assert!(
                                (got - exact).abs() <= t,
                                "{sql}: count {got} vs {exact} (t={t})"
                            );
                        }
                        AggregateOutput::Sum { stat, .. } => {
                            let (exact, prec) = match q.statistics[*stat].kind {
                                StatisticKind::Sum { partial, precision } => {
                                    (p[partial] as f64 * precision, precision)
                                }
                                _ => unreachable!(),
                            };
                            let t = discrete_laplace_half_width(stat_b(*stat), ALPHA) * prec;
                            let got = got.unwrap();
                            assert!(
                                (got - exact).abs() <= t + 1e-6,
                                "{sql}: sum {got} vs {exact} (t={t})"
                            );
                        }
                        AggregateOutput::Avg {
                            sum_stat,
                            count_stat,
                            bounds,
                            mid_fp,
                        } => {
                            let (s, c) = match q.statistics[*sum_stat].kind {
                                StatisticKind::CentredSum {
                                    sum, count, mid_fp, ..
                                } => ((p[sum] - mid_fp * p[count]) as f64, p[count] as f64),
                                _ => unreachable!(),
                            };
                            let prec = bounds.precision;
                            let ts = discrete_laplace_half_width(stat_b(*sum_stat), ALPHA);
                            let tc = discrete_laplace_half_width(stat_b(*count_stat), ALPHA);
                            if c <= 2.0 * tc {
                                continue; // too few rows for a useful bound
                            }
                            let exact = *mid_fp as f64 * prec + s * prec / c;
                            let bound = (ts * prec + (s * prec / c).abs() * tc) / (c - tc);
                            let got = got.expect("avg present");
                            assert!(
                                (got - exact).abs() <= bound + 1e-9,
                                "{sql}: avg {got} vs {exact} (bound {bound})"
                            );
                            assert!(got >= bounds.lower && got <= bounds.upper);
                        }
                    }
                    checked += 1;
                }
            }
        }
        // Every combination of the public domain is released, empty groups included.
        let domain: usize = q.groups.iter().map(|g| g.domain.len()).product();
        let expected_rows = if sql.contains("LIMIT 10") {
            domain.min(10)
        } else {
            domain
        };
        assert_eq!(rows, expected_rows, "{sql}");
    }
    assert!(checked < 1000);
    fed.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bounding_keeps_at_most_r_rows_per_participant_per_site() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 3000, 12);
    set_rows_per_unit(dir, 5);
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    for (sql, table) in [
        ("SELECT COUNT(*) FROM labs", "labs"),
        (
            "SELECT test, COUNT(*) FROM labs WHERE test <> 'LDL' GROUP BY test",
            "labs",
        ),
        ("SELECT COUNT(*) FROM diagnoses", "diagnoses"),
    ] {
        let q = engine.plan("alice", sql).await.unwrap();
        let merged = engine.gather(&q).await.unwrap();
        let total: i128 = merged.groups.values().map(|p| p[0]).sum();
        // Expected: per site, sum over participants of min(rows after filter, R).
        let mut expected = 0i64;
        let mut untruncated = 0i64;
        for sd in fedq::federation::site_dirs(dir).unwrap() {
            let ctx = SessionContext::new();
            ctx.register_parquet(
                table,
                sd.join(format!("{table}.parquet")).to_str().unwrap(),
                Default::default(),
            )
            .await
            .unwrap();
            let filter = if sql.contains("<> 'LDL'") {
                "WHERE test <> 'LDL'"
            } else {
                ""
            };
            let b = ctx
                .sql(&format!(
                    "SELECT CAST(SUM(LEAST(n, 5)) AS BIGINT), CAST(SUM(n) AS BIGINT) FROM (SELECT pid, COUNT(*) AS n FROM {table} {filter} GROUP BY pid)"
                ))
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            expected += cell(&b[0], 0, 0).unwrap() as i64;
            untruncated += cell(&b[0], 1, 0).unwrap() as i64;
        }
        assert_eq!(total, expected as i128, "{sql}");
        assert!(
            untruncated > expected,
            "{sql}: the test needs truncation to happen"
        );
    }
    fed.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusals_budgets_and_failures_have_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 1500, 13);
    let mut fed = start(dir).await;
    let mut alice = fed.client("alice").await.unwrap();

    let expect =
        |r: Result<fedq::client::QueryResult, CliError>, code: tonic::Code, needle: &str| match r {
            Err(CliError::Server { code: c, message }) => {
                assert_eq!(c, code, "{message}");
                assert!(
                    message.contains(needle),
                    "{message} should mention {needle}"
                );
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("expected an error mentioning {needle}"),
        };
    use tonic::Code;
    expect(
        alice.query("SELECT * FROM labs").await,
        Code::PermissionDenied,
        "never rows",
    );
    expect(
        alice.query("SELECT COUNT(*) FROM nope").await,
        Code::InvalidArgument,
        "nope",
    );
    expect(
        alice
            .query("SELECT COUNT(*) FROM labs WHERE nope = 1")
            .await,
        Code::InvalidArgument,
        "nope",
    );
    expect(alice.query("SELEC 1").await, Code::InvalidArgument, "SELEC");
    expect(
        alice.query("SELECT SUM(code) FROM diagnoses").await,
        Code::InvalidArgument,
        "sum",
    );
    expect(
        alice
            .query("SELECT code, COUNT(*) FROM diagnoses GROUP BY code")
            .await,
        Code::PermissionDenied,
        "public_values",
    );
    expect(
        alice
            .query("SELECT COUNT(*) FROM labs WHERE CAST(test AS INT) = 1")
            .await,
        Code::PermissionDenied,
        "TRY_CAST",
    );
    expect(
        alice.query("SET fedq.epsilon = 100").await,
        Code::InvalidArgument,
        "max_epsilon_per_query",
    );
    expect(
        alice.query("SET fedq.epsilon = -1").await,
        Code::InvalidArgument,
        "positive",
    );
    expect(
        alice.query("SET fedq.epsilon = NaN").await,
        Code::InvalidArgument,
        "positive",
    );

    // Unauthenticated.
    let mut nobody = FedqClient::connect_with_token(&fed.url(), "not-a-token")
        .await
        .unwrap();
    expect(
        nobody.query("SELECT COUNT(*) FROM labs").await,
        Code::Unauthenticated,
        "token",
    );

    // Budget: bob has 5; at ε = 2 two different queries pass, a third is refused with the
    // remainder (an identical query would be a free replay).
    let mut bob = fed.client("bob").await.unwrap();
    bob.query("SET fedq.epsilon = 2").await.unwrap();
    for y in [1950, 1960] {
        let r = bob
            .query(&format!(
                "SELECT COUNT(*) FROM participants WHERE birth_year >= {y}"
            ))
            .await
            .unwrap();
        assert_eq!(r.schema.metadata()[META_EPSILON_SPENT], "2");
    }
    expect(
        bob.query("SELECT COUNT(*) FROM participants WHERE birth_year >= 1970")
            .await,
        Code::ResourceExhausted,
        "only ε = 1 remains",
    );
    let b = bob
        .action(fedq_coordinator::service::ACTION_BUDGET)
        .await
        .unwrap();
    assert_eq!(b["epsilon_spent"].as_f64(), Some(4.0));
    assert_eq!(b["name"].as_str(), Some("bob"));

    // A node that is down: clear error naming the site, and no budget charged.
    let before = alice
        .action(fedq_coordinator::service::ACTION_BUDGET)
        .await
        .unwrap();
    let site = fed.stop_node(1).await.unwrap();
    expect(
        alice.query("SELECT COUNT(*) FROM participants").await,
        Code::Unavailable,
        &site,
    );
    let after = alice
        .action(fedq_coordinator::service::ACTION_BUDGET)
        .await
        .unwrap();
    assert_eq!(before["epsilon_spent"], after["epsilon_spent"]);
    let status = alice
        .action(fedq_coordinator::service::ACTION_STATUS)
        .await
        .unwrap();
    let down: Vec<_> = status
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["healthy"] == false)
        .collect();
    assert_eq!(down.len(), 1);
    assert_eq!(down[0]["site"].as_str(), Some(site.as_str()));
    fed.shutdown().await.unwrap();
}
