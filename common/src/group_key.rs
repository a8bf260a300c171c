//! GROUP BY keys on the wire, and the public domain each one has.
//!
//! A key is a catalog column or a *bucketed* column: a `CASE` with literal labels, an
//! integer division (`birth_year / 10`, optionally `* 10`), or a calendar field of a date
//! (`date_part('month', measured_on)`). Every form is a total function of one row, so each
//! row lands in exactly one group and bucketing changes no sensitivity.
//!
//! [`GroupKey::domain`] derives the key's public domain from the key itself and the
//! catalog, identically on both sides: the coordinator to plan the released groups, the node
//! to check that it returns only those. Where no public domain follows from the catalog, the
//! key is [`KeyDomain::Open`] and its groups can only be released through DP partition
//! selection.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::catalog::{ColumnSpec, ColumnType, PublicValue};
use crate::wire::{ColumnRef, Literal, Predicate};

/// Most `WHEN` branches in one `CASE` key.
pub const MAX_CASE_BRANCHES: usize = 64;
/// Most values of a domain derived from a column's bounds (`birth_year / 10` over
/// `[1900, 2030]` has 14). A wider one is treated as having no public domain.
pub const MAX_DERIVED_DOMAIN: usize = 1_000;
/// Largest divisor or multiplier of an integer bucket.
pub const MAX_BUCKET_FACTOR: i64 = 1_000_000_000;

/// One GROUP BY key of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "key", rename_all = "snake_case", deny_unknown_fields)]
pub enum GroupKey {
    /// A catalog column, grouped by its value.
    Column { column: ColumnRef },
    /// `CASE WHEN b₁.when THEN b₁.then … ELSE otherwise END`: the label of the first
    /// branch whose condition is true (a NULL condition is not true), else `otherwise`.
    /// The labels (text, or integers) are the key's public domain: they come from the
    /// query, not the data.
    Case {
        branches: Vec<CaseBranch>,
        otherwise: Literal,
    },
    /// `column / divisor * multiplier` of an integer column, with integer division that
    /// truncates towards zero (as SQL does). With a domain derived from the column's
    /// bounds, the value is first clamped to them, as sums clamp it, so a value outside
    /// the bounds lands in the first or last bucket rather than in no bucket.
    IntBucket {
        column: ColumnRef,
        divisor: i64,
        multiplier: i64,
    },
    /// `date_part(field, column)` of a date column, as an integer.
    DatePart { field: DateField, column: ColumnRef },
    /// A condition that is never NULL (`pid IN (SELECT pid FROM …)`, `x IS NULL`, and
    /// `NOT`/`AND`/`OR` of such, see [`Predicate::never_null`]), as a boolean key: its
    /// domain is {true, false}, and every row is in one of the two groups.
    Condition { when: Predicate },
    /// A column whose values the query lists (`WHERE code IN ('C50', 'C34') GROUP BY
    /// code`): the list comes from the query text, so it is the key's public domain, even
    /// for a column the catalog gives none. Exactly the listed groups are released.
    Listed {
        column: ColumnRef,
        values: Vec<PublicValue>,
    },
}

/// One `WHEN … THEN …` of a [`GroupKey::Case`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseBranch {
    /// Condition, in the filter language.
    pub when: Predicate,
    /// Label of the rows for which it is the first true condition.
    pub then: Literal,
}

/// A calendar field of a date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DateField {
    /// Calendar year: its domain is every year from the column's `earliest` to its
    /// `latest` date, or open if the catalog declares no such range.
    Year,
    /// Quarter, 1 to 4.
    Quarter,
    /// Month, 1 to 12.
    Month,
    /// ISO 8601 week of the year, 1 to 53 (`date_part('week', d)`, DuckDB's `week(d)`):
    /// weeks start on Monday, and the first week holds the year's first Thursday, so the
    /// first days of January may be in week 52 or 53 of the year before.
    Week,
    /// Day of the month, 1 to 31.
    Day,
    /// Day of the week, 0 (Sunday) to 6 (Saturday), as PostgreSQL's and DuckDB's `dow`.
    DayOfWeek,
    /// ISO day of the week, 1 (Monday) to 7 (Sunday), as `isodow`.
    IsoDayOfWeek,
    /// Day of the year, 1 to 366, as `doy`.
    DayOfYear,
    /// `date_trunc('year', d)`: the first day of the date's year, as days since 1970-01-01
    /// (a date in a predicate). Its domain is every such day from the column's `earliest`
    /// to its `latest` date, or open without that range.
    TruncYear,
    /// `date_trunc('quarter', d)`: the first day of the date's quarter, with a domain like
    /// [`DateField::TruncYear`]'s.
    TruncQuarter,
    /// `date_trunc('month', d)`: the first day of the date's month, as days since
    /// 1970-01-01, with a domain like [`DateField::TruncYear`]'s (at most 1,000 months).
    TruncMonth,
    /// `date_trunc('week', d)`: the Monday that starts the date's ISO week (at most 1,000
    /// weeks, about 19 years, for a public domain).
    TruncWeek,
    /// `date_trunc('day', d)`: the date itself (at most 1,000 days for a public domain).
    TruncDay,
}

