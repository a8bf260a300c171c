//! GROUP BY keys without a public domain: DP partition selection, end to end.
//!
//! - The pre-noise merged partials of partition-selected queries (one table, and a join)
//!   equal DataFusion over the union of the site files after the same per-site G bounding:
//!   each participant's rows at a site kept in the G groups where it has the most rows,
//!   ties by the smallest key. R is raised so that row bounding truncates nothing, which
//!   makes the expected values exact.
//! - The researcher's query runs through Flight SQL, is charged ε and δ, and releases only
//!   groups that passed the threshold, with the researcher's aliases.
//! - Statistically, from fixed merged partials through the real release path: a group of
//!   one participant is never released and a group well above the threshold always is. The
//!   false-failure probability of the whole test is below 1e-9 (computed in the test from
//!   the planned scale and threshold, and asserted).
//! - Refusals: no G declared, δ = 0, grouping by the privacy unit; EXPLAIN shows the
//!   selection with its ε, δ and threshold.

use std::collections::{BTreeMap, HashMap};

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Float64Type;
use fedq_common::{AggregateRequest, PublicValue};
use fedq_coordinator::fanout::MergedPartials;
use fedq_coordinator::planner::Planner;
use fedq_coordinator::release::{release, META_DELTA_SPENT, META_SELECTION_THRESHOLD};
use fedq_coordinator::selection::SELECTION_LABEL;
use fedq_coordinator::service::ACTION_BUDGET;
use fedq_tests::{
    cell, exact_rows, key, merged_rows, set_rows_per_unit, site_context, start, synth,
};

/// G of `diagnoses` in the synthetic catalog.
const G: u32 = 5;

/// Rows and participants per code after per-site G bounding, from DataFusion. `rows` is the
/// per-site row source with columns `fedq_site, pid, code`.
async fn bounded_by_code(
    ctx: &datafusion::prelude::SessionContext,
    rows: &str,
) -> BTreeMap<Vec<String>, Vec<i128>> {
    let sql = format!(
        "WITH src AS ({rows}), \
              per AS (SELECT fedq_site, pid, code, COUNT(*) AS n FROM src WHERE code IS NOT NULL \
                      GROUP BY fedq_site, pid, code), \
              ranked AS (SELECT *, ROW_NUMBER() OVER (PARTITION BY fedq_site, pid ORDER BY n DESC, code ASC) AS rn \
                         FROM per) \
         SELECT code, CAST(SUM(n) AS BIGINT), CAST(COUNT(*) AS BIGINT) FROM ranked WHERE rn <= {G} GROUP BY code"
    );
    exact_rows(ctx, &sql, 1).await
}

