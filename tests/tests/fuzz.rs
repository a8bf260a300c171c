//! Property tests (proptest) over the two places hostile input enters, each run for a
//! bounded wall-clock time: rounds of 256 random cases (fresh seeds each round) until
//! `FEDQ_FUZZ_SECONDS` (default 20; CI sets 60) have passed, at least one round. The
//! properties run in parallel, so the whole file takes about that long.
//!
//! - the node's request decoder and validation: arbitrary bytes and mutated valid tickets
//!   never panic, and whatever the node accepts is an aggregate request within the
//!   catalog's R (the wire has no way to ask for rows);
//! - the coordinator's SQL → node-request planner: SQL from a grammar that mixes allowed
//!   and forbidden constructs never panics, and every plan it accepts aggregates (no plan
//!   returns rows), uses the catalog's R, and groups only on public domains;
//! - deep, wide and huge SQL never takes the planner down on a worker-sized stack (issue 15);
//! - over a table of extreme values: whatever a node validates, it answers (issue 13), and
//!   removing one participant changes the bounded relation by at most R rows of that
//!   participant only, participant sets and derived tables included (issue 14).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fedq_common::group_key::{DateField, GroupKey};
use fedq_common::{
    AggregateRequest, Catalog, ColumnType, Literal, PartialAggregateRequest, Predicate,
};

fn bucket(column: &str, divisor: i64, multiplier: i64) -> GroupKey {
    GroupKey::IntBucket {
        column: column.into(),
        divisor,
        multiplier,
    }
}
use fedq_coordinator::planner::Planner;
use fedq_node::{NodeConfig, NodeEngine};
use proptest::prelude::*;

struct Fixture {
    _dir: tempfile::TempDir,
    engine: Arc<NodeEngine>,
    catalog: Catalog,
    rt: tokio::runtime::Runtime,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        fedq_tests::synth(dir.path(), 1, 200, 9);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let cfg = NodeConfig::load(&dir.path().join("sites/site01/node.toml")).unwrap();
        let catalog = cfg.catalog.clone();
        let engine = Arc::new(rt.block_on(NodeEngine::new(&cfg)).unwrap());
        Fixture {
            _dir: dir,
            engine,
            catalog,
            rt,
        }
    })
}

/// A ticket the node accepts: labs, a filter, a group key, a count and a clamped sum.
fn valid_ticket() -> Vec<u8> {
    use fedq_common::{BinaryOp, Literal, Predicate};
    let req = PartialAggregateRequest {
        query_id: "f".into(),
        table: "labs".into(),
        filter: Some(Predicate::Binary {
            op: BinaryOp::Gt,
            left: Box::new(Predicate::Column {
                name: "value".into(),
                side: Default::default(),
            }),
            right: Box::new(Predicate::Literal {
                value: Literal::Float64(5.0),
            }),
        }),
        group_by: vec!["test".into()],
        aggregates: vec![
            AggregateRequest::CountRows,
            AggregateRequest::SumFixed {
                column: "value".into(),
                lower: 0.0,
                upper: 500.0,
                precision: 0.01,
            },
        ],
        max_rows_per_unit: 20,
        max_groups_per_unit: None,
        derived: None,
        joins: Vec::new(),
        computed: Vec::new(),
    };
    let f = fixture();
    assert!(
        f.engine.validate(&req).is_ok(),
        "the base ticket must be valid"
    );
    req.encode_ticket().unwrap()
}

/// Decode and, if the decoder accepts, validate at the node. Must never panic; what the
/// node accepts must be an aggregate request within the catalog's R.
fn check_ticket(bytes: &[u8]) {
    let f = fixture();
    let Ok(req) = PartialAggregateRequest::decode_ticket(bytes) else {
        return;
    };
    if f.engine.validate(&req).is_ok() {
        let spec = f
            .catalog
            .table(&req.table)
            .expect("accepted table is in the catalog");
        assert!(!req.aggregates.is_empty());
        assert!(req.max_rows_per_unit >= 1 && req.max_rows_per_unit <= spec.max_rows_per_unit);
        assert!(!req
            .group_by
            .iter()
            .any(|g| g.column().is_some_and(|c| c.name == spec.privacy_unit)));
        for g in &req.group_by {
            if let GroupKey::IntBucket {
                divisor,
                multiplier,
                ..
            } = g
            {
                assert!(*divisor >= 1 && (1..=*divisor).contains(multiplier));
            }
        }
    }
}

/// How long each property runs: `FEDQ_FUZZ_SECONDS`, default 20.
fn fuzz_budget() -> Duration {
    let secs = match std::env::var("FEDQ_FUZZ_SECONDS") {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("FEDQ_FUZZ_SECONDS={v:?} is not a number of seconds")),
        Err(_) => 20,
    };
    Duration::from_secs(secs)
}

/// Run `round` (one proptest run of 256 cases, a fresh random seed each time) until the
/// fuzz budget is spent; at least once. A failing case panics with the shrunk input.
fn for_a_while(name: &str, mut round: impl FnMut(ProptestConfig)) {
    let deadline = Instant::now() + fuzz_budget();
    let mut rounds = 0u64;
    loop {
        round(ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        rounds += 1;
        if Instant::now() >= deadline {
            break;
        }
    }
    eprintln!("{name}: {} cases in {rounds} rounds", rounds * 256);
}

#[test]
fn arbitrary_bytes_never_panic_the_node() {
    for_a_while("arbitrary bytes", |config| {
        proptest!(config, |(bytes in proptest::collection::vec(any::<u8>(), 0..2048))| {
            check_ticket(&bytes);
        })
    });
}

#[test]
fn mutated_valid_tickets_never_panic_the_node() {
    let base = valid_ticket();
    for_a_while("mutated tickets", |config| {
        proptest!(config, |(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8))| {
            let mut t = base.clone();
            for (at, byte, op) in edits {
                let i = at.index(t.len().max(1));
                match op {
                    0 if i < t.len() => t[i] = byte,
                    1 => t.insert(i.min(t.len()), byte),
                    _ if i < t.len() => { t.remove(i); }
                    _ => {}
                }
            }
            check_ticket(&t);
        })
    });
}

