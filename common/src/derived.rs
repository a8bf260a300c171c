//! Per-participant derived tables: `(SELECT pid, MIN(diagnosed_on) AS first_on FROM
//! diagnoses WHERE code = 'I21' GROUP BY pid [HAVING COUNT(*) >= k]) f`.
//!
//! Such a table has one row per participant, computed at a node from that participant's
//! rows of one table at that site only: it is participant-local, so a request may read it
//! in place of a catalog table, with R = 1 proven by its `GROUP BY pid`. MIN and MAX are
//! private here: they stay inside one participant, and only the DP aggregate on top is
//! released. A participant at two sites has a row at each (the "first" event is per site;
//! S covers the sensitivity).
//!
//! [`PerParticipant::spec`] declares the derived table as the catalog would, from its
//! source table's declarations, and is what both sides check requests against.

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, ColumnSpec, ColumnType, TableSpec};
use crate::participant_set::MAX_MIN_ROWS;
use crate::wire::Predicate;

/// Most output columns of a derived table.
pub const MAX_DERIVED_COLUMNS: usize = 16;

/// A table of one row per participant, aggregated from that participant's rows of `table`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerParticipant {
    /// The catalog table read.
    pub table: String,
    /// The rows of it that count (the derived table's `WHERE`), over its own columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Predicate>,
    /// Participants with fewer such rows have no row (`HAVING COUNT(*) >= k`; 1 without).
    pub min_rows: u32,
    /// Its columns besides the participant's.
    pub columns: Vec<DerivedColumn>,
}

/// One column of a derived table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DerivedColumn {
    /// Its name in the derived table.
    pub name: String,
    /// How it is computed from the participant's rows.
    pub value: UnitAggregate,
    /// The rows it aggregates, of those the derived table reads (`COUNT(*) FILTER (WHERE
    /// code = 'E11')`, `MAX(CASE WHEN test = 'HbA1c' THEN value END)`), over the source
    /// table's own columns. A count of no rows is 0; any other aggregate of none is NULL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Predicate>,
}

/// An aggregate over one participant's rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "agg", rename_all = "snake_case", deny_unknown_fields)]
pub enum UnitAggregate {
    /// The smallest non-NULL value of a column (NULL if there is none).
    Min { column: String },
    /// The largest non-NULL value of a column (NULL if there is none).
    Max { column: String },
    /// The participant's rows (that pass the filter).
    CountRows,
    /// The participant's rows where a column is not NULL.
    CountNonNull { column: String },
    /// How many distinct non-NULL values a column takes in the participant's rows (the
    /// number of different diagnoses of a patient): at most their rows.
    CountDistinct { column: String },
    /// The sum of a numeric column with declared bounds, each value clamped to them first
    /// (NULL if there is no value).
    Sum { column: String },
    /// The mean of a numeric column with declared bounds, each value clamped to them
    /// first, so the mean is within them (NULL if there is no value).
    Avg { column: String },
    /// The standard deviation (`STDDEV`, sample; `STDDEV_POP`, population) of a numeric
    /// column with declared bounds, each value clamped to them first: NULL without a value
    /// (a sample one without two). At most half the bounds' width (population) or that
    /// over √2 (sample, reached by two values at opposite bounds).
    Stddev { column: String, population: bool },
    /// The variance (`VARIANCE`/`VAR_SAMP`, sample; `VAR_POP`, population) of clamped
    /// values, as [`UnitAggregate::Stddev`]: at most the width squared over 4
    /// (population) or over 2 (sample).
    Variance { column: String, population: bool },
    /// The median of clamped values (`MEDIAN`): within the bounds, NULL without a value.
    Median { column: String },
    /// Whether the condition is true for some of the participant's rows (`bool_or`): NULL
    /// conditions are skipped, NULL if all are.
    Any { when: Predicate },
    /// Whether the condition is true for all of the participant's rows (`bool_and`), NULLs
    /// skipped as for [`UnitAggregate::Any`].
    All { when: Predicate },
    /// The value of `column` in the participant's first row by `order` (`ROW_NUMBER() OVER
    /// (PARTITION BY pid ORDER BY …) = 1`, `first_value(column ORDER BY …)`). Rows that tie
    /// on `order` are ordered by the derived table's `First` columns, in their order, so
    /// every `First` column of one derived table reads the same row.
    First {
        column: String,
        order: Vec<OrderKey>,
        /// Which row by that order: 1 (the default, omitted) for the first, k for the
        /// k-th (`ROW_NUMBER() … = k`); a participant with fewer rows has no row, so the
        /// derived table's `min_rows` is at least k. Every `First` column of one derived
        /// table reads the same row.
        #[serde(default = "first", skip_serializing_if = "is_first")]
        nth: u32,
    },
}

