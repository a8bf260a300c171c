//! Participant sets from SQL subqueries: `IN`, `NOT IN`, `EXISTS`, `NOT EXISTS`,
//! `INTERSECT`, `EXCEPT`, `UNION`, and `GROUP BY pid HAVING COUNT(*) >= k`.
//!
//! A subquery is accepted when it describes a set of participants decided from each
//! participant's own rows ([`ParticipantSet`]): it must return the privacy unit of one
//! catalog table (for `IN`), or be correlated on it and nothing else (for `EXISTS`).
//! Anything that compares one participant's rows with another's is refused with a message
//! saying why and what to write instead. The node checks the same set against the same
//! catalog ([`ParticipantSet::check`]).

use datafusion::common::ScalarValue;
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, Expr, JoinType, LogicalPlan, Operator, Subquery,
};
use fedq_common::derived::{
    DerivedColumn, OrderKey, PerParticipant, UnitAggregate, MAX_ORDER_KEYS,
};
use fedq_common::participant_set::MAX_SET_LEAVES;
use fedq_common::{Catalog, ParticipantSet, Predicate, Side};

use crate::error::CoordinatorError;
use crate::predicate::{to_predicate, Scope};

fn refuse(msg: impl Into<String>) -> CoordinatorError {
    CoordinatorError::Refused(msg.into())
}

/// What to write instead of a subquery fedq cannot answer.
const WRITE_INSTEAD: &str = "write `pid IN (SELECT pid FROM <table> WHERE ...)`, `[NOT] EXISTS (SELECT 1 FROM <table> t WHERE t.pid = <outer>.pid AND ...)`, or combine such sets with INTERSECT, EXCEPT and UNION";

/// `expr [NOT] IN (subquery)`: `expr` must be the participant of a table of `scope`.
pub fn in_subquery(
    expr: &Expr,
    subquery: &Subquery,
    negated: bool,
    scope: &Scope<'_>,
) -> Result<Predicate, CoordinatorError> {
    let side = unit_side(expr, scope).ok_or_else(|| {
        refuse(format!(
            "`{expr} IN (subquery)` compares a value with other participants' rows; only the participant (the privacy unit) may be tested against a subquery, since a participant's result must depend on their own rows only: {WRITE_INSTEAD}"
        ))
    })?;
    if !subquery.outer_ref_columns.is_empty() {
        return Err(refuse(format!(
            "a correlated `IN` subquery is not supported; {WRITE_INSTEAD}"
        )));
    }
    let set = set_of(&subquery.subquery, scope)?;
    finish(side, set, negated, scope)
}

/// `[NOT] EXISTS (subquery)`: the subquery must be correlated on the participant only.
pub fn exists(
    subquery: &Subquery,
    negated: bool,
    scope: &Scope<'_>,
) -> Result<Predicate, CoordinatorError> {
    let mut plan = subquery.subquery.as_ref();
    // The select list of EXISTS does not matter; neither does DISTINCT.
    loop {
        plan = match plan {
            LogicalPlan::Projection(p) => p.input.as_ref(),
            LogicalPlan::Distinct(d) => d.input().as_ref(),
            LogicalPlan::SubqueryAlias(_) | LogicalPlan::Filter(_) | LogicalPlan::TableScan(_) => {
                break
            }
            other => {
                return Err(refuse(format!(
                    "EXISTS over {} is not supported; {WRITE_INSTEAD}",
                    other.display()
                )))
            }
        };
    }
    let mut filters = Vec::new();
    let mut inner = plan;
    while let LogicalPlan::Filter(f) = inner {
        filters.push(&f.predicate);
        inner = f.input.as_ref();
    }
    let (table, qualifier) = scan(inner)?;
    let spec = table_spec(scope.catalog, &table)?;
    let mut conjuncts = Vec::new();
    for f in filters {
        split_and(f, &mut conjuncts);
    }
    let mut side = None;
    let mut rest = Vec::new();
    for c in conjuncts {
        match correlation(c, scope, &spec.privacy_unit) {
            Some(s) if side.is_none() => side = Some(s),
            _ => rest.push(c),
        }
    }
    let Some(side) = side else {
        return Err(refuse(format!(
            "EXISTS must be correlated on the participant, e.g. `EXISTS (SELECT 1 FROM {table} t WHERE t.{} = <outer table>.<its participant column> AND ...)`; without it, it asks whether anybody at the site has such a row",
            spec.privacy_unit
        )));
    };
    let inner_scope = Scope::single(&table, &qualifier, spec, scope.catalog);
    let filter = conjoin(&rest, &inner_scope)?;
    let set = ParticipantSet::Rows {
        table,
        filter,
        min_rows: 1,
    };
    finish(side, set, negated, scope)
}

