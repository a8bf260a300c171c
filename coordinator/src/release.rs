//! Noise and post-processing: from exact merged partials to the researcher's Arrow result.
//!
//! 1. Every statistic gets discrete Laplace noise on every group of the public domain
//!    (empty groups included), with scale sensitivity / ε-share. Keys without a public
//!    domain release only the observed groups that pass DP partition selection
//!    ([`crate::selection`]).
//! 2. Aggregates are computed from the noisy statistics: counts and sums directly, AVG as
//!    mid + noisy centred sum / noisy count, clamped into the declared bounds. A percentile
//!    is the candidate that OpenDP's exponential mechanism selects from the exact histogram
//!    of each group ([`crate::quantile`]); no Laplace noise is drawn for it.
//! 3. Small-cell suppression: a noisy count below `min_reported_count` becomes NULL, and so
//!    does an AVG whose count is suppressed.
//! 4. The noisy aggregate table replaces the Aggregate node of the researcher's plan, and
//!    DataFusion runs the rest (HAVING, projection, ORDER BY, LIMIT) over noisy values only.
//! 5. Each noisy column carries its noise scale and 95% confidence half-width as Arrow field
//!    metadata; the schema says which sites answered and the ε spent.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{Column, ScalarValue};
use datafusion::datasource::{provider_as_source, MemTable};
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, Projection};
use datafusion::prelude::SessionContext;

/// The session post-processing runs in, made once: a new one per query would register
/// every built-in function again. Each query's plan carries its own noisy table, so the
/// session holds nothing of any query.
static POST_PROCESSING: std::sync::LazyLock<SessionContext> =
    std::sync::LazyLock::new(SessionContext::new);
use fedq_common::catalog::Bounds;
use fedq_common::{AggregateRequest, PublicValue};

use crate::error::CoordinatorError;
use crate::fanout::MergedPartials;
use crate::noise::DiscreteLaplace;
use crate::planner::{public_scalar, strip_alias, AggregateOutput, PlannedQuery, StatisticKind};
use crate::quantile::{self, QuantileMechanism};
use fedq_common::quantile::QuantileGrid;

/// Field metadata key: which statistic a column is (`count`, `sum`, `avg`).
pub const META_STATISTIC: &str = "fedq.statistic";
/// Field metadata key: noise mechanism.
pub const META_MECHANISM: &str = "fedq.mechanism";
/// Field metadata key: noise scale b in the column's units (for AVG: of the sum).
pub const META_NOISE_SCALE: &str = "fedq.noise_scale";
/// Field metadata key (AVG only): noise scale of the count in the denominator.
pub const META_COUNT_NOISE_SCALE: &str = "fedq.count_noise_scale";
/// Field metadata key: 95% confidence half-width. A number for COUNT and SUM; for AVG a
/// JSON array with one entry per row (null where suppressed), from the delta method.
pub const META_CI95: &str = "fedq.ci95_half_width";
/// Field metadata key: ε spent on this column's statistics.
pub const META_EPSILON: &str = "fedq.epsilon";
/// Field metadata key: threshold under which values are suppressed (NULL).
pub const META_SUPPRESSED_BELOW: &str = "fedq.suppressed_below";
/// Schema metadata key: query id.
pub const META_QUERY_ID: &str = "fedq.query_id";
/// Schema metadata key: ε charged for this query.
pub const META_EPSILON_SPENT: &str = "fedq.epsilon_spent";
/// Schema metadata key: ε remaining in the researcher's budget.
pub const META_EPSILON_REMAINING: &str = "fedq.epsilon_remaining";
/// Schema metadata key: comma-separated sites that answered.
pub const META_SITES_ANSWERED: &str = "fedq.sites_answered";
/// Schema metadata key: comma-separated sites asked.
pub const META_SITES_ASKED: &str = "fedq.sites_asked";
/// Schema metadata: `"true"` when the answer is a free replay of an earlier identical query.
pub const META_REPLAY: &str = "fedq.replay";
/// Schema metadata: query id of the charged original of a replay.
pub const META_REPLAY_OF: &str = "fedq.replay_of";
/// Schema metadata: canonical plan hash (the replay key, also in the audit log).
pub const META_PLAN_HASH: &str = "fedq.plan_hash";

/// Mechanism name of quantile columns (field metadata [`META_MECHANISM`]).
pub const QUANTILE_MECHANISM: &str = "exponential_mechanism (OpenDP noisy max, permute-and-flip)";
/// Field metadata key (quantiles): the quantile α in [0, 1].
pub const META_QUANTILE: &str = "fedq.quantile";
/// Field metadata key (quantiles): number of public candidates.
pub const META_CANDIDATES: &str = "fedq.candidates";
/// Field metadata key (quantiles): largest gap between neighbouring candidates, in the
/// column's units (the released value is always a candidate).
pub const META_GRID_STEP: &str = "fedq.grid_step";
/// Field metadata key (quantiles): with probability ≥ 95% the released candidate's rank is
/// within this many rows of the best candidate's (the noise part of the error; see
/// `quantile`). A rank error, not a value error: there is no value half-width.
pub const META_RANK_ERROR95: &str = "fedq.rank_error95";