#[test]
fn structured_requests_are_accepted_only_within_the_catalog() {
    for_a_while("structured requests", |config| {
        proptest!(config, |(
            table in prop::sample::select(vec!["labs", "participants", "diagnoses", "nope"]),
            r in prop::sample::select(vec![0u32, 1, 5, 20, 21, 1000, u32::MAX]),
            group in prop::sample::select(vec![
                vec![], vec!["test".into()], vec!["sex".into()], vec!["pid".into()], vec!["value".into()],
                vec![bucket("birth_year", 10, 10)], vec![bucket("birth_year", 0, 1)],
                vec![bucket("birth_year", 10, 11)], vec![bucket("birth_year", i64::MIN, 1)],
                vec![bucket("value", 10, 1)], vec![bucket("pid", 10, 1)],
                vec![GroupKey::DatePart { field: DateField::Month, column: "measured_on".into() }],
                vec![GroupKey::DatePart { field: DateField::Year, column: "measured_on".into() }],
            ]),
            lower in prop::sample::select(vec![-1e12, -1.0, 0.0, 1.0]),
            upper in prop::sample::select(vec![1.0, 500.0, 501.0, 1e12]),
            column in prop::sample::select(vec!["value", "birth_year", "pid", "secret"]),
            candidates in prop::sample::select(vec![None, Some(0u32), Some(2), Some(131), Some(1024), Some(1025), Some(u32::MAX)]),
        )| {
            let numeric = match candidates {
                None => AggregateRequest::SumFixed { column: column.into(), lower, upper, precision: 0.01 },
                Some(candidates) => AggregateRequest::QuantileHistogram {
                    column: column.into(), lower, upper, precision: 0.01, candidates,
                },
            };
            let req = PartialAggregateRequest {
                query_id: "fuzz".into(),
                table: table.into(),
                filter: None,
                group_by: group.clone(),
                aggregates: vec![AggregateRequest::CountRows, numeric],
                max_rows_per_unit: r,
                max_groups_per_unit: None,
                derived: None,
                joins: Vec::new(),
                computed: Vec::new(),
            };
            let bytes = req.encode_ticket().unwrap();
            check_ticket(&bytes);
            let f = fixture();
            if f.engine.validate(&req).is_ok() {
                let spec = f.catalog.table(table).unwrap();
                let col = spec.columns.iter().find(|c| c.name == column).unwrap();
                prop_assert!(col.lower.is_some_and(|l| lower >= l), "accepted a clamp below the catalog");
                prop_assert!(col.upper.is_some_and(|u| upper <= u), "accepted a clamp above the catalog");
                if let Some(k) = candidates {
                    prop_assert!((2..=fedq_common::quantile::MAX_QUANTILE_CANDIDATES).contains(&k));
                }
            }
        })
    });
}

#[test]
fn the_planner_never_panics_and_never_plans_rows() {
    for_a_while("planner", |config| {
        proptest!(config, |(
            select in prop::sample::select(vec![
                "*", "value", "COUNT(*)", "COUNT(value)", "SUM(value)", "AVG(value)", "MIN(value)",
                "COUNT(*) * 2", "test, COUNT(*)", "pid, COUNT(*)", "COUNT(DISTINCT pid)",
                "SUM(value) + AVG(value)", "value + 1", "MEDIAN(value)",
                "PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY value)", "APPROX_PERCENTILE_CONT(value, 1.5)",
                "APPROX_PERCENTILE_CONT(value, 0.1), COUNT(*)",
            ]),
            table in prop::sample::select(vec!["labs", "participants", "nope"]),
            filter in prop::sample::select(vec![
                "", " WHERE value > 5", " WHERE CAST(value AS INT) = 1", " WHERE 10 / value > 1",
                " WHERE test IN ('HbA1c', 'LDL')", " WHERE NOT (value IS NULL) AND value < 1e300",
                " WHERE pid = 'p0000001'", " WHERE TRY_CAST(value AS INT) = 3",
                " WHERE pid IN (SELECT pid FROM participants WHERE sex = 'F')",
                " WHERE pid NOT IN (SELECT pid FROM labs GROUP BY pid HAVING COUNT(*) >= 2)",
                " WHERE EXISTS (SELECT 1 FROM participants p WHERE p.pid = labs.pid)",
                " WHERE pid IN (SELECT pid FROM labs INTERSECT SELECT pid FROM participants)",
                " WHERE value IN (SELECT value FROM labs)", " WHERE pid IN (SELECT pid FROM labs LIMIT 3)",
                " WHERE value > (SELECT AVG(value) FROM labs)",
            ]),
            group in prop::sample::select(vec![
                "", " GROUP BY test", " GROUP BY pid", " GROUP BY value", " GROUP BY sex",
                " GROUP BY birth_year / 10", " GROUP BY birth_year / 10 * 10", " GROUP BY birth_year / 0",
                " GROUP BY value / 10", " GROUP BY CASE WHEN value > 5 THEN 'a' ELSE 'b' END",
                " GROUP BY CASE WHEN value > 5 THEN 'a' END", " GROUP BY CASE test WHEN 'LDL' THEN 1 ELSE 2 END",
                " GROUP BY pid IN (SELECT pid FROM participants)", " GROUP BY value > 5",
                " GROUP BY date_part('month', measured_on)", " GROUP BY EXTRACT(YEAR FROM measured_on)",
            ]),
            tail in prop::sample::select(vec!["", " ORDER BY 1", " LIMIT 1", " HAVING COUNT(*) > 3"]),
        )| {
            let f = fixture();
            let sql = format!("SELECT {select} FROM {table}{filter}{group}{tail}");
            let planner = Planner::new(&f.catalog).unwrap();
            let planned = f.rt.block_on(planner.plan(&sql, 1.0, "fuzz"));
            if let Ok(q) = planned {
                let spec = f.catalog.table(&q.table).unwrap();
                prop_assert!(!q.request.aggregates.is_empty(), "{sql}: a plan without aggregates");
                prop_assert!(!q.statistics.is_empty(), "{sql}: nothing noisy released");
                prop_assert_eq!(q.request.max_rows_per_unit, spec.max_rows_per_unit, "{}", sql);
                for g in &q.groups {
                    prop_assert!(!g.domain.is_empty(), "{}: group {} without a public domain", sql, g.column);
                    prop_assert!(g.column != spec.privacy_unit, "{}", sql);
                }
                // The node accepts what the planner sends.
                prop_assert!(f.engine.validate(&q.request).is_ok(), "{}", sql);
            }
        })
    });
}