fn finish(
    side: Side,
    set: ParticipantSet,
    negated: bool,
    scope: &Scope<'_>,
) -> Result<Predicate, CoordinatorError> {
    set.check(scope.catalog).map_err(|e| refuse(e.0))?;
    if set.leaf_count() > MAX_SET_LEAVES {
        return Err(refuse(format!(
            "the query tests {} participant subqueries; the limit is {MAX_SET_LEAVES}",
            set.leaf_count()
        )));
    }
    Ok(Predicate::InSet {
        side,
        set: Box::new(set),
        negated,
    })
}

/// The side whose privacy unit `e` is, if it is one.
fn unit_side(e: &Expr, scope: &Scope<'_>) -> Option<Side> {
    let Expr::Column(c) = strip(e) else {
        return None;
    };
    let (side, rel) = scope.resolve(c).ok()?;
    (rel.spec.privacy_unit == c.name).then_some(side)
}

/// `outer.unit = inner.unit` (either way round): the outer side it correlates.
fn correlation(e: &Expr, scope: &Scope<'_>, inner_unit: &str) -> Option<Side> {
    let Expr::BinaryExpr(BinaryExpr {
        left,
        op: Operator::Eq,
        right,
    }) = e
    else {
        return None;
    };
    let pair = |o: &Expr, i: &Expr| match (strip(o), strip(i)) {
        (Expr::OuterReferenceColumn(_, oc), Expr::Column(ic)) if ic.name == inner_unit => {
            unit_side(&Expr::Column(oc.clone()), scope)
        }
        _ => None,
    };
    pair(left, right).or_else(|| pair(right, left))
}

fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip(&a.expr),
        Expr::Cast(c) => strip(&c.expr),
        other => other,
    }
}

fn split_and<'e>(e: &'e Expr, out: &mut Vec<&'e Expr>) {
    match e {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And,
            right,
        }) => {
            split_and(left, out);
            split_and(right, out);
        }
        other => out.push(other),
    }
}

/// The conjunction of `filters` as one wire predicate, refusing any outer reference.
fn conjoin(filters: &[&Expr], scope: &Scope<'_>) -> Result<Option<Predicate>, CoordinatorError> {
    let mut out: Option<Predicate> = None;
    for f in filters {
        let mut outer = false;
        let _ = datafusion::common::tree_node::TreeNode::apply(*f, |x| {
            if matches!(x, Expr::OuterReferenceColumn(..)) {
                outer = true;
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        });
        if outer {
            return Err(refuse(format!(
                "a subquery may refer to the outer query only through the participant (`t.pid = outer.pid`); `{f}` compares the subquery's rows with the outer row, which is not a set of participants: {WRITE_INSTEAD}"
            )));
        }
        let p = to_predicate(f, scope)?;
        out = Some(match out {
            None => p,
            Some(prev) => Predicate::Binary {
                op: fedq_common::BinaryOp::And,
                left: Box::new(prev),
                right: Box::new(p),
            },
        });
    }
    Ok(out)
}

fn table_spec<'a>(
    catalog: &'a Catalog,
    table: &str,
) -> Result<&'a fedq_common::TableSpec, CoordinatorError> {
    catalog.table(table).ok_or_else(|| {
        CoordinatorError::InvalidSql(format!("table `{table}` is not in the catalog"))
    })
}

/// The catalog table and qualifier of a scan (under any aliases).
fn scan(plan: &LogicalPlan) -> Result<(String, String), CoordinatorError> {
    match plan {
        LogicalPlan::TableScan(t) => {
            if !t.filters.is_empty() || t.fetch.is_some() {
                return Err(refuse("a subquery's scan cannot carry filters or a limit"));
            }
            let name = t.table_name.table().to_string();
            Ok((name.clone(), name))
        }
        LogicalPlan::SubqueryAlias(a) => {
            let (table, _) = scan(a.input.as_ref())?;
            Ok((table, a.alias.table().to_string()))
        }
        other => Err(refuse(format!(
            "a subquery over {} is not supported; {WRITE_INSTEAD}",
            other.display()
        ))),
    }
}

/// A relation being read as a participant set.
enum Rel<'p> {
    /// Rows of a catalog table, with the filters over them and, once grouped by the
    /// participant, the name of its `COUNT(*)` column and the `HAVING` bound on it.
    Rows {
        table: String,
        qualifier: String,
        filters: Vec<&'p Expr>,
        grouped: Option<Grouped>,
    },
    /// Already one column of participant ids.
    Set(ParticipantSet),
}

struct Grouped {
    count_column: Option<String>,
    min_rows: u32,
}