/// Field metadata key (VAR/STDDEV): noise scale of the centred sum.
pub const META_SUM_NOISE_SCALE: &str = "fedq.sum_noise_scale";
/// Name of the column added to every result when small-cell suppression is on: NULL where
/// nothing in the row was suppressed, else e.g. `n, mean_age: noisy count below 11`.
pub const SUPPRESSED_COLUMN: &str = "fedq_suppressed";
/// Schema metadata: noisy number of participants whose rows bounding truncated (each
/// counted once per site), never below 0.
pub const META_TRUNCATED: &str = "fedq.truncated_participants";
/// Schema metadata: 95% half-width of [`META_TRUNCATED`].
pub const META_TRUNCATED_CI95: &str = "fedq.truncated_participants_ci95";
/// Schema metadata: R, the rows per participant kept by bounding.
pub const META_MAX_ROWS: &str = "fedq.max_rows_per_unit";
/// Schema metadata (partition selection): a group is released only if its noisy number of
/// participants is at least this.
pub const META_SELECTION_THRESHOLD: &str = "fedq.selection_threshold";
/// Schema metadata: δ charged for this query (partition selection; absent when 0).
pub const META_DELTA_SPENT: &str = "fedq.delta_spent";

/// Columns with this prefix ride through post-processing and are removed at the end.
const HIDDEN_PREFIX: &str = "__fedq_";
/// Hidden per-row 95% half-widths of output j.
const HIDDEN_CI: &str = "__fedq_hw_";
/// Hidden per-row suppression flags of output j.
const HIDDEN_SUP: &str = "__fedq_sup_";

/// Per-aggregate metadata computed while noising.
struct AggMeta {
    fields: HashMap<String, String>,
    per_row_ci: bool,
}

/// The released result.
#[derive(Debug, Clone)]
pub struct Released {
    /// Schema with fedq metadata.
    pub schema: SchemaRef,
    /// Result batches.
    pub batches: Vec<RecordBatch>,
}

fn all_keys(q: &PlannedQuery) -> Vec<Vec<PublicValue>> {
    let mut keys: Vec<Vec<PublicValue>> = vec![vec![]];
    for g in &q.groups {
        let mut next = Vec::with_capacity(keys.len() * g.domain.len());
        for k in &keys {
            for v in &g.domain {
                let mut k2 = k.clone();
                k2.push(v.clone());
                next.push(k2);
            }
        }
        keys = next;
    }
    keys
}

/// The groups that pass partition selection: observed key combinations, merged over sites,
/// thresholded on a noisy participant count (see [`crate::selection`]).
fn selected_keys(
    q: &PlannedQuery,
    sel: &crate::selection::PartitionSelection,
    merged: &MergedPartials,
) -> Result<Vec<Vec<PublicValue>>, CoordinatorError> {
    let observed: Vec<&Vec<PublicValue>> = merged.groups.keys().collect();
    let mut counts = HashMap::with_capacity(observed.len());
    for (i, (_, partials)) in merged.groups.iter().enumerate() {
        let i = u32::try_from(i)
            .map_err(|_| CoordinatorError::internal(&q.query_id, "too many observed groups"))?;
        let c = partials
            .get(sel.partial)
            .and_then(|c| i64::try_from(*c).ok())
            .ok_or_else(|| {
                CoordinatorError::internal(&q.query_id, "participant count out of range")
            })?;
        counts.insert(i, c);
    }
    Ok(sel
        .select(&counts)?
        .into_iter()
        .map(|i| observed[i as usize].clone())
        .collect())
}

fn fmt_num(x: f64) -> String {
    format!("{x}")
}