/// Deep, wide and huge SQL (issue 15): a chain of about 2,000 `OR`s overflowed a worker's
/// stack and aborted the coordinator. Random layers of long chains, `NOT`s, parentheses,
/// nested `CASE`s and unary minuses, each from 1 to 30,000 deep, are planned on a thread
/// with a Tokio worker's 2 MiB stack: every one is planned or refused (the SQL limits
/// refuse the long ones before parsing), none takes the process down. A stack overflow
/// aborts this test binary, so the property is that the round finishes.
#[test]
fn deep_wide_and_huge_sql_never_takes_the_planner_down() {
    let sizes = vec![1usize, 3, 40, 124, 125, 126, 250, 251, 1_000, 5_000, 30_000];
    for_a_while("hostile sql", |config| {
        proptest!(config, |(
            layers in proptest::collection::vec((0u8..5, prop::sample::select(sizes.clone())), 1..4),
        )| {
            let mut cur = "value > 1".to_string();
            for (kind, n) in layers {
                // At most about 4 MiB of SQL: a chain of a long text is as long as n copies.
                let grown = if kind == 0 { cur.len().saturating_mul(n) } else { cur.len() + 32 * n };
                if grown > 4 << 20 {
                    break;
                }
                cur = match kind {
                    0 => vec![cur.as_str(); n].join(" OR "),
                    1 => format!("{}{cur}", "NOT ".repeat(n)),
                    2 => format!("{}{cur}{}", "(".repeat(n), ")".repeat(n)),
                    3 => format!(
                        "{}{cur}{}",
                        "CASE WHEN ".repeat(n),
                        " THEN 1 ELSE 0 END = 1".repeat(n)
                    ),
                    _ => format!("{}value > 1 AND ({cur})", "- ".repeat(n)),
                };
            }
            let sql = format!("SELECT COUNT(*) FROM labs WHERE {cur}");
            let catalog = fixture().catalog.clone();
            let done = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                    let planner = Planner::new(&catalog).unwrap();
                    rt.block_on(planner.plan(&sql, 1.0, "hostile")).is_ok()
                })
                .unwrap()
                .join();
            prop_assert!(done.is_ok(), "the planner panicked");
        })
    });
}

// ---- whatever a node's validation accepts, it answers (issue 13) ----

/// A node serving one table `x` of extreme values: i64 and i32 at their edges, ±inf, NaN,
/// -0.0 and the largest and smallest floats, NULLs, empty, non-ASCII and very long text,
/// dates at the edges of i32 days. Participants have 1 to 6 rows.
struct Extreme {
    _dir: tempfile::TempDir,
    engine: Arc<NodeEngine>,
    /// Nodes over the same rows without one participant each (`p000`, one row; `p005`,
    /// six rows): its neighbours, for the stability property.
    neighbours: Vec<(String, Arc<NodeEngine>)>,
    rt: tokio::runtime::Runtime,
}

const EXTREME_CATALOG: &str = r#"
[tables.x]
privacy_unit = "pid"
max_rows_per_unit = 5
max_groups_per_unit = 3
columns = [
  { name = "pid", type = "utf8" },
  { name = "i", type = "int64", nullable = true, lower = -1000, upper = 1000 },
  { name = "j", type = "int32", nullable = true, lower = -100, upper = 100 },
  { name = "f", type = "float64", nullable = true, lower = -1e6, upper = 1e6, precision = 0.001 },
  { name = "s", type = "utf8", nullable = true, public_values = ["a", "", "ǅ"] },
  { name = "t", type = "utf8", nullable = true },
  { name = "d", type = "date32", nullable = true, earliest = "1990-01-01", latest = "2030-12-31" },
  { name = "e", type = "date32", nullable = true },
  { name = "b", type = "boolean", nullable = true, public_values = [true, false] },
]
"#;

fn extreme() -> &'static Extreme {
    static F: OnceLock<Extreme> = OnceLock::new();
    F.get_or_init(build_extreme)
}

/// Nodes of their own for the stability property, so that it does not run queries on the
/// same engines at the same time as the other node property (see `build_extreme`).
fn extreme_for_stability() -> &'static Extreme {
    static F: OnceLock<Extreme> = OnceLock::new();
    F.get_or_init(build_extreme)
}

