//! Translation of the wire filter language into a DataFusion expression.
//!
//! The translation type-checks every operator against the catalog so that the resulting
//! expression is total: DataFusion never has to insert a cast that could fail on some row
//! (which would turn a row's value into an observable error). Comparisons are allowed only
//! between values of the same kind (numbers with numbers, text with text, dates with dates,
//! booleans with booleans, or NULL); `LIKE` only applies to text, and its pattern is
//! compiled here ([`fedq_common::like::check_like_pattern`]) so it cannot fail on a batch;
//! division only by a numeric literal other than 0 and -1. Conversions must be written as
//! `TRY_CAST`.
//!
//! In a joined request a column names its side ([`Side`]); each side is resolved against
//! its own table's catalog columns and becomes a column qualified by that side's alias in
//! the join (see [`Scope`]).

use arrow::datatypes::DataType;
use datafusion::common::{Column, ScalarValue};
use datafusion::functions::datetime::expr_fn::date_part;
use datafusion::logical_expr::{binary_expr, cast, ident, lit, try_cast, when, Expr, Operator};
use fedq_common::group_key::DateField;
use fedq_common::wire::{MAX_SHIFT_DAYS, MAX_SHIFT_MONTHS};
use fedq_common::{BinaryOp, ColumnType, GroupKey, Literal, Predicate, Side, TableSpec};

use crate::engine::shown;
use crate::error::NodeError;

/// Static type of a filter sub-expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Null,
    Col(ColumnType),
}

impl Ty {
    fn is_numeric(self) -> bool {
        matches!(self, Ty::Col(t) if t.is_numeric())
    }
    fn is_null(self) -> bool {
        self == Ty::Null
    }
    fn is_boolish(self) -> bool {
        matches!(self, Ty::Null | Ty::Col(ColumnType::Boolean))
    }
    fn name(self) -> String {
        match self {
            Ty::Null => "null".into(),
            Ty::Col(t) => t.to_string(),
        }
    }
}

/// Whether two operands can be compared without a fallible cast.
fn comparable(a: Ty, b: Ty) -> bool {
    a.is_null() || b.is_null() || (a.is_numeric() && b.is_numeric()) || a == b
}

fn invalid(m: String) -> NodeError {
    NodeError::InvalidRequest(m)
}

/// A table a request reads: its catalog name and declaration.
#[derive(Clone, Copy)]
pub(crate) struct Relation<'a> {
    pub name: &'a str,
    pub spec: &'a TableSpec,
    /// The node's own policy for the table (shared columns, widest clamps, R cap).
    pub policy: &'a crate::config::TablePolicy,
}

/// The tables a request's columns resolve against: the driving table alone, or it and the
/// tables joined to it (registered in DataFusion under the aliases [`side_alias`]).
#[derive(Clone, Copy)]
pub(crate) struct Scope<'a> {
    pub left: Relation<'a>,
    /// The joined tables, in the request's order (side k is `joined[k - 1]`).
    pub joined: &'a [Relation<'a>],
    /// The participant sets the request tests, each with the column that carries its
    /// members' ids in the frame (see `crate::sets`).
    pub sets: &'a [crate::sets::SetColumn],
    /// The request's computed columns, read like columns of the driving side.
    pub computed: &'a [ComputedColumn],
}

/// A computed column ([`fedq_common::computed::Computed`]) as the node evaluates it: its
/// expression over the request's columns, and its declaration (type and bounds).
pub(crate) struct ComputedColumn {
    pub name: String,
    pub expr: Expr,
    pub spec: fedq_common::ColumnSpec,
}

/// DataFusion alias of a side's table in a join: `fedq_left` for the driving table,
/// `fedq_joinK` for side K.
pub(crate) fn side_alias(side: Side) -> String {
    match side.join_index() {
        None => "fedq_left".to_string(),
        Some(k) => format!("fedq_join{}", k + 1),
    }
}