/// Add noise to the exact partials and run post-processing. `schema_meta` is added to the
/// result schema (ε spent and remaining, sites). Call only after the budget was charged.
pub async fn release(
    q: &PlannedQuery,
    merged: &MergedPartials,
    min_reported_count: u64,
    schema_meta: HashMap<String, String>,
) -> Result<Released, CoordinatorError> {
    let qid = &q.query_id;
    // Every group of the public domain, or only those that pass partition selection.
    let keys = match &q.selection {
        None => all_keys(q),
        Some(sel) => selected_keys(q, sel, merged)?,
    };
    let n_partials = q.request.aggregates.len();
    let exact: Vec<Vec<i128>> = keys.iter().map(|k| merged.get(k, n_partials)).collect();

    // 1. Noisy statistics, one vector per statistic over all groups: discrete Laplace, or
    //    for a quantile the index of the candidate the exponential mechanism selects.
    let mut mechs: Vec<Option<DiscreteLaplace>> = Vec::new();
    // Per quantile statistic: its noise scale and 95% rank error. (OpenDP measurements are
    // not `Send`, so none is kept across the post-processing's await.)
    let mut quantile_mechs: HashMap<usize, (f64, f64)> = HashMap::new();
    let mut noisy: Vec<Vec<i128>> = Vec::new();
    for (i, st) in q.statistics.iter().enumerate() {
        if let StatisticKind::Quantile {
            partial,
            alpha_num,
            alpha_den,
        } = &st.kind
        {
            let Some(AggregateRequest::QuantileHistogram {
                lower,
                upper,
                precision,
                candidates,
                ..
            }) = q.request.aggregates.get(*partial)
            else {
                return Err(CoordinatorError::internal(
                    qid,
                    "quantile without histogram",
                ));
            };
            let grid = QuantileGrid::for_bounds(*lower, *upper, *precision, *candidates)
                .map_err(|e| CoordinatorError::internal(qid, e.to_string()))?;
            let m = QuantileMechanism::new(st.sensitivity, &st.epsilon, grid.len(), *alpha_den)
                .map_err(|e| CoordinatorError::internal(qid, e))?;
            let mut v = Vec::with_capacity(keys.len());
            for k in &keys {
                let bins = merged.histogram(k, *partial, grid.bins());
                let idx = m.select(&quantile::scores(&bins, *alpha_num, *alpha_den))?;
                v.push(idx as i128);
            }
            noisy.push(v);
            mechs.push(None);
            quantile_mechs.insert(i, (m.scale(), m.rank_half_width(0.05)));
            continue;
        }
        let m = DiscreteLaplace::new(st.sensitivity, &st.epsilon)
            .map_err(|e| CoordinatorError::internal(qid, e))?;
        let mut v = Vec::with_capacity(keys.len());
        for p in &exact {
            let x = match &st.kind {
                StatisticKind::Count { partial }
                | StatisticKind::Sum { partial, .. }
                | StatisticKind::SumSquares { partial, .. } => p[*partial],
                StatisticKind::CentredSum {
                    sum, count, mid_fp, ..
                } => p[*sum] - mid_fp * p[*count],
                // Selected by the exponential mechanism above, never Laplace-noised.
                StatisticKind::Quantile { .. } => {
                    return Err(CoordinatorError::internal(
                        qid,
                        "a quantile statistic reached the Laplace path",
                    ))
                }
            };
            v.push(m.release(x)?);
        }
        noisy.push(v);
        mechs.push(Some(m));
    }
    let lap = |i: usize| -> Result<&DiscreteLaplace, CoordinatorError> {
        mechs
            .get(i)
            .and_then(Option::as_ref)
            .ok_or_else(|| CoordinatorError::internal(qid, "statistic without Laplace noise"))
    };

    // 2-3. Aggregates from noisy statistics, with suppression decided on noisy counts only.
    let threshold = min_reported_count as i128;
    let below = |c: i128| threshold > 0 && c < threshold;
    // The group's row count, if released, suppresses everything in a small group.
    let group_count = q.statistics.iter().position(|st| match st.kind {
        StatisticKind::Count { partial } => {
            q.request.aggregates.get(partial) == Some(&AggregateRequest::CountRows)
        }
        _ => false,
    });
    let suppressed: Vec<Vec<bool>> = q
        .outputs
        .iter()
        .map(|out| {
            (0..keys.len())
                .map(|g| {
                    out.count_stat()
                        .into_iter()
                        .chain(group_count)
                        .any(|s| below(noisy[s][g]))
                })
                .collect()
        })
        .collect();
    let agg_fields = &q.aggregate_schema;
    let nk = q.groups.len();
    let mut columns: Vec<ArrayRef> = Vec::new();
    let mut fields: Vec<Field> = Vec::new();
    for i in 0..nk {
        let ty = agg_fields.field(i).data_type().clone();
        let vals: Vec<ScalarValue> = keys.iter().map(|k| public_scalar(&k[i], &ty)).collect();
        // Partition selection may release no group at all.
        let arr = if vals.is_empty() {
            datafusion::arrow::array::new_empty_array(&ty)
        } else {
            ScalarValue::iter_to_array(vals)
                .map_err(|e| CoordinatorError::internal(qid, e.to_string()))?
        };
        let arr = cast(&arr, &ty).map_err(|e| CoordinatorError::internal(qid, e.to_string()))?;
        fields.push(Field::new(format!("c{i}"), ty, true));
        columns.push(arr);
    }
    let eps_of = |stats: &[usize]| -> f64 {
        stats
            .iter()
            .map(|s| q.statistics[*s].epsilon.to_f64().value())
            .sum()
    };
    let mut metas: Vec<AggMeta> = Vec::new();
    let mut hidden: Vec<(String, ArrayRef)> = Vec::new();
    for (j, out) in q.outputs.iter().enumerate() {
        let field = agg_fields.field(nk + j);
        let sup = &suppressed[j];
        let mut meta = HashMap::new();
        meta.insert(META_MECHANISM.to_string(), "discrete_laplace".to_string());
        if threshold > 0 {
            meta.insert(META_SUPPRESSED_BELOW.to_string(), threshold.to_string());
        }
        meta.insert(META_EPSILON.into(), fmt_num(eps_of(&out.stats())));
        let mut per_row_ci = false;
        let arr: ArrayRef = match out {
            AggregateOutput::Count { stat } => {
                let m = lap(*stat)?;
                meta.insert(META_STATISTIC.into(), "count".into());
                meta.insert(META_NOISE_SCALE.into(), fmt_num(m.scale()));
                meta.insert(META_CI95.into(), fmt_num(m.half_width(0.05)));
                let v: Int64Array = noisy[*stat]
                    .iter()
                    .zip(sup)
                    .map(|(&c, &s)| (!s).then(|| c.clamp(0, i64::MAX as i128) as i64))
                    .collect();
                Arc::new(v)
            }
            AggregateOutput::Sum {
                stat,
                bounds,
                count_stat,
            } => {
                let m = lap(*stat)?;
                let prec = bounds.precision;
                // Post-processing: a sum of values clamped into [lower, upper] cannot have
                // the opposite sign of both bounds.
                let (lo_sum, hi_sum) = (
                    if bounds.lower >= 0.0 {
                        0.0
                    } else {
                        f64::NEG_INFINITY
                    },
                    if bounds.upper <= 0.0 {
                        0.0
                    } else {
                        f64::INFINITY
                    },
                );
                meta.insert(META_STATISTIC.into(), "sum".into());
                meta.insert(META_NOISE_SCALE.into(), fmt_num(m.scale() * prec));
                meta.insert(META_CI95.into(), fmt_num(m.half_width(0.05) * prec));
                if let Some(c) = count_stat {
                    meta.insert(META_COUNT_NOISE_SCALE.into(), fmt_num(lap(*c)?.scale()));
                }
                let v: Float64Array = noisy[*stat]
                    .iter()
                    .zip(sup)
                    .map(|(&s, &x)| (!x).then(|| (s as f64 * prec).clamp(lo_sum, hi_sum)))
                    .collect();
                Arc::new(v)
            }
            AggregateOutput::Avg {
                sum_stat,
                count_stat,
                bounds,
                mid_fp,
            } => {
                per_row_ci = true;
                let ms = lap(*sum_stat)?;
                let mc = lap(*count_stat)?;
                let prec = bounds.precision;
                meta.insert(META_STATISTIC.into(), "avg".into());
                meta.insert(META_NOISE_SCALE.into(), fmt_num(ms.scale() * prec));
                meta.insert(META_COUNT_NOISE_SCALE.into(), fmt_num(mc.scale()));
                let mut vals = Vec::with_capacity(keys.len());
                let mut hws = Vec::with_capacity(keys.len());
                for ((s, c), x) in noisy[*sum_stat].iter().zip(&noisy[*count_stat]).zip(sup) {
                    let v = if *x {
                        None
                    } else {
                        avg_value(*s, *c, *mid_fp, bounds)
                    };
                    let hw = v.map(|_| {
                        avg_ci95(
                            ms.scale() * prec,
                            mc.scale(),
                            *s as f64 * prec / *c as f64,
                            *c as f64,
                        )
                    });
                    vals.push(v);
                    hws.push(hw);
                }
                hidden.push((format!("{HIDDEN_CI}{j}"), Arc::new(Float64Array::from(hws))));
                Arc::new(Float64Array::from(vals))
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
                per_row_ci = true;
                let (mq, ms, mc) = (lap(*sq_stat)?, lap(*sum_stat)?, lap(*count_stat)?);
                let prec = bounds.precision;
                let shape = VarianceShape {
                    half: *half_fp as f64 * prec,
                    precision: prec,
                    sample: *sample,
                    sqrt: *sqrt,
                };
                meta.insert(
                    META_STATISTIC.into(),
                    if *sqrt { "stddev" } else { "var" }.into(),
                );
                meta.insert(META_NOISE_SCALE.into(), fmt_num(mq.scale() * prec * prec));
                meta.insert(META_SUM_NOISE_SCALE.into(), fmt_num(ms.scale() * prec));
                meta.insert(META_COUNT_NOISE_SCALE.into(), fmt_num(mc.scale()));
                let mut vals = Vec::with_capacity(keys.len());
                let mut hws = Vec::with_capacity(keys.len());
                for (g, x) in sup.iter().enumerate() {
                    let (n, s, sq) = (
                        noisy[*count_stat][g],
                        noisy[*sum_stat][g],
                        noisy[*sq_stat][g],
                    );
                    let v = if *x { None } else { shape.value(n, s, sq) };
                    let hw = v.map(|v| {
                        shape.ci95(
                            v,
                            mq.scale() * prec * prec,
                            ms.scale() * prec,
                            mc.scale(),
                            n,
                            s,
                            sq,
                        )
                    });
                    vals.push(v);
                    hws.push(hw);
                }
                hidden.push((format!("{HIDDEN_CI}{j}"), Arc::new(Float64Array::from(hws))));
                Arc::new(Float64Array::from(vals))
            }
            AggregateOutput::Quantile {
                stat,
                bounds,
                grid,
                alpha,
            } => {
                let &(scale, rank95) = quantile_mechs
                    .get(stat)
                    .ok_or_else(|| CoordinatorError::internal(qid, "quantile without mechanism"))?;
                let prec = bounds.precision;
                meta.insert(META_MECHANISM.into(), QUANTILE_MECHANISM.into());
                meta.insert(META_STATISTIC.into(), "quantile".into());
                meta.insert(META_QUANTILE.into(), fmt_num(*alpha));
                meta.insert(META_NOISE_SCALE.into(), fmt_num(scale));
                meta.insert(META_CANDIDATES.into(), grid.len().to_string());
                meta.insert(
                    META_GRID_STEP.into(),
                    fmt_num(grid.max_step() as f64 * prec),
                );
                meta.insert(META_RANK_ERROR95.into(), fmt_num(rank95.ceil()));
                let v: Float64Array = noisy[*stat]
                    .iter()
                    .zip(sup)
                    .map(|(&idx, &x)| {
                        (!x).then(|| {
                            (grid.candidate(idx as usize) as f64 * prec)
                                .clamp(bounds.lower, bounds.upper)
                        })
                    })
                    .collect();
                Arc::new(v)
            }
        };
        if threshold > 0 {
            hidden.push((
                format!("{HIDDEN_SUP}{j}"),
                Arc::new(BooleanArray::from(sup.clone())),
            ));
        }
        let ty = field.data_type().clone();
        let arr = cast(&arr, &ty).map_err(|e| CoordinatorError::internal(qid, e.to_string()))?;
        fields.push(Field::new(format!("c{}", nk + j), ty, true));
        columns.push(arr);
        metas.push(AggMeta {
            fields: meta,
            per_row_ci,
        });
    }
    for (name, arr) in &hidden {
        fields.push(Field::new(name, arr.data_type().clone(), true));
        columns.push(arr.clone());
    }
    let noisy_schema = Arc::new(Schema::new(fields));
    let noisy_batch = RecordBatch::try_new(noisy_schema.clone(), columns)
        .map_err(|e| CoordinatorError::internal(qid, e.to_string()))?;

    // 4. Replace the Aggregate with the noisy table and run the post-processing.
    let table = MemTable::try_new(noisy_schema.clone(), vec![vec![noisy_batch]])
        .map_err(|e| CoordinatorError::internal(qid, e.to_string()))?;
    let scan = LogicalPlanBuilder::scan("__fedq_noisy", provider_as_source(Arc::new(table)), None)
        .and_then(|b| {
            let mut exprs = Vec::new();
            for (i, (qual, f)) in agg_fields.iter().enumerate() {
                exprs.push(
                    Expr::Column(Column::new(Some("__fedq_noisy"), format!("c{i}")))
                        .alias_qualified(qual.cloned(), f.name()),
                );
            }
            for (name, _) in &hidden {
                let name = name.clone();
                exprs.push(
                    Expr::Column(Column::new(Some("__fedq_noisy"), name.clone())).alias(name),
                );
            }
            b.project(exprs)
        })
        .and_then(|b| b.build())
        .map_err(|e| CoordinatorError::internal(qid, e.to_string()))?;
    let plan = replace_aggregate(&q.plan, &scan)
        .map_err(|e| CoordinatorError::internal(qid, e.to_string()))?;
    // Post-processing reads only the noisy table and the query, so its errors (a division
    // by a noisy zero, an overflow) are functions of released values: the engine charges
    // and stores them like an answer.
    let post = |e: datafusion::error::DataFusionError| CoordinatorError::PostProcessing {
        query_id: qid.clone(),
        message: e.to_string(),
        charge: String::new(),
    };
    let df = POST_PROCESSING
        .execute_logical_plan(plan)
        .await
        .map_err(post)?;
    let out_batches = df.collect().await.map_err(post)?;

    // 5. Metadata, the suppression flag column, and removal of the hidden columns.
    let n_aggs = agg_fields.fields().len() - nk;
    let top = top_projection_mapping(&q.plan, n_aggs, nk);
    let out_schema = match out_batches.first() {
        Some(b) => b.schema(),
        None => Arc::new(q.plan.schema().as_arrow().clone()),
    };
    let mut keep = Vec::new();
    let mut final_fields = Vec::new();
    let visible = q.plan.schema().fields().len();
    for (i, f) in out_schema.fields().iter().enumerate() {
        if i >= visible || f.name().starts_with(HIDDEN_PREFIX) {
            continue;
        }
        keep.push(i);
        let mut f = f.as_ref().clone().with_nullable(true);
        if let Some(Some(j)) = top.get(i) {
            let m = &metas[*j];
            let mut md = m.fields.clone();
            if m.per_row_ci {
                let hidden_name = format!("{HIDDEN_CI}{j}");
                let mut per_row: Vec<Option<f64>> = Vec::new();
                for b in &out_batches {
                    if let Some(col) = b.column_by_name(&hidden_name) {
                        if let Some(a) = col.as_any().downcast_ref::<Float64Array>() {
                            per_row.extend(a.iter());
                        }
                    }
                }
                md.insert(
                    META_CI95.into(),
                    serde_json::to_string(&per_row).unwrap_or_else(|_| "[]".into()),
                );
            }
            f = f.with_metadata(md);
        }
        final_fields.push(f);
    }
    if threshold > 0 {
        let mut md = HashMap::new();
        md.insert(META_SUPPRESSED_BELOW.to_string(), threshold.to_string());
        final_fields.push(Field::new(SUPPRESSED_COLUMN, DataType::Utf8, true).with_metadata(md));
    }
    let mut schema_meta = schema_meta;
    // The bounding report, with its own share of ε (already charged).
    schema_meta.insert(META_MAX_ROWS.into(), q.max_rows_per_unit.to_string());
    if let Some(sel) = &q.selection {
        schema_meta.insert(META_SELECTION_THRESHOLD.into(), sel.threshold.to_string());
        schema_meta.insert(META_DELTA_SPENT.into(), q.delta.to_string());
    }
    if let Some(t) = merged.truncated_units {
        let m = DiscreteLaplace::new(q.truncation.sensitivity, &q.truncation.epsilon)
            .map_err(|e| CoordinatorError::internal(qid, e))?;
        let noisy = m.release(t)?.max(0);
        schema_meta.insert(META_TRUNCATED.into(), noisy.to_string());
        schema_meta.insert(META_TRUNCATED_CI95.into(), fmt_num(m.half_width(0.05)));
    }
    let final_schema = Arc::new(Schema::new_with_metadata(final_fields, schema_meta));
    let mut batches = Vec::with_capacity(out_batches.len());
    for b in out_batches {
        let mut cols: Vec<ArrayRef> = keep.iter().map(|&i| b.column(i).clone()).collect();
        if threshold > 0 {
            cols.push(suppression_reasons(
                &b, &keep, &top, agg_fields, nk, threshold,
            ));
        }
        batches.push(
            RecordBatch::try_new(final_schema.clone(), cols)
                .map_err(|e| CoordinatorError::internal(qid, e.to_string()))?,
        );
    }
    Ok(Released {
        schema: final_schema,
        batches,
    })
}

