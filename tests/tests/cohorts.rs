//! Cohorts: semi-joins and anti-joins on the participant (issue 14, part 2), end to end.
//!
//! - The pre-noise merged partials of each accepted shape (`IN`, `NOT IN`, `EXISTS`,
//!   `NOT EXISTS`, `INTERSECT`, `EXCEPT`, `UNION`, `HAVING COUNT(*) >= k`, a set nested in
//!   a set, a set with a join, a set in a `CASE` key and as a boolean key) equal DataFusion over the union of
//!   the site files, with membership decided per site (each subquery correlated on the
//!   site as well as the participant). R is raised so that bounding truncates nothing.
//! - A set of participants in `FROM` (`INTERSECT`, `EXCEPT`, `UNION`, `DISTINCT`, `HAVING`)
//!   is counted, each member once per site, exactly as DataFusion counts it.
//! - Date functions as researchers write them (`year()`, `month()`, `day()`, `EXTRACT`,
//!   `date_part`, and `date - date` in days), in WHERE, in keys and in CASE conditions: the
//!   partials equal DataFusion's.
//! - A literal list is a public domain: `WHERE code IN (...) GROUP BY code` releases
//!   exactly the listed codes, without partition selection, and its partials are exact.
//! - Subqueries that are not participant sets are refused with a message that says why and
//!   what to write instead.
//! - A neighbouring pair through Flight SQL: two federations that differ in one participant
//!   of the cohort answer a cohort count (a semi-join and an anti-join) at ε = 2 (the
//!   policy's largest) within
//!   the noise of each other: |a − b| ≤ Δ + 2t, where t is the discrete Laplace half-width
//!   at 1e-12, so a spurious failure has probability below 2e-12.

use fedq::federation::FederationOptions;
use fedq_common::AggregateRequest;
use fedq_coordinator::noise::discrete_laplace_half_width;
use fedq_coordinator::planner::StatisticKind;
use fedq_coordinator::CoordinatorError;
use fedq_tests::{
    copy_dir, exact_rows, merged_rows, remove_participant, set_rows_per_unit, site_context, start,
    synth,
};

/// The participant of a row, told apart per site (membership is decided per site).
const P: &str = "p.pid || '#' || CAST(p.fedq_site AS VARCHAR)";

fn keyed(table_alias: &str) -> String {
    format!("{table_alias}.pid || '#' || CAST({table_alias}.fedq_site AS VARCHAR)")
}

/// [`partials_equal`] for the query's `COUNT(*)` partial.
async fn counts_equal(
    engine: &fedq_coordinator::engine::Coordinator,
    ctx: &datafusion::prelude::SessionContext,
    sql: &str,
    want_sql: &str,
    n_keys: usize,
) -> fedq_coordinator::planner::PlannedQuery {
    partials_equal(
        engine,
        ctx,
        sql,
        want_sql,
        n_keys,
        AggregateRequest::CountRows,
    )
    .await
}

/// Plan `sql` as alice, gather its exact partials, and check that `partial` equals
/// DataFusion's answer to `want_sql` (its first `n_keys` columns the keys) and that every
/// group counts something. Returns the plan for shape-specific checks.
async fn partials_equal(
    engine: &fedq_coordinator::engine::Coordinator,
    ctx: &datafusion::prelude::SessionContext,
    sql: &str,
    want_sql: &str,
    n_keys: usize,
    partial: AggregateRequest,
) -> fedq_coordinator::planner::PlannedQuery {
    let q = engine
        .plan("alice", sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let merged = engine
        .gather(&q)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let got = merged_rows(&merged, &q.request.aggregates, &[partial]);
    let want = exact_rows(ctx, want_sql, n_keys).await;
    assert!(!want.is_empty(), "{sql}: nothing to compare");
    assert!(
        want.values().all(|v| v[0] > 0),
        "{sql}: every group counts something"
    );
    assert_eq!(got, want, "{sql}");
    q
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cohort_partials_equal_datafusion_over_the_union_with_membership_per_site() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 2500, 61);
    set_rows_per_unit(dir, 10_000);
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let ctx = site_context(dir).await;
    let d = keyed("d");
    let l = keyed("l");
    let v = keyed("v");
    // (researcher's SQL, DataFusion's SQL with per-site membership, key count)
    let shapes: Vec<(String, String, usize)> = vec![
        (
            "SELECT COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11')".into(),
            format!("SELECT COUNT(*) FROM participants p WHERE {P} IN (SELECT {d} FROM diagnoses d WHERE d.code = 'E11')"),
            0,
        ),
        (
            "SELECT sex, COUNT(*) FROM participants WHERE pid NOT IN (SELECT pid FROM diagnoses WHERE code = 'I10') GROUP BY sex".into(),
            format!("SELECT p.sex, COUNT(*) FROM participants p WHERE {P} NOT IN (SELECT {d} FROM diagnoses d WHERE d.code = 'I10') GROUP BY p.sex"),
            1,
        ),
        (
            "SELECT sex, COUNT(*) FROM participants p WHERE EXISTS (SELECT 1 FROM diagnoses d WHERE d.pid = p.pid AND d.code LIKE 'E1%') GROUP BY sex".into(),
            format!("SELECT p.sex, COUNT(*) FROM participants p WHERE {P} IN (SELECT {d} FROM diagnoses d WHERE d.code LIKE 'E1%') GROUP BY p.sex"),
            1,
        ),
        (
            "SELECT test, COUNT(*) FROM labs l WHERE NOT EXISTS (SELECT 1 FROM diagnoses d WHERE l.pid = d.pid AND d.code = 'E11') GROUP BY test".into(),
            format!("SELECT l.test, COUNT(*) FROM labs l WHERE {l} NOT IN (SELECT {d} FROM diagnoses d WHERE d.code = 'E11') GROUP BY l.test"),
            1,
        ),
        (
            "SELECT COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11' INTERSECT SELECT pid FROM diagnoses WHERE code = 'I10')".into(),
            format!("SELECT COUNT(*) FROM participants p WHERE {P} IN (SELECT {d} FROM diagnoses d WHERE d.code = 'E11' INTERSECT SELECT {d} FROM diagnoses d WHERE d.code = 'I10')"),
            0,
        ),
        (
            "SELECT sex, COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11' EXCEPT SELECT pid FROM labs WHERE test = 'HbA1c') GROUP BY sex".into(),
            format!("SELECT p.sex, COUNT(*) FROM participants p WHERE {P} IN (SELECT {d} FROM diagnoses d WHERE d.code = 'E11' EXCEPT SELECT {l} FROM labs l WHERE l.test = 'HbA1c') GROUP BY p.sex"),
            1,
        ),
        (
            "SELECT COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'C50' UNION SELECT pid FROM variants WHERE gene = 'BRCA1')".into(),
            format!("SELECT COUNT(*) FROM participants p WHERE {P} IN (SELECT {d} FROM diagnoses d WHERE d.code = 'C50' UNION SELECT {v} FROM variants v WHERE v.gene = 'BRCA1')"),
            0,
        ),
        (
            "SELECT COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM labs WHERE test = 'HbA1c' GROUP BY pid HAVING COUNT(*) >= 3)".into(),
            format!("SELECT COUNT(*) FROM participants p WHERE {P} IN (SELECT {l} FROM labs l WHERE l.test = 'HbA1c' GROUP BY l.pid, l.fedq_site HAVING COUNT(*) >= 3)"),
            0,
        ),
        (
            "SELECT COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'N18' AND pid IN (SELECT pid FROM labs WHERE test = 'creatinine'))".into(),
            format!("SELECT COUNT(*) FROM participants p WHERE {P} IN (SELECT {d} FROM diagnoses d WHERE d.code = 'N18' AND {d} IN (SELECT {l} FROM labs l WHERE l.test = 'creatinine'))"),
            0,
        ),
        (
            "SELECT p.sex, COUNT(*) FROM labs l JOIN participants p USING (pid) WHERE l.test = 'HbA1c' AND p.pid IN (SELECT pid FROM diagnoses WHERE code = 'E11') GROUP BY p.sex".into(),
            format!("SELECT p.sex, COUNT(*) FROM labs l JOIN participants p ON l.pid = p.pid AND l.fedq_site = p.fedq_site WHERE l.test = 'HbA1c' AND {P} IN (SELECT {d} FROM diagnoses d WHERE d.code = 'E11') GROUP BY p.sex"),
            1,
        ),
        (
            "SELECT sex, COUNT(*) FROM participants WHERE birth_year < 1960 OR pid IN (SELECT pid FROM diagnoses WHERE code = 'E11') GROUP BY sex".into(),
            format!("SELECT p.sex, COUNT(*) FROM participants p WHERE p.birth_year < 1960 OR {P} IN (SELECT {d} FROM diagnoses d WHERE d.code = 'E11') GROUP BY p.sex"),
            1,
        ),
        (
            "SELECT CASE WHEN pid IN (SELECT pid FROM diagnoses WHERE code = 'E11') THEN 'E11' ELSE 'other' END AS dm, \
             COUNT(*) FROM participants GROUP BY 1".into(),
            // DataFusion runs no subquery in a key: the same set as a left join.
            format!("SELECT CASE WHEN e.k IS NOT NULL THEN 'E11' ELSE 'other' END, COUNT(*) FROM participants p \
             LEFT JOIN (SELECT DISTINCT {d} AS k FROM diagnoses d WHERE d.code = 'E11') e ON {P} = e.k GROUP BY 1"),
            1,
        ),
        (
            "SELECT pid IN (SELECT pid FROM diagnoses WHERE code = 'E11') AS e11, COUNT(*) FROM participants GROUP BY 1"
                .into(),
            format!("SELECT e.k IS NOT NULL, COUNT(*) FROM participants p \
             LEFT JOIN (SELECT DISTINCT {d} AS k FROM diagnoses d WHERE d.code = 'E11') e ON {P} = e.k GROUP BY 1"),
            1,
        ),
    ];
    for (sql, want_sql, n_keys) in &shapes {
        let q = counts_equal(&engine, &ctx, sql, want_sql, *n_keys).await;
        assert!(
            !q.request.participant_sets().is_empty(),
            "{sql}: a participant set"
        );
    }
    // A set of participants in FROM: its members counted, each once per site.
    let sets: Vec<(String, String)> = vec![
        (
            "SELECT COUNT(*) FROM (SELECT pid FROM diagnoses WHERE code = 'E11' INTERSECT SELECT pid FROM diagnoses WHERE code = 'I10') t".into(),
            format!("SELECT COUNT(*) FROM (SELECT {d} FROM diagnoses d WHERE d.code = 'E11' INTERSECT SELECT {d} FROM diagnoses d WHERE d.code = 'I10')"),
        ),
        (
            "SELECT COUNT(*) AS n FROM (SELECT pid FROM diagnoses WHERE code = 'E11' EXCEPT SELECT pid FROM labs WHERE test = 'HbA1c') AS t".into(),
            format!("SELECT COUNT(*) FROM (SELECT {d} FROM diagnoses d WHERE d.code = 'E11' EXCEPT SELECT {l} FROM labs l WHERE l.test = 'HbA1c')"),
        ),
        (
            "SELECT COUNT(*) FROM (SELECT DISTINCT pid FROM labs WHERE test = 'LDL') t".into(),
            format!("SELECT COUNT(DISTINCT {l}) FROM labs l WHERE l.test = 'LDL'"),
        ),
        (
            "SELECT COUNT(DISTINCT pid) FROM (SELECT pid FROM labs WHERE test = 'HbA1c' GROUP BY pid HAVING COUNT(*) >= 3) t".into(),
            format!("SELECT COUNT(*) FROM (SELECT {l} FROM labs l WHERE l.test = 'HbA1c' GROUP BY l.pid, l.fedq_site HAVING COUNT(*) >= 3)"),
        ),
        (
            "SELECT COUNT(*) FROM (SELECT pid FROM diagnoses WHERE code = 'C50' UNION SELECT pid FROM diagnoses WHERE code = 'E11') t".into(),
            format!("SELECT COUNT(*) FROM (SELECT {d} FROM diagnoses d WHERE d.code = 'C50' UNION SELECT {d} FROM diagnoses d WHERE d.code = 'E11')"),
        ),
    ];
    for (sql, want_sql) in &sets {
        let q = partials_equal(
            &engine,
            &ctx,
            sql,
            want_sql,
            0,
            AggregateRequest::CountUnits,
        )
        .await;
        assert_eq!(
            q.request.aggregates,
            [AggregateRequest::CountUnits],
            "{sql}"
        );
    }
    fed.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subqueries_that_are_not_participant_sets_are_refused_with_what_to_write() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 1, 100, 7);
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let eight: Vec<String> = (0..9)
        .map(|i| format!("pid IN (SELECT pid FROM diagnoses WHERE code = 'X{i}')"))
        .collect();
    let refused: Vec<(String, &str)> = vec![
        (
            "SELECT COUNT(*) FROM diagnoses WHERE code IN (SELECT code FROM diagnoses WHERE diagnosed_on < DATE '2010-01-01')".into(),
            "only the participant (the privacy unit) may be tested against a subquery",
        ),
        (
            "SELECT COUNT(*) FROM participants WHERE EXISTS (SELECT 1 FROM diagnoses WHERE code = 'E11')".into(),
            "EXISTS must be correlated on the participant",
        ),
        (
            "SELECT COUNT(*) FROM participants p WHERE EXISTS (SELECT 1 FROM diagnoses d WHERE d.pid = p.pid AND d.diagnosed_on > p.enrolled_on)".into(),
            "may refer to the outer query only through the participant",
        ),
        (
            "SELECT COUNT(*) FROM participants WHERE pid IN (SELECT code FROM diagnoses)".into(),
            "must return the participant column `pid`",
        ),
        (
            "SELECT COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM diagnoses GROUP BY pid HAVING MAX(diagnosed_on) > DATE '2020-01-01')".into(),
            "HAVING COUNT(*) >= k",
        ),
        (
            "SELECT COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM diagnoses GROUP BY pid, code)".into(),
            "must group by the participant only",
        ),
        (
            "SELECT COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11' LIMIT 10)".into(),
            "is not supported as a participant set",
        ),
        (
            "SELECT COUNT(*) FROM participants WHERE birth_year > (SELECT AVG(birth_year) FROM participants)".into(),
            "scalar subqueries are not supported in WHERE",
        ),
        (
            format!("SELECT COUNT(*) FROM participants WHERE {}", eight.join(" AND ")),
            "the limit is 8",
        ),
        (
            "SELECT COUNT(*) FROM (SELECT pid FROM diagnoses WHERE code = 'C50' UNION SELECT pid FROM variants WHERE gene = 'BRCA1') t".into(),
            "needs a table every participant has rows in",
        ),
        (
            "SELECT SUM(1) FROM (SELECT DISTINCT pid FROM labs) t".into(),
            "can only be counted",
        ),
        (
            "SELECT pid, COUNT(*) FROM (SELECT DISTINCT pid FROM labs) t GROUP BY pid".into(),
            "cannot be grouped",
        ),
    ];
    for (sql, why) in &refused {
        match engine.plan("alice", sql).await {
            Err(CoordinatorError::Refused(m)) | Err(CoordinatorError::InvalidSql(m)) => {
                assert!(
                    m.contains(why),
                    "{sql}\n  refused with: {m}\n  expected: {why}"
                );
            }
            Err(e) => panic!("{sql}: unexpected error {e}"),
            Ok(q) => panic!("{sql}: accepted as {:?}", q.request.filter),
        }
    }
    fed.shutdown().await.unwrap();
}