fn first() -> u32 {
    1
}

fn is_first(n: &u32) -> bool {
    *n == 1
}

/// The furthest row a [`UnitAggregate::First`] may read (`ROW_NUMBER() … = 100`).
pub const MAX_NTH_ROW: u32 = 100;

/// One key of the order of a participant's rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderKey {
    /// A column of the source table.
    pub column: String,
    /// Largest first.
    pub descending: bool,
    /// NULLs before every value.
    pub nulls_first: bool,
}

/// Most keys of a [`UnitAggregate::First`] order.
pub const MAX_ORDER_KEYS: usize = 4;

impl UnitAggregate {
    /// The source column it reads, if it reads one column.
    pub fn column(&self) -> Option<&str> {
        match self {
            UnitAggregate::Min { column }
            | UnitAggregate::Max { column }
            | UnitAggregate::CountNonNull { column }
            | UnitAggregate::CountDistinct { column }
            | UnitAggregate::Sum { column }
            | UnitAggregate::Avg { column }
            | UnitAggregate::Stddev { column, .. }
            | UnitAggregate::Variance { column, .. }
            | UnitAggregate::Median { column }
            | UnitAggregate::First { column, .. } => Some(column),
            UnitAggregate::CountRows | UnitAggregate::Any { .. } | UnitAggregate::All { .. } => {
                None
            }
        }
    }

    /// Every source column it reads.
    pub fn columns(&self) -> Vec<&str> {
        match self {
            UnitAggregate::Any { when } | UnitAggregate::All { when } => when.columns(),
            UnitAggregate::First { column, order, .. } => std::iter::once(column.as_str())
                .chain(order.iter().map(|k| k.column.as_str()))
                .collect(),
            other => other.column().into_iter().collect(),
        }
    }

    /// The condition of `Any`/`All`, if it is one.
    pub fn condition(&self) -> Option<&Predicate> {
        match self {
            UnitAggregate::Any { when } | UnitAggregate::All { when } => Some(when),
            _ => None,
        }
    }
}

/// Why a derived table was refused; the message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DerivedError(pub String);

impl PerParticipant {
    /// Every condition it evaluates: its WHERE, its columns' FILTERs and the conditions of
    /// `bool_or`/`bool_and` (for the expression limits both sides check).
    pub fn predicates(&self) -> Vec<&Predicate> {
        self.filter
            .iter()
            .chain(
                self.columns
                    .iter()
                    .flat_map(|c| c.filter.iter().chain(c.value.condition())),
            )
            .collect()
    }

    /// What it computes, in words (for EXPLAIN).
    pub fn describe(&self) -> String {
        let cols: Vec<String> = self
            .columns
            .iter()
            .map(|c| {
                let what = match &c.value {
                    UnitAggregate::Min { column } => format!("MIN({column})"),
                    UnitAggregate::Max { column } => format!("MAX({column})"),
                    UnitAggregate::CountRows => "COUNT(*)".to_string(),
                    UnitAggregate::CountNonNull { column } => format!("COUNT({column})"),
                    UnitAggregate::CountDistinct { column } => {
                        format!("COUNT(DISTINCT {column})")
                    }
                    UnitAggregate::Sum { column } => format!("SUM({column})"),
                    UnitAggregate::Avg { column } => format!("AVG({column})"),
                    UnitAggregate::Stddev { column, population } => {
                        format!("STDDEV{}({column})", if *population { "_POP" } else { "" })
                    }
                    UnitAggregate::Variance { column, population } => {
                        format!("VAR_{}({column})", if *population { "POP" } else { "SAMP" })
                    }
                    UnitAggregate::Median { column } => format!("MEDIAN({column})"),
                    UnitAggregate::Any { .. } => "bool_or(condition)".to_string(),
                    UnitAggregate::All { .. } => "bool_and(condition)".to_string(),
                    UnitAggregate::First { column, order, nth } => {
                        let by: Vec<String> = order
                            .iter()
                            .map(|k| {
                                format!("{}{}", k.column, if k.descending { " DESC" } else { "" })
                            })
                            .collect();
                        let which = if *nth == 1 {
                            "the first row".to_string()
                        } else {
                            format!("row {nth}")
                        };
                        format!("{column} of {which} by {}", by.join(", "))
                    }
                };
                let only = if c.filter.is_some() {
                    " over the rows passing its FILTER"
                } else {
                    ""
                };
                format!("{} = {what}{only}", c.name)
            })
            .collect();
        let having = if self.min_rows > 1 {
            format!(
                ", for participants with at least {} such rows",
                self.min_rows
            )
        } else {
            String::new()
        };
        let cols = if cols.is_empty() {
            String::new()
        } else {
            format!(": {}", cols.join(", "))
        };
        format!(
            "one row per participant of {}{}{cols}{having}",
            self.table,
            if self.filter.is_some() {
                " rows passing the subquery's filter"
            } else {
                ""
            },
        )
    }