/// The `fedq_suppressed` column of one output batch: NULL where nothing was suppressed,
/// else which columns are NULL because a noisy count fell below the threshold.
fn suppression_reasons(
    b: &RecordBatch,
    keep: &[usize],
    top: &[Option<usize>],
    agg_fields: &datafusion::common::DFSchemaRef,
    nk: usize,
    threshold: i128,
) -> ArrayRef {
    let n_aggs = agg_fields.fields().len() - nk;
    let flags: Vec<Option<&BooleanArray>> = (0..n_aggs)
        .map(|j| {
            b.column_by_name(&format!("{HIDDEN_SUP}{j}"))
                .and_then(|c| c.as_any().downcast_ref::<BooleanArray>())
        })
        .collect();
    let schema = b.schema();
    let reasons: StringArray = (0..b.num_rows())
        .map(|row| {
            let is_sup = |j: usize| {
                flags[j]
                    .map(|a| a.is_valid(row) && a.value(row))
                    .unwrap_or(false)
            };
            let mut names: Vec<String> = keep
                .iter()
                .filter(|&&i| matches!(top.get(i), Some(Some(j)) if is_sup(*j)))
                .map(|&i| schema.field(i).name().clone())
                .collect();
            if names.is_empty() {
                // A suppressed aggregate shown only through an expression (or HAVING).
                names = (0..n_aggs)
                    .filter(|&j| is_sup(j))
                    .map(|j| agg_fields.field(nk + j).name().clone())
                    .collect();
            }
            (!names.is_empty())
                .then(|| format!("{}: noisy count below {threshold}", names.join(", ")))
        })
        .collect();
    Arc::new(reasons)
}

