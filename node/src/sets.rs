//! Participant sets at the node (`IN`/`EXISTS` subqueries, `INTERSECT`, `EXCEPT`).
//!
//! Each distinct [`ParticipantSet`] a request tests becomes a DataFusion frame of the
//! distinct participant ids in it, computed from this site's rows only, under a column
//! name of its own ([`SetColumn`]). The frame is left-joined onto the request's rows on
//! the privacy unit, so each row carries whether its participant is in the set (the
//! column is NULL when not), and the filter or `CASE` key tests it with `IS [NOT] NULL`.
//! Both the join and the test are total: no value of any row can make them fail.
//!
//! Membership depends only on the participant's own rows, so the request stays
//! participant-local: one participant more or less changes that participant's rows and
//! nobody else's (see `fedq_common::participant_set`). Bounding to R rows per participant
//! happens after, as for any request.

use datafusion::common::{Column, JoinType};
use datafusion::dataframe::DataFrame;
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::logical_expr::{ident, lit, Expr};
use fedq_common::{ParticipantSet, Side};

use crate::engine::{shown, NodeEngine};
use crate::error::NodeError;
use crate::filter::{self, Relation, Scope};

/// A set and the column that carries its members' ids in a request's frame.
#[derive(Debug, Clone)]
pub(crate) struct SetColumn {
    pub set: ParticipantSet,
    pub column: String,
}

/// Names of the columns of sets, unique within one request.
#[derive(Debug, Default)]
pub(crate) struct SetNames(usize);

impl SetNames {
    fn next(&mut self) -> String {
        self.0 += 1;
        format!("fedq_set_{}", self.0)
    }
}

/// The distinct sets among `sets`, each with a fresh column name.
pub(crate) fn set_columns(sets: Vec<&ParticipantSet>, names: &mut SetNames) -> Vec<SetColumn> {
    let mut out: Vec<SetColumn> = Vec::new();
    for s in sets {
        if !out.iter().any(|c| &c.set == s) {
            out.push(SetColumn {
                set: s.clone(),
                column: names.next(),
            });
        }
    }
    out
}

fn planned(e: datafusion::error::DataFusionError) -> NodeError {
    tracing::warn!(error = %e, "a participant set could not be planned");
    NodeError::InvalidRequest("a participant subquery could not be planned".into())
}

/// Left-join each set's frame onto `df`, on the participant id `unit` (an expression over
/// `df`), so that every row of `df` keeps its place and gains the set's column.
pub(crate) fn attach(
    engine: &NodeEngine,
    mut df: DataFrame,
    unit: Expr,
    sets: &[SetColumn],
    names: &mut SetNames,
) -> Result<DataFrame, NodeError> {
    for sc in sets {
        let frame = set_frame(engine, &sc.set, &sc.column, names)?;
        df = df
            .join_on(
                frame,
                JoinType::Left,
                [unit
                    .clone()
                    .eq(Expr::Column(Column::new_unqualified(&sc.column)))],
            )
            .map_err(planned)?;
    }
    Ok(df)
}

/// The frame of the distinct, non-NULL participant ids in `set`, in one column named
/// `column`. Refuses (before reading) a set over a table this site does not serve or whose
/// columns its policy does not share.
pub(crate) fn set_frame(
    engine: &NodeEngine,
    set: &ParticipantSet,
    column: &str,
    names: &mut SetNames,
) -> Result<DataFrame, NodeError> {
    let pair = |left: &ParticipantSet, right: &ParticipantSet, names: &mut SetNames| {
        let (lc, rc) = (names.next(), names.next());
        let l = set_frame(engine, left, &lc, names)?;
        let r = set_frame(engine, right, &rc, names)?;
        Ok::<_, NodeError>((l, lc, r, rc))
    };
    let out = match set {
        ParticipantSet::Rows {
            table,
            filter,
            min_rows,
        } => return rows_frame(engine, table, filter.as_ref(), *min_rows, column, names),
        ParticipantSet::Intersect { left, right } | ParticipantSet::Except { left, right } => {
            let (l, lc, r, rc) = pair(left, right, names)?;
            let kind = if matches!(set, ParticipantSet::Intersect { .. }) {
                JoinType::LeftSemi
            } else {
                JoinType::LeftAnti
            };
            l.join_on(r, kind, [ident(&lc).eq(ident(&rc))])
                .and_then(|d| d.select(vec![ident(&lc).alias(column)]))
        }
        ParticipantSet::Union { left, right } => {
            let (l, lc, r, rc) = pair(left, right, names)?;
            l.select(vec![ident(&lc).alias(column)]).and_then(|l| {
                r.select(vec![ident(&rc).alias(column)])
                    .and_then(|r| l.union_distinct(r))
            })
        }
    };
    out.map_err(planned)
}

/// Participants with at least `min_rows` rows of `table` passing `filter`.
fn rows_frame(
    engine: &NodeEngine,
    table: &str,
    filter: Option<&fedq_common::Predicate>,
    min_rows: u32,
    column: &str,
    names: &mut SetNames,
) -> Result<DataFrame, NodeError> {
    let t = engine.served(table)?;
    let unit = t.spec.privacy_unit.clone();
    let nested = set_columns(
        filter.map(|f| f.participant_sets()).unwrap_or_default(),
        names,
    );
    let scope = Scope {
        left: Relation {
            name: table,
            spec: &t.spec,
            policy: &t.policy,
        },
        joined: &[],
        sets: &nested,
        computed: &[],
    };
    let (unit_expr, _) = scope.column(Side::LEFT, &unit, "a participant subquery")?;
    let mut df = attach(engine, t.df.clone(), unit_expr.clone(), &nested, names)?;
    if let Some(f) = filter {
        df = df.filter(filter::translate(f, &scope)?).map_err(planned)?;
    }
    let grouped = df
        .filter(unit_expr.clone().is_not_null())
        .and_then(|d| {
            if min_rows <= 1 {
                d.aggregate(vec![unit_expr.clone()], vec![])
            } else {
                d.aggregate(
                    vec![unit_expr.clone()],
                    vec![count(lit(1)).alias("fedq_rows")],
                )
                .and_then(|d| d.filter(ident("fedq_rows").gt_eq(lit(i64::from(min_rows)))))
            }
        })
        .and_then(|d| d.select(vec![ident(&unit).alias(column)]));
    grouped.map_err(|e| {
        tracing::warn!(table = %shown(table), error = %e, "a participant set could not be planned");
        NodeError::InvalidRequest("a participant subquery could not be planned".into())
    })
}
