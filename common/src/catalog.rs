//! The privacy officer's catalog and query policy.
//!
//! The catalog is one TOML file shared by the coordinator and every node. It is the single
//! source of truth for what may be asked: which tables exist, which column identifies the
//! participant (the privacy unit), how many rows one participant may contribute (R), clamp
//! bounds and fixed-point precision for numeric columns, and public domains for GROUP BY
//! keys. Anything it does not declare is refused (fail closed).
//!
//! ```toml
//! max_sites_per_unit = 2
//!
//! [tables.labs]
//! privacy_unit = "pid"
//! max_rows_per_unit = 20
//! columns = [
//!   { name = "pid", type = "utf8" },
//!   { name = "test", type = "utf8", public_values = ["HbA1c", "glucose", "LDL", "creatinine"] },
//!   { name = "value", type = "float64", nullable = true, lower = 0.0, upper = 500.0, precision = 0.01 },
//!   { name = "measured_on", type = "date32" },
//! ]
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use arrow_schema::DataType;
use serde::{Deserialize, Serialize};

/// Errors loading or validating a catalog or policy.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read catalog file {path}: {source}; check the path in your config")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("catalog file {path} is not valid TOML for a fedq catalog: {message}")]
    Parse { path: String, message: String },
    #[error("catalog is invalid: {0}")]
    Invalid(String),
}

/// Column types the catalog can declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    Utf8,
    Boolean,
    Int32,
    Int64,
    Float64,
    Date32,
}

impl ColumnType {
    /// Whether `TRY_CAST` from this type to `to` has an Arrow kernel (for text, both from
    /// `Utf8` and `Utf8View`). Without one, a node's physical planning fails, so both sides
    /// refuse these before any row is read: boolean ↔ date32 and float64 ↔ date32. Every
    /// other pair converts, with NULL for a value that does not. The node's tests check
    /// this table against Arrow's `can_cast_types` for every pair.
    pub fn try_cast_supported(self, to: ColumnType) -> bool {
        use ColumnType as T;
        !matches!(
            (self, to),
            (T::Boolean, T::Date32)
                | (T::Date32, T::Boolean)
                | (T::Float64, T::Date32)
                | (T::Date32, T::Float64)
        )
    }

    /// The Arrow type a local file must have for this column.
    pub fn arrow_type(self) -> DataType {
        match self {
            ColumnType::Utf8 => DataType::Utf8,
            ColumnType::Boolean => DataType::Boolean,
            ColumnType::Int32 => DataType::Int32,
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Date32 => DataType::Date32,
        }
    }

    /// Whether values of this type can be clamped and summed.
    pub fn is_numeric(self) -> bool {
        matches!(
            self,
            ColumnType::Int32 | ColumnType::Int64 | ColumnType::Float64
        )
    }
}

impl std::fmt::Display for ColumnType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ColumnType::Utf8 => "utf8",
            ColumnType::Boolean => "boolean",
            ColumnType::Int32 => "int32",
            ColumnType::Int64 => "int64",
            ColumnType::Float64 => "float64",
            ColumnType::Date32 => "date32",
        };
        f.write_str(s)
    }
}

/// One value of a public domain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PublicValue {
    Bool(bool),
    Int(i64),
    Text(String),
}

impl std::fmt::Display for PublicValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublicValue::Bool(b) => write!(f, "{b}"),
            PublicValue::Int(i) => write!(f, "{i}"),
            PublicValue::Text(s) => write!(f, "{s}"),
        }
    }
}

/// A column of a catalog table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    /// Column name, as in the local files.
    pub name: String,
    /// Declared type; local files must match it exactly.
    #[serde(rename = "type")]
    pub ty: ColumnType,
    /// Whether NULLs may appear.
    #[serde(default)]
    pub nullable: bool,
    /// Lower clamp bound (numeric columns that may be aggregated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lower: Option<f64>,
    /// Upper clamp bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper: Option<f64>,
    /// Fixed-point step for exact sums (e.g. 0.01). Defaults to 1 for integer columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<f64>,
    /// Public domain, making the column usable as a GROUP BY key. Every value is released,
    /// empty groups included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_values: Option<Vec<PublicValue>>,
    /// Earliest date of a date32 column, `YYYY-MM-DD`. With `latest`, the public range from
    /// which a `date_part('year', column)` key takes its domain (every year in between);
    /// dates outside it are counted in its first or last year.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earliest: Option<String>,
    /// Latest date of a date32 column, `YYYY-MM-DD` (see `earliest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<String>,
}

