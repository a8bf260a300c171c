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
//!   returns rows), uses the catalog's R, and groups only on public domains.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fedq_common::group_key::{DateField, GroupKey};
use fedq_common::{AggregateRequest, Catalog, PartialAggregateRequest};

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
        join: None,
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
                join: None,
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
            ]),
            group in prop::sample::select(vec![
                "", " GROUP BY test", " GROUP BY pid", " GROUP BY value", " GROUP BY sex",
                " GROUP BY birth_year / 10", " GROUP BY birth_year / 10 * 10", " GROUP BY birth_year / 0",
                " GROUP BY value / 10", " GROUP BY CASE WHEN value > 5 THEN 'a' ELSE 'b' END",
                " GROUP BY CASE WHEN value > 5 THEN 'a' END", " GROUP BY CASE test WHEN 'LDL' THEN 1 ELSE 2 END",
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