/// Two federations identical but for one participant in the cohort (with a diagnosis of
/// E11 and no I10 at their site): the cohort count, released at ε = 2 on each, differs by
/// at most the sensitivity plus the two noises' half-widths.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cohort_count_on_neighbouring_federations_differs_only_within_the_noise() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    synth(&a, 2, 600, 17);
    copy_dir(&a, &b);
    let sql = "SELECT COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11') \
               AND pid NOT IN (SELECT pid FROM diagnoses WHERE code = 'I10')";
    // A participant of the cohort in `a`, found with DataFusion over the site files.
    let ctx = site_context(&a).await;
    let d = keyed("d");
    let rows = ctx
        .sql(&format!(
            "SELECT p.pid FROM participants p WHERE {P} IN (SELECT {d} FROM diagnoses d WHERE d.code = 'E11') \
             AND {P} NOT IN (SELECT {d} FROM diagnoses d WHERE d.code = 'I10') ORDER BY p.pid LIMIT 1"
        ))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let pid = fedq_tests::key(&rows[0], 0, 0);
    assert!(
        remove_participant(&b, &pid) > 0,
        "the neighbour lacks {pid}"
    );

    let mut released = Vec::new();
    let mut bound = 0.0;
    for dir in [&a, &b] {
        let fed = fedq::federation::LocalFederation::start(
            dir,
            FederationOptions {
                min_reported_count: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let engine = fed.coordinator.engine.clone();
        let q = engine.plan("alice", sql).await.unwrap();
        let st = &q.statistics[0];
        assert!(matches!(st.kind, StatisticKind::Count { .. }));
        let scale = st.sensitivity as f64 / st.epsilon.to_f64().value() * (q.epsilon / 2.0);
        bound = discrete_laplace_half_width(scale, 1e-12);
        let delta = st.sensitivity as f64;
        let mut alice = fed.client("alice").await.unwrap();
        alice.query("SET fedq.epsilon = 2").await.unwrap();
        let r = alice.query(sql).await.unwrap();
        let n = fedq_tests::cell(&r.batches[0], 0, 0).expect("a count");
        released.push((n, delta));
        fed.shutdown().await.unwrap();
    }
    let (na, delta) = released[0];
    let (nb, _) = released[1];
    assert!(
        (na - nb).abs() <= delta + 2.0 * bound,
        "released {na} and {nb}: more apart than Δ = {delta} plus twice the noise bound {bound}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_literal_list_in_where_is_the_released_domain_of_a_key_without_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 2, 1500, 23);
    set_rows_per_unit(dir, 10_000);
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let ctx = site_context(dir).await;
    let sql = "SELECT code, COUNT(*), COUNT(DISTINCT pid) FROM diagnoses \
               WHERE code IN ('C50', 'E11', 'NOPE') GROUP BY code ORDER BY code";
    let q = engine.plan("alice", sql).await.unwrap();
    assert!(q.selection.is_none(), "no partition selection, no δ");
    assert_eq!(q.delta, 0.0);
    let listed: Vec<String> = q.groups[0].domain.iter().map(|v| v.to_string()).collect();
    assert_eq!(listed, ["C50", "E11", "NOPE"]);
    let merged = engine.gather(&q).await.unwrap();
    let got = merged_rows(
        &merged,
        &q.request.aggregates,
        &[AggregateRequest::CountRows, AggregateRequest::CountUnits],
    );
    let want = exact_rows(
        &ctx,
        "SELECT code, COUNT(*), CAST(COUNT(DISTINCT pid || '#' || CAST(fedq_site AS VARCHAR)) AS BIGINT) \
         FROM diagnoses WHERE code IN ('C50', 'E11', 'NOPE') GROUP BY code",
        1,
    )
    .await;
    assert_eq!(want.len(), 2, "C50 and E11 exist, NOPE does not");
    assert_eq!(got, want);
    // Through Flight SQL every listed code is released, the empty one as noise.
    let mut alice = fed.client("alice").await.unwrap();
    let r = alice.query(sql).await.unwrap();
    let codes: Vec<String> = r
        .batches
        .iter()
        .flat_map(|b| (0..b.num_rows()).map(move |i| fedq_tests::key(b, 0, i)))
        .collect();
    assert_eq!(codes, ["C50", "E11", "NOPE"]);
    fed.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn date_functions_in_where_keys_and_case_equal_datafusion() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 2, 1500, 37);
    set_rows_per_unit(dir, 10_000);
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let ctx = site_context(dir).await;
    let shapes: Vec<(&str, &str, usize)> = vec![
        (
            "SELECT COUNT(*) FROM diagnoses WHERE year(diagnosed_on) = 2020",
            "SELECT COUNT(*) FROM diagnoses WHERE date_part('year', diagnosed_on) = 2020",
            0,
        ),
        (
            "SELECT COUNT(*) FROM diagnoses WHERE EXTRACT(MONTH FROM diagnosed_on) IN (1, 2, 3) AND day(diagnosed_on) <= 10",
            "SELECT COUNT(*) FROM diagnoses WHERE date_part('month', diagnosed_on) IN (1, 2, 3) AND date_part('day', diagnosed_on) <= 10",
            0,
        ),
        (
            "SELECT year(diagnosed_on) AS y, COUNT(*) FROM diagnoses WHERE code = 'E11' GROUP BY 1",
            "SELECT CAST(date_part('year', diagnosed_on) AS BIGINT), COUNT(*) FROM diagnoses WHERE code = 'E11' GROUP BY 1",
            1,
        ),
        (
            "SELECT CASE WHEN quarter(measured_on) <= 2 THEN 'first half' ELSE 'second half' END AS half, COUNT(*) \
             FROM labs WHERE test = 'HbA1c' GROUP BY 1",
            "SELECT CASE WHEN date_part('quarter', measured_on) <= 2 THEN 'first half' ELSE 'second half' END, COUNT(*) \
             FROM labs WHERE test = 'HbA1c' GROUP BY 1",
            1,
        ),
        (
            // The date the query runs, and intervals, folded into a date literal.
            "SELECT COUNT(*) FROM labs WHERE measured_on > CURRENT_DATE - INTERVAL '5 years'",
            "SELECT COUNT(*) FROM labs WHERE measured_on > CURRENT_DATE - INTERVAL '5 years'",
            0,
        ),
        (
            "SELECT COUNT(*) FROM labs l JOIN participants p USING (pid) WHERE l.measured_on - p.enrolled_on > 365",
            "SELECT COUNT(*) FROM labs l JOIN participants p ON l.pid = p.pid AND l.fedq_site = p.fedq_site \
             WHERE CAST(CAST(l.measured_on AS INT) AS BIGINT) - CAST(CAST(p.enrolled_on AS INT) AS BIGINT) > 365",
            0,
        ),
        (
            // An interval added to a column: months first (31 January + 1 month is the end
            // of February), then days, at each node.
            "SELECT COUNT(*) FROM labs l JOIN participants p USING (pid) \
             WHERE l.measured_on < p.enrolled_on + INTERVAL '1 year 1 month' AND l.measured_on >= p.enrolled_on - INTERVAL '45 days'",
            "SELECT COUNT(*) FROM labs l JOIN participants p ON l.pid = p.pid AND l.fedq_site = p.fedq_site \
             WHERE l.measured_on < p.enrolled_on + INTERVAL '1 year 1 month' AND l.measured_on >= p.enrolled_on - INTERVAL '45 days'",
            0,
        ),
        (
            "SELECT CASE WHEN month(enrolled_on + INTERVAL '1 month') = 2 THEN 'February' ELSE 'other' END AS m, \
             COUNT(*) FROM participants WHERE enrolled_on + INTERVAL '3 months' > DATE '2020-01-31' GROUP BY 1",
            "SELECT CASE WHEN date_part('month', enrolled_on + INTERVAL '1 month') = 2 THEN 'February' ELSE 'other' END, \
             COUNT(*) FROM participants WHERE enrolled_on + INTERVAL '3 months' > DATE '2020-01-31' GROUP BY 1",
            1,
        ),
    ];
    for (sql, want_sql, n_keys) in &shapes {
        counts_equal(&engine, &ctx, sql, want_sql, *n_keys).await;
    }
    fed.shutdown().await.unwrap();
}

/// Derived tables with one row per participant (`GROUP BY pid` with MIN, MAX and COUNT(*),
/// `HAVING`, as a CTE, joined to participants, `COUNT(DISTINCT code)`): the first or latest event per participant
/// and site. R is 1, proven by the query, so nothing is truncated and the partials equal
/// DataFusion's per site.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn derived_tables_per_participant_equal_datafusion_per_site() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 2000, 43);
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let ctx = site_context(dir).await;
    let shapes: Vec<(&str, &str, usize)> = vec![
        (
            "SELECT year(first_on) AS y, COUNT(*) FROM (SELECT pid, MIN(diagnosed_on) AS first_on FROM diagnoses \
             WHERE code = 'E11' GROUP BY pid) f GROUP BY 1",
            "SELECT CAST(date_part('year', first_on) AS BIGINT), COUNT(*) FROM (SELECT pid, fedq_site, \
             MIN(diagnosed_on) AS first_on FROM diagnoses WHERE code = 'E11' GROUP BY pid, fedq_site) GROUP BY 1",
            1,
        ),
        (
            "SELECT p.sex, COUNT(*) FROM (SELECT pid, MAX(measured_on) AS last_on FROM labs WHERE test = 'HbA1c' \
             GROUP BY pid) f JOIN participants p USING (pid) WHERE f.last_on >= DATE '2020-01-01' GROUP BY p.sex",
            "SELECT p.sex, COUNT(*) FROM (SELECT pid, fedq_site, MAX(measured_on) AS last_on FROM labs \
             WHERE test = 'HbA1c' GROUP BY pid, fedq_site) f JOIN participants p ON f.pid = p.pid \
             AND f.fedq_site = p.fedq_site WHERE f.last_on >= DATE '2020-01-01' GROUP BY p.sex",
            1,
        ),
        (
            "SELECT CASE WHEN n >= 3 THEN '3 or more' ELSE 'fewer' END AS codes, COUNT(*) FROM \
             (SELECT pid, COUNT(DISTINCT code) AS n FROM diagnoses GROUP BY pid) t GROUP BY 1",
            "SELECT CASE WHEN n >= 3 THEN '3 or more' ELSE 'fewer' END, COUNT(*) FROM (SELECT pid, fedq_site, \
             COUNT(DISTINCT code) AS n FROM diagnoses GROUP BY pid, fedq_site) GROUP BY 1",
            1,
        ),
        (
            "SELECT CASE WHEN n >= 5 THEN '5 or more' ELSE 'under 5' END AS tests, COUNT(*) FROM \
             (SELECT pid, COUNT(*) AS n FROM labs WHERE test = 'HbA1c' GROUP BY pid) t GROUP BY 1",
            "SELECT CASE WHEN n >= 5 THEN '5 or more' ELSE 'under 5' END, COUNT(*) FROM \
             (SELECT pid, fedq_site, COUNT(*) AS n FROM labs WHERE test = 'HbA1c' GROUP BY pid, fedq_site) GROUP BY 1",
            1,
        ),
        (
            "SELECT COUNT(*) FROM (SELECT pid, MIN(diagnosed_on) AS first_on FROM diagnoses GROUP BY pid \
             HAVING COUNT(*) >= 3) t WHERE year(first_on) < 2015",
            "SELECT COUNT(*) FROM (SELECT pid, fedq_site, MIN(diagnosed_on) AS first_on FROM diagnoses \
             GROUP BY pid, fedq_site HAVING COUNT(*) >= 3) WHERE date_part('year', first_on) < 2015",
            0,
        ),
        (
            "WITH first_i10 AS (SELECT pid, MIN(diagnosed_on) AS d FROM diagnoses WHERE code = 'I10' GROUP BY pid) \
             SELECT month(d) AS m, COUNT(*) FROM first_i10 GROUP BY 1",
            "SELECT CAST(date_part('month', d) AS BIGINT), COUNT(*) FROM (SELECT pid, fedq_site, MIN(diagnosed_on) AS d \
             FROM diagnoses WHERE code = 'I10' GROUP BY pid, fedq_site) GROUP BY 1",
            1,
        ),
        (
            "SELECT lowest, COUNT(*) FROM (SELECT pid, MIN(test) AS lowest FROM labs GROUP BY pid) t GROUP BY lowest",
            "SELECT lowest, COUNT(*) FROM (SELECT pid, fedq_site, MIN(test) AS lowest FROM labs GROUP BY pid, fedq_site) \
             GROUP BY lowest",
            1,
        ),
        (
            "SELECT COUNT(*) FROM (SELECT pid, MIN(diagnosed_on) AS first_on FROM diagnoses WHERE code = 'E11' GROUP BY pid) f \
             WHERE pid NOT IN (SELECT pid FROM diagnoses WHERE code = 'I10')",
            "SELECT COUNT(*) FROM (SELECT pid, fedq_site, MIN(diagnosed_on) AS first_on FROM diagnoses WHERE code = 'E11' \
             GROUP BY pid, fedq_site) f WHERE f.pid || '#' || CAST(f.fedq_site AS VARCHAR) NOT IN \
             (SELECT d.pid || '#' || CAST(d.fedq_site AS VARCHAR) FROM diagnoses d WHERE d.code = 'I10')",
            0,
        ),
    ];
    for (sql, want_sql, n_keys) in &shapes {
        let q = counts_equal(&engine, &ctx, sql, want_sql, *n_keys).await;
        assert!(q.request.derived.is_some(), "{sql}: a derived table");
        assert_eq!(q.request.max_rows_per_unit, 1, "{sql}: R = 1, proven");
    }
    for (sql, why) in [
        (
            "SELECT COUNT(*) FROM (SELECT code, MIN(diagnosed_on) AS d FROM diagnoses GROUP BY code) t",
            "grouped by the participant alone",
        ),
        (
            "SELECT COUNT(*) FROM (SELECT pid, approx_distinct(value) AS s FROM labs GROUP BY pid) t",
            "MIN(col), MAX(col), SUM(col), AVG(col), STDDEV(col), VARIANCE(col), MEDIAN(col), COUNT(*)",
        ),
        (
            "SELECT COUNT(*) FROM (SELECT pid, SUM(code) AS s FROM diagnoses GROUP BY pid) t",
            "",
        ),
        (
            // A numbered subquery on the outer side of a LEFT JOIN keeps its row number.
            "WITH latest AS (SELECT pid, value, ROW_NUMBER() OVER (PARTITION BY pid ORDER BY measured_on DESC) AS rn \
             FROM labs WHERE test = 'HbA1c') SELECT COUNT(*) FROM participants p LEFT JOIN latest l ON l.pid = p.pid \
             WHERE l.rn = 1",
            "inside the joined subquery",
        ),
    ] {
        match engine.plan("alice", sql).await {
            Err(CoordinatorError::Refused(m) | CoordinatorError::InvalidSql(m)) => assert!(m.contains(why), "{sql}: {m}"),
            other => panic!("{sql}: expected a refusal, got {:?}", other.map(|q| q.request)),
        }
    }
    fed.shutdown().await.unwrap();
}