impl<'a> Scope<'a> {
    /// The relation of `side`, or a refusal if the request has no such side.
    pub fn relation(&self, side: Side) -> Result<Relation<'a>, NodeError> {
        match side.join_index() {
            None => Ok(self.left),
            Some(k) => self.joined.get(k).copied().ok_or_else(|| {
                invalid(format!(
                    "a column refers to joined table {} of the request, which joins {}",
                    k + 1,
                    self.joined.len()
                ))
            }),
        }
    }

    /// Whether the request joins other tables (columns are then qualified by side).
    pub fn is_join(&self) -> bool {
        !self.joined.is_empty()
    }

    /// The catalog type of `name` on `side`, and the DataFusion column expression reading it.
    pub fn column(
        &self,
        side: Side,
        name: &str,
        role: &str,
    ) -> Result<(Expr, &'a fedq_common::ColumnSpec), NodeError> {
        if side.is_left() {
            if let Some(c) = self.computed.iter().find(|c| c.name == name) {
                return Ok((c.expr.clone(), &c.spec));
            }
        }
        let rel = self.relation(side)?;
        let c = rel.spec.column(name).ok_or_else(|| {
            NodeError::Refused(format!(
                "unknown column {} in {role}: table {} has no such column in the catalog",
                shown(name),
                shown(rel.name)
            ))
        })?;
        if !rel.policy.shares(name, &rel.spec.privacy_unit) {
            return Err(NodeError::Refused(format!(
                "column {} of table {} (in {role}) is not shared by this node: its node policy (`columns` in [tables.{}] of node.toml) does not list it",
                shown(name),
                shown(rel.name),
                rel.name
            )));
        }
        let e = if self.is_join() {
            Expr::Column(Column::new(Some(side_alias(side)), name))
        } else {
            ident(name.to_string())
        };
        Ok((e, c))
    }
}

/// Translate a filter to a DataFusion expression over the catalog columns of `scope`.
pub(crate) fn translate(p: &Predicate, scope: &Scope<'_>) -> Result<Expr, NodeError> {
    let (e, ty) = tr(p, scope)?;
    if !ty.is_boolish() {
        return Err(invalid(format!(
            "the filter is of type {}, not boolean",
            ty.name()
        )));
    }
    Ok(e)
}

/// Translate a computed column's value: a number (or NULL) for every row.
pub(crate) fn translate_value(p: &Predicate, scope: &Scope<'_>) -> Result<Expr, NodeError> {
    let (e, ty) = tr(p, scope)?;
    if !(ty.is_null() || ty.is_numeric()) {
        return Err(invalid(format!(
            "a computed column is of type {}, not a number",
            ty.name()
        )));
    }
    Ok(e)
}

/// The DataFusion expression computing a bucketed group key ([`GroupKey`] other than a
/// plain column), of the key's output type (Utf8 or Int64). `clamp` is the key's
/// [`GroupKey::clamp_range`]. Every form is total: `CASE` conditions are translated like
/// filters, integer buckets divide by a validated positive literal and cannot overflow
/// (the multiplier is at most the divisor), and date parts of a date always exist.
pub(crate) fn group_key_expr(
    key: &GroupKey,
    scope: &Scope<'_>,
    clamp: Option<(i64, i64)>,
) -> Result<Expr, NodeError> {
    let plan_err = |e: datafusion::error::DataFusionError| {
        invalid(format!("the group key could not be built: {e}"))
    };
    match key {
        GroupKey::Column { column } | GroupKey::Listed { column, .. } => {
            Ok(scope.column(column.side, &column.name, "GROUP BY")?.0)
        }
        // Never NULL (checked by `GroupKey::domain`), so every row is true or false.
        GroupKey::Condition { when } => translate(when, scope),
        GroupKey::Case {
            branches,
            otherwise,
        } => {
            let mut builder: Option<
                datafusion::logical_expr::conditional_expressions::CaseBuilder,
            > = None;
            for b in branches {
                let cond = translate(&b.when, scope)?;
                let (then, _) = literal(&b.then);
                builder = Some(match builder {
                    None => when(cond, then),
                    Some(mut c) => c.when(cond, then),
                });
            }
            let mut builder = builder
                .ok_or_else(|| invalid("a CASE key needs at least one WHEN branch".into()))?;
            builder.otherwise(literal(otherwise).0).map_err(plan_err)
        }
        GroupKey::IntBucket {
            column,
            divisor,
            multiplier,
        } => {
            let (e, _) = scope.column(column.side, &column.name, "GROUP BY")?;
            let mut x = cast(e, DataType::Int64);
            if let Some((lo, hi)) = clamp {
                x = when(x.clone().lt(lit(lo)), lit(lo))
                    .when(x.clone().gt(lit(hi)), lit(hi))
                    .otherwise(x)
                    .map_err(plan_err)?;
            }
            Ok((x / lit(*divisor)) * lit(*multiplier))
        }
        GroupKey::DatePart { field, column } => {
            let (mut e, _) = scope.column(column.side, &column.name, "GROUP BY")?;
            if let Some((lo, hi)) = clamp {
                let day = |d: i64| {
                    i32::try_from(d)
                        .map(|d| lit(ScalarValue::Date32(Some(d))))
                        .map_err(|_| invalid("a date bound is out of range".into()))
                };
                let (lo, hi) = (day(lo)?, day(hi)?);
                e = when(e.clone().lt(lo.clone()), lo)
                    .when(e.clone().gt(hi.clone()), hi)
                    .otherwise(e)
                    .map_err(plan_err)?;
            }
            date_field(*field, e)
        }
    }
}

