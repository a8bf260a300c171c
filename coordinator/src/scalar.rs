//! Scalar subqueries as statistics of the same query (issue 14, part 5):
//!
//! ```sql
//! SELECT COUNT(*) * 1000.0 / (SELECT COUNT(*) FROM participants)
//!   FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11');
//! SELECT sex, COUNT(*), (SELECT COUNT(*) FROM participants p2 WHERE p2.sex = p.sex)
//!   FROM participants p WHERE pid IN (…) GROUP BY sex;
//! ```
//!
//! A scalar subquery above the aggregate that aggregates the same table as the query, with
//! no GROUP BY of its own, uncorrelated or correlated only by equality on the query's own
//! GROUP BY columns, is the same aggregate over other rows of that table. The plan is
//! rewritten so that one request reads the rows of either: the query's aggregates keep
//! their rows with `FILTER (WHERE <the query's WHERE>)`, and the subquery becomes one more
//! aggregate with `FILTER (WHERE <its WHERE>)`, grouped by the same keys. Its value is then
//! a statistic of the same query, sharing its ε through the ordinary split, and the
//! expression around it (a ratio, a rate per 1,000) is post-processing of noisy values.
//! Each participant's rows are bounded to R over the rows of either, so a participant
//! contributes at most R rows to every statistic, as in any query.
//!
//! Anything else (another table, a join, a derived table, other correlations, a subquery
//! with its own GROUP BY) is refused with what to write instead.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::Column;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::utils::{conjunction, split_conjunction};
use datafusion::logical_expr::{Aggregate, Expr, Filter, LogicalPlan, Operator, Subquery};

use crate::error::CoordinatorError;

fn refuse(msg: impl Into<String>) -> CoordinatorError {
    CoordinatorError::Refused(msg.into())
}

/// What to write instead of a scalar subquery fedq cannot answer.
const INSTEAD: &str = "a scalar subquery is answered when it aggregates the query's own table, without GROUP BY, and is uncorrelated or correlated only on the query's GROUP BY columns (`(SELECT COUNT(*) FROM participants p2 WHERE p2.sex = p.sex)`); otherwise write a share as one average: `AVG(CASE WHEN <condition> THEN 1.0 ELSE 0 END)`";

/// Prefix of the aggregates that stand for scalar subqueries.
const SCALAR_PREFIX: &str = "scalar subquery ";

/// One table read with filters: `Filter* → [SubqueryAlias] → TableScan`.
struct Scanned<'p> {
    table: String,
    /// How the plan qualifies its columns (the alias, or the table name).
    qualifier: String,
    filters: Vec<&'p Expr>,
    /// The plan below the filters (the scan, or its alias).
    base: &'p LogicalPlan,
}

fn scanned(plan: &LogicalPlan) -> Option<Scanned<'_>> {
    let mut filters = Vec::new();
    let mut p = plan;
    while let LogicalPlan::Filter(f) = p {
        filters.push(&f.predicate);
        p = f.input.as_ref();
    }
    let base = p;
    let (table, qualifier) = match p {
        LogicalPlan::TableScan(t) => (
            t.table_name.table().to_string(),
            t.table_name.table().to_string(),
        ),
        LogicalPlan::SubqueryAlias(a) => match a.input.as_ref() {
            LogicalPlan::TableScan(t) => (
                t.table_name.table().to_string(),
                a.alias.table().to_string(),
            ),
            _ => return None,
        },
        _ => return None,
    };
    Some(Scanned {
        table,
        qualifier,
        filters,
        base,
    })
}

fn contains_scalar(e: &Expr) -> bool {
    e.exists(|x| Ok(matches!(x, Expr::ScalarSubquery(_))))
        .unwrap_or(false)
}

