//! Per-participant derived tables at the node (`fedq_common::derived`): declared from the
//! source table's catalog entry, checked against this node's policy for it, and built as a
//! DataFusion aggregate grouped by the participant over this site's rows only.

use datafusion::arrow::datatypes::DataType;
use datafusion::dataframe::DataFrame;
use datafusion::functions_aggregate::expr_fn::{
    avg, bool_and, bool_or, count, count_distinct, first_value, max, median, min, stddev,
    stddev_pop, sum, var_pop, var_sample,
};
use datafusion::functions_aggregate::nth_value::nth_value;
use datafusion::logical_expr::{cast, ident, lit, when, Expr, ExprFunctionExt};
use fedq_common::derived::{PerParticipant, UnitAggregate};
use fedq_common::{Catalog, Side, TableSpec};

use crate::config::TablePolicy;
use crate::engine::{shown, NodeEngine};
use crate::error::NodeError;
use crate::filter::{self, Relation, Scope};
use crate::sets::{self, SetNames};

/// The derived table as the request sees it: its catalog declaration, and the node's
/// policy carried over from its source columns (a MIN or MAX of a column is shared if the
/// column is, and keeps its clamp; the row count is always shared).
pub(crate) struct DerivedView {
    pub spec: TableSpec,
    pub policy: TablePolicy,
}

/// Check a derived table against the catalog and the node's policy for its source table.
pub(crate) fn view(
    d: &PerParticipant,
    catalog: &Catalog,
    source: &TablePolicy,
) -> Result<DerivedView, NodeError> {
    let spec = d.spec(catalog).map_err(|e| NodeError::Refused(e.0))?;
    let mut columns = std::collections::BTreeSet::new();
    let mut clamp = std::collections::BTreeMap::new();
    let source_r = catalog
        .table(&d.table)
        .map_or(1.0, |t| f64::from(t.max_rows_per_unit));
    for c in &d.columns {
        let filtered = c.filter.as_ref().map(|f| f.columns()).unwrap_or_default();
        for col in c.value.columns().into_iter().chain(filtered) {
            if !source.shares(col, &spec.privacy_unit) {
                return Err(NodeError::Refused(format!(
                    "column {} of table {} (in a derived table) is not shared by this node: its node policy (`columns` in [tables.{}] of node.toml) does not list it",
                    shown(col),
                    shown(&d.table),
                    d.table
                )));
            }
        }
        // A MIN or MAX keeps its column's clamp; a sum is declared within R times its
        // column's bounds (the aggregate on top clamps it there), so R times the clamp.
        match &c.value {
            UnitAggregate::Min { column }
            | UnitAggregate::Max { column }
            | UnitAggregate::Avg { column }
            | UnitAggregate::Median { column }
            | UnitAggregate::First { column, .. } => {
                if let Some(range) = source.clamp.get(column) {
                    clamp.insert(c.name.clone(), *range);
                }
            }
            UnitAggregate::Sum { column } => {
                if let Some(&(lo, hi)) = source.clamp.get(column) {
                    clamp.insert(
                        c.name.clone(),
                        (source_r * lo.min(0.0), source_r * hi.max(0.0)),
                    );
                }
            }
            _ => {}
        }
        columns.insert(c.name.clone());
    }
    Ok(DerivedView {
        spec,
        policy: TablePolicy {
            columns: Some(columns),
            max_rows_per_unit: source.max_rows_per_unit,
            clamp,
        },
    })
}

