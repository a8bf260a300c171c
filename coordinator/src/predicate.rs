//! Translation of a DataFusion `WHERE` expression into the wire [`Predicate`] language.
//!
//! Only deterministic, total constructs are translated: comparisons, boolean logic,
//! `IN`, `BETWEEN`, `LIKE`/`ILIKE`, `IS [NOT] NULL`, wrapping integer arithmetic, division
//! by a literal other than 0 and -1, and `TRY_CAST`. `CAST` of a column is refused because
//! it can fail on one participant's value and so reveal it; `CAST` of a literal is folded
//! here, at plan time, where failing depends on the SQL text only.

use datafusion::common::{Column, ScalarValue};
use datafusion::logical_expr::{BinaryExpr, Expr, Operator};
use fedq_common::{BinaryOp, Catalog, ColumnRef, ColumnType, Literal, Predicate, Side, TableSpec};

use crate::error::CoordinatorError;

fn refuse(msg: impl Into<String>) -> CoordinatorError {
    CoordinatorError::Refused(msg.into())
}

/// A catalog table as the query names it.
#[derive(Debug, Clone, Copy)]
pub struct Relation<'a> {
    /// Catalog table name.
    pub table: &'a str,
    /// The name columns are qualified with in the plan: the alias, or the table name.
    pub qualifier: &'a str,
    /// Its declaration.
    pub spec: &'a TableSpec,
}

/// The tables a query reads: one, or the tables of a join on the privacy unit.
#[derive(Debug, Clone)]
pub struct Scope<'a> {
    /// The driving (`FROM`) table.
    pub left: Relation<'a>,
    /// The joined tables, in order (side k is `joined[k - 1]`).
    pub joined: Vec<Relation<'a>>,
    /// The catalog, for the tables of subqueries.
    pub catalog: &'a Catalog,
}

