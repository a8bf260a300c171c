//! `EXPLAIN <query>`: what a query would cost and how accurate it would be, before any
//! budget is spent.
//!
//! EXPLAIN plans and checks the query exactly as it would run (same statistics, same
//! sensitivities, same ε split), but asks no node and charges nothing; the ledger records a
//! free `query.explained` audit entry. The answer is an ordinary Arrow table with one row
//! per item:
//!
//! | `item` | what it shows |
//! |---|---|
//! | `query` | total ε and δ, R, S, the allocation rule and the suppression threshold |
//! | `participant set` | each set of participants a subquery tests (`IN`, `EXISTS`, `INTERSECT`, `EXCEPT`), and where membership is decided |
//! | `node request` | the exact typed request every node would receive (JSON) |
//! | `statistic` | each noisy statistic: L1 sensitivity (and its formula), ε share, noise scale, expected 95% error; with partition selection, its threshold, ε and δ |
//! | `output` | each aggregate the researcher asked for: its ε and expected 95% error |
//!
//! All values are in the column's own units. The 95% error of a count or sum is the
//! half-width `t` of the discrete Laplace noise with P(|noise| > t) ≤ 5%, which needs no
//! data. An AVG's (or VAR's) error depends on the unknown count N, so its row states the
//! errors of its numerator and denominator statistics and the delta-method half-width at
//! stated counts (N = 100, 1,000 and 10,000 values). A quantile's statistic row gives its
//! exponential mechanism's sensitivity and scale in score units and, as `ci95_half_width`,
//! the rank error (in rows) that its noise causes with 95% probability; its output row
//! states the candidate grid and what that rank error means for the released value.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::error::CoordinatorError;
use crate::noise::DiscreteLaplace;
use crate::planner::{AggregateOutput, Allocation, PlannedQuery, StatisticKind, TRUNCATION_LABEL};
use crate::quantile::QuantileMechanism;
use crate::release::{avg_ci95, top_projection_mapping, VarianceShape};
use fedq_common::quantile::QuantileGrid;
use fedq_common::AggregateRequest;

/// Schema metadata key: `"true"` on an EXPLAIN answer.
pub const META_EXPLAIN: &str = "fedq.explain";

/// Counts at which AVG/VAR errors are stated.
const STATED_COUNTS: [f64; 3] = [100.0, 1_000.0, 10_000.0];

/// The EXPLAIN query without the keyword, if `sql` is one. `EXPLAIN ANALYZE` is refused
/// (it would run the query); `EXPLAIN VERBOSE` is the same as `EXPLAIN`.
pub fn explain_target(sql: &str) -> Result<Option<&str>, CoordinatorError> {
    let s = sql.trim_start();
    let Some((first, rest)) = split_word(s) else {
        return Ok(None);
    };
    if !first.eq_ignore_ascii_case("explain") {
        return Ok(None);
    }
    let mut rest = rest;
    if let Some((w, r)) = split_word(rest) {
        if w.eq_ignore_ascii_case("analyze") {
            return Err(CoordinatorError::Refused(
                "EXPLAIN ANALYZE would run the query and spend budget; use EXPLAIN (free) to see \
                 its cost and accuracy, then run the query itself"
                    .into(),
            ));
        }
        if w.eq_ignore_ascii_case("verbose") {
            rest = r;
        }
    }
    let rest = rest.trim();
    if rest.is_empty() {
        return Err(CoordinatorError::InvalidSql(
            "EXPLAIN needs a query, e.g. EXPLAIN SELECT AVG(birth_year) FROM participants".into(),
        ));
    }
    Ok(Some(rest))
}

fn split_word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return None;
    }
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    Some((&s[..end], &s[end..]))
}

/// Schema of an EXPLAIN answer.
pub fn explain_schema() -> SchemaRef {
    let f = |n: &str, t: DataType| Field::new(n, t, true);
    Arc::new(Schema::new(vec![
        Field::new("item", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, false),
        f("sensitivity", DataType::Float64),
        f("sensitivity_formula", DataType::Utf8),
        f("epsilon", DataType::Float64),
        f("delta", DataType::Float64),
        f("noise_scale", DataType::Float64),
        f("ci95_half_width", DataType::Float64),
        f("detail", DataType::Utf8),
    ]))
}

#[derive(Default)]
struct Rows {
    item: Vec<String>,
    name: Vec<String>,
    sensitivity: Vec<Option<f64>>,
    formula: Vec<Option<String>>,
    epsilon: Vec<Option<f64>>,
    delta: Vec<Option<f64>>,
    scale: Vec<Option<f64>>,
    ci95: Vec<Option<f64>>,
    detail: Vec<Option<String>>,
}