/// `date_part(field, d)` of a date as an `Int64`; for a `date_trunc` field, the first day
/// of the date's period as days since 1970-01-01, by integer arithmetic on fields every
/// date has (its day of the year, month or week), so it never fails: a year's first day is
/// the date less its day of the year plus one; a quarter's adds the days of the months
/// before it (one more in a leap year); a week's is the date less its ISO day of the week
/// plus one. A date beyond the calendar's range (hundreds of thousands of years) has no
/// fields, so its truncation is NULL rather than an overflow. [`DateField::truncate`] is
/// the same calendar, on the other side. NULL stays NULL.
fn date_field(field: DateField, d: Expr) -> Result<Expr, NodeError> {
    let plan_err = |e: datafusion::error::DataFusionError| {
        invalid(format!("the date expression could not be built: {e}"))
    };
    let part = |name: &str, d: Expr| cast(date_part(lit(name), d), DataType::Int64);
    let days = cast(cast(d.clone(), DataType::Int32), DataType::Int64);
    Ok(match field {
        DateField::TruncYear => days - (part("doy", d) - lit(1i64)),
        DateField::TruncMonth => days - (part("day", d) - lit(1i64)),
        DateField::TruncDay => days,
        // The ISO day of the week is 1 on Monday.
        DateField::TruncWeek => days - (part("isodow", d) - lit(1i64)),
        DateField::TruncQuarter => {
            let year_start = days - (part("doy", d.clone()) - lit(1i64));
            let y = part("year", d.clone());
            let divides = |n: i64| (y.clone() % lit(n)).eq(lit(0i64));
            let leap = divides(4)
                .and(Expr::Not(Box::new(divides(100))))
                .or(divides(400));
            let q = part("quarter", d);
            // Days from 1 January to the quarter's first day, in a common year.
            let before = when(q.clone().eq(lit(1i64)), lit(0i64))
                .when(q.clone().eq(lit(2i64)), lit(90i64))
                .when(q.clone().eq(lit(3i64)), lit(181i64))
                .otherwise(lit(273i64))
                .map_err(plan_err)?;
            let extra = when(leap.and(q.gt(lit(1i64))), lit(1i64))
                .otherwise(lit(0i64))
                .map_err(plan_err)?;
            year_start + before + extra
        }
        other => part(other.name(), d),
    })
}

/// `d + INTERVAL 'months days'`: months first (the day clamped to the month's last), then
/// days, by DataFusion's date arithmetic, evaluated only for dates of the years 1 to 9999
/// (NULL otherwise), where a shift of at most [`MAX_SHIFT_MONTHS`] months and
/// [`MAX_SHIFT_DAYS`] days always gives a date, so it never fails.
fn shift_date(d: Expr, months: i32, days: i32) -> Result<Expr, NodeError> {
    if months.unsigned_abs() > MAX_SHIFT_MONTHS.unsigned_abs()
        || days.unsigned_abs() > MAX_SHIFT_DAYS.unsigned_abs()
    {
        return Err(invalid(format!(
            "an interval moves a date by at most {MAX_SHIFT_MONTHS} months and {MAX_SHIFT_DAYS} days"
        )));
    }
    let day = |y: i32, m: u32, dd: u32| {
        lit(ScalarValue::Date32(Some(
            fedq_common::catalog::days_from_civil(y, m, dd),
        )))
    };
    let interval = lit(ScalarValue::IntervalMonthDayNano(Some(
        arrow::datatypes::IntervalMonthDayNano::new(months, days, 0),
    )));
    when(
        d.clone().between(day(1, 1, 1), day(9999, 12, 31)),
        binary_expr(d, Operator::Plus, interval),
    )
    .end()
    .map_err(|e| invalid(format!("the date shift could not be built: {e}")))
}