    /// The derived table as the catalog would declare it, checking it on the way: R = 1;
    /// a MIN or MAX keeps its source column's type, bounds, public values and date range
    /// (the smallest or largest of values within them is within them), and may be NULL;
    /// `COUNT(*)` is an int64 with the bounds [0, R of the source table]: a sum or average
    /// of it clamps each participant's count to R, as sums clamp any column to its bounds.
    pub fn spec(&self, catalog: &Catalog) -> Result<TableSpec, DerivedError> {
        let err = |m: String| Err(DerivedError(m));
        let Some(source) = catalog.table(&self.table) else {
            return err(format!(
                "the derived table reads `{}`, which is not in the catalog",
                self.table
            ));
        };
        if self.min_rows == 0 || self.min_rows > MAX_MIN_ROWS {
            return err(format!(
                "a derived table keeps participants with 1 to {MAX_MIN_ROWS} rows, not {}",
                self.min_rows
            ));
        }
        if self.columns.len() > MAX_DERIVED_COLUMNS {
            return err(format!(
                "a derived table has at most {MAX_DERIVED_COLUMNS} columns, not {}",
                self.columns.len()
            ));
        }
        if let Some(f) = &self.filter {
            if f.reads_joined() {
                return err(format!(
                    "the derived table's WHERE may read only `{}`",
                    self.table
                ));
            }
            for name in f.columns() {
                if source.column(name).is_none() {
                    return err(format!(
                        "the derived table's WHERE reads `{name}`, which `{}` does not have",
                        self.table
                    ));
                }
            }
        }
        let unit = source.privacy_unit.clone();
        let mut columns = vec![source
            .column(&unit)
            .cloned()
            .ok_or_else(|| DerivedError(format!("`{}` has no participant column", self.table)))?];
        let source_column = |column: &str, what: &str| -> Result<&ColumnSpec, DerivedError> {
            match source.column(column) {
                Some(s) if column != unit => Ok(s),
                Some(_) => Err(DerivedError(format!(
                    "{what} of the participant column `{unit}` is not a value of the participant's rows"
                ))),
                None => Err(DerivedError(format!(
                    "the derived table takes {what} of `{column}`, which `{}` does not have",
                    self.table
                ))),
            }
        };
        // Every first-row column of one derived table reads the same row.
        let nths: std::collections::BTreeSet<u32> = self
            .columns
            .iter()
            .filter_map(|c| match &c.value {
                UnitAggregate::First { nth, .. } => Some(*nth),
                _ => None,
            })
            .collect();
        if nths.len() > 1 {
            return err("every first-row column of a derived table reads the same row".into());
        }
        for c in &self.columns {
            if c.name.is_empty() || columns.iter().any(|x| x.name == c.name) {
                return err(format!(
                    "the derived table's column `{}` is empty or named twice (the participant column is `{unit}`)",
                    c.name
                ));
            }
            if let Some(f) = &c.filter {
                if matches!(c.value, UnitAggregate::First { .. }) {
                    return err(format!(
                        "`{}` takes a first row with a FILTER: filter the derived table's rows in its WHERE instead",
                        c.name
                    ));
                }
                if f.reads_joined() || !f.participant_sets().is_empty() {
                    return err(format!(
                        "the FILTER of `{}` may read only `{}`'s own columns",
                        c.name, self.table
                    ));
                }
                for name in f.columns() {
                    source_column(name, "FILTER")?;
                }
            }
            if let UnitAggregate::First { order, nth, .. } = &c.value {
                if *nth == 0 || *nth > MAX_NTH_ROW || *nth > self.min_rows {
                    return err(format!(
                        "a derived table reads row 1 to {MAX_NTH_ROW} of a participant, of participants with at least that many rows, not row {nth} (of participants with {} or more)",
                        self.min_rows
                    ));
                }
                if order.is_empty() || order.len() > MAX_ORDER_KEYS {
                    return err(format!(
                        "the first row of a participant is ordered by 1 to {MAX_ORDER_KEYS} columns, not {}",
                        order.len()
                    ));
                }
                for k in order {
                    source_column(&k.column, "ORDER BY")?;
                }
            }
            let spec = match &c.value {
                UnitAggregate::Min { column }
                | UnitAggregate::Max { column }
                | UnitAggregate::First { column, .. } => {
                    let Some(s) = source.column(column) else {
                        return err(format!(
                            "the derived table takes MIN/MAX/first of `{column}`, which `{}` does not have",
                            self.table
                        ));
                    };
                    if *column == unit {
                        return err(format!(
                            "MIN/MAX/first of the participant column `{unit}` is the participant"
                        ));
                    }
                    ColumnSpec {
                        name: c.name.clone(),
                        nullable: true,
                        ..s.clone()
                    }
                }
                UnitAggregate::CountRows
                | UnitAggregate::CountNonNull { .. }
                | UnitAggregate::CountDistinct { .. } => {
                    if let Some(column) = c.value.column() {
                        source_column(column, "COUNT")?;
                    }
                    ColumnSpec {
                        name: c.name.clone(),
                        ty: ColumnType::Int64,
                        nullable: false,
                        lower: Some(0.0),
                        upper: Some(f64::from(source.max_rows_per_unit)),
                        precision: None,
                        public_values: None,
                        earliest: None,
                        latest: None,
                    }
                }
                UnitAggregate::Sum { column } | UnitAggregate::Avg { column } => {
                    let sum = matches!(c.value, UnitAggregate::Sum { .. });
                    let s = source_column(column, if sum { "SUM" } else { "AVG" })?;
                    let (Some(b), true) = (s.bounds(), s.ty.is_numeric()) else {
                        return err(if sum {
                            format!("the derived table sums `{column}`, which has no declared bounds (`lower`, `upper`) in the catalog: a participant's sum would be unbounded")
                        } else {
                            format!("the derived table averages `{column}`, which has no declared bounds (`lower`, `upper`) in the catalog")
                        });
                    };
                    // A sum is declared within R times the bounds (an aggregate on top
                    // clamps it there); a mean of clamped values stays within them.
                    let r = f64::from(source.max_rows_per_unit);
                    let (lower, upper, ty, precision) = if sum {
                        let ty = if s.ty == ColumnType::Float64 {
                            ColumnType::Float64
                        } else {
                            ColumnType::Int64
                        };
                        (r * b.lower.min(0.0), r * b.upper.max(0.0), ty, s.precision)
                    } else {
                        (b.lower, b.upper, ColumnType::Float64, Some(b.precision))
                    };
                    numeric(&c.name, ty, lower, upper, precision)
                }
                UnitAggregate::Stddev { column, .. }
                | UnitAggregate::Variance { column, .. }
                | UnitAggregate::Median { column } => {
                    let s = source_column(column, "a spread or median")?;
                    let (Some(b), true) = (s.bounds(), s.ty.is_numeric()) else {
                        return err(format!(
                            "the derived table takes a spread or median of `{column}`, which has no declared bounds (`lower`, `upper`) in the catalog"
                        ));
                    };
                    let width = b.upper - b.lower;
                    let upper = match &c.value {
                        UnitAggregate::Stddev {
                            population: true, ..
                        } => width / 2.0,
                        UnitAggregate::Stddev { .. } => width / std::f64::consts::SQRT_2,
                        UnitAggregate::Variance {
                            population: true, ..
                        } => width * width / 4.0,
                        UnitAggregate::Variance { .. } => width * width / 2.0,
                        _ => b.upper,
                    };
                    let lower = if matches!(c.value, UnitAggregate::Median { .. }) {
                        b.lower
                    } else {
                        0.0
                    };
                    numeric(
                        &c.name,
                        ColumnType::Float64,
                        lower,
                        upper,
                        Some(b.precision),
                    )
                }
                UnitAggregate::Any { when } | UnitAggregate::All { when } => {
                    if when.reads_joined() || !when.participant_sets().is_empty() {
                        return err(format!(
                            "the condition of `{}` may read only `{}`'s own columns",
                            c.name, self.table
                        ));
                    }
                    for name in when.columns() {
                        source_column(name, "bool_or/bool_and")?;
                    }
                    ColumnSpec {
                        name: c.name.clone(),
                        ty: ColumnType::Boolean,
                        nullable: true,
                        lower: None,
                        upper: None,
                        precision: None,
                        public_values: Some(vec![
                            crate::catalog::PublicValue::Bool(false),
                            crate::catalog::PublicValue::Bool(true),
                        ]),
                        earliest: None,
                        latest: None,
                    }
                }
            };
            columns.push(spec);
        }
        Ok(TableSpec {
            privacy_unit: unit,
            max_rows_per_unit: 1,
            max_groups_per_unit: None,
            columns,
        })
    }
}