struct Row {
    item: &'static str,
    name: String,
    sensitivity: Option<f64>,
    formula: Option<String>,
    epsilon: Option<f64>,
    delta: Option<f64>,
    scale: Option<f64>,
    ci95: Option<f64>,
    detail: Option<String>,
}

impl Row {
    /// A row that describes part of the query, with no statistic of its own.
    fn note(item: &'static str, name: String, detail: String) -> Row {
        Row {
            item,
            name,
            sensitivity: None,
            formula: None,
            epsilon: None,
            delta: None,
            scale: None,
            ci95: None,
            detail: Some(detail),
        }
    }
}

impl Rows {
    fn push(&mut self, r: Row) {
        self.item.push(r.item.to_string());
        self.name.push(r.name);
        self.sensitivity.push(r.sensitivity);
        self.formula.push(r.formula);
        self.epsilon.push(r.epsilon);
        self.delta.push(r.delta);
        self.scale.push(r.scale);
        self.ci95.push(r.ci95);
        self.detail.push(r.detail);
    }
}

fn num(x: f64) -> String {
    if x == x.trunc() && x.abs() < 1e15 {
        format!("{x:.0}")
    } else if x.abs() >= 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.4}")
    }
}

/// The EXPLAIN table of a planned query under the policy's suppression threshold. δ is the
/// query's own (the policy's `delta_per_query` with partition selection, else 0).
pub fn explain_batch(
    q: &PlannedQuery,
    min_reported_count: u64,
) -> Result<(SchemaRef, Vec<RecordBatch>), CoordinatorError> {
    let delta_per_query = q.delta;
    let qid = &q.query_id;
    // Every statistic's mechanism: discrete Laplace, or for a quantile the exponential
    // mechanism (whose noise scale is in score units).
    let mut mechs: Vec<DiscreteLaplace> = Vec::new();
    let mut quantiles: HashMap<usize, (QuantileMechanism, QuantileGrid)> = HashMap::new();
    for (i, st) in q.statistics.iter().enumerate() {
        if let StatisticKind::Quantile {
            partial, alpha_den, ..
        } = st.kind
        {
            if let Some(AggregateRequest::QuantileHistogram {
                lower,
                upper,
                precision,
                candidates,
                ..
            }) = q.request.aggregates.get(partial)
            {
                let grid = QuantileGrid::for_bounds(*lower, *upper, *precision, *candidates)
                    .map_err(|e| CoordinatorError::internal(qid, e.to_string()))?;
                let m = QuantileMechanism::new(st.sensitivity, &st.epsilon, grid.len(), alpha_den)
                    .map_err(|e| CoordinatorError::internal(qid, e))?;
                quantiles.insert(i, (m, grid));
            }
        }
        mechs.push(
            DiscreteLaplace::new(st.sensitivity, &st.epsilon)
                .map_err(|e| CoordinatorError::internal(qid, e))?,
        );
    }
    let eps = |i: usize| q.statistics[i].epsilon.to_f64().value();
    // Output names as the researcher sees them (aliases), else the aggregate's own name.
    let nk = q.groups.len();
    let n_out = q.outputs.len();
    let top = top_projection_mapping(&q.plan, n_out, nk);
    let out_name = |j: usize| -> String {
        top.iter()
            .position(|t| *t == Some(j))
            .map(|i| q.plan.schema().field(i).name().clone())
            .unwrap_or_else(|| q.aggregate_schema.field(nk + j).name().clone())
    };

    let mut rows = Rows::default();
    let suppression = if min_reported_count > 0 {
        format!("cells whose noisy count is below {min_reported_count} are shown as NULL (column fedq_suppressed says why)")
    } else {
        "no small-cell suppression".to_string()
    };
    // Which groups the answer will have, before any data is read.
    let groups = if q.groups.is_empty() {
        "one group (no GROUP BY)".to_string()
    } else if q.selection.is_some() {
        format!(
            "groups of {}: only those that pass partition selection",
            q.groups
                .iter()
                .map(|g| g.column.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        let product: usize = q.groups.iter().map(|g| g.domain.len()).product();
        let each: Vec<String> = q
            .groups
            .iter()
            .map(|g| {
                let how = match &g.key {
                    fedq_common::GroupKey::Column { .. } => "public values",
                    fedq_common::GroupKey::Listed { .. } => "values listed in the WHERE",
                    fedq_common::GroupKey::Condition { .. } => "truth values of the condition",
                    fedq_common::GroupKey::Case { .. } => "CASE labels",
                    fedq_common::GroupKey::IntBucket { .. } => "buckets of the column's bounds",
                    fedq_common::GroupKey::DatePart { .. } => "calendar values",
                };
                // A `date_trunc` key's values are days since 1970-01-01: show them as dates.
                let as_date = matches!(&g.key, fedq_common::GroupKey::DatePart { field, .. } if field.is_trunc());
                let shown: Vec<String> = g
                    .domain
                    .iter()
                    .take(6)
                    .map(|v| match v {
                        fedq_common::PublicValue::Int(d) if as_date => {
                            fedq_common::catalog::format_days(*d)
                        }
                        other => other.to_string(),
                    })
                    .collect();
                let more = if g.domain.len() > 6 { ", …" } else { "" };
                format!(
                    "{}: {} {how} ({}{more})",
                    g.column,
                    g.domain.len(),
                    shown.join(", ")
                )
            })
            .collect();
        format!(
            "{product} group(s), every one released (empty ones as noise): {}",
            each.join("; ")
        )
    };
    rows.push(Row {
        item: "query",
        name: format!(
            "{} statistic(s) and the bounding report over {}",
            q.statistics.len(),
            q.relation()
        ),
        sensitivity: None,
        formula: None,
        epsilon: Some(q.epsilon),
        delta: Some(delta_per_query),
        scale: None,
        ci95: None,
        detail: Some(format!(
            "would charge ε = {} and δ = {delta_per_query} (EXPLAIN itself is free and reads no data); \
             R = {} rows per participant ({}), S = {} sites per participant{}; {groups}; ε split: {}; {suppression}",
            q.epsilon,
            q.max_rows_per_unit,
            q.row_bound_source,
            q.max_sites_per_unit,
            match &q.selection {
                Some(sel) => format!(
                    ", G = {} groups per participant (partition selection)",
                    sel.max_groups_per_unit
                ),
                None => String::new(),
            },
            match q.allocation {
                Allocation::Balanced => "balanced, ε_i ∝ c_i^(1/3) (minimises the outputs' summed relative variance)",
                Allocation::Even => "even",
            },
        )),
    });
    // Each participant set the filter or keys test: participant-local, so the
    // sensitivities above are unchanged; each site decides membership from its own rows.
    for set in q.request.participant_sets() {
        rows.push(Row::note(
            "participant set",
            set.tables().join(", "),
            format!(
                "{}; decided at each site from the participant's own rows there (a participant at two sites is tested at each), so it changes no sensitivity",
                set.describe()
            ),
        ));
    }
    // A derived table: participant-local, computed at each site from that site's rows.
    for d in q.request.derived_tables() {
        rows.push(Row::note(
            "derived table",
            d.table.clone(),
            format!(
                "{}; computed at each site from the participant's rows there, so a participant at two sites has a row at each \
                 (a 'first' or 'latest' event is per site, so it can differ from the participant's first or latest across sites; S covers the sensitivity)",
                d.describe()
            ),
        ));
    }
    let mut request = q.request.clone();
    request.query_id.clear();
    rows.push(Row::note(
        "node request",
        q.relation(),
        serde_json::to_string(&request)
            .map_err(|e| CoordinatorError::internal(qid, e.to_string()))?,
    ));
    for (i, st) in q.statistics.iter().enumerate() {
        let used: Vec<String> = st.used_by.iter().map(|&j| out_name(j)).collect();
        if let Some((m, grid)) = quantiles.get(&i) {
            let bounds_step = match q.request.aggregates.get(match st.kind {
                StatisticKind::Quantile { partial, .. } => partial,
                _ => usize::MAX,
            }) {
                Some(AggregateRequest::QuantileHistogram { precision, .. }) => *precision,
                _ => 1.0,
            };
            rows.push(Row {
                item: "statistic",
                name: st.label.clone(),
                sensitivity: Some(st.sensitivity as f64),
                formula: Some(st.formula.clone()),
                epsilon: Some(eps(i)),
                delta: Some(0.0),
                scale: Some(m.scale()),
                ci95: Some(m.rank_half_width(0.05).ceil()),
                detail: Some(format!(
                    "exponential mechanism (OpenDP noisy max, permute-and-flip; pure ε-DP, δ = 0) over {} \
                     candidates spaced at most {} apart, one selection per group (a participant's R·S rows are \
                     shared among the groups, so all groups together cost this ε once); sensitivity and noise \
                     scale in score units. ci95_half_width is a rank error in rows: with 95% probability the \
                     released candidate's rank is within it of the best candidate's; used by {}",
                    grid.len(),
                    num(grid.max_step() as f64 * bounds_step),
                    used.join(", ")
                )),
            });
            continue;
        }
        rows.push(Row {
            item: "statistic",
            name: st.label.clone(),
            sensitivity: Some(st.sensitivity as f64 * st.unit),
            formula: Some(st.formula.clone()),
            epsilon: Some(eps(i)),
            delta: Some(0.0),
            scale: Some(mechs[i].scale() * st.unit),
            ci95: Some(mechs[i].half_width(0.05) * st.unit),
            detail: Some(format!(
                "discrete Laplace (pure ε-DP, δ = 0) on every group; used by {}",
                used.join(", ")
            )),
        });
    }
    {
        let t = &q.truncation;
        let m = DiscreteLaplace::new(t.sensitivity, &t.epsilon)
            .map_err(|e| CoordinatorError::internal(qid, e))?;
        rows.push(Row {
            item: "statistic",
            name: TRUNCATION_LABEL.to_string(),
            sensitivity: Some(t.sensitivity as f64),
            formula: Some(format!("S = {} (each participant counted once per site)", q.max_sites_per_unit)),
            epsilon: Some(t.epsilon.to_f64().value()),
            delta: Some(0.0),
            scale: Some(m.scale()),
            ci95: Some(m.half_width(0.05)),
            detail: Some(format!(
                "bounding report, one number for the whole answer (schema metadata {}): how many \
                 participants had more than R = {} rows after the filter, so that some of their rows \
                 were left out; 1/{} of ε",
                crate::release::META_TRUNCATED,
                q.max_rows_per_unit,
                crate::planner::TRUNCATION_SHARE_DENOMINATOR
            )),
        });
    }
    if let Some(sel) = &q.selection {
        let m = DiscreteLaplace::new(sel.l1 as u128, &sel.epsilon)
            .map_err(|e| CoordinatorError::internal(qid, e))?;
        let keys: Vec<&str> = q.groups.iter().map(|g| g.column.as_str()).collect();
        rows.push(Row {
            item: "statistic",
            name: crate::selection::SELECTION_LABEL.to_string(),
            sensitivity: Some(sel.l1 as f64),
            formula: Some(sel.formula(q.max_rows_per_unit, q.max_sites_per_unit)),
            epsilon: Some(sel.epsilon.to_f64().value()),
            delta: Some(sel.delta),
            scale: Some(sel.scale),
            ci95: Some(m.half_width(0.05)),
            detail: Some(format!(
                "GROUP BY {} has no public domain: a group is released only if its noisy number of \
                 participants is at least T = {} (OpenDP make_laplace_threshold, scale {}; its privacy map \
                 gives ε = {}, δ = {:e}); groups with far fewer participants are never shown, a group of \
                 one participant with probability below δ. Each participant counts in at most G = {} groups \
                 per site (the node keeps the G where it has most rows). 1/{} of ε",
                keys.join(", "),
                sel.threshold,
                num(sel.scale),
                num(sel.map_epsilon),
                sel.map_delta,
                sel.max_groups_per_unit,
                crate::selection::SELECTION_SHARE_DENOMINATOR
            )),
        });
    }
    for (j, out) in q.outputs.iter().enumerate() {
        let e: f64 = out.stats().iter().map(|&i| eps(i)).sum();
        let hw = |i: usize| mechs[i].half_width(0.05) * q.statistics[i].unit;
        let b = |i: usize| mechs[i].scale() * q.statistics[i].unit;
        let (scale, ci95, detail) = match out {
            AggregateOutput::Quantile {
                stat,
                bounds,
                grid,
                alpha,
            } => {
                let rank = quantiles
                    .get(stat)
                    .map(|(m, _)| m.rank_half_width(0.05).ceil())
                    .unwrap_or(f64::NAN);
                (
                    None,
                    None,
                    format!(
                        "the {alpha} quantile, always one of {} candidates in [{}, {}] spaced at most {} apart. \
                         With 95% probability the released value v has at most {alpha}·N + t values below it and \
                         at most (1 − {alpha})·N + t above it (N values in the group), where t = {} rows from the \
                         noise plus at most half the values in the grid cell that holds the true quantile; no value \
                         half-width can be stated without the data",
                        grid.len(),
                        num(bounds.lower),
                        num(bounds.upper),
                        num(grid.max_step() as f64 * bounds.precision),
                        num(rank),
                    ),
                )
            }
            AggregateOutput::Count { stat } => (
                Some(b(*stat)),
                Some(hw(*stat)),
                "95% of answers are within this of the true count".to_string(),
            ),
            AggregateOutput::Sum {
                stat, count_stat, ..
            } => (
                Some(b(*stat)),
                Some(hw(*stat)),
                match count_stat {
                    Some(c) => format!(
                        "95% of answers are within this of the true (clamped) sum; COUNT ±{} decides suppression",
                        num(hw(*c))
                    ),
                    None => "95% of answers are within this of the true (clamped) sum".into(),
                },
            ),
            AggregateOutput::Avg {
                sum_stat,
                count_stat,
                bounds,
                ..
            } => {
                let (bs, bc) = (b(*sum_stat), b(*count_stat));
                let half = (bounds.upper - bounds.lower) / 2.0;
                let at: Vec<String> = STATED_COUNTS
                    .iter()
                    .map(|&n| format!("±{} at N = {n}", num(avg_ci95(bs, bc, 0.0, n))))
                    .collect();
                (
                    None,
                    Some(avg_ci95(bs, bc, 0.0, 1_000.0)),
                    format!(
                        "AVG = midpoint + SUM(x − midpoint)/COUNT(x): numerator ±{}, denominator ±{} (95%). \
                         Expected AVG error (delta method, mean at the midpoint {}): {}; with the mean at a bound, \
                         ±{} at N = 1000. ci95_half_width is the value at N = 1000",
                        num(hw(*sum_stat)),
                        num(hw(*count_stat)),
                        num((bounds.lower + bounds.upper) / 2.0),
                        at.join(", "),
                        num(avg_ci95(bs, bc, half, 1_000.0)),
                    ),
                )
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
                let shape = VarianceShape {
                    half: *half_fp as f64 * bounds.precision,
                    precision: bounds.precision,
                    sample: *sample,
                    sqrt: *sqrt,
                };
                // Values spread uniformly over the bounds, mean at the midpoint: V = H²/3.
                let h = shape.half;
                let at = |n: f64| {
                    let p = bounds.precision;
                    let nf = n.round() as i128;
                    let sq = ((h * h / 3.0) * n / (p * p)).round() as i128;
                    let v = shape.value(nf, 0, sq).unwrap_or(0.0);
                    shape.ci95(v, b(*sq_stat), b(*sum_stat), b(*count_stat), nf, 0, sq)
                };
                let list: Vec<String> = STATED_COUNTS
                    .iter()
                    .map(|&n| format!("±{} at N = {n}", num(at(n))))
                    .collect();
                (
                    None,
                    Some(at(1_000.0)),
                    format!(
                        "{} from COUNT ±{}, centred SUM ±{} and centred SUM of squares ±{} (95%). \
                         Expected error (delta method, values spread evenly over the bounds): {}. \
                         ci95_half_width is the value at N = 1000",
                        if *sqrt { "STDDEV" } else { "VAR" },
                        num(hw(*count_stat)),
                        num(hw(*sum_stat)),
                        num(hw(*sq_stat)),
                        list.join(", "),
                    ),
                )
            }
        };
        rows.push(Row {
            item: "output",
            name: out_name(j),
            sensitivity: None,
            formula: None,
            epsilon: Some(e),
            delta: Some(0.0),
            scale,
            ci95,
            detail: Some(detail),
        });
    }
    let mut md = HashMap::new();
    md.insert(META_EXPLAIN.to_string(), "true".to_string());
    let schema = explain_schema();
    let schema = Arc::new(Schema::new_with_metadata(schema.fields().clone(), md));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(rows.item)),
        Arc::new(StringArray::from(rows.name)),
        Arc::new(Float64Array::from(rows.sensitivity)),
        Arc::new(StringArray::from(rows.formula)),
        Arc::new(Float64Array::from(rows.epsilon)),
        Arc::new(Float64Array::from(rows.delta)),
        Arc::new(Float64Array::from(rows.scale)),
        Arc::new(Float64Array::from(rows.ci95)),
        Arc::new(StringArray::from(rows.detail)),
    ];
    let batch = RecordBatch::try_new(schema.clone(), cols)
        .map_err(|e| CoordinatorError::internal(qid, e.to_string()))?;
    Ok((schema, vec![batch]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_explain() {
        assert_eq!(
            explain_target("  explain SELECT 1").unwrap(),
            Some("SELECT 1")
        );
        assert_eq!(
            explain_target("EXPLAIN VERBOSE\nSELECT 1").unwrap(),
            Some("SELECT 1")
        );
        assert_eq!(explain_target("SELECT 1").unwrap(), None);
        assert_eq!(explain_target("explained").unwrap(), None);
        assert!(matches!(
            explain_target("EXPLAIN ANALYZE SELECT 1"),
            Err(CoordinatorError::Refused(_))
        ));
        assert!(matches!(
            explain_target("EXPLAIN "),
            Err(CoordinatorError::InvalidSql(_))
        ));
    }
}