fn literal(v: &Literal) -> (Expr, Ty) {
    match v {
        Literal::Null => (lit(ScalarValue::Null), Ty::Null),
        Literal::Boolean(b) => (lit(*b), Ty::Col(ColumnType::Boolean)),
        Literal::Int64(i) => (lit(*i), Ty::Col(ColumnType::Int64)),
        // NaN counts as NULL everywhere; as a literal it would also reach DataFusion's
        // interval analysis, which (55.2) asserts on the empty interval NaN makes in debug
        // builds (found by the stability property: `NaN < i / 9223372036854775807 * …`).
        Literal::Float64(f) if f.is_nan() => (
            lit(ScalarValue::Float64(None)),
            Ty::Col(ColumnType::Float64),
        ),
        Literal::Float64(f) => (lit(*f), Ty::Col(ColumnType::Float64)),
        Literal::Utf8(s) => (lit(s.clone()), Ty::Col(ColumnType::Utf8)),
        Literal::Date32(d) => (
            lit(ScalarValue::Date32(Some(*d))),
            Ty::Col(ColumnType::Date32),
        ),
    }
}

fn arith_result(a: Ty, b: Ty) -> Ty {
    match (a, b) {
        (Ty::Null, x) | (x, Ty::Null) => x,
        (Ty::Col(ColumnType::Float64), _) | (_, Ty::Col(ColumnType::Float64)) => {
            Ty::Col(ColumnType::Float64)
        }
        (Ty::Col(ColumnType::Int32), Ty::Col(ColumnType::Int32)) => Ty::Col(ColumnType::Int32),
        _ => Ty::Col(ColumnType::Int64),
    }
}

fn op_name(op: BinaryOp) -> &'static str {
    match op {
        BinaryOp::Eq => "=",
        BinaryOp::NotEq => "<>",
        BinaryOp::Lt => "<",
        BinaryOp::LtEq => "<=",
        BinaryOp::Gt => ">",
        BinaryOp::GtEq => ">=",
        BinaryOp::And => "AND",
        BinaryOp::Or => "OR",
        BinaryOp::Plus => "+",
        BinaryOp::Minus => "-",
        BinaryOp::Multiply => "*",
        BinaryOp::Divide => "/",
    }
}

