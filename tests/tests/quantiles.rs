//! End to end: private quantiles (`MEDIAN`, `PERCENTILE_CONT ... WITHIN GROUP`,
//! `APPROX_PERCENTILE_CONT`) through an in-process federation of 3 nodes.
//!
//! - The exact pre-noise histograms the nodes return, merged, equal DataFusion over the
//!   union of the site files (clamped and rounded to fixed point as the nodes do, then
//!   binned against the public candidate grid by a direct search), for a single table with
//!   GROUP BY and for a join with WHERE. Nothing is truncated by bounding in these shapes
//!   (checked), so the comparison is exact.
//! - The released value is a candidate whose OpenDP quantile score is within
//!   `g = scale·ln(k/β)` of the best candidate's, with β = 1e-11 per released value: for
//!   permute-and-flip a candidate whose score exceeds the best by g is released with
//!   probability at most `exp(−g/scale)`, so at most k of them with probability
//!   `k·exp(−g/scale) = β` (see `fedq_coordinator::quantile`). Fewer than 20 values are
//!   checked, so a spurious failure has probability < 2e-10. The same bound gives the rank
//!   statement the researcher is told: at most `α·N + (OPT + g)/α_den` values below the
//!   released value and at most `(1 − α)·N + (OPT + g)/α_den` above it.
//! - Refusals (percentile outside [0, 1], a percentile that is not a literal, a column
//!   without bounds) reach the researcher as PERMISSION_DENIED with the reason; EXPLAIN
//!   shows the mechanism, its ε share, the candidates and the rank error.

use std::collections::HashMap;
use std::path::Path;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::Float64Type;
use datafusion::prelude::SessionContext;
use fedq::exact::union_context;
use fedq::CliError;
use fedq_common::quantile::QuantileGrid;
use fedq_common::{AggregateRequest, PublicValue};
use fedq_coordinator::planner::{AggregateOutput, PlannedQuery, StatisticKind};
use fedq_coordinator::quantile::{rank_of, scores, QuantileMechanism};
use fedq_coordinator::release::{
    META_CANDIDATES, META_EPSILON, META_GRID_STEP, META_QUANTILE, META_RANK_ERROR95,
};
use fedq_tests::{key, site_context, start, synth};

/// Failure probability of each released value's bound; see the module docs.
const BETA: f64 = 1e-11;

/// Remove the bounds of `labs.value`, so that a percentile of it must be refused.
fn drop_lab_value_bounds(dir: &Path) {
    let p = dir.join("catalog.toml");
    let mut cat = fedq_common::Catalog::load(&p).expect("catalog");
    let labs = cat.tables.get_mut("labs").expect("labs");
    for c in &mut labs.columns {
        if c.name == "value" {
            c.lower = None;
            c.upper = None;
            c.precision = None;
        }
    }
    std::fs::write(&p, toml::to_string(&cat).expect("toml")).expect("write catalog");
}

/// (researcher SQL, FROM clause of the exact query, WHERE or "", group columns, value
/// column, whether it joins within sites)
type Shape = (
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static str,
    bool,
);

const SHAPES: &[Shape] = &[
    (
        "SELECT MEDIAN(birth_year) FROM participants",
        "participants",
        "",
        &[],
        "birth_year",
        false,
    ),
    (
        "SELECT sex, PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY birth_year) AS p90, COUNT(*) \
         FROM participants WHERE participant_type <> 'general' GROUP BY sex",
        "participants",
        "participant_type <> 'general'",
        &["sex"],
        "birth_year",
        false,
    ),
    (
        "SELECT s.kind, APPROX_PERCENTILE_CONT(s.volume_ml, 0.25) AS q25 FROM specimens s \
         JOIN participants p USING (pid) WHERE p.birth_year >= 1950 GROUP BY s.kind",
        "specimens l JOIN participants r ON l.pid = r.pid AND l.fedq_site = r.fedq_site",
        "r.birth_year >= 1950",
        &["l.kind"],
        "l.volume_ml",
        true,
    ),
    // Percentiles of expressions: computed columns, bounded by interval arithmetic.
    (
        "SELECT MEDIAN(2026 - birth_year) AS age FROM participants",
        "participants",
        "",
        &[],
        "2026 - birth_year",
        false,
    ),
    (
        "SELECT sex, PERCENTILE_CONT(0.75) WITHIN GROUP (ORDER BY year(enrolled_on) - birth_year) AS q75 \
         FROM participants GROUP BY sex",
        "participants",
        "",
        &["sex"],
        "CAST(date_part('year', enrolled_on) AS BIGINT) - CAST(birth_year AS BIGINT)",
        false,
    ),
];