/// The extreme-values nodes. Two properties sharing one engine concurrently made a debug
/// assertion inside DataFusion's Parquet predicate simplifier fail, twice in about ten
/// runs ("Cannot infer common argument type for comparison operation Float64 != Boolean",
/// datafusion-physical-expr 55.2 `simplifier/mod.rs:64`); it never failed with one
/// property at a time. Not found yet; recorded in ARCHITECTURE.md, "Known issues".
fn build_extreme() -> Extreme {
    {
        use datafusion::arrow::array::{
            ArrayRef, BooleanArray, Date32Array, Float64Array, Int32Array, Int64Array, StringArray,
        };
        use datafusion::arrow::datatypes::{Field, Schema};
        use datafusion::arrow::record_batch::RecordBatch;
        let dir = tempfile::tempdir().unwrap();
        let long = "ǅ".repeat(5000) + &"x".repeat(100_000);
        let ints = [i64::MIN, i64::MAX, 0, -1, 1, i64::MIN + 1, 1000, -1001];
        let i32s = [i32::MIN, i32::MAX, 0, -1, 100, -101, i32::MIN + 1];
        let floats = [
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            -0.0,
            0.0,
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            1e-300,
            9.223_372_036_854_776e18,
            -9.223_372_036_854_776e18,
            2.5,
        ];
        let texts: Vec<Option<String>> = vec![
            Some(String::new()),
            Some("a".into()),
            Some("ǅ".into()),
            Some("ß".into()),
            Some("%_\\".into()),
            Some("\u{1F600}".into()),
            Some("\0".into()),
            Some(long),
            Some("İstanbul".into()),
            Some("123".into()),
            Some("-9223372036854775809".into()),
            Some("1e400".into()),
            Some("2024-02-30".into()),
            Some("true".into()),
            None,
        ];
        let dates = [
            i32::MIN,
            i32::MAX,
            0,
            -1,
            7305,
            2_932_896,
            -719_528,
            i32::MIN + 1,
        ];
        let n = 60;
        let mut pid = Vec::new();
        let mut p = 0;
        while pid.len() < n {
            for _ in 0..(p % 6 + 1) {
                pid.push(format!("p{p:03}"));
            }
            p += 1;
        }
        pid.truncate(n);
        let nth = |k: usize, i: usize| k.wrapping_mul(i).wrapping_add(i / 3);
        let null_every = |i: usize, m: usize| i % m == m - 1;
        let cols: Vec<(&str, ArrayRef)> = vec![
            ("pid", Arc::new(StringArray::from(pid))),
            (
                "i",
                Arc::new(Int64Array::from(
                    (0..n)
                        .map(|i| (!null_every(i, 7)).then(|| ints[nth(3, i) % ints.len()]))
                        .collect::<Vec<_>>(),
                )),
            ),
            (
                "j",
                Arc::new(Int32Array::from(
                    (0..n)
                        .map(|i| (!null_every(i, 5)).then(|| i32s[nth(5, i) % i32s.len()]))
                        .collect::<Vec<_>>(),
                )),
            ),
            (
                "f",
                Arc::new(Float64Array::from(
                    (0..n)
                        .map(|i| (!null_every(i, 9)).then(|| floats[nth(7, i) % floats.len()]))
                        .collect::<Vec<_>>(),
                )),
            ),
            (
                "s",
                Arc::new(StringArray::from(
                    (0..n)
                        .map(|i| texts[nth(11, i) % texts.len()].clone())
                        .collect::<Vec<_>>(),
                )),
            ),
            (
                "t",
                Arc::new(StringArray::from(
                    (0..n)
                        .map(|i| texts[nth(13, i) % texts.len()].clone())
                        .collect::<Vec<_>>(),
                )),
            ),
            (
                "d",
                Arc::new(Date32Array::from(
                    (0..n)
                        .map(|i| (!null_every(i, 6)).then(|| dates[nth(3, i) % dates.len()]))
                        .collect::<Vec<_>>(),
                )),
            ),
            (
                "e",
                Arc::new(Date32Array::from(
                    (0..n)
                        .map(|i| (!null_every(i, 4)).then(|| dates[nth(5, i) % dates.len()]))
                        .collect::<Vec<_>>(),
                )),
            ),
            (
                "b",
                Arc::new(BooleanArray::from(
                    (0..n)
                        .map(|i| (!null_every(i, 3)).then_some(i % 2 == 0))
                        .collect::<Vec<_>>(),
                )),
            ),
        ];
        let schema = Arc::new(Schema::new(
            cols.iter()
                .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
                .collect::<Vec<_>>(),
        ));
        let batch =
            RecordBatch::try_new(schema.clone(), cols.into_iter().map(|(_, a)| a).collect())
                .unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        // One node directory per variant of the rows: all of them, or all but one
        // participant's.
        let node = |sub: &str, batch: &RecordBatch| {
            let d = dir.path().join(sub);
            std::fs::create_dir_all(&d).unwrap();
            let f = std::fs::File::create(d.join("x.parquet")).unwrap();
            let mut w =
                datafusion::parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
            w.write(batch).unwrap();
            w.close().unwrap();
            std::fs::write(d.join("catalog.toml"), EXTREME_CATALOG).unwrap();
            std::fs::write(
                d.join("node.toml"),
                "site = \"edge\"\nlisten = \"127.0.0.1:0\"\ninsecure_dev = true\ncatalog = \"catalog.toml\"\n[tables.x]\npath = \"x.parquet\"\n",
            )
            .unwrap();
            let cfg = NodeConfig::load(&d.join("node.toml")).unwrap();
            Arc::new(rt.block_on(NodeEngine::new(&cfg)).unwrap())
        };
        let engine = node("all", &batch);
        let without = |p: &str| {
            let ids = batch
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap();
            let keep: BooleanArray = ids.iter().map(|id| Some(id != Some(p))).collect();
            let rest = datafusion::arrow::compute::filter_record_batch(&batch, &keep).unwrap();
            assert!(rest.num_rows() < batch.num_rows(), "{p} has rows");
            (p.to_string(), node(p, &rest))
        };
        let neighbours = vec![without("p000"), without("p005")];
        Extreme {
            _dir: dir,
            engine,
            neighbours,
            rt,
        }
    }
}

mod arb {
    use fedq_common::group_key::{CaseBranch, DateField, GroupKey};
    use fedq_common::{
        AggregateRequest, BinaryOp, ColumnType, Literal, ParticipantSet, Predicate, PublicValue,
    };
    use proptest::prelude::*;

    fn c(name: &str) -> Predicate {
        Predicate::column(name)
    }
    fn l(value: Literal) -> Predicate {
        Predicate::Literal { value }
    }
    fn bin(op: BinaryOp, a: Predicate, b: Predicate) -> Predicate {
        Predicate::Binary {
            op,
            left: Box::new(a),
            right: Box::new(b),
        }
    }
    fn try_cast(p: Predicate, to: ColumnType) -> Predicate {
        Predicate::TryCast {
            input: Box::new(p),
            to,
        }
    }

    fn int_lit() -> impl Strategy<Value = i64> {
        prop_oneof![
            prop::sample::select(vec![
                i64::MIN,
                i64::MAX,
                i64::MIN + 1,
                0,
                1,
                -1,
                2,
                -2,
                i32::MIN as i64,
                i32::MAX as i64,
                i32::MAX as i64 + 1,
                1000,
            ]),
            any::<i64>(),
        ]
    }

    fn float_lit() -> impl Strategy<Value = f64> {
        prop_oneof![
            prop::sample::select(vec![
                f64::INFINITY,
                f64::NEG_INFINITY,
                f64::NAN,
                -0.0,
                0.0,
                f64::MAX,
                f64::MIN,
                f64::MIN_POSITIVE,
                0.5,
                -1.0,
                1e-300,
                9.3e18,
            ]),
            any::<f64>(),
        ]
    }

    /// LIKE patterns: wildcards, escapes, regex metacharacters, case-folding and
    /// non-ASCII letters, up to and beyond the length limit.
    pub fn pattern() -> impl Strategy<Value = String> {
        let chars = prop::sample::select(vec![
            'a',
            'A',
            '_',
            '%',
            '\\',
            'ǅ',
            'ß',
            'k',
            'K',
            'ſ',
            'Σ',
            '.',
            '*',
            '(',
            '[',
            '{',
            '$',
            '^',
            '|',
            '?',
            '+',
            'İ',
            '\u{1F600}',
            '\0',
            '\n',
        ]);
        prop_oneof![
            prop::collection::vec(chars.clone(), 0..12),
            prop::collection::vec(chars, 200..300),
            (1usize..400).prop_map(|n| vec!['_'; n]),
        ]
        .prop_map(|v| v.into_iter().collect())
    }

