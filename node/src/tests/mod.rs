//! Tests over small Parquet and CSV fixtures written into a temporary directory.

mod engine_tests;
mod outcome_tests;
mod server_tests;
mod set_tests;

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Date32Array, Decimal128Array, Float64Array, Int32Array,
    Int64Array, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use arrow::util::display::array_value_to_string;
use datafusion::parquet::arrow::ArrowWriter;
use fedq_common::{AggregateRequest, BinaryOp, Literal, PartialAggregateRequest, Predicate};
use tempfile::TempDir;

use crate::NodeConfig;

pub(crate) const CATALOG: &str = r#"
[tables.labs]
privacy_unit = "pid"
max_rows_per_unit = 100
columns = [
  { name = "pid", type = "utf8" },
  { name = "test", type = "utf8", nullable = true, public_values = ["HbA1c", "LDL", "glucose"] },
  { name = "value", type = "float64", nullable = true, lower = 0.0, upper = 100.0, precision = 0.01 },
  { name = "code", type = "utf8", nullable = true },
  { name = "measured_on", type = "date32" },
  { name = "flag", type = "boolean", nullable = true, public_values = [true, false] },
  { name = "year", type = "int32", lower = 1900, upper = 2030, public_values = [1975, 1980, 1990, 2001] },
  { name = "site_code", type = "int64", public_values = [1, 2] },
]

[tables.patients]
max_rows_per_unit = 1
columns = [
  { name = "pid", type = "utf8" },
  { name = "sex", type = "utf8", nullable = true, public_values = ["F", "M"] },
  { name = "birth_year", type = "int64", lower = 1900, upper = 2030 },
]

[tables.bulk]
max_rows_per_unit = 50
columns = [
  { name = "pid", type = "utf8" },
  { name = "grp", type = "utf8", public_values = ["A", "B"] },
  { name = "x", type = "int64", lower = 0, upper = 10 },
]

[tables.broken]
max_rows_per_unit = 5
columns = [
  { name = "pid", type = "utf8" },
  { name = "n", type = "int64", lower = 0, upper = 10 },
]

[tables.encounters]
max_rows_per_unit = 3
columns = [
  { name = "pid", type = "utf8" },
  { name = "kind", type = "utf8", public_values = ["A", "B"] },
  { name = "y", type = "int64", lower = 0, upper = 10 },
  { name = "raw", type = "float64", nullable = true },
]

[tables.stays]
max_rows_per_unit = 10
max_groups_per_unit = 2
columns = [
  { name = "pid", type = "utf8" },
  { name = "code", type = "utf8", nullable = true },
  { name = "ward", type = "int64" },
  { name = "days", type = "int64", lower = 0, upper = 30 },
]

[tables.elsewhere]
max_rows_per_unit = 5
columns = [ { name = "pid", type = "utf8" } ]
"#;

pub(crate) const NODE_TOML: &str = r#"
site = "site01"
listen = "127.0.0.1:0"
insecure_dev = true
catalog = "catalog.toml"

[tables.labs]
path = "labs.parquet"

[tables.patients]
path = "patients.csv"

[tables.bulk]
path = "bulk"
format = "parquet"

[tables.broken]
path = "broken.csv"

[tables.encounters]
path = "encounters.parquet"

[tables.stays]
path = "stays.parquet"
"#;

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
pub(crate) fn days(y: i32, m: u32, d: u32) -> i32 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = (y - era * 400) as u32;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe as i32 - 719468
}

pub(crate) fn write_parquet(path: &Path, batch: &RecordBatch) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

fn batch(cols: Vec<(&str, ArrayRef)>) -> RecordBatch {
    let fields: Vec<Field> = cols
        .iter()
        .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
        .collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        cols.into_iter().map(|(_, a)| a).collect(),
    )
    .unwrap()
}

