//! Computed columns: the values of aggregates over expressions, `AVG(2026 - birth_year)`,
//! `SUM(CASE WHEN value > 7 THEN 1 ELSE 0 END)`, `AVG(year(f.first_on) - p.birth_year)`,
//! and an aggregate's `FILTER (WHERE c)`, which reads `CASE WHEN c THEN x END`.
//!
//! A request names each such expression ([`Computed`]) and its aggregates read it like a
//! column of the driving table. [`Computed::spec`] declares it as the catalog would
//! declare a column, by interval arithmetic over the declared bounds of the columns it
//! reads; coordinator and node run the same function, so they agree on the bounds the
//! sensitivity follows from. A node clamps the computed value to those bounds before
//! summing it, as it clamps any column, so one participant's contribution is bounded by
//! them whatever the data. An expression whose bounds do not follow from the catalog
//! (a column without `lower`/`upper`, a year of a date without a declared range) has no
//! bounds: it may be counted, not summed.
//!
//! The expression itself is the filter language ([`Predicate`]), total on every row:
//! integer arithmetic wraps, division is by a non-zero literal only, and a date difference
//! is an integer number of days.

use serde::{Deserialize, Serialize};

use crate::catalog::{parse_date, ColumnSpec, ColumnType};
use crate::group_key::DateField;
use crate::wire::{BinaryOp, Literal, Predicate, Side};

/// Most computed columns in one request.
pub const MAX_COMPUTED: usize = 16;

/// Largest magnitude of a computed column's bounds, in its precision's steps, as for sums.
pub const MAX_COMPUTED_STEPS: f64 = 1e15;

/// A named expression of the request's columns, read by its aggregates as a column of the
/// driving side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Computed {
    /// Its name; no column of the request's tables has it.
    pub name: String,
    /// Its value: a numeric expression in the filter language.
    pub value: Predicate,
}

/// Why an expression cannot be a computed column; the message says what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ComputedError(pub String);

/// A numeric value's static type and bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Value {
    float: bool,
    /// Declared (or proven) bounds, when they follow from the catalog.
    bounds: Option<(f64, f64)>,
    /// Fixed-point step of a float value (the finest of the columns it reads).
    precision: Option<f64>,
    /// Whether a literal NULL (no type of its own).
    null: bool,
}

impl Value {
    fn exact(v: f64, float: bool) -> Value {
        Value {
            float,
            bounds: Some((v, v)),
            precision: None,
            null: false,
        }
    }
}

fn err<T>(m: impl Into<String>) -> Result<T, ComputedError> {
    Err(ComputedError(m.into()))
}

impl Computed {
    /// The computed column as the catalog would declare it: an `int64` or `float64`,
    /// nullable, with `lower`/`upper` (and a `precision` for floats) when every column it
    /// reads declares bounds. `column` looks up a column of the request's tables by side
    /// and name (with the node's own policy applied, at a node).
    pub fn spec<'a>(
        &self,
        column: &dyn Fn(Side, &str) -> Option<&'a ColumnSpec>,
    ) -> Result<ColumnSpec, ComputedError> {
        let v = value(&self.value, column)?;
        if v.null {
            return err(
                "the expression is always NULL; aggregate a column or an expression of one",
            );
        }
        let precision = match (v.float, v.precision) {
            (false, _) => 1.0,
            (true, Some(p)) => p,
            // Only float literals: any step represents them.
            (true, None) => 0.001,
        };
        let bounds = v.bounds.map(|(lo, hi)| {
            // A constant gets the range from zero to it, so that lower < upper.
            let (lo, hi) = if lo == hi {
                (lo.min(0.0), hi.max(0.0))
            } else {
                (lo, hi)
            };
            if lo == hi {
                (lo, lo + precision)
            } else {
                (lo, hi)
            }
        });
        let bounds = bounds.filter(|(lo, hi)| {
            lo.is_finite()
                && hi.is_finite()
                && lo.abs().max(hi.abs()) / precision <= MAX_COMPUTED_STEPS
        });
        Ok(ColumnSpec {
            name: self.name.clone(),
            ty: if v.float {
                ColumnType::Float64
            } else {
                ColumnType::Int64
            },
            nullable: true,
            lower: bounds.map(|b| b.0),
            upper: bounds.map(|b| b.1),
            precision: v.float.then_some(precision),
            public_values: None,
            earliest: None,
            latest: None,
        })
    }
}