    fn text_lit() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "",
                "a",
                "ǅ",
                "123",
                "-1",
                "1e400",
                "NaN",
                "inf",
                "2024-02-30",
                "2024-01-01",
                "true",
                "x",
                "9223372036854775808",
                "+5",
                " 7 ",
            ])
            .prop_map(str::to_string),
            pattern(),
        ]
    }

    fn date_lit() -> impl Strategy<Value = i32> {
        prop_oneof![
            prop::sample::select(vec![i32::MIN, i32::MAX, 0, -1, 7305, -719_528, 2_932_896]),
            any::<i32>(),
        ]
    }

    /// A numeric expression.
    pub fn num(depth: u32) -> BoxedStrategy<Predicate> {
        let leaf = prop_oneof![
            prop::sample::select(vec!["i", "j", "f"]).prop_map(c),
            int_lit().prop_map(|v| l(Literal::Int64(v))),
            float_lit().prop_map(|v| l(Literal::Float64(v))),
        ];
        if depth == 0 {
            return leaf.boxed();
        }
        let d = depth - 1;
        prop_oneof![
            3 => leaf,
            2 => (
                prop::sample::select(vec![BinaryOp::Plus, BinaryOp::Minus, BinaryOp::Multiply]),
                num(d),
                num(d)
            )
                .prop_map(|(op, a, b)| bin(op, a, b)),
            1 => (num(d), prop_oneof![
                int_lit().prop_map(|v| l(Literal::Int64(v))),
                float_lit().prop_map(|v| l(Literal::Float64(v))),
            ])
                .prop_map(|(a, b)| bin(BinaryOp::Divide, a, b)),
            1 => (
                prop::sample::select(vec![
                    DateField::Year, DateField::Quarter, DateField::Month, DateField::Week, DateField::Day,
                    DateField::DayOfWeek, DateField::IsoDayOfWeek, DateField::DayOfYear,
                ]),
                date(d)
            )
                .prop_map(|(field, e)| Predicate::DatePart { field, input: Box::new(e) }),
            1 => (date(d), date(d)).prop_map(|(a, b)| bin(BinaryOp::Minus, a, b)),
            2 => (any_expr(d), prop::sample::select(vec![
                ColumnType::Int32, ColumnType::Int64, ColumnType::Float64,
            ]))
                .prop_map(|(e, to)| try_cast(e, to)),
        ]
        .boxed()
    }

    /// The value of a computed column: a numeric expression, or a `CASE` of them.
    pub fn value(depth: u32) -> BoxedStrategy<Predicate> {
        prop_oneof![
            2 => num(depth),
            1 => (
                proptest::collection::vec((boolean(depth.saturating_sub(1)), num(depth.saturating_sub(1))), 1..3),
                proptest::option::of(num(depth.saturating_sub(1))),
            )
                .prop_map(|(branches, otherwise)| Predicate::Case {
                    branches: branches
                        .into_iter()
                        .map(|(when, then)| fedq_common::wire::ValueBranch { when, then })
                        .collect(),
                    otherwise: otherwise.map(Box::new),
                }),
        ]
        .boxed()
    }

    /// No join (most often), or one to three joins of `x` with itself.
    pub fn self_joins() -> BoxedStrategy<Vec<fedq_common::JoinSpec>> {
        prop_oneof![
            3 => Just(Vec::new()),
            1 => proptest::collection::vec(self_join(), 1..4),
        ]
        .boxed()
    }

    /// A join of `x` with itself (or with a derived table of it) on the participant: inner
    /// or left, with an `ON` condition.
    pub fn self_join() -> BoxedStrategy<fedq_common::JoinSpec> {
        (
            any::<bool>(),
            proptest::option::weighted(0.5, boolean(2)),
            proptest::option::weighted(0.2, per_participant()),
        )
            .prop_map(|(left, on, derived)| fedq_common::JoinSpec {
                table: "x".into(),
                left_on: "pid".into(),
                right_on: "pid".into(),
                kind: if left {
                    fedq_common::JoinKind::Left
                } else {
                    fedq_common::JoinKind::Inner
                },
                on,
                // Sometimes a derived table of `x` (one row per participant).
                derived,
            })
            .boxed()
    }

    /// A text expression.
    pub fn text(depth: u32) -> BoxedStrategy<Predicate> {
        let leaf = prop_oneof![
            prop::sample::select(vec!["s", "t", "pid"]).prop_map(c),
            text_lit().prop_map(|v| l(Literal::Utf8(v))),
        ];
        if depth == 0 {
            return leaf.boxed();
        }
        prop_oneof![
            3 => leaf,
            1 => any_expr(depth - 1).prop_map(|e| try_cast(e, ColumnType::Utf8)),
        ]
        .boxed()
    }

    /// A date expression.
    pub fn date(depth: u32) -> BoxedStrategy<Predicate> {
        let leaf = prop_oneof![
            prop::sample::select(vec!["d", "e"]).prop_map(c),
            date_lit().prop_map(|v| l(Literal::Date32(v))),
        ];
        if depth == 0 {
            return leaf.boxed();
        }
        prop_oneof![
            3 => leaf,
            1 => any_expr(depth - 1).prop_map(|e| try_cast(e, ColumnType::Date32)),
            1 => (
                prop::sample::select(vec![
                    DateField::TruncYear, DateField::TruncQuarter, DateField::TruncMonth,
                    DateField::TruncWeek, DateField::TruncDay,
                ]),
                date(depth - 1),
            )
                .prop_map(|(field, e)| Predicate::DatePart { field, input: Box::new(e) }),
            // A date moved by an interval, up to the limits and a little past them.
            1 => (
                date(depth - 1),
                prop_oneof![Just(12_000i32), Just(-12_000), Just(12_001), -120i32..120],
                prop_oneof![Just(366_000i32), Just(-366_000), -400i32..400],
            )
                .prop_map(|(e, months, days)| Predicate::ShiftDate { input: Box::new(e), months, days }),
        ]
        .boxed()
    }

    /// An expression of any type (NULL included).
    pub fn any_expr(depth: u32) -> BoxedStrategy<Predicate> {
        prop_oneof![
            num(depth),
            text(depth),
            date(depth),
            boolean(depth),
            Just(l(Literal::Null)),
        ]
        .boxed()
    }

    fn cmp() -> impl Strategy<Value = BinaryOp> {
        prop::sample::select(vec![
            BinaryOp::Eq,
            BinaryOp::NotEq,
            BinaryOp::Lt,
            BinaryOp::LtEq,
            BinaryOp::Gt,
            BinaryOp::GtEq,
        ])
    }

    /// Two expressions of one kind (so that most comparisons validate).
    fn same_kind(depth: u32) -> BoxedStrategy<(Predicate, Predicate)> {
        prop_oneof![
            (num(depth), num(depth)),
            (text(depth), text(depth)),
            (date(depth), date(depth)),
            (any_expr(depth), any_expr(depth)),
        ]
        .boxed()
    }

    /// A boolean expression: the filter language.
    pub fn boolean(depth: u32) -> BoxedStrategy<Predicate> {
        let leaf = prop_oneof![
            Just(c("b")),
            any::<bool>().prop_map(|v| l(Literal::Boolean(v))),
            (text(0), pattern(), any::<bool>(), any::<bool>()).prop_map(|(e, p, n, ci)| {
                Predicate::Like {
                    input: Box::new(e),
                    pattern: p,
                    negated: n,
                    case_insensitive: ci,
                }
            }),
        ];
        if depth == 0 {
            return leaf.boxed();
        }
        let d = depth - 1;
        prop_oneof![
            2 => leaf,
            3 => (cmp(), same_kind(d)).prop_map(|(op, (a, b))| bin(op, a, b)),
            2 => (prop::sample::select(vec![BinaryOp::And, BinaryOp::Or]), boolean(d), boolean(d))
                .prop_map(|(op, a, b)| bin(op, a, b)),
            1 => boolean(d).prop_map(|e| Predicate::Not { input: Box::new(e) }),
            1 => any_expr(d).prop_map(|e| Predicate::IsNull { input: Box::new(e) }),
            1 => any_expr(d).prop_map(|e| Predicate::IsNotNull { input: Box::new(e) }),
            1 => (same_kind(d), prop::collection::vec(any_expr(0), 0..4), any::<bool>())
                .prop_map(|((a, b), mut list, negated)| {
                    list.push(b);
                    Predicate::InList { input: Box::new(a), list, negated }
                }),
            1 => (same_kind(d), num(0), any::<bool>()).prop_map(|((a, lo), hi, negated)| {
                Predicate::Between {
                    input: Box::new(a),
                    low: Box::new(lo),
                    high: Box::new(hi),
                    negated,
                }
            }),
            2 => (text(d), pattern(), any::<bool>(), any::<bool>()).prop_map(|(e, p, n, ci)| {
                Predicate::Like {
                    input: Box::new(e),
                    pattern: p,
                    negated: n,
                    case_insensitive: ci,
                }
            }),
            1 => any_expr(d).prop_map(|e| try_cast(e, ColumnType::Boolean)),
            1 => (participant_set(d), any::<bool>()).prop_map(|(set, negated)| Predicate::InSet {
                side: Default::default(),
                set: Box::new(set),
                negated,
            }),
        ]
        .boxed()
    }

    /// A per-participant derived table of `x` whose columns keep their source's names (the
    /// MIN or MAX of each), so that the rest of a random request still finds them.
    pub fn per_participant() -> BoxedStrategy<fedq_common::derived::PerParticipant> {
        use fedq_common::derived::{DerivedColumn, PerParticipant, UnitAggregate};
        (
            proptest::option::of(boolean(2)),
            prop::sample::select(vec![1u32, 2, 3]),
            prop::collection::vec(0u8..7, 8),
            boolean(1),
            boolean(1),
            (
                prop::sample::select(vec!["d", "e", "i", "f", "t", "b"]),
                any::<bool>(),
                any::<bool>(),
            ),
        )
            .prop_map(
                |(filter, min_rows, picks, any, all, (by, descending, nulls_first))| {
                    PerParticipant {
                        table: "x".into(),
                        filter,
                        min_rows,
                        columns: ["i", "j", "f", "s", "t", "d", "e", "b"]
                            .iter()
                            .zip(picks)
                            .map(|(c, pick)| DerivedColumn {
                                name: c.to_string(),
                                value: match (pick, *c) {
                                    // A sum keeps numeric columns numeric.
                                    (2, "i" | "j" | "f") => UnitAggregate::Sum {
                                        column: c.to_string(),
                                    },
                                    // Spreads and medians of numeric columns (floats).
                                    (4, "i" | "j" | "f") => UnitAggregate::Stddev {
                                        column: c.to_string(),
                                        population: false,
                                    },
                                    (5, "i" | "j" | "f") => UnitAggregate::Variance {
                                        column: c.to_string(),
                                        population: true,
                                    },
                                    (6, "i" | "j" | "f") => UnitAggregate::Median {
                                        column: c.to_string(),
                                    },
                                    (3, _) => UnitAggregate::First {
                                        column: c.to_string(),
                                        order: vec![fedq_common::derived::OrderKey {
                                            column: by.to_string(),
                                            descending,
                                            nulls_first,
                                        }],
                                        // Row 1, or the last row every kept participant has.
                                        nth: if descending { min_rows } else { 1 },
                                    },
                                    (0, _) => UnitAggregate::Min {
                                        column: c.to_string(),
                                    },
                                    _ => UnitAggregate::Max {
                                        column: c.to_string(),
                                    },
                                },
                                filter: None,
                            })
                            .chain([
                                DerivedColumn {
                                    name: "n".into(),
                                    value: UnitAggregate::CountRows,
                                    filter: None,
                                },
                                // Aggregates of the rows a condition picks.
                                DerivedColumn {
                                    name: "nf".into(),
                                    value: UnitAggregate::CountRows,
                                    filter: Some(any.clone()),
                                },
                                DerivedColumn {
                                    name: "mf".into(),
                                    value: UnitAggregate::Max { column: "i".into() },
                                    filter: Some(all.clone()),
                                },
                                DerivedColumn {
                                    name: "k".into(),
                                    value: UnitAggregate::CountNonNull { column: "t".into() },
                                    filter: None,
                                },
                                DerivedColumn {
                                    name: "kd".into(),
                                    value: UnitAggregate::CountDistinct { column: "t".into() },
                                    filter: None,
                                },
                                DerivedColumn {
                                    name: "a".into(),
                                    value: UnitAggregate::Any { when: any },
                                    filter: None,
                                },
                                DerivedColumn {
                                    name: "l".into(),
                                    value: UnitAggregate::All { when: all },
                                    filter: None,
                                },
                            ])
                            .collect(),
                    }
                },
            )
            .boxed()
    }

    /// A set of participants of `x`, decided from their own rows (its filter may test sets).
    pub fn participant_set(depth: u32) -> BoxedStrategy<ParticipantSet> {
        let rows =
            (boolean(depth), prop::sample::select(vec![1u32, 2, 3])).prop_map(|(f, min_rows)| {
                ParticipantSet::Rows {
                    table: "x".into(),
                    filter: Some(f),
                    min_rows,
                }
            });
        if depth == 0 {
            return rows.boxed();
        }
        let pair = (participant_set(depth - 1), participant_set(depth - 1));
        prop_oneof![
            3 => rows,
            1 => pair.prop_map(|(l, r)| ParticipantSet::Intersect { left: Box::new(l), right: Box::new(r) }),
            1 => (participant_set(depth - 1), participant_set(depth - 1))
                .prop_map(|(l, r)| ParticipantSet::Except { left: Box::new(l), right: Box::new(r) }),
            1 => (participant_set(depth - 1), participant_set(depth - 1))
                .prop_map(|(l, r)| ParticipantSet::Union { left: Box::new(l), right: Box::new(r) }),
        ]
        .boxed()
    }

    pub fn group_key() -> BoxedStrategy<GroupKey> {
        prop_oneof![
            prop::sample::select(vec!["s", "b", "t", "i", "j"])
                .prop_map(|n| GroupKey::Column { column: n.into() }),
            (
                prop::sample::select(vec!["i", "j"]),
                prop::sample::select(vec![1i64, 2, 7, 10, 100, 1000, i64::MAX]),
                prop::sample::select(vec![1i64, 2, 10])
            )
                .prop_map(|(col, divisor, m)| GroupKey::IntBucket {
                    column: col.into(),
                    divisor,
                    multiplier: m.min(divisor),
                }),
            (
                prop::sample::select(vec![
                    DateField::Year,
                    DateField::Quarter,
                    DateField::Month,
                    DateField::Week,
                    DateField::Day,
                    DateField::DayOfWeek,
                    DateField::IsoDayOfWeek,
                    DateField::DayOfYear,
                    DateField::TruncYear,
                    DateField::TruncQuarter,
                    DateField::TruncMonth,
                    DateField::TruncWeek,
                    DateField::TruncDay,
                ]),
                prop::sample::select(vec!["d", "e"])
            )
                .prop_map(|(field, col)| GroupKey::DatePart {
                    field,
                    column: col.into()
                }),
            boolean(2).prop_map(|when| GroupKey::Condition { when }),
            (
                prop::sample::select(vec!["s", "t", "i", "j", "b"]),
                prop::collection::vec(
                    prop_oneof![
                        any::<i64>().prop_map(PublicValue::Int),
                        any::<bool>().prop_map(PublicValue::Bool),
                        ".{0,3}".prop_map(PublicValue::Text),
                    ],
                    0..4
                )
            )
                .prop_map(|(col, values)| GroupKey::Listed {
                    column: col.into(),
                    values,
                }),
            (prop::collection::vec(boolean(2), 1..3), any::<bool>()).prop_map(|(conds, ints)| {
                let label = |k: usize| {
                    if ints {
                        Literal::Int64(k as i64)
                    } else {
                        Literal::Utf8(format!("l{k}"))
                    }
                };
                GroupKey::Case {
                    branches: conds
                        .into_iter()
                        .enumerate()
                        .map(|(k, when)| CaseBranch {
                            when,
                            then: label(k),
                        })
                        .collect(),
                    otherwise: label(99),
                }
            }),
        ]
        .boxed()
    }

    pub fn aggregate() -> BoxedStrategy<AggregateRequest> {
        let col = prop::sample::select(vec!["i", "j", "f"]);
        prop_oneof![
            Just(AggregateRequest::CountRows),
            Just(AggregateRequest::CountUnits),
            prop::sample::select(vec!["i", "j", "f", "s", "t", "d", "b"])
                .prop_map(|c| AggregateRequest::CountNonNull { column: c.into() }),
            (col, 0usize..3).prop_map(|(c, k)| {
                let (lower, upper, precision) = match c {
                    "i" => [(-1000.0, 1000.0, 1.0), (0.0, 10.0, 1.0), (-1.0, 1.0, 1.0)][k],
                    "j" => [(-100.0, 100.0, 1.0), (0.0, 10.0, 1.0), (-1.0, 1.0, 1.0)][k],
                    _ => [(-1e6, 1e6, 0.001), (0.0, 1.0, 0.5), (-1.0, 1.0, 0.001)][k],
                };
                match k {
                    0 => AggregateRequest::SumFixed {
                        column: c.into(),
                        lower,
                        upper,
                        precision,
                    },
                    1 => AggregateRequest::SumSquaresFixed {
                        column: c.into(),
                        lower,
                        upper,
                        precision,
                    },
                    _ => AggregateRequest::QuantileHistogram {
                        column: c.into(),
                        lower,
                        upper,
                        precision,
                        candidates: 3,
                    },
                }
            }),
        ]
        .boxed()
    }
}