/// Days since 1970-01-01 of a `YYYY-MM-DD` date (proleptic Gregorian), or `None` if it is
/// not one.
pub fn parse_date(s: &str) -> Option<i32> {
    let mut parts = s.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i32, u32, u32) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in_month = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if d == 0 || d > days_in_month {
        return None;
    }
    Some(days_from_civil(y, m, d))
}

/// The date (year, month, day) `days` after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`), the inverse of [`days_from_civil`].
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `YYYY-MM-DD` of the date `days` after 1970-01-01.
pub fn format_days(days: i64) -> String {
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 of a valid proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`); `m` in 1..=12, `d` in 1..=31.
pub fn days_from_civil(y: i32, m: u32, d: u32) -> i32 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400) as u32;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe as i32 - 719_468
}

/// Declared clamp bounds of a numeric column.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub lower: f64,
    pub upper: f64,
    pub precision: f64,
}

impl ColumnSpec {
    /// The declared date range of a date32 column: `(earliest, latest)` as days since
    /// 1970-01-01 and their years, if both are declared and valid.
    pub fn date_range(&self) -> Option<((i32, i32), (i32, i32))> {
        let (e, l) = (self.earliest.as_deref()?, self.latest.as_deref()?);
        let year = |s: &str| s.get(..4).and_then(|y| y.parse::<i32>().ok());
        Some(((parse_date(e)?, parse_date(l)?), (year(e)?, year(l)?)))
    }

    /// Clamp bounds, if the column declares them.
    pub fn bounds(&self) -> Option<Bounds> {
        let (lower, upper) = (self.lower?, self.upper?);
        let precision = match (self.precision, self.ty) {
            (Some(p), _) => p,
            (None, ColumnType::Int32 | ColumnType::Int64) => 1.0,
            (None, _) => return None,
        };
        Some(Bounds {
            lower,
            upper,
            precision,
        })
    }
}

/// A catalog table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    /// Column identifying the participant.
    #[serde(default = "default_privacy_unit")]
    pub privacy_unit: String,
    /// R: rows one participant may contribute to one query at one site, after the filter.
    pub max_rows_per_unit: u32,
    /// G: groups one participant may contribute to at one site when GROUP BY keys have no
    /// public domain (DP partition selection); such queries are refused without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_groups_per_unit: Option<u32>,
    /// Columns, in file order.
    pub columns: Vec<ColumnSpec>,
}

fn default_privacy_unit() -> String {
    "pid".to_string()
}

fn default_sites() -> u32 {
    1
}

impl TableSpec {
    /// Look up a column by name.
    pub fn column(&self, name: &str) -> Option<&ColumnSpec> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// The whole catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// S: how many sites one participant's rows can appear at.
    #[serde(default = "default_sites")]
    pub max_sites_per_unit: u32,
    /// Tables by name.
    pub tables: BTreeMap<String, TableSpec>,
}

/// Largest R a catalog may declare.
pub const MAX_ROWS_PER_UNIT_LIMIT: u32 = 10_000;

impl Catalog {
    /// Parse and validate a catalog from TOML text.
    pub fn from_toml(text: &str, origin: &str) -> Result<Catalog, CatalogError> {
        let cat: Catalog = toml::from_str(text).map_err(|e| CatalogError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        cat.validate()?;
        Ok(cat)
    }

    /// Load and validate a catalog file.
    pub fn load(path: &Path) -> Result<Catalog, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|e| CatalogError::Read {
            path: path.display().to_string(),
            source: e,
        })?;
        Catalog::from_toml(&text, &path.display().to_string())
    }

    /// Look up a table.
    pub fn table(&self, name: &str) -> Option<&TableSpec> {
        self.tables.get(name)
    }

    /// Check every declaration for consistency. Errors name the table and column.
    pub fn validate(&self) -> Result<(), CatalogError> {
        let bad = |m: String| Err(CatalogError::Invalid(m));
        if self.max_sites_per_unit == 0 {
            return bad("max_sites_per_unit must be at least 1".into());
        }
        if self.tables.is_empty() {
            return bad("no tables declared; add a [tables.NAME] section".into());
        }
        for (tname, t) in &self.tables {
            if t.max_rows_per_unit == 0 || t.max_rows_per_unit > MAX_ROWS_PER_UNIT_LIMIT {
                return bad(format!(
                    "table {tname}: max_rows_per_unit must be between 1 and {MAX_ROWS_PER_UNIT_LIMIT}"
                ));
            }
            if t.max_groups_per_unit == Some(0) {
                return bad(format!(
                    "table {tname}: max_groups_per_unit must be at least 1"
                ));
            }
            let mut seen = std::collections::BTreeSet::new();
            for c in &t.columns {
                if !seen.insert(c.name.as_str()) {
                    return bad(format!("table {tname}: column {} declared twice", c.name));
                }
                let has_bounds = c.lower.is_some() || c.upper.is_some() || c.precision.is_some();
                if has_bounds {
                    if !c.ty.is_numeric() {
                        return bad(format!(
                            "table {tname}, column {}: bounds are only allowed on numeric columns, not {}",
                            c.name, c.ty
                        ));
                    }
                    let (Some(lo), Some(hi)) = (c.lower, c.upper) else {
                        return bad(format!(
                            "table {tname}, column {}: declare both lower and upper",
                            c.name
                        ));
                    };
                    if !lo.is_finite() || !hi.is_finite() || lo >= hi {
                        return bad(format!(
                            "table {tname}, column {}: need finite lower < upper, got [{lo}, {hi}]",
                            c.name
                        ));
                    }
                    let Some(b) = c.bounds() else {
                        return bad(format!(
                            "table {tname}, column {}: a float column needs a precision (e.g. 0.01)",
                            c.name
                        ));
                    };
                    if !(b.precision.is_finite() && b.precision > 0.0) {
                        return bad(format!(
                            "table {tname}, column {}: precision must be a positive number",
                            c.name
                        ));
                    }
                    let steps = (hi.abs().max(lo.abs())) / b.precision;
                    if steps > 1e15 {
                        return bad(format!(
                            "table {tname}, column {}: bounds/precision = {steps:e} steps is too fine for exact sums; use a coarser precision",
                            c.name
                        ));
                    }
                }
                if c.earliest.is_some() || c.latest.is_some() {
                    if c.ty != ColumnType::Date32 {
                        return bad(format!(
                            "table {tname}, column {}: earliest/latest are only allowed on date32 columns, not {}",
                            c.name, c.ty
                        ));
                    }
                    for (key, v) in [("earliest", &c.earliest), ("latest", &c.latest)] {
                        match v {
                            None => {
                                return bad(format!(
                                    "table {tname}, column {}: declare both earliest and latest",
                                    c.name
                                ))
                            }
                            Some(d) if parse_date(d).is_none() => {
                                return bad(format!(
                                    "table {tname}, column {}: {key} = {d:?} is not a date; write it as \"YYYY-MM-DD\", e.g. \"2000-01-01\"",
                                    c.name
                                ))
                            }
                            Some(_) => {}
                        }
                    }
                    if let Some(((e, l), _)) = c.date_range() {
                        if e > l {
                            return bad(format!(
                                "table {tname}, column {}: earliest must not be after latest",
                                c.name
                            ));
                        }
                    }
                }
                if let Some(vals) = &c.public_values {
                    if vals.is_empty() {
                        return bad(format!(
                            "table {tname}, column {}: public_values is empty",
                            c.name
                        ));
                    }
                    for v in vals {
                        let ok = matches!(
                            (v, c.ty),
                            (PublicValue::Text(_), ColumnType::Utf8)
                                | (PublicValue::Int(_), ColumnType::Int32 | ColumnType::Int64)
                                | (PublicValue::Bool(_), ColumnType::Boolean)
                        );
                        if !ok {
                            return bad(format!(
                                "table {tname}, column {}: public value {v:?} does not match type {}",
                                c.name, c.ty
                            ));
                        }
                    }
                }
            }
            match t.column(&t.privacy_unit) {
                None => {
                    return bad(format!(
                        "table {tname}: privacy unit column {} is not among its columns",
                        t.privacy_unit
                    ))
                }
                Some(c) if c.nullable => {
                    return bad(format!(
                        "table {tname}: privacy unit column {} must not be nullable",
                        t.privacy_unit
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// Query policy set by the privacy officer (coordinator config `[policy]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// ε charged for a query when the session has not set `fedq.epsilon`.
    #[serde(default = "default_epsilon")]
    pub default_epsilon: f64,
    /// Largest ε one query may spend.
    #[serde(default = "default_max_epsilon")]
    pub max_epsilon_per_query: f64,
    /// δ charged by a query that needs it: GROUP BY keys without a public domain go
    /// through DP partition selection, which is (ε, δ)-DP at this δ. 0 refuses such
    /// queries; pure ε-DP queries are charged δ = 0 whatever this says.
    #[serde(default)]
    pub delta_per_query: f64,
    /// Noisy counts below this are shown as suppressed (NULL); 0 disables suppression.
    #[serde(default)]
    pub min_reported_count: u64,
}