/// How a researcher may write calendar fields, for refusals that list them.
pub const DATE_FIELD_SPELLINGS: &str =
    "date_part / EXTRACT of 'year', 'quarter', 'month', 'week', 'day', 'dow', 'isodow' or 'doy' \
     (or year(d), quarter(d), month(d), week(d), day(d), dayofweek(d), isodow(d), dayofyear(d)), \
     and date_trunc of 'year', 'quarter', 'month', 'week' or 'day'";

/// The functions named after a field (DuckDB's spellings of `date_part`), with the field.
pub const DATE_FUNCTIONS: [(&str, DateField); 11] = [
    ("year", DateField::Year),
    ("quarter", DateField::Quarter),
    ("month", DateField::Month),
    ("week", DateField::Week),
    ("weekofyear", DateField::Week),
    ("day", DateField::Day),
    ("dayofmonth", DateField::Day),
    ("dayofweek", DateField::DayOfWeek),
    ("isodow", DateField::IsoDayOfWeek),
    ("dayofyear", DateField::DayOfYear),
    ("doy", DateField::DayOfYear),
];

impl DateField {
    /// The field as `date_part` (or `date_trunc`) names it.
    pub fn name(self) -> &'static str {
        match self {
            DateField::Year | DateField::TruncYear => "year",
            DateField::Quarter | DateField::TruncQuarter => "quarter",
            DateField::Month | DateField::TruncMonth => "month",
            DateField::Week | DateField::TruncWeek => "week",
            DateField::Day | DateField::TruncDay => "day",
            DateField::DayOfWeek => "dow",
            DateField::IsoDayOfWeek => "isodow",
            DateField::DayOfYear => "doy",
        }
    }

    /// Whether this is a `date_trunc` (a date) rather than a `date_part` (an integer).
    pub fn is_trunc(self) -> bool {
        matches!(
            self,
            DateField::TruncYear
                | DateField::TruncQuarter
                | DateField::TruncMonth
                | DateField::TruncWeek
                | DateField::TruncDay
        )
    }

    /// Parse a `date_trunc` unit (case-insensitive).
    pub fn parse_trunc(s: &str) -> Option<DateField> {
        match s.to_ascii_lowercase().as_str() {
            "year" | "years" => Some(DateField::TruncYear),
            "quarter" | "quarters" => Some(DateField::TruncQuarter),
            "month" | "months" => Some(DateField::TruncMonth),
            "week" | "weeks" => Some(DateField::TruncWeek),
            "day" | "days" => Some(DateField::TruncDay),
            _ => None,
        }
    }

    /// How SQL writes it, around `arg`: `date_part('month', arg)` or `date_trunc('month', arg)`.
    pub fn sql(self, arg: &str) -> String {
        let f = if self.is_trunc() {
            "date_trunc"
        } else {
            "date_part"
        };
        format!("{f}('{}', {arg})", self.name())
    }

    /// Parse a `date_part` field name (case-insensitive), in PostgreSQL's and DuckDB's
    /// spellings.
    pub fn parse(s: &str) -> Option<DateField> {
        match s.to_ascii_lowercase().as_str() {
            "year" | "years" => Some(DateField::Year),
            "quarter" | "quarters" => Some(DateField::Quarter),
            "month" | "months" => Some(DateField::Month),
            "week" | "weeks" => Some(DateField::Week),
            "day" | "days" => Some(DateField::Day),
            "dow" | "dayofweek" => Some(DateField::DayOfWeek),
            "isodow" => Some(DateField::IsoDayOfWeek),
            "doy" | "dayofyear" => Some(DateField::DayOfYear),
            _ => None,
        }
    }

    /// The field of a function named after it (`week(d)`, `dayofweek(d)`).
    pub fn of_function(name: &str) -> Option<DateField> {
        let name = name.to_ascii_lowercase();
        DATE_FUNCTIONS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
    }

    /// The smallest and largest value of a `date_part` field that does not depend on the
    /// date's range (every field but the year); `None` for the year and for truncations.
    pub fn fixed_range(self) -> Option<(i64, i64)> {
        match self {
            DateField::Quarter => Some((1, 4)),
            DateField::Month => Some((1, 12)),
            DateField::Week => Some((1, 53)),
            DateField::Day => Some((1, 31)),
            DateField::DayOfWeek => Some((0, 6)),
            DateField::IsoDayOfWeek => Some((1, 7)),
            DateField::DayOfYear => Some((1, 366)),
            _ => None,
        }
    }

    /// For a truncation, the most days from its first day to a date it truncates.
    pub fn trunc_slack(self) -> Option<i64> {
        match self {
            DateField::TruncYear => Some(365),
            DateField::TruncQuarter => Some(91),
            DateField::TruncMonth => Some(30),
            DateField::TruncWeek => Some(6),
            DateField::TruncDay => Some(0),
            _ => None,
        }
    }

    /// For a truncation, the first day (days since 1970-01-01) of the period that holds
    /// day `d`; the same arithmetic the node evaluates.
    pub fn truncate(self, d: i64) -> Option<i64> {
        let (y, m, day) = crate::catalog::civil_from_days(d);
        let y = i32::try_from(y).ok()?;
        let first = |m: u32| i64::from(crate::catalog::days_from_civil(y, m, 1));
        match self {
            DateField::TruncYear => Some(first(1)),
            DateField::TruncQuarter => Some(first((m - 1) / 3 * 3 + 1)),
            DateField::TruncMonth => Some(d - i64::from(day) + 1),
            // 1970-01-01 was a Thursday: (d + 3) mod 7 days since the Monday before.
            DateField::TruncWeek => Some(d - (d + 3).rem_euclid(7)),
            DateField::TruncDay => Some(d),
            _ => None,
        }
    }
}

