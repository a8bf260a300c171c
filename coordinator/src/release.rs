//! Noise and post-processing: from exact merged partials to the researcher's Arrow result.
//!
//! 1. Every statistic gets discrete Laplace noise on every group of the public domain
//!    (empty groups included), with scale sensitivity / ε-share.
//! 2. Aggregates are computed from the noisy statistics: counts and sums directly, AVG as
//!    mid + noisy centred sum / noisy count, clamped into the declared bounds.
//! 3. Small-cell suppression: a noisy count below `min_reported_count` becomes NULL, and so
//!    does an AVG whose count is suppressed.
//! 4. The noisy aggregate table replaces the Aggregate node of the researcher's plan, and
//!    DataFusion runs the rest (HAVING, projection, ORDER BY, LIMIT) over noisy values only.
//! 5. Each noisy column carries its noise scale and 95% confidence half-width as Arrow field
//!    metadata; the schema says which sites answered and the ε spent.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{Column, ScalarValue};
use datafusion::datasource::{provider_as_source, MemTable};
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, Projection};
use datafusion::prelude::SessionContext;
use fedq_common::PublicValue;

use crate::error::CoordinatorError;
use crate::fanout::MergedPartials;
use crate::noise::DiscreteLaplace;
use crate::planner::{public_scalar, strip_alias, AggregateOutput, PlannedQuery, StatisticKind};

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