/// Merged (rows, participants) per code from the gathered partials; codes are text.
fn merged_by_code(
    merged: &MergedPartials,
    aggregates: &[AggregateRequest],
) -> BTreeMap<Vec<String>, Vec<i128>> {
    for k in merged.groups.keys() {
        assert!(
            matches!(k[..], [PublicValue::Text(_)]),
            "code is text: {k:?}"
        );
    }
    merged_rows(
        merged,
        aggregates,
        &[AggregateRequest::CountRows, AggregateRequest::CountUnits],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_selected_partials_are_exact_after_g_bounding() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 3000, 17);
    // No row truncation, so that the expected values are exact.
    set_rows_per_unit(dir, 10_000);
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let ctx = site_context(dir).await;

    // One table.
    let q = engine
        .plan(
            "alice",
            "SELECT code, COUNT(*) AS n FROM diagnoses GROUP BY code",
        )
        .await
        .unwrap();
    assert_eq!(q.request.max_groups_per_unit, Some(G));
    let sel = q.selection.as_ref().expect("partition selection");
    assert_eq!((sel.l0, sel.linf), (G * 2, 2), "min(G, R)·S and S");
    assert_eq!(q.delta, fedq_synth::DELTA_PER_QUERY);
    let merged = engine.gather(&q).await.unwrap();
    let got = merged_by_code(&merged, &q.request.aggregates);
    let want = bounded_by_code(&ctx, "SELECT fedq_site, pid, code FROM diagnoses").await;
    assert_eq!(got, want);
    // The test needs participants with more than G codes at a site.
    let all_rows = ctx
        .sql("SELECT CAST(COUNT(*) AS BIGINT) FROM diagnoses")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let total: i128 = want.values().map(|v| v[0]).sum();
    assert!(
        (cell(&all_rows[0], 0, 0).unwrap() as i128) > total,
        "G bounding must drop rows in this data"
    );

    // A join: which diagnosis codes are most common among BRCA2 carriers.
    let sql =
        "SELECT code, COUNT(*) FROM diagnoses JOIN variants USING (pid) WHERE gene = 'BRCA2' \
               GROUP BY code ORDER BY 2 DESC LIMIT 10";
    let q = engine.plan("alice", sql).await.unwrap();
    let merged = engine.gather(&q).await.unwrap();
    let got = merged_by_code(&merged, &q.request.aggregates);
    let want = bounded_by_code(
        &ctx,
        "SELECT d.fedq_site, d.pid, d.code FROM diagnoses d JOIN variants v \
         ON d.pid = v.pid AND d.fedq_site = v.fedq_site WHERE v.gene = 'BRCA2'",
    )
    .await;
    assert!(!want.is_empty());
    assert_eq!(got, want);
    fed.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_selected_query_through_flight_sql_charges_epsilon_and_delta() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 3000, 19);
    let fed = start(dir).await;
    let mut alice = fed.client("alice").await.unwrap();
    let sql = "SELECT code AS diagnosis, COUNT(*) AS n FROM diagnoses GROUP BY code ORDER BY n DESC LIMIT 5";

    // EXPLAIN: free, and shows the selection with its share of ε, δ and the threshold.
    let q = fed.coordinator.engine.plan("alice", sql).await.unwrap();
    let sel = q.selection.clone().unwrap();
    let r = alice.query(&format!("EXPLAIN {sql}")).await.unwrap();
    let b = &r.batches[0];
    let col = |name: &str| b.column(b.schema().index_of(name).unwrap()).clone();
    let (items, names, eps, delta) = (col("item"), col("name"), col("epsilon"), col("delta"));
    let (items, names) = (items.as_string::<i32>(), names.as_string::<i32>());
    let (eps, delta) = (
        eps.as_primitive::<Float64Type>(),
        delta.as_primitive::<Float64Type>(),
    );
    let row = (0..b.num_rows())
        .find(|&i| names.value(i) == SELECTION_LABEL)
        .expect("EXPLAIN lists the selection");
    assert_eq!(items.value(row), "statistic");
    assert_eq!(eps.value(row), 0.5);
    assert_eq!(delta.value(row), fedq_synth::DELTA_PER_QUERY);
    let detail = b
        .column(b.schema().index_of("detail").unwrap())
        .as_string::<i32>()
        .value(row)
        .to_string();
    assert!(
        detail.contains(&format!("T = {}", sel.threshold)),
        "{detail}"
    );
    let query_row = (0..b.num_rows())
        .find(|&i| items.value(i) == "query")
        .unwrap();
    assert_eq!(delta.value(query_row), fedq_synth::DELTA_PER_QUERY);
    // The shares of ε add up: selection 1/2, bounding report 1/20, statistics the rest.
    let total: f64 = (0..b.num_rows())
        .filter(|&i| items.value(i) == "statistic")
        .map(|i| eps.value(i))
        .sum();
    assert!((total - 1.0).abs() < 1e-9, "{total}");

    // The query itself.
    let before = alice.action(ACTION_BUDGET).await.unwrap();
    let r = alice.query(sql).await.unwrap();
    let after = alice.action(ACTION_BUDGET).await.unwrap();
    let spent = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
    assert!((spent(&after, "epsilon_spent") - spent(&before, "epsilon_spent") - 1.0).abs() < 1e-9);
    assert!(
        (spent(&after, "delta_spent")
            - spent(&before, "delta_spent")
            - fedq_synth::DELTA_PER_QUERY)
            .abs()
            < 1e-15,
        "{before} {after}"
    );
    let md = r.schema.metadata();
    assert_eq!(md[META_SELECTION_THRESHOLD], sel.threshold.to_string());
    assert_eq!(
        md[META_DELTA_SPENT],
        fedq_synth::DELTA_PER_QUERY.to_string()
    );
    let names: Vec<&str> = r
        .schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    assert_eq!(&names[..2], ["diagnosis", "n"]);
    // Only groups with more than about T participants can pass; the released codes are
    // observed codes, ordered by the noisy count.
    let exact: BTreeMap<String, f64> = {
        let ctx = site_context(dir).await;
        let b = ctx
            .sql("SELECT code, CAST(COUNT(DISTINCT pid) AS DOUBLE) FROM diagnoses GROUP BY code")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        b.iter()
            .flat_map(|b| (0..b.num_rows()).map(move |i| (key(b, 0, i), cell(b, 1, i).unwrap())))
            .collect()
    };
    let rows: usize = r.batches.iter().map(|b| b.num_rows()).sum();
    assert!(rows <= 5);
    for b in &r.batches {
        for i in 0..b.num_rows() {
            let code = key(b, 0, i);
            assert!(exact.contains_key(&code), "{code} was never observed");
        }
    }
    // The audit log records the selection in the query's ε split.
    fed.shutdown().await.unwrap();
    let charged = fedq_tests::charged_entries(dir);
    assert_eq!(charged.len(), 1);
    assert_eq!(
        charged[0]["body"]["delta"].as_f64(),
        Some(fedq_synth::DELTA_PER_QUERY)
    );
    let split = charged[0]["body"]["epsilon_split"].as_array().unwrap();
    let s = split
        .iter()
        .find(|s| {
            s["statistic"]
                .as_str()
                .unwrap()
                .starts_with(SELECTION_LABEL)
        })
        .expect("selection in the ε split");
    assert_eq!(s["epsilon"], "1/2");
}