/// The extreme node's catalog.
fn extreme_catalog() -> &'static fedq_common::Catalog {
    static C: OnceLock<fedq_common::Catalog> = OnceLock::new();
    C.get_or_init(|| {
        fedq_common::Catalog::from_toml(EXTREME_CATALOG, "extreme").expect("the extreme catalog")
    })
}

/// Run one request at the extreme node: if validation accepts it, execution must answer.
fn validated_requests_answer(req: &PartialAggregateRequest) -> Result<(), TestCaseError> {
    let f = extreme();
    match f.engine.validate(req) {
        Ok(()) => {
            let got = f.rt.block_on(f.engine.execute(req));
            prop_assert!(
                got.is_ok(),
                "validation accepted {} but execution failed: {:?}",
                serde_json::to_string(req).unwrap_or_default(),
                got.err()
            );
        }
        Err(e) => prop_assert!(
            e.is_refusal(),
            "validation failed with a non-refusal: {e:?}"
        ),
    }
    Ok(())
}

#[test]
fn whatever_a_node_validates_it_answers_over_extreme_values() {
    for_a_while("validated requests answer", |config| {
        proptest!(config, |(
            filter in proptest::option::weighted(0.9, arb::boolean(3)),
            keys in proptest::collection::vec(arb::group_key(), 0..3),
            aggregates in proptest::collection::vec(arb::aggregate(), 1..4),
            r in 1u32..6,
            open in proptest::option::weighted(0.3, 1u32..4),
            derived in proptest::option::weighted(0.25, arb::per_participant()),
            values in proptest::collection::vec(arb::value(2), 0..3),
            joins in arb::self_joins(),
        )| {
            // Computed columns, each counted and (when bounded) summed within the bounds
            // the node declares for it, so that validation accepts the sum.
            let mut aggregates = aggregates;
            let mut computed = Vec::new();
            for (i, value) in values.into_iter().enumerate() {
                let c = fedq_common::computed::Computed { name: format!("e{i}"), value };
                aggregates.push(AggregateRequest::CountNonNull { column: c.name.as_str().into() });
                let catalog = extreme_catalog();
                let x = catalog.table("x").expect("table x");
                let lookup = |_: fedq_common::Side, n: &str| x.column(n);
                if let Ok(spec) = c.spec(&lookup) {
                    if let Some(b) = spec.bounds() {
                        aggregates.push(AggregateRequest::SumFixed {
                            column: c.name.as_str().into(),
                            lower: b.lower,
                            upper: b.upper,
                            precision: b.precision,
                        });
                    }
                }
                computed.push(c);
            }
            let req = PartialAggregateRequest {
                query_id: "edge".into(),
                table: "x".into(),
                filter,
                joins: if derived.is_some() { Vec::new() } else { joins },
                group_by: keys,
                aggregates,
                // A derived table has one row per participant.
                max_rows_per_unit: if derived.is_some() { 1 } else { r },
                max_groups_per_unit: open,
                derived,
                computed,
            };
            validated_requests_answer(&req)?;
        })
    });
}