/// Derived tables anywhere in a join (part 1 with part 3): two derived tables of one
/// table ("E11 before N18"), of two tables (the first HbA1c after the first E11), a derived
/// table or a latest row joined after a catalog table, and left-joined. Each side is one
/// row per participant and site, so nothing is truncated and the partials equal
/// DataFusion's per site.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn derived_tables_joined_in_any_position_equal_datafusion_per_site() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 2000, 47);
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let ctx = site_context(dir).await;
    let first = |code: &str| {
        format!(
            "(SELECT pid, fedq_site, MIN(diagnosed_on) AS f FROM diagnoses WHERE code = '{code}' GROUP BY pid, fedq_site)"
        )
    };
    let same = "a.pid = b.pid AND a.fedq_site = b.fedq_site";
    let shapes: Vec<(String, String, usize, usize)> = vec![
        (
            "SELECT COUNT(*) FROM (SELECT pid, MIN(diagnosed_on) AS f FROM diagnoses WHERE code = 'E11' GROUP BY pid) a \
             JOIN (SELECT pid, MIN(diagnosed_on) AS f FROM diagnoses WHERE code = 'N18' GROUP BY pid) b USING (pid) \
             WHERE a.f < b.f"
                .into(),
            format!("SELECT COUNT(*) FROM {} a JOIN {} b ON {same} WHERE a.f < b.f", first("E11"), first("N18")),
            0,
            2,
        ),
        (
            "WITH e11 AS (SELECT pid, MIN(diagnosed_on) AS first_on FROM diagnoses WHERE code = 'E11' GROUP BY pid), \
             a1c AS (SELECT pid, MIN(measured_on) AS first_a1c FROM labs WHERE test = 'HbA1c' GROUP BY pid) \
             SELECT year(e11.first_on) AS y, COUNT(*) FROM e11 JOIN a1c USING (pid) WHERE a1c.first_a1c > e11.first_on GROUP BY 1"
                .into(),
            format!(
                "SELECT CAST(date_part('year', a.f) AS BIGINT), COUNT(*) FROM {} a JOIN (SELECT pid, fedq_site, \
                 MIN(measured_on) AS f FROM labs WHERE test = 'HbA1c' GROUP BY pid, fedq_site) b ON {same} \
                 WHERE b.f > a.f GROUP BY 1",
                first("E11")
            ),
            1,
            2,
        ),
        (
            "SELECT p.sex, COUNT(*) FROM participants p JOIN (SELECT pid, MIN(diagnosed_on) AS f FROM diagnoses \
             WHERE code = 'E11' GROUP BY pid) b USING (pid) WHERE year(b.f) - p.birth_year >= 50 GROUP BY p.sex"
                .into(),
            format!(
                "SELECT a.sex, COUNT(*) FROM participants a JOIN {} b ON {same} \
                 WHERE date_part('year', b.f) - a.birth_year >= 50 GROUP BY a.sex",
                first("E11")
            ),
            1,
            1,
        ),
        (
            "SELECT p.sex, COUNT(*) FROM participants p LEFT JOIN (SELECT pid, MIN(diagnosed_on) AS f FROM diagnoses \
             WHERE code = 'E11' GROUP BY pid) b ON b.pid = p.pid WHERE b.f IS NULL GROUP BY p.sex"
                .into(),
            format!(
                "SELECT a.sex, COUNT(*) FROM participants a LEFT JOIN {} b ON {same} WHERE b.f IS NULL GROUP BY a.sex",
                first("E11")
            ),
            1,
            1,
        ),
        (
            "WITH latest AS (SELECT pid, value, ROW_NUMBER() OVER (PARTITION BY pid ORDER BY measured_on DESC) AS rn \
             FROM labs WHERE test = 'HbA1c') SELECT p.sex, COUNT(*) FROM participants p JOIN latest l USING (pid) \
             WHERE l.rn = 1 AND l.value >= 6.5 GROUP BY p.sex"
                .into(),
            "SELECT a.sex, COUNT(*) FROM participants a JOIN (SELECT pid, fedq_site, value, ROW_NUMBER() OVER \
             (PARTITION BY pid, fedq_site ORDER BY measured_on DESC, value ASC NULLS LAST) AS rn FROM labs \
             WHERE test = 'HbA1c') b ON a.pid = b.pid AND a.fedq_site = b.fedq_site WHERE b.rn = 1 AND b.value >= 6.5 \
             GROUP BY a.sex"
                .into(),
            1,
            1,
        ),
    ];
    for (sql, want_sql, n_keys, derived) in &shapes {
        let q = counts_equal(&engine, &ctx, sql, want_sql, *n_keys).await;
        assert_eq!(q.request.derived_tables().count(), *derived, "{sql}");
        assert_eq!(q.request.max_rows_per_unit, 1, "{sql}: R = 1");
    }
    fed.shutdown().await.unwrap();
}