/// The public domain of a key, as far as the key and the catalog determine it.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyDomain {
    /// Every value the key can take (after clamping), deduplicated: released in full.
    Public(Vec<PublicValue>),
    /// No public domain: only partition selection may release its groups.
    Open,
}

/// Why a key is malformed for its column (the message names the fix).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(pub String);

impl From<ColumnRef> for GroupKey {
    fn from(column: ColumnRef) -> Self {
        GroupKey::Column { column }
    }
}

impl From<&str> for GroupKey {
    fn from(name: &str) -> Self {
        GroupKey::Column {
            column: ColumnRef::left(name),
        }
    }
}

impl GroupKey {
    /// The column the key reads, for every form but `CASE` (whose conditions may read any).
    pub fn column(&self) -> Option<&ColumnRef> {
        match self {
            GroupKey::Column { column }
            | GroupKey::Listed { column, .. }
            | GroupKey::IntBucket { column, .. }
            | GroupKey::DatePart { column, .. } => Some(column),
            GroupKey::Case { .. } | GroupKey::Condition { .. } => None,
        }
    }

    /// The type of the key's values: the column's for a plain column, Utf8 or Int64 for a
    /// `CASE` (its labels), Int64 for buckets and date parts.
    pub fn output_type(&self, column: Option<&ColumnSpec>) -> Result<ColumnType, KeyError> {
        match self {
            GroupKey::Column { .. } | GroupKey::Listed { .. } => column
                .map(|c| c.ty)
                .ok_or_else(|| KeyError("the key's column is not in the catalog".into())),
            GroupKey::Case { .. } => Ok(match self.case_labels()?.first() {
                Some(PublicValue::Text(_)) => ColumnType::Utf8,
                _ => ColumnType::Int64,
            }),
            GroupKey::IntBucket { .. } | GroupKey::DatePart { .. } => Ok(ColumnType::Int64),
            GroupKey::Condition { .. } => Ok(ColumnType::Boolean),
        }
    }

    /// Structural size: expression nodes in `CASE` conditions (0 for other forms).
    pub fn node_count(&self) -> usize {
        match self {
            GroupKey::Case { branches, .. } => {
                branches.iter().map(|b| b.when.node_count() + 1).sum()
            }
            GroupKey::Condition { when } => when.node_count() + 1,
            _ => 0,
        }
    }