/// Rewrite `plan` so that its scalar subqueries are aggregates of its one aggregate (see
/// the module). Plans without scalar subqueries above the aggregate are returned as they
/// are.
pub fn inline(plan: LogicalPlan) -> Result<LogicalPlan, CoordinatorError> {
    // The scalar subqueries above the aggregate, in the order they appear.
    let mut subqueries: Vec<Subquery> = Vec::new();
    let mut node = &plan;
    let agg = loop {
        match node {
            LogicalPlan::Aggregate(a) => break a,
            n if crate::planner::is_post_processing(n) => {
                for e in node.expressions() {
                    let _ = e.apply(|x| {
                        if let Expr::ScalarSubquery(s) = x {
                            if !subqueries.contains(s) {
                                subqueries.push(s.clone());
                            }
                        }
                        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
                    });
                }
                match node.inputs().as_slice() {
                    [one] => node = one,
                    _ => return Ok(plan),
                }
            }
            _ => return Ok(plan),
        }
    };
    if subqueries.is_empty() {
        return Ok(plan);
    }
    let main = scanned(agg.input.as_ref()).ok_or_else(|| {
        refuse(format!(
            "scalar subqueries are answered over a query that reads one table with a WHERE; {INSTEAD}"
        ))
    })?;
    if agg.aggr_expr.iter().any(|e| match strip(e) {
        Expr::AggregateFunction(f) => f.params.distinct || f.params.filter.is_some(),
        _ => true,
    }) {
        return Err(refuse(format!(
            "beside a scalar subquery, the query's aggregates must be plain (no DISTINCT, no FILTER); {INSTEAD}"
        )));
    }
    let group_columns: Vec<&Column> = agg
        .group_expr
        .iter()
        .filter_map(|g| match strip(g) {
            Expr::Column(c) => Some(c),
            _ => None,
        })
        .collect();
    let main_where = conjunction(main.filters.iter().map(|f| (*f).clone()));
    // Each subquery: one aggregate of the same table, over its own WHERE.
    let mut extra = Vec::new();
    let mut either = match &main_where {
        Some(w) => vec![w.clone()],
        None => Vec::new(),
    };
    let mut all_rows = main_where.is_none();
    for (i, s) in subqueries.iter().enumerate() {
        let (aggregate, condition) = subquery_aggregate(s, &main, &group_columns)?;
        let name = format!(
            "{SCALAR_PREFIX}{}: {} of {}",
            i + 1,
            aggregate.schema_name(),
            main.table
        );
        extra.push((
            s.clone(),
            name.clone(),
            with_filter(aggregate, condition.clone()).alias(name),
        ));
        match condition {
            Some(c) => either.push(c),
            None => all_rows = true,
        }
    }
    // The query's own aggregates keep their rows, under their own names.
    let mut aggr_expr = Vec::with_capacity(agg.aggr_expr.len() + extra.len());
    for e in &agg.aggr_expr {
        let name = e.schema_name().to_string();
        let inner = strip(e).clone();
        aggr_expr.push(match &main_where {
            Some(w) => with_filter(inner, Some(w.clone())).alias(name),
            None => e.clone(),
        });
    }
    aggr_expr.extend(extra.iter().map(|(_, _, e)| e.clone()));
    // The rows of either: the query's WHERE or any subquery's.
    let input = if all_rows {
        main.base.clone()
    } else {
        let any = either
            .into_iter()
            .reduce(|a, b| a.or(b))
            .ok_or_else(|| CoordinatorError::internal("-", "no condition for a scalar subquery"))?;
        LogicalPlan::Filter(Filter::try_new(any, Arc::new(main.base.clone())).map_err(plan_error)?)
    };
    let new_agg = LogicalPlan::Aggregate(
        Aggregate::try_new(Arc::new(input), agg.group_expr.clone(), aggr_expr)
            .map_err(plan_error)?,
    );
    // Above the aggregate, each subquery reads its aggregate; an output whose name would
    // change keeps its name.
    let rewritten = plan
        .transform_up(|p| {
            if let LogicalPlan::Aggregate(_) = p {
                return Ok(Transformed::yes(new_agg.clone()));
            }
            let is_projection = matches!(p, LogicalPlan::Projection(_));
            p.map_expressions(|e| {
                if !contains_scalar(&e) {
                    return Ok(Transformed::no(e));
                }
                let name = e.schema_name().to_string();
                let replaced = e
                    .transform_up(|x| match &x {
                        Expr::ScalarSubquery(s) => {
                            match extra.iter().find(|(sub, _, _)| sub == s) {
                                Some((_, n, _)) => Ok(Transformed::yes(Expr::Column(
                                    Column::new_unqualified(n.clone()),
                                ))),
                                None => Ok(Transformed::no(x)),
                            }
                        }
                        _ => Ok(Transformed::no(x)),
                    })?
                    .data;
                Ok(Transformed::yes(
                    if is_projection && !matches!(replaced, Expr::Alias(_)) {
                        replaced.alias(name)
                    } else {
                        replaced
                    },
                ))
            })?
            .map_data(|p| p.recompute_schema())
        })
        .map_err(plan_error)?
        .data;
    Ok(rewritten)
}