/// AVG from a noisy centred sum `s` and noisy count `c` (fixed-point units): mid + s/c,
/// clamped into the bounds; `None` when the count is not positive.
pub fn avg_value(s: i128, c: i128, mid_fp: i128, bounds: &Bounds) -> Option<f64> {
    if c <= 0 {
        return None;
    }
    let prec = bounds.precision;
    let centred_mean = s as f64 * prec / c as f64;
    Some((mid_fp as f64 * prec + centred_mean).clamp(bounds.lower, bounds.upper))
}

/// 95% half-width of an AVG by the delta method: Var(S/C) ≈ (Var S + m² Var C) / C², with
/// Laplace variance 2b² (`b_sum` in value units, `centred_mean` = avg − mid).
pub fn avg_ci95(b_sum: f64, b_count: f64, centred_mean: f64, count: f64) -> f64 {
    let var_s = 2.0 * b_sum * b_sum;
    let var_c = 2.0 * b_count * b_count;
    Z95 * ((var_s + centred_mean * centred_mean * var_c) / (count * count)).sqrt()
}

/// 97.5% quantile of the standard normal.
pub const Z95: f64 = 1.959964;

/// How a VAR/STDDEV output is computed from its noisy statistics.
#[derive(Debug, Clone, Copy)]
pub struct VarianceShape {
    /// Half-width of the bounds around the fixed-point midpoint, in value units.
    pub half: f64,
    /// Fixed-point step.
    pub precision: f64,
    /// `VAR_SAMP`/`STDDEV_SAMP` (divide by N − 1) rather than the population version.
    pub sample: bool,
    /// STDDEV rather than VAR.
    pub sqrt: bool,
}