    /// Its conditions (the `WHEN`s of a `CASE` key; none for other forms).
    pub fn predicates(&self) -> Vec<&Predicate> {
        match self {
            GroupKey::Case { branches, .. } => branches.iter().map(|b| &b.when).collect(),
            GroupKey::Condition { when } => vec![when],
            _ => Vec::new(),
        }
    }

    /// Deepest `CASE` condition (0 for other forms).
    pub fn depth(&self) -> usize {
        match self {
            GroupKey::Case { branches, .. } => {
                branches.iter().map(|b| b.when.depth()).max().unwrap_or(0)
            }
            GroupKey::Condition { when } => when.depth(),
            _ => 0,
        }
    }

    /// The labels of a `CASE` key, deduplicated in order of first appearance (`ELSE` last).
    /// Every label must be a text or an integer literal, all of one kind.
    fn case_labels(&self) -> Result<Vec<PublicValue>, KeyError> {
        let GroupKey::Case {
            branches,
            otherwise,
        } = self
        else {
            return Ok(vec![]);
        };
        if branches.is_empty() {
            return Err(KeyError("a CASE key needs at least one WHEN branch".into()));
        }
        if branches.len() > MAX_CASE_BRANCHES {
            return Err(KeyError(format!(
                "a CASE key has {} WHEN branches; the limit is {MAX_CASE_BRANCHES}",
                branches.len()
            )));
        }
        let mut seen = BTreeSet::new();
        let mut labels = Vec::new();
        for l in branches.iter().map(|b| &b.then).chain([otherwise]) {
            let v = match l {
                Literal::Utf8(s) => PublicValue::Text(s.clone()),
                Literal::Int64(i) => PublicValue::Int(*i),
                Literal::Null => {
                    return Err(KeyError(
                        "a CASE key needs a label in every THEN and an ELSE label: a NULL label would be a group the results cannot show; write ELSE 'other'".into(),
                    ))
                }
                other => {
                    return Err(KeyError(format!(
                        "CASE labels must be text or integer literals, not {other:?}"
                    )))
                }
            };
            if std::mem::discriminant(&v) != std::mem::discriminant(labels.first().unwrap_or(&v)) {
                return Err(KeyError(
                    "CASE labels must all be text or all be integers".into(),
                ));
            }
            if seen.insert(v.clone()) {
                labels.push(v);
            }
        }
        Ok(labels)
    }