fn tr(p: &Predicate, scope: &Scope<'_>) -> Result<(Expr, Ty), NodeError> {
    let rec = |q: &Predicate| tr(q, scope);
    match p {
        Predicate::Column { name, side } => {
            let (e, c) = scope.column(*side, name, "the filter")?;
            Ok((e, Ty::Col(c.ty)))
        }
        Predicate::Literal { value } => Ok(literal(value)),
        Predicate::Binary { op, left, right } => {
            let (l, lt) = rec(left)?;
            let (r, rt) = rec(right)?;
            let mismatch = || {
                invalid(format!(
                    "operator {} cannot combine {} and {}; use TRY_CAST to convert",
                    op_name(*op),
                    lt.name(),
                    rt.name()
                ))
            };
            let (dop, ty) = match op {
                BinaryOp::And | BinaryOp::Or => {
                    if !(lt.is_boolish() && rt.is_boolish()) {
                        return Err(mismatch());
                    }
                    let dop = if *op == BinaryOp::And {
                        Operator::And
                    } else {
                        Operator::Or
                    };
                    (dop, Ty::Col(ColumnType::Boolean))
                }
                BinaryOp::Eq
                | BinaryOp::NotEq
                | BinaryOp::Lt
                | BinaryOp::LtEq
                | BinaryOp::Gt
                | BinaryOp::GtEq => {
                    if !comparable(lt, rt) {
                        return Err(mismatch());
                    }
                    let dop = match op {
                        BinaryOp::Eq => Operator::Eq,
                        BinaryOp::NotEq => Operator::NotEq,
                        BinaryOp::Lt => Operator::Lt,
                        BinaryOp::LtEq => Operator::LtEq,
                        BinaryOp::Gt => Operator::Gt,
                        _ => Operator::GtEq,
                    };
                    (dop, Ty::Col(ColumnType::Boolean))
                }
                // `date - date`: the days between them, as PostgreSQL and DuckDB answer.
                // Both dates become their day numbers (an Arrow cast that cannot fail), so
                // the difference is an i64 of at most 2³² in magnitude.
                BinaryOp::Minus
                    if lt == Ty::Col(ColumnType::Date32) && rt == Ty::Col(ColumnType::Date32) =>
                {
                    let days = |e: Expr| cast(cast(e, DataType::Int32), DataType::Int64);
                    return Ok((
                        binary_expr(days(l), Operator::Minus, days(r)),
                        Ty::Col(ColumnType::Int64),
                    ));
                }
                BinaryOp::Plus | BinaryOp::Minus | BinaryOp::Multiply => {
                    let ok = |t: Ty| t.is_null() || t.is_numeric();
                    if !(ok(lt) && ok(rt)) {
                        return Err(mismatch());
                    }
                    let dop = match op {
                        BinaryOp::Plus => Operator::Plus,
                        BinaryOp::Minus => Operator::Minus,
                        _ => Operator::Multiply,
                    };
                    (dop, arith_result(lt, rt))
                }
                BinaryOp::Divide => {
                    if !(lt.is_null() || lt.is_numeric()) {
                        return Err(mismatch());
                    }
                    let total = match right.as_ref() {
                        Predicate::Literal {
                            value: Literal::Int64(d),
                        } => *d != 0 && *d != -1,
                        Predicate::Literal {
                            value: Literal::Float64(d),
                        } => d.is_finite() && *d != 0.0 && *d != -1.0,
                        _ => false,
                    };
                    if !total {
                        return Err(invalid(
                            "division is only allowed by a numeric literal other than 0 and -1 (other divisions can fail on some rows)".into(),
                        ));
                    }
                    (Operator::Divide, arith_result(lt, rt))
                }
            };
            Ok((binary_expr(l, dop, r), ty))
        }
        Predicate::Not { input } => {
            let (e, t) = rec(input)?;
            if !t.is_boolish() {
                return Err(invalid(format!("NOT needs a boolean, not {}", t.name())));
            }
            Ok((Expr::Not(Box::new(e)), Ty::Col(ColumnType::Boolean)))
        }
        Predicate::IsNull { input } => {
            let (e, _) = rec(input)?;
            Ok((e.is_null(), Ty::Col(ColumnType::Boolean)))
        }
        Predicate::IsNotNull { input } => {
            let (e, _) = rec(input)?;
            Ok((e.is_not_null(), Ty::Col(ColumnType::Boolean)))
        }
        Predicate::InList {
            input,
            list,
            negated,
        } => {
            let (e, t) = rec(input)?;
            let mut items = Vec::with_capacity(list.len());
            for item in list {
                let (ie, it) = rec(item)?;
                if !comparable(t, it) {
                    return Err(invalid(format!(
                        "IN list mixes {} with {}; use TRY_CAST to convert",
                        t.name(),
                        it.name()
                    )));
                }
                items.push(ie);
            }
            Ok((e.in_list(items, *negated), Ty::Col(ColumnType::Boolean)))
        }
        Predicate::Between {
            input,
            low,
            high,
            negated,
        } => {
            let (e, t) = rec(input)?;
            let (le, lt) = rec(low)?;
            let (he, ht) = rec(high)?;
            if !(comparable(t, lt) && comparable(t, ht)) {
                return Err(invalid(format!(
                    "BETWEEN compares {} with {} and {}; use TRY_CAST to convert",
                    t.name(),
                    lt.name(),
                    ht.name()
                )));
            }
            let b = if *negated {
                e.not_between(le, he)
            } else {
                e.between(le, he)
            };
            Ok((b, Ty::Col(ColumnType::Boolean)))
        }
        Predicate::Like {
            input,
            pattern,
            negated,
            case_insensitive,
        } => {
            let (e, t) = rec(input)?;
            if t != Ty::Col(ColumnType::Utf8) {
                return Err(invalid(format!(
                    "LIKE applies to utf8 values, not {}; use TRY_CAST(... AS utf8)",
                    t.name()
                )));
            }
            // The pattern is compiled here, before any row is read, exactly as Arrow's
            // kernel compiles it on a batch: a pattern that could fail on some batch (and so
            // fail or not depending on whether a row reached it) is refused now, whatever
            // the data.
            fedq_common::like::check_like_pattern(pattern).map_err(invalid)?;
            let pat = lit(pattern.clone());
            let like = match (*negated, *case_insensitive) {
                (false, false) => e.like(pat),
                (true, false) => e.not_like(pat),
                (false, true) => e.ilike(pat),
                (true, true) => e.not_ilike(pat),
            };
            Ok((like, Ty::Col(ColumnType::Boolean)))
        }
        Predicate::TryCast { input, to } => {
            let (e, from) = rec(input)?;
            try_cast_total(e, from, *to)
        }
        Predicate::DatePart { field, input } => {
            let (e, t) = rec(input)?;
            if !(t.is_null() || t == Ty::Col(ColumnType::Date32)) {
                return Err(invalid(format!(
                    "date_part('{}', …) needs a date, not {}",
                    field.name(),
                    t.name()
                )));
            }
            // Every field of every date exists, so this never fails; NULL stays NULL.
            let e = date_field(*field, cast(e, DataType::Date32))?;
            if field.is_trunc() {
                // The first day as a date, to compare with dates.
                return Ok((
                    cast(cast(e, DataType::Int32), DataType::Date32),
                    Ty::Col(ColumnType::Date32),
                ));
            }
            Ok((e, Ty::Col(ColumnType::Int64)))
        }
        Predicate::ShiftDate {
            input,
            months,
            days,
        } => {
            let (e, t) = rec(input)?;
            if !(t.is_null() || t == Ty::Col(ColumnType::Date32)) {
                return Err(invalid(format!(
                    "an interval is added to a date, not to {}",
                    t.name()
                )));
            }
            Ok((
                shift_date(cast(e, DataType::Date32), *months, *days)?,
                Ty::Col(ColumnType::Date32),
            ))
        }
        Predicate::Case {
            branches,
            otherwise,
        } => case_value(branches, otherwise.as_deref(), scope),
        Predicate::InSet { side, set, negated } => {
            scope.relation(*side)?;
            let Some(sc) = scope.sets.iter().find(|c| &c.set == set.as_ref()) else {
                return Err(invalid(
                    "a participant set was not prepared for this request".into(),
                ));
            };
            // The set's column is the member's id after the left join, NULL otherwise:
            // never an error, and never NULL itself.
            let member = Expr::Column(Column::new_unqualified(&sc.column));
            let e = if *negated {
                member.is_null()
            } else {
                member.is_not_null()
            };
            Ok((e, Ty::Col(ColumnType::Boolean)))
        }
    }
}