impl VarianceShape {
    /// The released value from noisy count `n`, centred sum `s` and centred sum of squares
    /// `sq` (fixed-point units): V_pop = q − m² with m = s·p/n, q = sq·p²/n; V_samp =
    /// V_pop·n/(n − 1); clamped into [0, half²·k] (k = n/(n−1) or 1), the largest possible
    /// variance of values in the bounds; STDDEV = √V. `None` when n is too small (< 1, or
    /// < 2 for the sample versions).
    pub fn value(&self, n: i128, s: i128, sq: i128) -> Option<f64> {
        let min_n = if self.sample { 2 } else { 1 };
        if n < min_n {
            return None;
        }
        let nf = n as f64;
        let p = self.precision;
        let m = s as f64 * p / nf;
        let q = sq as f64 * p * p / nf;
        let k = if self.sample { nf / (nf - 1.0) } else { 1.0 };
        let v = ((q - m * m) * k).clamp(0.0, self.half * self.half * k);
        Some(if self.sqrt { v.sqrt() } else { v })
    }

    /// Delta-method 95% half-width: Var(V̂) ≈ k²[2b_Q² + 4m²·2b_S² + (q − 2m²)²·2b_N²]/N²
    /// (scales in value units), and for STDDEV divided by 2·sd.
    #[allow(clippy::too_many_arguments)]
    pub fn ci95(
        &self,
        released: f64,
        b_sq: f64,
        b_sum: f64,
        b_count: f64,
        n: i128,
        s: i128,
        sq: i128,
    ) -> f64 {
        let nf = n as f64;
        let p = self.precision;
        let m = s as f64 * p / nf;
        let q = sq as f64 * p * p / nf;
        let k = if self.sample { nf / (nf - 1.0) } else { 1.0 };
        let d_n = q - 2.0 * m * m;
        let var = k
            * k
            * (2.0 * b_sq * b_sq
                + 4.0 * m * m * 2.0 * b_sum * b_sum
                + d_n * d_n * 2.0 * b_count * b_count)
            / (nf * nf);
        let hw_var = Z95 * var.sqrt();
        if !self.sqrt {
            hw_var
        } else if released > 0.0 {
            hw_var / (2.0 * released)
        } else {
            hw_var.sqrt()
        }
    }
}

