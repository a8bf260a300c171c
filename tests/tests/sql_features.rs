//! End to end: EXPLAIN, centring, sites per participant and small-cell suppression, through
//! Flight SQL against an in-process federation.
//!
//! Statistical checks bound each noisy count by its discrete Laplace tail at 1e-12; fewer
//! than 20 bounds are used in this file, so a spurious failure has probability < 1e-10.

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::Float64Type;
use fedq::client::QueryResult;
use fedq::federation::{FederationOptions, LocalFederation};
use fedq::CliError;
use fedq_common::PublicValue;
use fedq_coordinator::explain::META_EXPLAIN;
use fedq_coordinator::noise::discrete_laplace_half_width;
use fedq_coordinator::planner::StatisticKind;
use fedq_coordinator::release::{
    META_COUNT_NOISE_SCALE, META_EPSILON_SPENT, META_NOISE_SCALE, META_SUPPRESSED_BELOW,
    SUPPRESSED_COLUMN,
};
use fedq_coordinator::service::ACTION_BUDGET;
use fedq_tests::{cell, key, set_sites_per_unit, start, synth};

const ALPHA: f64 = 1e-12;

fn col<'a>(r: &'a QueryResult, name: &str) -> &'a dyn Array {
    let i = r.schema.index_of(name).expect(name);
    r.batches[0].column(i).as_ref()
}

fn text(b: &RecordBatch, name: &str, row: usize) -> Option<String> {
    let a = b.column(b.schema().index_of(name).unwrap());
    (!a.is_null(row)).then(|| a.as_string::<i32>().value(row).to_string())
}