/// The labs rows (see `engine_tests` for the hand-computed answers), with an extra,
/// non-catalog `secret` column. `value_as_int` writes `value` with the wrong type.
pub(crate) fn labs_batch(value_as_int: bool, drop_code: bool) -> RecordBatch {
    let d = |y, m, dd| Some(days(y, m, dd));
    let values = vec![
        Some(5.5),
        Some(6.25),
        Some(150.0),
        Some(9999.0),
        Some(-1.0),
        None,
        Some(3.333),
        Some(1.0),
        Some(2.0),
    ];
    let value: ArrayRef = if value_as_int {
        Arc::new(Int64Array::from(
            values
                .iter()
                .map(|v| v.map(|x: f64| x as i64))
                .collect::<Vec<_>>(),
        ))
    } else {
        Arc::new(Float64Array::from(values))
    };
    let mut cols: Vec<(&str, ArrayRef)> = vec![
        (
            "pid",
            Arc::new(StringArray::from(vec![
                "p1", "p1", "p1", "p2", "p2", "p2", "p3", "p3", "p4",
            ])),
        ),
        (
            "test",
            Arc::new(StringArray::from(vec![
                Some("HbA1c"),
                Some("HbA1c"),
                Some("LDL"),
                Some("HbA1c"),
                Some("glucose"),
                Some("glucose"),
                Some("LDL"),
                Some("other"),
                None,
            ])),
        ),
        ("value", value),
        (
            "code",
            Arc::new(StringArray::from(vec![
                Some("12"),
                Some("abc"),
                None,
                Some("7"),
                Some("15"),
                Some("x9"),
                None,
                Some("20"),
                Some("5"),
            ])),
        ),
        (
            "measured_on",
            Arc::new(Date32Array::from(vec![
                d(2024, 1, 10),
                d(2024, 2, 10),
                d(2024, 3, 1),
                d(2023, 12, 31),
                d(2024, 1, 15),
                d(2024, 5, 5),
                d(2024, 6, 1),
                d(2024, 6, 2),
                d(2024, 7, 1),
            ])),
        ),
        (
            "flag",
            Arc::new(BooleanArray::from(vec![
                Some(true),
                Some(false),
                None,
                Some(true),
                Some(true),
                Some(false),
                Some(true),
                Some(true),
                Some(false),
            ])),
        ),
        (
            "year",
            Arc::new(Int32Array::from(vec![
                1980, 1980, 1980, 1975, 1975, 1975, 2001, 2001, 1990,
            ])),
        ),
        (
            "site_code",
            Arc::new(Int64Array::from(vec![1, 1, 1, 2, 2, 2, 1, 1, 2])),
        ),
        ("secret", Arc::new(StringArray::from(vec!["s"; 9]))),
    ];
    if drop_code {
        cols.retain(|(n, _)| *n != "code");
    }
    batch(cols)
}

/// `big`: 50 rows alternating A/B; `s1`: 3 rows in A; `u000`…`u099`: 10 rows in A followed
/// by 30 rows in B each.
fn bulk_batch() -> RecordBatch {
    let mut pid = Vec::new();
    let mut grp = Vec::new();
    let mut x = Vec::new();
    for i in 0..50 {
        pid.push("big".to_string());
        grp.push(if i % 2 == 0 { "A" } else { "B" });
        x.push(i % 11);
    }
    for _ in 0..3 {
        pid.push("s1".to_string());
        grp.push("A");
        x.push(1);
    }
    for u in 0..100 {
        for i in 0..40 {
            pid.push(format!("u{u:03}"));
            grp.push(if i < 10 { "A" } else { "B" });
            x.push(1);
        }
    }
    batch(vec![
        ("pid", Arc::new(StringArray::from(pid))),
        ("grp", Arc::new(StringArray::from(grp))),
        ("x", Arc::new(Int64Array::from(x))),
    ])
}

/// `encounters`, joined with `bulk` on `pid`: `big` 20 rows (kind alternating A/B, y = 10),
/// `s1` 2 rows (A, y = 1), `u000`…`u009` 1 row each (B, y = 2), `nobody` 3 rows (A, y = 5)
/// with no `bulk` rows.
fn encounters_batch() -> RecordBatch {
    let mut pid = Vec::new();
    let mut kind = Vec::new();
    let mut y = Vec::new();
    let mut push = |p: String, k: &'static str, v: i64| {
        pid.push(p);
        kind.push(k);
        y.push(v);
    };
    for i in 0..20 {
        push("big".into(), if i % 2 == 0 { "A" } else { "B" }, 10);
    }
    for _ in 0..2 {
        push("s1".into(), "A", 1);
    }
    for u in 0..10 {
        push(format!("u{u:03}"), "B", 2);
    }
    for _ in 0..3 {
        push("nobody".into(), "A", 5);
    }
    let n = pid.len();
    batch(vec![
        ("pid", Arc::new(StringArray::from(pid))),
        ("kind", Arc::new(StringArray::from(kind))),
        ("y", Arc::new(Int64Array::from(y))),
        ("raw", Arc::new(Float64Array::from(vec![Some(1.0); n]))),
    ])
}