/// A subquery or CTE with a select list (`2026 - birth_year AS age`, a `CASE` label, a
/// difference of two joined columns) is read through: each of its columns is its
/// definition over the relations below, so the query is planned as if written inline, and
/// the partials equal DataFusion's per site. R is raised so that nothing is truncated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn computed_columns_of_subqueries_are_read_by_their_definitions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 2, 1500, 53);
    set_rows_per_unit(dir, 10_000);
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let ctx = site_context(dir).await;
    let shapes: Vec<(&str, &str, usize)> = vec![
        (
            "WITH cohort AS (SELECT pid, sex, 2026 - birth_year AS age FROM participants \
             WHERE participant_type = 'general') SELECT sex, COUNT(*) FROM cohort WHERE age >= 40 GROUP BY sex",
            "SELECT sex, COUNT(*) FROM participants WHERE participant_type = 'general' AND 2026 - birth_year >= 40 \
             GROUP BY sex",
            1,
        ),
        (
            "SELECT age_group, COUNT(*) FROM (SELECT pid, CASE WHEN birth_year < 1960 THEN 'older' ELSE 'younger' END \
             AS age_group FROM participants) t GROUP BY age_group",
            "SELECT CASE WHEN birth_year < 1960 THEN 'older' ELSE 'younger' END, COUNT(*) FROM participants GROUP BY 1",
            1,
        ),
        (
            // Two subqueries deep, the second computing from the first's column.
            "WITH a AS (SELECT pid, 2026 - birth_year AS age FROM participants), \
             b AS (SELECT pid, age * 12 AS months FROM a WHERE age < 60) SELECT COUNT(*) FROM b WHERE months >= 360",
            "SELECT COUNT(*) FROM participants WHERE 2026 - birth_year < 60 AND (2026 - birth_year) * 12 >= 360",
            0,
        ),
        (
            "SELECT COUNT(*) FROM (SELECT l.pid, l.value - 6.5 AS excess FROM labs l JOIN participants p USING (pid) \
             WHERE l.test = 'HbA1c' AND p.sex = 'F') t WHERE excess > 0",
            "SELECT COUNT(*) FROM labs l JOIN participants p ON l.pid = p.pid AND l.fedq_site = p.fedq_site \
             WHERE l.test = 'HbA1c' AND p.sex = 'F' AND l.value - 6.5 > 0",
            0,
        ),
        (
            // A join inside a subquery that only selects columns.
            "SELECT COUNT(*) FROM (SELECT l.pid, l.value, p.sex FROM labs l JOIN participants p USING (pid)) t \
             WHERE t.sex = 'F' AND t.value > 7",
            "SELECT COUNT(*) FROM labs l JOIN participants p ON l.pid = p.pid AND l.fedq_site = p.fedq_site \
             WHERE p.sex = 'F' AND l.value > 7",
            0,
        ),
        (
            "SELECT COUNT(*) FROM (SELECT f.pid, year(f.first_on) - p.birth_year AS age FROM (SELECT pid, \
             MIN(diagnosed_on) AS first_on FROM diagnoses WHERE code = 'E11' GROUP BY pid) f JOIN participants p \
             USING (pid)) t WHERE age >= 50",
            "SELECT COUNT(*) FROM (SELECT pid, fedq_site, MIN(diagnosed_on) AS first_on FROM diagnoses \
             WHERE code = 'E11' GROUP BY pid, fedq_site) f JOIN participants p ON f.pid = p.pid \
             AND f.fedq_site = p.fedq_site WHERE date_part('year', f.first_on) - p.birth_year >= 50",
            0,
        ),
    ];
    for (sql, want_sql, n_keys) in &shapes {
        counts_equal(&engine, &ctx, sql, want_sql, *n_keys).await;
    }
    fed.shutdown().await.unwrap();
}