/// The participant set an uncorrelated subquery returns: it must return only the privacy
/// unit of a catalog table (or sets of them combined with INTERSECT, EXCEPT and UNION).
pub fn set_of(plan: &LogicalPlan, scope: &Scope<'_>) -> Result<ParticipantSet, CoordinatorError> {
    set_in(plan, scope.catalog)
}

fn set_in(plan: &LogicalPlan, catalog: &Catalog) -> Result<ParticipantSet, CoordinatorError> {
    match rel(plan, catalog)? {
        Rel::Set(s) => Ok(s),
        Rel::Rows { table, .. } => Err(refuse(format!(
            "the subquery over `{table}` must return only the participant column (`SELECT pid FROM {table} ...`); {WRITE_INSTEAD}"
        ))),
    }
}

fn rel<'p>(plan: &'p LogicalPlan, catalog: &Catalog) -> Result<Rel<'p>, CoordinatorError> {
    match plan {
        LogicalPlan::TableScan(_) => {
            let (table, qualifier) = scan(plan)?;
            table_spec(catalog, &table)?;
            Ok(Rel::Rows {
                table,
                qualifier,
                filters: Vec::new(),
                grouped: None,
            })
        }
        LogicalPlan::SubqueryAlias(a) => match rel(a.input.as_ref(), catalog)? {
            Rel::Rows {
                table,
                filters,
                grouped,
                ..
            } => Ok(Rel::Rows {
                table,
                qualifier: a.alias.table().to_string(),
                filters,
                grouped,
            }),
            set => Ok(set),
        },
        LogicalPlan::Filter(f) => match rel(f.input.as_ref(), catalog)? {
            Rel::Rows {
                table,
                qualifier,
                mut filters,
                grouped: None,
            } => {
                filters.push(&f.predicate);
                Ok(Rel::Rows {
                    table,
                    qualifier,
                    filters,
                    grouped: None,
                })
            }
            Rel::Rows {
                table,
                qualifier,
                filters,
                grouped: Some(g),
            } => {
                let min_rows = having(&f.predicate, &g)?;
                Ok(Rel::Rows {
                    table,
                    qualifier,
                    filters,
                    grouped: Some(Grouped {
                        min_rows: g.min_rows.max(min_rows),
                        ..g
                    }),
                })
            }
            Rel::Set(_) => Err(refuse(format!(
                "a filter over a combination of participant sets is not supported; filter inside each subquery: {WRITE_INSTEAD}"
            ))),
        },
        LogicalPlan::Aggregate(a) => grouped_by_unit(a, catalog),
        LogicalPlan::Distinct(d) => rel(d.input().as_ref(), catalog),
        LogicalPlan::Projection(p) => {
            let input = rel(p.input.as_ref(), catalog)?;
            let [e] = p.expr.as_slice() else {
                return Err(refuse(format!(
                    "a participant subquery must return one column, the participant; {WRITE_INSTEAD}"
                )));
            };
            match input {
                Rel::Set(s) => Ok(Rel::Set(s)),
                Rel::Rows {
                    table,
                    qualifier,
                    filters,
                    grouped,
                } => {
                    let spec = table_spec(catalog, &table)?;
                    let inner = Scope::single(&table, &qualifier, spec, catalog);
                    if unit_side(e, &inner).is_none() {
                        return Err(refuse(format!(
                            "the subquery over `{table}` returns `{e}`; a participant subquery must return the participant column `{}`: {WRITE_INSTEAD}",
                            spec.privacy_unit
                        )));
                    }
                    let filter = conjoin(&filters, &inner)?;
                    Ok(Rel::Set(ParticipantSet::Rows {
                        table,
                        filter,
                        min_rows: grouped.map_or(1, |g| g.min_rows),
                    }))
                }
            }
        }
        LogicalPlan::Union(u) => {
            let mut sets = u
                .inputs
                .iter()
                .map(|i| set_in(i.as_ref(), catalog))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter();
            let first = sets
                .next()
                .ok_or_else(|| refuse("an empty UNION is not a participant set"))?;
            Ok(Rel::Set(sets.fold(first, |l, r| ParticipantSet::Union {
                left: Box::new(l),
                right: Box::new(r),
            })))
        }
        LogicalPlan::Join(j)
            if matches!(j.join_type, JoinType::LeftSemi | JoinType::LeftAnti)
                && j.on.len() == 1
                && j.filter.is_none() =>
        {
            let left = Box::new(set_in(j.left.as_ref(), catalog)?);
            let right = Box::new(set_in(j.right.as_ref(), catalog)?);
            Ok(Rel::Set(if j.join_type == JoinType::LeftSemi {
                ParticipantSet::Intersect { left, right }
            } else {
                ParticipantSet::Except { left, right }
            }))
        }
        other => Err(refuse(format!(
            "a subquery with {} is not supported as a participant set; {WRITE_INSTEAD}",
            other.display()
        ))),
    }
}