fn min_precision(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn corners(a: (f64, f64), b: (f64, f64), f: impl Fn(f64, f64) -> f64) -> (f64, f64) {
    let c = [f(a.0, b.0), f(a.0, b.1), f(a.1, b.0), f(a.1, b.1)];
    let lo = c.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = c.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// The declared day range of a date column, or of a date literal.
fn day_range<'a>(
    p: &Predicate,
    column: &dyn Fn(Side, &str) -> Option<&'a ColumnSpec>,
) -> Result<Option<(f64, f64)>, ComputedError> {
    match p {
        Predicate::Column { name, side } => {
            let Some(c) = column(*side, name) else {
                return err(format!(
                    "unknown column `{name}` in an aggregated expression"
                ));
            };
            if c.ty != ColumnType::Date32 {
                return err(format!(
                    "`{name}` is not a date: date parts and date differences take dates"
                ));
            }
            let range = c
                .earliest
                .as_deref()
                .and_then(parse_date)
                .zip(c.latest.as_deref().and_then(parse_date));
            Ok(range.map(|(a, b)| (f64::from(a), f64::from(b))))
        }
        Predicate::Literal {
            value: Literal::Date32(d),
        } => Ok(Some((f64::from(*d), f64::from(*d)))),
        // Months move a date by 28 to 31 days each (less up to 3 when the day is clamped
        // to a shorter month's last), then the days move it exactly.
        Predicate::ShiftDate {
            input,
            months,
            days,
        } => {
            let (m, d) = (f64::from(*months), f64::from(*days));
            let (lo, hi) = if m >= 0.0 {
                (28.0 * m - 3.0_f64.min(m * 3.0), 31.0 * m)
            } else {
                (31.0 * m, 28.0 * m + 3.0_f64.min(-m * 3.0))
            };
            Ok(day_range(input, column)?.map(|(a, b)| (a + lo + d, b + hi + d)))
        }
        // A period's first day is at most `trunc_slack` days before the date.
        Predicate::DatePart { field, input } if field.is_trunc() => {
            let slack = field.trunc_slack().unwrap_or(0) as f64;
            Ok(day_range(input, column)?.map(|(a, b)| (a - slack, b)))
        }
        _ => err(
            "date parts and date differences in an aggregate take a date column or a date literal",
        ),
    }
}

/// The calendar year of a day number (days since 1970-01-01).
fn year_of(days: f64) -> f64 {
    // Howard Hinnant's civil_from_days, on whole days.
    let z = days.floor() as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    y as f64
}

fn value<'a>(
    p: &Predicate,
    column: &dyn Fn(Side, &str) -> Option<&'a ColumnSpec>,
) -> Result<Value, ComputedError> {
    let rec = |q: &Predicate| value(q, column);
    match p {
        Predicate::Column { name, side } => {
            let Some(c) = column(*side, name) else {
                return err(format!("unknown column `{name}` in an aggregated expression"));
            };
            let float = match c.ty {
                ColumnType::Int32 | ColumnType::Int64 => false,
                ColumnType::Float64 => true,
                ColumnType::Date32 => {
                    return err(format!(
                        "`{name}` is a date: aggregate a number of it, such as `year({name})` or the days between two dates (`{name} - other_date`)"
                    ))
                }
                other => {
                    return err(format!(
                        "`{name}` is {other}, not a number; count it, or map it to numbers with `CASE WHEN … THEN 1 ELSE 0 END`"
                    ))
                }
            };
            let b = c.bounds();
            Ok(Value {
                float,
                bounds: b.map(|b| (b.lower, b.upper)),
                precision: if float { b.map(|b| b.precision) } else { None },
                null: false,
            })
        }
        Predicate::Literal { value } => match value {
            Literal::Null => Ok(Value {
                float: false,
                bounds: None,
                precision: None,
                null: true,
            }),
            Literal::Int64(v) => Ok(Value::exact(*v as f64, false)),
            Literal::Float64(v) if v.is_finite() => Ok(Value::exact(*v, true)),
            _ => err("only numbers can be aggregated; map other values to numbers with `CASE WHEN … THEN 1 ELSE 0 END`"),
        },
        Predicate::Binary { op, left, right } => binary(*op, left, right, column),
        Predicate::TryCast { input, to } => {
            // A number from text (`TRY_CAST(code AS BIGINT)`) has no declared bounds.
            let v = rec(input).unwrap_or(Value {
                float: false,
                bounds: None,
                precision: None,
                null: false,
            });
            match to {
                ColumnType::Float64 => Ok(Value { float: true, ..v }),
                ColumnType::Int32 | ColumnType::Int64 if !v.null => Ok(Value {
                    float: false,
                    // A float rounds to a neighbouring integer.
                    bounds: v.bounds.map(|(lo, hi)| (lo.floor(), hi.ceil())),
                    precision: None,
                    null: false,
                }),
                _ => err("TRY_CAST in an aggregate must give a number (BIGINT, INT or DOUBLE)"),
            }
        }
        Predicate::ShiftDate { .. } => err(
            "a date plus an interval is a date, not a number: subtract another date for the days between them",
        ),
        Predicate::DatePart { field, input } => {
            let range = day_range(input, column)?;
            let bounds = match field {
                DateField::Year => range.map(|(a, b)| (year_of(a), year_of(b))),
                f if f.is_trunc() => {
                    return err(format!(
                        "`{}` is a date, not a number: subtract another date for the days between them, or take `year(…)`",
                        field.sql("…")
                    ))
                }
                f => f.fixed_range().map(|(lo, hi)| (lo as f64, hi as f64)),
            };
            Ok(Value {
                float: false,
                bounds,
                precision: None,
                null: false,
            })
        }
        Predicate::Case {
            branches,
            otherwise,
        } => {
            let mut out: Option<Value> = None;
            let thens = branches.iter().map(|b| &b.then).chain(otherwise.as_deref());
            for t in thens {
                let v = rec(t)?;
                if v.null {
                    continue;
                }
                out = Some(match out {
                    None => v,
                    Some(o) => Value {
                        float: o.float || v.float,
                        bounds: o
                            .bounds
                            .zip(v.bounds)
                            .map(|(a, b)| (a.0.min(b.0), a.1.max(b.1))),
                        precision: min_precision(o.precision, v.precision),
                        null: false,
                    },
                });
            }
            out.map_or_else(
                || err("every branch of the CASE is NULL; give it a number"),
                Ok,
            )
        }
        _ => err(
            "a condition is not a number: aggregate `CASE WHEN <condition> THEN 1 ELSE 0 END`, or count the rows with `COUNT(*) FILTER (WHERE <condition>)`",
        ),
    }
}