/// The exact histogram per group: DataFusion clamps and rounds each value to fixed point
/// as the node does; the bin is found by searching the candidate list directly.
async fn exact_histograms(
    ctx: &SessionContext,
    from: &str,
    filter: &str,
    groups: &[&str],
    column: &str,
    req: &AggregateRequest,
) -> HashMap<Vec<String>, Vec<i128>> {
    let AggregateRequest::QuantileHistogram {
        lower,
        upper,
        precision,
        candidates,
        ..
    } = req
    else {
        panic!("not a histogram: {req:?}")
    };
    let grid = QuantileGrid::for_bounds(*lower, *upper, *precision, *candidates).unwrap();
    let cands = grid.candidates();
    let lo = (lower / precision).ceil();
    let hi = (upper / precision).floor();
    let v = format!(
        "CAST(LEAST(GREATEST(ROUND(CAST({column} AS DOUBLE) / {precision:?}), {lo:?}), {hi:?}) AS BIGINT)"
    );
    let mut conds = vec![
        format!("{column} IS NOT NULL"),
        format!("NOT isnan(CAST({column} AS DOUBLE))"),
    ];
    if !filter.is_empty() {
        conds.push(format!("({filter})"));
    }
    let mut sel: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    sel.push(format!("{v} AS v"));
    sel.push("COUNT(*) AS n".into());
    let mut gb: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    gb.push(v.clone());
    let sql = format!(
        "SELECT {} FROM {from} WHERE {} GROUP BY {}",
        sel.join(", "),
        conds.join(" AND "),
        gb.join(", ")
    );
    let batches = ctx
        .sql(&sql)
        .await
        .expect(&sql)
        .collect()
        .await
        .expect(&sql);
    let nk = groups.len();
    let mut out: HashMap<Vec<String>, Vec<i128>> = HashMap::new();
    for b in &batches {
        let vals = b
            .column(nk)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        let ns = b
            .column(nk + 1)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        for row in 0..b.num_rows() {
            let k: Vec<String> = (0..nk).map(|c| key(b, c, row)).collect();
            let x = i128::from(vals.value(row));
            let i = cands.partition_point(|&c| c < x);
            let bin = if cands[i] == x { 2 * i } else { 2 * i - 1 };
            out.entry(k).or_insert_with(|| vec![0; grid.bins()])[bin] += i128::from(ns.value(row));
        }
    }
    out
}