/// `GROUP BY pid` (with `COUNT(*)` at most) over a table's rows.
fn grouped_by_unit<'p>(a: &'p Aggregate, catalog: &Catalog) -> Result<Rel<'p>, CoordinatorError> {
    let Rel::Rows {
        table,
        qualifier,
        filters,
        grouped: None,
    } = rel(a.input.as_ref(), catalog)?
    else {
        return Err(refuse(format!(
            "a GROUP BY over a combination of participant sets is not supported; {WRITE_INSTEAD}"
        )));
    };
    let spec = table_spec(catalog, &table)?;
    let inner = Scope::single(&table, &qualifier, spec, catalog);
    let by_unit = matches!(a.group_expr.as_slice(), [g] if unit_side(g, &inner).is_some());
    if !by_unit {
        return Err(refuse(format!(
            "a GROUP BY inside a participant subquery must group by the participant only (`GROUP BY {}`); {WRITE_INSTEAD}",
            spec.privacy_unit
        )));
    }
    let count_column = match a.aggr_expr.as_slice() {
        [] => None,
        [e] if is_count_rows(e) => Some(a.schema.field(1).name().clone()),
        _ => {
            return Err(refuse(
                "a participant subquery grouped by the participant may only test `HAVING COUNT(*) >= k`; other per-participant aggregates are not supported yet",
            ))
        }
    };
    Ok(Rel::Rows {
        table,
        qualifier,
        filters,
        grouped: Some(Grouped {
            count_column,
            min_rows: 1,
        }),
    })
}

fn is_count_rows(e: &Expr) -> bool {
    let Expr::AggregateFunction(f) = strip(e) else {
        return false;
    };
    f.func.name() == "count"
        && !f.params.distinct
        && f.params.filter.is_none()
        && matches!(f.params.args.as_slice(), [Expr::Literal(v, _)] if !v.is_null())
}

/// `HAVING COUNT(*) >= k` (or `> k`, either way round): k.
fn having(p: &Expr, g: &Grouped) -> Result<u32, CoordinatorError> {
    let bad = || {
        refuse("a participant subquery may only filter its groups with `HAVING COUNT(*) >= k` (or `> k`)")
    };
    let Some(count) = &g.count_column else {
        return Err(bad());
    };
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = strip(p) else {
        return Err(bad());
    };
    let is_count = |e: &Expr| matches!(strip(e), Expr::Column(c) if &c.name == count);
    let int = |e: &Expr| match strip(e) {
        Expr::Literal(ScalarValue::Int64(Some(k)), _) => Some(*k),
        Expr::Literal(v, _) => v
            .cast_to(&datafusion::arrow::datatypes::DataType::Int64)
            .ok()
            .and_then(|x| match x {
                ScalarValue::Int64(k) => k,
                _ => None,
            }),
        _ => None,
    };
    let k = match (is_count(left), is_count(right), op) {
        (true, false, Operator::GtEq) => int(right),
        (true, false, Operator::Gt) => int(right).map(|k| k.saturating_add(1)),
        (false, true, Operator::LtEq) => int(left),
        (false, true, Operator::Lt) => int(left).map(|k| k.saturating_add(1)),
        _ => None,
    }
    .ok_or_else(bad)?;
    Ok(u32::try_from(k.max(1)).unwrap_or(u32::MAX))
}

/// A `FROM` that is a participant set (`FROM (SELECT pid FROM a INTERSECT SELECT pid FROM
/// b) t`, `FROM (SELECT DISTINCT pid ...)`, `FROM (SELECT pid ... GROUP BY pid HAVING
/// COUNT(*) >= 3)`): the set, and the catalog table every member has rows in, which the
/// request then reads, one participant at a time. `None` when the `FROM` is not a
/// one-column set shape (a table, a join, a filtered table): the ordinary planner applies.
pub fn set_source(
    plan: &LogicalPlan,
    catalog: &Catalog,
) -> Result<Option<(ParticipantSet, String)>, CoordinatorError> {
    if !looks_like_set(plan) || plan.schema().fields().len() != 1 {
        return Ok(None);
    }
    let set = set_in(plan, catalog)?;
    let table = member_table(&set).ok_or_else(|| {
        refuse(format!(
            "counting a UNION of participants from different tables needs a table every participant has rows in: \
             write `SELECT COUNT(*) FROM participants WHERE pid IN (<first>) OR pid IN (<second>)`; {WRITE_INSTEAD}"
        ))
    })?;
    if set.leaf_count() > MAX_SET_LEAVES {
        return Err(refuse(format!(
            "the query tests {} participant subqueries; the limit is {MAX_SET_LEAVES}",
            set.leaf_count()
        )));
    }
    set.check(catalog).map_err(|e| refuse(e.0))?;
    Ok(Some((set, table)))
}