    /// Check the key against its column (`None` for `CASE`) and derive its domain.
    pub fn domain(&self, column: Option<&ColumnSpec>) -> Result<KeyDomain, KeyError> {
        let need = |what: &str| {
            column.ok_or_else(|| {
                KeyError(format!("the column of a {what} key is not in the catalog"))
            })
        };
        match self {
            GroupKey::Column { .. } => {
                let c = need("GROUP BY")?;
                Ok(match &c.public_values {
                    Some(values) => KeyDomain::Public(dedup(values.iter().cloned())),
                    None => KeyDomain::Open,
                })
            }
            GroupKey::Listed { values, .. } => {
                let c = need("GROUP BY")?;
                if values.is_empty() || values.len() > MAX_DERIVED_DOMAIN {
                    return Err(KeyError(format!(
                        "a listed key needs 1 to {MAX_DERIVED_DOMAIN} values, not {}",
                        values.len()
                    )));
                }
                for v in values {
                    let fits = matches!(
                        (v, c.ty),
                        (PublicValue::Text(_), ColumnType::Utf8)
                            | (PublicValue::Int(_), ColumnType::Int32 | ColumnType::Int64)
                            | (PublicValue::Bool(_), ColumnType::Boolean)
                    );
                    if !fits {
                        return Err(KeyError(format!(
                            "the listed value {v} is not a value of `{}` ({})",
                            c.name, c.ty
                        )));
                    }
                }
                Ok(KeyDomain::Public(dedup(values.iter().cloned())))
            }
            GroupKey::Case { .. } => Ok(KeyDomain::Public(self.case_labels()?)),
            GroupKey::Condition { when } => {
                if !when.never_null() {
                    return Err(KeyError(
                        "a condition used as a key may be NULL on some rows, which would form a group the results cannot show; \
                         write CASE WHEN <condition> THEN 'yes' ELSE 'no' END"
                            .into(),
                    ));
                }
                Ok(KeyDomain::Public(vec![
                    PublicValue::Bool(false),
                    PublicValue::Bool(true),
                ]))
            }
            GroupKey::IntBucket {
                divisor,
                multiplier,
                ..
            } => {
                let c = need("integer bucket")?;
                if !matches!(c.ty, ColumnType::Int32 | ColumnType::Int64) {
                    return Err(KeyError(format!(
                        "`{}` is {}: integer division buckets need an integer column",
                        c.name, c.ty
                    )));
                }
                if !(1..=MAX_BUCKET_FACTOR).contains(divisor) {
                    return Err(KeyError(format!(
                        "bucket divisor {divisor} must be between 1 and {MAX_BUCKET_FACTOR}"
                    )));
                }
                if !(1..=*divisor).contains(multiplier) {
                    return Err(KeyError(format!(
                        "bucket multiplier {multiplier} must be between 1 and the divisor {divisor} (write `x / 10 * 10`)"
                    )));
                }
                if let Some(values) = &c.public_values {
                    return Ok(KeyDomain::Public(dedup(values.iter().filter_map(
                        |v| match v {
                            PublicValue::Int(x) => Some(PublicValue::Int(x / divisor * multiplier)),
                            _ => None,
                        },
                    ))));
                }
                Ok(match self.clamp_range(Some(c)) {
                    Some((lo, hi)) => {
                        let (a, b) = (lo / divisor, hi / divisor);
                        if b - a >= MAX_DERIVED_DOMAIN as i64 {
                            KeyDomain::Open
                        } else {
                            KeyDomain::Public(
                                (a..=b).map(|q| PublicValue::Int(q * multiplier)).collect(),
                            )
                        }
                    }
                    None => KeyDomain::Open,
                })
            }
            GroupKey::DatePart { field, .. } => {
                let c = need("date_part")?;
                if c.ty != ColumnType::Date32 {
                    return Err(KeyError(format!(
                        "`{}` is {}: date_part keys need a date32 column",
                        c.name, c.ty
                    )));
                }
                Ok(match field {
                    DateField::Year => match c.date_range() {
                        Some((_, (first, last))) if last - first < MAX_DERIVED_DOMAIN as i32 => {
                            KeyDomain::Public(
                                (first..=last).map(|y| PublicValue::Int(y.into())).collect(),
                            )
                        }
                        _ => KeyDomain::Open,
                    },
                    f if f.is_trunc() => trunc_domain(*f, c),
                    f => match f.fixed_range() {
                        Some((lo, hi)) => {
                            KeyDomain::Public((lo..=hi).map(PublicValue::Int).collect())
                        }
                        None => KeyDomain::Open,
                    },
                })
            }
        }
    }

    /// The range the node clamps a key's input to before computing it, when the key's
    /// domain comes from that range: for an integer bucket over its column's bounds (no
    /// public values), `[ceil(lower), floor(upper)]`; for the year of a date column with a
    /// declared `earliest`/`latest`, those dates as days since 1970-01-01.
    pub fn clamp_range(&self, column: Option<&ColumnSpec>) -> Option<(i64, i64)> {
        if let GroupKey::DatePart { field, .. } = self {
            if !(*field == DateField::Year || field.is_trunc()) {
                return None;
            }
            return match self.domain(column) {
                Ok(KeyDomain::Public(_)) => column?
                    .date_range()
                    .map(|((e, l), _)| (i64::from(e), i64::from(l))),
                _ => None,
            };
        }
        let GroupKey::IntBucket { divisor, .. } = self else {
            return None;
        };
        let c = column?;
        if c.public_values.is_some() {
            return None;
        }
        let (lo, hi) = (c.lower?, c.upper?);
        // Bounds beyond i64 cannot be integer values anyway.
        let lo = lo.ceil().clamp(i64::MIN as f64, i64::MAX as f64) as i64;
        let hi = hi.floor().clamp(i64::MIN as f64, i64::MAX as f64) as i64;
        if lo > hi || hi / divisor - lo / divisor >= MAX_DERIVED_DOMAIN as i64 {
            return None;
        }
        Some((lo, hi))
    }
}