/// The one aggregate of a scalar subquery over the query's table, and its WHERE with the
/// correlations on the query's GROUP BY columns left out (the grouping applies them).
fn subquery_aggregate(
    s: &Subquery,
    main: &Scanned<'_>,
    group_columns: &[&Column],
) -> Result<(Expr, Option<Expr>), CoordinatorError> {
    let mut p = s.subquery.as_ref();
    if let LogicalPlan::Projection(pr) = p {
        if pr.expr.len() != 1 || !matches!(strip(&pr.expr[0]), Expr::Column(_)) {
            return Err(refuse(format!(
                "a scalar subquery must be one aggregate, such as `(SELECT COUNT(*) FROM participants)`; {INSTEAD}"
            )));
        }
        p = pr.input.as_ref();
    }
    let LogicalPlan::Aggregate(sa) = p else {
        return Err(refuse(format!(
            "a scalar subquery must be an aggregate over the query's table; {INSTEAD}"
        )));
    };
    if !sa.group_expr.is_empty() || sa.aggr_expr.len() != 1 {
        return Err(refuse(format!(
            "a scalar subquery must be one aggregate without GROUP BY; {INSTEAD}"
        )));
    }
    let sub = scanned(sa.input.as_ref()).ok_or_else(|| {
        refuse(format!(
            "a scalar subquery must read one table with a WHERE; {INSTEAD}"
        ))
    })?;
    if sub.table != main.table {
        return Err(refuse(format!(
            "the scalar subquery reads `{}`, the query `{}`: only a subquery over the query's own table is answered, as one more statistic of it; {INSTEAD}",
            sub.table, main.table
        )));
    }
    // The subquery's columns, named as the query names them.
    let requalify = |e: Expr| -> Result<Expr, CoordinatorError> {
        e.transform_up(|x| match &x {
            Expr::Column(c) if c.relation.as_ref().is_some_and(|r| r.table() == sub.qualifier) => {
                Ok(Transformed::yes(Expr::Column(Column::new(
                    Some(main.qualifier.clone()),
                    c.name.clone(),
                ))))
            }
            Expr::OuterReferenceColumn(..) | Expr::ScalarSubquery(_) => Err(
                datafusion::error::DataFusionError::Plan("correlated".into()),
            ),
            _ => Ok(Transformed::no(x)),
        })
        .map(|t| t.data)
        .map_err(|_| {
            refuse(format!(
                "the scalar subquery is correlated on something other than the query's GROUP BY columns; {INSTEAD}"
            ))
        })
    };
    let mut kept = Vec::new();
    for f in &sub.filters {
        for c in split_conjunction(f) {
            if is_group_correlation(c, &sub.qualifier, group_columns) {
                continue;
            }
            kept.push(requalify(c.clone())?);
        }
    }
    let aggregate = requalify(strip(&sa.aggr_expr[0]).clone())?;
    match &aggregate {
        Expr::AggregateFunction(f) if !f.params.distinct && f.params.filter.is_none() => {}
        _ => {
            return Err(refuse(format!(
                "a scalar subquery's aggregate must be plain (no DISTINCT, no FILTER); {INSTEAD}"
            )))
        }
    }
    Ok((aggregate, conjunction(kept)))
}

/// `inner.col = outer.col` (either way round) on a GROUP BY column of the query.
fn is_group_correlation(e: &Expr, inner: &str, group_columns: &[&Column]) -> bool {
    let Expr::BinaryExpr(b) = strip(e) else {
        return false;
    };
    if b.op != Operator::Eq {
        return false;
    }
    let pair = |a: &Expr, o: &Expr| match (strip(a), strip(o)) {
        (Expr::Column(c), Expr::OuterReferenceColumn(_, oc)) => {
            c.relation.as_ref().is_none_or(|r| r.table() == inner)
                && c.name == oc.name
                && group_columns.iter().any(|g| g.name == oc.name)
        }
        _ => false,
    };
    pair(&b.left, &b.right) || pair(&b.right, &b.left)
}

fn with_filter(e: Expr, condition: Option<Expr>) -> Expr {
    match (e, condition) {
        (Expr::AggregateFunction(mut f), Some(c)) => {
            f.params.filter = Some(Box::new(c));
            Expr::AggregateFunction(AggregateFunction { ..f })
        }
        (e, _) => e,
    }
}

fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip(&a.expr),
        other => other,
    }
}

fn plan_error(e: datafusion::error::DataFusionError) -> CoordinatorError {
    CoordinatorError::InvalidSql(format!(
        "the query could not be planned with its scalar subqueries: {e}"
    ))
}