/// Whether `plan` has the shape of a set of participants rather than of rows.
fn looks_like_set(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::SubqueryAlias(a) => looks_like_set(a.input.as_ref()),
        LogicalPlan::Projection(p) => looks_like_set(p.input.as_ref()),
        LogicalPlan::Filter(f) => matches!(f.input.as_ref(), LogicalPlan::Aggregate(_)),
        LogicalPlan::Distinct(_) | LogicalPlan::Union(_) | LogicalPlan::Aggregate(_) => true,
        LogicalPlan::Join(j) => matches!(j.join_type, JoinType::LeftSemi | JoinType::LeftAnti),
        _ => false,
    }
}

/// A table in which every member of `set` has at least one row: the leftmost leaf of an
/// intersection or difference, or the one table of a union of leaves of one table.
fn member_table(set: &ParticipantSet) -> Option<String> {
    match set {
        ParticipantSet::Rows { table, .. } => Some(table.clone()),
        ParticipantSet::Intersect { left, .. } | ParticipantSet::Except { left, .. } => {
            member_table(left)
        }
        ParticipantSet::Union { left, right } => {
            let (l, r) = (member_table(left)?, member_table(right)?);
            (l == r).then_some(l)
        }
    }
}

/// A per-participant derived table (`SELECT pid, MIN(d) AS first_d, COUNT(*) AS n FROM t
/// WHERE … GROUP BY pid [HAVING COUNT(*) >= k]`), read from its plan below the alias; `None`
/// when the plan is not a projection of an aggregate.
pub fn derived_table(
    plan: &LogicalPlan,
    catalog: &Catalog,
) -> Result<Option<PerParticipant>, CoordinatorError> {
    let LogicalPlan::Projection(p) = plan else {
        return Ok(None);
    };
    let (having_pred, agg) = match p.input.as_ref() {
        LogicalPlan::Aggregate(a) => (None, a),
        LogicalPlan::Filter(f) => match f.input.as_ref() {
            LogicalPlan::Aggregate(a) => (Some(&f.predicate), a),
            _ => return Ok(None),
        },
        _ => return Ok(None),
    };
    let Rel::Rows {
        table,
        qualifier,
        filters,
        grouped: None,
    } = rel(agg.input.as_ref(), catalog)?
    else {
        return Err(refuse(
            "a derived table reads one catalog table's rows (with a WHERE), then groups them by the participant",
        ));
    };
    let spec = table_spec(catalog, &table)?;
    let inner = Scope::single(&table, &qualifier, spec, catalog);
    if !matches!(agg.group_expr.as_slice(), [g] if unit_side(g, &inner).is_some()) {
        return Err(refuse(format!(
            "a derived table must be grouped by the participant alone (`GROUP BY {}`): grouping by anything else \
             aggregates several participants' rows below the DP aggregate",
            spec.privacy_unit
        )));
    }
    // Each aggregate, by the name of its output column.
    let n_keys = agg.group_expr.len();
    let mut outputs: Vec<(String, UnitAggregate, Option<Predicate>)> = Vec::new();
    for (i, e) in agg.aggr_expr.iter().enumerate() {
        let name = agg.schema.field(n_keys + i).name().clone();
        let (value, filter) = unit_aggregate(e, &inner)?;
        outputs.push((name, value, filter));
    }
    let min_rows = match having_pred {
        None => 1,
        Some(h) => {
            let count_column = outputs
                .iter()
                .find(|(_, a, f)| *a == UnitAggregate::CountRows && f.is_none())
                .map(|(n, _, _)| n.clone());
            having(
                h,
                &Grouped {
                    count_column,
                    min_rows: 1,
                },
            )?
        }
    };
    let mut columns = Vec::new();
    for e in &p.expr {
        let (name, inner_e) = match e {
            Expr::Alias(a) => (a.name.clone(), a.expr.as_ref()),
            other => (other.schema_name().to_string(), other),
        };
        let Expr::Column(c) = strip(inner_e) else {
            return Err(refuse(format!(
                "a derived table's columns are the participant and aggregates of its rows (MIN, MAX, SUM, AVG, COUNT, bool_or, bool_and, first_value), not `{e}`"
            )));
        };
        if unit_side(inner_e, &inner).is_some() {
            continue;
        }
        let Some((_, value, filter)) = outputs.iter().find(|(n, _, _)| *n == c.name) else {
            return Err(refuse(format!(
                "a derived table's columns are the participant and aggregates of its rows (MIN, MAX, SUM, AVG, COUNT, bool_or, bool_and, first_value), not `{e}`"
            )));
        };
        columns.push(DerivedColumn {
            name,
            value: value.clone(),
            filter: filter.clone(),
        });
    }
    let d = PerParticipant {
        filter: conjoin(&filters, &inner)?,
        table,
        min_rows,
        columns,
    };
    d.spec(catalog).map_err(|e| refuse(e.0))?;
    Ok(Some(d))
}