/// `CASE WHEN … THEN <number> … [ELSE <number>] END`: numeric values only (it computes the
/// values of aggregates), each cast to the result's type so that the branches agree. A NULL
/// condition is not true; without ELSE the value is NULL.
fn case_value(
    branches: &[fedq_common::wire::ValueBranch],
    otherwise: Option<&Predicate>,
    scope: &Scope<'_>,
) -> Result<(Expr, Ty), NodeError> {
    if branches.is_empty() {
        return Err(invalid("a CASE needs at least one WHEN".into()));
    }
    let mut conds = Vec::with_capacity(branches.len());
    let mut values = Vec::with_capacity(branches.len() + 1);
    for b in branches {
        let (c, ct) = tr(&b.when, scope)?;
        if !ct.is_boolish() {
            return Err(invalid(format!(
                "a CASE condition must be boolean, not {}",
                ct.name()
            )));
        }
        conds.push(c);
        values.push(tr(&b.then, scope)?);
    }
    let other = match otherwise {
        Some(o) => Some(tr(o, scope)?),
        None => None,
    };
    let mut ty = Ty::Col(ColumnType::Int64);
    for (_, t) in values.iter().chain(other.iter()) {
        if !(t.is_null() || t.is_numeric()) {
            return Err(invalid(format!(
                "a CASE value must be a number, not {}",
                t.name()
            )));
        }
        if *t == Ty::Col(ColumnType::Float64) {
            ty = *t;
        }
    }
    let target = match ty {
        Ty::Col(c) => c.arrow_type(),
        _ => DataType::Int64,
    };
    let mut builder: Option<datafusion::logical_expr::conditional_expressions::CaseBuilder> = None;
    for (c, (v, _)) in conds.into_iter().zip(values) {
        let v = cast(v, target.clone());
        builder = Some(match builder {
            None => when(c, v),
            Some(mut b) => b.when(c, v),
        });
    }
    let Some(mut builder) = builder else {
        return Err(invalid("a CASE needs at least one WHEN".into()));
    };
    let built = match other {
        Some((o, _)) => builder.otherwise(cast(o, target)),
        None => builder.end(),
    };
    let e = built.map_err(|err| invalid(format!("the CASE could not be built: {err}")))?;
    Ok((e, ty))
}

