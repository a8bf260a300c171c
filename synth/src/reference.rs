//! The reference catalog of the synthetic biobank and the value domains the generator uses.
//!
//! The public domains declared in the catalog and the values the generator draws from are
//! the same constants, so they cannot drift apart.

use std::collections::BTreeMap;

use arrow::datatypes::{Field, Schema};
use fedq_common::{Catalog, ColumnSpec, ColumnType, PublicValue, TableSpec};

/// The five reference tables, in the order the generator writes them.
pub const TABLES: [&str; 5] = ["participants", "diagnoses", "labs", "specimens", "variants"];

/// `participants.sex`.
pub const SEXES: [&str; 2] = ["F", "M"];
/// `participants.participant_type`.
pub const PARTICIPANT_TYPES: [&str; 3] = ["rare_disease", "severe_disease", "general"];
/// `labs.test`.
pub const LAB_TESTS: [&str; 4] = ["HbA1c", "glucose", "LDL", "creatinine"];
/// `specimens.kind`.
pub const SPECIMEN_KINDS: [&str; 4] = ["blood", "serum", "plasma", "urine"];
/// `specimens.status`.
pub const SPECIMEN_STATUSES: [&str; 2] = ["stored", "returned"];
/// `variants.gene`.
pub const GENES: [&str; 8] = [
    "BRCA1", "BRCA2", "APOE", "CFTR", "LDLR", "MYH7", "TTN", "SCN5A",
];
/// `variants.zygosity`.
pub const ZYGOSITIES: [&str; 2] = ["het", "hom"];

fn col(name: &str, ty: ColumnType) -> ColumnSpec {
    ColumnSpec {
        name: name.to_string(),
        ty,
        nullable: false,
        lower: None,
        upper: None,
        precision: None,
        public_values: None,
        earliest: None,
        latest: None,
    }
}

/// A date column with the public range of the synthetic records.
fn dated(name: &str) -> ColumnSpec {
    ColumnSpec {
        earliest: Some(DATES_FROM.to_string()),
        latest: Some(DATES_TO.to_string()),
        ..col(name, ColumnType::Date32)
    }
}

/// Public range of every synthetic date: records start in 2000 and end by 2026.
pub const DATES_FROM: &str = "2000-01-01";
/// See [`DATES_FROM`].
pub const DATES_TO: &str = "2026-12-31";

fn public(name: &str, values: &[&str]) -> ColumnSpec {
    ColumnSpec {
        public_values: Some(
            values
                .iter()
                .map(|v| PublicValue::Text((*v).to_string()))
                .collect(),
        ),
        ..col(name, ColumnType::Utf8)
    }
}

fn bounded(
    name: &str,
    ty: ColumnType,
    lower: f64,
    upper: f64,
    precision: Option<f64>,
) -> ColumnSpec {
    ColumnSpec {
        lower: Some(lower),
        upper: Some(upper),
        precision,
        ..col(name, ty)
    }
}

fn table(
    max_rows_per_unit: u32,
    max_groups_per_unit: Option<u32>,
    columns: Vec<ColumnSpec>,
) -> TableSpec {
    TableSpec {
        privacy_unit: "pid".to_string(),
        max_rows_per_unit,
        max_groups_per_unit,
        columns,
    }
}

/// The privacy officer's catalog for the reference biobank schema.
///
/// - `max_sites_per_unit = 2`: the generator puts a transferred participant's rows at two
///   sites at most.
/// - R (`max_rows_per_unit`): participants 1, diagnoses 15, labs 20, specimens 4,
///   variants 20. Labs are heavy-tailed, so R = 20 truncates a few participants; that is
///   expected and is what the bias estimate reports.
/// - G (`max_groups_per_unit`): diagnoses 5, variants 5, labs 4.
/// - Clamp bounds: `birth_year` in [1900, 2030], `labs.value` in [0, 500] at 0.01,
///   `specimens.volume_ml` in [0, 50] at 0.01.
/// - Public domains for every low-cardinality categorical column; `diagnoses.code` and
///   `variants.variant` have none (their GROUP BY needs partition selection).
pub fn reference_catalog() -> Catalog {
    let pid = || col("pid", ColumnType::Utf8);
    let mut tables = BTreeMap::new();
    tables.insert(
        "participants".to_string(),
        table(
            1,
            None,
            vec![
                pid(),
                public("sex", &SEXES),
                bounded("birth_year", ColumnType::Int32, 1900.0, 2030.0, None),
                public("participant_type", &PARTICIPANT_TYPES),
                dated("enrolled_on"),
            ],
        ),
    );
    tables.insert(
        "diagnoses".to_string(),
        table(
            15,
            Some(5),
            vec![pid(), col("code", ColumnType::Utf8), dated("diagnosed_on")],
        ),
    );
    tables.insert(
        "labs".to_string(),
        table(
            20,
            Some(4),
            vec![
                pid(),
                public("test", &LAB_TESTS),
                ColumnSpec {
                    nullable: true,
                    ..bounded("value", ColumnType::Float64, 0.0, 500.0, Some(0.01))
                },
                dated("measured_on"),
            ],
        ),
    );
    tables.insert(
        "specimens".to_string(),
        table(
            4,
            None,
            vec![
                pid(),
                public("kind", &SPECIMEN_KINDS),
                bounded("volume_ml", ColumnType::Float64, 0.0, 50.0, Some(0.01)),
                public("status", &SPECIMEN_STATUSES),
            ],
        ),
    );
    tables.insert(
        "variants".to_string(),
        table(
            20,
            Some(5),
            vec![
                pid(),
                public("gene", &GENES),
                col("variant", ColumnType::Utf8),
                public("zygosity", &ZYGOSITIES),
            ],
        ),
    );
    Catalog {
        max_sites_per_unit: 2,
        tables,
    }
}

/// The Arrow schema a local file must have for a catalog table: one field per declared
/// column, in catalog order, with the declared type and nullability.
pub fn arrow_schema(table: &TableSpec) -> Schema {
    Schema::new(
        table
            .columns
            .iter()
            .map(|c| Field::new(&c.name, c.ty.arrow_type(), c.nullable))
            .collect::<Vec<_>>(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every generated date (records from RECORDS_FROM to RECORDS_TO; enrolment within
    /// them) lies in the declared public range, so no date is clamped into its first or
    /// last year.
    #[test]
    fn declared_date_ranges_cover_the_generated_dates() {
        use fedq_common::catalog::parse_date;
        assert_eq!(parse_date(DATES_FROM), Some(crate::plan::RECORDS_FROM));
        assert_eq!(parse_date(DATES_TO), Some(crate::plan::RECORDS_TO));
    }

    #[test]
    fn reference_catalog_is_valid() {
        let c = reference_catalog();
        c.validate().unwrap();
        assert_eq!(c.tables.len(), TABLES.len());
        for t in TABLES {
            assert!(c.table(t).is_some(), "{t}");
        }
        let labs = c.table("labs").unwrap();
        let b = labs.column("value").unwrap().bounds().unwrap();
        assert_eq!((b.lower, b.upper, b.precision), (0.0, 500.0, 0.01));
        let by = c
            .table("participants")
            .unwrap()
            .column("birth_year")
            .unwrap()
            .bounds()
            .unwrap();
        assert_eq!((by.lower, by.upper, by.precision), (1900.0, 2030.0, 1.0));
        assert!(c
            .table("diagnoses")
            .unwrap()
            .column("code")
            .unwrap()
            .public_values
            .is_none());
    }
}
