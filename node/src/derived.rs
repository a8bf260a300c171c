//! Per-participant derived tables at the node (`fedq_common::derived`): declared from the
//! source table's catalog entry, checked against this node's policy for it, and built as a
//! DataFusion aggregate grouped by the participant over this site's rows only.

use datafusion::dataframe::DataFrame;
use datafusion::functions_aggregate::expr_fn::{count, max, min};
use datafusion::logical_expr::{ident, lit, Expr};
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
    for c in &d.columns {
        if let Some(col) = c.value.column() {
            if !source.shares(col, &spec.privacy_unit) {
                return Err(NodeError::Refused(format!(
                    "column {} of table {} (in a derived table) is not shared by this node: its node policy (`columns` in [tables.{}] of node.toml) does not list it",
                    shown(col),
                    shown(&d.table),
                    d.table
                )));
            }
            if let Some(range) = source.clamp.get(col) {
                clamp.insert(c.name.clone(), *range);
            }
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
        right: None,
        sets: &nested,
        computed: &[],
    };
    let (unit_expr, _) = scope.column(Side::Left, &unit, "a derived table")?;
    let mut df = sets::attach(engine, t.df.clone(), unit_expr.clone(), &nested, names)?;
    if let Some(f) = &d.filter {
        df = df.filter(filter::translate(f, &scope)?).map_err(planned)?;
    }
    let mut aggs: Vec<Expr> = Vec::with_capacity(d.columns.len() + 1);
    for c in &d.columns {
        let e = match &c.value {
            UnitAggregate::Min { column } => {
                min(scope.column(Side::Left, column, "a derived table")?.0)
            }
            UnitAggregate::Max { column } => {
                max(scope.column(Side::Left, column, "a derived table")?.0)
            }
            UnitAggregate::CountRows => count(lit(1)),
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

fn planned(e: datafusion::error::DataFusionError) -> NodeError {
    tracing::warn!(error = %e, "a derived table could not be planned");
    NodeError::InvalidRequest("a derived table could not be planned".into())
}