/// One aggregate of a participant's rows, and the rows it reads if it reads only some:
/// `COUNT(*) FILTER (WHERE c)`, and the spellings that mean the same, `COUNT(CASE WHEN c
/// THEN 1 END)`, `SUM(CASE WHEN c THEN 1 ELSE 0 END)` and `AGG(CASE WHEN c THEN col END)`
/// (an aggregate skips the NULLs of the rows where `c` is not true).
fn unit_aggregate(
    e: &Expr,
    inner: &Scope<'_>,
) -> Result<(UnitAggregate, Option<Predicate>), CoordinatorError> {
    let unsupported = || {
        refuse(format!(
            "a derived table grouped by the participant may take MIN(col), MAX(col), SUM(col), AVG(col), STDDEV(col), VARIANCE(col), \
             MEDIAN(col), COUNT(*), COUNT(col), COUNT(DISTINCT col), bool_or(condition), bool_and(condition) or \
             first_value(col ORDER BY col) of a participant's rows, \
             each optionally of the rows a condition picks (`COUNT(*) FILTER (WHERE code = 'E11')`, \
             `MAX(CASE WHEN test = 'HbA1c' THEN value END)`), not `{e}`"
        ))
    };
    if is_count_rows(e) {
        return Ok((UnitAggregate::CountRows, None));
    }
    let Expr::AggregateFunction(f) = strip(e) else {
        return Err(unsupported());
    };
    let name = f.func.name();
    let ordered = matches!(name, "first_value" | "last_value");
    if ordered && f.params.filter.is_some() {
        return Err(refuse(format!(
            "`{e}` takes a first row of some rows: filter the rows in the derived table's WHERE instead"
        )));
    }
    let mut filter = f
        .params
        .filter
        .as_deref()
        .map(|p| to_predicate(p, inner))
        .transpose()?;
    let [arg] = f.params.args.as_slice() else {
        return Err(unsupported());
    };
    // `CASE WHEN c THEN x [ELSE NULL] END` (and `ELSE 0` under a SUM of 1s): x over the
    // rows where c is true.
    let mut arg = strip(arg);
    if let Some((when, then, otherwise)) = single_case(arg) {
        let counted = match (name, then, otherwise) {
            ("count", Some(1), None) if !f.params.distinct => true,
            ("sum", Some(1), Some(0)) if !f.params.distinct => true,
            _ => false,
        };
        let picked = to_predicate(when.0, inner)?;
        filter = Some(match filter {
            None => picked,
            Some(f) => Predicate::Binary {
                op: fedq_common::BinaryOp::And,
                left: Box::new(f),
                right: Box::new(picked),
            },
        });
        if counted {
            return Ok((UnitAggregate::CountRows, filter));
        }
        if otherwise.is_some() {
            return Err(unsupported());
        }
        arg = strip(when.1);
    }
    if name == "count" && !f.params.distinct && matches!(arg, Expr::Literal(v, _) if !v.is_null()) {
        return Ok((UnitAggregate::CountRows, filter));
    }
    // `COUNT(DISTINCT code)`: how many different values the participant's rows take.
    if name == "count" && f.params.distinct {
        if let Expr::Column(c) = arg {
            inner.resolve(c)?;
            return Ok((
                UnitAggregate::CountDistinct {
                    column: c.name.clone(),
                },
                filter,
            ));
        }
        return Err(unsupported());
    }
    if f.params.distinct || (f.params.order_by.is_empty() == ordered) {
        if ordered {
            return Err(refuse(format!(
                "`{e}` needs an order that says which row is first: `first_value(col ORDER BY date_col)`"
            )));
        }
        return Err(unsupported());
    }
    // `first_value(value ORDER BY measured_on DESC)`: the value in the participant's first
    // row by that order (`last_value` reverses it).
    if ordered {
        let Expr::Column(c) = arg else {
            return Err(unsupported());
        };
        inner.resolve(c)?;
        let mut order = order_keys(&f.params.order_by, inner)?;
        if name == "last_value" {
            for k in &mut order {
                k.descending = !k.descending;
                k.nulls_first = !k.nulls_first;
            }
        }
        return Ok((
            UnitAggregate::First {
                column: c.name.clone(),
                order,
                nth: 1,
            },
            None,
        ));
    }
    // `bool_or(code = 'E11')`: whether some (all) of the participant's rows meet it.
    match name {
        "bool_or" => {
            return Ok((
                UnitAggregate::Any {
                    when: to_predicate(arg, inner)?,
                },
                filter,
            ))
        }
        "bool_and" => {
            return Ok((
                UnitAggregate::All {
                    when: to_predicate(arg, inner)?,
                },
                filter,
            ))
        }
        _ => {}
    }
    let Expr::Column(c) = arg else {
        return Err(unsupported());
    };
    inner.resolve(c)?;
    let column = c.name.clone();
    let value = match name {
        "min" => UnitAggregate::Min { column },
        "max" => UnitAggregate::Max { column },
        "sum" => UnitAggregate::Sum { column },
        "avg" | "mean" => UnitAggregate::Avg { column },
        "stddev" | "stddev_samp" => UnitAggregate::Stddev {
            column,
            population: false,
        },
        "stddev_pop" => UnitAggregate::Stddev {
            column,
            population: true,
        },
        "var" | "var_samp" | "var_sample" | "variance" => UnitAggregate::Variance {
            column,
            population: false,
        },
        "var_pop" => UnitAggregate::Variance {
            column,
            population: true,
        },
        "median" => UnitAggregate::Median { column },
        "count" => UnitAggregate::CountNonNull { column },
        _ => return Err(unsupported()),
    };
    Ok((value, filter))
}