/// Days since 1970-01-01 of -262000-01-01 and +262000-12-31: dates in this range can be
/// written as text (Arrow formats a date through chrono, whose dates end a little beyond
/// the years ±262000, and fails on a date outside them even in `TRY_CAST`).
const SHOWN_DAYS: (i32, i32) = (-96_413_063, 94_974_372);

/// `TRY_CAST(e AS to)` for an `e` of static type `from`, total on every value:
///
/// - a conversion Arrow has no kernel for (e.g. boolean to date, date to float) fails when
///   the query is planned, whatever the data; it is refused here instead, before reading;
/// - a date outside the range chrono can write fails Arrow's cast to text even in safe
///   mode, so only for rows whose date is in [`SHOWN_DAYS`]: a date outside it becomes
///   NULL first (`CASE WHEN e BETWEEN … THEN e END`), like any other value `TRY_CAST`
///   cannot convert.
///
/// Every other cast between catalog types is safe in Arrow (a value that does not convert
/// is NULL). Text columns are scanned as `Utf8View` and text literals are `Utf8`, so both
/// must have a kernel.
fn try_cast_total(e: Expr, from: Ty, to: ColumnType) -> Result<(Expr, Ty), NodeError> {
    let target = to.arrow_type();
    if let Ty::Col(f) = from {
        let sources = match f {
            ColumnType::Utf8 => vec![DataType::Utf8, DataType::Utf8View],
            other => vec![other.arrow_type()],
        };
        if !sources
            .iter()
            .all(|s| arrow::compute::can_cast_types(s, &target))
        {
            return Err(invalid(format!(
                "TRY_CAST from {f} to {to} is not supported; convert through another type"
            )));
        }
    }
    // A boolean to a number is 1 or 0, written as a CASE: DataFusion's physical
    // simplifier (55.2) unwraps a cast of a boolean compared with a number into a
    // comparison of mismatched types, which its debug builds assert on (found by the fuzz
    // property over extreme values: `1970 IN (TRY_CAST(NOT b AS INT))`).
    if from == Ty::Col(ColumnType::Boolean) && to.is_numeric() {
        let n = |v: i64| {
            ScalarValue::Int64(Some(v))
                .cast_to(&target)
                .map(lit)
                .map_err(|err| invalid(format!("TRY_CAST could not be built: {err}")))
        };
        let e = when(e.clone(), n(1)?)
            .when(Expr::Not(Box::new(e)), n(0)?)
            .end()
            .map_err(|err| invalid(format!("TRY_CAST could not be built: {err}")))?;
        return Ok((e, Ty::Col(to)));
    }
    let e = if from == Ty::Col(ColumnType::Date32) && to == ColumnType::Utf8 {
        let day = |d: i32| lit(ScalarValue::Date32(Some(d)));
        when(e.clone().between(day(SHOWN_DAYS.0), day(SHOWN_DAYS.1)), e)
            .end()
            .map_err(|err| invalid(format!("TRY_CAST could not be built: {err}")))?
    } else {
        e
    };
    Ok((try_cast(e, target), Ty::Col(to)))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Array, AsArray, Date32Array, RecordBatch};
    use arrow::datatypes::{Field, Int64Type, Schema};
    use datafusion::logical_expr::col;
    use datafusion::prelude::SessionContext;

    use super::*;

    /// `d + INTERVAL` never fails: dates outside the years 1 to 9999 (down to the extremes
    /// of a date32) are NULL, the largest shifts either way give dates, and months come
    /// before days (31 January 2024 + 1 month 1 day is 1 March).
    #[tokio::test]
    async fn date_shifts_are_total_on_extreme_dates() {
        let civil = fedq_common::catalog::days_from_civil;
        let days = [
            Some(i32::MIN),
            Some(civil(1, 1, 1) - 1),
            Some(civil(1, 1, 1)),
            Some(civil(2024, 1, 31)),
            Some(civil(9999, 12, 31)),
            Some(civil(9999, 12, 31) + 1),
            Some(i32::MAX),
            None,
        ];
        let schema = Arc::new(Schema::new(vec![Field::new("d", DataType::Date32, true)]));
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(Date32Array::from(days.to_vec()))]).unwrap();
        let ctx = SessionContext::new();
        for (months, d) in [
            (MAX_SHIFT_MONTHS, MAX_SHIFT_DAYS),
            (-MAX_SHIFT_MONTHS, -MAX_SHIFT_DAYS),
            (1, 1),
        ] {
            let e = cast(shift_date(col("d"), months, d).unwrap(), DataType::Int32);
            let out = ctx
                .read_batch(batch.clone())
                .unwrap()
                .select(vec![col("d"), e.alias("s")])
                .unwrap()
                .collect()
                .await
                .unwrap();
            let b = arrow::compute::concat_batches(&out[0].schema(), &out).unwrap();
            let s = b.column(1).as_primitive::<arrow::datatypes::Int32Type>();
            let inside = [false, false, true, true, true, false, false, false];
            assert_eq!(s.len(), days.len());
            // The memory table keeps the batch's row order.
            for (i, ok) in inside.iter().enumerate() {
                assert_eq!(
                    !s.is_null(i),
                    *ok,
                    "shift {months} months {d} days of {:?}",
                    days[i]
                );
            }
            if months == 1 {
                assert_eq!(s.value(3), civil(2024, 3, 1));
            }
        }
    }

    /// The node's integer arithmetic for each `date_trunc` gives, for every day from 1696 to
    /// 2243 (leap years, century years, negative day numbers, weeks across new year), the
    /// first day that [`DateField::truncate`] (the coordinator's side, which plans the
    /// keys' domains) gives.
    #[tokio::test]
    async fn date_truncations_agree_with_the_shared_calendar_arithmetic_on_every_day() {
        let days: Vec<i32> = (-100_000..=100_000).collect();
        let schema = Arc::new(Schema::new(vec![Field::new("d", DataType::Date32, true)]));
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(Date32Array::from(
                days.iter()
                    .map(|d| Some(*d))
                    .chain([None])
                    .collect::<Vec<_>>(),
            ))],
        )
        .unwrap();
        let ctx = SessionContext::new();
        for field in [
            DateField::TruncYear,
            DateField::TruncQuarter,
            DateField::TruncMonth,
            DateField::TruncWeek,
            DateField::TruncDay,
        ] {
            let e = date_field(field, col("d")).unwrap();
            let out = ctx
                .read_batch(batch.clone())
                .unwrap()
                .select(vec![
                    cast(cast(col("d"), DataType::Int32), DataType::Int64).alias("d"),
                    e.alias("t"),
                ])
                .unwrap()
                .collect()
                .await
                .unwrap();
            let mut seen = 0;
            for b in &out {
                let (d, t) = (
                    b.column(0).as_primitive::<Int64Type>(),
                    b.column(1).as_primitive::<Int64Type>(),
                );
                for i in 0..b.num_rows() {
                    seen += 1;
                    if d.is_null(i) {
                        assert!(t.is_null(i), "{field:?}: NULL stays NULL");
                        continue;
                    }
                    let day = d.value(i);
                    let got = (!t.is_null(i)).then(|| t.value(i));
                    assert_eq!(got, field.truncate(day), "{field:?} of day {day}");
                }
            }
            assert_eq!(seen, days.len() + 1);
        }
    }
}