fn binary<'a>(
    op: BinaryOp,
    left: &Predicate,
    right: &Predicate,
    column: &dyn Fn(Side, &str) -> Option<&'a ColumnSpec>,
) -> Result<Value, ComputedError> {
    // `date - date`: whole days.
    if op == BinaryOp::Minus {
        let is_date = |p: &Predicate| match p {
            Predicate::Literal {
                value: Literal::Date32(_),
            } => true,
            Predicate::Column { name, side } => {
                column(*side, name).is_some_and(|c| c.ty == ColumnType::Date32)
            }
            Predicate::DatePart { field, .. } => field.is_trunc(),
            Predicate::ShiftDate { .. } => true,
            _ => false,
        };
        if is_date(left) && is_date(right) {
            let bounds = day_range(left, column)?
                .zip(day_range(right, column)?)
                .map(|(a, b)| (a.0 - b.1, a.1 - b.0));
            return Ok(Value {
                float: false,
                bounds,
                precision: None,
                null: false,
            });
        }
    }
    let (l, r) = (value(left, column)?, value(right, column)?);
    if l.null || r.null {
        return Ok(Value { null: true, ..l });
    }
    let float = l.float || r.float;
    let both = l.bounds.zip(r.bounds);
    let (bounds, precision) = match op {
        BinaryOp::Plus => (
            both.map(|(a, b)| (a.0 + b.0, a.1 + b.1)),
            min_precision(l.precision, r.precision),
        ),
        BinaryOp::Minus => (
            both.map(|(a, b)| (a.0 - b.1, a.1 - b.0)),
            min_precision(l.precision, r.precision),
        ),
        BinaryOp::Multiply => {
            // A literal factor scales the other side's step.
            let scale = |v: &Value, by: &Value| match (v.precision, by.bounds) {
                (Some(p), Some((c, d))) if c == d && by.precision.is_none() && c != 0.0 => {
                    Some(p * c.abs())
                }
                (p, _) => p,
            };
            (
                both.map(|(a, b)| corners(a, b, |x, y| x * y)),
                min_precision(scale(&l, &r), scale(&r, &l)),
            )
        }
        BinaryOp::Divide => {
            let divisor = match right {
                Predicate::Literal {
                    value: Literal::Int64(d),
                } if *d != 0 && *d != -1 => *d as f64,
                Predicate::Literal {
                    value: Literal::Float64(d),
                } if d.is_finite() && *d != 0.0 && *d != -1.0 => *d,
                _ => return err("an aggregated expression may divide only by a number literal other than 0 and -1"),
            };
            (
                l.bounds.map(|(a, b)| {
                    let (x, y) = (a / divisor, b / divisor);
                    // Integer division truncates towards zero, inside the real range.
                    (x.min(y), x.max(y))
                }),
                l.precision.map(|p| p / divisor.abs()),
            )
        }
        _ => {
            return err(
                "a condition is not a number: aggregate `CASE WHEN <condition> THEN 1 ELSE 0 END`, or count the rows with `COUNT(*) FILTER (WHERE <condition>)`",
            )
        }
    };
    Ok(Value {
        float,
        bounds,
        precision: if float { precision } else { None },
        null: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, ty: ColumnType, lo: Option<f64>, hi: Option<f64>) -> ColumnSpec {
        ColumnSpec {
            name: name.into(),
            ty,
            nullable: true,
            lower: lo,
            upper: hi,
            precision: (ty == ColumnType::Float64).then_some(0.01),
            public_values: None,
            earliest: None,
            latest: None,
        }
    }

    fn spec_of(value: Predicate, cols: &[ColumnSpec]) -> Result<ColumnSpec, ComputedError> {
        let lookup = |_: Side, n: &str| cols.iter().find(|c| c.name == n);
        Computed {
            name: "e".into(),
            value,
        }
        .spec(&lookup)
    }

    fn bin(op: BinaryOp, l: Predicate, r: Predicate) -> Predicate {
        Predicate::Binary {
            op,
            left: Box::new(l),
            right: Box::new(r),
        }
    }

    fn int(v: i64) -> Predicate {
        Predicate::Literal {
            value: Literal::Int64(v),
        }
    }

    #[test]
    fn affine_expressions_of_bounded_columns_have_interval_bounds() {
        let cols = [col(
            "birth_year",
            ColumnType::Int64,
            Some(1900.0),
            Some(2030.0),
        )];
        let s = spec_of(
            bin(BinaryOp::Minus, int(2026), Predicate::column("birth_year")),
            &cols,
        )
        .unwrap();
        assert_eq!(
            (s.ty, s.lower, s.upper),
            (ColumnType::Int64, Some(-4.0), Some(126.0))
        );
        let s = spec_of(
            bin(BinaryOp::Multiply, Predicate::column("birth_year"), int(-2)),
            &cols,
        )
        .unwrap();
        assert_eq!((s.lower, s.upper), (Some(-4060.0), Some(-3800.0)));
    }

    #[test]
    fn indicator_cases_are_bounded_by_their_labels() {
        let cols = [col("value", ColumnType::Float64, Some(0.0), Some(20.0))];
        let when = bin(BinaryOp::Gt, Predicate::column("value"), int(7));
        let case = Predicate::Case {
            branches: vec![crate::wire::ValueBranch {
                when: when.clone(),
                then: int(1),
            }],
            otherwise: Some(Box::new(int(0))),
        };
        let s = spec_of(case, &cols).unwrap();
        assert_eq!(
            (s.ty, s.lower, s.upper),
            (ColumnType::Int64, Some(0.0), Some(1.0))
        );
        // A FILTER without ELSE: the value, or NULL.
        let filtered = Predicate::Case {
            branches: vec![crate::wire::ValueBranch {
                when,
                then: Predicate::column("value"),
            }],
            otherwise: None,
        };
        let s = spec_of(filtered, &cols).unwrap();
        assert_eq!(
            (s.ty, s.lower, s.upper, s.precision),
            (ColumnType::Float64, Some(0.0), Some(20.0), Some(0.01))
        );
    }

    #[test]
    fn date_differences_and_years_follow_declared_date_ranges() {
        let mut d = col("first_on", ColumnType::Date32, None, None);
        d.earliest = Some("2000-01-01".into());
        d.latest = Some("2025-12-31".into());
        let mut e = col("enrolled_on", ColumnType::Date32, None, None);
        e.earliest = Some("2010-01-01".into());
        e.latest = Some("2020-12-31".into());
        let cols = [
            d,
            e,
            col("birth_year", ColumnType::Int64, Some(1900.0), Some(2030.0)),
        ];
        let days = spec_of(
            bin(
                BinaryOp::Minus,
                Predicate::column("first_on"),
                Predicate::column("enrolled_on"),
            ),
            &cols,
        )
        .unwrap();
        assert_eq!(days.lower, Some(-7670.0)); // 2000-01-01 − 2020-12-31
        assert_eq!(days.upper, Some(5843.0)); // 2025-12-31 − 2010-01-01
        let age = spec_of(
            bin(
                BinaryOp::Minus,
                Predicate::DatePart {
                    field: DateField::Year,
                    input: Box::new(Predicate::column("first_on")),
                },
                Predicate::column("birth_year"),
            ),
            &cols,
        )
        .unwrap();
        assert_eq!((age.lower, age.upper), (Some(-30.0), Some(125.0)));
    }

    #[test]
    fn unbounded_columns_give_no_bounds_and_conditions_are_refused() {
        let cols = [
            col("raw", ColumnType::Int64, None, None),
            col("code", ColumnType::Utf8, None, None),
        ];
        let s = spec_of(bin(BinaryOp::Plus, Predicate::column("raw"), int(1)), &cols).unwrap();
        assert_eq!((s.lower, s.upper), (None, None));
        let e = spec_of(Predicate::column("code"), &cols).unwrap_err();
        assert!(e.0.contains("CASE WHEN"), "{e}");
        let e = spec_of(bin(BinaryOp::Gt, Predicate::column("raw"), int(1)), &cols).unwrap_err();
        assert!(e.0.contains("FILTER"), "{e}");
    }

    #[test]
    fn year_of_matches_the_calendar() {
        for (d, y) in [
            ("1970-01-01", 1970.0),
            ("2000-02-29", 2000.0),
            ("1899-12-31", 1899.0),
            ("2024-12-31", 2024.0),
        ] {
            assert_eq!(year_of(f64::from(parse_date(d).unwrap())), y, "{d}");
        }
    }
}