/// From fixed merged partials, through the real release path: a group of one participant
/// is never released, a group far above the threshold always is.
#[tokio::test]
async fn one_participant_is_never_released_and_a_crowd_always_is() {
    let catalog = fedq_synth::reference_catalog();
    // A small δ so that a single participant's release probability is negligible per trial
    // (about δ/L0 = 1e-14; OpenDP's f64 accounting cannot certify much below 1e-15).
    let planner = Planner::new(&catalog).unwrap().with_delta_per_query(1e-13);
    let q = planner
        .plan(
            "SELECT code, COUNT(*) AS n FROM diagnoses GROUP BY code",
            1.0,
            "stat",
        )
        .await
        .unwrap();
    let sel = q.selection.clone().unwrap();
    let trials = 1000u32;
    // P(one participant released) = P(Z ≥ T − 1), P(crowd of c dropped) = P(Z ≤ T − 1 − c),
    // with P(Z ≥ k) = P(Z ≤ −k) = e^{−k/b}/(1 + e^{−1/b}) for the discrete Laplace, k ≥ 1.
    let b = sel.scale;
    let tail = |k: i64| (-(k as f64) / b).exp() / (1.0 + (-1.0 / b).exp());
    let p_lonely = tail(sel.threshold - 1);
    let margin = (b * (f64::from(trials) / 1e-10).ln()).ceil() as i64 + 1;
    let crowd = sel.threshold + margin;
    let p_crowd = tail(crowd - sel.threshold + 1);
    // One more release of the lonely group alone (the empty answer below).
    let p_fail = f64::from(trials + 1) * p_lonely + f64::from(trials) * p_crowd;
    assert!(p_fail < 1e-9, "false-failure probability {p_fail}");

    let n = q.request.aggregates.len();
    let partials = |units: i128| {
        let mut p = vec![0i128; n];
        for (i, a) in q.request.aggregates.iter().enumerate() {
            p[i] = match a {
                AggregateRequest::CountRows => units * 3,
                AggregateRequest::CountUnits => units,
                _ => 0,
            };
        }
        p
    };
    let mut groups = BTreeMap::new();
    groups.insert(vec![PublicValue::Text("LONELY".into())], partials(1));
    groups.insert(
        vec![PublicValue::Text("CROWD".into())],
        partials(i128::from(crowd)),
    );
    let merged = MergedPartials {
        groups,
        sites_answered: vec!["site01".into()],
        truncated_units: Some(0),
        sites_failed: vec![],
        histograms: BTreeMap::new(),
    };
    // Nothing above the threshold: an empty answer with the query's columns, not an error.
    let mut lonely_only = merged.clone();
    lonely_only
        .groups
        .retain(|k, _| k[0] == PublicValue::Text("LONELY".into()));
    let r = release(&q, &lonely_only, 0, HashMap::new()).await.unwrap();
    assert_eq!(r.batches.iter().map(|b| b.num_rows()).sum::<usize>(), 0);
    assert_eq!(r.schema.field(0).name(), "code");
    for _ in 0..trials {
        let r = release(&q, &merged, 0, HashMap::new()).await.unwrap();
        let codes: Vec<String> = r
            .batches
            .iter()
            .flat_map(|b| (0..b.num_rows()).map(move |i| key(b, 0, i)))
            .collect();
        assert_eq!(codes, ["CROWD"]);
    }
}

