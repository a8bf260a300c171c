//! Participant sets: the cohorts of semi-joins and anti-joins on the participant.
//!
//! `pid IN (SELECT pid FROM diagnoses WHERE code LIKE 'E11%')`, `NOT EXISTS (…)`,
//! `INTERSECT`, `EXCEPT`, and `GROUP BY pid HAVING COUNT(*) >= 3` all ask one question of
//! each row: is its participant in a set that is decided from **that participant's own
//! rows** at the same site? Such a set is participant-local: adding or removing one
//! participant changes whether that participant is in it, and nobody else. So a filter
//! `unit IN set` keeps the request participant-local, and the sensitivities (R rows per
//! participant, S sites) are unchanged. See `ARCHITECTURE.md`, "Participant-local queries".
//!
//! A set's semantics are those of `EXISTS`: a participant is in [`ParticipantSet::Rows`]
//! when they have at least `min_rows` rows of the table that pass the filter, and a NULL
//! participant id is in no set. `NOT IN` is therefore read as `NOT EXISTS` (SQL's `NOT IN`
//! would answer nothing at all when the subquery yields one NULL id, a cliff that one row
//! could push a query over). A participant at two sites is two participants here: each site
//! decides membership from its own rows (S covers the sensitivity; the bias is documented).
//!
//! Both sides run [`ParticipantSet::check`] against the catalog: the coordinator when it
//! plans, the node when it validates a request.

use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::wire::Predicate;

/// Most `Rows` leaves in all the sets of one request (each is a scan and a hash table of
/// participant ids at the node).
pub const MAX_SET_LEAVES: usize = 8;
/// Largest `min_rows` (`HAVING COUNT(*) >= k`) a set may ask for.
pub const MAX_MIN_ROWS: u32 = 1_000_000;

/// A set of participants, each decided from that participant's own rows at one site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "set", rename_all = "snake_case", deny_unknown_fields)]
pub enum ParticipantSet {
    /// Participants with at least `min_rows` rows of `table` that pass `filter` (over
    /// `table`'s columns, [`Side::LEFT`] only; it may itself test other sets).
    Rows {
        table: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filter: Option<Predicate>,
        min_rows: u32,
    },
    /// Participants in both sets (`INTERSECT`).
    Intersect {
        left: Box<ParticipantSet>,
        right: Box<ParticipantSet>,
    },
    /// Participants in either set (`UNION`).
    Union {
        left: Box<ParticipantSet>,
        right: Box<ParticipantSet>,
    },
    /// Participants in `left` and not in `right` (`EXCEPT`).
    Except {
        left: Box<ParticipantSet>,
        right: Box<ParticipantSet>,
    },
}

/// Why a set was refused; the message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SetError(pub String);

impl ParticipantSet {
    /// Participants with at least one row of `table` passing `filter`.
    pub fn rows(table: impl Into<String>, filter: Option<Predicate>) -> ParticipantSet {
        ParticipantSet::Rows {
            table: table.into(),
            filter,
            min_rows: 1,
        }
    }

    /// The two sets it combines, for `Intersect`, `Union` and `Except`.
    fn operands(&self) -> Option<(&ParticipantSet, &ParticipantSet)> {
        match self {
            ParticipantSet::Rows { .. } => None,
            ParticipantSet::Intersect { left, right }
            | ParticipantSet::Union { left, right }
            | ParticipantSet::Except { left, right } => Some((left, right)),
        }
    }

    /// The filters of its `Rows` leaves (for the expression limits).
    pub fn filters(&self) -> Vec<&Predicate> {
        match (self, self.operands()) {
            (ParticipantSet::Rows { filter, .. }, _) => filter.iter().collect(),
            (_, Some((left, right))) => {
                let mut v = left.filters();
                v.extend(right.filters());
                v
            }
            (_, None) => Vec::new(),
        }
    }

    /// Its `Rows` leaves, including those of sets tested inside their filters.
    pub fn leaf_count(&self) -> usize {
        match self {
            ParticipantSet::Rows { filter, .. } => {
                1 + filter.as_ref().map_or(0, |f| {
                    f.participant_sets().iter().map(|s| s.leaf_count()).sum()
                })
            }
            other => other
                .operands()
                .map_or(0, |(l, r)| l.leaf_count() + r.leaf_count()),
        }
    }

    /// The tables its leaves read (with repeats), including nested sets'.
    pub fn tables(&self) -> Vec<&str> {
        match self {
            ParticipantSet::Rows { table, filter, .. } => {
                let mut v = vec![table.as_str()];
                if let Some(f) = filter {
                    for s in f.participant_sets() {
                        v.extend(s.tables());
                    }
                }
                v
            }
            other => other.operands().map_or_else(Vec::new, |(l, r)| {
                let mut v = l.tables();
                v.extend(r.tables());
                v
            }),
        }
    }