/// `CASE WHEN c THEN x [ELSE y] END` with one branch and no operand: `((c, x), then, else)`
/// where `then` and `else` are x and y as integer literals, if they are (`else` is `None`
/// when it is absent or NULL).
#[allow(clippy::type_complexity)]
fn single_case(e: &Expr) -> Option<((&Expr, &Expr), Option<i64>, Option<i64>)> {
    let Expr::Case(c) = e else {
        return None;
    };
    let ([(when, then)], None) = (c.when_then_expr.as_slice(), c.expr.as_ref()) else {
        return None;
    };
    let int = |e: &Expr| match strip(e) {
        Expr::Literal(v, _) => match crate::predicate::literal(v) {
            Ok(fedq_common::Literal::Int64(i)) => Some(i),
            _ => None,
        },
        _ => None,
    };
    let otherwise = match c.else_expr.as_deref().map(strip) {
        None => None,
        Some(Expr::Literal(v, _)) if v.is_null() => None,
        Some(other) => Some(int(other)?),
    };
    Some(((when.as_ref(), then.as_ref()), int(then), otherwise))
}

/// The keys of an `ORDER BY` of a participant's rows: columns of the table read.
fn order_keys(
    order_by: &[datafusion::logical_expr::SortExpr],
    inner: &Scope<'_>,
) -> Result<Vec<OrderKey>, CoordinatorError> {
    if order_by.is_empty() || order_by.len() > MAX_ORDER_KEYS {
        return Err(refuse(format!(
            "the first row of a participant is ordered by 1 to {MAX_ORDER_KEYS} columns of the table"
        )));
    }
    order_by
        .iter()
        .map(|k| {
            let Expr::Column(c) = strip(&k.expr) else {
                return Err(refuse(format!(
                    "order a participant's rows by columns of the table, not by `{}`",
                    k.expr
                )));
            };
            inner.resolve(c)?;
            Ok(OrderKey {
                column: c.name.clone(),
                descending: !k.asc,
                nulls_first: k.nulls_first,
            })
        })
        .collect()
}