/// Stability (issue 14): whatever the filter (participant sets included), whether the
/// request reads a derived table, and whether it joins the table with itself (inner or left, up to three times), removing one participant removes at most R of the bounded
/// rows and at most that one participant, and changes nobody else's: the counts of a node
/// without the participant are at most, and at least R (or 1) below, those of a node with.
/// `CountRows` and `CountUnits` without group keys do not depend on which rows bounding
/// keeps, so the comparison is exact.
#[test]
fn one_participant_changes_the_bounded_relation_by_at_most_its_row_bound() {
    for_a_while("stability", |config| {
        proptest!(config, |(
            filter in proptest::option::weighted(0.9, arb::boolean(3)),
            r in 1u32..6,
            derived in proptest::option::weighted(0.3, arb::per_participant()),
            joins in arb::self_joins(),
        )| {
            let f = extreme_for_stability();
            let r = if derived.is_some() { 1 } else { r };
            let req = PartialAggregateRequest {
                query_id: "stability".into(),
                table: "x".into(),
                filter,
                // A participant's joined rows (inner or left, of x with itself) are theirs.
                joins: if derived.is_some() { Vec::new() } else { joins },
                group_by: vec![],
                aggregates: vec![AggregateRequest::CountRows, AggregateRequest::CountUnits],
                max_rows_per_unit: r,
                max_groups_per_unit: None,
                derived,
                computed: Vec::new(),
            };
            if f.engine.validate(&req).is_err() {
                return Ok(());
            }
            let counts = |e: &NodeEngine| -> (i64, i64) {
                let out = f.rt.block_on(e.execute(&req)).expect("validated requests answer");
                let b = &out[0];
                let v = |c: usize| {
                    b.column(c)
                        .as_any()
                        .downcast_ref::<datafusion::arrow::array::Int64Array>()
                        .expect("an int64 count")
                        .value(0)
                };
                (v(0), v(1))
            };
            let (rows, units) = counts(&f.engine);
            for (p, e) in &f.neighbours {
                let (rows_without, units_without) = counts(e);
                let (dr, du) = (rows - rows_without, units - units_without);
                prop_assert!(
                    (0..=i64::from(r)).contains(&dr) && (0..=1).contains(&du),
                    "without {p}: rows {rows} → {rows_without}, participants {units} → {units_without} (R = {r}) for {}",
                    serde_json::to_string(&req).unwrap_or_default()
                );
            }
        })
    });
}