const HIDDEN_PREFIX: &str = "__fedq_hw_";

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
    let keys = all_keys(q);
    let n_partials = q.request.aggregates.len();
    let exact: Vec<Vec<i128>> = keys.iter().map(|k| merged.get(k, n_partials)).collect();

    // 1. Noisy statistics, one vector per statistic over all groups.
    let mut mechs = Vec::new();
    let mut noisy: Vec<Vec<i128>> = Vec::new();
    for st in &q.statistics {
        let m = DiscreteLaplace::new(st.sensitivity, &st.epsilon)
            .map_err(|e| CoordinatorError::internal(qid, e))?;
        let mut v = Vec::with_capacity(keys.len());
        for p in &exact {
            let x = match &st.kind {
                StatisticKind::Count { partial } | StatisticKind::Sum { partial, .. } => {
                    p[*partial]
                }
                StatisticKind::CentredSum {
                    sum, count, mid_fp, ..
                } => p[*sum] - mid_fp * p[*count],
            };
            v.push(m.release(x)?);
        }
        noisy.push(v);
        mechs.push(m);
    }

    // 2-3. Aggregates from noisy statistics, with suppression.
    let threshold = min_reported_count as i128;
    let suppressed = |c: i128| threshold > 0 && c < threshold;
    let agg_fields = &q.aggregate_schema;
    let nk = q.groups.len();
    let mut columns: Vec<ArrayRef> = Vec::new();
    let mut fields: Vec<Field> = Vec::new();
    for (i, g) in q.groups.iter().enumerate() {
        let ty = agg_fields.field(i).data_type().clone();
        let vals: Vec<ScalarValue> = keys.iter().map(|k| public_scalar(&k[i], &ty)).collect();
        let arr = ScalarValue::iter_to_array(vals)
            .map_err(|e| CoordinatorError::internal(qid, e.to_string()))?;
        let arr = cast(&arr, &ty).map_err(|e| CoordinatorError::internal(qid, e.to_string()))?;
        fields.push(Field::new(format!("c{i}"), ty, true));
        columns.push(arr);
        let _ = g;
    }
    let mut metas: Vec<AggMeta> = Vec::new();
    let mut hidden: Vec<(usize, ArrayRef)> = Vec::new();
    for (j, out) in q.outputs.iter().enumerate() {
        let field = agg_fields.field(nk + j);
        let mut meta = HashMap::new();
        meta.insert(META_MECHANISM.to_string(), "discrete_laplace".to_string());
        if threshold > 0 {
            meta.insert(META_SUPPRESSED_BELOW.to_string(), threshold.to_string());
        }
        let mut per_row_ci = false;
        let arr: ArrayRef = match out {
            AggregateOutput::Count { stat } => {
                let m = &mechs[*stat];
                meta.insert(META_STATISTIC.into(), "count".into());
                meta.insert(META_NOISE_SCALE.into(), fmt_num(m.scale()));
                meta.insert(META_CI95.into(), fmt_num(m.half_width(0.05)));
                meta.insert(
                    META_EPSILON.into(),
                    fmt_num(q.statistics[*stat].epsilon.to_f64().value()),
                );
                let v: Int64Array = noisy[*stat]
                    .iter()
                    .map(|&c| {
                        if suppressed(c) {
                            None
                        } else {
                            Some(c.clamp(0, i64::MAX as i128) as i64)
                        }
                    })
                    .collect();
                Arc::new(v)
            }
            AggregateOutput::Sum { stat, bounds } => {
                let m = &mechs[*stat];
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
                meta.insert(
                    META_EPSILON.into(),
                    fmt_num(q.statistics[*stat].epsilon.to_f64().value()),
                );
                let v: Float64Array = noisy[*stat]
                    .iter()
                    .map(|&s| Some((s as f64 * prec).clamp(lo_sum, hi_sum)))
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
                let ms = &mechs[*sum_stat];
                let mc = &mechs[*count_stat];
                let prec = bounds.precision;
                meta.insert(META_STATISTIC.into(), "avg".into());
                meta.insert(META_NOISE_SCALE.into(), fmt_num(ms.scale() * prec));
                meta.insert(META_COUNT_NOISE_SCALE.into(), fmt_num(mc.scale()));
                let eps = q.statistics[*sum_stat].epsilon.to_f64().value()
                    + q.statistics[*count_stat].epsilon.to_f64().value();
                meta.insert(META_EPSILON.into(), fmt_num(eps));
                let mid = *mid_fp as f64 * prec;
                let mut vals = Vec::with_capacity(keys.len());
                let mut hws = Vec::with_capacity(keys.len());
                for (s, c) in noisy[*sum_stat].iter().zip(&noisy[*count_stat]) {
                    if suppressed(*c) || *c <= 0 {
                        vals.push(None);
                        hws.push(None);
                        continue;
                    }
                    let cf = *c as f64;
                    let centred_mean = *s as f64 * prec / cf;
                    let avg = (mid + centred_mean).clamp(bounds.lower, bounds.upper);
                    // Delta method: Var(S/C) ≈ (Var S + m² Var C) / C², Var Laplace = 2b².
                    let var_s = 2.0 * (ms.scale() * prec).powi(2);
                    let var_c = 2.0 * mc.scale().powi(2);
                    let sd = ((var_s + centred_mean.powi(2) * var_c) / (cf * cf)).sqrt();
                    vals.push(Some(avg));
                    hws.push(Some(1.959964 * sd));
                }
                hidden.push((j, Arc::new(Float64Array::from(hws))));
                Arc::new(Float64Array::from(vals))
            }
        };
        let ty = field.data_type().clone();
        let arr = cast(&arr, &ty).map_err(|e| CoordinatorError::internal(qid, e.to_string()))?;
        fields.push(Field::new(format!("c{}", nk + j), ty, true));
        columns.push(arr);
        metas.push(AggMeta {
            fields: meta,
            per_row_ci,
        });
    }
    for (j, arr) in &hidden {
        fields.push(Field::new(
            format!("{HIDDEN_PREFIX}{j}"),
            DataType::Float64,
            true,
        ));
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
            for (j, _) in &hidden {
                let name = format!("{HIDDEN_PREFIX}{j}");
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
    let ctx = SessionContext::new();
    let df = ctx
        .execute_logical_plan(plan)
        .await
        .map_err(|e| CoordinatorError::internal(qid, e.to_string()))?;
    let out_batches = df
        .collect()
        .await
        .map_err(|e| CoordinatorError::internal(qid, e.to_string()))?;

    // 5. Metadata, and removal of the hidden columns.
    let top = top_projection_mapping(&q.plan, agg_fields.fields().len() - nk, nk);
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
                let hidden_name = format!("{HIDDEN_PREFIX}{j}");
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
    let final_schema = Arc::new(Schema::new_with_metadata(final_fields, schema_meta));
    let mut batches = Vec::with_capacity(out_batches.len());
    for b in out_batches {
        let cols: Vec<ArrayRef> = keep.iter().map(|&i| b.column(i).clone()).collect();
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
fn top_projection_mapping(plan: &LogicalPlan, n_aggs: usize, nk: usize) -> Vec<Option<usize>> {
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