/// `stays` (G = 2, `code` and `ward` without a public domain), rows as (pid, code, ward,
/// days): `a` has X×3, Y×2, Z×2, W×1; `b` has Z, Y and two NULL codes; `c` has W, V, U.
/// The G = 2 groups each keeps (most rows first, ties by the smaller key): `a` X, Y; `b`
/// Y, Z; `c` U, V.
pub(crate) fn stays_batch() -> RecordBatch {
    let rows: Vec<(&str, Option<&str>, i64, i64)> = vec![
        ("a", Some("Z"), 1, 1),
        ("a", Some("X"), 1, 2),
        ("a", Some("Y"), 2, 3),
        ("a", Some("X"), 1, 4),
        ("a", Some("W"), 2, 5),
        ("a", Some("Z"), 1, 6),
        ("a", Some("X"), 2, 7),
        ("a", Some("Y"), 2, 8),
        ("b", None, 1, 9),
        ("b", Some("Z"), 1, 10),
        ("b", Some("Y"), 1, 11),
        ("b", None, 1, 12),
        ("c", Some("W"), 3, 13),
        ("c", Some("V"), 3, 14),
        ("c", Some("U"), 3, 40),
    ];
    batch(vec![
        (
            "pid",
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            )),
        ),
        (
            "code",
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
        ),
        (
            "ward",
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )),
        ),
        (
            "days",
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.3).collect::<Vec<_>>(),
            )),
        ),
    ])
}

/// A temporary directory with the catalog, the data files and `node.toml`.
pub(crate) struct Fixture {
    pub dir: TempDir,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::write(p.join("catalog.toml"), CATALOG).unwrap();
        write_parquet(&p.join("labs.parquet"), &labs_batch(false, false));
        std::fs::create_dir(p.join("bulk")).unwrap();
        write_parquet(&p.join("bulk").join("part-0.parquet"), &bulk_batch());
        write_parquet(&p.join("encounters.parquet"), &encounters_batch());
        write_parquet(&p.join("stays.parquet"), &stays_batch());
        std::fs::write(
            p.join("patients.csv"),
            "pid,sex,birth_year,comment\np1,F,1980,hello\np2,M,1850,x\np3,F,2100,\np4,X,1990,\np5,,1970,\n",
        )
        .unwrap();
        std::fs::write(p.join("broken.csv"), "pid,n\np1,1\np2,2\n").unwrap();
        std::fs::write(p.join("node.toml"), NODE_TOML).unwrap();
        Fixture { dir }
    }

    /// Replace `broken.csv` under a running node with a file whose `n` does not parse.
    pub fn break_csv(&self) {
        std::fs::write(
            self.dir.path().join("broken.csv"),
            "pid,n\np1,1\np2,oops-secret-value\n",
        )
        .unwrap();
    }

    pub fn config(&self) -> NodeConfig {
        NodeConfig::load(&self.dir.path().join("node.toml")).unwrap()
    }
}

// ---- request builders ----

pub(crate) fn request(
    table: &str,
    group_by: &[&str],
    aggregates: Vec<AggregateRequest>,
    r: u32,
    filter: Option<Predicate>,
) -> PartialAggregateRequest {
    PartialAggregateRequest {
        query_id: "q-test".into(),
        table: table.into(),
        filter,
        joins: Vec::new(),
        group_by: group_by.iter().map(|s| (*s).into()).collect(),
        aggregates,
        max_rows_per_unit: r,
        max_groups_per_unit: None,
        derived: None,
        computed: Vec::new(),
    }
}

pub(crate) fn col(name: &str) -> Predicate {
    Predicate::column(name)
}

pub(crate) fn lit(value: Literal) -> Predicate {
    Predicate::Literal { value }
}

pub(crate) fn bin(op: BinaryOp, l: Predicate, r: Predicate) -> Predicate {
    Predicate::Binary {
        op,
        left: Box::new(l),
        right: Box::new(r),
    }
}

pub(crate) fn sum(column: &str, lower: f64, upper: f64, precision: f64) -> AggregateRequest {
    AggregateRequest::SumFixed {
        column: column.into(),
        lower,
        upper,
        precision,
    }
}

pub(crate) fn count_nn(column: &str) -> AggregateRequest {
    AggregateRequest::CountNonNull {
        column: column.into(),
    }
}

/// Rows of a response as (group key strings, aggregate values).
pub(crate) fn rows(batches: &[RecordBatch], n_keys: usize) -> Vec<(Vec<String>, Vec<i128>)> {
    let mut out = Vec::new();
    for b in batches {
        for r in 0..b.num_rows() {
            let keys = (0..n_keys)
                .map(|k| array_value_to_string(b.column(k).as_ref(), r).unwrap())
                .collect();
            let vals = (n_keys..b.num_columns())
                .map(|k| {
                    let c = b.column(k);
                    match c.data_type() {
                        DataType::Int64 => {
                            c.as_any().downcast_ref::<Int64Array>().unwrap().value(r) as i128
                        }
                        DataType::Decimal128(38, 0) => c
                            .as_any()
                            .downcast_ref::<Decimal128Array>()
                            .unwrap()
                            .value(r),
                        other => panic!("unexpected aggregate type {other}"),
                    }
                })
                .collect();
            out.push((keys, vals));
        }
    }
    out
}

pub(crate) fn keyed(keys: &[&str], vals: &[i128]) -> (Vec<String>, Vec<i128>) {
    (keys.iter().map(|s| s.to_string()).collect(), vals.to_vec())
}