/// A request over the extreme-values table with R = 1, for the regression tests below.
fn edge_request(
    filter: Predicate,
    group_by: Vec<GroupKey>,
    aggregates: Vec<AggregateRequest>,
) -> PartialAggregateRequest {
    PartialAggregateRequest {
        query_id: "edge".into(),
        table: "x".into(),
        filter: Some(filter),
        joins: Vec::new(),
        group_by,
        aggregates,
        max_rows_per_unit: 1,
        max_groups_per_unit: None,
        derived: None,
        computed: Vec::new(),
    }
}

/// A request the property above once shrank to: `1970 IN (TRY_CAST(NOT b AS INT))` with a
/// `CASE WHEN b` key. DataFusion's physical simplifier unwrapped the boolean's cast into a
/// comparison of mismatched types; the node now writes that cast as a CASE.
#[test]
fn a_number_compared_with_a_cast_boolean_is_answered() {
    let filter = Predicate::InList {
        input: Box::new(Predicate::DatePart {
            field: DateField::Year,
            input: Box::new(Predicate::Literal {
                value: Literal::Date32(0),
            }),
        }),
        list: vec![Predicate::TryCast {
            input: Box::new(Predicate::Not {
                input: Box::new(Predicate::column("b")),
            }),
            to: ColumnType::Int32,
        }],
        negated: false,
    };
    let req = edge_request(
        filter,
        vec![GroupKey::Case {
            branches: vec![fedq_common::group_key::CaseBranch {
                when: Predicate::column("b"),
                then: Literal::Utf8("l0".into()),
            }],
            otherwise: Literal::Utf8("l99".into()),
        }],
        vec![AggregateRequest::CountRows],
    );
    let f = extreme();
    f.engine.validate(&req).expect("a valid request");
    f.rt.block_on(f.engine.execute(&req))
        .expect("validated requests answer");
}

/// A filter the stability property once shrank to: `NaN < i / 9223372036854775807 *
/// (DATE '-5877641-06-23' - d)`. A NaN literal counts as NULL, as NaN does everywhere, and
/// so never reaches DataFusion's interval analysis, which asserted on it in debug builds.
#[test]
fn a_nan_literal_in_a_filter_is_answered_as_null() {
    let bin = |op, left, right| Predicate::Binary {
        op,
        left: Box::new(left),
        right: Box::new(right),
    };
    let lit = |value| Predicate::Literal { value };
    let filter = bin(
        fedq_common::BinaryOp::Lt,
        lit(Literal::Float64(f64::NAN)),
        bin(
            fedq_common::BinaryOp::Multiply,
            bin(
                fedq_common::BinaryOp::Divide,
                Predicate::column("i"),
                lit(Literal::Int64(i64::MAX)),
            ),
            bin(
                fedq_common::BinaryOp::Minus,
                lit(Literal::Date32(i32::MIN)),
                Predicate::column("d"),
            ),
        ),
    );
    let req = edge_request(
        filter,
        vec![],
        vec![AggregateRequest::CountRows, AggregateRequest::CountUnits],
    );
    let f = extreme();
    f.engine.validate(&req).expect("a valid request");
    let out =
        f.rt.block_on(f.engine.execute(&req))
            .expect("validated requests answer");
    let rows = out[0]
        .column(0)
        .as_any()
        .downcast_ref::<datafusion::arrow::array::Int64Array>()
        .expect("an int64 count")
        .value(0);
    assert_eq!(rows, 0, "a comparison with NULL is never true");
}