/// Rebuild `plan` with its (single) Aggregate replaced by `replacement`; projections above
/// it pass the hidden per-row confidence columns through.
fn replace_aggregate(
    plan: &LogicalPlan,
    replacement: &LogicalPlan,
) -> datafusion::error::Result<LogicalPlan> {
    if let LogicalPlan::Aggregate(_) = plan {
        return Ok(replacement.clone());
    }
    let inputs: Vec<LogicalPlan> = plan
        .inputs()
        .into_iter()
        .map(|p| replace_aggregate(p, replacement))
        .collect::<datafusion::error::Result<_>>()?;
    if let LogicalPlan::Projection(p) = plan {
        let [input] = inputs.as_slice() else {
            return plan.with_new_exprs(plan.expressions(), inputs);
        };
        let mut exprs = p.expr.clone();
        for (qual, f) in input.schema().iter() {
            if f.name().starts_with(HIDDEN_PREFIX)
                && !exprs
                    .iter()
                    .any(|e| e.schema_name().to_string() == *f.name())
            {
                exprs.push(Expr::Column(Column::new(qual.cloned(), f.name())));
            }
        }
        return Ok(LogicalPlan::Projection(Projection::try_new(
            exprs,
            Arc::new(input.clone()),
        )?));
    }
    plan.with_new_exprs(plan.expressions(), inputs)?
        .recompute_schema()
}

/// For each output column of the plan, the index of the aggregate it shows unchanged (a
/// column reference, possibly aliased), if any.
pub(crate) fn top_projection_mapping(
    plan: &LogicalPlan,
    n_aggs: usize,
    nk: usize,
) -> Vec<Option<usize>> {
    let mut p = plan;
    loop {
        match p {
            LogicalPlan::Projection(proj) => {
                return proj
                    .expr
                    .iter()
                    .map(|e| match strip_alias(e) {
                        Expr::Column(c) => {
                            resolve_column(&proj.input, c, nk).filter(|j| *j < n_aggs)
                        }
                        _ => None,
                    })
                    .collect();
            }
            LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::Distinct(_)
            | LogicalPlan::SubqueryAlias(_) => match p.inputs().first() {
                Some(i) => p = i,
                None => return vec![],
            },
            _ => return vec![],
        }
    }
}