/// The first days (as days since 1970-01-01) of every year, quarter, month, week or day
/// from a date column's `earliest` to its `latest` date: the public domain of its
/// `date_trunc`, if it declares that range and it spans at most [`MAX_DERIVED_DOMAIN`] of
/// them.
fn trunc_domain(field: DateField, c: &ColumnSpec) -> KeyDomain {
    let Some(((e, l), _)) = c.date_range() else {
        return KeyDomain::Open;
    };
    let (Some(mut d), Some(last)) = (field.truncate(e.into()), field.truncate(l.into())) else {
        return KeyDomain::Open;
    };
    let mut firsts = Vec::new();
    while d <= last {
        if firsts.len() >= MAX_DERIVED_DOMAIN {
            return KeyDomain::Open;
        }
        firsts.push(PublicValue::Int(d));
        // The next period starts after its longest possible length, truncated.
        let Some(next) = field.truncate(d + field.trunc_slack().unwrap_or(0) + 1) else {
            return KeyDomain::Open;
        };
        d = next;
    }
    KeyDomain::Public(firsts)
}

fn dedup(values: impl Iterator<Item = PublicValue>) -> Vec<PublicValue> {
    let mut seen = BTreeSet::new();
    values.filter(|v| seen.insert(v.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int_col(lower: Option<f64>, upper: Option<f64>) -> ColumnSpec {
        ColumnSpec {
            name: "birth_year".into(),
            ty: ColumnType::Int32,
            nullable: false,
            lower,
            upper,
            precision: None,
            public_values: None,
            earliest: None,
            latest: None,
        }
    }

    #[test]
    fn decades_come_from_the_bounds() {
        let k = GroupKey::IntBucket {
            column: "birth_year".into(),
            divisor: 10,
            multiplier: 1,
        };
        let c = int_col(Some(1900.0), Some(2030.0));
        assert_eq!(
            k.domain(Some(&c)).unwrap(),
            KeyDomain::Public((190..=203).map(PublicValue::Int).collect())
        );
        assert_eq!(k.clamp_range(Some(&c)), Some((1900, 2030)));
        let k10 = GroupKey::IntBucket {
            column: "birth_year".into(),
            divisor: 10,
            multiplier: 10,
        };
        let KeyDomain::Public(d) = k10.domain(Some(&c)).unwrap() else {
            panic!("open")
        };
        assert_eq!(d.first(), Some(&PublicValue::Int(1900)));
        assert_eq!(d.last(), Some(&PublicValue::Int(2030)));
        // No bounds, or too many buckets: open (partition selection).
        assert_eq!(
            k.domain(Some(&int_col(None, None))).unwrap(),
            KeyDomain::Open
        );
        let wide = int_col(Some(0.0), Some(1e9));
        assert_eq!(k.domain(Some(&wide)).unwrap(), KeyDomain::Open);
        assert_eq!(k.clamp_range(Some(&wide)), None);
        // Truncation towards zero, as SQL divides integers.
        let neg = int_col(Some(-15.0), Some(15.0));
        assert_eq!(
            k.domain(Some(&neg)).unwrap(),
            KeyDomain::Public((-1..=1).map(PublicValue::Int).collect())
        );
    }

    #[test]
    fn bad_buckets_are_refused() {
        let c = int_col(Some(1900.0), Some(2030.0));
        for (d, m) in [(0, 1), (-10, 1), (10, 0), (10, 20)] {
            let k = GroupKey::IntBucket {
                column: "birth_year".into(),
                divisor: d,
                multiplier: m,
            };
            assert!(k.domain(Some(&c)).is_err(), "{d} {m}");
        }
        let mut text = c.clone();
        text.ty = ColumnType::Utf8;
        let k = GroupKey::IntBucket {
            column: "birth_year".into(),
            divisor: 10,
            multiplier: 1,
        };
        assert!(k.domain(Some(&text)).is_err());
    }

    #[test]
    fn case_labels_are_the_domain() {
        let when = |v: i64| Predicate::Binary {
            op: crate::wire::BinaryOp::Lt,
            left: Box::new(Predicate::column("birth_year")),
            right: Box::new(Predicate::Literal {
                value: Literal::Int64(v),
            }),
        };
        let k = GroupKey::Case {
            branches: vec![
                CaseBranch {
                    when: when(1950),
                    then: Literal::Utf8("old".into()),
                },
                CaseBranch {
                    when: when(1990),
                    then: Literal::Utf8("mid".into()),
                },
                CaseBranch {
                    when: when(1960),
                    then: Literal::Utf8("old".into()),
                },
            ],
            otherwise: Literal::Utf8("young".into()),
        };
        assert_eq!(
            k.domain(None).unwrap(),
            KeyDomain::Public(vec![
                PublicValue::Text("old".into()),
                PublicValue::Text("mid".into()),
                PublicValue::Text("young".into())
            ])
        );
        assert_eq!(k.output_type(None).unwrap(), ColumnType::Utf8);
        let mut no_else = k.clone();
        if let GroupKey::Case { otherwise, .. } = &mut no_else {
            *otherwise = Literal::Null;
        }
        assert!(no_else.domain(None).unwrap_err().0.contains("ELSE"));
        let mut mixed = k.clone();
        if let GroupKey::Case { otherwise, .. } = &mut mixed {
            *otherwise = Literal::Int64(3);
        }
        assert!(mixed.domain(None).is_err());
    }

    #[test]
    fn date_parts_have_calendar_domains() {
        let mut c = int_col(None, None);
        c.ty = ColumnType::Date32;
        let k = |field| GroupKey::DatePart {
            field,
            column: "measured_on".into(),
        };
        assert_eq!(
            k(DateField::Month).domain(Some(&c)).unwrap(),
            KeyDomain::Public((1..=12).map(PublicValue::Int).collect())
        );
        assert_eq!(
            k(DateField::Year).domain(Some(&c)).unwrap(),
            KeyDomain::Open
        );
        assert_eq!(k(DateField::Year).clamp_range(Some(&c)), None);
        // With a declared date range: its years, and dates clamped into it.
        c.earliest = Some("2019-06-01".into());
        c.latest = Some("2024-01-31".into());
        assert_eq!(
            k(DateField::Year).domain(Some(&c)).unwrap(),
            KeyDomain::Public((2019..=2024).map(PublicValue::Int).collect())
        );
        assert_eq!(
            k(DateField::Year).clamp_range(Some(&c)),
            Some((18_048, 19_753))
        );
        assert_eq!(k(DateField::Month).clamp_range(Some(&c)), None);
        assert!(k(DateField::Month)
            .domain(Some(&int_col(None, None)))
            .is_err());
        assert_eq!(DateField::parse("YEAR"), Some(DateField::Year));
        assert_eq!(DateField::parse("dow"), Some(DateField::DayOfWeek));
        assert_eq!(DateField::parse("epoch"), None);
        assert_eq!(DateField::of_function("WeekOfYear"), Some(DateField::Week));
        for (f, n) in [
            (DateField::Week, 53),
            (DateField::DayOfWeek, 7),
            (DateField::IsoDayOfWeek, 7),
            (DateField::DayOfYear, 366),
        ] {
            match k(f).domain(Some(&c)).unwrap() {
                KeyDomain::Public(v) => assert_eq!(v.len(), n, "{f:?}"),
                KeyDomain::Open => panic!("{f:?} has a fixed domain"),
            }
            assert_eq!(k(f).clamp_range(Some(&c)), None, "{f:?} needs no clamp");
        }
    }

    fn date(s: &str) -> i64 {
        crate::catalog::parse_date(s).unwrap().into()
    }

    #[test]
    fn truncations_give_the_first_day_of_the_period() {
        let t = |f: DateField, d: &str| crate::catalog::format_days(f.truncate(date(d)).unwrap());
        assert_eq!(t(DateField::TruncYear, "2024-12-31"), "2024-01-01");
        assert_eq!(t(DateField::TruncQuarter, "2024-03-31"), "2024-01-01");
        assert_eq!(t(DateField::TruncQuarter, "2024-09-30"), "2024-07-01");
        assert_eq!(t(DateField::TruncQuarter, "1900-11-15"), "1900-10-01");
        assert_eq!(t(DateField::TruncMonth, "2000-02-29"), "2000-02-01");
        // ISO weeks start on Monday; 2021-01-03 is a Sunday in the week of 2020-12-28.
        assert_eq!(t(DateField::TruncWeek, "2021-01-03"), "2020-12-28");
        assert_eq!(t(DateField::TruncWeek, "2021-01-04"), "2021-01-04");
        assert_eq!(t(DateField::TruncWeek, "1969-12-31"), "1969-12-29");
        assert_eq!(t(DateField::TruncDay, "1955-07-09"), "1955-07-09");
        // Every day lands within its period's slack of the period's first day, and the
        // first day truncates to itself.
        for f in [
            DateField::TruncYear,
            DateField::TruncQuarter,
            DateField::TruncMonth,
            DateField::TruncWeek,
            DateField::TruncDay,
        ] {
            let slack = f.trunc_slack().unwrap();
            let mut longest = 0;
            for d in date("1896-01-01")..date("2104-12-31") {
                let first = f.truncate(d).unwrap();
                assert!(first <= d && d - first <= slack, "{f:?} of {d}");
                assert_eq!(f.truncate(first), Some(first), "{f:?} of {d}");
                longest = longest.max(d - first);
            }
            assert_eq!(longest, slack, "{f:?}: the slack is tight");
        }
        assert_eq!(DateField::Month.truncate(0), None);
    }

    #[test]
    fn truncated_keys_release_every_period_of_the_declared_range_up_to_the_limit() {
        let mut c = int_col(None, None);
        c.ty = ColumnType::Date32;
        c.earliest = Some("2020-02-15".into());
        c.latest = Some("2021-01-06".into());
        let k = |field| GroupKey::DatePart {
            field,
            column: "measured_on".into(),
        };
        let firsts = |f, c: &ColumnSpec| match k(f).domain(Some(c)).unwrap() {
            KeyDomain::Public(v) => v
                .into_iter()
                .map(|v| match v {
                    PublicValue::Int(d) => crate::catalog::format_days(d),
                    other => panic!("{other:?}"),
                })
                .collect::<Vec<_>>(),
            KeyDomain::Open => vec![],
        };
        assert_eq!(
            firsts(DateField::TruncQuarter, &c),
            [
                "2020-01-01",
                "2020-04-01",
                "2020-07-01",
                "2020-10-01",
                "2021-01-01"
            ]
        );
        let weeks = firsts(DateField::TruncWeek, &c);
        assert_eq!(weeks.first().map(String::as_str), Some("2020-02-10"));
        assert_eq!(weeks.last().map(String::as_str), Some("2021-01-04"));
        assert_eq!(weeks.len(), 48);
        assert_eq!(firsts(DateField::TruncDay, &c).len(), 327);
        assert_eq!(firsts(DateField::TruncMonth, &c).len(), 12);
        assert!(k(DateField::TruncDay).clamp_range(Some(&c)).is_some());
        // More than 1,000 days: no public domain, so partition selection decides.
        c.earliest = Some("2000-01-01".into());
        assert_eq!(
            k(DateField::TruncDay).domain(Some(&c)).unwrap(),
            KeyDomain::Open
        );
        assert_eq!(k(DateField::TruncDay).clamp_range(Some(&c)), None);
        assert_eq!(
            firsts(DateField::TruncWeek, &c).len(),
            0,
            "over 1,000 weeks"
        );
        assert_eq!(firsts(DateField::TruncQuarter, &c).len(), 85);
    }

    #[test]
    fn keys_round_trip_as_json() {
        let k = GroupKey::DatePart {
            field: DateField::Month,
            column: ColumnRef::right("measured_on"),
        };
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(
            json,
            r#"{"key":"date_part","field":"month","column":{"side":1,"name":"measured_on"}}"#
        );
        assert_eq!(serde_json::from_str::<GroupKey>(&json).unwrap(), k);
        assert!(serde_json::from_str::<GroupKey>(
            r#"{"key":"column","column":{"name":"sex"},"sql":"x"}"#
        )
        .is_err());
    }

    #[test]
    fn a_listed_key_releases_its_values_and_refuses_values_of_another_type() {
        let code = ColumnSpec {
            name: "code".into(),
            ty: ColumnType::Utf8,
            ..int_col(None, None)
        };
        let key = |values: Vec<PublicValue>| GroupKey::Listed {
            column: ColumnRef::left("code"),
            values,
        };
        let t = |s: &str| PublicValue::Text(s.into());
        assert_eq!(
            key(vec![t("C50"), t("E11"), t("C50")]).domain(Some(&code)),
            Ok(KeyDomain::Public(vec![t("C50"), t("E11")]))
        );
        assert!(key(vec![]).domain(Some(&code)).is_err());
        let err = key(vec![t("C50"), PublicValue::Int(3)])
            .domain(Some(&code))
            .unwrap_err();
        assert!(err.0.contains("not a value of `code`"), "{err}");
        let json = serde_json::to_string(&key(vec![t("C50")])).unwrap();
        assert_eq!(
            serde_json::from_str::<GroupKey>(&json).unwrap(),
            key(vec![t("C50")])
        );
    }
}
