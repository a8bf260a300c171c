//! Columns a subquery computes (`FROM (SELECT pid, 2026 - birth_year AS age FROM
//! participants) t`, `WITH cohort AS (SELECT f.pid, year(f.first_on) - p.birth_year AS age
//! FROM … f JOIN participants p USING (pid))`), read above it as `t.age`.
//!
//! A subquery's select list is participant-local: each output row is one input row, with
//! expressions of that row's columns. So the planner reads through it: each column of the
//! subquery is replaced by the expression that defines it, over the relations below, and
//! the query is planned as if written without the subquery. Every rule that applies to an
//! expression written inline (totality, declared bounds, participant sets) then applies to
//! the computed column too.

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Expr, Projection};

use crate::error::CoordinatorError;

/// One output column of a subquery's select list, and what it is over the relations below.
#[derive(Debug, Clone)]
pub struct Rename {
    /// The name the column is qualified with above: the subquery's alias (`t` of `(…) t`),
    /// or, before it, the qualifier the select list gives it, if any.
    pub qualifier: Option<String>,
    /// The output column's name.
    pub name: String,
    /// Its definition, over the relations below the subquery.
    pub expr: Expr,
}

/// Whether `c` names this output column.
fn names(r: &Rename, c: &datafusion::common::Column) -> bool {
    r.name == c.name
        && match (&c.relation, &r.qualifier) {
            (Some(t), Some(q)) => t.table() == q,
            _ => true,
        }
}

/// Whether a select-list entry is a column below under its own name (`pid`, `t.pid AS
/// pid`), which needs no renaming.
pub fn keeps_name(e: &Expr) -> bool {
    match e {
        Expr::Column(_) => true,
        Expr::Alias(a) => matches!(a.expr.as_ref(), Expr::Column(c) if c.name == a.name),
        _ => false,
    }
}

/// `e` with every column of a subquery replaced by its definition.
pub fn substitute(e: &Expr, renames: &[Rename]) -> Result<Expr, CoordinatorError> {
    if renames.is_empty() {
        return Ok(e.clone());
    }
    e.clone()
        .transform_up(|x| {
            if let Expr::Column(c) = &x {
                if let Some(r) = renames.iter().find(|r| names(r, c)) {
                    return Ok(Transformed::yes(r.expr.clone()));
                }
            }
            Ok(Transformed::no(x))
        })
        .map(|t| t.data)
        .map_err(|e| CoordinatorError::InvalidSql(e.to_string()))
}

/// The columns of a select list, each defined over the relations below it (through the
/// renames of a subquery further down).
pub fn select_list(p: &Projection, below: &[Rename]) -> Result<Vec<Rename>, CoordinatorError> {
    p.expr
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let def = match e {
                Expr::Alias(a) => a.expr.as_ref(),
                other => other,
            };
            let expr = substitute(def, below)?;
            // Each definition is at most this deep, so a chain of subqueries each
            // computing from the last cannot build an expression deeper than the nodes
            // accept (nor one whose translation recurses without bound).
            if depth(&expr) > MAX_DEFINITION_DEPTH {
                return Err(CoordinatorError::Refused(format!(
                    "the computed column `{}` nests more than {MAX_DEFINITION_DEPTH} levels of expressions \
                     through its subqueries; compute it in fewer steps",
                    p.schema.field(i).name()
                )));
            }
            let (qualifier, field) = p.schema.qualified_field(i);
            Ok(Rename {
                qualifier: qualifier.map(|q| q.table().to_string()),
                name: field.name().clone(),
                expr,
            })
        })
        .collect()
}

/// Deepest a computed column's definition may be (twice the nodes' predicate depth, as an
/// expression carries casts and aliases a predicate does not).
pub const MAX_DEFINITION_DEPTH: usize = 2 * fedq_common::wire::MAX_EXPR_DEPTH;

/// The depth of an expression (a column is 1).
fn depth(e: &Expr) -> usize {
    let mut deepest = 0;
    // Visiting children cannot fail.
    let _ = e.apply_children(|c| {
        deepest = deepest.max(depth(c));
        Ok(TreeNodeRecursion::Continue)
    });
    deepest + 1
}

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::{col, lit};

    use super::*;

    fn rename(name: &str, expr: Expr) -> Rename {
        Rename {
            qualifier: Some("t".into()),
            name: name.into(),
            expr,
        }
    }

    #[test]
    fn a_column_of_the_subquery_becomes_its_definition_and_others_stay() {
        let age = lit(2026) - col("participants.birth_year");
        let renames = [rename("age", age.clone())];
        let e = col("t.age").gt_eq(lit(40)).and(col("s.age").eq(lit(1)));
        let out = substitute(&e, &renames).unwrap();
        assert_eq!(out, age.gt_eq(lit(40)).and(col("s.age").eq(lit(1))));
        assert_eq!(substitute(&col("x"), &[]).unwrap(), col("x"));
    }

    #[test]
    fn a_definition_is_as_deep_as_its_longest_chain_of_operations() {
        let mut e = col("participants.birth_year");
        for _ in 0..MAX_DEFINITION_DEPTH {
            e = e + lit(1);
        }
        assert!(depth(&e) > MAX_DEFINITION_DEPTH);
    }
}