/// Follow a column reference down to the aggregate output it names.
fn resolve_column(plan: &LogicalPlan, c: &Column, nk: usize) -> Option<usize> {
    match plan {
        LogicalPlan::Aggregate(a) => {
            let idx = a.schema.index_of_column(c).ok()?;
            idx.checked_sub(nk)
        }
        LogicalPlan::Projection(p) => {
            let idx = p.schema.index_of_column(c).ok()?;
            match strip_alias(p.expr.get(idx)?) {
                Expr::Column(inner) => resolve_column(&p.input, inner, nk),
                _ => None,
            }
        }
        LogicalPlan::Filter(_)
        | LogicalPlan::Sort(_)
        | LogicalPlan::Limit(_)
        | LogicalPlan::Distinct(_) => resolve_column(plan.inputs().first()?, c, nk),
        LogicalPlan::SubqueryAlias(s) => {
            let idx = s.schema.index_of_column(c).ok()?;
            let (q, f) = s.input.schema().qualified_field(idx);
            resolve_column(&s.input, &Column::new(q.cloned(), f.name()), nk)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::Planner;
    use fedq_common::Catalog;
    use std::collections::BTreeMap;

    const CATALOG: &str = r#"
[tables.t]
max_rows_per_unit = 1
columns = [
  { name = "pid", type = "utf8" },
  { name = "g", type = "utf8", public_values = ["big", "small", "mixed"] },
  { name = "x", type = "int64", lower = 0, upper = 100 },
]
"#;

    fn text(b: &RecordBatch, col: &str, row: usize) -> Option<String> {
        let a = b.column(b.schema().index_of(col).unwrap());
        let a = a.as_any().downcast_ref::<StringArray>().unwrap();
        a.is_valid(row).then(|| a.value(row).to_string())
    }

    /// Exact counts are 10⁶ or 0, so with noise scales below 10 the noisy decisions are
    /// certain up to e^{-10⁵}: the test checks the rules, not the noise.
    #[tokio::test]
    async fn suppression_follows_noisy_counts_and_spreads_to_derived_values() {
        let cat = Catalog::from_toml(CATALOG, "test").unwrap();
        let planner = Planner::new(&cat).unwrap().with_min_reported_count(1000);
        let q = planner
            .plan(
                "SELECT g, COUNT(*) AS n, SUM(x) AS s, AVG(x) AS a, VAR_POP(x) AS v FROM t GROUP BY g",
                1.0,
                "q",
            )
            .await
            .unwrap();
        // Partials: CountRows, SumFixed(x), CountNonNull(x), SumSquaresFixed(x).
        let big = 1_000_000i128;
        let mut groups = BTreeMap::new();
        let key = |s: &str| vec![PublicValue::Text(s.into())];
        groups.insert(key("big"), vec![big, 50 * big, big, 100 * big]);
        groups.insert(key("small"), vec![0, 0, 0, 0]);
        // Many rows but (artificially) no values of x: everything about x is suppressed,
        // the row count is not.
        groups.insert(key("mixed"), vec![big, 0, 0, 0]);
        let merged = MergedPartials {
            groups,
            sites_answered: vec!["a".into()],
            truncated_units: Some(0),
            sites_failed: vec![],
            histograms: Default::default(),
        };
        let r = release(&q, &merged, 1000, HashMap::new()).await.unwrap();
        let names: Vec<&str> = r
            .schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(names, vec!["g", "n", "s", "a", "v", SUPPRESSED_COLUMN]);
        let b = &r.batches[0];
        let row = |g: &str| {
            (0..b.num_rows())
                .find(|&i| text(b, "g", i).as_deref() == Some(g))
                .unwrap()
        };
        let (rb, rs, rm) = (row("big"), row("small"), row("mixed"));
        for c in 1..5 {
            assert!(b.column(c).is_valid(rb));
            assert!(b.column(c).is_null(rs));
        }
        assert_eq!(text(b, SUPPRESSED_COLUMN, rb), None);
        assert_eq!(
            text(b, SUPPRESSED_COLUMN, rs).as_deref(),
            Some("n, s, a, v: noisy count below 1000")
        );
        assert!(b.column(1).is_valid(rm));
        assert_eq!(
            text(b, SUPPRESSED_COLUMN, rm).as_deref(),
            Some("s, a, v: noisy count below 1000")
        );
        // Without a threshold: no extra column, nothing NULL but the AVG/VAR of empty groups.
        let q0 = Planner::new(&cat)
            .unwrap()
            .plan("SELECT g, COUNT(*) AS n FROM t GROUP BY g", 1.0, "q")
            .await
            .unwrap();
        let mut m0 = merged.clone();
        for v in m0.groups.values_mut() {
            v.truncate(1);
        }
        let r0 = release(&q0, &m0, 0, HashMap::new()).await.unwrap();
        assert_eq!(r0.schema.fields().len(), 2);
    }

    #[test]
    fn variance_from_centred_statistics_is_exact_before_noise() {
        // Values 1, 2, 3, 4, 10 with mid 5: centred -4, -3, -2, -1, 5.
        let xs = [1.0f64, 2.0, 3.0, 4.0, 10.0];
        let n = xs.len() as i128;
        let s: i128 = xs.iter().map(|x| *x as i128 - 5).sum();
        let sq: i128 = xs.iter().map(|x| (*x as i128 - 5).pow(2)).sum();
        let mean = xs.iter().sum::<f64>() / 5.0;
        let pop = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 5.0;
        let shape = |sample, sqrt| VarianceShape {
            half: 5.0,
            precision: 1.0,
            sample,
            sqrt,
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(shape(false, false).value(n, s, sq).unwrap(), pop));
        assert!(close(
            shape(true, false).value(n, s, sq).unwrap(),
            pop * 5.0 / 4.0
        ));
        assert!(close(
            shape(false, true).value(n, s, sq).unwrap(),
            pop.sqrt()
        ));
        // Clamped into [0, half²·k]; too few values give NULL.
        assert_eq!(shape(false, false).value(5, 0, -100), Some(0.0));
        assert_eq!(shape(false, false).value(1, 0, 1_000), Some(25.0));
        assert_eq!(shape(true, false).value(1, 0, 1), None);
        assert_eq!(shape(false, false).value(0, 0, 1), None);
        // AVG: mid + s/c, clamped.
        let b = Bounds {
            lower: 0.0,
            upper: 10.0,
            precision: 1.0,
        };
        assert_eq!(avg_value(-4, 2, 5, &b), Some(3.0));
        assert_eq!(avg_value(100, 2, 5, &b), Some(10.0));
        assert_eq!(avg_value(1, 0, 5, &b), None);
    }
}