/// `(SELECT pid, value, ROW_NUMBER() OVER (PARTITION BY pid ORDER BY measured_on DESC) AS rn
/// FROM labs WHERE …) t`, read with `WHERE rn = 1`: each participant's first row by that
/// order, a derived table of one row per participant whose columns are `First` values.
/// Returns it with the name of its row-number column, which the query must test (`rn = 1`).
pub fn first_row_table(
    plan: &LogicalPlan,
    catalog: &Catalog,
) -> Result<Option<(PerParticipant, String)>, CoordinatorError> {
    let LogicalPlan::Projection(p) = plan else {
        return Ok(None);
    };
    let LogicalPlan::Window(w) = p.input.as_ref() else {
        return Ok(None);
    };
    const HOW: &str = "number each participant's rows and keep the first: `ROW_NUMBER() OVER (PARTITION BY pid ORDER BY measured_on DESC) AS rn` in a subquery, and `WHERE rn = 1` outside it; or take `first_value(value ORDER BY measured_on DESC)` in a `GROUP BY pid` subquery";
    let [we] = w.window_expr.as_slice() else {
        return Err(refuse(format!(
            "a subquery may have one window function; {HOW}"
        )));
    };
    let Expr::WindowFunction(wf) = strip(we) else {
        return Err(refuse(format!(
            "unsupported window expression `{we}`; {HOW}"
        )));
    };
    if wf.fun.name() != "row_number" || !wf.params.args.is_empty() {
        return Err(refuse(format!(
            "the window function `{}` is not supported below the aggregate; {HOW}",
            wf.fun.name()
        )));
    }
    let Rel::Rows {
        table,
        qualifier,
        filters,
        grouped: None,
    } = rel(w.input.as_ref(), catalog)?
    else {
        return Err(refuse(format!(
            "ROW_NUMBER() numbers one catalog table's rows (with a WHERE); {HOW}"
        )));
    };
    let spec = table_spec(catalog, &table)?;
    let inner = Scope::single(&table, &qualifier, spec, catalog);
    if !matches!(wf.params.partition_by.as_slice(), [g] if unit_side(g, &inner).is_some()) {
        return Err(refuse(format!(
            "a window must be partitioned by the participant alone (`PARTITION BY {}`): otherwise it numbers several participants' rows together",
            spec.privacy_unit
        )));
    }
    let order = order_keys(&wf.params.order_by, &inner)?;
    let window_name = w
        .schema
        .fields()
        .last()
        .map(|f| f.name().clone())
        .unwrap_or_default();
    let mut rn = None;
    let mut columns = Vec::new();
    for e in &p.expr {
        let (name, inner_e) = match e {
            Expr::Alias(a) => (a.name.clone(), a.expr.as_ref()),
            Expr::Column(c) => (c.name.clone(), e),
            other => (other.schema_name().to_string(), other),
        };
        let Expr::Column(c) = strip(inner_e) else {
            return Err(refuse(format!(
                "a numbered subquery's columns are the participant, the row number and columns of the table, not `{e}`"
            )));
        };
        if c.name == window_name {
            rn = Some(name);
            continue;
        }
        if unit_side(inner_e, &inner).is_some() {
            continue;
        }
        inner.resolve(c)?;
        columns.push(DerivedColumn {
            name,
            value: UnitAggregate::First {
                column: c.name.clone(),
                order: order.clone(),
                nth: 1,
            },
            filter: None,
        });
    }
    let Some(rn) = rn else {
        return Err(refuse(format!("name the row number and test it: {HOW}")));
    };
    let d = PerParticipant {
        filter: conjoin(&filters, &inner)?,
        table,
        min_rows: 1,
        columns,
    };
    d.spec(catalog).map_err(|e| refuse(e.0))?;
    Ok(Some((d, rn)))
}

/// Whether `e` keeps only the first row of a numbered subquery: `rn = 1`, `rn <= 1`,
/// `rn < 2` (either way round).
/// Make a numbered subquery's derived table read row `k` of each participant with at least
/// `k` rows (`WHERE rn = k`), checked as the nodes will check it.
pub fn read_row(d: &mut PerParticipant, k: u32, catalog: &Catalog) -> Result<(), CoordinatorError> {
    for c in &mut d.columns {
        if let UnitAggregate::First { nth, .. } = &mut c.value {
            *nth = k;
        }
    }
    d.min_rows = d.min_rows.max(k);
    d.spec(catalog).map(|_| ()).map_err(|e| refuse(e.0))
}

/// The row a test of a row number keeps: `rn = k` (either way round) keeps row k, and
/// `rn <= 1`, `rn < 2` row 1; `None` for any other condition.
pub fn row_number_test(e: &Expr, rn: &str) -> Option<u32> {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = strip(e) else {
        return None;
    };
    let int = |x: &Expr| match strip(x) {
        Expr::Literal(v, _) => v
            .cast_to(&datafusion::arrow::datatypes::DataType::Int64)
            .ok()
            .and_then(|v| match v {
                ScalarValue::Int64(Some(i)) => Some(i),
                _ => None,
            }),
        _ => None,
    };
    let is_rn = |x: &Expr| matches!(strip(x), Expr::Column(c) if c.name == rn);
    let (op, k) = match (is_rn(left), is_rn(right)) {
        (true, false) => (*op, int(right)?),
        (false, true) => (op.swap()?, int(left)?),
        _ => return None,
    };
    match (op, k) {
        (Operator::Eq, k) if k >= 1 => u32::try_from(k).ok(),
        (Operator::LtEq, 1) | (Operator::Lt, 2) => Some(1),
        _ => None,
    }
}