fn default_epsilon() -> f64 {
    1.0
}
fn default_max_epsilon() -> f64 {
    2.0
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            default_epsilon: default_epsilon(),
            max_epsilon_per_query: default_max_epsilon(),
            delta_per_query: 0.0,
            min_reported_count: 0,
        }
    }
}

impl Policy {
    /// Check the policy values.
    pub fn validate(&self) -> Result<(), CatalogError> {
        let e = self.default_epsilon;
        let m = self.max_epsilon_per_query;
        if !(e.is_finite() && e > 0.0) {
            return Err(CatalogError::Invalid(format!(
                "policy.default_epsilon must be a positive number, got {e}"
            )));
        }
        if !(m.is_finite() && m > 0.0) || e > m {
            return Err(CatalogError::Invalid(format!(
                "policy.max_epsilon_per_query must be positive and at least default_epsilon ({e}), got {m}"
            )));
        }
        if !(self.delta_per_query.is_finite() && (0.0..1.0).contains(&self.delta_per_query)) {
            return Err(CatalogError::Invalid(
                "policy.delta_per_query must be in [0, 1)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
max_sites_per_unit = 2
[tables.labs]
max_rows_per_unit = 20
columns = [
  { name = "pid", type = "utf8" },
  { name = "test", type = "utf8", public_values = ["HbA1c", "LDL"] },
  { name = "value", type = "float64", nullable = true, lower = 0.0, upper = 500.0, precision = 0.01 },
  { name = "year", type = "int32", lower = 1900, upper = 2030 },
  { name = "measured_on", type = "date32", earliest = "2000-01-01", latest = "2026-12-31" },
]
"#;

    #[test]
    fn dates_parse_like_days_since_the_epoch() {
        assert_eq!(parse_date("1970-01-01"), Some(0));
        assert_eq!(parse_date("2000-03-01"), Some(11_017));
        assert_eq!(parse_date("2024-02-29"), Some(19_782));
        assert_eq!(parse_date("1969-12-31"), Some(-1));
        for bad in [
            "2023-02-29",
            "2000-13-01",
            "2000-1-01",
            "20000101",
            "2000-01-01x",
            "",
            "2000-00-10",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
        let c = Catalog::from_toml(GOOD, "t").unwrap();
        let d = c.table("labs").unwrap().column("measured_on").unwrap();
        assert_eq!(d.date_range(), Some(((10_957, 20_818), (2000, 2026))));
    }

    #[test]
    fn parses_and_derives_bounds() {
        let c = Catalog::from_toml(GOOD, "t").unwrap();
        let t = c.table("labs").unwrap();
        assert_eq!(t.privacy_unit, "pid");
        let b = t.column("year").unwrap().bounds().unwrap();
        assert_eq!((b.lower, b.upper, b.precision), (1900.0, 2030.0, 1.0));
        assert!(t.column("test").unwrap().bounds().is_none());
    }

    #[test]
    fn rejects_bad_declarations() {
        for (needle, text) in [
            (
                "lower < upper",
                GOOD.replace("upper = 500.0", "upper = -1.0"),
            ),
            ("precision", GOOD.replace(", precision = 0.01", "")),
            (
                "privacy unit",
                GOOD.replace("\"pid\", type", "\"id\", type"),
            ),
            (
                "does not match",
                GOOD.replace("[\"HbA1c\", \"LDL\"]", "[1, 2]"),
            ),
            (
                "max_rows_per_unit",
                GOOD.replace("max_rows_per_unit = 20", "max_rows_per_unit = 0"),
            ),
            (
                "write it as \"YYYY-MM-DD\"",
                GOOD.replace("\"2026-12-31\"", "\"31/12/2026\""),
            ),
            (
                "declare both earliest and latest",
                GOOD.replace(", latest = \"2026-12-31\"", ""),
            ),
            (
                "earliest must not be after latest",
                GOOD.replace("\"2000-01-01\"", "\"2027-01-01\""),
            ),
            (
                "only allowed on date32 columns",
                GOOD.replace(
                    "type = \"int32\", lower = 1900, upper = 2030",
                    "type = \"int32\", lower = 1900, upper = 2030, earliest = \"2000-01-01\", latest = \"2001-01-01\"",
                ),
            ),
        ] {
            let e = Catalog::from_toml(&text, "t").unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        assert!(matches!(
            Catalog::from_toml("[tables.x]\nmax_rows = 1", "t"),
            Err(CatalogError::Parse { .. })
        ));
    }
}