/// A nullable numeric column of a derived table, declared within `[lower, upper]`.
fn numeric(
    name: &str,
    ty: ColumnType,
    lower: f64,
    upper: f64,
    precision: Option<f64>,
) -> ColumnSpec {
    ColumnSpec {
        name: name.to_string(),
        ty,
        nullable: true,
        lower: Some(lower),
        upper: Some(upper),
        precision,
        public_values: None,
        earliest: None,
        latest: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog::from_toml(
            r#"
[tables.diagnoses]
max_rows_per_unit = 15
columns = [
  { name = "pid", type = "utf8" },
  { name = "code", type = "utf8" },
  { name = "diagnosed_on", type = "date32", earliest = "2000-01-01", latest = "2026-12-31" },
]
"#,
            "test",
        )
        .unwrap()
    }

    fn first(column: &str) -> PerParticipant {
        PerParticipant {
            table: "diagnoses".into(),
            filter: None,
            min_rows: 1,
            columns: vec![
                DerivedColumn {
                    name: "first_on".into(),
                    value: UnitAggregate::Min {
                        column: column.into(),
                    },
                    filter: None,
                },
                DerivedColumn {
                    name: "n".into(),
                    value: UnitAggregate::CountRows,
                    filter: None,
                },
            ],
        }
    }

    #[test]
    fn a_derived_table_has_one_row_per_participant_and_inherits_its_sources_ranges() {
        let spec = first("diagnosed_on").spec(&catalog()).unwrap();
        assert_eq!(spec.max_rows_per_unit, 1);
        let f = spec.column("first_on").unwrap();
        assert_eq!(f.ty, ColumnType::Date32);
        assert!(
            f.date_range().is_some(),
            "the year of the first date has a public domain"
        );
        let n = spec.column("n").unwrap().bounds().unwrap();
        assert_eq!(
            (n.lower, n.upper),
            (0.0, 15.0),
            "a count is clamped to the source's R"
        );
        let json = serde_json::to_string(&first("diagnosed_on")).unwrap();
        assert_eq!(
            serde_json::from_str::<PerParticipant>(&json).unwrap(),
            first("diagnosed_on")
        );
        assert!(serde_json::from_str::<PerParticipant>(&json.replacen(
            "\"min_rows\"",
            "\"rows\":1,\"min_rows\"",
            1
        ))
        .is_err());
    }

    #[test]
    fn a_derived_table_over_unknown_columns_or_the_participant_is_refused() {
        assert!(first("nope")
            .spec(&catalog())
            .unwrap_err()
            .0
            .contains("`nope`"));
        assert!(first("pid")
            .spec(&catalog())
            .unwrap_err()
            .0
            .contains("is the participant"));
        let mut twice = first("diagnosed_on");
        twice.columns[1].name = "first_on".into();
        assert!(twice
            .spec(&catalog())
            .unwrap_err()
            .0
            .contains("named twice"));
        let mut none = first("diagnosed_on");
        none.min_rows = 0;
        assert!(none.spec(&catalog()).is_err());
    }

    #[test]
    fn a_filtered_column_reads_only_its_tables_columns_and_never_picks_a_first_row() {
        let code_is = |column: &str| Predicate::Binary {
            op: crate::wire::BinaryOp::Eq,
            left: Box::new(Predicate::Column {
                name: column.into(),
                side: crate::wire::Side::LEFT,
            }),
            right: Box::new(Predicate::Literal {
                value: crate::wire::Literal::Utf8("E11".into()),
            }),
        };
        let mut d = first("diagnosed_on");
        d.columns[1].filter = Some(code_is("code"));
        let spec = d.spec(&catalog()).unwrap();
        assert_eq!(spec.column("n").unwrap().bounds().unwrap().upper, 15.0);
        assert!(d
            .describe()
            .contains("n = COUNT(*) over the rows passing its FILTER"));
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<PerParticipant>(&json).unwrap(), d);
        d.columns[1].filter = Some(code_is("nope"));
        assert!(d.spec(&catalog()).unwrap_err().0.contains("`nope`"));
        d.columns[1].filter = None;
        d.columns[0] = DerivedColumn {
            name: "first_code".into(),
            value: UnitAggregate::First {
                column: "code".into(),
                order: vec![OrderKey {
                    column: "diagnosed_on".into(),
                    descending: false,
                    nulls_first: false,
                }],
                nth: 1,
            },
            filter: Some(code_is("code")),
        };
        assert!(d.spec(&catalog()).unwrap_err().0.contains("WHERE instead"));
    }

    #[test]
    fn a_later_row_is_read_only_from_participants_with_that_many_rows() {
        let nth = |n: u32, min_rows: u32| PerParticipant {
            table: "diagnoses".into(),
            filter: None,
            min_rows,
            columns: vec![DerivedColumn {
                name: "second_code".into(),
                value: UnitAggregate::First {
                    column: "code".into(),
                    order: vec![OrderKey {
                        column: "diagnosed_on".into(),
                        descending: false,
                        nulls_first: false,
                    }],
                    nth: n,
                },
                filter: None,
            }],
        };
        assert!(nth(2, 2).spec(&catalog()).is_ok());
        assert!(nth(2, 2)
            .describe()
            .contains("second_code = code of row 2 by diagnosed_on"));
        assert!(nth(2, 1)
            .spec(&catalog())
            .unwrap_err()
            .0
            .contains("not row 2"));
        assert!(nth(0, 1).spec(&catalog()).is_err());
        assert!(nth(MAX_NTH_ROW + 1, MAX_NTH_ROW + 1)
            .spec(&catalog())
            .is_err());
        // Row 1 is the default, omitted on the wire.
        let json = serde_json::to_string(&nth(1, 1)).unwrap();
        assert!(!json.contains("nth"), "{json}");
        assert_eq!(
            serde_json::from_str::<PerParticipant>(&json).unwrap(),
            nth(1, 1)
        );
        let mut mixed = nth(2, 2);
        let mut other = mixed.columns[0].clone();
        other.name = "first_code".into();
        if let UnitAggregate::First { nth, .. } = &mut other.value {
            *nth = 1;
        }
        mixed.columns.push(other);
        assert!(mixed
            .spec(&catalog())
            .unwrap_err()
            .0
            .contains("the same row"));
    }

    #[test]
    fn a_spread_or_median_needs_bounds_and_stays_within_their_reach() {
        let spread = |value: UnitAggregate| PerParticipant {
            table: "labs".into(),
            filter: None,
            min_rows: 1,
            columns: vec![DerivedColumn {
                name: "s".into(),
                value,
                filter: None,
            }],
        };
        let cat = Catalog::from_toml(
            r#"
[tables.labs]
max_rows_per_unit = 20
columns = [
  { name = "pid", type = "utf8" },
  { name = "test", type = "utf8" },
  { name = "value", type = "float64", lower = 2.0, upper = 12.0, precision = 0.1 },
]
"#,
            "test",
        )
        .unwrap();
        let upper = |value| {
            spread(value)
                .spec(&cat)
                .unwrap()
                .column("s")
                .unwrap()
                .bounds()
                .map(|b| (b.lower, b.upper))
        };
        let column = || "value".to_string();
        assert_eq!(
            upper(UnitAggregate::Stddev {
                column: column(),
                population: true
            }),
            Some((0.0, 5.0))
        );
        assert_eq!(
            upper(UnitAggregate::Stddev {
                column: column(),
                population: false
            }),
            Some((0.0, 10.0 / std::f64::consts::SQRT_2))
        );
        assert_eq!(
            upper(UnitAggregate::Variance {
                column: column(),
                population: true
            }),
            Some((0.0, 25.0))
        );
        assert_eq!(
            upper(UnitAggregate::Variance {
                column: column(),
                population: false
            }),
            Some((0.0, 50.0))
        );
        assert_eq!(
            upper(UnitAggregate::Median { column: column() }),
            Some((2.0, 12.0))
        );
        let err = spread(UnitAggregate::Median {
            column: "test".into(),
        })
        .spec(&cat)
        .unwrap_err();
        assert!(err.0.contains("no declared bounds"), "{err}");
    }
}