/// The partial of `q` that `pick` selects (the first one it matches).
fn partial_of(
    q: &fedq_coordinator::planner::PlannedQuery,
    pick: impl Fn(&AggregateRequest) -> bool,
) -> AggregateRequest {
    q.request
        .aggregates
        .iter()
        .find(|a| pick(a))
        .cloned()
        .unwrap_or_else(|| panic!("{}: no such partial in {:?}", q.sql, q.request.aggregates))
}

/// Aggregates of expressions (part 4): `COUNT(*) FILTER (WHERE …)`, `SUM(CASE …)`,
/// `SUM(2026 - birth_year)`, the age at a first diagnosis (`year(first_on) - birth_year`
/// over a derived table joined to participants), the days between two dates, and a FILTER
/// testing a participant set. Each becomes a computed column with bounds that follow from
/// the catalog; nothing is clamped on these data, so the exact partials equal DataFusion's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aggregates_of_expressions_equal_datafusion() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 2, 1500, 53);
    set_rows_per_unit(dir, 10_000);
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let ctx = site_context(dir).await;
    let count = |a: &AggregateRequest| matches!(a, AggregateRequest::CountNonNull { .. });
    let sum = |a: &AggregateRequest| matches!(a, AggregateRequest::SumFixed { .. });
    type Pick = fn(&AggregateRequest) -> bool;
    /// SQL, DataFusion's SQL, key columns, which partial, its bounds (for a sum).
    type Shape<'a> = (&'a str, String, usize, Pick, (f64, f64));
    let shapes: Vec<Shape> = vec![
        (
            "SELECT COUNT(*) FILTER (WHERE test = 'HbA1c') FROM labs",
            "SELECT COUNT(*) FROM labs WHERE test = 'HbA1c'".into(),
            0,
            count,
            (0.0, 1.0),
        ),
        (
            "SELECT sex, SUM(CASE WHEN birth_year < 1960 THEN 1 ELSE 0 END) AS older FROM participants GROUP BY sex",
            "SELECT sex, SUM(CASE WHEN birth_year < 1960 THEN 1 ELSE 0 END) FROM participants GROUP BY sex".into(),
            1,
            sum,
            (0.0, 1.0),
        ),
        (
            "SELECT participant_type, SUM(2026 - birth_year) FROM participants GROUP BY participant_type",
            "SELECT participant_type, SUM(2026 - birth_year) FROM participants GROUP BY participant_type".into(),
            1,
            sum,
            (-4.0, 126.0),
        ),
        (
            "SELECT SUM(year(f.first_on) - p.birth_year) FROM (SELECT pid, MIN(diagnosed_on) AS first_on \
             FROM diagnoses WHERE code = 'E11' GROUP BY pid) f JOIN participants p USING (pid)",
            "SELECT SUM(CAST(date_part('year', f.first_on) AS BIGINT) - p.birth_year) FROM (SELECT pid, fedq_site, \
             MIN(diagnosed_on) AS first_on FROM diagnoses WHERE code = 'E11' GROUP BY pid, fedq_site) f \
             JOIN participants p ON f.pid = p.pid AND f.fedq_site = p.fedq_site"
                .into(),
            0,
            sum,
            (2000.0 - 2030.0, 2026.0 - 1900.0),
        ),
        (
            "SELECT SUM(l.measured_on - p.enrolled_on) FROM labs l JOIN participants p USING (pid) \
             WHERE l.test = 'HbA1c' AND l.measured_on > p.enrolled_on",
            "SELECT SUM(CAST(CAST(l.measured_on AS INT) AS BIGINT) - CAST(CAST(p.enrolled_on AS INT) AS BIGINT)) \
             FROM labs l JOIN participants p ON l.pid = p.pid AND l.fedq_site = p.fedq_site \
             WHERE l.test = 'HbA1c' AND l.measured_on > p.enrolled_on"
                .into(),
            0,
            sum,
            (-9861.0, 9861.0),
        ),
        (
            "SELECT sex, COUNT(*) FILTER (WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11')) FROM participants p GROUP BY sex",
            format!(
                "SELECT sex, COUNT(*) FROM participants p WHERE {P} IN (SELECT {} FROM diagnoses d WHERE d.code = 'E11') GROUP BY sex",
                keyed("d")
            ),
            1,
            count,
            (0.0, 1.0),
        ),
        (
            // Prevalence: the share of participants in a set, in units of 0.001.
            "SELECT sex, AVG(CASE WHEN pid IN (SELECT pid FROM diagnoses WHERE code = 'E11') THEN 1.0 ELSE 0 END) \
             FROM participants p GROUP BY sex",
            format!(
                "SELECT p.sex, SUM(CASE WHEN e.k IS NOT NULL THEN 1000 ELSE 0 END) FROM participants p \
                 LEFT JOIN (SELECT DISTINCT {} AS k FROM diagnoses d WHERE d.code = 'E11') e ON e.k = {P} GROUP BY p.sex",
                keyed("d")
            ),
            1,
            sum,
            (0.0, 1.0),
        ),
    ];
    for (sql, want_sql, n_keys, pick, bounds) in &shapes {
        let q = engine
            .plan("alice", sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(q.request.computed.len(), 1, "{sql}: one computed column");
        let partial = partial_of(&q, pick);
        if let AggregateRequest::SumFixed { lower, upper, .. } = &partial {
            assert_eq!(
                (*lower, *upper),
                *bounds,
                "{sql}: bounds by interval arithmetic"
            );
        }
        partials_equal(&engine, &ctx, sql, want_sql, *n_keys, partial).await;
    }
    for (sql, why) in [
        ("SELECT SUM(CASE WHEN code = 'E11' THEN 1 ELSE 0 END) FROM diagnoses JOIN participants USING (pid)", ""),
        ("SELECT SUM(TRY_CAST(variant AS BIGINT)) FROM variants", "no declared bounds"),
        ("SELECT SUM(value / 0) FROM labs", "divide only by"),
        ("SELECT MEDIAN(value) FILTER (WHERE test = 'HbA1c') FROM labs", "put the condition in WHERE"),
        ("SELECT COUNT(DISTINCT pid) FILTER (WHERE test = 'HbA1c') FROM labs", "put the condition in WHERE"),
    ] {
        match engine.plan("alice", sql).await {
            Ok(q) if why.is_empty() && sql.contains("diagnoses JOIN") => {
                // An indicator is bounded whatever the columns' declarations.
                assert_eq!(q.request.computed.len(), 1, "{sql}");
            }
            Err(CoordinatorError::Refused(m) | CoordinatorError::InvalidSql(m)) => {
                assert!(m.contains(why), "{sql}: {m}")
            }
            other => panic!("{sql}: unexpected {:?}", other.map(|q| q.request)),
        }
    }
    fed.shutdown().await.unwrap();
}