fn domain_key(q: &PlannedQuery, ks: &[String]) -> Vec<PublicValue> {
    q.groups
        .iter()
        .zip(ks)
        .map(|(g, s)| {
            g.domain
                .iter()
                .find(|v| v.to_string() == *s)
                .unwrap()
                .clone()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn histograms_are_exact_and_released_quantiles_are_near_the_best_candidate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 8000, 31);
    drop_lab_value_bounds(dir);
    let fed = start(dir).await;
    let ctx = union_context(dir).await.unwrap();
    let site_ctx = site_context(dir).await;
    let mut client = fed.client("alice").await.unwrap();
    let engine = fed.coordinator.engine.clone();
    let mut checked = 0usize;

    for (sql, from, filter, groups, column, joined) in SHAPES {
        // 1. Exact pre-noise histograms equal DataFusion over the union of the files.
        let q = engine.plan("alice", sql).await.unwrap();
        let merged = engine.gather(&q).await.unwrap();
        assert_eq!(
            merged.truncated_units,
            Some(0),
            "{sql}: bounding truncated rows"
        );
        let (hp, req) = q
            .request
            .aggregates
            .iter()
            .enumerate()
            .find(|(_, a)| matches!(a, AggregateRequest::QuantileHistogram { .. }))
            .unwrap();
        let exp = exact_histograms(
            if *joined { &site_ctx } else { &ctx },
            from,
            filter,
            groups,
            column,
            req,
        )
        .await;
        let got: HashMap<Vec<String>, Vec<i128>> = merged
            .histograms
            .iter()
            .filter(|((_, p), _)| *p == hp)
            .map(|((k, _), v)| (k.iter().map(|x| x.to_string()).collect(), v.clone()))
            .collect();
        assert!(!exp.is_empty(), "{sql}: no values, nothing compared");
        assert_eq!(got, exp, "{sql}");
        // The histogram's own partial is the number of binned values.
        for (k, bins) in &merged.histograms {
            assert_eq!(merged.groups[&k.0][hp], bins.iter().sum::<i128>());
        }

        // 2. The released value is near the best candidate (bound with failure β).
        let r = client.query(sql).await.unwrap();
        let nk = groups.len();
        let (j, stat, grid, bounds, alpha) = q
            .outputs
            .iter()
            .enumerate()
            .find_map(|(j, o)| match o {
                AggregateOutput::Quantile {
                    stat,
                    grid,
                    bounds,
                    alpha,
                } => Some((j, *stat, *grid, *bounds, *alpha)),
                _ => None,
            })
            .unwrap();
        let st = &q.statistics[stat];
        let StatisticKind::Quantile {
            alpha_num,
            alpha_den,
            ..
        } = st.kind
        else {
            unreachable!()
        };
        let m = QuantileMechanism::new(st.sensitivity, &st.epsilon, grid.len(), alpha_den).unwrap();
        let g = m.score_gap(BETA);
        let field = r.schema.field(nk + j);
        let md = field.metadata();
        assert_eq!(md[META_QUANTILE].parse::<f64>().unwrap(), alpha);
        assert_eq!(md[META_CANDIDATES], grid.len().to_string());
        assert!(md[META_GRID_STEP].parse::<f64>().unwrap() > 0.0);
        assert!(md[META_RANK_ERROR95].parse::<f64>().unwrap() > 0.0);
        assert!(md[META_EPSILON].parse::<f64>().unwrap() > 0.0);
        let mut rows = 0;
        for b in &r.batches {
            let col = b.column(nk + j).as_primitive::<Float64Type>();
            for row in 0..b.num_rows() {
                rows += 1;
                let ks: Vec<String> = (0..nk).map(|c| key(b, c, row)).collect();
                let bins = merged.histogram(&domain_key(&q, &ks), hp, grid.bins());
                let v = col.value(row);
                let idx = grid
                    .candidates()
                    .iter()
                    .position(|&c| (c as f64 * bounds.precision - v).abs() < bounds.precision / 4.0)
                    .unwrap_or_else(|| panic!("{sql}: {v} is not a candidate"));
                let s = scores(&bins, alpha_num, alpha_den);
                let opt = *s.iter().min().unwrap();
                assert!(
                    (s[idx] as f64) <= opt as f64 + g,
                    "{sql} {ks:?}: score {} vs best {opt} + {g}",
                    s[idx]
                );
                // The rank statement of EXPLAIN and the docs.
                let n: i128 = bins.iter().sum();
                let (below, above) = rank_of(&bins, idx);
                let t = (opt as f64 + g) / alpha_den as f64;
                assert!(below as f64 <= alpha * n as f64 + t + 1e-9, "{sql} {ks:?}");
                assert!(
                    above as f64 <= (1.0 - alpha) * n as f64 + t + 1e-9,
                    "{sql} {ks:?}"
                );
                // Deterministic (no noise in t): the window is narrower than the group,
                // so the bound above says something about these data.
                assert!(t < 0.5 * n as f64, "{sql} {ks:?}: window {t} of {n}");
                checked += 1;
            }
        }
        assert_eq!(
            rows,
            q.groups.iter().map(|g| g.domain.len()).product::<usize>()
        );
    }
    assert!(checked < 20);

    // 3. Refusals reach the researcher with the reason.
    for (sql, needle) in [
        (
            "SELECT PERCENTILE_CONT(1.5) WITHIN GROUP (ORDER BY birth_year) FROM participants",
            "outside [0, 1]",
        ),
        (
            "SELECT APPROX_PERCENTILE_CONT(birth_year, birth_year) FROM participants",
            "literal",
        ),
        ("SELECT MEDIAN(value) FROM labs", "no declared bounds"),
        ("SELECT MAX(birth_year) FROM participants", "MEDIAN(col)"),
    ] {
        match client.query(sql).await {
            Err(CliError::Server { code, message }) => {
                assert_eq!(code, tonic::Code::PermissionDenied, "{sql}: {message}");
                assert!(message.contains(needle), "{sql}: {message}");
            }
            other => panic!(
                "{sql}: expected a refusal, got {:?}",
                other.map(|r| r.schema)
            ),
        }
    }

    // 4. EXPLAIN: the mechanism, its ε share, the candidates and the rank error.
    let sql = "SELECT MEDIAN(birth_year) AS m FROM participants WHERE sex = 'F'";
    let q = engine.plan("alice", sql).await.unwrap();
    let r = client.query(&format!("EXPLAIN {sql}")).await.unwrap();
    let b = &r.batches[0];
    let text = |c: &str, row: usize| {
        let a = b.column(b.schema().index_of(c).unwrap());
        (!a.is_null(row)).then(|| a.as_string::<i32>().value(row).to_string())
    };
    let float = |c: &str, row: usize| {
        let a = b.column(b.schema().index_of(c).unwrap());
        (!a.is_null(row)).then(|| a.as_primitive::<Float64Type>().value(row))
    };
    let st = &q.statistics[0];
    let m = QuantileMechanism::new(st.sensitivity, &st.epsilon, 131, 2).unwrap();
    let (mut saw_stat, mut saw_out) = (false, false);
    for row in 0..b.num_rows() {
        let name = text("name", row).unwrap();
        match text("item", row).unwrap().as_str() {
            "statistic" if name.starts_with("quantile 0.5 of birth_year") => {
                saw_stat = true;
                // R·S·max(1, 1) = 1·2·1 score units; 19/20 of ε.
                assert_eq!(float("sensitivity", row), Some(2.0));
                assert_eq!(float("epsilon", row), Some(0.95));
                assert_eq!(float("noise_scale", row), Some(m.scale()));
                assert_eq!(
                    float("ci95_half_width", row),
                    Some(m.rank_half_width(0.05).ceil())
                );
                let d = text("detail", row).unwrap();
                assert!(
                    d.contains("exponential mechanism") && d.contains("131"),
                    "{d}"
                );
            }
            "output" => {
                saw_out = true;
                assert_eq!(name, "m");
                let d = text("detail", row).unwrap();
                assert!(d.contains("131 candidates in [1900, 2030]"), "{d}");
                assert!(d.contains("rows from the noise"), "{d}");
            }
            _ => {}
        }
    }
    assert!(saw_stat && saw_out);
    fed.shutdown().await.unwrap();

    // 5. The audit log's ε split names the quantile with its share.
    let charged = fedq_tests::charged_entries(dir);
    assert_eq!(charged.len(), SHAPES.len());
    let split = charged[0]["body"]["epsilon_split"].to_string();
    assert!(split.contains("quantile 0.5 of birth_year"), "{split}");
}