impl<'a> Scope<'a> {
    /// One table, whose columns the plan qualifies with `qualifier` (its alias or name).
    pub fn single(
        table: &'a str,
        qualifier: &'a str,
        spec: &'a TableSpec,
        catalog: &'a Catalog,
    ) -> Scope<'a> {
        Scope {
            left: Relation {
                table,
                qualifier,
                spec,
            },
            joined: Vec::new(),
            catalog,
        }
    }

    /// The table of `side`, if the query has it.
    pub fn relation(&self, side: Side) -> Option<Relation<'a>> {
        match side.join_index() {
            None => Some(self.left),
            Some(k) => self.joined.get(k).copied(),
        }
    }

    /// Every side with its table, the driving one first.
    pub fn sides(&self) -> impl Iterator<Item = (Side, Relation<'a>)> + '_ {
        std::iter::once((Side::LEFT, self.left)).chain(
            self.joined
                .iter()
                .enumerate()
                .map(|(k, r)| (Side::joined(k), *r)),
        )
    }

    /// The side and table a column of the plan belongs to; an error naming the column
    /// if it is in neither table.
    pub fn resolve(&self, c: &Column) -> Result<(Side, Relation<'a>), CoordinatorError> {
        if self.joined.is_empty() {
            let l = self.left;
            if l.spec.column(&c.name).is_none() {
                return Err(CoordinatorError::InvalidSql(format!(
                    "column `{}` is not in table `{}`; its columns are: {}",
                    c.name,
                    l.table,
                    column_list(l.spec)
                )));
            }
            return Ok((Side::LEFT, l));
        }
        let found: Vec<(Side, Relation<'a>)> = match &c.relation {
            // By alias; or by table name (a filter inside an aliased subquery) when no
            // alias matches.
            Some(r) => {
                let by_alias: Vec<_> = self
                    .sides()
                    .filter(|(_, rel)| rel.qualifier == r.table())
                    .collect();
                if by_alias.is_empty() {
                    self.sides()
                        .filter(|(_, rel)| rel.table == r.table())
                        .collect()
                } else {
                    by_alias
                }
            }
            None => self
                .sides()
                .filter(|(_, rel)| rel.spec.column(&c.name).is_some())
                .collect(),
        };
        match found.as_slice() {
            [(side, rel)] => {
                if rel.spec.column(&c.name).is_none() {
                    return Err(CoordinatorError::InvalidSql(format!(
                        "column `{}` is not in table `{}`; its columns are: {}",
                        c.name,
                        rel.table,
                        column_list(rel.spec)
                    )));
                }
                Ok((*side, *rel))
            }
            [] => Err(CoordinatorError::InvalidSql(format!(
                "column `{c}` is in none of the joined tables ({})",
                self.sides()
                    .map(|(_, r)| format!("`{}`", r.table))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            _ => Err(CoordinatorError::InvalidSql(format!(
                "column `{}` is ambiguous: both joined tables have it; qualify it, e.g. `{}.{}`",
                c.name, self.left.qualifier, c.name
            ))),
        }
    }

    /// The wire reference of a column of the plan, and its table.
    pub fn column_ref(&self, c: &Column) -> Result<(ColumnRef, Relation<'a>), CoordinatorError> {
        let (side, rel) = self.resolve(c)?;
        Ok((
            ColumnRef {
                side,
                name: c.name.clone(),
            },
            rel,
        ))
    }

    /// How a column is named in messages and labels: `value`, or `labs.value` in a join.
    pub fn label(&self, rel: &Relation<'_>, name: &str) -> String {
        if self.joined.is_empty() {
            return name.to_string();
        }
        // A self-join tells its sides apart by alias.
        let tables: Vec<&str> = self.sides().map(|(_, r)| r.table).collect();
        let self_join = (1..tables.len()).any(|i| tables[..i].contains(&tables[i]));
        if self_join {
            format!("{}.{name}", rel.qualifier)
        } else {
            format!("{}.{name}", rel.table)
        }
    }
}

/// The operands of a chain of `op` (`a AND b AND c` → `[a, b, c]`), in order, without
/// recursion.
fn flatten_chain(e: &Expr, op: Operator) -> Vec<&Expr> {
    let mut out = Vec::new();
    let mut stack = vec![e];
    while let Some(e) = stack.pop() {
        match e {
            Expr::BinaryExpr(b) if b.op == op => {
                stack.push(&b.right);
                stack.push(&b.left);
            }
            other => out.push(other),
        }
    }
    out
}

/// `terms` joined by `op` as a balanced tree, leaning left (three terms give `(a op b) op
/// c`, as SQL reads them), so its depth grows with the logarithm of their number.
fn balanced(mut terms: Vec<Predicate>, op: BinaryOp) -> Predicate {
    if terms.len() <= 1 {
        return terms.pop().unwrap_or(Predicate::Literal {
            value: Literal::Boolean(op == BinaryOp::And),
        });
    }
    let right = terms.split_off(terms.len().div_ceil(2));
    Predicate::Binary {
        op,
        left: Box::new(balanced(terms, op)),
        right: Box::new(balanced(right, op)),
    }
}

/// Translate a filter over the tables of `scope`.
pub fn to_predicate(expr: &Expr, scope: &Scope<'_>) -> Result<Predicate, CoordinatorError> {
    let rec = |e: &Expr| to_predicate(e, scope).map(Box::new);
    Ok(match expr {
        Expr::Alias(a) => return to_predicate(&a.expr, scope),
        Expr::Column(c) => {
            let (side, _) = scope.resolve(c)?;
            Predicate::Column {
                name: c.name.clone(),
                side,
            }
        }
        Expr::Literal(v, _) => Predicate::Literal {
            value: literal(v)?,
        },
        Expr::BinaryExpr(BinaryExpr { left, op, right })
            if matches!(op, Operator::Plus | Operator::Minus) && interval_literal(right).is_some() =>
        {
            // `CURRENT_DATE - INTERVAL '1 year'`, `DATE '2020-01-01' + INTERVAL '30 days'`:
            // folded here into a date literal, from the query text and the date.
            let sign = if *op == Operator::Minus { -1 } else { 1 };
            let bad = || {
                refuse(format!(
                    "the interval must be whole months and days (`INTERVAL '1 year'`, `INTERVAL '30 days'`), \
                     at most {} years either way, and give a valid date",
                    fedq_common::wire::MAX_SHIFT_MONTHS / 12
                ))
            };
            let interval = interval_literal(right).ok_or_else(bad)?;
            match to_predicate(left, scope)? {
                Predicate::Literal {
                    value: Literal::Date32(day),
                } => Predicate::Literal {
                    value: Literal::Date32(shift_date(day, interval, sign).ok_or_else(bad)?),
                },
                // `p.enrolled_on + INTERVAL '1 year'`: each node moves each row's date.
                base => {
                    let (months, days, nanos) = interval;
                    let (months, days) = (
                        months.checked_mul(sign).ok_or_else(bad)?,
                        days.checked_mul(sign).ok_or_else(bad)?,
                    );
                    if nanos != 0
                        || months.unsigned_abs() > fedq_common::wire::MAX_SHIFT_MONTHS.unsigned_abs()
                        || days.unsigned_abs() > fedq_common::wire::MAX_SHIFT_DAYS.unsigned_abs()
                    {
                        return Err(bad());
                    }
                    Predicate::ShiftDate {
                        input: Box::new(base),
                        months,
                        days,
                    }
                }
            }
        }
        Expr::BinaryExpr(BinaryExpr {
            op: op @ (Operator::And | Operator::Or),
            ..
        }) => {
            // AND (OR) is associative, in SQL's three-valued logic too: a chain of them is
            // sent as a balanced tree, so 40 ORed conditions nest 6 levels deep rather than
            // 40 (the nodes accept 32).
            let wire = if *op == Operator::And {
                BinaryOp::And
            } else {
                BinaryOp::Or
            };
            let terms = flatten_chain(expr, *op)
                .into_iter()
                .map(|t| to_predicate(t, scope))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(balanced(terms, wire));
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let op = match op {
                Operator::Eq => BinaryOp::Eq,
                Operator::NotEq => BinaryOp::NotEq,
                Operator::Lt => BinaryOp::Lt,
                Operator::LtEq => BinaryOp::LtEq,
                Operator::Gt => BinaryOp::Gt,
                Operator::GtEq => BinaryOp::GtEq,
                Operator::And => BinaryOp::And,
                Operator::Or => BinaryOp::Or,
                Operator::Plus => BinaryOp::Plus,
                Operator::Minus => BinaryOp::Minus,
                Operator::Multiply => BinaryOp::Multiply,
                Operator::Divide => {
                    let ok = match right.as_ref() {
                        Expr::Literal(v, _) => literal_divisor_is_safe(v),
                        _ => false,
                    };
                    if !ok {
                        return Err(refuse(
                            "division in WHERE is only allowed by a numeric literal other than 0 and -1: \
                             dividing by a column can fail on one participant's value. Use NULLIF(x, 0) \
                             outside fedq or rewrite the condition as a multiplication",
                        ));
                    }
                    BinaryOp::Divide
                }
                Operator::Modulo => {
                    return Err(refuse(
                        "`%` in WHERE is not supported: it can fail on a zero divisor; rewrite the condition",
                    ))
                }
                other => {
                    return Err(refuse(format!(
                        "operator `{other}` is not supported in WHERE; use comparisons, AND/OR/NOT, IN, BETWEEN, LIKE, IS NULL, + - * and TRY_CAST"
                    )))
                }
            };
            Predicate::Binary {
                op,
                left: rec(left)?,
                right: rec(right)?,
            }
        }
        Expr::Not(e) => Predicate::Not { input: rec(e)? },
        Expr::IsNull(e) => Predicate::IsNull { input: rec(e)? },
        Expr::IsNotNull(e) => Predicate::IsNotNull { input: rec(e)? },
        Expr::Negative(e) => match e.as_ref() {
            Expr::Literal(v, _) => Predicate::Literal {
                value: negate(literal(v)?)?,
            },
            other => Predicate::Binary {
                op: BinaryOp::Minus,
                left: Box::new(Predicate::Literal {
                    value: Literal::Int64(0),
                }),
                right: rec(other)?,
            },
        },
        Expr::InList(l) => Predicate::InList {
            input: rec(&l.expr)?,
            list: l
                .list
                .iter()
                .map(|e| to_predicate(e, scope))
                .collect::<Result<_, _>>()?,
            negated: l.negated,
        },
        Expr::Between(b) => Predicate::Between {
            input: rec(&b.expr)?,
            low: rec(&b.low)?,
            high: rec(&b.high)?,
            negated: b.negated,
        },
        Expr::Like(l) => {
            if l.escape_char.is_some() {
                return Err(refuse("LIKE ... ESCAPE is not supported; use the default escape"));
            }
            let pattern = match l.pattern.as_ref() {
                Expr::Literal(ScalarValue::Utf8(Some(p)), _)
                | Expr::Literal(ScalarValue::Utf8View(Some(p)), _)
                | Expr::Literal(ScalarValue::LargeUtf8(Some(p)), _) => p.clone(),
                _ => return Err(refuse("the pattern of LIKE must be a string literal")),
            };
            // Checked here as every node checks it: a pattern a batch could fail to compile
            // would make a node's outcome depend on its rows.
            fedq_common::like::check_like_pattern(&pattern).map_err(refuse)?;
            Predicate::Like {
                input: rec(&l.expr)?,
                pattern,
                negated: l.negated,
                case_insensitive: l.case_insensitive,
            }
        }
        Expr::TryCast(c) => {
            let input = rec(&c.expr)?;
            let to = column_type(c.field.data_type())?;
            // As every node checks: a cast without an Arrow kernel fails at the node.
            for from in input_types(&input, scope) {
                if !from.try_cast_supported(to) {
                    return Err(refuse(format!(
                        "TRY_CAST from {from} to {to} is not supported; convert through another type"
                    )));
                }
            }
            Predicate::TryCast { input, to }
        }
        Expr::Cast(c) => match c.expr.as_ref() {
            Expr::Literal(v, _) => {
                let folded = v.cast_to(c.field.data_type()).map_err(|_| {
                    CoordinatorError::InvalidSql(format!(
                        "cannot cast literal {v} to {}",
                        c.field.data_type()
                    ))
                })?;
                Predicate::Literal {
                    value: literal(&folded)?,
                }
            }
            _ => {
                return Err(refuse(
                    "CAST of a column can fail on one participant's value and reveal it; use TRY_CAST, which gives NULL instead",
                ))
            }
        },
        // The date the query is planned (UTC), a public input like the query text.
        Expr::ScalarFunction(f)
            if matches!(f.name(), "current_date" | "today") && f.args.is_empty() =>
        {
            Predicate::Literal {
                value: Literal::Date32(today()),
            }
        }
        Expr::ScalarFunction(f) if crate::calendar::date_part_call(f).is_some() => {
            let Some((field, arg)) = crate::calendar::date_part_call(f) else {
                return Err(refuse("unsupported date function"));
            };
            let field = field.ok_or_else(|| {
                refuse(format!("a date field must be a literal: write {}", fedq_common::group_key::DATE_FIELD_SPELLINGS))
            })?;
            Predicate::DatePart {
                field,
                input: rec(arg)?,
            }
        }
        Expr::ScalarFunction(f) => {
            return Err(refuse(format!(
                "function `{}` is not supported in WHERE yet; use comparisons, IN, BETWEEN, LIKE, IS NULL, TRY_CAST, \
                 {} of a date, and date - date (days)",
                f.name(),
                fedq_common::group_key::DATE_FIELD_SPELLINGS
            )))
        }
        Expr::InSubquery(s) => crate::cohort::in_subquery(&s.expr, &s.subquery, s.negated, scope)?,
        Expr::Exists(s) => crate::cohort::exists(&s.subquery, s.negated, scope)?,
        Expr::ScalarSubquery(_) => {
            return Err(refuse(
                "scalar subqueries are not supported in WHERE: comparing a row with a value computed over other participants' rows makes one participant's result depend on the others'. Test the participant instead: `pid IN (SELECT pid FROM <table> WHERE ...)`",
            ))
        }
        Expr::AggregateFunction(_) => {
            return Err(CoordinatorError::InvalidSql(
                "aggregate functions are not allowed in WHERE; use HAVING".into(),
            ))
        }
        Expr::Placeholder(_) => {
            return Err(refuse(
                "query parameters ($1, ?) are not supported; inline the values",
            ))
        }
        other => {
            return Err(refuse(format!(
                "expression `{other}` is not supported in WHERE; use comparisons, AND/OR/NOT, IN, BETWEEN, LIKE, IS NULL, + - * and TRY_CAST"
            )))
        }
    })
}

fn column_list(t: &TableSpec) -> String {
    t.columns
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn literal_divisor_is_safe(v: &ScalarValue) -> bool {
    match literal(v) {
        Ok(Literal::Int64(i)) => i != 0 && i != -1,
        Ok(Literal::Float64(f)) => f.is_finite() && f != 0.0,
        _ => false,
    }
}

fn negate(l: Literal) -> Result<Literal, CoordinatorError> {
    match l {
        Literal::Int64(i) => i
            .checked_neg()
            .map(Literal::Int64)
            .ok_or_else(|| CoordinatorError::InvalidSql("integer literal out of range".into())),
        Literal::Float64(f) => Ok(Literal::Float64(-f)),
        _ => Err(CoordinatorError::InvalidSql(
            "unary minus applies to numbers only".into(),
        )),
    }
}

/// A DataFusion scalar as a wire literal.
pub fn literal(v: &ScalarValue) -> Result<Literal, CoordinatorError> {
    let unsupported = || {
        CoordinatorError::Refused(format!(
            "literal {v} of type {} is not supported in WHERE; use strings, integers, floats, booleans, dates or NULL",
            v.data_type()
        ))
    };
    Ok(match v {
        ScalarValue::Null => Literal::Null,
        ScalarValue::Boolean(Some(b)) => Literal::Boolean(*b),
        ScalarValue::Int8(Some(i)) => Literal::Int64(*i as i64),
        ScalarValue::Int16(Some(i)) => Literal::Int64(*i as i64),
        ScalarValue::Int32(Some(i)) => Literal::Int64(*i as i64),
        ScalarValue::Int64(Some(i)) => Literal::Int64(*i),
        ScalarValue::UInt8(Some(i)) => Literal::Int64(*i as i64),
        ScalarValue::UInt16(Some(i)) => Literal::Int64(*i as i64),
        ScalarValue::UInt32(Some(i)) => Literal::Int64(*i as i64),
        ScalarValue::UInt64(Some(i)) => {
            Literal::Int64(i64::try_from(*i).map_err(|_| unsupported())?)
        }
        ScalarValue::Float32(Some(f)) => Literal::Float64(*f as f64),
        ScalarValue::Float64(Some(f)) => Literal::Float64(*f),
        ScalarValue::Decimal128(Some(x), _, scale) => {
            Literal::Float64(*x as f64 / 10f64.powi(*scale as i32))
        }
        ScalarValue::Utf8(Some(s))
        | ScalarValue::LargeUtf8(Some(s))
        | ScalarValue::Utf8View(Some(s)) => Literal::Utf8(s.clone()),
        ScalarValue::Date32(Some(d)) => Literal::Date32(*d),
        s if s.is_null() => Literal::Null,
        _ => return Err(unsupported()),
    })
}

/// A DataFusion type as a catalog column type (for TRY_CAST targets).
pub fn column_type(
    t: &datafusion::arrow::datatypes::DataType,
) -> Result<ColumnType, CoordinatorError> {
    use datafusion::arrow::datatypes::DataType as D;
    Ok(match t {
        D::Utf8 | D::Utf8View | D::LargeUtf8 => ColumnType::Utf8,
        D::Boolean => ColumnType::Boolean,
        D::Int32 => ColumnType::Int32,
        D::Int64 => ColumnType::Int64,
        D::Float64 => ColumnType::Float64,
        D::Date32 => ColumnType::Date32,
        other => {
            return Err(CoordinatorError::Refused(format!(
                "TRY_CAST to {other} is not supported; cast to VARCHAR, BOOLEAN, INT, BIGINT, DOUBLE or DATE"
            )))
        }
    })
}

/// The types a translated filter expression can have at a node (several where the node's
/// numeric typing could give either), for the `TRY_CAST` check.
fn input_types(p: &Predicate, scope: &Scope<'_>) -> Vec<ColumnType> {
    use fedq_common::Literal as L;
    match p {
        Predicate::Column { name, side } => scope
            .relation(*side)
            .and_then(|r| r.spec.column(name))
            .map(|c| vec![c.ty])
            .unwrap_or_default(),
        Predicate::Literal { value } => match value {
            L::Null => vec![],
            L::Boolean(_) => vec![ColumnType::Boolean],
            L::Int64(_) => vec![ColumnType::Int64],
            L::Float64(_) => vec![ColumnType::Float64],
            L::Utf8(_) => vec![ColumnType::Utf8],
            L::Date32(_) => vec![ColumnType::Date32],
        },
        Predicate::TryCast { to, .. } => vec![*to],
        Predicate::DatePart { field, .. } if field.is_trunc() => vec![ColumnType::Date32],
        Predicate::ShiftDate { .. } => vec![ColumnType::Date32],
        Predicate::DatePart { .. } => vec![ColumnType::Int64],
        Predicate::Binary {
            op: BinaryOp::Plus | BinaryOp::Minus | BinaryOp::Multiply | BinaryOp::Divide,
            ..
        } => vec![ColumnType::Int32, ColumnType::Int64, ColumnType::Float64],
        _ => vec![ColumnType::Boolean],
    }
}

/// Translate the value an aggregate reads (`2026 - birth_year`, `CASE WHEN value > 7 THEN 1
/// ELSE 0 END`, `year(f.first_on) - p.birth_year`) into the wire language. Numbers only:
/// a `CASE` takes numeric values here (its conditions are filters), and a `CAST` between
/// numeric types becomes a `TRY_CAST` (a value out of the target's range is NULL, never an
/// error). Everything else is translated as in a filter.
pub fn to_value(expr: &Expr, scope: &Scope<'_>) -> Result<Predicate, CoordinatorError> {
    let numeric = |t: &arrow::datatypes::DataType| {
        use arrow::datatypes::DataType as D;
        matches!(t, D::Int32 | D::Int64 | D::Float64)
    };
    match expr {
        Expr::Alias(a) => to_value(&a.expr, scope),
        Expr::Case(c) => {
            let mut branches = Vec::with_capacity(c.when_then_expr.len());
            for (w, t) in &c.when_then_expr {
                // `CASE x WHEN v THEN …` tests `x = v`.
                let when = match &c.expr {
                    Some(x) => {
                        Expr::BinaryExpr(BinaryExpr::new(x.clone(), Operator::Eq, w.clone()))
                    }
                    None => w.as_ref().clone(),
                };
                branches.push(fedq_common::wire::ValueBranch {
                    when: to_predicate(&when, scope)?,
                    then: to_value(t, scope)?,
                });
            }
            let otherwise = match &c.else_expr {
                Some(e) => Some(Box::new(to_value(e, scope)?)),
                None => None,
            };
            Ok(Predicate::Case {
                branches,
                otherwise,
            })
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right })
            if matches!(op, Operator::Plus | Operator::Minus | Operator::Multiply) =>
        {
            let op = match op {
                Operator::Plus => BinaryOp::Plus,
                Operator::Minus => BinaryOp::Minus,
                _ => BinaryOp::Multiply,
            };
            Ok(Predicate::Binary {
                op,
                left: Box::new(to_value(left, scope)?),
                right: Box::new(to_value(right, scope)?),
            })
        }
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Divide,
            right,
        }) if matches!(right.as_ref(), Expr::Literal(..)) => {
            let Expr::Literal(v, _) = right.as_ref() else {
                return to_predicate(expr, scope);
            };
            if !literal_divisor_is_safe(v) {
                return Err(refuse(
                    "an aggregated expression may divide only by a number literal other than 0 and -1",
                ));
            }
            Ok(Predicate::Binary {
                op: BinaryOp::Divide,
                left: Box::new(to_value(left, scope)?),
                right: Box::new(to_predicate(right, scope)?),
            })
        }
        Expr::Cast(c)
            if numeric(c.field.data_type()) && !matches!(c.expr.as_ref(), Expr::Literal(..)) =>
        {
            let to = column_type(c.field.data_type())?;
            Ok(Predicate::TryCast {
                input: Box::new(to_value(&c.expr, scope)?),
                to,
            })
        }
        _ => to_predicate(expr, scope),
    }
}

/// Days since 1970-01-01 of today's date (UTC).
fn today() -> i32 {
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    let days = (chrono::Utc::now().date_naive() - epoch).num_days();
    i32::try_from(days).unwrap_or(i32::MAX)
}

/// The interval of a literal `INTERVAL '…'`, as months, days and nanoseconds.
fn interval_literal(e: &Expr) -> Option<(i32, i32, i64)> {
    match strip_cast(e) {
        Expr::Literal(ScalarValue::IntervalMonthDayNano(Some(v)), _) => {
            Some((v.months, v.days, v.nanoseconds))
        }
        Expr::Literal(ScalarValue::IntervalYearMonth(Some(m)), _) => Some((*m, 0, 0)),
        Expr::Literal(ScalarValue::IntervalDayTime(Some(v)), _) => {
            Some((0, v.days, i64::from(v.milliseconds) * 1_000_000))
        }
        _ => None,
    }
}

fn strip_cast(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip_cast(&a.expr),
        other => other,
    }
}

