//! End to end: an in-process federation of 3 nodes and a coordinator on loopback.
//!
//! - For each supported query shape, the exact pre-noise merged aggregates equal DataFusion
//!   over the union of the sites' files (with the same clamping and fixed-point rounding).
//! - The noisy answers fall within bounds whose false-failure probability is below 1e-9 for
//!   the whole test: each check bounds the noise of the statistics it uses, each bound fails
//!   with probability 1e-12, and fewer than 1000 such bounds are used (union bound: < 1e-9).
//!   VAR/STDDEV are checked by interval arithmetic over the bounds on N, S and Q.
//! - Bounding: with R below some participants' row counts, the merged row count equals
//!   sum over sites and participants of min(rows, R), exactly.

use std::collections::HashMap;

use datafusion::prelude::SessionContext;
use fedq::client::FedqClient;
use fedq::exact::union_context;
use fedq::CliError;
use fedq_common::{AggregateRequest, ColumnRef};
use fedq_coordinator::noise::discrete_laplace_half_width;
use fedq_coordinator::planner::{AggregateOutput, StatisticKind};
use fedq_coordinator::release::{
    META_CI95, META_EPSILON_SPENT, META_MAX_ROWS, META_NOISE_SCALE, META_SITES_ANSWERED,
    META_TRUNCATED, META_TRUNCATED_CI95,
};
use fedq_tests::{cell, key, set_rows_per_unit, site_context, start, synth};

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
        "SELECT test, VAR_SAMP(value), STDDEV_POP(value) AS sd, AVG(value) FROM labs WHERE test IN ('HbA1c', 'LDL') GROUP BY test",
        "labs",
        "test IN ('HbA1c', 'LDL')",
        &["test"],
    ),
    (
        "SELECT VAR_POP(birth_year) AS v, STDDEV(birth_year) FROM participants WHERE sex = 'F'",
        "participants",
        "sex = 'F'",
        &[],
    ),
    (
        "SELECT gene, zygosity, COUNT(*) FROM variants WHERE variant IS NOT NULL GROUP BY gene, zygosity",
        "variants",
        "variant IS NOT NULL",
        &["gene", "zygosity"],
    ),
];

/// Joins on the privacy unit: (researcher SQL, left table, right table, WHERE over `l.`
/// and `r.` columns, group expressions). Each joins within one site, so the exact answer
/// joins rows of the same site only (`fedq_site`, see [`site_context`]).
const JOIN_SHAPES: &[(&str, &str, &str, &str, &[&str])] = &[
    (
        "SELECT p.sex, COUNT(*), AVG(l.value) FROM labs l JOIN participants p USING (pid) WHERE l.test = 'HbA1c' GROUP BY p.sex",
        "labs",
        "participants",
        "l.test = 'HbA1c'",
        &["r.sex"],
    ),
    (
        "SELECT variants.gene, COUNT(*) FROM diagnoses JOIN variants ON diagnoses.pid = variants.pid WHERE diagnoses.code LIKE 'E11%' GROUP BY variants.gene",
        "diagnoses",
        "variants",
        "l.code LIKE 'E11%'",
        &["r.gene"],
    ),
    (
        "SELECT p.participant_type, s.kind, COUNT(*), SUM(s.volume_ml), VAR_POP(p.birth_year) FROM specimens s JOIN participants p ON s.pid = p.pid AND s.status = 'stored' WHERE p.birth_year >= 1950 GROUP BY p.participant_type, s.kind",
        "specimens",
        "participants",
        "l.status = 'stored' AND r.birth_year >= 1950",
        &["r.participant_type", "l.kind"],
    ),
];

/// The node treats NaN as NULL (counted by no COUNT(col), summed by no sum).
fn no_nan(column: &str, floats: &[String]) -> String {
    if floats.iter().any(|f| f == column) {
        format!("(CASE WHEN isnan({column}) THEN NULL ELSE {column} END)")
    } else {
        column.to_string()
    }
}