/// `LEFT JOIN` on the participant (part 3): every driving row stays, with its participant's
/// joined rows that meet the `ON` conditions or once with NULLs, so `COUNT(d.pid)` counts
/// the participants with the code among all of them (prevalence). A self-join pairs one
/// participant's rows (comorbidity pairs), and joins of three or four tables (inner, left,
/// a table joined twice, a join on an inner-joined table's participant) pair one
/// participant's rows of each. All equal DataFusion per site.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn left_joins_self_joins_and_joins_of_several_tables_on_the_participant_equal_datafusion_per_site(
) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 2, 1200, 59);
    set_rows_per_unit(dir, 10_000);
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let ctx = site_context(dir).await;
    let rows = |a: &AggregateRequest| matches!(a, AggregateRequest::CountRows);
    let non_null = |a: &AggregateRequest| matches!(a, AggregateRequest::CountNonNull { .. });
    type Pick = fn(&AggregateRequest) -> bool;
    let shapes: Vec<(&str, &str, usize, Pick)> = vec![
        (
            "SELECT p.sex, COUNT(*) FROM participants p LEFT JOIN diagnoses d ON d.pid = p.pid AND d.code = 'E11' GROUP BY p.sex",
            "SELECT p.sex, COUNT(*) FROM participants p LEFT JOIN diagnoses d ON d.pid = p.pid \
             AND d.fedq_site = p.fedq_site AND d.code = 'E11' GROUP BY p.sex",
            1,
            rows,
        ),
        (
            "SELECT p.sex, COUNT(d.code) FROM participants p LEFT JOIN diagnoses d ON d.pid = p.pid AND d.code = 'E11' GROUP BY p.sex",
            "SELECT p.sex, COUNT(d.code) FROM participants p LEFT JOIN diagnoses d ON d.pid = p.pid \
             AND d.fedq_site = p.fedq_site AND d.code = 'E11' GROUP BY p.sex",
            1,
            non_null,
        ),
        (
            "SELECT COUNT(*) FROM participants p LEFT JOIN (SELECT * FROM specimens WHERE kind = 'serum') s USING (pid) WHERE s.pid IS NULL",
            "SELECT COUNT(*) FROM participants p LEFT JOIN specimens s ON s.pid = p.pid AND s.fedq_site = p.fedq_site \
             AND s.kind = 'serum' WHERE s.pid IS NULL",
            0,
            rows,
        ),
        (
            "SELECT COUNT(*) FROM diagnoses a JOIN diagnoses b USING (pid) WHERE a.code = 'E11' AND b.code = 'I10'",
            "SELECT COUNT(*) FROM diagnoses a JOIN diagnoses b ON a.pid = b.pid AND a.fedq_site = b.fedq_site \
             WHERE a.code = 'E11' AND b.code = 'I10'",
            0,
            rows,
        ),
        (
            "SELECT COUNT(*) FROM diagnoses a JOIN diagnoses b ON a.pid = b.pid AND a.diagnosed_on < b.diagnosed_on \
             WHERE a.code = 'E11'",
            "SELECT COUNT(*) FROM diagnoses a JOIN diagnoses b ON a.pid = b.pid AND a.fedq_site = b.fedq_site \
             AND a.diagnosed_on < b.diagnosed_on WHERE a.code = 'E11'",
            0,
            rows,
        ),
        (
            "SELECT p.sex, COUNT(*) FROM participants p JOIN diagnoses d USING (pid) JOIN labs l USING (pid) \
             WHERE d.code = 'E11' AND l.test = 'HbA1c' AND l.value > 6.5 GROUP BY p.sex",
            "SELECT p.sex, COUNT(*) FROM participants p \
             JOIN diagnoses d ON d.pid = p.pid AND d.fedq_site = p.fedq_site \
             JOIN labs l ON l.pid = p.pid AND l.fedq_site = p.fedq_site \
             WHERE d.code = 'E11' AND l.test = 'HbA1c' AND l.value > 6.5 GROUP BY p.sex",
            1,
            rows,
        ),
        (
            "SELECT p.sex, COUNT(d.code) FROM participants p \
             LEFT JOIN diagnoses d ON d.pid = p.pid AND d.code = 'N18' \
             LEFT JOIN specimens s ON s.pid = p.pid AND s.kind = 'serum' \
             WHERE s.pid IS NULL GROUP BY p.sex",
            "SELECT p.sex, COUNT(d.code) FROM participants p \
             LEFT JOIN diagnoses d ON d.pid = p.pid AND d.fedq_site = p.fedq_site AND d.code = 'N18' \
             LEFT JOIN specimens s ON s.pid = p.pid AND s.fedq_site = p.fedq_site AND s.kind = 'serum' \
             WHERE s.pid IS NULL GROUP BY p.sex",
            1,
            non_null,
        ),
        (
            "SELECT COUNT(*) FROM diagnoses a JOIN diagnoses b USING (pid) JOIN diagnoses c ON c.pid = b.pid \
             JOIN participants p ON p.pid = a.pid \
             WHERE a.code = 'E11' AND b.code = 'I10' AND c.code = 'N18' AND p.birth_year < 1970",
            "SELECT COUNT(*) FROM diagnoses a \
             JOIN diagnoses b ON a.pid = b.pid AND a.fedq_site = b.fedq_site \
             JOIN diagnoses c ON c.pid = a.pid AND c.fedq_site = a.fedq_site \
             JOIN participants p ON p.pid = a.pid AND p.fedq_site = a.fedq_site \
             WHERE a.code = 'E11' AND b.code = 'I10' AND c.code = 'N18' AND p.birth_year < 1970",
            0,
            rows,
        ),
    ];
    for (sql, want_sql, n_keys, pick) in &shapes {
        let q = engine
            .plan("alice", sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let partial = partial_of(&q, pick);
        partials_equal(&engine, &ctx, sql, want_sql, *n_keys, partial).await;
    }
    for (sql, why) in [
        (
            "SELECT COUNT(*) FROM diagnoses d RIGHT JOIN participants p USING (pid)",
            "LEFT JOIN with the tables swapped",
        ),
        (
            "SELECT COUNT(*) FROM participants p FULL JOIN diagnoses d USING (pid)",
            "or a LEFT JOIN",
        ),
        (
            "SELECT COUNT(*) FROM participants p LEFT JOIN diagnoses d ON d.code = p.sex",
            "privacy unit",
        ),
        (
            "SELECT COUNT(*) FROM participants p JOIN diagnoses a ON a.pid = p.pid JOIN diagnoses b ON b.pid = p.pid \
             JOIN diagnoses c ON c.pid = p.pid JOIN labs l ON l.pid = p.pid JOIN specimens s ON s.pid = p.pid",
            "at most 5 tables",
        ),
        (
            "SELECT COUNT(*) FROM participants p LEFT JOIN diagnoses d USING (pid) JOIN labs l ON l.pid = d.pid",
            "privacy unit",
        ),
        (
            "SELECT COUNT(*) FROM participants p JOIN diagnoses d USING (pid) JOIN labs l ON l.value = d.pid",
            "privacy unit",
        ),
    ] {
        match engine.plan("alice", sql).await {
            Err(CoordinatorError::Refused(m)) => assert!(m.contains(why), "{sql}: {m}"),
            other => panic!("{sql}: expected a refusal, got {:?}", other.map(|q| q.request)),
        }
    }
    fed.shutdown().await.unwrap();
}

/// A neighbouring pair for expressions and a LEFT JOIN: two federations that differ in one
/// participant with an E11 diagnosis and the earliest birth year (the largest `2026 -
/// birth_year`, so the removal moves the computed sum by as much as the data allow), asked
/// the same prevalence query at ε = 2. Both succeed with the same columns and one row, and
/// each released value differs by at most its statistic's Δ plus twice its discrete
/// Laplace half-width at 1e-12 (three outputs: a spurious failure has probability below
/// 6e-12).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expressions_over_a_left_join_on_neighbouring_federations_differ_only_within_the_noise() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    synth(&a, 2, 600, 23);
    copy_dir(&a, &b);
    let sql =
        "SELECT COUNT(*), COUNT(*) FILTER (WHERE d.code IS NOT NULL), SUM(2026 - p.birth_year) \
               FROM participants p LEFT JOIN diagnoses d ON d.pid = p.pid AND d.code = 'E11'";
    let ctx = site_context(&a).await;
    let rows = ctx
        .sql(
            "SELECT p.pid FROM participants p JOIN diagnoses d ON d.pid = p.pid AND d.fedq_site = p.fedq_site \
             WHERE d.code = 'E11' ORDER BY p.birth_year, p.pid LIMIT 1",
        )
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let pid = fedq_tests::key(&rows[0], 0, 0);
    assert!(
        remove_participant(&b, &pid) > 0,
        "the neighbour lacks {pid}"
    );
    released_within_the_noise(&a, &b, sql).await;
}

/// More per-participant aggregates (part 1): `AVG(col)` of clamped values, `bool_or` / `bool_and` of a condition ("has
/// an E11 diagnosis", "only HbA1c tests"), a boolean with the public domain {false, true};
/// `SUM(col)`, declared within R times the column's bounds; and `COUNT(col)`, within
/// [0, R]. Their partials equal DataFusion's per site, with the same clamps.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_participant_sums_counts_and_conditions_equal_datafusion_per_site() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 2, 1500, 61);
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let ctx = site_context(dir).await;
    let rows = |a: &AggregateRequest| matches!(a, AggregateRequest::CountRows);
    let sum = |a: &AggregateRequest| matches!(a, AggregateRequest::SumFixed { .. });
    type Pick = fn(&AggregateRequest) -> bool;
    let shapes: Vec<(&str, &str, usize, Pick)> = vec![
        (
            "SELECT has_e11, COUNT(*) FROM (SELECT pid, bool_or(code = 'E11') AS has_e11 FROM diagnoses GROUP BY pid) t \
             GROUP BY has_e11",
            "SELECT has_e11, COUNT(*) FROM (SELECT pid, fedq_site, bool_or(code = 'E11') AS has_e11 FROM diagnoses \
             GROUP BY pid, fedq_site) GROUP BY has_e11",
            1,
            rows,
        ),
        (
            "SELECT COUNT(*) FROM (SELECT pid, bool_and(test = 'HbA1c') AS only_hba1c FROM labs GROUP BY pid) t WHERE only_hba1c",
            "SELECT COUNT(*) FROM (SELECT pid, fedq_site, bool_and(test = 'HbA1c') AS only_hba1c FROM labs \
             GROUP BY pid, fedq_site) WHERE only_hba1c",
            0,
            rows,
        ),
        (
            "SELECT SUM(total) FROM (SELECT pid, SUM(value) AS total FROM labs WHERE test = 'HbA1c' GROUP BY pid) t",
            "SELECT CAST(SUM(ROUND(LEAST(total, 10000.0) / 0.01)) AS BIGINT) FROM (SELECT pid, fedq_site, \
             SUM(LEAST(GREATEST(value, 0.0), 500.0)) AS total FROM labs WHERE test = 'HbA1c' GROUP BY pid, fedq_site)",
            0,
            sum,
        ),
        (
            // A threshold no mean of 0.1-step values over fewer than 1,000 rows equals, so
            // that the order of summation cannot decide a participant.
            "SELECT COUNT(*) FROM (SELECT pid, AVG(value) AS mean_hba1c FROM labs WHERE test = 'HbA1c' GROUP BY pid) t \
             WHERE mean_hba1c >= 6.537",
            "SELECT COUNT(*) FROM (SELECT pid, fedq_site, AVG(CASE WHEN value IS NOT NULL THEN LEAST(GREATEST(value, 0.0), 500.0) END) AS mean_hba1c \
             FROM labs WHERE test = 'HbA1c' GROUP BY pid, fedq_site) WHERE mean_hba1c >= 6.537",
            0,
            rows,
        ),
        (
            "SELECT SUM(n) FROM (SELECT pid, COUNT(value) AS n FROM labs GROUP BY pid) t",
            "SELECT SUM(LEAST(n, 20)) FROM (SELECT pid, fedq_site, COUNT(value) AS n FROM labs GROUP BY pid, fedq_site)",
            0,
            sum,
        ),
        // Spreads and medians of a participant's clamped values (thresholds no value of
        // 0.1-step data meets exactly, so that summation order decides no participant).
        (
            "SELECT COUNT(*) FROM (SELECT pid, STDDEV(value) AS sd FROM labs WHERE test = 'HbA1c' GROUP BY pid) t \
             WHERE sd > 0.8137",
            "SELECT COUNT(*) FROM (SELECT pid, fedq_site, STDDEV(CASE WHEN value IS NOT NULL THEN LEAST(GREATEST(value, 0.0), 500.0) END) AS sd FROM labs \
             WHERE test = 'HbA1c' GROUP BY pid, fedq_site) WHERE sd > 0.8137",
            0,
            rows,
        ),
        (
            "SELECT COUNT(*) FROM (SELECT pid, VAR_POP(value) AS v FROM labs WHERE test = 'glucose' GROUP BY pid) t \
             WHERE v < 301.3137",
            "SELECT COUNT(*) FROM (SELECT pid, fedq_site, VAR_POP(CASE WHEN value IS NOT NULL THEN LEAST(GREATEST(value, 0.0), 500.0) END) AS v FROM labs \
             WHERE test = 'glucose' GROUP BY pid, fedq_site) WHERE v < 301.3137",
            0,
            rows,
        ),
        (
            "SELECT SUM(m) FROM (SELECT pid, MEDIAN(value) AS m FROM labs WHERE test = 'HbA1c' GROUP BY pid) t",
            "SELECT CAST(SUM(ROUND(m / 0.01)) AS BIGINT) FROM (SELECT pid, fedq_site, \
             MEDIAN(CASE WHEN value IS NOT NULL THEN LEAST(GREATEST(value, 0.0), 500.0) END) AS m FROM labs WHERE test = 'HbA1c' GROUP BY pid, fedq_site)",
            0,
            sum,
        ),
        // Aggregates of the rows a condition picks, in the three spellings researchers use.
        (
            "SELECT COUNT(*) FROM (SELECT pid, COUNT(*) FILTER (WHERE code = 'E11') AS n_e11 FROM diagnoses GROUP BY pid) t \
             WHERE n_e11 >= 2",
            "SELECT COUNT(*) FROM (SELECT pid, fedq_site, COUNT(*) FILTER (WHERE code = 'E11') AS n_e11 FROM diagnoses \
             GROUP BY pid, fedq_site) WHERE n_e11 >= 2",
            0,
            rows,
        ),
        (
            "SELECT COUNT(*) FROM (SELECT pid, MAX(CASE WHEN test = 'HbA1c' THEN value END) AS a1c, \
             COUNT(CASE WHEN test = 'LDL' THEN 1 END) AS n_ldl FROM labs GROUP BY pid) t WHERE a1c >= 6.5 AND n_ldl >= 1",
            "SELECT COUNT(*) FROM (SELECT pid, fedq_site, MAX(CASE WHEN test = 'HbA1c' THEN value END) AS a1c, \
             COUNT(CASE WHEN test = 'LDL' THEN 1 END) AS n_ldl FROM labs GROUP BY pid, fedq_site) WHERE a1c >= 6.5 AND n_ldl >= 1",
            0,
            rows,
        ),
        (
            "SELECT SUM(n) FROM (SELECT pid, SUM(CASE WHEN code LIKE 'E1%' THEN 1 ELSE 0 END) AS n FROM diagnoses GROUP BY pid) t",
            "SELECT SUM(LEAST(n, 15)) FROM (SELECT pid, fedq_site, SUM(CASE WHEN code LIKE 'E1%' THEN 1 ELSE 0 END) AS n \
             FROM diagnoses GROUP BY pid, fedq_site)",
            0,
            sum,
        ),
    ];
    for (sql, want_sql, n_keys, pick) in &shapes {
        let q = engine
            .plan("alice", sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(q.request.max_rows_per_unit, 1, "{sql}: R = 1, proven");
        let partial = partial_of(&q, pick);
        partials_equal(&engine, &ctx, sql, want_sql, *n_keys, partial).await;
    }
    fed.shutdown().await.unwrap();
}