/// `day` shifted by `sign` times the interval (months first, as PostgreSQL does: the day of
/// the month is clamped to the month's last), or `None` if the interval has a time part or
/// the date leaves the calendar.
fn shift_date(day: i32, (months, days, nanos): (i32, i32, i64), sign: i32) -> Option<i32> {
    if nanos != 0 {
        return None;
    }
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
    let date = epoch.checked_add_signed(chrono::TimeDelta::try_days(i64::from(day))?)?;
    let m = months.checked_mul(sign)?;
    let date = if m >= 0 {
        date.checked_add_months(chrono::Months::new(m.unsigned_abs()))?
    } else {
        date.checked_sub_months(chrono::Months::new(m.unsigned_abs()))?
    };
    let date = date.checked_add_signed(chrono::TimeDelta::try_days(
        i64::from(days) * i64::from(sign),
    )?)?;
    i32::try_from((date - epoch).num_days()).ok()
}

#[cfg(test)]
mod interval_tests {
    use super::*;

    #[test]
    fn intervals_shift_dates_by_months_then_days() {
        let d = |s: &str| fedq_common::catalog::parse_date(s).unwrap();
        assert_eq!(
            shift_date(d("2024-01-31"), (1, 0, 0), 1),
            Some(d("2024-02-29"))
        );
        assert_eq!(
            shift_date(d("2026-12-07"), (12, 0, 0), -1),
            Some(d("2025-12-07"))
        );
        assert_eq!(
            shift_date(d("2026-03-01"), (0, 30, 0), -1),
            Some(d("2026-01-30"))
        );
        assert_eq!(shift_date(d("2026-03-01"), (0, 0, 1), 1), None);
    }
}