/// The derived table's rows at this site: `SELECT unit, <aggregates> FROM table WHERE filter
/// GROUP BY unit HAVING COUNT(*) >= min_rows`, NULL participants left out.
pub(crate) fn frame(
    engine: &NodeEngine,
    d: &PerParticipant,
    names: &mut SetNames,
) -> Result<DataFrame, NodeError> {
    let t = engine.served(&d.table)?;
    let unit = t.spec.privacy_unit.clone();
    let nested = sets::set_columns(
        d.filter
            .as_ref()
            .map(|f| f.participant_sets())
            .unwrap_or_default(),
        names,
    );
    let scope = Scope {
        left: Relation {
            name: &d.table,
            spec: &t.spec,
            policy: &t.policy,
        },
        joined: &[],
        sets: &nested,
        computed: &[],
    };
    let (unit_expr, _) = scope.column(Side::LEFT, &unit, "a derived table")?;
    let mut df = sets::attach(engine, t.df.clone(), unit_expr.clone(), &nested, names)?;
    if let Some(f) = &d.filter {
        df = df.filter(filter::translate(f, &scope)?).map_err(planned)?;
    }
    // Rows that tie on a `First` order are ordered by every `First` column, so that all of
    // them read the same row.
    let tie_break: Vec<&str> = d
        .columns
        .iter()
        .filter_map(|c| match &c.value {
            UnitAggregate::First { column, .. } => Some(column.as_str()),
            _ => None,
        })
        .collect();
    let mut aggs: Vec<Expr> = Vec::with_capacity(d.columns.len() + 1);
    for c in &d.columns {
        let e = match &c.value {
            UnitAggregate::Min { column } => {
                min(scope.column(Side::LEFT, column, "a derived table")?.0)
            }
            UnitAggregate::Max { column } => {
                max(scope.column(Side::LEFT, column, "a derived table")?.0)
            }
            UnitAggregate::CountRows => count(lit(1)),
            UnitAggregate::CountNonNull { column } => {
                count(scope.column(Side::LEFT, column, "a derived table")?.0)
            }
            UnitAggregate::CountDistinct { column } => {
                count_distinct(scope.column(Side::LEFT, column, "a derived table")?.0)
            }
            UnitAggregate::Sum { column } => sum(clamped(&scope, column)?),
            // The mean of clamped values, as a float (an integer column's too).
            UnitAggregate::Avg { column } => avg(cast(clamped(&scope, column)?, DataType::Float64)),
            // Spreads and medians of clamped values, as floats: within the declared
            // bounds' reach (`PerParticipant::spec`) whatever the data.
            UnitAggregate::Stddev { column, population } => {
                let x = cast(clamped(&scope, column)?, DataType::Float64);
                if *population {
                    stddev_pop(x)
                } else {
                    stddev(x)
                }
            }
            UnitAggregate::Variance { column, population } => {
                let x = cast(clamped(&scope, column)?, DataType::Float64);
                if *population {
                    var_pop(x)
                } else {
                    var_sample(x)
                }
            }
            UnitAggregate::Median { column } => {
                median(cast(clamped(&scope, column)?, DataType::Float64))
            }
            UnitAggregate::Any { when } => bool_or(filter::translate(when, &scope)?),
            UnitAggregate::All { when } => bool_and(filter::translate(when, &scope)?),
            UnitAggregate::First { column, order, nth } => {
                // Each column once (DataFusion's ordered `first_value` requires distinct
                // keys): the order's keys, then the tie-break's other columns ascending.
                let keys = order
                    .iter()
                    .map(|k| (k.column.as_str(), !k.descending, k.nulls_first))
                    .chain(tie_break.iter().map(|c| (*c, true, false)));
                let mut seen = std::collections::BTreeSet::new();
                let mut sorts = Vec::with_capacity(order.len() + tie_break.len());
                for (name, asc, nulls_first) in keys {
                    if seen.insert(name) {
                        let (e, _) = scope.column(Side::LEFT, name, "a derived table")?;
                        sorts.push(e.sort(asc, nulls_first));
                    }
                }
                let x = scope.column(Side::LEFT, column, "a derived table")?.0;
                // Row k by the same order; `min_rows` ≥ k (checked by `spec`), so every
                // participant kept has one.
                if *nth == 1 {
                    first_value(x, sorts)
                } else {
                    nth_value(x, i64::from(*nth), sorts)
                }
            }
        };
        // `AGG(…) FILTER (WHERE …)`: the column's own rows (checked to read only this
        // table's columns and no participant set).
        let e = match &c.filter {
            Some(f) => e
                .filter(filter::translate(f, &scope)?)
                .build()
                .map_err(planned)?,
            None => e,
        };
        aggs.push(e.alias(&c.name));
    }
    const ROWS: &str = "fedq_derived_rows";
    aggs.push(count(lit(1)).alias(ROWS));
    let mut out = vec![ident(&unit)];
    out.extend(d.columns.iter().map(|c| ident(&c.name)));
    df.filter(unit_expr.clone().is_not_null())
        .and_then(|d| d.aggregate(vec![unit_expr], aggs))
        .and_then(|x| x.filter(ident(ROWS).gt_eq(lit(i64::from(d.min_rows)))))
        .and_then(|x| x.select(out))
        .map_err(planned)
}

/// A numeric column clamped to its declared bounds, narrowed by the node's own clamp, as an
/// `int64` or `float64` (a cast that cannot fail), for a per-participant sum.
fn clamped(scope: &Scope<'_>, column: &str) -> Result<Expr, NodeError> {
    let (x, spec) = scope.column(Side::LEFT, column, "a derived table")?;
    let Some(b) = spec.bounds() else {
        return Err(NodeError::Refused(format!(
            "a derived table sums {}, which has no declared bounds",
            shown(column)
        )));
    };
    let (mut lo, mut hi) = (b.lower, b.upper);
    if let Some(&(l, h)) = scope.left.policy.clamp.get(column) {
        lo = lo.max(l);
        hi = hi.min(h);
    }
    let (x, lo, hi) = if spec.ty == fedq_common::ColumnType::Float64 {
        (x, lit(lo), lit(hi))
    } else {
        (
            cast(x, DataType::Int64),
            lit(lo.ceil() as i64),
            lit(hi.floor() as i64),
        )
    };
    when(x.clone().lt(lo.clone()), lo)
        .when(x.clone().gt(hi.clone()), hi)
        .otherwise(x)
        .map_err(planned)
}

fn planned(e: datafusion::error::DataFusionError) -> NodeError {
    tracing::warn!(error = %e, "a derived table could not be planned");
    NodeError::InvalidRequest("a derived table could not be planned".into())
}