/// The first or latest row per participant (part 1): `ROW_NUMBER() OVER (PARTITION BY pid
/// ORDER BY …)` kept at `rn = 1` (as a CTE, alone or joined), and `first_value(col ORDER BY
/// …)` in a `GROUP BY pid` subquery. Rows that tie on the order are ordered by the value,
/// which DataFusion's query below does too, so the partials equal DataFusion's per site.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_row_per_participant_equals_datafusion_per_site() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 2, 1500, 67);
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let ctx = site_context(dir).await;
    let latest = "WITH latest AS (SELECT pid, value, ROW_NUMBER() OVER (PARTITION BY pid ORDER BY measured_on DESC) AS rn \
                  FROM labs WHERE test = 'HbA1c') ";
    let latest_df = "(SELECT pid, fedq_site, value, ROW_NUMBER() OVER (PARTITION BY pid, fedq_site \
                     ORDER BY measured_on DESC, value ASC NULLS LAST) AS rn FROM labs WHERE test = 'HbA1c')";
    let shapes: Vec<(String, String, usize)> = vec![
        (
            format!(
                "{latest}SELECT CASE WHEN value >= 6.5 THEN 'high' ELSE 'not high' END AS category, COUNT(*) \
                 FROM latest WHERE rn = 1 GROUP BY 1"
            ),
            format!(
                "SELECT CASE WHEN value >= 6.5 THEN 'high' ELSE 'not high' END, COUNT(*) FROM {latest_df} \
                 WHERE rn = 1 GROUP BY 1"
            ),
            1,
        ),
        (
            format!(
                "{latest}SELECT p.sex, COUNT(*) FROM latest l JOIN participants p USING (pid) \
                 WHERE l.rn = 1 AND l.value > 50 GROUP BY p.sex"
            ),
            format!(
                "SELECT p.sex, COUNT(*) FROM {latest_df} l JOIN participants p ON l.pid = p.pid \
                 AND l.fedq_site = p.fedq_site WHERE l.rn = 1 AND l.value > 50 GROUP BY p.sex"
            ),
            1,
        ),
        (
            "SELECT COUNT(*) FROM (SELECT pid, first_value(code ORDER BY diagnosed_on) AS first_code \
             FROM diagnoses GROUP BY pid) t WHERE first_code = 'E11'"
                .into(),
            "SELECT COUNT(*) FROM (SELECT code, ROW_NUMBER() OVER (PARTITION BY pid, fedq_site \
             ORDER BY diagnosed_on ASC, code ASC NULLS LAST) AS rn FROM diagnoses) WHERE rn = 1 AND code = 'E11'"
                .into(),
            0,
        ),
        (
            // The second-latest value (row 2), of participants with two or more.
            format!(
                "{latest}SELECT CASE WHEN value >= 6.5 THEN 'high' ELSE 'not high' END AS category, COUNT(*) \
                 FROM latest WHERE rn = 2 GROUP BY 1"
            ),
            format!(
                "SELECT CASE WHEN value >= 6.5 THEN 'high' ELSE 'not high' END, COUNT(*) FROM {latest_df} \
                 WHERE rn = 2 GROUP BY 1"
            ),
            1,
        ),
        (
            // Participants with a third E11 diagnosis, by its year (the numbered subquery
            // keeps only the participant and the date it orders by).
            "SELECT year(d) AS y, COUNT(*) FROM (SELECT pid, diagnosed_on AS d, ROW_NUMBER() OVER (PARTITION BY pid \
             ORDER BY diagnosed_on) AS rn FROM diagnoses WHERE code = 'E11') t WHERE 3 = rn GROUP BY 1"
                .into(),
            "SELECT CAST(date_part('year', diagnosed_on) AS BIGINT), COUNT(*) FROM (SELECT diagnosed_on, \
             ROW_NUMBER() OVER (PARTITION BY pid, fedq_site ORDER BY diagnosed_on ASC, diagnosed_on ASC NULLS LAST) AS rn \
             FROM diagnoses WHERE code = 'E11') WHERE rn = 3 GROUP BY 1"
                .into(),
            1,
        ),
    ];
    for (sql, want_sql, n_keys) in &shapes {
        let q = counts_equal(&engine, &ctx, sql, want_sql, *n_keys).await;
        assert_eq!(q.request.max_rows_per_unit, 1, "{sql}: R = 1, proven");
    }
    for (sql, why) in [
        (
            format!("{latest}SELECT COUNT(*) FROM latest WHERE rn <= 3"),
            "`WHERE rn = k`",
        ),
        (
            "SELECT COUNT(*) FROM (SELECT pid, ROW_NUMBER() OVER (PARTITION BY test ORDER BY measured_on) AS rn \
             FROM labs) t WHERE rn = 1"
                .into(),
            "partitioned by the participant alone",
        ),
        (
            "SELECT COUNT(*) FROM (SELECT pid, RANK() OVER (PARTITION BY pid ORDER BY measured_on) AS r \
             FROM labs) t WHERE r = 1"
                .into(),
            "first_value(value ORDER BY measured_on DESC)",
        ),
        (
            "SELECT COUNT(*) FROM (SELECT pid, first_value(code) AS c FROM diagnoses GROUP BY pid) t".into(),
            "needs an order",
        ),
    ] {
        match engine.plan("alice", &sql).await {
            Err(CoordinatorError::Refused(m)) => assert!(m.contains(why), "{sql}: {m}"),
            other => panic!("{sql}: expected a refusal, got {:?}", other.map(|q| q.request)),
        }
    }
    fed.shutdown().await.unwrap();
}

