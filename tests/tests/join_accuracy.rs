//! Measurement, not a pass/fail test (ignored by default): for each join shape, the error
//! of the released values at ε = 1 and the bias that contribution bounding (and clamping)
//! introduces, against the exact answer over the sites' files joined within each site.
//!
//! ```sh
//! FEDQ_SITES=8 FEDQ_PARTICIPANTS=50000 FEDQ_RUNS=200 \
//!   cargo test -p fedq-tests --test join_accuracy -- --ignored --nocapture
//! ```
//!
//! For each output and group it prints: the exact value (values clamped into the catalog
//! bounds as the nodes clamp them, but no bounding of rows), the pre-noise value after
//! bounding to R joined rows per participant (what the noise is added to), the bias of
//! bounding (pre-noise − exact, relative to exact), and the mean absolute error
//! of `FEDQ_RUNS` noisy releases (each a fresh draw of the noise on the same gathered
//! partials) relative to the exact value.

use std::collections::HashMap;

use fedq_coordinator::planner::{AggregateOutput, StatisticKind};
use fedq_coordinator::release::{avg_value, release};
use fedq_tests::{cell, key, site_context, start, synth};

/// (name, researcher SQL, the same over the per-site join for DataFusion)
const SHAPES: &[(&str, &str, &str)] = &[
    (
        "labs⋈participants",
        "SELECT p.sex, COUNT(*), AVG(l.value) FROM labs l JOIN participants p USING (pid) WHERE l.test = 'HbA1c' GROUP BY p.sex",
        "SELECT p.sex, CAST(COUNT(*) AS DOUBLE), AVG(CASE WHEN isnan(l.value) THEN NULL ELSE LEAST(GREATEST(l.value, 0.0), 500.0) END) FROM labs l JOIN participants p ON l.pid = p.pid AND l.fedq_site = p.fedq_site WHERE l.test = 'HbA1c' GROUP BY p.sex",
    ),
    (
        "participants⋈labs",
        "SELECT p.sex, COUNT(*), AVG(l.value) FROM participants p JOIN labs l USING (pid) WHERE l.test = 'HbA1c' GROUP BY p.sex",
        "SELECT p.sex, CAST(COUNT(*) AS DOUBLE), AVG(CASE WHEN isnan(l.value) THEN NULL ELSE LEAST(GREATEST(l.value, 0.0), 500.0) END) FROM labs l JOIN participants p ON l.pid = p.pid AND l.fedq_site = p.fedq_site WHERE l.test = 'HbA1c' GROUP BY p.sex",
    ),
    (
        "diagnoses⋈variants",
        "SELECT v.gene, COUNT(*) FROM diagnoses d JOIN variants v ON d.pid = v.pid WHERE d.code = 'E11' GROUP BY v.gene",
        "SELECT v.gene, CAST(COUNT(*) AS DOUBLE) FROM diagnoses d JOIN variants v ON d.pid = v.pid AND d.fedq_site = v.fedq_site WHERE d.code = 'E11' GROUP BY v.gene",
    ),
    (
        "specimens⋈participants",
        "SELECT p.participant_type, COUNT(*), SUM(s.volume_ml) FROM specimens s JOIN participants p USING (pid) WHERE s.status = 'stored' GROUP BY p.participant_type",
        "SELECT p.participant_type, CAST(COUNT(*) AS DOUBLE), SUM(CASE WHEN isnan(s.volume_ml) THEN NULL ELSE LEAST(GREATEST(s.volume_ml, 0.0), 50.0) END) FROM specimens s JOIN participants p ON s.pid = p.pid AND s.fedq_site = p.fedq_site WHERE s.status = 'stored' GROUP BY p.participant_type",
    ),
];

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn join_error_and_bounding_bias() {
    let (sites, participants, runs) = (
        env("FEDQ_SITES", 8),
        env("FEDQ_PARTICIPANTS", 50_000),
        env("FEDQ_RUNS", 200),
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, sites, participants, 7);
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let ctx = site_context(dir).await;
    println!("{sites} sites, {participants} participants, {runs} noisy releases per shape, ε = 1, catalog R");
    println!(
        "| shape | R | output | group | exact | pre-noise | bias | mean abs error (ε = 1) | relative |"
    );
    println!("|---|---:|---|---|---:|---:|---:|---:|---:|");
    for (name, sql, exact_sql) in SHAPES {
        let q = engine.plan("alice", sql).await.unwrap();
        assert_eq!(q.epsilon, 1.0);
        let merged = engine.gather(&q).await.unwrap();
        let nk = q.groups.len();
        // Exact (unbounded, unclamped) answers by group key.
        let mut exact: HashMap<Vec<String>, Vec<f64>> = HashMap::new();
        for b in ctx.sql(exact_sql).await.unwrap().collect().await.unwrap() {
            for r in 0..b.num_rows() {
                let k: Vec<String> = (0..nk).map(|c| key(&b, c, r)).collect();
                let v = (nk..b.num_columns())
                    .map(|c| cell(&b, c, r).unwrap_or(f64::NAN))
                    .collect();
                exact.insert(k, v);
            }
        }
        // Noisy releases of the same partials.
        let mut abs_err: HashMap<(Vec<String>, usize), f64> = HashMap::new();
        let mut pre: HashMap<(Vec<String>, usize), f64> = HashMap::new();
        for _ in 0..runs {
            let rel = release(&q, &merged, 0, HashMap::new()).await.unwrap();
            for b in &rel.batches {
                for r in 0..b.num_rows() {
                    let ks: Vec<String> = (0..nk).map(|c| key(b, c, r)).collect();
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
                        let truth = match out {
                            AggregateOutput::Count { stat } => match q.statistics[*stat].kind {
                                StatisticKind::Count { partial } => p[partial] as f64,
                                _ => unreachable!(),
                            },
                            AggregateOutput::Sum { stat, .. } => match q.statistics[*stat].kind {
                                StatisticKind::Sum { partial, precision } => {
                                    p[partial] as f64 * precision
                                }
                                _ => unreachable!(),
                            },
                            AggregateOutput::Avg {
                                sum_stat,
                                bounds,
                                mid_fp,
                                ..
                            } => match q.statistics[*sum_stat].kind {
                                StatisticKind::CentredSum { sum, count, .. } => {
                                    avg_value(p[sum] - mid_fp * p[count], p[count], *mid_fp, bounds)
                                        .unwrap_or(f64::NAN)
                                }
                                _ => unreachable!(),
                            },
                            AggregateOutput::Variance { .. } => continue,
                        };
                        let got = cell(b, nk + j, r).unwrap_or(f64::NAN);
                        pre.insert((ks.clone(), j), truth);
                        *abs_err.entry((ks.clone(), j)).or_default() +=
                            (got - truth).abs() / runs as f64;
                    }
                }
            }
        }
        let mut rows: Vec<_> = abs_err.into_iter().collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        for ((ks, j), err) in rows {
            let x = exact.get(&ks).map_or(0.0, |v| v[j]);
            let y = pre[&(ks.clone(), j)];
            let label = q
                .aggregate_schema
                .field(nk + j)
                .name()
                .replace("count(Int64(1))", "COUNT(*)");
            println!(
                "| {name} | {} | {label} | {} | {x:.2} | {y:.2} | {:+.2}% | {err:.3} | {:.3}% |",
                q.max_rows_per_unit,
                ks.join(","),
                100.0 * (y - x) / x,
                100.0 * err / x.abs()
            );
        }
    }
    fed.shutdown().await.unwrap();
}