    /// The checks both sides run: every leaf names a catalog table, reads only that
    /// table's columns, and asks for 1 to [`MAX_MIN_ROWS`] rows. Column types, shared
    /// columns and `LIKE` patterns are checked with the rest of the filter language.
    pub fn check(&self, catalog: &Catalog) -> Result<(), SetError> {
        match self {
            ParticipantSet::Rows {
                table,
                filter,
                min_rows,
            } => {
                let Some(spec) = catalog.table(table) else {
                    return Err(SetError(format!(
                        "the subquery reads table `{table}`, which is not in the catalog"
                    )));
                };
                if *min_rows == 0 || *min_rows > MAX_MIN_ROWS {
                    return Err(SetError(format!(
                        "a participant set needs between 1 and {MAX_MIN_ROWS} rows per participant, not {min_rows}"
                    )));
                }
                if let Some(f) = filter {
                    if f.reads_joined() {
                        return Err(SetError(format!(
                            "a subquery over `{table}` may read only `{table}`'s own columns"
                        )));
                    }
                    for name in f.columns() {
                        if spec.column(name).is_none() {
                            return Err(SetError(format!(
                                "the subquery over `{table}` reads column `{name}`, which `{table}` does not have"
                            )));
                        }
                    }
                    for s in f.participant_sets() {
                        s.check(catalog)?;
                    }
                }
                Ok(())
            }
            other => match other.operands() {
                Some((l, r)) => {
                    l.check(catalog)?;
                    r.check(catalog)
                }
                None => Ok(()),
            },
        }
    }

    /// A one-line description, for EXPLAIN.
    pub fn describe(&self) -> String {
        match self {
            ParticipantSet::Rows {
                table,
                filter,
                min_rows,
            } => {
                let rows = if *min_rows == 1 {
                    "a row".to_string()
                } else {
                    format!("at least {min_rows} rows")
                };
                match filter {
                    None => format!("participants with {rows} in {table}"),
                    Some(_) => {
                        format!("participants with {rows} in {table} passing the subquery's filter")
                    }
                }
            }
            ParticipantSet::Intersect { left, right } => {
                format!("({}) and ({})", left.describe(), right.describe())
            }
            ParticipantSet::Union { left, right } => {
                format!("({}) or ({})", left.describe(), right.describe())
            }
            ParticipantSet::Except { left, right } => {
                format!("({}) but not ({})", left.describe(), right.describe())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{BinaryOp, Literal, Side};

    fn catalog() -> Catalog {
        Catalog::from_toml(
            r#"
max_sites_per_unit = 1
[tables.diagnoses]
max_rows_per_unit = 5
columns = [
  { name = "pid", type = "utf8" },
  { name = "code", type = "utf8" },
]
"#,
            "test",
        )
        .unwrap()
    }

    fn code_is(c: &str) -> Predicate {
        Predicate::Binary {
            op: BinaryOp::Eq,
            left: Box::new(Predicate::column("code")),
            right: Box::new(Predicate::Literal {
                value: Literal::Utf8(c.into()),
            }),
        }
    }

    #[test]
    fn a_set_round_trips_and_refuses_unknown_fields() {
        let s = ParticipantSet::Except {
            left: Box::new(ParticipantSet::rows("diagnoses", Some(code_is("E11")))),
            right: Box::new(ParticipantSet::Rows {
                table: "diagnoses".into(),
                filter: Some(code_is("I10")),
                min_rows: 3,
            }),
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ParticipantSet>(&json).unwrap(), s);
        let extra = json.replacen("\"min_rows\":3", "\"min_rows\":3,\"rows\":1", 1);
        assert!(serde_json::from_str::<ParticipantSet>(&extra).is_err());
        assert_eq!(s.leaf_count(), 2);
        assert!(s.check(&catalog()).is_ok());
    }

    #[test]
    fn a_set_over_an_unknown_table_column_or_row_count_is_refused() {
        let c = catalog();
        let unknown = ParticipantSet::rows("labs", None);
        assert!(unknown
            .check(&c)
            .unwrap_err()
            .0
            .contains("not in the catalog"));
        let column = ParticipantSet::rows(
            "diagnoses",
            Some(Predicate::IsNull {
                input: Box::new(Predicate::column("test")),
            }),
        );
        assert!(column.check(&c).unwrap_err().0.contains("`test`"));
        for min_rows in [0, MAX_MIN_ROWS + 1] {
            let s = ParticipantSet::Rows {
                table: "diagnoses".into(),
                filter: None,
                min_rows,
            };
            assert!(s.check(&c).unwrap_err().0.contains("between 1"));
        }
        // Any joined side: the first, or a later one.
        for side in [Side::RIGHT, Side(3)] {
            let joined = ParticipantSet::rows(
                "diagnoses",
                Some(Predicate::IsNull {
                    input: Box::new(Predicate::Column {
                        name: "code".into(),
                        side,
                    }),
                }),
            );
            assert!(joined.check(&c).unwrap_err().0.contains("own columns"));
        }
    }

    #[test]
    fn nested_sets_count_towards_the_leaf_limit() {
        let inner = ParticipantSet::rows("diagnoses", Some(code_is("E11")));
        let outer = ParticipantSet::rows(
            "diagnoses",
            Some(Predicate::InSet {
                side: Side::LEFT,
                set: Box::new(inner),
                negated: false,
            }),
        );
        assert_eq!(outer.leaf_count(), 2);
        assert_eq!(outer.tables(), vec!["diagnoses", "diagnoses"]);
    }
}