fn expected_sql(
    from: &str,
    filter: &str,
    groups: &[&str],
    aggs: &[AggregateRequest],
    floats: &[String],
    qual: &dyn Fn(&ColumnRef) -> String,
) -> String {
    let mut sel: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    for a in aggs {
        sel.push(match a {
            AggregateRequest::CountRows => "CAST(COUNT(*) AS DOUBLE)".into(),
            // Per site, not over the union: see the test of distinct participants below.
            AggregateRequest::CountUnits => unreachable!("not in SHAPES"),
            // Percentiles have their own end-to-end test (tests/quantiles.rs).
            AggregateRequest::QuantileHistogram { .. } => unreachable!("not in SHAPES"),
            AggregateRequest::CountNonNull { column } => {
                format!("CAST(COUNT({}) AS DOUBLE)", no_nan(&qual(column), floats))
            }
            AggregateRequest::SumFixed {
                column,
                lower,
                upper,
                precision,
            } => {
                let column = no_nan(&qual(column), floats);
                let lo = (lower / precision).ceil();
                let hi = (upper / precision).floor();
                format!(
                    "COALESCE(SUM(LEAST(GREATEST(ROUND(CAST({column} AS DOUBLE) / {precision:?}), {lo:?}), {hi:?})), 0.0)"
                )
            }
            AggregateRequest::SumSquaresFixed {
                column,
                lower,
                upper,
                precision,
            } => {
                let column = no_nan(&qual(column), floats);
                let lo = (lower / precision).ceil();
                let hi = (upper / precision).floor();
                let mid = ((lo + hi) / 2.0).floor();
                let d = format!(
                    "(LEAST(GREATEST(ROUND(CAST({column} AS DOUBLE) / {precision:?}), {lo:?}), {hi:?}) - {mid:?})"
                );
                // GREATEST ignores NULLs in DataFusion, so skip them explicitly.
                format!(
                    "COALESCE(SUM(CASE WHEN {column} IS NULL THEN NULL ELSE {d} * {d} END), 0.0)"
                )
            }
        });
    }
    let mut sql = format!("SELECT {} FROM {from}", sel.join(", "));
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
    let site_ctx = site_context(dir).await;
    let mut client = fed.client("alice").await.unwrap();
    let engine = fed.coordinator.engine.clone();
    let mut checked = 0usize;

    let shapes = SHAPES
        .iter()
        .map(|(sql, table, filter, groups)| (*sql, *table, None, *filter, *groups))
        .chain(
            JOIN_SHAPES
                .iter()
                .map(|(sql, l, r, filter, groups)| (*sql, *l, Some(*r), *filter, *groups)),
        );
    for (sql, table, join, filter, groups) in shapes {
        // 1. Exact pre-noise partials equal DataFusion over the union of the files (for
        //    joins: of the per-site joins).
        let q = engine.plan("alice", sql).await.unwrap();
        assert_eq!(q.join_tables.first().map(String::as_str), join, "{sql}");
        let merged = engine.gather(&q).await.unwrap();
        assert_eq!(merged.sites_answered.len(), 3);
        let floats_of = |t: &str, prefix: &str| -> Vec<String> {
            engine
                .catalog()
                .table(t)
                .unwrap()
                .columns
                .iter()
                .filter(|c| c.ty == fedq_common::ColumnType::Float64)
                .map(|c| format!("{prefix}{}", c.name))
                .collect()
        };
        let exact_sql = match join {
            None => expected_sql(
                table,
                filter,
                groups,
                &q.request.aggregates,
                &floats_of(table, ""),
                &|c: &ColumnRef| c.name.clone(),
            ),
            Some(right) => {
                let mut floats = floats_of(table, "l.");
                floats.extend(floats_of(right, "r."));
                expected_sql(
                    &format!(
                        "{table} l JOIN {right} r ON l.pid = r.pid AND l.fedq_site = r.fedq_site"
                    ),
                    filter,
                    groups,
                    &q.request.aggregates,
                    &floats,
                    &|c: &ColumnRef| {
                        if c.side.is_left() {
                            format!("l.{}", c.name)
                        } else {
                            format!("r.{}", c.name)
                        }
                    },
                )
            }
        };
        let exp = exact_rows(
            if join.is_some() { &site_ctx } else { &ctx },
            &exact_sql,
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
        assert!(
            n_nonzero > 0,
            "{sql}: no rows at all, so nothing was compared"
        );

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
                        AggregateOutput::Variance {
                            count_stat,
                            sum_stat,
                            sq_stat,
                            bounds,
                            half_fp,
                            sample,
                            sqrt,
                        } => {
                            let exact_of = |s: usize| match q.statistics[s].kind {
                                StatisticKind::Count { partial }
                                | StatisticKind::SumSquares { partial, .. } => p[partial] as f64,
                                StatisticKind::CentredSum {
                                    sum, count, mid_fp, ..
                                } => (p[sum] - mid_fp * p[count]) as f64,
                                _ => unreachable!(),
                            };
                            let t = |s: usize| discrete_laplace_half_width(stat_b(s), ALPHA);
                            let (n, s, sq) = (
                                exact_of(*count_stat),
                                exact_of(*sum_stat),
                                exact_of(*sq_stat),
                            );
                            let (tn, ts, tq) = (t(*count_stat), t(*sum_stat), t(*sq_stat));
                            if n <= 2.0 * tn + 2.0 {
                                continue; // too few rows for a useful bound
                            }
                            // Interval arithmetic over |noise| <= t on N, S and Q (each
                            // exceeded with probability <= ALPHA).
                            let prec = bounds.precision;
                            let (nlo, nhi) = (n - tn, n + tn);
                            let div = |lo: f64, hi: f64| {
                                let c = [lo / nlo, lo / nhi, hi / nlo, hi / nhi];
                                (
                                    c.iter().cloned().fold(f64::INFINITY, f64::min),
                                    c.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                                )
                            };
                            let (qlo, qhi) = div((sq - tq) * prec * prec, (sq + tq) * prec * prec);
                            let (mlo, mhi) = div((s - ts) * prec, (s + ts) * prec);
                            let m2lo = if mlo <= 0.0 && mhi >= 0.0 {
                                0.0
                            } else {
                                (mlo * mlo).min(mhi * mhi)
                            };
                            let m2hi = (mlo * mlo).max(mhi * mhi);
                            let (mut vlo, mut vhi) = (qlo - m2hi, qhi - m2lo);
                            let half = *half_fp as f64 * prec;
                            let (mut cap_lo, mut cap_hi) = (half * half, half * half);
                            if *sample {
                                let (klo, khi) = (nhi / (nhi - 1.0), nlo / (nlo - 1.0));
                                vlo = (vlo * klo).min(vlo * khi);
                                vhi = (vhi * klo).max(vhi * khi);
                                cap_lo *= klo;
                                cap_hi *= khi;
                            }
                            let (mut lo, mut hi) = (vlo.clamp(0.0, cap_lo), vhi.clamp(0.0, cap_hi));
                            // The exact value, for the record: it must lie inside too.
                            let k = if *sample { n / (n - 1.0) } else { 1.0 };
                            let mut exact = ((sq * prec * prec) / n - (s * prec / n).powi(2)) * k;
                            if *sqrt {
                                lo = lo.sqrt();
                                hi = hi.sqrt();
                                exact = exact.sqrt();
                            }
                            assert!(
                                lo <= exact + 1e-9 && exact <= hi + 1e-9,
                                "{sql}: {exact} not in [{lo}, {hi}]"
                            );
                            let got = got.expect("variance present");
                            assert!(
                                got >= lo - 1e-9 && got <= hi + 1e-9,
                                "{sql}: var/sd {got} vs exact {exact}, bound [{lo}, {hi}]"
                            );
                        }
                        AggregateOutput::Quantile { .. } => {
                            unreachable!("no percentiles in SHAPES; see tests/quantiles.rs")
                        }
                    }
                    // One ALPHA-bound per noisy statistic the check relies on.
                    checked += out.stats().len();
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
    let mut client = fed.client("alice").await.unwrap();
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
        let mut truncated = 0i64;
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
                    "SELECT CAST(SUM(LEAST(n, 5)) AS BIGINT), CAST(SUM(n) AS BIGINT), \
                     CAST(SUM(CASE WHEN n > 5 THEN 1 ELSE 0 END) AS BIGINT) \
                     FROM (SELECT pid, COUNT(*) AS n FROM {table} {filter} GROUP BY pid)"
                ))
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            expected += cell(&b[0], 0, 0).unwrap() as i64;
            untruncated += cell(&b[0], 1, 0).unwrap() as i64;
            truncated += cell(&b[0], 2, 0).unwrap() as i64;
        }
        assert_eq!(total, expected as i128, "{sql}");
        // The bounding report: participants with more than R rows, per site.
        assert_eq!(merged.truncated_units, Some(truncated as i128), "{sql}");
        let r = client.query(sql).await.unwrap();
        let md = r.schema.metadata();
        assert_eq!(md[META_MAX_ROWS], "5");
        let t = &q.truncation;
        let b = t.sensitivity as f64 / t.epsilon.to_f64().value();
        let noisy: f64 = md[META_TRUNCATED].parse().unwrap();
        // Released values are clamped at 0, which only moves them towards a positive truth.
        assert!(
            (noisy - truncated as f64).abs() <= discrete_laplace_half_width(b, ALPHA),
            "{sql}: truncated {noisy} vs {truncated}"
        );
        let ci: f64 = md[META_TRUNCATED_CI95].parse().unwrap();
        assert!((ci - discrete_laplace_half_width(b, 0.05)).abs() < 1e-9 * ci.max(1.0));
        assert!(
            untruncated > expected,
            "{sql}: the test needs truncation to happen"
        );
    }
    fed.shutdown().await.unwrap();
}