/// Every output of `sql` on federations `a` and `b` at ε = 2: the same columns and rows,
/// and each value within its statistic's Δ plus twice its discrete Laplace half-width at
/// 1e-12 of the other (a spurious failure has probability below 2e-12 per output).
async fn released_within_the_noise(a: &std::path::Path, b: &std::path::Path, sql: &str) {
    let mut released: Vec<(Vec<String>, Vec<f64>)> = Vec::new();
    let mut limits: Vec<f64> = Vec::new();
    for dir in [a, b] {
        let fed = fedq::federation::LocalFederation::start(
            dir,
            FederationOptions {
                min_reported_count: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let engine = fed.coordinator.engine.clone();
        let q = engine.plan("alice", sql).await.unwrap();
        assert!(q.groups.is_empty(), "{sql}: one row");
        limits = (0..q.outputs.len())
            .map(|j| {
                let st = q
                    .statistics
                    .iter()
                    .find(|s| s.used_by == vec![j])
                    .unwrap_or_else(|| panic!("{sql}: output {j} has one statistic of its own"));
                let scale = st.sensitivity as f64 / st.epsilon.to_f64().value() * (q.epsilon / 2.0);
                (st.sensitivity as f64 + 2.0 * discrete_laplace_half_width(scale, 1e-12)) * st.unit
            })
            .collect();
        let mut alice = fed.client("alice").await.unwrap();
        alice.query("SET fedq.epsilon = 2").await.unwrap();
        let r = alice.query(sql).await.unwrap();
        let batch = &r.batches[0];
        assert_eq!(batch.num_rows(), 1, "{sql}");
        let names = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let values = (0..limits.len())
            .map(|c| fedq_tests::cell(batch, c, 0).expect("a released value"))
            .collect();
        released.push((names, values));
        fed.shutdown().await.unwrap();
    }
    assert_eq!(released[0].0, released[1].0, "{sql}: the same columns");
    for (j, limit) in limits.iter().enumerate() {
        let (va, vb) = (released[0].1[j], released[1].1[j]);
        assert!(
            (va - vb).abs() <= *limit,
            "{sql}, output {j}: released {va} and {vb}, more apart than Δ plus twice the noise bound ({limit})"
        );
    }
}

/// Neighbouring pairs for the per-participant shapes of this issue, each at its edge: the
/// participant with the largest sum of lab values (a derived `SUM`, declared within R times
/// the column's bounds, the latest value by `ROW_NUMBER() … = 1`, and a CTE's computed
/// column), and the participant
/// with the most diagnoses (a self-join, whose pairs R bounds), and the participant with the
/// most (diagnosis, lab) pairs (a join of three tables, whose rows R bounds however many
/// tables pair them). The participant with the most diagnoses is also the edge of two
/// derived tables joined to each other and of a derived count of the rows a FILTER picks.
/// Each pair of federations differs in that one participant, and every
/// released value differs only within the noise.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_participant_shapes_on_neighbouring_federations_differ_only_within_the_noise() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    synth(&a, 2, 500, 29);
    let ctx = site_context(&a).await;
    let top = |sql: &'static str| {
        let ctx = ctx.clone();
        async move {
            let rows = ctx.sql(sql).await.unwrap().collect().await.unwrap();
            fedq_tests::key(&rows[0], 0, 0)
        }
    };
    let heaviest =
        top("SELECT pid FROM labs GROUP BY pid, fedq_site ORDER BY SUM(value) DESC, pid LIMIT 1")
            .await;
    let most_diagnosed = top(
        "SELECT pid FROM diagnoses GROUP BY pid, fedq_site ORDER BY COUNT(*) DESC, pid LIMIT 1",
    )
    .await;
    let most_paired = top(
        "SELECT d.pid FROM diagnoses d JOIN labs l ON l.pid = d.pid AND l.fedq_site = d.fedq_site \
         GROUP BY d.pid, d.fedq_site ORDER BY COUNT(*) DESC, d.pid LIMIT 1",
    )
    .await;
    let without = |pid: &str, name: &str| {
        let b = tmp.path().join(name);
        copy_dir(&a, &b);
        assert!(remove_participant(&b, pid) > 0, "the neighbour lacks {pid}");
        b
    };
    let b = without(&heaviest, "b");
    released_within_the_noise(
        &a,
        &b,
        "SELECT COUNT(*), SUM(total) FROM (SELECT pid, SUM(value) AS total FROM labs GROUP BY pid) t",
    )
    .await;
    released_within_the_noise(
        &a,
        &b,
        "WITH latest AS (SELECT pid, value, ROW_NUMBER() OVER (PARTITION BY pid ORDER BY measured_on DESC) AS rn \
         FROM labs) SELECT COUNT(*), SUM(value) FROM latest WHERE rn = 1",
    )
    .await;
    // A subquery's computed column, read by its definition.
    released_within_the_noise(
        &a,
        &b,
        "WITH t AS (SELECT pid, value - 6.5 AS excess FROM labs) SELECT COUNT(*), SUM(excess) FROM t",
    )
    .await;
    // A scalar subquery: one more statistic of the same request.
    released_within_the_noise(
        &a,
        &b,
        "SELECT COUNT(*) AS cases, (SELECT COUNT(*) FROM participants) AS total FROM participants \
         WHERE pid IN (SELECT pid FROM labs WHERE test = 'HbA1c')",
    )
    .await;
    let c = without(&most_diagnosed, "c");
    released_within_the_noise(
        &a,
        &c,
        "SELECT COUNT(*), COUNT(*) FILTER (WHERE a.code <> b.code) FROM diagnoses a JOIN diagnoses b USING (pid)",
    )
    .await;
    // Derived tables joined to each other, and a derived column of the rows a FILTER picks.
    released_within_the_noise(
        &a,
        &c,
        "SELECT COUNT(*), SUM(a.n) FROM (SELECT pid, COUNT(*) AS n FROM diagnoses GROUP BY pid) a \
         JOIN (SELECT pid, MAX(value) AS top FROM labs GROUP BY pid) b USING (pid)",
    )
    .await;
    released_within_the_noise(
        &a,
        &c,
        "SELECT COUNT(*), SUM(n_e11) FROM (SELECT pid, COUNT(*) FILTER (WHERE code = 'E11') AS n_e11 \
         FROM diagnoses GROUP BY pid) t",
    )
    .await;
    let d = without(&most_paired, "d");
    released_within_the_noise(
        &a,
        &d,
        "SELECT COUNT(*), COUNT(DISTINCT d.pid) FROM diagnoses d JOIN labs l ON l.pid = d.pid \
         JOIN participants p ON p.pid = d.pid WHERE p.birth_year < 2010",
    )
    .await;
}

/// Scalar subqueries over the query's own table (part 5) are statistics of the same query:
/// the subquery becomes one more aggregate, grouped like the query (a correlation on its
/// GROUP BY column is the grouping), and both read one request. The exact partials equal
/// DataFusion's, and a rate per 1,000 released through Flight SQL lies within the interval
/// that the numerator's and denominator's noise bounds (discrete Laplace half-widths at
/// 1e-12 each) allow around the exact rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scalar_subqueries_over_the_query_table_are_statistics_of_the_same_query() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 2, 1500, 71);
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let ctx = site_context(dir).await;
    let d = keyed("d");
    let sql = "SELECT sex, COUNT(*) AS cases, (SELECT COUNT(*) FROM participants p2 WHERE p2.sex = p.sex) AS total \
               FROM participants p WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11') GROUP BY sex";
    let q = engine.plan("alice", sql).await.unwrap();
    let cases = partial_of(&q, |a| matches!(a, AggregateRequest::CountNonNull { .. }));
    let merged = engine.gather(&q).await.unwrap();
    let got = merged_rows(
        &merged,
        &q.request.aggregates,
        &[cases, AggregateRequest::CountRows],
    );
    let want = exact_rows(
        &ctx,
        &format!(
            "SELECT p.sex, SUM(CASE WHEN e.k IS NOT NULL THEN 1 ELSE 0 END), COUNT(*) FROM participants p \
             LEFT JOIN (SELECT DISTINCT {d} AS k FROM diagnoses d WHERE d.code = 'E11') e ON e.k = {P} GROUP BY p.sex"
        ),
        1,
    )
    .await;
    assert_eq!(got, want, "{sql}");

    let rate = "SELECT COUNT(*) * 1000.0 / (SELECT COUNT(*) FROM participants) AS per_1000 \
                FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11')";
    let q = engine.plan("alice", rate).await.unwrap();
    assert_eq!(q.statistics.len(), 2, "numerator and denominator");
    let t: Vec<f64> = q
        .statistics
        .iter()
        .map(|st| {
            let scale = st.sensitivity as f64 / st.epsilon.to_f64().value() * (q.epsilon / 2.0);
            discrete_laplace_half_width(scale, 1e-12)
        })
        .collect();
    let exact = exact_rows(
        &ctx,
        &format!(
            "SELECT SUM(CASE WHEN e.k IS NOT NULL THEN 1 ELSE 0 END), COUNT(*) FROM participants p \
             LEFT JOIN (SELECT DISTINCT {d} AS k FROM diagnoses d WHERE d.code = 'E11') e ON e.k = {P}"
        ),
        0,
    )
    .await;
    let (num, den) = {
        let v = exact.values().next().expect("one row");
        (v[0] as f64, v[1] as f64)
    };
    let (t_num, t_den) = (t[0], t[1]);
    let mut alice = fed.client("alice").await.unwrap();
    alice.query("SET fedq.epsilon = 2").await.unwrap();
    let r = alice.query(rate).await.unwrap();
    assert_eq!(r.batches[0].schema().field(0).name(), "per_1000");
    let released = fedq_tests::cell(&r.batches[0], 0, 0).expect("a rate");
    let (lo, hi) = (
        (num - t_num) * 1000.0 / (den + t_den),
        (num + t_num) * 1000.0 / (den - t_den),
    );
    assert!(
        (lo..=hi).contains(&released),
        "released {released} per 1,000, outside [{lo}, {hi}] around the exact {}",
        num * 1000.0 / den
    );
    fed.shutdown().await.unwrap();
}

/// Every query the README's demo runs is answered (the demo itself stops at the first that
/// is not), here on a small federation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_demo_query_is_answered() {
    let tmp = tempfile::tempdir().unwrap();
    synth(tmp.path(), 2, 800, 73);
    let fed = start(tmp.path()).await;
    let mut alice = fed.client("alice").await.unwrap();
    alice.query("SET fedq.epsilon = 0.1").await.unwrap();
    for (what, sql) in fedq::demo::DEMO_QUERIES {
        // Partition selection may release no group on so few participants: an empty
        // answer is an answer.
        alice
            .query(sql)
            .await
            .unwrap_or_else(|e| panic!("{what}: {sql}: {e}"));
    }
    fed.shutdown().await.unwrap();
}