fn float(b: &RecordBatch, name: &str, row: usize) -> Option<f64> {
    let a = b.column(b.schema().index_of(name).unwrap());
    (!a.is_null(row)).then(|| a.as_primitive::<Float64Type>().value(row))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn explain_is_free_reads_no_data_and_shows_sensitivities() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 1500, 21);
    let mut fed = start(dir).await;
    let mut alice = fed.client("alice").await.unwrap();
    let before = alice.action(ACTION_BUDGET).await.unwrap();
    // With a node down a real query fails; EXPLAIN never asks a node, so it still works.
    fed.stop_node(0).await.unwrap();
    let sql =
        "SELECT sex, COUNT(*) AS n, AVG(birth_year) AS mean_by FROM participants GROUP BY sex";
    let r = alice.query(&format!("EXPLAIN {sql}")).await.unwrap();
    let after = alice.action(ACTION_BUDGET).await.unwrap();
    assert_eq!(before["epsilon_spent"], after["epsilon_spent"]);
    assert_eq!(r.schema.metadata()[META_EPSILON_SPENT], "0");
    assert_eq!(r.schema.metadata()[META_EXPLAIN], "true");

    let q = fed.coordinator.engine.plan("alice", sql).await.unwrap();
    let b = &r.batches[0];
    let mut stat_rows = 0;
    let mut eps_total = 0.0;
    for row in 0..b.num_rows() {
        let item = text(b, "item", row).unwrap();
        let name = text(b, "name", row).unwrap();
        match item.as_str() {
            "node request" => {
                let mut want = q.request.clone();
                want.query_id.clear();
                let got: fedq_common::PartialAggregateRequest =
                    serde_json::from_str(&text(b, "detail", row).unwrap()).unwrap();
                assert_eq!(got, want);
            }
            "statistic" => {
                stat_rows += 1;
                let sens = float(b, "sensitivity", row).unwrap();
                let eps = float(b, "epsilon", row).unwrap();
                let scale = float(b, "noise_scale", row).unwrap();
                eps_total += eps;
                // participants: R = 1, S = 2; birth_year in [1900, 2030], centred on 1965.
                // The bounding report: S = 2, 1/20 of ε.
                let want = if name.starts_with("participants truncated") {
                    assert_eq!(eps, 1.0 / 20.0);
                    2.0
                } else if name.starts_with("SUM(birth_year - 1965)") {
                    assert!(text(b, "sensitivity_formula", row)
                        .unwrap()
                        .contains("half-width"));
                    2.0 * 65.0
                } else {
                    assert!(name.starts_with("COUNT("), "{name}");
                    2.0
                };
                assert_eq!(sens, want, "{name}");
                assert!((scale - sens / eps).abs() < 1e-9 * scale, "{name}");
                assert_eq!(
                    float(b, "ci95_half_width", row),
                    Some(discrete_laplace_half_width(scale, 0.05))
                );
                assert_eq!(float(b, "delta", row), Some(0.0));
            }
            "output" if name == "mean_by" => {
                let d = text(b, "detail", row).unwrap();
                assert!(d.contains("N = 1000") && d.contains("numerator"), "{d}");
                assert!(float(b, "ci95_half_width", row).unwrap() > 0.0);
            }
            "output" => assert_eq!(name, "n"),
            "query" => assert_eq!(float(b, "epsilon", row), Some(1.0)),
            other => panic!("unexpected item {other}"),
        }
    }
    assert_eq!(stat_rows, 4);
    assert!((eps_total - 1.0).abs() < 1e-12);

    // EXPLAIN ANALYZE would run the query: refused.
    match alice.query(&format!("EXPLAIN ANALYZE {sql}")).await {
        Err(CliError::Server { code, message }) => {
            assert_eq!(code, tonic::Code::PermissionDenied);
            assert!(message.contains("EXPLAIN"), "{message}");
        }
        other => panic!("expected a refusal, got {:?}", other.map(|r| r.schema)),
    }
    // Refusals stay refusals under EXPLAIN.
    assert!(alice.query("EXPLAIN SELECT * FROM labs").await.is_err());

    // A join: the request carries the typed join, the query row both tables and the
    // driving table's R (labs: 20), and the statistics R·S = 20·2.
    let join = "SELECT p.sex, COUNT(*) FROM labs l JOIN participants p USING (pid) GROUP BY p.sex";
    let r = alice.query(&format!("EXPLAIN {join}")).await.unwrap();
    let b = &r.batches[0];
    for row in 0..b.num_rows() {
        let name = text(b, "name", row).unwrap();
        match text(b, "item", row).unwrap().as_str() {
            "query" => {
                assert!(name.contains("labs JOIN participants"), "{name}");
                let d = text(b, "detail", row).unwrap();
                assert!(d.contains("R = 20 rows per participant"), "{d}");
            }
            "node request" => {
                let got: fedq_common::PartialAggregateRequest =
                    serde_json::from_str(&text(b, "detail", row).unwrap()).unwrap();
                assert_eq!(
                    got.joins.first().map(|j| j.table.clone()),
                    Some("participants".to_string())
                );
            }
            // The bounding report counts each participant once per site: S = 2.
            "statistic" if name.starts_with("participants truncated") => {
                assert_eq!(float(b, "sensitivity", row), Some(2.0))
            }
            "statistic" => assert_eq!(float(b, "sensitivity", row), Some(40.0)),
            _ => {}
        }
    }
    fed.shutdown().await.unwrap();

    // The audit log records the EXPLAIN, free, and nothing was charged.
    let path = dir.join("ledger.sqlite");
    let conn = fedq_coordinator::audit::open_read_only(&path).unwrap();
    let entries: Vec<serde_json::Value> = fedq_coordinator::audit::read_rows(&conn, &path)
        .unwrap()
        .into_iter()
        .map(|r| serde_json::from_str(&r.entry).unwrap())
        .collect();
    let explained: Vec<_> = entries
        .iter()
        .filter(|e| e["kind"] == "query.explained")
        .collect();
    assert_eq!(explained.len(), 2);
    assert_eq!(explained[0]["body"]["epsilon_charged"], 0.0);
    assert_eq!(explained[0]["body"]["sql"], sql);
    assert_eq!(explained[1]["body"]["sql"], join);
    assert!(entries.iter().all(|e| e["kind"] != "query.charged"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn avg_is_centred_and_sites_per_participant_scale_the_noise() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 1500, 22);
    set_sites_per_unit(dir, 3);
    let fed = start(dir).await;
    let mut alice = fed.client("alice").await.unwrap();
    let engine = fed.coordinator.engine.clone();

    // AVG(birth_year), bounds [1900, 2030]: noise for a half-width of 65, not 2030.
    let sql = "SELECT AVG(birth_year) AS a FROM participants";
    let q = engine.plan("alice", sql).await.unwrap();
    let eps_of = |f: &dyn Fn(&StatisticKind) -> bool| {
        q.statistics
            .iter()
            .find(|s| f(&s.kind))
            .unwrap()
            .epsilon
            .to_f64()
            .value()
    };
    let eps_s = eps_of(&|k| matches!(k, StatisticKind::CentredSum { .. }));
    let eps_n = eps_of(&|k| matches!(k, StatisticKind::Count { .. }));
    let r = alice.query(sql).await.unwrap();
    let md = r.schema.field_with_name("a").unwrap().metadata().clone();
    let b_sum: f64 = md[META_NOISE_SCALE].parse().unwrap();
    let b_count: f64 = md[META_COUNT_NOISE_SCALE].parse().unwrap();
    // R = 1, S = 3.
    assert!((b_sum - 3.0 * 65.0 / eps_s).abs() < 1e-9 * b_sum, "{b_sum}");
    assert!((b_count - 3.0 / eps_n).abs() < 1e-9 * b_count, "{b_count}");
    assert!(b_sum < 3.0 * 2030.0 / eps_s / 10.0);

    // COUNT(*) alone gets all of ε = 1 but the bounding report's 1/20: scale R·S/ε =
    // 3/0.95 = 60/19.
    let r = alice
        .query("SELECT COUNT(*) AS n FROM participants")
        .await
        .unwrap();
    let md = r.schema.field_with_name("n").unwrap().metadata().clone();
    let scale: f64 = md[META_NOISE_SCALE].parse().unwrap();
    assert!((scale - 60.0 / 19.0).abs() < 1e-12, "{scale}");
    let n = cell(&r.batches[0], 0, 0).unwrap();
    let exact = 1500.0;
    assert!((n - exact).abs() <= discrete_laplace_half_width(scale, ALPHA));
    let _ = col(&r, "n");
    fed.shutdown().await.unwrap();

    // The audit log records the split of each charged query.
    let charged = fedq_tests::charged_entries(dir);
    assert_eq!(charged.len(), 2);
    let split = charged[0]["body"]["epsilon_split"].as_array().unwrap();
    let labels: Vec<&str> = split
        .iter()
        .map(|s| s["statistic"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        vec![
            "COUNT(birth_year)",
            "SUM(birth_year - 1965) in units of 1",
            "participants truncated by bounding (more than R rows)"
        ]
    );
    let share = |i: usize| -> f64 {
        let (a, b) = split[i]["epsilon"]
            .as_str()
            .unwrap()
            .split_once('/')
            .unwrap();
        a.parse::<f64>().unwrap() / b.parse::<f64>().unwrap()
    };
    assert!((share(0) - eps_n).abs() < 1e-12 && (share(1) - eps_s).abs() < 1e-12);
    assert!((share(2) - 1.0 / 20.0).abs() < 1e-12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_cells_are_suppressed_on_noisy_counts_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 3000, 23);
    const T: u64 = 300;
    let fed = LocalFederation::start(
        dir,
        FederationOptions {
            min_reported_count: Some(T),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut alice = fed.client("alice").await.unwrap();
    alice.query("SET fedq.epsilon = 2").await.unwrap();
    let engine = fed.coordinator.engine.clone();
    // Group F has ~1500 participants, group M none (the WHERE removes its rows): far on
    // either side of the threshold, so the noisy decision is certain up to 1e-12 per count.
    // (`sex <> 'M'` rather than `sex = 'F'`, which would narrow the released groups to F.)
    let sql = "SELECT sex, COUNT(*) AS n, SUM(birth_year) AS s, AVG(birth_year) AS a, \
               STDDEV(birth_year) AS sd FROM participants WHERE sex <> 'M' GROUP BY sex ORDER BY sex";
    let q = engine.plan("alice", sql).await.unwrap();
    let merged = engine.gather(&q).await.unwrap();
    let f_key = vec![PublicValue::Text("F".into())];
    let counts: Vec<usize> = q
        .statistics
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s.kind, StatisticKind::Count { .. }))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(counts.len(), 2, "COUNT(*) and COUNT(birth_year)");
    for &i in &counts {
        let st = &q.statistics[i];
        let b = st.sensitivity as f64 / st.epsilon.to_f64().value();
        let t = discrete_laplace_half_width(b, ALPHA);
        let StatisticKind::Count { partial } = st.kind else {
            unreachable!()
        };
        let exact_f = merged.get(&f_key, q.request.aggregates.len())[partial] as f64;
        assert!(
            exact_f - t > T as f64,
            "test premise: F is large ({exact_f}, t={t})"
        );
        assert!(
            t < T as f64,
            "test premise: the empty group stays below {T}"
        );
    }

    let r = alice.query(sql).await.unwrap();
    assert_eq!(
        r.schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect::<Vec<_>>(),
        vec!["sex", "n", "s", "a", "sd", SUPPRESSED_COLUMN]
    );
    assert_eq!(
        r.schema.field_with_name("n").unwrap().metadata()[META_SUPPRESSED_BELOW],
        T.to_string()
    );
    let b = &r.batches[0];
    assert_eq!(b.num_rows(), 2);
    assert_eq!(key(b, 0, 0), "F");
    assert_eq!(key(b, 0, 1), "M");
    for c in 1..5 {
        assert!(!b.column(c).is_null(0), "F column {c} is released");
        assert!(b.column(c).is_null(1), "M column {c} is suppressed");
    }
    assert_eq!(text(b, SUPPRESSED_COLUMN, 0), None);
    assert_eq!(
        text(b, SUPPRESSED_COLUMN, 1).as_deref(),
        Some("n, s, a, sd: noisy count below 300")
    );

    // A SUM alone is suppressed by its own noisy count.
    let r = alice
        .query("SELECT sex, SUM(birth_year) AS total FROM participants WHERE sex <> 'F' GROUP BY sex ORDER BY sex")
        .await
        .unwrap();
    let b = &r.batches[0];
    assert!(b.column(1).is_null(0), "F is empty here");
    assert!(!b.column(1).is_null(1));
    assert_eq!(
        text(b, SUPPRESSED_COLUMN, 0).as_deref(),
        Some("total: noisy count below 300")
    );
    fed.shutdown().await.unwrap();
}