/// After a join each participant contributes at most R joined rows per site, with R the
/// driving table's: the merged count is Σ over sites and participants of min(a·b, R), where
/// a and b are the participant's rows on each side at that site. Participants with a ≤ R
/// but a·b > R exist in the data, so a node that trusted the driving table's own rows per
/// participant would count more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joins_bound_rows_per_participant_after_the_join() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 3000, 13);
    set_rows_per_unit(dir, 5);
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let ctx = site_context(dir).await;
    for (sql, left, right, filter) in [
        (
            "SELECT COUNT(*) FROM diagnoses JOIN variants USING (pid)",
            "diagnoses",
            "variants",
            "",
        ),
        (
            "SELECT v.zygosity, COUNT(*) FROM variants v JOIN diagnoses d ON v.pid = d.pid WHERE d.code <> 'I10' GROUP BY v.zygosity",
            "variants",
            "diagnoses",
            "WHERE r.code <> 'I10'",
        ),
        (
            "SELECT p.sex, COUNT(*) FROM labs l JOIN participants p USING (pid) GROUP BY p.sex",
            "labs",
            "participants",
            "",
        ),
    ] {
        let q = engine.plan("alice", sql).await.unwrap();
        assert_eq!(q.request.max_rows_per_unit, 5);
        let merged = engine.gather(&q).await.unwrap();
        let total: i128 = merged.groups.values().map(|p| p[0]).sum();
        let b = ctx
            .sql(&format!(
                "SELECT CAST(SUM(LEAST(n, 5)) AS BIGINT), CAST(SUM(n) AS BIGINT), \
                        CAST(SUM(CASE WHEN a <= 5 AND n > 5 THEN 1 ELSE 0 END) AS BIGINT) \
                 FROM (SELECT l.fedq_site, l.pid, COUNT(*) AS n, \
                              (SELECT COUNT(*) FROM {left} x WHERE x.pid = l.pid AND x.fedq_site = l.fedq_site) AS a \
                       FROM {left} l JOIN {right} r ON l.pid = r.pid AND l.fedq_site = r.fedq_site {filter} \
                       GROUP BY l.fedq_site, l.pid)"
            ))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let expected = cell(&b[0], 0, 0).unwrap() as i128;
        let untruncated = cell(&b[0], 1, 0).unwrap() as i128;
        let multiplied = cell(&b[0], 2, 0).unwrap() as i128;
        assert_eq!(total, expected, "{sql}");
        assert!(untruncated > expected, "{sql}: the test needs truncation");
        if right != "participants" {
            assert!(
                multiplied > 0,
                "{sql}: the test needs participants whose rows multiply past R"
            );
        }
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
    // Joins: only inner, of two different tables, on the privacy unit, bounded columns.
    for (sql, needle) in [
        (
            "SELECT COUNT(*) FROM labs l JOIN participants p ON l.test = p.sex",
            "joins must be on the privacy unit",
        ),
        (
            "SELECT COUNT(*) FROM labs l RIGHT JOIN participants p USING (pid)",
            "LEFT JOIN with the tables swapped",
        ),
        (
            "SELECT COUNT(*) FROM labs, participants WHERE labs.pid = participants.pid",
            "cross joins",
        ),
        (
            "SELECT COUNT(*) FROM labs l JOIN participants p ON p.pid = l.pid JOIN variants v ON v.pid = l.pid \
             JOIN diagnoses d ON d.pid = l.pid JOIN specimens s ON s.pid = l.pid JOIN labs m ON m.pid = l.pid",
            "at most 5 tables",
        ),
        (
            "SELECT COUNT(*) FROM labs a FULL JOIN labs b USING (pid)",
            "FULL joins are not supported",
        ),
        (
            "SELECT d.code, COUNT(*) FROM participants p JOIN diagnoses d USING (pid) GROUP BY d.code",
            "diagnoses.code",
        ),
    ] {
        expect(alice.query(sql).await, Code::PermissionDenied, needle);
    }
    expect(
        alice.query("SELECT SUM(code) FROM diagnoses").await,
        Code::InvalidArgument,
        "sum",
    );
    // A key without a public domain is answered through partition selection
    // (tests/partition_selection.rs), but never the privacy unit itself.
    expect(
        alice
            .query("SELECT pid, COUNT(*) FROM diagnoses GROUP BY pid")
            .await,
        Code::PermissionDenied,
        "privacy unit",
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

/// `COUNT(DISTINCT pid)`: each site counts its own distinct participants per group (a
/// participant at two sites counts at both, which S accounts for), so the exact pre-noise
/// value is the sum over sites of DataFusion's per-site `COUNT(DISTINCT pid)`. The noisy
/// answer is within the discrete-Laplace bound at per-cell α = 1e-12 (5 cells here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distinct_participants_are_exact_per_site_and_noise_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 3000, 12);
    set_rows_per_unit(dir, 1000);
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let mut client = fed.client("alice").await.unwrap();
    let cases: [(&str, &str, &[&str], usize); 3] = [
        (
            "SELECT test, COUNT(DISTINCT pid) AS n FROM labs WHERE value > 5 GROUP BY test",
            "SELECT test, COUNT(DISTINCT pid) FROM labs WHERE value > 5 GROUP BY test",
            &["labs"],
            1usize,
        ),
        (
            "SELECT COUNT(DISTINCT pid) FROM diagnoses WHERE code = 'E11'",
            "SELECT COUNT(DISTINCT pid) FROM diagnoses WHERE code = 'E11'",
            &["diagnoses"],
            0,
        ),
        // "How many distinct patients have E11 and a stored serum specimen?"
        (
            "SELECT COUNT(DISTINCT d.pid) FROM diagnoses d JOIN specimens s USING (pid) \
             WHERE d.code = 'E11' AND s.kind = 'serum' AND s.status = 'stored'",
            "SELECT COUNT(DISTINCT d.pid) FROM diagnoses d JOIN specimens s ON d.pid = s.pid \
             WHERE d.code = 'E11' AND s.kind = 'serum' AND s.status = 'stored'",
            &["diagnoses", "specimens"],
            0,
        ),
    ];
    for (sql, per_site_sql, tables, nk) in cases {
        let q = engine.plan("alice", sql).await.unwrap();
        assert_eq!(q.request.aggregates, vec![AggregateRequest::CountUnits]);
        let merged = engine.gather(&q).await.unwrap();
        let mut expect: HashMap<Vec<String>, f64> = HashMap::new();
        for site in fedq::federation::site_dirs(dir).unwrap() {
            let ctx = SessionContext::new();
            for table in tables {
                ctx.register_parquet(
                    *table,
                    site.join(format!("{table}.parquet")).to_str().unwrap(),
                    Default::default(),
                )
                .await
                .unwrap();
            }
            for (k, v) in exact_rows(&ctx, per_site_sql, nk).await {
                *expect.entry(k).or_default() += v[0];
            }
        }
        assert!(expect.values().all(|v| *v > 0.0), "{sql}: {expect:?}");
        let got: HashMap<Vec<String>, f64> = merged
            .groups
            .iter()
            .map(|(k, v)| (k.iter().map(|x| x.to_string()).collect(), v[0] as f64))
            .collect();
        assert_eq!(got, expect, "{sql}");

        let r = client.query(sql).await.unwrap();
        let st = &q.statistics[0];
        let b = st.sensitivity as f64 / st.epsilon.to_f64().value();
        let t = discrete_laplace_half_width(b, ALPHA);
        for batch in &r.batches {
            for row in 0..batch.num_rows() {
                let k: Vec<String> = (0..nk).map(|c| key(batch, c, row)).collect();
                let exact = expect.get(&k).copied().unwrap_or(0.0);
                let noisy = cell(batch, nk, row).expect("not suppressed");
                assert!(
                    (noisy - exact).abs() <= t,
                    "{sql}: {k:?} {noisy} vs {exact}"
                );
            }
        }
    }
}