#[tokio::test]
async fn refusals_name_the_missing_declaration() {
    let catalog = fedq_synth::reference_catalog();
    let sql = "SELECT code, COUNT(*) FROM diagnoses GROUP BY code";
    // δ = 0 (or not configured): selection would cost δ.
    let e = Planner::new(&catalog)
        .unwrap()
        .plan(sql, 1.0, "q")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("delta_per_query") && e.contains("δ"), "{e}");
    // No G declared for the table.
    let mut no_g = catalog.clone();
    no_g.tables
        .get_mut("diagnoses")
        .unwrap()
        .max_groups_per_unit = None;
    let e = Planner::new(&no_g)
        .unwrap()
        .with_delta_per_query(1e-7)
        .plan(sql, 1.0, "q")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("max_groups_per_unit") && e.contains("diagnoses"),
        "{e}"
    );
    // In a join, the driving table's G applies: participants declares none.
    let e = Planner::new(&catalog)
        .unwrap()
        .with_delta_per_query(1e-7)
        .plan(
            "SELECT d.code, COUNT(*) FROM participants p JOIN diagnoses d USING (pid) GROUP BY d.code",
            1.0,
            "q",
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("max_groups_per_unit") && e.contains("participants") && e.contains("driving"),
        "{e}"
    );
    // A δ below what OpenDP's f64 accounting can certify says so.
    let e = Planner::new(&catalog)
        .unwrap()
        .with_delta_per_query(1e-20)
        .plan(sql, 1.0, "q")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot certify"), "{e}");
    // The privacy unit is never a key.
    let e = Planner::new(&catalog)
        .unwrap()
        .with_delta_per_query(1e-7)
        .plan("SELECT pid, COUNT(*) FROM diagnoses GROUP BY pid", 1.0, "q")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("privacy unit"), "{e}");
    // A public key alone needs no δ, and is charged none.
    let q = Planner::new(&catalog)
        .unwrap()
        .plan(
            "SELECT gene, COUNT(*) FROM variants GROUP BY gene",
            1.0,
            "q",
        )
        .await
        .unwrap();
    assert!(q.selection.is_none() && q.delta == 0.0);
}
